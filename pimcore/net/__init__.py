"""The network layer: trio glue between sockets and the sans-IO core.

Names are resolved lazily, so that ``pimcore.net.streams`` (which the client
uses) does not import the broker, the store or LMDB.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerServer",
    "DEFAULT_BROKER_CONFIG",
    "Endpoint",
    "ServerConfig",
    "WebSocketStream",
    "open_broker_server",
    "parse_url",
    "wall_clock_us",
]

_STREAMS = {"Endpoint", "WebSocketStream", "parse_url"}


def __getattr__(name: str) -> Any:
    if name in _STREAMS:
        from . import streams

        return getattr(streams, name)
    if name in __all__:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'pimcore.net' has no attribute {name!r}")
