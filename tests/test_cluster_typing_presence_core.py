"""Typing and presence across nodes in the sans-IO core (issue 16), no
Redis: a Typing relayed here is handed on for the other nodes
(TypingElsewhere, only when the store is shared); a typing hint from
another node reaches the recipients' devices here with what is left of its
TTL; presence hints and periodic re-checks from the store (which nodes have
a user online) make a watched user online while any node has them,
offline with a last-seen time (or none, if hidden) when the last one goes.
The other nodes are played by calling the entry points directly.  Every
test runs on both stores and both store drivers."""

from __future__ import annotations

import pytest

from pimcore import frames as F
from pimcore.core import SECOND, BrokerConfig, TypingElsewhere
from pimcore.errors import ErrorCode
from pimcore.store import direct_conversation
from pimcore.store.base import SetPresencePrivacy, WriteBatch

from _harness import Harness, memory_or_lmdb_store, store_driver  # noqa: F401

ONLINE, OFFLINE, UNKNOWN = F.PresenceState.ONLINE, F.PresenceState.OFFLINE, F.PresenceState.UNKNOWN
AB = direct_conversation("alice", "bob")


@pytest.fixture(autouse=True)
def _every_store_driver(store_driver):
    return store_driver


def shared(store, **cfg) -> Harness:
    """A core told that other nodes share its store (as BrokerServer does
    over a RedisStore)."""
    h = Harness(store, BrokerConfig(**cfg))
    h.broker.relay_elsewhere = True
    return h


def typing(h: Harness, conn: int) -> list[tuple[str, str, bool, int]]:
    return [(f.conv, f.user, f.active, f.ttl_ms) for f in h.take(conn, F.Typing)]


def sub(h: Harness, conn: int, req_id: int, *users: str) -> list[tuple[str, int, int]]:
    h.feed(conn, F.PresenceSub(req_id, tuple(F.PresenceUser(u) for u in users)))
    [p] = h.take(conn, F.Presence)
    return states(p)


def states(p: F.Presence) -> list[tuple[str, int, int]]:
    return [(e.user, e.state, e.last_seen) for e in p.entries]


def changes(h: Harness, conn: int) -> list[tuple[str, int, int]]:
    return [s for p in h.take(conn, F.Presence) for s in states(p)]


def test_a_typing_relayed_here_is_handed_on_for_the_other_nodes(store):
    h = shared(store)
    h.create_group("g", ["alice", "bob", "carol"])
    alice, dave = h.login("alice", "p"), h.login("dave", "p")
    h.feed(alice, F.Typing("g", True))
    h.feed(alice, F.Typing(AB, False))
    assert h.elsewhere == [TypingElsewhere("alice", "g", True, ("bob", "carol"), h.now),
                           TypingElsewhere("alice", AB, False, ("bob",), h.now)]
    # A refused Typing goes nowhere, here or elsewhere.
    h.elsewhere.clear()
    h.feed(dave, F.Typing("g", True))
    assert [f.code for f in h.take(dave, F.Error)] == [ErrorCode.NOT_MEMBER] and h.elsewhere == []
    # One node alone (the default): nothing is handed on.
    h.broker.relay_elsewhere = False
    h.feed(alice, F.Typing("g", True))
    assert h.elsewhere == []


def test_a_typing_hint_reaches_the_recipients_devices_here_with_the_rest_of_its_ttl(store):
    h = shared(store, typing_ttl=5 * SECOND)
    bob, bob2, carol, alice = h.login("bob", "phone"), h.login("bob", "laptop"), h.login("carol", "p"), h.login("alice", "p")
    for c in (bob, bob2, carol, alice):
        h.take(c)
    h.run(h.broker.typing_elsewhere("alice", "g", True, ("bob", "alice"), h.now, h.now))
    assert typing(h, bob) == typing(h, bob2) == [("g", "alice", True, 5000)]
    assert typing(h, carol) == typing(h, alice) == []  # not named; never the sender's own devices
    # Late (the hint waited 2 s): only what is left of the TTL; expired: nothing.
    h.run(h.broker.typing_elsewhere("alice", "g", True, ("bob",), h.now - 2 * SECOND, h.now))
    assert typing(h, bob) == [("g", "alice", True, 3000)]
    h.run(h.broker.typing_elsewhere("alice", "g", True, ("bob",), h.now - 5 * SECOND, h.now))
    h.run(h.broker.typing_elsewhere("alice", "g", False, ("bob",), h.now - 6 * SECOND, h.now))
    assert typing(h, bob) == []
    # A node whose clock is ahead cannot stretch the TTL.
    h.run(h.broker.typing_elsewhere("alice", "g", True, ("bob",), h.now + 60 * SECOND, h.now))
    assert typing(h, bob) == [("g", "alice", True, 5000)]
    h.run(h.broker.typing_elsewhere("alice", "g", False, ("bob",), h.now, h.now))
    assert typing(h, bob) == [("g", "alice", False, 0)]
    # A 1:1 chat is only ever between its two users.
    h.run(h.broker.typing_elsewhere("dave", AB, True, ("bob",), h.now, h.now))
    h.run(h.broker.typing_elsewhere("alice", AB, True, ("carol", "bob"), h.now, h.now))
    assert typing(h, carol) == [] and typing(h, bob) == [(AB, "alice", True, 5000)]


def test_presence_hints_make_a_watched_user_online_while_any_node_has_them(store):
    h = shared(store)
    h.create_group("g", ["alice", "bob"])
    alice = h.login("alice", "p")
    assert sub(h, alice, 1, "bob") == [("bob", OFFLINE, 0)]
    h.run(h.broker.presence_elsewhere("bob", "n2", True, h.now, h.now))
    assert changes(h, alice) == [("bob", ONLINE, 0)]
    assert h.broker.presence("bob") == (True, 0)
    h.run(h.broker.presence_elsewhere("bob", "n3", True, h.now, h.now))
    assert changes(h, alice) == []  # online already
    # A device of bob here comes and goes: he stays online (elsewhere).
    bob = h.login("bob", "p")
    h.lose(bob)
    h.run(h.broker.presence_elsewhere("bob", "n2", False, h.now, h.now))
    assert changes(h, alice) == []
    h.advance(SECOND)
    gone = h.now - 10
    h.run(h.broker.presence_elsewhere("bob", "n3", False, gone, h.now))
    assert changes(h, alice) == [("bob", OFFLINE, gone)]
    assert h.broker.presence("bob") == (False, gone)
    # Repeated: nothing more.  A new subscription has the same answer.
    h.run(h.broker.presence_elsewhere("bob", "n3", False, gone, h.now))
    assert changes(h, alice) == []
    assert sub(h, alice, 2, "bob") == [("bob", OFFLINE, gone)]


def test_presence_hints_honour_hidden_last_seen_and_visibility(store):
    h = shared(store)
    h.create_group("g", ["alice", "bob"])
    (res,) = h.store.commit(WriteBatch(1, (SetPresencePrivacy("bob", True),)))  # as bob's node did
    alice, eve = h.login("alice", "p"), h.login("eve", "p")
    assert sub(h, alice, 1, "bob") == [("bob", OFFLINE, 0)]
    assert sub(h, eve, 1, "bob") == [("bob", UNKNOWN, 0)]  # shares nothing with bob
    h.run(h.broker.presence_elsewhere("bob", "n2", True, h.now, h.now))
    assert changes(h, alice) == [("bob", ONLINE, 0)] and changes(h, eve) == []
    h.run(h.broker.presence_elsewhere("bob", "n2", False, h.now, h.now))
    assert changes(h, alice) == [("bob", OFFLINE, 0)] and changes(h, eve) == []
    # Hints about users nobody here watches are dropped, not kept.
    h.run(h.broker.presence_elsewhere("carol", "n2", True, h.now, h.now))
    assert h.broker.presence("carol") == (False, 0)
    assert h.broker.presence_watched() == ["bob"]


def test_a_periodic_check_corrects_lost_hints_and_dead_nodes(store):
    h = shared(store)
    h.create_group("g", ["alice", "bob", "carol"])
    alice = h.login("alice", "p")
    assert sub(h, alice, 1, "bob", "carol") == [("bob", OFFLINE, 0), ("carol", OFFLINE, 0)]
    assert sorted(h.broker.presence_watched()) == ["bob", "carol"]
    # bob's "online" hint was lost: the check finds him on n2.
    h.run(h.broker.presence_checked({"bob": frozenset({"n2"}), "carol": frozenset(), "mallory": frozenset({"n2"})}, h.now, h.now))
    assert changes(h, alice) == [("bob", ONLINE, 0)]
    # n2 died without a word: the next check no longer counts it.
    h.advance(SECOND)
    h.run(h.broker.presence_checked({"bob": frozenset(), "carol": frozenset()}, h.now, h.now))
    assert changes(h, alice) == [("bob", OFFLINE, h.now)]
    # A user online here stays online whatever the others say.
    carol = h.login("carol", "p")
    assert changes(h, alice) == [("carol", ONLINE, 0)]
    h.run(h.broker.presence_checked({"carol": frozenset()}, h.now, h.now))
    assert changes(h, alice) == []
    del carol
    # A hint that came while a check was reading wins over the check's
    # older answer; the next check counts again.
    asked = h.now
    h.advance(1000)
    h.run(h.broker.presence_elsewhere("bob", "n3", True, h.now, h.now))
    assert changes(h, alice) == [("bob", ONLINE, 0)]
    h.run(h.broker.presence_checked({"bob": frozenset()}, asked, h.now))
    assert changes(h, alice) == []
    h.advance(SECOND)
    h.run(h.broker.presence_checked({"bob": frozenset()}, h.now, h.now))
    assert changes(h, alice) == [("bob", OFFLINE, h.now)]


def test_a_privacy_hint_reaches_the_users_devices_and_the_watchers_here(store):
    h = shared(store)
    h.create_group("g", ["alice", "bob"])
    alice, bob = h.login("alice", "p"), h.login("bob", "phone")
    assert sub(h, alice, 1, "bob") == [("bob", ONLINE, 0)]
    h.take(bob)
    # bob hid his last-seen time on another node: his device here hears it
    # (settings screens in sync); while he is online, watchers see no change.
    h.run(h.broker.privacy_elsewhere("bob", True, h.now))
    assert h.take(bob, F.PresencePrivacy) == [F.PresencePrivacy(2)]
    assert changes(h, alice) == []
    h.lose(bob)
    assert changes(h, alice) == [("bob", OFFLINE, 0)]
    # Shown again while offline: the watchers get the time back at once.
    h.run(h.broker.privacy_elsewhere("bob", False, h.now))
    assert changes(h, alice) == [("bob", OFFLINE, h.now)]


def test_nodes_found_dead_take_their_users_offline(store):
    h = shared(store)
    h.create_group("g", ["alice", "bob", "carol"])
    alice = h.login("alice", "p")
    sub(h, alice, 1, "bob", "carol")
    h.run(h.broker.presence_elsewhere("bob", "n2", True, h.now, h.now))
    h.run(h.broker.presence_elsewhere("carol", "n2", True, h.now, h.now))
    h.run(h.broker.presence_elsewhere("carol", "n3", True, h.now, h.now))
    assert sorted(changes(h, alice)) == [("bob", ONLINE, 0), ("carol", ONLINE, 0)]
    assert h.broker.presence_nodes() == {"n2", "n3"}
    h.advance(SECOND)
    h.run(h.broker.presence_nodes_gone({"n2", "n9"}, h.now))
    assert changes(h, alice) == [("bob", OFFLINE, h.now)]  # carol is still on n3
    assert h.broker.presence_nodes() == {"n3"}
    # Unsubscribed: nothing is kept about anyone.
    sub(h, alice, 2)
    assert h.broker.presence_nodes() == set() and h.broker.presence_watched() == []


def test_membership_changed_on_another_node_reaches_typing_within_seconds(store):
    from pimcore.store.base import AddMembers, RemoveMembers

    h = shared(store)
    h.create_group("g", ["alice", "bob"])
    alice = h.login("alice", "p")
    h.feed(alice, F.Typing("g", True))  # caches the members
    assert h.elsewhere[-1].recipients == ("bob",)
    # Another node adds carol and removes bob: nothing of it passes here.
    h.store.commit(WriteBatch(1, (AddMembers("g", ("carol",), h.now), RemoveMembers("g", ("bob",), h.now))))
    h.advance(3 * SECOND)
    h.feed(alice, F.Typing("g", True))
    assert h.elsewhere[-1].recipients == ("carol",)


def test_a_typing_hint_after_a_message_still_on_its_way_waits_for_the_push(store):
    """alice (on another node) sends, then types again: the inbox hint of
    her message comes first, the typing hint second, but the message is
    pushed only after an inbox read -- it would end the indicator that came
    after it.  The Typing waits for that push (PROTOCOL.md: a message ends
    the indicators before it, not after)."""
    h = shared(store, typing_ttl=5 * SECOND)
    other = shared(store)  # another node over the same store
    bob = h.login("bob", "phone")
    alice = other.login("alice", "p")
    h.take(bob)
    other.send(alice, AB, b"hi")
    head = store.inbox_head("bob")
    read = h.broker.inbox_advanced("bob", head, h.now)  # its inbox read not answered yet
    h.run(h.broker.typing_elsewhere("alice", AB, True, ("bob",), h.now, h.now))
    assert typing(h, bob) == []
    h.run(read)
    got = h.take(bob)
    assert [type(f).__name__ for f in got] == ["Push", "Typing"]
    assert got[0].messages[0].payload == b"hi" and (got[1].user, got[1].active) == ("alice", True)
    # Caught up: the next one goes at once.
    h.run(h.broker.typing_elsewhere("alice", AB, False, ("bob",), h.now, h.now))
    assert typing(h, bob) == [(AB, "alice", False, 0)]
