"""Typing and presence through the SDK over a live broker (issue 14 part 3):
typing reaches members only and expires by itself, the broker's rate limit
drops excess without closing anyone, typing is not relayed in groups above
the bound, presence subscriptions answer and follow changes, last-seen can
be hidden, users who share no conversation stay invisible, and both survive
reconnects."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import pytest
import trio

from pimcore import frames as F
from pimcore.client import Connected, Disconnected, PresenceChanged, PrivacyChanged, SendError, TypingChanged
from pimcore.core import SECOND
from pimcore.errors import CloseCode, ErrorCode
from pimcore.net import Endpoint, ServerConfig
from pimcore.net.server import DEFAULT_BROKER_CONFIG
from pimcore.store import LmdbStore, MemoryStore
from pimcore.testing.chaos import open_chaos_proxy

from _net import FAST_CLIENT, client, serving
from _proc import free_port

ONLINE, OFFLINE, UNKNOWN = F.PresenceState.ONLINE, F.PresenceState.OFFLINE, F.PresenceState.UNKNOWN


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


def config(**broker) -> ServerConfig:
    return ServerConfig(listeners=(Endpoint("tcp"),), broker=replace(DEFAULT_BROKER_CONFIG, **broker))


async def next_event(c, pred: Callable[[object], bool], timeout: float = 5.0):
    with trio.fail_after(timeout):
        async for ev in c.events():
            if pred(ev):
                return ev
    raise AssertionError("events ended")  # pragma: no cover


def presence_of(user: str, state: F.PresenceState) -> Callable[[object], bool]:
    return lambda ev: isinstance(ev, PresenceChanged) and ev.user == user and ev.state is state


def typing_of(user: str, active: bool) -> Callable[[object], bool]:
    return lambda ev: isinstance(ev, TypingChanged) and ev.user == user and ev.active is active


async def test_typing_reaches_members_only_and_expires(store):
    with trio.fail_after(30):
        async with serving(store, config(typing_ttl=SECOND // 2)) as srv:
            await srv.create_group("team", ["alice", "bob"])
            url = srv.url()
            quick = replace(FAST_CLIENT, typing_interval=0.2)  # under the TTL, as it must be
            async with client(url, "alice", config=quick) as a, client(url, "alice", "laptop") as a2, \
                    client(url, "bob") as b, client(url, "carol") as c:
                for x in (a, a2, b, c):
                    await x.wait_connected()
                assert await a.typing("team") is True
                assert await a.typing("team") is False  # throttled: one per typing_interval
                ev = await next_event(b, typing_of("alice", True))
                assert ev.conv == "team" and ev.expires > 0
                assert b.typing_users("team") == ["alice"]
                # expires by itself (no "stopped" was sent)
                await next_event(b, typing_of("alice", False))
                assert b.typing_users("team") == []
                # an explicit stop
                await trio.sleep(0.2)
                assert await a.typing("team") is True
                await next_event(b, typing_of("alice", True))
                assert await a.typing("team", active=False) is True
                await next_event(b, typing_of("alice", False), timeout=0.4)  # before the TTL
                # a message after the typing frames: everything before it has arrived
                await a.send("team", b"done")
                async for m in b.messages():
                    break
                for other in (a2, c):  # the sender's other device, a non-member
                    while other._session.has_events:
                        ev = other._session.next_event(other.local_now())
                        assert not isinstance(ev, TypingChanged), ev
                # a non-member's typing is refused, never relayed
                await c.typing("team")
                await c.send("d:bob:carol", b"hi")
                async for m in b.messages():
                    assert m.payload == b"hi"
                    break
                assert b.typing_users("team") == []


async def test_rate_limit_drops_excess_and_closes_nobody(store):
    eager = replace(FAST_CLIENT, typing_interval=0.0)  # an app that ignores the SDK's throttle
    with trio.fail_after(30):
        async with serving(store, config(typing_burst=3, typing_rate=0.1)) as srv:
            await srv.create_group("team", ["alice", "bob"])
            async with client(srv.url(), "alice", config=eager) as a, client(srv.url(), "bob") as b:
                await a.wait_connected()
                await b.wait_connected()
                for _ in range(20):
                    assert await a.typing("team") is True
                await a.send("team", b"after")
                got = 0
                async for ev in b.events():
                    if isinstance(ev, TypingChanged) and ev.active:
                        got += 1
                    elif getattr(ev, "message", None) is not None:
                        break
                assert got == 3  # the burst; the other 17 were dropped
                assert a.connected and a.statistics().connects == 1


async def test_typing_is_not_relayed_above_the_member_bound(store):
    with trio.fail_after(30):
        async with serving(store, config(typing_max_members=3)) as srv:
            await srv.create_group("big", ["alice", "bob", "carol", "dave"])
            await srv.create_group("small", ["alice", "bob", "carol"])
            async with client(srv.url(), "alice") as a, client(srv.url(), "bob") as b:
                await a.wait_connected()
                await b.wait_connected()
                await a.typing("big")
                await a.typing("small")
                ev = await next_event(b, lambda ev: isinstance(ev, TypingChanged))
                assert (ev.conv, ev.user) == ("small", "alice")
                assert b.typing_users("big") == []
                assert a.connected


async def test_presence_subscribe_changes_and_hidden_last_seen(store):
    with trio.fail_after(30):
        async with serving(store) as srv:
            await srv.create_group("team", ["alice", "bob", "carol"])
            url = srv.url()
            async with client(url, "bob") as b, client(url, "eve") as e:
                async with client(url, "alice") as a:
                    await a.wait_connected()
                    got = await b.subscribe_presence(["alice", "carol", "eve"])
                    assert [(u, x.state) for u, x in got.items()] == [("alice", ONLINE), ("carol", OFFLINE), ("eve", UNKNOWN)]
                    # eve shares nothing with anyone: sees nobody
                    got = await e.subscribe_presence(["alice", "bob"])
                    assert {x.state for x in got.values()} == {UNKNOWN}
                ev = await next_event(b, presence_of("alice", OFFLINE))
                assert ev.last_seen > 0
                assert b.presence["alice"].state == OFFLINE
                async with client(url, "alice") as a:
                    ev = await next_event(b, presence_of("alice", ONLINE))
                    assert ev.last_seen == 0
                    assert await a.set_presence_privacy(None) is False
                    assert await a.set_presence_privacy(True) is True
                ev = await next_event(b, presence_of("alice", OFFLINE))
                assert ev.last_seen == 0  # offline, time hidden
                # a fresh subscription reads the durable setting
                got = await b.subscribe_presence(["alice"])
                assert (got["alice"].state, got["alice"].last_seen) == (OFFLINE, 0)
                # nothing about alice ever reached eve
                async with client(url, "alice") as a:
                    await a.wait_connected()
                    assert await a.set_presence_privacy(False) is False
                assert "alice" not in e.presence or e.presence["alice"].state == UNKNOWN
                with pytest.raises(SendError) as err:
                    await b.subscribe_presence([f"u{i}" for i in range(DEFAULT_BROKER_CONFIG.presence_max_users + 1)])
                assert err.value.code is ErrorCode.PRESENCE_LIMIT


async def test_presence_subscribed_before_the_first_message_shows_once_the_chat_exists(store):
    """The README's tour: two new users subscribe to each other before their
    1:1 chat has a message (UNKNOWN); its first message makes each see the
    other, then their changes -- without subscribing again.  A stranger
    still sees nothing."""
    with trio.fail_after(30):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "bob") as b, client(url, "eve") as e:
                async with client(url, "alice") as a:
                    await a.wait_connected()
                    assert (await a.subscribe_presence(["bob"]))["bob"].state is UNKNOWN
                    assert (await b.subscribe_presence(["alice"]))["alice"].state is UNKNOWN
                    assert {x.state for x in (await e.subscribe_presence(["alice", "bob"])).values()} == {UNKNOWN}
                    await a.send("d:alice:bob", b"hi")
                    await next_event(a, presence_of("bob", ONLINE))
                    await next_event(b, presence_of("alice", ONLINE))
                ev = await next_event(b, presence_of("alice", OFFLINE))
                assert ev.last_seen > 0
                async with client(url, "alice") as a:
                    await next_event(b, presence_of("alice", ONLINE))
                assert {x.state for x in e.presence.values()} == {UNKNOWN}


async def test_privacy_is_synced_to_the_users_other_devices(store):
    with trio.fail_after(30):
        async with serving(store) as srv:
            async with client(srv.url(), "alice") as a, client(srv.url(), "alice", "laptop") as a2:
                await a2.wait_connected()
                await a.set_presence_privacy(True)
                ev = await next_event(a2, lambda ev: isinstance(ev, PrivacyChanged))
                assert ev.hide_last_seen is True


async def test_presence_subscription_and_typing_survive_reconnects(store):
    with trio.fail_after(40):
        async with serving(store) as srv:
            await srv.create_group("team", ["alice", "bob"])
            async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port) as proxy:
                async with client(f"tcp://127.0.0.1:{proxy.port}", "bob") as b:
                    got = await b.subscribe_presence(["alice"])
                    assert got["alice"].state == OFFLINE
                    await next_event(b, presence_of("alice", OFFLINE))  # the answer's event
                    proxy.reset_all()  # bob's link breaks; the SDK logs in again
                    await next_event(b, lambda ev: isinstance(ev, Disconnected))
                    await next_event(b, lambda ev: isinstance(ev, Connected))
                    # the subscription was renewed with the new connection
                    await next_event(b, presence_of("alice", OFFLINE))
                    async with client(srv.url(), "alice") as a:
                        await next_event(b, presence_of("alice", ONLINE))
                        await a.typing("team")
                        ev = await next_event(b, lambda ev: isinstance(ev, TypingChanged))
                        assert ev.user == "alice" and ev.active


async def test_presence_is_not_claimed_while_disconnected_and_is_current_after_reconnect(store):
    """Cut off, the client cannot know anyone's presence: it must not keep
    showing a peer online for the whole outage.  Every known entry turns
    UNKNOWN (a PresenceChanged each, right after the Disconnected; the
    last_seen known is kept), and the subscription renewed after the
    reconnect brings the broker's current state -- here: the peer left
    during the outage."""
    with trio.fail_after(40):
        async with serving(store) as srv:
            await srv.create_group("team", ["alice", "bob"])
            async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port) as proxy:
                async with client(f"tcp://127.0.0.1:{proxy.port}", "bob") as b:
                    async with client(srv.url(), "alice") as a:
                        await a.wait_connected()
                        got = await b.subscribe_presence(["alice"])
                        assert got["alice"].state == ONLINE and b.presence["alice"].state == ONLINE
                        proxy.pause()  # an outage: the redials get nowhere until resume()
                        proxy.reset_all()  # bob's link breaks
                        await next_event(b, lambda ev: isinstance(ev, Disconnected))
                        assert not b.connected
                        assert b.presence["alice"] == F.PresenceEntry("alice", UNKNOWN, 0)
                        await next_event(b, presence_of("alice", UNKNOWN))
                    await trio.sleep(0.3)  # alice is gone; bob is still cut off and still cannot tell
                    assert b.presence["alice"].state == UNKNOWN and not b.connected
                    proxy.resume()
                    await next_event(b, lambda ev: isinstance(ev, Connected))
                    ev = await next_event(b, presence_of("alice", OFFLINE))
                    assert ev.last_seen > 0
                    assert b.presence["alice"].state == OFFLINE and b.presence["alice"].last_seen == ev.last_seen


async def test_a_broker_shutting_down_tells_nobody_that_their_peers_went_offline(store):
    """The broker closing every connection (shutdown) is not each user
    going offline: a watcher is told "connection lost (broker shutting
    down)", not first that its peers went offline one by one -- they did
    not leave, the broker did.  (Each user's last seen is still recorded.)"""
    with trio.fail_after(30):
        async with serving(store) as srv:
            await srv.create_group("team", ["alice", "bob", "carol"])
            url = srv.url()
            async with client(url, "alice") as a, client(url, "bob") as b, client(url, "carol") as c:
                for me, others in ((a, ["bob", "carol"]), (b, ["alice", "carol"]), (c, ["alice", "bob"])):
                    got = await me.subscribe_presence(others)
                    assert {x.state for x in got.values()} == {ONLINE}
                await srv.shutdown()
                for me in (a, b, c):
                    seen = []
                    with trio.fail_after(5):
                        async for ev in me.events():
                            if isinstance(ev, Disconnected):
                                assert ev.code is CloseCode.SHUTDOWN
                                break
                            seen.append(ev)
                    assert not [ev for ev in seen if isinstance(ev, PresenceChanged) and ev.state is not ONLINE], seen
        assert store.devices("alice")[0].last_seen > 0


async def test_the_host_reads_presence_and_sets_privacy(tmp_path):
    from pimcore.embed import RequestRefused, open_pimcore
    from pimcore.client import open_client

    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "data", listen=["tcp://127.0.0.1:0"]) as im:
            await im.create_group("team", ["alice", "bob"])
            p = await im.presence("alice")
            assert (p.online, p.last_seen, p.hide_last_seen) == (False, 0, False)
            async with open_client(im.urls[0], im.issue_token("bob"), "phone", config=FAST_CLIENT) as b:
                await b.subscribe_presence(["alice"])
                async with open_client(im.urls[0], im.issue_token("alice"), "phone", config=FAST_CLIENT) as a:
                    await a.wait_connected()
                    p = await im.presence("alice")
                    assert p.online and p.last_seen == 0
                    # the host hides alice's last seen: her device is told, bob sees no time
                    assert await im.set_presence_privacy("alice", True) is True
                    ev = await next_event(a, lambda ev: isinstance(ev, PrivacyChanged))
                    assert ev.hide_last_seen is True
                ev = await next_event(b, presence_of("alice", OFFLINE))
                assert ev.last_seen == 0
                p = await im.presence("alice")
                assert not p.online and p.last_seen > 0 and p.hide_last_seen  # the host sees the time regardless
            with pytest.raises(RequestRefused) as err:
                await im.presence("NOT A USER")
            assert err.value.code is ErrorCode.BAD_REQUEST
            with pytest.raises(RequestRefused):
                await im.set_presence_privacy("NOT A USER", True)


async def test_http_presence(tmp_path):
    from test_http_api import api, call

    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            assert await call(c, "GET", "/v1/users/alice/presence") == (
                200, {"user": "alice", "online": False, "last_seen": 0, "hide_last_seen": False})
            await im.set_presence_privacy("alice", True)
            status, doc = await call(c, "GET", "/v1/users/alice/presence")
            assert status == 200 and doc["hide_last_seen"] is True


async def test_pimcore_chat_shows_typing_and_the_peers_presence(store):
    from pimcore.chat import chat
    from _net import token

    lines_in, lines = trio.open_memory_channel[str](8)
    shown: list[str] = []

    async def wait_for(text: str) -> None:
        with trio.fail_after(5):
            while not any(text in line for line in shown):
                await trio.sleep(0.01)

    with trio.fail_after(30):
        async with serving(store) as srv:
            async with client(srv.url(), "alice") as a:
                # presence needs a shared conversation: a 1:1 chat has one from its first message
                await a.send("d:alice:bob", b"first")
            async with trio.open_nursery() as n:
                n.start_soon(lambda: chat(srv.url(), token("bob"), "alice", lines=lines, out=shown.append))
                await wait_for("connected as bob")
                await wait_for("— alice is offline")
                async with client(srv.url(), "alice") as a:
                    await wait_for("— alice is online")
                    await a.typing("d:alice:bob")
                    await wait_for("… alice is typing")
                    await a.send("d:alice:bob", b"hello")
                    await wait_for("alice: hello")
                    await lines_in.send("/typing")  # a terminal cannot see keystrokes: the command
                    await next_event(a, typing_of("bob", True))
                await wait_for("— alice is offline (last seen ")
                await lines_in.send("/quit")
    assert sum("alice is typing" in line for line in shown) == 1


def test_typing_and_presence_limits_are_settings(tmp_path):
    from pimcore.config import ConfigError, load_settings

    cfg = tmp_path / "pimcore.toml"
    cfg.write_text("[server]\ntyping_ttl = 4.5\ntyping_rate = 1.0\ntyping_burst = 3\ntyping_max_members = 50\n"
                   "presence_max_users = 20\n")
    settings = load_settings(str(cfg))
    b = settings.server_config().broker
    assert (b.typing_ttl, b.typing_rate, b.typing_burst, b.typing_max_members, b.presence_max_users) == (
        4_500_000, 1.0, 3, 50, 20)
    eff = settings.effective()["server"]
    assert (eff["typing_ttl"], eff["typing_max_members"], eff["presence_max_users"]) == (4.5, 50, 20)
    cfg.write_text("[server]\ntyping_ttl = 0\n")
    with pytest.raises(ConfigError, match="typing_ttl"):
        load_settings(str(cfg)).server_config()


async def test_after_a_broker_restart_presence_shows_when_peers_were_last_seen(tmp_path):
    """Two users chatting, the broker restarted, both log in again: the
    first back asks the second's presence before the second is back, and
    its last-seen time was that of the second's *login* long before (the
    Close at the shutdown recorded nothing: its TouchDevice was never
    committed), not when the broker went down."""
    import time

    store = LmdbStore(str(tmp_path / "db"), durability="os")
    try:
        with trio.fail_after(40):
            async with serving(store) as old, open_chaos_proxy("127.0.0.1", old.endpoints[0].port) as pa, \
                    open_chaos_proxy("127.0.0.1", old.endpoints[0].port) as pb:
                async with client(f"tcp://127.0.0.1:{pa.port}", "alice") as a, client(f"tcp://127.0.0.1:{pb.port}", "bob") as b:
                    await a.send("d:alice:bob", b"hi")
                    assert (await a.subscribe_presence(["bob"]))["bob"].state == ONLINE
                    await trio.sleep(1.0)  # bob is connected, and idle, all along
                    down = time.time() * 1e6
                    pb.target_port = pa.target_port = free_port()  # nobody gets in while it restarts
                    await old.shutdown()
                    async with serving(store) as new:
                        pa.target_port = new.endpoints[0].port  # alice is back first
                        ev = await next_event(a, presence_of("bob", OFFLINE))
                        assert ev.last_seen >= down - 0.2e6, (down - ev.last_seen) / 1e6
                        pb.target_port = new.endpoints[0].port
                        await next_event(a, presence_of("bob", ONLINE))
    finally:
        store.close()


async def test_pimcore_chat_shows_no_offline_flash_for_a_peer_back_after_a_broker_restart(tmp_path, monkeypatch):
    """Two users chatting, the broker restarted: the first back was told
    the other offline (the restarted broker cannot know who was online
    before it, nor who is about to log in again), then online a moment
    later: "— bob is offline (last seen ...)" then "— bob is online" for a
    peer who never left.  After a reconnect the chat holds an "offline"
    for a peer it showed online for a grace (the reconnect delay of a
    client): a peer back within it is no change; one who is not is said
    offline at its end."""
    from pimcore import chat as chat_mod
    from _net import token

    monkeypatch.setattr(chat_mod, "PRESENCE_GRACE", 3.0)  # (bob is back well within it)
    store = LmdbStore(str(tmp_path / "db"), durability="os")
    lines_in, lines = trio.open_memory_channel[str](8)
    shown: list[str] = []

    async def wait_for(text: str, start: int = 0) -> int:
        with trio.fail_after(10):
            while True:
                for i, line in enumerate(shown[start:], start):
                    if text in line:
                        return i
                await trio.sleep(0.01)

    async def restart(old, then) -> None:
        pa.target_port = pb.target_port = free_port()  # nobody gets in while it restarts
        await old.shutdown()
        async with serving(store) as new:
            await then(new)

    try:
        with trio.fail_after(40):
            async with serving(store) as old, open_chaos_proxy("127.0.0.1", old.endpoints[0].port) as pa, \
                    open_chaos_proxy("127.0.0.1", old.endpoints[0].port) as pb, trio.open_nursery() as n:
                async with client(f"tcp://127.0.0.1:{pb.port}", "bob") as b:
                    await b.send("d:alice:bob", b"first")  # a shared conversation: presence is told
                    n.start_soon(lambda: chat_mod.chat(f"tcp://127.0.0.1:{pa.port}", token("alice"), "bob",
                                                       lines=lines, out=shown.append))
                    await wait_for("— bob is online")

                    async def alice_back_first(new) -> None:
                        pa.target_port = new.endpoints[0].port
                        back = await wait_for("(reconnected")
                        await trio.sleep(0.5)  # bob is not back yet
                        pb.target_port = new.endpoints[0].port
                        await next_event(b, lambda ev: isinstance(ev, Connected))
                        await b.send("d:alice:bob", b"back")
                        await wait_for("bob: back", back)
                        assert not [line for line in shown[back:] if "bob is" in line], shown[back:]
                        await restart(new, bob_not_back)

                    async def bob_not_back(new) -> None:
                        pa.target_port = new.endpoints[0].port
                        back = await wait_for("(reconnected")
                        await trio.sleep(0.5)
                        assert not [line for line in shown[back:] if "bob is" in line], shown[back:]
                        # Not back within the grace: said offline, as of the shutdown.
                        at = await wait_for("— bob is offline (last seen ", back)
                        assert len(shown) == at + 1, shown[back:]
                        # Back later: said online, and leaving for good is said at once.
                        pb.target_port = new.endpoints[0].port
                        at = await wait_for("— bob is online", at)
                        await b.aclose()
                        await wait_for("— bob is offline (last seen ", at)

                    await restart(old, alice_back_first)
                    await lines_in.send("/quit")
    finally:
        store.close()
