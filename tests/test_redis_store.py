"""RedisStore under a served broker: SDK clients chat over a Redis Cluster
store; acked means on a replica; a broker restarted on the same cluster loses
nothing.  (The store contract and the memory-model test run over Redis in
tests/test_store.py.)  Skipped without redis-server/coredis."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack

import pytest
import trio

from pimcore import frames as F
from pimcore.auth import JwtAuthenticator
from pimcore.errors import StoreError
from pimcore.net import open_broker_server
from pimcore.store import NewMessage, StoreRequest, direct_conversation

from _net import SECRET, client, server_config

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


@pytest.mark.redis
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
        # the same namespace serves the same history in the same epoch (the
        # namespace's, shared by every node: the store lost nothing).
        async with RedisStore.connect(redis_cluster.url, namespace=ns) as store:
            assert await store.epoch() == first_epoch
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


@pytest.mark.redis
async def test_no_result_when_no_replica_confirms_and_the_retry_is_stored_once(redis_cluster) -> None:
    """A master without its replica refuses writes (min-replicas-to-write 1)
    or WAIT reports 0: the request fails (outcome unknown) -- never a result
    that says durable.  The client's retry (same local id) through a store
    opened later is then stored exactly once: a Duplicate of seq 2 if the
    first attempt got that far (its claim is finished), else seq 2 now."""
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
            assert retry in (Duplicate(_msg(2, 20).msg_id, 2, 20), Appended(_msg(2, 20).msg_id, 2, 20,
                                                                             retry.positions, 0))
            [again] = await store.execute(StoreRequest(4, (_msg(2, 20),), True))
            assert again == Duplicate(_msg(2, 20).msg_id, 2, 20)
            assert [m.payload for m in await store.history(AB, 0, 10)] == [b"x1", b"x2"]
            assert [pos for pos, _ in await store.inbox_range("bob", 0, 10)] == [1, 2]


@pytest.mark.redis
async def test_pimcore_serve_over_redis_survives_kill_9_of_the_broker(redis_cluster, tmp_path) -> None:
    """`pimcore serve --store redis://...` (then PIMCORE_STORE): two SDK
    clients chat, the broker is killed with SIGKILL and started again on the
    same port and cluster; the clients reconnect by themselves, every acked
    message is there once, in order, and the exchange goes on."""
    from pimcore.client import open_client

    from pimcore.client import ClientConfig

    from _proc import ProcGroup, free_port, token_for

    FAST = ClientConfig(connect_timeout=5.0, ack_timeout=2.0, send_timeout=10.0, backoff_max=0.5)

    async def in_thread(fn):
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)

    data = tmp_path / "data"
    ns = _ns()
    listen = f"tcp://127.0.0.1:{free_port()}"
    env = {"PIMCORE_STORE_NAMESPACE": ns}
    procs = ProcGroup()
    try:
        with trio.fail_after(120):
            server = await in_thread(lambda: procs.serve("--listen", listen, "--data-dir", data,
                                                         "--store", redis_cluster.url, env=env))
            assert f"data in {redis_cluster.url} (namespace {ns})" in server.banner
            a_tok = await in_thread(lambda: token_for("alice", data))
            b_tok = await in_thread(lambda: token_for("bob", data))
            async with open_client(server.url(), a_tok, "phone", config=FAST) as a, \
                    open_client(server.url(), b_tok, "phone", config=FAST) as b:
                acked = [await a.send(AB, b"m%02d" % i) for i in range(20)]
                got = await _take(b, 20)
                assert [m.payload for m in got] == [b"m%02d" % i for i in range(20)]
                server.kill()
                server = await in_thread(lambda: procs.serve("--listen", listen, "--data-dir", data,
                                                             env={**env, "PIMCORE_STORE": redis_cluster.url}))
                # The SDK reconnects to the same URL and resumes from its position.
                acked += [await a.send(AB, b"m%02d" % i) for i in range(20, 30)]
                got += await _take(b, 10)
                assert [m.payload for m in got] == [b"m%02d" % i for i in range(30)]
                assert [m.seq for m in got] == [s.seq for s in acked] == list(range(1, 31))
                history = await b.fetch_history(AB, 0, 100)
                assert [m.msg_id for m in history] == [s.msg_id for s in acked]
                assert a.statistics().connects >= 2 and b.statistics().connects >= 2
    finally:
        procs.close()


@pytest.mark.redis
async def test_an_embedded_broker_with_a_store_url_keeps_its_data_in_redis(redis_cluster, tmp_path, monkeypatch) -> None:
    """open_pimcore(config_file=...) with [store] url, then open_pimcore(data_dir=...)
    with $PIMCORE_STORE, and the threaded host with {"store": {"url": ...}}
    (the C ABI's document): all three store in the Redis Cluster -- each
    posts to the group the first made, and a RedisStore on the namespace
    reads every message back -- and none makes an LMDB store in its data
    directory.  They ignored store.url and wrote <data_dir>/store/data.mdb."""
    from pimcore.embed import open_pimcore
    from pimcore.store.redis import RedisStore
    from pimcore.threaded import open_pimcore_thread

    ns = _ns()
    conf = tmp_path / "pimcore.toml"
    conf.write_text(f'[store]\nurl = "{redis_cluster.url}"\nnamespace = "{ns}"\n')
    with trio.fail_after(60):
        async with open_pimcore(config_file=str(conf), data_dir=tmp_path / "a") as im:
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"from the file")
        with monkeypatch.context() as env:
            env.setenv("PIMCORE_STORE", redis_cluster.url)
            env.setenv("PIMCORE_STORE_NAMESPACE", ns)
            async with open_pimcore(data_dir=tmp_path / "b") as im:
                await im.post("team", b"from the environment")

        def threaded() -> None:
            with open_pimcore_thread(document={"data_dir": str(tmp_path / "c"),
                                               "store": {"url": redis_cluster.url, "namespace": ns}}) as im:
                im.post("team", b"from the document")

        await trio.to_thread.run_sync(threaded)
        async with RedisStore.connect(redis_cluster.url, namespace=ns) as store:
            history = await store.history("team", 0, 10)
    assert [m.payload for m in history if m.kind == 0] == [b"from the file", b"from the environment",
                                                            b"from the document"]
    for d in "abc":
        assert (tmp_path / d / "secret").exists() and not (tmp_path / d / "store").exists(), d


def test_the_store_url_comes_from_flag_file_or_environment(tmp_path) -> None:
    """--store, [store] url (or ``store = "URL"``) and PIMCORE_STORE; the
    default stays LMDB; a URL that is not redis://HOST:PORT,... is refused
    naming the key."""
    from pimcore.config import ConfigError, load_settings

    assert load_settings(env={}).store is None  # LMDB in <data_dir>/store
    url = "redis://10.0.0.1:7000,10.0.0.2:7001"
    conf = tmp_path / "pimcore.toml"
    conf.write_text(f'[store]\nurl = "{url}"\nnamespace = "chat"\n')
    s = load_settings(str(conf), env={})
    assert (s.store, s.store_namespace) == (url, "chat")
    assert s.effective()["store"] == {"namespace": "chat", "url": url}
    conf.write_text(f'store = "{url}"\n')
    assert load_settings(str(conf), env={}).store == url
    assert load_settings(env={"PIMCORE_STORE": url}).store == url
    assert load_settings(env={"PIMCORE_STORE": url}, store="redis://h:1").store == "redis://h:1"
    for bad in ("redis://", "http://h:1", "redis://h", "redis://h:99999"):
        with pytest.raises(ConfigError, match="store.url"):
            load_settings(env={"PIMCORE_STORE": bad})
    with pytest.raises(ConfigError, match="store.namespace"):
        load_settings(env={"PIMCORE_STORE": url, "PIMCORE_STORE_NAMESPACE": "a b"})


@pytest.mark.redis
@pytest.mark.slow
async def test_kill_9_of_a_redis_master_under_load_loses_no_acked_message(redis_cluster) -> None:
    """Two senders into two conversations of one recipient; the master
    holding one conversation's slot is killed with SIGKILL mid-stream and
    started again a second later (it rejoins as a replica).  The replica
    takes over (cluster-node-timeout 2 s) while sends wait or are retried by
    the SDK; then: every acked message delivered exactly once, in order,
    seqs gap-free, the history is exactly what was acked."""
    from pimcore.client import ClientConfig, open_client
    from pimcore.store.redis import RedisStore

    from _net import token

    cfg = ClientConfig(ack_timeout=2.0, send_timeout=60.0, connect_timeout=10.0, backoff_initial=0.05, backoff_max=0.5)
    CB = direct_conversation("bob", "carol")
    N = 120
    ns = _ns()
    conv_key = f"{ns}:{{c:{AB}}}"
    victim = redis_cluster.master_of(conv_key)
    acked: dict[str, list] = {AB: [], CB: []}
    got: list[F.Message] = []
    try:
        with trio.fail_after(180):
            async with RedisStore.connect(redis_cluster.url, namespace=ns) as store:
                async with open_broker_server(store, JwtAuthenticator(SECRET), server_config()) as srv:
                    async with open_client(srv.url(), token("alice"), "phone", config=cfg) as a, \
                            open_client(srv.url(), token("carol"), "phone", config=cfg) as c, \
                            open_client(srv.url(), token("bob"), "phone", config=cfg) as b:
                        killed = trio.Event()
                        start: list[float] = []
                        failover: list[float] = []

                        async def sender(cl, conv: str) -> None:
                            for i in range(N):
                                acked[conv].append(await cl.send(conv, b"%s %03d" % (conv.encode(), i)))
                                if conv == AB and i == N // 4:
                                    redis_cluster.kill(victim)
                                    start.append(trio.current_time())
                                    killed.set()
                                    n.start_soon(supervisor)

                        async def supervisor() -> None:
                            # As systemd would: the dead node is started again
                            # and rejoins as the new master's replica.  Until
                            # then that shard has no replica and, with
                            # min-replicas-to-write 1, takes no writes.
                            # Only once the replica was promoted, so the test is
                            # about a failover (a node back within the timeout
                            # would just be the master again).
                            def serving() -> int:
                                try:
                                    return redis_cluster.master_of(conv_key)
                                except RuntimeError:  # the slot has no master yet
                                    return victim

                            while await trio.to_thread.run_sync(serving) == victim:
                                await trio.sleep(0.2)
                            failover.append(trio.current_time() - start[0])
                            await trio.to_thread.run_sync(redis_cluster.restart, victim)

                        async def receiver() -> None:
                            async for m in b.messages():
                                if m.sender != "bob":
                                    got.append(m)
                                if len(got) == 2 * N:
                                    break

                        async with trio.open_nursery() as n:
                            n.start_soon(receiver)
                            n.start_soon(sender, a, AB)
                            n.start_soon(sender, c, CB)
                        assert killed.is_set()
                        print(f"acked {len(acked[AB]) + len(acked[CB])}, delivered {len(got)},"
                              f" distinct {len({m.msg_id for m in got})}, promoted after {failover[0]:.1f} s")
                        for conv in (AB, CB):
                            mine = [m for m in got if m.conv == conv]
                            # exactly once, in order, gap-free
                            assert [m.seq for m in mine] == list(range(1, N + 1)), conv
                            assert [m.msg_id for m in mine] == [s.msg_id for s in acked[conv]], conv
                            history = await b.fetch_history(conv, 0, 2 * N)
                            assert [m.msg_id for m in history] == [s.msg_id for s in acked[conv]], conv
                        assert redis_cluster.master_of(conv_key) != victim  # it did fail over
    finally:
        if not redis_cluster.alive(victim):
            redis_cluster.restart(victim)
        await trio.to_thread.run_sync(redis_cluster.wait_healthy)


def test_the_address_map_parses_and_comes_from_file_or_environment(tmp_path) -> None:
    """[store] address_map (PIMCORE_STORE_ADDRESS_MAP, comma-separated):
    ANNOUNCED_HOST:PORT=DIAL_HOST:PORT entries; anything else is refused
    naming the key, and so is a map without a Redis store."""
    from pimcore.config import ConfigError, load_settings
    from pimcore.store.redis import RedisStore, parse_address_map

    assert parse_address_map(["10.0.0.1:7000=127.0.0.1:17000", " [::1]:7001 = proxy:17001 "]) == {
        ("10.0.0.1", 7000): ("127.0.0.1", 17000), ("::1", 7001): ("proxy", 17001)}
    assert parse_address_map("a:1=b:2,c:3=d:4,") == {("a", 1): ("b", 2), ("c", 3): ("d", 4)}
    assert parse_address_map("a:1=b:2,a:1=b:2") == {("a", 1): ("b", 2)}  # the same twice is fine
    for bad in ("a:1", "a:1=b", "a=b:2", "a:1=b:0", "a:1=b:65536", "a:x=b:2", ":1=b:2", "a:1=b:2,a:1=c:2"):
        with pytest.raises(ValueError, match="address map"):
            parse_address_map(bad)
    store = RedisStore([("a", 1)], address_map=["a:1=b:2"])
    assert store.dial(("a", 1)) == ("b", 2) and store.dial(("c", 3)) == ("c", 3)
    assert RedisStore([("a", 1)], address_map={("a", 1): ("b", 2)}).dial(("a", 1)) == ("b", 2)

    url = "redis://10.0.0.1:7000"
    conf = tmp_path / "pimcore.toml"
    conf.write_text(f'[store]\nurl = "{url}"\naddress_map = ["10.0.0.1:7000=127.0.0.1:17000"]\n')
    s = load_settings(str(conf), env={})
    assert s.store_address_map == ("10.0.0.1:7000=127.0.0.1:17000",)
    assert s.effective()["store"]["address_map"] == ["10.0.0.1:7000=127.0.0.1:17000"]
    env = {"PIMCORE_STORE": url, "PIMCORE_STORE_ADDRESS_MAP": "10.0.0.1:7000=h:1, 10.0.0.2:7000=h:2"}
    assert load_settings(env=env).store_address_map == ("10.0.0.1:7000=h:1", "10.0.0.2:7000=h:2")
    assert "address_map" not in load_settings(env={"PIMCORE_STORE": url}).effective()["store"]
    with pytest.raises(ConfigError, match="store.address_map: bad address map entry"):
        load_settings(env={**env, "PIMCORE_STORE_ADDRESS_MAP": "10.0.0.1:7000"})
    with pytest.raises(ConfigError, match="store.address_map: only for a Redis store"):
        load_settings(env={"PIMCORE_STORE_ADDRESS_MAP": "a:1=b:2"})
    # A namespace without a Redis store was taken and ignored (a trial).
    with pytest.raises(ConfigError, match="store.namespace: only for a Redis store"):
        load_settings(env={"PIMCORE_STORE_NAMESPACE": "x"})
    assert load_settings(env={"PIMCORE_STORE": url, "PIMCORE_STORE_NAMESPACE": "x"}).store_namespace == "x"


def _connections_received(cluster, port: int) -> int:
    """How many connections the Redis node on ``port`` accepted so far
    (counting the one asking)."""
    for line in cluster.cli(port, "info", "stats").splitlines():
        if line.startswith("total_connections_received:"):
            return int(line.split(":")[1])
    raise AssertionError(f"no total_connections_received from {port}")


@pytest.mark.redis
async def test_with_an_address_map_every_connection_to_redis_goes_to_the_mapped_address(redis_cluster) -> None:
    """Every Redis node (as the cluster announces it) mapped to a proxy of
    its own: the seeds, the cluster client's connections (slot map, reads),
    the script connections (sends), the plain per-master clients (generic
    writes, the hint BLPOP) all dial the proxies: every connection a Redis
    node accepted meanwhile came from its proxy."""
    from pimcore.store import SetConversation
    from pimcore.store.redis import RedisStore
    from pimcore.testing.chaos import open_chaos_proxy

    ns = _ns()
    with trio.fail_after(120):
        before = {port: _connections_received(redis_cluster, port) for _, port in redis_cluster.addresses}
        async with AsyncExitStack() as stack:
            proxies = {port: await stack.enter_async_context(open_chaos_proxy(host, port))
                       for host, port in redis_cluster.addresses}
            amap = [f"{host}:{port}={p.host}:{p.port}" for (host, port), p in
                    zip(redis_cluster.addresses, proxies.values())]
            store = await stack.enter_async_context(RedisStore.connect(redis_cluster.url, namespace=ns,
                                                                       address_map=amap))
            srv = await stack.enter_async_context(open_broker_server(store, JwtAuthenticator(SECRET), server_config()))
            a = await stack.enter_async_context(client(srv.url(), "alice"))
            b = await stack.enter_async_context(client(srv.url(), "bob"))
            acked = [await a.send(AB, b"m%d" % i) for i in range(10)]
            got = await _take(b, 10)
            assert [m.msg_id for m in got] == [s.msg_id for s in acked]
            (res,) = await store.execute(StoreRequest(1, (SetConversation("alice", AB, 1, 0, 0),), True))
            assert type(res).__name__ == "ConversationSet", res
            assert [m.seq for m in await store.history(AB, 0, 20)] == list(range(1, 11))
            # The cluster client's slot map refreshed through the map too
            # (the discovery's own short connections).
            await store._refresh_layout()
        for port, proxy in proxies.items():
            # Minus 1: the connection asking.
            direct = _connections_received(redis_cluster, port) - before[port] - 1
            assert direct == proxy.statistics().connections_total, (port, direct, proxy.statistics())
        total = sum(p.statistics().connections_total for p in proxies.values())
        assert total >= 3, total  # the cluster client, the script connections, the hint client


@pytest.fixture
def standalone_redis(tmp_path):
    """One plain (non-cluster) ``redis-server`` on a free loopback port:
    its port.  Skipped without redis-server/coredis."""
    import shutil
    import socket
    import subprocess
    import time

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("coredis")
    pytest.importorskip("hiredis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {port} did not start")
                time.sleep(0.05)
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


def test_serve_on_a_standalone_redis_says_it_is_not_a_cluster(standalone_redis, tmp_path, monkeypatch, capsys):
    """`pimcore serve --store` at a reachable Redis that is not a cluster
    member: not "cannot reach" (it answered) but what it is and what to do."""
    from pimcore.cli import main

    _, port = standalone_redis
    monkeypatch.setenv("PIMCORE_SECRET", "s" * 40)
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--store", f"redis://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach" not in err, err
    assert f"127.0.0.1:{port}" in err and "cluster_enabled:0" in err and "cluster-enabled yes" in err, err


async def test_a_redis_server_that_dies_is_logged_in_one_clear_line(standalone_redis, caplog) -> None:
    """coredis logs a connection a dead server closed with exc_info where
    no exception is being handled: the log showed a bare "NoneType: None"
    line.  Importing the Redis store filters that into one pimcore line."""
    import logging

    import coredis

    import pimcore.store.redis  # noqa: F401  (installs the filter)

    proc, port = standalone_redis
    caplog.set_level(logging.INFO)
    with trio.fail_after(30):
        async with coredis.Redis("127.0.0.1", port, connect_timeout=2) as r:
            await r.ping()
            proc.kill()
            proc.wait()
            with pytest.raises(BaseException):
                await r.ping()
    assert "NoneType: None" not in caplog.text, caplog.text
    lines = [r for r in caplog.records if r.name.startswith("pimcore") and "Redis" in r.getMessage()]
    assert lines and "closed" in lines[0].getMessage(), caplog.text
    assert not [r for r in caplog.records if r.name == "coredis" and r.exc_info and r.exc_info[0] is None]


def test_coredis_retry_lines_are_debug_not_info(caplog) -> None:
    """coredis logs each retried command at INFO ("Retry attempt 2 due to
    error: ..."), a line per retry in `serve`'s log while a node fails
    over.  The Redis store's filter makes them DEBUG: shown only when
    debugging, its other lines (the clear dead-server one) untouched."""
    import logging

    pytest.importorskip("coredis")
    import pimcore.store.redis  # noqa: F401  (installs the filter)

    lg = logging.getLogger("coredis")
    caplog.set_level(logging.INFO)
    lg.info("Retry attempt 2 due to error: Connection reset by peer")
    lg.info("Unable to set client info as the CLIENT SETINFO command is not supported")
    assert [r.getMessage() for r in caplog.records if r.name == "coredis"] == [
        "Unable to set client info as the CLIENT SETINFO command is not supported"], caplog.text
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    lg.info("Retry attempt 3 due to error: Connection reset by peer")
    (retry,) = [r for r in caplog.records if r.name == "coredis"]
    assert retry.levelno == logging.DEBUG and retry.levelname == "DEBUG", caplog.text


@pytest.mark.redis
async def test_concurrent_removals_on_two_nodes_never_leave_a_group_of_no_one(redis_cluster) -> None:
    """The rule that a removal may not leave a group with no member is the
    CHANGE script's (it knows the membership atomically): two nodes that
    each remove a different one of the two members at once -- each check
    alone would pass -- get one removal and one Rejected(BAD_REQUEST).
    With three members and removals of two and of one racing, the group
    keeps a member whatever the interleaving."""
    from pimcore.errors import ErrorCode
    from pimcore.store import CreateGroup, GroupChanged, Rejected, RemoveMembers
    from pimcore.store.redis import RedisStore

    ns = _ns()
    with trio.fail_after(60):
        async with RedisStore.connect(redis_cluster.url, namespace=ns) as one, \
                RedisStore.connect(redis_cluster.url, namespace=ns) as two:
            async def run(store, op) -> object:
                (res,) = await store.execute(StoreRequest(0, (op,), True))
                return res

            for i in range(10):
                await run(one, CreateGroup(f"g{i}", ("alice", "bob"), 1))
                await run(one, CreateGroup(f"h{i}", ("alice", "bob", "carol"), 1))
            results: dict[str, list[object]] = {}

            times = iter(range(10**6, 2 * 10**6))

            async def remove(store, conv: str, users: tuple[str, ...]) -> None:
                # Stamps as the core makes them (its node id in the msg id):
                # two nodes' store-made ids could be the same.
                node = await store.node_id()
                stamps = tuple((t.to_bytes(8, "big") + node, t) for t in (next(times) for _ in users))
                op = RemoveMembers(conv, users, 1, "", stamps)
                results.setdefault(conv, []).append(await run(store, op))

            async with trio.open_nursery() as n:
                for i in range(10):
                    n.start_soon(remove, one, f"g{i}", ("alice",))
                    n.start_soon(remove, two, f"g{i}", ("bob",))
                    n.start_soon(remove, one, f"h{i}", ("alice", "bob"))
                    n.start_soon(remove, two, f"h{i}", ("carol",))
            for i in range(10):
                got = results[f"g{i}"]
                assert sorted(type(r).__name__ for r in got) == ["GroupChanged", "Rejected"], got
                assert Rejected(ErrorCode.BAD_REQUEST) in got
                assert len(await one.members(f"g{i}")) == 1
                assert all(isinstance(r, GroupChanged) or r == Rejected(ErrorCode.BAD_REQUEST)
                           for r in results[f"h{i}"]), results[f"h{i}"]
                assert len(await two.members(f"h{i}")) >= 1
