"""RedisStore under a served broker: SDK clients chat over a Redis Cluster
store; acked means on a replica; a broker restarted on the same cluster loses
nothing.  (The store contract and the memory-model test run over Redis in
tests/test_store.py.)  Skipped without redis-server/coredis."""

from __future__ import annotations

import os

import pytest
import trio

from pimcore import frames as F
from pimcore.auth import JwtAuthenticator
from pimcore.errors import StoreError
from pimcore.net import open_broker_server
from pimcore.store import NewMessage, StoreRequest, direct_conversation

from _net import SECRET, client, server_config

pytestmark = pytest.mark.redis

AB = direct_conversation("alice", "bob")


async def _take(c, n: int) -> list[F.Message]:
    got: list[F.Message] = []
    async for m in c.messages():
        got.append(m)
        if len(got) == n:
            break
    return got


def _ns() -> str:
    return "t" + os.urandom(6).hex()


async def test_clients_chat_over_redis_and_a_restarted_broker_loses_nothing(redis_cluster) -> None:
    from pimcore.store.redis import RedisStore
    from pimcore.testing.chaos import open_chaos_proxy

    ns = _ns()
    N = 40
    with trio.fail_after(120):
        async with RedisStore.connect(redis_cluster.url, namespace=ns) as store:
            first_epoch = await store.epoch()
            async with open_broker_server(store, JwtAuthenticator(SECRET), server_config()) as srv:
                async with open_chaos_proxy("127.0.0.1", srv.endpoints[0].port) as proxy:
                    async with client(srv.url(), "alice") as a, client(f"tcp://127.0.0.1:{proxy.port}", "bob") as b:
                        received: dict[str, list[F.Message]] = {}

                        async def sender(c, name: str) -> None:
                            for i in range(N):
                                s = await c.send(AB, b"%s %03d" % (name.encode(), i))
                                # Acked means stored (and WAIT 1 confirmed it).
                                stored = await store.message(s.msg_id)
                                assert stored is not None and stored.seq == s.seq
                                if name == "alice" and i == N // 2:
                                    assert proxy.reset_all() >= 1  # bob reconnects mid-stream

                        async def receiver(c, name: str) -> None:
                            received[name] = await _take(c, N)

                        async with trio.open_nursery() as n:
                            n.start_soon(receiver, a, "alice")
                            n.start_soon(receiver, b, "bob")
                            n.start_soon(sender, a, "alice")
                            n.start_soon(sender, b, "bob")
                        assert [m.payload for m in received["alice"]] == [b"bob %03d" % i for i in range(N)]
                        assert [m.payload for m in received["bob"]] == [b"alice %03d" % i for i in range(N)]
                        assert b.statistics().connects >= 2
        # The broker is gone, the cluster keeps everything: a new broker on
        # the same namespace serves the same history; its epoch is new and
        # the old one is still trusted (the store lost nothing).
        async with RedisStore.connect(redis_cluster.url, namespace=ns) as store:
            assert await store.epoch() != first_epoch
            assert first_epoch in await store.epochs()
            async with open_broker_server(store, JwtAuthenticator(SECRET), server_config()) as srv:
                async with client(srv.url(), "alice", device="tablet") as a2:
                    final = await a2.fetch_history(AB, 0, 200)
                    assert [m.seq for m in final] == list(range(1, 2 * N + 1))
                    assert [m.payload for m in final if m.sender == "alice"] == [b"alice %03d" % i for i in range(N)]
                    assert [m.payload for m in final if m.sender == "bob"] == [b"bob %03d" % i for i in range(N)]
                    # A new device gets the whole offline inbox (nothing reclaimed).
                    got = await _take(a2, 2 * N)
                    assert sorted(m.seq for m in got) == list(range(1, 2 * N + 1))


def _msg(local_id: int, t: int) -> NewMessage:
    return NewMessage(
        msg_id=t.to_bytes(8, "big") + b"\x07" * 8, conv=AB, sender="alice", device="phone", local_id=local_id,
        client_time=t, server_time=t, payload=b"x%d" % local_id, digest=b"d%d" % local_id,
    )


async def test_no_result_when_no_replica_confirms_and_the_redo_record_completes_it(redis_cluster) -> None:
    """A master without its replica refuses writes (min-replicas-to-write 1)
    or WAIT reports 0: the request fails (outcome unknown) -- never a result
    that says durable.  Its redo record, on another master, survived: a store
    opened later replays it, so the client's retry (same local id) is a
    Duplicate of seq 2, and nothing is stored twice."""
    from pimcore.store import Appended, Duplicate
    from pimcore.store.redis import RedisStore

    while True:  # a namespace whose redo record is on another master than alice's slot
        ns = _ns()
        master = redis_cluster.master_of(f"{ns}:{{u:alice}}")
        if redis_cluster.master_of(f"{ns}:{{wal}}") != master:
            break
    with trio.fail_after(120):
        async with RedisStore.connect(redis_cluster.url, namespace=ns, wait_ms=300, settle=0.5) as store:
            [first] = await store.execute(StoreRequest(1, (_msg(1, 10),), True))
            assert isinstance(first, Appended)
            replica = next(p for p, role in redis_cluster.roles().items()
                           if role == "slave" and f"master_port:{master}" in redis_cluster.cli(p, "info", "replication"))
            redis_cluster.kill(replica)
            try:
                with pytest.raises(StoreError, match="not confirmed by a replica"):
                    await store.execute(StoreRequest(2, (_msg(2, 20),), True))
            finally:
                redis_cluster.restart(replica)
                await trio.to_thread.run_sync(redis_cluster.wait_healthy)
        async with RedisStore.connect(redis_cluster.url, namespace=ns, wait_ms=300) as store:
            [retry] = await store.execute(StoreRequest(3, (_msg(2, 20),), True))
            assert retry == Duplicate(_msg(2, 20).msg_id, 2, 20)
            assert [m.payload for m in await store.history(AB, 0, 10)] == [b"x1", b"x2"]
            assert [pos for pos, _ in await store.inbox_range("bob", 0, 10)] == [1, 2]
