"""Frame compression: size and time, with the shipped dictionary and without.

    pytest bench/bench_compress.py --benchmark-enable --benchmark-only --benchmark-group-by=group
    pytest bench/bench_compress.py --benchmark-disable       # run each once (CI)

The frames are a held-out set (another seed, and the other half of the phrase
lists, than the dictionary was trained on) of SMALL frames from
tools/train_zstd_dict.py: SendReqs with 20..200-byte JSON payloads and
Pushes of one message, 200 of them.  Each round handles all 200, so divide
the time by 200 for one frame (``extra_info`` has it, with the wire ratio:
uncompressed bytes / bytes sent).  Frames are compressed one by one, as a
broker sends them.

Groups:

* ``compress``   -- FrameCompressor.compress on each encoded frame: the
  shipped dictionary vs plain zstd (same level 3, threshold, fallback).
* ``decode``     -- a Decoder taking the whole stream: uncompressed (the
  baseline), and compressed with decompression on, per backend.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pimcore import _backend
from pimcore.compress import FrameCompressor, FrameDecompressor

ROOT = Path(__file__).resolve().parents[1]
N = 200
BACKENDS = _backend.available()


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_zstd_dict", ROOT / "tools" / "train_zstd_dict.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()
pure = _backend.load("pure")
FRAMES = tool.Traffic(tool.EVAL_SEED, "eval").small_frames(N)
RAWS = [pure.encode_frame(f) for f in FRAMES]
WIRE = b"".join(RAWS)
DICTIONARIES = {"dictionary": FrameCompressor, "plain zstd": lambda: FrameCompressor(dictionary=None)}


def _per_frame(benchmark: Any) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["per_frame_us"] = round(benchmark.stats.stats.median / N * 1e6, 3)


@pytest.fixture(params=BACKENDS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _backend.load(request.param)


@pytest.mark.parametrize("kind", list(DICTIONARIES))
def test_compress(benchmark: Any, kind: str) -> None:
    benchmark.group = f"compress: {N} small frames"
    comp = DICTIONARIES[kind]()
    out = benchmark(lambda: [comp.compress(raw) for raw in RAWS])
    wire = sum(map(len, out))
    benchmark.extra_info["wire_ratio"] = round(len(WIRE) / wire, 3)
    benchmark.extra_info["compressed_share"] = round(sum(a is not b for a, b in zip(out, RAWS)) / N, 3)
    _per_frame(benchmark)
    # correctness, so a fast wrong compressor cannot post a number
    assert wire <= len(WIRE)
    assert pure.decode_frame(out[0], decompress=FrameDecompressor()) == FRAMES[0]
    if kind == "dictionary":
        assert wire * 1.2 < len(WIRE)  # the point of the dictionary


def test_decode_uncompressed(benchmark: Any, impl: ModuleType) -> None:
    benchmark.group = f"decode: {N} small frames"

    def decode() -> list:
        dec = impl.Decoder()
        dec.feed(WIRE)
        return list(dec)

    assert benchmark(decode) == FRAMES
    _per_frame(benchmark)


@pytest.mark.parametrize("kind", list(DICTIONARIES))
def test_decode_compressed(benchmark: Any, impl: ModuleType, kind: str) -> None:
    benchmark.group = f"decode: {N} small frames"
    wire = DICTIONARIES[kind]().compress_many(RAWS)
    decomp = FrameDecompressor()

    def decode() -> list:
        dec = impl.Decoder(decompress=decomp)
        dec.feed(wire)
        return list(dec)

    assert benchmark(decode) == FRAMES
    _per_frame(benchmark)
