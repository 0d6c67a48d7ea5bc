"""The cost of a login for a user with many conversations (pytest-benchmark).

    pytest bench/bench_login.py --benchmark-enable -p no:cacheprovider

A login is one ``LoadSession`` read request: the inbox head and floor, the
device's position and every conversation's read state (marker, last seq,
unread count, the peer's marker of a 1:1 chat).  ``test_load_session`` times
that request on LMDB; ``test_login_through_the_core`` times a whole login
through the core with the request run inline (``drain``), up to the LoginAck
and every ReadStates frame -- what a served broker's event loop pays.  Each
conversation holds one message from the peer.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import pytest

from pimcore.codec import encode_frame
from pimcore.core import Broker, Identity, SendData, drain
from pimcore.frames import Login
from pimcore.ids import direct_conversation
from pimcore.store import LmdbStore, LoadSession, NewMessage, SessionLoaded, WriteBatch

T0 = 1_700_000_000_000_000


@pytest.fixture(params=[100, 1000], scope="module")
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LmdbStore, int]]:
    n = request.param
    s = LmdbStore(tmp_path_factory.mktemp("login") / "db", durability="os")
    node, t = s.node_id(), itertools.count(T0)
    ops = []
    for i in range(n):
        peer = f"peer{i:05d}"
        stamp = next(t)
        ops.append(NewMessage(stamp.to_bytes(8, "big") + node, direct_conversation("alice", peer), peer, "phone", 1, stamp, stamp, b"x" * 100, b"\x01" * 16))
    s.commit(WriteBatch(1, tuple(ops)))
    yield s, n
    s.close()


def test_load_session(benchmark, store: tuple[LmdbStore, int]) -> None:  # type: ignore[no-untyped-def]
    s, n = store
    (loaded,) = benchmark(s.read, (LoadSession("alice", "phone"),))
    assert isinstance(loaded, SessionLoaded) and len(loaded.conversations) == n


def test_login_through_the_core(benchmark, store: tuple[LmdbStore, int]) -> None:  # type: ignore[no-untyped-def]
    s, n = store
    conns = itertools.count(1)

    def login() -> int:
        broker = Broker(node_id=s.node_id(), last_server_time=s.last_server_time())
        conn = next(conns)
        broker.connection_made(conn, T0)
        cmds = broker.receive_data(conn, encode_frame(Login(b"alice", "phone", T0, 0, 0)), T0)
        out = drain(broker, s, cmds, T0, authenticate=lambda token, now: Identity(token.decode()))
        return sum(len(c.data) for c in out if isinstance(c, SendData))

    sent = benchmark(login)
    assert sent > n * 10  # LoginAck + ReadStates for every conversation
