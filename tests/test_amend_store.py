"""Store contract of recall, edit and delete-for-self (store/base.py,
:class:`AmendMessage`), run on every store (memory, LMDB, Redis when
redis-server is present) through the public :class:`Store` interface."""

from __future__ import annotations

from typing import Optional

import pytest

from pimcore.errors import ErrorCode
from pimcore.frames import MessageKind
from pimcore.ids import SYSTEM
from pimcore.store import (
    AmendMessage,
    Appended,
    Duplicate,
    LmdbStore,
    LoadSession,
    MarkRead,
    ReadHistory,
    Rejected,
    Store,
)

from test_store import AB, GROUP, Maker, digest, mk, store  # noqa: F401  (fixtures)

RECALL, EDIT, DELETE = MessageKind.RECALL, MessageKind.EDIT, MessageKind.DELETE
SECRET = b"the secret payload \x00\xfe"


def amend(
    mk: Maker,
    conv: str,
    sender: str,
    target: int,
    kind: int,
    payload: bytes = b"",
    *,
    device: str = "phone",
    local_id: Optional[int] = None,
    window: int = 0,
    server_time: Optional[int] = None,
) -> AmendMessage:
    """An AmendMessage as the core makes it (same clock and local ids as mk)."""
    base = mk(conv, sender, device, local_id=local_id, payload=payload, server_time=server_time)
    return AmendMessage(
        base.msg_id, conv, sender, device, base.local_id, base.client_time, base.server_time, kind, target, payload,
        digest(conv, bytes((kind,)) + target.to_bytes(8, "big") + payload), window,
    )


def history(store: Store, user: str, conv: str = AB) -> dict[int, object]:
    (page,) = store.read([ReadHistory(conv, user, 0, 100)])
    assert page.code is ErrorCode.OK
    return {m.seq: m for m in page.messages}


def test_recall_leaves_a_tombstone_and_no_payload(store: Store, mk: Maker) -> None:
    (a1, a2) = mk.commit(store, mk(AB, "alice", payload=SECRET), mk(AB, "alice", payload=b"second"))
    assert store.unread("bob", AB) == 2
    (res,) = mk.commit(store, amend(mk, AB, "alice", 1, RECALL))
    assert isinstance(res, Appended) and res.seq == 3 and res.after_seq == 2
    assert [u for u, _ in res.positions] == ["alice", "bob"]
    # the target is a tombstone everywhere a read returns it
    h = history(store, "bob")
    assert (h[1].recalled, h[1].payload, h[1].kind) == (True, b"", MessageKind.MESSAGE)
    assert (h[3].kind, h[3].target, h[3].payload, h[3].sender) == (RECALL, 1, b"", "alice")
    assert store.history(AB, 0, 10)[0].payload == b""
    inbox = [m for _, m in store.inbox_range("bob", 0, 10)]
    assert [(m.seq, m.kind, m.recalled, m.payload) for m in inbox] == [
        (1, 0, True, b""), (2, 0, False, b"second"), (3, RECALL, False, b""),
    ]
    # unread counts ignore it (and the RECALL entry): only "second"
    assert store.unread("bob", AB) == 1
    (session,) = store.read([LoadSession("bob", "phone")])
    assert [s.unread for s in session.conversations if s.conv == AB] == [1]
    (marked,) = mk.commit(store, MarkRead("bob", AB, 0))
    assert marked.unread == 1
    if isinstance(store, LmdbStore):
        # No value in any sub-database holds the payload any more.
        env = store._env
        with env.begin() as txn:
            for name in ("msgs", "convidx", "inbox", "dedupe", "events"):
                for _, value in txn.cursor(db=getattr(store, "_" + name)):
                    assert SECRET not in bytes(value), name


def test_edit_replaces_the_payload_and_edit_entries_read_the_current_one(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice", "bob", "carol"], now=1)
    mk.commit(store, mk(GROUP, "alice", payload=b"v1"))
    (e1,) = mk.commit(store, amend(mk, GROUP, "alice", 1, EDIT, b"v2"))
    (e2,) = mk.commit(store, amend(mk, GROUP, "alice", 1, EDIT, b"v3"))
    assert (e1.seq, e2.seq) == (2, 3) and [u for u, _ in e2.positions] == ["alice", "bob", "carol"]
    h = history(store, "carol", GROUP)
    assert (h[1].payload, h[1].edited, h[1].recalled) == (b"v3", e2.server_time, False)
    # an EDIT entry stores no payload of its own: it reads the message's now
    assert [(m.kind, m.target, m.payload) for m in (h[2], h[3])] == [(EDIT, 1, b"v3"), (EDIT, 1, b"v3")]
    assert [m.payload for _, m in store.inbox_range("bob", 0, 10)] == [b"v3", b"v3", b"v3"]
    assert store.unread("bob", GROUP) == 1  # edits are not messages
    # a recall then empties the edit entries too
    mk.commit(store, amend(mk, GROUP, "alice", 1, RECALL))
    assert [m.payload for _, m in store.inbox_range("bob", 0, 10)] == [b"", b"", b"", b""]
    assert history(store, "bob", GROUP)[1].edited == e2.server_time


def test_delete_for_self_reaches_only_the_users_inbox_and_takes_no_seq(store: Store, mk: Maker) -> None:
    mk.commit(store, mk(AB, "alice", payload=b"hi"), mk(AB, "bob", payload=b"yo"))
    bob_head, alice_head = store.inbox_head("bob"), store.inbox_head("alice")
    (res,) = mk.commit(store, amend(mk, AB, "bob", 1, DELETE))
    assert isinstance(res, Appended) and res.seq == 0 and res.positions == (("bob", bob_head + 1),)
    assert store.last_seq(AB) == 2 and store.inbox_head("alice") == alice_head
    (pos, entry), = store.inbox_range("bob", bob_head, 10)
    assert (entry.kind, entry.seq, entry.target, entry.payload) == (DELETE, 0, 1, b"")
    assert store.message(res.msg_id).kind == DELETE
    hb, ha = history(store, "bob"), history(store, "alice")
    assert (hb[1].deleted, hb[1].payload) == (True, b"") and hb[2].payload == b"yo"
    assert (ha[1].deleted, ha[1].payload) == (False, b"hi")  # only for bob
    # the same user may delete their own messages for themselves too
    (res,) = mk.commit(store, amend(mk, AB, "bob", 2, DELETE))
    assert res.seq == 0 and history(store, "bob")[2].deleted


def test_who_may_amend_what_and_until_when(store: Store, mk: Maker) -> None:
    store.create_group(GROUP, ["alice", "bob"], now=1)
    mk.commit(store, mk(GROUP, "alice", payload=b"m"))  # 1
    store.add_members(GROUP, ["dave"], now=mk.time + 10)  # 2: JOINED entry
    mk.time += 20
    cases = [
        (amend(mk, GROUP, "bob", 1, RECALL), ErrorCode.NOT_SENDER),
        (amend(mk, GROUP, "bob", 1, EDIT, b"x"), ErrorCode.NOT_SENDER),
        (amend(mk, GROUP, "alice", 2, RECALL), ErrorCode.NO_SUCH_MESSAGE),  # a membership entry
        (amend(mk, GROUP, "alice", 99, EDIT, b"x"), ErrorCode.NO_SUCH_MESSAGE),  # beyond the last seq
        (amend(mk, GROUP, "dave", 1, DELETE), ErrorCode.NO_SUCH_MESSAGE),  # said before dave joined
        (amend(mk, GROUP, "erin", 1, RECALL), ErrorCode.NOT_MEMBER),
        (amend(mk, GROUP, "erin", 1, DELETE), ErrorCode.NOT_MEMBER),
        (amend(mk, "nosuch", "alice", 1, RECALL), ErrorCode.UNKNOWN_CONVERSATION),
        (amend(mk, "d:bob:alice", "alice", 1, RECALL), ErrorCode.BAD_REQUEST),
        (amend(mk, GROUP, "alice", 1, RECALL, window=5), ErrorCode.TOO_LATE),  # 20+ µs after the message
    ]
    results = mk.commit(store, *[op for op, _ in cases])
    assert [r for r in results] == [Rejected(code) for _, code in cases]
    # inside the window; then the recalled message can be neither edited nor recalled
    (ok,) = mk.commit(store, amend(mk, GROUP, "alice", 1, RECALL, window=10**9))
    assert isinstance(ok, Appended) and ok.seq == 3
    again = mk.commit(store, amend(mk, GROUP, "alice", 1, RECALL), amend(mk, GROUP, "alice", 1, EDIT, b"y"))
    assert again == (Rejected(ErrorCode.RECALLED), Rejected(ErrorCode.RECALLED))
    # a tombstone may still be deleted for oneself
    (d,) = mk.commit(store, amend(mk, GROUP, "bob", 1, DELETE))
    assert isinstance(d, Appended)


def test_a_member_who_cannot_see_a_message_gets_none_of_its_amends(store: Store, mk: Maker) -> None:
    # A new user's trial (HIGH): dave, added without history access, was
    # pushed the EDIT entry of a message from before he joined -- with its
    # new text -- read it in history, and saw the RECALL entry of another.
    store.create_group(GROUP, ["alice", "bob"], now=1)
    mk.commit(store, mk(GROUP, "alice", payload=b"launch code 1234"), mk(GROUP, "alice", payload=b"old"))  # 1, 2
    store.add_members(GROUP, ["dave"], now=mk.time + 10)  # 3: JOINED
    mk.time += 20
    dave_head = store.inbox_head("dave")
    (edit,) = mk.commit(store, amend(mk, GROUP, "alice", 1, EDIT, b"launch code is now 9999"))  # 4
    (recall,) = mk.commit(store, amend(mk, GROUP, "alice", 2, RECALL))  # 5
    assert (edit.seq, recall.seq) == (4, 5)
    assert [u for u, _ in edit.positions] == [u for u, _ in recall.positions] == ["alice", "bob"]
    assert store.inbox_head("dave") == dave_head
    mk.commit(store, mk(GROUP, "bob", payload=b"welcome"))  # 6
    # Nor does the next message bring them (Redis's fan-out fills the gap
    # in his delivered seqs from the log: not with these).
    assert [(m.seq, m.kind) for _, m in store.inbox_range("dave", 0, 10)] == [(3, MessageKind.JOINED), (6, 0)]
    # His history skips them, and a page still fills up to its limit.
    assert sorted(history(store, "dave", GROUP)) == [3, 6]
    pages = store.read([ReadHistory(GROUP, "dave", 0, 2), ReadHistory(GROUP, "dave", 0, 2, True),
                        ReadHistory(GROUP, "dave", 3, 1), ReadHistory(GROUP, "dave", 6, 1, True)])
    assert [[m.seq for m in p.messages] for p in pages] == [[3, 6], [6, 3], [6], [3]]
    assert sorted(history(store, "bob", GROUP)) == [1, 2, 3, 4, 5, 6]
    # What he cannot see is no message of anyone's to him (not NOT_SENDER).
    cases = [amend(mk, GROUP, "dave", 1, EDIT, b"x", device="d"), amend(mk, GROUP, "dave", 1, RECALL, device="d")]
    assert mk.commit(store, *cases) == (Rejected(ErrorCode.NO_SUCH_MESSAGE),) * 2
    # With history access a new member sees them all, amends included.
    store.create_group("open", ["alice"], now=mk.time, history_visible=True)
    mk.commit(store, mk("open", "alice", payload=b"v1"))  # 1
    store.add_members("open", ["dave"], now=mk.time + 10)  # 2
    mk.time += 20
    (edit,) = mk.commit(store, amend(mk, "open", "alice", 1, EDIT, b"v2"))
    assert [u for u, _ in edit.positions] == ["alice", "dave"]
    assert sorted(history(store, "dave", "open")) == [1, 2, 3]


def test_an_edit_made_after_a_member_left_never_reaches_them(store: Store, mk: Maker) -> None:
    # A new user's trial (HIGH): carol, removed, read in history (and a
    # device of hers would have caught up on) the new text of a message
    # edited after she left.  The store keeps no older text, so to her it
    # is withheld: edited, no payload.
    store.create_group(GROUP, ["alice", "bob", "carol"], now=1)
    mk.commit(store, mk(GROUP, "alice", payload=b"plan A"), mk(GROUP, "alice", payload=b"lunch?"))  # 1, 2
    (e1,) = mk.commit(store, amend(mk, GROUP, "alice", 2, EDIT, b"lunch at 1?"))  # 3: she saw this one
    store.remove_members(GROUP, ["carol"], now=mk.time + 10)  # 4: LEFT
    mk.time += 20
    (e2,) = mk.commit(store, amend(mk, GROUP, "alice", 1, EDIT, b"plan B (carol must not know)"))  # 5
    (e3,) = mk.commit(store, amend(mk, GROUP, "alice", 2, EDIT, b"lunch at 2, carol out"))  # 6
    assert [u for u, _ in e2.positions] == ["alice", "bob"]
    for got in (history(store, "carol", GROUP), {m.seq: m for _, m in store.inbox_range("carol", 0, 10)}):
        assert sorted(got) == [1, 2, 3, 4]
        assert [(got[s].payload, got[s].edited) for s in (1, 2, 3)] == [
            (b"", e2.server_time), (b"", e3.server_time), (b"", 0)]
    h = history(store, "bob", GROUP)
    assert (h[1].payload, h[2].payload, h[3].payload) == (b"plan B (carol must not know)",) + (b"lunch at 2, carol out",) * 2
    # Back in the group, the message is hers again as it is now.
    store.add_members(GROUP, ["carol"], now=mk.time + 10)
    mk.time += 20
    assert history(store, "carol", GROUP)[1].payload == b"plan B (carol must not know)"


def test_the_host_may_recall_or_edit_anything_but_not_delete(store: Store, mk: Maker) -> None:
    mk.commit(store, mk(AB, "alice", payload=b"m"))
    host = amend(mk, AB, "alice", 1, EDIT, b"moderated")
    host = AmendMessage(host.msg_id, AB, SYSTEM, SYSTEM, 7, 0, host.server_time, EDIT, 1, b"moderated", b"d" * 16)
    (res,) = mk.commit(store, host)
    assert isinstance(res, Appended) and history(store, "bob")[2].sender == SYSTEM
    assert history(store, "bob")[1].payload == b"moderated"
    bad = AmendMessage(host.msg_id[:8] + b"x" * 8, AB, SYSTEM, SYSTEM, 8, 0, host.server_time + 1, DELETE, 1, b"", b"e" * 16)
    assert mk.commit(store, bad) == (Rejected(ErrorCode.BAD_REQUEST),)


def test_amend_retries_are_deduplicated_with_sends(store: Store, mk: Maker) -> None:
    mk.commit(store, mk(AB, "alice", payload=b"m"))
    op = amend(mk, AB, "alice", 1, EDIT, b"e", local_id=50)
    (first,) = mk.commit(store, op)
    retry = AmendMessage(op.msg_id[:8] + b"r" * 8, *[getattr(op, f) for f in AmendMessage.__slots__[1:]])
    (second, in_batch) = mk.commit(store, retry, retry)
    assert second == in_batch == Duplicate(first.msg_id, first.seq, first.server_time)
    assert store.last_seq(AB) == 2
    # the same local id with other content: a conflict, whether a send or an amend
    other = amend(mk, AB, "alice", 1, EDIT, b"other", local_id=50)
    send = mk(AB, "alice", local_id=50, payload=b"e")
    assert mk.commit(store, other, send) == (Rejected(ErrorCode.DUPLICATE_CONFLICT),) * 2
    # and an amend cannot reuse a send's local id
    assert mk.commit(store, amend(mk, AB, "alice", 1, RECALL, local_id=1)) == (Rejected(ErrorCode.DUPLICATE_CONFLICT),)


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": 0}, {"kind": 1}, {"kind": 6}, {"target": 0}, {"target": -1}, {"payload": b"x"},
        {"window": -1}, {"local_id": -1}, {"msg_id": b"short"}, {"sender": "bad id"},
        {"sender": SYSTEM},  # the host needs device SYSTEM too
    ],
)
def test_malformed_amend_is_bad_request(store: Store, mk: Maker, changes: dict) -> None:
    import dataclasses

    mk.commit(store, mk(AB, "alice"))
    op = dataclasses.replace(amend(mk, AB, "alice", 1, RECALL), **changes)
    assert mk.commit(store, op) == (Rejected(ErrorCode.BAD_REQUEST),)
    assert store.last_seq(AB) == 1


def test_an_edit_never_brings_back_a_message_deleted_for_oneself(store: Store, mk: Maker) -> None:
    # Found by a tester: bob deleted alice's message for himself, alice then
    # edited it, and bob got the new text through the EDIT entry.  Nothing of
    # a message a user deleted for themselves comes back to that user --
    # not in history, not in the inbox (catch-up), not through later edits.
    store.create_group(GROUP, ["alice", "bob", "carol"], 1)
    mk.commit(store, mk(GROUP, "alice", payload=b"secret-v1"))
    mk.commit(store, amend(mk, GROUP, "bob", 1, DELETE))
    (res,) = mk.commit(store, amend(mk, GROUP, "alice", 1, EDIT, b"secret-v2"))
    assert isinstance(res, Appended) and res.seq == 2
    bob = history(store, "bob", GROUP)
    assert (bob[1].deleted, bob[1].payload) == (True, b"")
    assert (bob[2].kind, bob[2].payload) == (EDIT, b"")
    carol = history(store, "carol", GROUP)
    assert carol[1].payload == carol[2].payload == b"secret-v2"
    inbox = [m for _, m in store.inbox_range("bob", 0, 10)]
    assert [(m.seq, m.kind, m.payload) for m in inbox if m.seq] == [(1, 0, b""), (2, EDIT, b"")]
    assert [m.deleted for m in inbox if m.seq == 1] == [True]
    assert [m.payload for _, m in store.inbox_range("carol", 0, 10)] == [b"secret-v2", b"secret-v2"]


def test_an_edit_whose_target_retention_removed_reads_with_no_payload(store: Store, mk: Maker) -> None:
    """Retention removes the edited message but keeps the EDIT entry: every
    read of the entry (history, inbox) gives it no payload, never an error."""
    from pimcore.store import Expire, ReadInbox

    mk.commit(store, mk(AB, "alice", payload=b"m"))
    (edit,) = mk.commit(store, amend(mk, AB, "alice", 1, EDIT, b"e"))
    assert isinstance(edit, Appended)
    mk.commit(store, Expire(mk.time + 10**12, 0, 1))
    assert {s: (m.kind, m.payload) for s, m in history(store, "bob").items()} == {2: (EDIT, b"")}
    (page,) = store.read([ReadInbox("bob", 0, 100)])
    assert [(m.seq, m.kind, m.payload) for _, m in page.entries] == [(2, EDIT, b"")]


def test_a_message_deleted_for_oneself_is_not_unread(store: Store, mk: Maker) -> None:
    # The trial: three posts from bob -> unread 3 for alice; alice deletes #1
    # for herself -> still 3.  A message she deleted is no longer one she
    # can read: every unread count leaves it out (unread, the session's
    # conversation states, MarkRead's result), for her alone.
    store.create_group(GROUP, ["alice", "bob", "carol"], now=1)
    mk.commit(store, mk(GROUP, "bob", payload=b"1"), mk(GROUP, "bob", payload=b"2"), mk(GROUP, "bob", payload=b"3"))
    assert store.unread("alice", GROUP) == 3
    (res,) = mk.commit(store, amend(mk, GROUP, "alice", 1, DELETE))
    assert isinstance(res, Appended)
    assert store.unread("alice", GROUP) == 2
    assert store.unread("carol", GROUP) == 3  # only for her
    (session,) = store.read([LoadSession("alice", "phone")])
    assert [s.unread for s in session.conversations if s.conv == GROUP] == [2]
    # a deleted message already read, or one before the marker, changes nothing
    (marked,) = mk.commit(store, MarkRead("alice", GROUP, 2))
    assert marked.unread == 1
    mk.commit(store, amend(mk, GROUP, "alice", 2, DELETE))
    assert store.unread("alice", GROUP) == 1
    mk.commit(store, amend(mk, GROUP, "alice", 3, DELETE))
    assert store.unread("alice", GROUP) == 0
    (marked,) = mk.commit(store, MarkRead("alice", GROUP, 0))
    assert marked.unread == 0
    assert store.unread("carol", GROUP) == 3
    # the same in a direct conversation
    mk.commit(store, mk(AB, "bob", payload=b"x"), mk(AB, "bob", payload=b"y"))
    mk.commit(store, amend(mk, AB, "alice", 2, DELETE))
    assert store.unread("alice", AB) == 1
