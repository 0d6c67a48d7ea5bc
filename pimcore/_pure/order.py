"""Display order of a conversation: the pure-Python twin of the fast path.

The seed's rule -- "one sender's messages by their local time, different
senders by server time" -- cannot be a comparator: mixing the two rules is not
transitive (a1 <_local a2, a2 <_server b1, b1 <_server a1 is possible when A's
clock is skewed), so ``sorted`` with it would depend on arrival order.  It is a
*merge* instead:

1. split the messages into one run per sender, each sorted by
   (client_time, server_time, msg_id, index)  -- the sender's own order;
2. k-way merge the runs, always taking the run whose head has the smallest
   (server_time, sender, msg_id, index).

Properties (tested): each sender's run order is kept; if every sender's local
and server order agree (synchronized clocks), the result is plain server-time
order; the result is a function of the set of messages, so every device that
holds the same messages shows the same order.  ``index`` (the position in the
input) only separates items that are identical in every other key.
"""

from __future__ import annotations

import heapq
from typing import Sequence

__all__ = ["interleave"]

_MIN = -(1 << 63)
_MAX = (1 << 63) - 1


def _check(item: object) -> tuple[str, int, int, bytes]:
    # Identical validation in both backends: same exception type for the same
    # bad input (the differential test feeds them garbage).
    if not isinstance(item, tuple) or len(item) != 4:
        raise TypeError("interleave items must be 4-tuples (sender, client_time, server_time, msg_id)")
    sender, client_time, server_time, msg_id = item
    if not isinstance(sender, str):
        raise TypeError("sender must be str")
    if type(client_time) is not int or type(server_time) is not int:
        raise TypeError("client_time and server_time must be int")
    if not isinstance(msg_id, bytes):
        raise TypeError("msg_id must be bytes")
    if not (_MIN <= client_time <= _MAX and _MIN <= server_time <= _MAX):
        raise ValueError("times must fit in a signed 64-bit integer")
    return sender, client_time, server_time, msg_id


def interleave(items: Sequence[tuple[str, int, int, bytes]]) -> list[int]:
    """Indices of ``items`` in display order.

    ``items``: ``(sender, client_time, server_time, msg_id)`` tuples.
    """
    runs: dict[str, list[tuple[int, int, bytes, int]]] = {}
    for index, item in enumerate(items):
        sender, client_time, server_time, msg_id = _check(item)
        run = runs.get(sender)
        if run is None:
            runs[sender] = run = []
        run.append((client_time, server_time, msg_id, index))

    heap: list[tuple[int, str, bytes, int, list, int]] = []
    for sender, run in runs.items():
        run.sort()
        ct, st, mid, idx = run[0]
        heap.append((st, sender, mid, idx, run, 0))
    heapq.heapify(heap)

    out: list[int] = []
    while heap:
        st, sender, mid, idx, run, at = heap[0]
        out.append(idx)
        at += 1
        if at < len(run):
            _, st, mid, idx = run[at]
            heapq.heapreplace(heap, (st, sender, mid, idx, run, at))
        else:
            heapq.heappop(heap)
    return out
