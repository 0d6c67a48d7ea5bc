"""SIGKILL the whole broker (core + durable LMDB store, durability
sync and log) at random moments.

Alice's client re-sends every message whose SendAck it did not see, with the
same local id; Bob's client resumes from the last position its app processed.
After the crashes: every acked message is stored exactly once with the
identity it was acked with, nothing Alice sent is missing, and Bob's app saw
every entry of his inbox exactly once, in position order.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pimcore.store import LmdbStore, direct_conversation

AB = direct_conversation("alice", "bob")
CYCLES = 12
HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["sync", "log"])
def test_broker_killed_mid_traffic_loses_and_duplicates_nothing(tmp_path: Path, durability: str) -> None:
    seed = int(os.environ.get("PIMCORE_CRASH_SEED") or random.SystemRandom().getrandbits(32))
    rnd = random.Random(seed)
    store_dir = str(tmp_path / "store")
    env = dict(os.environ, PIMCORE_CRASH_DURABILITY=durability, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    acked: dict[int, tuple[int, str]] = {}
    got: list[tuple[int, str]] = []
    cursor = 0
    next_lid = 1
    kills = 0
    for cycle in range(CYCLES + 1):
        final = cycle == CYCLES  # the last run is not killed
        unacked = [lid for lid in range(1, next_lid) if lid not in acked]
        fresh = list(range(next_lid, next_lid + 40))
        next_lid += 40
        child = subprocess.Popen(
            [sys.executable, str(HERE / "_broker_crash_child.py"), store_dir, str(cursor), *map(str, unacked + fresh)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        # Kill after a random number of reported events: mid-stream, at a
        # point of the send/commit/push/ack cycle that varies with the seed.
        kill_after = rnd.randint(1, 80)
        lines = []
        for raw in child.stdout:
            lines.append(raw)
            if not final and len(lines) >= kill_after:
                # The child flushes after each event and then commits the next
                # message: a sub-millisecond delay lands the kill anywhere in
                # that fsync, including after it is durable but before the
                # SendAck or the push was reported (the interesting case).
                time.sleep(rnd.uniform(0, 0.003))
                child.send_signal(signal.SIGKILL)
                kills += 1
                break
        lines.extend(child.stdout.read().splitlines(keepends=True))
        child.wait(timeout=30)
        for raw in lines:
            if not raw.endswith(b"\n"):
                continue  # torn by the kill: never fully reported
            parts = raw.decode().split()
            if parts[0] == "ACK":
                lid, seq, mid = int(parts[1]), int(parts[2]), parts[3]
                assert acked.setdefault(lid, (seq, mid)) == (seq, mid), f"seed {seed}: retry of {lid} got a new identity"
            elif parts[0] == "GOT":
                pos, mid = int(parts[1]), parts[2]
                got.append((pos, mid))
                cursor = max(cursor, pos)
        if final:
            assert lines and lines[-1] == b"DONE\n", f"seed {seed}: final run did not finish"

    assert kills >= CYCLES // 2, f"seed {seed}: children finished before being killed"
    with LmdbStore(store_dir, create=False) as store:
        history = store.history(AB, 0, 100_000)
        assert [m.seq for m in history] == list(range(1, len(history) + 1)), f"seed {seed}: seq gap"
        stored = {m.local_id: (m.seq, m.msg_id.hex()) for m in history}
        assert len(stored) == len(history), f"seed {seed}: a retry was stored twice"
        assert set(stored) == set(range(1, next_lid)), f"seed {seed}: sent messages missing"
        for lid, identity in acked.items():
            assert stored[lid] == identity, f"seed {seed}: {lid} acked as {identity}, stored as {stored[lid]}"
        inbox = [(pos, m.msg_id.hex()) for pos, m in store.inbox_range("bob", 0, 100_000)]
    assert got == inbox, f"seed {seed}: bob's app did not see his inbox exactly once, in order"
