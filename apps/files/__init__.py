"""files: upload, list and download files behind a simple session login.

    GET  /            the file list and an upload form (login required)
    GET  /login       the login form; POST /login checks FILES_USERS
    POST /logout      ends the session
    POST /upload      multipart upload, at most FILES_MAX_BYTES (413 beyond)
    GET  /download/<name>   the file as an attachment (Range and 304 supported)
    GET  /static/...  the page's CSS, served with long-lived caching headers

Settings (environment): FILES_DIR (where uploads go), FILES_USERS ("user:password,..."),
FILES_MAX_BYTES (default 5 MiB), FILES_SESSION_DIR (file session store; one host) or
FILES_SESSION_REDIS (redis://..., for several hosts).
"""
from __future__ import annotations

import html
import os
import re
import secrets
import tempfile

from hostsvc import web

HERE = os.path.dirname(os.path.abspath(__file__))
SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]")


def files_dir() -> str:
    path = os.environ.get("FILES_DIR") or os.path.join(tempfile.gettempdir(), "hostsvc-files")
    os.makedirs(path, exist_ok=True)
    return path


def users() -> dict[str, str]:
    pairs = os.environ.get("FILES_USERS", "demo:demo").split(",")
    return dict(p.split(":", 1) for p in pairs if ":" in p)


def safe_name(name: str) -> str:
    """A name that is a plain file in files_dir: no directories, no dotfiles, no oddities."""
    base = SAFE_NAME.sub("_", os.path.basename(name.replace("\\", "/"))).strip(" .")
    return base[:120] or "upload"


def unique_path(directory: str, name: str) -> str:
    stem, ext = os.path.splitext(name)
    candidate, n = name, 1
    while os.path.exists(os.path.join(directory, candidate)):
        n += 1
        candidate = f"{stem}-{n}{ext}"
    return os.path.join(directory, candidate)


def require_login() -> None:
    """Tool: send anonymous visitors to the login page."""
    if not web.session.get("user"):
        raise web.HTTPRedirect(web.url("/login"))


web.tools.files_login = web.Tool("before_handler", require_login, priority=70)

PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>files</title>
<link rel="stylesheet" href="{static}/site.css"></head><body><main>{body}</main></body></html>"""


def page(body: str) -> str:
    return PAGE.format(static=web.url("/static"), body=body)


class Root:
    _cp_config = {"tools.files_login.on": True}

    @web.expose
    def index(self) -> str:
        names = sorted(n for n in os.listdir(files_dir()) if not n.startswith("."))
        items = "".join(
            f'<li><a href="{web.url("/download/" + html.escape(n))}">{html.escape(n)}</a></li>'
            for n in names) or "<li>No files yet.</li>"
        csrf = web.session.setdefault("csrf", secrets.token_urlsafe(16))
        return page(
            f"<h1>Files of {html.escape(web.session['user'])}</h1><ul>{items}</ul>"
            f'<form method="post" action="{web.url("/upload")}" enctype="multipart/form-data">'
            f'<input type="hidden" name="csrf" value="{csrf}">'
            f'<input type="file" name="upload"> <button>Upload</button></form>'
            f'<form method="post" action="{web.url("/logout")}">'
            f'<input type="hidden" name="csrf" value="{csrf}"><button>Log out</button></form>')

    @web.expose
    def login(self, user: str = "", password: str = "") -> str:
        if web.request.method == "POST":
            known = users()
            if user in known and secrets.compare_digest(known[user], password):
                web.session.regenerate()  # a new id on login: no session fixation
                web.session["user"] = user
                raise web.HTTPRedirect(web.url("/"))
            web.response.status = 403
            message = "<p class='error'>Wrong user name or password.</p>"
        else:
            message = ""
        return page(f"<h1>Log in</h1>{message}<form method='post'>"
                    "<input name='user' placeholder='user'> "
                    "<input name='password' type='password' placeholder='password'> "
                    "<button>Log in</button></form>")

    login._cp_config = {"tools.files_login.on": False}

    def _check_csrf(self, csrf: str) -> None:
        if not csrf or csrf != web.session.get("csrf"):
            raise web.HTTPError(403, "The form is stale: reload the page and try again.")

    @web.expose
    @web.tools.allow(methods=["POST"])
    def logout(self, csrf: str = "") -> None:
        self._check_csrf(csrf)
        web.session.delete()
        raise web.HTTPRedirect(web.url("/login"))

    @web.expose
    @web.tools.allow(methods=["POST"])
    def upload(self, upload: web.UploadedFile | None = None, csrf: str = "") -> None:
        self._check_csrf(csrf)
        if not isinstance(upload, web.UploadedFile) or not upload.filename:
            raise web.HTTPError(400, "Choose a file to upload.")
        upload.save_as(unique_path(files_dir(), safe_name(upload.filename)))
        raise web.HTTPRedirect(web.url("/"))

    @web.expose
    def download(self, name: str) -> object:
        if safe_name(name) != name:
            raise web.NotFound()
        return web.serve_download(os.path.join(files_dir(), name))


def make_config() -> dict:
    session: dict[str, object] = {"tools.sessions.on": True, "tools.sessions.timeout": 30}
    if os.environ.get("FILES_SESSION_REDIS"):
        session.update({"tools.sessions.storage_type": "redis",
                        "tools.sessions.url": os.environ["FILES_SESSION_REDIS"]})
    else:
        session_dir = os.environ.get("FILES_SESSION_DIR") or os.path.join(
            tempfile.gettempdir(), "hostsvc-files-sessions")
        os.makedirs(session_dir, exist_ok=True)
        session.update({"tools.sessions.storage_type": "file",
                        "tools.sessions.storage_path": session_dir})
    max_bytes = int(os.environ.get("FILES_MAX_BYTES", str(5 * 1024 * 1024)))
    return {
        "/": dict(session, **{"request.max_body_size": max_bytes}),
        "/static": {"tools.staticdir.on": True, "tools.staticdir.dir": os.path.join(HERE, "static"),
                    "tools.files_login.on": False,
                    "tools.expires.on": True, "tools.expires.secs": 86400},
    }


def make_app() -> web.Application:
    return web.Application(Root(), config=make_config())


application = make_app()
