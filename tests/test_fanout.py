"""Inbox fan-out: the fast-path helpers (pimcore._pure.fanout and its compiled
twin) and the LMDB store paths built on them.

1. unit tests of ``fanout`` / ``inbox_items`` / ``head_items`` against each
   backend, including every error;
2. a differential hypothesis test: on random input, good and bad, both
   backends return the same thing or raise the same exception, and leave the
   dicts they were given in the same state;
3. the store: group fan-out against the MemoryStore oracle, and the cache that
   commits keep (pimcore.store.lmdb._Hot) -- it must never hide a write of
   another process or of this one.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore.store import lmdb as lmdb_module
from pimcore.store import (
    AckPosition,
    Appended,
    Duplicate,
    LmdbStore,
    MarkRead,
    MemoryStore,
    NewMessage,
    Reclaim,
    Reclaimed,
    Result,
    Store,
    TouchDevice,
    Touched,
    WriteBatch,
    direct_conversation,
)

U64_MAX = (1 << 64) - 1
DAY = 86_400 * 1_000_000


def tk(user: str) -> bytes:
    """T(user) of the LMDB key layout."""
    return bytes((len(user),)) + user.encode("ascii")


def ikey(user: str, pos: int) -> bytes:
    return tk(user) + struct.pack(">Q", pos)


# ---------------------------------------------------------------- unit tests


def test_fanout_hands_out_the_next_positions(backend: ModuleType) -> None:
    users = ("al", "alice", "bob")
    uks = tuple(tk(u) for u in users)
    heads = {tk("al"): 0, tk("alice"): 7, tk("bob"): 2, tk("zed"): 9}
    pend: dict[bytes, list[bytes]] = {tk("bob"): [b"earlier"]}
    out = backend.fanout(users, uks, heads, pend, b"E1")
    assert out == (("al", 1), ("alice", 8), ("bob", 3))
    assert type(out) is tuple and all(type(p) is tuple for p in out)
    assert backend.fanout(users[1:], uks[1:], heads, pend, b"E2") == (("alice", 9), ("bob", 4))
    assert heads == {tk("al"): 1, tk("alice"): 9, tk("bob"): 4, tk("zed"): 9}
    assert pend == {tk("al"): [b"E1"], tk("alice"): [b"E1", b"E2"], tk("bob"): [b"earlier", b"E1", b"E2"]}
    assert backend.fanout((), (), heads, pend, b"E3") == ()


def test_the_compiled_fanout_keeps_its_pairs_out_of_the_collectors_sight(both: tuple[ModuleType, ModuleType]) -> None:
    """The (user, position) pairs of exact str users cannot be in a reference
    cycle: the compiled twin untracks them at once (a 1,000-member group made
    the collector visit 1,000 per message).  A str subclass may hold a
    cycle: its pair stays tracked, so nothing that could leak is hidden."""
    import gc

    class Name(str):
        pass

    cy, pure = both
    for impl in (cy, pure):
        out = impl.fanout(("al", Name("bob")), (tk("al"), tk("bob")), {tk("al"): 0, tk("bob"): 0}, {}, b"e")
        assert out == (("al", 1), ("bob", 1))
        if impl is cy:
            assert [gc.is_tracked(pair) for pair in out] == [False, True]


def test_inbox_items_are_the_last_positions_up_to_the_head(backend: ModuleType) -> None:
    heads = {tk("al"): 1, tk("alice"): 9, tk("bob"): 300}
    pend = {tk("al"): [b"x"], tk("alice"): [b"a", b"b"], tk("bob"): [b"c", b"d", b"e"]}
    uks = sorted(pend)
    items = list(backend.inbox_items(uks, pend, heads))
    assert items == [
        (ikey("al", 1), b"x"),
        (ikey("bob", 298), b"c"),
        (ikey("bob", 299), b"d"),
        (ikey("bob", 300), b"e"),
        (ikey("alice", 8), b"a"),
        (ikey("alice", 9), b"b"),
    ]
    assert items == sorted(items)  # sorted user keys -> sorted output
    assert list(backend.inbox_items(tuple(uks[:1]), pend, heads)) == items[:1]
    assert list(backend.inbox_items([], pend, heads)) == []
    assert list(backend.inbox_items([tk("al")], {tk("al"): []}, heads)) == []
    # the full u64 range, big-endian
    assert list(backend.inbox_items([b"\x01u"], {b"\x01u": [b"v"]}, {b"\x01u": U64_MAX})) == [
        (b"\x01u" + b"\xff" * 8, b"v")
    ]


def test_inbox_items_checks_everything_at_the_call_and_makes_pairs_as_taken(backend: ModuleType) -> None:
    """An iterator (one putmulti takes it; no list of a pair per entry), but
    a bad input is refused by the call, before a single pair is written."""
    heads = {tk("al"): 2, tk("bob"): 1}
    pend = {tk("al"): [b"x", b"y"], tk("bob"): [b"z"]}
    it = backend.inbox_items([tk("al"), tk("bob")], pend, heads)
    assert iter(it) is it
    assert next(it) == (ikey("al", 1), b"x")
    assert list(it) == [(ikey("al", 2), b"y"), (ikey("bob", 1), b"z")]
    assert list(it) == []  # spent
    pend[tk("bob")].append("not bytes")  # the last value: found before any pair
    with pytest.raises(TypeError, match="pending entry must be bytes"):
        backend.inbox_items([tk("al"), tk("bob")], pend, {tk("al"): 2, tk("bob"): 2})
    # Changed after the call (the store never does): the same errors, no crash.
    pend = {tk("al"): [b"x"]}
    it = backend.inbox_items([tk("al")], pend, {tk("al"): 1})
    pend[tk("al")] = (b"x",)
    with pytest.raises(TypeError, match="pending entries must be a list"):
        next(it)
    pend = {tk("al"): [b"x"]}
    it = backend.inbox_items([tk("al")], pend, {tk("al"): 1})
    pend[tk("al")].append(1)
    with pytest.raises(ValueError, match="more pending entries than inbox positions"):
        next(it)


def test_head_items_are_the_inboxmeta_records(backend: ModuleType) -> None:
    heads = {tk("al"): 5, tk("bob"): U64_MAX}
    floors = {tk("al"): 2, tk("bob"): 0}
    assert backend.head_items([tk("al"), tk("bob")], heads, floors) == [
        (tk("al"), struct.pack(">QQ", 5, 2)),
        (tk("bob"), struct.pack(">QQ", U64_MAX, 0)),
    ]
    assert backend.head_items((), heads, floors) == []


def test_fanout_then_inbox_items_equals_the_naive_loop(backend: ModuleType) -> None:
    users = tuple(sorted(f"u{i}" for i in range(50)))
    uks = tuple(tk(u) for u in users)
    heads = {uk: i * 3 for i, uk in enumerate(uks)}
    start = dict(heads)
    pend: dict[bytes, list[bytes]] = {}
    expected: list[tuple[bytes, bytes]] = []
    naive = dict(heads)
    for m in range(20):
        lo, hi = m % 7, 50 - m % 5  # different member subsets
        entry = b"m%d" % m
        backend.fanout(users[lo:hi], uks[lo:hi], heads, pend, entry)
        for uk in uks[lo:hi]:
            naive[uk] += 1
            expected.append((uk + struct.pack(">Q", naive[uk]), entry))
    assert heads == naive
    assert list(backend.inbox_items(sorted(pend), pend, heads)) == sorted(expected)
    assert all(heads[uk] - len(pend[uk]) == start[uk] for uk in pend)


GOOD_UK = tk("al")


@pytest.mark.parametrize(
    "args, exc",
    [
        ((["al"], (GOOD_UK,), {GOOD_UK: 0}, {}, b"e"), TypeError),  # users not a tuple
        ((("al",), [GOOD_UK], {GOOD_UK: 0}, {}, b"e"), TypeError),  # uks not a tuple
        ((("al",), (GOOD_UK,), [(GOOD_UK, 0)], {}, b"e"), TypeError),  # heads not a dict
        ((("al",), (GOOD_UK,), {GOOD_UK: 0}, None, b"e"), TypeError),  # pend not a dict
        ((("al",), (GOOD_UK,), {GOOD_UK: 0}, {}, "e"), TypeError),  # entry not bytes
        ((("al",), (GOOD_UK,), {GOOD_UK: 0}, {}, bytearray(b"e")), TypeError),
        ((("al", "bo"), (GOOD_UK,), {GOOD_UK: 0}, {}, b"e"), ValueError),  # lengths differ
        (((b"al",), (GOOD_UK,), {GOOD_UK: 0}, {}, b"e"), TypeError),  # user not str
        ((("al",), ("al",), {"al": 0}, {}, b"e"), TypeError),  # uk not bytes
        ((("al",), (GOOD_UK,), {}, {}, b"e"), KeyError),  # no head loaded
        ((("al",), (GOOD_UK,), {GOOD_UK: 1.0}, {}, b"e"), TypeError),
        ((("al",), (GOOD_UK,), {GOOD_UK: True}, {}, b"e"), TypeError),
        ((("al",), (GOOD_UK,), {GOOD_UK: -1}, {}, b"e"), ValueError),
        ((("al",), (GOOD_UK,), {GOOD_UK: 1 << 64}, {}, b"e"), ValueError),
        ((("al",), (GOOD_UK,), {GOOD_UK: U64_MAX}, {}, b"e"), ValueError),  # no next position
        ((("al",), (GOOD_UK,), {GOOD_UK: 0}, {GOOD_UK: (b"x",)}, b"e"), TypeError),  # queue not a list
    ],
)
def test_fanout_rejects_bad_input(backend: ModuleType, args: tuple, exc: type) -> None:
    with pytest.raises(exc):
        backend.fanout(*args)


@pytest.mark.parametrize(
    "fn, args, exc",
    [
        ("inbox_items", ({GOOD_UK}, {GOOD_UK: [b"v"]}, {GOOD_UK: 1}), TypeError),  # uks a set
        ("inbox_items", ([GOOD_UK], [], {GOOD_UK: 1}), TypeError),
        ("inbox_items", ([GOOD_UK], {GOOD_UK: [b"v"]}, None), TypeError),
        ("inbox_items", (["al"], {"al": [b"v"]}, {"al": 1}), TypeError),
        ("inbox_items", ([GOOD_UK], {}, {GOOD_UK: 1}), KeyError),
        ("inbox_items", ([GOOD_UK], {GOOD_UK: [b"v"]}, {}), KeyError),
        ("inbox_items", ([GOOD_UK], {GOOD_UK: (b"v",)}, {GOOD_UK: 1}), TypeError),
        ("inbox_items", ([GOOD_UK], {GOOD_UK: [b"v"]}, {GOOD_UK: "1"}), TypeError),
        ("inbox_items", ([GOOD_UK], {GOOD_UK: [b"v"]}, {GOOD_UK: -1}), ValueError),
        ("inbox_items", ([GOOD_UK], {GOOD_UK: [b"v", b"w"]}, {GOOD_UK: 1}), ValueError),  # below position 1
        ("inbox_items", ([GOOD_UK], {GOOD_UK: [b"v", "w"]}, {GOOD_UK: 2}), TypeError),
        ("head_items", ({GOOD_UK}, {GOOD_UK: 1}, {GOOD_UK: 0}), TypeError),
        ("head_items", ([GOOD_UK], {GOOD_UK: 1}, []), TypeError),
        ("head_items", ([1], {1: 1}, {1: 0}), TypeError),
        ("head_items", ([GOOD_UK], {}, {GOOD_UK: 0}), KeyError),
        ("head_items", ([GOOD_UK], {GOOD_UK: 1}, {}), KeyError),
        ("head_items", ([GOOD_UK], {GOOD_UK: 1}, {GOOD_UK: 1 << 64}), ValueError),
        ("head_items", ([GOOD_UK], {GOOD_UK: False}, {GOOD_UK: 0}), TypeError),
    ],
)
def test_flush_helpers_reject_bad_input(backend: ModuleType, fn: str, args: tuple, exc: type) -> None:
    with pytest.raises(exc):
        getattr(backend, fn)(*args)


def test_fanout_keeps_the_elements_before_a_bad_one(backend: ModuleType) -> None:
    users, uks = ("a", "b", "c"), (tk("a"), tk("b"), tk("c"))
    heads = {tk("a"): 0, tk("b"): 4}
    pend: dict[bytes, list[bytes]] = {}
    with pytest.raises(KeyError):
        backend.fanout(users, uks, heads, pend, b"e")
    assert heads == {tk("a"): 1, tk("b"): 5} and pend == {tk("a"): [b"e"], tk("b"): [b"e"]}


# ---------------------------------------------------------------- differential

NAMES = ["a", "bo", "cat", "a b"]
text_key = st.sampled_from(NAMES).map(tk)
any_key = st.one_of(text_key, text_key, text_key, st.sampled_from(NAMES), st.just(b""))
head_value = st.one_of(
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.integers(0, 1000),
    st.sampled_from([U64_MAX - 1, U64_MAX, U64_MAX + 1, -1, -(1 << 70), 1 << 64]),
    st.sampled_from([True, 1.5, "3", None]),
)
value = st.one_of(st.binary(max_size=3), st.binary(max_size=3), st.sampled_from(["s", 7, bytearray(b"b")]))
queue = st.one_of(st.lists(value, max_size=4), st.lists(value, max_size=4), st.just(None), st.tuples(value))
heads_dict = st.dictionaries(any_key, head_value, max_size=5)
pend_dict = st.dictionaries(any_key, queue, max_size=5)
seq_of = lambda elem: st.one_of(  # noqa: E731 - list or tuple, now and then something else
    st.lists(elem, max_size=5).map(tuple),
    st.lists(elem, max_size=5).map(tuple),
    st.lists(elem, max_size=5),
    st.just(None),
)
user = st.one_of(st.sampled_from(NAMES), st.sampled_from(NAMES), st.just(b"a"), st.just(3))
call = st.one_of(
    st.tuples(st.just("fanout"), seq_of(user), seq_of(any_key), st.one_of(st.binary(max_size=2), st.just("e"))),
    st.tuples(st.just("inbox_items"), seq_of(any_key)),
    st.tuples(st.just("head_items"), seq_of(any_key)),
)


def _run(backend: ModuleType, heads: dict, floors: dict, pend: dict, calls: list) -> list:
    out: list[tuple] = []
    for c in calls:
        try:
            if c[0] == "fanout":
                _, users, uks, entry = c
                res = backend.fanout(users, uks, heads, pend, entry)
            elif c[0] == "inbox_items":
                res = list(backend.inbox_items(c[1], pend, heads))
            else:
                res = backend.head_items(c[1], heads, floors)
            out.append(("ok", res))
        except (TypeError, ValueError, KeyError) as exc:
            out.append(("err", type(exc), str(exc)))
        out.append((copy.deepcopy(heads), copy.deepcopy(pend)))
    return out


@settings(max_examples=400)
@given(heads=heads_dict, floors=heads_dict, pend=pend_dict, calls=st.lists(call, min_size=1, max_size=6))
def test_differential_cython_vs_pure(both: tuple[ModuleType, ModuleType], heads, floors, pend, calls) -> None:
    fast, pure = both
    a = _run(fast, copy.deepcopy(heads), copy.deepcopy(floors), copy.deepcopy(pend), calls)
    b = _run(pure, copy.deepcopy(heads), copy.deepcopy(floors), copy.deepcopy(pend), calls)
    assert a == b


@settings(max_examples=100)
@given(
    members=st.lists(st.lists(st.sampled_from(NAMES), unique=True).map(sorted), min_size=1, max_size=10),
    start=st.dictionaries(st.sampled_from(NAMES), st.integers(0, U64_MAX - 20)),
)
def test_differential_good_input(both: tuple[ModuleType, ModuleType], members, start) -> None:
    # Only valid input: whole runs of fan-outs then the flush must agree.
    results = []
    for backend in both:
        heads = {tk(n): start.get(n, 0) for n in NAMES}
        floors = {uk: h // 2 for uk, h in heads.items()}
        pend: dict[bytes, list[bytes]] = {}
        outs = [
            backend.fanout(tuple(m), tuple(tk(u) for u in m), heads, pend, b"msg%d" % i) for i, m in enumerate(members)
        ]
        uks = sorted(pend)
        results.append((outs, heads, pend, list(backend.inbox_items(uks, pend, heads)), backend.head_items(uks, heads, floors)))
    assert results[0] == results[1]


# ---------------------------------------------------------------- the store


def _digest(conv: str, payload: bytes) -> bytes:
    return hashlib.sha256(conv.encode() + b"\0" + payload).digest()[:16]


class Maker:
    """NewMessage ops as the core builds them (increasing server times)."""

    def __init__(self, node: bytes, start: int = 1_000_000) -> None:
        self.node = node
        self.time = start
        self.local = itertools.count(1)
        self.batches = itertools.count(1)

    def __call__(self, conv: str, sender: str, payload: bytes = b"hi", local_id: Optional[int] = None) -> NewMessage:
        self.time += 1
        return NewMessage(
            self.time.to_bytes(8, "big") + self.node,
            conv,
            sender,
            "phone",
            next(self.local) if local_id is None else local_id,
            self.time - 3,
            self.time,
            payload,
            _digest(conv, payload),
        )

    def commit(self, store: Store, *ops: object) -> tuple[Result, ...]:
        return store.commit(WriteBatch(next(self.batches), tuple(ops)))  # type: ignore[arg-type]


@pytest.fixture
def lmdb_store(tmp_path: Path) -> Iterator[LmdbStore]:
    s = LmdbStore(tmp_path / "db", durability="os")
    yield s
    s.close()


def inbox(store: Store, user: str) -> list[tuple[int, bytes]]:
    return [(pos, m.msg_id) for pos, m in store.inbox_range(user, 0, 100_000)]


def observable(store: Store, users: list[str], convs: list[str]) -> dict:
    return {
        "users": {
            u: (store.inbox_head(u), store.inbox_floor(u), inbox(store, u), store.conversations(u), store.devices(u))
            for u in users
        },
        "convs": {c: (store.members(c), store.last_seq(c), [m.msg_id for m in store.history(c, 0, 100_000)]) for c in convs},
    }


@pytest.mark.parametrize("cache", ["normal", "tiny"])
def test_group_fanout_matches_the_memory_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache: str) -> None:
    # Batches that mix group and direct messages, acks, reads, membership
    # changes and reclaims, on a group big enough that each commit writes
    # many users' inboxes; every result and every read must match the oracle.
    # "tiny": the kept cache outgrows its bounds at every commit.
    if cache == "tiny":
        for name in ("_HOT_USERS", "_HOT_CONVS", "_HOT_MEMBERS"):
            monkeypatch.setattr(lmdb_module, name, 1)
    users = [f"user{i:03d}" for i in range(150)]
    groups = {"big": users, "small": users[::7]}
    convs = [*groups, direct_conversation("user000", "user001")]
    memory = MemoryStore()
    lmdb = LmdbStore(tmp_path / "db", durability="os", map_size=1 << 20)  # grows mid-batch too
    try:
        for store in (memory, lmdb):
            for g, members in groups.items():
                store.create_group(g, members, 1)
        mk = Maker(b"\x02" * 8)
        t = itertools.count(2_000_000)
        for round_ in range(12):
            ops: list[object] = []
            for i in range(round_ % 4 * 8 + 1):
                sender = users[(round_ * 31 + i * 7) % len(users)]
                conv = "big" if i % 3 else ("small" if sender in groups["small"] else convs[2])
                if conv == convs[2]:
                    sender = "user001"
                ops.append(mk(conv, sender, payload=os.urandom(i % 5 * 200)))
            ops.append(AckPosition(users[round_], "phone", round_ * 5, next(t)))
            ops.append(TouchDevice(users[round_ + 1], "tablet", 0, next(t)))
            ops.append(MarkRead(users[round_], "big", round_))
            if round_ % 5 == 4:
                ops.append(Reclaim(next(t), DAY, DAY))
                ops.append(mk("big", users[3]))  # after the reclaim, same batch
            ops.append(ops[0])  # a retry in the same batch: Duplicate
            batch = WriteBatch(round_ + 1, tuple(ops))  # type: ignore[arg-type]
            assert memory.commit(batch) == lmdb.commit(batch)
            if round_ % 4 == 3:
                at = next(t)  # the same stamps in both stores
                for store in (memory, lmdb):
                    store.add_members("small", [users[round_ * 2 + 1]], at)
                    store.remove_members("small", [users[0]], at)
            assert observable(memory, users, convs) == observable(lmdb, users, convs)
    finally:
        memory.close()
        lmdb.close()


OTHER = """
import sys
from pimcore.store import LmdbStore, NewMessage, Reclaim, TouchDevice, WriteBatch
s = LmdbStore(sys.argv[1], durability="os", owner=False)  # a second writer: a maintenance open
try:
    exec(sys.argv[2])
finally:
    s.close()
"""


def other_process(path: Path, code: str) -> None:
    """Run ``code`` with ``s``, the same store opened by another process (LMDB
    forbids a second open in this one), e.g. ``pimcore group add`` next to a
    running broker."""
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", OTHER, str(path), code], check=True, env=env, timeout=120)


def _foreign_message(seq_time: int) -> str:
    # A group message stored by the other process: moves every member's head
    # and the group's last seq behind this process's back.
    return (
        f"r = s.commit(WriteBatch(1, (NewMessage(({seq_time}).to_bytes(8, 'big') + b'otherpro', 'g', 'a', 'cli', "
        f"{seq_time}, 0, {seq_time}, b'x', b'd'),)))\n"
        "assert type(r[0]).__name__ == 'Appended', r\n"
    )


@pytest.mark.parametrize(
    "action",
    ["add_member", "remove_member", "foreign_message", "foreign_reclaim", "add_in_process", "no_write_in_between"],
)
def test_a_commit_sees_writes_made_since_the_last_one(tmp_path: Path, action: str) -> None:
    path = tmp_path / "db"
    store = LmdbStore(path, durability="os")
    try:
        store.create_group("g", ["a", "b", "c"], 1)
        mk = Maker(store.node_id())
        for n in (1, 2):  # the second commit runs on the kept cache
            (first,) = mk.commit(store, mk("g", "a"))
            assert isinstance(first, Appended)
            assert first.positions == (("a", n), ("b", n), ("c", n)) and first.seq == n
        expected_members, head, seq = ["a", "b", "c"], 3, 3
        # A membership change is an entry (seq 3, in the inboxes of the
        # members at that seq): it moves heads and the last seq too.
        if action == "add_member":
            other_process(path, "s.add_members('g', ['d'])")
            expected_members, head, seq = ["a", "b", "c", "d"], 4, 4
        elif action == "remove_member":
            other_process(path, "s.remove_members('g', ['b'])")
            expected_members, head, seq = ["a", "c"], 4, 4
        elif action == "foreign_message":
            other_process(path, _foreign_message(5_000_000))
            head, seq = 4, 4
        elif action == "foreign_reclaim":
            # Devices at position 2 let the other process reclaim 1..2.
            mk.commit(store, *(TouchDevice(u, "phone", 2, 10) for u in "abc"))
            other_process(path, "r = s.commit(WriteBatch(1, (Reclaim(20, 10**12, 10**12),)))\nassert r[0].entries == 6, r")
        elif action == "add_in_process":
            store.add_members("g", ["d"])
            expected_members, head, seq = ["a", "b", "c", "d"], 4, 4
        (res,) = mk.commit(store, mk("g", "c"))
        assert isinstance(res, Appended) and res.seq == seq
        assert res.positions == tuple((u, 2 if u == "d" else head) for u in expected_members)
        assert store.last_seq("g") == seq
        for u in expected_members:
            assert store.inbox_head(u) == (2 if u == "d" else head)
            positions = [p for p, _ in inbox(store, u)]
            assert positions == list(range(store.inbox_floor(u) + 1, store.inbox_head(u) + 1))  # no hole, none lost
        if action == "foreign_reclaim":
            # A new device starts at the floor the other process moved.
            (touched,) = mk.commit(store, TouchDevice("a", "laptop", 0, 30))
            assert touched == Touched("a", "laptop", 2, True)
    finally:
        store.close()


@pytest.mark.parametrize("foreign", ["message", "add_member"])
def test_a_commit_that_wrote_nothing_does_not_vouch_for_the_next(tmp_path: Path, foreign: str) -> None:
    # LMDB does not use up a transaction number for a commit that changed
    # nothing; the next writer -- here ONE commit of another process -- takes
    # it.  A cache stamped with that number would then look current.
    path = tmp_path / "db"
    store = LmdbStore(path, durability="os")
    try:
        store.create_group("g", ["a", "b"], 1)
        mk = Maker(store.node_id())
        first = mk("g", "a")
        mk.commit(store, first)
        mk.commit(store, mk("g", "a"))
        (dup,) = mk.commit(store, first)  # writes nothing
        assert isinstance(dup, Duplicate)
        expected: tuple[tuple[str, int], ...]
        if foreign == "message":
            other_process(path, _foreign_message(6_000_000))
            seq, expected = 4, (("a", 4), ("b", 4))
        else:
            other_process(path, "s.add_members('g', ['c'])")  # its JOINED entry is seq 3
            seq, expected = 4, (("a", 4), ("b", 4), ("c", 2))
        (res,) = mk.commit(store, mk("g", "b"))
        assert isinstance(res, Appended)
        assert res.seq == seq and res.positions == expected
        assert [m.seq for m in store.history("g", 0, 10)] == list(range(1, seq + 1))
        assert [p for p, _ in inbox(store, "a")] == list(range(1, seq + 1))
    finally:
        store.close()


def test_a_failed_commit_leaves_no_cached_state(lmdb_store: LmdbStore) -> None:
    store = lmdb_store
    store.create_group("g", ["a", "b"], 1)
    mk = Maker(store.node_id())
    mk.commit(store, mk("g", "a"))
    with pytest.raises(Exception):
        mk.commit(store, mk("g", "a"), mk("g", "b"), object())  # aborted after two fan-outs
    (res,) = mk.commit(store, mk("g", "b"))
    assert isinstance(res, Appended) and res.seq == 2 and res.positions == (("a", 2), ("b", 2))
    assert [p for p, _ in inbox(store, "a")] == [1, 2]


def test_reclaim_between_fanouts_in_one_batch(lmdb_store: LmdbStore) -> None:
    store = lmdb_store
    store.create_group("g", ["a", "b", "c"], 1)
    mk = Maker(store.node_id())
    mk.commit(store, *(TouchDevice(u, "phone", 0, 10) for u in "abc"))
    res = mk.commit(
        store,
        mk("g", "a"),
        mk("g", "b"),
        *(AckPosition(u, "phone", 2, 11) for u in "abc"),
        Reclaim(12, DAY, DAY),
        mk("g", "c"),
    )
    assert res[5] == Reclaimed(6, 0)
    assert isinstance(res[6], Appended) and res[6].positions == (("a", 3), ("b", 3), ("c", 3))
    (nxt,) = mk.commit(store, mk("g", "a"))
    assert isinstance(nxt, Appended) and nxt.positions == (("a", 4), ("b", 4), ("c", 4))
    for u in "abc":
        assert [p for p, _ in inbox(store, u)] == [3, 4] and store.inbox_floor(u) == 2
        assert store.conversations(u) == ["g"]


def test_big_group_fanout_in_one_commit(lmdb_store: LmdbStore) -> None:
    store = lmdb_store
    users = [f"m{i}" for i in range(1000)]
    store.create_group("g", users, 1)
    mk = Maker(store.node_id())
    ops = [mk("g", users[i * 37 % 1000]) for i in range(16)]
    results = mk.commit(store, *ops)
    assert all(isinstance(r, Appended) for r in results)
    ranked = sorted(users)
    for k, r in enumerate(results):
        assert r.positions == tuple((u, k + 1) for u in ranked)  # type: ignore[union-attr]
    for u in users[::97]:
        assert inbox(store, u) == [(k + 1, op.msg_id) for k, op in enumerate(ops)]
        assert store.conversations(u) == ["g"]


# ---------------------------------------------------------------- stage_message

ST_OP = NewMessage(b"M" * 16, "d:a:bo", "bo", "ph", 7, -5, 1_700_000, b"payload", b"D" * 16, 3)
ST_IDS = tk("d:a:bo") + tk("bo") + tk("ph")


def _stage(backend: ModuleType, op: object = ST_OP, seq: object = 4, after_seq: object = 3, **lists: object) -> tuple:
    msgs, convidx, dedupe = lists.get("msgs", []), lists.get("convidx", []), lists.get("dedupe", {})
    entry = backend.stage_message(op, seq, after_seq, ST_IDS, tk("d:a:bo"), tk("bo") + tk("ph") + b"K" * 8,
                                  msgs, convidx, dedupe)
    return entry, msgs, convidx, dedupe


def test_stage_message_builds_the_records_of_the_key_layout(backend: ModuleType) -> None:
    entry, msgs, convidx, dedupe = _stage(backend)
    op = ST_OP
    assert entry == op.msg_id + struct.pack(">q", op.server_time)
    assert msgs == [(op.msg_id, struct.pack(">QQqqQB", 4, 7, -5, 1_700_000, 3, 0) + ST_IDS + b"payload")]
    assert convidx == [(tk("d:a:bo") + struct.pack(">Q", 4), op.msg_id + b"bo")]
    assert dedupe == {tk("bo") + tk("ph") + b"K" * 8: op.msg_id + struct.pack(">Qq", 4, 1_700_000) + b"D" * 16}
    # and the store decodes the record it staged
    m = lmdb_module._decode_record(op.msg_id, msgs[0][1])
    assert (m.conv, m.seq, m.sender, m.device, m.local_id, m.client_time, m.payload, m.after_seq) == (
        "d:a:bo", 4, "bo", "ph", 7, -5, b"payload", 3)


@pytest.mark.parametrize(
    "change, exc, text",
    [
        ({"msg_id": b"short"}, ValueError, "msg_id must be 16 bytes"),
        ({"msg_id": "M" * 16}, TypeError, "msg_id must be bytes"),
        ({"payload": bytearray(b"p")}, TypeError, "payload and digest must be bytes"),
        ({"digest": None}, TypeError, "payload and digest must be bytes"),
        ({"sender": b"bo"}, TypeError, "sender must be str"),
        ({"sender": "bö"}, UnicodeEncodeError, "ascii"),
        ({"local_id": -1}, ValueError, "local_id out of range"),
        ({"local_id": 1 << 64}, ValueError, "local_id out of range"),
        ({"local_id": True}, TypeError, "local_id must be int"),
        ({"client_time": 1 << 63}, ValueError, "client_time out of range"),
        ({"server_time": -(1 << 63) - 1}, ValueError, "server_time out of range"),
        ({"server_time": 1.0}, TypeError, "server_time must be int"),
    ],
)
def test_stage_message_rejects_bad_fields_and_stages_nothing(backend: ModuleType, change: dict, exc: type,
                                                             text: str) -> None:
    import dataclasses

    msgs: list = []
    convidx: list = []
    dedupe: dict = {}
    with pytest.raises(exc, match=text):
        _stage(backend, dataclasses.replace(ST_OP, **change), msgs=msgs, convidx=convidx, dedupe=dedupe)
    assert msgs == convidx == [] and dedupe == {}


def test_stage_message_takes_the_boundary_values(backend: ModuleType) -> None:
    import dataclasses

    op = dataclasses.replace(ST_OP, local_id=U64_MAX, client_time=-(1 << 63), server_time=(1 << 63) - 1, payload=b"")
    entry, msgs, convidx, dedupe = _stage(backend, op, U64_MAX, U64_MAX)
    assert msgs[0][1] == struct.pack(">QQqqQB", U64_MAX, U64_MAX, -(1 << 63), (1 << 63) - 1, U64_MAX, 0) + ST_IDS
    assert convidx[0][0].endswith(b"\xff" * 8) and entry.endswith(struct.pack(">q", (1 << 63) - 1))
    entry, msgs, _, _ = _stage(backend, dataclasses.replace(op, local_id=0, server_time=-(1 << 63)), 0, 0)
    assert msgs[0][1][:41] == struct.pack(">QQqqQB", 0, 0, -(1 << 63), -(1 << 63), 0, 0)


@pytest.mark.parametrize(
    "kwargs, exc, text",
    [
        ({"seq": -1}, ValueError, "seq out of range"),
        ({"seq": 1 << 64}, ValueError, "seq out of range"),
        ({"seq": "4"}, TypeError, "seq must be int"),
        ({"after_seq": -2}, ValueError, "after_seq out of range"),
        ({"msgs": ()}, TypeError, "must be lists, dedupe a dict"),
        ({"dedupe": []}, TypeError, "must be lists, dedupe a dict"),
        ({"op": object()}, AttributeError, "msg_id"),
    ],
)
def test_stage_message_rejects_bad_arguments(backend: ModuleType, kwargs: dict, exc: type, text: str) -> None:
    with pytest.raises(exc, match=text):
        _stage(backend, **kwargs)


small_int = st.one_of(
    st.integers(0, 1 << 20), st.sampled_from([-1, -(1 << 63), (1 << 63) - 1, 1 << 63, U64_MAX, 1 << 64, True, 2.0])
)


def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    # Each field is good 9 times in 10, so that most examples get past the
    # first checks and the later ones are compared too.
    return st.one_of(*[good] * 9, bad)


@settings(max_examples=400)
@given(
    msg_id=_mostly(st.binary(min_size=16, max_size=16), st.one_of(st.binary(max_size=20), st.just("x" * 16))),
    sender=_mostly(st.sampled_from(["bo", "a", ""]), st.sampled_from(["é", b"bo"])),
    payload=_mostly(st.binary(max_size=40), st.just(bytearray(b"p"))),
    digest=_mostly(st.binary(max_size=20), st.just(None)),
    ints=st.tuples(*[_mostly(st.integers(0, 1 << 20), small_int)] * 5),
    ids=_mostly(st.binary(max_size=30), st.just("ids")),
)
def test_stage_message_differential(both: tuple[ModuleType, ModuleType], msg_id, sender, payload, digest, ints,
                                    ids) -> None:
    seq, local_id, client_time, server_time, after_seq = ints
    op = NewMessage(msg_id, "d:a:bo", sender, "ph", local_id, client_time, server_time, payload, digest)
    outs = []
    for backend in both:
        msgs: list = [(b"k", b"v")]
        convidx: list = []
        dedupe: dict = {b"old": b"x"}
        try:
            res: object = backend.stage_message(op, seq, after_seq, ids, b"\x02ck", b"dk", msgs, convidx, dedupe)
        except (TypeError, ValueError, AttributeError) as exc:
            res = ("err", type(exc), str(exc))
        outs.append((res, msgs, convidx, dedupe))
    assert outs[0] == outs[1]
