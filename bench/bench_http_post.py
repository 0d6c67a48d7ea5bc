"""Posts per second over the HTTP server API with N concurrent keep-alive clients.

    python bench/bench_http_post.py [--clients 50] [--seconds 5] [--durability os] [--batch 1]

Starts ``pimcore serve --http`` in a subprocess (a fresh data directory),
creates group "bench" with 50 members, then N threads (stdlib http.client, one
keep-alive connection each, in this process) post ``{"payload": "..."}`` as
the system, each with its own Idempotency-Key, for the given time.  Prints
posts/s (201s only) and latency percentiles.  ``--batch N`` (N > 1) posts
N messages per request to ``POST /v1/messages`` instead (each with its own
key; posts/s counts stored items, latency is per request).  Client and broker share the
machine's cores: on a small machine the figure is a lower bound.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--durability", default="os")
    ap.add_argument("--batch", type=int, default=1, help="messages per request (> 1: POST /v1/messages)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pimcore", "serve", "--listen", "tcp://127.0.0.1:0", "--http", "tcp://127.0.0.1:0",
             "--data-dir", str(data), "--durability", args.durability],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy())
        try:
            url = None
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("listening on http://"):
                    url = line.split()[-1]
                if line.startswith("ready"):
                    break
            assert url is not None, "no http listener"
            host, port = url.split("//", 1)[1].rsplit(":", 1)
            key = (data / "api-key").read_text().strip()
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

            def request(conn: http.client.HTTPConnection, method: str, path: str, body: dict, extra: dict) -> int:
                conn.request(method, path, body=json.dumps(body), headers={**headers, **extra})
                r = conn.getresponse()
                r.read()
                return r.status

            c = http.client.HTTPConnection(host, int(port), timeout=30)
            assert request(c, "POST", "/v1/groups", {"conv": "bench", "members": [f"u{i}" for i in range(50)]}, {}) == 201
            c.close()
            stop = time.monotonic() + args.seconds
            lat: list[list[float]] = [[] for _ in range(args.clients)]
            errors = [0] * args.clients
            stored = [0] * args.clients

            def worker(i: int) -> None:
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                n = 0
                while time.monotonic() < stop:
                    t0 = time.perf_counter()
                    if args.batch > 1:
                        items = [{"conv": "bench", "payload": "x" * 100, "idempotency_key": f"{i}-{n}-{j}"}
                                 for j in range(args.batch)]
                        conn.request("POST", "/v1/messages", body=json.dumps({"messages": items}), headers=headers)
                        r = conn.getresponse()
                        results = json.loads(r.read())["results"] if r.status == 200 else []
                        ok = sum(1 for x in results if x["status"] == "stored")
                        stored[i] += ok
                        errors[i] += args.batch - ok
                        lat[i].append(time.perf_counter() - t0)
                    else:
                        status = request(conn, "POST", "/v1/conversations/bench/messages", {"payload": "x" * 100},
                                         {"Idempotency-Key": f"{i}-{n}"})
                        if status == 201:
                            stored[i] += 1
                            lat[i].append(time.perf_counter() - t0)
                        else:
                            errors[i] += 1
                    n += 1
                conn.close()

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = time.monotonic() - t0
            all_lat = sorted(x for xs in lat for x in xs)
            n = len(all_lat)
            pct = lambda p: all_lat[min(n - 1, int(p * n))] * 1000  # noqa: E731
            what = f"batches of {args.batch}" if args.batch > 1 else "single posts"
            print(f"{args.clients} clients, {what}, {took:.1f} s, durability {args.durability}: {sum(stored) / took:.0f} posts/s,"
                  f" p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, errors {sum(errors)}")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
