"""hostsvc.config: YAML with lines, ${VAR} expansion, schema, defaults, file:line:key errors;
plus `hostsvc check` end to end (it imports the apps in throwaway processes)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from hostsvc import cli, config
from hostsvc.config import ConfigError, load
from hostsvc.proxy import render

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "hostsvc.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def errors_of(path: Path, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, **kw)
    return info.value.errors


def test_two_line_entries_get_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - name: hello
            root: hello:Root
          - prefix: /api/v1
            wsgi: api:app
    """)
    cfg = load(path)
    hello, api = cfg.apps
    assert (hello.name, hello.prefix, hello.kind, hello.target) == ("hello", "/hello", "root",
                                                                    "hello:Root")
    assert (api.name, api.prefix, api.kind) == ("api-v1", "/api/v1", "wsgi")
    assert (hello.workers, hello.threads, hello.timeout, hello.max_requests) == (2, 1, 30, 0)
    assert cfg.listen == ["127.0.0.1:8080"] and cfg.access_log == "json"
    assert cfg.runtime_dir == str(Path("run").resolve())


def test_error_names_file_line_key_and_expectation(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - name: hello
            root: hello:Root
          - name: other
            root: other:Root
            workers: two
    """)
    assert errors_of(path) == [
        f"{path}:6: apps[1].workers: expected a positive integer, got 'two'"]


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, """
        listen: nowhere:99999
        acces_log: json
        apps:
          - name: a
            prefix: a
            root: a:Root
          - name: a
            root: b
            threads: 0
            colour: blue
          - name: c
            root: c:Root
            wsgi: c:app
    """)
    errors = errors_of(path)
    joined = "\n".join(errors)
    assert f"{path}:1: listen: expected host:port" in joined
    assert f"{path}:2: acces_log: unknown key; expected one of:" in joined
    assert f"{path}:5: apps[0].prefix: expected a URL path starting with '/'" in joined
    assert f"{path}:8: apps[1].root: expected 'package.module:attribute', got 'b'" in joined
    assert f"{path}:9: apps[1].threads: expected a positive integer, got 0" in joined
    assert f"{path}:10: apps[1].colour: unknown key" in joined
    assert f"{path}:11: apps[2]: expected exactly one of root:" in joined
    assert f"{path}:7: apps[1].name: duplicate app name 'a' (also apps[0])" in joined


def test_duplicate_prefixes_and_yaml_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - name: one
            prefix: /shop/
            root: a:Root
          - name: two
            prefix: /shop
            root: b:Root
    """)
    assert errors_of(path) == [f"{path}:5: apps[1].prefix: duplicate prefix '/shop' "
                               "(also apps[0])"]
    path = write(tmp_path, """
        apps:
          - name: one
            root: a:Root
            name: two
    """)
    [error] = errors_of(path)
    assert error.startswith(f"{path}:4: invalid YAML: duplicate key 'name' (first on line 2)")


def test_same_prefix_on_different_hosts_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - {name: a, prefix: /, hosts: [a.example], root: a:Root}
          - {name: b, prefix: /, hosts: [b.example], root: b:Root}
    """)
    assert [a.hosts for a in load(path).apps] == [["a.example"], ["b.example"]]


def test_env_expansion_keeps_types_and_reports_unset(tmp_path: Path) -> None:
    path = write(tmp_path, """
        listen: ${PORT:-9000}
        apps:
          - name: hello
            root: hello:Root
            workers: ${WORKERS}
            env: {PRICE: "$$5", WHO: "${WHO:-nobody}"}
    """)
    cfg = load(path, environ={"WORKERS": "3"})
    assert cfg.listen == ["9000"]
    assert cfg.apps[0].workers == 3
    assert cfg.apps[0].env == {"PRICE": "$5", "WHO": "nobody"}
    assert errors_of(path, environ={}) == [
        f"{path}:5: ${{WORKERS}} is not set and has no default (write ${{WORKERS:-value}})"]


def test_paths_resolve_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "site" / "public").mkdir(parents=True)
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", """
        python_path: [../site]
        apps:
          - name: hello
            root: hello:Root
            python_path: [extra]
        static:
          - prefix: /files
            path: ../site/public
          - prefix: /missing
            path: ../nope
    """)
    errors = errors_of(path)
    assert errors == [f"{path}:10: static[1].path: expected an existing directory, got "
                      f"'../nope' ({tmp_path / 'nope'})"]
    path.write_text(path.read_text().replace("  - prefix: /missing\n    path: ../nope\n", ""))
    cfg = load(path)
    assert cfg.apps[0].python_path == [str(tmp_path / "conf" / "extra"), str(tmp_path / "site")]
    assert cfg.static[0].path == str(tmp_path / "site" / "public")


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "apps:\n  - name: a\n    root: [unclosed\n")
    [error] = errors_of(path)
    assert error.startswith(f"{path}:") and "invalid YAML" in error


def test_rendered_nginx_config_routes_and_forwards(tmp_path: Path) -> None:
    path = write(tmp_path, """
        listen: 127.0.0.1:8123
        access_log: text
        apps:
          - {name: a, prefix: /, root: a:Root}
          - {name: deep, prefix: /a/b, wsgi: d:app, threads: 4, client_max_body_size: 10m}
    """)
    cfg = load(path)
    text = render(cfg, {"a": "/r/a.1.sock", "deep": "/r/deep.3.sock"}, "/r")
    assert "server unix:/r/deep.3.sock fail_timeout=0;\n        keepalive 16;" in text
    assert text.index("location /a/b/ {") < text.index("location / {")   # longest first
    assert "location = /a/b {\n            return 301 /a/b/$is_args$args;" in text
    assert 'proxy_set_header X-Request-Start "t=${msec}";' in text
    assert "client_max_body_size 10m;" in text
    assert "error_page 502 =503 @hostsvc_unavailable;" in text
    assert "pid /r/nginx.pid;" in text and "temp_path /r/nginx/" in text
    assert "access_log /dev/stdout combined;" in text
    assert "return 444" not in text


def test_hosts_add_a_444_default_server(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - {name: a, hosts: [a.example], root: a:Root}
          - {name: b, root: b:Root}
    """)
    text = render(load(path), {"a": "/r/a.sock", "b": "/r/b.sock"}, "/r")
    assert "server_name a.example;" in text
    assert "server_name _;\n        set $hostsvc_app -;\n        return 444;" in text


def test_check_command_reports_import_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "good.py").write_text("def app(environ, start_response):\n    return []\n")
    (tmp_path / "bad.py").write_text("import os\nraise RuntimeError('no database')\n")
    path = write(tmp_path, """
        python_path: [.]
        apps:
          - name: good
            wsgi: good:app
          - name: bad
            wsgi: bad:app
          - name: missing
            root: nosuchmodule:Root
          - name: noattr
            wsgi: good:nothing
    """)
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:6: apps[1].wsgi: importing 'bad' failed: RuntimeError: no database " \
           f"(at {tmp_path / 'bad.py'}:2)" in err
    assert f"{path}:8: apps[2].root: cannot import 'nosuchmodule': no module named " \
           f"'nosuchmodule'" in err
    assert f"{path}:10: apps[3].wsgi: module 'good'" in err and "has no attribute 'nothing'" in err
    assert "apps[0]" not in err and "3 error(s)" in err


def test_check_command_accepts_the_default_config(capsys) -> None:
    path = REPO / "config" / "hostsvc.yaml"
    assert cli.main(["check", str(path)]) == 0
    n_apps = len(yaml.safe_load(path.read_text())["apps"])
    assert f"ok ({n_apps} apps, 1 static mounts" in capsys.readouterr().out


def test_help_explains_every_command(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("run [CONFIG]", "check CONFIG", "reload [CONFIG]", "status", "examples:"):
        assert word in out


def test_run_refuses_an_invalid_config_before_starting_anything(tmp_path: Path,
                                                                capsys) -> None:
    path = write(tmp_path, """
        apps:
          - name: hello
            root: hello:Root
            workers: 0
    """)
    assert cli.main(["run", str(path), "--runtime-dir", str(tmp_path / "run")]) == 2
    assert f"{path}:4: apps[0].workers: expected a positive integer, got 0" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_status_without_a_supervisor_says_so(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HOSTSVC_RUNTIME_DIR", str(tmp_path / "nowhere"))
    assert cli.main(["status"]) == 1
    assert f"no state.json in {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert cli.main(["reload"]) == 1
    assert f"no supervisor running in {tmp_path / 'nowhere'}" in capsys.readouterr().err


@pytest.mark.parametrize("access_log", ["json", "text", "off"])
def test_every_rendered_variant_passes_nginx_t(tmp_path: Path, access_log: str) -> None:
    from hostsvc.proxy import Nginx, NginxError

    (tmp_path / "public").mkdir()
    path = write(tmp_path, f"""
        listen: [127.0.0.1:8123, 8124]
        access_log: {access_log}
        apps:
          - {{name: a, prefix: /, hosts: [a.example], root: a:Root, threads: 3}}
          - {{name: b, prefix: /b/c, wsgi: b:app, client_max_body_size: 0}}
        static:
          - {{prefix: /files, path: public, expires: 7d}}
    """)
    cfg = load(path)
    runtime = tmp_path / "run"
    nginx = Nginx(str(runtime))
    nginx.write_config(render(cfg, {"a": f"{runtime}/a.sock", "b": f"{runtime}/b.sock"},
                              str(runtime)))          # raises NginxError if nginx -t fails
    assert (runtime / "nginx.conf").read_text().count("server {") == 2
    with pytest.raises(NginxError, match="nginx -t rejected"):
        nginx.write_config("events {}\nhttp { bogus_directive on; }\n")
    assert "bogus" not in (runtime / "nginx.conf").read_text()   # the good one stays


def test_check_defaults_to_hostsvc_config_env(tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apps:\n  - name: x\n    workers: two\n    wsgi: a:b\n")
    monkeypatch.setenv("HOSTSVC_CONFIG", str(bad))
    assert cli.main(["check", "--no-import"]) != 0
    assert f"{bad}:3: apps[0].workers" in capsys.readouterr().err


def test_check_survives_an_app_that_exits_the_checking_process(tmp_path: Path, capsys) -> None:
    """Apps sharing env and python_path are imported in one process; one that ends that
    process at import is checked again alone, and the others are still judged."""
    (tmp_path / "good.py").write_text("def app(environ, start_response):\n    return []\n")
    (tmp_path / "quitter.py").write_text("import os\nos._exit(0)\n")
    path = write(tmp_path, """
        python_path: [.]
        apps:
          - name: quitter
            wsgi: quitter:app
          - name: good
            wsgi: good:app
          - name: missing
            root: nosuchmodule:Root
    """)
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:4: apps[0].wsgi: importing quitter:app ended the process (exit status 0)" \
        in err
    assert f"{path}:8: apps[2].root: cannot import 'nosuchmodule'" in err
    assert "apps[1]" not in err and "2 error(s)" in err


def test_values_nginx_or_gunicorn_would_misread_are_config_errors(tmp_path: Path) -> None:
    """Review findings: each of these passed `check`, then broke nginx -t, listened on
    port 80, crashed a reload (.inf), or let a client header into a redirect ($)."""
    (tmp_path / "my dir").mkdir()
    path = write(tmp_path, """
        listen: []
        grace_period: .inf
        apps:
          - name: a
            prefix: /a$http_x
            wsgi: x:app
            timeout: .inf
          - name: b
            prefix: /x/../y
            wsgi: x:app
        static:
          - prefix: /s
            path: "my dir"
    """)
    errors = "\n".join(errors_of(path))
    assert f"{path}:1: listen: expected host:port or a non-empty list" in errors
    assert f"{path}:2: grace_period: expected a positive number of seconds, got inf" in errors
    assert f"{path}:5: apps[0].prefix: expected a URL path" in errors
    assert f"{path}:7: apps[0].timeout: expected a positive number of seconds, got inf" in errors
    assert f"{path}:9: apps[1].prefix: expected a URL path" in errors
    assert f"{path}:13: static[0].path: expected a directory path without spaces" in errors
    dup = write(tmp_path, "listen: [127.0.0.1:8181, 127.0.0.1:8181]\n", "dup.yaml")
    assert any("non-empty list of distinct" in e for e in errors_of(dup))


def test_static_mounts_refuse_symlinks_and_dotfiles_in_nginx(tmp_path: Path) -> None:
    (tmp_path / "pub").mkdir()
    cfg = load(write(tmp_path, """
        apps: [{name: a, wsgi: x:app}]
        static: [{prefix: /s, path: pub}]
    """))
    text = render(cfg, {"a": "/tmp/a.sock"}, str(tmp_path / "run"))
    assert f"disable_symlinks on from={tmp_path / 'pub'};" in text
    assert "location ~ /\\. { return 404; }" in text


def test_wildcard_hosts_and_hostless_mounts_in_every_server_block(tmp_path: Path) -> None:
    """Review findings: nginx sends a.example.com to its exact server block, which lacked
    the *.example.com app; and a host-less app beside a host app with the same prefix
    passed check, then failed nginx -t with a duplicate location."""
    cfg = load(write(tmp_path, """
        apps:
          - {name: wild, prefix: /a, wsgi: x:app, hosts: ["*.example.com"]}
          - {name: exact, prefix: /b, wsgi: x:app, hosts: [a.example.com]}
    """))
    text = render(cfg, {"wild": "/tmp/w.sock", "exact": "/tmp/e.sock"}, str(tmp_path / "run"))
    exact_block = text.split("server_name a.example.com;", 1)[1].split("server_name", 1)[0]
    assert "location /a/" in exact_block and "location /b/" in exact_block
    errors = errors_of(write(tmp_path, """
        apps:
          - {name: a, prefix: /x, wsgi: x:app, hosts: [a.example.com]}
          - {name: b, prefix: /x, wsgi: x:app}
          - {name: c, prefix: /y, wsgi: x:app, hosts: ["*.example.com"]}
          - {name: d, prefix: /y, wsgi: x:app, hosts: [b.example.com]}
    """, "dup.yaml"))
    joined = "\n".join(errors)
    assert "apps[1].prefix: duplicate prefix '/x' for host 'a.example.com' (also apps[0])" \
        in joined
    assert "apps[3].prefix: duplicate prefix '/y' for host 'b.example.com' (also apps[2])" \
        in joined


def test_engine_is_one_key_per_app_or_a_default_for_all(tmp_path: Path) -> None:
    path = write(tmp_path, """
        engine: granian
        apps:
          - {name: a, wsgi: a:app, threads: 4, worker_lifetime: 3600, graceful_timeout: 2}
          - {name: b, wsgi: b:app, engine: gunicorn, max_requests: 100, keepalive: 5}
          - {name: c, wsgi: c:app}
    """)
    a, b, c = load(path).apps
    assert (a.engine, a.threads, a.worker_lifetime) == ("granian", 4, 3600)
    assert (b.engine, b.max_requests, b.keepalive) == ("gunicorn", 100, 5)
    assert c.engine == "granian"
    assert load(write(tmp_path, "apps: [{name: d, wsgi: d:app}]", "d.yaml")).apps[0].engine \
        == "gunicorn"


def test_a_setting_the_engine_lacks_is_an_error_that_says_what_to_use(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - name: fast
            wsgi: a:app
            engine: granian
            keepalive: 5
            max_requests: 1000
          - name: classic
            wsgi: b:app
            worker_lifetime: 3600
          - name: odd
            wsgi: c:app
            engine: uwsgi
          - name: young
            wsgi: d:app
            engine: granian
            worker_lifetime: 30
    """)
    assert errors_of(path) == [
        f"{path}:5: apps[0].keepalive: not supported by engine granian (only by gunicorn): "
        "nginx closes idle connections to granian itself, before granian's own 30 s limit; "
        "remove keepalive",
        f"{path}:6: apps[0].max_requests: not supported by engine granian (only by gunicorn): "
        "granian cannot count requests per worker; use worker_lifetime: SECONDS (>= 60) to "
        "respawn workers",
        f"{path}:9: apps[1].worker_lifetime: not supported by engine gunicorn (only by "
        "granian): gunicorn respawns workers by request count; use max_requests: N instead",
        f"{path}:12: apps[2].engine: expected one of gunicorn, granian, got 'uwsgi'",
        f"{path}:16: apps[3].worker_lifetime: expected a whole number of seconds >= 60 "
        "(0: never), got 30",
    ]


def test_nginx_keeps_connections_to_pools_that_can_reuse_them(tmp_path: Path) -> None:
    """gunicorn's sync worker closes every connection; gthread and granian keep them."""
    path = write(tmp_path, """
        apps:
          - {name: sync, wsgi: a:app}
          - {name: gthread, wsgi: b:app, threads: 2}
          - {name: fast, wsgi: c:app, engine: granian}
    """)
    text = render(load(path), {n: f"/r/{n}.sock" for n in ("sync", "gthread", "fast")}, "/r")
    for name, keep in (("sync", False), ("gthread", True), ("fast", True)):
        upstream = text[text.index(f"upstream app_{name} {{"):]
        upstream = upstream[:upstream.index("}")]
        assert ("keepalive 16;" in upstream) is keep, name
        location = text[text.index(f"set $hostsvc_app {name};"):]
        location = location[:location.index("error_page")]
        assert ('proxy_set_header Connection "";' in location) is keep, name
        assert ("proxy_set_header Connection close;" in location) is not keep, name


def test_merge_keys_share_settings_and_explicit_keys_win(tmp_path: Path) -> None:
    """`<<: *anchor` (YAML 1.1 merge keys): merged keys are defaults; the mapping's own
    keys override them, and in `<<: [*a, *b]` the earlier mapping wins."""
    path = write(tmp_path, """
        apps:
          - &base
            name: base
            wsgi: shop.wsgi:app
            workers: 4
            env: &env {MODE: prod, LEVEL: info}
          - &small {name: small, wsgi: small:app, workers: 1, threads: 2}
          - <<: *base
            name: other
            workers: 8
            env: {<<: *env, LEVEL: debug}
          - <<: [*small, *base]
            name: both
    """)
    base, small, other, both = load(path).apps
    assert (base.workers, base.env) == (4, {"MODE": "prod", "LEVEL": "info"})
    assert (other.target, other.prefix, other.workers) == ("shop.wsgi:app", "/other", 8)
    assert other.env == {"MODE": "prod", "LEVEL": "debug"}
    assert (both.target, both.workers, both.threads, both.env) == (
        "small:app", 1, 2, {"MODE": "prod", "LEVEL": "info"})
    assert small.name == "small"


def test_merge_keys_keep_duplicate_key_errors_and_useful_lines(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - <<: {wsgi: a:app}
            name: one
            name: two
    """)
    [error] = errors_of(path)
    assert error.startswith(f"{path}:4: invalid YAML: duplicate key 'name' (first on line 3)")
    path = write(tmp_path, """
        apps:
          - &base
            wsgi: a:app
            workers: two
            colour: blue
            name: a
          - <<: *base
            name: b
    """)
    # Errors in merged keys name the line where the key is written, under each app.
    assert errors_of(path) == [
        f"{path}:5: apps[0].colour: unknown key; expected one of: " + ", ".join(sorted(
            config.APP_KEYS)),
        f"{path}:4: apps[0].workers: expected a positive integer, got 'two'",
        f"{path}:5: apps[1].colour: unknown key; expected one of: " + ", ".join(sorted(
            config.APP_KEYS)),
        f"{path}:4: apps[1].workers: expected a positive integer, got 'two'",
    ]
    path = write(tmp_path, "apps:\n  - <<: [plain]\n    name: a\n    wsgi: a:app\n")
    [error] = errors_of(path)
    assert error.startswith(f"{path}:2: invalid YAML: expected a mapping or a list of "
                            "mappings to merge")


def test_comments_are_not_expanded_but_hashes_in_values_are(tmp_path: Path) -> None:
    """A comment starts at a `#` after whitespace, outside quotes and block scalars, as
    YAML has it: `${VAR}` there is left alone; in the value it is still expanded."""
    path = write(tmp_path, """
        # full line ${NOPE}
        apps:
          - name: hello   # set ${NOPE} to change
            wsgi: a:app
            workers: ${WORKERS:-2}  # set ${NOPE} to change
            env:
              URL: "http://x/#${FRAG}"  # ${NOPE}
              QUOTE: 'it''s #${FRAG}'   # ${NOPE}
              PLAIN: http://x/#${FRAG}
              APOSTROPHE: it's # ${NOPE}
              MULTI: "one
                # ${FRAG}"
              BLOCK: |
                # ${FRAG}
    """)
    [app] = load(path, environ={"FRAG": "top"}).apps
    assert app.workers == 2
    assert app.env == {"URL": "http://x/#top", "QUOTE": "it's #top", "PLAIN": "http://x/#top",
                       "APOSTROPHE": "it's", "MULTI": "one # top", "BLOCK": "# top\n"}
    assert errors_of(path, environ={}) == [
        f"{path}:{line}: ${{FRAG}} is not set and has no default (write ${{FRAG:-value}})"
        for line in (7, 8, 9, 12, 14)]


def test_env_names_are_checked_at_their_own_line(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - name: a
            wsgi: a:app
            env:
              GOOD_1: x
              BAD-NAME: x
              "A=B": y
              1ST: z
              LIST: [1]
    """)
    expected = "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
    assert errors_of(path) == [
        f"{path}:6: apps[0].env.BAD-NAME: expected {expected}, got 'BAD-NAME'",
        f"{path}:7: apps[0].env.A=B: expected {expected}, got 'A=B'",
        f"{path}:8: apps[0].env.1ST: expected {expected}, got '1ST'",
        f"{path}:9: apps[0].env.LIST: expected a scalar value, got [1]",
    ]
    path = write(tmp_path, "apps: [{name: a, wsgi: a:app, env: [A]}]\n")
    assert errors_of(path) == [
        f"{path}:1: apps[0].env: expected a mapping of NAME: value (scalars), got ['A']"]


def test_workers_and_threads_have_upper_bounds(tmp_path: Path) -> None:
    path = write(tmp_path, """
        apps:
          - {name: a, wsgi: a:app, workers: 64, threads: 256}
          - {name: b, wsgi: b:app, workers: 100000,
             threads: 257}
    """)
    assert errors_of(path) == [
        f"{path}:3: apps[1].workers: expected at most 64 worker processes per app, got 100000",
        f"{path}:4: apps[1].threads: expected at most 256 threads per worker, got 257",
    ]
    path.write_text(path.read_text().replace("100000", "2").replace("257", "8"))
    assert [(a.workers, a.threads) for a in load(path).apps] == [(64, 256), (2, 8)]
