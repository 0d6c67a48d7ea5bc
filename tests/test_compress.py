"""zstd compression of frames (docs/PROTOCOL.md section 7): pimcore.compress and
the decoders' ``decompress`` hook, on both backends and against each other."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore import _backend, compress
from pimcore import frames as F
from pimcore._pure.codec import SCHEMA
from pimcore.compress import DEFAULT_THRESHOLD, FrameCompressor, FrameDecompressor
from pimcore.errors import ErrorCode, FrameTooLarge, ProtocolError

from _fuzz import feed_split, frame_strategies, mutate

ROOT = Path(__file__).resolve().parents[1]
MALFORMED = ErrorCode.MALFORMED_FRAME
TOO_LARGE = ErrorCode.FRAME_TOO_LARGE
FRAMES = tuple(F.FRAME_CLASSES.values())
pure = _backend.load("pure")


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_zstd_dict", ROOT / "tools" / "train_zstd_dict.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()


# ------------------------------------------------------------ helpers

COMP = FrameCompressor()
DECOMP = FrameDecompressor()


def split(raw: bytes) -> tuple[int, int, int, bytes]:
    """(prefix size, head, type, body) of one encoded frame."""
    n = 0
    while raw[n] & 0x80:
        n += 1
    return n + 1, raw[n + 1], raw[n + 2], raw[n + 3 :]


def uvarint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def reframe(ftype: int, zbody: bytes, head: int = 0x41) -> bytes:
    """A frame with the given (compressed) body, bypassing every compressor rule."""
    return uvarint(2 + len(zbody)) + bytes((head, ftype)) + zbody


def forced(raw: bytes, cctx: Optional[zstandard.ZstdCompressor] = None) -> bytes:
    """``raw`` compressed whatever the size or gain (still a valid frame)."""
    _, _, ftype, body = split(raw)
    cctx = cctx or zstandard.ZstdCompressor(level=3, dict_data=compress.load_dictionary())
    return reframe(ftype, cctx.compress(body))


def run(impl: ModuleType, data: bytes, cuts: list[int], max_frame_size: int = 1 << 20, decompress: Any = None) -> tuple[list, tuple]:
    """Feed ``data`` split at ``cuts``, draining after every feed: the frames
    and ("need", buffered) or ("error", class, code, message)."""
    return feed_split(impl.Decoder(max_frame_size, decompress if decompress is not None else FrameDecompressor()), data, cuts)


def error_of(impl: ModuleType, data: bytes, max_frame_size: int = 1 << 20, decompress: Any = None) -> ProtocolError:
    """The error both decode_frame and a Decoder raise for ``data`` (checked equal)."""
    decompress = decompress if decompress is not None else FrameDecompressor()
    with pytest.raises(ProtocolError) as info:
        impl.decode_frame(data, max_frame_size, decompress)
    frames_, end = run(impl, data, [], max_frame_size, decompress)
    assert frames_ == [] and end[0] == "error"
    assert (end[1], end[2], end[3]) == (type(info.value), info.value.code, str(info.value))
    return info.value


# ------------------------------------------------------------ strategies
# Built from the codec schema; text and bytes lean towards chat content so
# that plenty of frames are worth compressing.

_CHAT = [p.encode() for p in tool.EN + tool.ZH] + [b'{"type":"text","text":"hello"}', b"\x00" * 70]
_payload = st.one_of(
    st.binary(max_size=60),
    st.sampled_from(_CHAT),
    st.builds(lambda s, n: s * n, st.binary(min_size=1, max_size=6), st.integers(1, 60)),
    st.lists(st.sampled_from(_CHAT), min_size=1, max_size=6).map(b" ".join),
)
_text = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.sampled_from(tool.EN + tool.ZH + ["d:u12:u345", "g:team-42"]),
    st.builds(lambda s, n: s * n, st.text(st.characters(codec="utf-8"), min_size=1, max_size=4), st.integers(1, 40)),
)
_SCALARS = {
    "u": st.one_of(st.integers(0, 300), st.integers(0, (1 << 64) - 1)),
    "s": st.integers(-(1 << 63), (1 << 63) - 1),
    "b": _payload,
    "t": _text,
    "?": st.booleans(),
}


record, frames = frame_strategies(SCHEMA, _SCALARS, max_list=4)


def traffic(seed: int, count: int) -> list[Any]:
    return list(tool.Traffic(seed, "eval").frames(count))


TRAFFIC = traffic(11, 400)


def _big(cls: type) -> Any:
    """An instance of ``cls`` whose body is well above the threshold and
    compressible when the frame has a text or bytes field."""
    values = []
    for name, kind in SCHEMA[cls]:
        if kind.startswith("["):
            rec = getattr(F, kind[1:-1])
            values.append((_big(rec),) * 3)
        else:
            values.append({"u": 1 << 40, "s": -(1 << 40), "b": b'{"type":"text","text":"ok"}' * 4, "t": "g:team-42 " * 6, "?": True}[kind])
    return cls(*values)


# ------------------------------------------------------------ the dictionary


def test_dictionary_is_package_data() -> None:
    path = resources.files("pimcore") / "data" / compress.DICTIONARY_FILE
    assert path.is_file()
    d = compress.load_dictionary()
    assert d is compress.load_dictionary()  # cached
    assert d.dict_id() == compress.DICTIONARY_ID == 0xC403 and len(d) == 16384
    assert d.as_bytes() == path.read_bytes()


def test_protocol_md_names_the_shipped_dictionary() -> None:
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text("utf-8")
    data = compress.load_dictionary().as_bytes()
    assert hashlib.sha256(data).hexdigest() in doc
    assert f"{compress.DICTIONARY_ID:#X}".replace("0X", "0x") in doc
    assert f"at least {DEFAULT_THRESHOLD} bytes" in doc


@pytest.mark.skipif(zstandard.__version__ != "0.25.0", reason="training output is pinned to the zstandard version it was made with")
def test_shipped_dictionary_is_reproducible() -> None:
    samples = tool.training_samples()
    assert tool.train(samples).as_bytes() == compress.load_dictionary().as_bytes()


def test_traffic_generator_is_deterministic_and_realistic() -> None:
    a = tool.Traffic(5, "eval").small_frames(50)
    assert a == tool.Traffic(5, "eval").small_frames(50)
    assert a != tool.Traffic(6, "eval").small_frames(50)
    types = {type(f) for f in traffic(3, 3000)}
    assert {F.SendReq, F.SendAck, F.Push, F.PushAck, F.Read, F.ReadStates, F.ReadReceipt} <= types
    push = next(f for f in a if type(f) is F.Push)
    m = push.messages[0]
    assert len(m.msg_id) == 16 and int.from_bytes(m.msg_id[:8], "big") == m.server_time
    assert re.fullmatch(r"(d:u\d+:u\d+|g:[a-z-]+-\d+)", m.conv) and re.fullmatch(r"u\d+", m.sender)
    assert m.payload.startswith(b'{"type":"')


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("cls", FRAMES, ids=lambda c: c.__name__)
def test_every_frame_type_round_trips_compressed(backend: ModuleType, cls: type) -> None:
    frame = _big(cls)
    raw = backend.encode_frame(frame)
    z = forced(raw)  # whatever the gain: the decoder must take any valid compressed frame
    assert z[split(z)[0]] == 0x41 and z != raw
    assert backend.decode_frame(z, decompress=DECOMP) == frame
    out = COMP.compress(raw)
    if any(kind in ("b", "t") or kind.startswith("[") for _, kind in SCHEMA[cls]):
        assert len(out) < len(raw) and out[split(out)[0]] == 0x41  # text/bytes/lists of them shrink
    assert backend.decode_frame(out, decompress=DECOMP) == frame


def test_realistic_traffic_round_trips(backend: ModuleType) -> None:
    comp = FrameCompressor()
    wire = comp.encode_frames(TRAFFIC)
    assert wire == b"".join(comp.compress(pure.encode_frame(f)) for f in TRAFFIC)
    stats = comp.statistics()
    assert stats.frames == 2 * len(TRAFFIC) and 0 < stats.compressed < stats.frames
    assert run(backend, wire, []) == (TRAFFIC, ("need", 0))
    assert len(wire) < len(pure.encode_frames(TRAFFIC)) / 1.3  # the dictionary pays


@settings(max_examples=200, deadline=None)
@given(fs=st.lists(frames, max_size=5), threshold=st.sampled_from([0, 10, DEFAULT_THRESHOLD]), data=st.data())
def test_split_anywhere(backend: ModuleType, fs: list, threshold: int, data: st.DataObject) -> None:
    wire = FrameCompressor(threshold=threshold).compress_many(backend.encode_frame(f) for f in fs)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    assert run(backend, wire, cuts) == (fs, ("need", 0))


@settings(max_examples=100, deadline=None)
@given(fs=st.lists(frames, min_size=1, max_size=4), data=st.data())
def test_forced_compression_of_anything_round_trips(backend: ModuleType, fs: list, data: st.DataObject) -> None:
    wire = b"".join(forced(backend.encode_frame(f)) for f in fs)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=6))
    assert run(backend, wire, cuts) == (fs, ("need", 0))


def test_frames_compressed_without_a_dictionary_are_accepted(backend: ModuleType) -> None:
    frame = _big(F.SendReq)
    plain = FrameCompressor(dictionary=None)
    z = plain.compress(backend.encode_frame(frame))
    assert z[1] == 0x41 and plain.statistics().compressed == 1
    assert backend.decode_frame(z, decompress=DECOMP) == frame  # receiver with the dictionary
    assert backend.decode_frame(z, decompress=FrameDecompressor(dictionary=None)) == frame


# ------------------------------------------------------------ the compressor's choices


def test_small_frames_are_untouched() -> None:
    comp = FrameCompressor()
    for frame in (F.Ping(nonce=1), F.PushAck(position=123456), F.Read(conv="d:u1:u2", seq=9)):
        raw = pure.encode_frame(frame)
        assert comp.compress(raw) is raw
    # one byte under the threshold: untouched however compressible (body: the
    # payload and the one-byte encodings of every other field, its length included)
    fixed = len(split(pure.encode_frame(F.SendReq(0, "", 0, b"")))[3])
    under = pure.encode_frame(F.SendReq(0, "", 0, b"a" * (DEFAULT_THRESHOLD - 1 - fixed)))
    assert len(split(under)[3]) == DEFAULT_THRESHOLD - 1 and comp.compress(under) is under
    at = pure.encode_frame(F.SendReq(0, "", 0, b"a" * (DEFAULT_THRESHOLD - fixed)))
    assert len(split(at)[3]) == DEFAULT_THRESHOLD
    out = comp.compress(at)
    assert len(out) < len(at) and out[1] == 0x41
    s = comp.statistics()
    assert (s.frames, s.compressed) == (5, 1)
    assert s.bytes_in - s.bytes_out == len(at) - len(out) > 0 and s.ratio > 1


def test_threshold_zero_still_never_grows_a_frame() -> None:
    comp = FrameCompressor(threshold=0)
    for frame in TRAFFIC:
        raw = pure.encode_frame(frame)
        out = comp.compress(raw)
        assert out is raw or len(out) < len(raw)
    assert comp.compress(pure.encode_frame(F.Ping(nonce=0))) == bytes.fromhex("03 40 0e 00")


def test_incompressible_payloads_stay_uncompressed() -> None:
    rng = random.Random(1)
    comp = FrameCompressor()
    for size in (DEFAULT_THRESHOLD, 100, 1000, 100_000):
        raw = pure.encode_frame(F.SendReq(1, "c", 0, rng.randbytes(size)))
        assert comp.compress(raw) is raw
    s = comp.statistics()
    assert s.frames == 4 and s.compressed == 0 and s.bytes_in == s.bytes_out


def test_compressed_length_counts_wire_bytes() -> None:
    raw = pure.encode_frame(F.SendReq(1, "c", 0, b"x" * 5000))  # 2-byte prefix before, 1 after
    out = COMP.compress(raw)
    n, head, ftype, zbody = split(out)
    assert n == 1 and out[0] == len(out) - 1 and head == 0x41 and ftype == F.SendReq.TYPE
    assert zstandard.frame_content_size(zbody) == len(split(raw)[3])
    params = zstandard.get_frame_parameters(zbody)
    assert params.dict_id == compress.DICTIONARY_ID and not params.has_checksum


@pytest.mark.parametrize(
    "bad,exc",
    [
        (b"", ValueError),
        (b"\x03\x40\x0e", ValueError),  # truncated
        (b"\x03\x40\x0e\x00\x00", ValueError),  # two frames' worth
        (b"\x01\x40", ValueError),  # length 1
        (b"\x80\x80\x80\x80\x80\x01", ValueError),  # prefix too long
        (bytes.fromhex("03 41 0e 00"), ValueError),  # already flagged
        (bytes.fromhex("03 10 0e 00"), ValueError),  # not this version (1)
        (bytearray(b"\x03\x40\x0e\x00"), TypeError),
        ("\x03\x40\x0e\x00", TypeError),
    ],
)
def test_compress_takes_one_encoded_frame(bad: Any, exc: type) -> None:
    comp = FrameCompressor()
    with pytest.raises(exc):
        comp.compress(bad)
    assert comp.statistics().frames == 0


@pytest.mark.parametrize("kwargs", [{"level": 0}, {"level": 23}, {"level": 3.0}, {"threshold": -1}, {"threshold": True}])
def test_compressor_argument_checks(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FrameCompressor(**kwargs)


def test_dictionary_argument_checks() -> None:
    with pytest.raises(TypeError):
        FrameCompressor(dictionary="zstd-chat-v1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FrameDecompressor(dictionary=1)  # type: ignore[arg-type]
    raw = compress.load_dictionary().as_bytes()
    frame = _big(F.Push)
    z = FrameCompressor(level=5, dictionary=raw).compress(pure.encode_frame(frame))
    assert pure.decode_frame(z, decompress=FrameDecompressor(dictionary=compress.load_dictionary())) == frame


# ------------------------------------------------------------ negotiation in the decoder


def test_flag_without_decompression_is_malformed(backend: ModuleType) -> None:
    z = COMP.compress(backend.encode_frame(_big(F.SendReq)))
    with pytest.raises(ProtocolError) as info:
        backend.decode_frame(z)
    assert type(info.value) is ProtocolError and info.value.code == MALFORMED
    dec = backend.Decoder()
    assert dec.decompress is None
    dec.feed(z[:2])  # judged from the head alone, before the body
    with pytest.raises(ProtocolError) as again:
        dec.next_frame()
    assert again.value.code == MALFORMED and str(again.value) == str(info.value)


def test_enable_decompression_later(backend: ModuleType) -> None:
    login = backend.encode_frame(F.Login(b"t", "d", 0, 0, F.CAP_ZSTD))
    frame = _big(F.SendReq)
    z = COMP.compress(backend.encode_frame(frame))
    dec = backend.Decoder(1 << 20)
    dec.feed(login + z)  # the compressed frame is already buffered...
    assert dec.next_frame() == F.Login(b"t", "d", 0, 0, F.CAP_ZSTD)
    decomp = FrameDecompressor()
    dec.enable_decompression(decomp)  # ...and judged when taken
    assert dec.decompress is decomp
    assert dec.next_frame() == frame and dec.next_frame() is None
    dec.feed(backend.encode_frame(F.Ping(nonce=5)))  # uncompressed frames stay valid
    assert dec.next_frame() == F.Ping(nonce=5)


def test_decompress_argument_checks(backend: ModuleType) -> None:
    with pytest.raises(TypeError):
        backend.Decoder(1 << 20, 5)
    with pytest.raises(TypeError):
        backend.decode_frame(b"\x03\x40\x0e\x00", 1 << 20, b"not callable")
    dec = backend.Decoder()
    with pytest.raises(TypeError):
        dec.enable_decompression(None)
    with pytest.raises(TypeError):
        dec.enable_decompression("zstd")
    assert dec.decompress is None
    assert backend.Decoder(decompress=DECOMP).decompress is DECOMP
    assert backend.decode_frame(b"\x03\x40\x0e\x00", decompress=DECOMP) == F.Ping(nonce=0)


@pytest.mark.parametrize("head", [0x43, 0x45, 0x49, 0x42, 0x44, 0x48, 0x4F])
def test_reserved_flags_stay_malformed_with_decompression(backend: ModuleType, head: int) -> None:
    z = COMP.compress(pure.encode_frame(_big(F.SendReq)))
    bad = z[:1] + bytes((head,)) + z[2:]
    err = error_of(backend, bad)
    assert err.code == MALFORMED and "flag" in str(err)


def test_decompress_gets_the_body_and_the_body_limit(backend: ModuleType) -> None:
    calls: list = []
    frame = _big(F.Close)
    raw = backend.encode_frame(frame)

    def spy(body: bytes, max_size: int) -> bytes:
        calls.append((body, max_size))
        return DECOMP(body, max_size)

    z = COMP.compress(raw)
    assert backend.decode_frame(z, 1000, spy) == frame
    assert calls == [(split(z)[3], 998)] and type(calls[0][0]) is bytes
    # uncompressed frames never reach the callable
    assert backend.decode_frame(raw, 1000, spy) == frame and len(calls) == 1


def test_decompress_result_is_decoded_as_a_body(backend: ModuleType) -> None:
    z = reframe(F.Ping.TYPE, b"anything")
    assert backend.decode_frame(z, decompress=lambda body, m: b"\x05") == F.Ping(nonce=5)
    for out in (b"\x05\x00", b"", b"\x80"):  # trailing byte, missing field, truncated varint
        assert error_of(backend, z, decompress=lambda body, m, out=out: out).code == MALFORMED
    # the decoder holds a faulty callable to the limit too
    err = error_of(backend, z, 100, lambda body, m: b"\x05" + b"\x00" * 98)
    assert type(err) is FrameTooLarge and err.code == TOO_LARGE


def test_decompress_result_must_be_bytes(backend: ModuleType) -> None:
    z = reframe(F.Ping.TYPE, b"anything")
    for out in (bytearray(b"\x05"), memoryview(b"\x05"), None):
        with pytest.raises(TypeError):
            backend.decode_frame(z, decompress=lambda body, m, out=out: out)


def test_decompress_errors_poison_the_decoder(backend: ModuleType) -> None:
    good = backend.encode_frame(F.Ping(nonce=1))
    z = reframe(F.Ping.TYPE, b"\x28\xb5\x2f\xfd garbage")
    dec = backend.Decoder(1 << 20, FrameDecompressor())
    dec.feed(good + z + good)
    assert dec.next_frame() == F.Ping(nonce=1)
    with pytest.raises(ProtocolError) as first:
        dec.next_frame()
    assert first.value.code == MALFORMED
    for action in (dec.next_frame, lambda: dec.feed(good)):
        with pytest.raises(ProtocolError) as again:
            action()
        assert str(again.value) == str(first.value) and again.value.code == MALFORMED


def test_decompress_cannot_reenter_the_decoder(backend: ModuleType) -> None:
    dec = backend.Decoder()

    def sneaky(body: bytes, max_size: int) -> bytes:
        dec.feed(b"\x03\x40\x0e\x00")
        return b"\x05"

    dec.enable_decompression(sneaky)
    dec.feed(reframe(F.Ping.TYPE, b"x"))
    with pytest.raises(RuntimeError):
        dec.next_frame()


# ------------------------------------------------------------ hostile bodies


def _zheader(content_size: Optional[int], single_segment: bool = True, dict_id: Optional[int] = None) -> bytes:
    """A zstd frame header built by hand (RFC 8878 3.1.1.1)."""
    fcs = b""
    if content_size is not None:
        if single_segment and content_size < 256:
            flag, fcs = 0, content_size.to_bytes(1, "little")
        elif 256 <= content_size < 65536 + 256:
            flag, fcs = 1, (content_size - 256).to_bytes(2, "little")
        elif content_size < 1 << 32:
            flag, fcs = 2, content_size.to_bytes(4, "little")
        else:
            flag, fcs = 3, content_size.to_bytes(8, "little")
    did = b"" if dict_id is None else dict_id.to_bytes(2, "little")
    fhd = (flag << 6 if content_size is not None else 0) | (0x20 if single_segment else 0) | (2 if dict_id is not None else 0)
    window = b"" if single_segment else b"\x58"  # window log 21
    return b"\x28\xb5\x2f\xfd" + bytes((fhd,)) + window + did + fcs


def _raw_block(data: bytes) -> bytes:
    return ((len(data) << 3) | 1).to_bytes(3, "little") + data  # last block, raw


class _NeverDecompress:
    """Stands in for the zstd context: the size check must come first."""

    def decompress(self, *args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("decompressed a frame that had to be rejected from its header")


def test_hand_built_zstd_frames_are_understood(backend: ModuleType) -> None:
    body = b"\x05"
    for single in (True, False):
        z = _zheader(1, single) + _raw_block(body)
        assert backend.decode_frame(reframe(F.Ping.TYPE, z), decompress=DECOMP) == F.Ping(nonce=5)


@pytest.mark.parametrize("declared", [1001, 5000, 1 << 31, 1 << 40, (1 << 64) - 3])
def test_bomb_is_rejected_from_the_header(backend: ModuleType, declared: int) -> None:
    z = reframe(F.SendReq.TYPE, _zheader(declared, single_segment=declared < 1 << 20) + _raw_block(b"\x00" * 8))
    guarded = FrameDecompressor()
    guarded._dctx = _NeverDecompress()  # type: ignore[assignment]
    err = error_of(backend, z, 1002, guarded)  # body limit 1000
    assert type(err) is FrameTooLarge and err.code == TOO_LARGE


def test_real_bomb_within_the_wire_limit(backend: ModuleType) -> None:
    # 1 MiB of zeros compresses to a few dozen bytes: the wire length passes
    # every limit, the declared content size does not.
    raw = pure.encode_frame(F.SendReq(1, "c", 0, bytes(1 << 20)))
    z = COMP.compress(raw)
    assert len(z) < 200
    err = error_of(backend, z, 64 << 10)
    assert type(err) is FrameTooLarge and err.code == TOO_LARGE
    assert backend.decode_frame(z, len(raw), DECOMP) == F.SendReq(1, "c", 0, bytes(1 << 20))


def test_body_limit_is_inclusive(backend: ModuleType) -> None:
    frame = F.SendReq(1, "c", 0, b"ab" * 100)
    raw = backend.encode_frame(frame)
    z = COMP.compress(raw)
    body_len = len(split(raw)[3])
    assert len(z) < len(raw)
    # the same max_frame_size admits both forms of the frame, or neither
    assert backend.decode_frame(z, body_len + 2, DECOMP) == backend.decode_frame(raw, body_len + 2) == frame
    assert error_of(backend, z, body_len + 1).code == TOO_LARGE
    with pytest.raises(FrameTooLarge):
        backend.decode_frame(raw, body_len + 1)


def test_missing_content_size_is_malformed(backend: ModuleType) -> None:
    raw = pure.encode_frame(_big(F.SendReq))
    cctx = zstandard.ZstdCompressor(level=3, dict_data=compress.load_dictionary(), write_content_size=False)
    z = forced(raw, cctx)
    assert zstandard.frame_content_size(split(z)[3]) == -1
    err = error_of(backend, z)
    assert type(err) is ProtocolError and err.code == MALFORMED and "content size" in str(err)
    # a hand-built header without a size, too
    assert error_of(backend, reframe(F.Ping.TYPE, _zheader(None, False) + _raw_block(b"\x05"))).code == MALFORMED


def _corruptions() -> dict[str, Callable[[bytes], bytes]]:
    return {
        "truncated": lambda z: z[:-1],
        "trailing byte": lambda z: z + b"\x00",
        "second zstd frame": lambda z: z + z,
        "header only": lambda z: z[:8],
        "bad magic": lambda z: b"\x29" + z[1:],
        "too short for a header": lambda z: z[:3],
        "empty": lambda z: b"",
        "size says one less": lambda z: z[:7] + bytes((z[7] - 1,)) + z[8:],
        "size says one more": lambda z: z[:7] + bytes((z[7] + 1,)) + z[8:],
        "block type reserved": lambda z: z[:8] + bytes((z[8] | 0x06,)) + z[9:],
        "block longer than the body": lambda z: z[:8] + b"\xf9\xff\x00" + z[11:],
    }


@pytest.mark.parametrize("name", list(_corruptions()))
def test_corrupt_zstd_data_is_malformed(backend: ModuleType, name: str) -> None:
    frame = F.SendReq(7, "d:u12:u345", 0, b'{"type":"text","text":"see you at 7, at the usual place"}')
    z = COMP.compress(backend.encode_frame(frame))
    n, _, ftype, zbody = split(z)
    assert zbody[4] == 0x22 and len(zbody) > 20  # single segment, 2-byte dict id, 1-byte size at [7]
    err = error_of(backend, reframe(ftype, _corruptions()[name](zbody)))
    assert type(err) is ProtocolError and err.code == MALFORMED


def test_skippable_and_empty_frames_are_malformed(backend: ModuleType) -> None:
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"\x05\x05\x05\x05"
    assert error_of(backend, reframe(F.Ping.TYPE, skippable)).code == MALFORMED
    empty = zstandard.ZstdCompressor().compress(b"")
    assert zstandard.frame_content_size(empty) == 0
    assert error_of(backend, reframe(F.Ping.TYPE, empty)).code == MALFORMED
    checksummed = zstandard.ZstdCompressor(write_checksum=True).compress(b"\x05")
    assert backend.decode_frame(reframe(F.Ping.TYPE, checksummed), decompress=DECOMP) == F.Ping(nonce=5)
    bad_sum = checksummed[:-1] + bytes((checksummed[-1] ^ 1,))
    assert error_of(backend, reframe(F.Ping.TYPE, bad_sum)).code == MALFORMED


def test_frame_decompressor_on_its_own() -> None:
    body = pure.encode_frame(_big(F.SendReq))[3:]
    z = zstandard.ZstdCompressor(dict_data=compress.load_dictionary()).compress(body)
    assert DECOMP(z, len(body)) == body and type(DECOMP(z, len(body))) is bytes
    with pytest.raises(FrameTooLarge):
        DECOMP(z, len(body) - 1)
    for bad in (b"", b"\x28\xb5\x2f\xfd", zstandard.ZstdCompressor().compress(b""), z[:-1], z + b"\x00"):
        with pytest.raises(ProtocolError) as info:
            DECOMP(bad, 1 << 20)
        assert type(info.value) is ProtocolError and info.value.code == MALFORMED
    assert DECOMP(z, len(body)) == body  # errors leave the context usable


@pytest.fixture(scope="module")
def other_dictionary() -> zstandard.ZstdCompressionDict:
    samples = [tool.body_of(pure.encode_frame(f)) for f in traffic(99, 3000)]
    return zstandard.train_dictionary(4096, [s for s in samples if len(s) > 8], k=200, d=8, dict_id=0xBEEF, threads=0)


def test_wrong_dictionary_is_malformed(backend: ModuleType, other_dictionary: zstandard.ZstdCompressionDict) -> None:
    frame = _big(F.Push)
    raw = backend.encode_frame(frame)
    theirs = FrameCompressor(dictionary=other_dictionary).compress(raw)
    assert zstandard.get_frame_parameters(split(theirs)[3]).dict_id == 0xBEEF
    err = error_of(backend, theirs)  # we hold zstd-chat-v3 only
    assert type(err) is ProtocolError and err.code == MALFORMED
    ours = COMP.compress(raw)
    assert error_of(backend, ours, decompress=FrameDecompressor(dictionary=None)).code == MALFORMED
    assert error_of(backend, ours, decompress=FrameDecompressor(dictionary=other_dictionary)).code == MALFORMED
    assert backend.decode_frame(theirs, decompress=FrameDecompressor(dictionary=other_dictionary)) == frame


# ------------------------------------------------------------ the spec's test vector


def _doc_vector() -> bytes:
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text("utf-8")
    block = re.search(r"<!-- zstd-vector -->\n```\n(.*?)```", doc, re.S)
    assert block, "the compressed test vector is missing from docs/PROTOCOL.md"
    hexes = [re.match(r"((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:\s|$)", line) for line in block.group(1).splitlines()]
    assert all(hexes)
    return bytes.fromhex(" ".join(m.group(1) for m in hexes))  # type: ignore[union-attr]


VECTOR_FRAME = F.SendReq(local_id=7, conv="d:u12:u345", client_time=1717200000000000, payload='{"type":"text","text":"see you at 7 🙂"}'.encode())


def test_protocol_md_vector(backend: ModuleType) -> None:
    data = _doc_vector()
    assert backend.decode_frame(data, decompress=DECOMP) == VECTOR_FRAME
    assert len(backend.encode_frame(VECTOR_FRAME)) == 69 and len(data) == 56
    assert error_of(backend, data, decompress=FrameDecompressor(dictionary=None)).code == MALFORMED
    with pytest.raises(ProtocolError):
        backend.decode_frame(data)  # not negotiated


@pytest.mark.skipif(zstandard.ZSTD_VERSION != (1, 5, 7), reason="compressed bytes are pinned to the libzstd version")
def test_compressor_reproduces_the_vector() -> None:
    assert COMP.compress(pure.encode_frame(VECTOR_FRAME)) == _doc_vector()


# ------------------------------------------------------------ the two backends agree


@st.composite
def mutated_compressed_wire(draw: st.DrawFn) -> bytes:
    """Compressed (and some plain) frames with a few bytes flipped, replaced,
    inserted or deleted -- in the prefix, the head or the zstd data."""
    fs = draw(st.lists(st.one_of(frames, st.sampled_from(TRAFFIC)), min_size=1, max_size=3))
    threshold = draw(st.sampled_from([0, DEFAULT_THRESHOLD]))
    comp = FrameCompressor(threshold=threshold)
    return mutate(draw, comp.compress_many(pure.encode_frame(f) for f in fs), min_edits=0)


@settings(max_examples=400, deadline=None)
@given(
    data=mutated_compressed_wire(),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    max_size=st.sampled_from([2, 40, 300, 1 << 20]),
    enabled=st.booleans(),
)
def test_backends_agree_on_mutated_compressed_streams(
    both: tuple[ModuleType, ModuleType], data: bytes, cuts: list[int], max_size: int, enabled: bool
) -> None:
    cy, py = both
    cuts = [min(c, len(data)) for c in cuts]

    def outcome(impl: ModuleType, cuts: list[int]) -> tuple:
        if enabled:
            return run(impl, data, cuts, max_size, FrameDecompressor())
        dec = impl.Decoder(max_size)  # decompression off: flags are malformed
        out: list = []
        pos = 0
        for cut in sorted(cuts) + [len(data)]:
            try:
                dec.feed(data[pos:cut])
                out.extend(dec)
            except ProtocolError as exc:
                return out, ("error", type(exc), exc.code, str(exc))
            pos = cut
        return out, ("need", dec.buffered)

    whole = outcome(py, [])
    assert outcome(cy, cuts) == outcome(py, cuts) == whole  # split-independent and identical
    assert all(type(f) in FRAMES for f in whole[0])
    if whole[1][0] == "error":
        # FRAME_TOO_LARGE always comes as FrameTooLarge, whatever decided it
        assert whole[1][1] is (FrameTooLarge if whole[1][2] == TOO_LARGE else ProtocolError)

    def one(impl: ModuleType) -> tuple:
        try:
            return ("ok", impl.decode_frame(data, max_size, FrameDecompressor() if enabled else None))
        except ProtocolError as exc:
            return ("error", type(exc), exc.code, str(exc))

    assert one(cy) == one(py)


def test_backends_agree_on_every_corruption(both: tuple[ModuleType, ModuleType]) -> None:
    cy, py = both
    z = COMP.compress(pure.encode_frame(F.SendReq(7, "g:team-42", 0, b'{"type":"text","text":"hello hello hello everyone"}')))
    _, _, ftype, zbody = split(z)
    cases = [reframe(ftype, fn(zbody)) for fn in _corruptions().values()]
    cases.append(reframe(F.SendReq.TYPE, _zheader(1 << 40, False) + _raw_block(b"\x00")))
    for data in cases:
        outs = []
        for impl in (cy, py):
            with pytest.raises(ProtocolError) as info:
                impl.decode_frame(data, 1 << 20, FrameDecompressor())
            outs.append((type(info.value), info.value.code, str(info.value)))
        assert outs[0] == outs[1]


def test_public_modules(active: ModuleType) -> None:
    from pimcore import codec

    assert codec.FLAG_ZSTD == 1 == active.FLAG_ZSTD
    assert "FLAG_ZSTD" in codec.__all__
    assert set(compress.__all__) >= {"load_dictionary", "FrameCompressor", "FrameDecompressor"}
