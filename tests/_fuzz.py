"""Helpers shared by the codec and compression fuzz tests."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

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


def feed_split(dec: object, data: bytes, cuts: Sequence[int]) -> tuple[list, tuple]:
    """Feed ``data`` to the decoder ``dec`` split at ``cuts``, draining after
    every feed: the frames, and ("need", buffered) or ("error", class, code,
    message).  Any exception other than ProtocolError propagates and fails
    the test -- that is the decoder's contract."""
    from pimcore.errors import ProtocolError

    out: list = []
    pos = 0
    for cut in sorted(cuts) + [len(data)]:
        try:
            dec.feed(data[pos:cut])  # type: ignore[attr-defined]
            while (frame := dec.next_frame()) is not None:  # type: ignore[attr-defined]
                out.append(frame)
        except ProtocolError as exc:
            return out, ("error", type(exc), exc.code, str(exc))
        pos = cut
    return out, ("need", dec.buffered)  # type: ignore[attr-defined]


def frame_strategies(
    kinds: Mapping[type, Sequence[tuple[str, str]]], scalars: Mapping[str, st.SearchStrategy[Any]], max_list: int
) -> tuple[Callable[[type], st.SearchStrategy[Any]], st.SearchStrategy[Any]]:
    """``(record, frames)``: a strategy for one record class, and one for any
    frame, from a field-kind table (``u``, ``s``, ``b``, ``t``, ``?``,
    ``[Record]``) and a strategy per scalar kind."""
    from pimcore import frames as F

    def kind(k: str) -> st.SearchStrategy[Any]:
        if k.startswith("["):
            return st.lists(record(getattr(F, k[1:-1])), max_size=max_list).map(tuple)
        return scalars[k]

    def record(cls: type) -> st.SearchStrategy[Any]:
        return st.builds(cls, *[kind(k) for _, k in kinds[cls]])

    return record, st.one_of([record(cls) for cls in F.FRAME_CLASSES.values()])
