"""Typing fan-out cost in the sans-IO core (pytest-benchmark).

    pytest bench/bench_typing.py --benchmark-enable -p no:cacheprovider
    python bench/bench_typing.py        # a table: µs and frames per Typing

A Typing from one member of a group is relayed to the online devices of the
other members (PROTOCOL.md, "Typing and presence").  Each round feeds ONE
Typing frame (encoded, through the real codec) to a broker core whose group
has ``members`` members, all online with one device, and counts the frames
the core emits.  Groups above ``typing_max_members`` (256 by default) get
nothing relayed: the sender gets one Error(TYPING_NOT_RELAYED), so the cost
of a Typing is bounded by the bound, whatever the group's size.  The rate
limit is off (a huge bucket) so every round is relayed.

Under ``--benchmark-disable`` (the project's default addopts) every case runs
once, as a smoke test.
"""

from __future__ import annotations

import time
from typing import Optional

import pytest

from pimcore import frames as F
from pimcore.codec import Decoder, encode_frame
from pimcore.core import Authenticate, Broker, BrokerConfig, Identity, SendData, StoreRequest
from pimcore.store import MemoryStore

GROUP = "bench-group"
T0 = 1_700_000_000_000_000


class _Core:
    """A broker core with ``members`` logged-in members of GROUP."""

    def __init__(self, members: int) -> None:
        self.store = MemoryStore()
        self.store.create_group(GROUP, [f"u{i:05d}" for i in range(members)], 1)
        cfg = BrokerConfig(typing_rate=1e9, typing_burst=1 << 30, control_rate=0.0)
        self.broker = Broker(cfg, node_id=self.store.node_id(), epoch=self.store.epoch())
        self.now = T0
        self.frames_out = 0
        for i in range(members):
            self.broker.connection_made(i, self.now)
            self.run(self.broker.receive_data(i, encode_frame(F.Login(f"u{i:05d}".encode(), "p", 0, 0, 0)), self.now))
        self.frame = encode_frame(F.Typing(GROUP, True))
        self.feed()  # the first Typing reads the members; later ones use the cache

    def run(self, cmds: list) -> None:
        while cmds:
            cmd = cmds.pop(0)
            if isinstance(cmd, Authenticate):
                cmds += self.broker.auth_completed(cmd.request_id, Identity(cmd.token.decode()), self.now)
            elif isinstance(cmd, StoreRequest):
                cmds += self.broker.store_completed(cmd.request_id, self.store.execute(cmd), self.now)
            elif isinstance(cmd, SendData):
                self.frames_out += 1
                cmds += self.broker.data_sent(cmd.conn, len(cmd.data), self.now)

    def feed(self) -> int:
        before = self.frames_out
        self.now += 1
        self.run(self.broker.receive_data(0, self.frame, self.now))
        return self.frames_out - before


@pytest.mark.parametrize("members", [2, 16, 256, 4096])
def test_typing_fanout(benchmark, members: int) -> None:
    core = _Core(members)
    out = benchmark(core.feed)
    assert out == (1 if members > 256 else members - 1)
    benchmark.extra_info["frames_per_typing"] = out


def measure(members: int, rounds: int = 2000) -> tuple[float, int]:
    core = _Core(members)
    start = time.perf_counter()
    for _ in range(rounds):
        out = core.feed()
    return (time.perf_counter() - start) / rounds * 1e6, out


if __name__ == "__main__":
    print(f"{'members':>8} {'µs/Typing':>10} {'frames/Typing':>14}")
    for n in (2, 16, 256, 4096):
        us, frames = measure(n, 2000 if n <= 256 else 20000)
        print(f"{n:>8} {us:>10.1f} {frames:>14}")
