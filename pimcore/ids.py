"""The id grammar: user, device and conversation ids.

One module, importable without the store (``pimcore.client`` uses it and must
not load LMDB).

* User and device ids are text of 1..64 characters from ``[A-Za-z0-9_.@-]``
  (so ``:`` can separate the two users of a direct id).
* Conversation ids are 1..128 printable ASCII characters, no whitespace.
  ``d:<a>:<b>`` is the 1:1 (direct) chat of users a and b with ``a < b``
  (see :func:`direct_conversation`), so both sides derive the same id; its
  members are implied by the id.  Any other id names a group.
* Message ids are 16 bytes: the 8-byte big-endian server time followed by the
  8-byte node id of the broker that accepted it -- unique beyond one process
  and sortable by time.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

__all__ = [
    "ID_RE",
    "CONV_RE",
    "valid_id",
    "direct_conversation",
    "direct_members",
    "is_direct",
    "valid_conversation",
    "check_ids",
    "member_set",
]

ID_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}\Z")
#: A conversation id: 1..128 printable characters, no whitespace.
CONV_RE = re.compile(r"[!-~]{1,128}\Z")


# The id checks run several times per message (core, then store); the same
# few thousand ids recur, so exact str inputs are answered from a cache.
@lru_cache(maxsize=1 << 16)
def _valid_id(value: str) -> bool:
    return ID_RE.match(value) is not None


def valid_id(value: str) -> bool:
    """Is ``value`` an acceptable user or device id?"""
    if type(value) is str:
        return _valid_id(value)
    return isinstance(value, str) and ID_RE.match(value) is not None


def direct_conversation(a: str, b: str) -> str:
    """The id of the 1:1 chat between users ``a`` and ``b`` (symmetric)."""
    if not (valid_id(a) and valid_id(b)):
        raise ValueError(f"invalid user id in direct conversation: {a!r}, {b!r}")
    if a == b:
        raise ValueError("a direct conversation needs two different users")
    lo, hi = (a, b) if a < b else (b, a)
    return f"d:{lo}:{hi}"


def is_direct(conv: str) -> bool:
    return conv.startswith("d:")


def direct_members(conv: str) -> Optional[tuple[str, str]]:
    """The two users of a well-formed direct id, else None."""
    if not conv.startswith("d:"):
        return None
    if type(conv) is str:
        return _direct_members(conv)
    return _direct_members.__wrapped__(conv)


@lru_cache(maxsize=1 << 16)
def _direct_members(conv: str) -> Optional[tuple[str, str]]:
    parts = conv[2:].split(":")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (valid_id(a) and valid_id(b)) or not a < b:
        return None
    return a, b


def valid_conversation(conv: str) -> bool:
    """Well-formed conversation id (a direct id must also be canonical)."""
    if type(conv) is str:
        return _valid_conversation(conv)
    return isinstance(conv, str) and _valid_conversation.__wrapped__(conv)


@lru_cache(maxsize=1 << 16)
def _valid_conversation(conv: str) -> bool:
    if CONV_RE.match(conv) is None:
        return False
    if conv.startswith("d:"):
        return direct_members(conv) is not None
    return True


def check_ids(*ids: str) -> None:
    for value in ids:
        if not valid_id(value):
            raise ValueError(f"invalid user or device id: {value!r}")


def member_set(users: Iterable[str]) -> frozenset[str]:
    """``users`` as a set of valid user ids (ValueError otherwise).  A bare
    string is refused: iterating it would make a group of its characters."""
    if isinstance(users, str):
        raise ValueError("members must be an iterable of user ids, not a string")
    result = frozenset(users)
    check_ids(*result)
    return result
