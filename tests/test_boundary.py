"""The core's boundary, proven through public APIs only.

* the broker holds no store: a login is ONE read request (one LoadSession op),
  however many conversations the user has, and the read states it carries are
  the store's;
* group admin is ops of a batch, ordered with the messages around it;
* authentication and the content filter are requests a host may answer late,
  holding up only the connection that asked (core and served broker);
* deadlines: next_deadline()/handle_timer() in the core, and a served broker
  whose timer sleeps exactly until them (trio's autojump clock);
* the asynchronous store path (LatencyStore: reads complete out of order);
* the glue without sockets (serve_stream on trio memory streams).
"""

from __future__ import annotations

import inspect
import time
from collections import Counter, defaultdict
from dataclasses import replace
from typing import Optional

import pytest
import trio
import trio.testing

from pimcore import frames as F
from pimcore.auth import JwtAuthenticator, issue_token
from pimcore.codec import Decoder, encode_frame
from pimcore.core import (
    SECOND,
    AdminDone,
    Authenticate,
    Broker,
    BrokerConfig,
    CheckContent,
    Identity,
    StoreRequest,
)
from pimcore.errors import AuthError, CloseCode, ErrorCode
from pimcore.net import Endpoint, ServerConfig, open_broker_server
from pimcore.store import GroupChanged, LmdbStore, MemoryStore, direct_conversation
from pimcore.store.base import (
    AckPosition,
    AddMembers,
    LoadSession,
    NewMessage,
    ReadHistory,
    ReadInbox,
    Rejected,
    TouchDevice,
)
from pimcore.testing.latency import LatencyStore

from _harness import T0, Harness
from _net import SECRET, FAST_CLIENT, RawConn, client, server_config, token

AB = direct_conversation("alice", "bob")
MS = 1000  # µs


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os") if request.param == "lmdb" else MemoryStore()
    yield s
    s.close()


DRIVERS = pytest.mark.parametrize("driver", ["inline", "latency"])


def _frames(h: Harness, conn: int, kind) -> list:
    return [f for f in h.frames[conn] if isinstance(f, kind)]


# ---------------------------------------------------------------- 1. no store in the broker


def test_the_broker_takes_no_store_and_has_none():
    assert "store" not in inspect.signature(Broker).parameters
    b = Broker(BrokerConfig(), node_id=b"\x01" * 8, last_server_time=0)
    assert not hasattr(b, "store")
    with pytest.raises(TypeError):
        Broker(BrokerConfig(), MemoryStore(), node_id=b"\x01" * 8)  # type: ignore[misc]
    with pytest.raises(TypeError):
        Broker(BrokerConfig(), store=MemoryStore(), node_id=b"\x01" * 8)  # type: ignore[call-arg]
    # Nothing the broker does touches a store: it only emits requests.
    out = b.connection_made(1, T0)
    out += b.receive_data(1, encode_frame(F.Login(b"tok", "phone", T0, 0, 0)), T0)
    assert [type(c) for c in out] == [Authenticate]


@DRIVERS
def test_a_login_with_hundreds_of_conversations_is_one_session_read(store, driver):
    """300 groups and 20 direct chats, with messages, read markers and peer
    markers: the login of a new device is exactly one read request holding
    exactly one LoadSession op, and its LoginAck/ReadStates/ReadReceipts are
    the store's view."""
    for i in range(300):
        store.create_group(f"g{i:03d}", ["alice", "bob", f"u{i % 7}"], T0)
    h = Harness(store, driver=driver)
    bob = h.login("bob", "phone")
    alice = h.login("alice", "laptop")
    peers = [h.login(f"p{i:02d}", "phone") for i in range(20)]
    for i, p in enumerate(peers):
        conv = direct_conversation("alice", f"p{i:02d}")
        for _ in range(i % 4 + 1):
            h.send(p, conv, b"hi alice")
        h.send(alice, conv, b"hi back")
        if i % 3 == 0:  # the peer read alice's message: a peer marker
            h.feed(p, F.Read(conv, store.last_seq(conv)))
    for i in range(0, 300, 11):
        for _ in range(i % 3 + 1):
            h.send(bob, f"g{i:03d}", b"group news")
    for i in range(0, 300, 22):  # alice read some of them (marker < last)
        h.feed(alice, F.Read(f"g{i:03d}", 1))
    h.drain_device(alice)
    h.lose(alice)
    convs = store.conversations("alice")
    assert len(convs) == 320

    reads_before = len(h.reads)
    commits_before = len(h.commits)
    head = store.inbox_head("alice")
    tablet = h.login("alice", "tablet", position=head)  # nothing to push: only the login read
    login_reads = h.reads[reads_before:]
    assert len(login_reads) == 1
    (req,) = login_reads
    assert isinstance(req, StoreRequest) and not req.write
    assert req.ops == (LoadSession("alice", "tablet"),)
    # The only write the login caused is the device's TouchDevice.
    for c in h.commits[commits_before:]:
        assert all(isinstance(op, TouchDevice) for op in c.ops)

    frames = h.take(tablet)
    acks = [f for f in frames if isinstance(f, F.LoginAck)]
    assert len(acks) == 1 and acks[0].head == head and acks[0].position == head and acks[0].user == "alice"
    assert isinstance(frames[0], F.LoginAck)
    state_frames = [f for f in frames if isinstance(f, F.ReadStates)]
    assert len(state_frames) == 2  # 320 entries, 256 per frame
    states = [s for f in state_frames for s in f.entries]
    assert sorted(s.conv for s in states) == sorted(convs)
    expected = {c: (store.read_marker("alice", c), store.last_seq(c), store.unread("alice", c)) for c in convs}
    assert {s.conv: (s.read_seq, s.last_seq, s.unread) for s in states} == expected
    assert sum(1 for v in expected.values() if v[2]) > 20  # unread counts really vary
    assert any(v[0] for v in expected.values())
    receipts = {(f.conv, f.reader): f.seq for f in frames if isinstance(f, F.ReadReceipt)}
    want = {}
    for i in range(0, 20, 3):
        conv = direct_conversation("alice", f"p{i:02d}")
        want[(conv, f"p{i:02d}")] = store.read_marker(f"p{i:02d}", conv)
    assert receipts == want

    # A device that is behind: still one LoadSession; then inbox reads only.
    reads_before = len(h.reads)
    phone = h.login("alice", "phone", position=0)
    new_reads = h.reads[reads_before:]
    assert [r.ops for r in new_reads if any(isinstance(op, LoadSession) for op in r.ops)] == [(LoadSession("alice", "phone"),)]
    assert all(len(r.ops) == 1 and isinstance(r.ops[0], (LoadSession, ReadInbox)) for r in new_reads)
    got = h.drain_device(phone)
    assert len(got) == len(store.inbox_range("alice", 0, 10_000)) - sum(
        1 for _, m in store.inbox_range("alice", 0, 10_000) if m.device == "phone" and m.sender == "alice"
    )


# ---------------------------------------------------------------- 2. group admin in batches


@DRIVERS
def test_group_admin_is_ordered_with_the_messages_of_its_batch(store, driver):
    h = Harness(store, driver=driver)
    h.create_group("team", ["alice", "bob"])
    alice = h.login("alice", "phone")
    bob = h.login("bob", "phone")
    carol = h.login("carol", "phone")
    h.take(carol)

    h.hold_commits = True
    h.send(bob, "team", b"warm-up")  # this batch is with the store...
    assert len(h.held) == 1
    # ...so these three gather in the next one, in this order.
    h.send(alice, "team", b"before")
    h.run(h.broker.add_members("team", ["carol"], h.now, ref=77))
    h.send(alice, "team", b"after")
    assert 77 not in h.admin
    assert h.take(carol) == []
    h.release()
    h.hold_commits = False

    batch = next(c for c in h.commits if any(isinstance(op, AddMembers) for op in c.ops))
    kinds = [(type(op).__name__, getattr(op, "payload", None)) for op in batch.ops if isinstance(op, (NewMessage, AddMembers))]
    assert kinds == [("NewMessage", b"before"), ("AddMembers", None), ("NewMessage", b"after")]
    assert isinstance(h.admin.pop(77), GroupChanged)
    # The store applied them in batch order: carol is in the inbox of "after" only.
    assert [m.payload for m in h.drain_device(carol)] == [b"after"]
    assert [a.code for a in h.acks(alice)] == [ErrorCode.OK, ErrorCode.OK]
    h.send(alice, "team", b"next")
    assert [m.payload for m in h.drain_device(carol)] == [b"next"]
    assert [m.payload for m in store.history("team", 0, 10)] == [b"warm-up", b"before", b"after", b"next"]

    # And the other way round: removed in the middle of a batch.
    h.hold_commits = True
    h.send(bob, "team", b"warm-up 2")
    h.send(alice, "team", b"carol sees this")
    h.run(h.broker.remove_members("team", ["carol"], h.now, ref=78))
    h.send(alice, "team", b"carol does not")
    h.release()
    h.hold_commits = False
    assert isinstance(h.admin.pop(78), GroupChanged)
    assert [m.payload for m in h.drain_device(carol)] == [b"warm-up 2", b"carol sees this"]


@DRIVERS
def test_admin_done_reports_refusals_and_the_rest_of_the_batch_goes_through(store, driver):
    h = Harness(store, driver=driver)
    h.create_group("team", ["alice", "bob"])
    alice = h.login("alice", "phone")
    h.hold_commits = True
    h.send(alice, "team", b"warm-up")
    h.run(h.broker.create_group("team", ["carol"], h.now, ref=1))  # exists
    h.run(h.broker.add_members("nosuch", ["carol"], h.now, ref=2))  # unknown
    h.run(h.broker.remove_members("nosuch", ["carol"], h.now, ref=3))  # unknown
    h.run(h.broker.create_group(AB, ["alice", "bob"], h.now, ref=4))  # a direct id
    h.run(h.broker.create_group("fine", ["not a valid id!"], h.now, ref=5))  # bad member
    h.run(h.broker.add_members("team", ["bad id"], h.now, ref=6))  # bad member
    h.send(alice, "team", b"in the same batch")
    h.run(h.broker.create_group("new", ["alice", "carol"], h.now, ref=7))
    h.release()
    h.hold_commits = False
    codes = {ref: (r.code if isinstance(r, Rejected) else type(r).__name__) for ref, r in h.admin.items()}
    assert codes == {
        1: ErrorCode.ALREADY_EXISTS,
        2: ErrorCode.UNKNOWN_CONVERSATION,
        3: ErrorCode.UNKNOWN_CONVERSATION,
        4: ErrorCode.BAD_REQUEST,
        5: ErrorCode.BAD_REQUEST,
        6: ErrorCode.BAD_REQUEST,
        7: "GroupChanged",
    }
    assert [a.code for a in h.acks(alice)] == [ErrorCode.OK, ErrorCode.OK]
    assert [m.payload for m in store.history("team", 0, 10)] == [b"warm-up", b"in the same batch"]
    assert store.members("team") == ("alice", "bob")
    assert store.members("new") == ("alice", "carol")
    assert not store.conversation_exists("fine") and not store.conversation_exists("nosuch")
    # The harness helpers raise on a refusal.
    with pytest.raises(ValueError):
        h.create_group("team", ["x"])


# ---------------------------------------------------------------- 3. hooks are requests


def _allow_all(user: str, conv: str, payload: bytes) -> Optional[str]:
    return None


@DRIVERS
def test_a_held_content_check_holds_up_only_its_connection(store, driver):
    h = Harness(store, BrokerConfig(content_filter=_allow_all), driver=driver)
    h.create_group("room", ["alice", "bob", "carol"])
    a, b, c = h.login("alice", "phone"), h.login("bob", "phone"), h.login("carol", "phone")
    h.hold_hooks = True
    h.send(a, "room", b"a1")
    assert [type(x) for x in h.held_hooks] == [CheckContent]
    assert h.held_hooks[0].user == "alice" and h.held_hooks[0].payload == b"a1"
    h.send(b, "room", b"b1")
    h.send(c, "room", b"c1")
    h.send(a, "room", b"a2")  # waits behind a1's check: no request for it yet
    assert sorted((x.user, x.payload) for x in h.held_hooks) == [("alice", b"a1"), ("bob", b"b1"), ("carol", b"c1")]
    assert h.broker.statistics().hooks_in_flight == 3

    h.answer_hooks(which=lambda cmd: cmd.user != "alice")
    assert [x.code for x in h.acks(b)] == [ErrorCode.OK]
    assert [x.code for x in h.acks(c)] == [ErrorCode.OK]
    assert h.acks(a) == []
    assert sorted(m.payload for m in store.history("room", 0, 10)) == [b"b1", b"c1"]
    assert [(x.user, x.payload) for x in h.held_hooks] == [("alice", b"a1")]

    h.answer_hooks()  # a1 passes; then a2 is looked at (its own check)
    assert [(x.user, x.payload) for x in h.held_hooks] == [("alice", b"a2")]
    h.answer_hooks()
    acks = h.acks(a)
    assert [(x.local_id, x.code) for x in acks] == [(1, ErrorCode.OK), (2, ErrorCode.OK)]
    stored = store.history("room", 0, 10)
    assert [m.payload for m in stored][2:] == [b"a1", b"a2"]
    assert [x.seq for x in acks] == [3, 4]

    # A rejection: SendAck REJECTED, an Error with the reason, nothing stored.
    commits = len(h.commits)
    h.send(a, "room", b"spam")
    h.answer_hooks(reason="looks like spam")
    frames = h.take(a)
    assert [(f.local_id, f.code) for f in frames if isinstance(f, F.SendAck)] == [(3, ErrorCode.REJECTED)]
    errors = [f for f in frames if isinstance(f, F.Error)]
    assert [(e.code, e.ref, e.reason) for e in errors] == [(ErrorCode.REJECTED, 3, "looks like spam")]
    assert store.last_seq("room") == 4
    assert not any(isinstance(op, NewMessage) for cmd in h.commits[commits:] for op in cmd.ops)
    assert h.broker.statistics().hooks_in_flight == 0


@DRIVERS
def test_hook_answers_for_connections_that_are_gone_are_ignored(store, driver):
    h = Harness(store, BrokerConfig(content_filter=_allow_all), driver=driver)
    h.hold_hooks = True
    conn = h.login("dave", "phone")
    assert [type(x) for x in h.held_hooks] == [Authenticate]
    h.lose(conn)
    reads = len(h.reads)
    h.answer_hooks()  # the answer comes after the close
    assert len(h.reads) == reads  # no session read for a connection that is gone
    assert h.frames[conn] == [] and conn not in h.closed
    st = h.broker.statistics()
    assert st.connections == 0 and st.logins == 0 and st.online_devices == 0 and st.hooks_in_flight == 0

    # Same for a content check: the message is not stored.
    h.hold_hooks = False
    eve = h.login("eve", "phone")
    h.hold_hooks = True
    h.send(eve, direct_conversation("eve", "bob"), b"x")
    assert [type(x) for x in h.held_hooks] == [CheckContent]
    h.lose(eve)
    h.take(eve)
    h.answer_hooks()
    assert h.take(eve) == []
    assert store.last_seq(direct_conversation("eve", "bob")) == 0
    # An explicit refusal of a login still closes with AUTH_FAILED.
    frank = h.login("frank", "phone")
    h.answer_hooks(identity=AuthError("no such user"))
    assert h.closed[frank].code == CloseCode.AUTH_FAILED and "no such user" in h.closed[frank].reason
