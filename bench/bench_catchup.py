"""A device that comes online behind a large backlog: catch-up rate through the SDK.

    python bench/bench_catchup.py [backlog] [rounds]     # default 50,000 messages, 3 rounds
    pytest bench/bench_catchup.py                        # 2,000 messages, one round (CI smoke)

An embedded broker (LMDB, ``durability log``, over loopback) holds a group of
alice and bob; while bob is offline alice posts ``backlog`` messages of 100
bytes (``post_many``, 500 at a time).  Then bob's phone logs in with the
Python SDK and takes every message from ``messages()``; half a second after
the login alice posts one more, live.  Reported per round: the catch-up rate
(messages taken per second, from the client's start to the live message)
and how long the live message waited from its post to the app, behind the
backlog (one inbox is delivered in position order).  The broker and the
client share the process and its one core, as in the test suite.

The SDK keeps the newest ``view_limit`` (1,000) messages of each
conversation for ``view()``; once full, every message it takes drops the
lowest seq.  That drop scanned the whole view per message (the JS SDK sorted
it): at 50,000 messages, most of the client's CPU (BENCHMARKS.md).
"""

from __future__ import annotations

import statistics
import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

from pimcore.client import open_client
from pimcore.embed import open_pimcore

PAYLOAD = b"x" * 100


async def _round(data_dir: Path, backlog: int) -> tuple[float, float]:
    """(messages taken per second, seconds the live message waited)."""
    async with open_pimcore(data_dir=str(data_dir), durability="log", listen=["tcp://127.0.0.1:0"]) as im:
        await im.create_group("team", ["alice", "bob"])
        for i in range(0, backlog, 500):
            done = await im.post_many([{"conv": "team", "payload": PAYLOAD, "sender": "alice", "device": "srv"}
                                       for _ in range(min(500, backlog - i))])
            assert all(hasattr(r, "seq") for r in done), done[0]
        posted_at: list[float] = []

        async def live() -> None:
            await trio.sleep(0.5)
            await im.post("team", b"live", sender="alice", device="srv")
            posted_at.append(time.perf_counter())

        taken = 0
        t0 = time.perf_counter()
        async with open_client(im.urls[0], im.issue_token("bob", ttl=600), "phone") as bob:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(live)
                async for m in bob.messages():
                    if m.payload == b"live":
                        break
                    taken += 1
        took = time.perf_counter() - t0
        assert taken == backlog and posted_at, (taken, backlog)
        return taken / took, time.perf_counter() - posted_at[0]


def run(backlog: int, rounds: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            out.append(trio.run(_round, Path(d), backlog))
    return out


def test_bench_catchup_smoke() -> None:
    ((rate, waited),) = run(2_000, 1)
    assert rate > 0 and waited >= 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backlog", nargs="?", type=int, default=50_000, help="messages waiting (default 50,000)")
    ap.add_argument("rounds", nargs="?", type=int, default=3, help="rounds (default 3)")
    a = ap.parse_args()
    got = run(a.backlog, a.rounds)
    for rate, waited in got:
        print(f"  caught up at {rate:,.0f} messages/s; the live message waited {waited:.2f} s")
    print(f"median: {statistics.median(r for r, _ in got):,.0f} messages/s, "
          f"live message waited {statistics.median(w for _, w in got):.2f} s ({backlog:,} behind it)")
