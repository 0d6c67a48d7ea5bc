"""Space under history retention: does the LMDB store stay bounded?

    python bench/bench_retention.py [--windows 20] [--rate 2000] [--no-retention]
    pytest bench/bench_retention.py -p no:cacheprovider      # a small run, as a smoke test

A steady workload drives an LmdbStore the way the broker core does, with an
explicit clock (sans-IO, so hours of traffic take seconds): every simulated
second ``rate`` messages (200-byte payloads) go to 1:1 chats among 50 users
and to two 10-member groups, in batches of 50; every recipient device acks
its inbox once a second; every ``reclaim_interval`` (10 s) the core's pass
runs -- ``Reclaim`` (acked inbox entries) and ``Expire`` (history retention:
``history_max_age`` = one *window*, 60 s).  The run lasts ``windows`` windows.

Sampled once per window: the pages LMDB holds live data in (branch + leaf +
overflow pages of every sub-database), the file's extent (``last_pgno`` + 1
pages: what the data file occupies; LMDB reuses freed pages, so it stops
growing once the free list covers the churn), messages stored, and the
wall time of the Expire pass.  With ``--no-retention`` the same traffic
without Expire, for comparison.  The result is in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pimcore.store import (  # noqa: E402
    AckPosition,
    Expire,
    LmdbStore,
    NewMessage,
    Reclaim,
    TouchDevice,
    WriteBatch,
    direct_conversation,
)

SECOND = 1_000_000
USERS = [f"u{i:02d}" for i in range(50)]
GROUPS = {"g-a": USERS[:10], "g-b": USERS[10:20]}
PAIRS = [direct_conversation(USERS[i], USERS[(i + 1) % len(USERS)]) for i in range(len(USERS))]
CONVS = PAIRS + list(GROUPS)
PAYLOAD = bytes(range(200))


def pages(store: LmdbStore) -> tuple[int, int]:
    """(pages holding live data, the file's extent in pages)."""
    env: Any = store._env  # a benchmark may look inside
    with env.begin() as txn:
        live = 0
        for name in ("meta", "msgs", "convs", "convidx", "groups", "members", "userconvs", "inbox", "inboxmeta",
                     "devices", "dedupe", "reads", "revoked", "spans", "events", "evcursors", "retention"):
            st = txn.stat(env.open_db(name.encode(), txn=txn, create=False))
            live += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
    return live, env.info()["last_pgno"] + 1


def run(windows: int, rate: int, retention: bool, path: Path, window: int = 60 * SECOND,
        reclaim_interval: int = 10 * SECOND) -> Iterator[dict[str, Any]]:
    """Yield one sample per window (see the module docstring)."""
    store = LmdbStore(path, durability="os")
    node = store.node_id()
    last = 0  # the last server time handed out: strictly increasing, as the broker's clock
    local = itertools.count(1)
    batches = itertools.count(1)
    now = 1_700_000_000 * SECOND
    try:
        for g, members in GROUPS.items():
            store.create_group(g, members, now)
        store.commit(WriteBatch(next(batches), tuple(TouchDevice(u, "phone", 0, now) for u in USERS)))
        convs = itertools.cycle(CONVS)
        next_reclaim = now + reclaim_interval
        expire_us: list[float] = []
        stored = 0
        for w in range(1, windows + 1):
            for _ in range(window // SECOND):
                now += SECOND
                for _ in range(rate // 50):
                    ops = []
                    for _ in range(50):
                        conv = next(convs)
                        sender = conv.split(":")[1] if conv.startswith("d:") else GROUPS[conv][0]
                        t = last = max(last + 1, now)
                        lid = next(local)
                        ops.append(NewMessage(t.to_bytes(8, "big") + node, conv, sender, "phone", lid, t, t, PAYLOAD,
                                              hashlib.blake2b(PAYLOAD, digest_size=16).digest()))
                    store.commit(WriteBatch(next(batches), tuple(ops)))
                    stored += len(ops)
                store.commit(WriteBatch(next(batches), tuple(
                    AckPosition(u, "phone", 1 << 62, now) for u in USERS)))
                if now >= next_reclaim:
                    next_reclaim = now + reclaim_interval
                    ops = (Reclaim(now, 30 * 86_400 * SECOND, 90 * 86_400 * SECOND),)
                    if retention:
                        ops += (Expire(now, window, 0),)
                    t0 = time.perf_counter()
                    store.commit(WriteBatch(next(batches), ops))
                    expire_us.append((time.perf_counter() - t0) * 1e6)
            live, extent = pages(store)
            kept = sum(store.last_seq(c) - store.retention(c).floor for c in CONVS)
            yield {"window": w, "messages_sent": stored, "messages_kept": kept, "live_pages": live,
                   "file_pages": extent, "file_mib": round(extent * 4096 / 2**20, 2),
                   "reclaim_pass_ms": round(max(expire_us[-6:]) / 1000, 2)}
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=20, help="run length in retention windows (60 s each)")
    p.add_argument("--rate", type=int, default=2000, help="messages per simulated second (a multiple of 50)")
    p.add_argument("--no-retention", action="store_true", help="the same traffic without Expire")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pimcore-bench-retention-") as tmp:
        print(f"{'window':>6} {'sent':>9} {'kept':>8} {'live pages':>10} {'file pages':>10} {'file MiB':>9}"
              f" {'reclaim pass ms':>15}")
        for s in run(args.windows, args.rate, not args.no_retention, Path(tmp) / "db"):
            print(f"{s['window']:>6} {s['messages_sent']:>9} {s['messages_kept']:>8} {s['live_pages']:>10}"
                  f" {s['file_pages']:>10} {s['file_mib']:>9} {s['reclaim_pass_ms']:>15}")
    return 0


def test_store_size_stays_bounded_under_retention(tmp_path: Path) -> None:
    """Ten windows of traffic at a small rate: after the first windows fill
    the retention window, the file stops growing (bounded, not timed)."""
    samples = list(run(10, 100, True, tmp_path / "db", window=20 * SECOND, reclaim_interval=5 * SECOND))
    plateau = samples[2]["file_pages"]
    assert samples[-1]["messages_sent"] >= 5 * samples[-1]["messages_kept"]
    assert max(s["file_pages"] for s in samples[3:]) <= plateau * 1.25, samples
    assert max(s["live_pages"] for s in samples[3:]) <= samples[2]["live_pages"] * 1.25, samples


if __name__ == "__main__":
    sys.exit(main())
