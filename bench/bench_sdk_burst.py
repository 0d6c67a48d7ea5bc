"""A burst of sends through the SDK against a rate-limited broker (pytest-benchmark).

    pytest bench/bench_sdk_burst.py --benchmark-enable -p no:cacheprovider

One :class:`pimcore.client.Client` starts 1,500 concurrent ``send()`` calls
to one 1:1 conversation, against an in-process broker (LMDB, fsync'd
batches, over loopback) with the limits ``pimcore serve`` uses by default:
``window`` 256, ``send_rate`` 2,000/s per connection, ``send_burst`` 512.
The bucket's 512 tokens go at once; the remaining 988 sends can go no faster
than the refill, so the floor is about 0.5 s and the ceiling about 3,000
sends/s.  What is measured is how close the SDK's reaction to RATE_LIMITED
comes to that floor (it used to halve its window and double its hold on
every refused ack, which took about 30 s).

Each round is a fresh broker, store and client (a fresh bucket); only the
burst itself, from the first ``send()`` to the last ack, is in
``extra_info["sends_per_s"]`` (the round's time also has the start-up).
``extra_info["congestion_events"]`` counts the SDK's window reductions.

Under ``--benchmark-disable`` (the project's default addopts) it runs once,
as a smoke test.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import trio

from pimcore.auth import JwtAuthenticator, issue_token
from pimcore.client import ClientConfig, open_client
from pimcore.ids import direct_conversation
from pimcore.net import Endpoint, ServerConfig, open_broker_server
from pimcore.store import LmdbStore

SECRET = b"bench-secret-0123456789abcdef-0123456789"
SENDS = 1500
PAYLOAD = b"x" * 100


async def _burst(data_dir: Path) -> tuple[float, int]:
    """(seconds from the first send() to the last ack, congestion events)."""
    store = LmdbStore(data_dir, durability="sync")
    try:
        # ServerConfig() carries DEFAULT_BROKER_CONFIG: the limits of `pimcore serve`.
        async with open_broker_server(store, JwtAuthenticator(SECRET), ServerConfig(listeners=(Endpoint("tcp"),))) as srv:
            conv = direct_conversation("alice", "bob")
            tok = issue_token(SECRET, "alice", None, ttl=600.0)
            async with open_client(srv.url(), tok, "phone", config=ClientConfig(send_timeout=300.0)) as c:
                t0 = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for i in range(SENDS):
                        nursery.start_soon(c.send, conv, PAYLOAD)
                elapsed = trio.current_time() - t0
                stats = c.statistics()
                assert stats.pending_sends == 0
                return elapsed, getattr(stats, "congestion_events", -1)
    finally:
        store.close()


def test_sdk_burst(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rounds = iter(range(1 << 30))
    results: list[tuple[float, int]] = []

    def one_round() -> None:
        results.append(trio.run(_burst, tmp_path / f"db{next(rounds)}"))

    benchmark.pedantic(one_round, rounds=3, iterations=1)
    elapsed = statistics.median(r[0] for r in results)
    benchmark.extra_info["sends"] = SENDS
    benchmark.extra_info["burst_s"] = round(elapsed, 3)
    benchmark.extra_info["sends_per_s"] = round(SENDS / elapsed)
    benchmark.extra_info["congestion_events"] = [r[1] for r in results]
