"""Transport adapters shared by the broker and the client.

pimcore frames are self-delimiting, so every transport is used as a plain
byte stream: TCP, TLS over TCP, and WebSocket binary messages (a message may
carry any number of frames, or part of one).  ``WebSocketStream`` adapts a
trio-websocket connection to trio's ``Stream`` interface so the rest of the
network layer never knows which transport it runs on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ..ids import quote_arg

__all__ = ["Endpoint", "parse_url", "url_extra_problem", "WebSocketStream", "SCHEMES"]

SCHEMES = ("tcp", "tls", "ws", "wss")
_DEFAULT_PORTS = {"tcp": 7400, "tls": 7401, "ws": 7480, "wss": 7443}
_WS_PATH = re.compile(r"/[!-~]*")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to listen or connect: ``scheme://host:port[/path]``."""

    scheme: str
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {quote_arg(self.scheme)}; expected one of {', '.join(SCHEMES)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if self.websocket and not _WS_PATH.fullmatch(self.path):
            # (RFC 3986: a path is ASCII; anything else is percent-encoded.
            # The request line carries it as is, and hints quote it.)
            raise ValueError(f"path {quote_arg(self.path)}: a WebSocket path is '/' then printable ASCII without"
                             " spaces (percent-encode the rest)")

    @property
    def secure(self) -> bool:
        return self.scheme in ("tls", "wss")

    @property
    def websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = self.path if self.websocket else ""
        return f"{self.scheme}://{host}:{self.port}{suffix}"

    def __str__(self) -> str:
        return self.url


def url_extra_problem(url: str, *, listen: bool = False, http: bool = False) -> Optional[str]:
    """What ``url`` holds that would be dropped silently, in words (said
    without repeating a password); None if nothing.  One set of rules for
    the broker's listen URLs (``listen``, ``[http] listen``: ``listen``
    True, ``http`` for the HTTP listener) and the URLs clients connect to
    (the SDK, ``pimcore chat --url``, ``pimcore bench --url``): no user name
    or password (the token is the credential), no query or fragment, and a
    path only on ws:// and wss:// (the upgrade request's path)."""
    if listen and url.strip() and "://" not in url:
        # ("127.0.0.1:17440" read as a path, "localhost:7400" as the scheme
        # "localhost": said as "has no path" or the list of schemes.)
        others = "http://, https://, tls://" if http else "tls://, ws://, wss://"
        return f"{quote_arg(url)}: the scheme is missing: write tcp://{url.strip()} (or {others})"
    try:
        parts = urlsplit(url)
    except ValueError:
        return None  # (parse_url says what is wrong with it)
    a = "a listen URL" if listen else "a URL to connect to"
    if "@" in parts.netloc:
        return f"{a} has no user name or password" + ("" if listen else " (the token is the credential)")
    if "?" in url or "#" in url:
        return f"{quote_arg(url)}: {a} has no query or fragment"
    if parts.path not in ("", "/"):
        if http:
            return f"{quote_arg(url)}: an HTTP listen URL has no path (the API's paths are its own)"
        scheme = parts.scheme.lower()
        if scheme in ("tcp", "tls"):
            noun = "listen URL" if listen else "URL"
            return f"{quote_arg(url)}: a {scheme}:// {noun} has no path (paths are for ws:// and wss://)"
    return None


def parse_url(url: str, *, default_port: Optional[int] = None) -> Endpoint:
    """``tcp://127.0.0.1:7400``, ``tls://host:7401``, ``ws://host:7480/im``...
    A part that would be dropped (a user name, a query, a fragment, a path
    on tcp:// or tls://) is a ValueError (:func:`url_extra_problem`)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{quote_arg(url)}: scheme must be one of {', '.join(SCHEMES)}")
    problem = url_extra_problem(url)
    if problem is not None:
        raise ValueError(problem)
    if not parts.hostname:
        raise ValueError(f"{quote_arg(url)}: no host")
    try:
        parts.hostname.encode("idna")
    except UnicodeError:  # (a byte that is not UTF-8, a space...: the resolver's traceback)
        raise ValueError(f"{quote_arg(url)}: {quote_arg(parts.hostname)} is not a host name") from None
    try:
        port = parts.port
    except ValueError:  # (Python's "Port out of range 0-65535", "Port could not be cast to integer value as 'x'")
        given = parts.netloc.rpartition("]")[2].rpartition(":")[2]
        raise ValueError(f"{quote_arg(url)}: the port must be a number 0-65535, not {quote_arg(given)}") from None
    if port is None:
        port = default_port if default_port is not None else _DEFAULT_PORTS[scheme]
    return Endpoint(scheme, parts.hostname, port, parts.path or "/")


class StreamWrapper(trio.abc.Stream):
    """A stream over ``inner`` that passes everything through: subclasses
    watch what :meth:`receive_some` returns (the first bytes, the end) --
    the SDK's TLS-port detection, the server's WebSocket end watch."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def receive_some(self, max_bytes: Optional[int] = None) -> Union[bytes, bytearray]:
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: Union[bytes, bytearray, memoryview]) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


#: Close codes that end a WebSocket for a protocol error (RFC 6455 section
#: 7.4.1: 1002 protocol error, 1007 data not of its type, 1009 too big).
_PROTOCOL_CLOSES = frozenset((1002, 1007, 1009))


class WebSocketStream(trio.abc.Stream):
    """A trio-websocket connection as a byte stream of binary messages."""

    #: Bytes per WebSocket message.  Writers coalesce many frames into one
    #: send_all (megabytes at a login catch-up); a single message that large
    #: would exceed the peer's message-size limit and kill the connection.
    #: Frames are a byte stream here, so splitting anywhere is fine.  Small,
    #: because a browser sees nothing of a message before all of it came:
    #: the LoginAck at the head of a 64 KiB message took 16 s on a 4 KB/s
    #: link (past connect_timeout), and a link cutting before 64 KB never
    #: delivered it at all.
    MAX_MESSAGE = 8 * 1024
    #: What a peer's messages may be (above max_frame): what peers split
    #: their writes into, 64 KiB before MAX_MESSAGE was made small.
    MAX_PEER_MESSAGE = 64 * 1024
    #: Seconds a refused peer gets to answer the close handshake.
    CLOSE_WAIT = 2.0

    def __init__(self, ws: WebSocketConnection, max_message_size: Optional[int] = None) -> None:
        self.ws = ws
        self._pending = b""
        #: The peer's messages' limit once logged in (:meth:`logged_in`);
        #: None: the WebSocket's own, unchanged.
        self._max_message_size = max_message_size

    def logged_in(self) -> None:
        """The peer's login was granted: its messages may be as large as
        given at construction (the broker's max_frame), no longer held to
        the pre-login limit the WebSocket was opened with (BrokerServer._serve_ws)."""
        if self._max_message_size is not None and hasattr(self.ws, "_max_message_size"):
            # (trio-websocket 0.12 keeps the limit there and reads it per message.)
            self.ws._max_message_size = max(self.ws._max_message_size, self._max_message_size)

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
        else:
            data = b""
            while not data:  # an empty message is no end of stream: skip it
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed as exc:
                    closed = exc.reason
                    if closed is not None and closed.code in _PROTOCOL_CLOSES:
                        # A frame that broke RFC 6455 (or the peer's Close
                        # saying ours did): no hang-up, a protocol error,
                        # as the connection's close line says.
                        why = f": {closed.reason}" if closed.reason else ""
                        raise trio.BrokenResourceError(f"WebSocket protocol error ({closed.code}{why})") from None
                    return b""
                if isinstance(message, str):
                    # Text messages are not part of the protocol: a broken
                    # peer, rather than a guess at an encoding.  It is told
                    # why (1003: a kind of data this endpoint cannot take).
                    reason = "text WebSocket message; pimcore uses binary messages"
                    with trio.move_on_after(self.CLOSE_WAIT):  # a peer that never answers the close
                        await self.ws.aclose(code=1003, reason=reason)
                    raise trio.BrokenResourceError(reason)
                data = message
        if max_bytes is not None and len(data) > max_bytes:
            data, self._pending = data[:max_bytes], data[max_bytes:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        step = self.MAX_MESSAGE
        try:
            for i in range(0, len(view), step):
                await self.ws.send_message(bytes(view[i : i + step]))
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError("WebSocket closed") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:  # pragma: no cover - not used
        await self.aclose()

    async def aclose(self) -> None:
        await self.ws.aclose()
