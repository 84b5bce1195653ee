"""A raw WSGI app that echoes what it was given, as JSON (for the integration tests)."""
import json
import os
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "touch" in query:        # tells a test that this request has reached the app
        open(query["touch"][0], "w").close()
    if "sleep" in query:
        time.sleep(float(query["sleep"][0]))
    child = None
    if "fork" in query:         # a child (fork, no exec: it holds every fd) that outlives us
        child = os.fork()
        if child == 0:
            time.sleep(float(query["fork"][0]))
            os._exit(0)
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    doc = {
        "script_name": environ.get("SCRIPT_NAME"),
        "path_info": environ.get("PATH_INFO"),
        "query": environ.get("QUERY_STRING"),
        "greeting": os.environ.get("GREETING"),
        "app": os.environ.get("HOSTSVC_APP"),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "body_length": len(body),
        "child": child,
        "headers": {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                    if k.startswith("HTTP_")},
    }
    out = json.dumps(doc).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out)))])
    return [out]
