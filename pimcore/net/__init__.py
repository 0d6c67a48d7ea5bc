"""The network layer: trio glue between sockets and the sans-IO core."""

from .server import DEFAULT_BROKER_CONFIG, BrokerServer, ServerConfig, open_broker_server, wall_clock_us
from .streams import Endpoint, WebSocketStream, parse_url

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
