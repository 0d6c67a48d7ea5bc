"""The client SDK (trio): reliable sends, exactly-once delivery, read state.

::

    async with open_client("tcp://127.0.0.1:7400", token, device="phone") as c:
        sent = await c.send(direct_conversation("alice", "bob"), b"hello")
        async for event in c.events():
            ...

What the SDK promises, and how
------------------------------
* **Upstream.**  Every message gets a local id (unique per device, also
  across restarts: it starts from the µs clock).  ``send`` returns only once
  the broker's SendAck says the message is durable.  Until then the SendReq
  is retransmitted with the *same* local id after ``ack_timeout`` and after
  every reconnect; the broker dedupes, so a retry can never store a second
  copy.  After ``send_timeout`` the caller gets :class:`SendTimeout` (the
  message may still have been stored: retrying with ``local_id=`` of the
  error is safe).
* **Downstream.**  Messages come out of :meth:`Client.events` in inbox
  order.  A Push is acknowledged (cumulatively, batched) only after the
  application has *taken* every message it carried, so a crash of the app
  can never lose a message it did not see.  On reconnect the client resumes
  from what it took; re-pushed messages it already has are dropped by
  position.
* **Time.**  At each login the SDK takes several calibration samples (CalibrateReq) and keeps
  the offset of the one with the smallest round trip (its error is bounded
  by half that RTT).  Outgoing messages are stamped with the calibrated
  local time, never going backwards; :meth:`Client.server_now` estimates the
  broker's clock.
* **Liveness.**  A Ping when nothing was sent for a heartbeat period; if
  nothing at all is received for ``dead_after`` heartbeat periods, the
  connection is presumed dead and replaced (jittered exponential backoff).
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional, Union

import trio
from trio_websocket import ConnectionRejected, HandshakeError, wrap_client_stream

from . import frames as F
from .codec import Decoder, encode_frame
from .errors import CloseCode, ErrorCode, PimError, ProtocolError
from .net.streams import Endpoint, WebSocketStream, parse_url
from ._util import BaseExceptionGroup, first_leaf, unwrap_single
from .order import display_order

try:  # zstandard is a dependency; without it the client just does not ask for zstd
    from .compress import FrameCompressor, FrameDecompressor
except ImportError:  # pragma: no cover
    FrameCompressor = FrameDecompressor = None  # type: ignore[assignment,misc]

__all__ = [
    "open_client",
    "Client",
    "ClientConfig",
    "Sent",
    "MessageReceived",
    "ReadStateChanged",
    "ReceiptReceived",
    "Connected",
    "Disconnected",
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

#: Refusals a retry cannot fix: the send fails with SendError at once.
_FINAL_CODES = frozenset(
    {
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNKNOWN_CONVERSATION,
        ErrorCode.NOT_MEMBER,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.DUPLICATE_CONFLICT,
        ErrorCode.REJECTED,
    }
)


# ---------------------------------------------------------------- errors


class ClientError(PimError):
    """Base class of the SDK's errors."""


class SendError(ClientError):
    """The broker refused the message for good (``code`` says why)."""

    def __init__(self, code: ErrorCode, local_id: int, message: str = "") -> None:
        super().__init__(message or f"send refused: {code.name}")
        self.code = code
        self.local_id = local_id


class SendTimeout(ClientError):
    """No SendAck within the send deadline.  The message may or may not be
    stored: ``send(..., local_id=err.local_id)`` finds out without risk."""

    def __init__(self, local_id: int) -> None:
        super().__init__(f"no SendAck for local id {local_id} within the send timeout")
        self.local_id = local_id


class AuthFailed(ClientError):
    """The broker refused the token; the client stops reconnecting."""


class ConnectFailed(ClientError):
    """The first connection could not be established."""


class ClientClosed(ClientError):
    """The client was closed (or stopped for good) while waiting."""


# ---------------------------------------------------------------- results & events


@dataclass(frozen=True, slots=True)
class Sent:
    """A durable send: what the broker's SendAck said."""

    local_id: int
    conv: str
    msg_id: bytes
    seq: int
    server_time: int
    client_time: int


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: F.Message


@dataclass(frozen=True, slots=True)
class ReadStateChanged:
    """The user's read state of ``conv`` changed (this or another device read,
    or the state was refreshed at login)."""

    state: F.ReadState


@dataclass(frozen=True, slots=True)
class ReceiptReceived:
    """The 1:1 peer read up to ``seq``."""

    conv: str
    reader: str
    seq: int


@dataclass(frozen=True, slots=True)
class Connected:
    user: str
    device: str
    position: int
    gap: bool  # entries before `position` were reclaimed before this device took them
    clock_offset: int  # µs to add to the local clock to get the broker's
    rtt: int  # µs, best calibration round trip


@dataclass(frozen=True, slots=True)
class Disconnected:
    code: Optional[CloseCode]  # the broker's Close code, None if the link just broke
    reason: str


Event = Union[MessageReceived, ReadStateChanged, ReceiptReceived, Connected, Disconnected]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    ack_timeout: float = 5.0  # s without SendAck before the SendReq is sent again
    send_timeout: float = 60.0  # s before send() gives up with SendTimeout
    connect_timeout: float = 10.0  # s for connect + Login + LoginAck
    backoff_initial: float = 0.1  # s, first reconnect delay (then doubled, jittered)
    backoff_max: float = 10.0
    time_samples: int = 5  # calibration round trips at each login
    ack_delay: float = 0.02  # s; PushAcks taken within this window go out as one
    dead_after: float = 3.0  # heartbeat periods without any frame = dead link
    compression: bool = True  # ask for zstd at login
    max_frame: int = 1 << 20
    view_limit: int = 1000  # messages kept per conversation for view() (the newest by seq)
    event_limit: int = 10_000  # queued events before old read-state notifications are shed


# ---------------------------------------------------------------- internals


class _Pending:
    __slots__ = ("local_id", "conv", "payload", "client_time", "done", "result", "error", "sent_at", "attempts")

    def __init__(self, local_id: int, conv: str, payload: bytes, client_time: int) -> None:
        self.local_id = local_id
        self.conv = conv
        self.payload = payload
        self.client_time = client_time
        self.done = trio.Event()
        self.result: Optional[Sent] = None
        self.error: Optional[BaseException] = None
        self.sent_at: Optional[float] = None  # trio time of the last transmission; None = not on the wire
        self.attempts = 0


class _Session:
    """One live connection."""

    __slots__ = ("stream", "buf", "wake", "writing", "compress", "last_sent", "last_recv", "heartbeat", "window", "closed", "nursery", "end")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        # Outbound frames wait here for the session's single writer task, so
        # frames never interleave and one syscall carries many frames.
        self.buf: list[bytes] = []
        self.wake = trio.Event()
        self.writing = False
        self.compress: Optional[Callable[[bytes], bytes]] = None
        self.last_sent = trio.current_time()
        self.last_recv = trio.current_time()
        self.heartbeat = 0.0
        self.window = 1
        self.closed = False
        self.nursery: Optional[trio.Nursery] = None
        self.end: Optional[BaseException] = None  # why the session ended


class _SessionEnded(Exception):
    """The broker closed the session (code) or the link ended (None)."""

    def __init__(self, code: Optional[CloseCode], reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


_DISCONNECTS = (
    _SessionEnded,
    AuthFailed,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    HandshakeError,
    ConnectionRejected,
    ProtocolError,
)


def _local_clock_us() -> int:
    return time.time_ns() // 1000


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
        clock: Callable[[], int] = _local_clock_us,
        seed: Optional[int] = None,
    ) -> None:
        self.endpoint: Endpoint = parse_url(url)
        self.url = url
        self.device = device
        self.config = config
        self._token = token
        self._ssl = ssl_context
        self._clock = clock
        self._rng = random.Random(seed)

        self.user = ""
        self._offset = 0  # µs: server clock - local clock
        self._rtt = -1
        self._last_stamp = 0
        self._last_local_id = 0

        # upstream
        self._pending: dict[int, _Pending] = {}
        self._queue: deque[_Pending] = deque()  # waiting for window room, in send order
        self._on_wire = 0
        self._hold_until = 0.0  # trio time before which nothing new is sent (broker asked to slow down)
        self._refusals = 0  # consecutive transient refusals (backoff exponent)
        # Congestion window: sends on the wire at once, <= LoginAck.window.
        # Halved on each "slow down" refusal, +1 per accepted send (AIMD), and
        # kept across reconnects so a rate-limited client does not burst again.
        self._cwnd = float(1 << 16)

        # downstream: (event, ack position to record once the app took it)
        self._events: deque[tuple[Optional[Event], int]] = deque()
        self._events_ready = trio.Event()
        self._enqueued_upto = 0  # highest inbox position queued for the app
        self._taken_upto = 0  # highest position the app has taken (what we ack)
        self._acked_upto = 0  # highest PushAck sent on the current connection
        self._ack_dirty = trio.Event()

        # read state
        self.read_states: dict[str, F.ReadState] = {}
        self.receipts: dict[tuple[str, str], int] = {}  # (conv, reader) -> seq
        self._read_wanted: dict[str, int] = {}  # markers sent but not yet confirmed
        self._views: dict[str, dict[bytes, F.Message]] = {}

        self._session: Optional[_Session] = None
        self._zstd: Optional[tuple[FrameCompressor, FrameDecompressor]] = None  # made once, shared by sessions
        self._ever_connected = False
        self._connected = trio.Event()
        self._closed = False
        self._fatal: Optional[BaseException] = None
        self._sync_waiters: dict[int, tuple[trio.Event, list[F.HistoryResp]]] = {}
        self._next_req = 1
        self._stats = {"connects": 0, "retransmits": 0, "duplicates_dropped": 0, "events_dropped": 0, "acks_sent": 0, "frames_in": 0, "frames_out": 0}

    # ------------------------------------------------------------ time

    def local_now(self) -> int:
        return self._clock()

    def server_now(self) -> int:
        """The broker's clock as estimated at the last login (µs)."""
        return self._clock() + self._offset

    @property
    def clock_offset(self) -> int:
        return self._offset

    def _stamp(self) -> int:
        # Calibrated, and never backwards within this client: one sender's
        # messages are displayed in the order of these stamps.
        t = max(self._last_stamp + 1, self._clock() + self._offset)
        self._last_stamp = t
        return t

    def _new_local_id(self) -> int:
        # Unique per device across restarts as long as the clock does not go
        # back by more than the gap between two runs.
        lid = max(self._last_local_id + 1, self._clock())
        self._last_local_id = lid
        return lid

    # ------------------------------------------------------------ upstream

    async def send(self, conv: str, payload: bytes, *, local_id: Optional[int] = None, timeout: Optional[float] = None) -> Sent:
        """Send and wait for the durable SendAck.  Raises SendError (refused),
        SendTimeout (deadline), AuthFailed/ClientClosed (client stopped)."""
        self._check_alive()
        if local_id is None:
            lid = self._new_local_id()
        else:
            lid = local_id
            self._last_local_id = max(self._last_local_id, lid)
        p = self._pending.get(lid)
        if p is None:
            p = _Pending(lid, conv, bytes(payload), self._stamp())
            self._pending[lid] = p
            self._queue.append(p)
            self._fill_window()
        deadline = self.config.send_timeout if timeout is None else timeout
        with trio.move_on_after(deadline):
            await p.done.wait()
        if not p.done.is_set():
            self._drop_pending(p)
            raise SendTimeout(lid)
        if p.error is not None:
            raise p.error
        assert p.result is not None
        return p.result

    def _drop_pending(self, p: _Pending) -> None:
        if self._pending.pop(p.local_id, None) is not None:
            if p.sent_at is not None:
                self._on_wire -= 1
                p.sent_at = None
            try:
                self._queue.remove(p)
            except ValueError:
                pass
            self._fill_window()

    def _fill_window(self) -> None:
        s = self._session
        if s is None or s.closed or trio.current_time() < self._hold_until:
            return
        limit = min(s.window, int(self._cwnd))
        while self._queue and self._on_wire < limit:
            p = self._queue.popleft()
            if p.local_id not in self._pending:
                continue
            self._transmit(s, p)

    def _transmit(self, s: _Session, p: _Pending) -> None:
        if p.sent_at is None:
            self._on_wire += 1
        else:
            self._stats["retransmits"] += 1
        p.sent_at = trio.current_time()
        p.attempts += 1
        self._send_frame(s, F.SendReq(p.local_id, p.conv, p.client_time, p.payload))

    def _finish(self, p: _Pending, result: Optional[Sent], error: Optional[BaseException]) -> None:
        p.result, p.error = result, error
        if p.sent_at is not None:
            self._on_wire -= 1
            p.sent_at = None
        self._pending.pop(p.local_id, None)
        p.done.set()
        self._fill_window()

    def _on_send_ack(self, s: _Session, f: F.SendAck) -> None:
        p = self._pending.get(f.local_id)
        if p is None:
            return  # a late duplicate ack of a send already answered
        code = ErrorCode(f.code) if f.code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL
        if code is ErrorCode.OK:
            sent = Sent(f.local_id, p.conv, f.msg_id, f.seq, f.server_time, p.client_time)
            self._remember(F.Message(0, f.msg_id, p.conv, f.seq, self.user, self.device, p.client_time, f.server_time, p.payload))
            self._finish(p, sent, None)
        elif code in _FINAL_CODES:
            self._finish(p, None, SendError(code, f.local_id))
        else:
            # STORE_UNAVAILABLE, TOO_MANY_IN_FLIGHT, RATE_LIMITED...: the broker
            # wants us to slow down.  Hold the whole queue (not just this
            # message: sending the others would only earn more refusals) for
            # a jittered, growing delay, then resend with the same local id.
            if p.sent_at is not None:
                self._on_wire -= 1
                p.sent_at = None
            self._requeue(p)
            self._refusals += 1
            # ...and send less at once afterwards (multiplicative decrease).
            self._cwnd = max(1.0, self._cwnd / 2)
            delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** min(self._refusals, 16))
            until = trio.current_time() + delay * (0.5 + self._rng.random())
            if until > self._hold_until:
                self._hold_until = until
                assert s.nursery is not None
                s.nursery.start_soon(self._resume_sending_at, until)
            return
        self._refusals = 0
        self._cwnd = min(float(s.window), self._cwnd + 1.0)  # additive increase

    def _requeue(self, p: _Pending) -> None:
        """Put ``p`` back in the queue at its place (local ids are in send order)."""
        q = self._queue
        i = len(q)
        while i > 0 and q[i - 1].local_id > p.local_id:
            i -= 1
        q.insert(i, p)

    async def _resume_sending_at(self, when: float) -> None:
        await trio.sleep_until(when)
        self._fill_window()

    # ------------------------------------------------------------ downstream

    async def events(self) -> AsyncIterator[Event]:
        """Everything that happens, in order.  Taking a MessageReceived from
        this iterator is what lets the SDK acknowledge it."""
        while True:
            while not self._events:
                if self._fatal is not None and not isinstance(self._fatal, ClientClosed):
                    raise self._fatal
                if self._closed or self._fatal is not None:
                    return
                self._events_ready = trio.Event()
                await self._events_ready.wait()
            ev, ack = self._events.popleft()
            if ack > self._taken_upto:
                self._taken_upto = ack
                self._ack_dirty.set()
            if ev is not None:
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

    def _emit(self, ev: Optional[Event], ack: int = 0) -> None:
        self._events.append((ev, ack))
        self._events_ready.set()
        if len(self._events) > self.config.event_limit and not isinstance(ev, MessageReceived):
            self._shed_notifications()

    def _shed_notifications(self) -> None:
        """An app that never takes its events: messages are bounded by the
        broker's push window, but read-state notifications are not.  Drop the
        oldest of those (the current state stays queryable: read_state(),
        receipt()); never a message, never an ack marker."""
        excess = len(self._events) - self.config.event_limit // 2
        kept: deque[tuple[Optional[Event], int]] = deque()
        for ev, ack in self._events:
            if excess > 0 and ev is not None and not isinstance(ev, MessageReceived):
                excess -= 1
                if ack:
                    kept.append((None, ack))
                self._stats["events_dropped"] += 1
                continue
            kept.append((ev, ack))
        self._events = kept

    def _on_push(self, f: F.Push) -> None:
        if f.position <= self._enqueued_upto:
            self._stats["duplicates_dropped"] += len(f.messages)
            return  # all of it is already queued or taken (re-push after reconnect)
        fresh = [m for m in f.messages if m.position > self._enqueued_upto]
        self._stats["duplicates_dropped"] += len(f.messages) - len(fresh)
        self._enqueued_upto = f.position
        for i, m in enumerate(fresh):
            self._remember(m)
            st = self.read_states.get(m.conv)
            if st is None:
                st = F.ReadState(m.conv, 0, 0, 0)
            if m.seq > st.last_seq:
                # A message the last ReadState did not count yet.
                fresh_unread = st.unread + int(m.sender != self.user and m.seq > st.read_seq)
                self.read_states[m.conv] = F.ReadState(m.conv, st.read_seq, m.seq, fresh_unread)
            # The push's position is acked once its last message was taken.
            self._emit(MessageReceived(m), f.position if i == len(fresh) - 1 else 0)
        if not fresh:
            self._emit(None, f.position)  # nothing to show (own messages): ack in turn

    async def _acker(self, s: _Session) -> None:
        while True:
            await self._ack_dirty.wait()
            self._ack_dirty = trio.Event()
            await trio.sleep(self.config.ack_delay)  # gather more takes into one ack
            if self._taken_upto > self._acked_upto:
                self._acked_upto = self._taken_upto
                self._stats["acks_sent"] += 1
                self._send_frame(s, F.PushAck(self._taken_upto))

    # ------------------------------------------------------------ read state

    async def mark_read(self, conv: str, seq: int) -> None:
        """Move this user's read marker of ``conv`` to ``seq`` (never back).
        The broker confirms with a ReadStates; other devices get one too and
        the 1:1 peer a ReadReceipt.  Until confirmed, the marker is sent
        again after every reconnect."""
        self._check_alive()
        st = self.read_states.get(conv)
        if st is not None and seq > st.read_seq:
            # Optimistic: the confirmation brings the exact unread count.
            self.read_states[conv] = F.ReadState(conv, seq, st.last_seq, 0 if seq >= st.last_seq else st.unread)
        if seq > self._read_wanted.get(conv, 0):
            self._read_wanted[conv] = seq
        s = self._session
        if s is not None and not s.closed:
            self._send_frame(s, F.Read(conv, seq))
        await trio.lowlevel.checkpoint()

    def read_state(self, conv: str) -> F.ReadState:
        return self.read_states.get(conv, F.ReadState(conv, 0, 0, 0))

    def unread(self, conv: str) -> int:
        return self.read_state(conv).unread

    def receipt(self, conv: str, reader: str) -> int:
        """How far ``reader`` has read ``conv`` (1:1 read receipt), 0 if unknown."""
        return self.receipts.get((conv, reader), 0)

    def _on_read_states(self, f: F.ReadStates) -> None:
        for st in f.entries:
            if st.read_seq >= self._read_wanted.get(st.conv, 1 << 64):
                del self._read_wanted[st.conv]  # confirmed durable
            old = self.read_states.get(st.conv)
            if old is not None and old.read_seq > st.read_seq:
                continue  # markers never move back
            self.read_states[st.conv] = st
            self._emit(ReadStateChanged(st))

    def _on_receipt(self, f: F.ReadReceipt) -> None:
        key = (f.conv, f.reader)
        if f.seq > self.receipts.get(key, 0):
            self.receipts[key] = f.seq
            self._emit(ReceiptReceived(f.conv, f.reader, f.seq))

    # ------------------------------------------------------------ local view & history

    def _remember(self, m: F.Message) -> None:
        view = self._views.setdefault(m.conv, {})
        view[m.msg_id] = m
        if len(view) > self.config.view_limit:
            # Bounded memory: forget the oldest (fetch_history brings them back).
            excess = len(view) - self.config.view_limit
            olds = [min(view.values(), key=_by_seq)] if excess == 1 else sorted(view.values(), key=_by_seq)[:excess]
            for old in olds:
                del view[old.msg_id]

    def view(self, conv: str) -> list[F.Message]:
        """The messages of ``conv`` this client has (sent, received, fetched),
        in display order: one sender's by their local time, senders
        interleaved by server time -- the same on every device."""
        return display_order(list(self._views.get(conv, {}).values()))

    async def fetch_history(self, conv: str, from_seq: int = 0, limit: int = 100, *, backward: bool = False) -> list[F.Message]:
        """A page of ``conv``'s stored history (also added to :meth:`view`)."""
        self._check_alive()
        req = self._next_req
        self._next_req += 1
        done = trio.Event()
        box: list[F.HistoryResp] = []
        self._sync_waiters[req] = (done, box)
        try:
            with trio.fail_after(self.config.send_timeout):
                while not done.is_set():
                    # Asked again on a new session if the answer was lost.
                    s = await self._wait_session()
                    self._send_frame(s, F.HistoryReq(req, conv, from_seq, limit, backward))
                    with trio.move_on_after(self.config.ack_timeout * 2):
                        await done.wait()
        finally:
            self._sync_waiters.pop(req, None)
        resp = box[0]
        if resp.code != ErrorCode.OK:
            raise SendError(ErrorCode(resp.code), 0, f"history of {conv!r}: {ErrorCode(resp.code).name}")
        for m in resp.messages:
            self._remember(m)
        return list(resp.messages)

    # ------------------------------------------------------------ status

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.closed

    async def wait_connected(self) -> None:
        while not self.connected:
            self._check_alive()
            await self._connected.wait()

    def statistics(self) -> dict[str, int]:
        s = dict(self._stats)
        s["pending_sends"] = len(self._pending)
        s["queued_events"] = len(self._events)
        s["taken_upto"] = self._taken_upto
        return s

    def _check_alive(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ClientClosed("client closed")

    # ------------------------------------------------------------ connection management

    async def _resolve_token(self) -> bytes:
        source = self._token
        tok: Union[str, bytes, Awaitable[Union[str, bytes]]] = source() if callable(source) else source
        if not isinstance(tok, (str, bytes)):
            tok = await tok
        return tok.encode() if isinstance(tok, str) else bytes(tok)

    async def _open_stream(self, nursery: trio.Nursery) -> trio.abc.Stream:
        ep = self.endpoint
        stream: trio.abc.Stream = await trio.open_tcp_stream(ep.host, ep.port)
        if ep.secure:
            ctx = self._ssl or ssl.create_default_context()
            stream = trio.SSLStream(stream, ctx, server_hostname=ep.host)
            # Handshake now: a certificate that does not verify is reported
            # here, as itself, not later as a silent WebSocket stall.
            await stream.do_handshake()
        if ep.websocket:
            # trio-websocket runs its reader in `nursery`, which lives as
            # long as this connection.
            ws = await wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]
                f"{ep.host}:{ep.port}",
                ep.path,
                message_queue_size=64,
                max_message_size=max(self.config.max_frame, WebSocketStream.MAX_MESSAGE) + 16,
            )
            return WebSocketStream(ws)
        return stream

    async def _connect_once(self, first: Optional[trio.TaskStatus[None]]) -> Optional[BaseException]:
        """One connection from dial to hang-up; returns why it ended."""
        end: Optional[BaseException] = None
        try:
            async with trio.open_nursery() as conn_nursery:
                stream: Optional[trio.abc.Stream] = None
                try:
                    with trio.fail_after(self.config.connect_timeout):
                        stream = await self._open_stream(conn_nursery)
                    await self._serve(stream, first)
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
        return end

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve the session, reconnect with backoff -- until closed."""
        attempt = 0
        first: Optional[trio.TaskStatus[None]] = task_status
        first_deadline = trio.current_time() + self.config.connect_timeout
        while not self._closed:
            began = trio.current_time()
            exc = await self._connect_once(first)
            if isinstance(exc, AuthFailed):
                self._stop(exc)
                if first is not None:
                    raise exc
                return
            if exc is not None:
                if isinstance(exc, _SessionEnded) and exc.code is CloseCode.REPLACED:
                    self._stop(ClientClosed("this device logged in on another connection"))
                    return
                if first is not None and not self._ever_connected:
                    # The first connection: a refused port or a certificate
                    # that does not verify will not get better; anything else
                    # (a reset mid-login on a bad network...) is retried until
                    # connect_timeout has passed since open_client began.
                    permanent = isinstance(exc, (ConnectionRefusedError, ssl.SSLError, ConnectionRejected)) or isinstance(
                        exc.__cause__, (ConnectionRefusedError, ssl.SSLError)
                    )
                    if permanent or trio.current_time() >= first_deadline:
                        raise ConnectFailed(f"cannot connect to {self.url}: {_root_cause(exc)}") from exc
                log.debug("connection lost: %r", exc)
            if self._ever_connected:
                first = None
            if self._closed:
                return
            # A session that lived a while resets the backoff.
            attempt = 0 if trio.current_time() - began > 5.0 else attempt + 1
            delay = min(self.config.backoff_max, self.config.backoff_initial * 2 ** min(attempt, 16))
            await trio.sleep(delay * (0.5 + self._rng.random()))  # jitter: no thundering herd

    def _stop(self, exc: BaseException) -> None:
        self._fatal = exc
        for p in list(self._pending.values()):
            self._finish(p, None, exc)
        self._events_ready.set()
        self._connected.set()

    def _guarded(self, s: _Session, fn: Callable[..., Awaitable[None]], *args: object) -> Callable[[], Awaitable[None]]:
        """Wrap a session task: the first failure ends the session (recorded
        in ``s.end``) instead of escaping as an ExceptionGroup."""

        async def run() -> None:
            try:
                await fn(*args)
            except _DISCONNECTS as exc:
                if s.end is None:
                    s.end = exc
                assert s.nursery is not None
                s.nursery.cancel_scope.cancel()

        return run

    async def _serve(self, stream: trio.abc.Stream, task_status: Optional[trio.TaskStatus[None]]) -> None:
        """One connection: Login, calibrate, then run until it breaks; raises
        why it ended."""
        s = _Session(stream)
        decoder = Decoder(self.config.max_frame)
        try:
            async with trio.open_nursery() as nursery:
                s.nursery = nursery
                nursery.start_soon(self._guarded(s, self._session_main, s, decoder, task_status))
            if s.end is not None:
                raise s.end
        finally:
            s.closed = True
            if self._session is s:
                self._session = None
            # Whatever was on the wire is unconfirmed: it goes again next time.
            for p in self._pending.values():
                if p.sent_at is not None:
                    p.sent_at = None
                    self._on_wire -= 1
                    if p not in self._queue:
                        self._queue.append(p)
            self._queue = deque(sorted(self._queue, key=lambda p: p.local_id))
            if s.end is not None:
                end = s.end
                if isinstance(end, _SessionEnded):
                    self._emit(Disconnected(end.code, end.reason))
                elif isinstance(end, AuthFailed):
                    self._emit(Disconnected(CloseCode.AUTH_FAILED, str(end)))
                else:
                    self._emit(Disconnected(None, repr(end)))
        raise _SessionEnded(None, "session ended")  # pragma: no cover - only via cancellation

    async def _session_main(self, s: _Session, decoder: Decoder, task_status: Optional[trio.TaskStatus[None]]) -> None:
        assert s.nursery is not None
        nursery = s.nursery
        token = await self._resolve_token()
        caps = F.CAP_ZSTD if self.config.compression and _zstd_available() else 0
        nursery.start_soon(self._guarded(s, self._writer, s))
        self._send_frame(s, F.Login(token, self.device, self._clock(), self._taken_upto, caps))
        with trio.fail_after(self.config.connect_timeout):
            ack = await self._wait_login_ack(s, decoder)
        self.user = ack.user
        s.heartbeat = ack.heartbeat_ms / 1000.0
        s.window = max(1, ack.window)
        if ack.caps & F.CAP_ZSTD:
            if self._zstd is None:
                self._zstd = (FrameCompressor(), FrameDecompressor())
            s.compress = self._zstd[0].compress
            decoder.enable_decompression(self._zstd[1])
        # Resume: never re-queue what the app already has.
        if ack.position > self._enqueued_upto:
            self._enqueued_upto = ack.position
        self._taken_upto = max(self._taken_upto, ack.position)
        self._acked_upto = ack.position
        self._stats["connects"] += 1
        held = await self._calibrate(s, decoder)
        self._emit(Connected(ack.user, self.device, ack.position, ack.gap, self._offset, self._rtt))
        for frame in held:
            self._dispatch(s, frame)
        nursery.start_soon(self._guarded(s, self._reader, s, decoder))
        nursery.start_soon(self._guarded(s, self._acker, s))
        if s.heartbeat > 0:
            nursery.start_soon(self._guarded(s, self._heartbeat, s))
        self._session = s
        # Everything not yet acked goes again, same local ids, in order.
        for p in self._pending.values():
            if p.sent_at is not None:
                self._on_wire -= 1
                p.sent_at = None
        self._queue = deque(sorted(self._pending.values(), key=lambda p: p.local_id))
        self._fill_window()
        if trio.current_time() < self._hold_until:  # a hold from the previous session
            nursery.start_soon(self._resume_sending_at, self._hold_until)
        for conv, seq in self._read_wanted.items():
            self._send_frame(s, F.Read(conv, seq))
        if self._taken_upto > self._acked_upto:
            self._ack_dirty.set()
        nursery.start_soon(self._guarded(s, self._retransmitter, s))
        self._ever_connected = True
        self._connected.set()
        self._connected = trio.Event()
        if task_status is not None:
            task_status.started()

    async def _wait_login_ack(self, s: _Session, decoder: Decoder) -> F.LoginAck:
        while True:
            for frame in decoder:
                if isinstance(frame, F.LoginAck):
                    return frame
                if isinstance(frame, F.Close):
                    raise _ended_by(frame)
            await _read_more(s, decoder, "before LoginAck")

    async def _calibrate(self, s: _Session, decoder: Decoder) -> list[object]:
        """Calibration round trips right after login; returns the other frames
        that arrived meanwhile (dispatched by the caller, in order)."""
        samples: list[tuple[int, int]] = []  # (rtt, offset)
        held: list[object] = []
        for _ in range(max(1, self.config.time_samples)):
            t0 = self._clock()
            self._send_frame(s, F.CalibrateReq(t0))
            resp: Optional[F.CalibrateResp] = None
            with trio.move_on_after(self.config.ack_timeout):
                while resp is None:
                    for frame in decoder:
                        if type(frame) is F.CalibrateResp and frame.client_time == t0:
                            resp = frame
                            break
                        held.append(frame)
                    else:
                        await _read_more(s, decoder, "during clock calibration")
            if resp is None:
                break
            t1 = self._clock()
            rtt = max(0, t1 - t0)
            # The broker read its clock somewhere in [t0, t1]: assume the middle;
            # the error is at most rtt/2, so the smallest rtt wins.
            samples.append((rtt, resp.server_time - (t0 + t1) // 2))
        if samples:
            self._rtt, self._offset = min(samples)
        return held

    async def _reader(self, s: _Session, decoder: Decoder) -> None:
        while True:
            for frame in decoder:
                s.last_recv = trio.current_time()
                self._stats["frames_in"] += 1
                self._dispatch(s, frame)
            await _read_more(s, decoder, "by the broker")

    def _dispatch(self, s: _Session, f: object) -> None:
        t = type(f)
        if t is F.SendAck:
            self._on_send_ack(s, f)  # type: ignore[arg-type]
        elif t is F.Push:
            self._on_push(f)  # type: ignore[arg-type]
        elif t is F.ReadStates:
            self._on_read_states(f)  # type: ignore[arg-type]
        elif t is F.ReadReceipt:
            self._on_receipt(f)  # type: ignore[arg-type]
        elif t is F.HistoryResp:
            w = self._sync_waiters.get(f.req_id)  # type: ignore[attr-defined]
            if w is not None:
                w[1].append(f)  # type: ignore[arg-type]
                w[0].set()
        elif t is F.Error:
            log.warning("broker error %s (ref %s): %s", f.code, f.ref, f.reason)  # type: ignore[attr-defined]
        elif t is F.Close:
            raise _ended_by(f)  # type: ignore[arg-type]
        elif t is F.Ping:
            self._send_frame(s, F.Pong(f.nonce))  # type: ignore[attr-defined]
        # Pong and anything else: liveness only (last_recv).

    async def _heartbeat(self, s: _Session) -> None:
        period = s.heartbeat
        nonce = 0
        while True:
            await trio.sleep(period / 2)
            now = trio.current_time()
            if now - s.last_recv > period * self.config.dead_after:
                raise _SessionEnded(None, "no traffic from the broker: dead link")
            if now - s.last_sent >= period * 0.9:
                nonce += 1
                self._send_frame(s, F.Ping(nonce))

    async def _retransmitter(self, s: _Session) -> None:
        timeout = self.config.ack_timeout
        while True:
            await trio.sleep(timeout / 4)
            now = trio.current_time()
            for p in list(self._pending.values()):
                if p.sent_at is not None and now - p.sent_at >= timeout:
                    self._transmit(s, p)

    # ------------------------------------------------------------ writing

    def _send_frame(self, s: _Session, frame: F.Frame) -> None:
        """Queue ``frame`` for the session's writer (never blocks; a broken
        session just drops it -- everything that matters is re-sent on the
        next session: unacked sends, unconfirmed read markers, the ack)."""
        if s.closed:
            return
        data = encode_frame(frame)
        if s.compress is not None:
            data = s.compress(data)
        s.buf.append(data)
        s.wake.set()
        self._stats["frames_out"] += 1

    async def _writer(self, s: _Session) -> None:
        while True:
            if not s.buf:
                s.wake = trio.Event()
                await s.wake.wait()
                continue
            data = b"".join(s.buf)
            s.buf.clear()
            s.writing = True
            await s.stream.send_all(data)
            s.writing = False
            s.last_sent = trio.current_time()

    async def _flush(self, s: _Session, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while (s.buf or s.writing) and not s.closed:
                await trio.sleep(0.002)

    async def _wait_session(self) -> _Session:
        while True:
            self._check_alive()
            s = self._session
            if s is not None and not s.closed:
                return s
            await self._connected.wait()

    async def aclose(self) -> None:
        """Say goodbye (Close NORMAL) and stop.  Unacked sends fail with
        ClientClosed; the broker keeps undelivered messages for next time."""
        if self._closed:
            return
        s = self._session
        if s is not None and not s.closed:
            # Flush what the app took so it is not pushed again next time.
            if self._taken_upto > self._acked_upto:
                self._send_frame(s, F.PushAck(self._taken_upto))
                self._acked_upto = self._taken_upto
            self._send_frame(s, F.Close(CloseCode.NORMAL, "client closing"))
            await self._flush(s, 1.0)
        self._closed = True
        self._stop(ClientClosed("client closed"))


def _ended_by(f: F.Close) -> Exception:
    """What a Close from the broker means for the session."""
    code = CloseCode(f.code) if f.code in CloseCode._value2member_map_ else None
    if code is CloseCode.AUTH_FAILED:
        return AuthFailed(f.reason)
    return _SessionEnded(code, f.reason)


async def _read_more(s: _Session, decoder: Decoder, when: str) -> None:
    data = await s.stream.receive_some(65536)
    if not data:
        raise _SessionEnded(None, f"connection closed {when}")
    decoder.feed(data)


def _by_seq(m: F.Message) -> int:
    return m.seq


def _root_cause(exc: BaseException) -> str:
    """The most telling error in ``exc``'s chain (an SSL or OS error if any:
    "certificate verify failed" says more than "BrokenResourceError")."""
    seen = exc
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, trio.TooSlowError):
            return "timed out (no answer within connect_timeout)"
        if isinstance(e, (ssl.SSLError, OSError)):
            return f"{type(e).__name__}: {e}"
        seen = e
        nxt = e.__cause__ or e.__context__
        if isinstance(nxt, trio.Cancelled):  # the mechanism of a timeout, never the cause
            break
        e = nxt
    return f"{type(seen).__name__}: {seen}" if str(seen) else repr(exc)


def _zstd_available() -> bool:
    return FrameCompressor is not None


@asynccontextmanager
async def open_client(
    url: str,
    token: TokenSource,
    device: str = "default",
    *,
    config: ClientConfig = ClientConfig(),
    ssl_context: Optional[ssl.SSLContext] = None,
    clock: Callable[[], int] = _local_clock_us,
    seed: Optional[int] = None,
) -> AsyncIterator[Client]:
    """Connect (URL schemes tcp, tls, ws, wss), log in, calibrate the clock;
    keep the connection alive and reconnect while the block runs.

    Raises :class:`AuthFailed` or :class:`ConnectFailed` if the first
    connection cannot be made."""
    client = Client(url, token, device, config=config, ssl_context=ssl_context, clock=clock, seed=seed)
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                nursery.cancel_scope.cancel()
