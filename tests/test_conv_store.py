"""Store contract of the conversation list, per-user settings and mentions
(issue 14 parts 2 and 4), over every store (memory, LMDB, Redis)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pimcore.errors import ErrorCode
from pimcore.store.base import (
    ConversationSet,
    ConversationsPage,
    MarkRead,
    NewMessage,
    ReadConversations,
    ReadEvents,
    Rejected,
    SetConversation,
    Store,
    conversation_cursor,
    direct_conversation,
)

from test_store import AB, Maker, mk, store  # noqa: F401  (fixtures)

ON, OFF = 1, 2


def page(store: Store, user: str, **kw: object) -> ConversationsPage:
    [res] = store.read([ReadConversations(user, **kw)])  # type: ignore[arg-type]
    assert isinstance(res, ConversationsPage)
    return res


def entry(store: Store, user: str, conv: str):  # type: ignore[no-untyped-def]
    res = page(store, user, conv=conv)
    assert res.code is ErrorCode.OK, res
    return res.entries[0]


def setting(store: Store, mk: Maker, user: str, conv: str, **kw: int):  # type: ignore[no-untyped-def]
    [res] = mk.commit(store, SetConversation(user, conv, **kw))
    return res


def mention(op: NewMessage, users: tuple[str, ...] = (), everyone: bool = False, event: bool = False) -> NewMessage:
    return dataclasses.replace(op, mentions=users, mention_all=everyone, event=event)


def test_list_is_ordered_by_last_activity_with_a_stable_cursor(store: Store, mk: Maker) -> None:
    store.create_group("g1", ["alice", "bob"], now=1)
    store.create_group("g2", ["alice", "bob"], now=1)
    store.create_group("g3", ["alice", "carol"], now=1)
    mk.commit(store, mk("g1", "bob"), mk("g2", "bob", payload=b"two"), mk(AB, "bob"), mk("g1", "alice", payload=b"last"))
    full = page(store, "alice", limit=10)
    assert [e.conv for e in full.entries] == ["g1", AB, "g2", "g3"]  # g3: no message yet, last
    assert not full.more
    g1 = full.entries[0]
    assert g1.last is not None and g1.last.payload == b"last" and g1.last.sender == "alice" and g1.last_seq == 2
    assert (g1.unread, g1.read_seq, g1.mention_count) == (1, 0, 0)
    assert full.entries[3].last is None and full.entries[3].last_seq == 0
    # pages of 1 chained by cursor give the same order
    got, cursor = [], b""
    while True:
        p = page(store, "alice", limit=1, cursor=cursor)
        got += [e.conv for e in p.entries]
        if not p.more:
            break
        cursor = conversation_cursor(p.entries[-1])
    assert got == ["g1", AB, "g2", "g3"]
    # a conversation that moves up after the cursor is not repeated below it
    first = page(store, "alice", limit=2)
    mk.commit(store, mk("g2", "bob", payload=b"newer"))
    rest = page(store, "alice", limit=10, cursor=conversation_cursor(first.entries[-1]))
    assert [e.conv for e in rest.entries] == ["g3"]
    assert [e.conv for e in page(store, "alice").entries][0] == "g2"


def test_bad_cursor_and_bad_ids(store: Store) -> None:
    assert page(store, "alice", cursor=b"nonsense").code is ErrorCode.BAD_CURSOR
    assert page(store, "alice", cursor=b"\x01\x05" + bytes(8) + b"g").code is ErrorCode.BAD_CURSOR
    assert page(store, "al ice").code is ErrorCode.BAD_REQUEST
    assert page(store, "alice").entries == ()
    assert page(store, "alice", conv="nope").code is ErrorCode.UNKNOWN_CONVERSATION


def test_pinned_first_muted_and_settings_changes(store: Store, mk: Maker) -> None:
    store.create_group("g1", ["alice", "bob"], now=1)
    mk.commit(store, mk("g1", "bob"), mk(AB, "bob"))
    assert [e.conv for e in page(store, "alice").entries] == [AB, "g1"]
    res = setting(store, mk, "alice", "g1", pinned=ON, muted=ON)
    assert isinstance(res, ConversationSet) and res.changed
    assert (res.entry.pinned, res.entry.muted, res.entry.hidden) == (True, True, False)
    assert [e.conv for e in page(store, "alice").entries] == ["g1", AB]  # pinned first
    again = setting(store, mk, "alice", "g1", pinned=ON)
    assert isinstance(again, ConversationSet) and not again.changed  # idempotent: a retry changes nothing
    assert not entry(store, "bob", "g1").pinned  # per user
    off = setting(store, mk, "alice", "g1", pinned=OFF)
    assert isinstance(off, ConversationSet) and off.changed and not off.entry.pinned and off.entry.muted
    assert setting(store, mk, "alice", "g1", pinned=3) == Rejected(ErrorCode.BAD_REQUEST)
    assert setting(store, mk, "carol", "g1", muted=ON) == Rejected(ErrorCode.NOT_MEMBER)
    assert setting(store, mk, "alice", "nope", muted=ON) == Rejected(ErrorCode.UNKNOWN_CONVERSATION)
    assert setting(store, mk, "carol", AB, muted=ON) == Rejected(ErrorCode.NOT_MEMBER)


def test_hidden_until_the_next_message(store: Store, mk: Maker) -> None:
    store.create_group("g1", ["alice", "bob"], now=1)
    mk.commit(store, mk("g1", "bob"), mk(AB, "bob"))
    res = setting(store, mk, "alice", "g1", hidden=ON)
    assert isinstance(res, ConversationSet) and res.entry.hidden
    assert [e.conv for e in page(store, "alice").entries] == [AB]
    assert [e.conv for e in page(store, "alice", include_hidden=True).entries] == [AB, "g1"]
    assert [e.conv for e in page(store, "bob").entries] == [AB, "g1"]  # only alice hid it
    mk.commit(store, mk("g1", "bob", payload=b"wake"))
    e = entry(store, "alice", "g1")
    assert not e.hidden and e.last is not None and e.last.payload == b"wake"
    assert [x.conv for x in page(store, "alice").entries] == ["g1", AB]
    # hide again, then unhide explicitly
    setting(store, mk, "alice", "g1", hidden=ON)
    assert entry(store, "alice", "g1").hidden
    setting(store, mk, "alice", "g1", hidden=OFF)
    assert not entry(store, "alice", "g1").hidden


def test_mentions_are_stored_counted_and_reset_by_the_read_marker(store: Store, mk: Maker) -> None:
    store.create_group("g1", ["alice", "bob", "carol"], now=1)
    m1 = mention(mk("g1", "alice"), ("bob", "zed"))  # zed is not a member: ignored
    m2 = mention(mk("g1", "alice"), (), everyone=True)
    m3 = mention(mk("g1", "bob"), ("bob", "carol"))  # bob mentioning himself does not count
    mk.commit(store, m1, m2, m3)
    [h1, h2, h3] = store.history("g1", 0, 10)
    assert (h1.mentions, h1.mention_all) == (("bob", "zed"), False)
    assert (h2.mentions, h2.mention_all) == ((), True)
    assert entry(store, "bob", "g1").mention_count == 2
    assert entry(store, "carol", "g1").mention_count == 2
    assert entry(store, "alice", "g1").mention_count == 0  # "everyone" is everyone but the sender
    from pimcore.store.base import MarkRead

    mk.commit(store, MarkRead("bob", "g1", 1))
    e = entry(store, "bob", "g1")
    assert (e.read_seq, e.mention_count, e.unread) == (1, 1, 1)
    mk.commit(store, MarkRead("carol", "g1", 3))
    assert entry(store, "carol", "g1").mention_count == 0


def test_mentions_count_only_members_at_that_seq(store: Store, mk: Maker) -> None:
    store.create_group("g1", ["alice", "bob"], now=1)
    mk.commit(store, mention(mk("g1", "alice"), ("carol",)), mention(mk("g1", "alice"), everyone=True))
    store.add_members("g1", ["carol"])
    assert entry(store, "carol", "g1").mention_count == 0  # not a member when mentioned
    mk.commit(store, mention(mk("g1", "alice"), ("carol",)))
    assert entry(store, "carol", "g1").mention_count == 1
    assert entry(store, "bob", "g1").mention_count == 1


def test_message_event_carries_muted_and_mentioned_recipients(store: Store, mk: Maker) -> None:
    store.create_group("g1", ["alice", "bob", "carol"], now=1)
    setting(store, mk, "carol", "g1", muted=ON)
    mk.commit(store, mention(mk("g1", "alice"), ("bob",), event=True), mention(mk("g1", "bob"), everyone=True, event=True))
    mk.commit(store, dataclasses.replace(mk("g1", "alice"), event=True))
    [res] = store.read([ReadEvents("host", after=0, limit=10)])
    events = [json.loads(e.data) for e in res.events]  # type: ignore[union-attr]
    assert [e.get("muted") for e in events] == [["carol"], ["carol"], ["carol"]]
    assert [e.get("mentioned") for e in events] == [["bob"], ["alice", "carol"], None]
    assert [e.get("mention_all", False) for e in events] == [False, True, False]


def test_malformed_mentions_are_bad_request(store: Store, mk: Maker) -> None:
    [res] = mk.commit(store, mention(mk("g1", "alice"), ("not an id",)))
    assert res == Rejected(ErrorCode.BAD_REQUEST)


def test_former_member_keeps_the_entry_up_to_the_left_seq(store: Store, mk: Maker) -> None:
    store.create_group("g1", ["alice", "bob"], now=1)
    mk.commit(store, mk("g1", "bob"))
    store.remove_members("g1", ["alice"])
    mk.commit(store, mk("g1", "bob", payload=b"after"))
    e = entry(store, "alice", "g1")
    assert e.last_seq == 2 and e.last is not None and e.last.kind == 2  # her LEFT entry
    assert setting(store, mk, "alice", "g1", pinned=ON).entry.pinned  # type: ignore[union-attr]


def test_direct_conversation_settings_before_the_first_message(store: Store, mk: Maker) -> None:
    ac = direct_conversation("alice", "carol")
    res = setting(store, mk, "alice", ac, muted=ON)
    assert isinstance(res, ConversationSet) and res.entry.muted and res.entry.last is None
    assert page(store, "alice").entries == ()  # listed from its first message on
    mk.commit(store, mk(ac, "carol"))
    [e] = page(store, "alice").entries
    assert e.conv == ac and e.muted



def test_a_recalled_message_no_longer_counts_as_a_mention(store: Store, mk: Maker) -> None:
    # A recall leaves a tombstone: it is neither unread nor a mention (issue 14:
    # "unread counts and the conversation list ignore recalled messages").
    from test_amend_store import RECALL, amend

    store.create_group("g1", ["alice", "bob", "carol"], now=1)
    mk.commit(store, mention(mk("g1", "alice"), ("bob",)), mention(mk("g1", "alice"), (), everyone=True))
    assert entry(store, "bob", "g1").mention_count == 2
    mk.commit(store, amend(mk, "g1", "alice", 1, RECALL))
    bob = entry(store, "bob", "g1")
    assert (bob.mention_count, bob.unread) == (1, 1)
    assert entry(store, "carol", "g1").mention_count == 1
    mk.commit(store, amend(mk, "g1", "alice", 2, RECALL))
    assert (entry(store, "bob", "g1").mention_count, entry(store, "carol", "g1").mention_count) == (0, 0)


def test_a_message_deleted_for_oneself_no_longer_counts_as_a_mention(store: Store, mk: Maker) -> None:
    # Found after the unread fix: bob deletes for himself an unread message
    # that mentions him; his unread count drops, his mention count stayed.
    # A message deleted for oneself is neither unread nor a mention -- for
    # that user alone, as a recall is for everyone.
    from test_amend_store import DELETE, RECALL, amend

    store.create_group("g1", ["alice", "bob", "carol"], now=1)
    mk.commit(store, mention(mk("g1", "alice"), ("bob",)), mention(mk("g1", "alice"), (), everyone=True),
              mention(mk("g1", "alice"), ("bob", "carol")))
    assert (entry(store, "bob", "g1").mention_count, entry(store, "bob", "g1").unread) == (3, 3)
    mk.commit(store, amend(mk, "g1", "bob", 1, DELETE))
    bob = entry(store, "bob", "g1")
    assert (bob.mention_count, bob.unread) == (2, 2)
    assert (entry(store, "carol", "g1").mention_count, entry(store, "carol", "g1").unread) == (2, 3)  # only for him
    mk.commit(store, amend(mk, "g1", "carol", 2, DELETE))
    assert (entry(store, "carol", "g1").mention_count, entry(store, "carol", "g1").unread) == (1, 2)
    assert entry(store, "bob", "g1").mention_count == 2
    # deleted, then recalled: counted out once
    mk.commit(store, amend(mk, "g1", "alice", 1, RECALL))
    assert (entry(store, "bob", "g1").mention_count, entry(store, "bob", "g1").unread) == (2, 2)
    # a delete below the read marker changes nothing; the rest goes
    mk.commit(store, MarkRead("bob", "g1", 2))
    assert (entry(store, "bob", "g1").mention_count, entry(store, "bob", "g1").unread) == (1, 1)
    mk.commit(store, amend(mk, "g1", "bob", 2, DELETE))
    assert entry(store, "bob", "g1").mention_count == 1
    mk.commit(store, amend(mk, "g1", "bob", 3, DELETE))
    assert (entry(store, "bob", "g1").mention_count, entry(store, "bob", "g1").unread) == (0, 0)
    # the same in a direct conversation
    mk.commit(store, mention(mk(AB, "alice"), ("bob",)), mention(mk(AB, "alice"), ("bob",)))
    mk.commit(store, amend(mk, AB, "bob", 1, DELETE))
    assert (entry(store, "bob", AB).mention_count, entry(store, "bob", AB).unread) == (1, 1)


def test_amend_entries_are_not_the_last_message(store: Store, mk: Maker) -> None:
    # Issue 14: each conversation "with the last message (sender, server time,
    # payload or tombstone)", ordered by last activity, hidden until the next
    # message.  RECALL/EDIT entries are entries of the conversation but not
    # messages: an edit of an old message neither becomes `last`, nor moves
    # the conversation up, nor un-hides it; a recall of the last message
    # leaves its tombstone as `last`.
    from test_amend_store import EDIT, RECALL, amend

    store.create_group("g1", ["alice", "bob"], now=1)
    store.create_group("g2", ["alice", "bob"], now=1)
    mk.commit(store, mk("g1", "bob", payload=b"old"), mk("g1", "bob", payload=b"last"), mk("g2", "bob", payload=b"g2"))
    before = entry(store, "alice", "g1")
    assert before.last is not None and before.last_seq == 2
    mk.commit(store, amend(mk, "g1", "bob", 1, EDIT, b"old, edited"))
    e = entry(store, "alice", "g1")
    assert e.last == before.last and e.last_seq == 2
    assert [x.conv for x in page(store, "alice").entries] == ["g2", "g1"]
    # an edit of the last message: `last` is that message with its new payload
    mk.commit(store, amend(mk, "g1", "bob", 2, EDIT, b"last, edited"))
    e = entry(store, "alice", "g1")
    assert e.last is not None and (e.last.seq, e.last.payload, e.last.kind) == (2, b"last, edited", 0)
    assert e.last.edited and e.last.server_time == before.last.server_time and e.last_seq == 2
    assert [x.conv for x in page(store, "alice").entries] == ["g2", "g1"]
    # hidden stays hidden over edits and recalls, until the next message
    setting(store, mk, "alice", "g2", hidden=ON)
    mk.commit(store, amend(mk, "g2", "bob", 1, EDIT, b"g2, edited"))
    assert entry(store, "alice", "g2").hidden
    assert [x.conv for x in page(store, "alice").entries] == ["g1"]
    mk.commit(store, amend(mk, "g2", "bob", 1, RECALL))
    g2 = entry(store, "alice", "g2")
    assert g2.hidden and g2.last is not None and g2.last.recalled and g2.last_seq == 1
    # a recall of the last message: `last` is its tombstone
    mk.commit(store, amend(mk, "g1", "bob", 2, RECALL))
    e = entry(store, "alice", "g1")
    assert e.last is not None and (e.last.seq, e.last.kind, e.last.recalled, e.last.payload) == (2, 0, True, b"")
    assert e.last_seq == 2 and e.last.server_time == before.last.server_time
    # the next message un-hides and becomes `last`
    mk.commit(store, mk("g2", "bob", payload=b"wake"))
    g2 = entry(store, "alice", "g2")
    assert not g2.hidden and g2.last is not None and g2.last.payload == b"wake"
    assert [x.conv for x in page(store, "alice").entries] == ["g2", "g1"]


def test_last_is_as_history_returns_it_to_the_user_a_message_deleted_for_oneself_stays_deleted(
    store: Store, mk: Maker
) -> None:
    # A new user's trial (HIGH): alice deleted bob's message for herself, yet
    # her list entry's `last` carried it undeleted with its text -- and every
    # ConvUpdate (a mark_read on any device) brought it back into her SDK's
    # view; after bob edited it her list preview showed the new text.  `last`
    # is the message as history returns it to that user: deleted, no payload.
    from test_amend_store import DELETE, EDIT, amend

    store.create_group("g1", ["alice", "bob"], now=1)
    mk.commit(store, mk("g1", "bob", payload=b"keep"), mk("g1", "bob", payload=b"gone for alice"))
    mk.commit(store, amend(mk, "g1", "alice", 2, DELETE))

    def last(user: str):  # type: ignore[no-untyped-def]
        e = entry(store, user, "g1")
        assert e.last is not None and e.last_seq == 2
        return (e.last.seq, e.last.payload, e.last.deleted)

    assert last("alice") == (2, b"", True)
    assert last("bob") == (2, b"gone for alice", False)  # for her alone
    # the whole list, a settings change's answer (the ConvUpdate the core
    # sends) and a read marker change agree
    assert [(x.last.payload, x.last.deleted) for x in page(store, "alice").entries if x.last] == [(b"", True)]
    res = setting(store, mk, "alice", "g1", pinned=ON)
    assert isinstance(res, ConversationSet) and res.entry.last is not None
    assert (res.entry.last.payload, res.entry.last.deleted) == (b"", True)
    mk.commit(store, MarkRead("alice", "g1", 2))
    assert last("alice") == (2, b"", True)
    # a later edit by its sender brings nothing of it back to her
    mk.commit(store, amend(mk, "g1", "bob", 2, EDIT, b"edited"))
    assert last("alice") == (2, b"", True)
    assert last("bob") == (2, b"edited", False)
