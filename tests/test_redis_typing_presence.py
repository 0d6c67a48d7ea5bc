"""Typing and presence across nodes (issue 16): two brokers in this process
(two :func:`open_pimcore` handles, each over its own :class:`RedisStore` on
one namespace) play two ``pimcore serve`` nodes, with clients on each,
through the public SDK.  A Typing from a member on one node reaches the
members on the other (1:1 and groups, never a non-member; a message ends
it); a user online on one node is online to a subscriber on the other,
goes offline there with their last-seen time (or none, if hidden), and a
node that died without cleanup stops showing its users online once its
liveness key expires.  Skipped without redis-server/coredis (CI sets
PIMCORE_REQUIRE_REDIS=1)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, Callable

import pytest
import trio

from pimcore import frames as F
from pimcore.client import MessageReceived, PresenceChanged, TypingChanged
from pimcore.ids import direct_conversation

from _redis_nodes import login, two_nodes

pytestmark = [pytest.mark.redis]

AB = direct_conversation("alice", "bob")
ONLINE, OFFLINE = F.PresenceState.ONLINE, F.PresenceState.OFFLINE


async def recorded(node: Any, user: str, devices: int) -> None:
    """Wait until ``user`` has ``devices`` device-to-node records (they are
    written just after the login, as on any node)."""
    store = node.server.store
    while len(await store._r.hvals(store.cluster.online_key(user))) != devices:
        await trio.sleep(0.02)


async def first(client: Any, match: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    with trio.fail_after(timeout):
        async for ev in client.events():
            if match(ev):
                return ev
    raise AssertionError("the client closed before the event came")


def typing_of(user: str, conv: str, active: bool) -> Callable[[Any], bool]:
    return lambda ev: isinstance(ev, TypingChanged) and ev.user == user and ev.conv == conv and ev.active is active


def presence_of(user: str, state: F.PresenceState) -> Callable[[Any], bool]:
    return lambda ev: isinstance(ev, PresenceChanged) and ev.user == user and ev.state == state


async def test_typing_on_one_node_reaches_the_members_on_another(redis_cluster, tmp_path) -> None:
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("team", ["alice", "bob", "carol"])
            alice = await login(stack, nodes[0], "alice")
            bob = await login(stack, nodes[1], "bob")
            carol = await login(stack, nodes[1], "carol")
            dave = await login(stack, nodes[1], "dave")  # a member of nothing
            for user in ("alice", "bob", "carol", "dave"):
                await recorded(nodes[0], user, 1)
            # The host's view on node 0 (nobody subscribed there) counts node 1.
            assert (await nodes[0].presence("carol")).online
            # 1:1: bob (node 1) sees alice (node 0) typing, then a message
            # from her ends it.
            assert await alice.typing(AB) is True
            ev = await first(bob, typing_of("alice", AB, True))
            assert ev.expires > 0 and bob.typing_users(AB) == ["alice"]
            await alice.send(AB, b"hi")
            await first(bob, typing_of("alice", AB, False))
            assert bob.typing_users(AB) == []
            # Send, then type again at once (the usual chat pattern): the
            # typing hint overtakes the message's push on the way; the
            # message must not end the indicator that came after it.
            await alice.send(AB, b"and")
            assert await alice.typing(AB) is True
            await first(bob, lambda ev: isinstance(ev, MessageReceived) and ev.message.payload == b"and")
            await first(bob, typing_of("alice", AB, True))
            assert bob.typing_users(AB) == ["alice"]
            # A group: both members on node 1 see it start and stop.
            assert await alice.typing("team") is True
            for member in (bob, carol):
                await first(member, typing_of("alice", "team", True))
            assert await alice.typing("team", active=False) is True
            for member in (bob, carol):
                await first(member, typing_of("alice", "team", False))
            # The other way, node 1 -> node 0.
            assert await carol.typing("team") is True
            await first(alice, typing_of("carol", "team", True))
            # dave shares nothing with them: a Typing of his own is refused,
            # and he saw none of theirs (the marker below comes after them).
            await bob.typing(direct_conversation("bob", "dave"))
            marker = await first(dave, lambda ev: isinstance(ev, TypingChanged))
            assert (marker.user, marker.conv) == ("bob", direct_conversation("bob", "dave"))


async def test_presence_of_a_user_on_another_node(redis_cluster, tmp_path) -> None:
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("team", ["alice", "bob"])
            alice = await login(stack, nodes[0], "alice")
            async with AsyncExitStack() as bobs:
                bob = await login(bobs, nodes[1], "bob")
                await recorded(nodes[0], "bob", 1)
                got = await alice.subscribe_presence(["bob"])
                assert got["bob"].state == ONLINE  # the answer counts node 1
                assert (await nodes[0].presence("bob")).online  # and so does the host's view
                # node 0 registered as watching bob (for a limited time), so
                # node 1 pushes bob's changes there.
                ops = nodes[0].server.store.cluster
                assert await nodes[0].server.store._r.hexists(ops.watch_key("bob"), ops.node_hex)
                assert 0 < await nodes[0].server.store._r.pttl(ops.watch_key("bob")) <= 60_000
                del bob
            # bob's only device leaves node 1: offline, with the time.
            ev = await first(alice, presence_of("bob", OFFLINE))
            assert ev.last_seen > 0
            assert not (await nodes[0].presence("bob")).online
            async with AsyncExitStack() as bobs:
                await login(bobs, nodes[1], "bob", "laptop")
                await first(alice, presence_of("bob", ONLINE))
                # Hidden last-seen is honoured across nodes too.
                tablet = await login(bobs, nodes[1], "bob", "tablet")
                assert await tablet.set_presence_privacy(True) is True
            ev = await first(alice, presence_of("bob", OFFLINE))
            assert ev.last_seen == 0


async def test_a_dead_node_stops_showing_its_users_online(redis_cluster, tmp_path) -> None:
    """A node that dies without cleanup leaves its device-to-node records;
    they count only while its liveness key lives (refreshed by a running
    node): a subscriber sees the user go offline once it expired."""
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("team", ["alice", "bob", "carol"])
            store = nodes[0].server.store
            ops = store.cluster
            # bob's device on a node that died long ago (no liveness key),
            # carol's on one that is dying (its key lives 1.5 s more).
            await store._r.hset(ops.online_key("bob"), {"phone": "00aa00aa00aa00aa"})
            await store._r.hset(ops.online_key("carol"), {"phone": "00bb00bb00bb00bb"})
            await store._r.set(ops.alive_key("00bb00bb00bb00bb"), "1", px=1500)
            alice = await login(stack, nodes[0], "alice")
            got = await alice.subscribe_presence(["bob", "carol"])
            assert (got["bob"].state, got["carol"].state) == (OFFLINE, ONLINE)
            await first(alice, presence_of("carol", OFFLINE), timeout=15)


async def test_a_device_replaced_by_its_own_login_is_no_change_on_another_node(redis_cluster, tmp_path) -> None:
    """As on one node: bob's phone logging in again on node 1 (the old
    session closed REPLACED) shows alice on node 0 no offline-online flap."""
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("team", ["alice", "bob", "carol"])
            alice = await login(stack, nodes[0], "alice")
            await login(stack, nodes[1], "bob")
            await recorded(nodes[0], "bob", 1)
            got = await alice.subscribe_presence(["bob", "carol"])
            assert (got["bob"].state, got["carol"].state) == (ONLINE, OFFLINE)
            for _ in range(3):
                await login(stack, nodes[1], "bob")  # the same device: the older session is REPLACED
            await login(stack, nodes[1], "carol")
            # Until carol's change (node 1 pushes in order) alice heard
            # nothing of bob but the answer's ONLINE.
            heard = []
            with trio.fail_after(10):
                async for ev in alice.events():
                    if isinstance(ev, PresenceChanged):
                        heard.append((ev.user, ev.state))
                        if (ev.user, ev.state) == ("carol", ONLINE):
                            break
            assert [h for h in heard if h[0] == "bob"] == [("bob", ONLINE)] and heard[-1] == ("carol", ONLINE)
            assert alice.presence["bob"].state == ONLINE


async def test_a_lost_presence_hint_is_repaired_by_the_recheck(redis_cluster, tmp_path) -> None:
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("team", ["alice", "bob"])
            store = nodes[0].server.store
            ops = store.cluster
            ops.presence_recheck = 2.0  # (10 s by default)
            alice = await login(stack, nodes[0], "alice")
            got = await alice.subscribe_presence(["bob"])
            assert got["bob"].state == OFFLINE
            # bob logged in on a live node whose P hint was lost.
            await store._r.set(ops.alive_key("00cc00cc00cc00cc"), "1", px=30000)
            await store._r.hset(ops.online_key("bob"), {"phone": "00cc00cc00cc00cc"})
            await first(alice, presence_of("bob", ONLINE), timeout=15)


def test_typing_presence_and_privacy_hints_parse() -> None:
    from pimcore.store.redis_scripts import _parse_hint

    assert _parse_hint(b"T alice g 1 1700000000000000 bob carol") == ("T", "alice", ("g", True, ("bob", "carol"), 1700000000000000))
    assert _parse_hint(b"T alice d:alice:bob 0 5 bob") == ("T", "alice", ("d:alice:bob", False, ("bob",), 5))
    assert _parse_hint(b"P bob 00aa00aa00aa00aa 0 17") == ("P", "bob", ("00aa00aa00aa00aa", False, 17))
    assert _parse_hint(b"H bob 1") == ("H", "bob", True)
    for bad in (b"T alice g 1 5", b"T alice g 2 5 bob", b"P bob n 1", b"P bob n x 5", b"H bob yes", b"T alice g 1 x bob"):
        with pytest.raises(ValueError):
            _parse_hint(bad)
