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
from typing import Any, Optional, Union
from urllib.parse import urlsplit

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection

from ..ids import quote_arg

__all__ = ["Endpoint", "parse_url", "url_extra_problem", "WebSocketStream", "BoundedWebSocketConnection",
           "wrap_server_websocket", "SCHEMES"]

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
#: 7.4.1: 1002 protocol error, 1007 data not of its type, 1008 policy
#: violation -- BoundedWebSocketConnection's tiny frames --, 1009 too big).
_PROTOCOL_CLOSES = frozenset((1002, 1007, 1008, 1009))


class BoundedWebSocketConnection(WebSocketConnection):
    """The broker's side of a WebSocket (trio-websocket), the CPU its peer
    can make it spend per byte bounded.

    Each WebSocket frame costs a parse (wsproto) and an event's handling
    whatever its size, and trio-websocket's reader handles all the frames
    of one read (4 KiB) without a checkpoint: a connection that upgraded
    and never logged in sent 65,000 one-byte continuation frames (7 bytes
    each on the wire), ~585 frames between two checkpoints, and 16 such
    connections made an honest client's send wait 0.3-0.5 s (trial-o).
    Neither trio-websocket (0.12: max_message_size, message_queue_size,
    receive_buffer_size) nor wsproto (1.3) has a setting that bounds
    frames, hence this subclass (of the same private hooks the rest of
    this module reads: ``_max_message_size``; see wrap_server_websocket):

    * A message's frames but its last carry MIN_FRAGMENT bytes at least,
      before the login and after it (the SDKs send a message as one frame;
      libraries that fragment do so at kilobytes).  The first under it ends
      the connection with Close 1008 (policy violation) and a reason.
    * Until its Login is granted (:attr:`logged_in`), a connection sends
      PRE_LOGIN_MAX_FRAMES WebSocket frames at the most, of any kind (data,
      Ping, Pong): a Login is one message; tiny whole messages, Pings or
      unasked Pongs cost a parse each as fragments do.  The next: Close 1008.
    * Logged in, a peer's Pings and Pongs draw on a token bucket
      (CONTROL_BURST, refilled at CONTROL_RATE a second): past it, Close 1008.
    * Logged in, its data frames draw on another (MESSAGE_BURST, refilled at
      MESSAGE_RATE a second and by one per MESSAGE_BYTES of payload): past
      it the reader waits for tokens -- no Close, the peer is slowed (in a
      new user's trial 16 peers sending their bytes as one-byte messages
      moved an honest client's send p50 from ~2 ms to ~16 ms, then the
      broker worked through their backlog for minutes).
    * The reader checkpoints every YIELD_EVERY frames it handles (a logged-in
      peer's many tiny messages yield to the others regularly).

    The Close is not sent here: the connection's end is a protocol error's
    (WebSocketStream.receive_some), and BrokerServer._serve_ws sends its
    Close, then drops what the peer still sends for a while, as for a frame
    that broke RFC 6455 (_EndWatch.protocol_close), so that no reset
    overtakes it.
    """

    #: Least bytes in a frame of a message that is not its last.
    MIN_FRAGMENT = 1024
    #: WebSocket frames a connection may send before its Login is granted.
    PRE_LOGIN_MAX_FRAMES = 128
    #: Frames the reader handles between two checkpoints at the most.
    YIELD_EVERY = 64
    #: Pings and Pongs a logged-in peer may send: a token bucket of
    #: CONTROL_BURST, refilled at CONTROL_RATE a second.  The broker never
    #: pings a WebSocket (its heartbeat is the protocol's Ping frame), so a
    #: client's are at most a library's keep-alive; each costs a parse, and a
    #: Ping a Pong written back.  Past it: Close 1008.
    CONTROL_RATE = 16.0
    CONTROL_BURST = 64.0
    #: A logged-in peer's data frames (a message is usually one): each draws
    #: a token of a bucket of MESSAGE_BURST, refilled at MESSAGE_RATE a
    #: second and by one per MESSAGE_BYTES of payload received.  Empty, the
    #: reader waits until MESSAGE_WAKE tokens are due (no Close: the peer is
    #: slowed, TCP pushes back on it, and what is held is one read and a
    #: message).  A frame costs a parse, an event, a channel hop and a read
    #: of the core's whatever its size; a message of MESSAGE_BYTES pays for
    #: itself, so bulk traffic is never held (the Python SDK coalesces its
    #: writes into messages of up to 8 KiB, WebSocketStream.MAX_MESSAGE) --
    #: the spirit of the HTTP listener's chunk rule.  1 KiB, not 64 bytes:
    #: 16 peers sending 64-byte messages (free at 64) took 92% of the
    #: broker's core as one-byte ones did; at 1 KiB, 38%.  The JS SDK sent
    #: a message a protocol frame (SendReqs of a few dozen bytes): 8,000
    #: sends at once were held to ~530 a second after ~2 s (13 s in all);
    #: it now sends the frames of one tick as one message (153 messages,
    #: 4 s: the broker's send_rate).  A client sending small messages one
    #: at a time never waits below 512 a second.  MESSAGE_WAKE: a wait
    #: per token (a timer and a task switch every 2 ms a peer) was as dear
    #: as the messages (16 waiting peers: 53% of a core, 32% waking for 32).
    MESSAGE_RATE = 512.0
    MESSAGE_BURST = 1024.0
    MESSAGE_BYTES = 1024
    MESSAGE_WAKE = 32.0

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        #: The peer's Login was granted (WebSocketStream.logged_in).
        self.logged_in = False
        self._frames = 0  # frames handled (counted until the login)
        self._frame_bytes = 0  # the current data frame's bytes so far
        self._unyielded = 0  # frames handled since the reader's last checkpoint here
        self._control_tokens = self.CONTROL_BURST  # (after the login: Pings and Pongs)
        self._control_at = 0.0
        #: Data frames handled since the login (a message is usually one),
        #: and the times the reader waited for tokens (the bucket empty).
        self.data_frames = 0
        self.data_frames_waited = 0
        self._message_tokens = self.MESSAGE_BURST  # (full at the login: nothing drawn before it)
        self._message_at = 0.0  # (0: refilled to the burst at the first draw, whatever the clock)

    async def _frame_done(self) -> None:
        if not self.logged_in:
            self._frames += 1
            if self._frames > self.PRE_LOGIN_MAX_FRAMES:
                self._refuse(f"over {self.PRE_LOGIN_MAX_FRAMES} WebSocket frames before the Login")
        self._unyielded += 1
        if self._unyielded >= self.YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    def _refuse(self, reason: str) -> None:
        """End the connection with Close 1008 and ``reason`` (sent by
        _serve_ws): its reader stops (no more frames of it are looked at),
        and get_message raises ConnectionClosed with this reason."""
        self._close_reason = CloseReason(1008, reason)
        self._message_parts = []
        self._message_size = 0
        self._recv_channel.close()
        raise ConnectionClosed(self._close_reason)  # (the reader task's loop stops on it)

    async def _handle_message_event(self, event: Any) -> None:
        # (wsproto gives a frame in as many events as reads it came in.)
        self._frame_bytes += len(event.data)
        if event.frame_finished:
            size, self._frame_bytes = self._frame_bytes, 0
            if not event.message_finished and size < self.MIN_FRAGMENT:
                self._refuse(f"a message fragmented into frames under {self.MIN_FRAGMENT} bytes ({size}), not its last")
            if self.logged_in:
                self.data_frames += 1
                await self._pay_for_data_frame(size)
            await self._frame_done()
        await super()._handle_message_event(event)

    async def _pay_for_data_frame(self, size: int) -> None:
        """A logged-in peer's data frame of ``size`` payload bytes: one token
        of its bucket, waited for when there is none.  Waiting here, in the
        reader task, reads nothing more of the peer: what wsproto holds is
        one read (4 KiB), the kernel's buffers fill, TCP pushes back on the
        peer.  (The messages already queued for the core still flow: the
        wait is the reader's alone.)"""
        now = trio.current_time()
        tokens = min(self.MESSAGE_BURST, self._message_tokens + (now - self._message_at) * self.MESSAGE_RATE
                     + size / self.MESSAGE_BYTES)
        if tokens < 1.0:
            # Empty: wait until MESSAGE_WAKE tokens are due (62 ms at 512 a
            # second), then take that many frames without a wait (the reader
            # still yields every YIELD_EVERY frames).
            self.data_frames_waited += 1
            await trio.sleep((self.MESSAGE_WAKE - tokens) / self.MESSAGE_RATE)
            later = trio.current_time()
            tokens = min(self.MESSAGE_BURST, tokens + (later - now) * self.MESSAGE_RATE)
            now = later
        self._message_tokens = tokens - 1.0
        self._message_at = now

    def _control_frame(self) -> None:
        """A Ping or Pong of a logged-in peer: one token of its bucket
        (before the login every frame is counted instead)."""
        if not self.logged_in:
            return
        now = trio.current_time()
        if self._control_at:
            self._control_tokens = min(self.CONTROL_BURST,
                                       self._control_tokens + (now - self._control_at) * self.CONTROL_RATE)
        self._control_at = now
        if self._control_tokens < 1.0:
            self._refuse(f"WebSocket Pings and Pongs over {self.CONTROL_RATE:g} a second")
        self._control_tokens -= 1.0

    async def _handle_ping_event(self, event: Any) -> None:
        self._control_frame()
        await self._frame_done()
        await super()._handle_ping_event(event)

    async def _handle_pong_event(self, event: Any) -> None:
        self._control_frame()
        await self._frame_done()
        await super()._handle_pong_event(event)


async def wrap_server_websocket(nursery: trio.Nursery, stream: trio.abc.Stream, *,
                                max_message_size: int) -> WebSocketRequest:
    """trio_websocket.wrap_server_stream, its connection a
    BoundedWebSocketConnection (trio-websocket 0.11 and 0.12 build it the
    same way: the connection, its reader task, then the upgrade request)."""
    connection = BoundedWebSocketConnection(stream, WSConnection(ConnectionType.SERVER),
                                            max_message_size=max_message_size)
    nursery.start_soon(connection._reader_task)
    return await connection._get_request()


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
    #: A connection's messages start small and grow: each is at most the
    #: bytes the connection sent before it (at least RAMP_FIRST, at most
    #: MAX_MESSAGE), so one big write goes out as 256, 256, 512, 1 KiB ...
    #: 8 KiB.  The broker writes the LoginAck, the read states and the
    #: catch-up pushes at once, so with 8 KiB messages from the start the
    #: LoginAck came only with 8 KiB: a link that cuts (2% a 32-byte chunk:
    #: 0.6% of 8 KiB messages come whole, 85% of 256-byte ones) let a JS
    #: client reconnect 113 times in 41 s and never log in.  Small first
    #: messages bring the LoginAck whole, then what fits before the cut
    #: (at least about half the bytes sent before it came as whole
    #: messages).  Counted in bytes, not messages, so that small writes
    #: (a LoginAck or a Pong written alone) do not use up the small steps
    #: whatever the writer's pattern.  ~8 KiB in all: bulk throughput is
    #: that of MAX_MESSAGE (6 messages more a connection).  Never restarted
    #: after an idle time: the loss that matters is at the start (a cut
    #: makes a new connection, which ramps again), and what follows an idle
    #: time is a push or two, below MAX_MESSAGE anyway.  What it cannot do
    #: alone: a Push frame is decoded only once all of it came, so on that
    #: 2% link a JS client then logged in (171 times in 41 s, was 1) but
    #: still got ~10 messages while Push frames held up to push_batch (64)
    #: messages; the core's pushes now start at about 1 KiB a connection
    #: and grow (core.PUSH_RAMP_START: with Push frames of 4 messages, an
    #: experiment, it got 193 of 300).
    RAMP_FIRST = 256
    #: What a peer's messages may be (above max_frame): what peers split
    #: their writes into, 64 KiB before MAX_MESSAGE was made small.
    MAX_PEER_MESSAGE = 64 * 1024
    #: Seconds a refused peer gets to answer the close handshake.
    CLOSE_WAIT = 2.0

    def __init__(self, ws: WebSocketConnection, max_message_size: Optional[int] = None) -> None:
        self.ws = ws
        self._pending = b""
        self._sent = 0  # bytes sent so far (counted up to MAX_MESSAGE: the ramp)
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
        if isinstance(self.ws, BoundedWebSocketConnection):
            self.ws.logged_in = True  # no more frames counted (the small-fragment rule stays)

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
        i = 0
        try:
            while i < len(view):
                # The ramp is the connection's, not a write's: a LoginAck
                # written alone counts, the catch-up after it goes on from
                # there.
                sent = self._sent
                step = self.MAX_MESSAGE if sent >= self.MAX_MESSAGE else max(self.RAMP_FIRST, sent)
                message = bytes(view[i : i + step])
                await self.ws.send_message(message)
                i += len(message)
                if sent < self.MAX_MESSAGE:
                    self._sent = sent + len(message)
        except ConnectionClosed as exc:
            raise trio.BrokenResourceError("WebSocket closed") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:  # pragma: no cover - not used
        await self.aclose()

    async def aclose(self) -> None:
        await self.ws.aclose()
