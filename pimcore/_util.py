"""Small trio helpers shared by the server and the client."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

if sys.version_info >= (3, 11):
    import builtins

    BaseExceptionGroup = builtins.BaseExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # a trio dependency there

__all__ = ["unwrap_single", "first_leaf", "BaseExceptionGroup"]


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
