"""Frame compression (docs/PROTOCOL.md section 7): per-frame zstd with the
shipped dictionary (CAP_ZSTD), and one deflate stream per connection and
direction (CAP_DEFLATE_DOWN / CAP_DEFLATE_UP, section 7.2).

Deflate streams (:class:`DeflateCompressor`, :class:`DeflateDecompressor`)
belong to ONE connection and one direction each: frame N may refer to the
bytes of frames before it, so they are made per connection, never shared, and
see every compressed frame of their direction exactly once, in order.  The
zstd classes below hold no per-connection state.

The codec stays compression-agnostic: :class:`FrameCompressor` re-frames the
output of :func:`pimcore.codec.encode_frame` (head flag ``FLAG_ZSTD``, body =
one zstd frame), and :class:`FrameDecompressor` is the callable a
:class:`pimcore.codec.Decoder` takes in ``decompress=`` /
``enable_decompression()``::

    from pimcore import codec, compress

    comp = compress.FrameCompressor()            # one per thread (see below)
    wire = comp.compress(codec.encode_frame(frame))

    dec = codec.Decoder(max_frame_size)
    ...                                           # after CAP_ZSTD was granted:
    dec.enable_decompression(compress.FrameDecompressor())

Every frame is compressed on its own (no state carries from one frame to the
next), so neither object belongs to a connection: the shipped dictionary does
the work a streaming context would do for small frames.  Neither is
thread-safe (a zstd context is mutable scratch space): use one of each per
thread, shared by all the connections that thread serves.  The dictionary
itself (:func:`load_dictionary`, and the prepared copies built from it) is
read-only and shared by everyone.

Memory (level 3, measured): a compressor or decompressor context is at most
~100 KiB (tens of KiB while frames stay small); the dictionary prepared for
compression ~300 KiB per level, once per process.
"""

from __future__ import annotations

import functools
import sys
import zlib
from importlib import resources
from typing import Any, Iterable, NamedTuple, Optional, Union

import zstandard

from . import codec
from .errors import ErrorCode, FrameTooLarge, ProtocolError
from .frames import PROTOCOL_VERSION

__all__ = [
    "DICTIONARY_FILE",
    "DICTIONARY_ID",
    "DEFAULT_LEVEL",
    "DEFAULT_THRESHOLD",
    "load_dictionary",
    "FrameCompressor",
    "FrameDecompressor",
    "CompressionStats",
    "DEFLATE_WINDOW_BITS_DOWN",
    "DEFLATE_WINDOW_BITS_UP",
    "DEFLATE_THRESHOLD",
    "DEFLATE_BROKER_WINDOW_BITS",
    "DeflateCompressor",
    "DeflateDecompressor",
]

#: The shipped dictionary: package data, trained by tools/train_zstd_dict.py.
DICTIONARY_FILE = "zstd-chat-v3.dict"
#: Its zstd dictionary id, written in the header of every frame compressed
#: with it (a peer holding another dictionary then fails cleanly).
DICTIONARY_ID = 0xC403
DEFAULT_LEVEL = 3
#: Bodies shorter than this are sent as they are.  Measured on the synthetic
#: chat traffic of tools/train_zstd_dict.py with the shipped dictionary: a zstd
#: frame costs 11 bytes of framing (magic, header, dictionary id, content
#: size, block header), so bodies under 40 bytes never got smaller, 40..47
#: rarely and by a byte, and from 48 bytes on every one shrank (by ~10 bytes,
#: ~20%, at 48..63).  Below the threshold no compression is even attempted,
#: which also saves the ~2 µs a failed attempt costs.
DEFAULT_THRESHOLD = 48

_HEAD = PROTOCOL_VERSION << 4
_FLAG = codec.FLAG_ZSTD


class _Default:
    def __repr__(self) -> str:
        return "<the shipped dictionary>"


#: ``dictionary=`` default: the shipped dictionary.  ``None`` = plain zstd.
DEFAULT_DICTIONARY = _Default()

DictionaryArg = Union[_Default, None, zstandard.ZstdCompressionDict, bytes]


@functools.lru_cache(maxsize=None)
def _shipped_bytes() -> bytes:
    data = (resources.files("pimcore") / "data" / DICTIONARY_FILE).read_bytes()
    dict_id = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_FULLDICT).dict_id()
    if dict_id != DICTIONARY_ID:
        raise RuntimeError(f"{DICTIONARY_FILE}: dictionary id {dict_id:#x}, expected {DICTIONARY_ID:#x}")
    return data


@functools.lru_cache(maxsize=None)
def load_dictionary() -> zstandard.ZstdCompressionDict:
    """The shipped dictionary (``pimcore/data/zstd-chat-v3.dict``), loaded once.

    Treat it as read-only; compressors prepare their own copy per level."""
    return zstandard.ZstdCompressionDict(_shipped_bytes(), dict_type=zstandard.DICT_TYPE_FULLDICT)


def _dictionary_bytes(dictionary: DictionaryArg) -> Optional[tuple[bytes, int]]:
    """(content, dict_type) of a ``dictionary=`` argument, None for no dictionary."""
    if dictionary is DEFAULT_DICTIONARY:
        return _shipped_bytes(), zstandard.DICT_TYPE_FULLDICT
    if dictionary is None:
        return None
    if isinstance(dictionary, zstandard.ZstdCompressionDict):
        return dictionary.as_bytes(), zstandard.DICT_TYPE_AUTO
    if isinstance(dictionary, bytes):
        return dictionary, zstandard.DICT_TYPE_AUTO
    raise TypeError(f"dictionary must be a ZstdCompressionDict, bytes or None, not {type(dictionary).__name__}")


@functools.lru_cache(maxsize=16)
def _prepared(data: bytes, dict_type: int, level: int) -> zstandard.ZstdCompressionDict:
    # A CDict precomputed for the level: compressors share it read-only and
    # skip re-loading 16 KiB of dictionary per frame.
    d = zstandard.ZstdCompressionDict(data, dict_type=dict_type)
    d.precompute_compress(level=level)
    return d


@functools.lru_cache(maxsize=16)
def _for_decompression(data: bytes, dict_type: int) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(data, dict_type=dict_type)


def _frame_prefix(raw: bytes) -> int:
    """Size of the length prefix of ``raw``, which must be exactly one encoded
    frame (as encode_frame produces it)."""
    if raw and 2 <= raw[0] == len(raw) - 1:  # the common case: 1-byte prefix
        return 1
    length = 0
    for n in range(5):
        if n == len(raw):
            break
        b = raw[n]
        length |= (b & 0x7F) << (7 * n)
        if b < 0x80:
            if 2 <= length == len(raw) - n - 1:
                return n + 1
            break
    raise ValueError("compress() takes exactly one encoded frame (the output of encode_frame)")


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class CompressionStats(NamedTuple):
    """Counters of a :class:`FrameCompressor` since it was made."""

    frames: int  #: frames passed to compress()
    compressed: int  #: of which went out compressed
    bytes_in: int  #: wire bytes before
    bytes_out: int  #: wire bytes after

    @property
    def ratio(self) -> float:
        """bytes_in / bytes_out (1.0 before any frame)."""
        return self.bytes_in / self.bytes_out if self.bytes_out else 1.0


class FrameCompressor:
    """Compresses encoded frames for a connection that negotiated CAP_ZSTD.

    ``compress(raw)`` takes one encoded frame and returns it unchanged when
    its body is shorter than ``threshold`` bytes or would not get smaller,
    else re-framed with the zstd flag.  Both outcomes are valid on a zstd
    connection; on any other connection send frames without this class.

    ``level`` is the zstd level (3: ~2-3 µs per small frame; 6 gains ~3% of
    size for 3x the time).  ``dictionary`` is the shipped one by default,
    ``None`` for plain zstd (worse than nothing on small frames), or another
    ``ZstdCompressionDict``/bytes -- the peer must then hold the same one.

    Not thread-safe: one per thread (it keeps no per-connection state, so one
    instance serves every connection of its thread).
    """

    __slots__ = ("_cctx", "_level", "_threshold", "_frames", "_compressed", "_in", "_out")

    def __init__(
        self, level: int = DEFAULT_LEVEL, threshold: int = DEFAULT_THRESHOLD, dictionary: DictionaryArg = DEFAULT_DICTIONARY
    ) -> None:
        if type(level) is not int or not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"level must be an int in 1..{zstandard.MAX_COMPRESSION_LEVEL}, got {level!r}")
        if type(threshold) is not int or threshold < 0:
            raise ValueError(f"threshold must be an int >= 0, got {threshold!r}")
        found = _dictionary_bytes(dictionary)
        options: dict[str, Any] = dict(write_content_size=True, write_checksum=False, write_dict_id=True)
        if found is None:
            self._cctx = zstandard.ZstdCompressor(level=level, **options)
        else:
            self._cctx = zstandard.ZstdCompressor(level=level, dict_data=_prepared(found[0], found[1], level), **options)
        self._level = level
        self._threshold = threshold
        self._frames = self._compressed = self._in = self._out = 0

    @property
    def level(self) -> int:
        return self._level

    @property
    def threshold(self) -> int:
        return self._threshold

    def compress(self, raw: bytes) -> bytes:
        """One encoded, uncompressed frame -> the frame to send (``raw``
        itself, or a compressed frame that is strictly shorter)."""
        if type(raw) is not bytes:
            raise TypeError(f"compress() takes bytes, not {type(raw).__name__}")
        n = _frame_prefix(raw)
        if raw[n] != _HEAD:
            raise ValueError(f"compress() takes an uncompressed version-1 frame (head {raw[n]:#04x})")
        self._frames += 1
        self._in += len(raw)
        if len(raw) - n - 2 >= self._threshold:
            # (a sliced copy of a small body is cheaper than a memoryview)
            body = self._cctx.compress(raw[n + 2 :] if n < 3 else memoryview(raw)[n + 2 :])
            length = 2 + len(body)
            if length < 0x80:
                out = bytes((length, _HEAD | _FLAG, raw[n + 1])) + body
            else:
                out = b"".join((_uvarint(length), bytes((_HEAD | _FLAG, raw[n + 1])), body))
            if len(out) < len(raw):
                self._compressed += 1
                self._out += len(out)
                return out
        self._out += len(raw)
        return raw

    def compress_many(self, raws: Iterable[bytes]) -> bytes:
        """``compress`` each encoded frame; the concatenation (one write)."""
        return b"".join([self.compress(raw) for raw in raws])

    def encode_frame(self, frame: object) -> bytes:
        """``compress(codec.encode_frame(frame))``."""
        return self.compress(codec.encode_frame(frame))  # type: ignore[arg-type]

    def encode_frames(self, frames: Iterable[object]) -> bytes:
        """The compressed counterpart of ``codec.encode_frames``."""
        encode = codec.encode_frame
        return b"".join([self.compress(encode(f)) for f in frames])  # type: ignore[arg-type]

    def statistics(self) -> CompressionStats:
        return CompressionStats(self._frames, self._compressed, self._in, self._out)


def _malformed(msg: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED_FRAME, msg)


class FrameDecompressor:
    """``decompress(body, max_size) -> bytes`` for :class:`pimcore.codec.Decoder`.

    Checks, in this order (docs/PROTOCOL.md section 7): the body starts with
    a zstd frame header stating the content size (else MALFORMED_FRAME); that
    size is at most ``max_size`` (else :class:`~pimcore.errors.FrameTooLarge`,
    raised before anything is allocated: no decompression bombs) and not 0;
    then the body decompresses to exactly that many bytes with nothing after
    the zstd frame (else MALFORMED_FRAME -- corrupt data, a dictionary other
    than ours, trailing or missing bytes).

    ``dictionary`` as for :class:`FrameCompressor`; frames compressed without
    a dictionary decompress with any.  Not thread-safe: one per thread.
    """

    __slots__ = ("_dctx",)

    def __init__(self, dictionary: DictionaryArg = DEFAULT_DICTIONARY) -> None:
        found = _dictionary_bytes(dictionary)
        if found is None:
            self._dctx = zstandard.ZstdDecompressor()
        else:
            self._dctx = zstandard.ZstdDecompressor(dict_data=_for_decompression(*found))

    def __call__(self, body: bytes, max_size: int) -> bytes:
        try:
            size = zstandard.frame_content_size(body)
        except zstandard.ZstdError:
            raise _malformed("compressed body does not start with a zstd frame header") from None
        if size < 0:
            raise _malformed("compressed body: the zstd frame header has no content size")
        if size > max_size:
            raise FrameTooLarge(f"compressed body declares {size} bytes, above the limit of {max_size}")
        if size == 0:  # no frame has an empty body; also what a skippable frame reports
            raise _malformed("compressed body declares 0 bytes")
        try:
            # positional: zstandard parses keyword arguments slowly (~0.4 µs)
            # args: max_output_size (unused: the size is known), read_across_frames, allow_extra_data
            out = self._dctx.decompress(body, 0, False, False)
        except zstandard.ZstdError as exc:
            raise _malformed(f"compressed body does not decompress: {exc}") from None
        if len(out) != size:  # libzstd checks this too; keep the contract explicit
            raise _malformed(f"compressed body decompressed to {len(out)} bytes, header said {size}")
        return out


# ------------------------------------------------------------ deflate streams

#: Largest window (log2 bytes) of the broker->client stream (CAP_DEFLATE_DOWN):
#: no match distance exceeds 4096, so a receiver needs a 4 KiB window.
DEFLATE_WINDOW_BITS_DOWN = 12
#: Largest window of the client->broker stream (CAP_DEFLATE_UP): 2048.  Smaller
#: than downstream because the broker holds this inflater for every connection
#: (2 KiB window + ~7 KiB inflate state) and upstream frames are the smaller ones.
DEFLATE_WINDOW_BITS_UP = 11
#: The window the broker compresses its downstream with by default: 2^11, not
#: the 2^12 the direction allows, to keep a connection's two streams within
#: 32 KiB (measured with tracemalloc: deflate 2^11/memLevel 1 ~16 KiB, inflate
#: 2^11 ~9.5 KiB; 2^12 would make it ~33 KiB for ~3 % fewer bytes).
DEFLATE_BROKER_WINDOW_BITS = 11
#: Bodies shorter than this go out uncompressed (and stay out of the stream).
#: A flushed deflate block costs ~2 bytes of block header, end-of-block code and
#: padding, so bodies of a few bytes (PushAck, Ping, Pong: 1..10 bytes) never
#: get smaller; measured on bench/bench_wire.py, 12..24 all give the same
#: totals within 0.3 %.
DEFLATE_THRESHOLD = 16
#: The last 4 bytes of every Z_SYNC_FLUSH (an empty stored block's LEN/NLEN):
#: never sent, the receiver appends them (as RFC 7692 permessage-deflate does).
_SYNC_TAIL = b"\x00\x00\xff\xff"


def _check_window_bits(window_bits: object) -> int:
    if type(window_bits) is not int or not 9 <= window_bits <= 15:
        raise ValueError(f"window_bits must be an int in 9..15, got {window_bits!r}")
    return window_bits


def _deflate_growth(size: int) -> int:
    """Bytes a frame of ``size`` body bytes may grow by deflated: zlib's
    own bound for any level and memory setting (``deflateBound``, zlib.h:
    ``size + (size + 7 >> 3) + (size + 63 >> 6) + 5``), the sync flush's
    stored block, and a longer length prefix."""
    return ((size + 7) >> 3) + ((size + 63) >> 6) + 5 + 5 + 4


class DeflateCompressor:
    """The sending half of one connection's deflate stream (PROTOCOL.md 7.2).

    ``compress(raw)`` takes one encoded frame: a body shorter than
    ``threshold`` bytes goes out unchanged and never enters the stream; any
    other is deflated into the stream, flushed (Z_SYNC_FLUSH, so the receiver
    can inflate it on arrival), the 4 trailing bytes ``00 00 ff ff`` dropped,
    and re-framed with head flag bit 0.  Unlike zstd the result is sent even
    when it is not shorter: once a body is in the stream the peer must see it.
    ``max_frame`` (bytes, the peer's limit on a frame on the wire, or None):
    a frame that deflated could exceed it (zlib's bound, :func:`_deflate_growth`)
    goes out unchanged instead, outside the stream; ValueError below 2.

    ``window_bits`` (9..15) bounds match distances; it must not exceed what the
    direction allows (:data:`DEFLATE_WINDOW_BITS_DOWN` / ``_UP``).  ``level``
    1..9 and ``mem_level`` 1..9 are local choices the peer does not see;
    memLevel 1 costs nothing measurable in ratio on chat frames.  The zlib
    state is made at the first compressed frame: (4 << window_bits) +
    (512 << mem_level) bytes + ~6 KiB (~23 KiB at the defaults, see
    :meth:`state_size`).  Not thread-safe; one per connection.
    """

    __slots__ = ("_z", "_wbits", "_level", "_mem", "_threshold", "_frames", "_compressed", "_in", "_out", "_tail", "_keep",
                 "_max")

    def __init__(
        self,
        window_bits: int = DEFLATE_WINDOW_BITS_DOWN,
        *,
        level: int = 6,
        mem_level: int = 1,
        threshold: int = DEFLATE_THRESHOLD,
        max_frame: Optional[int] = None,
    ) -> None:
        self._wbits = _check_window_bits(window_bits)
        if max_frame is not None and (type(max_frame) is not int or max_frame < 2):
            raise ValueError(f"max_frame must be an int >= 2 or None, got {max_frame!r}")
        #: The peer's limit on a frame's bytes on the wire (its max_frame):
        #: a frame that deflated could exceed it goes out unchanged.
        self._max = max_frame
        if type(level) is not int or not 1 <= level <= 9:
            raise ValueError(f"level must be an int in 1..9, got {level!r}")
        if type(mem_level) is not int or not 1 <= mem_level <= 9:
            raise ValueError(f"mem_level must be an int in 1..9, got {mem_level!r}")
        if type(threshold) is not int or threshold < 0:
            raise ValueError(f"threshold must be an int >= 0, got {threshold!r}")
        self._level = level
        self._mem = mem_level
        self._threshold = threshold
        self._z: Any = None
        self._frames = self._compressed = self._in = self._out = 0
        # The last (1 << window_bits) bytes fed to the stream: all a released
        # stream needs to go on (see release()).
        self._tail = b""
        self._keep = 1 << window_bits

    @property
    def window_bits(self) -> int:
        return self._wbits

    def state_size(self) -> int:
        """Bytes of compression state this stream holds now: 0 before its
        first compressed frame, the window's bytes while released, else
        zlib's own formula for deflate plus its state and the window copy."""
        if self._z is None:
            return len(self._tail)
        return (4 << self._wbits) + (512 << self._mem) + _DEFLATE_STATE + len(self._tail)

    def release(self) -> None:
        """Free the zlib state of an idle stream, keeping only the last
        window of its bytes (≤ 2^window_bits).  The next compressed frame
        makes a new deflater primed with those bytes as a preset dictionary:
        it may refer back exactly as far as the receiver's window holds, so
        the peer sees one unbroken stream (no wire signal, nothing to reset).
        Costs ~20 µs at that next frame."""
        self._z = None

    def compress(self, raw: bytes) -> bytes:
        """One encoded, uncompressed frame -> the frame to send."""
        if type(raw) is not bytes:
            raise TypeError(f"compress() takes bytes, not {type(raw).__name__}")
        n = _frame_prefix(raw)
        if raw[n] != _HEAD:
            raise ValueError(f"compress() takes an uncompressed version-2 frame (head {raw[n]:#04x})")
        self._frames += 1
        self._in += len(raw)
        size = len(raw) - n - 2
        if size < self._threshold or (self._max is not None and len(raw) + _deflate_growth(size) > self._max):
            # Small, or deflated it might not fit the peer's max_frame:
            # deflate grows what does not compress (memLevel 1: 5 bytes of
            # block header per 128 bytes, 4 %), and a frame over the limit
            # is refused -- every reconnect then met the same frame and
            # that device never received again.  Out unchanged, it is not
            # part of the stream (PROTOCOL.md 7.2, "Which frames").
            self._out += len(raw)
            return raw
        z = self._z
        if z is None:
            if self._tail:  # after release(): go on from the window's bytes
                z = zlib.compressobj(self._level, zlib.DEFLATED, -self._wbits, self._mem, zdict=self._tail)
            else:
                z = zlib.compressobj(self._level, zlib.DEFLATED, -self._wbits, self._mem)
            self._z = z
        plain = raw[n + 2 :]
        tail = self._tail + plain
        self._tail = tail if len(tail) <= self._keep else tail[-self._keep :]
        body = z.compress(plain) + z.flush(zlib.Z_SYNC_FLUSH)
        # Z_SYNC_FLUSH always ends with the empty stored block 00 00 ff ff.
        body = body[:-4]
        length = 2 + len(body)
        if length < 0x80:
            out = bytes((length, _HEAD | _FLAG, raw[n + 1])) + body
        else:
            out = b"".join((_uvarint(length), bytes((_HEAD | _FLAG, raw[n + 1])), body))
        self._compressed += 1
        self._out += len(out)
        return out

    def encode_frame(self, frame: object) -> bytes:
        """``compress(codec.encode_frame(frame))``."""
        return self.compress(codec.encode_frame(frame))  # type: ignore[arg-type]

    def statistics(self) -> CompressionStats:
        return CompressionStats(self._frames, self._compressed, self._in, self._out)


#: sizeof(deflate_state) (~5.8 KiB on 64-bit zlib 1.2/1.3), its pending buffer and slack
#: (calibrated with tracemalloc on zlib 1.2.13: within 1 % of what it traces).
_DEFLATE_STATE = 6 * 1024 + 768
#: sizeof(struct inflate_state) (~7.1 KiB) plus slack.
_INFLATE_STATE = 7 * 1024 + 384


class DeflateDecompressor:
    """``decompress(body, max_size) -> bytes``: the receiving half of one
    connection's deflate stream, for :class:`pimcore.codec.Decoder`.

    Each call inflates one frame's ``zbody`` with ``00 00 ff ff`` appended,
    continuing the stream of the frames before it.  Errors (PROTOCOL.md 7.2,
    "Receiving"): more than ``max_size`` bytes of output ->
    :class:`~pimcore.errors.FrameTooLarge` (inflation stops at
    ``max_size + 1`` bytes: no decompression bombs); data that does not
    inflate, a final block (the stream may not end), no output at all ->
    MALFORMED_FRAME.  After an error the stream is lost: every later call
    raises MALFORMED_FRAME (the decoder is poisoned anyway).

    ``window_bits`` must be at least the sender's (``_UP`` on the broker,
    ``_DOWN`` in a client).  The zlib state (``1 << window_bits`` bytes of
    window + ~7 KiB) is made at the first compressed frame.  Not thread-safe;
    one per connection.
    """

    __slots__ = ("_d", "_wbits", "_broken", "_tail", "_keep", "frames")

    def __init__(self, window_bits: int = DEFLATE_WINDOW_BITS_UP) -> None:
        self._wbits = _check_window_bits(window_bits)
        self._d: Any = None
        self._broken: Optional[str] = None
        self._tail = b""  # the last window of output: all a released stream needs
        self._keep = 1 << window_bits
        self.frames = 0  #: frames inflated so far

    @property
    def window_bits(self) -> int:
        return self._wbits

    def state_size(self) -> int:
        """Bytes of state this stream holds now: 0 before its first frame,
        the window's bytes while released, else zlib's window and state plus
        the window copy."""
        return len(self._tail) + (0 if self._d is None else (1 << self._wbits) + _INFLATE_STATE)

    def release(self) -> None:
        """Free the zlib state of an idle stream, keeping the last window of
        output (≤ 2^window_bits bytes).  Every frame ends at a sync flush, so
        between frames the inflater holds nothing but that window: the next
        frame is inflated by a new inflater primed with it (``zdict``),
        exactly as the old one would have."""
        self._d = None

    def __call__(self, body: bytes, max_size: int) -> bytes:
        if self._broken is not None:
            raise _malformed(f"the deflate stream was lost earlier ({self._broken})")
        d = self._d
        if d is None:
            d = self._d = zlib.decompressobj(-self._wbits, zdict=self._tail) if self._tail else zlib.decompressobj(-self._wbits)
        try:
            # (zlib takes an ssize_t: no output is larger than that anyway)
            out = d.decompress(body + _SYNC_TAIL, min(max_size, sys.maxsize - 1) + 1)
        except zlib.error as exc:
            raise self._lost(_malformed(f"compressed body does not inflate: {exc}")) from None
        if len(out) > max_size:
            raise self._lost(FrameTooLarge(f"compressed body inflates to more than {max_size} bytes"))
        if d.eof:
            raise self._lost(_malformed("compressed body ends the deflate stream (a final block)"))
        if not out:
            raise self._lost(_malformed("compressed body inflates to 0 bytes"))
        tail = self._tail + out
        self._tail = tail if len(tail) <= self._keep else tail[-self._keep :]
        self.frames += 1
        return out

    def _lost(self, exc: ProtocolError) -> ProtocolError:
        self._broken = str(exc)
        self._d = None  # free the window now: nothing can use it any more
        self._tail = b""
        return exc
