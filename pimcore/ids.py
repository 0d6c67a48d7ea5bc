"""The id grammar: user, device and conversation ids.

One module, importable without the store (``pimcore.client`` uses it and must
not load LMDB).  Every length limit on ids is a constant here; the core, the
stores, the SDK, the CLI and the load generator import them (docs/PROTOCOL.md,
section "Ids", states the same numbers).

* User and device ids are 1..:data:`MAX_ID_LEN` (64) characters from
  ``[A-Za-z0-9_.@-]`` -- ASCII only, so characters are bytes, and no ``:``,
  so ``:`` can separate the two users of a direct id.
* A direct (1:1) conversation id is ``d:<a>:<b>`` for users ``a < b``
  (compared as strings, which for ASCII is byte order; see
  :func:`direct_conversation`), so both sides derive the same id; its members
  are implied by the id.  It is at most :data:`MAX_DIRECT_ID_LEN` =
  2 + 64 + 1 + 64 = 131 characters: every pair of valid users has one.
* Any other conversation id names a group: 1..:data:`MAX_GROUP_ID_LEN` (128)
  printable ASCII characters (``!`` .. ``~``, no space), not starting with
  ``d:``.  A group's id is its name.
* So any conversation id is at most :data:`MAX_CONVERSATION_ID_LEN` (131)
  characters.  The LMDB store keeps every key under LMDB's 511-byte limit
  with these maxima (checked at import in :mod:`pimcore.store.lmdb`).
* Message ids are 16 bytes: the 8-byte big-endian server time followed by the
  8-byte node id of the broker that accepted it -- unique beyond one process
  and sortable by time.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

__all__ = [
    "SYSTEM",
    "MAX_ID_LEN",
    "MAX_USER_ID_LEN",
    "MAX_DEVICE_ID_LEN",
    "ID_CHARS",
    "DIRECT_PREFIX",
    "group_problem",
    "MAX_DIRECT_ID_LEN",
    "MAX_GROUP_ID_LEN",
    "MAX_CONVERSATION_ID_LEN",
    "ID_RE",
    "CONV_RE",
    "valid_id",
    "direct_conversation",
    "direct_members",
    "is_direct",
    "valid_conversation",
    "valid_group",
    "id_problem",
    "id_rule",
    "conversation_problem",
    "check_ids",
    "member_set",
]

#: The sender (and device) of messages the host posts as itself
#: (``Pimcore.post(..., sender=SYSTEM)``): allowed in every conversation and
#: shown as the system by clients.  Empty, so it can never be a user id.
SYSTEM = ""

#: Longest user or device id, in characters (= bytes: ids are ASCII).
MAX_ID_LEN = 64
MAX_USER_ID_LEN = MAX_ID_LEN
MAX_DEVICE_ID_LEN = MAX_ID_LEN
#: The characters of user and device ids, as a regex character class body.
ID_CHARS = "A-Za-z0-9_.@-"
#: What starts a direct (1:1) conversation id; no group id starts with it.
DIRECT_PREFIX = "d:"
#: ``d:<a>:<b>`` with both users at their longest: 2 + 64 + 1 + 64 = 131.
MAX_DIRECT_ID_LEN = len(DIRECT_PREFIX) + MAX_USER_ID_LEN + 1 + MAX_USER_ID_LEN
#: Longest group id (a group's name), in characters (printable ASCII).
MAX_GROUP_ID_LEN = 128
#: Longest conversation id of either kind.
MAX_CONVERSATION_ID_LEN = max(MAX_DIRECT_ID_LEN, MAX_GROUP_ID_LEN)

ID_RE = re.compile(rf"[{ID_CHARS}]{{1,{MAX_ID_LEN}}}\Z")
#: A conversation id of either kind: printable ASCII, no whitespace, at most
#: MAX_CONVERSATION_ID_LEN; :func:`valid_conversation` adds the per-kind rules.
CONV_RE = re.compile(rf"[!-~]{{1,{MAX_CONVERSATION_ID_LEN}}}\Z")


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


#: A repr up to this long is shown whole; a longer one is cut to about
#: _SHOW_CUT characters (see _show).
_SHOW_WHOLE = 80
_SHOW_CUT = 70


def _count(n: int, unit: str) -> str:
    return f"{n:,} {unit}{'' if n == 1 else 's'}"


def _a(kind: str) -> str:
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


class LongNumber:
    """A JSON integer of more digits than Python reads as an int
    (``sys.get_int_max_str_digits()``, 4,300: ``int()`` of it is a
    ValueError that says to raise the limit), kept as its text.  A token's
    claims are read with these (:mod:`pimcore._jwt`), so one of 10**5000 is
    refused in words, and shown cut (:func:`_show`), like any bad claim."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def digits(self) -> int:
        return len(self.text.lstrip("-"))

    def __repr__(self) -> str:
        return self.text


def _int_head(n: int) -> tuple[str, int]:
    """The first _SHOW_CUT characters of ``str(n)`` and how many digits
    ``n`` has, without ``str(n)``: past ``sys.get_int_max_str_digits()``
    digits (4,300) that is Python's ValueError, and slow."""
    sign = "-" if n < 0 else ""
    n = abs(int(n))
    k = max(0, int((n.bit_length() - 1) * 0.30102999566398120) - 1)  # (at most its digits - 1)
    power = 10 ** (k + 1)
    while power <= n:
        k, power = k + 1, power * 10
    digits = k + 1
    return sign + str(n // 10 ** max(0, digits - (_SHOW_CUT - len(sign)))), digits


#: In a str's repr: an escaped backslash, or the escape of a lone surrogate
#: U+DC80..U+DCFF -- how Python decodes a byte that is not UTF-8 in a
#: command-line argument (surrogateescape).
_ESCAPED_BYTE = re.compile(r"\\(\\|udc[89a-f][0-9a-f])")


def quote_arg(text: object) -> str:
    """``repr(text)`` with each byte that was not UTF-8 in a command-line
    argument (Python's surrogate escape ``\\udcff``) shown as the byte,
    ``\\xff``: how the CLI quotes what it was given, whole."""
    return _ESCAPED_BYTE.sub(lambda m: "\\\\" if m.group(1) == "\\" else "\\x" + m.group(1)[-2:], repr(text))


def bytes_readable(message: str) -> str:
    """``message`` (argparse's, say) with the bytes that were not UTF-8 in
    the arguments it quotes (``'\\udcff'`` in a repr) or repeats as they
    are (a lone surrogate, which stderr writes as ``\\udcff``) shown as
    ``\\xff``, as :func:`quote_arg` shows them."""
    message = _ESCAPED_BYTE.sub(lambda m: m.group(0) if m.group(1) == "\\" else "\\x" + m.group(1)[-2:], message)
    return re.sub("[\udc80-\udcff]", lambda m: f"\\x{ord(m.group(0)) - 0xDC00:02x}", message)


def _bytes_as_escapes(exc: UnicodeError) -> tuple[str, int]:
    """A codec error handler (``pimcore.bytes``, see cli.main): a byte
    that was not UTF-8 in an argument (U+DC80..U+DCFF) written as ``\\xff``,
    any other character the encoding lacks as ``backslashreplace`` does."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff"
                   else c.encode("ascii", "backslashreplace").decode("ascii") for c in bad), exc.end


def readable_stderr() -> None:
    """Make the process's stderr write a byte of an argument that was not
    UTF-8 (a path echoed as given: ``--cafile /tmp/\\xff: no such file``) as
    ``\\xff``, as quote_arg does, not as Python's ``\\udcff``."""
    import codecs
    import sys

    try:
        codecs.lookup_error("pimcore.bytes")
    except LookupError:
        codecs.register_error("pimcore.bytes", _bytes_as_escapes)
    reconfigure = getattr(sys.stderr, "reconfigure", None)
    if sys.stderr is sys.__stderr__ and reconfigure is not None:
        reconfigure(errors="pimcore.bytes")


def _show(value: object, _depth: int = 0) -> str:
    """``repr(value)``, cut short: refusals quote the id, never 1 MiB of it.
    A long value is shown as the whole repr of a prefix -- its closing quote
    or bracket kept -- then ``...(`` how long it is ``)``:

    * a string: a prefix of it (no escape cut in two) and its length:
      ``'xx...x'...(200 chars)``;
    * an int: its first digits and how many it has:
      ``1000...0...(an int of 101 digits)`` (never Python's ValueError for
      one of more digits than ``repr`` converts), and so a
      :class:`LongNumber`;
    * a list, tuple or dict: its first items (each one shown this way) and
      how many it has: ``[0, 1, ..., 19]...(a list of 300 items)``;
    * anything else: its repr cut, with its type and length:
      ``Foo(...)...(a Foo, 200 chars)``.

    (``_depth``: how deep inside the value being shown this one is; 3
    levels down a long list, tuple or dict is ``[...]`` and its length, so
    one that holds itself is shown too.)"""
    try:
        text: Optional[str] = quote_arg(value) if isinstance(value, str) else repr(value)
    except Exception:  # (an int of over 4,300 digits, in a list, say; a __repr__ that fails)
        text = None
    if text is not None and len(text) <= _SHOW_WHOLE:
        return text
    if isinstance(value, str) and text is not None:
        n = _SHOW_CUT
        while len(text := quote_arg(value[:n])) > _SHOW_CUT + 2:  # (an escape is up to 10 characters: a few rounds)
            n = n * 2 // 3
        return f"{text}...({len(value)} chars)"
    kind = type(value).__name__
    if isinstance(value, LongNumber):
        return f"{value.text[:_SHOW_CUT]}...(an int of {_count(value.digits, 'digit')})"
    if isinstance(value, int) and (text is None or text.lstrip("-").isdigit()):  # (not an IntEnum's <Color.RED: 1>)
        head, digits = _int_head(value) if text is None else (text[:_SHOW_CUT], len(text.lstrip("-")))
        return f"{head}...({_a(kind)} of {_count(digits, 'digit')})"
    if type(value) in (list, tuple, dict):  # (a subclass's repr is its own: namedtuple(a=...))
        assert isinstance(value, (list, tuple, dict))
        items = value.items() if isinstance(value, dict) else value
        shown: list[str] = []
        size = 2
        for item in items if _depth < 3 else ():
            part = (f"{_show(item[0], _depth + 1)}: {_show(item[1], _depth + 1)}" if isinstance(value, dict)
                    else _show(item, _depth + 1))
            size += len(part) + 2 * bool(shown)
            if shown and size > _SHOW_CUT:
                break
            shown.append(part)
        open_, close = "{}" if isinstance(value, dict) else "[]" if isinstance(value, list) else "()"
        if isinstance(value, tuple) and len(shown) == 1:
            close = ",)"
        body = f"{open_}{', '.join(shown) or '...'}{close}"
        if len(shown) == len(value):
            return body  # (all its items there, some cut)
        return f"{body}...({_a(kind)} of {_count(len(value), 'item')})"
    if text is None:
        return f"<{_a(kind)}>"
    return f"{text[:_SHOW_CUT]}...({_a(kind)}, {len(text):,} chars)"


def id_rule(what: str = "user") -> str:
    """What a valid ``what`` (user or device) id is, in words."""
    return f"{what} ids are 1-{MAX_ID_LEN} ASCII characters from A-Z a-z 0-9 _ . @ -"


def id_problem(value: object, what: str = "user") -> Optional[str]:
    """Why ``value`` is not a valid ``what`` (user or device) id, in words
    that quote the rule, or None when it is valid."""
    if valid_id(value):  # type: ignore[arg-type]
        return None
    if not isinstance(value, str):
        return f"a {what} id must be text, not {type(value).__name__}"
    rule = id_rule(what)
    if not value:
        return f"empty {what} id ({rule})"
    if not value.isascii():
        bad = next(ch for ch in value if not ch.isascii())
        return f"{what} id {_show(value)} has the non-ASCII character {quote_arg(bad)} ({rule})"
    if len(value) > MAX_ID_LEN:
        return f"{what} id {_show(value)} is {len(value)} characters long ({rule})"
    bad = next(ch for ch in value if not ID_RE.match(ch))
    return f"{what} id {_show(value)} has the character {bad!r} ({rule})"


def direct_conversation(a: str, b: str) -> str:
    """The id of the 1:1 chat between users ``a`` and ``b`` (symmetric):
    ``d:`` + the smaller id + ``:`` + the larger.  ValueError for an invalid
    user id or ``a == b``."""
    for user in (a, b):
        problem = id_problem(user)
        if problem is not None:
            raise ValueError(f"invalid user id in direct conversation: {problem}")
    if a == b:
        raise ValueError("a direct conversation needs two different users")
    lo, hi = (a, b) if a < b else (b, a)
    return f"{DIRECT_PREFIX}{lo}:{hi}"


def is_direct(conv: str) -> bool:
    return conv.startswith(DIRECT_PREFIX)


def direct_members(conv: str) -> Optional[tuple[str, str]]:
    """The two users of a well-formed direct id, else None."""
    if not conv.startswith(DIRECT_PREFIX):
        return None
    if type(conv) is str:
        return _direct_members(conv)
    return _direct_members.__wrapped__(conv)


@lru_cache(maxsize=1 << 16)
def _direct_members(conv: str) -> Optional[tuple[str, str]]:
    parts = conv[len(DIRECT_PREFIX) :].split(":")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (valid_id(a) and valid_id(b)) or not a < b:
        return None
    return a, b


def valid_conversation(conv: str) -> bool:
    """Well-formed conversation id: a canonical direct id, or a group id."""
    if type(conv) is str:
        return _valid_conversation(conv)
    return isinstance(conv, str) and _valid_conversation.__wrapped__(conv)


@lru_cache(maxsize=1 << 16)
def _valid_conversation(conv: str) -> bool:
    if CONV_RE.match(conv) is None:
        return False
    if conv.startswith(DIRECT_PREFIX):
        return direct_members(conv) is not None
    return len(conv) <= MAX_GROUP_ID_LEN


def valid_group(conv: str) -> bool:
    """Is ``conv`` an acceptable group id (a valid non-direct id)?"""
    return isinstance(conv, str) and not conv.startswith(DIRECT_PREFIX) and valid_conversation(conv)


def conversation_problem(conv: object) -> Optional[str]:
    """Why ``conv`` is not a valid conversation id, or None when it is."""
    if isinstance(conv, str) and valid_conversation(conv):
        return None
    if not isinstance(conv, str):
        return f"a conversation id must be text, not {type(conv).__name__}"
    if conv.startswith(DIRECT_PREFIX):
        return (
            f"direct conversation id {_show(conv)} is not d:<a>:<b> with two valid user ids a < b"
            f" (at most {MAX_DIRECT_ID_LEN} characters)"
        )
    return f"group id {_show(conv)} is not 1-{MAX_GROUP_ID_LEN} printable ASCII characters without spaces"


#: Why a group of no one is refused (BAD_REQUEST): no one could post to it
#: or see it -- a group starts with its creator or an owner.
EMPTY_GROUP = "a group needs at least one member (its creator or an owner)"

#: Why a removal of every remaining member is refused (BAD_REQUEST, no one
#: removed): the store decides it as it applies the op, so concurrent
#: removals cannot leave a group of no one either.
LAST_MEMBERS = ("a group needs at least one member: removing all its remaining members is refused"
                " (no one removed); to delete the group, purge it (pimcore purge conversation CONV,"
                " purge_conversation, DELETE /v1/conversations/CONV)")


#: The most membership entries one change of several users may write.  Each
#: added or removed user's JOINED or LEFT entry goes to every member's inbox,
#: so a change of U users in a group of M members writes about U x M inbox
#: entries in one commit, held in memory until it is done (a new-user pass:
#: 20,000 users out of a group of 20,000 grew the broker to 22 GB, silent for
#: minutes).  A change of one user is always taken: it costs what one message
#: to the group does.
MAX_MEMBERSHIP_ENTRIES = 1_000_000


def membership_change_problem(users: int, members: int) -> Optional[str]:
    """Why a change of ``users`` users (distinct ids that change: not
    members yet for an add, members for a remove) of a group that has, or
    will have, ``members`` members is refused (BAD_REQUEST, nothing
    changed), or None: ``users`` x ``members`` above
    :data:`MAX_MEMBERSHIP_ENTRIES`, for more than one user."""
    limit = MAX_MEMBERSHIP_ENTRIES
    if users <= 1 or users * members <= limit:
        return None
    fit = max(1, limit // members)
    return (f"{users:,} users x {members:,} members is {users * members:,} membership entries for the members'"
            f" inboxes in one commit, above {limit:,}: change at most {fit:,} user{'s' if fit > 1 else ''} at a time")


def group_problem(conv: object) -> Optional[str]:
    """Why ``conv`` is not an acceptable group id, or None when it is (a
    valid direct id is not one: groups are never named d:...)."""
    if valid_group(conv):  # type: ignore[arg-type]
        return None
    return conversation_problem(conv) or f"{_show(conv)} is a direct (1:1) id: no group id starts with {DIRECT_PREFIX!r}"


def check_ids(*ids: str) -> None:
    """ValueError (saying why) unless every value is a valid user/device id."""
    for value in ids:
        problem = id_problem(value, "user or device")
        if problem is not None:
            raise ValueError(f"invalid user or device id: {problem}")


def member_set(users: Iterable[str]) -> frozenset[str]:
    """``users`` as a set of valid user ids (ValueError otherwise).  A bare
    string is refused: iterating it would make a group of its characters."""
    if isinstance(users, str):
        raise ValueError("members must be an iterable of user ids, not a string")
    result = frozenset(users)
    check_ids(*result)
    return result
