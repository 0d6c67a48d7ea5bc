"""The client session, sans-IO: one device's protocol state, without sockets or tasks.

In the style of h11, wsproto and aioquic: bytes from the broker go in
(:meth:`ClientSession.receive_data`), application calls go in
(:meth:`~ClientSession.send`, :meth:`~ClientSession.mark_read`, ...), and what
comes out is bytes to write (:meth:`~ClientSession.data_to_send`), events for
the application (:meth:`~ClientSession.next_event`) and completions for whoever
waits on a send or a history page (:meth:`~ClientSession.completions`).  The
session never reads a clock: every call that may start, move or fire a timer
takes ``now``, an int in µs of the device's clock (the one its messages are
stamped with; by default the wall clock), and the session names the next
moment it needs to be woken (:meth:`~ClientSession.next_deadline`), at which
the driver calls :meth:`~ClientSession.handle_timer`.  Nothing here imports
trio; :mod:`pimcore.client` is the trio driver, and a driver for asyncio, a
browser or an embedded loop only has to move bytes and sleep.

One ``ClientSession`` is one *device*, across any number of connections:
pending sends, the inbox position, read markers and the local view survive
reconnects.  Each connection is bracketed by :meth:`connection_made` (the
driver has a fresh byte stream; the session queues Login) and either
:meth:`connection_lost` (the driver saw the stream fail or end) or an end the
session decides itself (a Close from the broker, malformed bytes, no LoginAck
in time, a dead link).  After a session-decided end the driver writes what is
left in :meth:`data_to_send` (nothing, or the session's own Close), hangs up
and reconnects.  docs/CLIENT.md,
"The client session (sans-IO)", is the state machine in prose for porting.

States (:class:`SessionState`)::

    DISCONNECTED --connection_made--> AWAITING_LOGIN_ACK --LoginAck--> CALIBRATING
         ^                                   |                              |
         |  connection_lost, Close,          |  1st sample or its timeout   v
         +--- malformed bytes, timeouts -----+-------------------------  ACTIVE
    any state --close(), Close(AUTH_FAILED|TOKEN_REVOKED|KICKED|REPLACED)--> CLOSED (terminal)
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from . import frames as F
from .codec import DEFAULT_MAX_FRAME_SIZE, Decoder, encode_frame
from .errors import CloseCode, EncodeError, ErrorCode, PimError, ProtocolError
from .heartbeat import HeartbeatTuner
from .ids import _show, conversation_problem, direct_members, id_problem
from .order import display_order
from .protocol import PRE_LOGIN_MAX_FRAME

try:  # zstandard is a dependency; without it the session just does not ask for zstd
    from .compress import (
        DEFLATE_WINDOW_BITS_DOWN,
        DEFLATE_WINDOW_BITS_UP,
        DeflateCompressor,
        DeflateDecompressor,
        FrameCompressor,
        FrameDecompressor,
    )
except ImportError:  # pragma: no cover
    FrameCompressor = FrameDecompressor = None  # type: ignore[assignment,misc]

def _check_timeout(call: str, timeout: object, unit: str = "µs") -> None:
    """A ``timeout`` that is None or a number >= 0 (``unit``); TypeError
    for no number (a str: "5" * 1e6 said "can't multiply sequence"),
    ValueError for a negative, NaN or infinite one (a new user's trial:
    -1 raised SendTimeout at once, the message stored anyway)."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{call}: timeout must be a number of {unit} >= 0 or None, not {timeout!r:.40}")
    if not (0 <= timeout < float("inf")):
        raise ValueError(f"{call}: timeout must be a number of {unit} >= 0 or None, not {timeout!r}")


def _check_conv_type(conv: object) -> None:
    if type(conv) is not str:
        raise TypeError(f"conv must be a conversation id (str), not {type(conv).__name__}: {conv!r:.40}")


#: Every compression cap this SDK can use (ClientConfig.compression_caps is masked with it).
_COMPRESSION_CAPS = F.CAP_ZSTD | F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP
#: Caps every Login asks for, whatever the compression: ConvPurged frames.
_ALWAYS_CAPS = F.CAP_CONV_PURGED

#: Frames the broker sends only in answer to something the client sent: their
#: arrival proves the client -> broker direction works (_last_heard).  Pushes,
#: read states, receipts, typing and presence come unasked: they prove only
#: the other direction.
_ANSWERS = frozenset({F.LoginAck, F.CalibrateResp, F.Pong, F.SendAck, F.HistoryResp, F.ReadersResp, F.ConvListResp, F.ConvSetResp})

#: Calibration outliers (see ClientSession._choose_sample).  A sample's
#: offset is off by at most half its round trip, so, as NTP's clock filter
#: does (RFC 5905 section 10: of the recent samples, the one with the
#: least delay), the estimate is the sample with the smallest rtt.  A new
#: login starts its samples afresh (the broker, the path or the device clock
#: may have changed), but a sample whose rtt is above
#: max(CALIBRATION_RTT_FACTOR x the rtt of the estimate in use,
#: CALIBRATION_RTT_FLOOR µs) is an outlier -- the client stopped or the
#: link stalled while it was out (a 3.8 s rtt after a SIGSTOP: 1.9 s of
#: error) -- and does not replace that estimate unless a second sample of
#: the login is as slow (then the path itself is slower).
CALIBRATION_RTT_FACTOR = 4
CALIBRATION_RTT_FLOOR = 100_000

#: SendReqs on the wire at once right after a reconnect that followed a
#: link lost with sends unanswered (see ClientSession._end_connection): TCP's
#: window after a retransmission timeout (RFC 5681 section 3.1: the loss
#: window, then slow start), here the size of TCP's initial window (RFC 5681
#: section 3.1 allows up to 4 segments) -- one window of 1 would take a
#: round trip per send for the first few round trips of every reconnect.
LOSS_WINDOW = 4
#: Disconnected.reason when frames kept coming but the heartbeat Ping got no Pong.
NO_HEARTBEAT_ANSWER = "no answer to the heartbeat Ping, though the broker kept sending: it does not hear us (dead link)"

__all__ = [
    "ClientSession",
    "SessionState",
    "ClientConfig",
    "ClientStatistics",
    "Sent",
    "MessageReceived",
    "MessageAmended",
    "ReadStateChanged",
    "ReceiptReceived",
    "Connected",
    "Disconnected",
    "SendsStalled",
    "SendsResumed",
    "BrokerRefused",
    "TypingChanged",
    "PresenceChanged",
    "PrivacyChanged",
    "PresenceCompleted",
    "PrivacyCompleted",
    "Event",
    "SendCompleted",
    "HistoryCompleted",
    "ReadersCompleted",
    "ConversationsCompleted",
    "ConversationSetCompleted",
    "ConversationUpdated",
    "ConversationPurged",
    "Completion",
    "ClientError",
    "SendError",
    "SendTimeout",
    "HistoryTimeout",
    "AuthFailed",
    "ClientClosed",
    "ConnectFailed",
    "FINAL_CODES",
    "TRANSIENT_CODES",
]

log = logging.getLogger("pimcore.client")

#: Refusals a retry cannot fix: the send completes with SendError at once.
FINAL_CODES = frozenset(
    {
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNKNOWN_CONVERSATION,
        ErrorCode.NOT_MEMBER,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.DUPLICATE_CONFLICT,
        ErrorCode.REJECTED,
        ErrorCode.NO_SUCH_MESSAGE,
        ErrorCode.NOT_SENDER,
        ErrorCode.TOO_LATE,
        ErrorCode.RECALLED,
        ErrorCode.BAD_ACTION,
        ErrorCode.TOO_MANY_MENTIONS,
        ErrorCode.BAD_MENTION,
        ErrorCode.PURGED,
    }
)
#: Refusals that mean "slow down, then retry with the same local id".  Any
#: non-zero code that is not final counts as transient (an unknown code is
#: read as INTERNAL, which the spec says to retry).
TRANSIENT_CODES = frozenset({ErrorCode.TOO_MANY_IN_FLIGHT, ErrorCode.RATE_LIMITED, ErrorCode.STORE_UNAVAILABLE, ErrorCode.INTERNAL})


# ---------------------------------------------------------------- errors


def _payload_bytes(payload: Any) -> bytes:
    """``payload`` as bytes: a bytes-like object only.  Raises EncodeError
    for anything else -- text is not encoded for the caller, and an int is
    no length (``bytes(5)`` would be five zero bytes)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise EncodeError(f"payload must be bytes (bytes, bytearray or memoryview), not {type(payload).__name__}"
                      + ("; encode text first, e.g. text.encode()" if isinstance(payload, str) else ""))


def _check_seq(seq: object) -> None:
    """A message's seq: an int in 1..2**64-1 (TypeError / ValueError)."""
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise TypeError(f"seq must be an int, not {type(seq).__name__}")
    if not 1 <= seq < 1 << 64:
        raise ValueError(f"seq must be in 1..2**64-1, not {seq}")


#: Why a connection ended when no LoginAck came within connect_timeout.
LOGIN_TIMED_OUT = "timed out: no LoginAck within connect_timeout"
#: How a Disconnected's reason begins when the broker's bytes could not be decoded.
MALFORMED = "malformed data from the broker"


class ClientError(PimError):
    """Base class of the SDK's errors."""


class SendError(ClientError):
    """The broker refused the message for good (``code`` says why;
    ``reason``: the broker's words, e.g. a content filter's, or "").

    Also what a refused request other than a send raises -- a history or
    readers read, conversation settings, a presence subscription: then
    ``local_id`` is 0 and the message names the request ("history of
    'team': NOT_MEMBER: ...").  One class for every refusal, so a single
    ``except SendError`` sees the broker's code wherever it answered no."""

    def __init__(self, code: ErrorCode, local_id: int, message: str = "", reason: str = "") -> None:
        super().__init__(message or f"send refused: {code.name}" + (f": {reason}" if reason else ""))
        self.code = code
        self.local_id = local_id
        self.reason = reason


#: What the broker's refusals by these codes mean, when it gave no reason of
#: its own (docs/PROTOCOL.md, error codes).
_CODE_WORDS = {
    ErrorCode.TOO_MANY_MENTIONS: "the message mentions more users than the broker takes (its max_mentions, 64 by default)",
    ErrorCode.BAD_MENTION: "a mentioned user id is not a valid user id",
    ErrorCode.TOO_LATE: "the time the broker allows for this after the message was sent has passed"
                        " (its recall_window or edit_window)",
}


def _refusal_reason(code: ErrorCode, conv: Optional[str], user: str) -> str:
    """Why the broker refused a request about ``conv`` by ``user`` with
    ``code``, in words, when it gave no reason of its own: the codes of the
    conversation and its membership (NOT_MEMBER, UNKNOWN_CONVERSATION,
    BAD_REQUEST), "" for the others (their own reason, or their name, says it)."""
    if code is ErrorCode.BAD_REQUEST:
        problem = conversation_problem(conv) if conv is not None else None
        if problem is not None:
            return f"invalid conversation id: {problem}"
        return "the broker found a field of the request invalid"
    if code in _CODE_WORDS:  # (a trial: these came back as the bare code name)
        return _CODE_WORDS[code]
    if code is ErrorCode.PURGED and conv is not None:
        return (f"group {_show(conv)} was purged after this message was written: it answers deleted history"
                " and was not stored (the group may have been created again with other members)")
    if conv is None or code not in (ErrorCode.NOT_MEMBER, ErrorCode.UNKNOWN_CONVERSATION):
        return ""
    pair = direct_members(conv) if isinstance(conv, str) else None
    if code is ErrorCode.UNKNOWN_CONVERSATION:
        return f"{'conversation' if pair else 'group'} {_show(conv)} does not exist"
    if pair is not None:
        return f"{user} is not one of the two users of the 1:1 conversation {_show(conv)} ({pair[0]} and {pair[1]})"
    return f"{user} is not a member of group {_show(conv)}"


class SendTimeout(ClientError):
    """No SendAck within the send deadline.  The message may or may not be
    stored: ``send(..., local_id=err.local_id)`` finds out without risk."""

    def __init__(self, local_id: int) -> None:
        super().__init__(f"no SendAck for local id {local_id} within the send timeout")
        self.local_id = local_id


class HistoryTimeout(ClientError):
    """No HistoryResp within the request's deadline (asked again on every
    connection meanwhile).  The trio driver raises it as ``trio.TooSlowError``."""

    def __init__(self, req_id: int, conv: str) -> None:
        super().__init__(f"no HistoryResp for request {req_id} ({conv!r}) within the timeout")
        self.req_id = req_id
        self.conv = conv


class AuthFailed(ClientError):
    """The broker refused the token; the client stops reconnecting."""


class ConnectFailed(ClientError):
    """The first connection could not be established -- or a later one
    cannot be: a token function's new token too large for any Login (the
    client stops, as the broker would refuse every attempt).

    ``wrong_port`` is True when the answer says the URL is the wrong kind
    of port or path: another service's port, pimcore's HTTP API, a TLS port
    given a plain URL or a plain port given a TLS one, a WebSocket path the
    listener does not serve.  The same URL then fails the same way (fix
    the URL); False for what may work later (a refused or silent port, an
    unknown host) and for other failures."""

    def __init__(self, message: str = "", *, wrong_port: bool = False) -> None:
        super().__init__(message)
        self.wrong_port = wrong_port


class ClientClosed(ClientError):
    """The client was closed (or stopped for good) while waiting.  For a
    send still pending then, ``local_id`` is its local id (None otherwise):
    the message may have been stored; a new client finds out without risk
    with ``send(..., local_id=err.local_id)``, as after SendTimeout."""

    def __init__(self, message: str = "", local_id: Optional[int] = None) -> None:
        super().__init__(message)
        self.local_id = local_id


# ---------------------------------------------------------------- results & events


@dataclass(frozen=True, slots=True)
class Sent:
    """A durable send: what the broker's SendAck said."""

    local_id: int
    conv: str
    msg_id: bytes
    seq: int
    server_time: int  # µs, the broker's clock
    client_time: int  # µs, the calibrated stamp this client gave the message


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: F.Message


#: The kinds of entries that change an earlier message (AmendReq).
#: The widest epoch a Login carries: a pimcore broker's LoginAck.epoch is
#: 16 bytes (pimcore.store.Store.epoch).
EPOCH_BYTES = 16
_U64_MAX = (1 << 64) - 1

AMEND_KINDS = frozenset((F.MessageKind.RECALL, F.MessageKind.EDIT, F.MessageKind.DELETE))


def _not_behind(held: Optional[F.Message], m: F.Message) -> F.Message:
    """``m`` -- a copy of a message from a list entry's ``last`` or a
    history page -- as this device may hold it, given the copy it ``held``:
    never behind it.  A deletion for oneself and a recall are final, and an
    edit is newer by its server time (``edited``); an answer read before an
    amend committed can arrive after the amend's push, and a list entry's
    ``last`` once carried a message deleted for oneself undeleted, with its
    text (a new user's trial: it came back on every device at the next
    mark_read).  Both flags stay set once set (a held copy deleted and then
    recalled is both); the payload is the held one's when the held copy is
    further along.  Other fields are ``m``'s (a list entry's position 0)."""
    if held is None or held.seq != m.seq or held.msg_id != m.msg_id or m.kind != F.MessageKind.MESSAGE:
        return m
    deleted, recalled = held.deleted or m.deleted, held.recalled or m.recalled
    if deleted or recalled:
        if (deleted, recalled, m.payload) == (m.deleted, m.recalled, b""):
            return m
        return dataclasses.replace(m, payload=b"", deleted=deleted, recalled=recalled, edited=max(held.edited, m.edited))
    if held.edited > m.edited:
        return dataclasses.replace(m, payload=held.payload, edited=held.edited)
    return m


@dataclass(frozen=True, slots=True)
class MessageAmended:
    """A message was recalled, edited or deleted for this user (``entry``:
    the pushed RECALL / EDIT / DELETE entry, ``entry.target`` the seq of the
    message).  ``message`` is that message as this device now holds it
    (``recalled`` with no payload, the new payload with ``edited``, or
    ``deleted``), None when the device does not hold it (fetch history
    for it: the broker returns the current state)."""

    entry: F.Message
    message: Optional[F.Message]


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
    rtt: int  # µs, best calibration round trip (-1: no sample yet)


@dataclass(frozen=True, slots=True)
class Disconnected:
    code: Optional[CloseCode]  # the broker's Close code, None if the link just broke
    reason: str


@dataclass(frozen=True, slots=True)
class Resynced:
    """The broker did not recognise this device's cursor (LoginAck.resync):
    its store has another history (``epoch`` differs from ``old_epoch``: an
    empty or restored store, a power cut under ``durability os``) or it has
    less than the cursor claimed.  The session dropped every cursor it held
    -- inbox position, seqs, read markers, the local views -- and delivery
    restarts at ``position`` of the new history, so every message of that
    history comes again.  Comes before the Connected of that login.  An app
    that keeps messages should drop or re-key what it stored under the old
    epoch (seqs and positions there mean nothing now)."""

    old_epoch: bytes
    epoch: bytes
    position: int



@dataclass(frozen=True, slots=True)
class SendsStalled:
    """The broker refuses sends for a failure on its side: ``code`` is
    STORE_UNAVAILABLE (its store cannot commit: the disk is full, the
    database is down) or INTERNAL.  Once per episode, at the first such
    refusal.  Nothing is lost: the SDK keeps retrying with the same local
    ids (backing off up to ``backoff_max``) and each ``send()`` keeps
    waiting, until it is stored (then :class:`SendsResumed`) or its
    ``send_timeout`` ends it."""

    code: ErrorCode
    pending: int  # sends waiting for their SendAck at that moment
    since: int  # µs, device clock: when the first send was refused


@dataclass(frozen=True, slots=True)
class SendsResumed:
    """The first send stored after :class:`SendsStalled`: the episode is over."""

    since: int  # µs, device clock: the episode's SendsStalled.since
    pending: int  # sends still waiting for their SendAck


@dataclass(frozen=True, slots=True)
class ConversationPurged:
    """The host purged ``conv``: its messages up to ``last_seq`` are
    deleted (the session dropped them from :meth:`ClientSession.view`); an
    app that stores messages deletes its copies.  ``gone``: the
    conversation no longer exists (a group: its read state and list entry
    are dropped too; requests about it get UNKNOWN_CONVERSATION; if the
    host creates it again, its seqs continue after ``last_seq``).  A 1:1
    chat stays (``gone`` false; its list entry stays, without the purged
    message), and so does a group created again (``gone`` false, told at a
    login).  Told while online (ConvPurged); at a login for each
    conversation of the user's list purged since this session last heard
    of it (the broker repeats every purge point at every login; the
    session emits each once, and again after an app restart: deleting up
    to ``last_seq`` again changes nothing); and at the login after a purge
    that took the conversation out of the user's list (``last_seq`` is
    then the last seq the device knew)."""

    conv: str
    last_seq: int
    gone: bool


@dataclass(frozen=True, slots=True)
class ConversationUpdated:
    """An entry of the user's conversation list changed on the broker: a
    device of the user changed its settings (pinned, muted, hidden), or the
    read marker moved (unread and mention counts).  A new message changes
    the entry too, but that comes as its :class:`MessageReceived`
    (:attr:`ClientSession.conversations` follows both).  ``entry`` is the
    broker's as this device holds it now: its ``last`` never behind the
    copy the view holds (a deletion for oneself, a recall, a newer edit),
    nor older than a message a push already brought."""

    entry: F.ConvEntry


@dataclass(frozen=True, slots=True)
class TypingChanged:
    """``user`` started (``active``) or stopped typing in ``conv``.  A
    started indicator ends by itself at ``expires`` (µs, device clock)
    unless refreshed, or at a message from ``user`` in ``conv``: the session
    then emits TypingChanged(active=False, expires=0) itself (before that
    MessageReceived), so an app only follows these events (or asks
    :meth:`ClientSession.typing_users`)."""

    conv: str
    user: str
    active: bool
    expires: int


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """The presence of a subscribed user (the answer to a subscription,
    then every change): ``state`` a frames.PresenceState (UNKNOWN: not
    visible to this user -- no shared conversation -- or this client is
    disconnected and cannot know), ``last_seen`` µs of the broker's clock,
    0 when online, hidden by the user, or unknown."""

    user: str
    state: F.PresenceState
    last_seen: int


@dataclass(frozen=True, slots=True)
class PrivacyChanged:
    """This user's "hide my last-seen time" setting, as the broker has it
    (the answer to :meth:`ClientSession.set_presence_privacy`, or a change
    made on another device)."""

    hide_last_seen: bool


@dataclass(frozen=True, slots=True)
class BrokerRefused:
    """The broker refused a request the SDK cannot tie to a call: its Error
    frame names no request (``ref`` 0, or an id no longer waited for).  A
    ``Read`` carries no request id, so this is how a refused
    :meth:`ClientSession.mark_read` reaches the application: ``code`` the
    broker's ErrorCode (NOT_MEMBER, UNKNOWN_CONVERSATION for a group this
    user is not in or that does not exist, STORE_UNAVAILABLE when the marker
    could not be saved), ``reason`` the broker's words (they name the
    conversation).  A refused Typing (NOT_MEMBER) or PresencePrivacy comes
    the same way.  TYPING_NOT_RELAYED is not reported (expected in large
    groups)."""

    code: ErrorCode
    ref: int
    reason: str


Event = Union[
    MessageReceived, MessageAmended, ReadStateChanged, ReceiptReceived, Connected, Disconnected, SendsStalled, SendsResumed, Resynced,
    TypingChanged, PresenceChanged, PrivacyChanged,
    ConversationUpdated, ConversationPurged, BrokerRefused,
]


@dataclass(frozen=True, slots=True)
class SendCompleted:
    """A send finished: exactly one of ``result`` and ``error`` is set
    (SendError, SendTimeout, AuthFailed or ClientClosed)."""

    local_id: int
    result: Optional[Sent]
    error: Optional[ClientError]


@dataclass(frozen=True, slots=True)
class HistoryCompleted:
    """A history request finished: ``messages`` on success, else ``error``
    (SendError with the broker's code, HistoryTimeout, AuthFailed, ClientClosed)."""

    req_id: int
    messages: tuple[F.Message, ...]
    error: Optional[ClientError]
    #: HistoryResp.more: the page stopped before the end (at the limit, or
    #: cut short to fit one frame -- then it holds fewer than asked).
    more: bool = False


@dataclass(frozen=True, slots=True)
class ReadersCompleted:
    """A readers request (:meth:`ClientSession.request_readers`) finished:
    ``readers`` -- every current member's read marker, sorted by user -- on
    success, else ``error`` (as for :class:`HistoryCompleted`; NOT_MEMBER
    for a user who is not a member now)."""

    req_id: int
    readers: tuple[F.Reader, ...]
    error: Optional[ClientError]


@dataclass(frozen=True, slots=True)
class ConversationsCompleted:
    """A conversation-list request (:meth:`ClientSession.list_conversations`)
    finished: a page of ``entries`` (pinned first, then newest activity
    first), ``cursor`` for the next page and ``more``; else ``error``
    (SendError BAD_CURSOR for a cursor the broker did not give, as for
    :class:`HistoryCompleted` otherwise)."""

    req_id: int
    entries: tuple[F.ConvEntry, ...]
    cursor: bytes
    more: bool
    error: Optional[ClientError]


@dataclass(frozen=True, slots=True)
class PresenceCompleted:
    """A presence subscription (:meth:`ClientSession.subscribe_presence`)
    was answered: the state of every user asked for, in order, or ``error``
    (SendError with PRESENCE_LIMIT, STORE_UNAVAILABLE; ClientClosed).  Only
    the newest subscription completes; an older one still unanswered
    completes with the newer one's answer."""

    req_id: int
    entries: tuple[F.PresenceEntry, ...]
    error: Optional[ClientError]


@dataclass(frozen=True, slots=True)
class ConversationSetCompleted:
    """A settings change (:meth:`ClientSession.set_conversation`) is durable
    (``error`` None) or was refused (SendError NOT_MEMBER, ...; or
    HistoryTimeout, ClientClosed)."""

    req_id: int
    conv: str
    error: Optional[ClientError]


@dataclass(frozen=True, slots=True)
class PrivacyCompleted:
    """A :meth:`ClientSession.set_presence_privacy` was answered with the
    setting now in force."""

    req_id: int
    hide_last_seen: bool
    error: Optional[ClientError] = None


Completion = Union[
    SendCompleted, HistoryCompleted, ReadersCompleted, ConversationsCompleted, ConversationSetCompleted,
    PresenceCompleted, PrivacyCompleted,
]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    #: s: a calibration sample's deadline, and (capped at the heartbeat
    #: interval) how long a Ping waits for an answer.  Requests are never
    #: written twice on one connection (TCP delivers them; the broker answers
    #: each): they go again only on a new connection.
    ack_timeout: float = 5.0
    send_timeout: float = 60.0  # s before send() gives up with SendTimeout
    connect_timeout: float = 10.0  # s for connect + Login + LoginAck
    backoff_initial: float = 0.1  # s, first reconnect delay (then doubled, jittered)
    backoff_max: float = 10.0
    time_samples: int = 5  # calibration round trips at each login (the first with the Login, the rest once ACTIVE)
    ack_delay: float = 0.02  # s; PushAcks taken within this window go out as one
    dead_after: float = 3.0  # heartbeat periods without any frame = dead link
    #: Learn the longest heartbeat interval the network allows, up to the
    #: broker's (pimcore.heartbeat.HeartbeatTuner); False = always the broker's.
    adaptive_heartbeat: bool = True
    heartbeat_floor: float = 15.0  # s; the adaptive interval never goes below it
    compression: bool = True  # ask for compression at login (see compression_caps)
    #: The compression caps asked for when ``compression`` is on: by default
    #: deflate streams both ways (PROTOCOL.md 7.2) with zstd as the fallback
    #: for brokers that only know CAP_ZSTD.
    compression_caps: int = F.CAP_ZSTD | F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP
    max_frame: int = 1 << 20
    view_limit: int = 1000  # messages kept per conversation for view() (the newest by seq)
    event_limit: int = 10_000  # queued events before old read-state notifications are shed
    #: s; while the user keeps typing in a conversation, typing() sends at
    #: most one Typing per interval (the broker's indicator TTL, 6 s by
    #: default, must be longer; PROTOCOL.md "Typing and presence").
    typing_interval: float = 2.5


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of a client's counters (all ints; positions are inbox positions)."""

    connects: int  # LoginAcks received
    retransmits: int  # SendReqs sent again (after a reconnect or a refusal)
    duplicates_dropped: int  # re-pushed messages dropped by position
    events_dropped: int  # read-state notifications shed beyond event_limit
    acks_sent: int  # PushAcks sent
    frames_in: int  # frames decoded from the broker
    frames_out: int  # frames queued for the broker
    pending_sends: int  # sends without a final answer yet
    queued_events: int  # events the application has not taken
    taken_upto: int  # highest inbox position the application has taken
    in_flight: int  # SendReqs on the wire of the current connection, unanswered
    send_window: int  # SendReqs allowed on the wire now: min(LoginAck.window, the AIMD window)
    congestion_events: int = 0  # windows of transient refusals (each halved the window once)


class SessionState(enum.Enum):
    """Where the device's current connection is (see the module docstring)."""

    DISCONNECTED = "disconnected"  # no connection: the driver is dialling or backing off
    AWAITING_LOGIN_ACK = "awaiting_login_ack"  # Login sent
    CALIBRATING = "calibrating"  # LoginAck received; the first CalibrateReq (sent with the Login) unanswered
    ACTIVE = "active"  # sends, pushes, read state, history, heartbeats
    CLOSED = "closed"  # for good: close(), AUTH_FAILED, TOKEN_REVOKED, KICKED or REPLACED; see ``error``


_LIVE = (SessionState.AWAITING_LOGIN_ACK, SessionState.CALIBRATING, SessionState.ACTIVE)

#: Why an EOF ended the connection, by the state it ended in.
_EOF_REASON = {
    SessionState.AWAITING_LOGIN_ACK: "connection closed before LoginAck",
    SessionState.CALIBRATING: "connection closed during clock calibration",
    SessionState.ACTIVE: "connection closed by the broker",
}


#: Closes of a working session that ask for nothing but a new login: the
#: broker restarts (SHUTDOWN), an idle or expired session, a NORMAL close.
QUICK_RECONNECT_CLOSES = frozenset((CloseCode.SHUTDOWN, CloseCode.NORMAL, CloseCode.IDLE_TIMEOUT, CloseCode.TOKEN_EXPIRED))


class ReconnectBackoff:
    """How long to wait before dialling again after a connection ended
    (sans-IO: the driver sleeps).  The rule (docs/CLIENT.md, *Reconnect
    backoff*):

    - a connection that completed its login (reached ACTIVE) and then failed
      in transport (a reset, an EOF, a dead link: no Close from the broker)
      resets the backoff: the next dial waits ``backoff_initial`` (jittered);
    - a working session the broker closed with a code in
      QUICK_RECONNECT_CLOSES is redialled at once and resets the backoff --
      unless the dial before it was such an immediate redial too and this
      session lived less than ``backoff_max``: a broker that closes every
      login right away gets a growing delay, not a tight loop;
    - anything else is a failure and doubles the delay (up to
      ``backoff_max``): a dial, TLS or login that did not complete, and every
      other Close code -- OVERLOADED, RATE_LIMITED, INTERNAL... ask clients to
      wait, after a login too.

    Every delay but the immediate one is ``min(backoff_max, backoff_initial
    x 2^failures)`` times a uniform factor in [0.5, 1.5) (no thundering herd).
    """

    __slots__ = ("initial", "maximum", "failures", "_rng", "_quick")

    def __init__(self, initial: float, maximum: float, rng: random.Random) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0  # since the backoff was last reset
        self._rng = rng
        self._quick = False  # the last dial was an immediate redial after a clean close

    def delay(self, established: bool, code: Optional[CloseCode], lived: float) -> float:
        """Seconds to wait before the next dial, after a connection that
        reached ACTIVE (``established``) or not, ended by the broker's Close
        ``code`` (None: a transport failure or our own verdict), ``lived``
        seconds after the dial began."""
        if established and code in QUICK_RECONNECT_CLOSES:
            if not self._quick or lived >= self.maximum:
                self._quick = True
                self.failures = 0
                return 0.0
            self.failures = min(self.failures + 1, 30)  # closed again right after an immediate redial
        elif established and code is None:
            self._quick = False
            self.failures = 0
        else:
            self._quick = False
            self.failures = min(self.failures + 1, 30)
        return min(self.maximum, self.initial * 2 ** min(self.failures, 16)) * (0.5 + self._rng.random())


def _us(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


def _presence_state(state: int) -> F.PresenceState:
    """A decoded presence state (an int, 0-2 in PROTOCOL.md's PresenceEntry)
    as a member; a value this version does not know is UNKNOWN, as it was
    for the events already."""
    try:
        return F.PresenceState(state)
    except ValueError:
        return F.PresenceState.UNKNOWN


def _error_code(code: int) -> ErrorCode:
    # An unknown code from a newer broker: INTERNAL, i.e. "retry later".
    return ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL


def zstd_available() -> bool:
    return FrameCompressor is not None


class _Pending:
    """One send until its final answer.  ``raw`` is the encoded SendReq: the
    very same bytes go out on every attempt (same local id, same stamp)."""

    __slots__ = ("local_id", "conv", "payload", "client_time", "after_seq", "raw", "deadline", "sent_at", "attempts", "tx",
                 "reason", "target", "action", "mentions", "mention_all")

    def __init__(
        self, local_id: int, conv: str, payload: bytes, client_time: int, after_seq: int, raw: bytes, deadline: int,
        target: int = 0, action: int = 0, mentions: frozenset = frozenset(), mention_all: bool = False,
    ) -> None:
        self.mentions = mentions  # a SendReq's mentioned user ids (in any order: the same message)
        self.mention_all = mention_all
        self.target = target  # an AmendReq's: the seq it acts on (0: a SendReq)
        self.action = action  # an AmendReq's MessageKind (0: a SendReq)
        self.local_id = local_id
        self.conv = conv
        self.payload = payload
        self.client_time = client_time
        self.after_seq = after_seq
        self.raw = raw
        self.deadline = deadline  # session time (µs) of SendTimeout
        self.sent_at: Optional[int] = None  # session time of the last transmission; None = not on the wire
        self.attempts = 0
        self.tx = 0  # the session's transmission count at its last transmission (see _recover)
        self.reason = ""  # an Error frame's reason for this send (it comes just before a REJECTED SendAck)


class _HistoryRequest:
    """A HistoryReq or (``readers``) a ReadersReq: asked again on every
    connection until answered or timed out."""

    __slots__ = ("req_id", "conv", "raw", "deadline", "sent_at", "readers", "kind")

    def __init__(self, req_id: int, conv: str, raw: bytes, deadline: int, readers: bool = False, kind: str = "") -> None:
        self.req_id = req_id
        self.conv = conv
        self.raw = raw
        self.deadline = deadline
        self.sent_at: Optional[int] = None  # None = not asked on this connection yet
        self.readers = readers
        #: "" (history / readers), "convlist" (ConvListReq) or "convset" (ConvSetReq)
        self.kind = kind

    def failed(self, error: ClientError) -> "Completion":
        if self.kind == "convlist":
            return ConversationsCompleted(self.req_id, (), b"", False, error)
        if self.kind == "convset":
            return ConversationSetCompleted(self.req_id, self.conv, error)
        if self.readers:
            return ReadersCompleted(self.req_id, (), error)
        return HistoryCompleted(self.req_id, (), error)


class ClientSession:
    """One device of one user, sans-IO.  See the module docstring.

    Time: every ``now`` is µs of the device clock.  Message stamps, local ids
    and calibration use it as it is; timers run on a copy that never goes
    backwards (a backward step of the clock is absorbed instead of stalling
    every timer by the size of the step).  A forward step fires every timer
    it jumps over (pending sends time out, the link is declared dead), so a
    driver should pass a clock that is not stepped while it runs: the trio
    driver's default (:class:`pimcore.client.AnchoredClock`) is the wall
    clock at the start plus monotonic time.

    Methods raise the terminal error (:class:`AuthFailed`,
    :class:`ClientClosed`) once the session is CLOSED, and
    :class:`~pimcore.errors.EncodeError` for arguments no frame can carry
    (checked before any state changes).  Bytes from the broker never raise:
    malformed input ends the connection (see :meth:`receive_data`).
    """

    def __init__(
        self,
        device: str,
        config: ClientConfig = ClientConfig(),
        *,
        seed: Optional[int] = None,
        position: int = 0,
        epoch: bytes = b"",
        sent: int = 0,
    ) -> None:
        """``position``, ``epoch`` and ``sent``: where an earlier run of this
        device stopped (``taken_upto``, ``epoch`` and ``sent_upto`` saved by
        the app), so a restarted app resumes instead of taking its whole
        inbox again.  Raises ValueError for a position or sent outside
        0..2**64-1 (inbox positions, PROTOCOL.md's ``u``), or a non-bytes
        epoch."""
        for name, value in (("position", position), ("sent", sent)):
            if type(value) is not int or not 0 <= value <= _U64_MAX:
                raise ValueError(f"{name} must be an int in 0..2**64-1 (an inbox position), not {value!r}")
        if not isinstance(epoch, bytes):
            raise ValueError(f"epoch must be bytes (LoginAck.epoch, as saved from client.epoch), not {type(epoch).__name__}")
        if epoch and len(epoch) != EPOCH_BYTES:
            # (The broker knows no such epoch: the login would resync the
            # device, every message of its inbox again.)
            raise ValueError(f"epoch must be {EPOCH_BYTES} bytes (LoginAck.epoch, as saved from client.epoch) "
                             f"or empty (a fresh install), not {len(epoch)} bytes")
        self.device = device
        self.config = config
        self._rng = random.Random(seed)
        self._caps = (config.compression_caps & _COMPRESSION_CAPS if config.compression and zstd_available() else 0) | _ALWAYS_CAPS
        self._ack_timeout = _us(config.ack_timeout)
        self._send_timeout = _us(config.send_timeout)
        self._connect_timeout = _us(config.connect_timeout)
        self._ack_delay = _us(config.ack_delay)

        self._state = SessionState.DISCONNECTED
        self.error: Optional[ClientError] = None  # why the session is CLOSED
        self.last_disconnect: Optional[Disconnected] = None  # why the last connection ended
        self.user = ""

        # -- time: _t is session time (device clock + _skew, never backwards)
        self._t = -(1 << 63)
        self._skew = 0
        self._raw_now = 0  # the device clock as last passed in
        self._offset = 0  # µs: broker clock - device clock, from the best calibration sample
        self._rtt = -1
        self._last_stamp = 0
        self._last_local_id = 0
        self._local_id_base = 0  # the clock at this run's first auto local id (_new_local_id)

        # -- the current connection (reset by connection_made)
        self._decoder: Optional[Decoder] = None
        self._out: list[bytes] = []  # encoded frames for data_to_send()
        self._compress: Optional[object] = None  # FrameCompressor.compress once zstd is active
        self._zstd: Optional[tuple[Any, Any]] = None  # made once, shared by all connections
        self._window = 1  # LoginAck.window
        self._heartbeat = 0  # µs, LoginAck.heartbeat_ms; 0 = none
        self._last_sent = 0
        self._last_recv = 0
        # The last frame that answered something we sent (_ANSWERS): the last
        # proof that the broker hears us.
        self._last_heard = 0
        # The outstanding Ping's send time on the broker's clock, and when the
        # last push that may be queued ahead of its Pong arrived (session µs;
        # 0: none since the Ping).  See _pong_deadline.
        self._ping_server = 0
        self._backlog_at = 0
        self._login_deadline = 0
        self._login_ack: Optional[F.LoginAck] = None
        # The broker's size limits (LoginAck.max_frame / max_payload) as of the
        # last login; before the first one the protocol's default frame size.
        # A SendReq/AmendReq above them is refused here: sent, it would make
        # the broker close the connection (FRAME_TOO_LARGE) and, resent at
        # every reconnect, stall everything queued behind it.
        self._max_frame = DEFAULT_MAX_FRAME_SIZE
        self._max_frame_announced = False  # a LoginAck announced _max_frame
        self._max_payload = 0  # 0 = not announced
        self._cal_t0 = 0  # device clock of the outstanding CalibrateReq (its echo key)
        self._cal_deadline = 0
        self._samples: list[tuple[int, int]] = []  # (rtt, offset) of this login's samples
        self._cal_adopted = False  # the estimate in use is one of this login's samples
        self._bg_cal = False  # ACTIVE and still taking calibration samples
        self._held: list[object] = []  # frames that arrived during calibration
        self._ping_nonce = 0
        # The outstanding heartbeat Ping: when it went out (session time) and
        # after how much silence; None when none is waiting for its Pong.
        self._ping_at: Optional[int] = None
        self._ping_idle = 0
        self._hb_ceiling = 0  # µs, LoginAck.heartbeat_ms: the broker's interval
        self._tuner = HeartbeatTuner(max(1, _us(config.heartbeat_floor))) if config.adaptive_heartbeat else None
        self._established = 0  # connections that reached ACTIVE

        # -- upstream
        self._pending: dict[int, _Pending] = {}
        # local id -> (conv, client_time, after_seq) of a send that timed out:
        # its retry (same local id) carries the same SendReq.  The newest 1000.
        self._expired: dict[int, tuple[str, int, int]] = {}
        # Not on the wire yet, in local-id (= send) order; may hold finished
        # entries, skipped lazily (a dict lookup is cheaper than deque.remove).
        self._queue: deque[_Pending] = deque()
        # On the wire of this connection (each written once), oldest
        # transmission first.
        self._inflight: dict[int, _Pending] = {}
        self._timeouts: list[tuple[int, int]] = []  # heap of (deadline, local id); stale entries skipped
        self._hold_until = 0  # session time before which nothing new is sent (the broker asked to slow down)
        self._refusals = 0  # congestion events since the last answered send (backoff exponent)
        # Congestion window: sends on the wire at once, <= LoginAck.window.
        # Halved once per congestion event, +1 per answered send (AIMD), and
        # kept across reconnects so a rate-limited client does not burst again.
        # A link lost with sends on it restarts it at LOSS_WINDOW (TCP's
        # retransmission timeout, RFC 5681 section 3.1) with _ssthresh at
        # half the sends that were on the wire: +1 per answer below _ssthresh
        # (slow start: doubled per round trip), +1/_cwnd at or above it
        # (congestion avoidance: +1 per window of answers, RFC 5681 eq. 3).
        self._cwnd = float(1 << 16)
        self._ssthresh = float("inf")  # no loss yet: slow start up to LoginAck.window
        # Congestion events, TCP's way: a window's refusals all answer the
        # same burst, so they are ONE event (one halving, one hold), as TCP
        # reduces its window once per round trip however many segments of it
        # were lost (RFC 5681 section 3.2, RFC 6582's "recover" point: the
        # "once per RTT" rule).  Every SendReq written gets the next _tx;
        # at an event _recover = _tx, and a refusal of a transmission at or
        # before _recover belongs to the event already being handled.
        self._tx = 0
        self._recover = 0
        self._episode_at = 0  # session time of the current congestion event
        self._episode_backoff = 0  # µs, the jittered backoff drawn at that event
        # The broker's acceptance rate, learned from its refusals (it does not
        # announce its send_rate): sends answered between two congestion
        # events / the time between them -- between two moments its token
        # bucket was empty, what it took is what it refilled.
        self._answers = 0  # sends answered (OK or final): the broker took them
        self._rate_mark = (0, 0)  # (session time, _answers) where the current sample began
        self._rate = 0.0  # answers per µs; 0 = no sample yet
        self._congestion_events = 0
        self._stalled: Optional[SendsStalled] = None  # the open STORE_UNAVAILABLE/INTERNAL episode
        self._completions: list[Completion] = []

        # -- downstream: (event, inbox position the app has processed once it took it)
        self._events: deque[tuple[Optional[Event], int]] = deque()
        # The highest inbox position queued with an event (0: none since the
        # last resync): what the app has yet to take, when above taken_upto.
        self._queued_ack = 0
        self._taken_upto = position  # highest position the app has taken (what we ack)
        self._enqueued_upto = position
        # The history our positions and seqs belong to (LoginAck.epoch).
        self._epoch = bytes(epoch)
        # The highest inbox position of this device's own sends the broker
        # told (the positions a Push covers without carrying them): Login.sent.
        # Why: what the app took (taken_upto) stops below them while messages
        # wait in the event queue, and a store restored from a hot copy must
        # still see that they are gone (PROTOCOL.md, "Epochs").
        self._sent_upto = sent
        # conv -> highest seq this device has seen (pushed, fetched, or acked
        # for its own sends): SendReq.after_seq, the causal floor of display.
        self._seen_seq: dict[str, int] = {}
        self._acked_upto = 0  # highest PushAck sent on (or LoginAck.position of) this connection
        self._ack_at: Optional[int] = None  # session time the batched PushAck is due

        # -- read state, view, history
        self.read_states: dict[str, F.ReadState] = {}
        self.receipts: dict[tuple[str, str], int] = {}  # (conv, reader) -> seq
        self._read_wanted: dict[str, int] = {}  # markers sent but not yet confirmed
        # conv -> the highest seq read_states[conv].unread accounts for (the
        # broker's last ReadState of it, and the messages pushed since), and
        # the same for the conversation list entry's unread and mention
        # counts (its last page or ConvUpdate, the pushes since).  Kept apart
        # from the last seq shown: an own send raises that (its SendAck),
        # and the Push of others' messages stored just before it, with lower
        # seqs, may come after -- counted only past the shown last seq, they
        # were never counted (a new user's trial).
        self._rs_counted: dict[str, int] = {}
        self._entry_counted: dict[str, int] = {}
        # The login's read states still to come (LoginAck.states), the
        # conversations held before it, and those its read states named.
        self._login_states = 0
        self._login_prior: set[str] = set()
        self._login_seen: set[str] = set()
        #: conv -> the purge point last emitted (ConversationPurged once each).
        self._purge_told: dict[str, int] = {}
        self._views: dict[str, dict[bytes, F.Message]] = {}
        # Per conversation, (seq, msg_id) of every message put in its view,
        # a min-heap: dropping the lowest seq once the view is full is
        # O(log n) (a scan of the view per message taken made a catch-up of
        # 50,000 messages spend most of its CPU there).  Entries whose
        # message left the view are skipped when they come up (_remember).
        self._view_heaps: dict[str, list[tuple[int, bytes]]] = {}
        # Per conversation, seq -> msg_id of each message (kind MESSAGE) in
        # its view: a recall, edit or delete finds its target by seq
        # (a scan of the view per entry made a burst of 1,000 edits against
        # a full view cost 24 µs each: bench/bench_sdk_amend.py).
        self._view_seqs: dict[str, dict[int, bytes]] = {}
        self._history: dict[int, _HistoryRequest] = {}
        self._next_req = 1
        #: conv -> the conversation-list entry as last known: from
        #: list_conversations pages and ConvUpdates, kept current by pushes
        #: (last message, unread and mention counts, un-hiding; an amend of
        #: ``last``, the user's own delete for themselves included) and read
        #: states (marker, counts -- never ``last_seq``: the entry's is the
        #: seq of ``last``, a ReadState's the conversation's last seq).
        #: ``last`` is never behind the copy the view holds (_not_behind).
        #: Only conversations some page or update brought are here.
        self.conversations: dict[str, F.ConvEntry] = {}

        # -- typing and presence (ephemeral: nothing of it is saved)
        self._typing_sent: dict[str, int] = {}  # conv -> session time of the last active Typing sent
        self._typing_seen: dict[tuple[str, str], int] = {}  # (conv, user) -> session time the indicator expires
        self._presence_wanted: Optional[tuple[int, tuple[str, ...]]] = None  # (req id, users): re-sent after reconnects
        self._presence_waiting: list[int] = []  # req ids of subscriptions not answered yet
        self._presence_users: tuple[str, ...] = ()  # the users of the subscription the broker accepted last
        self.presence: dict[str, F.PresenceEntry] = {}  # user -> latest state of the subscribed users (UNKNOWN while disconnected)
        self._privacy_waiting: dict[int, int] = {}  # req id -> mode asked (0 ask, 1 show, 2 hide), not answered yet
        self.hide_last_seen: Optional[bool] = None  # this user's setting, once the broker told it

        self._stats = {"connects": 0, "retransmits": 0, "duplicates_dropped": 0, "events_dropped": 0, "acks_sent": 0, "frames_in": 0, "frames_out": 0}

    # ------------------------------------------------------------ queries

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def connection_open(self) -> bool:
        """True from connection_made until the connection ended (by either side)."""
        return self._state in _LIVE

    @property
    def connections_established(self) -> int:
        """How many connections reached ACTIVE so far."""
        return self._established

    @property
    def clock_offset(self) -> int:
        """µs to add to the device clock to get the broker's (0 before calibration)."""
        return self._offset

    @property
    def rtt(self) -> int:
        """µs, the round trip of the calibration sample in use (-1: none yet)."""
        return self._rtt

    @property
    def send_window(self) -> int:
        """How many SendReqs may be on the wire now: min(LoginAck.window, AIMD window)."""
        return max(1, min(self._window, int(self._cwnd)))

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def server_now(self, now: int) -> int:
        """The broker's clock (µs) estimated from the device clock ``now``."""
        return now + self._offset

    def read_state(self, conv: str) -> F.ReadState:
        """The user's read state of ``conv`` as this device knows it (all 0
        when it knows none).  Raises TypeError for a ``conv`` that is no
        str."""
        st = self.read_states.get(conv) if type(conv) is str else None
        if st is None:
            _check_conv_type(conv)
            st = F.ReadState(conv, 0, 0, 0)
        return st

    def unread(self, conv: str) -> int:
        return self.read_state(conv).unread

    def receipt(self, conv: str, reader: str) -> int:
        """How far ``reader`` has read ``conv`` (1:1 read receipt), 0 if unknown."""
        return self.receipts.get((conv, reader), 0)

    def view(self, conv: str) -> list[F.Message]:
        """The messages of ``conv`` this device has (sent, received, fetched),
        in display order: one sender's by their local time, senders
        interleaved by server time -- the same on every device.  At most
        ``view_limit``, the newest by seq.  Raises TypeError for a ``conv``
        that is no str."""
        _check_conv_type(conv)
        return display_order(list(self._views.get(conv, {}).values()))

    def statistics(self) -> ClientStatistics:
        s = self._stats
        return ClientStatistics(
            connects=s["connects"],
            retransmits=s["retransmits"],
            duplicates_dropped=s["duplicates_dropped"],
            events_dropped=s["events_dropped"],
            acks_sent=s["acks_sent"],
            frames_in=s["frames_in"],
            frames_out=s["frames_out"],
            pending_sends=len(self._pending),
            queued_events=len(self._events),
            taken_upto=self._taken_upto,
            in_flight=len(self._inflight),
            send_window=self.send_window,
            congestion_events=self._congestion_events,
        )

    # ------------------------------------------------------------ time

    def _tick(self, now: int) -> int:
        """Session time for device time ``now``: never backwards."""
        self._raw_now = now
        t = now + self._skew
        if t < self._t:
            # The device clock stepped back (NTP, the user).  Shift the
            # timeline so session time continues where it was: deadlines
            # already set keep their distance instead of moving away by the
            # size of the step.
            self._skew += self._t - t
            t = self._t
        self._t = t
        return t

    def _stamp(self, now: int) -> int:
        # Calibrated, and never backwards within this device: one sender's
        # messages are displayed in the order of these stamps.
        t = max(self._last_stamp + 1, now + self._offset)
        self._last_stamp = t
        return t

    def _new_local_id(self, now: int) -> int:
        # Consecutive within this run, from the clock at its first send: a
        # burst's sends are then one dedupe record per batch in the store
        # (pimcore/store/lmdb.py, "Dedupe runs"; from the clock each time they
        # were increasing but never consecutive).  Unique per device across
        # restarts as long as the clock does not go back by more than the
        # time between the two runs' first sends less the earlier run's sends
        # (one µs each): ids lag the clock, so that is more room than the gap
        # between two runs the clock-each-time ids had.  An explicit local id
        # below the first never pulls them down (max).
        if not self._local_id_base:
            self._local_id_base = now
        lid = max(self._last_local_id + 1, self._local_id_base)
        if lid >= 1 << 64:
            # (After an explicit 2**64-1 every send failed with the codec's
            # "does not fit in 64 bits": a new user's trial.)
            raise EncodeError(f"no local id is left above the last one taken ({self._last_local_id}, 2**64-1):"
                              " give local_id")
        self._last_local_id = lid
        return lid

    def _check_open(self) -> None:
        if self._state is SessionState.CLOSED:
            assert self.error is not None
            raise self.error

    # ------------------------------------------------------------ connection lifecycle

    def login_frame_length(self, now: int, token: bytes, *, widest: bool = False) -> int:
        """The length of the Login :meth:`connection_made` would queue for
        ``token``, as the broker checks it against its max_frame (the bytes
        after the length prefix).  With ``widest``, of the largest Login
        this session will ever send for ``token``: after a login the Login
        also carries the epoch, the inbox position and the position of its
        own sends, here at their widest encodings (a 16-byte epoch, or this
        session's if longer; positions of 2**64 - 1)."""
        position, epoch, sent = self._enqueued_upto, self._epoch, self._login_sent()
        if widest:
            position, epoch, sent = _U64_MAX, bytes(max(len(epoch), EPOCH_BYTES)), _U64_MAX
        raw = encode_frame(F.Login(bytes(token), self.device, now, position, self._caps, epoch, sent))
        i = 0
        while raw[i] & 0x80:  # the length prefix is a LEB128 varint
            i += 1
        return len(raw) - i - 1

    def login_too_large(self, now: int, token: bytes) -> Optional[str]:
        """Why a Login for ``token`` could be over the frame limit, in
        words, or None if none can.  The largest Login this session will
        ever send for it counts (:meth:`login_frame_length` ``widest``: a
        reconnect's carries the epoch and the inbox position, a first one
        neither), so a token that fits on the first connection cannot fail
        on a later one.  The limit: the broker's ``max_frame`` from the last
        LoginAck, else ``ClientConfig.max_frame`` (the protocol's 1 MiB
        default unless raised for a broker that allows more) -- or,
        whichever is lower, the broker's pre-login limit
        (:data:`pimcore.protocol.PRE_LOGIN_MAX_FRAME`, 64 KiB: a frame before
        the Login is granted).  Sent, such a Login makes the broker close
        the connection (FRAME_TOO_LARGE), at every retry."""
        frame = self.login_frame_length(now, token, widest=True)
        if self._max_frame_announced:
            limit, whose = self._max_frame, f"the broker's max_frame ({self._max_frame:,} bytes)"
        else:
            limit = self.config.max_frame
            whose = f"max_frame ({limit:,} bytes; ClientConfig.max_frame, until a broker announces its own)"
        if PRE_LOGIN_MAX_FRAME < limit:
            limit = PRE_LOGIN_MAX_FRAME
            whose = f"the broker's pre-login limit ({limit:,} bytes: a frame before the Login is granted)"
        if frame <= limit:
            return None
        return (f"the token is {len(token):,} bytes: its Login frame ({frame:,} bytes at most: a reconnect's carries"
                f" the epoch and the inbox position) is over {whose}")

    def give_up(self, now: int, error: ClientError) -> None:
        """The driver stops for good, with ``error`` (a token function's
        token too large for any Login: the broker would close every
        attempt): CLOSED, every waiter gets ``error``.  Only between
        connections; a no-op if already CLOSED."""
        self._tick(now)
        if self._state is SessionState.CLOSED:
            return
        if self.connection_open:
            raise RuntimeError("give_up while a connection is open (call connection_lost first)")
        self._terminate(error)

    def connection_made(self, now: int, token: bytes) -> None:
        """A new byte stream to the broker is open: queue Login (token, this
        device, the inbox position the app has taken, the caps).  Starts the
        LoginAck deadline (``connect_timeout``).

        Raises RuntimeError if a connection is already open, the terminal
        error if CLOSED."""
        self._check_open()
        if self.connection_open:
            raise RuntimeError("connection_made while a connection is open (call connection_lost first)")
        t = self._tick(now)
        # Bytes queued for an earlier connection never go out on this one.
        self._out = []
        self._decoder = Decoder(self.config.max_frame)
        self._compress = None
        self._window = 1
        self._heartbeat = 0
        self._ping_at = None
        self._last_sent = self._last_recv = self._last_heard = t
        self._login_deadline = t + self._connect_timeout
        self._login_ack = None
        self._samples = []
        self._held = []
        self._ack_at = None
        for h in self._history.values():
            h.sent_at = None
        self._state = SessionState.AWAITING_LOGIN_ACK
        # The position this session holds (what the app has taken or has
        # queued to take), not only what it took: delivery resumes after it,
        # and the broker's check of a cursor against its store's history
        # (a store restored from a hot copy) is about everything held -- a
        # claim of what the app took alone was trusted, and the positions
        # held past it were then dropped as duplicates when new messages
        # had refilled them (a new user's trial).
        self._send(encode_frame(F.Login(bytes(token), self.device, now, self._enqueued_upto, self._caps, self._epoch,
                                        self._login_sent())))
        # The first calibration sample rides behind the Login (the broker
        # answers pipelined frames once the login is decided): its answer
        # arrives right behind the LoginAck, so the connection is ACTIVE --
        # and the pushes the broker sent after its LoginAck reach the app --
        # one round trip after the stream is up.  The other samples follow
        # in the background (_bg_cal).
        self._bg_cal = False
        self._cal_t0 = self._raw_now
        self._cal_deadline = self._login_deadline
        self._send(encode_frame(F.CalibrateReq(self._cal_t0)))

    def connection_lost(self, now: int, reason: Optional[str] = None) -> None:
        """The driver's stream failed or reached EOF.  Queued bytes are
        discarded; everything unanswered goes again on the next connection.
        Emits Disconnected(None, reason) (default: an EOF in this state),
        then a PresenceChanged for each subscribed user whose presence
        turns UNKNOWN (see _presence_unknown).  A no-op if no connection
        is open."""
        self._tick(now)
        if not self.connection_open:
            return
        self._end_connection(None, reason if reason is not None else _EOF_REASON[self._state])

    def _end_connection(self, code: Optional[CloseCode], reason: str, farewell: Optional[bytes] = None) -> None:
        """The current connection is over (either side decided).  Nothing on
        its wire is confirmed: the next connection re-queues every pending
        send in send order (see _establish), same local ids, first thing.

        Bytes not yet handed to the driver are dropped: after the broker's
        Close nothing more may be sent (PROTOCOL.md section 6), and a dead
        link would only swallow them.  ``farewell`` (our own Close, already
        encoded) is all that is left for the driver to write."""
        self._out = [farewell] if farewell is not None else []
        self._state = SessionState.DISCONNECTED
        self._bg_cal = False
        self._decoder = None
        self._compress = None
        self._held = []
        if self._inflight and code is None:
            # Lost (EOF, reset, dead link: not the broker's Close) with sends
            # unanswered on it: TCP's retransmission timeout (RFC 5681
            # section 3.1) -- ssthresh = max(FlightSize / 2, 2), the window
            # back to the loss window, then slow start.  Without it every
            # reconnect wrote the whole window again (256 SendReqs), to be
            # cut again on a link that drops every few KiB (35x the sends in
            # a trial).  Unanswered sends go again oldest first (the broker
            # wants a device's sends in local-id order, PROTOCOL.md section 6).
            # Nothing in flight (idle, or held offline): no sign of loss, the
            # window stays.
            self._ssthresh = max(len(self._inflight) / 2, 2.0)
            self._cwnd = min(self._cwnd, float(self._window), float(LOSS_WINDOW))
        self._inflight.clear()
        for p in self._pending.values():
            p.sent_at = None
        self._ack_at = None
        for h in self._history.values():
            h.sent_at = None
        d = Disconnected(code, reason)
        self.last_disconnect = d
        self._emit(d)
        self._presence_unknown()

    def close(self, now: int) -> None:
        """The application is done: flush the PushAck of what it took, queue
        Close(NORMAL) and become CLOSED.  Unfinished sends and history
        requests complete with ClientClosed; every presence entry turns
        UNKNOWN (last_seen kept, a PresenceChanged each).  The driver writes
        :meth:`data_to_send` and hangs up.  A no-op if already CLOSED."""
        self._tick(now)
        if self._state is SessionState.CLOSED:
            return
        if self._state is SessionState.ACTIVE and self._taken_upto > self._acked_upto:
            # Not pushed again next time.
            self._acked_upto = self._taken_upto
            self._stats["acks_sent"] += 1
            self._send(encode_frame(F.PushAck(self._taken_upto)))
        if self.connection_open:
            self._send(encode_frame(F.Close(CloseCode.NORMAL, "client closing")))
        self._terminate(ClientClosed("client closed"))

    def _terminate(self, error: ClientError) -> None:
        """CLOSED for good: every waiter gets ``error``."""
        self._state = SessionState.CLOSED
        self.error = error
        self._decoder = None
        for p in list(self._pending.values()):
            err = ClientClosed(str(error), p.local_id) if isinstance(error, ClientClosed) else error
            self._completions.append(SendCompleted(p.local_id, None, err))
        self._pending.clear()
        self._queue.clear()
        self._inflight.clear()
        self._timeouts.clear()
        for h in list(self._history.values()):
            self._completions.append(h.failed(error))
        self._history.clear()
        for req in self._presence_waiting:
            self._completions.append(PresenceCompleted(req, (), error))
        self._presence_waiting = []
        for req in self._privacy_waiting:
            self._completions.append(PrivacyCompleted(req, False, error))
        self._privacy_waiting.clear()
        # Nothing will tell this session of presence any more: as on a
        # dropped connection, no entry goes on claiming ONLINE or OFFLINE.
        self._presence_unknown()

    # ------------------------------------------------------------ bytes in / out

    def data_to_send(self) -> bytes:
        """Everything queued for the broker (b"" if nothing); the caller
        writes it, in order, on the current connection."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out = []
        return data

    def _send(self, raw: bytes) -> None:
        """Queue one encoded frame (compressed once zstd is active).  Dropped
        when no connection is open: whatever matters is sent again on the
        next one (unanswered sends, unconfirmed read markers, the ack)."""
        if not self.connection_open:
            return
        if self._compress is not None:
            raw = self._compress(raw)  # type: ignore[operator]
        self._out.append(raw)
        self._last_sent = self._t
        self._stats["frames_out"] += 1

    def receive_data(self, data: Union[bytes, bytearray, memoryview], now: int) -> None:
        """Bytes from the broker, split anywhere.  Frames are handled in
        order until the connection ends; bytes arriving when no connection is
        open are ignored.  Never raises for what the broker sent: malformed
        bytes (any :class:`~pimcore.errors.ProtocolError` of the decoder)
        queue Close(PROTOCOL_ERROR) and end the connection with
        Disconnected(None, "malformed data from the broker: ...")."""
        self._tick(now)
        if not self.connection_open or not data:
            return
        self._last_recv = self._t
        decoder = self._decoder
        assert decoder is not None
        try:
            decoder.feed(data)
            whole = 0
            while self.connection_open:
                frame = decoder.next_frame()
                if frame is None:
                    break
                whole += 1
                self._stats["frames_in"] += 1
                self._on_frame(frame)
            if not whole and self._ping_at is not None:
                # Bytes of a frame still arriving (one Push of 64 messages
                # can take longer than an interval on a slow way down): the
                # Pong may be behind it (_pong_deadline).
                self._backlog_at = self._t
        except ProtocolError as exc:
            if not self.connection_open:  # pragma: no cover - the loop stops first
                return
            # Framing is lost: nothing after this byte can be trusted.  Tell
            # the broker why (docs/PROTOCOL.md section 3) and start over on a
            # new connection, where the stream is in sync again.
            why = f"{exc.code.name}: {exc}"
            close = encode_frame(F.Close(CloseCode.PROTOCOL_ERROR, why[:200]))
            if self._compress is not None:
                close = self._compress(close)  # type: ignore[operator]
            self._stats["frames_out"] += 1
            self._end_connection(None, f"{MALFORMED}: {why}", farewell=close)

    # ------------------------------------------------------------ frames by state

    def _on_frame(self, f: object) -> None:
        t = type(f)
        if t in _ANSWERS:
            self._last_heard = self._t
        elif t is F.Push and self._ping_at is not None:
            msgs = f.messages  # type: ignore[attr-defined]
            if msgs and max(m.server_time for m in msgs) <= self._ping_server + self._pong_timeout():
                self._backlog_at = self._t
        if t is F.Close:
            self._on_close(f)  # type: ignore[arg-type]
        elif self._state is SessionState.ACTIVE:
            self._dispatch(f)
        elif self._state is SessionState.AWAITING_LOGIN_ACK:
            if t is F.LoginAck:
                self._on_login_ack(f)  # type: ignore[arg-type]
            elif t is F.Ping:
                self._send(encode_frame(F.Pong(f.nonce)))  # type: ignore[attr-defined]
            # Anything else before LoginAck: the broker sends nothing else
            # then; ignored rather than trusted.
        elif self._state is SessionState.CALIBRATING:
            if t is F.CalibrateResp and f.client_time == self._cal_t0:  # type: ignore[attr-defined]
                self._on_calibrate_resp(f)  # type: ignore[arg-type]
            else:
                # ReadStates, receipts, pushes already flow: held until
                # Connected is out, so the app sees Connected first.
                self._held.append(f)

    def _on_close(self, f: F.Close) -> None:
        code = CloseCode(f.code) if f.code in CloseCode._value2member_map_ else None
        self._end_connection(code, f.reason)
        if code is CloseCode.AUTH_FAILED or code is CloseCode.TOKEN_REVOKED:
            # A token the broker refused (or the host revoked) will not get
            # better by retrying: the app needs a new one, and a new client.
            self._terminate(AuthFailed(f.reason))
        elif code is CloseCode.KICKED:
            # The host ended this session on purpose: logging in again by
            # ourselves would undo that.
            self._terminate(ClientClosed(f"kicked by the host: {f.reason}"))
        elif code is CloseCode.REPLACED:
            # This device is live elsewhere: reconnecting would kick that one out.
            self._terminate(ClientClosed("this device logged in on another connection"))

    def _on_login_ack(self, ack: F.LoginAck) -> None:
        self.user = ack.user
        self._hb_ceiling = ack.heartbeat_ms * 1000
        self._heartbeat = self._tuner.interval(self._hb_ceiling) if self._tuner and self._hb_ceiling else self._hb_ceiling
        self._window = max(1, ack.window)
        granted = ack.caps & self._caps
        if granted:
            # Active from the frame after LoginAck (PROTOCOL.md 7), each
            # direction on its own: a deflate stream where its bit is granted
            # (new for every connection: streams never outlive one), else the
            # per-frame zstd contexts (shared by all connections).
            assert self._decoder is not None
            if granted & F.CAP_ZSTD and self._zstd is None:
                self._zstd = (FrameCompressor(), FrameDecompressor())
            if granted & F.CAP_DEFLATE_UP:
                # (The broker's max_frame: a frame deflated over it would be
                # refused, and the SDK's retry would send it again.)
                self._compress = DeflateCompressor(DEFLATE_WINDOW_BITS_UP, max_frame=ack.max_frame or None).compress
            elif granted & F.CAP_ZSTD:
                self._compress = self._zstd[0].compress  # type: ignore[index]
            if granted & F.CAP_DEFLATE_DOWN:
                self._decoder.enable_decompression(DeflateDecompressor(DEFLATE_WINDOW_BITS_DOWN))
            elif granted & F.CAP_ZSTD:
                self._decoder.enable_decompression(self._zstd[1])  # type: ignore[index]
        if ack.resync:
            self._resync(ack)
        self._epoch = ack.epoch
        # The login's read states (LoginAck.states entries, the first ones
        # from here on) cover every conversation of the user's list: once
        # they came, what this session held before of any other is dropped
        # (a group purged while the device was away: its unread count and
        # list entry stayed for good -- a new user's trial).
        self._login_states = ack.states
        self._login_prior = set(self.read_states) | set(self.conversations)
        self._login_seen = set()
        if not ack.states:
            self._drop_unlisted()  # (an empty list: none of them is left)
        # Resume: never re-queue what the app already has.  Past what it
        # holds (entries the broker counts as delivered: its own sends), the
        # position is taken in turn, after what is queued.
        if ack.position > self._enqueued_upto:
            self._enqueued_upto = ack.position
            # (Its own sends, or what it acked before the app saved its
            # cursor: positions it was told, checked as its sends are.)
            self._sent_upto = max(self._sent_upto, ack.position)
            self._take_in_turn(ack.position)
        self._acked_upto = ack.position
        self._login_ack = ack
        if ack.max_frame > 0:
            self._max_frame = ack.max_frame
            self._max_frame_announced = True
            if ack.max_frame >= 2 and self._decoder is not None:
                # Frames as large as the broker's own limit may come (it sizes
                # what it sends by that): accepted from here on, whatever
                # ClientConfig.max_frame says (a lower config would refuse a
                # Push at every reconnect).  Never lowered.
                self._decoder.raise_max_frame_size(ack.max_frame)
        self._max_payload = ack.max_payload
        self._stats["connects"] += 1
        self._state = SessionState.CALIBRATING
        self._samples = []
        self._cal_adopted = False
        # The sample sent with the Login is on its way (see connection_made).
        self._cal_deadline = self._t + self._ack_timeout

    def _login_sent(self) -> int:
        """Login.sent: the positions of our own sends past what the Login's
        position covers, else 0 (nothing more to check)."""
        return self._sent_upto if self._sent_upto > self._enqueued_upto else 0

    def _resync(self, ack: F.LoginAck) -> None:
        """The broker's history is not the one our cursors came from (see
        Resynced): forget every cursor, keep every pending send (they go
        again with the same local ids and are stored in the new history)."""
        old = self._epoch
        # Events already queued keep their content but lose their positions:
        # acking an old-history position here would be acking something this
        # broker never pushed.
        self._events = deque((ev, 0) for ev, _ in self._events if ev is not None)
        self._queued_ack = 0
        self._enqueued_upto = self._taken_upto = self._acked_upto = ack.position
        self._sent_upto = 0
        self._ack_at = None
        self._seen_seq.clear()
        self._read_wanted.clear()
        self.read_states.clear()
        self._rs_counted.clear()
        self._entry_counted.clear()
        self.receipts.clear()
        self._views.clear()
        self._view_heaps.clear()
        self._view_seqs.clear()
        self.conversations.clear()
        self._emit(Resynced(old, ack.epoch, ack.position))

    @property
    def epoch(self) -> bytes:
        """The history ``taken_upto`` belongs to (LoginAck.epoch; empty before
        the first login).  Save both to resume after an app restart."""
        return self._epoch

    @property
    def taken_upto(self) -> int:
        """The highest inbox position the app has taken (see epoch)."""
        return self._taken_upto

    @property
    def sent_upto(self) -> int:
        """The highest inbox position of this device's own sends the broker
        told it (in ``epoch``; 0 before any).  Save it with ``taken_upto``
        and ``epoch``: while messages wait in the event queue, what the app
        took stops below its sends, and the broker checks this position too
        when its store went back in time (a restored hot copy that lost
        them: the device is then resynchronized)."""
        return self._sent_upto

    def _ping_due(self) -> Optional[int]:
        """When the heartbeat Ping is due (session µs; None while one waits
        for its Pong): one interval after the last frame received -- a busy
        client that hears nothing still pings, so a dead link is found within
        two intervals -- or after the last frame sent, so the broker hears
        from an idle client every interval, or after the last answer to
        something we sent (_last_heard) -- pushes flowing in while the
        client only acks them prove nothing about the way up, so such a
        client pings once an interval; one whose requests get answered
        needs no Ping."""
        if self._ping_at is not None:
            return None  # the outstanding Ping decides (_pong_deadline)
        return min(self._last_recv, self._last_sent, self._last_heard) + self._heartbeat

    def _pong_timeout(self) -> int:
        """How long a heartbeat Ping may wait for its Pong while nothing at
        all arrives (µs): one interval at most (dead within two), and
        ack_timeout when that is less."""
        return min(self._heartbeat, self._ack_timeout)

    def _pong_deadline(self) -> Optional[int]:
        """When the outstanding heartbeat Ping is unanswered for good (session
        µs; None when no Ping is out).  Only its Pong answers it: frames the
        broker sends unasked (pushes) show that the way down works, not that
        the broker hears us.  ``_pong_timeout`` after the Ping while nothing
        arrives; one full interval while other frames arrive.

        A slow way down draining a backlog queues the Pong behind it, several
        intervals late (12 KB/s behind a 1 MB push window is 80 s).  A push of
        messages stored no later than the Ping's send time on the broker's
        clock plus ``_pong_timeout`` (the calibration's error, the Ping's way
        up) may be ahead of the Pong, so each one gives it another interval.
        A push of anything stored later was queued after the Pong -- had the
        broker heard the Ping -- and gives no more time: a dead way up with
        fresh messages still flowing down is found within an interval plus
        ``_pong_timeout`` of the Ping (bytes of a frame still arriving count
        as backlog: a frame can take longer than an interval);
        with only the backlog flowing, once the push window is spent (the
        broker pushes no further without our acks)."""
        if self._ping_at is None:
            return None
        if self._last_recv < self._ping_at:
            return self._ping_at + self._pong_timeout()
        return max(self._ping_at, self._backlog_at) + max(self._pong_timeout(), self._heartbeat)

    @property
    def heartbeat_interval(self) -> int:
        """The heartbeat interval in use or to be used (µs; 0 = none): the
        broker's (LoginAck.heartbeat_ms), or what the adaptive heartbeat
        learned below it."""
        if self._tuner is not None and self._hb_ceiling:
            return self._tuner.interval(self._hb_ceiling)
        return self._hb_ceiling

    @property
    def heartbeat_tuner(self) -> Optional[HeartbeatTuner]:
        """The adaptive heartbeat's state (None when ``adaptive_heartbeat`` is off)."""
        return self._tuner

    def _calibrate_next(self) -> None:
        self._cal_t0 = self._raw_now
        self._cal_deadline = self._t + self._ack_timeout
        self._send(encode_frame(F.CalibrateReq(self._cal_t0)))

    def _on_calibrate_resp(self, f: F.CalibrateResp) -> None:
        t0, t1 = self._cal_t0, self._raw_now
        rtt = max(0, t1 - t0)
        # The broker read its clock somewhere in [t0, t1]: assume the middle;
        # the error is at most rtt/2, so the smallest rtt wins.
        self._samples.append((rtt, f.server_time - (t0 + t1) // 2))
        if self._state is SessionState.CALIBRATING:
            self._establish()  # ACTIVE at the first sample; the rest in the background
            return
        # A background sample on the ACTIVE connection: keep the best one.
        self._choose_sample()
        if self._calibrated():
            self._bg_cal = False
        else:
            self._calibrate_next()

    def _choose_sample(self) -> None:
        """Make the best (smallest rtt) sample of this login the estimate in
        use, unless it is an outlier (see CALIBRATION_RTT_FACTOR): while
        this login has no other sample, one whose rtt is above
        max(CALIBRATION_RTT_FACTOR x rtt in use, CALIBRATION_RTT_FLOOR)
        leaves the estimate of an earlier login in place.  With no estimate
        at all (the first login) any sample is taken: a bound of rtt/2 is
        better than none, and the next samples refine it."""
        best = min(self._samples)
        if (not self._cal_adopted and self._rtt >= 0 and len(self._samples) < 2
                and best[0] > max(CALIBRATION_RTT_FACTOR * self._rtt, CALIBRATION_RTT_FLOOR)):
            return
        self._rtt, self._offset = best
        self._cal_adopted = True

    def _calibrated(self) -> bool:
        """Enough samples for this login: ``time_samples``, and one of them
        in use (an outlier alone asks for one more: a second as slow is
        taken, _choose_sample)."""
        return len(self._samples) >= max(1, self.config.time_samples) and self._cal_adopted

    def _establish(self) -> None:
        """Calibration is over (all samples, or one timed out): ACTIVE."""
        if self._samples:
            self._choose_sample()
        # else: no sample answered; keep the previous login's offset.
        self._state = SessionState.ACTIVE
        self._established += 1
        ack = self._login_ack
        assert ack is not None
        self._emit(Connected(ack.user, self.device, ack.position, ack.gap, self._offset, self._rtt))
        held, self._held = self._held, []
        for f in held:
            if self._state is not SessionState.ACTIVE:  # pragma: no cover - Close is never held
                return
            self._dispatch(f)
        # Everything unanswered goes again, same local ids, in send order.
        self._inflight.clear()
        for p in self._pending.values():
            p.sent_at = None
        self._queue = deque(sorted(self._pending.values(), key=lambda p: p.local_id))
        self._rate_mark = (self._t, self._answers)  # a new connection, a full bucket: a new rate sample
        self._fill_window()
        for conv, seq in self._read_wanted.items():
            self._send(encode_frame(F.Read(conv, seq)))
        if self._taken_upto > self._acked_upto and self._ack_at is None:
            self._ack_at = self._t + self._ack_delay
        for h in self._history.values():
            self._ask_history(h)
        self._resend_presence()
        if self._samples and not self._calibrated():
            self._bg_cal = True
            self._calibrate_next()

    def _dispatch(self, f: object) -> None:
        """One frame on an ACTIVE connection."""
        t = type(f)
        if t is F.SendAck:
            self._on_send_ack(f)  # type: ignore[arg-type]
        elif t is F.Push:
            self._on_push(f)  # type: ignore[arg-type]
        elif t is F.ReadStates:
            self._on_read_states(f)  # type: ignore[arg-type]
        elif t is F.ReadReceipt:
            self._on_receipt(f)  # type: ignore[arg-type]
        elif t is F.HistoryResp:
            self._on_history(f)  # type: ignore[arg-type]
        elif t is F.ReadersResp:
            self._on_readers(f)  # type: ignore[arg-type]
        elif t is F.ConvListResp:
            self._on_conv_list(f)  # type: ignore[arg-type]
        elif t is F.ConvSetResp:
            self._on_conv_set(f)  # type: ignore[arg-type]
        elif t is F.ConvUpdate:
            for e in f.entries:  # type: ignore[attr-defined]
                # (The entry as held: never behind what the device holds.)
                self._emit(ConversationUpdated(self._adopt_entry(e)))
        elif t is F.ConvPurged:
            self._on_conv_purged(f)  # type: ignore[arg-type]
        elif t is F.Ping:
            self._send(encode_frame(F.Pong(f.nonce)))  # type: ignore[attr-defined]
        elif t is F.Pong:
            if self._ping_at is not None and f.nonce == self._ping_nonce:  # type: ignore[attr-defined]
                self._ping_at = None
                if self._tuner is not None:
                    # The link survived _ping_idle of silence: maybe probe longer.
                    self._tuner.survived(self._ping_idle, self._hb_ceiling)
                    self._heartbeat = self._tuner.interval(self._hb_ceiling)
        elif t is F.CalibrateResp:
            if self._bg_cal and f.client_time == self._cal_t0:  # type: ignore[attr-defined]
                self._on_calibrate_resp(f)  # type: ignore[arg-type]
        elif t is F.Typing:
            self._on_typing(f)  # type: ignore[arg-type]
        elif t is F.Presence:
            self._on_presence(f)  # type: ignore[arg-type]
        elif t is F.PresencePrivacy:
            self._on_privacy(f)  # type: ignore[arg-type]
        elif t is F.Error and f.code == ErrorCode.TYPING_NOT_RELAYED:  # type: ignore[attr-defined]
            log.debug("broker: %s", f.reason)  # type: ignore[attr-defined]  # expected in large groups
        elif t is F.Error:
            p = self._pending.get(f.ref) if f.ref else None  # type: ignore[attr-defined]
            if p is not None:
                # The reason of a send's refusal (its SendAck follows): the
                # app gets it on SendError.reason, the log only at debug.
                p.reason = f.reason  # type: ignore[attr-defined]
                log.debug("broker error %s (ref %s): %s", f.code, f.ref, f.reason)  # type: ignore[attr-defined]
            else:
                # Nothing waits for it (a refused Read has no id): the app
                # gets it as an event, not only as a log line.
                log.info("broker error %s (ref %s): %s", f.code, f.ref, f.reason)  # type: ignore[attr-defined]
                self._emit(BrokerRefused(_error_code(f.code), f.ref, f.reason))  # type: ignore[attr-defined]
        elif t is F.Close:  # pragma: no cover - handled in _on_frame
            self._on_close(f)  # type: ignore[arg-type]
        # Pong, a late CalibrateResp, anything else: liveness only (_last_recv).

    # ------------------------------------------------------------ timers

    def next_deadline(self) -> Optional[int]:
        """When :meth:`handle_timer` must run next (µs, device clock), or None
        if nothing is timed.  Changes after any call; ask again each time."""
        best: Optional[int] = None

        def consider(at: int) -> None:
            nonlocal best
            if best is None or at < best:
                best = at

        heap = self._timeouts
        while heap:
            at, lid = heap[0]
            p = self._pending.get(lid)
            if p is not None and p.deadline == at:
                consider(at)
                break
            heapq.heappop(heap)  # a finished send or a moved deadline
        for h in self._history.values():
            consider(h.deadline)
        if self._typing_seen:
            consider(min(self._typing_seen.values()))
        state = self._state
        if state is SessionState.AWAITING_LOGIN_ACK:
            consider(self._login_deadline)
        elif state is SessionState.CALIBRATING:
            consider(self._cal_deadline)
        elif state is SessionState.ACTIVE:
            if self._bg_cal:
                consider(self._cal_deadline)
            if self._heartbeat:
                consider(self._last_recv + int(self._heartbeat * self.config.dead_after))
                due = self._ping_due()
                if due is not None:
                    consider(due)
                pong_by = self._pong_deadline()
                if pong_by is not None:
                    consider(pong_by)
            if self._queue and self._hold_until > self._t:
                consider(self._hold_until)
            if self._ack_at is not None:
                consider(self._ack_at)
        if best is None:
            return None
        return best - self._skew

    def handle_timer(self, now: int) -> None:
        """Do what is due at ``now``: send timeouts, history timeouts, the
        LoginAck deadline, the calibration sample deadline, and on an ACTIVE
        connection dead-link detection, the end of a backoff hold, the
        batched PushAck and the heartbeat Ping.
        Harmless to call early or often."""
        t = self._tick(now)
        heap = self._timeouts
        while heap and heap[0][0] <= t:
            at, lid = heapq.heappop(heap)
            p = self._pending.get(lid)
            if p is not None and p.deadline == at:
                self._forget(p)
                if not p.action:
                    self._expired.pop(lid, None)
                    self._expired[lid] = (p.conv, p.client_time, p.after_seq)
                    if len(self._expired) > 1000:
                        del self._expired[next(iter(self._expired))]
                self._completions.append(SendCompleted(lid, None, SendTimeout(lid)))
                self._fill_window()
        for h in [h for h in self._history.values() if h.deadline <= t]:
            del self._history[h.req_id]
            self._completions.append(h.failed(HistoryTimeout(h.req_id, h.conv)))
        if self._typing_seen:
            self._expire_typing(t)
        if self._ack_at is not None and self._ack_at <= t:
            self._ack_at = None
            self._flush_ack()
        state = self._state
        if state is SessionState.AWAITING_LOGIN_ACK:
            if t >= self._login_deadline:
                self._end_connection(None, LOGIN_TIMED_OUT)
        elif state is SessionState.CALIBRATING:
            if t >= self._cal_deadline:
                # A lost or very late answer: calibrate with what we have
                # rather than hold the connection hostage.
                self._establish()
        elif state is SessionState.ACTIVE:
            if self._bg_cal and t >= self._cal_deadline:
                self._bg_cal = False  # an unanswered background sample: keep what we have
            hb = self._heartbeat
            if hb and t >= self._last_recv + int(hb * self.config.dead_after):
                # A black-holed route reports no error; silence is the only sign.
                self._end_connection(None, "no traffic from the broker: dead link")
                return
            ping_at = self._ping_at
            pong_by = self._pong_deadline() if hb else None
            if ping_at is not None and pong_by is not None and t >= pong_by:
                if self._last_recv >= ping_at:
                    # Frames kept coming (pushes) but never the Pong: the way
                    # up is dead -- our acks and sends vanish -- found within
                    # two intervals of the last answer instead of at the
                    # broker's idle timeout.  Not an idle death: the tuner
                    # learns nothing.
                    self._end_connection(None, NO_HEARTBEAT_ANSWER)
                    return
                # Nothing at all since our Ping: the link is dead -- within two
                # intervals of its death (the Ping goes at most one interval
                # after the last frame received, whatever we sent meanwhile,
                # and we wait at most one more).  A
                # death after a full interval of silence is a NAT or carrier
                # idle timeout: the tuner backs off.
                if self._tuner is not None:
                    self._tuner.died(self._ping_idle, self._hb_ceiling)
                self._end_connection(None, "no Pong from the broker: dead link")
                return
            if self._queue and self._hold_until <= t:
                self._fill_window()
            due = self._ping_due() if hb else None
            if due is not None and t >= due:
                self._ping_nonce += 1
                self._ping_idle = t - max(self._last_sent, self._last_recv)
                self._send(encode_frame(F.Ping(self._ping_nonce)))
                self._ping_at = t
                # The broker's clock now, as calibrated: a push of anything
                # stored later than this (plus _pong_timeout of leeway) was
                # queued after the Pong (_pong_deadline).
                self._ping_server = self._raw_now + self._offset
                self._backlog_at = 0

    # ------------------------------------------------------------ upstream

    def send(
        self, conv: str, payload: bytes, now: int, *, local_id: Optional[int] = None, timeout: Optional[int] = None,
        mentions: Optional[Iterable[str]] = (), mention_all: bool = False,
    ) -> int:
        """Queue a message; returns its local id.  Its SendCompleted comes out
        of :meth:`completions` once the broker answered for good, or with
        SendTimeout after ``timeout`` µs (default ``send_timeout``).

        With ``local_id`` of a send still pending with the same message
        (conv, payload, mentions in any order, mention_all) it is a retry:
        nothing new is queued (the later of the two deadlines applies).  With
        the local id of a send or amend still pending with a different
        message it raises ValueError ("local id N is still pending with a
        different message"), nothing changed: a local id names one message.
        With the local id of an earlier, finished send it is asked again: the
        broker answers with the original ack if it stored it (after a
        SendTimeout, with the first attempt's stamp and after_seq, so that the
        local view shows what was stored).  Raises EncodeError for a
        conv/payload/local id no SendReq can carry, the terminal error if
        CLOSED.  A payload above the
        broker's LoginAck.max_payload (or a SendReq above its max_frame; the
        1 MiB default before the first login) is never sent: it completes at
        once with SendError(PAYLOAD_TOO_LARGE).

        ``mentions`` (user ids) and ``mention_all`` ("everyone") travel
        beside the payload: mentioned members get a mention counted
        (ConvEntry.mention_count) and the host's message event lists them.
        A refusal is final: TOO_MANY_MENTIONS (more than the broker's
        limit), BAD_MENTION (not a valid user id); ids of non-members are
        ignored.  A retry must repeat them (the same local id carries the
        same SendReq)."""
        payload = _payload_bytes(payload)
        self._check_open()
        _check_timeout("send", timeout)
        t = self._tick(now)
        deadline = t + (self._send_timeout if timeout is None else max(0, timeout))
        if mentions is None:
            mentions = ()
        elif isinstance(mentions, (str, bytes)):
            # (A str is iterable: "carol" would mention c, a, r, o and l.)
            raise TypeError(f"mentions must be an iterable of user ids, not one {type(mentions).__name__}: "
                            f"mentions=[{mentions!r}]")
        mentioned = tuple(mentions)
        if not all(type(u) is str for u in mentioned):
            raise TypeError(f"mentions must be user ids (str), got {mentioned!r:.80}")
        if type(mention_all) is not bool:
            raise TypeError(f"mention_all must be True or False, not {mention_all!r:.40}")
        if local_id is not None:
            p = self._pending.get(local_id)
            if p is not None:
                self._check_same_message(
                    p, (conv, 0, 0, payload, frozenset(mentioned), bool(mention_all)), "send")
                self._extend_deadline(p, deadline)
                return local_id
        lid = self._new_local_id(now) if local_id is None else local_id
        stamp = max(self._last_stamp + 1, now + self._offset)
        # What the user could see when sending: the message must never be
        # displayed above it (pimcore.order).
        after = self._seen_seq.get(conv, 0) if type(conv) is str else 0
        first = self._expired.get(lid) if local_id is not None else None
        if first is not None and first[0] == conv:
            # A retry after SendTimeout: the first attempt's stamp and place,
            # so the broker's original ack matches what it stored.
            stamp, after = first[1], first[2]
        if mentioned or mention_all:
            ms = tuple(F.Mention(u) for u in mentioned)
            raw = encode_frame(F.SendReq(lid, conv, stamp, payload, after, ms, mention_all))
        else:
            raw = encode_frame(F.SendReq(lid, conv, stamp, payload, after))  # raises EncodeError before any state changes
        self._last_stamp = max(self._last_stamp, stamp)
        self._last_local_id = max(self._last_local_id, lid)
        p = _Pending(lid, conv, payload, stamp, after, raw, deadline, mentions=frozenset(mentioned), mention_all=bool(mention_all))
        if self._refuse_oversize(p):
            return lid
        if not self._pending:
            self._rate_mark = (t, self._answers)  # idle until now: a rate sample starts here
        self._pending[lid] = p
        heapq.heappush(self._timeouts, (deadline, lid))
        # The message ends this user's typing indicator at the other members
        # (PROTOCOL.md): the next keystroke sends a fresh Typing at once,
        # not after what is left of typing_interval.
        self._typing_sent.pop(conv, None)
        self._requeue(p)
        self._fill_window()
        return lid

    def amend(
        self, conv: str, target: int, action: int, now: int, *, payload: bytes = b"", local_id: Optional[int] = None,
        timeout: Optional[int] = None,
    ) -> int:
        """Queue an AmendReq: recall (``action`` MessageKind.RECALL), edit
        (EDIT, the new ``payload``) or delete for this user (DELETE) the
        message at seq ``target`` of ``conv``; returns its local id.  It
        travels exactly like a send (same local ids, window, retries across
        reconnects, deadline) and completes with a SendCompleted (``Sent.seq``
        is the entry's seq, 0 for DELETE; SendError NOT_SENDER, TOO_LATE,
        RECALLED, NO_SUCH_MESSAGE, ...  when refused; PAYLOAD_TOO_LARGE at
        once, never sent, as for :meth:`send`).  Once acked the local
        view shows the change.  Raises TypeError if ``target`` is not an int
        (a bool is not), ValueError if it is outside 1..2**64-1 (no seq is),
        EncodeError (a ValueError) for other values no AmendReq can carry,
        ValueError for the ``local_id`` of a send or amend still pending with
        a different message (the same amend again is a retry, as for
        :meth:`send`), the terminal error if CLOSED; nothing is queued then."""
        _check_seq(target)
        payload = _payload_bytes(payload)
        self._check_open()
        _check_timeout("amend", timeout)
        t = self._tick(now)
        deadline = t + (self._send_timeout if timeout is None else max(0, timeout))
        if local_id is not None:
            p = self._pending.get(local_id)
            if p is not None:
                self._check_same_message(p, (conv, target, int(action), payload, frozenset(), False), "amend")
                self._extend_deadline(p, deadline)
                return local_id
        lid = self._new_local_id(now) if local_id is None else local_id
        stamp = max(self._last_stamp + 1, now + self._offset)
        raw = encode_frame(F.AmendReq(lid, conv, target, int(action), stamp, payload))  # EncodeError before any change
        self._last_stamp = stamp
        self._last_local_id = max(self._last_local_id, lid)
        p = _Pending(lid, conv, payload, stamp, 0, raw, deadline, target, int(action))
        if self._refuse_oversize(p):
            return lid
        if not self._pending:
            self._rate_mark = (t, self._answers)
        self._pending[lid] = p
        heapq.heappush(self._timeouts, (deadline, lid))
        self._requeue(p)
        self._fill_window()
        return lid

    @staticmethod
    def _check_same_message(p: _Pending, message: tuple, call: str) -> None:
        """Raise ValueError unless ``message`` -- (conv, target, action,
        payload, mentions, mention_all); target and action 0 for a send --
        is what the pending ``p`` carries: a local id names one message.
        The error says what differs."""
        mine = (p.conv, p.target, p.action, p.payload, p.mentions, p.mention_all)
        if mine == message:
            return
        if bool(p.action) != bool(message[2]):
            what = f"the pending one is {'an amend' if p.action else 'a send'}, this {'an amend' if message[2] else 'a send'}"
        else:
            names = ("conv", "target", "action", "payload", "mentions", "mention_all")
            differ = [n for n, a, b in zip(names, mine, message) if a != b]
            what = "not the same " + (f"{', '.join(differ[:-1])} and {differ[-1]}" if len(differ) > 1 else differ[0])
        raise ValueError(
            f"{call}: local id {p.local_id} is still pending with a different message ({what}): a local id names"
            f" one message -- repeat that one to wait for its outcome, or give this message another local id")

    def _extend_deadline(self, p: _Pending, deadline: int) -> None:
        """A retry of the pending ``p``: the later of the two deadlines applies."""
        if deadline > p.deadline:
            p.deadline = deadline
            heapq.heappush(self._timeouts, (deadline, p.local_id))

    def _requeue(self, p: _Pending) -> None:
        """Put ``p`` back in the queue at its place (local ids are in send order)."""
        q = self._queue
        i = len(q)
        while i > 0 and q[i - 1].local_id > p.local_id:
            i -= 1
        q.insert(i, p)

    def _fill_window(self) -> None:
        if self._state is not SessionState.ACTIVE or self._t < self._hold_until:
            return
        limit = self.send_window
        while self._queue and len(self._inflight) < limit:
            p = self._queue.popleft()
            if self._pending.get(p.local_id) is not p or p.sent_at is not None:
                continue  # finished or timed out meanwhile (or a stale duplicate entry)
            if self._refuse_oversize(p):
                continue  # queued before this login announced smaller limits
            self._transmit(p)

    def _refuse_oversize(self, p: _Pending) -> bool:
        """Complete ``p`` with SendError(PAYLOAD_TOO_LARGE) if it breaks the
        broker's limits (payload above max_payload, or the frame's declared
        length above max_frame); true if so."""
        raw = p.raw
        i = 0
        while raw[i] & 0x80:  # the length prefix is a LEB128 varint
            i += 1
        frame = len(raw) - i - 1
        if self._max_payload > 0 and len(p.payload) > self._max_payload:
            reason = f"payload of {len(p.payload)} bytes is above the broker's max_payload {self._max_payload}"
        elif frame > self._max_frame:
            reason = f"frame of {frame} bytes is above the broker's max_frame {self._max_frame}"
        else:
            return False
        self._forget(p)
        self._completions.append(SendCompleted(p.local_id, None, SendError(ErrorCode.PAYLOAD_TOO_LARGE, p.local_id, reason=reason)))
        return True

    def _transmit(self, p: _Pending) -> None:
        # Written once per connection: the broker answers every SendReq it
        # reads (or closes the connection), and TCP delivers it, so a copy on
        # the same connection would only queue behind the first one.
        assert p.sent_at is None
        if p.attempts:
            self._stats["retransmits"] += 1  # again after a reconnect or a refusal
        p.sent_at = self._t
        p.attempts += 1
        self._tx += 1
        p.tx = self._tx
        self._inflight[p.local_id] = p
        self._send(p.raw)

    def _forget(self, p: _Pending) -> None:
        self._pending.pop(p.local_id, None)
        self._inflight.pop(p.local_id, None)
        p.sent_at = None
        # Left in _queue (skipped there) and in _timeouts (stale there).

    def _on_send_ack(self, f: F.SendAck) -> None:
        p = self._pending.get(f.local_id)
        if p is None:
            return  # a late duplicate: the answer to a retry of a send already answered
        code = _error_code(f.code)
        if code is ErrorCode.OK:
            self._expired.pop(f.local_id, None)
            if self._stalled is not None:
                self._emit(SendsResumed(self._stalled.since, len(self._pending) - 1))
                self._stalled = None
            self._forget(p)
            if p.action:
                # Our own AmendReq: apply it to the local view now (the
                # broker does not push a device its own entries).
                own = F.Message(
                    0, f.msg_id, p.conv, f.seq, self.user, self.device, p.client_time, f.server_time, p.payload,
                    p.action, p.local_id, max(0, f.seq - 1), p.target,
                )
            else:
                own = F.Message(
                    0, f.msg_id, p.conv, f.seq, self.user, self.device, p.client_time, f.server_time, p.payload,
                    F.MessageKind.MESSAGE, p.local_id, min(p.after_seq, max(0, f.seq - 1)),
                    # Its mentions as the broker stores them (sorted, unique,
                    # never the sender): as every other device shows it.
                    mentions=tuple(F.Mention(u) for u in sorted(p.mentions - {self.user})),
                    mention_all=p.mention_all,
                )
            self._remember(own)
            self._own_entry(own)
            self._completions.append(SendCompleted(p.local_id, Sent(p.local_id, p.conv, f.msg_id, f.seq, f.server_time, p.client_time), None))
        elif code in FINAL_CODES:
            self._forget(p)
            reason = p.reason or _refusal_reason(code, p.conv, self.user)
            self._completions.append(SendCompleted(p.local_id, None, SendError(code, p.local_id, reason=reason)))
        else:
            # STORE_UNAVAILABLE, TOO_MANY_IN_FLIGHT, RATE_LIMITED...: the broker
            # wants us to slow down.  Hold the whole queue (not just this
            # message: sending the others would only earn more refusals),
            # then resend with the same local id.
            if p.local_id in self._inflight:
                del self._inflight[p.local_id]
                p.sent_at = None
                self._requeue(p)
            # else: already back in the queue (a second refusal: a late duplicate).
            if code in (ErrorCode.STORE_UNAVAILABLE, ErrorCode.INTERNAL) and self._stalled is None:
                # Not back-pressure but a failure the app should know of
                # (a full disk does not pass by itself): say so once.
                self._stalled = SendsStalled(code, len(self._pending), self._raw_now)
                self._emit(self._stalled)
            self._on_refusal(p, code)
            self._fill_window()  # a no-op while held; sends at once if nothing is held
            return
        self._answers += 1
        self._refusals = 0
        if p.tx > self._recover:
            # Additive increase -- for what was sent after the last event
            # only: answers to the refused window do not undo its halving.
            # Past a link loss's threshold, +1 per window (RFC 5681 section
            # 3.1, congestion avoidance) rather than per answer.
            cwnd = min(self._cwnd, float(self._window))
            self._cwnd = min(float(self._window), cwnd + (1.0 if cwnd < self._ssthresh else 1.0 / cwnd))
        self._fill_window()

    def _on_refusal(self, p: _Pending, code: ErrorCode) -> None:
        """Window and hold after a transient refusal of ``p`` (see _recover)."""
        t = self._t
        if p.tx > self._recover:
            # A new congestion event: the first refusal of a transmission
            # made after the last event.
            self._recover = self._tx
            self._congestion_events += 1
            # Consecutive events with no send answered between them: the
            # windows were refused whole, so the holds were too short (or
            # the store is down): only then does the hold grow.
            self._refusals += 1
            at, base = self._rate_mark
            if self._answers > base and t > at:
                self._rate = (self._answers - base) / (t - at)
            self._rate_mark = (t, self._answers)
            # Multiplicative decrease of what is really in use (halving 2**16
            # while LoginAck.window caps the wire at 8 would change nothing).
            self._cwnd = max(1.0, min(self._cwnd, float(self._window)) / 2)
            self._episode_at = t
            cfg = self.config
            backoff = min(cfg.backoff_max, cfg.backoff_initial * 2 ** min(self._refusals - 1, 16))
            self._episode_backoff = _us(backoff * (0.5 + self._rng.random()))  # jitter: no thundering herd
        if code is ErrorCode.RATE_LIMITED:
            # The broker's token bucket is empty; it refills at about _rate.
            # Hold until it holds the window that goes out next (not a blind
            # growing backoff), but never longer than backoff_initial: a hold
            # longer than the bucket's size / its rate wastes its refill
            # (and would make the next _rate sample too low).  Doubled per
            # window refused whole: then _rate was too high.
            cap = float(_us(self.config.backoff_initial))
            need = self.send_window / self._rate if self._rate > 0 else cap
            delay = min(float(_us(self.config.backoff_max)), min(cap, need) * 2 ** min(self._refusals - 1, 16))
        else:
            delay = float(self._episode_backoff)
        until = self._episode_at + int(delay)
        if until > self._hold_until:
            self._hold_until = until

    # ------------------------------------------------------------ downstream

    def next_event(self, now: int) -> Optional[Event]:
        """Take the next event for the application (None if none is queued).
        Taking a message is what lets the session acknowledge it (up to its
        inbox position; the last message of a Push: the whole Push): the
        batched PushAck goes out ``ack_delay`` later."""
        t = self._tick(now)
        while self._events:
            ev, ack = self._events.popleft()
            if ack > self._taken_upto:
                self._taken_upto = ack
                if self._ack_at is None:
                    self._ack_at = t + self._ack_delay  # gather more takes into one ack
            if ev is not None:
                return ev
        return None

    def _flush_ack(self) -> None:
        if self._state is SessionState.ACTIVE and self._taken_upto > self._acked_upto:
            self._acked_upto = self._taken_upto
            self._stats["acks_sent"] += 1
            self._send(encode_frame(F.PushAck(self._taken_upto)))

    def _emit(self, ev: Optional[Event], ack: int = 0) -> None:
        self._events.append((ev, ack))
        if ack > self._queued_ack:
            self._queued_ack = ack
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
        # The positions the Push covers without carrying them are this
        # device's own sends (a Push skips only those: PROTOCOL.md), or
        # entries removed since (retention, a purge): the highest is
        # Login.sent's candidate -- a removed one is checked as soundly.
        below = self._enqueued_upto
        for m in fresh:
            if m.position > below + 1 and m.position - 1 > self._sent_upto:
                self._sent_upto = m.position - 1
            below = m.position
        if f.position > below and f.position > self._sent_upto:
            self._sent_upto = f.position
        self._enqueued_upto = f.position
        for i, m in enumerate(fresh):
            self._remember(m)
            st = self.read_states.get(m.conv)
            if st is None:
                st = F.ReadState(m.conv, 0, 0, 0)
            if m.seq > self._rs_counted.get(m.conv, 0):
                # A message the last ReadState did not count yet (membership
                # entries, kind JOINED/LEFT, are never unread).
                self._rs_counted[m.conv] = m.seq
                fresh_unread = st.unread + int(
                    m.kind == F.MessageKind.MESSAGE and m.sender != self.user and m.seq > st.read_seq
                )
                self.read_states[m.conv] = F.ReadState(m.conv, st.read_seq, max(st.last_seq, m.seq), fresh_unread)
            self._entry_pushed(m)
            if m.kind == F.MessageKind.MESSAGE and self._typing_seen and self._typing_seen.pop((m.conv, m.sender), None) is not None:
                # PROTOCOL.md: an indicator ends at a newer Typing or a message
                # from that user; the stop comes before the message itself.
                self._emit(TypingChanged(m.conv, m.sender, False, 0))
            # Taking a message acks up to its own position (the positions
            # before it in this Push are taken, or not this device's to
            # show); taking the last one acks the whole Push (the positions
            # after it are not this device's either).  A catch-up Push of
            # many messages is thus acked as far as the app took it.
            ev: Event = MessageAmended(m, self._held_message(m.conv, m.target)) if m.kind in AMEND_KINDS else MessageReceived(m)
            self._emit(ev, f.position if i == len(fresh) - 1 else m.position)
        if not fresh:
            self._take_in_turn(f.position)  # nothing to show (own messages)

    def _take_in_turn(self, position: int) -> None:
        """Positions with nothing for the app (its own sends): taken at once
        when no message is queued before them (events without a position,
        such as Connected, do not hold them: a send-only app need not read
        its events) -- a cursor saved right after a send's SendAck then
        covers the send (OPERATIONS.md, "When the store goes back in
        time") -- else in turn, when the app has taken what comes before."""
        if self._queued_ack > self._taken_upto:
            self._emit(None, position)
        elif position > self._taken_upto:
            self._taken_upto = position
            if self._ack_at is None:
                self._ack_at = self._t + self._ack_delay  # gather more takes into one ack

    # ------------------------------------------------------------ read state

    def mark_read(self, conv: str, seq: int, now: int) -> None:
        """Move the user's read marker of ``conv`` to ``seq`` (never back).
        The broker confirms with a ReadStates; until then the Read is sent
        again on every new connection.  Raises SendError (nothing sent,
        nothing remembered) for what the session knows the broker refuses:
        BAD_REQUEST for a malformed conversation id, NOT_MEMBER for a 1:1
        id without this user (once the first login named the user);
        EncodeError for values no Read can carry; the terminal error if
        CLOSED.  A Read carries no request id, so the broker's refusal of a
        group (NOT_MEMBER, UNKNOWN_CONVERSATION) cannot be tied to this
        call: it comes as a :class:`BrokerRefused` event."""
        self._check_open()
        raw = encode_frame(F.Read(conv, seq))
        if conversation_problem(conv) is not None:
            raise self._request_error(ErrorCode.BAD_REQUEST, f"mark_read of {_show(conv)}", conv)
        pair = direct_members(conv)
        if pair is not None and self.user and self.user not in pair:  # (the user is known from the first login)
            raise self._request_error(ErrorCode.NOT_MEMBER, f"mark_read of {_show(conv)}", conv)
        self._tick(now)
        st = self.read_states.get(conv)
        # The broker clamps a marker to the last seq the user may see: do the
        # same with what this device knows, so the local state never shows
        # more read than the broker will hold.
        known = max(st.last_seq if st is not None else 0, self._seen_seq.get(conv, 0))
        if known:
            seq = min(seq, known)
        if st is not None and seq > st.read_seq:
            # Optimistic: the confirmation brings the exact unread count (own
            # and recalled messages do not count); until then at most what
            # lies past the new marker (among the seqs the count accounts for).
            counted = self._rs_counted.get(conv, 0)
            unread = 0 if seq >= counted else min(st.unread, counted - seq)
            self.read_states[conv] = F.ReadState(conv, seq, st.last_seq, unread)
        if seq > self._read_wanted.get(conv, 0):
            self._read_wanted[conv] = seq
        if self._state is SessionState.ACTIVE:
            self._send(raw)

    def _drop_unlisted(self) -> None:
        """The login's read states are all in: forget the conversations held
        before it that they left out (no longer in the user's list: purged
        while the device was away) -- read state, list entry, view and
        unconfirmed marker -- each with a ConversationPurged."""
        for conv in sorted(self._login_prior - self._login_seen):
            st = self.read_states.pop(conv, None)
            if st is not None and direct_members(conv) is not None:
                # (A 1:1 chat keeps its markers through a purge: its next
                # message is counted after this one, as the broker does --
                # a trial's phone showed read_seq 0 where the broker kept 1.)
                self.read_states[conv] = F.ReadState(conv, st.read_seq, st.last_seq, 0)
            # Said (an app that stores messages deletes them; it had no
            # word of it: a new user's trial), with the seqs the device
            # knows of: the purge's own last seq is not on the wire here.
            last = max(st.last_seq if st is not None else 0, self._seen_seq.get(conv, 0))
            self._purge_told[conv] = max(self._purge_told.get(conv, 0), last)
            self._emit(ConversationPurged(conv, last, direct_members(conv) is None))
            # Its unconfirmed marker too: re-sent at every reconnect, it was
            # refused, then stored in a group created again with the id.
            self._read_wanted.pop(conv, None)
            if direct_members(conv) is None:
                self._seen_seq.pop(conv, None)  # (a group's next send answers nothing of it: _on_conv_purged)
            if conv in self.read_states:
                self._rs_counted[conv] = self.read_states[conv].last_seq  # (the kept 1:1 state counts nothing up to it)
            else:
                self._rs_counted.pop(conv, None)
            self.conversations.pop(conv, None)
            self._entry_counted.pop(conv, None)
            # Its messages too: a purge deleted them (a group re-created
            # with the same id showed them beside its new ones).
            self._views.pop(conv, None)
            self._view_heaps.pop(conv, None)
            self._view_seqs.pop(conv, None)
        self._login_prior = set()
        self._login_seen = set()

    def _on_conv_purged(self, f: F.ConvPurged) -> None:
        """The host purged ``f.conv`` (PROTOCOL.md, Retention and purge;
        told when the purge committed, or at a login before its
        ReadStates): its messages up to
        ``f.last_seq`` leave the view -- they are deleted, and a group
        created again with the same id would show them beside its new ones
        (a new user's trial).  A group's read state goes too (its markers
        went with it); a group that is gone (``f.gone``) its list entry
        too, as at a login that leaves it out.  A 1:1 chat keeps its read
        state (the broker sends the exact one); a 1:1 chat, or a group
        created again (told at login, before the login's ReadStates),
        keeps its list entry, emptied: its next message shows in it."""
        conv = f.conv
        if direct_members(conv) is None:
            # A group's markers went with it (created again, it starts from
            # the broker's: the login's ReadStates come after this).
            self.read_states.pop(conv, None)
            self._rs_counted.pop(conv, None)
            if self._seen_seq.get(conv, 0) <= f.last_seq:
                # Its seqs seen too: a send's after_seq at or below the
                # purge point is refused (PURGED: it would answer deleted
                # history); sends written before this keep theirs.
                self._seen_seq.pop(conv, None)
        if f.gone:
            self.conversations.pop(conv, None)
            self._entry_counted.pop(conv, None)
        elif conv in self.conversations:
            # (A 1:1 chat, or a group created again: its entry stays, without
            # a purged last message, so that the next message shows in it --
            # the SDK makes no entry from a Push; a group's marker goes, as
            # its read state.  Its counts are the ReadState's that follows:
            # at a login a catch-up Push may have come first, with messages
            # after the purge.)
            e = self.conversations[conv]
            read_seq = e.read_seq if direct_members(conv) is not None else 0
            # Its mentions went with the purged messages (a ReadState carries
            # no mention count: a trial's phone showed 1 where the broker
            # said 0); what it holds after them counts, as a page would.
            self.conversations[conv] = dataclasses.replace(
                e, last=() if e.last and e.last[0].seq <= f.last_seq else e.last, read_seq=read_seq,
                mention_count=self._held_mentions(conv, max(read_seq, f.last_seq), self._entry_counted.get(conv, 0)))
        view = self._views.get(conv)
        if view is not None:
            for msg_id in [i for i, m in view.items() if m.seq <= f.last_seq]:
                del view[msg_id]
            seqs = self._view_seqs.get(conv, {})
            for seq in [q for q in seqs if q <= f.last_seq]:
                del seqs[seq]
            heap = self._view_heaps.get(conv)
            if heap is not None:
                heap[:] = [(m.seq, m.msg_id) for m in view.values()]
                heapq.heapify(heap)
        # Once per purge point in a running session: a login repeats every
        # conversation's (the broker cannot know what the device holds).
        if f.gone or self._purge_told.get(conv, 0) < f.last_seq:
            self._purge_told[conv] = f.last_seq
            self._emit(ConversationPurged(conv, f.last_seq, f.gone))

    def _on_read_states(self, f: F.ReadStates) -> None:
        for st in f.entries:
            if self._login_states:
                self._login_states -= 1
                self._login_seen.add(st.conv)
                if not self._login_states:
                    self._drop_unlisted()
            # Confirmed durable: as far as wanted, or as far as the broker
            # allows (it clamps to the last seq the user may see).
            if st.read_seq >= min(self._read_wanted.get(st.conv, 1 << 64), st.last_seq):
                self._read_wanted.pop(st.conv, None)
            old = self.read_states.get(st.conv)
            if old is not None and min(old.read_seq, st.last_seq) > st.read_seq:
                continue  # markers never move back
            # (The count is the broker's, up to its last_seq; the last seq
            # shown never moves back -- an own send acked before a Read of
            # the same batch may be past it.)
            self.read_states[st.conv] = st if old is None or old.last_seq <= st.last_seq else dataclasses.replace(
                st, last_seq=old.last_seq)
            self._rs_counted[st.conv] = st.last_seq
            e = self.conversations.get(st.conv)
            if e is not None and st.read_seq >= e.read_seq:
                if st.read_seq >= e.last_seq:
                    mentions = 0
                else:
                    # The mentions it counted that the new marker passed and
                    # this device holds stop counting (a read on another
                    # device); and a mention is an unread message that
                    # mentions the user: never more of them than unread ones.
                    passed = self._held_mentions(st.conv, e.read_seq, min(st.read_seq, self._entry_counted.get(st.conv, 0)))
                    mentions = max(0, min(e.mention_count - passed, st.unread))
                # The entry's last_seq stays the seq of its `last`: the read
                # state's is the conversation's last seq, RECALL/EDIT entries
                # included.  Raising it to that made the broker's next
                # ConvUpdate (last_seq the last message's) look older than
                # the entry, read as "a newer message came", and un-hide a
                # conversation the broker still hid (a new user's trial).
                self.conversations[st.conv] = dataclasses.replace(
                    e, read_seq=st.read_seq, unread=st.unread, mention_count=mentions,
                )
                self._entry_counted[st.conv] = max(self._entry_counted.get(st.conv, 0), st.last_seq)
            self._emit(ReadStateChanged(st))

    def _on_receipt(self, f: F.ReadReceipt) -> None:
        key = (f.conv, f.reader)
        if f.seq > self.receipts.get(key, 0):
            self.receipts[key] = f.seq
            self._emit(ReceiptReceived(f.conv, f.reader, f.seq))

    # ------------------------------------------------------------ local view & history

    def _held_message(self, conv: str, seq: int) -> Optional[F.Message]:
        """The message at ``seq`` of ``conv`` in the local view, if held."""
        msg_id = self._view_seqs.get(conv, {}).get(seq)
        if msg_id is None:
            return None
        m = self._views[conv].get(msg_id)
        return m if m is not None and m.seq == seq and m.kind == F.MessageKind.MESSAGE else None

    def _apply_amend(self, e: F.Message) -> None:
        """A RECALL / EDIT / DELETE entry (pushed, fetched, or our own
        acked): change the held target; a recall, or a delete for this
        user, of an unread message from someone else leaves the unread
        count -- of the read state and of the conversation list entry
        alike, and the entry's mention count when it mentions the user
        (:meth:`_uncount`) -- as the broker counts it (the broker's next
        ReadState or page is exact).  Entries are not kept in the view
        themselves; applying one twice, or an older one after a newer,
        changes nothing."""
        t = self._held_message(e.conv, e.target)
        live = t is None or not (t.recalled or t.deleted)
        if e.kind == F.MessageKind.RECALL:
            # Only its sender (or the host, for them) recalls a message: the
            # entry's sender is the target's when the target is not held.
            if live and (t.sender if t is not None else e.sender) != self.user:
                self._uncount(e.conv, e.target, t)
            if t is not None and not t.recalled:
                t = dataclasses.replace(t, payload=b"", recalled=True)
        elif e.kind == F.MessageKind.EDIT:
            if t is not None and not (t.recalled or t.deleted) and e.server_time >= t.edited:
                t = dataclasses.replace(t, payload=e.payload, edited=e.server_time)
        elif t is not None:  # DELETE: for this user only
            if live and t.sender != self.user:
                self._uncount(e.conv, e.target, t)
            t = dataclasses.replace(t, payload=b"", deleted=True)
        # A DELETE of a message not in the local view (older than view_limit
        # kept, or never fetched) leaves the count: the entry's sender is
        # the deleting user, so whose the message was -- and whether it was
        # recalled or deleted already -- is unknown here, and the protocol
        # has no request for one conversation's ReadState.  Lowering it
        # could count a message twice (shown below the broker's count, an
        # unread message hidden); leaving it shows at most one too many
        # until the broker's next ReadState (a mark_read on any of the
        # user's devices, the next login).
        if t is not None:
            self._views[e.conv][t.msg_id] = t

    def _held_mentions(self, conv: str, above: int, upto: int) -> int:
        """How many messages of ``conv`` with seq in (``above``, ``upto``]
        this device holds that count as a mention of the user: from
        someone else, not recalled or deleted, mentioning the user."""
        if upto <= above:
            return 0
        return sum(
            1 for m in self._views.get(conv, {}).values()
            if above < m.seq <= upto and m.kind == F.MessageKind.MESSAGE and m.sender != self.user
            and not (m.recalled or m.deleted) and self._mentions_me(m)
        )

    def _mentions_me(self, m: F.Message) -> bool:
        return m.mention_all or any(x.user == self.user for x in m.mentions)

    def _uncount(self, conv: str, seq: int, held: Optional[F.Message]) -> None:
        """The message at ``seq`` of ``conv`` (from someone else, counted
        until now) stopped being unread -- recalled, or deleted for this
        user: lower the read state's count and the conversation list
        entry's by the same rule -- each only if it counts that seq (past
        its read marker, up to its last seq), never below 0 -- and the
        entry's mention count when it mentioned the user: what is not
        unread is no mention either, as the broker counts (a tombstone
        mentions nobody; base.unread_for).  ``held``: the message as this
        device holds it, None when not held (then whether it mentioned
        the user is unknown: the mention count stays until the next page)."""
        mentioned = held is not None and self._mentions_me(held)
        st = self.read_states.get(conv)
        if st is not None and st.unread > 0 and st.read_seq < seq <= self._rs_counted.get(conv, 0):
            self.read_states[conv] = F.ReadState(conv, st.read_seq, st.last_seq, st.unread - 1)
        e = self.conversations.get(conv)
        if e is not None and e.read_seq < seq <= self._entry_counted.get(conv, 0):
            self.conversations[conv] = dataclasses.replace(
                e, unread=max(e.unread - 1, 0), mention_count=max(e.mention_count - mentioned, 0))

    def _remember(self, m: F.Message) -> None:
        if m.seq > self._seen_seq.get(m.conv, 0):
            self._seen_seq[m.conv] = m.seq
        if m.kind in AMEND_KINDS:
            self._apply_amend(m)
            return
        view = self._views.setdefault(m.conv, {})
        heap = self._view_heaps.setdefault(m.conv, [])
        seqs = self._view_seqs.setdefault(m.conv, {})
        held = view.get(m.msg_id)
        # (A copy behind the held one -- an older answer, a stale list
        # entry -- never undoes a deletion, a recall or a newer edit.)
        m = _not_behind(held, m)
        view[m.msg_id] = m
        if held is not None and held.seq != m.seq and seqs.get(held.seq) == m.msg_id:
            del seqs[held.seq]
        if m.kind == F.MessageKind.MESSAGE:
            seqs[m.seq] = m.msg_id
        if held is None or held.seq != m.seq:
            heapq.heappush(heap, (m.seq, m.msg_id))
        # Bounded memory: forget the lowest seqs (a history page brings them
        # back).  A heap entry counts only while its message is in the view
        # at that seq.
        limit = self.config.view_limit
        while len(view) > limit:
            seq, msg_id = heapq.heappop(heap)
            kept = view.get(msg_id)
            if kept is not None and kept.seq == seq:
                del view[msg_id]
                if seqs.get(seq) == msg_id:
                    del seqs[seq]
        if len(heap) > 2 * len(view) + 64:  # (stale entries: messages remembered again, at another seq)
            heap[:] = [(x.seq, x.msg_id) for x in view.values()]
            heapq.heapify(heap)

    def request_history(self, conv: str, from_seq: int, limit: int, backward: bool, now: int, *, timeout: Optional[int] = None) -> int:
        """Ask for a page of ``conv``'s history; returns the request id.  Its
        HistoryCompleted comes out of :meth:`completions`; the page is added
        to :meth:`view`.  Written once per connection (the broker answers each
        request it reads) and asked again on every new connection, until ``timeout`` µs (default
        ``send_timeout``) end it with HistoryTimeout.  Raises EncodeError for
        values no HistoryReq can carry, SendError (nothing sent) for a
        malformed ``conv`` (BAD_REQUEST) or a frame above max_frame
        (PAYLOAD_TOO_LARGE), the terminal error if CLOSED."""
        self._check_open()
        what = f"history of {_show(conv)}"
        self._check_request_conv(conv, what)
        req_id = self._next_req
        raw = self._request_frame(F.HistoryReq(req_id, conv, from_seq, limit, backward), what, conv)
        self._next_req += 1
        t = self._tick(now)
        h = _HistoryRequest(req_id, conv, raw, t + (self._send_timeout if timeout is None else max(0, timeout)))
        self._history[req_id] = h
        if self._state is SessionState.ACTIVE:
            self._ask_history(h)
        return req_id

    def cancel_history(self, req_id: int) -> None:
        """Nobody waits for ``req_id`` any more: stop asking (a late answer is ignored)."""
        self._history.pop(req_id, None)

    def _ask_history(self, h: _HistoryRequest) -> None:
        h.sent_at = self._t
        self._send(h.raw)

    def request_readers(self, conv: str, now: int, *, timeout: Optional[int] = None) -> int:
        """Ask how far each current member of ``conv`` has read; returns the
        request id.  Its ReadersCompleted comes out of :meth:`completions`.
        Asked again like a history request (:meth:`request_history`), until
        ``timeout`` µs (default ``send_timeout``) end it with HistoryTimeout.
        Raises EncodeError for values no ReadersReq can carry, SendError as
        :meth:`request_history` does, the terminal error if CLOSED."""
        self._check_open()
        what = f"readers of {_show(conv)}"
        self._check_request_conv(conv, what)
        req_id = self._next_req
        raw = self._request_frame(F.ReadersReq(req_id, conv), what, conv)
        self._next_req += 1
        t = self._tick(now)
        h = _HistoryRequest(req_id, conv, raw, t + (self._send_timeout if timeout is None else max(0, timeout)), True)
        self._history[req_id] = h
        if self._state is SessionState.ACTIVE:
            self._ask_history(h)
        return req_id

    def _check_request_conv(self, conv: str, what: str) -> None:
        """SendError(BAD_REQUEST), naming ``what`` ("history of 'team'"), at
        the call for a malformed conversation id:
        the broker refuses it, or (over its max_frame) closes the connection
        -- and a request is asked again on every new connection until its
        timeout (a new user's trial: a 2 MB id stalled the client 60 s)."""
        problem = conversation_problem(conv)
        if problem is not None:
            # (The reason given here, not by _request_error: that takes a
            # conv of None for a request without one, and fetch_history(None)
            # said "the broker found a field of the request invalid" -- a trial.)
            reason = f"invalid conversation id: {problem}"
            raise SendError(ErrorCode.BAD_REQUEST, 0, f"{what}: BAD_REQUEST: {reason}", reason=reason)

    def _request_frame(self, frame: F.Frame, what: str, conv: Optional[str]) -> bytes:
        """``frame`` encoded; SendError(PAYLOAD_TOO_LARGE) if it is above the
        broker's max_frame (its LoginAck's, else ClientConfig.max_frame),
        which would close the connection, as for a send (:meth:`_too_large`).
        Raises EncodeError as encode_frame does."""
        raw = encode_frame(frame)
        limit = self._max_frame if self._max_frame_announced else self.config.max_frame
        if len(raw) > limit:
            reason = f"its frame of {len(raw):,} bytes is above the broker's max_frame ({limit:,} bytes)"
            raise SendError(ErrorCode.PAYLOAD_TOO_LARGE, 0, f"{what}: PAYLOAD_TOO_LARGE: {reason}", reason=reason)
        return raw

    def _request_error(self, code: ErrorCode, what: str, conv: Optional[str]) -> SendError:
        """The SendError of a refused request (``what``: "history of 'team'"),
        with the reason in words (_refusal_reason) when there is one."""
        reason = _refusal_reason(code, conv, self.user)
        return SendError(code, 0, f"{what}: {code.name}" + (f": {reason}" if reason else ""), reason=reason)

    def _on_readers(self, f: F.ReadersResp) -> None:
        h = self._history.get(f.req_id)
        if h is None or not h.readers or h.kind:
            return  # cancelled, timed out, or already answered
        del self._history[f.req_id]
        if f.code != ErrorCode.OK:
            code = _error_code(f.code)
            self._completions.append(ReadersCompleted(f.req_id, (), self._request_error(code, f"readers of {h.conv!r}", h.conv)))
            return
        self._completions.append(ReadersCompleted(f.req_id, tuple(f.readers), None))

    def _on_history(self, f: F.HistoryResp) -> None:
        h = self._history.get(f.req_id)
        if h is not None and (h.readers or h.kind):
            return  # not the answer to this request
        h = self._history.pop(f.req_id, None)
        if h is None:
            return  # cancelled, timed out, or the answer to a re-ask already answered
        if f.code != ErrorCode.OK:
            code = _error_code(f.code)
            self._completions.append(HistoryCompleted(f.req_id, (), self._request_error(code, f"history of {h.conv!r}", h.conv)))
            return
        for m in f.messages:
            self._remember(m)
        self._completions.append(HistoryCompleted(f.req_id, tuple(f.messages), None, f.more))

    # ------------------------------------------------------------ typing and presence

    def typing(self, conv: str, now: int, active: bool = True) -> bool:
        """The user is typing in ``conv`` (``active``) or stopped.  Call it
        on every keystroke: while active, a Typing goes out at most once per
        ``typing_interval`` per conversation; a stop goes out only after an
        active one.  Ephemeral: dropped while not connected (nothing to
        catch up).  Returns whether a frame was sent.  Raises EncodeError
        for a conv no frame can carry, SendError(BAD_REQUEST) for a
        malformed one (nothing sent), the terminal error if CLOSED."""
        self._check_open()
        raw = encode_frame(F.Typing(conv, active))
        self._check_request_conv(conv, f"typing in {_show(conv)}")
        t = self._tick(now)
        last = self._typing_sent.get(conv)
        if active:
            if last is not None and t - last < _us(self.config.typing_interval):
                return False
        elif last is None:
            return False
        if self._state is not SessionState.ACTIVE:
            return False
        if active:
            self._typing_sent[conv] = t
        else:
            del self._typing_sent[conv]
        self._send(raw)
        return True

    def typing_users(self, conv: str) -> list[str]:
        """Users whose typing indicator in ``conv`` is on (sorted)."""
        t = self._t
        return sorted(u for (c, u), until in self._typing_seen.items() if c == conv and until > t)

    def _on_typing(self, f: F.Typing) -> None:
        key = (f.conv, f.user)
        if f.active and f.ttl_ms:
            until = self._t + f.ttl_ms * 1000
            self._typing_seen[key] = until
            self._emit(TypingChanged(f.conv, f.user, True, until - self._skew))
        elif self._typing_seen.pop(key, None) is not None:
            self._emit(TypingChanged(f.conv, f.user, False, 0))

    def _expire_typing(self, t: int) -> None:
        for key, until in sorted(self._typing_seen.items()):
            if until <= t:
                del self._typing_seen[key]
                self._emit(TypingChanged(key[0], key[1], False, 0))

    def subscribe_presence(self, users: Any, now: int) -> int:
        """Replace the presence subscription by ``users`` (an iterable of
        user ids; empty: unsubscribe); returns the request id.  The answer
        is a PresenceCompleted and a PresenceChanged per user; then every
        change comes as a PresenceChanged.  The subscription is sent again
        after every reconnect (the broker forgets it with the connection).
        Raises ValueError for an invalid user id (TypeError for one that is
        no str), nothing sent; the terminal error if CLOSED."""
        self._check_open()
        if isinstance(users, (str, bytes)):
            # (A str is iterable: "bob" would subscribe "b" and "o".)
            raise TypeError(f"subscribe_presence: users must be an iterable of user ids, not one {type(users).__name__}: "
                            f"[{users!r:.40}]")
        wanted = tuple(dict.fromkeys(users))
        for user in wanted:
            # (Sent, an invalid id came back as an unknown user, which hid the
            # mistake: a trial.)
            problem = id_problem(user, "user")
            if problem is not None:
                raise (TypeError if not isinstance(user, str) else ValueError)(f"subscribe_presence: {problem}")
        req_id = self._next_req
        raw = encode_frame(F.PresenceSub(req_id, tuple(F.PresenceUser(u) for u in wanted)))
        self._tick(now)
        self._next_req += 1
        self._presence_wanted = (req_id, wanted)
        self._presence_waiting.append(req_id)
        if self._state is SessionState.ACTIVE:
            self._send(raw)
        return req_id

    def set_presence_privacy(self, hide_last_seen: Optional[bool], now: int) -> int:
        """Hide (True) or show (False) this user's last-seen time to others,
        or only ask (None); returns the request id.  Durable on the broker
        and synced to the user's other devices.  Its PrivacyCompleted (and a
        PrivacyChanged) comes once the broker answered; asked again after a
        reconnect until then."""
        self._check_open()
        self._tick(now)
        mode = 0 if hide_last_seen is None else (2 if hide_last_seen else 1)
        req_id = self._next_req
        self._next_req += 1
        self._privacy_waiting[req_id] = mode
        if self._state is SessionState.ACTIVE:
            self._send(encode_frame(F.PresencePrivacy(mode)))
        return req_id

    def _resend_presence(self) -> None:
        """After a (re)login: the subscription, and unanswered privacy requests."""
        if self._presence_wanted is not None:
            req_id, users = self._presence_wanted
            if users or req_id in self._presence_waiting:
                self._send(encode_frame(F.PresenceSub(req_id, tuple(F.PresenceUser(u) for u in users))))
        for mode in sorted(set(self._privacy_waiting.values())):
            self._send(encode_frame(F.PresencePrivacy(mode)))

    def _presence_unknown(self) -> None:
        """The connection is down: whatever this session knew of the
        subscribed users may be stale by now, and nothing will tell it
        otherwise (the broker forgot the subscription with the
        connection), so no entry may go on claiming ONLINE or OFFLINE.
        Each becomes UNKNOWN -- the protocol's state for a user this
        client cannot see, which is what the user now is -- with its
        last_seen kept (still true as a lower bound: the user was online
        then, or later), and a PresenceChanged
        so that an app that follows the events alone stops showing it
        too.  Entries are kept, not dropped: the user set stays what was
        subscribed.  The subscription renewed at the next establish
        (_resend_presence) brings the broker's current states back."""
        for user, e in list(self.presence.items()):
            if e.state != F.PresenceState.UNKNOWN:
                self.presence[user] = F.PresenceEntry(user, F.PresenceState.UNKNOWN, e.last_seen)
                self._emit(PresenceChanged(user, F.PresenceState.UNKNOWN, e.last_seen))

    def _on_presence(self, f: F.Presence) -> None:
        wanted = self._presence_wanted
        done: list[int] = []
        if f.req_id:
            if wanted is None or f.req_id != wanted[0]:
                return  # the answer to a subscription replaced since
            done, self._presence_waiting = self._presence_waiting, []
            if f.code != ErrorCode.OK:
                code = _error_code(f.code)
                err = self._request_error(code, "presence subscription", None)
                if code is ErrorCode.PRESENCE_LIMIT:  # (it said no limit: the frame carries none, so the setting)
                    from dataclasses import fields

                    from .core import BrokerConfig

                    default = next(f.default for f in fields(BrokerConfig) if f.name == "presence_max_users")
                    reason = (f"{len(wanted[1]):,} users are more than the broker takes in one subscription (its"
                              f" [server] presence_max_users, {default} by default): subscribe to fewer")
                    err = SendError(code, 0, f"presence subscription: {code.name}: {reason}", reason=reason)
                # The broker kept the previous subscription: so does the session
                # (and sends that one again after a reconnect).
                self._presence_wanted = (f.req_id, self._presence_users)
                for req in done:
                    self._completions.append(PresenceCompleted(req, (), err))
                return
            self._presence_users = wanted[1]
            for u in [u for u in self.presence if u not in wanted[1]]:
                del self.presence[u]
        # The codec decodes a state as a plain int: make it a PresenceState
        # (one this version does not know: UNKNOWN) for the answer, the
        # presence map and the events alike.
        entries = tuple(F.PresenceEntry(e.user, _presence_state(e.state), e.last_seen) for e in f.entries)
        for req in done:
            self._completions.append(PresenceCompleted(req, entries, None))
        users = self._presence_users
        for e in entries:
            if e.user not in users:
                continue
            self.presence[e.user] = e
            self._emit(PresenceChanged(e.user, _presence_state(e.state), e.last_seen))

    def _on_privacy(self, f: F.PresencePrivacy) -> None:
        if f.mode not in (1, 2):
            return
        hide = f.mode == 2
        if self.hide_last_seen is not hide:
            self.hide_last_seen = hide
            self._emit(PrivacyChanged(hide))
        for req, mode in list(self._privacy_waiting.items()):
            if mode in (0, f.mode):
                del self._privacy_waiting[req]
                self._completions.append(PrivacyCompleted(req, hide))
    # ------------------------------------------------------------ conversation list

    def list_conversations(
        self, now: int, *, cursor: bytes = b"", limit: int = 50, include_hidden: bool = False, timeout: Optional[int] = None
    ) -> int:
        """Ask for a page of the user's conversation list (pinned first, then
        by last activity, newest first); returns the request id.  Its
        :class:`ConversationsCompleted` comes out of :meth:`completions`;
        pass its ``cursor`` for the next page.  Hidden conversations are
        left out unless ``include_hidden``.  The entries go into
        :attr:`conversations`.  Asked again like a history request until
        answered or ``timeout`` µs (default ``send_timeout``).  Raises
        TypeError for a ``cursor`` that is no bytes or an ``include_hidden``
        that is no bool, EncodeError for values no ConvListReq can carry,
        SendError(PAYLOAD_TOO_LARGE) for a frame above max_frame (nothing
        sent), the terminal error if CLOSED."""
        self._check_open()
        if not isinstance(cursor, bytes):
            raise TypeError(f"list_conversations: cursor must be bytes (a page's cursor), not {type(cursor).__name__}")
        if type(include_hidden) is not bool:
            raise TypeError(f"list_conversations: include_hidden must be True or False, not {include_hidden!r:.40}")
        req_id = self._next_req
        raw = self._request_frame(F.ConvListReq(req_id, cursor, limit, include_hidden), "list_conversations", None)
        return self._ask_new(req_id, "", raw, now, timeout, "convlist")

    def set_conversation(
        self, conv: str, now: int, *, pinned: Optional[bool] = None, muted: Optional[bool] = None,
        hidden: Optional[bool] = None, timeout: Optional[int] = None,
    ) -> int:
        """Change the user's own settings of ``conv`` (None = leave as is):
        ``pinned``, ``muted`` (the host's message events then list the user
        under ``muted``, for push notifications) and ``hidden`` (left out of
        the list until the conversation's next message).  Synced: every
        device of the user gets a :class:`ConversationUpdated`.  Returns
        the request id; its :class:`ConversationSetCompleted` comes out of
        :meth:`completions` once durable.  Sent again on every new
        connection until answered (setting a value twice is harmless).
        Raises SendError as :meth:`request_history` does."""
        self._check_open()
        for name, x in (("pinned", pinned), ("muted", muted), ("hidden", hidden)):
            if x is not None and type(x) is not bool:
                # ("no" and "false" are truthy: they would set it.)
                raise TypeError(f"set_conversation: {name} must be True, False or None, not {x!r:.40}")

        def v(x: Optional[bool]) -> int:
            return F.SETTING_KEEP if x is None else (F.SETTING_ON if x else F.SETTING_OFF)

        what = f"set_conversation of {_show(conv)}"
        self._check_request_conv(conv, what)
        req_id = self._next_req
        raw = self._request_frame(F.ConvSetReq(req_id, conv, v(pinned), v(muted), v(hidden)), what, conv)
        return self._ask_new(req_id, conv, raw, now, timeout, "convset")

    def _ask_new(self, req_id: int, conv: str, raw: bytes, now: int, timeout: Optional[int], kind: str) -> int:
        self._next_req += 1
        t = self._tick(now)
        h = _HistoryRequest(req_id, conv, raw, t + (self._send_timeout if timeout is None else max(0, timeout)), kind=kind)
        self._history[req_id] = h
        if self._state is SessionState.ACTIVE:
            self._ask_history(h)
        return req_id

    def _take_answer(self, req_id: int, kind: str) -> Optional[_HistoryRequest]:
        h = self._history.get(req_id)
        if h is None or h.kind != kind:
            return None  # cancelled, timed out, answered, or not this kind of request
        del self._history[req_id]
        return h

    def _on_conv_list(self, f: F.ConvListResp) -> None:
        h = self._take_answer(f.req_id, "convlist")
        if h is None:
            return
        if f.code != ErrorCode.OK:
            code = _error_code(f.code)
            self._completions.append(
                ConversationsCompleted(f.req_id, (), b"", False, self._request_error(code, "conversation list", None))
            )
            return
        for e in f.entries:
            self._adopt_entry(e)
        self._completions.append(ConversationsCompleted(f.req_id, tuple(f.entries), f.cursor, f.more, None))

    def _on_conv_set(self, f: F.ConvSetResp) -> None:
        h = self._take_answer(f.req_id, "convset")
        if h is None:
            return
        error = None
        if f.code != ErrorCode.OK:
            code = _error_code(f.code)
            error = self._request_error(code, f"settings of {f.conv!r}", f.conv)
        self._completions.append(ConversationSetCompleted(f.req_id, f.conv, error))

    def _adopt_entry(self, e: F.ConvEntry) -> F.ConvEntry:
        """Hold the broker's entry ``e`` (a page's, a ConvUpdate's) as
        this device knows it, and return what is held: its ``last`` never
        behind the copy of that message the device holds (:func:`_not_behind`:
        a deletion for oneself, a recall, a newer edit stay), and the view
        takes ``last`` by the same rule.  ``last_seq`` is the seq of ``last``
        on both sides (never ReadState's last_seq, which counts RECALL/EDIT
        entries too): an entry whose ``last_seq`` is below the held one's is
        an answer older than a message a push brought."""
        old = self.conversations.get(e.conv)
        if old is not None and old.last_seq > e.last_seq:
            # A push already brought a newer message than this (older) answer.
            e = dataclasses.replace(e, last=old.last, last_seq=old.last_seq, hidden=False)
        last = tuple(_not_behind(self._held_copy(m), m) for m in e.last)
        if last != e.last:
            e = dataclasses.replace(e, last=last)
        self.conversations[e.conv] = e
        self._entry_counted[e.conv] = e.last_seq
        for m in e.last:
            self._remember(m)
        return e

    def _held_copy(self, m: F.Message) -> Optional[F.Message]:
        """The copy of ``m`` (same msg_id) the local view holds, if any."""
        return self._views.get(m.conv, {}).get(m.msg_id)

    def _own_entry(self, m: F.Message) -> None:
        """This device's own message or amend, durable (its SendAck): the
        conversation's read state and list entry take it as the broker's
        do, as a pushed message of the user's would (never unread; the
        sender's marker does not move).  The broker pushes a device none of
        its own entries, and sends it no ReadStates or ConvUpdate for them:
        without this, ``read_state(conv).last_seq`` and the list entry left
        the device's own messages out until the next ones came (a new
        user's trial)."""
        st = self.read_states.get(m.conv)
        if st is None:
            st = F.ReadState(m.conv, 0, 0, 0)
        if m.seq > st.last_seq:
            self.read_states[m.conv] = F.ReadState(m.conv, st.read_seq, m.seq, st.unread)
        self._entry_pushed(m, pushed=False)

    def _entry_pushed(self, m: F.Message, pushed: bool = True) -> None:
        """The list entry of ``m.conv`` (if held) takes ``m``, pushed or
        (``pushed`` False) this device's own, as the broker's list does: a
        new last message (un-hidden); a pushed one counts (unread, mention)
        if past what the entry accounts for; an amend changes how the last
        one shows."""
        e = self.conversations.get(m.conv)
        if e is None:
            return
        if m.kind in AMEND_KINDS:
            # Not a new last message (no reorder, no un-hide): a recall or an
            # edit of the last message changes how it shows, as the broker's
            # list would (its tombstone, its new payload).
            last = e.last[0] if e.last else None
            if last is None or last.seq != m.target or last.kind != F.MessageKind.MESSAGE:
                return
            if m.kind == F.MessageKind.RECALL and not last.recalled:
                last = dataclasses.replace(last, payload=b"", recalled=True)
            elif m.kind == F.MessageKind.EDIT and not (last.recalled or last.deleted) and m.server_time >= last.edited:
                last = dataclasses.replace(last, payload=m.payload, edited=m.server_time)
            elif m.kind == F.MessageKind.DELETE and m.sender == self.user and not last.deleted:
                # Deleted for this user (only their own DELETE entries reach
                # them): `last` shows it deleted, as the broker's list does.
                last = dataclasses.replace(last, payload=b"", deleted=True)
            else:
                return
            self.conversations[m.conv] = dataclasses.replace(e, last=(last,))
            return
        counted = mentioned = False
        if pushed and m.seq > self._entry_counted.get(m.conv, 0):
            self._entry_counted[m.conv] = m.seq
            counted = m.kind == F.MessageKind.MESSAGE and m.sender != self.user and m.seq > e.read_seq
            mentioned = counted and self._mentions_me(m)
        if m.seq > e.last_seq:
            e = dataclasses.replace(e, last=(m,), last_seq=m.seq, hidden=False)
        elif not counted:
            return
        self.conversations[m.conv] = dataclasses.replace(
            e, unread=e.unread + counted, mention_count=e.mention_count + mentioned)

    # ------------------------------------------------------------ completions

    def completions(self) -> list[Completion]:
        """Sends and history requests that finished since the last call, in
        the order they finished (drains)."""
        done, self._completions = self._completions, []
        return done
