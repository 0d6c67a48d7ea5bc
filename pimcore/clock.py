"""The broker's hybrid logical clock (HLC).

Server time must never go backwards -- not when NTP steps the wall clock back,
not across a restart -- because it is half of the display order and the first
8 bytes of every message id.  The clock keeps the last value it issued and:

* ``tick(wall)`` returns ``wall`` if the wall clock is ahead of everything
  issued so far, else ``last + 1``.  Every call returns a value strictly greater
  than the previous one, so server times are unique per broker.
* ``observe(t)`` folds in a time seen elsewhere (a stored message after a
  restart, or another node's stamp in a cluster), so later ticks exceed it.

Values are microseconds since the Unix epoch.  The logical part of a classic
HLC (l, c) is folded into the low digits: when the wall clock stalls or steps
back the clock advances by 1 µs per event, which keeps the value both
comparable with wall time and a plain 64-bit integer on the wire.  Drift from
the wall clock is bounded by the number of events issued while it lags, and is
visible as :meth:`drift`.

Sans-IO: the clock never reads the time; ``wall`` is always passed in.  The
hosts' clocks that do read it are here too: :class:`WallClock`, the served
broker's default ``now``, which tells the core when the wall clock is stepped.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

__all__ = ["HybridClock", "WallClock", "elapsed_ns"]

_MAX = (1 << 63) - 1


class HybridClock:
    __slots__ = ("_last",)

    def __init__(self, last: int = 0) -> None:
        if last < 0:
            raise ValueError("clock value must be >= 0")
        self._last = last

    @property
    def last(self) -> int:
        """The last value issued or observed."""
        return self._last

    def tick(self, wall: int) -> int:
        """A new timestamp, strictly greater than every earlier one."""
        last = self._last
        t = wall if wall > last else last + 1
        if t > _MAX:
            raise OverflowError("hybrid clock exhausted the 63-bit range")
        self._last = t
        return t

    def now(self, wall: int) -> int:
        """The current time without issuing a timestamp (for calibration): never
        less than anything issued, so a client calibrating against it never
        sees the server go backwards either."""
        return wall if wall > self._last else self._last

    def observe(self, seen: int) -> None:
        """Make every later tick greater than ``seen``."""
        if seen > self._last:
            self._last = seen

    def drift(self, wall: int) -> int:
        """How far (µs) the clock runs ahead of ``wall`` (0 when it does not)."""
        return max(0, self._last - wall)

    def __repr__(self) -> str:
        return f"HybridClock(last={self._last})"


# The elapsed-time source of the hosts' clocks: CLOCK_BOOTTIME where there is
# one (Linux: monotonic, never stepped, and it keeps counting while the
# machine is suspended, as the wall clock does), else time.monotonic_ns.
if hasattr(time, "CLOCK_BOOTTIME"):
    _BOOTTIME = time.CLOCK_BOOTTIME

    def elapsed_ns() -> int:
        """ns of a clock that is never stepped (CLOCK_BOOTTIME on Linux)."""
        return time.clock_gettime_ns(_BOOTTIME)

else:  # pragma: no cover - not Linux
    elapsed_ns = time.monotonic_ns


class WallClock:
    """The served broker's default clock: wall-clock µs since the epoch, read
    afresh at each call, that notices when the wall clock is *stepped*.

    Why both: stamps must follow the wall clock (they are display times and
    the first bytes of message ids, and an operator fixing a wrong clock
    expects new messages at the right time), while the core's durations
    (idle timeouts, rate buckets, ack_delay) must keep their real length.
    So each call compares how far the wall clock moved since the last call
    with how far a clock that never steps moved (:func:`elapsed_ns`); a
    difference beyond ``threshold`` µs is a step, and ``on_step(step_µs)``
    is called with it before the new time is returned.  The served broker
    sets ``on_step`` to :meth:`pimcore.core.Broker.clock_stepped`.

    A slew (NTP's gradual correction, at most 500 ppm) stays below the
    threshold between calls; if calls are far enough apart for a slew to
    pass it, the "step" it reports is small and harmless (durations keep
    their real length either way).  Not thread-safe: one host thread."""

    __slots__ = ("_wall", "_elapsed", "threshold", "on_step")

    def __init__(self, threshold: int = 100_000, on_step: Optional[Callable[[int], None]] = None) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0 µs, got {threshold}")
        self.threshold = threshold
        self.on_step = on_step
        self._elapsed = elapsed_ns()
        self._wall = time.time_ns()

    def __call__(self) -> int:
        wall = time.time_ns()
        elapsed = elapsed_ns()
        step = ((wall - self._wall) - (elapsed - self._elapsed)) // 1000
        self._wall, self._elapsed = wall, elapsed
        if (step > self.threshold or step < -self.threshold) and self.on_step is not None:
            self.on_step(step)
        return wall // 1000

    def __repr__(self) -> str:
        return f"<WallClock threshold={self.threshold} µs>"
