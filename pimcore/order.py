"""Display order of a conversation's messages (the seed's interleave rule).

One sender's messages are ordered by their local (client) time; different
senders are interleaved by server time.  Implemented as a deterministic merge
of per-sender runs -- see :mod:`pimcore._pure.order` for why it cannot be a
comparator.  :func:`interleave` comes from the active backend.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

from ._backend import impl

__all__ = ["interleave", "display_order"]

#: ``interleave(items) -> list[int]``: indices of ``(sender, client_time,
#: server_time, msg_id)`` tuples in display order (Cython or pure twin).
interleave = impl.interleave


class _Orderable(Protocol):
    @property
    def sender(self) -> str: ...
    @property
    def client_time(self) -> int: ...
    @property
    def server_time(self) -> int: ...
    @property
    def msg_id(self) -> bytes: ...


M = TypeVar("M", bound=_Orderable)


def display_order(messages: Sequence[M]) -> list[M]:
    """``messages`` (frames.Message, store.StoredMessage, ...) in display order."""
    keys = [(m.sender, m.client_time, m.server_time, m.msg_id) for m in messages]
    return [messages[i] for i in interleave(keys)]
