"""Durable storage behind one interface (:class:`Store`).

Backends: :class:`LmdbStore` (the default, embedded, durable) and
:class:`MemoryStore` (reference implementation, tests, ephemeral embedding).
The same contract tests run against both.
"""

from .base import *  # noqa: F401,F403
from .base import __all__ as _base_all
from .lmdb import LmdbStore, StoreSummary
from .memory import MemoryStore

__all__ = [*_base_all, "LmdbStore", "StoreSummary", "MemoryStore"]
