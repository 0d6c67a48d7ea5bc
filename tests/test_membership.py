"""Membership has a history (issue 10, item 2): unread counts, pushes,
history, read markers and the readers query follow each member's membership
intervals; membership changes are entries of the conversation.

Every test runs on both stores and both store drivers (inline, latency).
"""

from __future__ import annotations

import pytest

from pimcore import frames as F
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
