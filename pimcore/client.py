"""The client SDK (trio): reliable sends, exactly-once delivery, read state.

::

    async with open_client("tcp://127.0.0.1:7400", token, device="phone") as c:
        sent = await c.send(direct_conversation("alice", "bob"), b"hello")
        async for event in c.events():
            ...

This module is a thin trio driver.  Every protocol rule lives in the sans-IO
:class:`pimcore.client_session.ClientSession` (one per :class:`Client`, for
the client's whole life): the driver dials (tcp, tls, ws, wss) and redials
with jittered exponential backoff, moves bytes between the stream and the
session, sleeps until ``session.next_deadline()``, and wakes the tasks waiting
in :meth:`Client.send`, :meth:`Client.fetch_history` and
:meth:`Client.events`.  It never looks at a frame.

What the SDK promises, and how
------------------------------
* **Upstream.**  Every message gets a local id (unique per device, also
  across restarts: it starts from the µs clock).  ``send`` returns only once
  the broker's SendAck says the message is durable.  Until then the SendReq
  is sent again with the *same* local id after every reconnect (never twice
  on one connection: TCP delivers it and the broker answers every request it
  reads; a silent broker is found by the heartbeat); the broker dedupes, so a retry can never store a second
  copy.  After ``send_timeout`` the caller gets :class:`SendTimeout` (the
  message may still have been stored: retrying with ``local_id=`` of the
  error is safe).  Refusals that ask to slow down (RATE_LIMITED,
  TOO_MANY_IN_FLIGHT) hold the queue for about the time the broker's token
  bucket needs, one congestion event per window of refusals; a failure on
  the broker's side (STORE_UNAVAILABLE, INTERNAL) is also reported in
  :meth:`Client.events` as :class:`SendsStalled`, then :class:`SendsResumed`.
* **Downstream.**  Messages come out of :meth:`Client.events` in inbox
  order.  Each message is acknowledged (cumulatively, batched) up to its
  inbox position once the application has *taken* it -- also one in the
  middle of a Push that carried many -- so a crash of the app can never
  lose a message it did not see, and leaving the ``async with`` block acks
  what was taken.  On reconnect the client resumes
  from what it took; re-pushed messages it already has are dropped by
  position.
* **Time.**  At each login the SDK takes several calibration samples (CalibrateReq) and keeps
  the offset of the one with the smallest round trip (its error is bounded
  by half that RTT).  Outgoing messages are stamped with the calibrated
  local time, never going backwards; :meth:`Client.server_now` estimates the
  broker's clock.  The device clock defaults to an :class:`AnchoredClock`
  (the wall clock at the start plus monotonic time): a wall clock stepped
  while the client runs fires no deadline early.
* **Liveness.**  A Ping when nothing was received, nothing was sent, or
  nothing answered what was sent for a heartbeat period; a Ping without its
  Pong within the period (pushes that keep coming are no answer: the way up
  may be dead), or nothing at all received for ``dead_after`` heartbeat
  periods, and the connection is presumed dead and replaced (jittered
  exponential backoff).
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import random
import re
import socket
import sys
import ssl
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional, Sequence, Union
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionRejected, HandshakeError, wrap_client_stream

from . import frames as F
from .client_session import _check_timeout  # (argument checks shared with the session)
from .client_session import (
    AuthFailed,
    ClientClosed,
    LOGIN_TIMED_OUT,
    MALFORMED,
    ClientConfig,
    ClientError,
    ClientSession,
    ClientStatistics,
    Completion,
    ConnectFailed,
    Connected,
    Disconnected,
    Event,
    HistoryCompleted,
    ReadersCompleted,
    ConversationsCompleted,
    ConversationSetCompleted,
    ConversationUpdated,
    ConversationPurged,
    HistoryTimeout,
    MessageAmended,
    MessageReceived,
    ReadStateChanged,
    ReceiptReceived,
    ReconnectBackoff,
    Resynced,
    SendCompleted,
    SendError,
    Sent,
    SendsResumed,
    SendsStalled,
    BrokerRefused,
    SendTimeout,
    SessionState,
    TypingChanged,
    PresenceChanged,
    PrivacyChanged,
    PresenceCompleted,
    PrivacyCompleted,
)
from .clock import elapsed_ns as _elapsed_ns
from .codec import DEFAULT_MAX_FRAME_SIZE
from .errors import CloseCode
from .ids import id_problem
from .net.streams import Endpoint, StreamWrapper, WebSocketStream, parse_url
from ._util import BaseExceptionGroup, first_leaf, unwrap_single

__all__ = [
    "open_client",
    "AnchoredClock",
    "Client",
    "ClientConfig",
    "ClientStatistics",
    "Sent",
    "HistoryPage",
    "MessageReceived",
    "MessageAmended",
    "ReadStateChanged",
    "ReceiptReceived",
    "Connected",
    "Disconnected",
    "Resynced",
    "ConversationUpdated",
    "ConversationPurged",
    "ConversationsPage",
    "SendsStalled",
    "SendsResumed",
    "BrokerRefused",
    "TypingChanged",
    "PresenceChanged",
    "PrivacyChanged",
    "Event",
    "ClientError",
    "SendError",
    "SendTimeout",
    "AuthFailed",
    "ClientClosed",
    "ConnectFailed",
]

log = logging.getLogger("pimcore.client")

TokenSource = Union[str, bytes, Callable[[], Union[str, bytes, Awaitable[Union[str, bytes]]]]]

#: How a byte stream fails: each ends one connection, none ends the client.
_IO_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, HandshakeError, ConnectionRejected)
#: ... and what else can end an attempt before the session has the stream.
_DISCONNECTS = _IO_ERRORS + (trio.TooSlowError,)


def _check_u64(call: str, name: str, value: object) -> None:
    """A seq argument: an int in 0..2**64-1, else ValueError naming the
    call, the argument and the range (not the encoder's words)."""
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise ValueError(f"{call}: {name} must be an int in 0..2**64-1, got {value!r:.40}")


def _check_limit(call: str, limit: object) -> None:
    """A page size: an int >= 1 (and one a frame can carry)."""
    if type(limit) is not int or not 1 <= limit < 1 << 64:
        raise ValueError(f"{call}: limit must be an int >= 1, got {limit!r:.40}")

class _SessionEnded(Exception):
    """The session ended the connection itself (a Close from the broker,
    malformed bytes, a timeout): why, for the reconnect loop."""

    def __init__(self, code: Optional[CloseCode], reason: str) -> None:
        super().__init__(f"Close {code.name}: {reason}" if code is not None else reason)
        self.code = code
        self.reason = reason


class _FirstBytes(StreamWrapper):
    """A stream that remembers the first bytes it received and whether it
    saw the end: a TLS port answers a plain WebSocket upgrade request with a
    TLS alert (0x15 0x03) or a hang-up, a pimcore tcp:// (tls://) port with
    a Close frame, another service's port (SSH, SMTP) with text of its
    own, never an HTTP response."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.first = b""
        self.eof = False
        #: The stream broke (a reset) while the request was written or its answer awaited.
        self.broke = False
        #: Called when the stream ends or breaks (see Client._open_stream).
        self.on_end: Optional[Callable[[], object]] = None

    async def send_all(self, data: Union[bytes, bytearray, memoryview]) -> None:
        # A reset while the upgrade request is written: trio-websocket's
        # reader then stops without waking the wait for the upgrade's
        # answer, which lasted connect_timeout ("no answer").
        try:
            await self.inner.send_all(data)
        except _IO_ERRORS:
            self.broke = True
            if self.on_end is not None:
                self.on_end()
            raise

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        try:
            data = await self.inner.receive_some(max_bytes)
        except _IO_ERRORS:
            self.broke = True
            if self.on_end is not None:
                self.on_end()
            raise
        if len(self.first) < _FIRST_BYTES:
            self.first += data[: _FIRST_BYTES - len(self.first)]
            self.eof = self.eof or not data
            if not self.could_be_http:
                # A TLS alert, a pimcore frame, a banner, any binary: no
                # HTTP response begins so.  The WebSocket's parser would
                # wait for a line end (a blank one, after a banner: until
                # connect_timeout) or fail with an error of its own (h11's
                # LocalProtocolError, escaping from trio-websocket's reader
                # task).  Kept in ``first``, it ends the stream here -- once
                # enough of it came to tell text from binary: a banner may
                # arrive in pieces (the connect's timeout bounds the wait).
                try:
                    while not self.eof and len(self.first) < _TEXT_MIN and _is_text(self.first, short=True):
                        more = await self.inner.receive_some(max_bytes)
                        self.first += more[: _FIRST_BYTES - len(self.first)]
                        self.eof = not more
                except _IO_ERRORS:
                    self.eof = True
                data = b""
        if not data and self.on_end is not None:
            self.on_end()
        return bytes(data)

    @property
    def looks_like_tls(self) -> bool:
        """A TLS record (an alert): a TLS port's answer (see _tls_record)."""
        return _tls_record(self.first)

    @property
    def looks_like_pimcore(self) -> bool:
        return _pimcore_frame_start(self.first)

    @property
    def could_be_http(self) -> bool:
        """The bytes so far begin "HTTP/" (or are as much of it as came)."""
        return b"HTTP/".startswith(self.first[:5])

    @property
    def looks_like_other(self) -> bool:
        """Neither HTTP nor a TLS alert nor pimcore's Close: another
        service's banner, error or binary greeting."""
        return not (self.could_be_http or _tls_record(self.first) or self.looks_like_pimcore)


class _Handshake(StreamWrapper):
    """Under a TLS stream: the first bytes received, while the handshake
    runs.  A TLS client at a plain port gets WRONG_VERSION_NUMBER from the
    ssl module, which keeps no bytes; these tell whose plain answer it was
    (pimcore's HTTP API names itself in its 400).  After the handshake it
    passes everything through."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.first = b""
        self.keeping = True

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if self.keeping and len(self.first) < _HANDSHAKE_BYTES:
            self.first += data[: _HANDSHAKE_BYTES - len(self.first)]
        return bytes(data)


#: Bytes of a plain answer to a TLS handshake kept (an HTTP 400's head and body).
_HANDSHAKE_BYTES = 512

#: Bytes of an answer kept to tell what answered: a TLS alert (2), "HTTP/"
#: (5), a pimcore frame's length, head and type (<= 7).
_FIRST_BYTES = 8


def _tls_record(first: bytes) -> bool:
    """``first`` begins a TLS alert record (0x15, then version 3.x): how a
    TLS port answers plain text (pimcore's tls:// and wss:// listeners do).
    The only evidence of a TLS port taken: a hang-up or a reset with
    nothing read is also a load balancer with no broker behind it yet, a
    broker stopping, or another service dropping what it cannot parse
    (mosquitto resets a Login, redis-server hangs up on an HTTP request).
    (A handshake record, 0x16, is no server's answer to plain text: a
    service that speaks first, another service's port.)"""
    return first[:1] == b"\x15" and first[1:2] in (b"", b"\x03")


def _frame_length(first: bytes) -> Optional[tuple[int, bytes]]:
    """The length prefix of the frame ``first`` begins (a LEB128 varint of
    1-5 bytes) and the bytes after it; None if the prefix is not complete
    in ``first`` (or runs past 5 bytes)."""
    length = shift = 0
    for i, b in enumerate(first[:5]):
        length |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return length, first[i + 1:]
    return None


def _pimcore_frame_start(first: bytes) -> bool:
    """``first`` begins a pimcore frame the way a broker answers a stranger:
    a Close (its length, a varint of 1-5 bytes, >= 2; its head, a protocol
    version in the high nibble; the type CLOSE).  "HTTP/", a TLS alert or
    any text never does (its third byte would be 0x11)."""
    head = _frame_length(first)
    if head is None:
        return False
    length, rest = head
    return length >= 2 and len(rest) >= 2 and rest[0] >> 4 != 0 and rest[1] == F.FrameType.CLOSE


#: Bytes of text that make an answer text rather than binary (_is_text).
_TEXT_MIN = 4


def _is_text(first: bytes, *, short: bool = False) -> bool:
    """``first`` (the first bytes a server sent, up to _FIRST_BYTES) is
    printable ASCII text, at least _TEXT_MIN bytes (any length if
    ``short``): another service's banner or error.  A pimcore frame never
    is: its head byte holds the protocol version, its type byte is below
    0x20."""
    return (short or len(first) >= _TEXT_MIN) and all(0x20 <= b < 0x7F or b in b"\t\r\n" for b in first)


def _could_be_broker(first: bytes) -> bool:
    """``first`` could begin a broker's first frame to a client: its
    length (a varint of 1-5 bytes, >= 2), its head (a protocol version in
    the high nibble, any version) and a type a broker answers a Login
    with (LoginAck, Error, Close).  Fewer bytes than that: it could."""
    head = _frame_length(first)
    if head is None:
        return len(first) < 5
    length, rest = head
    if length < 2 or (rest and rest[0] >> 4 == 0):
        return False
    return len(rest) < 2 or rest[1] in (F.FrameType.LOGIN_ACK, F.FrameType.ERROR, F.FrameType.CLOSE)


def _other_service(first: bytes) -> str:
    """How the first connection's refusal says ``first`` (what a server
    that is not a pimcore broker answered with): quoted if text, in hex if
    binary."""
    if _is_text(first):
        shown = first.decode("ascii").replace("\r", "\\r").replace("\n", "\\n")
        said = f"in text ('{shown}...')"
    else:
        said = f"in binary ({first.hex(' ')}{' ...' if len(first) >= _FIRST_BYTES else ''})"
    return f"the server answered {said}, not in pimcore's protocol: is it another service's port?"


#: A Login frame above this many bytes is no usual one (a JWT is a few
#: hundred): a connection broken while it was written may be a broker's
#: max_frame below it (see Client._connect_loop).
_LARGE_LOGIN = 16 * 1024


class _LoginTooLarge(Exception):
    """A Login for this token could be over the frame limit (the token is
    too large): never sent, since the broker would close every attempt
    (FRAME_TOO_LARGE).  ConnectFailed at once: raised on the first
    connection, the client's terminal error on a later one."""


class _NoAnswer(trio.TooSlowError):
    """connect_timeout passed while the server, connected, said nothing to
    ``what`` (the TLS handshake, the WebSocket upgrade), as the Login's
    LOGIN_TIMED_OUT says for tcp://."""

    def __init__(self, what: str) -> None:
        super().__init__(f"no answer to {what} (is it a pimcore broker?)")
        self.what = what


class _WrongPort(OSError):
    """The first connection's answer says it is the wrong kind of port (HTTP
    to a Login, a pimcore frame to an upgrade request): ``hint`` is the URL
    to try.  It will not change: ConnectFailed at once."""

    def __init__(self, what: str, hint: str) -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint

    def __str__(self) -> str:
        return self.what


class _Conn:
    """The driver's side of one connection: the stream and its writer's state."""

    __slots__ = ("stream", "wake", "writing", "ended", "settled", "base", "error", "first", "login_written")

    def __init__(self, stream: trio.abc.Stream, base: int) -> None:
        self.stream = stream
        self.wake = trio.Event()  # the session may have bytes for the writer
        self.writing = False
        self.ended = trio.Event()  # the session's connection is over
        self.settled = trio.Event()  # ACTIVE or ended, whichever first
        self.base = base  # session.connections_established before this one
        self.error: Optional[BaseException] = None  # the stream's failure, if that ended it
        self.first = b""  # the first bytes received (a TLS alert starts 0x15 0x03, HTTP with "HTTP/")
        self.login_written = False  # the first write (the Login) went out whole


class _Waiter:
    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: Optional[Completion] = None


#: The last µs of the year 9999: a device clock above it is in ns (or worse).
#: (Not a check for ms: a device whose clock lost its battery reads 1970.)
_CLOCK_MAX = 253_402_300_799_999_999


class AnchoredClock:
    """The SDK's default device clock (µs): the wall clock read once, when the
    clock is made, plus the monotonic time elapsed since.

    Why not the wall clock itself: the session runs every deadline (send
    timeouts, the heartbeat, dead-link detection, backoff holds) on the clock
    it is given, so a wall clock stepped *forward* while the client runs (NTP,
    the user, a phone leaving airplane mode) would fire them all at once --
    pending sends would fail with SendTimeout and a live link would be
    declared dead.  A step after the start is ignored instead.

    Why it starts from the wall clock: local ids start from it to stay unique
    across restarts of the app, and message stamps are this clock plus the
    offset calibrated against the broker at each login, so a clock that is
    off (or is corrected while the client runs) still stamps broker-calibrated
    times: the offset is measured against this clock, not against the wall.
    What a correction while running changes: :meth:`Client.local_now` and the
    device-clock times in events (typing ``expires``, ``SendsStalled.since``)
    keep following this clock, not the corrected wall clock, until the app
    makes a new client; compare them with ``local_now()``.  A new client
    starts from the corrected wall clock (and its local ids from there: a
    correction *backwards* across a restart is the limit docs/CLIENT.md
    describes, as before).  Where the monotonic source stops during a
    suspend (not Linux), stamps lag by the time asleep until the next login
    recalibrates (after a long sleep the link is usually dead and replaced)."""

    __slots__ = ("_wall0", "_mono0")

    def __init__(self) -> None:
        self._mono0 = _elapsed_ns()
        self._wall0 = time.time_ns()

    def __call__(self) -> int:
        return (self._wall0 + _elapsed_ns() - self._mono0) // 1000

    def __repr__(self) -> str:
        return f"<AnchoredClock wall0={self._wall0 // 1000} µs>"


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A page of history (:meth:`Client.fetch_page`): ``messages`` in the
    order asked, and ``more`` when the page stopped before the end."""

    messages: list[F.Message]
    more: bool


@dataclass(frozen=True, slots=True)
class ConversationsPage:
    """A page of the conversation list (:meth:`Client.conversations`):
    ``entries`` in list order, ``cursor`` for the next page, ``more``."""

    entries: list[F.ConvEntry]
    cursor: bytes
    more: bool


_TOKEN_EXPECTED = ("str or bytes (from `pimcore token --user USER` or pimcore.auth.issue_token), or a callable"
                   " returning one (or an awaitable of one)")
#: Where a token comes from, for the refusal of an empty one.
_TOKEN_FROM = "(from `pimcore token --user USER` or pimcore.auth.issue_token)"


def _check_arguments(url: Any, token: Any, device: Any) -> None:
    """TypeError at the call, saying what is expected, for an argument of
    open_client of the wrong type: ``token=None`` was a bare "object
    NoneType can't be used in 'await' expression" from deep inside, a
    ``device`` of None the codec's "field 'device': expected str".
    ValueError for an empty token (``""`` was sent, and refused by the
    broker as "token is invalid: Not enough segments") and for a malformed
    device id."""
    if not isinstance(url, str):
        raise TypeError(f"open_client: url must be a str (tcp://HOST:PORT, tls://, ws://HOST:PORT/PATH or wss://),"
                        f" not {type(url).__name__}")
    if not (isinstance(token, (str, bytes)) or callable(token)):
        raise TypeError(f"open_client: token must be a {_TOKEN_EXPECTED}, not {type(token).__name__}")
    if isinstance(token, (str, bytes)) and len(token) == 0:
        raise ValueError(f"open_client: token cannot be empty: give a token {_TOKEN_FROM}")
    if not isinstance(device, str):
        raise TypeError(f"open_client: device must be a str (a device id, e.g. \"phone\"), not {type(device).__name__}")
    problem = id_problem(device, "device")
    if problem is not None:
        # (The broker refuses it at login, which the client said as
        # AuthFailed -- "authentication", sending an app to fetch a new
        # token: a new user's trial.)
        raise ValueError(f"open_client: {problem}")


def _check_seconds(call: str, timeout: object) -> None:
    """A ``timeout`` of None or s >= 0, checked before it is made µs
    (TypeError, ValueError: client_session._check_timeout)."""
    _check_timeout(call, timeout, "s")


class Client:
    """A connected client.  Create with :func:`open_client`."""

    def __init__(
        self,
        url: str,
        token: TokenSource,
        device: str,
        *,
        config: ClientConfig = ClientConfig(),
        ssl_context: Optional[ssl.SSLContext] = None,
        clock: Optional[Callable[[], int]] = None,
        seed: Optional[int] = None,
        position: int = 0,
        epoch: bytes = b"",
        on_connect_retry: Optional[Callable[[str], None]] = None,
        sent: int = 0,
    ) -> None:
        _check_arguments(url, token, device)
        if not isinstance(config, ClientConfig):
            raise TypeError(f"open_client: config must be a ClientConfig, not {type(config).__name__}")
        if on_connect_retry is not None and not callable(on_connect_retry):
            raise TypeError(f"open_client: on_connect_retry must be a callable taking the reason (a str) or None, "
                            f"not {type(on_connect_retry).__name__}")
        self.endpoint: Endpoint = parse_url(url)
        self.url = url
        # What a refusal names: the URL, and the host:port tried when the
        # URL leaves the port to the default ("tcp://127.0.0.1" -> 7400).
        self._where = url
        if urlsplit(url).port is None:
            ep = self.endpoint
            host = f"[{ep.host}]" if ":" in ep.host else ep.host
            self._where = f"{url} ({host}:{ep.port}, the default port of {ep.scheme}://)"
        self.device = device
        self.config = config
        self._token = token
        self._ssl = ssl_context
        self._on_connect_retry = on_connect_retry
        #: The device clock (µs): ``clock`` if given, else an AnchoredClock.
        if clock is not None:
            # (Asked once now: time.time -- float seconds -- failed only at
            # the first send, far from the call that gave it: a trial.)
            if not callable(clock):
                raise TypeError(f"open_client: clock must be a callable returning µs (an int), not {type(clock).__name__}")
            first = clock()
            if not isinstance(first, int) or isinstance(first, bool):
                raise TypeError(f"open_client: clock must return µs as an int (e.g. time.time_ns() // 1000), not"
                                f" {type(first).__name__} {first!r}")
            if first < 1:  # (0 or below hung sends, or restarted local ids at 1 on every run: a trial)
                raise ValueError(f"open_client: clock must return µs since 1970 (>= 1), not {first}")
            if first > _CLOCK_MAX:  # (ns was taken: deadlines ran 1000x fast, stamps years ahead -- a trial)
                raise ValueError(f"open_client: clock must return µs since 1970, not ns: {first} is after the year 9999"
                                 " (e.g. time.time_ns() // 1000)")
        self._clock: Callable[[], int] = AnchoredClock() if clock is None else clock
        self._rng = random.Random(seed)
        self._session = ClientSession(device, config, seed=seed, position=position, epoch=epoch, sent=sent)

        self._conn: Optional[_Conn] = None
        self._closed = False
        self._ever_connected = False
        #: The last first-connection attempt's answer if a TLS record (see _serve), else b"".
        self._tls_answer = b""
        #: The first bytes of the last first-connection attempt's answer, if
        #: they were another service's (text or binary that begins no frame
        #: a broker sends first, or, on ws://, no HTTP: see _serve,
        #: _connect_once).
        self._other_answer: Optional[bytes] = None
        #: A ws:// connection's stream while its upgrade is under way (_connect_once).
        self._upgrade_answer: Optional[_FirstBytes] = None
        #: The last TLS connection's plain answer to its handshake (see _Handshake).
        self._handshake_answer: Optional[_Handshake] = None
        #: What _open_stream waits for an answer to, once connected (None: the connect itself).
        self._dialing: Optional[str] = None
        #: The last Login's frame length and its token's, for what a failed
        #: first connection says (see _connect_loop).
        self._login_sizes = (0, 0)
        #: The last attempt broke while its Login was being written, nothing
        #: received: a broker whose max_frame the Login is over may close so
        #: (its Close lost to the reset).  Said when the first connection fails.
        self._login_broke = False
        self._last_state = self._session.state
        self._state_changed = trio.Event()  # replaced after each change
        self._events_ready = trio.Event()
        self._rearm = trio.Event()  # the session's next deadline may have moved
        self._armed: Optional[int] = None
        self._send_waiters: dict[int, _Waiter] = {}
        self._history_waiters: dict[int, _Waiter] = {}

    # ------------------------------------------------------------ the session's state

    @property
    def user(self) -> str:
        return self._session.user

    @property
    def epoch(self) -> bytes:
        """The broker history ``taken_upto`` belongs to (save both to resume)."""
        return self._session.epoch

    @property
    def taken_upto(self) -> int:
        """The highest inbox position the app has taken from :meth:`events`."""
        return self._session.taken_upto

    @property
    def sent_upto(self) -> int:
        """The highest inbox position of this device's own sends (save it
        with ``taken_upto`` and ``epoch``: :attr:`ClientSession.sent_upto`)."""
        return self._session.sent_upto

    @property
    def read_states(self) -> dict[str, F.ReadState]:
        return self._session.read_states

    @property
    def receipts(self) -> dict[tuple[str, str], int]:
        """(conv, reader) -> seq."""
        return self._session.receipts

    def local_now(self) -> int:
        return self._clock()

    def server_now(self) -> int:
        """The broker's clock as estimated at the last login (µs)."""
        return self._session.server_now(self._clock())

    @property
    def clock_offset(self) -> int:
        return self._session.clock_offset

    def read_state(self, conv: str) -> F.ReadState:
        return self._session.read_state(conv)

    def unread(self, conv: str) -> int:
        return self._session.unread(conv)

    def receipt(self, conv: str, reader: str) -> int:
        """How far ``reader`` has read ``conv`` (1:1 read receipt), 0 if unknown."""
        return self._session.receipt(conv, reader)

    def view(self, conv: str) -> list[F.Message]:
        """The messages of ``conv`` this client has (sent, received, fetched),
        in display order: one sender's by their local time, senders
        interleaved by server time -- the same on every device."""
        return self._session.view(conv)

    @property
    def connected(self) -> bool:
        return self._session.state is SessionState.ACTIVE and not self._closed

    def statistics(self) -> ClientStatistics:
        return self._session.statistics()

    # ------------------------------------------------------------ the pump

    def _pump(self) -> None:
        """After every call into the session: hand out what it produced.
        Completions wake their waiters, events wake consumers, bytes wake the
        writer, a moved deadline wakes the timer, an ended connection wakes
        the connection's supervisor."""
        s = self._session
        for c in s.completions():
            if isinstance(c, SendCompleted):
                w = self._send_waiters.pop(c.local_id, None)
            else:
                w = self._history_waiters.pop(c.req_id, None)
            if w is not None:  # else nobody waits any more (a cancelled caller)
                w.outcome = c
                w.done.set()
        if s.has_events or s.state is SessionState.CLOSED:
            self._events_ready.set()
        conn = self._conn
        if conn is not None:
            if s.has_data_to_send:
                conn.wake.set()
            if not s.connection_open:
                conn.ended.set()
                conn.settled.set()
            elif s.connections_established > conn.base:
                conn.settled.set()
        if s.connections_established:
            self._ever_connected = True
        if s.state is not self._last_state:
            self._last_state = s.state
            self._state_changed.set()
            self._state_changed = trio.Event()
        if s.next_deadline() != self._armed:
            self._rearm.set()

    async def _timer_loop(self) -> None:
        """Sleep until the session's next deadline, then let it act.  Runs for
        the client's whole life: sends time out while disconnected too."""
        s = self._session
        while True:
            self._rearm = trio.Event()
            deadline = self._armed = s.next_deadline()
            if deadline is None:
                await self._rearm.wait()
                continue
            delay = (deadline - self._clock()) / 1e6
            if delay > 0:
                with trio.move_on_after(delay):
                    await self._rearm.wait()
                if self._rearm.is_set():
                    continue  # the deadline moved: look again
            s.handle_timer(self._clock())
            self._pump()
            await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------ upstream

    async def send(
        self, conv: str, payload: bytes, *, local_id: Optional[int] = None, timeout: Optional[float] = None,
        mentions: Optional[Sequence[str]] = (), mention_all: bool = False,
    ) -> Sent:
        """Send and wait for the durable SendAck.  Raises SendError (refused),
        SendTimeout (deadline: ``timeout`` s, default ``send_timeout``),
        AuthFailed/ClientClosed (client stopped).  ``mentions`` (user ids)
        and ``mention_all`` ("everyone"): see :meth:`ClientSession.send`
        (SendError TOO_MANY_MENTIONS / BAD_MENTION).  With the ``local_id``
        of a send still pending (in another task) it waits for that send's
        outcome if the message is the same (a retry); a different message
        raises ValueError at once, nothing sent (a local id names one
        message)."""
        self._check_alive()
        _check_seconds("send", timeout)
        lid = self._session.send(conv, payload, self._clock(), local_id=local_id, timeout=None if timeout is None else int(timeout * 1e6),
                                 mentions=mentions, mention_all=mention_all)
        w = self._send_waiters.get(lid)
        if w is None:
            w = self._send_waiters[lid] = _Waiter()
        self._pump()
        await w.done.wait()
        c = w.outcome
        assert isinstance(c, SendCompleted)
        if c.error is not None:
            raise c.error
        assert c.result is not None
        return c.result

    async def _amend(self, conv: str, target: int, action: int, payload: bytes, local_id: Optional[int], timeout: Optional[float]) -> Sent:
        self._check_alive()
        _check_seconds("amend", timeout)
        lid = self._session.amend(
            conv, target, action, self._clock(), payload=payload, local_id=local_id,
            timeout=None if timeout is None else int(timeout * 1e6),
        )
        w = self._send_waiters.get(lid)
        if w is None:
            w = self._send_waiters[lid] = _Waiter()
        self._pump()
        await w.done.wait()
        c = w.outcome
        assert isinstance(c, SendCompleted)
        if c.error is not None:
            raise c.error
        assert c.result is not None
        return c.result

    async def recall(self, conv: str, seq: int, *, local_id: Optional[int] = None, timeout: Optional[float] = None) -> Sent:
        """Recall our message at ``seq`` of ``conv`` for everyone (its
        payload is gone from the broker) and wait until that is durable.
        Returns the RECALL entry's Sent; raises SendError (NOT_SENDER,
        TOO_LATE, RECALLED, NO_SUCH_MESSAGE, ...) and otherwise as
        :meth:`send` (retried across reconnects with the same local id).
        ``seq`` must be an int in 1..2**64-1: TypeError / ValueError at once,
        nothing sent (likewise for :meth:`edit` and :meth:`delete_for_me`)."""
        return await self._amend(conv, seq, F.MessageKind.RECALL, b"", local_id, timeout)

    async def edit(self, conv: str, seq: int, payload: bytes, *, local_id: Optional[int] = None, timeout: Optional[float] = None) -> Sent:
        """Replace the payload of our message at ``seq`` of ``conv`` for
        everyone; as :meth:`recall` otherwise."""
        return await self._amend(conv, seq, F.MessageKind.EDIT, payload, local_id, timeout)

    async def delete_for_me(self, conv: str, seq: int, *, local_id: Optional[int] = None, timeout: Optional[float] = None) -> Sent:
        """Delete the message at ``seq`` of ``conv`` (anyone's) for this user
        only: their other devices learn it, history then returns it with
        ``deleted`` set and no payload.  ``Sent.seq`` is 0 (it takes no seq
        of the conversation); as :meth:`recall` otherwise."""
        return await self._amend(conv, seq, F.MessageKind.DELETE, b"", local_id, timeout)

    # ------------------------------------------------------------ downstream

    async def events(self) -> AsyncIterator[Event]:
        """Everything that happens, in order.  Taking a MessageReceived from
        this iterator is what lets the SDK acknowledge it.  After the client
        closed it still yields what had arrived before, then ends; a message
        taken then is acknowledged to nobody, so the next login of the device
        gets it again (at least once, never lost)."""
        s = self._session
        while True:
            ev = s.next_event(self._clock())
            if ev is None:
                if self._closed:
                    return
                if s.state is SessionState.CLOSED:
                    if s.error is not None and not isinstance(s.error, ClientClosed):
                        raise s.error
                    return
                if self._events_ready.is_set():
                    self._events_ready = trio.Event()
                await self._events_ready.wait()
                continue
            self._pump()  # taking may have started the PushAck timer
            yield ev

    async def messages(self) -> AsyncIterator[F.Message]:
        """Only the messages of :meth:`events` (other events are dropped)."""
        async for ev in self.events():
            if isinstance(ev, MessageReceived):
                yield ev.message

    async def receive(self) -> F.Message:
        """The next message (other events are dropped)."""
        async for m in self.messages():
            return m
        raise ClientClosed("client closed")  # pragma: no cover

    # ------------------------------------------------------------ read state & history

    async def mark_read(self, conv: str, seq: int) -> None:
        """Move this user's read marker of ``conv`` to ``seq`` (never back).
        The broker confirms with a ReadStates; other devices get one too and
        the 1:1 peer a ReadReceipt.  Until confirmed, the marker is sent
        again after every reconnect.  Raises SendError at once, sending
        nothing, for what the SDK knows the broker refuses: BAD_REQUEST (a
        malformed conversation id), NOT_MEMBER (a 1:1 id without this
        user); EncodeError for values no Read can carry; AuthFailed /
        ClientClosed (client stopped).  A Read carries no request id, so
        the broker's refusal of a group (NOT_MEMBER, UNKNOWN_CONVERSATION)
        cannot be tied to this call: it comes as a :class:`BrokerRefused`
        event (and such a marker is sent again after each reconnect, and
        refused again).  ValueError (nothing sent) for a ``seq`` that is not
        an int in 0..2**64-1."""
        _check_u64("mark_read", "seq", seq)
        self._check_alive()
        self._session.mark_read(conv, seq, self._clock())
        self._pump()
        await trio.lowlevel.checkpoint()

    async def fetch_history(self, conv: str, from_seq: int = 0, limit: int = 100, *, backward: bool = False) -> list[F.Message]:
        """A page of ``conv``'s stored history (also added to :meth:`view`):
        forward, the messages *after* ``from_seq`` (seq > from_seq,
        ascending: the next page is from the last seq of this one); with
        ``backward``, those before it (seq < from_seq, descending; 0 = from
        the newest).  At most ``limit`` (>= 1; the broker caps it at its
        ``history_page``).  The page may hold fewer than ``limit`` messages
        before the end (cut to fit one frame): use :meth:`fetch_page` to
        know whether more follow.  Raises ValueError for a ``limit`` < 1,
        SendError with the broker's code, trio.TooSlowError after
        ``send_timeout``, AuthFailed/ClientClosed (client stopped); ValueError
        for a ``from_seq`` outside 0..2**64-1."""
        return (await self.fetch_page(conv, from_seq, limit, backward=backward)).messages

    async def fetch_page(self, conv: str, from_seq: int = 0, limit: int = 100, *, backward: bool = False) -> HistoryPage:
        """As :meth:`fetch_history`, with whether more follow: page on from
        the last seq of the page while ``more`` (not while the page is full:
        a page of big messages is cut short to fit one frame)."""
        _check_u64("fetch_history", "from_seq", from_seq)
        _check_limit("fetch_history", limit)  # (the broker took 0 as 1: the handle and HTTP refuse it)
        self._check_alive()
        s = self._session
        req = s.request_history(conv, from_seq, limit, backward, self._clock(), timeout=int(self.config.send_timeout * 1e6))
        c = await self._request_done(req)
        assert isinstance(c, HistoryCompleted)
        return HistoryPage(list(c.messages), c.more)

    async def readers(self, conv: str) -> list[F.Reader]:
        """How far each current member of ``conv`` has read: Reader(user,
        read_seq) sorted by user.  Raises SendError (NOT_MEMBER if this user
        is not a member now, UNKNOWN_CONVERSATION), trio.TooSlowError after
        ``send_timeout``, AuthFailed/ClientClosed (client stopped)."""
        self._check_alive()
        req = self._session.request_readers(conv, self._clock(), timeout=int(self.config.send_timeout * 1e6))
        c = await self._request_done(req)
        assert isinstance(c, ReadersCompleted)
        return list(c.readers)

    # ------------------------------------------------------------ conversation list

    async def conversations(self, cursor: bytes = b"", limit: int = 50, *, include_hidden: bool = False) -> "ConversationsPage":
        """A page of this user's conversation list: pinned first, then by
        last activity (newest first), each ConvEntry with its last message,
        read marker, unread and mention counts and this user's settings.
        Pass the page's ``cursor`` for the next one while ``more``.  Hidden
        conversations are left out unless ``include_hidden``.  Live changes
        come as :class:`ConversationUpdated` events (and new messages as
        MessageReceived); :attr:`conversation_entries` follows both.
        Raises SendError (BAD_CURSOR), trio.TooSlowError after
        ``send_timeout``, AuthFailed/ClientClosed; ValueError for a
        ``limit`` < 1 (the broker caps it at 1000)."""
        _check_limit("conversations", limit)
        self._check_alive()
        req = self._session.list_conversations(
            self._clock(), cursor=cursor, limit=limit, include_hidden=include_hidden,
            timeout=int(self.config.send_timeout * 1e6),
        )
        c = await self._request_done(req)
        assert isinstance(c, ConversationsCompleted)
        return ConversationsPage(list(c.entries), c.cursor, c.more)

    async def set_conversation(
        self, conv: str, *, pinned: Optional[bool] = None, muted: Optional[bool] = None, hidden: Optional[bool] = None
    ) -> None:
        """Change this user's settings of ``conv`` (None = unchanged) and
        wait until durable; every device of the user gets a
        ConversationUpdated.  ``hidden`` hides it until its next message.
        Raises SendError (NOT_MEMBER, UNKNOWN_CONVERSATION, BAD_REQUEST),
        trio.TooSlowError after ``send_timeout``, AuthFailed/ClientClosed."""
        self._check_alive()
        req = self._session.set_conversation(
            conv, self._clock(), pinned=pinned, muted=muted, hidden=hidden, timeout=int(self.config.send_timeout * 1e6)
        )
        c = await self._request_done(req)
        assert isinstance(c, ConversationSetCompleted)

    @property
    def conversation_entries(self) -> dict[str, F.ConvEntry]:
        """conv -> ConvEntry as this device knows it now (see
        :attr:`ClientSession.conversations`); read-only by convention."""
        return self._session.conversations
    # ------------------------------------------------------------ typing & presence

    async def typing(self, conv: str, active: bool = True) -> bool:
        """The user is typing in ``conv`` (or stopped, ``active`` False).
        Call it on every keystroke: the SDK sends at most one Typing per
        ``typing_interval`` per conversation.  Ephemeral: nothing is sent
        while disconnected.  Returns whether a frame went out."""
        self._check_alive()
        sent = self._session.typing(conv, self._clock(), active)
        self._pump()
        await trio.lowlevel.checkpoint()
        return sent

    def typing_users(self, conv: str) -> list[str]:
        """Users shown as typing in ``conv`` now (their indicator has not
        expired or been stopped), sorted."""
        return self._session.typing_users(conv)

    @property
    def presence(self) -> dict[str, F.PresenceEntry]:
        """The presence of every subscribed user (user -> PresenceEntry(user,
        state, last_seen); ``state`` a frames.PresenceState, ``last_seen``
        µs of the broker's clock, 0 if online, hidden or unknown) as far as
        this client can know it now: the latest the broker told while
        connected.  While the connection is down nobody tells this client
        anything, so every entry is UNKNOWN (with the last_seen it had,
        each change also a PresenceChanged event, right after the
        Disconnected) until the subscription renewed after the reconnect
        brings the current states.  Read-only by convention."""
        return self._session.presence

    async def subscribe_presence(self, users: Iterable[str]) -> dict[str, F.PresenceEntry]:
        """Replace the presence subscription by ``users`` (at most the
        broker's ``presence_max_users``; empty: unsubscribe) and return
        their current state.  Users who share no conversation with this
        user come back as PresenceState.UNKNOWN.  Changes then arrive as
        PresenceChanged events; the subscription is renewed after every
        reconnect.  Raises SendError (PRESENCE_LIMIT), trio.TooSlowError
        after ``send_timeout``, AuthFailed/ClientClosed."""
        self._check_alive()
        req = self._session.subscribe_presence(users, self._clock())
        with trio.fail_after(self.config.send_timeout):
            c = await self._request_done(req)
        assert isinstance(c, PresenceCompleted)
        return {e.user: e for e in c.entries}

    async def set_presence_privacy(self, hide_last_seen: Optional[bool]) -> bool:
        """Hide (True) or show (False) this user's last-seen time to others,
        or just ask (None).  Durable on the broker, synced to the user's
        other devices.  Returns the setting in force.  Raises
        trio.TooSlowError after ``send_timeout``, AuthFailed/ClientClosed."""
        self._check_alive()
        req = self._session.set_presence_privacy(hide_last_seen, self._clock())
        with trio.fail_after(self.config.send_timeout):
            c = await self._request_done(req)
        assert isinstance(c, PrivacyCompleted)
        return c.hide_last_seen

    async def _request_done(self, req: int) -> Any:
        """Wait for request ``req`` (history or readers) to complete; raise
        its error.  Cancelled: the session stops asking."""
        s = self._session
        w = self._history_waiters[req] = _Waiter()
        self._pump()
        try:
            await w.done.wait()
        finally:
            if not w.done.is_set():  # cancelled: stop asking
                self._history_waiters.pop(req, None)
                s.cancel_history(req)
                self._pump()
        c = w.outcome
        assert c is not None
        if isinstance(c.error, HistoryTimeout):
            raise trio.TooSlowError(str(c.error)) from c.error
        if c.error is not None:
            raise c.error
        return c

    # ------------------------------------------------------------ status

    async def wait_connected(self) -> None:
        while not self.connected:
            self._check_alive()
            await self._state_changed.wait()

    def _check_alive(self) -> None:
        if self._closed:
            raise ClientClosed("client closed")
        err = self._session.error
        if err is not None:
            raise err

    # ------------------------------------------------------------ connection management

    async def _resolve_token(self) -> bytes:
        source = self._token
        tok: Union[str, bytes, Awaitable[Union[str, bytes]]] = source() if callable(source) else source
        if not isinstance(tok, (str, bytes)) and inspect.isawaitable(tok):
            tok = await tok
        if not isinstance(tok, (str, bytes)):  # (a token source's result; the token itself is checked at the call)
            raise TypeError(f"open_client: the token source returned {type(tok).__name__}; it must return a"
                            f" {_TOKEN_EXPECTED.split(', or a callable')[0]}")
        if len(tok) == 0:
            raise ValueError(f"open_client: the token source returned an empty token: it must return a token"
                             f" {_TOKEN_FROM}")
        return tok.encode() if isinstance(tok, str) else bytes(tok)

    async def _open_stream(self, nursery: trio.Nursery) -> trio.abc.Stream:
        ep = self.endpoint
        self._dialing = None
        stream: trio.abc.Stream = await trio.open_tcp_stream(ep.host, ep.port)
        if ep.secure:
            self._dialing = "the TLS handshake"
            ctx = self._ssl or ssl.create_default_context()
            raw = self._handshake_answer = _Handshake(stream)
            stream = trio.SSLStream(raw, ctx, server_hostname=ep.host)
            # Handshake now: a certificate that does not verify is reported
            # here, as itself, not later as a silent WebSocket stall.
            await stream.do_handshake()
            raw.keeping = False
            raw.first = b""
        if ep.websocket:
            self._dialing = "the WebSocket upgrade"
            watched = _FirstBytes(stream)
            # (Kept to tell a TLS port, or a pimcore tcp:// one, from a
            # WebSocket one if the upgrade fails.)
            self._upgrade_answer = watched
            # trio-websocket runs its reader in `nursery`, which lives as
            # long as this connection.  Its wait for the upgrade's answer is
            # not woken when the server hangs up instead (trio-websocket
            # 0.12: its reader sees the end, the wait goes on): that wait
            # lasted connect_timeout, so the stream's end cancels it here.
            with trio.CancelScope() as upgrade:
                watched.on_end = upgrade.cancel
                ws = await wrap_client_stream(
                    nursery,
                    watched,  # type: ignore[arg-type]
                    f"{ep.host}:{ep.port}",
                    ep.path,
                    message_queue_size=64,
                    max_message_size=max(self.config.max_frame, WebSocketStream.MAX_PEER_MESSAGE) + 16,
                )
            watched.on_end = None
            if upgrade.cancelled_caught:
                raise trio.BrokenResourceError(f"the server {'reset the connection' if watched.broke else 'hung up'}"
                                               " before answering the WebSocket upgrade")
            return WebSocketStream(ws)
        return stream

    def _http_answered(self, data: bytes) -> _WrongPort:
        """The error of a Login answered with HTTP (``data``: the answer's first
        bytes), suggesting the WebSocket URL: with the path a pimcore ws://
        listener names in its 400, else /."""
        status = data.split(b"\r\n", 1)[0][:100].decode("ascii", "replace").strip()
        ep = self.endpoint
        if _HTTP_API.search(data):
            # pimcore's own HTTP API port (its 400 names it): no WebSocket URL to suggest.
            return _WrongPort(f"the server answered the login with HTTP ({status})", _api_hint(ep.secure))
        m = _WS_LISTENER.search(data)
        path = m.group(1).decode("ascii", "replace") if m else "/"
        scheme, http = ("wss", "HTTPS") if ep.secure else ("ws", "HTTP")
        return _WrongPort(f"the server answered the login with HTTP ({status})",
                          f"it may be a {scheme}:// or {http} port: try {scheme}://{_host(ep)}:{ep.port}{path}")

    def _stream_failed(self, conn: _Conn, exc: BaseException) -> None:
        if conn.error is None:
            conn.error = exc
        s = self._session
        if self._conn is conn and s.connection_open:
            s.connection_lost(self._clock(), _io_failure(exc))
        self._pump()

    async def _reader(self, conn: _Conn) -> None:
        s = self._session
        try:
            while s.connection_open:
                data = await conn.stream.receive_some(65536)
                if not data:
                    # An RST can follow the FIN (a proxy or NAT that aborts):
                    # the kernel then reports the end first and keeps the
                    # reset for the next call.  Say "connection reset by
                    # peer" rather than blame the broker for a clean close.
                    s.connection_lost(self._clock(), _pending_socket_error(conn.stream))  # else the session words it
                    self._pump()
                    return
                if len(conn.first) < _FIRST_BYTES:
                    conn.first += data[: _FIRST_BYTES - len(conn.first)]
                    if conn.first.startswith(b"HTTP/") and s.connections_established == conn.base:
                        # An HTTP answer to the Login: a ws:// (or HTTP) port.
                        # It will not change (the session would wait for
                        # the rest of a "frame" that never comes).
                        self._stream_failed(conn, self._http_answered(bytes(data)))
                        return
                s.receive_data(data, self._clock())
                self._pump()
        except _IO_ERRORS as exc:
            self._stream_failed(conn, exc)

    async def _writer(self, conn: _Conn) -> None:
        # The only writer of this stream: frames never interleave, and one
        # syscall carries everything the session queued meanwhile.
        s = self._session
        try:
            while True:
                data = s.data_to_send()
                if not data:
                    conn.wake = trio.Event()
                    await conn.wake.wait()
                    continue
                conn.writing = True
                await conn.stream.send_all(data)
                conn.writing = False
                conn.login_written = True
        except _IO_ERRORS as exc:
            conn.writing = False
            self._stream_failed(conn, exc)

    async def _flush(self, conn: _Conn, timeout: float) -> None:
        """Give the writer up to ``timeout`` s to get the last bytes out (a Close)."""
        with trio.move_on_after(timeout):
            while (self._session.has_data_to_send or conn.writing) and conn.error is None:
                await trio.sleep(0.002)

    async def _serve(self, stream: trio.abc.Stream, token: bytes,
                     first: Optional[trio.TaskStatus[None]]) -> Optional[BaseException]:
        """One connection, from Login until it ends; returns why it ended."""
        s = self._session
        conn = _Conn(stream, s.connections_established)
        self._conn = conn
        try:
            s.connection_made(self._clock(), token)
            self._pump()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, conn)
                nursery.start_soon(self._writer, conn)
                if first is not None:
                    await conn.settled.wait()
                    if s.connections_established > conn.base:
                        first.started()  # open_client returns: logged in and calibrated
                await conn.ended.wait()
                await self._flush(conn, 1.0)
                nursery.cancel_scope.cancel()
        finally:
            self._conn = None
            if s.connection_open:  # cancelled from outside, or a stream error elsewhere
                s.connection_lost(self._clock(), "connection abandoned")
            self._pump()
        # A TLS server that a plain-TCP client speaks to answers the Login
        # with a TLS alert record (0x15 0x03 ...; pimcore's tls:// listener
        # does): a clear answer (_tls_answer: the first connection fails at
        # once, with the hint).  A hang-up or a reset with nothing read is
        # no evidence of TLS (a load balancer with no broker behind it yet,
        # a broker stopping, mosquitto dropping a Login): retried, and said
        # as it happened, without a hint.
        d = s.last_disconnect
        self._login_broke = conn.error is not None and not conn.login_written and not conn.first
        plain = self.endpoint.scheme == "tcp" and s.connections_established == conn.base
        self._tls_answer = conn.first if plain and len(conn.first) >= 2 and _tls_record(conn.first) else b""
        # Text or binary where the LoginAck should be (an SSH or SMTP
        # banner, a Redis error, a MySQL handshake: another service's port)
        # will not change either: the first connection fails at once, saying
        # so (the decoder's complaint about its bytes -- "UNSUPPORTED_VERSION:
        # protocol version 5" -- is noise).  No frame was decoded (no Close);
        # the bytes cannot begin one a broker sends first.
        self._other_answer = (conn.first if s.connections_established == conn.base and conn.first
                              and (d is None or d.code is None) and not _could_be_broker(conn.first) else None)
        if (d is not None and d.code is CloseCode.PROTOCOL_ERROR and d.reason.startswith("FRAME_TOO_LARGE")
                and s.connections_established == conn.base):
            # The broker's Close to a Login over its max_frame came before
            # the write of the rest broke (a broken pipe): the Close says why.
            return _SessionEnded(d.code, d.reason)
        if conn.error is not None:
            return conn.error
        return _SessionEnded(d.code, d.reason) if d is not None else None

    async def _connect_once(self, first: Optional[trio.TaskStatus[None]]) -> Optional[BaseException]:
        """One connection from dial to hang-up; returns why it ended."""
        end: Optional[BaseException] = None
        self._tls_answer = b""  # set by _serve, if the stream opens
        self._login_broke = False  # ... and this
        self._other_answer = None
        self._upgrade_answer = None
        # The token before every dial: a token whose Login could be over
        # the frame limit (the largest this session will send for it, a
        # reconnect's) is refused here, without connecting -- the broker
        # would close every attempt.  The first connection fails with
        # ConnectFailed; a later one (a token function's new token) stops
        # the client with it (_connect_loop), not a reconnect loop.
        token = await self._resolve_token()
        now = self._clock()
        self._login_sizes = (self._session.login_frame_length(now, token), len(token))
        too_large = self._session.login_too_large(now, token)
        if too_large is not None:
            return _LoginTooLarge(too_large)
        try:
            async with trio.open_nursery() as conn_nursery:
                stream: Optional[trio.abc.Stream] = None
                try:
                    with trio.fail_after(self.config.connect_timeout):
                        stream = await self._open_stream(conn_nursery)
                    self._upgrade_answer = None  # (upgraded, if a WebSocket)
                    self._dialing = None
                    end = await self._serve(stream, token, first)
                except _DISCONNECTS as exc:
                    end = exc
                finally:
                    with trio.CancelScope(shield=True):
                        if stream is not None:
                            with trio.move_on_after(1):
                                try:
                                    await stream.aclose()
                                except Exception:
                                    pass
                    conn_nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # trio-websocket's own reader task (in conn_nursery) failed, e.g.
            # the broker rejected the upgrade: just another way to end.
            matched, rest = group.split(_DISCONNECTS)
            if rest is not None:
                raise
            assert matched is not None
            end = first_leaf(matched)
        if isinstance(end, trio.TooSlowError) and self._dialing is not None:
            # Connected, and connect_timeout of silence: said as on tcp://
            # (no answer to the login), not only "no answer".
            end = _NoAnswer(self._dialing)
        self._dialing = None
        answer, self._upgrade_answer = self._upgrade_answer, None
        if end is not None and answer is not None:
            ep = self.endpoint
            if answer.looks_like_pimcore:
                # pimcore's binary protocol answered the upgrade request: a
                # tcp:// (tls://) port.
                scheme = "tls" if ep.secure else "tcp"
                return _WrongPort("the server answered the WebSocket upgrade in pimcore's binary protocol",
                                  f"it is not a WebSocket endpoint: try {scheme}://{_host(ep)}:{ep.port}")
            if answer.looks_like_other:
                # Text or binary for an answer (an SSH banner, a MySQL
                # handshake: a service that speaks first) will not change:
                # failed at once, as on tcp:// (_serve).
                self._other_answer = answer.first
            elif not ep.secure:
                # The WebSocket upgrade failed: a TLS alert or a hang-up for an answer?
                self._tls_answer = answer.first if len(answer.first) >= 2 and answer.looks_like_tls else b""
        return end

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timer_loop)
            await self._connect_loop(task_status)
            nursery.cancel_scope.cancel()

    async def _connect_loop(self, task_status: trio.TaskStatus[None]) -> None:
        """Connect, serve the session, reconnect with backoff -- until closed."""
        s = self._session
        backoff = ReconnectBackoff(self.config.backoff_initial, self.config.backoff_max, self._rng)
        first: Optional[trio.TaskStatus[None]] = task_status
        first_deadline = trio.current_time() + self.config.connect_timeout
        while not self._closed:
            began = trio.current_time()
            established = s.connections_established
            exc = await self._connect_once(first)
            if s.state is SessionState.CLOSED:
                # For good: the app closed, the token was refused, or this
                # device logged in elsewhere.  The session failed the waiters.
                if first is not None and not self._ever_connected and not self._closed:
                    assert s.error is not None
                    raise s.error
                return
            if self._ever_connected:
                first = None
            if isinstance(exc, _LoginTooLarge) and first is None:
                # After a login: a token function's token too large for a
                # Login.  Every waiter (events(), sends) gets the error.
                s.give_up(self._clock(), ConnectFailed(f"cannot connect to {self._where}: {exc}"))
                self._pump()
                return
            if exc is not None:
                if first is not None:
                    # The first connection: a refused port, a certificate
                    # that does not verify or a host name that does not
                    # exist will not get better; anything else (a reset
                    # mid-login on a bad network, a name server not
                    # reachable yet...) is retried until connect_timeout has
                    # passed since open_client began.
                    if isinstance(exc, _LoginTooLarge):
                        raise ConnectFailed(f"cannot connect to {self._where}: {exc}") from None
                    frame, token_bytes = self._login_sizes
                    if (isinstance(exc, _SessionEnded) and exc.code is CloseCode.PROTOCOL_ERROR
                            and exc.reason.startswith("FRAME_TOO_LARGE") and s.connections_established == established):
                        # The broker's max_frame is below the Login (below
                        # this client's max_frame): a retry sends the same.
                        raise ConnectFailed(f"cannot connect to {self._where}: the broker refused the Login frame"
                                            f" ({frame:,} bytes; the token is {token_bytes:,} bytes) as too large:"
                                            f" Close PROTOCOL_ERROR: {exc.reason}") from exc
                    unknown = _unknown_host(exc)
                    if unknown is not None:
                        raise ConnectFailed(f"cannot connect to {self._where}: unknown host {self.endpoint.host!r}"
                                            f" ({_words(unknown)})") from exc
                    # (HTTP 503 is a ws:// broker at max_connections, as
                    # Close OVERLOADED is a tcp:// one's: retried.)
                    permanent = _refusal(exc) or (
                        isinstance(exc, ConnectionRejected) and exc.status_code != 503) or _refusal(
                        exc.__cause__) or _all_refused(exc)
                    if permanent:
                        ep = self.endpoint
                        hint = ""
                        if ep.secure and _ssl_reason(exc) == "WRONG_VERSION_NUMBER":
                            # No TLS record for an answer: a plain port (a
                            # pimcore Close, an HTTP 400...).
                            # Its plain answer (kept by _Handshake) may say
                            # which listener it is.
                            plain = self._handshake_answer.first if self._handshake_answer is not None else b""
                            listener = _WS_LISTENER.search(plain)
                            if _HTTP_API.search(plain):
                                # pimcore's plain HTTP API: no broker URL there to suggest.
                                hint = f" ({_api_hint(True)})"
                            elif plain and not (b"HTTP/".startswith(plain[:5]) or _pimcore_frame_start(plain)):
                                # Another service's banner or binary (SSH,
                                # Redis): its plain URL would only say so next.
                                hint = f" ({_other_service(plain[:_FIRST_BYTES])})"
                            else:
                                if listener:  # a pimcore ws:// listener, naming its path
                                    scheme, path = "ws", listener.group(1).decode("ascii", "replace")
                                elif _pimcore_frame_start(plain):  # a pimcore tcp:// listener's Close
                                    scheme, path = "tcp", ""
                                else:
                                    scheme, path = ("ws", ep.path) if ep.websocket else ("tcp", "")
                                hint = f" (the server may not use TLS: try {scheme}://{_host(ep)}:{ep.port}{path})"
                        raise ConnectFailed(f"cannot connect to {self._where}:"
                                            f" {_root_cause(exc, ep)}{hint}",
                                            wrong_port=bool(hint) or _wrong_kind(exc)) from exc
                    if isinstance(exc, _WrongPort):
                        # The wrong kind of port said so: that will not change.
                        raise ConnectFailed(f"cannot connect to {self._where}: {exc.what} ({exc.hint})",
                                            wrong_port=True) from exc
                    hint = ""
                    if self._tls_answer:
                        # A TLS port's answer to plain text (a TLS alert to the
                        # Login or the upgrade request) will not change:
                        # retrying it until connect_timeout only delayed the hint.
                        # (Said as such: the decoder's complaint about its bytes
                        # -- "UNSUPPORTED_VERSION: protocol version 0" -- is noise.)
                        ep = self.endpoint
                        scheme, path = ("wss", ep.path) if ep.websocket else ("tls", "")
                        hint = f" (the server may require TLS: try {scheme}://{_host(ep)}:{ep.port}{path})"
                        raise ConnectFailed(f"cannot connect to {self._where}: the server answered with a TLS alert{hint}",
                                            wrong_port=True) from exc
                    if self._other_answer is not None:
                        raise ConnectFailed(f"cannot connect to {self._where}: {_other_service(self._other_answer)}",
                                            wrong_port=True) from exc
                    if self._login_broke and (frame > _LARGE_LOGIN or self.endpoint.secure):
                        # What is known: a broker closes a connection whose
                        # frame is over its max_frame, sending a Close that
                        # a reset can lose while the Login is still going out.
                        # (A Login this large is no usual one.  A small one
                        # on tcp:// or ws:// is written at once: a reset
                        # then is the port's, not the frame's.)
                        default = (f", the protocol's default {DEFAULT_MAX_FRAME_SIZE:,} bytes unless the broker raised it"
                                   if frame > DEFAULT_MAX_FRAME_SIZE else "")
                        hint = (f" (the connection broke while the Login frame ({frame:,} bytes; the token is"
                                f" {token_bytes:,} bytes) was being written, before any answer: it may be over the"
                                f" broker's max_frame{default})")
                    if trio.current_time() >= first_deadline:
                        raise ConnectFailed(f"cannot connect to {self._where} within {self.config.connect_timeout:g} s"
                                            f" (connect_timeout): {_root_cause(exc)}{hint}") from exc
                    if self._on_connect_retry is not None and not self._closed:
                        self._on_connect_retry(_attempt_failure(exc, self.endpoint))
                log.debug("connection lost: %r", exc)
            if self._closed:
                return
            d = s.last_disconnect
            # A completed login resets the backoff; close codes that ask to
            # wait do not (ReconnectBackoff, CLIENT.md "Reconnect backoff").
            delay = backoff.delay(s.connections_established > established, d.code if d is not None else None,
                                  trio.current_time() - began)
            if first is not None:
                # The first connection gives up at connect_timeout, as it
                # says: a last attempt then, not a sleep past it.
                delay = min(delay, max(0.0, first_deadline - trio.current_time()))
            if delay > 0:
                await trio.sleep(delay)

    async def aclose(self) -> None:
        """Say goodbye (Close NORMAL) and stop.  Unacked sends fail with
        ClientClosed; the broker keeps undelivered messages for next time."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        # Acks what the app took (not pushed again next time), queues Close.
        self._session.close(self._clock())
        self._pump()
        if conn is not None:
            await self._flush(conn, 1.0)


def _refusal(exc: Optional[BaseException]) -> bool:
    """``exc`` will not change on a retry: a refused port, a TLS failure
    (a certificate that does not verify, a plain port's answer) -- but not
    an EOF in the TLS handshake, which is a hang-up like any other (a load
    balancer with no broker behind it yet, a broker stopping)."""
    return isinstance(exc, (ConnectionRefusedError, ssl.SSLError)) and not isinstance(
        exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError))


def _wrong_kind(exc: BaseException) -> bool:
    """A refused WebSocket upgrade that says the URL is the wrong kind of
    port or path: not a WebSocket endpoint (an answer below 400, a 400), a
    path not served (404), pimcore's HTTP API (ConnectFailed.wrong_port)."""
    return isinstance(exc, ConnectionRejected) and (
        exc.status_code < 401 or exc.status_code == 404 or bool(_HTTP_API.search(bytes(exc.body or b""))))


def _host(ep: Endpoint) -> str:
    """``ep``'s host as a URL writes it (an IPv6 address in brackets)."""
    return f"[{ep.host}]" if ":" in ep.host else ep.host


def _all_refused(exc: BaseException) -> bool:
    """Every address tried refused the connection.  trio's open_tcp_stream
    reports that as an OSError ("all attempts to connect ... failed") caused
    by a group of the attempts' errors, not as a ConnectionRefusedError."""
    cause = exc if isinstance(exc, BaseExceptionGroup) else exc.__cause__
    if not isinstance(cause, BaseExceptionGroup):
        return False
    leaves = _leaves(cause)
    return bool(leaves) and all(isinstance(e, ConnectionRefusedError) for e in leaves)


#: The resolver's answers that a name does not exist (NXDOMAIN, or no
#: address for it): EAI_NODATA is not defined everywhere (glibc has it).
#: EAI_AGAIN (no answer from a name server) and EAI_FAIL are not among them:
#: a network still coming up gives those, and a retry may succeed.
_NO_SUCH_HOST = frozenset(e for e in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if e is not None)


def _unknown_host(exc: BaseException) -> Optional[socket.gaierror]:
    """The resolver's "no such host" that ended an attempt, if that is what
    did: trio's open_tcp_stream raises getaddrinfo's gaierror as itself,
    but look where _all_refused looks too (the cause, every leaf of a
    group) so that a wrapper (trio-websocket, a future trio) cannot turn a
    permanent failure back into connect_timeout of silent retries."""
    if isinstance(exc, socket.gaierror):
        return exc if exc.errno in _NO_SUCH_HOST else None
    cause = exc if isinstance(exc, BaseExceptionGroup) else exc.__cause__
    if isinstance(cause, socket.gaierror):
        return cause if cause.errno in _NO_SUCH_HOST else None
    if not isinstance(cause, BaseExceptionGroup):
        return None
    leaves = _leaves(cause)
    if leaves and all(isinstance(e, socket.gaierror) and e.errno in _NO_SUCH_HOST for e in leaves):
        return leaves[0]  # type: ignore[return-value]
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


#: What pimcore's HTTP API port says to a broker client (its 400 to a binary
#: Login, its 404 to a WebSocket upgrade: pimcore.http.server).
_HTTP_API = re.compile(rb"this is pimcore's HTTP API \(https?://\)")
#: A pimcore ws:// listener's 400 to bytes that are no HTTP request, and its
#: 404 to an upgrade to another path, name its path
#: (pimcore.net.server._not_http_answer, _wrong_path_answer).
_WS_LISTENER = re.compile(rb"pimcore wss?:// listener \(path (/[!-(*-~]*)\)")
#: An older pimcore ws:// listener's 404 named its path so.
_WS_PATH = re.compile(rb"the broker's path here is (/[!-~]*)")


def _api_hint(secure: bool) -> str:
    pair = "tls:// or wss://" if secure else "tcp:// or ws://"
    return (f"it is pimcore's HTTP API port, not a broker listener: use the {pair} address"
            " `pimcore serve` prints as 'listening on'")


def _ssl_reason(exc: BaseException) -> Optional[str]:
    """The reason ("WRONG_VERSION_NUMBER") of the first ssl.SSLError in
    ``exc``'s chain, if any."""
    e: Optional[BaseException] = exc
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, ssl.SSLError):
            return e.reason
        e = e.__cause__ or e.__context__
    return None


def _rejected(exc: ConnectionRejected, ep: Optional[Endpoint] = None) -> str:
    """A refused WebSocket upgrade in words (its repr is a tuple of bytes);
    on a 404 from the endpoint ``ep``, the URL to try when a pimcore
    listener named its path, else a question about the path."""
    secure = ep is not None and ep.secure
    raw = bytes(exc.body or b"")
    text = f"the server refused the WebSocket upgrade with HTTP {exc.status_code}"
    if _HTTP_API.search(raw):
        return f"{text} ({_api_hint(secure)})"
    body = raw.decode("utf-8", "replace").strip()
    shown = f" ({body})" if body and len(body) <= 200 and body.isprintable() else ""
    if exc.status_code < 400:
        # No refusal: an answer (200 OK...) of a server that does not speak
        # WebSocket there, a web server's.
        return (f"the server answered the WebSocket upgrade with a plain HTTP {exc.status_code}{shown}, not a"
                f" WebSocket upgrade: is it a web server, not pimcore's {'wss' if secure else 'ws'}:// listener?")
    text += shown
    if exc.status_code == 404 and ep is not None and ep.path:
        named = _WS_LISTENER.search(raw) or _WS_PATH.search(raw)
        if named:
            text += f": try {'wss' if secure else 'ws'}://{_host(ep)}:{ep.port}{named.group(1).decode()}"
        else:
            text += f": is the path {ep.path} right?"
    return text


_TCP_INFO: Optional[int] = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_TCP_CLOSE = 7  # tcpi_state of a closed socket (Linux's include/net/tcp_states.h)


def _pending_socket_error(stream: trio.abc.Stream) -> Optional[str]:
    """The error the kernel holds for ``stream``'s TCP socket (SO_ERROR,
    which also clears it), in words; None if none or no socket is found
    under the stream's wrappers (TLS, WebSocket, _FirstBytes)."""
    seen: Any = stream
    for _ in range(4):
        if isinstance(seen, trio.SocketStream):
            try:
                err = seen.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError:
                return None
            if not err:
                # The writer's send may have taken the error first (trio
                # checkpoints before raising it, so the reader can meet the
                # end in between).  A socket that we have neither closed
                # nor shut down leaves CLOSE_WAIT only by a reset (or a
                # retransmission timeout, rare after the peer's FIN), which
                # ends in TCP_CLOSE; a clean end stays in CLOSE_WAIT.
                # TCP_INFO's first byte is the state (Linux only: elsewhere
                # the end is said as clean, as before).
                if _TCP_INFO is None:
                    return None
                try:
                    info = seen.socket.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
                except OSError:
                    return None
                return os.strerror(errno.ECONNRESET).lower() if info[:1] == bytes([_TCP_CLOSE]) else None
            # An RST after the FIN is held as EPIPE (Linux's tcp_reset in
            # CLOSE_WAIT); it is still the peer's reset.
            text = os.strerror(errno.ECONNRESET if err == errno.EPIPE else err)
            return text[:1].lower() + text[1:]
        seen = getattr(seen, "transport_stream", None) or getattr(seen, "inner", None)
    return None


def _io_failure(exc: BaseException) -> str:
    """Why a working connection broke, in words ("connection reset by
    peer"), for Disconnected.reason: not an exception's repr."""
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, ConnectionRejected):
            return _rejected(e)
        if isinstance(e, ssl.SSLError):
            return _words(e)
        if isinstance(e, OSError) and e.errno == errno.EPIPE:
            # A send after the peer's FIN then RST (Linux holds the reset as
            # EPIPE then): the peer reset, as _pending_socket_error says when
            # the reader meets it first.
            return os.strerror(errno.ECONNRESET).lower()
        if isinstance(e, OSError) and e.strerror:
            return _words(e)
        e = e.__cause__ or e.__context__
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] (.+)$", text)
    if m:  # "socket connection broken: [Errno 104] Connection reset by peer"
        return m.group(1)[:1].lower() + m.group(1)[1:]
    if isinstance(exc, trio.ClosedResourceError):
        return "connection closed"
    return text or "connection broken"


def _root_cause(exc: BaseException, ep: Optional[Endpoint] = None) -> str:
    """The most telling error in ``exc``'s chain (an SSL or OS error if any:
    "certificate verify failed" says more than "BrokenResourceError"; the
    attempts' own errors rather than trio's "all attempts ... failed"; a
    refused WebSocket upgrade in words, about the endpoint ``ep``'s path on
    a 404)."""
    if isinstance(exc, ConnectionRejected):
        return _rejected(exc, ep)
    if isinstance(exc, _SessionEnded):
        if exc.code is None and exc.reason == LOGIN_TIMED_OUT:
            return "no answer to the login (is it a pimcore broker?)"
        return str(exc)
    seen = exc
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, trio.TooSlowError):
            return str(e) if isinstance(e, _NoAnswer) else "no answer"
        if isinstance(e, OSError) and isinstance(e.__cause__, BaseExceptionGroup):
            attempts = _leaves(e.__cause__)
            if attempts and all(isinstance(a, OSError) for a in attempts):
                # "[Errno 111] Error connecting to ('127.0.0.1', 1): Connection refused"
                # for each address tried: "connection refused", once.
                return "; ".join(dict.fromkeys(_words(a) for a in attempts))
        if isinstance(e, (ssl.SSLError, OSError)):
            return _words(e)
        seen = e
        nxt = e.__cause__ or e.__context__
        if isinstance(nxt, trio.Cancelled):  # the mechanism of a timeout, never the cause
            break
        e = nxt
    # (trio's BrokenResourceError("the server hung up before ..."): its words.)
    return str(seen) or _io_failure(seen)


def _words(e: BaseException) -> str:
    """An OS, resolver or TLS error in words ("connection refused", "TLS
    error: certificate verify failed: ... (CERTIFICATE_VERIFY_FAILED)"), not
    Python's class name and errno ("ConnectionRefusedError: [Errno 111]
    ..."): a user reads it."""
    if isinstance(e, ssl.SSLError):
        text = str(e.strerror or e)
        text = re.sub(r" \(_ssl\.c:\d+\)$", "", re.sub(r"^\[SSL: [A-Z0-9_]+\] ", "", text))
        return f"TLS error: {text}" + (f" ({e.reason})" if e.reason and e.reason not in text else "")
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        # (trio's strerror of a failed connect names the address, which the
        # URL in the message already does: the errno's own words.)
        text = e.strerror if isinstance(e, socket.gaierror) or e.errno <= 0 else os.strerror(e.errno)
        return text[:1].lower() + text[1:]
    return str(e) or type(e).__name__


def _attempt_failure(exc: BaseException, ep: Endpoint) -> str:
    """Why an attempt of the first connection failed, in words, for
    ``on_connect_retry``: the broker's reason ("too many connections"), the
    transport's ("connection reset by peer"), not an exception's repr."""
    if isinstance(exc, _SessionEnded):
        if exc.code is None and exc.reason == LOGIN_TIMED_OUT:
            return "no answer to the login (is it a pimcore broker?)"
        return exc.reason or (exc.code.name if exc.code is not None else "connection ended")
    if isinstance(exc, ConnectionRejected):
        return _rejected(exc, ep)
    if isinstance(exc, trio.TooSlowError):
        return str(exc) if isinstance(exc, _NoAnswer) else "no answer"
    return _io_failure(exc)


@asynccontextmanager
async def open_client(
    url: str,
    token: TokenSource,
    device: str = "default",
    *,
    config: ClientConfig = ClientConfig(),
    ssl_context: Optional[ssl.SSLContext] = None,
    clock: Optional[Callable[[], int]] = None,
    seed: Optional[int] = None,
    position: int = 0,
    epoch: bytes = b"",
    on_connect_retry: Optional[Callable[[str], None]] = None,
    sent: int = 0,
) -> AsyncIterator[Client]:
    """Connect (URL schemes tcp, tls, ws, wss), log in, calibrate the clock;
    keep the connection alive and reconnect while the block runs.

    ``position``, ``epoch`` and ``sent`` resume where an earlier run of this
    device stopped (its ``taken_upto``, ``epoch`` and ``sent_upto``); from
    another epoch the broker resynchronizes the client (a :class:`Resynced`
    event), and from a store that went back in time (a restored hot copy)
    too, when the positions it took or its own sends were refilled.

    ``clock``: the device clock, a callable returning µs (default: an
    :class:`AnchoredClock` made for this client: the wall clock at the start
    plus monotonic time, so a wall clock stepped while the client runs fires
    no deadline early; see its docstring).

    Raises :class:`AuthFailed` or :class:`ConnectFailed` if the first
    connection cannot be made: at once for a refused port, a certificate
    that does not verify or a host name that does not exist ("unknown host
    'name'"), else after ``connect_timeout`` s of retries.

    ``on_connect_retry``: called (in the client's task: it must not block)
    with why an attempt of the first connection failed, in words ("too many
    connections"), each time that attempt is to be retried; a failure of a
    later connection is a :class:`Disconnected` event instead."""
    client = Client(
        url, token, device, config=config, ssl_context=ssl_context, clock=clock, seed=seed, position=position,
        epoch=epoch, on_connect_retry=on_connect_retry, sent=sent,
    )
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()
