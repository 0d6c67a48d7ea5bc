"""The web demo: a chat page served on the broker's HTTP listener.

``pimcore serve --http URL --listen ws://... --web`` serves a static chat
page under ``/web/`` (files shipped in ``pimcore/web/static``; the JavaScript
client in ``static/client`` is a copy of ``clients/js/src``, checked equal by
tests/test_web.py; ``static/vendor`` holds pako's browser build for the
deflate streams, with its licence).  The page talks the binary protocol to the broker's
WebSocket listener with that client; the HTTP listener only hands out the
files and ``/web/config.json`` (the WebSocket URLs, and whether demo tokens
are on).

``--demo`` adds ``POST /web/token`` (``{"user": U}`` -> ``{"token": T}``, a
1-hour token for ANY user id, no password) and ``POST /web/group``
(``{"name": G, "members": [...]}``: create the group, or add the members).
Without ``--demo`` both answer 403 ``FORBIDDEN`` and the page asks for a
token (``pimcore token --user U``).  With it they answer only the page's own
requests: the ``Host`` header must name the HTTP listener's own address
(or ``localhost`` / ``127.0.0.1`` / ``[::1]`` with its port; any IP literal
with its port when it listens on 0.0.0.0 or ::), else 403 ``FORBIDDEN``
(a DNS-rebinding name resolving to the broker is refused); an ``Origin``
header, when sent, must be the page's own origin, else 403 ``FORBIDDEN``
(another site's form or fetch); and the body must be sent as
``Content-Type: application/json``, else 415 ``UNSUPPORTED_MEDIA_TYPE`` (a
cross-site form post cannot set it without a CORS preflight, which is never
answered).  The page says so visibly when tokens are
minted for anyone; never run ``--demo`` where strangers can reach it.
"""

from __future__ import annotations

import ipaddress
import re
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence
from urllib.parse import urlsplit

from ..ids import EMPTY_GROUP, _show
from ..http.api import _only, refusal_message
from ..http.server import HttpError, RawBody, Request, Router

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import Pimcore

__all__ = ["register_web", "STATIC"]

#: The shipped files (a Traversable inside the package).
STATIC = resources.files(__package__) / "static"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\Z")


def _static(parts: Sequence[str]) -> RawBody:
    # Only plain names of files that exist in the shipped tree: no "..", no
    # hidden files, no directories; the path never leaves STATIC.
    node = STATIC
    for part in parts:
        if not _NAME.match(part) or ".." in part:
            raise HttpError(404, "NOT_FOUND", "no such file")
        node = node / part
    suffix = "." + parts[-1].rsplit(".", 1)[-1] if "." in parts[-1] else ""
    if suffix not in _TYPES or not node.is_file():
        raise HttpError(404, "NOT_FOUND", "no such file")
    return RawBody(_TYPES[suffix], node.read_bytes())


_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_ANY = ("0.0.0.0", "[::]")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    except ValueError:
        return False
    return True


def _check_same_site(request: Request, http_url: str) -> None:
    """HttpError unless ``request`` comes from the page this listener
    serves (see the module docstring): Host, Origin, Content-Type."""
    own = urlsplit(http_url)
    own_host = own.netloc.rsplit(":", 1)[0].lower()
    default = 443 if own.scheme == "https" else 80
    host = request.headers.get("host", "").strip().lower()
    if host.startswith("["):  # [v6]:port
        end = host.find("]") + 1
        name, rest = host[:end], host[end:]
        port_s = rest[1:] if rest.startswith(":") else ("" if not rest else "?")
    else:
        name, _, port_s = host.partition(":")
    port_s = port_s or str(default)
    ok = port_s.isdigit() and int(port_s) == (own.port or default) and bool(name) and (
        name == own_host or name in _LOOPBACK or (own_host in _ANY and _is_ip(name)))
    if not ok:
        raise HttpError(403, "FORBIDDEN", f"the Host header {host!r} is not this listener's address"
                                          f" ({own.netloc}, or localhost with its port)")
    origin = request.headers.get("origin")
    if origin is not None and origin.strip().lower() != f"{own.scheme}://{host}":
        raise HttpError(403, "FORBIDDEN", f"the Origin {origin!r} is not this page's own ({own.scheme}://{host})")
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise HttpError(415, "UNSUPPORTED_MEDIA_TYPE", "send the body as Content-Type: application/json")


def register_web(router: Router, handle: "Pimcore", *, ws_urls: Sequence[str], demo: bool = False,
                 http_url: Optional[Callable[[], Optional[str]]] = None) -> None:
    """Route the demo under ``/web/`` on ``router`` (no API key needed).

    ``ws_urls``: the broker's ws:// / wss:// listener URLs (the page picks
    the first; a 0.0.0.0 or :: host is replaced by the page's own host).
    ``demo``: mint tokens for any user and create groups (see the module
    docstring).  ``http_url``: returns the HTTP listener's own URL
    (``http://HOST:PORT``, known once it listens); the demo endpoints
    accept only requests addressed to it (without it, only
    ``http://localhost`` / ``127.0.0.1`` on port 80)."""
    urls = list(ws_urls)

    async def index(request: Request) -> tuple[int, Any]:
        return 200, _static(["index.html"])

    async def file(request: Request) -> tuple[int, Any]:
        # (GET /web/token and /web/group do not come here: their literal
        # POST routes decide, 405 with Allow: POST)
        return 200, _static([request.params["file"]])

    async def client_file(request: Request) -> tuple[int, Any]:
        return 200, _static(["client", request.params["file"]])

    async def vendor_file(request: Request) -> tuple[int, Any]:
        return 200, _static(["vendor", request.params["file"]])

    async def config(request: Request) -> tuple[int, Any]:
        return 200, {"ws": urls, "demo": demo}

    def _need_demo(request: Request) -> None:
        if not demo:
            raise HttpError(403, "FORBIDDEN", "demo tokens are off: start the broker with `pimcore serve --web --demo`,"
                                              " or paste a token from `pimcore token --user USER`")
        _check_same_site(request, (http_url() if http_url else None) or "http://localhost")

    async def token(request: Request) -> tuple[int, Any]:
        _need_demo(request)
        body = request.json()
        if isinstance(body, dict):
            _only(body, ("user",), "this endpoint takes")  # (a "ttl" is not taken: demo tokens last 1 hour)
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str):
            raise HttpError(400, "BAD_REQUEST", 'the body must be {"user": "<user id>"}')
        try:
            return 200, {"token": handle.issue_token(user, ttl=3600), "user": user, "ttl": 3600}
        except ValueError as exc:
            raise HttpError(400, "BAD_REQUEST", str(exc)) from None  # names the id and what is wrong with it

    async def group(request: Request) -> tuple[int, Any]:
        _need_demo(request)
        from ..embed import RequestRefused

        body = request.json()
        if isinstance(body, dict):
            _only(body, ("name", "members"), "this endpoint takes")
        name = body.get("name") if isinstance(body, dict) else None
        members = body.get("members") if isinstance(body, dict) else None
        if not isinstance(name, str) or not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise HttpError(400, "BAD_REQUEST", 'the body must be {"name": "<group id>", "members": ["<user id>", ...]}')
        if not members:
            raise HttpError(400, "BAD_REQUEST", f"group {_show(name)}: {EMPTY_GROUP}")
        try:
            try:
                await handle.create_group(name, members)
            except RequestRefused as exc:  # it exists: add the members instead
                if exc.code.name != "ALREADY_EXISTS":
                    raise
                await handle.add_members(name, members)
            now = list(await handle.members(name))
        except RequestRefused as exc:
            # The reason in words, as POST /v1/groups gives it.
            raise HttpError(400, "BAD_REQUEST", refusal_message(exc.code, str(exc))) from None
        return 200, {"name": name, "members": now}

    router.add("GET", "/web", index, auth=False)
    router.add("GET", "/web/", index, auth=False)
    router.add("GET", "/web/config.json", config, auth=False)
    router.add("POST", "/web/token", token, auth=False)
    router.add("POST", "/web/group", group, auth=False)
    router.add("GET", "/web/client/{file}", client_file, auth=False)
    router.add("GET", "/web/vendor/{file}", vendor_file, auth=False)
    router.add("GET", "/web/{file}", file, auth=False)
