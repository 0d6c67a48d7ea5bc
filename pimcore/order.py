"""Display order of a conversation's messages.

A message is never displayed before a message its sender's device had already
seen or sent when sending it (``after_seq``, and ``local_id`` per device);
otherwise one sender's messages are ordered by their local (client) time and
different senders are interleaved by server time.  The order is a function of
the set of messages: identical on every device, whatever the arrival order.
The rule, why it is a greedy merge and not a comparator, and what happens on
inconsistent input are in :mod:`pimcore._pure.order`.  :func:`interleave`
comes from the active backend.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

from ._backend import impl

__all__ = ["interleave", "display_order"]

#: ``interleave(items) -> list[int]``: indices of ``(sender, device,
#: local_id, after_seq, seq, client_time, server_time, msg_id)`` tuples in
#: display order (Cython or pure twin).  TypeError / ValueError on bad items.
interleave = impl.interleave


class _Orderable(Protocol):
    @property
    def sender(self) -> str: ...
    @property
    def device(self) -> str: ...  # the sender's device
    @property
    def local_id(self) -> int: ...  # the sending device's id, increasing in send order
    @property
    def after_seq(self) -> int: ...  # highest seq the sending device had seen (0: none)
    @property
    def seq(self) -> int: ...  # conversation seq (0: none yet)
    @property
    def client_time(self) -> int: ...  # µs, the sending device's clock
    @property
    def server_time(self) -> int: ...  # µs, the broker's HLC
    @property
    def msg_id(self) -> bytes: ...


M = TypeVar("M", bound=_Orderable)


def display_order(messages: Sequence[M]) -> list[M]:
    """``messages`` (frames.Message, store.StoredMessage, ...) in display order.

    Reads ``sender, device, local_id, after_seq, seq, client_time,
    server_time, msg_id`` from each; raises TypeError / ValueError like
    :func:`interleave` when one is of the wrong type or out of range.
    """
    keys = [
        (m.sender, m.device, m.local_id, m.after_seq, m.seq, m.client_time, m.server_time, m.msg_id)
        for m in messages
    ]
    return [messages[i] for i in interleave(keys)]
