"""History retention and purges: the store contract (every backend; the
model in tests/test_store.py also drives these ops against the memory
oracle).  The public surfaces (embedding API, HTTP, CLI, SDK over a live
broker) are tested in tests/test_retention_api.py."""

from __future__ import annotations

import pytest

from pimcore.errors import ErrorCode
from pimcore.frames import MessageKind
from pimcore.store import (
    AckPosition,
    Appended,
    Duplicate,
    Expire,
    Expired,
    LoadSession,
    MarkRead,
    PurgeConversation,
    PurgeUser,
    Purged,
    ReadHistory,
    Reclaim,
    Reclaimed,
    Rejected,
    RetentionSet,
    RetentionState,
    SetRetention,
    Store,
    TouchDevice,
    direct_conversation,
)

from test_store import AB, DAY, Maker, inbox_ids, mk, store  # noqa: F401  (fixtures)


def send(store: Store, mk: Maker, n: int, conv: str = AB, sender: str = "alice") -> list:
    ops = [mk(conv, sender, payload=b"m%d" % i) for i in range(n)]
    results = mk.commit(store, *ops)
    assert all(isinstance(r, Appended) for r in results)
    return ops


def seqs(page: list) -> list[int]:
    return [m.seq for m in page]


def test_count_retention_removes_a_prefix_with_its_inbox_entries_and_dedupe(store: Store, mk: Maker) -> None:
    ops = send(store, mk, 10)
    assert mk.commit(store, SetRetention(AB, -1, 3)) == (RetentionSet(AB, -1, 3),)
    assert store.retention(AB).floor == 0  # applied by the next Expire only
    [res] = mk.commit(store, Expire(mk.time))
    assert res == Expired(1, 7, 14, (AB,))  # 7 messages, in alice's and bob's inbox
    assert seqs(store.history(AB, 0, 100)) == [8, 9, 10]
    assert seqs(store.history(AB, 0, 100, backward=True)) == [10, 9, 8]
    assert seqs(store.history(AB, 2, 2)) == [8, 9]
    assert store.last_seq(AB) == 10
    assert store.retention(AB) == RetentionState(AB, -1, 3, 7)
    assert [p for p, _ in inbox_ids(store, "bob")] == [8, 9, 10]  # positions are not reused
    assert store.inbox_range("bob", 0, 2)[0][0] == 8  # a page skips the holes
    assert store.message(ops[0].msg_id) is None
    # Dedupe records expire with their messages, never before.
    assert not store.deduped("alice", "phone", ops[6].local_id)
    assert store.deduped("alice", "phone", ops[7].local_id)
    [dup] = mk.commit(store, ops[8])
    assert dup == Duplicate(ops[8].msg_id, 9, ops[8].server_time)
    again = mk(AB, "alice", local_id=ops[0].local_id, payload=ops[0].payload)
    [fresh] = mk.commit(store, again)
    assert isinstance(fresh, Appended) and fresh.seq == 11  # its original is gone: a new message
    assert store.unread("bob", AB) == 4
    # Idempotent: nothing more to remove.
    assert mk.commit(store, Expire(mk.time)) == (Expired(1, 1, 2, (AB,)),)  # 11 messages -> keep 3
    assert mk.commit(store, Expire(mk.time)) == (Expired(0, 0, 0),)


def test_retention_keeps_what_is_younger_than_keep_so_a_retry_is_still_a_duplicate(store: Store, mk: Maker) -> None:
    # A new operator's trial (MEDIUM): under history_max_count = 150 a busy
    # group's message was trimmed two seconds after it was stored, its
    # SendAck lost to a crash; the SDK's retry was then stored again (a
    # second copy, pushed to every member).  Expire's ``keep`` (the broker's
    # dedupe_window) spares every entry younger than that.
    ops = send(store, mk, 10)  # server times 1 µs apart
    mk.commit(store, SetRetention(AB, -1, 3))
    young = ops[5].server_time  # entries 6..10 are younger than keep
    [res] = mk.commit(store, Expire(mk.time, keep=mk.time - young))
    assert res == Expired(1, 5, 10, (AB,))  # 1..5 only, not 1..7
    assert seqs(store.history(AB, 0, 100)) == [6, 7, 8, 9, 10]
    [dup] = mk.commit(store, ops[5])  # the retry of seq 6: still a Duplicate
    assert dup == Duplicate(ops[5].msg_id, 6, ops[5].server_time)
    # Once older than keep, count retention goes on where it stopped.
    [res] = mk.commit(store, Expire(mk.time + 10**9, keep=10**6))
    assert res == Expired(1, 2, 4, (AB,)) and seqs(store.history(AB, 0, 100)) == [8, 9, 10]


def test_age_retention_from_the_broker_default_and_per_conversation_overrides(store: Store, mk: Maker) -> None:
    store.create_group("team", ["alice", "bob"], 1)
    old = send(store, mk, 3) + send(store, mk, 3, "team")
    mk.time += DAY
    send(store, mk, 2)
    send(store, mk, 2, "team")
    assert mk.commit(store, SetRetention("team", 0, -1)) == (RetentionSet("team", 0, -1),)  # kept for ever
    [res] = mk.commit(store, Expire(mk.time, DAY // 2, 0))
    assert res == Expired(1, 3, 6, (AB,))
    assert seqs(store.history(AB, 0, 100)) == [4, 5]
    assert seqs(store.history("team", 0, 100)) == [1, 2, 3, 4, 5]
    assert not store.deduped("alice", "phone", old[0].local_id)
    # Back to the default: the group's old messages go too.
    mk.commit(store, SetRetention("team", -1, -1))
    assert store.retention("team") == RetentionState("team", -1, -1, 0)
    assert mk.commit(store, Expire(mk.time, DAY // 2, 0)) == (Expired(1, 3, 6, ("team",)),)
    assert seqs(store.history("team", 0, 100)) == [4, 5]
    # The history a member reads (ReadHistory) starts after the floor too.
    [page] = store.read([ReadHistory("team", "bob", 0, 10, True)])
    assert page.code is ErrorCode.OK and seqs(list(page.messages)) == [5, 4]


def test_set_retention_checks_its_fields(store: Store, mk: Maker) -> None:
    assert mk.commit(store, SetRetention("nope", 5, 5)) == (Rejected(ErrorCode.UNKNOWN_CONVERSATION),)
    for bad in (SetRetention(AB, -2, 0), SetRetention(AB, 0, -5), SetRetention("d:bob:alice", 1, 1),
                SetRetention(AB, True, 1), Expire(0, -1, 0), PurgeConversation("a b"), PurgeUser("", 1)):
        assert mk.commit(store, bad) == (Rejected(ErrorCode.BAD_REQUEST),), bad
    with pytest.raises(ValueError):
        store.retention("d:bob:alice")


def test_reclaim_walks_over_holes(store: Store, mk: Maker) -> None:
    store.create_group("team", ["alice", "bob"], 1)
    send(store, mk, 2, "team")
    send(store, mk, 2)  # bob: positions 1, 2 (team), 3, 4 (AB)
    mk.commit(store, TouchDevice("bob", "phone", 0, mk.time))
    mk.commit(store, SetRetention("team", 1, 0), SetRetention(AB, -1, 1), Expire(mk.time))
    assert [p for p, _ in inbox_ids(store, "bob")] == [4]
    mk.commit(store, AckPosition("bob", "phone", 4, mk.time))
    [res] = mk.commit(store, Reclaim(mk.time, DAY, 100 * DAY))
    assert res == Reclaimed(1, 0)  # one entry removed; the holes do not count
    assert store.inbox_floor("bob") == 4 and inbox_ids(store, "bob") == []


def test_unread_and_read_markers_after_a_trim(store: Store, mk: Maker) -> None:
    send(store, mk, 5)
    mk.commit(store, MarkRead("bob", AB, 2))
    mk.commit(store, SetRetention(AB, 0, 2), Expire(mk.time))
    assert store.unread("bob", AB) == 2
    assert store.read_marker("bob", AB) == 2


def test_purge_conversation_deletes_a_group_and_is_idempotent(store: Store, mk: Maker) -> None:
    store.create_group("team", ["alice", "bob"], 1)
    ops = send(store, mk, 3, "team")
    send(store, mk, 1)
    mk.commit(store, MarkRead("bob", "team", 2), SetRetention("team", 0, 50))
    [res] = mk.commit(store, PurgeConversation("team"))
    assert res == Purged(3, 6, last_seq=3, users=("alice", "bob"))  # (told: nothing of it is unread)
    assert not store.conversation_exists("team")
    assert store.members("team") == ()
    assert store.conversations("bob") == [AB]
    assert store.read_marker("bob", "team") == 0
    assert [p for p, _ in inbox_ids(store, "bob")] == [4]
    assert not store.deduped("alice", "phone", ops[0].local_id)
    assert store.retention("team") == RetentionState("team", -1, -1, 3)
    assert store.history("team", 0, 10) == []
    assert mk.commit(store, PurgeConversation("team")) == (Purged(0, 0, last_seq=3),)
    assert mk.commit(store, PurgeConversation("never")) == (Purged(0, 0),)
    # Created again, its seqs continue after the purged ones.
    store.create_group("team", ["carol", "bob"], mk.time)
    [res] = mk.commit(store, mk("team", "carol"))
    assert isinstance(res, Appended) and res.seq == 4
    assert seqs(store.history("team", 0, 10)) == [4]


def test_purge_a_direct_conversation(store: Store, mk: Maker) -> None:
    send(store, mk, 3)
    assert mk.commit(store, PurgeConversation(AB)) == (Purged(3, 6, last_seq=3),)
    assert store.conversation_exists(AB)  # a direct id always exists
    assert store.conversations("alice") == [] and store.history(AB, 0, 10) == []
    [res] = mk.commit(store, mk(AB, "bob"))
    assert isinstance(res, Appended) and res.seq == 4
    assert store.conversations("alice") == [AB]


def test_purging_a_direct_conversation_keeps_its_read_markers(store: Store, mk: Maker) -> None:
    """A purged 1:1 chat lives on (its seqs continue), so its read markers
    stay, as after retention: deleting them moved bob's marker and alice's
    receipt of it back to 0 while bob's connected devices kept theirs (a
    new user's trial) -- read markers never move back."""
    send(store, mk, 3)
    mk.commit(store, MarkRead("bob", AB, 2), MarkRead("alice", AB, 3))
    mk.commit(store, PurgeConversation(AB))
    assert store.read_marker("bob", AB) == 2 and store.read_marker("alice", AB) == 3
    [res] = mk.commit(store, mk(AB, "alice"))
    assert isinstance(res, Appended) and res.seq == 4
    assert store.read_marker("bob", AB) == 2 and store.unread("bob", AB) == 1
    assert store.unread("alice", AB) == 0  # (her own message)


def test_purging_a_direct_conversation_keeps_its_retention_setting(store: Store, mk: Maker) -> None:
    """A purged 1:1 chat lives on, and so does its own retention setting: a
    purge dropped it, and the chat's new history was kept for good (a new
    user's trial: a "1:1 chats expire" deployment outlived by its history).
    A purged group is gone with its setting (created again, it follows the
    broker default)."""
    store.create_group("team", ["alice", "bob"], 1)
    mk.commit(store, SetRetention(AB, -1, 2), SetRetention("team", 3600 * 10**6, -1))
    send(store, mk, 3)
    send(store, mk, 2, "team")
    mk.commit(store, PurgeConversation(AB), PurgeConversation("team"))
    assert store.retention(AB) == RetentionState(AB, -1, 2, 3)
    assert store.retention("team") == RetentionState("team", -1, -1, 2)
    send(store, mk, 5)
    [res] = mk.commit(store, Expire(mk.time))
    assert isinstance(res, Expired) and seqs(store.history(AB, 0, 100)) == [7, 8]


def test_a_login_reads_each_conversations_purge_point(store: Store, mk: Maker) -> None:
    """A device offline while a conversation was purged *and used again* (a
    group created again with a message, a 1:1 chat with a new one) kept
    the purged messages for good: its login named the conversation like
    any other (a new user's trial, HIGH).  A login now reads each
    conversation's purge point, the last seq of its latest purge (0:
    never purged); retention does not move it."""
    store.create_group("team", ["alice", "bob"], 1)
    store.create_group("club", ["alice", "bob"], 1)
    send(store, mk, 3)
    send(store, mk, 2, "team")
    send(store, mk, 1, "club")
    mk.commit(store, PurgeConversation(AB), PurgeConversation("team"))
    store.create_group("team", ["alice", "bob"], mk.time)
    send(store, mk, 4)
    send(store, mk, 1, "team")
    mk.commit(store, SetRetention(AB, -1, 1))
    [res] = mk.commit(store, Expire(mk.time))
    assert isinstance(res, Expired) and store.retention(AB).floor == 6
    (loaded,) = store.read([LoadSession("bob", "phone")])
    assert {c.conv: (c.last_seq, c.purged) for c in loaded.conversations} == {AB: (7, 3), "team": (3, 2), "club": (1, 0)}
    # A later purge moves it; purging again changes nothing.
    mk.commit(store, PurgeConversation(AB), PurgeConversation(AB))
    (loaded,) = store.read([LoadSession("bob", "phone")])
    assert {c.conv: c.purged for c in loaded.conversations} == {"team": 2, "club": 0}  # (AB left the list)
    send(store, mk, 1)
    (loaded,) = store.read([LoadSession("bob", "phone")])
    assert {c.conv: c.purged for c in loaded.conversations} == {AB: 7, "team": 2, "club": 0}


def test_purge_user_removes_their_data_and_is_idempotent(store: Store, mk: Maker) -> None:
    store.create_group("team", ["alice", "bob", "carol"], 1)
    sent = send(store, mk, 2, "team", "bob") + send(store, mk, 2, AB, "bob")
    send(store, mk, 1, "team", "alice")
    mk.commit(store, TouchDevice("bob", "phone", 0, mk.time), TouchDevice("bob", "laptop", 0, mk.time),
              MarkRead("bob", "team", 5))
    head = store.inbox_head("bob")
    now = mk.time + 10
    [res] = mk.commit(store, PurgeUser("bob", now))
    assert isinstance(res, Purged) and (res.messages, res.devices) == (4, 2)
    assert res.entries == head + 1  # with the LEFT entry
    [change] = res.changes
    assert change.members == ("alice", "carol")
    assert [m.kind for m in change.entries] == [MessageKind.LEFT]
    left = change.entries[0]
    assert seqs(store.history("team", 0, 10)) == [1, 2, 3, 4]
    assert store.history("team", 0, 10)[-1].msg_id == left.msg_id
    # Tombstones: the sequence stays gap-free, the payload is gone.
    assert [m.payload for m in store.history("team", 0, 10)] == [b"", b"", b"m0", b""]
    assert [m.payload for m in store.history(AB, 0, 10)] == [b"", b""]
    assert store.message(sent[0].msg_id).payload == b""
    assert not any(store.deduped("bob", "phone", op.local_id) for op in sent)
    assert store.devices("bob") == [] and store.conversations("bob") == []
    assert store.inbox_floor("bob") == store.inbox_head("bob") == head + 1
    assert inbox_ids(store, "bob") == []
    assert store.read_marker("bob", "team") == 0 and store.spans("team", "bob") == ()
    assert store.revoked_before("bob", "phone") == now
    # Other users keep their data (alice still has the tombstones' entries).
    assert len(inbox_ids(store, "alice")) == 6
    assert mk.commit(store, PurgeUser("bob", now)) == (Purged(0, 0, 0),)
    # The user id can be used again: positions continue.
    [res] = mk.commit(store, mk(AB, "alice"))
    assert dict(res.positions)["bob"] == head + 2


def test_expire_still_visits_a_conversation_whose_users_were_all_purged(store: Store, mk: Maker) -> None:
    send(store, mk, 4)
    mk.commit(store, PurgeUser("alice", mk.time), PurgeUser("bob", mk.time))
    assert store.conversations("alice") == store.conversations("bob") == []
    assert mk.commit(store, Expire(mk.time, 0, 1)) == (Expired(1, 3, 0, (AB,)),)
    assert seqs(store.history(AB, 0, 10)) == [4]


def bound_expired_ids(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """EXPIRED_IDS as every store module reads it."""
    import pimcore.store.lmdb
    import pimcore.store.memory
    import pimcore.store.redis

    for module in (pimcore.store.memory, pimcore.store.lmdb, pimcore.store.redis):
        monkeypatch.setattr(module, "EXPIRED_IDS", n)


def test_expire_trims_at_most_expired_ids_conversations_a_commit_and_says_where_to_resume(
    store: Store, mk: Maker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The core sends the online devices of these conversations' users their
    # exact read state (core.py): a commit names every conversation it
    # trimmed, so it trims a bounded number of them, and ``resume`` says
    # where the next Expire goes on.  (A single Expire trimmed them all and
    # named the first 256: the devices of the rest kept counting messages
    # that were gone until their next ReadState.)
    bound_expired_ids(monkeypatch, 2)
    for conv in ("g3", "g1", "g5", "g2", "g4"):
        store.create_group(conv, ["alice", "bob"], 1)
        send(store, mk, 2, conv)
    send(store, mk, 1)  # one message: nothing to trim
    [res] = mk.commit(store, Expire(mk.time, 0, 1))
    assert (res.conversations, res.messages, res.entries) == (2, 2, 4)
    assert len(res.convs) == 2 and list(res.convs) == sorted(res.convs) and res.resume in res.convs
    trimmed = list(res.convs)
    # A conversation gone since (the one to resume after, purged) changes nothing.
    gone = res.resume
    mk.commit(store, PurgeConversation(gone))
    while res.resume:
        [res] = mk.commit(store, Expire(mk.time, 0, 1, res.resume))
        assert res.conversations == len(res.convs) <= 2 and res.messages == len(res.convs)
        trimmed += res.convs
    assert sorted(trimmed) == ["g1", "g2", "g3", "g4", "g5"]  # each once
    assert all(store.retention(g).floor == 1 for g in trimmed if g != gone)
    assert mk.commit(store, Expire(mk.time, 0, 1)) == (Expired(0, 0, 0),)
    bound_expired_ids(monkeypatch, 256)
    kept = "g2" if gone != "g2" else "g3"
    send(store, mk, 2, kept)
    send(store, mk, 2)
    assert mk.commit(store, Expire(mk.time, 0, 1)) == (Expired(2, 4, 8, tuple(sorted((AB, kept)))),)


def test_expire_resumes_over_conversations_with_a_retention_of_their_own(
    store: Store, mk: Maker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No broker default: the walk is over the conversations that set one.
    bound_expired_ids(monkeypatch, 1)
    for conv in ("g2", "g1", "g3"):
        store.create_group(conv, ["alice", "bob"], 1)
        send(store, mk, 3, conv)
        mk.commit(store, SetRetention(conv, -1, 1))
    send(store, mk, 3)  # no setting: kept
    trimmed: list[str] = []
    after = ""
    while True:
        [res] = mk.commit(store, Expire(mk.time, 0, 0, after))
        trimmed += res.convs
        if not res.resume:
            break
        assert res.convs == (res.resume,)
        after = res.resume
    assert sorted(trimmed) == ["g1", "g2", "g3"]
    assert [len(store.history(c, 0, 10)) for c in ("g1", "g2", "g3", AB)] == [1, 1, 1, 3]


def test_reclaim_walks_over_holes_whatever_max_age(store: Store, mk: Maker) -> None:
    send(store, mk, 3)  # bob: positions 1..3, no device
    mk.commit(store, SetRetention(AB, -1, 2), Expire(mk.time))
    assert [p for p, _ in inbox_ids(store, "bob")] == [2, 3]
    # A max_age reaching back before every entry: the hole at 1 still goes.
    assert mk.commit(store, Reclaim(mk.time, DAY, mk.time + DAY)) == (Reclaimed(0, 0),)
    assert store.inbox_floor("bob") == 1


def test_purge_user_leaves_recalled_tombstones_and_no_settings(store: Store, mk: Maker) -> None:
    # "All data of a user": a purged user's messages become tombstones like a
    # recall's (recalled, no payload, not unread, no mention), and the user's
    # own settings -- pinned / muted / hidden, hidden last-seen, deletions for
    # themselves -- are gone too, so a user id used again starts clean.
    import dataclasses

    from pimcore.store import AmendMessage, ReadConversations, SetConversation, SetPresencePrivacy

    store.create_group("team", ["alice", "bob", "carol"], 1)
    ping = dataclasses.replace(mk("team", "bob", payload=b"hi @carol"), mentions=("carol",))
    mk.commit(store, ping, mk("team", "alice", payload=b"a1"))
    base = mk("team", "bob")
    mk.commit(
        store,
        SetConversation("bob", "team", pinned=1, muted=1),
        SetPresencePrivacy("bob", True),
        AmendMessage(base.msg_id, "team", "bob", "phone", base.local_id, 0, base.server_time, MessageKind.DELETE, 2,
                     b"", b"d" * 16),
    )
    assert store.unread("carol", "team") == 2
    mk.commit(store, PurgeUser("bob", mk.time + 10))
    first = store.history("team", 0, 10)[0]
    assert (first.payload, first.recalled) == (b"", True)
    assert store.unread("carol", "team") == 1  # only alice's message is left to read
    [page] = store.read([ReadConversations("carol", conv="team")])
    assert page.entries[0].mention_count == 0
    assert not store.hides_last_seen("bob")
    # bob is added again: none of the old settings come back.
    store.add_members("team", ["bob"], mk.time + 20)
    [page] = store.read([ReadConversations("bob", conv="team")])
    e = page.entries[0]
    assert (e.pinned, e.muted) == (False, False)
    [hist] = store.read([ReadHistory("team", "bob", 0, 10)])
    assert not any(m.deleted for m in hist.messages)


def test_conversation_settings_of_a_purged_conversation(store: Store, mk: Maker) -> None:
    # The purge keeps the last seq (seqs continue after it) but no entry: a
    # user who then pins or mutes it gets its entry without a last message,
    # not "store corrupt".
    from pimcore.store import ConversationSet, SetConversation

    send(store, mk, 1)
    mk.commit(store, PurgeConversation(AB))
    [res] = mk.commit(store, SetConversation("bob", AB, pinned=2))
    assert isinstance(res, ConversationSet) and res.entry.last is None


def test_a_conversation_whose_every_message_expired(store: Store, mk: Maker) -> None:
    # Age retention removed every message, the last seq's with them: the
    # conversation list and its settings show the entry without a last
    # message and nothing unread, never "missing message".
    from pimcore.store import ConversationSet, ReadConversations, SetConversation

    send(store, mk, 3)
    assert mk.commit(store, SetRetention(AB, DAY, -1)) == (RetentionSet(AB, DAY, -1),)
    mk.time += 2 * DAY
    [res] = mk.commit(store, Expire(mk.time))
    assert isinstance(res, Expired) and res.messages == 3
    assert store.last_seq(AB) == 3 and store.unread("bob", AB) == 0
    [page] = store.read([ReadConversations("bob", conv=AB)])
    [entry] = page.entries
    assert entry.last is None and entry.unread == 0 and entry.mention_count == 0
    [set_] = mk.commit(store, SetConversation("bob", AB, pinned=1))
    assert isinstance(set_, ConversationSet) and set_.entry.last is None and set_.entry.pinned
    # Seqs continue after the expired ones, and the entry shows the new message.
    [app] = mk.commit(store, mk(AB, "alice", payload=b"after"))
    assert isinstance(app, Appended) and app.seq == 4
    [page] = store.read([ReadConversations("bob", conv=AB)])
    assert page.entries[0].last is not None and page.entries[0].last.seq == 4
    assert page.entries[0].unread == 1


def test_online_devices_get_their_read_state_after_a_trim_and_a_purge_over_every_store(store: Store) -> None:
    # The core's refresh (tests/test_core.py) over each store: what Expired
    # names and Purged.last_seq say, and the reads after them, agree with
    # what the store counts.
    from _harness import Harness
    from pimcore import frames as F
    from pimcore.core import BrokerConfig

    h = Harness(store, driver="inline")
    a, b = h.login("alice", "phone"), h.login("bob", "phone")
    for i in range(30):
        h.send(a, AB, b"m%d" % i)
    h.drain_device(b)
    h.feed(b, F.Read(AB, 5))
    h.take(b)
    h.host_call(h.broker.set_retention, AB, -1, 10)
    for _ in range(2):
        h.advance(BrokerConfig().reclaim_interval + 1)
    assert store.unread("bob", AB) == 10
    assert [s.entries for s in h.take(b, F.ReadStates)] == [(F.ReadState(AB, 5, 30, 10),)]
    h.host_call(h.broker.purge_conversation, AB)
    assert [s.entries for s in h.take(b, F.ReadStates)] == [(F.ReadState(AB, 5, 30, 0),)]
    h.send(a, AB, b"after")
    assert [m.seq for m in h.drain_device(b)] == [31] and store.unread("bob", AB) == 1


def test_online_devices_get_their_read_state_after_a_trim_of_more_conversations_than_a_commit_names(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The core goes on with the next Expire at once (Expired.resume): every
    # trimmed conversation's online devices are told, not the first
    # EXPIRED_IDS of them.
    from _harness import Harness
    from pimcore import frames as F
    from pimcore.core import BrokerConfig

    bound_expired_ids(monkeypatch, 2)
    h = Harness(store, driver="inline")
    b = h.login("bob", "phone")
    peers = ["carol", "dave", "erin", "fred", "gina"]
    convs = []
    for peer in peers:
        conv = direct_conversation(peer, "bob")
        convs.append(conv)
        a = h.login(peer, "phone")
        for i in range(4):
            h.send(a, conv, b"m%d" % i)
        h.host_call(h.broker.set_retention, conv, -1, 1)
    h.drain_device(b)
    h.take(b)
    for _ in range(2):
        h.advance(BrokerConfig().reclaim_interval + 1)
    got = {e.conv: e for s in h.take(b, F.ReadStates) for e in s.entries}
    assert got == {conv: F.ReadState(conv, 0, 4, 1) for conv in convs}
    assert all(store.unread("bob", conv) == 1 for conv in convs)


def test_online_members_of_a_purged_group_are_told_nothing_of_it_is_unread_over_every_store(store: Store) -> None:
    # A new user's trial: a group the host purged stayed in the client with
    # its unread count (the SDK's total unread 15 against the broker's 11),
    # as nothing told the online members.  Each gets the group's read state
    # as the purge leaves it: read up to its last seq, nothing unread (the
    # marker is the last seq: a client ignores a marker that moves back).
    from _harness import Harness
    from pimcore import frames as F

    h = Harness(store, driver="inline")
    a, b = h.login("alice", "phone"), h.login("bob", "phone")
    h.host_call(h.broker.create_group, "team", ["alice", "bob"])
    for i in range(5):
        h.send(a, "team", b"m%d" % i)
    h.drain_device(b)
    h.take(b)
    h.take(a)
    h.host_call(h.broker.purge_conversation, "team")
    assert [s.entries for s in h.take(b, F.ReadStates)] == [(F.ReadState("team", 5, 5, 0),)]
    assert [s.entries for s in h.take(a, F.ReadStates)] == [(F.ReadState("team", 5, 5, 0),)]


def test_a_login_says_how_many_read_states_it_sends_so_a_device_away_during_a_purge_drops_it(store: Store) -> None:
    # A new user's trial: a device offline while its group was purged kept
    # the group's unread count for good -- its login's read states simply
    # left the group out.  LoginAck.states says how many ReadState entries
    # the login sends (every conversation of the user's list): a client
    # drops what it held of the others.
    from _harness import Harness
    from pimcore import frames as F

    h = Harness(store, driver="inline")
    a = h.login("alice", "phone")
    h.host_call(h.broker.create_group, "team", ["alice", "bob"])
    h.host_call(h.broker.create_group, "club", ["alice", "bob"])
    for conv in ("team", "club", AB):
        h.send(a, conv, b"hi")
    h.host_call(h.broker.purge_conversation, "team")
    b = h.login("bob", "phone")
    [ack] = h.take(b, F.LoginAck)
    entries = [e for s in h.take(b, F.ReadStates) for e in s.entries]
    assert ack.states == len(entries) == 2 and {e.conv for e in entries} == {"club", AB}


def test_devices_that_ask_are_told_what_a_purge_removed_over_every_store(store: Store) -> None:
    # A new user's trial: a device online while its group was purged kept
    # the purged messages in its view until its next login (a group
    # re-created with the same id showed them beside its new ones), as a
    # ReadState cannot say "purged".  A device whose Login asked for
    # CAP_CONV_PURGED gets ConvPurged(conv, last_seq, gone): entries up to
    # last_seq are gone, and with gone the conversation itself (a group).
    # A device that did not ask gets nothing new: its decoder would refuse
    # an unknown frame type.
    from _harness import Harness
    from pimcore import frames as F

    h = Harness(store, driver="inline")
    a = h.login("alice", "phone", caps=F.CAP_CONV_PURGED)
    [ack] = h.take(a, F.LoginAck)
    assert ack.caps & F.CAP_CONV_PURGED
    b = h.login("bob", "phone")
    [ack] = h.take(b, F.LoginAck)
    assert not ack.caps & F.CAP_CONV_PURGED
    b2 = h.login("bob", "laptop", caps=F.CAP_CONV_PURGED)
    h.host_call(h.broker.create_group, "team", ["alice", "bob"])
    for i in range(5):
        h.send(a, "team", b"t%d" % i)
    for i in range(3):
        h.send(a, AB, b"d%d" % i)
    for conn in (a, b, b2):
        h.drain_device(conn)
        h.take(conn)
    h.host_call(h.broker.purge_conversation, "team")
    assert h.take(a, F.ConvPurged) == h.take(b2, F.ConvPurged) == [F.ConvPurged("team", 5, True)]
    assert not h.take(b, F.ConvPurged) and not [f for f in h.frames[b] if type(f).__name__ == "ConvPurged"]
    # (The read states still come to every device, as before.)
    assert [s.entries for s in h.take(b, F.ReadStates)] == [(F.ReadState("team", 5, 5, 0),)]
    assert [s.entries for s in h.take(b2, F.ReadStates)] == [(F.ReadState("team", 5, 5, 0),)]
    # A 1:1 chat stays: what is gone is its history up to its last seq.
    h.host_call(h.broker.purge_conversation, AB)
    assert h.take(a, F.ConvPurged) == h.take(b2, F.ConvPurged) == [F.ConvPurged(AB, 3, False)]
    assert not h.take(b, F.ConvPurged)
    # Retention is no purge: nothing is said beyond the read state.
    for i in range(4):
        h.send(a, AB, b"e%d" % i)
    h.host_call(h.broker.set_retention, AB, -1, 1)
    from pimcore.core import BrokerConfig
    for _ in range(2):
        h.advance(BrokerConfig().reclaim_interval + 1)
    assert store.retention(AB).floor == 6
    assert not h.take(a, F.ConvPurged) and not h.take(b2, F.ConvPurged)


def test_a_login_tells_a_device_that_asks_each_conversations_purge_point_over_every_store(store: Store) -> None:
    # A new user's trial (HIGH): bob's phone, offline while a group was
    # purged and created again with a message (and a 1:1 chat purged and
    # written to again), kept the purged messages in its view: its login
    # named both conversations like any other.  A device that asked for
    # CAP_CONV_PURGED gets, at every login, ConvPurged(conv, purge point,
    # False) for each conversation of its list ever purged -- before the
    # login's ReadStates, so their exact state lands after it.
    from _harness import Harness
    from pimcore import frames as F

    h = Harness(store, driver="inline")
    a = h.login("alice", "phone")
    h.host_call(h.broker.create_group, "team", ["alice", "bob"])
    h.host_call(h.broker.create_group, "club", ["alice", "bob"])
    for conv, n in (("team", 4), (AB, 3), ("club", 1)):
        for i in range(n):
            h.send(a, conv, b"%s%d" % (conv.encode(), i))
    h.host_call(h.broker.purge_conversation, "team")
    h.host_call(h.broker.purge_conversation, AB)
    h.host_call(h.broker.create_group, "team", ["alice", "bob"])
    h.send(a, "team", b"new")
    h.send(a, AB, b"new")
    b = h.login("bob", "phone", caps=F.CAP_CONV_PURGED)
    got = [f for f in h.take(b) if isinstance(f, (F.ConvPurged, F.ReadStates))]
    told = [f for f in got if isinstance(f, F.ConvPurged)]
    assert sorted(told, key=lambda f: f.conv) == [F.ConvPurged(AB, 3, False), F.ConvPurged("team", 4, False)]
    assert isinstance(got[-1], F.ReadStates) and all(isinstance(f, F.ConvPurged) for f in got[:2])
    states = {e.conv: e for s in got if isinstance(s, F.ReadStates) for e in s.entries}
    assert set(states) == {AB, "team", "club"} and states["team"].last_seq == 5 and states[AB].last_seq == 4
    # A device that did not ask gets none.
    b2 = h.login("bob", "laptop")
    assert not [f for f in h.take(b2) if isinstance(f, F.ConvPurged)]


def test_a_group_send_that_answers_purged_history_is_refused(store: Store, mk: Maker) -> None:
    """A send queued on a device before its group was purged went out after
    the group was created again with the id, to its new members (a new
    user's trial, HIGH).  A group send whose ``after_seq`` names a purged
    seq (0 < after_seq <= the purge point) answers history that is gone:
    PURGED, nothing stored, no dedupe record (a retry is refused again).
    ``after_seq`` 0 (nothing seen) and seqs after the purge are stored; a
    1:1 chat goes on after its purge (the same two users)."""
    store.create_group("team", ["alice", "bob"], 1)
    send(store, mk, 3, "team")
    send(store, mk, 2)
    mk.commit(store, PurgeConversation("team"), PurgeConversation(AB))
    store.create_group("team", ["alice", "carol"], mk.time)
    stale, edge = mk("team", "alice", after_seq=1), mk("team", "alice", after_seq=3)
    fresh, later = mk("team", "alice"), mk("team", "carol", after_seq=4)
    post = mk("team", "alice", after_seq=(1 << 64) - 1)  # (the host's posts: "after the last seq")
    direct = mk(AB, "bob", after_seq=2)
    res = mk.commit(store, stale, fresh, edge, later, post, direct)
    assert res[0] == res[2] == Rejected(ErrorCode.PURGED)
    stored = [res[i] for i in (1, 3, 4, 5)]
    assert all(isinstance(r, Appended) for r in stored)
    assert [(r.seq, r.after_seq) for r in stored] == [(4, 0), (5, 4), (6, 5), (3, 2)]  # type: ignore[union-attr]
    assert seqs(store.history("team", 0, 10)) == [4, 5, 6]
    assert not store.deduped("alice", "phone", stale.local_id) and not store.deduped("alice", "phone", edge.local_id)
    assert mk.commit(store, stale) == (Rejected(ErrorCode.PURGED),)  # (its retry)
    # A sender who is not a member of the new group hears that first.
    assert mk.commit(store, mk("team", "bob", after_seq=2)) == (Rejected(ErrorCode.NOT_MEMBER),)
    # One op at a time (the general path of a store that runs plain sends
    # in one call): the same answers.
    assert mk.commit(store, mk("team", "carol", after_seq=3)) == (Rejected(ErrorCode.PURGED),)
    [ok] = mk.commit(store, mk("team", "carol", after_seq=6))
    assert isinstance(ok, Appended) and ok.seq == 7


def test_a_stale_send_to_a_group_created_again_is_refused_over_every_store(store: Store) -> None:
    # A new user's trial (HIGH): a send written on bob's phone while it
    # still showed the old group went out after the group was purged and
    # created again with the id -- to its new members, who never saw what
    # it answers.  Its after_seq names a purged seq: SendAck PURGED to a
    # device that asked CAP_CONV_PURGED (it knows the code), REJECTED (final)
    # to one that did not; nothing is stored or pushed.
    from _harness import Harness
    from pimcore import frames as F

    h = Harness(store, driver="inline")
    a = h.login("alice", "phone", caps=F.CAP_CONV_PURGED)
    b = h.login("bob", "phone")
    h.host_call(h.broker.create_group, "team", ["alice", "bob", "carol"])
    for i in range(3):
        h.send(a, "team", b"t%d" % i)
    h.host_call(h.broker.purge_conversation, "team")
    h.host_call(h.broker.create_group, "team", ["alice", "bob", "dave"])
    d = h.login("dave", "phone")
    for conn in (a, b, d):
        h.drain_device(conn)
        h.take(conn)
    h.feed(a, F.SendReq(50, "team", h.now, b"stale", after_seq=3))
    h.feed(b, F.SendReq(51, "team", h.now, b"stale", after_seq=2))
    assert [(k.local_id, k.code) for k in h.acks(a)] == [(50, ErrorCode.PURGED)]
    assert [(k.local_id, k.code) for k in h.acks(b)] == [(51, ErrorCode.REJECTED)]
    assert not h.pushed(d) and store.history("team", 0, 10) == []
    # Nothing seen (0), or a seq after the purge: stored.
    h.feed(a, F.SendReq(52, "team", h.now, b"fresh", after_seq=0))
    [ok] = h.acks(a)
    assert ok.code == ErrorCode.OK and ok.seq == 4
    h.feed(b, F.SendReq(53, "team", h.now, b"reply", after_seq=4))
    assert [k.code for k in h.acks(b)] == [ErrorCode.OK]
    assert [m.payload for m in h.pushed(d)] == [b"fresh", b"reply"]
