"""Adaptive heartbeat: learn the longest idle interval a network lets a
connection live (sans-IO, no clock; times in µs).

NATs, carrier gateways and firewalls drop a TCP mapping that carried nothing
for a while (from ~30 s on some carriers to 30 min on home routers), and they
do it silently: no RST, the next packet just vanishes.  A client that pings
too often wastes battery and radio wake-ups; one that pings too rarely loses
its connection whenever the user is idle.  :class:`HeartbeatTuner` finds the
interval between those, the way mobile IM stacks do:

* It starts at the broker's interval (``ceiling``, LoginAck.heartbeat_ms):
  the broker's idle timeout allows nothing longer, and on a good network that
  is already the answer.
* When a connection dies idle (a Ping sent after ``interval`` of silence got
  no answer), that interval is *bad*: it backs off to the longest interval
  confirmed good, or half the bad one if none is known yet.
* An interval is *confirmed* after ``confirmations`` Pings in a row, each after
  a full interval of silence, were answered.  Then it probes upward: halfway
  to the smallest bad interval (a binary search), or doubling while none is
  known, never above the ceiling.
* It *settles* on the longest good interval once the gap to the smallest bad
  one is within ``precision`` (relative) or half the floor, whichever is larger.

State lives across connections (one tuner per client): what a network taught
is not forgotten at the next reconnect.  Invariants: ``floor <= interval <=
ceiling``; ``good < bad`` whenever both are known.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["HeartbeatTuner"]


class HeartbeatTuner:
    """Learns the heartbeat interval (module docstring).

    ``floor`` (µs, > 0): never ping more often than this.  ``confirmations``
    (>= 1): answered idle Pings in a row that make an interval good.
    ``precision`` (0..1): settle when bad - good <= precision * good.  Raises
    ValueError for values out of range."""

    __slots__ = ("floor", "confirmations", "precision", "_cur", "_good", "_bad", "_streak")

    def __init__(self, floor: int, *, confirmations: int = 2, precision: float = 0.1) -> None:
        if type(floor) is not int or floor <= 0:
            raise ValueError(f"floor must be an int > 0 (µs), got {floor!r}")
        if type(confirmations) is not int or confirmations < 1:
            raise ValueError(f"confirmations must be an int >= 1, got {confirmations!r}")
        if not 0.0 < precision < 1.0:
            raise ValueError(f"precision must be in (0, 1), got {precision!r}")
        self.floor = floor
        self.confirmations = confirmations
        self.precision = precision
        self._cur: Optional[int] = None  # None: the ceiling (nothing learned yet)
        self._good: Optional[int] = None  # longest interval confirmed to survive
        self._bad: Optional[int] = None  # shortest interval a connection died idle at
        self._streak = 0  # answered idle Pings in a row at the current interval

    @property
    def good(self) -> Optional[int]:
        """The longest interval confirmed to keep a connection alive (µs), or None."""
        return self._good

    @property
    def bad(self) -> Optional[int]:
        """The shortest interval a connection died idle at (µs), or None."""
        return self._bad

    def interval(self, ceiling: int) -> int:
        """The interval to ping at now (µs): within [floor, ceiling]
        (``ceiling`` alone when it is below the floor)."""
        cur = ceiling if self._cur is None else self._cur
        return max(min(cur, ceiling), min(self.floor, ceiling))

    def settled(self, ceiling: int) -> bool:
        """True once probing is over: the interval is the ceiling and confirmed,
        or the longest good interval with the bad one within precision."""
        cur = self.interval(ceiling)
        if self._good is None or cur != min(self._good, ceiling):
            return False
        return cur == ceiling or (self._bad is not None and self._bad - self._good <= self._slack())

    def _slack(self) -> int:
        assert self._good is not None
        return max(int(self._good * self.precision), self.floor // 2)

    def survived(self, idle: int, ceiling: int) -> None:
        """A Ping sent after ``idle`` µs of silence (nothing sent or received)
        was answered.  Counts only if ``idle`` was (nearly) the full current
        interval: a shorter silence proves nothing about this one."""
        cur = self.interval(ceiling)
        if idle < cur * 9 // 10:
            return
        self._streak += 1
        if self._streak < self.confirmations:
            return
        self._streak = 0
        self._good = cur if self._good is None else max(self._good, cur)
        if self._bad is not None and self._bad <= self._good:
            self._bad = None  # the network got better: a stale bad bound
        if cur >= ceiling:
            self._cur = ceiling  # nothing longer is allowed: settled at the top
        elif self._bad is None:
            self._cur = min(ceiling, cur * 2)  # probe upward
        elif self._bad - self._good <= self._slack():
            self._cur = self._good  # settled
        else:
            self._cur = (self._good + self._bad) // 2  # binary search between good and bad

    def died(self, idle: int, ceiling: int) -> None:
        """A connection died after ``idle`` µs of silence (its Ping went
        unanswered).  A death after much less than the current interval is
        not an idle timeout (a broken route, a crash) and changes nothing."""
        cur = self.interval(ceiling)
        if idle < cur * 9 // 10:
            return
        self._streak = 0
        self._bad = cur if self._bad is None else min(self._bad, cur)
        if self._good is not None and self._good >= self._bad:
            self._good = None  # the network got worse: what was good is not
        if self._good is not None:
            self._cur = self._good
        else:
            self._cur = max(self.floor, cur // 2)

    def __repr__(self) -> str:
        return f"<HeartbeatTuner cur={self._cur} good={self._good} bad={self._bad} streak={self._streak}>"
