"""Command log record encoders: the pure-Python twin of
``pimcore/_fastpath_log.pxi``.

``log_encoder(kinds, prefix, fallback)`` returns a callable ``encode(ops) ->
bytes`` for the command log of ``durability log``
(:func:`pimcore.store.lmdb._encode_ops` is the fallback there): ``prefix``,
then a pickle of ``[(index of the op's class in kinds, [field tuple, ...]),
...]``, one entry per run of ops of one class.  Here it is ``fallback``
itself, which pickles through the C pickler.  The compiled twin writes the
same pickle opcodes straight from the ops' slots (no memo, no frames) and
hands any batch holding a value it does not know -- or an op of another
class -- to ``fallback``, whose value or error it returns.  So for every
batch both read back, through the same unpickler, as the same ops, and
fail with the same error.  Both raise TypeError if ``kinds`` is not a
sequence of dataclass types, ``prefix`` not bytes or ``fallback`` not
callable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

__all__ = ["log_encoder"]


def log_encoder(kinds: Iterable[type], prefix: bytes, fallback: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """See the module docstring."""
    if not all(isinstance(cls, type) and dataclasses.is_dataclass(cls) for cls in tuple(kinds)):
        raise TypeError("log_encoder needs a sequence of dataclass types")
    if type(prefix) is not bytes:
        raise TypeError("log_encoder's prefix must be bytes")
    if not callable(fallback):
        raise TypeError("log_encoder's fallback must be callable")
    return fallback
