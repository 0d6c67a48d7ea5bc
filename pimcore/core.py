"""The broker core: sans-IO.  Events in, commands out; time is passed in.

The host (the trio network layer, an asyncio host, a C host, a test) owns
sockets, threads, the store and the clock.  It tells the core what happened
-- a connection opened, bytes arrived, a connection was lost, a store request
or a hook finished, the deadline it was given passed -- and gets back a list
of commands:

* :class:`SendData` -- write these bytes to that connection;
* :class:`CloseConnection` -- write these bytes (the Close frame), then hang up;
* :class:`PauseReading` / :class:`ResumeReading` -- flow control: stop
  reading from a connection that waits for a request, or whose answers are
  not being taken (see :meth:`Broker.data_sent`), while its bytes pile up;
* :class:`~pimcore.store.base.StoreRequest` -- run these store ops (a write
  batch, or reads) and report with :meth:`Broker.store_completed` or
  :meth:`Broker.store_failed`;
* :class:`Authenticate` -- check this token, answer with
  :meth:`Broker.auth_completed`;
* :class:`CheckContent` -- run the content filter, answer with
  :meth:`Broker.content_checked`;
* :class:`AdminDone` -- a group admin call or a revocation made through the
  core finished;
* :class:`PostDone` -- a host post (:meth:`Broker.post`) finished.

Each connection's wire protocol -- framing, zstd in both directions, the
login gate, the closing state -- is a :class:`pimcore.protocol.ServerSession`
the core owns, so a host moves bytes and never looks at a frame.  The core
holds no store and calls no hook: a host may answer any request
later, from a thread, over a network or from C, and a slow answer holds up
only the connection that asked.  It never sleeps either: it names its next
deadline (:meth:`Broker.next_deadline`, µs) and the host calls
:meth:`Broker.handle_timer` when that time comes (aioquic's ``get_timer`` /
``handle_timer``).

Guarantees and where they are kept
----------------------------------
* **Upstream**: a SendAck with code OK is emitted only from the completion of
  the write request that stored the message, i.e. after it is durable.  A
  retry that arrives while its original is still in flight joins it as a
  second waiter (no second copy is even proposed); a retry of a committed
  message is answered by the store's dedupe inside the transaction
  (:class:`Duplicate`), with the original's identity.
* **Downstream**: the message is in every recipient's inbox in the same
  transaction that stores it, before any Push.  Delivery to a device runs from
  its position (what it acked) in the inbox, never from memory, so a device
  that was offline, slow or disconnected mid-push catches up exactly.
* **Group commit**: at most one write request is in flight; everything that
  arrives meanwhile (from every connection) waits in the next batch.  The
  durable sync is paid per batch, not per message.  Reads are separate
  requests: any number may be in flight, completing in any order.
* **Per-connection order**: while a connection waits for a hook or for its
  login's store read, its later bytes wait undecoded in its session (and the
  host is told to stop reading beyond a bound), so its sends are stamped and
  stored in the order they were sent.
"""

from __future__ import annotations

import hashlib
import heapq
import inspect
import os
from collections import deque
from functools import lru_cache
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from . import frames as F
from ._backend import impl as _impl
from ._pure.send import fan_out_stored
from .clock import HybridClock
from .errors import AuthError, CloseCode, ErrorCode, ProtocolError, StoreError
from .ids import DIRECT_PREFIX, SYSTEM, _show, direct_conversation, direct_members, id_problem, valid_conversation, valid_id
from .protocol import Compression, ServerSession, UnexpectedFrame
from .store.base import (
    AckEvents,
    DeleteConsumer,
    AppendEvent,
    event_data,
    AckPosition,
    AddMembers,
    AmendMessage,
    Appended,
    CreateGroup,
    Duplicate,
    HistoryPage,
    InboxPage,
    LoadSession,
    MarkRead,
    NewMessage,
    Op,
    GroupChanged,
    ReadHistory,
    ReadReaders,
    ReadersPage,
    ReadInbox,
    Reclaim,
    Reclaimed,
    ReadMarked,
    Rejected,
    RemoveMembers,
    Result,
    RevokeTokens,
    Revoked,
    SessionLoaded,
    Store,
    StoredMessage,
    StoreRequest,
    TouchDevice,
    ConversationEntry,
    ConversationsPage,
    ConversationSet,
    ReadConversations,
    SetConversation,
    conversation_cursor,
    ReadPresence,
    PresencePage,
    SetPresencePrivacy,
    PresencePrivacySet,
    Expire,
    Expired,
    PurgeConversation,
    PurgeUser,
    Purged,
    SetRetention,
)

__all__ = [
    "Limits",
    "message_overhead",
    "BrokerConfig",
    "Identity",
    "Authenticator",
    "ContentFilter",
    "SendData",
    "CloseConnection",
    "PauseReading",
    "ResumeReading",
    "StoreRequest",
    "Authenticate",
    "CheckContent",
    "DeviceOnline",
    "DeviceOffline",
    "TypingElsewhere",
    "PushOverMaxFrame",
    "AdminDone",
    "PostDone",
    "Command",
    "BrokerStatistics",
    "Broker",
    "drain",
]

SECOND = 1_000_000  # µs
#: The longest a delivery ack may wait before it is committed (BrokerConfig.ack_delay).
MAX_ACK_DELAY = 3600 * SECOND
DAY = 86_400 * SECOND

#: The capabilities this core can grant: zstd frame compression and the
#: per-connection deflate streams, each direction on its own (PROTOCOL.md §7),
#: and ConvPurged frames (section 6, Retention and purge).
SUPPORTED_CAPS = F.CAP_ZSTD | F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP | F.CAP_CONV_PURGED


# ---------------------------------------------------------------- configuration


#: The largest value of an integer :class:`Limits` field (2**32 - 1).
_MAX_LIMIT = (1 << 32) - 1


#: Bytes one mention adds to a message's frame at most: a user id of
#: :data:`pimcore.ids.MAX_ID_LEN` ASCII characters and its 1-byte length.
_MENTION_BYTES = 65


def message_overhead(max_mentions: int) -> int:
    """Bytes: the most one message adds to a frame that carries it alone,
    beyond its payload -- a Push, a HistoryResp or a ConvListResp (entry
    and cursor) of that message, with every id at its longest
    (:data:`pimcore.ids.MAX_ID_LEN`, :data:`~pimcore.ids.MAX_CONVERSATION_ID_LEN`),
    every integer at its widest and ``max_mentions`` mentions, plus the
    widest payload length and frame length prefixes: 728 bytes, plus 65
    per mention (4,888 at the default 64) and the mention count's wider
    length prefix above 127.  Computed, not built: a limit of 4 * 10**9
    mentions is a number here, not 260 GB of frames.  ValueError for a
    negative ``max_mentions``.

    Why: a message reaches a device only in such frames, and a peer
    refuses a frame over max_frame (FRAME_TOO_LARGE).  :class:`Limits`
    therefore refuses a max_frame below ``max_payload + message_overhead
    (max_mentions)``: with less, a message could be acked and never
    delivered (docs/PROTOCOL.md section 7.2)."""
    if max_mentions < 0:
        raise ValueError(f"max_mentions must be >= 0, got {max_mentions!r}")
    return _bare_message_overhead() + _MENTION_BYTES * max_mentions + _uvarint_len(max_mentions) - 1


def _uvarint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


@lru_cache(maxsize=1)
def _bare_message_overhead() -> int:
    """:func:`message_overhead` of no mention, by encoding the frames it
    names with an empty payload (tests/test_limits.py checks the per-mention
    part against encoded frames too)."""
    from .ids import MAX_CONVERSATION_ID_LEN, MAX_ID_LEN

    wide = (1 << 64) - 1
    conv, user = "~" * MAX_CONVERSATION_ID_LEN, "~" * MAX_ID_LEN
    assert _MENTION_BYTES == 1 + MAX_ID_LEN
    m = F.Message(wide, b"\xff" * 16, conv, wide, user, user, -(1 << 63), wide, b"", kind=wide, local_id=wide,
                  after_seq=wide, target=wide, edited=wide, recalled=True, deleted=True, mentions=(), mention_all=True)
    cursor = b"\xff" * 10 + conv.encode()
    frames = (F.Push(wide, (m,)),
              F.HistoryResp(wide, conv, wide, (m,), True),
              F.ConvListResp(wide, wide, (F.ConvEntry(conv, (m,), wide, wide, wide, wide, True, True, True),), cursor, True))
    # The frames' bodies (their length prefixes cut off), +4: the payload's
    # length prefix, 1 byte empty, at most 5 (a payload under 2**32 bytes);
    # +5: the frame's length prefix, at most 5 bytes.
    return max(_body_len(_impl.encode_frame(f)) for f in frames) + 4 + 5


def _body_len(frame: bytes) -> int:
    """Bytes of an encoded frame after its length prefix (a varint)."""
    n = 1
    while frame[n - 1] & 0x80:
        n += 1
    return len(frame) - n


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection and per-request limits, announced in LoginAck.
    ValueError for a field out of range (integers 1 or 0 to 2**32 - 1), or
    a max_frame below max_payload + message_overhead(max_mentions) (the
    message says that least max_frame)."""

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
    #: Users one SendReq may mention (more: TOO_MANY_MENTIONS).
    max_mentions: int = 64
    #: Entries per ConvListResp (a larger ConvListReq.limit is clamped).
    conv_page: int = 100

    def __post_init__(self) -> None:
        for name in ("max_frame", "max_payload", "window", "push_batch", "push_window", "push_window_bytes", "history_page", "read_state_batch", "send_burst", "conv_page"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_mentions < 0:
            raise ValueError(f"Limits.max_mentions must be >= 0, got {self.max_mentions!r}")
        for name in ("heartbeat_ms", "send_rate"):
            if not getattr(self, name) >= 0:  # (NaN too)
                raise ValueError(f"Limits.{name} must be >= 0, got {getattr(self, name)!r}")
        # Announced in LoginAck and kept by clients (JavaScript's numbers
        # among them): a bound far past any real use, and a rate that is a
        # number of its own.
        for name in ("max_frame", "max_payload", "window", "push_batch", "push_window", "push_window_bytes",
                     "history_page", "read_state_batch", "heartbeat_ms", "send_burst", "max_mentions", "conv_page"):
            if getattr(self, name) > _MAX_LIMIT:
                raise ValueError(f"Limits.{name} must be at most {_MAX_LIMIT}, got {getattr(self, name)!r}")
        if self.send_rate == float("inf"):
            raise ValueError("Limits.send_rate must be finite (0 = unlimited), got inf")
        # A message is delivered in a frame of its own at worst: one the
        # limits cannot hold would be acked and never delivered (and block
        # its recipients' inboxes behind it).
        overhead = message_overhead(self.max_mentions)
        if self.max_payload > self.max_frame:
            raise ValueError(
                f"Limits.max_payload ({self.max_payload}) cannot exceed Limits.max_frame ({self.max_frame}): a"
                f" message's Push adds up to {overhead} bytes of ids, times and Limits.max_mentions"
                f" ({self.max_mentions}) mentions, so Limits.max_frame must be at least {self.max_payload + overhead}")
        if self.max_frame < self.max_payload + overhead:
            raise ValueError(
                f"Limits.max_frame ({self.max_frame}) leaves too little room for a message of Limits.max_payload"
                f" ({self.max_payload}) bytes: its Push adds up to {overhead} bytes of ids, times and"
                f" Limits.max_mentions ({self.max_mentions}) mentions, so Limits.max_frame must be at least"
                f" {self.max_payload + overhead}")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a token belongs to.  ``device`` set means the token is bound to it;
    ``expires`` (µs, the broker's clock) ends the session when the token does:
    it is closed with TOKEN_EXPIRED and the client logs in with a fresh one."""

    user: str
    device: Optional[str] = None
    expires: Optional[int] = None
    #: µs, when the token was issued (JWT ``iat``): a host revocation
    #: (:meth:`Broker.revoke`) refuses tokens issued before its time.
    #: None = unknown, treated as 0 (revoked by any revocation).
    issued_at: Optional[int] = None


#: ``authenticate(token, now) -> Identity``; raises :class:`AuthError` to refuse.
#: The core never calls it: it emits :class:`Authenticate` and a driver answers
#: (the served broker and :func:`drain` with such a function).
Authenticator = Callable[[bytes, int], Identity]

#: ``content_filter(user, conv, payload) -> None | reason``: a reason rejects the
#: message with ``ErrorCode.REJECTED`` before anything is stored.  Like the
#: authenticator it is run by the driver, answering :class:`CheckContent`.
ContentFilter = Callable[[str, str, bytes], Optional[str]]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    limits: Limits = field(default_factory=Limits)
    max_batch_ops: int = 4096  # ops in one store transaction
    # Inbox entries one store transaction may write (the fan-out budget): a
    # batch is closed before the op that would pass it, counting a message
    # to a group as its members (the size learned from the store's last
    # answer about that group; not yet known: the whole budget, so it goes
    # alone) and a direct message as 2.  An op larger than the budget goes
    # in a batch of its own.  Bounds the commit's time and its results'
    # memory: 300 posts to a group of 20,000 were one commit of 6,000,000
    # entries (11.5 s, +1 GB).  Each commit rewrites a page of every
    # member's inbox, so a smaller budget costs throughput: for those 300
    # posts 65,536 took 35 s and 262,144 15 s (BENCHMARKS.md).
    max_batch_entries: int = 262_144
    login_timeout: int = 10 * SECOND  # a connection must log in within this
    # A logged-in connection that sends nothing (not even a Ping) for this long
    # is a dead peer: closed with IDLE_TIMEOUT.  0 = never.  Pick it a few
    # times Limits.heartbeat_ms, so one lost Ping does not kill a session.
    idle_timeout: int = 0
    # A connection refused this many SendReqs in a row for exceeding
    # Limits.send_rate is closed with RATE_LIMITED (it ignores the refusals).
    # The later local ids refused behind one of them (_RefusalMark) are not
    # counted, up to Limits.window of them: they were on the wire already.
    rate_limit_strikes: int = 1024
    # Delivery acks (AckPosition, TouchDevice) wait up to this long (µs)
    # before they are committed, coalesced per device: alone if nothing else
    # is pending by then, else with the next batch.  Sends do not take them
    # along before that (at one message in flight an ack per message was
    # two of a batch's three ops and a sync of its own without the wait);
    # any other op -- a read, a purge, an admin change -- does, after them,
    # in the order proposed.  Losing such an op only re-delivers (the
    # position moves back to an older stored one; clients dedupe by
    # position).  0 = never wait.
    ack_delay: int = 0  # at most MAX_ACK_DELAY
    reclaim_interval: int = 60 * SECOND
    device_retention: int = 30 * DAY  # devices unseen this long stop holding inbox entries
    inbox_max_age: int = 90 * DAY  # inbox entries older than this are reclaimed regardless
    # History retention, the default of every conversation without a setting
    # of its own (Broker.set_retention): entries older than history_max_age
    # µs, and all but the newest history_max_count, are removed from the
    # conversation (with their inbox entries and dedupe records) at each
    # reclaim_interval (store/base.py, Expire).  0 = no limit.
    history_max_age: int = 0
    history_max_count: int = 0
    # Retention removes no entry younger than this (µs; Expire.keep): a
    # client's retry of a send within it still finds the dedupe record, and
    # gets the original SendAck, however fast a count limit turns over (the
    # SDKs retry for send_timeout, 60 s by default).  0 = no such bound.
    dedupe_window: int = 60 * SECOND
    # Set: every SendReq that passes the cheap checks becomes a CheckContent
    # request, answered by the driver with this function (or any other way:
    # the core only needs the answer, see Broker.content_checked).
    content_filter: Optional[ContentFilter] = None
    # Outbound flow control (bytes held = what SendData commands carry that
    # the host has not reported written with Broker.data_sent, each counted
    # as len(data) + _FRAME_OVERHEAD).  At outbound_pause held (plus what the
    # connection's history reads in flight may still add) the core stops
    # decoding the connection's requests and asks the host to stop reading
    # it; it reads on once the host reports the bytes written.  Past
    # max_outbound -- only frames the client did not ask for can get there:
    # pushes within its push window, read states, receipts -- it is closed
    # with SLOW_CONSUMER.  The served broker sets max_outbound from
    # ServerConfig.max_outbound_bytes.
    outbound_pause: int = 4 << 20
    max_outbound: int = 8 << 20
    # ...and for all connections together (bytes, counted the same way):
    # each connection's bound alone let 4,000 connections that never read
    # pin their push windows, 4 GB.  At max_outbound_total no push is
    # built (the devices wait; their inbox has the messages) until held
    # bytes are written; when the sum stays at or past it for
    # outbound_total_grace (µs), the connections that in that time had
    # nothing written of what they hold, or owed PushAcks and sent none,
    # are closed with SLOW_CONSUMER (they catch up when they return).  A
    # burst to many readers drains; readers, however slow, stay.  (As Redis's client-output-buffer-limit soft limit: a bound
    # that may be passed for a while.)
    max_outbound_total: int = 512 << 20
    outbound_total_grace: int = 5 * SECOND
    # Replies built without the store -- Pong, CalibrateResp, and refusals
    # (a SendReq, Read or HistoryReq turned down before any store request,
    # RATE_LIMITED refusals aside: those have rate_limit_strikes) -- per
    # connection: a token bucket of control_burst refilled at control_rate
    # per second.  Empty: closed with RATE_LIMITED.  control_rate 0 = unlimited.
    control_rate: float = 50.0
    control_burst: int = 200
    # Host events (store/base.py, "Host events"): every stored message and
    # membership entry gets a "message" event in its own transaction; read
    # markers that moved, devices online/offline and kicks get events in the
    # next batch (AppendEvent, lazy like TouchDevice: lost if the broker dies
    # before that batch commits).  Off: nothing is recorded.
    record_events: bool = False
    # A connection with deflate streams (PROTOCOL.md 7.2) that sent and
    # received no frame for this long (µs) releases their zlib state (~25 KiB)
    # and keeps only each stream's last window (~4 KiB in all); it comes back
    # at the next compressed frame.  0 = never.
    compression_idle: int = 30 * SECOND
    # Recall, edit, delete-for-self (AmendReq): how long after a message's
    # server time its sender may recall it, edit it, or anyone who sees it
    # delete it for themselves (µs; 0 = no limit).  Later: TOO_LATE.  The
    # host (Broker.amend) has no limit.
    recall_window: int = DAY
    edit_window: int = 2 * DAY
    delete_window: int = 0
    # Typing (PROTOCOL.md, "Typing and presence"): a relayed indicator
    # expires this long (µs) after it arrives unless refreshed; each
    # connection may send typing_burst Typing frames at once and
    # typing_rate per second sustained (more are dropped silently); groups
    # with more members than typing_max_members get no typing relayed (the
    # sender is told TYPING_NOT_RELAYED).
    typing_ttl: int = 6 * SECOND
    typing_rate: float = 2.0
    typing_burst: int = 8
    typing_max_members: int = 256
    # Presence: users one PresenceSub may name (more: PRESENCE_LIMIT).
    presence_max_users: int = 256

    def __post_init__(self) -> None:
        if self.outbound_pause < 512 or self.max_outbound < 2 * self.outbound_pause:
            raise ValueError("BrokerConfig.outbound_pause must be >= 512 bytes and max_outbound >= 2 * outbound_pause")
        if self.max_outbound_total < 1:
            raise ValueError("BrokerConfig.max_outbound_total must be >= 1 byte")
        if self.outbound_total_grace < 0:
            raise ValueError("BrokerConfig.outbound_total_grace must be >= 0 µs")
        if self.control_rate < 0 or self.control_burst < 1:
            raise ValueError("BrokerConfig.control_rate must be >= 0 and control_burst >= 1")
        if self.max_batch_ops < 1 or self.max_batch_entries < 1 or self.rate_limit_strikes < 1:
            raise ValueError("BrokerConfig.max_batch_ops, max_batch_entries and rate_limit_strikes must be >= 1")
        for name in ("login_timeout", "reclaim_interval", "device_retention", "inbox_max_age"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BrokerConfig.{name} must be > 0 µs")
        if self.idle_timeout < 0 or self.ack_delay < 0:
            raise ValueError("BrokerConfig.idle_timeout and ack_delay must be >= 0 µs (0 = off)")
        if self.ack_delay > MAX_ACK_DELAY:
            # (A trial's 1e9 s was taken: no delivery ack would ever be saved,
            # and every restart would deliver everything again.)
            raise ValueError(f"ack_delay must be at most {MAX_ACK_DELAY // SECOND} s, got {self.ack_delay / SECOND:g} s")
        if self.compression_idle < 0:
            raise ValueError("BrokerConfig.compression_idle must be >= 0 µs (0 = never)")
        for name in ("recall_window", "edit_window", "delete_window"):
            if not 0 <= getattr(self, name) < 1 << 63:
                raise ValueError(f"BrokerConfig.{name} must be >= 0 µs (0 = no limit)")
        if not (self.typing_ttl >= 1000 and self.typing_rate > 0 and self.typing_burst >= 1
                and self.typing_max_members >= 2 and self.presence_max_users >= 1):
            raise ValueError("BrokerConfig: typing_ttl must be >= 1000 µs, typing_rate > 0, typing_burst >= 1, "
                             "typing_max_members >= 2 and presence_max_users >= 1")
        if not 0 <= self.dedupe_window <= MAX_DEDUPE_WINDOW:
            # (Above a day it is a mistake -- ms given for s -- and it would
            # keep what a retention limit exists to remove: a last trial.)
            raise ValueError(f"BrokerConfig.dedupe_window (µs) must be 0 (no bound) .. {MAX_DEDUPE_WINDOW} (a day)")
        if self.history_max_age < 0 or self.history_max_count < 0:
            raise ValueError("BrokerConfig.history_max_age (µs) and history_max_count must be >= 0 (0 = no limit)")


#: The longest BrokerConfig.dedupe_window, µs: a day.
MAX_DEDUPE_WINDOW = 86_400 * 1_000_000

#: The most a refusal's reason carries, in bytes of UTF-8 (verdict_reason).
MAX_REASON_BYTES = 1024


def _bounded_put(cache: dict[str, int], key: str, value: int) -> None:
    """``cache[key] = value`` as the newest entry, the oldest dropped first
    once it holds _MAX_SIZES (a dict keeps insertion order)."""
    cache.pop(key, None)
    if len(cache) >= _MAX_SIZES:
        del cache[next(iter(cache))]
    cache[key] = value


def verdict_reason(reason: object) -> str:
    """A content filter's (or moderator's) reason as the text the refusal
    carries: ``str(reason)``, each lone surrogate (the only characters of a
    str UTF-8 cannot encode) replaced with U+FFFD, cut to
    :data:`MAX_REASON_BYTES` of UTF-8 (ending in "…" when cut).  Why: the
    Error frame's reason must encode, and one that did not left a client's
    send unanswered (EncodeError in content_checked) while a host post with
    the same filter was refused (a new user's trial); and a 1.1 MB reason
    made a refusal above the client's max_frame, which it dropped the
    connection for, logged in again and sent again, asking the moderation
    service each time, forever (a new operator's trial).  A host post and a
    client's send use this, so they say the same words."""
    text = str(reason)
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
        raw = text.encode("utf-8")
    if len(raw) > MAX_REASON_BYTES:
        # (At a character's boundary: the partial one dropped by "ignore".)
        text = raw[: MAX_REASON_BYTES - 3].decode("utf-8", "ignore") + "…"
    return text


def idempotency_local_id(key: Union[str, bytes, None]) -> Optional[int]:
    """The local id (u64) of a host post's idempotency key (text or 1..256
    bytes; BLAKE2b), a random one for None, None for an unusable key (of
    another type, empty, too long, text that is not UTF-8-encodable)."""
    if key is None:
        return int.from_bytes(os.urandom(8), "big")
    try:
        raw_key = key.encode("utf-8") if isinstance(key, str) else key
    except UnicodeEncodeError:  # a lone surrogate: no UTF-8 text
        return None
    if not isinstance(raw_key, bytes) or not 0 < len(raw_key) <= 256:
        return None
    return int.from_bytes(hashlib.blake2b(raw_key, digest_size=8, person=b"pimcore-idem").digest(), "big")


# ---------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class SendData:
    """Write ``data`` (encoded, maybe compressed frames) to ``conn``, after
    whatever was written to it before."""

    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Write ``data`` -- the encoded ``Close(code, reason)`` frame, empty if
    the connection's Close was already written -- to ``conn``, then hang up.
    The core has already forgotten the connection; events for it are
    ignored.  ``code`` and ``reason`` are there for logs."""

    conn: int
    code: CloseCode
    reason: str
    data: bytes


@dataclass(frozen=True, slots=True)
class PauseReading:
    """Stop reading from ``conn`` until :class:`ResumeReading`: it waits for
    a request (its login, a hook) and has sent this much ahead already."""

    conn: int


@dataclass(frozen=True, slots=True)
class ResumeReading:
    conn: int


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Check ``token`` at time ``now`` (µs); answer with
    ``Broker.auth_completed(request_id, identity_or_AuthError, now)``.  The
    connection waits (its later frames queue) until the answer comes or its
    login timeout closes it."""

    request_id: int
    token: bytes
    now: int


@dataclass(frozen=True, slots=True)
class CheckContent:
    """Run the content filter on a message before anything is stored; answer
    with ``Broker.content_checked(request_id, reason_or_None, now)``.  Only
    the sending connection waits for the answer."""

    request_id: int
    user: str
    conv: str
    payload: bytes
    device: str = ""  # the sending device
    local_id: int = 0  # the send's local id (u64): its idempotency key


@dataclass(frozen=True, slots=True)
class AdminDone:
    """A host call (:meth:`Broker.create_group`, :meth:`Broker.revoke` ...)
    made with ``ref`` finished: ``result`` is the store's answer (GroupChanged,
    Revoked), or Rejected with a code (BAD_REQUEST, ALREADY_EXISTS,
    UNKNOWN_CONVERSATION, STORE_UNAVAILABLE)."""

    ref: int
    result: Result


@dataclass(frozen=True, slots=True)
class PostDone:
    """A host post (:meth:`Broker.post`) made with ``ref`` finished.  ``code``
    OK: the message is durable, with ``msg_id``/``seq``/``server_time`` (a
    retry with the same idempotency key gets the same values).  Otherwise
    why not (BAD_REQUEST, PAYLOAD_TOO_LARGE, UNKNOWN_CONVERSATION,
    NOT_MEMBER, DUPLICATE_CONFLICT, STORE_UNAVAILABLE); the other fields
    are empty.  ``duplicate``: OK, but answered from the idempotency record
    (or a post with the same key still in flight): nothing new was stored."""

    ref: int
    code: ErrorCode
    msg_id: bytes
    seq: int
    server_time: int
    duplicate: bool = False



@dataclass(frozen=True, slots=True)
class DeviceOnline:
    """A login became ACTIVE: ``user``'s ``device`` is online on ``conn``.
    Informational (logs, host events): nothing needs to be done for it."""

    conn: int
    user: str
    device: str


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    """The active session of ``user``'s ``device`` on ``conn`` ended, by any
    path: a close by either side (``code``, ``reason``: the Close sent),
    replaced by a newer login, or the connection lost (``code`` None).
    Exactly one per :class:`DeviceOnline`.  Informational, like it."""

    conn: int
    user: str
    device: str
    code: Optional[CloseCode]
    reason: str


@dataclass(frozen=True, slots=True)
class TypingElsewhere:
    """Only when :attr:`Broker.relay_elsewhere` (other nodes share the
    store): ``user`` typing in ``conv`` (``active``, or stopped) was
    relayed here at ``at`` (µs); tell the nodes where ``recipients`` (the
    conversation's other members, checked here) have devices online, which
    hand it to :meth:`Broker.typing_elsewhere`.  Best effort: a host may
    drop it."""

    user: str
    conv: str
    active: bool
    recipients: tuple[str, ...]
    at: int


@dataclass(frozen=True, slots=True)
class PushOverMaxFrame:
    """A Push of one message to ``user``'s ``device`` on ``conn`` was over
    ``max_frame`` (``size`` bytes): the device refuses it (FRAME_TOO_LARGE)
    and receives nothing past it.  Only a message stored under larger
    limits gets here (limits lowered since, or an older pimcore that took
    max_payload up to max_frame): :class:`Limits` keeps every new one
    within.  Informational (a warning to log: max_frame must be raised to
    at least ``size`` for that device to receive again); one per
    connection."""

    conn: int
    user: str
    device: str
    size: int
    max_frame: int


Command = Union[
    SendData, CloseConnection, PauseReading, ResumeReading, StoreRequest, Authenticate, CheckContent, AdminDone,
    PostDone, DeviceOnline, DeviceOffline, TypingElsewhere, PushOverMaxFrame,
]


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    """A snapshot of the core's counters (:meth:`Broker.statistics`)."""

    connections: int
    online_devices: int
    frames_in: int
    frames_out: int
    logins: int
    resyncs: int  # logins whose cursor came from another epoch or beyond the head
    auth_failures: int
    kicks: int  # sessions ended by Broker.kick
    revoked_sessions: int  # live sessions ended by Broker.revoke
    posts: int  # host posts proposed (Broker.post)
    protocol_errors: int
    messages_stored: int
    duplicates: int
    rejected: int
    batches: int
    batch_failures: int
    pushes: int
    reclaimed_entries: int
    reads: int  # read requests completed
    read_failures: int
    #: Pushes of one message over max_frame (sent as they are, refused by
    #: the device: :class:`PushOverMaxFrame`).
    pushes_over_max_frame: int
    pending_ops: int  # ops waiting for the next batch
    batch_in_flight: bool  # a write request is with the store
    reads_in_flight: int
    hooks_in_flight: int  # Authenticate / CheckContent awaiting an answer


# ---------------------------------------------------------------- internal state


class _ConnState(Enum):
    # AWAITING_LOGIN --Login--> AUTHENTICATING --identity--> LOADING
    #   --session read--> ACTIVE ; any --close/loss--> forgotten.
    # Only Login, Ping and Close are accepted in AWAITING_LOGIN (the
    # session's login gate), and nothing after the Login is even decoded
    # before ACTIVE: nothing a client sends can touch the store before its
    # token was checked.  The login timeout covers all three states before ACTIVE,
    # so a hook that never answers cannot hold a connection forever.
    AWAITING_LOGIN = 1
    AUTHENTICATING = 2
    LOADING = 3
    ACTIVE = 4


class _Conn:
    __slots__ = (
        "id", "state", "opened", "last_seen", "session", "user", "device", "inflight", "tokens", "refill_at", "strikes",
        "expires", "waiting", "backlog", "history_reads", "login", "paused", "issued_at",
        "held", "chunks", "chunk_sent", "reserved", "ctl_tokens", "ctl_at",
        "hibernate_mark", "wrote", "acks_held", "acks_out", "over", "mark", "spent",
    )

    def __init__(self, conn_id: int, now: int, session: ServerSession) -> None:
        self.id = conn_id
        self.state = _ConnState.AWAITING_LOGIN
        self.opened = now
        self.last_seen = now  # last time any byte arrived (idle timeout)
        # Send-rate token bucket (Limits.send_rate): tokens left, as of refill_at.
        self.tokens = 0.0
        self.refill_at = now
        self.strikes = 0  # consecutive RATE_LIMITED refusals
        # The refusal mark (Broker._held_back), None while there is none.
        self.mark: Optional[_RefusalMark] = None
        # The last mark's (local id, count) once cleared: a mark set again
        # for the same refused send starts from its count (_new_mark).
        self.spent: Optional[tuple[int, int]] = None
        self.expires: Optional[int] = None  # the token's expiry, if it has one
        self.issued_at = 0  # µs, the token's issue time (revocation)
        self.session = session  # bytes <-> frames, zstd, login gate, Close
        self.user = ""
        self.device = ""
        self.inflight = 0  # SendReqs of this connection awaiting a SendAck
        # Answers that must wait for the SendAcks owed before them (a
        # connection's SendAcks leave in SendReq order: Broker._hold), oldest
        # first; None while there is none.  acks_out counts the SendAcks
        # sent while there is one (their places: _HeldAck.ordinal).
        self.acks_held: Optional[deque[_HeldAck]] = None
        self.acks_out = 0
        # The session's pushes_over_max_frame already said (PushOverMaxFrame).
        self.over = 0
        # The request (hook or login read) this connection waits for, 0 if
        # none; _ACKS_HELD while it holds its window of answers (acks_held).
        # Meanwhile nothing more is decoded: new bytes wait in the
        # session, and frames already decoded with the one that started the
        # wait (one batch of next_frames) wait in `backlog`, in order.
        self.waiting = 0
        # Made at the first batch that leaves frames over (a deque is ~0.7
        # KiB: an idle connection must not pay for one; issue 13).
        self.backlog: Optional[deque[F.Frame]] = None
        self.paused = False  # PauseReading was sent
        self.history_reads = 0  # ReadHistory and ReadReaders requests in flight
        self.login: Optional[F.Login] = None
        self.hibernate_mark = -1  # session.compression_activity at the last _HIBERNATE_DUE look
        # Outbound accounting (BrokerConfig.outbound_pause): bytes held by
        # SendData not yet reported written; the wire length of each such
        # SendData, oldest first (None while nothing is held: made at a
        # SendData, dropped once everything is written, so an idle connection
        # holds no deque), and how much of the oldest was written; bytes
        # reserved for the replies of history reads in flight.
        self.held = 0
        self.chunks: Optional[deque[int]] = None
        self.chunk_sent = 0
        self.reserved = 0
        # The look (Broker._look) in which the host last reported a write:
        # a connection that holds bytes and wrote none of them during a
        # whole look is stalled (max_outbound_total).
        self.wrote = -1
        # Replies built without the store (BrokerConfig.control_rate).
        self.ctl_tokens = 0.0
        self.ctl_at = now


class _Device:
    """An online device session.

    Invariant: acked <= sent_upto <= head of the user's inbox.  Everything in
    (acked, sent_upto] was pushed and may be re-pushed after a reconnect;
    (sent_upto, head] is waiting for window space.  Delivery always reads the
    store from sent_upto, so nothing depends on what happened to be in memory.
    ``reading``: a ReadInbox for this device is in flight; the pump waits for
    it rather than asking twice.
    """

    __slots__ = ("conn", "user", "device", "acked", "sent_upto", "unacked", "unacked_bytes", "reading", "typing",
                 "acked_look", "ramp", "states", "full_upto", "caps")

    def __init__(self, conn: int, user: str, device: str, position: int) -> None:
        self.conn = conn
        self.user = user
        self.device = device
        self.caps = 0  # granted at login (LoginAck.caps)
        self.acked = position
        self.sent_upto = position
        # (upto, bytes) of each Push not yet covered by a PushAck, oldest
        # first; None while there is none (made at a Push, dropped when the
        # PushAcks covered them all: idle devices hold no deque).
        self.unacked: Optional[deque[tuple[int, int]]] = None
        self.unacked_bytes = 0
        # Bytes the next Push may carry at most (beyond its first message):
        # PUSH_RAMP_START at the login, doubled per Push (Broker._push_entries).
        self.ramp = PUSH_RAMP_START
        self.reading = False
        # The look (Broker._look) of its last PushAck that moved ``acked``,
        # or of the push that left it owing acks when it owed none.
        self.acked_look = -1
        # Typing from another node held until the entries before it are
        # pushed ((conv, user) -> (frame, expires µs)): see typing_elsewhere.
        self.typing: Optional[dict[tuple[str, str], tuple[F.Typing, int]]] = None
        # The login's read states not sent yet (Broker._flush_states): they
        # wait for the answers to the frames pipelined after the Login and
        # for the first Push of a catch-up.
        self.states: Optional[SessionLoaded] = None
        # Positions up to this are pushed whole, the device's own sends
        # included: it was resynchronized and dropped what it held (0: none).
        self.full_upto = 0


#: Bytes (payloads + 32 each, as the push window counts them) the first Push
#: of a login carries at most -- one message always goes, however large --
#: doubled with each Push after it up to the push window.  Why: a catch-up
#: began with a Push of up to push_batch messages (64 x 2 KB: 128 KB) that a
#: client can use only once all of it came; on a link cut every few tens of
#: KB no connection ever got one whole, each login resumed from the same
#: position, and the device downloaded megabytes for no message at all (a
#: new user's trial: 97 reconnects, 3.86 MB, 0 delivered).  Growing from 1
#: KiB, every connection delivers what its first kilobytes carry and a long
#: one reaches full-size Pushes within a dozen (TCP's slow start, RFC 5681
#: 3.1, for the same reason: no more in flight than the link has shown it
#: carries).
PUSH_RAMP_START = 1024


@dataclass(slots=True, eq=False)
class _PendingSend:
    """A NewMessage proposed to the store; retries of the same key wait on it.
    (A dataclass so that a record maker builds it: _pending_send.)"""

    key: tuple[str, str, int]
    digest: bytes
    # Connection ids, ("post", ref) for a host post (Broker.post), or the
    # place of a retry among its connection's SendAcks (_HeldAck).
    waiters: list[Union[int, tuple[Any, ...], "_HeldAck"]]


class _HeldAck:
    """An answer to a SendReq/AmendReq of ``conn`` that waits for the
    SendAcks the connection owes for the ones it sent before (Broker._hold):
    ``ordinal`` is its place among the connection's SendAcks (sent when
    ``conn.acks_out`` reaches it), ``frames`` what goes then -- the SendAck,
    after the Error with a content filter's reason -- or None while it is a
    retry waiting with its original in flight (a waiter of that
    _PendingSend), which the original's outcome answers."""

    __slots__ = ("conn", "ordinal", "frames")

    def __init__(self, conn: _Conn, ordinal: int, frames: Optional[list[F.Frame]]) -> None:
        self.conn = conn
        self.ordinal = ordinal
        self.frames = frames


class _ReadCtx:
    __slots__ = ("conn", "device")

    def __init__(self, conn: int, device: str) -> None:
        self.conn = conn
        self.device = device


class _AdminCtx:
    __slots__ = ("ref",)

    def __init__(self, ref: int) -> None:
        self.ref = ref


_Ctx = Union[_PendingSend, _ReadCtx, _AdminCtx, "_ConvSetCtx", "_PrivacyCtx", None]


# What each read request in flight is for (request id -> one of these).
class _LoginRead:
    __slots__ = ("conn", "user", "device", "identity")

    def __init__(self, conn: int, user: str, device: str, identity: Identity) -> None:
        self.conn = conn
        self.user = user
        self.device = device
        self.identity = identity


class _InboxRead:
    __slots__ = ("dev", "after")

    def __init__(self, dev: _Device, after: int) -> None:
        self.dev = dev
        self.after = after


class _HistoryRead:
    __slots__ = ("conn", "frame", "limit", "reserve")

    def __init__(self, conn: int, frame: F.HistoryReq, limit: int, reserve: int) -> None:
        self.conn = conn
        self.frame = frame
        self.limit = limit
        self.reserve = reserve  # bytes counted in _Conn.reserved until it is answered


class _ConvListRead:
    __slots__ = ("conn", "frame", "limit")

    def __init__(self, conn: int, frame: F.ConvListReq, limit: int) -> None:
        self.conn = conn
        self.frame = frame
        self.limit = limit


class _ConvUpdateRead:
    """The entry of (user, conv) after its read marker moved: sent to every
    device of the user as a ConvUpdate (no connection waits for it)."""

    __slots__ = ("conn", "user", "conv")

    def __init__(self, user: str, conv: str) -> None:
        self.conn = -1
        self.user = user
        self.conv = conv


class _FloorRead:
    """The read state of (user, conv) after a commit moved the history floor
    of ``conv`` (retention or a purge), for the user's devices online here
    (Broker._refresh_floor; no connection waits for it).  ``purged``: the
    conversation's last seq after a PurgeConversation (nothing stored is
    unread; the read is the user's marker, ReadReaders), -1 after an
    Expire (the list entry, ReadConversations).  ``gen``: the conversation's
    count in Broker._floor_watch when asked; ``tries``: reads asked so far."""

    __slots__ = ("conn", "user", "conv", "purged", "listed", "gen", "tries")

    def __init__(self, user: str, conv: str, purged: int) -> None:
        self.conn = -1
        self.user = user
        self.conv = conv
        self.purged = purged
        self.listed = purged < 0  # read the list entry (else the marker alone)
        self.gen = 0
        self.tries = 0


class _MembersRead:
    """The members of a group whose history floor a retention pass moved
    (Broker._refresh_floor): those online here then get a _FloorRead each."""

    __slots__ = ("conn", "conv")

    def __init__(self, conv: str) -> None:
        self.conn = -1
        self.conv = conv


#: Reads one _FloorRead asks at most: it reads again while commits touching
#: its conversation land meanwhile (its answer could be older than what the
#: devices were pushed since); past this the devices keep what they count
#: until their next ReadState (a Read of theirs, a login).
_FLOOR_TRIES = 4


class _ConvSetCtx:
    __slots__ = ("conn", "req_id", "conv")

    def __init__(self, conn: int, req_id: int, conv: str) -> None:
        self.conn = conn
        self.req_id = req_id
        self.conv = conv


class _ReadersRead:
    __slots__ = ("conn", "frame")

    def __init__(self, conn: int, frame: F.ReadersReq) -> None:
        self.conn = conn
        self.frame = frame


class _TypingRead:
    """A ReadReaders for the members of a group some Typing frames wait for
    (Broker._typing_reads holds the waiting frames)."""

    __slots__ = ("conn", "conv", "user", "gen")

    def __init__(self, conn: int, conv: str, user: str, gen: int) -> None:
        self.conn = conn
        self.conv = conv
        self.user = user
        self.gen = gen  # Broker._typing_gen when asked: a membership change since makes the answer uncacheable


class _PresenceRead:
    """A ReadPresence for a PresenceSub (``req_id`` > 0), for a re-check of
    a subscription after a membership change (``req_id`` 0, ``users`` the
    subscription's), or for a PresencePrivacy query (``req_id`` -1)."""

    __slots__ = ("conn", "req_id", "users", "sub")

    def __init__(self, conn: int, req_id: int, users: tuple[str, ...], sub: int) -> None:
        self.conn = conn
        self.req_id = req_id
        self.users = users
        self.sub = sub  # request id of the PresenceSub read this installs or re-checks


class _GapRead:
    """The broker's own history read (ReadHistory, user "") of the seqs of
    group ``conv`` after ``after`` up to ``upto``: entries another writer
    added (``pimcore group`` on the data directory) that a message of ours
    jumped over (Broker._learn_seqs).  Its LEFT entries name users who may
    have devices online here that nothing else would tell."""

    __slots__ = ("conn", "conv", "after", "upto")

    def __init__(self, conv: str, after: int, upto: int) -> None:
        self.conn = -1  # (no connection: a failed read closes none)
        self.conv = conv
        self.after = after
        self.upto = upto


class _HeadRead:
    """A user's inbox head, read (LoadSession, login False: the one read
    that answers it; a login's worth of work, for a rare event) for their
    devices online here after another writer appended to their inbox
    (_GapRead)."""

    __slots__ = ("conn", "user")

    def __init__(self, user: str) -> None:
        self.conn = -1
        self.user = user


#: Every kind of read a core request waits for (Broker._reads).
_AnyRead = Union[
    "_LoginRead", "_InboxRead", "_HistoryRead", "_ReadersRead", _ConvListRead, _ConvUpdateRead, _TypingRead, _PresenceRead,
    _FloorRead, _MembersRead, _GapRead, _HeadRead,
]


class _PrivacyCtx:
    __slots__ = ("conn",)

    def __init__(self, conn: int) -> None:
        self.conn = conn


# What each hook request in flight is for.
class _LoginHook:
    __slots__ = ("conn", "frame")

    def __init__(self, conn: int, frame: F.Login) -> None:
        self.conn = conn
        self.frame = frame


class _ContentHook:
    __slots__ = ("conn", "frame")

    def __init__(self, conn: int, frame: Union[F.SendReq, F.AmendReq]) -> None:
        self.conn = conn
        self.frame = frame


# Timer kinds (entries of Broker._timers).
_LOGIN_DUE, _IDLE_DUE, _TOKEN_DUE, _HIBERNATE_DUE = 0, 1, 2, 3

#: _Conn.waiting of a connection that holds as many answers as its window
#: (Broker._hold): nothing more of it is decoded until some of them go.
#: (No request id: those count up from 1.)
_ACKS_HELD = -1

#: Bytes a waiting connection may have buffered before the host is asked to
#: stop reading it (PauseReading).
_PAUSE_BYTES = 256 * 1024
#: History reads one connection may have in flight; at that many, nothing more
#: of the connection is decoded until one is answered (it is not refused:
#: a client may pipeline as many HistoryReqs as it likes, they queue).
_MAX_HISTORY_READS = 8

# The refusals of a SendReq/AmendReq when it is read that ask the client to
# resend it later (with the same local id): they set a refusal mark.
_TRANSIENT_AT_READ = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_IN_FLIGHT})

# How long a refusal mark (_RefusalMark) stands without the refused send's
# retry: while the sends the client had on the wire when the refusal went
# out can still arrive (a round trip, seconds on a bad network).  A
# conforming client sends nothing more until it resends the refused one
# first (the SDKs hold their whole queue after a transient refusal, then
# resend in local-id order), so the order never rests on a longer mark;
# one that gave the refused send up (its send timeout) is held back this
# long at most (a review: with 30 s, a send given up after a refusal held
# the device's next one back for 32 s).
_REFUSAL_HOLD = 5 * SECOND


def _new_mark(c: "_Conn", local_id: int, code: ErrorCode, now: int) -> "_RefusalMark":
    """``c``'s refusal mark for its send ``local_id`` refused with ``code``.
    The same send refused again (its retry met an empty bucket) keeps the
    count of the sends held back behind it so far: re-arming the mark buys
    no new free refusals (a client that resent L into an empty bucket got a
    window of them per strike)."""
    mark = _RefusalMark(local_id, code, now + _REFUSAL_HOLD)
    spent = c.spent
    if spent is not None and spent[0] == local_id:
        mark.count = spent[1]
    return mark


class _RefusalMark:
    """A connection's SendReq/AmendReq ``local_id`` was refused with the
    transient ``code`` (RATE_LIMITED, TOO_MANY_IN_FLIGHT; INTERNAL when the
    host could not get the content filter's answer) when it was read.
    A pipelining client has later local ids on the wire already; taking them
    once the bucket or the window has room again -- before the refused
    one's retry -- would store the device's messages out of send order.
    Until ``until`` (µs) or a request with a local id <= ``local_id``, the
    later ones are refused with ``code`` too (Broker._held_back): no token,
    no strike -- up to two windows' worth (``count``, kept when the same send
    is refused again: _new_mark); past that, a client that never resends the
    refused one is treated as one ignoring the refusals."""

    __slots__ = ("local_id", "code", "until", "count")

    def __init__(self, local_id: int, code: ErrorCode, until: int) -> None:
        self.local_id = local_id
        self.code = code
        self.until = until
        self.count = 0
#: What one SendData holds beyond its wire bytes, for the outbound limits:
#: the bytes object's header (33 bytes on CPython), the host's reference to
#: it in a queue (8), the SendData command while it is queued (48), rounded
#: up.  Counting it makes a flood of tiny frames (Pongs) as bounded as one of
#: large pages, although the wire bytes alone would be tiny.
_FRAME_OVERHEAD = 96
#: A HistoryResp stays this far below max_frame (the frame's own header and
#: fields), and each message counts this much beyond its payload and ids.
_PAGE_SLACK = 4096
_MESSAGE_OVERHEAD = 64


def _mentions_bytes(mentions: "tuple[str, ...]") -> int:
    """What a message's mentions add to its encoding, at most: each a
    length-prefixed id (ids are ASCII, so characters are bytes; up to 64 of
    them, 64 characters each: ~4 KiB a message, which a page must count --
    uncounted, a page of such messages went over max_frame and the client
    refused it)."""
    return sum(len(u) + 2 for u in mentions)


def message_digest(conv: str, payload: bytes) -> bytes:
    """What a retry must repeat exactly: the conversation and the payload."""
    # One call over the concatenation: the same digest as feeding the parts.
    return hashlib.blake2b(conv.encode() + b"\x00" + payload, digest_size=16).digest()


# Constructors of the records built once per message on the send path:
# record_maker(cls)(*every field) == cls(*every field), without the frozen
# dataclass __init__'s object.__setattr__ per field in the compiled backend
# (pimcore/_pure/records.py).  Each call site passes every field in order.
_new_message = _impl.record_maker(NewMessage)
_message = _impl.record_maker(F.Message)
_send_ack = _impl.record_maker(F.SendAck)
_OK = ErrorCode.OK
_push = _impl.record_maker(F.Push)
_ack_position = _impl.record_maker(AckPosition)
_SendReq = F.SendReq
_pending_send = _impl.record_maker(_PendingSend)


@lru_cache(maxsize=1 << 16)
def _conv_members(conv: str) -> Optional[tuple[str, ...]]:
    """None for a malformed conversation id, () for a group id, the two
    users of a direct id (Broker._check_conversation)."""
    if not valid_conversation(conv):
        return None
    return direct_members(conv) or ()


def _to_frame_message(pos: int, m: StoredMessage) -> F.Message:
    # Every field in order: the record maker's fast path (no keywords, no defaults).
    return _message(
        pos, m.msg_id, m.conv, m.seq, m.sender, m.device, m.client_time, m.server_time, m.payload,
        m.kind, m.local_id, m.after_seq, m.target, m.edited, m.recalled, m.deleted,
        tuple(F.Mention(u) for u in m.mentions) if m.mentions else (), m.mention_all,
    )


def _to_conv_entry(e: ConversationEntry) -> F.ConvEntry:
    return F.ConvEntry(
        e.conv, (_to_frame_message(0, e.last),) if e.last is not None else (), e.read_seq, e.last_seq, e.unread,
        e.mention_count, e.pinned, e.muted, e.hidden,
    )


def _normalized_mentions(f: F.SendReq) -> Union[ErrorCode, tuple[str, ...]]:
    """SendReq.mentions sorted and unique, or BAD_MENTION when one is not a
    valid user id.  Valid ids of non-members are kept in the message but
    count for nobody (only recipients get a mention counted)."""
    users = set()
    for m in f.mentions:
        if not valid_id(m.user):
            return ErrorCode.BAD_MENTION
        users.add(m.user)
    return tuple(sorted(users))


_U64_MAX = (1 << 64) - 1
_send_data = _impl.record_maker(SendData)

#: Groups whose members the typing relay keeps (and for how long, µs: a
#: backstop; membership changes through this core update it at once).
_TYPING_CACHE_MAX = 4096
_TYPING_CACHE_TTL = 30 * SECOND
#: The same when other nodes share the store (relay_elsewhere): their
#: membership changes reach this cache only through it expiring.
_TYPING_CACHE_TTL_SHARED = 3 * SECOND
#: Users whose last-seen time the core remembers (most recent first out).
_PRES_SEEN_MAX = 100_000
#: The cached "members" of a group too large for typing (compared by
#: identity; its one element is no valid user id).
_TOO_LARGE: frozenset[str] = frozenset({"\x00too large"})

# ---------------------------------------------------------------- the broker


class Broker:
    """The sans-IO broker.  Not thread-safe: drive it from one thread/task.

    ``node_id`` (8 bytes) goes into every message id; ``last_server_time``
    (µs) is the highest server time already stored, so a broker restarted on
    a store never stamps an earlier one.  ``epoch`` (16 bytes) names the
    store's history (:meth:`pimcore.store.Store.epoch`); None makes up a new
    one, as for a store nobody has seen.  A client cursor from ``epoch`` or
    one of ``trusted_epochs`` is honoured; any other is resynchronized.  All
    come from the store (``store.node_id()``, ``store.last_server_time()``,
    ``store.epoch()``, ``store.epochs()``).
    Raises ValueError for a node_id that is not 8 bytes or an epoch that is
    not 16.
    """

    def __init__(
        self,
        config: BrokerConfig = BrokerConfig(),
        *,
        node_id: bytes,
        last_server_time: int = 0,
        epoch: Optional[bytes] = None,
        trusted_epochs: Iterable[bytes] = (),
    ) -> None:
        self.config = config
        if not isinstance(node_id, bytes) or len(node_id) != 8:
            raise ValueError("node_id must be 8 bytes")
        if epoch is None:
            epoch = os.urandom(16)
        if not isinstance(epoch, bytes) or len(epoch) != 16:
            raise ValueError("epoch must be 16 bytes")
        self._node_id = node_id
        #: The store's 8-byte id (Store.node_id), fixed when it was created: in every msg_id.
        self.node_id = node_id
        self.epoch = epoch
        self._trusted_epochs = frozenset(trusted_epochs) | {epoch}
        # Never stamp a time earlier than anything already stored (restart).
        self._clock = HybridClock()
        self._clock.observe(last_server_time)

        self._conns: dict[int, _Conn] = {}
        self._slow: list[_Conn] = []  # went past max_outbound; closed by _maybe_commit
        # Bytes held for all connections (the sum of _Conn.held), and since
        # when it has been past max_outbound_total (None: it is not).
        self._held_total = 0
        self._over_since: Optional[int] = None
        # Counts the looks at the connections: one begins each time held
        # bytes reach max_outbound_total, and again each outbound_total_grace
        # while they stay there (_drop_stalled).  A connection is judged by
        # the look that lasted the whole grace.
        self._look = 0
        # Devices whose pushes wait for held bytes to go below
        # max_outbound_total (an ordered set: pumped in the order they came).
        self._starved: dict[_Device, None] = {}
        # ...served before them: those that acked every push -- readers,
        # which connections that stopped reading must not keep waiting (a
        # new-user pass: 60 of them ahead in the line stalled three readers
        # for a minute).
        self._readers: dict[_Device, None] = {}
        # ...and those of them whose own connection held bytes when their turn
        # came (conn id -> device): back in line once it has written them
        # (data_sent).  Kept apart so that connections that never read cost
        # no walk over them on every write (a re-check pass measured 25x
        # per round trip with 5,000 of them in the line).
        self._parked: dict[int, _Device] = {}
        self._online: dict[str, dict[str, _Device]] = {}  # user -> device -> session
        # Inbox head of every user with an online device or a login read in
        # flight (refcounted in _head_refs): a login that read the head
        # before a batch committed learns the newer head from here.
        self._heads: dict[str, int] = {}
        self._head_refs: dict[str, int] = {}
        # Messages the batch being finished appended to online users' inboxes,
        # (pos, message) in position order: a device that is caught up is
        # pushed these without reading them back from the store.
        # (A NewMessage stands in for a Message only the sending device
        # would be given, which it never is: _finish_send.)
        self._fresh: dict[str, list[tuple[int, Union[F.Message, NewMessage]]]] = {}

        # The batch being built, and the one the store is working on.
        self._ops: list[Op] = []
        self._eager = 0  # ops in _ops that must not wait (not delivery acks)
        self._lazy_since: Optional[int] = None  # when an ack-only batch started waiting
        self._ctxs: list[_Ctx] = []
        # Members of each group, as the store last answered (GroupChanged,
        # a NewMessage's Appended): what a message to it weighs against
        # max_batch_entries.  At most _MAX_SIZES groups, the oldest answer
        # forgotten first; a group not here weighs the whole budget.
        self._sizes: dict[str, int] = {}
        # The indices of the in-flight batch's group messages (their
        # answers are read for _sizes).
        self._inflight_groups: list[int] = []
        # The last seq of each group as this broker saw it: its own commits
        # (messages, amendments, membership changes) and the logins' read
        # states.  Why: ``pimcore group add|remove`` on the data directory
        # writes JOINED/LEFT entries into the store behind the broker's
        # back.  The group's next message of ours then jumps over their
        # seqs; its recipients get them anyway (their inbox positions jump
        # too, and the pump reads what it lacks), but a user who LEFT is no
        # recipient, and their devices online here would never get their
        # LEFT entry (a new user's trial).  A jump is read (_GapRead).  At most
        # _MAX_SIZES groups, the oldest noted forgotten first (a group not
        # here is not checked).  Not kept when other nodes share the store
        # (relay_elsewhere): their messages make jumps all the time, and
        # they tell us of their entries themselves (inbox_advanced).
        self._seqs: dict[str, int] = {}
        # conv -> the seqs of it the batch being finished committed.
        self._batch_seqs: dict[str, list[int]] = {}
        self._batch_entries = 0  # the next batch's, as _batch_end counted them
        self._ack_slot: dict[tuple[str, str], int] = {}  # coalesce acks in _ops
        self._read_slot: dict[tuple[str, str], int] = {}  # coalesce reads in _ops
        self._pending_sends: dict[tuple[str, str, int], _PendingSend] = {}
        # Data of host events (record_events) not tied to a stored entry,
        # made since the last _maybe_commit: it proposes them as AppendEvent
        # with its ``now`` (the time of the call that made them).
        self._lazy_events: list[bytes] = []
        # (user, device or "") -> µs: revocations in force (also stored, and
        # read with every login; kept here for logins that raced one).
        self._revoked: dict[tuple[str, str], int] = {}
        # user -> the latest of those revocations, the user's or any
        # device's: what a token bound to no device must be stamped at
        # (revoked_before), without a scan of every revocation per token.
        self._revoked_latest: dict[str, int] = {}
        # user -> conv (own marker) or "r:" + conv (the 1:1 peer's receipt)
        # -> highest seq sent to the user's devices here, for users online
        # here only (dropped with their last device): a marker or receipt
        # hint from another node at or below it is stale and ignored
        # (markers never move back).
        self._marks: dict[str, dict[str, int]] = {}
        # conv -> [commits that touched it, _FloorReads in flight] while any
        # is (Broker._refresh_floor): an answer read before such a commit
        # is read again.
        self._floor_watch: dict[str, list[int]] = {}
        # Positions acked by devices whose AckPosition is not durable yet: a
        # quick re-login must resume from here, not from the older stored one.
        self._acks_unsaved: dict[tuple[str, str], int] = {}
        self._inflight: Optional[tuple[StoreRequest, list[_Ctx]]] = None
        # hold_batches(): no new write batch starts until release_batches().
        self._holding = False
        self._reads: dict[int, _AnyRead] = {}
        self._hooks: dict[int, Union[_LoginHook, _ContentHook]] = {}
        # Connections that stopped waiting for their held answers (_due)
        # while a batch's outcome was being handled: read on after it.
        self._unheld: list[_Conn] = []
        self._next_request = 1  # ids of store requests and hook requests
        self._next_reclaim: Optional[int] = None
        self._retry_at: Optional[int] = None  # pending ops wait after a failed batch until then
        # (due µs, tiebreak, kind, conn); entries go stale when a connection
        # closes or is heard from, and are checked when they come due.
        self._timers: list[tuple[int, int, int, int]] = []
        self._timer_seq = 0
        # zstd contexts, shared by every session (one thread drives the core).
        self._compression = Compression()
        # -- typing and presence: ephemeral, in memory only, per node --
        # conn -> (tokens, as of µs): the Typing token bucket.
        self._typing_tokens: dict[int, tuple[float, int]] = {}
        # group -> (valid until µs, current members): who a Typing goes to,
        # refreshed from the store (ReadReaders) and by membership changes.
        self._typing_members: dict[str, tuple[int, frozenset[str]]] = {}
        # group -> Typing frames (conn, active) waiting for its member read.
        self._typing_reads: dict[str, list[tuple[int, bool]]] = {}
        self._typing_gen = 0  # bumped by every membership change
        # conn -> the users its PresenceSub named (in order) / the visible ones.
        self._pres_req: dict[int, tuple[str, ...]] = {}
        self._pres_sub: dict[int, frozenset[str]] = {}
        self._pres_latest: dict[int, int] = {}  # conn -> request id of its newest PresenceSub read
        self._pres_watch: dict[str, set[int]] = {}  # user -> conns subscribed to it (and allowed to see it)
        self._pres_hide: dict[str, bool] = {}  # watched user -> hides last seen (as last read or set)
        self._pres_told: dict[str, bool] = {}  # watched user -> online as last told to its watchers
        self._pres_dirty: set[str] = set()  # watched users whose online state may have changed
        self._pres_recheck: set[int] = set()  # conns whose subscription a membership change may have changed
        # Direct conversation -> the conns subscribed to its other user while
        # they shared nothing (UNKNOWN): the chat's first entry makes that
        # user visible, so a message stored there re-checks these
        # subscriptions (_direct_news).  Per conn, the ids it waits on.
        self._pres_direct: dict[str, set[int]] = {}
        self._pres_direct_of: dict[int, tuple[str, ...]] = {}
        # conn -> its subscription reads (PresenceSub, re-check) in flight.
        # A re-check asked meanwhile waits for them (_pres_recheck_after):
        # an async store's read may hold a state from before the change, and
        # a re-check of the installed users answered after a newer
        # subscription's answer would put the replaced one back.
        self._pres_reading: dict[int, int] = {}
        self._pres_recheck_after: set[int] = set()
        # user -> µs the broker last heard from one of its devices when the
        # last one went offline (bounded; the store's device last_seen backs it).
        self._pres_seen: dict[str, int] = {}
        # Other nodes sharing the store (a cluster; see relay_elsewhere):
        # watched user -> the nodes where, as last heard (a hint, a
        # re-check, a PresenceSub's read), they have a device online.  Kept
        # only while watched here (bounded like _pres_watch).
        self._pres_remote: dict[str, frozenset[str]] = {}
        self._pres_hinted: dict[str, int] = {}  # watched user -> µs of the last presence hint about them
        #: True when other nodes share the store (BrokerServer sets it over a
        #: RedisStore): a Typing relayed here is also handed on for them
        #: (TypingElsewhere).  False: one node, nothing more is emitted.
        self.relay_elsewhere = False

        self._stats = dict.fromkeys(
            (
                "frames_in", "frames_out", "logins", "resyncs", "auth_failures", "kicks", "revoked_sessions", "posts", "protocol_errors", "messages_stored",
                "duplicates", "rejected", "batches", "batch_failures", "pushes", "reclaimed_entries", "reads",
                "read_failures", "pushes_over_max_frame",
            ),
            0,
        )

    # ------------------------------------------------------------ connections

    def connection_made(self, conn: int, now: int) -> list[Command]:
        if conn in self._conns:
            raise ValueError(f"connection {conn} already exists")
        c = self._conns[conn] = _Conn(conn, now, ServerSession(self.config.limits.max_frame, compression=self._compression))
        c.ctl_tokens = float(self.config.control_burst)
        self._arm(now + self.config.login_timeout, _LOGIN_DUE, conn)
        if self._next_reclaim is None:
            self._next_reclaim = now + self.config.reclaim_interval
        return []

    def connection_lost(self, conn: int, now: int) -> list[Command]:
        out: list[Command] = []
        self._forget(conn, out, None, "connection lost")
        self._maybe_commit(out, now)
        return out

    def receive_data(self, conn: int, data: bytes, now: int) -> list[Command]:
        """Bytes from the connection, split anywhere.  Framing errors close the
        connection with a clear code; nothing already acknowledged is
        affected.  Bytes for a connection the core forgot are ignored."""
        c = self._conns.get(conn)
        if c is None:
            return []
        c.last_seen = now
        out: list[Command] = []
        if c.expires is not None and c.expires <= now:
            # The token expired and its timer has not run yet (a clock
            # stepped past it, or a busy host): nothing more is taken.
            self._close(c, CloseCode.TOKEN_EXPIRED, _TOKEN_EXPIRED, out)
            self._maybe_commit(out, now)
            return out
        c.session.receive_data(data)
        if self._blocked(c):
            self._check_paused(c, out)
        else:
            self._pull(c, now, out)
        self._maybe_commit(out, now)
        return out

    def close(self, conn: int, code: CloseCode, reason: str, now: int) -> list[Command]:
        """The host closes ``conn`` (shutdown, a slow consumer, an internal
        error): the core forgets it and returns the :class:`CloseConnection`
        carrying the Close frame's bytes.  [] for an unknown connection."""
        c = self._conns.get(conn)
        out: list[Command] = []
        if c is not None:
            self._close(c, code, reason, out)
            self._maybe_commit(out, now)
        return out

    def close_all(self, code: CloseCode, reason: str, now: int) -> list[Command]:
        """The host closes every connection at once (a shutdown): what
        :meth:`close` does for each, in one call -- so no presence change is
        told: every watcher is closed too.  Telling them one by one (the
        first closed "went offline" to those closed after) would say the
        users left when the broker did; each watcher learns from its own
        Close why the connection ended, and a fresh subscription after it
        logs in again shows the state then.  The DeviceOffline commands
        (events, other nodes) are as for ``close``; each user's last-seen
        time is ``now``: they were online until the broker closed them (not
        the last byte they sent: an idle chat was last seen at its login
        after a restart)."""
        out: list[Command] = []
        for c in list(self._conns.values()):
            if c.id in self._conns:  # (closing one never closes another, but be sure)
                c.last_seen = max(c.last_seen, now)
                self._close(c, code, reason, out)
        self._maybe_commit(out, now)
        return out

    def _pull(self, c: _Conn, now: int, out: list[Command]) -> None:
        """Dispatch what ``c`` sent, in order, until it waits for a request (or
        has as many history reads out as it may), is closed, or needs more
        bytes."""
        session, conn = c.session, c.id
        pause = self.config.outbound_pause
        try:
            # Inlined _blocked(c): this runs once per frame.
            while not c.waiting and c.history_reads < _MAX_HISTORY_READS and c.held + c.reserved < pause:
                backlog = c.backlog  # re-read: made here, lazily (see _Conn)
                if backlog:
                    self._dispatch(c, backlog.popleft(), now, out)
                else:
                    frames = session.next_frames()
                    if not frames:
                        break
                    if (
                        type(frames[0]) is _SendReq and c.state is _ConnState.ACTIVE and c.mark is None
                        and self.config.content_filter is None
                    ):
                        # The leading plain SendReqs in one fast-path call:
                        # what _dispatch -> _on_send -> _propose_send do for
                        # them (pimcore/_pure/send.py); the first frame that
                        # needs anything else is dispatched the ordinary way.
                        taken = _impl.propose_sends(
                            frames, c, now, self.config.limits, _conv_members, self._pending_sends, self._clock,
                            self._node_id, self.config.record_events, _new_message, _pending_send, _SendReq,
                            self._ops, self._ctxs,
                        )
                        if taken:
                            self._stats["frames_in"] += taken
                            self._eager += taken  # NewMessage is not a lazy op (_propose)
                            if taken == len(frames):
                                continue
                            del frames[:taken]
                    if len(frames) == 1:
                        self._dispatch(c, frames[0], now, out)
                    else:
                        if backlog is None:
                            backlog = c.backlog = deque(frames)
                        else:
                            backlog.extend(frames)
                        continue
                if conn not in self._conns:  # closed by that frame
                    return
        except UnexpectedFrame as exc:
            self._close(c, CloseCode.PROTOCOL_ERROR, str(exc), out)
            return
        except ProtocolError as exc:
            self._close(c, CloseCode.PROTOCOL_ERROR, f"{exc.code.name}: {exc}", out)
            return
        if c.backlog is not None and not c.backlog:
            c.backlog = None  # drained: an idle connection holds no deque
        self._check_paused(c, out)

    def _drop_stalled(self, out: list[Command], now: int) -> None:
        """Held bytes stayed at or past max_outbound_total for
        outbound_total_grace (this look): close with SLOW_CONSUMER every
        connection, open when the look began, that holds bytes and had none
        of them written during it -- a client that does not read, whose window
        would otherwise be filled again at each turn, holding up everyone's
        pushes (a new-user pass: 60 such connections stalled three readers
        for 55 s when the biggest holders were dropped a quarter at a time).
        Readers, however slow, wrote something and stay.  Then a new look
        begins if the sum is still there."""
        cfg = self.config
        look, since, total = self._look, self._over_since, self._held_total
        assert since is not None
        grace = cfg.outbound_total_grace / SECOND
        # Stalled: bytes held and none written in the look; or pushes owed
        # acks since before the look and no PushAck in it -- which finds, at once, the
        # clients that stopped reading after the kernel's buffers took their
        # first pushes (they hold nothing, and would each take the bound
        # again at their turn: a look per connection).
        stalled = [c for c in self._conns.values() if c.held and c.wrote != look and c.opened <= since]
        for devices in self._online.values():
            for dev in devices.values():
                if dev.sent_upto > dev.acked and dev.acked_look != look:
                    c = self._conns.get(dev.conn)
                    if c is not None and c.opened <= since and not (c.held and c.wrote != look):
                        stalled.append(c)
        for c in stalled:
            if c.id in self._conns:
                self._close(
                    c, CloseCode.SLOW_CONSUMER,
                    f"not reading: nothing written or acked in {grace:g} s while the broker held {total} bytes"
                    f" for all connections (max_outbound_total {cfg.max_outbound_total}); {c.held} of them for it", out,
                )
        if self._held_total >= cfg.max_outbound_total:
            self._look += 1
            self._over_since = now
        else:
            self._over_since = None
            if self._starved or self._readers:
                self._unstarve(out, now)

    def _check_paused(self, c: _Conn, out: list[Command]) -> None:
        """Flow control: a connection that waits and keeps sending is paused
        at _PAUSE_BYTES buffered; a host that ignores that is closed at a
        hard bound (memory per connection stays bounded either way)."""
        buffered = c.session.buffered
        blocked = self._blocked(c)
        if blocked and buffered >= _PAUSE_BYTES:
            if not c.paused:
                c.paused = True
                out.append(PauseReading(c.id))
            elif buffered > _PAUSE_BYTES + 2 * self.config.limits.max_frame:
                self._close(c, CloseCode.PROTOCOL_ERROR, "too much data while a request was pending", out)
        elif c.paused and not blocked:
            c.paused = False
            out.append(ResumeReading(c.id))

    def _resume(self, c: _Conn, now: int, out: list[Command]) -> None:
        """``c`` stopped waiting: handle what it sent meanwhile."""
        if c.id in self._conns:
            self._pull(c, now, out)

    def _blocked(self, c: _Conn) -> bool:
        """Nothing more of ``c`` is decoded now: it waits for a request, has
        as many history reads out as it may, or its outbound side is full
        (what it holds plus what its history reads may still add).  Checked
        before every frame, so the replies built while it is full are those
        of at most one request past the limit."""
        return bool(c.waiting) or c.history_reads >= _MAX_HISTORY_READS or c.held + c.reserved >= self.config.outbound_pause

    def data_sent(self, conn: int, nbytes: int, now: int) -> list[Command]:
        """The host wrote ``nbytes`` more of ``conn``'s SendData bytes (in the
        order they were given): they no longer count as held.  A host must
        report every write, or the connection stops being read once
        ``BrokerConfig.outbound_pause`` bytes are held (a host that writes
        synchronously reports each SendData's length right away).  Returns
        what the connection can do now that it has room (frames it sent
        meanwhile, ResumeReading).  Unknown connections are ignored."""
        c = self._conns.get(conn)
        out: list[Command] = []
        if c is None or nbytes <= 0:
            return out
        # Only the outbound term of _blocked can change here.
        was_blocked = c.held + c.reserved >= self.config.outbound_pause
        chunks = c.chunks
        if chunks is None:
            return out  # nothing held: bytes the core did not count (none expected)
        before = c.held
        c.wrote = self._look
        n = c.chunk_sent + nbytes
        if n >= c.held - _FRAME_OVERHEAD * len(chunks):
            # Everything written (the usual case): nothing is held, and
            # the deque goes (an idle connection keeps none).
            c.chunks = None
            c.held = c.chunk_sent = 0
        else:
            while chunks and n >= chunks[0]:
                size = chunks.popleft()
                n -= size
                c.held -= size + _FRAME_OVERHEAD
            c.chunk_sent = n if chunks else 0
        self._held_total -= before - c.held
        if not c.held and self._parked:
            dev = self._parked.pop(c.id, None)
            if dev is not None:
                self._wait(dev)
        if (self._starved or self._readers) and self._held_total < self.config.max_outbound_total:
            self._unstarve(out, now)
            if not (was_blocked and not self._blocked(c)):
                self._maybe_commit(out, now)
        if was_blocked and not self._blocked(c):
            self._pull(c, now, out)
            self._maybe_commit(out, now)
        return out

    def _control(self, c: _Conn, now: int, what: str, out: list[Command]) -> bool:
        """A reply is about to be built without the store: take a token of
        ``c``'s control bucket, or close it with RATE_LIMITED (False)."""
        cfg = self.config
        if not cfg.control_rate:
            return True
        c.ctl_tokens = min(float(cfg.control_burst), c.ctl_tokens + (now - c.ctl_at) * cfg.control_rate / SECOND)
        c.ctl_at = now
        if c.ctl_tokens < 1.0:
            self._close(
                c,
                CloseCode.RATE_LIMITED,
                f"too many requests answered without the store ({what}): more than {cfg.control_burst} at once or {cfg.control_rate:g}/s",
                out,
            )
            return False
        c.ctl_tokens -= 1.0
        return True

    # ------------------------------------------------------------ store outcome

    def store_completed(self, request_id: int, results: Iterable[Result], now: int) -> list[Command]:
        """The store ran request ``request_id`` with these results (one per
        op, in order).  For a write request: the batch is durable.  Raises
        ValueError for a request that is not in flight or a wrong number of
        results (a driver bug)."""
        inflight = self._inflight
        if inflight is not None and inflight[0].request_id == request_id:
            return self._batch_committed(inflight, tuple(results), now)
        ctx = self._reads.pop(request_id, None)
        if ctx is None:
            raise ValueError(f"store request {request_id} is not in flight")
        results = tuple(results)
        if len(results) != 1:
            raise ValueError("one result per op expected")
        self._stats["reads"] += 1
        out: list[Command] = []
        self._read_done(ctx, results[0], now, out)
        self._maybe_commit(out, now)
        return out

    def store_failed(self, request_id: int, error: BaseException, now: int) -> list[Command]:
        """The store could not run request ``request_id``: nothing of it took
        effect.  Senders get STORE_UNAVAILABLE and retry with the same local
        id (dedupe makes that safe whatever the store really did); a login
        whose read failed is closed (the client logs in again); a history
        request gets STORE_UNAVAILABLE.  A read that failed with anything but
        :class:`StoreError` (a bug) closes the connection it was for with
        INTERNAL; the broker and everyone else carry on."""
        inflight = self._inflight
        if inflight is not None and inflight[0].request_id == request_id:
            return self._batch_failed(inflight, now)
        ctx = self._reads.pop(request_id, None)
        if ctx is None:
            raise ValueError(f"store request {request_id} is not in flight")
        self._stats["read_failures"] += 1
        out: list[Command] = []
        if not isinstance(error, StoreError):
            conn = ctx.dev.conn if type(ctx) is _InboxRead else ctx.conn  # type: ignore[union-attr]
            c = self._conns.get(conn)
            if c is not None:
                self._close(c, CloseCode.INTERNAL, "internal error", out)
        self._read_done(ctx, None, now, out)
        self._maybe_commit(out, now)
        return out

    def _batch_committed(self, inflight: tuple[StoreRequest, list[_Ctx]], results: tuple[Result, ...], now: int) -> list[Command]:
        batch, ctxs = inflight
        if len(results) != len(batch.ops):
            raise ValueError("one result per op expected")
        self._inflight = None
        self._stats["batches"] += 1
        if self._inflight_groups:
            self._learn_sizes(batch.ops, results)
        if self._pres_direct:
            self._direct_news(batch.ops, results)
        out: list[Command] = []
        to_pump: set[str] = set()
        # The SendAcks of each connection, in order, go out as one SendData
        # per connection (one encode, one write), before any other frame the
        # batch sends it: they are flushed before every op that is not a
        # NewMessage, and before the pushes.
        acks: dict[int, list[F.SendAck]] = {}
        ops, n, i = batch.ops, len(batch.ops), 0
        watch = self._floor_watch
        if watch:
            # Only while a _FloorRead is out (after retention or a purge):
            # what this batch changed in its conversation makes an answer
            # read before it stale (before the loop: reads this batch sets
            # off are asked after it).
            for op in ops:
                entry = watch.get(getattr(op, "conv", ""))
                if entry is not None:
                    entry[0] += 1
        finish_sends = _impl.finish_sends
        while i < n:
            op = ops[i]
            kind = type(op)
            if kind is NewMessage:
                # A run of stored NewMessages in one fast-path call
                # (pimcore/_pure/send.py): what _finish_send does for a
                # message without mentions acked to its one connection (its
                # SendAck queued in acks).  It stops at the first op that
                # needs anything else, which takes the way below.
                j = finish_sends(
                    ops, ctxs, results, i, NewMessage, Appended, self._pending_sends, self._heads, self._online,
                    self._fresh, to_pump, self._conns, acks, self._stats, _send_ack, _message, _OK,
                )
                if j != i:
                    i = j
                    continue
            ctx, res = ctxs[i], results[i]
            i += 1
            if kind is not NewMessage and acks:
                self._flush_acks(acks, out)
            if kind is NewMessage:
                assert isinstance(ctx, _PendingSend)
                self._finish_send(op, ctx, res, to_pump, out, acks)  # type: ignore[arg-type]
            elif kind is AmendMessage:
                assert isinstance(ctx, _PendingSend)
                self._finish_amend(op, ctx, res, to_pump, out)  # type: ignore[arg-type]
                if type(res) is Appended and res.seq and not self.relay_elsewhere and not op.conv.startswith(DIRECT_PREFIX):  # type: ignore[union-attr]
                    self._batch_seqs.setdefault(op.conv, []).append(res.seq)  # type: ignore[union-attr]
            elif kind is MarkRead:
                assert isinstance(ctx, _ReadCtx)
                if isinstance(res, ReadMarked):
                    self._finish_read(res, out)
                    if res.changed:
                        self._event("read", user=res.user, conv=res.conv, seq=res.read_seq, unread=res.unread)
                elif isinstance(res, Rejected):
                    # e.g. removed from the group while the Read waited for
                    # the batch: the store is authoritative, tell the device.
                    self._error(ctx.conn, res.code, 0, f"Read {op.conv!r}: {res.code.name.lower()}", out)  # type: ignore[union-attr]
            elif kind is SetConversation:
                assert isinstance(ctx, (_ConvSetCtx, _AdminCtx))
                self._finish_conv_set(ctx, res, out)
            elif kind is AckPosition:
                key = (op.user, op.device)  # type: ignore[union-attr]
                if self._acks_unsaved.get(key, -1) <= op.position:  # type: ignore[union-attr]
                    self._acks_unsaved.pop(key, None)
            elif kind is SetPresencePrivacy:
                self._privacy_done(op, ctx, res, out)  # type: ignore[arg-type]
            elif isinstance(ctx, _AdminCtx):
                if isinstance(res, Revoked):
                    key = (res.user, res.device)
                    self._revoke_in_force(key, res.before)
                elif isinstance(res, GroupChanged):
                    self._note_size(res.conv, len(res.members))
                    if res.entries:
                        self._finish_admin(res, to_pump)
                elif isinstance(res, Purged):
                    if isinstance(op, PurgeConversation):
                        self._sizes.pop(op.conv, None)
                        self._seqs.pop(op.conv, None)
                        self._batch_seqs.pop(op.conv, None)
                        self._refresh_floor(op.conv, res.last_seq, out)
                        for user in res.users:  # (a group's: it is gone with its markers)
                            self._purged_group(user, op.conv, res.last_seq, out)
                    for change in res.changes:  # a purged user's LEFT entries
                        self._note_size(change.conv, len(change.members))
                        self._finish_admin(change, to_pump)
                out.append(AdminDone(ctx.ref, res))
            elif kind is Reclaim and isinstance(res, Reclaimed):
                self._stats["reclaimed_entries"] += res.entries
            elif kind is Expire and isinstance(res, Expired):
                for conv in res.convs:
                    self._refresh_floor(conv, -1, out)
                if res.resume:
                    # The walk stopped at EXPIRED_IDS trimmed conversations
                    # (each named above, so each one's online devices are
                    # told): the same pass goes on after the last one.
                    self._propose(Expire(op.now, op.max_age, op.max_count, res.resume, op.keep), None)  # type: ignore[union-attr]
            # Acked / Touched need no reaction: the in-memory session already
            # moved; the store only makes it survive a restart.
        if acks:
            self._flush_acks(acks, out)
        if self._batch_seqs:
            self._learn_seqs(out)
        # SendAcks above, pushes after: the sender learns "durable" no later
        # than any recipient sees the message.
        for user in sorted(to_pump):
            for dev in self._online.get(user, {}).values():
                self._pump(dev, out, now)
        self._fresh.clear()
        if self._unheld:
            self._read_on(now, out)
        self._maybe_commit(out, now)
        return out

    def _flush_acks(self, acks: dict[int, list[F.SendAck]], out: list[Command]) -> None:
        conns = self._conns
        for conn, frames in acks.items():
            c = conns.get(conn)
            if c is not None and c.acks_held is not None:
                frames = self._in_order(c, frames)  # type: ignore[assignment]
                if not frames:
                    continue
            if len(frames) == 1:
                self._send(conn, frames[0], out)
            else:
                self._send_many(conn, frames, out)
        acks.clear()

    def _batch_failed(self, inflight: tuple[StoreRequest, list[_Ctx]], now: int) -> list[Command]:
        batch, ctxs = inflight
        self._inflight = None
        self._inflight_groups = []
        self._stats["batch_failures"] += 1
        out: list[Command] = []
        for op, ctx in zip(batch.ops, ctxs):
            if isinstance(op, (NewMessage, AmendMessage)):
                assert isinstance(ctx, _PendingSend)
                self._pending_sends.pop(ctx.key, None)
                self._ack_waiters(ctx, F.SendAck(op.local_id, ErrorCode.STORE_UNAVAILABLE, b"", 0, 0), out)
            elif isinstance(op, MarkRead):
                assert isinstance(ctx, _ReadCtx)
                self._error(ctx.conn, ErrorCode.STORE_UNAVAILABLE, 0, "read marker not saved; send Read again", out)
            elif isinstance(ctx, _PrivacyCtx):
                self._error(ctx.conn, ErrorCode.STORE_UNAVAILABLE, 0, "presence setting not saved; send PresencePrivacy again", out)
            elif isinstance(ctx, _AdminCtx):
                out.append(AdminDone(ctx.ref, Rejected(ErrorCode.STORE_UNAVAILABLE)))
            elif isinstance(ctx, _ConvSetCtx):
                self._send(ctx.conn, F.ConvSetResp(ctx.req_id, ctx.conv, ErrorCode.STORE_UNAVAILABLE), out)
            # A lost AckPosition/TouchDevice only leaves the stored position
            # behind the real one: the device re-acks or re-logs in, and the
            # worst case is a re-delivery the client dedupes by position.
        if self._unheld:
            self._read_on(now, out)
        # Do not immediately retry with whatever is pending: the driver reports
        # the failure, and the next event proposes the next batch -- or, if
        # none comes, the timer shortly after (ops must never be stranded).
        if self._ops:
            self._retry_at = now + _RETRY_AFTER_FAILURE
        return out

    def _read_done(
        self, ctx: _AnyRead, res: Optional[Result], now: int, out: list[Command]
    ) -> None:
        """A read request finished (``res`` None: it failed)."""
        if type(ctx) is _TypingRead:
            self._typing_read_done(ctx, res, now, out)  # type: ignore[arg-type]
            return
        if type(ctx) is _PresenceRead:
            self._presence_read_done(ctx, res, now, out)  # type: ignore[arg-type]
            return
        if type(ctx) is _InboxRead:
            dev = ctx.dev
            dev.reading = False
            if self._online.get(dev.user, {}).get(dev.device) is not dev:
                return  # the device went away meanwhile
            if isinstance(res, InboxPage) and dev.sent_upto == ctx.after:
                if self._held_total >= self.config.max_outbound_total:
                    # Past the bound since the read went out: the page is
                    # read again when held bytes are written (_unstarve).
                    self._wait(dev)
                else:
                    self._push_entries(dev, res.entries, out, now)
                    self._pump(dev, out, now)
            elif res is None:
                # The store failed: the device stays where it is and is
                # pumped again by its next PushAck, message or login.
                pass
            else:
                self._pump(dev, out, now)  # moved meanwhile: ask again from where it is
            if dev.states is not None and not dev.reading:
                self._flush_states(dev, out)  # no Push came of it: the login's read states now
        elif type(ctx) is _LoginRead:
            self._unref_head(ctx.user)
            c = self._conns.get(ctx.conn)
            if c is None or c.state is not _ConnState.LOADING:
                return
            if not isinstance(res, SessionLoaded):
                # A failed read, or the store refused the ids: the client
                # logs in again (after its backoff) and nothing is lost.
                self._close(c, CloseCode.INTERNAL, "the store could not load the session; log in again", out)
                return
            active = self._activate(c, ctx, res, now, out)
            self._resume(c, now, out)  # frames pipelined after the Login: answered first
            if active is not None and self._online.get(active.user, {}).get(active.device) is active:
                self._pump(active, out, now)
                if active.states is not None and not active.reading:
                    # No inbox read out (nothing to catch up, or the pump
                    # waits): the read states now.
                    self._flush_states(active, out)
        elif type(ctx) is _ConvListRead or type(ctx) is _ConvUpdateRead:
            self._conv_read_done(ctx, res, now, out)  # type: ignore[arg-type]
        elif type(ctx) is _FloorRead:
            self._floor_read_done(ctx, res, out)
        elif type(ctx) is _MembersRead:
            self._members_read_done(ctx, res, out)
        elif type(ctx) is _GapRead:
            self._gap_read_done(ctx, res, now, out)
        elif type(ctx) is _HeadRead:
            if isinstance(res, SessionLoaded):
                self._advance_head(ctx.user, res.head, out, now)
        elif type(ctx) is _ReadersRead:
            c = self._conns.get(ctx.conn)
            if c is None:
                return
            c.history_reads -= 1
            rf = ctx.frame
            if not isinstance(res, ReadersPage):
                rresp = F.ReadersResp(rf.req_id, rf.conv, ErrorCode.STORE_UNAVAILABLE, ())
            else:
                readers = tuple(F.Reader(u, seq) for u, seq in res.readers)
                rresp = F.ReadersResp(rf.req_id, rf.conv, res.code, readers if res.code is ErrorCode.OK else ())
            self._send(c.id, rresp, out)
            if c.history_reads == _MAX_HISTORY_READS - 1:
                self._resume(c, now, out)  # it was held at the limit: read on
        else:
            assert type(ctx) is _HistoryRead
            c = self._conns.get(ctx.conn)
            if c is None:
                return
            c.history_reads -= 1
            f = ctx.frame
            if not isinstance(res, HistoryPage):
                resp = F.HistoryResp(f.req_id, f.conv, ErrorCode.STORE_UNAVAILABLE, (), False)
            elif res.code is not ErrorCode.OK:
                resp = F.HistoryResp(f.req_id, f.conv, res.code, (), False)
            else:
                page = res.messages
                more = len(page) > ctx.limit
                page = page[: ctx.limit]
                # One frame must hold the page (the client refuses larger
                # ones), and a quarter of max_outbound (a page never makes
                # its own reader a slow consumer): cut it there, at least
                # one message, `more` set.
                budget = self._page_bytes()
                for i, m in enumerate(page):
                    budget -= (len(m.payload) + len(m.conv) + len(m.sender) + len(m.device) + _MESSAGE_OVERHEAD
                               + _mentions_bytes(m.mentions))
                    if budget < 0 and i > 0:
                        page, more = page[:i], True
                        break
                msgs = tuple(_to_frame_message(0, m) for m in page)
                resp = F.HistoryResp(f.req_id, f.conv, ErrorCode.OK, msgs, more)
            self._send(c.id, resp, out)
            c.reserved -= ctx.reserve
            self._resume(c, now, out)  # it may have been held at a limit: read on

    # ------------------------------------------------------------ hooks

    def auth_completed(self, request_id: int, result: Union[Identity, BaseException], now: int) -> list[Command]:
        """The answer to :class:`Authenticate` ``request_id``: the token's
        :class:`Identity`; an :class:`AuthError` saying why it is refused
        (the connection is closed with AUTH_FAILED and that reason: final for
        the client); or any other exception when the token could not be
        checked (an authentication service down, a timeout: closed with
        INTERNAL, and the client logs in again later).  An Identity with
        fields of the wrong type is refused (AUTH_FAILED), never trusted.
        An answer the core no longer waits for (its connection closed, or the
        login timed out) is ignored."""
        out: list[Command] = []
        hook = self._hooks.get(request_id)
        if type(hook) is not _LoginHook:
            return out
        del self._hooks[request_id]
        c = self._conns.get(hook.conn)
        if c is None or c.state is not _ConnState.AUTHENTICATING:
            return out
        c.waiting = 0
        self._on_identity(c, hook.frame, result, now, out)
        self._resume(c, now, out)
        self._maybe_commit(out, now)
        return out

    def content_checked(
        self, request_id: int, reason: Optional[str], now: int, *, code: ErrorCode = ErrorCode.REJECTED
    ) -> list[Command]:
        """The answer to :class:`CheckContent` ``request_id``: None lets the
        message through; a reason refuses it with a SendAck of ``code`` and an
        Error frame with the reason.  ``code`` is REJECTED (final: the filter
        said no) unless the host could not get an answer (the filter failed
        or timed out): then INTERNAL, which the client retries with the same
        local id.  Raises ValueError for any other code.  An answer the core
        no longer waits for (the connection closed) is ignored."""
        if code is not ErrorCode.REJECTED and code is not ErrorCode.INTERNAL:
            raise ValueError(f"content_checked: code must be REJECTED or INTERNAL, not {code!r}")
        out: list[Command] = []
        hook = self._hooks.get(request_id)
        if type(hook) is not _ContentHook:
            return out
        del self._hooks[request_id]
        c = self._conns.get(hook.conn)
        if c is None:
            return out  # gone: the client retries the send after reconnecting
        c.waiting = 0
        f = hook.frame
        if reason is not None:
            c.inflight -= 1
            self._stats["rejected"] += 1
            if code is ErrorCode.INTERNAL:
                # Refused when read, the client resending it (as RATE_LIMITED):
                # the sends it has on the wire after it wait for that retry.
                c.mark = _new_mark(c, f.local_id, code, now)
            self._refuse_send(c, f.local_id, code, out, verdict_reason(reason))
        elif type(f) is F.AmendReq:
            self._propose_amend(c, f, now, out)
        else:
            self._propose_send(c, f, message_digest(f.conv, f.payload), now, out)  # type: ignore[union-attr,arg-type]
        self._resume(c, now, out)
        self._maybe_commit(out, now)
        return out

    # ------------------------------------------------------------ time

    def next_deadline(self) -> Optional[int]:
        """When (µs, the clock ``now`` is given in) :meth:`handle_timer`
        must next be called, or None if nothing is scheduled.  It may be
        early (a timer that turns out to have moved), never late; ask again
        after every call into the core."""
        due = self._next_reclaim
        if due is None and (self.config.history_max_age or self.config.history_max_count):
            # A default retention is in use: the reclaim pass starts now
            # (handle_timer arms it), not with the first connection or post
            # -- a restarted broker left alone must still trim (see
            # _arm_reclaim for why it otherwise waits).
            due = 0
        if self._timers:
            t = self._timers[0][0]
            due = t if due is None or t < due else due
        if self._lazy_since is not None and self._inflight is None and self._ops and not self._holding:
            t = self._lazy_since + self.config.ack_delay
            due = t if due is None or t < due else due
        if self._retry_at is not None and not self._holding:
            due = self._retry_at if due is None or self._retry_at < due else due
        if self._over_since is not None:
            t = self._over_since + self.config.outbound_total_grace
            due = t if due is None or t < due else due
        return due

    def handle_timer(self, now: int) -> list[Command]:
        """Time has come (``now`` >= :meth:`next_deadline`; calling it early
        is harmless): login and idle timeouts, token expiry, delivery acks
        that waited ``ack_delay``, reclamation."""
        out: list[Command] = []
        timers = self._timers
        idle = self.config.idle_timeout
        while timers and timers[0][0] <= now:
            _, _, kind, conn = heapq.heappop(timers)
            c = self._conns.get(conn)
            if c is None:
                continue
            if kind == _LOGIN_DUE:
                if c.state is not _ConnState.ACTIVE:
                    self._close(c, CloseCode.LOGIN_TIMEOUT, "no Login within the login timeout", out)
            elif kind == _IDLE_DUE:
                due = c.last_seen + idle
                if due > now:
                    self._arm(due, _IDLE_DUE, conn)  # heard from since: look again then
                else:
                    self._close(c, CloseCode.IDLE_TIMEOUT, "nothing received within the idle timeout", out)
            elif kind == _HIBERNATE_DUE:
                # No compressed frame either way for a whole compression_idle: release
                # the deflate streams' zlib state (~25 KiB -> ~4 KiB); they
                # come back at the next compressed frame.  Looked at again
                # every compression_idle while the connection lives.
                activity = c.session.compression_activity
                if activity == c.hibernate_mark:
                    c.session.hibernate()
                c.hibernate_mark = activity
                self._arm(now + self.config.compression_idle, _HIBERNATE_DUE, conn)
            elif c.expires is not None and c.expires <= now:
                self._close(c, CloseCode.TOKEN_EXPIRED, _TOKEN_EXPIRED, out)
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None  # due: _maybe_commit below proposes what waits
        if self._next_reclaim is None:
            self._next_reclaim = now + self.config.reclaim_interval
        elif now >= self._next_reclaim:
            self._next_reclaim = now + self.config.reclaim_interval
            self._propose(Reclaim(now, self.config.device_retention, self.config.inbox_max_age), None)
            # History retention: the store skips the walk when nothing is set.
            self._propose(Expire(now, self.config.history_max_age, self.config.history_max_count,
                                 keep=self.config.dedupe_window), None)
        self._maybe_commit(out, now)
        return out

    def _arm(self, due: int, kind: int, conn: int) -> None:
        timers = self._timers
        if len(timers) > 4 * len(self._conns) + 64:
            # Mostly entries of closed connections (churn): drop them so the
            # heap stays proportional to the live connections.
            timers[:] = [t for t in timers if t[3] in self._conns]
            heapq.heapify(timers)
        self._timer_seq += 1
        heapq.heappush(timers, (due, self._timer_seq, kind, conn))

    def clock_stepped(self, step: int) -> None:
        """The host's clock (the one ``now`` is read from) was stepped by
        ``step`` µs (> 0: forward) since the last call: NTP correcting it, an
        operator, a VM restored from a snapshot -- a jump, not a slew.

        Why: every duration the core measures is a difference of two ``now``
        values, so a step is taken for elapsed time.  Forward, each
        connection not heard from since the step was closed for idleness at
        the next call; backward, every send-rate bucket went negative for the
        length of the step (sends refused as RATE_LIMITED for as long), and
        idle timeouts, ack_delay and reclamation waited as long.  So the
        reference times of durations move by ``step`` here: idle and login
        timeouts, compression hibernation, ack_delay, the retry after a
        failed batch, reclamation, the send, control and typing rate buckets,
        held typing frames and the typing membership cache.  What is a time
        of day keeps its meaning: a token's expiry (the wall-clock time it
        carries), and stamps (the hybrid clock follows the new ``now``
        forward and never goes back).  Times the host holds across the step
        (``asked`` of :meth:`presence_checked`) are not moved: that read may
        be taken or dropped once.

        A host whose ``now`` cannot step need not call it; the served broker
        calls it from its default clock (:class:`pimcore.clock.WallClock`).
        O(connections): meant for rare steps.  No commands: ask
        :meth:`next_deadline` again after it.  Raises TypeError if ``step``
        is not an ``int`` (a float would turn every deadline into one),
        ValueError if ``abs(step)`` is 2**62 µs (146,000 years) or more: no
        clock steps that far, and deadlines moved by it would leave the
        signed 64-bit µs a host may keep them in.  Nothing changed then."""
        if type(step) is not int:
            raise TypeError(f"clock step must be an int of µs, not {type(step).__name__}")
        if not -_MAX_STEP < step < _MAX_STEP:
            raise ValueError(f"clock step of {step} µs is out of range (|step| < 2**62 µs)")
        if not step:
            return
        for c in self._conns.values():
            c.opened += step
            c.last_seen += step
            c.refill_at += step
            c.ctl_at += step
            if c.mark is not None:
                c.mark.until += step
        # A token's expiry is a wall-clock time: its timer stays.
        self._timers[:] = [(due if kind == _TOKEN_DUE else due + step, seq, kind, conn)
                           for due, seq, kind, conn in self._timers]
        heapq.heapify(self._timers)
        if self._lazy_since is not None:
            self._lazy_since += step
        if self._retry_at is not None:
            self._retry_at += step
        if self._next_reclaim is not None:
            self._next_reclaim += step
        for conn, (tokens, at) in list(self._typing_tokens.items()):
            self._typing_tokens[conn] = (tokens, at + step)
        for conv, (until, members) in list(self._typing_members.items()):
            self._typing_members[conv] = (until + step, members)
        for user, at in list(self._pres_hinted.items()):
            self._pres_hinted[user] = at + step
        for devices in self._online.values():
            for dev in devices.values():
                if dev.typing:
                    dev.typing = {key: (frame, until + step) for key, (frame, until) in dev.typing.items()}

    # ------------------------------------------------------------ embedding API

    def create_group(
        self, conv: str, members: Iterable[str], now: int, *, ref: int = 0, history_visible: bool = False
    ) -> list[Command]:
        """Control plane: create a group, as an op of the next batch (ordered
        with the messages around it).  ``history_visible``: members added
        later may read what was said before (default: they see the
        conversation from their JOINED entry on).  :class:`AdminDone` with
        ``ref`` says how it went: Rejected(BAD_REQUEST) at once, nothing
        stored, for no members (:data:`pimcore.ids.EMPTY_GROUP`)."""
        if isinstance(members, str):
            raise ValueError("members must be an iterable of user ids, not a string")
        users = tuple(sorted(set(members)))
        if not users:
            return [AdminDone(ref, Rejected(ErrorCode.BAD_REQUEST))]
        return self._admin(CreateGroup(conv, users, now, bool(history_visible)), ref, now)

    def add_members(self, conv: str, users: Iterable[str], now: int, *, ref: int = 0) -> list[Command]:
        """Add users to a group (see :meth:`create_group`).  Each user who
        was not a member gets a JOINED entry in the conversation, pushed to
        the members (the new one included) like a message."""
        if isinstance(users, str):
            raise ValueError("users must be an iterable of user ids, not a string")
        return self._change_members(AddMembers, conv, users, ref, now)

    def remove_members(self, conv: str, users: Iterable[str], now: int, *, ref: int = 0) -> list[Command]:
        """Remove users from a group (see :meth:`create_group`).  Each user
        who was a member gets a LEFT entry, pushed to the members and to
        the leaving user.  A removal that would leave the group with no
        member is refused by the store as a whole: Rejected(BAD_REQUEST),
        no one removed (:data:`pimcore.ids.LAST_MEMBERS`)."""
        if isinstance(users, str):
            raise ValueError("users must be an iterable of user ids, not a string")
        return self._change_members(RemoveMembers, conv, users, ref, now)

    def _change_members(self, kind: type, conv: str, users: Iterable[str], ref: int, now: int) -> list[Command]:
        members = tuple(sorted(set(users)))
        # One stamp per user from the broker's clock (an entry that turns
        # out to be a no-op just leaves its stamp unused).
        stamps = []
        for _ in members:
            t = self._clock.tick(now)
            stamps.append((t.to_bytes(8, "big") + self._node_id, t))
        return self._admin(kind(conv, members, now, "", tuple(stamps), self.config.record_events), ref, now)

    def _finish_admin(self, res: GroupChanged, to_pump: set[str]) -> None:
        """Membership entries are pushed like messages (cf. _finish_send)."""
        self._membership_changed(res)
        if not self.relay_elsewhere and not res.conv.startswith(DIRECT_PREFIX):
            self._batch_seqs.setdefault(res.conv, []).extend(m.seq for m in res.entries)
        heads, fresh, online = self._heads, self._fresh, self._online
        for m, positions in zip(res.entries, res.positions):
            for user, pos in positions:
                if user in heads:
                    if pos > heads[user]:
                        heads[user] = pos
                    if user in online:
                        to_pump.add(user)
                        fresh.setdefault(user, []).append((pos, _to_frame_message(pos, m)))

    def _arm_reclaim(self, now: int) -> None:
        # Reclamation (and history retention) starts with the first
        # connection, or the first host write (:meth:`host_write`): a broker
        # fed only through the embedding API must reclaim acked events and
        # expire history too (with a default retention configured, at once:
        # next_deadline).  A consumer's events are safe from it once the
        # consumer has a cursor, which reading from its cursor creates
        # (pimcore.embed.Pimcore._hold_events).
        if self._next_reclaim is None:
            self._next_reclaim = now + self.config.reclaim_interval

    def host_write(self, now: int) -> list[Command]:
        """The host is about to write (a post, a group change, an ack...,
        through the embedding handle): the reclaim pass starts
        ``reclaim_interval`` after the first one, as it does after the first
        connection -- a broker used only by its host reclaims acked events,
        inbox entries and expired history too.  Returns [] (the pass comes
        with :meth:`handle_timer` at :meth:`next_deadline`)."""
        self._arm_reclaim(now)
        return []

    def _admin(self, op: Op, ref: int, now: int) -> list[Command]:
        out: list[Command] = []
        self._propose(op, _AdminCtx(ref))
        self._maybe_commit(out, now)
        return out

    def kick(self, user: str, device: Optional[str], now: int, reason: str = "") -> list[Command]:
        """Control plane: end the sessions of ``user`` now (only ``device``'s
        if given) with ``Close(KICKED)``; the SDK does not log in again by
        itself.  Nothing is stored: to keep someone out, also revoke."""
        out: list[Command] = []
        for c in list(self._conns.values()):
            if c.state is _ConnState.ACTIVE and c.user == user and (device is None or c.device == device):
                self._stats["kicks"] += 1
                self._event("kicked", user=c.user, device=c.device, reason=reason)
                self._close(c, CloseCode.KICKED, reason or "the host ended this session", out)
        self._maybe_commit(out, now)
        return out

    def inbox_advanced(self, user: str, head: int, now: int) -> list[Command]:
        """Cluster hint: another node (sharing this store) appended to
        ``user``'s inbox up to position ``head``.  The devices of ``user``
        online here are pushed what they lack (read from the store).  A hint
        is only a wake-up: stale, repeated or lost hints are harmless
        (positions decide what is delivered)."""
        out: list[Command] = []
        self._advance_head(user, head, out, now)
        return out

    def _advance_head(self, user: str, head: int, out: list[Command], now: int) -> None:
        """``user``'s inbox grew to ``head`` (read or told, not committed
        here): their devices online here are pushed what they lack (from
        the store)."""
        if user in self._heads and head > self._heads[user]:
            self._heads[user] = head
            for dev in list(self._online.get(user, {}).values()):
                self._pump(dev, out, now)

    def replaced_elsewhere(self, user: str, device: str, now: int) -> list[Command]:
        """Cluster hint: ``user``'s ``device`` logged in on another node; its
        session here (if any) ends with ``Close(REPLACED)``, as a newer login
        on this node would end it."""
        out: list[Command] = []
        for c in list(self._conns.values()):
            if c.state is _ConnState.ACTIVE and c.user == user and c.device == device:
                self._close(c, CloseCode.REPLACED, "the same device logged in again (on another node)", out)
        self._maybe_commit(out, now)
        return out

    # Cluster hints about state that is not an inbox entry (read markers,
    # receipts, revocations, conversation settings, kicks): another node
    # committed the change and tells the nodes where the user has a device
    # online.  Like inbox_advanced they are wake-ups for the devices online
    # here: the store stays authoritative, a login reads everything afresh,
    # so a repeated or stale hint changes nothing (markers and receipts
    # never move back: one at or below what was sent here is ignored) and a
    # lost one only delays: the store's re-check delivers it again (on Redis
    # Cluster within a second: redis_scripts ClusterOps._catch_up), so these
    # must stay idempotent.

    def read_elsewhere(self, user: str, conv: str, read_seq: int, last_seq: int, unread: int, now: int) -> list[Command]:
        """Cluster hint: ``user`` marked ``conv`` read up to ``read_seq`` on
        another node (the store answered ``last_seq`` and ``unread`` then).
        Their devices online here get the ReadStates and the ConvUpdate a
        Read on this node would have sent them."""
        out: list[Command] = []
        self._send_marker(user, conv, read_seq, last_seq, unread, True, out)
        return out

    def floor_moved_elsewhere(self, user: str, conv: str, purged: int, now: int) -> list[Command]:
        """Cluster hint: retention (``purged`` -1) or a purge of ``conv``
        (``purged`` its last seq) on another node moved its history floor.
        ``user``'s devices online here get the store's read state of it, as
        those on that node did (:meth:`_refresh_floor`, :meth:`_purged_group`)."""
        out: list[Command] = []
        if direct_members(conv) is None and purged >= 0:
            self._purged_group(user, conv, purged, out)
        else:
            self._refresh_members(conv, (user,), purged, out)
        return out

    def receipt_elsewhere(self, user: str, conv: str, reader: str, read_seq: int, now: int) -> list[Command]:
        """Cluster hint: ``reader``, ``user``'s peer in the 1:1 chat
        ``conv``, read up to ``read_seq`` on another node.  ``user``'s
        devices online here get the ReadReceipt.  A ``conv`` that is not the
        1:1 chat of the two is ignored."""
        out: list[Command] = []
        pair = direct_members(conv)
        if pair is not None and user in pair and reader in pair and user != reader:
            self._send_receipt(user, conv, reader, read_seq, True, out)
        return out

    def revoked_elsewhere(self, user: str, device: Optional[str], before: int, now: int) -> list[Command]:
        """Cluster hint: the host revoked ``user``'s tokens (only
        ``device``'s if given) issued before ``before`` (µs) on another node,
        durably.  The sessions here that used one end with
        ``Close(TOKEN_REVOKED)``, as :meth:`revoke` ends them on its node,
        and so do those on connections opened before ``before`` whatever
        their token's iat (stored then: the bound over those iats)."""
        out: list[Command] = []
        key = (user, device or "")
        # A live session here on a connection opened before the bound used a
        # token issued before it, whatever its iat says (an issuer whose
        # clock runs ahead, within the authenticator's iat leeway): ended,
        # and the bound raised over that iat -- stored, as :meth:`revoke`
        # does on its node (a new user's trial: such a session outlived a
        # revocation through another node, and its token logged in again).
        raised = before
        for c in self._conns.values():
            if (c.state is _ConnState.ACTIVE and c.user == user and (device is None or c.device == device)
                    and c.opened <= before):
                raised = max(raised, c.issued_at + 1)
        self._revoke_in_force(key, raised)
        self._close_revoked(user, device, raised, out)
        if raised > before:
            self._propose(RevokeTokens(user, device or "", raised), None)
        self._maybe_commit(out, now)
        return out

    def conversation_changed(self, user: str, conv: str, now: int) -> list[Command]:
        """Cluster hint: ``user``'s settings of ``conv`` (pinned, muted,
        hidden) changed on another node.  Their devices online here get the
        entry as the store has it now (ConvUpdate)."""
        out: list[Command] = []
        self._conv_update(user, conv, out)
        return out

    def retention_in_use(self, now: int) -> list[Command]:
        """The host says the store holds a retention of some conversation
        (:meth:`pimcore.store.base.Store.has_retention`, read at start): the
        reclaim pass starts now, not with the first connection or post --
        a restarted broker left alone must still trim.  Returns [] (the pass
        comes with :meth:`handle_timer` at :meth:`next_deadline`)."""
        self._arm_reclaim(now)
        return []

    def set_retention(self, conv: str, max_age: int, max_count: int, now: int, *, ref: int = 0) -> list[Command]:
        """Control plane: the history retention of ``conv`` (:class:`SetRetention`:
        ``max_age`` µs, ``max_count`` entries; per field -1 = the broker
        default, 0 = no limit), stored; applied at the next reclaim.
        :class:`AdminDone` with ``ref`` carries RetentionSet or Rejected."""
        self._arm_reclaim(now)
        return self._admin(SetRetention(conv, max_age, max_count), ref, now)

    def purge_conversation(self, conv: str, now: int, *, ref: int = 0) -> list[Command]:
        """Control plane: delete every stored entry of ``conv`` and, for a
        group, the group (:class:`PurgeConversation`; idempotent).  The
        devices of a 1:1 chat's users online here are sent their read state
        (unread 0: _refresh_floor), a group's members ReadState(conv, F, F,
        0) (_purged_group; a group then answers UNKNOWN_CONVERSATION), and
        the devices that asked for CAP_CONV_PURGED a ConvPurged too.
        :class:`AdminDone` with ``ref`` carries Purged or Rejected."""
        return self._admin(PurgeConversation(conv), ref, now)

    def purge_user(self, user: str, now: int, *, ref: int = 0) -> list[Command]:
        """Control plane: delete all data of ``user`` (:class:`PurgeUser`;
        idempotent): the user's live sessions end now with Close(KICKED),
        tokens issued before ``now``, and those of the live sessions whatever
        their issue time (:meth:`revoke`), are refused from now on (durably:
        the purge revokes them), the user leaves every group (LEFT entries,
        pushed like messages), their messages become tombstones.
        :class:`AdminDone` with ``ref`` carries Purged or Rejected."""
        out: list[Command] = []
        if valid_id(user):
            key = (user, "")
            # (The live sessions' tokens too, whatever their iat says:
            # revoke.  The purge's own bound is now, its LEFT entries' time.)
            bound = max(now, self._live_issued(user, None) + 1)
            self._revoke_in_force(key, bound)
            if bound > now:
                self._propose(RevokeTokens(user, "", bound), None)
            for c in list(self._conns.values()):
                if c.state is _ConnState.ACTIVE and c.user == user:
                    self._stats["kicks"] += 1
                    self._event("kicked", user=c.user, device=c.device, reason="purged")
                    self._close(c, CloseCode.KICKED, "this user's data was deleted", out)
            # Acks not saved yet would register the devices again after the
            # purge: they are moot now.
            for k in [k for k in self._acks_unsaved if k[0] == user]:
                del self._acks_unsaved[k]
        self._propose(PurgeUser(user, now), _AdminCtx(ref))
        self._maybe_commit(out, now)
        return out

    def ack_events(self, consumer: str, upto: int, now: int, *, ref: int = 0) -> list[Command]:
        """Control plane: host event consumer ``consumer`` handled every
        event up to id ``upto`` (:class:`AckEvents`, an op of the next
        batch).  :class:`AdminDone` with ``ref`` carries the store's answer
        once it is durable (EventsAcked with the cursor now in force, or
        Rejected: BAD_REQUEST, STORE_UNAVAILABLE)."""
        return self._admin(AckEvents(consumer, upto), ref, now)

    def delete_consumer(self, consumer: str, now: int, *, ref: int = 0) -> list[Command]:
        """Control plane: delete host event consumer ``consumer``'s durable
        cursor (:class:`DeleteConsumer`, an op of the next batch): the
        reclaim stops waiting for it.  :class:`AdminDone` with ``ref``
        carries the store's answer once it is durable (ConsumerDeleted,
        ``deleted`` False when it had none, or Rejected: BAD_REQUEST,
        STORE_UNAVAILABLE).  Whether a reader still reads it is the host's
        to know (pimcore.embed refuses a consumer in use)."""
        return self._admin(DeleteConsumer(consumer), ref, now)

    def _event(self, type_: str, **fields: Any) -> None:
        if self.config.record_events:
            self._lazy_events.append(event_data(type_, **fields))

    def revoke(self, user: str, device: Optional[str], before: Optional[int], now: int, *, ref: int = 0) -> list[Command]:
        """Control plane: refuse ``user``'s tokens issued before ``before``
        (µs; None: ``now``; all its devices, or only ``device``) from now on, durably
        (:class:`RevokeTokens`), and end the live sessions that used one
        (``Close(TOKEN_REVOKED)``) at once.  A ``before`` at or after ``now``
        is raised above the issue time of every live session's token (a
        token stamped by an issuer whose clock runs ahead, within the
        authenticator's leeway, was issued before now all the same).
        :class:`AdminDone` with ``ref`` carries the store's answer
        (Revoked, with the bound in force, or Rejected).  Rejected
        (BAD_REQUEST) at once, nothing revoked, for an invalid ``user`` or
        ``device`` -- ``""`` among them: it is the store's key for "every
        device", so it revoked them all."""
        if not valid_id(user) or (device is not None and not valid_id(device)):
            return [AdminDone(ref, Rejected(ErrorCode.BAD_REQUEST))]
        key = (user, device or "")
        if before is None:
            before = now
        if before >= now:
            # Up to now (or later): every live session's token was issued
            # before now, whatever its iat says -- an issuer whose clock runs
            # ahead of ours (within the authenticator's leeway) stamps a
            # later one, and such a token survived (a new user's trial): the
            # bound covers the live sessions' tokens too.
            before = max(before, self._live_issued(user, device) + 1)
        # In force at once, before the write is durable: a login that
        # completes meanwhile must not slip through (and the session ends
        # now, not after the next fsync).
        self._revoke_in_force(key, before)
        out: list[Command] = []
        self._close_revoked(user, device, before, out)
        self._propose(RevokeTokens(user, device or "", before), _AdminCtx(ref))
        self._maybe_commit(out, now)
        return out

    def revoked_before(self, user: str, device: Optional[str] = None) -> int:
        """The revocation in force for ``user``'s tokens (``device``'s, if
        given: the user's and that device's, whichever is later; None: the
        latest of the user's and every device's, as a token bound to no
        device may log in on any) as far as
        this broker knows it since it started -- made here, or heard of from
        another node -- in µs; 0 with none.  Not a store read: one stored
        before a restart is not in it.  A token issued before it is refused
        at login (``issued_at < revoked_before``)."""
        revoked = self._revoked
        if device is not None:
            return max(revoked.get((user, ""), 0), revoked.get((user, device), 0))
        # A token bound to no device logs in on any: every device's counts (a
        # last trial: one issued right after revoke(user, device) was refused
        # on that device).
        return self._revoked_latest.get(user, 0)

    def _revoke_in_force(self, key: tuple[str, str], before: int) -> None:
        """Raise the revocation in force for ``key`` ((user, device or ""))
        to ``before`` (µs) -- never lowered -- and the user's latest."""
        bound = max(self._revoked.get(key, 0), before)
        self._revoked[key] = bound
        user = key[0]
        if bound > self._revoked_latest.get(user, 0):
            self._revoked_latest[user] = bound

    def _live_issued(self, user: str, device: Optional[str]) -> int:
        """The latest issue time (µs) of the tokens ``user``'s live sessions
        (only ``device``'s if given) logged in with; -1 with none."""
        latest = -1
        for c in self._conns.values():
            if c.state is _ConnState.ACTIVE and c.user == user and (device is None or c.device == device):
                latest = max(latest, c.issued_at)
        return latest

    def _close_revoked(self, user: str, device: Optional[str], before: int, out: list[Command]) -> None:
        for c in list(self._conns.values()):
            if (
                c.state is _ConnState.ACTIVE
                and c.user == user
                and (device is None or c.device == device)
                and c.issued_at < before
            ):
                self._stats["revoked_sessions"] += 1
                self._close(c, CloseCode.TOKEN_REVOKED, "this token was revoked; get a new one", out)

    def post(
        self,
        conv: str,
        payload: bytes,
        now: int,
        *,
        sender: str = SYSTEM,
        device: str = SYSTEM,
        key: Union[str, bytes, None] = None,
        ref: int = 0,
        mentions: Sequence[str] = (),
        mention_all: bool = False,
    ) -> list[Command]:
        """Control plane: store a message in ``conv`` from ``sender`` (a user,
        who must be a member, with one of its ``device`` ids; or the system,
        ``ids.SYSTEM``, allowed everywhere) and deliver it like a client's.

        ``key`` is the idempotency key (text or bytes, at most 256 bytes):
        posts with the same sender, device and key are one message, exactly
        as a client's retries with one local id are (the key is hashed to
        the 64-bit local id, BLAKE2b); None posts without one.  The message
        is displayed after everything already in the conversation
        (``after_seq`` is the last seq).  :class:`PostDone` with ``ref`` says
        how it went.  Bypasses the send rate limit and the content filter:
        the host is trusted.  ``mentions`` / ``mention_all`` as in a
        SendReq (BAD_MENTION for an invalid user id, TOO_MANY_MENTIONS
        above ``Limits.max_mentions``)."""
        out: list[Command] = []
        if self.config.history_max_age or self.config.history_max_count:
            self._arm_reclaim(now)

        def refuse(code: ErrorCode) -> list[Command]:
            self._stats["rejected"] += 1
            out.append(PostDone(ref, code, b"", 0, 0))
            return out

        if not isinstance(payload, bytes) or len(payload) > self.config.limits.max_payload:
            return refuse(ErrorCode.PAYLOAD_TOO_LARGE if isinstance(payload, bytes) else ErrorCode.BAD_REQUEST)
        system = sender == SYSTEM
        if system:
            if device != SYSTEM:
                return refuse(ErrorCode.BAD_REQUEST)
            code = ErrorCode.OK if valid_conversation(conv) else ErrorCode.BAD_REQUEST
        else:
            if not (valid_id(sender) and valid_id(device)):
                return refuse(ErrorCode.BAD_REQUEST)
            code = self._check_conversation(sender, conv)
        if code is not ErrorCode.OK:
            return refuse(code)
        local_id = idempotency_local_id(key)
        if local_id is None:
            return refuse(ErrorCode.BAD_REQUEST)
        if len(mentions) > self.config.limits.max_mentions:
            return refuse(ErrorCode.TOO_MANY_MENTIONS)
        if not all(isinstance(u, str) and valid_id(u) for u in mentions):
            return refuse(ErrorCode.BAD_MENTION)
        digest = message_digest(conv, payload)
        dkey = (sender, device, local_id)
        pending = self._pending_sends.get(dkey)
        if pending is not None:
            if pending.digest != digest:
                return refuse(ErrorCode.DUPLICATE_CONFLICT)
            pending.waiters.append(("post", ref, True))  # True: a duplicate of the one in flight
            return out
        server_time = self._clock.tick(now)
        msg_id = server_time.to_bytes(8, "big") + self._node_id
        op = NewMessage(
            msg_id, conv, sender, device, local_id, server_time, server_time, payload, digest, _U64_MAX,
            self.config.record_events, tuple(sorted(set(mentions) - {sender})), bool(mention_all),
        )
        ctx = _PendingSend(dkey, digest, [("post", ref)])
        self._pending_sends[dkey] = ctx
        self._stats["posts"] += 1
        self._propose(op, ctx)
        self._maybe_commit(out, now)
        return out

    def online_devices(self, user: str) -> list[str]:
        return sorted(self._online.get(user, {}))

    def server_time(self, now: int) -> int:
        return self._clock.now(now)

    def statistics(self) -> BrokerStatistics:
        return BrokerStatistics(
            connections=len(self._conns),
            online_devices=sum(len(d) for d in self._online.values()),
            pending_ops=len(self._ops),
            batch_in_flight=self._inflight is not None,
            reads_in_flight=len(self._reads),
            hooks_in_flight=len(self._hooks),
            **self._stats,
        )

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, c: _Conn, frame: object, now: int, out: list[Command]) -> None:
        self._stats["frames_in"] += 1
        if c.state is not _ConnState.ACTIVE:
            # Only AWAITING_LOGIN gets here (the session gates what it hands
            # over): the other states before ACTIVE decode nothing.
            if isinstance(frame, F.Login):
                self._on_login(c, frame, now, out)
            elif isinstance(frame, F.Ping):
                if self._control(c, now, "Ping", out):
                    self._send(c.id, F.Pong(frame.nonce), out)
            elif isinstance(frame, F.Close):
                self._close(c, CloseCode.NORMAL, "closed by client", out)
            else:
                self._close(c, CloseCode.PROTOCOL_ERROR, f"{type(frame).__name__} before Login", out)
            return
        handler = self._handlers.get(type(frame))
        if handler is None:
            self._close(c, CloseCode.PROTOCOL_ERROR, f"unexpected {type(frame).__name__} from a client", out)
            return
        handler(self, c, frame, now, out)

    # ------------------------------------------------------------ login

    def _on_login(self, c: _Conn, f: F.Login, now: int, out: list[Command]) -> None:
        rid = self._request_id()
        c.state = _ConnState.AUTHENTICATING
        c.waiting = rid
        self._hooks[rid] = _LoginHook(c.id, f)
        out.append(Authenticate(rid, f.token, now))

    def _on_identity(self, c: _Conn, f: F.Login, result: Union[Identity, BaseException], now: int, out: list[Command]) -> None:
        if isinstance(result, BaseException) and not isinstance(result, AuthError):
            self._close(c, CloseCode.INTERNAL, "the token could not be checked now; log in again later", out)
            return
        try:
            if isinstance(result, AuthError):
                raise result
            if not isinstance(result, Identity):
                raise AuthError("authentication failed")
            ident = result
            if not (
                type(ident.user) is str
                and (ident.device is None or type(ident.device) is str)
                and (ident.expires is None or type(ident.expires) is int)
            ):
                raise AuthError("the authenticator returned a malformed identity")
            if not valid_id(ident.user):
                raise AuthError(f"token names an invalid user id: {id_problem(ident.user, 'user')}")
            if not valid_id(f.device):
                raise AuthError(f"invalid device id: {id_problem(f.device, 'device')}")
            if ident.device is not None and ident.device != f.device:
                raise AuthError(f"token is bound to device {_show(ident.device)}, not {_show(f.device)}")
        except AuthError as exc:
            self._stats["auth_failures"] += 1
            self._close(c, CloseCode.AUTH_FAILED, str(exc) or "authentication failed", out)
            return
        user = ident.user
        c.state = _ConnState.LOADING
        c.login = f
        rid = self._request_id()
        c.waiting = rid
        self._ref_head(user)
        self._reads[rid] = _LoginRead(c.id, user, f.device, ident)
        # A cursor from an earlier epoch is checked against where that epoch
        # ended in the store's history (SessionLoaded.foreign): at the higher
        # of what the client took and its own sends it was told (Login.sent:
        # what it took stops below them while its app has messages queued,
        # and a store restored from a hot copy that lost them must still
        # see it; an entry refilled below the claim is refilled below both).
        told = max(f.position, f.sent)
        claim = (told, bytes(f.epoch)) if f.epoch and f.epoch != self.epoch and told > 0 else (0, b"")
        out.append(StoreRequest(rid, (LoadSession(user, f.device, True, *claim),), False))

    def _activate(
        self, c: _Conn, ctx: _LoginRead, loaded: SessionLoaded, now: int, out: list[Command]
    ) -> Optional[_Device]:
        f = c.login
        assert f is not None
        user, device, ident = ctx.user, ctx.device, ctx.identity
        c.login = None
        c.waiting = 0

        # Revoked by the host: durably (read with the session) or by a
        # revocation committed while this login's read was out.
        revoked = max(
            loaded.revoked_before, self._revoked.get((user, ""), 0), self._revoked.get((user, device), 0)
        )
        if (ident.issued_at or 0) < revoked:
            self._stats["auth_failures"] += 1
            self._close(c, CloseCode.TOKEN_REVOKED, "this token was revoked; get a new one", out)
            return None

        # One connection per device: the newest wins (the old one is likely a
        # half-dead socket the device has already given up on).
        old = self._online.get(user, {}).get(device)
        if old is not None:
            old_conn = self._conns.get(old.conn)
            if old_conn is not None:
                self._close(old_conn, CloseCode.REPLACED, "the same device logged in again", out)

        # Resume point.  The head may have grown since the read (a batch
        # committed meanwhile): _heads followed it.
        head = max(loaded.head, self._heads.get(user, 0))
        floor = loaded.floor
        stored = max(loaded.position, self._acks_unsaved.get((user, device), 0))
        # The client's cursor means something only in this store's history.
        # From another epoch (a restored backup, an empty store, a power cut
        # under durability "os"), without any epoch, or beyond everything
        # this store ever handed out, it is ignored and the client is told to
        # resynchronize: trusting it would mark entries it never saw as
        # delivered (they would show only in history and unread counts).
        # A client that presents an epoch holds state of that history (seqs,
        # views, receipts) even at position 0: it too must be told.
        # An epoch the store still trusts, but whose end it knows to be before
        # the entry at the cursor (``loaded.foreign``): a restored hot copy
        # knows the running epoch, and a device that took more entries in it
        # after the copy claims positions new messages refilled.
        if f.epoch:
            resync = f.epoch not in self._trusted_epochs or max(f.position, f.sent) > head or loaded.foreign
        else:
            resync = f.position > 0 or f.sent > 0
        if resync:
            self._stats["resyncs"] += 1
        # A resynchronized client starts over: it dropped everything it held,
        # so it gets every entry the store still has for the user (from the
        # floor; ``gap`` if some were reclaimed).  Otherwise resume after the
        # furthest of what the client processed and what the store knows it
        # acked (a lazily saved ack may have been lost).
        known = 0 if resync else max(f.position, stored)
        gap = floor > known
        position = min(max(known, floor), head)

        c.state = _ConnState.ACTIVE
        c.user, c.device = user, device
        c.expires = ident.expires
        c.issued_at = ident.issued_at or 0
        c.tokens = float(self.config.limits.send_burst)
        c.refill_at = now
        dev = _Device(c.id, user, device, position)
        if resync:
            dev.full_upto = head  # (its own sends come again too)
        self._online.setdefault(user, {})[device] = dev
        self._heads[user] = head
        if not self.relay_elsewhere:
            # The user's groups' last seqs, for those we know nothing of
            # yet: a group whose messages went by before this broker
            # started must show a hole (_learn_seqs) should another writer
            # remove the user from it now.  A known one is left as it is: raising it could
            # hide a hole.
            seqs = self._seqs
            for st in loaded.conversations:
                if st.conv not in seqs and not st.conv.startswith(DIRECT_PREFIX):
                    if len(seqs) >= _MAX_SIZES:
                        del seqs[next(iter(seqs))]
                    seqs[st.conv] = st.last_seq
        if user in self._pres_watch:
            self._pres_dirty.add(user)
        # Registers the device and refreshes last_seen.  Position 0: the store
        # records only positions acked after a push (never a client's claim),
        # so a claim cannot mark undelivered entries as delivered.
        self._propose(TouchDevice(user, device, 0, now), None)
        self._stats["logins"] += 1
        out.append(DeviceOnline(c.id, user, device))
        self._event("online", user=user, device=device)
        if self.config.idle_timeout:
            self._arm(c.last_seen + self.config.idle_timeout, _IDLE_DUE, c.id)
        if self.config.compression_idle and f.caps & (F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP):
            self._arm(now + self.config.compression_idle, _HIBERNATE_DUE, c.id)
        if ident.expires is not None:
            self._arm(ident.expires, _TOKEN_DUE, c.id)

        lim = self.config.limits
        caps = f.caps & SUPPORTED_CAPS
        dev.caps = caps
        # From the frame after the Login on, the client may compress (when
        # granted); the session switches its own sending after the LoginAck.
        c.session.login_accepted(caps)
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
                epoch=self.epoch,
                resync=resync,
                states=len(loaded.conversations),
            ),
            out,
        )
        # The read states wait (_flush_states): a login's first bytes are
        # its LoginAck, the answers to what was pipelined after the Login
        # (the SDK's CalibrateReq: it takes nothing before that answer) and
        # the first Push of a catch-up.  Sent first, one read state per
        # conversation kept a link cut every few KB from ever delivering a
        # message: 300 conversations are 9 KB, and every login sent them
        # all again (a new user's trial: no progress in 30 s; 20,000
        # conversations at 30 KB alike).  That Push holds only entries the
        # read states count (at most ``loaded.head``): the client's counts,
        # set from the read states after it, stay exact.  (The caller
        # answers the pipelined frames, then starts the pump.)
        dev.states = loaded
        return dev

    def _flush_states(self, dev: _Device, out: list[Command]) -> None:
        """Send ``dev`` its login's read states (if not yet sent)."""
        loaded = dev.states
        if loaded is not None:
            dev.states = None
            self._send_read_states(dev, loaded, out)

    def _send_read_states(self, dev: _Device, loaded: SessionLoaded, out: list[Command]) -> None:
        """At login: to a device that asked (CAP_CONV_PURGED), the purge
        point of every conversation of the list ever purged (ConvPurged,
        not gone); then every conversation's marker and unread count (what
        the device missed while offline), then the peers' markers of 1:1
        chats.  Why the purge points, at every login: a device away while a
        conversation was purged and used again (a group created again with
        a message) is told nothing else, and kept the purged messages (a
        new user's trial).  First, so that the exact states land after what
        a client drops for it (a group's markers went with it)."""
        conn = dev.conn
        if dev.caps & F.CAP_CONV_PURGED:
            for s in loaded.conversations:
                if s.purged:
                    self._send(conn, F.ConvPurged(s.conv, s.purged, False), out)
        entries = [F.ReadState(s.conv, s.read_seq, s.last_seq, s.unread) for s in loaded.conversations]
        step = self.config.limits.read_state_batch
        for i in range(0, len(entries), step):
            self._send(conn, F.ReadStates(tuple(entries[i : i + step])), out)
        for s in loaded.conversations:
            if s.peer and s.peer_read_seq:
                self._send(conn, F.ReadReceipt(s.conv, s.peer, s.peer_read_seq), out)

    def _ref_head(self, user: str) -> None:
        self._head_refs[user] = self._head_refs.get(user, 0) + 1
        self._heads.setdefault(user, 0)

    def _unref_head(self, user: str) -> None:
        n = self._head_refs.get(user, 0) - 1
        if n > 0:
            self._head_refs[user] = n
            return
        self._head_refs.pop(user, None)
        if user not in self._online:
            self._heads.pop(user, None)

    # ------------------------------------------------------------ send path

    @staticmethod
    def _check_conversation(user: str, conv: str) -> ErrorCode:
        """What can be refused without the store: a malformed id, or a 1:1
        chat the user is not part of.  Whether a group exists and the user is
        a member is the store's to say, inside the transaction (NewMessage,
        MarkRead) or in the read (ReadHistory)."""
        if type(conv) is str:
            # One cached look-up per SendReq (the two below, each cached
            # behind its own wrapper, were a sixth of decoding one).
            pair = _conv_members(conv)
            if pair is None:
                return ErrorCode.BAD_REQUEST
        elif not valid_conversation(conv):
            return ErrorCode.BAD_REQUEST
        else:
            pair = direct_members(conv) or ()
        if pair and user not in pair:
            return ErrorCode.NOT_MEMBER
        return ErrorCode.OK

    def _on_send(self, c: _Conn, f: F.SendReq, now: int, out: list[Command]) -> None:
        def refuse(code: ErrorCode) -> None:
            self._stats["rejected"] += 1
            if code in _TRANSIENT_AT_READ:
                c.mark = _new_mark(c, f.local_id, code, now)
            if code is ErrorCode.RATE_LIMITED or self._control(c, now, "refused SendReq", out):
                self._refuse_send(c, f.local_id, code, out)

        if c.mark is not None and self._held_back(c, f.local_id, now, out):
            return None
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
        if len(f.payload) > lim.max_payload:
            return refuse(ErrorCode.PAYLOAD_TOO_LARGE)
        if f.mentions:
            if len(f.mentions) > lim.max_mentions:
                return refuse(ErrorCode.TOO_MANY_MENTIONS)
            if isinstance(_normalized_mentions(f), ErrorCode):
                return refuse(ErrorCode.BAD_MENTION)
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
            pending.waiters.append(self._waiter(c))
            c.inflight += 1
            return
        c.inflight += 1
        if self.config.content_filter is not None:
            # The host answers (content_checked); this connection waits, so
            # its messages keep their order, and nobody else does.
            rid = self._request_id()
            c.waiting = rid
            self._hooks[rid] = _ContentHook(c.id, f)
            out.append(CheckContent(rid, c.user, f.conv, f.payload, c.device, f.local_id))
            return
        self._propose_send(c, f, digest, now, out, key)

    def _propose_send(
        self, c: _Conn, f: F.SendReq, digest: bytes, now: int, out: list[Command],
        checked: Optional[tuple[str, str, int]] = None,
    ) -> None:
        """``checked``: the dedupe key, already looked up in _pending_sends
        just now (in the same call: nothing can have proposed it since)."""
        key = checked
        pending = None
        if key is None:
            key = (c.user, c.device, f.local_id)
            pending = self._pending_sends.get(key)
        if pending is not None:
            # Proposed by another connection of the device while this one's
            # content check was out (a reconnect): wait with it.
            self._join_checked(c, pending, f.local_id, digest, out)
            return
        server_time = self._clock.tick(now)
        msg_id = server_time.to_bytes(8, "big") + self._node_id
        if f.mentions or f.mention_all:
            mentions = _normalized_mentions(f)
            assert not isinstance(mentions, ErrorCode)  # _on_send refused those
            op = NewMessage(
                msg_id, f.conv, c.user, c.device, f.local_id, f.client_time, server_time, f.payload, digest, f.after_seq,
                self.config.record_events, tuple(u for u in mentions if u != c.user), f.mention_all,
            )
        else:
            op = _new_message(
                msg_id, f.conv, c.user, c.device, f.local_id, f.client_time, server_time, f.payload, digest, f.after_seq,
                self.config.record_events, (), False,
            )
        ctx = _PendingSend(key, digest, [c.id])
        self._pending_sends[key] = ctx
        self._propose(op, ctx)

    def _finish_send(
        self, op: NewMessage, ctx: _PendingSend, res: Result, to_pump: set[str], out: list[Command],
        acks: Optional[dict[int, list[F.SendAck]]] = None,
    ) -> None:
        if acks is not None and _impl.finish_send(
            op, ctx, res, Appended, self._pending_sends, self._heads, self._online, self._fresh, to_pump,
            self._conns, acks, self._stats, _send_ack, _message, _OK,
        ):
            # The common case in one fast-path call (pimcore/_pure/send.py):
            # a message without mentions, acked to its one connection.
            return
        self._pending_sends.pop(ctx.key, None)
        if isinstance(res, Appended):
            self._stats["messages_stored"] += 1
            ack = _send_ack(op.local_id, _OK, res.msg_id, res.seq, res.server_time)
            mentions = tuple(F.Mention(u) for u in op.mentions) if op.mentions else ()
            fan_out_stored(op, res, self._heads, self._online, self._fresh, to_pump, _message, mentions)
        elif isinstance(res, Duplicate):
            self._stats["duplicates"] += 1
            ack = F.SendAck(op.local_id, ErrorCode.OK, res.msg_id, res.seq, res.server_time)
            self._ack_waiters(ctx, ack, out, duplicate=True, acks=acks)
            return
        elif isinstance(res, Rejected):
            self._stats["rejected"] += 1
            code = res.code
            if code == ErrorCode.PURGED and not self._knows_purges(ctx):
                # (A client that did not ask CAP_CONV_PURGED may not know the
                # code, and would retry it as an unknown one: it gets the
                # final REJECTED, "refused by policy", instead.)
                code = ErrorCode.REJECTED
            ack = F.SendAck(op.local_id, code, b"", 0, 0)
        else:  # pragma: no cover - a store contract violation
            raise TypeError(f"unexpected result {res!r} for NewMessage")
        self._ack_waiters(ctx, ack, out, acks=acks)

    def _knows_purges(self, ctx: _PendingSend) -> bool:
        """Whether the device waiting for ``ctx``'s SendAck asked for
        CAP_CONV_PURGED (so knows ErrorCode.PURGED).  Its retries wait on
        the same pending send from the same device: the first waiting
        connection answers for them."""
        for waiter in ctx.waiters:
            c = waiter.conn if isinstance(waiter, _HeldAck) else self._conns.get(waiter) if isinstance(waiter, int) else None
            if c is not None:
                dev = self._online.get(c.user, {}).get(c.device)
                return dev is not None and dev.conn == c.id and bool(dev.caps & F.CAP_CONV_PURGED)
        return False

    def _ack_waiters(
        self, ctx: _PendingSend, ack: F.SendAck, out: list[Command], duplicate: bool = False,
        acks: Optional[dict[int, list[F.SendAck]]] = None,
    ) -> None:
        """Send ``ack`` to every waiter of ``ctx`` -- or, given ``acks``, queue
        it there per connection (a batch being finished: _flush_acks)."""
        waiters = ctx.waiters
        only = waiters[0]
        if acks is not None and len(waiters) == 1 and isinstance(only, int):
            # The usual case: one waiting connection, acks batched.
            c = self._conns.get(only)
            if c is not None:
                c.inflight -= 1
                pending = acks.get(only)
                if pending is None:
                    acks[only] = [ack]
                else:
                    pending.append(ack)
            return
        for conn in waiters:
            if isinstance(conn, tuple):  # a host post (Broker.post): ("post", ref[, True])
                code = ErrorCode(ack.code)
                dup = code is ErrorCode.OK and (duplicate or len(conn) > 2)
                out.append(PostDone(conn[1], code, ack.msg_id, ack.seq, ack.server_time, dup))
                continue
            if isinstance(conn, _HeldAck):
                # A retry that waited with this original, in its place.
                held = conn
                c = held.conn
                if self._conns.get(c.id) is not c:
                    continue  # gone (its id may be another connection's by now)
                c.inflight -= 1
                held.frames = [ack]
                if acks is not None:
                    acks.setdefault(c.id, [])  # (_flush_acks places it among c's SendAcks)
                else:
                    frames: list[F.Frame] = []
                    self._due(c, frames)
                    if frames:
                        self._send_many(c.id, frames, out)
                continue
            c = self._conns.get(conn)
            if c is None:  # gone: the client retries after reconnecting
                continue
            c.inflight -= 1
            if acks is not None:
                pending = acks.get(conn)
                if pending is None:
                    acks[conn] = [ack]
                else:
                    pending.append(ack)
            elif c.acks_held is not None:
                self._send_many(conn, self._in_order(c, [ack]), out)
            else:
                self._send(conn, ack, out)

    # ------------------------------------------------------------ SendAck order
    #
    # A connection's SendAcks leave in the order of its SendReqs and
    # AmendReqs (one window, one sequence of local ids): a client, the SDK,
    # may match them up by order, and a refusal must not arrive before the
    # SendAck of a send made before it.  The SendAcks of its stored sends
    # are in that order by construction: they are proposed in order, a
    # device's ops never pass each other into a batch (_ride_along), and a
    # batch's SendAcks go out per connection in op order (_flush_acks).
    # What is answered otherwise would overtake them: a refusal made
    # without the store (the window, the rate, the checks, a
    # DUPLICATE_CONFLICT, a content filter's REJECTED or INTERNAL) while
    # the connection still waits for earlier SendAcks, and a retry that
    # waits with an original proposed before sends of its connection that
    # are still owed (the original's batch answers it first).  Those wait
    # in c.acks_held (_HeldAck), each for its place: the number of SendAcks
    # owed before it when it was made.  Both kinds are made in SendReq
    # order, and every SendAck owed before one is made before it is (a
    # later send is proposed after the original a retry waits with), so
    # the oldest held is always the next to go once its place is reached.
    # Bounded: a connection holding ``window`` answers is not decoded
    # further (_ACKS_HELD) until they go -- paused past _PAUSE_BYTES, as
    # for a hook.  A connection that holds none costs nothing here but a
    # test of c.acks_held per connection of a batch (_flush_acks).

    def _hold(self, c: _Conn, frames: Optional[list[F.Frame]]) -> _HeldAck:
        """Hold an answer (``frames``; None: a retry joining its original)
        of ``c``'s newest SendReq/AmendReq behind the SendAcks owed before
        it: those awaited (c.inflight, held retries among them) and those
        held with their answer."""
        held = c.acks_held
        if held is None:
            held = c.acks_held = deque()
            owed = c.inflight
        else:
            owed = c.inflight + sum(1 for h in held if h.frames is not None)
        entry = _HeldAck(c, c.acks_out + owed, frames)
        held.append(entry)
        if len(held) >= self.config.limits.window and not c.waiting:
            c.waiting = _ACKS_HELD
        return entry

    def _due(self, c: _Conn, frames: list[F.Frame]) -> None:
        """Move to ``frames`` the held answers of ``c`` whose place has come."""
        held = c.acks_held
        assert held is not None
        # (<=: a place passed is due too -- an answer late is still sent,
        # never stuck.)
        while held and held[0].frames is not None and held[0].ordinal <= c.acks_out:
            frames.extend(held.popleft().frames)  # type: ignore[arg-type]
            c.acks_out += 1
        if not held:
            c.acks_held = None
        if c.waiting == _ACKS_HELD and len(held) < self.config.limits.window:
            c.waiting = 0
            self._unheld.append(c)

    def _in_order(self, c: _Conn, acks: list[F.SendAck]) -> list[F.Frame]:
        """``c``'s SendAcks ``acks`` (of its sends, made in the order sent)
        with its held answers in their places among them and after them."""
        frames: list[F.Frame] = []
        self._due(c, frames)
        for ack in acks:
            frames.append(ack)
            c.acks_out += 1
            if c.acks_held is not None:
                self._due(c, frames)
        return frames

    def _read_on(self, now: int, out: list[Command]) -> None:
        """Decode what the connections that held their window of answers
        (_ACKS_HELD) sent meanwhile, now that some of them went."""
        unheld, self._unheld = self._unheld, []
        for c in unheld:
            if self._conns.get(c.id) is c:
                self._pull(c, now, out)

    def _held_back(self, c: _Conn, local_id: int, now: int, out: list[Command]) -> bool:
        """``c`` has a refusal mark (_RefusalMark): refuse its SendReq/AmendReq
        ``local_id`` with the mark's code if it is a later one (true), else
        clear the mark -- the refused one's retry, or the mark expired -- and
        let the request be handled as usual (false)."""
        mark = c.mark
        assert mark is not None
        if local_id <= mark.local_id or now >= mark.until:
            c.mark = None
            c.spent = (mark.local_id, mark.count)
            return False
        self._stats["rejected"] += 1
        mark.count += 1
        if mark.count > 2 * self.config.limits.window:
            # More than a client can have had on the wire when the refused
            # one was answered, twice (a mark set again for the same send
            # keeps its count, _new_mark; an SDK halves its window per
            # refusal): it sends on without resending that one.
            c.strikes += 1
            if c.strikes >= self.config.rate_limit_strikes:
                self._close(
                    c, CloseCode.RATE_LIMITED,
                    f"kept sending past local id {mark.local_id}, refused ({mark.code.name}), without resending it", out,
                )
                return True
        self._refuse_send(c, local_id, mark.code, out)
        return True

    def _refuse_send(self, c: _Conn, local_id: int, code: ErrorCode, out: list[Command], reason: Optional[str] = None) -> None:
        """Answer ``c``'s newest SendReq/AmendReq, ``local_id``, with a
        SendAck of ``code`` -- after an Error with ``reason``, if given, so
        the client has it when the SendAck ends the send -- now if no
        SendAck is owed before it, else in its place (_hold)."""
        ack = F.SendAck(local_id, code, b"", 0, 0)
        if c.inflight or c.acks_held is not None:
            self._hold(c, [ack] if reason is None else [F.Error(code, local_id, reason), ack])
            return
        if reason is not None:
            self._error(c.id, code, local_id, reason, out)
        self._send(c.id, ack, out)

    def _waiter(self, c: _Conn) -> Union[int, _HeldAck]:
        """What ``c``'s newest SendReq/AmendReq waits as, joining a send in
        flight (before c.inflight counts it): the connection's id when no
        SendAck is owed before it; else its place (_hold), which the
        original -- proposed before the sends owed, so answered before them
        -- must not take."""
        if c.inflight or c.acks_held is not None:
            return self._hold(c, None)
        return c.id

    def _join_checked(self, c: _Conn, pending: _PendingSend, local_id: int, digest: bytes, out: list[Command]) -> None:
        """``c``'s newest request, counted in c.inflight and its content
        check passed, finds its key proposed meanwhile by another connection
        of the device (a reconnect): a conflict, or it waits with that send.
        It waits as ``c.id``, in order: everything ``c`` sent before was
        proposed, or joined a send proposed, before that one."""
        if pending.digest != digest:
            c.inflight -= 1
            self._stats["rejected"] += 1
            self._refuse_send(c, local_id, ErrorCode.DUPLICATE_CONFLICT, out)
        else:
            pending.waiters.append(c.id)

    # ------------------------------------------------------------ recall, edit, delete
    #
    # An AmendReq is a send in every way that matters for safety: the same
    # (user, device, local_id) dedupe key space and _pending_sends (a retry
    # joins its original in flight or gets the stored entry's identity), the
    # same window, rate limit and content filter (an EDIT's payload), acked
    # by SendAck only from the completion of the batch that stored it.  What
    # may be amended, by whom and until when is the store's to decide inside
    # the transaction (AmendMessage), where the target's state is known.

    _AMEND_WINDOWS = {F.MessageKind.RECALL: "recall_window", F.MessageKind.EDIT: "edit_window", F.MessageKind.DELETE: "delete_window"}

    @staticmethod
    def amend_digest(conv: str, target: int, action: int, payload: bytes) -> bytes:
        """What a retry of an AmendReq must repeat: conv, target, action and
        payload (never equal to a SendReq's digest for the same local id:
        the conversation part differs by the action byte prefix)."""
        return message_digest(conv, b"\xffamend" + bytes((action & 0xFF,)) + target.to_bytes(8, "big") + payload)

    def _on_amend(self, c: _Conn, f: F.AmendReq, now: int, out: list[Command]) -> None:
        def refuse(code: ErrorCode) -> None:
            self._stats["rejected"] += 1
            if code in _TRANSIENT_AT_READ:
                c.mark = _new_mark(c, f.local_id, code, now)
            if code is ErrorCode.RATE_LIMITED or self._control(c, now, "refused AmendReq", out):
                self._refuse_send(c, f.local_id, code, out)

        if c.mark is not None and self._held_back(c, f.local_id, now, out):
            return None
        lim = self.config.limits
        if lim.send_rate:
            # The send token bucket: an AmendReq costs what a SendReq does.
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
        if f.action not in self._AMEND_WINDOWS:
            return refuse(ErrorCode.BAD_ACTION)
        if len(f.payload) > lim.max_payload:
            return refuse(ErrorCode.PAYLOAD_TOO_LARGE)
        if f.action != F.MessageKind.EDIT and f.payload:
            return refuse(ErrorCode.BAD_REQUEST)
        if f.target < 1:
            return refuse(ErrorCode.NO_SUCH_MESSAGE)
        code = self._check_conversation(c.user, f.conv)
        if code is not ErrorCode.OK:
            return refuse(code)
        key = (c.user, c.device, f.local_id)
        digest = self.amend_digest(f.conv, f.target, f.action, f.payload)
        pending = self._pending_sends.get(key)
        if pending is not None:
            if pending.digest != digest:
                return refuse(ErrorCode.DUPLICATE_CONFLICT)
            pending.waiters.append(self._waiter(c))
            c.inflight += 1
            return
        c.inflight += 1
        if self.config.content_filter is not None and f.action == F.MessageKind.EDIT:
            rid = self._request_id()
            c.waiting = rid
            self._hooks[rid] = _ContentHook(c.id, f)
            out.append(CheckContent(rid, c.user, f.conv, f.payload, c.device, f.local_id))
            return
        self._propose_amend(c, f, now, out)

    def _propose_amend(self, c: _Conn, f: F.AmendReq, now: int, out: list[Command]) -> None:
        key = (c.user, c.device, f.local_id)
        digest = self.amend_digest(f.conv, f.target, f.action, f.payload)
        pending = self._pending_sends.get(key)
        if pending is not None:
            self._join_checked(c, pending, f.local_id, digest, out)
            return
        window = getattr(self.config, self._AMEND_WINDOWS[F.MessageKind(f.action)])
        self._propose_amend_op(key, f.conv, f.target, f.action, f.payload, f.client_time, window, digest, c.id, now)

    def _propose_amend_op(
        self, key: tuple[str, str, int], conv: str, target: int, action: int, payload: bytes, client_time: int,
        window: int, digest: bytes, waiter: Union[int, tuple[Any, ...]], now: int,
    ) -> None:
        server_time = self._clock.tick(now)
        msg_id = server_time.to_bytes(8, "big") + self._node_id
        op = AmendMessage(
            msg_id, conv, key[0], key[1], key[2], client_time, server_time, action, target, payload, digest, window,
            self.config.record_events,
        )
        ctx = _PendingSend(key, digest, [waiter])
        self._pending_sends[key] = ctx
        self._propose(op, ctx)

    def _finish_amend(self, op: AmendMessage, ctx: _PendingSend, res: Result, to_pump: set[str], out: list[Command]) -> None:
        self._pending_sends.pop(ctx.key, None)
        if isinstance(res, Appended):
            self._stats["messages_stored"] += 1
            ack = F.SendAck(op.local_id, ErrorCode.OK, res.msg_id, res.seq, res.server_time)
            heads, fresh, online = self._heads, self._fresh, self._online
            for user, pos in res.positions:
                if user in heads:
                    if pos > heads[user]:
                        heads[user] = pos
                    if user in online:
                        to_pump.add(user)
                        if op.kind == F.MessageKind.EDIT:
                            # Not from the op: a recipient who deleted the
                            # target for themselves must not get the new
                            # payload, and only the store knows who did --
                            # the pump reads the entry from the inbox.
                            continue
                        m = F.Message(
                            pos, res.msg_id, op.conv, res.seq, op.sender, op.device, op.client_time,
                            res.server_time, op.payload, int(op.kind), op.local_id, res.after_seq, op.target,
                        )
                        fresh.setdefault(user, []).append((pos, m))
        elif isinstance(res, Duplicate):
            self._stats["duplicates"] += 1
            self._ack_waiters(ctx, F.SendAck(op.local_id, ErrorCode.OK, res.msg_id, res.seq, res.server_time), out, duplicate=True)
            return
        elif isinstance(res, Rejected):
            self._stats["rejected"] += 1
            ack = F.SendAck(op.local_id, res.code, b"", 0, 0)
        else:  # pragma: no cover - a store contract violation
            raise TypeError(f"unexpected result {res!r} for AmendMessage")
        self._ack_waiters(ctx, ack, out)

    def amend(
        self,
        conv: str,
        target: int,
        action: int,
        now: int,
        *,
        payload: bytes = b"",
        sender: str = SYSTEM,
        device: str = SYSTEM,
        key: Union[str, bytes, None] = None,
        ref: int = 0,
    ) -> list[Command]:
        """Control plane: recall (``action`` MessageKind.RECALL), edit (EDIT,
        with the new ``payload``) or delete for ``sender`` (DELETE) the
        message at seq ``target`` of ``conv``, as the host.  ``sender``
        SYSTEM (the default) may recall or edit any message; a user
        ``sender`` (with one of its ``device`` ids) acts as that user (only
        their own messages for RECALL/EDIT; DELETE needs a user).  No time
        window applies to the host.  ``key``: the idempotency key, as for
        :meth:`post`.  :class:`PostDone` with ``ref`` says how it went
        (codes as for AmendReq: NO_SUCH_MESSAGE, NOT_SENDER, RECALLED,
        BAD_ACTION, NOT_MEMBER, ...)."""
        out: list[Command] = []

        def refuse(code: ErrorCode) -> list[Command]:
            self._stats["rejected"] += 1
            out.append(PostDone(ref, code, b"", 0, 0))
            return out

        if action not in self._AMEND_WINDOWS:
            return refuse(ErrorCode.BAD_ACTION)
        if not isinstance(payload, bytes) or (action != F.MessageKind.EDIT and payload):
            return refuse(ErrorCode.BAD_REQUEST)
        if len(payload) > self.config.limits.max_payload:
            return refuse(ErrorCode.PAYLOAD_TOO_LARGE)
        if type(target) is not int or not 0 < target < _U64_MAX:
            return refuse(ErrorCode.NO_SUCH_MESSAGE)
        if sender == SYSTEM:
            if device != SYSTEM or action == F.MessageKind.DELETE:
                return refuse(ErrorCode.BAD_REQUEST)
            code = ErrorCode.OK if valid_conversation(conv) else ErrorCode.BAD_REQUEST
        else:
            if not (valid_id(sender) and valid_id(device)):
                return refuse(ErrorCode.BAD_REQUEST)
            code = self._check_conversation(sender, conv)
        if code is not ErrorCode.OK:
            return refuse(code)
        local_id = idempotency_local_id(key)
        if local_id is None:
            return refuse(ErrorCode.BAD_REQUEST)
        digest = self.amend_digest(conv, target, action, payload)
        dkey = (sender, device, local_id)
        pending = self._pending_sends.get(dkey)
        if pending is not None:
            if pending.digest != digest:
                return refuse(ErrorCode.DUPLICATE_CONFLICT)
            pending.waiters.append(("post", ref, True))
            return out
        self._stats["posts"] += 1
        self._propose_amend_op(dkey, conv, target, action, payload, self._clock.now(now), 0, digest, ("post", ref), now)
        self._maybe_commit(out, now)
        return out

    # ------------------------------------------------------------ delivery

    def _pump(self, dev: _Device, out: list[Command], now: int) -> None:
        """Push what the device has not been sent yet, within its window:
        from the batch just committed when it continues exactly where the
        device is, else through a ReadInbox request (one at a time)."""
        lim = self.config.limits
        fresh = self._fresh.get(dev.user)
        while not dev.reading and dev.sent_upto < self._heads.get(dev.user, 0):
            room = lim.push_window - (dev.sent_upto - dev.acked)
            if room <= 0 or dev.unacked_bytes >= lim.push_window_bytes:
                return  # wait for a PushAck
            if self._held_total >= self.config.max_outbound_total:
                self._wait(dev)  # for held bytes to be written (_unstarve)
                return
            limit = min(room, lim.push_batch)
            entries: Optional[Sequence[tuple[int, Union[StoredMessage, F.Message, NewMessage]]]] = None
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
                dev.reading = True
                rid = self._request_id()
                self._reads[rid] = _InboxRead(dev, dev.sent_upto)
                out.append(StoreRequest(rid, (ReadInbox(dev.user, dev.sent_upto, limit),), False))
                return
            self._push_entries(dev, entries, out, now)

    def _wait(self, dev: _Device) -> None:
        """``dev`` waits for held bytes to go below max_outbound_total: ahead
        (_readers) if it has acked every push it was sent -- proof that it
        reads, which a client that stopped reading cannot give (bytes the
        kernel's buffers took for it count as written, so writes prove
        nothing)."""
        (self._readers if dev.acked >= dev.sent_upto else self._starved)[dev] = None

    def _unstarve(self, out: list[Command], now: int) -> None:
        """Held bytes are below max_outbound_total: pump the devices that
        waited for that while it stays below -- readers first, each line in
        the order it came.  One whose connection still holds bytes has
        enough to read: it waits apart (_parked) until that connection has
        written them (data_sent puts it back in line)."""
        limit = self.config.max_outbound_total
        for line in (self._readers, self._starved):
            # Each turn takes one device out of the line (pumped, parked or
            # gone): the work is the devices served, never the whole line.
            while line and self._held_total < limit:
                dev = next(iter(line))
                del line[dev]
                c = self._conns.get(dev.conn)
                devices = self._online.get(dev.user)
                if c is None or devices is None or devices.get(dev.device) is not dev:
                    continue  # gone: its next login pumps it
                if c.held:
                    self._parked[c.id] = dev  # (data_sent puts it back in line)
                else:
                    self._pump(dev, out, now)

    def _push_entries(
        self, dev: _Device, entries: Sequence[tuple[int, Union[StoredMessage, F.Message, NewMessage]]], out: list[Command], now: int
    ) -> None:
        """Push ``entries`` (the next positions after ``dev.sent_upto``, within
        its window) to the device."""
        lim = self.config.limits
        msgs: tuple[F.Message, ...] = ()
        size = 0
        if not entries:
            # Everything left was reclaimed (max age): skip to the head so
            # the device can ack past it.
            upto = self._heads.get(dev.user, 0)
        else:
            # Stay within the byte window too (at least one entry, so a
            # message larger than the window still gets through).
            # The sending device already has its own message (SendAck);
            # its position is still covered by `upto`.  (An entry of the
            # batch just committed may be its NewMessage op standing in for
            # a Message nobody is pushed: _finish_send.)
            budget = lim.push_window_bytes - dev.unacked_bytes
            # Near max_outbound_total, a quarter of the room left at most (at
            # least one entry, below): one device -- one that does not read,
            # say, whose inbox read came back first -- cannot take it all
            # while others wait.  (Far from it, the push window is smaller.)
            share = (self.config.max_outbound_total - self._held_total) >> 2
            if share < budget:
                budget = share
            ramp = dev.ramp
            if ramp < budget:
                budget = ramp
            if ramp < lim.push_window_bytes:
                dev.ramp = ramp << 1  # (PUSH_RAMP_START)
            device, user = dev.device, dev.user
            # The loop below in one fast-path call when no entry needs
            # converting (pimcore/_pure/send.py: push_slice).
            full = dev.full_upto
            got = _impl.push_slice(entries, budget, device, user, F.Message) if full < entries[0][0] else None
            if got is not None:
                msgs, upto, size = got
            else:
                pushed: list[F.Message] = []
                i = 0
                for pos, m in entries:
                    n = len(m.payload) + 32
                    budget -= n
                    if budget < 0 and i > 0:
                        break
                    i += 1
                    upto = pos
                    if m.device == device and m.sender == user and pos > full:
                        continue
                    pushed.append(m if isinstance(m, F.Message) else _to_frame_message(pos, m))  # type: ignore[arg-type]
                    size += n
                msgs = tuple(pushed)
            if not msgs and dev.acked == dev.sent_upto:
                # Nothing but this device's own sends, and nothing of
                # ours outstanding: it has them all (their SendAcks), so
                # its position moves as if it had acked (no PushAck is
                # awaited, none holds the window).  The device is still
                # told the position, in a Push without messages after the
                # SendAcks: a client's cursor must cover its own sends.  A
                # store restored from a hot copy lost the sends acked after
                # the copy; a device that only sent since would otherwise
                # come back with a cursor of the copy, be trusted, and keep
                # showing sends whose seqs new messages take (a new user's
                # trial).  With its own positions in its cursor, the
                # restored store finds them refilled after the epoch's end
                # and resynchronizes it (SessionLoaded.foreign).  Telegram
                # does the same: a sent message's answer carries the pts.
                dev.sent_upto = dev.acked = upto
                self._record_ack(dev, upto, now)
                self._stats["pushes"] += 1
                if dev.states is not None:
                    self._flush_states(dev, out)  # (the login's: before any Push that is not a catch-up's)
                self._send(dev.conn, _push(upto, ()), out)
                if dev.typing is not None and upto >= self._heads.get(dev.user, 0):
                    self._release_typing(dev, out, now)
                return
        if dev.sent_upto <= dev.acked:
            dev.acked_look = self._look  # (owes acks from this look on: see _drop_stalled)
        dev.sent_upto = upto
        if dev.unacked is None:
            dev.unacked = deque()
        dev.unacked.append((upto, size))
        dev.unacked_bytes += size
        self._stats["pushes"] += 1
        states = dev.states
        if states is not None and upto > states.head:
            # Entries the login's read states do not count: those go first
            # (a client adds what a Push brings to the counts it holds).
            self._flush_states(dev, out)
        self._send(dev.conn, _push(upto, msgs), out)
        if dev.states is not None:
            self._flush_states(dev, out)  # after the first Push of a catch-up (_activate)
        if dev.typing is not None and upto >= self._heads.get(dev.user, 0):
            self._release_typing(dev, out, now)

    def _on_push_ack(self, c: _Conn, f: F.PushAck, now: int, out: list[Command]) -> None:
        dev = self._online[c.user][c.device]
        if f.position > dev.sent_upto:
            self._close(c, CloseCode.PROTOCOL_ERROR, f"PushAck({f.position}) beyond what was pushed ({dev.sent_upto})", out)
            return
        if f.position <= dev.acked:
            return  # stale or repeated ack: positions never move back
        dev.acked = f.position
        dev.acked_look = self._look
        unacked = dev.unacked
        while unacked and unacked[0][0] <= f.position:
            dev.unacked_bytes -= unacked.popleft()[1]
        if unacked is not None and not unacked:
            dev.unacked = None  # all acked: an idle device holds no deque
        self._record_ack(dev, f.position, now)
        self._pump(dev, out, now)

    def _record_ack(self, dev: _Device, pos: int, now: int) -> None:
        """The device's position moved to ``pos``: make it durable (lazily)."""
        key = (dev.user, dev.device)
        self._acks_unsaved[key] = pos
        op = _ack_position(dev.user, dev.device, pos, now)
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
            if self._control(c, now, "refused Read", out):
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

    def _finish_read(self, res: ReadMarked, out: list[Command]) -> None:
        if not res.changed:
            return
        # Every device of the reader, the reading one included: for it, the
        # ReadStates confirms the marker is durable and carries the store's
        # unread count (a client cannot count what it never downloaded).
        self._send_marker(res.user, res.conv, res.read_seq, res.last_seq, res.unread, False, out)
        pair = direct_members(res.conv)
        if pair is not None:
            peer = pair[1] if pair[0] == res.user else pair[0]
            self._send_receipt(peer, res.conv, res.user, res.read_seq, False, out)

    def _refresh_floor(self, conv: str, purged: int, out: list[Command]) -> None:
        """A commit moved the history floor of ``conv`` (retention; a purge:
        ``purged`` its last seq, else -1): the unread count each device of
        its users holds may count messages that are gone, and no frame
        says so (a Push only adds).  Each user online here gets the store's
        read state (ReadStates, read after the commit) on every device;
        users offline get the exact one at login.

        A 1:1 chat's two users are known from the id; a group's members
        are read first (ReadReaders asked by nobody: _members_read_done).
        A purged group is gone with its markers: nothing to refresh.
        Bounded per commit: an Expire trims and names at most EXPIRED_IDS
        conversations (store/base.py; the pass goes on in the next one),
        so at most one members read each and
        a _FloorRead per member online here, each of at most _FLOOR_TRIES
        reads."""
        pair = direct_members(conv)
        if pair is None:
            if purged < 0:
                rid = self._request_id()
                self._reads[rid] = _MembersRead(conv)
                out.append(StoreRequest(rid, (ReadReaders(conv, ""),), False))
            return
        self._refresh_members(conv, dict.fromkeys(pair), purged, out)

    def _purged_group(self, user: str, conv: str, last_seq: int, out: list[Command]) -> None:
        """The group ``conv`` was purged (its last seq ``last_seq``): each of
        ``user``'s devices online here is told nothing of it is unread -- a
        ReadState read up to that last seq, so no marker it holds moves
        back.  No ConvUpdate: the group left the user's list, and the
        answer to a request about it is UNKNOWN_CONVERSATION.  (Its count
        stayed in the client before: a new user's trial.)  Then the
        devices that asked (CAP_CONV_PURGED) get ConvPurged(gone): the
        ReadState cannot say "purged", and a device kept the purged
        messages in its view until its next login (another trial)."""
        self._to_devices(user, (F.ReadStates((F.ReadState(conv, last_seq, last_seq, 0),)),), out)
        self._to_devices(user, (F.ConvPurged(conv, last_seq, True),), out, F.CAP_CONV_PURGED)

    def _to_devices(self, user: str, frames: tuple[Any, ...], out: list[Command], cap: int = 0) -> None:
        """``frames`` to each device of ``user`` online here (only those
        granted ``cap``, if given), after the read states of its login if
        they are still to go (older: first)."""
        for dev in self._online.get(user, {}).values():
            if cap and not dev.caps & cap:
                continue
            if dev.states is not None:
                self._flush_states(dev, out)
            for f in frames:
                self._send(dev.conn, f, out)

    def _refresh_members(self, conv: str, users: Iterable[str], purged: int, out: list[Command]) -> None:
        for user in users:
            if user in self._online:
                if purged >= 0:
                    # (A 1:1 chat: it stays, its entries up to ``purged`` are
                    # gone.  Told at once: the read state below comes after
                    # a read.)
                    self._to_devices(user, (F.ConvPurged(conv, purged, False),), out, F.CAP_CONV_PURGED)
                ctx = _FloorRead(user, conv, purged)
                entry = self._floor_watch.setdefault(conv, [0, 0])
                entry[1] += 1
                self._floor_request(ctx, entry, out)

    def _members_read_done(self, ctx: _MembersRead, res: Optional[Result], out: list[Command]) -> None:
        if isinstance(res, ReadersPage) and res.code is ErrorCode.OK:
            self._refresh_members(ctx.conv, [user for user, _ in res.readers], -1, out)
        # Failed, or the group is gone: its devices' counts are exact again
        # at their next ReadState (a Read of theirs, a login).

    def _floor_request(self, ctx: _FloorRead, entry: list[int], out: list[Command]) -> None:
        ctx.gen = entry[0]
        ctx.tries += 1
        rid = self._request_id()
        self._reads[rid] = ctx
        # After a purge the user's list entry is gone until a new message
        # (ReadConversations answers NOT_MEMBER): the marker is read alone
        # (ReadReaders of a 1:1 chat: both users' markers).
        op = ReadConversations(ctx.user, conv=ctx.conv) if ctx.listed else ReadReaders(ctx.conv, ctx.user)
        out.append(StoreRequest(rid, (op,), False))

    def _floor_read_done(self, ctx: _FloorRead, res: Optional[Result], out: list[Command]) -> None:
        entry = self._floor_watch[ctx.conv]
        stale = entry[0] != ctx.gen
        if res is not None and ctx.tries < _FLOOR_TRIES:
            if stale:
                # A commit touched the conversation while this read was out
                # (its pushes may be on the devices already): read again,
                # the list entry (after a purge a message may have brought
                # it back; if not, it is NOT_MEMBER, below).
                ctx.listed = True
                self._floor_request(ctx, entry, out)
                return
            if ctx.listed and ctx.purged >= 0 and isinstance(res, ConversationsPage) and res.code is ErrorCode.NOT_MEMBER:
                ctx.listed = False  # still purged, nothing since: the marker alone
                self._floor_request(ctx, entry, out)
                return
        entry[1] -= 1
        if not entry[1]:
            del self._floor_watch[ctx.conv]
        if stale:
            return  # still stale after _FLOOR_TRIES reads: better nothing than an older count
        conv_entry: Optional[ConversationEntry] = None
        if isinstance(res, ConversationsPage) and res.code is ErrorCode.OK and res.entries:
            conv_entry = res.entries[0]
            read_seq, last_seq, unread = conv_entry.read_seq, conv_entry.last_seq, conv_entry.unread
        elif isinstance(res, ReadersPage) and res.code is ErrorCode.OK:
            read_seq = next((seq for user, seq in res.readers if user == ctx.user), 0)
            last_seq, unread = ctx.purged, 0  # nothing stored is unread
        else:
            return  # failed or refused: the next ReadState (a Read, a login) is exact
        if self._marks.get(ctx.user, {}).get(ctx.conv, -1) > read_seq:
            return  # a newer marker went out since, with its own exact count: never move back
        if not self._mark_seen(ctx.user, ctx.conv, read_seq, False):
            return  # no device of the user online here any more
        state = F.ReadStates((F.ReadState(ctx.conv, read_seq, last_seq, unread),))
        # (Then the conversation list's entry, which agrees.)
        update = (F.ConvUpdate((_to_conv_entry(conv_entry),)),) if conv_entry is not None else ()
        self._to_devices(ctx.user, (state, *update), out)

    def _mark_seen(self, user: str, key: str, seq: int, hint: bool) -> bool:
        """Record that ``user``'s devices here are sent ``seq`` for ``key``
        (the highest kept); whether to send it: not if none is online here,
        nor for a hint at or below what was sent already (stale).  A change
        committed here is always sent (the store said it moved)."""
        if user not in self._online:
            return False
        marks = self._marks.setdefault(user, {})
        old = marks.get(key, -1)
        if hint and old >= seq:
            return False
        if seq > old:
            marks[key] = seq
        return True

    def _send_marker(
        self, user: str, conv: str, read_seq: int, last_seq: int, unread: int, hint: bool, out: list[Command]
    ) -> None:
        """``user``'s read marker of ``conv`` moved to ``read_seq``: a
        ReadStates to each of their devices online here, the reading one
        included (for it the ReadStates confirms the marker is durable and
        carries the store's unread count: a client cannot count what it
        never downloaded), then the ConvUpdate (read from the store)."""
        if not self._mark_seen(user, conv, read_seq, hint):
            return
        self._to_devices(user, (F.ReadStates((F.ReadState(conv, read_seq, last_seq, unread),)),), out)
        self._conv_update(user, conv, out)

    def _send_receipt(self, peer: str, conv: str, reader: str, read_seq: int, hint: bool, out: list[Command]) -> None:
        """The ReadReceipt of ``reader`` (``conv`` is their 1:1 chat) to each
        device of ``peer`` online here."""
        if not self._mark_seen(peer, "r:" + conv, read_seq, hint):
            return
        self._to_devices(peer, (F.ReadReceipt(conv, reader, read_seq),), out)

    # ------------------------------------------------------------ history & misc

    def _on_history(self, c: _Conn, f: F.HistoryReq, now: int, out: list[Command]) -> None:
        code = self._check_conversation(c.user, f.conv)
        if code is not ErrorCode.OK:
            if self._control(c, now, "refused HistoryReq", out):
                self._send(c.id, F.HistoryResp(f.req_id, f.conv, code, (), False), out)
            return
        lim = self.config.limits
        limit = max(1, min(f.limit, lim.history_page))
        # The most the reply can hold (pages are cut to fit one frame), kept
        # free for it while the read is out (_blocked).
        reserve = min(limit * (lim.max_payload + 512), self._page_bytes() + _PAGE_SLACK) + _FRAME_OVERHEAD
        c.history_reads += 1
        c.reserved += reserve
        rid = self._request_id()
        self._reads[rid] = _HistoryRead(c.id, f, limit, reserve)
        # One more than the page: whether there is more is then known.
        out.append(StoreRequest(rid, (ReadHistory(f.conv, c.user, f.from_seq, limit + 1, f.backward),), False))

    def _page_bytes(self) -> int:
        """Bytes of messages one HistoryResp may carry (see _read_done)."""
        return max(1024, min(self.config.limits.max_frame, self.config.max_outbound // 4) - _PAGE_SLACK)

    def _on_readers(self, c: _Conn, f: F.ReadersReq, now: int, out: list[Command]) -> None:
        """Who has read up to where in ``f.conv`` (current members; the
        store answers, ReadReaders).  Counts against the same bound of reads
        in flight as history requests."""
        code = self._check_conversation(c.user, f.conv)
        if code is not ErrorCode.OK:
            self._send(c.id, F.ReadersResp(f.req_id, f.conv, code, ()), out)
            return
        c.history_reads += 1
        rid = self._request_id()
        self._reads[rid] = _ReadersRead(c.id, f)
        out.append(StoreRequest(rid, (ReadReaders(f.conv, c.user),), False))

    # ------------------------------------------------------------ conversation list

    def _on_conv_list(self, c: _Conn, f: F.ConvListReq, now: int, out: list[Command]) -> None:
        """A page of the user's conversation list (the store answers,
        ReadConversations).  Counts against the bound of reads in flight
        like a history request."""
        limit = max(1, min(f.limit, self.config.limits.conv_page))
        c.history_reads += 1
        rid = self._request_id()
        self._reads[rid] = _ConvListRead(c.id, f, limit)
        # One more than the page: whether there is more is then known.
        op = ReadConversations(c.user, f.cursor, limit + 1, f.include_hidden)
        out.append(StoreRequest(rid, (op,), False))

    def _on_conv_set(self, c: _Conn, f: F.ConvSetReq, now: int, out: list[Command]) -> None:
        """Change the user's settings of a conversation: a SetConversation
        op in the next batch; answered (ConvSetResp) once durable, and every
        device of the user gets the new entry (ConvUpdate) if it changed."""
        code = self._check_conversation(c.user, f.conv)
        if code is ErrorCode.OK and not all(v in (0, 1, 2) for v in (f.pinned, f.muted, f.hidden)):
            code = ErrorCode.BAD_REQUEST
        if code is not ErrorCode.OK:
            if self._control(c, now, "refused ConvSetReq", out):
                self._send(c.id, F.ConvSetResp(f.req_id, f.conv, code), out)
            return
        self._propose(SetConversation(c.user, f.conv, f.pinned, f.muted, f.hidden), _ConvSetCtx(c.id, f.req_id, f.conv))

    def set_conversation(
        self, user: str, conv: str, now: int, *, pinned: int = 0, muted: int = 0, hidden: int = 0, ref: int = 0
    ) -> list[Command]:
        """Control plane: change ``user``'s settings of ``conv`` as a
        ConvSetReq of theirs would (values frames.SETTING_*); the user's
        devices get the ConvUpdate.  :class:`AdminDone` with ``ref``
        carries the store's answer (ConversationSet, or Rejected)."""
        self._propose(SetConversation(user, conv, pinned, muted, hidden), _AdminCtx(ref))
        out: list[Command] = []
        self._maybe_commit(out, now)
        return out

    def _finish_conv_set(self, ctx: Union[_ConvSetCtx, _AdminCtx], res: Result, out: list[Command]) -> None:
        if isinstance(ctx, _AdminCtx):
            out.append(AdminDone(ctx.ref, res))
        if isinstance(res, ConversationSet):
            if isinstance(ctx, _ConvSetCtx):
                self._send(ctx.conn, F.ConvSetResp(ctx.req_id, ctx.conv, ErrorCode.OK), out)
            if res.changed:
                update = F.ConvUpdate((_to_conv_entry(res.entry),))
                for dev in self._online.get(res.user, {}).values():
                    self._send(dev.conn, update, out)
                e = res.entry
                self._event("conversation", user=res.user, conv=res.conv, pinned=e.pinned, muted=e.muted, hidden=e.hidden)
        elif isinstance(ctx, _ConvSetCtx):
            code = res.code if isinstance(res, Rejected) else ErrorCode.INTERNAL
            self._send(ctx.conn, F.ConvSetResp(ctx.req_id, ctx.conv, code), out)

    def _conv_update(self, user: str, conv: str, out: list[Command]) -> None:
        """Read the (user, conv) entry and send it to the user's devices
        (its read marker moved: unread and mention counts changed)."""
        if user not in self._online:
            return
        rid = self._request_id()
        self._reads[rid] = _ConvUpdateRead(user, conv)
        out.append(StoreRequest(rid, (ReadConversations(user, conv=conv),), False))

    def _conv_read_done(
        self, ctx: Union[_ConvListRead, _ConvUpdateRead], res: Optional[Result], now: int, out: list[Command]
    ) -> None:
        if type(ctx) is _ConvUpdateRead:
            if isinstance(res, ConversationsPage) and res.code is ErrorCode.OK and res.entries:
                update = F.ConvUpdate(tuple(_to_conv_entry(e) for e in res.entries))
                for dev in self._online.get(ctx.user, {}).values():
                    self._send(dev.conn, update, out)
            return  # a failed read: the next change or the next list brings it
        assert type(ctx) is _ConvListRead
        c = self._conns.get(ctx.conn)
        if c is None:
            return
        c.history_reads -= 1
        f = ctx.frame
        if not isinstance(res, ConversationsPage):
            resp = F.ConvListResp(f.req_id, ErrorCode.STORE_UNAVAILABLE, (), b"", False)
        elif res.code is not ErrorCode.OK:
            resp = F.ConvListResp(f.req_id, res.code, (), b"", False)
        else:
            page = res.entries
            more = len(page) > ctx.limit
            page = page[: ctx.limit]
            # One frame must hold the page (as a HistoryResp): cut it there,
            # at least one entry, `more` set.
            budget = self._page_bytes()
            for i, e in enumerate(page):
                m = e.last
                budget -= len(e.conv) + _MESSAGE_OVERHEAD + (
                    0 if m is None else len(m.payload) + len(m.sender) + len(m.device) + _mentions_bytes(m.mentions)
                    + _MESSAGE_OVERHEAD
                )
                if budget < 0 and i > 0:
                    page, more = page[:i], True
                    break
            cursor = conversation_cursor(page[-1]) if page else f.cursor
            resp = F.ConvListResp(f.req_id, ErrorCode.OK, tuple(_to_conv_entry(e) for e in page), cursor, more)
        self._send(c.id, resp, out)
        if c.history_reads == _MAX_HISTORY_READS - 1:
            self._resume(c, now, out)  # it was held at the limit: read on

    def _on_calibrate(self, c: _Conn, f: F.CalibrateReq, now: int, out: list[Command]) -> None:
        if self._control(c, now, "CalibrateReq", out):
            self._send(c.id, F.CalibrateResp(f.client_time, self._clock.now(now)), out)

    def _on_ping(self, c: _Conn, f: F.Ping, now: int, out: list[Command]) -> None:
        if self._control(c, now, "Ping", out):
            self._send(c.id, F.Pong(f.nonce), out)

    def _on_pong(self, c: _Conn, f: F.Pong, now: int, out: list[Command]) -> None:
        return None  # liveness: any frame counts (last_seen)

    def _on_close(self, c: _Conn, f: F.Close, now: int, out: list[Command]) -> None:
        self._close(c, CloseCode.NORMAL, "closed by client", out)

    def _on_login_again(self, c: _Conn, f: F.Login, now: int, out: list[Command]) -> None:
        self._close(c, CloseCode.PROTOCOL_ERROR, "Login on a connection that is already logged in", out)

    # ------------------------------------------------------------ typing and presence
    # Ephemeral signals (PROTOCOL.md, "Typing and presence"): nothing here is
    # stored but the user's last-seen privacy setting.  All state is in
    # memory, per node, bounded by the connections (subscriptions of at most
    # presence_max_users each; one token bucket each) plus two caches with
    # caps (_TYPING_CACHE_MAX groups, _PRES_SEEN_MAX users).  Presence
    # changes are collected in _pres_dirty and told once per entry point
    # (_maybe_commit), comparing with what watchers were last told: a
    # device replaced by its own new login never shows as a flap.

    def _on_typing(self, c: _Conn, f: F.Typing, now: int, out: list[Command]) -> None:
        """Relay "``c.user`` is typing in ``f.conv``" to the other members'
        online devices (never the sender's own devices).  Excess frames
        (typing_burst / typing_rate) are dropped silently: a typing
        indicator is best effort and a well-behaved client sends one every
        few seconds."""
        cfg = self.config
        tokens, at = self._typing_tokens.get(c.id, (float(cfg.typing_burst), now))
        tokens = min(float(cfg.typing_burst), tokens + max(now - at, 0) * cfg.typing_rate / SECOND)
        if tokens < 1.0:
            self._typing_tokens[c.id] = (tokens, now)
            return
        self._typing_tokens[c.id] = (tokens - 1.0, now)
        code = self._check_conversation(c.user, f.conv)
        if code is not ErrorCode.OK:
            self._error(c.id, code, 0, f"Typing {f.conv!r}: {code.name.lower()}", out)
            return
        pair = direct_members(f.conv)
        if pair is not None:
            self._relay_typing(c, f.conv, f.active, frozenset(pair), now, out)
            return
        cached = self._typing_members.get(f.conv)
        if cached is not None and cached[0] > now:
            self._typing_to_group(c, f.conv, f.active, cached[1], now, out)
            return
        waiting = self._typing_reads.get(f.conv)
        if waiting is not None:
            waiting.append((c.id, f.active))
            return
        self._typing_reads[f.conv] = [(c.id, f.active)]
        rid = self._request_id()
        self._reads[rid] = _TypingRead(c.id, f.conv, c.user, self._typing_gen)
        out.append(StoreRequest(rid, (ReadReaders(f.conv, c.user),), False))

    def _typing_read_done(self, ctx: _TypingRead, res: Optional[Result], now: int, out: list[Command]) -> None:
        waiting = self._typing_reads.pop(ctx.conv, [])
        if not isinstance(res, ReadersPage):
            return  # the store failed: typing is best effort, the clients refresh it
        if res.code is not ErrorCode.OK:
            # Only the asker's access is known: tell it; the others' frames
            # are dropped (they are refreshed within the TTL anyway).
            self._error(ctx.conn, res.code, 0, f"Typing {ctx.conv!r}: {res.code.name.lower()}", out)
            return
        members = frozenset(u for u, _ in res.readers)
        if ctx.gen == self._typing_gen:
            self._cache_members(ctx.conv, members, now)
        for conn, active in waiting:
            c = self._conns.get(conn)
            if c is not None and c.state is _ConnState.ACTIVE:
                self._typing_to_group(c, ctx.conv, active, members, now, out)

    def _cache_members(self, conv: str, members: frozenset[str], now: int) -> None:
        cache = self._typing_members
        if len(cache) >= _TYPING_CACHE_MAX and conv not in cache:
            for k in [k for k, (until, _) in cache.items() if until <= now] or list(cache)[: len(cache) // 2]:
                del cache[k]
        ttl = _TYPING_CACHE_TTL_SHARED if self.relay_elsewhere else _TYPING_CACHE_TTL
        cache[conv] = (now + ttl, self._bounded(members))

    def _bounded(self, members: frozenset[str]) -> frozenset[str]:
        # A group above typing_max_members gets no typing: remember only
        # that (the empty set), not its members -- the cache stays small
        # whatever the groups' sizes.
        return members if len(members) <= self.config.typing_max_members else _TOO_LARGE

    def _typing_to_group(self, c: _Conn, conv: str, active: bool, members: frozenset[str], now: int, out: list[Command]) -> None:
        if members is _TOO_LARGE or len(members) > self.config.typing_max_members:
            self._error(
                c.id, ErrorCode.TYPING_NOT_RELAYED, 0,
                f"Typing {conv!r}: not relayed in groups of more than {self.config.typing_max_members} members", out,
            )
        elif c.user not in members:
            self._error(c.id, ErrorCode.NOT_MEMBER, 0, f"Typing {conv!r}: not_member", out)
        else:
            self._relay_typing(c, conv, active, members, now, out)

    def _relay_typing(self, c: _Conn, conv: str, active: bool, members: frozenset[str], now: int, out: list[Command]) -> None:
        cfg = self.config
        frame = F.Typing(conv, active, c.user, cfg.typing_ttl // 1000 if active else 0)
        for user in members:
            if user != c.user:
                self._typing_to_user(user, frame, out)
        if self.relay_elsewhere:
            # The members' devices on other nodes: membership was checked
            # here, the receiving nodes only deliver (typing_elsewhere).
            recipients = tuple(sorted(members - {c.user}))
            if recipients:
                out.append(TypingElsewhere(c.user, conv, active, recipients, now))

    def _typing_to_user(self, user: str, frame: F.Typing, out: list[Command]) -> None:
        cfg, conns = self.config, self._conns
        for dev in self._online.get(user, {}).values():
            dc = conns.get(dev.conn)
            # Best effort: never what makes a device fall behind.
            if dc is not None and dc.held <= cfg.outbound_pause:
                self._send(dev.conn, frame, out)

    def typing_elsewhere(self, user: str, conv: str, active: bool, recipients: Sequence[str], at: int, now: int) -> list[Command]:
        """Cluster hint: ``user`` is typing in ``conv`` (``active``; False:
        stopped), relayed at ``at`` (µs, the other node's clock) by the node
        that checked it (membership, rate, group size: the
        :class:`TypingElsewhere` it emitted).  ``recipients``' devices
        online here get the Typing frame, with what is left of the TTL: a
        hint that waited gets a shorter ``ttl_ms``, an expired one (an
        indicator that would have ended by now) is dropped, and a clock
        ahead of ours cannot stretch it past ``typing_ttl``.  Never to the
        sender's own devices; a 1:1 chat only between its two users."""
        out: list[Command] = []
        ttl = self.config.typing_ttl
        left = min(at + ttl - now, ttl)
        if left < 1000:  # under a millisecond left: it has ended
            return out
        frame = F.Typing(conv, active, user, left // 1000 if active else 0)
        pair = direct_members(conv)
        cfg, conns = self.config, self._conns
        for r in recipients:
            if r != user and (pair is None or (user in pair and r in pair)):
                head = self._heads.get(r, 0)
                for dev in self._online.get(r, {}).values():
                    if dev.sent_upto < head:
                        # Entries announced before this hint (the message the
                        # typer sent just before typing again, say) are still
                        # on their way to the device (an inbox read): the
                        # message would end the indicator that came after it.
                        # Held (the latest per typer) until they are pushed.
                        if dev.typing is None:
                            dev.typing = {}
                        dev.typing[(conv, user)] = (frame, now + left)
                        continue
                    dc = conns.get(dev.conn)
                    if dc is not None and dc.held <= cfg.outbound_pause:
                        self._send(dev.conn, frame, out)
        return out

    def _release_typing(self, dev: _Device, out: list[Command], now: int) -> None:
        """The device caught up with its inbox: the Typing frames held for it
        (typing_elsewhere) go out after the push, with what is left of their
        TTL (an expired indicator is dropped)."""
        held, dev.typing = dev.typing, None
        dc = self._conns.get(dev.conn)
        if not held or dc is None or dc.held > self.config.outbound_pause:
            return
        for frame, until in held.values():
            if frame.active:
                if until - now < 1000:
                    continue
                frame = F.Typing(frame.conv, True, frame.user, (until - now) // 1000)
            self._send(dev.conn, frame, out)

    def _membership_changed(self, res: GroupChanged) -> None:
        """A group's members changed (committed): typing goes to the new
        members from now on, and the presence subscriptions of or about the
        users who joined or left are checked again (they may now share a
        conversation, or no longer)."""
        self._typing_gen += 1
        if res.conv in self._typing_members:
            self._typing_members[res.conv] = (self._typing_members[res.conv][0], self._bounded(frozenset(res.members)))
        self._recheck_presence({m.sender for m in res.entries})

    def _recheck_presence(self, moved: set[str]) -> None:
        """The users ``moved`` joined or left a group: the presence
        subscriptions of or about them are checked again."""
        if not moved or not (self._pres_req or self._pres_reading):
            return
        for conn, users in self._pres_req.items():
            c = self._conns.get(conn)
            if c is not None and (c.user in moved or not moved.isdisjoint(users)):
                self._pres_recheck.add(conn)  # asked in _flush_presence (it has the command list)
        # A PresenceSub still read is not in _pres_req (installed once
        # answered), and an async store's answer may be a snapshot from
        # before this change (UNKNOWN for a user who shares the group now):
        # its users are checked here too.  _flush_presence holds the
        # re-check until the read is answered (_pres_recheck_after), then
        # asks again for the subscription it installed.
        for conn in self._pres_reading:
            ctx = self._reads.get(self._pres_latest.get(conn, 0))
            c = self._conns.get(conn)
            if (c is not None and isinstance(ctx, _PresenceRead)
                    and (c.user in moved or not moved.isdisjoint(ctx.users))):
                self._pres_recheck.add(conn)

    def _on_presence_sub(self, c: _Conn, f: F.PresenceSub, now: int, out: list[Command]) -> None:
        """Replace ``c``'s presence subscription (store read: who of these
        shares a conversation with ``c.user``, and their settings)."""
        cfg = self.config
        users = tuple(dict.fromkeys(u.user for u in f.users))
        if len(users) > cfg.presence_max_users:
            if self._control(c, now, "refused PresenceSub", out):
                self._send(c.id, F.Presence(f.req_id, ErrorCode.PRESENCE_LIMIT, ()), out)
            return
        if not users:
            if self._control(c, now, "PresenceSub", out):
                self._pres_latest.pop(c.id, None)
                self._install_presence(c.id, (), frozenset())
                self._send(c.id, F.Presence(f.req_id, ErrorCode.OK, ()), out)
            return
        self._ask_presence(c, f.req_id, users, out)

    def _ask_presence(self, c: _Conn, req_id: int, users: tuple[str, ...], out: list[Command]) -> None:
        rid = self._request_id()
        if req_id > 0:
            self._pres_latest[c.id] = rid
        # A re-check (req_id 0) applies only while the subscription it
        # re-checks is still the newest.
        sub = rid if req_id > 0 else self._pres_latest.get(c.id, 0)
        if req_id >= 0:
            self._pres_reading[c.id] = self._pres_reading.get(c.id, 0) + 1
        if req_id > 0:
            # Its users' 1:1 chats are watched from now on (_await_direct),
            # not only once answered: a first message committed while it is
            # read re-checks it once answered (_flush_presence).
            self._await_direct(c.id, users, frozenset())
        # Counted with the history reads: at their bound nothing more of the
        # connection is decoded until one is answered.
        c.history_reads += 1
        self._reads[rid] = _PresenceRead(c.id, req_id, users, sub)
        out.append(StoreRequest(rid, (ReadPresence(c.user, users),), False))

    def _presence_read_done(self, ctx: _PresenceRead, res: Optional[Result], now: int, out: list[Command]) -> None:
        c = self._conns.get(ctx.conn)
        if c is None:
            return
        c.history_reads -= 1
        if ctx.req_id >= 0:
            left = self._pres_reading.pop(c.id, 1) - 1
            if left > 0:
                self._pres_reading[c.id] = left
            elif c.id in self._pres_recheck_after:  # news while it was read: ask again now
                self._pres_recheck_after.discard(c.id)
                self._pres_recheck.add(c.id)
        if ctx.req_id > 0 and not isinstance(res, PresencePage) and self._pres_latest.get(c.id, 0) == ctx.sub:
            # The subscription kept is the installed one: watch its chats again.
            self._await_direct(c.id, self._pres_req.get(c.id, ()), self._pres_sub.get(c.id, frozenset()))
        if ctx.req_id < 0:  # a PresencePrivacy query
            if isinstance(res, PresencePage):
                self._send(c.id, F.PresencePrivacy(2 if res.hide_last_seen else 1), out)
            else:
                self._error(c.id, ErrorCode.STORE_UNAVAILABLE, 0, "PresencePrivacy: the store is unavailable; ask again", out)
        elif not isinstance(res, PresencePage):
            if ctx.req_id:
                self._send(c.id, F.Presence(ctx.req_id, ErrorCode.STORE_UNAVAILABLE, ()), out)
        else:
            self._presence_answer(c, ctx, res, self._pres_latest.get(c.id, 0) == ctx.sub, out)
        if c.history_reads == _MAX_HISTORY_READS - 1:
            self._resume(c, now, out)

    def _presence_answer(self, c: _Conn, ctx: _PresenceRead, res: PresencePage, newest: bool, out: list[Command]) -> None:
        """Answer a PresenceSub (every user asked, in order) and install it
        if no newer one was sent meanwhile; or apply a re-check, telling
        only what became visible or invisible."""
        if ctx.req_id == 0 and not newest:
            return  # re-checked a subscription that was replaced since
        before = self._pres_sub.get(c.id, frozenset())
        visible = frozenset(e.user for e in res.entries if e.visible)
        for e in res.entries:
            if e.visible and e.last_seen > self._pres_seen.get(e.user, 0):
                self._remember_seen(e.user, e.last_seen)
        if newest and self.relay_elsewhere:
            # The store's word on the other nodes (as fresh as it gets) for
            # the users watched from now on; their watchers are told below
            # if that changes what they were told (_flush_presence).
            for e in res.entries:
                if e.visible:
                    self._set_remote(e.user, frozenset(e.elsewhere))
        entries = tuple(
            self._presence_entry(e.user, e.hide_last_seen, bool(e.elsewhere))
            if e.visible else F.PresenceEntry(e.user, F.PresenceState.UNKNOWN, 0)
            for e in res.entries
        )
        if ctx.req_id:
            self._send(c.id, F.Presence(ctx.req_id, ErrorCode.OK, entries), out)
        else:  # a re-check: tell only what became visible or invisible
            changed = tuple(e for e in entries if (e.user in visible) != (e.user in before))
            if changed:
                self._send(c.id, F.Presence(0, ErrorCode.OK, changed), out)
        if newest:
            self._install_presence(c.id, ctx.users, visible)
            for e in res.entries:
                if e.visible:  # watched now: keep the setting for the changes to come
                    self._pres_hide[e.user] = e.hide_last_seen

    def _presence_entry(self, user: str, hide: Optional[bool] = None, elsewhere: bool = False) -> F.PresenceEntry:
        if elsewhere or self._is_online(user):
            return F.PresenceEntry(user, F.PresenceState.ONLINE, 0)
        if hide is None:
            hide = self._pres_hide.get(user, False)
        return F.PresenceEntry(user, F.PresenceState.OFFLINE, 0 if hide else self._pres_seen.get(user, 0))

    def _install_presence(self, conn: int, users: tuple[str, ...], visible: frozenset[str]) -> None:
        self._await_direct(conn, users, visible)
        old = self._pres_sub.pop(conn, frozenset())
        for u in old - visible:
            self._unwatch(u, conn)
        if users:
            self._pres_req[conn] = users
            self._pres_sub[conn] = visible
        else:
            self._pres_req.pop(conn, None)
        for u in visible - old:
            watchers = self._pres_watch.get(u)
            if watchers is None:
                watchers = self._pres_watch[u] = set()
                self._pres_told[u] = self._is_online(u)
            watchers.add(conn)

    def _await_direct(self, conn: int, users: tuple[str, ...], visible: frozenset[str]) -> None:
        """Remember the direct conversations whose first entry would make a
        user of ``conn``'s subscription visible: those it asked for and was
        answered UNKNOWN (two users who share nothing yet -- the usual start
        of a 1:1 chat, subscribed before its first message).  A group join
        is re-checked by _membership_changed; this is the 1:1 case."""
        for conv in self._pres_direct_of.pop(conn, ()):
            waiting = self._pres_direct.get(conv)
            if waiting is not None:
                waiting.discard(conn)
                if not waiting:
                    del self._pres_direct[conv]
        c = self._conns.get(conn)
        if c is None or not users:
            return
        convs = []
        for u in users:
            if u != c.user and u not in visible and valid_id(u) and valid_id(c.user):
                conv = direct_conversation(c.user, u)
                self._pres_direct.setdefault(conv, set()).add(conn)
                convs.append(conv)
        if convs:
            self._pres_direct_of[conn] = tuple(convs)

    def _direct_news(self, ops: Sequence[object], results: Sequence[Result]) -> None:
        """A batch committed: a message stored in a direct conversation that
        a subscription waits on (_await_direct) re-checks that subscription
        -- its two users share a conversation now, and see each other's
        presence from then on (asked in _flush_presence)."""
        waiting = self._pres_direct
        for op, res in zip(ops, results):
            if type(op) is NewMessage and type(res) is Appended:
                conns = waiting.get(op.conv)
                if conns:
                    self._pres_recheck.update(conns)

    def _unwatch(self, user: str, conn: int) -> None:
        watchers = self._pres_watch.get(user)
        if watchers is None:
            return
        watchers.discard(conn)
        if not watchers:
            del self._pres_watch[user]
            self._pres_hide.pop(user, None)
            self._pres_told.pop(user, None)
            self._pres_dirty.discard(user)
            self._pres_remote.pop(user, None)
            self._pres_hinted.pop(user, None)

    def _remember_seen(self, user: str, when: int) -> None:
        seen = self._pres_seen
        seen.pop(user, None)
        if len(seen) >= _PRES_SEEN_MAX:
            del seen[next(iter(seen))]  # the least recently updated
        seen[user] = when

    def _flush_presence(self, out: list[Command]) -> None:
        """Tell watchers the users whose online state changed since they
        were last told (once per entry point, so a replaced device's
        offline-then-online is no change)."""
        if self._pres_recheck:
            recheck, self._pres_recheck = self._pres_recheck, set()
            for conn in sorted(recheck):
                c = self._conns.get(conn)
                if c is not None and self._pres_reading.get(conn):
                    self._pres_recheck_after.add(conn)  # asked once those reads are answered
                    continue
                users = self._pres_req.get(conn)
                if c is not None and users:
                    self._ask_presence(c, 0, users, out)
        dirty, self._pres_dirty = self._pres_dirty, set()
        for user in sorted(dirty):
            watchers = self._pres_watch.get(user)
            online = self._is_online(user)
            if not watchers or self._pres_told.get(user) == online:
                continue
            self._pres_told[user] = online
            frame = F.Presence(0, ErrorCode.OK, (self._presence_entry(user),))
            for conn in sorted(watchers):
                self._send(conn, frame, out)

    def _ephemeral_forget(self, c: _Conn) -> None:
        """A connection goes away: its subscription and bucket go with it;
        its user may be offline now (told at the end of the entry point)."""
        conn = c.id
        self._typing_tokens.pop(conn, None)
        self._pres_recheck.discard(conn)
        self._pres_recheck_after.discard(conn)
        self._pres_reading.pop(conn, None)
        self._pres_latest.pop(conn, None)
        self._pres_req.pop(conn, None)
        self._await_direct(conn, (), frozenset())
        for u in self._pres_sub.pop(conn, frozenset()):
            self._unwatch(u, conn)
        if c.state is _ConnState.ACTIVE:
            if c.last_seen > self._pres_seen.get(c.user, 0):
                self._remember_seen(c.user, c.last_seen)
            if c.user in self._pres_watch:
                self._pres_dirty.add(c.user)

    def _on_presence_privacy(self, c: _Conn, f: F.PresencePrivacy, now: int, out: list[Command]) -> None:
        """Mode 0: ask the setting (store read); 1 / 2: show / hide the
        last-seen time (a durable write, answered once committed)."""
        if f.mode > 2:
            if self._control(c, now, "refused PresencePrivacy", out):
                self._error(c.id, ErrorCode.BAD_REQUEST, 0, f"PresencePrivacy: unknown mode {f.mode}", out)
            return
        if f.mode == 0:
            self._ask_presence(c, -1, (), out)
            return
        self._propose(SetPresencePrivacy(c.user, f.mode == 2), _PrivacyCtx(c.id))

    def _privacy_done(self, op: SetPresencePrivacy, ctx: Union["_PrivacyCtx", _AdminCtx], res: Result, out: list[Command]) -> None:
        asker = ctx.conn if isinstance(ctx, _PrivacyCtx) else None
        if isinstance(ctx, _AdminCtx):
            out.append(AdminDone(ctx.ref, res))
        if not isinstance(res, PresencePrivacySet):
            if asker is not None:
                code = res.code if isinstance(res, Rejected) else ErrorCode.INTERNAL
                self._error(asker, code, 0, f"PresencePrivacy: {code.name.lower()}", out)
            return
        self._privacy_changed(res.user, res.hide_last_seen, asker, out)

    def privacy_elsewhere(self, user: str, hide_last_seen: bool, now: int) -> list[Command]:
        """Cluster hint: ``user``'s last-seen privacy setting was set on
        another node (durably).  Their devices online here and the
        watchers here hear it as for a change made on this node."""
        out: list[Command] = []
        self._privacy_changed(user, hide_last_seen, None, out)
        return out

    def _privacy_changed(self, user: str, hide: bool, asker: Optional[int], out: list[Command]) -> None:
        frame = F.PresencePrivacy(2 if hide else 1)
        # The asker first, then the user's other devices (their settings
        # screens stay in sync).
        if asker is not None:
            self._send(asker, frame, out)
        for dev in self._online.get(user, {}).values():
            if dev.conn != asker:
                self._send(dev.conn, frame, out)
        if user in self._pres_watch and self._pres_hide.get(user) != hide:
            self._pres_hide[user] = hide
            if not self._is_online(user):  # what watchers see changes only while offline
                entry = F.Presence(0, ErrorCode.OK, (self._presence_entry(user),))
                for conn in sorted(self._pres_watch[user]):
                    self._send(conn, entry, out)

    def set_presence_privacy(self, user: str, hide_last_seen: bool, now: int, *, ref: int = 0) -> list[Command]:
        """Control plane: set ``user``'s last-seen privacy (durable, an op
        of the next batch); AdminDone(ref, PresencePrivacySet | Rejected)
        once committed, and the user's devices and watchers are told as for
        a client's PresencePrivacy."""
        return self._admin(SetPresencePrivacy(user, hide_last_seen), ref, now)

    def presence(self, user: str) -> tuple[bool, int]:
        """Embedding API: (online, last seen µs or 0 if unknown here) of
        ``user``, ignoring privacy (the host sees everything).  Online: on
        this node, or -- for a user some subscriber here watches, when other
        nodes share the store -- on another node as last heard."""
        if self._is_online(user):
            return True, 0
        return False, self._pres_seen.get(user, 0)

    # -- presence across nodes (relay_elsewhere) ------------------------------
    # A user is online while this node has a device of theirs (_online) or,
    # for a watched user, while _pres_remote names another node.  That set
    # comes from three sources, each replacing what it covers: a
    # PresenceSub's read (the store's device-to-node records of live nodes),
    # presence hints (a node's first device of the user came / its last
    # went), and the host's periodic re-check of every watched user (which
    # repairs a lost hint and drops a node that died without a word: its
    # records stop counting when its liveness key expires).  Changes go
    # through _pres_dirty like local ones: watchers hear only real flips.

    def _is_online(self, user: str) -> bool:
        return user in self._online or bool(self._pres_remote.get(user))

    def _set_remote(self, user: str, nodes: frozenset[str], at: Optional[int] = None) -> None:
        """``user`` (watched here) is online on ``nodes`` (other nodes).
        Going offline everywhere records ``at`` (µs; default: unknown, the
        stored one stays) as the last-seen time."""
        was = self._is_online(user)
        if nodes:
            self._pres_remote[user] = nodes
        else:
            self._pres_remote.pop(user, None)
        if was != self._is_online(user):
            if was and at is not None and at > self._pres_seen.get(user, 0):
                self._remember_seen(user, at)
            self._pres_dirty.add(user)

    def presence_elsewhere(self, user: str, node: str, online: bool, at: int, now: int) -> list[Command]:
        """Cluster hint: ``node`` (another node's id) got its first device
        of ``user`` online (``online``) or lost its last one, at ``at`` (µs,
        that node's clock: the last-seen time if no node has the user
        now).  Watchers here hear the change as for a local one (privacy
        and visibility as they were read); a user nobody here watches is
        ignored (nothing is kept)."""
        out: list[Command] = []
        if user in self._pres_watch:
            self._pres_hinted[user] = now
            nodes = self._pres_remote.get(user, frozenset())
            self._set_remote(user, nodes | {node} if online else nodes - {node}, at)
        self._maybe_commit(out, now)
        return out

    def presence_checked(self, states: "dict[str, frozenset[str]]", asked: int, now: int) -> list[Command]:
        """Cluster re-check: for users watched here, the other nodes where
        the store has a device of theirs online (live nodes only), as the
        host read them for :meth:`presence_watched` from ``asked`` (µs, this
        clock) on.  Replaces what hints said (a lost one is repaired),
        except for a user a hint came about since ``asked`` (the read may
        predate it); a user found offline everywhere who was online gets
        ``now`` as their last-seen time.  Users not watched (any more) are
        ignored."""
        out: list[Command] = []
        for user, nodes in states.items():
            if user in self._pres_watch and self._pres_hinted.get(user, asked - 1) < asked:
                self._set_remote(user, frozenset(nodes), now)
        self._maybe_commit(out, now)
        return out

    def presence_nodes_gone(self, nodes: Iterable[str], now: int) -> list[Command]:
        """Cluster liveness check: ``nodes`` (other nodes' ids) are no longer
        live (their liveness key expired: they died without cleanup, or lost
        the store for that long).  Watched users online only there go
        offline, last seen ``now``."""
        out: list[Command] = []
        gone = frozenset(nodes)
        for user, where in list(self._pres_remote.items()):
            if not gone.isdisjoint(where):
                self._set_remote(user, where - gone, now)
        self._maybe_commit(out, now)
        return out

    def presence_nodes(self) -> set[str]:
        """The other nodes some watched user is online on, as known here:
        what the host checks for liveness (:meth:`presence_nodes_gone`)."""
        return set().union(*self._pres_remote.values())

    def presence_watched(self) -> list[str]:
        """Users some presence subscription here watches (and may see): what
        the host re-checks on the other nodes (:meth:`presence_checked`)."""
        return list(self._pres_watch)

    _handlers: dict[type, Callable[..., None]] = {
        F.SendReq: _on_send,
        F.AmendReq: _on_amend,
        F.PushAck: _on_push_ack,
        F.Read: _on_read,
        F.HistoryReq: _on_history,
        F.ReadersReq: _on_readers,
        F.ConvListReq: _on_conv_list,
        F.ConvSetReq: _on_conv_set,
        F.CalibrateReq: _on_calibrate,
        F.Ping: _on_ping,
        F.Pong: _on_pong,
        F.Close: _on_close,
        F.Login: _on_login_again,
        F.Typing: _on_typing,
        F.PresenceSub: _on_presence_sub,
        F.PresencePrivacy: _on_presence_privacy,
    }

    # ------------------------------------------------------------ plumbing

    def _request_id(self) -> int:
        rid = self._next_request
        self._next_request = rid + 1
        return rid

    def _send(self, conn: int, frame: F.Frame, out: list[Command]) -> None:
        c = self._conns.get(conn)
        if c is None:
            return
        if c.held > self.config.max_outbound:
            return  # over the hard limit: closed as a slow consumer (_maybe_commit)
        self._stats["frames_out"] += 1
        data = c.session.send(frame)
        if c.session.pushes_over_max_frame != c.over:
            self._over_max_frame(c, out)
        if c.chunks is None:
            c.chunks = deque()
        c.chunks.append(len(data))
        c.held += len(data) + _FRAME_OVERHEAD
        self._held_total += len(data) + _FRAME_OVERHEAD
        if c.held > self.config.max_outbound:
            self._slow.append(c)
        out.append(_send_data(conn, data))

    def _send_many(self, conn: int, frames: Sequence[F.Frame], out: list[Command]) -> None:
        """:meth:`_send` of several frames as one SendData (one encode call)."""
        c = self._conns.get(conn)
        if c is None:
            return
        if c.held > self.config.max_outbound:
            return  # over the hard limit: closed as a slow consumer (_maybe_commit)
        self._stats["frames_out"] += len(frames)
        data = c.session.send_many(frames)
        if c.session.pushes_over_max_frame != c.over:
            self._over_max_frame(c, out)
        if c.chunks is None:
            c.chunks = deque()
        c.chunks.append(len(data))
        c.held += len(data) + _FRAME_OVERHEAD
        self._held_total += len(data) + _FRAME_OVERHEAD
        if c.held > self.config.max_outbound:
            self._slow.append(c)
        out.append(_send_data(conn, data))

    def _over_max_frame(self, c: _Conn, out: list[Command]) -> None:
        """``c``'s session sent a Push of one message over max_frame (a
        message stored under larger limits): counted, and said once per
        connection (PushOverMaxFrame) -- the device refuses the frame,
        reconnects and gets it again, and nothing else said why."""
        first = c.over == 0
        self._stats["pushes_over_max_frame"] += c.session.pushes_over_max_frame - c.over
        c.over = c.session.pushes_over_max_frame
        if first:
            out.append(PushOverMaxFrame(c.id, c.user or "", c.device or "", c.session.last_over_max_frame,
                                        self.config.limits.max_frame))

    def _error(self, conn: int, code: ErrorCode, ref: int, reason: str, out: list[Command]) -> None:
        if conn in self._conns:
            self._send(conn, F.Error(code, ref, reason), out)

    def _close(self, c: _Conn, code: CloseCode, reason: str, out: list[Command]) -> None:
        if code is CloseCode.PROTOCOL_ERROR and c.id in self._conns:
            # Counted here, once per connection, whatever the violation
            # (each call site counting its own missed some).
            self._stats["protocol_errors"] += 1
        self._forget(c.id, out, code, reason)
        out.append(CloseConnection(c.id, code, reason, c.session.close(code, reason)))

    def _forget(self, conn: int, out: list[Command], code: Optional[CloseCode], reason: str) -> None:
        c = self._conns.pop(conn, None)
        if c is None:
            return
        if c.held:
            # (What the host still writes of it is not reported: gone.)
            self._held_total -= c.held
            c.held = 0
        parked = self._parked.pop(conn, None) if self._parked else None
        if parked is not None:
            self._starved.pop(parked, None)
            self._readers.pop(parked, None)
        if c.backlog is not None:
            c.backlog.clear()
        # Its held answers go with it (each points back at it: no cycle left
        # for the collector; a retry's place that its original's outcome
        # still reaches finds the connection gone).
        c.acks_held = None
        self._ephemeral_forget(c)
        if c.waiting:
            # A hook's answer still to come is ignored (a content check's
            # message was never proposed: the client retries it).  A login
            # read is not a hook: _read_done finds the connection gone.
            self._hooks.pop(c.waiting, None)
        if c.state is not _ConnState.ACTIVE:
            return
        if code is not CloseCode.KICKED:
            # When the device was last heard from, for its stored last_seen
            # (presence after a restart, device_retention): the login alone
            # recorded only the login's time.  Lazy, like an ack.  Not after
            # a host kick: a purge kicks, and this would record the purged
            # device again.
            self._propose(TouchDevice(c.user, c.device, 0, c.last_seen), None)
        out.append(DeviceOffline(conn, c.user, c.device, code, reason))
        self._event("offline", user=c.user, device=c.device, code=code.name if code is not None else None, reason=reason)
        devices = self._online.get(c.user)
        if devices is not None:
            dev = devices.get(c.device)
            if dev is not None and dev.conn == conn:
                del devices[c.device]
                if self._starved or self._readers:
                    self._starved.pop(dev, None)
                    self._readers.pop(dev, None)
            if not devices:
                del self._online[c.user]
                self._marks.pop(c.user, None)
                if c.user not in self._head_refs:
                    self._heads.pop(c.user, None)
        # SendReqs of this connection stay in their batch: they will be stored
        # and their acks dropped; the client's retry then gets a Duplicate.

    def _propose(self, op: Op, ctx: _Ctx) -> None:
        self._ops.append(op)
        self._ctxs.append(ctx)
        if type(op) not in _LAZY_OPS:
            self._eager += 1

    @property
    def batch_in_flight(self) -> bool:
        """Whether a write batch is with the store now (its StoreRequest
        emitted, its outcome not yet handed back): what is proposed
        meanwhile waits for the next batch whatever the host does."""
        return self._inflight is not None

    def hold_batches(self) -> None:
        """Start no new write batch until :meth:`release_batches` (a cork).

        Group commit across connections, for a host that can see more
        input coming: the core starts a batch as soon as the store is idle
        and something is pending, so when several connections have bytes
        waiting, the first one fed starts a batch of its own sends alone and
        the rest wait for the next -- two commits, one of them small, where
        one would do.  A host that knows more bytes are waiting (the served
        broker asks a level-triggered epoll of its sockets) holds, feeds
        them all, then releases: one batch.  Measured at 50 connections x 16
        in flight: BENCHMARKS.md, "One batch for the connections that have
        bytes waiting".

        Nothing is acked early: a held op is only pending.  :meth:`flush`
        still commits while held; timers do not.  The host must release
        soon (within its pass over the ready connections): held sends wait
        for it.  Holding twice is one hold."""
        self._holding = True

    def release_batches(self, now: int) -> list[Command]:
        """End :meth:`hold_batches`; the commands to run, among them the
        StoreRequest of the batch that may start now (none if the store is
        busy or nothing is pending).  Releasing when not held returns []
        and changes nothing."""
        if not self._holding:
            return []
        self._holding = False
        out: list[Command] = []
        self._maybe_commit(out, now)
        return out

    def flush(self, now: int) -> list[Command]:
        """Commit whatever is pending now, delivery acks included (shutdown)."""
        out: list[Command] = []
        self._maybe_commit(out, now, force=True)
        return out

    def _maybe_commit(self, out: list[Command], now: int, force: bool = False) -> None:
        """Hand the store the next batch if it is idle (group commit).  Every
        entry point ends here, so this is also where connections that went
        past max_outbound while frames were being built are closed (not in
        _send: its callers may be iterating over the online devices)."""
        if self._pres_dirty or self._pres_recheck:
            self._flush_presence(out)
        if self._slow:
            slow, self._slow = self._slow, []
            for c in slow:
                if c.id in self._conns:
                    self._close(
                        c, CloseCode.SLOW_CONSUMER,
                        f"more than {self.config.max_outbound} bytes of frames not taken: not reading fast enough", out,
                    )
        # (At the bound counts as past it, as in _pump, which parks there:
        # otherwise a device parked at exactly the bound had no deadline to
        # wake it -- a re-check pass.)
        if self._held_total >= self.config.max_outbound_total:
            if self._over_since is None:
                self._look += 1  # (a look begins: see _drop_stalled)
                self._over_since = now
            elif now - self._over_since >= self.config.outbound_total_grace:
                self._drop_stalled(out, now)
        else:
            self._over_since = None
            if self._starved or self._readers:
                self._unstarve(out, now)
        if self._lazy_events:
            for data in self._lazy_events:
                self._propose(AppendEvent(data, now), None)
            self._lazy_events.clear()
        if self._inflight is not None or not self._ops:
            return
        if self._holding and not force:
            return  # (hold_batches: the host releases it within its pass)
        self._retry_at = None
        delay = self.config.ack_delay
        if delay and not self._eager and not force:
            # Only delivery acks: wait a little for something that needs a
            # sync anyway (next_deadline names when the wait ends).
            if self._lazy_since is None:
                self._lazy_since = now
            if now - self._lazy_since < delay:
                return
        n = self.config.max_batch_ops
        if delay and not force and len(self._ops) > self._eager and self._eager_are_sends():
            # Sends with delivery acks pending: the acks do not ride along
            # until they have waited ack_delay.  At one send per batch (1 x
            # 1) they were two of its three ops (the recipient's PushAck and
            # the sender's own position) and a third of its store CPU; a lost
            # ack costs a re-delivery only, and they still wait no longer
            # than ack-only batches do.  Only behind sends: an op such as a
            # purge or a device revocation must run after the acks proposed
            # before it, as it always did.
            if self._lazy_since is None:
                self._lazy_since = now
            if now - self._lazy_since < delay:
                self._take_eager(n, out)
                return
        self._lazy_since = None
        end = self._batch_end(self._ops, n)
        if end < n and end < len(self._ops):
            # The fan-out budget closed the batch: what may still ride along.
            ops, ctxs, self._ops, self._ctxs = self._split(self._ops, self._ctxs, end, self._ride_along(self._ops, end, n - end))
        else:
            ops, ctxs = self._ops[:end], self._ctxs[:end]
            del self._ops[:end], self._ctxs[:end]
        self._reslot()
        self._commit_batch(ops, ctxs, out)

    def _batch_end(self, ops: list[Op], n: int) -> int:
        """How many of ``ops`` the next batch takes: at most ``n``, and no
        more than fit max_batch_entries -- at least one.  Notes the indices
        of the group messages taken (_inflight_groups), whose answers tell
        the groups' sizes.  Why a budget: the commit's time and its results'
        memory grow with the inbox entries written, and a group message
        writes one per member."""
        budget = self.config.max_batch_entries
        sizes = self._sizes
        groups: list[int] = []
        total = 0
        end = min(n, len(ops))
        for i in range(end):
            op = ops[i]
            kind = type(op)
            if kind is NewMessage or kind is AmendMessage:
                conv = op.conv  # type: ignore[union-attr]
                if conv.startswith(DIRECT_PREFIX):
                    w = 2
                elif kind is AmendMessage and op.kind == F.MessageKind.DELETE:  # type: ignore[union-attr]
                    w = 1  # to the sender's own inbox only
                else:
                    w = sizes.get(conv, budget) or 1
                    if kind is NewMessage:
                        groups.append(i)
            elif kind is AddMembers or kind is RemoveMembers:
                size = sizes.get(op.conv)  # type: ignore[union-attr]
                users = len(op.users)  # type: ignore[union-attr]
                # An entry per user changed to every member (a joiner too).
                w = budget if size is None else users * (size + users)
            elif kind is PurgeUser or kind is PurgeConversation:
                w = budget  # LEFT entries to each of the user's groups / a whole conversation's
            elif kind is CreateGroup:
                # No inbox entries, but a record per member: a group of
                # 300,000 took 4 s to create, and goes off the loop so.
                w = len(op.members)  # type: ignore[union-attr]
            else:
                w = 1
            total += w
            if total > budget and i:
                end = i
                total -= w
                break
        self._inflight_groups = [i for i in groups if i < end]
        self._batch_entries = total
        return end

    def _ride_along(self, ops: list[Op], end: int, room: int) -> list[int]:
        """The indices past ``end`` of the messages that may still join a
        batch the fan-out budget closed at ``end`` (at most ``room``, within
        the budget left or a quarter of it, whichever is more).  Why: a
        backlog of large group messages (a post of 1,000 messages to a
        group of 20,000 is 77 commits) would otherwise hold up every
        message proposed after it, in any conversation, until all of it is
        stored.  Order is kept where it is owed: a message never passes an
        op of its own conversation, nor one of its own sending device (its
        stored messages' SendAcks go out in send order); the host (SYSTEM)
        answers each post on its own.  A message to a group whose size is
        not known yet may ride along once per batch.  Delivery acks, read
        markers and conversation settings are passed; any other op (an
        event, a revocation, a purge of a user) ends the search."""
        budget = self.config.max_batch_entries
        allowance = max(budget - self._batch_entries, budget >> 2)
        sizes = self._sizes
        convs: set[str] = set()
        senders: set[tuple[str, str]] = set()
        taken: list[int] = []
        total = 0
        unknown = False  # a message to a group of unknown size taken
        for j in range(end, len(ops)):
            if len(taken) >= room:
                break
            op = ops[j]
            kind = type(op)
            if kind is NewMessage or kind is AmendMessage:
                conv, sender = op.conv, (op.sender, op.device)  # type: ignore[union-attr]
                if j > end and kind is NewMessage and conv not in convs and (sender[0] == SYSTEM or sender not in senders):
                    w = 2 if conv.startswith(DIRECT_PREFIX) else sizes.get(conv)
                    if w is None and not unknown:
                        # A group whose size is not known yet (after a
                        # restart every group's): one per batch, its answer
                        # tells the size -- else it would wait for the whole
                        # backlog.  At most one group's fan-out past the
                        # budget, as a lone op larger than it is.
                        unknown = True
                        w = 1
                    if w is not None and total + max(w, 1) <= allowance:
                        total += max(w, 1)
                        if not conv.startswith(DIRECT_PREFIX):
                            self._inflight_groups.append(end + len(taken))  # (its index in the batch)
                        taken.append(j)
                        continue
                convs.add(conv)
                if sender[0] != SYSTEM:
                    senders.add(sender)
            elif kind is AddMembers or kind is RemoveMembers or kind is CreateGroup or kind is PurgeConversation:
                convs.add(op.conv)  # type: ignore[union-attr]
            elif kind not in _PASSED_OPS:
                break
        self._batch_entries += total
        return taken

    @staticmethod
    def _split(ops: list[Any], ctxs: list[Any], end: int, extra: list[int]) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        """(batch ops, their ctxs, the ops left, their ctxs): the first
        ``end`` and those at ``extra`` (ascending) are the batch."""
        take = set(extra)
        rest = [j for j in range(end, len(ops)) if j not in take]
        return (ops[:end] + [ops[j] for j in extra], ctxs[:end] + [ctxs[j] for j in extra],
                [ops[j] for j in rest], [ctxs[j] for j in rest])

    def _learn_sizes(self, ops: tuple[Any, ...], results: tuple[Result, ...]) -> None:
        """Note the members of each group a committed NewMessage went to
        (its Appended names every recipient); an unknown group weighs 1."""
        sizes = self._sizes
        for i in self._inflight_groups:
            res = results[i]
            if type(res) is Appended:
                size = len(res.positions)  # type: ignore[union-attr]
                if not self.relay_elsewhere:
                    self._batch_seqs.setdefault(ops[i].conv, []).append(res.seq)  # type: ignore[union-attr]
            elif type(res) is Rejected and res.code is ErrorCode.UNKNOWN_CONVERSATION:  # type: ignore[union-attr]
                size = 0
            else:
                continue
            self._note_size(ops[i].conv, size)  # type: ignore[union-attr]
        self._inflight_groups = []

    def _note_size(self, conv: str, size: int) -> None:
        _bounded_put(self._sizes, conv, size)

    def _note_seq(self, conv: str, seq: int) -> None:
        _bounded_put(self._seqs, conv, seq)

    def _learn_seqs(self, out: list[Command]) -> None:
        """The seqs the batch just committed, per group (_batch_seqs): a
        group whose seqs go on past the last one we knew of with a hole
        had entries written by another writer in between (``pimcore group
        add|remove`` on the data directory): read them (_GapRead).  Sorted
        first: a batch's own ops of one group (a message, a membership
        change, a message) are holes to none of them."""
        batch, self._batch_seqs = self._batch_seqs, {}
        for conv, got in batch.items():
            known = self._seqs.get(conv)
            got.sort()
            for seq in got:
                if known is not None and seq > known + 1:
                    self._read_gap(_GapRead(conv, known, seq - 1), out)
                if known is None or seq > known:
                    known = seq
            assert known is not None
            self._note_seq(conv, known)

    def _read_gap(self, ctx: _GapRead, out: list[Command]) -> None:
        rid = self._request_id()
        self._reads[rid] = ctx
        limit = min(ctx.upto - ctx.after, _GAP_PAGE)
        out.append(StoreRequest(rid, (ReadHistory(ctx.conv, "", ctx.after, limit),), False))

    def _gap_read_done(self, ctx: _GapRead, res: Optional[Result], now: int, out: list[Command]) -> None:
        """Entries another writer added to group ``ctx.conv`` (_learn_seqs):
        each user who LEFT in them and has devices online here gets their
        inbox head read again (_HeadRead), and from it their LEFT entry --
        as the broker's own RemoveMembers pushes it to them (_finish_admin).
        Who JOINED needs nothing here: a recipient of the message that
        showed the hole, their head moved with it and the pump read their
        JOINED entry from the store.  A failed read is not retried: a user
        not told gets it all at their next login (as before this was done
        at all)."""
        if not isinstance(res, HistoryPage) or res.code is not ErrorCode.OK:
            return  # failed, or the group was purged meanwhile
        moved: set[str] = set()
        left: list[str] = []
        for m in res.messages:
            if m.kind == F.MessageKind.LEFT or m.kind == F.MessageKind.JOINED:
                moved.add(m.sender)
                if m.kind == F.MessageKind.LEFT and m.sender not in left:
                    left.append(m.sender)
        if moved:
            # What _membership_changed does for our own changes: typing
            # goes by the members from now on (the cached ones are read
            # again), and presence subscriptions of or about the users who
            # came or went are checked again.
            self._typing_gen += 1
            self._typing_members.pop(ctx.conv, None)
            self._recheck_presence(moved)
        for user in left:
            devices = self._online.get(user)
            if devices:
                rid = self._request_id()
                self._reads[rid] = _HeadRead(user)
                # (Any device of theirs: only the head is used.)
                out.append(StoreRequest(rid, (LoadSession(user, next(iter(devices)), False),), False))
        if res.messages and len(res.messages) == min(ctx.upto - ctx.after, _GAP_PAGE):
            last = res.messages[-1].seq
            if last < ctx.upto:
                self._read_gap(_GapRead(ctx.conv, last, ctx.upto), out)  # the rest of a long hole

    def _reslot(self) -> None:
        """The pending ops moved (a batch was taken from them): count the
        eager ones again and re-index the coalescing slots, which index
        into the batch being built."""
        self._eager = sum(1 for op in self._ops if type(op) not in _LAZY_OPS)
        self._ack_slot.clear()
        self._read_slot.clear()
        for i, op in enumerate(self._ops):
            if isinstance(op, AckPosition):
                self._ack_slot[(op.user, op.device)] = i
            elif isinstance(op, MarkRead):
                self._read_slot[(op.user, op.conv)] = i

    def _commit_batch(self, ops: list[Op], ctxs: list[_Ctx], out: list[Command]) -> None:
        request = StoreRequest(self._request_id(), tuple(ops), True, self._batch_entries)
        self._inflight = (request, ctxs)
        out.append(request)

    def _eager_are_sends(self) -> bool:
        """Every op pending is a NewMessage or a delivery ack that may wait."""
        held = _HELD_OPS
        return all(type(op) is NewMessage or type(op) in held for op in self._ops)

    def _take_eager(self, n: int, out: list[Command]) -> None:
        """Commit up to ``n`` of the pending sends; the delivery acks stay
        pending, in their order, their coalescing slots moved with them."""
        ops: list[Op] = []
        ctxs: list[_Ctx] = []
        keep_ops: list[Op] = []
        keep_ctxs: list[_Ctx] = []
        held = _HELD_OPS
        for op, ctx in zip(self._ops, self._ctxs):
            if type(op) in held or len(ops) >= n:
                keep_ops.append(op)
                keep_ctxs.append(ctx)
            else:
                ops.append(op)
                ctxs.append(ctx)
        end = self._batch_end(ops, n)
        if end < len(ops):
            # The fan-out budget closed the batch early: the sends it leaves
            # (but those that ride along) go back in front of the acks, in
            # their order (an ack's slot is only about the acks: _reslot).
            ops, ctxs, left, left_ctxs = self._split(ops, ctxs, end, self._ride_along(ops, end, n - end))
            keep_ops[:0], keep_ctxs[:0] = left, left_ctxs
        self._ops, self._ctxs = keep_ops, keep_ctxs
        self._reslot()
        self._commit_batch(ops, ctxs, out)


#: After a failed batch, what is still pending is proposed by the next event or
#: by the timer this long after (µs), whichever comes first.
_RETRY_AFTER_FAILURE = 200_000

#: Ops a message may pass to ride along in a batch (Broker._ride_along):
#: they do not touch a conversation's order.
_PASSED_OPS = frozenset((AckPosition, TouchDevice, MarkRead, SetConversation))
#: Groups whose size the core keeps (BrokerConfig.max_batch_entries); about
#: 100 bytes each.
_MAX_SIZES = 65_536
#: Entries a _GapRead asks at a time (a hole is as long as the users that
#: ``pimcore group`` added and removed in one go).
_GAP_PAGE = 256
#: clock_stepped() refuses a step of this many µs or more (146,000 years).
_MAX_STEP = 1 << 62
#: The reason of a Close(TOKEN_EXPIRED).
_TOKEN_EXPIRED = "the session's token expired; log in with a fresh one"
#: Ops whose loss only costs a re-delivery: they may wait for a batch (ack_delay).
_LAZY_OPS = frozenset((AckPosition, TouchDevice, AppendEvent))
#: The lazy ops that may also wait behind sends (not events: their ids are
#: the order the host reads them in).
_HELD_OPS = frozenset((AckPosition, TouchDevice))


def _synchronous(value: object, name: str) -> Any:
    """drain() is synchronous: an awaitable answer is a mistake, not a reason."""
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)
        if close is not None:
            close()  # no "never awaited" warning on top of the error
        raise TypeError(f"drain() calls {name} synchronously, but it returned an awaitable; an async hook needs an async host (pimcore.net)")
    return value


def drain(
    broker: Broker,
    store: Store,
    commands: list[Command],
    now: int,
    *,
    authenticate: Optional[Authenticator] = None,
) -> list[Command]:
    """The simplest driver, for synchronous embedding and for tests: run
    every store request on ``store`` and answer every hook right away (the
    content filter of the broker's config, ``authenticate`` for logins),
    feeding the outcomes back until none is left; return the other commands
    (frames, closes, AdminDone, PostDone, DeviceOnline / DeviceOffline) in
    order.  The caller writes the SendData bytes and reports them with
    :meth:`Broker.data_sent` (else a connection stops being read once
    ``outbound_pause`` bytes are held).

    Raises ValueError for an Authenticate when ``authenticate`` is None, and
    TypeError when a hook is ``async def`` (drain cannot await it).
    """
    done: list[Command] = []
    queue = deque(commands)
    while queue:
        cmd = queue.popleft()
        kind = type(cmd)
        if kind is StoreRequest:
            try:
                results = store.execute(cmd)  # type: ignore[arg-type]
            except StoreError as exc:
                queue.extend(broker.store_failed(cmd.request_id, exc, now))  # type: ignore[union-attr]
            else:
                queue.extend(broker.store_completed(cmd.request_id, results, now))  # type: ignore[union-attr]
        elif kind is Authenticate:
            if authenticate is None:
                raise ValueError("drain() got an Authenticate but no authenticate function")
            try:
                ident: Union[Identity, BaseException] = _synchronous(authenticate(cmd.token, cmd.now), "authenticate")  # type: ignore[union-attr]
            except AuthError as exc:
                ident = exc
            queue.extend(broker.auth_completed(cmd.request_id, ident, now))  # type: ignore[union-attr]
        elif kind is CheckContent:
            hook = broker.config.content_filter
            reason = _synchronous(hook(cmd.user, cmd.conv, cmd.payload), "content_filter") if hook is not None else None  # type: ignore[union-attr]
            queue.extend(broker.content_checked(cmd.request_id, reason, now))  # type: ignore[union-attr]
        else:
            done.append(cmd)
    return done

