"""Hypothesis helper shared by the codec and compression fuzz tests."""

from __future__ import annotations

from typing import Sequence

from hypothesis import strategies as st

#: Byte values that sit on varint, header and zstd boundaries.
EDGE_BYTES = (0x00, 0x01, 0x02, 0x11, 0x7F, 0x80, 0xFF)


def mutate(draw: st.DrawFn, data: bytes, *, min_edits: int = 1, max_edits: int = 4, values: Sequence[int] = EDGE_BYTES) -> bytes:
    """``data`` with a few bytes flipped, set to an edge value, inserted or
    deleted: unlike random bytes, these get past the framing into the body
    (or zstd) decoders."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(min_edits, max_edits))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "insert":
            buf.insert(i, draw(st.integers(0, 255)))
        elif not buf:
            continue
        elif op == "delete":
            del buf[i]
        elif op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        else:
            buf[i] = draw(st.sampled_from(list(values)))
    return bytes(buf)
