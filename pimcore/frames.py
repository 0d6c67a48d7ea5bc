"""The frames of the PIM wire protocol, as frozen, slotted dataclasses.

One definition serves both codec backends (the Cython fast path and its pure
Python twin), so "same API" holds by construction: both decode to exactly these
classes and encode exactly these classes.  The field order below IS the wire
order of each frame body (docs/PROTOCOL.md is the normative spec).

Field kinds on the wire:

* ``u``     unsigned LEB128 varint, 0 .. 2**64-1
* ``s``     signed varint, zigzag then LEB128, -2**63 .. 2**63-1
* ``b``     bytes: ``u`` length then the raw bytes
* ``t``     text: ``b`` holding UTF-8
* ``?``     bool: one byte, 0 or 1 (anything else is malformed)
* ``[X]``   list: ``u`` count then that many X

Times are integers in microseconds since the Unix epoch.  ``server_time`` is the
broker's hybrid logical clock (strictly increasing per broker, never backwards);
``client_time`` is the sender's local clock, which may be skewed arbitrarily.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Union

__all__ = [
    "FrameType",
    "PROTOCOL_VERSION",
    "CAP_ZSTD",
    "CAP_DEFLATE_DOWN",
    "CAP_DEFLATE_UP",
    "CAP_CONV_PURGED",
    "Login",
    "LoginAck",
    "CalibrateReq",
    "CalibrateResp",
    "SendReq",
    "SendAck",
    "Message",
    "Push",
    "PushAck",
    "Read",
    "ReadState",
    "ReadStates",
    "ReadReceipt",
    "HistoryReq",
    "HistoryResp",
    "ReadersReq",
    "Reader",
    "ReadersResp",
    "AmendReq",
    "Mention",
    "ConvEntry",
    "ConvListReq",
    "ConvListResp",
    "ConvSetReq",
    "ConvSetResp",
    "ConvUpdate",
    "ConvPurged",
    "SETTING_KEEP",
    "SETTING_ON",
    "SETTING_OFF",
    "MessageKind",
    "Typing",
    "PresenceUser",
    "PresenceSub",
    "PresenceEntry",
    "Presence",
    "PresencePrivacy",
    "PresenceState",
    "Ping",
    "Pong",
    "Error",
    "Close",
    "Frame",
    "FRAME_CLASSES",
]

#: In the high nibble of every frame's head byte.  2 added the store epoch
#: (Login/LoginAck), causality (SendReq/Message.after_seq, Message.local_id),
#: membership entries (Message.kind) and ReadersReq/ReadersResp.  3 added the
#: IM features of issue 14 (recall, edit, delete; conversation list; typing
#: and presence; mentions).  4 added Login.sent (the positions of a device's
#: own sends, checked after the store went back in time) and LoginAck.states.
PROTOCOL_VERSION = 4

#: Capability bits exchanged in Login.caps / LoginAck.caps.
CAP_ZSTD = 1 << 0
#: Broker -> client frames may be compressed in one deflate stream per
#: connection (PROTOCOL.md section 7.2); takes precedence over CAP_ZSTD there.
CAP_DEFLATE_DOWN = 1 << 1
#: Client -> broker frames may be compressed in one deflate stream per
#: connection; takes precedence over CAP_ZSTD in that direction.
CAP_DEFLATE_UP = 1 << 2
#: The client takes ConvPurged frames (a device online during a purge is
#: told what it removed); a broker sends none to a client without it.
CAP_CONV_PURGED = 1 << 3


class FrameType(IntEnum):
    LOGIN = 0x01
    LOGIN_ACK = 0x02
    CALIBRATE_REQ = 0x03
    CALIBRATE_RESP = 0x04
    SEND_REQ = 0x05
    SEND_ACK = 0x06
    PUSH = 0x07
    PUSH_ACK = 0x08
    READ = 0x09
    READ_STATES = 0x0A
    READ_RECEIPT = 0x0B
    HISTORY_REQ = 0x0C
    HISTORY_RESP = 0x0D
    PING = 0x0E
    PONG = 0x0F
    ERROR = 0x10
    CLOSE = 0x11
    READERS_REQ = 0x12
    READERS_RESP = 0x13
    AMEND_REQ = 0x14
    CONV_PURGED = 0x15  # only to a client that asked for CAP_CONV_PURGED
    # conversation list and per-user settings (issue 14 part 2)
    CONV_LIST_REQ = 0x16
    CONV_LIST_RESP = 0x17
    CONV_SET_REQ = 0x18
    CONV_SET_RESP = 0x19
    CONV_UPDATE = 0x1A
    # 0x1C..0x1F: typing and presence (issue 14 part 3)
    TYPING = 0x1C
    PRESENCE_SUB = 0x1D
    PRESENCE = 0x1E
    PRESENCE_PRIVACY = 0x1F


class MessageKind(IntEnum):
    """What a conversation entry is (``Message.kind``).  Every kind is seq'd,
    stored and delivered like a message; only MESSAGE has a client payload."""

    MESSAGE = 0
    #: ``sender`` joined the group at this seq (payload: the user who added
    #: them, UTF-8, empty when it was the host).
    JOINED = 1
    #: ``sender`` left or was removed at this seq (payload as for JOINED).
    LEFT = 2
    #: ``sender`` (or the host: empty sender) recalled the message at seq
    #: ``target``; its payload is gone for good (payload empty).
    RECALL = 3
    #: ``sender`` (or the host) replaced the payload of the message at seq
    #: ``target``; payload: the message's payload now (the latest edit).
    EDIT = 4
    #: ``sender`` deleted the message at seq ``target`` for themselves: seq
    #: 0 (not an entry of the conversation), delivered only to the sender's
    #: own devices, in their inbox order (payload empty).
    DELETE = 5


# --------------------------------------------------------------- session


@dataclass(frozen=True, slots=True)
class Login:
    """Client -> broker, first frame on a connection.

    ``position`` is the client's resume cursor: the highest inbox position this
    device has processed (0 for a fresh install).  ``epoch`` names the store
    that position came from (LoginAck.epoch of an earlier session; empty for a
    fresh install).  When the epoch is the broker's, delivery resumes after
    max(position, the device's stored acked position); otherwise the position
    means nothing here and the broker answers with ``resync`` (LoginAck).

    ``sent`` is the highest inbox position of this device's own sends it
    was told in ``epoch`` (a Push that skips them: PROTOCOL.md), 0 when it
    knows none above ``position``.  It moves nothing: delivery still resumes
    after ``position`` (what the app took).  It is checked with
    ``position`` when the store may have gone back in time: a device whose
    app took less than it sent (messages still queued) is resynchronized,
    like one whose cursor names refilled positions, when its sends are gone.
    """

    TYPE: ClassVar[FrameType] = FrameType.LOGIN
    token: bytes  # b
    device: str  # t
    client_time: int  # s
    position: int  # u
    caps: int  # u
    epoch: bytes = b""  # b
    sent: int = 0  # u


@dataclass(frozen=True, slots=True)
class LoginAck:
    """Broker -> client.  Delivery resumes after ``position``.

    ``gap`` is true when entries after the client's cursor were already
    reclaimed (the device was away longer than the retention period): the
    client should refill its conversations with HistoryReq.

    ``epoch`` names the broker store's history (16 bytes; a new one at every
    start of the broker, and the store remembers which earlier ones it still
    vouches for).  ``resync`` is true when the client's state was not
    honoured because its epoch is not one of those, or its position lay
    beyond ``head``: the client must drop every
    cursor it holds (inbox position, last seqs, read markers it has not had
    confirmed) and rebuild them from this session; delivery starts over
    from the user's inbox floor (``position``; ``gap`` if entries were
    already reclaimed), so the client gets every entry this store holds.

    ``states`` is how many ReadState entries this login sends (the first
    ones after it, in one or more ReadStates): one for every conversation
    of the user's list.  A conversation the client held state of that is
    not among them left the list while it was away (purged): it drops that
    state (its unread count, its list entry).
    """

    TYPE: ClassVar[FrameType] = FrameType.LOGIN_ACK
    user: str  # t
    device: str  # t
    server_time: int  # u
    position: int  # u
    head: int  # u   highest inbox position of the user right now
    gap: bool  # ?
    max_frame: int  # u
    max_payload: int  # u
    window: int  # u   max SendReqs in flight on this connection
    heartbeat_ms: int  # u   0 = no heartbeat expected
    caps: int  # u
    epoch: bytes = b""  # b   16 bytes
    resync: bool = False  # ?
    states: int = 0  # u   ReadState entries of this login that follow


@dataclass(frozen=True, slots=True)
class CalibrateReq:
    TYPE: ClassVar[FrameType] = FrameType.CALIBRATE_REQ
    client_time: int  # s


@dataclass(frozen=True, slots=True)
class CalibrateResp:
    TYPE: ClassVar[FrameType] = FrameType.CALIBRATE_RESP
    client_time: int  # s   echoed from the request
    server_time: int  # u


# --------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Mention:
    """One mentioned user (SendReq.mentions, Message.mentions)."""

    user: str  # t


@dataclass(frozen=True, slots=True)
class SendReq:
    """Client -> broker.  ``local_id`` is chosen by the client, unique per device
    and increasing in send order; a retry MUST reuse it (that is what makes
    retries safe).  ``after_seq`` is the highest seq of ``conv`` this device
    had seen (received, fetched, or acked for its own sends) when the user
    sent the message: display order never shows the message above those.
    The broker clamps it to the conversation's last seq."""

    TYPE: ClassVar[FrameType] = FrameType.SEND_REQ
    local_id: int  # u
    conv: str  # t
    client_time: int  # s
    payload: bytes  # b
    after_seq: int = 0  # u
    #: Users the message mentions (metadata outside the opaque payload; at
    #: most Limits.max_mentions, each a valid user id, else the SendAck
    #: says TOO_MANY_MENTIONS / BAD_MENTION).  Mentioned users who are not
    #: members of ``conv`` are ignored (they get nothing).
    mentions: tuple[Mention, ...] = ()  # [Mention]
    #: The message mentions everyone: every member but the sender.
    mention_all: bool = False  # ?


@dataclass(frozen=True, slots=True)
class SendAck:
    """Broker -> client, sent only once the message is durable.

    On success ``code`` is 0 and the rest identifies the stored message (a retry
    gets exactly the same values).  On failure ``msg_id`` is empty and ``seq``
    and ``server_time`` are 0.
    """

    TYPE: ClassVar[FrameType] = FrameType.SEND_ACK
    local_id: int  # u
    code: int  # u   ErrorCode
    msg_id: bytes  # b   16 bytes on success
    seq: int  # u   per-conversation sequence, gap-free from 1
    server_time: int  # u


@dataclass(frozen=True, slots=True)
class Message:
    """One stored conversation entry as delivered (inside Push and HistoryResp).

    ``position`` is the position in the receiving user's inbox (0 in
    HistoryResp).  ``kind`` is a MessageKind; ``local_id`` and ``after_seq``
    are the sender device's, from its SendReq (0 for entries the broker made),
    and are what display order needs to respect causality.
    """

    position: int  # u
    msg_id: bytes  # b
    conv: str  # t
    seq: int  # u
    sender: str  # t
    device: str  # t   the sender's device
    client_time: int  # s
    server_time: int  # u
    payload: bytes  # b
    kind: int = 0  # u   MessageKind
    local_id: int = 0  # u
    after_seq: int = 0  # u
    #: RECALL / EDIT / DELETE: the seq of the message it acts on; else 0.
    target: int = 0  # u
    #: MESSAGE: server time (µs) of its latest edit, 0 = never edited.
    edited: int = 0  # u
    #: MESSAGE: recalled (a tombstone: payload empty).
    recalled: bool = False  # ?
    #: MESSAGE, in HistoryResp only: the asking user deleted it for
    #: themselves (payload empty).
    deleted: bool = False  # ?
    #: SendReq.mentions / mention_all as stored (sorted, no duplicates, the
    #: sender left out).
    mentions: tuple[Mention, ...] = ()  # [Mention]
    mention_all: bool = False  # ?


@dataclass(frozen=True, slots=True)
class Push:
    """Broker -> client: a batch of inbox entries.

    Every inbox position <= ``upto`` is covered by this and earlier pushes;
    positions absent from ``messages`` are entries this device does not need
    (its own sends).  The client acknowledges cumulatively with PushAck(upto).
    """

    TYPE: ClassVar[FrameType] = FrameType.PUSH
    position: int  # u
    messages: tuple[Message, ...]  # [Message]


@dataclass(frozen=True, slots=True)
class PushAck:
    """Client -> broker: every inbox position <= ``pos`` is safely processed."""

    TYPE: ClassVar[FrameType] = FrameType.PUSH_ACK
    position: int  # u


# --------------------------------------------------------------- read state


@dataclass(frozen=True, slots=True)
class Read:
    """Client -> broker: the user has read ``conv`` up to ``seq``."""

    TYPE: ClassVar[FrameType] = FrameType.READ
    conv: str  # t
    seq: int  # u


@dataclass(frozen=True, slots=True)
class ReadState:
    conv: str  # t
    read_seq: int  # u   the user's read marker (never decreases)
    last_seq: int  # u   the conversation's last sequence number
    unread: int  # u   messages from others after the marker


@dataclass(frozen=True, slots=True)
class ReadStates:
    """Broker -> the user's devices: read markers (one live, all at login)."""

    TYPE: ClassVar[FrameType] = FrameType.READ_STATES
    entries: tuple[ReadState, ...]  # [ReadState]


@dataclass(frozen=True, slots=True)
class ReadReceipt:
    """Broker -> the peer of a 1:1 chat: ``reader`` has read up to ``seq``."""

    TYPE: ClassVar[FrameType] = FrameType.READ_RECEIPT
    conv: str  # t
    reader: str  # t
    seq: int  # u


# --------------------------------------------------------------- history


@dataclass(frozen=True, slots=True)
class HistoryReq:
    """Client -> broker: a page of ``conv``'s history.

    Forward (``backward`` false): seq > ``from_seq`` ascending.  Backward: seq <
    ``from_seq`` descending, where from_seq 0 means "from the newest".
    """

    TYPE: ClassVar[FrameType] = FrameType.HISTORY_REQ
    req_id: int  # u
    conv: str  # t
    from_seq: int  # u
    limit: int  # u
    backward: bool  # ?


@dataclass(frozen=True, slots=True)
class HistoryResp:
    TYPE: ClassVar[FrameType] = FrameType.HISTORY_RESP
    req_id: int  # u
    conv: str  # t
    code: int  # u   ErrorCode
    messages: tuple[Message, ...]  # [Message]
    more: bool  # ?


@dataclass(frozen=True, slots=True)
class ReadersReq:
    """Client -> broker: how far has each member of ``conv`` read?"""

    TYPE: ClassVar[FrameType] = FrameType.READERS_REQ
    req_id: int  # u
    conv: str  # t


@dataclass(frozen=True, slots=True)
class Reader:
    user: str  # t
    read_seq: int  # u   clamped to the seqs the user was a member for


@dataclass(frozen=True, slots=True)
class ReadersResp:
    """Broker -> client: the read markers of ``conv``'s current members (the
    asking user included), sorted by user id; ``code`` is non-zero (and
    ``readers`` empty) when the user may not ask (not a member)."""

    TYPE: ClassVar[FrameType] = FrameType.READERS_RESP
    req_id: int  # u
    conv: str  # t
    code: int  # u   ErrorCode
    readers: tuple[Reader, ...]  # [Reader]


@dataclass(frozen=True, slots=True)
class AmendReq:
    """Client -> broker: recall, edit or delete-for-self the message at seq
    ``target`` of ``conv`` (``action``: MessageKind RECALL, EDIT or DELETE).
    ``payload`` is the new payload of an EDIT (empty otherwise).  Like a
    SendReq: ``local_id`` from the same sequence as the device's SendReqs (a
    retry reuses it), answered by one SendAck once the entry is durable
    (``seq`` 0 for a DELETE, which takes no seq of the conversation)."""

    TYPE: ClassVar[FrameType] = FrameType.AMEND_REQ
    local_id: int  # u
    conv: str  # t
    target: int  # u
    action: int  # u   MessageKind RECALL, EDIT or DELETE
    client_time: int  # s
    payload: bytes = b""  # b
# --------------------------------------------------------------- conversation list

#: ConvSetReq values of ``pinned`` / ``muted`` / ``hidden``.
SETTING_KEEP = 0
SETTING_ON = 1
SETTING_OFF = 2


@dataclass(frozen=True, slots=True)
class ConvEntry:
    """One conversation of the user's conversation list.

    ``last`` holds the last message of the conversation the user may see:
    its last MESSAGE, JOINED or LEFT entry as it is now (recalled: the
    tombstone; edited: the new payload), never a RECALL/EDIT entry (0 or
    1 Message, position 0; empty while the conversation has none).  The list
    is ordered pinned first, then by the server time of ``last`` (newest
    first), then by ``conv``.  ``mention_count``: messages after the read
    marker that mention the user (by id or everyone).  ``hidden``: hidden
    until the next message of the conversation (ConvSetReq; not a recall
    or edit)."""

    conv: str  # t
    last: tuple[Message, ...]  # [Message]   0 or 1
    read_seq: int  # u
    last_seq: int  # u   the seq of ``last`` (0: none)
    unread: int  # u
    mention_count: int  # u
    pinned: bool  # ?
    muted: bool  # ?
    hidden: bool  # ?


@dataclass(frozen=True, slots=True)
class ConvListReq:
    """Client -> broker: a page of the user's conversation list.  ``cursor``
    is empty for the first page, else ConvListResp.cursor of the previous
    page (opaque).  Hidden conversations are left out unless
    ``include_hidden``."""

    TYPE: ClassVar[FrameType] = FrameType.CONV_LIST_REQ
    req_id: int  # u
    cursor: bytes  # b
    limit: int  # u
    include_hidden: bool  # ?


@dataclass(frozen=True, slots=True)
class ConvListResp:
    """Broker -> client: the page; ``cursor`` names its last entry (pass it
    to get the next page), ``more`` says whether there is one.  A malformed
    cursor: ``code`` BAD_CURSOR and no entries."""

    TYPE: ClassVar[FrameType] = FrameType.CONV_LIST_RESP
    req_id: int  # u
    code: int  # u   ErrorCode
    entries: tuple[ConvEntry, ...]  # [ConvEntry]
    cursor: bytes  # b
    more: bool  # ?


@dataclass(frozen=True, slots=True)
class ConvSetReq:
    """Client -> broker: change the user's settings of ``conv`` (every one
    SETTING_KEEP, SETTING_ON or SETTING_OFF).  ``hidden`` ON hides the
    conversation until its next entry.  Answered with ConvSetResp; when
    something changed every device of the user gets a ConvUpdate."""

    TYPE: ClassVar[FrameType] = FrameType.CONV_SET_REQ
    req_id: int  # u
    conv: str  # t
    pinned: int  # u
    muted: int  # u
    hidden: int  # u


@dataclass(frozen=True, slots=True)
class ConvSetResp:
    TYPE: ClassVar[FrameType] = FrameType.CONV_SET_RESP
    req_id: int  # u
    conv: str  # t
    code: int  # u   ErrorCode


@dataclass(frozen=True, slots=True)
class ConvUpdate:
    """Broker -> every device of the user: these conversation-list entries
    changed (settings changed, or the read marker moved).  A new entry in a
    conversation is learned from its Push instead."""

    TYPE: ClassVar[FrameType] = FrameType.CONV_UPDATE
    entries: tuple[ConvEntry, ...]  # [ConvEntry]


@dataclass(frozen=True, slots=True)
class ConvPurged:
    """Broker -> every device of a member online when the host purged
    ``conv`` (PROTOCOL.md, Retention and purge), if its Login asked for
    CAP_CONV_PURGED: the entries up to ``last_seq`` are gone (a client drops
    what it holds of them); ``gone``: the conversation too (a group: its
    read state and list entry with it; if the host creates it again, its
    seqs continue after ``last_seq``).  A 1:1 chat stays (``gone`` false).
    Retention is not told this way (a client may keep what retention
    removed)."""

    TYPE: ClassVar[FrameType] = FrameType.CONV_PURGED
    conv: str  # t
    last_seq: int  # u
    gone: bool  # ?


# --------------------------------------------------------------- typing and presence
# Ephemeral signals: nothing here is stored (but the PresencePrivacy setting).


@dataclass(frozen=True, slots=True)
class Typing:
    """Both directions.  Client -> broker: this user is typing in ``conv``
    (``active``) or stopped; ``user`` and ``ttl_ms`` are sent empty / 0 and
    ignored.  Broker -> the other members' online devices: ``user`` is
    typing in ``conv``; the indicator expires by itself ``ttl_ms`` ms after
    this frame arrived unless another Typing refreshes it (``active`` false:
    stopped, ``ttl_ms`` 0).  Never stored, never acknowledged."""

    TYPE: ClassVar[FrameType] = FrameType.TYPING
    conv: str  # t
    active: bool  # ?
    user: str = ""  # t
    ttl_ms: int = 0  # u


@dataclass(frozen=True, slots=True)
class PresenceUser:
    user: str  # t


@dataclass(frozen=True, slots=True)
class PresenceSub:
    """Client -> broker: replace this connection's presence subscription by
    ``users`` (empty: unsubscribe).  Answered by Presence(req_id)."""

    TYPE: ClassVar[FrameType] = FrameType.PRESENCE_SUB
    req_id: int  # u
    users: tuple[PresenceUser, ...]  # [PresenceUser]


class PresenceState(IntEnum):
    """``PresenceEntry.state``."""

    #: Not visible to the subscriber (shares no conversation with them).
    UNKNOWN = 0
    OFFLINE = 1
    ONLINE = 2


@dataclass(frozen=True, slots=True)
class PresenceEntry:
    user: str  # t
    state: int  # u   PresenceState
    last_seen: int  # u   µs server time the user was last online; 0 = hidden or unknown


@dataclass(frozen=True, slots=True)
class Presence:
    """Broker -> client.  The answer to PresenceSub ``req_id`` (every user
    asked for, in the order asked) or, with ``req_id`` 0, changes of
    subscribed users.  ``code`` non-zero: the subscription was refused and
    left as it was (``entries`` empty)."""

    TYPE: ClassVar[FrameType] = FrameType.PRESENCE
    req_id: int  # u
    code: int  # u   ErrorCode
    entries: tuple[PresenceEntry, ...]  # [PresenceEntry]


@dataclass(frozen=True, slots=True)
class PresencePrivacy:
    """Both directions: the user's durable "hide my last-seen time" setting.
    Client -> broker: ``mode`` 0 asks, 1 shows, 2 hides.  Broker -> client:
    the current setting (1 or 2), to the asking connection once durable and,
    after a change, to the user's other online devices."""

    TYPE: ClassVar[FrameType] = FrameType.PRESENCE_PRIVACY
    mode: int  # u


# --------------------------------------------------------------- control


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[FrameType] = FrameType.PING
    nonce: int  # u


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[FrameType] = FrameType.PONG
    nonce: int  # u


@dataclass(frozen=True, slots=True)
class Error:
    """A request failed but the connection stays open.  ``ref`` names the
    request when it has an id (the local_id of a REJECTED SendReq), else 0."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    code: int  # u   ErrorCode
    ref: int  # u
    reason: str  # t


@dataclass(frozen=True, slots=True)
class Close:
    """The sender is about to close the connection, and why."""

    TYPE: ClassVar[FrameType] = FrameType.CLOSE
    code: int  # u   CloseCode
    reason: str  # t


Frame = Union[
    Login,
    LoginAck,
    CalibrateReq,
    CalibrateResp,
    SendReq,
    SendAck,
    Push,
    PushAck,
    Read,
    ReadStates,
    ReadReceipt,
    HistoryReq,
    HistoryResp,
    ReadersReq,
    ReadersResp,
    AmendReq,
    ConvListReq,
    ConvListResp,
    ConvSetReq,
    ConvSetResp,
    ConvUpdate,
    ConvPurged,
    Typing,
    PresenceSub,
    Presence,
    PresencePrivacy,
    Ping,
    Pong,
    Error,
    Close,
]

#: type byte -> class, for both decoders and for tests.
FRAME_CLASSES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        Login,
        LoginAck,
        CalibrateReq,
        CalibrateResp,
        SendReq,
        SendAck,
        Push,
        PushAck,
        Read,
        ReadStates,
        ReadReceipt,
        HistoryReq,
        HistoryResp,
        ReadersReq,
        ReadersResp,
        AmendReq,
        ConvListReq,
        ConvListResp,
        ConvSetReq,
        ConvSetResp,
        ConvUpdate,
        ConvPurged,
        Typing,
        PresenceSub,
        Presence,
        PresencePrivacy,
        Ping,
        Pong,
        Error,
        Close,
    )
}
