"""pimcore: an embeddable instant-messaging broker core.

Layers, bottom up (one concern per module):

* :mod:`pimcore.frames` / :mod:`pimcore.codec` -- the PIM wire protocol (sans-IO);
* :mod:`pimcore.store` -- the durable offline store (LMDB by default);
* :mod:`pimcore.clock`, :mod:`pimcore.order` -- hybrid logical clock, display order;
* :mod:`pimcore.core` -- the sans-IO broker: events in, commands out.

``pimcore.BACKEND`` names the active fast-path backend (``"cython"`` or
``"pure"``); ``PIMCORE_BACKEND`` in the environment forces one.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["BACKEND", "__version__"]


def __getattr__(name: str) -> str:
    # Resolved lazily so that importing e.g. pimcore.store does not load the
    # codec; the choice itself is still made once, on first use.
    if name == "BACKEND":
        from . import _backend

        return _backend.NAME
    raise AttributeError(f"module 'pimcore' has no attribute {name!r}")
