"""Choose the fast-path backend once, at import time.

``PIMCORE_BACKEND`` selects it, in the manner of msgpack-python and py-lmdb:

* ``cython``  -- the compiled ``pimcore._fastpath``; importing fails loudly if it
  was not built, so a CI run that forces it really tests it;
* ``pure``    -- the pure-Python twin ``pimcore._pure`` (same API, same errors);
* unset / ``auto`` -- Cython when it imports, else pure.

The choice is visible at runtime as ``pimcore.BACKEND``.  Tests that compare
both backends side by side use :func:`load`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from .errors import BackendChoiceError

__all__ = ["NAME", "impl", "load", "available", "BackendChoiceError"]

_ENV = "PIMCORE_BACKEND"


def load(name: str) -> ModuleType:
    """Import one backend by name (``"cython"`` or ``"pure"``)."""
    if name == "cython":
        return importlib.import_module("pimcore._fastpath")
    if name == "pure":
        return importlib.import_module("pimcore._pure")
    raise ValueError(f"unknown pimcore backend {name!r} (expected 'cython' or 'pure')")


def available() -> list[str]:
    """The backends that can be imported here, fastest first."""
    names = []
    for name in ("cython", "pure"):
        try:
            load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def _choose() -> tuple[str, ModuleType]:
    wanted = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if wanted in ("cython", "pure"):
        return wanted, load(wanted)
    if wanted != "auto":
        raise BackendChoiceError(f"{_ENV}={wanted!r}: expected 'cython', 'pure' or 'auto'")
    try:
        return "cython", load("cython")
    except ImportError:
        return "pure", load("pure")


NAME, impl = _choose()
