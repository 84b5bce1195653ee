"""A raw WSGI app: shows that any WSGI callable can be hosted (`wsgi: plain_wsgi:app`)."""
import os


def app(environ, start_response):
    body = (f"plain wsgi: script_name={environ.get('SCRIPT_NAME', '')!r} "
            f"path_info={environ.get('PATH_INFO', '')!r} "
            f"greeting={os.environ.get('GREETING', 'hi')}\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
