"""The LMDB store's ``dedupe`` runs (issue 13, schema 4).

A batch's staged dedupe entries are written as one record per run of a
device's consecutive local_ids (key ``T(sender) T(device) U64(last)
U64(first)``, the entries concatenated), a lone entry as before (key
``T(sender) T(device) U64(local_id)``).  So:

1. the twins (``dedupe_items``, ``dedupe_get``) agree, and what one writes
   the other finds: every entry, and nothing else, whatever the neighbours;
2. every retry of every message of a run is answered with its identity --
   in the same batch, in later batches, after a restart, after a crash
   (the command log's replay writes the same records);
3. retention and purges remove exactly the entries of the messages they
   remove, and never another's (a retry of a message whose entry was lost
   would be stored twice);
4. a schema 3 store (single records only) opens, is read as it is and is
   upgraded to 4 by its next owner;
5. against the memory store (one entry per message, no runs), random
   batches of sends, retries, retention and purges give the same results.
"""

from __future__ import annotations

import dataclasses
import struct
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimcore.errors import ErrorCode, StoreError
from pimcore.store import (
    Appended,
    CreateGroup,
    Duplicate,
    Expire,
    Expired,
    LmdbStore,
    MemoryStore,
    NewMessage,
    PurgeConversation,
    PurgeUser,
    Rejected,
    SetRetention,
    WriteBatch,
    direct_conversation,
)
from pimcore.store import lmdb as lmdb_module

from test_store_plain import _dedupe_entries, _dump

U64_MAX = (1 << 64) - 1
AB = direct_conversation("al", "bo")
AC = direct_conversation("al", "cy")
_U64 = struct.Struct(">Q")


def tk(text: str) -> bytes:
    return bytes((len(text),)) + text.encode("ascii")


def dk(sender: str = "al", device: str = "ph") -> bytes:
    return tk(sender) + tk(device)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def tick(self) -> int:
        self.now += 1
        return self.now


def send(clock: Clock, local_id: int, conv: str = AB, sender: str = "al", device: str = "ph",
         digest: bytes = b"D" * 16) -> NewMessage:
    t = clock.tick()
    return NewMessage(t.to_bytes(8, "big") + b"N" * 8, conv, sender, device, local_id, 5, t, b"m%d" % local_id,
                      digest, 0)


def retry(clock: Clock, op: NewMessage, **change: Any) -> NewMessage:
    """The same send again: a new msg id and server time (the core's), the
    same local id and digest."""
    t = clock.tick()
    return dataclasses.replace(op, msg_id=t.to_bytes(8, "big") + b"R" * 8, server_time=t, **change)


def dedupe_records(store: LmdbStore) -> list:
    return _dump(store)["dedupe"]


def entry(res: Appended, op: NewMessage) -> bytes:
    return op.msg_id + struct.pack(">Qq", res.seq, res.server_time) + op.digest


# ------------------------------------------------------------ the twins


def test_the_twins_write_runs_and_read_them(backend: ModuleType, tmp_path: Path) -> None:
    k = dk()
    items = [(k + _U64.pack(n), bytes([n]) * 40) for n in (1, 2, 3, 5, 6)]
    items.append((dk("al", "tab") + _U64.pack(4), b"t" * 40))
    records = backend.dedupe_items(sorted(items))
    assert records == [
        (k + _U64.pack(3) + _U64.pack(1), bytes([1]) * 40 + bytes([2]) * 40 + bytes([3]) * 40),
        (k + _U64.pack(6) + _U64.pack(5), bytes([5]) * 40 + bytes([6]) * 40),
        (dk("al", "tab") + _U64.pack(4), b"t" * 40),
    ]
    env = lmdb.open(str(tmp_path), max_dbs=2)
    db = env.open_db(b"dedupe")
    with env.begin(write=True, db=db) as txn:
        txn.cursor(db).putmulti(records)
        for n in range(0, 9):
            want = bytes([n]) * 40 if n in (1, 2, 3, 5, 6) else None
            assert backend.dedupe_get(txn, db, k + _U64.pack(n)) == want, n
        assert backend.dedupe_get(txn, db, dk("al", "tab") + _U64.pack(4)) == b"t" * 40
        assert backend.dedupe_get(txn, db, dk("al", "tab") + _U64.pack(3)) is None
        assert backend.dedupe_get(txn, db, dk("bo", "ph") + _U64.pack(2)) is None
    env.close()


def test_entries_of_other_lengths_do_not_join_a_run(backend: ModuleType) -> None:
    k = dk()
    items = [(k + _U64.pack(1), b"a" * 32), (k + _U64.pack(2), b"b" * 48), (k + _U64.pack(3), b"c" * 48)]
    assert backend.dedupe_items(items) == [items[0], (k + _U64.pack(3) + _U64.pack(2), b"b" * 48 + b"c" * 48)]


@pytest.mark.parametrize("items, exc, match", [
    ((), TypeError, "items must be a list"),
    ([1], TypeError, r"items must be \(key, value\) tuples"),
    ([(b"k" * 9, b"v", b"x")], TypeError, r"items must be \(key, value\) tuples"),
    ([[b"k" * 9, b"v"]], TypeError, r"items must be \(key, value\) tuples"),
    ([(bytearray(9), b"v")], TypeError, "dedupe key and value must be bytes"),
    ([(b"k" * 9, "v")], TypeError, "dedupe key and value must be bytes"),
    ([(b"k" * 8, b"v")], ValueError, "dedupe key too short"),
])
def test_dedupe_items_refuses_what_is_not_staged_entries(backend: ModuleType, items: Any, exc: type,
                                                         match: str) -> None:
    with pytest.raises(exc, match=match):
        backend.dedupe_items(items)


@pytest.mark.parametrize("dkey, exc, match", [
    ("x" * 9, TypeError, "dkey must be bytes"),
    (bytearray(9), TypeError, "dkey must be bytes"),
    (b"x" * 8, ValueError, "dedupe key too short"),
])
def test_dedupe_get_refuses_what_is_not_a_key(backend: ModuleType, tmp_path: Path, dkey: Any, exc: type,
                                              match: str) -> None:
    env = lmdb.open(str(tmp_path), max_dbs=2)
    db = env.open_db(b"dedupe")
    with env.begin(db=db) as txn:
        with pytest.raises(exc, match=match):
            backend.dedupe_get(txn, db, dkey)
    env.close()


def _bad_run(key: bytes, value: bytes) -> str:
    """The StoreError message of a run record that cannot be valid."""
    n = len(key)
    last, first = _U64.unpack_from(key, n - 16)[0], _U64.unpack_from(key, n - 8)[0]
    return f"dedupe run {key.hex()} holds {len(value)} bytes for local ids {first}..{last} (store corrupt)"


#: Run records (last, first, value) no dedupe_items writes: a span that
#: wraps (2^64 entries), last below first, one entry only, a length that is
#: not a whole number of entries, entries shorter than msg_id + seq + time
#: (32 bytes), no bytes at all, more entries than bytes.
HOSTILE_RUNS = [
    (U64_MAX, 0, b"x" * 40),
    (U64_MAX, 0, b""),
    (3, 5, b"x" * 40),
    (3, 3, b"x" * 40),
    (3, 1, b"x" * 100),
    (3, 1, b"x" * 48),
    (2, 1, b""),
    (1 << 63, 0, b"x" * 96),
    (U64_MAX, 1, b"x" * 64),
]


@pytest.mark.parametrize("last, first, value", HOSTILE_RUNS)
def test_dedupe_get_refuses_a_run_that_cannot_be_valid_on_both_backends(
    both: tuple[ModuleType, ModuleType], tmp_path: Path, last: int, first: int, value: bytes
) -> None:
    # (Before: SIGFPE on the Cython backend for the wrapping span, wrong
    # answers -- b'' or a slice of the wrong size -- on both for the others.)
    key = dk() + _U64.pack(last) + _U64.pack(first)
    env = lmdb.open(str(tmp_path), max_dbs=2)
    db = env.open_db(b"dedupe")
    try:
        with env.begin(write=True, db=db) as txn:
            txn.put(key, value, db=db)
            for local_id in sorted({0, min(first, last), last}):
                outcomes = []
                for impl in both:
                    with pytest.raises(StoreError) as info:
                        impl.dedupe_get(txn, db, dk() + _U64.pack(local_id))
                    outcomes.append((type(info.value), str(info.value)))
                assert outcomes == [(StoreError, _bad_run(key, value))] * 2, local_id
            # Another device's keys never reach the record.
            assert [impl.dedupe_get(txn, db, dk("al", "tab") + _U64.pack(1)) for impl in both] == [None, None]
    finally:
        env.close()


#: Devices whose prefixes are 8 bytes apart (a single key of one is as long
#: as a run key of the other) and local ids at both ends of the range.
_DEVICES = [dk("al", "p"), dk("al", "p" + "x" * 8), dk("al", "q"), dk("b", "p")]
_IDS = st.one_of(st.integers(0, 12), st.integers(U64_MAX - 12, U64_MAX))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_what_dedupe_items_writes_dedupe_get_finds_on_both_backends(
    both: tuple[ModuleType, ModuleType], tmp_path: Path, data: st.DataObject
) -> None:
    cy, py = both
    staged = data.draw(st.dictionaries(
        st.tuples(st.sampled_from(_DEVICES), _IDS),
        st.sampled_from([32, 32, 32, 48]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
        max_size=30,
    ))
    items = sorted((d + _U64.pack(n), v) for (d, n), v in staged.items())
    records = cy.dedupe_items(items)
    assert records == py.dedupe_items(items)
    assert [k for k, _ in records] == sorted(k for k, _ in records)
    assert _dedupe_entries(records) == items  # every entry once, nothing else
    # Now and then a run record no dedupe_items writes (a corrupt store):
    # every lookup that reaches it is refused alike, the others answer.
    hostile = data.draw(st.none() | st.tuples(st.sampled_from(_DEVICES), st.sampled_from(HOSTILE_RUNS)))
    stored = dict(records)
    if hostile is not None:
        d, (last, first, value) = hostile
        hk = d + _U64.pack(last) + _U64.pack(first)
        stored[hk] = value
    keys = sorted(stored)
    env = lmdb.open(tempfile.mkdtemp(dir=tmp_path), max_dbs=2)  # (one per example)
    db = env.open_db(b"dedupe")
    try:
        with env.begin(write=True, db=db) as txn:
            txn.cursor(db).putmulti(sorted(stored.items()))
            for d in _DEVICES:
                for n in [*range(0, 14), *range(U64_MAX - 13, U64_MAX + 1)]:
                    key = d + _U64.pack(n)
                    got = [_outcome(impl.dedupe_get, txn, db, key) for impl in both]
                    reached = next((k for k in keys if k >= key), None)
                    if hostile is not None and reached == hk and len(hk) == len(key) + 8 and hk[:len(d)] == d:
                        want: Any = ("StoreError", _bad_run(hk, stored[hk]))
                    else:
                        want = ("ok", staged.get((d, n)))
                    assert got == [want, want], (d, n)
    finally:
        env.close()


def _outcome(f: Any, *args: Any) -> tuple:
    try:
        return ("ok", f(*args))
    except Exception as exc:
        return (type(exc).__name__, str(exc))


# ----------------------------------------------------------- the store


def test_a_batch_of_consecutive_sends_is_one_record_per_run(tmp_path: Path) -> None:
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        ops = [send(clock, n) for n in (1, 2, 3, 5, 6)] + [send(clock, 7, AC), send(clock, 1, device="tab")]
        res = store.commit(WriteBatch(1, tuple(ops)))
        assert all(type(r) is Appended for r in res)
        e = [entry(r, op) for r, op in zip(res, ops)]  # type: ignore[arg-type]
        assert dedupe_records(store) == [
            (dk() + _U64.pack(3) + _U64.pack(1), e[0] + e[1] + e[2]),
            (dk() + _U64.pack(7) + _U64.pack(5), e[3] + e[4] + e[5]),  # two conversations, one run
            (dk("al", "tab") + _U64.pack(1), e[6]),
        ]
        assert [store.deduped("al", "ph", n) for n in range(9)] == [False, True, True, True, False, True, True,
                                                                    True, False]


def _retries_answered(store: LmdbStore, clock: Clock, sent: list, res: list, batch: int, one_by_one: bool) -> None:
    retries = [retry(clock, op) for op in sent]
    if one_by_one:
        got = [store.commit(WriteBatch(batch + i, (op,)))[0] for i, op in enumerate(retries)]
    else:
        got = list(store.commit(WriteBatch(batch, tuple(retries))))
    assert got == [Duplicate(r.msg_id, r.seq, r.server_time) for r in res]
    # A retry with another payload is a conflict, not a new message.
    [conflict] = store.commit(WriteBatch(batch + 100, (retry(clock, sent[3], digest=b"E" * 16),)))
    assert conflict == Rejected(ErrorCode.DUPLICATE_CONFLICT)


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("one_by_one", [False, True])
@pytest.mark.parametrize("durability", ["sync", "log"])
def test_every_retry_of_a_run_is_a_duplicate(tmp_path: Path, restart: bool, one_by_one: bool,
                                             durability: str) -> None:
    clock = Clock()
    store = LmdbStore(str(tmp_path), durability=durability)
    try:
        store.commit(WriteBatch(1, (send(clock, 100),)))  # (the conversation loaded: the fast path takes the run)
        sent = [send(clock, n, AB if n % 3 else AC) for n in range(1, 9)]
        res = list(store.commit(WriteBatch(2, tuple(sent))))
        assert all(type(r) is Appended for r in res)
        assert any(len(k) == len(dk()) + 16 for k, _ in dedupe_records(store))
        if restart:
            store.close()
            store = LmdbStore(str(tmp_path), durability=durability)
        _retries_answered(store, clock, sent, res, 10, one_by_one)
        # New sends around the run are new; a batch that mixes them with
        # retries answers each.
        mixed = [send(clock, 0), retry(clock, sent[0]), send(clock, 9), retry(clock, sent[7]), send(clock, 10)]
        out = store.commit(WriteBatch(300, tuple(mixed)))
        assert [type(r) for r in out] == [Appended, Duplicate, Appended, Duplicate, Appended]
        assert out[1] == Duplicate(res[0].msg_id, res[0].seq, res[0].server_time)
        assert out[3] == Duplicate(res[7].msg_id, res[7].seq, res[7].server_time)
        assert len(store.history(AB, 0, 100)) + len(store.history(AC, 0, 100)) == 1 + 8 + 3
    finally:
        store.close()


def test_a_run_ending_at_the_last_local_id_is_found(tmp_path: Path) -> None:
    # After a restart the device's bound (the highest local_id stored, which
    # spares the probe above it) is read from the last key: here a run's.
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        store.commit(WriteBatch(1, (send(clock, 1),)))
        sent = [send(clock, n) for n in range(U64_MAX - 2, U64_MAX + 1)]
        res = list(store.commit(WriteBatch(2, tuple(sent))))
        assert (dk() + _U64.pack(U64_MAX) + _U64.pack(U64_MAX - 2)) in dict(dedupe_records(store))
    with LmdbStore(str(tmp_path)) as store:
        store.commit(WriteBatch(3, (send(clock, 2),)))  # (the conversation loaded: the fast path takes the next)
        got = store.commit(WriteBatch(4, tuple(retry(clock, op) for op in sent)))
        assert list(got) == [Duplicate(r.msg_id, r.seq, r.server_time) for r in res]
        assert store.commit(WriteBatch(4, (retry(clock, sent[1]),)))[0] == Duplicate(res[1].msg_id, res[1].seq,
                                                                                     res[1].server_time)


def test_a_crash_replay_writes_the_same_run_records(tmp_path: Path) -> None:
    from test_command_log import _crash_copy

    clock = Clock()
    store = LmdbStore(str(tmp_path / "a"), durability="log")
    try:
        store.defer_commits(True)
        for b in range(4):
            store.commit(WriteBatch(b + 1, tuple(send(clock, 10 * b + n, AB if n % 2 else AC) for n in range(6))))
        want = _dump(store)
        assert sum(len(k) == len(dk()) + 16 for k, _ in want["dedupe"]) == 4
        copy = _crash_copy(tmp_path / "a", tmp_path / "b")
    finally:
        store.close()
    again = LmdbStore(str(copy), durability="log")
    try:
        assert _dump(again) == want
    finally:
        again.close()


def test_retention_of_part_of_a_run_keeps_the_others_entries(tmp_path: Path) -> None:
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        first = [send(clock, 100), send(clock, 200, AC)]
        e0 = [entry(r, op) for r, op in zip(store.commit(WriteBatch(1, tuple(first))), first)]  # type: ignore[arg-type]
        # One run, local ids 1..6, alternately into AB (1, 3, 5) and AC (2, 4, 6).
        sent = [send(clock, n, AB if n % 2 else AC) for n in range(1, 7)]
        res = list(store.commit(WriteBatch(2, tuple(sent))))
        e = [entry(r, op) for r, op in zip(res, sent)]  # type: ignore[arg-type]
        runs = [r for r in dedupe_records(store) if r[0].startswith(dk()) and len(r[0]) == len(dk()) + 16]
        assert runs == [(dk() + _U64.pack(6) + _U64.pack(1), b"".join(e))]
        store.commit(WriteBatch(3, (SetRetention(AB, -1, 1),)))
        store.commit(WriteBatch(4, (Expire(clock.tick()),)))  # AB keeps local id 5 only (not 100, 1, 3)
        assert [m.local_id for m in store.history(AB, 0, 100)] == [5]
        assert [n for n in range(1, 7) if store.deduped("al", "ph", n)] == [2, 4, 5, 6]
        # The run is cut around the entries that went with their messages.
        mine = [r for r in dedupe_records(store) if r[0].startswith(dk())]
        assert mine == [
            (dk() + _U64.pack(2), e[1]),
            (dk() + _U64.pack(6) + _U64.pack(4), e[3] + e[4] + e[5]),
            (dk() + _U64.pack(200), e0[1]),  # (100 went with AB's other messages)
        ]
        # Each kept one still answers its retries: nothing is stored twice.
        for i in (1, 3, 4, 5):
            got = store.commit(WriteBatch(10 + i, (retry(clock, sent[i]),)))[0]
            assert got == Duplicate(res[i].msg_id, res[i].seq, res[i].server_time)  # type: ignore[union-attr]
        assert len(store.history(AC, 0, 100)) == 4 and len(store.history(AB, 0, 100)) == 1
        # A whole conversation purged takes its entries, the other's stay.
        store.commit(WriteBatch(30, (PurgeConversation(AC),)))
        assert [n for n in range(1, 7) if store.deduped("al", "ph", n)] == [5]
        assert [r for r in dedupe_records(store) if r[0].startswith(dk())] == [(dk() + _U64.pack(5), e[4])]


def test_retention_takes_every_other_entry_of_a_long_run(tmp_path: Path) -> None:
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        store.commit(WriteBatch(1, (send(clock, 1000), send(clock, 2000, AC))))
        sent = [send(clock, n, AB if n % 2 else AC) for n in range(1, 201)]
        res = list(store.commit(WriteBatch(2, tuple(sent))))
        assert dk() + _U64.pack(200) + _U64.pack(1) in dict(dedupe_records(store))
        store.commit(WriteBatch(3, (SetRetention(AB, -1, 1), SetRetention(AC, -1, 50))))
        store.commit(WriteBatch(4, (Expire(clock.tick()),)))  # AB keeps 199, AC the even 102..200
        kept = [n for n in range(1, 201) if store.deduped("al", "ph", n)]
        assert kept == [*range(102, 199, 2), 199, 200]
        # Each run rewritten once per conversation trimmed; what is left of
        # it is written as a batch's entries are: 198, 199, 200 one run.
        mine = [k for k, _ in dedupe_records(store) if k.startswith(dk())]
        assert mine == [dk() + _U64.pack(n) for n in range(102, 197, 2)] + [dk() + _U64.pack(200) + _U64.pack(198)]
        for n in kept:
            got = store.commit(WriteBatch(10 + n, (retry(clock, sent[n - 1]),)))[0]
            assert got == Duplicate(res[n - 1].msg_id, res[n - 1].seq, res[n - 1].server_time)  # type: ignore[union-attr]


def test_a_purged_user_leaves_no_run_and_every_message_a_tombstone(tmp_path: Path) -> None:
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        store.commit(WriteBatch(1, (CreateGroup("g1", ("al", "bo", "cy"), clock.tick()),)))
        sent = [send(clock, n, "g1") for n in range(1, 6)] + [send(clock, n, "g1", sender="bo") for n in range(1, 4)]
        store.commit(WriteBatch(2, tuple(sent)))
        assert any(len(k) == len(dk()) + 16 for k, _ in dedupe_records(store))
        store.commit(WriteBatch(3, (PurgeUser("al", clock.tick()),)))
        assert not [k for k, _ in dedupe_records(store) if k.startswith(tk("al"))]
        assert [(k, len(v)) for k, v in dedupe_records(store)] == [(dk("bo") + _U64.pack(3) + _U64.pack(1), 3 * 48)]
        history = [m for m in store.history("g1", 0, 100) if m.local_id]
        assert [(m.sender, m.payload) for m in history] == [("al", b"")] * 5 + [("bo", b"m%d" % n) for n in (1, 2, 3)]
        assert not any(store.deduped("al", "ph", n) for n in range(1, 6))
        assert all(store.deduped("bo", "ph", n) for n in range(1, 4))


def test_retention_of_a_message_whose_entry_is_gone_keeps_the_entry_of_its_successor(tmp_path: Path) -> None:
    # PurgeUser deletes the user's entries and keeps the messages (as
    # tombstones); the same local ids sent again are new messages with new
    # entries -- in a run -- which the tombstones' retention must not take.
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        store.commit(WriteBatch(1, tuple(send(clock, n) for n in range(1, 5))))
        store.commit(WriteBatch(2, (PurgeUser("al", clock.tick()),)))
        again = [send(clock, n) for n in range(1, 5)]
        res = list(store.commit(WriteBatch(3, tuple(again))))
        assert [type(r) for r in res] == [Appended] * 4
        assert dk() + _U64.pack(4) + _U64.pack(1) in dict(dedupe_records(store))
        store.commit(WriteBatch(4, (SetRetention(AB, -1, 4),)))
        assert store.commit(WriteBatch(5, (Expire(clock.tick()),))) == (Expired(1, 4, 4, (AB,)),)  # the tombstones
        assert all(store.deduped("al", "ph", n) for n in range(1, 5))
        got = store.commit(WriteBatch(6, tuple(retry(clock, op) for op in again)))
        assert list(got) == [Duplicate(r.msg_id, r.seq, r.server_time) for r in res]  # type: ignore[union-attr]


def _put_raw(path: Path, records: list, delete: tuple = ()) -> None:
    """Hand-edit a closed store's ``dedupe`` sub-database."""
    env = lmdb.open(str(path), max_dbs=32)
    with env.begin(write=True) as txn:
        db = env.open_db(b"dedupe", txn=txn)
        for key in delete:
            txn.delete(key, db=db)
        for key, value in records:
            txn.put(key, value, db=db)
    env.close()


def test_a_corrupt_run_record_is_a_store_error_and_the_store_goes_on(tmp_path: Path) -> None:
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        store.commit(WriteBatch(1, (send(clock, 100), send(clock, 1, device="tab"))))
    # Local ids 0..2^64-1 in 40 bytes: the span wraps (SIGFPE on the Cython
    # backend before), and no value could hold that many entries anyway.
    bad = dk() + _U64.pack(U64_MAX) + _U64.pack(0)
    _put_raw(tmp_path, [(bad, b"x" * 40)], delete=(dk() + _U64.pack(100),))
    want = _bad_run(bad, b"x" * 40)
    with LmdbStore(str(tmp_path)) as store:
        with pytest.raises(StoreError) as info:
            store.deduped("al", "ph", 5)
        assert str(info.value) == want
        for n, op in enumerate([send(clock, 5), send(clock, 7, AC), PurgeUser("al", clock.tick())]):
            with pytest.raises(StoreError) as info:
                store.commit(WriteBatch(10 + n, (op,)))
            assert want in str(info.value)
        # The store is alive: other devices' sends and retries are answered.
        ok = send(clock, 2, device="tab")
        [res] = store.commit(WriteBatch(20, (ok,)))
        assert type(res) is Appended
        [again] = store.commit(WriteBatch(21, (retry(clock, ok),)))
        assert again == Duplicate(res.msg_id, res.seq, res.server_time)  # type: ignore[union-attr]
        assert store.deduped("al", "tab", 1) and not store.deduped("bo", "ph", 1)


def test_retention_refuses_a_run_whose_length_is_not_its_entries(tmp_path: Path) -> None:
    # A run of 3 local ids whose value is not 3 entries: retention used to cut
    # it at the wrong places (and write the pieces back as entries).
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        store.commit(WriteBatch(1, (send(clock, 100),)))
        store.commit(WriteBatch(2, tuple(send(clock, n) for n in (1, 2, 3))))
        [(key, value)] = [r for r in dedupe_records(store) if len(r[0]) == len(dk()) + 16]
        store.commit(WriteBatch(3, (SetRetention(AB, -1, 1),)))
    _put_raw(tmp_path, [(key, value[:-2])])
    with LmdbStore(str(tmp_path)) as store:
        with pytest.raises(StoreError) as info:
            store.commit(WriteBatch(4, (Expire(clock.tick()),)))
        assert _bad_run(key, value[:-2]) in str(info.value)
        assert [m.local_id for m in store.history(AB, 0, 100)] == [100, 1, 2, 3]  # nothing half done


def _as_schema_3(path: Path) -> None:
    """Rewrite a closed store as schema 3 wrote it: one record per entry."""
    env = lmdb.open(str(path), max_dbs=32)
    with env.begin(write=True) as txn:
        db = env.open_db(b"dedupe", txn=txn)
        records = list(txn.cursor(db))
        txn.drop(db, delete=False)
        txn.cursor(db).putmulti(_dedupe_entries(records))
        txn.put(b"schema", _U64.pack(3), db=env.open_db(b"meta", txn=txn))
    env.close()


def test_a_schema_3_store_is_read_as_it_is_and_upgraded_by_its_next_owner(tmp_path: Path) -> None:
    clock = Clock()
    with LmdbStore(str(tmp_path)) as store:
        store.commit(WriteBatch(1, (send(clock, 100),)))
        sent = [send(clock, n, AB if n % 2 else AC) for n in range(1, 7)]
        res = list(store.commit(WriteBatch(2, tuple(sent))))
    _as_schema_3(tmp_path)
    with LmdbStore(str(tmp_path), read_only=True) as ro:
        assert ro.summary().schema == 3
        assert all(ro.deduped("al", "ph", n) for n in range(1, 7))
        assert all(len(k) == len(dk()) + 8 for k, _ in dedupe_records(ro))
    with LmdbStore(str(tmp_path)) as store:
        assert store.summary().schema == lmdb_module.SCHEMA_VERSION == 4
        _retries_answered(store, clock, sent, res, 10, one_by_one=False)
        # Retention takes a single record as before.
        store.commit(WriteBatch(40, (SetRetention(AB, -1, 1),)))
        store.commit(WriteBatch(41, (Expire(clock.tick()),)))
        assert [n for n in range(1, 7) if store.deduped("al", "ph", n)] == [2, 4, 5, 6]
        # New sends are written as runs next to the old records.
        more = [send(clock, n) for n in range(7, 10)]
        store.commit(WriteBatch(42, tuple(more)))
        assert (dk() + _U64.pack(9) + _U64.pack(7)) in dict(dedupe_records(store))
        assert all(store.deduped("al", "ph", n) for n in (2, 4, 5, 6, 7, 8, 9))


# ------------------------------------------- against the memory store

_CONVS = [AB, AC, "g1"]


@st.composite
def _op(draw: Any, clock: Clock, sent: list) -> Any:
    kind = draw(st.sampled_from(["send"] * 6 + ["retry"] * 3 + ["retention", "expire", "purge user",
                                                                 "purge conv"]))
    if kind == "retry" and sent:
        op = draw(st.sampled_from(sent))
        return retry(clock, op, digest=draw(st.sampled_from([op.digest] * 3 + [b"E" * 16])))
    if kind == "retention":
        return SetRetention(draw(st.sampled_from(_CONVS)), -1, draw(st.integers(1, 4)))
    if kind == "expire":
        return Expire(clock.tick())
    if kind == "purge user":
        return PurgeUser(draw(st.sampled_from(["al", "bo", "cy", "cy"])), clock.tick())
    if kind == "purge conv":
        return PurgeConversation(draw(st.sampled_from([AC, "g1"])))
    sender = draw(st.sampled_from(["al", "al", "bo", "cy"]))
    conv = draw(st.sampled_from({"al": [AB, AC, "g1"], "bo": [AB, "g1"], "cy": [AC, "g1"]}[sender]))
    op = send(clock, draw(st.integers(1, 12)), conv, sender, draw(st.sampled_from(["ph", "ph", "tab"])))
    sent.append(op)
    return op


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_runs_answer_like_the_memory_store(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    clock = Clock()
    path = tmp_path_factory.mktemp("runs")
    store = LmdbStore(str(path))
    memory = MemoryStore()
    sent: list = []
    try:
        for s in (store, memory):
            s.commit(WriteBatch(1, (CreateGroup("g1", ("al", "bo", "cy"), 1),)))
        for n in range(data.draw(st.integers(1, 8))):
            ops = data.draw(st.lists(_op(clock, sent), min_size=1, max_size=16))
            assert store.commit(WriteBatch(n + 2, tuple(ops))) == memory.commit(WriteBatch(n + 2, tuple(ops)))
            if data.draw(st.integers(0, 3)) == 0:
                store.close()
                store = LmdbStore(str(path))
        for sender in ("al", "bo", "cy"):
            for device in ("ph", "tab"):
                for local_id in range(0, 14):
                    assert store.deduped(sender, device, local_id) == memory.deduped(sender, device, local_id), (
                        sender, device, local_id)
        for conv in _CONVS:
            assert store.history(conv, 0, 1000) == memory.history(conv, 0, 1000)
    finally:
        store.close()
