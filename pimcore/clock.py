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

Sans-IO: the clock never reads the time; ``wall`` is always passed in.
"""

from __future__ import annotations

__all__ = ["HybridClock"]

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
