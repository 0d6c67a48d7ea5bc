"""The SDK against the broker's back-pressure: rate limit, window, a failing store.

Two harnesses, neither timed by the wall clock:

* :class:`Sim` runs the sans-IO client session against the sans-IO core
  (:class:`pimcore.core.Broker`, its store requests run inline by
  :func:`~pimcore.core.drain` on a MemoryStore) on one simulated µs clock,
  with a fixed one-way latency.  Every limit the served broker has is the
  core's (token bucket, window, strike limit), so "how long does a burst
  take" is a number of simulated seconds, exact and repeatable.
* The end-to-end tests run the trio client against a served broker over
  loopback under trio's ``autojump_clock``, both reading trio's clock, so
  holds and backoffs cost virtual time only.
"""

from __future__ import annotations

import errno
import heapq
import os
import time
from dataclasses import replace
from typing import Callable, Optional

import pytest
import trio
import trio.testing

from pimcore.client import SendsResumed, SendsStalled
from pimcore.client_session import ClientConfig, ClientSession, SendCompleted, SessionState
from pimcore.core import Broker, CloseConnection, Identity, Limits, SendData, drain
from pimcore.errors import ErrorCode, StoreError
from pimcore.net.server import DEFAULT_BROKER_CONFIG
from pimcore.store import MemoryStore, direct_conversation

from pimcore.auth import JwtAuthenticator
from pimcore.client import open_client
from pimcore.net import open_broker_server

from _net import SECRET, server_config, token

MS = 1_000
S = 1_000_000
T0 = 1_700_000_000 * S
AB = direct_conversation("alice", "bob")
#: What `pimcore serve` announces: window 256, 2,000 sends/s, burst 512.
SERVE_LIMITS = DEFAULT_BROKER_CONFIG.limits


class Sim:
    """One client session and the core on a simulated clock (µs).

    Bytes take ``latency`` µs each way; the broker answers at once (its store
    requests run inline).  ``closes`` records every CloseConnection of the
    broker: a client that keeps sending into refusals is closed by the
    strike limit, and these tests assert that never happens."""

    CONN = 1

    def __init__(self, limits: Limits = SERVE_LIMITS, *, latency: int = 500, config: ClientConfig = ClientConfig(send_timeout=600.0)) -> None:
        self.store = MemoryStore()
        self.broker = Broker(replace(DEFAULT_BROKER_CONFIG, limits=limits), node_id=self.store.node_id(), last_server_time=self.store.last_server_time())
        self.s = ClientSession("phone", config, seed=7)
        self.latency = latency
        self.now = T0
        self.wire: list[tuple[int, int, str, bytes]] = []  # heap of (due, order, "up"|"down", bytes)
        self._order = 0
        self.closes: list[CloseConnection] = []
        self.completions: dict[int, SendCompleted] = {}
        self.events: list[object] = []
        self.fail_commits: Optional[Callable[[], bool]] = None  # True: the next commit fails (disk full)
        real = self.store.commit

        def commit(batch):  # type: ignore[no-untyped-def]
            if self.fail_commits is not None and self.fail_commits():
                raise StoreError("[Errno 28] No space left on device")
            return real(batch)

        self.store.commit = commit  # type: ignore[method-assign]

    def _put(self, direction: str, data: bytes) -> None:
        if data:
            self._order += 1
            heapq.heappush(self.wire, (self.now + self.latency, self._order, direction, data))

    def _broker_out(self, cmds: list[object]) -> None:
        for c in drain(self.broker, self.store, cmds, self.now, authenticate=lambda tok, now: Identity(tok.decode())):  # type: ignore[arg-type]
            if isinstance(c, SendData):
                self._put("down", c.data)
            elif isinstance(c, CloseConnection):
                self.closes.append(c)
                self._put("down", c.data)

    def _client_out(self) -> None:
        self._put("up", self.s.data_to_send())
        for c in self.s.completions():
            assert isinstance(c, SendCompleted) and c.local_id not in self.completions
            self.completions[c.local_id] = c
        while (ev := self.s.next_event(self.now)) is not None:
            self.events.append(ev)

    def connect(self) -> None:
        self._broker_out(self.broker.connection_made(self.CONN, self.now))
        self.s.connection_made(self.now, b"alice")
        self.run_until(lambda: self.s.state is SessionState.ACTIVE, 5 * S)

    def run_until(self, done: Callable[[], bool], limit: int) -> None:
        """Move time until ``done()`` or ``limit`` µs of simulated time passed."""
        end = self.now + limit
        self._client_out()
        while not done():
            dues = [d for d in (self.wire[0][0] if self.wire else None, self.s.next_deadline(), self.broker.next_deadline()) if d is not None]
            due = max(self.now, min(dues))
            if due > end:
                self.now = end
                return
            self.now = due
            while self.wire and self.wire[0][0] <= self.now:
                _, _, direction, data = heapq.heappop(self.wire)
                if direction == "up":
                    self._broker_out(self.broker.receive_data(self.CONN, data, self.now))
                else:
                    self.s.receive_data(data, self.now)
            self.s.handle_timer(self.now)
            self._broker_out(self.broker.handle_timer(self.now))
            self._client_out()

    def burst(self, n: int, limit: int = 120 * S) -> float:
        """``n`` sends at once; the simulated seconds until the last is answered."""
        start = self.now
        lids = [self.s.send(AB, b"m%d" % i, self.now) for i in range(n)]
        self.run_until(lambda: all(lid in self.completions for lid in lids), limit)
        assert all(lid in self.completions for lid in lids), f"{sum(lid in self.completions for lid in lids)} of {n} answered in {limit / S} s"
        assert all(self.completions[lid].error is None for lid in lids)
        # Stored in send order: seq increases with the local id (refused
        # sends are retried before the later ones are taken).
        seqs = [self.completions[lid].result.seq for lid in lids]
        assert seqs == sorted(seqs), f"{sum(a > b for a, b in zip(seqs, seqs[1:]))} seq inversions"
        return (self.now - start) / S


# ---------------------------------------------------------------- the input, simulated


@pytest.mark.parametrize("n", [1500, 5000])
def test_a_burst_completes_near_the_brokers_rate_limit(n):
    """Issue 10, item 6: 1,500 (and 5,000) concurrent sends against the limits
    of `pimcore serve`.  The bucket's 512 tokens go at once, the rest at
    2,000/s: the floor is (n - 512) / 2000 s.  The SDK used to take about
    30 s (90 s) because every refused ack of one window halved its window
    and doubled its hold, up to 10 s."""
    sim = Sim()
    sim.connect()
    took = sim.burst(n)
    floor = (n - SERVE_LIMITS.send_burst) / SERVE_LIMITS.send_rate
    assert took < floor * 1.3 + 0.1, f"{n} sends took {took:.2f} simulated s (floor {floor:.2f} s)"
    assert sim.closes == []
    st = sim.s.statistics()
    # One congestion event per window of refusals, not one per refusal:
    # every refused send is retransmitted once it may go again.
    assert 0 < st.congestion_events * 3 < st.retransmits
    assert st.connects == 1 and st.pending_sends == 0
    assert len(sim.store.history(AB, 0, n + 1)) == n


@pytest.mark.parametrize(
    "limits, n",
    [
        (Limits(window=256, send_rate=100.0, send_burst=10), 300),  # a slow bucket, a deep window
        (Limits(window=8, send_rate=2000.0, send_burst=512), 1500),  # the window binds before the bucket
        pytest.param(
            Limits(window=256, send_rate=5000.0, send_burst=1),
            1000,
            marks=pytest.mark.xfail(strict=True, reason="no burst at all: the SDK holds by the window, not by pacing; about 350/s of 5,000/s"),
        ),
        (Limits(window=512, send_rate=300.0, send_burst=1024), 3000),  # a deep window, half the strike limit
    ],
)
def test_bursts_against_other_buckets_and_windows_keep_up_and_are_never_closed(limits, n):
    """Siblings: the SDK does not know the broker's rate; it reacts to its
    refusals.  Whatever the bucket and the window, a burst completes near the
    rate, and the broker never has to close the client for ignoring its
    RATE_LIMITED answers (rate_limit_strikes: 1,024 in a row)."""
    sim = Sim(limits)
    sim.connect()
    took = sim.burst(n)
    floor = max(0.0, (n - limits.send_burst) / limits.send_rate)
    assert took < floor * 1.3 + 0.15, f"{n} sends took {took:.2f} simulated s (floor {floor:.2f} s)"
    assert sim.closes == []
    assert len(sim.store.history(AB, 0, n + 1)) == n


def test_a_disk_full_store_is_an_event_once_per_episode_and_no_send_is_lost():
    """STORE_UNAVAILABLE (the disk is full) is not back-pressure the app can
    ignore: it gets SendsStalled once when the first send is refused for it,
    SendsResumed once a send is stored again, and every send in between is
    stored exactly once (retried with the same local id, never dropped)."""
    sim = Sim()
    sim.connect()
    sim.burst(10)
    full = [True]
    sim.fail_commits = lambda: full[0]
    lids = [sim.s.send(AB, b"during %d" % i, sim.now) for i in range(50)]
    since = sim.now
    sim.run_until(lambda: False, 30 * S)
    stalled = [e for e in sim.events if isinstance(e, SendsStalled)]
    assert len(stalled) == 1, stalled
    assert stalled[0].code is ErrorCode.STORE_UNAVAILABLE and stalled[0].pending == 50 and stalled[0].since >= since
    assert not any(isinstance(e, SendsResumed) for e in sim.events)
    assert not any(lid in sim.completions for lid in lids)  # still pending, not failed
    # The retries back off (not one refusal per round trip for 30 s), but keep going.
    assert 5 <= sim.s.statistics().congestion_events <= 20
    full[0] = False
    sim.run_until(lambda: all(lid in sim.completions for lid in lids), 15 * S)
    assert all(sim.completions[lid].error is None for lid in lids)
    resumed = [e for e in sim.events if isinstance(e, SendsResumed)]
    assert len(resumed) == 1 and resumed[0].since == stalled[0].since
    assert sim.events.index(stalled[0]) < sim.events.index(resumed[0])
    assert len(sim.store.history(AB, 0, 100)) == 60
    # A second episode is reported again.
    full[0] = True
    more = sim.s.send(AB, b"again", sim.now)
    sim.run_until(lambda: False, 2 * S)
    assert len([e for e in sim.events if isinstance(e, SendsStalled)]) == 2
    full[0] = False
    sim.run_until(lambda: more in sim.completions, 15 * S)
    assert len([e for e in sim.events if isinstance(e, SendsResumed)]) == 2


# ---------------------------------------------------------------- end to end, virtual time


def _virtual_wall_clock() -> Callable[[], int]:
    """µs: the wall clock at the start, moved by trio's (virtual) clock, so
    tokens issued now are valid and every hold costs virtual time only."""
    base = time.time_ns() // 1000 - int(trio.current_time() * S)
    return lambda: base + int(trio.current_time() * S)


async def test_a_burst_through_the_served_broker_is_one_congestion_event_per_window(autojump_clock, tmp_path):
    """The issue's input end to end: one SDK client, 1,500 concurrent
    send() calls, a served broker with its default limits, over loopback.
    Broker and client both read trio's (virtual) clock, so the time asserted
    is virtual: holds, not the speed of this machine."""
    from pimcore.store import LmdbStore

    store = LmdbStore(tmp_path / "db", durability="os")
    clock = _virtual_wall_clock()
    try:
        with trio.fail_after(300):
            async with open_broker_server(store, JwtAuthenticator(SECRET), server_config(), clock=clock) as srv:
                async with open_client(srv.url(), token("alice"), "phone", config=ClientConfig(send_timeout=300.0), clock=clock) as c:
                    t0 = trio.current_time()
                    async with trio.open_nursery() as nursery:
                        for i in range(1500):
                            nursery.start_soon(c.send, AB, b"m%d" % i)
                    took = trio.current_time() - t0
                    st = c.statistics()
        # Virtual time passes only while every task waits (the holds); the
        # floor of the bucket is 0.49 s.  It used to be about 30 s.
        assert took < 1.0, f"1,500 sends took {took:.2f} virtual s"
        assert st.pending_sends == 0 and st.connects == 1
        assert 0 < st.congestion_events * 3 < st.retransmits  # one event per window, not per refusal
        assert len(store.history(AB, 0, 2000)) == 1500
    finally:
        store.close()


async def test_a_disk_full_store_surfaces_as_events_through_the_client(autojump_clock, tmp_path):
    """STORE_UNAVAILABLE end to end: the app sees SendsStalled in events(),
    its send() keeps waiting (not SendTimeout), and completes after
    SendsResumed once the disk has room again."""
    from pimcore.store import LmdbStore

    store = LmdbStore(tmp_path / "db", durability="os")
    clock = _virtual_wall_clock()
    real_commit = store.commit
    full = [False]

    def commit(batch):  # type: ignore[no-untyped-def]
        if full[0]:
            # What LmdbStore raises when the disk is full at commit.
            raise StoreError(f"LMDB error: mdb_txn_commit: {os.strerror(errno.ENOSPC)}")
        return real_commit(batch)

    store.commit = commit  # type: ignore[method-assign]
    try:
        with trio.fail_after(300):
            async with open_broker_server(store, JwtAuthenticator(SECRET), server_config(), clock=clock) as srv:
                async with open_client(srv.url(), token("alice"), "phone", config=ClientConfig(send_timeout=120.0), clock=clock) as c:
                    await c.send(AB, b"before")
                    seen: list[object] = []
                    stalled, resumed = trio.Event(), trio.Event()

                    async def watch() -> None:
                        async for ev in c.events():
                            if isinstance(ev, (SendsStalled, SendsResumed)):
                                seen.append(ev)
                                (stalled if isinstance(ev, SendsStalled) else resumed).set()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(watch)
                        full[0] = True
                        results: list[object] = []

                        async def one(i: int) -> None:
                            results.append(await c.send(AB, b"during %d" % i))

                        for i in range(5):
                            nursery.start_soon(one, i)
                        await stalled.wait()
                        await trio.sleep(30)  # the disk stays full a while: sends wait, retried
                        assert results == [] and c.statistics().pending_sends == 5
                        full[0] = False
                        await resumed.wait()
                        while len(results) < 5:
                            await trio.sleep(0.01)
                        nursery.cancel_scope.cancel()
        assert [type(e) for e in seen] == [SendsStalled, SendsResumed]
        assert seen[0].code is ErrorCode.STORE_UNAVAILABLE  # type: ignore[attr-defined]
        assert [m.payload for m in store.history(AB, 0, 10)][0] == b"before" and len(store.history(AB, 0, 10)) == 6
    finally:
        store.close()
