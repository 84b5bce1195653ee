"""The status page in a real headless Chromium (Debian's chromium + chromium-driver, driven
through selenium) against the running stack: it loads without console errors, shows
every app of the config file, and its numbers change by themselves after traffic.

Missing Chromium: a failure when $CI is set, a skip (saying what to install) otherwise.
`HOSTSVC_UPDATE_SCREENSHOT=1` also writes the screenshot to docs/status-page.png.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from support.paths import DEFAULT_CONFIG as CONFIG
from support.paths import REPO as ROOT
from harness import descendants, proc_stat, survivors, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-dev-shm-usage", "--window-size=1180,640"]


def missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package (pip install -e '.[test]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return "Debian's chromium and chromium-driver (bash scripts/setup --test)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    need = missing()
    if need:
        message = f"the browser test needs {need}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: a missing browser is a failure)")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = DriverService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    pid = service.process.pid                   # chromedriver; Chromium runs under it
    known = {pid: proc_stat(pid)[2]}
    try:
        driver.set_page_load_timeout(30)
        known.update(descendants(pid))
        yield driver
    finally:
        known.update(descendants(pid))
        driver.quit()
        try:
            wait_for(lambda: not survivors(known), timeout=20, what="Chromium to exit")
        finally:
            for pid in survivors(known):        # only after a failure: leave nothing
                os.kill(pid, signal.SIGKILL)


def configured_apps() -> list[str]:
    from hostsvc.config import load
    return [a.name for a in load(CONFIG).apps]


def cell(driver, app: str, field: str) -> str:
    return driver.execute_script(
        "var c = document.querySelector('tr[data-app=\"' + arguments[0] + '\"] "
        "td[data-field=\"' + arguments[1] + '\"]'); return c ? c.textContent : null;",
        app, field)


def number(text: str | None) -> float | None:
    try:
        return float((text or "").replace(",", ""))
    except ValueError:
        return None


def test_status_page_live(browser, stack, tmp_path):
    names = configured_apps()
    assert len(names) >= 5
    browser.get(f"http://127.0.0.1:{stack.port}/")          # "/" redirects to the page
    assert browser.current_url == f"http://127.0.0.1:{stack.port}/status/"
    assert "hostsvc status" in browser.title

    wait_for(lambda: all(cell(browser, n, "state") == "running" for n in names),
             timeout=20, what="every configured app shown as running")
    shown = browser.execute_script(
        "return Array.from(document.querySelectorAll('#apps tbody tr'), r => r.dataset.app)")
    assert sorted(shown) == sorted(names)
    for name in names:
        alive, _, configured = cell(browser, name, "workers").partition("/")
        assert alive == configured and int(configured) >= 1
    # config/hostsvc.yaml runs hello on granian, the rest on the default engine
    assert cell(browser, "hello", "engine") == "granian"
    assert cell(browser, "notes", "engine") == "gunicorn"

    # Traffic to one app; the page must pick it up by itself (fetch), not by a reload.
    browser.execute_script("window.__sameDocument = true;")
    wait_for(lambda: number(cell(browser, "hello", "requests_total")) is not None,
             timeout=20, what="the hello app's request count on the page")
    before = number(cell(browser, "hello", "requests_total"))
    for i in range(25):
        assert stack.request(f"/hello/greet/visitor{i}")[0] == 200
    wait_for(lambda: (number(cell(browser, "hello", "requests_total")) or 0) >= before + 25,
             timeout=20, what="the page to show the new hello requests")
    wait_for(lambda: (number(cell(browser, "hello", "rate")) or 0) > 0,
             timeout=20, what="a hello request rate above zero")
    assert browser.execute_script("return window.__sameDocument === true")
    assert cell(browser, "hello", "p50").endswith("ms")

    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    if os.environ.get("HOSTSVC_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "status-page.png")

    logs = browser.get_log("browser")
    severe = [e for e in logs if e.get("level") == "SEVERE"]
    assert not severe, severe
