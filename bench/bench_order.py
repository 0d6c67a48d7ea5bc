"""Display-order merge, Cython and pure side by side.

    pytest bench/bench_order.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import random

import pytest

from pimcore import _backend

BACKENDS = _backend.available()


def _conversation(n: int, senders: int, seed: int = 1) -> list[tuple[str, int, int, bytes]]:
    # A busy group: each sender's clock has its own skew (up to ±30 min).
    rnd = random.Random(seed)
    skew = {f"user{k}": rnd.randint(-1800, 1800) * 1_000_000 for k in range(senders)}
    t = 1_700_000_000_000_000
    items = []
    for i in range(n):
        t += rnd.randint(1, 2_000_000)
        s = f"user{rnd.randrange(senders)}"
        items.append((s, t + skew[s] + rnd.randint(0, 50_000), t, t.to_bytes(8, "big") + b"node0001"))
    rnd.shuffle(items)  # arrival order is not display order
    return items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [100, 10_000])
def test_interleave(benchmark, backend, size):
    impl = _backend.load(backend)
    items = _conversation(size, senders=12)
    benchmark.group = f"interleave {size} messages, 12 senders"
    out = benchmark(impl.interleave, items)
    assert sorted(out) == list(range(size))
