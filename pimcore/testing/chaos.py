"""A user-space "bad network" TCP proxy for tests (trio).

The CI machines have no ``netem``, so link degradation is simulated in user
space: :func:`open_chaos_proxy` listens on loopback, and every connection a
client makes to it is relayed to ``target_host:target_port`` through a link
that adds latency, jitter, a bandwidth cap, fragmentation, stalls and resets.
The proxy is protocol-agnostic (pure bytes) and imports nothing from pimcore.

Per proxied connection there is one nursery with two *pumps* (client->server
"up" and server->client "down").  Each pump is a reader task and a writer task
joined by a byte-bounded FIFO::

    src --receive_some(chunk_size)--> [reader] --(deliver_at, chunk)--> queue
    queue --> [writer: sleep_until, pause gate, stall, reset, bandwidth] --> dst

* The writer is the only consumer and handles chunks strictly in FIFO order,
  and waits for ``max(deliver_at, previous deliver_at)``: jitter can bunch
  chunks together but can never reorder bytes within a direction.
* The queue is bounded in *bytes* (``ChaosConfig.max_buffer``): when a
  direction is stalled/paused the reader stops reading, the kernel buffers
  fill up and the sender is back-pressured instead of the proxy growing
  without bound.  (Bounding bytes rather than chunks keeps small writes from
  throttling throughput to ``n_chunks / latency``.)
* All time comes from ``trio.current_time()``/``trio.sleep_until`` so the
  proxy runs under :class:`trio.testing.MockClock` (``autojump_clock``).
* Randomness is deterministic: each direction of each connection has its own
  ``random.Random`` seeded from ``(seed, connection index, direction)``, and
  the reader draws exactly three numbers per chunk whatever the config says.
  Separate streams matter because trio's scheduler interleaves tasks in a
  randomised order, so a shared generator would not replay; a fixed number of
  draws per chunk means toggling one knob does not shift the others' streams.

Resets are abortive: ``SO_LINGER`` is set to ``(on, 0s)`` before closing both
sockets, so both peers get an RST (``ECONNRESET`` ->
:class:`trio.BrokenResourceError`) instead of a clean FIN.  EOFs (half-closes)
are forwarded as EOFs via ``send_eof``, after the same latency as data.
"""

from __future__ import annotations

import math
import random
import socket as _stdlib_socket
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import trio

__all__ = ["ChaosConfig", "ChaosProxy", "ChaosStatistics", "open_chaos_proxy"]

# Under a bandwidth cap a chunk is paced out in slices worth this much link
# time, so a big chunk on a slow link trickles (like a real link) rather than
# arriving in one lump after len/bandwidth seconds.
_BANDWIDTH_QUANTUM: Final = 0.05

# SO_LINGER with l_onoff=1, l_linger=0: close() discards unsent data and sends
# RST.  struct linger is two C ints on every platform trio supports.
_LINGER_ABORT: Final = struct.pack("ii", 1, 0)

# Errors from the upstream connect that mean "the target is not there" (as
# opposed to bugs, which must crash the test loudly).
_UPSTREAM_ERRORS: Final = (OSError,)

# What a peer disappearing looks like on a trio stream.
_STREAM_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """How to degrade the link.  Immutable: change it at runtime with
    ``proxy.config = dataclasses.replace(proxy.config, ...)``; the new values
    apply to chunks handled from then on (and to new connections)."""

    latency: float = 0.0
    """Seconds, one way, added to every chunk (and EOF) in each direction."""
    jitter: float = 0.0
    """Uniform +- seconds added to ``latency`` (clamped at 0).  Never reorders
    bytes within a direction: a chunk waits for its predecessor."""
    bandwidth: float | None = None
    """Bytes/second cap per direction per connection, ``None`` = unlimited.
    Strict pacing (a token bucket with no burst credit): N bytes take at
    least N/bandwidth seconds to get through."""
    chunk_size: int = 65536
    """Max bytes read (and so forwarded) per chunk; small values fragment
    frames to exercise split reads in the peers."""
    stall_probability: float = 0.0
    """Per chunk, probability that the direction stalls before delivering
    it..."""
    stall_duration: float = 0.0
    """...for this many seconds (data is queued, not lost)."""
    reset_probability: float = 0.0
    """Per chunk, probability that the whole proxied connection is reset (both
    sides get an RST, queued data is dropped; the chunk is not delivered)."""
    reset_after_bytes: int | None = None
    """Deterministic reset: once a connection has forwarded this many bytes
    (both directions together) it is reset; the chunk crossing the limit is
    truncated so exactly this many bytes are handed to the kernel.  A peer
    that keeps reading receives them all before the RST (Linux keeps
    already-received data readable ahead of the ECONNRESET)."""
    seed: int | None = None
    """Seed for all random decisions; ``None`` picks one at random (exposed as
    :attr:`ChaosProxy.seed` so a failure can be replayed)."""
    idle_timeout: float | None = None
    """Seconds: a connection across which nothing arrived, in either
    direction, for longer than this is dropped *silently*, as a NAT or a
    carrier gateway drops an idle mapping.  From then on every byte either
    peer sends is discarded and nobody is told (no RST, no FIN): only a peer
    that expects an answer (a heartbeat) can find out.  When a peer finally
    closes or resets its end, the proxy resets both (the proxy's own cleanup;
    a real NAT would drop that FIN too).  ``None`` = never."""
    max_buffer: int = 1 << 20
    """Bytes queued per direction per connection before the proxy stops
    reading from the sender (backpressure; the queue can overshoot by at most
    one chunk).  Also caps the bytes in flight, so throughput is at most about
    ``max_buffer / latency``.  Not in the original spec: an extra knob."""

    def __post_init__(self) -> None:
        # Validate here so that dataclasses.replace() is checked too.
        if not (self.latency >= 0 and math.isfinite(self.latency)):
            raise ValueError(f"latency must be finite and >= 0, got {self.latency!r}")
        if not (self.jitter >= 0 and math.isfinite(self.jitter)):
            raise ValueError(f"jitter must be finite and >= 0, got {self.jitter!r}")
        if self.bandwidth is not None and not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise ValueError(f"bandwidth must be None or finite and > 0, got {self.bandwidth!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size!r}")
        for name in ("stall_probability", "reset_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not (self.stall_duration >= 0 and math.isfinite(self.stall_duration)):
            raise ValueError(f"stall_duration must be finite and >= 0, got {self.stall_duration!r}")
        if self.reset_after_bytes is not None and self.reset_after_bytes < 0:
            raise ValueError(f"reset_after_bytes must be None or >= 0, got {self.reset_after_bytes!r}")
        if self.idle_timeout is not None and not (self.idle_timeout > 0 and math.isfinite(self.idle_timeout)):
            raise ValueError(f"idle_timeout must be None or finite and > 0, got {self.idle_timeout!r}")
        if self.max_buffer < 1:
            raise ValueError(f"max_buffer must be >= 1, got {self.max_buffer!r}")


@dataclass(frozen=True, slots=True)
class ChaosStatistics:
    """A snapshot of the proxy's counters (see :meth:`ChaosProxy.statistics`)."""

    connections_total: int
    """Client connections accepted."""
    connections_open: int
    """Proxied connections not yet torn down."""
    resets: int
    """Connections reset *by the chaos* (random, ``reset_after_bytes``,
    :meth:`ChaosProxy.reset_all`).  A reset coming from a peer is relayed as a
    reset to the other peer but not counted here."""
    bytes_up: int
    """Bytes delivered client -> server (counted when ``send_all`` returns,
    which may be just after the receiver has already read them)."""
    bytes_down: int
    """Bytes delivered server -> client (same caveat)."""
    stalls: int
    """Stalls injected (all directions, all connections)."""
    connect_failures: int
    """Connections whose upstream connect failed (the client got an RST)."""
    idle_drops: int = 0
    """Connections dropped silently for being idle (``idle_timeout``)."""


class _Eof:
    """Queue marker for "the sender half-closed"; it travels with latency."""

    __slots__ = ()


_EOF: Final = _Eof()
_UP: Final = 0
_DOWN: Final = 1


@dataclass(slots=True)
class _Item:
    deliver_at: float
    data: bytes | _Eof
    # Pre-drawn uniforms, compared against the config at *delivery* time so a
    # runtime config change affects queued chunks too, without drawing in two
    # tasks (which would make the random streams scheduling-dependent).
    u_stall: float = 1.0
    u_reset: float = 1.0

    @property
    def size(self) -> int:
        return 0 if isinstance(self.data, _Eof) else len(self.data)


class _ChunkQueue:
    """Single-producer single-consumer FIFO bounded in bytes.

    The producer waits for room *before* reading, so a blocked direction holds
    no data in the reader task and the sender is throttled by TCP itself.  A
    chunk is admitted whenever the queue is below the limit, so one chunk
    larger than the limit still gets through (no deadlock)."""

    __slots__ = ("_items", "_bytes", "_readable", "_writable")

    def __init__(self) -> None:
        self._items: deque[_Item] = deque()
        self._bytes = 0
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()

    async def wait_for_room(self, limit: int) -> None:
        while self._bytes >= limit:
            await self._writable.park()

    def put(self, item: _Item) -> None:
        self._items.append(item)
        self._bytes += item.size
        self._readable.unpark_all()

    async def get(self) -> _Item:
        while not self._items:
            await self._readable.park()
        item = self._items.popleft()
        self._bytes -= item.size
        self._writable.unpark_all()
        return item


def _abort_stream(stream: trio.SocketStream | None) -> None:
    """Close ``stream`` so the peer sees an RST, synchronously."""
    if stream is None:
        return
    sock = stream.socket
    if sock.fileno() == -1:
        return
    try:
        sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_LINGER, _LINGER_ABORT)
    except OSError:
        # Not supported / already dead: a FIN is the best we can do.
        pass
    # trio's socket close() is synchronous and wakes any task blocked on the
    # fd with ClosedResourceError (we cancel those tasks first anyway).
    sock.close()


def _close_stream(stream: trio.SocketStream | None) -> None:
    """Close ``stream`` normally (FIN), synchronously."""
    if stream is not None:
        stream.socket.close()


class _Connection:
    """One proxied connection: the two sockets and its shared state."""

    __slots__ = ("index", "client", "upstream", "cancel_scope", "aborted", "forwarded", "rngs", "last_active", "dropped")

    def __init__(self, index: int, client: trio.SocketStream, seed: int) -> None:
        self.index = index
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.cancel_scope = trio.CancelScope()
        self.aborted = False
        # Bytes handed to the kernel in both directions, *reserved before* the
        # await in send_all so the two writers cannot both overshoot
        # reset_after_bytes.
        self.forwarded = 0
        # When bytes last arrived from either peer (idle_timeout), and whether
        # the "NAT mapping" is gone.
        self.last_active = trio.current_time()
        self.dropped = False
        # str seeds are hashed with SHA-512 by random.Random: stable across
        # runs and processes (unlike hash()).
        self.rngs = (
            random.Random(f"pimcore-chaos/{seed}/{index}/up"),
            random.Random(f"pimcore-chaos/{seed}/{index}/down"),
        )

    def abort(self) -> bool:
        """Reset both sides now.  Returns False if already aborted.

        Cancel first, then close: cancelling removes our tasks from the fds'
        wait queues, so closing does not hand them ClosedResourceError."""
        if self.aborted:
            return False
        self.aborted = True
        self.cancel_scope.cancel()
        _abort_stream(self.client)
        _abort_stream(self.upstream)
        return True


class _Pacer:
    """Per-direction link state for the writer."""

    __slots__ = ("last_deliver_at", "link_free_at")

    def __init__(self) -> None:
        self.last_deliver_at = -math.inf
        self.link_free_at = -math.inf


class ChaosProxy:
    """A running chaos proxy; create it with :func:`open_chaos_proxy`.

    Clients connect to ``(host, port)``.  Pause semantics: while paused,
    nothing is forwarded in either direction on any connection (data queues
    up to ``max_buffer`` per direction, then TCP back-pressures the senders);
    new connections are still accepted by the kernel and by the proxy (the
    listen socket cannot refuse them without looking like a RST) but are not
    connected upstream until :meth:`resume`, so the server does not see them
    during an outage.  Timers keep running while paused: a chunk whose
    latency elapsed during the pause is delivered immediately on resume.
    """

    def __init__(self, host: str, port: int, target_host: str, target_port: int, config: ChaosConfig) -> None:
        self.host: str = host
        self.port: int = port
        self.target_host: str = target_host
        self.target_port: int = target_port
        self._config = config
        # A concrete seed even when none was given, so a failure can be
        # replayed with ChaosConfig(seed=proxy.seed).
        self._auto_seed = random.SystemRandom().randrange(2**63)
        self._connections: set[_Connection] = set()
        self._paused = False
        self._resumed = trio.Event()
        self._resumed.set()
        self._connections_total = 0
        self._resets = 0
        self._bytes = [0, 0]
        self._stalls = 0
        self._connect_failures = 0
        self._idle_drops = 0

    # -- public API -------------------------------------------------------

    @property
    def config(self) -> ChaosConfig:
        return self._config

    @config.setter
    def config(self, config: ChaosConfig) -> None:
        if not isinstance(config, ChaosConfig):
            raise TypeError(f"expected ChaosConfig, got {type(config).__name__}")
        self._config = config

    @property
    def seed(self) -> int:
        """The seed in effect for new connections."""
        return self._config.seed if self._config.seed is not None else self._auto_seed

    @property
    def paused(self) -> bool:
        return self._paused

    def reset_all(self) -> int:
        """Abruptly close (RST) every current proxied connection, including
        those still waiting to connect upstream.  Returns how many."""
        count = 0
        for conn in list(self._connections):
            if conn.abort():
                count += 1
        self._resets += count
        return count

    def pause(self) -> None:
        """Stop forwarding in both directions on all connections (a total
        outage).  Idempotent."""
        if not self._paused:
            self._paused = True
            self._resumed = trio.Event()

    def resume(self) -> None:
        """Undo :meth:`pause`: queued data flows again (still paced by the
        latency/bandwidth settings), pending connections connect upstream."""
        if self._paused:
            self._paused = False
            self._resumed.set()

    def statistics(self) -> ChaosStatistics:
        return ChaosStatistics(
            connections_total=self._connections_total,
            connections_open=len(self._connections),
            resets=self._resets,
            bytes_up=self._bytes[_UP],
            bytes_down=self._bytes[_DOWN],
            stalls=self._stalls,
            connect_failures=self._connect_failures,
            idle_drops=self._idle_drops,
        )

    # -- internals ----------------------------------------------------------

    async def _wait_resumed(self) -> None:
        # Loop: pause() may be called again right after resume() woke us.
        while self._paused:
            await self._resumed.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = _Connection(self._connections_total, client, self.seed)
        self._connections_total += 1
        self._connections.add(conn)
        try:
            with conn.cancel_scope:
                await self._wait_resumed()
                try:
                    conn.upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
                except _UPSTREAM_ERRORS:
                    # Target down: the closest a proxy gets to "connection
                    # refused" after having accepted is an RST.
                    self._connect_failures += 1
                    conn.abort()
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, conn, client, conn.upstream, _UP)
                    nursery.start_soon(self._pump, conn, conn.upstream, client, _DOWN)
        finally:
            self._connections.discard(conn)
            if conn.aborted:
                # Covers a reset_all() racing the upstream connect: the new
                # upstream socket gets the RST too.
                _abort_stream(conn.client)
                _abort_stream(conn.upstream)
            else:
                # Both EOFs forwarded, or proxy shutdown: close cleanly.
                _close_stream(conn.client)
                _close_stream(conn.upstream)

    async def _pump(self, conn: _Connection, src: trio.SocketStream, dst: trio.SocketStream, direction: int) -> None:
        queue = _ChunkQueue()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reader, conn, src, queue, direction)
            await self._writer(conn, dst, queue, direction)

    async def _reader(self, conn: _Connection, src: trio.SocketStream, queue: _ChunkQueue, direction: int) -> None:
        rng = conn.rngs[direction]
        while True:
            await queue.wait_for_room(self._config.max_buffer)
            try:
                data = await src.receive_some(self._config.chunk_size)
            except _STREAM_ERRORS:
                # The sender reset us (or we closed it in abort()): relay the
                # reset to the other peer, as the real path would.
                conn.abort()
                return
            now = trio.current_time()
            cfg = self._config
            if cfg.idle_timeout is not None and not conn.dropped and now - conn.last_active > cfg.idle_timeout:
                conn.dropped = True  # the mapping expired: silence from now on
                self._idle_drops += 1
            conn.last_active = now
            if conn.dropped:
                if not data:
                    conn.abort()  # a peer gave up: clean up both sockets
                    return
                rng.random(), rng.random(), rng.random()  # the same draws as a forwarded chunk
                continue
            if not data:
                queue.put(_Item(now + cfg.latency, _EOF))
                return
            # Always exactly three draws per chunk (see module docstring).
            u_jitter, u_stall, u_reset = rng.random(), rng.random(), rng.random()
            delay = max(0.0, cfg.latency + (2.0 * u_jitter - 1.0) * cfg.jitter)
            queue.put(_Item(now + delay, data, u_stall, u_reset))

    async def _writer(self, conn: _Connection, dst: trio.SocketStream, queue: _ChunkQueue, direction: int) -> None:
        pacer = _Pacer()
        while True:
            item = await queue.get()
            # No reordering: never deliver before the previous chunk.
            pacer.last_deliver_at = max(item.deliver_at, pacer.last_deliver_at)
            await trio.sleep_until(pacer.last_deliver_at)
            await self._wait_resumed()
            if isinstance(item.data, _Eof):
                try:
                    await dst.send_eof()
                except _STREAM_ERRORS:
                    conn.abort()
                return
            cfg = self._config
            if item.u_stall < cfg.stall_probability:
                self._stalls += 1
                await trio.sleep(cfg.stall_duration)
                await self._wait_resumed()
                cfg = self._config
            if item.u_reset < cfg.reset_probability:
                self._inject_reset(conn)
                return
            data = item.data
            reset_after = False
            if cfg.reset_after_bytes is not None:
                room = max(0, cfg.reset_after_bytes - conn.forwarded)
                if room <= len(data):
                    data = data[:room]
                    reset_after = True
            conn.forwarded += len(data)
            try:
                await self._transmit(dst, data, direction, pacer)
            except _STREAM_ERRORS:
                conn.abort()
                return
            if reset_after:
                self._inject_reset(conn)
                return

    async def _transmit(self, dst: trio.SocketStream, data: bytes, direction: int, pacer: _Pacer) -> None:
        bandwidth = self._config.bandwidth
        if bandwidth is None:
            if data:
                await dst.send_all(data)
                self._bytes[direction] += len(data)
            return
        step = max(1, int(bandwidth * _BANDWIDTH_QUANTUM))
        for offset in range(0, len(data), step):
            piece = data[offset : offset + step]
            # The link is busy until the previous piece finished serialising;
            # this piece is fully "on the wire" len/bandwidth later.  Idle time
            # earns no credit (no burst), so the cap is a strict upper bound.
            start = max(trio.current_time(), pacer.link_free_at)
            pacer.link_free_at = start + len(piece) / bandwidth
            await trio.sleep_until(pacer.link_free_at)
            await self._wait_resumed()
            await dst.send_all(piece)
            self._bytes[direction] += len(piece)

    def _inject_reset(self, conn: _Connection) -> None:
        if conn.abort():
            self._resets += 1


async def _listen_socket(host: str) -> trio.socket.SocketType:
    # One socket on port 0 (trio.open_tcp_listeners would open one per address
    # family for names like "localhost", each with its own port).
    infos = await trio.socket.getaddrinfo(host, 0, type=_stdlib_socket.SOCK_STREAM, flags=_stdlib_socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = trio.socket.socket(family, type_, proto)
    try:
        await sock.bind(sockaddr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def open_chaos_proxy(
    target_host: str,
    target_port: int,
    config: ChaosConfig = ChaosConfig(),
    *,
    listen_host: str = "127.0.0.1",
) -> AsyncIterator[ChaosProxy]:
    """Run a chaos proxy to ``target_host:target_port`` for the duration of
    the ``async with`` block and yield its :class:`ChaosProxy` (clients
    connect to ``proxy.host, proxy.port``).  On exit the listener and every
    proxied connection are closed cleanly (FIN, not RST).

    An exception raised in the block propagates unchanged (not wrapped in an
    ExceptionGroup by the proxy's internal nursery)."""
    if not isinstance(config, ChaosConfig):
        raise TypeError(f"expected ChaosConfig, got {type(config).__name__}")
    sock = await _listen_socket(listen_host)
    host, port = sock.getsockname()[:2]
    proxy = ChaosProxy(host, port, target_host, target_port, config)
    listener = trio.SocketListener(sock)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        # serve_listeners owns (and closes) the listener; it also backs off on
        # EMFILE & co. instead of crashing.  Handlers run in its own nursery,
        # which is inside ours, so cancelling ours tears everything down.
        await nursery.start(trio.serve_listeners, proxy._handle, [listener])
        try:
            yield proxy
        except BaseException as exc:
            # With strict exception groups, raising inside the nursery would
            # wrap the caller's exception; hold it and re-raise it outside.
            # (If one of our tasks crashed instead, the nursery raises that
            # group and this is never reached.)
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
