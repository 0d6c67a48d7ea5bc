"""Time from link restored to the first missed message delivered (issue 17).

    python bench/bench_resume.py [latency_s] [rounds]     # default 0.15 s one way, 5 rounds
    pytest bench/bench_resume.py                          # one round at 20 ms (CI smoke)

Bob's SDK client talks to the broker through the chaos proxy
(pimcore.testing.chaos) with ``latency`` seconds added each way.  Each round:
the link goes down (the proxy resets bob's connection and cannot reach the
broker), Alice sends 3 messages directly, then the link comes back.  The
figure is from the moment bob's new TCP connection is up (the session's
``connection_made``) to the moment the app takes the first missed message from
``messages()``: a round trip is 2 x latency, the floor for any resume.  Also
reported: from the broker's SHUTDOWN (a restart, the new broker already up)
to the first message sent after it being delivered.
"""

from __future__ import annotations

import socket
import statistics
import argparse
import sys
from typing import Any

import trio

from pimcore.auth import JwtAuthenticator, issue_token
from pimcore.client import ClientConfig, open_client
from pimcore.ids import direct_conversation
from pimcore.net import Endpoint, ServerConfig, open_broker_server
from pimcore.store import MemoryStore
from pimcore.testing.chaos import ChaosConfig, open_chaos_proxy

SECRET = b"bench-secret-0123456789abcdef-0123456789"
AB = direct_conversation("alice", "bob")
CFG = ClientConfig(ack_timeout=5.0, send_timeout=60.0, connect_timeout=10.0, backoff_initial=0.05, backoff_max=0.2)


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _tok(user: str) -> str:
    return issue_token(SECRET, user, None, ttl=600.0)


def _mark_connections(client: Any, marks: list[float]) -> None:
    session = client._session
    made = session.connection_made

    def connection_made(now: int, token: bytes) -> None:
        marks.append(trio.current_time())
        made(now, token)

    session.connection_made = connection_made


async def link_restored(latency: float, rounds: int) -> list[float]:
    """Seconds from bob's new connection to the first missed message, per round."""
    out = []
    store = MemoryStore()
    config = ServerConfig(listeners=(Endpoint("tcp"),))
    async with open_broker_server(store, JwtAuthenticator(SECRET), config) as srv:
        port = srv.endpoints[0].port
        async with open_chaos_proxy("127.0.0.1", port, ChaosConfig(latency=latency)) as proxy:
            async with open_client(srv.url(), _tok("alice"), "phone", config=CFG) as a, open_client(
                f"tcp://127.0.0.1:{proxy.port}", _tok("bob"), "phone", config=CFG
            ) as b:
                marks: list[float] = []
                _mark_connections(b, marks)
                msgs = b.messages()
                await a.send(AB, b"hello")
                await msgs.__anext__()
                for r in range(rounds):
                    proxy.target_port = _dead_port()
                    proxy.reset_all()
                    for i in range(3):
                        await a.send(AB, b"missed %d.%d" % (r, i))
                    await trio.sleep(0.5)
                    proxy.target_port = port
                    m = await msgs.__anext__()
                    delivered = trio.current_time()
                    assert m.payload == b"missed %d.0" % r, m.payload
                    out.append(delivered - marks[-1])
                    for _ in range(2):
                        await msgs.__anext__()
    return out


async def broker_restart(latency: float) -> float:
    """Seconds from the old broker's SHUTDOWN to bob getting a message sent
    through the new one right after it (the new broker is already listening)."""
    async with open_broker_server(MemoryStore(), JwtAuthenticator(SECRET), ServerConfig(listeners=(Endpoint("tcp"),))) as new:
        async with open_chaos_proxy("127.0.0.1", _dead_port(), ChaosConfig(latency=latency)) as proxy:
            old_cm = open_broker_server(MemoryStore(), JwtAuthenticator(SECRET), ServerConfig(listeners=(Endpoint("tcp"),)))
            old = await old_cm.__aenter__()
            try:
                proxy.target_port = old.endpoints[0].port
                async with open_client(f"tcp://127.0.0.1:{proxy.port}", _tok("bob"), "phone", config=CFG) as b, open_client(
                    new.url(), _tok("alice"), "phone", config=CFG
                ) as a:
                    msgs = b.messages()
                    proxy.target_port = new.endpoints[0].port
                    t0 = trio.current_time()
                    await old.shutdown()
                    await a.send(AB, b"after the restart")
                    m = await msgs.__anext__()
                    assert m.payload == b"after the restart"
                    return trio.current_time() - t0
            finally:
                await old_cm.__aexit__(None, None, None)


def report(latency: float = 0.15, rounds: int = 5) -> tuple[list[float], float]:
    times = trio.run(link_restored, latency, rounds)
    restart = trio.run(broker_restart, latency)
    print(f"latency {latency * 1000:.0f} ms each way (round trip {2 * latency * 1000:.0f} ms)")
    print("link restored -> first missed message: " + ", ".join(f"{t * 1000:.0f}" for t in times)
          + f" ms (median {statistics.median(times) * 1000:.0f} ms = {statistics.median(times) / (2 * latency):.2f} round trips)")
    print(f"broker SHUTDOWN -> first message through the restarted broker: {restart * 1000:.0f} ms")
    return times, restart


def test_bench_resume_smoke() -> None:
    times, restart = report(0.02, 1)
    assert len(times) == 1 and restart > 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("latency", nargs="?", type=float, default=0.15, help="seconds added each way by the proxy (default 0.15)")
    ap.add_argument("rounds", nargs="?", type=int, default=5, help="rounds (default 5)")
    a = ap.parse_args()
    report(a.latency, a.rounds)
