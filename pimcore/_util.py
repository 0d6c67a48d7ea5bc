"""Small helpers shared by the server, the client and the bindings."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Union

if sys.version_info >= (3, 11):
    import builtins

    BaseExceptionGroup = builtins.BaseExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # a trio dependency there

__all__ = ["unwrap_single", "first_leaf", "BaseExceptionGroup", "TooManyDigits", "DuplicateKey", "read_json"]


class TooManyDigits(ValueError):
    """A JSON integer of more digits than ``int()`` reads
    (``sys.get_int_max_str_digits()``, 4,300).  Python's own ValueError for
    it names no field and advises raising the limit; a refusal says this
    one's ``digits`` and the ``limit`` instead."""

    def __init__(self, digits: int) -> None:
        self.digits = digits
        self.limit = sys.get_int_max_str_digits()
        super().__init__(f"a number of {digits:,} digits (at most {self.limit:,} are read)")


def _json_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise TooManyDigits(len(text.lstrip("-"))) from None


class DuplicateKey(ValueError):
    """A JSON object that gives one ``key`` twice (``{"user": "a", "user":
    "b"}``).  ``json.loads`` keeps the last silently; text from outside
    meant one of them, and which is not ours to guess."""

    def __init__(self, key: str) -> None:
        from .ids import _show

        self.key = key
        super().__init__(f"the key {_show(key)} twice in one object (give each key once)")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return obj


class NotJson(ValueError):
    """Text that Python's decoder reads but JSON (RFC 8259) is not:
    ``NaN``, ``Infinity``, ``-Infinity``."""


def _json_constant(name: str) -> Any:
    raise NotJson(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def read_json(text: Union[str, bytes]) -> Any:
    """``json.loads(text)`` for text from outside (an HTTP body, a C
    caller's config, a moderation answer): as it, but :class:`TooManyDigits`
    (a ValueError) for a number of more digits than Python reads,
    :class:`DuplicateKey` (a ValueError) for an object that gives a key
    twice, and :class:`NotJson` (a ValueError) for NaN or Infinity, which
    Python's decoder takes and no other reader need."""
    return json.loads(text, parse_int=_json_int, object_pairs_hook=_json_object, parse_constant=_json_constant)


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise a one-exception group as that exception.

    Our context managers run background tasks in a nursery, and trio wraps
    everything that leaves a nursery in an ExceptionGroup.  A caller of
    ``async with open_client(...)`` should see AuthFailed or TooSlowError
    itself, not a group holding it.  Real multi-failures stay groups.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            raise exc from exc.__cause__
        raise


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc`` (``exc`` itself if not a group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def shown_url(url: str) -> str:
    """``url`` as logs, errors and ``--print-config`` show it: a password in
    its userinfo (or a user name alone: often a token), its query string and
    its fragment replaced by ``<redacted>`` (a webhook
    URL's ``https://user:pw@host/hook?token=...`` was logged in clear: a new
    operator's trial); unchanged when it holds neither."""
    from urllib.parse import urlsplit, urlunsplit

    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest and "@" not in rest.partition("/")[0].partition("?")[0].partition("#")[0]:
        # An "@" past the first "/", "?" or "#": a password holding one of
        # them unencoded (``https://u:ab/cd@host/``) ends the host early for
        # the parser, which then showed the password as a port and a path
        # (a trial).  Everything up to the last "@" is taken for userinfo --
        # too much for a URL with an "@" in its path, never too little.
        url = f"{scheme}://<redacted>@{rest.rpartition('@')[2]}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<an invalid URL>"
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:<redacted>@" + netloc.rpartition("@")[2]
    elif "@" in netloc and not netloc.startswith("<redacted>@"):  # (a user name alone is often the token: https://TOKEN@host/)
        netloc = "<redacted>@" + netloc.rpartition("@")[2]
    query = "<redacted>" if parts.query else ""
    fragment = "<redacted>" if parts.fragment else ""
    if netloc == parts.netloc and query == parts.query and fragment == parts.fragment:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))
