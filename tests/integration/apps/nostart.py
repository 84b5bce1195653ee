"""An app that imports fine (so `hostsvc check` passes) but whose pool always dies at
start: its module raises when loaded by a gunicorn arbiter (`hostsvc.pool run`)."""
import sys

if sys.argv[1:2] == ["run"]:
    raise RuntimeError("nostart refuses to start, as the test asked")


def app(environ, start_response):  # pragma: no cover - never serves
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"unreachable"]
