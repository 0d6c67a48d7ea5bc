"""Store commit cost (pytest-benchmark).

    pytest bench/bench_store.py --benchmark-enable -p no:cacheprovider

Each round commits ONE batch of N NewMessage ops (a 1:1 conversation, 100-byte
payloads) in one transaction; the batch is built in the untimed setup.  Divide
the reported time by N for the per-message cost (``extra_info`` has it).  With
``durability="sync"`` the time includes the fsync, so batch size is what
amortises it -- which is why the broker core group-commits.

Under ``--benchmark-disable`` (the project's default addopts) every case runs
once, as a smoke test.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import pytest

from pimcore.store import Appended, LmdbStore, NewMessage, WriteBatch, direct_conversation

CONV = direct_conversation("alice", "bob")
PAYLOAD = bytes(range(100))
DIGEST = b"\x07" * 16


@pytest.fixture(params=["sync", "os"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LmdbStore]:
    s = LmdbStore(tmp_path / "db", durability=request.param)
    yield s
    s.close()


@pytest.mark.parametrize("size", [1, 16, 256])
def test_commit_new_messages(benchmark, store: LmdbStore, size: int) -> None:  # type: ignore[no-untyped-def]
    node = store.node_id()
    times = itertools.count(1_700_000_000_000_000)
    batches = itertools.count(1)

    def make_batch() -> tuple[tuple[WriteBatch], dict]:
        ops = []
        for _ in range(size):
            t = next(times)
            ops.append(NewMessage(t.to_bytes(8, "big") + node, CONV, "alice", "phone", t, t, t, PAYLOAD, DIGEST))
        return (WriteBatch(next(batches), tuple(ops)),), {}

    rounds = max(20, 2000 // size)
    results = benchmark.pedantic(store.commit, setup=make_batch, rounds=rounds, iterations=1, warmup_rounds=2)
    assert len(results) == size and all(isinstance(r, Appended) for r in results)
    assert store.last_seq(CONV) >= size
    if benchmark.stats is not None:  # None under --benchmark-disable
        mean = benchmark.stats.stats.mean
        benchmark.extra_info["per_message_us"] = round(mean / size * 1e6, 2)
        benchmark.extra_info["durability"] = store.durability
