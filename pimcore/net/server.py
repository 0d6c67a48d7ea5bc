"""The broker's network layer: thin trio glue over the sans-IO core.

Per connection there is one reader task (bytes -> ``Broker.receive_data``)
and one writer task that owns the socket's send side (so frames are never
interleaved; this is the "locked sender").  Commands coming out of the core
are executed by :meth:`BrokerServer._run`:

* ``SendData`` appends bytes to the connection's outbound buffer (written
  straight away when the socket takes them, else by its writer);
* ``CloseConnection`` queues its bytes (the Close frame) and ends the
  connection once they are flushed;
* ``PauseReading`` / ``ResumeReading`` stop and restart the reader task;
* ``StoreRequest``: a write goes to the single committer task, or runs
  inline when nothing else is waiting (group commit: the core keeps one in
  flight); a read runs inline on a synchronous store
  (local LMDB reads are memory-mapped: microseconds) or in a task of its own
  on an :class:`~pimcore.store.base.AsyncStore`, completing in any order;
* ``Authenticate`` / ``CheckContent`` are answered by the configured hooks:
  inline when they are plain functions, in a task of their own when they
  are coroutine functions -- a slow hook then holds up only its connection.
* ``TypingElsewhere`` (a store shared by several nodes only) is pushed to
  the other nodes as a typing hint, in order, best effort (dropped when
  1,000 are waiting);
* ``DeviceOnline`` / ``DeviceOffline`` are logged (``login``, ``offline``),
  as is every Close sent (``close``; ``login_refused`` and ``slow_consumer``
  at warning level), and counted for ``statistics()`` and ``/metrics``:
  closes by code, refused logins by kind of reason, and per committed batch
  its op count and commit time (bucketed: one bisect per batch).

Where commits run: on the event loop by default (``commit_in_thread``
False), in a worker thread if asked, or awaited on an AsyncStore.  On the
event loop a write request that a plain-TCP read caused runs inline, in
that reader, when no connection has bytes waiting (see ``_store_request``);
otherwise it goes to the committer task, and the readers that run first
fill the next batch.

No protocol logic lives here, and no frame is looked at: the core's
per-connection protocol sessions (:mod:`pimcore.protocol`) encode, compress
and decode.  What does live here, because only the
network layer can know it:

* **Bounded memory per connection.**  Only the network layer knows when
  bytes left: every write is reported to the core (``Broker.data_sent``),
  which counts what each connection holds, stops reading a connection whose
  answers are not taken (PauseReading at half of ``max_outbound_bytes``),
  and past ``max_outbound_bytes`` closes it with ``SLOW_CONSUMER`` (its
  messages stay in its inbox; it catches up from its position).  The check
  in :meth:`_enqueue` on the wire bytes still queued is a second line.
* **Time.**  ``now`` (µs since the epoch) is read here and passed in; one
  timer task sleeps until the core's ``next_deadline()`` and then calls
  ``handle_timer`` -- no fixed tick.
* **Graceful shutdown.**  Stop accepting, stop reading, let the in-flight
  store batch finish (its SendAcks go out), then Close(SHUTDOWN) everyone.
"""

from __future__ import annotations

import bisect
import enum
import errno
import functools
import itertools
import logging
import math
import os
import select
import re
import ssl
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
import inspect
from collections import deque
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Sequence, Union

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest
from wsproto import ConnectionType, WSConnection
from wsproto.events import RejectConnection, Request
from wsproto.utilities import RemoteProtocolError

from .._util import BaseExceptionGroup, first_leaf, unwrap_single
from ..clock import WallClock
from ..core import (
    AdminDone,
    PostDone,
    Authenticate,
    Authenticator,
    Broker,
    BrokerConfig,
    BrokerStatistics,
    CheckContent,
    CloseConnection,
    Command,
    DeviceOffline,
    TypingElsewhere,
    DeviceOnline,
    PushOverMaxFrame,
    Identity,
    Limits,
    PauseReading,
    ResumeReading,
    SendData,
    StoreRequest,
    verdict_reason,
)
from ..errors import AuthError, BrokerStopped, CloseCode, ErrorCode, StoreError
from ..store.base import AsyncStore, Deduped, GroupChanged, ReadDedupe, Rejected, Result, Store, StoreRequest as _StoreRequest
from ..protocol import PRE_LOGIN_MAX_FRAME, encode_close, refuse_connection
from .streams import _PROTOCOL_CLOSES, Endpoint, StreamWrapper, WebSocketStream, wrap_server_websocket

__all__ = [
    "ServerConfig", "ServerStatistics", "HistogramSnapshot", "BrokerServer", "open_broker_server", "wall_clock_us",
    "DEFAULT_BROKER_CONFIG",
]

log = logging.getLogger("pimcore.net")

SECOND = 1_000_000


def wall_clock_us() -> int:
    """Wall-clock µs, read afresh.  The core's hybrid clock turns it into a
    server time that never goes backwards, even if this does.  As a
    broker's ``clock`` it does not report steps: the default,
    :class:`pimcore.clock.WallClock`, does."""
    return time.time_ns() // 1000


#: What a served broker uses unless told otherwise: heartbeats every 15 s,
#: a peer silent for 45 s is dead, 2000 sends/s sustained per connection,
#: delivery acks wait up to 20 ms to share a sync with messages.
#: A write batch of this many inbox entries or more (StoreRequest.entries)
#: commits in a worker thread when the store allows it, even with
#: commit_in_thread off: the loop keeps serving (health checks, other
#: connections' reads) while a group's fan-out is written and synced.  A
#: batch of 300 posts to a group of 20,000 took 14 s of commits; on the loop
#: /healthz went unanswered for up to 5.5 s, off it for at most 0.18 s
#: (``log`` durability: 1.2-2.8 s on the loop, 0.06-0.14 s off it).
#: Below it, committing on the loop is cheaper (see commit_in_thread).
_OFF_LOOP_ENTRIES = 16_384

#: /readyz's words for a failed write whose StoreError gave no cause (its
#: text may name the data directory: /readyz needs no API key).
_WRITE_FAILED = "a write to the store failed (the broker's log says why)"
#: A closed store's StoreError text (every store's, Store's contract): said as it is.
_STORE_CLOSED = "store is closed"


def _probe_kind(exc: StoreError) -> str:
    """/readyz's words for the readiness probe's StoreError without a
    cause: "store is closed", or its kind (the text may hold a path)."""
    return _STORE_CLOSED if str(exc) == _STORE_CLOSED else "the store could not be read (the broker's log says why)"

DEFAULT_BROKER_CONFIG = BrokerConfig(
    limits=Limits(heartbeat_ms=15_000, send_rate=2000.0, send_burst=512),
    idle_timeout=45 * SECOND,
    ack_delay=20_000,
)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listeners: tuple[Endpoint, ...] = (Endpoint("tcp"),)
    #: Server certificate chain and key (PEM) for tls:// and wss:// listeners,
    #: or a ready ``ssl_context`` (takes precedence).
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    ssl_context: Optional[ssl.SSLContext] = None
    broker: BrokerConfig = DEFAULT_BROKER_CONFIG
    #: Memory held for one connection (queued frames, each counted as its
    #: bytes + 96): reading it pauses at half of this (at most
    #: BrokerConfig.outbound_pause), frames it did not ask for beyond it
    #: close it with SLOW_CONSUMER.  Becomes the core's max_outbound.
    max_outbound_bytes: int = 8 << 20
    #: Connections beyond this are refused at once (Close OVERLOADED).
    max_connections: int = 100_000
    close_timeout: float = 2.0  # seconds to flush a Close before hanging up
    read_size: int = 64 * 1024
    #: Run Store.commit in a worker thread, so the event loop keeps serving
    #: while a batch syncs (LMDB's fsync releases the GIL).  Off by default:
    #: measured on a 2-vCPU machine (BENCHMARKS.md), committing on the loop
    #: won both ways -- the hand-off to a worker thread and back costs about
    #: 0.3-0.5 ms of wake-ups per batch (p50 send->SendAck at one in flight
    #: 0.96 ms inline vs 1.31 ms threaded), and under load the commit's Python
    #: work competes with the loop for the GIL anyway (about 15 % fewer acked
    #: sends/s threaded).  Worth trying when the broker has cores to spare and
    #: its commits are mostly fsync wait.  Needs ``store.thread_safe_commit``.
    commit_in_thread: bool = False
    #: Seconds an ``async def`` authenticator or content filter may take.
    #: Past it the login is closed with INTERNAL, or the message refused with
    #: INTERNAL (the client retries), so a hook that hangs holds nothing for
    #: long -- not even a connection paused while it waits.
    hook_timeout: float = 10.0
    #: Seconds a read request may take on an AsyncStore.  Past it the read
    #: counts as failed (a login is closed with INTERNAL and retried, a
    #: history page is STORE_UNAVAILABLE); a late answer is dropped.  Writes
    #: have no such limit: a write that may have committed cannot be
    #: declared failed.
    read_timeout: float = 10.0
    #: Seconds after a reader of this broker last read or acked a host event
    #: consumer during which deleting that consumer is refused
    #: (pimcore.embed.ConsumerInUse): a poller between two reads holds no
    #: request open, and deleting its cursor then dropped what it had not
    #: read.  0: only readers holding one open are protected.
    consumer_idle: float = 60.0
    #: The pre-send moderation webhook (a :class:`pimcore.webhooks.ModerationConfig`),
    #: asked after the content filter let a message through; None: none.
    moderation: Any = None

    def __post_init__(self) -> None:
        if not (isinstance(self.consumer_idle, (int, float)) and 0 <= self.consumer_idle <= 86_400):
            raise ValueError(f"consumer_idle: expected seconds from 0 to 86400, got {self.consumer_idle!r}")
        # No listeners is fine: an embedding host may hand the broker its
        # streams itself (BrokerServer.serve_stream).
        if self.max_outbound_bytes < 1024:
            raise ValueError("max_outbound_bytes must be >= 1024")
        if not isinstance(self.commit_in_thread, bool):
            raise ValueError("commit_in_thread must be true or false")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if not self.read_timeout > 0:
            raise ValueError("read_timeout must be > 0 seconds")
        if not self.hook_timeout > 0:
            raise ValueError("hook_timeout must be > 0 seconds")

    def make_ssl_context(self) -> Optional[ssl.SSLContext]:
        if self.ssl_context is not None:
            return self.ssl_context
        if not any(e.secure for e in self.listeners):
            return None
        if not self.certfile:
            raise ValueError("tls:// and wss:// listeners need certfile (and keyfile)")
        return server_ssl_context(self.certfile, self.keyfile)


def server_ssl_context(cert: str, key: Optional[str] = None) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) with the PEM certificate
    chain ``cert`` and its PEM private key ``key`` (default: in ``cert``).
    Either may be a pipe (``--cert <(...)``): it is read once.  Raises
    ValueError naming the file that is wrong -- missing, a directory, no PEM
    certificate, no PEM private key -- where ssl itself says only "[Errno 2]
    No such file or directory" or "[SSL] PEM lib"."""
    texts: dict[str, bytes] = {}
    paths: dict[str, str] = {}
    fds: list[int] = []
    try:
        for what, path in (("certificate", cert), ("key", key)):
            if path is None:
                continue
            if not os.path.exists(path):  # (a pipe is a file too)
                raise ValueError(f"TLS {what} {path}: no such file")
            if os.path.isdir(path):
                raise ValueError(f"TLS {what} {path}: a directory, not a PEM file")
            try:
                with open(path, "rb") as f:
                    texts[what] = f.read()
            except OSError as exc:
                raise ValueError(f"TLS {what} {path} cannot be read: {exc.strerror}") from None
            if os.path.isfile(path):
                paths[what] = path
            else:
                # ssl opens a file by name, and once more for a key in the
                # same file: a pipe gives its bytes once, so they are loaded
                # from memory (an anonymous in-memory file, never the disk).
                if not hasattr(os, "memfd_create"):  # (not Linux)
                    raise ValueError(f"TLS {what} {path} is not a regular file: give one")
                fd = os.memfd_create("pimcore-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(texts[what])
                paths[what] = f"/proc/self/fd/{fd}"
        if b"-----BEGIN CERTIFICATE-----" not in texts["certificate"]:
            raise ValueError(f"TLS certificate {cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        if key is None and b"PRIVATE KEY-----" not in texts["certificate"]:
            raise ValueError(f"TLS key {cert} holds no PEM private key (and no key file was given)")
        if key is not None and b"PRIVATE KEY-----" not in texts["key"]:
            raise ValueError(f"TLS key {key} holds no PEM private key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(paths["certificate"], paths.get("key"))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"TLS certificate {cert} with key {key or cert} does not load: {exc}") from exc
        return ctx
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Cumulative bucket counts: ``counts[i]`` observations <= ``bounds[i]``
    (Prometheus ``le``), then ``count`` in all (+Inf) and their ``sum``."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float


class _Histogram:
    """Cheap bucket counting where commits complete (one bisect and two adds
    per batch); cumulated only when a snapshot is taken."""

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        acc, counts = 0, []
        for n in self.buckets[:-1]:
            acc += n
            counts.append(acc)
        return HistogramSnapshot(self.bounds, tuple(counts), acc + self.buckets[-1], self.sum)


#: Ops per committed batch (messages, delivery acks, read markers...).
BATCH_OPS_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0)
#: Seconds per commit (write request), fsync included.
COMMIT_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _auth_failure_kind(reason: str) -> str:
    """A bounded label for a refused login's reason (metrics must not take
    free text as a label): expired, signature, device, invalid_id, malformed,
    other."""
    r = reason.lower()
    if "bound to device" in r:  # (first: the ids it names are the client's, "signature-pad" say)
        return "device"
    if "expired" in r:
        return "expired"
    if "signature" in r:
        return "signature"
    if "invalid user id" in r or "invalid device id" in r:
        return "invalid_id"
    if "invalid" in r or "malformed" in r or "wrong type" in r:
        return "malformed"
    return "other"


def _host_port(addr: Any) -> str:
    """A socket address (``(host, port, ...)``) as ``host:port`` (``[host]:port`` for IPv6)."""
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_address(stream: trio.abc.Stream) -> str:
    """``host:port`` of the other end, for logs ("?" when unknown)."""
    try:
        if isinstance(stream, WebSocketStream):
            remote = stream.ws.remote
            return f"{remote.address}:{remote.port}"  # type: ignore[union-attr]
        inner: Any = stream
        while isinstance(inner, trio.SSLStream):
            inner = inner.transport_stream
        if isinstance(inner, _Transport):
            return inner.peer  # known since accept (a reset socket has forgotten it)
        return _host_port(inner.socket.getpeername())
    except Exception:
        return "?"


@dataclass(frozen=True, slots=True)
class _Accepted(trio.abc.AsyncResource):
    """A connection a listener accepted and its peer's address (``host:port``)
    as accept() returned it: a client that resets before the broker asks
    the socket has made the socket forget it (the connect line said
    ``peer=?``)."""

    stream: trio.SocketStream
    peer: str

    async def aclose(self) -> None:
        await self.stream.aclose()


#: accept() errors that concern only the connection being accepted (as
#: trio.SocketListener ignores them: a firewall's EPERM, an early reset...).
_IGNORED_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN",
                                      "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, name)
)


#: accept() errors that mean the process (or the system) is out of file
#: descriptors or memory -- trio.serve_listeners's ACCEPT_CAPACITY_ERRNOS:
#: the connection waits in the backlog; accept is tried again 0.1 s later
#: (:class:`AcceptPressure`).
_CAPACITY_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS") if hasattr(errno, name)
)


def nofile_limit() -> Optional[int]:
    """The process's soft RLIMIT_NOFILE (``ulimit -n``), None if unlimited
    or unknown."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


class AcceptPressure:
    """What a listener does when accept() fails for want of file descriptors
    (or memory): pause ``pause`` seconds and try again, as trio's
    serve_listeners does -- but say so in one warning line at most every
    ``warn_every`` seconds, with how many accepts failed since the last,
    instead of trio's ERROR with a traceback every 0.1 s."""

    pause = 0.1
    warn_every = 30.0

    def __init__(self, where: str) -> None:
        self.where = where
        #: Accepts failed since the last warning.
        self.failed = 0
        self._warned_at: Optional[float] = None

    async def wait(self, exc: OSError) -> None:
        self.failed += 1
        now = trio.current_time()
        if self._warned_at is None or now - self._warned_at >= self.warn_every:
            limit = nofile_limit()
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            log.warning(
                "cannot accept connections on %s: %s (%s), %d time(s) since %s; retrying every %g s while"
                " connections close -- raise the open-files limit (ulimit -n, now %s) or lower max_connections",
                self.where, name, os.strerror(exc.errno or 0), self.failed,
                "the last warning" if self._warned_at is not None else "it began", self.pause,
                limit if limit is not None else "unlimited",
                extra={"event": "accept_failed", "url": self.where, "errno": name, "failures": self.failed})
            self._warned_at = now
            self.failed = 0
        await trio.sleep(self.pause)


class PressureListener(trio.abc.Listener[trio.abc.Stream]):
    """``inner``'s accept with :class:`AcceptPressure` (the HTTP API's
    listeners, under trio.serve_listeners)."""

    def __init__(self, inner: trio.abc.Listener[Any], where: str) -> None:
        self.inner = inner
        self.pressure = AcceptPressure(where)

    async def accept(self) -> trio.abc.Stream:
        while True:
            try:
                return await self.inner.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ACCEPT_ERRNOS:
                    raise
                await self.pressure.wait(exc)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _AddressedListener(trio.abc.Listener[_Accepted]):
    """trio.SocketListener's accept loop, keeping the address that accept()
    returns (trio's drops it) -- for trio.serve_listeners; running out of
    file descriptors is :class:`AcceptPressure`'s."""

    def __init__(self, inner: trio.SocketListener, where: str = "?") -> None:
        self.inner = inner
        self.pressure = AcceptPressure(where)

    async def accept(self) -> _Accepted:
        while True:
            try:
                sock, addr = await self.inner.socket.accept()
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                    raise trio.ClosedResourceError from None
                if exc.errno in _CAPACITY_ACCEPT_ERRNOS:
                    await self.pressure.wait(exc)
                    continue
                if exc.errno not in _IGNORED_ACCEPT_ERRNOS:
                    raise
            else:
                try:
                    peer = _host_port(addr)
                except Exception:  # pragma: no cover - not an IP address
                    peer = "?"
                return _Accepted(trio.SocketStream(sock), peer)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _handshake_pending(stream: trio.abc.Stream) -> bool:
    """``stream`` is TLS (a tls:// connection's) and has not completed its
    handshake: nothing can be written to it before the client's part."""
    if not isinstance(stream, trio.SSLStream):
        return False
    try:
        stream.version()
    except trio.NeedHandshakeError:
        return True
    return False


def _why_lost(stream: trio.abc.Stream, exc: BaseException) -> str:
    """What ended ``stream`` when ``exc`` broke it, for its close line."""
    if _handshake_pending(stream):
        under = stream.transport_stream  # type: ignore[attr-defined]
        if isinstance(under, _Transport) and not under.received:
            return "closed before sending a byte (no TLS handshake)"
        return f"TLS handshake failed: {_tls_reason(exc)}"
    return f"connection lost: {_tls_reason(exc)}"


#: What a connection's own tasks raise when its peer is gone: its end, not
#: the broker's.
_PEER_GONE = (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _http_answer(status: str, body: str, headers: bytes = b"") -> bytes:
    """A ws:// or wss:// listener's plain-text HTTP answer before (or instead
    of) an upgrade, or a tcp:// or tls:// one's to an HTTP request
    (``status``: "400 Bad Request"; ``headers``: more header lines, each
    ending in CRLF), after which it hangs up."""
    data = body.encode()
    return (b"HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"%sConnection: close\r\n\r\n%s" % (status.encode(), len(data), headers, data))


#: The Retry-After (seconds) of a full ws:// or wss:// listener's 503.  The
#: SDK does not read it: it retries a 503 as Close OVERLOADED, after its own
#: reconnect backoff (backoff_initial 0.1 s, doubled at each refusal, so
#: about 1 s by its fourth try, jittered).  It is for other clients (a
#: browser's code, a proxy): 1 s asks them to wait about what the SDK does
#: once a few of its tries were refused -- slots come back as connections
#: end -- and is the least the header says in whole seconds (0 would invite
#: a retry loop with no wait at all).
_WS_RETRY_AFTER = 1


def _full_answer(ep: Endpoint, max_connections: int) -> bytes:
    """What a ws:// or wss:// listener (``ep``, with its real port) answers
    an upgrade it would take but for max_connections (BrokerServer._refuse_ws):
    the HTTP server's refusal at its limit, saying which listener is full
    (a client may know several) and when to come back."""
    return _http_answer("503 Service Unavailable", f"too many connections at {ep.url} (max_connections {max_connections})",
                        b"Retry-After: %d\r\n" % _WS_RETRY_AFTER)

#: The first byte of a TLS record holding a handshake message (a ClientHello).
_TLS_HANDSHAKE_RECORD = 0x16
#: A fatal TLS alert record, unexpected_message (RFC 8446 sections 5.1, 6).
_TLS_ALERT_UNEXPECTED_MESSAGE = b"\x15\x03\x03\x00\x02\x02\x0a"


class _Transport(trio.abc.HalfCloseableStream):
    """The TCP stream under a server-side :class:`trio.SSLStream` (see
    :func:`tls_server_stream`), noting whether the client sent anything: a
    connection closed (or reset) before its first byte -- what a load
    balancer's TCP health check does -- never began a TLS handshake, so it
    did not fail one (:func:`tls_handshake_failed`).  It also keeps the
    peer's address from accept time: after a reset the socket forgets it,
    and a failed handshake's line would say ``peer=?``."""

    def __init__(self, sock: trio.SocketStream, peer: Optional[str] = None) -> None:
        self.transport_stream = sock
        self.socket = sock.socket  # as on SocketStream (trio-websocket reads it)
        self.received = False  # the client sent at least one byte
        self.peer = peer if peer is not None else _peer_address(sock)

    async def receive_some(self, max_bytes: Optional[int] = None) -> bytes:
        data = await self.transport_stream.receive_some(max_bytes)
        if data and not self.received:
            self.received = True
            if data[0] != _TLS_HANDSHAKE_RECORD:
                # Plain text (a tcp:// Login, a ws:// upgrade, plain HTTP) to
                # a TLS port.  OpenSSL fails on it without a word, and a
                # silent hang-up is also what a load balancer with no broker
                # behind it does, which a client must retry.  Answer as TLS
                # does (RFC 8446 section 6: a fatal alert, unexpected_message),
                # so the client knows at once (pimcore.client).  The SSL
                # object then fails on these bytes and the connection ends.
                try:
                    await self.transport_stream.send_all(_TLS_ALERT_UNEXPECTED_MESSAGE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                    pass
        return data

    async def send_all(self, data: Union[bytes, bytearray, memoryview]) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        await self.transport_stream.aclose()


class _EndWatch(StreamWrapper):
    """The stream a ws:// or wss:// connection's WebSocket reads (the socket,
    or TLS over it), calling ``on_end`` when the client hangs up (EOF, or a
    TLS close_notify) or the stream breaks: trio-websocket (0.12) waits for
    an upgrade request on and on after that -- its reader saw the end --
    and BrokerServer._serve_ws ends that wait with it.  So does the reader
    closing the stream itself, having answered a malformed upgrade request
    with HTTP 400 (the wait went on until login_timeout, holding one of
    max_connections).  It also ends the wait on an upgrade request whose
    head is over _WS_MAX_HEAD bytes (h11 would refuse it with a bare 400):
    _serve_ws answers 431.

    Before the upgrade, the reader's close is not passed on: closed at once
    after its 400, with what the client still sent unread (a POST's body),
    the socket sent a reset, which failed the client's sending and could
    drop the 400 unread.  _serve_ws ends it as the listener's own refusals
    (_answer_and_hang_up); keep_open is cleared at the upgrade, after which
    trio-websocket's close (its close handshake done) is the socket's."""

    def __init__(self, inner: trio.abc.Stream, refusal: bytes = b"") -> None:
        super().__init__(inner)
        # What to say instead of trio-websocket's next answer of the same
        # status without a body: its 400 to an HTTP request that is no
        # upgrade (a browser, curl), or the 404 that _serve_ws has it send.
        self.refusal = refusal
        self.ended = False  # the client hung up, or the stream broke
        self.closed = False  # trio-websocket closed it (a malformed upgrade request, answered 400)
        self.keep_open = True  # its close leaves the stream open (before the upgrade)
        #: The WebSocket, once upgraded, and whether a Close frame went out
        #: (see protocol_close: a protocol error's Close).
        self.ws: Optional[Any] = None
        self.close_sent = False
        # The client's first bytes are no HTTP request (pimcore's binary
        # protocol: a tcp:// client): h11 would wait for a line end until
        # login_timeout, and the client with it.  _serve_ws answers 400.
        self.not_http = False
        # The upgrade request's head is over _WS_MAX_HEAD bytes: _serve_ws answers 431.
        self.too_large = False
        # The client ended its side (a half-close: ``nc -N``) inside an HTTP
        # head, before its blank line: it can still read, and no more bytes
        # will come; _serve_ws answers 400 (as a tcp:// listener does).
        self.cut_short = False
        self._first = b""
        # Bytes the request's head may still take (None once its end was
        # seen: the WebSocket's frames then pass with one test), and the
        # last bytes read, in case its end straddles two reads.
        self._head_left: Optional[int] = _WS_MAX_HEAD
        self._tail = b""
        self.on_end: Optional[Callable[[], object]] = None

    async def aclose(self) -> None:
        self.closed = True
        self._end()
        if self.keep_open:
            await trio.lowlevel.checkpoint()
            return
        if self.protocol_close():
            # Its Close is _serve_ws's to send, then it lingers as after a
            # refusal (_answer_and_hang_up): sent here, by trio-websocket's
            # reader task, it was lost when the connection's end cancelled
            # that task first (a bare EOF), and closing the socket at once
            # with the client's bytes unread sent a reset that overtook it.
            await trio.lowlevel.checkpoint()
            return
        await super().aclose()

    def protocol_close(self) -> bytes:
        """The Close frame owed to a client whose frame broke RFC 6455
        (unmasked, a reserved opcode, a text frame that is no UTF-8), or b"".
        wsproto names the close code, but trio-websocket sends a Close only
        in answer to the peer's own, and hangs up -- the client saw 1006
        (abnormal), no reason.  RFC 6455 section 7.1.7 / 7.4.1: fail the
        connection with a Close of that code first.  (A server's frame is
        not masked; the reason cut to fit a control frame's 125 bytes.)"""
        ws = self.ws
        if self.keep_open or ws is None or self.close_sent or ws.closed is None or ws.closed.code not in _PROTOCOL_CLOSES:
            return b""
        reason = (ws.closed.reason or "").encode("utf-8")[:_CLOSE_REASON_MAX].decode("utf-8", "ignore").encode()
        return bytes((0x88, 2 + len(reason))) + ws.closed.code.to_bytes(2, "big") + reason

    async def receive_some(self, max_bytes: Optional[int] = None) -> Union[bytes, bytearray]:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self._end()
            raise
        if not data:
            self.cut_short = self._head_left is not None and bool(self._first) and not self.not_http
            self._end()
        elif self._head_left is not None:
            if len(self._first) < 2:
                self._first += bytes(data[: 2 - len(self._first)])
                self.not_http = not _http_start(self._first)
            self.too_large = not self.not_http and self._head_over(data)
            if self.not_http or self.too_large:
                # (Not given to h11: it would wait for a line end, or refuse
                # with a 400 that does not say why.)
                self._end()
                await trio.sleep_forever()  # (its reader waits, until _serve_ws cancels it)
        return data

    def _head_over(self, data: Union[bytes, bytearray]) -> bool:
        """``data``, the request's next bytes, take its head over
        _WS_MAX_HEAD bytes; its end (a blank line, as h11 finds it) stops
        the watch."""
        seen = self._tail + bytes(data)
        end = _HEAD_END.search(seen)
        assert self._head_left is not None
        if end is not None:
            over = end.end() - len(self._tail) > self._head_left
            self._head_left = None
            return over
        self._head_left -= len(data)
        self._tail = seen[-2:]
        return self._head_left < 0

    async def send_all(self, data: Union[bytes, bytearray, memoryview]) -> None:
        # (_serve_ws clears refusal once the upgrade is accepted: the
        # WebSocket's frames pass with one falsy test.  trio-websocket sends
        # each frame with a send_all of its own: a Close frame starts 0x88.)
        if data[:1] == b"\x88":
            self.close_sent = True
        await self.inner.send_all(_said(data, self.refusal) if self.refusal else data)

    def _end(self) -> None:
        self.ended = True
        if self.on_end is not None:
            self.on_end()


#: A Close frame's reason, in bytes: a control frame carries 125 at most, 2 of them the code.
_CLOSE_REASON_MAX = 123


def _said(data: Union[bytes, bytearray, memoryview], refusal: bytes) -> Union[bytes, bytearray, memoryview]:
    """What is sent for ``data``, trio-websocket's next bytes: ``refusal`` if
    they are its answer of the same status without a body.  It (through
    wsproto) answers what it cannot upgrade with "HTTP/1.1 400
    \\r\\ncontent-length: 0\\r\\n\\r\\n", then closes; a reject() without a
    body is the same with its status: no reason phrase, no Content-Type.
    Another status (wsproto's 426 to an unknown Sec-WebSocket-Version)
    passes as it is."""
    if bytes(data[:13]) == refusal[:13] and b"\r\ncontent-length: 0\r\n" in bytes(data).lower():
        return refusal
    return data


def _http_start(first: bytes) -> bool:
    """``first`` (a client's first 1 or 2 bytes) may begin an HTTP request:
    a method is letters.  A client's first frame never begins so: it is a
    Login, never compressed, so its length (a varint) is followed by its
    head 0x40 ("@", no letter), or its first byte is >= 0x80."""
    return all(65 <= b <= 90 or 97 <= b <= 122 for b in first)


def _upgrade_at_stream(peer: "_Peer") -> None:
    """``peer``'s first bytes, at a tcp:// or tls:// listener, were a
    WebSocket upgrade request, which the core refused with a binary Close
    (PROTOCOL_ERROR: "GE" read as a frame's length, 71, and head, 0x45 --
    reserved flag bits set, MALFORMED_FRAME): its close line says what
    arrived instead, and where to send it."""
    if peer.close_code is CloseCode.PROTOCOL_ERROR:
        scheme = peer.endpoint.scheme
        ws = "wss" if scheme == "tls" else "ws"
        peer.ended = (f"a WebSocket upgrade request at the {scheme}:// listener (use the {ws}:// listener instead):"
                      " answered with a binary Close, which the SDKs read")


def _tls_at_stream(peer: "_Peer") -> None:
    """``peer``'s first bytes, at a plain tcp:// listener, were a TLS
    ClientHello (``openssl s_client``, a tls:// URL), which the core refused
    with a binary Close (PROTOCOL_ERROR, "UNSUPPORTED_VERSION: protocol
    version 3": the record's version byte): its close line says what
    arrived instead, and what to do.  The Close stays: the SDKs read it to
    suggest the plain URL."""
    if peer.close_code is CloseCode.PROTOCOL_ERROR:
        scheme = peer.endpoint.scheme
        peer.ended = (f"a TLS handshake (ClientHello) at the plain {scheme}:// listener (use the tls:// listener,"
                      " or connect without TLS): answered with a binary Close, which the SDKs read")


def _not_http_answer(ep: Endpoint) -> bytes:
    """A ws:// or wss:// listener's answer to bytes that are no HTTP request
    (a tcp:// client's Login), or to an HTTP request that is no upgrade (a
    browser, curl): 400, naming the listener (the SDK suggests its URL from
    it: pimcore.client)."""
    return _listener_answer(ep, "400 Bad Request", f"it takes a WebSocket upgrade request to {ep.path} and nothing else")


def _wrong_path_answer(ep: Endpoint, path: str) -> bytes:
    """A ws:// or wss:// listener's answer to an upgrade request to ``path``,
    not its own: 404, naming both (the SDK suggests its URL from it as from
    the 400: pimcore.client)."""
    return _listener_answer(ep, "404 Not Found", f"it takes WebSocket upgrades at {ep.path} only, not {_quoted_path(path)}")


def _cut_short_answer(ep: Endpoint) -> bytes:
    """A ws:// or wss:// listener's answer to an HTTP head the client ended
    its side in (a half-close before the blank line: ``nc -N``): 400, as
    a tcp:// listener answers one, saying what was missing."""
    return _listener_answer(ep, "400 Bad Request", "the request ended before its header did (no blank line):"
                            f" it takes a WebSocket upgrade request to {ep.path} and nothing else")


def _head_too_large_answer(ep: Endpoint) -> bytes:
    """A ws:// or wss:// listener's answer to an upgrade request whose head
    is over _WS_MAX_HEAD bytes (a browser's many cookies): 431, with the
    limit."""
    return _listener_answer(ep, "431 Request Header Fields Too Large",
                            f"the upgrade request's header is over its limit of {_WS_MAX_HEAD} bytes: send a shorter one")


def _listener_answer(ep: Endpoint, status: str, what: str) -> bytes:
    """A ws:// or wss:// listener's refusal (``status``) naming it first:
    the SDK reads the path from those words (pimcore.client._WS_LISTENER)."""
    return _http_answer(status, f"this is a pimcore {ep.scheme}:// listener (path {ep.path}): {what}")


def _wrong_path_refused(ep: Endpoint, path: str) -> str:
    """The close line's reason of an upgrade to ``path``, answered 404."""
    return f"WebSocket upgrade refused (HTTP 404): path {_quoted_path(path)} is not {ep.path}"


#: The longest head of an upgrade request read: h11's own limit (its
#: max_incomplete_event_size).  At or under it, h11 never refuses a head
#: first (with a 400 that would not say why).
_WS_MAX_HEAD = 16 * 1024
#: The end of an HTTP head: a blank line (h11 takes a bare LF too).
_HEAD_END = re.compile(rb"\n\r?\n")
#: After a refusal, what the client still sends is read and dropped for
#: this long and this many bytes at the most (BrokerServer._answer_and_hang_up).
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20
#: An HTTP request line's start: what curl or a browser sends first to a
#: tcp:// or tls:// listener (a pimcore frame never starts with a letter:
#: _http_start).
_HTTP_REQUEST_LINE = re.compile(rb"(GET|POST|HEAD|PUT|DELETE|OPTIONS|PATCH) ")
#: ... but a WebSocket upgrade (a ws:// URL at a tcp:// port) keeps the
#: broker's binary Close: the SDKs read it to suggest the tcp:// URL
#: (pimcore.client, "answered the WebSocket upgrade in pimcore's binary protocol").
_WS_UPGRADE_HEADER = re.compile(rb"(?im)^upgrade:[ \t]*websocket")
#: Other starts of an HTTP request, answered as HTTP at once (never taken
#: for a WebSocket upgrade, which the SDKs send as "GET "): a proxy's
#: CONNECT, TRACE, an HTTP/2 client's connection preface ("PRI * HTTP/2.0",
#: curl --http2-prior-knowledge), and any method in lower or mixed case
#: (methods are case-sensitive: a hand-typed "get / HTTP/1.1" in nc).
_HTTP_OTHER_LINE = re.compile(rb"(?i:GET|POST|HEAD|PUT|DELETE|OPTIONS|PATCH|CONNECT|TRACE|PRI) ")
#: An HTTP/2 connection preface's start (RFC 9113 section 3.4).
_HTTP2_PREFACE = b"PRI * HTTP/2.0"
#: The method an HTTP request begins with (its close line names it).
_HTTP_METHOD = re.compile(rb"[A-Za-z]+")
#: The methods _HTTP_REQUEST_LINE knows.
_HTTP_METHODS = frozenset((b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"))
#: ... and those _HTTP_OTHER_LINE knows too.
_HTTP_ALL_METHODS = _HTTP_METHODS | {b"CONNECT", b"TRACE", b"PRI"}
#: Every start of an HTTP request line either regular expression knows, up
#: to its space, in upper case: a first read that is one of these in any
#: case ("GE", "ge", "CONN") waits for more bytes.
_HTTP_PREFIXES = frozenset(m[:i] for m in _HTTP_ALL_METHODS for i in range(1, len(m) + 1))
#: A TLS record holding a handshake message, and its version's major byte
#: (3: SSL 3.0 to TLS 1.3's record layer): a ClientHello, a TLS client at a
#: plain tcp:// listener (_tls_at_stream).
_TLS_HELLO_START = bytes((_TLS_HANDSHAKE_RECORD, 3))


def _first_bytes_kind(head: bytes) -> Optional[str]:
    """What a tcp:// (tls://) connection's first bytes ``head`` are: "http"
    (an HTTP request that is no WebSocket upgrade), "upgrade", "tls" (a
    ClientHello), "binary" (the broker's protocol: a Login), or None while
    that cannot be told yet
    -- the start of a method, or a request line whose header block has not
    ended (and had no Upgrade header so far).  The caller reads on, up to
    _WS_MAX_HEAD bytes, then decides with :func:`_first_bytes_final`."""
    if _HTTP_REQUEST_LINE.match(head) is not None:
        fields, ended = _header_block(head)
        if _WS_UPGRADE_HEADER.search(fields):
            return "upgrade"
        return "http" if ended else None
    if _HTTP_OTHER_LINE.match(head) is not None:
        return "http"
    if head.startswith(_TLS_HELLO_START):
        return "tls"  # (its bytes still go to the core, as a binary client's)
    return None if head.upper() in _HTTP_PREFIXES or head == _TLS_HELLO_START[:1] else "binary"


def _first_bytes_final(head: bytes) -> str:
    """:func:`_first_bytes_kind` once no more bytes are awaited (also at
    the client's half-close: a whole method, "GET" (or "get", "CONNECT")
    and nothing after it, is an HTTP request's start -- two letters never begin a Login, see
    _http_start -- but a method's first letters, "GE", are no request yet)."""
    if _HTTP_REQUEST_LINE.match(head) is None:
        return "http" if head.upper() in _HTTP_ALL_METHODS or _HTTP_OTHER_LINE.match(head) is not None else "binary"
    return "upgrade" if _WS_UPGRADE_HEADER.search(_header_block(head)[0]) else "http"


def _header_block(head: bytes) -> tuple[bytes, bool]:
    """(the request's head up to its blank line, whether that line came):
    an Upgrade header is looked for there only -- a body's line
    "upgrade: websocket" makes no upgrade."""
    ends = [i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0]
    return (head[: min(ends)], True) if ends else (head, False)
#: The close line's reason of bytes that are no HTTP request, answered 400.
_NOT_HTTP_ENDED = "not a WebSocket upgrade request (binary: a tcp:// client?): answered HTTP 400"
#: The close line's reason of an HTTP head cut short by a half-close, answered 400.
_CUT_SHORT_ENDED = "the client ended its side before its request's header ended (a half-close): answered HTTP 400"
#: The close line's reason of an upgrade request's head over its limit, answered 431.
_TOO_LARGE_ENDED = f"WebSocket upgrade refused (HTTP 431): its header is over {_WS_MAX_HEAD} bytes"


@dataclass(frozen=True)
class _Head:
    """The verdict on the first bytes of a ws:// or wss:// connection accepted
    at max_connections (:func:`_read_head`): what it would be below the
    limit, so that each gets the answer it gets there, and only an upgrade
    the listener would take gets the 503.  All false and None: no verdict
    (the client hung up before a byte, reset or stalled before its head's
    end)."""

    not_http: bool = False  # bytes that are no HTTP request (a tcp:// Login): 400, as _EndWatch finds them
    too_large: bool = False  # a head over _WS_MAX_HEAD bytes: 431, as _EndWatch finds it
    cut_short: bool = False  # an HTTP head the client ended its side in (a half-close): 400, as _EndWatch finds it
    #: wsproto's refusal (as trio-websocket sends it: see _said) of a head
    #: that is no WebSocket upgrade (a browser, curl; no Host; a POST...).
    rejected: Optional[bytes] = None
    target: Optional[str] = None  # an upgrade request wsproto takes: its target ("/im?x=1")


async def _read_head(stream: trio.abc.Stream) -> _Head:
    """The head of the HTTP request ``stream`` begins with, judged as below
    max_connections: the first bytes and the head's size as _EndWatch does,
    then the head as trio-websocket does (wsproto over h11: the same code,
    so the same verdict).  At most _WS_MAX_HEAD + 1 bytes are read: one
    more says it is over.  What follows the head stays unread (the caller
    drains it: _answer_and_hang_up); the caller bounds the time."""
    head = bytearray()  # (grown in place: a client sending a byte at a time costs no copies)
    while True:
        try:
            data = await stream.receive_some(_WS_MAX_HEAD + 1 - len(head))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return _Head()  # (a reset, a failed TLS handshake)
        if not data:
            # (After bytes: they began an HTTP request, as checked below.)
            return _Head(cut_short=bool(head))
        # (Each read is scanned once, with the 2 bytes before it: the blank
        # line may straddle two reads.)
        scanned = max(0, len(head) - 2)
        head += data
        if not _http_start(bytes(head[:2])):
            return _Head(not_http=True)
        end = _HEAD_END.search(head, scanned)
        if end is not None:
            if end.end() > _WS_MAX_HEAD:
                return _Head(too_large=True)
            break
        if len(head) > _WS_MAX_HEAD:
            return _Head(too_large=True)
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(bytes(head[:end.end()]))
    except RemoteProtocolError as exc:
        # (wsproto gives each refusal of a handshake its answer.)
        return _Head(rejected=ws.send(exc.event_hint or RejectConnection()))
    except UnicodeError:
        # A header wsproto cannot decode ("Host: xn--zz"): a malformed
        # upgrade request, as _serve_ws takes it below the limit.
        return _Head(rejected=ws.send(RejectConnection()))
    for event in ws.events():
        if isinstance(event, Request):
            return _Head(target=event.target)
    return _Head()  # (h11 wants more: not after a blank line)


#: The scheme and authority of a request target in absolute form (RFC 9112
#: section 3.2.2: "http://127.0.0.1:7401" before "/im"), what a proxy sends.
_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def _path_of(target: str) -> str:
    """The path of an upgrade request's target, the part before any "?": a
    browser or an SDK may add a query string (ws://host:port/im?x=1) to the
    listener's URL, and it is ignored, as an HTTP server ignores a query
    its resource does not take.  So are the scheme and host of a target in
    absolute form (http://host:port/im: a proxy's), as a server takes it
    (RFC 9112 section 3.2.2): whichever host it names reached this
    listener.  Its empty path is "/" (RFC 9110 section 4.2.3)."""
    absolute = _ABSOLUTE_FORM.match(target)
    if absolute is not None:
        target = target[absolute.end():]
        if not target.startswith("/"):
            target = "/" + target
    return target.partition("?")[0]


#: The longest requested path echoed in full (_quoted_path).
_QUOTED_PATH_MAX = 60


def _quoted_path(path: str) -> str:
    """A path a client asked for, fit to echo in an answer or a log line:
    anything but printable ASCII percent-encoded (as UTF-8), cut after
    _QUOTED_PATH_MAX characters with "..."."""
    quoted = "".join(c if "!" <= c <= "~" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "replace"))
                     for c in path[:_QUOTED_PATH_MAX + 1])
    return quoted if len(quoted) <= _QUOTED_PATH_MAX else quoted[:_QUOTED_PATH_MAX] + "..."


def tls_server_stream(sock: trio.SocketStream, ssl_context: ssl.SSLContext, *, peer: Optional[str] = None,
                      **kw: Any) -> trio.SSLStream:
    """The server side of TLS over an accepted ``sock``, for the tls:// and
    wss:// listeners and the HTTP server's https:// (``peer``: its address
    if known already; ``kw``: SSLStream's)."""
    return trio.SSLStream(_Transport(sock, peer), ssl_context, server_side=True, **kw)


def _tls_reason(exc: BaseException) -> str:
    """ssl's reason for a failed handshake, in words ("wrong version
    number", "tlsv1 alert unknown ca"), from the error trio wraps."""
    # (Raised "from None": its own words, not what it replaced.)
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__) or exc
    if isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "the client hung up during the handshake (does it trust the certificate?)"
    if isinstance(cause, ssl.SSLError):
        text = str(cause.args[1]) if len(cause.args) > 1 else str(cause)
        text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[SSL: WRONG_VERSION_NUMBER] "
        text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)  # " (_ssl.c:1006)"
        return text or (cause.reason or "").lower().replace("_", " ") or "TLS error"
    if isinstance(cause, OSError):
        return cause.strerror or str(cause) or type(cause).__name__
    return str(cause) or "connection closed"


def tls_handshake_failed(stream: trio.abc.Stream, exc: BaseException, *, conn: int, transport: str,
                         logger: logging.Logger = log) -> bool:
    """If ``exc`` ended ``stream``'s TLS handshake (a :class:`trio.SSLStream`
    that never completed one): log it at info -- event ``tls_failed`` with
    ``conn``, the peer, ssl's reason and ``transport`` (tls, wss, https) --
    and return True, for the caller to count it (once per connection).
    Shared by the tls:// and wss:// listeners and the HTTP server's https://.

    A connection closed before sending a byte (a load balancer's TCP health
    check) began no handshake: it is a debug line (event ``tls_silent``),
    and False -- not counted."""
    if not isinstance(stream, trio.SSLStream):
        return False
    try:
        stream.version()
        return False  # the handshake completed: a later failure
    except trio.NeedHandshakeError:
        pass
    addr = _peer_address(stream)
    under = stream.transport_stream
    if isinstance(under, _Transport) and not under.received:
        logger.debug("connection closed before sending a byte (no TLS handshake) conn=%d peer=%s via %s",
                     conn, addr, transport, extra={"event": "tls_silent", "conn": conn, "peer": addr, "transport": transport})
        return False
    reason = _tls_reason(exc)
    logger.info("TLS handshake failed conn=%d peer=%s via %s: %s", conn, addr, transport, reason,
                extra={"event": "tls_failed", "conn": conn, "peer": addr, "reason": reason, "transport": transport})
    return True


class ListenError(OSError):
    """A listener could not be opened; the message names it (its str is the
    message alone, without "[Errno N]")."""

    def __str__(self) -> str:
        return str(self.strerror)


async def open_listeners(ep: Endpoint, name: Optional[str] = None) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners`` for ``ep``, with an OSError (ListenError)
    that names the listener: ``name`` (e.g. ``http://127.0.0.1:7481``), else
    ``ep``'s URL -- the bare error says only "Address already in use"."""
    try:
        return await trio.open_tcp_listeners(ep.port, host=ep.host)
    except OSError as exc:
        why = exc.strerror or str(exc)
        why = why[:1].lower() + why[1:]
        raise ListenError(exc.errno, f"cannot listen on {name or ep.url}: {why}") from None


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """A snapshot of :meth:`BrokerServer.statistics`."""

    accepted: int  # connections accepted on any listener, at accept (before any handshake; refused ones too)
    refused: int  # connections refused at max_connections (Close OVERLOADED)
    slow_consumers: int  # connections dropped for not reading (Close SLOW_CONSUMER)
    internal_errors: int  # bugs and unexpected store or hook failures, each contained
    bytes_in: int
    bytes_out: int
    commit_seconds: float  # time spent in write requests (s)
    outbound_bytes_queued: int  # bytes waiting for slow readers now
    broker: BrokerStatistics  # the core's counters
    #: Close frames the broker sent, by close code name (refusals at
    #: max_connections count as OVERLOADED).
    closes: dict[str, int] = field(default_factory=dict)
    #: Refused logins (Close AUTH_FAILED) by kind of reason (see _auth_failure_kind).
    auth_failures: dict[str, int] = field(default_factory=dict)
    batch_ops: Optional[HistogramSnapshot] = None  # ops per committed batch
    commit_time: Optional[HistogramSnapshot] = None  # seconds per write request
    #: Connections to a tls:// or wss:// listener whose TLS handshake failed
    #: (a client that does not trust the certificate, plain TCP or ws:// to
    #: a TLS port...), not one closed before its first byte (a health
    #: check).  (The HTTP server counts its https:// ones itself.)
    tls_handshake_failures: int = 0


class _PeerState(enum.Enum):
    OPEN = 1
    CLOSING = 2  # the core closed it: flush what is queued (ending in Close), then hang up
    DEAD = 3  # the transport is gone; nothing more is written


class _Peer:
    """One connection of the network layer.

    What an idle connection costs matters (issue 13: 19,000 of them at <= 10
    KiB each, kernel and allocator included), so it is one task (its reader,
    in the nursery that ``scope`` cancels; parked while the poller reads a
    plain-TCP connection for it) and nothing eager: the writer task runs
    only while bytes wait that could not be written at once (see
    _flush/_wake_writer), and no Event exists unless reading is paused.
    """

    __slots__ = ("id", "stream", "endpoint", "buf", "queued", "state", "scope", "nursery", "writer", "resume", "fd",
                 "sending", "tls_failed", "close_code", "ended", "parked", "gone", "opaque")

    def __init__(self, conn_id: int, stream: trio.abc.Stream, endpoint: Endpoint) -> None:
        self.id = conn_id
        self.stream = stream
        self.endpoint = endpoint
        self.buf: list[bytes] = []
        self.queued = 0
        self.state = _PeerState.OPEN
        # The connection's nursery (the reader is its body, the writer a
        # child while it runs) and its cancel scope: cancelled ends the
        # connection; its deadline bounds a Close's flush.  None before the
        # nursery opens and after it closed.
        self.scope: Optional[trio.CancelScope] = None
        self.nursery: Optional[trio.Nursery] = None
        self.writer = False  # a writer task is running (started by _wake_writer)
        self.tls_failed = False  # its TLS handshake failed (logged and counted once)
        # Why it ended, for its close line (BrokerServer._ended): the Close
        # the broker sent (code, reason), else what ended it (code None).
        self.close_code: Optional[CloseCode] = None
        self.ended: Optional[str] = None
        # Set while the core asked not to read (PauseReading); set() resumes.
        self.resume: Optional[trio.Event] = None
        # Plain TCP only: the socket's fd, for writing straight from the
        # command loop while no writer task is sending (see _flush).
        self.fd = stream.socket.fileno() if type(stream) is trio.SocketStream else -1
        self.sending = False  # the writer task is inside send_all
        # Its reader task while parked for the poller (BrokerServer._poller
        # reads the connection); ``gone`` set when the poller found it ended
        # (EOF, a broken socket) and handed it back.
        self.parked: Optional[trio.lowlevel.Task] = None
        self.gone = False
        # Read by its own task, out of the readiness probe's sight (TLS,
        # WebSocket, or a socket the probe refused): counted in
        # BrokerServer._opaque_peers while it is served.
        self.opaque = False


#: Scheduler passes a held batch waits at most for readers with bytes
#: waiting (BrokerServer._releaser).
_HOLD_PASSES = 2
#: Most sockets the poller takes from the probe per look (epoll maxevents).
_POLL_MAX = 1024
#: A reader holds the next batch only when at least this many sockets have
#: bytes waiting.  Measured (BENCHMARKS.md, "One batch for the connections
#: that have bytes waiting"): with one (e2e 1 x 64: the recipient's acks
#: waiting behind the sender's read) the pass the hold costs was dearer than
#: the small batch it saved.
_HOLD_MIN_WAITING = 2


class BrokerServer:
    """A broker serving the configured listeners.  Use :func:`open_broker_server`."""

    def __init__(
        self,
        store: Union[Store, AsyncStore],
        authenticate: Union[Authenticator, Callable[[bytes, int], Awaitable[Identity]]],
        config: ServerConfig = ServerConfig(),
        *,
        clock: Optional[Callable[[], int]] = None,
        node_id: Optional[bytes] = None,
    ) -> None:
        self.store = store
        self.config = config
        self._node_id = node_id
        self._async_store = isinstance(store, AsyncStore)
        # A synchronous store is asked for the clock floor now; an async one
        # when the server runs (run() awaits it before listening).
        self.broker: Broker = None  # type: ignore[assignment]
        # The core keeps the outbound limits (it counts what each connection
        # holds, and pauses its reading first); max_outbound_bytes is its hard one.
        self._broker_config = replace(
            config.broker, max_outbound=config.max_outbound_bytes,
            outbound_pause=min(config.broker.outbound_pause, config.max_outbound_bytes // 2),
        )
        # The moderation webhook (pimcore.webhooks), asked by this layer.  The
        # core emits CheckContent only when a content filter is set: with
        # moderation alone it gets one that lets everything through, and the
        # answer comes from _check_content_async.
        self.moderator: Any = None
        if config.moderation is not None:
            from ..webhooks import Moderator

            self.moderator = Moderator(config.moderation)
            if config.broker.content_filter is None:
                self._broker_config = replace(self._broker_config, content_filter=_let_through)
        #: The event webhook sender reading this broker's events, if any
        #: (set by whoever runs one: pimcore.embed.open_pimcore, pimcore serve).
        self.webhook_sender: Any = None
        if not isinstance(store, AsyncStore):
            self.broker = Broker(
                self._broker_config,
                node_id=node_id or store.node_id(),
                last_server_time=store.last_server_time(),
                epoch=store.epoch(),
                trusted_epochs=store.epochs(),
            )
        self._authenticate = authenticate
        self._auth_is_async = inspect.iscoroutinefunction(authenticate) or inspect.iscoroutinefunction(
            getattr(authenticate, "__call__", None)
        )
        hook = config.broker.content_filter
        self._filter_is_async = hook is not None and (
            inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(getattr(hook, "__call__", None))
        )
        # The clock: µs since the epoch.  By default a WallClock, which
        # reports its steps to the core (Broker.clock_stepped), so a wall
        # clock set back or forward keeps every timeout at its real length;
        # a clock passed in is used as it is (a test's, a host's own).
        if clock is None:
            clock = WallClock()
        if isinstance(clock, WallClock) and clock.on_step is None:
            clock.on_step = self._clock_stepped
        self._clock = clock
        self._ssl = config.make_ssl_context()
        self._peers: dict[int, _Peer] = {}
        self._dirty: list[_Peer] = []  # peers given bytes by the current _run
        self._ids = itertools.count(1)
        self._commit_send, self._commit_recv = trio.open_memory_channel[StoreRequest](math.inf)
        self._commit_idle = trio.Event()
        self._commit_idle.set()
        # Set (and replaced by a fresh one) whenever a write batch committed:
        # what a host event reader that is caught up waits for.
        self._committed = trio.Event()
        # Why the store refuses writes (the last failed write's StoreError),
        # until a write succeeds again: /readyz is 503 meanwhile.  A store
        # error is logged once per change of its text (_store_error), the
        # repeats at DEBUG and counted here.
        self._store_failing: Optional[str] = None
        #: ... and its cause without paths, if the store said it (StoreError.cause).
        self._store_cause: Optional[str] = None
        self._store_logged: Optional[str] = None
        self._store_repeats = 0
        #: The readiness probe's last store error logged (_log_probe_failure).
        self._probe_logged: Optional[str] = None
        # Work the core asked for that runs as a task (async reads, async
        # hooks); started once run() has a nursery.
        self._tasks: Optional[trio.Nursery] = None
        self._later: deque[tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]] = deque()
        # The timer task sleeps in this scope; its deadline (trio time) is
        # the core's next deadline, moved earlier in place when the core names
        # an earlier one -- no task switch until it is due.
        self._timer_scope: Optional[trio.CancelScope] = None
        self._running = False  # inside _run: commands it causes are queued, not nested
        self._queue: deque[Command] = deque()
        self._admin_refs = itertools.count(1)
        self._presence: Any = None  # logins to record in a shared store (cluster)
        self._typing_out: Any = None  # TypingElsewhere to push to the other nodes (cluster)
        self._admin_waiters: dict[int, list[Any]] = {}  # ref -> [Event, result]
        if config.commit_in_thread and self._async_store:
            raise ValueError("commit_in_thread is for synchronous stores")
        if config.commit_in_thread and not getattr(store, "thread_safe_commit", False):
            raise ValueError(f"commit_in_thread: {type(store).__name__} commits are not thread-safe")
        self._commit_in_thread = config.commit_in_thread
        # Deferred LMDB commits (log durability): on while run() runs.
        self._deferring = False
        self._defer_wake = trio.Event()
        # Inline commit (a synchronous store committing on the event loop):
        # a write request that a plain-TCP read caused runs right there, in
        # the reader (see _inline_ok), instead of going through the
        # committer task (a channel hop and one more scheduler round per
        # batch) -- but only when no connection has
        # bytes waiting to be read, so group commit is kept: then the request
        # takes the hop, and the readers that run before the committer fill
        # the next batch as before.  "Bytes waiting" comes from a private,
        # level-triggered epoll of every plain-TCP connection's socket
        # (trio's own is one-shot: polling it would steal its events); any
        # other stream (TLS, WebSocket, serve_stream of a non-socket) turns
        # inline commit off while it is connected.  Closed when run() ends
        # (_close_probe), not left to the collector: a host that opens and
        # closes servers held one epoll fd per server it still referenced.
        self._ready_probe: Any = None
        if not self._async_store and not config.commit_in_thread and hasattr(select, "epoll"):
            self._ready_probe = select.epoll()
        self._opaque_peers = 0  # connections the probe cannot see
        # Group commit across the connections that have bytes waiting: a
        # reader that finds the store idle and other bytes waiting holds the
        # core's next batch (Broker.hold_batches) until the readers that
        # can run have run; _releaser then lets it start, as one batch.
        self._holding = False
        self._release_wake = trio.Event()
        # One reader for every plain-TCP connection with the probe (see
        # _poller): fd -> the connection, while its own task is parked.
        self._polled: dict[int, _Peer] = {}
        # True only while a plain-TCP reader runs the core's commands: host
        # calls (the HTTP API, host_calls' list) and the timer take the hop,
        # so that calls made together still share a batch.
        self._inline_ok = False
        self._endpoints: list[Endpoint] = []
        self._listen_scope = trio.CancelScope()
        # ws:// and wss:// connections still in their handshakes (TLS, the
        # upgrade): not in _peers yet; shutdown() cancels them.
        self._handshakes: set[trio.CancelScope] = set()
        # How many ws:// and wss:// connections are between accept and
        # _serve_peer (their handshakes): they count against max_connections
        # from accept, as tcp:// and tls:// ones do (see _full).
        self._upgrading = 0
        self._stopping = False
        self._drained: Optional[trio.Event] = None  # set by shutdown(): see run()
        self._stats = {
            "accepted": 0,
            "refused": 0,
            "slow_consumers": 0,
            "internal_errors": 0,
            "tls_handshake_failures": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "commit_seconds": 0.0,
        }
        self._closes: dict[str, int] = {}
        self._auth_failures: dict[str, int] = {}
        self._batch_ops = _Histogram(BATCH_OPS_BUCKETS)
        self._commit_time = _Histogram(COMMIT_SECONDS_BUCKETS)

    # ------------------------------------------------------------ public

    @property
    def endpoints(self) -> list[Endpoint]:
        """Where the broker listens, with the real ports (after port 0)."""
        return list(self._endpoints)

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self._endpoints]

    def url(self, scheme: str = "tcp") -> str:
        for e in self._endpoints:
            if e.scheme == scheme:
                return e.url
        raise LookupError(f"no {scheme} listener")

    def statistics(self) -> ServerStatistics:
        """A snapshot: the network layer's counters and the core's."""
        st = self._stats
        return ServerStatistics(
            accepted=int(st["accepted"]),
            refused=int(st["refused"]),
            slow_consumers=int(st["slow_consumers"]),
            internal_errors=int(st["internal_errors"]),
            bytes_in=int(st["bytes_in"]),
            bytes_out=int(st["bytes_out"]),
            commit_seconds=float(st["commit_seconds"]),
            outbound_bytes_queued=sum(p.queued for p in self._peers.values()),
            broker=self.broker.statistics(),
            closes=dict(self._closes),
            auth_failures=dict(self._auth_failures),
            batch_ops=self._batch_ops.snapshot(),
            commit_time=self._commit_time.snapshot(),
            tls_handshake_failures=int(st["tls_handshake_failures"]),
        )

    def readiness(self) -> Optional[str]:
        """None when the broker accepts work (running, listening, store
        open, its last write did not fail), else why not (for ``/readyz``).
        Probes a synchronous store with a cheap in-memory call; an AsyncStore
        is taken as open."""
        if self._stopping:
            return "shutting down"
        # A broker configured without listeners (embedded: host posts, the
        # HTTP API, serve_stream) is ready once running.
        if self.broker is None or len(self._endpoints) < len(self.config.listeners):
            return "not listening yet"
        # (/readyz needs no API key: a store's error is said by its kind,
        # or by its cause without the data directory's path when the store
        # said one (StoreError.cause); the operator's log has it whole.)
        if not self._async_store:
            try:
                self.store.epoch()  # type: ignore[union-attr]
            except Exception as exc:  # (another exception: a store bug, not readiness either)
                self._log_probe_failure(exc)
                if isinstance(exc, StoreError):
                    return f"store unavailable: {exc.cause or _probe_kind(exc)}"
                return f"store unavailable: the store raised {type(exc).__name__} (the broker's log says why)"
        self._probe_logged = None
        if self._store_failing is not None:
            return f"store failing writes: {self._store_cause or _WRITE_FAILED}"
        if not self._async_store:
            # (A disk (nearly) full: not ready, whatever the last write did.)
            short = getattr(self.store, "short_of_space", None)
            why = short() if short is not None else None
            if why is not None:
                return f"store short of space: {why}"
        return None

    def _log_probe_failure(self, exc: Exception) -> None:
        """The readiness probe's store error, whole, for the operator: once
        per change of its text (a probe asks every few seconds)."""
        text = f"{type(exc).__name__}: {exc}"
        if text != self._probe_logged:
            self._probe_logged = text
            log.error("readiness: the store did not answer: %s", text, extra={"event": "store_error"})

    def liveness(self) -> Optional[str]:
        """None while the broker can serve again without a restart, else
        why not (for ``/healthz``): the store says it writes no more until
        the process restarts (:meth:`Store.halted`; a full disk that
        recovers by itself is only not ready)."""
        halted = getattr(self.store, "halted", None)
        if halted is None:
            return None
        try:
            return halted()  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001 - a store bug is no reason to be restarted over and over
            return None

    def store_failure_cause(self) -> Optional[str]:
        """Why the store refuses writes, in words without file system paths
        (StoreError.cause: "no space left on the data directory's file
        system: ..."), while it does and the store said; else None."""
        return self._store_cause if self._store_failing is not None else None

    def now(self) -> int:
        """µs since the epoch, by the broker's clock (see ``clock``)."""
        return self._clock()

    def _clock_stepped(self, step: int) -> None:
        # Called by the default WallClock from within now(), so always
        # between two calls into the core (now() is read before each).
        log.warning("the wall clock was stepped %s by %.3f s: timeouts and rate limits keep their real length",
                    "forward" if step > 0 else "back", abs(step) / SECOND,
                    extra={"event": "clock_step", "step_us": step})
        if self.broker is not None:
            self.broker.clock_stepped(step)

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.broker is None:
            store: AsyncStore = self.store  # type: ignore[assignment]
            node_id = self._node_id or await store.node_id()
            self.broker = Broker(
                self._broker_config,
                node_id=node_id,
                last_server_time=await store.last_server_time(),
                epoch=await store.epoch(),
                trusted_epochs=await store.epochs(),
            )
        try:
            async with trio.open_nursery() as nursery:
                self._tasks = nursery
                while self._later:
                    fn, args = self._later.popleft()
                    nursery.start_soon(fn, *args)
                nursery.start_soon(self._committer)
                if not self._async_store and self._has_retention():
                    # Before the timer task asks for the first deadline.
                    self._run(self._core(self.broker.retention_in_use))
                nursery.start_soon(self._timer)
                if self._ready_probe is not None:
                    nursery.start_soon(self._releaser)
                    nursery.start_soon(self._poller)
                defer = (getattr(self.store, "defer_commits", None)
                         if not self._async_store and not self._commit_in_thread else None)
                if defer is not None and defer(True, on_open=self._deferred_opened):
                    # (The store is LMDB with durability log: see _deferred.)
                    self._deferring = True
                    nursery.start_soon(self._deferred)
                cluster = getattr(self.store, "cluster", None) if self._async_store else None
                if cluster is not None:
                    # Several nodes share the store (RedisStore): hints from the
                    # others (inbox heads, devices logged in elsewhere), and this
                    # node's logins recorded in order.
                    self._presence, presence = trio.open_memory_channel[tuple[str, str, str, int]](math.inf)
                    nursery.start_soon(self._presence_writer, cluster, presence)
                    # Typing and presence across nodes (issue 16): the core hands
                    # on relayed Typing frames; watched users are re-read.
                    self.broker.relay_elsewhere = True
                    self._typing_out, typing_out = trio.open_memory_channel[TypingElsewhere](1000)
                    nursery.start_soon(self._typing_writer, cluster, typing_out)
                    nursery.start_soon(self._presence_recheck, cluster)
                    await nursery.start(cluster.hints, self._cluster_hint)
                async with trio.open_nursery() as peers:
                    with self._listen_scope:
                        async with trio.open_nursery() as listeners:
                            for ep in self.config.listeners:
                                await listeners.start(self._listen, ep, peers)
                            task_status.started()
                        # No listener (an embedder's choice): the listeners
                        # nursery ended at once; the committer and the timer
                        # must still run until shutdown cancels this scope.
                        await trio.sleep_forever()
                    # Listeners stopped (shutdown): the peers nursery ends when
                    # every connection has been closed by shutdown().
                if self._drained is not None:
                    # shutdown() still drains the last-seen writes the closes
                    # proposed (and any commit past its deadline): the
                    # committer must outlive the connections (which end as
                    # soon as their Close is flushed, or at once when none
                    # came through a listener) -- cancelled here first, the
                    # drain waited on a committer that was gone.
                    await self._drained.wait()
                nursery.cancel_scope.cancel()
        finally:
            # First: nothing below may skip it.  Every task that polls the
            # probe (the poller, the releaser, the connections' readers) ran
            # in the nursery, which has ended.
            self._close_probe()
            if self._deferring:
                self._deferring = False
                try:
                    self.store.defer_commits(False)  # type: ignore[union-attr]
                except StoreError as exc:
                    # (The batches are in the command log: the next start replays them.)
                    log.error("deferred commit failed at shutdown: %s", exc, extra={"event": "store_error"})
            self._stop_waiters()
        if self.moderator is not None:
            with trio.CancelScope(shield=True):
                await self.moderator.aclose()

    async def shutdown(self, reason: str = "broker shutting down", timeout: float = 5.0) -> None:
        """Stop accepting, let the in-flight batch commit (its acks go out),
        then close every connection with ``SHUTDOWN``."""
        if self._stopping:
            return
        self._stopping = True
        drained = self._drained = trio.Event()  # run() keeps the committer until set
        try:
            self._listen_scope.cancel()
            # Connections still in their handshakes are dropped (they would hold
            # run() up to login_timeout): no Close can be sent before them anyway.
            for scope in list(self._handshakes):
                scope.cancel()
            # The readers stop: each gives the core nothing more once it wakes
            # (_reader checks _stopping); one waiting for bytes stays asleep.
            deadline = trio.current_time() + timeout
            # Whatever was received before the readers stopped is committed and
            # acknowledged; nothing new arrives.
            await self._drain_commits(deadline)
            self._close_all_by_server(CloseCode.SHUTDOWN, reason)
            # Closing recorded each device's last-seen time (TouchDevice, lazy
            # like an ack): committed too, or a peer's "last seen" after the
            # restart was its login, long before the broker went down.  They get
            # the Close frames' flush window as well as what is left of
            # ``deadline``: a write still in flight at the deadline (a worker
            # thread's, an async store's already sent) cannot be called back and
            # commits after it, and only then can these go -- with the deadline
            # alone they never did.  (A shutdown whose store never answers
            # takes that window longer than before: at most close_timeout +
            # 0.5 s past ``timeout``, as the Close frames could already.)
            flushed_by = trio.current_time() + self.config.close_timeout + 0.5
            await self._drain_commits(max(deadline, flushed_by))
            drained.set()
            # Give the writers time to flush the Close frames (each connection
            # ends itself once flushed, or after close_timeout).
            with trio.move_on_at(flushed_by):
                while self._peers:
                    await trio.sleep(0.01)
        finally:
            drained.set()  # (idempotent; an error must not hold run() up)

    async def _drain_commits(self, deadline: float) -> None:
        """Commit what the core holds (lazy ops too) until nothing is
        pending or in flight, or ``deadline`` (trio time) passes."""
        with trio.move_on_at(deadline):
            while self.broker.statistics().batch_in_flight or self.broker.statistics().pending_ops:
                self._run(self.broker.flush(self.now()))  # delivery acks too
                await self._commit_idle.wait()
                await trio.sleep(0)

    # ------------------------------------------------------------ listeners

    async def _listen(self, ep: Endpoint, peers: trio.Nursery, *, task_status: trio.TaskStatus[None]) -> None:
        if ep.websocket:
            await self._listen_ws(ep, peers, task_status=task_status)
            return
        listeners = await open_listeners(ep)
        sock = listeners[0].socket
        host, port = sock.getsockname()[:2]
        self._endpoints.append(Endpoint(ep.scheme, ep.host, port, ep.path))
        url = self._endpoints[-1].url
        log.info("listening on %s", url, extra={"event": "listening", "url": url})
        task_status.started()
        ssl_ctx = self._ssl if ep.secure else None

        async def handler(accepted: _Accepted) -> None:
            conn_id = self._connected(ep, accepted.peer)
            s: trio.abc.Stream = accepted.stream
            if ssl_ctx is not None:
                s = tls_server_stream(accepted.stream, ssl_ctx, peer=accepted.peer)
            await self._serve_peer(s, ep, conn_id, addr=accepted.peer)

        await trio.serve_listeners(handler, [_AddressedListener(x, url) for x in listeners], handler_nursery=peers)

    async def _listen_ws(self, ep: Endpoint, peers: trio.Nursery, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await open_listeners(ep)
        port = listeners[0].socket.getsockname()[1]
        self._endpoints.append(Endpoint(ep.scheme, ep.host, port, ep.path))
        url = self._endpoints[-1].url
        log.info("listening on %s", url, extra={"event": "listening", "url": url})
        task_status.started()
        # (Served with its real port, after port 0: the 503 names it.)
        await trio.serve_listeners(functools.partial(self._serve_ws, self._endpoints[-1]),
                                   [_AddressedListener(x, url) for x in listeners],
                                   handler_nursery=peers)

    async def _serve_ws(self, ep: Endpoint, accepted: _Accepted) -> None:
        """One ws:// or wss:// connection: its TLS handshake (wss), the
        WebSocket one (trio-websocket), then :meth:`_serve_peer`.

        The TLS handshake is done here, not left to trio-websocket's reader
        (which would swallow its failure: a plain ws:// client on a wss://
        port, or an untrusted certificate, would leave no trace), so that a
        failed one is logged and counted as on a tls:// listener.

        The connection is numbered, counted and its ``connect`` line logged
        at accept, as on tcp:// and tls:// (a failed handshake's line
        follows it, with the same number and address); one that ends before
        its upgrade has its close line here, the others in _serve_peer."""
        sock, addr = accepted.stream, accepted.peer
        conn_id = self._connected(ep, addr)
        if self._full() and not self._stopping:
            await self._refuse_ws(ep, sock, conn_id, addr)
            return
        # It holds one of max_connections from here: _serve_peer takes it
        # over, or the finally below gives it back, however it ends.
        self._upgrading += 1
        upgrading = True
        ended: Optional[str] = None  # why it ended before its upgrade, for its close line
        # A refusal went out in the WebSocket handshake (trio-websocket's 400,
        # our 404): once its reader is done, _answer_and_hang_up ends it
        # (no reset overtaking the answer: see _EndWatch).
        linger = False
        # Peers split writes into messages of up to MAX_PEER_MESSAGE whatever the
        # frame limit (frames span messages); the frame limit is the decoder's.
        max_msg = max(self.config.broker.limits.max_frame, WebSocketStream.MAX_PEER_MESSAGE) + 16
        # ... but until the login, a message is held to the pre-login limit
        # (the core's, PRE_LOGIN_MAX_FRAME; peers' messages are no larger):
        # gathered up to max_frame before the core sees a byte, a client
        # that never logs in made the broker hold ~1 MiB (raised at
        # DeviceOnline: WebSocketStream.logged_in).
        pre_login_msg = min(max_msg, max(PRE_LOGIN_MAX_FRAME, WebSocketStream.MAX_PEER_MESSAGE) + 16)
        stream: trio.abc.Stream = sock
        ws = None
        try:
            async with trio.open_nursery() as nursery:  # the WebSocket's reader task
                request: Optional[WebSocketRequest] = None
                # Its handshakes (TLS, then the upgrade) within login_timeout,
                # as a tcp:// connection must log in within it: a silent
                # client does not hold a connection longer here.
                # shutdown() cancels them too (they would hold it that long).
                with trio.move_on_after(self.config.broker.login_timeout / SECOND) as handshakes:
                    self._handshakes.add(handshakes)
                    if self._stopping:
                        handshakes.cancel()  # accepted as shutdown began
                    if ep.secure and self._ssl is not None:
                        stream = tls_server_stream(sock, self._ssl, peer=addr, https_compatible=True)
                    watch = _EndWatch(stream, _not_http_answer(ep))
                    # The client hanging up ends the wait for its request at
                    # once (not at login_timeout: see _Transport) -- the wait
                    # only.  A request whose end came with the client's
                    # (shutdown(SHUT_WR) at once: nc -N) is still answered,
                    # its 404 or 101 as after a pause: a half-close ends the
                    # request, not the client's reading (it got no byte).
                    waiting = trio.CancelScope()
                    watch.on_end = waiting.cancel
                    try:
                        try:
                            with waiting:
                                if isinstance(stream, trio.SSLStream):
                                    await stream.do_handshake()
                                request = await wrap_server_websocket(nursery, watch, max_message_size=pre_login_msg)
                            watch.on_end = None
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                            ended = _why_lost(stream, exc)
                            if tls_handshake_failed(stream, exc, conn=conn_id, transport=ep.scheme):
                                self._stats["tls_handshake_failures"] += 1
                            else:
                                log.debug("%s connection %d broken before its handshake: %r", ep.scheme, conn_id, exc)
                        if request is not None:
                            try:
                                if _path_of(request.path) != ep.path:
                                    ended = _wrong_path_refused(ep, request.path)
                                    # Said by the watch, as its 400 is (the body
                                    # names the path: the SDK turns it into a URL).
                                    watch.refusal = _wrong_path_answer(ep, request.path)
                                    await request.reject(404)
                                    linger = True
                                else:
                                    ws = await request.accept()
                                    watch.refusal = b""
                                    watch.keep_open = False
                                    watch.ws = ws
                            except ConnectionClosed as exc:
                                # The client reset before our answer went out: this
                                # connection ends here (escaping, it would end the
                                # broker -- every client could do that).
                                ended = "the client hung up during its WebSocket upgrade"
                                log.debug("%s connection %d closed during its upgrade: %r", ep.scheme, conn_id, exc)
                    finally:
                        watch.on_end = None
                        self._handshakes.discard(handshakes)
                if (watch.not_http or watch.too_large or watch.cut_short) and ended is None and not self._stopping:
                    if watch.not_http:
                        ended, answer = _NOT_HTTP_ENDED, _not_http_answer(ep)
                    elif watch.cut_short:
                        ended, answer = _CUT_SHORT_ENDED, _cut_short_answer(ep)
                    else:
                        ended, answer = _TOO_LARGE_ENDED, _head_too_large_answer(ep)
                    await self._answer_and_hang_up(stream, answer)
                if (handshakes.cancelled_caught or waiting.cancelled_caught) and ws is None and ended is None:
                    ended = ("broker shutting down" if self._stopping
                             else "WebSocket upgrade refused (HTTP 400): a malformed upgrade request" if watch.closed
                             else "the client hung up before its WebSocket upgrade" if watch.ended
                             else "handshakes not done within login_timeout")
                    log.debug("%s connection %d: handshakes not done in time (or shutdown)", ep.scheme, conn_id)
                if ws is not None:
                    self._upgrading -= 1  # (no checkpoint before _serve_peer counts it in _peers)
                    upgrading = False
                    await self._serve_peer(WebSocketStream(ws, max_msg), ep, conn_id, addr=addr)
                elif watch.closed:
                    linger = True  # (its 400 sent: the reader ended itself)
                nursery.cancel_scope.cancel()  # closed (or never opened): the reader ends
            if linger and not self._stopping:
                # (Out of the nursery: no reader left, the stream is ours to read.)
                await self._answer_and_hang_up(stream, b"")
            elif ws is not None and (close := watch.protocol_close()):
                # A WebSocket protocol error's Close (_EndWatch.protocol_close),
                # then the linger of a refusal, so that no reset overtakes it.
                # (Shutting down: the Close only, within 1 s.)
                watch.close_sent = True
                if not self._stopping:
                    await self._answer_and_hang_up(stream, close)
                else:
                    with trio.move_on_after(1):
                        try:
                            await stream.send_all(close)
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            pass
        except BaseExceptionGroup as group:
            # trio-websocket's reader task fails with the peer: answering a
            # malformed upgrade request with 400 to a client that reset
            # already raises ConnectionClosed out of this nursery.  That is
            # this connection's end, never the broker's (escaping, it ended
            # the broker: any client could do it).  Anything else goes on.
            _, rest = group.split(_PEER_GONE)
            undecodable = None
            if rest is not None and ws is None:
                # wsproto (1.3) decodes an upgrade request's Host as IDNA and
                # its Connection, Sec-WebSocket-Protocol... headers as ASCII,
                # and their failure ("Host: xn--zz", a byte 0xff) is a
                # UnicodeError, not the RemoteProtocolError that trio-websocket
                # answers 400: it left the reader task, and ended the broker
                # (one request of anyone's could).  Before the upgrade only
                # that handshake runs here: it is a malformed upgrade
                # request, answered as one with no Host is (nothing was sent).
                undecodable, rest = rest.split(UnicodeError)
            if rest is not None:
                raise rest from None
            if undecodable is not None:
                ended = "WebSocket upgrade refused (HTTP 400): a malformed upgrade request"
                await self._answer_and_hang_up(stream, _not_http_answer(ep))
            elif ended is None:
                ended = f"connection lost: {_tls_reason(first_leaf(group))}"
        finally:
            if upgrading:
                self._upgrading -= 1
            if ws is None:
                self._ended(conn_id, None, ended or "ended before its WebSocket upgrade")
            await trio.aclose_forcefully(stream)

    async def _refuse_ws(self, ep: Endpoint, sock: trio.SocketStream, conn_id: int, addr: str) -> None:
        """A ws:// or wss:// connection accepted at max_connections: HTTP 503
        (what a refused upgrade can say before any WebSocket exists; tcp://
        gets Close OVERLOADED), over TLS on wss://, then hang up.  Counted
        and logged as tcp's refusal.

        Its request head is read first (within close_timeout, as the answer
        is sent: a silent client holds nothing longer; _WS_MAX_HEAD + 1
        bytes at the most) and judged as below the limit (_read_head): what
        the listener would not take there gets the same answer, not counted
        as a refusal -- an upgrade to another path its 404, a browser or a
        malformed upgrade the 400 (or wsproto's 426), an oversize head its
        431, a tcp:// client's bytes the 400.  A 503 ("retry later") told
        them to retry what will never work (a client at a wrong URL retried
        until its connect_timeout, then heard "too many connections")."""
        stream: trio.abc.Stream = sock
        if ep.secure and self._ssl is not None:
            stream = tls_server_stream(sock, self._ssl, peer=addr, https_compatible=True)
        head = _Head()
        with trio.move_on_after(self.config.close_timeout) as reading:
            self._handshakes.add(reading)  # (shutdown() cancels the wait)
            try:
                head = await _read_head(stream)
            finally:
                self._handshakes.discard(reading)
        # The answer below the limit; the 503 (the one refusal counted) to
        # an upgrade the listener would take, or with no verdict -- the
        # client hung up or reset (nothing hears it), or stalled past
        # close_timeout (a slow upgrade request may still be one).
        code: Optional[CloseCode] = None
        if head.not_http:
            answer, why = _not_http_answer(ep), _NOT_HTTP_ENDED
        elif head.too_large:
            answer, why = _head_too_large_answer(ep), _TOO_LARGE_ENDED
        elif head.cut_short:
            answer, why = _cut_short_answer(ep), _CUT_SHORT_ENDED
        elif head.rejected is not None:
            answer = bytes(_said(head.rejected, _not_http_answer(ep)))
            why = f"WebSocket upgrade refused (HTTP {answer[9:12].decode()}): a malformed upgrade request"
        elif head.target is not None and _path_of(head.target) != ep.path:
            answer, why = _wrong_path_answer(ep, head.target), _wrong_path_refused(ep, head.target)
        else:
            self._count_refusal(conn_id, addr)
            answer, code, why = (_full_answer(ep, self.config.max_connections), CloseCode.OVERLOADED,
                                 "too many connections (HTTP 503 to the WebSocket upgrade)")
        await self._answer_and_hang_up(stream, answer)
        self._ended(conn_id, code, why)
        await trio.aclose_forcefully(stream)

    async def _answer_and_hang_up(self, stream: trio.abc.Stream, answer: bytes) -> None:
        """Send ``answer`` (an HTTP refusal, before any WebSocket; empty: it
        was sent) within close_timeout, then end cleanly.  Closed with the client's bytes
        unread (the rest of a 70 KB head), the socket sends a reset, which
        fails the client's sending and may drop the answer unread.  So our
        side is shut (the client sees the answer end; TLS has no half-close,
        but the answer says its length and Connection: close), and what
        still comes is read and dropped until the client hangs up -- for
        _LINGER_SECONDS and _LINGER_BYTES at the most: a client that never
        stops holds nothing longer.  The caller closes the stream."""
        with trio.move_on_after(self.config.close_timeout) as sending:
            try:
                if answer:
                    await stream.send_all(answer)
                if isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return  # gone already (a reset, a failed TLS handshake)
            except trio.BusyResourceError:
                # (A writer on the same stream: the callers take the
                # connection from the core first, so none should start; if
                # one did, this connection is given up, not the broker.)
                return
        if sending.cancelled_caught:
            return  # (a client that does not read: no more time for it)
        left = _LINGER_BYTES
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                while left > 0:
                    data = await stream.receive_some(min(left, 65536))
                    if not data:
                        return
                    left -= len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def _full(self) -> bool:
        """max_connections reached: connections served (_peers) and ws://
        and wss:// ones in their handshakes (_upgrading) alike."""
        return len(self._peers) + self._upgrading >= self.config.max_connections

    def _count_refusal(self, conn_id: int, addr: str) -> None:
        self._stats["refused"] += 1
        self._closes["OVERLOADED"] = self._closes.get("OVERLOADED", 0) + 1
        log.warning("connection refused conn=%d peer=%s: max_connections (%d) reached", conn_id, addr,
                    self.config.max_connections, extra={"event": "overloaded", "conn": conn_id, "peer": addr})

    # ------------------------------------------------------------ one connection

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one already-connected byte stream (any ``trio.abc.Stream``:
        a socket, TLS, WebSocket, or a ``trio.testing`` memory stream) until
        it closes.  The server must be running (:meth:`run`)."""
        await self._serve_peer(stream, Endpoint("tcp"))

    def _connected(self, ep: Endpoint, addr: Optional[str], stream: Optional[trio.abc.Stream] = None) -> int:
        """A connection accepted (``addr``: its peer's address, else asked of
        ``stream``): its number, counted and logged (``connect``) -- at
        accept, before any handshake, on every transport alike.  Its close
        line (:meth:`_ended`) follows, once, however it ends."""
        conn_id = next(self._ids)
        self._stats["accepted"] += 1
        if log.isEnabledFor(logging.INFO):
            if addr is None:
                addr = _peer_address(stream) if stream is not None else "?"
            log.info("connect conn=%d peer=%s via %s", conn_id, addr, ep.scheme,
                     extra={"event": "connect", "conn": conn_id, "peer": addr, "transport": ep.scheme})
        return conn_id

    def _ended(self, conn_id: int, code: Optional[CloseCode], reason: str) -> None:
        """The close line of a connection (every one that :meth:`_connected`
        counted): the Close the broker sent (``code``), or None and what
        ended it (the client hung up, a failed TLS handshake...)."""
        if log.isEnabledFor(logging.INFO):
            name = code.name if code is not None else None
            log.info("close conn=%d code=%s reason=%r", conn_id, name or "-", reason,
                     extra={"event": "close", "conn": conn_id, "code": name, "reason": reason})

    async def _serve_peer(self, stream: trio.abc.Stream, ep: Endpoint, conn_id: Optional[int] = None, *,
                          addr: Optional[str] = None) -> None:
        """Serve one connection; ``conn_id``: its number, given (and the
        connection counted, its ``connect`` line logged) at accept by the
        listener; ``addr``: its peer's address, as accept() returned it.
        Its close line is logged here when it ends."""
        if conn_id is None:  # (serve_stream: not from a listener)
            conn_id = self._connected(ep, addr, stream)
        if self._stopping:
            self._ended(conn_id, None, "broker shutting down")
            await trio.aclose_forcefully(stream)
            return
        peer = _Peer(conn_id, stream, ep)
        if self._full():
            self._count_refusal(conn_id, addr if addr is not None else _peer_address(stream))
            with trio.move_on_after(self.config.close_timeout):
                try:
                    await stream.send_all(refuse_connection())
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    # Gone already (a reset, a failed TLS handshake): escaping,
                    # this ended the broker -- any client could do that.
                    pass
            self._ended(conn_id, CloseCode.OVERLOADED, "too many connections")
            await trio.aclose_forcefully(stream)
            return
        self._peers[peer.id] = peer
        probed: Optional[bool] = None  # True: in the ready probe; False: counted opaque
        try:
            if peer.fd >= 0 and self._ready_probe is not None:
                try:
                    self._ready_probe.register(peer.fd, select.EPOLLIN)
                    probed = True
                except OSError as exc:
                    # ENOSPC (the user's fs.epoll.max_user_watches taken),
                    # ENOMEM: escaping, this ended the broker.  Its own task
                    # reads it instead, as TLS (counted opaque below).
                    log.warning("connection %d: not in the readiness probe (%s): read by its own task", peer.id, exc,
                                extra={"event": "probe_full", "conn": peer.id})
            if probed is None:
                self._opaque_peers += 1
                peer.opaque = True
                probed = False
            try:
                async with trio.open_nursery() as nursery:
                    peer.nursery, peer.scope = nursery, nursery.cancel_scope
                    self._run(self.broker.connection_made(peer.id, self.now()))
                    await self._reader(peer, probed is True)
                    if peer.state is _PeerState.OPEN:
                        # EOF or a broken transport: the core forgets the
                        # device; its inbox keeps everything for next time.
                        peer.state = _PeerState.DEAD
                        self._run(self.broker.connection_lost(peer.id, self.now()))
                        nursery.cancel_scope.cancel()
                    # CLOSING: the writer flushes the Close, then cancels.
            except Exception:
                # A bug in this connection's own tasks (its reader, its
                # writer, an answer at the listener): escaping, it went up
                # through the listener's nursery and ended run() -- one
                # connection took the broker down.  This connection ends
                # (the core forgets it below); nothing acked is at risk:
                # acks only follow commits.  (Cancellation is no Exception:
                # it goes on up.)
                log.exception("internal error serving connection %d", peer.id,
                              extra={"event": "internal_error", "conn": peer.id})
                self._stats["internal_errors"] += 1
                if peer.ended is None:
                    peer.ended = "internal error"
            finally:
                peer.nursery = None  # closed: no writer can start any more
        finally:
            del self._peers[peer.id]
            if peer.opaque:  # (from the start, or since a failed _reprobe)
                self._opaque_peers -= 1
            elif probed:
                self._unprobe(peer.fd)  # before the fd is closed
            if peer.state is _PeerState.OPEN:  # cancelled from outside
                peer.state = _PeerState.DEAD
                self._run(self.broker.connection_lost(peer.id, self.now()))
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.config.close_timeout):
                    try:
                        await stream.aclose()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
                if not isinstance(stream, WebSocketStream):
                    await trio.aclose_forcefully(stream)
            self._ended(peer.id, peer.close_code, peer.ended or "connection ended")

    async def _reader(self, peer: _Peer, probed: bool) -> None:
        read_size = self.config.read_size
        # A tcp:// (tls://) connection's first read only: an HTTP request
        # (curl, a browser) is answered in words (_http_at_stream), not
        # decoded as a frame ("UNSUPPORTED_VERSION: protocol version 4").
        first = not peer.endpoint.websocket
        # ... a WebSocket upgrade request (a ws:// client) is decoded as one:
        # its binary Close is what the SDKs read to suggest tcp://.  Only its
        # close line says what arrived (_upgrade_at_stream).
        upgrade = False
        # Plain TCP: wait until readable, then one read.  (receive_some reads
        # first, and on a connection with one message in flight that read
        # usually finds nothing: an EAGAIN raised and caught, then the same
        # wait -- per message, with many connections each sending now and
        # then.)  The fd is closed only after this task ends (_serve_peer).
        #
        # No cancel scope of its own: a connection being closed (CLOSING) is
        # cancelled as a whole once its Close is flushed, and a reader that
        # wakes meanwhile, or during shutdown(), hands the core nothing more.
        fd = peer.fd
        polled = probed  # (in the probe: see _serve_peer)
        try:
            await self._read_loop(peer, fd, polled, first, upgrade, read_size)
        finally:
            # Nobody reads this socket any more (the poller reads only for a
            # parked reader): out of the probe, or bytes or an EOF left in it
            # would wake the poller at every pass until _serve_peer ends.
            if polled:
                self._unprobe(fd)

    async def _read_loop(self, peer: _Peer, fd: int, polled: bool, first: bool, upgrade: bool, read_size: int) -> None:
        wait_readable = trio.lowlevel.wait_readable
        data: Union[bytes, bytearray]
        early = b""  # a first read kept until more bytes say what it is (_first_bytes_kind)
        hello = False  # the first read was a TLS ClientHello: its close line says so (_tls_at_stream)
        while peer.state is _PeerState.OPEN and not self._stopping:
            if peer.resume is not None:
                # The core waits for a request first.  Out of the probe
                # meanwhile: its level-triggered readiness would wake the
                # poller at every scheduler pass while the bytes wait.
                if polled:
                    self._unprobe(fd)
                await peer.resume.wait()
                # Back in only to be read: closing the connection also sets
                # resume (to end this wait), and a closing one's bytes are
                # never read -- back in, they would wake the poller at every
                # pass until the Close is flushed (close_timeout).
                if polled and peer.state is _PeerState.OPEN and not self._stopping and not self._reprobe(peer):
                    polled = False  # this task reads it from now on
                continue
            if polled and not first and not upgrade:
                # From its second read on, a plain-TCP connection is read by
                # the poller (see _poller); this task waits until the poller
                # hands reading back: the core paused it, it closed, or the
                # broker stops.
                await self._park(peer)
                if peer.gone:
                    return
                continue
            try:
                if fd >= 0:
                    await wait_readable(fd)
                    if self._stopping:
                        break
                    try:
                        data = os.read(fd, read_size)
                    except BlockingIOError:
                        continue
                else:
                    data = await peer.stream.receive_some(read_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if peer.ended is None:
                    peer.ended = _why_lost(peer.stream, exc)
                if not self._tls_handshake_failed(peer, exc):
                    log.debug("connection %d broken: %r", peer.id, exc)
                return
            if not data:
                if early and peer.state is _PeerState.OPEN and not self._stopping \
                        and _first_bytes_final(early) == "http":
                    # An EOF while the first bytes wait for the rest of an
                    # HTTP head: a client that ended its side (a half-close:
                    # ``nc -N``, shutdown(SHUT_WR)) before the blank line can
                    # still read -- no more bytes will say more, so they are
                    # answered now as the whole head would be; so is a whole
                    # method alone ("GET").  (A method's first letters, "GE",
                    # are no request yet: a hang-up, as
                    # for a frame cut short -- whose bytes never wait here,
                    # the core had them at once.)
                    await self._http_at_stream(peer, early)
                    return
                if peer.ended is None:
                    peer.ended = "the client hung up"
                return
            if peer.state is not _PeerState.OPEN:
                return
            if self._stopping:
                break
            if first:
                # An HTTP request's start may come in more than one read
                # (a method cut short, headers after the request line):
                # bytes are kept until they say what they are.
                head = bytes(data) if not early else early + data
                kind = _first_bytes_kind(head)
                if kind is None:
                    if len(head) < _WS_MAX_HEAD:
                        early = head
                        continue
                    kind = _first_bytes_final(head)
                first, early, data = False, b"", head
                if kind == "http":
                    await self._http_at_stream(peer, head)
                    return
                upgrade = kind == "upgrade"
                hello = kind == "tls" and not peer.endpoint.secure
            self._stats["bytes_in"] += len(data)
            if fd >= 0 and not self._holding and self._tasks is not None and not self.broker.batch_in_flight:
                probe = self._ready_probe
                if probe is not None and len(probe.poll(0, _HOLD_MIN_WAITING)) >= _HOLD_MIN_WAITING:
                    # The store is idle and other connections have bytes
                    # waiting: what this read proposes would start a batch
                    # of its own, and theirs the next one.  Hold it while
                    # they are read (see _releaser).
                    self._holding = True
                    self.broker.hold_batches()
                    self._release_wake.set()
            try:
                cmds = self.broker.receive_data(peer.id, bytes(data), self.now())
            except Exception:
                # A bug or a store read failing under this connection's
                # request: close this one connection, keep the broker.
                # Nothing acked is at risk -- acks only follow commits.
                log.exception("internal error on connection %d", peer.id)
                self._stats["internal_errors"] += 1
                self._close_by_server(peer, CloseCode.INTERNAL, "internal error")
                return
            # What was read is not kept while this task waits again.
            data = b""
            self._inline_ok = fd >= 0
            try:
                self._run(cmds)
            finally:
                self._inline_ok = False
            del cmds
            if upgrade:
                upgrade = False
                _upgrade_at_stream(peer)
            elif hello:
                hello = False
                _tls_at_stream(peer)
        # Reading stopped by shutdown(): the connection stays open until
        # shutdown closes it with a reason.
        if self._stopping and peer.state is _PeerState.OPEN:
            await trio.sleep_forever()

    async def _http_at_stream(self, peer: _Peer, head: bytes) -> None:
        """``peer``'s first bytes ``head``, at a tcp:// or tls:// listener,
        start with an HTTP request line: answer 400 in words (curl said
        "HTTP/0.9 when not allowed" to the broker's Close, and the broker
        logged UNSUPPORTED_VERSION), then hang up.  The core never saw a byte."""
        line = _HTTP_METHOD.match(head)
        assert line is not None  # (_first_bytes_kind / _first_bytes_final said "http")
        method = line.group().decode()
        scheme = peer.endpoint.scheme
        said = (f"this is the pimcore broker's {scheme}:// listener (its binary protocol), not HTTP:"
                " the HTTP API is elsewhere (the [http] listen setting, pimcore serve --http)")
        seen = (f"an HTTP/2 connection preface ({_HTTP2_PREFACE.decode()})" if head.startswith(_HTTP2_PREFACE)
                else f"an HTTP request ({method})")
        peer.ended = f"{seen} at the {scheme}:// listener: answered HTTP 400 ({said})"
        if peer.state is _PeerState.OPEN:
            # Out of the core's hands before this task writes to the stream:
            # else a Close of the core's (login_timeout, shutdown) started
            # the writer on the same stream while the answer was being sent
            # -- trio's BusyResourceError, which ended run().
            peer.state = _PeerState.DEAD
            self._run(self.broker.connection_lost(peer.id, self.now()))
        await self._answer_and_hang_up(peer.stream, _http_answer("400 Bad Request", said + "\n"))

    def _tls_handshake_failed(self, peer: _Peer, exc: BaseException) -> bool:
        """If ``exc`` ended ``peer``'s TLS handshake (a tls:// connection
        that never completed one): log it once (:func:`tls_handshake_failed`),
        count it, and return True."""
        if not peer.tls_failed and tls_handshake_failed(peer.stream, exc, conn=peer.id, transport=peer.endpoint.scheme):
            peer.tls_failed = True
            self._stats["tls_handshake_failures"] += 1
        return peer.tls_failed

    def _wake_writer(self, peer: _Peer) -> None:
        """Have ``peer``'s queued bytes written by its writer task, started
        here unless it is running (it runs until the queue is empty)."""
        if not peer.writer and peer.nursery is not None:
            peer.writer = True
            peer.nursery.start_soon(self._writer, peer)

    async def _writer(self, peer: _Peer) -> None:
        """Write what ``peer`` has queued until nothing is left, then end (the
        next bytes that cannot go out at once start another: an idle
        connection has no writer task).  A connection being closed is ended
        once its Close is out; a broken one is reported to the core."""
        try:
            while peer.buf:
                # Everything queued goes out in one write: frames produced by
                # one event (a Push, its SendAcks...) share a syscall.
                data = b"".join(peer.buf) if len(peer.buf) > 1 else peer.buf[0]
                peer.buf.clear()
                peer.queued = 0
                peer.sending = True
                try:
                    await peer.stream.send_all(data)
                finally:
                    peer.sending = False
                self._stats["bytes_out"] += len(data)
                self._run(self._core(self.broker.data_sent, peer.id, len(data)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if peer.ended is None:
                peer.ended = _why_lost(peer.stream, exc)
            if not self._tls_handshake_failed(peer, exc):
                log.debug("connection %d: write failed: %r", peer.id, exc)
            if peer.state is _PeerState.OPEN:
                peer.state = _PeerState.DEAD
                self._run(self.broker.connection_lost(peer.id, self.now()))
        finally:
            peer.writer = False
        if peer.state is not _PeerState.OPEN and peer.scope is not None:
            if peer.state is _PeerState.CLOSING and not peer.buf and isinstance(peer.stream, trio.SocketStream):
                # The Close is out: a FIN right behind it.  Closing the socket
                # with bytes of the peer still unread sends a RST, which can
                # overtake the Close in a proxy or the peer's kernel (the
                # peer then sees "connection reset", not SHUTDOWN).
                try:
                    await peer.stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            # Closing (or dead): end the connection's tasks.
            peer.scope.cancel()

    # ------------------------------------------------------------ commands

    def _run(self, cmds: list[Command]) -> None:
        """Carry out the core's commands, and those their outcomes cause
        (inline reads, inline hooks), until none is left.  Not re-entrant on
        purpose: a command that causes more (a slow consumer dropped while
        queueing) adds them to the queue instead of nesting."""
        self._queue.extend(cmds)
        if self._running:
            return
        self._running = True
        queue = self._queue
        try:
            while queue or self._dirty:
                if not queue:
                    # Write what the commands queued; the core's answers to
                    # "written" (data_sent) join the queue -- a loop, not a
                    # recursion, however many rounds a fast reader takes.
                    self._flush()
                    continue
                cmd = queue.popleft()
                kind = type(cmd)
                if kind is SendData:
                    peer = self._peers.get(cmd.conn)  # type: ignore[union-attr]
                    if peer is not None and peer.state is _PeerState.OPEN:
                        self._enqueue(peer, cmd.data)  # type: ignore[union-attr]
                elif kind is StoreRequest:
                    self._store_request(cmd)  # type: ignore[arg-type]
                elif kind is CloseConnection:
                    peer = self._peers.get(cmd.conn)  # type: ignore[union-attr]
                    if cmd.code is CloseCode.SLOW_CONSUMER:  # type: ignore[union-attr]
                        self._stats["slow_consumers"] += 1  # the core's outbound limit
                    if peer is not None:
                        self._close_peer(peer, cmd)  # type: ignore[arg-type]
                elif kind is DeviceOnline:
                    peer = self._peers.get(cmd.conn)  # type: ignore[union-attr]
                    if peer is not None and isinstance(peer.stream, WebSocketStream):
                        peer.stream.logged_in()  # messages up to max_frame from now on
                    if self._presence is not None:
                        # Stamped now, not when written: the write may wait
                        # (the cluster unreachable) behind a newer login elsewhere.
                        self._presence.send_nowait(("on", cmd.user, cmd.device, self.now()))  # type: ignore[union-attr]
                    if log.isEnabledFor(logging.INFO):
                        log.info("login conn=%d user=%s device=%s", cmd.conn, cmd.user, cmd.device,  # type: ignore[union-attr]
                                 extra={"event": "login", "conn": cmd.conn, "user": cmd.user, "device": cmd.device})  # type: ignore[union-attr]
                elif kind is DeviceOffline:
                    if self._presence is not None:
                        self._presence.send_nowait(("off", cmd.user, cmd.device, self.now()))  # type: ignore[union-attr]
                    if log.isEnabledFor(logging.INFO):
                        code = cmd.code.name if cmd.code is not None else None  # type: ignore[union-attr]
                        log.info("offline conn=%d user=%s device=%s code=%s reason=%r", cmd.conn, cmd.user, cmd.device,  # type: ignore[union-attr]
                                 code, cmd.reason, extra={"event": "offline", "conn": cmd.conn, "user": cmd.user,  # type: ignore[union-attr]
                                                          "device": cmd.device, "code": code, "reason": cmd.reason})  # type: ignore[union-attr]
                elif kind is PushOverMaxFrame:
                    log.warning(
                        "push_over_max_frame conn=%d user=%s device=%s size=%d max_frame=%d: a message stored under"
                        " larger limits is over max_frame; the device refuses it and receives nothing past it until"
                        " max_frame is raised to at least its size", cmd.conn, cmd.user, cmd.device, cmd.size,  # type: ignore[union-attr]
                        cmd.max_frame, extra={"event": "push_over_max_frame", "conn": cmd.conn, "user": cmd.user,  # type: ignore[union-attr]
                                              "device": cmd.device, "size": cmd.size, "max_frame": cmd.max_frame})  # type: ignore[union-attr]
                elif kind is TypingElsewhere:
                    if self._typing_out is not None:
                        try:
                            self._typing_out.send_nowait(cmd)
                        except trio.WouldBlock:
                            pass  # best effort: the store is not keeping up
                elif kind is PauseReading:
                    peer = self._peers.get(cmd.conn)  # type: ignore[union-attr]
                    if peer is not None and peer.resume is None:
                        peer.resume = trio.Event()
                elif kind is ResumeReading:
                    peer = self._peers.get(cmd.conn)  # type: ignore[union-attr]
                    if peer is not None and peer.resume is not None:
                        peer.resume.set()
                        peer.resume = None
                elif kind is Authenticate:
                    self._authenticate_request(cmd)  # type: ignore[arg-type]
                elif kind is CheckContent:
                    self._check_content(cmd)  # type: ignore[arg-type]
                elif kind is AdminDone or kind is PostDone:
                    waiter = self._admin_waiters.pop(cmd.ref, None)  # type: ignore[union-attr]
                    if waiter is not None:
                        waiter[1] = cmd.result if kind is AdminDone else cmd  # type: ignore[union-attr]
                        waiter[0].set()
                else:  # pragma: no cover
                    raise TypeError(f"unknown command {cmd!r}")
        finally:
            self._running = False
        scope = self._timer_scope
        if scope is not None:
            due = self.broker.next_deadline()
            if due is not None:
                at = trio.current_time() + (due - self.now()) / SECOND
                if at < scope.deadline:
                    scope.deadline = at

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        if self._tasks is not None:
            self._tasks.start_soon(fn, *args)
        else:
            self._later.append((fn, args))

    # ------------------------------------------------------------ store and hooks

    def _store_request(self, req: StoreRequest) -> None:
        if req.write:
            probe = self._ready_probe
            if (self._inline_ok and probe is not None and not self._opaque_peers and self._commit_idle.is_set()
                    and req.entries < _OFF_LOOP_ENTRIES and not probe.poll(0, 1)):
                # Inline commit (see __init__): its outcome joins the queue
                # behind the commands already there, as the committer's would.
                if self._dirty:
                    # What is queued goes out first: this commit blocks the
                    # loop for its flush, and the SendAcks of the batch that
                    # just committed (answered with this one, e.g. delivery
                    # acks that waited ack_delay) would wait a second flush.
                    self._flush()
                t0 = time.perf_counter()
                try:
                    results = self.store.execute(req)  # type: ignore[union-attr]
                except Exception as exc:
                    self._queue.extend(self._commit_done(req, t0, None, exc))
                else:
                    self._queue.extend(self._commit_done(req, t0, results, None))
                return
            self._commit_idle = trio.Event()
            self._commit_send.send_nowait(req)
        elif self._async_store:
            self._spawn(self._read_async, req)
        else:
            # A local read: memory-mapped LMDB answers in microseconds, so it
            # runs right here and its outcome joins the command queue.
            store: Store = self.store  # type: ignore[assignment]
            try:
                results = store.execute(req)
            except Exception as exc:
                self._store_error(req, exc)
                self._queue.extend(self._core(self.broker.store_failed, req.request_id, exc))
            else:
                self._queue.extend(self._core(self.broker.store_completed, req.request_id, results))

    def _core(self, method: Callable[..., list[Command]], *args: Any) -> list[Command]:
        """Call the core with an outcome (and ``now``).  A bug the call hits is
        logged and contained -- the connection concerned waits for its login
        or idle timeout -- instead of taking the whole broker down."""
        try:
            return method(*args, self.now())
        except Exception:
            log.exception("internal error in %s", getattr(method, "__name__", method))
            self._stats["internal_errors"] += 1
            return []

    async def _read_async(self, req: StoreRequest) -> None:
        try:
            with trio.fail_after(self.config.read_timeout):
                results = await self.store.execute(req)  # type: ignore[misc]
        except (Exception, trio.TooSlowError) as exc:
            if isinstance(exc, trio.TooSlowError):
                exc = StoreError(f"read request {req.request_id} took longer than {self.config.read_timeout} s")
            self._store_error(req, exc)
            self._run(self._core(self.broker.store_failed, req.request_id, exc))
        else:
            self._run(self._core(self.broker.store_completed, req.request_id, results))

    def _store_error(self, req: StoreRequest, exc: BaseException, write: bool = False) -> None:
        # StoreError is the contract; anything else is a store bug, handled
        # the same way: nothing of the request took effect.
        if not isinstance(exc, StoreError):
            log.error("store request %d failed unexpectedly", req.request_id, exc_info=exc)
            self._stats["internal_errors"] += 1
            return
        text = str(exc)
        if write:
            if text != self._store_failing or exc.cause is not None:
                self._store_cause = exc.cause  # (a repeat of the same failure may say its text only)
            self._store_failing = text
        if text != self._store_logged:
            # Once per change of state: a full disk refuses every request
            # alike until space is freed (or until a restart).
            self._store_logged = text
            log.error("store request %d failed: %s", req.request_id, text,
                      extra={"event": "store_error", "write": write})
        else:
            self._store_repeats += 1
            log.debug("store request %d failed: %s", req.request_id, text)

    def _store_writes_again(self) -> None:
        """A write committed: the store is no longer failing (see _store_error)."""
        if self._store_failing is not None:
            log.warning("store writes succeed again (%d more requests failed the same way meanwhile)",
                        self._store_repeats, extra={"event": "store_recovered"})
        self._store_failing = self._store_logged = self._store_cause = None
        self._store_repeats = 0

    # Hooks.  A refusal is the hook's answer (AuthError, a reason); a hook that
    # fails or does not answer within hook_timeout is not an answer: the
    # login is closed with INTERNAL, the message refused with INTERNAL, and
    # the client tries again later (same local id) instead of giving up.

    def _authenticate_request(self, cmd: Authenticate) -> None:
        if self._auth_is_async:
            self._spawn(self._authenticate_async, cmd)
            return
        try:
            result: Union[Identity, BaseException] = self._authenticate(cmd.token, cmd.now)  # type: ignore[assignment]
        except Exception as exc:
            result = self._hook_failed("the authenticator", exc)
        self._queue.extend(self._core(self.broker.auth_completed, cmd.request_id, result))

    async def _authenticate_async(self, cmd: Authenticate) -> None:
        result: Union[Identity, BaseException] = TimeoutError("the authenticator did not answer in time")
        try:
            with trio.move_on_after(self.config.hook_timeout):
                result = await self._authenticate(cmd.token, cmd.now)  # type: ignore[misc]
        except Exception as exc:
            result = self._hook_failed("the authenticator", exc)
        self._run(self._core(self.broker.auth_completed, cmd.request_id, result))

    def _hook_failed(self, what: str, exc: Exception) -> Exception:
        if isinstance(exc, AuthError):
            return exc  # a refusal, not a failure
        log.error("%s failed", what, exc_info=exc)
        self._stats["internal_errors"] += 1
        return exc

    # Dedupe before the content check: a retry of a stored message (its
    # SendAck or HTTP answer was lost) must get the original result, not a
    # verdict the filter or moderation gives today -- the message is in
    # history whatever they say now.  So before asking them, one key lookup
    # (ReadDedupe): if the key is stored the message goes straight to the
    # store, whose NewMessage answers Duplicate (or DUPLICATE_CONFLICT).
    # Only when a check is configured: without one nothing is looked up.

    def _dedupe_probe(self, user: str, device: str, local_id: int) -> _StoreRequest:
        return _StoreRequest(0, (ReadDedupe(user, device, local_id),), False)

    def _stored_now(self, user: str, device: str, local_id: int) -> bool:
        """The dedupe lookup on a local store (microseconds, like the other
        local reads).  A failed lookup says no: the message is checked."""
        try:
            (res,) = self.store.execute(self._dedupe_probe(user, device, local_id))  # type: ignore[misc]
        except Exception:
            log.warning("dedupe lookup failed; the message is checked", exc_info=True)
            return False
        return isinstance(res, Deduped) and res.stored

    async def stored_before(self, user: str, device: str, local_id: int) -> bool:
        """Is (``user``, ``device``, ``local_id``) a stored message's dedupe
        key?  Then a retry of it needs no content check (see above)."""
        if not self._async_store:
            return self._stored_now(user, device, local_id)
        try:
            with trio.fail_after(self.config.read_timeout):
                (res,) = await self.store.execute(self._dedupe_probe(user, device, local_id))  # type: ignore[misc]
        except (Exception, trio.TooSlowError):
            log.warning("dedupe lookup failed; the message is checked", exc_info=True)
            return False
        return isinstance(res, Deduped) and res.stored

    def _check_content(self, cmd: CheckContent) -> None:
        if self._filter_is_async or self.moderator is not None or self._async_store:
            self._spawn(self._check_content_async, cmd)
            return
        hook = self.config.broker.content_filter
        assert hook is not None
        try:
            if self._stored_now(cmd.user, cmd.device, cmd.local_id):
                verdict = None  # a retry of a stored message: the store answers Duplicate
            else:
                verdict = hook(cmd.user, cmd.conv, cmd.payload)
            cmds = self._core(self.broker.content_checked, cmd.request_id, verdict)
        except Exception as exc:
            self._hook_failed("the content filter", exc)
            cmds = self._content_unchecked(cmd, "the content filter failed; send again later")
        self._queue.extend(cmds)

    async def _check_content_async(self, cmd: CheckContent) -> None:
        cmds: Optional[list[Command]] = None
        try:
            if await self.stored_before(cmd.user, cmd.device, cmd.local_id):
                verdict: Optional[tuple[Optional[str], ErrorCode]] = (None, ErrorCode.OK)
            else:
                verdict = await self._content_verdict(cmd.user, cmd.device, cmd.conv, cmd.payload, cmd.local_id)
            if verdict is not None:
                reason, code = verdict
                cmds = self._core(functools.partial(self.broker.content_checked, code=code if reason is not None else ErrorCode.REJECTED),
                                  cmd.request_id, reason)
        except Exception as exc:
            self._hook_failed("the content filter", exc)
            cmds = self._content_unchecked(cmd, "the content filter failed; send again later")
        if cmds is None:
            log.error("the content filter did not answer within %.1f s", self.config.hook_timeout)
            self._stats["internal_errors"] += 1
            cmds = self._content_unchecked(cmd, "the content filter did not answer in time; send again later")
        self._run(cmds)

    async def _content_verdict(self, user: str, device: str, conv: str, payload: bytes, local_id: Optional[int],
                               source: str = "client") -> Optional[tuple[Optional[str], ErrorCode]]:
        """The content filter (plain or async), then -- if it let the
        message through -- the moderation webhook: (None, OK) lets it
        through, else (reason, REJECTED or INTERNAL); None if the filter
        did not answer within hook_timeout.  The moderation call has its
        own limit (timeout_ms) and policy, whatever hook_timeout is."""
        hook: Any = self.config.broker.content_filter
        if hook is not None:
            reason: Any = None
            with trio.move_on_after(self.config.hook_timeout) as scope:
                reason = hook(user, conv, payload)
                if inspect.isawaitable(reason):
                    reason = await reason
            if scope.cancelled_caught:
                return None
            if reason is not None:
                return verdict_reason(reason), ErrorCode.REJECTED  # (a host post's words = a client's)
        if self.moderator is not None:
            verdict = await self.moderator.check(conv=conv, sender=user, device=device, local_id=local_id,
                                                 payload=payload, now=self.now(), source=source)
            return (None if verdict.reason is None else verdict_reason(verdict.reason)), verdict.code
        return None, ErrorCode.OK

    async def check_content(self, user: str, device: str, conv: str, payload: bytes,
                            local_id: Optional[int]) -> tuple[Optional[str], ErrorCode]:
        """A host post as a user (:meth:`pimcore.embed.Pimcore.post`) passes
        the checks a client's send does: the content filter, then the
        moderation webhook.  Returns (None, OK), or (reason, REJECTED) for a
        refusal, or (reason, INTERNAL) when no answer came (a filter that
        failed or took longer than hook_timeout; moderation down under the
        closed policy).  ``local_id`` None is a post without an idempotency
        key (moderation is told null); with one, a retry of a stored post
        is not checked again (the broker answers it as a duplicate)."""
        if self.config.broker.content_filter is None and self.moderator is None:
            return None, ErrorCode.OK
        if local_id is not None and await self.stored_before(user, device, local_id):
            return None, ErrorCode.OK
        try:
            verdict = await self._content_verdict(user, device, conv, payload, local_id, "host")
            if verdict is not None:
                return verdict
        except Exception as exc:
            self._hook_failed("the content filter", exc)
            return "the content filter failed; send again later", ErrorCode.INTERNAL
        log.error("the content filter did not answer within %.1f s", self.config.hook_timeout)
        self._stats["internal_errors"] += 1
        return "the content filter did not answer in time; send again later", ErrorCode.INTERNAL

    def _content_unchecked(self, cmd: CheckContent, reason: str) -> list[Command]:
        try:
            return self.broker.content_checked(cmd.request_id, reason, self.now(), code=ErrorCode.INTERNAL)
        except Exception:
            log.exception("internal error in content_checked")
            self._stats["internal_errors"] += 1
            return []

    # ------------------------------------------------------------ group admin

    async def create_group(self, conv: str, members: list[str], *, history_visible: bool = False) -> GroupChanged:
        """Create a group through the core (an op of the next batch).
        ``history_visible``: members added later may read what was said
        before they joined (default: not).  Raises ValueError (bad ids, or
        the group exists) or StoreError."""
        return await self._admin(functools.partial(self.broker.create_group, history_visible=history_visible), conv, members)

    async def add_members(self, conv: str, users: list[str]) -> GroupChanged:
        """Add users to a group; KeyError if it does not exist."""
        return await self._admin(self.broker.add_members, conv, users)

    async def remove_members(self, conv: str, users: list[str]) -> GroupChanged:
        """Remove users from a group; KeyError if it does not exist."""
        return await self._admin(self.broker.remove_members, conv, users)

    @property
    def stopping(self) -> bool:
        """Has shutdown begun (or the server stopped)?  Host calls then
        raise :class:`~pimcore.errors.BrokerStopped`."""
        return self._stopping

    def check_running(self) -> None:
        """Raise :class:`~pimcore.errors.BrokerStopped` once shutdown has
        begun: a host call then would wait for a broker that is going away."""
        if self._stopping:
            raise BrokerStopped("the broker has stopped (it is shutting down or shut down: it takes no more calls)")

    def _hand_over(self, method: Callable[..., list[Command]], args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[int, list[Any]]:
        """Give one host call to the core; its (ref, waiter).  The call's
        commands are made before the waiter is registered, so a call the
        core refuses by raising leaves no waiter behind."""
        ref = next(self._admin_refs)
        now = self.now()
        self.broker.host_write(now)  # arms the reclaim pass: a host-only broker reclaims too
        cmds = method(*args, now, ref=ref, **kw)
        waiter: list[Any] = [trio.Event(), None]
        self._admin_waiters[ref] = waiter
        self._run(cmds)
        return ref, waiter

    async def _answer(self, ref: int, waiter: list[Any]) -> Any:
        """The answer of a call handed over; BrokerStopped if the server
        stopped first.  A cancelled wait drops its waiter."""
        try:
            await waiter[0].wait()
        finally:
            self._admin_waiters.pop(ref, None)
        if waiter[1] is _STOPPED:
            raise BrokerStopped("the broker stopped before the call completed (a write may or may not "
                                "have been stored: retry it with the same idempotency key)")
        return waiter[1]

    def _stop_waiters(self) -> None:
        """The server stopped: every host call still waiting gets
        BrokerStopped (its answer will never come)."""
        self._stopping = True
        waiters, self._admin_waiters = self._admin_waiters, {}
        for waiter in waiters.values():
            waiter[1] = _STOPPED
            waiter[0].set()
        self._committed.set()  # event readers waiting for a commit look again, and stop

    async def admin_result(self, method: Callable[..., list[Command]], conv: str, users: list[str], **kw: Any) -> Result:
        """Run one group admin call of the core (``broker.create_group`` ...)
        and return the store's answer as it is (GroupChanged or Rejected).
        Raises BrokerStopped when the server stopped (or stops first)."""
        self.check_running()
        return await self._answer(*self._hand_over(method, (conv, users), kw))  # type: ignore[no-any-return]

    async def host_call(self, method: Callable[..., list[Command]], *args: Any, **kw: Any) -> Any:
        """Run one host call of the core that answers with a ``ref``
        (``broker.post`` -> PostDone, ``broker.revoke`` -> AdminDone's
        result) and return that answer.  Raises BrokerStopped when the
        server stopped (or stops before the answer)."""
        self.check_running()
        return await self._answer(*self._hand_over(method, args, kw))

    async def host_calls(self, calls: Sequence[tuple[Callable[..., list[Command]], tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        """:meth:`host_call` for several calls: all handed to the core in
        list order first (so posts to one conversation get seqs in that
        order and share write batches), then awaited; answers in order.
        A call whose hand-over raised (a fault in the core) has that
        exception as its answer, logged: the calls handed before it are
        stored all the same, so their answers must still reach the caller."""
        self.check_running()
        handed: list[Union[tuple[int, list[Any]], Exception]] = []
        for method, args, kw in calls:
            try:
                handed.append(self._hand_over(method, args, kw))
            except Exception as exc:
                log.exception("host call %s failed in the core", getattr(method, "__name__", method),
                              extra={"event": "host_call_failed"})
                handed.append(exc)
        try:
            return [h if isinstance(h, Exception) else await self._answer(*h) for h in handed]
        finally:
            for h in handed:
                if not isinstance(h, Exception):
                    self._admin_waiters.pop(h[0], None)

    @property
    def committed(self) -> trio.Event:
        """An event set when the next write batch has committed (take it
        before reading, then wait on it: a commit in between sets it)."""
        return self._committed

    def kick(self, user: str, device: Optional[str] = None, reason: str = "") -> None:
        """End ``user``'s sessions (one device's if given) now: Close(KICKED)."""
        log.info("kick user=%s device=%s reason=%r", user, device or "*", reason,
                 extra={"event": "kick", "user": user, "device": device or "*", "reason": reason})
        self._run(self.broker.kick(user, device, self.now(), reason))
        cluster = getattr(self.store, "cluster", None) if self._async_store else None
        if cluster is not None:
            # The user's sessions on other nodes sharing the store end too
            # (a hint, and a record their re-check finds if the hint is lost).
            self._spawn(cluster.kick, user, device, reason)

    async def _admin(self, method: Callable[..., list[Command]], conv: str, users: list[str]) -> GroupChanged:
        result = await self.admin_result(method, conv, users)
        if isinstance(result, GroupChanged):
            return result
        assert isinstance(result, Rejected)
        if result.code is ErrorCode.UNKNOWN_CONVERSATION:
            raise KeyError(conv)
        if result.code is ErrorCode.STORE_UNAVAILABLE:
            raise StoreError(f"group {conv!r} not changed: the store failed")
        raise ValueError(f"group {conv!r} not changed: {result.code.name}")

    def _flush(self) -> None:
        """Send what the commands just queued.

        Why not always wake the writer: under load every commit sends to
        most connections, and a task wake-up plus ``send_all`` per connection
        costs more than the frames themselves.  So for plain TCP, while no
        writer task is sending (nothing of ours is on its way; ordering is
        kept), the bytes go out with one non-blocking write right here.
        Whatever the kernel does not take -- and everything for TLS and
        WebSocket peers -- is left to a writer task (started for it, see
        _wake_writer), including the slow-consumer limit, which counts only
        what is still queued.
        """
        dirty, self._dirty = self._dirty, []
        sent: list[tuple[int, int]] = []
        for peer in dirty:
            if not peer.buf:
                continue
            if peer.fd >= 0 and not peer.sending and peer.state is _PeerState.OPEN:
                data = b"".join(peer.buf) if len(peer.buf) > 1 else peer.buf[0]
                try:
                    n = os.write(peer.fd, data)  # trio's sockets are non-blocking
                except BlockingIOError:
                    n = 0
                except OSError:
                    self._wake_writer(peer)  # broken: the writer finds out and reports it
                    continue
                self._stats["bytes_out"] += n
                if n:
                    sent.append((peer.id, n))
                if n == len(data):
                    peer.buf.clear()
                    peer.queued = 0
                    continue
                peer.buf[:] = [data[n:]]
                peer.queued = len(data) - n
            self._wake_writer(peer)
        if sent:  # the core counts them as no longer held
            now, data_sent = self.now(), self.broker.data_sent
            for conn, n in sent:
                try:
                    cmds = data_sent(conn, n, now)
                except Exception:
                    log.exception("internal error in data_sent")
                    self._stats["internal_errors"] += 1
                    continue
                if cmds:
                    self._queue.extend(cmds)

    def _enqueue(self, peer: _Peer, data: bytes) -> None:
        if not peer.buf:
            self._dirty.append(peer)
        peer.buf.append(data)
        peer.queued += len(data)
        if peer.queued > self.config.max_outbound_bytes:
            # The peer is not reading.  Drop what it has not taken; it will
            # resume from its acked position when it reconnects.
            self._stats["slow_consumers"] += 1
            peer.buf.clear()
            peer.queued = 0
            self._close_by_server(peer, CloseCode.SLOW_CONSUMER, "outbound queue full: not reading fast enough")

    def _close_by_server(self, peer: _Peer, code: CloseCode, reason: str) -> None:
        """Close ``peer`` for a reason of the network layer's: the core forgets
        it and gives the Close frame's bytes (its session may compress...);
        if the core cannot (it failed, or forgot the connection already),
        a plain Close goes out anyway."""
        cmds: list[Command] = []
        try:
            cmds = self.broker.close(peer.id, code, reason, self.now())
        except Exception:  # pragma: no cover - a second failure while failing
            log.exception("internal error closing connection %d", peer.id)
        for cmd in cmds:
            if type(cmd) is CloseConnection and cmd.conn == peer.id:
                self._close_peer(peer, cmd)  # now, not queued: nothing more is written to it
        self._run([c for c in cmds if not (type(c) is CloseConnection and c.conn == peer.id)])
        if peer.state is _PeerState.OPEN:
            self._close_peer(peer, CloseConnection(peer.id, code, reason, encode_close(code, reason)))

    def _close_all_by_server(self, code: CloseCode, reason: str) -> None:
        """:meth:`_close_by_server` for every connection, in one call of the
        core (Broker.close_all: no watcher is told its peers went offline
        because the broker is closing them all)."""
        cmds: list[Command] = []
        try:
            cmds = self.broker.close_all(code, reason, self.now())
        except Exception:  # pragma: no cover - a second failure while failing
            log.exception("internal error closing every connection")
        rest: list[Command] = []
        for cmd in cmds:
            peer = self._peers.get(cmd.conn) if type(cmd) is CloseConnection else None
            if peer is None:
                rest.append(cmd)
                continue
            assert isinstance(cmd, CloseConnection)
            self._close_peer(peer, cmd)  # now, not queued: nothing more is written to it
        self._run(rest)
        for peer in list(self._peers.values()):  # the core did not know it (or failed)
            if peer.state is _PeerState.OPEN:
                self._close_peer(peer, CloseConnection(peer.id, code, reason, encode_close(code, reason)))

    def _closed(self, peer: _Peer, cmd: CloseConnection) -> None:
        """Count a Close the broker sends (refused logins included), log the
        refused logins and slow consumers, and keep it for the connection's
        close line (logged when it ends: _ended)."""
        name = cmd.code.name
        self._closes[name] = self._closes.get(name, 0) + 1
        peer.close_code, peer.ended = cmd.code, cmd.reason
        if cmd.code is CloseCode.AUTH_FAILED:
            kind = _auth_failure_kind(cmd.reason)
            self._auth_failures[kind] = self._auth_failures.get(kind, 0) + 1
            log.warning("login refused conn=%d reason=%r", cmd.conn, cmd.reason,
                        extra={"event": "login_refused", "conn": cmd.conn, "code": name, "reason": cmd.reason})
        elif cmd.code is CloseCode.SLOW_CONSUMER:
            log.warning("slow consumer conn=%d reason=%r", cmd.conn, cmd.reason,
                        extra={"event": "slow_consumer", "conn": cmd.conn, "code": name, "reason": cmd.reason})

    def _close_peer(self, peer: _Peer, cmd: CloseConnection) -> None:
        """Close ``peer`` with ``cmd``'s Close frame (counted: _closed), unless
        it is closing already."""
        if peer.state is not _PeerState.OPEN:
            return
        if _handshake_pending(peer.stream):
            # A tls:// peer that has not finished its TLS handshake (a raw
            # TCP client that sent nothing, half a ClientHello...) cannot be
            # sent a Close: the write would wait for that handshake, up to
            # close_timeout -- and shutdown() with it.  Hang up at once (no
            # Close is counted; its close line says why).
            peer.state = _PeerState.CLOSING
            peer.ended = f"{cmd.reason} (no Close sent: its TLS handshake was not done)"
            if peer.scope is not None:
                peer.scope.cancel()
            return
        self._closed(peer, cmd)
        data = cmd.data
        peer.buf.append(data)
        peer.queued += len(data)
        peer.state = _PeerState.CLOSING
        if peer.resume is not None:
            peer.resume.set()
        # The writer flushes the Close, then cancels the connection (its
        # reader too: it hands the core nothing more meanwhile).
        self._wake_writer(peer)
        if peer.scope is not None:
            # A peer that does not read gets close_timeout to take its Close.
            peer.scope.deadline = min(peer.scope.deadline, trio.current_time() + self.config.close_timeout)

    # ------------------------------------------------------------ background tasks

    def _has_retention(self) -> bool:
        """Whether the store holds a conversation's own retention (read once
        at start: see Broker.retention_in_use); a store that cannot say, or
        fails to, is taken as not (the reclaim pass then starts with the
        first connection or post, as before)."""
        try:
            return bool(getattr(self.store, "has_retention", lambda: None)())
        except StoreError as exc:
            log.warning("could not read the store's retention settings at start: %s", exc,
                        extra={"event": "store_error"})
            return False

    def _deferred_opened(self) -> None:
        # Called by the store, on this thread, when a batch opened a
        # deferred LMDB transaction: wake _deferred to commit it when due.
        self._defer_wake.set()

    async def _deferred(self) -> None:
        """Commit the store's open deferred LMDB transaction when it is due
        (:meth:`pimcore.store.lmdb.LmdbStore.defer_commits`): a batch is
        acked once its command log record is flushed, and LMDB's own commit
        is paid once for up to ``defer_batches`` batches.  This task is what
        bounds how long a transaction stays open when no further batch
        comes: other threads' reads wait for it."""
        store = self.store
        while True:
            delay = store.commit_delay()  # type: ignore[union-attr]
            if delay is None:
                await self._defer_wake.wait()
                self._defer_wake = trio.Event()
                continue
            # Due at ``deadline`` -- or at once when another thread starts to
            # wait for it (commit_delay() is then 0): looked at every 10 ms.
            deadline = trio.current_time() + delay
            while delay:
                # (One read of the clock per look: read twice, the deadline
                # could pass in between -- this thread losing the GIL to the
                # flush worker or a checkpoint -- and trio.sleep got a
                # negative time, which ended the broker: a trial.)
                left = deadline - trio.current_time()
                if left <= 0:
                    break
                await trio.sleep(min(0.01, left))
                delay = store.commit_delay()  # type: ignore[union-attr]
                if delay is None:
                    break
            if delay is None:
                continue
            try:
                store.commit_open()  # type: ignore[union-attr]
            except StoreError as exc:
                # The store writes no more (its batches are in the command
                # log); every later commit fails with STORE_UNAVAILABLE.
                log.error("the store stopped writing: %s", exc, extra={"event": "store_error"})
                self._store_failing = self._store_logged = str(exc)
                self._store_cause = exc.cause
                return

    def _may_offload(self) -> bool:
        """Whether a large batch may commit in a worker thread (see
        _OFF_LOOP_ENTRIES): the store says its commits are thread-safe.
        With ``log`` durability this thread owns the deferred LMDB
        transaction (see _deferred): the caller commits what it holds first
        (:meth:`_offload_ready`), and the worker's batch is then logged and
        committed on its own, outside the deferral."""
        return getattr(self.store, "thread_safe_commit", False)

    def _offload_ready(self) -> None:
        """Before a batch goes to a worker thread: with ``log`` durability,
        commit the deferred transaction this thread holds (up to
        ``defer_batches`` small batches, already acked).  Why: a write from
        another thread waits until none is open, and only this thread can
        commit it (_deferred would, seeing the waiter, within its 10 ms
        look): done here, the worker starts at once.  One batch is in
        flight at a time, so none opens again until the worker is done.
        Raises StoreError as ``commit_open`` does."""
        if self._deferring:
            self.store.commit_open()  # type: ignore[union-attr]

    async def _committer(self) -> None:
        store = self.store
        async for req in self._commit_recv:
            t0 = time.perf_counter()
            try:
                if self._async_store:
                    results = await store.execute(req)  # type: ignore[misc]
                elif self._commit_in_thread:
                    results = await trio.to_thread.run_sync(store.execute, req)  # type: ignore[union-attr]
                elif req.entries >= _OFF_LOOP_ENTRIES and self._may_offload():
                    self._offload_ready()
                    results = await trio.to_thread.run_sync(store.execute, req)  # type: ignore[union-attr]
                else:
                    results = store.execute(req)  # type: ignore[union-attr]
            except Exception as exc:
                cmds = self._commit_done(req, t0, None, exc)
            else:
                cmds = self._commit_done(req, t0, results, None)
            self._commit_idle.set()
            self._run(cmds)

    # ------------------------------------------------------------ the poller

    def _close_probe(self) -> None:
        """run() ended (shut down, cancelled or failed): close the readiness
        probe's epoll now, once.  None from here on: every use checks, so a
        connection of serve_stream still ending in the host's own nursery
        unregisters nothing, polls nothing -- and cannot meet a closed
        epoll, or a new fd that took its number."""
        probe, self._ready_probe = self._ready_probe, None
        if probe is not None:
            # (No task waits on its fd any more: trio's bookkeeping of it is
            # dropped all the same, as trio asks before any close.)
            trio.lowlevel.notify_closing(probe.fileno())
            probe.close()

    def _unprobe(self, fd: int) -> None:
        if self._ready_probe is None:  # (closed: run() ended)
            return
        try:
            self._ready_probe.unregister(fd)
        except (OSError, ValueError):  # (not registered: taken out already; the probe closed)
            pass

    def _reprobe(self, peer: _Peer) -> bool:
        """Put a resumed ``peer``'s socket back into the readiness probe:
        True if it is there.  False if the probe refused it (ENOSPC once
        fs.epoll.max_user_watches is used up, ENOMEM): ``peer`` is counted
        opaque, and its reader task reads it from now on, as at an accept
        the probe refused (_serve_peer) -- a socket nobody watches would
        never be read again (its client waits for SendAcks until its
        timeout, the broker until idle_timeout).  False, and nothing
        counted, once the probe is closed (run() ended: nobody polls)."""
        if self._ready_probe is None:
            return False
        try:
            self._ready_probe.register(peer.fd, select.EPOLLIN)
        except FileExistsError:  # (registered already)
            return True
        except OSError as exc:
            log.warning("connection %d: back out of the readiness probe (%s): read by its own task", peer.id, exc,
                        extra={"event": "probe_full", "conn": peer.id})
            self._opaque_peers += 1
            peer.opaque = True
            return False
        return True

    async def _park(self, peer: _Peer) -> None:
        """Wait (the connection's reader task) while the poller reads
        ``peer``: until :meth:`_hand_back`, or a cancellation (the
        connection closing), which takes it off the poller's list first."""
        self._polled[peer.fd] = peer
        peer.parked = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(functools.partial(self._unpark, peer))

    def _unpark(self, peer: _Peer, raise_cancel: Any) -> trio.lowlevel.Abort:
        # (wait_task_rescheduled's abort, called by whatever cancels the
        # parked reader: the connection closing, the broker stopping.)
        if self._polled.get(peer.fd) is peer:
            del self._polled[peer.fd]
        peer.parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _hand_back(self, peer: _Peer, gone: bool) -> None:
        """The poller stops reading ``peer`` and wakes its reader task, which
        waits for a resume or ends (``gone``: EOF or a broken socket).  A
        connection nobody reads any more leaves the probe."""
        del self._polled[peer.fd]
        task, peer.parked = peer.parked, None
        peer.gone = gone
        if gone or peer.state is not _PeerState.OPEN:
            self._unprobe(peer.fd)
        trio.lowlevel.reschedule(task)  # type: ignore[arg-type]

    async def _poller(self) -> None:
        """Read every plain-TCP connection that has bytes waiting, after its
        first read (the reader's: HTTP or a WebSocket upgrade at a tcp://
        listener is answered there), and while the core does not pause it.

        Why one task for all of them: a reader task per connection costs a
        scheduler wake-up and an ``epoll_ctl`` (trio re-arms its one-shot
        registration) per read.  The probe (a level-triggered epoll of
        every plain-TCP socket, see __init__) already knows which sockets
        have bytes; trio wakes this task when the probe's own fd is readable,
        and one ``poll`` lists them all.  Each look reads every listed socket
        once (``read_size`` at most: a flood from one cannot starve the
        rest) and, when two or more have bytes, holds the core's next batch
        over the look and up to _HOLD_PASSES more looks at what came
        meanwhile (the sends of connections whose SendAcks just went out):
        group commit across connections, as _reader's hold does for the
        first reads.  Measured at 50 x 16 (BENCHMARKS.md, "One reader for
        the plain-TCP connections"): about 10 % less broker CPU per send."""
        probe = self._ready_probe
        pfd = probe.fileno()
        wait_readable = trio.lowlevel.wait_readable
        try:
            while not self._stopping:
                await wait_readable(pfd)
                if self._stopping:
                    break
                events = probe.poll(0, _POLL_MAX)
                if len(events) < _HOLD_MIN_WAITING or self._holding:
                    self._read_polled(events, inline=True)
                    continue
                self._holding = True
                self.broker.hold_batches()
                try:
                    self._read_polled(events, inline=False)
                    for _ in range(_HOLD_PASSES):
                        events = probe.poll(0, _POLL_MAX)
                        if not events:
                            break
                        self._read_polled(events, inline=False)
                finally:
                    self._holding = False
                    self._inline_ok = True
                    try:
                        self._run(self._core(self.broker.release_batches))
                    finally:
                        self._inline_ok = False
        finally:
            # Stopping (or cancelled): every parked reader takes over, and
            # sees the broker stopping.
            for peer in list(self._polled.values()):
                self._hand_back(peer, False)

    def _read_polled(self, events: list[tuple[int, int]], *, inline: bool) -> None:
        """One read of each polled connection among ``events`` (the probe's
        ``(fd, mask)`` list), handed to the core as _reader would;
        ``inline``: its write requests may commit right here (see
        _store_request).  Sockets the poller does not read (a connection's
        first read, its reader still to run) are skipped."""
        polled = self._polled
        read_size = self.config.read_size
        for fd, _ in events:
            peer = polled.get(fd)
            if peer is None:
                continue
            if peer.state is not _PeerState.OPEN or peer.resume is not None or self._stopping:
                self._hand_back(peer, False)
                continue
            try:
                data = os.read(fd, read_size)
            except BlockingIOError:
                continue
            except OSError as exc:
                if peer.ended is None:
                    peer.ended = _why_lost(peer.stream, exc)
                log.debug("connection %d broken: %r", peer.id, exc)
                self._hand_back(peer, True)
                continue
            if not data:
                if peer.ended is None:
                    peer.ended = "the client hung up"
                self._hand_back(peer, True)
                continue
            self._stats["bytes_in"] += len(data)
            try:
                cmds = self.broker.receive_data(peer.id, data, self.now())
            except Exception:
                # As in _reader: close this one connection, keep the broker.
                log.exception("internal error on connection %d", peer.id)
                self._stats["internal_errors"] += 1
                self._close_by_server(peer, CloseCode.INTERNAL, "internal error")
                if polled.get(fd) is peer:
                    self._hand_back(peer, True)
                continue
            del data
            self._inline_ok = inline
            try:
                self._run(cmds)
            finally:
                self._inline_ok = False
            del cmds
            if polled.get(fd) is peer and (peer.resume is not None or peer.state is not _PeerState.OPEN):
                self._hand_back(peer, False)

    async def _releaser(self) -> None:
        """End each hold of the core's next batch (see _reader) once the
        readers that had bytes waiting have run: one scheduler pass (trio
        runs every task woken by the same I/O poll in one pass), more while
        the probe still sees bytes waiting, up to _HOLD_PASSES -- bytes that
        keep coming, or a connection whose reading is paused, cannot hold
        the batch longer than that.  The released batch commits inline here
        if no bytes are waiting by then (as a reader's would), else through
        the committer task."""
        probe = self._ready_probe
        while True:
            await self._release_wake.wait()
            self._release_wake = trio.Event()
            try:
                for _ in range(_HOLD_PASSES):
                    await trio.sleep(0)
                    if not probe.poll(0, 1):
                        break
            finally:
                self._holding = False
                self._inline_ok = True
                try:
                    self._run(self._core(self.broker.release_batches))
                finally:
                    self._inline_ok = False

    def _commit_done(self, req: StoreRequest, t0: float, results: Any, exc: Optional[Exception]) -> list[Command]:
        """The core's commands for a write request's outcome (``exc`` None:
        committed, with ``results``), counted in the statistics."""
        if exc is not None:
            # Nothing of the batch is acked: senders get
            # STORE_UNAVAILABLE and retry with the same local id.
            self._store_error(req, exc, write=True)
            cmds = self._core(self.broker.store_failed, req.request_id, exc)
        else:
            if self._store_failing is not None or self._store_logged is not None:
                self._store_writes_again()
            cmds = self._core(self.broker.store_completed, req.request_id, results)
            self._committed.set()
            self._committed = trio.Event()
        took = time.perf_counter() - t0
        self._stats["commit_seconds"] += took
        self._commit_time.observe(took)
        self._batch_ops.observe(len(req.ops))
        return cmds

    def _cluster_hint(self, kind: str, user: str, value: Any) -> None:
        """A hint from another node sharing the store (kinds and values as
        pimcore.store.redis_scripts._parse_hint gives them): ``I`` the
        user's inbox grew; ``R`` the device logged in on another node; ``M``
        the user's read marker moved; ``C`` the 1:1 peer read (a receipt);
        ``V`` tokens revoked; ``K`` the host kicked; ``U`` conversation
        settings changed; ``T`` a member is typing; ``P`` a node got a
        user's first device online or lost their last; ``H`` the user's
        last-seen privacy setting changed; ``F`` retention or a purge moved
        a conversation's history floor."""
        b = self.broker
        if kind == "I":
            self._run(self._core(b.inbox_advanced, user, value))
        elif kind == "R":
            self._run(self._core(b.replaced_elsewhere, user, value))
        elif kind == "M":
            self._run(self._core(b.read_elsewhere, user, *value))
        elif kind == "C":
            self._run(self._core(b.receipt_elsewhere, user, *value))
        elif kind == "V":
            self._run(self._core(b.revoked_elsewhere, user, *value))
        elif kind == "K":
            device, reason = value
            self._run(self._core(lambda now: b.kick(user, device, now, reason)))
        elif kind == "U":
            self._run(self._core(b.conversation_changed, user, value))
        elif kind == "T":
            self._run(self._core(b.typing_elsewhere, user, *value))
        elif kind == "P":
            self._run(self._core(b.presence_elsewhere, user, *value))
        elif kind == "H":
            self._run(self._core(b.privacy_elsewhere, user, value))
        elif kind == "F":
            self._run(self._core(b.floor_moved_elsewhere, user, *value))

    async def _presence_writer(self, cluster: Any, presence: Any) -> None:
        """Record this node's logins and logouts in the store, in order (a
        REPLACED close and the new login of the same device must not swap).
        A logout followed at once by a login of the same user (the core
        queues a device replaced by its own new login together) is no
        change for the other nodes' watchers: neither is told, as the core
        tells no flap locally."""
        held = None
        while True:
            if held is not None:
                item, held = held, None
            else:
                try:
                    item = await presence.receive()
                except trio.EndOfChannel:
                    return
            what, user, device, at = item
            try:
                if what == "on":
                    await cluster.device_online(user, device, at)
                    continue
                try:
                    held = presence.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    held = None
                if held is None or held[0] != "on" or held[1] != user:
                    await cluster.device_offline(user, device, at)
                    continue
                # The new login first (the user never has no record here
                # for another node's re-check to see); the same device's
                # record is simply rewritten.
                gone, (_, _, device, at), held = device, held, None
                what = "on"
                await cluster.device_online(user, device, at, tell=False)
                if gone != device:
                    what = "off"
                    await cluster.device_offline(user, gone, at, tell=False)
            except StoreError as exc:
                log.warning("presence %s %s/%s not recorded: %s", what, user, device, exc)

    async def _typing_writer(self, cluster: Any, typing_out: Any) -> None:
        """Push the core's TypingElsewhere to the other nodes, in order (a
        "stopped" must not overtake its "typing")."""
        async for t in typing_out:
            try:
                await cluster.tell_typing(t.user, t.conv, t.active, t.recipients, t.at)
            except Exception:  # best effort, never what stops the broker
                log.warning("typing of %s in %s not pushed to the other nodes", t.user, t.conv, exc_info=True)

    async def _presence_recheck(self, cluster: Any) -> None:
        """Every ``cluster.presence_every`` s: check that the other nodes
        the users watched here are online on are still live, and tell the
        core those that are not (Broker.presence_nodes_gone: a node that
        died without cleanup stops counting once its liveness key
        expired).  Every ``cluster.presence_recheck`` s instead: re-read
        where every watched user is online (Broker.presence_checked),
        which repairs a lost presence hint and renews this node's watch
        registrations."""
        b = self.broker
        since = 0.0
        while True:
            await trio.sleep(cluster.presence_every)
            since += cluster.presence_every
            try:
                if since >= cluster.presence_recheck:
                    since = 0.0
                    users = b.presence_watched()
                    asked = self.now()
                    states = await cluster.presence_refresh(users)
                    if states:
                        self._run(self._core(b.presence_checked, states, asked))
                else:
                    nodes = b.presence_nodes()
                    if nodes:
                        gone = nodes - await cluster.live_nodes(nodes)
                        if gone:
                            self._run(self._core(b.presence_nodes_gone, gone))
            except StoreError:
                continue  # the cluster is unreachable: the next round tries again
            except Exception:  # best effort, never what stops the broker
                log.warning("presence re-check failed", exc_info=True)

    async def _timer(self) -> None:
        """Sleep until the core's next deadline, then tell it the time.  _run
        pulls the deadline in when the core names an earlier one; a deadline
        that moved later only costs one early, harmless handle_timer."""
        while True:
            with trio.CancelScope() as scope:
                due = self.broker.next_deadline()
                if due is not None:
                    scope.deadline = trio.current_time() + (due - self.now()) / SECOND
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            self._run(self._core(self.broker.handle_timer))


#: A host call's answer when the server stopped before it came.
_STOPPED = object()


def _let_through(user: str, conv: str, payload: bytes) -> None:
    """The core's content filter when only the moderation webhook checks
    content (BrokerServer answers CheckContent itself, never calls this)."""
    return None


@asynccontextmanager
async def open_broker_server(
    store: Union[Store, AsyncStore],
    authenticate: Union[Authenticator, Callable[[bytes, int], Awaitable[Identity]]],
    config: ServerConfig = ServerConfig(),
    *,
    clock: Optional[Callable[[], int]] = None,
    node_id: Optional[bytes] = None,
) -> AsyncIterator[BrokerServer]:
    """Serve a broker for the duration of the block; on exit it shuts down
    gracefully (acks of committed batches flushed, Close(SHUTDOWN) sent).
    The store stays open: it belongs to the caller.  ``clock``: µs since
    the epoch; default a :class:`pimcore.clock.WallClock`, whose steps keep
    the core's timeouts at their real length (a clock passed in is trusted
    not to step, or to be a WallClock)."""
    server = BrokerServer(store, authenticate, config, clock=clock, node_id=node_id)
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            try:
                yield server
            finally:
                with trio.CancelScope(shield=True):
                    await server.shutdown()
                nursery.cancel_scope.cancel()
