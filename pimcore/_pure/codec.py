"""The PIM wire codec in pure Python: the twin of ``pimcore/_fastpath_codec.pxi``.

docs/PROTOCOL.md is the normative spec; this module is the executable
reference.  Both backends must accept and reject exactly the same inputs (the
differential tests in tests/test_codec.py hold them to it), so every decision
below that is not forced by the spec is mirrored in the Cython twin:

* ``u``/``s`` fields take ``int`` and int subclasses (IntEnum codes) but never
  ``bool``; ``?`` fields take only ``True``/``False``;
* ``b`` fields take exactly ``bytes`` (frames are immutable values: a bytearray
  could change between queueing and encoding);
* ``t`` fields take ``str`` and str subclasses, encoded as strict UTF-8;
* list fields take exactly a ``tuple`` or ``list`` of exactly the record class;
* the frame itself must be exactly one of the frame classes (no subclasses);
* varints must be minimal on decode (``0x80 0x00`` is malformed), so every value
  has exactly one encoding.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, Union

from ..errors import EncodeError, ErrorCode, FrameTooLarge, ProtocolError
from ..frames import (
    PROTOCOL_VERSION,
    Close,
    Error,
    Frame,
    Login,
    LoginAck,
    Message,
    Ping,
    Pong,
    Push,
    PushAck,
    Read,
    ReadReceipt,
    ReadState,
    SendAck,
    SendReq,
    ReadStates,
    HistoryReq,
    HistoryResp,
    CalibrateReq,
    CalibrateResp,
    ReadersReq,
    Reader,
    ReadersResp,
    AmendReq,
    Mention,
    ConvEntry,
    ConvListReq,
    ConvListResp,
    ConvSetReq,
    ConvSetResp,
    ConvUpdate,
    ConvPurged,
    Typing,
    PresenceUser,
    PresenceSub,
    PresenceEntry,
    Presence,
    PresencePrivacy,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FLAG_ZSTD",
    "encode_frame",
    "encode_frames",
    "decode_frame",
    "Decoder",
]

DEFAULT_MAX_FRAME_SIZE = 1 << 20

_U64_MAX = (1 << 64) - 1
_S64_MIN = -(1 << 63)
_S64_MAX = (1 << 63) - 1
#: The length prefix is at most 5 varint bytes, so no frame can be longer.
_MAX_LENGTH = (1 << 35) - 1
_HEAD = PROTOCOL_VERSION << 4  # the version, no flags
#: Head flag bit 0: the body is one zstd frame (section 7 of docs/PROTOCOL.md).
FLAG_ZSTD = 0x01

BytesLike = Union[bytes, bytearray, memoryview]
#: ``decompress(body, max_size) -> bytes``: the body of a frame whose head has
#: FLAG_ZSTD set, decompressed; raises ProtocolError on any problem, and
#: FrameTooLarge when the decompressed body would exceed ``max_size``.
Decompress = Callable[[bytes, int], bytes]

# --------------------------------------------------------------------- schema
# Field order = wire order = dataclass order (frames.py).  A kind is written
# exactly as in the frames.py comments: "u", "s", "b", "t", "?" or "[Record]"
# (a list of that nested record).  The
# Cython twin keeps its own copy of this table on purpose: the differential
# tests then compare two independent readings of frames.py, and
# tests/test_codec.py checks both tables against the frames.py comments.

_MESSAGE = (
    ("position", "u"),
    ("msg_id", "b"),
    ("conv", "t"),
    ("seq", "u"),
    ("sender", "t"),
    ("device", "t"),
    ("client_time", "s"),
    ("server_time", "u"),
    ("payload", "b"),
    ("kind", "u"),
    ("local_id", "u"),
    ("after_seq", "u"),
    ("target", "u"),
    ("edited", "u"),
    ("recalled", "?"),
    ("deleted", "?"),
    ("mentions", "[Mention]"),
    ("mention_all", "?"),
)
_READ_STATE = (("conv", "t"), ("read_seq", "u"), ("last_seq", "u"), ("unread", "u"))

SCHEMA: dict[type, tuple[tuple[str, str], ...]] = {
    Login: (("token", "b"), ("device", "t"), ("client_time", "s"), ("position", "u"), ("caps", "u"), ("epoch", "b"), ("sent", "u")),
    LoginAck: (
        ("user", "t"),
        ("device", "t"),
        ("server_time", "u"),
        ("position", "u"),
        ("head", "u"),
        ("gap", "?"),
        ("max_frame", "u"),
        ("max_payload", "u"),
        ("window", "u"),
        ("heartbeat_ms", "u"),
        ("caps", "u"),
        ("epoch", "b"),
        ("resync", "?"),
        ("states", "u"),
    ),
    CalibrateReq: (("client_time", "s"),),
    CalibrateResp: (("client_time", "s"), ("server_time", "u")),
    SendReq: (
        ("local_id", "u"), ("conv", "t"), ("client_time", "s"), ("payload", "b"), ("after_seq", "u"),
        ("mentions", "[Mention]"), ("mention_all", "?"),
    ),
    SendAck: (("local_id", "u"), ("code", "u"), ("msg_id", "b"), ("seq", "u"), ("server_time", "u")),
    Push: (("position", "u"), ("messages", "[Message]")),
    PushAck: (("position", "u"),),
    Read: (("conv", "t"), ("seq", "u")),
    ReadStates: (("entries", "[ReadState]"),),
    ReadReceipt: (("conv", "t"), ("reader", "t"), ("seq", "u")),
    HistoryReq: (("req_id", "u"), ("conv", "t"), ("from_seq", "u"), ("limit", "u"), ("backward", "?")),
    HistoryResp: (("req_id", "u"), ("conv", "t"), ("code", "u"), ("messages", "[Message]"), ("more", "?")),
    ReadersReq: (("req_id", "u"), ("conv", "t")),
    ReadersResp: (("req_id", "u"), ("conv", "t"), ("code", "u"), ("readers", "[Reader]")),
    AmendReq: (("local_id", "u"), ("conv", "t"), ("target", "u"), ("action", "u"), ("client_time", "s"), ("payload", "b")),
    ConvListReq: (("req_id", "u"), ("cursor", "b"), ("limit", "u"), ("include_hidden", "?")),
    ConvListResp: (("req_id", "u"), ("code", "u"), ("entries", "[ConvEntry]"), ("cursor", "b"), ("more", "?")),
    ConvSetReq: (("req_id", "u"), ("conv", "t"), ("pinned", "u"), ("muted", "u"), ("hidden", "u")),
    ConvSetResp: (("req_id", "u"), ("conv", "t"), ("code", "u")),
    ConvUpdate: (("entries", "[ConvEntry]"),),
    ConvPurged: (("conv", "t"), ("last_seq", "u"), ("gone", "?")),
    Typing: (("conv", "t"), ("active", "?"), ("user", "t"), ("ttl_ms", "u")),
    PresenceSub: (("req_id", "u"), ("users", "[PresenceUser]")),
    Presence: (("req_id", "u"), ("code", "u"), ("entries", "[PresenceEntry]")),
    PresencePrivacy: (("mode", "u"),),
    Ping: (("nonce", "u"),),
    Pong: (("nonce", "u"),),
    Error: (("code", "u"), ("ref", "u"), ("reason", "t")),
    Close: (("code", "u"), ("reason", "t")),
    # nested records: fields only, no header
    Message: _MESSAGE,
    ReadState: _READ_STATE,
    Reader: (("user", "t"), ("read_seq", "u")),
    Mention: (("user", "t"),),
    ConvEntry: (
        ("conv", "t"), ("last", "[Message]"), ("read_seq", "u"), ("last_seq", "u"), ("unread", "u"),
        ("mention_count", "u"), ("pinned", "?"), ("muted", "?"), ("hidden", "?"),
    ),
    PresenceUser: (("user", "t"),),
    PresenceEntry: (("user", "t"), ("state", "u"), ("last_seen", "u")),
}

_RECORDS = (Message, ReadState, Reader, Mention, ConvEntry, PresenceUser, PresenceEntry)
_RECORD_BY_KIND = {f"[{rec.__name__}]": rec for rec in _RECORDS}


def _check_schema() -> None:
    # A renamed or reordered dataclass field must fail loudly at import, not
    # produce frames with values in the wrong slots.
    from dataclasses import fields

    for cls, spec in SCHEMA.items():
        if tuple(f.name for f in fields(cls)) != tuple(name for name, _ in spec):
            raise RuntimeError(f"codec schema for {cls.__name__} is out of sync with pimcore/frames.py")


_check_schema()


# --------------------------------------------------------------------- encode


def _int_value(v: object, name: str) -> int:
    # bool is an int subclass but never a valid number on the wire: a stray
    # True in a seq field is a bug we want loud.  int subclasses (IntEnum) are
    # reduced with the base-class slot so no overridden method runs.
    if type(v) is int:
        return v  # type: ignore[return-value]
    if isinstance(v, int) and not isinstance(v, bool):
        return int.__index__(v)
    raise EncodeError(f"field {name!r}: expected int, got {type(v).__name__}")


def _put_uvarint(out: bytearray, v: int) -> None:
    # caller guarantees 0 <= v <= 2**64-1
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _enc_u(out: bytearray, v: object, name: str) -> None:
    n = _int_value(v, name)
    if n < 0x80:
        if n < 0:
            raise EncodeError(f"field {name!r}: {n} is negative (u is unsigned)")
        out.append(n)
        return
    if n > _U64_MAX:
        raise EncodeError(f"field {name!r}: {n} does not fit in 64 bits")
    _put_uvarint(out, n)


def _enc_s(out: bytearray, v: object, name: str) -> None:
    n = _int_value(v, name)
    if not _S64_MIN <= n <= _S64_MAX:
        raise EncodeError(f"field {name!r}: {n} does not fit in a signed 64-bit int")
    # zigzag: 0,-1,1,-2,... -> 0,1,2,3,...; Python's >> is arithmetic, so
    # n >> 63 is 0 or -1 and the xor lands in 0..2**64-1.
    _put_uvarint(out, (n << 1) ^ (n >> 63))


def _enc_b(out: bytearray, v: object, name: str) -> None:
    if type(v) is not bytes:
        raise EncodeError(f"field {name!r}: expected bytes, got {type(v).__name__}")
    _put_uvarint(out, len(v))
    out += v


def _enc_t(out: bytearray, v: object, name: str) -> None:
    if not isinstance(v, str):
        raise EncodeError(f"field {name!r}: expected str, got {type(v).__name__}")
    try:
        # str.encode, not v.encode: a subclass cannot substitute other bytes
        raw = str.encode(v, "utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates
        raise EncodeError(f"field {name!r}: not encodable as UTF-8 ({exc.reason})") from None
    _put_uvarint(out, len(raw))
    out += raw


def _enc_bool(out: bytearray, v: object, name: str) -> None:
    if v is True:
        out.append(1)
    elif v is False:
        out.append(0)
    else:
        raise EncodeError(f"field {name!r}: expected bool, got {type(v).__name__}")


def _enc_list(rec: type) -> Callable[[bytearray, object, str], None]:
    def enc(out: bytearray, v: object, name: str) -> None:
        if type(v) is not tuple and type(v) is not list:
            raise EncodeError(f"field {name!r}: expected a tuple of {rec.__name__}, got {type(v).__name__}")
        _put_uvarint(out, len(v))  # type: ignore[arg-type]
        for item in v:  # type: ignore[attr-defined]
            if type(item) is not rec:
                raise EncodeError(f"field {name!r}: expected {rec.__name__} items, got {type(item).__name__}")
            _encode_fields(out, item, _ENCODERS[rec])

    return enc


_SCALAR_ENC = {"u": _enc_u, "s": _enc_s, "b": _enc_b, "t": _enc_t, "?": _enc_bool}


def _encoder_for(kind: str) -> Callable[[bytearray, object, str], None]:
    return _enc_list(_RECORD_BY_KIND[kind]) if kind.startswith("[") else _SCALAR_ENC[kind]


_ENCODERS: dict[type, tuple[tuple[str, Callable[[bytearray, object, str], None]], ...]] = {
    cls: tuple((name, _encoder_for(kind)) for name, kind in fields) for cls, fields in SCHEMA.items()
}


def _encode_fields(out: bytearray, obj: object, encoders: tuple) -> None:
    for name, enc in encoders:
        try:
            v = getattr(obj, name)
        except AttributeError:  # built with __new__ and never initialised
            raise EncodeError(f"field {name!r} is not set") from None
        enc(out, v, name)


def _uvarint(n: int) -> bytes:
    out = bytearray()
    _put_uvarint(out, n)
    return bytes(out)


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of one frame (length prefix included)."""
    cls = type(frame)
    if cls in _RECORDS or cls not in _ENCODERS:
        raise EncodeError(f"not a frame: {cls.__name__}")
    out = bytearray((_HEAD, cls.TYPE))  # type: ignore[attr-defined]
    _encode_fields(out, frame, _ENCODERS[cls])
    if len(out) > _MAX_LENGTH:
        raise EncodeError(f"frame of {len(out)} bytes exceeds the 5-byte length prefix")
    return _uvarint(len(out)) + out


def encode_frames(frames: Iterable[Frame]) -> bytes:
    """The concatenated wire bytes of several frames (one write)."""
    return b"".join([encode_frame(f) for f in frames])


# --------------------------------------------------------------------- decode
# Readers take (data, pos) where ``data`` is exactly one frame body as bytes
# and return (value, new_pos).  Every index is bounds-checked explicitly: the
# only exception a reader may raise is ProtocolError.


def _malformed(msg: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, msg)


def _read_u(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise _malformed("truncated varint")
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    pos += 1
    while True:
        if pos >= len(data):
            raise _malformed("truncated varint")
        b = data[pos]
        pos += 1
        # The 10th byte carries only bit 63: anything above 1 (including a
        # continuation bit) would overflow 64 bits or run past 10 bytes.
        if shift == 63 and b > 1:
            raise _malformed("varint overflows 64 bits")
        result |= (b & 0x7F) << shift
        if b < 0x80:
            # a zero final byte after a continuation adds nothing: non-minimal
            if b == 0:
                raise _malformed("non-minimal varint")
            return result, pos
        shift += 7


def _read_s(data: bytes, pos: int) -> tuple[int, int]:
    u, pos = _read_u(data, pos)
    return (u >> 1) ^ -(u & 1), pos


def _read_b(data: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _read_u(data, pos)
    end = pos + n
    if end > len(data):
        raise _malformed("truncated bytes field")
    return data[pos:end], end


def _read_t(data: bytes, pos: int) -> tuple[str, int]:
    n, pos = _read_u(data, pos)
    end = pos + n
    if end > len(data):
        raise _malformed("truncated text field")
    try:
        return data[pos:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise _malformed("invalid UTF-8 in text field") from None


def _read_bool(data: bytes, pos: int) -> tuple[bool, int]:
    if pos >= len(data):
        raise _malformed("truncated bool")
    b = data[pos]
    if b > 1:
        raise _malformed(f"bool byte {b} is neither 0 nor 1")
    return b == 1, pos + 1


def _read_list(rec: type) -> Callable[[bytes, int], tuple[tuple, int]]:
    min_size = len(SCHEMA[rec])

    def read(data: bytes, pos: int) -> tuple[tuple, int]:
        count, pos = _read_u(data, pos)
        # Every field of an item takes at least one byte, so an item needs at
        # least len(fields) bytes; a count that cannot fit in what is left is
        # rejected before any per-item work (this implies the spec's rule
        # "count > remaining bytes is malformed").
        left = len(data) - pos
        if count > left // min_size:
            raise _malformed(f"list count {count} cannot fit in the remaining {left} bytes")
        items = []
        for _ in range(count):
            item, pos = _decode_record(data, pos, rec)
            items.append(item)
        return tuple(items), pos

    return read


_SCALAR_DEC = {"u": _read_u, "s": _read_s, "b": _read_b, "t": _read_t, "?": _read_bool}

_DECODERS: dict[type, tuple[Callable[[bytes, int], tuple[object, int]], ...]] = {
    cls: tuple(_read_list(_RECORD_BY_KIND[kind]) if kind.startswith("[") else _SCALAR_DEC[kind] for _, kind in fields)
    for cls, fields in SCHEMA.items()
}

_BY_TYPE: dict[int, type] = {cls.TYPE: cls for cls in SCHEMA if cls not in _RECORDS}  # type: ignore[attr-defined]


def _decode_record(data: bytes, pos: int, cls: type) -> tuple[object, int]:
    values = []
    for read in _DECODERS[cls]:
        v, pos = read(data, pos)
        values.append(v)
    return cls(*values), pos


def _check_max(max_frame_size: object) -> int:
    if not isinstance(max_frame_size, int) or isinstance(max_frame_size, bool) or max_frame_size < 2:
        raise ValueError(f"max_frame_size must be an int >= 2, got {max_frame_size!r}")
    return int.__index__(max_frame_size)


def _check_decompress(decompress: object) -> Optional[Decompress]:
    if decompress is not None and not callable(decompress):
        raise TypeError(f"decompress must be a callable (body, max_size) -> bytes or None, not {type(decompress).__name__}")
    return decompress  # type: ignore[return-value]


def _decompressed(decompress: Decompress, body: bytes, max_size: int) -> bytes:
    """The decompressed body of a flagged frame.  ``max_size`` is the largest
    body an uncompressed frame could carry (max_frame_size - 2), so a
    compressed frame never decodes to more than an uncompressed one could:
    never more than the longest frame (2^35 - 1 bytes, PROTOCOL.md section
    3) either, whatever the limit (a broker's LoginAck.max_frame is a u64:
    2^64 - 1 would reach the callable, and zlib, as an OverflowError)."""
    if max_size > _MAX_LENGTH - 2:
        max_size = _MAX_LENGTH - 2
    out = decompress(body, max_size)
    if type(out) is not bytes:
        raise TypeError(f"decompress returned {type(out).__name__}, expected bytes")
    # The callable checks this before decompressing (bomb protection); this
    # re-check only keeps a faulty callable from breaking the limit.
    if len(out) > max_size:
        raise FrameTooLarge(f"decompressed body of {len(out)} bytes exceeds max_frame_size {max_size + 2}")
    return out


def _parse(buf: bytearray, limit: int, decompress: Optional[Decompress] = None) -> tuple[Optional[Frame], int]:
    """(frame, bytes consumed) for the frame at the start of ``buf``, or
    (None, 0) when more bytes are needed.  Checks run in stream order, each as
    soon as its bytes are present, so the outcome never depends on how the
    input was split.  ``decompress`` (None = disabled) decompresses the body
    of a frame whose head has FLAG_ZSTD set."""
    avail = len(buf)
    if avail == 0:
        return None, 0
    # -- length prefix: at most 5 bytes, minimal
    length = 0
    n = 0
    while True:
        if n == avail:
            return None, 0
        b = buf[n]
        length |= (b & 0x7F) << (7 * n)
        n += 1
        if b < 0x80:
            break
        if n == 5:
            raise _malformed("length prefix longer than 5 bytes")
    if n > 1 and buf[n - 1] == 0:
        raise _malformed("non-minimal length prefix")
    if length > limit:
        raise FrameTooLarge(f"frame length {length} exceeds max_frame_size {limit}")
    if length < 2:
        raise _malformed(f"frame length {length} is shorter than the 2-byte header")
    # -- header, checked before the body arrives
    if avail > n:
        head = buf[n]
        if head >> 4 != PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"protocol version {head >> 4} is not supported (this side speaks {PROTOCOL_VERSION})")
        # bit 0 (zstd) is valid only once decompression is enabled; bits 1..3
        # are reserved and always malformed
        if head & 0x0F and (head & 0x0E or decompress is None):
            raise _malformed(f"reserved or unnegotiated flag bits set: {head & 0x0F:#x}")
    if avail > n + 1:
        ftype = buf[n + 1]
        if ftype not in _BY_TYPE:
            raise ProtocolError(ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {ftype:#04x}")
    total = n + length
    if avail < total:
        return None, 0
    # -- body: one copy into bytes, then slices of it are the field values
    body = bytes(buf[n + 2 : total])
    if buf[n] & FLAG_ZSTD:
        # the head check above let the flag through only with decompress set
        body = _decompressed(decompress, body, limit - 2)  # type: ignore[arg-type]
    frame, pos = _decode_record(body, 0, _BY_TYPE[buf[n + 1]])
    if pos != len(body):
        raise _malformed(f"{len(body) - pos} trailing bytes after the frame body")
    return frame, total  # type: ignore[return-value]


class Decoder:
    """Incremental frame decoder (sans-IO): ``feed`` bytes as they arrive, take
    frames with ``next_frame`` or by iterating.

    Any malformation raises ProtocolError; the decoder is then poisoned and
    raises the same error from every later ``feed``/``next_frame``.

    ``decompress`` (``decompress(body, max_size) -> bytes``, e.g. a
    :class:`pimcore.compress.FrameDecompressor`) accepts frames with the zstd
    head flag; without it (the default) such a frame is MALFORMED_FRAME.
    :meth:`enable_decompression` turns it on later: frames are decoded lazily
    by ``next_frame``, so bytes already fed but not yet taken are judged by the
    setting at the time they are taken.
    """

    __slots__ = ("_buf", "_max", "_error", "_busy", "_decompress")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, decompress: Optional[Decompress] = None) -> None:
        self._max = _check_max(max_frame_size)
        self._decompress = _check_decompress(decompress)
        self._buf = bytearray()
        self._error: Optional[ProtocolError] = None
        self._busy = False

    @property
    def max_frame_size(self) -> int:
        return self._max

    def raise_max_frame_size(self, max_frame_size: int) -> None:
        """Accept frames up to ``max_frame_size`` bytes from the next
        ``next_frame`` on, if that is more than today's limit (a lower one
        changes nothing: bytes already fed must not become too large after
        the fact).  ValueError as the constructor's.  Why: a client learns
        the broker's max_frame only from LoginAck, and must then accept
        frames that large -- else a broker configured above the client's
        default sends a frame it refuses, at every reconnect.  Any int >= 2
        is taken (LoginAck.max_frame is a u64); one above the longest frame,
        2^35 - 1 bytes, acts as that (decompressed bodies included)."""
        m = _check_max(max_frame_size)
        if m > self._max:
            self._max = m

    @property
    def decompress(self) -> Optional[Decompress]:
        """The decompression callable, or None while compressed frames are refused."""
        return self._decompress

    def enable_decompression(self, decompress: Decompress) -> None:
        """Accept compressed frames from the next ``next_frame`` on (call it
        when CAP_ZSTD was negotiated).  ``decompress(body, max_size) -> bytes``
        must raise ProtocolError for anything it cannot decompress."""
        if decompress is None:
            raise TypeError("enable_decompression() needs a callable, not None")
        self._decompress = _check_decompress(decompress)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf)

    def feed(self, data: BytesLike) -> None:
        """Append received bytes (copied)."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._busy:
            raise RuntimeError("Decoder.feed() called while next_frame() is running")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"feed() takes bytes, bytearray or memoryview, not {type(data).__name__}")
        if isinstance(data, memoryview) and not data.c_contiguous:
            raise BufferError("feed() needs a C-contiguous memoryview")
        self._buf += data

    def next_frame(self) -> Optional[Frame]:
        """The next complete frame, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._busy:
            raise RuntimeError("Decoder.next_frame() re-entered")
        self._busy = True
        try:
            frame, used = _parse(self._buf, self._max, self._decompress)
        except ProtocolError as exc:
            self._error = exc
            raise
        finally:
            self._busy = False
        if used:
            del self._buf[:used]  # O(1) amortised: bytearray keeps a start offset
        return frame

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        frame = self.next_frame()
        if frame is None:
            raise StopIteration
        return frame


def decode_frame(
    data: BytesLike, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, decompress: Optional[Decompress] = None
) -> Frame:
    """Decode exactly one complete frame; anything more or less is malformed.
    ``decompress`` as for :class:`Decoder`."""
    dec = Decoder(max_frame_size, decompress)
    dec.feed(data)
    frame = dec.next_frame()
    if frame is None:
        raise _malformed("truncated frame")
    if dec.buffered:
        raise _malformed(f"{dec.buffered} bytes after the frame")
    return frame
