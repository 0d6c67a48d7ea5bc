"""The adaptive heartbeat (pimcore.heartbeat, ClientConfig.adaptive_heartbeat):
the tuner on its own, the sans-IO session with explicit ``now``, and the SDK
against a broker behind a proxy that drops idle connections silently, under
trio's autojump clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio
import trio.testing
import time

from pimcore import frames as F
from pimcore.client import ClientConfig, Connected, Disconnected, open_client
from pimcore.client_session import ClientSession, SessionState
from pimcore.codec import Decoder, encode_frame
from pimcore.core import Limits
from pimcore.heartbeat import HeartbeatTuner
from pimcore.store import MemoryStore
from pimcore.testing.chaos import ChaosConfig, open_chaos_proxy

from _net import server_config, serving, token

S = 1_000_000
T0 = 1_700_000_000 * S


# ------------------------------------------------------------ the tuner


def test_the_tuner_starts_at_the_ceiling_and_stays_there_when_it_survives() -> None:
    t = HeartbeatTuner(5 * S)
    assert t.interval(60 * S) == 60 * S and not t.settled(60 * S)
    t.survived(60 * S, 60 * S)
    t.survived(60 * S, 60 * S)
    assert t.interval(60 * S) == 60 * S and t.settled(60 * S) and t.good == 60 * S


def test_the_tuner_backs_off_probes_upward_and_settles_below_the_nat_timeout() -> None:
    nat, ceiling = 23 * S, 120 * S
    t = HeartbeatTuner(5 * S)
    deaths = pings = 0
    for _ in range(200):
        i = t.interval(ceiling)
        pings += 1
        if i >= nat:
            deaths += 1
            t.died(i, ceiling)
        else:
            t.survived(i, ceiling)
        if t.settled(ceiling):
            break
    i = t.interval(ceiling)
    assert t.settled(ceiling) and t.good == i and t.bad is not None
    assert i < nat <= t.bad and i >= nat * 0.85  # the longest that lives, within precision
    assert deaths <= 5 and pings < 40
    for _ in range(20):  # settled: it stays
        t.survived(i, ceiling)
    assert t.interval(ceiling) == i


def test_the_tuner_ignores_short_silences_and_relearns_when_the_network_gets_worse() -> None:
    t = HeartbeatTuner(1 * S)
    t.died(10 * S, 60 * S)  # a death after 10 s of a 60 s interval: not an idle timeout
    assert t.interval(60 * S) == 60 * S and t.bad is None
    t.died(60 * S, 60 * S)
    assert t.interval(60 * S) == 30 * S and t.bad == 60 * S
    t.survived(5 * S, 60 * S)  # a Ping after 5 s of silence proves nothing about 30 s
    t.survived(30 * S, 60 * S)
    t.survived(30 * S, 60 * S)
    assert t.good == 30 * S and t.interval(60 * S) == 45 * S  # halfway to the bad one
    t.died(45 * S, 60 * S)
    assert t.interval(60 * S) == 30 * S  # back to the good one
    t.died(30 * S, 60 * S)  # the network got worse: 30 s is not good any more
    assert t.good is None and t.interval(60 * S) == 15 * S
    assert t.interval(2 * S) == 2 * S and t.interval(S // 2) == S // 2  # never above the ceiling


@pytest.mark.parametrize("kw", [{"floor": 0}, {"floor": 1.5}, {"confirmations": 0}, {"precision": 1.0}])
def test_the_tuner_rejects_nonsense(kw: dict) -> None:
    args = {"floor": S, **kw}
    with pytest.raises(ValueError):
        HeartbeatTuner(args.pop("floor"), **args)


# ------------------------------------------------------------ the session, sans-IO


def _frames(data: bytes) -> list:
    d = Decoder(1 << 20)
    d.feed(data)
    return list(d)


def _connected(s: ClientSession, now: int, heartbeat_ms: int) -> None:
    s.connection_made(now, b"t")
    login, req = _frames(s.data_to_send())
    ack = F.LoginAck("alice", "phone", now, 0, 0, False, 1 << 20, 1 << 16, 8, heartbeat_ms, 0, b"e" * 16, False)
    s.receive_data(encode_frame(ack) + encode_frame(F.CalibrateResp(req.client_time, now)), now)
    assert s.state is SessionState.ACTIVE
    s.data_to_send()


@pytest.mark.parametrize("interval_s", [1, 4, 30])
def test_a_dead_link_is_detected_within_two_intervals(interval_s: int) -> None:
    cfg = ClientConfig(time_samples=1, ack_timeout=5.0, heartbeat_floor=0.5, compression=False)
    s = ClientSession("phone", cfg, seed=1)
    _connected(s, T0, interval_s * 1000)
    assert s.heartbeat_interval == interval_s * S
    # The last traffic was at T0; the link dies right after it.  Drive the
    # timers exactly as a driver would.
    now = T0
    while s.state is SessionState.ACTIVE:
        now = s.next_deadline()
        assert now is not None
        s.handle_timer(now)
        s.data_to_send()
    assert now - T0 <= 2 * interval_s * S
    assert "no Pong" in (s.last_disconnect.reason if s.last_disconnect else "")


def test_a_pong_after_a_full_silent_interval_confirms_it_and_a_lost_one_backs_off() -> None:
    cfg = ClientConfig(time_samples=1, ack_timeout=2.0, heartbeat_floor=1.0, compression=False)
    s = ClientSession("phone", cfg, seed=1)
    _connected(s, T0, 8000)
    now = T0
    for _ in range(2):  # two answered idle Pings at 8 s: the broker's 8 s is fine
        now = s.next_deadline()
        s.handle_timer(now)
        [ping] = _frames(s.data_to_send())
        assert type(ping) is F.Ping
        s.receive_data(encode_frame(F.Pong(ping.nonce)), now + 1000)
    assert s.heartbeat_tuner.settled(8 * S) and s.heartbeat_interval == 8 * S
    # A new network (a reconnect) where 8 s of silence kills the mapping.
    s.connection_lost(now + 2)
    t = now + 10 * S
    _connected(s, t, 8000)
    s.handle_timer(t + 8 * S)
    assert [type(f) for f in _frames(s.data_to_send())] == [F.Ping]
    s.handle_timer(t + 10 * S)  # ack_timeout (2 s) without a Pong
    assert s.state is SessionState.DISCONNECTED and s.heartbeat_interval == 4 * S


def test_adaptive_off_keeps_the_brokers_interval() -> None:
    cfg = ClientConfig(time_samples=1, ack_timeout=2.0, adaptive_heartbeat=False, compression=False)
    s = ClientSession("phone", cfg, seed=1)
    _connected(s, T0, 8000)
    s.handle_timer(T0 + 8 * S)
    s.data_to_send()
    s.handle_timer(T0 + 10 * S)
    assert s.state is SessionState.DISCONNECTED and s.heartbeat_interval == 8 * S and s.heartbeat_tuner is None


# ------------------------------------------------------------ the SDK through a NAT-like proxy


async def test_the_sdk_learns_the_nat_idle_timeout_and_then_stays_connected(autojump_clock: trio.testing.MockClock) -> None:
    nat = 20.0  # the proxy drops connections idle longer than this, silently
    cfg = server_config(limits=Limits(heartbeat_ms=120_000), idle_timeout=1000.0)
    client_cfg = ClientConfig(
        ack_timeout=3.0, send_timeout=60.0, connect_timeout=10.0, backoff_initial=0.5, backoff_max=2.0,
        heartbeat_floor=2.0, compression=False,
    )
    events: list[tuple[float, object]] = []
    with trio.fail_after(3600):
        async with serving(MemoryStore(), cfg) as srv:
            async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port, ChaosConfig(idle_timeout=nat)) as proxy:
                # The session's clock is trio's (virtual) one, like the proxy's and the broker's.
                clock = lambda: T0 + int(trio.current_time() * S)  # noqa: E731
                url = f"tcp://127.0.0.1:{proxy.port}"
                async with open_client(url, token("alice"), "phone", config=client_cfg, clock=clock) as c:
                    session = c._session  # type: ignore[attr-defined]
                    tuner = session.heartbeat_tuner

                    async def watch() -> None:
                        async for ev in c.events():
                            events.append((trio.current_time(), ev))

                    async with trio.open_nursery() as n:
                        n.start_soon(watch)
                        while not tuner.settled(120 * S):
                            await trio.sleep(1)
                        learned = session.heartbeat_interval
                        settled_at = trio.current_time()
                        drops = proxy.statistics().idle_drops
                        await trio.sleep(1800)  # half an hour idle at the learned interval
                        n.cancel_scope.cancel()
    assert 0.85 * nat * S <= learned < nat * S  # the longest interval that lives, within precision
    assert tuner.bad is not None and tuner.bad >= nat * S
    assert proxy.statistics().idle_drops == drops  # no connection died after settling
    assert not [ev for t, ev in events if t > settled_at and isinstance(ev, Disconnected)]
    deaths = [ev for _, ev in events if isinstance(ev, Disconnected)]
    assert 1 <= len(deaths) <= 6 and all("no Pong" in ev.reason for ev in deaths)
    assert sum(isinstance(ev, Connected) for _, ev in events) == len(deaths) + 1


# ------------------------------------------------------------ a dead way up, a live way down


class _HalfDeadProxy:
    """A loopback TCP proxy whose client -> broker direction can be cut
    silently (:meth:`cut`: every byte the client sends from then on is read
    and dropped, no FIN, no RST) while broker -> client keeps flowing: a
    half-broken route.  Connections made after the cut are relayed whole."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._live: list[list[bool]] = []  # per connection: [up direction alive]

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        for up in self._live:
            up[0] = False

    async def _handle(self, down: trio.SocketStream) -> None:
        up_alive = [True]
        self._live.append(up_alive)
        async with down, await trio.open_tcp_stream("127.0.0.1", self.target_port) as up:

            async with trio.open_nursery() as n:

                async def pump(src: trio.SocketStream, dst: trio.SocketStream, alive: list[bool]) -> None:
                    try:
                        while data := await src.receive_some(65536):
                            if alive[0]:
                                await dst.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    n.cancel_scope.cancel()  # one end is gone: so is the relay

                n.start_soon(pump, down, up, up_alive)
                n.start_soon(pump, up, down, [True])


async def test_a_dead_uplink_is_found_while_the_broker_keeps_pushing(autojump_clock: trio.testing.MockClock) -> None:
    # Alice's way up dies silently while bob keeps sending: pushes keep
    # arriving, her acks vanish.  Before, any frame answered her Ping, so
    # nothing noticed it until the broker's idle timeout (here 1000 s); now her
    # Ping needs its Pong: Disconnected within two intervals of the cut, a new
    # connection, and the messages flow again.
    from pimcore.client_session import NO_HEARTBEAT_ANSWER

    hb = 10.0
    cfg = server_config(limits=Limits(heartbeat_ms=int(hb * 1000)), idle_timeout=1000.0)
    client_cfg = ClientConfig(
        ack_timeout=3.0, send_timeout=60.0, connect_timeout=10.0, backoff_initial=0.5, backoff_max=2.0,
        compression=False, adaptive_heartbeat=False,
    )
    # One clock for the broker and both clients, on trio's (virtual) time:
    # the client tells the messages stored after its Ping by their server
    # times.  (It starts at the wall clock: the tokens' times are real.)
    w0 = time.time_ns() // 1000 - int(trio.current_time() * S)
    clock = lambda: w0 + int(trio.current_time() * S)  # noqa: E731
    events: list[tuple[float, object]] = []
    with trio.fail_after(600):
        async with serving(MemoryStore(), cfg, clock=clock) as srv, trio.open_nursery() as outer:
            proxy = _HalfDeadProxy(srv.endpoints[0].port)
            await outer.start(proxy.serve)
            url = f"tcp://127.0.0.1:{proxy.port}"
            async with open_client(url, token("alice"), "phone", config=client_cfg, clock=clock) as a, \
                    open_client(srv.url(), token("bob"), "laptop", config=client_cfg, clock=clock) as b:
                conv = "d:alice:bob"
                got = trio.Event()
                received: list[int] = []

                async def watch() -> None:
                    nonlocal got
                    async for ev in a.events():
                        events.append((trio.current_time(), ev))
                        if type(ev).__name__ == "MessageReceived":
                            received.append(ev.message.seq)  # type: ignore[attr-defined]
                            got.set()

                async def pusher() -> None:
                    i = 0
                    while True:
                        i += 1
                        await b.send(conv, b"%d" % i)
                        await trio.sleep(1.0)  # ten pushes per heartbeat interval

                async with trio.open_nursery() as n:
                    n.start_soon(watch)
                    n.start_soon(pusher)
                    while len(received) < 3:
                        got = trio.Event()
                        await got.wait()
                    proxy.cut()
                    cut_at = trio.current_time()
                    while not any(isinstance(ev, Disconnected) for _, ev in events):
                        await trio.sleep(0.5)
                    [(dead_at, dead)] = [(t, ev) for t, ev in events if isinstance(ev, Disconnected)]
                    assert dead.code is None and dead.reason == NO_HEARTBEAT_ANSWER  # type: ignore[attr-defined]
                    # The next Ping within an interval of the cut; messages stored within
                    # ack_timeout after it may be ahead of its Pong (another interval each).
                    assert dead_at - cut_at <= 2 * hb + client_cfg.ack_timeout + 1.0  # not the broker's idle timeout (1000 s)
                    pushed_while_cut = [t for t, ev in events if cut_at < t < dead_at and type(ev).__name__ == "MessageReceived"]
                    assert len(pushed_while_cut) >= 5  # the way down kept working all along
                    # A new connection: what bob sends keeps arriving, nothing lost.
                    upto = max(received)
                    while max(received) < upto + 3:
                        await trio.sleep(0.5)
                    assert sorted(set(received)) == list(range(1, max(received) + 1))
                    assert sum(isinstance(ev, Connected) for _, ev in events) == 2
                    n.cancel_scope.cancel()
            outer.cancel_scope.cancel()
