"""Display order (causal interleave) and the hybrid logical clock."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore import _backend
from pimcore.clock import HybridClock
from pimcore.order import display_order

MINUTE = 60 * 1_000_000
T0 = 1_700_000_000_000_000
I64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)

senders = st.sampled_from(["alice", "bob", "carol", "dave"])
devices = st.sampled_from(["phone", "laptop", "tab"])

# field positions in an item
SENDER, DEVICE, LOCAL_ID, AFTER_SEQ, SEQ, CT, ST, MID = range(8)


def _ordered(backend, xs):
    out = backend.interleave(xs)
    return [xs[i] for i in out]


def plain(sender, ct, st_, mid):
    """An item that imposes no causal constraint (no seq, nothing seen, one
    local id per device): the seed's 4-tuple in the new shape."""
    return (sender, "d", 0, 0, 0, ct, st_, mid)


# ------------------------------------------------- reference: the old merge


def old_merge(items4):
    """The seed's k-way merge of per-sender runs, kept verbatim as the
    reference for 'no causal constraints gives the old order'."""
    runs = {}
    for index, (sender, ct, st_, mid) in enumerate(items4):
        runs.setdefault(sender, []).append((ct, st_, mid, index))
    heap = []
    for sender, run in runs.items():
        run.sort()
        ct, st_, mid, idx = run[0]
        heap.append((st_, sender, mid, idx, 0))
    heapq.heapify(heap)
    out = []
    while heap:
        st_, sender, mid, idx, at = heapq.heappop(heap)
        out.append(idx)
        run = runs[sender]
        if at + 1 < len(run):
            _, st_, mid, idx = run[at + 1]
            heapq.heappush(heap, (st_, sender, mid, idx, at + 1))
    return out


# ------------------------------------------------- causality helpers


def direct_preds(xs):
    """preds[m] = indices x that m must follow (the documented rule)."""
    preds = []
    for m in xs:
        ps = set()
        for j, x in enumerate(xs):
            if 0 < x[SEQ] <= m[AFTER_SEQ]:
                ps.add(j)
            if (x[SENDER], x[DEVICE]) == (m[SENDER], m[DEVICE]) and x[LOCAL_ID] < m[LOCAL_ID]:
                ps.add(j)
        preds.append(ps)
    return preds


def is_acyclic(preds):
    indeg = [len(p) for p in preds]
    succ = [[] for _ in preds]
    for m, ps in enumerate(preds):
        for x in ps:
            succ[x].append(m)
    ready = [m for m, d in enumerate(indeg) if d == 0]
    seen = 0
    while ready:
        x = ready.pop()
        seen += 1
        for m in succ[x]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
    return seen == len(preds)


def ancestors(preds):
    memo = {}

    def anc(m):
        if m not in memo:
            a = set()
            for x in preds[m]:
                a.add(x)
                a |= anc(x)
            memo[m] = a
        return memo[m]

    return [anc(m) for m in range(len(preds))]


def assert_causal(xs, out):
    pos = {i: k for k, i in enumerate(out)}
    for m, ps in enumerate(direct_preds(xs)):
        for x in ps:
            assert pos[x] < pos[m], f"{xs[m]} displayed before its predecessor {xs[x]}"


# ------------------------------------------------- simulated conversations


def simulate(rnd, n, users=("alice", "bob", "carol"), max_devices=3, synchronized=False, steps=True):
    """A conversation as the broker and the devices make it.

    Each user has 1..max_devices devices, each with its own clock offset
    (±30 min; one offset per user when ``synchronized``) that may step by up
    to ±10 min between sends.  The broker gives seqs and strictly increasing
    server times in arrival order.  Every message is delivered to every
    other device after a random delay (so devices see messages out of seq
    order); a device learns its own send's seq from the ack, also after a
    delay (so sends are pipelined: a device's next send may not have seen its
    previous one).  A device's after_seq is the highest seq it has received
    or had acked.  Local ids increase per device in send order.
    """
    devs = []
    for u in users:
        for d in range(rnd.randint(1, max_devices)):
            devs.append((u, f"dev{d}"))
    user_offset = {u: rnd.randint(-1800, 1800) * 1_000_000 for u in users}
    offset = {dv: user_offset[dv[0]] if synchronized else rnd.randint(-1800, 1800) * 1_000_000 for dv in devs}
    seen = {dv: 0 for dv in devs}
    local = {dv: rnd.randint(0, 3) for dv in devs}
    pending = []  # (due step, device, seq)
    now = T0
    items = []
    for step in range(n):
        now += rnd.randint(1, 2_000_000)
        keep = []
        for due, dv, q in pending:
            if due <= step:
                seen[dv] = max(seen[dv], q)
            else:
                keep.append((due, dv, q))
        pending = keep
        if steps and not synchronized and rnd.random() < 0.2:
            offset[rnd.choice(devs)] += rnd.randint(-600, 600) * 1_000_000
        dv = rnd.choice(devs)
        seq = step + 1
        local[dv] += rnd.randint(1, 3)
        ct = now + offset[dv] + (0 if synchronized else rnd.randint(0, 50_000))
        items.append((dv[0], dv[1], local[dv], seen[dv], seq, ct, now, b"m%05d" % seq))
        pending.append((step + rnd.randint(0, 3), dv, seq))  # its own send, acked later
        for other in devs:
            if other != dv:
                pending.append((step + rnd.randint(0, 6), other, seq))
    return items


conversations = st.builds(
    lambda seed, n, k: simulate(random.Random(seed), n, max_devices=k),
    st.integers(0, 2**32),
    st.integers(0, 40),
    st.integers(1, 3),
)


def device_view(rnd, xs):
    """What one device may hold: a random subset, in random arrival order."""
    view = [x for x in xs if rnd.random() < 0.8]
    rnd.shuffle(view)
    return view


# ------------------------------------------------- the issue


def issue_items():
    # alice: phone + laptop; bob: phone.  After alice logs in her phone's
    # clock steps +5 min.  q1 from the phone; bob replies r1 having seen q1;
    # alice sends q2 from the laptop having seen r1.
    q1 = ("alice", "phone", 1, 0, 1, T0 + 5 * MINUTE, T0, b"q1")
    r1 = ("bob", "phone", 1, 1, 2, T0 + 10_000_000, T0 + 10_000_000, b"r1")
    q2 = ("alice", "laptop", 1, 2, 3, T0 + 20_000_000, T0 + 20_000_000, b"q2")
    return [q1, r1, q2]


def test_issue_reply_never_above_the_question(backend):
    # Before the fix (seed merge on (sender, client_time, server_time,
    # msg_id)) every device showed r1, q2, q1.
    for xs in itertools.permutations(issue_items()):
        assert [x[MID] for x in _ordered(backend, list(xs))] == [b"q1", b"r1", b"q2"]


def test_issue_on_a_device_that_holds_part_of_the_conversation(backend):
    # A fresh device fetched q1 and q2 but not (yet) r1: q2's device had seen
    # seq 2 >= q1's seq, so q1 still comes first (the old merge: q2, q1).
    q1, _, q2 = issue_items()
    for xs in ([q1, q2], [q2, q1]):
        assert [x[MID] for x in _ordered(backend, xs)] == [b"q1", b"q2"]


def test_same_device_clock_stepped_back_keeps_send_order(backend):
    # One phone, its clock steps back 5 min between two sends: the second
    # has the smaller client time, but its local id (and after_seq) say it
    # was sent second.  bob's message sits between them by server time.
    a1 = ("alice", "phone", 7, 0, 1, T0, T0, b"a1")
    b1 = ("bob", "phone", 1, 1, 2, T0 + 1_000_000, T0 + 1_000_000, b"b1")
    a2 = ("alice", "phone", 8, 2, 3, T0 + 2_000_000 - 5 * MINUTE, T0 + 2_000_000, b"a2")
    for xs in itertools.permutations([a1, b1, a2]):
        assert [x[MID] for x in _ordered(backend, list(xs))] == [b"a1", b"b1", b"a2"]
    # even without after_seq (an old client) the local ids keep a1 before a2
    a2_blind = a2[:AFTER_SEQ] + (0,) + a2[AFTER_SEQ + 1 :]
    assert [x[MID] for x in _ordered(backend, [a2_blind, a1])] == [b"a1", b"a2"]


def test_three_devices_three_clocks_one_thread(backend):
    # A question/answer thread where every sender's device clock is off in a
    # different direction; each message was sent having seen the previous.
    offs = {("alice", "phone"): 5 * MINUTE, ("bob", "phone"): -20 * MINUTE, ("alice", "laptop"): -3 * MINUTE}
    order = [("alice", "phone"), ("bob", "phone"), ("alice", "laptop"), ("bob", "phone"), ("alice", "phone")]
    xs = []
    for k, (u, d) in enumerate(order):
        t = T0 + k * 1_000_000
        xs.append((u, d, k + 1, k, k + 1, t + offs[(u, d)], t, b"t%d" % k))
    want = [x[MID] for x in xs]
    for seed in range(20):
        ys = list(xs)
        random.Random(seed).shuffle(ys)
        assert [x[MID] for x in _ordered(backend, ys)] == want


# ------------------------------------------------- properties


@settings(max_examples=150)
@given(conversations, st.randoms(use_true_random=False))
def test_simulated_conversations(backend, xs, rnd):
    view = device_view(rnd, xs)
    out = backend.interleave(view)
    # (a) a permutation
    assert sorted(out) == list(range(len(view)))
    # (b) nothing before one of its causal predecessors
    assert_causal(view, out)
    # (c) arrival order does not matter: every device holding the same
    # messages shows the same order
    again = list(view)
    rnd.shuffle(again)
    assert _ordered(backend, again) == [view[i] for i in out]


@settings(max_examples=150)
@given(conversations, st.randoms(use_true_random=False))
def test_same_sender_order_kept_where_causality_agrees(backend, xs, rnd):
    # (d) x before y in their sender's local order, and causality does not
    # disagree (x is an ancestor of y, or every ancestor of x is one of y):
    # x is displayed first.
    view = device_view(rnd, xs)
    out = backend.interleave(view)
    pos = {i: k for k, i in enumerate(out)}
    anc = ancestors(direct_preds(view))

    def local_key(x):
        return (x[CT], x[ST], x[MID], x[DEVICE], x[LOCAL_ID], x[SEQ], x[AFTER_SEQ])

    for a, b in itertools.permutations(range(len(view)), 2):
        x, y = view[a], view[b]
        if x[SENDER] == y[SENDER] and local_key(x) < local_key(y):
            if a in anc[b] or anc[a] <= anc[b]:
                assert pos[a] < pos[b], (x, y)


@given(st.integers(0, 2**32), st.integers(0, 40), st.randoms(use_true_random=False))
def test_synchronized_clocks_give_server_time_order(backend, seed, n, rnd):
    # (e) every device of a user shares one clock offset, no steps: the
    # display order is server-time order, whatever the deliveries were.
    xs = simulate(random.Random(seed), n, synchronized=True)
    view = device_view(rnd, xs)
    assert [x[ST] for x in _ordered(backend, view)] == sorted(x[ST] for x in view)


@given(st.lists(st.tuples(senders, devices, U64, U64, st.integers(-1000, 1000), st.integers(0, 1000)), max_size=60))
def test_no_causal_constraints_is_the_old_merge(backend, rows):
    # (f) after_seq 0 everywhere and one local id per device: no constraint.
    # msg_ids are unique (as on the wire), so the old merge is itself a
    # function of the set and the two must agree exactly.
    lid = {}
    xs = []
    for k, (s, d, local_id, seq, ct, st_) in enumerate(rows):
        lid.setdefault((s, d), local_id)
        xs.append((s, d, lid[(s, d)], 0, seq, ct, st_, k.to_bytes(2, "big")))
    random.Random(len(rows)).shuffle(xs)
    assert backend.interleave(xs) == old_merge([(x[SENDER], x[CT], x[ST], x[MID]) for x in xs])


@given(st.lists(st.tuples(senders, st.integers(-1000, 1000), st.integers(0, 1000), st.binary(max_size=3)), max_size=60))
def test_plain_items_are_the_old_merge_even_with_duplicate_ids(backend, rows):
    # (f') the seed's 4-tuples in the new shape (no seq, nothing seen): the
    # same indices as the old merge, ties and duplicates included.
    xs = [plain(*r) for r in rows]
    assert backend.interleave(xs) == old_merge(rows)


small = st.integers(0, 6)
hostile_item = st.tuples(senders, devices, small, small, small, st.integers(-3, 3), st.integers(-3, 3), st.binary(max_size=1))


@settings(max_examples=300)
@given(st.lists(hostile_item, max_size=40), st.randoms(use_true_random=False))
def test_hostile_inputs_terminate_and_are_a_function_of_the_set(backend, xs, rnd):
    # (g) after_seq >= own seq, local ids that disagree with seqs, duplicate
    # seqs and ids: cycles are broken, the result is a permutation and does
    # not depend on input order; where the constraints are acyclic they hold.
    out = backend.interleave(xs)
    assert sorted(out) == list(range(len(xs)))
    ys = list(xs)
    rnd.shuffle(ys)
    assert _ordered(backend, ys) == [xs[i] for i in out]
    if is_acyclic(direct_preds(xs)):
        assert_causal(xs, out)


def test_cycle_is_broken_by_smallest_seq(backend):
    # A reinstalled app restarts its local ids: old o1..o3 (local 1..3, seq
    # 1..3), new n1, n2 (local 1, 2, seq 4, 5, having seen everything).  The
    # local ids say n1 < o2 < o3, the seqs say the opposite: a cycle, broken
    # by falling back to the broker's order.
    xs = [("a", "p", k, k - 1, k, T0 + k, T0 + k, b"o%d" % k) for k in (1, 2, 3)]
    xs += [("a", "p", k, k + 2, k + 3, T0 + 10 + k, T0 + 10 + k, b"n%d" % k) for k in (1, 2)]
    for seed in range(10):
        ys = list(xs)
        random.Random(seed).shuffle(ys)
        assert [x[MID] for x in _ordered(backend, ys)] == [b"o1", b"o2", b"o3", b"n1", b"n2"]


def test_self_dependency_and_total_cycle_terminate(backend):
    # every item claims to have seen itself and everything: nothing is ever
    # ready, the cycle breaker outputs by (seq, server_time, ...).
    xs = [("s%d" % (k % 3), "d", 5 - k, 1 << 63, k, -k, k % 2, b"") for k in range(6)]
    assert [x[SEQ] for x in _ordered(backend, xs)] == [0, 1, 2, 3, 4, 5]


def test_large_cyclic_chain_does_not_recurse(backend):
    # 20,000 items in one chain whose local ids run against their seqs
    n = 20_000
    xs = [("a", "p", n - k, k, k + 1, k, k, b"") for k in range(n)]
    out = backend.interleave(xs)
    assert sorted(out) == list(range(n))


def test_skewed_sender_keeps_own_order_and_interleaves_by_server_time(backend):
    # A (30 min late) and B chat alternately; each device sees one order.
    conv = []
    for k in range(5):
        conv.append(plain("A", T0 + 2 * k * 1000 - 30 * MINUTE, T0 + 2 * k * 1000, b"a%d" % k))
        conv.append(plain("B", T0 + (2 * k + 1) * 1000, T0 + (2 * k + 1) * 1000, b"b%d" % k))
    expect = [x[MID] for x in conv]
    for seed in range(5):
        xs = list(conv)
        random.Random(seed).shuffle(xs)
        assert [x[MID] for x in _ordered(backend, xs)] == expect


def test_not_a_comparator_case(backend):
    # a1 <local a2, but server times say b1 sits between them the other way:
    # a comparator would be intransitive here; the merge is still a function.
    xs = [plain("A", 1, 30, b"a1"), plain("A", 2, 10, b"a2"), plain("B", 0, 20, b"b1")]
    out = _ordered(backend, xs)
    assert [x[MID] for x in out] == [b"b1", b"a1", b"a2"]
    assert _ordered(backend, list(reversed(xs))) == out


def test_empty_and_single(backend):
    assert backend.interleave([]) == []
    assert backend.interleave([("a", "d", 0, 0, 0, 1, 2, b"")]) == [0]
    assert backend.interleave(iter([("a", "d", 1, 5, 3, 1, 2, b"")])) == [0]


GOOD = ("a", "d", 1, 0, 1, 1, 2, b"")


def _with(k, v):
    return GOOD[:k] + (v,) + GOOD[k + 1 :]


@pytest.mark.parametrize(
    "bad, exc, msg",
    [
        ([("a", 1, 2, b"")], TypeError, "8-tuples"),
        ([GOOD[:7]], TypeError, "8-tuples"),
        (["abcdefgh"], TypeError, "8-tuples"),
        ([list(GOOD)], TypeError, "8-tuples"),
        ([_with(SENDER, 1)], TypeError, "sender and device must be str"),
        ([_with(DEVICE, b"d")], TypeError, "sender and device must be str"),
        ([_with(LOCAL_ID, 1.0)], TypeError, "must be int"),
        ([_with(AFTER_SEQ, True)], TypeError, "must be int"),
        ([_with(SEQ, None)], TypeError, "must be int"),
        ([_with(CT, 1.0)], TypeError, "must be int"),
        ([_with(ST, False)], TypeError, "must be int"),
        ([_with(MID, "id")], TypeError, "msg_id must be bytes"),
        ([_with(LOCAL_ID, -1)], ValueError, "unsigned 64-bit"),
        ([_with(AFTER_SEQ, 1 << 64)], ValueError, "unsigned 64-bit"),
        ([_with(SEQ, -(1 << 70))], ValueError, "unsigned 64-bit"),
        ([_with(CT, 1 << 63)], ValueError, "signed 64-bit"),
        ([_with(ST, -(1 << 63) - 1)], ValueError, "signed 64-bit"),
        ([GOOD, _with(SEQ, -1)], ValueError, "unsigned 64-bit"),
    ],
)
def test_bad_items_raise_the_same_errors(backend, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        backend.interleave(bad)


def test_extreme_values_are_accepted(backend):
    u = (1 << 64) - 1
    xs = [
        ("a", "d", u, u, u, (1 << 63) - 1, -(1 << 63), b"\xff"),
        ("a", "d", 0, 0, 1, -(1 << 63), (1 << 63) - 1, b""),
    ]
    # item 0 has seen seq 1 (item 1) and has the larger local id
    assert backend.interleave(xs) == [1, 0]


anything = st.one_of(
    st.tuples(senders, devices, U64, U64, U64, I64, I64, st.binary(max_size=4)),
    st.tuples(senders, devices, st.integers(), st.integers(), st.integers(), st.integers(), st.integers(), st.binary(max_size=2)),
    st.tuples(
        st.one_of(st.integers(), st.text(max_size=2)),
        st.one_of(st.text(max_size=1), st.none()),
        st.one_of(st.integers(-2, 2), st.booleans(), st.floats()),
        st.integers(-2, 2),
        st.one_of(st.integers(-2, 2), st.booleans()),
        st.one_of(st.integers(), st.floats(), st.booleans()),
        st.integers(),
        st.one_of(st.binary(max_size=2), st.text(max_size=2)),
    ),
    st.tuples(senders, st.integers()),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=8),
)


@settings(max_examples=400)
@given(st.lists(anything, max_size=12))
def test_differential_cython_vs_pure(both, xs):
    fast, pure = both

    def run(b):
        try:
            return ("ok", b.interleave(xs))
        except (TypeError, ValueError) as exc:
            return ("err", type(exc), str(exc))

    assert run(fast) == run(pure)


@given(st.lists(st.tuples(senders, devices, U64, U64, U64, I64, I64, st.binary(max_size=4)), max_size=200))
def test_differential_full_range(both, xs):
    fast, pure = both
    assert fast.interleave(xs) == pure.interleave(xs)


@settings(max_examples=300)
@given(st.lists(hostile_item, max_size=60))
def test_differential_hostile(both, xs):
    fast, pure = both
    assert fast.interleave(xs) == pure.interleave(xs)


@settings(max_examples=50)
@given(st.integers(0, 2**32), st.integers(0, 300), st.randoms(use_true_random=False))
def test_differential_simulated(both, seed, n, rnd):
    fast, pure = both
    view = device_view(rnd, simulate(random.Random(seed), n, users=("a", "b", "c", "d", "e")))
    assert fast.interleave(view) == pure.interleave(view)


@dataclass(frozen=True, slots=True)
class _Msg:
    sender: str
    device: str
    local_id: int
    after_seq: int
    seq: int
    client_time: int
    server_time: int
    msg_id: bytes
    payload: bytes


def test_display_order_on_objects():
    ms = [_Msg(*x, payload=x[MID].upper()) for x in issue_items()]
    for perm in itertools.permutations(ms):
        assert [m.payload for m in display_order(list(perm))] == [b"Q1", b"R1", b"Q2"]


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
