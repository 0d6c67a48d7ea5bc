"""The broker's wall clock stepped while it runs (NTP, an operator, a VM
restored from a snapshot).

The core keeps every deadline and rate on the ``now`` it is given; the served
broker's default clock is the wall clock, because message stamps must follow
it.  A step used to move every deadline with it: forward, each connection not
heard from since the step was closed for idleness at the next call into the
core; backward, every send-rate bucket went negative for the length of the
step (sends refused for an hour), and idle or dead connections were kept
that long.  The served broker now tells the core the size of each step
(:meth:`pimcore.core.Broker.clock_stepped`), which moves its deadlines and
rate clocks by it, so durations keep their real length and stamps still
follow the wall clock.
"""

from __future__ import annotations

import time

import pytest
import trio

import pimcore.clock
from pimcore import frames as F
from pimcore.clock import WallClock
from pimcore.core import Limits
from pimcore.errors import CloseCode
from pimcore.store import LmdbStore, direct_conversation

from _net import RawConn, client, serving, server_config, take_messages

AB = direct_conversation("alice", "bob")
HOUR_NS = 3600 * 10**9


@pytest.fixture
def lmdb_store(tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


def _step_wall_clock(monkeypatch, by_ns: int) -> None:
    """Step ``time.time_ns`` (what the broker's default clock reads) by
    ``by_ns`` from now on.  ``time.time`` stays: tokens are checked on it."""
    real_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() + by_ns)


def test_the_wall_clock_reports_steps_not_the_passing_of_time(monkeypatch):
    wall, elapsed = [1_700_000_000 * 10**9], [5 * 10**9]
    monkeypatch.setattr(time, "time_ns", lambda: wall[0])
    monkeypatch.setattr(pimcore.clock, "elapsed_ns", lambda: elapsed[0])
    steps: list[int] = []
    clock = WallClock(threshold=100_000, on_step=steps.append)
    assert clock() == 1_700_000_000 * 10**6 and steps == []
    wall[0] += 10**9
    elapsed[0] += 10**9  # a second passes
    assert clock() == 1_700_000_001 * 10**6 and steps == []
    wall[0] += 60 * 10**6  # a slew: 60 ms ahead over a second, under the threshold
    elapsed[0] += 10**9
    wall[0] += 10**9
    assert clock() == 1_700_000_002_060_000 and steps == []
    wall[0] -= HOUR_NS  # set back an hour
    assert clock() == 1_700_000_002_060_000 - 3600 * 10**6  # the wall clock, stepped
    assert steps == [-3600 * 10**6]
    elapsed[0] += 2 * 10**9
    wall[0] += 2 * 10**9 + 5 * 60 * 10**9  # two seconds pass and a 5 min step forward
    clock()
    assert steps == [-3600 * 10**6, 300 * 10**6]
    clock.on_step = None  # no listener: just the time
    wall[0] += HOUR_NS
    assert clock() == wall[0] // 1000


async def test_a_clock_stepped_back_an_hour_does_not_stop_sends_by_the_rate_limit(lmdb_store, monkeypatch):
    cfg = server_config(limits=Limits(heartbeat_ms=15_000, send_rate=50.0, send_burst=20), idle_timeout=45.0)
    with trio.fail_after(20):
        async with serving(lmdb_store, cfg) as srv:
            async with client(srv.url(), "alice") as a, client(srv.url(), "bob") as b:
                before = await a.send(AB, b"before")
                await take_messages(b, 1)
                _step_wall_clock(monkeypatch, -HOUR_NS)
                with trio.fail_after(5):  # refused as RATE_LIMITED for an hour before the fix
                    sent = [await a.send(AB, b"after %d" % i) for i in range(3)]
                assert [s.seq for s in sent] == [2, 3, 4]
                got = await take_messages(b, 3)
                assert [m.payload for m in got] == [b"after 0", b"after 1", b"after 2"]
                # Stamps follow the stepped wall clock (the HLC never goes
                # back: it holds just above the last stamp, as before).
                assert sent[0].server_time > before.server_time


async def test_a_clock_stepped_back_an_hour_still_ends_silent_connections(lmdb_store, monkeypatch):
    cfg = server_config(limits=Limits(heartbeat_ms=100), idle_timeout=1.0)
    with trio.fail_after(20):
        async with serving(lmdb_store, cfg) as srv:
            silent = await RawConn.open(srv.endpoints[0].port)
            await silent.login("bob")
            _step_wall_clock(monkeypatch, -HOUR_NS)
            with trio.fail_after(6):  # an hour late before the fix
                close = await silent.until(F.Close)
            assert close.code == CloseCode.IDLE_TIMEOUT


async def test_a_clock_stepped_forward_does_not_end_connections_as_idle(lmdb_store, monkeypatch):
    # Five minutes: past the idle timeout, within the tokens' lifetime (a
    # token's expiry is a time of day: a step past it does end the session).
    cfg = server_config(limits=Limits(heartbeat_ms=15_000), idle_timeout=45.0)
    with trio.fail_after(20):
        async with serving(lmdb_store, cfg) as srv:
            async with client(srv.url(), "alice") as a, client(srv.url(), "bob") as b:
                before = await a.send(AB, b"before")
                await take_messages(b, 1)
                _step_wall_clock(monkeypatch, 5 * 60 * 10**9)
                # A new connection is the first call into the core after the
                # step: before the fix every connection not heard from since
                # (Alice's and Bob's) was closed with IDLE_TIMEOUT at once.
                carol = await RawConn.open(srv.endpoints[0].port)
                await carol.login("carol")
                await trio.sleep(0.3)
                after = await a.send(AB, b"after")
                [m] = await take_messages(b, 1)
                assert m.payload == b"after"
                assert after.server_time - before.server_time >= 5 * 60 * 10**6  # stamps follow the wall clock
                await trio.sleep(0.3)
                for c in (a, b):  # a close for idleness would show as a reconnect
                    assert c.connected and c.statistics().connects == 1
