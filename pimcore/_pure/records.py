"""Fast constructors of frozen slotted dataclasses: the pure-Python twin of
``pimcore/_fastpath_records.pxi``.

``record_maker(cls)`` returns a callable with ``record_maker(cls)(*args) ==
cls(*args)`` for every call.  The compiled twin returns an object that
stores the arguments straight into the instance's slots when ``args`` holds
every field in order (a frozen dataclass's ``__init__`` pays one
``object.__setattr__`` per field -- most of the hot path's per-message
Python work); here it is the class itself.  Both raise TypeError for
anything that is not a dataclass type, and leave every other call
(defaults, keywords, wrong arity) to the class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["record_maker"]


def record_maker(cls: Any) -> Callable[..., Any]:
    """See the module docstring."""
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
        raise TypeError(f"record_maker needs a dataclass type, not {cls!r}")
    return cls
