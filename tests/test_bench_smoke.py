"""Smoke test of the framework benchmark: `bench/web.py --quick` runs end to end.

It checks that every server starts, every row is served and parsed, and the ratio and
per-request cost lines are printed. It asserts no speed: CI machines are shared and
noisy, so a threshold here would fail for reasons that are not regressions.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^([a-e])  .*?\s([\d.]+) req/s  p50\s+[\d.]+ ms  p99\s+[\d.]+ ms  errors (\d+)"
                 r"  rounds \d+-\d+$", re.M)


def test_quick_benchmark_prints_every_row_and_ratio() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "web.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr

    rows = ROW.findall(out)
    # 5 cases (a-e) on gunicorn sync and on CherryPy's own server, a-c on granian.
    assert sorted(key for key, _, _ in rows) == sorted("abcde" * 2 + "abc"), out
    assert len(re.findall(r"^[abc]  .* granian wsgi x2 ", out, re.M)) == 3, out
    for key, rps, _errors in rows:
        assert float(rps) > 0, f"row {key} served nothing:\n{out}"

    for name in ("b/a  hostsvc hello / raw WSGI (granian)", "c/a  hostsvc path+query / raw "
                 "WSGI (granian)", "a/a  raw WSGI, granian / gunicorn", "b/a  hostsvc hello / "
                 "raw WSGI (gunicorn)", "c/a ", "b/d ", "c/e ", "a/d ", "b/d' ", "d'/d "):
        assert re.search(rf"^ratio {re.escape(name)}.*\d+\.\d+x .*(PASS|MISS|info)$", out,
                         re.M), f"missing ratio {name}:\n{out}"
    assert len(re.findall(r"^ratio .*(PASS|MISS)$", out, re.M)) == 3, out

    for key in ("b ", "c ", "d ", "e ", "c'", "e'"):
        assert re.search(rf"^us/call  {key} .*framework cost\s+-?[\d.]+ us/request$", out,
                         re.M), f"missing framework cost of row {key}:\n{out}"
    assert re.search(r"^us/call  b\* .*framework cost\s+-?[\d.]+ us/request  \(raw ", out,
                     re.M), f"missing framework cost of row b*:\n{out}"


FULL_ROW = re.compile(r"^([A-F])  .*?\s([\d.]+) req/s  p50\s+[\d.]+ ms  p99\s+[\d.]+ ms  errors (\d+)$",
                      re.M)


def test_quick_fullstack_benchmark_prints_rows_ratios_startup_and_memory() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fullstack.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    rows = FULL_ROW.findall(out)
    # A-C: bare gunicorn, the stack on gunicorn with and without metrics; D-F the same
    # on granian
    assert sorted(key for key, _, _ in rows) == list("ABCDEF"), out
    for key, rps, errors in rows:
        assert float(rps) > 0 and int(errors) == 0, f"row {key}:\n{out}"
    assert re.search(r"^ratio B/A .*\d+\.\d+x .*(PASS|MISS)$", out, re.M), out
    assert re.search(r"^metrics cost 1 - B/C .*%.*(PASS|MISS)$", out, re.M), out
    assert re.search(r"^ratio E/B .*granian / gunicorn .*\d+\.\d+x .*(PASS|MISS)$", out,
                     re.M), out
    assert re.search(r"^ratio E/D .*\d+\.\d+x$", out, re.M), out
    assert re.search(r"^metrics cost 1 - E/F .*-?[\d.]+ %$", out, re.M), out
    for engine in ("gunicorn", "granian"):
        assert re.search(rf"^pool CPU per request, {engine} +metrics on +[\d.]+ us  off +"
                         rf"[\d.]+ us  metrics +[+-][\d.]+ us$", out, re.M), out
        assert re.search(rf"^stack CPU per request, {engine} +\(pool\+nginx\+wrk\) on +"
                         rf"[\d.]+ us  off +[\d.]+ us  metrics cost by CPU +-?[\d.]+ %$",
                         out, re.M), out
    assert re.search(r"^startup .* 10 apps .*\d+\.\d+ s .*(PASS|MISS)$", out, re.M), out
    for what in ("supervisor", "idle gunicorn pool", "idle granian pool", "nginx master"):
        assert re.search(rf"^memory +{what}.*RSS +[\d.]+ MiB +PSS +[\d.]+ MiB$", out, re.M), out


def test_metrics_overhead_benchmark_prints_every_row() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "metrics_overhead.py"),
                           "--seconds", "0.05"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"^bare +warm +[\d.]+ us  cold +[\d.]+ us$", out, re.M), out
    for row in ("public API, per request", "instrument\\(\\)"):
        assert re.search(rf"^{row} +warm +[\d.]+ us  cold +[\d.]+ us  metrics +-?[\d.]+ / "
                         rf"+-?[\d.]+$", out, re.M), f"missing row {row}:\n{out}"
