"""The conversation list, per-user conversation settings and mentions
(issue 14 parts 2 and 4), through the SDK over a live broker on real
loopback sockets, on both stores."""

from __future__ import annotations

import dataclasses
import json

import pytest
import trio

from pimcore import frames as F
from pimcore.client import ConversationUpdated, MessageReceived, SendError
from pimcore.core import Limits
from pimcore.errors import ErrorCode
from pimcore.net.server import DEFAULT_BROKER_CONFIG
from pimcore.store import LmdbStore, MemoryStore, direct_conversation
from pimcore.store.base import ReadEvents
from pimcore.testing.chaos import ChaosConfig, open_chaos_proxy

from _net import client, server_config, serving

AB = direct_conversation("alice", "bob")
AC = direct_conversation("alice", "carol")


@pytest.fixture(params=["lmdb", "memory"])
def store(request, tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os") if request.param == "lmdb" else MemoryStore()
    yield s
    s.close()


async def wait_for(c, pred):
    async for ev in c.events():
        if pred(ev):
            return ev
    raise AssertionError("event stream ended")


async def all_pages(c, limit: int, **kw) -> list[F.ConvEntry]:
    out, cursor = [], b""
    while True:
        page = await c.conversations(cursor, limit, **kw)
        out += page.entries
        if not page.more:
            return out
        cursor = page.cursor


def brief(e: F.ConvEntry) -> tuple:
    return (e.conv, e.unread, e.mention_count, e.pinned, e.muted, e.hidden)


async def test_list_pages_by_last_activity_with_counts_and_last_message(store):
    store.create_group("team", ["alice", "bob", "carol"], 0)
    store.create_group("quiet", ["alice", "bob"], 0)
    with trio.fail_after(15):
        async with serving(store) as srv:
            async with client(srv.url(), "bob") as bob, client(srv.url(), "carol") as carol:
                await bob.send("team", b"hi all", mention_all=True)
                await carol.send(AC, b"psst")
                await bob.send(AB, b"one")
                await bob.send("team", b"@alice look", mentions=["alice", "nobody"])
                await bob.send(AB, b"two")
            async with client(srv.url(), "alice") as alice:
                entries = await all_pages(alice, 1)
                assert [brief(e) for e in entries] == [
                    (AB, 2, 0, False, False, False),
                    ("team", 2, 2, False, False, False),
                    (AC, 1, 0, False, False, False),
                    ("quiet", 0, 0, False, False, False),  # a member, no message yet: last
                ]
                [last] = entries[0].last
                assert (last.payload, last.sender, last.seq) == (b"two", "bob", 2) and last.server_time > 0
                [team_last] = entries[1].last
                assert team_last.mentions == (F.Mention("alice"), F.Mention("nobody")) and not team_last.mention_all
                assert entries[3].last == () and entries[3].last_seq == 0
                # the same in one page, and the SDK keeps the entries
                page = await alice.conversations(limit=10)
                assert [e.conv for e in page.entries] == [e.conv for e in entries] and not page.more
                assert alice.conversation_entries["team"].mention_count == 2
                # a cursor the broker never gave
                with pytest.raises(SendError) as err:
                    await alice.conversations(b"bogus")
                assert err.value.code is ErrorCode.BAD_CURSOR
                # reading past the mentions resets the count (and the broker says so)
                await alice.mark_read("team", 2)
                ev = await wait_for(alice, lambda e: isinstance(e, ConversationUpdated) and e.entry.conv == "team")
                assert (ev.entry.read_seq, ev.entry.unread, ev.entry.mention_count) == (2, 0, 0)


async def test_mentions_are_delivered_and_validated(store):
    store.create_group("team", ["alice", "bob"], 0)
    cfg = server_config(limits=Limits(max_mentions=3))
    with trio.fail_after(15):
        async with serving(store, cfg) as srv:
            async with client(srv.url(), "alice") as alice, client(srv.url(), "bob") as bob:
                await alice.send("team", b"hey", mentions=["bob", "bob", "alice"])
                ev = await wait_for(bob, lambda e: isinstance(e, MessageReceived))
                # sorted, unique, the sender left out
                assert ev.message.mentions == (F.Mention("bob"),) and not ev.message.mention_all
                with pytest.raises(SendError) as err:
                    await alice.send("team", b"x", mentions=["u1", "u2", "u3", "u4"])
                assert err.value.code is ErrorCode.TOO_MANY_MENTIONS
                with pytest.raises(SendError) as err:
                    await alice.send("team", b"x", mentions=["not a user"])
                assert err.value.code is ErrorCode.BAD_MENTION
                [m] = (await bob.fetch_page("team")).messages
                assert m.mentions == (F.Mention("bob"),)
            assert [m.payload for m in store.history("team", 0, 10)] == [b"hey"]  # refusals stored nothing


async def test_settings_sync_live_to_the_other_devices_and_pin_first(store):
    store.create_group("team", ["alice", "bob"], 0)
    with trio.fail_after(15):
        async with serving(store) as srv:
            async with client(srv.url(), "bob") as bob:
                await bob.send("team", b"old")
                await bob.send(AB, b"new")
            async with client(srv.url(), "alice", "phone") as phone, client(srv.url(), "alice", "laptop") as laptop:
                assert [e.conv for e in (await laptop.conversations()).entries] == [AB, "team"]
                await phone.set_conversation("team", pinned=True, muted=True)
                ev = await wait_for(laptop, lambda e: isinstance(e, ConversationUpdated))
                assert brief(ev.entry) == ("team", 1, 0, True, True, False)
                assert laptop.conversation_entries["team"].pinned
                assert [e.conv for e in (await laptop.conversations()).entries] == ["team", AB]
                # the read marker moved by another device
                await phone.mark_read(AB, 1)
                ev = await wait_for(laptop, lambda e: isinstance(e, ConversationUpdated) and e.entry.conv == AB)
                assert (ev.entry.read_seq, ev.entry.unread) == (1, 0)
                await phone.set_conversation("team", pinned=False)
                ev = await wait_for(laptop, lambda e: isinstance(e, ConversationUpdated))
                assert brief(ev.entry) == ("team", 1, 0, False, True, False)
                with pytest.raises(SendError) as err:
                    await phone.set_conversation("nosuchgroup", muted=True)
                assert err.value.code is ErrorCode.UNKNOWN_CONVERSATION
                with pytest.raises(SendError) as err:
                    await phone.set_conversation(direct_conversation("bob", "carol"), muted=True)
                assert err.value.code is ErrorCode.NOT_MEMBER


async def test_hidden_until_the_next_message(store):
    with trio.fail_after(15):
        async with serving(store) as srv:
            async with client(srv.url(), "alice") as alice, client(srv.url(), "bob") as bob:
                await bob.send(AB, b"first")
                await bob.send(direct_conversation("bob", "carol"), b"x")  # not alice's
                assert [e.conv for e in (await alice.conversations()).entries] == [AB]
                await alice.set_conversation(AB, hidden=True)
                assert (await alice.conversations()).entries == []
                [e] = (await alice.conversations(include_hidden=True)).entries
                assert e.conv == AB and e.hidden
                await bob.send(AB, b"wake up")
                await wait_for(alice, lambda ev: isinstance(ev, MessageReceived) and ev.message.payload == b"wake up")
                # the SDK's entry follows the push; the broker agrees
                local = alice.conversation_entries[AB]
                assert not local.hidden and local.last[0].payload == b"wake up" and local.unread == 2
                [e] = (await alice.conversations()).entries
                assert not e.hidden and e.last[0].payload == b"wake up" and e.unread == 2


async def test_recall_and_edit_are_not_a_new_last_message(store):
    # An amend entry is pushed like a message but is not the last message:
    # it neither un-hides nor replaces `last`, locally or at the broker; a
    # recall or edit of `last` changes how `last` shows.
    from pimcore.client import MessageAmended

    def amended(ev, kind):
        return isinstance(ev, MessageAmended) and ev.entry.kind == kind

    with trio.fail_after(15):
        async with serving(store) as srv:
            async with client(srv.url(), "alice") as alice, client(srv.url(), "bob") as bob:
                await bob.send(AB, b"old")
                await bob.send(AB, b"last")
                await wait_for(alice, lambda ev: isinstance(ev, MessageReceived) and ev.message.payload == b"last")
                await alice.conversations()  # the SDK follows the entries a page brought
                await alice.set_conversation(AB, hidden=True)
                await bob.edit(AB, 1, b"old, edited")
                await wait_for(alice, lambda ev: amended(ev, F.MessageKind.EDIT))
                for e in (alice.conversation_entries[AB], (await alice.conversations(include_hidden=True)).entries[0]):
                    assert e.hidden and e.last_seq == 2 and e.last[0].payload == b"last"
                await bob.recall(AB, 2)
                await wait_for(alice, lambda ev: amended(ev, F.MessageKind.RECALL))
                for e in (alice.conversation_entries[AB], (await alice.conversations(include_hidden=True)).entries[0]):
                    assert e.hidden and e.last_seq == 2 and e.last[0].recalled and e.last[0].payload == b""


async def test_delete_for_me_of_an_unread_mention_lowers_mention_count_on_every_device(store):
    # After the unread fix: a message bob deleted for himself was no longer
    # unread, but still counted as a mention -- at the broker (a fresh page)
    # and on his devices' conversation list entries.  It is neither, as a
    # recalled one; for bob alone (carol's count stays).
    from pimcore.client import MessageAmended

    store.create_group("team", ["alice", "bob", "carol"], 0)
    with trio.fail_after(15):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "alice") as a, client(url, "bob") as phone, client(url, "bob", "tablet") as tablet:
                sent = [await a.send("team", b"@bob", mentions=["bob"]), await a.send("team", b"@all", mention_all=True),
                        await a.send("team", b"plain")]
                for dev in (phone, tablet):
                    for _ in range(3):
                        await wait_for(dev, lambda ev: isinstance(ev, MessageReceived))
                    (e,) = (await dev.conversations()).entries
                    assert (e.unread, e.mention_count) == (3, 2)
                await phone.delete_for_me("team", sent[0].seq)
                await wait_for(tablet, lambda ev: isinstance(ev, MessageAmended))
                await phone.delete_for_me("team", sent[1].seq)
                await wait_for(tablet, lambda ev: isinstance(ev, MessageAmended))
                for dev in (phone, tablet):
                    local = dev.conversation_entries["team"]
                    assert (local.unread, local.mention_count) == (1, 0)
                    (fresh,) = (await dev.conversations()).entries  # the broker's count says the same
                    assert (fresh.unread, fresh.mention_count) == (1, 0)
            async with client(url, "carol") as carol:
                (e,) = (await carol.conversations()).entries
                assert (e.unread, e.mention_count) == (3, 1)


async def test_the_message_event_says_who_muted_and_who_is_mentioned(store):
    store.create_group("team", ["alice", "bob", "carol"], 0)
    cfg = server_config()
    cfg = dataclasses.replace(cfg, broker=dataclasses.replace(DEFAULT_BROKER_CONFIG, record_events=True))
    with trio.fail_after(15):
        async with serving(store, cfg) as srv:
            async with client(srv.url(), "carol") as carol, client(srv.url(), "alice") as alice:
                await carol.set_conversation("team", muted=True)
                await alice.send("team", b"ping", mentions=["bob"])
                await alice.send("team", b"all", mention_all=True)
        [res] = store.read([ReadEvents("host", after=0, limit=100)])
        events = [json.loads(e.data) for e in res.events if json.loads(e.data)["type"] == "message"]
        assert [(e["muted"], e["mentioned"], e.get("mention_all", False)) for e in events] == [
            (["carol"], ["bob"], False),
            (["carol"], ["bob", "carol"], True),
        ]
        settings = [json.loads(e.data) for e in res.events if json.loads(e.data)["type"] == "conversation"]
        assert settings == [{"type": "conversation", "user": "carol", "conv": "team", "pinned": False, "muted": True,
                             "hidden": False}]


async def test_catch_up_after_being_offline(store):
    store.create_group("team", ["alice", "bob"], 0)
    with trio.fail_after(15):
        async with serving(store) as srv:
            async with client(srv.url(), "alice", "laptop") as laptop:
                assert (await laptop.conversations()).entries[0].conv == "team"
            # the laptop is offline: the phone pins, bob mentions alice
            async with client(srv.url(), "alice", "phone") as phone, client(srv.url(), "bob") as bob:
                await phone.set_conversation("team", pinned=True)
                await bob.send(AB, b"later")
                await bob.send("team", b"@alice", mentions=["alice"])
                await bob.send(AB, b"latest")
            async with client(srv.url(), "alice", "laptop") as laptop:
                entries = (await laptop.conversations()).entries
                assert [brief(e) for e in entries] == [
                    ("team", 1, 1, True, False, False),
                    (AB, 2, 0, False, False, False),
                ]
                assert entries[1].last[0].payload == b"latest"


async def test_settings_and_mentions_survive_connection_resets(store):
    """A ConvSetReq and a SendReq with mentions whose answers are lost are
    asked again on the next connection: each takes effect once."""
    store.create_group("team", ["alice", "bob"], 0)
    with trio.fail_after(30):
        async with serving(store) as srv:
            async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port, ChaosConfig()) as proxy:
                url = f"tcp://127.0.0.1:{proxy.port}"
                async with client(url, "alice", "phone") as phone, client(srv.url(), "alice", "laptop") as laptop, \
                        client(srv.url(), "bob") as bob:
                    await phone.conversations()  # connected
                    # answers stall, then every proxied connection is reset
                    proxy.config = ChaosConfig(stall_probability=1.0, stall_duration=60.0)
                    async with trio.open_nursery() as n:
                        n.start_soon(lambda: phone.set_conversation("team", pinned=True, muted=True))
                        n.start_soon(lambda: phone.send("team", b"@bob", mentions=["bob"]))
                        await trio.sleep(0.3)
                        proxy.config = ChaosConfig()
                        proxy.reset_all()
                    ev = await wait_for(laptop, lambda e: isinstance(e, ConversationUpdated) and e.entry.pinned)
                    assert ev.entry.muted
                    entry = (await bob.conversations()).entries[0]
                    assert (entry.conv, entry.mention_count, entry.unread) == ("team", 1, 1)
        assert [(m.payload, m.mentions) for m in store.history("team", 0, 10)] == [(b"@bob", ("bob",))]


async def test_the_host_lists_and_changes_settings_and_posts_with_mentions(tmp_path):
    from pimcore.embed import RequestRefused, open_pimcore

    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data", listen=["tcp://127.0.0.1:0"]) as im:
            await im.create_group("team", ["alice", "bob"])
            posted = await im.post("team", b"@alice from the host", mentions=["alice"])
            assert posted.seq == 1
            with pytest.raises(RequestRefused) as refused:
                await im.post("team", b"x", mentions=["no way"])
            assert refused.value.code is ErrorCode.BAD_MENTION
            # The refusal says the limit (a new user's trial: it said "too many mentions" only).
            many = [f"u{i}" for i in range(65)]
            with pytest.raises(RequestRefused) as refused:
                await im.post("team", b"x", mentions=many)
            assert refused.value.code is ErrorCode.TOO_MANY_MENTIONS
            assert str(refused.value).endswith("TOO_MANY_MENTIONS: 65 mentions, max_mentions is 64"), refused.value
            [result] = await im.post_many([{"conv": "team", "payload": b"x", "mentions": many}])
            assert str(result).endswith("TOO_MANY_MENTIONS: 65 mentions, max_mentions is 64"), result
            from pimcore.client import open_client

            async with open_client(im.urls[0], im.issue_token("alice"), "phone") as phone:
                page = await im.conversation_list("alice")
                [e] = page.entries
                assert (e.conv, e.unread, e.mention_count, e.last.payload) == ("team", 1, 1, b"@alice from the host")
                assert not page.more
                entry = await im.set_conversation("alice", "team", muted=True, pinned=True)
                assert entry.muted and entry.pinned
                ev = await wait_for(phone, lambda ev: isinstance(ev, ConversationUpdated))
                assert ev.entry.muted and ev.entry.pinned
                with pytest.raises(RequestRefused) as refused:
                    await im.set_conversation("carol", "team", muted=True)
                assert refused.value.code is ErrorCode.NOT_MEMBER
                with pytest.raises(RequestRefused) as refused:
                    await im.conversation_list("alice", cursor=b"junk")
                assert refused.value.code is ErrorCode.BAD_CURSOR


async def test_a_message_deleted_for_me_stays_deleted_on_every_device_through_reads_pages_and_edits(store):
    # A new user's trial (HIGH): alice deleted bob's message for herself on
    # one device; a mark_read on her other device sent a ConvUpdate whose
    # `last` was the message undeleted, with its text, and both devices'
    # view() showed it again; a conversations() page did the same, and
    # after bob edited it her list preview showed the new text.  It stays as
    # history says: deleted, no payload.
    store.create_group("g", ["alice", "bob"], 0)
    with trio.fail_after(15):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "alice") as a1, client(url, "alice", "a2") as a2, client(url, "bob") as b1:
                sent = await b1.send("g", b"message alice wants gone")
                for dev in (a1, a2):
                    await wait_for(dev, lambda ev: isinstance(ev, MessageReceived))
                    await dev.conversations()  # each holds the list entry
                await a1.delete_for_me("g", sent.seq)
                await wait_for(a2, lambda ev: getattr(ev, "entry", None) is not None and ev.entry.kind == F.MessageKind.DELETE)

                def shown(dev):  # type: ignore[no-untyped-def]
                    return ([(m.seq, m.payload, m.deleted) for m in dev.view("g")],
                            [(m.payload, m.deleted) for m in dev.conversation_entries["g"].last])

                gone = ([(sent.seq, b"", True)], [(b"", True)])
                assert shown(a1) == shown(a2) == gone
                await a2.mark_read("g", sent.seq)
                ev = await wait_for(a1, lambda ev: isinstance(ev, ConversationUpdated) and ev.entry.read_seq == sent.seq)
                assert [(m.payload, m.deleted) for m in ev.entry.last] == [(b"", True)]
                await wait_for(a2, lambda ev: isinstance(ev, ConversationUpdated) and ev.entry.read_seq == sent.seq)
                assert shown(a1) == shown(a2) == gone
                [h] = await a2.fetch_history("g", 0, 10)
                assert (h.payload, h.deleted) == (b"", True)
                await b1.edit("g", sent.seq, b"edited text")
                await wait_for(a1, lambda ev: getattr(ev, "entry", None) is not None and ev.entry.kind == F.MessageKind.EDIT)
                [e] = (await a1.conversations()).entries
                assert [(m.payload, m.deleted) for m in e.last] == [(b"", True)]
                assert shown(a1) == gone
            async with client(url, "bob") as b1:  # for her alone
                [e] = (await b1.conversations()).entries
                assert [(m.payload, m.deleted) for m in e.last] == [(b"edited text", False)]


async def test_a_hidden_conversation_whose_last_entry_is_an_edit_stays_hidden_on_every_device_after_a_read(store):
    # A new user's trial (MEDIUM): bob sent two messages and edited the
    # second; alice hid the chat on a1, then marked it read.  The broker
    # (and its pages) still hid it, but conversation_entries said
    # hidden=False on both her devices, and its last_seq flipped between the
    # last message's seq and the EDIT entry's.
    store.create_group("g", ["alice", "bob"], 0)
    with trio.fail_after(15):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "alice") as a1, client(url, "alice", "a2") as a2, client(url, "bob") as b1:
                s1 = await b1.send("g", b"one")
                s2 = await b1.send("g", b"two")
                await b1.edit("g", s2.seq, b"two-edited")
                for dev in (a1, a2):
                    await wait_for(dev, lambda ev: getattr(ev, "entry", None) is not None and ev.entry.kind == F.MessageKind.EDIT)
                    await dev.conversations()
                await a1.set_conversation("g", hidden=True)
                await wait_for(a2, lambda ev: isinstance(ev, ConversationUpdated) and ev.entry.hidden)
                for upto in (s1.seq, s2.seq):
                    await a1.mark_read("g", upto)
                    for dev in (a1, a2):
                        await wait_for(dev, lambda ev: isinstance(ev, ConversationUpdated) and ev.entry.read_seq == upto)
                        e = dev.conversation_entries["g"]
                        assert (e.hidden, e.last_seq, e.read_seq) == (True, s2.seq, upto)
                        assert (await dev.conversations()).entries == []
                        [b] = (await dev.conversations(include_hidden=True)).entries
                        assert (b.hidden, b.last_seq) == (True, s2.seq)
                        assert dev.conversation_entries["g"].hidden
