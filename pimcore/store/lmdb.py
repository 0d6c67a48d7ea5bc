"""The LMDB backend: one environment, named sub-databases, one transaction
per batch.

Durability
----------
``durability="sync"`` (the default) opens LMDB with ``sync=True,
metasync=True``: :meth:`LmdbStore.commit` returns after the data and the
meta page are fsynced, so an acked message survives power loss.
``durability="os"`` opens with ``sync=False, metasync=False``: a commit is
written to the OS page cache (LMDB writes with ``pwrite``, not through a
writable map), so it survives a crash of the process but not of the machine;
a power loss can lose the last commits but never tears a transaction (LMDB's
copy-on-write B-tree falls back to the previous intact meta page).
``durability="log"`` is as durable as ``sync`` with one flush per commit
instead of LMDB's two: each batch is appended to a command log and
``fdatasync``'d before LMDB commits it without flushing; checkpoints in a
thread flush LMDB, and a start-up after a crash puts the checkpoint's meta
pages back and replays the log (:mod:`pimcore.store.wal`).  Only the broker
(the owner) writes a log store: a maintenance open (``owner=False``) while it
runs is read-only; one while no broker runs recovers the store and leaves log
durability, as does an owner opened with another durability.  Under ``log``
the broker also lets several batches share one LMDB commit
(:meth:`LmdbStore.defer_commits`): each is acked when its record is flushed,
and LMDB commits them together when the broker says (or a reader needs it).

Concurrency
-----------
One writer and any number of readers.  Writes (``commit`` and the group admin
calls) are serialised by a process-wide lock on top of LMDB's own writer
mutex; each read method runs in its own short read transaction.  Growing the
map (``set_mapsize``) is only allowed while this process has no transaction
open, so reads pass through a gate that the resizing writer closes and drains
first (:class:`_Gate`); the gate also makes :meth:`LmdbStore.close` safe
against in-flight reads.  If another process grew the map (LMDB then answers
MDB_MAP_RESIZED), the new size is adopted the same way and the transaction
begun again.  A SIGKILLed process may leave a stale reader slot: it is
released when the store is next opened (``reader_check``).  With deferred
commits the write transaction stays open between batches on its owner's
thread: that thread's reads commit it first, other threads' reads and writes
wait for the owner's commit (:meth:`LmdbStore.defer_commits`).

Batches
-------
A commit is one write transaction; ops run in order against it, so each sees
the effects of the earlier ones.  The hottest counters (a conversation's last
seq, an inbox's head and floor) go through a per-batch write-back cache
(:class:`_Batch`) and are written once at the end of the batch.  A
message's ``msgs``, ``convidx`` and ``dedupe`` records are staged too and
written with one sorted ``Cursor.putmulti`` per sub-database (``msgs``
appended with MDB_APPEND when every new msg id sorts after the stored ones,
as the server-time-first ids do), so a message costs one LMDB call (its
dedupe lookup, which first consults the staged records) instead of four.
The staged dedupe entries are written as one record per run of a device's
consecutive local_ids (``dedupe`` runs, below).
Only NewMessage, AckPosition and TouchDevice run while records are staged;
any other op writes them out first, so it reads what the earlier ops of
its batch wrote.  A msg id that turns out to be stored already (a broken
clock) re-runs the batch with every record put at once, which rejects just
that op.  If the map
fills up mid-batch the transaction is aborted, the map doubled and the whole
batch run again from scratch, so nothing outside the transaction may be
changed while it runs.

Fan-out
-------
A group message is one inbox entry per member, so a 1,000-member group makes
the inbox writes the bulk of a commit.  They are queued per member and
written at the end of the batch in key order with one ``Cursor.putmulti``
(each member's new entries are adjacent keys, so LMDB's cursor stays on the
leaf page it just wrote); the per-recipient loops are in the fast path
(:mod:`pimcore._pure.fanout` and its compiled twin), as is the whole of a
plain NewMessage into a conversation the commit already holds
(``store_plain_run``: each run of such ops in a batch is one call, which
stops at the first op it does not take; that op takes the general path, and
a test holds both to the same bytes).  What a commit read --
members, last seqs, inbox heads and floors, which members already have the
conversation flagged, device records, each sending device's highest stored
local_id (a send above it needs no dedupe probe) -- is kept for the next
commit as long as LMDB's transaction counter proves that nobody else wrote
in between (:class:`_Hot`), so a steady stream of commits to one group does
not re-read its 1,000 members and heads every time.  The device records that
acks change are written once per batch, with the staged message records.

Key layout
----------
Notation: ``T(s)`` is a text part: one length byte then the ASCII bytes
(every id is ASCII by its regex and at most ``MAX_CONVERSATION_ID_LEN`` = 131
bytes long, see :mod:`pimcore.ids`); ``U64``/``I64`` are 8-byte big-endian
unsigned/signed integers.  With the longest ids the longest key is
``T(user) T(conv)`` (userconvs, reads): 65 + 132 = 197 bytes, well under
LMDB's 511-byte key limit; :data:`MAX_KEY_LEN` computes it from the id limits
and the import fails if a limit ever grows past what LMDB can store.

Length-prefixing makes each text part self-delimiting: all keys of user
``al`` start with ``T("al") = b"\\x02al"``, which no key of ``alice`` starts
with, so one user's (or conversation's) keys are one contiguous range that a
cursor scans with ``set_range(prefix)``.  Big-endian integers sort
numerically, so within that range the inbox is in position order and the
conversation index in seq order.  Across texts the order is by length first,
so listings whose order is visible (members, devices, conversations) are
sorted after the scan.

==========  =================================  ======================================
sub-db      key                                value
==========  =================================  ======================================
meta        ``b"node"``                        8 random bytes, created once
meta        ``b"schema"``                      U64 schema version (:data:`SCHEMA_VERSION`)
meta        ``b"hwm"``                         U64 highest server time ever stored
meta        ``b"epoch"``                       16 random bytes: the current epoch
meta        ``b"epochs"``                      every trusted epoch, 16 bytes each
meta        ``b"closed"``                      per trusted epoch whose end was
                                               recorded: epoch + U64 highest
                                               server time stored then (Epochs)
meta        ``b"osrun"``                       boot id + epoch of a ``durability="os"``
                                               run not closed cleanly (else absent)
msgs        msg_id (16 bytes)                  message record (below)
convs       T(conv)                            U64 last seq
convidx     T(conv) U64(seq)                   msg_id + sender (ASCII), or for a
                                               membership entry msg_id + U8 kind
                                               (1 JOINED, 2 LEFT) + the user
groups      T(group)                           I64 created_at + U8 flags (1: history
                                               visible)
members     T(group) T(user)                   empty
spans       T(group) T(user)                   membership intervals: U64 joined +
                                               U64 left (2^64-1 while a member),
                                               ascending, 16 bytes each
userconvs   T(user) T(conv)                    1 byte flags: 1 member, 2 has messages
inbox       T(user) U64(pos)                   msg_id + I64 server_time
inboxmeta   T(user)                            U64 head + U64 floor
devices     T(user) T(device)                  U64 position + I64 last_seen
dedupe      T(sender) T(device) U64(local_id)  msg_id + U64 seq + I64 server_time + digest
dedupe      T(sender) T(device) U64(last)      a run: the entries of local_ids first..last
            U64(first)  (first < last)         (each as above, all of one length), in order
reads       T(user) T(conv)                    U64 read seq
revoked     T(user) T(device or "")            I64 tokens issued before are revoked
meta        ``b"evlast"``                      U64 highest host event id ever appended
events      U64(id)                            I64 time + the event's data (host events)
evcursors   T(consumer)                        U64 the consumer's acked event id
convset     T(user) T(conv)                    the user's settings of the conversation:
                                               U8 flags (1 pinned, 2 muted) + U64
                                               hidden_at (0: not hidden)
mentionidx  T(user) T(conv) U64(seq)           empty: the entry at seq mentions the user
deleted     T(user) T(conv) U64(seq)           empty: the user deleted that message for
                                               themselves (AmendMessage DELETE)
retention   T(conv)                            I64 max_age + I64 max_count (-1: the
                                               broker default) + U64 history floor
==========  =================================  ======================================

History retention (``retention``, also schema 3, no migration) removes a
prefix of a conversation: the entries of seqs <= floor are gone from
``msgs``, ``convidx``, ``dedupe`` and ``inbox`` (an inbox may then have
holes above its floor: reads skip them, :class:`Reclaim` walks over them).

Dedupe runs (schema 4): a batch writes the dedupe entries it staged as one
record per run of a device's consecutive local_ids whose entries have one
length (digests are 16 bytes, so in practice every run), keyed by the run's
last local_id and then its first; an entry alone keeps the single-entry
record of schema 3.  A device's records cover disjoint ranges (a run holds
only local_ids no record held), so the entry of local_id L is in the first
record at or after ``T(sender) T(device) U64(L)``: that key itself, or a
run of the device whose first is <= L (one cursor ``set_range``,
``dedupe_get`` of :mod:`pimcore._pure.fanout`), and the device's highest
stored local_id is still the U64 after the prefix of its last key.  With
50 connections x 16 sends in flight a batch holds about 16 consecutive sends
of each device: one dedupe record instead of 16 (``bench/bench_hotpath.py``,
BENCHMARKS.md).  Retention and PurgeConversation remove the entries of the
messages they remove and write the rest of each run back once (cut where
entries went), never dropping another message's entry (its retry would be
stored twice); PurgeUser deletes the user's records, runs whole.  A run
record no batch can have written (last not above first, or a value that is
not last - first + 1 entries of one length of at least 32 bytes: a corrupt
or hand-edited store) is refused by every reader with StoreError
("dedupe run ... (store corrupt)"), never read as something else.
Schema 3 stores hold single records only and are read as they are; their
next owner writes schema 4 (no data changes) so that an older pimcore,
which would not look inside a run, refuses the store.

Host events (see :mod:`pimcore.store.base`) are exactly ids
floor+1..``evlast``: reclamation deletes a prefix, so the floor is the first
key of ``events`` minus one (or ``evlast`` when it is empty).  The two
sub-dbs came after schema 3 and need no migration (an older store simply
has none yet).

The sender in ``convidx`` lets :meth:`LmdbStore.unread` count without
loading messages (a kind byte is not an id character, so a membership
entry is told apart by its 17th byte); the server time in ``inbox`` lets :class:`Reclaim` apply
``max_age`` without loading messages; seq and server time in ``dedupe`` let a
retry be answered with one lookup.

Message record: ``U64 seq, U64 local_id, I64 client_time, I64 server_time,
U64 after_seq, U8 kind`` (struct ``>QQqqQB``), then ``T(conv) T(sender)
T(device)``, then the payload to the end of the value.  A kind byte with bit
0x80 (``_AMENDED``) has ``U64 target, U64 edited, U8 recalled`` after
``T(device)``: RECALL/EDIT/DELETE entries and messages that were edited or
recalled (a recalled message's payload is empty; its ``convidx`` value is
msg_id + U8 3 (RECALL) + sender, so unread counts skip it).  A message with
mentions has bit 0x40 (``_HAS_MENTIONS``) and, after that trailer if any and
before the payload, ``U8 mention_all, U16 count, T(user) * count``.  Older
records never have these bits, so no migration.  ``convset``,
``mentionidx`` (the mention counts of the conversation list: a cursor
counts the keys after the read marker) and ``deleted`` came after schema 3
and need no migration, like ``events``.  (Schema 1 had no
after_seq and kind; opening a schema 1 store rewrites its records once.
Schema 2 had no ``spans`` and no group flags: opening it gives every member
the interval (0, open) and every group the default, history not visible.)

Epochs
------
Every open takes a new epoch and appends it to the trusted list; a client
cursor is honoured only if its epoch is on the list (``Store.epochs``).  So
a copy of the data directory made while the broker was stopped and later
restored knows only the epochs up to the copy: cursors handed out after it
carry an epoch the restored store never had, and those clients
resynchronize, even if new messages have since refilled the same positions.
A copy taken while a broker runs (``mdb_copy``, the files between two
commits) knows that run's epoch too, and a device may have taken entries in
it after the copy: so each owner open records where the last run's epoch
ended in this history, the highest server time stored then (meta
``b"closed"``, epoch -> U64, for the trusted epochs), and a cursor of an
earlier epoch whose position holds an entry stored after that end is from
another history (``LoadSession.claim``, ``SessionLoaded.foreign``).

An epoch whose run may have lost acknowledged commits is struck off the
list.  A ``durability="os"`` run writes the machine's boot id and its epoch
under ``b"osrun"`` when it opens the store and removes it when it closes
cleanly.  An open that finds a boot id from ANOTHER boot knows the machine
went down (power cut, OS crash) while unsynced commits were only in the
page cache: that run's epoch is distrusted.  The same boot id means only the
process died: the page cache kept every commit.  ``durability="sync"`` runs
never lose a commit and leave no mark.  The rule assumes one ``os`` writer
process at a time (the broker).  Fixed-width integers cost a few bytes over varints but
decode in one ``unpack_from`` call, which matters more in Python.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import itertools
import logging
import operator
import os
import sys
import pickle
import queue
import struct
import threading
import time
import typing
import zlib
from contextlib import contextmanager
from dataclasses import replace
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

import lmdb

from . import wal
from .._backend import impl as _impl
from .._pure.fanout import dedupe_run as _pure_dedupe_run
from ..errors import ErrorCode, StoreError, StoreInUse
from ..ids import MAX_CONVERSATION_ID_LEN, MAX_ID_LEN, quote_arg
from .base import (
    removes_everyone,
    SYSTEM,
    AmendMessage,
    amend_entry,
    amend_problem,
    amended,
    ConversationEntry,
    ConversationSet,
    ConversationsPage,
    ReadConversations,
    SetConversation,
    conversation_entry,
    conversation_page,
    mentioned_recipients,
    purged_tombstone,
    new_settings,
    AckEvents,
    ConsumerDeleted,
    DeleteConsumer,
    AppendEvent,
    EventAppended,
    EventsAcked,
    EventsPage,
    ReadEvents,
    StoredEvent,
    message_event,
    RevokeTokens,
    SetPresencePrivacy,
    PresencePrivacySet,
    ReadPresence,
    Revoked,
    AckPosition,
    Acked,
    ConversationState,
    HistoryPage,
    InboxPage,
    LoadSession,
    MessageKind,
    OPEN,
    ReadersPage,
    ReadReaders,
    ReadDevices,
    ReadDedupe,
    Deduped,
    DevicesPage,
    last_visible,
    last_message_floor,
    AMENDING,
    member_ranges,
    hidden_amend,
    horizon,
    iter_page_seqs,
    sees,
    visible_ranges,
    ReadHistory,
    ReadInbox,
    ReadOp,
    SessionLoaded,
    AddMembers,
    CreateGroup,
    GroupChanged,
    RemoveMembers,
    Appended,
    DeviceState,
    Duplicate,
    MarkRead,
    NewMessage,
    Op,
    ReadMarked,
    Reclaim,
    Reclaimed,
    Rejected,
    Result,
    Store,
    StoredMessage,
    TouchDevice,
    Touched,
    WriteBatch,
    Expire,
    EXPIRED_IDS,
    Expired,
    PurgeConversation,
    PurgeUser,
    Purged,
    ReadRetention,
    RetentionSet,
    RetentionState,
    SetRetention,
    after_floor,
    retention_limits,
    direct_members,
    is_direct,
    malformed,
    valid_conversation,
    valid_id,
)

__all__ = ["LmdbStore", "StoreSummary", "SCHEMA_VERSION", "DURABILITY_MODES", "MAX_KEY_LEN"]

SCHEMA_VERSION = 4
DURABILITY_MODES = ("sync", "os", "log")

#: The sub-databases, in the order they are opened.
_DB_NAMES = (
    "meta",
    "msgs",
    "convs",
    "convidx",
    "groups",
    "members",
    "userconvs",
    "inbox",
    "inboxmeta",
    "devices",
    "dedupe",
    "reads",
    "revoked",
    "spans",
    "events",
    "evcursors",
    "convset",
    "mentionidx",
    "deleted",
    "retention",
)
#: Each sub-database as :meth:`LmdbStore.summary` names it: (its key in
#: ``StoreSummary.entries`` and ``pimcore inspect --json``, what one entry is
#: in plain words).  Stable: scripts read these keys.
_DB_LABELS: dict[str, tuple[str, str]] = {
    "meta": ("meta", "store metadata keys"),
    "msgs": ("messages", "stored messages (with edit, recall and delete entries)"),
    "convs": ("conversations", "conversations"),
    "convidx": ("conversation_entries", "conversation history entries (messages and joins/leaves)"),
    "groups": ("groups", "groups"),
    "members": ("group_members", "group memberships"),
    "userconvs": ("user_conversations", "conversation list entries (user x conversation)"),
    "inbox": ("inbox_entries", "inbox entries (one per recipient of a message)"),
    "inboxmeta": ("inboxes", "inboxes (users with an inbox head)"),
    "devices": ("devices", "devices"),
    "dedupe": ("dedupe", "retry (dedupe) records (a run of a device's consecutive local ids in a batch is one)"),
    "reads": ("read_markers", "read markers"),
    "revoked": ("revocations", "token revocations"),
    "spans": ("membership_spans", "membership intervals"),
    "events": ("events", "host events not yet reclaimed"),
    "evcursors": ("event_consumers", "host event consumers"),
    "convset": ("conversation_settings", "conversation settings (pinned, muted, hidden)"),
    "mentionidx": ("mentions", "mentions"),
    "deleted": ("deleted_for_user", "messages deleted for one user"),
    "retention": ("retention", "retention settings"),
}
assert tuple(_DB_LABELS) == _DB_NAMES


@dataclasses.dataclass(frozen=True)
class StoreSummary:
    """What :meth:`LmdbStore.summary` reads: one consistent read transaction
    plus a look at the files, nothing written.

    * ``path``: the store directory (the one holding ``data.mdb``).
    * ``broker``: ``"running"`` (a process holds ``broker.lock``: a broker,
      or a maintenance process recovering a ``log`` store), ``"not
      running"`` or ``"unknown"`` (the lock could not be probed without
      taking it: not Linux, or ``/proc/locks`` unreadable);
      ``broker_holder``: who, as the holder wrote it in ``broker.lock``
      ("process 123 (pimcore serve ...)"), or None.
    * ``schema``: the store's format version (:data:`SCHEMA_VERSION` is this
      code's; an older one is upgraded when a broker next opens it).
    * ``node_id``: 8 bytes, hex.  ``epoch``: the current epoch (16 bytes,
      hex; empty if no broker ever opened the store); ``epochs``: every
      trusted epoch, oldest first.
    * ``last_server_time``: the highest server time ever stored,
      microseconds since the Unix epoch (0: nothing stored yet).
    * ``map_size``: LMDB's map size in bytes (it doubles when full);
      ``page_size``: bytes; ``pages_used``: pages in use (LMDB's last page
      number + 1); ``bytes_used``: ``pages_used * page_size`` (free pages
      LMDB will reuse included); ``file_size``: ``data.mdb``'s size in bytes.
    * ``last_txnid``: LMDB's last committed transaction; ``readers``: reader
      slots of the lock file used so far (LMDB's high-water mark, all
      processes, this handle's included; a slot is reused once free) of
      ``max_readers``.
    * ``entries``: entry count of each sub-database, keyed by the names of
      :data:`_DB_LABELS` (``messages``, ``inbox_entries``, ...), in a fixed
      order; None for a sub-database the store does not have yet (written
      by an older version).
    * ``log``: the command log (``durability="log"``), or None if the store
      has no ``log/`` directory (:class:`pimcore.store.wal.LogSummary`).
    """

    path: str
    broker: str
    broker_holder: Optional[str]
    schema: Optional[int]
    node_id: str
    epoch: str
    epochs: tuple[str, ...]
    last_server_time: int
    map_size: int
    page_size: int
    pages_used: int
    bytes_used: int
    file_size: int
    last_txnid: int
    readers: int
    max_readers: int
    entries: dict[str, Optional[int]]
    log: Optional[wal.LogSummary]


#: What the store makes is its owner's alone: it holds every message in
#: clear (the token secret beside it is 0600 too).  A directory or file that
#: exists keeps its mode: an operator may have widened it on purpose.
_DIR_MODE = 0o700
_FILE_MODE = 0o600

#: Below this LMDB cannot even hold the sub-database catalogue comfortably.
_MIN_MAP_SIZE = 1 << 20

_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_HEAD_FLOOR = struct.Struct(">QQ")
_DEVICE = struct.Struct(">Qq")
_INBOX = struct.Struct(">16sq")
_DEDUPE = struct.Struct(">16sQq")
_RECORD = struct.Struct(">QQqqQB")
#: Kind byte bit: the record carries an amend trailer (below).
_AMENDED = 0x80
#: target, edited, recalled: after T(device), before the payload, in a record
#: whose kind byte has _AMENDED (an entry RECALL/EDIT/DELETE, or a message
#: that was edited or recalled).
_AMEND = struct.Struct(">QQB")
_RECORD_V1 = struct.Struct(">QQqq")
_GROUP = struct.Struct(">qB")
_SPAN = struct.Struct(">QQ")
_RETENTION = struct.Struct(">qqQ")
#: The same with the conversation's purge point after it (the last seq of
#: its latest purge: ConversationState.purged); a record without one is
#: written as before, so a store never purged keeps its bytes.
_RETENTION_PURGED = struct.Struct(">qqQQ")
_HISTORY_VISIBLE = 1

#: The longest key of the layout above with the longest ids (T(x) is
#: 1 + len(x) bytes).  LMDB refuses keys over 511 bytes (its default
#: MDB_MAXKEYSIZE) and a length byte counts at most 255.
_T_USER = 1 + MAX_ID_LEN
_T_CONV = 1 + MAX_CONVERSATION_ID_LEN
MAX_KEY_LEN = max(
    _T_CONV + 8,  # convidx
    _T_CONV + _T_USER,  # members, userconvs, reads, convset
    _T_USER + _T_CONV + 8,  # mentionidx
    _T_USER + _T_USER + 16,  # dedupe (a run's key)
    _T_USER + _T_USER,  # devices
)
if MAX_KEY_LEN > 511 or MAX_CONVERSATION_ID_LEN > 255:  # pragma: no cover - a limit in pimcore.ids grew
    raise ImportError(f"the id limits of pimcore.ids give LMDB keys of {MAX_KEY_LEN} bytes (LMDB stores at most 511)")

_MEMBER = 1
_HAS_MESSAGES = 2
_U64_MAX = (1 << 64) - 1

#: py-lmdb exposes mdb_txn_id (what makes the cache of :class:`_Hot` safe).
_TXN_IDS = hasattr(lmdb.Transaction, "id")
#: Bounds of the cache that commits keep (:class:`_Hot`): inboxes, last seqs
#: and conversations, and members summed over the cached conversations.
_HOT_USERS = 1 << 16
_HOT_CONVS = 1 << 14
_HOT_MEMBERS = 1 << 16

T = TypeVar("T")
#: A transaction begun with ``buffers=False`` (our only kind): keys and values
#: are ``bytes``.  lmdb's stubs say ``bytes | memoryview`` for every
#: transaction, hence Any rather than ``lmdb.Transaction``.
_Txn = Any


@lru_cache(maxsize=1 << 16)
def _t(text: str) -> bytes:
    """A length-prefixed text key part (see the key layout).  Cached: the
    same few ids are encoded several times per message on the hot path."""
    raw = text.encode("ascii")
    return bytes((len(raw),)) + raw


@lru_cache(maxsize=1 << 14)
def _conv_info(conv: str) -> Optional[tuple[bytes, Optional[tuple[str, str]]]]:
    """(T(conv), the two users of a direct id or None for a group), or None
    if ``conv`` is malformed.  A pure function of the string, so cacheable."""
    if not valid_conversation(conv):
        return None
    return _t(conv), direct_members(conv)


@lru_cache(maxsize=1 << 16)
def _device_key(sender: str, device: str) -> bytes:
    """``T(sender) T(device)``: the dedupe key's prefix."""
    return _t(sender) + _t(device)


@lru_cache(maxsize=1 << 14)
def _record_ids(ck: bytes, dk: bytes) -> bytes:
    """``T(conv) T(sender) T(device)`` of a message record, from T(conv)
    and :func:`_device_key`."""
    return ck + dk


def _dedupe_msg_ids(key: bytes, value: bytes) -> list[bytes]:
    """The msg ids of the entries of a ``dedupe`` record: one, or a run's
    (key ``T(sender) T(device) U64(last) U64(first)``, see the key layout).
    StoreError (store corrupt) for a run no batch can have written."""
    end = 1 + key[0]
    end += 1 + key[end]
    if len(key) == end + 8:
        return [value[:16]]
    size = _dedupe_run(key, end, value)[2]  # (StoreError for a run that cannot be valid)
    return [value[at : at + 16] for at in range(0, len(value), size)]


def _take_t(buf: bytes, off: int) -> tuple[str, int]:
    """Decode the text part at ``off``; return it and the offset after it."""
    end = off + 1 + buf[off]
    return buf[off + 1 : end].decode("ascii"), end


#: Kind-byte bit of a record that carries mentions (see Message record);
#: kinds themselves stay below 0x40 and _AMENDED is 0x80.
_HAS_MENTIONS = 0x40


def _mention_block(mentions: tuple[str, ...], mention_all: bool) -> bytes:
    return bytes((int(mention_all),)) + len(mentions).to_bytes(2, "big") + b"".join(_t(u) for u in mentions)
# The results built once per op of a batch (pimcore/_pure/records.py).
_appended = _impl.record_maker(Appended)
_store_plain_run = _impl.store_plain_run
#: The ``dedupe`` entry of a key, a record of its own or in a run (see the
#: key layout): ``_dedupe_get(txn, db, T(sender) T(device) U64(local_id))``.
_dedupe_get = _impl.dedupe_get
#: ``(first, last, entry length)`` of a ``dedupe`` run record, StoreError
#: (store corrupt) for one no batch can have written -- what ``_dedupe_get``
#: refuses, with the same message, for every reader of runs.
_dedupe_run = _pure_dedupe_run
_acked = _impl.record_maker(Acked)


def _encode_record(seq: int, op: NewMessage, after_seq: int, kind: int = 0) -> bytes:
    if op.mentions or op.mention_all:
        return b"".join(
            (
                _RECORD.pack(seq, op.local_id, op.client_time, op.server_time, after_seq, kind | _HAS_MENTIONS),
                _t(op.conv),
                _t(op.sender),
                _t(op.device),
                _mention_block(op.mentions, op.mention_all),
                op.payload,
            )
        )
    return b"".join(
        (
            _RECORD.pack(seq, op.local_id, op.client_time, op.server_time, after_seq, kind),
            _t(op.conv),
            _t(op.sender),
            _t(op.device),
            op.payload,
        )
    )


def _encode_entry(m: StoredMessage) -> bytes:
    """The record of a membership entry (the store made it, not a client),
    or of any StoredMessage: one with a target, an edit or a recall gets
    the amend trailer, one with mentions the mention block."""
    amend = bool(m.target or m.edited or m.recalled)
    flagged = bool(m.mentions or m.mention_all)
    return b"".join(
        (
            _RECORD.pack(
                m.seq, m.local_id, m.client_time, m.server_time, m.after_seq,
                m.kind | (_AMENDED if amend else 0) | (_HAS_MENTIONS if flagged else 0),
            ),
            _t(m.conv),
            _t(m.sender),
            _t(m.device),
            _AMEND.pack(m.target, m.edited, m.recalled) if amend else b"",
            _mention_block(m.mentions, m.mention_all) if flagged else b"",
            m.payload,
        )
    )


def _decode_record(msg_id: bytes, buf: bytes) -> StoredMessage:
    seq, local_id, client_time, server_time, after_seq, kind = _RECORD.unpack_from(buf)
    conv, off = _take_t(buf, _RECORD.size)
    sender, off = _take_t(buf, off)
    device, off = _take_t(buf, off)
    if kind & (_AMENDED | _HAS_MENTIONS):
        target = edited = recalled = 0
        if kind & _AMENDED:
            target, edited, recalled = _AMEND.unpack_from(buf, off)
            off += _AMEND.size
        mention_all = False
        users: list[str] = []
        if kind & _HAS_MENTIONS:
            mention_all = buf[off] == 1
            count = int.from_bytes(buf[off + 1 : off + 3], "big")
            off += 3
            for _ in range(count):
                u, off = _take_t(buf, off)
                users.append(u)
        return StoredMessage(
            msg_id=msg_id, conv=conv, seq=seq, sender=sender, device=device, local_id=local_id,
            client_time=client_time, server_time=server_time, payload=buf[off:],
            kind=kind & ~(_AMENDED | _HAS_MENTIONS), after_seq=after_seq,
            target=target, edited=edited, recalled=bool(recalled),
            mentions=tuple(users), mention_all=mention_all,
        )
    return StoredMessage(
        msg_id=msg_id,
        conv=conv,
        seq=seq,
        sender=sender,
        device=device,
        local_id=local_id,
        client_time=client_time,
        server_time=server_time,
        payload=buf[off:],
        kind=kind,
        after_seq=after_seq,
    )


def _unpack_closed(raw: Optional[bytes]) -> dict[bytes, int]:
    """meta ``b"closed"``: epoch (16 bytes) -> the highest server time stored
    when the next open began (U64), per trusted epoch (module docstring)."""
    raw = bytes(raw or b"")
    return {raw[i : i + 16]: _U64.unpack_from(raw, i + 16)[0] for i in range(0, len(raw) - 23, 24)}


def _boot_id() -> Optional[bytes]:
    """This boot of the machine (Linux), or None where it cannot be known --
    then any unclean ``os`` run counts as a possible loss."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _abort(txn: _Txn) -> None:
    try:
        txn.abort()
    except lmdb.Error:  # already finished (e.g. by a failed commit)
        pass


_log = logging.getLogger("pimcore.store")

#: Under this many free bytes on the data directory's file system, an I/O
#: error of a write (LMDB reports a short ``pwrite`` as EIO) is taken as the
#: disk being full.
_LOW_SPACE = 1 << 20


def _free_bytes(path: str) -> int:
    """The bytes this process may still write on ``path``'s file system
    (root may write into the blocks reserved for it: f_bfree).  Raises
    OSError.  (A module function: tests give the figure.)"""
    st = os.statvfs(path)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _no_space(path: str, exc: BaseException) -> Optional[str]:
    """"no space left on the data directory's file system (``path``)" if
    ``exc`` (an OSError or lmdb.Error of a write under ``path``) comes from
    a full disk or quota: ENOSPC/EDQUOT, or EIO with (almost) nothing free
    there -- else None."""
    if isinstance(exc, OSError):
        code: Optional[int] = exc.errno
    elif isinstance(exc, lmdb.DiskError) or os.strerror(errno.ENOSPC) in str(exc):
        code = errno.ENOSPC
    elif os.strerror(errno.EDQUOT) in str(exc):
        code = errno.EDQUOT
    elif os.strerror(errno.EIO) in str(exc):
        code = errno.EIO
    else:
        return None
    if code == errno.EIO:
        try:
            free = _free_bytes(path)
        except OSError:
            return None
        if free >= _LOW_SPACE:
            return None
    elif code not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return f"{_NO_SPACE} ({path})"


#: A full disk in words, without its path (StoreError.cause: the HTTP API's
#: 503 says it; the path is in the message, which the operator's log has).
_NO_SPACE = "no space left on the data directory's file system"
_FREE_SPACE = "free space there (or move the data directory to a larger disk)"
#: A map at its ceiling in words (StoreError.cause, as _NO_SPACE).
_MAP_FULL = ("the store's map is full (its ceiling, max_map_size): open the store with a larger max_map_size,"
             " or purge old messages (retention) to make room")

#: The classes a command log record may hold (the write ops, base.Op), the
#: getter of each one's fields in order, and a fingerprint of both: a record
#: starts with it, so a log written by code with other op fields is refused
#: at replay instead of misread (a clean stop leaves nothing to replay).
_LOG_KINDS: tuple[type, ...] = typing.get_args(Op)
_LOG_INDEX = {cls: i for i, cls in enumerate(_LOG_KINDS)}
_LOG_NAMES = [tuple(f.name for f in dataclasses.fields(cls)) for cls in _LOG_KINDS]
_LOG_GETTERS = [
    operator.attrgetter(*names) if len(names) > 1 else (lambda op, n=names[0]: (getattr(op, n),))  # type: ignore[misc]
    for names in _LOG_NAMES
]


def _log_schema(n: int) -> bytes:
    """The fingerprint of the first ``n`` op classes and their fields."""
    return struct.pack("<I", zlib.crc32(repr([(cls.__name__, f) for cls, f in zip(_LOG_KINDS[:n], _LOG_NAMES[:n])]).encode()))


_LOG_SCHEMA = _log_schema(len(_LOG_KINDS))
#: The fingerprints a record is replayed under: this code's, and those of
#: every shorter prefix of its op list.  New ops are only ever appended to
#: base.Op, so a record of the release before one (an unclean stop's log,
#: its batches acked and not yet in LMDB) names the same classes, fields
#: and indices: refused, it held the store closed until that release ran
#: again (DeleteConsumer's addition).  A changed field of any op changes
#: every fingerprint from it on: refused still.
#: Each maps to its prefix's length: a record's kind indices stay below it.
_LOG_SCHEMAS_READ = {_log_schema(n): n for n in range(1, len(_LOG_KINDS) + 1)}


#: Enums an op field may hold (AmendMessage.kind): pickled by name.
_LOG_ENUMS = (MessageKind,)


def _pickle_ops(ops: tuple[Op, ...]) -> bytes:
    """A batch's ops as a command log record: the schema fingerprint, then a
    pickle (protocol 5) of ``[(kind index, [field values, ...]), ...]``, one
    entry per run of ops of one kind -- plain ints, strings, bytes and
    tuples, so pickle's C encoder does it all (about 0.8 µs per NewMessage;
    pickling the dataclasses themselves took 6 µs).  Raises StoreError for
    an op that is not a store op or a field the log cannot hold.  The
    fallback of :data:`_encode_ops`."""
    index, getters = _LOG_INDEX, _LOG_GETTERS
    try:
        runs = [(i, list(map(getters[i], run))) for kind, run in itertools.groupby(ops, type) for i in (index[kind],)]
    except KeyError as exc:
        raise StoreError(f"not a store op: {exc.args[0].__name__}") from None
    buf = io.BytesIO()
    buf.write(_LOG_SCHEMA)
    try:
        _PlainPickler(buf, protocol=5).dump(runs)
    except pickle.PicklingError as exc:
        raise StoreError(str(exc)) from None
    return buf.getvalue()


#: :func:`_pickle_ops`, or the compiled backend's encoder of the same
#: records (pimcore/_pure/log.py): the opcodes written straight from the
#: ops' slots, about 4x faster; any batch it does not take is _pickle_ops's.
_encode_ops: Callable[[tuple[Op, ...]], bytes] = _impl.log_encoder(_LOG_KINDS, _LOG_SCHEMA, _pickle_ops)


class _PlainPickler(pickle.Pickler):
    """Pickles plain values only (what :class:`_PlainUnpickler` reads back):
    a field holding any other object fails here, before the batch runs."""

    def reducer_override(self, obj: Any) -> Any:
        # Called for every object but None, bools and exact ints, floats,
        # bytes, strs, tuples, lists, dicts, sets and frozensets.
        if type(obj) is bytearray or type(obj) in _LOG_ENUMS or any(obj is enum for enum in _LOG_ENUMS):
            return NotImplemented  # (an enum member is pickled as its class, by name, and its value)
        raise pickle.PicklingError(f"an op field holds a {type(obj).__name__}, which the command log cannot hold")


class _PlainUnpickler(pickle.Unpickler):
    """Reads back only plain values and the enums of :data:`_LOG_ENUMS`: a
    record names no other class or function."""

    def find_class(self, module: str, name: str) -> Any:
        for enum in _LOG_ENUMS:
            if enum.__module__ == module and enum.__qualname__ == name:
                return enum
        raise pickle.UnpicklingError(f"a command log record names {module}.{name}; records hold plain values only")


def _decode_ops(payload: bytes) -> tuple[Op, ...]:
    """The ops of a record written by :func:`_encode_ops`.  Raises ValueError
    (another schema, or not such a record) or pickle.UnpicklingError."""
    kinds = _LOG_SCHEMAS_READ.get(payload[:4])
    if kinds is None:
        raise ValueError("the record was written by a pimcore with other store ops (start that version once to apply it)")
    runs = _PlainUnpickler(io.BytesIO(payload[4:])).load()
    if not isinstance(runs, list):
        raise ValueError("a command log record is not a list of runs of ops")
    ops: list[Op] = []
    for run in runs:
        if not (isinstance(run, tuple) and len(run) == 2 and type(run[0]) is int and 0 <= run[0] < kinds
                and isinstance(run[1], list) and all(isinstance(fields, tuple) for fields in run[1])):
            raise ValueError("a command log record holds something that is not a run of ops")
        kind = _LOG_KINDS[run[0]]
        ops.extend(kind(*fields) for fields in run[1])
    return tuple(ops)


class _Flusher:
    """Flushes a batch's command log record while the writer applies the
    batch (:meth:`LmdbStore._write`).

    ``submit`` writes the record into the log in the caller's thread
    (:meth:`wal.CommandLog.write`: ``pwrite``, no flush) and hands its
    ``fdatasync`` to a :class:`DataSyncer` worker
    (``pimcore._fastpath``'s runs without the GIL, so the flush goes on
    while the writer's apply holds it).  The record's ``flushed`` (a
    :class:`_Flushing`, set by the caller before the hand-over) waits for
    that flush and moves the log past the record
    (:meth:`wal.CommandLog.flushed`), or puts the exception on the record
    (``outcome``).  One flush at a time: the writer waits for it under the
    write lock before anything else is appended.  Raises RuntimeError if
    the worker thread cannot be started.
    """

    def __init__(self, log: wal.CommandLog) -> None:
        self._log = log
        self._syncer = _impl.DataSyncer()
        # (A daemon: a process that exits without closing its store must not
        # hang on it.  It is idle whenever no commit is running.)
        self._thread = self._syncer.thread
        # A store dropped without close() needs nothing here: the worker
        # holds the syncer's state, not the syncer, and a syncer dropped
        # (with this) tells its worker to end after the flush in flight
        # (pimcore/_pure/sync.py).  Not a weakref.finalize calling stop():
        # that joined the worker in a finalizer, and a Ctrl-C between the
        # syncer's making and the finalizer's leaked the worker.

    def submit(self, record: "_LogRecord") -> None:
        flushing = record.flushed
        assert isinstance(flushing, _Flushing)
        try:
            written = self._log.write(record.data)
        except (OSError, ValueError) as exc:  # (appended() raises it)
            record.outcome = exc
            flushing.done = True
            return
        flushing.written = written
        self._syncer.start(written.fd)
        flushing.syncer = self._syncer

    def stop(self) -> None:
        """After the flush in flight: end the worker thread."""
        self._syncer.stop()


class _Flushing:
    """A :class:`_LogRecord`'s ``flushed`` while :class:`_Flusher` has it:
    ``is_set()`` once its flush ended; ``wait()`` waits for that (again after
    an interrupt: nothing is lost), then records the outcome on the record
    and, flushed, moves the log past it."""

    __slots__ = ("record", "log", "written", "syncer", "done")

    def __init__(self, record: "_LogRecord", log: wal.CommandLog) -> None:
        self.record = record
        self.log = log
        self.written: Optional[wal.Written] = None
        self.syncer: Any = None  # (set once the flush was started)
        self.done = False

    def is_set(self) -> bool:
        return self.done

    def wait(self) -> None:
        if self.done:
            return
        if self.syncer is not None:
            try:
                self.syncer.wait()
            except OSError as exc:
                self.record.outcome = exc
            else:
                assert self.written is not None
                self.log.flushed(self.written)
        self.done = True


class _LogState:
    """A ``log``-durability store's command log and checkpoints (module
    docstring of :mod:`pimcore.store.wal`).

    Checkpoints run in a thread: one at a time, started after a commit once
    ``checkpoint_bytes`` of log or ``checkpoint_seconds`` have passed since
    the last.  ``pin`` is the read transaction at the newest durable
    checkpoint: while it is open LMDB reuses no page that checkpoint's tree
    (or any later tree) uses.
    """

    #: Log bytes between checkpoints (bounds replay at start-up).
    checkpoint_bytes = 4 << 20
    #: Seconds between checkpoints while anything is written.  Short: until
    #: a checkpoint moves the pin, no page freed since the last one is reused,
    #: so the data file grows by every page written meanwhile (about 64 KiB
    #: per 1-message commit).
    checkpoint_seconds = 0.25
    #: A batch of at least this many ops has its record flushed by a worker
    #: thread while LMDB applies the batch (:meth:`LmdbStore._write`): the
    #: flush's wait then overlaps the apply's CPU work, and LMDB still
    #: commits only after the flush returned.
    #:
    #: With the compiled fast path the worker runs without the GIL
    #: (``DataSyncer.gil_free``): every batch but a one-op one
    #: (BENCHMARKS.md, "The log flush off the GIL": 1 x 64 +8 % acked
    #: sends/s, 50 x 16 +3 % and -7 % CPU per send; at 1 x 1 the same p50
    #: and 5 % more CPU -- the worker shares the broker's core, and its
    #: fdatasync's own CPU does not overlap).
    #:
    #: A Python worker needs the GIL to wake and to return, which the apply
    #: holds: smaller batches then flush inline, where the two hand-offs
    #: between threads (about 35 µs of CPU) would cost more than the overlap
    #: saves.  Measured on 2 vCPUs with the broker on one (BENCHMARKS.md,
    #: "Overlapping the log flush with the apply"): 400-op batches +8 %
    #: acked sends/s; 62-op batches no gain.
    overlap_ops = 2 if _impl.DataSyncer.gil_free else 128

    def __init__(self, store: "LmdbStore", log: wal.CommandLog) -> None:
        self.store = store
        self.log = log
        self.replaying = False
        #: Why the store may not write any more (a failed log flush), or None.
        self.failed: Optional[str] = None
        #: Why the store may not write until a restart because a commit or a
        #: map resize was cut short (settle(), LmdbStore._resize), or None.
        #: Apart from ``failed``, which the checkpoint thread sets too: each
        #: is cleared only by who set it.
        self.unsettled: Optional[str] = None
        #: ``unsettled`` is the map resize's: its checkpoint could not be
        #: written (EMFILE, ENOSPC).  Unlike a commit cut short, nothing is
        #: left half done -- no commit may run until a checkpoint of the
        #: current state is written -- so the next write tries that again
        #: (:meth:`settle_resize`), at most every ``resize_retry_seconds``.
        self.resize_unsettled = False
        self._resize_retry_at = 0.0
        #: The start's replay and first checkpoint completed (close() may
        #: checkpoint only then: see LmdbStore._start_log).
        self.started = False
        self.pin: Optional[_Txn] = None
        #: The log position before the first record appended but not yet
        #: committed by LMDB (its commit hit a full map, or its batch waits
        #: in a deferred commit), else None: a checkpoint replays from there.
        self.uncommitted: Optional[tuple[int, int, int]] = None
        self._thread: Optional[threading.Thread] = None
        self._flusher: Optional[_Flusher] = None
        self._last_at = (0, time.monotonic())  # (log bytes appended, monotonic s) at the last checkpoint
        self._data = os.path.join(store._path, "data.mdb")
        #: Checkpoints written, for statistics and tests.
        self.checkpoints = 0
        #: Checkpoints failed since the last that succeeded, and when the
        #: last warning about them was logged (monotonic s; None: none yet).
        self.checkpoint_failures = 0
        self._warned_at: Optional[float] = None
        #: The data file and the log directory, open for the store's
        #: lifetime: a checkpoint needs no new descriptor for them, so one
        #: taken while connections use up the process's descriptors
        #: (EMFILE) fails only at its own file, and is retried.
        self._data_fd = -1
        self._dir_fd = -1
        try:
            self._data_fd = os.open(self._data, os.O_RDONLY)
            self._dir_fd = os.open(log.dir, os.O_RDONLY)
        except BaseException:
            self.close_files()
            raise

    #: At most one warning about failing checkpoints per this many seconds
    #: (each names how many failed since the last).
    warn_seconds = 30.0
    #: How often a write retries the checkpoint a map resize could not write
    #: (seconds; settle_resize).
    resize_retry_seconds = 1.0

    def close_files(self) -> None:
        """Close the data file and directory descriptors (again: harmless).
        Forgotten, then closed (as :meth:`wal.CommandLog.close`)."""
        for name in ("_data_fd", "_dir_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def _mark(self, record: "_LogRecord", deferred: Optional["_Open"]) -> None:
        # Until LMDB commits it, a checkpoint (the map may grow at the
        # commit) must replay this record.  In a deferred transaction
        # (``deferred``) its first record says where from (_prepare): set
        # before the append, so that an interrupt right after the append
        # finds it known, and dropped with that transaction in one step.
        record.at = self.log.position()
        if deferred is not None:
            if deferred.at is None:
                deferred.at = record.at
        else:
            self.uncommitted = record.at

    def append(self, record: "_LogRecord", deferred: Optional["_Open"] = None) -> None:
        """Under the write lock, before LMDB commits the record's batch:
        write and flush the record.  Raises StoreError (and the store writes
        no more) if that failed.  ``deferred``: the open deferred transaction
        the batch is in (:meth:`LmdbStore.defer_commits`)."""
        self._mark(record, deferred)
        # From here on the record may be in the log: whatever stops the
        # batch now settles it (settle()).
        record.written = True
        try:
            self.log.append(record.data)
        except OSError as exc:
            raise self._append_failed(exc) from exc

    def append_soon(self, record: "_LogRecord", deferred: Optional["_Open"] = None) -> bool:
        """Like :meth:`append`, in the worker thread, while the caller
        (holding the write lock until :meth:`appended` returns) applies the
        batch.  False if there is no worker thread (it could not be
        started): nothing was handed over, flush inline instead."""
        flusher = self._flusher
        if flusher is None:
            try:
                flusher = self._flusher = _Flusher(self.log)
            except RuntimeError as exc:  # "can't start new thread"
                _log.warning("command log: no flush thread (%s); big batches are flushed inline", exc,
                             extra={"event": "log_flush_thread_failed"})
                self.overlap_ops = 1 << 62  # (this store's own value from now on)
                return False
        self._mark(record, deferred)
        # Set before the hand-over and cleared only by appended(): while it
        # is set, whether (and when) the record reaches the log is unknown.
        record.flushed = _Flushing(record, self.log)
        record.written = True
        flusher.submit(record)
        return True

    def appended(self, record: "_LogRecord") -> None:
        """Wait for :meth:`append_soon`'s flush of ``record``, however long
        it takes: whatever interrupts the wait (Ctrl-C), the flush goes on,
        and what the log holds decides what happens to the batch, so the
        interrupt is raised only once the flush ended.  Raises StoreError
        (and the store writes no more) if the flush failed, ValueError for
        a record over ``wal.MAX_RECORD`` (nothing written)."""
        flushed = record.flushed
        assert flushed is not None
        interrupted: Optional[BaseException] = None
        while not flushed.is_set():
            try:
                flushed.wait()
            except BaseException as exc:  # noqa: BLE001 - raised below, after the flush
                interrupted = exc
        record.flushed = None  # (collected)
        outcome = record.outcome
        if isinstance(outcome, OSError):
            raise self._append_failed(outcome) from outcome
        if outcome is not None:
            record.written = False  # (refused before anything was written)
            raise outcome
        if interrupted is not None:
            raise interrupted

    def settle(self, record: "_LogRecord", committed: Callable[[], bool]) -> None:
        """Under the write lock, when :meth:`LmdbStore._write` ends without
        having committed and ``record`` may be in the log (the apply failed
        after an overlapped flush, LMDB's commit failed, an interrupt came):
        make the log hold exactly LMDB's commits again.  ``committed()``
        asks LMDB whether the batch's transaction committed after all (an
        interrupt right after its commit): then the record stays.  Else it
        is taken back out (:meth:`wal.CommandLog.rewind`), so that later
        batches are logged in LMDB's order and a restart does not apply it.

        Until that is done the store writes no more: an interrupt anywhere
        in here, a record whose hand-over to the flush thread was cut short
        (whether it reaches the log is unknown), or a disk that refuses the
        rewind leave it stopped, and a restart recovers from what the log
        holds (the record applied, if it is there: the client's retry is
        then a Duplicate)."""
        resize = self.resize_unsettled
        if self.failed is not None or (self.unsettled is not None and not resize):
            return  # stopped already (a failed flush, a commit cut short): the restart decides
        # A map resize whose checkpoint failed (the batch's own: its map
        # was full) stops the store only until that checkpoint is written
        # (settle_resize): the record is taken back out all the same, or
        # the checkpoint would replay a batch the store refused and the
        # live store never held.  Meanwhile no flag says "resize": an
        # interrupt in here leaves the store stopped until a restart.
        self.resize_unsettled = False
        unsettled = self.unsettled
        self.unsettled = "a commit was cut short while the command log and LMDB disagreed; restart the broker to recover"
        if record.flushed is not None:
            return
        if committed():
            self.uncommitted = None
            self.unsettled, self.resize_unsettled = unsettled, resize
            return
        assert record.at is not None
        try:
            self.log.rewind(record.at)
        except OSError as exc:
            self.unsettled = (f"a logged batch failed to commit in LMDB and could not be taken back out of the"
                              f" command log ({exc}); restart the broker to recover it")
            return
        record.written = False
        # (Deferred batches before it stay in the log: they were acked.)
        op = self.store._open
        if op is not None and op.at == record.at:
            op.at = None
        self.uncommitted = None
        self.unsettled, self.resize_unsettled = unsettled, resize

    def stopped(self) -> StoreError:
        """The StoreError of a store stopped by ``failed`` or ``unsettled``,
        with its cause in words when that is a full disk (the HTTP API's
        503 says it)."""
        why = self.failed or self.unsettled
        assert why is not None
        cause = None
        if _NO_SPACE in why:
            cause = f"{_NO_SPACE}: {_FREE_SPACE}" + ("" if self.failed is None and self.resize_unsettled
                                                     else ", then restart the broker")
        return StoreError(why, cause=cause)

    def _append_failed(self, exc: OSError) -> StoreError:
        # After a failed flush the page cache's state is unknown (fsync
        # can't be retried): stop.
        full = _no_space(self.store._path, exc)
        cause = None
        if full is not None:
            self.failed = (f"the command log could not be written: {full} ({exc}); free space there (or move"
                           " the data directory to a larger disk), then restart the broker")
            cause = f"{_NO_SPACE}: {_FREE_SPACE}, then restart the broker"
        else:
            self.failed = f"the command log could not be written ({exc}); restart the broker"
        return StoreError(self.failed, cause=cause)

    def stop_flusher(self) -> None:
        """End the worker thread (idle: every flush was waited for under
        the write lock)."""
        flusher = self._flusher
        if flusher is not None:
            flusher.stop()  # (again after a stop cut short: harmless)
            self._flusher = None

    def _prepare(self) -> Optional[tuple[_Txn, wal.Checkpoint]]:
        """Under the write lock, with no write transaction open: a pin at the
        newest commit and the checkpoint that describes it."""
        env = self.store._env
        assert env is not None
        psize = env.stat()["psize"]
        pin = env.begin()
        try:
            meta = wal.read_meta_pages_at(self._data_fd, psize)
        except BaseException:
            _abort(pin)  # (never left open: it would pin pages for as long as it lived)
            raise
        op = self.store._open  # (acked batches LMDB lacks: replayed from the first)
        start = op.at if op is not None and op.at is not None else self.uncommitted
        ckpt = wal.Checkpoint(psize, *(start or self.log.position()), meta)
        if ckpt.txnid != pin.id():  # cannot happen with one writer process; never guess
            pin.abort()
            return None
        self._last_at = (self.log.appended, time.monotonic())
        return pin, ckpt

    def _finish(self, pin: _Txn, ckpt: wal.Checkpoint) -> None:
        env = self.store._env
        try:
            assert env is not None
            try:
                env.sync(True)
            except Exception as exc:
                # After a failed fsync the kernel may have marked the dirty
                # pages clean: a later flush would succeed without them and a
                # checkpoint after it claim them durable.  Stop writing; a
                # restart replays the log from the last good checkpoint.
                full = _no_space(self.store._path, exc)
                self.failed = (f"LMDB's data file could not be flushed ({exc}); restart the broker" if full is None
                               else f"LMDB's data file could not be flushed: {full} ({exc}): {_FREE_SPACE}, then"
                                    " restart the broker")
                raise
            wal.write_checkpoint(self.log.dir, ckpt, dir_fd=self._dir_fd)
        except BaseException:
            _abort(pin)  # the previous checkpoint and its pin stay in force
            raise
        old, self.pin = self.pin, pin
        if old is not None:
            _abort(old)
        self.log.covered(ckpt)
        self.checkpoints += 1

    def _run(self, pin: _Txn, ckpt: wal.Checkpoint) -> None:
        try:
            self._finish(pin, ckpt)
        except Exception as exc:  # noqa: BLE001 - retried at the next one; the log keeps everything
            self._checkpoint_failed(exc)
            return
        self._checkpoint_done()

    def _checkpoint_failed(self, exc: BaseException) -> None:
        """A checkpoint failed (its thread, or its start in after_commit):
        the previous one and its pin stay in force, the log keeps every
        batch since, and the next is tried ``checkpoint_seconds`` later.
        (Until one succeeds the log and the data file keep growing.)
        Warned at most once per ``warn_seconds``, unless the store stops."""
        self.checkpoint_failures += 1
        now = time.monotonic()
        if self.failed is None and self._warned_at is not None and now - self._warned_at < self.warn_seconds:
            return
        self._warned_at = now
        # (An I/O error on a full disk named as such; ENOSPC says it already.)
        full = None if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) else _no_space(self.store._path, exc)
        _log.warning("command log checkpoint failed: %s%s%s", exc if full is None else f"{full} ({exc})",
                     "; the store stops writing" if self.failed else "; retried after the next commits",
                     f" ({self.checkpoint_failures} failed in a row)" if self.checkpoint_failures > 1 else "",
                     extra={"event": "checkpoint_failed", "failures": self.checkpoint_failures})

    def _checkpoint_done(self) -> None:
        if self.checkpoint_failures:
            _log.info("command log checkpoint succeeded again after %d failed", self.checkpoint_failures,
                      extra={"event": "checkpoint_recovered", "failures": self.checkpoint_failures})
            self.checkpoint_failures = 0
            self._warned_at = None

    def after_commit(self) -> None:
        """Under the write lock, right after a commit: start a checkpoint if
        one is due and none is running."""
        if self._thread is not None:
            if self._thread.is_alive():
                return
            self._thread = None
        done, at = self._last_at
        if self.log.appended - done < self.checkpoint_bytes and time.monotonic() - at < self.checkpoint_seconds:
            return
        try:
            prepared = self._prepare()
        except (OSError, lmdb.Error) as exc:
            # (No pin left open.)  The batch committed: this is the
            # checkpoint's failure, not the commit's -- tried again later.
            self._last_at = (self.log.appended, time.monotonic())
            self._checkpoint_failed(exc)
            return
        if prepared is not None:
            self._thread = threading.Thread(target=self._run, args=prepared, name="pimcore-checkpoint", daemon=True)
            self._thread.start()

    def join(self) -> None:
        """Wait for a running checkpoint.  The thread stays this state's
        until it has ended: a wait cut short (Ctrl-C) must not leave it
        running unknown to after_commit, which would start a second
        checkpoint beside it."""
        thread = self._thread
        if thread is not None:
            thread.join()
            if self._thread is thread:  # (not one started meanwhile)
                self._thread = None

    def checkpoint_now(self) -> None:
        """A checkpoint of everything committed so far, before returning
        (open and close)."""
        self.join()
        with self.store._wlock:
            self.store._settle_open()  # (deferred batches first: a checkpoint is of LMDB's commits)
            prepared = self._prepare()
        if prepared is None:
            raise StoreError("cannot checkpoint the command log: LMDB's meta pages do not match the commit")
        self._finish(*prepared)

    def after_resize(self) -> None:
        """Under the write lock, after ``set_mapsize`` aborted the pin: a
        checkpoint of the current state, before any commit can reuse a page
        the last checkpoint needs (:meth:`LmdbStore._resize`)."""
        self.pin = None  # (aborted by py-lmdb already)
        prepared = self._prepare()
        if prepared is None:
            raise StoreError("cannot checkpoint the command log after growing the map")
        self._finish(*prepared)

    def settle_resize(self) -> None:
        """Under the write lock, with no write transaction open: the
        checkpoint a map resize could not write (``resize_unsettled``),
        tried again if ``resize_retry_seconds`` have passed since the last
        try.  Written, the store writes again; else the failure is counted
        and warned (:meth:`_checkpoint_failed`) and the store stays stopped.
        Why it is safe: no commit ran since the resize (``unsettled`` keeps
        them out), so a checkpoint of the current state, pinned, is the one
        the resize would have written; acked deferred batches LMDB lacks are
        replayed from the open batches' first record (:meth:`_prepare`)."""
        now = time.monotonic()
        if not self.resize_unsettled or self.failed is not None or now < self._resize_retry_at:
            return
        self._resize_retry_at = now + self.resize_retry_seconds
        # (set_mapsize aborted the pin, or -- a resize cut short before it
        # -- not: aborting twice is harmless, leaving one open is not.)
        self.drop_pin()
        try:
            prepared = self._prepare()
            if prepared is None:
                raise StoreError("cannot checkpoint the command log after growing the map")
            self._finish(*prepared)
        except (OSError, lmdb.Error) as exc:
            self._checkpoint_failed(exc)
            return
        self._checkpoint_done()
        self.resize_unsettled = False
        self.unsettled = None
        _log.info("the map resize's command log checkpoint is written: the store writes again",
                  extra={"event": "resize_settled"})

    def drop_pin(self) -> None:
        pin, self.pin = self.pin, None
        if pin is not None:
            _abort(pin)


class _Gate:
    """Shared for read transactions, exclusive for ``set_mapsize`` and close.

    A waiting exclusive holder blocks new readers, so a steady stream of reads
    cannot starve a resize.  Never enter the gate twice from one thread (a
    public read method calls only txn-taking helpers), or a pending exclusive
    holder would deadlock against it.
    """

    __slots__ = ("_cond", "_active", "_exclusive")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._exclusive = False

    def enter(self) -> None:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            try:
                while self._active:
                    self._cond.wait()
            except BaseException:
                # Cut short (Ctrl-C) while readers finish: let readers in
                # again, or every later one -- and the retried close() --
                # would wait for ever.  (wait() took the lock back.)
                self._exclusive = False
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _Conv:
    """A conversation's members as a commit needs them: ``users`` sorted (the
    order of ``Appended.positions``), ``uks`` their ``T(user)`` keys in the
    same order, ``member_set`` for the membership checks.  ``flagged``: every
    member's ``userconvs`` entry is known to carry the has-messages flag.
    ``heads_gen``: the :attr:`_Hot.heads_gen` in which the inbox heads of all
    members were loaded into the cache (-1: not loaded).  ``purged``: a
    group's purge point (the last seq of its latest purge; 0 for a 1:1
    chat, whose sends are not checked against it): a send whose after_seq
    is at or below it is refused (base.NewMessage, PURGED)."""

    __slots__ = ("users", "uks", "member_set", "flagged", "heads_gen", "purged")

    def __init__(self, users: tuple[str, ...], uks: tuple[bytes, ...], purged: int = 0) -> None:
        self.users = users
        self.uks = uks
        self.member_set = frozenset(users)
        self.flagged = False
        self.heads_gen = -1
        self.purged = purged


class _Hot:
    """What commits read from the store and keep: last seqs, inbox heads and
    floors, conversation members and their has-messages flags.

    It is carried from one commit to the next only while it provably equals
    the store (see :meth:`LmdbStore._take_hot`).  LMDB numbers the write
    transactions that change something 1, 2, 3, ... in the environment itself,
    across processes (``mdb_txn_id``: a write transaction is the last
    committed one + 1; one that changed nothing or was aborted does not use
    its number up).  A commit that certainly wrote (so committed as
    transaction N) keeps the cache stamped N; the next commit uses it only if
    its own transaction is N + 1, i.e. nobody -- another process (``pimcore
    group add`` next to a broker), a group-admin call of this one -- committed
    in between.  Anything else drops it: a failed or re-run commit, and a
    commit that may have written nothing (its number would then be taken by
    the next writer, whoever that is).  Each part is cleared when it outgrows its bound, so memory stays
    bounded whatever the number of users and conversations.
    """

    __slots__ = ("txnid", "seqs", "heads", "floors", "heads_gen", "convs", "members", "devices", "dmax")

    def __init__(self) -> None:
        self.txnid = -1
        self.seqs: dict[bytes, int] = {}  # T(conv) -> last seq
        self.heads: dict[bytes, int] = {}  # T(user) -> inbox head
        self.floors: dict[bytes, int] = {}  # T(user) -> inbox floor (same keys)
        self.heads_gen = 0  # bumped whenever heads/floors are cleared
        self.convs: dict[bytes, _Conv] = {}  # T(conv) -> members
        self.members = 0  # sum of len(users) over convs
        #: T(user) T(device) -> (position, last_seen) of the ``devices``
        #: record, as the batch left it (written at flush, see _Batch).
        #: Only Reclaim and PurgeUser delete devices: both sync() first,
        #: which clears this.
        self.devices: dict[bytes, tuple[int, int]] = {}
        #: T(sender) T(device) -> a local_id at or above that of every
        #: ``dedupe`` record of the device (stored or staged): a send with a
        #: higher local_id is no retry, and needs no probe.  Kept by
        #: store_plain_run; a write of a dedupe record by any other path
        #: drops the device's entry (_Batch.dedupe_written).  Deletions
        #: leave it a bound.
        self.dmax: dict[bytes, int] = {}

    def clear_heads(self) -> None:
        self.heads.clear()
        self.floors.clear()
        self.heads_gen += 1

    def trim(self) -> None:
        if len(self.heads) > _HOT_USERS:
            self.clear_heads()
        if len(self.seqs) > _HOT_CONVS:
            self.seqs.clear()
        if self.members > _HOT_MEMBERS or len(self.convs) > _HOT_CONVS:
            self.convs.clear()
            self.members = 0
        if len(self.devices) > _HOT_USERS:
            self.devices.clear()
        if len(self.dmax) > _HOT_USERS:
            self.dmax.clear()


class _Open:
    """A deferred LMDB write transaction (:meth:`LmdbStore.defer_commits`)
    and the acked batches in it: ``fns``, a function per batch, in order,
    that runs it again into a new transaction if this one has to be
    aborted (:meth:`LmdbStore._rerun`: from the batch's log record);
    ``at``, the log position of the first one's record (a checkpoint replays
    from there).  ``txn`` None: aborted, its batches to be run again.  The
    store swaps whole objects, so that each change of state is one
    assignment."""

    __slots__ = ("txn", "id", "since", "gen", "fns", "ops", "at")

    def __init__(self, txn: Optional[_Txn], tid: int, since: float, gen: int) -> None:
        self.txn = txn
        #: The id its commit takes (did LMDB commit it?).
        self.id = tid
        self.since = since  # monotonic s
        self.gen = gen
        self.fns: list[Callable[[_Txn], Any]] = []
        self.ops = 0
        self.at: Optional[tuple[int, int, int]] = None

    def without_txn(self) -> "_Open":
        return self.with_txn(None, self.id)

    def with_txn(self, txn: Optional[_Txn], tid: int) -> "_Open":
        op = _Open(txn, tid, self.since, self.gen)
        op.fns, op.ops, op.at = self.fns, self.ops, self.at
        return op


class _LogRecord:
    """A batch's command log record (``log`` durability) and where it is:
    a batch run again (:class:`_RunAgain`, a full map) keeps its one
    record."""

    __slots__ = ("data", "overlap", "ops", "written", "at", "flushed", "outcome", "rerun")

    def __init__(self, data: bytes, overlap: bool, ops: int = 1) -> None:
        self.data = data
        #: How many ops the batch has (:attr:`LmdbStore.defer_ops`).
        self.ops = ops
        #: Flush it in the worker thread while LMDB applies the batch
        #: (:attr:`_LogState.overlap_ops`), if the map has room then
        #: (:meth:`LmdbStore._roomy`).
        self.overlap = overlap
        #: It may be in the log (an append of it began and was not refused).
        self.written = False
        #: The log's position right before it (:meth:`wal.CommandLog.position`).
        self.at: Optional[tuple[int, int, int]] = None
        #: Its flush by the worker thread (:class:`_Flushing`), set before
        #: the hand-over; None once the writer collected ``outcome`` (or if
        #: it was never handed over).
        self.flushed: Optional[_Flushing] = None
        #: What its write or the worker's flush raised, if anything.
        self.outcome: Optional[BaseException] = None
        #: What a deferred transaction keeps to run the batch again
        #: (:attr:`_Open.fns`) instead of the function that ran it: see
        #: :meth:`LmdbStore._rerun`.  None: that function is kept.
        self.rerun: Optional[Callable[[_Txn], Any]] = None


class _RunAgain(Exception):
    """Raised by the function :meth:`LmdbStore._write` runs: abort this
    transaction and run the function again at once, under the same write
    lock and with the same log record."""


class _MsgIdTaken(_RunAgain):
    """A staged msg_id was already stored (or staged twice): see
    :meth:`_Batch.put_staged`.  The batch is run again with every record put
    at once, which rejects just that op."""


class _Batch:
    """One commit's write transaction plus a write-back cache of the hot
    counters: the last seq of each conversation and the head/floor of each
    inbox.  A batch of N messages in one conversation then reads and writes
    each counter once instead of N times.  Inbox entries are queued too
    (``pend``: T(user) -> values of the positions up to the head, see
    :mod:`pimcore._pure.fanout`) and written in key order in one
    ``putmulti`` call.  Every handler of the batch reads the counters through
    this object (so later ops see earlier ones), and :meth:`flush` writes the
    changed ones into the transaction before it commits -- or before anything
    scans those databases (:meth:`sync`).  The counters live in a
    :class:`_Hot` that may outlive the batch.
    """

    __slots__ = ("txn", "_store", "hot", "_dirty_seqs", "pend", "hwm", "ev_last", "ev_dirty",
                 "staging", "s_msgs", "s_convidx", "s_dedupe", "s_devices", "dk_general")

    def __init__(self, store: "LmdbStore", txn: _Txn, hot: _Hot, staging: bool = True) -> None:
        self.txn = txn
        #: Stage the ``msgs``, ``convidx`` and ``dedupe`` records of
        #: NewMessage ops (below) rather than put them one by one.
        self.staging = staging
        #: Staged records: (msg_id, record) and (convidx key, value) in op
        #: order, dedupe key -> value.  Only NewMessage/AckPosition/
        #: TouchDevice run while anything is staged (:meth:`LmdbStore._apply`
        #: writes it out before any other op), and of the staged databases
        #: they read only ``dedupe``, through :meth:`prior`, and ``devices``,
        #: through :attr:`_Hot.devices` (which holds every staged device
        #: record): so every read of the batch sees every earlier write of it.
        self.s_msgs: list[tuple[bytes, bytes]] = []
        self.s_convidx: list[tuple[bytes, bytes]] = []
        self.s_dedupe: dict[bytes, bytes] = {}
        #: ``devices`` records changed by AckPosition/TouchDevice (key ->
        #: value), staged like the above (written with them, in one sorted
        #: ``putmulti``): an ack reads its device from :attr:`_Hot.devices`
        #: (once per device while the cache lives), so that a batch's ~50
        #: acks cost no B-tree search and one put each.
        self.s_devices: dict[bytes, bytes] = {}
        #: The T(sender) T(device) whose dedupe records a path other than
        #: store_plain_run wrote in this batch: _Hot.dmax is not seeded for
        #: them until the next batch (their staged records are not in the
        #: transaction yet, which the seed reads).
        self.dk_general: set[bytes] = set()
        #: Highest server time stored so far (meta ``hwm``, written at the end).
        self.hwm = 0
        self._store = store
        self.hot = hot
        self._dirty_seqs: set[bytes] = set()
        #: T(user) -> inbox values queued in this batch; its keys are exactly
        #: the inboxes whose head moved.
        self.pend: dict[bytes, list[bytes]] = {}
        #: The last host event id (meta ``evlast``), read when first needed,
        #: written at flush if ``ev_dirty``.
        self.ev_last = -1
        self.ev_dirty = False

    def append_event(self, now: int, data: bytes) -> int:
        """Append a host event in this transaction; its id."""
        if self.ev_last < 0:
            raw = self.txn.get(b"evlast", db=self._store._meta)
            self.ev_last = _U64.unpack(raw)[0] if raw is not None else 0
        self.ev_last += 1
        self.ev_dirty = True
        self.txn.put(_U64.pack(self.ev_last), _I64.pack(now) + data, db=self._store._events)
        return self.ev_last

    def last_seq(self, ck: bytes) -> int:
        seqs = self.hot.seqs
        seq = seqs.get(ck)
        if seq is None:
            seq = seqs[ck] = self._store._last_seq(self.txn, ck)
        return seq

    def set_last_seq(self, ck: bytes, seq: int) -> None:
        self.hot.seqs[ck] = seq
        self._dirty_seqs.add(ck)

    def head_floor(self, uk: bytes) -> tuple[int, int]:
        hot = self.hot
        head = hot.heads.get(uk)
        if head is None:
            head, floor = hot.heads[uk], hot.floors[uk] = self._store._head_floor(self.txn, uk)
            return head, floor
        return head, hot.floors[uk]

    def conv(self, ck: bytes, info: tuple[bytes, Optional[tuple[str, str]]]) -> Optional[_Conv]:
        """The members of a well-formed conversation; None for an unknown
        group.  An op that changes membership calls :meth:`forget_conv`."""
        hot = self.hot
        conv = hot.convs.get(ck)
        if conv is None:
            conv = self._store._load_conv(self.txn, info)
            if conv is None:
                return None
            hot.convs[ck] = conv
            hot.members += len(conv.users)
        return conv

    def forget_conv(self, ck: bytes) -> None:
        """Membership of ``ck`` changed in this transaction: load it afresh."""
        hot = self.hot
        conv = hot.convs.pop(ck, None)
        if conv is not None:
            hot.members -= len(conv.users)

    def fanout(self, conv: _Conv, entry: bytes) -> tuple[tuple[str, int], ...]:
        """Queue ``entry`` in the inbox of every member; their positions."""
        hot = self.hot
        if conv.heads_gen != hot.heads_gen:
            heads, floors, txn, load = hot.heads, hot.floors, self.txn, self._store._head_floor
            for uk in conv.uks:
                if uk not in heads:
                    heads[uk], floors[uk] = load(txn, uk)
            conv.heads_gen = hot.heads_gen
        return _impl.fanout(conv.users, conv.uks, hot.heads, self.pend, entry)

    def dedupe_last(self, dk: bytes) -> int:
        """The highest local_id of the ``dedupe`` records of the device
        ``dk`` (T(sender) T(device)) in the transaction, -1 if none: the
        seed of :attr:`_Hot.dmax`, read by store_plain_run."""
        cur = self.txn.cursor(db=self._store._dedupe)
        end = dk + b"\xff" * 8
        if cur.set_range(end):
            if cur.key()[: len(end)] == end:  # (a record or a run ending at 2^64-1)
                return _U64_MAX
            if not cur.prev():
                return -1
        elif not cur.last():
            return -1
        key = cur.key()
        # (keys are T(sender) T(device) U64(last local_id), a run's + U64(first):
        # no other shape has the prefix dk)
        return _U64.unpack_from(key, len(dk))[0] if key[: len(dk)] == dk else -1  # type: ignore[no-any-return]

    def dedupe_written(self, dk: bytes) -> None:
        """A path other than store_plain_run wrote a dedupe record of ``dk``."""
        self.hot.dmax.pop(dk, None)
        self.dk_general.add(dk)

    def prior(self, dkey: bytes) -> Optional[bytes]:
        """The dedupe record of ``dkey``: staged by this batch, or stored."""
        staged = self.s_dedupe.get(dkey)
        if staged is not None:
            return staged
        return _dedupe_get(self.txn, self._store._dedupe, dkey)  # type: ignore[no-any-return]

    def put_staged(self) -> None:
        """Write the staged records: one ``putmulti`` per database, keys
        sorted.  ``msgs`` keys are server-time-first msg ids, so they nearly
        always all sort after every stored key: then they are appended
        (MDB_APPEND: no B-tree search).  Raises :class:`_MsgIdTaken` if a
        msg_id was already stored or staged twice -- the batch is then run
        again without staging, which rejects just that op (INTERNAL)."""
        store, txn = self._store, self.txn
        msgs = self.s_msgs
        if msgs:
            msgs.sort()
            cur = txn.cursor(db=store._msgs)
            append = not cur.last() or cur.key() < msgs[0][0]
            if cur.putmulti(msgs, overwrite=False, append=append)[1] != len(msgs):
                raise _MsgIdTaken()
            msgs.clear()
        if self.s_convidx:
            self.s_convidx.sort()
            txn.cursor(db=store._convidx).putmulti(self.s_convidx)
            self.s_convidx.clear()
        if self.s_dedupe:
            # A run of a device's consecutive local_ids is one record.
            txn.cursor(db=store._dedupe).putmulti(_impl.dedupe_items(sorted(self.s_dedupe.items())))
            self.s_dedupe.clear()
        if self.s_devices:
            txn.cursor(db=store._devices).putmulti(sorted(self.s_devices.items()))
            self.s_devices.clear()

    def flush(self) -> None:
        store, txn, hot = self._store, self.txn, self.hot
        if self.s_msgs or self.s_devices:
            self.put_staged()
        if self.ev_dirty:
            txn.put(b"evlast", _U64.pack(self.ev_last), db=store._meta)
            self.ev_dirty = False
        for ck in self._dirty_seqs:
            txn.put(ck, _U64.pack(hot.seqs[ck]), db=store._convs)
        self._dirty_seqs.clear()
        pend = self.pend
        if pend:
            # Key order: each user's range is one contiguous run of keys, so
            # LMDB's cursor stays on the leaf page it just wrote.
            uks = sorted(pend)
            txn.cursor(db=store._inbox).putmulti(_impl.inbox_items(uks, pend, hot.heads))
            txn.cursor(db=store._inboxmeta).putmulti(_impl.head_items(uks, hot.heads, hot.floors))
            pend.clear()

    def sync(self) -> None:
        """Flush and forget: for ops that read or write the counters'
        databases directly (Reclaim rewrites floors and deletes devices,
        PurgeUser deletes devices).  What is forgotten is read again from the
        transaction when next needed."""
        self.flush()
        self.hot.seqs.clear()
        self.hot.clear_heads()
        self.hot.devices.clear()


#: The longest command line broker.lock names (characters).
_COMMAND_WORDS = 200


def _command_words() -> str:
    """How this process was started, in words, for the message of the next
    owner refused (:class:`~pimcore.errors.StoreInUse`): ``pimcore serve
    --data-dir d`` for a console script, ``python -m pkg ARGS`` and ``python
    -c ARGS`` as typed (``sys.argv[0]`` alone said ``__main__.py`` and
    ``-c``).  Cut to :data:`_COMMAND_WORDS` characters, the last one "…"
    when cut."""
    argv = sys.argv or [""]
    first = argv[0]
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if first == "-c":
        head = ["python", "-c"]
    elif isinstance(name, str) and name:
        head = ["python", "-m", name.removesuffix(".__main__")]
    else:
        head = [os.path.basename(first) or "python"]
    words = " ".join([*head, *argv[1:]]).replace("\n", " ")
    return words if len(words) <= _COMMAND_WORDS else words[: _COMMAND_WORDS - 1] + "\u2026"


class LmdbStore(Store):
    """Durable :class:`Store` on LMDB; see the module docstring.

    :param path: directory of the environment (created if missing unless
        ``create=False``, which raises StoreError for a missing store).
    :param durability: ``"sync"``, ``"log"`` or ``"os"`` (module docstring).
    :param map_size: initial map size in bytes (at least 1 MiB is used); the
        map doubles transparently when full, up to ``max_map_size``.
    :param owner: True (the default) for the process that runs a broker on
        the store: it takes a new epoch, marks a ``durability="os"`` run (see
        Epochs) and holds ``broker.lock`` in the directory, so a second
        broker on the same store is refused (StoreError).  False for a
        maintenance open next to a running broker (``pimcore group``,
        ``purge``): epochs and marks are left as they are (``pimcore
        inspect`` opens with ``read_only``, below).
    :param max_readers: LMDB reader slots (concurrent read transactions
        across all processes using the environment).
    :param read_only: True for a look that changes nothing (``pimcore
        inspect``): LMDB opened read-only (``data.mdb`` is opened for
        reading; LMDB's ``lock.mdb`` gets a reader slot, as for any reader),
        no lock of this store taken, no command log replayed or recovered,
        no epoch, mark or schema upgrade written; implies ``owner=False``,
        ``create=False``, and every write raises StoreError.  A ``log``
        store whose broker stopped uncleanly is read as LMDB last wrote it
        (the batches after its checkpoint are in the command log until the
        next start replays them: :meth:`summary` counts them).
    """

    #: Reads may run on the event loop while a commit syncs in a worker thread.
    thread_safe_commit = True

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        durability: str = "sync",
        map_size: int = 1 << 30,
        max_map_size: int = 1 << 40,
        max_readers: int = 256,
        create: bool = True,
        owner: bool = True,
        read_only: bool = False,
    ) -> None:
        if read_only:
            owner = create = False
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
        if map_size <= 0 or max_map_size < map_size:
            raise ValueError("need 0 < map_size <= max_map_size")
        path = os.fspath(path)
        if create:
            os.makedirs(path, mode=_DIR_MODE, exist_ok=True)
        elif not os.path.isfile(os.path.join(path, "data.mdb")):
            raise StoreError(f"no store at {quote_arg(str(path))}")
        initial_size = max(map_size, _MIN_MAP_SIZE)
        self._path = path
        self._owner = owner
        self._lock_file = self._take_broker_lock(path) if owner else None
        self._max_map_size = max(max_map_size, initial_size)
        self._wlock = threading.Lock()
        self._gate = _Gate()
        #: The cache the last commit kept (see :class:`_Hot`); under _wlock.
        self._hot: Optional[_Hot] = None
        self._env: Optional[lmdb.Environment] = None
        #: ``log`` durability: the command log and its checkpointer (module
        #: docstring, Durability); None in the other modes.
        self._log: Optional[_LogState] = None
        #: ``log`` durability: how many batches this open replayed from the
        #: command log (more than 0 only after a stop that was not clean:
        #: a crash, a kill, a power cut).
        self.replayed = 0
        #: Why this handle may not write (a maintenance open of a store a
        #: ``log`` broker is running), or None.
        self._read_only: Optional[str] = None
        #: Trusted epochs whose end this store recorded: epoch -> the highest
        #: server time stored when the next open began (meta ``b"closed"``).
        self._closed: dict[bytes, int] = {}
        #: close() has begun: nothing more is written (see close).
        self._closing = False
        #: Deferred commits (``log`` durability, :meth:`defer_commits`): the
        #: owner thread's ident while they are on, else None.
        self._defer_owner: Optional[int] = None
        self._on_open: Optional[Callable[[], None]] = None
        #: The open deferred transaction and the acked batches in it (under
        #: _wlock; read without it only to ask "is anything open?").
        self._open: Optional[_Open] = None
        #: Deferred transactions begun (their _Open.gen).
        self._open_gen = 0
        #: Threads (other than the owner) waiting for the open transaction to
        #: commit: while there are any, the owner defers nothing.
        self._waiters = 0
        self._open_cond = threading.Condition(self._wlock)
        #: The batch _write runs continues an open deferred transaction
        #: (:meth:`_take_hot`).
        self._continuing = False
        #: Deferred transactions committed, and batches committed in them.
        self.deferred_commits = 0
        self.deferred_batches = 0
        #: The store's schema version as read at open.
        self._schema: Optional[int] = SCHEMA_VERSION
        #: ``log.lock``: held exclusively by the handle that writes through
        #: the command log, shared by a maintenance write (:meth:`_write`).
        self._log_lock_file: Optional[io.FileIO] = None
        if read_only:
            self._durability = durability
            self._open_read_only(path, max_readers)
            return
        log_dir = os.path.join(path, "log")
        ckpt = wal.read_checkpoint(log_dir) if os.path.isdir(log_dir) else None
        if not owner and durability == "log":
            durability = "sync"  # only the broker writes through the log
        self._durability = durability
        temp_lock = False
        if ckpt is not None and not owner:
            # A store a log broker wrote.  No broker running: recover it and
            # leave log durability (under the broker lock meanwhile); else
            # the broker owns every write.
            try:
                self._lock_file = self._take_broker_lock(path)
                temp_lock = True
            except StoreError:
                self._read_only = (
                    "a broker with durability 'log' is running on this store: only it writes"
                    " (use its HTTP API)"
                )
                ckpt = None
        try:
            if (ckpt is not None or durability == "log") and self._read_only is None:
                self._log_lock_file = self._take_log_lock(path)
            if ckpt is not None:
                self._restore(path, ckpt)
            env = self._open_env(path, initial_size, create, max_readers, durability if ckpt is None else "log")
        except lmdb.Error as exc:
            self._release_broker_lock()
            raise StoreError(f"cannot open LMDB store at {path!r}: {exc}") from exc
        except BaseException:
            self._release_broker_lock()
            raise
        try:
            self._bind(env)
        except lmdb.Error as exc:
            env.close()
            self._release_broker_lock()
            raise StoreError(f"cannot open LMDB store at {path!r}: {exc}") from exc
        except BaseException:
            env.close()
            self._release_broker_lock()
            raise
        try:
            if ckpt is not None or durability == "log":
                self._start_log(log_dir, ckpt)
            if self._log is not None and durability != "log":
                # Leave log durability: everything replayed to disk, the log
                # removed, LMDB reopened with this mode's flags.
                self._end_log(path, initial_size, max_readers)
            if temp_lock:
                self._release_broker_lock()
            if self._read_only is not None:
                # (A maintenance open of an initialised store: nothing to write.)
                with self._read() as txn:
                    self._node, self._epoch, self._epochs = self._init_meta(txn, create)
            else:
                self._node, self._epoch, self._epochs = self._write(lambda txn: self._init_meta(txn, create))
            if self._durability == "os":
                assert self._env is not None
                self._env.sync(True)  # the osrun mark must be on disk before any unsynced commit
            elif self._log is not None:
                self._log.checkpoint_now()  # this open's epoch durable before any ack
        except BaseException:
            self.close()
            raise

    def _open_read_only(self, path: str, max_readers: int) -> None:
        """The open of ``read_only=True`` (see the class docstring)."""
        self._read_only = "this store handle is read-only"
        try:
            # map_size 0: the map size the store's writer set.
            # (As bytes: a path that is not UTF-8 opens too.)
            # No lock.mdb: no broker has this store open (each makes it), so
            # no lock is needed -- and taking LMDB's would make the file, in
            # a directory that may not even be a store (inspect of a
            # data.mdb of garbage left a new lock.mdb behind).
            locked = os.path.exists(os.path.join(path, "lock.mdb"))
            env = lmdb.open(os.fsencode(path), map_size=0, subdir=True, create=False, readonly=True, lock=locked,
                            max_dbs=len(_DB_NAMES), max_readers=max_readers)
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"cannot open LMDB store at {quote_arg(path)}: {exc}") from exc
        try:
            self._bind(env, read_only=True)
            with self._read() as txn:
                self._node, self._epoch, self._epochs = self._read_meta(txn)
        except lmdb.Error as exc:
            self.close()
            raise StoreError(f"cannot open LMDB store at {quote_arg(path)}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def _read_meta(self, txn: _Txn) -> tuple[bytes, bytes, tuple[bytes, ...]]:
        """:meth:`_init_meta` of a read-only handle: (node id, epoch, trusted
        epochs) as stored, nothing created or upgraded."""
        node = txn.get(b"node", db=self._meta) if self._meta is not None else None
        if node is None:
            raise StoreError(f"{quote_arg(self._path)} is not an initialised pimcore store")
        raw = txn.get(b"schema", db=self._meta)
        version = _U64.unpack(raw)[0] if raw is not None else None
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(f"store schema version {version}, this code reads {SCHEMA_VERSION}"
                             " (a newer pimcore wrote it: use that version)")
        self._schema = version
        raw = txn.get(b"epochs", db=self._meta) or b""
        trusted = tuple(bytes(raw[i : i + 16]) for i in range(0, len(raw), 16))
        self._closed = _unpack_closed(txn.get(b"closed", db=self._meta))
        return bytes(node), bytes(txn.get(b"epoch", db=self._meta) or b""), trusted

    # ------------------------------------------------------------ plumbing

    @staticmethod
    def _open_env(path: str, size: int, create: bool, max_readers: int, mode: str) -> lmdb.Environment:
        """LMDB with the flags of durability ``mode`` (``log`` and ``os``
        commit without flushing; module docstring, Durability)."""
        sync = mode == "sync"
        return lmdb.open(
            # (As bytes: py-lmdb encodes a str as UTF-8, and a directory
            # whose name is not UTF-8 -- "\udcff" in Python -- was a
            # UnicodeEncodeError; os.fsencode gives the name's own bytes.)
            os.fsencode(path),
            mode=_DIR_MODE,  # (its files get it without the x bits: 0600)
            map_size=size,
            subdir=True,
            create=create,
            max_dbs=len(_DB_NAMES),
            max_readers=max_readers,
            sync=sync,
            metasync=sync,
            lock=True,
        )

    def _bind(self, env: lmdb.Environment, read_only: bool = False) -> None:
        """Open the sub-databases of ``env`` and make it this store's
        (``read_only``: those it has; the others are None)."""
        if read_only:
            # (A missing one is None: summary() says so; the other reads
            # assume them all, see inspect --user.)
            dbs = typing.cast("list[lmdb._Database]", [self._find_db(env, name) for name in _DB_NAMES])
        else:
            # Reader slots of processes that died holding a read transaction
            # (e.g. SIGKILL) would pin old pages forever: release them.
            env.reader_check()
            dbs = [self._open_db(env, name) for name in _DB_NAMES]
        (
            self._meta,
            self._msgs,
            self._convs,
            self._convidx,
            self._groups,
            self._members,
            self._userconvs,
            self._inbox,
            self._inboxmeta,
            self._devices,
            self._dedupe,
            self._reads,
            self._revoked,
            self._spans,
            self._events,
            self._evcursors,
            self._convset,
            self._mentionidx,
            self._deleted,
            self._retention,
        ) = dbs
        self._env = env
        # The map size as this process maps it, for _roomy once per batch
        # (env.info() builds a dict of six fields: about 5 µs, 2 % of a
        # 1 x 1 send's CPU).  It changes only by set_mapsize (_resize).
        self._mapped = int(env.info()["map_size"])

    @staticmethod
    def _restore(path: str, ckpt: wal.Checkpoint) -> None:
        """Before LMDB is opened: put the checkpoint's meta pages back if the
        data file has others (a crash after the checkpoint; module docstring,
        Durability).  Refused while another process has the environment open
        (LMDB then trusts the transaction id in its lock file)."""
        data = os.path.join(path, "data.mdb")
        if wal.read_meta_pages(data, ckpt.page_size) == ckpt.meta:
            return
        lock_path = os.path.join(path, "lock.mdb")
        if os.path.exists(lock_path):
            import fcntl

            fd = os.open(lock_path, os.O_RDWR)
            try:
                # Every process with the environment open holds a lock on
                # byte 0 of lock.mdb (LMDB's mdb_env_excl_lock).
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError:
                raise StoreError(
                    f"the store at {path!r} needs recovery from its command log, but another process"
                    " has it open (e.g. pimcore inspect); close that process and start again"
                ) from None
            finally:
                os.close(fd)
        wal.restore_meta(data, ckpt)

    def _start_log(self, log_dir: str, ckpt: Optional[wal.Checkpoint]) -> None:
        """Open the command log; replay it after ``ckpt`` (each record is a
        batch committed again through :meth:`commit`), or start a new one
        when there is no checkpoint; then checkpoint."""
        st = self._log = _LogState(self, wal.CommandLog(log_dir))
        if ckpt is None:
            st.log.reset()
        else:
            # The pin at S from the first replayed commit on: without it
            # LMDB would reuse pages of S's tree, and a crash before this
            # start's own checkpoint (below) would leave S's meta pages --
            # still the durable checkpoint -- pointing at overwritten pages.
            assert self._env is not None
            st.pin = self._env.begin()
            st.replaying = True
            began = time.monotonic()
            first = 0
            try:
                for lsn, payload in st.log.records(ckpt):
                    first = first or lsn
                    try:
                        ops = _decode_ops(payload)
                        self.commit(WriteBatch(-lsn, ops))
                    except (StoreError, pickle.UnpicklingError, ValueError, TypeError, EOFError) as exc:
                        full = isinstance(exc, StoreError) and (exc.cause or "").startswith(_NO_SPACE)
                        if full:
                            # (Said for a start: the running store's "writes
                            # are retried by the clients" means nothing here.)
                            inner = exc.__cause__ or exc
                            raise StoreError(
                                f"replaying record {lsn} of the command log in {log_dir!r} failed:"
                                f" {_no_space(self._path, inner) or _NO_SPACE} ({inner}): {_FREE_SPACE}, then start"
                                " the broker again (the log keeps every acknowledged batch)",
                                cause=f"{_NO_SPACE}: {_FREE_SPACE}", transient=True) from exc
                        raise StoreError(
                            f"replaying record {lsn} of the command log in {log_dir!r} failed: {exc}"
                        ) from exc
                    self.replayed += 1
            finally:
                st.replaying = False
            if self.replayed:
                # (A clean stop checkpoints everything: a replay means the
                # last stop was a crash, a kill or a power cut.)
                _log.warning("replayed %d batches from the command log (records %d-%d) in %.2f s: the last stop"
                             " was not clean; every batch this log acknowledged is back (a copy of the data directory"
                             " holds only what was acknowledged before the copy was taken)", self.replayed, first,
                             first + self.replayed - 1, time.monotonic() - began,
                             extra={"event": "log_replayed", "batches": self.replayed, "path": log_dir})
        st.log.start()
        st.checkpoint_now()
        st.started = True

    def _end_log(self, path: str, size: int, max_readers: int) -> None:
        """Leave ``log`` durability (after a replay): LMDB flushed whole, the
        log deleted, the environment reopened with this mode's flags."""
        st = self._log
        assert st is not None and self._env is not None
        # The log stays this handle's until it is removed: cut short before
        # that (Ctrl-C), the close() of the failed open closes it.
        st.join()
        st.stop_flusher()
        self._env.sync(True)
        st.drop_pin()
        self._log = None
        st.close_files()
        st.log.remove()
        old = self._env
        self._env = None
        old.close()
        self._bind(self._open_env(path, size, False, max_readers, self._durability))
        if self._log_lock_file is not None:
            # (No log left: maintenance writes are LMDB's own again.  Closed
            # before forgotten: see _open_lock_file.)
            self._log_lock_file.close()
            self._log_lock_file = None

    @staticmethod
    def _find_db(env: lmdb.Environment, name: str) -> Optional["lmdb._Database"]:
        """A sub-database of a read-only environment, None if it has none."""
        try:
            return env.open_db(name.encode("ascii"), create=False)
        except lmdb.NotFoundError:
            return None

    def _open_db(self, env: lmdb.Environment, name: str) -> "lmdb._Database":
        while True:
            try:
                return env.open_db(name.encode("ascii"), create=True)
            except lmdb.MapFullError:
                self._grow(env)

    def _init_meta(self, txn: _Txn, create: bool) -> tuple[bytes, bytes, tuple[bytes, ...]]:
        """(node id, epoch, trusted epochs), creating or migrating as needed,
        with a new epoch for this open (module docstring, Epochs)."""
        node = txn.get(b"node", db=self._meta)
        if node is None:
            if not create:
                raise StoreError(f"{self._path!r} is not an initialised pimcore store")
            node = os.urandom(8)
            txn.put(b"node", node, db=self._meta)
            txn.put(b"schema", _U64.pack(SCHEMA_VERSION), db=self._meta)
            txn.put(b"hwm", _U64.pack(0), db=self._meta)
        else:
            raw = txn.get(b"schema", db=self._meta)
            version = _U64.unpack(raw)[0] if raw is not None else None
            if version == 1:
                self._migrate_1_to_2(txn)
                version = 2
            if version == 2:
                self._migrate_2_to_3(txn)
                version = 3
            if version == 3:
                self._migrate_3_to_4(txn)
            elif version != SCHEMA_VERSION:
                raise StoreError(f"store schema version {version}, this code reads {SCHEMA_VERSION}")
        raw = txn.get(b"epochs", db=self._meta) or b""
        trusted = [bytes(raw[i : i + 16]) for i in range(0, len(raw), 16)]
        current = txn.get(b"epoch", db=self._meta)
        self._closed = _unpack_closed(txn.get(b"closed", db=self._meta))
        if not self._owner and current is not None:
            # A maintenance open: the running broker's history and its os
            # mark are its own business (deleting the mark would hide a
            # power cut from the next start).
            return node, bytes(current), tuple(trusted)
        boot = _boot_id() or b"?"
        mark = txn.get(b"osrun", db=self._meta)
        if mark is not None:
            mark_boot, mark_epoch = bytes(mark[:-16]), bytes(mark[-16:])
            if mark_boot != boot or boot == b"?":
                # An os-durability run ended with the machine: commits it
                # acknowledged may be gone, so its cursors are not trusted.
                trusted = [e for e in trusted if e != mark_epoch]
            txn.delete(b"osrun", db=self._meta)
        if current is not None and bytes(current) in trusted:
            # The last run's epoch ends here, in this store's history: at the
            # highest server time stored (module docstring, Epochs).
            hwm = txn.get(b"hwm", db=self._meta)
            self._closed[bytes(current)] = _U64.unpack(hwm)[0] if hwm is not None else 0
        self._closed = {e: t for e, t in self._closed.items() if e in trusted}
        txn.put(b"closed", b"".join(e + _U64.pack(t) for e, t in self._closed.items()), db=self._meta)
        epoch = os.urandom(16)
        trusted.append(epoch)
        txn.put(b"epoch", epoch, db=self._meta)
        txn.put(b"epochs", b"".join(trusted), db=self._meta)
        if self._durability == "os":
            txn.put(b"osrun", boot + epoch, db=self._meta)
        return node, epoch, tuple(trusted)

    def _migrate_1_to_2(self, txn: _Txn) -> None:
        """Schema 1 -> 2: message records gain after_seq (0: unknown) and
        kind (MESSAGE).  One transaction: a crash leaves schema 1 intact."""
        cur = txn.cursor(db=self._msgs)
        updates = []
        for key, val in cur:
            seq, local_id, client_time, server_time = _RECORD_V1.unpack_from(val)
            updates.append((key, _RECORD.pack(seq, local_id, client_time, server_time, 0, 0) + val[_RECORD_V1.size :]))
        for key, val in updates:
            txn.put(key, val, db=self._msgs)
        txn.put(b"schema", _U64.pack(2), db=self._meta)

    def _migrate_2_to_3(self, txn: _Txn) -> None:
        """Schema 2 -> 3: every current member gets the membership interval
        (0, open) (a member since the start), every group the default
        setting (history not visible).  Members removed before have no
        interval (schema 2 did not record when they were members).  Same
        transaction as any earlier migration step."""
        groups = [(key, val) for key, val in txn.cursor(db=self._groups)]
        for key, val in groups:
            if len(val) == _I64.size:
                txn.put(key, val + b"\x00", db=self._groups)
        open_span = _SPAN.pack(0, _U64_MAX)
        members = [key for key, _ in txn.cursor(db=self._members)]
        for key in members:
            txn.put(key, open_span, db=self._spans)
        txn.put(b"schema", _U64.pack(3), db=self._meta)

    def _migrate_3_to_4(self, txn: _Txn) -> None:
        """Schema 3 -> 4: ``dedupe`` may hold run records (one per run of a
        device's consecutive local_ids in a batch).  Schema 3's records are
        the single-entry records of schema 4, so only the version changes:
        it is there so that an older pimcore, which would not find a retry's
        entry in a run and store the message twice, refuses the store."""
        txn.put(b"schema", _U64.pack(4), db=self._meta)

    def _roomy(self) -> bool:
        """May a batch's log record be flushed while LMDB applies it?  Only
        while the map can double at least twice more: the record is durable
        before the apply, so a crash between a refusal at the map's ceiling
        and the record's take-back would leave a batch the next start must
        replay and cannot (it fails, naming ``max_map_size``).  Near the
        ceiling batches flush inline, after the apply."""
        env = self._env
        return env is not None and self._mapped * 4 <= self._max_map_size

    def _lmdb_error(self, exc: lmdb.Error) -> StoreError:
        """The StoreError for LMDB's failure ``exc``, in words when the disk is full."""
        full = _no_space(self._path, exc)
        if full is not None:
            return StoreError(f"LMDB error: {full} ({exc}): free space there (or move the data directory to a"
                              " larger disk); writes are retried by the clients", cause=f"{_NO_SPACE}: {_FREE_SPACE}",
                              transient=True)
        return StoreError(f"LMDB error: {exc}")

    def _grow(self, env: lmdb.Environment) -> None:
        """Double the map.  Caller holds the write lock (or is __init__), so
        no write transaction is open; the gate drains the readers."""
        size = env.info()["map_size"]
        new = min(size * 2, self._max_map_size)
        if new <= size:
            raise StoreError(f"the store's map is full (LMDB map full at {size} bytes, its ceiling max_map_size"
                             f" {self._max_map_size}): open the store with a larger max_map_size, or purge"
                             " old messages (retention) to make room", cause=_MAP_FULL)
        self._resize(env, new)

    def _resize(self, env: lmdb.Environment, size: int) -> None:
        """``set_mapsize(size)`` with the readers drained.  py-lmdb aborts
        every transaction of the environment there -- in log durability the
        pin too, after which nothing would keep LMDB from reusing the last
        checkpoint's pages: so a checkpoint is taken right away (no running
        one meanwhile; the write lock keeps commits out)."""
        st = self._log
        if st is not None:
            st.join()
            # set_mapsize aborts the pin: until after_resize has a new one
            # (and its checkpoint) nothing may commit -- LMDB would reuse the
            # last checkpoint's pages.  Cut short (a failed checkpoint, an
            # interrupt), the store stays stopped; a restart recovers.
            # A failed checkpoint (no descriptor, no space) is retried by
            # the next write (settle_resize): the store writes again once
            # it can be written.
            unset = st.unsettled is None
            if unset:
                st.unsettled = ("the map grew and its command log checkpoint could not be written; each write"
                                " tries it again (or restart the broker)")
                st.resize_unsettled = True
        with self._gate.exclusive():
            env.set_mapsize(size)
            self._mapped = int(env.info()["map_size"])  # (size 0: another process's, adopted)
        if st is not None:
            st.after_resize()
            if unset:
                st.resize_unsettled = False
                st.unsettled = None

    def _adopt_map_size(self, env: lmdb.Environment) -> None:
        """Another process (e.g. ``pimcore inspect`` next to a broker, or the
        other way round) grew the map past ours: LMDB refuses new transactions
        until we adopt its size.  Caller holds the write lock and is not
        inside the gate."""
        self._resize(env, 0)

    def _write(
        self, fn: Callable[[_Txn], T], committed: Optional[Callable[[], None]] = None,
        logged: Optional[_LogRecord] = None,
    ) -> T:
        """Run ``fn`` in one write transaction and commit it.  ``fn`` must not
        have effects outside the transaction: when the map is full the
        transaction is aborted, the map grown and ``fn`` run again.
        ``committed`` is called after a successful commit, still under the
        write lock.  ``logged``: the batch's command log record (``log``
        durability), appended and flushed once, before LMDB commits: while
        ``fn`` runs if ``logged.overlap``, else after it.

        ``fn`` may raise :class:`_RunAgain` to be run again in a new
        transaction (the record stays logged).

        Why the overlap is safe: LMDB still commits only after the flush
        returned, under the same write lock (no checkpoint and no other
        batch can come in between, and :attr:`_LogState.uncommitted` covers
        the record until LMDB has it).  The record is durable before the
        apply can fail, so whatever stops the batch after it was appended
        (a map at its ceiling, an exception, an interrupt, LMDB's commit
        failing) takes it back out of the log, still under the lock
        (:meth:`_LogState.settle`): the log holds exactly the batches
        LMDB committed, in LMDB's order."""
        with self._wlock:
            env = self._env
            if env is None or self._closing:
                raise StoreError("store is closed")
            if self._read_only is not None:
                raise StoreError(self._read_only)
            st = self._log
            if st is not None and st.resize_unsettled:
                st.settle_resize()
            if st is not None and (st.failed is not None or st.unsettled is not None):
                raise st.stopped()
            if self._open is not None and st is not None:
                self._restore_open(env, st)  # (if it has no transaction; raises if it cannot)
            if self._open is not None or self._defer_owner is not None:
                mine = self._defer_owner == threading.get_ident()
                if logged is not None and mine and not logged.written and not self._waiters and self._roomy():
                    assert st is not None
                    return self._write_deferred(env, st, fn, committed, logged)
                if mine:
                    self._commit_open()
                else:
                    self._await_open(writing=True)
                if st is not None and (st.failed is not None or st.unsettled is not None):
                    raise st.stopped()
            # A maintenance handle writes only while no log broker does (it
            # may have started since this handle opened): its commit would
            # be in LMDB but not in the log, and that broker's recovery puts
            # back the checkpoint's meta pages and replays only the log.
            guard = self._maintenance_write_lock() if not self._owner and st is None else None
            done = False
            tid = 0  # the write transaction's id (log durability): did LMDB commit it?
            txn: Optional[_Txn] = None
            try:
                while True:
                    try:
                        if logged is not None and not _TXN_IDS:
                            tid = env.info()["last_txnid"] + 1
                        txn = env.begin(write=True)
                        if logged is not None and _TXN_IDS:
                            tid = txn.id()
                    except lmdb.MapResizedError:
                        self._adopt_map_size(env)
                        continue
                    except lmdb.Error as exc:
                        raise self._lmdb_error(exc) from exc
                    try:
                        if logged is not None and not logged.written:
                            assert st is not None
                            # (Whether the map has room is asked here, under the
                            # write lock: a resize cannot come in between.)
                            if logged.overlap and self._roomy() and st.append_soon(logged):
                                try:
                                    result = fn(txn)
                                finally:
                                    st.appended(logged)
                            else:
                                result = fn(txn)
                                st.append(logged)
                        else:
                            result = fn(txn)
                        txn.commit()
                    except _RunAgain:
                        _abort(txn)
                        continue
                    except lmdb.MapFullError:
                        _abort(txn)
                        self._grow(env)
                        continue
                    except lmdb.Error as exc:
                        _abort(txn)
                        raise self._lmdb_error(exc) from exc
                    except BaseException:
                        _abort(txn)
                        raise
                    done = True
                    if st is not None:
                        st.uncommitted = None
                    if committed is not None:
                        committed()
                    if st is not None and not st.replaying:
                        st.after_commit()
                    return result
            finally:
                if not done and txn is not None:
                    # (Again: a second interrupt may have cut the abort above
                    # short -- at _abort's first line -- and the transaction,
                    # kept alive by the interrupt's traceback, would hold
                    # LMDB's write lock for this thread.  Aborting twice is
                    # harmless.)
                    _abort(txn)
                if guard is not None:
                    guard.close()
                if not done and logged is not None and logged.written and st is not None:
                    st.settle(logged, lambda: bool(tid) and env.info()["last_txnid"] >= tid)

    # ------------------------------------------------------------ deferred commits

    def defer_commits(self, on: bool = True, *, on_open: Optional[Callable[[], None]] = None) -> bool:
        """Let several logged batches share one LMDB commit (``log``
        durability only; other modes answer False and change nothing).

        Each batch is still acked only once its command log record is
        ``fdatasync``'d; LMDB's own commit (its page writes) is left open
        for up to :attr:`defer_batches` batches, :attr:`defer_ops` ops or
        :attr:`defer_seconds`, and paid once for all of them.  A crash loses
        nothing: the records are in the log and the next start replays them.
        The caller's thread becomes the *owner*: its writes go into the open
        transaction, its reads commit it first.  Every other thread's read or
        write (and another process's write, or its first open of the store)
        waits for the owner's commit, so the owner must call
        :meth:`commit_open` when :meth:`commit_delay` has passed (the broker
        does) and must not wait for such a thread meanwhile.  ``on=False``
        commits what is open and ends deferral.  ``on_open`` is called (on
        the owner's thread, under the store's write lock: it must only note
        the fact) whenever a batch begins a new deferred transaction.
        Returns whether deferral is on.  Raises StoreError as
        :meth:`commit_open` does.  (Measured: BENCHMARKS.md, "Several logged
        batches per LMDB commit".)"""
        with self._wlock:
            if self._defer_owner == threading.get_ident():
                self._commit_open()
            else:
                self._await_open(writing=True)
            self._defer_owner = threading.get_ident() if on and self._log is not None else None
            self._on_open = on_open if self._defer_owner is not None else None
            return self._defer_owner is not None

    #: An open deferred transaction is committed once it holds this many
    #: batches, or this many ops, or has been open this long (s); at once
    #: when another thread waits for it (the broker looks every 10 ms).
    #: Measured at 50 x 16 (BENCHMARKS.md, "Several logged batches per LMDB
    #: commit"): 64 / 0.2 s gave +12 % acked sends/s over 16 / 0.05 s.
    defer_batches = 64
    defer_ops = 32768
    defer_seconds = 0.2

    def commit_delay(self) -> Optional[float]:
        """Seconds until the open deferred transaction is due (0.0 if it is
        already), or None if nothing is open: when the owner should call
        :meth:`commit_open` at the latest."""
        op = self._open
        if op is None:
            return None
        st = self._log
        if st is not None and st.resize_unsettled:
            # Nothing the owner can commit until a write has written the
            # resize's checkpoint (settle_resize; the batches are reopened
            # then, and on_open says so): a commit now would only fail, and
            # a broker's deferred task would take the store for stopped.
            return None
        if self._waiters:
            return 0.0
        return max(0.0, op.since + self.defer_seconds - time.monotonic())

    def commit_open(self) -> None:
        """Commit the open deferred transaction now (from the owner; from
        another thread: wait until the owner has).  Raises StoreError if the
        commit failed: the store then writes no more, and a restart replays
        the batches from the command log."""
        if self._open is None:
            return
        with self._wlock:
            self._settle_open()

    def _settle_open(self) -> None:
        """Under _wlock: nothing deferred left open -- committed now by the
        owner, or waited for by any other thread."""
        if self._open is not None:
            if self._defer_owner == threading.get_ident():
                self._commit_open()
            else:
                self._await_open()

    def _await_open(self, writing: bool = False) -> None:
        """Under _wlock, not the owner: wait (releasing it) until the
        transaction open now has been committed or given up -- or, when
        ``writing`` (the caller is about to begin a write transaction, which
        would block on LMDB's writer mutex while holding _wlock), until none
        is open at all.  While it waits the owner defers nothing
        (:attr:`_waiters`).  It also ends once the store has stopped writing
        (the log has the batches; a restart replays them)."""
        op = self._open
        if op is None:
            return
        self._waiters += 1
        try:
            while True:
                now = self._open
                if now is None or (not writing and now.gen != op.gen):
                    return
                st = self._log
                if st is None or st.failed is not None or st.unsettled is not None:
                    return
                # (A timeout as well as the notify: a stop on any path ends
                # the wait within 50 ms.)
                self._open_cond.wait(0.05)
        finally:
            self._waiters -= 1

    def _write_deferred(
        self, env: lmdb.Environment, st: _LogState, fn: Callable[[_Txn], T],
        committed: Optional[Callable[[], None]], logged: _LogRecord,
    ) -> T:
        """:meth:`_write` for the owner of deferred commits, under _wlock:
        apply ``fn`` to the open transaction (begun if none), append and
        flush its record, and leave LMDB's commit for later.

        Why it is safe: a batch is acked only after its record is durable,
        and records are logged in the order they are applied.  The open
        transaction (:class:`_Open`) holds batches that are acked but in
        LMDB only once it commits; its ``at`` is the log position of the
        first of them, from which any checkpoint meanwhile replays.  A
        failure of this batch (its apply, its flush, an interrupt) leaves its
        partial writes mixed with theirs: the transaction is aborted, this
        batch's record taken back out of the log (:meth:`_LogState.settle`),
        and the earlier batches' ``fn``s run again into a new transaction
        (:meth:`_reopen`): ``fn`` is a pure function of the transaction, as
        it must be for a map that grows.  Each change of state is one
        assignment or one list append, so an interrupt lands before or after
        it; whatever cannot be repaired stops the store, and a restart
        replays the log."""
        accepted = False
        again = logged.rerun if logged.rerun is not None else fn
        try:
            while True:
                op = self._open
                if op is not None and op.txn is None:
                    self._restore_open(env, st)  # (raises if it cannot)
                    continue
                if op is None:
                    try:
                        tid = 0 if _TXN_IDS else env.info()["last_txnid"] + 1
                        begun = env.begin(write=True)
                    except lmdb.MapResizedError:
                        self._adopt_map_size(env)
                        continue
                    except lmdb.Error as exc:
                        raise self._lmdb_error(exc) from exc
                    self._open_gen += 1
                    op = self._open = _Open(begun, begun.id() if _TXN_IDS else tid, time.monotonic(), self._open_gen)
                    if self._on_open is not None:
                        self._on_open()
                txn = op.txn
                assert txn is not None
                try:
                    self._continuing = bool(op.fns)
                    if logged.written:
                        result = fn(txn)  # (run again: the record is logged already)
                    elif logged.overlap and st.append_soon(logged, op):
                        try:
                            result = fn(txn)
                        finally:
                            st.appended(logged)
                    else:
                        result = fn(txn)
                        st.append(logged, op)
                except _RunAgain:
                    self._drop_open()
                    continue
                except lmdb.MapFullError:
                    self._drop_open()
                    self._grow(env)
                    continue
                except lmdb.Error as exc:
                    self._drop_open()
                    raise self._lmdb_error(exc) from exc
                except BaseException:
                    self._drop_open()
                    raise
                finally:
                    self._continuing = False
                # Acked from the next line on (one atomic list append: an
                # interrupt lands before or after it, see finally): the
                # record is durable, and the batch is in the open
                # transaction (or, if that is given up, run again from
                # op.fns, or replayed by the next start).
                op.fns.append(again)
                accepted = True  # (_commit_open below ends op)
                op.ops += logged.ops
                if committed is not None:
                    committed()
                if (len(op.fns) >= self.defer_batches or op.ops >= self.defer_ops or self._waiters
                        or time.monotonic() - op.since >= self.defer_seconds):
                    try:
                        self._commit_open()
                    except StoreError as exc:
                        # This batch is acked (its record is durable): its
                        # result stands.  The store has stopped; the next
                        # batch fails, and a restart replays them all.
                        _log.error("%s", exc, extra={"event": "deferred_commit_failed"})
                return result
        finally:
            op = self._open
            if not (accepted or (op is not None and op.fns and op.fns[-1] is again)):
                # Not accepted: its writes may be in the open transaction,
                # mixed with the acked batches' (an exception, or an
                # interrupt anywhere up to the append above): abort it, take
                # the record back, run the acked batches again.
                self._drop_open()
                if logged.written:
                    st.settle(logged, lambda: False)
                op = self._open
                if op is not None and op.txn is None and not op.fns and op.at is None:
                    self._open = None  # (nothing acked was in it)
                    self._open_cond.notify_all()
            op = self._open
            if op is not None and op.txn is None and st.unsettled is None and st.failed is None:
                try:
                    self._restore_open(env, st)
                except BaseException:  # noqa: BLE001 - the store is stopped (unsettled); the batch's own error goes on
                    pass

    def _drop_open(self) -> None:
        """Abort the open deferred transaction; its acked batches stay (in
        a transaction-less :class:`_Open`, and in the log) to be run again.
        With none (and no record of a failed batch in the log), nothing is
        left open."""
        op = self._open
        if op is None or op.txn is None:
            return
        self._hot = None
        # Aborted before self._open lets go of it: a second interrupt (the
        # first is what a caller drops the transaction for) landing anywhere
        # in here leaves the transaction either aborted or still in
        # self._open, where the caller's finally drops it again (aborting
        # twice is harmless).  Let go of first, the transaction stayed open
        # when the interrupt landed before the abort -- kept alive by its
        # traceback, holding LMDB's write lock for this thread, named by
        # nothing -- and the acked batches could not be run again: the store
        # stopped.
        _abort(op.txn)
        # (Kept, too, while ``at`` names the record of the batch that
        # failed: it may be in the log, and a checkpoint meanwhile -- the
        # map grows -- must replay from it.)
        self._open = op.without_txn() if op.fns or op.at is not None else None
        if self._open is None:
            self._open_cond.notify_all()

    def _restore_open(self, env: lmdb.Environment, st: _LogState) -> None:
        """Under _wlock: acked deferred batches but no transaction (a
        failed batch, or a repair cut short): the owner runs them again
        (:meth:`_reopen`); any other thread stops the store (a restart
        replays them).  The store is marked stopped first, so that an
        interrupt anywhere in here leaves it so."""
        op = self._open
        if op is None or op.txn is not None:
            return
        st.unsettled = "deferred batches are not in LMDB's transaction; restart the broker to recover them"
        if self._defer_owner == threading.get_ident():
            self._reopen(env, st, op)
            st.unsettled = None
        else:
            raise st.stopped()

    def _reopen(self, env: lmdb.Environment, st: _LogState, op: "_Open") -> None:
        """Under _wlock, ``op`` without a transaction: a new one holding
        every acked batch of ``op.fns`` again (the map grown as needed).
        Raises whatever stops that (the caller has stopped the store)."""
        while True:
            try:
                tid = 0 if _TXN_IDS else env.info()["last_txnid"] + 1
                txn = env.begin(write=True)
            except lmdb.MapResizedError:
                self._adopt_map_size(env)  # (its checkpoint replays the batches from op.at)
                continue
            except lmdb.Error as exc:
                raise self._lmdb_error(exc) from exc
            self._hot = None
            try:
                for fn in op.fns:
                    fn(txn)
            except lmdb.MapFullError:
                _abort(txn)
                self._grow(env)  # (at the map's ceiling: raises)
                continue
            except _MsgIdTaken:
                # (A batch whose first run met a reused msg_id ran unstaged:
                # its rerun, staged, met it again and is now unstaged too.)
                _abort(txn)
                continue
            except BaseException:
                _abort(txn)
                raise
            finally:
                self._hot = None  # (the batches' caches were for their first run)
            self._open = op.with_txn(txn, txn.id() if _TXN_IDS else tid)
            if self._on_open is not None:
                self._on_open()  # (a new deferred transaction: its commit is due in defer_seconds)
            return

    def _commit_open(self) -> None:
        """Under _wlock, the owner: commit the open deferred transaction
        (a full map: grow it and commit the batches again).  Any other
        failure stops the store -- its batches are acked and in the log, and
        a restart replays them -- and raises StoreError (or the interrupt)."""
        if self._open is None:
            return
        env = self._env
        st = self._log
        assert env is not None and st is not None
        if st.failed is not None or st.unsettled is not None:
            raise st.stopped()
        self._restore_open(env, st)
        interrupted: Optional[BaseException] = None
        while True:
            op = self._open
            assert op is not None and op.txn is not None
            try:
                op.txn.commit()
                self._open = None  # committed
            except lmdb.MapFullError:
                # (py-lmdb aborted it.)  Grow the map, then the batches again.
                self._hot = None
                self._open = op.without_txn()
                try:
                    self._grow(env)
                    self._restore_open(env, st)
                except BaseException:
                    self._gave_up(st, "the map could not grow for deferred batches")
                    raise
                continue
            except BaseException as exc:
                if self._open is not None:
                    try:
                        done = env.info()["last_txnid"] >= op.id  # committed after all?
                    except BaseException:  # noqa: BLE001 - then assume not
                        done = False
                    if not done:
                        self._hot = None
                        full = _no_space(self._path, exc)
                        self._gave_up(st, f"a deferred commit failed ({exc!r})" if full is None else
                                      f"a deferred commit failed: {full} ({exc!r}): {_FREE_SPACE}")
                        if isinstance(exc, lmdb.Error):
                            raise st.stopped() from exc
                        raise
                    self._open = None
                interrupted = exc  # (LMDB committed: raised below)
            break
        self.deferred_commits += 1
        self.deferred_batches += len(op.fns)
        self._open_cond.notify_all()
        if not st.replaying:
            st.after_commit()
        if interrupted is not None:
            raise interrupted

    def _gave_up(self, st: _LogState, why: str) -> None:
        """The open deferred batches cannot reach LMDB in this run: stop
        writing (the log has them; a restart replays them) and release the
        threads that wait for them."""
        st.unsettled = f"{why}; restart the broker to recover the batches from the command log"
        self._open = None
        self._open_cond.notify_all()

    @contextmanager
    def _read(self) -> Iterator[_Txn]:
        """A short read transaction, inside the gate."""
        txn = self._begin_read()
        try:
            yield txn
        except lmdb.Error as exc:
            raise self._lmdb_error(exc) from exc
        finally:
            txn.abort()
            self._gate.leave()

    def _begin_read(self) -> _Txn:
        """Enter the gate and begin a read transaction (leaving the gate
        again if that fails)."""
        if self._open is not None:
            # Acked batches wait in a deferred transaction: a read must see
            # them (the owner commits it; another thread waits for that).
            try:
                self.commit_open()
            except StoreError:
                pass  # stopped: reads see what LMDB has (a restart replays the rest)
        gate = self._gate
        while True:
            gate.enter()
            env = self._env
            try:
                if env is None:
                    raise StoreError("store is closed")
                return env.begin(buffers=False)
            except lmdb.MapResizedError:
                gate.leave()
                # Write lock first, then the gate: the order _write uses.
                with self._wlock:
                    if self._defer_owner == threading.get_ident():
                        self._commit_open()
                    else:
                        self._await_open(writing=True)  # (set_mapsize drops every transaction)
                    if env is not None and self._env is env:  # not closed meanwhile
                        self._adopt_map_size(env)
            except lmdb.Error as exc:
                gate.leave()
                raise self._lmdb_error(exc) from exc
            except BaseException:
                gate.leave()
                raise

    @staticmethod
    def _scan(
        txn: _Txn, db: "lmdb._Database", prefix: bytes, start: Optional[bytes] = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs of the keys starting with ``prefix``, from
        ``start`` (default: the prefix itself) in key order."""
        cur = txn.cursor(db)
        if not cur.set_range(start if start is not None else prefix):
            return
        for key, value in cur:
            if not key.startswith(prefix):
                return
            yield key, value

    def _members_in(self, txn: _Txn, info: tuple[bytes, Optional[tuple[str, str]]]) -> Optional[tuple[str, ...]]:
        """Sorted members of a well-formed conversation (``info`` from
        :func:`_conv_info`); None for an unknown group."""
        ck, pair = info
        if pair is not None:
            return pair
        if txn.get(ck, db=self._groups) is None:
            return None
        return tuple(sorted(_take_t(key, len(ck))[0] for key, _ in self._scan(txn, self._members, ck)))

    def _load_conv(self, txn: _Txn, info: tuple[bytes, Optional[tuple[str, str]]]) -> Optional[_Conv]:
        """:class:`_Conv` of a well-formed conversation (``info`` from
        :func:`_conv_info`); None for an unknown group."""
        ck, pair = info
        if pair is not None:
            return _Conv(pair, (_t(pair[0]), _t(pair[1])))
        if txn.get(ck, db=self._groups) is None:
            return None
        n = len(ck)
        # A members key is T(group) T(user): its tail is the user's key.
        found = sorted((key[n + 1 :].decode("ascii"), key[n:]) for key, _ in self._scan(txn, self._members, ck))
        return _Conv(tuple(user for user, _ in found), tuple(uk for _, uk in found), self._purge_point_in(txn, ck))

    def _last_seq(self, txn: _Txn, ck: bytes) -> int:
        raw = txn.get(ck, db=self._convs)
        return _U64.unpack(raw)[0] if raw is not None else 0

    def _head_floor(self, txn: _Txn, uk: bytes) -> tuple[int, int]:
        raw = txn.get(uk, db=self._inboxmeta)
        return _HEAD_FLOOR.unpack(raw) if raw is not None else (0, 0)

    def _flag(self, txn: _Txn, key: bytes, bit: int, on: bool) -> None:
        raw = txn.get(key, db=self._userconvs)
        old = raw[0] if raw is not None else 0
        new = (old | bit) if on else (old & ~bit)
        if new == old:
            return
        if new:
            txn.put(key, bytes((new,)), db=self._userconvs)
        else:
            txn.delete(key, db=self._userconvs)

    def _deleted_after(self, txn: _Txn, user: str, ck: bytes, marker: int) -> set[int]:
        """The seqs after ``marker`` of the conversation ``ck`` that ``user``
        deleted for themselves: neither unread nor a mention (as recalled
        ones; base.unread_for).  Usually none: one short scan of ``deleted``."""
        dk = _t(user) + ck
        return {_U64.unpack_from(key, len(dk))[0]
                for key, _ in self._scan(txn, self._deleted, dk, dk + _U64.pack(marker + 1))}

    def _count_unread(self, txn: _Txn, user: str, ck: bytes, marker: int, gone: Optional[set[int]] = None) -> int:
        """``gone``: :meth:`_deleted_after` of the same marker, when the
        caller has it already."""
        me = user.encode("ascii")
        # Messages the user deleted for themselves are not unread.
        if gone is None:
            gone = self._deleted_after(txn, user, ck, marker)
        n = 0
        for lo, hi in member_ranges(self._spans_in(txn, ck, user)):
            if hi <= marker:
                continue
            start = ck + _U64.pack(max(lo, marker + 1))
            # Value = msg_id (16 bytes) + sender: no message load needed; a
            # membership, RECALL or EDIT entry's 17th byte is its kind (1..4),
            # a recalled message's is 3 (RECALL), never an id character; a
            # system post (ids.SYSTEM) has no sender bytes.
            for key, value in self._scan(txn, self._convidx, ck, start):
                seq = _U64.unpack_from(key, len(ck))[0]
                if hi != _U64_MAX and seq > hi:
                    break
                if (len(value) == 16 or (value[16] > 5 and value[16:] != me)) and (not gone or seq not in gone):
                    n += 1
        return n

    def _spans_in(self, txn: _Txn, ck: bytes, user: str) -> tuple[tuple[int, int], ...]:
        """The user's membership intervals (``ck`` = T(conv) of a well-formed
        conversation id)."""
        pair = direct_members(ck[1:].decode("ascii"))
        if pair is not None:
            return ((0, _U64_MAX),) if user in pair else ()
        raw = txn.get(ck + _t(user), db=self._spans)
        if raw is None:
            return ()
        return tuple(_SPAN.unpack_from(raw, i) for i in range(0, len(raw), _SPAN.size))

    def _group_flags(self, txn: _Txn, ck: bytes) -> Optional[int]:
        raw = txn.get(ck, db=self._groups)
        if raw is None:
            return None
        return raw[_I64.size] if len(raw) > _I64.size else 0

    def _load(self, txn: _Txn, msg_id: bytes, user: str = "") -> StoredMessage:
        """The stored entry as reads return it; for ``user`` (history,
        inbox): a message they deleted for themselves with ``deleted`` set and
        no payload, and an EDIT of it with none either."""
        raw = txn.get(msg_id, db=self._msgs)
        if raw is None:
            raise StoreError(f"dangling message id {msg_id.hex()} (store corrupt)")
        m = _decode_record(msg_id, raw)
        kind = m.kind
        if kind == MessageKind.EDIT:
            # An EDIT entry holds no payload: it reads its target's, as it is now.
            ck = _t(m.conv)
            if user and txn.get(_t(user) + ck + _U64.pack(m.target), db=self._deleted) is not None:
                return replace(m, payload=b"")
            target = self._at(txn, ck, m.target)
            if target is None or (user and target.edited and self._edited_after_horizon(txn, ck, user, target.edited)):
                return replace(m, payload=b"")
            m = replace(m, payload=target.payload)
        elif user and kind == MessageKind.MESSAGE and m.seq:
            if txn.get(_t(user) + _t(m.conv) + _U64.pack(m.seq), db=self._deleted) is not None:
                m = replace(m, payload=b"", deleted=True)
            elif m.edited and self._edited_after_horizon(txn, _t(m.conv), user, m.edited):
                m = replace(m, payload=b"")
        return m

    def _edited_after_horizon(self, txn: _Txn, ck: bytes, user: str, edited: int) -> bool:
        """Was a message of conversation ``ck`` edited (at server time
        ``edited``) after ``user``'s view of it ended (base.horizon)?  Asked
        only of edited messages: a spans read and at most one entry."""
        h = horizon(self._spans_in(txn, ck, user), self._last_seq(txn, ck))
        if not h:
            return False
        left = self._at(txn, ck, h)  # (None: removed by retention -- withheld)
        return left is None or edited > left.server_time

    def _at(self, txn: _Txn, ck: bytes, seq: int) -> Optional[StoredMessage]:
        """The entry at ``seq`` of the conversation ``ck`` (None: no such seq)."""
        ref = txn.get(ck + _U64.pack(seq), db=self._convidx) if 0 < seq < _U64_MAX else None
        return _decode_record(ref[:16], txn.get(ref[:16], db=self._msgs)) if ref is not None else None

    def _amend(self, w: _Batch, op: AmendMessage) -> Result:
        txn = w.txn
        dkey = _t(op.sender) + _t(op.device) + _U64.pack(op.local_id)
        prior = w.prior(dkey)
        if prior is not None:
            msg_id, seq, server_time = _DEDUPE.unpack_from(prior)
            if prior[_DEDUPE.size :] == op.digest:
                return Duplicate(msg_id, seq, server_time)
            return Rejected(ErrorCode.DUPLICATE_CONFLICT)
        info = _conv_info(op.conv)
        if info is None:
            return Rejected(ErrorCode.BAD_REQUEST)
        ck = info[0]
        conv = w.conv(ck, info)
        if conv is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        last = w.last_seq(ck)
        target = self._at(txn, ck, op.target) if op.target <= last else None
        member, visible = True, True
        history_visible = info[1] is None and bool((self._group_flags(txn, ck) or 0) & _HISTORY_VISIBLE)
        if op.kind == MessageKind.DELETE:
            spans = self._spans_in(txn, ck, op.sender)
            member = bool(spans)
            visible = sees(spans, history_visible, op.target)
        elif op.sender != SYSTEM:
            member = op.sender in conv.member_set
            visible = sees(self._spans_in(txn, ck, op.sender), history_visible, op.target)
        code = amend_problem(op, member, target, visible)
        if code is not ErrorCode.OK:
            return Rejected(code)
        assert target is not None
        if txn.get(op.msg_id, db=self._msgs) is not None:
            return Rejected(ErrorCode.INTERNAL)
        if op.kind == MessageKind.DELETE:
            seq = 0
            txn.put(_t(op.sender) + ck + _U64.pack(op.target), b"", db=self._deleted)
            recipients = _Conv((op.sender,), (_t(op.sender),))
        else:
            seq = last + 1
            w.set_last_seq(ck, seq)
            txn.put(target.msg_id, _encode_entry(amended(target, op)), db=self._msgs)
            tk = ck + _U64.pack(op.target)
            if op.kind == MessageKind.RECALL:
                # Never unread again: the index names it by its kind byte.
                txn.put(tk, target.msg_id + bytes((int(MessageKind.RECALL),)) + target.sender.encode("ascii"), db=self._convidx)
            txn.put(ck + _U64.pack(seq), op.msg_id + bytes((int(op.kind),)) + op.sender.encode("ascii"), db=self._convidx)
            # Only to the members who may see the target (base.hidden_amend):
            # one spans read per member, for an amend (rare) of a group
            # without history access.
            recipients = conv
            if info[1] is None and not history_visible:
                keep = [i for i, u in enumerate(conv.users) if sees(self._spans_in(txn, ck, u), False, op.target)]
                if len(keep) != len(conv.users):
                    recipients = _Conv(tuple(conv.users[i] for i in keep), tuple(conv.uks[i] for i in keep))
        entry = amend_entry(op, seq)
        txn.put(op.msg_id, _encode_entry(entry), db=self._msgs)
        positions = w.fanout(recipients, _INBOX.pack(op.msg_id, op.server_time))
        for uk in recipients.uks:
            self._flag(txn, uk + ck, _HAS_MESSAGES, True)
        txn.put(dkey, _DEDUPE.pack(op.msg_id, seq, op.server_time) + op.digest, db=self._dedupe)
        w.dedupe_written(dkey[:-8])
        if op.event:
            w.append_event(op.server_time, message_event(replace(entry, payload=op.payload), [u for u, _ in positions]))
        return Appended(op.msg_id, seq, op.server_time, positions, entry.after_seq)

    # ------------------------------------------------- identity and clock

    def short_of_space(self) -> Optional[str]:
        """Why the store is not ready for writes by its disk, in words
        without paths -- its file system has under ``_LOW_SPACE`` (1 MiB)
        free, the figure under which an I/O error of a write is taken as a
        full disk -- else None (also when free space cannot be read).  The
        broker's ``/readyz`` answers 503 with it, whatever the last write
        did: a small write may succeed on a full disk, the next large one
        not (readiness flipped with each write)."""
        try:
            if _free_bytes(self._path) >= _LOW_SPACE:
                return None
        except OSError:
            return None
        return f"{_NO_SPACE} (under {_LOW_SPACE >> 20} MiB free): {_FREE_SPACE}"

    def halted(self) -> Optional[str]:
        st = self._log
        if st is None or self._env is None:
            return None
        failed = st.failed
        if failed is None:
            # ``unsettled`` is set for a moment under the write lock by
            # every settle and map resize, and cleared if they complete:
            # read only when no write is under way (held: not halted yet).
            if not self._wlock.acquire(blocking=False):
                return None
            try:
                if st.unsettled is None:
                    return None
                if st.resize_unsettled:
                    return f"the store writes no more for now: {st.unsettled}"
                full = _NO_SPACE in st.unsettled  # (a deferred commit on a full disk)
            finally:
                self._wlock.release()
            if full:
                return f"the store writes no more: {_NO_SPACE}: {_FREE_SPACE}, then restart the broker"
            return ("the store writes no more: a commit was cut short while the command log and LMDB disagreed;"
                    " restart the broker to recover")
        if _NO_SPACE in failed:
            return f"the store writes no more: {_NO_SPACE}: {_FREE_SPACE}, then restart the broker"
        return "the store writes no more: its command log or data file could not be flushed; restart the broker"

    def node_id(self) -> bytes:
        if self._env is None:
            raise StoreError("store is closed")
        return self._node

    def epoch(self) -> bytes:
        if self._env is None:
            raise StoreError("store is closed")
        return self._epoch

    def epochs(self) -> tuple[bytes, ...]:
        if self._env is None:
            raise StoreError("store is closed")
        return self._epochs

    def last_server_time(self) -> int:
        with self._read() as txn:
            return _U64.unpack(txn.get(b"hwm", db=self._meta))[0]

    @property
    def map_size(self) -> int:
        """The current LMDB map size in bytes (grows when the map fills)."""
        with self._read():
            assert self._env is not None
            return int(self._env.info()["map_size"])

    @property
    def durability(self) -> str:
        return self._durability

    def summary(self) -> StoreSummary:
        """What the store holds and how big it is (:class:`StoreSummary`
        gives the fields and their units), read in one read transaction:
        nothing is written, no lock taken (the broker's included: it is
        probed, see :meth:`broker_state`), no command log replayed.  Safe
        on a store a broker is running on; ``pimcore inspect`` prints it."""
        with self._read() as txn:
            env = self._env
            assert env is not None
            info = env.info()
            psize = int(env.stat()["psize"])
            hwm = txn.get(b"hwm", db=self._meta)
            entries: dict[str, Optional[int]] = {}
            for name in _DB_NAMES:
                db = getattr(self, "_" + name)
                entries[_DB_LABELS[name][0]] = None if db is None else int(txn.stat(db)["entries"])
        try:
            file_size = os.stat(os.path.join(self._path, "data.mdb")).st_size
        except OSError:
            file_size = 0
        broker, holder = self.broker_state(self._path)
        log_dir = os.path.join(self._path, "log")
        return StoreSummary(
            path=self._path,
            broker=broker,
            broker_holder=holder,
            schema=self._schema,
            node_id=self._node.hex(),
            epoch=self._epoch.hex(),
            epochs=tuple(e.hex() for e in self._epochs),
            last_server_time=_U64.unpack(hwm)[0] if hwm is not None else 0,
            map_size=int(info["map_size"]),
            page_size=psize,
            pages_used=int(info["last_pgno"]) + 1,
            bytes_used=(int(info["last_pgno"]) + 1) * psize,
            file_size=file_size,
            last_txnid=int(info["last_txnid"]),
            readers=int(info["num_readers"]),
            max_readers=int(info["max_readers"]),
            entries=entries,
            log=wal.summarize(log_dir) if os.path.isdir(log_dir) else None,
        )

    @staticmethod
    def broker_state(path: Union[str, "os.PathLike[str]"]) -> tuple[str, Optional[str]]:
        """Does a process hold the store's ``broker.lock``?  (``"running"``,
        who in words as the holder wrote it in the file) if so,
        (``"not running"``, None) if not, (``"unknown"``, None) if that cannot
        be told without taking the lock.  A probe, not a lock attempt (a
        shared flock, even for a moment, would refuse a broker starting
        then): Linux lists every flock in ``/proc/locks`` by device and
        inode.  The file is opened read-only, never created."""
        lock = os.path.join(os.fspath(path), "broker.lock")
        try:
            st = os.stat(lock)
        except FileNotFoundError:
            return "not running", None  # (every broker makes it)
        except OSError:
            return "unknown", None
        try:
            with open("/proc/locks", encoding="ascii", errors="replace") as f:
                table = f.read()
        except OSError:
            return "unknown", None
        dev_ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        held = any(
            len(words) > 5 and words[1] == "FLOCK" and words[5] == dev_ino
            for words in (line.split() for line in table.splitlines())
        )
        if not held:
            return "not running", None
        try:
            with open(lock, "rb", buffering=0) as f:
                holder = LmdbStore._lock_holder(f)  # type: ignore[arg-type]
        except OSError:
            holder = "another process"
        return "running", holder

    # -------------------------------------------------------------- writes

    def _take_hot(self, txn: _Txn) -> _Hot:
        """The cache the last commit kept if it still equals the store (see
        :class:`_Hot`), else a new one.  Either way the store lets go of it
        until this commit succeeds: a failed or re-run commit starts empty."""
        hot, self._hot = self._hot, None
        # (In an open deferred transaction the last batch kept the cache
        # stamped with this very transaction's id.)
        if hot is None or not _TXN_IDS or hot.txnid + (0 if self._continuing else 1) != txn.id():
            return _Hot()
        hot.trim()
        return hot

    def _apply_batch(self, txn: _Txn, ops: Sequence[Op], staging: bool, kept: list[_Hot]) -> tuple[Result, ...]:
        """Apply a batch's ``ops`` in ``txn``; their results.  A pure
        function of the transaction: it is run again from scratch if the map
        has to grow (see _write), or from the batch's log record
        (:meth:`_rerun`).  (The cache it takes was let go of by the first
        run: a run again starts from an empty one.)  ``staging``: the
        records of the common-case messages are staged and put together
        (:class:`_Batch`); raises :class:`_MsgIdTaken` then for a msg_id
        stored already.  ``kept`` gets the cache to keep, if any."""
        kept.clear()
        w = _Batch(self, txn, self._take_hot(txn), staging)
        stored = w.hwm = _U64.unpack(txn.get(b"hwm", db=self._meta))[0]
        results: list[Result] = []
        wrote = False
        i, n = 0, len(ops)
        while i < n:
            op = ops[i]
            if type(op) is NewMessage:
                # The hot path: the run of common-case NewMessage ops
                # from here in one fast-path call (pimcore._pure.fanout),
                # which appends their Appended results and moves w.hwm;
                # it stops at the first op it does not take, which then
                # takes the general path (_apply) below.
                j = _store_plain_run(ops, i, NewMessage, w, self._dedupe, _conv_info, _device_key,
                                     _record_ids, _appended, results)
                if j != i:
                    wrote = True
                    i = j
                    continue
            i += 1
            result = self._apply(w, op)
            kind = type(result)
            if kind is Appended:
                wrote = True
                if result.server_time > w.hwm:  # type: ignore[union-attr]
                    w.hwm = result.server_time  # type: ignore[union-attr]
            elif kind is Acked or kind is Touched or (kind is ReadMarked and result.changed):  # type: ignore[union-attr]
                wrote = True
            elif kind is GroupChanged and result.entries:  # type: ignore[union-attr]
                wrote = True  # (the entries moved the hwm themselves)
            elif kind is EventAppended or kind is EventsAcked:
                wrote = True
            elif kind is ConsumerDeleted and result.deleted:  # type: ignore[union-attr]
                wrote = True  # (deleted False: nothing changed)
            results.append(result)
        w.flush()
        if w.hwm != stored:
            txn.put(b"hwm", _U64.pack(w.hwm), db=self._meta)
        # Keep the cache only if this transaction certainly changes the
        # store (an Appended stored a message, Acked/Touched always write
        # the device, a changed ReadMarked the marker): only then does it
        # commit as transaction txn.id(), which the next commit checks.
        if wrote and _TXN_IDS:
            w.hot.txnid = txn.id()
            kept.append(w.hot)
        return tuple(results)

    def _rerun(self, data: bytes, staging: list[bool], txn: _Txn) -> None:
        """Run a batch again into ``txn`` from its log record ``data`` (the
        bytes a restart replays), staged if its accepted run was
        (``staging``, shared with it: a reused msg_id turns both off).

        Why not the function that ran it: that holds the batch's ops, so a
        deferred transaction kept every op of up to ``defer_batches``
        batches (``defer_ops`` ops) alive until LMDB's commit, as container
        objects the collector promotes and traverses, all freed at once by
        the commit (about 10 ms of the broker's time at 50 x 16).  The
        record is one bytes object per batch, and a run again is rare (a
        map that grows, a batch that fails).  Measured, 7 alternating rounds
        of ``pimcore bench --shape 50x16 --durability log``: the broker's
        heap at the end 52.9-58.1 MiB against 56.2-64.0; CPU per send the
        same within the noise (BENCHMARKS.md)."""
        try:
            self._apply_batch(txn, _decode_ops(data), staging[0], [])
        except _MsgIdTaken:
            staging[0] = False
            raise

    def commit(self, batch: WriteBatch) -> tuple[Result, ...]:
        ops = batch.ops
        kept: list[_Hot] = []

        staging = [True]

        def apply(txn: _Txn) -> tuple[Result, ...]:
            return self._apply_batch(txn, ops, staging[0], kept)

        def run(txn: _Txn) -> tuple[Result, ...]:
            try:
                return apply(txn)
            except _MsgIdTaken:
                # A reused msg_id (a broken clock): _write runs the batch
                # again at once, with every record put at once, which rejects
                # just that op.
                staging[0] = False
                raise

        def committed() -> None:
            if kept:
                self._hot = kept[0]

        st = self._log
        try:
            logged = (_LogRecord(_encode_ops(ops), len(ops) >= st.overlap_ops, len(ops))
                      if st is not None and not st.replaying else None)
            if logged is not None:
                logged.rerun = functools.partial(self._rerun, logged.data, staging)
        except StoreError as exc:
            raise StoreError(f"batch {batch.batch_id} not committed: {exc}") from None
        try:
            return self._write(run, committed, logged)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"batch {batch.batch_id} not committed: {exc!r}") from exc

    def _apply(self, w: _Batch, op: Op) -> Result:
        kind = type(op)
        if kind is NewMessage:  # may run while records are staged
            # (Its common case was offered to _store_plain_run first.)
            if malformed(op):
                return Rejected(ErrorCode.BAD_REQUEST)
            return self._new_message(w, op)  # type: ignore[arg-type]
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise TypeError(f"not a store op: {kind.__name__}")
        if (w.s_msgs or w.s_devices) and kind not in _STAGE_SAFE:
            w.put_staged()  # this op may read what the earlier ones staged
        if malformed(op):
            return Rejected(ErrorCode.BAD_REQUEST)
        return handler(self, w, op)

    def _new_message(self, w: _Batch, op: NewMessage) -> Result:
        txn = w.txn
        # Dedupe first: a retry of a stored message is answered with the
        # original identity whatever happened to the conversation since.
        # (This is w.prior written out: it runs for every message.)
        dk = _device_key(op.sender, op.device)
        dkey = dk + _U64.pack(op.local_id)
        prior = w.s_dedupe.get(dkey)
        if prior is None:
            prior = _dedupe_get(txn, self._dedupe, dkey)
        if prior is not None:
            msg_id, seq, server_time = _DEDUPE.unpack_from(prior)
            if prior[_DEDUPE.size :] == op.digest:
                return Duplicate(msg_id, seq, server_time)
            return Rejected(ErrorCode.DUPLICATE_CONFLICT)
        info = _conv_info(op.conv)
        if info is None:
            return Rejected(ErrorCode.BAD_REQUEST)
        ck = info[0]
        hot = w.hot
        conv = hot.convs.get(ck)
        if conv is None:
            conv = w.conv(ck, info)
            if conv is None:
                return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        if op.sender not in conv.member_set and op.sender != SYSTEM:  # the system may post anywhere
            return Rejected(ErrorCode.NOT_MEMBER)
        if 0 < op.after_seq <= conv.purged:
            return Rejected(ErrorCode.PURGED)  # (answers a purged group's history: base.NewMessage)
        # Inside the write transaction nobody else can take this seq: the
        # conversation stays gap-free and strictly increasing.  (w.last_seq
        # and w.set_last_seq written out.)
        last = hot.seqs.get(ck)
        if last is None:
            last = w.last_seq(ck)
        seq = last + 1
        after_seq = op.after_seq if op.after_seq < seq else last
        msg_id = op.msg_id
        staging = w.staging
        plain = not (op.mentions or op.mention_all)
        w.dedupe_written(dk)  # (before staging: the bound of _Hot.dmax)
        if staging and plain:
            # The three records in one fast-path call (pimcore._pure.fanout).
            entry = _impl.stage_message(op, seq, after_seq, _record_ids(ck, dk), ck, dkey, w.s_msgs, w.s_convidx,
                                        w.s_dedupe)
        else:
            record = _encode_record(seq, op, after_seq)
            entry = _INBOX.pack(msg_id, op.server_time)
            if staging:
                w.s_msgs.append((msg_id, record))
                w.s_convidx.append((ck + _U64.pack(seq), msg_id + op.sender.encode("ascii")))
            else:
                if not txn.put(msg_id, record, db=self._msgs, overwrite=False):
                    return Rejected(ErrorCode.INTERNAL)  # msg_id reused: nothing written yet
                txn.put(ck + _U64.pack(seq), msg_id + op.sender.encode("ascii"), db=self._convidx)
        hot.seqs[ck] = seq
        w._dirty_seqs.add(ck)
        # Every member's next inbox position; the entries are written at flush.
        positions = w.fanout(conv, entry)
        if not conv.flagged:
            # The has-messages flag is never cleared (removing a member clears
            # only the member bit), so once set for every member it stays.
            for uk in conv.uks:
                self._flag(txn, uk + ck, _HAS_MESSAGES, True)
            conv.flagged = True
        if staging:
            if not plain:
                w.s_dedupe[dkey] = _DEDUPE.pack(op.msg_id, seq, op.server_time) + op.digest
        else:
            txn.put(dkey, _DEDUPE.pack(op.msg_id, seq, op.server_time) + op.digest, db=self._dedupe)
        if op.mentions or op.mention_all or op.event:
            m = StoredMessage(
                op.msg_id, op.conv, seq, op.sender, op.device, op.local_id, op.client_time, op.server_time, op.payload,
                0, after_seq, mentions=op.mentions, mention_all=op.mention_all,
            )
            recipients = [u for u, _ in positions]
            mentioned = self._index_mentions(txn, m, recipients, ck)
            if op.event:
                muted = [u for u in recipients if (self._settings_in(txn, _t(u) + ck)[1])]
                w.append_event(op.server_time, message_event(m, recipients, muted, mentioned))
        return _appended(op.msg_id, seq, op.server_time, positions, after_seq)

    # ------------------------------------------------ conversation list

    def _index_mentions(self, txn: _Txn, m: StoredMessage, recipients: list[str], ck: bytes) -> list[str]:
        """Write the mention index of ``m``; returns who it mentions."""
        mentioned = mentioned_recipients(m, recipients)
        sk = _U64.pack(m.seq)
        for u in mentioned:
            txn.put(_t(u) + ck + sk, b"", db=self._mentionidx)
        return mentioned

    def _settings_in(self, txn: _Txn, key: bytes) -> tuple[bool, bool, int]:
        raw = txn.get(key, db=self._convset)
        if raw is None:
            return (False, False, 0)
        return (bool(raw[0] & 1), bool(raw[0] & 2), _U64.unpack_from(raw, 1)[0])

    def _entry_in(self, txn: _Txn, user: str, conv: str, conv_last: int) -> ConversationEntry:
        uk, ck = _t(user), _t(conv)
        spans = self._spans_in(txn, ck, user)
        last_seq = last_visible(spans, conv_last)
        last = None
        # The last message is the last MESSAGE/JOINED/LEFT entry, as it is now
        # (RECALL/EDIT entries amend it in place): walk back over amend
        # entries.  The convidx value's 17th byte says EDIT (4) or RECALL (3);
        # 3 is also a recalled message's, so that one loads the record.
        seq, floor = last_seq, last_message_floor(spans)
        while seq >= floor and seq:
            ref = txn.get(ck + _U64.pack(seq), db=self._convidx)
            if ref is None:
                # (A purge or retention may have removed the last seq too:
                # then it is at or below the history floor.)
                if seq == last_seq and seq > self._retention_in(txn, ck)[2]:
                    raise StoreError(f"{conv!r} has no seq {last_seq} (store corrupt)")
                break  # removed by retention
            if not (len(ref) > 16 and ref[16] == MessageKind.EDIT):
                # Loaded for ``user``, as history returns it to them: one they
                # deleted for themselves is `deleted`, no payload (else every
                # ConvUpdate brought it back into their devices' views).
                m = self._load(txn, ref[:16], user)
                if m.kind not in AMENDING:
                    last = m
                    break
            seq -= 1
        raw = txn.get(uk + ck, db=self._reads)
        marker = _U64.unpack(raw)[0] if raw is not None else 0
        gone = self._deleted_after(txn, user, ck, marker)
        mentions = 0
        prefix = uk + ck
        for key, _ in self._scan(txn, self._mentionidx, prefix, prefix + _U64.pack(marker + 1)):
            seq = _U64.unpack_from(key, len(prefix))[0]
            if seq > last_seq:
                break
            if seq in gone:
                continue  # deleted for themselves: no mention, as a recalled one
            # Not once recalled (the convidx value's kind byte says RECALL) or
            # removed by retention (no convidx entry).
            ref = txn.get(ck + _U64.pack(seq), db=self._convidx)
            mentions += ref is not None and not (len(ref) > 16 and ref[16] == MessageKind.RECALL)
        unread = self._count_unread(txn, user, ck, marker, gone)
        return conversation_entry(conv, last, marker, unread, mentions, self._settings_in(txn, uk + ck))

    def _list_access_in(self, txn: _Txn, user: str, conv: str) -> ErrorCode:
        ck = _t(conv)
        if not is_direct(conv) and txn.get(ck, db=self._groups) is None:
            return ErrorCode.UNKNOWN_CONVERSATION
        if txn.get(_t(user) + ck, db=self._userconvs) is not None:
            return ErrorCode.OK
        pair = direct_members(conv)
        return ErrorCode.OK if pair is not None and user in pair else ErrorCode.NOT_MEMBER

    def _set_conversation(self, w: _Batch, op: SetConversation) -> Result:
        txn = w.txn
        code = self._list_access_in(txn, op.user, op.conv)
        if code is not ErrorCode.OK:
            return Rejected(code)
        ck = _t(op.conv)
        key = _t(op.user) + ck
        old = self._settings_in(txn, key)
        conv_last = w.last_seq(ck)
        new = new_settings(op, old, last_visible(self._spans_in(txn, ck, op.user), conv_last))
        if new != old:
            if new == (False, False, 0):
                txn.delete(key, db=self._convset)
            else:
                txn.put(key, bytes((int(new[0]) | int(new[1]) << 1,)) + _U64.pack(new[2]), db=self._convset)
        return ConversationSet(op.user, op.conv, self._entry_in(txn, op.user, op.conv, conv_last), new != old)

    def _read_conversations(self, op: ReadConversations) -> ConversationsPage:
        with self._read() as txn:
            return self._read_conversations_in(txn, op)

    def _read_conversations_in(self, txn: _Txn, op: ReadConversations) -> ConversationsPage:
        if not (valid_id(op.user) and type(op.limit) is int and isinstance(op.cursor, bytes)
                and (op.conv == "" or valid_conversation(op.conv))):
            return ConversationsPage(ErrorCode.BAD_REQUEST, ())
        if op.conv:
            code = self._list_access_in(txn, op.user, op.conv)
            if code is not ErrorCode.OK:
                return ConversationsPage(code, ())
            return ConversationsPage(ErrorCode.OK, (self._entry_in(txn, op.user, op.conv, self._last_seq(txn, _t(op.conv))),))
        uk = _t(op.user)
        entries = []
        for key, _ in self._scan(txn, self._userconvs, uk):
            conv = _take_t(key, len(uk))[0]
            entries.append(self._entry_in(txn, op.user, conv, self._last_seq(txn, key[len(uk):])))
        return conversation_page(entries, op)

    def _register(self, w: _Batch, user: str, device: str, position: int, now: int) -> tuple[int, bool]:
        """Shared by Touch and Ack: create at the floor if unknown, move
        forward to ``position`` clamped to the head, refresh last_seen."""
        uk = _t(user)
        dk = uk + _t(device)
        head, floor = w.head_floor(uk)
        # Read through the cache, written at flush (see _Batch.s_devices).
        devices = w.hot.devices
        held = devices.get(dk)
        if held is not None:
            old_pos, old_seen = held
            new = False
        else:
            raw = w.txn.get(dk, db=self._devices)
            if raw is None:
                old_pos, old_seen, new = floor, now, True
            else:
                old_pos, old_seen = _DEVICE.unpack(raw)
                new = False
        pos = max(old_pos, min(position, head))
        seen = max(old_seen, now)
        devices[dk] = (pos, seen)
        w.s_devices[dk] = _DEVICE.pack(pos, seen)
        return pos, new

    def _ack(self, w: _Batch, op: AckPosition) -> Result:
        pos, _ = self._register(w, op.user, op.device, op.position, op.now)
        return _acked(op.user, op.device, pos)

    def _touch(self, w: _Batch, op: TouchDevice) -> Result:
        pos, new = self._register(w, op.user, op.device, op.position, op.now)
        return Touched(op.user, op.device, pos, new)

    def _mark_read(self, w: _Batch, op: MarkRead) -> Result:
        txn = w.txn
        info = _conv_info(op.conv)
        assert info is not None  # malformed() checked the id
        ck = info[0]
        conv = w.conv(ck, info)
        if conv is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        uk = _t(op.user)
        spans = self._spans_in(txn, ck, op.user)
        if not spans:
            return Rejected(ErrorCode.NOT_MEMBER)
        last = last_visible(spans, w.last_seq(ck))
        rk = uk + ck
        raw = txn.get(rk, db=self._reads)
        old = _U64.unpack(raw)[0] if raw is not None else 0
        new = max(old, min(op.seq, last))
        if new != old:
            txn.put(rk, _U64.pack(new), db=self._reads)
        return ReadMarked(op.user, op.conv, new, last, self._count_unread(txn, op.user, ck, new), new != old)

    def _reclaim(self, w: _Batch, op: Reclaim) -> Result:
        # Scans and rewrites inboxmeta itself: bring it up to date first.
        w.sync()
        txn = w.txn
        # Pass 1: forget stale devices; remember each user's minimum position
        # over the devices that remain (keyed by T(user)).
        seen_cutoff = op.now - op.device_retention
        stale: list[bytes] = []
        min_pos: dict[bytes, int] = {}
        for key, value in txn.cursor(self._devices):
            pos, last_seen = _DEVICE.unpack(value)
            if last_seen < seen_cutoff:
                stale.append(key)
                continue
            uk = key[: 1 + key[0]]
            held = min_pos.get(uk)
            min_pos[uk] = pos if held is None else min(held, pos)
        for key in stale:
            txn.delete(key, db=self._devices)

        # Pass 2: each inbox loses its longest prefix of reclaimable entries.
        # Entries are floor+1..head but for holes, so the prefix is walked in order.
        age_cutoff = op.now - op.max_age
        removed = 0
        new_floors: list[tuple[bytes, int, int]] = []
        for uk, value in txn.cursor(self._inboxmeta):
            head, floor = _HEAD_FLOOR.unpack(value)
            # No device left: nothing was acked by "every device".
            acked = min_pos.get(uk, floor)
            # Holes (entries retention or a purge removed) count as removed.
            pos = head
            doomed: list[bytes] = []
            for key, entry in self._scan(txn, self._inbox, uk, uk + _U64.pack(floor + 1)):
                at = _U64.unpack_from(key, len(uk))[0]
                if not (at <= acked or _INBOX.unpack(entry)[1] < age_cutoff):
                    pos = at - 1
                    break
                doomed.append(key)
            if pos != floor:
                for key in doomed:
                    txn.delete(key, db=self._inbox)
                new_floors.append((uk, head, pos))
                removed += len(doomed)
        # Written after the scan: no puts into a database under iteration.
        for uk, head, floor in new_floors:
            txn.put(uk, _HEAD_FLOOR.pack(head, floor), db=self._inboxmeta)

        # Host events: the longest prefix acked by every consumer (none yet:
        # nothing is acked) or older than max_age.
        cursors = [_U64.unpack(v)[0] for _, v in txn.cursor(self._evcursors)]
        acked = min(cursors) if cursors else 0
        doomed = []
        for key, value in txn.cursor(self._events):
            if not (_U64.unpack(key)[0] <= acked or _I64.unpack_from(value)[0] < age_cutoff):
                break
            doomed.append(key)
        for key in doomed:
            txn.delete(key, db=self._events)
        return Reclaimed(removed, len(stale), len(doomed))

    # --------------------------------------------------------- host events

    def _append_event_op(self, w: _Batch, op: AppendEvent) -> Result:
        return EventAppended(w.append_event(op.now, op.data))

    def _ev_last(self, txn: _Txn) -> int:
        raw = txn.get(b"evlast", db=self._meta)
        return _U64.unpack(raw)[0] if raw is not None else 0

    def _ack_events(self, w: _Batch, op: AckEvents) -> Result:
        txn = w.txn
        last = w.ev_last if w.ev_last >= 0 else self._ev_last(txn)
        key = _t(op.consumer)
        raw = txn.get(key, db=self._evcursors)
        cursor = max(_U64.unpack(raw)[0] if raw is not None else 0, min(op.upto, last))
        txn.put(key, _U64.pack(cursor), db=self._evcursors)
        return EventsAcked(op.consumer, cursor)

    def _delete_consumer(self, w: _Batch, op: DeleteConsumer) -> Result:
        # (txn.delete answers whether the key was there.)
        return ConsumerDeleted(op.consumer, bool(w.txn.delete(_t(op.consumer), db=self._evcursors)))

    def _read_events(self, op: ReadEvents) -> Result:
        with self._read() as txn:
            return self._read_events_in(txn, op)

    def _read_events_in(self, txn: _Txn, op: ReadEvents) -> Result:
        if not (valid_id(op.consumer) and (op.after is None or type(op.after) is int) and type(op.limit) is int):
            return Rejected(ErrorCode.BAD_REQUEST)
        raw = txn.get(_t(op.consumer), db=self._evcursors)
        cursor = _U64.unpack(raw)[0] if raw is not None else 0
        after = cursor if op.after is None else op.after
        last = self._ev_last(txn)
        page = []
        if op.limit > 0 and after < last:
            for key, value in self._scan(txn, self._events, b"", _U64.pack(max(after, 0) + 1)):
                page.append(StoredEvent(_U64.unpack(key)[0], _I64.unpack_from(value)[0], value[8:]))
                if len(page) >= op.limit:
                    break
        consumers: tuple[tuple[str, int], ...] = ()
        if op.limit == 0:
            consumers = tuple(sorted((bytes(k)[1:].decode("ascii"), _U64.unpack(v)[0])
                                     for k, v in txn.cursor(self._evcursors)))
        return EventsPage(cursor, tuple(page), last, consumers)

    # ---------------------------------------------------------- group admin

    def _create_group(self, w: _Batch, op: CreateGroup) -> Result:
        txn = w.txn
        ck = _t(op.conv)
        if txn.get(ck, db=self._groups) is not None:
            return Rejected(ErrorCode.ALREADY_EXISTS)
        txn.put(ck, _GROUP.pack(op.now, _HISTORY_VISIBLE if op.history_visible else 0), db=self._groups)
        open_span = _SPAN.pack(0, _U64_MAX)
        for user in op.members:
            uk = _t(user)
            txn.put(ck + uk, b"", db=self._members)
            txn.put(ck + uk, open_span, db=self._spans)
            self._flag(txn, uk + ck, _MEMBER, True)
        w.forget_conv(ck)
        return GroupChanged(op.conv, tuple(sorted(set(op.members))))

    def _change_members(self, w: _Batch, op: Union[AddMembers, RemoveMembers], *, last_may_leave: bool = False) -> Result:
        """AddMembers / RemoveMembers.  A removal that would leave no member
        is refused as a whole (BAD_REQUEST, see :class:`RemoveMembers`),
        unless ``last_may_leave`` (a purge of the user's data)."""
        txn = w.txn
        ck = _t(op.conv)
        if txn.get(ck, db=self._groups) is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        if type(op) is RemoveMembers and not last_may_leave:
            # Stops at the first member the op keeps: no full scan of a big group.
            n = len(ck)
            members = (_take_t(key, n)[0] for key, _ in self._scan(txn, self._members, ck))
            if removes_everyone(members, op.users):
                return Rejected(ErrorCode.BAD_REQUEST)
        if any(txn.get(st[0], db=self._msgs) is not None for st in op.stamps):
            return Rejected(ErrorCode.INTERNAL)  # a broken clock: nothing changed
        add = type(op) is AddMembers
        kind = MessageKind.JOINED if add else MessageKind.LEFT
        info = (ck, None)
        clock = max(op.now, w.hwm + 1)
        payload = op.by.encode("utf-8")
        entries = []
        positions = []
        for i, user in enumerate(op.users):
            uk = _t(user)
            mk = ck + uk
            if (txn.get(mk, db=self._members) is not None) == add:
                continue  # no change, no entry
            if op.stamps:
                msg_id, server_time = op.stamps[i]
            else:
                # Made here (no broker clock): ids no broker makes (its node
                # id is random), times strictly above every stored one.
                while True:
                    msg_id, server_time = _U64.pack(clock) + bytes(8), clock
                    clock += 1
                    if txn.get(msg_id, db=self._msgs) is None:
                        break
            seq = w.last_seq(ck) + 1
            raw = txn.get(mk, db=self._spans) or b""
            if add:
                txn.put(mk, b"", db=self._members)
                txn.put(mk, raw + _SPAN.pack(seq, _U64_MAX), db=self._spans)
                self._flag(txn, uk + ck, _MEMBER, True)
                w.forget_conv(ck)
                conv = w.conv(ck, info)  # the joiner learns it too
            else:
                conv = w.conv(ck, info)  # before the removal: the leaver learns it too
            assert conv is not None
            m = StoredMessage(msg_id, op.conv, seq, user, "", 0, server_time, server_time, payload, int(kind), seq - 1)
            txn.put(msg_id, _encode_entry(m), db=self._msgs)
            w.set_last_seq(ck, seq)
            txn.put(ck + _U64.pack(seq), msg_id + bytes((int(kind),)) + user.encode("ascii"), db=self._convidx)
            positions.append(w.fanout(conv, _INBOX.pack(msg_id, server_time)))
            if op.event:
                w.append_event(server_time, message_event(m, [u for u, _ in positions[-1]]))
            for member_key in conv.uks:
                self._flag(txn, member_key + ck, _HAS_MESSAGES, True)
            if not add:
                joined = _SPAN.unpack_from(raw, len(raw) - _SPAN.size)[0]
                txn.put(mk, raw[: len(raw) - _SPAN.size] + _SPAN.pack(joined, seq), db=self._spans)
                txn.delete(mk, db=self._members)
                self._flag(txn, uk + ck, _MEMBER, False)
                w.forget_conv(ck)
            if server_time > w.hwm:
                w.hwm = server_time
            entries.append(m)
        # Later ops of this batch (and later batches) must see the new members.
        w.forget_conv(ck)
        return GroupChanged(op.conv, self._members_in(txn, info) or (), tuple(entries), tuple(positions))

    # --------------------------------------------------------------- reads

    def conversation_exists(self, conv: str) -> bool:
        with self._read() as txn:
            if not valid_conversation(conv):
                return False
            return is_direct(conv) or txn.get(_t(conv), db=self._groups) is not None

    def members(self, conv: str) -> tuple[str, ...]:
        with self._read() as txn:
            info = _conv_info(conv)
            return (self._members_in(txn, info) or ()) if info is not None else ()

    def is_member(self, conv: str, user: str) -> bool:
        with self._read() as txn:
            if not (valid_conversation(conv) and valid_id(user)):
                return False
            pair = direct_members(conv)
            if pair is not None:
                return user in pair
            return txn.get(_t(conv) + _t(user), db=self._members) is not None

    def last_seq(self, conv: str) -> int:
        with self._read() as txn:
            if not valid_conversation(conv):
                return 0
            return self._last_seq(txn, _t(conv))

    def history(self, conv: str, from_seq: int, limit: int, backward: bool = False) -> list[StoredMessage]:
        with self._read() as txn:
            return self._history_in(txn, conv, from_seq, limit, backward)

    def _history_in(self, txn: _Txn, conv: str, from_seq: int, limit: int, backward: bool) -> list[StoredMessage]:
        if not valid_conversation(conv) or limit <= 0:
            return []
        ck = _t(conv)
        last = self._last_seq(txn, ck)
        floor = self._retention_in(txn, ck)[2]
        # Seqs are exactly floor+1..last (gap-free), so a page is a seq range.
        if backward:
            top = last if from_seq <= 0 else min(from_seq - 1, last)
            seqs = range(top, max(top - limit, floor), -1)
        else:
            start = max(from_seq, floor) + 1
            seqs = range(start, min(last, start + limit - 1) + 1)
        page = []
        for seq in seqs:
            ref = txn.get(ck + _U64.pack(seq), db=self._convidx)
            if ref is None:
                raise StoreError(f"{conv!r} has no seq {seq} (store corrupt)")
            page.append(self._load(txn, ref[:16]))
        return page

    def message(self, msg_id: bytes) -> Optional[StoredMessage]:
        with self._read() as txn:
            if not isinstance(msg_id, bytes) or len(msg_id) != 16:
                return None
            raw = txn.get(msg_id, db=self._msgs)
            return _decode_record(msg_id, raw) if raw is not None else None

    def inbox_head(self, user: str) -> int:
        with self._read() as txn:
            return self._head_floor(txn, _t(user))[0] if valid_id(user) else 0

    def inbox_floor(self, user: str) -> int:
        with self._read() as txn:
            return self._head_floor(txn, _t(user))[1] if valid_id(user) else 0

    def inbox_range(self, user: str, after: int, limit: int) -> list[tuple[int, StoredMessage]]:
        with self._read() as txn:
            return self._inbox_in(txn, user, after, limit)

    def _inbox_in(self, txn: _Txn, user: str, after: int, limit: int) -> list[tuple[int, StoredMessage]]:
        if not valid_id(user) or limit <= 0 or after >= _U64_MAX:
            return []
        uk = _t(user)
        out: list[tuple[int, StoredMessage]] = []
        for key, entry in self._scan(txn, self._inbox, uk, uk + _U64.pack(max(after, 0) + 1)):
            out.append((_U64.unpack_from(key, len(uk))[0], self._load(txn, entry[:16], user)))
            if len(out) >= limit:
                break
        return out

    def device(self, user: str, device: str) -> Optional[DeviceState]:
        with self._read() as txn:
            if not (valid_id(user) and valid_id(device)):
                return None
            raw = txn.get(_t(user) + _t(device), db=self._devices)
            if raw is None:
                return None
            pos, last_seen = _DEVICE.unpack(raw)
            return DeviceState(user, device, pos, last_seen)

    def devices(self, user: str) -> list[DeviceState]:
        with self._read() as txn:
            if not valid_id(user):
                return []
            return self._devices_in(txn, user)

    def _devices_in(self, txn: _Txn, user: str) -> list[DeviceState]:
        uk = _t(user)
        found = [
            DeviceState(user, _take_t(key, len(uk))[0], *_DEVICE.unpack(value))
            for key, value in self._scan(txn, self._devices, uk)
        ]
        return sorted(found, key=lambda d: d.device)

    def _devices_page_in(self, txn: _Txn, user: str) -> Result:
        if not valid_id(user):
            return Rejected(ErrorCode.BAD_REQUEST)
        return DevicesPage(user, tuple(self._devices_in(txn, user)))

    def read_marker(self, user: str, conv: str) -> int:
        with self._read() as txn:
            if not (valid_id(user) and valid_conversation(conv)):
                return 0
            raw = txn.get(_t(user) + _t(conv), db=self._reads)
            return _U64.unpack(raw)[0] if raw is not None else 0

    def read_positions(self, conv: str) -> dict[str, int]:
        with self._read() as txn:
            info = _conv_info(conv)
            if info is None:
                return {}
            ck = info[0]
            out = {}
            for user in self._members_in(txn, info) or ():
                raw = txn.get(_t(user) + ck, db=self._reads)
                out[user] = _U64.unpack(raw)[0] if raw is not None else 0
            return out

    def unread(self, user: str, conv: str) -> int:
        with self._read() as txn:
            if not (valid_id(user) and valid_conversation(conv)):
                return 0
            ck = _t(conv)
            raw = txn.get(_t(user) + ck, db=self._reads)
            marker = _U64.unpack(raw)[0] if raw is not None else 0
            return self._count_unread(txn, user, ck, marker)

    def spans(self, conv: str, user: str) -> tuple[tuple[int, int], ...]:
        with self._read() as txn:
            if not (valid_conversation(conv) and valid_id(user)):
                return ()
            return self._spans_in(txn, _t(conv), user)

    def history_visible(self, conv: str) -> bool:
        with self._read() as txn:
            if not valid_conversation(conv) or is_direct(conv):
                return False
            return bool((self._group_flags(txn, _t(conv)) or 0) & _HISTORY_VISIBLE)

    def conversations(self, user: str) -> list[str]:
        with self._read() as txn:
            if not valid_id(user):
                return []
            uk = _t(user)
            return sorted(_take_t(key, len(uk))[0] for key, _ in self._scan(txn, self._userconvs, uk))

    # ------------------------------------------------------- read requests

    def read(self, ops: Iterable[ReadOp]) -> tuple[Result, ...]:
        """Every read op of one request in ONE read transaction: a login
        sees its head, position and read states at one point in time, and
        pays one transaction, not one per conversation."""
        ops = tuple(ops)
        if any(type(op) is ReadPresence for op in ops):
            # Built on the public read methods (one transaction each); the
            # core asks it alone, and presence needs no single snapshot.
            return Store.read(self, ops)
        with self._read() as txn:
            out: list[Result] = []
            for op in ops:
                kind = type(op)
                if kind is LoadSession:
                    out.append(self._session_in(txn, op))  # type: ignore[arg-type]
                elif kind is ReadInbox:
                    out.append(InboxPage(op.user, tuple(self._inbox_in(txn, op.user, op.after, op.limit))))  # type: ignore[union-attr,arg-type]
                elif kind is ReadHistory:
                    out.append(self._read_history_in(txn, op))  # type: ignore[arg-type]
                elif kind is ReadReaders:
                    out.append(self._read_readers_in(txn, op))  # type: ignore[arg-type]
                elif kind is ReadEvents:
                    out.append(self._read_events_in(txn, op))  # type: ignore[arg-type]
                elif kind is ReadDevices:
                    out.append(self._devices_page_in(txn, op.user))  # type: ignore[union-attr]
                elif kind is ReadDedupe:
                    out.append(Deduped(self._deduped_in(txn, op.sender, op.device, op.local_id)))  # type: ignore[union-attr]
                elif kind is ReadConversations:
                    out.append(self._read_conversations_in(txn, op))  # type: ignore[arg-type]
                elif kind is ReadRetention:
                    out.append(self._read_retention_in(txn, op))  # type: ignore[arg-type]
                else:
                    raise TypeError(f"not a read op: {kind.__name__}")
            return tuple(out)

    def deduped(self, sender: str, device: str, local_id: int) -> bool:
        with self._read() as txn:
            return self._deduped_in(txn, sender, device, local_id)

    def _deduped_in(self, txn: _Txn, sender: str, device: str, local_id: int) -> bool:
        if not (0 <= local_id < 1 << 64 and valid_id(sender) and valid_id(device)):
            return False
        return _dedupe_get(txn, self._dedupe, _t(sender) + _t(device) + _U64.pack(local_id)) is not None

    def _read_history(self, op: ReadHistory) -> HistoryPage:
        with self._read() as txn:
            return self._read_history_in(txn, op)

    def _read_readers(self, op: ReadReaders) -> ReadersPage:
        with self._read() as txn:
            return self._read_readers_in(txn, op)

    def _read_history_in(self, txn: _Txn, op: ReadHistory) -> HistoryPage:
        if not (valid_conversation(op.conv) and (valid_id(op.user) or op.user == "")):
            return HistoryPage(ErrorCode.BAD_REQUEST, ())
        ck = _t(op.conv)
        is_group = not is_direct(op.conv)
        flags = self._group_flags(txn, ck) if is_group else 0
        if flags is None:
            return HistoryPage(ErrorCode.UNKNOWN_CONVERSATION, ())
        if op.user:
            spans = self._spans_in(txn, ck, op.user)
            if not spans:
                return HistoryPage(ErrorCode.NOT_MEMBER, ())
            visible = visible_ranges(spans, bool(flags & _HISTORY_VISIBLE))
        else:
            visible = [(1, OPEN)]  # the broker's own read: every seq
        ranges = after_floor(visible, self._retention_in(txn, ck)[2])
        page: list[StoredMessage] = []
        if op.limit <= 0:
            return HistoryPage(ErrorCode.OK, ())
        for seq in iter_page_seqs(ranges, self._last_seq(txn, ck), op.from_seq, op.backward):
            ref = txn.get(ck + _U64.pack(seq), db=self._convidx)
            if ref is None:
                raise StoreError(f"{op.conv!r} has no seq {seq} (store corrupt)")
            m = self._load(txn, ref[:16], op.user)
            if not hidden_amend(m, visible):
                page.append(m)
                if len(page) == op.limit:
                    break
        return HistoryPage(ErrorCode.OK, tuple(page))

    def _read_readers_in(self, txn: _Txn, op: ReadReaders) -> ReadersPage:
        if op.user or not valid_conversation(op.conv):
            code = self._access_in(txn, op.conv, op.user)
            if code is not ErrorCode.OK:
                return ReadersPage(code, ())
        info = _conv_info(op.conv)
        assert info is not None
        ck = info[0]
        members = self._members_in(txn, info)
        if members is None:
            return ReadersPage(ErrorCode.UNKNOWN_CONVERSATION, ())  # (the broker's own read: ``user`` empty)
        last = self._last_seq(txn, ck)
        out = []
        for user in members:
            raw = txn.get(_t(user) + ck, db=self._reads)
            out.append((user, min(_U64.unpack(raw)[0] if raw is not None else 0, last)))
        return ReadersPage(ErrorCode.OK, tuple(out))

    def _access_in(self, txn: _Txn, conv: str, user: str) -> ErrorCode:
        if not (valid_conversation(conv) and valid_id(user)):
            return ErrorCode.BAD_REQUEST
        pair = direct_members(conv)
        if pair is not None:
            return ErrorCode.OK if user in pair else ErrorCode.NOT_MEMBER
        ck = _t(conv)
        if txn.get(ck, db=self._groups) is None:
            return ErrorCode.UNKNOWN_CONVERSATION
        return ErrorCode.OK if txn.get(ck + _t(user), db=self._members) is not None else ErrorCode.NOT_MEMBER

    def _session_in(self, txn: _Txn, op: LoadSession) -> Result:
        if not (valid_id(op.user) and valid_id(op.device)):
            return Rejected(ErrorCode.BAD_REQUEST)
        user = op.user
        uk = _t(user)
        head, floor = self._head_floor(txn, uk)
        raw = txn.get(uk + _t(op.device), db=self._devices)
        position = _DEVICE.unpack(raw)[0] if raw is not None else -1
        states = []
        for key, _ in self._scan(txn, self._userconvs, uk):
            conv = _take_t(key, len(uk))[0]
            ck = key[len(uk) :]
            raw = txn.get(uk + ck, db=self._reads)
            marker = _U64.unpack(raw)[0] if raw is not None else 0
            pair = direct_members(conv)
            peer = "" if pair is None else (pair[1] if pair[0] == user else pair[0])
            peer_marker = 0
            if peer:
                raw = txn.get(_t(peer) + ck, db=self._reads)
                peer_marker = _U64.unpack(raw)[0] if raw is not None else 0
            last = last_visible(self._spans_in(txn, ck, user), self._last_seq(txn, ck))
            states.append(ConversationState(conv, marker, last, self._count_unread(txn, user, ck, marker), peer, peer_marker,
                                            self._purge_point_in(txn, ck)))
        states.sort(key=lambda st: st.conv)
        foreign = False
        end = self._closed.get(op.claim_epoch) if op.claim > 0 else None
        if end is not None:
            # Stored after the claimed epoch ended here: the client took it in
            # another history (a restored hot copy, refilled).  The entry at
            # the claim, or the highest one below it when a purge or
            # retention removed that one since: positions and server times
            # grow together, so it is stored after the end if any entry up
            # to the claim is (a new user's trial: the claim's entry purged,
            # refilled ones below it were skipped for good).  And a device
            # this store has no record of logged in only in that other
            # history (its refilled entries may all be reclaimed: nothing
            # below the claim would tell).
            raw = txn.get(uk + _U64.pack(op.claim), db=self._inbox)
            if raw is None:
                cur = txn.cursor(db=self._inbox)
                below = cur.prev() if cur.set_range(uk + _U64.pack(op.claim)) else cur.last()
                if below and cur.key()[: len(uk)] == uk and len(cur.key()) == len(uk) + 8:
                    raw = cur.value()
            # (No entry up to the claim left: a device unknown here decides.
            # Not before: a device's record is written lazily, and one killed
            # right after its first sends must not be resynchronized when
            # its entries say it is of this history -- a third trial.)
            foreign = _INBOX.unpack(raw)[1] > end if raw is not None else position < 0
        return SessionLoaded(user, op.device, head, floor, position, tuple(states),
                             self._revoked_in(txn, user, op.device), foreign)

    def _revoked_in(self, txn: _Txn, user: str, device: str) -> int:
        uk = _t(user)
        raw = txn.get(uk + _t(""), db=self._revoked)
        before = _I64.unpack(raw)[0] if raw is not None else 0
        if device:
            raw = txn.get(uk + _t(device), db=self._revoked)
            if raw is not None:
                before = max(before, _I64.unpack(raw)[0])
        return before

    def _set_privacy(self, w: _Batch, op: SetPresencePrivacy) -> Result:
        # In the meta db, "pv:" + user: present = last-seen hidden.
        key = b"pv:" + _t(op.user)
        if op.hide_last_seen:
            w.txn.put(key, b"1", db=self._meta)
        else:
            w.txn.delete(key, db=self._meta)
        return PresencePrivacySet(op.user, op.hide_last_seen)

    def hides_last_seen(self, user: str) -> bool:
        if not valid_id(user):
            return False
        with self._read() as txn:
            return txn.get(b"pv:" + _t(user), db=self._meta) is not None

    def revoked_before(self, user: str, device: str) -> int:
        if not valid_id(user) or (device and not valid_id(device)):
            return 0
        with self._read() as txn:
            return self._revoked_in(txn, user, device)

    def _revoke(self, w: _Batch, op: RevokeTokens) -> Result:
        key = _t(op.user) + _t(op.device)
        raw = w.txn.get(key, db=self._revoked)
        before = max(_I64.unpack(raw)[0] if raw is not None else 0, op.before)
        w.txn.put(key, _I64.pack(before), db=self._revoked)
        # The answer is the bound in force for the device: the user-wide one
        # applies to it too (base.Revoked; a device's revoke answered an
        # earlier time than the one in force: a new user's trial).
        return Revoked(op.user, op.device, self._revoked_in(w.txn, op.user, op.device))

    # ----------------------------------------------------- retention, purge

    def _retention_in(self, txn: _Txn, ck: bytes) -> tuple[int, int, int]:
        """(max_age, max_count, history floor) of T(conv) ``ck``."""
        raw = txn.get(ck, db=self._retention)
        return _RETENTION.unpack_from(raw) if raw is not None else (-1, -1, 0)

    def _purge_point_in(self, txn: _Txn, ck: bytes) -> int:
        """The last seq of T(conv) ``ck``'s latest purge, 0 if never purged."""
        raw = txn.get(ck, db=self._retention)
        return _U64.unpack_from(raw, _RETENTION.size)[0] if raw is not None and len(raw) == _RETENTION_PURGED.size else 0

    def _put_retention(self, txn: _Txn, ck: bytes, age: int, count: int, floor: int, purged: int = -1) -> None:
        """Write T(conv) ``ck``'s retention record; ``purged`` -1: its purge
        point as it is."""
        if purged < 0:
            purged = self._purge_point_in(txn, ck)
        if (age, count, floor, purged) == (-1, -1, 0, 0):
            txn.delete(ck, db=self._retention)
        elif purged:
            txn.put(ck, _RETENTION_PURGED.pack(age, count, floor, purged), db=self._retention)
        else:
            txn.put(ck, _RETENTION.pack(age, count, floor), db=self._retention)

    def has_retention(self) -> Optional[bool]:
        """See :meth:`Store.has_retention`: any entry of the retention table
        (a floor left by a trim counts: harmless, the pass only starts early)."""
        with self._read() as txn:
            return int(txn.stat(self._retention)["entries"]) > 0

    def _read_retention(self, op: ReadRetention) -> Result:
        with self._read() as txn:
            return self._read_retention_in(txn, op)

    def _read_retention_in(self, txn: _Txn, op: ReadRetention) -> Result:
        if not valid_conversation(op.conv):
            return Rejected(ErrorCode.BAD_REQUEST)
        return RetentionState(op.conv, *self._retention_in(txn, _t(op.conv)))

    def _set_retention(self, w: _Batch, op: SetRetention) -> Result:
        txn = w.txn
        ck = _t(op.conv)
        if not is_direct(op.conv) and txn.get(ck, db=self._groups) is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        floor = self._retention_in(txn, ck)[2]
        self._put_retention(txn, ck, op.max_age, op.max_count, floor)
        return RetentionSet(op.conv, op.max_age, op.max_count)

    def _recipients_in(self, txn: _Txn, ck: bytes) -> list[bytes]:
        """T(user) of every user who may hold inbox entries of T(conv) ``ck``."""
        pair = direct_members(ck[1:].decode("ascii"))
        if pair is not None:
            return [_t(pair[0]), _t(pair[1])]
        return [key[len(ck) :] for key, _ in self._scan(txn, self._spans, ck)]

    def _trim(self, txn: _Txn, ck: bytes, upto: int) -> tuple[int, int]:
        """Remove the entries of T(conv) ``ck`` from its history floor up to
        seq ``upto`` (messages, dedupe records, inbox entries) and move the
        floor there; (entries removed, inbox entries removed).  The caller
        synced the batch (no queued inbox entries)."""
        age, count, floor = self._retention_in(txn, ck)
        if upto <= floor:
            return 0, 0
        gone: set[bytes] = set()
        dedupes: dict[bytes, set[bytes]] = {}
        for seq in range(floor + 1, upto + 1):
            ik = ck + _U64.pack(seq)
            ref = txn.get(ik, db=self._convidx)
            if ref is None:
                raise StoreError(f"{ck[1:]!r} has no seq {seq} (store corrupt)")
            msg_id = ref[:16]
            raw = txn.get(msg_id, db=self._msgs)
            if raw is not None:
                # The dedupe key T(sender) T(device) U64(local_id), cut from
                # the record without decoding it (T(conv) comes first).
                off = _RECORD.size + 1 + raw[_RECORD.size]
                end = off + 1 + raw[off]
                end += 1 + raw[end]
                dedupes.setdefault(raw[off:end] + raw[8:16], set()).add(msg_id)
                txn.delete(msg_id, db=self._msgs)
            txn.delete(ik, db=self._convidx)
            gone.add(msg_id)
        self._drop_dedupes(txn, dedupes)  # with their messages, never before
        self._put_retention(txn, ck, age, count, upto)
        entries = 0
        for uk in self._recipients_in(txn, ck):
            floor_pos = self._head_floor(txn, uk)[1]
            doomed = [key for key, entry in self._scan(txn, self._inbox, uk, uk + _U64.pack(floor_pos + 1))
                      if entry[:16] in gone]
            for key in doomed:
                txn.delete(key, db=self._inbox)
            entries += len(doomed)
        return upto - floor, entries

    def _drop_dedupes(self, txn: _Txn, doomed: dict[bytes, set[bytes]]) -> None:
        """Delete the ``dedupe`` entries of removed messages: ``doomed`` maps
        T(sender) T(device) U64(local_id) to the msg ids removed with that
        key, and an entry goes only if it is one of theirs.  A run loses just
        those entries: the rest is written again as :func:`_impl.dedupe_items`
        writes a batch's (the run cut where entries went, each part a run or
        a single record), each record once however many of its entries go.
        Every other entry stays: its retry must still be answered with its
        identity, not stored twice.  StoreError (store corrupt) for a run
        record no batch can have written (nothing is deleted then)."""
        if not doomed:
            return
        cur = txn.cursor(db=self._dedupe)
        found: dict[bytes, bytes] = {}  # the records holding doomed keys
        for dkey in sorted(doomed):
            if not cur.set_range(dkey):
                continue
            key = cur.key()
            n = len(dkey)
            if len(key) != n + 8:
                if key == dkey:
                    found[key] = cur.value()
            elif key[: n - 8] == dkey[: n - 8]:
                # A run of the device (refused as _dedupe_get refuses it if
                # it cannot be valid), holding dkey's entry if first <= it.
                value = cur.value()
                if _dedupe_run(key, n - 8, value)[0] <= _U64.unpack_from(dkey, n - 8)[0]:
                    found[key] = value
        deletes: list[bytes] = []
        rest: list[tuple[bytes, bytes]] = []
        for key, value in found.items():
            end = 1 + key[0]
            end += 1 + key[end]
            if len(key) == end + 8:
                if value[:16] in doomed.get(key, ()):
                    deletes.append(key)
                continue
            first, last, size = _dedupe_run(key, end, value)  # (StoreError if it cannot be valid)
            kept = []
            for i in range(last - first + 1):
                ek, e = key[:end] + _U64.pack(first + i), value[i * size : (i + 1) * size]
                if e[:16] not in doomed.get(ek, ()):
                    kept.append((ek, e))
            if len(kept) <= last - first:
                deletes.append(key)
                rest.extend(kept)
        for key in deletes:
            txn.delete(key, db=self._dedupe)
        if rest:
            txn.cursor(db=self._dedupe).putmulti(_impl.dedupe_items(sorted(rest)))

    @staticmethod
    def _forget_convs(w: _Batch) -> None:
        """Membership or conversation-list flags changed outside the cache."""
        w.hot.convs.clear()
        w.hot.members = 0

    def _expire(self, w: _Batch, op: Expire) -> Result:
        w.sync()  # inbox entries queued by earlier ops must be in the db
        txn = w.txn
        # The walk: conversation keys in key order, after ``op.after``; only
        # those with a setting of their own when the broker sets no default.
        own = not (op.max_age or op.max_count)
        convs = msgs = entries = 0
        ids: list[str] = []
        resume = ""
        for ck in self._keys_after(txn, self._retention if own else self._convs, _t(op.after) if op.after else b""):
            if len(ids) >= EXPIRED_IDS:
                resume = ids[-1]  # (more to look at: the next Expire goes on after it)
                break
            own_age, own_count, floor = self._retention_in(txn, ck)
            if own and (own_age, own_count) == (-1, -1):
                continue
            age, count = retention_limits((own_age, own_count), op.max_age, op.max_count)
            if not (age or count):
                continue
            last = self._last_seq(txn, ck)
            upto = floor
            if count and last - count > upto:
                upto = last - count
            if age:
                cutoff = op.now - age
                while upto < last:
                    ref = txn.get(ck + _U64.pack(upto + 1), db=self._convidx)
                    raw = txn.get(ref[:16], db=self._msgs) if ref is not None else None
                    if raw is not None and _RECORD.unpack_from(raw)[3] >= cutoff:
                        break
                    upto += 1
            if op.keep:  # (Expire: nothing younger than keep goes)
                young = op.now - op.keep
                while upto > floor:
                    ref = txn.get(ck + _U64.pack(upto), db=self._convidx)
                    raw = txn.get(ref[:16], db=self._msgs) if ref is not None else None
                    if raw is None or _RECORD.unpack_from(raw)[3] < young:
                        break
                    upto -= 1
            if upto > floor:
                n, e = self._trim(txn, ck, upto)
                convs, msgs, entries = convs + 1, msgs + n, entries + e
                ids.append(ck[1:].decode("ascii"))  # (a length-prefixed id: _t)
        return Expired(convs, msgs, entries, tuple(sorted(ids)), resume)

    @staticmethod
    def _keys_after(txn: _Txn, db: Any, start: bytes, chunk: int = 1024) -> Iterator[bytes]:
        """The keys of ``db`` above ``start``, ascending, read ``chunk`` at a
        time with a fresh cursor each: the caller writes between them (a
        trim rewrites the retention table's floors), and a cursor is never
        kept across its writes."""
        while True:
            cur = txn.cursor(db=db)
            if not (cur.set_range(start) if start else cur.first()):
                return
            keys: list[bytes] = []
            for key in cur.iternext(keys=True, values=False):
                if key != start:
                    keys.append(key)
                    if len(keys) == chunk:
                        break
            if not keys:
                return
            yield from keys
            start = keys[-1]

    def _purge_conversation(self, w: _Batch, op: PurgeConversation) -> Result:
        w.sync()
        txn = w.txn
        ck = _t(op.conv)
        users = self._recipients_in(txn, ck)
        last = self._last_seq(txn, ck)
        msgs, entries = self._trim(txn, ck, last)
        # A 1:1 chat lives on (its seqs continue): its read markers stay, as
        # after retention -- they never move back (PurgeConversation).
        keep_reads = is_direct(op.conv)
        for uk in users:
            for key, db in ((uk + ck, self._reads), (uk + ck, self._userconvs), (ck + uk, self._spans),
                            (ck + uk, self._members)):
                if not (keep_reads and db is self._reads):
                    txn.delete(key, db=db)
        txn.delete(ck, db=self._groups)
        # Keep the floor (= the last seq): seqs continue after it; and a 1:1
        # chat's own retention setting (it lives on; a group is gone with its).
        age, count, floor = self._retention_in(txn, ck)
        purged = max(last, self._purge_point_in(txn, ck))  # (the purge point a login reads)
        self._put_retention(txn, ck, *((age, count) if keep_reads else (-1, -1)), floor, purged)
        self._forget_convs(w)
        group = () if keep_reads else tuple(sorted(uk[1:].decode("ascii") for uk in users))  # (T(user): _t)
        return Purged(msgs, entries, last_seq=last, users=group)

    def _purge_user(self, w: _Batch, op: PurgeUser) -> Result:
        w.sync()
        txn = w.txn
        user = op.user
        uk = _t(user)
        groups = []
        for key, _ in self._scan(txn, self._userconvs, uk):
            ck = key[len(uk) :]
            conv = ck[1:].decode("ascii")
            if not is_direct(conv) and txn.get(ck + uk, db=self._members) is not None:
                groups.append(conv)
        changes = []
        for conv in sorted(groups):
            res = self._change_members(w, RemoveMembers(conv, (user,), op.now), last_may_leave=True)
            assert isinstance(res, GroupChanged)
            changes.append(res)
        w.sync()  # the LEFT entries' inbox writes, before the deletions below
        tombstones = 0
        for key, value in list(self._scan(txn, self._dedupe, uk)):
            for msg_id in _dedupe_msg_ids(key, value):
                raw = txn.get(msg_id, db=self._msgs)
                if raw is not None:
                    m = _decode_record(msg_id, raw)
                    if m.seq:  # seq 0: a DELETE entry (no payload of its own)
                        m = purged_tombstone(m)
                        txn.put(msg_id, _encode_entry(m), db=self._msgs)
                        if m.kind == MessageKind.MESSAGE:
                            # As a recall: unread counts and mention counts skip it.
                            txn.put(_t(m.conv) + _U64.pack(m.seq),
                                    msg_id + bytes((int(MessageKind.RECALL),)) + m.sender.encode("ascii"), db=self._convidx)
                        tombstones += 1
            txn.delete(key, db=self._dedupe)
        doomed = [key for key, _ in self._scan(txn, self._inbox, uk)]
        for key in doomed:
            txn.delete(key, db=self._inbox)
        head, floor = self._head_floor(txn, uk)
        if floor != head:
            txn.put(uk, _HEAD_FLOOR.pack(head, head), db=self._inboxmeta)
        devices = [key for key, _ in self._scan(txn, self._devices, uk)]
        for key in devices:
            txn.delete(key, db=self._devices)
        for key in [key for key, _ in self._scan(txn, self._reads, uk)]:
            txn.delete(key, db=self._reads)
        for key in [key for key, _ in self._scan(txn, self._userconvs, uk)]:
            txn.delete(key[len(uk) :] + uk, db=self._spans)
            txn.delete(key, db=self._userconvs)
        # The user's own settings, mention index, deletions for themselves, privacy.
        for db in (self._convset, self._mentionidx, self._deleted):
            for key in [key for key, _ in self._scan(txn, db, uk)]:
                txn.delete(key, db=db)
        txn.delete(b"pv:" + uk, db=self._meta)
        rk = uk + _t("")
        raw = txn.get(rk, db=self._revoked)
        if raw is None or _I64.unpack(raw)[0] < op.now:
            txn.put(rk, _I64.pack(op.now), db=self._revoked)
        w.hot.clear_heads()
        self._forget_convs(w)
        return Purged(tombstones, len(doomed), len(devices), tuple(changes))

    # ----------------------------------------------------------- lifecycle

    @staticmethod
    def _open_lock_file(path: str) -> io.FileIO:
        """A lock file, opened (created) for flock.  A file object, not a
        bare fd: its close() is one C call that marks it closed and closes
        the fd, so no Ctrl-C can land between the two (a bare fd had to be
        forgotten before being closed, lest a second close() close a number
        the process had reused: an interrupt in between kept the lock), and
        a second close() is a no-op."""
        return open(path, "r+b", buffering=0, opener=lambda p, flags: os.open(p, os.O_RDWR | os.O_CREAT, _FILE_MODE))

    @staticmethod
    def _take_broker_lock(path: str) -> Optional[io.FileIO]:
        """One broker per store: an exclusive flock on ``broker.lock``, held
        until close (the kernel drops it if the process dies)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return None
        f = LmdbStore._open_lock_file(os.path.join(path, "broker.lock"))
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = LmdbStore._lock_holder(f)
            f.close()
            raise StoreInUse(
                f"the store {path!r} is in use by {holder} (it holds broker.lock); stop it first,"
                " or open the store with owner=False for maintenance",
                path,
                holder,
            ) from None
        # Who holds it, for the message of the next one refused (the lock
        # itself cannot say: flock has no owner).  Best effort.
        try:
            f.truncate(0)
            f.write(f"{os.getpid()} {_command_words()}\n".encode(errors="replace"))
        except OSError:
            pass
        return f

    @staticmethod
    def _lock_holder(f: io.FileIO) -> str:
        """Who holds ``broker.lock`` in words: "process 123 (pimcore serve ...)",
        as its holder wrote it; "another process" if it wrote nothing yet."""
        try:
            f.seek(0)
            pid, _, cmd = f.read(4 * _COMMAND_WORDS + 32).decode(errors="replace").strip().partition(" ")
        except OSError:
            return "another process"
        if not pid.isdigit():
            return "another process"
        return f"process {pid}" + (f" ({cmd})" if cmd else "")

    def _release_broker_lock(self) -> None:
        # (Closed before forgotten: a close() cut short closes again, a no-op
        # for a file already closed; see _open_lock_file.)
        for f in (self._lock_file, self._log_lock_file):
            if f is not None:
                f.close()
        self._lock_file = self._log_lock_file = None

    @staticmethod
    def _take_log_lock(path: str, wait: float = 10.0) -> Optional[io.FileIO]:
        """An exclusive flock on ``log.lock``, held while this handle writes
        through the command log (and while it recovers one): a maintenance
        write (which takes it shared) is refused meanwhile.  Waits up to
        ``wait`` seconds for a maintenance write in progress."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return None
        f = LmdbStore._open_lock_file(os.path.join(path, "log.lock"))
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except OSError:
                if time.monotonic() >= deadline:
                    f.close()
                    raise StoreError(
                        f"a maintenance process is writing the store at {path!r} (it holds log.lock); stop it first"
                    ) from None
                time.sleep(0.01)

    def _maintenance_write_lock(self) -> Optional[io.FileIO]:
        """For one write of a maintenance handle (owner=False, not in
        ``log`` durability): a shared flock on ``log.lock``, or StoreError
        if a log broker runs (it holds the lock) or ran since this handle
        opened and left a command log (its next start replays that log onto
        its last checkpoint, which would drop this write)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return None
        refused = (
            "a broker with durability 'log' is running on this store, or ran since this handle opened:"
            " only it writes (use its HTTP API, or open the store again once it is stopped)"
        )
        f = self._open_lock_file(os.path.join(self._path, "log.lock"))
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if os.path.exists(os.path.join(self._path, "log", "checkpoint")):
                raise StoreError(refused)
        except OSError:
            f.close()
            raise StoreError(refused) from None
        except BaseException:
            f.close()
            raise
        return f

    def close(self) -> None:
        with self._wlock:
            if self._open is not None:
                # Deferred batches: committed by their owner; from another
                # thread, wait a while for the owner's commit.  (If neither
                # happens the log has them, and the next start replays them.)
                if self._defer_owner == threading.get_ident():
                    try:
                        self._commit_open()
                    except Exception:  # noqa: BLE001 - logged below; the log keeps them
                        _log.warning("deferred batches not committed at close; the next start replays them",
                                     extra={"event": "deferred_commit_failed"})
                else:
                    self._waiters += 1
                    try:
                        self._open_cond.wait_for(lambda: self._open is None, timeout=10.0)
                    finally:
                        self._waiters -= 1
            self._defer_owner = None
            env = self._env
            if env is None:
                self._release_broker_lock()
                return
            # From here on nothing more is written, even if this close is cut
            # short (Ctrl-C) before it completes: the log is let go of only at
            # its end, and a handle without its log would commit to LMDB
            # alone.  Calling close() again completes it (each step below
            # may run twice).
            self._closing = True
            st = self._log
            if st is not None:
                # A clean end: a checkpoint of everything, so the next open
                # replays nothing.  (If it fails the log still has it all.)
                st.join()
                st.stop_flusher()
                # (Not after a start whose replay did not complete: the log
                # position would claim records LMDB may lack, or hold twice.)
                if st.failed is None and st.unsettled is None and st.started:
                    try:
                        prepared = st._prepare()
                        if prepared is not None:
                            st._finish(*prepared)
                    except (OSError, lmdb.Error, StoreError):
                        pass
                st.drop_pin()
                st.close_files()
                st.log.close()
                self._log = None
            # Exclusive: wait for in-flight reads; later ones see None.
            with self._gate.exclusive():
                self._hot = None
                if self._durability == "os" and self._owner:
                    # A clean end: everything to disk, then drop the mark
                    # (synced), so the next boot does not take a new epoch.
                    try:
                        env.sync(True)
                        with env.begin(write=True) as txn:
                            txn.delete(b"osrun", db=self._meta)
                        env.sync(True)
                    except lmdb.Error:
                        pass  # the mark stays: the next open re-epochs, safely
                # Only now: a close cut short before here (the sync above is
                # its longest step) is done again by the next close().
                self._env = None
                env.close()
                self._release_broker_lock()

    def __repr__(self) -> str:
        state = "closed" if self._env is None else self._durability
        return f"LmdbStore({self._path!r}, {state})"


#: The ops that may run while NewMessage and device records are staged (see
#: _Batch): of msgs, convidx, dedupe and devices they read only dedupe, through
#: _Batch.prior, and devices, through _Hot.devices.
_STAGE_SAFE = frozenset((NewMessage, AckPosition, TouchDevice))

_HANDLERS: dict[type, Callable[[LmdbStore, _Batch, Op], Result]] = {
    NewMessage: LmdbStore._new_message,  # type: ignore[dict-item]
    AckPosition: LmdbStore._ack,  # type: ignore[dict-item]
    TouchDevice: LmdbStore._touch,  # type: ignore[dict-item]
    MarkRead: LmdbStore._mark_read,  # type: ignore[dict-item]
    Reclaim: LmdbStore._reclaim,  # type: ignore[dict-item]
    CreateGroup: LmdbStore._create_group,  # type: ignore[dict-item]
    AddMembers: LmdbStore._change_members,  # type: ignore[dict-item]
    RemoveMembers: LmdbStore._change_members,  # type: ignore[dict-item]
    RevokeTokens: LmdbStore._revoke,  # type: ignore[dict-item]
    SetPresencePrivacy: LmdbStore._set_privacy,  # type: ignore[dict-item]
    AppendEvent: LmdbStore._append_event_op,  # type: ignore[dict-item]
    AckEvents: LmdbStore._ack_events,  # type: ignore[dict-item]
    DeleteConsumer: LmdbStore._delete_consumer,  # type: ignore[dict-item]
    SetConversation: LmdbStore._set_conversation,  # type: ignore[dict-item]
    AmendMessage: LmdbStore._amend,  # type: ignore[dict-item]
    SetRetention: LmdbStore._set_retention,  # type: ignore[dict-item]
    Expire: LmdbStore._expire,  # type: ignore[dict-item]
    PurgeConversation: LmdbStore._purge_conversation,  # type: ignore[dict-item]
    PurgeUser: LmdbStore._purge_user,  # type: ignore[dict-item]
}
