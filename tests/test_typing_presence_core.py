"""Typing and presence in the sans-IO core (issue 14 part 3), with explicit
time (the harness's clock, advanced by hand): relay to members only, the
TTL, the per-connection rate limit, the bounded fan-out in large groups,
presence subscriptions, changes, hidden last-seen and what is not visible.
Every test runs on both stores and both store drivers (inline, latency)."""

from __future__ import annotations

import pytest

from pimcore import frames as F
from pimcore.core import SECOND, BrokerConfig
from pimcore.errors import ErrorCode
from pimcore.ids import direct_conversation
from pimcore.store import LmdbStore, MemoryStore

from _harness import Harness, store_driver  # noqa: F401

ONLINE, OFFLINE, UNKNOWN = F.PresenceState.ONLINE, F.PresenceState.OFFLINE, F.PresenceState.UNKNOWN


@pytest.fixture(autouse=True)
def _every_store_driver(store_driver):
    return store_driver


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


def harness(store, **cfg) -> Harness:
    return Harness(store, BrokerConfig(**cfg))


def typing(h: Harness, conn: int) -> list[tuple[str, str, bool, int]]:
    return [(f.conv, f.user, f.active, f.ttl_ms) for f in h.take(conn, F.Typing)]


def errors(h: Harness, conn: int) -> list[int]:
    return [f.code for f in h.take(conn, F.Error)]


def sub(h: Harness, conn: int, req_id: int, *users: str) -> F.Presence:
    h.feed(conn, F.PresenceSub(req_id, tuple(F.PresenceUser(u) for u in users)))
    [p] = h.take(conn, F.Presence)
    return p


def states(p: F.Presence) -> list[tuple[str, int, int]]:
    return [(e.user, e.state, e.last_seen) for e in p.entries]


def test_typing_reaches_the_other_members_online_devices_only(store):
    h = harness(store, typing_ttl=5 * SECOND)
    h.create_group("g", ["alice", "bob", "carol"])
    alice, alice2 = h.login("alice", "phone"), h.login("alice", "laptop")
    bob, bob2 = h.login("bob", "phone"), h.login("bob", "laptop")
    dave = h.login("dave", "phone")
    for c in (alice, alice2, bob, bob2, dave):
        h.take(c)
    h.feed(alice, F.Typing("g", True))
    assert typing(h, bob) == typing(h, bob2) == [("g", "alice", True, 5000)]
    assert typing(h, alice) == typing(h, alice2) == typing(h, dave) == []  # not the sender's devices, not a non-member
    h.feed(alice, F.Typing("g", False))
    assert typing(h, bob) == [("g", "alice", False, 0)]
    # a non-member may not send it
    h.feed(dave, F.Typing("g", True))
    assert errors(h, dave) == [ErrorCode.NOT_MEMBER]
    assert typing(h, bob) == []
    # a 1:1 chat needs no store read and no creation
    h.feed(bob, F.Typing("d:alice:bob", True))
    assert typing(h, alice) == typing(h, alice2) == [("d:alice:bob", "bob", True, 5000)]
    h.feed(dave, F.Typing("d:alice:bob", True))
    assert errors(h, dave) == [ErrorCode.NOT_MEMBER]


def test_typing_follows_membership_changes(store):
    h = harness(store)
    h.create_group("g", ["alice", "bob"])
    alice, bob, carol = h.login("alice", "p"), h.login("bob", "p"), h.login("carol", "p")
    h.feed(alice, F.Typing("g", True))  # caches the members
    assert len(typing(h, bob)) == 1 and typing(h, carol) == []
    h.add_members("g", ["carol"])
    h.remove_members("g", ["bob"])
    for c in (alice, bob, carol):
        h.take(c)
    h.advance(SECOND)
    h.feed(alice, F.Typing("g", True))
    assert typing(h, bob) == [] and len(typing(h, carol)) == 1
    h.feed(bob, F.Typing("g", True))
    assert errors(h, bob) == [ErrorCode.NOT_MEMBER]


def test_typing_rate_limit_drops_excess_silently(store):
    h = harness(store, typing_rate=1.0, typing_burst=3)
    h.create_group("g", ["alice", "bob"])
    alice, bob = h.login("alice", "p"), h.login("bob", "p")
    for _ in range(10):
        h.feed(alice, F.Typing("g", True))
    assert len(typing(h, bob)) == 3  # the burst; the rest dropped
    assert h.take(alice) == [] or errors(h, alice) == []  # no error, not closed
    h.advance(2 * SECOND)  # 2 tokens back
    for _ in range(5):
        h.feed(alice, F.Typing("g", True))
    assert len(typing(h, bob)) == 2
    assert h.broker.statistics().connections == 2


def test_typing_is_not_relayed_in_groups_above_the_bound(store):
    h = harness(store, typing_max_members=5)
    members = [f"u{i}" for i in range(8)]
    h.create_group("big", members)
    h.create_group("small", members[:5])
    conns = {u: h.login(u, "p") for u in members}
    for c in conns.values():
        h.take(c)
    h.feed(conns["u0"], F.Typing("big", True))
    assert errors(h, conns["u0"]) == [ErrorCode.TYPING_NOT_RELAYED]
    assert all(typing(h, conns[u]) == [] for u in members)
    frames_before = h.broker.statistics().frames_out
    h.feed(conns["u0"], F.Typing("small", True))
    # fan-out = the other members' online devices, nothing more
    assert h.broker.statistics().frames_out - frames_before == 4
    assert [len(typing(h, conns[u])) for u in members] == [0, 1, 1, 1, 1, 0, 0, 0]


def test_presence_subscribe_answer_and_changes(store):
    h = harness(store)
    h.create_group("g", ["alice", "bob", "carol"])
    alice = h.login("alice", "p")
    bob = h.login("bob", "p")
    p = sub(h, alice, 7, "bob", "carol", "mallory", "alice")
    assert p.req_id == 7 and p.code == ErrorCode.OK
    assert [(u, s) for u, s, _ in states(p)] == [("bob", ONLINE), ("carol", OFFLINE), ("mallory", UNKNOWN), ("alice", ONLINE)]
    h.advance(3 * SECOND)
    h.feed(bob, F.Ping(1))  # heard from bob at this time
    seen = h.now
    h.advance(SECOND)
    h.lose(bob)
    [ch] = h.take(alice, F.Presence)
    assert ch.req_id == 0 and states(ch) == [("bob", OFFLINE, seen)]
    carol = h.login("carol", "p")
    [ch] = h.take(alice, F.Presence)
    assert states(ch) == [("carol", ONLINE, 0)]
    # a second device of carol is no change; nor is a device replaced by itself
    carol2 = h.login("carol", "tablet")
    h.login("carol", "p")
    assert h.take(alice, F.Presence) == []
    h.lose(carol2)
    assert h.take(alice, F.Presence) == []
    # replaced subscription: bob's changes no longer come
    assert states(sub(h, alice, 8, "carol")) == [("carol", ONLINE, 0)]
    h.login("bob", "p")
    assert h.take(alice, F.Presence) == []
    # empty = unsubscribe
    assert sub(h, alice, 9).entries == ()


def test_presence_is_visible_only_to_users_sharing_a_conversation(store):
    h = harness(store)
    h.create_group("g", ["alice", "bob"])
    alice = h.login("alice", "p")
    eve = h.login("eve", "p")
    assert states(sub(h, eve, 1, "alice", "bob")) == [("alice", UNKNOWN, 0), ("bob", UNKNOWN, 0)]
    h.lose(alice)
    assert h.take(eve, F.Presence) == []  # nothing leaks through changes either
    # joining a group with alice makes her visible (re-checked at once) ...
    h.add_members("g", ["eve"])
    [ch] = h.take(eve, F.Presence)
    assert sorted((u, s) for u, s, _ in states(ch)) == [("alice", OFFLINE), ("bob", OFFLINE)]
    # ... and leaving it hides her again
    h.remove_members("g", ["eve"])
    [ch] = h.take(eve, F.Presence)
    assert sorted(states(ch)) == [("alice", UNKNOWN, 0), ("bob", UNKNOWN, 0)]
    h.login("alice", "p")
    assert h.take(eve, F.Presence) == []


def test_presence_subscribed_before_the_first_direct_message_is_told_once_it_exists(store):
    """Two new users subscribe to each other before their 1:1 chat has an
    entry (UNKNOWN: they share nothing yet); the first message makes the
    chat exist, and each is told the other's presence at once, then its
    changes -- a stranger subscribed to them is still told nothing."""
    h = harness(store)
    alice, bob, eve = h.login("alice", "p"), h.login("bob", "p"), h.login("eve", "p")
    assert states(sub(h, alice, 1, "bob")) == [("bob", UNKNOWN, 0)]
    assert states(sub(h, bob, 1, "alice")) == [("alice", UNKNOWN, 0)]
    assert states(sub(h, eve, 1, "alice", "bob")) == [("alice", UNKNOWN, 0), ("bob", UNKNOWN, 0)]
    h.send(alice, direct_conversation("alice", "bob"), b"hi")
    [ch] = h.take(alice, F.Presence)
    assert states(ch) == [("bob", ONLINE, 0)]
    [ch] = h.take(bob, F.Presence)
    assert states(ch) == [("alice", ONLINE, 0)]
    assert h.take(eve, F.Presence) == []
    h.send(alice, direct_conversation("alice", "bob"), b"again")  # no news: told nothing more
    assert h.take(alice, F.Presence) == [] and h.take(bob, F.Presence) == []
    h.lose(bob)
    [ch] = h.take(alice, F.Presence)
    assert [(u, s) for u, s, _ in states(ch)] == [("bob", OFFLINE)]
    bob = h.login("bob", "p")
    [ch] = h.take(alice, F.Presence)
    assert states(ch) == [("bob", ONLINE, 0)]
    assert h.take(eve, F.Presence) == []  # the privacy rule holds for the stranger


def test_a_direct_message_with_someone_else_tells_no_presence(store):
    h = harness(store)
    alice, bob, eve = h.login("alice", "p"), h.login("bob", "p"), h.login("eve", "p")
    assert states(sub(h, eve, 1, "bob")) == [("bob", UNKNOWN, 0)]
    h.send(alice, direct_conversation("alice", "bob"), b"hi")
    h.send(alice, direct_conversation("alice", "eve"), b"hi eve")
    assert h.take(eve, F.Presence) == []
    h.lose(bob)
    assert h.take(eve, F.Presence) == []


def test_presence_subscription_is_bounded(store):
    h = harness(store, presence_max_users=3)
    h.create_group("g", ["alice", "bob"])
    alice = h.login("alice", "p")
    assert states(sub(h, alice, 1, "bob")) == [("bob", OFFLINE, 0)]
    p = sub(h, alice, 2, "a", "b", "c", "d")
    assert p.code == ErrorCode.PRESENCE_LIMIT and p.entries == ()
    bob = h.login("bob", "p")
    [ch] = h.take(alice, F.Presence)  # the refused one left the old subscription in place
    assert states(ch) == [("bob", ONLINE, 0)]
    del bob


def test_hidden_last_seen(store):
    h = harness(store)
    h.create_group("g", ["alice", "bob"])
    alice, bob, bob2 = h.login("alice", "p"), h.login("bob", "p"), h.login("bob", "laptop")
    h.feed(bob, F.PresencePrivacy(0))
    assert h.take(bob, F.PresencePrivacy) == [F.PresencePrivacy(1)]
    h.feed(bob, F.PresencePrivacy(2))
    assert h.take(bob, F.PresencePrivacy) == [F.PresencePrivacy(2)]
    assert h.take(bob2, F.PresencePrivacy) == [F.PresencePrivacy(2)]  # synced to the user's other devices
    assert states(sub(h, alice, 1, "bob")) == [("bob", ONLINE, 0)]
    h.lose(bob)
    h.lose(bob2)
    [ch] = h.take(alice, F.Presence)
    assert states(ch) == [("bob", OFFLINE, 0)]  # offline, but no time
    assert store.hides_last_seen("bob")  # durable
    bob = h.login("bob", "p")
    h.take(alice)
    h.feed(bob, F.PresencePrivacy(1))
    h.lose(bob)
    [ch] = h.take(alice, F.Presence)
    assert ch.entries[0].state == OFFLINE and ch.entries[0].last_seen > 0
    h.feed(alice, F.PresencePrivacy(3))
    assert errors(h, alice) == [ErrorCode.BAD_REQUEST]


def test_ephemeral_state_goes_with_the_connections(store):
    """Nothing of typing or presence outlives the connections that made it
    (but the bounded last-seen memory)."""
    h = harness(store)
    users = [f"u{i}" for i in range(12)]
    h.create_group("g", users)
    conns = [h.login(u, "p") for u in users]
    for i, c in enumerate(conns):
        h.feed(c, F.Typing("g", True))
        sub(h, c, 1, *users[: i + 1], "stranger")
        h.feed(c, F.PresencePrivacy(2 if i % 2 else 1))
    h.remove_members("g", users[:3])  # re-checks in flight too
    for c in conns:
        h.lose(c)
    b = h.broker
    assert not (b._pres_watch or b._pres_hide or b._pres_sub or b._pres_req or b._pres_told or b._pres_latest
                or b._pres_dirty or b._pres_recheck or b._pres_direct or b._pres_direct_of or b._pres_reading or b._pres_recheck_after or b._typing_tokens or b._typing_reads)
    assert set(b._pres_seen) == set(users)
