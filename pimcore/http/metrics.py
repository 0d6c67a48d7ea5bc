"""Prometheus metrics of a running broker, read at scrape time.

Nothing on the hot path is instrumented for this: a custom collector reads
:meth:`BrokerServer.statistics` (the core's and the network layer's
counters, and the two histograms the committer keeps) when ``/metrics`` is
scraped.  Each broker gets its own :class:`CollectorRegistry`, never the
process-global one, so two brokers in one process (tests, embedding) do not
collide.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Iterator, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

import trio

from ..errors import CloseCode
from ..store import AsyncStore
from ..store.base import EventsPage, ReadEvents, StoreRequest

if TYPE_CHECKING:  # pragma: no cover
    from ..net.server import BrokerServer, HistogramSnapshot
    from .server import HttpServer

__all__ = ["BrokerCollector", "broker_registry", "render", "CONTENT_TYPE"]

#: The text exposition format prometheus_client writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (metric name without the pimcore_ prefix, help, BrokerStatistics field) -- counters.
_CORE_COUNTERS = (
    ("logins", "Logins that became active sessions.", "logins"),
    ("resyncs", "Logins whose resume cursor was from another epoch or beyond the head.", "resyncs"),
    ("protocol_errors", "Connections closed for breaking the protocol.", "protocol_errors"),
    ("messages_stored", "Messages stored (committed), duplicates excluded.", "messages_stored"),
    ("duplicates", "Sends answered from the idempotency record (same local id again).", "duplicates"),
    ("rejected_sends", "Sends refused (not member, too large, rate limited, content filter...).", "rejected"),
    ("pushes", "Messages pushed to online devices.", "pushes"),
    ("batches", "Write batches committed.", "batches"),
    ("batch_failures", "Write batches that failed (senders retry).", "batch_failures"),
    ("frames_in", "Frames received.", "frames_in"),
    ("frames_out", "Frames sent.", "frames_out"),
    ("store_reads", "Store read requests completed.", "reads"),
    ("store_read_failures", "Store read requests that failed.", "read_failures"),
    ("pushes_over_max_frame", "Pushes of one message over max_frame (stored under larger limits): refused by the device.",
     "pushes_over_max_frame"),
)

#: Known kinds of refused-login reasons (see pimcore.net.server).
_AUTH_KINDS = ("expired", "signature", "device", "invalid_id", "malformed", "other")


def _histogram(name: str, doc: str, snap: "Optional[HistogramSnapshot]") -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    total, s = 0, 0.0
    if snap is not None:
        buckets = [(repr(float(b)), float(n)) for b, n in zip(snap.bounds, snap.counts)]
        total, s = snap.count, snap.sum
    buckets.append(("+Inf", float(total)))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=s)


class BrokerCollector(Collector):
    """Yields the broker's metrics from one statistics snapshot per scrape."""

    def __init__(self, server: "BrokerServer", *, started: Optional[float] = None,
                 http: "Optional[HttpServer]" = None) -> None:
        self.server = server
        #: The HTTP listener serving these metrics, if any: its failed https://
        #: handshakes count with the broker's listeners' ones.
        self.http = http
        self.started = time.time() if started is None else started
        #: (last event id, ((consumer, durable cursor), ...)) as of the last
        #: :meth:`refresh_events`; None before the first.
        self.events: Optional[tuple[int, tuple[tuple[str, int], ...]]] = None
        self._probe_ids = itertools.count(1)

    async def refresh_events(self, timeout: float = 1.0) -> None:
        """Read the event log's last id and every consumer's cursor (one
        store read: ReadEvents with limit 0) for the next :meth:`collect`.
        Called by the scrape handler before rendering, so collect() itself
        never waits; a store that fails or takes over ``timeout`` seconds
        leaves the previous values (the scrape still answers)."""
        store = self.server.store
        request = StoreRequest(next(self._probe_ids), (ReadEvents("default", None, 0),), False)
        try:
            with trio.move_on_after(timeout):
                if isinstance(store, AsyncStore):
                    (page,) = await store.execute(request)
                else:
                    (page,) = store.execute(request)
                if isinstance(page, EventsPage):
                    self.events = (page.last_id, page.consumers)
        except Exception:  # noqa: BLE001 - a closed or failing store: keep the last values
            pass

    def collect(self) -> Iterator[Metric]:
        st = self.server.statistics()
        core = st.broker
        yield GaugeMetricFamily("pimcore_connections", "Open connections (logged in or not).", value=core.connections)
        yield GaugeMetricFamily("pimcore_online_devices", "Devices with an active session.", value=core.online_devices)
        yield CounterMetricFamily("pimcore_connections_accepted", "Connections accepted.", value=st.accepted)
        yield CounterMetricFamily("pimcore_connections_refused",
                                  "Connections refused at max_connections (Close OVERLOADED).", value=st.refused)
        for name, doc, attr in _CORE_COUNTERS:
            yield CounterMetricFamily(f"pimcore_{name}", doc, value=getattr(core, attr))
        auth = CounterMetricFamily("pimcore_auth_failures", "Refused logins (Close AUTH_FAILED) by kind of reason.",
                                   labels=["reason"])
        for kind in (*_AUTH_KINDS, *sorted(set(st.auth_failures) - set(_AUTH_KINDS))):
            auth.add_metric([kind], st.auth_failures.get(kind, 0))
        yield auth
        closes = CounterMetricFamily("pimcore_closes", "Close frames the broker sent, by close code.", labels=["code"])
        for code in CloseCode:
            closes.add_metric([code.name], st.closes.get(code.name, 0))
        yield closes
        http_tls = self.http.tls_handshake_failures if self.http is not None else 0
        yield CounterMetricFamily("pimcore_tls_handshake_failures",
                                  "Connections to a tls://, wss:// or https:// listener whose TLS handshake failed.",
                                  value=st.tls_handshake_failures + http_tls)
        yield CounterMetricFamily("pimcore_slow_consumers", "Connections dropped for not reading (SLOW_CONSUMER).",
                                  value=st.slow_consumers)
        yield CounterMetricFamily("pimcore_internal_errors", "Bugs and unexpected store or hook failures, contained.",
                                  value=st.internal_errors)
        yield CounterMetricFamily("pimcore_received_bytes", "Bytes received from connections.", value=st.bytes_in)
        yield CounterMetricFamily("pimcore_sent_bytes", "Bytes sent to connections.", value=st.bytes_out)
        yield GaugeMetricFamily("pimcore_outbound_queue_bytes", "Bytes queued for connections that read slowly.",
                                value=st.outbound_bytes_queued)
        yield GaugeMetricFamily("pimcore_pending_ops", "Write ops waiting for the next batch.", value=core.pending_ops)
        yield GaugeMetricFamily("pimcore_hooks_in_flight", "Authenticator / content filter calls awaiting an answer.",
                                value=core.hooks_in_flight)
        if self.events is not None:
            last, consumers = self.events
            yield GaugeMetricFamily("pimcore_event_last_id", "Id of the last host event recorded (0: none).", value=last)
            depth = GaugeMetricFamily("pimcore_event_outbox_depth",
                                      "Host events recorded and not yet acked, per consumer (last id - its cursor).",
                                      labels=["consumer"])
            for name, cursor in consumers:
                depth.add_metric([name], max(0, last - cursor))
            yield depth
        yield _histogram("pimcore_batch_ops", "Ops per committed write batch.", st.batch_ops)
        yield _histogram("pimcore_commit_seconds", "Seconds per write batch commit (fsync included).", st.commit_time)
        yield GaugeMetricFamily("pimcore_start_time_seconds", "When this broker started, seconds since the epoch.",
                                value=self.started)
        yield from _webhook_metrics(self.server)
        if self.http is not None:
            yield from _http_metrics(self.http)


def _http_metrics(http: "HttpServer") -> Iterator[Metric]:
    """The HTTP listener's own: its connections, responses and refusals."""
    from .server import REFUSAL_REASONS

    yield GaugeMetricFamily("pimcore_http_connections", "Open connections to the HTTP listener.",
                            value=http.open_connections)
    responses = CounterMetricFamily("pimcore_http_responses", "Responses the HTTP listener sent, by status.",
                                    labels=["status"])
    for status in sorted(http.responses):
        responses.add_metric([str(status)], http.responses[status])
    yield responses
    refused = CounterMetricFamily("pimcore_http_refused",
                                  "Requests (and connections) the HTTP listener refused, by reason.", labels=["reason"])
    for reason in REFUSAL_REASONS:
        refused.add_metric([reason], http.refusals.total.get(reason, 0))
    yield refused


def _webhook_metrics(server: "BrokerServer") -> Iterator[Metric]:
    """The event webhook sender's and the moderator's counters, when configured."""
    sender = getattr(server, "webhook_sender", None)
    if sender is not None:
        req = CounterMetricFamily("pimcore_webhook_requests", "Event webhook POSTs, by result (ok: a 2xx answer).",
                                  labels=["result"])
        req.add_metric(["ok"], sender.requests_ok)
        req.add_metric(["failed"], sender.requests_failed)
        yield req
        yield CounterMetricFamily("pimcore_webhook_events_delivered", "Events delivered by the webhook (2xx answered).",
                                  value=sender.events_delivered)
        yield GaugeMetricFamily("pimcore_webhook_last_success_time_seconds",
                                "When a webhook POST last succeeded, seconds since the epoch (0: never).",
                                value=sender.last_success)
        yield GaugeMetricFamily("pimcore_webhook_last_failure_time_seconds",
                                "When a webhook POST last failed, seconds since the epoch (0: never).",
                                value=sender.last_failure)
    mod = getattr(server, "moderator", None)
    if mod is not None:
        checks = CounterMetricFamily("pimcore_moderation_checks",
                                     "Moderation webhook calls, by outcome (unavailable: no usable answer, the policy decided).",
                                     labels=["result"])
        checks.add_metric(["allow"], mod.allowed)
        checks.add_metric(["reject"], mod.rejected)
        checks.add_metric(["unavailable"], mod.unavailable)
        yield checks


def broker_registry(server: "BrokerServer", *, started: Optional[float] = None,
                    collector: Optional[BrokerCollector] = None) -> CollectorRegistry:
    """A registry of its own holding ``collector`` (default: a new
    :class:`BrokerCollector` of ``server``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector if collector is not None else BrokerCollector(server, started=started))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry``."""
    return generate_latest(registry)
