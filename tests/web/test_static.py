"""Static files: staticdir/staticfile tools, serve_file, conditional and range requests,
and every way we know of to ask for a file outside the static root."""
from __future__ import annotations

import http.client
import os
from email.utils import formatdate
from pathlib import Path

import pytest

from hostsvc import web
from hostsvc.web.testing import Client
from support.gunicorn_server import gunicorn

CSS = b"body { color: red }\n"
DATA = bytes(range(256)) * 4  # 1024 bytes


class Root:
    def __init__(self, files: Path) -> None:
        self.files = files

    @web.expose
    def index(self) -> str:
        return "root"

    @web.expose
    def report(self) -> object:
        return web.lib.static.serve_file(str(self.files / "report.csv"))

    @web.expose
    def download(self, name: str | None = None) -> object:
        return web.serve_download(str(self.files / "report.csv"), name)

    @web.expose
    def missing(self) -> object:
        return web.serve_file(str(self.files / "nope.txt"))

    @web.expose
    def relative(self) -> object:
        return web.serve_file("report.csv")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ (served) with files and links, and a secret beside it that must stay hidden."""
    root = tmp_path / "public"
    (root / "css").mkdir(parents=True)
    (root / "css" / "site.css").write_bytes(CSS)
    (root / "data.bin").write_bytes(DATA)
    (root / "empty.txt").write_bytes(b"")
    (root / "page.weird").write_text("custom")
    (root / "docs").mkdir()
    (root / "docs" / "index.html").write_text("<h1>docs</h1>")
    (root / "noindex").mkdir()
    (root / "noindex" / "a.txt").write_text("a")
    (tmp_path / "secret").write_text("TOP SECRET")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.txt").write_text("outside")
    os.symlink(tmp_path / "secret", root / "leak")
    os.symlink(tmp_path / "outside", root / "leakdir")
    os.symlink(root / "css" / "site.css", root / "alias.css")
    os.symlink(tmp_path / "secret", root / "docs" / "evil-index")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "report.csv").write_text("a,b\n1,2\n")
    return root


def make_client(root: Path, **extra: object) -> Client:
    section = {"tools.staticdir.on": True, "tools.staticdir.dir": str(root),
               "tools.staticdir.index": "index.html"}
    section.update({f"tools.staticdir.{k}": v for k, v in extra.items()})
    return Client(web.Application(Root(root.parent / "files"), "", {"/static": section}))


# -- serving ---------------------------------------------------------------------------
def test_serves_file_with_type_length_and_validators(tree: Path) -> None:
    r = make_client(tree).get("/static/css/site.css")
    assert r.code == 200
    assert r.body == CSS
    assert r.headers["Content-Type"] == "text/css"
    assert r.headers["Content-Length"] == str(len(CSS))
    assert r.headers["Accept-Ranges"] == "bytes"
    st = (tree / "css" / "site.css").stat()
    assert r.headers["Last-Modified"] == formatdate(st.st_mtime, usegmt=True)
    assert r.headers["ETag"].startswith('"') and r.headers["ETag"].endswith('"')


def test_body_is_an_open_file_for_the_servers_file_wrapper(tree: Path) -> None:
    wrapped = []

    def file_wrapper(fileobj, blocksize):
        wrapped.append(fileobj)
        return iter(lambda: fileobj.read(blocksize), b"")

    r = make_client(tree).get("/static/data.bin", environ={"wsgi.file_wrapper": file_wrapper})
    assert r.body == DATA
    assert len(wrapped) == 1 and hasattr(wrapped[0], "fileno")


def test_head_sends_headers_without_body(tree: Path) -> None:
    r = make_client(tree).head("/static/data.bin")
    assert r.code == 200 and r.body == b""
    assert r.headers["Content-Length"] == "1024"


def test_unknown_extension_is_octet_stream_and_overridable(tree: Path) -> None:
    assert make_client(tree).get("/static/page.weird").headers["Content-Type"] == \
        "application/octet-stream"
    c = make_client(tree, content_types={".WEIRD": "text/x-weird"})
    assert c.get("/static/page.weird").headers["Content-Type"] == "text/x-weird"
    c = make_client(tree, content_types={"css": "text/plain"})
    assert c.get("/static/css/site.css").headers["Content-Type"] == "text/plain"


def test_missing_file_falls_through_to_404(tree: Path) -> None:
    assert make_client(tree).get("/static/nothing.css").code == 404


def test_post_is_not_served(tree: Path) -> None:
    r = make_client(tree).post("/static/css/site.css")
    assert r.code == 404 and CSS not in r.body


def test_match_restricts_served_paths(tree: Path) -> None:
    c = make_client(tree, match=r"\.css$")
    assert c.get("/static/css/site.css").code == 200
    assert c.get("/static/data.bin").code == 404


def test_relative_dir_joins_root(tree: Path) -> None:
    app = web.Application(Root(tree.parent / "files"), "", {"/static": {
        "tools.staticdir.on": True, "tools.staticdir.root": str(tree.parent),
        "tools.staticdir.dir": tree.name}})
    assert Client(app).get("/static/css/site.css").body == CSS


def test_relative_dir_without_root_is_a_500_naming_the_setting(tree: Path) -> None:
    app = web.Application(Root(tree.parent / "files"), "", {"/static": {
        "tools.staticdir.on": True, "tools.staticdir.dir": "public",
        "request.show_tracebacks": True}})
    r = Client(app).get("/static/css/site.css")
    assert r.code == 500 and b"tools.staticdir.dir" in r.body


def test_staticdir_at_root_leaves_handlers_alone(tree: Path) -> None:
    app = web.Application(Root(tree.parent / "files"), "", {"/": {
        "tools.staticdir.on": True, "tools.staticdir.dir": str(tree)}})
    c = Client(app)
    assert c.get("/css/site.css").body == CSS
    assert c.get("/").text == "root"


def test_nested_section_prefix_is_stripped(tree: Path) -> None:
    """The dispatcher passes the declaring section even when it is nested."""
    app = web.Application(Root(tree.parent / "files"), "", {"/assets/v1": {
        "tools.staticdir.on": True, "tools.staticdir.dir": str(tree)}})
    assert Client(app).get("/assets/v1/css/site.css").body == CSS


# -- directories and index -----------------------------------------------------------
def test_index_file_served_for_slash_form(tree: Path) -> None:
    r = make_client(tree).get("/static/docs/")
    assert r.code == 200 and r.text == "<h1>docs</h1>"
    assert r.headers["Content-Type"] == "text/html"


def test_directory_with_index_redirects_to_slash_form(tree: Path) -> None:
    r = make_client(tree).get("/static/docs?x=1")
    assert r.code == 301
    assert r.headers["Location"] == "http://testserver/static/docs/?x=1"


def test_directory_without_index_is_404(tree: Path) -> None:
    assert make_client(tree).get("/static/noindex/").code == 404
    assert make_client(tree).get("/static/noindex").code == 404
    assert make_client(tree, index="").get("/static/docs/").code == 404


def test_index_symlinked_outside_the_root_is_not_served(tree: Path) -> None:
    r = make_client(tree, index="evil-index").get("/static/docs/")
    assert r.code == 404 and b"SECRET" not in r.body


# -- traversal -----------------------------------------------------------------------
@pytest.mark.parametrize("path", [
    "/static/../secret",
    "/static/%2e%2e/secret",
    "/static/%2E%2E/secret",
    "/static/..%2fsecret",
    "/static/..%2Fsecret",
    "/static/css/../../secret",
    "/static/css/%2e%2e%2f%2e%2e%2fsecret",
    "/static/..\\secret",
    "/static/..%5csecret",
    "/static/css%5c..%5c..%5csecret",
    "/static/secret%00.css",
    "/static/css/site.css%00",
])
def test_traversal_attempts_are_refused(tree: Path, path: str) -> None:
    r = make_client(tree).get(path)
    assert r.code == 403
    assert b"SECRET" not in r.body


def test_double_encoded_dots_are_just_a_missing_name(tree: Path) -> None:
    r = make_client(tree).get("/static/%252e%252e/secret")
    assert r.code == 404 and b"SECRET" not in r.body


@pytest.mark.parametrize("path", ["/static/leak", "/static/leakdir/x.txt"])
def test_symlinks_leaving_the_root_are_404(tree: Path, path: str) -> None:
    r = make_client(tree).get(path)
    assert r.code == 404
    assert b"SECRET" not in r.body and b"outside" not in r.body


def test_symlink_inside_the_root_is_served(tree: Path) -> None:
    assert make_client(tree).get("/static/alias.css").body == CSS


def test_root_itself_reached_through_a_symlink_works(tree: Path) -> None:
    link = tree.parent / "public-link"
    os.symlink(tree, link)
    assert make_client(link).get("/static/css/site.css").body == CSS
    assert make_client(link).get("/static/leak").code == 404


# -- conditional requests ------------------------------------------------------------
def test_if_none_match_gives_304_without_body_or_type(tree: Path) -> None:
    c = make_client(tree)
    etag = c.get("/static/css/site.css").headers["ETag"]
    for value in (etag, f'"zzz", {etag}', f"W/{etag}", "*"):
        r = c.get("/static/css/site.css", headers={"If-None-Match": value})
        assert r.code == 304, value
        assert r.body == b""
        assert r.headers["ETag"] == etag
        assert "Content-Type" not in r.headers and "Content-Length" not in r.headers


def test_if_none_match_mismatch_serves_and_wins_over_date(tree: Path) -> None:
    c = make_client(tree)
    lm = c.get("/static/css/site.css").headers["Last-Modified"]
    r = c.get("/static/css/site.css", headers={"If-None-Match": '"other"',
                                               "If-Modified-Since": lm})
    assert r.code == 200 and r.body == CSS


def test_if_modified_since(tree: Path) -> None:
    c = make_client(tree)
    lm = c.get("/static/css/site.css").headers["Last-Modified"]
    assert c.get("/static/css/site.css", headers={"If-Modified-Since": lm}).code == 304
    old = formatdate(0, usegmt=True)
    assert c.get("/static/css/site.css", headers={"If-Modified-Since": old}).code == 200
    bad = c.get("/static/css/site.css", headers={"If-Modified-Since": "yesterday-ish"})
    assert bad.code == 200 and bad.body == CSS


def test_changed_file_gets_new_etag(tree: Path) -> None:
    c = make_client(tree)
    etag = c.get("/static/css/site.css").headers["ETag"]
    (tree / "css" / "site.css").write_bytes(CSS + b"/* more */")
    os.utime(tree / "css" / "site.css", (1, 1))
    r = c.get("/static/css/site.css", headers={"If-None-Match": etag})
    assert r.code == 200 and r.headers["ETag"] != etag


# -- ranges --------------------------------------------------------------------------
@pytest.mark.parametrize("spec,start,end", [
    ("bytes=0-9", 0, 9),
    ("bytes=10-", 10, 1023),
    ("bytes=-5", 1019, 1023),
    ("bytes=1000-5000", 1000, 1023),
    ("bytes=-5000", 0, 1023),
    ("bytes=1023-1023", 1023, 1023),
    ("BYTES = 5 - 6", 5, 6),
    ("bytes=2000-3000, 4-7", 4, 7),
])
def test_single_range_is_206(tree: Path, spec: str, start: int, end: int) -> None:
    r = make_client(tree).get("/static/data.bin", headers={"Range": spec})
    assert r.code == 206
    assert r.body == DATA[start:end + 1]
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/1024"
    assert r.headers["Content-Length"] == str(end - start + 1)


def test_range_body_never_overruns_through_the_file_wrapper(tree: Path) -> None:
    def file_wrapper(fileobj, blocksize):
        assert not hasattr(fileobj, "fileno")  # so no sendfile to the end of the file
        return iter(lambda: fileobj.read(blocksize), b"")

    r = make_client(tree).get("/static/data.bin", headers={"Range": "bytes=100-199"},
                              environ={"wsgi.file_wrapper": file_wrapper})
    assert r.body == DATA[100:200]


@pytest.mark.parametrize("spec", ["bytes=1024-", "bytes=5000-6000", "bytes=-0",
                                  "bytes=2000-, 3000-4000"])
def test_unsatisfiable_range_is_416(tree: Path, spec: str) -> None:
    r = make_client(tree).get("/static/data.bin", headers={"Range": spec})
    assert r.code == 416
    assert r.headers["Content-Range"] == "bytes */1024"


def test_any_range_of_an_empty_file_is_416(tree: Path) -> None:
    r = make_client(tree).get("/static/empty.txt", headers={"Range": "bytes=-10"})
    assert r.code == 416 and r.headers["Content-Range"] == "bytes */0"


@pytest.mark.parametrize("spec", ["bytes=9-3", "bytes=abc", "bytes=-", "items=0-5",
                                  "bytes 0-5", "bytes=0-5;x", "bytes=١-٢"])
def test_malformed_range_is_ignored(tree: Path, spec: str) -> None:
    r = make_client(tree).get("/static/data.bin", headers={"Range": spec})
    assert r.code == 200 and r.body == DATA


def test_multiple_ranges_get_the_whole_file(tree: Path) -> None:
    r = make_client(tree).get("/static/data.bin", headers={"Range": "bytes=0-1,5-6"})
    assert r.code == 200 and r.body == DATA
    assert "Content-Range" not in r.headers


def test_if_range(tree: Path) -> None:
    c = make_client(tree)
    first = c.get("/static/data.bin")
    etag, lm = first.headers["ETag"], first.headers["Last-Modified"]
    for validator in (etag, lm):
        r = c.get("/static/data.bin", headers={"Range": "bytes=0-1", "If-Range": validator})
        assert r.code == 206 and r.body == DATA[:2]
    for stale in ('"old"', f"W/{etag}", formatdate(0, usegmt=True)):
        r = c.get("/static/data.bin", headers={"Range": "bytes=0-1", "If-Range": stale})
        assert r.code == 200 and r.body == DATA


def test_range_and_304_together_prefers_304(tree: Path) -> None:
    c = make_client(tree)
    etag = c.get("/static/data.bin").headers["ETag"]
    r = c.get("/static/data.bin", headers={"Range": "bytes=0-1", "If-None-Match": etag})
    assert r.code == 304


# -- staticfile ----------------------------------------------------------------------
def test_staticfile(tree: Path) -> None:
    app = web.Application(Root(tree.parent / "files"), "", {
        "/favicon.ico": {"tools.staticfile.on": True,
                         "tools.staticfile.filename": str(tree / "data.bin")},
        "/style": {"tools.staticfile.on": True, "tools.staticfile.root": str(tree),
                   "tools.staticfile.filename": "css/site.css",
                   "tools.staticfile.content_types": {"css": "text/x-test"}},
        "/gone": {"tools.staticfile.on": True,
                  "tools.staticfile.filename": str(tree / "gone.txt")},
    })
    c = Client(app)
    r = c.get("/favicon.ico")
    assert r.code == 200 and r.body == DATA
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert c.get("/favicon.ico", headers={"Range": "bytes=0-3"}).body == DATA[:4]
    style = c.get("/style")
    assert style.body == CSS and style.headers["Content-Type"] == "text/x-test"
    assert c.get("/gone").code == 404


# -- serve_file / serve_download -----------------------------------------------------
def test_serve_file_from_a_handler(tree: Path) -> None:
    c = make_client(tree)
    r = c.get("/report")
    assert r.code == 200 and r.text == "a,b\n1,2\n"
    assert r.headers["Content-Type"] == "text/csv"
    assert "Content-Disposition" not in r.headers
    assert c.get("/report", headers={"Range": "bytes=0-2"}).text == "a,b"
    assert c.get("/report", headers={"If-None-Match": r.headers["ETag"]}).code == 304


def test_serve_download_sets_attachment(tree: Path) -> None:
    c = make_client(tree)
    r = c.get("/download")
    assert r.headers["Content-Type"] == "application/x-download"
    assert r.headers["Content-Disposition"] == 'attachment; filename="report.csv"'
    r = c.get("/download?name=r%C3%A9sum%C3%A9%20%22q%22.csv")
    assert r.headers["Content-Disposition"] == (
        "attachment; filename=\"r_sum_ _q_.csv\"; "
        "filename*=UTF-8''r%C3%A9sum%C3%A9%20%22q%22.csv")


def test_serve_file_missing_is_404_and_relative_is_an_error(tree: Path) -> None:
    c = make_client(tree)
    assert c.get("/missing").code == 404
    assert c.get("/relative").code == 500


# -- under a real gunicorn -------------------------------------------------------------
def raw_get(port: int, path: str, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    """GET with the path sent exactly as written (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def test_under_gunicorn_files_ranges_and_traversal(tree: Path) -> None:
    big = tree / "big.bin"
    big.write_bytes(os.urandom(300_000))  # several file_wrapper blocks
    payload = big.read_bytes()
    env = {"HOSTSVC_TEST_STATIC_DIR": str(tree)}
    with gunicorn("sessions_static_app:application", Path(__file__).parent, env,
                  workers=1) as port:
        status, headers, body = raw_get(port, "/static/big.bin")
        assert status == 200 and body == payload
        assert headers["content-length"] == str(len(payload))
        status, headers, body = raw_get(port, "/static/big.bin",
                                        {"Range": "bytes=100000-200000"})
        assert status == 206 and body == payload[100000:200001]
        assert headers["content-range"] == f"bytes 100000-200000/{len(payload)}"
        status, _, body = raw_get(port, "/static/big.bin",
                                  {"If-None-Match": headers["etag"]})
        assert status == 304 and body == b""
        for path in ("/static/../secret", "/static/%2e%2e/secret", "/static/..%2fsecret",
                     "/static/%2e%2e%2fsecret", "/static/..%5csecret", "/static/leak",
                     "/static/secret%00", "/static/css/..%2f..%2fsecret"):
            status, _, body = raw_get(port, path)
            assert status == (404 if path == "/static/leak" else 403), path
            assert b"SECRET" not in body, path


def test_dotfiles_are_never_served(tree: Path) -> None:
    (tree / ".env").write_text("PASSWORD=x")
    (tree / ".git").mkdir()
    (tree / ".git" / "config").write_text("[core]")
    client = make_client(tree)
    for path in ("/static/.env", "/static/.git/config", "/static/css/../.env"):
        r = client.get(path)
        assert r.code in (403, 404) and b"PASSWORD" not in r.body and b"[core]" not in r.body
    assert client.get("/static/.env").code == 404
