"""The sans-IO broker core, through its public API only.

Every test runs against both store backends, and (through the harness, which
feeds encoded bytes) against the codec backend selected by PIMCORE_BACKEND.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimcore import frames as F
from pimcore.codec import encode_frame
from pimcore.core import BrokerConfig, Limits
from pimcore.errors import CloseCode, ErrorCode
from pimcore.store import LmdbStore, MemoryStore, direct_conversation

from _harness import T0, Harness, store_driver  # noqa: F401

AB = direct_conversation("alice", "bob")
MINUTE = 60_000_000



@pytest.fixture(autouse=True)
def _every_store_driver(store_driver):
    """Every test here runs with store requests inline, and again through the
    latency store (the async contract; reads complete out of order)."""
    return store_driver

@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    if request.param == "memory":
        s = MemoryStore()
    else:
        s = LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


@pytest.fixture
def h(store):
    return Harness(store)


# ---------------------------------------------------------------- login & auth


def test_login_ack_announces_position_and_limits(h):
    conn = h.login("alice", "phone")
    [ack] = h.take(conn, F.LoginAck)
    assert (ack.user, ack.device, ack.position, ack.head, ack.gap) == ("alice", "phone", 0, 0, False)
    assert ack.max_frame == Limits().max_frame and ack.window == Limits().window
    assert ack.server_time >= T0
    assert h.broker.online_devices("alice") == ["phone"]


@pytest.mark.parametrize("token, device", [(b"forged", "d1"), (b"expired:alice", "d1"), (b"alice/tablet", "phone"), (b"alice", "bad device!"), (b"bad user!", "d1")])
def test_bad_tokens_and_ids_are_refused_before_anything_else(h, token, device):
    conn = h.login("x", device, token=token)
    assert h.closed[conn].code is CloseCode.AUTH_FAILED
    assert h.closed[conn].reason
    assert not h.take(conn, F.LoginAck)
    # the refused connection can do nothing more
    h.feed(conn, F.SendReq(1, AB, 0, b"x"))
    assert h.store.last_seq(AB) == 0


def test_frames_before_login_close_with_protocol_error(h):
    conn = h.open()
    h.feed(conn, F.SendReq(1, AB, 0, b"sneaky"))
    assert h.closed[conn].code is CloseCode.PROTOCOL_ERROR
    assert h.store.last_seq(AB) == 0


def test_ping_is_answered_even_before_login(h):
    conn = h.open()
    h.feed(conn, F.Ping(7))
    assert h.take(conn) == [F.Pong(7)]


def test_second_login_on_a_connection_is_a_protocol_error(h):
    conn = h.login("alice", "phone")
    h.feed(conn, F.Login(b"bob", "phone", 0, 0, 0))
    assert h.closed[conn].code is CloseCode.PROTOCOL_ERROR


def test_same_device_logging_in_again_replaces_the_old_connection(h):
    old = h.login("alice", "phone")
    new = h.login("alice", "phone")
    assert h.closed[old].code is CloseCode.REPLACED
    assert new not in h.closed
    bob = h.login("bob", "laptop")
    h.send(bob, AB, b"hi")
    assert [m.payload for m in h.pushed(new)] == [b"hi"]


def test_login_timeout(h):
    idle = h.open()
    h.advance(h.broker.config.login_timeout - 1)
    assert idle not in h.closed
    h.advance(1)
    assert h.closed[idle].code is CloseCode.LOGIN_TIMEOUT


def test_idle_timeout_closes_silent_connections_and_any_frame_keeps_them(store):
    h = Harness(store, BrokerConfig(limits=Limits(heartbeat_ms=1000), idle_timeout=3_000_000))
    quiet = h.login("alice", "phone")
    chatty = h.login("bob", "phone")
    for _ in range(5):
        h.advance(1_000_000)
        h.feed(chatty, F.Ping(7))  # the heartbeat a client sends when idle
        if quiet in h.closed:
            break
    assert h.closed[quiet].code is CloseCode.IDLE_TIMEOUT
    assert chatty not in h.closed and h.take(chatty, F.Pong)[-1] == F.Pong(7)
    assert h.broker.online_devices("alice") == []


def test_idle_timeout_disabled_by_default(h):
    c = h.login("alice", "phone")
    h.advance(10 * 24 * 3600 * 1_000_000)
    assert c not in h.closed


def test_send_rate_limit_refuses_with_a_clear_code_and_refills(store):
    lim = Limits(send_rate=10.0, send_burst=3)
    h = Harness(store, BrokerConfig(limits=lim, rate_limit_strikes=5))
    a = h.login("alice", "phone")
    h.take(a)
    for k in range(5):
        h.send(a, AB, b"m%d" % k)
    codes = [ack.code for ack in h.acks(a)]
    assert codes == [ErrorCode.OK] * 3 + [ErrorCode.RATE_LIMITED] * 2
    h.advance(100_000)  # 0.1 s at 10/s: one token back
    # A later local id waits for the refused one's retry (the refusal mark:
    # stored before it, it would be out of send order).
    h.send(a, AB, b"later", local_id=6)
    assert [(ack.local_id, ack.code) for ack in h.acks(a)] == [(6, ErrorCode.RATE_LIMITED)]
    h.send(a, AB, b"m3", local_id=4)  # the retry, with the same local id
    h.send(a, AB, b"m4", local_id=5)  # too soon
    assert [ack.code for ack in h.acks(a)] == [ErrorCode.OK, ErrorCode.RATE_LIMITED]
    assert [m.payload for m in h.store.history(AB, 0, 10)] == [b"m0", b"m1", b"m2", b"m3"]


def test_a_clock_step_that_is_not_whole_microseconds_is_refused_and_changes_nothing(h):
    """clock_stepped takes an int of µs, like every ``now``: a float step
    turned every deadline into a float, a str failed halfway through."""
    a = h.login("alice", "phone")
    h.take(a)
    due = h.broker.next_deadline()
    for bad in (1.5, "60", None, True, 1 << 62, -(1 << 62), 10**20):
        with pytest.raises((TypeError, ValueError)) as err:
            h.broker.clock_stepped(bad)
        assert "step" in str(err.value)
        assert h.broker.next_deadline() == due
    h.send(a, AB, b"still fine")
    assert [ack.code for ack in h.acks(a)] == [ErrorCode.OK]


def test_a_clock_step_keeps_durations_at_their_real_length_and_token_expiry_at_its_time(store):
    """Broker.clock_stepped: the host's clock jumped.  Before it existed a
    step back of an hour refused sends as RATE_LIMITED for an hour and put
    every timeout an hour off; forward, it closed every quiet connection."""
    hour, second = 3600 * 1_000_000, 1_000_000
    cfg = BrokerConfig(limits=Limits(send_rate=10.0, send_burst=2), idle_timeout=3 * second, rate_limit_strikes=5)
    h = Harness(store, cfg)
    a = h.login("alice", "phone", token=b"until:%d:alice" % (T0 + 20 * second))
    b = h.login("bob", "phone")
    h.take(a)
    h.take(b)
    due = h.broker.next_deadline()
    assert due is not None and due <= T0 + 3 * second  # the idle timeouts
    h.now -= hour
    h.broker.clock_stepped(-hour)
    assert h.broker.next_deadline() == due - hour
    h.advance(second)
    assert not h.closed
    h.send(a, AB, b"m0")
    h.send(a, AB, b"m1")
    h.send(a, AB, b"m2")
    assert [ack.code for ack in h.acks(a)] == [ErrorCode.OK, ErrorCode.OK, ErrorCode.RATE_LIMITED]  # the burst, as before the step
    # Bob is idle 3 s after his login, by elapsed time, not an hour later.
    h.advance(2 * second)
    assert h.closed[b].code is CloseCode.IDLE_TIMEOUT and a not in h.closed
    # Forward, 20 s past the token's expiry (a time of day): it ends
    # Alice's session; her idle timeout has not come (she sent 2 s ago).
    h.now += hour + 20 * second
    h.broker.clock_stepped(hour + 20 * second)
    # Her send arrives before the timer has run (found by a new-user pass:
    # it was stored and acked, then she was closed): refused with the close.
    h.send(a, AB, b"after expiry")
    assert h.closed[a].code is CloseCode.TOKEN_EXPIRED
    assert [m.payload for m in h.store.history(AB, 0, 10)] == [b"m0", b"m1"]


def test_a_client_ignoring_rate_limit_refusals_is_closed(store):
    h = Harness(store, BrokerConfig(limits=Limits(send_rate=1.0, send_burst=1), rate_limit_strikes=4))
    a = h.login("alice", "phone")
    h.send(a, AB, b"spam")
    for k in range(10):  # the refused one resent at once, again and again
        h.send(a, AB, b"spam", local_id=2)
        if a in h.closed:
            break
    assert h.closed[a].code is CloseCode.RATE_LIMITED
    assert len(h.store.history(AB, 0, 10)) == 1  # what was acked is intact
    # Later local ids without the refused one's retry: refused, not strikes
    # (a pipelining client had them on the wire) -- for two windows' worth
    # (test_refusal_order: a mark set again for the same send keeps its count).
    h = Harness(store, BrokerConfig(limits=Limits(send_rate=1.0, send_burst=1, window=8), rate_limit_strikes=4))
    a = h.login("alice", "phone")
    for k in range(1 + 1 + 2 * 8):
        h.send(a, AB, b"spam")
    assert a not in h.closed
    for k in range(10):
        h.send(a, AB, b"spam")
        if a in h.closed:
            break
    assert h.closed[a].code is CloseCode.RATE_LIMITED and k == 2  # strikes 2, 3, 4 (the refusal was 1)


# ---------------------------------------------------------------- upstream reliability


def test_send_ack_only_after_the_batch_is_durable(h):
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.take(a), h.take(b)
    h.hold_commits = True
    lid = h.send(a, AB, b"hello")
    assert h.acks(a) == [] and h.pushed(b) == []  # nothing before durability
    [commit] = h.held
    assert [op.payload for op in commit.ops if hasattr(op, "payload")] == [b"hello"]
    h.release()
    [ack] = h.acks(a)
    assert ack.local_id == lid and ack.code == ErrorCode.OK and ack.seq == 1 and len(ack.msg_id) == 16
    [msg] = h.pushed(b)
    assert (msg.msg_id, msg.seq, msg.sender, msg.device, msg.payload) == (ack.msg_id, 1, "alice", "phone", b"hello")
    assert msg.server_time == ack.server_time


def test_retry_while_in_flight_and_after_commit_stores_once(h):
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.hold_commits = True
    h.send(a, AB, b"once", local_id=42)
    h.send(a, AB, b"once", local_id=42)  # client timed out and retried
    h.release()
    first, second = h.acks(a)
    assert first == second and first.code == ErrorCode.OK
    h.send(a, AB, b"once", local_id=42)  # retry after the ack was lost
    h.release()
    [third] = h.acks(a)
    assert third == first
    assert h.store.last_seq(AB) == 1
    assert [m.payload for m in h.pushed(b)] == [b"once"]
    assert h.broker.statistics().duplicates == 1


def test_retry_after_reconnect_gets_the_original_ack(h):
    a = h.login("alice", "phone")
    h.hold_commits = True
    h.send(a, AB, b"lost ack", local_id=9)
    h.lose(a)  # the connection dies before the SendAck is written
    h.release()
    a2 = h.login("alice", "phone")
    h.send(a2, AB, b"lost ack", local_id=9)
    h.release()
    [ack] = h.acks(a2)
    assert ack.code == ErrorCode.OK and ack.seq == 1
    assert h.store.last_seq(AB) == 1


def test_same_local_id_with_different_content_is_a_conflict(h):
    a = h.login("alice", "phone")
    h.send(a, AB, b"original", local_id=5)
    h.send(a, AB, b"something else", local_id=5)
    ok, conflict = h.acks(a)
    assert ok.code == ErrorCode.OK and conflict.code == ErrorCode.DUPLICATE_CONFLICT
    # ... also when the original is still in flight (answered after it:
    # SendAcks come in SendReq order)
    h.hold_commits = True
    h.send(a, AB, b"v1", local_id=6)
    h.send(a, AB, b"v2", local_id=6)
    assert h.acks(a) == []
    h.release()
    assert [x.code for x in h.acks(a)] == [ErrorCode.OK, ErrorCode.DUPLICATE_CONFLICT]
    assert h.store.last_seq(AB) == 2


def test_local_ids_are_per_device(h):
    p = h.login("alice", "phone")
    t = h.login("alice", "tablet")
    h.send(p, AB, b"from phone", local_id=1)
    h.send(t, AB, b"from tablet", local_id=1)
    assert h.acks(p)[0].seq == 1 and h.acks(t)[0].seq == 2


def test_group_commit_gathers_every_connection_into_one_batch(h):
    h.create_group("team", ["alice", "bob", "carol"])
    conns = {u: h.login(u, "d") for u in ("alice", "bob", "carol")}
    h.hold_commits = True
    h.send(conns["alice"], "team", b"first")  # starts batch 1
    for u, c in conns.items():
        for k in range(3):
            h.send(c, "team", f"{u}{k}".encode())
    assert len(h.held) == 1  # one commit in flight; the rest wait for it
    h.commit(h.held.pop(0))
    assert len(h.held) == 1
    second = h.held[0]
    assert sum(1 for op in second.ops if hasattr(op, "payload")) == 9
    h.release()
    assert h.store.last_seq("team") == 10
    seqs = sorted(a.seq for c in conns.values() for a in h.acks(c))
    assert seqs == list(range(1, 11))


def test_batches_held_by_the_host_start_as_one_batch_when_released(h):
    """A host that knows more connections have bytes waiting holds the next
    batch while it feeds them (Broker.hold_batches): their sends start one
    batch together on release, not the first connection's alone and then
    one of the rest.  A hold never acks anything early, and flush() (the
    host's shutdown) commits through it."""
    conns = {u: h.login(u, "d") for u in ("alice", "bob", "carol")}
    h.hold_commits = True  # (the harness keeps the write requests to look at)
    h.commits.clear()
    assert h.broker.batch_in_flight is False
    h.broker.hold_batches()
    for u, c in conns.items():
        h.send(c, direct_conversation(u, "zed"), u.encode())
    assert h.commits == [] and not any(h.acks(c) for c in conns.values())
    h.run(h.broker.release_batches(h.now))
    [batch] = h.held
    assert sorted(op.payload for op in batch.ops if hasattr(op, "payload")) == [b"alice", b"bob", b"carol"]
    assert h.broker.batch_in_flight is True
    # Held while a batch is in flight: its completion starts no next batch.
    h.broker.hold_batches()
    h.send(conns["alice"], direct_conversation("alice", "zed"), b"second")
    h.commit(h.held.pop(0))
    assert h.held == [] and h.broker.batch_in_flight is False
    assert [a.seq for a in h.acks(conns["alice"])] == [1]
    # flush() commits what is pending even while held; the hold stays.
    h.run(h.broker.flush(h.now))
    [batch] = h.held
    assert [op.payload for op in batch.ops if hasattr(op, "payload")] == [b"second"]
    h.release()
    assert [a.seq for a in h.acks(conns["alice"])] == [2]
    h.send(conns["bob"], direct_conversation("bob", "zed"), b"held again")
    assert h.held == []
    # Releasing twice is harmless; the second has nothing to start.
    h.run(h.broker.release_batches(h.now))
    assert len(h.held) == 1
    assert h.broker.release_batches(h.now) == []
    h.release()
    assert [a.code for a in h.acks(conns["bob"])] == [0, 0]


def test_store_failure_answers_store_unavailable_and_a_retry_succeeds(h):
    a = h.login("alice", "phone")
    h.fail_commits = True
    h.send(a, AB, b"important", local_id=1)
    [ack] = h.acks(a)
    assert ack.code == ErrorCode.STORE_UNAVAILABLE and ack.msg_id == b""
    h.fail_commits = False
    h.send(a, AB, b"important", local_id=1)
    [ack] = h.acks(a)
    assert ack.code == ErrorCode.OK and ack.seq == 1
    assert h.store.last_seq(AB) == 1


# ---------------------------------------------------------------- validation


def test_request_errors_have_clear_codes(h):
    h.create_group("team", ["alice", "bob"])
    a = h.login("alice", "phone")
    c = h.login("carol", "phone")
    h.send(a, "nope", b"x")
    h.send(c, "team", b"x")
    h.send(c, AB, b"x")  # carol is not part of alice<->bob
    h.send(a, "d:bob:alice", b"x")  # non-canonical direct id
    h.send(a, "has space", b"x")
    h.send(a, AB, b"x" * (h.broker.config.limits.max_payload + 1))
    codes = [x.code for x in h.acks(a)] + [x.code for x in h.acks(c)]
    assert codes == [
        ErrorCode.UNKNOWN_CONVERSATION,
        ErrorCode.BAD_REQUEST,
        ErrorCode.BAD_REQUEST,
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.NOT_MEMBER,
        ErrorCode.NOT_MEMBER,
    ]
    assert a not in h.closed and c not in h.closed  # request errors keep the connection
    assert h.store.last_seq(AB) == 0 and h.store.last_seq("team") == 0


def test_what_waited_behind_a_failed_batch_is_committed_without_another_event(h):
    """After a failed batch the core does not retry at once, but nothing may
    be stranded either: the ops that waited go out at the next deadline even
    if no client sends anything again."""
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.take(a), h.take(b)
    h.hold_commits = True
    h.send(a, AB, b"first")  # batch in flight
    h.send(b, AB, b"second")  # waits for the next batch
    h.fail_commits = True
    h.release()
    [failed] = h.acks(a)
    assert failed.code == ErrorCode.STORE_UNAVAILABLE and h.acks(b) == []
    h.fail_commits = False
    h.hold_commits = False
    due = h.broker.next_deadline()
    assert due is not None and due <= h.now + 1_000_000
    h.advance(due - h.now)
    [ok] = h.acks(b)
    assert ok.code == ErrorCode.OK and h.store.last_seq(AB) == 1
    assert h.broker.next_deadline() > h.now  # nothing left due: the timer sleeps


def test_in_flight_window(store):
    h = Harness(store, BrokerConfig(limits=Limits(window=2)))
    a = h.login("alice", "phone")
    h.hold_commits = True
    for _ in range(3):
        h.send(a, AB, b"x")
    assert h.acks(a) == []  # the refusal waits for the SendAcks of the two before it
    h.release()
    ok1, ok2, refused = h.acks(a)
    assert ok1.code == ok2.code == ErrorCode.OK
    assert refused.code == ErrorCode.TOO_MANY_IN_FLIGHT and refused.local_id == 3
    h.hold_commits = False
    h.send(a, AB, b"x")  # the window reopened, but 3 was not resent: refused too
    assert [(ack.local_id, ack.code) for ack in h.acks(a)] == [(4, ErrorCode.TOO_MANY_IN_FLIGHT)]
    h.send(a, AB, b"x", local_id=3)  # the retry
    h.send(a, AB, b"x", local_id=4)
    assert [(ack.local_id, ack.code) for ack in h.acks(a)] == [(3, ErrorCode.OK), (4, ErrorCode.OK)]


def test_content_filter_rejects_before_storing(store):
    def no_spam(user, conv, payload):
        return "spam is not welcome" if b"spam" in payload else None

    h = Harness(store, BrokerConfig(content_filter=no_spam))
    a = h.login("alice", "phone")
    h.send(a, AB, b"buy spam now")
    h.send(a, AB, b"hello")
    refused, ok = h.acks(a)
    assert refused.code == ErrorCode.REJECTED and ok.code == ErrorCode.OK and ok.seq == 1
    [err] = h.take(a, F.Error)
    assert err.code == ErrorCode.REJECTED and "spam" in err.reason and err.ref == refused.local_id


# ---------------------------------------------------------------- SendAck order


def _send_answers(frames: list) -> list[tuple]:
    """What a client learns of its sends, in the order it learns it: each
    SendAck as (local_id, code), each Error naming a send as ("error",
    ref, code)."""
    got: list[tuple] = []
    for f in frames:
        if isinstance(f, F.SendAck):
            got.append((f.local_id, ErrorCode(f.code)))
        elif isinstance(f, F.Error) and f.ref:
            got.append(("error", f.ref, ErrorCode(f.code)))
    return got


OK, REJECTED = ErrorCode.OK, ErrorCode.REJECTED


def test_a_content_filter_refusal_waits_for_the_sendacks_of_earlier_sends(store):
    """The filter's refusal of send 2 is known at once, while send 1 still
    waits for its batch: its SendAck (and the Error with the reason, just
    before it) must not overtake send 1's -- a connection's SendAcks come
    in the order of its SendReqs -- and send 3, proposed after it, comes
    after it."""

    def no_spam(user, conv, payload):
        return "spam is not welcome" if b"spam" in payload else None

    h = Harness(store, BrokerConfig(content_filter=no_spam))
    a = h.login("alice", "phone")
    h.take(a)
    h.hold_commits = True
    h.send(a, AB, b"hello")  # 1: the batch in flight
    h.send(a, AB, b"buy spam now")  # 2: refused by the filter
    h.send(a, AB, b"bye")  # 3: the next batch
    assert _send_answers(h.take(a)) == []
    h.release()
    assert _send_answers(h.take(a)) == [(1, OK), ("error", 2, REJECTED), (2, REJECTED), (3, OK)]
    assert [m.payload for m in h.store.history(AB, 0, 10)] == [b"hello", b"bye"]


_MANY_MENTIONS = tuple(F.Mention(f"u{k}") for k in range(Limits().max_mentions + 1))


@pytest.mark.parametrize(
    "limits, refused, code",
    [
        (Limits(), F.SendReq(3, AB, T0, b"x" * (Limits().max_payload + 1)), ErrorCode.PAYLOAD_TOO_LARGE),
        (Limits(), F.SendReq(3, direct_conversation("bob", "carol"), T0, b"x"), ErrorCode.NOT_MEMBER),
        (Limits(), F.SendReq(3, "has space", T0, b"x"), ErrorCode.BAD_REQUEST),
        (Limits(), F.SendReq(3, AB, T0, b"x", mentions=_MANY_MENTIONS), ErrorCode.TOO_MANY_MENTIONS),
        (Limits(), F.SendReq(3, AB, T0, b"x", mentions=(F.Mention("no such id!"),)), ErrorCode.BAD_MENTION),
        # Local id 1 is in flight with another payload.
        (Limits(), F.SendReq(1, AB, T0, b"not m1"), ErrorCode.DUPLICATE_CONFLICT),
        (Limits(window=2), F.SendReq(3, AB, T0, b"x"), ErrorCode.TOO_MANY_IN_FLIGHT),
        (Limits(send_rate=1.0, send_burst=2), F.SendReq(3, AB, T0, b"x"), ErrorCode.RATE_LIMITED),
        (Limits(), F.AmendReq(3, AB, 1, 99, T0), ErrorCode.BAD_ACTION),
        (Limits(), F.AmendReq(1, AB, 1, F.MessageKind.RECALL, T0), ErrorCode.DUPLICATE_CONFLICT),
    ],
    ids=["payload", "not-member", "bad-conv", "mentions", "bad-mention", "conflict", "window", "rate",
         "amend-action", "amend-conflict"],
)
def test_a_refusal_before_the_store_waits_for_the_sendacks_of_earlier_sends(store, limits, refused, code):
    """Without a content filter too: a SendReq (or AmendReq) refused
    without the store, behind sends of the same connection still waiting
    for their batch (one in flight, one in the next), is answered after
    them, and a send after it after it."""
    h = Harness(store, BrokerConfig(limits=limits))
    a = h.login("alice", "phone")
    h.take(a)
    h.hold_commits = True
    h.send(a, AB, b"m1")  # the batch in flight
    h.send(a, AB, b"m2")  # the next batch
    h.feed(a, refused)
    h.send(a, AB, b"m4", local_id=4)
    assert _send_answers(h.take(a)) == []  # nothing overtakes send 1
    h.release()
    answers = _send_answers(h.take(a))
    assert answers[:3] == [(1, OK), (2, OK), (refused.local_id, code)]
    # (send 4 is refused too where the window or the rate still is full)
    assert answers[3:] == [(4, code if limits != Limits() else OK)]


def test_a_retry_waiting_with_its_original_keeps_its_place_among_the_sendacks(h):
    """A retry of a send still in flight waits with the original and gets
    its answer -- but in its own place: after the SendAcks of the sends its
    connection made before it, which the original's batch may precede."""
    a = h.login("alice", "phone")
    h.hold_commits = True
    h.send(a, AB, b"m1", local_id=1)  # the batch in flight
    h.send(a, AB, b"m2", local_id=2)  # the next batch
    h.send(a, AB, b"m1", local_id=1)  # a retry of 1 (the client timed out)
    h.release()
    first, second, retry = h.acks(a)
    assert (first.local_id, second.local_id) == (1, 2) and retry == first
    # After a reconnect: the new connection sends a fresh message, then the
    # retry of one the old connection left in flight.
    h.send(a, AB, b"m3", local_id=3)  # in flight
    h.lose(a)
    a2 = h.login("alice", "phone")
    h.send(a2, AB, b"m9", local_id=9)  # the next batch
    h.send(a2, AB, b"m3", local_id=3)  # waits with the original, in flight
    h.release()
    assert [(x.local_id, x.code) for x in h.acks(a2)] == [(9, OK), (3, OK)]
    assert [m.local_id for m in h.store.history(AB, 0, 10)] == [1, 2, 3, 9]


def test_sendacks_keep_their_order_when_a_batch_fails(h):
    """The batch in flight fails: its sends get STORE_UNAVAILABLE at once;
    a refusal made behind a send of the next batch still waits for that
    send's SendAck."""
    a = h.login("alice", "phone")
    h.take(a)
    h.hold_commits = True
    h.send(a, AB, b"m1")  # the batch that fails
    h.send(a, AB, b"m2")  # the next batch
    h.feed(a, F.SendReq(3, AB, T0, b"x" * (Limits().max_payload + 1)))
    h.fail_commits = True
    h.release()
    assert _send_answers(h.take(a)) == [(1, ErrorCode.STORE_UNAVAILABLE)]
    h.fail_commits = h.hold_commits = False
    h.advance(h.broker.next_deadline() - h.now)  # the retry of what waited
    assert _send_answers(h.take(a)) == [(2, OK), (3, ErrorCode.PAYLOAD_TOO_LARGE)]


_order_steps = st.lists(
    st.one_of(
        st.sampled_from(["send", "spam", "too-large", "not-member", "bad-action", "commit", "fail", "tick", "reconnect"]),
        st.tuples(st.sampled_from(["retry", "conflict"]), st.integers(0, 30)),
    ),
    max_size=40,
)


@pytest.mark.parametrize("filtered", [False, True], ids=["no-filter", "content-filter"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_order_steps)
def test_every_sendreq_gets_one_sendack_in_the_order_sent(filtered, steps):
    """Model-based: whatever a device sends -- fresh messages, retries and
    conflicting reuses of its local ids, requests refused before the store
    (by the filter, the window, the rate, the checks), over reconnects --
    while batches commit or fail one at a time and time passes, each
    connection gets exactly one SendAck per SendReq/AmendReq, in the
    order it sent them (a connection lost meanwhile: a prefix of them)."""

    def no_spam(user, conv, payload):
        return "no spam" if payload.startswith(b"spam") else None

    store = MemoryStore()
    cfg = BrokerConfig(
        limits=Limits(window=3, send_rate=50.0, send_burst=5), control_rate=0, rate_limit_strikes=10_000,
        content_filter=no_spam if filtered else None,
    )
    h = Harness(store, cfg)
    conn = h.login("alice", "phone")
    sent: dict[int, list[int]] = {conn: []}  # connection -> local ids in the order sent
    stored: list[tuple[int, bytes]] = []  # (local id, payload) of the sends that may be retried
    next_lid = 1
    h.hold_commits = True
    for step in steps:
        kind, k = step if isinstance(step, tuple) else (step, 0)
        if kind == "commit" or kind == "fail":
            if h.held:
                h.fail_commits = kind == "fail"
                h.commit(h.held.pop(0))
                h.fail_commits = False
            continue
        if kind == "tick":
            h.advance(250_000)
            continue
        if kind == "reconnect":
            h.lose(conn)
            conn = h.login("alice", "phone")
            sent[conn] = []
            continue
        if kind in ("retry", "conflict"):
            if not stored:
                continue
            lid, payload = stored[k % len(stored)]
            frame = F.SendReq(lid, AB, h.now, payload if kind == "retry" else payload + b"!")
        else:
            lid, next_lid = next_lid, next_lid + 1
            if kind == "bad-action":
                frame = F.AmendReq(lid, AB, 1, 99, h.now)
            elif kind == "not-member":
                frame = F.SendReq(lid, direct_conversation("bob", "carol"), h.now, b"x")
            else:
                payload = {"send": b"m%d" % lid, "spam": b"spam %d" % lid, "too-large": b"x" * (Limits().max_payload + 1)}[kind]
                frame = F.SendReq(lid, AB, h.now, payload)
                if kind == "send":
                    stored.append((lid, payload))
        h.feed(conn, frame)
        sent[conn].append(lid)
        h.now += 1_000
    h.hold_commits = False
    h.release()
    for _ in range(4):  # what waited behind a failed batch, and the retry timer
        h.advance(250_000)
    assert conn not in h.closed
    for c, lids in sent.items():
        got = [x.local_id for x in h.acks(c)]
        assert got == lids if c == conn else got == lids[: len(got)], (c, got, lids)


def test_a_connection_waiting_for_a_hook_is_paused_not_buffered_without_bound(store):
    """While its content check is out, a connection's further bytes wait
    undecoded; past 256 KiB the host is told to stop reading it, and told to
    resume once the answer came and the backlog is handled (in order).  A
    host that ignores the pause gets the connection closed, not unbounded
    memory."""
    h = Harness(store, BrokerConfig(content_filter=lambda user, conv, payload: None))
    a = h.login("alice", "phone")
    h.hold_hooks = True
    h.send(a, AB, b"first")
    assert len(h.held_hooks) == 1 and a not in h.paused
    chunk = b"".join(encode_frame(F.SendReq(100 + i, AB, h.now, bytes([i % 256]) * 1500)) for i in range(200))
    h.feed_bytes(a, chunk)  # ~300 KiB (within the send window) while the first check is out
    assert a in h.paused and len(h.held_hooks) == 1  # nothing more was looked at
    h.hold_hooks = False
    h.answer_hooks()
    assert a not in h.paused and a not in h.closed
    acks = h.acks(a)
    assert [x.code for x in acks] == [ErrorCode.OK] * 201
    assert [x.seq for x in acks] == list(range(1, 202))  # stored in the order sent
    # A host that keeps feeding a paused connection is cut off.
    h.hold_hooks = True
    h.send(a, AB, b"again")
    for _ in range(12):
        if a in h.closed:
            break
        h.feed_bytes(a, chunk)
    assert h.closed[a].code is CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x05\x30\x05\x00\x00\x00",  # wrong version nibble
        b"\x03\x40\x7f\x00",  # unknown frame type
        b"\xff\xff\xff\xff\x0f",  # 4 GiB frame announced
        b"\x04\x40\x08\x80\x80",  # truncated varint inside a complete frame
    ],
)
def test_malformed_bytes_close_only_that_connection(h, garbage):
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.send(a, AB, b"safe")
    [ack] = h.acks(a)
    h.feed_bytes(b, garbage)
    assert h.closed[b].code is CloseCode.PROTOCOL_ERROR
    assert a not in h.closed
    h.send(a, AB, b"still fine")
    assert h.acks(a)[0].seq == 2
    assert [m.payload for m in h.store.history(AB, 0, 10)] == [b"safe", b"still fine"]


def test_client_may_not_send_server_frames(h):
    a = h.login("alice", "phone")
    h.feed(a, F.SendAck(1, 0, b"", 0, 0))
    assert h.closed[a].code is CloseCode.PROTOCOL_ERROR


def test_push_ack_beyond_what_was_pushed_is_refused(h):
    a = h.login("alice", "phone")
    h.feed(a, F.PushAck(5))
    assert h.closed[a].code is CloseCode.PROTOCOL_ERROR


def test_every_close_for_a_protocol_error_is_counted_once(h):
    """statistics().protocol_errors (the metric pimcore_protocol_errors)
    counts every connection closed with PROTOCOL_ERROR, whatever the
    violation: a SendReq before Login and a PushAck beyond what was pushed
    were closed without being counted."""
    violations = [
        lambda: h.feed(h.open(), F.SendReq(1, AB, 0, b"sneaky")),  # before Login
        lambda: h.feed(h.login("alice", "phone"), F.PushAck(5)),  # beyond what was pushed
        lambda: h.feed(h.login("alice", "tablet"), F.Login(b"bob", "phone", 0, 0, 0)),  # a second Login
        lambda: h.feed(h.login("bob", "laptop"), F.SendAck(1, 0, b"", 0, 0)),  # a broker's frame
        lambda: h.feed_bytes(h.login("bob", "phone"), b"\x03\x40\x7f\x00"),  # an unknown frame type
    ]
    for n, violation in enumerate(violations, 1):
        violation()
        assert h.broker.statistics().protocol_errors == n, n
    assert sum(1 for c in h.closed.values() if c.code is CloseCode.PROTOCOL_ERROR) == len(violations)


def test_a_devices_last_seen_is_stored_when_it_goes_offline(h):
    """The store's last_seen (presence "last seen" after a restart, and
    device_retention) was the device's last login: nothing recorded when it
    was last heard from.  A new-user pass saw "last seen" go back to the
    login time after restarting the broker.  The time it was last heard
    from is now stored when it goes offline (a lazy write, with the next
    batch or after ack_delay) -- except after a host kick, which may be a
    purge that must not bring the device back."""
    conn = h.login("alice", "phone")
    h.advance(5_000_000)
    h.feed(conn, F.Ping(1))
    heard = h.now
    h.advance(1_000_000)
    h.lose(conn)
    h.advance(1_000_000)  # past ack_delay
    [dev] = h.store.devices("alice")
    assert dev.last_seen == heard
    # A purge kicks the user's sessions: the device is not recorded again.
    conn = h.login("bob", "phone")
    h.advance(1_000_000)
    h.feed(conn, F.Ping(2))
    h.run(h.broker.purge_user("bob", h.now, ref=99))
    h.advance(1_000_000)
    assert h.store.devices("bob") == []


# ---------------------------------------------------------------- downstream reliability


def test_recipients_and_senders_other_devices_get_pushes_not_the_sending_device(h):
    phone = h.login("alice", "phone")
    tablet = h.login("alice", "tablet")
    bob = h.login("bob", "laptop")
    h.send(phone, AB, b"hi")
    assert [m.payload for m in h.pushed(bob)] == [b"hi"]
    assert [m.payload for m in h.pushed(tablet)] == [b"hi"]
    # The sending device has its message (the SendAck) and nothing else is
    # outstanding: its position moves as if it had acked, and it is told
    # so in a Push without messages (its cursor covers its own sends: see
    # test_epoch's hot copy).  Its PushAck, when it comes, changes nothing.
    [own] = h.take(phone, F.Push)
    assert (own.position, own.messages) == (1, ())
    h.run(h.broker.flush(h.now))
    assert h.store.device("alice", "phone").position == 1
    h.feed(phone, F.PushAck(1))
    assert h.take(phone, F.Push) == [] and h.take(phone, F.Error) == [] and h.take(phone, F.Close) == []
    # A quick re-login resumes after its own message, not before it.
    h.lose(phone)
    again = h.login("alice", "phone")
    assert h.take(again, F.LoginAck)[0].position == 1
    assert h.pushed(again) == []


def test_own_sends_among_others_messages_are_covered_by_the_push(h):
    phone = h.login("alice", "phone")
    bob = h.login("bob", "laptop")
    h.hold_commits = True
    h.send(bob, AB, b"from bob")
    h.send(phone, AB, b"from alice")
    h.release()
    h.hold_commits = False
    pushes = h.take(phone, F.Push)
    # Positions 1 (bob's) and 2 (her own) are covered; only bob's message is sent.
    assert [m.payload for p in pushes for m in p.messages] == [b"from bob"]
    assert pushes[-1].position == 2
    # While that Push is unacked, a push of only her own sends still goes out
    # (covering it silently would ack bob's message for her).
    h.send(phone, AB, b"again")
    later = h.take(phone, F.Push)
    assert len(later) == 1 and later[0].messages == () and later[0].position == 3
    h.feed(phone, F.PushAck(3))
    h.send(phone, AB, b"caught up")
    [own] = h.take(phone, F.Push)
    assert (own.position, own.messages) == (4, ())
    h.run(h.broker.flush(h.now))
    assert h.store.device("alice", "phone").position == 4


def test_offline_device_catches_up_in_order_exactly_once(store):
    h = Harness(store, BrokerConfig(limits=Limits(push_batch=3, push_window=5)))
    a = h.login("alice", "phone")
    for k in range(12):
        h.send(a, AB, b"m%d" % k)
    assert h.store.inbox_head("bob") == 12
    b = h.login("bob", "laptop")
    [ack] = h.take(b, F.LoginAck)
    assert ack.position == 0 and ack.head == 12
    first = h.take(b, F.Push)
    # window of 5 unacked positions, in frames of at most 3
    assert [len(p.messages) for p in first] == [3, 2] and first[-1].position == 5
    h.feed(b, F.PushAck(first[-1].position))
    got = [m for p in first for m in p.messages] + h.drain_device(b)
    assert [m.payload for m in got] == [b"m%d" % k for k in range(12)]
    assert [m.position for m in got] == list(range(1, 13))
    assert h.store.device("bob", "laptop").position == 12


def test_push_window_in_bytes_bounds_what_a_device_holds_unacked(store):
    h = Harness(store, BrokerConfig(limits=Limits(push_batch=4, push_window=1000, push_window_bytes=2500)))
    a = h.login("alice", "phone")
    for k in range(10):
        h.send(a, AB, b"%d" % k + b"x" * 999)
    b = h.login("bob", "laptop")

    def unacked_bytes(pushes):
        return sum(len(m.payload) for p in pushes for m in p.messages)

    got = []
    first = h.take(b, F.Push)
    # Never more than the byte window plus one message, however big push_batch.
    assert 2000 <= unacked_bytes(first) <= 2500 + 1000
    got += [m for p in first for m in p.messages]
    h.feed(b, F.PushAck(first[0].position))  # frees only the first frame's bytes
    more = h.take(b, F.Push)
    assert more and unacked_bytes(first[1:] + more) <= 2500 + 1000
    got += [m for p in more for m in p.messages]
    h.feed(b, F.PushAck(more[-1].position))
    got += h.drain_device(b)
    assert [m.payload[:1] for m in got] == [b"%d" % k for k in range(10)]
    assert h.store.device("bob", "laptop").position == 10


def test_a_message_larger_than_the_byte_window_still_gets_through(store):
    h = Harness(store, BrokerConfig(limits=Limits(push_window_bytes=100)))
    a = h.login("alice", "phone")
    h.send(a, AB, b"y" * 5000)
    h.send(a, AB, b"z" * 5000)
    b = h.login("bob", "laptop")
    assert [m.payload[:1] for m in h.drain_device(b)] == [b"y", b"z"]


def test_resume_from_acked_position_no_loss_no_duplicates(h):
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    for k in range(5):
        h.send(a, AB, b"m%d" % k)
    got = h.pushed(b)
    assert len(got) == 5
    h.feed(b, F.PushAck(3))  # took 3, then the network died
    h.lose(b)
    for k in range(5, 8):
        h.send(a, AB, b"m%d" % k)
    # the client remembers position 3; the store agrees
    b2 = h.login("bob", "laptop", position=3)
    assert h.take(b2, F.LoginAck)[0].position == 3
    assert [m.payload for m in h.drain_device(b2)] == [b"m%d" % k for k in range(3, 8)]
    # a client that lost its local cursor still resumes from the stored ack
    h.lose(b2)
    b3 = h.login("bob", "laptop", position=0)
    assert h.take(b3, F.LoginAck)[0].position == 8
    assert h.drain_device(b3) == []


def test_a_push_ack_in_the_middle_of_a_catch_up_push_is_kept_and_the_rest_pushed_again(h):
    """The SDK acks each message taken, so a PushAck may fall inside one
    Push: the broker records that position, pushes nothing more of what it
    covers, and the next login gets only the rest."""
    a = h.login("alice", "phone")
    for k in range(5):
        h.send(a, AB, b"m%d" % k)
    b = h.login("bob", "laptop")
    [push] = h.take(b, F.Push)  # catch-up: one Push of the five
    assert push.position == 5 and [m.position for m in push.messages] == [1, 2, 3, 4, 5]
    h.feed(b, F.PushAck(3))  # took three, then left
    assert h.take(b, F.Push) == [] and not h.take(b, F.Error)
    h.lose(b)
    b2 = h.login("bob", "laptop", position=0)  # the stored ack, not the client's
    assert h.take(b2, F.LoginAck)[0].position == 3
    assert [m.payload for m in h.drain_device(b2)] == [b"m3", b"m4"]


def test_each_device_has_its_own_offline_list(h):
    a = h.login("alice", "phone")
    laptop = h.login("bob", "laptop")
    phone = h.login("bob", "phone")
    h.send(a, AB, b"one")
    h.drain_device(laptop)  # laptop acks, phone does not
    h.lose(laptop), h.lose(phone)
    h.send(a, AB, b"two")
    laptop = h.login("bob", "laptop")
    phone = h.login("bob", "phone")
    assert [m.payload for m in h.drain_device(laptop)] == [b"two"]
    assert [m.payload for m in h.drain_device(phone)] == [b"one", b"two"]


def test_group_fan_out_reaches_every_member(h):
    members = ["alice", "bob", "carol", "dave"]
    h.create_group("team", members)
    conns = {u: h.login(u, "d") for u in members[:3]}  # dave is offline
    h.send(conns["alice"], "team", b"standup?")
    assert [m.payload for m in h.pushed(conns["bob"])] == [b"standup?"]
    assert [m.payload for m in h.pushed(conns["carol"])] == [b"standup?"]
    dave = h.login("dave", "d")
    assert [m.payload for m in h.drain_device(dave)] == [b"standup?"]


def test_broker_restart_on_the_same_store(tmp_path):
    path = str(tmp_path / "db")
    store = LmdbStore(path)
    h = Harness(store)
    a = h.login("alice", "phone")
    h.login("bob", "laptop")
    for k in range(4):
        h.send(a, AB, b"m%d" % k)
    acks = h.acks(a)
    last_time = acks[-1].server_time
    store.close()

    store = LmdbStore(path)
    h2 = Harness(store)
    h2.now = T0 - 10 * MINUTE  # the wall clock stepped back across the restart
    a = h2.login("alice", "phone")
    h2.send(a, AB, b"after restart", local_id=100)
    [ack] = h2.acks(a)
    assert ack.seq == 5 and ack.server_time > last_time  # HLC never goes back
    h2.send(a, AB, b"m1", local_id=2)  # a retry from before the restart
    assert h2.acks(a)[0] == acks[1]
    b = h2.login("bob", "laptop")
    got = h2.drain_device(b)
    assert [m.payload for m in got] == [b"m0", b"m1", b"m2", b"m3", b"after restart"]
    store.close()


# ---------------------------------------------------------------- ordering & time


def test_server_time_is_monotonic_even_when_the_wall_clock_goes_back(h):
    a = h.login("alice", "phone")
    times = []
    for step in (0, -5 * MINUTE, -1, 3, -10 * MINUTE):
        h.now += step
        h.send(a, AB, b"x")
        times.append(h.acks(a)[0].server_time)
    assert times == sorted(times) and len(set(times)) == len(times)


def test_calibrate_reports_server_time(h):
    a = h.login("alice", "phone")
    h.feed(a, F.CalibrateReq(-123))
    [resp] = h.take(a, F.CalibrateResp)
    assert resp.client_time == -123 and resp.server_time == h.now


def test_seed_example_with_skewed_client_clock(h):
    from pimcore.order import display_order

    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.send(a, AB, b"XXX", client_time=h.now - 30 * MINUTE)  # alice's clock is 30 min late
    h.now += 2_000_000
    h.send(b, AB, b"YYY", client_time=h.now)
    history = h.store.history(AB, 0, 10)
    assert [m.payload for m in display_order(list(reversed(history)))] == [b"XXX", b"YYY"]


# ---------------------------------------------------------------- read state


def test_read_marker_syncs_to_other_devices_and_receipts_go_to_the_peer(h):
    alice = h.login("alice", "phone")
    phone = h.login("bob", "phone")
    laptop = h.login("bob", "laptop")
    for k in range(3):
        h.send(alice, AB, b"m%d" % k)
    h.take(alice), h.take(phone), h.take(laptop)
    h.feed(phone, F.Read(AB, 2))
    # The reader gets the durable marker with the store's unread count too.
    assert [f.entries for f in h.take(phone, F.ReadStates)] == [(F.ReadState(AB, 2, 3, 1),)]
    [sync] = h.take(laptop, F.ReadStates)
    assert sync.entries == (F.ReadState(AB, 2, 3, 1),)
    [receipt] = h.take(alice, F.ReadReceipt)
    assert receipt == F.ReadReceipt(AB, "bob", 2)
    assert h.store.unread("bob", AB) == 1 and h.store.unread("alice", AB) == 0


def test_read_marker_never_moves_backwards(h):
    alice = h.login("alice", "phone")
    bob = h.login("bob", "phone")
    other = h.login("bob", "tablet")
    for _ in range(4):
        h.send(alice, AB, b"x")
    h.feed(bob, F.Read(AB, 3))
    h.take(other), h.take(alice)
    h.feed(bob, F.Read(AB, 1))  # a stale device reports an older position
    assert h.take(other, F.ReadStates) == [] and h.take(alice, F.ReadReceipt) == []
    assert h.store.read_marker("bob", AB) == 3
    h.feed(bob, F.Read(AB, 99))  # clamped to the last seq
    assert h.store.read_marker("bob", AB) == 4
    assert h.take(other, F.ReadStates)[0].entries[0].read_seq == 4


def test_offline_devices_get_markers_unread_counts_and_receipts_at_login(h):
    h.create_group("team", ["alice", "bob", "carol"])
    alice = h.login("alice", "phone")
    bob = h.login("bob", "phone")
    for k in range(3):
        h.send(alice, AB, b"dm%d" % k)
    for k in range(4):
        h.send(alice, "team", b"g%d" % k)
    h.send(bob, AB, b"reply")
    h.feed(bob, F.Read(AB, 2))
    h.feed(bob, F.Read("team", 1))
    laptop = h.login("bob", "laptop")  # was offline during all that
    states = {e.conv: e for f in h.take(laptop, F.ReadStates) for e in f.entries}
    assert states[AB] == F.ReadState(AB, 2, 4, 1)  # dm2 unread; own reply not counted
    assert states["team"] == F.ReadState("team", 1, 4, 3)
    alice2 = h.login("alice", "tablet")
    assert F.ReadReceipt(AB, "bob", 2) in h.take(alice2, F.ReadReceipt)


def test_group_read_positions_are_queryable_and_no_receipts_in_groups(h):
    h.create_group("team", ["alice", "bob", "carol"])
    alice = h.login("alice", "phone")
    bob = h.login("bob", "phone")
    for _ in range(3):
        h.send(alice, "team", b"x")
    h.feed(bob, F.Read("team", 2))
    assert h.take(alice, F.ReadReceipt) == []
    assert h.store.read_positions("team") == {"alice": 0, "bob": 2, "carol": 0}


def test_read_refused_by_the_store_is_reported_not_a_crash(h):
    # carol was never a member: only the store can tell, and it refuses.
    h.create_group("team", ["alice", "bob"])
    carol = h.login("carol", "phone")
    h.feed(carol, F.Read("team", 1))
    [err] = h.take(carol, F.Error)
    assert err.code == ErrorCode.NOT_MEMBER and "team" in err.reason
    assert carol not in h.closed
    assert h.store.read_marker("carol", "team") == 0
    # bob is a member when he sends Read, and is removed before the batch
    # commits: a former member may mark up to his LEFT entry (seq 1), no more.
    bob = h.login("bob", "phone")
    h.hold_commits = True
    h.feed(bob, F.Read("team", 5))
    h.store.remove_members("team", ["bob"])  # another writer (pimcore group remove)
    h.release()
    assert not h.take(bob, F.Error) and bob not in h.closed
    assert h.store.read_marker("bob", "team") == 1


def test_read_of_unknown_conversation_is_an_error_not_a_close(h):
    bob = h.login("bob", "phone")
    h.feed(bob, F.Read("ghost-town", 1))
    [err] = h.take(bob, F.Error)
    assert err.code == ErrorCode.UNKNOWN_CONVERSATION
    assert bob not in h.closed


# ---------------------------------------------------------------- history


def test_history_paging_forward_and_backward(h):
    a = h.login("alice", "phone")
    for k in range(5):
        h.send(a, AB, b"m%d" % k)
    h.feed(a, F.HistoryReq(1, AB, 0, 2, False))
    h.feed(a, F.HistoryReq(2, AB, 4, 10, False))
    h.feed(a, F.HistoryReq(3, AB, 0, 2, True))
    r1, r2, r3 = h.take(a, F.HistoryResp)
    assert ([m.seq for m in r1.messages], r1.more) == ([1, 2], True)
    assert ([m.seq for m in r2.messages], r2.more) == ([5], False)
    assert ([m.seq for m in r3.messages], r3.more, r3.req_id) == ([5, 4], True, 3)
    c = h.login("carol", "phone")
    h.feed(c, F.HistoryReq(9, AB, 0, 10, False))
    [denied] = h.take(c, F.HistoryResp)
    assert denied.code == ErrorCode.NOT_MEMBER and denied.messages == ()


def test_pipelined_history_requests_all_get_their_page(h):
    """A client may pipeline any number of HistoryReqs: the broker works on a
    few at a time and reads on as they are answered; none is refused."""
    a = h.login("alice", "phone")
    for k in range(5):
        h.send(a, AB, b"m%d" % k)
    h.take(a)
    h.feed_bytes(a, b"".join(encode_frame(F.HistoryReq(r, AB, r % 5, 1, False)) for r in range(1, 41)) + encode_frame(F.Ping(7)))
    resps = h.take(a, F.HistoryResp)
    assert sorted(r.req_id for r in resps) == list(range(1, 41))
    assert all(r.code == ErrorCode.OK and [m.seq for m in r.messages] == [r.req_id % 5 + 1] for r in resps)
    assert h.take(a, F.Pong) == [F.Pong(7)]  # and what came after them too
    assert h.broker.statistics().reads_in_flight == 0


# ---------------------------------------------------------------- reclamation


def test_reclaim_runs_from_tick_and_frees_acked_entries(store):
    cfg = BrokerConfig(reclaim_interval=1_000_000)
    h = Harness(store, cfg)
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    for _ in range(3):
        h.send(a, AB, b"x")
    h.drain_device(b)
    h.drain_device(a)
    h.advance(1)  # arms the timer
    h.advance(1_000_000)
    assert any(type(op).__name__ == "Reclaim" for c in h.commits for op in c.ops)
    assert h.store.inbox_floor("bob") == 3
    assert h.store.inbox_range("bob", 0, 10) == []
    # a new device of bob's is told that older entries are gone
    tablet = h.login("bob", "tablet")
    ack = h.take(tablet, F.LoginAck)[0]
    assert ack.gap is True and ack.position == 3


# ---------------------------------------------------------------- model-based


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_random_traffic_delivers_every_inbox_entry_exactly_once(tmp_path_factory, seed):
    """Random sends, retries, acks, disconnects, reconnects and slow commits;
    afterwards every device, draining, has seen each of its user's inbox
    entries -- and no position was ever handed to the application twice
    (re-pushes of unacked positions are dropped by position, as clients do)."""
    rnd = random.Random(seed)
    store = MemoryStore()
    h = Harness(store, BrokerConfig(limits=Limits(push_batch=2, push_window=3, window=4)))
    h.create_group("g", ["u0", "u1", "u2"])
    devices = [(u, d) for u in ("u0", "u1", "u2") for d in ("a", "b")]
    convs = ["g", direct_conversation("u0", "u1"), direct_conversation("u1", "u2")]
    conn_of: dict = {}
    cursor = {dev: 0 for dev in devices}  # what the app processed
    seen = {dev: [] for dev in devices}
    sent_ok: set = set()

    def pump(dev):
        conn = conn_of.get(dev)
        if conn is None or conn in h.closed:
            return
        for p in h.take(conn, F.Push):
            for m in p.messages:
                if m.position > cursor[dev]:
                    seen[dev].append(m.position)
            cursor[dev] = max(cursor[dev], p.position)
            if rnd.random() < 0.7:
                h.feed(conn, F.PushAck(cursor[dev]))
        for ack in h.take(conn, F.SendAck):
            if ack.code == ErrorCode.OK:
                sent_ok.add(ack.msg_id)

    for _ in range(60):
        dev = rnd.choice(devices)
        action = rnd.random()
        h.hold_commits = rnd.random() < 0.3
        if dev not in conn_of or conn_of[dev] in h.closed:
            conn_of[dev] = h.login(dev[0], dev[1], position=cursor[dev])
        elif action < 0.5:
            conv = rnd.choice([c for c in convs if c == "g" or dev[0] in c])
            lid = rnd.randint(1, 8)  # small space: many retries and conflicts
            h.send(conn_of[dev], conv, b"%s:%d" % (conv.encode(), lid), local_id=lid)
        elif action < 0.6:
            h.lose(conn_of.pop(dev))
        elif action < 0.7:
            h.release()
        for d in devices:
            pump(d)
        h.now += rnd.randint(0, 1000)
    h.hold_commits = False
    h.release()
    for dev in devices:
        if dev not in conn_of or conn_of[dev] in h.closed:
            conn_of[dev] = h.login(dev[0], dev[1], position=cursor[dev])
        conn = conn_of[dev]
        for _ in range(1000):
            pump(dev)
            # read state etc. is not under test here (Pushes must stay)
            h.frames[conn] = [f for f in h.frames[conn] if isinstance(f, F.Push)]
            h.feed(conn, F.PushAck(cursor[dev]))  # the app caught up: ack all
            if not any(isinstance(f, F.Push) for f in h.frames[conn]):
                break
    for (user, device), positions in seen.items():
        inbox = [pos for pos, m in store.inbox_range(user, 0, 10_000) if m.device != device or m.sender != user]
        assert positions == sorted(set(positions)), "a position reached the app twice or out of order"
        assert positions == inbox, f"{user}/{device} missed entries"
    for conv in convs:
        hist = store.history(conv, 0, 10_000)
        assert [m.seq for m in hist] == list(range(1, len(hist) + 1))
    keys = [(m.sender, m.device, m.local_id) for conv in convs for m in store.history(conv, 0, 10_000)]
    assert len(keys) == len(set(keys)), "a retry was stored twice"
    assert sent_ok <= {m.msg_id for conv in convs for m in store.history(conv, 0, 10_000)}


def test_quick_relogin_resumes_from_an_ack_that_is_not_durable_yet(h):
    a = h.login("alice", "phone")
    for k in range(3):
        h.send(a, AB, b"m%d" % k)
    h.hold_commits = True
    b = h.login("bob", "laptop")
    got = h.drain_device(b)  # its acks wait in a held batch
    assert [m.payload for m in got] == [b"m0", b"m1", b"m2"]
    h.lose(b)
    again = h.login("bob", "laptop", position=0)  # a fresh app: no cursor of its own
    [ack] = h.take(again, F.LoginAck)
    assert ack.position == 3
    assert h.pushed(again) == []


def test_a_session_ends_when_its_token_expires(h):
    expiring = h.login("alice", "phone", token=b"until:%d:alice" % (h.now + 5_000_000))
    forever = h.login("bob", "phone")
    h.advance(4_000_000)
    assert expiring not in h.closed
    h.advance(1_000_000)
    assert h.closed[expiring].code is CloseCode.TOKEN_EXPIRED
    assert forever not in h.closed
    again = h.login("alice", "phone", token=b"until:%d:alice" % (h.now + 60_000_000))
    h.send(again, AB, b"with a fresh token")
    assert h.acks(again)[0].code == ErrorCode.OK


# ---------------------------------------------------------------- ack_delay


def batch_kinds(h):
    return [sorted({type(op).__name__ for op in c.ops}) for c in h.commits]


def _one_acked_message(store, ack_delay=50_000):
    """alice sends bob "one" (ack_delay µs), bob acks its Push; the harness
    keeps the batches from the send on."""
    h = Harness(store, BrokerConfig(ack_delay=ack_delay))
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.commits.clear()
    h.send(a, AB, b"one")
    assert [m.payload for m in h.pushed(b)] == [b"one"]
    h.feed(b, F.PushAck(1))
    return h, a, b


def test_delivery_acks_wait_ack_delay_also_behind_sends(store):
    # Delivery acks (and the logins' TouchDevice) do not ride along with a
    # batch of sends: they wait ack_delay, coalesced per device, then go in
    # one batch.  (At one send per batch they were two of its three ops.)
    h, a, b = _one_acked_message(store)
    assert batch_kinds(h) == [["NewMessage"]]
    assert store.device("bob", "laptop") is None  # registered, not yet durably
    h.now += 10_000
    h.send(a, AB, b"two")
    assert batch_kinds(h) == [["NewMessage"], ["NewMessage"]]
    assert [m.payload for m in h.pushed(b)] == [b"two"]
    h.advance(39_000)
    assert len(batch_kinds(h)) == 2 and store.device("bob", "laptop") is None
    h.advance(2_000)  # ack_delay after the first send: the acks go, one per device
    assert batch_kinds(h)[2:] == [["AckPosition", "TouchDevice"]]
    assert [type(op).__name__ for op in h.commits[2].ops].count("AckPosition") == 2  # bob's, alice's own
    assert store.device("bob", "laptop").position == 1
    assert store.device("alice", "phone").position == 2  # its own two sends


def test_a_waiting_ack_is_committed_alone_once_the_delay_passed(store):
    h, _, _ = _one_acked_message(store)
    h.advance(49_000)
    assert store.device("bob", "laptop") is None
    h.advance(2_000)  # the tick after the delay commits it
    assert store.device("bob", "laptop").position == 1


def test_an_op_other_than_a_send_takes_the_waiting_acks_with_it_in_order(store):
    # Only sends overtake the waiting acks: any other op (here a Read) goes
    # in one batch with them, after them, as proposed.
    h, _, b = _one_acked_message(store)
    h.feed(b, F.Read(AB, 1))
    assert batch_kinds(h)[0] == ["NewMessage"]
    kinds = [type(op).__name__ for op in h.commits[1].ops]
    assert kinds[-1] == "MarkRead" and kinds.count("TouchDevice") == 2 and "AckPosition" in kinds
    assert store.device("bob", "laptop").position == 1


def test_a_waiting_ack_still_counts_for_a_quick_relogin_and_flush_commits_it(store):
    h = Harness(store, BrokerConfig(ack_delay=10 * MINUTE))
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    for k in range(3):
        h.send(a, AB, b"m%d" % k)
    h.pushed(b)
    h.feed(b, F.PushAck(3))
    h.lose(b)
    b2 = h.login("bob", "laptop")  # not durable yet, but known: no re-delivery
    assert h.take(b2, F.LoginAck)[0].position == 3
    assert store.device("bob", "laptop") is None  # its registration waits too
    h.run(h.broker.flush(h.now))
    assert store.device("bob", "laptop").position == 3


def test_without_ack_delay_acks_are_committed_at_once(h):
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.send(a, AB, b"one")
    h.pushed(b)
    h.feed(b, F.PushAck(1))
    assert h.store.device("bob", "laptop").position == 1


# ------------------------------------------- what PROTOCOL.md promises a client
#
# Issue 10 item 7: each of these is stated in PROTOCOL.md (sections 6 and 8)
# so that a client can be written from the spec alone.


def test_a_login_answers_its_pipelined_frames_and_sends_a_catch_up_push_before_its_read_states(h):
    """The login's read states -- one per conversation -- come after the
    answers to frames pipelined after the Login (the SDK's CalibrateReq,
    which it waits for) and after the first Push of a catch-up: a link cut
    every few KB once delivered no message at all to a user of 300
    conversations (a new user's trial; tests/test_weak_network.py).  That
    Push holds only entries the read states count."""
    from pimcore.codec import encode_frame

    AC = direct_conversation("alice", "carol")
    alice = h.login("alice", "phone")
    for k in range(3):
        h.send(alice, AB, b"dm%d" % k)
    h.send(alice, AC, b"to carol")
    h.feed(alice, F.Read(AB, 1))
    bob_laptop = h.login("bob", "laptop")
    h.feed(bob_laptop, F.Read(AB, 1))  # (alice gets a receipt at her login)

    def login(user: str, device: str) -> list:
        conn = h.open()
        h.feed_bytes(conn, encode_frame(F.Login(user.encode(), device, h.now, 0, 0, h.broker.epoch))
                     + encode_frame(F.CalibrateReq(12345)) + encode_frame(F.Ping(7)))
        return h.take(conn)

    frames = login("bob", "phone")  # 3 entries to catch up
    kinds = [type(f).__name__ for f in frames]
    assert kinds == ["LoginAck", "CalibrateResp", "Pong", "Push", "ReadStates", "ReadReceipt"], kinds
    push, states = frames[3], frames[4]
    assert [m.payload for m in push.messages] == [b"dm0", b"dm1", b"dm2"]
    assert states.entries == (F.ReadState(AB, 1, 3, 2),)  # it counts what the Push brought
    assert frames[5] == F.ReadReceipt(AB, "alice", 1)

    frames = login("alice", "tablet")  # nothing to catch up but her own sends
    kinds = [type(f).__name__ for f in frames]
    assert kinds[:3] == ["LoginAck", "CalibrateResp", "Pong"], kinds
    assert {type(f).__name__ for f in frames[3:]} <= {"Push", "ReadStates", "ReadReceipt"}, kinds
    assert F.ReadReceipt(AB, "bob", 1) in frames
    assert {e.conv for f in frames if isinstance(f, F.ReadStates) for e in f.entries} == {AB, AC}


def test_a_user_with_no_conversations_gets_no_read_states_at_login(h):
    lonely = h.login("carol", "phone")
    [ack] = h.take(lonely, F.LoginAck)
    assert ack.head == 0 and h.take(lonely, F.ReadStates) == [] and h.take(lonely, F.ReadReceipt) == []
    # ... and one with a conversation gets one entry for it.
    a = h.login("alice", "phone")
    h.send(a, AB, b"hi")
    b = h.login("bob", "phone")
    [states] = h.take(b, F.ReadStates)
    assert states.entries == (F.ReadState(AB, 0, 1, 1),)


def test_online_devices_get_exact_read_states_after_retention_and_a_purge(h):
    # A new user's trial: bob's connected devices kept counting 30 unread
    # after retention kept 10 (and 31 after a purge and one more message)
    # while the broker said 10 (and 1): nothing told them the history floor
    # moved.  Every online device of both users now gets the store's exact
    # ReadState; an offline user gets it at login.
    a = h.login("alice", "phone")
    b, b2 = h.login("bob", "phone"), h.login("bob", "laptop")
    for i in range(30):
        h.send(a, AB, b"m%d" % i)
    h.drain_device(b), h.drain_device(b2)
    h.feed(b, F.Read(AB, 5))
    for conn in (a, b, b2):
        h.take(conn)
    assert h.host_call(h.broker.set_retention, AB, -1, 10) is not None
    for _ in range(2):  # the first pass arms the reclaim timer, the next one runs it
        h.advance(BrokerConfig().reclaim_interval + 1)
    assert h.store.retention(AB).floor == 20 and h.store.unread("bob", AB) == 10
    for conn in (b, b2):
        assert [s.entries for s in h.take(conn, F.ReadStates)] == [(F.ReadState(AB, 5, 30, 10),)]
        [update] = h.take(conn, F.ConvUpdate)  # the conversation list's entry agrees
        assert [(e.conv, e.read_seq, e.unread) for e in update.entries] == [(AB, 5, 10)]
    assert [s.entries for s in h.take(a, F.ReadStates)] == [(F.ReadState(AB, 0, 30, 0),)]
    # Nothing moved again: no second ReadState.
    h.advance(BrokerConfig().reclaim_interval + 1)
    assert h.take(b, F.ReadStates) == []
    # A purge: nothing is left to read; the 1:1 chat's markers stay.
    assert h.host_call(h.broker.purge_conversation, AB) is not None
    for conn in (b, b2):
        assert [s.entries for s in h.take(conn, F.ReadStates)] == [(F.ReadState(AB, 5, 30, 0),)]
    assert [s.entries for s in h.take(a, F.ReadStates)] == [(F.ReadState(AB, 0, 30, 0),)]
    # One more message: a device adds it to the ReadState it holds (1), as
    # the broker counts it.
    h.send(a, AB, b"after")
    assert [m.seq for m in h.drain_device(b)] == [31]
    assert h.store.unread("bob", AB) == 1


def test_online_members_of_a_group_get_exact_read_states_after_retention(h):
    # As for a 1:1 chat (above): the group's members online here -- read
    # from the store, the core does not know them -- get the store's exact
    # ReadState; a user online here who is not a member gets nothing.
    h.create_group("team", ["alice", "bob", "carol"])
    a = h.login("alice", "phone")
    b, b2 = h.login("bob", "phone"), h.login("bob", "laptop")
    d = h.login("dave", "phone")
    for i in range(30):
        h.send(a, "team", b"m%d" % i)
    h.drain_device(b), h.drain_device(b2)
    h.feed(b, F.Read("team", 5))
    for conn in (a, b, b2, d):
        h.take(conn)
    assert h.host_call(h.broker.set_retention, "team", -1, 10) is not None
    for _ in range(2):  # the first pass arms the reclaim timer, the next one runs it
        h.advance(BrokerConfig().reclaim_interval + 1)
    unread = h.store.unread("bob", "team")
    assert unread == 10
    for conn in (b, b2):
        [states] = h.take(conn, F.ReadStates)
        [st] = states.entries
        assert (st.conv, st.read_seq, st.unread) == ("team", 5, 10), st
    [states] = h.take(a, F.ReadStates)
    assert [(e.conv, e.unread) for e in states.entries] == [("team", 0)]
    assert h.take(d, F.ReadStates) == []
    # Nothing moved again: no second ReadState.
    h.advance(BrokerConfig().reclaim_interval + 1)
    assert h.take(b, F.ReadStates) == []


@pytest.mark.parametrize("floor", ["retention", "purge"])
def test_a_read_state_read_before_a_later_message_is_read_again(store, store_driver, floor):
    # The read after a retention pass or a purge may answer from before a
    # message the device was pushed meanwhile (a store answering reads
    # concurrently with commits: Redis): sent as it is, it would replace the
    # device's count of 11 (1 after the purge) with 10 (0) and last_seq 31
    # with 30.  A commit touching the conversation while the read is out
    # makes the core read again.
    from pimcore.store import ReadConversations, ReadReaders

    if store_driver != "inline":
        pytest.skip("inline only: the test answers one read late itself")
    h = Harness(store, driver="inline")
    a, b = h.login("alice", "phone"), h.login("bob", "phone")
    for i in range(30):
        h.send(a, AB, b"m%d" % i)
    h.drain_device(b)
    h.take(b)
    late: list = []
    execute = h._execute

    def answer_bobs_first_read_late(cmd):
        if not cmd.write and not late and any(
            isinstance(op, ReadConversations) and (op.user, op.conv) == ("bob", AB)
            or isinstance(op, ReadReaders) and (op.user, op.conv) == ("bob", AB)
            for op in cmd.ops
        ):
            late.append((cmd, h.store.execute(cmd)))  # read now, answered later
        else:
            execute(cmd)

    h._execute = answer_bobs_first_read_late
    if floor == "retention":
        h.host_call(h.broker.set_retention, AB, -1, 10)
        for _ in range(2):
            h.advance(BrokerConfig().reclaim_interval + 1)
    else:
        h.host_call(h.broker.purge_conversation, AB)
    assert late and h.take(b, F.ReadStates) == []
    h.send(a, AB, b"late")
    assert [m.seq for m in h.drain_device(b)] == [31]
    [(cmd, results)] = late
    h.run(h.broker.store_completed(cmd.request_id, results, h.now))
    unread = 11 if floor == "retention" else 1
    assert [s.entries for s in h.take(b, F.ReadStates)] == [(F.ReadState(AB, 0, 31, unread),)]
    assert h.store.unread("bob", AB) == unread


@pytest.mark.parametrize("when", ["before-login", "logged-in", "login-pending"])
def test_the_broker_answers_a_clients_close_with_a_close(h, when):
    if when == "before-login":
        conn = h.open()
        h.feed(conn, F.Close(CloseCode.NORMAL, "bye"))
    elif when == "logged-in":
        conn = h.login("alice", "phone")
        h.feed(conn, F.Close(CloseCode.NORMAL, "bye"))
    else:  # Close pipelined right behind Login: handled once the login is decided
        h.hold_hooks = True
        conn = h.open()
        h.feed_bytes(conn, encode_frame(F.Login(b"alice", "phone", h.now, 0, 0)) + encode_frame(F.Close(CloseCode.NORMAL, "bye")))
        assert conn not in h.closed
        h.answer_hooks()
    close = h.closed[conn]
    assert close.code is CloseCode.NORMAL and close.reason == "closed by client" and close.data
    assert h.broker.online_devices("alice") == []


def test_a_read_beyond_the_last_seq_is_clamped_to_it(h):
    a = h.login("alice", "phone")
    b = h.login("bob", "phone")
    for _ in range(3):
        h.send(a, AB, b"x")
    h.take(b)
    h.feed(b, F.Read(AB, 1_000_000))
    [states] = h.take(b, F.ReadStates)
    assert states.entries == (F.ReadState(AB, 3, 3, 0),)
    assert [(r.reader, r.seq) for r in h.take(a, F.ReadReceipt)] == [("bob", 3)]
    h.send(a, AB, b"new")  # the marker did not run ahead: the 4th is unread
    assert h.store.read_marker("bob", AB) == 3 and h.store.unread("bob", AB) == 1


@pytest.mark.parametrize("in_flight", [True, False], ids=["in-flight", "after-commit"])
def test_a_retry_with_another_client_time_is_still_a_retry(h, in_flight):
    a = h.login("alice", "phone")
    h.hold_commits = in_flight
    h.send(a, AB, b"once", local_id=7, client_time=T0)
    h.send(a, AB, b"once", local_id=7, client_time=T0 + 5 * MINUTE)  # the retry is stamped anew
    h.release()
    first, second = h.acks(a)
    assert first.code == ErrorCode.OK and second == first  # the original ack, byte for byte
    [stored] = h.store.history(AB, 0, 10)
    assert stored.client_time == T0 and h.store.last_seq(AB) == 1


def test_a_local_id_is_remembered_after_its_inbox_entries_and_device_are_reclaimed(h):
    from pimcore.store import Reclaim, WriteBatch

    a = h.login("alice", "phone")
    h.send(a, AB, b"kept", local_id=11)
    [ack] = h.acks(a)
    h.lose(a)
    # Years later: every inbox entry and every device reclaimed.
    h.store.commit(WriteBatch(0, (Reclaim(h.now + 10**15, 0, 0),)))
    assert h.store.devices("alice") == [] and h.store.inbox_head("bob") == 1
    h.now += 10**15
    a = h.login("alice", "phone")
    h.send(a, AB, b"kept", local_id=11)
    assert h.acks(a) == [ack] and h.store.last_seq(AB) == 1
    h.send(a, AB, b"other", local_id=11)
    assert [k.code for k in h.acks(a)] == [ErrorCode.DUPLICATE_CONFLICT]


# ---------------------------------------------------------------- presence commands (logs, host events)


def test_device_online_and_offline_pair_up_on_every_way_a_session_ends(h):
    """DeviceOnline when a login becomes active, exactly one DeviceOffline
    when it ends: closed by the client, lost, replaced, closed by the host
    (kick), idle timeout.  A refused login has neither.  (The harness also
    asserts the pairing on every command list of every core test.)"""
    from pimcore.core import DeviceOffline, DeviceOnline

    by_client = h.login("alice", "phone")
    h.feed(by_client, F.Close(CloseCode.NORMAL, "bye"))
    lost = h.login("alice", "phone")
    h.lose(lost)
    old = h.login("bob", "laptop")
    new = h.login("bob", "laptop")
    h.run(h.broker.close(new, CloseCode.SHUTDOWN, "kicked by the operator", h.now))
    refused = h.login("x", "d1", token=b"forged")
    assert h.closed[refused].code is CloseCode.AUTH_FAILED
    assert h.presence == [
        DeviceOnline(by_client, "alice", "phone"),
        DeviceOffline(by_client, "alice", "phone", CloseCode.NORMAL, "closed by client"),
        DeviceOnline(lost, "alice", "phone"),
        DeviceOffline(lost, "alice", "phone", None, "connection lost"),
        DeviceOnline(old, "bob", "laptop"),
        DeviceOffline(old, "bob", "laptop", CloseCode.REPLACED, "the same device logged in again"),
        DeviceOnline(new, "bob", "laptop"),
        DeviceOffline(new, "bob", "laptop", CloseCode.SHUTDOWN, "kicked by the operator"),
    ]
    assert not h.online
    # Losing a connection the core already forgot says nothing more.
    h.lose(new)
    assert len(h.presence) == 8


def test_device_offline_on_idle_timeout(store):
    h = Harness(store, BrokerConfig(idle_timeout=1_000_000))
    conn = h.login("alice", "phone")
    h.advance(2_000_000)
    assert h.closed[conn].code is CloseCode.IDLE_TIMEOUT
    assert [type(c).__name__ for c in h.presence] == ["DeviceOnline", "DeviceOffline"]
    assert h.presence[-1].code is CloseCode.IDLE_TIMEOUT


def test_a_batch_sends_each_connection_its_acks_in_one_write_in_order(h):
    # Issue 13: the SendAcks a committed batch owes a connection are encoded
    # together into one SendData -- and still in op order with every other
    # frame of the batch (here an Error for a Read the store refuses).
    from pimcore.codec import Decoder
    from pimcore.core import SendData

    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.take(a), h.take(b)
    h.hold_commits = True
    h.send(a, AB, b"0", local_id=100)  # in flight: what follows waits for the next batch
    h.send(a, AB, b"1", local_id=1)
    h.send(a, AB, b"2", local_id=2)
    h.feed(a, F.Read("no-such-group", 1))  # the store answers UNKNOWN_CONVERSATION
    h.send(a, AB, b"3", local_id=3)
    if h.latency is not None:  # this test runs the commit itself, inline
        pytest.skip("inline only")
    h.commit(h.held.pop(0))  # the first batch; the next one (4 ops) is held
    h.take(a), h.take(b)
    [commit] = h.held
    h.held.clear()
    assert [type(op).__name__ for op in commit.ops][:4] == ["NewMessage", "NewMessage", "MarkRead", "NewMessage"]
    results = h.store.execute(commit)
    cmds = h.broker.store_completed(commit.request_id, results, h.now)
    writes = [c.data for c in cmds if type(c) is SendData and c.conn == a]
    frames = []
    for data in writes:
        dec = Decoder(1 << 20)
        dec.feed(data)
        one = []
        while (f := dec.next_frame()) is not None:
            one.append(f)
        frames.append(one)
    # (Then the Push that tells the sender its own position.)
    assert [[type(f).__name__ for f in w] for w in frames] == [["SendAck", "SendAck"], ["Error"], ["SendAck"], ["Push"]]
    assert [f.local_id for w in frames for f in w if type(f) is F.SendAck] == [1, 2, 3]
    assert all(f.code == ErrorCode.OK for w in frames for f in w if type(f) is F.SendAck)
    assert frames[1][0].code == ErrorCode.UNKNOWN_CONVERSATION
    h.run(cmds)
