"""``pimcore serve --web [--demo]``: the demo chat page on the HTTP listener.

The page itself is driven in Chromium by clients/js/test/browser.test.mjs
(run from tests/test_js_client.py); here: the CLI's rules, the routes, the
demo-only token and group endpoints, and that the shipped copy of the
JavaScript client is the one clients/js tests.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import trio

from pimcore.client import open_client

from _proc import ProcGroup, procs, run_pimcore  # noqa: F401  (procs is a fixture)

ROOT = Path(__file__).resolve().parent.parent
WS = "ws://127.0.0.1:0/"
HTTP = "tcp://127.0.0.1:0"


def _request(base: str, method: str, path: str, body: Optional[Any] = None,
             headers: Optional[dict[str, str]] = None) -> tuple[int, str, bytes]:
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"content-type": "application/json"} if data else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers={k: v for k, v in hdrs.items() if v is not None})
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read()
    finally:
        conn.close()


def test_static_client_is_the_tested_one() -> None:
    shipped = ROOT / "pimcore" / "web" / "static" / "client"
    src = ROOT / "clients" / "js" / "src"
    names = sorted(p.name for p in shipped.iterdir())
    assert names == ["client.js", "codec.js", "deflate-core.js", "index.js", "order.js"]
    for name in names:
        assert (shipped / name).read_bytes() == (src / name).read_bytes(), (
            f"pimcore/web/static/client/{name} differs from clients/js/src/{name}: run `npm run sync-web` in clients/js")
    pako = ROOT / "clients" / "js" / "node_modules" / "pako"
    if pako.is_dir():  # after npm ci: the vendored browser build is the locked version's
        vendor = ROOT / "pimcore" / "web" / "static" / "vendor"
        assert (vendor / "pako.min.js").read_bytes() == (pako / "dist" / "pako.min.js").read_bytes(), "npm run sync-web"
        assert (vendor / "pako-LICENSE.txt").read_bytes() == (pako / "LICENSE").read_bytes()


def test_web_flags_need_their_listeners(tmp_path: Path) -> None:
    r = run_pimcore("serve", "--data-dir", tmp_path, "--listen", WS, "--web")
    assert r.returncode == 2 and "--web needs an HTTP listener" in r.stderr
    r = run_pimcore("serve", "--data-dir", tmp_path, "--listen", "tcp://127.0.0.1:0", "--http", HTTP, "--web")
    assert r.returncode == 2 and "--web needs a WebSocket listener" in r.stderr
    r = run_pimcore("serve", "--data-dir", tmp_path, "--listen", WS, "--http", HTTP, "--demo")
    assert r.returncode == 2 and "--demo needs --web" in r.stderr


def test_web_without_demo_serves_the_page_and_refuses_tokens(tmp_path: Path, procs: ProcGroup) -> None:
    server = procs.serve("--data-dir", tmp_path, "--listen", WS, "--http", HTTP, "--web")
    base = server.url("http")
    status, ctype, body = _request(base, "GET", "/web/")
    assert status == 200 and ctype.startswith("text/html") and b"pimcore" in body and b"/web/app.js" in body
    for path, kind in (("/web/app.js", "text/javascript"), ("/web/style.css", "text/css"),
                       ("/web/client/client.js", "text/javascript"), ("/web/vendor/pako.min.js", "text/javascript")):
        status, ctype, _ = _request(base, "GET", path)
        assert (status, ctype.split(";")[0]) == (200, kind), path
    status, _, body = _request(base, "GET", "/web/config.json")
    assert status == 200 and json.loads(body) == {"ws": [server.url("ws")], "demo": False}
    status, _, body = _request(base, "POST", "/web/token", {"user": "alice"})
    assert status == 403 and b"--demo" in body
    status, _, _ = _request(base, "POST", "/web/group", {"name": "g", "members": ["alice"]})
    assert status == 403
    for bad in ("/web/..%2F__init__.py", "/web/.hidden", "/web/client/..%2F..%2Fcli.py", "/web/nope.js", "/web/client"):
        status, _, _ = _request(base, "GET", bad)
        assert status == 404, bad
    # the API key still guards the server API
    status, _, _ = _request(base, "GET", "/v1/info")
    assert status == 401


def _allow(base: str, method: str, path: str) -> tuple[int, Optional[str], str]:
    """``method path`` answered: its status, ``Allow`` header and error code."""
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        body = r.read()
        code = json.loads(body)["error"]["code"] if r.getheader("content-type") == "application/json" and body else ""
        return r.status, r.getheader("allow"), code
    finally:
        conn.close()


def test_the_demo_endpoints_allow_post_only(tmp_path: Path, procs: ProcGroup) -> None:
    # PUT /web/token said "Allow: GET, POST" (GET /web/{file} matched too,
    # and a GET then said POST only): the literal path's routes decide.
    server = procs.serve("--data-dir", tmp_path, "--listen", WS, "--http", HTTP, "--web")
    base = server.url("http")
    for path in ("/web/token", "/web/group"):
        for method in ("GET", "HEAD", "PUT", "DELETE", "PATCH"):
            code = "" if method == "HEAD" else "METHOD_NOT_ALLOWED"  # (a HEAD answer has no body)
            assert _allow(base, method, path) == (405, "POST", code), (method, path)
    # the files keep theirs: GET (and HEAD) of GET /web/{file}
    assert _allow(base, "GET", "/web/app.js")[0] == 200
    assert _allow(base, "HEAD", "/web/app.js")[0] == 200
    for path in ("/web/app.js", "/web/config.json", "/web/client/client.js", "/web/"):
        assert _allow(base, "PUT", path) == (405, "GET, HEAD", "METHOD_NOT_ALLOWED"), path


async def test_demo_mints_tokens_that_log_in_and_creates_groups(tmp_path: Path, procs: ProcGroup) -> None:
    server = procs.serve("--data-dir", tmp_path, "--listen", WS, "--http", HTTP, "--web", "--demo")
    assert any("mints tokens for ANY user" in line for line in server.out)
    base = server.url("http")
    status, _, body = await trio.to_thread.run_sync(_request, base, "GET", "/web/config.json")
    assert json.loads(body)["demo"] is True
    status, _, body = await trio.to_thread.run_sync(_request, base, "POST", "/web/token", {"user": "bad user"})
    # said once, as POST /v1/tokens says it (it was "invalid user id: cannot issue a token: user id ...")
    assert (status, json.loads(body)) == (400, {"error": {"code": "BAD_REQUEST", "message": (
        "cannot issue a token: user id 'bad user' has the character ' '"
        " (user ids are 1-64 ASCII characters from A-Z a-z 0-9 _ . @ -)")}})
    status, _, body = await trio.to_thread.run_sync(_request, base, "POST", "/web/token", {"user": "alice"})
    assert status == 200
    token = json.loads(body)["token"]
    status, _, body = await trio.to_thread.run_sync(_request, base, "POST", "/web/group", {"name": "team", "members": ["alice", "bob"]})
    assert (status, json.loads(body)) == (200, {"name": "team", "members": ["alice", "bob"]})
    status, _, body = await trio.to_thread.run_sync(_request, base, "POST", "/web/group", {"name": "team", "members": ["carol"]})
    # exists: carol is added, and the answer is the group's members now
    assert (status, json.loads(body)) == (200, {"name": "team", "members": ["alice", "bob", "carol"]})
    status, _, _ = await trio.to_thread.run_sync(_request, base, "POST", "/web/group", {"name": "team"})
    assert status == 400
    # A refusal says why, as POST /v1/groups does (it said "group 'bad name': BAD_REQUEST").
    for grp, needle in (({"name": "d:alice:bob", "members": ["alice"]}, "direct"),
                        ({"name": "g2", "members": ["bad user"]}, "bad user"),
                        ({"name": "g3", "members": []}, "at least one member")):
        status, _, body = await trio.to_thread.run_sync(_request, base, "POST", "/web/group", grp)
        message = json.loads(body)["error"]["message"]
        assert status == 400 and needle in message and "BAD_REQUEST" not in message, (grp, message)
    # As strict as the server API (a new-user pass: "ttl" was ignored, the
    # token still 1 hour; an extra field went unsaid; GET said "no such file").
    for path, body, needle in (("/web/token", {"user": "alice", "ttl": 99}, "unknown field 'ttl'"),
                               ("/web/group", {"name": "g4", "members": ["alice"], "x": 1}, "unknown field 'x'")):
        status, _, raw = await trio.to_thread.run_sync(_request, base, "POST", path, body)
        assert status == 400 and needle in json.loads(raw)["error"]["message"], (path, raw)
    for path in ("/web/token", "/web/group"):
        status, headers, raw = await trio.to_thread.run_sync(_request, base, "GET", path)
        assert status == 405 and json.loads(raw)["error"]["code"] == "METHOD_NOT_ALLOWED", (path, raw)
    with trio.fail_after(20):
        async with open_client(server.url("ws"), token, device="t") as c:
            sent = await c.send("team", b"hi")
            assert sent.seq == 2  # after carol's JOINED entry


async def test_demo_endpoints_refuse_other_hosts_origins_and_content_types(tmp_path: Path, procs: ProcGroup) -> None:
    # DNS rebinding (a name of the attacker's that resolves to 127.0.0.1: the
    # Host header names it) and cross-site form posts (another Origin, or a
    # text/plain body a page may send without a preflight) get no token.
    server = procs.serve("--data-dir", tmp_path, "--listen", WS, "--http", HTTP, "--web", "--demo")
    base = server.url("http")
    port = urlsplit(base).port
    own = f"http://127.0.0.1:{port}"

    async def post(path: str, body: Any, **headers: Optional[str]) -> tuple[int, bytes]:
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        status, _, data = await trio.to_thread.run_sync(_request, base, "POST", path, body, hdrs)
        return status, data

    user = {"user": "alice"}
    grp = {"name": "g1", "members": ["alice"]}
    for path, body in (("/web/token", user), ("/web/group", grp)):
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io:%d" % port, f"127.0.0.1:{port + 1}", ""):
            status, data = await post(path, body, Host=host)
            assert status == 403 and b"host" in data.lower(), (path, host, status, data)
        for origin in ("http://evil.example", f"http://evil.example:{port}", "null", f"http://127.0.0.1:{port + 1}",
                       f"https://127.0.0.1:{port}"):
            status, data = await post(path, body, Origin=origin)
            assert status == 403 and b"origin" in data.lower(), (path, origin, status, data)
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            status, data = await post(path, body, content_type=ctype)
            assert status == 415 and b"application/json" in data, (path, ctype, status, data)
    # the page's own requests: its Host, its Origin (or none), JSON
    for host, origin in ((f"127.0.0.1:{port}", own), (f"localhost:{port}", f"http://localhost:{port}"),
                         (f"127.0.0.1:{port}", None)):
        status, data = await post("/web/token", user, Host=host, Origin=origin)
        assert status == 200 and json.loads(data)["user"] == "alice", (host, origin, data)
    status, _ = await post("/web/group", grp, Origin=own, content_type="application/json; charset=utf-8")
    assert status == 200
