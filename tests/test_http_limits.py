"""The HTTP listener against hostile or careless clients (a new operator's
trial, trial-o): a chunked body in tiny chunks, bodies sent with a wrong
key, idle connections up to max_connections, and what the listener tells
monitoring about what it refused.  Raw sockets on loopback; no timed
assertions (the clock-based ones run on trio's autojump clock)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from pimcore.http import HttpError, Request

from test_http import KEY, broker_http, host_port, metrics, read_until_eof

ROOT = Path(__file__).resolve().parent.parent


async def _echo(request: Request) -> tuple[int, Any]:
    return 200, {"bytes": len(request.body)}


def _chunked(n: int, size: int = 1) -> bytes:
    return b"%x\r\n%s\r\n" % (size, b"x" * size) * n + b"0\r\n\r\n"


def _head(method: str, path: str, *, key: str | None = KEY, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key is not None else ""
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}{extra}\r\n".encode()


def _status_and_error(reply: bytes) -> tuple[int, str, dict[str, str]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), json.loads(body)["error"]["code"] if body.startswith(b"{\"error\"") else "", headers


# ---------------------------------------------------------------- H1: a body in many tiny chunks


async def test_a_body_in_absurdly_many_small_chunks_is_refused() -> None:
    """170,000 one-byte chunks (under max_body_bytes) took about a second of
    the broker's loop each (h11 makes an event of every chunk): past 1,024
    chunks a body must average at least 256 bytes a chunk, else 400
    BAD_REQUEST saying so, and the connection ends."""
    with trio.fail_after(30):
        async with broker_http() as (srv, h):
            h.router.add("POST", "/echo", _echo)
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(_head("POST", "/echo", extra="Transfer-Encoding: chunked\r\n") + _chunked(20_000))
            status, code, _ = _status_and_error(await read_until_eof(stream))
            assert (status, code) == (400, "BAD_REQUEST")
            # Chunks a real client sends: 1,024 tiny ones, or many of 256 bytes and more, are read whole.
            for n, size in ((1024, 1), (3000, 256)):
                stream = await trio.open_tcp_stream(*host_port(h.url))
                await stream.send_all(_head("POST", "/echo", extra="Transfer-Encoding: chunked\r\n") + _chunked(n, size))
                reply = b""
                while not reply.endswith(b"}"):
                    reply += await stream.receive_some(65536)
                assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b'{"bytes":%d}' % (n * size)), reply
                await stream.aclose()


async def test_reading_a_chunked_body_lets_the_brokers_other_tasks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request reader fed a whole receive (64 KiB: thousands of chunk
    events) through h11 without a checkpoint, so nothing else of the broker
    ran meanwhile.  Counted, not timed: h11 events handled while a
    concurrent task never got to run."""
    ticks = 0
    longest = 0
    since = [0, -1]  # h11 events since the ticker last ran, the tick they are counted from
    real = h11.Connection.next_event

    def counting(self: h11.Connection) -> Any:
        nonlocal longest
        if since[1] != ticks:
            since[:] = [0, ticks]
        since[0] += 1
        longest = max(longest, since[0])
        return real(self)

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with broker_http() as (srv, h):
            h.router.add("POST", "/echo", _echo)
            stream = await trio.open_tcp_stream(*host_port(h.url))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                monkeypatch.setattr(h11.Connection, "next_event", counting)
                await stream.send_all(_head("POST", "/echo", extra="Transfer-Encoding: chunked\r\n") + _chunked(1000))
                reply = b""
                while not reply.endswith(b"}"):
                    reply += await stream.receive_some(65536)
                monkeypatch.undo()
                nursery.cancel_scope.cancel()
            assert reply.endswith(b'{"bytes":1000}'), reply
            assert longest <= 300, longest  # (before: every event of the body, over 1,000)


# ---------------------------------------------------------------- M2: refused from the head, the body unread


async def test_a_request_refused_from_its_head_is_answered_before_its_body_comes() -> None:
    """A wrong or missing key, an unknown path or method: answered from the
    head at once and the connection closed, the body never read (400
    connections sending 1 MiB with a wrong key took the broker from 211 MB
    to 680 MB).  request_timeout is 600 s: waiting for the body fails the test."""
    ran = 0

    async def handler(request: Request) -> tuple[int, Any]:
        nonlocal ran
        ran += 1
        return 200, {}

    chunked = "Transfer-Encoding: chunked\r\n"
    cases = [
        (_head("POST", "/echo", key="wrong-key", extra="Content-Length: 1000000\r\n"), 401, "AUTH_FAILED"),
        (_head("POST", "/echo", key=None, extra="Content-Length: 1000000\r\n"), 401, "AUTH_FAILED"),
        (_head("POST", "/echo", key="wrong-key", extra=chunked) + b"f4240\r\nxx", 401, "AUTH_FAILED"),
        (_head("POST", "/nosuch", extra="Content-Length: 1000000\r\n"), 404, "NOT_FOUND"),
        (_head("PUT", "/echo", extra="Content-Length: 1000000\r\n"), 405, "METHOD_NOT_ALLOWED"),
        (_head("POST", "/healthz", key=None, extra=chunked) + b"1\r\n \r\n", 405, "METHOD_NOT_ALLOWED"),
    ]
    with trio.fail_after(20):
        async with broker_http(request_timeout=600) as (srv, h):
            h.router.add("POST", "/echo", handler)
            for raw, want, code in cases:
                stream = await trio.open_tcp_stream(*host_port(h.url))
                await stream.send_all(raw)
                status, got, headers = _status_and_error(await read_until_eof(stream))
                assert (status, got) == (want, code), raw
                assert headers["connection"] == "close", headers
            assert ran == 0


async def test_a_client_that_expects_100_continue_is_told_to_send_its_body() -> None:
    """curl sends ``Expect: 100-continue`` with a body over 1 KiB and waits
    (a second) for ``100 Continue`` before sending it: nothing answered it,
    so every such post waited.  Now a head that passes (path, method, key,
    size) is answered 100 at once; one refused from its head gets its
    refusal instead, and the body is never asked for."""
    expect = "Expect: 100-continue\r\nContent-Length: 5000\r\n"
    with trio.fail_after(20):
        async with broker_http(request_timeout=600) as (srv, h):
            h.router.add("POST", "/echo", _echo)
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(_head("POST", "/echo", extra=expect))
            got = b""
            while b"\r\n\r\n" not in got:  # (request_timeout 600 s: no answer fails the test)
                got += await stream.receive_some(4096)
            assert got.startswith(b"HTTP/1.1 100 Continue\r\n"), got  # (its reason phrase too: it had none)
            await stream.send_all(b"x" * 5000)
            reply = got.partition(b"\r\n\r\n")[2]
            while not reply.endswith(b"}"):
                reply += await stream.receive_some(65536)
            assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b'{"bytes":5000}'), reply
            await stream.aclose()
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(_head("POST", "/echo", key="wrong-key", extra=expect))
            status, code, _ = _status_and_error(await read_until_eof(stream))
            assert (status, code) == (401, "AUTH_FAILED")


# ---------------------------------------------------------------- M3: probes at the connection limit


async def test_probes_and_the_scrape_are_answered_at_the_connection_limit() -> None:
    """max_connections idle connections made /healthz and /metrics 503 (a
    liveness probe would restart the broker): at the limit a few more
    connections are read, and /healthz, /readyz and /metrics served on them;
    anything else is 503 UNAVAILABLE "too many connections"."""
    import pimcore.http.server as server_mod

    reserve = getattr(server_mod, "PROBE_RESERVE", 16)
    with trio.fail_after(30):
        async with broker_http(max_connections=2, request_timeout=600) as (srv, h):
            idle = [await trio.open_tcp_stream(*host_port(h.url)) for _ in range(2)]
            while h._conns < 2:
                await trio.sleep(0.01)
            for path in ("/healthz", "/readyz", "/metrics"):
                stream = await trio.open_tcp_stream(*host_port(h.url))
                await stream.send_all(_head("GET", path, key=None))
                reply = await read_until_eof(stream)  # served, then the connection ends
                assert reply.startswith(b"HTTP/1.1 200 "), (path, reply[:300])
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(_head("GET", "/v1/info"))
            status, code, _ = _status_and_error(await read_until_eof(stream))
            assert (status, code) == (503, "UNAVAILABLE")
            # The reserve is bounded: with as many requests being answered in
            # it (not evictable, a probe path held here), 503 at once.
            release = trio.Event()

            async def held(request: Request) -> tuple[int, Any]:
                await release.wait()
                return 200, {}

            h.router.add("GET", "/held", held, auth=False)
            h.probe_paths = h.probe_paths | {"/held"}
            for _ in range(reserve):
                idle.append(await trio.open_tcp_stream(*host_port(h.url)))
                await idle[-1].send_all(_head("GET", "/held", key=None))
            while len(h._reserve) < reserve or any(s.evictable for s in h._reserve.values()):
                await trio.sleep(0.01)
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(_head("GET", "/healthz", key=None))
            status, code, _ = _status_and_error(await read_until_eof(stream))
            assert (status, code) == (503, "UNAVAILABLE")
            release.set()
            for s in idle[2:]:
                assert (await read_until_eof(s)).startswith(b"HTTP/1.1 200 ")
            for s in idle:
                await s.aclose()


async def test_a_connection_that_never_sends_a_byte_is_closed_after_request_timeout(
        autojump_clock: trio.abc.Clock) -> None:
    """Silent from its accept: closed after request_timeout (5 s here), not
    keepalive_timeout (60 s), which is for the silence between requests."""
    with trio.fail_after(200):
        async with broker_http(request_timeout=5.0, keepalive_timeout=60.0) as (srv, h):
            stream = await trio.open_tcp_stream(*host_port(h.url))
            t0 = trio.current_time()
            assert await read_until_eof(stream) == b""
            assert 5.0 <= trio.current_time() - t0 < 6.0
            # After a request, keepalive_timeout.
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(_head("GET", "/healthz", key=None))
            reply = b""
            while not reply.endswith(b"}"):
                reply += await stream.receive_some(65536)
            t0 = trio.current_time()
            assert await read_until_eof(stream) == b""
            assert 60.0 <= trio.current_time() - t0 < 61.0


def test_a_keepalive_timeout_too_short_to_keep_a_connection_alive_is_refused() -> None:
    """A new user's trial: ``keepalive_timeout = 0.0001`` was taken, and a
    connection was closed between a request and its next almost at once.
    At least 0.1 s (HttpConfig and the settings, each naming the setting)."""
    from pimcore.config import ConfigError, load_settings
    from pimcore.http import HttpConfig

    for seconds in (0.0001, 0.09, 0.0, -3.0):
        with pytest.raises(ValueError, match=r"^keepalive_timeout must be >= 0\.1 seconds"):
            HttpConfig(keepalive_timeout=seconds)
    assert HttpConfig(keepalive_timeout=0.1).keepalive_timeout == 0.1
    env = {"PIMCORE_HTTP": "tcp://127.0.0.1:0", "PIMCORE_HTTP_KEEPALIVE_TIMEOUT": "0.0001"}
    with pytest.raises(ConfigError) as err:
        load_settings(None, env=env)
    assert str(err.value) == ("http.keepalive_timeout: expected a number >= 0.1, got 0.0001"
                              " (from $PIMCORE_HTTP_KEEPALIVE_TIMEOUT)"), err.value
    env["PIMCORE_HTTP_KEEPALIVE_TIMEOUT"] = "0.1"
    assert load_settings(None, env=env).http_config().keepalive_timeout == 0.1


# ---------------------------------------------------------------- M10: refusals counted and logged


async def test_refused_requests_are_counted_and_logged_at_most_once_per_30_s_per_reason(
        autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pimcore.http")

    def refused() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", None) == "http_refused"]

    async def ask(raw: bytes) -> bytes:
        stream = await trio.open_tcp_stream(*host_port(h.url))
        await stream.send_all(raw)
        reply = await read_until_eof(stream)
        await stream.aclose()
        return reply

    with trio.fail_after(300):
        async with broker_http(request_timeout=5.0, max_body_bytes=1000, max_connections=1) as (srv, h):
            h.router.add("POST", "/echo", _echo)
            for _ in range(3):
                assert (await ask(_head("GET", "/v1/info", key="wrong-key-xyz", extra="Connection: close\r\n"))
                        ).startswith(b"HTTP/1.1 401 ")
            lines = refused()
            assert len(lines) == 1 and lines[0].reason == "auth" and lines[0].count == 1, caplog.text
            assert lines[0].levelno == logging.WARNING
            await trio.sleep(31)
            assert (await ask(_head("POST", "/echo", key=None, extra="Content-Length: 10\r\n"))).startswith(
                b"HTTP/1.1 401 ")
            lines = refused()
            assert len(lines) == 2 and lines[1].count == 3, caplog.text  # two unsaid, and this one
            assert (await ask(_head("POST", "/echo", extra="Content-Length: 5000\r\n"))).startswith(b"HTTP/1.1 413 ")
            assert (await ask(_head("GET", "/v1/info")[:-2])).startswith(b"HTTP/1.1 408 ")  # the head never ends
            while h._conns:  # (the connections above are gone)
                await trio.sleep(0.01)
            idle = await trio.open_tcp_stream(*host_port(h.url))
            while h._conns < 1:
                await trio.sleep(0.01)
            assert (await ask(_head("GET", "/v1/info"))).startswith(b"HTTP/1.1 503 ")
            await idle.aclose()
            assert [r.reason for r in refused()] == ["auth", "auth", "too_large", "timeout", "too_many_connections"]
            assert "wrong-key-xyz" not in caplog.text
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(_head("GET", "/metrics", key=None, extra="Connection: close\r\n"))
            text = (await read_until_eof(stream)).partition(b"\r\n\r\n")[2].decode()
            m = metrics(text)
            assert m[("pimcore_http_responses_total", (("status", "401"),))] == 4
            assert m[("pimcore_http_responses_total", (("status", "413"),))] == 1
            assert m[("pimcore_http_responses_total", (("status", "408"),))] == 1
            assert m[("pimcore_http_responses_total", (("status", "503"),))] == 1
            assert m[("pimcore_http_refused_total", (("reason", "auth"),))] == 4
            assert m[("pimcore_http_refused_total", (("reason", "too_many_connections"),))] == 1
            assert m[("pimcore_http_refused_total", (("reason", "malformed"),))] == 0
            assert m[("pimcore_http_connections", ())] >= 1


def test_operations_md_lists_the_http_listeners_metrics_and_log_events() -> None:
    """Every pimcore_http_* family the collector yields and every event the
    HTTP listener logs is in docs/OPERATIONS.md's tables."""
    import pimcore.http.metrics as metrics_mod
    import pimcore.http.server as server_mod

    ops = (ROOT / "docs" / "OPERATIONS.md").read_text()
    code = Path(metrics_mod.__file__).read_text()
    families = set(re.findall(r'"(pimcore_http_[a-z_]+)"', code))
    assert families >= {"pimcore_http_responses", "pimcore_http_refused", "pimcore_http_connections"}, families
    for name in families:
        assert f"`{name}" in ops, name
    events = set(re.findall(r'"event": "(http_[a-z_]+)"', Path(server_mod.__file__).read_text()))
    assert "http_refused" in events
    for event in events - {"http_request", "http_client_left"}:  # (debug lines)
        assert f"| `{event}` |" in ops, event


async def _open_idle(h: Any, n: int) -> list[trio.SocketStream]:
    """``n`` connections open and counted by the listener, nothing sent."""
    want = h._conns + n
    streams = [await trio.open_tcp_stream(*host_port(h.url)) for _ in range(n)]
    while h._conns < want:
        await trio.sleep(0.01)
    return streams


async def _keep_alive(h: Any, n: int) -> list[trio.SocketStream]:
    """``n`` keep-alive connections, each after one answered request (idle now)."""
    streams = []
    for _ in range(n):
        stream = await trio.open_tcp_stream(*host_port(h.url))
        await stream.send_all(_head("GET", "/healthz", key=None))
        reply = b""
        while not reply.endswith(b"}"):
            reply += await stream.receive_some(65536)
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        streams.append(stream)
    return streams


def _no_probe_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reserve's own deadline out of the way (its test is on the
    autojump clock): on a loaded machine 2 s of real time could close a
    silent connection before the probe comes, and the test would not test
    the eviction."""
    import pimcore.http.server as server_mod

    monkeypatch.setattr(server_mod, "PROBE_REQUEST_TIMEOUT", 600.0, raising=False)


async def _probe(h: Any, path: str = "/healthz") -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream(*host_port(h.url))
    await stream.send_all(_head("GET", path, key=None))
    reply = await read_until_eof(stream)
    await stream.aclose()
    return int(reply.split(b" ", 2)[1]) if reply else 0, reply


async def test_silent_connections_in_the_probe_reserve_do_not_keep_a_probe_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 connections that connect and never send a byte filled the probe
    reserve, and /healthz was 503 for request_timeout at a time (a liveness
    probe failing restarts a healthy broker).  A reserve connection without
    a whole request is evicted, the oldest first, by a newer one: the probe
    is 200, and each eviction is counted (refused, reason "evicted")."""
    import pimcore.http.server as server_mod
    _no_probe_deadline(monkeypatch)

    with trio.fail_after(30):
        async with broker_http(max_connections=2, request_timeout=600) as (srv, h):
            held = await _keep_alive(h, 2)
            held += await _open_idle(h, server_mod.PROBE_RESERVE)
            status, reply = await _probe(h)
            assert status == 200, reply[:300]  # (before: 503 UNAVAILABLE "too many connections")
            # The oldest silent one went, closed unanswered; the newer are still open.
            assert await read_until_eof(held[2]) == b""
            assert h._conns == 2 + server_mod.PROBE_RESERVE - 1
            held += await _open_idle(h, 1)  # (the reserve full again)
            status, reply = await _probe(h, "/metrics")
            assert status == 200, reply[:300]
            m = metrics(reply.partition(b"\r\n\r\n")[2].decode())
            assert m[("pimcore_http_refused_total", (("reason", "evicted"),))] == 2
            assert m[("pimcore_http_refused_total", (("reason", "too_many_connections"),))] == 0
            assert await read_until_eof(held[3]) == b""
            for s in held:
                await s.aclose()


async def test_slow_connections_in_the_probe_reserve_are_evicted_by_a_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow-loris in the reserve: connections that sent one byte, a head cut
    short, or a probe's whole head with a body that never comes (not a
    whole request: evictable) are evicted by a probe as silent ones are,
    the oldest first."""
    import pimcore.http.server as server_mod
    _no_probe_deadline(monkeypatch)

    starts = [b"G", _head("GET", "/healthz", key=None)[:-4],
              _head("GET", "/healthz", key=None, extra="Content-Length: 10\r\n") + b"x"]
    with trio.fail_after(30):
        async with broker_http(max_connections=2, request_timeout=600) as (srv, h):
            held = await _keep_alive(h, 2)
            slow = await _open_idle(h, server_mod.PROBE_RESERVE)
            for i, stream in enumerate(slow):
                await stream.send_all(starts[i % len(starts)])
            for i in range(len(starts)):
                status, reply = await _probe(h)
                assert status == 200, reply[:300]  # (before: 503)
                assert await read_until_eof(slow[i]) == b""  # the oldest, closed unanswered
                held += await _open_idle(h, 1)  # (the reserve full again: the probe's slot is free)
            assert h.refusals.total["evicted"] == len(starts)
            for s in held + slow:
                await s.aclose()


async def test_a_request_for_another_path_in_a_full_reserve_gets_its_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reserve full of silent connections: a newer connection asking
    for anything but a probe still evicts one (its request is not read yet
    when it is accepted), and is answered 503 "too many connections"."""
    import pimcore.http.server as server_mod
    _no_probe_deadline(monkeypatch)

    with trio.fail_after(30):
        async with broker_http(max_connections=2, request_timeout=600) as (srv, h):
            held = await _keep_alive(h, 2)
            held += await _open_idle(h, server_mod.PROBE_RESERVE)
            for raw in (_head("GET", "/v1/info"), _head("POST", "/v1/info", extra="Content-Length: 5\r\n") + b"12345"):
                stream = await trio.open_tcp_stream(*host_port(h.url))
                await stream.send_all(raw)
                status, code, headers = _status_and_error(await read_until_eof(stream))
                assert (status, code, headers["connection"]) == (503, "UNAVAILABLE", "close"), raw
                await stream.aclose()
            assert h.refusals.total["too_many_connections"] == 2
            assert await read_until_eof(held[2]) == b""
            # A probe after them is answered still.
            status, reply = await _probe(h)
            assert status == 200, reply[:300]
            for s in held:
                await s.aclose()


async def test_a_reserve_connection_has_probe_request_timeout_for_its_request(autojump_clock: trio.abc.Clock) -> None:
    """Unchallenged, a silent reserve connection is closed after
    PROBE_REQUEST_TIMEOUT (2 s), not request_timeout (600 s here); one whose
    head never ends gets 408 at the same deadline, counted as a timeout."""
    import pimcore.http.server as server_mod

    t = getattr(server_mod, "PROBE_REQUEST_TIMEOUT", 2.0)
    with trio.fail_after(300):
        async with broker_http(max_connections=1, request_timeout=600, keepalive_timeout=600) as (srv, h):
            held = await _keep_alive(h, 1)
            silent = (await _open_idle(h, 1))[0]
            t0 = trio.current_time()
            assert await read_until_eof(silent) == b""
            assert t <= trio.current_time() - t0 < t + 1
            slow = (await _open_idle(h, 1))[0]
            t0 = trio.current_time()
            await slow.send_all(b"GET /healthz HTTP/1.1\r\n")
            status, code, _ = _status_and_error(await read_until_eof(slow))
            assert (status, code) == (408, "REQUEST_TIMEOUT")
            assert t <= trio.current_time() - t0 < t + 1
            assert h.refusals.total["timeout"] == 1 and h.refusals.total["evicted"] == 0
            # The connection below the limit keeps its own timeouts.
            await held[0].send_all(_head("GET", "/healthz", key=None))
            assert (await held[0].receive_some(65536)).startswith(b"HTTP/1.1 200 ")
            await held[0].aclose()


async def test_a_request_abandoned_mid_way_is_not_counted_as_malformed() -> None:
    """A client that closes its side before its request is whole (mid-head,
    mid-body) sent nothing malformed: it is not counted a refusal (it was
    counted "malformed", and said in a warning).  It is still answered 400
    (a half-closed client can read it).  A malformed head still counts."""
    with trio.fail_after(30):
        async with broker_http(request_timeout=600) as (srv, h):
            h.router.add("POST", "/echo", _echo)
            for raw in (_head("GET", "/healthz", key=None)[:-2],
                        _head("POST", "/echo", extra="Content-Length: 10\r\n") + b"123",
                        _head("POST", "/echo", extra="Transfer-Encoding: chunked\r\n") + b"5\r\n12"):
                stream = await trio.open_tcp_stream(*host_port(h.url))
                await stream.send_all(raw)
                await stream.send_eof()
                status, code, _ = _status_and_error(await read_until_eof(stream))
                assert (status, code) == (400, "BAD_REQUEST"), raw
                await stream.aclose()
            assert h.refusals.total["malformed"] == 0  # (before: 3)
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n")
            status, code, _ = _status_and_error(await read_until_eof(stream))
            assert (status, code) == (400, "BAD_REQUEST")
            assert h.refusals.total["malformed"] == 1
            assert sum(h.refusals.total.values()) == 1


async def test_a_body_too_large_without_a_key_is_refused_for_the_key() -> None:
    """No API key or a wrong one with a Content-Length over max_body_bytes:
    401, not 413 -- a client without a key learnt max_body_bytes.  With the
    key, 413.  Both from the head, the body unread (request_timeout is
    600 s: waiting for the body fails the test)."""
    big = "Content-Length: 5000\r\n"
    with trio.fail_after(20):
        async with broker_http(request_timeout=600, max_body_bytes=1000) as (srv, h):
            h.router.add("POST", "/echo", _echo)
            for key, want in ((None, (401, "AUTH_FAILED")), ("wrong-key", (401, "AUTH_FAILED")),
                              (KEY, (413, "PAYLOAD_TOO_LARGE"))):
                stream = await trio.open_tcp_stream(*host_port(h.url))
                await stream.send_all(_head("POST", "/echo", key=key, extra=big))
                status, code, _ = _status_and_error(await read_until_eof(stream))
                assert (status, code) == want, key  # (before: 413 without a key)
                await stream.aclose()


async def test_the_chunk_rules_message_counts_every_chunk_whatever_the_reads() -> None:
    """2,000 one-byte chunks in one write: refused at the 1,029th chunk,
    "1029 for 1029 bytes".  It said "1029 for 1030" when the parser was fed
    a chunk's size line and its data in two pieces (h11 marks such a chunk
    as no chunk's start: it was not counted, a byte too many for the count
    said); the head's length is varied so that every alignment of the
    pieces (4 KiB each) against the 6-byte chunks is met."""
    with trio.fail_after(30):
        async with broker_http(request_timeout=600) as (srv, h):
            h.router.add("POST", "/echo", _echo)
            for pad in range(6):
                stream = await trio.open_tcp_stream(*host_port(h.url))
                extra = f"Transfer-Encoding: chunked\r\nX-Pad: {'a' * pad}\r\n"
                await stream.send_all(_head("POST", "/echo", extra=extra) + _chunked(2000))
                reply = await read_until_eof(stream)
                message = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"]
                assert message.startswith("the chunked body is in too many small chunks: 1029 for 1029 bytes "), \
                    (pad, message)
                await stream.aclose()


async def test_chunks_whose_size_line_and_data_come_apart_are_held_to_the_chunk_rule() -> None:
    """Each one-byte chunk's size line and data in two writes: the listener
    read them apart and counted none of the chunks (h11's chunk_start), so
    1,100 tiny chunks were taken whole.  Now the 1,029th is refused."""
    with trio.fail_after(30):
        async with broker_http(request_timeout=600) as (srv, h):
            h.router.add("POST", "/echo", _echo)
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(_head("POST", "/echo", extra="Transfer-Encoding: chunked\r\n"))
            try:
                for _ in range(1100):
                    await stream.send_all(b"1\r\n")
                    await trio.sleep(0)  # (the listener reads the size line alone)
                    await stream.send_all(b"x\r\n")
                    await trio.sleep(0)
                await stream.send_all(b"0\r\n\r\n")
            except trio.BrokenResourceError:
                pass  # (refused and closed before the last chunks)
            reply = b""
            while not reply.endswith(b"}"):  # (a 200 keeps the connection: not read to its end)
                reply += await stream.receive_some(65536)
            status, code, _ = _status_and_error(reply)
            assert (status, code) == (400, "BAD_REQUEST"), reply  # (before: 200 {"bytes":1100})


async def test_a_zero_padded_chunk_size_is_read_or_refused_for_what_it_is() -> None:
    """RFC 9112 7.1 allows leading zeros in a chunk size: "0010" is read (16
    bytes).  The parser (h11) reads at most 20 hex digits, so 21 and more,
    zeros too, are refused 400 -- saying so, not "a chunk size that is not
    hexadecimal", which it is (a new user's trial)."""
    chunked = "Transfer-Encoding: chunked\r\nConnection: close\r\n"
    with trio.fail_after(30):
        async with broker_http(request_timeout=600) as (srv, h):
            h.router.add("POST", "/echo", _echo)
            for size, want in ((b"0010", b'{"bytes":16}'), (b"0" * 18 + b"10", b'{"bytes":16}'),
                               (b"0" * 19 + b"10", b"more than 20 hex digits"),
                               (b"0" * 40 + b"10;ext=1", b"more than 20 hex digits"),
                               (b"1g", b"not hexadecimal")):
                stream = await trio.open_tcp_stream(*host_port(h.url))
                await stream.send_all(_head("POST", "/echo", extra=chunked) + size + b"\r\n" + b"x" * 16
                                      + b"\r\n0\r\n\r\n")
                reply = await read_until_eof(stream)
                assert want in reply, (size, reply)
                await stream.aclose()


async def test_a_reserve_connection_evicted_while_it_lingers_is_counted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reserve connection refused 503 (another path) lingers, draining,
    and is evictable then (else 16 such held the reserve for the linger):
    evicted, it is not counted a second time -- its refusal was."""
    import pimcore.http.server as server_mod

    _no_probe_deadline(monkeypatch)
    monkeypatch.setattr(server_mod, "_LINGER_SECONDS", 600.0)
    reserve = server_mod.PROBE_RESERVE
    with trio.fail_after(30):
        async with broker_http(max_connections=2, request_timeout=600) as (srv, h):
            held = await _keep_alive(h, 2)
            held += await _open_idle(h, reserve)
            refused = await trio.open_tcp_stream(*host_port(h.url))  # evicts the oldest silent one
            await refused.send_all(_head("GET", "/v1/info"))
            status, code, _ = _status_and_error(await read_until_eof(refused))  # (our EOF; it lingers)
            assert (status, code) == (503, "UNAVAILABLE")
            accepted = h.connections
            # 15 evict the silent ones left, the 16th the lingering one.
            held += [await trio.open_tcp_stream(*host_port(h.url)) for _ in range(reserve)]
            while h.connections < accepted + reserve:
                await trio.sleep(0.01)
            assert sorted(h._reserve) == list(range(accepted + 1, accepted + reserve + 1))  # (the newest hold it)
            assert h.refusals.total["too_many_connections"] == 1
            assert h.refusals.total["evicted"] == reserve  # (not reserve + 1)
            for s in [*held, refused]:
                await s.aclose()
