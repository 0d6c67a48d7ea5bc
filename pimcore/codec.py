"""The PIM wire codec: frames <-> bytes (sans-IO).  docs/PROTOCOL.md is the spec.

Everything here comes from the active backend (:mod:`pimcore._backend`): the
compiled ``pimcore._fastpath`` or its pure-Python twin ``pimcore._pure``, which
accept the same inputs and raise the same errors.

* ``encode_frame(frame) -> bytes`` -- one frame, length prefix included;
  :class:`~pimcore.errors.EncodeError` for anything that is not a valid frame
  (wrong class, wrong field type, value out of range, unencodable text).
* ``encode_frames(frames) -> bytes`` -- the concatenation, for batched writes.
* ``Decoder(max_frame_size=DEFAULT_MAX_FRAME_SIZE)`` -- incremental decoder:
  ``feed(data)`` with bytes/bytearray/memoryview split anywhere, then
  ``next_frame()`` (``None`` = needs more bytes) or iterate; ``buffered`` is
  the number of bytes held.  Malformed input raises
  :class:`~pimcore.errors.ProtocolError` (a declared length over the limit
  raises :class:`~pimcore.errors.FrameTooLarge` from the length prefix alone)
  and poisons the decoder: every later call raises the same error.
* ``Decoder(max_frame_size, decompress=None)`` and
  ``Decoder.enable_decompression(decompress)`` -- accept frames whose head has
  the zstd flag (``FLAG_ZSTD``) once CAP_ZSTD was negotiated.  ``decompress``
  is a callable ``(body, max_size) -> bytes`` raising ProtocolError on any
  problem (:class:`pimcore.compress.FrameDecompressor`); ``max_size`` is
  ``max_frame_size - 2``, the largest body an uncompressed frame could carry.
  The returned body is decoded exactly like an uncompressed one.  Without it a
  flagged frame is MALFORMED_FRAME.  Compressing is
  :class:`pimcore.compress.FrameCompressor`'s job (it re-frames the output of
  ``encode_frame``).
* ``Decoder.raise_max_frame_size(n)`` -- accept frames up to ``n`` bytes from
  the next ``next_frame`` on, if ``n`` is above the limit (never lowered):
  what a client does once LoginAck announced the broker's max_frame.
* ``decode_frame(data, max_frame_size=DEFAULT_MAX_FRAME_SIZE, decompress=None)``
  -- exactly one complete frame; missing or extra bytes are MALFORMED_FRAME.

Input rules (both backends): ``u``/``s`` fields take int or an int subclass
such as an IntEnum, never bool; ``?`` fields take only True/False; ``b`` fields
take exactly ``bytes``; ``t`` fields take str (strict UTF-8, so no lone
surrogates); list fields take a tuple or list of exactly the record class;
the frame must be exactly one of the :mod:`pimcore.frames` classes.  Decoded
list fields are tuples.
"""

from __future__ import annotations

from ._backend import impl as _impl

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "FLAG_ZSTD", "encode_frame", "encode_frames", "decode_frame", "Decoder"]

#: Default ``max_frame_size`` of :class:`Decoder` and :func:`decode_frame` (1 MiB).
DEFAULT_MAX_FRAME_SIZE: int = _impl.DEFAULT_MAX_FRAME_SIZE
#: Head flag bit 0: the body is one zstd frame (docs/PROTOCOL.md section 7).
FLAG_ZSTD: int = _impl.FLAG_ZSTD
encode_frame = _impl.encode_frame
encode_frames = _impl.encode_frames
decode_frame = _impl.decode_frame
Decoder = _impl.Decoder
