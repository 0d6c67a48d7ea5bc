"""Contract tests of the store (pimcore.store.base), run against every backend.

Everything goes through the public :class:`Store` interface, so the same test
checks :class:`MemoryStore` (the oracle) and :class:`LmdbStore`.  A
model-based test then drives both with the same random operations and
demands identical results and reads; LMDB-only properties (persistence, map
growth, concurrent readers) come last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pimcore.errors import ErrorCode, StoreError
from pimcore.frames import MessageKind

JOINED, LEFT = MessageKind.JOINED, MessageKind.LEFT

from pimcore.store import (
    AckPosition,
    AddMembers,
    ConversationState,
    CreateGroup,
    GroupChanged,
    HistoryPage,
    SessionLoaded,
    LoadSession,
    ReadHistory,
    ReadInbox,
    ReadDevices,
    RemoveMembers,
    Acked,
    Appended,
    DeviceState,
    DevicesPage,
    Duplicate,
    LmdbStore,
    MarkRead,
    MemoryStore,
    NewMessage,
    ReadMarked,
    Reclaim,
    Reclaimed,
    Rejected,
    Result,
    Store,
    TouchDevice,
    Touched,
    WriteBatch,
    direct_conversation,
)
from pimcore.store import AmendMessage, SetConversation
from pimcore.store import lmdb as lmdb_module
from pimcore.store import Expire, PurgeConversation, PurgeUser, ReadDedupe, ReadRetention, SetRetention

BACKENDS = ["memory", "lmdb", "lmdb-log"]
AB = direct_conversation("alice", "bob")  # "d:alice:bob"
GROUP = "team"
DAY = 86_400 * 1_000_000


def open_store(kind: str, path: Path, **kwargs: object) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "lmdb-log":
        kwargs.setdefault("durability", "log")
    return LmdbStore(path, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=BACKENDS + [pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "redis":
        # RedisStore (an AsyncStore) behind a blocking face, in a namespace
        # of its own on the session's cluster (tests/_redis_store.py).
        from _redis_store import BlockingRedisStore

        s: Store = BlockingRedisStore(request.getfixturevalue("redis_cluster").addresses)
        yield s
        s.close()
        return
    if request.param != "lmdb-log":
        s = open_store(request.param, tmp_path / "db")
        yield s
        s.close()
        return
    # Log durability: no checkpoint after the open's, so every batch of the
    # test is in the command log; at the end a crash copy must replay to the
    # same bytes (replay is deterministic for every op the test used).  Every
    # batch's record is flushed by the worker thread while LMDB applies it
    # (the overlap of big batches); tests/test_command_log.py runs both ways.
    from test_command_log import _crash_copy
    from test_store_plain import _dump

    mp = pytest.MonkeyPatch()
    mp.setattr(lmdb_module._LogState, "checkpoint_bytes", 1 << 40)
    mp.setattr(lmdb_module._LogState, "checkpoint_seconds", 1e9)
    mp.setattr(lmdb_module._LogState, "overlap_ops", 1)
    try:
        s = open_store(request.param, tmp_path / "db")
        yield s
        assert isinstance(s, LmdbStore)
        if s._env is not None:
            copy = _crash_copy(tmp_path / "db", tmp_path / "replayed")
            want = _dump(s)
            s.close()
            again = LmdbStore(copy, durability="log")
            try:
                assert _dump(again) == want
            finally:
                again.close()
        s.close()
    finally:
        mp.undo()


def digest(conv: str, payload: bytes) -> bytes:
    return hashlib.sha256(conv.encode() + b"\0" + payload).digest()[:16]


class Maker:
    """Builds NewMessage ops the way the broker core does: strictly increasing
    server times, msg_id = server time + node id, digest of (conv, payload),
    local ids counting up per (sender, device) unless given."""

    def __init__(self, node: bytes, start: int = 1_000_000) -> None:
        self.node = node
        self.time = start
        self.local: dict[tuple[str, str], int] = {}
        self.batches = itertools.count(1)

    def __call__(
        self,
        conv: str,
        sender: str,
        device: str = "phone",
        local_id: Optional[int] = None,
        payload: bytes = b"hello",
        server_time: Optional[int] = None,
        after_seq: int = 0,
    ) -> NewMessage:
        if local_id is None:
            local_id = self.local.get((sender, device), 0) + 1
        self.local[(sender, device)] = max(self.local.get((sender, device), 0), local_id)
        if server_time is None:
            self.time += 1
            server_time = self.time
        return NewMessage(
            msg_id=server_time.to_bytes(8, "big") + self.node,
            conv=conv,
            sender=sender,
            device=device,
            local_id=local_id,
            client_time=server_time - 5,
            server_time=server_time,
            payload=payload,
            digest=digest(conv, payload),
            after_seq=after_seq,
        )

    def commit(self, store: Store, *ops: object) -> tuple[Result, ...]:
        return store.commit(WriteBatch(next(self.batches), tuple(ops)))  # type: ignore[arg-type]


@pytest.fixture
def mk(store: Store) -> Maker:
    return Maker(store.node_id())


def inbox_ids(store: Store, user: str) -> list[tuple[int, bytes]]:
    return [(pos, m.msg_id) for pos, m in store.inbox_range(user, 0, 10_000)]


def snapshot(store: Store, users: list[str], convs: list[str]) -> dict:
    """Everything observable about ``users`` and ``convs`` through reads."""
    return {
        "hwm": store.last_server_time(),
        "users": {
            u: (
                store.inbox_head(u),
                store.inbox_floor(u),
                store.inbox_range(u, 0, 10_000),
                store.devices(u),
                store.conversations(u),
                {c: (store.read_marker(u, c), store.unread(u, c), store.is_member(c, u)) for c in convs},
            )
            for u in users
        },
        "convs": {
            c: (
                store.conversation_exists(c),
                store.members(c),
                store.last_seq(c),
                store.history(c, 0, 10_000),
                store.history(c, 0, 10_000, backward=True),
                store.read_positions(c),
            )
            for c in convs
        },
    }


# ---------------------------------------------------------------- storing


def test_direct_message_is_stored_once_and_in_both_inboxes(store: Store, mk: Maker) -> None:
    op = mk(AB, "alice")
    (res,) = mk.commit(store, op)
    assert res == Appended(op.msg_id, 1, op.server_time, (("alice", 1), ("bob", 1)))
    stored = store.message(op.msg_id)
    assert stored is not None
    assert (stored.conv, stored.seq, stored.sender, stored.device, stored.local_id) == (AB, 1, "alice", "phone", 1)
    assert (stored.client_time, stored.server_time, stored.payload) == (op.client_time, op.server_time, op.payload)
    # The sender's own inbox holds it too (for her other devices).
    assert inbox_ids(store, "alice") == [(1, op.msg_id)] and inbox_ids(store, "bob") == [(1, op.msg_id)]
    assert store.inbox_head("alice") == store.inbox_head("bob") == 1
    assert store.history(AB, 0, 10) == [stored]
    assert store.last_seq(AB) == 1
    assert store.last_server_time() == op.server_time
    assert store.conversations("alice") == store.conversations("bob") == [AB]
    assert store.inbox_range("carol", 0, 10) == [] and store.conversations("carol") == []


def test_group_message_reaches_every_member_in_one_commit(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["carol", "alice", "bob"], now=1)
    mk.commit(store, mk(AB, "bob"))  # bob's inbox is ahead by one
    op = mk(GROUP, "carol", "tablet")
    (res,) = mk.commit(store, op)
    assert isinstance(res, Appended)
    assert res.seq == 1
    assert res.positions == (("alice", 2), ("bob", 2), ("carol", 1))  # sorted by user
    for user, pos in res.positions:
        assert (pos, op.msg_id) in inbox_ids(store, user)
        assert store.inbox_head(user) == pos
    assert store.inbox_head("dave") == 0


def test_messages_in_one_batch_see_each_other(store: Store, mk: Maker) -> None:
    first, second, other = mk(AB, "alice"), mk(AB, "bob"), mk(direct_conversation("alice", "carol"), "alice")
    mk.commit(store, mk(AB, "alice"))
    results = mk.commit(store, first, other, second)
    assert [r.seq for r in results] == [2, 1, 3]  # type: ignore[union-attr]
    assert [r.positions for r in results] == [  # type: ignore[union-attr]
        (("alice", 2), ("bob", 2)),
        (("alice", 3), ("carol", 1)),
        (("alice", 4), ("bob", 3)),
    ]
    assert [m.msg_id for m in store.history(AB, 1, 10)] == [first.msg_id, second.msg_id]


@pytest.mark.parametrize("kind", BACKENDS)
@settings(max_examples=40, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.tuples(st.sampled_from(["ab", "ac", "bc", "grp"]), st.booleans()), min_size=1, max_size=12),
        min_size=1,
        max_size=12,
    )
)
def test_seq_is_gap_free_and_increasing_per_conversation(kind: str, batches: list[list[tuple[str, bool]]]) -> None:
    convs = {
        "ab": direct_conversation("a", "b"),
        "ac": direct_conversation("a", "c"),
        "bc": direct_conversation("b", "c"),
        "grp": "grp",
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(kind, Path(tmp))
        try:
            store.create_group("grp", ["a", "b", "c"], now=0)
            mk = Maker(store.node_id())
            expected: dict[str, int] = {c: 0 for c in convs.values()}
            for batch in batches:
                ops = []
                for short, first_member in batch:
                    conv = convs[short]
                    sender = store.members(conv)[0 if first_member else -1]
                    ops.append(mk(conv, sender))
                for op, res in zip(ops, mk.commit(store, *ops)):
                    assert isinstance(res, Appended)
                    expected[op.conv] += 1
                    assert res.seq == expected[op.conv]  # next seq, in op order
            for conv, n in expected.items():
                assert store.last_seq(conv) == n
                assert [m.seq for m in store.history(conv, 0, 1000)] == list(range(1, n + 1))
            for user in "abc":
                positions = [p for p, _ in store.inbox_range(user, 0, 10_000)]
                assert positions == list(range(1, store.inbox_head(user) + 1))
        finally:
            store.close()


def test_last_server_time_is_the_highest_stored(store: Store, mk: Maker) -> None:
    assert store.last_server_time() == 0
    mk.commit(store, mk(AB, "alice", server_time=500), mk(AB, "bob", server_time=300))
    assert store.last_server_time() == 500
    mk.commit(store, mk(AB, "bob", server_time=400))
    assert store.last_server_time() == 500
    # A rejected message does not move it.
    mk.commit(store, mk("nope", "bob", server_time=900))
    assert store.last_server_time() == 500


def test_message_lookup(store: Store, mk: Maker) -> None:
    assert store.message(bytes(16)) is None
    assert store.message(b"short") is None


# ---------------------------------------------------------------- dedupe


def test_retry_is_a_duplicate_with_the_original_identity(store: Store, mk: Maker) -> None:
    original = mk(AB, "alice", local_id=7)
    (first,) = mk.commit(store, original)
    assert isinstance(first, Appended)
    before = snapshot(store, ["alice", "bob"], [AB])
    # The client resends: same key and content, but the core stamps a new
    # server time and msg id for the attempt.
    retry = mk(AB, "alice", local_id=7)
    assert retry.msg_id != original.msg_id
    (again,) = mk.commit(store, retry)
    assert again == Duplicate(original.msg_id, 1, original.server_time)
    assert snapshot(store, ["alice", "bob"], [AB]) == before  # nothing stored twice
    assert store.message(retry.msg_id) is None


def test_same_key_different_content_is_a_conflict(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice", "bob"], now=1)
    mk.commit(store, mk(AB, "alice", local_id=7, payload=b"one"))
    before = snapshot(store, ["alice", "bob"], [AB, GROUP])
    conflicts = mk.commit(
        store,
        mk(AB, "alice", local_id=7, payload=b"two"),
        mk(GROUP, "alice", local_id=7, payload=b"one"),  # same payload, other conversation
    )
    assert conflicts == (Rejected(ErrorCode.DUPLICATE_CONFLICT),) * 2
    assert snapshot(store, ["alice", "bob"], [AB, GROUP]) == before


def test_duplicates_inside_one_batch(store: Store, mk: Maker) -> None:
    a = mk(AB, "alice", local_id=1, payload=b"x")
    a_retry = mk(AB, "alice", local_id=1, payload=b"x")
    a_conflict = mk(AB, "alice", local_id=1, payload=b"y")
    res = mk.commit(store, a, a_retry, a_conflict)
    assert res[0] == Appended(a.msg_id, 1, a.server_time, (("alice", 1), ("bob", 1)))
    assert res[1] == Duplicate(a.msg_id, 1, a.server_time)
    assert res[2] == Rejected(ErrorCode.DUPLICATE_CONFLICT)
    assert store.last_seq(AB) == 1 and store.inbox_head("bob") == 1


def test_dedupe_key_is_sender_device_and_local_id(store: Store, mk: Maker) -> None:
    res = mk.commit(
        store,
        mk(AB, "alice", "phone", local_id=1),
        mk(AB, "alice", "laptop", local_id=1),
        mk(AB, "bob", "phone", local_id=1),
        mk(AB, "alice", "phone", local_id=2),
    )
    assert [type(r) for r in res] == [Appended] * 4
    assert store.last_seq(AB) == 4


def test_read_dedupe_says_whether_a_key_is_stored(store: Store, mk: Maker) -> None:
    """ReadDedupe (what the broker asks before a content check) is true
    exactly for the stored (sender, device, local_id) keys."""
    from pimcore.store import Deduped, ReadDedupe, StoreRequest

    mk.commit(store, mk(AB, "alice", "phone", local_id=1))

    def probe(*ops: ReadDedupe) -> list[bool]:
        res = store.execute(StoreRequest(1, ops, False))
        assert all(type(r) is Deduped for r in res)
        return [r.stored for r in res]  # type: ignore[union-attr]

    assert probe(ReadDedupe("alice", "phone", 1), ReadDedupe("alice", "phone", 2), ReadDedupe("alice", "laptop", 1),
                 ReadDedupe("bob", "phone", 1), ReadDedupe("a b", "phone", 1), ReadDedupe("alice", "phone", -1)) == \
        [True, False, False, False, False, False]
    assert store.deduped("alice", "phone", 1) and not store.deduped("alice", "phone", 3)


def test_dedupe_is_checked_before_membership(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice", "bob"], now=1)
    sent = mk(GROUP, "bob", local_id=3)
    mk.commit(store, sent)
    store.remove_members(GROUP, ["bob"])
    # Bob never saw the ack; his retry must still get the stored identity...
    assert mk.commit(store, mk(GROUP, "bob", local_id=3)) == (Duplicate(sent.msg_id, 1, sent.server_time),)
    # ...while a new message of his is refused.
    assert mk.commit(store, mk(GROUP, "bob", local_id=4)) == (Rejected(ErrorCode.NOT_MEMBER),)


def test_reused_msg_id_fails_only_that_op(store: Store, mk: Maker) -> None:
    first = mk(AB, "alice", server_time=100)
    clash = mk(AB, "bob", server_time=100)  # same msg id: a broken clock
    fine = mk(AB, "bob")
    res = mk.commit(store, first, clash, fine)
    assert res[1] == Rejected(ErrorCode.INTERNAL)
    assert isinstance(res[0], Appended) and isinstance(res[2], Appended) and res[2].seq == 2
    stored = store.message(first.msg_id)
    assert stored is not None and stored.sender == "alice"
    # The clashing key was not recorded: its retry with a fresh id is stored.
    assert isinstance(mk.commit(store, mk(AB, "bob", local_id=clash.local_id))[0], Appended)


def test_msg_id_stored_in_another_conversation_fails_only_that_op(store: Store, mk: Maker) -> None:
    # (The Redis store tells a msg id stored in this conversation -- maybe
    # this very message, finished by another node -- from one stored in
    # another, which only a broken clock makes.)
    store.create_group(GROUP, ["alice", "bob"], 1)
    first = mk(AB, "alice", server_time=700)
    mk.commit(store, first)
    clash = mk(GROUP, "bob", server_time=700)
    assert mk.commit(store, clash) == (Rejected(ErrorCode.INTERNAL),)
    assert store.history(GROUP, 0, 10) == [] and not store.deduped("bob", "phone", clash.local_id)
    assert store.message(first.msg_id).conv == AB  # type: ignore[union-attr]


def test_msg_id_stored_by_an_earlier_commit_fails_only_that_op(store: Store, mk: Maker) -> None:
    first = mk(AB, "alice", server_time=500)
    mk.commit(store, first)
    clash = mk(AB, "bob", server_time=500)  # the clock went back onto a stored id
    before = mk(AB, "bob", server_time=400)  # back, but onto a free id: sorts first
    res = mk.commit(store, mk(AB, "alice", server_time=600), clash, before)
    assert res[1] == Rejected(ErrorCode.INTERNAL)
    assert isinstance(res[0], Appended) and res[0].seq == 2
    assert isinstance(res[2], Appended) and res[2].seq == 3
    assert [(m.seq, m.server_time) for m in store.history(AB, 0, 10)] == [(1, 500), (2, 600), (3, 400)]
    assert store.message(first.msg_id).sender == "alice"  # type: ignore[union-attr]
    assert store.deduped("bob", "phone", before.local_id) and not store.deduped("bob", "phone", clash.local_id)


def test_ops_after_messages_in_one_batch_read_them(store: Store, mk: Maker) -> None:
    """Whatever a batch's messages wrote is seen by the later ops of the
    same batch: reads, unread counts, amends, the conversation list."""
    m1, m2, e = mk(AB, "alice", payload=b"one"), mk(AB, "alice", payload=b"two"), mk(AB, "alice")
    res = mk.commit(
        store,
        m1,
        m2,
        MarkRead("bob", AB, 1),
        AmendMessage(e.msg_id, AB, "alice", "phone", e.local_id, e.client_time, e.server_time, MessageKind.EDIT, 2,
                     b"TWO", digest(AB, b"edit two")),
        mk(AB, "alice", local_id=m1.local_id, payload=b"one"),  # a retry after the amend
        SetConversation("bob", AB, pinned=1),
        mk(AB, "bob"),
        MarkRead("alice", AB, 10),
    )
    assert res[2] == ReadMarked("bob", AB, 1, 2, 1, True)
    assert isinstance(res[3], Appended) and res[3].seq == 3
    assert res[4] == Duplicate(m1.msg_id, 1, m1.server_time)
    entry = res[5].entry  # type: ignore[union-attr]
    assert (entry.last.payload, entry.read_seq, entry.unread, entry.pinned) == (b"TWO", 1, 1, True)
    assert isinstance(res[6], Appended) and res[6].seq == 4
    assert res[7] == ReadMarked("alice", AB, 4, 4, 0, True)
    assert [(m.seq, m.payload) for m in store.history(AB, 0, 10)] == [(1, b"one"), (2, b"TWO"), (3, b"TWO"), (4, b"hello")]
    assert store.unread("bob", AB) == 1


# ---------------------------------------------------------------- validation


def _with(op: NewMessage, **changes: object) -> NewMessage:
    return dataclasses.replace(op, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"sender": "al ice"},
        {"sender": ""},
        {"sender": "x" * 65},
        {"device": "ph:one"},
        {"local_id": -1},
        {"local_id": 1 << 64},
        {"local_id": True},
        {"client_time": 1 << 63},
        {"server_time": -1},
        {"msg_id": b"\x00" * 15},
        {"payload": "text"},
        {"digest": None},
    ],
)
def test_malformed_new_message_is_bad_request(store: Store, mk: Maker, changes: dict) -> None:
    op = _with(mk(AB, "alice"), **changes)
    assert mk.commit(store, op) == (Rejected(ErrorCode.BAD_REQUEST),)
    assert store.last_seq(AB) == 0 and store.inbox_head("bob") == 0


@pytest.mark.parametrize(
    "conv",
    ["d:bob:alice", "d:alice:alice", "d:alice", "d:alice:bob:carol", "d:al ice:bob", "with space", "", "x" * 129, "é"],
)
def test_malformed_conversation_is_bad_request(store: Store, mk: Maker, conv: str) -> None:
    assert mk.commit(store, mk(conv, "alice")) == (Rejected(ErrorCode.BAD_REQUEST),)
    assert store.inbox_head("alice") == 0 and store.last_server_time() == 0


def test_unknown_group_and_non_members_are_refused(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice"], now=1)
    bob_in_group = mk(GROUP, "bob")
    res = mk.commit(
        store,
        mk("ghosts", "alice"),
        bob_in_group,
        mk(AB, "carol"),  # a direct conversation has exactly its two users
    )
    assert res == (
        Rejected(ErrorCode.UNKNOWN_CONVERSATION),
        Rejected(ErrorCode.NOT_MEMBER),
        Rejected(ErrorCode.NOT_MEMBER),
    )
    assert store.last_seq(GROUP) == store.last_seq(AB) == 0
    # A refused message leaves no dedupe record: once allowed, it is stored.
    store.add_members(GROUP, ["bob"])
    assert isinstance(mk.commit(store, bob_in_group)[0], Appended)


def test_device_and_read_ops_with_bad_fields_are_bad_request(store: Store, mk: Maker) -> None:
    bad = Rejected(ErrorCode.BAD_REQUEST)
    assert mk.commit(
        store,
        AckPosition("bad user", "phone", 1, 10),
        AckPosition("alice", "", 1, 10),
        TouchDevice("alice", "p" * 65, 0, 10),
        TouchDevice("alice", "phone", 0, 1 << 63),
        MarkRead("alice", "d:bob:alice", 1),
        MarkRead("al:ice", AB, 1),
        Reclaim(1.5, 0, 0),  # type: ignore[arg-type]
    ) == (bad,) * 7
    assert store.devices("alice") == []


def test_failed_commit_applies_nothing(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice", "bob"], now=1)
    mk.commit(store, mk(AB, "alice"), TouchDevice("bob", "phone", 0, 10))
    before = snapshot(store, ["alice", "bob"], [AB, GROUP])
    ops = (
        mk(AB, "bob", local_id=50, server_time=10**12),
        mk(GROUP, "alice", local_id=51),
        AckPosition("bob", "phone", 1, 20),
        TouchDevice("alice", "laptop", 0, 20),
        MarkRead("bob", AB, 1),
        Reclaim(10**13, 1, 1),
        "not an op",  # makes the batch raise
    )
    with pytest.raises(StoreError):
        store.commit(WriteBatch(99, ops))  # type: ignore[arg-type]
    assert snapshot(store, ["alice", "bob"], [AB, GROUP]) == before
    # No dedupe record survived either: the same messages are new.
    res = mk.commit(store, *ops[:2])
    assert [(type(r), r.seq) for r in res] == [(Appended, 2), (Appended, 1)]  # type: ignore[union-attr]


def test_closed_store_raises(store: Store, mk: Maker) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError):
        mk.commit(store, mk(AB, "alice"))
    for call in (
        store.node_id,
        store.last_server_time,
        lambda: store.history(AB, 0, 10),
        lambda: store.inbox_range("alice", 0, 10),
        lambda: store.inbox_head("alice"),
        lambda: store.members(AB),
        lambda: store.conversations("alice"),
        lambda: store.create_group("g2", ["alice"], 1),
        lambda: store.unread("alice", AB),
    ):
        with pytest.raises(StoreError):
            call()


def test_reads_of_malformed_ids_find_nothing(store: Store, mk: Maker) -> None:
    mk.commit(store, mk(AB, "alice"))
    for user in ("", "a b", "é", "x" * 300):
        assert store.inbox_head(user) == 0 and store.inbox_floor(user) == 0
        assert store.inbox_range(user, 0, 10) == [] and store.devices(user) == []
        assert store.conversations(user) == [] and store.device(user, "phone") is None
        assert store.read_marker(user, AB) == 0 and store.unread(user, AB) == 0
        assert not store.is_member(AB, user)
    for conv in ("", "d:bob:alice", "a b", "é" * 200):
        assert not store.conversation_exists(conv) and store.members(conv) == ()
        assert store.last_seq(conv) == 0 and store.history(conv, 0, 10) == []
        assert store.read_positions(conv) == {} and store.unread("alice", conv) == 0


# ---------------------------------------------------------------- membership


def test_a_membership_change_is_bounded_by_the_entries_it_writes(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each added or removed user's entry goes to every member's inbox: one
    # call of 20,000 users in a group of 20,000 wrote 400M inbox entries in
    # one commit (22 GB, the broker silent for minutes).  Past
    # MAX_MEMBERSHIP_ENTRIES a change of several users is refused, nothing
    # changed; one user at a time is always taken (it costs one message).
    from pimcore import ids

    monkeypatch.setattr(ids, "MAX_MEMBERSHIP_ENTRIES", 20)
    store.create_group("g", ["a", "b", "c", "d"], now=1)
    with pytest.raises(ValueError, match=r"group 'g' not changed: 5 users x 9 members"):
        store.add_members("g", ["u1", "u2", "u3", "u4", "u5"])
    assert store.members("g") == ("a", "b", "c", "d")
    store.add_members("g", ["u1", "u2"])  # 2 x 6 = 12
    store.add_members("g", ["u3"])
    with pytest.raises(ValueError, match=r"at most 2 users at a time"):
        store.remove_members("g", ["a", "b", "c", "d"])  # 4 x 7 = 28
    assert len(store.members("g")) == 7
    store.remove_members("g", ["a", "b"])  # 2 x 7 = 14
    # Only the users that change count: a retry of a change done, or users
    # given who are members already (no longer members), write nothing.
    store.add_members("g", ["c", "d", "u1", "u2", "u3"])
    store.remove_members("g", ["a", "b", "x1", "x2", "x3", "x4", "x5"])
    monkeypatch.setattr(ids, "MAX_MEMBERSHIP_ENTRIES", 1)
    store.remove_members("g", ["c"])  # one user: always
    assert store.members("g") == ("d", "u1", "u2", "u3")


def test_group_administration(store: Store) -> None:
    assert not store.conversation_exists(GROUP)
    store.create_group(GROUP, ["carol", "alice", "alice"], now=1)
    assert store.conversation_exists(GROUP)
    assert store.members(GROUP) == ("alice", "carol")
    assert store.is_member(GROUP, "alice") and not store.is_member(GROUP, "bob")
    with pytest.raises(ValueError):
        store.create_group(GROUP, ["bob"], now=2)  # exists
    assert store.members(GROUP) == ("alice", "carol")
    for bad_conv in (AB, "d:bob:alice", "has space", ""):
        with pytest.raises(ValueError):
            store.create_group(bad_conv, ["alice"], now=1)
        with pytest.raises(ValueError):
            store.add_members(bad_conv, ["alice"])
        with pytest.raises(ValueError):
            store.remove_members(bad_conv, ["alice"])
    with pytest.raises(ValueError):
        store.create_group("g2", ["alice", "not valid"], now=1)
    with pytest.raises(ValueError):
        store.create_group("g2", "alice", now=1)  # a string, not a list
    with pytest.raises(ValueError):
        store.add_members(GROUP, ["ok", "not:ok"])
    assert not store.conversation_exists("g2") and store.members(GROUP) == ("alice", "carol")
    with pytest.raises(KeyError):
        store.add_members("g3", ["alice"])
    with pytest.raises(KeyError):
        store.remove_members("g3", ["alice"])
    store.add_members(GROUP, ["bob", "alice"])
    assert store.members(GROUP) == ("alice", "bob", "carol")
    store.remove_members(GROUP, ["carol", "dave"])
    assert store.members(GROUP) == ("alice", "bob")
    # A group of no one is refused, as the broker and every handle refuse it
    # (the store took it: "empty: 0 members").
    for empty in ([], (), set()):
        with pytest.raises(ValueError, match="at least one member"):
            store.create_group("empty", empty, now=1)
    assert not store.conversation_exists("empty") and store.members("empty") == ()


def test_group_admin_ops_are_ordered_inside_a_batch(store: Store, mk: Maker) -> None:
    """CreateGroup/AddMembers/RemoveMembers are ops of a batch: each later op
    of the same batch sees the membership they leave (and the cache of
    members a commit keeps does not hide them)."""
    (created, first) = mk.commit(store, CreateGroup(GROUP, ("alice", "bob"), 1), mk(GROUP, "alice"))
    assert created == GroupChanged(GROUP, ("alice", "bob"))
    assert [u for u, _ in first.positions] == ["alice", "bob"]
    (second, added, third, removed, refused, fourth) = mk.commit(
        store,
        mk(GROUP, "alice"),
        AddMembers(GROUP, ("carol",)),
        mk(GROUP, "carol"),
        RemoveMembers(GROUP, ("bob",)),
        mk(GROUP, "bob"),
        mk(GROUP, "alice"),
    )
    assert [u for u, _ in second.positions] == ["alice", "bob"]
    assert (added.conv, added.members) == (GROUP, ("alice", "bob", "carol"))
    assert [(e.kind, e.sender, e.seq) for e in added.entries] == [(JOINED, "carol", 3)]
    assert [u for u, _ in third.positions] == ["alice", "bob", "carol"]
    assert (removed.conv, removed.members) == (GROUP, ("alice", "carol"))
    assert [(e.kind, e.sender, e.seq) for e in removed.entries] == [(LEFT, "bob", 5)]
    assert [u for u, _ in removed.positions[0]] == ["alice", "bob", "carol"]
    assert refused == Rejected(ErrorCode.NOT_MEMBER)
    assert [u for u, _ in fourth.positions] == ["alice", "carol"]
    again, unknown, bad = mk.commit(
        store, CreateGroup(GROUP, ("dave",), 2), AddMembers("nope", ("dave",)), CreateGroup(AB, ("alice",), 2)
    )
    assert again == Rejected(ErrorCode.ALREADY_EXISTS)
    assert unknown == Rejected(ErrorCode.UNKNOWN_CONVERSATION)
    assert bad == Rejected(ErrorCode.BAD_REQUEST)


def test_a_removal_that_would_leave_a_group_of_no_one_is_refused_as_a_whole(store: Store, mk: Maker) -> None:
    """Removing every member left a group of no one (to which a post was
    then stored).  The store, which knows the membership when it applies
    the op, refuses such a RemoveMembers as a whole: Rejected(BAD_REQUEST),
    no one removed, no LEFT entry stored -- also when the op's users come
    last in the same batch, after earlier removals.  A purge of the last
    member's data still takes them out (a purge is no removal to refuse)."""
    (created,) = mk.commit(store, CreateGroup(GROUP, ("alice", "bob", "carol"), 1))
    assert created == GroupChanged(GROUP, ("alice", "bob", "carol"))
    (everyone,) = mk.commit(store, RemoveMembers(GROUP, ("alice", "bob", "carol", "zed")))
    assert everyone == Rejected(ErrorCode.BAD_REQUEST)
    assert store.members(GROUP) == ("alice", "bob", "carol")
    (some,) = mk.commit(store, RemoveMembers(GROUP, ("alice", "zed")))
    assert isinstance(some, GroupChanged) and some.members == ("bob", "carol")
    assert [(e.kind, e.sender, e.seq) for e in some.entries] == [(LEFT, "alice", 1)]  # no entry of the refusal
    one, rest = mk.commit(store, RemoveMembers(GROUP, ("bob",)), RemoveMembers(GROUP, ("carol",)))
    assert isinstance(one, GroupChanged) and one.members == ("carol",)
    assert rest == Rejected(ErrorCode.BAD_REQUEST)
    assert store.members(GROUP) == ("carol",)
    (noop,) = mk.commit(store, RemoveMembers(GROUP, ("zed",)))  # removes no one: leaves carol
    assert isinstance(noop, GroupChanged) and noop.members == ("carol",) and noop.entries == ()
    (last,) = mk.commit(store, RemoveMembers(GROUP, ("carol",)))
    assert last == Rejected(ErrorCode.BAD_REQUEST)
    with pytest.raises(ValueError, match="purge"):
        store.remove_members(GROUP, ["carol"])
    (sent,) = mk.commit(store, mk(GROUP, "carol"))
    assert isinstance(sent, Appended) and sent.seq == 3  # LEFT alice 1, LEFT bob 2: nothing else stored
    mk.commit(store, PurgeUser("carol", 10**9))
    assert store.members(GROUP) == ()


def test_read_requests(store: Store, mk: Maker) -> None:
    """The read ops the core sends: one LoadSession answers a whole login."""
    store.create_group(GROUP, ["alice", "bob", "carol"], now=1)
    mk.commit(store, mk(AB, "alice"), mk(AB, "alice"), mk(GROUP, "carol"), MarkRead("alice", AB, 2), TouchDevice("bob", "phone", 1, 5))
    mk.commit(store, MarkRead("bob", AB, 1))
    (bob, new, bad, inbox, hist, denied, unknown) = store.read(
        (
            LoadSession("bob", "phone"),
            LoadSession("bob", "tablet"),
            LoadSession("bob", "not ok"),
            ReadInbox("bob", 1, 10),
            ReadHistory(AB, "bob", 0, 1, True),
            ReadHistory(GROUP, "dave", 0, 10),
            ReadHistory("nope", "bob", 0, 10),
        )
    )
    assert isinstance(bob, SessionLoaded) and (bob.head, bob.floor, bob.position) == (3, 0, 1)
    assert bob.conversations == (
        ConversationState(AB, 1, 2, 1, "alice", 2),
        ConversationState(GROUP, 0, 1, 1, "", 0),
    )
    assert new.position == -1 and new.conversations == bob.conversations
    assert bad == Rejected(ErrorCode.BAD_REQUEST)
    assert [pos for pos, _ in inbox.entries] == [2, 3]
    assert hist.code is ErrorCode.OK and [m.seq for m in hist.messages] == [2]
    assert denied == HistoryPage(ErrorCode.NOT_MEMBER, ())
    assert unknown == HistoryPage(ErrorCode.UNKNOWN_CONVERSATION, ())
    with pytest.raises(TypeError):
        store.read((mk(AB, "alice"),))  # a write op is not a read


def test_membership_changes_apply_to_later_messages(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice", "bob"], now=1)
    old = mk(GROUP, "alice")
    mk.commit(store, old)
    store.add_members(GROUP, ["carol"])
    store.remove_members(GROUP, ["bob"])
    new = mk(GROUP, "carol")
    (res,) = mk.commit(store, new)
    assert isinstance(res, Appended)
    # Each change is an entry of its own: alice has old, carol JOINED, bob
    # LEFT, new; carol from her JOINED on; bob up to his LEFT.
    assert res.positions == (("alice", 4), ("carol", 3))
    assert [pos for pos, _ in inbox_ids(store, "carol")][-1] == 3
    assert [m.kind for _, m in store.inbox_range("carol", 0, 10)] == [JOINED, LEFT, 0]
    assert [m.kind for _, m in store.inbox_range("bob", 0, 10)] == [0, JOINED, LEFT]
    assert [m.msg_id for m in store.history(GROUP, 0, 10)][::3] == [old.msg_id, new.msg_id]


def test_direct_conversations_have_implied_members(store: Store) -> None:
    assert store.conversation_exists(AB)
    assert store.members(AB) == ("alice", "bob")
    assert store.is_member(AB, "bob") and not store.is_member(AB, "carol")
    assert store.read_positions(AB) == {"alice": 0, "bob": 0}
    assert not store.conversation_exists("d:bob:alice")  # not canonical
    assert store.members("d:bob:alice") == ()


# ---------------------------------------------------------------- devices


def test_each_device_has_its_own_position(store: Store, mk: Maker) -> None:
    mk.commit(store, *(mk(AB, "alice") for _ in range(5)))
    assert mk.commit(
        store,
        TouchDevice("bob", "phone", 0, 10),
        TouchDevice("bob", "laptop", 0, 10),
        AckPosition("bob", "phone", 4, 11),
        AckPosition("bob", "laptop", 2, 12),
    ) == (
        Touched("bob", "phone", 0, True),
        Touched("bob", "laptop", 0, True),
        Acked("bob", "phone", 4),
        Acked("bob", "laptop", 2),
    )
    assert store.devices("bob") == [DeviceState("bob", "laptop", 2, 12), DeviceState("bob", "phone", 4, 11)]
    assert store.device("bob", "phone") == DeviceState("bob", "phone", 4, 11)
    assert store.device("bob", "tablet") is None and store.devices("alice") == []
    # The same as a read op (the embedding handle's read positions).
    assert store.read((ReadDevices("bob"), ReadDevices("alice"), ReadDevices("not ok"))) == (
        DevicesPage("bob", (DeviceState("bob", "laptop", 2, 12), DeviceState("bob", "phone", 4, 11))),
        DevicesPage("alice", ()),
        Rejected(ErrorCode.BAD_REQUEST),
    )


def test_ack_only_moves_forward_and_is_clamped_to_the_head(store: Store, mk: Maker) -> None:
    mk.commit(store, *(mk(AB, "alice") for _ in range(3)))
    assert mk.commit(
        store,
        AckPosition("bob", "phone", 2, 10),  # unknown device: registered
        AckPosition("bob", "phone", 1, 11),
        AckPosition("bob", "phone", 99, 12),
        AckPosition("bob", "phone", -5, 13),
    ) == (Acked("bob", "phone", 2), Acked("bob", "phone", 2), Acked("bob", "phone", 3), Acked("bob", "phone", 3))
    assert store.device("bob", "phone") == DeviceState("bob", "phone", 3, 13)
    # last_seen never goes back either (a late ack with an old time).
    mk.commit(store, AckPosition("bob", "phone", 3, 5))
    assert store.device("bob", "phone") == DeviceState("bob", "phone", 3, 13)


def test_touch_registers_at_the_floor_and_moves_forward_only(store: Store, mk: Maker) -> None:
    mk.commit(store, *(mk(AB, "alice") for _ in range(6)))
    mk.commit(store, TouchDevice("bob", "old", 0, 10), AckPosition("bob", "old", 4, 10), Reclaim(20, DAY, DAY))
    assert store.inbox_floor("bob") == 4
    res = mk.commit(
        store,
        TouchDevice("bob", "new", 0, 30),  # a new device starts at the floor
        TouchDevice("bob", "new", 5, 31),  # resume cursor ahead of a lost ack
        TouchDevice("bob", "new", 2, 32),  # never backwards
        TouchDevice("bob", "new", 1000, 33),  # clamped to the head
        TouchDevice("bob", "new", 0, 3),  # an old time does not rewind last_seen
    )
    assert res == (
        Touched("bob", "new", 4, True),
        Touched("bob", "new", 5, False),
        Touched("bob", "new", 5, False),
        Touched("bob", "new", 6, False),
        Touched("bob", "new", 6, False),
    )
    assert store.device("bob", "new") == DeviceState("bob", "new", 6, 33)


# ---------------------------------------------------------------- reclamation


def test_entries_are_reclaimed_only_when_every_device_passed_them(store: Store, mk: Maker) -> None:
    mk.commit(store, *(mk(AB, "alice") for _ in range(5)))
    mk.commit(store, TouchDevice("bob", "phone", 0, 10), TouchDevice("bob", "laptop", 0, 10))
    mk.commit(store, AckPosition("bob", "phone", 5, 11), AckPosition("bob", "laptop", 2, 11))
    assert mk.commit(store, Reclaim(100, DAY, DAY)) == (Reclaimed(2, 0),)
    assert store.inbox_floor("bob") == 2 and store.inbox_head("bob") == 5
    assert [p for p, _ in store.inbox_range("bob", 0, 100)] == [3, 4, 5]
    assert [p for p, _ in store.inbox_range("bob", 3, 1)] == [4]
    assert mk.commit(store, Reclaim(100, DAY, DAY)) == (Reclaimed(0, 0),)  # idempotent
    mk.commit(store, AckPosition("bob", "laptop", 4, 12))
    assert mk.commit(store, Reclaim(100, DAY, DAY)) == (Reclaimed(2, 0),)
    assert store.inbox_floor("bob") == 4
    # Alice has no device at all: nothing of hers was acked, nothing reclaimed.
    assert store.inbox_floor("alice") == 0 and len(store.inbox_range("alice", 0, 100)) == 5
    # Reclaiming inbox entries never deletes the messages (the history).
    assert [m.seq for m in store.history(AB, 0, 100)] == [1, 2, 3, 4, 5]
    assert all(store.message(m.msg_id) is not None for _, m in store.inbox_range("alice", 0, 100))


def test_device_retention_forgets_stale_devices(store: Store, mk: Maker) -> None:
    mk.commit(store, *(mk(AB, "alice") for _ in range(4)))
    mk.commit(
        store,
        TouchDevice("bob", "stale", 0, 1_000),
        TouchDevice("bob", "fresh", 0, 5_000),
        AckPosition("bob", "fresh", 3, 5_000),
    )
    # Cutoff 6000 - 2000 = 4000: "stale" (last seen 1000) goes; then only
    # "fresh" holds entries back.
    assert mk.commit(store, Reclaim(6_000, 2_000, DAY)) == (Reclaimed(3, 1),)
    assert [d.device for d in store.devices("bob")] == ["fresh"]
    assert store.inbox_floor("bob") == 3
    # Seen exactly at the cutoff is kept.
    assert mk.commit(store, Reclaim(7_000, 2_000, DAY)) == (Reclaimed(0, 0),)
    assert mk.commit(store, Reclaim(7_001, 2_000, DAY)) == (Reclaimed(0, 1),)
    # The forgotten device is new again, at the floor.
    assert mk.commit(store, TouchDevice("bob", "stale", 0, 8_000)) == (Touched("bob", "stale", 3, True),)


def test_max_age_reclaims_entries_nobody_took(store: Store, mk: Maker) -> None:
    for t in (100, 200, 300, 400):
        mk.commit(store, mk(AB, "alice", server_time=t))
    mk.commit(store, TouchDevice("bob", "phone", 0, 400))
    # Older than now - max_age = 1000 - 750 = 250: positions 1 and 2.
    assert mk.commit(store, Reclaim(1_000, DAY, 750)) == (Reclaimed(4, 0),)  # 2 of alice's, 2 of bob's
    assert store.inbox_floor("bob") == store.inbox_floor("alice") == 2
    assert [m.server_time for _, m in store.inbox_range("bob", 0, 10)] == [300, 400]
    assert store.device("bob", "phone") == DeviceState("bob", "phone", 0, 400)  # not moved
    # A device registering now starts at the floor.
    assert mk.commit(store, TouchDevice("alice", "phone", 0, 1_000)) == (Touched("alice", "phone", 2, True),)
    # A retry of a reclaimed entry's message is still a duplicate.
    first = store.history(AB, 0, 1)[0]
    assert mk.commit(store, mk(AB, "alice", local_id=first.local_id)) == (Duplicate(first.msg_id, 1, 100),)


def test_reclamation_takes_a_prefix(store: Store, mk: Maker) -> None:
    # Position 1 is young, position 2 old (a clock out of order): the floor
    # semantics "positions <= floor are gone" keeps position 2 until 1 goes.
    mk.commit(store, mk(AB, "alice", server_time=900), mk(AB, "alice", server_time=100))
    assert mk.commit(store, Reclaim(1_000, DAY, 500)) == (Reclaimed(0, 0),)
    assert [p for p, _ in store.inbox_range("bob", 0, 10)] == [1, 2]
    mk.commit(store, TouchDevice("bob", "phone", 1, 1_000))
    assert mk.commit(store, Reclaim(1_000, DAY, 500)) == (Reclaimed(2, 0),)  # bob: 1 by ack, then 2 by age
    assert store.inbox_floor("bob") == 2 and store.inbox_range("bob", 0, 10) == []
    assert store.inbox_floor("alice") == 0


def test_ops_after_a_reclaim_in_the_same_batch_see_it(store: Store, mk: Maker) -> None:
    mk.commit(store, TouchDevice("bob", "phone", 0, 10))
    res = mk.commit(
        store,
        mk(AB, "alice"),
        mk(AB, "alice"),
        AckPosition("bob", "phone", 2, 11),
        Reclaim(12, DAY, DAY),
        mk(AB, "alice"),
        TouchDevice("bob", "tablet", 0, 12),
        AckPosition("bob", "phone", 3, 13),
        Reclaim(13, DAY, DAY),
        TouchDevice("bob", "watch", 0, 13),
    )
    assert res[3] == Reclaimed(2, 0) and res[7] == Reclaimed(0, 0)  # the tablet holds position 3
    assert isinstance(res[4], Appended) and res[4].positions == (("alice", 3), ("bob", 3))
    assert res[5] == Touched("bob", "tablet", 2, True) and res[8] == Touched("bob", "watch", 2, True)
    assert store.inbox_floor("bob") == 2 and store.inbox_head("bob") == 3
    assert [p for p, _ in store.inbox_range("bob", 0, 10)] == [3]


def test_inbox_positions_continue_after_reclaim(store: Store, mk: Maker) -> None:
    mk.commit(store, mk(AB, "alice"), mk(AB, "alice"))
    mk.commit(store, TouchDevice("bob", "phone", 2, 10), Reclaim(10, DAY, DAY))
    (res,) = mk.commit(store, mk(AB, "alice"))
    assert isinstance(res, Appended) and dict(res.positions)["bob"] == 3
    assert [p for p, _ in store.inbox_range("bob", 0, 10)] == [3]
    assert store.inbox_range("bob", -10, 10) == store.inbox_range("bob", 2, 10)
    assert store.inbox_range("bob", 3, 10) == [] and store.inbox_range("bob", 0, 0) == []


# ---------------------------------------------------------------- read markers


def test_read_marker_moves_forward_only_and_is_clamped(store: Store, mk: Maker) -> None:
    mk.commit(store, mk(AB, "alice"), mk(AB, "bob"), mk(AB, "alice"), mk(AB, "alice"))
    assert store.unread("bob", AB) == 3 and store.unread("alice", AB) == 1
    res = mk.commit(
        store,
        MarkRead("bob", AB, 2),
        MarkRead("bob", AB, 1),  # backwards: ignored
        MarkRead("bob", AB, 2),  # same: not changed
        MarkRead("bob", AB, 50),  # clamped to the last seq
    )
    assert res == (
        ReadMarked("bob", AB, 2, 4, 2, True),
        ReadMarked("bob", AB, 2, 4, 2, False),
        ReadMarked("bob", AB, 2, 4, 2, False),
        ReadMarked("bob", AB, 4, 4, 0, True),
    )
    assert store.read_marker("bob", AB) == 4 and store.unread("bob", AB) == 0
    mk.commit(store, mk(AB, "bob"), mk(AB, "alice"))
    assert store.unread("bob", AB) == 1  # his own message does not count
    assert store.unread("alice", AB) == 2
    assert store.read_marker("alice", AB) == 0


def test_read_positions_list_every_member(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice", "bob", "carol"], now=1)
    mk.commit(store, mk(GROUP, "alice"), mk(GROUP, "bob"))
    mk.commit(store, MarkRead("bob", GROUP, 2), MarkRead("alice", GROUP, 1))
    assert store.read_positions(GROUP) == {"alice": 1, "bob": 2, "carol": 0}
    assert store.unread("carol", GROUP) == 2 and store.unread("alice", GROUP) == 1
    store.remove_members(GROUP, ["bob"])
    assert store.read_positions(GROUP) == {"alice": 1, "carol": 0}
    assert store.read_positions("ghosts") == {}


def test_mark_read_checks_the_conversation_and_the_reader(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice", "bob"], now=1)
    store.create_group("quiet", ["alice", "bob"], now=1)
    mk.commit(store, mk(GROUP, "alice"))
    store.remove_members(GROUP, ["bob"])
    store.remove_members("quiet", ["bob"])
    res = mk.commit(
        store,
        MarkRead("bob", "ghosts", 1),
        MarkRead("carol", GROUP, 1),
        MarkRead("carol", AB, 1),
        MarkRead("bob", "quiet", 5),  # removed (seq 1 is his LEFT entry): up to it
        MarkRead("bob", GROUP, 9),  # removed at seq 2: clamped to what he saw
        MarkRead("alice", "quiet", 5),  # a member, only bob's LEFT entry there
    )
    assert res == (
        Rejected(ErrorCode.UNKNOWN_CONVERSATION),
        Rejected(ErrorCode.NOT_MEMBER),  # never a member
        Rejected(ErrorCode.NOT_MEMBER),
        ReadMarked("bob", "quiet", 1, 1, 0, True),
        ReadMarked("bob", GROUP, 2, 2, 0, True),
        ReadMarked("alice", "quiet", 1, 1, 0, True),
    )


# ---------------------------------------------------------------- listings


def test_conversations_of_a_user(store: Store, mk: Maker) -> None:
    store.create_group("zeta", ["carol"], now=1)
    store.create_group("alpha", ["carol", "bob"], now=1)
    store.create_group("beta", ["carol", "bob"], now=1)
    assert store.conversations("carol") == ["alpha", "beta", "zeta"]  # member, no message yet
    ac = direct_conversation("alice", "carol")
    assert ac not in store.conversations("carol")  # direct ones appear with a message
    mk.commit(store, mk(ac, "alice"), mk("alpha", "bob"))
    assert store.conversations("carol") == sorted(["alpha", "beta", "zeta", ac])
    store.remove_members("alpha", ["carol"])  # she got a message there: kept
    store.remove_members("beta", ["carol"])  # kept too: she got her LEFT entry
    assert store.conversations("carol") == sorted(["alpha", "beta", "zeta", ac])
    store.add_members("beta", ["carol"])
    assert store.conversations("carol") == sorted(["alpha", "beta", "zeta", ac])
    assert store.conversations("alice") == [ac]


def test_history_paging(store: Store, mk: Maker) -> None:
    ops = [mk(AB, "alice" if i % 2 else "bob") for i in range(10)]
    mk.commit(store, *ops)
    seqs = lambda page: [m.seq for m in page]  # noqa: E731
    assert seqs(store.history(AB, 0, 4)) == [1, 2, 3, 4]
    assert seqs(store.history(AB, 4, 4)) == [5, 6, 7, 8]
    assert seqs(store.history(AB, 8, 4)) == [9, 10]
    assert seqs(store.history(AB, 10, 4)) == [] and seqs(store.history(AB, 99, 4)) == []
    assert seqs(store.history(AB, -3, 2)) == [1, 2]
    assert seqs(store.history(AB, 0, 3, backward=True)) == [10, 9, 8]
    assert seqs(store.history(AB, 8, 3, backward=True)) == [7, 6, 5]
    assert seqs(store.history(AB, 3, 5, backward=True)) == [2, 1]
    assert seqs(store.history(AB, 1, 5, backward=True)) == []
    assert seqs(store.history(AB, 99, 2, backward=True)) == [10, 9]
    assert store.history(AB, 0, 0) == [] and store.history(AB, 0, -1, backward=True) == []
    assert [m.msg_id for m in store.history(AB, 0, 100)] == [op.msg_id for op in ops]
    # Paging backward from the newest until empty visits every message once.
    seen, cursor = [], 0
    while page := store.history(AB, cursor, 3, backward=True):
        seen += seqs(page)
        cursor = page[-1].seq
    assert seen == list(range(10, 0, -1))


# ---------------------------------------------------------------- model-based

# Small worlds on purpose: few users, devices, local ids and time steps make
# retries, conflicts, clamping and the reclaim cutoffs' boundaries likely.
USERS = ["alice", "bob", "carol"]
DEVICES = ["phone", "laptop"]
GOOD_CONVS = [direct_conversation("alice", "bob"), direct_conversation("alice", "carol"), "g1", "g2"]
BAD_CONVS = ["unknown", "d:bob:alice"]
CONVS = GOOD_CONVS + BAD_CONVS


class StoreModel(RuleBasedStateMachine):
    """Drives MemoryStore and LmdbStore with the same ops; every result and
    every read must be identical."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="pimcore-model-")
        self.memory = MemoryStore()
        # A small map makes growth happen inside the model run too.
        self.lmdb = LmdbStore(self.tmp, durability="os", map_size=1 << 20)
        self.time = 1_000
        self.batch = 0
        self.node = b"\x01" * 8

    def teardown(self) -> None:
        self.memory.close()
        self.lmdb.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def both(self, fn_name: str, *args: object) -> None:
        outcome: list[Optional[type]] = []
        for store in (self.memory, self.lmdb):
            try:
                getattr(store, fn_name)(*args)
                outcome.append(None)
            except (ValueError, KeyError) as exc:
                outcome.append(type(exc))
        assert outcome[0] == outcome[1], (fn_name, args, outcome)

    @initialize()
    def groups(self) -> None:
        self.both("create_group", "g1", ["alice", "bob"], 1)

    message = st.tuples(
        st.one_of(st.sampled_from(GOOD_CONVS), st.sampled_from(GOOD_CONVS), st.sampled_from(BAD_CONVS)),
        st.sampled_from(USERS),
        st.sampled_from(DEVICES),
        st.integers(1, 5),  # few local ids: retries and conflicts happen
        st.sampled_from([b"a", b"b", b"x" * 3000]),  # big payloads fill the map
        st.integers(-1, 4),  # server time step; <= 0 now and then
    ).map(lambda m: ("new", m))
    device_op = st.tuples(st.sampled_from(USERS), st.sampled_from(DEVICES), st.integers(-1, 12), st.integers(0, 8))
    read_op = st.tuples(st.sampled_from(USERS), st.sampled_from(GOOD_CONVS + BAD_CONVS[:1]), st.integers(-1, 8))
    span = st.sampled_from([0, 2, 5, 10, 40, 10**6])
    op = st.one_of(
        message,
        message,
        message,
        device_op.map(lambda a: ("ack", a)),
        device_op.map(lambda a: ("touch", a)),
        read_op.map(lambda a: ("read", a)),
        read_op.map(lambda a: ("read", a)),
        st.tuples(span, span).map(lambda a: ("reclaim", a)),
        # recall / edit / delete-for-self (issue 14): same local ids as sends
        st.tuples(
            st.sampled_from(GOOD_CONVS), st.sampled_from(USERS), st.sampled_from(DEVICES), st.integers(1, 5),
            st.sampled_from([3, 4, 5]), st.integers(1, 6), st.sampled_from([0, 3, 10**6]),
        ).map(lambda a: ("amend", a)),
        # History retention and purges (tests/test_retention.py has the rest).
        st.tuples(st.sampled_from([0, 0, 3, 20]), st.sampled_from([0, 1, 3])).map(lambda a: ("expire", a)),
        st.tuples(st.sampled_from(GOOD_CONVS + ["nope"]), st.sampled_from([-1, 0, 2, 6]),
                  st.sampled_from([-1, 0, 1, 2])).map(lambda a: ("retain", a)),
        st.sampled_from(GOOD_CONVS + ["nope"]).map(lambda a: ("purge_conv", a)),
        st.sampled_from(USERS).map(lambda a: ("purge_user", a)),
    )

    def build(self, kind: str, args: tuple) -> object:
        if kind == "new":
            conv, sender, device, local_id, payload, step = args
            self.time += step
            # A step <= 0 repeats or goes back: sometimes a msg id clash.
            return NewMessage(
                msg_id=self.time.to_bytes(8, "big") + self.node,
                conv=conv,
                sender=sender,
                device=device,
                local_id=local_id,
                client_time=self.time - 7,
                server_time=self.time,
                payload=payload,
                digest=digest(conv, payload),
            )
        self.time += 1
        if kind == "amend":
            from pimcore.store import AmendMessage

            conv, sender, device, local_id, action, target, window = args
            payload = b"e%d" % self.time if action == 4 else b""
            return AmendMessage(
                self.time.to_bytes(8, "big") + self.node, conv, sender, device, local_id, self.time - 7, self.time,
                action, target, payload, digest(conv, bytes((action, target)) + payload), window,
            )
        if kind == "ack":
            user, device, pos, back = args
            return AckPosition(user, device, pos, self.time - back)
        if kind == "touch":
            user, device, pos, back = args
            return TouchDevice(user, device, pos, self.time - back)
        if kind == "read":
            return MarkRead(*args)
        if kind == "expire":
            return Expire(self.time, *args)
        if kind == "retain":
            return SetRetention(*args)
        if kind == "purge_conv":
            return PurgeConversation(args)
        if kind == "purge_user":
            return PurgeUser(args, self.time)
        retention, max_age = args
        return Reclaim(self.time, retention, max_age)

    @rule(ops=st.lists(op, min_size=1, max_size=8))
    def commit(self, ops: list[tuple[str, tuple]]) -> None:
        built = tuple(self.build(kind, args) for kind, args in ops)
        self.batch += 1
        batch = WriteBatch(self.batch, built)  # type: ignore[arg-type]
        assert self.memory.commit(batch) == self.lmdb.commit(batch)

    @rule(ops=st.lists(op, min_size=0, max_size=4))
    def failing_commit(self, ops: list[tuple[str, tuple]]) -> None:
        built = tuple(self.build(kind, args) for kind, args in ops) + (object(),)
        for store in (self.memory, self.lmdb):
            with pytest.raises(StoreError):
                store.commit(WriteBatch(0, built))  # type: ignore[arg-type]

    @rule(conv=st.sampled_from(["g1", "g2", "d:alice:bob", "g 3"]), users=st.lists(st.sampled_from(USERS), max_size=3))
    def create(self, conv: str, users: list[str]) -> None:
        self.both("create_group", conv, users, self.time)

    @rule(
        conv=st.sampled_from(["g1", "g2", "nope"]),
        users=st.lists(st.sampled_from(USERS + ["b@d:"]), max_size=3),
        add=st.booleans(),
    )
    def change(self, conv: str, users: list[str], add: bool) -> None:
        self.both("add_members" if add else "remove_members", conv, users, self.time)

    @rule(
        ops=st.lists(op, min_size=0, max_size=4),
        at=st.integers(0, 4),
        conv=st.sampled_from(["g1", "g2", "nope", "d:alice:bob"]),
        users=st.lists(st.sampled_from(USERS + ["b@d:"]), max_size=3),
        kind=st.sampled_from([CreateGroup, AddMembers, RemoveMembers]),
    )
    def admin_in_a_batch(self, ops: list[tuple[str, tuple]], at: int, conv: str, users: list[str], kind: type) -> None:
        """Group admin is an op of a batch: later ops of the same batch see it."""
        built = [self.build(k, args) for k, args in ops]
        admin = kind(conv, tuple(sorted(set(users))), self.time)
        built.insert(min(at, len(built)), admin)
        self.batch += 1
        batch = WriteBatch(self.batch, tuple(built))  # type: ignore[arg-type]
        assert self.memory.commit(batch) == self.lmdb.commit(batch)

    @invariant()
    def same_read_requests(self) -> None:
        """LMDB answers a read request in one snapshot; the generic version
        (the memory store's) asks its read methods: the answers agree."""
        users = USERS + ["dave", "b@d:"]
        reads = (
            [ReadHistory(c, "", s, 2, b) for c in CONVS + ["g 3", "nope"] for s in (0, 3) for b in (False, True)]
            + [LoadSession(u, d) for u in users for d in DEVICES + ["new"]]
            + [ReadInbox(u, after, 3) for u in users for after in (0, 2)]
            + [ReadHistory(c, u, s, 2, b) for c in CONVS + ["g 3", "nope"] for u in users for s in (0, 3) for b in (False, True)]
            + [ReadRetention(c) for c in CONVS + ["g 3"]]
            + [ReadDedupe(u, d, i) for u in USERS for d in DEVICES for i in range(1, 6)]
        )
        assert self.memory.read(reads) == self.lmdb.read(reads)

    @invariant()
    def same_reads(self) -> None:
        convs = CONVS + ["g 3"]
        users = USERS + ["dave"]
        assert snapshot(self.memory, users, convs) == snapshot(self.lmdb, users, convs)
        for conv in GOOD_CONVS:
            for start in (0, 2, 5):
                for back in (False, True):
                    assert self.memory.history(conv, start, 2, back) == self.lmdb.history(conv, start, 2, back)
        for user in USERS:
            assert self.memory.inbox_range(user, 2, 3) == self.lmdb.inbox_range(user, 2, 3)
            for device in DEVICES:
                assert self.memory.device(user, device) == self.lmdb.device(user, device)


StoreModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
StoreModel.TestCase.pytestmark = [pytest.mark.slow]
test_lmdb_matches_memory_model = StoreModel.TestCase


@pytest.mark.slow
@pytest.mark.redis
def test_redis_matches_memory_model(redis_cluster) -> None:
    """The same model, with RedisStore (behind its blocking face, a fresh
    namespace per run) in place of LMDB: every result and read agrees with
    the memory oracle."""
    from hypothesis.stateful import run_state_machine_as_test

    from _redis_store import BlockingRedisStore

    class RedisModel(StoreModel):
        def __init__(self) -> None:
            super().__init__()
            self.lmdb.close()
            self.lmdb = BlockingRedisStore(redis_cluster.addresses)  # type: ignore[assignment]

    run_state_machine_as_test(
        RedisModel,
        settings=settings(
            max_examples=10,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


# ---------------------------------------------------------------- LMDB only


def test_lmdb_state_survives_reopen(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path, durability="os")
    node = store.node_id()
    mk = Maker(node)
    store.create_group(GROUP, ["alice", "bob", "carol"], now=5)
    sent = [mk(AB, "alice"), mk(GROUP, "carol", server_time=9_000_000), mk(AB, "bob")]
    mk.commit(store, *sent)
    mk.commit(store, TouchDevice("bob", "phone", 1, 77), MarkRead("bob", AB, 1), AckPosition("alice", "pc", 3, 78))
    before = snapshot(store, USERS, [AB, GROUP])
    store.close()

    again = LmdbStore(tmp_path)  # default durability on an "os" store: fine
    try:
        assert again.node_id() == node
        assert again.last_server_time() == 9_000_000
        assert snapshot(again, USERS, [AB, GROUP]) == before
        # The dedupe records persisted too.
        (dup,) = mk.commit(again, mk(AB, "alice", local_id=1))
        assert dup == Duplicate(sent[0].msg_id, 1, sent[0].server_time)
    finally:
        again.close()
    other = LmdbStore(tmp_path / "other")
    try:
        assert other.node_id() != node and other.last_server_time() == 0
    finally:
        other.close()


def test_lmdb_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LmdbStore(tmp_path, durability="fsync")
    with pytest.raises(ValueError):
        LmdbStore(tmp_path, map_size=0)
    with pytest.raises(StoreError):
        LmdbStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    store = LmdbStore(tmp_path / "s", durability="os")
    with store:
        assert store.durability == "os"
    store = LmdbStore(tmp_path / "s", create=False)
    with store:
        assert store.durability == "sync" and store.last_server_time() == 0


def test_lmdb_map_grows_transparently(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path, durability="os", map_size=1 << 20)
    try:
        start = store.map_size
        mk = Maker(store.node_id())
        payload = os.urandom(4000)
        for _ in range(20):  # ~2.5 MB: several doublings across commits
            res = mk.commit(store, *(mk(AB, "alice", payload=payload) for _ in range(30)))
            assert all(isinstance(r, Appended) for r in res)
        # One batch larger than the whole current map: grown mid-transaction.
        count = store.map_size // 50_000
        big = mk.commit(store, *(mk(AB, "bob", payload=os.urandom(60_000)) for _ in range(count)))
        assert all(isinstance(r, Appended) for r in big)
        assert store.map_size >= 4 * start
        n = 600 + len(big)
        assert store.last_seq(AB) == n and store.inbox_head("bob") == n
        assert [m.seq for m in store.history(AB, 0, 10_000)] == list(range(1, n + 1))
    finally:
        store.close()


def test_lmdb_map_growth_has_a_ceiling(tmp_path: Path) -> None:
    store = LmdbStore(tmp_path, durability="os", map_size=1 << 20, max_map_size=1 << 21)
    try:
        mk = Maker(store.node_id())
        with pytest.raises(StoreError):
            mk.commit(store, *(mk(AB, "alice", payload=os.urandom(100_000)) for _ in range(40)))
        assert store.last_seq(AB) == 0  # nothing of the batch applied
        assert isinstance(mk.commit(store, mk(AB, "alice"))[0], Appended)  # still usable
    finally:
        store.close()


def test_lmdb_adopts_a_map_grown_by_another_process(tmp_path: Path) -> None:
    # E.g. `pimcore inspect` open next to a running broker whose map grows.
    store = LmdbStore(tmp_path, durability="os", map_size=1 << 20)
    script = (
        "import os, sys\n"
        "from pimcore.store import LmdbStore, NewMessage, WriteBatch\n"
        "s = LmdbStore(sys.argv[1], durability='os', map_size=1 << 20, owner=False)\n"
        "base = int(sys.argv[2])\n"
        "for b in range(40):\n"
        "    ops = [NewMessage((base + b * 100 + i).to_bytes(8, 'big') + b'other-pr', 'd:alice:bob', 'bob', 'cli',\n"
        "                      base + b * 100 + i, 0, 5, os.urandom(3000), b'd') for i in range(40)]\n"
        "    s.commit(WriteBatch(b, tuple(ops)))\n"
        "s.close()\n"
    )
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    try:
        mk = Maker(store.node_id())
        mk.commit(store, mk(AB, "alice"))
        expected = 1
        for round_, first in enumerate(["write", "read"]):
            size = store.map_size
            base = str(10_000 * (round_ + 1))  # the other process's msg ids
            subprocess.run([sys.executable, "-c", script, str(tmp_path), base], check=True, env=env, timeout=120)
            # The file is now far beyond our map: LMDB refuses transactions
            # until we adopt the other process's map size.
            expected += 1600
            if first == "write":
                assert isinstance(mk.commit(store, mk(AB, "alice"))[0], Appended)
                expected += 1
            assert store.last_seq(AB) == expected
            assert store.map_size > size
        assert isinstance(mk.commit(store, mk(AB, "alice"))[0], Appended)
        assert [m.seq for m in store.history(AB, 0, 10_000)] == list(range(1, expected + 2))
    finally:
        store.close()


def test_lmdb_reads_run_while_another_thread_commits(tmp_path: Path) -> None:
    # The driver commits in a worker thread while the event loop reads; the
    # small map forces resizes, which must wait for in-flight reads.
    store = LmdbStore(tmp_path, durability="os", map_size=1 << 20)
    mk = Maker(store.node_id())
    errors: list[BaseException] = []
    done = threading.Event()

    def writer() -> None:
        try:
            for _ in range(60):
                mk.commit(store, *(mk(AB, "alice", payload=os.urandom(2000)) for _ in range(10)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    last = 0
    reads = 0
    try:
        while not done.is_set() or reads == 0:
            seq = store.last_seq(AB)
            assert seq >= last and seq % 10 == 0  # whole batches only
            # A later read may see later commits, never fewer or holes.
            start = max(seq - 5, 0)
            page = [m.seq for m in store.history(AB, start, 5)]
            assert page == list(range(start + 1, start + 1 + len(page))) and len(page) >= seq - start
            assert store.inbox_head("bob") >= seq
            last, reads = seq, reads + 1
        assert store.map_size > 1 << 20  # it did grow under the readers
    finally:
        thread.join()
        store.close()
    assert not errors, errors
    assert last <= 600 and reads > 0


# ---------------------------------------------------------------- membership history


def test_membership_intervals_unread_history_and_readers(store: Store, mk: Maker) -> None:
    """The store contract of membership (store/base.py, Membership), the
    same on both stores."""
    from pimcore.store import OPEN, ReadersPage, ReadReaders

    store.create_group(GROUP, ["alice", "bob"], now=1)
    mk.commit(store, *[mk(GROUP, "alice") for _ in range(3)])  # 1..3
    store.add_members(GROUP, ["dave"], now=10)  # 4
    mk.commit(store, mk(GROUP, "alice"))  # 5
    store.remove_members(GROUP, ["dave"], now=20)  # 6
    mk.commit(store, mk(GROUP, "bob"))  # 7
    store.add_members(GROUP, ["dave"], now=30)  # 8
    mk.commit(store, mk(GROUP, "alice"))  # 9
    assert store.spans(GROUP, "dave") == ((4, 6), (8, OPEN))
    assert store.spans(GROUP, "alice") == ((0, OPEN),)
    assert store.spans(GROUP, "erin") == () and store.spans(AB, "alice") == ((0, OPEN),)
    assert store.unread("dave", GROUP) == 2  # seqs 5 and 9
    assert store.unread("bob", GROUP) == 5  # every message of alice, no entries
    assert [m.seq for m in store.inbox_range("dave", 0, 10) for m in [m[1]]] == [4, 5, 6, 8, 9]
    (page,) = store.read([ReadHistory(GROUP, "dave", 0, 10)])
    assert [m.seq for m in page.messages] == [4, 5, 6, 8, 9]
    (page,) = store.read([ReadHistory(GROUP, "dave", 0, 2, True)])
    assert [m.seq for m in page.messages] == [9, 8]
    (page,) = store.read([ReadHistory(GROUP, "dave", 8, 2, True)])
    assert [m.seq for m in page.messages] == [6, 5]
    (page,) = store.read([ReadHistory(GROUP, "erin", 0, 10)])
    assert page == HistoryPage(ErrorCode.NOT_MEMBER, ())
    entries = [m for m in store.history(GROUP, 0, 10) if m.kind]
    assert [(m.seq, m.kind, m.sender, m.device, m.local_id, m.after_seq) for m in entries] == [
        (4, JOINED, "dave", "", 0, 3),
        (6, LEFT, "dave", "", 0, 5),
        (8, JOINED, "dave", "", 0, 7),
    ]
    assert store.last_server_time() >= entries[-1].server_time >= 30
    # read markers: clamped to what the user may see, never back
    (r1, r2) = mk.commit(store, MarkRead("dave", GROUP, 99), MarkRead("dave", GROUP, 3))
    assert (r1.read_seq, r1.last_seq, r1.unread) == (9, 9, 0) and r2.read_seq == 9
    store.remove_members(GROUP, ["bob"], now=40)  # 10
    (r,) = mk.commit(store, MarkRead("bob", GROUP, 99))
    assert (r.read_seq, r.last_seq) == (10, 10)
    (r,) = mk.commit(store, MarkRead("erin", GROUP, 1))
    assert r == Rejected(ErrorCode.NOT_MEMBER)
    (readers, former, stranger) = store.read(
        [ReadReaders(GROUP, "dave"), ReadReaders(GROUP, "bob"), ReadReaders(GROUP, "erin")]
    )
    assert readers == ReadersPage(ErrorCode.OK, (("alice", 0), ("dave", 9)))
    assert former == stranger == ReadersPage(ErrorCode.NOT_MEMBER, ())
    # Asked by nobody: the broker's own read (which members to refresh).
    (own, unknown, malformed) = store.read(
        [ReadReaders(GROUP, ""), ReadReaders("no-such-group", ""), ReadReaders("", "")]
    )
    assert own == readers
    assert unknown == ReadersPage(ErrorCode.UNKNOWN_CONVERSATION, ())
    assert malformed == ReadersPage(ErrorCode.BAD_REQUEST, ())
    # ...and its history read: every seq, whoever was a member at it (the
    # entries another writer added, which the core reads to tell the users
    # who left: tests/test_membership.py).
    (own_page, from_5, unknown_page, malformed_page) = store.read(
        [ReadHistory(GROUP, "", 0, 20), ReadHistory(GROUP, "", 5, 3), ReadHistory("no-such-group", "", 0, 10),
         ReadHistory("", "", 0, 10)]
    )
    assert [m.seq for m in own_page.messages] == list(range(1, 11))
    assert [m.seq for m in from_5.messages] == [6, 7, 8]
    assert unknown_page == HistoryPage(ErrorCode.UNKNOWN_CONVERSATION, ())
    assert malformed_page == HistoryPage(ErrorCode.BAD_REQUEST, ())
    (session,) = store.read([LoadSession("bob", "phone")])
    [state] = [s for s in session.conversations if s.conv == GROUP]
    assert (state.read_seq, state.last_seq, state.unread) == (10, 10, 0)


def test_history_visible_is_per_group(store: Store, mk: Maker) -> None:
    store.create_group("open", ["alice"], now=1, history_visible=True)
    store.create_group("closed", ["alice"], now=1)
    assert store.history_visible("open") and not store.history_visible("closed")
    mk.commit(store, mk("open", "alice"), mk("closed", "alice"))
    store.add_members("open", ["dave"], now=5)
    store.add_members("closed", ["dave"], now=5)
    seen = store.read([ReadHistory("open", "dave", 0, 10), ReadHistory("closed", "dave", 0, 10)])
    assert [[m.seq for m in p.messages] for p in seen] == [[1, 2], [2]]
    assert store.unread("dave", "open") == store.unread("dave", "closed") == 0


def test_membership_stamps_from_the_broker_are_used_and_checked(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice"], now=1)
    stamp = (b"\x01" * 16, 12345)
    (res,) = mk.commit(store, AddMembers(GROUP, ("bob",), 12345, "alice", (stamp,)))
    [entry] = res.entries
    assert (entry.msg_id, entry.server_time, entry.payload) == (stamp[0], 12345, b"alice")
    assert res.positions == ((("alice", 1), ("bob", 1)),)
    (again, short) = mk.commit(
        store, RemoveMembers(GROUP, ("bob",), 1, "", (stamp,)), AddMembers(GROUP, ("carol", "dave"), 1, "", (stamp,))
    )
    assert again == Rejected(ErrorCode.INTERNAL)  # msg_id already stored: nothing changed
    assert short == Rejected(ErrorCode.BAD_REQUEST)
    assert store.members(GROUP) == ("alice", "bob")


def test_lmdb_schema_2_store_is_migrated(tmp_path) -> None:
    """Schema 2 had no membership intervals and no group flags: the members
    of that time become members from seq 0, groups get the default."""
    import lmdb
    import struct

    path = str(tmp_path / "old")
    s = LmdbStore(path)
    s.create_group(GROUP, ["alice", "bob"], now=1)
    s.close()
    env = lmdb.open(path, max_dbs=32, subdir=True)
    with env.begin(write=True) as txn:
        meta, groups, spans = (env.open_db(n, txn=txn) for n in (b"meta", b"groups", b"spans"))
        txn.put(b"schema", struct.pack(">Q", 2), db=meta)
        txn.put(b"\x04team", struct.pack(">q", 1), db=groups)
        txn.drop(spans, delete=False)
    env.close()
    s = LmdbStore(path)
    try:
        assert s.spans(GROUP, "alice") == s.spans(GROUP, "bob") == ((0, (1 << 64) - 1),)
        assert not s.history_visible(GROUP)
        s.add_members(GROUP, ["carol"], now=5)
        assert s.spans(GROUP, "carol") == ((1, (1 << 64) - 1),)
    finally:
        s.close()


# ---------------------------------------------------------------- presence (issue 14 part 3)


def test_presence_visibility_follows_shared_conversations(store: Store, mk: Maker) -> None:
    from pimcore.store import PresencePage, ReadPresence

    store.create_group(GROUP, ["alice", "bob"], now=1)
    mk.commit(store, mk(direct_conversation("alice", "dave"), "alice"))
    mk.commit(store, TouchDevice("bob", "phone", 0, 500), TouchDevice("bob", "tablet", 0, 700))

    def seen(user: str, *others: str) -> list[tuple[str, bool, int]]:
        [page] = store.read((ReadPresence(user, others),))
        assert isinstance(page, PresencePage) and page.user == user
        return [(e.user, e.visible, e.last_seen) for e in page.entries]

    assert seen("alice", "bob", "dave", "eve", "alice", "BAD ID") == [
        ("bob", True, 700), ("dave", True, 0), ("eve", False, 0), ("alice", True, 0), ("BAD ID", False, 0),
    ]
    assert seen("eve", "alice", "bob") == [("alice", False, 0), ("bob", False, 0)]
    assert seen("dave", "bob") == [("bob", False, 0)]  # alice's group is not dave's
    store.remove_members(GROUP, ["bob"], now=10)
    assert seen("alice", "bob") == [("bob", False, 0)]  # a former member shares nothing now
    [bad] = store.read((ReadPresence("BAD ID", ("alice",)),))
    assert bad == Rejected(ErrorCode.BAD_REQUEST)


def test_presence_privacy_is_durable_and_reported(store: Store, mk: Maker) -> None:
    from pimcore.store import PresencePrivacySet, ReadPresence, SetPresencePrivacy

    store.create_group(GROUP, ["alice", "bob"], now=1)
    assert not store.hides_last_seen("bob")
    assert mk.commit(store, SetPresencePrivacy("bob", True)) == (PresencePrivacySet("bob", True),)
    assert store.hides_last_seen("bob") and not store.hides_last_seen("alice")
    [page] = store.read((ReadPresence("alice", ("bob",)),))
    assert page.entries[0].hide_last_seen and not page.hide_last_seen
    [page] = store.read((ReadPresence("bob", ()),))
    assert page.hide_last_seen and page.entries == ()
    assert mk.commit(store, SetPresencePrivacy("bob", False), SetPresencePrivacy("bob", False)) == (
        PresencePrivacySet("bob", False), PresencePrivacySet("bob", False))
    assert not store.hides_last_seen("bob")
    assert mk.commit(store, SetPresencePrivacy("BAD ID", True), SetPresencePrivacy("bob", 1)) == (  # type: ignore[arg-type]
        Rejected(ErrorCode.BAD_REQUEST), Rejected(ErrorCode.BAD_REQUEST))


def test_presence_privacy_survives_reopening_lmdb(tmp_path: Path) -> None:
    from pimcore.store import SetPresencePrivacy

    s = LmdbStore(tmp_path / "db")
    s.commit(WriteBatch(1, (SetPresencePrivacy("bob", True),)))
    s.close()
    s = LmdbStore(tmp_path / "db")
    try:
        assert s.hides_last_seen("bob")
    finally:
        s.close()


@pytest.mark.parametrize("durability", ["sync", "os", "log"])
def test_an_lmdb_store_in_a_directory_whose_name_is_not_utf8_opens_stores_and_reopens(
    tmp_path: Path, durability: str
) -> None:
    # A Linux path is any bytes: "new\xff" comes to Python as "new\udcff"
    # (surrogateescape).  LMDB was given the str, which py-lmdb encodes as
    # UTF-8: a UnicodeEncodeError traceback from `pimcore serve --data-dir`,
    # after the directory was made.
    path = os.fsdecode(os.fsencode(str(tmp_path)) + b"/store\xff")
    with LmdbStore(path, durability=durability) as store:
        mk = Maker(store.node_id())
        op = mk(AB, "alice")
        (res,) = mk.commit(store, op)
        assert isinstance(res, Appended)
    assert os.path.isfile(os.path.join(os.fsencode(path), b"data.mdb"))
    with LmdbStore(path, durability=durability) as store:
        stored = store.message(op.msg_id)
        assert stored is not None and stored.payload == op.payload


@pytest.mark.parametrize("durability", ["sync", "os", "log"])
def test_a_new_lmdb_store_is_private_to_its_owner(tmp_path: Path, durability: str) -> None:
    # The store holds every message in clear: under the usual umask (022)
    # its files were 0644 and its directory 0755, readable by every local
    # user, while the token secret beside it is 0600.  Now 0600 and 0700, as
    # a database's data directory is (PostgreSQL refuses to start on a
    # group- or world-readable one).
    import stat

    path = tmp_path / "store"
    with LmdbStore(str(path), durability=durability) as store:
        mk = Maker(store.node_id())
        mk.commit(store, mk(AB, "alice"))
        made = sorted(p for p in path.rglob("*"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        for p in made:
            want = 0o700 if p.is_dir() else 0o600
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
        assert any(p.name == "data.mdb" for p in made) and any(p.name == "broker.lock" for p in made)
        if durability == "log":
            assert any(p.parent.name == "log" for p in made)


def test_deleting_an_event_consumer_drops_its_cursor_and_frees_the_reclaim(store: Store) -> None:
    """DeleteConsumer: a consumer read once by mistake (a typo, a test) held
    back the reclaim of every later event until it acked or max_age passed,
    and nothing could delete it.  Deleted, the reclaim no longer waits for
    it; deleting one that does not exist answers deleted=False; the name
    read and acked again is a fresh consumer at 0, as a first read is."""
    from pimcore.store import AckEvents, AppendEvent, ConsumerDeleted, DeleteConsumer, EventsAcked, EventsPage
    from pimcore.store import ReadEvents

    def consumers() -> tuple[tuple[str, int], ...]:
        (page,) = store.read([ReadEvents("probe", None, 0)])
        assert isinstance(page, EventsPage)
        return page.consumers

    store.commit(WriteBatch(1, tuple(AppendEvent(b"{}", t) for t in (100, 200, 300))))
    store.commit(WriteBatch(2, (AckEvents("host", 3), AckEvents("stray", 0))))
    # The stray consumer (cursor 0) holds every event back.
    assert store.commit(WriteBatch(3, (Reclaim(1_000, DAY, DAY),))) == (Reclaimed(0, 0, 0),)
    assert store.commit(WriteBatch(4, (DeleteConsumer("stray"), DeleteConsumer("stray"), DeleteConsumer("never")))) == (
        ConsumerDeleted("stray", True), ConsumerDeleted("stray", False), ConsumerDeleted("never", False),
    )
    assert consumers() == (("host", 3),)
    # What only "host" acked is reclaimed now.
    assert store.commit(WriteBatch(5, (Reclaim(1_000, DAY, DAY),))) == (Reclaimed(0, 0, 3),)
    # The name again: cursor 0 (what it reads starts after the reclaimed ids),
    # and its first ack creates it afresh, holding the reclaim again.
    (page,) = store.read([ReadEvents("stray")])
    assert page == EventsPage(0, (), 3)
    store.commit(WriteBatch(6, (AppendEvent(b"{}", 400),)))
    assert store.commit(WriteBatch(7, (AckEvents("stray", 0),))) == (EventsAcked("stray", 0),)
    assert consumers() == (("host", 3), ("stray", 0))
    assert store.commit(WriteBatch(8, (Reclaim(1_000, DAY, DAY),))) == (Reclaimed(0, 0, 0),)
    # In batch order: an ack then a delete of the same consumer leaves none.
    assert store.commit(WriteBatch(9, (AckEvents("x", 4), DeleteConsumer("x")))) == (
        EventsAcked("x", 4), ConsumerDeleted("x", True),
    )
    assert consumers() == (("host", 3), ("stray", 0))
    # An invalid name is refused, nothing deleted.
    assert store.commit(WriteBatch(10, (DeleteConsumer("bad consumer"), DeleteConsumer("")))) == (
        Rejected(ErrorCode.BAD_REQUEST), Rejected(ErrorCode.BAD_REQUEST),
    )
    assert consumers() == (("host", 3), ("stray", 0))
