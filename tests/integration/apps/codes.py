"""A raw WSGI app answering the status a test asks for (metrics integration tests).

/ok -> 200, /missing -> 404, /boom -> an exception (gunicorn answers 500),
/status/NNN -> NNN.
"""


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/boom":
        raise RuntimeError("boom, as the test asked")
    if path == "/ok":
        status = "200 OK"
    elif path.startswith("/status/"):
        status = f"{int(path[len('/status/'):])} Test"
    else:
        status = "404 Not Found"
    body = f"{status}\n".encode()
    start_response(status, [("Content-Type", "text/plain"),
                            ("Content-Length", str(len(body)))])
    return [body]
