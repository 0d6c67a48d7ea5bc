"""Read fan-out for large groups on the Redis Cluster store (issue 16): a
group above ``read_fanout_above`` members gets no inbox write per member; a
send writes the conversation log and entries only for the sender and the
members registered online, and the others take the log's entries when they
log in (ClusterOps.join_groups / pull).  Two brokers in this process play
two ``pimcore serve`` nodes over one namespace, with the threshold lowered
to 2 so a five-member group is "large".  Skipped without redis-server /
coredis (CI sets PIMCORE_REQUIRE_REDIS=1)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
import trio

from pimcore.embed import Posted
from pimcore.frames import MessageKind

from _redis_nodes import login, two_nodes

pytestmark = [pytest.mark.redis]



async def take(client: Any, conv: str, n: int) -> list[Any]:
    """The next ``n`` chat messages (kind MESSAGE) of ``conv``."""
    out: list[Any] = []
    async for m in client.messages():
        if m.conv == conv and m.kind == MessageKind.MESSAGE:
            out.append(m)
            if len(out) == n:
                return out
    raise AssertionError("closed")


def head(node: Any, user: str) -> Any:
    return node.server.store.inbox_head(user)


async def test_a_large_group_writes_no_entry_for_offline_members_and_they_catch_up_at_login(
        redis_cluster, tmp_path) -> None:
    with trio.fail_after(90):
        async with two_nodes(redis_cluster, tmp_path, read_fanout_above=2) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("g:big", ["ann", "bob", "cat", "dan", "eve"])
            ann = await login(stack, nodes[0], "ann")
            bob = await login(stack, nodes[1], "bob")
            cat_head = await head(nodes[0], "cat")
            for i in range(6):
                await ann.send("g:big", b"m%d" % i)
            got = await take(bob, "g:big", 6)
            assert [m.payload for m in got] == [b"m%d" % i for i in range(6)]
            # Read fan-out: nothing was written to cat's inbox (offline) ...
            assert await head(nodes[0], "cat") == cat_head
            # ... but her unread count comes from the log: exact already.
            assert await nodes[1].unread("cat", "g:big") == 6
            # cat logs in on either node: the six arrive once, in order.
            cat = await login(stack, nodes[1], "cat")
            got = await take(cat, "g:big", 6)
            assert [m.payload for m in got] == [b"m%d" % i for i in range(6)]
            assert [m.seq for m in got] == sorted({m.seq for m in got})
            # Online now: the next ones reach her live (registered online).
            await bob.send("g:big", b"live")
            with trio.fail_after(5):  # not the periodic pull (10 s)
                (m,) = await take(cat, "g:big", 1)
            assert m.payload == b"live"
            assert await head(nodes[0], "cat") > cat_head
            # dan stays offline throughout: still no entry for him.
            assert await head(nodes[0], "dan") == cat_head


async def test_membership_bounds_what_a_pull_gives(redis_cluster, tmp_path) -> None:
    """A member removed before some messages and one added after them pull
    exactly the seqs they were members for."""
    with trio.fail_after(90):
        async with two_nodes(redis_cluster, tmp_path, read_fanout_above=2) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("g:club", ["ann", "bob", "cat", "dan"])
            ann = await login(stack, nodes[0], "ann")
            await ann.send("g:club", b"before")
            await nodes[0].remove_members("g:club", ["dan"])
            await ann.send("g:club", b"middle")
            await nodes[1].add_members("g:club", ["fay"])
            await ann.send("g:club", b"after")
            dan = await login(stack, nodes[1], "dan")
            fay = await login(stack, nodes[0], "fay")
            assert [m.payload for m in await take(dan, "g:club", 1)] == [b"before"]
            assert [m.payload for m in await take(fay, "g:club", 1)] == [b"after"]
            # Nothing more is pending for either (a later message is the next).
            await ann.send("g:club", b"last")
            assert [m.payload for m in await take(fay, "g:club", 1)] == [b"last"]
            with trio.move_on_after(1.0) as late:
                await take(dan, "g:club", 1)
            assert late.cancelled_caught, "a removed member got a later message"


async def test_a_member_added_while_online_gets_the_group_live(redis_cluster, tmp_path) -> None:
    with trio.fail_after(90):
        async with two_nodes(redis_cluster, tmp_path, read_fanout_above=2) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("g:open", ["ann", "bob", "cat"])
            ann = await login(stack, nodes[0], "ann")
            gus = await login(stack, nodes[1], "gus")
            await nodes[0].add_members("g:open", ["gus"])
            await ann.send("g:open", b"welcome")
            with trio.fail_after(5):  # not the periodic pull (10 s)
                (m,) = await take(gus, "g:open", 1)
            assert m.payload == b"welcome"


async def test_a_lost_registration_is_repaired_by_the_periodic_pull(redis_cluster, tmp_path) -> None:
    """The group's online-member record of an online user vanishes (a
    failover lost it, a logout raced a login): the periodic pull still
    brings the messages, within a few re-checks."""
    with trio.fail_after(90):
        async with two_nodes(redis_cluster, tmp_path, read_fanout_above=2) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("g:lossy", ["ann", "bob", "cat"])
            ann = await login(stack, nodes[0], "ann")
            bob = await login(stack, nodes[1], "bob")
            store = nodes[1].server.store
            cluster = store.cluster
            cluster.recheck = 0.05
            # After the login is recorded (device_online registers again first).
            while not await store._r.hvals(cluster.online_key("bob")):
                await trio.sleep(0.02)
            await store._r.hdel(cluster.on_key("g:lossy"), ["bob"])
            await ann.send("g:lossy", b"hello")
            with trio.fail_after(10):  # ten re-checks of 0.05 s, on a loaded machine
                (m,) = await take(bob, "g:lossy", 1)
            assert m.payload == b"hello"


async def test_a_large_group_pull_over_many_messages_is_chunked_and_complete(redis_cluster, tmp_path) -> None:
    from pimcore.store import redis_scripts

    with trio.fail_after(120):
        async with two_nodes(redis_cluster, tmp_path, read_fanout_above=2) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("g:busy", ["ann", "bob", "cat"])
            ann = await login(stack, nodes[0], "ann")
            n = 2 * redis_scripts._PULL_CHUNK + 7
            posts = [{"sender": "ann", "device": "srv", "conv": "g:busy", "payload": b"%d" % i} for i in range(n)]
            for k in range(0, n, 200):
                res = await nodes[0].post_many(posts[k:k + 200])
                assert not [r for r in res if not isinstance(r, Posted)], res[:1]
            cat = await login(stack, nodes[1], "cat")
            got = await take(cat, "g:busy", n)
            assert [m.payload for m in got] == [b"%d" % i for i in range(n)]
            del ann


def test_the_threshold_comes_from_file_or_environment_and_is_checked(tmp_path) -> None:
    """[store] read_fanout_above (PIMCORE_STORE_READ_FANOUT_ABOVE): an int
    >= 0, for a Redis store only; RedisStore refuses anything else."""
    from pimcore.config import ConfigError, load_settings
    from pimcore.store.redis import READ_FANOUT_ABOVE, RedisStore

    url = "redis://10.0.0.1:7000"
    conf = tmp_path / "pimcore.toml"
    conf.write_text(f'[store]\nurl = "{url}"\nread_fanout_above = 250\n')
    s = load_settings(str(conf), env={})
    assert s.store_read_fanout_above == 250
    assert s.effective()["store"]["read_fanout_above"] == 250
    assert load_settings(env={"PIMCORE_STORE": url, "PIMCORE_STORE_READ_FANOUT_ABOVE": "7"}).store_read_fanout_above == 7
    assert "read_fanout_above" not in load_settings(env={"PIMCORE_STORE": url}).effective()["store"]
    with pytest.raises(ConfigError, match="store.read_fanout_above: must be >= 0"):
        load_settings(env={"PIMCORE_STORE": url, "PIMCORE_STORE_READ_FANOUT_ABOVE": "-1"})
    with pytest.raises(ConfigError, match="read_fanout_above"):
        load_settings(env={"PIMCORE_STORE": url, "PIMCORE_STORE_READ_FANOUT_ABOVE": "many"})
    with pytest.raises(ConfigError, match="store.read_fanout_above: only for a Redis store"):
        load_settings(env={"PIMCORE_STORE_READ_FANOUT_ABOVE": "5"})
    assert RedisStore([("a", 1)]).read_fanout_above == READ_FANOUT_ABOVE
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ValueError, match="read_fanout_above"):
            RedisStore([("a", 1)], read_fanout_above=bad)


async def test_members_online_when_the_group_is_created_or_small_get_it_live_once_large(redis_cluster, tmp_path) -> None:
    """Logged in before the group existed (not in their login's group list),
    or added while it was below the threshold: still live once it is large."""
    with trio.fail_after(90):
        async with two_nodes(redis_cluster, tmp_path, read_fanout_above=3) as nodes, AsyncExitStack() as stack:
            ann = await login(stack, nodes[0], "ann")
            bob = await login(stack, nodes[1], "bob")
            hal = await login(stack, nodes[0], "hal")
            for u in ("ann", "bob", "hal"):
                while not await nodes[0].server.store._r.hvals(nodes[0].server.store.cluster.online_key(u)):
                    await trio.sleep(0.02)
            await nodes[0].create_group("g:new", ["ann", "bob", "cat"])  # 3: write fan-out
            await nodes[1].add_members("g:new", ["hal"])  # hal online, group small
            await nodes[1].add_members("g:new", ["ivy", "jon"])  # 6: read fan-out from now on
            await ann.send("g:new", b"big now")
            with trio.fail_after(5):  # not the periodic pull (10 s)
                (m,) = await take(bob, "g:new", 1)
                (h,) = await take(hal, "g:new", 1)
            assert m.payload == h.payload == b"big now"


USERS = ("u0", "u1", "u2", "u3", "u4", "u5")
_step = st.one_of(
    st.tuples(st.just("send"), st.sampled_from(USERS), st.sampled_from(("g:one", "g:two"))),
    st.tuples(st.just("add"), st.sampled_from(USERS), st.sampled_from(("g:one", "g:two"))),
    st.tuples(st.just("remove"), st.sampled_from(USERS), st.sampled_from(("g:one", "g:two"))),
    st.tuples(st.just("login"), st.sampled_from(USERS), st.none()),
    st.tuples(st.just("logout"), st.sampled_from(USERS), st.none()),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps=st.lists(_step, min_size=1, max_size=30))
@example(steps=[("login", "u5", None), ("add", "u5", "g:one"), ("send", "u0", "g:one")])
@example(steps=[("send", "u0", "g:one"), ("login", "u3", None), ("add", "u3", "g:one"), ("send", "u0", "g:one")])
@example(steps=[("login", "u1", None), ("logout", "u1", None), ("send", "u0", "g:one"), ("login", "u1", None)])
@example(steps=[("remove", "u0", "g:one"), ("remove", "u1", "g:one"), ("remove", "u2", "g:one")])  # (CI: the last member)
def test_read_fanout_gives_every_member_the_entries_the_memory_store_gives(redis_cluster, steps) -> None:
    """Random sends, joins, leaves, logins and logouts over two groups with
    read fan-out for every group (threshold 0), beside the memory store
    (write fan-out, the oracle).  Online users' inboxes hold, without any
    pull, exactly the (conversation, seq) entries the oracle gives them;
    everyone's does after a login; each entry once, each conversation's
    seqs in position order."""
    from pimcore.store import MemoryStore, NewMessage, WriteBatch
    from pimcore.store.base import LoadSession, StoreRequest

    from _redis_store import BlockingRedisStore

    memory = MemoryStore()
    redis = BlockingRedisStore(redis_cluster.addresses, read_fanout_above=0)
    try:
        for store in (memory, redis):
            store.create_group("g:one", ["u0", "u1", "u2"], now=1)
            store.create_group("g:two", ["u3", "u4"], now=1)
        online: set[str] = set()
        clock = 10_000_000
        batch = 0

        def login(user: str) -> None:
            redis.execute(StoreRequest(0, (LoadSession(user, "d"),), False))
            redis._run(redis.inner.cluster.device_online, user, "d")

        for kind, user, conv in steps:
            if kind == "send":
                clock += 1
                batch += 1
                op = NewMessage(clock.to_bytes(8, "big") + bytes(8), conv, user, "d", clock, clock, clock, b"x",
                                bytes(16))
                a, b = memory.commit(WriteBatch(batch, (op,)))[0], redis.commit(WriteBatch(batch, (op,)))[0]
                assert type(a) is type(b), (a, b)
            elif kind == "remove" and memory.members(conv) == (user,):
                # The last member: both stores refuse it (a group needs one).
                clock += 1
                for store in (memory, redis):
                    with pytest.raises(ValueError, match="at least one member"):
                        store.remove_members(conv, [user], now=clock)
                assert redis.members(conv) == (user,)
            elif kind in ("add", "remove"):
                clock += 1
                for store in (memory, redis):
                    (store.add_members if kind == "add" else store.remove_members)(conv, [user], now=clock)
            elif kind == "login" and user not in online:
                login(user)
                online.add(user)
            elif kind == "logout" and user in online:
                redis._run(redis.inner.cluster.device_offline, user, "d")
                online.discard(user)

        def entries(store: object, user: str) -> list[tuple[str, int]]:
            return [(m.conv, m.seq) for _, m in store.inbox_range(user, 0, 10_000)]  # type: ignore[attr-defined]

        def check(user: str) -> None:
            want, got = entries(memory, user), entries(redis, user)
            assert sorted(got) == sorted(want), (user, got, want)
            assert len(set(got)) == len(got), (user, got)
            for c in ("g:one", "g:two"):
                seqs = [s for cv, s in got if cv == c]
                assert seqs == sorted(seqs), (user, c, got)

        for user in sorted(online):
            check(user)
        for user in USERS:
            login(user)
            check(user)
    finally:
        redis.close()


async def test_a_purged_user_leaves_no_registration_or_change_list(redis_cluster, tmp_path) -> None:
    """PurgeUser over Redis removes what read fan-out and the re-check keep
    about the user: its online registrations in groups and its change list
    (but the revocation the purge makes, which other nodes must see)."""
    with trio.fail_after(90):
        async with two_nodes(redis_cluster, tmp_path, read_fanout_above=2) as nodes, AsyncExitStack() as stack:
            await nodes[0].create_group("g:gone", ["ann", "bob", "cat"])
            ann = await login(stack, nodes[0], "ann")
            bob = await login(stack, nodes[1], "bob")
            store = nodes[0].server.store
            cluster = store.cluster
            while not await store._r.hvals(cluster.online_key("bob")):
                await trio.sleep(0.02)
            await ann.send("g:gone", b"hi")
            await take(bob, "g:gone", 1)
            await nodes[1].set_conversation("bob", "g:gone", pinned=True)
            assert await store._r.hget(cluster.on_key("g:gone"), "bob") is not None
            await nodes[0].purge_user("bob")
            assert await store._r.hget(cluster.on_key("g:gone"), "bob") is None
            assert list(await store._r.zrange(cluster.change_key("bob"), 0, -1)) == [b"rv:"]
