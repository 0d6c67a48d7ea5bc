"""Test helpers for code built on pimcore (not imported by pimcore itself).

* :mod:`pimcore.testing.chaos` -- a trio TCP proxy that simulates a bad
  network (latency, jitter, bandwidth cap, fragmentation, stalls, resets).
* :mod:`pimcore.testing.latency` -- :class:`LatencyStore`, a store behind
  random per-request latency (an :class:`~pimcore.store.base.AsyncStore`
  whose reads complete out of order).

Names are re-exported lazily so that importing this package does not pull in
trio (a test-only dependency) until a chaos name is actually used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .chaos import ChaosConfig, ChaosProxy, ChaosStatistics, open_chaos_proxy
    from .latency import LatencyStatistics, LatencyStore

__all__ = ["ChaosConfig", "ChaosProxy", "ChaosStatistics", "open_chaos_proxy", "LatencyStore", "LatencyStatistics"]


def __getattr__(name: str) -> Any:
    if name in ("LatencyStore", "LatencyStatistics"):
        from . import latency

        return getattr(latency, name)
    if name in __all__:
        from . import chaos

        return getattr(chaos, name)
    raise AttributeError(f"module 'pimcore.testing' has no attribute {name!r}")
