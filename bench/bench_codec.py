"""Codec throughput, compiled vs pure, on a realistic traffic mix.

    pytest bench/bench_codec.py --benchmark-only           # measure
    pytest bench/bench_codec.py --benchmark-disable        # run each once (CI)

The mix is one round trip of a chatty client: a SendReq with a 100-byte
payload, its SendAck, a Push of 16 messages with 100-byte payloads, and the
PushAck.  ``benchmark.group`` is the operation, so each table shows the two
backends side by side; the pure/compiled ratio is the speed-up.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from pimcore import _backend
from pimcore import frames as F

BACKENDS = _backend.available()


def traffic_mix() -> list[Any]:
    payload = bytes(range(100))
    t0 = 1_700_000_000_000_000  # microseconds since the epoch
    messages = tuple(
        F.Message(
            position=10_000 + i,
            msg_id=bytes(range(i, i + 16)),
            conv="dm:alice:bob",
            seq=5_000 + i,
            sender="alice",
            device="alice-phone",
            client_time=t0 + 1_000 * i,
            server_time=t0 + 1_000 * i + 250,
            payload=payload,
        )
        for i in range(16)
    )
    return [
        F.SendReq(local_id=4711, conv="dm:alice:bob", client_time=t0, payload=payload),
        F.SendAck(local_id=4711, code=0, msg_id=bytes(range(16)), seq=5_016, server_time=t0 + 300),
        F.Push(position=10_015, messages=messages),
        F.PushAck(position=10_015),
    ]


MIX = traffic_mix()


def _encode(impl: ModuleType) -> list[bytes]:
    encode = impl.encode_frame
    return [encode(frame) for frame in MIX]


def _decode(impl: ModuleType, wire: bytes) -> list[Any]:
    dec = impl.Decoder()
    dec.feed(wire)
    return list(dec)


def _round_trip(impl: ModuleType) -> list[Any]:
    return _decode(impl, b"".join(_encode(impl)))


@pytest.fixture(params=BACKENDS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _backend.load(request.param)


def test_encode(benchmark: Any, impl: ModuleType) -> None:
    benchmark.group = "codec: encode mix"
    wire = benchmark(_encode, impl)
    # the output is checked against the reference twin, so a fast wrong
    # encoder cannot post a number
    assert wire == [_backend.load("pure").encode_frame(f) for f in MIX]


def test_decode(benchmark: Any, impl: ModuleType) -> None:
    benchmark.group = "codec: decode mix"
    wire = _backend.load("pure").encode_frames(MIX)
    assert benchmark(_decode, impl, wire) == MIX


def test_encode_decode(benchmark: Any, impl: ModuleType) -> None:
    benchmark.group = "codec: encode+decode mix"
    assert benchmark(_round_trip, impl) == MIX
