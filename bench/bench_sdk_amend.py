"""Recalls and edits arriving at a Python SDK that holds a full view (pytest-benchmark).

    pytest bench/bench_sdk_amend.py --benchmark-enable -p no:cacheprovider

A :class:`pimcore.client_session.ClientSession` (sans-IO: no broker, no
socket) holds ``view_limit`` (1,000) messages of one conversation; one Push
then brings an EDIT entry for each of them -- a device coming back to a
conversation whose messages were all edited, or a moderation bot's burst.
What is measured is ``receive_data`` of that Push: each entry finds its
target in the local view and replaces it.  ``extra_info["us_per_amend"]``
is the time per entry (µs).  Finding the target was a scan of the view,
1,000 messages per entry; it is a lookup by seq.

Under ``--benchmark-disable`` (the project's default addopts) it runs once,
as a smoke test that checks every target was edited.
"""

from __future__ import annotations

import time

from pimcore import frames as F
from pimcore.client_session import ClientConfig, ClientSession
from pimcore.codec import encode_frame

CONV = "d:alice:bob"
N = 1000
T0 = 1_700_000_000_000_000


def _message(position: int, seq: int, kind: int = F.MessageKind.MESSAGE, target: int = 0, payload: bytes = b"") -> F.Message:
    return F.Message(position, b"m%015d" % position, CONV, seq, "bob", "laptop", T0 + position, T0 + position,
                     payload or b"p%d" % seq, kind, 0, 0, target)


def _session() -> tuple[ClientSession, bytes]:
    """A session holding N messages of CONV, and the encoded Push of an EDIT of each."""
    s = ClientSession("phone", ClientConfig(compression=False, time_samples=1), seed=1)
    s.connection_made(T0, b"t")
    s.data_to_send()
    s.receive_data(encode_frame(F.LoginAck("alice", "phone", T0, 0, 0, False, 1 << 30, 1 << 16, 8, 0, 0)), T0)
    s.receive_data(encode_frame(F.CalibrateResp(T0, T0)), T0)
    s.receive_data(encode_frame(F.Push(N, tuple(_message(i, i) for i in range(1, N + 1)))), T0)
    edits = F.Push(2 * N, tuple(_message(N + i, N + i, F.MessageKind.EDIT, i, b"edited") for i in range(1, N + 1)))
    return s, encode_frame(edits)


def _run(s: ClientSession, push: bytes) -> float:
    t = time.perf_counter()
    s.receive_data(push, T0 + 1)
    return time.perf_counter() - t


def test_amends_against_a_full_view(benchmark) -> None:  # type: ignore[no-untyped-def]
    took: list[float] = []

    def setup():  # type: ignore[no-untyped-def]
        return _session(), {}

    def round_(s: ClientSession, push: bytes) -> None:
        took.append(_run(s, push))
        assert sum(m.payload == b"edited" for m in s.view(CONV)) == N

    benchmark.pedantic(round_, setup=setup, rounds=5, iterations=1)
    took.sort()
    benchmark.extra_info["us_per_amend"] = round(took[len(took) // 2] / N * 1e6, 2)
