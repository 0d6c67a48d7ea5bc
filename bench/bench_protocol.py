"""The per-connection protocol session (pimcore.protocol) on the broker's hot paths.

    pytest bench/bench_protocol.py --benchmark-enable --benchmark-only --benchmark-group-by=group
    pytest bench/bench_protocol.py --benchmark-disable       # run each once (CI)

Groups (each per backend):

* ``session: send Push`` -- ``ServerSession.send`` of one Push of 16
  messages with 100-byte payloads (the codec benchmark's Push), on a
  connection without zstd and on one that negotiated it, against the bare
  ``encode_frame`` it wraps (the session's own overhead is the difference
  with "plain").
* ``session: decode 64 SendReqs`` -- one read chunk holding 64 SendReqs (the
  default ``window``) taken by an ACTIVE session: ``next_frames`` (the hot
  path, one call per batch), ``next_frame`` one at a time, and the bare
  ``Decoder`` loop as the baseline; plain and zstd-compressed chunks.
  ``extra_info["per_frame_us"]`` divides by 64.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from pimcore import _backend
from pimcore import frames as F
from pimcore.compress import FrameCompressor, FrameDecompressor
from pimcore.protocol import Compression, ServerSession

BACKENDS = _backend.available()
N = 64
pure = _backend.load("pure")
SHARED = Compression(FrameCompressor().compress, FrameDecompressor())  # one per thread, as a broker has

T0 = 1_700_000_000_000_000  # microseconds since the epoch
PAYLOAD = bytes(range(100))
TEXT = b'{"type":"text","text":"running ten minutes late, order for me please"}' + b" " * 30
PUSH = F.Push(
    position=10_015,
    messages=tuple(
        F.Message(10_000 + i, bytes(range(i, i + 16)), "dm:alice:bob", 5_000 + i, "alice", "alice-phone",
                  T0 + 1_000 * i, T0 + 1_000 * i + 250, TEXT)
        for i in range(16)
    ),
)
SEND_REQS = [F.SendReq(local_id=4711 + i, conv="dm:alice:bob", client_time=T0 + i, payload=TEXT) for i in range(N)]
CHUNKS = {
    "plain": pure.encode_frames(SEND_REQS),
    "zstd": b"".join(FrameCompressor().compress(pure.encode_frame(f)) for f in SEND_REQS),
}


@pytest.fixture(params=BACKENDS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _backend.load(request.param)


def _session(impl: ModuleType, zstd: bool) -> ServerSession:
    """An ACTIVE session, through Login / login_accepted / LoginAck."""
    caps = F.CAP_ZSTD if zstd else 0
    s = ServerSession(compression=SHARED, backend=impl)
    s.receive_data(impl.encode_frame(F.Login(b"token", "alice-phone", T0, 0, caps)))
    assert [type(f) for f in s.next_frames()] == [F.Login]
    s.login_accepted(caps)
    s.send(F.LoginAck("alice", "alice-phone", T0, 0, 0, False, 1 << 20, 65536, 256, 15000, caps))
    return s


def _per_frame(benchmark: Any) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["per_frame_us"] = round(benchmark.stats.stats.median / N * 1e6, 3)


# ------------------------------------------------------------ encode


def test_encode_push_bare(benchmark: Any, impl: ModuleType) -> None:
    benchmark.group = "session: send Push"
    assert benchmark(impl.encode_frame, PUSH) == pure.encode_frame(PUSH)


@pytest.mark.parametrize("zstd", [False, True], ids=["plain", "zstd"])
def test_send_push(benchmark: Any, impl: ModuleType, zstd: bool) -> None:
    benchmark.group = "session: send Push"
    s = _session(impl, zstd)
    wire = benchmark(s.send, PUSH)
    benchmark.extra_info["wire_bytes"] = len(wire)
    # correctness, so a fast wrong session cannot post a number
    assert pure.decode_frame(wire, decompress=FrameDecompressor()) == PUSH
    assert (len(wire) < len(pure.encode_frame(PUSH))) is zstd


# ------------------------------------------------------------ decode


@pytest.mark.parametrize("kind", list(CHUNKS))
def test_decode_bare_decoder(benchmark: Any, impl: ModuleType, kind: str) -> None:
    benchmark.group = f"session: decode {N} SendReqs"
    dec = impl.Decoder(1 << 20, FrameDecompressor() if kind == "zstd" else None)
    chunk = CHUNKS[kind]

    def run() -> list:
        dec.feed(chunk)
        out = []
        while (f := dec.next_frame()) is not None:
            out.append(f)
        return out

    assert benchmark(run) == SEND_REQS
    _per_frame(benchmark)


@pytest.mark.parametrize("kind", list(CHUNKS))
def test_decode_next_frames(benchmark: Any, impl: ModuleType, kind: str) -> None:
    benchmark.group = f"session: decode {N} SendReqs"
    s = _session(impl, kind == "zstd")
    chunk = CHUNKS[kind]

    def run() -> list:
        s.receive_data(chunk)
        out = []
        while frames := s.next_frames():
            out += frames
        return out

    assert benchmark(run) == SEND_REQS
    _per_frame(benchmark)


@pytest.mark.parametrize("kind", list(CHUNKS))
def test_decode_next_frame(benchmark: Any, impl: ModuleType, kind: str) -> None:
    benchmark.group = f"session: decode {N} SendReqs"
    s = _session(impl, kind == "zstd")
    chunk = CHUNKS[kind]

    def run() -> list:
        s.receive_data(chunk)
        out = []
        while (f := s.next_frame()) is not None:
            out.append(f)
        return out

    assert benchmark(run) == SEND_REQS
    _per_frame(benchmark)
