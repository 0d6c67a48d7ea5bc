"""Abusive clients: whatever a logged-in client sends -- any frame, extreme
field values, garbage bytes -- the broker answers with frames or a close with
a clear code, never raises, and never loses or duplicates acknowledged data."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimcore import frames as F
from pimcore.codec import encode_frame
from pimcore.core import BrokerConfig, CloseConnection, Limits
from pimcore.errors import CloseCode, ErrorCode
from pimcore.store import LmdbStore, MemoryStore, direct_conversation

from _harness import Harness, store_driver  # noqa: F401

U64 = st.integers(0, 2**64 - 1)
S64 = st.integers(-(2**63), 2**63 - 1)
AB = direct_conversation("alice", "bob")
convs = st.one_of(
    st.sampled_from([AB, "team", "d:alice:mallory", "d:bob:alice", "ghost", "", "d:", "d::", "x" * 200]),
    st.text(max_size=8),
)
payloads = st.one_of(st.binary(max_size=64), st.just(b"x" * (Limits().max_payload + 1)))

client_frames = st.one_of(
    st.builds(F.SendReq, local_id=U64, conv=convs, client_time=S64, payload=payloads),
    st.builds(F.PushAck, position=U64),
    st.builds(F.Read, conv=convs, seq=U64),
    st.builds(F.HistoryReq, req_id=U64, conv=convs, from_seq=U64, limit=U64, backward=st.booleans()),
    st.builds(F.CalibrateReq, client_time=S64),
    st.builds(F.Ping, nonce=U64),
    st.builds(F.Pong, nonce=U64),
    st.builds(F.Login, token=st.binary(max_size=8), device=st.text(max_size=8), client_time=S64, position=U64, caps=U64),
    st.builds(F.SendAck, local_id=U64, code=U64, msg_id=st.binary(max_size=16), seq=U64, server_time=U64),
    st.builds(F.Error, code=U64, ref=U64, reason=st.text(max_size=8)),
    st.builds(F.Close, code=U64, reason=st.text(max_size=8)),
    st.builds(F.SendReq, local_id=U64, conv=convs, client_time=S64, payload=payloads, after_seq=U64,
              mentions=st.lists(st.builds(F.Mention, user=st.text(max_size=6)), max_size=70).map(tuple),
              mention_all=st.booleans()),
    st.builds(F.ConvListReq, req_id=U64, cursor=st.binary(max_size=16), limit=U64, include_hidden=st.booleans()),
    st.builds(F.ConvSetReq, req_id=U64, conv=convs, pinned=st.integers(0, 3), muted=st.integers(0, 3), hidden=U64),
)



@pytest.fixture(autouse=True)
def _every_store_driver(store_driver):
    """Every test here runs with store requests inline, and again through the
    latency store (the async contract; reads complete out of order)."""
    return store_driver

def _check_acked_data(h: Harness, acked: dict) -> None:
    for conv in (AB, "team"):
        hist = h.store.history(conv, 0, 100_000)
        assert [m.seq for m in hist] == list(range(1, len(hist) + 1))
    for (conv, local_id), ack in acked.items():
        hist = h.store.history(conv, ack.seq - 1, 1)
        assert hist and hist[0].msg_id == ack.msg_id and hist[0].local_id == local_id


@pytest.mark.parametrize("backend_store", ["memory", "lmdb"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(script=st.lists(client_frames, max_size=25), garbage=st.binary(max_size=40))
def test_abusive_client_cannot_crash_the_broker_or_lose_acked_data(tmp_path_factory, backend_store, script, garbage):
    store = MemoryStore() if backend_store == "memory" else LmdbStore(str(tmp_path_factory.mktemp("db")), durability="os")
    try:
        h = Harness(store, BrokerConfig(limits=Limits(window=8)))
        h.create_group("team", ["alice", "bob", "mallory"])
        alice = h.login("alice", "phone")
        mallory = h.login("mallory", "laptop")
        acked = {}
        for k in range(3):  # some acknowledged history the attacker must not disturb
            lid = h.send(alice, "team" if k % 2 else AB, b"keep %d" % k)
            [ack] = h.acks(alice)
            assert ack.code == ErrorCode.OK
            acked[("team" if k % 2 else AB, lid)] = ack

        for frame in script:
            if mallory in h.closed:
                break
            h.feed(mallory, frame)
            h.now += 1
        if mallory not in h.closed:
            h.feed_bytes(mallory, garbage)

        # Every answer was a well-formed frame or a close with a known code.
        for f in h.frames[mallory]:
            assert type(f).__name__ in {"LoginAck", "SendAck", "Push", "ReadStates", "ReadReceipt", "HistoryResp", "CalibrateResp", "Pong", "Error",
                                        "ConvListResp", "ConvSetResp", "ConvUpdate"}
            if isinstance(f, F.SendAck):
                assert f.code in {c.value for c in ErrorCode}
        if mallory in h.closed:
            assert isinstance(h.closed[mallory], CloseConnection) and isinstance(h.closed[mallory].code, CloseCode)
            assert h.closed[mallory].reason

        # The honest user is unaffected and acked data is intact.
        assert alice not in h.closed
        lid = h.send(alice, AB, b"after the attack")
        [ack] = h.acks(alice)
        assert ack.code == ErrorCode.OK
        acked[(AB, lid)] = ack
        _check_acked_data(h, acked)
    finally:
        store.close()


@pytest.mark.parametrize("backend_store", ["memory", "lmdb"])
def test_refusals_held_behind_sends_in_flight_are_bounded_then_the_client_is_paused(tmp_path, backend_store):
    """A refusal waits for the SendAcks its connection owes for earlier
    sends (they come in SendReq order).  A client that keeps sending what
    gets refused meanwhile does not make the broker hold answers without
    bound: at ``window`` held, nothing more of it is decoded, its bytes
    wait in the session, and past 256 KiB the host is told to stop
    reading it -- until the sends it waits for are acked.  Then every
    SendReq gets its one SendAck, in order.  (control_rate 0: the control
    bucket, which would close it first, is not what bounds this.)"""
    store = MemoryStore() if backend_store == "memory" else LmdbStore(str(tmp_path / "db"), durability="os")
    try:
        h = Harness(store, BrokerConfig(limits=Limits(window=2), control_rate=0))
        a = h.login("alice", "phone")
        h.take(a)
        h.hold_commits = True
        sent = [h.send(a, AB, b"in flight")]
        for lid in (2, 3):  # refused behind it: 2 held, the window's worth
            h.feed(a, F.SendReq(lid, direct_conversation("bob", "carol"), h.now, b"x"))
            sent.append(lid)
        sent.append(h.send(a, AB, b"not decoded yet", local_id=4))
        assert h.take(a) == [] and h.broker.statistics().pending_ops == 0 and a not in h.paused
        chunk = b"".join(encode_frame(F.SendReq(100 + i, AB, h.now, bytes([i % 256]) * 1500)) for i in range(200))
        h.feed_bytes(a, chunk)  # ~300 KiB
        sent += range(100, 300)
        assert a in h.paused and h.broker.statistics().pending_ops == 0
        h.hold_commits = False
        h.release()
        assert a not in h.paused and a not in h.closed
        answers = h.acks(a)
        assert [x.local_id for x in answers] == sent
        assert answers[0].code == answers[3].code == ErrorCode.OK
        assert {ErrorCode(x.code) for x in answers[1:3]} == {ErrorCode.NOT_MEMBER}
        assert {ErrorCode(x.code) for x in answers[4:]} <= {ErrorCode.OK, ErrorCode.TOO_MANY_IN_FLIGHT}
    finally:
        store.close()
