"""Group fan-out cost in the LMDB store (pytest-benchmark).

    pytest bench/bench_fanout.py --benchmark-enable -p no:cacheprovider

A group message is stored once and appended to the inbox of every member, so
a commit to a big group is mostly inbox writes.  Each round commits ONE
batch (built in the untimed setup) in one transaction:

* ``test_fanout_one_message``: one NewMessage to a group of 1 / 100 / 10,000
  members, ``durability="sync"`` -- the latency of a lone group message.
* ``test_fanout_batch``: a group-commit batch of 1 / 16 / 64 NewMessages to a
  1,000-member group, sync and os durability.  ``extra_info`` has
  ``deliveries_per_s`` (messages x members / mean commit time); the target
  is >= 500,000 with sync at the batch sizes a loaded broker reaches.

Consecutive rounds write the same group: from the second commit on the store
serves members and inbox heads from the cache that commits keep
(pimcore.store.lmdb._Hot), as a broker streaming into one group does.

Under ``--benchmark-disable`` (the project's default addopts) every case runs
once, as a smoke test.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import pytest

from pimcore.store import Appended, LmdbStore, NewMessage, WriteBatch

GROUP = "bench-group"
PAYLOAD = bytes(range(100))
DIGEST = b"\x07" * 16


def _member(i: int) -> str:
    return f"user{i:05d}"


class _Sender:
    """Builds batches of group messages from rotating members."""

    def __init__(self, store: LmdbStore, members: int, size: int) -> None:
        self.node = store.node_id()
        self.members = members
        self.size = size
        self.times = itertools.count(1_700_000_000_000_000)
        self.batches = itertools.count(1)

    def __call__(self) -> tuple[tuple[WriteBatch], dict]:
        ops = []
        for _ in range(self.size):
            t = next(self.times)
            sender = _member(t % self.members)
            ops.append(NewMessage(t.to_bytes(8, "big") + self.node, GROUP, sender, "phone", t, t, t, PAYLOAD, DIGEST))
        return (WriteBatch(next(self.batches), tuple(ops)),), {}


def _open(path: Path, durability: str, members: int) -> LmdbStore:
    store = LmdbStore(path, durability=durability)
    store.create_group(GROUP, [_member(i) for i in range(members)], 1)
    return store


def _check(results: tuple, size: int, members: int) -> None:
    assert len(results) == size and all(isinstance(r, Appended) for r in results)
    assert all(len(r.positions) == members for r in results)


@pytest.fixture
def group_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LmdbStore]:
    durability, members = request.param
    store = _open(tmp_path / "db", durability, members)
    yield store
    store.close()


@pytest.mark.parametrize(
    "group_store, members",
    [(("sync", n), n) for n in (1, 100, 10_000)],
    indirect=["group_store"],
    ids=["1", "100", "10000"],
)
def test_fanout_one_message(benchmark, group_store: LmdbStore, members: int) -> None:  # type: ignore[no-untyped-def]
    make = _Sender(group_store, members, 1)
    rounds = 20 if members >= 10_000 else 100
    results = benchmark.pedantic(group_store.commit, setup=make, rounds=rounds, iterations=1, warmup_rounds=2)
    _check(results, 1, members)
    if benchmark.stats is not None:  # None under --benchmark-disable
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["members"] = members
        benchmark.extra_info["deliveries_per_s"] = round(members / mean)
        benchmark.extra_info["durability"] = group_store.durability


@pytest.mark.parametrize("size", [1, 16, 64])
@pytest.mark.parametrize(
    "group_store", [("sync", 1000), ("os", 1000)], indirect=True, ids=["sync-1000", "os-1000"]
)
def test_fanout_batch(benchmark, group_store: LmdbStore, size: int) -> None:  # type: ignore[no-untyped-def]
    members = 1000
    make = _Sender(group_store, members, size)
    rounds = max(10, 400 // size)
    results = benchmark.pedantic(group_store.commit, setup=make, rounds=rounds, iterations=1, warmup_rounds=2)
    _check(results, size, members)
    if benchmark.stats is not None:
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["members"] = members
        benchmark.extra_info["messages"] = size
        benchmark.extra_info["deliveries_per_s"] = round(size * members / mean)
        benchmark.extra_info["durability"] = group_store.durability
