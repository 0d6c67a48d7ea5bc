"""The broker's HTTP/1.1 listener (h11 on trio): health, readiness,
Prometheus metrics and the server API.  See docs/HTTP.md."""

from __future__ import annotations

from .app import BrokerHttp, open_http_server
from .server import ERROR_CODES, HttpConfig, HttpError, HttpServer, RawBody, Request, Router, StreamBody, check_api_key

__all__ = [
    "BrokerHttp",
    "ERROR_CODES",
    "HttpConfig",
    "HttpError",
    "HttpServer",
    "RawBody",
    "Request",
    "Router",
    "StreamBody",
    "check_api_key",
    "open_http_server",
]
