"""Review: a shutdown's last-seen writes (the TouchDevice ops Broker.close_all
proposes) had no time of their own -- they were drained against the same
deadline as the batches before them.  A commit still running when that
deadline passed (one in a worker thread, or an async store's write already
sent, cannot be called back) held them up until the deadline, so they were
never sent: after a restart the device's last seen was its login.  And run()
cancelled the committer as soon as the connections were gone (their Close
flushed; at once for serve_stream's, not in the listeners' nursery), so a
drain after that waited on nothing."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from pimcore import frames as F
from pimcore.auth import JwtAuthenticator
from pimcore.core import SECOND, BrokerConfig
from pimcore.net import Endpoint, ServerConfig
from pimcore.net.server import BrokerServer
from pimcore.store import MemoryStore, direct_conversation
from pimcore.store.base import AsyncStore

from _net import SECRET, RawConn

AB = direct_conversation("alice", "bob")


class StalledWrites(AsyncStore):
    """A MemoryStore behind the AsyncStore face; while ``stall`` is set a
    write waits for ``gate`` and cannot be cancelled (as a Redis write
    already sent is applied whatever the broker does)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.stall = False
        self.gate = trio.Event()

    async def node_id(self):
        return self.inner.node_id()

    async def epoch(self):
        return self.inner.epoch()

    async def epochs(self):
        return self.inner.epochs()

    async def last_server_time(self):
        return self.inner.last_server_time()

    async def execute(self, request):
        if request.write and self.stall:
            with trio.CancelScope(shield=True):
                await self.gate.wait()
                return self.inner.execute(request)
        await trio.sleep(0)
        return self.inner.execute(request)

    async def conversation_exists(self, conv):
        return self.inner.conversation_exists(conv)

    async def members(self, conv):
        return self.inner.members(conv)

    async def history_visible(self, conv):
        return self.inner.history_visible(conv)

    async def aclose(self):
        self.inner.close()


@pytest.mark.parametrize("late", [-0.001, 0.001, 0.25])
@pytest.mark.parametrize("over", ["tcp", "stream"])
async def test_a_shutdown_records_last_seen_even_if_a_commit_outlasts_its_timeout(mock_clock, over, late):
    """alice connected and idle for 100 s; her message's batch is in flight
    when the broker shuts down (timeout 5 s) and commits ``late`` seconds
    after the timeout.  Her device's stored last seen must be the shutdown
    time (``over``: a tcp:// listener's connection, or serve_stream's)."""
    # Mock time jumps once the tasks have waited 20 ms of real time (0: a
    # real socket's every wait would let the timers fire past it).
    mock_clock.autojump_threshold = 0.02
    store = StalledWrites()
    base_s, t0 = int(time.time()), trio.current_time()

    def clock() -> int:
        return base_s * SECOND + round((trio.current_time() - t0) * SECOND)

    srv = BrokerServer(store, JwtAuthenticator(SECRET), ServerConfig(listeners=(Endpoint("tcp", "127.0.0.1", 0),), broker=BrokerConfig()), clock=clock)
    with trio.fail_after(120):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as nursery:  # as open_broker_server runs it
                await nursery.start(srv.run)
                if over == "tcp":
                    alice = await RawConn.open(srv.endpoints[0].port)
                else:
                    client_end, server_end = trio.testing.memory_stream_pair()
                    nursery.start_soon(srv.serve_stream, server_end)
                    alice = RawConn(client_end)
                await alice.login("alice", "phone")
                await trio.sleep(1)
                [dev] = store.inner.devices("alice")
                login = dev.last_seen
                await trio.sleep(100)  # alice stays connected, idle
                store.stall = True
                await alice.send(F.SendReq(1, AB, 0, b"hi"))
                await trio.sleep(0.01)  # its batch is in flight, stalled

                async def unstall() -> None:
                    await trio.sleep(5 + late)  # past shutdown's timeout
                    store.stall = False
                    store.gate.set()

                outer.start_soon(unstall)

                async def read_to_eof() -> None:
                    while await alice.next() is not None:
                        pass

                nursery.start_soon(read_to_eof)
                down = srv.now()
                await srv.shutdown(timeout=5.0)
                nursery.cancel_scope.cancel()
    [dev] = store.inner.devices("alice")
    assert store.inner.last_seq(AB) == 1  # the stalled batch committed
    assert dev.last_seen >= down, ((down - dev.last_seen) / SECOND, (dev.last_seen - login) / SECOND)
