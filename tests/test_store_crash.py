"""Crash safety of LmdbStore: SIGKILL a writer at random moments.

Each cycle starts a child (tests/_crash_child.py) that sends messages through
``LmdbStore(durability="sync")`` (and ``"log"``: the command log of
pimcore/store/wal.py) and prints an ack line after each commit;
the parent kills it with SIGKILL 20-250 ms after the first ack.  The next
child re-sends, with the same local ids, every message whose ack the parent
never saw (it may or may not be stored: the kill can land between commit and
print), plus new ones and a few retries of acked ones.  At the end one child
runs to completion so every message gets acked, and the parent reopens the
store and checks what an acked message promises:

* every acked (sender, device, local_id) is stored exactly once, with the
  msg_id/seq it was acked with -- whichever child acked it;
* every conversation's seqs are exactly 1..N;
* every inbox is positions 1..head, each message of the user's
  conversations exactly once, in seq order per conversation;
* last_server_time is at least every stored server time.

Set PIMCORE_CRASH_SEED to replay a run; the seed is in every failure message.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import pytest

from pimcore.store import LmdbStore, direct_conversation

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "_crash_child.py"
CYCLES = 24
# Far more than a child gets through before the kill; the part it never
# reached (no TRY line) counts as never sent.
NEW_PER_CYCLE = 5000

GROUP = "crashgroup"  # created by the child, members alice..dave
CONVS = {
    direct_conversation("alice", "bob"): ("alice", "bob"),
    direct_conversation("carol", "dave"): ("carol", "dave"),
    GROUP: ("alice", "bob", "carol", "dave"),
}
DEVICES = ("phone", "laptop")

Key = tuple[str, str, int]  # (sender, device, local_id)


class Run:
    """The parent's view: what was sent and what was acked."""

    def __init__(self, seed: int, store_dir: Path, work: Path, durability: str) -> None:
        self.durability = durability
        self.seed = seed
        self.rng = random.Random(seed)
        self.store_dir = store_dir
        self.work = work
        self.sent: dict[Key, tuple[str, str]] = {}  # key -> (conv, payload hex)
        self.pending: list[Key] = []  # sent, ack never seen (in send order)
        self.acked: dict[Key, tuple[str, int, int]] = {}  # key -> (msg_id hex, seq, server_time)
        self.acked_keys: list[Key] = []  # the same keys, to pick retries from
        self.next_local: dict[tuple[str, str], int] = defaultdict(int)
        self.kills = 0
        self.lost_acks = 0  # stored, but the kill came before the ack line

    def fail(self, message: str) -> None:
        pytest.fail(f"[PIMCORE_CRASH_SEED={self.seed}] {message}", pytrace=False)

    def new_messages(self, n: int) -> list[Key]:
        keys = []
        for _ in range(n):
            conv = self.rng.choice(list(CONVS))
            sender = self.rng.choice(CONVS[conv])
            device = self.rng.choice(DEVICES)
            self.next_local[(sender, device)] += 1
            key = (sender, device, self.next_local[(sender, device)])
            self.sent[key] = (conv, os.urandom(self.rng.randint(0, 64)).hex())
            keys.append(key)
        return keys

    def plan(self, n_new: int) -> list[Key]:
        # A reconnecting client first re-sends what was never acked, then
        # new messages, now and then repeating an earlier one (acked or not).
        plan = list(self.pending)
        for key in self.new_messages(n_new):
            plan.append(key)
            if self.rng.random() < 0.05:
                plan.append(self.rng.choice(plan))
            if self.acked_keys and self.rng.random() < 0.03:
                plan.append(self.rng.choice(self.acked_keys))
        return plan

    def record(self, line: str) -> None:
        parts = line.split()
        if parts[0] == "REJ":
            self.fail(f"message refused: {line!r}")
        if parts[0] != "ACK" or len(parts) != 8:
            self.fail(f"unexpected child output: {line!r}")
        _, sender, device, local_id, kind, msg_id, seq, server_time = parts
        key = (sender, device, int(local_id))
        ident = (msg_id, int(seq), int(server_time))
        if key not in self.sent:
            self.fail(f"ack for a message never sent: {line!r}")
        if key in self.acked:
            if self.acked[key] != ident:
                self.fail(f"{key} acked as {self.acked[key]} and later as {ident}: stored twice")
            if kind != "D":
                self.fail(f"{key} stored again after being acked: {line!r}")
        else:
            if kind == "D":
                self.lost_acks += 1
            self.acked_keys.append(key)
        self.acked[key] = ident

    def cycle(self, n_new: int, kill: bool) -> None:
        already_sent = set(self.sent)
        plan = self.plan(n_new)
        plan_file = self.work / "plan.json"
        plan_file.write_text(json.dumps([[s, d, i, *self.sent[(s, d, i)]] for s, d, i in plan]))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(self.store_dir), str(plan_file), str(self.rng.getrandbits(32)),
             self.durability],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        lines: list[bytes] = []
        first_ack = threading.Event()

        def read() -> None:
            assert child.stdout is not None
            for line in child.stdout:  # as they arrive
                lines.append(line)
                if line.startswith(b"ACK"):
                    first_ack.set()
            first_ack.set()  # EOF: the child ended on its own

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            if not first_ack.wait(30):
                self.fail("child produced no ack within 30 s")
            if kill:
                time.sleep(self.rng.uniform(0.020, 0.250))
                if child.poll() is None:
                    os.kill(child.pid, signal.SIGKILL)
                    self.kills += 1
            rc = child.wait(60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        reader.join(10)
        assert child.stderr is not None
        err = child.stderr.read().decode(errors="replace")
        child.stderr.close()
        if rc not in (0, -signal.SIGKILL):
            self.fail(f"child exited with {rc}:\n{err}")
        if not kill and rc != 0:
            self.fail(f"final child did not complete:\n{err}")
        tried = 0  # plan entries the child started to commit
        for raw in lines:
            if not raw.endswith(b"\n"):
                continue  # cut by the kill: never fully written, no ack
            if raw.startswith(b"TRY "):
                tried = max(tried, int(raw.split()[2]))
            elif raw != b"READY\n":
                self.record(raw.decode())
        # The child prints TRY before each commit, so an entry past the last
        # TRY was never handed to the store: a new one is simply not sent.
        attempted = set(plan[:tried])
        for key in set(plan[tried:]) - attempted - already_sent:
            del self.sent[key]
        self.pending = [
            k for k in dict.fromkeys(plan) if k not in self.acked and (k in attempted or k in already_sent)
        ]

    def verify(self) -> None:
        store = LmdbStore(self.store_dir, durability="sync", create=False)
        try:
            self._verify(store)
        finally:
            store.close()

    def _verify(self, store: LmdbStore) -> None:
        if self.pending:
            self.fail(f"{len(self.pending)} messages never acked after the final uninterrupted run")
        by_id = {}
        max_time = 0
        for conv, members in CONVS.items():
            last = store.last_seq(conv)
            history = store.history(conv, 0, last + 10)
            if [m.seq for m in history] != list(range(1, last + 1)):
                self.fail(f"{conv}: seqs {[m.seq for m in history]} are not 1..{last}")
            for m in history:
                key = (m.sender, m.device, m.local_id)
                if key not in self.sent or self.sent[key] != (conv, m.payload.hex()):
                    self.fail(f"{conv} seq {m.seq}: stored {key} was never sent like this")
                by_id[m.msg_id] = m
                max_time = max(max_time, m.server_time)
        stored_keys = [(m.sender, m.device, m.local_id) for m in by_id.values()]
        if len(stored_keys) != len(set(stored_keys)):
            self.fail("a message was stored twice")
        if set(stored_keys) != set(self.sent):
            self.fail(f"{len(set(self.sent) - set(stored_keys))} sent messages missing")
        for key, (msg_id, seq, server_time) in self.acked.items():
            found = store.message(bytes.fromhex(msg_id))
            if found is None or (found.sender, found.device, found.local_id, found.seq, found.server_time) != (
                *key,
                seq,
                server_time,
            ):
                self.fail(f"{key} acked as {msg_id}/{seq} but stored as {found}")
        if store.last_server_time() < max_time:
            self.fail(f"last_server_time {store.last_server_time()} < stored {max_time}")
        for user in ("alice", "bob", "carol", "dave"):
            head = store.inbox_head(user)
            entries = store.inbox_range(user, 0, head + 10)
            if [pos for pos, _ in entries] != list(range(1, head + 1)) or store.inbox_floor(user) != 0:
                self.fail(f"{user}: inbox positions are not 1..{head}")
            ids = [m.msg_id for _, m in entries]
            expected = {i for i, m in by_id.items() if user in CONVS[m.conv]}
            if len(ids) != len(set(ids)) or set(ids) != expected:
                self.fail(f"{user}: inbox does not hold each of their messages exactly once")
            for conv in CONVS:
                seqs = [m.seq for _, m in entries if m.conv == conv]
                if seqs != sorted(seqs):
                    self.fail(f"{user}: {conv} out of seq order in the inbox")


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["sync", "log", "log-deferred", "log-offload"])
def test_sigkill_never_loses_or_duplicates_an_acked_message(tmp_path: Path, durability: str) -> None:
    seed_env: Optional[str] = os.environ.get("PIMCORE_CRASH_SEED")
    seed = int(seed_env) if seed_env else random.SystemRandom().getrandbits(32)
    print(f"PIMCORE_CRASH_SEED={seed}")
    run = Run(seed, tmp_path / "store", tmp_path, durability)
    started = time.monotonic()
    for _ in range(CYCLES):
        run.cycle(NEW_PER_CYCLE, kill=True)
    # One child runs to the end: every message ever sent gets its ack.
    run.cycle(0, kill=False)
    run.verify()
    assert run.kills >= CYCLES // 2, f"[PIMCORE_CRASH_SEED={seed}] only {run.kills} kills: children finished too early"
    print(
        f"{CYCLES} cycles, {run.kills} kills, {len(run.acked)} acked, {run.lost_acks} stored"
        f" without their ack seen, in {time.monotonic() - started:.1f} s"
    )
