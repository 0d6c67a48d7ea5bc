"""The SDK and broker on a bad network: latency with jitter, a bandwidth cap,
fragmented reads, stalls and random connection resets (pimcore.testing.chaos).

Invariants checked: every send() either returns a durable Sent or raises
SendTimeout; nothing is stored twice; every stored message reaches each
recipient exactly once, in inbox order.
"""

from __future__ import annotations

import os
import random
from collections import Counter, defaultdict

import pytest
import trio

from pimcore.client import ClientConfig, Disconnected, MessageReceived, SendTimeout, open_client
from pimcore.core import Limits
from pimcore.store import LmdbStore, direct_conversation
from pimcore.testing.chaos import ChaosConfig, open_chaos_proxy

from _net import RawConn, server_config, serving, token

USERS = ["alice", "bob", "carol", "dave"]
PER_USER = int(os.environ.get("PIMCORE_CHAOS_MESSAGES", "500"))  # 4 x 500 = 2,000 messages

CHAOTIC_CLIENT = ClientConfig(ack_timeout=1.5, send_timeout=60.0, connect_timeout=3.0, backoff_initial=0.02, backoff_max=0.5)


@pytest.fixture
def store(tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


async def test_thousands_of_messages_through_a_chaotic_network_arrive_exactly_once(store):
    seed = int(os.environ.get("PIMCORE_CHAOS_SEED") or random.SystemRandom().getrandbits(32))
    print(f"PIMCORE_CHAOS_SEED={seed}")
    store.create_group("all", USERS, 0)
    chaos = ChaosConfig(
        latency=0.002,
        jitter=0.002,
        bandwidth=4_000_000,
        chunk_size=700,  # frames arrive split across reads
        stall_probability=0.002,
        stall_duration=0.15,
        reset_probability=0.006,
        seed=seed,
    )
    rng = random.Random(seed)
    plan = {
        u: [
            (rng.choice([direct_conversation(u, v) for v in USERS if v != u] + ["all"]), f"{u}:{i}".encode())
            for i in range(PER_USER)
        ]
        for u in USERS
    }
    received: dict[str, list] = defaultdict(list)
    outcomes: dict[str, list] = defaultdict(list)
    cfg = server_config(limits=Limits(heartbeat_ms=500))
    with trio.fail_after(120):
        async with serving(store, cfg) as srv:
            async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port, chaos) as proxy:
                url = f"tcp://127.0.0.1:{proxy.port}"

                async def user(u: str, all_sent: trio.Event, done: trio.Event) -> None:
                    async with open_client(url, token(u), "phone", config=CHAOTIC_CLIENT, seed=rng.random()) as c:
                        limiter = trio.CapacityLimiter(8)

                        async def one(conv: str, payload: bytes) -> None:
                            async with limiter:
                                try:
                                    outcomes[u].append(("ok", await c.send(conv, payload)))
                                except SendTimeout as exc:
                                    outcomes[u].append(("timeout", exc))

                        async def receive() -> None:
                            async for ev in c.events():
                                if isinstance(ev, MessageReceived):
                                    received[u].append(ev.message)

                        async with trio.open_nursery() as n:
                            n.start_soon(receive)
                            async with trio.open_nursery() as senders:
                                for conv, payload in plan[u]:
                                    senders.start_soon(one, conv, payload)
                            all_sent.set()
                            await done.wait()
                            n.cancel_scope.cancel()

                sent_events = {u: trio.Event() for u in USERS}
                done = trio.Event()

                async def judge() -> None:
                    for e in sent_events.values():
                        await e.wait()
                    # Everything that will ever be stored is stored now; wait
                    # until each user has received what concerns them.
                    while True:
                        if all(len(received[u]) >= _expected(store, u) for u in USERS):
                            break
                        await trio.sleep(0.05)
                    done.set()

                async def cut_everything_twice() -> None:
                    # On top of the random resets: every link dies at least
                    # twice mid-traffic, whatever the seed draws.
                    for share in (0.3, 0.6):
                        while sum(len(o) for o in outcomes.values()) < share * PER_USER * len(USERS):
                            await trio.sleep(0.01)
                        proxy.reset_all()

                async with trio.open_nursery() as n:
                    for u in USERS:
                        n.start_soon(user, u, sent_events[u], done)
                    n.start_soon(judge)
                    n.start_soon(cut_everything_twice)
                stats = proxy.statistics()

    print(f"proxy: {stats}; broker duplicates answered: {srv.statistics().broker.duplicates}")
    assert stats.resets >= 2 * len(USERS), "every client's link should have been cut at least twice"
    stored = {}
    for conv in {conv for u in USERS for conv, _ in plan[u]}:
        history = store.history(conv, 0, 10_000)
        assert [m.seq for m in history] == list(range(1, len(history) + 1))
        payloads = Counter(m.payload for m in history)
        assert max(payloads.values(), default=1) == 1, "a message was stored twice"
        stored.update({m.msg_id: m for m in history})
    for u in USERS:
        for kind, result in outcomes[u]:
            if kind == "ok":
                assert stored[result.msg_id].payload.decode().startswith(u + ":")
        assert len(outcomes[u]) == PER_USER  # each send ended: acked or reported failed
        ids = [m.msg_id for m in received[u]]
        assert len(ids) == len(set(ids)), f"{u} received a message twice"
        assert len(ids) == _expected(store, u)
        per_conv = defaultdict(list)
        for m in received[u]:
            per_conv[m.conv].append(m.seq)
        for conv, seqs in per_conv.items():
            assert seqs == sorted(seqs), f"{u} got {conv} out of order"
        acked = [r for kind, r in outcomes[u] if kind == "ok"]
        assert len(acked) >= PER_USER * 0.99  # timeouts are allowed, but rare


def _expected(store: LmdbStore, user: str) -> int:
    return sum(1 for conv in store.conversations(user) for m in store.history(conv, 0, 10_000) if m.sender != user)


async def test_a_dead_link_is_detected_by_heartbeats_and_replaced(store):
    cfg = server_config(limits=Limits(heartbeat_ms=100), idle_timeout=5.0)
    client_cfg = ClientConfig(ack_timeout=0.5, send_timeout=20.0, connect_timeout=0.5, backoff_initial=0.02, backoff_max=0.2)
    with trio.fail_after(20):
        async with serving(store, cfg) as srv:
            async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port) as proxy:
                async with open_client(f"tcp://127.0.0.1:{proxy.port}", token("alice"), "phone", config=client_cfg) as a:
                    await a.send(direct_conversation("alice", "bob"), b"before")
                    proxy.pause()  # a black hole: no RST, no FIN, nothing
                    async for ev in a.events():
                        if isinstance(ev, Disconnected):
                            assert ev.code is None and "dead" in ev.reason
                            break
                    await trio.sleep(0.5)
                    proxy.resume()
                    sent = await a.send(direct_conversation("alice", "bob"), b"after")
                    assert sent.seq == 2 and a.statistics().connects >= 2


async def test_a_link_cut_right_after_each_login_reconnects_at_the_initial_backoff(autojump_clock):
    # Connections that log in and then die 1.5 s later (a flaky radio): each
    # completed login resets the backoff, so every reconnect waits only the
    # jittered backoff_initial -- not a delay growing towards backoff_max as
    # if each working connection had been a failure.  Virtual time.
    from pimcore.client import Connected
    from pimcore.store import MemoryStore

    cfg = ClientConfig(ack_timeout=1.0, send_timeout=60.0, connect_timeout=5.0, backoff_initial=0.1, backoff_max=10.0, compression=False)
    events: list[tuple[float, object]] = []
    with trio.fail_after(600):
        async with serving(MemoryStore(), server_config()) as srv:
            async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port, ChaosConfig(seed=1)) as proxy:
                async with open_client(f"tcp://127.0.0.1:{proxy.port}", token("alice"), "phone", config=cfg) as c:

                    changed = trio.Condition()

                    async def watch() -> None:
                        async for ev in c.events():
                            events.append((trio.current_time(), ev))
                            async with changed:
                                changed.notify_all()

                    async def until(kind: type, count: int) -> None:
                        async with changed:
                            while sum(isinstance(ev, kind) for _, ev in events) < count:
                                await changed.wait()

                    async with trio.open_nursery() as n:
                        n.start_soon(watch)
                        for i in range(12):
                            await until(Connected, i + 1)
                            await trio.sleep(1.5)
                            proxy.reset_all()
                            await until(Disconnected, i + 1)
                        await until(Connected, 13)
                        n.cancel_scope.cancel()
    gaps, down = [], None
    for t, ev in events:
        if isinstance(ev, Disconnected):
            down = t
        elif isinstance(ev, Connected) and down is not None:
            gaps.append(t - down)
            down = None
    assert len(gaps) == 12, [(round(t, 2), type(ev).__name__) for t, ev in events]
    assert max(gaps) < 2 * cfg.backoff_initial, gaps  # backoff_initial x [0.5, 1.5), plus a login


async def _bob_takes_all_through(srv, chaos: ChaosConfig, client_cfg: ClientConfig, n: int) -> None:
    """bob's phone, through a chaos proxy, takes the ``n`` messages
    numbered 0..n-1 (their first 5 bytes) in order; the cuts did happen."""
    async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port, chaos) as proxy:
        async with open_client(f"tcp://127.0.0.1:{proxy.port}", token("bob"), "phone", config=client_cfg) as b:
            got = []
            async for m in b.messages():
                got.append(int(m.payload[:5]))
                if len(got) == n:
                    break
            assert got == list(range(n))
            assert b.statistics().connects > 1, (b.statistics(), proxy.statistics())


async def test_a_backlog_catches_up_through_cut_connections_when_the_read_states_alone_are_past_the_cut(store):
    """A user of 300 conversations on a link cut every 6 KB (a new user's
    trial): a login's LoginAck and its read states -- one per conversation,
    about 9 KB here -- came before its first Push, so no connection ever
    delivered a message (no progress in 30 s).  The first Push of a
    catch-up now goes before the read states (entries the read states
    already count: the SDK's unread counts stay exact)."""
    n = 300
    groups = [f"g-{os.urandom(12).hex()}" for _ in range(n)]  # (incompressible ids)
    for g in groups:
        store.create_group(g, ["alice", "bob"], 0)
    client_cfg = ClientConfig(ack_timeout=1.0, send_timeout=60.0, connect_timeout=2.0, backoff_initial=0.01,
                              backoff_max=0.05, compression=False)
    with trio.fail_after(60):
        async with serving(store) as srv:
            async with open_client(srv.url(), token("alice"), "phone", config=client_cfg) as a:
                for i, g in enumerate(groups):
                    await a.send(g, b"%05d" % i)
            chaos = ChaosConfig(latency=0.002, reset_after_bytes=6_000)
            await _bob_takes_all_through(srv, chaos, client_cfg, n)


@pytest.mark.parametrize("size, cut", [(2_000, 40_000), (100, 6_000)])
async def test_a_backlog_catches_up_through_connections_cut_after_a_few_kilobytes(store, size, cut):
    """A phone on a link that drops every few seconds: each connection dies
    after ``cut`` bytes.  The first Push after a login carried up to
    push_batch messages (64 x 2 KB: 128 KB), so no connection ever got one
    whole, each resumed from the same position, and the device downloaded
    megabytes for no message at all (a new user's trial: 97 reconnects,
    3.86 MB, 0 delivered).  Each connection's pushes now start small and
    grow (Broker._push_entries), so every connection delivers some."""
    conv = direct_conversation("alice", "bob")
    client_cfg = ClientConfig(ack_timeout=1.0, send_timeout=60.0, connect_timeout=2.0, backoff_initial=0.01,
                              backoff_max=0.05)
    n = 300
    with trio.fail_after(60):
        async with serving(store) as srv:
            async with open_client(srv.url(), token("alice"), "phone", config=client_cfg) as a:
                for i in range(n):
                    await a.send(conv, b"%05d" % i + os.urandom(size - 5))  # (incompressible)
            chaos = ChaosConfig(latency=0.002, reset_after_bytes=cut)
            await _bob_takes_all_through(srv, chaos, client_cfg, n)
