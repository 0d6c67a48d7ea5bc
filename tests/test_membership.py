"""Membership has a history (issue 10, item 2): unread counts, pushes,
history, read markers and the readers query follow each member's membership
intervals; membership changes are entries of the conversation.

Every test runs on both stores and both store drivers (inline, latency).
"""

from __future__ import annotations

import pytest

from pimcore import frames as F
from pimcore.client import SendError
from pimcore.errors import ErrorCode
from pimcore.store import LmdbStore, MemoryStore

from _harness import Harness, store_driver  # noqa: F401

MESSAGE, JOINED, LEFT = F.MessageKind.MESSAGE, F.MessageKind.JOINED, F.MessageKind.LEFT


@pytest.fixture(autouse=True)
def _every_store_driver(store_driver):
    return store_driver


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


@pytest.fixture
def h(store):
    return Harness(store)


def unread_at_login(h: Harness, conn: int, conv: str) -> dict:
    states = [s for f in h.take(conn, F.ReadStates) for s in f.entries if s.conv == conv]
    return states[-1] if states else None


def history(h: Harness, conn: int, conv: str, from_seq: int = 0, limit: int = 100, backward: bool = False) -> F.HistoryResp:
    h.feed(conn, F.HistoryReq(99, conv, from_seq, limit, backward))
    [resp] = h.take(conn, F.HistoryResp)
    return resp


def test_a_new_member_does_not_inherit_what_was_said_before(h):
    """The issue's input: group g of alice and bob; alice sends 5; dave is
    added; dave logs in."""
    h.create_group("g", ["alice", "bob"])
    alice = h.login("alice", "phone")
    for i in range(5):
        h.send(alice, "g", b"m%d" % i)
    h.add_members("g", ["dave"])
    dave = h.login("dave", "phone")
    state = unread_at_login(h, dave, "g")
    assert state is not None and state.unread == 0
    got = h.drain_device(dave)
    assert [(m.kind, m.sender, m.seq) for m in got] == [(JOINED, "dave", 6)]
    resp = history(h, dave, "g")
    assert resp.code == ErrorCode.OK
    assert [(m.kind, m.seq) for m in resp.messages] == [(JOINED, 6)]


def payloads(msgs) -> list:
    return [(m.kind, m.sender, m.payload) if m.kind else m.payload for m in msgs]


def test_leave_then_rejoin_does_not_show_what_was_said_while_away(h):
    h.create_group("g", ["alice", "bob", "carol"])
    alice = h.login("alice", "phone")
    h.send(alice, "g", b"before")  # seq 1
    h.remove_members("g", ["carol"])  # seq 2
    for i in range(3):
        h.send(alice, "g", b"away%d" % i)  # seqs 3..5
    h.add_members("g", ["carol"])  # seq 6
    h.send(alice, "g", b"back")  # seq 7
    carol = h.login("carol", "phone")
    state = unread_at_login(h, carol, "g")
    assert (state.read_seq, state.last_seq, state.unread) == (0, 7, 2)  # "before" and "back"
    assert payloads(h.drain_device(carol)) == [b"before", (LEFT, "carol", b""), (JOINED, "carol", b""), b"back"]
    assert [m.seq for m in history(h, carol, "g").messages] == [1, 2, 6, 7]
    assert [m.seq for m in history(h, carol, "g", 0, 3, backward=True).messages] == [7, 6, 2]
    assert [m.seq for m in history(h, carol, "g", 6, 3, backward=True).messages] == [2, 1]
    assert h.store.unread("carol", "g") == 2
    # bob, a member all along, counts all 5 messages of alice
    assert h.store.unread("bob", "g") == 5 and h.store.unread("alice", "g") == 0


def test_join_leave_join_with_messages_in_between_unread_after_each_step(h):
    h.create_group("g", ["alice"])
    alice = h.login("alice", "phone")
    h.send(alice, "g", b"m1")  # 1
    assert h.store.unread("dave", "g") == 0
    h.add_members("g", ["dave"])  # 2
    assert h.store.unread("dave", "g") == 0
    h.send(alice, "g", b"m2")  # 3
    assert h.store.unread("dave", "g") == 1
    h.remove_members("g", ["dave"])  # 4
    h.send(alice, "g", b"m3")  # 5
    assert h.store.unread("dave", "g") == 1
    h.add_members("g", ["dave"])  # 6
    assert h.store.unread("dave", "g") == 1
    h.send(alice, "g", b"m4")  # 7
    assert h.store.unread("dave", "g") == 2
    dave = h.login("dave", "phone")
    assert unread_at_login(h, dave, "g").unread == 2
    got = h.drain_device(dave)
    assert [m.seq for m in got] == [2, 3, 4, 6, 7]
    assert payloads(got)[1::3] == [b"m2", b"m4"]
    # history shows the same seqs, whatever the page size
    for limit in (1, 2, 3, 100):
        seqs, after = [], 0
        while True:
            resp = history(h, dave, "g", after, limit)
            seqs += [m.seq for m in resp.messages]
            if not resp.more:
                break
            after = resp.messages[-1].seq
        assert seqs == [2, 3, 4, 6, 7], limit
    # reading to the end leaves nothing unread
    h.feed(dave, F.Read("g", 7))
    assert h.store.unread("dave", "g") == 0 and h.store.read_marker("dave", "g") == 7


def test_read_markers_across_a_leave(h):
    h.create_group("g", ["alice", "bob"])
    alice = h.login("alice", "phone")
    bob = h.login("bob", "phone")
    for i in range(3):
        h.send(alice, "g", b"m%d" % i)  # 1..3
    h.feed(bob, F.Read("g", 1))
    assert h.store.read_marker("bob", "g") == 1
    h.remove_members("g", ["bob"])  # 4
    h.send(alice, "g", b"after")  # 5
    assert h.store.unread("bob", "g") == 2  # m1, m2: what he got and did not read
    h.take(bob)
    h.feed(bob, F.Read("g", 99))  # beyond what he may see: clamped to his LEFT entry
    assert h.store.read_marker("bob", "g") == 4
    [rs] = h.take(bob, F.ReadStates)
    assert rs.entries == (F.ReadState("g", 4, 4, 0),)  # last_seq: what he may see
    h.feed(bob, F.Read("g", 2))  # never back
    assert h.store.read_marker("bob", "g") == 4
    # his login shows him the conversation as he left it
    bob2 = h.login("bob", "tablet")
    assert unread_at_login(h, bob2, "g") == F.ReadState("g", 4, 4, 0)
    # he keeps what he was shown; a stranger gets nothing
    assert [m.seq for m in history(h, bob2, "g").messages] == [1, 2, 3, 4]
    carol = h.login("carol", "phone")
    assert history(h, carol, "g").code == ErrorCode.NOT_MEMBER


def readers(h: Harness, conn: int, conv: str) -> F.ReadersResp:
    h.feed(conn, F.ReadersReq(7, conv))
    [resp] = h.take(conn, F.ReadersResp)
    assert resp.req_id == 7 and resp.conv == conv
    return resp


def test_readers_query_respects_membership(h):
    h.create_group("g", ["alice", "bob", "carol"])
    alice = h.login("alice", "phone")
    bob = h.login("bob", "phone")
    carol = h.login("carol", "phone")
    for i in range(3):
        h.send(alice, "g", b"m%d" % i)
    h.feed(bob, F.Read("g", 2))
    h.feed(carol, F.Read("g", 3))
    h.remove_members("g", ["carol"])
    h.add_members("g", ["dave"])
    dave = h.login("dave", "phone")
    resp = readers(h, alice, "g")
    assert resp.code == ErrorCode.OK
    assert resp.readers == (F.Reader("alice", 0), F.Reader("bob", 2), F.Reader("dave", 0))
    assert readers(h, dave, "g").readers == resp.readers
    assert readers(h, carol, "g").code == ErrorCode.NOT_MEMBER  # former member
    assert readers(h, carol, "g").readers == ()
    stranger = h.login("erin", "phone")
    assert readers(h, stranger, "g").code == ErrorCode.NOT_MEMBER
    assert readers(h, alice, "nope").code == ErrorCode.UNKNOWN_CONVERSATION
    from pimcore.store import direct_conversation

    ab = direct_conversation("alice", "bob")
    h.send(alice, ab, b"hi")
    h.feed(bob, F.Read(ab, 1))
    assert readers(h, alice, ab).readers == (F.Reader("alice", 0), F.Reader("bob", 1))
    assert readers(h, stranger, ab).code == ErrorCode.NOT_MEMBER
    # many pipelined requests are all answered, in order
    for i in range(20):
        h.feed(alice, F.ReadersReq(100 + i, "g"))
    assert [r.req_id for r in h.take(alice, F.ReadersResp)] == list(range(100, 120))


def test_membership_entries_reach_online_devices_and_offline_ones_catch_up(h):
    h.create_group("g", ["alice", "bob"])
    alice = h.login("alice", "phone")
    h.drain_device(alice)
    h.add_members("g", ["dave", "carol"])  # bob offline, dave and carol too
    got = h.drain_device(alice)
    assert [(m.kind, m.sender, m.seq, m.device, m.after_seq) for m in got] == [
        (JOINED, "carol", 1, "", 0),
        (JOINED, "dave", 2, "", 1),
    ]
    h.remove_members("g", ["bob"])
    assert [(m.kind, m.sender) for m in h.drain_device(alice)] == [(LEFT, "bob")]
    bob = h.login("bob", "phone")
    assert [(m.kind, m.sender) for m in h.drain_device(bob)] == [(JOINED, "carol"), (JOINED, "dave"), (LEFT, "bob")]
    dave = h.login("dave", "phone")
    assert [(m.kind, m.sender) for m in h.drain_device(dave)] == [(JOINED, "dave"), (LEFT, "bob")]
    # no-ops make no entries
    h.add_members("g", ["dave"])
    h.remove_members("g", ["bob"])
    assert h.drain_device(alice) == [] and h.store.last_seq("g") == 3
    # a direct chat has no membership changes
    assert [m.kind for m in h.store.history("g", 0, 10)] == [JOINED, JOINED, LEFT]


def test_changes_by_another_writer_reach_online_devices_with_the_next_message(h):
    """``pimcore group remove|add`` writes into the store next to a running
    broker, which learns of it only from the group's next message (a new
    user's trial): the removed member's online device must get her LEFT
    entry then too -- she is no recipient of that message, so nothing else
    would tell her, and she looked like a member until a send of hers
    failed NOT_MEMBER or she logged in again."""
    h.create_group("g", ["alice", "bob", "carol"])
    alice, bob, carol = h.login("alice", "phone"), h.login("bob", "phone"), h.login("carol", "phone")
    h.send(alice, "g", b"before")
    for d in (alice, bob, carol):
        h.drain_device(d)
    h.store.remove_members("g", ["bob"])  # another writer: the broker is not told
    h.store.add_members("g", ["dave"])
    dave = h.login("dave", "phone")  # online (only) after the add: his login reads his JOINED
    assert [(m.kind, m.sender) for m in h.drain_device(dave)] == [(JOINED, "dave")]
    h.store.remove_members("g", ["carol"])
    assert h.drain_device(bob) == [] and h.drain_device(carol) == []  # (nothing yet: as documented)
    h.send(alice, "g", b"after")
    assert [(m.kind, m.sender, m.seq) for m in h.drain_device(bob)] == [(LEFT, "bob", 2)]
    # (carol was a member at bob's LEFT and dave's JOINED: hers come last.)
    assert [(m.kind, m.sender, m.seq) for m in h.drain_device(carol)] == [(LEFT, "bob", 2), (JOINED, "dave", 3),
                                                                          (LEFT, "carol", 4)]
    assert [(m.kind, m.sender, m.seq) for m in h.drain_device(dave)] == [(LEFT, "carol", 4), (MESSAGE, "alice", 5)]
    assert [(m.kind, m.seq) for m in h.drain_device(alice)] == [(LEFT, 2), (JOINED, 3), (LEFT, 4)]
    # Told once: the next message finds no entry the broker has not seen.
    h.send(alice, "g", b"again")
    assert h.drain_device(bob) == [] and h.drain_device(carol) == []
    assert [(m.seq, m.payload) for m in h.drain_device(dave)] == [(6, b"again")]


def test_a_removal_by_another_writer_in_a_group_the_broker_saw_no_message_of(h):
    """The group's seqs as of the removed member's login count too: a
    group made and changed only by another writer (or whose messages came
    before this broker started) still shows the hole at its next message."""
    h.store.create_group("g", ["alice", "carol"], now=1)
    carol = h.login("carol", "phone")
    alice = h.login("alice", "phone")
    h.store.remove_members("g", ["carol"])
    h.send(alice, "g", b"after")
    assert [(m.kind, m.sender, m.seq) for m in h.drain_device(carol)] == [(LEFT, "carol", 1)]
    assert [(m.kind, m.seq) for m in h.drain_device(alice)] == [(LEFT, 1)]


def test_the_brokers_own_changes_are_no_hole_to_read(h):
    """The hole read (_learn_seqs) is for another writer's entries only:
    the broker's own messages, amendments and membership changes -- in one
    batch, in any order of ops -- and logins' seeds never set one off."""
    from pimcore.store import ReadHistory

    def hole_reads() -> list:
        return [op for r in h.reads for op in r.ops if isinstance(op, ReadHistory) and op.user == ""]

    h.create_group("g", ["alice", "bob"])
    alice, bob = h.login("alice", "phone"), h.login("bob", "phone")
    h.send(alice, "g", b"one", local_id=1)
    h.feed(alice, F.AmendReq(2, "g", 1, int(F.MessageKind.EDIT), h.now, b"one!"))
    h.add_members("g", ["carol"])
    carol = h.login("carol", "phone")
    h.hold_commits = True  # one batch: a message, a removal, a message, an amendment
    h.send(alice, "g", b"two", local_id=3)
    h.run(h.broker.remove_members("g", ["carol"], h.now, ref=99))
    h.send(bob, "g", b"three", local_id=1)
    h.feed(alice, F.AmendReq(4, "g", 4, int(F.MessageKind.EDIT), h.now, b"two!"))
    h.hold_commits = False
    h.release()
    h.send(alice, "g", b"four", local_id=5)
    assert [m.seq for m in h.store.history("g", 0, 20)] == list(range(1, 9))
    assert [(m.kind, m.sender) for m in h.drain_device(carol)][-1] == (LEFT, "carol")
    assert hole_reads() == []
    h.store.remove_members("g", ["bob"])  # now another writer: one read, of its seq
    h.send(alice, "g", b"five", local_id=6)
    assert [(op.from_seq, op.limit) for op in hole_reads()] == [(8, 1)]


@pytest.mark.parametrize("visible", [False, True])
def test_history_visible_setting(h, visible):
    h.run(h.broker.create_group("g", ["alice", "bob"], h.now, ref=1, history_visible=visible))
    assert h.store.history_visible("g") is visible
    alice = h.login("alice", "phone")
    for i in range(3):
        h.send(alice, "g", b"m%d" % i)
    h.add_members("g", ["dave"])
    h.send(alice, "g", b"after")
    dave = h.login("dave", "phone")
    # unread counts and the inbox start at the join either way
    assert unread_at_login(h, dave, "g").unread == 1
    assert [m.seq for m in h.drain_device(dave)] == [4, 5]
    seqs = [m.seq for m in history(h, dave, "g").messages]
    assert seqs == ([1, 2, 3, 4, 5] if visible else [4, 5])
    h.remove_members("g", ["dave"])
    h.send(alice, "g", b"gone")
    seqs = [m.seq for m in history(h, dave, "g").messages]
    assert seqs == ([1, 2, 3, 4, 5, 6] if visible else [4, 5, 6])


# ---------------------------------------------------------------- the SDK, end to end


async def test_sdk_membership_entries_unread_and_readers(tmp_path):
    import trio

    from pimcore.client import SendError

    from _net import client, serving

    store = LmdbStore(str(tmp_path / "net"), durability="os")
    try:
        with trio.fail_after(20):
            async with serving(store) as srv:
                await srv.create_group("team", ["alice", "bob"])
                async with client(srv.url(), "alice") as a, client(srv.url(), "bob") as b:
                    for i in range(2):
                        await a.send("team", b"m%d" % i)
                    got = []
                    async for m in b.messages():
                        got.append(m)
                        if len(got) == 2:
                            break
                    assert b.unread("team") == 2
                    changed = await srv.add_members("team", ["dave"])
                    assert [(e.kind, e.sender) for e in changed.entries] == [(JOINED, "dave")]
                    async for m in b.messages():
                        assert (m.kind, m.sender, m.seq, m.payload) == (JOINED, "dave", 3, b"")
                        break
                    # a membership entry is never unread
                    assert b.unread("team") == 2
                    async with client(srv.url(), "dave") as d:
                        await d.wait_connected()
                        async for m in d.messages():
                            assert (m.kind, m.sender, m.seq) == (JOINED, "dave", 3)
                            break
                        assert d.unread("team") == 0
                        assert [m.seq for m in await d.fetch_history("team")] == [3]
                        await b.mark_read("team", 2)
                        with trio.fail_after(5):
                            while (await a.readers("team"))[1].read_seq != 2:
                                await trio.sleep(0.01)
                        assert await d.readers("team") == [F.Reader("alice", 0), F.Reader("bob", 2), F.Reader("dave", 0)]
                        await srv.remove_members("team", ["dave"])
                        with pytest.raises(SendError) as err:
                            await d.readers("team")
                        assert err.value.code is ErrorCode.NOT_MEMBER
    finally:
        store.close()


async def test_cli_group_remove_and_add_reach_running_devices(tmp_path):
    """``pimcore group remove`` / ``add`` on the data directory while the
    broker runs (README: they work then, and the change reaches running
    chats with the group's next message).  A new user's trial: carol,
    removed, never got her LEFT entry on her running device -- only a new
    device or history showed it."""
    import trio

    from pimcore.client import open_client
    from pimcore.embed import open_pimcore

    from _net import FAST_CLIENT
    from _proc import run_pimcore

    data = tmp_path / "data"

    async def pimcore_group(*argv: str) -> None:
        r = await trio.to_thread.run_sync(lambda: run_pimcore("group", *argv, "--data-dir", data))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r

    async def take(client, n: int) -> list:
        got = []
        with trio.fail_after(10):
            async for m in client.messages():
                got.append((m.seq, m.kind, m.sender, m.payload))
                if len(got) == n:
                    return got
        return got

    with trio.fail_after(60):
        async with open_pimcore(data_dir=data, listen=["tcp://127.0.0.1:0"]) as im:
            await im.create_group("g", ["alice", "carol"])
            url = im.urls[0]
            async with open_client(url, im.issue_token("alice"), "a1", config=FAST_CLIENT) as a, \
                    open_client(url, im.issue_token("carol"), "c1", config=FAST_CLIENT) as c, \
                    open_client(url, im.issue_token("dave"), "d1", config=FAST_CLIENT) as d:
                await d.wait_connected()
                await a.send("g", b"before")
                assert await take(c, 1) == [(1, MESSAGE, "alice", b"before")]
                await pimcore_group("remove", "g", "carol")
                await a.send("g", b"after removal")
                # Her LEFT entry comes to the running device, and nothing after it.
                assert await take(c, 1) == [(2, LEFT, "carol", b"")]
                assert [s for s in await take(a, 1)] == [(2, LEFT, "carol", b"")]
                await pimcore_group("add", "g", "dave")
                await a.send("g", b"welcome dave")
                # An added user online: her JOINED entry and the message (the
                # message's recipients name her, so this worked before too).
                assert await take(d, 2) == [(4, JOINED, "dave", b""), (5, MESSAGE, "alice", b"welcome dave")]
                assert await take(a, 1) == [(4, JOINED, "dave", b"")]
                with pytest.raises(SendError) as refused:
                    await c.send("g", b"carol after removal")
                assert refused.value.code is ErrorCode.NOT_MEMBER
                # carol got nothing after her LEFT entry (a send of alice's
                # would be pushed before this one of dave's, which is not).
                await d.send("g", b"thanks")
                assert await take(a, 1) == [(6, MESSAGE, "dave", b"thanks")]
                assert [m.seq for m in await c.fetch_history("g", 0, 50)] == [1, 2]
                assert c.view("g")[-1].seq == 2


# ---------------------------------------------------------------- model-based


def _model(history):
    """From the stored entries of a group: each user's member seqs (the
    inbox and unread counts follow these) -- replayed independently of the
    store's own intervals."""
    members = {"u0", "u1"}  # the group's creation members
    member_seqs: dict = {u: set() for u in USERS}
    for m in history:
        if m.kind == JOINED:
            assert m.sender not in members, f"JOINED for a member at {m.seq}"
            members.add(m.sender)
        for u in members:
            member_seqs[u].add(m.seq)
        if m.kind == LEFT:
            assert m.sender in members, f"LEFT for a non-member at {m.seq}"
            members.discard(m.sender)
    return members, member_seqs


USERS = ["u0", "u1", "u2", "u3"]


@pytest.mark.parametrize("kind", ["memory", "lmdb"])
@pytest.mark.parametrize("seed", range(12))
def test_random_joins_leaves_sends_and_reads_follow_membership(tmp_path, kind, seed):
    import random

    rnd = random.Random(seed)
    store = MemoryStore() if kind == "memory" else LmdbStore(str(tmp_path / "db"), durability="os")
    try:
        h = Harness(store)
        visible = seed % 3 == 0
        h.run(h.broker.create_group("g", ["u0", "u1"], h.now, ref=1, history_visible=visible))
        conns = {u: h.login(u, "a") for u in USERS}
        for step in range(80):
            u = rnd.choice(USERS)
            h.hold_commits = rnd.random() < 0.3
            r = rnd.random()
            if r < 0.45:
                h.send(conns[u], "g", b"%d" % step)
            elif r < 0.6:
                h.run(h.broker.add_members("g", rnd.sample(USERS, rnd.randint(1, 2)), h.now, ref=100 + step))
            elif r < 0.75:
                h.run(h.broker.remove_members("g", rnd.sample(USERS, rnd.randint(1, 2)), h.now, ref=100 + step))
            elif r < 0.9:
                h.feed(conns[u], F.Read("g", rnd.randint(0, h.store.last_seq("g") + 2)))
            else:
                h.release()
            h.now += rnd.randint(0, 1000)
        h.hold_commits = False
        h.release()
        hist = store.history("g", 0, 10_000)
        assert [m.seq for m in hist] == list(range(1, len(hist) + 1))
        members, member_seqs = _model(hist)
        assert set(store.members("g")) == members
        kinds = {m.seq: m for m in hist}
        for u in USERS:
            # every device got exactly the entries of its member seqs
            fresh = h.login(u, "fresh")
            got = [m.seq for m in h.drain_device(fresh) if m.conv == "g"]
            assert got == sorted(member_seqs[u]), u
            # pushes to the online device: the same, minus its own sends
            online = [m.seq for m in h.drain_device(conns[u]) if m.conv == "g"]
            assert online == [s for s in sorted(member_seqs[u]) if not (kinds[s].kind == MESSAGE and kinds[s].sender == u)]
            # markers stay within what the user may see, unread counts follow
            marker = store.read_marker(u, "g")
            seen = member_seqs[u]
            assert marker <= (max(seen) if seen else 0)
            expect = sum(1 for s in seen if s > marker and kinds[s].kind == MESSAGE and kinds[s].sender != u)
            assert store.unread(u, "g") == expect, u
            # history: the member seqs (or all up to the last, with visible history)
            resp = history(h, fresh, "g", 0, 10_000)
            if not seen:
                assert resp.code == ErrorCode.NOT_MEMBER
            else:
                want = list(range(1, max(seen) + 1)) if visible else sorted(seen)
                assert [m.seq for m in resp.messages] == want, u
            # readers: current members only
            h.feed(fresh, F.ReadersReq(1, "g"))
            [rr] = h.take(fresh, F.ReadersResp)
            if u in members:
                assert [r.user for r in rr.readers] == sorted(members)
                assert all(r.read_seq == store.read_marker(r.user, "g") for r in rr.readers)
            else:
                assert rr.code == ErrorCode.NOT_MEMBER
    finally:
        store.close()


def test_a_group_with_no_members_is_not_created(h):
    # The core created it: a group no one is in, no one can post to, and
    # only the host knows exists.
    from pimcore.store import Rejected

    assert h.host_call(h.broker.create_group, "empty", []) == Rejected(ErrorCode.BAD_REQUEST)
    assert h.host_call(h.broker.create_group, "empty", set()) == Rejected(ErrorCode.BAD_REQUEST)
    assert not h.store.conversation_exists("empty")
    h.create_group("empty", ["alice"])  # the id is still free
    assert h.store.members("empty") == ("alice",)
