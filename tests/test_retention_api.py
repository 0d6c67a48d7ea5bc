"""History retention and purges through the public surface: the embedding
API (trio, asyncio, threaded), the HTTP server API, the CLI, and SDK
clients over a live broker catching up after their conversation was
trimmed or purged.  The store contract is tests/test_retention.py."""

from __future__ import annotations

import json
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio

from pimcore import frames as F
from pimcore.cli import main
from pimcore.client import AuthFailed, ClientClosed, SendError, open_client
from pimcore.embed import Pimcore, Retention, RequestRefused, open_pimcore
from pimcore.errors import ErrorCode
from pimcore.store import LmdbStore, MemoryStore, Purged, direct_conversation

from _net import FAST_CLIENT, SECRET, token
from test_http import KEY, assert_error
from test_http_api import api, call, count_remove_calls
from _proc import run_pimcore

AB = direct_conversation("alice", "bob")
#: A reclaim pass (retention included) every 20 ms.
# (dedupe_window 0: retention may remove what was just stored -- these tests
# trim seconds-old history; test_a_count_limit_spares_what_a_retry_may_still_need
# runs with the default.)
FAST_RECLAIM = {"reclaim_interval": 0.02, "dedupe_window": 0}


async def wait_floor(im: Pimcore, conv: str, floor: int) -> None:
    """Until the broker's reclaim pass has moved ``conv``'s floor there."""
    while (await im.retention(conv)).floor < floor:
        await trio.sleep(0.01)


async def take(client: Any, n: int) -> list[F.Message]:
    got = []
    async for m in client.messages():
        got.append(m)
        if len(got) == n:
            break
    return got


@pytest.mark.parametrize("kind", ["lmdb", "memory"])
async def test_an_offline_device_catches_up_after_its_conversation_was_trimmed(tmp_path: Path, kind: str) -> None:
    store = {"store": MemoryStore()} if kind == "memory" else {}
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=["tcp://127.0.0.1:0"], **FAST_RECLAIM, **store) as im:
            assert await im.set_retention(AB, max_count=3) == Retention(AB, None, 3, 0)
            async with open_client(im.urls[0], im.issue_token("alice"), "phone", config=FAST_CLIENT) as alice:
                sent = [await alice.send(AB, b"m%d" % i, local_id=i + 1) for i in range(10)]
                assert [s.seq for s in sent] == list(range(1, 11))
                await wait_floor(im, AB, 7)
                # A retry of a message still in the log is still deduplicated...
                again = await alice.send(AB, b"m8", local_id=9)
                assert (again.seq, again.msg_id) == (9, sent[8].msg_id)
                # ...one whose message expired is a new message (its record went with it).
                fresh = await alice.send(AB, b"m0", local_id=1)
                assert fresh.seq == 11
                await wait_floor(im, AB, 8)
            assert await im.unread("bob", AB) == 3
            # bob was offline throughout: his inbox lost the trimmed entries.
            async with open_client(im.urls[0], im.issue_token("bob"), "phone", config=FAST_CLIENT) as bob:
                got = await take(bob, 3)
                assert [(m.seq, m.payload) for m in got] == [(9, b"m8"), (10, b"m9"), (11, b"m0")]
                page = await bob.fetch_page(AB, 0, 50, backward=True)
                assert [m.seq for m in page.messages] == [11, 10, 9] and not page.more
                forward = await bob.fetch_history(AB, 0, 50)
                assert [m.seq for m in forward] == [9, 10, 11]  # history starts after the floor
            assert [m.seq for m in await im.history(AB, "alice")] == [11, 10, 9]
            assert await im.retention(AB) == Retention(AB, None, 3, 8)
            # Back to the broker default (none here): nothing more goes.
            assert await im.set_retention(AB) == Retention(AB, None, None, 8)
            with pytest.raises(RequestRefused) as refused:
                await im.set_retention("nope", max_age=60_000_000)
            assert refused.value.code is ErrorCode.UNKNOWN_CONVERSATION
            with pytest.raises(RequestRefused) as refused:
                await im.set_retention(AB, max_age=-1)
            assert refused.value.code is ErrorCode.BAD_REQUEST
            for bad in ({"max_count": 1.5}, {"max_count": True}):  # (not an int: TypeError, as EMBEDDING.md says)
                with pytest.raises(TypeError):
                    await im.set_retention(AB, **bad)


async def test_the_broker_default_retention_by_age(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=[], history_max_age=0.3, **FAST_RECLAIM) as im:
            await im.create_group("team", ["alice", "bob"])
            await im.set_retention("team", max_age=0)  # this one keeps everything
            for i in range(3):
                await im.post(AB, b"old%d" % i, sender="alice", device="web")
                await im.post("team", b"old%d" % i, sender="alice", device="web")
            await trio.sleep(0.35)
            await im.post(AB, b"new", sender="alice", device="web")
            await wait_floor(im, AB, 3)
            # (Under a long stall "new" may have expired too: only the old ones must.)
            assert [m.payload for m in await im.history(AB, "bob")] in ([b"new"], [])
            assert len(await im.history("team", "bob")) == 3
            assert (await im.retention("team")).floor == 0


async def test_a_count_limit_spares_what_a_retry_may_still_need(tmp_path: Path) -> None:
    # A new operator's trial (MEDIUM): under history_max_count = 150 a busy
    # group's message was trimmed two seconds after it was stored, and the
    # retry of its lost SendAck was stored again -- a second copy.  With the
    # default dedupe_window (60 s) a reclaim pass trims nothing younger.
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=[], history_max_count=2, reclaim_interval=0.02) as im:
            first = await im.post(AB, b"m0", sender="alice", device="web", idempotency_key="k0")
            for i in range(1, 5):
                await im.post(AB, b"m%d" % i, sender="alice", device="web")
            await trio.sleep(0.3)  # (several reclaim passes)
            assert sorted(m.payload for m in await im.history(AB, "bob")) == [b"m%d" % i for i in range(5)]
            again = await im.post(AB, b"m0", sender="alice", device="web", idempotency_key="k0")
            assert (again.seq, again.msg_id) == (first.seq, first.msg_id)  # the retry: not a second copy
            assert len(await im.history(AB, "bob")) == 5


async def test_a_restarted_broker_applies_the_default_retention_with_no_connection_or_post(tmp_path: Path) -> None:
    # A new-user pass: history posted, the broker restarted with a
    # history_max_count, then left alone (no connection, no post): the
    # reclaim pass never ran -- it was armed only by a connection, a post or
    # a retention setting -- so nothing was ever trimmed.
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=[]) as im:
            for i in range(6):
                await im.post(AB, b"m%d" % i, sender="alice", device="web")
        async with open_pimcore(data_dir=tmp_path, listen=[], history_max_count=2, **FAST_RECLAIM) as im:
            await wait_floor(im, AB, 4)
            assert [m.payload for m in await im.history(AB, "bob")] == [b"m5", b"m4"]


async def test_a_restarted_broker_applies_a_conversations_retention_with_no_connection_or_post(tmp_path: Path) -> None:
    # The same with no default, a retention of one conversation set before
    # the restart: the core cannot know of it, the store says so at start.
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=[]) as im:
            await im.set_retention(AB, max_count=2)
            for i in range(6):
                await im.post(AB, b"m%d" % i, sender="alice", device="web")
        async with open_pimcore(data_dir=tmp_path, listen=[], **FAST_RECLAIM) as im:
            await wait_floor(im, AB, 4)
            assert [m.payload for m in await im.history(AB, "bob")] == [b"m5", b"m4"]


async def test_purged_conversation_is_gone_for_members_online_and_offline(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=["tcp://127.0.0.1:0"]) as im:
            await im.create_group("team", ["alice", "bob", "carol"])
            async with open_client(im.urls[0], im.issue_token("alice"), "phone", config=FAST_CLIENT) as alice:
                for i in range(3):
                    await alice.send("team", b"t%d" % i)
                done = await im.purge_conversation("team")
                assert (done.messages, done.entries) == (3, 9)
                with pytest.raises(SendError) as refused:
                    await alice.fetch_history("team")
                assert refused.value.code is ErrorCode.UNKNOWN_CONVERSATION
                with pytest.raises(SendError):
                    await alice.send("team", b"anyone?")
                await alice.send(AB, b"after")
            # Idempotent.
            assert await im.purge_conversation("team") == Purged(0, 0, last_seq=3)
            with pytest.raises(RequestRefused) as refused:
                await im.purge_conversation("a b")
            assert refused.value.code is ErrorCode.BAD_REQUEST
            # bob was offline: his inbox holds only what came after.
            async with open_client(im.urls[0], im.issue_token("bob"), "phone", config=FAST_CLIENT) as bob:
                [m] = await take(bob, 1)
                assert (m.conv, m.payload) == (AB, b"after")
            assert [c.conv for c in await im.conversations("bob")] == [AB]
            # The id can be created again; seqs continue after the purged ones.
            await im.create_group("team", ["bob"])
            assert (await im.post("team", b"fresh")).seq == 4


async def test_a_device_online_during_a_purge_drops_the_purged_messages(tmp_path: Path) -> None:
    # A new user's trial: bob's phone, online while the host purged a group
    # and created it again, showed the purged messages beside the new ones
    # until its next login.  The SDK asks for CAP_CONV_PURGED and drops
    # what the purge removed when told (ConversationPurged).
    from pimcore.client import ConversationPurged

    from _net import wait_for

    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=["tcp://127.0.0.1:0"]) as im:
            await im.create_group("team", ["alice", "bob"])
            async with open_client(im.urls[0], im.issue_token("bob"), "phone", config=FAST_CLIENT) as bob:
                for i in range(3):
                    await im.post("team", b"old%d" % i, sender="alice", device="web")
                    await im.post(AB, b"d%d" % i, sender="alice", device="web")
                assert len(await take(bob, 6)) == 6
                await im.purge_conversation("team")
                assert await wait_for(bob, lambda ev: isinstance(ev, ConversationPurged)) == ConversationPurged("team", 3, True)
                assert bob.view("team") == [] and bob.read_state("team").unread == 0
                await im.create_group("team", ["alice", "bob"])
                await im.post("team", b"new", sender="alice", device="web")
                await im.purge_conversation(AB)
                assert await wait_for(bob, lambda ev: isinstance(ev, ConversationPurged)) == ConversationPurged(AB, 3, False)
                with trio.move_on_after(5):
                    while not bob.view("team"):
                        await trio.sleep(0.01)
                assert [(m.seq, m.payload) for m in bob.view("team") if m.kind == F.MessageKind.MESSAGE] == [(4, b"new")]
                assert bob.view(AB) == []


@asynccontextmanager
async def bob_behind_a_proxy(tmp_path: Path) -> AsyncIterator[tuple[Any, int, Any, Any]]:
    """A broker with group "team" (alice, bob) and bob's phone connected
    through a chaos proxy (whose ``target_port`` cuts the link): (the
    handle, the broker's port, the proxy, bob's client)."""
    from pimcore.testing.chaos import ChaosConfig, open_chaos_proxy

    async with open_pimcore(data_dir=tmp_path, listen=["tcp://127.0.0.1:0"]) as im:
        port = int(im.urls[0].rsplit(":", 1)[1])
        await im.create_group("team", ["alice", "bob"])
        async with open_chaos_proxy("127.0.0.1", port, ChaosConfig()) as proxy, open_client(
            f"tcp://127.0.0.1:{proxy.port}", im.issue_token("bob"), "phone", config=FAST_CLIENT
        ) as bob:
            yield im, port, proxy, bob


async def test_a_device_away_while_a_conversation_was_purged_and_used_again_drops_the_purged_messages(tmp_path: Path) -> None:
    # A new user's trial (HIGH): bob's phone, its link down while the host
    # purged a group, created it again and posted, and purged a 1:1 chat
    # that then got a new message, showed the purged messages beside the
    # new ones after it reconnected, and counted the group's unread from
    # its old marker (3 where the broker said 1).  Its login now carries
    # each conversation's purge point (ConvPurged, before the ReadStates).
    from pimcore.client import ConversationPurged, MessageReceived

    from _proc import free_port

    with trio.fail_after(30):
        async with bob_behind_a_proxy(tmp_path) as (im, port, proxy, bob):
            for i in range(5):
                await im.post("team", b"old%d" % i, sender="alice", device="web")
            for i in range(3):
                await im.post(AB, b"d%d" % i, sender="alice", device="web")
            assert len(await take(bob, 8)) == 8
            await bob.mark_read("team", 3)
            with trio.move_on_after(5):
                while bob.read_state("team").read_seq != 3 or bob.read_state("team").unread != 2:
                    await trio.sleep(0.01)
            # The link goes down (the proxy cannot reach the broker).
            proxy.target_port = free_port()
            proxy.reset_all()
            await im.purge_conversation("team")
            await im.purge_conversation(AB)
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"new-g", sender="alice", device="web")
            await im.post(AB, b"new-d", sender="alice", device="web")
            proxy.target_port = port
            told, got = [], []
            async for ev in bob.events():
                if isinstance(ev, ConversationPurged):
                    told.append(ev)
                elif isinstance(ev, MessageReceived):
                    got.append(ev.message.payload)
                if len(got) == 2 and len(told) == 2:
                    break
            assert sorted(told, key=lambda e: e.conv) == [ConversationPurged(AB, 3, False), ConversationPurged("team", 5, False)]
            assert sorted(got) == [b"new-d", b"new-g"]
            assert [m.payload for m in bob.view("team") if m.kind == F.MessageKind.MESSAGE] == [b"new-g"]
            assert [m.payload for m in bob.view(AB)] == [b"new-d"]
            assert bob.read_state("team").unread == 1 and bob.read_state(AB).unread == 1


async def until_unread(client: Any, conv: str, unread: int) -> None:
    """Until the SDK's read state of ``conv`` counts ``unread`` (5 s at most,
    then the assertion shows what it counts)."""
    with trio.move_on_after(5):
        while client.read_state(conv).unread != unread:
            await trio.sleep(0.01)
    assert client.read_state(conv).unread == unread


async def test_a_connected_device_gets_the_brokers_unread_count_after_retention_and_a_purge(tmp_path: Path) -> None:
    # A new user's trial: bob's connected SDK kept read_state().unread at 30
    # after retention kept 10, and at 31 after a purge and one more message,
    # while the broker (HTTP unread, conversation list, a fresh login) said
    # 10 and 1, until his next confirmed mark-as-read or reconnect.
    async def http_unread(c: Any) -> int:
        status, body = await call(c, "GET", f"/v1/users/bob/unread?conv={AB}")
        assert status == 200
        return body["unread"]

    with trio.fail_after(30):
        async with api(tmp_path, **FAST_RECLAIM) as (im, h, c):
            async with open_client(im.urls[0], token("bob"), "phone", config=FAST_CLIENT) as bob:
                for i in range(30):
                    await im.post(AB, b"m%d" % i, sender="alice", device="web")
                await take(bob, 30)
                await until_unread(bob, AB, 30)
                assert await call(c, "PUT", f"/v1/conversations/{AB}/retention", {"max_count": 10}) == (
                    200, {"conv": AB, "max_age": None, "max_count": 10, "floor": 0})
                await wait_floor(im, AB, 20)
                assert await http_unread(c) == 10
                await until_unread(bob, AB, 10)  # it stayed at 30
                assert bob.read_state(AB) == F.ReadState(AB, 0, 30, 10)
                # Inbox entries: alice's 10 (she has no device: nothing of hers
                # is reclaimed) and bob's 10, unless the reclaim pass (every 20
                # ms) already took his, acked by his only device (local CI).
                status, body = await call(c, "DELETE", f"/v1/conversations/{AB}")
                assert status == 200 and body["conv"] == AB and body["messages"] == 10, body
                assert body["entries"] in (10, 20), body
                assert await http_unread(c) == 0
                await until_unread(bob, AB, 0)
                await im.post(AB, b"after", sender="alice", device="web")
                [m] = await take(bob, 1)
                assert m.seq == 31 and await http_unread(c) == 1
                assert bob.read_state(AB) == F.ReadState(AB, 0, 31, 1)  # it was 31


async def test_purge_user_closes_sessions_leaves_groups_and_deletes_their_data(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=["tcp://127.0.0.1:0"]) as im:
            await im.create_group("team", ["alice", "bob"])
            old = im.issue_token("bob")
            async with open_client(im.urls[0], im.issue_token("alice"), "phone", config=FAST_CLIENT) as alice:
                async with open_client(im.urls[0], old, "phone", config=FAST_CLIENT) as bob:
                    await bob.send("team", b"secret")
                    await bob.send(AB, b"private")
                    assert [m.payload for m in await take(alice, 2)] == [b"secret", b"private"]
                    done = await im.purge_user("bob")
                    assert (done.messages, done.devices) == (2, 1)
                    assert [c.conv for c in done.changes] == ["team"]
                    with pytest.raises(ClientClosed, match="deleted"):
                        await bob.send(AB, b"still here?")
                # The other members get the LEFT entry like any message.
                [left] = await take(alice, 1)
                assert (left.conv, left.kind, left.sender) == ("team", F.MessageKind.LEFT, "bob")
            assert [m.payload for m in await im.history("team", "alice", backward=False)][:2] == [b"", b""]
            assert [m.payload for m in await im.history(AB, "alice")] == [b""]
            assert await im.conversations("bob") == []
            pos = await im.read_positions("bob")
            assert pos.devices == () and pos.floor == pos.head
            # Tokens issued before the purge are refused; a new one works.
            with pytest.raises(AuthFailed):
                async with open_client(im.urls[0], old, "phone", config=FAST_CLIENT):
                    pass
            await trio.sleep(0.01)
            async with open_client(im.urls[0], im.issue_token("bob"), "tablet", config=FAST_CLIENT) as bob:
                await bob.send(AB, b"hello again")
            assert await im.purge_user("nobody") == Purged(0, 0, 0)
            done = await im.purge_user("bob")
            assert (done.messages, done.devices, done.changes) == (1, 1, ())


async def test_retention_and_purge_over_http(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"x", sender="alice", device="web")
            assert await call(c, "GET", "/v1/conversations/team/retention") == (
                200, {"conv": "team", "max_age": None, "max_count": None, "floor": 0})
            assert await call(c, "PUT", "/v1/conversations/team/retention", {"max_age": 86_400_000_000}) == (
                200, {"conv": "team", "max_age": 86_400_000_000, "max_count": None, "floor": 0})
            assert_error(*await call(c, "PUT", "/v1/conversations/team/retention", {"max_count": -1}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "PUT", "/v1/conversations/nope/retention", {"max_count": 1}), 404,
                         "UNKNOWN_CONVERSATION")
            assert await call(c, "DELETE", "/v1/conversations/team") == (
                200, {"conv": "team", "messages": 1, "entries": 2})
            assert await call(c, "DELETE", "/v1/conversations/team") == (
                200, {"conv": "team", "messages": 0, "entries": 0})
            await im.create_group("club", ["alice", "bob"])
            await im.post(AB, b"y", sender="bob", device="web")
            assert await call(c, "DELETE", "/v1/users/bob") == (
                200, {"user": "bob", "messages": 1, "entries": 2, "devices": 0, "left": ["club"]})
            assert_error(*await call(c, "DELETE", "/v1/users/b%20b"), 400, "BAD_REQUEST")
            assert_error(*await call(c, "DELETE", "/v1/users/bob", key=None), 401, "AUTH_FAILED")


async def test_cli_purges_through_the_http_api(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"x", sender="bob", device="web")
            base = ["--http", h.url, "--api-key", KEY]
            run = trio.to_thread.run_sync
            assert await run(main, ["retention", "team", "--max-count", "5", *base]) == 0
            assert (await im.retention("team")).max_count == 5
            assert await run(main, ["purge", "user", "bob", *base]) == 0
            assert await run(main, ["purge", "conversation", "team", *base]) == 0
            with pytest.raises(RequestRefused):
                await im.history("team", "alice")
            assert await run(main, ["purge", "conversation", "nope", "--http", h.url, "--api-key", "wrong"]) == 2


#: One script of `pimcore group` calls, run through --http and on a data
#: directory: (argv, exit code, stdout, what stderr holds over --http).
GROUP_SCRIPT = [
    (["create", "team", "alice", "bob"], 0, "team: 2 members: alice bob\n", ""),
    (["create", "--history-visible", "club", "erin"], 0, "club: 1 member: erin\n", ""),
    # Options among the positionals ("unrecognized arguments: gina hal").
    (["create", "vis", "--history-visible", "gina", "hal"], 0, "vis: 2 members: gina hal\n", ""),
    (["show", "vis"], 0, "vis: 2 members: gina hal\nhistory visible to later members: yes\n", ""),
    (["add", "team", "carol", "dave"], 0, "team: 4 members: alice bob carol dave\n", ""),
    (["add", "team"], 2, "", "add: give at least one user"),  # (exit 0, nothing said)
    (["remove", "team", "--history-visible"], 2, "", "--history-visible is for create"),
    (["remove", "team"], 2, "", "remove: give at least one user"),
    # A user who is not a member is named, not silently skipped (exit 0: the
    # group is as asked); nor is one who already is.
    (["remove", "team", "alice", "dave", "zed"], 0, "team: 2 members: bob carol\n",
     "pimcore group: not a member of 'team', so not removed: zed\n"),
    (["add", "team", "bob"], 0, "team: 2 members: bob carol\n",
     "pimcore group: already a member of 'team', so not added: bob\n"),
    (["remove", "team", "yan", "zed", "yan"], 0, "team: 2 members: bob carol\n",
     "pimcore group: not members of 'team', so not removed: yan, zed\n"),
    (["show", "team"], 0, "team: 2 members: bob carol\nhistory visible to later members: no\n", ""),
    (["show", "club"], 0, "club: 1 member: erin\nhistory visible to later members: yes\n", ""),
    # A refusal is the same sentence either way (over --http it was "members
    # of 'nope': UNKNOWN_CONVERSATION", on the data directory "no group 'nope'").
    (["add", "nope", "carol"], 2, "", "pimcore group: no group 'nope' (pimcore group create nope USER... makes one)\n"),
    (["remove", "nope", "carol"], 2, "", "pimcore group: no group 'nope' (pimcore group create nope USER... makes one)\n"),
    (["show", "nope"], 2, "", "pimcore group: no group 'nope' (pimcore group create nope USER... makes one)\n"),
    (["create", "team", "zed"], 2, "", "pimcore group: group 'team' exists already\n"),
    (["add", "team", "b b"], 2, "", "pimcore group: BAD_REQUEST: user id 'b b' has the character ' '"),
    # Removing everyone is refused as a whole (nothing removed): purge to delete a group.
    (["remove", "team", "carol", "bob"], 2, "",
     "pimcore group: group 'team' not changed: a group needs at least one member: removing all"),
    (["show", "team"], 0, "team: 2 members: bob carol\nhistory visible to later members: no\n", ""),
    (["show", "team", "alice"], 2, "", "show takes no users"),
    (["add", "--history-visible", "team", "erin"], 2, "", "--history-visible is for create"),
    (["add", "team", "--history-visible", "erin"], 2, "", "--history-visible is for create"),
    (["create", "empty"], 2, "", "pimcore group: group 'empty' not changed: a group needs at least one member"
     " (its creator or an owner)\n"),
    (["show", "empty"], 2, "", "pimcore group: no group 'empty' (pimcore group create empty USER... makes one)\n"),
    (["create", "solo", "ann"], 0, "solo: 1 member: ann\n", ""),
    (["remove", "solo", "ann"], 2, "", "to delete the group, purge it (pimcore purge conversation CONV"),
    (["show", "solo"], 0, "solo: 1 member: ann\nhistory visible to later members: no\n", ""),
]


async def test_cli_manages_groups_through_the_http_api(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Next to a broker that is its store's only writer (durability log): the
    # data directory's store refuses writes, --http goes through the broker.
    with trio.fail_after(60):
        async with api(tmp_path / "data", durability="log") as (im, h, c):
            run = trio.to_thread.run_sync
            capsys.readouterr()
            for argv, code, out, err in GROUP_SCRIPT:
                got = await run(main, ["group", *argv, "--http", h.url, "--api-key", KEY])
                std = capsys.readouterr()
                assert (got, std.out) == (code, out), (argv, std)
                assert std.err.startswith("pimcore group: ") if err else std.err == "", (argv, std.err)
                if err.endswith("\n"):  # the whole of it (a note, or a refusal)
                    assert std.err == err, (argv, std.err)
                assert err in std.err and "Traceback" not in std.err, (argv, std.err)
            # --history-visible reached the broker: a member added later reads what came before.
            await im.post("club", b"before", sender="erin", device="web")
            assert await run(main, ["group", "add", "club", "finn", "--http", h.url, "--api-key", KEY]) == 0
            assert b"before" in [m.payload for m in await im.history("club", "finn")]
            assert await run(main, ["group", "show", "team", "--http", h.url, "--api-key", "wrong"]) == 2
            err = capsys.readouterr().err
            assert "AUTH_FAILED" in err and "(the key from --api-key;" in err, err  # (it said not which key)
            with pytest.MonkeyPatch.context() as m:
                m.setenv("PIMCORE_API_KEY", "wrong-from-env")
                assert await run(main, ["group", "show", "team", "--http", h.url]) == 2
            err = capsys.readouterr().err
            assert "(the key from $PIMCORE_API_KEY;" in err and "wrong-from-env" not in err, err
            # The data directory's store refuses to write next to this broker, and says to use --http.
            r = await run(lambda: run_pimcore("group", "add", "team", "erin", "--data-dir", tmp_path / "data"))
            assert r.returncode == 2 and "--http" in r.stderr and "Traceback" not in r.stderr, r.stderr
            # ... as do purge and retention (they said only "use its HTTP API").
            for cmd in (["purge", "user", "bob"], ["retention", "team", "--max-count", "3"]):
                r = await run(lambda: run_pimcore(*cmd, "--data-dir", tmp_path / "data"))
                assert r.returncode == 2 and "give --http URL" in r.stderr, (cmd, r.stderr)
            assert (await im.members("team")) == ("bob", "carol")


def test_cli_groups_on_a_data_directory_print_what_http_prints(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    data = str(tmp_path / "data")
    for i, (argv, code, out, err) in enumerate(GROUP_SCRIPT):
        got = main(["group", *argv, "--data-dir", data])
        std = capsys.readouterr()
        assert (got, std.out) == (code, out), (argv, std)
        if i == 0:
            # A create that makes a new store says so: in the wrong folder,
            # the group would be in a store no broker uses.
            assert std.err == (f"pimcore group: no store in {data} yet: created one (a broker uses it if started"
                               f" with --data-dir {data})\n"), std.err
            continue
        assert std.err.startswith("pimcore group: ") if code else std.err == err, (argv, std.err)
        # The same sentence as over --http.
        assert err in std.err and (std.err == err or not err.endswith("\n")), (argv, std.err)


async def test_members_over_http_and_the_handle(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            assert await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["bob", "alice"],
                                                        "history_visible": True}) == (
                201, {"conv": "team", "members": ["alice", "bob"]})
            assert await call(c, "GET", "/v1/groups/team/members") == (
                200, {"conv": "team", "members": ["alice", "bob"], "history_visible": True})
            assert await im.members("team") == ("alice", "bob") and await im.history_visible("team") is True
            await im.create_group("club", ["carol"])
            assert await call(c, "GET", "/v1/groups/club/members") == (
                200, {"conv": "club", "members": ["carol"], "history_visible": False})
            assert await im.history_visible("club") is False
            await im.remove_members("team", ["alice"])
            assert await call(c, "GET", "/v1/groups/team/members") == (
                200, {"conv": "team", "members": ["bob"], "history_visible": True})
            assert_error(*await call(c, "GET", "/v1/groups/nope/members"), 404, "UNKNOWN_CONVERSATION")
            assert_error(*await call(c, "GET", "/v1/groups/b%20b/members"), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", "/v1/groups", {"conv": "g2", "members": [], "history_visible": 1}),
                         400, "BAD_REQUEST")
            # A group of no one is refused (it was created), on every surface.
            status, body = await call(c, "POST", "/v1/groups", {"conv": "g2", "members": []})
            assert_error(status, body, 400, "BAD_REQUEST")
            assert "a group needs at least one member" in body["error"]["message"], body
            with pytest.raises(RequestRefused) as refused:
                await im.create_group("g2", [])
            assert refused.value.code is ErrorCode.BAD_REQUEST and "at least one member" in str(refused.value)
            assert_error(*await call(c, "GET", "/v1/groups/g2/members"), 404, "UNKNOWN_CONVERSATION")
            for read in (im.members, im.history_visible):
                with pytest.raises(RequestRefused) as refused:
                    await read("nope")
                assert refused.value.code is ErrorCode.UNKNOWN_CONVERSATION


async def test_removing_every_member_is_refused_by_the_handle_and_the_http_api(tmp_path: Path) -> None:
    """Removing every member left a group of no one (``team: 0 members``),
    and a post to it was stored.  Now the handle and DELETE
    /v1/groups/{conv}/members/{user} refuse such a removal (BAD_REQUEST,
    saying to purge the group to delete it) and remove no one."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice", "bob", "carol"])
            with pytest.raises(RequestRefused) as refused:
                await im.remove_members("team", ["alice", "bob", "carol"])
            assert refused.value.code is ErrorCode.BAD_REQUEST
            assert "removing all its remaining members is refused" in str(refused.value)
            assert "purge_conversation" in str(refused.value)
            assert await im.members("team") == ("alice", "bob", "carol")
            assert (await im.remove_members("team", ["alice"])).members == ("bob", "carol")
            # Over HTTP one DELETE per user: the last remaining one is refused.
            assert await call(c, "DELETE", "/v1/groups/team/members/bob") == (200, {"conv": "team", "members": ["carol"]})
            status, body = await call(c, "DELETE", "/v1/groups/team/members/carol")
            assert_error(status, body, 400, "BAD_REQUEST")
            assert "to delete the group, purge it" in body["error"]["message"], body
            assert await im.members("team") == ("carol",)
            with pytest.raises(RequestRefused, match="purge"):
                await im.remove_members("team", ["carol"])
            # A LEFT entry each for alice and bob, then the post: nothing of the refusals.
            assert (await im.post("team", b"still here", sender="carol", device="web")).seq == 3
            # Purging the group deletes it.
            await im.purge_conversation("team")
            assert_error(*await call(c, "GET", "/v1/groups/team/members"), 404, "UNKNOWN_CONVERSATION")


async def test_cli_removes_several_members_over_http_in_one_call(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """``group remove --http`` sent one DELETE per user, each an fsync'd
    commit (300 users took 16.5 s): now one POST
    /v1/groups/{conv}/members/remove, one store op, and the same output
    and notes."""
    with trio.fail_after(30):
        async with api(tmp_path / "data") as (im, h, c):
            users = [f"u{i}" for i in range(30)]
            await im.create_group("team", [*users, "keep"])
            calls = count_remove_calls(monkeypatch, im)
            capsys.readouterr()
            got = await trio.to_thread.run_sync(main, ["group", "remove", "team", *users, "zed", "yan", "--http",
                                                       h.url, "--api-key", KEY])
            std = capsys.readouterr()
            assert (got, std.out) == (0, "team: 1 member: keep\n"), std
            assert std.err == "pimcore group: not members of 'team', so not removed: zed, yan\n", std.err
            assert len(calls) == 1 and sorted(calls[0]) == sorted([*users, "zed", "yan"]), calls
            assert await im.members("team") == ("keep",)


def test_cli_on_a_data_directory_says_to_purge_when_removing_everyone(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    data = str(tmp_path / "data")
    assert main(["group", "create", "team", "alice", "bob", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["group", "remove", "team", "alice", "bob", "--data-dir", data]) == 2
    std = capsys.readouterr()
    assert std.out == "" and std.err.startswith("pimcore group: group 'team' not changed: a group"), std
    assert "pimcore purge conversation" in std.err, std.err
    assert main(["group", "show", "team", "--data-dir", data]) == 0
    assert capsys.readouterr().out.startswith("team: 2 members: alice bob\n")


async def test_cli_shows_the_http_apis_refusal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The API's error code and message reach the user, not just the status.
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            run = trio.to_thread.run_sync
            capsys.readouterr()
            assert await run(main, ["retention", "nope", "--max-count", "5", "--http", h.url, "--api-key", KEY]) == 2
            err = capsys.readouterr().err
            assert "UNKNOWN_CONVERSATION" in err and "HTTP 404" not in err, err
            assert await run(main, ["purge", "user", "bob", "--http", h.url, "--api-key", "wrong"]) == 2
            assert "AUTH_FAILED" in capsys.readouterr().err
            # Not "UNKNOWN_CONVERSATION: ...: UNKNOWN_CONVERSATION", nor the code at
            # all: what a data directory's group says.
            assert await run(main, ["group", "show", "nope", "--http", h.url, "--api-key", KEY]) == 2
            err = capsys.readouterr().err
            assert err == "pimcore group: no group 'nope' (pimcore group create nope USER... makes one)\n", err
            # --http given the broker's binary listener (both are tcp:// URLs)
            # ended in an http.client traceback.
            # As tcp://, it is refused up front (the settings' spelling of the
            # HTTP listener is not taken for http://); as http://, the
            # broker's answer (its Close) is recognised and named.
            binary = "http://" + im.urls[0].removeprefix("tcp://")
            for cmd in (["group", "show", "team"], ["purge", "user", "bob"]):
                assert await run(main, [*cmd, "--http", im.urls[0], "--api-key", KEY]) == 2  # (not raised)
                err = capsys.readouterr().err
                assert f"pimcore {cmd[0]}: --http {im.urls[0]}: the HTTP API is at an http:// or https:// URL" in err, err
                assert await run(main, [*cmd, "--http", binary, "--api-key", KEY]) == 2  # (not raised)
                err = capsys.readouterr().err
                assert err == (f"pimcore {cmd[0]}: cannot use {binary}: it is a pimcore tcp:// broker listener, not the"
                               " HTTP API: use the --http URL `pimcore serve` prints as 'listening on http://...'\n"), err
            # A max age that is no number of seconds was a traceback too.
            for bad in ("nan", "inf", "-inf", "1e300"):
                assert await run(main, ["retention", "team", f"--max-age={bad}", "--http", h.url, "--api-key", KEY]) == 2
                assert "--max-age" in capsys.readouterr().err
            # A positive age below 1 µs is 1 µs: it was stored as 0, "no limit".
            await im.create_group("team", ["alice"])
            assert await run(main, ["retention", "team", "--max-age", "0.0000001", "--http", h.url, "--api-key", KEY]) == 0
            assert (await im.retention("team")).max_age == 1


def test_cli_on_a_stopped_brokers_data_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    with LmdbStore(data / "store") as store:
        store.create_group("team", ["alice", "bob"], 1)
    assert main(["retention", "team", "--max-count", "2", "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"conv": "team", "max_age": None, "max_count": 2, "floor": 0}
    assert main(["retention", "team", "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_count"] == 2
    assert main(["purge", "user", "bob", "--data-dir", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"user": "bob", "messages": 0, "entries": 1, "devices": 0, "left": ["team"]}
    assert main(["purge", "conversation", "team", "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"conv": "team", "messages": 1, "entries": 1}  # alice's LEFT entry
    with LmdbStore(data / "store", owner=False) as store:
        assert not store.conversation_exists("team") and store.conversations("bob") == []
    assert main(["purge", "user", "b b", "--data-dir", str(data)]) == 2
    assert main(["retention", "team", "--max-count", "-1", "--data-dir", str(data)]) == 2
    assert "must be >= 0" in capsys.readouterr().err


def test_the_asyncio_and_threaded_handles_delegate(tmp_path: Path) -> None:
    import asyncio

    from pimcore.asyncio import open_pimcore as open_asyncio
    from pimcore.threaded import open_pimcore_thread

    im = open_pimcore_thread(data_dir=tmp_path / "t", secret=SECRET.decode())
    try:
        im.create_group("team", ["alice"])
        im.create_group("club", ["carol", "bob"], history_visible=True)
        assert im.members("team") == ("alice",) and im.members("club") == ("bob", "carol")
        assert (im.history_visible("team"), im.history_visible("club")) == (False, True)
        with pytest.raises(RequestRefused) as refused:
            im.create_group("empty", [])
        assert refused.value.code is ErrorCode.BAD_REQUEST
        assert im.set_retention("team", max_count=4) == Retention("team", None, 4, 0)
        assert im.retention("team").max_count == 4
        assert im.purge_conversation("team").messages == 0
        assert im.purge_user("alice") == Purged(0, 0, 0)
    finally:
        im.close()

    async def main_() -> None:
        async with open_asyncio(data_dir=tmp_path / "a", secret=SECRET.decode()) as h:
            await h.create_group("team", ["alice"])
            await h.create_group("club", ["carol", "bob"], history_visible=True)
            assert await h.members("team") == ("alice",) and await h.members("club") == ("bob", "carol")
            assert (await h.history_visible("team"), await h.history_visible("club")) == (False, True)
            with pytest.raises(RequestRefused) as refused:
                await h.create_group("empty", ())
            assert refused.value.code is ErrorCode.BAD_REQUEST
            assert (await h.set_retention("team", max_age=60_000_000)).max_age == 60_000_000
            assert (await h.retention("team")).max_age == 60_000_000
            assert (await h.purge_conversation("team")).entries == 0
            assert (await h.purge_user("alice")).devices == 0

    asyncio.run(main_())


def test_adding_or_removing_no_one_is_refused_by_every_handle(tmp_path: Path) -> None:
    """add_members/remove_members of an empty list returned a GroupChanged
    that changed nothing, where `pimcore group add NAME` (no user) and
    create_group refuse: a ValueError now, on the trio, threaded and asyncio
    handles alike; POST /v1/groups/{conv}/members answers 400."""
    import asyncio

    from pimcore.asyncio import open_pimcore as open_asyncio
    from pimcore.threaded import open_pimcore_thread

    async def trio_main() -> None:
        with trio.fail_after(30):
            async with api(tmp_path / "h") as (im, h, c):
                await im.create_group("team", ["alice"])
                for change in (im.add_members, im.remove_members):
                    for empty in ([], (), set()):
                        with pytest.raises(ValueError, match="at least one user"):
                            await change("team", empty)
                status, body = await call(c, "POST", "/v1/groups/team/members", {"users": []})
                assert_error(status, body, 400, "BAD_REQUEST")
                assert "at least one user" in body["error"]["message"], body
                assert await im.members("team") == ("alice",)
                # (A LEFT or JOINED entry would have taken seq 1.)
                assert (await im.post("team", b"x", sender="alice", device="web")).seq == 1

    trio.run(trio_main)

    im = open_pimcore_thread(data_dir=tmp_path / "t", secret=SECRET.decode())
    try:
        im.create_group("team", ["alice"])
        for change in (im.add_members, im.remove_members):
            with pytest.raises(ValueError, match="at least one user"):
                change("team", [])
        assert im.members("team") == ("alice",)
    finally:
        im.close()

    async def asyncio_main() -> None:
        async with open_asyncio(data_dir=tmp_path / "a", secret=SECRET.decode()) as h:
            await h.create_group("team", ["alice"])
            for change in (h.add_members, h.remove_members):
                with pytest.raises(ValueError, match="at least one user"):
                    await change("team", [])
            assert await h.members("team") == ("alice",)

    asyncio.run(asyncio_main())


@pytest.mark.slow
async def test_cli_trusts_a_self_signed_https_api_given_its_ca_with_cafile(tmp_path: Path) -> None:
    # The commands that take --http had no way to trust a private CA: an
    # https:// API with a self-signed certificate could not be used at all.
    # (Run as processes: stderr is then the command's alone, not the
    # embedded broker's log of the refused handshakes too.)
    import ssl

    import trustme

    from pimcore.http import HttpConfig, open_http_server

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))

    async def cli(*argv: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: run_pimcore(*argv))

    # (18 commands, each a process of about a second's start, more on a
    # loaded machine: 60 s ran out once with four workers on two cores.)
    with trio.fail_after(240):
        async with open_pimcore(data_dir=tmp_path / "data", store=MemoryStore(), secret=SECRET.decode()) as im:
            cfg = HttpConfig(api_keys=(KEY,), scheme="tls", ssl_context=server_ctx)
            async with open_http_server(im.server, cfg, handle=im) as h:
                assert h.url.startswith("https://")
                base = ["--http", h.url, "--api-key", KEY]
                cmds = (["group", "create", "team", "alice", "bob"], ["group", "show", "team"],
                        ["retention", "team", "--max-count", "5"], ["retention", "team"],
                        ["purge", "user", "bob"])
                for cmd in cmds:
                    # Without --cafile (or with the wrong CA): refused, saying why and what to give.
                    for extra in ([], ["--cafile", other]):
                        r = await cli(*cmd, *base, *extra)
                        assert r.returncode == 2 and r.stdout == "", (cmd, extra, r)
                        assert r.stderr.startswith(f"pimcore {cmd[0]}: the certificate of {h.url} did not verify"), (
                            cmd, r.stderr)
                        assert "--cafile" in r.stderr and r.stderr.count("\n") == 1, (cmd, r.stderr)
                    r = await cli(*cmd, *base, "--cafile", ca_file)
                    assert (r.returncode, r.stderr) == (0, ""), (cmd, r)
                assert await im.members("team") == ("alice",)
                assert (await im.retention("team")).max_count == 5
                # A CA file that does not load, and --cafile for a plain http:// API, are said clearly.
                for path in (tmp_path / "missing.pem", tmp_path / "data"):
                    r = await cli("group", "show", "team", *base, "--cafile", path)
                    assert r.returncode == 2 and r.stderr.startswith(f"pimcore group: --cafile {path}: "), r.stderr
                    assert r.stderr.count("\n") == 1, r.stderr
        async with api(tmp_path / "plain") as (im, h, c):
            await im.create_group("team", ["alice"])
            r = await cli("group", "show", "team", "--http", h.url, "--api-key", KEY, "--cafile", ca_file)
            assert r.returncode == 2 and "--cafile is for an https:// API" in r.stderr, r.stderr
            assert r.stderr.count("\n") == 1, r.stderr


NO_SUCH = "no such conversation 'nope' (UNKNOWN_CONVERSATION)"


def test_cli_retention_of_a_conversation_that_does_not_exist_is_refused(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    # It showed the broker defaults and floor 0 as if the group existed.
    data = tmp_path / "data"
    with LmdbStore(data / "store") as store:
        store.create_group("team", ["alice", "bob"], 1)
        store.create_group("gone", ["alice"], 1)
    assert main(["purge", "conversation", "gone", "--data-dir", str(data)]) == 0
    capsys.readouterr()
    for conv in ("nope", "gone"):
        for extra in ([], ["--max-count", "3"], ["--default"]):
            assert main(["retention", conv, *extra, "--data-dir", str(data)]) == 2, (conv, extra)
            std = capsys.readouterr()
            assert std.out == "" and std.err.startswith(
                f"pimcore retention: {NO_SUCH.replace('nope', conv)}"), (conv, extra, std)
    # A group, and a direct id (it needs no creation), are shown.
    for conv in ("team", AB):
        assert main(["retention", conv, "--data-dir", str(data), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["conv"] == conv


async def test_cli_retention_over_http_of_a_conversation_that_does_not_exist_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            run = trio.to_thread.run_sync
            base = ["--http", h.url, "--api-key", KEY]
            capsys.readouterr()
            for extra in ([], ["--max-count", "3"], ["--default"]):
                assert await run(main, ["retention", "nope", *extra, *base]) == 2, extra
                std = capsys.readouterr()
                assert std.out == "" and std.err.startswith(f"pimcore retention: {NO_SUCH}"), (extra, std)
            for conv in ("team", AB):
                assert await run(main, ["retention", conv, *base, "--json"]) == 0
                assert json.loads(capsys.readouterr().out)["conv"] == conv


async def test_cli_refuses_a_negative_max_age_locally_and_over_http(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--max-age -5 was clamped to 0 before the sign check: exit 0 and "no
    limit" set, silently (--max-count -1 was refused).  Refused like it."""
    data = tmp_path / "data"
    with LmdbStore(data / "store") as store:
        store.create_group("team", ["alice", "bob"], 1)
    assert main(["retention", "team", "--max-age", "60", "--data-dir", str(data)]) == 0
    capsys.readouterr()
    for bad in ("-5", "-0.0000001", "-1e9"):
        assert main(["retention", "team", f"--max-age={bad}", "--data-dir", str(data)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "--max-age and --max-count must be >= 0" in err, (bad, out, err)
    assert main(["retention", "team", "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_age"] == 60_000_000  # unchanged
    with trio.fail_after(30):
        async with api(tmp_path / "api") as (im, h, c):
            await im.create_group("team", ["alice"])
            await im.set_retention("team", max_age=60_000_000)
            run = trio.to_thread.run_sync
            capsys.readouterr()
            for bad in ("-5", "-0.0000001"):
                assert await run(main, ["retention", "team", f"--max-age={bad}", "--http", h.url, "--api-key", KEY]) == 2
                out, err = capsys.readouterr()
                assert out == "" and "--max-age and --max-count must be >= 0" in err, (bad, out, err)
            assert (await im.retention("team")).max_age == 60_000_000


async def test_cli_says_what_is_wrong_with_a_huge_max_count_locally_and_over_http(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--max-count 2^63 said only "refused: BAD_REQUEST" on a data directory
    (the HTTP API named the field and its range): both say the limit now."""
    data = tmp_path / "data"
    with LmdbStore(data / "store") as store:
        store.create_group("team", ["alice", "bob"], 1)
    said = "pimcore retention: --max-count must be at most 2^63-1 (9223372036854775807; 0: no limit), not "
    for huge in (str(2**63), str(10**30)):
        assert main(["retention", "team", "--max-count", huge, "--data-dir", str(data)]) == 2
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"{said}{huge}\n"), (huge, out, err)
    assert main(["retention", "team", "--max-count", str(2**63 - 1), "--data-dir", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_count"] == 2**63 - 1
    with trio.fail_after(30):
        async with api(tmp_path / "api") as (im, h, c):
            await im.create_group("team", ["alice"])
            capsys.readouterr()
            got = await trio.to_thread.run_sync(
                main, ["retention", "team", "--max-count", str(2**63), "--http", h.url, "--api-key", KEY])
            out, err = capsys.readouterr()
            assert (got, out, err) == (2, "", f"{said}{2**63}\n")
            assert (await im.retention("team")).max_count is None


async def test_cli_says_to_use_https_for_an_api_that_speaks_tls(tmp_path: Path) -> None:
    """--http http://HOST:PORT at an https:// listener said "not an HTTP
    server (is this the --http listener?)": the server closes the plain
    request without an answer.  The CLI then tries a TLS handshake there
    and, if the server speaks TLS, says to use https://."""
    import ssl

    import trustme

    from pimcore.http import HttpConfig, open_http_server

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    with trio.fail_after(60):
        async with open_pimcore(data_dir=tmp_path / "data", store=MemoryStore(), secret=SECRET.decode()) as im:
            cfg = HttpConfig(api_keys=(KEY,), scheme="tls", ssl_context=server_ctx)
            async with open_http_server(im.server, cfg, handle=im) as h:
                tls_url = h.url.rstrip("/")
                plain = tls_url.replace("https://", "http://", 1)
                for url in (plain, plain.replace("http://", "", 1)):  # (HOST:PORT is http:// too)
                    r = await trio.to_thread.run_sync(
                        lambda: run_pimcore("group", "show", "team", "--http", url, "--api-key", KEY))
                    assert r.returncode == 2 and r.stdout == "", r
                    assert r.stderr == f"pimcore group: cannot use {plain}: the server speaks TLS: try {tls_url}\n", r.stderr


async def test_cli_says_to_use_http_for_an_api_that_does_not_speak_tls(tmp_path: Path) -> None:
    """--http https://HOST:PORT at a plain http:// listener printed ssl's
    "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"; the
    other way round said "try https://".  And a malformed URL said only
    "Invalid IPv6 URL", without naming --http."""
    from pimcore.http import HttpConfig, open_http_server

    with trio.fail_after(60):
        async with open_pimcore(data_dir=tmp_path / "data", store=MemoryStore(), secret=SECRET.decode()) as im:
            async with open_http_server(im.server, HttpConfig(api_keys=(KEY,)), handle=im) as h:
                plain = h.url.rstrip("/")
                tls = plain.replace("http://", "https://", 1)
                r = await trio.to_thread.run_sync(
                    lambda: run_pimcore("group", "show", "team", "--http", tls, "--api-key", KEY))
                assert r.returncode == 2 and r.stdout == "", r
                assert r.stderr == f"pimcore group: cannot use {tls}: the server does not speak TLS: try {plain}\n", r.stderr
    r = await trio.to_thread.run_sync(lambda: run_pimcore("group", "show", "team", "--http", "http://[::1", "--api-key", KEY))
    assert r.returncode == 2 and r.stderr.startswith("pimcore group: --http http://[::1: not a URL ("), r.stderr


@pytest.mark.parametrize("age", [1, 500_000, 59_999_999])
def test_an_embedding_handle_refuses_a_max_age_under_a_minute(tmp_path: Path, age: int) -> None:
    """max_age is µs: a host passing seconds (``max_age=30`` for 30 s) set
    30 µs and the next reclaim deleted the conversation's history, faster
    than any device could read it.  1 µs .. MIN_RETENTION_AGE - 1 is
    RequestRefused(BAD_REQUEST) on the trio, asyncio and threaded handles,
    nothing stored; 0 (no limit) and a minute are taken."""
    import asyncio

    from pimcore.asyncio import open_pimcore as open_asyncio
    from pimcore.embed import MIN_RETENTION_AGE
    from pimcore.threaded import open_pimcore_thread

    assert MIN_RETENTION_AGE == 60_000_000

    async def trio_main() -> None:
        async with open_pimcore(data_dir=tmp_path / "t") as im:
            await im.create_group("team", ["alice"])
            with pytest.raises(RequestRefused, match="at least 60000000 µs") as refused:
                await im.set_retention("team", max_age=age, max_count=5)
            assert refused.value.code is ErrorCode.BAD_REQUEST
            assert await im.retention("team") == Retention("team", None, None, 0)
            assert (await im.set_retention("team", max_age=0)).max_age == 0
            assert (await im.set_retention("team", max_age=MIN_RETENTION_AGE)).max_age == MIN_RETENTION_AGE

    trio.run(trio_main)

    async def asyncio_main() -> None:
        async with open_asyncio(data_dir=tmp_path / "a") as h:
            await h.create_group("team", ["alice"])
            with pytest.raises(RequestRefused, match="µs"):
                await h.set_retention("team", max_age=age)
            assert (await h.retention("team")).max_age is None

    asyncio.run(asyncio_main())
    with open_pimcore_thread(data_dir=tmp_path / "th") as im:
        im.create_group("team", ["alice"])
        with pytest.raises(RequestRefused, match="µs"):
            im.set_retention("team", max_age=age)
        assert im.retention("team").max_age is None


async def test_set_retention_arguments_of_the_wrong_type_are_type_errors_and_its_message_does_not_round(tmp_path: Path) -> None:
    # A new user's trial (LOW): max_count="3" was a RequestRefused
    # (EMBEDDING.md: other arguments of the wrong type are TypeErrors), and
    # max_age=59999999 was refused as "got 59999999 µs (60 s)".
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, listen=[]) as im:
            for bad in ({"max_count": "3"}, {"max_count": True}, {"max_age": 1.5e9}):
                with pytest.raises(TypeError, match="must be None or an int"):
                    await im.set_retention(AB, **bad)  # type: ignore[arg-type]
            with pytest.raises(RequestRefused) as refused:
                await im.set_retention(AB, max_age=59_999_999)
            assert "(59.999999 s)" in str(refused.value)


async def test_a_send_queued_before_a_purge_does_not_reach_a_group_created_again(tmp_path: Path) -> None:
    # A new user's trial (HIGH): bob wrote to a group while his link was
    # down; the host purged the group and created it again with the id,
    # with carol instead of alice; when bob's link came back his message
    # went out -- to carol, who never saw what it answered.  It answers a
    # purged seq (after_seq 3): SendError(PURGED), nothing stored.  His
    # next message says after_seq 0 and reaches carol.
    from pimcore.client import SendError

    from _proc import free_port

    with trio.fail_after(30):
        async with bob_behind_a_proxy(tmp_path) as (im, port, proxy, bob):
            for i in range(3):
                await im.post("team", b"old%d" % i, sender="alice", device="web")
            assert len(await take(bob, 3)) == 3
            proxy.target_port = free_port()  # (the link goes down)
            proxy.reset_all()
            outcome: list[object] = []

            async def write_stale() -> None:
                try:
                    outcome.append(await bob.send("team", b"stale reply"))
                except SendError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write_stale)
                await trio.sleep(0.2)
                await im.purge_conversation("team")
                await im.create_group("team", ["bob", "carol"])
                proxy.target_port = port
            [refused] = outcome
            assert isinstance(refused, SendError) and refused.code is ErrorCode.PURGED
            assert "was purged after this message was written" in str(refused)
            assert await im.history("team", "carol") == []
            sent = await bob.send("team", b"fresh")
            assert sent.seq == 4
            async with open_client(im.urls[0], im.issue_token("carol"), "phone", config=FAST_CLIENT) as carol:
                got = await take(carol, 1)
                assert [m.payload for m in got] == [b"fresh"]
