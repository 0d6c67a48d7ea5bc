"""The Redis Cluster test fixture (tests/_redis_cluster.py), and the premise
the Redis store is built on: a write that ``WAIT 1`` confirmed on its own
connection survives the kill -9 of its master, because the replica that
confirmed it is the one promoted.  Skipped without redis-server/coredis."""

from __future__ import annotations

import time

import pytest
import trio

pytestmark = pytest.mark.redis


async def test_cluster_is_up_with_a_replica_per_master(redis_cluster) -> None:
    import coredis

    roles = redis_cluster.roles()
    assert sorted(roles.values()) == ["master"] * 3 + ["slave"] * 3
    with trio.fail_after(30):
        async with coredis.RedisCluster("127.0.0.1", redis_cluster.ports[0]) as r:
            # One key per master: WAIT must report the replica everywhere.
            for tag in range(30):
                with r.ensure_replication(1, 2000):
                    assert await r.set(f"{{t{tag}}}:fixture", b"x")


async def test_replicated_writes_survive_the_kill_of_their_master(redis_cluster) -> None:
    import coredis

    key = "{c:failover}:n"
    with trio.fail_after(60):
        async with coredis.RedisCluster("127.0.0.1", redis_cluster.ports[0]) as r:
            await r.delete([key])
            for _ in range(50):
                with r.ensure_replication(1, 2000):
                    await r.incr(key)
        victim = redis_cluster.master_of(key)
        redis_cluster.kill(victim)
        # The replica is promoted after cluster-node-timeout; until then the
        # slot is down.  Read through a fresh client once it is served again.
        value = None
        deadline = time.monotonic() + 30
        while value is None and time.monotonic() < deadline:
            await trio.sleep(0.2)
            survivors = [p for p in redis_cluster.ports if redis_cluster.alive(p)]
            try:
                async with coredis.RedisCluster("127.0.0.1", survivors[0]) as r:
                    value = await r.get(key)
            except Exception:  # the slot has no master yet
                value = None
        assert value == b"50", "an INCR acknowledged after WAIT 1 was lost in the failover"
        assert redis_cluster.master_of(key) != victim
        # Leave the cluster as the session found it: 3 masters, 3 replicas.
        redis_cluster.restart(victim)
        await trio.to_thread.run_sync(redis_cluster.wait_healthy)
