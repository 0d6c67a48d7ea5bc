"""A small HTTP/1.1 server for the broker's operations and server API: h11 on trio.

Why h11 and not an ASGI server: the broker already runs on trio, h11 is the
sans-IO HTTP/1.1 state machine that trio's own ecosystem uses (and measured
2.5x faster than hypercorn here), and the server API is a handful of JSON
endpoints -- no framework needed.

Shape:

* :class:`Router` maps ``(method, path pattern)`` to ``async def
  handler(request) -> (status, body)``; ``body`` is JSON-able or a
  :class:`RawBody` (``/metrics`` is text).  Patterns name path segments
  ``/v1/groups/{group}/members`` -> ``request.params["group"]``.  Every route
  needs a bearer API key unless registered with ``auth=False``.
* Errors are JSON, ``{"error": {"code": "...", "message": "..."}}``, with a
  stable ``code`` (:data:`ERROR_CODES`); a handler raises :class:`HttpError`.
* Limits, so a slow or hostile client cannot hold the server:
  ``max_header_bytes`` (431), ``max_body_bytes`` (413, refused from
  Content-Length before reading the body, or from a chunk's size line
  before its data), ``request_timeout`` seconds to receive a whole
  request once its first byte came (408, then hang up),
  ``keepalive_timeout`` seconds of silence between requests (hang up), and
  ``request_timeout`` again to write a response (for a :class:`StreamBody`,
  server-sent events, to write each chunk).  ``max_connections``
  beyond which new connections get 503 and are closed -- but for the
  probes' reserve (:attr:`HttpServer.probe_paths`): PROBE_RESERVE
  connections more, each with PROBE_REQUEST_TIMEOUT for its one request,
  and one without a whole request yet gives its slot to a newer one.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import ssl
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Iterable, Optional, Union
from urllib.parse import parse_qs, parse_qsl, unquote, unquote_plus, urlsplit

import h11
import trio

from .._util import DuplicateKey, TooManyDigits, read_json
from ..ids import _show

__all__ = [
    "HttpConfig",
    "HttpError",
    "HttpServer",
    "RawBody",
    "StreamBody",
    "Request",
    "Router",
    "Handler",
    "ERROR_CODES",
    "check_api_key",
]

log = logging.getLogger("pimcore.http")

#: Every error code the listener itself produces, with its status.  Handlers
#: added later use these or add their own (documented in docs/HTTP.md).  One
#: spelling for every code of the HTTP API: upper case, the broker's
#: ErrorCode name where the concept is the same (BAD_REQUEST, AUTH_FAILED,
#: PAYLOAD_TOO_LARGE, INTERNAL), so the HTTP layer's 400 and the broker's are
#: one code.  (Before, the listener's own codes were lower case: bad_request,
#: unauthorized, not_found...)
ERROR_CODES: dict[str, int] = {
    "BAD_REQUEST": 400,  # not HTTP/1.1 we can parse, bad JSON, bad parameters (ErrorCode.BAD_REQUEST)
    "AUTH_FAILED": 401,  # no or wrong API key (ErrorCode.AUTH_FAILED)
    "NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "REQUEST_TIMEOUT": 408,  # the request did not arrive within request_timeout
    "PAYLOAD_TOO_LARGE": 413,  # (ErrorCode.PAYLOAD_TOO_LARGE)
    "HEADERS_TOO_LARGE": 431,
    "INTERNAL": 500,  # a bug (ErrorCode.INTERNAL)
    "NOT_IMPLEMENTED": 501,  # a Transfer-Encoding other than chunked
    "UNAVAILABLE": 503,  # not ready (readyz), or too many connections
    "HTTP_VERSION_NOT_SUPPORTED": 505,  # a request line with a version other than HTTP/1.0 or 1.1
}

#: The request versions served (h11 parses any HTTP/d.d and would answer it as 1.1).
_VERSIONS = (b"1.0", b"1.1")



#: h11's reasons that quote the request's bytes (its repr, an API key in a
#: header perhaps): said in words instead, without them.
_H11_QUOTING = {
    "illegal request line": "illegal request line (not 'METHOD target HTTP/version': a space or a control character"
                            " in the target?)",
    "illegal header line": "illegal header line (not 'name: value', or a control character such as NUL in it)",
    "illegal chunk header": "illegal chunk header (a chunk size that is not hexadecimal)",
}
#: The most characters of h11's reason said (its own texts are short).
_H11_REASON_MAX = 120

#: h11's refusal of a chunk size line that starts with more hex digits than
#: it reads (20): hexadecimal still, zero-padded perhaps (RFC 9112 7.1 sets no
#: bound on leading zeros; h11 does, and a size past 20 significant digits
#: is refused 413 from our own peek before h11 sees it).
_LONG_CHUNK_SIZE = re.compile(r"illegal chunk header: bytearray\(b'[0-9A-Fa-f]{21}")


def _h11_reason(exc: h11.RemoteProtocolError) -> str:
    """What h11 found wrong with a request, in words, for a 400's message:
    its reason ('Missing mandatory Host: header', 'bad Content-Length'),
    first letter lowered, without any of the request's bytes it quotes (cut
    at the quote: ``illegal header line: bytearray(b'X: ...')``), printable
    ASCII only and at most _H11_REASON_MAX characters."""
    text = str(exc)
    if _LONG_CHUNK_SIZE.match(text):
        return "illegal chunk header (a chunk size of more than 20 hex digits, leading zeros counted: at most 20 are read)"
    for quote in (": bytearray(", ": b'", ': b"', " b'", ' b"'):
        cut = text.find(quote)
        if cut >= 0:
            text = text[:cut]
    text = "".join(ch for ch in text if " " <= ch <= "~").strip()
    text = _H11_QUOTING.get(text, text)
    if len(text) > _H11_REASON_MAX:
        text = text[: _H11_REASON_MAX - 3] + "..."
    if not text:
        return "the request does not parse as HTTP/1.1"
    return text[0].lower() + text[1:] if text[1:2].islower() or len(text) == 1 else text

class HttpError(Exception):
    """Raised by a handler (or the server) for a JSON error response."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[list[tuple[str, str]]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


@dataclass(frozen=True, slots=True)
class RawBody:
    """A non-JSON response body (``/metrics``)."""

    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamBody:
    """A response body written as it is produced (server-sent events):
    ``produce(send)`` awaits ``send(chunk)`` for each chunk and returns when
    the stream is over.  Sent chunked, then the connection closes.  Each
    ``send`` has ``request_timeout`` to go out: a client that stops reading
    holds at most one chunk plus the socket buffers, then is disconnected
    (nothing is queued ahead of the socket).  A chunk (bytes or a
    bytearray) is written as it is, not copied: the producer must not
    change it until ``send`` returned."""

    content_type: str
    produce: Callable[[Callable[[Union[bytes, bytearray]], Awaitable[None]]], Awaitable[None]]
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Request:
    """One request as a handler sees it.  ``headers``: lower-case names
    (repeated headers joined with ", "; Authorization, Idempotency-Key and
    Last-Event-ID given twice are refused before a handler runs); ``params``: the path pattern's
    ``{name}`` segments, percent-decoded; ``query``: parsed query string
    (each name once: a parameter given twice is refused before a handler
    runs; a blank one is absent from it); ``query_names``: the name of
    every query parameter given, blank ones too, in request order (what a
    route registered with ``query=`` is checked against:
    :func:`check_query`)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    params: dict[str, str] = field(default_factory=dict)
    query_names: tuple[str, ...] = ()

    def json(self) -> Any:
        """The body as JSON; HttpError 400 ``BAD_REQUEST`` if it is not (or
        is nested deeper than the decoder goes, about 1000 levels, or holds
        a number of more digits than Python reads, 4,300, or an object that
        gives a key twice)."""
        try:
            return read_json(self.body or b"null")
        except DuplicateKey as exc:
            raise HttpError(400, "BAD_REQUEST", f"the body holds {exc}") from None
        except TooManyDigits as exc:  # (Python's own words were advice to raise the limit)
            raise HttpError(400, "BAD_REQUEST", f"the body is not JSON that can be read: it holds {exc}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, "BAD_REQUEST", f"the body is not JSON: {exc}") from None
        except RecursionError:  # "[" * 100000: the decoder's nesting limit, not a bug
            raise HttpError(400, "BAD_REQUEST", "the body is JSON nested too deeply") from None


Handler = Callable[[Request], Awaitable[tuple[int, Any]]]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: str
    regex: re.Pattern[str]
    handler: Handler
    auth: bool


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


#: The start of a chunk's size line (RFC 9112 7.1; h11 reads at most 20
#: hex digits), after the CRLF that ends the chunk before it, if still buffered.
_CHUNK_SIZE = re.compile(rb"(?:\r\n|\n)?([0-9A-Fa-f]{1,20})")


def _path_param(raw: str) -> str:
    """A ``{name}`` segment percent-decoded (RFC 3986 2.1), as UTF-8.
    HttpError 400 for a ``%`` not followed by two hex digits, or bytes that
    are not UTF-8: taken literally they named some other id (``%ZZ``) and
    got a 404 for it (a new-user pass)."""
    if _BAD_ESCAPE.search(raw):
        raise HttpError(400, "BAD_REQUEST", f"path segment {_show(raw)}: '%' must be followed by two hex digits")
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise HttpError(400, "BAD_REQUEST", f"path segment {_show(raw)}: the percent-escapes are not UTF-8") from None


#: The request headers read as one value (h11 gives header names as
#: lower-case bytes): given twice, refused rather than joined with ", ".
_SINGLE_HEADERS = {b"authorization": "Authorization", b"idempotency-key": "Idempotency-Key",
                   b"last-event-id": "Last-Event-ID"}


def _check_query_utf8(text: str) -> None:
    """HttpError 400 naming the parameter whose name or value has
    percent-escapes that are not UTF-8, as a path segment's are refused
    (:func:`_path_param`): parse_qs made each such byte U+FFFD, and an id
    was then refused for "the non-ASCII character '\ufffd'", a character
    the client never sent (a new user's trial)."""
    if "%" not in text:
        return
    for pair in text.split("&"):  # (parse_qsl's separator)
        name, _, value = pair.partition("=")
        try:
            shown = unquote_plus(name, errors="strict")
        except UnicodeDecodeError:
            raise HttpError(400, "BAD_REQUEST",
                            f"query parameter {_show(name)}: the percent-escapes of its name are not UTF-8") from None
        try:
            unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise HttpError(400, "BAD_REQUEST", f"query parameter {_show(shown)}: the percent-escapes of its value"
                                                f" {_show(value)} are not UTF-8") from None


def _parse_query(text: str) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    """A request's query string as ``parse_qs`` reads it (a blank value,
    ``?limit=``, is absent), and the names of every parameter given (blank
    ones too), in order; HttpError 400 for a parameter given twice
    (``?limit=1&limit=2``, blank or not): which one was meant is not ours
    to guess (parse_qs keeps both and a reader took the last)."""
    _check_query_utf8(text)
    counts = Counter(name for name, _ in parse_qsl(text, keep_blank_values=True))
    for name, n in counts.items():
        if n > 1:
            raise HttpError(400, "BAD_REQUEST", f"query parameter {_show(name)} is given {n} times: give it once")
    return parse_qs(text), tuple(counts)


def check_query(request: Request, takes: tuple[str, ...], blank: frozenset[str] = frozenset()) -> None:
    """HttpError 400 ``BAD_REQUEST`` for a query parameter of ``request``
    that is not among ``takes`` (naming the first such and the ones taken:
    ignored, a typo such as ``Limit`` or ``consumr`` changed what was read,
    as an unknown field of a body is refused), or that is given blank
    (``?consumer=``, ``?limit``: a value was meant, and which is not ours
    to guess; leave the parameter out for its default) unless its name is
    in ``blank`` (a parameter whose empty value means something)."""
    for name in request.query_names:
        if name not in takes:
            said = ("takes " + ", ".join(repr(t) for t in takes)) if takes else "takes no query parameters"
            raise HttpError(400, "BAD_REQUEST", f"unknown query parameter {_show(name)}: this endpoint {said}")
    for name in request.query_names:
        if name not in request.query and name not in blank:
            raise HttpError(400, "BAD_REQUEST", f"query parameter {_show(name)} is empty: give it a value or leave it out")


def _query_checked(handler: Handler, takes: tuple[str, ...], blank: frozenset[str]) -> Handler:
    """``handler`` after :func:`check_query` (so after the API key's check)."""

    async def checked(request: Request) -> tuple[int, Any]:
        check_query(request, takes, blank)
        return await handler(request)

    return checked


class Router:
    """``(method, path pattern) -> handler``.  Later routes never shadow
    earlier ones: registering the same method and pattern twice is a
    ValueError.  A path that a literal route (no ``{name}``) names is
    routed by the literal routes of that path only: ``PUT /web/token``,
    with ``POST /web/token`` and ``GET /web/{file}`` routed, is 405 with
    ``Allow: POST``, and ``GET /web/token`` too."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []
        #: The routes with no ``{name}`` by their path, and the others, in order.
        self._literal: dict[str, list[_Route]] = {}
        self._patterns: list[_Route] = []

    def add(self, method: str, pattern: str, handler: Handler, *, auth: bool = True,
            query: Optional[Iterable[str]] = None, blank: Iterable[str] = ()) -> None:
        """Route ``method`` requests whose path matches ``pattern``
        (``/v1/users/{user}``: a ``{name}`` matches one non-empty segment).
        ``method`` is registered upper-cased (``"get"`` routes GET); a
        request's method is matched as sent, case-sensitively (RFC 9110
        9.1: a request ``get`` is not GET).  ``query``: the names of the
        query parameters the endpoint takes (``()``: none); then any other,
        or one given blank (unless named in ``blank``), is 400
        ``BAD_REQUEST`` before the handler runs (:func:`check_query`).
        ``None`` (the default): not checked, the handler reads what it likes."""
        method = method.upper()
        if query is not None:
            handler = _query_checked(handler, tuple(query), frozenset(blank))
        if not pattern.startswith("/"):
            raise ValueError(f"path pattern {pattern!r} must start with /")
        if any(r.method == method and r.pattern == pattern for r in self._routes):
            raise ValueError(f"{method} {pattern} is already routed")
        parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", pattern)
        rx = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in parts)
        route = _Route(method, pattern, re.compile(rx + r"\Z"), handler, auth)
        self._routes.append(route)
        if len(parts) == 1:  # no {name}: a literal path
            self._literal.setdefault(pattern, []).append(route)
        else:
            self._patterns.append(route)

    def route(self, method: str, path: str) -> tuple[Handler, dict[str, str], bool]:
        """The handler, path params and whether it needs an API key; HttpError
        404 (no pattern matches) or 405 (matches, not for this method; the
        ``Allow`` header lists the methods that are).  When a literal route
        matches ``path``, only the literal routes decide (a ``{name}``
        pattern that matches too is not consulted); else the patterns, the
        first registered first.  HEAD is served by a GET route."""
        allowed: list[str] = []
        literal = self._literal.get(path)
        if literal is not None:
            for r in literal:
                if r.method == method or (method == "HEAD" and r.method == "GET"):
                    return r.handler, {}, r.auth
                allowed.append(r.method)
        else:
            for r in self._patterns:
                m = r.regex.match(path)
                if m is None:
                    continue
                if r.method == method or (method == "HEAD" and r.method == "GET"):
                    return r.handler, {k: _path_param(v) for k, v in m.groupdict().items()}, r.auth
                allowed.append(r.method)
        if allowed:
            if "GET" in allowed:
                allowed.append("HEAD")  # (served by the GET route: RFC 9110 10.2.1 lists every method)
            raise HttpError(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {_show(path)}",
                            [("allow", ", ".join(sorted(set(allowed))))])
        raise HttpError(404, "NOT_FOUND", f"no endpoint {_show(path)}")


def check_api_key(headers: dict[str, str], keys: tuple[bytes, ...]) -> None:
    """HttpError 401 unless ``Authorization: Bearer <key>`` names one of
    ``keys``.  Compared with :func:`hmac.compare_digest` against every key
    (no early exit), so timing tells nothing about a key."""
    challenge = [("www-authenticate", 'Bearer realm="pimcore"')]
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    token = token.strip(" \t")  # (HTTP's whitespace only: str.strip took a UTF-8 byte read as latin-1 NBSP)
    if scheme.lower() != "bearer" or not token:
        raise HttpError(401, "AUTH_FAILED", "an API key is required: Authorization: Bearer <key>", challenge)
    # (The header was read as latin-1: back to the bytes sent.  Keys are
    # printable ASCII -- api_key_problem -- so a given token with other bytes
    # matches none, whatever a client encoded.)
    given = token.encode("latin-1")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    if not ok:
        raise HttpError(401, "AUTH_FAILED", "the API key is not valid", challenge)


#: The shortest ``keepalive_timeout`` taken, in seconds: shorter, a
#: connection closed before its client's next request could come.
MIN_KEEPALIVE_TIMEOUT = 0.1


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP listener.  ``scheme`` "tcp" or "tls" (``ssl_context``
    required for tls); port 0 picks a free port (see :attr:`HttpServer.url`)."""

    host: str = "127.0.0.1"
    port: int = 0
    scheme: str = "tcp"
    ssl_context: Optional[ssl.SSLContext] = None
    #: Bearer keys accepted for every route registered with auth=True.
    api_keys: tuple[str, ...] = ()
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1 << 20
    request_timeout: float = 10.0  # seconds: a whole request once it started, and a response
    keepalive_timeout: float = 30.0  # seconds of silence between requests (>= MIN_KEEPALIVE_TIMEOUT)
    max_connections: int = 1000
    #: Most bytes of one page's JSON (history, conversation list, event
    #: poll) and of one server-sent-events write; a page holds one item
    #: however large (pimcore.http.api.MAX_PAGE_BYTES).
    max_page_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        if self.scheme not in ("tcp", "tls"):
            raise ValueError(f"http listener scheme must be tcp or tls, not {self.scheme!r}")
        if self.scheme == "tls" and self.ssl_context is None:
            raise ValueError("a tls:// http listener needs a certificate (--cert/--key)")
        for name in ("max_header_bytes", "max_body_bytes", "max_connections", "max_page_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.request_timeout > 0:
            raise ValueError("request_timeout must be > 0 seconds")
        # (A keep-alive shorter than a client's turn-around closed the
        # connection between a request and its next, 0.0001 s was taken: a
        # new user's trial.  0.1 s is a turn-around on a slow network.)
        if not self.keepalive_timeout >= MIN_KEEPALIVE_TIMEOUT:
            raise ValueError(f"keepalive_timeout must be >= {MIN_KEEPALIVE_TIMEOUT:g} seconds,"
                             f" got {self.keepalive_timeout:g}")
        for i, key in enumerate(self.api_keys, 1):
            problem = api_key_problem(key)
            if problem is not None:
                raise ValueError(f"api_keys: HTTP API key {i} {problem}")


def api_key_problem(key: str) -> Optional[str]:
    """Why ``key`` cannot be an HTTP API key, or None: it must be printable
    ASCII, as an HTTP header carries it -- a key with "€" was taken at start
    and then matched only a client that sends raw UTF-8 (curl), never
    pimcore's own CLI nor most HTTP libraries (new users' trials).  Never
    quotes the key."""
    bad = next((c for c in key if not (" " <= c <= "~")), None)
    if bad is None:
        return None
    return f"is not printable ASCII (an HTTP header carries it): it has a character U+{ord(bad):04X}"


#: A response body up to this long is written with its head, in one write;
#: a longer one is written on its own, without being copied (_send).
_JOIN_BELOW = 64 * 1024

#: Most bytes of a receive given to h11 at once (the rest waits in
#: :class:`_Wire`): what h11 holds stays small, so peeking at it
#: (``trailing_data`` copies it whole) at each chunk of a body costs little.
_FEED_BYTES = 4096

#: h11 events of one request handled between two checkpoints: a receive of
#: 64 KiB of one-byte chunks is over 9,000 events (about 5 us each), and
#: nothing else of the broker ran while they were read.
_EVENTS_PER_CHECKPOINT = 64

#: A chunked body may have this many chunks of any size; past them it must
#: average at least MIN_CHUNK_BYTES a chunk, else 400.  h11 makes an event of
#: every chunk (its cost is per chunk, not per byte): 170,000 one-byte chunks,
#: under max_body_bytes, were about a second of the loop each.
MAX_SMALL_CHUNKS = 1024
MIN_CHUNK_BYTES = 256

#: Seconds a connection refused before its body was read drains what the
#: client still sends (dropped), so the close is no reset (_linger).
_LINGER_SECONDS = 2.0

#: Connections past max_connections still read, for a probe (HttpServer.probe_paths).
PROBE_RESERVE = 16

#: Seconds a connection of the probe reserve has for its whole request, from
#: its accept (TLS handshake included; at most request_timeout).  An honest
#: probe sends its head in one segment right after connecting; a silent or
#: slow one holds a reserve slot this long at most, even unchallenged.
PROBE_REQUEST_TIMEOUT = 2.0

#: _while_connected's answer when shutdown() ended the wait.
_SHUTTING_DOWN = object()


class _Refusal(HttpError):
    """An HttpError that the listener counts and logs as a refusal of
    ``reason`` (one its status does not say: REFUSAL_REASONS)."""

    def __init__(self, status: int, code: str, message: str, reason: str) -> None:
        super().__init__(status, code, message)
        self.reason = reason


def _too_many_connections() -> HttpError:
    return _Refusal(503, "UNAVAILABLE", "too many connections", "too_many_connections")


class _ReserveSlot:
    """A connection of the probe reserve (accepted past max_connections).
    ``evictable`` while it holds the slot without having sent a whole
    request (waiting for it, reading it) or while it lingers after its
    refusal: then a newer connection that finds the reserve full cancels
    ``scope`` (HttpServer._admit) and takes the slot.  Why: 16 connections
    that connect and send nothing (or one byte) filled the reserve, and a
    liveness probe was 503 for request_timeout at a time -- a restart of a
    healthy broker.  From its whole request to its answer written it is not
    evictable (the probe being answered).  ``answered``: its refusal was
    written (and counted) before it lingered."""

    __slots__ = ("stream", "scope", "evictable", "answered")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.scope = trio.CancelScope()
        self.evictable = True
        self.answered = False


#: What the listener refuses, by reason (pimcore_http_refused_total{reason},
#: the http_refused log line), and how its warning says it.
REFUSAL_REASONS: dict[str, str] = {
    "auth": "401 AUTH_FAILED: no API key or a wrong one",
    "too_large": "413 PAYLOAD_TOO_LARGE: a body over max_body_bytes (or a payload over max_payload)",
    "timeout": "408 REQUEST_TIMEOUT: a request not whole within request_timeout",
    "headers_too_large": "431 HEADERS_TOO_LARGE: a request head over max_header_bytes",
    "too_many_connections": "503 UNAVAILABLE: max_connections reached",
    "malformed": "400, 501 or 505: not HTTP/1.1 the listener reads (or a body in too many small chunks)",
    "tls": "400: a TLS handshake (an https:// client) at this plain http:// listener: use http://, or serve the"
           " API over TLS (a tls:// listener with a certificate)",
    "evicted": "closed unanswered: a connection of the probe reserve (past max_connections) without a whole request,"
               " its slot taken by a newer connection",
}
#: The reason of a refusal said by its status alone.
_REFUSED_STATUS = {401: "auth", 408: "timeout", 413: "too_large", 431: "headers_too_large"}


class _Refusals:
    """Refusals counted by reason, and said in a warning (event
    ``http_refused``) at most once per ``warn_every`` seconds per reason,
    with how many there were since the last line (the first at once)."""

    warn_every = 30.0

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self._unsaid: Counter[str] = Counter()
        self._said_at: dict[str, float] = {}

    def note(self, reason: str, status: Optional[int], stream: trio.abc.Stream) -> None:
        """Count a refusal of ``reason``; ``status`` None: closed unanswered."""
        from ..net.server import _peer_address

        self.total[reason] += 1
        self._unsaid[reason] += 1
        now = trio.current_time()
        last = self._said_at.get(reason)
        if last is not None and now - last < self.warn_every:
            return
        count = self._unsaid.pop(reason)
        peer = _peer_address(stream)  # (never a header: an API key is not logged)
        log.warning("http requests refused (%s): %d since %s, the latest from %s", REFUSAL_REASONS[reason], count,
                    "the last warning" if last is not None else "the start", peer,
                    extra={"event": "http_refused", "reason": reason, "status": status, "count": count, "peer": peer})
        self._said_at[reason] = now


class _StreamDropped(Exception):
    """A stream's client stopped reading (internal to _send_stream)."""


class _Wire:
    """A connection's bytes on their way into its h11 connection: what was
    received and not yet given to h11 waits in ``pending`` and is fed
    _FEED_BYTES at a time, when h11 needs data."""

    __slots__ = ("stream", "conn", "pending", "eof")

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.pending = bytearray()
        self.eof = False  # the client's EOF came (fed to h11 once pending is)

    def buffered(self) -> int:
        """Bytes received and not yet parsed (h11's and ours)."""
        return len(self.pending) + len(self.conn.trailing_data[0])

    def first_bytes(self) -> bytes:
        """The first bytes not yet parsed (a request's start)."""
        return self.conn.trailing_data[0] + bytes(self.pending[:8])

    def add(self, data: bytes) -> None:
        """Received ``data`` (b"": the client's EOF), for h11 later."""
        if data:
            self.pending += data
        else:
            self.eof = True

    def feed(self) -> bool:
        """Give h11 the next slice (or the EOF after the last); False if
        there is nothing to give."""
        if self.pending:
            piece = bytes(self.pending[:_FEED_BYTES])
            del self.pending[:_FEED_BYTES]
            self.conn.receive_data(piece)
            return True
        if self.eof:
            self.conn.receive_data(b"")
            return True
        return False

    async def fill(self) -> None:
        """h11 needs data: what is pending, else the next receive."""
        if not self.feed():
            self.add(bytes(await self.stream.receive_some(64 * 1024)))
            self.feed()


def _request_start(buffered: bytes | bytearray) -> bool:
    """``buffered`` (a request's first bytes; empty lines before it are
    allowed) may begin an HTTP request: the broker's ws:// listeners' rule
    (a method is letters)."""
    from ..net.server import _http_start

    return _http_start(bytes(buffered[:8]).lstrip(b"\r\n")[:2])


def _tls_hello_start(first: bytes) -> bool:
    """``first`` (a connection's first bytes) begin a TLS ClientHello: a
    handshake record (0x16) of record-layer version 3.x (the broker
    listener's test, net.server._TLS_HELLO_START).  A lone 0x16 too: no
    request begins with it, and a ClientHello is the one thing that does."""
    from ..net.server import _TLS_HELLO_START

    return first.startswith(_TLS_HELLO_START) or first == _TLS_HELLO_START[:1]


def _phrase(status: int) -> str:
    """The standard reason phrase ("OK", "Not Found"); "" for a status
    http.HTTPStatus does not know."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def error_body(code: str, message: str) -> bytes:
    return _json_bytes({"error": {"code": code, "message": message}})


class HttpServer:
    """Serves ``router`` on ``config``'s address.  Run with
    ``await nursery.start(server.run)``; :attr:`url` is then the real one."""

    #: Paths (GET, HEAD) still served at max_connections, on up to
    #: PROBE_RESERVE connections more, one request each, whole within
    #: PROBE_REQUEST_TIMEOUT; a newer connection evicts the oldest of them
    #: without a whole request yet (_admit): the probes and the scrape
    #: (BrokerHttp's).  None here: past the limit, 503 at once.
    probe_paths: frozenset[str] = frozenset()

    def __init__(self, router: Router, config: HttpConfig) -> None:
        self.router = router
        self.config = config
        self._keys = tuple(k.encode("utf-8", "surrogateescape") for k in config.api_keys)
        self._conns = 0
        self.url: Optional[str] = None
        self.requests = 0  # requests answered (any status)
        self.responses: Counter[int] = Counter()  # responses sent, by status (pimcore_http_responses_total)
        #: Refusals by reason (pimcore_http_refused_total), and their warnings.
        self.refusals = _Refusals()
        #: The probe reserve's connections that hold a slot, oldest first
        #: (by connection number), and how many reserve connections are
        #: open (those evicted and not yet closed too: they do not count
        #: against max_connections meanwhile).
        self._reserve: dict[int, _ReserveSlot] = {}
        self._reserve_open = 0
        self.streams = 0  # streamed responses (server-sent events) being written now
        self.streams_dropped = 0  # streams closed because the client took no data for request_timeout
        self.connections = 0  # connections accepted (each one's number in logs)
        #: https:// connections whose TLS handshake failed (plain http, an
        #: untrusted certificate...): logged once each, event tls_failed.
        self.tls_handshake_failures = 0
        # Graceful shutdown (see shutdown()): the accept loop's scope, and the
        # scopes a connection waits in (keep-alive silence, a long-poll, a
        # stream) that shutdown cancels so each connection ends with an answer.
        self._closing = False
        self._accepting: Optional[trio.CancelScope] = None
        self._waits: set[trio.CancelScope] = set()
        self._all_closed = trio.Event()
        #: What a broker client (binary Login, WebSocket upgrade) is told here.
        self._not_a_broker = f"this is pimcore's HTTP API ({'https' if config.scheme == 'tls' else 'http'}://):" \
                             " not a broker listener"
        #: What a TLS client at a plain http:// listener is told.  It cannot
        #: read it as TLS, but its ssl module fails at once on "HTTP/1.1"
        #: (WRONG_VERSION_NUMBER, which pimcore's CLI and SDK turn into
        #: "try http://"), and the SDK finds the API's name in the bytes.
        self._tls_at_plain = ("this is pimcore's HTTP API (http://): a TLS handshake (ClientHello) came to this"
                              ' plain-HTTP port: use an http:// URL, or serve the API over TLS ([http] listen ='
                              ' "tls://HOST:PORT" with a certificate)')

    @property
    def open_connections(self) -> int:
        """Connections open now (pimcore_http_connections)."""
        return self._conns

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from ..net.server import PressureListener, open_listeners
        from ..net.streams import Endpoint

        cfg = self.config
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        web = "https" if cfg.scheme == "tls" else "http"
        listeners = await open_listeners(Endpoint(cfg.scheme, cfg.host, cfg.port), f"{web}://{host}:{cfg.port}")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"{web}://{host}:{port}"
        log.info("http listening on %s", self.url, extra={"event": "listening", "url": self.url})
        async with trio.open_nursery() as connections:
            with trio.CancelScope() as self._accepting:
                if self._closing:
                    self._accepting.cancel()
                task_status.started()
                await trio.serve_listeners(self._serve_conn, [PressureListener(x, self.url) for x in listeners],
                                           handler_nursery=connections)
            for listener in listeners:  # shutdown(): no new connections; these finish
                await trio.aclose_forcefully(listener)

    async def shutdown(self, grace: Optional[float] = None) -> None:
        """Stop gracefully: accept no more connections; a long-poll waiting
        gets 503 ``unavailable`` ("the server is shutting down"), a stream
        its last chunk, an idle keep-alive connection is closed, and a
        request being handled finishes.  Returns when every connection
        ended or after ``grace`` seconds (default ``request_timeout``);
        the caller then cancels :meth:`run`."""
        self._closing = True
        if self._accepting is not None:
            self._accepting.cancel()
        for scope in list(self._waits):
            scope.cancel()
        if self._conns == 0:
            return
        with trio.move_on_after(self.config.request_timeout if grace is None else grace):
            await self._all_closed.wait()

    async def _serve_conn(self, sock: trio.SocketStream) -> None:
        from ..net.server import tls_server_stream

        stream: trio.abc.Stream = sock
        if self.config.ssl_context is not None:
            stream = tls_server_stream(sock, self.config.ssl_context)
        self.connections += 1
        conn_id = self.connections
        self._conns += 1
        slot: Optional[_ReserveSlot] = None
        try:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
            if self._conns - self._reserve_open <= self.config.max_connections:
                await self._serve_requests(_Wire(stream, conn))
                return
            # At the limit, a connection of the reserve is read for one probe
            # (a liveness probe answered 503 would restart a healthy broker).
            slot = self._admit(conn_id, stream)
            if slot is None:
                await self._send_error(stream, conn, _too_many_connections())
                return
            with slot.scope:  # (cancelled: evicted, and closed unanswered)
                await self._serve_requests(_Wire(stream, conn), reserve=slot)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            from ..net.server import tls_handshake_failed

            if tls_handshake_failed(stream, exc, conn=conn_id, transport="https", logger=log):
                self.tls_handshake_failures += 1
            else:
                log.debug("http connection broken: %r", exc)
        except Exception:
            # A bug met while serving one connection ends that connection,
            # never the listener (nor the broker it runs in).
            log.exception("http connection failed", extra={"event": "http_connection_failed"})
        finally:
            if slot is not None:
                self._reserve.pop(conn_id, None)
                self._reserve_open -= 1
            self._conns -= 1
            await trio.aclose_forcefully(stream)
            if self._closing and self._conns == 0:
                self._all_closed.set()

    def _admit(self, conn_id: int, stream: trio.abc.Stream) -> Optional[_ReserveSlot]:
        """A slot of the probe reserve for connection ``conn_id`` (accepted
        past max_connections), or None: no probe paths, or PROBE_RESERVE
        connections hold the reserve and none is evictable.  When the
        reserve is full, the oldest evictable connection (no whole request
        yet, _ReserveSlot) is cancelled and its slot taken: so silent or
        slow connections cannot keep a probe out -- an honest probe, whose
        head comes in the segment after its handshake, is evicted only if
        PROBE_RESERVE newer connections arrive before its head is read.
        Synchronous (no checkpoint between the choice and the taking)."""
        if not self.probe_paths:
            return None
        if len(self._reserve) >= PROBE_RESERVE:
            oldest = next((n for n, held in self._reserve.items() if held.evictable), None)
            if oldest is None:
                return None  # PROBE_RESERVE requests being answered: 503 at once
            evicted = self._reserve.pop(oldest)
            evicted.scope.cancel()
            # Closed unanswered (it may be mid-TLS-handshake or mid-head; a
            # client that sent nothing for its slot needs no words), and
            # counted now, when the slot changes hands -- unless its refusal
            # was answered and counted already (it lingered): once a connection.
            if not evicted.answered:
                self.refusals.note("evicted", None, evicted.stream)
        slot = _ReserveSlot(stream)
        self._reserve[conn_id] = slot
        self._reserve_open += 1
        return slot

    async def _receive(self, wire: _Wire) -> Any:
        """The next h11 event, reading as needed (EOF is fed as b"")."""
        while True:
            event = wire.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            await wire.fill()

    async def _serve_requests(self, wire: _Wire, *, reserve: Optional[_ReserveSlot] = None) -> None:
        """Serve a connection's requests; ``reserve``: it is one of the probe
        reserve (past max_connections): one probe is read, within
        PROBE_REQUEST_TIMEOUT of the accept for the whole of it (the wait
        for its first byte included), and answered, then it ends."""
        cfg = self.config
        stream, conn = wire.stream, wire.conn
        probes_only = reserve is not None
        # A new connection's first byte has request_timeout to come (one that
        # never sends a byte holds a max_connections slot no longer than a
        # request may take); then keepalive_timeout between requests.
        silence = min(cfg.request_timeout, cfg.keepalive_timeout)
        timeout = cfg.request_timeout
        #: A reserve connection's deadline for its whole request (one, from
        #: the accept): a slow one holds a reserve slot a short time even
        #: when no newer connection evicts it.
        until = trio.current_time() + min(PROBE_REQUEST_TIMEOUT, timeout) if reserve is not None else math.inf
        if reserve is not None:
            timeout = min(PROBE_REQUEST_TIMEOUT, timeout)
        while True:
            # Between requests: wait for a first byte (or what is already
            # buffered), then request_timeout for the rest.
            if self._closing and conn.their_state is h11.IDLE and not wire.buffered():
                return  # shutting down: no next request
            if not wire.buffered():
                with trio.move_on_at(min(trio.current_time() + silence, until)) as idle:
                    self._waits.add(idle)
                    try:
                        data = bytes(await stream.receive_some(64 * 1024))
                    finally:
                        self._waits.discard(idle)
                    wire.add(data)
                    if not data:
                        return
                if not wire.buffered() and conn.their_state is h11.IDLE:
                    return  # silent for too long (or shutting down): hang up
            if conn.their_state is h11.IDLE and not _request_start(wire.first_bytes()):
                # Bytes no request begins with (a pimcore tcp:// client's
                # Login): h11 would wait for a line end until request_timeout.
                # Answered at once, naming this port (the SDK says so).
                if reserve is not None:
                    reserve.evictable = False  # (its answer is written, not cut by an eviction)
                if cfg.scheme == "tcp" and _tls_hello_start(wire.first_bytes()):
                    # An https:// client (curl, a browser, a tls:// SDK URL)
                    # at this plain port: said as "not a broker listener" and
                    # counted malformed, the operator was sent the wrong way
                    # (a new user's trial).  As the broker listener's
                    # _tls_at_stream says it for its own port.
                    refusal = _Refusal(400, "BAD_REQUEST", self._tls_at_plain, "tls")
                else:
                    refusal = _Refusal(400, "BAD_REQUEST", self._not_a_broker, "malformed")
                await self._send_error(stream, conn, refusal)
                return
            try:
                try:
                    with trio.fail_at(min(trio.current_time() + timeout, until)):
                        request = await self._read_request(wire, probes_only)
                finally:
                    if reserve is not None:
                        # Read whole (or refused): from here to its answer
                        # written a reserve connection is not evicted.  Not
                        # from its head: a probe's head with a Content-Length
                        # and a body trickled held a slot unevictable.
                        reserve.evictable = False
            except trio.TooSlowError:
                await self._send_error(stream, conn, HttpError(408, "REQUEST_TIMEOUT",
                                                               f"the request did not arrive within {timeout:g} s"))
                return
            except h11.RemoteProtocolError as exc:
                # h11's message may quote the request (a header's value: an
                # API key): neither the reply nor the log repeats it
                # (_h11_reason says what is wrong without it).
                status = exc.error_status_hint
                if conn.trailing_data[1]:
                    # h11 had the client's EOF (fed only once all it sent was
                    # parsed): the request stopped short, mid-head or
                    # mid-body, because the client closed its side -- nothing
                    # malformed was sent.  Answered (a half-closed client
                    # reads it) but not counted a refusal: the listener
                    # refused nothing, and a warning for what flaky networks
                    # and clients giving up do every day would be a false
                    # alarm; a silent stall is still the 408 ("timeout").
                    log.debug("an HTTP request was abandoned: the client closed before it was whole")
                    await self._send_error(stream, conn, HttpError(
                        400, "BAD_REQUEST", "the request is not whole: the client closed its side of the connection"))
                    return
                log.debug("refused a malformed HTTP request: %d", status)
                if status == 431:
                    err = HttpError(431, "HEADERS_TOO_LARGE", f"the request head is over {cfg.max_header_bytes} bytes")
                elif status == 501:  # h11: a Transfer-Encoding other than chunked
                    err = _Refusal(501, "NOT_IMPLEMENTED", "only Transfer-Encoding: chunked is supported", "malformed")
                else:
                    err = _Refusal(status, "BAD_REQUEST", f"malformed HTTP request: {_h11_reason(exc)}", "malformed")
                await self._send_error(stream, conn, err)
                return
            except HttpError as exc:  # 400, 401, 404, 405, 413, 505: the body is not read; the connection ends
                wire.pending.clear()  # (a refused body's first bytes, not kept while the client is drained)
                await self._send_error(stream, conn, exc)
                if reserve is not None:
                    # Answered: a reserve connection lingering (2 s) is
                    # evictable again, or 16 clients posting to another path
                    # held the reserve by lingering.  (The cost: a client
                    # still sending may see a reset, not its 503.)
                    reserve.evictable = reserve.answered = True
                await self._linger(stream)
                return
            if request is None:
                return  # the client closed between requests
            if request.method in ("GET", "HEAD"):
                # A GET may be a long-poll or a stream: notice the client leaving.
                answer = await self._while_connected(wire, self._handle(request, stream))
                if answer is _SHUTTING_DOWN:
                    await self._send_error(stream, conn, HttpError(503, "UNAVAILABLE", "the server is shutting down"))
                    return
                if answer is None:
                    return
                status, headers, body = answer
            else:
                status, headers, body = await self._handle(request, stream)
            if probes_only:
                headers = [*headers, ("connection", "close")]  # one probe, then the reserve's slot is free
            if isinstance(body, StreamBody):
                ended = await self._while_connected(wire, self._send_stream(stream, conn, status, headers, body,
                                                                             request))
                if ended is _SHUTTING_DOWN and conn.our_state is h11.SEND_BODY:
                    with trio.move_on_after(cfg.request_timeout):  # the chunked body's end
                        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                return
            with trio.move_on_after(cfg.request_timeout) as writing:
                await self._send(stream, conn, status, headers, body, head=request.method == "HEAD")
            if writing.cancelled_caught:
                # The client takes no data (a slow or hostile one, or one that
                # pipelines requests without reading): hang up on it.
                log.info("http connection closed: the client took no data of a response for %g s", cfg.request_timeout,
                         extra={"event": "http_client_not_reading", "path": request.path})
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
            silence = cfg.keepalive_timeout

    async def _while_connected(self, wire: _Wire, work: Awaitable[Any]) -> Any:
        """``await work`` (answering a GET: a long-poll, a stream) while
        reading the connection, so a client that hangs up (EOF or reset) is
        noticed now -- ``work`` is cancelled and None returned -- instead of
        at the next write, up to a keep-alive interval or a long-poll's wait
        later, holding a max_connections slot all that time.  Why a GET only:
        its handler has no effect to cut in half.  Bytes that arrive meanwhile
        (the client's next, pipelined, request) go to h11's buffer, to be
        served after this response; past max_header_bytes buffered the
        reading stops (the client is there; the bytes wait in the socket)."""
        result: list[Any] = []
        left = False

        async def watch(cancel: trio.CancelScope) -> None:
            nonlocal left
            while wire.buffered() < self.config.max_header_bytes:
                try:
                    data = await wire.stream.receive_some(64 * 1024)
                except (trio.BrokenResourceError, OSError):
                    data = b""
                if not data:
                    left = True
                    cancel.cancel()
                    return
                wire.add(bytes(data))

        if self._closing:
            work.close()  # type: ignore[attr-defined]  # a coroutine never started
            return _SHUTTING_DOWN
        async with trio.open_nursery() as nursery:
            self._waits.add(nursery.cancel_scope)  # shutdown() cancels the wait
            try:
                nursery.start_soon(watch, nursery.cancel_scope)
                result.append(await work)
                nursery.cancel_scope.cancel()
            finally:
                self._waits.discard(nursery.cancel_scope)
        if not result and not left and self._closing:
            return _SHUTTING_DOWN
        if left or not result:
            log.debug("http client left during %s", "a response", extra={"event": "http_client_left"})
            return None
        return result[0]

    async def _read_request(self, wire: _Wire, probes_only: bool = False) -> Optional[Request]:
        conn = wire.conn
        event = await self._receive(wire)
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request), event
        if event.http_version not in _VERSIONS:
            # Refused before the body is read; the connection ends.
            raise _Refusal(505, "HTTP_VERSION_NOT_SUPPORTED",
                           f"HTTP/{event.http_version.decode('ascii')} is not supported: only HTTP/1.1 and HTTP/1.0",
                           "malformed")
        # h11 bounds only what it buffers while a head is incomplete; a head
        # that arrived in one read is measured here.
        if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) > self.config.max_header_bytes:
            raise HttpError(431, "HEADERS_TOO_LARGE", f"the request head is over {self.config.max_header_bytes} bytes")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        counts = Counter(name.lower() for name, _ in event.headers if name.lower() in _SINGLE_HEADERS)
        for single, n in counts.items():
            if n > 1:
                # Joined, "a, b" was taken as one Idempotency-Key: which one
                # was meant is not ours to guess (as a query parameter given
                # twice).  The values are not echoed (an API key).
                raise HttpError(400, "BAD_REQUEST", f"header {_SINGLE_HEADERS[single]!r} is given {n} times: give it once")
        if "content-length" in headers and "transfer-encoding" in headers:
            # RFC 9112 6.1: "ought to be handled as an error", and the
            # connection MUST close -- a proxy in front may have framed the
            # body by Content-Length, so what follows could be a smuggled
            # request.  h11 refuses a second Transfer-Encoding or one other
            # than chunked (501) and conflicting Content-Lengths (400), but
            # takes this pair (chunked wins) and keeps the connection.
            raise HttpError(400, "BAD_REQUEST", "the request has both Content-Length and Transfer-Encoding"
                                                " (RFC 9112 6.1: refused, a request smuggling risk)")
        length = headers.get("content-length")
        target = event.target.decode("latin-1")
        try:
            parts = urlsplit(target)
        except ValueError:  # "//[": an unclosed IPv6 bracket, ...
            raise HttpError(400, "BAD_REQUEST", "malformed request target") from None
        query, query_names = _parse_query(parts.query)
        method = event.method.decode("ascii")  # case-sensitive (RFC 9110 9.1): "get" is not GET
        if probes_only and not (method in ("GET", "HEAD") and parts.path in self.probe_paths):
            raise _too_many_connections()
        chunked = headers.get("transfer-encoding", "").strip().lower() == "chunked"
        if chunked or (length is not None and length.strip("0 \t") != ""):
            # A body comes: its path, method and key are checked from the
            # head, so a request refused for them is answered before the
            # body is read (it is never held; the connection then ends).
            _, _, auth = self.router.route(method, parts.path)
            if auth:
                check_api_key(headers, self._keys)
            # The size after the key: a 413 before the 401 told a client
            # without a key max_body_bytes.
            if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
                raise HttpError(413, "PAYLOAD_TOO_LARGE", f"the body is over {self.config.max_body_bytes} bytes")
            if conn.client_is_waiting_for_100_continue:
                # (RFC 9110 10.1.1.) The head passed: ask for the body.  curl
                # sends a body over 1 KiB only after this, or after waiting a
                # second for it.
                # With its reason phrase: h11 writes none unless given one
                # ("HTTP/1.1 100 \r\n"), as for every response (_phrase).
                await wire.stream.send_all(conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                                reason=_phrase(100))) or b"")
        limit = self.config.max_body_bytes
        too_large = HttpError(413, "PAYLOAD_TOO_LARGE", f"the body is over {limit} bytes")
        body = bytearray()
        # A chunked body: each chunk's size line is read here before h11
        # reads it (h11 does not say a chunk's size), so a chunk declared
        # past the limit is refused at once, not read (or waited for until
        # request_timeout, 408).  at_size: the bytes h11 reads next are
        # (the CRLF that ends the last chunk, then) a chunk's size line.
        at_size = chunked
        chunks = 0
        # The next Data begins a chunk (the body's first, or the one after a
        # chunk's end).  Not h11's chunk_start: h11 sets it only when a
        # chunk's size line and its first data are parsed in one go, so a
        # chunk whose size line ended one feed (or one read) and its data
        # began the next was not counted -- "1029 for 1030 bytes", and a
        # client splitting every chunk so was never held to the rule.
        chunk_next = True
        events = 0
        while True:
            events += 1
            if events % _EVENTS_PER_CHECKPOINT == 0:
                await trio.lowlevel.checkpoint()  # let the broker run: a body can be thousands of events
            size_line_whole = False
            if at_size:
                buffered = conn.trailing_data[0]
                m = _CHUNK_SIZE.match(buffered)
                if m is not None:
                    # The hex digits so far are at most the chunk's size.
                    if len(body) + int(m[1], 16) > limit:
                        raise too_large
                    size_line_whole = buffered.find(b"\r\n", m.end()) != -1
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                if size_line_whole:
                    at_size = False  # h11 took the size line; the chunk's data is next
                await wire.fill()
            elif isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > limit:
                    raise too_large
                if chunked and chunk_next:
                    chunks += 1
                    if chunks > MAX_SMALL_CHUNKS + len(body) // MIN_CHUNK_BYTES:
                        raise _Refusal(400, "BAD_REQUEST",
                                       f"the chunked body is in too many small chunks: {chunks} for {len(body)} bytes"
                                       f" (past {MAX_SMALL_CHUNKS} chunks they must average {MIN_CHUNK_BYTES} bytes"
                                       " or more): send larger chunks, or the body with a Content-Length", "malformed")
                at_size = chunk_next = ev.chunk_end
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:  # ConnectionClosed mid-body
                raise h11.RemoteProtocolError("connection closed before the body ended")
        return Request(
            method=method,
            path=parts.path,
            query=query,
            headers=headers,
            body=bytes(body),
            query_names=query_names,
        )

    async def _send_stream(self, stream: trio.abc.Stream, conn: h11.Connection, status: int,
                           headers: list[tuple[str, str]], body: StreamBody, request: Request) -> None:
        """Write a :class:`StreamBody`: the head, then each chunk within
        ``request_timeout`` (the timeout is per write, not for the whole
        stream: a healthy stream lives as long as it produces).  The
        connection ends with the stream."""
        timeout = self.config.request_timeout
        hdrs = [*headers, *body.headers, ("connection", "close")]
        with trio.move_on_after(timeout) as writing:
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=hdrs, reason=_phrase(status))) or b"")
        if writing.cancelled_caught:
            self.streams_dropped += 1
            log.warning("http stream %s closed: the client took no data for %g s", request.path, timeout,
                        extra={"event": "http_stream_dropped", "path": request.path, "timeout": timeout})
            return
        if request.method == "HEAD":
            return

        async def send(chunk: Union[bytes, bytearray]) -> None:
            if not chunk:
                return
            try:
                with trio.fail_after(timeout):
                    # The chunk itself, between its framing, not joined with
                    # it (a copy held as long as a stalled client takes).
                    # (h11 takes any bytes-like object, its hints say bytes.)
                    pieces = conn.send_with_data_passthrough(h11.Data(data=chunk)) or []  # type: ignore[arg-type]
                    if len(chunk) <= _JOIN_BELOW:
                        await stream.send_all(b"".join(pieces))
                    else:
                        for piece in pieces:
                            await stream.send_all(piece)
            except trio.TooSlowError:
                self.streams_dropped += 1
                log.warning("http stream %s closed: the client took no data for %g s", request.path, timeout,
                            extra={"event": "http_stream_dropped", "path": request.path, "timeout": timeout})
                raise _StreamDropped() from None

        self.streams += 1
        try:
            await body.produce(send)
            with trio.fail_after(timeout):
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except _StreamDropped:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away: the usual end of a stream
        except Exception:
            log.exception("http stream %s failed", request.path)
        finally:
            self.streams -= 1

    async def _handle(self, request: Request, stream: trio.abc.Stream) -> tuple[int, list[tuple[str, str]], bytes]:
        extra: list[tuple[str, str]] = []
        try:
            handler, params, auth = self.router.route(request.method, request.path)
            if auth:
                check_api_key(request.headers, self._keys)
            status, body = await handler(Request(request.method, request.path, request.query, request.headers,
                                                 request.body, params, request.query_names))
        except HttpError as exc:
            status, extra = exc.status, exc.headers
            message = exc.message
            self._refused(exc, stream)
            if status == 404 and "websocket" in request.headers.get("upgrade", "").lower():
                # A WebSocket client at this port: a broker's ws:// URL is meant.
                message = f"{message} ({self._not_a_broker})"
            body = RawBody("application/json", error_body(exc.code, message))
        except Exception:
            log.exception("http handler failed: %s %s", request.method, request.path)
            status, body = 500, RawBody("application/json", error_body("INTERNAL", "internal error"))
        if isinstance(body, StreamBody):
            self.requests += 1
            self.responses[status] += 1
            return status, [("content-type", body.content_type)], body  # type: ignore[return-value]
        if not isinstance(body, RawBody):
            body = RawBody("application/json", _json_bytes(body))
        self.requests += 1
        self.responses[status] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s %s -> %d", request.method, request.path, status,
                      extra={"event": "http_request", "method": request.method, "path": request.path, "status": status})
        return status, [("content-type", body.content_type), *extra], body.data

    async def _send(self, stream: trio.abc.Stream, conn: h11.Connection, status: int,
                    headers: list[tuple[str, str]], body: bytes, *, head: bool = False) -> None:
        hdrs = [*headers, ("content-length", str(len(body)))]
        out = conn.send(h11.Response(status_code=status, headers=hdrs, reason=_phrase(status))) or b""
        if body and not head:
            # The body itself, not a copy (content-length framing adds
            # nothing to it): joined with the head, a large body was held
            # twice for as long as a slow client took to read it.  A small
            # one still goes in the head's write.
            data = conn.send_with_data_passthrough(h11.Data(data=body)) or []
            if len(body) <= _JOIN_BELOW:
                out += b"".join(data)
            else:
                await stream.send_all(out)
                out = b""
                for piece in data:
                    await stream.send_all(piece)
        out += conn.send(h11.EndOfMessage()) or b""
        if out:
            await stream.send_all(out)

    async def _linger(self, stream: trio.abc.Stream) -> None:
        """After an answer that left the request unread (its body, refused
        from the head): end our side (FIN), then read and drop what the
        client still sends, for at most _LINGER_SECONDS and as many bytes
        as a request may have -- closing a socket with unread bytes resets
        the connection, and the client could lose the answer before reading
        it.  Nothing read is kept."""
        left = self.config.max_body_bytes + self.config.max_header_bytes
        with trio.move_on_after(_LINGER_SECONDS) as scope:
            self._waits.add(scope)  # shutdown() does not wait for it
            try:
                if isinstance(stream, trio.SocketStream):
                    await stream.send_eof()
                while left > 0:
                    data = await stream.receive_some(16 * 1024)
                    if not data:
                        return
                    left -= len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._waits.discard(scope)

    def _refused(self, err: HttpError, stream: trio.abc.Stream) -> None:
        """Count (and maybe log) ``err`` if it is a refusal (REFUSAL_REASONS)."""
        reason = err.reason if isinstance(err, _Refusal) else _REFUSED_STATUS.get(err.status)
        if reason is not None:
            self.refusals.note(reason, err.status, stream)

    async def _send_error(self, stream: trio.abc.Stream, conn: h11.Connection, err: HttpError) -> None:
        """An error response, then the connection ends (what was not read of
        the request is not read).  Written by hand: h11 lets a server
        respond only to a request it parsed, and a request that timed out
        half-way was not."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response was already started
        body = error_body(err.code, err.message)
        head = [f"HTTP/1.1 {err.status} {_phrase(err.status)}", "content-type: application/json", f"content-length: {len(body)}",
                "connection: close", *(f"{k}: {v}" for k, v in err.headers)]
        self.requests += 1
        self.responses[err.status] += 1
        self._refused(err, stream)
        with trio.move_on_after(self.config.request_timeout):
            await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

