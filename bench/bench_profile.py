"""Where the broker's CPU goes under load: py-spy on a broker process while
the C load generator drives it, stack samples grouped as in the throughput
issue (core logic, the store's Python side, LMDB's own work, trio and socket
I/O, the garbage collector, freeing objects, decode and encode).

    python bench/bench_profile.py [--shape 50x16] [--seconds 10] [--durability sync|log|os] [--backend cython]
                                   [--raw FILE]

Needs ``py-spy`` (``pip install py-spy``) and permission to ptrace the broker
(root, or ``kernel.yama.ptrace_scope`` 0).  The broker's CPU per acked send
comes from ``/proc`` over the same window, so each group is also shown in µs
per acked send.  ``--raw`` keeps py-spy's collapsed stacks (flame-graph input).
Under pytest it only checks the grouping of a few stacks (no py-spy needed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FSYNC = "blocked in fdatasync (off CPU)"
WAIT = "waiting for the GIL, a lock or a queue (off CPU)"

# (group, test on one frame "function (file:line)" or a native "function (library)"),
# tried from the leaf up: the first frame that matches names the sample's group.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    (FSYNC, ("fdatasync (", "fsync (")),
    # py-spy leaves out threads idle in epoll_wait but not threads asleep on
    # a condition variable: an idle worker in SimpleQueue.get, or a thread
    # back from a syscall that waits to take the GIL again (CPython's
    # take_gil sleeps in pthread_cond_timedwait).  Neither uses the CPU.
    (WAIT, ("pthread_cond_timedwait (", "pthread_cond_wait (", "PyThread_acquire_lock", "_queue_SimpleQueue_get",
            "take_gil (", "sem_clockwait (", "sem_timedwait (", "sem_wait (")),
    ("garbage collector", ("gc_collect", "collect_with_callback", "collect_generations", "gc_collect_main",
                           "(gc)", "deduce_unreachable", "visit_decref", "subtract_refs", "move_unreachable")),
    ("freeing objects", ("_Py_Dealloc", "dealloc", "subtype_dealloc", "tupledealloc", "dict_dealloc",
                         "list_dealloc", "PyObject_Free", "_PyObject_Free")),
    ("LMDB's own work", ("mdb_", "lmdb/cpython", "cpython.c", "liblmdb", "lmdb.cpython")),
    ("decode and encode", ("codec.py", "_fastpath_codec", "_pure/codec", "compress.py")),
    ("the store's Python side", ("pimcore/store/",)),
    ("trio and socket I/O", ("trio/", "socket.py", "selectors.py", "epoll", "sock_send", "sock_recv",
                             "send (libc", "recv (libc", "sendto (libc", "recvfrom (libc", "writev (libc",
                             "write (libc", "read (libc", "sock_", "socketmodule")),
    ("core logic", ("pimcore/core.py", "pimcore/frames.py", "pimcore/ids.py", "pimcore/_pure/", "_fastpath",
                    "pimcore/protocol.py", "pimcore/session", "pimcore/order", "pimcore/digest", "dataclasses")),
    ("server glue (net/server.py)", ("pimcore/net/",)),
]


def group_of(stack: list[str]) -> str:
    """The group of one sample (frames root first, as py-spy writes them)."""
    for frame in reversed(stack):
        for name, keys in GROUPS:
            if any(k in frame for k in keys):
                return name
    return "other"


def summarize(collapsed: str) -> Counter[str]:
    """Samples per group from py-spy's collapsed (``--format raw``) output."""
    counts: Counter[str] = Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[group_of(stack.split(";"))] += int(n)
    return counts


def profile(shape: str, seconds: float, durability: str, backend: str | None, raw: str | None) -> str:
    from pimcore.loadgen import SHAPES, BenchConfig, BrokerProcess, _diagnose, _run_against

    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("needs py-spy: pip install py-spy")
    conns, window, online = SHAPES[shape]
    warmup = 2.0
    cfg = BenchConfig(conns=conns, window=window, online=online, duration=seconds, warmup=warmup,
                      durability=durability, backend=backend, progress=False)
    out = raw or os.path.join(tempfile.mkdtemp(prefix="pimcore-prof-"), "stacks.txt")
    # (Without --raw the stacks go to a directory removed at the end: each
    # run left one in /tmp.)
    try:
        with BrokerProcess(cfg) as broker:
            # py-spy samples the broker (not idle threads: samples ~ CPU) from the
            # end of the warm-up to the end of the measured window.
            spy: list[subprocess.Popen[bytes]] = []

            def start_spy() -> None:
                spy.append(subprocess.Popen([pyspy, "record", "--pid", str(broker.pid), "--format", "raw", "--native",
                                             "--rate", "250", "--duration", str(int(seconds)), "--output", out],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

            timer = threading.Timer(warmup, start_spy)
            timer.start()
            res = _run_against(cfg, broker.url, broker.secret, broker.pid, broker.backend)
            timer.cancel()
            for p in spy:
                _, err = p.communicate(timeout=seconds + 60)
                if p.returncode != 0 and not os.path.exists(out):
                    raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        counts = summarize(Path(out).read_text())
    finally:
        if not raw:
            shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    # py-spy leaves out threads idle in epoll_wait, but not one blocked in
    # fdatasync: those samples are wall time, not CPU; shown apart.
    blocked = counts.pop(FSYNC, 0)
    waiting = counts.pop(WAIT, 0)
    total = sum(counts.values()) or 1
    us = res.broker_cpu_us_per_msg
    wait = f", waited for a CPU {res.broker_cpu_wait:.0%} of the time" if res.broker_cpu_wait is not None else ""
    lines = [f"broker at {shape} ({conns} conns x {window} in flight{', recipients online' if online else ''}),"
             f" durability {durability}, {broker.backend} backend: {res.acked_per_s:,.0f} acked sends/s,"
             f" {us or 0:.1f} µs of broker CPU per acked send ({res.broker_cpu_util or 0:.0%} of a core{wait});"
             f" {total:,} samples on CPU (py-spy --native, {seconds:g} s), {blocked:,} more blocked in fdatasync,"
             f" {waiting:,} more waiting for the GIL, a lock or a queue",
             f"limited by: {_diagnose(res)}",
             "", f"  {'group (share of on-CPU samples)':<34}{'share':>7}{'µs/send':>9}"]
    for name, n in counts.most_common():
        lines.append(f"  {name:<34}{n / total:>7.1%}{(us or 0) * n / total:>9.1f}")
    if raw:
        lines.append(f"\ncollapsed stacks: {raw}")
    return "\n".join(lines)


def test_grouping_of_samples() -> None:
    stacks = (
        "<module> (pimcore/__main__.py:1);run (trio/_core/_run.py:10);_handle (pimcore/core.py:300) 7\n"
        "<module> (pimcore/__main__.py:1);commit (pimcore/store/lmdb.py:80);mdb_txn_commit (liblmdb.so) 5\n"
        "<module> (pimcore/__main__.py:1);commit (pimcore/store/lmdb.py:80);put (pimcore/store/lmdb.py:90) 3\n"
        "<module> (pimcore/__main__.py:1);_handle (pimcore/core.py:300);gc_collect_main (libpython3.11.so) 2\n"
        "<module> (pimcore/__main__.py:1);run (trio/_core/_run.py:10);epoll_wait (libc.so.6) 4\n"
        "<module> (pimcore/__main__.py:1);run (trio/_core/_run.py:10);_finish_send (pimcore/core.py:1) 1\n"
        "<module> (pimcore/__main__.py:1);commit (pimcore/store/lmdb.py:80);fdatasync (libc.so.6) 6\n"
        "run (threading.py:982);_run (pimcore/store/lmdb.py:648);_queue_SimpleQueue_get (_queuemodule.c.h:177);"
        "PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x7f57d1aaed90 (libc.so.6) 9\n"
        "_finish (pimcore/store/lmdb.py:853);env_sync (lmdb/cpython.c:1);pthread_cond_timedwait (libc.so.6) 2\n"
        "garbage line\n"
    )
    assert summarize(stacks) == Counter({"core logic": 8, "LMDB's own work": 5, "the store's Python side": 3,
                                         "garbage collector": 2, "trio and socket I/O": 4, FSYNC: 6, WAIT: 11})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="50x16", choices=["1x1", "1x64", "50x16", "e2e-1x64"])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--durability", default="sync", choices=["sync", "log", "os"])
    ap.add_argument("--backend", choices=["cython", "pure"])
    ap.add_argument("--raw", help="keep py-spy's collapsed stacks in this file")
    a = ap.parse_args()
    print(profile(a.shape, a.seconds, a.durability, a.backend, a.raw))
