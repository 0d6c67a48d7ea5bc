"""The LMDB store's NewMessage fast path, ``store_plain_message`` (issue 13).

It takes the common case of a send -- a plain message from a user's device,
not a retry, into a conversation whose members, last seq and inbox heads the
batch already holds -- in one fast-path call, and hands everything else back
(None, nothing changed) to the store's general path.  So:

1. the two backends agree on random input, good and bad: the same result or
   the same exception, the batch left in the same state; and None always
   leaves the batch as it was;
2. a store with the fast path and one without (the general path for every
   op) give the same results and the same bytes in every sub-database for the
   same random batches: retries, conflicts, mentions, the system sender,
   unknown groups, non-members, malformed fields, membership changes.
"""

from __future__ import annotations

from pimcore.errors import StoreError

import copy
import dataclasses
from types import ModuleType, SimpleNamespace
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore.ids import SYSTEM
from pimcore.store import (
    AckPosition,
    AddMembers,
    Appended,
    CreateGroup,
    LmdbStore,
    MemoryStore,
    NewMessage,
    PurgeUser,
    Reclaim,
    RemoveMembers,
    TouchDevice,
    Touched,
    WriteBatch,
    direct_conversation,
)
from pimcore.store import lmdb as lmdb_module

U64_MAX = (1 << 64) - 1


def tk(text: str) -> bytes:
    return bytes((len(text),)) + text.encode("ascii")


def _appended(*fields: Any) -> tuple:
    return ("appended", *fields)


class _Txn:
    """The dedupe sub-database of a transaction: the fast path reads it with
    ``cursor(db).set_range(key)`` (dedupe_get); ``gets`` counts the reads."""

    def __init__(self, stored: dict) -> None:
        self.stored = stored
        self.gets = 0

    def cursor(self, db: Any = None) -> "_Cursor":
        assert db == "dedupe-db"
        self.gets += 1
        return _Cursor(self.stored)

    def dedupe_last(self, dk: bytes) -> int:
        # _Batch.dedupe_last over the stored dedupe keys
        return max((int.from_bytes(k[len(dk) : len(dk) + 8], "big") for k in self.stored if k[: len(dk)] == dk), default=-1)


class _Cursor:
    def __init__(self, stored: dict) -> None:
        self.stored = stored
        self.at: Optional[bytes] = None

    def set_range(self, key: bytes) -> bool:
        self.at = min((k for k in self.stored if k >= key), default=None)
        return self.at is not None

    def key(self) -> bytes:
        assert self.at is not None
        return self.at

    def value(self) -> bytes:
        assert self.at is not None
        return self.stored[self.at]


def _batch(*, member: bool, flagged: bool, loaded: bool, seq_known: bool, conv_known: bool, staging: bool,
           staged_retry: bool, stored_retry: bool, purged: bool) -> SimpleNamespace:
    users = ("al", "bo")
    conv = SimpleNamespace(users=users if member else ("al", "cy"), uks=tuple(tk(u) for u in (users if member
                                                                                           else ("al", "cy"))),
                           member_set=frozenset(users if member else ("al", "cy")), flagged=flagged,
                           heads_gen=3 if loaded else 2, purged=3 if purged else 0)  # (3: OP's after_seq)
    ck = tk("d:al:bo")
    heads = {u: 5 for u in conv.uks}
    hot = SimpleNamespace(convs={ck: conv} if conv_known else {}, seqs={ck: 41} if seq_known else {},
                          heads=heads, heads_gen=3)
    hot.dmax = {}
    dkey = tk("bo") + tk("ph") + (7).to_bytes(8, "big")
    txn = _Txn({dkey: b"y"} if stored_retry else {})
    return SimpleNamespace(
        staging=staging, s_dedupe={dkey: b"x"} if staged_retry else {}, s_msgs=[], s_convidx=[], hot=hot,
        _dirty_seqs=set(), pend={}, txn=txn, dk_general=set(), dedupe_last=txn.dedupe_last,
    )


def _state(w: SimpleNamespace) -> tuple:
    return (w.s_dedupe, w.s_msgs, w.s_convidx, w._dirty_seqs, w.pend, w.hot.seqs, w.hot.heads,
            {k: vars(v) for k, v in w.hot.convs.items()})


def _call(backend: ModuleType, op: object, w: SimpleNamespace) -> object:
    return backend.store_plain_message(op, w, "dedupe-db", lmdb_module._conv_info, lmdb_module._device_key,
                                       lmdb_module._record_ids, _appended)


OP = NewMessage(b"M" * 16, "d:al:bo", "bo", "ph", 7, -5, 1_700_000, b"payload", b"D" * 16, 3)
GOOD = dict(member=True, flagged=True, loaded=True, seq_known=True, conv_known=True, staging=True,
            staged_retry=False, stored_retry=False, purged=False)


def test_the_common_case_stages_the_message_and_fans_it_out(backend: ModuleType) -> None:
    w = _batch(**GOOD)
    res = _call(backend, OP, w)
    assert res == ("appended", OP.msg_id, 42, OP.server_time, (("al", 6), ("bo", 6)), 3)
    assert w.hot.seqs[tk("d:al:bo")] == 42 and w._dirty_seqs == {tk("d:al:bo")}
    assert [k for k, _ in w.s_msgs] == [OP.msg_id] and len(w.s_convidx) == 1 and len(w.s_dedupe) == 1
    entry = OP.msg_id + OP.server_time.to_bytes(8, "big")
    assert w.pend == {tk("al"): [entry], tk("bo"): [entry]}
    # after_seq at or past the new seq is clamped to the last one (as the general path does)
    w = _batch(**GOOD)
    assert _call(backend, dataclasses.replace(OP, after_seq=42), w)[-1] == 41  # type: ignore[index]


@pytest.mark.parametrize("change", [
    {"member": False}, {"flagged": False}, {"loaded": False}, {"seq_known": False}, {"conv_known": False},
    {"staging": False}, {"staged_retry": True}, {"stored_retry": True},
    {"purged": True},  # (after_seq at the conversation's purge point: PURGED, said by the general path)
])
def test_anything_but_the_common_case_is_handed_back_untouched(backend: ModuleType, change: dict) -> None:
    w = _batch(**{**GOOD, **change})
    before = copy.deepcopy(_state(w))
    assert _call(backend, OP, w) is None
    assert _state(w) == before


@pytest.mark.parametrize("field, value", [
    ("mentions", ("al",)), ("mention_all", True), ("event", True), ("event", 1), ("sender", SYSTEM),
    ("device", SYSTEM), ("sender", "b o"), ("sender", "é"), ("sender", "x" * 65), ("device", b"ph"),
    ("conv", "bad conv"), ("conv", 5), ("local_id", -1), ("local_id", 1 << 64), ("local_id", True),
    ("after_seq", -1), ("client_time", 1 << 63), ("client_time", 1.0), ("server_time", -1),
    ("server_time", 1 << 63), ("msg_id", b"short"), ("msg_id", bytearray(16)), ("payload", bytearray(b"p")),
    ("digest", None),
])
def test_fields_the_general_path_must_judge_are_handed_back(backend: ModuleType, field: str, value: object) -> None:
    w = _batch(**GOOD)
    before = copy.deepcopy(_state(w))
    assert _call(backend, dataclasses.replace(OP, **{field: value}), w) is None
    assert _state(w) == before


def test_the_boundary_values_are_the_common_case(backend: ModuleType) -> None:
    op = dataclasses.replace(OP, local_id=U64_MAX, after_seq=U64_MAX, client_time=-(1 << 63),
                             server_time=(1 << 63) - 1, sender="x" * 64, payload=b"")
    w = _batch(**GOOD)
    w.hot.convs[tk("d:al:bo")].member_set = frozenset(("al", "bo", "x" * 64))
    w.s_dedupe = {}
    assert _call(backend, op, w) is not None


_BAD = [
    ("sender", "al"), ("sender", SYSTEM), ("sender", "x" * 65), ("sender", "b o"), ("sender", "é"), ("sender", b"bo"),
    ("device", SYSTEM), ("device", "x" * 64), ("device", "a@b.c-_9"), ("device", ""), ("device", 3),
    ("conv", "d:bo:cy"), ("conv", "g"), ("conv", "bad conv"), ("conv", 5),
    ("local_id", -1), ("local_id", U64_MAX), ("local_id", 1 << 64), ("local_id", True), ("local_id", 2.0),
    ("after_seq", U64_MAX), ("after_seq", 1 << 64), ("after_seq", -1),
    ("client_time", -(1 << 63)), ("client_time", -(1 << 63) - 1), ("client_time", 1 << 63),
    ("server_time", (1 << 63) - 1), ("server_time", 1 << 63), ("server_time", -1), ("server_time", False),
    ("msg_id", b"short"), ("msg_id", "M" * 16), ("payload", bytearray(b"p")), ("payload", b""), ("digest", None),
    ("mentions", ("al",)), ("mention_all", True), ("mention_all", 0), ("event", True), ("event", 0),
]


@settings(max_examples=500, deadline=None)
@given(
    local_id=st.integers(0, 100), after_seq=st.integers(0, 100), client_time=st.integers(-100, 100),
    server_time=st.integers(0, 100), msg_id=st.binary(min_size=16, max_size=16), payload=st.binary(max_size=8),
    changes=st.lists(st.sampled_from(_BAD), max_size=2),
    flipped=st.lists(st.sampled_from(sorted(GOOD)), max_size=2),
)
def test_both_backends_agree(both: tuple[ModuleType, ModuleType], local_id: int, after_seq: int, client_time: int,
                             server_time: int, msg_id: bytes, payload: bytes, changes: list, flipped: list) -> None:
    # A good op and batch with at most two things changed: most examples
    # reach the later checks and the success path, every check is reached.
    op = NewMessage(msg_id, "d:al:bo", "bo", "ph", local_id, client_time, server_time, payload, b"D" * 16, after_seq)
    op = dataclasses.replace(op, **dict(changes))
    flags = {k: (not v if k in flipped else v) for k, v in GOOD.items()}
    outs = []
    for backend in both:
        w = _batch(**flags)
        before = copy.deepcopy(_state(w))
        try:
            res: object = _call(backend, op, w)
        except Exception as exc:  # noqa: BLE001 - compared across backends
            res = ("err", type(exc), str(exc))
        if res is None:
            assert _state(w) == before
        outs.append((res, _state(w)))
    assert outs[0] == outs[1]


# ------------------------------------------------ store: fast path vs general path


def _dump(store: LmdbStore) -> dict:
    # (Straight through the environment: deferred batches committed first,
    # or this thread's own open write transaction would block open_db.)
    try:
        store.commit_open()
    except StoreError:
        pass  # (a stopped store: what LMDB has)
    env = store._env
    out = {}
    for name in lmdb_module._DB_NAMES:
        db = env.open_db(name.encode("ascii"))
        with env.begin(db=db) as txn:
            out[name] = list(txn.cursor())
    # Each store draws its own epoch and node id when created (and records
    # where the last run's epoch ended when opened).
    out["meta"] = [(k, v) for k, v in out["meta"] if k not in (b"epoch", b"epochs", b"closed", b"node")]
    return out


def _dedupe_entries(records: list) -> list:
    """``dedupe`` records as (T(sender) T(device) U64(local_id), entry)
    pairs, each entry of a run on its own (key T(sender) T(device) U64(last)
    U64(first), the entries concatenated, one length): what two stores that
    batched the same sends differently must agree on."""
    out = []
    for key, value in records:
        end = 1 + key[0]
        end += 1 + key[end]
        if len(key) == end + 8:
            out.append((key, value))
            continue
        last, first = int.from_bytes(key[end : end + 8], "big"), int.from_bytes(key[end + 8 :], "big")
        assert len(key) == end + 16 and first < last and len(value) % (last - first + 1) == 0, (key, value)
        size = len(value) // (last - first + 1)
        out.extend((key[:end] + (first + i).to_bytes(8, "big"), value[i * size : (i + 1) * size])
                   for i in range(last - first + 1))
    return out


def _dump_entries(store: LmdbStore) -> dict:
    """:func:`_dump` with the ``dedupe`` runs cut into their entries."""
    out = _dump(store)
    out["dedupe"] = _dedupe_entries(out["dedupe"])
    return out


USERS = ["al", "bo", "cy", "di"]
CONVS = [direct_conversation("al", "bo"), direct_conversation("bo", "cy"), "g1", "g2", "nogroup"]


@st.composite
def _ops(draw: Any, clock: list) -> Any:
    kind = draw(st.sampled_from(["send"] * 8 + ["add", "remove", "odd"]))
    clock[0] += 1
    if kind == "add":
        return AddMembers(draw(st.sampled_from(["g1", "g2"])), (draw(st.sampled_from(USERS)),), clock[0], "")
    if kind == "remove":
        return RemoveMembers(draw(st.sampled_from(["g1", "g2"])), (draw(st.sampled_from(USERS)),), clock[0], "")
    sender = draw(st.sampled_from(USERS))
    local_id = draw(st.integers(1, 6))  # small: retries and conflicts happen
    payload = draw(st.sampled_from([b"a", b"b"]))
    conv = draw(st.sampled_from(CONVS))
    op = NewMessage(clock[0].to_bytes(8, "big") + b"N" * 8, conv, sender, "ph", local_id, 5, clock[0], payload,
                    payload * 16, draw(st.integers(0, 5)))
    if kind == "odd":
        field, value = draw(st.sampled_from([
            ("mentions", ("cy",)), ("mention_all", True), ("sender", SYSTEM), ("device", "b o"),
            ("local_id", -1), ("server_time", -3), ("payload", bytearray(b"p")), ("event", True),
        ]))
        if field == "sender":
            op = dataclasses.replace(op, sender=SYSTEM, device=SYSTEM)
        else:
            op = dataclasses.replace(op, **{field: value})
    return op


def _draw_batches(data: st.DataObject, clock: list, max_batches: int, max_ops: int = 12, min_batches: int = 1) -> list:
    """Batches of :func:`_ops` (each 1..``max_ops`` long) drawn from ``data``,
    their times from the shared ``clock``."""
    return data.draw(st.lists(st.lists(_ops(clock), min_size=1, max_size=max_ops),
                              min_size=min_batches, max_size=max_batches))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_store_writes_the_same_bytes_with_and_without_the_fast_path(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    clock = [1_000]
    batches = _draw_batches(data, clock, 8)
    stores = [LmdbStore(str(tmp_path_factory.mktemp("fast"))), LmdbStore(str(tmp_path_factory.mktemp("general")))]
    real = lmdb_module._store_plain_run
    results: list[list] = [[], []]
    try:
        for i, store in enumerate(stores):
            store.commit(WriteBatch(1, (CreateGroup("g1", ("al", "bo", "cy"), 1), CreateGroup("g2", ("bo",), 1))))
            lmdb_module._store_plain_run = real if i == 0 else (lambda ops, start, *a: start)
            for n, ops in enumerate(batches):
                results[i].append(store.commit(WriteBatch(n + 2, tuple(ops))))
            lmdb_module._store_plain_run = real
        assert results[0] == results[1]
        assert _dump(stores[0]) == _dump(stores[1])
    finally:
        lmdb_module._store_plain_run = real
        for store in stores:
            store.close()


def test_the_fast_path_takes_the_steady_state(tmp_path: Any) -> None:
    # After the first send of a conversation has loaded it, later sends take the fast path.
    store = LmdbStore(str(tmp_path))
    real = lmdb_module._store_plain_run
    hits = [0, 0]  # ops the run took, runs that took none

    def counted(ops: Any, start: int, *a: Any) -> int:
        end = real(ops, start, *a)
        hits[0] += end - start
        hits[1] += end == start
        return end

    lmdb_module._store_plain_run = counted
    try:
        conv = direct_conversation("al", "bo")
        for n in range(5):
            ops = tuple(NewMessage((10 * n + k + 1).to_bytes(8, "big") + b"N" * 8, conv, "al", "ph", 10 * n + k + 1,
                                   0, 10 * n + k + 1, b"hi", b"d") for k in range(10))
            assert all(isinstance(r, Appended) for r in store.commit(WriteBatch(n, ops)))
    finally:
        lmdb_module._store_plain_run = real
        store.close()
    assert hits == [49, 1]


# ------------------------------------------------ store_plain_run: a run of ops in one call


def _run_batch(**flags: bool) -> SimpleNamespace:
    w = _batch(**{**GOOD, **flags})
    w.hwm = 1_699_990
    return w


def _run_state(w: SimpleNamespace) -> tuple:
    return (*_state(w), w.hwm)


def _run_state_all(w: SimpleNamespace) -> tuple:
    return (*_run_state(w), w.hot.dmax)


def _call_run(backend: ModuleType, ops: Any, start: Any, w: SimpleNamespace, results: Any,
              device_key: Any = lmdb_module._device_key) -> object:
    return backend.store_plain_run(ops, start, NewMessage, w, "dedupe-db", lmdb_module._conv_info, device_key,
                                   lmdb_module._record_ids, _appended, results)


def _naive_run(backend: ModuleType, ops: list, start: int, w: SimpleNamespace, results: list) -> int:
    # What the run must equal: store_plain_message op by op until it declines.
    i = start
    while i < len(ops) and type(ops[i]) is NewMessage:
        res = _call(backend, ops[i], w)
        if res is None:
            break
        results.append(res)
        w.hwm = max(w.hwm, ops[i].server_time)
        i += 1
    return i


_RUN_BAD = [c for c in _BAD if c[0] not in ("sender",)] + [("sender", "x" * 65), ("sender", SYSTEM)]


@st.composite
def _run_ops(draw: Any) -> list:
    ops: list = []
    for k in range(draw(st.integers(0, 8))):
        if draw(st.integers(0, 9)) == 0:
            ops.append(draw(st.sampled_from(["not an op", object(), SimpleNamespace(mentions=())])))
            continue
        op = NewMessage(bytes((k,)) * 16, "d:al:bo", draw(st.sampled_from(["al", "bo"])),
                        draw(st.sampled_from(["ph", "pc"])), draw(st.integers(5, 9)), 3,
                        draw(st.integers(1_699_980, 1_700_000)), b"p", b"D" * 16, draw(st.integers(0, 50)))
        if draw(st.integers(0, 4)) == 0:
            op = dataclasses.replace(op, **dict([draw(st.sampled_from(_RUN_BAD))]))
        ops.append(op)
    return ops


@settings(max_examples=300, deadline=None)
@given(ops=_run_ops(), start=st.integers(0, 8), as_list=st.booleans(),
       flipped=st.lists(st.sampled_from(sorted(GOOD)), max_size=1))
def test_a_run_takes_exactly_what_store_plain_message_takes(both: tuple[ModuleType, ModuleType], ops: list,
                                                           start: int, as_list: bool, flipped: list) -> None:
    # Retries (a local_id seen before in the run, or bo/ph/7 stored), ops of
    # other types, fields the general path must judge, batches the fast path
    # cannot take: each backend's run equals store_plain_message op by op,
    # and the two backends equal each other.
    start = min(start, len(ops))
    flags = {k: not GOOD[k] for k in flipped}
    outs = []
    for backend in both:
        w, results = _run_batch(**flags), ["earlier"]
        end = _call_run(backend, ops if as_list else tuple(ops), start, w, results)
        w2, expected = _run_batch(**flags), ["earlier"]
        assert end == _naive_run(backend, ops, start, w2, expected)
        assert results == expected and _run_state(w) == _run_state(w2)
        outs.append((end, results, _run_state_all(w)))
    assert outs[0] == outs[1]


def test_a_run_stops_at_the_first_op_it_does_not_take(backend: ModuleType) -> None:
    ops = [dataclasses.replace(OP, local_id=n, msg_id=bytes((n,)) * 16, server_time=1_700_000 + n) for n in (1, 2)]
    ops += [dataclasses.replace(OP, local_id=2, msg_id=b"R" * 16)]  # a retry of the second one
    ops += [dataclasses.replace(OP, local_id=4, msg_id=b"4" * 16)]
    w, results = _run_batch(), []
    assert _call_run(backend, tuple(ops), 0, w, results) == 2
    assert [r[2] for r in results] == [42, 43] and w.hwm == 1_700_002  # type: ignore[index]
    assert _call_run(backend, tuple(ops), 2, w, results) == 2  # the general path answers the retry
    assert _call_run(backend, tuple(ops), 3, w, results) == 4 and results[-1][2] == 44  # type: ignore[index]
    assert _call_run(backend, tuple(ops), 4, w, results) == 4


@pytest.mark.parametrize("ops, start, results, exc, text", [
    ([OP], 0, (), TypeError, "results must be a list"),
    ({OP}, 0, [], TypeError, "ops must be a tuple or list"),
    (iter([OP]), 0, [], TypeError, "ops must be a tuple or list"),
    ([OP], "0", [], TypeError, "start must be int"),
    ([OP], 0.0, [], TypeError, "start must be int"),
    ([OP], -1, [], ValueError, "start out of range"),
    ([OP], 2, [], ValueError, "start out of range"),
])
def test_store_plain_run_rejects_bad_arguments(backend: ModuleType, ops: Any, start: Any, results: Any, exc: type,
                                              text: str) -> None:
    w = _run_batch()
    before = copy.deepcopy(_run_state(w))
    with pytest.raises(exc, match=text):
        _call_run(backend, ops, start, w, results)
    assert _run_state(w) == before


def test_a_run_keeps_the_ops_taken_before_an_error(backend: ModuleType) -> None:
    # The key helpers' errors pass through; what was taken stays taken.
    def device_key(sender: str, device: str) -> Any:
        return lmdb_module._device_key(sender, device) if device == "ph" else "not bytes"

    ops = (OP, dataclasses.replace(OP, local_id=8, msg_id=b"8" * 16, device="pc"))
    w, results = _run_batch(), []
    with pytest.raises(TypeError, match="device_key must return bytes"):
        _call_run(backend, ops, 0, w, results, device_key)
    assert len(results) == 1 and w.hwm == OP.server_time and len(w.s_msgs) == 1


# ------------------------------------------------ device records: staged, written once per batch


@st.composite
def _device_ops(draw: Any, clock: list) -> Any:
    kind = draw(st.sampled_from(["ack"] * 5 + ["touch"] * 2 + ["send"] * 3 + ["reclaim"] * 2 + ["purge", "bad"]))
    clock[0] += draw(st.integers(1, 40))
    user, device = draw(st.sampled_from(USERS[:3])), draw(st.sampled_from(["ph", "pc"]))
    if kind == "ack":
        return AckPosition(user, device, draw(st.integers(0, 12)), clock[0])
    if kind == "touch":
        return TouchDevice(user, device, draw(st.integers(0, 12)), clock[0])
    if kind == "reclaim":  # forgets devices not seen for a while
        return Reclaim(clock[0], draw(st.integers(1, 60)), 1 << 40)
    if kind == "purge":
        return PurgeUser(user, clock[0])
    if kind == "bad":
        return AckPosition(user, "b o", 3, clock[0])
    sender, conv = draw(st.sampled_from([("al", CONVS[0]), ("bo", CONVS[1]), ("cy", "g1"), ("bo", "g1")]))
    return NewMessage(clock[0].to_bytes(8, "big") + b"D" * 8, conv, sender, device, clock[0], 5, clock[0], b"m",
                      b"m" * 16)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_device_writes_in_one_batch_equal_one_op_per_batch(tmp_path_factory: pytest.TempPathFactory,
                                                           data: st.DataObject) -> None:
    # Acks and touches of several devices, interleaved with sends, Reclaim
    # (which reads and deletes devices), PurgeUser and refused acks, in
    # batches of any size: the same results, the same device reads between
    # batches and the same bytes on disk as committing each op alone; and
    # the same results and devices as the memory store (which keeps no cache).
    clock = [1_000]
    ops = data.draw(st.lists(_device_ops(clock), min_size=1, max_size=30))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(ops)), max_size=4))) | {0, len(ops)})
    stores = [LmdbStore(str(tmp_path_factory.mktemp("batched"))), LmdbStore(str(tmp_path_factory.mktemp("alone")))]
    memory = MemoryStore()
    try:
        for store in (*stores, memory):
            store.commit(WriteBatch(1, (CreateGroup("g1", ("al", "bo", "cy"), 1),)))
        batched: list = []
        alone: list = []
        reference: list = []
        for a, b in zip(cuts, cuts[1:]):
            batched.extend(stores[0].commit(WriteBatch(a + 2, tuple(ops[a:b]))))
            reference.extend(memory.commit(WriteBatch(a + 2, tuple(ops[a:b]))))
            for n in range(a, b):
                alone.extend(stores[1].commit(WriteBatch(n + 2, (ops[n],))))
            for user in USERS[:3]:
                assert stores[0].devices(user) == stores[1].devices(user) == memory.devices(user)
                assert stores[0].device(user, "ph") == stores[1].device(user, "ph") == memory.device(user, "ph")
        assert batched == alone == reference
        assert _dump_entries(stores[0]) == _dump_entries(stores[1])
    finally:
        for store in stores:
            store.close()


def test_an_ack_after_reclaim_in_the_same_batch_sees_the_device_forgotten(tmp_path: Any) -> None:
    store = LmdbStore(str(tmp_path))
    try:
        conv = direct_conversation("al", "bo")
        ops = [NewMessage(n.to_bytes(8, "big") + b"N" * 8, conv, "al", "ph", n, 0, n, b"hi", b"d") for n in (1, 2, 3)]
        store.commit(WriteBatch(1, tuple(ops)))
        store.commit(WriteBatch(2, (TouchDevice("bo", "ph", 0, 10), AckPosition("bo", "ph", 2, 10))))
        assert store.device("bo", "ph").position == 2  # type: ignore[union-attr]
        # One batch: ack (cached and staged), Reclaim forgets bo/ph (last seen
        # 20 < 1000 - 100), then a touch finds it new again at the floor.
        res = store.commit(WriteBatch(3, (AckPosition("bo", "ph", 3, 20), Reclaim(1_000, 100, 1 << 40),
                                          TouchDevice("bo", "ph", 0, 1_000))))
        assert res[1].devices == 1  # type: ignore[union-attr]
        assert res[2] == Touched("bo", "ph", 0, True)
        assert store.device("bo", "ph").last_seen == 1_000  # type: ignore[union-attr]
        # The next batch reads it through the cache the last one kept.
        res = store.commit(WriteBatch(4, (AckPosition("bo", "ph", 3, 1_001),)))
        assert res[0].position == 3 and store.device("bo", "ph").position == 3  # type: ignore[union-attr]
    finally:
        store.close()



def test_a_send_above_the_devices_bound_is_not_probed(backend: ModuleType) -> None:
    # bo/ph stored local_id 7: the run seeds the device's bound (7) once;
    # 9 and 10 are above it (not probed, the bound rises to 10); 8 is below
    # it (probed: not stored); 7 is probed and found: a retry.
    ops = tuple(dataclasses.replace(OP, local_id=n, msg_id=bytes((n,)) * 16) for n in (9, 10, 8, 7))
    w, results = _run_batch(stored_retry=True), []
    assert _call_run(backend, ops, 0, w, results) == 3  # 7: a retry, for the general path
    assert w.txn.gets == 2  # 8 (at or below the bound, 10) and 7; not 9 or 10
    assert w.hot.dmax == {tk("bo") + tk("ph"): 10}
    # A device whose dedupe records another path wrote in this batch gets no bound.
    w, results = _run_batch(stored_retry=True), []
    w.dk_general.add(tk("bo") + tk("ph"))
    assert _call_run(backend, ops[:2], 0, w, results) == 2
    assert w.txn.gets == 2 and w.hot.dmax == {}



def test_retries_of_local_ids_other_paths_wrote_are_found(tmp_path: Any) -> None:
    # The bound that spares the dedupe probe must cover what the general path
    # (a mention) and an amend wrote, in the same batch and the next ones.
    from pimcore.store import AmendMessage, MessageKind, Rejected
    from pimcore.store import MemoryStore as Memory

    conv = direct_conversation("al", "bo")

    def send(n: int, digest: bytes = b"d" * 16, **kw: Any) -> NewMessage:
        return NewMessage(n.to_bytes(8, "big") + b"N" * 8, conv, "al", "ph", n, 0, n, b"hi", digest, **kw)

    edit = AmendMessage((30).to_bytes(8, "big") + b"A" * 8, conv, "al", "ph", 20, 0, 30, MessageKind.EDIT, 1, b"new",
                        b"a" * 16)
    batches = [
        (send(1), send(2), send(3)),
        (send(4), send(10, mentions=("bo",)), send(10)),  # the general path wrote 10
        (send(10), send(11), send(10, b"x" * 16), send(5)),
        (send(13), edit, send(20, b"a" * 16)),  # the amend wrote 20
        (send(20, b"a" * 16), send(20), send(21), send(3)),
    ]
    stores = [LmdbStore(str(tmp_path / "lmdb")), Memory()]
    try:
        got = [[store.commit(WriteBatch(n, ops)) for n, ops in enumerate(batches)] for store in stores]
    finally:
        stores[0].close()
    assert got[0] == got[1]
    kinds = [[r.code.name if isinstance(r, Rejected) else type(r).__name__ for r in b] for b in got[0]]
    assert kinds == [
        ["Appended"] * 3,
        ["Appended", "Appended", "Duplicate"],
        ["Duplicate", "Appended", "DUPLICATE_CONFLICT", "Appended"],
        ["Appended", "Appended", "Duplicate"],
        ["Duplicate", "DUPLICATE_CONFLICT", "Appended", "Duplicate"],
    ]


def test_an_after_seq_above_the_purge_point_or_none_is_the_common_case(backend: ModuleType) -> None:
    # (Only 0 < after_seq <= the purge point is handed back: the general
    # path refuses it, base.NewMessage.)
    for after_seq in (0, 4):
        w = _batch(**{**GOOD, "purged": True})
        assert _call(backend, dataclasses.replace(OP, after_seq=after_seq), w) is not None
    w = _batch(**{**GOOD, "purged": True})
    assert _call(backend, dataclasses.replace(OP, after_seq=1), w) is None
