"""1, 2 and 3 `pimcore serve` nodes over one Redis Cluster, beside one node
on LMDB: acked sends/s, send->ack p50/p99, CPU per message per pimcore node
and per Redis node (BENCHMARKS.md, "Several nodes over Redis Cluster").

    python bench/redis_nodes.py [--rounds 2] [--duration 5] [--conns 50]

Starts a 3-master 3-replica cluster on loopback (tests/_redis_cluster.py),
then alternates the shapes (LMDB, 1, 2, 3 nodes; again...) so drift on the
shared machine hits them all alike; each shape gets a fresh namespace and
fresh node processes.  The load generator is `pimcore bench` (1:1 chats,
recipients online) with one --url per node: its connections are spread over
the nodes round-robin, so most 1:1 pairs span two nodes.  CPU: user+system
seconds of each process from /proc over the whole `pimcore bench` run
(warm-up and drain included), divided by the messages sent in it
(acked/s x (warm-up + duration)): an estimate, slightly high.
Not collected by pytest (not bench_*.py): it needs redis-server and minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

SECRET = "bench-secret-0123456789abcdef-0123456789"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK


def start_node(store_url: str, ns: str, data: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PIMCORE_SECRET=SECRET, PIMCORE_STORE_NAMESPACE=ns)
    p = subprocess.Popen([sys.executable, "-m", "pimcore", "serve", "--listen", "tcp://127.0.0.1:0",
                          "--data-dir", str(data), "--store", store_url, "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert p.stdout is not None
    deadline = time.monotonic() + 60
    url = ""
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("pimcore serve exited")
        if "tcp://" in line and not url:
            url = next(w for w in line.split() if w.startswith("tcp://"))
        if line.strip() == "ready" or (url and "ready" in line):
            break
    if not url:
        raise RuntimeError("no tcp URL printed")
    return p, url


def bench(urls: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "pimcore", "bench", "--json", "--no-progress", "-c", str(args.conns),
           "-w", str(args.window), "-d", str(args.duration), "--warmup", str(args.warmup)]
    if urls:
        for u in urls:
            cmd += ["--url", u]
        cmd += ["--secret", SECRET]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"bench failed: {out.stdout}\n{out.stderr}") from None


def run_shape(n: int, cluster, args: argparse.Namespace, tmp: Path, k: int) -> dict:
    if n == 0:
        res = bench([], args)
        return {"shape": "LMDB, 1 node", "acked_per_s": res["acked_per_s"],
                "p50": res["ack_latency_us"].get("p50"), "p99": res["ack_latency_us"].get("p99"),
                "node_cpu_us": res.get("broker_cpu_us_per_msg"), "redis_cpu_us": None}
    ns = f"b{k}n{n}" + os.urandom(3).hex()
    nodes = [start_node(cluster.url, ns, tmp / f"{ns}-{i}") for i in range(n)]
    try:
        pids = [p.pid for p, _ in nodes]
        rpids = [pr.pid for pr in cluster.procs.values()]
        c0 = [cpu_seconds(p) for p in pids]
        r0 = [cpu_seconds(p) for p in rpids]
        res = bench([u for _, u in nodes], args)
        c1 = [cpu_seconds(p) for p in pids]
        r1 = [cpu_seconds(p) for p in rpids]
    finally:
        for p, _ in nodes:
            p.kill()
            p.wait()
    sent = res["acked_per_s"] * (args.duration + args.warmup)
    node_cpu = [(b - a) / sent * 1e6 for a, b in zip(c0, c1)]
    redis_cpu = [(b - a) / sent * 1e6 for a, b in zip(r0, r1)]
    return {"shape": f"Redis Cluster, {n} node{'s' if n > 1 else ''}", "acked_per_s": res["acked_per_s"],
            "p50": res["ack_latency_us"].get("p50"), "p99": res["ack_latency_us"].get("p99"),
            "node_cpu_us": statistics.mean(node_cpu), "node_cpu_sum_us": sum(node_cpu),
            "redis_cpu_us": sum(redis_cpu), "redis_cpu_max_us": max(redis_cpu), "errors": res.get("errors")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--conns", type=int, default=50)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--shapes", default="0,1,2,3", help="0 = LMDB single node, N = N nodes over Redis")
    args = ap.parse_args()
    from _redis_cluster import RedisCluster

    shapes = [int(s) for s in args.shapes.split(",")]
    rows: dict[int, list[dict]] = {s: [] for s in shapes}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with RedisCluster(tmp / "cluster") as cluster:
            for k in range(args.rounds):
                for s in shapes:
                    r = run_shape(s, cluster, args, tmp, k)
                    print(json.dumps(r), flush=True)
                    rows[s].append(r)
    print()
    print("| shape | acked sends/s | send→ack p50 (µs) | p99 (µs) | CPU µs/msg per pimcore node | CPU µs/msg all Redis nodes |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in shapes:
        rs = rows[s]
        med = lambda key: statistics.median(r[key] for r in rs) if all(r.get(key) is not None for r in rs) else None  # noqa: E731
        fmt = lambda v, f="{:,.0f}": "-" if v is None else f.format(v)  # noqa: E731
        print(f"| {rs[0]['shape']} | {fmt(med('acked_per_s'))} | {fmt(med('p50'))} | {fmt(med('p99'))} |"
              f" {fmt(med('node_cpu_us'))} | {fmt(med('redis_cpu_us'))} |")


if __name__ == "__main__":
    main()
