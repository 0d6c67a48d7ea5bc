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
from dataclasses import replace
from typing import Optional

import pytest
import trio
import trio.testing

from pimcore import frames as F
from pimcore.auth import JwtAuthenticator, issue_token
from pimcore.codec import encode_frame
from pimcore.core import (
    SECOND,
    Authenticate,
    Broker,
    BrokerConfig,
    CheckContent,
    Identity,
    StoreRequest,
)
from pimcore.errors import AuthError, CloseCode, ErrorCode
from pimcore.net import ServerConfig, open_broker_server
from pimcore.store import GroupChanged, LmdbStore, MemoryStore, direct_conversation
from pimcore.store.base import (
    AddMembers,
    LoadSession,
    NewMessage,
    ReadInbox,
    Rejected,
    TouchDevice,
)
from pimcore.testing.latency import LatencyStore

from _harness import T0, Harness
from _net import SECRET, RawConn, client, server_config, token

AB = direct_conversation("alice", "bob")
MS = 1000  # µs


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os") if request.param == "lmdb" else MemoryStore()
    yield s
    s.close()


DRIVERS = pytest.mark.parametrize("driver", ["inline", "latency"])


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
    # The store applied them in batch order: carol gets her JOINED entry,
    # then "after" only.
    assert [(m.kind, m.payload) for m in h.drain_device(carol)] == [(1, b""), (0, b"after")]
    assert [a.code for a in h.acks(alice)] == [ErrorCode.OK, ErrorCode.OK]
    h.send(alice, "team", b"next")
    assert [m.payload for m in h.drain_device(carol)] == [b"next"]
    assert [m.payload for m in store.history("team", 0, 10)] == [b"warm-up", b"before", b"", b"after", b"next"]

    # And the other way round: removed in the middle of a batch.
    h.hold_commits = True
    h.send(bob, "team", b"warm-up 2")
    h.send(alice, "team", b"carol sees this")
    h.run(h.broker.remove_members("team", ["carol"], h.now, ref=78))
    h.send(alice, "team", b"carol does not")
    h.release()
    h.hold_commits = False
    assert isinstance(h.admin.pop(78), GroupChanged)
    assert [(m.kind, m.payload) for m in h.drain_device(carol)] == [(0, b"warm-up 2"), (0, b"carol sees this"), (2, b"")]


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


# ---------------------------------------------------------------- 3b. hooks in the served broker


def _with_filter(cfg: ServerConfig, content_filter) -> ServerConfig:
    return replace(cfg, broker=replace(cfg.broker, content_filter=content_filter))


async def _until(pred, step: float = 0.001) -> None:
    while not pred():
        await trio.sleep(step)


async def test_served_async_content_filter_holds_up_only_its_sender(tmp_path):
    from pimcore.client import SendError

    store = LmdbStore(str(tmp_path / "db"), durability="os")
    gate = trio.Event()
    asked: list[tuple[str, bytes]] = []

    async def async_filter(user: str, conv: str, payload: bytes) -> Optional[str]:
        asked.append((user, payload))
        if user == "alice":
            await gate.wait()
        await trio.sleep(0)
        return "looks like spam" if b"BUY NOW" in payload else None

    try:
        with trio.fail_after(30):
            async with open_broker_server(store, JwtAuthenticator(SECRET), _with_filter(server_config(), async_filter)) as srv:
                async with client(srv.url(), "alice") as a, client(srv.url(), "bob") as b:
                    done: dict[str, object] = {}

                    async def alice_sends() -> None:
                        done["a1"] = await a.send(AB, b"a1")

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(alice_sends)
                        await _until(lambda: ("alice", b"a1") in asked)
                        # Alice's check is out; Bob's send goes all the way through.
                        with trio.fail_after(10):
                            b1 = await b.send(AB, b"b1")
                            b2 = await b.send(AB, b"b2")
                        assert (b1.seq, b2.seq) == (1, 2)
                        assert "a1" not in done
                        assert [m.payload for m in store.history(AB, 0, 10)] == [b"b1", b"b2"]
                        assert srv.broker.statistics().hooks_in_flight == 1
                        gate.set()
                    assert done["a1"].seq == 3  # type: ignore[attr-defined]
                    with pytest.raises(SendError) as err:
                        await b.send(AB, b"BUY NOW")
                    assert err.value.code is ErrorCode.REJECTED
                    assert (await a.send(AB, b"a2")).seq == 4
        assert [m.payload for m in store.history(AB, 0, 10)] == [b"b1", b"b2", b"a1", b"a2"]
    finally:
        store.close()


async def test_served_async_authenticator_slow_for_one_user_does_not_delay_others(tmp_path):
    store = LmdbStore(str(tmp_path / "db"), durability="os")
    jwt = JwtAuthenticator(SECRET)
    gate = trio.Event()
    asked: list[str] = []

    async def authenticate(tok: bytes, now: int) -> Identity:
        ident = jwt(tok, now)
        asked.append(ident.user)
        if ident.user == "slow":
            await gate.wait()
        await trio.sleep(0)
        if ident.user == "mallory":
            raise AuthError("mallory is banned")
        return ident

    try:
        with trio.fail_after(30):
            async with open_broker_server(store, authenticate, server_config()) as srv:
                port = srv.endpoints[0].port
                slow = await RawConn.open(port)
                await slow.send(F.Login(token("slow").encode(), "raw", int(time.time() * 1e6), 0, 0))
                await slow.send(F.SendReq(1, direct_conversation("slow", "alice"), int(time.time() * 1e6), b"pipelined"))
                await _until(lambda: "slow" in asked)
                with trio.fail_after(10):
                    async with client(srv.url(), "alice") as a:
                        assert (await a.send(AB, b"while slow waits")).seq == 1
                        fast = await RawConn.open(port)
                        ack = await fast.login("bob")
                        assert ack.user == "bob"
                        banned = await RawConn.open(port)
                        await banned.send(F.Login(token("mallory").encode(), "raw", int(time.time() * 1e6), 0, 0))
                        close = await banned.until(F.Close)
                        assert close.code == CloseCode.AUTH_FAILED and "banned" in close.reason
                st = srv.broker.statistics()
                assert st.hooks_in_flight == 1 and st.logins == 2
                gate.set()
                ack = await slow.until(F.LoginAck)
                assert ack.user == "slow"
                sack = await slow.until(F.SendAck)  # the frame sent behind the Login
                assert (sack.local_id, sack.code, sack.seq) == (1, ErrorCode.OK, 1)
                await slow.aclose()
                await fast.aclose()
                await banned.aclose()
    finally:
        store.close()


# ---------------------------------------------------------------- 4. deadlines


def test_next_deadline_is_the_earliest_timer_and_an_early_call_changes_nothing():
    cfg = BrokerConfig(login_timeout=2 * SECOND, idle_timeout=3 * SECOND, ack_delay=30 * MS, reclaim_interval=60 * SECOND)
    h = Harness(MemoryStore(), cfg, driver="inline")
    b = h.broker

    def early(at: int) -> None:
        """handle_timer before the deadline: no commands, no change."""
        before, due = b.statistics(), b.next_deadline()
        assert b.handle_timer(at) == []
        assert b.statistics() == before and b.next_deadline() == due

    assert b.next_deadline() is None
    idle = h.open()  # T0: never logs in
    assert b.next_deadline() == T0 + 2 * SECOND  # login timeout (reclaim: T0 + 60 s)
    early(T0)
    early(T0 + 2 * SECOND - 1)

    h.now = T0 + 1 * SECOND
    alice = h.login("alice", "phone", token=b"until:%d:alice" % (T0 + 20 * SECOND))
    assert h.take(alice, F.LoginAck)
    commits = len(h.commits)
    # The login's TouchDevice waits ack_delay for company.
    assert b.next_deadline() == T0 + 1 * SECOND + 30 * MS
    early(T0 + 1 * SECOND + 30 * MS - 1)
    assert len(h.commits) == commits
    h.now = T0 + 1 * SECOND + 30 * MS
    h.run(b.handle_timer(h.now))
    assert [[type(op) for op in c.ops] for c in h.commits[commits:]] == [[TouchDevice]]

    assert b.next_deadline() == T0 + 2 * SECOND  # the first connection's login timeout
    h.now = T0 + 2 * SECOND
    h.run(b.handle_timer(h.now))
    assert h.closed[idle].code == CloseCode.LOGIN_TIMEOUT and alice not in h.closed

    # Alice's own login timeout (she logged in since: "may be early, never
    # late") -- handling it changes nothing but the deadline.
    assert b.next_deadline() == T0 + 3 * SECOND
    h.now = T0 + 3 * SECOND
    h.run(b.handle_timer(h.now))
    assert alice not in h.closed and b.statistics().connections == 1
    assert b.next_deadline() == T0 + 4 * SECOND  # alice idle since her Login at T0 + 1 s
    h.now = T0 + 3 * SECOND
    h.feed(alice, F.Ping(7))
    assert h.take(alice) == [F.Pong(7)]
    assert b.next_deadline() <= T0 + 4 * SECOND  # may be early, never late
    h.now = T0 + 4 * SECOND
    h.run(b.handle_timer(h.now))  # heard from at T0 + 3 s: not idle
    assert alice not in h.closed
    assert b.next_deadline() == T0 + 6 * SECOND
    early(T0 + 6 * SECOND - 1)
    h.now = T0 + 6 * SECOND
    h.run(b.handle_timer(h.now))
    assert h.closed[alice].code == CloseCode.IDLE_TIMEOUT
    # Her going offline stores when she was last heard from (T0 + 3 s): a
    # lazy TouchDevice, due ack_delay later.
    commits = len(h.commits)
    assert b.next_deadline() == T0 + 6 * SECOND + 30 * MS
    h.now = T0 + 6 * SECOND + 30 * MS
    h.run(b.handle_timer(h.now))
    assert [c.ops for c in h.commits[commits:]] == [(TouchDevice("alice", "phone", 0, T0 + 3 * SECOND),)]

    # Token expiry before the idle timeout.
    h.now = T0 + 7 * SECOND
    carol = h.login("carol", "phone", token=b"until:%d:carol" % (T0 + 8 * SECOND))
    h.now = T0 + 7 * SECOND + 30 * MS
    h.run(b.handle_timer(h.now))  # her TouchDevice
    assert b.next_deadline() == T0 + 8 * SECOND
    early(T0 + 8 * SECOND - 1)
    h.now = T0 + 8 * SECOND
    h.run(b.handle_timer(h.now))
    assert h.closed[carol].code == CloseCode.TOKEN_EXPIRED
    commits = len(h.commits)
    h.now = T0 + 8 * SECOND + 30 * MS
    h.run(b.handle_timer(h.now))  # her last-heard TouchDevice
    assert [c.ops for c in h.commits[commits:]] == [(TouchDevice("carol", "phone", 0, T0 + 7 * SECOND),)]

    # Nothing left but reclamation, due reclaim_interval after the first
    # connection (entries of closed connections may still come due: early,
    # and handling them does nothing).
    while (due := b.next_deadline()) < T0 + 60 * SECOND:
        assert b.handle_timer(due) == []
    assert due == T0 + 60 * SECOND
    early(T0 + 60 * SECOND - 1)
    commits = len(h.commits)
    h.now = T0 + 60 * SECOND
    h.run(b.handle_timer(h.now))
    # The reclaim pass: inbox entries, devices, host events; history retention.
    assert [type(op).__name__ for c in h.commits[commits:] for op in c.ops] == ["Reclaim", "Expire"]
    assert b.next_deadline() == T0 + 120 * SECOND


class _TimedStore(MemoryStore):
    """Records the (trio) time of every commit and what it held."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[float, tuple]] = []

    def commit(self, batch):
        self.log.append((trio.current_time(), batch.ops))
        return super().commit(batch)


def _mock_server(store, cfg: BrokerConfig, authenticate=None):
    """A served broker whose clock follows trio's (mock) clock, from a base
    of whole wall-clock seconds so JWT expiries land on exact instants."""
    base_s = int(time.time())
    t0 = trio.current_time()

    def clock() -> int:
        return base_s * SECOND + round((trio.current_time() - t0) * SECOND)

    server = open_broker_server(store, authenticate or JwtAuthenticator(SECRET), ServerConfig(broker=cfg), clock=clock)
    return server, base_s, t0


def _mem_conn(srv, nursery: trio.Nursery, pair=trio.testing.memory_stream_pair) -> RawConn:
    client_end, server_end = pair()
    nursery.start_soon(srv.serve_stream, server_end)
    return RawConn(client_end)


EXACT = 5e-6  # s: the server clock rounds mock time to whole µs


async def test_delivery_acks_are_committed_exactly_ack_delay_later(autojump_clock):
    store = _TimedStore()
    server, _, _ = _mock_server(store, BrokerConfig(ack_delay=30 * MS))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with server as srv:
                alice, bob = _mem_conn(srv, nursery), _mem_conn(srv, nursery)
                await alice.login("alice", "phone")
                await bob.login("bob", "phone")
                await trio.sleep(1)  # the logins' TouchDevice batches
                assert all(all(isinstance(op, TouchDevice) for op in ops) for _, ops in store.log)
                store.log.clear()

                t1 = trio.current_time()
                await bob.send(F.SendReq(1, AB, 0, b"hi"))
                ack = await bob.until(F.SendAck)
                assert ack.code == ErrorCode.OK
                push = await alice.until(F.Push)
                await trio.sleep(0.1)
                t2 = trio.current_time()
                await alice.send(F.PushAck(push.position))
                await trio.sleep(1)
                log = [(t, [(type(op).__name__, getattr(op, "user", None)) for op in ops]) for t, ops in store.log]
                assert [ops for _, ops in log] == [
                    [("NewMessage", None)],  # at once: a message pays its own sync
                    [("AckPosition", "bob")],  # bob's own send moves his position: waits
                    [("AckPosition", "alice")],
                ]
                assert log[0][0] == pytest.approx(t1, abs=EXACT)
                assert log[1][0] == pytest.approx(t1 + 0.030, abs=EXACT)
                assert log[2][0] == pytest.approx(t2 + 0.030, abs=EXACT)

                # An ack followed by a message within ack_delay: the message
                # goes at once, alone; the acks still wait out ack_delay
                # (bob's own position, coalesced over his two sends, and alice's).
                store.log.clear()
                await bob.send(F.SendReq(2, AB, 0, b"again"))
                push = await alice.until(F.Push)
                t3 = trio.current_time()
                await alice.send(F.PushAck(push.position))
                await trio.sleep(0.010)
                await bob.send(F.SendReq(3, AB, 0, b"company"))
                await bob.until(F.SendAck)
                await bob.until(F.SendAck)
                await trio.sleep(1)
                kinds = [(t, sorted(type(op).__name__ for op in ops)) for t, ops in store.log]
                assert [k for _, k in kinds[1:]] == [["NewMessage"], ["AckPosition", "AckPosition"]]
                assert kinds[1][0] == pytest.approx(t3 + 0.010, abs=EXACT)
                assert kinds[2][0] == pytest.approx(t3 + 0.030, abs=EXACT)


async def test_a_connection_that_never_logs_in_is_closed_at_the_login_timeout(autojump_clock):
    server, _, _ = _mock_server(MemoryStore(), BrokerConfig(login_timeout=2 * SECOND))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with server as srv:
                await trio.sleep(0.37)  # off any tick grid
                t0 = trio.current_time()
                raw = _mem_conn(srv, nursery)
                await trio.sleep(1.5)
                await raw.send(F.Ping(1))  # traffic does not extend the login timeout
                assert await raw.next() == F.Pong(1)
                close = await raw.until(F.Close)
                assert close.code == CloseCode.LOGIN_TIMEOUT
                assert trio.current_time() - t0 == pytest.approx(2.0, abs=EXACT)
                assert await raw.next() is None


async def test_a_silent_session_is_closed_exactly_idle_timeout_after_its_last_frame(autojump_clock):
    server, _, _ = _mock_server(MemoryStore(), BrokerConfig(idle_timeout=3 * SECOND))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with server as srv:
                raw = _mem_conn(srv, nursery)
                quiet = _mem_conn(srv, nursery)
                t_quiet = trio.current_time()
                await quiet.login("bob", "quiet")
                await raw.login("alice", "raw")
                await trio.sleep(1.25)
                t_last = trio.current_time()
                await raw.send(F.Ping(9))
                assert await raw.until(F.Pong) == F.Pong(9)
                close = await quiet.until(F.Close)
                assert close.code == CloseCode.IDLE_TIMEOUT
                assert trio.current_time() - t_quiet == pytest.approx(3.0, abs=EXACT)
                close = await raw.until(F.Close)
                assert close.code == CloseCode.IDLE_TIMEOUT
                assert trio.current_time() - t_last == pytest.approx(3.0, abs=EXACT)


async def test_a_session_ends_with_token_expired_at_the_tokens_expiry(autojump_clock):
    await trio.sleep(0.37)  # off any tick grid
    server, base_s, t0 = _mock_server(MemoryStore(), BrokerConfig(), JwtAuthenticator(SECRET, leeway=0))
    tok = issue_token(SECRET, "alice", None, ttl=5, now=base_s)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with server as srv:
                raw = _mem_conn(srv, nursery)
                await trio.sleep(0.5)
                await raw.send(F.Login(tok.encode(), "phone", 0, 0, 0))
                ack = await raw.until(F.LoginAck)
                assert ack.user == "alice"
                close = await raw.until(F.Close)
                assert close.code == CloseCode.TOKEN_EXPIRED
                assert trio.current_time() - t0 == pytest.approx(5.0, abs=EXACT)


# ---------------------------------------------------------------- 5. the asynchronous store path


async def _take(c, n: int) -> list[F.Message]:
    got: list[F.Message] = []
    async for m in c.messages():
        got.append(m)
        if len(got) == n:
            break
    return got


@pytest.mark.parametrize("inner", ["lmdb", "memory"])
async def test_async_store_delivers_everything_once_in_order_with_acks_after_durable(inner, tmp_path):
    """LatencyStore(1-20 ms per request, reads out of order): two clients
    exchange 100 messages each way, with history fetches and a reconnect in
    the middle."""
    from pimcore.testing.chaos import open_chaos_proxy

    base = LmdbStore(str(tmp_path / "db"), durability="os") if inner == "lmdb" else MemoryStore()
    lat = LatencyStore(base, read_latency=(0.001, 0.020), write_latency=(0.001, 0.020), seed=11)
    N = 100
    try:
        with trio.fail_after(120):
            async with open_broker_server(lat, JwtAuthenticator(SECRET), server_config()) as srv:
                async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port) as proxy:
                    async with client(srv.url(), "alice") as a, client(f"tcp://127.0.0.1:{proxy.port}", "bob") as b:
                        received: dict[str, list[F.Message]] = {}
                        sent: dict[str, list] = {"alice": [], "bob": []}
                        halfway = trio.Event()
                        histories: list[list[F.Message]] = []

                        async def sender(c, name: str) -> None:
                            for i in range(N):
                                s = await c.send(AB, b"%s %03d" % (name.encode(), i))
                                # Acked means durable: the wrapped store has it already.
                                stored = base.message(s.msg_id)
                                assert stored is not None and stored.payload == b"%s %03d" % (name.encode(), i)
                                assert stored.seq == s.seq
                                sent[name].append(s)
                                if name == "alice" and i == N // 2:
                                    halfway.set()

                        async def receiver(c, name: str) -> None:
                            received[name] = await _take(c, N)

                        async def middle() -> None:
                            await halfway.wait()
                            assert proxy.reset_all() >= 1  # bob's connection breaks: he reconnects

                            async def fetch(c, backward: bool) -> None:
                                histories.append(await c.fetch_history(AB, 0 if not backward else 1 << 40, 50, backward=backward))

                            async with trio.open_nursery() as n:
                                for i in range(6):
                                    n.start_soon(fetch, a, bool(i % 2))
                                    n.start_soon(fetch, b, bool(i % 2))

                        async with trio.open_nursery() as n:
                            n.start_soon(receiver, a, "alice")
                            n.start_soon(receiver, b, "bob")
                            n.start_soon(sender, a, "alice")
                            n.start_soon(sender, b, "bob")
                            n.start_soon(middle)

                        # Exactly once, in order: each side got the other's N messages.
                        assert [m.payload for m in received["alice"]] == [b"bob %03d" % i for i in range(N)]
                        assert [m.payload for m in received["bob"]] == [b"alice %03d" % i for i in range(N)]
                        for got in received.values():
                            seqs = [m.seq for m in got]
                            assert seqs == sorted(seqs) and len(set(seqs)) == N
                        assert b.statistics().connects >= 2
                        # History pages are consistent slices of the stored conversation.
                        stored = {m.seq: m.payload for m in base.history(AB, 0, 1000)}
                        assert sorted(stored) == list(range(1, 2 * N + 1))
                        assert len(histories) == 12
                        for page in histories:
                            assert page and all(stored[m.seq] == m.payload for m in page)
                        final = await a.fetch_history(AB, 0, 200)
                        assert [m.seq for m in final] == list(range(1, 2 * N + 1))
                        assert [m.payload for m in final if m.sender == "alice"] == [b"alice %03d" % i for i in range(N)]
                        assert [m.payload for m in final if m.sender == "bob"] == [b"bob %03d" % i for i in range(N)]
                        assert sorted(s.seq for s in sent["alice"] + sent["bob"]) == list(range(1, 2 * N + 1))
        st = lat.statistics()
        assert st.reordered > 0, st
        assert st.failed == 0 and st.reads > 12
    finally:
        base.close()


async def test_failing_reads_close_the_login_and_the_client_gets_in_once_they_stop(tmp_path):
    from pimcore.client import Disconnected
    from pimcore.testing.chaos import open_chaos_proxy

    base = LmdbStore(str(tmp_path / "db"), durability="os")
    lat = LatencyStore(base, read_latency=(0.001, 0.005), write_latency=(0.001, 0.005), seed=3)
    try:
        with trio.fail_after(60):
            async with open_broker_server(lat, JwtAuthenticator(SECRET), server_config()) as srv:
                async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port) as proxy:
                    async with client(srv.url(), "alice") as a, client(f"tcp://127.0.0.1:{proxy.port}", "bob") as b:
                        acked = [await a.send(AB, b"m%02d" % i) for i in range(10)]
                        got = await _take(b, 10)
                        assert [m.payload for m in got] == [b"m%02d" % i for i in range(10)]

                        lat.fail_reads = True
                        closes: list = []

                        async def watch() -> None:
                            async for ev in b.events():
                                if isinstance(ev, Disconnected):
                                    closes.append(ev.code)
                                    if ev.code is CloseCode.INTERNAL and closes.count(CloseCode.INTERNAL) >= 2:
                                        return

                        proxy.reset_all()
                        with trio.fail_after(20):
                            async with trio.open_nursery() as n:
                                n.start_soon(watch)
                                # Writes still work while reads fail.
                                acked += [await a.send(AB, b"m%02d" % i) for i in range(10, 15)]
                        assert closes.count(CloseCode.INTERNAL) >= 2  # each login attempt closed
                        assert lat.statistics().failed >= 2
                        assert not b.connected
                        lat.fail_reads = False
                        got = await _take(b, 5)
                        assert [m.payload for m in got] == [b"m%02d" % i for i in range(10, 15)]
                        assert b.connected
                        assert (await b.send(AB, b"back")).seq == 16
        # Nothing acked was lost.
        stored = {m.seq: m.payload for m in base.history(AB, 0, 100)}
        assert {s.seq: b"m%02d" % i for i, s in enumerate(acked)}.items() <= stored.items()
        assert len(stored) == 16
    finally:
        base.close()


# ---------------------------------------------------------------- 6. glue without sockets


@pytest.mark.parametrize("pair", [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair])
async def test_serve_stream_serves_memory_streams(pair):
    store = MemoryStore()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with open_broker_server(store, JwtAuthenticator(SECRET), server_config()) as srv:
                alice = _mem_conn(srv, nursery, pair)
                bob = _mem_conn(srv, nursery, pair)
                # Raw frames, encoded and decoded by hand.
                await alice.send_bytes(encode_frame(F.Login(token("alice").encode(), "mem", int(time.time() * 1e6), 0, 0)))
                ack = await alice.until(F.LoginAck)
                assert (ack.user, ack.device, ack.position) == ("alice", "mem", 0)
                assert (await bob.login("bob", "mem")).user == "bob"
                await alice.send(F.SendReq(1, AB, 0, b"over a memory stream"), F.SendReq(2, AB, 0, b"and another"))
                acks = [await alice.until(F.SendAck), await alice.until(F.SendAck)]
                assert [(x.local_id, x.code, x.seq) for x in acks] == [(1, ErrorCode.OK, 1), (2, ErrorCode.OK, 2)]
                msgs: list[F.Message] = []
                while len(msgs) < 2:
                    push = await bob.until(F.Push)
                    msgs.extend(push.messages)
                    await bob.send(F.PushAck(push.position))
                assert [(m.seq, m.sender, m.device, m.payload) for m in msgs] == [
                    (1, "alice", "mem", b"over a memory stream"),
                    (2, "alice", "mem", b"and another"),
                ]
                assert srv.statistics().accepted == 2
                # Closing one end is a lost connection like any other.
                await bob.aclose()
                await _until(lambda: srv.broker.online_devices("bob") == [])
                assert srv.broker.online_devices("alice") == ["mem"]
            # Shutdown closed the remaining stream with a reason.
            close = await alice.until(F.Close)
            assert close.code == CloseCode.SHUTDOWN
    assert [m.payload for m in store.history(AB, 0, 10)] == [b"over a memory stream", b"and another"]


# ---------------------------------------------------------------- hooks that fail


def test_a_malformed_identity_or_a_failed_check_is_never_trusted(store):
    """An authenticator's answer is checked: an Identity with fields of the
    wrong type is AUTH_FAILED (not a crash later, at its timer); an exception
    that is not an AuthError means "could not check" -- INTERNAL, so the
    client logs in again rather than giving up."""
    h = Harness(store)
    h.hold_hooks = True
    bad, down, good = h.open(), h.open(), h.open()
    for conn, tok in ((bad, b"mallory"), (down, b"carol"), (good, b"alice")):
        h.feed(conn, F.Login(tok, "phone", h.now, 0, 0))
    h.hold_hooks = False
    h.answer_hooks(lambda cmd: cmd.token == b"mallory", identity=Identity("mallory", expires="soon"))  # type: ignore[arg-type]
    h.answer_hooks(lambda cmd: cmd.token == b"carol", identity=ConnectionError("auth service down"))  # type: ignore[arg-type]
    h.answer_hooks()
    assert h.closed[bad].code is CloseCode.AUTH_FAILED and "malformed" in h.closed[bad].reason
    assert h.closed[down].code is CloseCode.INTERNAL
    assert good not in h.closed and h.take(good, F.LoginAck)
    h.advance(3_600_000_000)  # the timers run without tripping over anything
    assert h.broker.statistics().connections == 1


def test_a_content_check_without_an_answer_is_a_transient_refusal(store):
    h = Harness(store, BrokerConfig(content_filter=lambda user, conv, payload: None))
    a = h.login("alice", "phone")
    h.hold_hooks = True
    h.send(a, AB, b"hello")
    h.hold_hooks = False
    [cmd] = h.held_hooks
    with pytest.raises(ValueError):
        h.broker.content_checked(cmd.request_id, "no", h.now, code=ErrorCode.NOT_MEMBER)
    h.held_hooks = []
    h.run(h.broker.content_checked(cmd.request_id, "filter down", h.now, code=ErrorCode.INTERNAL))
    [ack] = h.acks(a)
    assert ack.code == ErrorCode.INTERNAL  # the SDK retries this one (PROTOCOL.md §5)
    assert h.store.last_seq(AB) == 0


def test_drain_refuses_an_async_hook_with_a_clear_error():
    from pimcore.core import drain

    async def moderation(user, conv, payload):
        return None

    store = MemoryStore()
    broker = Broker(BrokerConfig(content_filter=moderation), node_id=store.node_id())
    broker.connection_made(1, T0)
    cmds = broker.receive_data(1, encode_frame(F.Login(b"alice", "phone", T0, 0, 0)), T0)
    cmds = drain(broker, store, cmds, T0, authenticate=lambda token, now: Identity(token.decode()))
    with pytest.raises(TypeError, match="async"):
        drain(broker, store, broker.receive_data(1, encode_frame(F.SendReq(1, AB, T0, b"hi")), T0), T0)


async def test_served_hooks_that_fail_or_hang_are_retried_not_final(tmp_path):
    """A content filter that raises once, or hangs past hook_timeout, costs
    the message an INTERNAL refusal: the SDK sends it again and it is stored
    once.  An authenticator answering a malformed identity refuses that
    login and the broker keeps serving everyone else."""
    store = LmdbStore(str(tmp_path / "db"), durability="os")
    calls = {"alice": 0, "bob": 0}

    async def flaky(user: str, conv: str, payload: bytes) -> Optional[str]:
        calls[user] += 1
        if calls[user] == 1:
            if user == "alice":
                raise ConnectionError("moderation service unreachable")
            await trio.sleep_forever()  # bob's first check hangs
        return None

    auth = JwtAuthenticator(SECRET)

    def picky(token: bytes, now: int) -> Identity:
        ident = auth(token, now)
        return Identity(ident.user, expires="never") if ident.user == "mallory" else ident  # type: ignore[arg-type]

    cfg = replace(_with_filter(server_config(), flaky), hook_timeout=0.5)
    try:
        with trio.fail_after(60):
            async with open_broker_server(store, picky, cfg) as srv:
                async with client(srv.url(), "alice") as a, client(srv.url(), "bob") as b:
                    sent_a = await a.send(AB, b"from alice")
                    sent_b = await b.send(AB, b"from bob")
                    assert calls == {"alice": 2, "bob": 2}
                    raw = await RawConn.open(srv.endpoints[0].port)
                    await raw.send(F.Login(token("mallory").encode(), "phone", 0, 0, 0))
                    close = await raw.until(F.Close)
                    assert close.code == CloseCode.AUTH_FAILED
                    assert (await a.send(AB, b"still served")).seq == 3
                assert srv.statistics().internal_errors == 2
        assert sorted((sent_a.seq, sent_b.seq)) == [1, 2]
        assert [m.payload for m in store.history(AB, 0, 10)] == [b"from alice", b"from bob", b"still served"]
    finally:
        store.close()


async def test_an_async_store_read_that_hangs_fails_at_read_timeout(autojump_clock, tmp_path):
    """A read the AsyncStore never answers is a failed read after
    read_timeout: the login is closed with INTERNAL (the client will try
    again) instead of holding the connection -- and its reading -- forever."""
    lat = LatencyStore(MemoryStore(), read_latency=(3600.0, 3600.0), write_latency=(0.0, 0.0))
    cfg = replace(server_config(), read_timeout=2.0)
    with trio.fail_after(30):
        async with open_broker_server(lat, JwtAuthenticator(SECRET), cfg, clock=lambda: int(trio.current_time() * SECOND)) as srv:
            raw = await RawConn.open(srv.endpoints[0].port)
            t0 = trio.current_time()
            await raw.send(F.Login(token("alice", now=trio.current_time()).encode(), "phone", 0, 0, 0))  # (the broker's clock)
            close = await raw.until(F.Close)
            assert close.code == CloseCode.INTERNAL
            assert trio.current_time() - t0 == pytest.approx(2.0, abs=0.01)
            assert srv.broker.statistics().reads_in_flight == 0 and srv.broker.statistics().read_failures == 1


@pytest.mark.parametrize("store_kind", ["lmdb", "latency"])
@pytest.mark.parametrize("verdict", ["deny", "fails", "async-deny"])
async def test_a_retry_of_a_stored_message_gets_its_sendack_without_a_new_content_check(tmp_path, verdict, store_kind):
    """The first SendAck is lost (the connection dies after the store);
    the retry with the same local id comes after the content filter
    changed its mind (or fails): the dedupe decides first, so the retry
    gets the original SendAck (OK, same msg_id and seq) and the filter is
    not asked again.  A new local id is still checked."""
    inner = LmdbStore(str(tmp_path / "db"), durability="os")
    store = inner if store_kind == "lmdb" else LatencyStore(inner, read_latency=(0.0, 0.002), write_latency=(0.0, 0.002))
    mode = {"now": "allow"}
    asked: list[bytes] = []

    def plain(user: str, conv: str, payload: bytes) -> Optional[str]:
        asked.append(payload)
        if mode["now"] == "allow":
            return None
        if verdict == "fails":
            raise ConnectionError("moderation service unreachable")
        return "closed for today"

    async def in_a_task(user: str, conv: str, payload: bytes) -> Optional[str]:
        await trio.sleep(0)
        return plain(user, conv, payload)

    try:
        with trio.fail_after(30):
            cfg = _with_filter(server_config(), in_a_task if verdict == "async-deny" else plain)
            async with open_broker_server(store, JwtAuthenticator(SECRET), cfg) as srv:
                port = srv.endpoints[0].port
                first = await RawConn.open(port)
                await first.login("alice", "phone")
                await first.send(F.SendReq(7, AB, 0, b"hello"))
                ack = await first.until(F.SendAck)
                assert ack.code == ErrorCode.OK and ack.seq == 1
                await first.aclose()  # as if that SendAck was lost on the way
                mode["now"] = "deny"
                again = await RawConn.open(port)
                await again.login("alice", "phone")
                await again.send(F.SendReq(7, AB, 0, b"hello"))
                retry = await again.until(F.SendAck)
                assert (retry.code, retry.msg_id, retry.seq, retry.server_time) == (ErrorCode.OK, ack.msg_id, 1, ack.server_time)
                assert asked == [b"hello"]
                await again.send(F.SendReq(8, AB, 0, b"new"))
                fresh = await again.until(F.SendAck)
                assert fresh.code == (ErrorCode.INTERNAL if verdict == "fails" else ErrorCode.REJECTED)
                assert asked == [b"hello", b"new"]
                await again.aclose()
        assert [m.payload for m in inner.history(AB, 0, 10)] == [b"hello"]
    finally:
        inner.close()
