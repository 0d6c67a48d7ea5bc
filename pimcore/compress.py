"""zstd compression of frames, negotiated with CAP_ZSTD (docs/PROTOCOL.md section 7).

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
]

#: The shipped dictionary: package data, trained by tools/train_zstd_dict.py.
DICTIONARY_FILE = "zstd-chat-v2.dict"
#: Its zstd dictionary id, written in the header of every frame compressed
#: with it (a peer holding another dictionary then fails cleanly).
DICTIONARY_ID = 0xC402
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
    """The shipped dictionary (``pimcore/data/zstd-chat-v2.dict``), loaded once.

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
