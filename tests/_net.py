"""Helpers for network tests: a broker on 127.0.0.1:0, tokens, raw sockets."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import AsyncIterator, Callable, Optional

import trio

from pimcore import frames as F
from pimcore.auth import JwtAuthenticator, issue_token
from pimcore.client import ClientConfig, Client, open_client
from pimcore.codec import Decoder, encode_frame
from pimcore.core import SECOND, BrokerConfig, Limits
from pimcore.net import Endpoint, ServerConfig, open_broker_server
from pimcore.net.server import DEFAULT_BROKER_CONFIG, BrokerServer
from pimcore.store import Store

SECRET = b"test-secret-0123456789abcdef-0123456789"
OTHER_SECRET = b"someone-else-0123456789abcdef-012345678"

#: Short timeouts so reconnects and retries happen within a test.
FAST_CLIENT = ClientConfig(ack_timeout=1.0, send_timeout=20.0, connect_timeout=5.0, backoff_initial=0.02, backoff_max=0.3)


def token(user: str, device: Optional[str] = None, *, secret: bytes = SECRET, ttl: float = 600.0, now: Optional[float] = None) -> str:
    return issue_token(secret, user, device, ttl=ttl, now=now)


def server_config(*listeners: Endpoint, limits: Optional[Limits] = None, **kw: object) -> ServerConfig:
    broker: BrokerConfig = DEFAULT_BROKER_CONFIG
    if limits is not None:
        broker = replace(broker, limits=limits)
    for key in ("idle_timeout", "login_timeout"):
        if key in kw:
            broker = replace(broker, **{key: int(float(kw.pop(key)) * SECOND)})  # type: ignore[arg-type]
    if "rate_limit_strikes" in kw:
        broker = replace(broker, rate_limit_strikes=int(kw.pop("rate_limit_strikes")))  # type: ignore[call-overload]
    return ServerConfig(listeners=listeners or (Endpoint("tcp"),), broker=broker, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def serving(store: Store, config: Optional[ServerConfig] = None, *, leeway: float = 30.0,
                  clock: Optional[Callable[[], int]] = None) -> AsyncIterator[BrokerServer]:
    """A broker on ``store`` (``clock``: its µs clock, default the wall clock)."""
    kw = {} if clock is None else {"clock": clock}
    async with open_broker_server(store, JwtAuthenticator(SECRET, leeway=leeway), config or server_config(), **kw) as srv:
        yield srv


@asynccontextmanager
async def client(url: str, user: str, device: str = "phone", **kw: object) -> AsyncIterator[Client]:
    kw.setdefault("config", FAST_CLIENT)
    async with open_client(url, token(user), device, **kw) as c:  # type: ignore[arg-type]
        yield c


async def take_messages(c: Client, n: int) -> list[F.Message]:
    """The next ``n`` messages ``c`` receives."""
    got = []
    async for m in c.messages():
        got.append(m)
        if len(got) == n:
            return got
    raise AssertionError("event stream ended")


async def wait_for(c: Client, pred: Callable[[object], bool]) -> object:
    """The next event of ``c`` that ``pred`` accepts."""
    async for ev in c.events():
        if pred(ev):
            return ev
    raise AssertionError("event stream ended")


class RawConn:
    """A hand-driven connection speaking frames, for abuse tests."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = Decoder(1 << 22)

    @classmethod
    async def open(cls, port: int, *, rcvbuf: Optional[int] = None) -> "RawConn":
        if rcvbuf is None:
            return cls(await trio.open_tcp_stream("127.0.0.1", port))
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        return cls(trio.SocketStream(sock))

    async def send(self, *frames: F.Frame) -> None:
        await self.stream.send_all(b"".join(encode_frame(f) for f in frames))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next(self) -> Optional[F.Frame]:
        """The next frame, or None at EOF."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.decoder.feed(data)

    async def until(self, kind: type) -> F.Frame:
        while True:
            f = await self.next()
            if f is None:
                raise EOFError(f"closed before {kind.__name__}")
            if isinstance(f, kind):
                return f

    async def login(self, user: str, device: str = "raw", caps: int = 0) -> F.LoginAck:
        await self.send(F.Login(token(user).encode(), device, int(time.time() * 1e6), 0, caps))
        return await self.until(F.LoginAck)  # type: ignore[return-value]

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# ---------------------------------------------------------------- failed TLS handshakes

#: A WebSocket upgrade as a plain ws:// client sends it (to a wss:// port in tests).
WS_UPGRADE = (b"GET /im HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def _send_then_read_to_the_end(port: int, data: bytes, *, eof: bool = False) -> None:
    """Connect, send ``data`` (then EOF if ``eof``), and read until the
    server hangs up (a reset counts: it may close with our bytes unread)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(data)
        if eof:
            await stream.send_eof()
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def answer_login(stream: trio.abc.HalfCloseableStream, answer: bytes = b"") -> None:
    """A fake server's one connection: read the Login, send ``answer`` (a
    Close frame, another service's banner; nothing: a hang-up), end our
    side, then read until the client hangs up too (no unread bytes: no
    reset overtakes the answer)."""
    async with stream:
        await stream.receive_some()  # the Login
        if answer:
            await stream.send_all(answer)
        await stream.send_eof()
        with trio.move_on_after(5):
            while await stream.receive_some():
                pass


async def plain_text_to(port: int, data: bytes) -> None:
    """Send ``data`` in the clear to a TLS port, then read until the server
    hangs up."""
    await _send_then_read_to_the_end(port, data)


def client_hello() -> bytes:
    """A TLS ClientHello, as a client's first bytes."""
    out = ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname="127.0.0.1")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


async def hang_up_mid_handshake(port: int, *, reset: bool = False) -> None:
    """Start a TLS handshake (half of a ClientHello) and hang up.  With
    ``reset``: send the whole ClientHello, wait for the server's answer (so
    it surely read it) and reset -- the server's socket then forgets the
    peer's address."""
    hello = client_hello()
    if not reset:
        await _send_then_read_to_the_end(port, hello[: len(hello) // 2], eof=True)
        return
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        await stream.send_all(hello)
        assert await stream.receive_some(), "the server hung up instead of answering the ClientHello"
    finally:
        await stream.aclose()


async def connect_and_close(port: int, *, reset: bool = False) -> None:
    """What a load balancer's health check does: connect, send nothing,
    close (with a FIN, or a reset if ``reset``)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if reset:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


def tls_silent(records: list, transport: str) -> list:
    """The ``tls_silent`` log records of ``transport``: connections to a TLS
    port closed before sending a byte (no handshake, not a failed one)."""
    return [r for r in records if getattr(r, "event", None) == "tls_silent" and getattr(r, "transport", None) == transport]


def tls_failures(records: list, transport: str) -> list:
    """The ``tls_failed`` log records of ``transport`` (tls, wss, https)."""
    return [r for r in records if getattr(r, "event", None) == "tls_failed" and getattr(r, "transport", None) == transport]
