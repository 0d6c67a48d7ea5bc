"""Resume in one round trip, through the SDK and a proxy (issue 17).

* After the link comes back, the first missed message reaches the client one
  round trip after the connection is up: the client's only write before the
  Push arrives is its Login with the first calibration sample behind it.
* After a clean close by the broker (SHUTDOWN: a restart) the SDK reconnects
  at once; after a failure it backs off.

Round trips are counted, not timed (the figure with 150 ms of latency is in
BENCHMARKS.md, from bench/bench_resume.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import trio

from pimcore import frames as F
from pimcore.client import ClientConfig, Connected, Disconnected, MessageReceived, open_client
from pimcore.codec import Decoder
from pimcore.errors import CloseCode
from pimcore.store import MemoryStore, direct_conversation
from pimcore.testing.chaos import ChaosConfig, open_chaos_proxy

from _net import FAST_CLIENT, client, serving, token
from _proc import free_port

AB = direct_conversation("alice", "bob")


def _trace(session: Any, log: list) -> None:
    """Log the session's connections, writes (decoded frames) and pushes."""
    made, send, push = session.connection_made, session.data_to_send, session._on_push

    def connection_made(now: int, tok: bytes) -> None:
        log.append(("connect",))
        made(now, tok)

    def data_to_send() -> bytes:
        data = send()
        if data:
            dec = Decoder(1 << 22)
            dec.feed(data)
            log.append(("write", [type(f) for f in dec]))
        return data

    def on_push(f: F.Push) -> None:
        log.append(("push", len(f.messages)))
        push(f)

    session.connection_made, session.data_to_send, session._on_push = connection_made, data_to_send, on_push


async def test_the_first_missed_message_arrives_one_round_trip_after_the_connection_is_up() -> None:
    store = MemoryStore()
    # The default 5 samples (only the first one before ACTIVE); plain frames, so the trace can read them.
    cfg = replace(FAST_CLIENT, time_samples=5, compression=False)
    with trio.fail_after(20):
        async with serving(store) as srv:
            port = srv.endpoints[0].port
            async with open_chaos_proxy("127.0.0.1", port, ChaosConfig(latency=0.01)) as proxy:
                async with client(srv.url(), "alice") as a, open_client(
                    f"tcp://127.0.0.1:{proxy.port}", token("bob"), "phone", config=cfg
                ) as b:
                    log: list = []
                    _trace(b._session, log)  # type: ignore[attr-defined]
                    await a.send(AB, b"before")
                    async for m in b.messages():
                        assert m.payload == b"before"
                        break
                    # The link goes down (the proxy cannot reach the broker)...
                    proxy.target_port = free_port()
                    proxy.reset_all()
                    for i in range(3):
                        await a.send(AB, b"missed %d" % i)
                    await trio.sleep(0.2)  # a few failed reconnects
                    # ...and comes back.
                    proxy.target_port = port
                    got = []
                    async for m in b.messages():
                        got.append(m.payload)
                        if len(got) == 3:
                            break
                    assert got == [b"missed 0", b"missed 1", b"missed 2"]
    last = max(i for i, e in enumerate(log) if e[0] == "connect")
    first_push = next(i for i, e in enumerate(log) if i > last and e[0] == "push")
    writes = [e[1] for e in log[last:first_push] if e[0] == "write"]
    # One write, one round trip: Login and the first calibration sample.
    assert writes == [[F.Login, F.CalibrateReq]], log[last:]


async def test_the_sdk_reconnects_at_once_after_a_broker_shutdown_and_backs_off_after_a_failure() -> None:
    # A backoff of 20..40 s: any reconnect within the test is one without backoff.
    cfg = ClientConfig(ack_timeout=1.0, send_timeout=20.0, connect_timeout=5.0, backoff_initial=20.0, backoff_max=40.0)
    with trio.fail_after(15):
        async with serving(MemoryStore()) as new:
            async with open_chaos_proxy("127.0.0.1", free_port()) as proxy:
                async with serving(MemoryStore()) as old:
                    proxy.target_port = old.endpoints[0].port
                    async with open_client(f"tcp://127.0.0.1:{proxy.port}", token("bob"), "phone", config=cfg) as b:
                        events = b.events()
                        assert isinstance(await events.__anext__(), Connected)
                        proxy.target_port = new.endpoints[0].port  # "the restarted broker"
                        await old.shutdown()  # Close(SHUTDOWN) to everyone
                        ev = await events.__anext__()
                        assert isinstance(ev, Disconnected) and ev.code is CloseCode.SHUTDOWN
                        while not isinstance(ev := await events.__anext__(), Connected):
                            pass
                        assert proxy.statistics().connections_total == 2  # at once, first try
                        # A failure (the link reset) is not a clean close: backoff.
                        proxy.reset_all()
                        ev = await events.__anext__()
                        assert isinstance(ev, Disconnected) and ev.code is None
                        await trio.sleep(1.0)
                        assert proxy.statistics().connections_total == 2
