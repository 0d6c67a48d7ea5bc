"""The durable send path in one process: core + LMDB store, no sockets (issue 13).

    python bench/bench_hotpath.py                    # 50 senders x 16 in flight, then 500 x 1
    python bench/bench_hotpath.py -c 50 -w 16 -n 40000
    pytest bench/bench_hotpath.py                    # a short smoke run (CI)

N senders, each in a 1:1 chat with its own recipient, which is online and
acks every Push (as ``pimcore bench`` does).  The driver plays the host the
way ``pimcore.net.server`` does: it hands the core every connection's bytes
(each sender's free window as one read, each recipient's PushAck), then runs
the one write batch in flight (``durability sync``: fsync before any SendAck)
and reports its completion.  Only the time spent inside the core and the
store is counted (thread CPU time around each call), so the figure is the
broker's CPU per acked send without trio and the socket calls, and is far
steadier on a shared machine than the end-to-end benchmark.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from typing import Optional

from pimcore import BACKEND
from pimcore import frames as F
from pimcore.codec import Decoder, encode_frame
from pimcore.core import Authenticate, Broker, BrokerConfig, Identity, Limits, SendData, StoreRequest
from pimcore.ids import direct_conversation
from pimcore.store import LmdbStore

_clock = time.thread_time
_GC0 = gc.get_threshold()


class _Host:
    def __init__(self, store: LmdbStore, broker: Broker) -> None:
        self.store, self.broker = store, broker
        self.now = time.time_ns() // 1000
        self.busy = 0.0  # seconds of thread CPU inside the core and the store
        self.split: dict[str, float] = {}  # the same by entry point
        self.write: Optional[StoreRequest] = None
        self.inbound: dict[int, bytearray] = {}
        self.decoders: dict[int, Decoder] = {}
        self.frames: dict[int, list] = {}

    def call(self, fn, *args):
        t0 = _clock()
        cmds = fn(*args, self.now)
        took = _clock() - t0
        self.busy += took
        self.split[fn.__name__] = self.split.get(fn.__name__, 0.0) + took
        self.run(cmds)

    def run(self, cmds) -> None:
        for cmd in cmds:
            kind = type(cmd)
            if kind is SendData:
                self.frames.setdefault(cmd.conn, []).append(cmd.data)
                t0 = _clock()
                more = self.broker.data_sent(cmd.conn, len(cmd.data), self.now)
                self.busy += _clock() - t0
                self.run(more)
            elif kind is StoreRequest:
                if cmd.write:
                    assert self.write is None
                    self.write = cmd
                else:
                    t0 = _clock()
                    res = self.store.execute(cmd)
                    self.busy += _clock() - t0
                    self.call(self.broker.store_completed, cmd.request_id, res)
            elif kind is Authenticate:
                user, _, device = cmd.token.decode().partition("/")
                self.call(self.broker.auth_completed, cmd.request_id, Identity(user, device))

    def commit(self) -> bool:
        req, self.write = self.write, None
        if req is None:
            return False
        t0 = _clock()
        res = self.store.execute(req)
        took = _clock() - t0
        self.busy += took
        self.split["commit"] = self.split.get("commit", 0.0) + took
        self.call(self.broker.store_completed, req.request_id, res)
        return True

    def take(self, conn: int) -> list:
        chunks = self.frames.pop(conn, None)
        if not chunks:
            return []
        dec = self.decoders.setdefault(conn, Decoder(1 << 24))
        dec.feed(b"".join(chunks))
        out = []
        while (f := dec.next_frame()) is not None:
            out.append(f)
        return out


def run(conns: int = 50, window: int = 16, count: int = 40_000, durability: str = "sync", gc_on: bool = True, gc_tune=None) -> dict:
    """Send ``count`` messages; return CPU µs per acked send (core + store)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = LmdbStore(tmp, durability=durability)
        cfg = BrokerConfig(limits=Limits(window=max(window, 256), send_rate=0.0), ack_delay=20_000, control_rate=0.0)
        broker = Broker(cfg, node_id=store.node_id(), last_server_time=store.last_server_time(),
                        epoch=store.epoch(), trusted_epochs=store.epochs())
        host = _Host(store, broker)
        senders, recipients, convs = [], [], {}
        for i in range(conns):
            for role, lst in (("s", senders), ("r", recipients)):
                conn = len(senders) + len(recipients) + 1
                host.call(broker.connection_made, conn)
                login = F.Login(f"{role}{i}/d".encode(), "d", host.now, 0, 0, broker.epoch)
                host.call(broker.receive_data, conn, encode_frame(login))
                lst.append(conn)
            convs[senders[-1]] = direct_conversation(f"s{i}", f"r{i}")
        while host.commit():
            pass
        for conn in senders + recipients:
            host.take(conn)
        host.busy = 0.0
        host.split.clear()
        payload = b"x" * 100
        inflight = {c: 0 for c in senders}
        next_local = {c: 1 for c in senders}
        pushed = {c: 0 for c in recipients}
        sent = acked = 0
        if not gc_on:
            gc.disable()
        elif gc_tune is not None:
            gc.freeze()
            gc.set_threshold(*gc_tune)
        gc_time = [0.0, 0.0, 0.0]
        gc_n = [0, 0, 0]
        gc_t0 = [0.0]

        def on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                gc_t0[0] = _clock()
            else:
                gc_time[info["generation"]] += _clock() - gc_t0[0]
                gc_n[info["generation"]] += 1

        gc.callbacks.append(on_gc)
        t_wall = time.perf_counter()
        while acked < count:
            host.now += 50
            for c in senders:
                free = window - inflight[c]
                if free <= 0 or sent >= count:
                    continue
                free = min(free, count - sent)
                data = b"".join(
                    encode_frame(F.SendReq(next_local[c] + k, convs[c], host.now, payload)) for k in range(free)
                )
                next_local[c] += free
                inflight[c] += free
                sent += free
                host.call(broker.receive_data, c, data)
            for c in recipients:
                if pushed[c]:
                    host.call(broker.receive_data, c, encode_frame(F.PushAck(pushed[c])))
                    pushed[c] = 0
            host.commit()
            for c in senders:
                for f in host.take(c):
                    if type(f) is F.SendAck:
                        assert f.code == 0, f
                        inflight[c] -= 1
                        acked += 1
            for c in recipients:
                for f in host.take(c):
                    if type(f) is F.Push:
                        pushed[c] = f.position
        wall = time.perf_counter() - t_wall
        gc.callbacks.remove(on_gc)
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(*_GC0)
        store.close()
    return {"conns": conns, "window": window, "acked": acked, "cpu_us_per_send": host.busy / acked * 1e6,
            "wall_s": wall, "backend": BACKEND,
            "split_us_per_send": {k: round(v / acked * 1e6, 1) for k, v in host.split.items()},
            "gc_us_per_send": [round(t / acked * 1e6, 2) for t in gc_time], "gc_runs": gc_n}


def test_hotpath_smoke() -> None:
    r = run(conns=4, window=4, count=400)
    assert r["acked"] == 400


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--conns", type=int, action="append")
    ap.add_argument("-w", "--window", type=int, action="append")
    ap.add_argument("-n", "--count", type=int, default=40_000)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--durability", default="sync", choices=("sync", "log", "os"))
    ap.add_argument("--no-gc", action="store_true")
    ap.add_argument("--gc", help="freeze, then these thresholds, e.g. 10000,10,10")
    a = ap.parse_args()
    shapes = list(zip(a.conns or [50, 500], a.window or [16, 1]))
    for conns, window in shapes:
        runs = [run(conns, window, a.count, a.durability, not a.no_gc, tuple(map(int, a.gc.split(","))) if a.gc else None)
                for _ in range(a.rounds)]
        figures = [r["cpu_us_per_send"] for r in runs]
        print("  by entry point (µs per send):", "; ".join(str(r["split_us_per_send"]) for r in runs))
        print("  collector (all of the process, µs per send by generation; runs):",
              "; ".join(f"{r['gc_us_per_send']} {r['gc_runs']}" for r in runs))
        print(f"{BACKEND} {conns} x {window}: core+store CPU per acked send, median of {a.rounds}: "
              f"{statistics.median(figures):.1f} µs  ({', '.join(f'{x:.1f}' for x in figures)})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
