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
* ``decode_frame(data, max_frame_size=DEFAULT_MAX_FRAME_SIZE)`` -- exactly
  one complete frame; missing or extra bytes are MALFORMED_FRAME.

Input rules (both backends): ``u``/``s`` fields take int or an int subclass
such as an IntEnum, never bool; ``?`` fields take only True/False; ``b`` fields
take exactly ``bytes``; ``t`` fields take str (strict UTF-8, so no lone
surrogates); list fields take a tuple or list of exactly the record class;
the frame must be exactly one of the :mod:`pimcore.frames` classes.  Decoded
list fields are tuples.
"""

from __future__ import annotations

from ._backend import impl as _impl

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "encode_frame", "encode_frames", "decode_frame", "Decoder"]

#: Default ``max_frame_size`` of :class:`Decoder` and :func:`decode_frame` (1 MiB).
DEFAULT_MAX_FRAME_SIZE: int = _impl.DEFAULT_MAX_FRAME_SIZE
encode_frame = _impl.encode_frame
encode_frames = _impl.encode_frames
decode_frame = _impl.decode_frame
Decoder = _impl.Decoder
