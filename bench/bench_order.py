"""Display order (causal interleave), Cython and pure side by side.

    pytest bench/bench_order.py --benchmark-only --benchmark-group-by=group
"""

from __future__ import annotations

import random

import pytest

from pimcore import _backend

BACKENDS = _backend.available()

Item = tuple[str, str, int, int, int, int, int, bytes]


def _conversation(n: int, senders: int, seed: int = 1) -> list[Item]:
    # A busy group: each sender has 1-3 devices, each device clock its own
    # skew (up to ±30 min) that sometimes steps by up to ±10 min.  Messages
    # reach each device after 0-20 further sends (acks of its own sends after
    # 0-3), and after_seq is the highest seq the device had then: realistic
    # causal constraints, many of them across senders.
    rnd = random.Random(seed)
    devs = [(f"user{k}", f"dev{d}") for k in range(senders) for d in range(rnd.randint(1, 3))]
    skew = {dv: rnd.randint(-1800, 1800) * 1_000_000 for dv in devs}
    seen = {dv: 0 for dv in devs}
    local = {dv: 0 for dv in devs}
    due: dict[int, list[tuple[tuple[str, str], int]]] = {}
    t = 1_700_000_000_000_000
    items = []
    for step in range(n):
        for dv, q in due.pop(step, ()):
            if q > seen[dv]:
                seen[dv] = q
        t += rnd.randint(1, 2_000_000)
        if rnd.random() < 0.01:
            skew[rnd.choice(devs)] += rnd.randint(-600, 600) * 1_000_000
        dv = rnd.choice(devs)
        seq = step + 1
        local[dv] += 1
        items.append((dv[0], dv[1], local[dv], seen[dv], seq, t + skew[dv] + rnd.randint(0, 50_000), t, t.to_bytes(8, "big") + b"node0001"))
        for other in devs:
            delay = rnd.randint(0, 3) if other == dv else rnd.randint(0, 20)
            due.setdefault(step + delay, []).append((other, seq))
    rnd.shuffle(items)  # arrival order is not display order
    return items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [100, 10_000])
def test_interleave(benchmark, backend, size):
    impl = _backend.load(backend)
    items = _conversation(size, senders=12)
    benchmark.group = f"interleave {size} messages, 12 senders, causal"
    out = benchmark(impl.interleave, items)
    assert sorted(out) == list(range(size))


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleave_no_constraints(benchmark, backend):
    # the seed's case: nothing seen, one local id per device (the old merge)
    impl = _backend.load(backend)
    items = [(s, "d", 0, 0, 0, ct, st, mid) for s, _, _, _, _, ct, st, mid in _conversation(10_000, senders=12)]
    benchmark.group = "interleave 10000 messages, 12 senders, no causal constraints"
    out = benchmark(impl.interleave, items)
    assert sorted(out) == list(range(10_000))
