"""A device's sends are stored in local-id order even when some are refused
for back-pressure (RATE_LIMITED, TOO_MANY_IN_FLIGHT).

A pipelining client has SendReqs L+1, L+2... on the wire when L is refused;
it holds and resends L.  Before the refusal mark, L+1... were accepted as
soon as the bucket (or the window) had room again -- before L's retry -- so
they took lower seqs than L: one device's messages stored out of send order
(a new user's trial: 8 inversions in 1,500 SDK sends at the default
send_rate).  Now, after a transient refusal of L, the connection refuses every
later local id with the same code, without a token or a strike, until L's
retry (or the mark expires).
"""

from __future__ import annotations

import pytest

from pimcore import frames as F
from pimcore.codec import encode_frame
from pimcore.core import BrokerConfig, Limits
from pimcore.errors import ErrorCode
from pimcore.store import direct_conversation

from _harness import Harness, memory_or_lmdb_store, store_driver  # noqa: F401

AB = direct_conversation("alice", "bob")
SECOND = 1_000_000
RL, TMIF, OK = ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_IN_FLIGHT, ErrorCode.OK


@pytest.fixture(autouse=True)
def _every_store_driver(store_driver):
    """Inline store requests and the latency store (out-of-order reads)."""


def _pipeline(h: Harness, conn: int, lids, conv: str = AB) -> None:
    """One read carrying a SendReq for each local id, in order (payload m<lid>)."""
    data = b"".join(encode_frame(F.SendReq(lid, conv, h.now, b"m%d" % lid)) for lid in lids)
    h.feed_bytes(conn, data)


def _codes(h: Harness, conn: int) -> dict[int, ErrorCode]:
    return {a.local_id: ErrorCode(a.code) for a in h.acks(conn)}


def _stored(h: Harness) -> list[bytes]:
    return [m.payload for m in h.store.history(AB, 0, 1000)]


def test_sends_on_the_wire_after_a_rate_limited_one_wait_for_its_retry(store):
    h = Harness(store, BrokerConfig(limits=Limits(send_rate=10.0, send_burst=3)))
    a = h.login("alice", "phone")
    h.take(a)
    _pipeline(h, a, range(1, 9))  # 1..3 take the burst; 4 is refused, and so is all after it
    assert _codes(h, a) == {1: OK, 2: OK, 3: OK, **{k: RL for k in range(4, 9)}}
    # More of the window arrives a little later, the bucket holding a token
    # again: still refused -- 4's retry has not come.
    h.advance(SECOND // 5)  # two tokens
    _pipeline(h, a, range(9, 12))
    assert _codes(h, a) == {9: RL, 10: RL, 11: RL}
    assert a not in h.closed
    assert _stored(h) == [b"m1", b"m2", b"m3"]
    # The client's retry after its hold, in local-id order: 4 clears the mark.
    h.advance(SECOND)  # the bucket is full again (3)
    _pipeline(h, a, range(4, 12))
    assert _codes(h, a) == {4: OK, 5: OK, 6: OK, **{k: RL for k in range(7, 12)}}
    h.advance(SECOND)
    _pipeline(h, a, range(7, 12))
    assert _codes(h, a) == {7: OK, 8: OK, 9: OK, 10: RL, 11: RL}
    h.advance(SECOND)
    _pipeline(h, a, [10, 11])
    assert _codes(h, a) == {10: OK, 11: OK}
    assert a not in h.closed
    # Seq order is local-id order.
    assert _stored(h) == [b"m%d" % k for k in range(1, 12)]


def test_the_sends_held_back_by_a_mark_are_not_strikes(store):
    # rate_limit_strikes=2: counting the refusals after the first as strikes
    # (they are not the client's fault) would close the connection.
    h = Harness(store, BrokerConfig(limits=Limits(send_rate=10.0, send_burst=3), rate_limit_strikes=2))
    a = h.login("alice", "phone")
    h.take(a)
    _pipeline(h, a, range(1, 40))
    assert a not in h.closed
    assert _codes(h, a) == {**{k: OK for k in (1, 2, 3)}, **{k: RL for k in range(4, 40)}}
    # A client that resends nothing but later local ids is still closed in
    # the end: past two windows' worth of them, they count.
    h.advance(SECOND)
    for _ in range(3):
        _pipeline(h, a, range(1000, 1000 + Limits().window))
        if a in h.closed:
            break
    assert a in h.closed


def test_sends_after_a_window_refusal_wait_for_its_retry(store):
    h = Harness(store, BrokerConfig(limits=Limits(window=3)))
    a = h.login("alice", "phone")
    h.take(a)
    h.hold_commits = True
    _pipeline(h, a, range(1, 6))  # 1..3 in flight; 4 and 5 over the window
    h.release()
    h.hold_commits = False
    assert _codes(h, a) == {1: OK, 2: OK, 3: OK, 4: TMIF, 5: TMIF}
    _pipeline(h, a, [6, 7])  # the window is free now, but 4 has not been retried
    assert _codes(h, a) == {6: TMIF, 7: TMIF}
    _pipeline(h, a, range(4, 8))  # the retry, in order (one over the window again)
    assert _codes(h, a) == {4: OK, 5: OK, 6: OK, 7: TMIF}
    _pipeline(h, a, [7])
    assert _codes(h, a) == {7: OK}
    assert _stored(h) == [b"m%d" % k for k in range(1, 8)]


def test_amends_share_the_mark_with_sends(store):
    h = Harness(store, BrokerConfig(limits=Limits(send_rate=10.0, send_burst=2)))
    a = h.login("alice", "phone")
    h.take(a)
    _pipeline(h, a, [1, 2, 3])
    assert _codes(h, a) == {1: OK, 2: OK, 3: RL}
    h.advance(SECOND)
    # An edit of seq 1, with a later local id than the refused send 3.
    h.feed(a, F.AmendReq(4, AB, 1, F.MessageKind.EDIT, h.now, b"edited"))
    assert _codes(h, a) == {4: RL}
    h.feed(a, F.SendReq(3, AB, h.now, b"m3"))
    h.feed(a, F.AmendReq(4, AB, 1, F.MessageKind.EDIT, h.now, b"edited"))
    assert _codes(h, a) == {3: OK, 4: OK}
    # An amend refused for the rate holds back the sends after it.
    _pipeline(h, a, [5])  # the bucket (2) is spent: 3 and 4
    assert _codes(h, a) == {5: RL}
    h.advance(SECOND)
    h.feed(a, F.AmendReq(6, AB, 2, F.MessageKind.RECALL, h.now))
    assert _codes(h, a) == {6: RL}
    _pipeline(h, a, [5])
    h.feed(a, F.AmendReq(6, AB, 2, F.MessageKind.RECALL, h.now))
    assert _codes(h, a) == {5: OK, 6: OK}


def test_an_expired_mark_lets_later_local_ids_through(store):
    """A client that gave up on the refused send (the SDK's send timeout:
    it is never resent) is held back only while the sends already on the
    wire can still arrive -- a few seconds -- not for the SDK's longest hold
    (a review: a send given up after a refusal held the device's next send
    back for 32 s).  A conforming client sends nothing during its hold and
    then the refused one first, so the order does not rest on the mark
    lasting longer."""
    h = Harness(store, BrokerConfig(limits=Limits(send_rate=10.0, send_burst=2)))
    a = h.login("alice", "phone")
    h.take(a)
    _pipeline(h, a, [1, 2, 3, 4])
    assert _codes(h, a) == {1: OK, 2: OK, 3: RL, 4: RL}
    h.advance(SECOND)  # still on the wire: still marked
    _pipeline(h, a, [5])
    assert _codes(h, a) == {5: RL}
    h.advance(5 * SECOND)
    _pipeline(h, a, [5, 6])
    assert _codes(h, a) == {5: OK, 6: OK}
    assert _stored(h) == [b"m1", b"m2", b"m5", b"m6"]


def test_a_send_refused_for_a_failed_content_check_holds_the_later_ones(store):
    """The host could not get the content filter's answer (it failed or
    timed out): the send is refused INTERNAL when read, and the client
    resends it -- after the sends it had on the wire, which were stored first
    (a review: [m2, m1]).  It sets the mark as the other refusals at read do."""
    h = Harness(store, BrokerConfig(content_filter=lambda user, conv, payload: None))
    a = h.login("alice", "phone")
    h.take(a)
    h.hold_hooks = True
    _pipeline(h, a, [1, 2])
    h.hold_hooks = False
    first = h.held_hooks.pop(0)
    h.run(h.broker.content_checked(first.request_id, "filter down", h.now, code=ErrorCode.INTERNAL))
    h.answer_hooks()  # (2's check, if it was asked for: passes)
    assert _codes(h, a) == {1: ErrorCode.INTERNAL, 2: ErrorCode.INTERNAL}
    _pipeline(h, a, [1, 2])  # the client's retries, in order
    h.answer_hooks()
    assert _codes(h, a) == {1: OK, 2: OK}
    assert _stored(h) == [b"m1", b"m2"]


def test_other_connections_and_lower_local_ids_are_not_held(store):
    h = Harness(store, BrokerConfig(limits=Limits(send_rate=10.0, send_burst=2)))
    a = h.login("alice", "phone")
    b = h.login("alice", "laptop")
    h.take(a), h.take(b)
    _pipeline(h, a, [10, 11, 12])
    assert _codes(h, a) == {10: OK, 11: OK, 12: RL}
    _pipeline(h, b, [100])  # another connection has its own bucket and no mark
    assert _codes(h, b) == {100: OK}
    h.advance(SECOND)
    # A lower local id (a retry of an older send) clears the mark, as the
    # refused one's retry does.
    _pipeline(h, a, [5, 12, 13])
    assert _codes(h, a) == {5: OK, 12: OK, 13: RL}


def test_resending_the_refused_send_into_an_empty_bucket_buys_no_new_free_refusals(store):
    # The sends held back by a mark were free up to a window's worth.  A
    # client that resent L into an empty bucket (one strike: L is refused
    # again) re-armed the mark with a fresh free window each time: about 64
    # free refusals per strike, ~1,000 before the close at the default 16
    # strikes.  The free refusals now belong to the refused send, whatever
    # its re-arms: past two windows' worth (what an SDK that halves its
    # window per refusal sends behind it, at most), each counts.
    window = 16
    h = Harness(store, BrokerConfig(limits=Limits(send_rate=10.0, send_burst=3, window=window), rate_limit_strikes=16))
    a = h.login("alice", "phone")
    h.take(a)
    _pipeline(h, a, range(1, 4))  # the burst
    refusals = 0
    for _ in range(40):  # the clock stands: the bucket stays empty
        _pipeline(h, a, range(4, 4 + window))  # L again, and a window behind it
        refusals += sum(1 for c in _codes(h, a).values() if c is RL)
        if a in h.closed:
            break
    assert a in h.closed
    assert refusals <= 4 * window, refusals
    assert _stored(h) == [b"m1", b"m2", b"m3"]
