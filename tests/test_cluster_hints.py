"""The core's cluster-hint entry points (sans-IO, no Redis): what another
node sharing the store tells this one after it committed a read marker, a
receipt, a revocation or conversation settings.  The other node is played
by calling the entry points directly (and, where the hint path reads the
store, by writing the change to the store first, as that node did).  Hints
are wake-ups: repeated, stale or unknown-user hints change nothing."""

from __future__ import annotations

import pytest

from pimcore import frames as F
from pimcore.errors import CloseCode
from pimcore.store import direct_conversation
from pimcore.store.base import ConversationSet, SetConversation, WriteBatch

from _harness import Harness, memory_or_lmdb_store, store_driver  # noqa: F401

AB = direct_conversation("alice", "bob")


@pytest.fixture(autouse=True)
def _every_store_driver(store_driver):
    return store_driver


@pytest.fixture
def h(store, store_driver):
    return Harness(store, driver=store_driver)


def _three_to_bob(h):
    alice = h.login("alice", "phone")
    for k in range(3):
        h.send(alice, AB, b"m%d" % k)
    return alice


def test_a_marker_hint_reaches_every_device_of_the_reader_once(h):
    _three_to_bob(h)
    phone, laptop = h.login("bob", "phone"), h.login("bob", "laptop")
    h.take(phone), h.take(laptop)
    h.run(h.broker.read_elsewhere("bob", AB, 2, 3, 1, h.now))
    for conn in (phone, laptop):
        assert [f.entries for f in h.take(conn, F.ReadStates)] == [(F.ReadState(AB, 2, 3, 1),)]
        # ...and the conversation entry, read from the store (as for a Read
        # here; the other node stored nothing in this store, so its marker is 0).
        [update] = h.take(conn, F.ConvUpdate)
        assert update.entries[0].conv == AB
    # Repeated, then stale: nothing.  A newer marker goes out.
    h.run(h.broker.read_elsewhere("bob", AB, 2, 3, 1, h.now))
    h.run(h.broker.read_elsewhere("bob", AB, 1, 3, 2, h.now))
    assert h.take(phone, F.ReadStates) == [] and h.take(laptop, F.ReadStates) == []
    h.run(h.broker.read_elsewhere("bob", AB, 3, 3, 0, h.now))
    assert [f.entries for f in h.take(laptop, F.ReadStates)] == [(F.ReadState(AB, 3, 3, 0),)]


def test_a_marker_hint_at_or_below_a_read_committed_here_is_stale(h):
    _three_to_bob(h)
    phone, laptop = h.login("bob", "phone"), h.login("bob", "laptop")
    h.take(phone), h.take(laptop)
    h.feed(phone, F.Read(AB, 3))
    assert h.take(laptop, F.ReadStates)[0].entries == (F.ReadState(AB, 3, 3, 0),)
    assert h.take(phone, F.ReadStates)[0].entries == (F.ReadState(AB, 3, 3, 0),)
    # A hint of an older read on another node, late: the marker never moves back.
    h.run(h.broker.read_elsewhere("bob", AB, 2, 3, 1, h.now))
    assert h.take(laptop, F.ReadStates) == [] and h.take(phone, F.ReadStates) == []


def test_hints_for_a_user_with_no_device_here_do_nothing(h):
    alice = _three_to_bob(h)
    h.take(alice)
    h.run(h.broker.read_elsewhere("bob", AB, 2, 3, 1, h.now))
    h.run(h.broker.receipt_elsewhere("carol", AB, "bob", 2, h.now))
    h.run(h.broker.conversation_changed("bob", AB, h.now))
    h.run(h.broker.revoked_elsewhere("bob", None, h.now, h.now))
    assert h.take(alice) == []
    # bob logs in later: the login reads his state from the store (nothing
    # remembered from the hint would make a later hint look stale).
    phone = h.login("bob", "phone", token=b"issued:%d:bob" % (h.now + 1))  # after the revocation
    assert phone not in h.closed
    h.take(phone)
    h.run(h.broker.read_elsewhere("bob", AB, 1, 3, 2, h.now))
    assert [f.entries for f in h.take(phone, F.ReadStates)] == [(F.ReadState(AB, 1, 3, 2),)]


def test_a_receipt_hint_reaches_the_peer_once_and_only_for_their_1to1_chat(h):
    h.create_group("team", ["alice", "bob"])
    alice = _three_to_bob(h)
    tablet = h.login("alice", "tablet")
    h.take(alice), h.take(tablet)
    h.run(h.broker.receipt_elsewhere("alice", AB, "bob", 2, h.now))
    assert h.take(alice, F.ReadReceipt) == [F.ReadReceipt(AB, "bob", 2)]
    assert h.take(tablet, F.ReadReceipt) == [F.ReadReceipt(AB, "bob", 2)]
    h.run(h.broker.receipt_elsewhere("alice", AB, "bob", 2, h.now))  # repeated
    h.run(h.broker.receipt_elsewhere("alice", AB, "bob", 1, h.now))  # stale
    h.run(h.broker.receipt_elsewhere("alice", "team", "bob", 5, h.now))  # no receipts in groups
    h.run(h.broker.receipt_elsewhere("alice", AB, "carol", 5, h.now))  # not her peer there
    h.run(h.broker.receipt_elsewhere("alice", AB, "alice", 5, h.now))  # not her own
    assert h.take(alice) == [] and h.take(tablet) == []
    h.run(h.broker.receipt_elsewhere("alice", AB, "bob", 3, h.now))
    assert h.take(alice, F.ReadReceipt) == [F.ReadReceipt(AB, "bob", 3)]


def test_a_revocation_hint_ends_the_sessions_that_used_an_older_token(h):
    old = h.login("alice", "phone", token=b"issued:100:alice")
    newer = h.login("alice", "laptop", token=b"issued:300:alice")
    other = h.login("alice", "tablet", token=b"issued:100:alice")
    h.run(h.broker.revoked_elsewhere("alice", "phone", 200, h.now))
    assert h.closed[old].code is CloseCode.TOKEN_REVOKED
    assert newer not in h.closed and other not in h.closed
    h.run(h.broker.revoked_elsewhere("alice", None, 200, h.now))
    assert h.closed[other].code is CloseCode.TOKEN_REVOKED and newer not in h.closed
    # In force here at once: a login with an older token that races the
    # store write (this store never had it) is refused too.
    again = h.login("alice", "watch", token=b"issued:150:alice")
    assert h.closed[again].code is CloseCode.TOKEN_REVOKED


def test_a_settings_hint_sends_the_entry_as_the_store_has_it(h):
    _three_to_bob(h)
    phone = h.login("bob", "phone")
    h.take(phone)
    # The other node stored bob's new settings...
    (res,) = h.store.commit(WriteBatch(1, (SetConversation("bob", AB, F.SETTING_ON, F.SETTING_ON, 0),)))
    assert isinstance(res, ConversationSet) and res.changed
    h.run(h.broker.conversation_changed("bob", AB, h.now))
    [update] = h.take(phone, F.ConvUpdate)
    (entry,) = update.entries
    assert (entry.conv, entry.pinned, entry.muted) == (AB, True, True)
