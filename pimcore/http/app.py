"""The broker's HTTP listener: operations endpoints plus the server API's router.

``/healthz``, ``/readyz`` and ``/metrics`` need no API key (probes and
scrapers), nor do ``/`` (the list of endpoints) and ``/v1/openapi.json``;
everything else does.  Server API endpoints are added by
registering handlers on :attr:`BrokerHttp.router` before it runs::

    http = BrokerHttp(server, HttpConfig(api_keys=("k",)))
    async def post(request): ...; return 200, {"seq": 1}
    http.router.add("POST", "/v1/conversations/{conv}/messages", post)
    await nursery.start(http.run)
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator

import trio

from .metrics import CONTENT_TYPE, BrokerCollector, broker_registry, render
from .server import HttpConfig, HttpError, HttpServer, RawBody, Request, Router

if TYPE_CHECKING:  # pragma: no cover
    from ..embed import Pimcore
    from ..net.server import BrokerServer

__all__ = ["BrokerHttp", "open_http_server"]


class BrokerHttp(HttpServer):
    """An :class:`HttpServer` for ``server`` with the operations endpoints
    and ``GET /v1/info`` already routed; given a ``handle`` (the
    :class:`~pimcore.embed.Pimcore` of the same broker) also the server API
    (:func:`pimcore.http.api.register_api`, docs/HTTP.md)."""

    #: Served at max_connections too (HttpServer.probe_paths).
    probe_paths = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, server: "BrokerServer", config: HttpConfig, *, started: float | None = None,
                 handle: "Pimcore | None" = None) -> None:
        super().__init__(Router(), config)
        self.broker_server = server
        self.started = time.time() if started is None else started
        self._t0 = time.monotonic()
        self.collector = BrokerCollector(server, started=self.started, http=self)
        self.registry = broker_registry(server, started=self.started, collector=self.collector)
        r = self.router
        # None of these takes a query parameter (openapi.OPS_ROUTES).  The
        # probes and the scrape ignore one given: they act on nothing, and a
        # load balancer's or scraper's configuration may add one (a cache
        # buster, Prometheus's ``params``) where a 400 would mark a healthy
        # broker down.  The API's own endpoints refuse it.
        r.add("GET", "/", self._index, auth=False)
        r.add("GET", "/healthz", self._healthz, auth=False)
        r.add("GET", "/readyz", self._readyz, auth=False)
        r.add("GET", "/metrics", self._metrics, auth=False)
        r.add("GET", "/v1/info", self._info, query=())
        self.handle = handle
        if handle is not None:
            from .api import register_api

            register_api(r, handle, config.max_page_bytes)
            r.add("GET", "/v1/openapi.json", self._openapi, auth=False, query=())

    async def _index(self, request: Request) -> tuple[int, Any]:
        """What this listener serves, for whoever opens its root (``curl
        http://127.0.0.1:7481/``): its endpoints as routed now (the web
        demo's too, with --web), those that need no key marked, and where
        they are described.  No data: no key needed.  A WebSocket upgrade
        (an SDK given this port's URL without a path, ws://host:port) gets
        the 404 any path gets, which says this is no broker listener."""
        if "websocket" in request.headers.get("upgrade", "").lower():
            raise HttpError(404, "NOT_FOUND", "no endpoint /")
        return 200, {
            "service": "pimcore broker: HTTP API",
            "docs": "docs/HTTP.md",
            "openapi": "/v1/openapi.json" if self.handle is not None else None,
            "auth": "the endpoints not marked (no key) need the header 'Authorization: Bearer API_KEY'"
                    " (a key of the api_keys setting, or <data_dir>/api-key)",
            "endpoints": [f"{r.method} {r.pattern}" + ("" if r.auth else " (no key)") for r in self.router._routes],
        }

    async def _openapi(self, request: Request) -> tuple[int, Any]:
        from .. import __version__
        from .openapi import openapi_document

        return 200, openapi_document(__version__)

    async def _healthz(self, request: Request) -> tuple[int, Any]:
        reason = self.broker_server.liveness()
        if reason is not None:  # (only what a restart mends: a liveness probe restarts)
            raise HttpError(503, "UNAVAILABLE", reason)
        return 200, {"status": "ok"}

    async def _readyz(self, request: Request) -> tuple[int, Any]:
        reason = self.broker_server.readiness()
        if reason is not None:
            raise HttpError(503, "UNAVAILABLE", reason)
        return 200, {"status": "ready"}

    async def _metrics(self, request: Request) -> tuple[int, Any]:
        await self.collector.refresh_events()  # the event outbox depth: one store read, bounded in time
        return 200, RawBody(CONTENT_TYPE, render(self.registry))

    async def _info(self, request: Request) -> tuple[int, Any]:
        import pimcore

        broker = self.broker_server.broker
        return 200, {
            "version": pimcore.__version__,
            "backend": pimcore.BACKEND,
            "uptime_seconds": round(time.monotonic() - self._t0, 3),
            "started": self.started,
            "epoch": broker.epoch.hex() if broker is not None else None,
            "listeners": self.broker_server.urls,
        }


@asynccontextmanager
async def open_http_server(server: "BrokerServer", config: HttpConfig, *,
                           handle: "Pimcore | None" = None) -> AsyncIterator[BrokerHttp]:
    """Serve ``server``'s HTTP listener for the duration of the block
    (``.url`` is the real address once entered); with ``handle``, the
    server API too."""
    http = BrokerHttp(server, config, handle=handle)
    async with trio.open_nursery() as nursery:
        await nursery.start(http.run)
        try:
            yield http
            await http.shutdown()  # long-polls answered, streams ended (not on an error exit)
        finally:
            nursery.cancel_scope.cancel()
