"""A store with injected latency, for proving the asynchronous store path.

:class:`LatencyStore` wraps a synchronous :class:`~pimcore.store.base.Store`
(memory or LMDB) as an :class:`~pimcore.store.base.AsyncStore`: every request
sleeps a random time (seeded, so a failing run can be replayed) before it is
run on the wrapped store.  Reads issued together therefore complete out of
order, as they would against a networked store; writes run in the order they
are awaited (the core keeps one in flight).  ``fail_reads``/``fail_writes``
make requests raise :class:`StoreError` after their latency, with nothing
applied.

It needs trio (``trio.sleep``): run it under ``trio.testing.MockClock`` with
``autojump_threshold=0`` and the latency costs no wall-clock time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import trio

from ..errors import StoreError
from ..store.base import AsyncStore, Result, Store, StoreRequest

__all__ = ["LatencyStore", "LatencyStatistics"]


@dataclass(frozen=True, slots=True)
class LatencyStatistics:
    reads: int  # read requests completed
    writes: int  # write requests completed
    reordered: int  # reads that completed before a read issued earlier
    failed: int  # requests failed on purpose


class LatencyStore(AsyncStore):
    """``inner`` behind a random delay per request.

    ``read_latency`` and ``write_latency`` are (min, max) seconds, drawn
    uniformly from a ``random.Random(seed)``.
    """

    def __init__(
        self,
        inner: Store,
        *,
        read_latency: tuple[float, float] = (0.001, 0.050),
        write_latency: tuple[float, float] = (0.001, 0.010),
        seed: Optional[int] = 0,
    ) -> None:
        for lo, hi in (read_latency, write_latency):
            if not 0 <= lo <= hi:
                raise ValueError("latency ranges must be (min, max) with 0 <= min <= max")
        self.inner = inner
        self.read_latency = read_latency
        self.write_latency = write_latency
        self.fail_reads = False
        self.fail_writes = False
        self._rng = random.Random(seed)
        self._issued = 0
        self._done_upto = 0  # highest issue number of a completed read
        self._reads = self._writes = self._reordered = self._failed = 0

    async def node_id(self) -> bytes:
        return self.inner.node_id()

    async def epoch(self) -> bytes:
        return self.inner.epoch()

    async def epochs(self) -> tuple[bytes, ...]:
        return self.inner.epochs()

    async def last_server_time(self) -> int:
        return self.inner.last_server_time()

    async def execute(self, request: StoreRequest) -> tuple[Result, ...]:
        lo, hi = self.write_latency if request.write else self.read_latency
        self._issued += 1
        order = self._issued
        await trio.sleep(self._rng.uniform(lo, hi))
        if (self.fail_writes if request.write else self.fail_reads):
            self._failed += 1
            raise StoreError(f"injected failure of request {request.request_id}")
        results = self.inner.execute(request)
        if request.write:
            self._writes += 1
        else:
            self._reads += 1
            if order < self._done_upto:
                self._reordered += 1
            self._done_upto = max(self._done_upto, order)
        return results

    async def conversation_exists(self, conv: str) -> bool:
        return self.inner.conversation_exists(conv)

    async def members(self, conv: str) -> tuple[str, ...]:
        return self.inner.members(conv)

    async def history_visible(self, conv: str) -> bool:
        return self.inner.history_visible(conv)

    async def aclose(self) -> None:
        self.inner.close()

    def statistics(self) -> LatencyStatistics:
        return LatencyStatistics(self._reads, self._writes, self._reordered, self._failed)
