"""Cross-node relay of what is not an inbox entry (issue 16): two brokers in
this process (two :func:`open_pimcore` handles, each over its own
:class:`RedisStore` on one namespace) play two ``pimcore serve`` nodes.  A
user's devices on different nodes, and a 1:1 peer on another node, hear a
read marker and a ReadReceipt; the host's kick, revoke, purge and
conversation settings on one node reach the sessions on the other.  Skipped without
redis-server/coredis (CI sets PIMCORE_REQUIRE_REDIS=1)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any, AsyncIterator, Callable

import pytest
import trio

from pimcore.client_session import ConversationUpdated, Disconnected, ReadStateChanged, ReceiptReceived
from pimcore.errors import CloseCode
from pimcore.ids import direct_conversation

from _redis_nodes import login, two_nodes

pytestmark = [pytest.mark.redis]

AB = direct_conversation("alice", "bob")


async def first(client: Any, match: Callable[[Any], bool]) -> Any:
    """The first event of ``client`` that ``match`` accepts."""
    async for ev in client.events():
        if match(ev):
            return ev
    raise AssertionError("the client closed before the event came")


async def online_everywhere(nodes: list[Any], where: dict[str, list[int]]) -> None:
    """Wait until every login is recorded in the store (the device-to-node
    records are written after the login, as on any node)."""
    from pimcore.store.redis import RedisStore

    while True:
        ok = True
        for user, idx in where.items():
            store: RedisStore = nodes[0].server.store
            recs = await store._r.hvals(store.cluster.online_key(user))
            if len(recs) < len(idx):
                ok = False
        if ok:
            return
        await trio.sleep(0.02)


async def read_everywhere(phone: Any, laptop: Any, bob: Any) -> dict[str, Any]:
    """alice's phone reads the 1:1 chat with bob up to seq 3; -> "laptop":
    the ReadStateChanged her laptop heard, "bob": bob's ReceiptReceived."""
    got: dict[str, Any] = {}

    async def marker() -> None:
        got["laptop"] = await first(laptop, lambda ev: isinstance(ev, ReadStateChanged)
                                    and ev.state.conv == AB and ev.state.read_seq == 3)

    async def receipt() -> None:
        got["bob"] = await first(bob, lambda ev: isinstance(ev, ReceiptReceived) and ev.seq == 3)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(marker)
            n.start_soon(receipt)
            await phone.mark_read(AB, 3)
    return got


async def test_a_read_on_one_node_reaches_the_readers_devices_and_the_peer_on_another(redis_cluster, tmp_path) -> None:
    """alice's phone (node 0) reads the 1:1 chat; her laptop (node 1) gets
    the read marker, bob (node 1) the ReadReceipt."""
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            phone = await login(stack, nodes[0], "alice", "phone")
            laptop = await login(stack, nodes[1], "alice", "laptop")
            bob = await login(stack, nodes[1], "bob", "phone")
            await online_everywhere(nodes, {"alice": [0, 1], "bob": [1]})
            for i in range(3):
                await bob.send(AB, b"m%d" % i)
            seen = [m.seq async for m in _take(phone, 3)]
            assert seen == [1, 2, 3]
            got = await read_everywhere(phone, laptop, bob)
            assert got["laptop"].state.unread == 0 and got["laptop"].state.last_seq == 3
            assert got["bob"] == ReceiptReceived(AB, "alice", 3)
            assert laptop.read_state(AB).read_seq == 3 and bob.receipt(AB, "alice") == 3
            # The other way: the laptop (node 1) reads a group on which the
            # phone (node 0) waits; groups have no receipts.
            await nodes[1].create_group("team", ["alice", "bob"])
            for i in range(2):
                await bob.send("team", b"g%d" % i)
            assert [m.seq async for m in _take(laptop, 2)] == [1, 2]
            with trio.fail_after(10):
                async with trio.open_nursery() as n:
                    n.start_soon(marker_of, phone, "team", 2, got)
                    await laptop.mark_read("team", 2)
            assert got["team"].state == laptop.read_state("team") == phone.read_state("team")
            assert phone.read_state("team").read_seq == 2
            assert all(conv == AB for conv, _ in bob.receipts)


async def marker_of(client: Any, conv: str, seq: int, got: dict[str, Any]) -> None:
    got[conv] = await first(client, lambda ev: isinstance(ev, ReadStateChanged)
                            and ev.state.conv == conv and ev.state.read_seq == seq)


async def _take(client: Any, n: int) -> AsyncIterator[Any]:
    k = 0
    async for m in client.messages():
        yield m
        k += 1
        if k == n:
            return


async def test_the_host_kicks_and_revokes_on_one_node_sessions_on_another(redis_cluster, tmp_path) -> None:
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            carol = await login(stack, nodes[1], "carol", "phone")
            laptop = await login(stack, nodes[1], "carol", "laptop")
            dave = await login(stack, nodes[1], "dave", "phone")
            await online_everywhere(nodes, {"carol": [1, 1], "dave": [1]})

            def closed(ev: Any) -> bool:
                return isinstance(ev, Disconnected) and ev.code is not None

            with trio.fail_after(10):
                nodes[0].kick("carol", "phone", reason="two words")
                ended = await first(carol, closed)
            assert (ended.code, ended.reason) == (CloseCode.KICKED, "two words")
            # Only that device: the laptop still sends (a round trip after
            # the hint was handled).
            await laptop.send(direct_conversation("carol", "dave"), b"still here")
            assert laptop.connected
            with trio.fail_after(10):
                await nodes[0].revoke("dave")
                ended = await first(dave, closed)
            assert ended.code is CloseCode.TOKEN_REVOKED
            # A purge of the user ends the sessions there too (as on its node).
            with trio.fail_after(10):
                await nodes[0].purge_user("carol")
                ended = await first(laptop, closed)
            assert ended.code is CloseCode.KICKED


async def test_conversation_settings_set_on_one_node_reach_the_devices_on_another(redis_cluster, tmp_path) -> None:
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            bob = await login(stack, nodes[1], "bob", "phone")
            alice = await login(stack, nodes[0], "alice", "phone")
            await online_everywhere(nodes, {"alice": [0], "bob": [1]})
            await alice.send(AB, b"hi")
            with trio.fail_after(10):
                async with trio.open_nursery() as n:
                    got: list[Any] = []

                    async def update() -> None:
                        got.append(await first(bob, lambda ev: isinstance(ev, ConversationUpdated)
                                               and ev.entry.conv == AB and ev.entry.pinned))

                    n.start_soon(update)
                    await nodes[0].set_conversation("bob", AB, pinned=True)
            assert bob.conversation_entries[AB].pinned


async def test_lost_hints_are_recovered_by_the_recheck(redis_cluster, tmp_path, monkeypatch) -> None:
    """Every hint but the inbox's (I) and a login's (R) is dropped: the
    read marker, the receipt, the settings, the revocation and the kick
    still reach the sessions on the other node within the re-check period
    (each node re-reads its online users' state version beside their inbox
    heads, and what changed since it last looked)."""
    from pimcore.store.redis_scripts import ClusterOps

    tell = ClusterOps.tell
    dropped: list[str] = []

    async def lossy(self: Any, hints: Any) -> None:
        dropped.extend(text[0] for _, text in hints if text[0] not in "IR")
        await tell(self, [(user, text) for user, text in hints if text[0] in "IR"])

    monkeypatch.setattr(ClusterOps, "tell", lossy)

    def closed(ev: Any) -> bool:
        return isinstance(ev, Disconnected) and ev.code is not None

    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            for node in nodes:
                node.server.store.cluster.recheck = 0.1
            phone = await login(stack, nodes[0], "alice", "phone")
            laptop = await login(stack, nodes[1], "alice", "laptop")
            bob = await login(stack, nodes[1], "bob", "phone")
            dave = await login(stack, nodes[1], "dave", "phone")
            carol = await login(stack, nodes[1], "carol", "phone")
            await online_everywhere(nodes, {"alice": [0, 1], "bob": [1], "dave": [1], "carol": [1]})
            for i in range(3):
                await bob.send(AB, b"m%d" % i)
            assert [m.seq async for m in _take(phone, 3)] == [1, 2, 3]
            got = await read_everywhere(phone, laptop, bob)
            assert got["laptop"].state.unread == 0 and got["laptop"].state.last_seq == 3
            assert got["bob"] == ReceiptReceived(AB, "alice", 3)
            with trio.fail_after(10):
                async with trio.open_nursery() as n:
                    async def update() -> None:
                        got["pin"] = await first(bob, lambda ev: isinstance(ev, ConversationUpdated)
                                                 and ev.entry.conv == AB and ev.entry.pinned)

                    n.start_soon(update)
                    await nodes[0].set_conversation("bob", AB, pinned=True)
            with trio.fail_after(10):
                await nodes[0].revoke("dave")
                ended = await first(dave, closed)
            assert ended.code is CloseCode.TOKEN_REVOKED
            with trio.fail_after(10):
                nodes[0].kick("carol", "phone", reason="lost hint")
                ended = await first(carol, closed)
            assert (ended.code, ended.reason) == (CloseCode.KICKED, "lost hint")
            assert sorted(set(dropped)) == ["C", "K", "M", "U", "V"]
            # A kick recorded before a login does not end that later session
            # (the re-check compares the kick's time with the login's).
            carol2 = await login(stack, nodes[1], "carol", "phone")
            cluster = nodes[1].server.store.cluster
            while "phone" not in cluster.online.get("carol", ()):
                await trio.sleep(0.01)
            heard: list[Any] = []
            await cluster._catch_up([("carol", 0, 1 << 40)], lambda *hint: heard.append(hint))
            assert heard == []
            await carol2.send(direct_conversation("carol", "dave"), b"still here")
            assert carol2.connected


async def test_host_events_count_a_recipient_online_on_another_node_as_online(redis_cluster, tmp_path) -> None:
    """offline_recipients (what a host sends push notifications to) of a
    message event: bob is online on node 1, the event is read on node 0
    (the handle's stream, the HTTP page and webhooks share embed.fresh_page):
    not offline; carol, online nowhere, is."""

    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path, events=True) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("g:push", ["ann", "bob", "carol"])
            ann = await login(stack, nodes[0], "ann", "phone")
            await login(stack, nodes[1], "bob", "phone")
            await online_everywhere(nodes, {"ann": [0], "bob": [1]})
            sent = await ann.send("g:push", b"ding")
            stream = nodes[0].events()
            async for ev in stream:
                if ev.type == "message" and ev.msg_id == sent.msg_id:
                    break
            assert ev.offline_recipients == ("carol",)
            from pimcore.embed import fresh_page

            (again,) = await fresh_page(nodes[0], (ev,))
            assert again.offline_recipients == ("carol",)
            # A host's read of a user's conversations is no login: nothing
            # registers carol as online in her groups (read fan-out).
            await nodes[0].conversations("carol")
            cluster = nodes[0].server.store.cluster
            assert await nodes[0].server.store._r.hget(cluster.on_key("g:push"), "carol") is None
            assert await nodes[0].server.store._r.hget(cluster.on_key("g:push"), "bob") is not None


async def test_a_change_between_a_logins_read_and_its_record_is_caught_up(redis_cluster, tmp_path, monkeypatch) -> None:
    """bob logs in on node 1; between the login's read and the moment node
    1 records the login, a setting of his changes on node 0, and its hint
    is lost.  The re-check starts from the version the login's read began
    at, so the change still arrives (it was missed for good: the node took
    its starting version after the change)."""
    from pimcore.store.redis_scripts import ClusterOps

    tell = ClusterOps.tell

    async def lossy(self: Any, hints: Any) -> None:
        await tell(self, [(user, text) for user, text in hints if text[0] in "IR"])

    monkeypatch.setattr(ClusterOps, "tell", lossy)
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            alice = await login(stack, nodes[0], "alice", "phone")
            await alice.send(AB, b"hi")
            cluster = nodes[1].server.store.cluster
            cluster.recheck = 0.1
            online = cluster.device_online

            async def late(user: str, device: str, *args: Any, **kwargs: Any) -> None:
                if user == "bob":
                    await nodes[0].set_conversation("bob", AB, pinned=True)
                await online(user, device, *args, **kwargs)

            cluster.device_online = late  # type: ignore[method-assign]
            bob = await login(stack, nodes[1], "bob", "phone")
            with trio.fail_after(10):
                ev = await first(bob, lambda ev: isinstance(ev, ConversationUpdated) and ev.entry.conv == AB)
            assert ev.entry.pinned


async def test_retention_applied_on_one_node_corrects_unread_counts_on_the_other(redis_cluster, tmp_path) -> None:
    """Only the node whose reclaim pass trimmed a conversation refreshed the
    unread counts of its online devices (the other node's pass then finds
    nothing to trim): bob's phone on the other node kept counting messages
    that were gone, for a 1:1 chat and for a group, until his next read or
    login.  The trimming node tells the nodes where a member has a device
    online, and each refreshes it as its own pass would."""
    fast, never = {"reclaim_interval": 0.02, "dedupe_window": 0}, {"reclaim_interval": 3600.0}
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path, per_node=[fast, never]) as nodes, AsyncExitStack() as stack:
            bob = await login(stack, nodes[1], "bob", "phone")
            await online_everywhere(nodes, {"bob": [1]})
            await nodes[0].create_group("team", ["alice", "bob"])
            for i in range(30):
                await nodes[0].post(AB, b"m%d" % i, sender="alice", device="web")
                await nodes[0].post("team", b"g%d" % i, sender="alice", device="web")
            assert len([m async for m in _take(bob, 60)]) == 60
            assert (bob.read_state(AB).unread, bob.read_state("team").unread) == (30, 30)
            await nodes[0].set_retention(AB, max_count=10)
            await nodes[0].set_retention("team", max_count=5)
            with trio.move_on_after(10):
                while (bob.read_state(AB).unread, bob.read_state("team").unread) != (10, 5):
                    await trio.sleep(0.02)
            assert (bob.read_state(AB).unread, bob.read_state("team").unread) == (10, 5)
            # A purge of the 1:1 chat on node 0: nothing of it is unread.
            await nodes[0].purge_conversation(AB)
            with trio.move_on_after(10):
                while bob.read_state(AB).unread or bob.view(AB):
                    await trio.sleep(0.02)
            assert bob.read_state(AB).unread == 0
            assert bob.view(AB) == []  # (told: ConvPurged, as on the purging node)
            # And of the group: it is gone with its markers, nothing of it unread.
            assert bob.view("team")
            await nodes[0].purge_conversation("team")
            with trio.move_on_after(10):
                while bob.read_state("team").unread or bob.view("team"):
                    await trio.sleep(0.02)
            assert bob.read_state("team").unread == 0
            assert bob.view("team") == []


async def test_a_caught_up_read_hint_carries_the_conversations_last_seq_as_the_hint_did(redis_cluster, tmp_path) -> None:
    """A read hint another node missed is caught up from the store
    (ClusterOps._catch_up_one): it carried the list entry's last_seq (the
    seq of the last message) where the hint -- a ReadState's -- carries the
    conversation's last seq, EDIT entries included: two meanings of one
    field (a new user's trial found the SDK un-hiding a conversation when
    they were mixed).  Both say the conversation's last seq now."""
    with trio.fail_after(60):
        async with two_nodes(redis_cluster, tmp_path) as nodes, AsyncExitStack() as stack:
            alice = await login(stack, nodes[0], "alice", "phone")
            bob = await login(stack, nodes[0], "bob", "phone")
            sent = await bob.send(AB, b"one")
            edit = await bob.edit(AB, sent.seq, b"one, edited")
            assert edit.seq == sent.seq + 1  # the EDIT entry is the conversation's last seq
            await alice.mark_read(AB, edit.seq)
            state = await first(alice, lambda ev: isinstance(ev, ReadStateChanged) and ev.state.read_seq == edit.seq)
            assert state.state.last_seq == edit.seq
            heard: list[Any] = []
            await nodes[1].server.store.cluster._catch_up_one("alice", "rd:" + AB, lambda *hint: heard.append(hint))
            assert heard == [("M", "alice", (AB, edit.seq, edit.seq, 0))]
