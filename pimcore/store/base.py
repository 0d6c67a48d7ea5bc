"""The store boundary: what the broker core needs from durable storage.

Why this shape
--------------
* **Every store access is a request.**  The core never calls the store: it
  emits a :class:`StoreRequest` (an id and a tuple of ops) and is told later
  what came of it (``Broker.store_completed`` / ``Broker.store_failed``).  A
  write request is one transaction and one sync (group commit across every
  connection; at most one in flight).  Read requests are shaped like the
  core's questions (:class:`LoadSession` at login, :class:`ReadInbox` for a
  device that is behind, :class:`ReadHistory`); many may be in flight and
  they may complete in any order.  The driver decides where a request runs:
  inline for local LMDB (reads are memory-mapped and take microseconds, so a
  local store pays nothing), in a worker thread, or awaited over a network.
* **Two contracts.**  :class:`Store` executes synchronously
  (:meth:`Store.execute`); :class:`AsyncStore` is awaited
  (:meth:`AsyncStore.execute`), for networked backends.  The network layer
  drives either.
* **The store is authoritative for everything that must be atomic with the
  message**: dedupe, the gap-free conversation sequence, the inbox positions of
  every recipient and the membership check all happen inside the transaction
  that stores the message.  A retry racing its original therefore can never be
  stored twice, whatever the core believes.  Group admin (:class:`CreateGroup`,
  :class:`AddMembers`, :class:`RemoveMembers`) is ordinary ops of a batch, so
  it is ordered with the messages around it.

Identifiers
-----------
The id grammar (user, device, conversation and message ids) lives in
:mod:`pimcore.ids`; it is re-exported here.  A group id must be created
(a ``CreateGroup`` op) before it is used; a direct id needs no creation.

Inbox model (the seed's "offline message list", made O(1) for many devices)
---------------------------------------------------------------------------
Each user has ONE inbox: an append-only sequence of positions 1, 2, 3, ...,
each naming a message.  Each device of the user has its own acked position.
A device's offline list is everything after its position; an ack moves the
position forward (never back).  Entries at or below the minimum position of
all known devices are reclaimed.  Devices not seen for ``device_retention``
are forgotten (they stop holding entries back), and entries older than
``max_age`` are reclaimed even when no device ever took them.

History retention and purges (:class:`SetRetention`, :class:`Expire`,
:class:`PurgeConversation`, :class:`PurgeUser`) remove a prefix of a
conversation: its *history floor* moves up (seqs <= floor are gone, never
reused), and with each removed message go its inbox entries -- leaving holes
above the inbox floor, which inbox reads skip and :class:`Reclaim` walks
over -- and its dedupe record.

Membership (groups)
-------------------
The store keeps, per (group, user), every interval of membership as seqs:
``(joined, left)``, both inclusive, ``left`` = :data:`OPEN` while the user
is a member.  Creating a group makes its members members from seq 0; every
later add or remove that changes membership appends an entry to the
conversation (frames.MessageKind JOINED/LEFT, see :class:`AddMembers`) and
opens the interval at the JOINED entry's seq or closes it at the LEFT
entry's seq.  A rejoin opens a new interval; all are kept, so a user who
left and came back never sees what was said while away.  Everything a user
gets follows these intervals:

* inbox / pushes: an entry goes to the members at its seq (the JOINED entry
  to the joiner too, the LEFT entry to the leaver too);
* unread counts (:meth:`Store.unread`, ``ConversationState.unread``,
  ``ReadMarked.unread``): entries of kind MESSAGE from others with a seq
  after the read marker inside the user's intervals (:func:`member_ranges`);
* history (:class:`ReadHistory`): the seqs of :func:`visible_ranges` --
  the intervals, or, in a group created with ``history_visible``, every
  seq from 1 to the end of the last interval.  A former member keeps what
  they were shown; a user never a member gets NOT_MEMBER;
* read markers (:class:`MarkRead`): clamped to the last seq the user may
  see (:func:`last_visible`), never moved back; the ``last_seq`` reported to
  a former member (``ConversationState``, ``ReadMarked``) is that seq too.

A 1:1 (direct) conversation has no membership changes: its two users are
members for every seq.

Host events (an outbox the embedding host consumes)
---------------------------------------------------
An append-only log of events for the host (``BrokerConfig.record_events``):
ids 1, 2, 3, ... (u64, gap-free, never reused, even after reclamation),
each with a time (µs) and opaque data (JSON, see :func:`event_data`).  Each
*consumer* (a name, :data:`ID_RE`) has a durable cursor: the highest id it
acknowledged (:class:`AckEvents`, never moved back).  Delivery is at least
once: a consumer reads after its cursor (:class:`ReadEvents`) and acks what
it has handled; whatever it had not acked when the broker died is read
again.  Message events are written by the :class:`NewMessage` (and
:class:`AddMembers` / :class:`RemoveMembers`) handler inside the
transaction that stores the entry (``event=True``): a stored message
always has its event, a failed batch leaves neither.  Other events (read
marker moved, device online/offline, kicked) are :class:`AppendEvent` ops
the core adds to its next batch.  :class:`Reclaim` drops the longest prefix
of events that every existing consumer acked or that are older than
``max_age``; with no consumer yet only ``max_age`` drops events (they wait
for the host's first ack, like inbox entries wait for a user's first device).
:class:`DeleteConsumer` removes a consumer's cursor (one read by mistake
holds the reclaim back): the reclaim stops waiting for it, and the name
read and acked again is a new consumer at 0.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional, Union

from .. import ids
from ..errors import ErrorCode, StoreError
from ..frames import MessageKind
from ..ids import (  # re-exported: the store speaks in these ids
    SYSTEM,
    CONV_RE,
    ID_RE,
    EMPTY_GROUP,
    LAST_MEMBERS,
    check_ids,
    conversation_problem,
    direct_conversation,
    group_problem,
    direct_members,
    is_direct,
    member_set,
    valid_conversation,
    valid_group,
    valid_id,
)

__all__ = [
    "ID_RE",
    "CONV_RE",
    "valid_id",
    "direct_conversation",
    "direct_members",
    "is_direct",
    "valid_conversation",
    "check_ids",
    "malformed",
    "member_set",
    "removes_everyone",
    "StoredMessage",
    "NewMessage",
    "AmendMessage",
    "SetConversation",
    "ReadConversations",
    "ConversationEntry",
    "ConversationsPage",
    "ConversationSet",
    "conversation_cursor",
    "amend_problem",
    "amended",
    "amend_entry",
    "purged_tombstone",
    "AckPosition",
    "TouchDevice",
    "MarkRead",
    "Reclaim",
    "CreateGroup",
    "AddMembers",
    "RemoveMembers",
    "RevokeTokens",
    "Revoked",
    "AppendEvent",
    "AckEvents",
    "DeleteConsumer",
    "ConsumerDeleted",
    "ReadEvents",
    "ReadDedupe",
    "Deduped",
    "SetRetention",
    "Expire",
    "PurgeConversation",
    "PurgeUser",
    "ReadRetention",
    "RetentionSet",
    "EXPIRED_IDS",
    "Expired",
    "Purged",
    "RetentionState",
    "after_floor",
    "retention_limits",
    "StoredEvent",
    "EventAppended",
    "EventsAcked",
    "EventsPage",
    "event_data",
    "message_event",
    "Op",
    "LoadSession",
    "ReadInbox",
    "ReadHistory",
    "ReadReaders",
    "ReadDevices",
    "ReadPresence",
    "PresenceInfo",
    "PresencePage",
    "SetPresencePrivacy",
    "PresencePrivacySet",
    "ReadOp",
    "StoreRequest",
    "GroupChanged",
    "ConversationState",
    "SessionLoaded",
    "InboxPage",
    "HistoryPage",
    "ReadersPage",
    "DevicesPage",
    "OPEN",
    "MessageKind",
    "visible_ranges",
    "member_ranges",
    "last_visible",
    "last_message_floor",
    "AMENDING",
    "page_seqs",
    "iter_page_seqs",
    "sees",
    "hidden_amend",
    "horizon",
    "AsyncStore",
    "WriteBatch",
    "Appended",
    "Duplicate",
    "Rejected",
    "Acked",
    "Touched",
    "ReadMarked",
    "Reclaimed",
    "Result",
    "DeviceState",
    "Store",
    "StoreError",
]

# ---------------------------------------------------------------- membership

#: ``left`` of a membership interval that is still open.
OPEN = (1 << 64) - 1


def member_ranges(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The seq ranges (inclusive, ascending) a user was a member for, from
    their intervals ``(joined, left)``: what unread counts and the inbox
    follow."""
    return [(max(joined, 1), left) for joined, left in spans]


def visible_ranges(spans: Iterable[tuple[int, int]], history_visible: bool) -> list[tuple[int, int]]:
    """The seq ranges (inclusive, ascending) a user may read in history:
    the membership intervals, or with ``history_visible`` everything from
    seq 1 to the end of the last one.  [] for a user never a member."""
    spans = list(spans)
    if not spans:
        return []
    if history_visible:
        return [(1, spans[-1][1])]
    return member_ranges(spans)


def last_visible(spans: Iterable[tuple[int, int]], last_seq: int) -> int:
    """The highest seq a user may see (their read marker's bound): the
    conversation's last seq for a member, the LEFT seq for a former member,
    0 for a user never a member."""
    spans = list(spans)
    return min(spans[-1][1], last_seq) if spans else 0


#: Entries that amend an earlier message (RECALL, EDIT): entries of the
#: conversation, but never its last message (:class:`ConversationEntry`).
AMENDING = (MessageKind.RECALL, MessageKind.EDIT)


def last_message_floor(spans: Iterable[tuple[int, int]]) -> int:
    """The lowest seq the walk back for a user's last message may reach:
    the start of their last membership interval (1 if none)."""
    ranges = member_ranges(spans)
    return ranges[-1][0] if ranges else 1


def page_seqs(ranges: Iterable[tuple[int, int]], last: int, from_seq: int, limit: int, backward: bool) -> list[int]:
    """The seqs of one history page restricted to ``ranges`` (ascending,
    inclusive): forward, seq > from_seq ascending; backward, seq < from_seq
    descending (from_seq <= 0: from ``last``).  At most ``limit``."""
    if limit <= 0:
        return []
    return list(itertools.islice(iter_page_seqs(ranges, last, from_seq, backward), limit))


def iter_page_seqs(ranges: Iterable[tuple[int, int]], last: int, from_seq: int, backward: bool) -> Iterator[int]:
    """:func:`page_seqs` without the limit, lazily: for a reader that skips
    some seqs (:func:`hidden_amend`) and takes more until its page is full."""
    if backward:
        top = last if from_seq <= 0 else min(from_seq - 1, last)
        for lo, hi in sorted(ranges, reverse=True):
            yield from range(min(hi, top), lo - 1, -1)
    else:
        start = max(from_seq, 0) + 1
        for lo, hi in sorted(ranges):
            yield from range(max(lo, start), min(hi, last) + 1)


def sees(spans: Iterable[tuple[int, int]], history_visible: bool, seq: int) -> bool:
    """May a user whose membership intervals are ``spans`` see seq ``seq``
    of the conversation (:func:`visible_ranges`)?"""
    return any(lo <= seq <= hi for lo, hi in visible_ranges(spans, history_visible))


def horizon(spans: Iterable[tuple[int, int]], last_seq: int) -> int:
    """The last seq a reader's view of a conversation reaches when it ends
    before the conversation's last seq -- a former member's last LEFT entry
    -- else 0 (a member now: no horizon).

    A message edited after the horizon is read by that user with no payload
    (``edited`` set), and so is an EDIT entry of it they were shown: the
    store keeps no older text, and the new one was written after they left
    (a new user's trial: a removed member read it in history).  A recall
    needs no such rule: it leaves no text to anyone."""
    h = last_visible(spans, last_seq)
    return h if 0 < h < last_seq else 0


def hidden_amend(m: "StoredMessage", visible: Iterable[tuple[int, int]]) -> bool:
    """Is ``m`` a RECALL or EDIT entry of a message its reader may not see
    (``visible``: the reader's :func:`visible_ranges`, retention's floor not
    applied)?  Such an entry goes to no inbox of theirs and history skips
    it: a member added without history access was pushed the new text of a
    message from before they joined, and shown that one was recalled (a new
    user's trial)."""
    return m.kind in AMENDING and not any(lo <= m.target <= hi for lo, hi in visible)


def after_floor(ranges: Iterable[tuple[int, int]], floor: int) -> list[tuple[int, int]]:
    """``ranges`` without the seqs <= ``floor`` (the conversation's history
    floor: what retention or a purge removed, see :class:`Expire`)."""
    return [(max(lo, floor + 1), hi) for lo, hi in ranges if hi > floor]


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as stored (once, however many inboxes name it)."""

    msg_id: bytes
    conv: str
    seq: int
    sender: str
    device: str
    local_id: int
    client_time: int
    server_time: int
    payload: bytes
    #: frames.MessageKind (0 = a client's message).
    kind: int = 0
    #: The highest seq of ``conv`` the sender's device had seen when it sent
    #: this (SendReq.after_seq), clamped below ``seq``: display order keeps
    #: the message below those (see pimcore.order).
    after_seq: int = 0
    #: Kinds RECALL / EDIT / DELETE: the seq of the message acted on.
    target: int = 0
    #: Kind MESSAGE: server time (µs) of its latest edit, 0 = never edited.
    edited: int = 0
    #: Kind MESSAGE: recalled; ``payload`` is then empty in the store.
    recalled: bool = False
    #: Kind MESSAGE, as read for one user (ReadHistory): that user deleted
    #: it for themselves (``payload`` empty in what is returned).  Never
    #: stored in the record: deletions are per user.
    deleted: bool = False
    #: Users the message mentions (sorted, unique, never the sender) and
    #: whether it mentions everyone (SendReq.mentions / mention_all).
    mentions: tuple[str, ...] = ()
    mention_all: bool = False


@dataclass(frozen=True, slots=True)
class DeviceState:
    user: str
    device: str
    position: int  # highest acked inbox position
    last_seen: int  # server time (µs) of the last login or ack


# ---------------------------------------------------------------- write ops


@dataclass(frozen=True, slots=True)
class NewMessage:
    """Store a message unless (sender, device, local_id) was seen before.

    In one transaction the store: looks up the dedupe key -- if present with the
    same ``digest`` the result is :class:`Duplicate` of the original, with a
    different digest :class:`Rejected` (DUPLICATE_CONFLICT); else checks the
    conversation (unknown group -> UNKNOWN_CONVERSATION, sender not a member ->
    NOT_MEMBER); assigns seq = last seq + 1; stores the message; appends it to
    the inbox of every member (sender included, for the sender's other
    devices); records the dedupe key; and records the conversation in each
    member's conversation list.  Result: :class:`Appended`.

    Validation, in this order: fields that are malformed whatever the store
    holds (see :func:`malformed`) -> Rejected(BAD_REQUEST); the dedupe lookup
    (so a retry of a stored message is a Duplicate even if the conversation or
    the membership changed since); a malformed conversation id (including a
    non-canonical direct id) -> Rejected(BAD_REQUEST); then the conversation
    and membership checks above.  A ``msg_id`` that is already stored (a
    broken clock, never a client's doing) -> Rejected(INTERNAL), so only that
    op fails and the client's retry gets a fresh id.  ``positions`` of the
    result are sorted by user.
    """

    msg_id: bytes
    conv: str
    sender: str
    device: str
    local_id: int
    client_time: int
    server_time: int
    payload: bytes
    digest: bytes  # identifies (conv, payload) for conflict detection
    #: SendReq.after_seq; the store clamps it to the conversation's last seq
    #: before this message (a client cannot claim to have seen the future).
    after_seq: int = 0
    #: Append a "message" host event (:func:`message_event`, recipients =
    #: the members it was fanned out to) in the same transaction when the
    #: message is stored (not for a Duplicate or a Rejected).
    event: bool = False
    #: Mentioned users (valid ids, sorted, unique, not the sender: the core
    #: normalizes them) and "everyone".  Stored with the message as given;
    #: only recipients (members at this seq) get a mention counted
    #: (:class:`ConversationEntry`), the sender never.
    mentions: tuple[str, ...] = ()
    mention_all: bool = False


@dataclass(frozen=True, slots=True)
class AckPosition:
    """Device acked its inbox up to ``position``.  Positions only move forward; a
    ``position`` beyond the inbox head is clamped to the head.  An unknown device
    is registered as by :class:`TouchDevice`.  ``last_seen`` becomes
    ``max(last_seen, now)``.  Invalid ids -> Rejected(BAD_REQUEST).
    Result: Acked."""

    user: str
    device: str
    position: int
    now: int


@dataclass(frozen=True, slots=True)
class TouchDevice:
    """Register the device (at its inbox floor if new) and refresh last_seen.
    If ``position`` is larger than the stored one, it moves forward (a client's
    resume cursor may be ahead of a lost ack), clamped to the inbox head like
    an ack.  ``last_seen`` becomes ``max(last_seen, now)``.  A device that
    :class:`Reclaim` forgot is new again.  Invalid ids -> Rejected(BAD_REQUEST).
    Result: Touched."""

    user: str
    device: str
    position: int
    now: int


@dataclass(frozen=True, slots=True)
class MarkRead:
    """Move the (user, conv) read marker forward to ``seq`` (clamped to the
    last seq the user may see, :func:`last_visible`; never backwards).
    Malformed user or conversation id -> Rejected(BAD_REQUEST); unknown group
    -> Rejected(UNKNOWN_CONVERSATION); a user never a member ->
    Rejected(NOT_MEMBER) (a removed member may still mark what they
    received).  Result: ReadMarked (``last_seq``: the last seq the user may
    see)."""

    user: str
    conv: str
    seq: int


@dataclass(frozen=True, slots=True)
class Reclaim:
    """Forget devices unseen since ``now - device_retention`` and delete inbox
    entries that every remaining device has acked, or that are older than
    ``now - max_age`` (by their message's server time).  Result: Reclaimed.

    Precisely: a device is forgotten when ``last_seen < now - device_retention``.
    Then each inbox loses its longest prefix (above the floor) of entries that
    are at or below the minimum position of the user's remaining devices, or
    whose server time is ``< now - max_age``; the floor becomes the last
    position removed.  Reclamation is a prefix so that "positions <= floor
    were reclaimed" stays exact (server times along an inbox only grow in
    practice: they come from one monotonic clock).  A user with no known
    device has acked nothing: only ``max_age`` reclaims their entries, so
    messages wait for a user who has never logged in.  ``entries`` counts
    removed inbox entries, ``devices`` forgotten devices.  Holes (entries
    :class:`Expire` or a purge removed) count as reclaimable and are not
    counted.  Messages themselves (the history) and their dedupe records are
    not reclaimed here; :class:`Expire` removes them."""

    now: int
    device_retention: int
    max_age: int



@dataclass(frozen=True, slots=True)
class CreateGroup:
    """Create group ``conv`` with ``members`` (an ordinary op of a batch, so
    it is ordered with the messages around it).  The members are members
    from seq 0 (no entries are appended).  ``history_visible``: whether a
    member who joins later may read what was said before (see *Membership*
    in the module docstring); fixed at creation.  A malformed or direct id,
    an invalid member id or a ``now`` outside i64 -> Rejected(BAD_REQUEST);
    the group exists -> Rejected(ALREADY_EXISTS).  Result: GroupChanged."""

    conv: str
    members: tuple[str, ...]
    now: int
    history_visible: bool = False


@dataclass(frozen=True, slots=True)
class AddMembers:
    """Add users to an existing group.  Each user who was not a member gets
    a JOINED entry (frames.MessageKind): it takes the next seq, is stored
    like a message (sender = the user, device "", payload = ``by`` in UTF-8,
    local id 0, client and server time = its stamp, after_seq = seq - 1) and
    is appended to the inbox of every member at that seq, the new one
    included; the user's membership interval opens at that seq.  Adding a
    member again is a no-op (no entry).  ``stamps``: (msg_id, server time)
    of the entry of ``users[i]``, as the broker's clock made them; without
    stamps the store makes them (server times from ``max(now, last server
    time + 1)`` up, msg_id = server time (8 bytes big-endian) + 8 zero
    bytes).  Malformed ids, ``by`` neither "" nor a valid id, fewer stamps
    than users, or a malformed stamp -> Rejected(BAD_REQUEST); unknown group
    -> Rejected(UNKNOWN_CONVERSATION); a stamp's msg_id already stored ->
    Rejected(INTERNAL) (nothing changed).  Result: GroupChanged, with the
    entries and their inbox positions."""

    conv: str
    users: tuple[str, ...]
    now: int = 0
    by: str = ""
    stamps: tuple[tuple[bytes, int], ...] = ()
    #: Append a "message" host event per entry (kind JOINED), as NewMessage.
    event: bool = False


@dataclass(frozen=True, slots=True)
class RemoveMembers:
    """Remove users from an existing group.  Each user who was a member gets
    a LEFT entry (as for :class:`AddMembers`), appended to the inbox of every
    member at that seq, the leaving one included (so they learn it); their
    membership interval closes at that seq.  Removing a non-member is a
    no-op.  A removal that would leave the group with no member (every
    remaining member among ``users``) is refused as a whole:
    Rejected(BAD_REQUEST), no one removed, no entry (a group needs one;
    :data:`pimcore.ids.LAST_MEMBERS` -- purge it to delete it).  The store
    decides it as it applies the op, so concurrent removals cannot empty a
    group either.  (:class:`PurgeUser` still takes a last member out.)
    Other errors as for :class:`AddMembers`.  Result: GroupChanged."""

    conv: str
    users: tuple[str, ...]
    now: int = 0
    by: str = ""
    stamps: tuple[tuple[bytes, int], ...] = ()
    #: Append a "message" host event per entry (kind LEFT), as NewMessage.
    event: bool = False


@dataclass(frozen=True, slots=True)
class RevokeTokens:
    """From now on, tokens of ``user`` issued before ``before`` (µs, the
    broker's clock) are refused: those bound to ``device``, or every token of
    the user when ``device`` is "".  A later revoke never moves the time back
    (the store keeps the maximum).  Invalid ids or a time outside i64 ->
    Rejected(BAD_REQUEST).  Result: Revoked (the time now in force)."""

    user: str
    device: str
    before: int


@dataclass(frozen=True, slots=True)
class AppendEvent:
    """Append a host event: the next event id (last id + 1), ``now`` (µs)
    as its time, ``data`` (bytes, JSON by convention: :func:`event_data`).
    ``data`` not bytes or ``now`` outside i64 -> Rejected(BAD_REQUEST).
    Result: EventAppended."""

    data: bytes
    now: int


@dataclass(frozen=True, slots=True)
class AckEvents:
    """Consumer ``consumer`` handled every event up to id ``upto``: its
    durable cursor becomes ``max(cursor, min(upto, last id))`` (never back;
    an unknown consumer starts at 0 and exists from now on, holding back
    :class:`Reclaim`).  An invalid consumer name (:data:`ID_RE`) or
    ``upto`` not an int -> Rejected(BAD_REQUEST).  Result: EventsAcked."""

    consumer: str
    upto: int


@dataclass(frozen=True, slots=True)
class DeleteConsumer:
    """Remove consumer ``consumer``'s durable cursor: from now on
    :class:`Reclaim` no longer waits for it (what every other consumer
    acked goes), it leaves ``EventsPage.consumers``, and a later
    :class:`AckEvents` of the name creates a new cursor at 0, as for a name
    never seen.  No event is touched.  Deleting a consumer that has no
    cursor changes nothing: ConsumerDeleted with ``deleted`` False (the
    caller's "not found"; no error: a retry of a delete whose answer was
    lost finds nothing, which is what it asked for).  An invalid consumer
    name (:data:`ID_RE`) -> Rejected(BAD_REQUEST).  Result:
    ConsumerDeleted."""

    consumer: str


@dataclass(frozen=True, slots=True)
class SetConversation:
    """Change ``user``'s own settings of ``conv`` (synced across the user's
    devices): ``pinned``, ``muted``, ``hidden``, each 0 keep, 1 on, 2 off
    (frames.SETTING_*).  Hidden ON hides the conversation from the list
    until its next message: the store keeps ``hidden_at`` = the last seq the
    user may see + 1, and the entry is hidden while the seq of its ``last``
    is below that (a new message un-hides it without a write; a RECALL or
    EDIT entry never does).  Access: malformed
    ids or a value outside 0..2 -> Rejected(BAD_REQUEST); an unknown group
    -> UNKNOWN_CONVERSATION; a group the user is not in the list of (never
    a member) or a 1:1 id without the user -> NOT_MEMBER.  Result:
    ConversationSet (the entry after the op)."""

    user: str
    conv: str
    pinned: int = 0
    muted: int = 0
    hidden: int = 0


@dataclass(frozen=True, slots=True)
class SetPresencePrivacy:
    """The user's durable presence setting: with ``hide_last_seen`` the
    broker shows others only online/offline, never when the user was last
    online (PROTOCOL.md, Presence).  An invalid user id or a non-bool ->
    Rejected(BAD_REQUEST).  Result: PresencePrivacySet."""

    user: str
    hide_last_seen: bool


@dataclass(frozen=True, slots=True)
class AmendMessage:
    """Recall, edit or delete-for-self the message at seq ``target`` of
    ``conv`` (``kind``: MessageKind RECALL, EDIT or DELETE), as a new entry.

    In one transaction, like :class:`NewMessage`: the dedupe lookup on
    (sender, device, local_id) -- the same key space as NewMessage, so a
    retry is a :class:`Duplicate` of the original (a different digest:
    Rejected(DUPLICATE_CONFLICT)); a malformed conversation id ->
    BAD_REQUEST; unknown group -> UNKNOWN_CONVERSATION; then
    :func:`amend_problem` decides with the stored target (NOT_MEMBER,
    NO_SUCH_MESSAGE, NOT_SENDER, RECALLED, TOO_LATE).  Then:

    * RECALL: the target is overwritten with :func:`amended` -- payload
      empty, ``recalled`` set (no payload is left in the store: an EDIT
      entry holds none of its own, see below) -- and a RECALL entry
      (:func:`amend_entry`) takes the next seq and goes to the inbox of
      every member who may see the target (:func:`hidden_amend`), like a
      message.
    * EDIT: the target's payload becomes ``payload``, ``edited`` =
      ``server_time``; an EDIT entry takes the next seq and goes to every
      member who may see the target.  The entry stores no payload: every
      read of it (inbox, history) returns the target's payload at that
      time (empty once recalled).
    * DELETE: the (sender, conv, target) deletion is recorded (history
      returns the target to that user with ``deleted`` set and no payload);
      the DELETE entry takes no seq (seq 0, not in the conversation) and goes
      only to the sender's own inbox, so their other devices learn it in
      inbox order and a device that comes back catches up on it.

    ``sender`` SYSTEM (with device SYSTEM) is the host: it may recall or
    edit any message (``window`` 0: no time limit) but not DELETE.
    ``window`` (µs, 0 = none): the action is refused with TOO_LATE when
    ``server_time`` is more than that after the target's server time.
    Result: :class:`Appended` (seq 0 and the sender's position alone for a
    DELETE), with ``after_seq`` = seq - 1 (0 for a DELETE).
    """

    msg_id: bytes
    conv: str
    sender: str
    device: str
    local_id: int
    client_time: int
    server_time: int
    kind: int  # MessageKind RECALL, EDIT or DELETE
    target: int
    payload: bytes  # EDIT: the new payload; else empty
    digest: bytes
    window: int = 0
    #: Append a "message" host event for the entry (kind RECALL/EDIT/DELETE,
    #: with ``target``), as NewMessage.
    event: bool = False


_AMEND_KINDS = (MessageKind.RECALL, MessageKind.EDIT, MessageKind.DELETE)


def amend_problem(
    op: AmendMessage, member: bool, target: Optional[StoredMessage], visible: bool
) -> ErrorCode:
    """What every store answers for :class:`AmendMessage` once it has looked
    up: ``member`` -- the sender is a member now (RECALL/EDIT) or was ever
    one (DELETE; always true for the host); ``target`` -- the entry at seq
    ``op.target`` (None: no such seq); ``visible`` -- that seq is one the
    sender may see (:func:`visible_ranges`).  In this order: NOT_MEMBER,
    NO_SUCH_MESSAGE (no such seq, not a MESSAGE, not visible to the
    sender -- for RECALL/EDIT too, so it reveals nothing of a message
    said before the sender joined), NOT_SENDER
    (RECALL/EDIT of another user's message by a user), RECALLED (RECALL/EDIT
    of a recalled message), TOO_LATE (outside ``op.window``); else OK."""
    if not member:
        return ErrorCode.NOT_MEMBER
    if target is None or target.kind != MessageKind.MESSAGE or not visible:
        return ErrorCode.NO_SUCH_MESSAGE
    if op.kind != MessageKind.DELETE:
        if op.sender != SYSTEM and target.sender != op.sender:
            return ErrorCode.NOT_SENDER
        if target.recalled:
            return ErrorCode.RECALLED
    if op.window and op.server_time - target.server_time > op.window:
        return ErrorCode.TOO_LATE
    return ErrorCode.OK


def amended(target: StoredMessage, op: AmendMessage) -> StoredMessage:
    """The target's record after a RECALL or EDIT (a DELETE changes no
    record)."""
    if op.kind == MessageKind.RECALL:
        return replace(target, payload=b"", recalled=True)
    return replace(target, payload=op.payload, edited=op.server_time)


def removes_everyone(members: Iterable[str], users: Iterable[str]) -> bool:
    """Would removing ``users`` leave a group of ``members`` (its members
    now) with no one?  A group with no members is left as it is (False):
    such a removal removes no one.  Stops at the first member kept."""
    gone = set(users)
    empty = True
    for member in members:
        if member not in gone:
            return False
        empty = False
    return not empty


def purged_tombstone(m: StoredMessage) -> StoredMessage:
    """What :class:`PurgeUser` leaves of a message the user sent: no payload
    and, for a message (kind MESSAGE), ``recalled`` -- the same tombstone a
    recall leaves, so clients show it alike and it counts as neither unread
    nor a mention."""
    return replace(m, payload=b"", recalled=m.recalled or m.kind == MessageKind.MESSAGE)


def amend_entry(op: AmendMessage, seq: int) -> StoredMessage:
    """The stored entry of an AmendMessage at ``seq`` (0 for a DELETE); no
    payload of its own (an EDIT's is read from its target)."""
    return StoredMessage(
        op.msg_id, op.conv, seq, op.sender, op.device, op.local_id, op.client_time, op.server_time, b"",
        int(op.kind), max(seq - 1, 0), op.target,
    )


@dataclass(frozen=True, slots=True)
class SetRetention:
    """Set the history retention of ``conv``: keep at most ``max_count``
    entries and none older than ``max_age`` µs (by server time).  Per
    field: -1 = follow the broker default (:class:`Expire`), 0 = no limit,
    > 0 the limit; (-1, -1) removes the setting.  Stored with the
    conversation; applied by the next :class:`Expire`.  A malformed id or a
    value < -1 or outside i64 -> Rejected(BAD_REQUEST); an unknown group ->
    Rejected(UNKNOWN_CONVERSATION).  Result: RetentionSet."""

    conv: str
    max_age: int
    max_count: int


@dataclass(frozen=True, slots=True)
class Expire:
    """Apply history retention at ``now`` (µs).  ``max_age`` / ``max_count``
    are the broker defaults (0 = no limit), used where a conversation has no
    setting of its own (:class:`SetRetention`, per field).

    Retention removes a *prefix* of a conversation: the history floor
    (seqs <= floor are gone) moves up to cover every entry beyond the
    newest ``max_count`` and every entry whose server time is
    ``< now - max_age`` (walked from the floor up, stopping at the first
    younger one) -- but never to an entry whose server time is ``>= now -
    keep`` (µs; 0: no such bound), walked back from there: the broker's
    ``dedupe_window``, so that a client's retry of a send still finds its
    dedupe record however fast a count limit turns over (a new operator's
    trial: under a count of 150 a busy group's message went two seconds
    after it was stored, and the retry of its lost SendAck was stored
    again).  For each removed entry the store deletes the message, its
    inbox entries (the positions stay used: an inbox read skips them, like a
    Push skips positions a device does not need) and its dedupe record --
    with the message, never before, so a retry of a message still in the log
    is still a Duplicate.  Seqs are never reused; the floor only grows.
    Read markers and membership are kept.

    One Expire trims at most EXPIRED_IDS conversations, walked in an order
    of the store's choice from the one after ``after`` (a conversation id;
    "" from the first): when it stops at that bound, ``Expired.resume``
    names where the next Expire goes on (``after=resume``, the same
    ``now``).  Why bounded: the core tells the online devices of every
    trimmed conversation their exact unread count (core.py,
    _refresh_floor), so a commit names each one, and a retention pass over
    a large store is many small commits rather than one that holds every
    trim.  ``after`` need not still exist (purged since).  Result: Expired."""

    now: int
    max_age: int = 0
    max_count: int = 0
    after: str = ""
    keep: int = 0


@dataclass(frozen=True, slots=True)
class PurgeConversation:
    """Delete every stored entry of ``conv`` (messages, their inbox entries
    and dedupe records), every user's conversation-list entry of it and,
    for a group, the group itself (members, membership intervals, read
    markers, its retention setting: the id answers UNKNOWN_CONVERSATION
    until created again).  A 1:1 chat's read markers and retention setting
    stay: it lives on, a marker never moves back (the peer's receipt
    included), and its new history expires as before.  The history
    floor becomes the last seq, which is kept: seqs continue after it if the
    id is used again, so no client cursor ever names two entries; so does
    the purge point (:class:`ConversationState`), which a login reads.
    Idempotent (an unknown or already purged conversation: nothing to do).
    A malformed id -> Rejected(BAD_REQUEST).  Result: Purged."""

    conv: str


@dataclass(frozen=True, slots=True)
class PurgeUser:
    """Delete all data of ``user``: first the user leaves every group they
    are a member of (a LEFT entry each, as :class:`RemoveMembers` without
    stamps, so the members learn it); then every message the user sent
    becomes a tombstone (payload emptied, seq, kind, times and sender kept:
    the conversations stay gap-free), the user's dedupe records, inbox
    entries (the floor moves to the head: positions are never reused),
    devices, read markers, conversation list and membership intervals are
    deleted, and every token of the user issued before ``now`` is revoked
    (kept: a purged user's old tokens must not log in again).  Idempotent.
    A malformed id or ``now`` outside i64 -> Rejected(BAD_REQUEST).
    Result: Purged (``changes``: the LEFT entries, to push)."""

    user: str
    now: int


Op = Union[
    NewMessage, AckPosition, TouchDevice, MarkRead, Reclaim, CreateGroup, AddMembers, RemoveMembers, RevokeTokens,
    AppendEvent, AckEvents, AmendMessage, SetConversation, SetPresencePrivacy, SetRetention, Expire, PurgeConversation,
    PurgeUser, DeleteConsumer,
]


# ---------------------------------------------------------------- read ops
#
# Reads are shaped like the core's needs, not like tables: one op answers
# one question the broker has (a login, a page of an inbox, a history page),
# so a networked store pays one round trip per question.


@dataclass(frozen=True, slots=True)
class LoadSession:
    """Everything a login needs, read at one point in time: the user's inbox
    head and floor, the device's stored position, and the read state of
    every conversation in :meth:`Store.conversations` (with the peer's
    marker for 1:1 chats).  Malformed ids -> Rejected(BAD_REQUEST).
    Result: SessionLoaded.  ``login``: a session follows (the core's login);
    False for a host's read, which a store that keeps track of sessions
    (the Redis store's read fan-out registrations) leaves out."""

    user: str
    device: str
    login: bool = True
    #: The client's cursor, when it comes from an epoch other than the
    #: current one: the higher of its inbox position and the position of
    #: its own sends it was told (Login.sent), and that epoch (b"": none
    #: given).  A
    #: store that knows where that epoch ended in its own history answers
    #: SessionLoaded.foreign when the entry at ``claim`` (or the highest one
    #: below it still stored) was stored after that end, or, with no such
    #: entry left, when it has no record of the device (a restored hot copy
    #: refilled the positions:
    #: OPERATIONS.md, "When the store goes back in time").
    claim: int = 0
    claim_epoch: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadInbox:
    """Inbox entries with position > ``after``, ascending, at most ``limit``
    (the push loop of a device that is behind).  Result: InboxPage."""

    user: str
    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """A history page of ``conv`` for ``user`` (see :meth:`Store.history`
    for ``from_seq``/``backward``), at most ``limit`` entries, counting
    only the seqs ``user`` may see (:func:`visible_ranges`): a page skips
    what was said while the user was not a member, and the RECALL/EDIT
    entries of messages they may not see (:func:`hidden_amend`).  Access: a malformed id
    -> code BAD_REQUEST; an unknown group -> UNKNOWN_CONVERSATION; ``user``
    never a member -> NOT_MEMBER (a former member keeps what they were
    shown; a 1:1 chat's members are its two users, from seq 1).  ``user``
    empty: the broker's own read, not checked -- every seq after the
    history floor (the core reads the entries another writer added to a
    group, e.g. ``pimcore group remove``, to tell the users who left;
    the embedding API and HTTP refuse an empty user).
    Result: HistoryPage."""

    conv: str
    user: str
    from_seq: int
    limit: int
    backward: bool = False


@dataclass(frozen=True, slots=True)
class ReadReaders:
    """How far each current member of ``conv`` has read, asked by ``user``
    (the ReadersReq of a client).  Access: a malformed id -> BAD_REQUEST;
    an unknown group -> UNKNOWN_CONVERSATION; ``user`` not a member now ->
    NOT_MEMBER (a former member included).  ``user`` empty: the broker's
    own read (who of a group to refresh after retention), not checked.
    Result: ReadersPage."""

    conv: str
    user: str


@dataclass(frozen=True, slots=True)
class ReadEvents:
    """Host events with id > ``after`` (None: the consumer's durable
    cursor, 0 for an unknown consumer), ascending, at most ``limit``.  Events
    already reclaimed are skipped (the ids jump).  ``limit`` 0 is a probe:
    no events, but the page lists every consumer's durable cursor
    (``EventsPage.consumers``: what the outbox-depth metric reads).  An
    invalid consumer name -> Rejected(BAD_REQUEST).  Result: EventsPage."""

    consumer: str
    after: Optional[int] = None
    limit: int = 256


@dataclass(frozen=True, slots=True)
class ReadDevices:
    """Every known device of ``user`` with its acked inbox position and
    last-seen time (the host's read positions; forgotten devices are gone).
    A malformed id -> Rejected(BAD_REQUEST).  Result: DevicesPage."""

    user: str


@dataclass(frozen=True, slots=True)
class ReadDedupe:
    """Is the dedupe key (``sender``, ``device``, ``local_id``) stored, i.e.
    would a :class:`NewMessage` with it be a Duplicate (or a
    DUPLICATE_CONFLICT) whatever it carries?  One key lookup: the broker
    asks it before a content check, so a retry of a stored message gets its
    original result without being checked again.  Malformed ids: not
    stored.  Result: Deduped."""

    sender: str
    device: str
    local_id: int


@dataclass(frozen=True, slots=True)
class ReadPresence:
    """What ``user`` may see of the presence of ``others`` (a presence
    subscription): for each, in order, whether the two share a
    conversation now (both current members of a group, or the two users of
    a 1:1 chat that has entries; a user always sees themselves), the
    other's :class:`SetPresencePrivacy` setting and their last-seen time
    (the latest ``DeviceState.last_seen`` of their devices, µs; 0 when not
    visible or none).  Also ``user``'s own setting.  A malformed ``user``
    -> Rejected(BAD_REQUEST); a malformed other is simply not visible.
    Result: PresencePage."""

    user: str
    others: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadConversations:
    """A page of ``user``'s conversation list (the conversations of
    :meth:`Store.conversations`), ordered by :func:`conversation_key`:
    pinned first, then by the server time of the last message the user may
    see (:class:`ConversationEntry` ``last``; newest first), then by id.  ``cursor``: b"" for the first page,
    else :func:`conversation_cursor` of the last entry of the previous page
    (entries after it in that order).  Hidden entries are left out unless
    ``include_hidden``.  With ``conv`` set: just that conversation's entry
    (hidden or not; NOT_MEMBER if it is not in the user's list).  A
    malformed id -> code BAD_REQUEST; a malformed cursor -> BAD_CURSOR.
    At most ``limit`` entries; ``more`` says whether more follow.
    Result: ConversationsPage."""

    user: str
    cursor: bytes = b""
    limit: int = 50
    include_hidden: bool = False
    conv: str = ""


@dataclass(frozen=True, slots=True)
class ReadRetention:
    """The retention setting and history floor of ``conv``.  A malformed
    id -> Rejected(BAD_REQUEST).  Result: RetentionState."""

    conv: str


ReadOp = Union[
    LoadSession, ReadInbox, ReadHistory, ReadReaders, ReadEvents, ReadDevices, ReadDedupe, ReadConversations, ReadPresence,
    ReadRetention,
]


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """One unit of store work, the only way the core reaches the store.

    ``write``: ``ops`` are write ops applied in ONE durable transaction
    (:meth:`Store.commit`); the core keeps at most one write request in
    flight (group commit).  Otherwise ``ops`` are read ops; any number may be
    in flight and they may complete in any order.  The driver answers with
    ``Broker.store_completed(request_id, results, now)`` -- one result per op,
    in order -- or ``Broker.store_failed(request_id, error, now)``.
    """

    request_id: int
    ops: tuple[Union[Op, ReadOp], ...]
    write: bool
    #: A write's inbox entries as the core counts them against
    #: ``BrokerConfig.max_batch_entries`` (a message to a group whose size
    #: it does not know counts as the whole budget); 0 for a read.  A host
    #: may commit a large batch off its event loop (pimcore.net does from
    #: 16,384 entries on).
    entries: int = 0


@dataclass(frozen=True, slots=True)
class WriteBatch:
    batch_id: int
    ops: tuple[Op, ...]


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Appended:
    msg_id: bytes
    seq: int
    server_time: int
    #: (user, inbox position) for every recipient, sender included.
    positions: tuple[tuple[str, int], ...]
    #: NewMessage.after_seq as stored (clamped below ``seq``).
    after_seq: int = 0


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The dedupe key was already stored: the original message's identity."""

    msg_id: bytes
    seq: int
    server_time: int


@dataclass(frozen=True, slots=True)
class Rejected:
    code: ErrorCode


@dataclass(frozen=True, slots=True)
class Acked:
    user: str
    device: str
    position: int  # the stored position after the op


@dataclass(frozen=True, slots=True)
class Touched:
    user: str
    device: str
    position: int  # the stored position after the op
    new: bool  # the device was not known before


@dataclass(frozen=True, slots=True)
class ReadMarked:
    user: str
    conv: str
    read_seq: int  # marker after the op
    last_seq: int
    unread: int
    changed: bool  # the marker moved


@dataclass(frozen=True, slots=True)
class Reclaimed:
    entries: int
    devices: int
    events: int = 0  # host events dropped


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One host event: gap-free ``id`` (u64), ``time`` (µs), ``data``."""

    id: int
    time: int
    data: bytes


@dataclass(frozen=True, slots=True)
class EventAppended:
    id: int


@dataclass(frozen=True, slots=True)
class EventsAcked:
    consumer: str
    cursor: int  # the durable cursor after the op


@dataclass(frozen=True, slots=True)
class ConsumerDeleted:
    consumer: str
    deleted: bool  # the consumer had a cursor (False: there was none, nothing changed)


@dataclass(frozen=True, slots=True)
class EventsPage:
    cursor: int  # the consumer's durable cursor (0 if it never acked)
    events: tuple[StoredEvent, ...]  # ascending by id
    last_id: int  # the highest id ever appended (0 if none)
    #: (consumer, durable cursor) of every consumer that ever acked, sorted;
    #: filled only for a probe (ReadEvents with limit 0).
    consumers: tuple[tuple[str, int], ...] = ()



@dataclass(frozen=True, slots=True)
class GroupChanged:
    conv: str
    members: tuple[str, ...]  # sorted, after the op
    #: The JOINED/LEFT entries the op appended, in seq order (none for
    #: CreateGroup or a no-op).
    entries: tuple[StoredMessage, ...] = ()
    #: For each entry, (user, inbox position) of every recipient, sorted by
    #: user (as Appended.positions).
    positions: tuple[tuple[tuple[str, int], ...], ...] = ()


@dataclass(frozen=True, slots=True)
class Revoked:
    user: str
    device: str  # "" = every device of the user
    before: int  # µs: tokens issued earlier are refused -- in force for the device: with device, the later of
    #              the user-wide bound and the device's (both apply to its tokens)


@dataclass(frozen=True, slots=True)
class ConversationState:
    """One conversation of a user at login: the user's marker, the last seq,
    the unread count, for a 1:1 chat the peer's marker (0 otherwise), and
    its purge point: the last seq of its latest :class:`PurgeConversation`
    (0: never purged; retention does not move it).  A device away while
    the conversation was purged and used again learns from it what is gone
    (PROTOCOL.md, ConvPurged at login)."""

    conv: str
    read_seq: int
    last_seq: int
    unread: int
    peer: str  # the other user of a 1:1 chat, "" for a group
    peer_read_seq: int
    purged: int = 0


@dataclass(frozen=True, slots=True)
class SessionLoaded:
    user: str
    device: str
    head: int  # highest position of the user's inbox
    floor: int  # positions <= floor were reclaimed
    position: int  # the device's stored position; -1 if the device is unknown
    conversations: tuple[ConversationState, ...]  # sorted by conv
    #: µs: tokens of this user and device issued earlier are revoked (the
    #: later of the user-wide and the device's RevokeTokens; 0 = none).
    revoked_before: int = 0
    #: The entry at LoadSession.claim (or the highest one below it still
    #: stored) was stored after LoadSession.claim_epoch ended in this store's
    #: history, or (no such entry left) the store has no record of the
    #: device: the cursor is from another history (the core resynchronizes
    #: the client).  False when the store cannot tell (no claim, an epoch
    #: whose end it never recorded, every entry up to the claim gone from a
    #: device it knows, or a store that keeps no such record: memory, Redis).
    foreign: bool = False


@dataclass(frozen=True, slots=True)
class InboxPage:
    user: str
    entries: tuple[tuple[int, StoredMessage], ...]  # (position, message), ascending


@dataclass(frozen=True, slots=True)
class DevicesPage:
    user: str
    devices: tuple[DeviceState, ...]  # sorted by device id


@dataclass(frozen=True, slots=True)
class HistoryPage:
    code: ErrorCode  # OK, or why the user may not read it
    messages: tuple[StoredMessage, ...]


@dataclass(frozen=True, slots=True)
class ReadersPage:
    """Answer to :class:`ReadReaders`: (user, read seq) of every current
    member, sorted by user; each read seq at most the conversation's last
    seq.  Empty unless ``code`` is OK."""

    code: ErrorCode
    readers: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Deduped:
    """Answer to :class:`ReadDedupe`."""

    stored: bool


@dataclass(frozen=True, slots=True)
class ConversationEntry:
    """One conversation of a user's conversation list.

    ``last``: the last message the user may see, i.e. the last entry of
    kind MESSAGE, JOINED or LEFT at or below :func:`last_visible` (None
    while there is none), as it is now and as history returns it to the
    user (recalled: its tombstone; edited: the new payload; deleted by the
    user for themselves: ``deleted``, no payload, whatever edits follow);
    RECALL/EDIT entries (:data:`AMENDING`) never are.
    ``last_seq`` its seq (0 if none): not the conversation's last seq
    (ReadState.last_seq), which counts RECALL/EDIT entries too.  ``unread`` as
    :meth:`Store.unread`.  ``mention_count``: entries after the read marker
    that mention the user (by id or everyone, from someone else, at a seq
    the user was a member at); it drops as the marker passes them.
    ``hidden``: hidden (:class:`SetConversation`) and no message since."""

    conv: str
    last: Optional[StoredMessage]
    read_seq: int
    last_seq: int
    unread: int
    mention_count: int
    pinned: bool
    muted: bool
    hidden: bool


@dataclass(frozen=True, slots=True)
class ConversationsPage:
    code: ErrorCode
    entries: tuple[ConversationEntry, ...]
    more: bool = False


@dataclass(frozen=True, slots=True)
class ConversationSet:
    """Answer to :class:`SetConversation`: the entry after the op and
    whether any setting changed."""

    user: str
    conv: str
    entry: ConversationEntry
    changed: bool


@dataclass(frozen=True, slots=True)
class PresencePrivacySet:
    """Answer to :class:`SetPresencePrivacy`: the setting now stored."""

    user: str
    hide_last_seen: bool


@dataclass(frozen=True, slots=True)
class PresenceInfo:
    user: str
    visible: bool  # shares a conversation with the asking user now
    hide_last_seen: bool  # the user's setting (False when not visible)
    last_seen: int  # µs, latest last_seen of the user's devices; 0 when not visible or none
    # A store shared by several nodes (RedisStore): the ids (hex) of the
    # other live nodes where the user has a device online now (visible
    # users only); () for a store of one node.
    elsewhere: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PresencePage:
    """Answer to :class:`ReadPresence`."""

    user: str
    hide_last_seen: bool  # the asking user's own setting
    entries: tuple[PresenceInfo, ...]


@dataclass(frozen=True, slots=True)
class RetentionSet:
    conv: str
    max_age: int  # µs; -1 = the broker default, 0 = no limit
    max_count: int  # entries; -1 = the broker default, 0 = no limit


@dataclass(frozen=True, slots=True)
class RetentionState:
    """Answer to :class:`ReadRetention`: the conversation's own setting
    (-1 per field: it follows the broker default) and its history floor
    (seqs <= ``floor`` were removed by retention or a purge; 0 if none)."""

    conv: str
    max_age: int
    max_count: int
    floor: int


#: The most conversations one :class:`Expire` trims (and its Expired
#: names).  The ids are for the core to refresh the read states of online
#: devices (core.py, _refresh_floor), so they are bounded like everything a
#: commit hands back; the walk goes on in the next Expire (Expired.resume).
EXPIRED_IDS = 256


@dataclass(frozen=True, slots=True)
class Expired:
    conversations: int  # whose floor moved (== len(convs))
    messages: int  # entries removed from conversations
    entries: int  # inbox entries removed with them
    #: The ids of the conversations whose floor moved, sorted.
    convs: tuple[str, ...] = ()
    #: "" when the walk is done; else the walk stopped at EXPIRED_IDS
    #: trimmed conversations, and the next Expire goes on after this id
    #: (Expire.after).
    resume: str = ""


@dataclass(frozen=True, slots=True)
class Purged:
    messages: int  # entries removed (PurgeConversation) or tombstoned (PurgeUser)
    entries: int  # inbox entries removed
    devices: int = 0  # devices forgotten (PurgeUser)
    #: PurgeUser: the user's removal from each group (LEFT entries to push).
    changes: tuple["GroupChanged", ...] = ()
    #: PurgeConversation: the conversation's last seq, now its history
    #: floor (0 if it never had an entry).  The read state its online
    #: members' devices are sent: nothing stored is unread (core.py).
    last_seq: int = 0
    #: PurgeConversation of a group: the users who may have held its read
    #: state (its members and former members, sorted), whom the core tells
    #: that nothing of it is unread -- the group and its markers are gone.
    users: tuple[str, ...] = ()


Result = Union[
    Appended, Duplicate, Rejected, Acked, Touched, ReadMarked, Reclaimed, GroupChanged, Revoked, SessionLoaded, InboxPage,
    HistoryPage, ReadersPage, EventAppended, EventsAcked, ConsumerDeleted, EventsPage, DevicesPage, Deduped,
    ConversationsPage, ConversationSet, PresencePrivacySet, PresencePage, RetentionSet, RetentionState, Expired, Purged,
]


#: A JSON string literal (C-accelerated, ASCII out).
_esc = json.encoder.encode_basestring_ascii
#: One encoder (json.dumps with arguments builds a new one per call).
_JSON = json.JSONEncoder(separators=(",", ":")).encode


def event_data(type_: str, **fields: object) -> bytes:
    """A host event's data: compact JSON ``{"type": type_, **fields}``."""
    return _JSON({"type": type_, **fields}).encode()


def message_event(
    m: StoredMessage, recipients: Iterable[str], muted: Iterable[str] = (), mentioned: Iterable[str] = ()
) -> bytes:
    """The data of a "message" event (what both stores write atomically
    with the entry): conv, seq, msg_id (hex), sender, device, kind
    (frames.MessageKind), server_time (µs), local_id, payload (base64) and
    recipients (the users the entry was fanned out to, sorted).  The same
    JSON as :func:`event_data` would make, written out: every message of
    every batch comes through here (about 2 µs instead of 6).

    For the push-notification hook, when not empty: ``muted`` (recipients
    who muted the conversation, sorted), ``mentioned`` (recipients the
    message mentions, "everyone" expanded, never the sender, sorted) and
    ``mention_all`` (true when it mentions everyone)."""
    esc = _esc
    extra = f',"target":{m.target}' if m.target else ""
    muted = sorted(muted)
    if muted:
        extra += f',"muted":[{",".join(map(esc, muted))}]'
    mentioned = sorted(mentioned)
    if mentioned:
        extra += f',"mentioned":[{",".join(map(esc, mentioned))}]'
    if m.mention_all:
        extra += ',"mention_all":true'
    return (
        f'{{"type":"message","conv":{esc(m.conv)},"seq":{m.seq},"msg_id":"{m.msg_id.hex()}",'
        f'"sender":{esc(m.sender)},"device":{esc(m.device)},"kind":{m.kind},"server_time":{m.server_time},'
        f'"local_id":{m.local_id},"payload":"{base64.b64encode(m.payload).decode("ascii")}",'
        f'"recipients":[{",".join(map(esc, sorted(recipients)))}]{extra}}}'
    ).encode()


def mentioned_recipients(m: StoredMessage, recipients: Iterable[str]) -> list[str]:
    """The recipients ``m`` mentions ("everyone" = all of them), never its
    sender: who gets a mention counted, and the event's ``mentioned``."""
    if m.mention_all:
        return sorted(u for u in recipients if u != m.sender)
    if not m.mentions:
        return []
    rs = set(recipients)
    return [u for u in m.mentions if u in rs and u != m.sender]


def unread_for(m: StoredMessage, user: str, deleted: bool = False) -> bool:
    """Does ``m`` (an entry past ``user``'s read marker, at a seq the user
    was a member at) count as unread for ``user``?  A message from someone
    else, never once recalled (a tombstone) nor deleted by ``user`` for
    themselves (``deleted``: the store's delete-for-self mark of ``user``
    at ``m``'s seq).  The one rule of every unread and mention count."""
    return m.kind == MessageKind.MESSAGE and not m.recalled and not deleted and m.sender != user


def mentions_user(m: StoredMessage, user: str, deleted: bool = False) -> bool:
    """Does ``m`` (an entry the user was a member at) count as a mention of
    ``user``?  Only when it would count as unread (:func:`unread_for`):
    never once recalled -- a tombstone mentions nobody -- nor once
    ``user`` deleted it for themselves (``deleted``), as a recall."""
    return unread_for(m, user, deleted) and (m.mention_all or user in m.mentions)


# -- the conversation list: order and cursor (every backend shares these)

_CURSOR_HEAD = b"\x01"


def conversation_key(e: ConversationEntry) -> tuple[int, int, str]:
    """The list order: pinned first, then newest last entry first, then id."""
    return (0 if e.pinned else 1, -(e.last.server_time if e.last is not None else 0), e.conv)


def conversation_cursor(e: ConversationEntry) -> bytes:
    """The opaque cursor naming ``e``'s place in the list (ConvListResp.cursor):
    a version byte, the pinned byte, U64 server time of the last entry, the id."""
    pinned, neg_time, conv = conversation_key(e)
    return _CURSOR_HEAD + bytes((pinned,)) + (-neg_time).to_bytes(8, "big") + conv.encode("ascii")


def parse_conversation_cursor(cursor: bytes) -> Optional[tuple[int, int, str]]:
    """The list key a cursor names, None if it is not one
    :func:`conversation_cursor` could have made."""
    if not isinstance(cursor, bytes) or len(cursor) < 11 or cursor[:1] != _CURSOR_HEAD or cursor[1] > 1:
        return None
    try:
        conv = cursor[10:].decode("ascii")
    except UnicodeDecodeError:
        return None
    if conv and not valid_conversation(conv):
        return None
    return (cursor[1], -int.from_bytes(cursor[2:10], "big"), conv)


def conversation_page(entries: Iterable[ConversationEntry], op: "ReadConversations") -> "ConversationsPage":
    """Order, filter and cut ``entries`` (all of a user's) as ``op`` asks."""
    after = None
    if op.cursor:
        after = parse_conversation_cursor(op.cursor)
        if after is None:
            return ConversationsPage(ErrorCode.BAD_CURSOR, ())
    keyed = sorted(((conversation_key(e), e) for e in entries if op.include_hidden or not e.hidden), key=lambda ke: ke[0])
    if after is not None:
        keyed = [ke for ke in keyed if ke[0] > after]
    limit = max(op.limit, 0)
    return ConversationsPage(ErrorCode.OK, tuple(e for _, e in keyed[:limit]), len(keyed) > limit)


def conversation_entry(
    conv: str,
    last: Optional[StoredMessage],
    read_seq: int,
    unread: int,
    mention_count: int,
    settings: tuple[bool, bool, int],
) -> ConversationEntry:
    """Assemble an entry; ``settings`` = (pinned, muted, hidden_at)."""
    last_seq = last.seq if last is not None else 0
    pinned, muted, hidden_at = settings
    return ConversationEntry(
        conv, last, read_seq, last_seq, unread, mention_count, pinned, muted, bool(hidden_at) and last_seq < hidden_at
    )


def new_settings(op: "SetConversation", old: tuple[bool, bool, int], last_seq: int) -> tuple[bool, bool, int]:
    """The settings (pinned, muted, hidden_at) after ``op``; ``last_seq``:
    the last seq the user may see now."""
    pinned, muted, hidden_at = old
    if op.pinned:
        pinned = op.pinned == 1
    if op.muted:
        muted = op.muted == 1
    if op.hidden == 1:
        hidden_at = last_seq + 1
    elif op.hidden == 2:
        hidden_at = 0
    return (pinned, muted, hidden_at)

# ---------------------------------------------------------------- interface


class Store(ABC):
    """Durable storage for messages, inboxes, devices and read markers.

    Read methods given an id that is not well-formed return the "nothing
    there" value (0, None, empty) rather than raising: nothing can be stored
    under such an id.  Every method but close() raises StoreError once the
    store is closed.
    """

    #: True if commit() may run in a worker thread while reads run elsewhere
    #: (the network layer then keeps serving while a batch syncs).
    thread_safe_commit = False

    # -- identity and clock ------------------------------------------------

    def has_retention(self) -> Optional[bool]:
        """Whether a conversation has a history retention of its own stored
        (:class:`SetRetention`), read at start by the host: the core then
        starts its reclaim pass at once, as it does with a default retention
        (a restarted broker left alone must still trim).  None: this store
        cannot say without a request (the pass then starts with the first
        connection, host post or retention call)."""
        return None

    def halted(self) -> Optional[str]:
        """Why this store writes no more until the process restarts (a
        failed flush of LMDB's command log, a commit cut short), in words
        without file system paths; None while it may write (also while
        writes fail for a while, a full disk that may recover by itself).
        ``/healthz`` answers 503 with it: a liveness probe restarts the
        broker."""
        return None

    @abstractmethod
    def node_id(self) -> bytes:
        """8 random bytes chosen when the store was created, then fixed."""

    @abstractmethod
    def epoch(self) -> bytes:
        """16 bytes naming this store's history as of now (LoginAck.epoch).

        A client's inbox position (and the seqs and read markers it holds)
        is trusted only if it comes with an epoch in :meth:`epochs`; any
        other cursor -- from an empty store, from a store that later went
        back in time (a restored copy, a power cut without fsync) -- makes
        the client resynchronize (LoginAck.resync).  A store must never
        keep an epoch trusted while it may have lost something acknowledged
        under it; a new epoch per open is the simple way (LMDB, memory)."""

    @abstractmethod
    def epochs(self) -> tuple[bytes, ...]:
        """Every epoch whose cursors this store still vouches for, oldest
        first; :meth:`epoch` is the last."""

    @abstractmethod
    def last_server_time(self) -> int:
        """Highest server time of any stored message (0 if none), so a broker
        restarted on this store never stamps an earlier time."""

    # -- writes ------------------------------------------------------------

    @abstractmethod
    def commit(self, batch: WriteBatch) -> tuple[Result, ...]:
        """Apply every op of ``batch`` in ONE transaction and return one result
        per op, in order.  Returns only after the transaction is durable to
        the configured durability mode.  Raises :class:`StoreError` if nothing
        was committed (then no op took effect)."""

    def execute(self, request: StoreRequest) -> tuple[Result, ...]:
        """Run one :class:`StoreRequest`: a write request is :meth:`commit`,
        a read request :meth:`read`.  One result per op, in order.  Raises
        :class:`StoreError` as those do (a failed write took no effect)."""
        if request.write:
            return self.commit(WriteBatch(request.request_id, request.ops))  # type: ignore[arg-type]
        return self.read(request.ops)  # type: ignore[arg-type]

    def read(self, ops: Iterable[ReadOp]) -> tuple[Result, ...]:
        """Answer read ops (one result each, in order).  This generic version
        is built on the read methods below; a backend may answer them in one
        snapshot instead (LMDB does).  Raises StoreError when closed, TypeError
        for something that is not a read op."""
        out: list[Result] = []
        for op in ops:
            kind = type(op)
            if kind is LoadSession:
                out.append(self._load_session(op))  # type: ignore[arg-type]
            elif kind is ReadInbox:
                out.append(InboxPage(op.user, tuple(self.inbox_range(op.user, op.after, op.limit))))  # type: ignore[union-attr,arg-type]
            elif kind is ReadHistory:
                out.append(self._read_history(op))  # type: ignore[arg-type]
            elif kind is ReadReaders:
                out.append(self._read_readers(op))  # type: ignore[arg-type]
            elif kind is ReadEvents:
                out.append(self._read_events(op))  # type: ignore[arg-type]
            elif kind is ReadDevices:
                user = op.user  # type: ignore[union-attr]
                out.append(DevicesPage(user, tuple(self.devices(user))) if valid_id(user)
                           else Rejected(ErrorCode.BAD_REQUEST))
            elif kind is ReadDedupe:
                out.append(Deduped(self.deduped(op.sender, op.device, op.local_id)))  # type: ignore[union-attr]
            elif kind is ReadConversations:
                out.append(self._read_conversations(op))  # type: ignore[arg-type]
            elif kind is ReadPresence:
                out.append(self._read_presence(op))  # type: ignore[arg-type]
            elif kind is ReadRetention:
                out.append(self._read_retention(op))  # type: ignore[arg-type]
            else:
                raise TypeError(f"not a read op: {kind.__name__}")
        return tuple(out)

    def _read_conversations(self, op: ReadConversations) -> ConversationsPage:
        """Answer one :class:`ReadConversations` (both backends here do)."""
        raise TypeError(f"{type(self).__name__} has no conversation list")
    def hides_last_seen(self, user: str) -> bool:
        """The user's :class:`SetPresencePrivacy` setting (False if never set)."""
        raise NotImplementedError(f"{type(self).__name__} does not store presence settings")

    def _read_presence(self, op: ReadPresence) -> Result:
        """Answer one :class:`ReadPresence` from the public read methods
        (conversations, membership, devices): a few lookups per other user,
        bounded by the broker's subscription limit."""
        user = op.user
        if not valid_id(user) or not isinstance(op.others, tuple):
            return Rejected(ErrorCode.BAD_REQUEST)
        mine = [c for c in self.conversations(user) if self.access(c, user) is ErrorCode.OK]
        mine_set = set(mine)
        entries = []
        for other in op.others:
            if not (isinstance(other, str) and valid_id(other)):
                entries.append(PresenceInfo(other if isinstance(other, str) else "", False, False, 0))
                continue
            visible = other == user or any(
                c in mine_set and self.access(c, other) is ErrorCode.OK for c in self.conversations(other)
            )
            if not visible:
                entries.append(PresenceInfo(other, False, False, 0))
                continue
            last = max((d.last_seen for d in self.devices(other)), default=0)
            entries.append(PresenceInfo(other, True, self.hides_last_seen(other), max(last, 0)))
        return PresencePage(user, self.hides_last_seen(user), tuple(entries))

    def deduped(self, sender: str, device: str, local_id: int) -> bool:
        """Is the dedupe key stored (see :class:`ReadDedupe`)?  This default
        says no, so a backend without it checks every message's content
        as before; both backends here answer from their dedupe records."""
        return False

    def _read_retention(self, op: ReadRetention) -> Result:
        """Answer one :class:`ReadRetention` (RetentionState or Rejected)."""
        raise NotImplementedError(f"{type(self).__name__} has no history retention")

    def retention(self, conv: str) -> RetentionState:
        """The retention setting and history floor of ``conv`` (see
        :class:`ReadRetention`; ValueError for a malformed id)."""
        (res,) = self.read((ReadRetention(conv),))
        if isinstance(res, Rejected):
            raise ValueError(f"not a conversation id: {conv!r}")
        assert isinstance(res, RetentionState)
        return res

    @abstractmethod
    def _read_events(self, op: ReadEvents) -> Result:
        """Answer one :class:`ReadEvents` (EventsPage or Rejected)."""

    @abstractmethod
    def _read_history(self, op: ReadHistory) -> HistoryPage:
        """Answer one :class:`ReadHistory` (membership-filtered)."""

    @abstractmethod
    def _read_readers(self, op: ReadReaders) -> ReadersPage:
        """Answer one :class:`ReadReaders`."""

    def access(self, conv: str, user: str) -> ErrorCode:
        """Is ``user`` a member of ``conv`` now?  OK, BAD_REQUEST (malformed
        id), UNKNOWN_CONVERSATION or NOT_MEMBER."""
        if not (valid_conversation(conv) and valid_id(user)):
            return ErrorCode.BAD_REQUEST
        pair = direct_members(conv)
        if pair is not None:
            return ErrorCode.OK if user in pair else ErrorCode.NOT_MEMBER
        if not self.conversation_exists(conv):
            return ErrorCode.UNKNOWN_CONVERSATION
        return ErrorCode.OK if self.is_member(conv, user) else ErrorCode.NOT_MEMBER

    def _load_session(self, op: LoadSession) -> Result:
        if not (valid_id(op.user) and valid_id(op.device)):
            return Rejected(ErrorCode.BAD_REQUEST)
        user = op.user
        stored = self.device(user, op.device)
        convs = []
        for conv in self.conversations(user):
            pair = direct_members(conv)
            peer = "" if pair is None else (pair[1] if pair[0] == user else pair[0])
            convs.append(
                ConversationState(
                    conv,
                    self.read_marker(user, conv),
                    last_visible(self.spans(conv, user), self.last_seq(conv)),
                    self.unread(user, conv),
                    peer,
                    self.read_marker(peer, conv) if peer else 0,
                    self._purge_point(conv),
                )
            )
        return SessionLoaded(
            user,
            op.device,
            self.inbox_head(user),
            self.inbox_floor(user),
            stored.position if stored is not None else -1,
            tuple(convs),
            self.revoked_before(user, op.device),
        )

    def _purge_point(self, conv: str) -> int:
        """The last seq of ``conv``'s latest purge, 0 if never purged
        (:class:`ConversationState`), for :meth:`_load_session`; a store that
        answers LoadSession itself need not have it."""
        raise NotImplementedError

    # -- group admin: ops of a batch; these run one op in a batch of its own

    def create_group(self, conv: str, members: Iterable[str], now: int, *, history_visible: bool = False) -> None:
        """Create group ``conv`` with ``members`` (ValueError if it exists, the
        id is a direct id or malformed, or a member id is invalid).  A batch
        of one :class:`CreateGroup`.  ValueError too for no members, nothing
        stored (:data:`pimcore.ids.EMPTY_GROUP`), as the broker refuses it."""
        users = tuple(sorted(member_set(members)))
        if not users:
            raise ValueError(f"group {conv!r} not changed: {EMPTY_GROUP}")
        self._admin(CreateGroup(conv, users, now, history_visible))

    def add_members(self, conv: str, users: Iterable[str], now: Optional[int] = None) -> GroupChanged:
        """Add users to an existing group (KeyError if unknown; ValueError for
        a direct or malformed id or an invalid user id).  A batch of one
        :class:`AddMembers`; the entries' server times start at ``now`` (µs,
        default: the wall clock)."""
        users = tuple(sorted(member_set(users)))
        self._check_membership_change(conv, users, adding=True)
        return self._admin(AddMembers(conv, users, _wall(now)))

    def remove_members(self, conv: str, users: Iterable[str], now: Optional[int] = None) -> GroupChanged:
        """Remove users from an existing group (KeyError if unknown;
        ValueError as for :meth:`add_members`).  A batch of one
        :class:`RemoveMembers`."""
        users = tuple(sorted(member_set(users)))
        self._check_membership_change(conv, users, adding=False)
        return self._admin(RemoveMembers(conv, users, _wall(now)))

    def _check_membership_change(self, conv: str, users: tuple[str, ...], *, adding: bool) -> None:
        """ValueError, nothing changed, for a change of several users past
        :data:`pimcore.ids.MAX_MEMBERSHIP_ENTRIES` (see
        :func:`~pimcore.ids.membership_change_problem`)."""
        if len(users) > 1 and valid_group(conv) and self.conversation_exists(conv):
            current = set(self.members(conv))
            # Only the users that change write entries (a retry of a change
            # done writes none).
            changing = len(set(users) - current) if adding else len(set(users) & current)
            problem = ids.membership_change_problem(changing, len(current) + (changing if adding else 0))
            if problem is not None:
                raise ValueError(f"group {conv!r} not changed: {problem}")

    def _admin(self, op: Op) -> GroupChanged:
        [res] = self.commit(WriteBatch(0, (op,)))
        if isinstance(res, Rejected):
            if res.code is ErrorCode.UNKNOWN_CONVERSATION:
                raise KeyError(op.conv)  # type: ignore[union-attr]
            if res.code is ErrorCode.ALREADY_EXISTS:
                raise ValueError(f"group exists: {op.conv!r}")  # type: ignore[union-attr]
            conv = op.conv  # type: ignore[union-attr]
            if not valid_group(conv):
                raise ValueError(f"not a group id: {group_problem(conv)}")
            if isinstance(op, RemoveMembers) and all(valid_id(u) for u in op.users) and not op.stamps:
                raise ValueError(f"group {conv!r} not changed: {LAST_MEMBERS}")
            raise ValueError(f"invalid member ids: {op!r}")
        assert isinstance(res, GroupChanged)
        return res

    # -- reads -------------------------------------------------------------

    @abstractmethod
    def conversation_exists(self, conv: str) -> bool:
        """A created group, or a well-formed direct id."""

    @abstractmethod
    def members(self, conv: str) -> tuple[str, ...]:
        """Sorted members (both users for a direct id; () if unknown)."""

    @abstractmethod
    def is_member(self, conv: str, user: str) -> bool: ...

    @abstractmethod
    def last_seq(self, conv: str) -> int:
        """The conversation's last seq (0 if it has no messages)."""

    @abstractmethod
    def history(
        self, conv: str, from_seq: int, limit: int, backward: bool = False
    ) -> list[StoredMessage]:
        """Forward: seq > from_seq ascending.  Backward: seq < from_seq
        descending (from_seq <= 0 = from the newest).  At most ``limit``."""

    @abstractmethod
    def message(self, msg_id: bytes) -> Optional[StoredMessage]: ...

    @abstractmethod
    def inbox_head(self, user: str) -> int:
        """Highest position ever assigned in the user's inbox (0 if none)."""

    @abstractmethod
    def inbox_floor(self, user: str) -> int:
        """Positions <= floor were reclaimed (0 if nothing was)."""

    @abstractmethod
    def inbox_range(
        self, user: str, after: int, limit: int
    ) -> list[tuple[int, StoredMessage]]:
        """Entries with position > ``after`` ascending, at most ``limit``."""

    @abstractmethod
    def device(self, user: str, device: str) -> Optional[DeviceState]: ...

    @abstractmethod
    def revoked_before(self, user: str, device: str) -> int:
        """µs: tokens of ``user`` for ``device`` issued earlier are revoked
        (the later of the user-wide and the device's :class:`RevokeTokens`;
        0 = none)."""

    @abstractmethod
    def devices(self, user: str) -> list[DeviceState]:
        """The user's known devices, sorted by device id."""

    @abstractmethod
    def read_marker(self, user: str, conv: str) -> int:
        """The user's read marker in ``conv`` (0 if never read)."""

    @abstractmethod
    def read_positions(self, conv: str) -> dict[str, int]:
        """Every current member's read marker (0 for members who never read)."""

    @abstractmethod
    def unread(self, user: str, conv: str) -> int:
        """Messages (kind MESSAGE) from others after the user's marker, inside
        the user's membership intervals (module docstring, Membership)."""

    @abstractmethod
    def spans(self, conv: str, user: str) -> tuple[tuple[int, int], ...]:
        """The user's membership intervals ``(joined, left)`` in ``conv``,
        ascending (``left`` = :data:`OPEN` while a member): ``((0, OPEN),)``
        for either user of a direct id, () for a user never a member."""

    @abstractmethod
    def history_visible(self, conv: str) -> bool:
        """The group's ``history_visible`` setting (False for an unknown
        group or a direct id: a 1:1 chat's users see it all anyway)."""

    @abstractmethod
    def conversations(self, user: str) -> list[str]:
        """Conversations the user belongs to or has messages in, sorted.

        That is: groups the user is a member of now, plus every conversation
        in which an entry was appended to the user's inbox (a direct
        conversation therefore appears with its first message; a group the
        user was removed from stays: they received their LEFT entry)."""

    # -- lifecycle ---------------------------------------------------------

    @abstractmethod
    def close(self) -> None:
        """Release the store (idempotent)."""

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_U64_END = 1 << 64
_I64_MIN = -(1 << 63)
_I64_END = 1 << 63


def _int_in(value: object, lo: int, end: int) -> bool:
    # ``type(...) is int`` on purpose: bool is an int subclass, and a bool
    # local id or timestamp is a bug upstream, not a value.
    return type(value) is int and lo <= value < end


def _wall(now: Optional[int]) -> int:
    return time.time_ns() // 1000 if now is None else now


def _stamps_ok(stamps: object, n: int) -> bool:
    if not isinstance(stamps, tuple):
        return False
    if not stamps:
        return True
    return len(stamps) >= n and all(
        isinstance(st, tuple)
        and len(st) == 2
        and isinstance(st[0], bytes)
        and len(st[0]) == 16
        and _int_in(st[1], 0, _I64_END)
        for st in stamps
    )


def malformed(op: Op) -> bool:
    """Is a field of ``op`` malformed whatever the store holds?

    Such an op gets Rejected(BAD_REQUEST) from every backend.  For
    :class:`NewMessage` the conversation id is NOT checked here: it is checked
    after the dedupe lookup (see :class:`NewMessage`).  Ranges are those every
    backend can store: ``local_id`` is a u64, times are i64 (server time
    non-negative), ``msg_id`` is 16 bytes.
    """
    if isinstance(op, NewMessage):
        # Every message of every batch comes through here: the range checks
        # are _int_in written out (same rules), one call instead of four.
        local_id, client_time, server_time = op.local_id, op.client_time, op.server_time
        return not (
            (
                (valid_id(op.sender) and valid_id(op.device))
                # the host posting as itself (ids.SYSTEM): never a user id
                or (op.sender == SYSTEM and op.device == SYSTEM)
            )
            and type(local_id) is int
            and type(op.after_seq) is int
            and 0 <= op.after_seq < _U64_END
            and 0 <= local_id < _U64_END
            and type(client_time) is int
            and _I64_MIN <= client_time < _I64_END
            and type(server_time) is int
            and 0 <= server_time < _I64_END
            and isinstance(op.msg_id, bytes)
            and len(op.msg_id) == 16
            and isinstance(op.payload, bytes)
            and isinstance(op.digest, bytes)
            and (not op.mentions or (isinstance(op.mentions, tuple) and all(valid_id(u) for u in op.mentions)))
            and type(op.mention_all) is bool
        )
    if isinstance(op, (AckPosition, TouchDevice)):
        pos = op.position
        return not (
            valid_id(op.user)
            and valid_id(op.device)
            and type(pos) is int
            and _int_in(op.now, _I64_MIN, _I64_END)
        )
    if isinstance(op, MarkRead):
        return not (valid_id(op.user) and valid_conversation(op.conv) and type(op.seq) is int)
    if isinstance(op, Reclaim):
        return not (
            _int_in(op.now, _I64_MIN, _I64_END)
            and type(op.device_retention) is int
            and type(op.max_age) is int
        )
    if isinstance(op, (CreateGroup, AddMembers, RemoveMembers)):
        users = op.members if isinstance(op, CreateGroup) else op.users
        return not (
            valid_conversation(op.conv)
            and not is_direct(op.conv)
            and isinstance(users, tuple)
            and all(valid_id(u) for u in users)
            and _int_in(op.now, _I64_MIN, _I64_END)
            and (
                isinstance(op, CreateGroup)
                or (
                    isinstance(op.by, str)
                    and (op.by == "" or valid_id(op.by))
                    and op.now >= 0
                    and _stamps_ok(op.stamps, len(users))
                )
            )
        )
    if isinstance(op, AmendMessage):
        return not (
            (
                (valid_id(op.sender) and valid_id(op.device))
                or (op.sender == SYSTEM and op.device == SYSTEM and op.kind != MessageKind.DELETE)
            )
            and op.kind in _AMEND_KINDS
            and _int_in(op.local_id, 0, _U64_END)
            and _int_in(op.target, 1, _U64_END)
            and _int_in(op.client_time, _I64_MIN, _I64_END)
            and _int_in(op.server_time, 0, _I64_END)
            and _int_in(op.window, 0, _I64_END)
            and isinstance(op.msg_id, bytes)
            and len(op.msg_id) == 16
            and isinstance(op.payload, bytes)
            and (op.kind == MessageKind.EDIT or op.payload == b"")
            and isinstance(op.digest, bytes)
        )
    if isinstance(op, AppendEvent):
        return not (isinstance(op.data, bytes) and _int_in(op.now, _I64_MIN, _I64_END))
    if isinstance(op, AckEvents):
        return not (valid_id(op.consumer) and type(op.upto) is int)
    if isinstance(op, DeleteConsumer):
        return not valid_id(op.consumer)
    if isinstance(op, RevokeTokens):
        return not (
            valid_id(op.user)
            and (op.device == "" or valid_id(op.device))
            and _int_in(op.before, _I64_MIN, _I64_END)
        )
    if isinstance(op, SetConversation):
        return not (
            valid_id(op.user)
            and valid_conversation(op.conv)
            and all(type(v) is int and 0 <= v <= 2 for v in (op.pinned, op.muted, op.hidden))
        )
    if isinstance(op, SetPresencePrivacy):
        return not (valid_id(op.user) and type(op.hide_last_seen) is bool)
    if isinstance(op, SetRetention):
        return not (
            valid_conversation(op.conv)
            and _int_in(op.max_age, -1, _I64_END)
            and _int_in(op.max_count, -1, _I64_END)
        )
    if isinstance(op, Expire):
        return not (
            _int_in(op.now, _I64_MIN, _I64_END)
            and _int_in(op.max_age, 0, _I64_END)
            and _int_in(op.max_count, 0, _I64_END)
        )
    if isinstance(op, PurgeConversation):
        return not valid_conversation(op.conv)
    if isinstance(op, PurgeUser):
        return not (valid_id(op.user) and _int_in(op.now, 0, _I64_END))
    raise TypeError(f"not a store op: {type(op).__name__}")


def retention_limits(own: tuple[int, int], default_age: int, default_count: int) -> tuple[int, int]:
    """(max_age, max_count) in force for a conversation whose own setting is
    ``own`` (-1 per field: the default); 0 = no limit."""
    age, count = own
    return (default_age if age < 0 else age, default_count if count < 0 else count)


class AsyncStore(ABC):
    """The store contract for networked backends: the same requests and
    results as :class:`Store`, awaited.  The network layer keeps at most one
    write request in flight and any number of reads, and feeds each outcome
    back to the core as it completes (reads may complete out of order).

    ``execute`` raises :class:`StoreError` when the request had no effect;
    for a write that means nothing of the batch was applied.  (A backend that
    cannot know -- a timeout after sending -- must still not apply it twice:
    the core's retries are safe because NewMessage is deduplicated.)
    """

    @abstractmethod
    async def node_id(self) -> bytes:
        """8 bytes fixed when the store was created (see :meth:`Store.node_id`)."""

    @abstractmethod
    async def epoch(self) -> bytes:
        """See :meth:`Store.epoch`."""

    @abstractmethod
    async def epochs(self) -> tuple[bytes, ...]:
        """See :meth:`Store.epochs`."""

    @abstractmethod
    async def last_server_time(self) -> int:
        """See :meth:`Store.last_server_time`."""

    @abstractmethod
    async def execute(self, request: StoreRequest) -> tuple[Result, ...]:
        """See :meth:`Store.execute`."""

    @abstractmethod
    async def conversation_exists(self, conv: str) -> bool:
        """See :meth:`Store.conversation_exists`."""

    @abstractmethod
    async def members(self, conv: str) -> tuple[str, ...]:
        """See :meth:`Store.members`."""

    @abstractmethod
    async def history_visible(self, conv: str) -> bool:
        """See :meth:`Store.history_visible`."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the store (idempotent)."""
