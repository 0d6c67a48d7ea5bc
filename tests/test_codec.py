"""The wire codec (docs/PROTOCOL.md), against both backends and each other.

Tests taking ``backend`` run once per backend; ``both`` runs the compiled and
the pure twin side by side and requires identical behaviour: the same frames,
the same bytes, the same exception class, code and message.
"""

from __future__ import annotations

import array
import dataclasses
import inspect
import platform
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore import _backend
from pimcore import frames as F
from pimcore.errors import CloseCode, EncodeError, ErrorCode, FrameTooLarge, ProtocolError

from _fuzz import feed_split, frame_strategies, mutate

U64 = (1 << 64) - 1
S64_MIN = -(1 << 63)
S64_MAX = (1 << 63) - 1
RECORDS = (F.Message, F.ReadState, F.Reader, F.Mention, F.ConvEntry, F.PresenceUser, F.PresenceEntry)
FRAMES = tuple(F.FRAME_CLASSES.values())
MALFORMED = ErrorCode.MALFORMED_FRAME

pure = _backend.load("pure")


# ------------------------------------------------------------ field kinds
# Read from the frames.py comments, which document the wire kind of every
# field: this is an independent source for the strategies below and lets us
# check both backends' private schema tables against the documentation.

_FIELD_RE = re.compile(r"^    (\w+): [^#]+#\s*(\[\w+\]|[usbt?])(?:\s|$)")


def _documented_kinds(cls: type) -> tuple[tuple[str, str], ...]:
    lines = inspect.getsource(cls).splitlines()
    return tuple(m.groups() for m in map(_FIELD_RE.match, lines) if m)  # type: ignore[misc]


KINDS = {cls: _documented_kinds(cls) for cls in FRAMES + RECORDS}


def test_every_field_has_a_documented_kind() -> None:
    for cls, kinds in KINDS.items():
        assert tuple(name for name, _ in kinds) == tuple(f.name for f in dataclasses.fields(cls)), cls


def test_backend_schemas_match_frames_py(both: tuple[ModuleType, ModuleType]) -> None:
    cy, _ = both
    from pimcore._pure import codec as pure_codec

    assert pure_codec.SCHEMA == KINDS
    assert cy._CODEC_SCHEMA == KINDS


# ------------------------------------------------------------ strategies

_U = st.one_of(st.sampled_from([0, 1, 127, 128, 16383, 16384, 1 << 32, 1 << 63, U64 - 1, U64]), st.integers(0, U64))
_S = st.one_of(st.sampled_from([0, -1, 1, -64, 63, 64, -65, S64_MIN, S64_MAX]), st.integers(S64_MIN, S64_MAX))
_B = st.binary(max_size=40)
_T = st.text(st.characters(codec="utf-8"), max_size=12)  # no lone surrogates

_SCALARS = {"u": _U, "s": _S, "b": _B, "t": _T, "?": st.booleans()}


record, frames = frame_strategies(KINDS, _SCALARS, max_list=3)


# ------------------------------------------------------------ helpers


def run(impl: ModuleType, data: bytes, cuts: list[int], max_frame_size: int = 1 << 20) -> tuple[list, tuple]:
    """Feed ``data`` split at ``cuts``, draining after every feed.  Returns the
    frames and how it ended: ("need", buffered) or ("error", cls, code, msg).
    Any exception other than ProtocolError propagates and fails the test --
    that is the decoder's contract."""
    return feed_split(impl.Decoder(max_frame_size), data, cuts)


def outcome_of(fn: Any, *args: Any) -> tuple:
    try:
        return ("ok", fn(*args))
    except ProtocolError as exc:
        return ("error", type(exc), exc.code, str(exc))
    except EncodeError as exc:
        return ("encode-error", str(exc))


def code_of(impl: ModuleType, data: bytes, max_frame_size: int = 1 << 20) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        impl.decode_frame(data, max_frame_size)
    frames_, end = run(impl, data, [], max_frame_size)
    assert frames_ == [] and end[0] == "error" and end[2] == info.value.code, "Decoder and decode_frame disagree"
    return info.value.code


# ------------------------------------------------------------ round trips


@settings(max_examples=300, deadline=None)
@given(frame=frames)
def test_round_trip(backend: ModuleType, frame: Any) -> None:
    data = backend.encode_frame(frame)
    back = backend.decode_frame(data)
    assert back == frame and type(back) is type(frame)
    for f in dataclasses.fields(back):  # list fields come back as tuples
        if isinstance(getattr(frame, f.name), tuple):
            assert type(getattr(back, f.name)) is tuple


def _prefix(data: bytes) -> tuple[int, int]:
    """(size, value) of the length prefix (test-side reference decoding)."""
    n = length = 0
    while True:
        length |= (data[n] & 0x7F) << (7 * n)
        n += 1
        if data[n - 1] < 0x80:
            return n, length


def _extreme(cls: type, high: bool) -> Any:
    values = []
    for _, kind in KINDS[cls]:
        if kind.startswith("["):
            rec = getattr(F, kind[1:-1])
            values.append((_extreme(rec, high), _extreme(rec, not high)) if high else ())
        else:
            values.append(
                {
                    "u": U64 if high else 0,
                    "s": S64_MAX if high else S64_MIN,
                    "b": bytes(range(256)) * 2 if high else b"",
                    "t": "h\u00e9llo \u4e16\u754c \U0001f600\x00" if high else "",
                    "?": high,
                }[kind]
            )
    return cls(*values)


@pytest.mark.parametrize("high", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("cls", FRAMES, ids=lambda c: c.__name__)
def test_round_trip_extremes(backend: ModuleType, cls: type, high: bool) -> None:
    frame = _extreme(cls, high)
    data = backend.encode_frame(frame)
    n, length = _prefix(data)
    assert length == len(data) - n and data[n] == F.PROTOCOL_VERSION << 4 and data[n + 1] == cls.TYPE
    assert backend.decode_frame(data) == frame
    # list fields given as lists encode the same as tuples
    as_lists = dataclasses.replace(
        frame, **{f.name: list(getattr(frame, f.name)) for f in dataclasses.fields(frame) if isinstance(getattr(frame, f.name), tuple)}
    )
    assert backend.encode_frame(as_lists) == data


# ------------------------------------------------------------ golden vectors
# Hand-computed; the first is the worked example in docs/PROTOCOL.md.

GOLDEN = [
    # 300 = 0xAC 0x02; "c1"; zigzag(-3) = 5; b"hi"; 7; no mentions, not everyone; length 14
    (F.SendReq(local_id=300, conv="c1", client_time=-3, payload=b"hi", after_seq=7), "0e 40 05 ac 02 02 63 31 05 02 68 69 07 00 00"),
    # 2**64-1 takes the full 10 varint bytes, the last one holding only bit 63
    (F.PushAck(position=U64), "0c 40 08 ff ff ff ff ff ff ff ff ff 01"),
    # nested record, no header: count 1, conv "g", 5, 7, 2
    (F.ReadStates(entries=(F.ReadState(conv="g", read_seq=5, last_seq=7, unread=2),)), "08 40 0a 01 01 67 05 07 02"),
    # an IntEnum code and a 2-byte UTF-8 character
    (F.Close(code=CloseCode.PROTOCOL_ERROR, reason="\u00e9"), "06 40 11 01 02 c3 a9"),
    (F.Ping(nonce=0), "03 40 0e 00"),
    # a 200-byte frame needs a 2-byte length prefix: 200 = 0xC8 0x01
    # (192 = 0xC0 0x01; 5 + 192 + 2 + 1 (after_seq) + 2 (mentions, mention_all) = 202)
    (F.SendReq(local_id=0, conv="", client_time=0, payload=b"\x00" * 192), "ca 01 40 05 00 00 00 c0 01" + " 00" * 192 + " 00 00 00"),
    # mentions: count 1, Mention("al"); everyone: 1
    (F.SendReq(local_id=1, conv="g", client_time=0, payload=b"", after_seq=0, mentions=(F.Mention("al"),), mention_all=True),
     "0d 40 05 01 01 67 00 00 00 01 02 61 6c 01"),
]


@pytest.mark.parametrize("frame,hexbytes", GOLDEN, ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_golden_vectors(backend: ModuleType, frame: Any, hexbytes: str) -> None:
    data = bytes.fromhex(hexbytes)
    assert backend.encode_frame(frame) == data
    assert backend.decode_frame(data) == frame


def _doc_vectors() -> list[tuple[Any, bytes]]:
    """The byte-level examples of docs/PROTOCOL.md, parsed from the text."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "PROTOCOL.md").read_text("utf-8")
    names = {name: getattr(F, name) for name in F.__all__}
    found = []
    # annotated blocks: "`Frame(...)`:" then a fenced block whose lines start with hex bytes
    for expr, block in re.findall(r"`(\w+\([^`\n]*\))`:\n\n```\n(.*?)```", doc, re.S):
        hexes = [re.match(r"((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:\s|$)", line) for line in block.splitlines()]
        assert all(hexes), block
        found.append((expr, bytes.fromhex(" ".join(m.group(1) for m in hexes))))  # type: ignore[union-attr]
    # inline vectors: `Frame(...)` = `hex`
    found += [(expr, bytes.fromhex(h)) for expr, h in re.findall(r"`(\w+\([^`]*\))` = `([0-9a-f ]+)`", doc)]
    return [(eval(expr.replace("^", "**"), {"__builtins__": {}}, names), data) for expr, data in found]


def test_protocol_md_examples(backend: ModuleType) -> None:
    vectors = _doc_vectors()
    assert len(vectors) >= 5
    golden = {type(f): bytes.fromhex(h) for f, h in GOLDEN[:4]}
    for frame, data in vectors:
        assert backend.encode_frame(frame) == data, frame
        assert backend.decode_frame(data) == frame
    assert vectors[0] == (GOLDEN[0][0], golden[F.SendReq])  # the worked example is golden vector #1


def test_encode_frames_is_concatenation(backend: ModuleType) -> None:
    fs = [frame for frame, _ in GOLDEN]
    assert backend.encode_frames(fs) == b"".join(bytes.fromhex(h) for _, h in GOLDEN)
    assert backend.encode_frames(iter(fs)) == backend.encode_frames(fs)
    assert backend.encode_frames([]) == b""
    big = [_extreme(F.Push, True)] * 20  # forces the compiled encoder off its stack buffer
    assert backend.encode_frames(big) == b"".join(backend.encode_frame(f) for f in big)


def test_int_enum_values_encode_as_ints(backend: ModuleType) -> None:
    assert backend.encode_frame(F.Error(code=ErrorCode.INTERNAL, ref=7, reason="x")) == backend.encode_frame(
        F.Error(code=31, ref=7, reason="x")
    )


# ------------------------------------------------------------ incremental decoding


@settings(max_examples=150, deadline=None)
@given(fs=st.lists(frames, max_size=4), data=st.data())
def test_split_anywhere(backend: ModuleType, fs: list, data: st.DataObject) -> None:
    wire = backend.encode_frames(fs)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    assert run(backend, wire, cuts) == (fs, ("need", 0))


def test_byte_at_a_time(backend: ModuleType) -> None:
    fs = [frame for frame, _ in GOLDEN] + [_extreme(cls, True) for cls in FRAMES]
    sizes = [len(backend.encode_frame(f)) for f in fs]
    wire = backend.encode_frames(fs)
    dec = backend.Decoder()
    got: list = []
    for i in range(len(wire)):
        dec.feed(wire[i : i + 1])
        got.extend(dec)
        # a frame comes out exactly when its last byte arrives
        assert sum(sizes[: len(got)]) == i + 1 - dec.buffered
        assert dec.buffered < sizes[len(got)] if len(got) < len(fs) else dec.buffered == 0
    assert got == fs


def test_buffered_and_iteration(backend: ModuleType) -> None:
    wire = backend.encode_frame(F.Ping(nonce=1)) + backend.encode_frame(F.Pong(nonce=2))
    dec = backend.Decoder()
    assert dec.next_frame() is None and dec.buffered == 0
    dec.feed(wire[:-1])
    assert dec.buffered == len(wire) - 1
    assert list(dec) == [F.Ping(nonce=1)]
    assert dec.buffered == 3 and dec.next_frame() is None
    dec.feed(wire[-1:])
    assert next(dec) == F.Pong(nonce=2)
    assert dec.buffered == 0 and list(dec) == []


def test_feed_accepts_bytes_like_and_copies(backend: ModuleType) -> None:
    wire = backend.encode_frame(F.Ping(nonce=0x0102))  # 04 10 0e 82 02
    assert wire == bytes.fromhex("04 40 0e 82 02")
    buf = bytearray(wire)
    dec = backend.Decoder()
    dec.feed(buf[:2])
    dec.feed(memoryview(buf)[2:])
    buf[:] = b"\xff" * len(buf)  # the decoder must have copied
    assert dec.next_frame() == F.Ping(nonce=0x0102)
    # a memoryview is taken as its raw bytes, whatever its item format
    even = backend.encode_frame(F.Ping(nonce=0x4000))  # 6 bytes
    dec.feed(memoryview(array.array("B", even)).cast("H"))
    assert dec.next_frame() == F.Ping(nonce=0x4000)
    with pytest.raises(TypeError):
        dec.feed("text")  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        dec.feed(memoryview(wire)[::2])
    assert backend.decode_frame(bytearray(wire)) == backend.decode_frame(memoryview(wire)) == F.Ping(nonce=0x0102)
    # misuse of the API is not a protocol error and does not poison
    dec.feed(wire)
    assert dec.next_frame() == F.Ping(nonce=0x0102)


def test_large_frame_in_chunks(backend: ModuleType) -> None:
    # > 256 KiB exercises buffer growth, compaction and release in the compiled
    # decoder; a small frame after it must still decode.
    big = F.SendReq(local_id=1, conv="c", client_time=0, payload=bytes(range(256)) * 1200)
    wire = backend.encode_frames([big, F.Ping(nonce=9), big])
    dec = backend.Decoder(max_frame_size=1 << 20)
    got = []
    for i in range(0, len(wire), 7001):
        dec.feed(wire[i : i + 7001])
        got.extend(dec)
    assert got == [big, F.Ping(nonce=9), big] and dec.buffered == 0


# ------------------------------------------------------------ limits


def test_frame_too_large_from_prefix_alone(backend: ModuleType) -> None:
    dec = backend.Decoder(max_frame_size=100)
    dec.feed(b"\x65")  # declares 101 bytes; nothing else has arrived
    with pytest.raises(FrameTooLarge) as info:
        dec.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    dec = backend.Decoder()  # default 1 MiB; 5-byte prefix declaring 2**35-1
    dec.feed(b"\xff\xff\xff\xff\x7f")
    with pytest.raises(FrameTooLarge):
        dec.next_frame()
    # a prefix still incomplete is not judged yet
    dec = backend.Decoder(max_frame_size=100)
    dec.feed(b"\xff\xff")
    assert dec.next_frame() is None


def test_max_frame_size_is_inclusive(backend: ModuleType) -> None:
    wire = backend.encode_frame(F.SendReq(local_id=0, conv="", client_time=0, payload=b"x" * 60))
    length = len(wire) - 1  # one-byte prefix
    assert backend.decode_frame(wire, length) is not None
    with pytest.raises(FrameTooLarge):
        backend.decode_frame(wire, length - 1)
    assert backend.decode_frame(b"\x03\x40\x0e\x00", 3) == F.Ping(nonce=0)
    with pytest.raises(FrameTooLarge):
        backend.decode_frame(b"\x03\x40\x0e\x00", 2)


@pytest.mark.parametrize("bad", [1, 0, -5, True, 2.0, "10", None])
def test_max_frame_size_validation(backend: ModuleType, bad: Any) -> None:
    with pytest.raises(ValueError):
        backend.Decoder(bad)
    with pytest.raises(ValueError):
        backend.decode_frame(b"\x03\x40\x0e\x00", bad)
    assert backend.Decoder(2).max_frame_size == 2
    assert backend.Decoder(1 << 80).max_frame_size == 1 << 80


# ------------------------------------------------------------ malformations

MALFORMATIONS = [
    ("version 1", "03 10 0e 00", ErrorCode.UNSUPPORTED_VERSION),
    ("version 2", "03 20 0e 00", ErrorCode.UNSUPPORTED_VERSION),
    ("version 3", "03 30 0e 00", ErrorCode.UNSUPPORTED_VERSION),
    ("version 0", "03 00 0e 00", ErrorCode.UNSUPPORTED_VERSION),
    ("version 15 with flags", "03 ff 0e 00", ErrorCode.UNSUPPORTED_VERSION),
    ("type 0", "03 40 00 00", ErrorCode.UNKNOWN_FRAME_TYPE),
    ("type 0x7f", "03 40 7f 00", ErrorCode.UNKNOWN_FRAME_TYPE),
    ("type 0xff", "03 40 ff 00", ErrorCode.UNKNOWN_FRAME_TYPE),
    ("compressed flag before negotiation", "03 41 0e 00", MALFORMED),
    ("reserved flag 0x8", "03 48 0e 00", MALFORMED),
    ("reserved flag 0x2", "03 42 0e 00", MALFORMED),
    ("length 0", "00", MALFORMED),
    ("length 1", "01 30", MALFORMED),
    ("non-minimal length prefix", "83 00 30 0e 00", MALFORMED),
    ("length prefix over 5 bytes", "80 80 80 80 80 00", MALFORMED),
    ("empty body where a field is due", "02 40 0e", MALFORMED),
    ("truncated varint in body", "03 40 0e 80", MALFORMED),
    ("bytes field longer than the body", "07 40 05 00 00 00 05 61", MALFORMED),
    ("text field longer than the body", "05 40 11 00 09 61", MALFORMED),
    ("trailing bytes", "04 40 0e 00 00", MALFORMED),
    ("missing last field", "03 40 11 00", MALFORMED),
    ("bad bool 2", "07 40 0c 00 00 00 00 02", MALFORMED),
    ("bad bool 0xff", "07 40 0c 00 00 00 00 ff", MALFORMED),
    ("missing bool", "06 40 0c 00 00 00 00", MALFORMED),
    ("invalid utf-8", "05 40 11 00 01 ff", MALFORMED),
    ("truncated utf-8 sequence", "05 40 11 00 01 c3", MALFORMED),
    ("utf-8 encoded surrogate", "07 40 11 00 03 ed a0 80", MALFORMED),
    ("overlong utf-8", "06 40 11 00 02 c0 80", MALFORMED),
    ("non-minimal varint 80 00", "04 40 0e 80 00", MALFORMED),
    ("non-minimal varint ff 80 00", "05 40 0e ff 80 00", MALFORMED),
    ("varint 10th byte 2 overflows", "0c 40 0e ff ff ff ff ff ff ff ff ff 02", MALFORMED),
    ("varint 10th byte 0x81 overflows", "0d 40 0e ff ff ff ff ff ff ff ff ff 81 01", MALFORMED),
    ("varint of 11 bytes", "0d 40 0e 80 80 80 80 80 80 80 80 80 80 01", MALFORMED),
    ("signed varint overflow", "0c 40 03 ff ff ff ff ff ff ff ff ff 03", MALFORMED),
    ("huge list count", "0b 40 07 00 ff ff ff ff ff ff ff 7f", MALFORMED),
    ("list count 2**64-1", "0d 40 07 00 ff ff ff ff ff ff ff ff ff 01", MALFORMED),
    # 9 bytes left after the count; a ReadState needs at least 4
    ("list count that cannot fit", "0c 40 0a 03 01 67 05 07 02 01 67 05 07", MALFORMED),
    ("list item cut short", "0c 40 0a 02 01 67 05 07 02 01 67 05 07", MALFORMED),
]


@pytest.mark.parametrize("hexbytes,code", [(h, c) for _, h, c in MALFORMATIONS], ids=[n for n, _, _ in MALFORMATIONS])
def test_malformations(backend: ModuleType, hexbytes: str, code: ErrorCode) -> None:
    assert code_of(backend, bytes.fromhex(hexbytes)) == code


def test_malformed_examples_are_otherwise_valid(backend: ModuleType) -> None:
    # Guard the table above: each fixed version of a malformed example decodes,
    # so the error really comes from the one defect under test.
    assert backend.decode_frame(bytes.fromhex("03 40 0e 00")) == F.Ping(nonce=0)
    assert backend.decode_frame(bytes.fromhex("07 40 0c 00 00 00 00 01")) == F.HistoryReq(0, "", 0, 0, True)
    assert backend.decode_frame(bytes.fromhex("05 40 11 00 01 61")) == F.Close(0, "a")
    assert backend.decode_frame(bytes.fromhex("0c 40 03 ff ff ff ff ff ff ff ff ff 01")) == F.CalibrateReq(S64_MIN)
    assert backend.decode_frame(bytes.fromhex("08 40 0a 01 01 67 05 07 02")).entries[0].unread == 2
    assert backend.decode_frame(bytes.fromhex("04 40 0e ff 7f")) == F.Ping(nonce=16383)


def test_header_errors_do_not_wait_for_the_body(backend: ModuleType) -> None:
    for prefix, code in [("7f 10", ErrorCode.UNSUPPORTED_VERSION), ("7f 41", MALFORMED), ("7f 40 99", ErrorCode.UNKNOWN_FRAME_TYPE)]:
        dec = backend.Decoder()
        dec.feed(bytes.fromhex(prefix))
        with pytest.raises(ProtocolError) as info:
            dec.next_frame()
        assert info.value.code == code


def test_errors_after_good_frames(backend: ModuleType) -> None:
    wire = backend.encode_frame(F.Ping(nonce=1)) + bytes.fromhex("03 40 99 00")
    frames_, end = run(backend, wire, [])
    assert frames_ == [F.Ping(nonce=1)] and end[2] == ErrorCode.UNKNOWN_FRAME_TYPE


def test_poisoned_decoder(backend: ModuleType) -> None:
    dec = backend.Decoder()
    dec.feed(bytes.fromhex("03 10 0e 00"))  # version 1
    with pytest.raises(ProtocolError) as first:
        dec.next_frame()
    buffered = dec.buffered
    for action in (dec.next_frame, lambda: dec.feed(backend.encode_frame(F.Ping(nonce=0))), lambda: next(iter(dec))):
        with pytest.raises(ProtocolError) as again:
            action()
        assert type(again.value) is type(first.value) and again.value.code == ErrorCode.UNSUPPORTED_VERSION
        assert str(again.value) == str(first.value)
    assert dec.buffered == buffered
    too_big = backend.Decoder(10)
    too_big.feed(b"\x40")
    for _ in range(2):
        with pytest.raises(FrameTooLarge):
            too_big.next_frame()


@pytest.mark.parametrize(
    "data",
    [b"", b"\x03\x40\x0e", b"\x83", bytes.fromhex("03 40 0e 00 00"), bytes.fromhex("03 40 0e 00") * 2],
    ids=["empty", "truncated", "partial-prefix", "one-trailing-byte", "two-frames"],
)
def test_decode_frame_needs_exactly_one_frame(backend: ModuleType, data: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        backend.decode_frame(data)
    assert type(info.value) is ProtocolError and info.value.code == MALFORMED


# ------------------------------------------------------------ encode errors


def _unset(cls: type, **given: Any) -> Any:
    obj = cls.__new__(cls)
    for k, v in given.items():
        object.__setattr__(obj, k, v)
    return obj


@dataclasses.dataclass(frozen=True, slots=True)
class NotAFrame:
    nonce: int


class PingSub(F.Ping):
    __slots__ = ()


MSG = F.Message(1, b"i", "c", 1, "s", "d", 0, 0, b"")

ENCODE_ERRORS = {
    "bool in u": F.Ping(nonce=True),
    "negative u": F.Ping(nonce=-1),
    "u too big": F.Ping(nonce=U64 + 1),
    "float in u": F.Ping(nonce=1.0),
    "str in u": F.Ping(nonce="1"),
    "s too small": F.CalibrateReq(client_time=S64_MIN - 1),
    "s too big": F.CalibrateReq(client_time=S64_MAX + 1),
    "bool in s": F.CalibrateReq(client_time=False),
    "str in b": F.SendReq(1, "c", 0, "payload"),
    "bytearray in b": F.SendReq(1, "c", 0, bytearray(b"p")),
    "memoryview in b": F.SendReq(1, "c", 0, memoryview(b"p")),
    "bytes in t": F.SendReq(1, b"c", 0, b"p"),
    "lone surrogate": F.SendReq(1, "a\ud800b", 0, b"p"),
    "int 1 in ?": F.HistoryReq(1, "c", 0, 10, 1),
    "int 0 in ?": F.HistoryReq(1, "c", 0, 10, 0),
    "None in ?": F.HistoryReq(1, "c", 0, 10, None),
    "generator as list": F.Push(1, (m for m in [MSG])),
    "dict item": F.Push(1, ({"position": 1},)),
    "wrong record class": F.Push(1, (F.ReadState("c", 1, 1, 0),)),
    "bad field inside a record": F.Push(1, (dataclasses.replace(MSG, seq=-1),)),
    "record not in a list": F.Push(1, MSG),
    "None for a list": F.ReadStates(None),
    "nested record alone": MSG,
    "not a frame": NotAFrame(1),
    "frame subclass": PingSub(nonce=1),
    "None": None,
    "bytes": b"\x03\x40\x0e\x00",
    "frame class itself": F.Ping,
    "unset field": _unset(F.Ping),
    "partly set": _unset(F.Read, conv="c"),
}


@pytest.mark.parametrize("obj", list(ENCODE_ERRORS.values()), ids=list(ENCODE_ERRORS))
def test_encode_errors(backend: ModuleType, obj: Any) -> None:
    with pytest.raises(EncodeError):
        backend.encode_frame(obj)
    with pytest.raises(EncodeError):
        backend.encode_frames([F.Ping(nonce=1), obj])


def test_encode_error_is_a_value_error(backend: ModuleType) -> None:
    with pytest.raises(ValueError):
        backend.encode_frame(F.Ping(nonce=-1))


# ------------------------------------------------------------ the decoder contract


@st.composite
def mutated_wire(draw: st.DrawFn) -> bytes:
    """Valid encodings with a few bytes flipped, replaced, inserted or deleted:
    unlike random bytes, these get past the header into the body decoders."""
    fs = draw(st.lists(frames, min_size=1, max_size=3))
    return mutate(draw, pure.encode_frames(fs), values=[0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF])


wire_inputs = st.one_of(st.binary(max_size=80), mutated_wire())


@settings(max_examples=250, deadline=None)
@given(data=wire_inputs, cuts=st.lists(st.integers(0, 100), max_size=6), max_size=st.sampled_from([2, 5, 40, 1 << 20]))
def test_decoder_contract(backend: ModuleType, data: bytes, cuts: list[int], max_size: int) -> None:
    """Frames, "need more", or ProtocolError -- never another exception -- and
    the outcome does not depend on where the input was split."""
    cuts = [min(c, len(data)) for c in cuts]
    whole = run(backend, data, [], max_size)
    assert run(backend, data, cuts, max_size) == whole
    assert all(type(frame) in FRAMES for frame in whole[0])
    # Every value has exactly one encoding, so what was decoded re-encodes to
    # exactly the bytes it came from.
    assert data.startswith(backend.encode_frames(whole[0]))
    if whole[1][0] == "need":
        assert len(backend.encode_frames(whole[0])) == len(data) - whole[1][1]
    if whole[1][0] == "error":
        assert whole[1][1] is (FrameTooLarge if whole[1][2] == ErrorCode.FRAME_TOO_LARGE else ProtocolError)
    assert outcome_of(backend.decode_frame, data, max_size)[0] in ("ok", "error")


@settings(max_examples=400, deadline=None)
@given(data=wire_inputs, cuts=st.lists(st.integers(0, 100), max_size=6), max_size=st.sampled_from([2, 5, 40, 1 << 20]))
def test_backends_agree_on_any_input(both: tuple[ModuleType, ModuleType], data: bytes, cuts: list[int], max_size: int) -> None:
    cy, py = both
    cuts = [min(c, len(data)) for c in cuts]
    assert run(cy, data, cuts, max_size) == run(py, data, cuts, max_size)
    assert outcome_of(cy.decode_frame, data, max_size) == outcome_of(py.decode_frame, data, max_size)


def test_backends_agree_on_every_listed_malformation(both: tuple[ModuleType, ModuleType]) -> None:
    cy, py = both
    for name, hexbytes, _ in MALFORMATIONS:
        data = bytes.fromhex(hexbytes)
        assert outcome_of(cy.decode_frame, data) == outcome_of(py.decode_frame, data), name


# ------------------------------------------------------------ differential encode

_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
_junk_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, 1, 0.0, U64 + 1, -1, S64_MIN - 1, S64_MAX + 1, 1.0, ErrorCode.INTERNAL, CloseCode.SHUTDOWN]),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    _surrogates,
    st.binary(max_size=4),
    st.binary(max_size=4).map(bytearray),
    st.lists(st.integers(0, 3), max_size=2),
    st.just(()),
)


def _maybe_bad(kind: str) -> st.SearchStrategy[Any]:
    if kind.startswith("["):
        rec = getattr(F, kind[1:-1])
        item = st.one_of(_maybe_bad_record(rec), record(rec), _junk_values)
        return st.one_of(st.lists(item, max_size=3).map(tuple), st.lists(item, max_size=3), _junk_values)
    return st.one_of(_SCALARS[kind], _junk_values)


def _maybe_bad_record(cls: type) -> st.SearchStrategy[Any]:
    return st.builds(cls, *[_maybe_bad(kind) if not kind.startswith("[") else _valid_list(kind) for _, kind in KINDS[cls]])


def _valid_list(kind: str) -> st.SearchStrategy[Any]:
    return st.lists(record(getattr(F, kind[1:-1])), max_size=3).map(tuple)


maybe_bad_frames = st.one_of(
    *[st.builds(cls, *[_maybe_bad(kind) for _, kind in KINDS[cls]]) for cls in FRAMES],
    _junk_values,
    record(F.Message),
)


@settings(max_examples=400, deadline=None)
@given(obj=maybe_bad_frames)
def test_backends_encode_identically(both: tuple[ModuleType, ModuleType], obj: Any) -> None:
    cy, py = both
    expected = outcome_of(py.encode_frame, obj)
    assert outcome_of(cy.encode_frame, obj) == expected
    assert outcome_of(cy.encode_frames, [F.Ping(nonce=1), obj]) == outcome_of(py.encode_frames, [F.Ping(nonce=1), obj])
    if expected[0] == "ok":
        assert cy.decode_frame(expected[1]) == py.decode_frame(expected[1])


@pytest.mark.parametrize("obj", list(ENCODE_ERRORS.values()), ids=list(ENCODE_ERRORS))
def test_backends_give_the_same_encode_error(both: tuple[ModuleType, ModuleType], obj: Any) -> None:
    cy, py = both
    assert outcome_of(cy.encode_frame, obj) == outcome_of(py.encode_frame, obj)


# ------------------------------------------------------------ compiled internals


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="slot layout is CPython's")
def test_compiled_backend_uses_the_slot_route(both: tuple[ModuleType, ModuleType]) -> None:
    # If validation ever rejects a class the codec still works, only slower:
    # make that a visible failure instead of a silent regression.
    cy, _ = both
    assert set(cy._codec_fast_classes()) == set(FRAMES + RECORDS)


@settings(max_examples=100, deadline=None)
@given(fs=st.lists(frames, max_size=3))
def test_compiled_generic_route_matches(both: tuple[ModuleType, ModuleType], fs: list) -> None:
    cy, py = both
    wire = py.encode_frames(fs)
    fast_before = cy._codec_fast_classes()
    cy._codec_set_fast(False)
    try:
        assert cy._codec_fast_classes() == []
        assert cy.encode_frames(fs) == wire
        assert run(cy, wire, []) == (fs, ("need", 0))
        assert outcome_of(cy.encode_frame, _unset(F.Read, conv="c")) == outcome_of(py.encode_frame, _unset(F.Read, conv="c"))
    finally:
        cy._codec_set_fast(True)
    assert cy._codec_fast_classes() == fast_before  # restored


# ------------------------------------------------------------ public module


def test_public_module_reexports_the_active_backend(active: ModuleType) -> None:
    from pimcore import codec

    assert set(codec.__all__) >= {"encode_frame", "encode_frames", "decode_frame", "Decoder", "DEFAULT_MAX_FRAME_SIZE"}
    for name in ("encode_frame", "encode_frames", "decode_frame", "Decoder"):
        assert getattr(codec, name) is getattr(active, name)
    assert codec.DEFAULT_MAX_FRAME_SIZE == 1 << 20 == codec.Decoder().max_frame_size


def test_both_backends_export_the_same_api(both: tuple[ModuleType, ModuleType]) -> None:
    cy, py = both
    from pimcore._pure import codec as pure_codec

    for name in pure_codec.__all__:
        assert hasattr(cy, name), name
