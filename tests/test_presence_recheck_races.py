"""Review: presence re-checks racing a subscription read still in flight
(an AsyncStore answers reads concurrently with commits: a subscription's
ReadPresence may be answered after a batch that changed its answer has
committed, or after a newer subscription's).  Sans-IO core, reads held by
hand and answered from the store's state when they were asked."""

from __future__ import annotations

import pytest

from pimcore import frames as F
from pimcore.core import BrokerConfig
from pimcore.ids import direct_conversation
from pimcore.store import MemoryStore
from pimcore.store.base import ReadPresence

from _harness import Harness

ONLINE, UNKNOWN = F.PresenceState.ONLINE, F.PresenceState.UNKNOWN


class HeldReads:
    """Presence reads executed against the store when asked (the snapshot
    an async store's read would take) but answered only on release()."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.held: list = []
        self.holding = True
        real = h._execute

        def execute(cmd):
            if self.holding and not cmd.write and any(type(op) is ReadPresence for op in cmd.ops):
                self.held.append((cmd, h.store.execute(cmd)))
                return
            real(cmd)

        h._execute = execute

    def release(self, i: int = 0) -> None:
        cmd, results = self.held.pop(i)
        self.h.run(self.h.broker.store_completed(cmd.request_id, results, self.h.now))


def states(p: F.Presence) -> list[tuple[str, int]]:
    return [(e.user, e.state) for e in p.entries]


@pytest.fixture
def h():
    s = MemoryStore()
    yield Harness(s, BrokerConfig(), driver="inline")
    s.close()


def test_first_direct_message_committed_while_the_subscription_is_read_is_told(h):
    """alice subscribes to bob; while that read is in flight (its snapshot
    from before), bob's first message to alice commits.  The answer says
    UNKNOWN; alice must still be told bob's presence (the chat exists)."""
    alice, bob = h.login("alice", "p"), h.login("bob", "p")
    held = HeldReads(h)
    h.feed(alice, F.PresenceSub(1, (F.PresenceUser("bob"),)))
    assert len(held.held) == 1
    h.send(bob, direct_conversation("alice", "bob"), b"hi")
    held.holding = False
    held.release()
    answer, *changes = h.take(alice, F.Presence)
    assert states(answer) == [("bob", UNKNOWN)]
    # told once the store is asked again: bob is online and shares a chat now
    got = [e for p in changes for e in p.entries]
    assert [(e.user, e.state) for e in got] == [("bob", ONLINE)]


def test_a_recheck_answered_after_a_newer_subscription_does_not_reinstall_the_old_one(h):
    """alice subscribes to bob (UNKNOWN: waits on their 1:1 chat), then to
    carol only.  A message in alice/bob's chat re-checks the old
    subscription while carol's read is in flight; carol's answer comes
    first, the re-check's after it.  alice's subscription must stay
    carol's: the re-check of the replaced one is dropped."""
    h.create_group("g", ["alice", "carol"])
    alice, bob, carol = h.login("alice", "p"), h.login("bob", "p"), h.login("carol", "p")
    h.feed(alice, F.PresenceSub(1, (F.PresenceUser("bob"),)))
    assert states(h.take(alice, F.Presence)[0]) == [("bob", UNKNOWN)]
    held = HeldReads(h)
    h.feed(alice, F.PresenceSub(2, (F.PresenceUser("carol"),)))  # read held
    h.send(bob, direct_conversation("alice", "bob"), b"hi")  # re-check of (bob,): held too
    held.holding = False
    while held.held:  # carol's subscription answered first, then any re-check of the replaced one
        held.release(0)
    frames = h.take(alice, F.Presence)
    assert [states(p) for p in frames if p.req_id == 2] == [[("carol", ONLINE)]]
    # bob going away is none of alice's business now; carol's is
    h.take(alice)
    h.lose(bob)
    assert h.take(alice, F.Presence) == []
    h.lose(carol)
    assert [states(p) for p in h.take(alice, F.Presence)] == [[("carol", F.PresenceState.OFFLINE)]]
    assert h.broker._pres_req[alice] == ("carol",)


@pytest.mark.parametrize("joiner", ["alice", "carol"])
def test_a_group_join_committed_while_the_first_subscription_is_read_is_told(h, joiner):
    """alice's first PresenceSub (carol; they share nothing) is in flight
    when a group join makes them share one -- alice joins carol's group, or
    carol joins alice's.  The answer (a snapshot from before) says UNKNOWN;
    alice must still be told carol's presence.  _membership_changed looked
    only at installed subscriptions (_pres_req), which a first one in
    flight is not yet."""
    h.create_group("g", ["carol"] if joiner == "alice" else ["alice"])
    alice, carol = h.login("alice", "p"), h.login("carol", "p")
    held = HeldReads(h)
    h.feed(alice, F.PresenceSub(1, (F.PresenceUser("carol"),)))
    assert len(held.held) == 1
    h.add_members("g", [joiner])
    held.holding = False
    held.release()
    answer, *changes = h.take(alice, F.Presence)
    assert states(answer) == [("carol", UNKNOWN)]
    got = [e for p in changes for e in p.entries]
    assert [(e.user, e.state) for e in got] == [("carol", ONLINE)]
    # and watched from then on
    h.lose(carol)
    assert [states(p) for p in h.take(alice, F.Presence)] == [[("carol", F.PresenceState.OFFLINE)]]
