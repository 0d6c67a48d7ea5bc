"""Recall, edit and delete-for-self (AmendReq, PROTOCOL.md section 6
"Recall, edit, delete") through the SDK over a live broker: delivery to
every member's devices, the sender's other devices, permissions and time
windows, retries across reconnects, catch-up after being offline, history
in its current state and unread counts that ignore recalled messages."""

from __future__ import annotations

import dataclasses
import time

import pytest
import trio

from pimcore import frames as F
from pimcore.client import MessageAmended, MessageReceived, SendError
from pimcore.client_session import ClientConfig, ClientSession
from pimcore.codec import Decoder, encode_frame
from pimcore.errors import ErrorCode
from pimcore.net.server import DEFAULT_BROKER_CONFIG
from pimcore.store import LmdbStore, direct_conversation

from _net import RawConn, client, server_config, serving

RECALL, EDIT, DELETE = F.MessageKind.RECALL, F.MessageKind.EDIT, F.MessageKind.DELETE
AB = direct_conversation("alice", "bob")


@pytest.fixture
def store(tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


async def next_event(c, kind: type):
    async for ev in c.events():
        if isinstance(ev, kind):
            return ev
    raise AssertionError("client ended")


async def test_recall_edit_delete_live_on_every_device(store):
    with trio.fail_after(30):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "alice") as a, client(url, "bob") as phone, client(url, "bob", "laptop") as laptop:
                m1 = await a.send(AB, b"hello")
                m2 = await a.send(AB, b"oops")
                for dev in (phone, laptop):
                    assert [(await next_event(dev, MessageReceived)).message.seq for _ in range(2)] == [1, 2]
                assert phone.unread(AB) == 2

                # edit: every member's device gets the entry and the new state
                e = await a.edit(AB, m1.seq, b"hello, world")
                assert e.seq == 3
                for dev in (phone, laptop):
                    ev = await next_event(dev, MessageAmended)
                    assert (ev.entry.kind, ev.entry.target, ev.entry.payload, ev.entry.sender) == (EDIT, 1, b"hello, world", "alice")
                    assert (ev.message.payload, ev.message.edited) == (b"hello, world", e.server_time)
                assert [m.payload for m in a.view(AB)] == [b"hello, world", b"oops"]  # the sender's own view too

                # recall: a tombstone, and no longer unread
                r = await a.recall(AB, m2.seq)
                assert r.seq == 4
                for dev in (phone, laptop):
                    ev = await next_event(dev, MessageAmended)
                    assert (ev.entry.kind, ev.entry.target, ev.message.recalled, ev.message.payload) == (RECALL, 2, True, b"")
                assert phone.unread(AB) == 1
                assert [(m.seq, m.payload, m.recalled) for m in phone.view(AB)] == [(1, b"hello, world", False), (2, b"", True)]

                # delete for me: bob's other device learns it, alice gets nothing
                d = await phone.delete_for_me(AB, m1.seq)
                assert d.seq == 0
                ev = await next_event(laptop, MessageAmended)
                assert (ev.entry.kind, ev.entry.seq, ev.entry.target, ev.message.deleted) == (DELETE, 0, 1, True)
                assert [m.deleted for m in phone.view(AB)] == [True, False]
                await phone.send(AB, b"after")
                got = await next_event(a, MessageReceived)
                assert got.message.payload == b"after"  # nothing of the DELETE in between

                # history is the current state, per user
                hb = {m.seq: m for m in await laptop.fetch_history(AB)}
                ha = {m.seq: m for m in await a.fetch_history(AB)}
                assert (hb[1].deleted, hb[1].payload) == (True, b"") and (ha[1].deleted, ha[1].payload) == (False, b"hello, world")
                assert ha[1].edited == e.server_time and (ha[2].recalled, ha[2].payload) == (True, b"")
                assert [(ha[s].kind, ha[s].target) for s in (3, 4)] == [(EDIT, 1), (RECALL, 2)]
                assert 0 not in hb  # the DELETE entry is not an entry of the conversation
            # the broker's own count at the next login ignores the recalled
            # message and the one bob deleted for himself
            assert store.unread("bob", AB) == 0


async def test_refusals_permissions_and_windows(store):
    broker = dataclasses.replace(DEFAULT_BROKER_CONFIG, edit_window=60_000_000, recall_window=1)
    with trio.fail_after(30):
        async with serving(store, dataclasses.replace(server_config(), broker=broker)) as srv:
            await srv.create_group("team", ["alice", "bob"])
            async with client(srv.url(), "alice") as a, client(srv.url(), "bob") as b:
                m = await a.send("team", b"mine")
                await trio.sleep(0.01)

                async def refused(call, code):
                    with pytest.raises(SendError) as info:
                        await call
                    assert info.value.code is code

                await refused(b.edit("team", m.seq, b"not yours"), ErrorCode.NOT_SENDER)
                await refused(b.recall("team", m.seq), ErrorCode.NOT_SENDER)
                await refused(a.recall("team", m.seq), ErrorCode.TOO_LATE)  # recall_window 1 µs
                await refused(a.edit("team", 99, b"x"), ErrorCode.NO_SUCH_MESSAGE)
                await refused(a.delete_for_me("team", 10**6), ErrorCode.NO_SUCH_MESSAGE)
                with pytest.raises(ValueError, match="seq"):  # no seq is 0: refused by the SDK, nothing sent
                    await a.delete_for_me("team", 0)
                await refused(a.edit("nope", 1, b"x"), ErrorCode.UNKNOWN_CONVERSATION)
                await srv.add_members("team", ["carol"])  # seq 2: a JOINED entry
                await refused(a.recall("team", 2), ErrorCode.NO_SUCH_MESSAGE)
                assert (await a.edit("team", m.seq, b"fixed")).seq == 3  # inside edit_window
                # the host (Broker.amend): any message, no window
                done = await srv.host_call(srv.broker.amend, "team", m.seq, RECALL)
                assert (done.code, done.seq) == (ErrorCode.OK, 4)
                await refused(a.edit("team", m.seq, b"again"), ErrorCode.RECALLED)
                assert store.last_seq("team") == 4


async def test_the_embedding_host_recalls_edits_and_deletes(tmp_path):
    from pimcore.embed import RequestRefused, open_pimcore
    from pimcore.client import open_client

    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "data", listen=["tcp://127.0.0.1:0"], events=True) as im:
            await im.create_group("team", ["alice", "bob"])
            async with open_client(im.urls[0], im.issue_token("bob"), "phone") as bob:
                posted = await im.post("team", b"hi", sender="alice", device="web")
                assert (await next_event(bob, MessageReceived)).message.payload == b"hi"
                edited = await im.edit("team", posted.seq, b"hi (moderated)", idempotency_key="mod-1")
                assert await im.edit("team", posted.seq, b"hi (moderated)", idempotency_key="mod-1") == dataclasses.replace(edited, duplicate=True)
                ev = await next_event(bob, MessageAmended)
                assert (ev.entry.sender, ev.entry.kind, ev.message.payload) == ("", EDIT, b"hi (moderated)")
                with pytest.raises(RequestRefused) as refused:
                    await im.edit("team", posted.seq, b"x", sender="bob", device="web")
                assert refused.value.code is ErrorCode.NOT_SENDER
                deleted = await im.delete_for("bob", "team", posted.seq)
                assert deleted.seq == 0
                ev = await next_event(bob, MessageAmended)
                assert (ev.entry.kind, ev.message.deleted) == (DELETE, True)
                recalled = await im.recall("team", posted.seq)
                ev = await next_event(bob, MessageAmended)
                assert (recalled.seq, ev.entry.kind, ev.message.recalled) == (3, RECALL, True)
                with pytest.raises(RequestRefused) as refused:
                    await im.recall("team", 99)
                assert refused.value.code is ErrorCode.NO_SUCH_MESSAGE
            # host events: one "message" event per entry, with its target
            _, evs = await im.next_events("t", after=0, limit=100)
            entries = [(e.kind, e.target, e.payload, e.recipients) for e in evs if e.type == "message"]
            assert entries == [
                (0, 0, b"hi", ("alice", "bob")),
                (EDIT, 1, b"hi (moderated)", ("alice", "bob")),
                (DELETE, 1, b"", ("bob",)),
                (RECALL, 1, b"", ("alice", "bob")),
            ]


async def test_amend_retried_across_reconnects_is_stored_once(store):
    with trio.fail_after(30):
        async with serving(store) as srv:
            async with client(srv.url(), "alice") as a:
                await a.send(AB, b"m")
            port = srv.endpoints[0].port
            req = F.AmendReq(local_id=1 << 60, conv=AB, target=1, action=EDIT, client_time=int(time.time() * 1e6), payload=b"v2")
            # the first attempt's connection dies before its SendAck is read
            raw = await RawConn.open(port)
            await raw.login("alice", "phone")
            await raw.send(req)
            await raw.aclose()
            # the retry, on a new connection, with the same local id
            acks = []
            for _ in range(2):
                raw = await RawConn.open(port)
                await raw.login("alice", "phone")
                await raw.send(req)
                acks.append(await raw.until(F.SendAck))
                await raw.aclose()
            assert acks[0] == acks[1] and acks[0].code == 0 and acks[0].seq == 2
            assert store.last_seq(AB) == 2 and store.history(AB, 0, 10)[0].payload == b"v2"
            # the same local id with another payload is a conflict, not a second edit
            raw = await RawConn.open(port)
            await raw.login("alice", "phone")
            await raw.send(dataclasses.replace(req, payload=b"v3"))
            assert (await raw.until(F.SendAck)).code == ErrorCode.DUPLICATE_CONFLICT
            await raw.aclose()
            # and through the SDK: an explicit local id asked again is answered with the original
            async with client(srv.url(), "alice") as a:
                first = await a.recall(AB, 1, local_id=(1 << 60) + 1)
                again = await a.recall(AB, 1, local_id=(1 << 60) + 1)
                assert (first.seq, first.msg_id) == (again.seq, again.msg_id) == (3, first.msg_id)
            assert store.last_seq(AB) == 3


def test_sdk_resends_a_pending_amend_after_reconnecting():
    """The session keeps an AmendReq like a SendReq: unanswered when the
    connection drops, it goes out again, the same bytes, on the next one."""
    s = ClientSession("phone", ClientConfig())
    t = 1_000_000_000
    s.connection_made(t, b"token")
    s.data_to_send()
    s.receive_data(encode_frame(F.LoginAck("alice", "phone", t, 0, 0, False, 1 << 20, 1 << 16, 8, 0, 0, b"e" * 16)), t)
    s.handle_timer(t + 10_000_000)  # past calibration
    s.data_to_send()
    lid = s.amend(AB, 5, EDIT, t, payload=b"new")

    def amends(data: bytes) -> list[F.AmendReq]:
        d = Decoder()
        d.feed(data)
        return [f for f in iter(d.next_frame, None) if isinstance(f, F.AmendReq)]

    first = amends(s.data_to_send())
    assert [(f.local_id, f.target, f.action, f.payload) for f in first] == [(lid, 5, EDIT, b"new")]
    s.connection_lost(t + 1)
    s.connection_made(t + 2, b"token")
    s.receive_data(encode_frame(F.LoginAck("alice", "phone", t, 0, 0, False, 1 << 20, 1 << 16, 8, 0, 0, b"e" * 16)), t + 3)
    s.handle_timer(t + 20_000_000)
    assert amends(s.data_to_send()) == first
    s.receive_data(encode_frame(F.SendAck(lid, 0, b"m" * 16, 9, t + 5)), t + 6)
    (done,) = s.completions()
    assert done.result is not None and done.result.seq == 9


async def test_offline_devices_catch_up_on_edits_and_recalls(store):
    with trio.fail_after(30):
        async with serving(store) as srv:
            await srv.create_group("g", ["alice", "bob", "carol"])
            async with client(srv.url(), "carol") as c:
                await c.wait_connected()  # carol's device exists, then goes away
            async with client(srv.url(), "alice") as a:
                s1 = await a.send("g", b"one")
                s2 = await a.send("g", b"two")
                await a.send("g", b"three")
                await a.edit("g", s1.seq, b"one, edited")
                await a.recall("g", s2.seq)
            async with client(srv.url(), "carol") as c:
                await c.wait_connected()
                got = []
                async for ev in c.events():
                    if isinstance(ev, (MessageReceived, MessageAmended)):
                        got.append(ev)
                        if len(got) == 5:
                            break
                # what was stored comes in its current state, then the entries
                msgs = [ev.message for ev in got[:3]]
                assert [(m.seq, m.payload, m.recalled, bool(m.edited)) for m in msgs] == [
                    (1, b"one, edited", False, True), (2, b"", True, False), (3, b"three", False, False),
                ]
                assert [(ev.entry.kind, ev.entry.target) for ev in got[3:]] == [(EDIT, 1), (RECALL, 2)]
                assert c.unread("g") == 2  # the recalled message is not unread
                assert [m.payload for m in c.view("g")] == [b"one, edited", b"", b"three"]
                hist = await c.fetch_history("g")
                assert [(m.seq, m.kind, m.payload) for m in hist] == [
                    (1, 0, b"one, edited"), (2, 0, b""), (3, 0, b"three"), (4, EDIT, b"one, edited"), (5, RECALL, b""),
                ]


def test_the_windows_are_configured_in_seconds_and_validated(tmp_path):
    from pimcore.config import ConfigError, load_settings

    cfg = tmp_path / "pimcore.toml"
    cfg.write_text("[messages]\nrecall_window = 120\nedit_window = 0.5\n")
    s = load_settings(config_file=str(cfg))
    broker = s.server_config().broker
    assert (broker.recall_window, broker.edit_window, broker.delete_window) == (120_000_000, 500_000, 0)
    assert s.effective()["messages"] == {"delete_window": 0.0, "edit_window": 0.5, "recall_window": 120}
    for bad in ("recall_window = -1", 'edit_window = "soon"', "delete_window = true", "forever = 1"):
        cfg.write_text(f"[messages]\n{bad}\n")
        with pytest.raises(ConfigError) as err:
            load_settings(config_file=str(cfg))
        assert "messages" in str(err.value) or "forever" in str(err.value)


async def test_pimcore_chat_shows_edits_and_recalls(store):
    from pimcore.chat import chat

    from _net import token

    async def wait_for(lines: list[str], text: str) -> None:
        while not any(text in line for line in lines):
            await trio.sleep(0.01)

    with trio.fail_after(30):
        async with serving(store) as srv:
            a_out: list[str] = []
            b_out: list[str] = []
            a_in, a_lines = trio.open_memory_channel(10)
            b_in, b_lines = trio.open_memory_channel(10)
            async with trio.open_nursery() as n:
                n.start_soon(lambda: chat(srv.url(), token("alice"), "bob", lines=a_lines, out=a_out.append))
                n.start_soon(lambda: chat(srv.url(), token("bob"), "alice", lines=b_lines, out=b_out.append))
                await wait_for(a_out, "connected as alice")
                await wait_for(b_out, "connected as bob")
                await a_in.send("hello")
                await wait_for(b_out, "alice: hello  (#1)")
                await a_in.send("/edit 1 hello, world")
                await wait_for(a_out, "✓ edited #1: hello, world")
                await wait_for(b_out, "— alice edited #1: hello, world")
                await a_in.send("/recall 1")
                await wait_for(b_out, "— alice recalled #1")
                await b_in.send("/edit 1 not mine")
                await wait_for(b_out, "✗ edit #1 refused (NOT_SENDER)")
                n_shown = sum(line.endswith("] alice: (recalled)  (#1)") for line in b_out)
                await b_in.send("/history")
                while sum(line.endswith("] alice: (recalled)  (#1)") for line in b_out) <= n_shown:
                    await trio.sleep(0.01)  # /history showed it (again), with its time
                await a_in.send("/edit x")
                await wait_for(a_out, "usage: /edit N text")
                # a number no seq can be: the usage line again, not a crash
                for bad in ("/recall 99999999999999999999999", "/delete 18446744073709551616", "/edit 0 text", "/delete ²"):
                    n_usage = sum("usage: /edit N text" in line for line in a_out)
                    await a_in.send(bad)
                    await a_in.send("/edit x")  # one more usage line: the bad line was handled before it
                    while sum("usage: /edit N text" in line for line in a_out) < n_usage + 2:
                        await trio.sleep(0.01)
                await a_in.send("/quit")
                await b_in.send("/quit")


async def test_pimcore_chat_tells_a_non_member_how_to_join_the_group(store):
    """The hint said to create the group, which exists (a new-user finding)."""
    from pimcore.chat import chat

    from _net import token

    with trio.fail_after(30):
        async with serving(store) as srv:
            await srv.create_group("team", ["alice", "bob"])
            out: list[str] = []
            into, lines = trio.open_memory_channel(10)
            async with trio.open_nursery() as n:
                n.start_soon(lambda: chat(srv.url(), token("zed"), group="team", lines=lines, out=out.append))
                while not any("connected as zed" in line for line in out):
                    await trio.sleep(0.01)
                await into.send("hi")
                while not any(line.startswith("  (") for line in out):
                    await trio.sleep(0.01)
                await into.send("/quit")
            assert "✗ not sent (NOT_MEMBER: zed is not a member of group 'team'): hi" in out, out
            assert "  (you are not a member: pimcore group add team zed)" in out, out


async def test_http_api_recalls_edits_and_deletes(tmp_path):
    from test_http import assert_error
    from test_http_api import api, call

    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            m = await im.post("team", b"draft", sender="alice", device="web")
            base = f"/v1/conversations/team/messages/{m.seq}"
            status, edited = await call(c, "POST", base + "/edit", {"payload": "final", "sender": "alice"},
                                        headers={"Idempotency-Key": "e-1"})
            assert status == 201 and edited["seq"] == 2
            assert await call(c, "POST", base + "/edit", {"payload": "final", "sender": "alice"},
                              headers={"Idempotency-Key": "e-1"}) == (201, edited)
            assert_error(*await call(c, "POST", base + "/edit", {"payload": "x", "sender": "bob"}), 403, "NOT_SENDER")
            assert_error(*await call(c, "POST", "/v1/conversations/team/messages/9/recall"), 404, "NO_SUCH_MESSAGE")
            assert_error(*await call(c, "POST", "/v1/conversations/team/messages/x/recall"), 400, "BAD_REQUEST")
            status, deleted = await call(c, "POST", base + "/delete", {"user": "bob"})
            assert status == 201 and deleted["seq"] == 0
            status, page = await call(c, "GET", "/v1/conversations/team/history?user=bob&backward=false")
            assert [(x["seq"], x["deleted"], x["edited"] > 0) for x in page["messages"]][:1] == [(1, True, True)]
            status, recalled = await call(c, "POST", base + "/recall")
            assert status == 201 and recalled["seq"] == 3
            assert_error(*await call(c, "POST", base + "/recall"), 409, "RECALLED")
            status, page = await call(c, "GET", "/v1/conversations/team/history?user=alice&backward=false")
            first = page["messages"][0]
            assert (first["recalled"], first["payload_b64"]) == (True, "")
            assert [(x["kind"], x["target"]) for x in page["messages"][1:]] == [(EDIT, 1), (RECALL, 1)]


async def test_an_edit_after_delete_for_me_reveals_nothing_to_that_user(store):
    # Found by a tester: the EDIT entry pushed live carried the new payload
    # to a user who had deleted the message for themselves.
    with trio.fail_after(30):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "alice") as a, client(url, "bob") as phone, client(url, "bob", "laptop") as laptop:
                m1 = await a.send(AB, b"secret-v1")
                for dev in (phone, laptop):
                    await next_event(dev, MessageReceived)
                await phone.delete_for_me(AB, m1.seq)
                await next_event(laptop, MessageAmended)
                await a.edit(AB, m1.seq, b"secret-v2")
                for dev in (phone, laptop):
                    ev = await next_event(dev, MessageAmended)
                    assert (ev.entry.kind, ev.entry.target, ev.entry.payload) == (EDIT, 1, b"")
                    assert b"secret" not in (ev.message.payload if ev.message is not None else b"")
                    assert [m.payload for m in dev.view(AB)] == [b""]
                history = await laptop.fetch_history(AB)
                assert all(b"secret" not in m.payload for m in history)


async def test_delete_for_me_of_an_unread_message_lowers_the_unread_count_on_every_device(store):
    # Found by a reviewer: bob deleted an unread message for himself; the
    # store (and a fresh conversation list) said unread 2, bob's phone and
    # tablet said 3 until the next read.  A deleted message is not unread
    # (the store's count), as a recalled one is not.
    with trio.fail_after(30):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "alice") as a, client(url, "bob") as phone, client(url, "bob", "tablet") as tablet:
                sent = [await a.send(AB, b"m%d" % i) for i in range(3)]
                for dev in (phone, tablet):
                    for _ in range(3):
                        await next_event(dev, MessageReceived)
                    assert dev.unread(AB) == 3
                await phone.delete_for_me(AB, sent[0].seq)
                ev = await next_event(tablet, MessageAmended)
                assert (ev.entry.kind, ev.entry.target) == (DELETE, sent[0].seq)
                assert store.unread("bob", AB) == 2
                for dev in (phone, tablet):
                    assert dev.unread(AB) == 2 and dev.read_state(AB).unread == 2
                # Deleting it again, or recalling it after, counts nothing twice.
                await phone.delete_for_me(AB, sent[0].seq)
                await a.recall(AB, sent[0].seq)
                ev = await next_event(tablet, MessageAmended)
                while ev.entry.kind != RECALL:
                    ev = await next_event(tablet, MessageAmended)
                assert store.unread("bob", AB) == 2
                for dev in (phone, tablet):
                    assert dev.unread(AB) == 2
                # alice's own message deleted by her: never unread for her.
                await a.delete_for_me(AB, sent[1].seq)
                assert a.unread(AB) == 0


async def test_delete_for_me_and_recall_lower_the_conversation_list_entry_on_every_device(store):
    # The conversation list entry (conversation_entries) kept its own unread
    # and mention counts: a delete for me or a recall lowered unread() but
    # left the entry's badge stale until the next page.  It follows the same
    # rule as unread(), and agrees with the broker's next page.
    with trio.fail_after(30):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "alice") as a, client(url, "bob") as phone, client(url, "bob", "tablet") as tablet:
                sent = [await a.send(AB, b"m%d" % i, mentions=["bob"]) for i in range(3)]
                for dev in (phone, tablet):
                    for _ in range(3):
                        await next_event(dev, MessageReceived)
                    page = await dev.conversations()
                    assert [(e.conv, e.unread, e.mention_count) for e in page.entries] == [(AB, 3, 3)]
                await phone.delete_for_me(AB, sent[0].seq)
                await next_event(tablet, MessageAmended)
                await a.recall(AB, sent[1].seq)
                for dev in (phone, tablet):
                    ev = await next_event(dev, MessageAmended)
                    assert (ev.entry.kind, ev.entry.target) == (RECALL, sent[1].seq)
                for dev in (phone, tablet):
                    assert dev.unread(AB) == 1
                    assert dev.conversation_entries[AB].unread == 1
                # The broker's own page says the same (unread and mentions).
                local = {dev: dev.conversation_entries[AB] for dev in (phone, tablet)}
                for dev in (phone, tablet):
                    (fresh,) = (await dev.conversations()).entries
                    assert (local[dev].unread, local[dev].mention_count) == (fresh.unread, fresh.mention_count)
                    assert local[dev].read_seq == fresh.read_seq
