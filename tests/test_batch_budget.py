"""The fan-out budget of a write batch (BrokerConfig.max_batch_entries).

A group message is one op of a batch but one inbox entry per member: 300
posts to a group of 20,000 were one commit of 6,000,000 entries (the
broker silent for 14.5 s, +560 MB for the results).  The core closes a
batch once the inbox entries its ops write would pass the budget, with the
group sizes it learned from the store's answers; an op larger than the
budget goes in a batch of its own, and a group the core has not seen an
answer for yet counts as the whole budget (alone) until it has.

Every test runs on the memory and LMDB stores and on both drivers (the
store answering at once and after a latency).
"""

from __future__ import annotations

import pytest

from pimcore import frames as F
from pimcore.core import BrokerConfig, ErrorCode
from pimcore.store import LmdbStore, MemoryStore, direct_conversation
from pimcore.store.base import AddMembers, AmendMessage, NewMessage

from _harness import Harness

DRIVERS = pytest.mark.parametrize("driver", ["inline", "latency"])


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os") if request.param == "lmdb" else MemoryStore()
    yield s
    s.close()


#: _post_many's first post, which the store holds while the others gather.
WARM = direct_conversation("x", "y")


def _messages(h: Harness) -> list[list[str]]:
    """The conversation of each NewMessage / AmendMessage, per write batch
    (but _post_many's warm-up)."""
    return [[op.conv for op in c.ops if isinstance(op, (NewMessage, AmendMessage)) and op.conv != WARM] for c in h.commits]


def _entries(h: Harness, batch: list[str]) -> int:
    return sum(len(h.store.members(conv)) if not conv.startswith("d:") else 2 for conv in batch)


def _post_many(h: Harness, conv: str, n: int) -> list:
    """``n`` posts proposed while the store holds the batch before them,
    then released: they are all pending when the next batch is taken."""
    h.hold_commits = True
    h.run(h.broker.post(WARM, b"warm-up", h.now))
    assert len(h.held) == 1
    refs = []
    for i in range(n):
        ref = h._next_ref
        h._next_ref += 1
        h.run(h.broker.post(conv, b"m%d" % i, h.now, ref=ref))
        refs.append(ref)
    h.release()
    h.hold_commits = False
    return [h.admin.pop(ref) for ref in refs]


@DRIVERS
def test_posts_to_a_large_group_are_split_at_the_default_budget(store, driver):
    # The default budget (262,144 entries) against 300 posts to a group of
    # 1,000: 300,000 entries, which were one batch.
    h = Harness(store, driver=driver)
    members = [f"u{i}" for i in range(1000)]
    h.create_group("big", members)
    done = _post_many(h, "big", 300)
    assert [d.code for d in done] == [ErrorCode.OK] * 300
    batches = [b for b in _messages(h) if b]
    assert max(_entries(h, b) for b in batches) <= BrokerConfig().max_batch_entries
    assert sum(len(b) for b in batches) == 300
    assert [m.payload for m in store.history("big", 0, 1000)] == [b"m%d" % i for i in range(300)]


@DRIVERS
def test_a_group_not_yet_answered_for_goes_alone_then_batches_fill_to_the_budget(store, driver):
    # Created in the store behind the core's back: its size is unknown
    # until the store's first answer about it.
    store.create_group("team", [f"u{i}" for i in range(50)], 1)
    h = Harness(store, BrokerConfig(max_batch_entries=200), driver=driver)
    done = _post_many(h, "team", 30)
    assert [d.code for d in done] == [ErrorCode.OK] * 30
    sizes = [len(b) for b in _messages(h) if b]
    # The first alone (size unknown), then 4 x 50 = 200 entries a batch.
    assert sizes == [1] + [4] * 7 + [1]
    assert [m.payload for m in store.history("team", 0, 100)] == [b"m%d" % i for i in range(30)]


@DRIVERS
def test_a_message_larger_than_the_budget_is_committed_alone(store, driver):
    h = Harness(store, BrokerConfig(max_batch_entries=20), driver=driver)
    h.create_group("wide", [f"u{i}" for i in range(30)])
    done = _post_many(h, "wide", 5)
    assert [d.code for d in done] == [ErrorCode.OK] * 5
    assert [len(b) for b in _messages(h) if b] == [1] * 5


@DRIVERS
def test_client_sends_to_direct_conversations_weigh_two_entries(store, driver):
    h = Harness(store, BrokerConfig(max_batch_entries=10), driver=driver)
    alice = h.login("alice", "phone")
    ab = direct_conversation("alice", "bob")
    h.hold_commits = True
    h.send(alice, ab, b"warm-up")
    for i in range(20):
        h.send(alice, ab, b"s%d" % i)
    h.release()
    h.hold_commits = False
    assert [a.code for a in h.acks(alice)] == [ErrorCode.OK] * 21
    assert [len(b) for b in _messages(h) if b] == [1, 5, 5, 5, 5]


@DRIVERS
def test_a_membership_change_through_the_core_updates_the_size_it_batches_by(store, driver):
    h = Harness(store, BrokerConfig(max_batch_entries=1000), driver=driver)
    h.create_group("grow", ["alice", "bob"])
    _post_many(h, "grow", 10)
    assert [len(b) for b in _messages(h) if b] == [10]  # 2 members: all fit
    h.commits.clear()
    h.add_members("grow", [f"u{i}" for i in range(98)])  # now 100 members
    done = _post_many(h, "grow", 25)
    assert [d.code for d in done] == [ErrorCode.OK] * 25
    assert [len(b) for b in _messages(h) if b] == [10, 10, 5]


@DRIVERS
def test_a_membership_change_of_a_group_of_unknown_size_is_committed_alone(store, driver):
    store.create_group("team", ["alice"], 1)
    h = Harness(store, BrokerConfig(max_batch_entries=1000), driver=driver)
    alice = h.login("alice", "phone")
    ab = direct_conversation("alice", "bob")
    h.hold_commits = True
    h.send(alice, ab, b"warm-up")
    h.send(alice, ab, b"before")
    h.run(h.broker.add_members("team", ["bob", "carol"], h.now, ref=5))
    h.send(alice, ab, b"after")
    h.release()
    h.hold_commits = False
    shapes = [[type(op).__name__ for op in c.ops if isinstance(op, (NewMessage, AddMembers))] for c in h.commits]
    # "after" (another conversation) rides along past the change.
    assert [s for s in shapes if s] == [["NewMessage"], ["NewMessage", "NewMessage"], ["AddMembers"]]
    assert h.admin.pop(5).members == ("alice", "bob", "carol")
    assert [m.payload for m in store.history(ab, 0, 10)] == [b"warm-up", b"before", b"after"]


def test_the_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_entries"):
        BrokerConfig(max_batch_entries=0)


@DRIVERS
def test_recalls_weigh_the_group_and_deletes_for_oneself_weigh_one(store, driver):
    from pimcore.frames import MessageKind

    h = Harness(store, BrokerConfig(max_batch_entries=100), driver=driver)
    h.create_group("team", ["alice"] + [f"u{i}" for i in range(24)])  # 25 members
    assert [d.code for d in _post_many(h, "team", 13)] == [ErrorCode.OK] * 13
    h.commits.clear()

    def amend_many(action: int, seqs, **kw) -> list:
        h.hold_commits = True
        h.run(h.broker.post(WARM, b"warm-up", h.now))
        refs = []
        for seq in seqs:
            ref = h._next_ref
            h._next_ref += 1
            h.run(h.broker.amend("team", seq, action, h.now, ref=ref, **kw))
            refs.append(ref)
        h.release()
        h.hold_commits = False
        return [h.admin.pop(ref).code for ref in refs]

    assert amend_many(MessageKind.RECALL, range(1, 9)) == [ErrorCode.OK] * 8
    assert [len(b) for b in _messages(h) if b] == [4, 4]  # 4 x 25 entries
    h.commits.clear()
    assert amend_many(MessageKind.DELETE, range(9, 14), sender="alice", device="phone") == [ErrorCode.OK] * 5
    assert [len(b) for b in _messages(h) if b] == [5]  # one entry each


@DRIVERS
def test_sends_taken_ahead_of_waiting_delivery_acks_keep_to_the_budget(store, driver):
    # ack_delay: a PushAck waits behind the sends (Broker._take_eager); the
    # sends the budget leaves out go in the next batch, in order, and the
    # ack still reaches the store.
    h = Harness(store, BrokerConfig(max_batch_entries=10, ack_delay=20_000), driver=driver)
    alice = h.login("alice", "phone")
    bob = h.login("bob", "phone")
    ab = direct_conversation("alice", "bob")
    h.send(alice, ab, b"first")
    h.take(bob)
    h.hold_commits = True
    h.send(alice, ab, b"warm-up")
    assert len(h.held) == 1
    h.feed(bob, F.PushAck(1))  # a lazy op, pending with the sends below
    for i in range(12):
        h.send(alice, ab, b"s%d" % i)
    h.release()
    h.hold_commits = False
    h.advance(20_000)
    assert [a.code for a in h.acks(alice)] == [ErrorCode.OK] * 14
    assert [len(b) for b in _messages(h) if b][-3:] == [5, 5, 2]
    assert [m.payload for m in store.history(ab, 0, 20)] == [b"first", b"warm-up"] + [b"s%d" % i for i in range(12)]
    assert dict((d.device, d.position) for d in store.devices("bob"))["phone"] >= 1


# ---------------------------------------------------------------- served: a large batch commits off the loop


@pytest.mark.parametrize("durability", ["sync", "os", "log"])
async def test_a_served_broker_commits_a_large_fanout_in_a_worker_thread(tmp_path, durability):
    # The store is LMDB, committing on the event loop (commit_in_thread
    # off): a batch of 16,384 inbox entries or more goes to a worker
    # thread instead, so the loop keeps serving while it is written and
    # synced; small batches stay on the loop.  With ``log`` durability the
    # loop owns a deferred LMDB transaction: it commits that first, and the
    # large batch is logged and committed on its own in the thread.
    import threading

    import trio

    from _net import RawConn, serving

    store = LmdbStore(str(tmp_path / "db"), durability=durability)
    store.create_group("huge", [f"u{i}" for i in range(20_000)], 1)
    real = store.commit
    threads: list[tuple[str, bool]] = []

    def commit(batch):
        kinds = {op.conv for op in batch.ops if isinstance(op, (NewMessage, AddMembers))}
        for conv in kinds:
            threads.append((conv, threading.current_thread() is threading.main_thread()))
        return real(batch)

    store.commit = commit  # type: ignore[method-assign]
    try:
        with trio.fail_after(60):
            async with serving(store) as srv:
                raw = await RawConn.open(srv.endpoints[0].port)
                await raw.login("u1")
                await raw.send(F.SendReq(1, "huge", 0, b"to all"))
                ack = await raw.until(F.SendAck)
                assert ack.code == ErrorCode.OK
                await raw.send(F.SendReq(2, direct_conversation("u1", "u2"), 0, b"to one"))
                ack = await raw.until(F.SendAck)
                assert ack.code == ErrorCode.OK
                # A membership change: 2 users x 20,002 members (the size the
                # message's answer told), off the loop too; a small one on it.
                await srv.add_members("huge", ["n1", "n2"])
                await srv.create_group("small", ["u1"])
                await srv.add_members("small", ["u2"])
                await raw.aclose()
    finally:
        store.close()
    assert threads == [("huge", False), (direct_conversation("u1", "u2"), True), ("huge", False), ("small", True)]
    store = LmdbStore(str(tmp_path / "db"), durability=durability)
    try:
        assert store.inbox_head("u19999") == 3  # the message, n1 and n2 JOINED
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize("map_size", [1 << 20, 1 << 30])
async def test_log_durability_large_batches_in_a_thread_alongside_loop_traffic(tmp_path, map_size):
    # log durability: the loop owns the deferred transaction, commits it, and
    # hands each large batch to a worker, while small sends, reads on the
    # loop's thread and admin writes go on; with a 1 MiB map it grows (and
    # checkpoints) in the worker's commits too.  Nothing acked is lost,
    # reordered or duplicated, and nothing deadlocks.  (After the re-check
    # pass of adde551.)
    import threading

    import trio

    from _net import RawConn, serving

    store = LmdbStore(str(tmp_path / "db"), durability="log", map_size=map_size)
    store.create_group("huge", [f"u{i}" for i in range(20_000)], 1)
    big_acked: list[tuple[int, int]] = []
    small_acked: list[tuple[int, int]] = []
    on_loop: set[bool] = set()
    real = store.commit

    def commit(batch):
        on_loop.add(threading.current_thread() is threading.main_thread())
        return real(batch)

    store.commit = commit  # type: ignore[method-assign]
    dm = direct_conversation("a", "b")
    try:
        with trio.fail_after(240):
            async with serving(store) as srv:
                big = await RawConn.open(srv.endpoints[0].port)
                await big.login("u0")
                small = await RawConn.open(srv.endpoints[0].port)
                await small.login("a")
                done = trio.Event()

                async def post_big():
                    for i in range(1, 31):
                        await big.send(F.SendReq(i, "huge", 0, b"big%d" % i))
                        ack = await big.until(F.SendAck)
                        assert ack.code == ErrorCode.OK, ack
                        big_acked.append((i, ack.seq))
                    done.set()

                async def post_small():
                    i = 0
                    while not done.is_set():
                        i += 1
                        await small.send(F.SendReq(i, dm, 0, b"s%d" % i))
                        ack = await small.until(F.SendAck)
                        assert ack.code == ErrorCode.OK, ack
                        small_acked.append((i, ack.seq))

                async def reads():
                    while not done.is_set():
                        store.inbox_head("u5")
                        store.history("huge", 0, 5, backward=True)
                        await trio.sleep(0.003)

                async def admin():
                    await srv.create_group("g", ["a"])
                    n = 0
                    while not done.is_set():
                        n += 1
                        await srv.add_members("g", [f"x{n}"])
                        await trio.sleep(0.01)

                async with trio.open_nursery() as nursery:
                    for fn in (post_big, post_small, reads, admin):
                        nursery.start_soon(fn)
                await big.aclose()
                await small.aclose()
    finally:
        store.close()
    assert on_loop == {True, False}
    store = LmdbStore(str(tmp_path / "db"), durability="log")
    try:
        history = store.history("huge", 0, 1000)
        assert [(m.payload, m.seq) for m in history] == [(b"big%d" % i, seq) for i, seq in big_acked]
        history = store.history(dm, 0, 100_000)
        assert [(m.payload, m.seq) for m in history] == [(b"s%d" % i, seq) for i, seq in small_acked]
        assert store.inbox_head("u19999") == len(big_acked)
    finally:
        store.close()


# ---------------------------------------------------------------- a backlog holds up only its own


@DRIVERS
def test_messages_behind_a_backlog_of_large_group_messages_ride_along(store, driver):
    # New-user pass: one post of 1,000 messages to a group of 20,000 held
    # up a post to a two-member group for 77 s (every commit of the
    # backlog).  Messages of other conversations, and of other senders,
    # now ride along in the next batch; the backlog keeps its order.
    h = Harness(store, BrokerConfig(max_batch_entries=200), driver=driver)
    h.create_group("team", ["alice"] + [f"u{i}" for i in range(49)])  # 50 members
    h.create_group("pair", ["a", "b"])
    alice = h.login("alice", "phone")
    carol = h.login("carol", "phone")
    ab, cd = direct_conversation("alice", "bob"), direct_conversation("carol", "dave")
    h.hold_commits = True
    h.run(h.broker.post(WARM, b"warm-up", h.now))
    assert len(h.held) == 1
    refs = []
    for i in range(12):  # 600 entries: three batches of the budget
        refs.append(h._next_ref)
        h._next_ref += 1
        h.run(h.broker.post("team", b"t%d" % i, h.now, ref=refs[-1]))
    h.send(alice, "team", b"alice to team")  # behind the backlog: its conversation
    h.send(alice, ab, b"alice to bob")  # behind alice's own send to team
    h.send(carol, cd, b"carol to dave")  # rides along
    small = h._next_ref
    h._next_ref += 1
    h.run(h.broker.post("pair", b"to the pair", h.now, ref=small))  # rides along (the host's)
    h.release()
    h.hold_commits = False
    batches = [b for b in _messages(h) if b]
    assert batches[0] == ["team"] * 4 + [cd, "pair"]
    assert batches[1:] == [["team"] * 4, ["team"] * 4, ["team", ab]]
    assert h.admin.pop(small).code == ErrorCode.OK
    assert [h.admin.pop(r).code for r in refs] == [ErrorCode.OK] * 12
    assert [m.payload for m in store.history("team", 0, 20)] == [b"t%d" % i for i in range(12)] + [b"alice to team"]
    assert [a.code for a in h.acks(alice)] == [ErrorCode.OK, ErrorCode.OK]
    assert [a.code for a in h.acks(carol)] == [ErrorCode.OK]


@DRIVERS
def test_a_group_creation_weighs_its_members(store, driver):
    h = Harness(store, BrokerConfig(max_batch_entries=100), driver=driver)
    h.hold_commits = True
    h.run(h.broker.post(WARM, b"warm-up", h.now))
    h.run(h.broker.create_group("g1", [f"u{i}" for i in range(60)], h.now, ref=1))
    h.run(h.broker.create_group("g2", [f"u{i}" for i in range(60)], h.now, ref=2))
    h.release()
    h.hold_commits = False
    from pimcore.store.base import CreateGroup

    shapes = [[op.conv for op in c.ops if isinstance(op, CreateGroup)] for c in h.commits]
    assert [s for s in shapes if s] == [["g1"], ["g2"]]


@DRIVERS
def test_one_message_to_a_group_of_unknown_size_rides_along_per_batch(store, driver):
    # Re-check pass: after a restart (or for a group made with the CLI) the
    # core knows no group's size, and a message to such a group waited for
    # the whole backlog (35 s behind 1,000 posts to a group of 15,000).
    # One of them rides along per batch: its answer tells the size.
    store.create_group("s1", ["a", "b"], 1)
    store.create_group("s2", ["c", "d"], 1)
    h = Harness(store, BrokerConfig(max_batch_entries=200), driver=driver)
    h.create_group("team", [f"u{i}" for i in range(50)])
    h.hold_commits = True
    h.run(h.broker.post(WARM, b"warm-up", h.now))
    for i in range(12):
        h.run(h.broker.post("team", b"t%d" % i, h.now))
    h.run(h.broker.post("s1", b"to s1", h.now, sender="a", device="api"))
    h.run(h.broker.post("s2", b"to s2", h.now, sender="c", device="api"))
    h.run(h.broker.post("s1", b"to s1 again", h.now, sender="b", device="api"))
    h.release()
    h.hold_commits = False
    batches = [b for b in _messages(h) if b]
    # s2 waits a batch (one unknown group per batch), and s1's second
    # message rides along once s1's size is known.
    assert batches == [["team"] * 4 + ["s1"], ["team"] * 4 + ["s2", "s1"], ["team"] * 4]
    assert [m.payload for m in store.history("s1", 0, 10)] == [b"to s1", b"to s1 again"]
