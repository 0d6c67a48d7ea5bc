"""Host operations of the core: post (as a user or the system, with an
idempotency key), kick and revoke -- over both stores and both store
drivers, through the public API (Broker methods and their commands)."""

from __future__ import annotations

import pytest

from pimcore import frames as F
from pimcore.core import PostDone
from pimcore.errors import CloseCode, ErrorCode
from pimcore.ids import SYSTEM
from pimcore.store import LmdbStore, MemoryStore, direct_conversation
from pimcore.store.base import LoadSession, Rejected, Revoked

from _harness import T0, Harness, store_driver  # noqa: F401

AB = direct_conversation("alice", "bob")


@pytest.fixture(autouse=True)
def _every_store_driver(store_driver):
    return store_driver


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


@pytest.fixture
def h(store, store_driver):
    return Harness(store, driver=store_driver)


# ---------------------------------------------------------------- post


def test_the_system_posts_anywhere_and_members_receive_it(h):
    h.create_group("team", ["alice", "bob"])
    bob = h.login("bob", "phone")
    done = h.post("team", b"maintenance at 6", key="notice-1")
    assert isinstance(done, PostDone) and done.code is ErrorCode.OK and done.seq == 1
    [m] = h.pushed(bob)
    assert (m.sender, m.device, m.payload, m.seq) == (SYSTEM, SYSTEM, b"maintenance at 6", 1)
    # ...also in a 1:1 chat, which it is not part of.
    assert h.post(AB, b"you are now connected").code is ErrorCode.OK
    assert h.store.unread("bob", "team") == 1
    [loaded] = h.store.read([LoadSession("bob", "phone")])
    assert {c.conv: c.unread for c in loaded.conversations} == {"team": 1, AB: 1}


def test_an_idempotency_key_dedupes_like_a_local_id(h):
    h.create_group("team", ["alice", "bob"])
    first = h.post("team", b"hello", key="k-1")
    again = h.post("team", b"hello", key="k-1")
    assert (again.code, again.msg_id, again.seq, again.server_time) == (ErrorCode.OK, first.msg_id, first.seq, first.server_time)
    assert h.post("team", b"another text", key="k-1").code is ErrorCode.DUPLICATE_CONFLICT
    assert h.post("team", b"hello", key="k-2").seq == 2
    assert h.post("team", b"no key").seq == 3 and h.post("team", b"no key").seq == 4
    assert h.store.last_seq("team") == 4


def test_posts_racing_with_one_key_before_the_commit_are_one_message(h):
    h.create_group("team", ["alice"])
    h.hold_commits = True
    a = h.post("team", b"x", key="race")
    b = h.post("team", b"x", key="race")
    assert a is None and b is None  # both wait for the same batch
    h.release()
    assert h.store.last_seq("team") == 1


def test_a_post_as_a_user_is_checked_like_the_users_own_send(h):
    h.create_group("team", ["alice", "bob"])
    bob = h.login("bob", "phone")
    done = h.post("team", b"from the web app", sender="alice", device="web", key="w1")
    assert done.code is ErrorCode.OK
    [m] = h.pushed(bob)
    assert (m.sender, m.device) == ("alice", "web")
    assert h.post("team", b"x", sender="mallory", device="web").code is ErrorCode.NOT_MEMBER
    assert h.post(AB, b"x", sender="carol", device="web").code is ErrorCode.NOT_MEMBER
    assert h.post("nope", b"x", sender="alice", device="web").code is ErrorCode.UNKNOWN_CONVERSATION
    assert h.post("team", b"x", sender="alice", device="bad device").code is ErrorCode.BAD_REQUEST
    assert h.post("team", b"x", sender=SYSTEM, device="web").code is ErrorCode.BAD_REQUEST
    assert h.post("team", b"x" * (h.broker.config.limits.max_payload + 1)).code is ErrorCode.PAYLOAD_TOO_LARGE
    assert h.post("bad id!", b"x").code is ErrorCode.BAD_REQUEST
    assert h.post("team", b"x", key="").code is ErrorCode.BAD_REQUEST


def test_a_post_shows_after_everything_already_there(h):
    h.create_group("team", ["alice", "bob"])
    alice = h.login("alice", "phone")
    h.send(alice, "team", b"first", client_time=T0 + 10**12)  # a clock far ahead
    h.post("team", b"system note")
    page = h.store.history("team", 0, 10)
    assert [m.after_seq for m in page] == [0, 1]


# ---------------------------------------------------------------- kick


def test_kick_ends_one_device_or_every_device_of_a_user(h):
    phone = h.login("alice", "phone")
    laptop = h.login("alice", "laptop")
    bob = h.login("bob", "phone")
    h.kick("alice", "phone", "support asked")
    assert h.closed[phone].code is CloseCode.KICKED and "support asked" in h.closed[phone].reason
    assert laptop not in h.closed
    h.kick("alice")
    assert h.closed[laptop].code is CloseCode.KICKED and bob not in h.closed
    assert h.broker.online_devices("alice") == [] and h.broker.statistics().kicks == 2


# ---------------------------------------------------------------- revoke


def test_revoke_ends_live_sessions_and_refuses_older_tokens_at_login(h):
    old = h.login("alice", "phone", token=b"issued:100:alice")
    newer = h.login("alice", "laptop", token=b"issued:300:alice")
    res = h.revoke("alice", None, 200)
    assert res == Revoked("alice", "", 200)
    assert h.closed[old].code is CloseCode.TOKEN_REVOKED and newer not in h.closed
    again = h.login("alice", "phone", token=b"issued:100:alice")
    assert h.closed[again].code is CloseCode.TOKEN_REVOKED
    assert not h.take(again, F.LoginAck)
    fresh = h.login("alice", "phone", token=b"issued:250:alice")
    assert fresh not in h.closed and h.take(fresh, F.LoginAck)
    # Tokens without an issue time count as issued at 0.
    bare = h.login("alice", "tablet", token=b"alice")
    assert h.closed[bare].code is CloseCode.TOKEN_REVOKED


def test_a_device_revocation_leaves_the_other_devices_alone(h):
    phone = h.login("alice", "phone", token=b"issued:100:alice/phone")
    laptop = h.login("alice", "laptop", token=b"issued:100:alice/laptop")
    assert h.revoke("alice", "phone", 200) == Revoked("alice", "phone", 200)
    assert h.closed[phone].code is CloseCode.TOKEN_REVOKED and laptop not in h.closed
    other = h.login("alice", "laptop", token=b"issued:100:alice/laptop")
    assert other not in h.closed


def test_a_device_revocation_answers_the_bound_in_force_for_the_device(h):
    """Revoked.before of a device's revocation is what applies to that
    device: the later of the user-wide bound and the device's (it answered
    the device's alone, an earlier time than the one in force)."""
    assert h.revoke("alice", None, 500) == Revoked("alice", "", 500)
    assert h.revoke("alice", "phone", 100) == Revoked("alice", "phone", 500)
    assert h.revoke("alice", "phone", 700) == Revoked("alice", "phone", 700)
    assert h.revoke("alice", "laptop", 600) == Revoked("alice", "laptop", 600)


def test_revocations_are_durable_and_never_move_back(store, store_driver):
    h = Harness(store, driver=store_driver)
    h.revoke("alice", None, 500)
    assert h.revoke("alice", None, 100) == Revoked("alice", "", 500)
    assert store.revoked_before("alice", "phone") == 500
    # A broker restarted on the same store still refuses the old token.
    h2 = Harness(store, driver=store_driver)
    conn = h2.login("alice", "phone", token=b"issued:400:alice")
    assert h2.closed[conn].code is CloseCode.TOKEN_REVOKED


def test_a_login_racing_a_revocation_is_refused(h):
    h.hold_commits = True
    h.revoke("alice", None, 200)  # not durable yet
    conn = h.login("alice", "phone", token=b"issued:100:alice")
    assert h.closed[conn].code is CloseCode.TOKEN_REVOKED
    h.release()


def test_a_malformed_revocation_is_refused_by_the_store(h):
    res = h.revoke("bad user!", None, 10)
    assert isinstance(res, Rejected) and res.code is ErrorCode.BAD_REQUEST


def test_revoking_until_now_ends_every_live_session_whatever_its_token_says_of_its_issue(h):
    # A new user's trial (HIGH): a token from an issuer whose clock runs
    # ahead of the broker's (its iat after the broker's now, within the
    # authenticator's leeway) survived revoke(): its session stayed online
    # and the token logged in again.  A live session's token was issued
    # before now, whatever its iat says: a revocation up to now (or
    # later) ends it, and its bound covers that iat.
    ahead = h.now + 20_000_000
    phone = h.login("alice", "phone", token=b"issued:%d:alice" % ahead)
    laptop = h.login("alice", "laptop", token=b"issued:%d:alice" % (h.now - 5))
    res = h.revoke("alice", None, h.now)
    assert isinstance(res, Revoked) and res.before == ahead + 1
    assert h.closed[phone].code is CloseCode.TOKEN_REVOKED and h.closed[laptop].code is CloseCode.TOKEN_REVOKED
    again = h.login("alice", "phone", token=b"issued:%d:alice" % ahead)
    assert h.closed[again].code is CloseCode.TOKEN_REVOKED
    # A token issued after that is taken.
    fresh = h.login("alice", "phone", token=b"issued:%d:alice" % (ahead + 2))
    assert fresh not in h.closed
    # A bound in the past is the host's choice: sessions of later tokens stay.
    tablet = h.login("bob", "tablet", token=b"issued:%d:bob" % ahead)
    assert h.revoke("bob", None, h.now - 1_000_000) == Revoked("bob", "", h.now - 1_000_000)
    assert tablet not in h.closed


def test_purging_a_user_refuses_the_tokens_of_their_live_sessions_whatever_their_issue_time(h):
    # The same trial: after purge_user, the token of a session it ended
    # (its iat ahead of the broker's now) logged in again as the purged user.
    ahead = h.now + 20_000_000
    phone = h.login("alice", "phone", token=b"issued:%d:alice" % ahead)
    h.host_call(h.broker.purge_user, "alice")
    assert h.closed[phone].code is CloseCode.KICKED
    again = h.login("alice", "phone", token=b"issued:%d:alice" % ahead)
    assert h.closed[again].code is CloseCode.TOKEN_REVOKED


def test_a_revocation_from_another_node_ends_the_sessions_here_whatever_their_token_says_of_its_issue(h, store):
    # A new user's trial (HIGH): over a Redis cluster, revoke through node A
    # left a session on node B open whose token's iat was ahead of the
    # clocks (and the token logged in again on both).  B ends every live
    # session that opened before the revocation's bound, raises the bound
    # over their iat, and stores it.
    ahead = h.now + 4_000_000
    phone = h.login("alice", "phone", token=b"issued:%d:alice" % ahead)
    later = h.now + 1
    h.run(h.broker.revoked_elsewhere("alice", None, h.now, later))
    assert h.closed[phone].code is CloseCode.TOKEN_REVOKED
    assert store.revoked_before("alice", "phone") == ahead + 1  # (durable: a restart of this node keeps it)
    again = h.login("alice", "phone", token=b"issued:%d:alice" % ahead)
    assert h.closed[again].code is CloseCode.TOKEN_REVOKED
