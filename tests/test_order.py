"""Display order (the seed's interleave rule) and the hybrid logical clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore import _backend
from pimcore.clock import HybridClock
from pimcore.order import display_order

MINUTE = 60 * 1_000_000
I64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)

senders = st.sampled_from(["alice", "bob", "carol", "dave"])
item = st.tuples(senders, st.integers(-1000, 1000), st.integers(0, 1000), st.binary(min_size=0, max_size=3))
items = st.lists(item, max_size=60)


def _ordered(backend, xs):
    return [xs[i] for i in backend.interleave(xs)]


@given(items)
def test_each_senders_own_order_is_kept(backend, xs):
    out = _ordered(backend, xs)
    assert sorted(out) == sorted(xs)  # a permutation
    for s in {x[0] for x in xs}:
        mine = [x for x in out if x[0] == s]
        assert mine == sorted(mine, key=lambda x: (x[1], x[2], x[3]))


@given(st.lists(st.tuples(senders, st.integers(0, 10**6)), max_size=60, unique_by=lambda t: t[1]), st.integers(-10**5, 10**5))
def test_synchronized_clocks_give_server_time_order(backend, pairs, skew):
    # Every sender's local clock agrees with the server's order (a constant
    # offset per sender keeps local order == server order within a sender).
    offsets = {"alice": skew, "bob": -skew, "carol": 0, "dave": 7}
    xs = [(s, t + offsets[s], t, t.to_bytes(8, "big")) for s, t in pairs]
    out = _ordered(backend, xs)
    assert [x[2] for x in out] == sorted(x[2] for x in xs)


@given(items, st.randoms())
def test_result_does_not_depend_on_arrival_order(backend, xs, rnd):
    shuffled = list(xs)
    rnd.shuffle(shuffled)
    assert _ordered(backend, xs) == _ordered(backend, shuffled)


def test_seed_example_skewed_sender_still_first(backend):
    # A's clock is 30 minutes late.  A sends "XXX", then B replies "YYY".  By
    # local time alone B would come first; the merge puts A first everywhere.
    real = 1_700_000_000_000_000
    a = ("A", real - 30 * MINUTE, real + 10, b"a1")
    b = ("B", real + 5_000_000, real + 5_000_010, b"b1")
    for xs in ([a, b], [b, a]):
        assert _ordered(backend, xs) == [a, b]


def test_skewed_sender_keeps_own_order_and_interleaves_by_server_time(backend):
    # A (30 min late) and B chat alternately; each device sees one order.
    real = 1_700_000_000_000_000
    conv = []
    for k in range(5):
        conv.append(("A", real + 2 * k * 1000 - 30 * MINUTE, real + 2 * k * 1000, b"a%d" % k))
        conv.append(("B", real + (2 * k + 1) * 1000, real + (2 * k + 1) * 1000, b"b%d" % k))
    expect = [x[3] for x in conv]
    for seed in range(5):
        xs = list(conv)
        random.Random(seed).shuffle(xs)
        assert [x[3] for x in _ordered(backend, xs)] == expect


def test_not_a_comparator_case(backend):
    # a1 <local a2, but server times say b1 sits between them the other way:
    # a comparator would be intransitive here; the merge is still a function.
    xs = [("A", 1, 30, b"a1"), ("A", 2, 10, b"a2"), ("B", 0, 20, b"b1")]
    out = _ordered(backend, xs)
    assert [x[3] for x in out] == [b"b1", b"a1", b"a2"]
    assert _ordered(backend, list(reversed(xs))) == out


def test_empty_and_single(backend):
    assert backend.interleave([]) == []
    assert backend.interleave([("a", 1, 2, b"")]) == [0]


@pytest.mark.parametrize(
    "bad, exc",
    [
        ([("a", 1, 2)], TypeError),
        (["abcd"], TypeError),
        ([(1, 1, 2, b"")], TypeError),
        ([("a", 1.0, 2, b"")], TypeError),
        ([("a", True, 2, b"")], TypeError),
        ([("a", 1, 2, "id")], TypeError),
        ([("a", 1 << 63, 2, b"")], ValueError),
        ([("a", 1, -(1 << 63) - 1, b"")], ValueError),
    ],
)
def test_bad_items_raise_the_same_errors(backend, bad, exc):
    with pytest.raises(exc):
        backend.interleave(bad)


anything = st.one_of(
    st.tuples(senders, I64, I64, st.binary(max_size=4)),
    st.tuples(senders, st.integers(), st.integers(), st.binary(max_size=2)),
    st.tuples(st.one_of(st.integers(), st.text(max_size=2)), st.one_of(st.integers(), st.floats(), st.booleans()), st.integers(), st.one_of(st.binary(max_size=2), st.text(max_size=2))),
    st.tuples(senders, st.integers()),
    st.text(max_size=3),
)


@settings(max_examples=300)
@given(st.lists(anything, max_size=12))
def test_differential_cython_vs_pure(xs):
    if "cython" not in _backend.available():
        pytest.skip("the Cython backend is not built")
    fast, pure = _backend.load("cython"), _backend.load("pure")

    def run(b):
        try:
            return ("ok", b.interleave(xs))
        except (TypeError, ValueError) as exc:
            return ("err", type(exc), str(exc))

    assert run(fast) == run(pure)


@given(st.lists(st.tuples(senders, I64, I64, st.binary(max_size=4)), max_size=200))
def test_differential_full_range(xs):
    if "cython" not in _backend.available():
        pytest.skip("the Cython backend is not built")
    assert _backend.load("cython").interleave(xs) == _backend.load("pure").interleave(xs)


def test_display_order_on_objects():
    from pimcore.frames import Message

    m1 = Message(0, b"1", "g", 1, "A", "d", 100 - 30 * MINUTE, 100, b"x")
    m2 = Message(0, b"2", "g", 2, "B", "d", 200, 200, b"y")
    assert display_order([m2, m1]) == [m1, m2]


# ---------------------------------------------------------------- clock


@given(st.lists(st.integers(0, 10**12), min_size=1, max_size=100))
def test_hlc_never_goes_backwards(walls):
    clock = HybridClock()
    issued = [clock.tick(w) for w in walls]
    assert all(b > a for a, b in zip(issued, issued[1:]))
    assert all(t >= w for t, w in zip(issued, walls))


def test_hlc_follows_wall_clock_and_survives_a_step_back():
    clock = HybridClock()
    assert clock.tick(1000) == 1000
    assert clock.tick(2000) == 2000
    assert clock.tick(500) == 2001  # NTP stepped back: logical progress
    assert clock.now(500) == 2001
    assert clock.drift(500) == 1501
    assert clock.tick(5000) == 5000  # wall clock caught up: physical again
    clock.observe(9000)
    assert clock.tick(6000) == 9001
    assert clock.now(10_000) == 10_000 and clock.last == 9001
