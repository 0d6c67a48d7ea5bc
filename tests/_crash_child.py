"""Child process of the crash test (tests/test_store_crash.py); not a test.

Usage: python _crash_child.py STORE_DIR PLAN_FILE SEED [DURABILITY]

Opens ``LmdbStore(STORE_DIR, durability=DURABILITY)`` (default "sync"), creates the test group if
missing, then sends the plan's messages in randomly sized batches.  The plan
is JSON: a list of ``[sender, device, local_id, conv, payload_hex]`` in send
order (retries included, as a reconnecting client would send them).  After
each commit returns -- i.e. after the fsync -- it prints one line per op
result and flushes:

    TRY <start> <end>          (before the commit of plan[start:end])
    ACK <sender> <device> <local_id> <A|D> <msg_id hex> <seq> <server_time>
    REJ <sender> <device> <local_id> <code>

The parent SIGKILLs this process at a random moment, so the store must
survive being killed anywhere: mid-transaction, mid-fsync, between the
commit and the print.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import threading
import time

from pimcore.clock import HybridClock
from pimcore.store import Appended, Duplicate, LmdbStore, NewMessage, Rejected, WriteBatch

GROUP = "crashgroup"
GROUP_MEMBERS = ("alice", "bob", "carol", "dave")


def digest(conv: str, payload: bytes) -> bytes:
    return hashlib.sha256(conv.encode() + b"\0" + payload).digest()[:16]


def main(store_dir: str, plan_file: str, seed: int, durability: str = "sync") -> int:
    rng = random.Random(seed)
    with open(plan_file) as f:
        plan = json.load(f)
    # "log-deferred": as a broker runs a log store, several batches share
    # one LMDB commit (LmdbStore.defer_commits); a kill leaves the open ones
    # in the command log only.
    # "log-offload": deferred too, and some batches committed from a worker
    # thread, as a served broker commits a large batch (pimcore.net.server:
    # the owner commits its open transaction first, then the thread's batch
    # is logged and committed on its own).
    offload = durability == "log-offload"
    deferred = durability == "log-deferred" or offload
    # (log-offload: a 1 MiB map, so that it grows, with its checkpoint, in
    # worker commits too -- the riskiest step of that path.)
    store = LmdbStore(store_dir, durability="log" if deferred else durability,
                      **({"map_size": 1 << 20} if offload else {}))
    if deferred:
        store.defer_commits(True)
    if not store.conversation_exists(GROUP):
        store.create_group(GROUP, GROUP_MEMBERS, now=0)
    node = store.node_id()
    # Like a broker restarting on this store: never stamp an earlier time.
    clock = HybridClock(store.last_server_time())
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    i = 0
    batch_id = 0
    while i < len(plan):
        chunk = plan[i : i + rng.randint(1, 8)]
        # Announced before the commit: an entry the parent saw no TRY for
        # was certainly never given to the store.
        out.write(f"TRY {i} {i + len(chunk)}\n")
        out.flush()
        i += len(chunk)
        ops = []
        for sender, device, local_id, conv, payload_hex in chunk:
            payload = bytes.fromhex(payload_hex)
            server_time = clock.tick(time.time_ns() // 1000)
            ops.append(
                NewMessage(
                    msg_id=server_time.to_bytes(8, "big") + node,
                    conv=conv,
                    sender=sender,
                    device=device,
                    local_id=local_id,
                    client_time=server_time,
                    server_time=server_time,
                    payload=payload,
                    digest=digest(conv, payload),
                )
            )
        batch_id += 1
        batch = WriteBatch(batch_id, tuple(ops))
        if offload and rng.random() < 0.3:
            store.commit_open()
            done: list = []
            worker = threading.Thread(target=lambda: done.append(store.commit(batch)))
            worker.start()
            while worker.is_alive():
                # The owner reads meanwhile, as the loop does.
                store.inbox_head("alice")
                store.history(GROUP, 0, 3, backward=True)
            worker.join()
            results = done[0]
        else:
            results = store.commit(batch)
        lines = []
        for op, res in zip(ops, results):
            key = f"{op.sender} {op.device} {op.local_id}"
            if isinstance(res, (Appended, Duplicate)):
                kind = "A" if isinstance(res, Appended) else "D"
                lines.append(f"ACK {key} {kind} {res.msg_id.hex()} {res.seq} {res.server_time}\n")
            else:
                assert isinstance(res, Rejected)
                lines.append(f"REJ {key} {int(res.code)}\n")
        out.write("".join(lines))
        out.flush()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:5]))
