"""Display order of a conversation: the pure-Python twin of the fast path.

The rule
--------
A message is never displayed before a message its sender's device had
already seen or sent when sending it; otherwise the seed's rule holds: one
sender's messages by that sender's local time, different senders interleaved
by server time.  Every device that holds the same messages shows the same
order, whatever order they arrived in.

Why not the seed's merge alone: "local time" is one clock per *device*, not
per user.  alice's phone clock steps +5 min; she sends q1 from the phone, bob
replies r1, she sends q2 from the laptop.  By alice's local times q2 < q1, so a
merge of per-sender runs shows r1, q2, q1 -- a reply above its question.  The
wire now makes causality visible: ``after_seq`` (the highest seq of the
conversation the sending device had seen -- received, fetched or acked for its
own sends -- when it sent the message) and ``local_id`` (increasing in send
order per device).

Causal predecessors of m (only items present in the input count; a device may
hold part of a conversation, and absent messages impose nothing):

* every x with ``0 < x.seq <= m.after_seq`` (m's device had seen x);
* every x with the same ``(sender, device)`` and ``x.local_id < m.local_id``
  (the device sent x before m).

The algorithm (greedy, a function of the set of items)
------------------------------------------------------
An item is *ready* when all its causal predecessors are output.  Repeatedly:

1. for each sender, its candidate is its ready item with the smallest
   ``(client_time, server_time, msg_id, device, local_id, seq, after_seq,
   index)`` -- the sender's own (local-time) order;
2. output the candidate with the smallest ``(server_time, sender, msg_id,
   index)`` -- senders interleaved by server time.

With no causal constraints every item is ready from the start, step 1 takes
the head of each sender's sorted run and step 2 is exactly the seed's k-way
merge (tested against a copy of the old merge).  Consequences (tested): no
item precedes a predecessor when the constraints are acyclic; when every
device clock agrees with server order within a sender, the result is plain
server-time order (predecessors always have smaller seq, hence smaller server
time); of two items x, y of one sender with x first in local order, x is shown
first whenever every causal ancestor of x is one of y (or x is one of y) --
when y is ready so is x, and the sender takes x first.  A sender's local order
yields only where causality demands it (or where an item waits for a message
that the other did not: then the free one may go first).

Cycles (hostile or inconsistent input: after_seq >= own seq, local ids that
disagree with seqs -- e.g. a reinstalled app restarting its local ids): when
nothing is ready but items remain, the remaining item with the smallest
``(seq, server_time, sender, msg_id, device, local_id, after_seq,
client_time, index)`` is output as if it were ready.  Seq is the broker's
order, so this falls back to what the broker saw; the loop always outputs
one item per step, so it terminates, never recurses, and returns a
permutation.

Every key ends in every field of the item before ``index``, so ``index`` (the
position in the input) only separates items identical in all eight fields:
the result is a function of the set of items.

Cost: O(n log n).  Readiness by seq is a prefix condition: with the seqs
present sorted and a pointer to the first one not yet output (the *frontier*
F), m is seq-ready iff ``m.after_seq < F``; items sorted by after_seq are
released as F advances.  Per-(sender, device) chains sorted by local_id are
released one local-id group at a time.  A heap of ready items per sender and
a heap of senders pick the next item.
"""

from __future__ import annotations

import heapq
from typing import Sequence

__all__ = ["interleave"]

_MIN = -(1 << 63)
_MAX = (1 << 63) - 1
_UMAX = (1 << 64) - 1

_SHAPE = "interleave items must be 8-tuples (sender, device, local_id, after_seq, seq, client_time, server_time, msg_id)"

Item = tuple[str, str, int, int, int, int, int, bytes]


def _check(item: object) -> Item:
    # Identical validation in both backends, checked in the same order: same
    # exception type and message for the same bad input (the differential
    # test feeds them garbage).
    if not isinstance(item, tuple) or len(item) != 8:
        raise TypeError(_SHAPE)
    sender, device, local_id, after_seq, seq, client_time, server_time, msg_id = item
    if not isinstance(sender, str) or not isinstance(device, str):
        raise TypeError("sender and device must be str")
    if (
        type(local_id) is not int
        or type(after_seq) is not int
        or type(seq) is not int
        or type(client_time) is not int
        or type(server_time) is not int
    ):
        raise TypeError("local_id, after_seq, seq, client_time and server_time must be int")
    if not isinstance(msg_id, bytes):
        raise TypeError("msg_id must be bytes")
    if not (0 <= local_id <= _UMAX and 0 <= after_seq <= _UMAX and 0 <= seq <= _UMAX):
        raise ValueError("local_id, after_seq and seq must fit in an unsigned 64-bit integer")
    if not (_MIN <= client_time <= _MAX and _MIN <= server_time <= _MAX):
        raise ValueError("times must fit in a signed 64-bit integer")
    return item


def interleave(items: Sequence[Item]) -> list[int]:
    """Indices of ``items`` in display order (the rule: module docstring).

    ``items``: ``(sender, device, local_id, after_seq, seq, client_time,
    server_time, msg_id)`` tuples; ``local_id``, ``after_seq``, ``seq`` in
    0..2**64-1 (seq 0: no seq yet; after_seq 0: nothing seen), times in µs,
    signed 64-bit.  Raises TypeError for a wrong shape or type, ValueError
    for a number out of range.
    """
    recs = [_check(item) for item in items]
    n = len(recs)
    if n == 0:
        return []

    # Seq frontier: item indices with a seq, by seq; `fp` -> first not output.
    by_seq = sorted((i for i in range(n) if recs[i][4] > 0), key=lambda i: (recs[i][4], i))
    by_after = sorted(range(n), key=lambda i: (recs[i][3], i))
    # Chains: per (sender, device), by local_id; a group = one local_id.
    by_chain = sorted(range(n), key=lambda i: (recs[i][0], recs[i][1], recs[i][2], i))

    group_of = [0] * n
    g_start: list[int] = []  # group -> its first position in by_chain
    g_left: list[int] = []  # group -> members not yet output
    g_next: list[int] = []  # group -> next group of the same chain, or -1
    g_chain: list[int] = []  # group -> first group of its chain (the chain id)
    chain_cur: dict[int, int] = {}  # chain id -> group whose turn it is
    prev = None
    for p, i in enumerate(by_chain):
        r = recs[i]
        key = (r[0], r[1], r[2])
        if key != prev:
            same_chain = prev is not None and prev[0] == r[0] and prev[1] == r[1]
            g = len(g_start)
            if same_chain:
                g_next[g - 1] = g
                g_chain.append(g_chain[g - 1])
            else:
                g_chain.append(g)
                chain_cur[g] = g
            g_start.append(p)
            g_left.append(0)
            g_next.append(-1)
            prev = key
        group_of[i] = len(g_start) - 1
        g_left[-1] += 1

    done = [False] * n
    pushed = [False] * n
    seq_ok = [False] * n
    chain_ok = [chain_cur.get(group_of[i]) == group_of[i] for i in range(n)]
    heaps: dict[str, list[tuple[int, int, bytes, str, int, int, int, int]]] = {}
    senders: list[tuple[int, str, bytes, int]] = []  # lazy: stale entries skipped

    def try_push(i: int) -> None:
        if done[i] or pushed[i] or not (seq_ok[i] and chain_ok[i]):
            return
        pushed[i] = True
        sender, device, local_id, after_seq, seq, ct, st, mid = recs[i]
        h = heaps.get(sender)
        if h is None:
            heaps[sender] = h = []
        key = (ct, st, mid, device, local_id, seq, after_seq, i)
        heapq.heappush(h, key)
        if h[0] is key:  # the sender's candidate changed
            heapq.heappush(senders, (st, sender, mid, i))

    fp = 0
    ap = 0

    def release_seq() -> None:
        # Advance the frontier F past output seqs; release every item whose
        # after_seq is now below F (all seqs <= after_seq present are output).
        nonlocal fp, ap
        while fp < len(by_seq) and done[by_seq[fp]]:
            fp += 1
        frontier = recs[by_seq[fp]][4] if fp < len(by_seq) else _UMAX + 1
        while ap < n and recs[by_after[ap]][3] < frontier:
            i = by_after[ap]
            seq_ok[i] = True
            try_push(i)
            ap += 1

    out: list[int] = []

    def emit(i: int) -> None:
        done[i] = True
        out.append(i)
        g = group_of[i]
        g_left[g] -= 1
        c = g_chain[g]
        # The chain's turn moves on once its current local_id group is all
        # output (groups already emptied by the cycle breaker are skipped).
        while g_left[chain_cur[c]] == 0 and g_next[chain_cur[c]] != -1:
            cur = chain_cur[c] = g_next[chain_cur[c]]
            end = g_start[cur + 1] if cur + 1 < len(g_start) else n  # groups are contiguous
            for p in range(g_start[cur], end):
                j = by_chain[p]
                chain_ok[j] = True
                try_push(j)
        release_seq()

    release_seq()
    by_force: list[int] = []  # cycle-breaker order, sorted on first need
    fq = 0
    while len(out) < n:
        while senders:
            st, sender, mid, i = senders[0]
            h = heaps[sender]
            if done[i] or h[0][-1] != i:
                heapq.heappop(senders)  # stale: no longer the sender's candidate
                continue
            break
        if senders:
            heapq.heappop(senders)
            heapq.heappop(h)
            if h:
                top = h[0]
                heapq.heappush(senders, (top[1], sender, top[2], top[-1]))
            emit(i)
        else:
            # Nothing ready, items remain: a cycle.  Every sender heap is
            # empty here (each non-empty one has a live entry in `senders`).
            if not by_force:
                by_force = sorted(
                    range(n),
                    key=lambda i: (recs[i][4], recs[i][6], recs[i][0], recs[i][7], recs[i][1], recs[i][2], recs[i][3], recs[i][5], i),
                )
            while done[by_force[fq]]:
                fq += 1
            emit(by_force[fq])
    return out
