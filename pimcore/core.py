"""The broker core: sans-IO.  Events in, commands out; time is passed in.

The network layer (or an embedding backend) owns sockets, threads and the
clock.  It tells the core what happened -- a connection opened, bytes or a
frame arrived, a connection was lost, a store batch became durable, time
passed -- and gets back a list of commands:

* :class:`SendFrame` -- write this frame to that connection;
* :class:`CloseConnection` -- send a Close frame with this code, then hang up;
* :class:`Commit` -- hand this batch to :meth:`Store.commit`, then report the
  outcome with :meth:`Broker.batch_committed` or :meth:`Broker.batch_failed`.

The core calls the store only for reads (and for the rare control-plane group
admin calls); every write of the message path goes through :class:`Commit`, so
the store may be slow, threaded or remote without the core noticing.

Guarantees and where they are kept
----------------------------------
* **Upstream**: a SendAck with code OK is emitted only from
  :meth:`batch_committed`, i.e. after the message is durable.  A retry that
  arrives while its original is still in flight joins it as a second waiter
  (no second copy is even proposed); a retry of a committed message is
  answered by the store's dedupe inside the transaction (:class:`Duplicate`),
  with the original's identity.
* **Downstream**: the message is in every recipient's inbox in the same
  transaction that stores it, before any Push.  Delivery to a device runs from
  its position (what it acked) in the inbox, never from memory, so a device
  that was offline, slow or disconnected mid-push catches up exactly.
* **Group commit**: at most one batch is in flight; everything that arrives
  meanwhile (from every connection) waits in the next batch.  The durable
  sync is paid per batch, not per message.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Optional, Sequence, Union

from . import frames as F
from .clock import HybridClock
from .codec import Decoder
from .errors import AuthError, CloseCode, ErrorCode, ProtocolError
from .store.base import (
    AckPosition,
    Appended,
    Duplicate,
    MarkRead,
    NewMessage,
    Op,
    Reclaim,
    Reclaimed,
    ReadMarked,
    Rejected,
    Result,
    Store,
    StoredMessage,
    TouchDevice,
    WriteBatch,
    direct_members,
    valid_conversation,
    valid_id,
)

__all__ = [
    "Limits",
    "BrokerConfig",
    "Identity",
    "Authenticator",
    "ContentFilter",
    "SendFrame",
    "CloseConnection",
    "Commit",
    "Command",
    "Broker",
    "drain",
]

SECOND = 1_000_000  # µs
DAY = 86_400 * SECOND

#: The capabilities this core can grant: zstd frame compression (PROTOCOL.md §7).
SUPPORTED_CAPS = F.CAP_ZSTD


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection and per-request limits, announced in LoginAck."""

    max_frame: int = 1 << 20  # bytes, one frame on the wire
    max_payload: int = 64 * 1024  # bytes, one message's payload
    window: int = 256  # SendReqs awaiting their SendAck, per connection
    push_batch: int = 64  # messages per Push frame
    push_window: int = 1024  # delivered-but-unacked inbox positions per device
    # ...and payload bytes: with large messages the position window alone
    # would let one device pin push_window * max_payload bytes of buffers.
    push_window_bytes: int = 1 << 20
    history_page: int = 200  # messages per HistoryResp
    read_state_batch: int = 256  # ReadState entries per ReadStates frame at login
    heartbeat_ms: int = 0  # announced: clients Ping when idle this long; 0 = no heartbeats
    # Sustained SendReqs per second per connection (token bucket), 0 = unlimited;
    # send_burst is the bucket size (a burst a well-behaved client may send at once).
    send_rate: float = 0.0
    send_burst: int = 256

    def __post_init__(self) -> None:
        for name in ("max_frame", "max_payload", "window", "push_batch", "push_window", "push_window_bytes", "history_page", "read_state_batch", "send_burst"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1")
        if self.heartbeat_ms < 0 or self.send_rate < 0:
            raise ValueError("Limits.heartbeat_ms and Limits.send_rate must be >= 0")
        if self.max_payload > self.max_frame:
            raise ValueError("Limits.max_payload cannot exceed max_frame")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token belongs to.  ``device`` set means the token is bound to it;
    ``expires`` (µs, the broker's clock) ends the session when the token does:
    it is closed with TOKEN_EXPIRED and the client logs in with a fresh one."""

    user: str
    device: Optional[str] = None
    expires: Optional[int] = None


#: ``authenticate(token, now) -> Identity``; raises :class:`AuthError` to refuse.
Authenticator = Callable[[bytes, int], Identity]

#: ``content_filter(user, conv, payload) -> None | reason``: a reason rejects the
#: message with ``ErrorCode.REJECTED`` before anything is stored.
ContentFilter = Callable[[str, str, bytes], Optional[str]]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    limits: Limits = field(default_factory=Limits)
    max_batch_ops: int = 4096  # ops in one store transaction
    login_timeout: int = 10 * SECOND  # a connection must log in within this
    # A logged-in connection that sends nothing (not even a Ping) for this long
    # is a dead peer: closed with IDLE_TIMEOUT.  0 = never.  Pick it a few
    # times Limits.heartbeat_ms, so one lost Ping does not kill a session.
    idle_timeout: int = 0
    # A connection refused this many SendReqs in a row for exceeding
    # Limits.send_rate is closed with RATE_LIMITED (it ignores the refusals).
    rate_limit_strikes: int = 1024
    # A batch holding nothing but delivery acks (AckPosition, TouchDevice)
    # waits up to this long (µs) for company -- a message, a read -- before it
    # is committed alone.  Losing such an op only re-delivers (the position
    # moves back to an older stored one; clients dedupe by position), so it
    # need not pay a sync of its own: at one message in flight this halves
    # the syncs per message (message, then the recipient's ack).  0 = never wait.
    ack_delay: int = 0
    reclaim_interval: int = 60 * SECOND
    device_retention: int = 30 * DAY  # devices unseen this long stop holding inbox entries
    inbox_max_age: int = 90 * DAY  # inbox entries older than this are reclaimed regardless
    content_filter: Optional[ContentFilter] = None


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class SendFrame:
    conn: int
    frame: F.Frame


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Send ``Close(code, reason)`` on ``conn`` and close it.  The core has
    already forgotten the connection; events for it are ignored."""

    conn: int
    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Commit:
    batch: WriteBatch


Command = Union[SendFrame, CloseConnection, Commit]


# ---------------------------------------------------------------- internal state


class _ConnState(Enum):
    # AWAITING_LOGIN --Login accepted--> ACTIVE ; any --close/loss--> forgotten.
    # Only Login, Ping and Close are accepted before ACTIVE: nothing a client
    # sends can touch the store before its token was checked.
    AWAITING_LOGIN = 1
    ACTIVE = 2


class _Conn:
    __slots__ = (
        "id", "state", "opened", "last_seen", "decoder", "user", "device", "inflight", "tokens", "refill_at", "strikes",
        "expires",
    )

    def __init__(self, conn_id: int, now: int) -> None:
        self.id = conn_id
        self.state = _ConnState.AWAITING_LOGIN
        self.opened = now
        self.last_seen = now  # last time any byte arrived (idle timeout)
        # Send-rate token bucket (Limits.send_rate): tokens left, as of refill_at.
        self.tokens = 0.0
        self.refill_at = now
        self.strikes = 0  # consecutive RATE_LIMITED refusals
        self.expires: Optional[int] = None  # the token's expiry, if it has one
        self.decoder: Optional[Decoder] = None  # created on first receive_data
        self.user = ""
        self.device = ""
        self.inflight = 0  # SendReqs of this connection awaiting a SendAck


class _Device:
    """An online device session.

    Invariant: acked <= sent_upto <= head of the user's inbox.  Everything in
    (acked, sent_upto] was pushed and may be re-pushed after a reconnect;
    (sent_upto, head] is waiting for window space.  Delivery always reads the
    store from sent_upto, so nothing depends on what happened to be in memory.
    """

    __slots__ = ("conn", "user", "device", "acked", "sent_upto", "unacked", "unacked_bytes")

    def __init__(self, conn: int, user: str, device: str, position: int) -> None:
        self.conn = conn
        self.user = user
        self.device = device
        self.acked = position
        self.sent_upto = position
        # (upto, bytes) of each Push not yet covered by a PushAck, oldest first.
        self.unacked: deque[tuple[int, int]] = deque()
        self.unacked_bytes = 0


class _PendingSend:
    """A NewMessage proposed to the store; retries of the same key wait on it."""

    __slots__ = ("key", "digest", "waiters")

    def __init__(self, key: tuple[str, str, int], digest: bytes, conn: int) -> None:
        self.key = key
        self.digest = digest
        self.waiters = [conn]


class _ReadCtx:
    __slots__ = ("conn", "device")

    def __init__(self, conn: int, device: str) -> None:
        self.conn = conn
        self.device = device


_Ctx = Union[_PendingSend, _ReadCtx, None]


def message_digest(conv: str, payload: bytes) -> bytes:
    """What a retry must repeat exactly: the conversation and the payload."""
    h = hashlib.blake2b(conv.encode(), digest_size=16)
    h.update(b"\x00")
    h.update(payload)
    return h.digest()


def _to_frame_message(pos: int, m: StoredMessage) -> F.Message:
    return F.Message(pos, m.msg_id, m.conv, m.seq, m.sender, m.device, m.client_time, m.server_time, m.payload)


# ---------------------------------------------------------------- the broker


class Broker:
    """The sans-IO broker.  Not thread-safe: drive it from one thread/task."""

    def __init__(
        self,
        store: Store,
        authenticate: Authenticator,
        config: BrokerConfig = BrokerConfig(),
        *,
        node_id: Optional[bytes] = None,
    ) -> None:
        self.store = store
        self.config = config
        self._auth = authenticate
        self._node_id = node_id if node_id is not None else store.node_id()
        if len(self._node_id) != 8:
            raise ValueError("node_id must be 8 bytes")
        # Never stamp a time earlier than anything already stored (restart).
        self._clock = HybridClock()
        self._clock.observe(store.last_server_time())

        self._conns: dict[int, _Conn] = {}
        self._online: dict[str, dict[str, _Device]] = {}  # user -> device -> session
        self._heads: dict[str, int] = {}  # inbox head, for users with online devices
        # Messages the batch being finished appended to online users' inboxes,
        # (pos, message) in position order: a device that is caught up is
        # pushed these without reading them back from the store.
        self._fresh: dict[str, list[tuple[int, F.Message]]] = {}

        # The batch being built, and the one the store is working on.
        self._ops: list[Op] = []
        self._eager = 0  # ops in _ops that must not wait (not delivery acks)
        self._lazy_since: Optional[int] = None  # when an ack-only batch started waiting
        self._ctxs: list[_Ctx] = []
        self._ack_slot: dict[tuple[str, str], int] = {}  # coalesce acks in _ops
        self._read_slot: dict[tuple[str, str], int] = {}  # coalesce reads in _ops
        self._pending_sends: dict[tuple[str, str, int], _PendingSend] = {}
        # Positions acked by devices whose AckPosition is not durable yet: a
        # quick re-login must resume from here, not from the older stored one.
        self._acks_unsaved: dict[tuple[str, str], int] = {}
        self._inflight: Optional[tuple[WriteBatch, list[_Ctx]]] = None
        self._next_batch = 1
        self._next_reclaim: Optional[int] = None
        self._decompressor: Optional[Callable[[bytes, int], bytes]] = None  # shared: one thread

        self._stats = {
            "frames_in": 0,
            "frames_out": 0,
            "logins": 0,
            "auth_failures": 0,
            "protocol_errors": 0,
            "messages_stored": 0,
            "duplicates": 0,
            "rejected": 0,
            "batches": 0,
            "batch_failures": 0,
            "pushes": 0,
            "reclaimed_entries": 0,
        }

    # ------------------------------------------------------------ connections

    def connection_made(self, conn: int, now: int) -> list[Command]:
        if conn in self._conns:
            raise ValueError(f"connection {conn} already exists")
        self._conns[conn] = _Conn(conn, now)
        return []

    def connection_lost(self, conn: int, now: int) -> list[Command]:
        out: list[Command] = []
        self._forget(conn)
        self._maybe_commit(out, now)
        return out

    def receive_data(self, conn: int, data: bytes, now: int) -> list[Command]:
        """Bytes from the socket.  Framing errors close the connection with a
        clear code; nothing already acknowledged is affected."""
        c = self._conns.get(conn)
        if c is None:
            return []
        if c.decoder is None:
            c.decoder = Decoder(self.config.limits.max_frame)
        c.last_seen = now
        out: list[Command] = []
        try:
            c.decoder.feed(data)
            while True:
                frame = c.decoder.next_frame()
                if frame is None:
                    break
                self._dispatch(c, frame, now, out)
                if conn not in self._conns:  # closed by that frame
                    break
        except ProtocolError as exc:
            self._stats["protocol_errors"] += 1
            self._close(c, CloseCode.PROTOCOL_ERROR, f"{exc.code.name}: {exc}", out)
        self._maybe_commit(out, now)
        return out

    def receive_frame(self, conn: int, frame: F.Frame, now: int) -> list[Command]:
        """A decoded frame (for layers that decode themselves, and tests)."""
        c = self._conns.get(conn)
        out: list[Command] = []
        if c is not None:
            c.last_seen = now
            self._dispatch(c, frame, now, out)
            self._maybe_commit(out, now)
        return out

    # ------------------------------------------------------------ store outcome

    def batch_committed(self, batch_id: int, results: Iterable[Result], now: int) -> list[Command]:
        """The store made batch ``batch_id`` durable with these results."""
        if self._inflight is None or self._inflight[0].batch_id != batch_id:
            raise ValueError(f"batch {batch_id} is not in flight")
        batch, ctxs = self._inflight
        self._inflight = None
        results = tuple(results)
        if len(results) != len(batch.ops):
            raise ValueError("one result per op expected")
        self._stats["batches"] += 1
        out: list[Command] = []
        to_pump: set[str] = set()
        for op, ctx, res in zip(batch.ops, ctxs, results):
            if isinstance(op, NewMessage):
                assert isinstance(ctx, _PendingSend)
                self._finish_send(op, ctx, res, to_pump, out)
            elif isinstance(op, MarkRead):
                assert isinstance(ctx, _ReadCtx)
                if isinstance(res, ReadMarked):
                    self._finish_read(op, ctx, res, out)
                elif isinstance(res, Rejected):
                    # e.g. removed from the group while the Read waited for
                    # the batch: the store is authoritative, tell the device.
                    self._error(ctx.conn, res.code, 0, f"Read {op.conv!r}: {res.code.name.lower()}", out)
            elif isinstance(op, AckPosition):
                key = (op.user, op.device)
                if self._acks_unsaved.get(key, -1) <= op.position:
                    self._acks_unsaved.pop(key, None)
            elif isinstance(res, Reclaimed):
                self._stats["reclaimed_entries"] += res.entries
            # Acked / Touched need no reaction: the in-memory session already
            # moved; the store only makes it survive a restart.
        # SendAcks above, pushes after: the sender learns "durable" no later
        # than any recipient sees the message.
        for user in sorted(to_pump):
            for dev in self._online.get(user, {}).values():
                self._pump(dev, out, now)
        self._fresh.clear()
        self._maybe_commit(out, now)
        return out

    def batch_failed(self, batch_id: int, error: BaseException, now: int) -> list[Command]:
        """The store could not commit batch ``batch_id``: nothing of it took
        effect.  Senders get STORE_UNAVAILABLE and retry with the same local
        id (dedupe makes that safe whatever the store really did)."""
        if self._inflight is None or self._inflight[0].batch_id != batch_id:
            raise ValueError(f"batch {batch_id} is not in flight")
        batch, ctxs = self._inflight
        self._inflight = None
        self._stats["batch_failures"] += 1
        out: list[Command] = []
        for op, ctx in zip(batch.ops, ctxs):
            if isinstance(op, NewMessage):
                assert isinstance(ctx, _PendingSend)
                self._pending_sends.pop(ctx.key, None)
                self._ack_waiters(ctx, F.SendAck(op.local_id, ErrorCode.STORE_UNAVAILABLE, b"", 0, 0), out)
            elif isinstance(op, MarkRead):
                assert isinstance(ctx, _ReadCtx)
                self._error(ctx.conn, ErrorCode.STORE_UNAVAILABLE, 0, "read marker not saved; send Read again", out)
            # A lost AckPosition/TouchDevice only leaves the stored position
            # behind the real one: the device re-acks or re-logs in, and the
            # worst case is a re-delivery the client dedupes by position.
        # Do not immediately retry with whatever is pending: the driver reports
        # the failure, and the next event (or tick) proposes the next batch.
        return out

    # ------------------------------------------------------------ time

    def tick(self, now: int) -> list[Command]:
        """Call periodically (e.g. every second): login and idle timeouts,
        token expiry, reclamation."""
        out: list[Command] = []
        idle = self.config.idle_timeout
        deadline = now - self.config.login_timeout
        for c in list(self._conns.values()):
            if c.state is _ConnState.AWAITING_LOGIN and c.opened <= deadline:
                self._close(c, CloseCode.LOGIN_TIMEOUT, "no Login within the login timeout", out)
            elif idle and c.state is _ConnState.ACTIVE and c.last_seen <= now - idle:
                self._close(c, CloseCode.IDLE_TIMEOUT, "nothing received within the idle timeout", out)
            elif c.expires is not None and c.expires <= now:
                self._close(c, CloseCode.TOKEN_EXPIRED, "the session's token expired; log in with a fresh one", out)
        if self._next_reclaim is None:
            self._next_reclaim = now + self.config.reclaim_interval
        elif now >= self._next_reclaim:
            self._next_reclaim = now + self.config.reclaim_interval
            self._propose(Reclaim(now, self.config.device_retention, self.config.inbox_max_age), None)
        self._maybe_commit(out, now)
        return out

    # ------------------------------------------------------------ embedding API

    def create_group(self, conv: str, members: Iterable[str], now: int) -> None:
        """Control plane: create a group (synchronous store write)."""
        self.store.create_group(conv, members, now)

    def add_members(self, conv: str, users: Iterable[str]) -> None:
        self.store.add_members(conv, users)

    def remove_members(self, conv: str, users: Iterable[str]) -> None:
        self.store.remove_members(conv, users)

    def read_positions(self, conv: str) -> dict[str, int]:
        """Every member's read marker (group read status)."""
        return self.store.read_positions(conv)

    def unread(self, user: str, conv: str) -> int:
        return self.store.unread(user, conv)

    def online_devices(self, user: str) -> list[str]:
        return sorted(self._online.get(user, {}))

    def server_time(self, now: int) -> int:
        return self._clock.now(now)

    def statistics(self) -> dict[str, int]:
        s = dict(self._stats)
        s["connections"] = len(self._conns)
        s["online_devices"] = sum(len(d) for d in self._online.values())
        s["pending_ops"] = len(self._ops)
        s["batch_in_flight"] = int(self._inflight is not None)
        return s

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, c: _Conn, frame: object, now: int, out: list[Command]) -> None:
        self._stats["frames_in"] += 1
        if c.state is _ConnState.AWAITING_LOGIN:
            if isinstance(frame, F.Login):
                self._on_login(c, frame, now, out)
            elif isinstance(frame, F.Ping):
                self._send(c.id, F.Pong(frame.nonce), out)
            elif isinstance(frame, F.Close):
                self._close(c, CloseCode.NORMAL, "closed by client", out)
            else:
                self._close(c, CloseCode.PROTOCOL_ERROR, f"{type(frame).__name__} before Login", out)
            return
        handler = self._handlers.get(type(frame))
        if handler is None:
            self._stats["protocol_errors"] += 1
            self._close(c, CloseCode.PROTOCOL_ERROR, f"unexpected {type(frame).__name__} from a client", out)
            return
        handler(self, c, frame, now, out)

    # ------------------------------------------------------------ login

    def _on_login(self, c: _Conn, f: F.Login, now: int, out: list[Command]) -> None:
        try:
            ident = self._auth(f.token, now)
            if not valid_id(ident.user):
                raise AuthError("token names an invalid user id")
            if not valid_id(f.device):
                raise AuthError(f"invalid device id {f.device!r}")
            if ident.device is not None and ident.device != f.device:
                raise AuthError("token is bound to another device")
        except AuthError as exc:
            self._stats["auth_failures"] += 1
            self._close(c, CloseCode.AUTH_FAILED, str(exc) or "authentication failed", out)
            return
        user, device = ident.user, f.device

        # One connection per device: the newest wins (the old one is likely a
        # half-dead socket the device has already given up on).
        old = self._online.get(user, {}).get(device)
        if old is not None:
            old_conn = self._conns.get(old.conn)
            if old_conn is not None:
                self._close(old_conn, CloseCode.REPLACED, "the same device logged in again", out)

        # Resume point: the furthest of what the client says it processed and
        # what the store knows it acked, never below what was reclaimed, never
        # beyond what exists.
        head = self.store.inbox_head(user)
        floor = self.store.inbox_floor(user)
        stored = self.store.device(user, device)
        known = max(f.position, stored.position if stored is not None else 0, self._acks_unsaved.get((user, device), 0))
        gap = floor > known
        position = min(max(known, floor), head)

        c.state = _ConnState.ACTIVE
        c.user, c.device = user, device
        c.expires = ident.expires
        c.tokens = float(self.config.limits.send_burst)
        c.refill_at = now
        dev = _Device(c.id, user, device, position)
        self._online.setdefault(user, {})[device] = dev
        self._heads[user] = max(self._heads.get(user, 0), head)
        self._propose(TouchDevice(user, device, position, now), None)
        self._stats["logins"] += 1

        lim = self.config.limits
        caps = f.caps & SUPPORTED_CAPS
        if caps & F.CAP_ZSTD and c.decoder is not None:
            # The client may compress from the frame after this Login on.
            if self._decompressor is None:
                from .compress import FrameDecompressor

                self._decompressor = FrameDecompressor()
            c.decoder.enable_decompression(self._decompressor)
        self._send(
            c.id,
            F.LoginAck(
                user=user,
                device=device,
                server_time=self._clock.now(now),
                position=position,
                head=head,
                gap=gap,
                max_frame=lim.max_frame,
                max_payload=lim.max_payload,
                window=lim.window,
                heartbeat_ms=lim.heartbeat_ms,
                caps=caps,
            ),
            out,
        )
        self._send_read_state(c.id, user, out)
        self._pump(dev, out, now)

    def _send_read_state(self, conn: int, user: str, out: list[Command]) -> None:
        """At login: every conversation's marker and unread count (what the
        device missed while offline), then the peers' markers of 1:1 chats."""
        entries: list[F.ReadState] = []
        receipts: list[F.ReadReceipt] = []
        for conv in self.store.conversations(user):
            last = self.store.last_seq(conv)
            marker = self.store.read_marker(user, conv)
            entries.append(F.ReadState(conv, marker, last, self.store.unread(user, conv)))
            pair = direct_members(conv)
            if pair is not None:
                peer = pair[1] if pair[0] == user else pair[0]
                peer_mark = self.store.read_marker(peer, conv)
                if peer_mark:
                    receipts.append(F.ReadReceipt(conv, peer, peer_mark))
        step = self.config.limits.read_state_batch
        for i in range(0, len(entries), step):
            self._send(conn, F.ReadStates(tuple(entries[i : i + step])), out)
        for r in receipts:
            self._send(conn, r, out)

    # ------------------------------------------------------------ send path

    def _check_conversation(self, user: str, conv: str) -> ErrorCode:
        if not valid_conversation(conv):
            return ErrorCode.BAD_REQUEST
        pair = direct_members(conv)
        if pair is not None:
            return ErrorCode.OK if user in pair else ErrorCode.NOT_MEMBER
        if not self.store.conversation_exists(conv):
            return ErrorCode.UNKNOWN_CONVERSATION
        if not self.store.is_member(conv, user):
            return ErrorCode.NOT_MEMBER
        return ErrorCode.OK

    def _on_send(self, c: _Conn, f: F.SendReq, now: int, out: list[Command]) -> None:
        def refuse(code: ErrorCode) -> None:
            self._stats["rejected"] += 1
            self._send(c.id, F.SendAck(f.local_id, code, b"", 0, 0), out)

        lim = self.config.limits
        if lim.send_rate:
            # Token bucket: refill at send_rate per second up to send_burst.
            c.tokens = min(float(lim.send_burst), c.tokens + (now - c.refill_at) * lim.send_rate / SECOND)
            c.refill_at = now
            if c.tokens < 1.0:
                c.strikes += 1
                if c.strikes >= self.config.rate_limit_strikes:
                    self._close(c, CloseCode.RATE_LIMITED, "kept sending above the send rate limit", out)
                    return None
                return refuse(ErrorCode.RATE_LIMITED)
            c.tokens -= 1.0
            c.strikes = 0
        if c.inflight >= lim.window:
            return refuse(ErrorCode.TOO_MANY_IN_FLIGHT)
        if len(f.payload) > self.config.limits.max_payload:
            return refuse(ErrorCode.PAYLOAD_TOO_LARGE)
        code = self._check_conversation(c.user, f.conv)
        if code is not ErrorCode.OK:
            return refuse(code)
        key = (c.user, c.device, f.local_id)
        digest = message_digest(f.conv, f.payload)
        pending = self._pending_sends.get(key)
        if pending is not None:
            # The original is still on its way to disk: wait with it.
            if pending.digest != digest:
                return refuse(ErrorCode.DUPLICATE_CONFLICT)
            pending.waiters.append(c.id)
            c.inflight += 1
            return
        hook = self.config.content_filter
        if hook is not None:
            reason = hook(c.user, f.conv, f.payload)
            if reason is not None:
                refuse(ErrorCode.REJECTED)
                self._error(c.id, ErrorCode.REJECTED, f.local_id, reason, out)
                return
        server_time = self._clock.tick(now)
        msg_id = server_time.to_bytes(8, "big") + self._node_id
        op = NewMessage(msg_id, f.conv, c.user, c.device, f.local_id, f.client_time, server_time, f.payload, digest)
        ctx = _PendingSend(key, digest, c.id)
        self._pending_sends[key] = ctx
        c.inflight += 1
        self._propose(op, ctx)

    def _finish_send(self, op: NewMessage, ctx: _PendingSend, res: Result, to_pump: set[str], out: list[Command]) -> None:
        self._pending_sends.pop(ctx.key, None)
        if isinstance(res, Appended):
            self._stats["messages_stored"] += 1
            ack = F.SendAck(op.local_id, ErrorCode.OK, res.msg_id, res.seq, res.server_time)
            heads, fresh = self._heads, self._fresh
            for user, pos in res.positions:
                if user in heads:
                    if pos > heads[user]:
                        heads[user] = pos
                    to_pump.add(user)
                    # The Push entry as the store would give it back.
                    m = F.Message(pos, res.msg_id, op.conv, res.seq, op.sender, op.device, op.client_time, res.server_time, op.payload)
                    fresh.setdefault(user, []).append((pos, m))
        elif isinstance(res, Duplicate):
            self._stats["duplicates"] += 1
            ack = F.SendAck(op.local_id, ErrorCode.OK, res.msg_id, res.seq, res.server_time)
        elif isinstance(res, Rejected):
            self._stats["rejected"] += 1
            ack = F.SendAck(op.local_id, res.code, b"", 0, 0)
        else:  # pragma: no cover - a store contract violation
            raise TypeError(f"unexpected result {res!r} for NewMessage")
        self._ack_waiters(ctx, ack, out)

    def _ack_waiters(self, ctx: _PendingSend, ack: F.SendAck, out: list[Command]) -> None:
        for conn in ctx.waiters:
            c = self._conns.get(conn)
            if c is None:  # gone: the client retries after reconnecting
                continue
            c.inflight -= 1
            self._send(conn, ack, out)

    # ------------------------------------------------------------ delivery

    def _pump(self, dev: _Device, out: list[Command], now: int) -> None:
        """Push what the device has not been sent yet, within its window."""
        lim = self.config.limits
        head = self._heads.get(dev.user, 0)
        fresh = self._fresh.get(dev.user)
        while dev.sent_upto < head:
            room = lim.push_window - (dev.sent_upto - dev.acked)
            if room <= 0 or dev.unacked_bytes >= lim.push_window_bytes:
                return  # wait for a PushAck
            limit = min(room, lim.push_batch)
            entries: Optional[Sequence[tuple[int, Union[StoredMessage, F.Message]]]] = None
            if fresh:
                # Straight from the batch just committed, if it continues
                # exactly where this device is (positions are checked, so a
                # gap -- a device behind, another writer -- reads the store).
                i = dev.sent_upto + 1 - fresh[0][0]
                if 0 <= i < len(fresh):
                    entries = fresh[i : i + limit]
                    if entries[0][0] != dev.sent_upto + 1 or entries[-1][0] != dev.sent_upto + len(entries):
                        entries = None
            if entries is None:
                entries = self.store.inbox_range(dev.user, dev.sent_upto, limit)
            msgs: tuple[F.Message, ...] = ()
            if not entries:
                # Everything left was reclaimed (max age): skip to the head so
                # the device can ack past it.
                upto = head
            else:
                # Stay within the byte window too (at least one entry, so a
                # message larger than the window still gets through).
                budget = lim.push_window_bytes - dev.unacked_bytes
                for i, (_, m) in enumerate(entries):
                    budget -= len(m.payload) + 32
                    if budget < 0 and i > 0:
                        entries = entries[:i]
                        break
                upto = entries[-1][0]
                # The sending device already has its own message (SendAck);
                # its position is still covered by `upto`.
                msgs = tuple(
                    m if isinstance(m, F.Message) else _to_frame_message(pos, m)
                    for pos, m in entries
                    if not (m.device == dev.device and m.sender == dev.user)
                )
                if not msgs and dev.acked == dev.sent_upto:
                    # Nothing but this device's own sends, and nothing of
                    # ours outstanding: it has them all (their SendAcks), so
                    # its position moves as if it had acked -- no empty Push
                    # and PushAck round trip per batch for every sender.
                    dev.sent_upto = dev.acked = upto
                    self._record_ack(dev, upto, now)
                    continue
            dev.sent_upto = upto
            size = sum(len(m.payload) for m in msgs) + 32 * len(msgs)
            dev.unacked.append((upto, size))
            dev.unacked_bytes += size
            self._stats["pushes"] += 1
            self._send(dev.conn, F.Push(upto, msgs), out)

    def _on_push_ack(self, c: _Conn, f: F.PushAck, now: int, out: list[Command]) -> None:
        dev = self._online[c.user][c.device]
        if f.position > dev.sent_upto:
            self._close(c, CloseCode.PROTOCOL_ERROR, f"PushAck({f.position}) beyond what was pushed ({dev.sent_upto})", out)
            return
        if f.position <= dev.acked:
            return  # stale or repeated ack: positions never move back
        dev.acked = f.position
        while dev.unacked and dev.unacked[0][0] <= f.position:
            dev.unacked_bytes -= dev.unacked.popleft()[1]
        self._record_ack(dev, f.position, now)
        self._pump(dev, out, now)

    def _record_ack(self, dev: _Device, pos: int, now: int) -> None:
        """The device's position moved to ``pos``: make it durable (lazily)."""
        key = (dev.user, dev.device)
        self._acks_unsaved[key] = pos
        op = AckPosition(dev.user, dev.device, pos, now)
        slot = self._ack_slot.get(key)
        if slot is not None:
            self._ops[slot] = op  # batched acks: only the newest matters
        else:
            self._ack_slot[key] = len(self._ops)
            self._propose(op, None)

    # ------------------------------------------------------------ read state

    def _on_read(self, c: _Conn, f: F.Read, now: int, out: list[Command]) -> None:
        code = self._check_conversation(c.user, f.conv)
        if code is not ErrorCode.OK:
            self._error(c.id, code, 0, f"Read: {code.name.lower()} {f.conv!r}", out)
            return
        key = (c.user, f.conv)
        slot = self._read_slot.get(key)
        if slot is not None:
            prev = self._ops[slot]
            assert isinstance(prev, MarkRead)
            self._ops[slot] = MarkRead(c.user, f.conv, max(prev.seq, f.seq))
            self._ctxs[slot] = _ReadCtx(c.id, c.device)
            return
        self._read_slot[key] = len(self._ops)
        self._propose(MarkRead(c.user, f.conv, f.seq), _ReadCtx(c.id, c.device))

    def _finish_read(self, op: MarkRead, ctx: _ReadCtx, res: ReadMarked, out: list[Command]) -> None:
        if not res.changed:
            return
        # Every device of the reader, the reading one included: for it, the
        # ReadStates confirms the marker is durable and carries the store's
        # unread count (a client cannot count what it never downloaded).
        state = F.ReadStates((F.ReadState(res.conv, res.read_seq, res.last_seq, res.unread),))
        for dev in self._online.get(res.user, {}).values():
            self._send(dev.conn, state, out)
        pair = direct_members(res.conv)
        if pair is not None:
            peer = pair[1] if pair[0] == res.user else pair[0]
            receipt = F.ReadReceipt(res.conv, res.user, res.read_seq)
            for dev in self._online.get(peer, {}).values():
                self._send(dev.conn, receipt, out)

    # ------------------------------------------------------------ history & misc

    def _on_history(self, c: _Conn, f: F.HistoryReq, now: int, out: list[Command]) -> None:
        code = self._check_conversation(c.user, f.conv)
        if code is not ErrorCode.OK:
            self._send(c.id, F.HistoryResp(f.req_id, f.conv, code, (), False), out)
            return
        limit = max(1, min(f.limit, self.config.limits.history_page))
        page = self.store.history(f.conv, f.from_seq, limit + 1, f.backward)
        more = len(page) > limit
        msgs = tuple(_to_frame_message(0, m) for m in page[:limit])
        self._send(c.id, F.HistoryResp(f.req_id, f.conv, ErrorCode.OK, msgs, more), out)

    def _on_calibrate(self, c: _Conn, f: F.CalibrateReq, now: int, out: list[Command]) -> None:
        self._send(c.id, F.CalibrateResp(f.client_time, self._clock.now(now)), out)

    def _on_ping(self, c: _Conn, f: F.Ping, now: int, out: list[Command]) -> None:
        self._send(c.id, F.Pong(f.nonce), out)

    def _on_pong(self, c: _Conn, f: F.Pong, now: int, out: list[Command]) -> None:
        return None  # liveness is tracked by the network layer

    def _on_close(self, c: _Conn, f: F.Close, now: int, out: list[Command]) -> None:
        self._close(c, CloseCode.NORMAL, "closed by client", out)

    def _on_login_again(self, c: _Conn, f: F.Login, now: int, out: list[Command]) -> None:
        self._stats["protocol_errors"] += 1
        self._close(c, CloseCode.PROTOCOL_ERROR, "Login on a connection that is already logged in", out)

    _handlers: dict[type, Callable[..., None]] = {
        F.SendReq: _on_send,
        F.PushAck: _on_push_ack,
        F.Read: _on_read,
        F.HistoryReq: _on_history,
        F.CalibrateReq: _on_calibrate,
        F.Ping: _on_ping,
        F.Pong: _on_pong,
        F.Close: _on_close,
        F.Login: _on_login_again,
    }

    # ------------------------------------------------------------ plumbing

    def _send(self, conn: int, frame: F.Frame, out: list[Command]) -> None:
        self._stats["frames_out"] += 1
        out.append(SendFrame(conn, frame))

    def _error(self, conn: int, code: ErrorCode, ref: int, reason: str, out: list[Command]) -> None:
        if conn in self._conns:
            self._send(conn, F.Error(code, ref, reason), out)

    def _close(self, c: _Conn, code: CloseCode, reason: str, out: list[Command]) -> None:
        self._forget(c.id)
        out.append(CloseConnection(c.id, code, reason))

    def _forget(self, conn: int) -> None:
        c = self._conns.pop(conn, None)
        if c is None or c.state is not _ConnState.ACTIVE:
            return
        devices = self._online.get(c.user)
        if devices is not None:
            dev = devices.get(c.device)
            if dev is not None and dev.conn == conn:
                del devices[c.device]
            if not devices:
                del self._online[c.user]
                self._heads.pop(c.user, None)
        # SendReqs of this connection stay in their batch: they will be stored
        # and their acks dropped; the client's retry then gets a Duplicate.

    def _propose(self, op: Op, ctx: _Ctx) -> None:
        self._ops.append(op)
        self._ctxs.append(ctx)
        if type(op) not in _LAZY_OPS:
            self._eager += 1

    def flush(self, now: int) -> list[Command]:
        """Commit whatever is pending now, delivery acks included (shutdown)."""
        out: list[Command] = []
        self._maybe_commit(out, now, force=True)
        return out

    def _maybe_commit(self, out: list[Command], now: int, force: bool = False) -> None:
        """Hand the store the next batch if it is idle (group commit)."""
        if self._inflight is not None or not self._ops:
            return
        delay = self.config.ack_delay
        if delay and not self._eager and not force:
            # Only delivery acks: wait a little for something that needs a sync anyway.
            if self._lazy_since is None:
                self._lazy_since = now
            if now - self._lazy_since < delay:
                return
        self._lazy_since = None
        n = self.config.max_batch_ops
        ops, ctxs = self._ops[:n], self._ctxs[:n]
        del self._ops[:n], self._ctxs[:n]
        self._eager = sum(1 for op in self._ops if type(op) not in _LAZY_OPS)
        # Coalescing slots index into the batch being built; it just moved.
        self._ack_slot.clear()
        self._read_slot.clear()
        if self._ops:
            for i, op in enumerate(self._ops):
                if isinstance(op, AckPosition):
                    self._ack_slot[(op.user, op.device)] = i
                elif isinstance(op, MarkRead):
                    self._read_slot[(op.user, op.conv)] = i
        batch = WriteBatch(self._next_batch, tuple(ops))
        self._next_batch += 1
        self._inflight = (batch, ctxs)
        out.append(Commit(batch))


#: Ops whose loss only costs a re-delivery: they may wait for a batch (ack_delay).
_LAZY_OPS = frozenset((AckPosition, TouchDevice))


def drain(broker: Broker, commands: list[Command], now: int) -> list[Command]:
    """Run every :class:`Commit` synchronously on ``broker.store`` and feed the
    outcome back, until none is left; return the other commands in order.

    The simplest driver, for synchronous embedding and for tests.  A network
    layer should instead run commits in a worker thread (LMDB) or await them.
    """
    from .errors import StoreError

    done: list[Command] = []
    queue = list(commands)
    while queue:
        cmd = queue.pop(0)
        if isinstance(cmd, Commit):
            try:
                results = broker.store.commit(cmd.batch)
            except StoreError as exc:
                queue.extend(broker.batch_failed(cmd.batch.batch_id, exc, now))
            else:
                queue.extend(broker.batch_committed(cmd.batch.batch_id, results, now))
        else:
            done.append(cmd)
    return done
