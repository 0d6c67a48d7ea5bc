"""Write fan-out vs read fan-out for groups on the Redis Cluster store: where
the threshold ``read_fanout_above`` should be (BENCHMARKS.md, "Large groups
over Redis Cluster"; docs/OPERATIONS.md, "Large groups").

    python bench/redis_groups.py [--sizes 10,30,100,300,1000] [--online 0.1] [--messages 200] [--rounds 3]

Starts a 3-master 3-replica cluster on loopback (tests/_redis_cluster.py) and
drives one RedisStore in this process (no broker: the store's own cost).  Per
group size M, per round, both modes on fresh namespaces, alternating which
goes first: a group of M members, a fraction ``--online`` of them logged in
(LoadSession + device_online, not measured), then

- *send*: ``--messages`` sends in batches of 10 (what one group message costs
  the sender's side: the SEND, the fan-out, the waits);
- *catch-up*: every offline member logs in (LoadSession: under read fan-out
  it registers and pulls the log) and reads its inbox (ReadInbox) -- the
  worst case for read fan-out: every member comes back.

Reported per message: wall µs of the send phase and the CPU µs it took
(this process + all 6 Redis processes, from /proc); and per message of the
catch-up phase (its total divided by the messages sent).  Write mode is
``read_fanout_above`` = 10**9, read mode 0.  Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

def redis_cpu(cluster: object) -> float:
    """CPU seconds of all Redis processes (INFO cpu: µs resolution, where
    /proc's clock ticks are 10 ms)."""
    total = 0.0
    for port in cluster.procs:  # type: ignore[attr-defined]
        for line in cluster.cli(port, "info", "cpu").splitlines():  # type: ignore[attr-defined]
            if line.startswith(("used_cpu_sys:", "used_cpu_user:")):
                total += float(line.split(":")[1])
    return total


class Meter:
    """Wall and CPU seconds (this process + the Redis processes) of a phase."""

    def __init__(self, cluster: object) -> None:
        self.cluster = cluster

    def __enter__(self) -> "Meter":
        self.r0 = redis_cpu(self.cluster)
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0
        self.redis = redis_cpu(self.cluster) - self.r0


async def trial(cluster: object, m: int, online: float, messages: int, above: int) -> dict:
    from pimcore.store.base import CreateGroup, LoadSession, NewMessage, ReadInbox, StoreRequest
    from pimcore.store.redis import RedisStore

    ns = "g" + os.urandom(5).hex()
    members = [f"u{i:05d}" for i in range(m)]
    n_online = max(1, round(m * online))
    conv = "g:bench"
    url = cluster.url  # type: ignore[attr-defined]
    async with RedisStore.connect(url, namespace=ns, read_fanout_above=above) as store:
        rid = iter(range(1, 1 << 30))
        await store.execute(StoreRequest(next(rid), (CreateGroup(conv, tuple(members), 1),), True))
        for user in members[:n_online]:
            await store.execute(StoreRequest(next(rid), (LoadSession(user, "d"),), False))
            await store.cluster.device_online(user, "d")
        sender = members[0]
        t = time.time_ns() // 1000
        with Meter(cluster) as send:
            for k in range(0, messages, 10):
                ops = []
                for j in range(k, min(messages, k + 10)):
                    ops.append(NewMessage(os.urandom(16), conv, sender, "d", j + 1, t + j, t + j, b"x" * 100,
                                          os.urandom(16)))
                res = await store.execute(StoreRequest(next(rid), tuple(ops), True))
                assert all(type(r).__name__ == "Appended" for r in res), res
        with Meter(cluster) as catch:
            delivered = 0
            for user in members[n_online:]:
                (loaded,) = await store.execute(StoreRequest(next(rid), (LoadSession(user, "d"),), False))
                (page,) = await store.execute(StoreRequest(next(rid), (ReadInbox(user, 0, messages + 10),), False))
                delivered += len(page.entries)
        assert delivered == (m - n_online) * messages, (delivered, m, n_online, messages)
    return {"send_wall_us": send.wall / messages * 1e6, "send_cpu_us": (send.cpu + send.redis) / messages * 1e6,
            "send_redis_us": send.redis / messages * 1e6,
            "catch_wall_us": catch.wall / messages * 1e6, "catch_cpu_us": (catch.cpu + catch.redis) / messages * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,30,100,300,1000")
    ap.add_argument("--online", type=float, default=0.1)
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from _redis_cluster import RedisCluster

    sizes = [int(s) for s in args.sizes.split(",")]
    rows: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as d, RedisCluster(Path(d) / "cluster") as cluster:
        for k in range(args.rounds):
            for m in sizes:
                modes = [("write", 10**9), ("read", 0)]
                if k % 2:
                    modes.reverse()
                for mode, above in modes:
                    r = trio.run(trial, cluster, m, args.online, args.messages, above)
                    r.update(members=m, mode=mode, round=k)
                    print(json.dumps(r), flush=True)
                    rows.setdefault((m, mode), []).append(r)
    print()
    print(f"online fraction {args.online}, {args.messages} messages per trial, medians of {args.rounds} rounds;"
          " µs per message sent")
    print("| members | mode | send wall | send CPU (all) | of which Redis | catch-up wall | catch-up CPU |"
          " send+catch-up CPU |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for m in sizes:
        for mode in ("write", "read"):
            rs = rows[(m, mode)]

            def med(key: str) -> float:
                return statistics.median(r[key] for r in rs)

            print(f"| {m} | {mode} | {med('send_wall_us'):,.0f} | {med('send_cpu_us'):,.0f} |"
                  f" {med('send_redis_us'):,.0f} | {med('catch_wall_us'):,.0f} | {med('catch_cpu_us'):,.0f} |"
                  f" {statistics.median(r['send_cpu_us'] + r['catch_cpu_us'] for r in rs):,.0f} |")


if __name__ == "__main__":
    main()
