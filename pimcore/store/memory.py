"""In-memory reference implementation of :class:`~pimcore.store.base.Store`.

Not durable.  It is the oracle the LMDB backend is tested against (the same
contract tests run on both, and a model-based test compares them op for op),
so it favours being obviously right over being clever:

* state is a handful of plain dicts, each mirroring one LMDB sub-database;
* atomicity of :meth:`MemoryStore.commit` comes from an undo log: every
  mutation inside a commit goes through :meth:`_set` / :meth:`_del`, which
  record the previous value; if an op raises, the log is replayed backwards
  and the store is exactly as before the batch;
* one re-entrant lock serialises every public method, so a commit running in
  a worker thread is never seen half-applied by a reader.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import threading
from dataclasses import replace
from typing import Any, Callable, Optional

from ..errors import ErrorCode, StoreError
from .base import (
    removes_everyone,
    SYSTEM,
    AckEvents,
    ConsumerDeleted,
    DeleteConsumer,
    AppendEvent,
    ConversationEntry,
    ConversationSet,
    ConversationsPage,
    ReadConversations,
    SetConversation,
    AMENDING,
    conversation_entry,
    conversation_page,
    mentioned_recipients,
    mentions_user,
    unread_for,
    purged_tombstone,
    new_settings,
    EventAppended,
    EventsAcked,
    EventsPage,
    ReadEvents,
    StoredEvent,
    message_event,
    RevokeTokens,
    SetPresencePrivacy,
    PresencePrivacySet,
    Revoked,
    AckPosition,
    AmendMessage,
    amend_entry,
    amend_problem,
    amended,
    AddMembers,
    CreateGroup,
    GroupChanged,
    HistoryPage,
    MessageKind,
    OPEN,
    ReadersPage,
    ReadHistory,
    ReadReaders,
    RemoveMembers,
    last_visible,
    last_message_floor,
    member_ranges,
    hidden_amend,
    horizon,
    iter_page_seqs,
    page_seqs,
    sees,
    visible_ranges,
    Acked,
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

__all__ = ["MemoryStore"]

_MISSING: Any = object()

#: Flags of a (user, conv) entry in the conversation list.  Why two: a group
#: member with no message yet must be listed (MEMBER), and a removed member
#: keeps the conversations they received messages in (HAS_MESSAGES).
MEMBER = 1
HAS_MESSAGES = 2


class MemoryStore(Store):
    """Dict-based :class:`Store`; see the module docstring."""

    def __init__(self, node_id: Optional[bytes] = None) -> None:
        if node_id is not None and (not isinstance(node_id, bytes) or len(node_id) != 8):
            raise ValueError("node_id must be 8 bytes")
        self._node = node_id if node_id is not None else os.urandom(8)
        # Nothing survives this object, so every instance is a new history.
        self._epoch = os.urandom(16)
        self._lock = threading.RLock()
        self._closed = False
        #: (table, key, previous value or _MISSING) per mutation, while a
        #: commit runs; None outside commits (admin calls validate first and
        #: cannot fail half-way).
        self._undo: Optional[list[tuple[dict, Any, Any]]] = None

        self._hwm: dict[str, int] = {"server_time": 0}
        self._msgs: dict[bytes, StoredMessage] = {}
        self._conv_last: dict[str, int] = {}
        self._conv_seq: dict[tuple[str, int], bytes] = {}  # (conv, seq) -> msg_id
        self._groups: dict[str, int] = {}  # conv -> created_at
        self._visible: dict[str, bool] = {}  # conv -> history_visible
        self._members: dict[str, frozenset[str]] = {}  # conv -> members
        #: (group, user) -> membership intervals (joined, left), ascending.
        self._spans: dict[tuple[str, str], tuple[tuple[int, int], ...]] = {}
        self._userconv: dict[str, dict[str, int]] = {}  # user -> conv -> flags
        self._inbox: dict[str, dict[int, tuple[bytes, int]]] = {}  # user -> pos -> (msg_id, server_time)
        self._head: dict[str, int] = {}
        self._floor: dict[str, int] = {}
        self._devices: dict[str, dict[str, DeviceState]] = {}
        self._dedupe: dict[tuple[str, str, int], tuple[bytes, int, int, bytes]] = {}
        self._reads: dict[tuple[str, str], int] = {}
        #: (user, conv, seq) of every message a user deleted for themselves.
        self._deleted: dict[tuple[str, str, int], bool] = {}
        self._revoked: dict[tuple[str, str], int] = {}  # (user, device or "") -> before
        #: Host events: id -> (time, data); exactly ids floor+1..last (reclaim
        #: removes a prefix).  "last" and "floor" in _evmeta.
        self._events: dict[int, tuple[int, bytes]] = {}
        self._evmeta: dict[str, int] = {"last": 0, "floor": 0}
        self._evcursors: dict[str, int] = {}  # consumer -> acked id
        self._privacy: dict[str, bool] = {}  # user -> hide last seen (SetPresencePrivacy); absent = False
        #: (user, conv) -> (pinned, muted, hidden_at): the user's own
        #: settings of a conversation (SetConversation); absent = defaults.
        self._convset: dict[tuple[str, str], tuple[bool, bool, int]] = {}
        #: History retention: conv -> (max_age, max_count) set for it (-1 per
        #: field: the broker default), and conv -> history floor (seqs <= it
        #: were removed; entries are exactly floor+1..last).
        self._retention: dict[str, tuple[int, int]] = {}
        self._hfloor: dict[str, int] = {}
        #: conv -> the last seq of its latest purge (ConversationState.purged).
        self._purged: dict[str, int] = {}

    # ------------------------------------------------------------ plumbing

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def _set(self, table: dict, key: Any, value: Any) -> None:
        if self._undo is not None:
            self._undo.append((table, key, table.get(key, _MISSING)))
        table[key] = value

    def _del(self, table: dict, key: Any) -> None:
        if self._undo is not None:
            self._undo.append((table, key, table[key]))
        del table[key]

    def _sub(self, table: dict, key: Any) -> dict:
        """The nested dict ``table[key]``, created (undoably) if missing.
        Replaying the log backwards undoes writes into the nested dict before
        the creation of the dict itself."""
        inner = table.get(key)
        if inner is None:
            inner = {}
            self._set(table, key, inner)
        return inner

    def _rollback(self) -> None:
        assert self._undo is not None
        for table, key, old in reversed(self._undo):
            if old is _MISSING:
                table.pop(key, None)
            else:
                table[key] = old

    def _group_members(self, conv: str) -> Optional[frozenset[str]]:
        """Members of a well-formed conversation id, None if it is an unknown
        group."""
        pair = direct_members(conv)
        if pair is not None:
            return frozenset(pair)
        if conv not in self._groups:
            return None
        return self._members[conv]

    def _flag(self, user: str, conv: str, bit: int, on: bool) -> None:
        convs = self._sub(self._userconv, user)
        old = convs.get(conv, 0)
        new = (old | bit) if on else (old & ~bit)
        if new == old:
            return
        if new:
            self._set(convs, conv, new)
        else:
            self._del(convs, conv)

    # ------------------------------------------------- identity and clock

    def node_id(self) -> bytes:
        with self._lock:
            self._check_open()
            return self._node

    def epoch(self) -> bytes:
        with self._lock:
            self._check_open()
            return self._epoch

    def epochs(self) -> tuple[bytes, ...]:
        with self._lock:
            self._check_open()
            return (self._epoch,)

    def last_server_time(self) -> int:
        with self._lock:
            self._check_open()
            return self._hwm["server_time"]

    # -------------------------------------------------------------- writes

    def commit(self, batch: WriteBatch) -> tuple[Result, ...]:
        with self._lock:
            self._check_open()
            self._undo = []
            try:
                return tuple(self._apply(op) for op in batch.ops)
            except BaseException as exc:
                # All or nothing: the batch is one transaction.
                self._rollback()
                if isinstance(exc, Exception):
                    raise StoreError(f"batch {batch.batch_id} not committed: {exc!r}") from exc
                raise
            finally:
                self._undo = None

    def _apply(self, op: Op) -> Result:
        kind = type(op)
        if kind not in _HANDLERS:
            raise TypeError(f"not a store op: {kind.__name__}")
        if malformed(op):
            return Rejected(ErrorCode.BAD_REQUEST)
        return _HANDLERS[kind](self, op)

    def _revoke(self, op: RevokeTokens) -> Result:
        key = (op.user, op.device)
        before = max(self._revoked.get(key, 0), op.before)
        self._set(self._revoked, key, before)
        if op.device:  # in force for the device: the user-wide bound too (base.Revoked)
            before = max(before, self._revoked.get((op.user, ""), 0))
        return Revoked(op.user, op.device, before)

    def _set_privacy(self, op: SetPresencePrivacy) -> Result:
        if op.hide_last_seen:
            self._set(self._privacy, op.user, True)
        elif op.user in self._privacy:
            self._del(self._privacy, op.user)
        return PresencePrivacySet(op.user, op.hide_last_seen)

    def hides_last_seen(self, user: str) -> bool:
        with self._lock:
            self._check_open()
            return self._privacy.get(user, False)

    def revoked_before(self, user: str, device: str) -> int:
        with self._lock:
            self._check_open()
            return max(self._revoked.get((user, ""), 0), self._revoked.get((user, device), 0) if device else 0)

    def deduped(self, sender: str, device: str, local_id: int) -> bool:
        with self._lock:
            self._check_open()
            return (sender, device, local_id) in self._dedupe

    def _new_message(self, op: NewMessage) -> Result:
        key = (op.sender, op.device, op.local_id)
        prior = self._dedupe.get(key)
        if prior is not None:
            msg_id, seq, server_time, digest = prior
            if digest == op.digest:
                return Duplicate(msg_id, seq, server_time)
            return Rejected(ErrorCode.DUPLICATE_CONFLICT)
        if not valid_conversation(op.conv):
            return Rejected(ErrorCode.BAD_REQUEST)
        members = self._group_members(op.conv)
        if members is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        if op.sender not in members and op.sender != SYSTEM:  # the system may post anywhere
            return Rejected(ErrorCode.NOT_MEMBER)
        if 0 < op.after_seq <= self._purged.get(op.conv, 0) and direct_members(op.conv) is None:
            return Rejected(ErrorCode.PURGED)  # (answers a purged group's history: base.NewMessage)
        if op.msg_id in self._msgs:
            return Rejected(ErrorCode.INTERNAL)

        seq = self._conv_last.get(op.conv, 0) + 1
        after_seq = min(op.after_seq, seq - 1)
        self._set(self._conv_last, op.conv, seq)
        self._set(self._conv_seq, (op.conv, seq), op.msg_id)
        self._set(
            self._msgs,
            op.msg_id,
            StoredMessage(
                msg_id=op.msg_id,
                conv=op.conv,
                seq=seq,
                sender=op.sender,
                device=op.device,
                local_id=op.local_id,
                client_time=op.client_time,
                server_time=op.server_time,
                payload=op.payload,
                after_seq=after_seq,
                mentions=op.mentions,
                mention_all=op.mention_all,
            ),
        )
        positions = []
        for user in sorted(members):
            pos = self._head.get(user, 0) + 1
            self._set(self._head, user, pos)
            self._set(self._sub(self._inbox, user), pos, (op.msg_id, op.server_time))
            self._flag(user, op.conv, HAS_MESSAGES, True)
            positions.append((user, pos))
        self._set(self._dedupe, key, (op.msg_id, seq, op.server_time, op.digest))
        if op.server_time > self._hwm["server_time"]:
            self._set(self._hwm, "server_time", op.server_time)
        if op.event:
            m = self._msgs[op.msg_id]
            muted = [u for u in members if self._convset.get((u, op.conv), (False, False, 0))[1]]
            self._append_event(op.server_time, message_event(m, members, muted, mentioned_recipients(m, members)))
        return Appended(op.msg_id, seq, op.server_time, tuple(positions), after_seq)

    def _amend(self, op: AmendMessage) -> Result:
        key = (op.sender, op.device, op.local_id)
        prior = self._dedupe.get(key)
        if prior is not None:
            msg_id, seq, server_time, digest = prior
            if digest == op.digest:
                return Duplicate(msg_id, seq, server_time)
            return Rejected(ErrorCode.DUPLICATE_CONFLICT)
        if not valid_conversation(op.conv):
            return Rejected(ErrorCode.BAD_REQUEST)
        members = self._group_members(op.conv)
        if members is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        last = self._conv_last.get(op.conv, 0)
        tid = self._conv_seq.get((op.conv, op.target)) if op.target <= last else None
        target = self._msgs[tid] if tid is not None else None
        member, visible = True, True
        history_visible = self._visible.get(op.conv, False)
        if op.kind == MessageKind.DELETE:
            spans = self._spans_of(op.conv, op.sender)
            member = bool(spans)
            visible = sees(spans, history_visible, op.target)
        elif op.sender != SYSTEM:
            member = op.sender in members
            visible = sees(self._spans_of(op.conv, op.sender), history_visible, op.target)
        code = amend_problem(op, member, target, visible)
        if code is not ErrorCode.OK:
            return Rejected(code)
        assert target is not None
        if op.msg_id in self._msgs:
            return Rejected(ErrorCode.INTERNAL)
        if op.kind == MessageKind.DELETE:
            seq, recipients = 0, frozenset((op.sender,))
            self._set(self._deleted, (op.sender, op.conv, op.target), True)
        else:
            # Only to the members who may see the target (hidden_amend).
            seq = last + 1
            recipients = frozenset(u for u in members if sees(self._spans_of(op.conv, u), history_visible, op.target))
            self._set(self._conv_last, op.conv, seq)
            self._set(self._conv_seq, (op.conv, seq), op.msg_id)
            self._set(self._msgs, target.msg_id, amended(target, op))
        entry = amend_entry(op, seq)
        self._set(self._msgs, op.msg_id, entry)
        positions = []
        for user in sorted(recipients):
            pos = self._head.get(user, 0) + 1
            self._set(self._head, user, pos)
            self._set(self._sub(self._inbox, user), pos, (op.msg_id, op.server_time))
            self._flag(user, op.conv, HAS_MESSAGES, True)
            positions.append((user, pos))
        self._set(self._dedupe, key, (op.msg_id, seq, op.server_time, op.digest))
        if op.server_time > self._hwm["server_time"]:
            self._set(self._hwm, "server_time", op.server_time)
        if op.event:
            self._append_event(op.server_time, message_event(replace(entry, payload=op.payload), recipients))
        return Appended(op.msg_id, seq, op.server_time, tuple(positions), entry.after_seq)

    def _current(self, m: StoredMessage, user: str = "") -> StoredMessage:
        """``m`` as a read returns it: an EDIT entry with its target's payload
        now; for ``user`` (history, inbox), a message they deleted for
        themselves with ``deleted`` set and no payload, and an EDIT of it
        with none."""
        if m.kind == MessageKind.EDIT:
            # Nothing of a message the user deleted for themselves comes back
            # through a later edit; a target removed by retention has none.
            target = self._conv_seq.get((m.conv, m.target))
            if target is None or (user and (user, m.conv, m.target) in self._deleted):
                return replace(m, payload=b"")
            t = self._msgs[target]
            if user and t.edited and self._edited_after_horizon(m.conv, user, t.edited):
                return replace(m, payload=b"")
            return replace(m, payload=t.payload)
        if user and m.kind == MessageKind.MESSAGE:
            if (user, m.conv, m.seq) in self._deleted:
                return replace(m, payload=b"", deleted=True)
            if m.edited and self._edited_after_horizon(m.conv, user, m.edited):
                return replace(m, payload=b"")
        return m

    def _edited_after_horizon(self, conv: str, user: str, edited: int) -> bool:
        """Was a message of ``conv`` edited (at server time ``edited``) after
        ``user``'s view of it ended (base.horizon)?"""
        h = horizon(self._spans_of(conv, user), self._conv_last.get(conv, 0))
        if not h:
            return False
        left = self._conv_seq.get((conv, h))  # (None: removed by retention -- withheld)
        return left is None or edited > self._msgs[left].server_time

    def _register(self, user: str, device: str, position: int, now: int) -> tuple[DeviceState, bool]:
        """Shared by Touch and Ack: create at the floor if unknown, move
        forward to ``position`` clamped to the head, refresh last_seen."""
        devs = self._sub(self._devices, user)
        old = devs.get(device)
        new = old is None
        if old is None:
            old = DeviceState(user, device, self._floor.get(user, 0), now)
        target = min(position, self._head.get(user, 0))
        state = DeviceState(user, device, max(old.position, target), max(old.last_seen, now))
        self._set(devs, device, state)
        return state, new

    def _ack(self, op: AckPosition) -> Result:
        state, _ = self._register(op.user, op.device, op.position, op.now)
        return Acked(op.user, op.device, state.position)

    def _touch(self, op: TouchDevice) -> Result:
        state, new = self._register(op.user, op.device, op.position, op.now)
        return Touched(op.user, op.device, state.position, new)

    def _mark_read(self, op: MarkRead) -> Result:
        members = self._group_members(op.conv)
        if members is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        spans = self._spans_of(op.conv, op.user)
        if not spans:
            return Rejected(ErrorCode.NOT_MEMBER)
        last = last_visible(spans, self._conv_last.get(op.conv, 0))
        old = self._reads.get((op.user, op.conv), 0)
        new = max(old, min(op.seq, last))
        if new != old:
            self._set(self._reads, (op.user, op.conv), new)
        return ReadMarked(op.user, op.conv, new, last, self._unread(op.user, op.conv), new != old)

    def _reclaim(self, op: Reclaim) -> Result:
        seen_cutoff = op.now - op.device_retention
        forgotten = 0
        for devs in self._devices.values():
            for device, state in list(devs.items()):
                if state.last_seen < seen_cutoff:
                    self._del(devs, device)
                    forgotten += 1
        age_cutoff = op.now - op.max_age
        removed = 0
        for user, head in self._head.items():
            known = self._devices.get(user)
            floor = self._floor.get(user, 0)
            # No device: nothing was acked by "every device" (see Reclaim).
            acked = min(d.position for d in known.values()) if known else floor
            inbox = self._inbox[user]
            pos = floor
            while pos < head:
                entry = inbox.get(pos + 1)  # None: a hole (retention, purge)
                if not (entry is None or pos + 1 <= acked or entry[1] < age_cutoff):
                    break
                pos += 1
                if entry is not None:
                    self._del(inbox, pos)
                    removed += 1
            if pos != floor:
                self._set(self._floor, user, pos)
        # Host events: the longest prefix acked by every consumer (none yet:
        # nothing is acked) or older than max_age.
        acked = min(self._evcursors.values()) if self._evcursors else 0
        floor = pos = self._evmeta["floor"]
        last = self._evmeta["last"]
        while pos < last and (pos + 1 <= acked or self._events[pos + 1][0] < age_cutoff):
            pos += 1
            self._del(self._events, pos)
        if pos != floor:
            self._set(self._evmeta, "floor", pos)
        return Reclaimed(removed, forgotten, pos - floor)

    # --------------------------------------------------------- host events

    def _append_event(self, now: int, data: bytes) -> int:
        eid = self._evmeta["last"] + 1
        self._set(self._evmeta, "last", eid)
        self._set(self._events, eid, (now, data))
        return eid

    def _append_event_op(self, op: AppendEvent) -> Result:
        return EventAppended(self._append_event(op.now, op.data))

    def _ack_events(self, op: AckEvents) -> Result:
        cursor = max(self._evcursors.get(op.consumer, 0), min(op.upto, self._evmeta["last"]))
        self._set(self._evcursors, op.consumer, cursor)
        return EventsAcked(op.consumer, cursor)

    def _delete_consumer(self, op: DeleteConsumer) -> Result:
        if op.consumer not in self._evcursors:
            return ConsumerDeleted(op.consumer, False)
        self._del(self._evcursors, op.consumer)
        return ConsumerDeleted(op.consumer, True)

    def _read_events(self, op: ReadEvents) -> Result:
        with self._lock:
            self._check_open()
            if not (valid_id(op.consumer) and (op.after is None or type(op.after) is int) and type(op.limit) is int):
                return Rejected(ErrorCode.BAD_REQUEST)
            cursor = self._evcursors.get(op.consumer, 0)
            after = cursor if op.after is None else op.after
            last = self._evmeta["last"]
            start = max(after, self._evmeta["floor"]) + 1
            end = min(last, start + max(op.limit, 0) - 1)
            page = tuple(StoredEvent(i, *self._events[i]) for i in range(start, end + 1))
            consumers = tuple(sorted(self._evcursors.items())) if op.limit == 0 else ()
            return EventsPage(cursor, page, last, consumers)

    # ---------------------------------------------------------- group admin

    def _create_group(self, op: CreateGroup) -> Result:
        if op.conv in self._groups:
            return Rejected(ErrorCode.ALREADY_EXISTS)
        self._set(self._groups, op.conv, op.now)
        self._set(self._visible, op.conv, bool(op.history_visible))
        self._set(self._members, op.conv, frozenset(op.members))
        for user in op.members:
            self._flag(user, op.conv, MEMBER, True)
            self._set(self._spans, (op.conv, user), ((0, OPEN),))
        return GroupChanged(op.conv, tuple(sorted(op.members)))

    def _change_members(self, op: Any, *, last_may_leave: bool = False) -> Result:
        """AddMembers / RemoveMembers.  A removal that would leave no member
        is refused as a whole (BAD_REQUEST, see :class:`RemoveMembers`),
        unless ``last_may_leave`` (a purge of the user's data)."""
        if op.conv not in self._groups:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        if type(op) is RemoveMembers and not last_may_leave and removes_everyone(self._members[op.conv], op.users):
            return Rejected(ErrorCode.BAD_REQUEST)
        add = type(op) is AddMembers
        if any(st[0] in self._msgs for st in op.stamps):
            return Rejected(ErrorCode.INTERNAL)  # a broken clock: nothing changed
        conv = op.conv
        clock = max(op.now, self._hwm["server_time"] + 1)
        entries = []
        positions = []
        for i, user in enumerate(op.users):
            current = self._members[conv]
            if (user in current) == add:
                continue  # no change, no entry
            if op.stamps:
                msg_id, server_time = op.stamps[i]
            else:
                # Made here (no broker clock): ids no broker makes (its node
                # id is random), times strictly above every stored one.
                while True:
                    msg_id, server_time = clock.to_bytes(8, "big") + bytes(8), clock
                    clock += 1
                    if msg_id not in self._msgs:
                        break
            seq = self._conv_last.get(conv, 0) + 1
            spans = self._spans.get((conv, user), ())
            if add:
                members = current | {user}
                self._set(self._spans, (conv, user), spans + ((seq, OPEN),))
                recipients = members  # the joiner learns it too
            else:
                members = current - {user}
                self._set(self._spans, (conv, user), spans[:-1] + ((spans[-1][0], seq),))
                recipients = current  # the leaver learns it too
            self._set(self._members, conv, members)
            self._flag(user, conv, MEMBER, add)
            m = StoredMessage(
                msg_id=msg_id,
                conv=conv,
                seq=seq,
                sender=user,
                device="",
                local_id=0,
                client_time=server_time,
                server_time=server_time,
                payload=op.by.encode("utf-8"),
                kind=int(MessageKind.JOINED if add else MessageKind.LEFT),
                after_seq=seq - 1,
            )
            self._set(self._conv_last, conv, seq)
            self._set(self._conv_seq, (conv, seq), msg_id)
            self._set(self._msgs, msg_id, m)
            pos_list = []
            for member in sorted(recipients):
                pos = self._head.get(member, 0) + 1
                self._set(self._head, member, pos)
                self._set(self._sub(self._inbox, member), pos, (msg_id, server_time))
                self._flag(member, conv, HAS_MESSAGES, True)
                pos_list.append((member, pos))
            if server_time > self._hwm["server_time"]:
                self._set(self._hwm, "server_time", server_time)
            if op.event:
                self._append_event(server_time, message_event(m, recipients))
            entries.append(m)
            positions.append(tuple(pos_list))
        return GroupChanged(conv, tuple(sorted(self._members[conv])), tuple(entries), tuple(positions))

    # ----------------------------------------------------- retention, purge

    def has_retention(self) -> Optional[bool]:
        """See :meth:`Store.has_retention`."""
        with self._lock:
            return bool(self._retention)

    def _set_retention(self, op: SetRetention) -> Result:
        if self._group_members(op.conv) is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        if (op.max_age, op.max_count) == (-1, -1):
            if op.conv in self._retention:
                self._del(self._retention, op.conv)
        else:
            self._set(self._retention, op.conv, (op.max_age, op.max_count))
        return RetentionSet(op.conv, op.max_age, op.max_count)

    def _read_retention(self, op: ReadRetention) -> Result:
        with self._lock:
            self._check_open()
            if not valid_conversation(op.conv):
                return Rejected(ErrorCode.BAD_REQUEST)
            age, count = self._retention.get(op.conv, (-1, -1))
            return RetentionState(op.conv, age, count, self._hfloor.get(op.conv, 0))

    def _recipients(self, conv: str) -> list[str]:
        """Every user who may hold inbox entries of ``conv``."""
        pair = direct_members(conv)
        if pair is not None:
            return list(pair)
        return sorted({u for (c, u) in self._spans if c == conv})

    def _trim(self, conv: str, upto: int) -> tuple[int, int]:
        """Remove the entries of ``conv`` from its history floor up to seq
        ``upto`` (messages, dedupe records, inbox entries); the floor
        becomes ``upto``.  (entries removed, inbox entries removed)."""
        floor = self._hfloor.get(conv, 0)
        if upto <= floor:
            return 0, 0
        gone: set[bytes] = set()
        for seq in range(floor + 1, upto + 1):
            msg_id = self._conv_seq[(conv, seq)]
            m = self._msgs[msg_id]
            key = (m.sender, m.device, m.local_id)
            prior = self._dedupe.get(key)
            if prior is not None and prior[0] == msg_id:
                self._del(self._dedupe, key)  # with its message, never before
            self._del(self._conv_seq, (conv, seq))
            self._del(self._msgs, msg_id)
            gone.add(msg_id)
        self._set(self._hfloor, conv, upto)
        entries = 0
        for user in self._recipients(conv):
            inbox = self._inbox.get(user, {})
            for pos in [p for p, (msg_id, _) in inbox.items() if msg_id in gone]:
                self._del(inbox, pos)
                entries += 1
        return upto - floor, entries

    def _expire(self, op: Expire) -> Result:
        if not self._retention and not (op.max_age or op.max_count):
            return Expired(0, 0, 0)
        convs = msgs = entries = 0
        ids: list[str] = []
        resume = ""
        # The walk: conversation ids in sorted order, after ``op.after``.
        order = sorted(self._conv_last)
        for conv in order[bisect.bisect_right(order, op.after) if op.after else 0 :]:
            if len(ids) >= EXPIRED_IDS:
                resume = ids[-1]  # (more to look at: the next Expire goes on after it)
                break
            last = self._conv_last[conv]
            age, count = retention_limits(self._retention.get(conv, (-1, -1)), op.max_age, op.max_count)
            if not (age or count):
                continue
            upto = floor = self._hfloor.get(conv, 0)
            if count and last - count > upto:
                upto = last - count
            if age:
                cutoff = op.now - age
                while upto < last and self._msgs[self._conv_seq[(conv, upto + 1)]].server_time < cutoff:
                    upto += 1
            if op.keep:  # (Expire: nothing younger than keep goes)
                young = op.now - op.keep
                while upto > floor and self._msgs[self._conv_seq[(conv, upto)]].server_time >= young:
                    upto -= 1
            if upto > floor:
                n, e = self._trim(conv, upto)
                convs, msgs, entries = convs + 1, msgs + n, entries + e
                ids.append(conv)
        return Expired(convs, msgs, entries, tuple(ids), resume)

    def _purge_conversation(self, op: PurgeConversation) -> Result:
        conv = op.conv
        users = self._recipients(conv)
        last = self._conv_last.get(conv, 0)
        msgs, entries = self._trim(conv, last)
        if last > self._purged.get(conv, 0):
            self._set(self._purged, conv, last)
        keep_reads = is_direct(conv)  # (a 1:1 chat's markers stay: PurgeConversation)
        for user in users:
            if (user, conv) in self._reads and not keep_reads:
                self._del(self._reads, (user, conv))
            convs = self._userconv.get(user, {})
            if conv in convs:
                self._del(convs, conv)
            if (conv, user) in self._spans:
                self._del(self._spans, (conv, user))
        # (A 1:1 chat lives on with its own retention setting; a group is
        # gone with its setting: PurgeConversation.)
        for table in (self._groups, self._visible, self._members) + (() if keep_reads else (self._retention,)):
            if conv in table:
                self._del(table, conv)
        return Purged(msgs, entries, last_seq=last, users=() if keep_reads else tuple(users))

    def _purge_user(self, op: PurgeUser) -> Result:
        user = op.user
        changes = []
        for conv in sorted(self._userconv.get(user, {})):
            if conv in self._groups and user in self._members[conv]:
                res = self._change_members(RemoveMembers(conv, (user,), op.now), last_may_leave=True)
                assert isinstance(res, GroupChanged)
                changes.append(res)
        tombstones = 0
        for key, (msg_id, _, _, _) in list(self._dedupe.items()):
            if key[0] != user:
                continue
            m = self._msgs.get(msg_id)
            if m is not None and m.seq:  # seq 0: a DELETE entry (no payload of its own)
                self._set(self._msgs, msg_id, purged_tombstone(m))
                tombstones += 1
            self._del(self._dedupe, key)
        inbox = self._inbox.get(user, {})
        entries = len(inbox)
        if entries:
            self._set(self._inbox, user, {})
        if self._floor.get(user, 0) != self._head.get(user, 0):
            self._set(self._floor, user, self._head[user])
        devices = len(self._devices.get(user, {}))
        if user in self._devices:
            self._del(self._devices, user)
        for rkey in [k for k in self._reads if k[0] == user]:
            self._del(self._reads, rkey)
        for skey in [k for k in self._spans if k[1] == user]:
            self._del(self._spans, skey)
        if user in self._userconv:
            self._del(self._userconv, user)
        # The user's own settings, deletions for themselves and privacy.
        for ckey in [k for k in self._convset if k[0] == user]:
            self._del(self._convset, ckey)
        for dkey in [k for k in self._deleted if k[0] == user]:
            self._del(self._deleted, dkey)
        if user in self._privacy:
            self._del(self._privacy, user)
        if self._revoked.get((user, ""), 0) < op.now:
            self._set(self._revoked, (user, ""), op.now)
        return Purged(tombstones, entries, devices, tuple(changes))

    # --------------------------------------------------------------- reads

    def conversation_exists(self, conv: str) -> bool:
        with self._lock:
            self._check_open()
            return valid_conversation(conv) and self._group_members(conv) is not None

    def members(self, conv: str) -> tuple[str, ...]:
        with self._lock:
            self._check_open()
            if not valid_conversation(conv):
                return ()
            return tuple(sorted(self._group_members(conv) or ()))

    def is_member(self, conv: str, user: str) -> bool:
        with self._lock:
            self._check_open()
            if not valid_conversation(conv):
                return False
            return user in (self._group_members(conv) or ())

    def _purge_point(self, conv: str) -> int:
        return self._purged.get(conv, 0)

    def last_seq(self, conv: str) -> int:
        with self._lock:
            self._check_open()
            return self._conv_last.get(conv, 0)

    def history(self, conv: str, from_seq: int, limit: int, backward: bool = False) -> list[StoredMessage]:
        with self._lock:
            self._check_open()
            last = self._conv_last.get(conv, 0)
            if limit <= 0:
                return []
            # Seqs are exactly floor+1..last (gap-free), so a page is a seq range.
            floor = self._hfloor.get(conv, 0)
            if backward:
                top = last if from_seq <= 0 else min(from_seq - 1, last)
                seqs = range(top, max(top - limit, floor), -1)
            else:
                start = max(from_seq, floor) + 1
                seqs = range(start, min(last, start + limit - 1) + 1)
            return [self._current(self._msgs[self._conv_seq[(conv, s)]]) for s in seqs]

    def message(self, msg_id: bytes) -> Optional[StoredMessage]:
        with self._lock:
            self._check_open()
            return self._msgs.get(msg_id)

    def inbox_head(self, user: str) -> int:
        with self._lock:
            self._check_open()
            return self._head.get(user, 0)

    def inbox_floor(self, user: str) -> int:
        with self._lock:
            self._check_open()
            return self._floor.get(user, 0)

    def inbox_range(self, user: str, after: int, limit: int) -> list[tuple[int, StoredMessage]]:
        with self._lock:
            self._check_open()
            inbox = self._inbox.get(user, {})
            # Entries are floor+1..head (reclaim removes a prefix) but for
            # the holes retention and purges leave (skipped).
            pos = max(after, self._floor.get(user, 0)) + 1
            head = self._head.get(user, 0)
            out: list[tuple[int, StoredMessage]] = []
            while pos <= head and len(out) < limit:
                entry = inbox.get(pos)
                if entry is not None:
                    out.append((pos, self._current(self._msgs[entry[0]], user)))
                pos += 1
            return out

    def device(self, user: str, device: str) -> Optional[DeviceState]:
        with self._lock:
            self._check_open()
            return self._devices.get(user, {}).get(device)

    def devices(self, user: str) -> list[DeviceState]:
        with self._lock:
            self._check_open()
            devs = self._devices.get(user, {})
            return [devs[d] for d in sorted(devs)]

    def read_marker(self, user: str, conv: str) -> int:
        with self._lock:
            self._check_open()
            return self._reads.get((user, conv), 0)

    def read_positions(self, conv: str) -> dict[str, int]:
        with self._lock:
            self._check_open()
            if not valid_conversation(conv):
                return {}
            return {u: self._reads.get((u, conv), 0) for u in sorted(self._group_members(conv) or ())}

    def _spans_of(self, conv: str, user: str) -> tuple[tuple[int, int], ...]:
        pair = direct_members(conv)
        if pair is not None:
            return ((0, OPEN),) if user in pair else ()
        return self._spans.get((conv, user), ())

    def _unread(self, user: str, conv: str) -> int:
        marker = max(self._reads.get((user, conv), 0), self._hfloor.get(conv, 0))
        last = self._conv_last.get(conv, 0)
        n = 0
        for lo, hi in member_ranges(self._spans_of(conv, user)):
            for s in range(max(lo, marker + 1), min(hi, last) + 1):
                n += unread_for(self._msgs[self._conv_seq[(conv, s)]], user, (user, conv, s) in self._deleted)
        return n

    def spans(self, conv: str, user: str) -> tuple[tuple[int, int], ...]:
        with self._lock:
            self._check_open()
            if not (valid_conversation(conv) and valid_id(user)):
                return ()
            return self._spans_of(conv, user)

    def history_visible(self, conv: str) -> bool:
        with self._lock:
            self._check_open()
            return self._visible.get(conv, False)

    def _read_history(self, op: ReadHistory) -> HistoryPage:
        with self._lock:
            self._check_open()
            if not (valid_conversation(op.conv) and (valid_id(op.user) or op.user == "")):
                return HistoryPage(ErrorCode.BAD_REQUEST, ())
            if self._group_members(op.conv) is None:
                return HistoryPage(ErrorCode.UNKNOWN_CONVERSATION, ())
            if op.user:
                spans = self._spans_of(op.conv, op.user)
                if not spans:
                    return HistoryPage(ErrorCode.NOT_MEMBER, ())
                visible = visible_ranges(spans, self._visible.get(op.conv, False))
            else:
                visible = [(1, OPEN)]  # the broker's own read: every seq
            ranges = after_floor(visible, self._hfloor.get(op.conv, 0))
            page: list[StoredMessage] = []
            if op.limit > 0:
                for s in iter_page_seqs(ranges, self._conv_last.get(op.conv, 0), op.from_seq, op.backward):
                    m = self._msgs[self._conv_seq[(op.conv, s)]]
                    if not hidden_amend(m, visible):
                        page.append(self._current(m, op.user))
                        if len(page) == op.limit:
                            break
            return HistoryPage(ErrorCode.OK, tuple(page))

    def _read_readers(self, op: ReadReaders) -> ReadersPage:
        with self._lock:
            self._check_open()
            if not (valid_conversation(op.conv) and (valid_id(op.user) or op.user == "")):
                return ReadersPage(ErrorCode.BAD_REQUEST, ())
            members = self._group_members(op.conv)
            if members is None:
                return ReadersPage(ErrorCode.UNKNOWN_CONVERSATION, ())
            if op.user and op.user not in members:  # (empty: the broker's own read)
                return ReadersPage(ErrorCode.NOT_MEMBER, ())
            last = self._conv_last.get(op.conv, 0)
            return ReadersPage(
                ErrorCode.OK, tuple((u, min(self._reads.get((u, op.conv), 0), last)) for u in sorted(members))
            )

    # ------------------------------------------------ conversation list

    def _entry(self, user: str, conv: str) -> ConversationEntry:
        spans = self._spans_of(conv, user)
        last_seq = last_visible(spans, self._conv_last.get(conv, 0))
        # The last message is the last MESSAGE/JOINED/LEFT entry, as it is now
        # (RECALL/EDIT entries amend it in place): walk back over amend entries.
        seq, floor, last = last_seq, last_message_floor(spans), None
        while seq >= floor and seq:
            msg_id = self._conv_seq.get((conv, seq))  # None: removed by retention
            last = self._msgs[msg_id] if msg_id is not None else None
            if last is None or last.kind not in AMENDING:
                break
            seq, last = seq - 1, None
        if last is not None:
            # As history returns it to this user: one they deleted for
            # themselves is `deleted`, no payload (else every ConvUpdate
            # brought it back into their devices' views, with later edits).
            last = self._current(last, user)
        marker = self._reads.get((user, conv), 0)
        mentions = 0
        for lo, hi in member_ranges(spans):
            for s in range(max(lo, marker + 1), min(hi, last_seq) + 1):
                msg_id = self._conv_seq.get((conv, s))  # None: removed by retention
                # (deleted for themselves: no mention, as a recalled message)
                mentions += msg_id is not None and mentions_user(self._msgs[msg_id], user, (user, conv, s) in self._deleted)
        settings = self._convset.get((user, conv), (False, False, 0))
        return conversation_entry(conv, last, marker, self._unread(user, conv), mentions, settings)

    def _list_access(self, user: str, conv: str) -> ErrorCode:
        """May ``user`` have settings / an entry for ``conv``?"""
        members = self._group_members(conv)
        if members is None:
            return ErrorCode.UNKNOWN_CONVERSATION
        if conv in self._userconv.get(user, {}) or user in members:
            return ErrorCode.OK
        return ErrorCode.NOT_MEMBER

    def _set_conversation(self, op: SetConversation) -> Result:
        code = self._list_access(op.user, op.conv)
        if code is not ErrorCode.OK:
            return Rejected(code)
        key = (op.user, op.conv)
        old = self._convset.get(key, (False, False, 0))
        last_seq = last_visible(self._spans_of(op.conv, op.user), self._conv_last.get(op.conv, 0))
        new = new_settings(op, old, last_seq)
        if new != old:
            if new == (False, False, 0):
                self._del(self._convset, key)
            else:
                self._set(self._convset, key, new)
        return ConversationSet(op.user, op.conv, self._entry(op.user, op.conv), new != old)

    def _read_conversations(self, op: ReadConversations) -> ConversationsPage:
        with self._lock:
            self._check_open()
            if not (valid_id(op.user) and type(op.limit) is int and isinstance(op.cursor, bytes)
                    and (op.conv == "" or valid_conversation(op.conv))):
                return ConversationsPage(ErrorCode.BAD_REQUEST, ())
            convs = self._userconv.get(op.user, {})
            if op.conv:
                code = ErrorCode.OK if op.conv in convs else self._list_access(op.user, op.conv)
                if code is not ErrorCode.OK:
                    return ConversationsPage(code, ())
                return ConversationsPage(ErrorCode.OK, (self._entry(op.user, op.conv),))
            return conversation_page([self._entry(op.user, c) for c in convs], op)

    def unread(self, user: str, conv: str) -> int:
        with self._lock:
            self._check_open()
            if not (valid_id(user) and valid_conversation(conv)):
                return 0
            return self._unread(user, conv)

    def conversations(self, user: str) -> list[str]:
        with self._lock:
            self._check_open()
            return sorted(self._userconv.get(user, {}))

    # ----------------------------------------------------------- lifecycle

    def close(self) -> None:
        with self._lock:
            self._closed = True


_HANDLERS: dict[type, Callable[[MemoryStore, Any], Result]] = {
    NewMessage: MemoryStore._new_message,
    AckPosition: MemoryStore._ack,
    TouchDevice: MemoryStore._touch,
    MarkRead: MemoryStore._mark_read,
    Reclaim: MemoryStore._reclaim,
    CreateGroup: MemoryStore._create_group,
    AddMembers: MemoryStore._change_members,
    RemoveMembers: MemoryStore._change_members,
    RevokeTokens: MemoryStore._revoke,
    SetPresencePrivacy: MemoryStore._set_privacy,
    AppendEvent: MemoryStore._append_event_op,
    AckEvents: MemoryStore._ack_events,
    DeleteConsumer: MemoryStore._delete_consumer,
    AmendMessage: MemoryStore._amend,
    SetConversation: MemoryStore._set_conversation,
    SetRetention: MemoryStore._set_retention,
    Expire: MemoryStore._expire,
    PurgeConversation: MemoryStore._purge_conversation,
    PurgeUser: MemoryStore._purge_user,
}
