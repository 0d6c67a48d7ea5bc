"""Inline commit (issue 13): with a synchronous store committing on the event
loop, a write request runs where the core emits it when no connection has
bytes waiting, instead of hopping to the committer task.  What must not
change: a SendAck only after its batch committed, acks and seqs in send
order, a failed commit answered STORE_UNAVAILABLE (a retry with the same
local id stores the message once), and group commit when several
connections have sent.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

from pimcore import frames as F
from pimcore.codec import encode_frame
from pimcore.core import Broker
from pimcore.errors import ErrorCode, StoreError
from pimcore.store import LmdbStore, MemoryStore, NewMessage, direct_conversation

from _net import RawConn, server_config, serving

AB = direct_conversation("alice", "bob")


@pytest.fixture(params=["lmdb", "memory"])
def store(request, tmp_path):
    s = LmdbStore(str(tmp_path / "db"), durability="os") if request.param == "lmdb" else MemoryStore()
    yield s
    s.close()


@asynccontextmanager
async def _alice_alone(store) -> AsyncIterator[tuple]:
    """The broker serving ``store`` and one plain-TCP connection logged in as
    alice, closed at the end; all of it within 20 s."""
    with trio.fail_after(20):
        async with serving(store) as srv:
            raw = await RawConn.open(srv.endpoints[0].port)
            await raw.login("alice")
            yield srv, raw
            await raw.aclose()


class _Watch:
    """Wraps ``store.commit``: what each committed batch held, and in which
    task it ran; ``fail`` batches raise StoreError instead."""

    def __init__(self, store) -> None:
        self.real = store.commit
        self.committed: set[int] = set()  # local ids of committed NewMessages
        self.sizes: list[int] = []  # NewMessages per committed batch
        self.tasks: list[str] = []  # of the batches that stored messages
        self.fail = 0
        store.commit = self  # type: ignore[method-assign]

    def __call__(self, batch):
        if any(type(op) is NewMessage for op in batch.ops):
            self.tasks.append(trio.lowlevel.current_task().name)
        if self.fail:
            self.fail -= 1
            raise StoreError("disk on fire")
        results = self.real(batch)
        sent = [op.local_id for op in batch.ops if type(op) is NewMessage]
        self.sizes.append(len(sent))
        self.committed.update(sent)
        return results


async def test_a_lone_connection_is_acked_only_after_the_commit_in_send_order(store):
    watch = _Watch(store)
    async with _alice_alone(store) as (srv, raw):
        seq = 0
        for ids in (range(1, 2), range(21, 41), range(41, 61)):  # one, then pipelined
            await raw.send(*(F.SendReq(i, AB, 0, b"m%d" % i) for i in ids))
            for i in ids:
                ack = await raw.until(F.SendAck)
                seq += 1
                assert (ack.local_id, ack.code, ack.seq) == (i, 0, seq)
                # The ack went out only once its batch had committed.
                assert ack.local_id in watch.committed
    assert [m.payload for m in store.history(AB, 0, 100)] == [b"m1"] + [b"m%d" % i for i in range(21, 61)]
    # A lone plain-TCP connection: the commits ran inline, in its reader.
    # Not necessarily every one: a batch the core emits while another write
    # is in the committer (a write of the broker's own) queues behind it
    # there, and that is right -- seen once, for the third batch, in a pass
    # of the pure backend with four workers on two cores.
    inline = [t for t in watch.tasks if "_committer" not in t]
    assert watch.tasks and len(inline) >= len(watch.tasks) - 1 >= 1, watch.tasks


async def test_a_failed_inline_commit_answers_store_unavailable_and_the_retry_stores_once(store):
    watch = _Watch(store)
    async with _alice_alone(store) as (srv, raw):
        await raw.send(F.SendReq(1, AB, 0, b"first"))
        assert (await raw.until(F.SendAck)).seq == 1
        watch.fail = 1
        await raw.send(F.SendReq(2, AB, 0, b"second"))
        ack = await raw.until(F.SendAck)
        assert (ack.local_id, ack.code, ack.seq) == (2, ErrorCode.STORE_UNAVAILABLE, 0)
        await raw.send(F.SendReq(2, AB, 0, b"second"))  # the retry: same local id
        ack = await raw.until(F.SendAck)
        assert (ack.local_id, ack.code, ack.seq) == (2, 0, 2)
        assert srv.statistics().internal_errors == 0  # StoreError is the contract
    assert [m.payload for m in store.history(AB, 0, 10)] == [b"first", b"second"]
    assert not any("_committer" in t for t in watch.tasks)


async def test_connections_with_bytes_waiting_share_one_commit(store):
    """Eight connections send at once (their bytes are all in the kernel
    before the broker runs): the broker holds the batch while their readers
    run (Broker.hold_batches), so the eight messages share one commit -- not
    eight commits of one, nor the first connection's alone and then the
    other seven's."""
    watch = _Watch(store)
    with trio.fail_after(20):
        async with serving(store) as srv:
            await _send_at_once(srv.endpoints[0].port, 8, watch, srv.broker)
    assert [n for n in watch.sizes if n] == [8], watch.sizes  # (then batches of acks alone)


async def _send_at_once(port: int, n: int, watch: _Watch, broker: Broker) -> None:
    """``n`` connections (users u0, u1, ...) log in, then each writes one
    SendReq with no checkpoint between the writes (all their bytes are in
    the kernel before the broker reads any), and each gets its SendAck;
    ``watch.sizes`` holds the batches committed from the first write on."""
    conns = []
    for i in range(n):
        raw = await RawConn.open(port)
        await raw.login(f"u{i}")
        conns.append(raw)
    # The logins' own commits done first: a batch still in flight when the
    # writes land completes among the readers (its committer task woken in
    # the same scheduler pass) and the next batch starts with only the sends
    # read before it -- [4, 4] once in a full CI run, not the hold's case.
    with trio.move_on_after(2):
        while broker.batch_in_flight or broker.statistics().pending_ops:
            await trio.sleep(0.01)
    watch.sizes.clear()
    for i, raw in enumerate(conns):
        data = encode_frame(F.SendReq(1, direct_conversation(f"u{i}", "bob"), 0, b"x"))
        assert os.write(raw.stream.socket.fileno(), data) == len(data)
    # Blocking on purpose: the event loop (the broker's readers with it)
    # waits until loopback has delivered every write, which a busy machine
    # may leave to a softirq thread for a moment.
    time.sleep(0.05)
    for raw in conns:
        ack = await raw.until(F.SendAck)
        assert (ack.code, ack.seq) == (0, 1)
    for raw in conns:
        await raw.aclose()


async def test_a_connection_whose_reading_is_paused_does_not_hold_the_others_sends(tmp_path):
    """Bytes waiting on a connection the broker stopped reading (its client
    reads none of its replies) stay waiting however long a hold would wait
    for them: the hold ends after its few scheduler passes, and the others'
    sends commit."""
    from test_outbound import fill, settle

    store = LmdbStore(str(tmp_path / "db"), durability="os")
    try:
        fill(store, AB, 200, 16 * 1024)  # (a page of 100: 1.6 MB)
        watch = _Watch(store)
        with trio.fail_after(30):
            async with serving(store) as srv:
                port = srv.endpoints[0].port
                greedy = await RawConn.open(port, rcvbuf=4096)
                await greedy.login("alice", "greedy")
                await greedy.send_bytes(b"".join(encode_frame(F.HistoryReq(r, AB, 0, 100, False)) for r in range(40)))
                await settle(srv)  # its replies fill its outbound side: nothing more of it is decoded
                # What it sends next is buffered, undecoded, up to 256 KiB
                # (read 64 KiB at a time: at most 320 KiB); then its reading
                # is paused and the rest (at least 16 KB: kernel buffers take
                # it, the write returns) waits in the kernel.
                await greedy.send_bytes(b"".join(encode_frame(F.SendReq(i, AB, 0, b"y" * 48_000)) for i in range(1, 8)))
                await settle(srv)
                read = srv.statistics().bytes_in
                await trio.sleep(0.2)
                assert srv.statistics().bytes_in == read < 336_000  # the rest unread
                await _send_at_once(port, 2, watch, srv.broker)
                assert [n for n in watch.sizes if n][:1] == [2], watch.sizes
                await greedy.aclose()
    finally:
        store.close()


async def _paused_greedy(srv):
    """A connection the core paused with bytes waiting (it asks for more
    history than it reads, then sends), and the list of the poller's looks
    from then on (the number of ready sockets in each)."""
    from test_outbound import settle

    looks: list[int] = []
    real = srv._read_polled
    srv._read_polled = lambda events, **kw: (looks.append(len(events)), real(events, **kw))
    greedy = await RawConn.open(srv.endpoints[0].port, rcvbuf=4096)
    await greedy.login("alice", "greedy")
    await greedy.send_bytes(b"".join(encode_frame(F.HistoryReq(r, AB, 0, 100, False)) for r in range(40)))
    await settle(srv)
    await greedy.send_bytes(b"".join(encode_frame(F.SendReq(i, AB, 0, b"y" * 48_000)) for i in range(1, 8)))
    await settle(srv)
    return looks, greedy


async def test_a_paused_connection_with_bytes_waiting_does_not_keep_waking_the_poller(tmp_path):
    """One task reads every plain-TCP connection (BrokerServer._poller),
    woken by a level-triggered epoll of their sockets.  A connection whose
    reading the core paused, with bytes waiting in its socket, leaves that
    epoll until it is resumed: else its readiness would wake the poller at
    every scheduler pass (a busy loop) for as long as the pause lasts."""
    from test_outbound import fill

    store = LmdbStore(str(tmp_path / "db"), durability="os")
    try:
        fill(store, AB, 200, 16 * 1024)
        with trio.fail_after(30):
            async with serving(store) as srv:
                looks, greedy = await _paused_greedy(srv)
                read = srv.statistics().bytes_in
                looks.clear()
                await trio.sleep(0.3)
                assert srv.statistics().bytes_in == read  # paused: its bytes wait
                assert len(looks) < 10, len(looks)  # (was one look per scheduler pass)
                await greedy.aclose()
    finally:
        store.close()


@pytest.mark.parametrize("how", ["kick", "replaced"])
async def test_a_paused_connection_that_is_closed_does_not_keep_waking_the_poller(tmp_path, how):
    """A paused connection (bytes waiting, see above) that is then closed --
    kicked, or REPLACED by the same device logging in again -- waits up to
    close_timeout for its Close to flush (this client reads nothing).  Its
    socket stays out of the poller's epoll meanwhile: closing wakes its
    reader, which put it back before seeing the connection closing (a busy
    loop of the poller for the whole close_timeout)."""
    from test_outbound import fill

    store = LmdbStore(str(tmp_path / "db"), durability="os")
    try:
        fill(store, AB, 200, 16 * 1024)
        with trio.fail_after(30):
            async with serving(store, server_config(close_timeout=5.0)) as srv:
                looks, greedy = await _paused_greedy(srv)
                if how == "kick":
                    srv.kick("alice", "greedy", "test")
                    again = None
                else:
                    again = await RawConn.open(srv.endpoints[0].port)
                    await again.login("alice", "greedy")
                await trio.sleep(0.05)
                # (the paused one is closing, its Close stuck behind what it does not read)
                assert [p.state.name for p in srv._peers.values() if p.state.name != "OPEN"] == ["CLOSING"]
                looks.clear()
                await trio.sleep(0.3)
                assert len(looks) < 10, len(looks)  # (was one look per scheduler pass until close_timeout)
                await greedy.aclose()
                if again is not None:
                    await again.aclose()
    finally:
        store.close()


async def test_a_stream_the_probe_cannot_see_turns_inline_commit_off_while_connected(store):
    """A peer on a stream that is not a plain TCP socket (here a memory
    stream through serve_stream) might have bytes waiting unseen: while it is
    connected every commit takes the committer task; once it is gone, a lone
    TCP connection commits inline again."""
    from trio.testing import memory_stream_pair

    watch = _Watch(store)
    async with _alice_alone(store) as (srv, raw):
        async with trio.open_nursery() as nursery:
            ours, theirs = memory_stream_pair()
            nursery.start_soon(srv.serve_stream, theirs)
            other = RawConn(ours)
            await other.login("carol")
            await raw.send(F.SendReq(1, AB, 0, b"while carol is here"))
            assert (await raw.until(F.SendAck)).seq == 1
            assert watch.tasks and all("_committer" in t for t in watch.tasks), watch.tasks
            await other.aclose()  # serve_stream returns: the nursery ends
        watch.tasks.clear()
        await raw.send(F.SendReq(2, AB, 0, b"alone again"))
        assert (await raw.until(F.SendAck)).seq == 2
        assert watch.tasks and not any("_committer" in t for t in watch.tasks), watch.tasks


async def test_host_calls_made_together_still_share_a_batch(store):
    """Posts handed to the core together (host_calls, as the HTTP API's
    batch does) are not committed one by one inline: the first one's batch
    commits, the rest share the next."""
    watch = _Watch(store)
    async with _alice_alone(store) as (srv, raw):  # a lone TCP peer, idle
        watch.sizes.clear()
        done = await srv.host_calls([(srv.broker.post, (AB, b"p%d" % i), {"sender": "alice", "device": "api", "key": "k%d" % i}) for i in range(5)])
        assert [d.code for d in done] == [0] * 5 and [d.seq for d in done] == [1, 2, 3, 4, 5]
    assert sum(watch.sizes) == 5 and max(watch.sizes) >= 2, watch.sizes
    assert [m.payload for m in store.history(AB, 0, 10)] == [b"p%d" % i for i in range(5)]


async def test_sendacks_are_written_before_the_next_inline_commit_flushes(store):
    """A batch's SendAcks go out before the broker blocks on its next commit.
    The core answers a committed batch with its SendAcks and, when delivery
    acks have waited ack_delay meanwhile, the batch of those acks; committed
    inline, that batch's flush (an fdatasync with ``log`` durability) held
    the SendAcks queued behind it -- a second flush on a send's round trip
    (seen at 1 x 1 in about 4 % of round trips, BENCHMARKS.md)."""
    watch = _Watch(store)
    real = watch.real
    seen: list[bytes] = []  # what alice could read when the acks' batch committed

    def commit(batch):
        sends = [op for op in batch.ops if type(op) is NewMessage]
        if any(op.local_id == 2 for op in sends):
            time.sleep(0.05)  # the flush: longer than ack_delay (20 ms)
        elif not sends and peek and not seen:
            try:
                seen.append(peek[0].recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except BlockingIOError:
                seen.append(b"")
        return real(batch)

    watch.real = commit
    peek: list[socket.socket] = []  # alice's socket, once her first send is acked
    async with _alice_alone(store) as (srv, raw):
        await raw.send(F.SendReq(1, AB, 0, b"first"))
        assert (await raw.until(F.SendAck)).seq == 1
        peek.append(socket.fromfd(raw.stream.socket.fileno(), socket.AF_INET, socket.SOCK_STREAM))
        try:
            # Her PushAck waits (ack_delay) behind the send read with it.
            await raw.send(F.PushAck(1), F.SendReq(2, AB, 0, b"second"))
            ack = await raw.until(F.SendAck)
            assert (ack.local_id, ack.seq) == (2, 2)
            with trio.fail_after(5):
                while not seen:
                    await trio.sleep(0.01)
        finally:
            peek.pop().close()
    assert encode_frame(ack) in seen[0], seen
