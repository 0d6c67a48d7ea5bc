"""log_encoder (pimcore._pure.log and its compiled twin): the command log
record of a batch, which must read back as the same ops whichever backend
wrote it, and fail with the same error."""

from __future__ import annotations

import dataclasses
import io
import pickle
import typing
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore.frames import MessageKind
from pimcore.store import lmdb as lmdb_module
from pimcore.store.base import AckPosition, AmendMessage, NewMessage, Op

KINDS = typing.get_args(Op)
PREFIX = lmdb_module._LOG_SCHEMA


def _runs(record: bytes) -> Any:
    assert record[:4] == PREFIX
    return lmdb_module._PlainUnpickler(io.BytesIO(record[4:])).load()


def _outcome(encode: Any, ops: Any) -> Any:
    try:
        return ("ok", _runs(encode(ops)))
    except Exception as exc:  # noqa: BLE001 - the error itself is compared
        return ("err", type(exc), str(exc))


def _message(i: int, **kw: Any) -> NewMessage:
    fields = dict(msg_id=bytes([i % 256]) * 16, conv=f"d:a{i}|b{i}", sender=f"a{i}", device="phone", local_id=i,
                  client_time=1_764_590_000_000_000 + i, server_time=1_764_590_000_000_123 + i,
                  payload=b"x" * (i % 300), digest=b"d" * 16)
    fields.update(kw)
    return NewMessage(**fields)  # type: ignore[arg-type]


def test_a_plain_batch_takes_the_compiled_route_and_reads_back_as_its_ops(both: tuple[ModuleType, ModuleType]) -> None:
    cy, pure = both
    ops = tuple(_message(i) for i in range(300)) + (AckPosition("b1", "phone", 7, 123),) + (_message(5),)
    fast = cy.log_encoder(KINDS, PREFIX, lmdb_module._pickle_ops)
    slow = pure.log_encoder(KINDS, PREFIX, lmdb_module._pickle_ops)
    assert slow is lmdb_module._pickle_ops
    record = fast(ops)
    # The pickler frames protocol 5 output (FRAME, 0x95, right after PROTO);
    # the compiled encoder writes no frames: this record is its own.
    assert record[6] != 0x95 and lmdb_module._pickle_ops(ops)[6] == 0x95
    assert record[4:7] == b"\x80\x05]"
    assert _runs(record) == _runs(slow(ops))
    assert lmdb_module._decode_ops(record) == ops
    assert lmdb_module._decode_ops(fast(())) == ()


@pytest.mark.parametrize(
    "odd",
    [
        _message(1, local_id=2**64 - 1),  # beyond 64 bits signed
        _message(1, client_time=-(2**70)),
        _message(1, sender="a\udc80"),  # a lone surrogate
        _message(1, payload=bytearray(b"x")),
        _message(1, mentions=["a"]),  # a list
        _message(1, client_time=1.5),
        AmendMessage(*(MessageKind.RECALL if f.name == "kind" else 0 for f in dataclasses.fields(AmendMessage))),
    ],
    ids=["u64", "big-negative", "surrogate", "bytearray", "list", "float", "enum"],
)
def test_values_the_compiled_encoder_does_not_know_are_the_fallbacks(both: tuple[ModuleType, ModuleType],
                                                                     odd: Any) -> None:
    cy, pure = both
    ops = (_message(0), odd, _message(2))
    fast = cy.log_encoder(KINDS, PREFIX, lmdb_module._pickle_ops)
    assert fast(ops) == lmdb_module._pickle_ops(ops)  # the fallback's very bytes
    assert _outcome(fast, ops) == _outcome(pure.log_encoder(KINDS, PREFIX, lmdb_module._pickle_ops), ops)


def test_errors_are_the_fallbacks(backend: ModuleType) -> None:
    encode = backend.log_encoder(KINDS, PREFIX, lmdb_module._pickle_ops)

    class NotAnOp:
        pass

    from pimcore.errors import StoreError

    with pytest.raises(StoreError, match="not a store op: NotAnOp"):
        encode((_message(0), NotAnOp()))
    with pytest.raises(StoreError, match="cannot hold"):
        encode((_message(0, payload=object()),))  # type: ignore[arg-type]
    for bad in (None, 5):
        with pytest.raises(TypeError):
            encode(bad)


@pytest.mark.parametrize(
    "args",
    [((int,), b"", len), ((NewMessage,), "str", len), ((NewMessage,), b"", None), ((1,), b"", len)],
    ids=["not-a-dataclass", "prefix", "fallback", "not-a-type"],
)
def test_bad_arguments_are_type_errors(backend: ModuleType, args: tuple) -> None:
    with pytest.raises(TypeError, match="log_encoder"):
        backend.log_encoder(*args)


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 255, 256, 65535, 65536, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, -(2**63)]),
    st.text(max_size=300),
    st.binary(max_size=300),
)
_plain_tuple = st.one_of(st.tuples(), st.tuples(_scalar), st.tuples(_scalar, _scalar),
                         st.tuples(_scalar, _scalar, _scalar), st.lists(_scalar, max_size=6).map(tuple))
_plain = st.one_of(_scalar, _plain_tuple, st.lists(_plain_tuple, max_size=4).map(tuple))
# What the compiled encoder hands to the fallback (or the fallback refuses).
_odd = st.one_of(
    st.sampled_from([2**63, -(2**63) - 1, 2**64 - 1, -(2**70), "\udc80", bytearray(b"x"), [1], {}, object()]),
    st.floats(allow_nan=False),
    st.sampled_from(list(MessageKind)),
    st.tuples(st.tuples(st.tuples(st.integers()))),  # nested deeper than the encoder goes
)


@st.composite
def _ops(draw: Any) -> tuple:
    ops = []
    odd = draw(st.booleans())  # half the batches may hold odd values, rarely
    for _ in range(draw(st.integers(0, 6))):
        cls = draw(st.sampled_from([NewMessage, NewMessage, AckPosition, *KINDS]))
        values = [draw(_odd if odd and draw(st.integers(0, 15)) == 0 else _plain) for _ in dataclasses.fields(cls)]
        ops.append(cls(*values))
    return tuple(ops)


@settings(max_examples=300)
@given(_ops())
def test_differential(ops: tuple) -> None:
    from pimcore import _backend

    try:
        cy = _backend.load("cython")
    except ImportError:
        pytest.skip("compiled backend not built")
    pure = _backend.load("pure")
    got = [_outcome(impl.log_encoder(KINDS, PREFIX, lmdb_module._pickle_ops), ops) for impl in (cy, pure)]
    assert got[0] == got[1]
    if got[0][0] == "ok":
        assert got[0][1] == [(KINDS.index(type(run[0])), [dataclasses.astuple(op) for op in run])
                             for run in _group(ops)]


def _group(ops: tuple) -> list[list]:
    runs: list[list] = []
    for op in ops:
        if runs and type(runs[-1][0]) is type(op):
            runs[-1].append(op)
        else:
            runs.append([op])
    return runs


def test_pickle_is_what_reads_both(both: tuple[ModuleType, ModuleType]) -> None:
    # The compiled records are plain pickles: the standard unpickler reads
    # them too (nothing of the store's own reader is needed to audit a log).
    cy, _ = both
    ops = (_message(1, mentions=("x", "y", "z", "w"), mention_all=True), _message(2, after_seq=2**40))
    record = cy.log_encoder(KINDS, PREFIX, lmdb_module._pickle_ops)(ops)
    assert pickle.loads(record[4:]) == _runs(lmdb_module._pickle_ops(ops))
