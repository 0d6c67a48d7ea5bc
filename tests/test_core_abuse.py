"""Abusive clients: whatever a logged-in client sends -- any frame, extreme
field values, garbage bytes -- the broker answers with frames or a close with
a clear code, never raises, and never loses or duplicates acknowledged data."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimcore import frames as F
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
