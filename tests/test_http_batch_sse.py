"""The server API's batch post, unread / read-position reads and the event
stream over server-sent events, with real HTTP clients on loopback port 0:
stdlib http.client (as tests/test_http_api.py) and, for the streams, an h11
client on a trio socket (so a test can stop reading, or drop the
connection, exactly when it wants)."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from typing import Any, Optional

import h11
import pytest
import trio

from pimcore.client import open_client
from pimcore.embed import SYSTEM
from pimcore.http.api import MAX_BATCH
from pimcore.store import direct_conversation

from _net import FAST_CLIENT, token
from test_http import KEY, assert_error, host_port, read_until_eof
from test_http_api import api, call

AB = direct_conversation("alice", "bob")
MESSAGES = "/v1/messages"


# ---------------------------------------------------------------- batch post


async def test_a_batch_posts_to_several_conversations_with_results_in_request_order(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            await im.create_group("ops", ["carol"])
            batch = {"messages": [
                {"conv": "team", "payload": "t1", "idempotency_key": "a"},
                {"conv": "ops", "payload_b64": base64.b64encode(b"\x00o1").decode(), "idempotency_key": "b"},
                {"conv": "team", "payload": "t2", "sender": "alice", "device": "web", "idempotency_key": "c"},
                {"conv": "nope", "payload": "x"},
                {"conv": "team", "payload": "x", "sender": "mallory"},
                {"conv": "team"},
                "not an object",
                {"conv": "team", "payload": "t3"},
                {"conv": "team", "payload": "t1", "idempotency_key": "a"},  # the first one again, in the same batch
            ]}
            async with open_client(im.server.url(), token("bob"), "phone", config=FAST_CLIENT) as bob:
                status, doc = await call(c, "POST", MESSAGES, batch)
                assert status == 200
                res = doc["results"]
                assert [r["status"] for r in res] == ["stored", "stored", "stored", "error", "error", "error", "error",
                                                      "stored", "duplicate"]
                assert [(r["conv"], r["seq"]) for r in res if r["status"] != "error"] == [
                    ("team", 1), ("ops", 1), ("team", 2), ("team", 3), ("team", 1)]
                assert res[8]["msg_id"] == res[0]["msg_id"]
                assert [(r["code"], "message" in r) for r in res if r["status"] == "error"] == [
                    ("UNKNOWN_CONVERSATION", True), ("NOT_MEMBER", True), ("BAD_REQUEST", True), ("BAD_REQUEST", True)]
                assert "messages[5]" in res[5]["message"] and "payload" in res[5]["message"]
                got = []
                async for m in bob.messages():
                    got.append((m.sender, m.payload, m.seq))
                    if len(got) == 3:
                        break
                assert got == [(SYSTEM, b"t1", 1), ("alice", b"t2", 2), (SYSTEM, b"t3", 3)]
            # The whole batch retried (a lost response): keyed items are duplicates,
            # the one without a key is stored again (no key, no dedupe).
            status, again = await call(c, "POST", MESSAGES, batch)
            assert [r["status"] for r in again["results"]] == ["duplicate", "duplicate", "duplicate", "error", "error",
                                                               "error", "error", "stored", "duplicate"]
            assert [r.get("seq") for r in again["results"][:3]] == [1, 1, 2] and again["results"][7]["seq"] == 4
            assert [m.payload for m in await im.history("team", "bob", backward=False)] == [b"t1", b"t2", b"t3", b"t3"]
            # The same key with another payload is a per-item conflict.
            status, doc = await call(c, "POST", MESSAGES, {"messages": [{"conv": "team", "payload": "other",
                                                                         "idempotency_key": "a"}]})
            assert status == 200 and doc["results"][0]["code"] == "DUPLICATE_CONFLICT"


async def test_batch_limits_and_malformed_batches(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            for body in ({}, {"messages": []}, {"messages": {"conv": "team"}}, [1],
                         {"messages": [{"conv": "team", "payload": "x"}] * (MAX_BATCH + 1)}):
                status, doc = await call(c, "POST", MESSAGES, body)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert "messages" in doc["error"]["message"] or "object" in doc["error"]["message"]
            # MAX_BATCH small messages fit the default body limit and are stored in order.
            status, doc = await call(c, "POST", MESSAGES, {"messages": [
                {"conv": "team", "payload": str(i), "idempotency_key": f"k{i}"} for i in range(MAX_BATCH)]})
            assert status == 200 and [r["seq"] for r in doc["results"]] == list(range(1, MAX_BATCH + 1))
            # Over the body limit: 413 before the body is read; nothing stored.
            # (Over a raw stream that sends the head only: http.client sends
            # the whole body and may meet the server's hang-up mid-way, a
            # BrokenPipeError instead of the answer.)
            big = json.dumps({"messages": [{"conv": "team", "payload": "y" * 60_000}] * 20}).encode()
            stream = await trio.open_tcp_stream(*host_port(h.url))
            await stream.send_all(b"POST %s HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n"
                                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                  % (MESSAGES.encode(), KEY.encode(), len(big)))
            reply = await read_until_eof(stream)
            assert reply.startswith(b"HTTP/1.1 413 "), reply
            assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "PAYLOAD_TOO_LARGE"
            assert (await im.history("team", "alice", limit=1))[0].seq == MAX_BATCH
            assert_error(*await call(c, "POST", MESSAGES, {"messages": [{"conv": "team", "payload": "x"}]}, key=None),
                         401, "AUTH_FAILED")


# ---------------------------------------------------------------- unread and read positions


async def test_unread_and_read_positions(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            async with open_client(im.server.url(), token("alice"), "phone", config=FAST_CLIENT) as alice:
                for i in range(3):
                    await alice.send("team", b"t%d" % i)
                await alice.send(AB, b"hi")
            assert await call(c, "GET", "/v1/users/bob/unread?conv=team") == (200, {"user": "bob", "conv": "team", "unread": 3})
            assert await call(c, "GET", "/v1/users/bob/unread") == (200, {"user": "bob", "conv": None, "unread": 4})
            assert await call(c, "GET", "/v1/users/alice/unread") == (200, {"user": "alice", "conv": None, "unread": 0})
            # A group that does not exist: 404, as its history and settings (a new user's trial)
            assert_error(*await call(c, "GET", "/v1/users/bob/unread?conv=nope"), 404, "UNKNOWN_CONVERSATION")
            async with open_client(im.server.url(), token("bob"), "tablet", config=FAST_CLIENT) as bob:
                n = 0
                async for _ in bob.messages():
                    n += 1
                    if n == 4:
                        break
                await bob.mark_read("team", 2)
                for _ in range(500):  # device registration and acks are stored lazily
                    status, pos = await call(c, "GET", "/v1/users/bob/read-positions")
                    if [d["position"] for d in pos["devices"]] == [4]:
                        break
                    await trio.sleep(0.01)
                assert status == 200
                assert (pos["user"], pos["head"], pos["floor"]) == ("bob", 4, 0)
                assert sorted((m["conv"], m["read_seq"]) for m in pos["markers"]) == sorted([("team", 2), (AB, 0)])
                [dev] = pos["devices"]
                assert set(dev) == {"device", "position", "last_seen", "online"}
                assert (dev["device"], dev["online"]) == ("tablet", True) and dev["last_seen"] > 0
            assert (await call(c, "GET", "/v1/users/bob/unread"))[1]["unread"] == 2
            status, pos = await call(c, "GET", "/v1/users/bob/read-positions")
            assert [(d["device"], d["online"]) for d in pos["devices"]] == [("tablet", False)]
            assert await call(c, "GET", "/v1/users/nobody/read-positions") == (
                200, {"user": "nobody", "head": 0, "floor": 0, "markers": [], "devices": []})
            assert_error(*await call(c, "GET", "/v1/users/bad%0Aid/read-positions"), 400, "BAD_REQUEST")
            assert_error(*await call(c, "GET", "/v1/users/bad%0Aid/unread"), 400, "BAD_REQUEST")


# ---------------------------------------------------------------- server-sent events


class Sse:
    """An SSE client: h11 over a trio TCP stream.  ``rcvbuf`` shrinks the
    socket's receive buffer (a client that stops reading fills it fast)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.buf = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.ended = False

    @classmethod
    async def open(cls, url: str, path: str, *, last_event_id: Optional[int] = None, rcvbuf: int = 0) -> "Sse":
        host, port = host_port(url)
        sock = trio.socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect((host, port))
        self = cls(trio.SocketStream(sock))
        headers = [("host", host), ("authorization", f"Bearer {KEY}"), ("accept", "text/event-stream")]
        if last_event_id is not None:
            headers.append(("last-event-id", str(last_event_id)))
        await self.stream.send_all(self.conn.send(h11.Request(method="GET", target=path, headers=headers)))
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()))
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Response):
                self.status = ev.status_code
                self.headers = {k.decode(): v.decode() for k, v in ev.headers}
                return self

    async def _next(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            return ev

    async def body(self) -> bytes:
        """The rest of a (non-stream) response body."""
        out = b""
        while True:
            ev = await self._next()
            if isinstance(ev, h11.Data):
                out += ev.data
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                return out

    async def block(self) -> tuple[Optional[int], Optional[dict[str, Any]], list[str]]:
        """The next SSE block: (id, data as JSON, comment lines)."""
        while b"\n\n" not in self.buf:
            ev = await self._next()
            if isinstance(ev, h11.Data):
                self.buf += ev.data
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                self.ended = True
                raise EOFError("the stream ended")
        raw, self.buf = self.buf.split(b"\n\n", 1)
        eid, data, comments = None, None, []
        for line in raw.decode().split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].strip())
            elif line.startswith("id: "):
                eid = int(line[4:])
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        return eid, data, comments

    async def event(self) -> tuple[int, dict[str, Any]]:
        """The next event, skipping comments and keep-alives."""
        while True:
            eid, data, _ = await self.block()
            if data is not None:
                assert eid == data["id"]
                return eid, data

    async def aclose(self) -> None:
        await self.stream.aclose()


async def test_events_arrive_live_over_sse_and_resume_with_last_event_id(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            s = await Sse.open(h.url, "/v1/events/stream?consumer=push&keepalive=0.1")
            assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
            assert s.headers["cache-control"] == "no-cache"
            assert (await s.block())[2][0] == "pimcore events consumer=push after=0"
            # Live: a post made after the stream opened arrives on it.
            await im.post("team", b"one", sender="alice", device="web")
            eid, first = await s.event()
            assert first["type"] == "message" and base64.b64decode(first["payload_b64"]) == b"one"
            assert first["offline_recipients"] == ["alice", "bob"]
            # Nothing to send: keep-alive comments.
            while "keep-alive" not in (await s.block())[2]:
                pass
            await s.aclose()  # a disconnect; meanwhile more events are recorded
            for i in range(5):
                await im.post("team", b"m%d" % i, sender="alice", device="web")
            s = await Sse.open(h.url, "/v1/events/stream?consumer=push&keepalive=0.1", last_event_id=eid)
            got = []
            while len(got) < 5:
                got.append(await s.event())
            assert [e[0] for e in got] == list(range(eid + 1, eid + 6))
            assert [base64.b64decode(d["payload_b64"]) for _, d in got] == [b"m%d" % i for i in range(5)]
            await s.aclose()
            # No Last-Event-ID: from the durable cursor, which a stream does not move.
            s = await Sse.open(h.url, "/v1/events/stream?consumer=push")
            assert (await s.event())[0] == 1
            await s.aclose()
            assert await call(c, "POST", "/v1/events/ack", {"consumer": "push", "upto": eid + 5}) == (
                200, {"consumer": "push", "cursor": eid + 5})
            s = await Sse.open(h.url, "/v1/events/stream?consumer=push&keepalive=0.1")
            await im.post("team", b"after ack", sender="alice", device="web")
            eid2, d = await s.event()
            assert eid2 == eid + 6 and base64.b64decode(d["payload_b64"]) == b"after ack"
            await s.aclose()
            # Bad requests are JSON errors before any stream starts.
            for path, headers, code in (("/v1/events/stream?keepalive=0", None, "BAD_REQUEST"),
                                        ("/v1/events/stream?limit=0", None, "BAD_REQUEST"),
                                        ("/v1/events/stream?consumer=bad%0Aname", None, "BAD_REQUEST"),
                                        ("/v1/events/stream", {"Last-Event-ID": "x"}, "BAD_REQUEST"),
                                        # (a digit to str.isdigit, not to int(): it was a 500)
                                        ("/v1/events/stream", {"Last-Event-ID": "\u00b2"}, "BAD_REQUEST")):
                assert_error(*await call(c, "GET", path, headers=headers), 400, code)


async def test_the_request_timeout_does_not_end_a_healthy_stream(tmp_path: Path) -> None:
    """request_timeout 0.3 s and keepalive_timeout 0.3 s, a stream idle for
    well over both: still delivering."""
    from pimcore.embed import open_pimcore
    from pimcore.http import HttpConfig, open_http_server

    from _net import SECRET

    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, secret=SECRET.decode(), events=True) as im:
            cfg = HttpConfig(api_keys=(KEY,), request_timeout=0.3, keepalive_timeout=0.3)
            async with open_http_server(im.server, cfg, handle=im) as h:
                await im.create_group("team", ["alice"])
                s = await Sse.open(h.url, "/v1/events/stream?keepalive=0.1")
                await trio.sleep(1.2)
                await im.post("team", b"late")
                _, d = await s.event()
                assert base64.b64decode(d["payload_b64"]) == b"late"
                assert h.streams == 1 and h.streams_dropped == 0
                await s.aclose()


async def test_a_client_that_stops_reading_is_closed_with_bounded_memory(tmp_path: Path, caplog) -> None:
    import logging
    import tracemalloc

    from pimcore.embed import open_pimcore
    from pimcore.http import HttpConfig, open_http_server

    from _net import SECRET

    caplog.set_level(logging.WARNING, logger="pimcore.http")
    with trio.fail_after(60):
        async with open_pimcore(data_dir=tmp_path, secret=SECRET.decode(), events=True, max_payload=60_000) as im:
            async with open_http_server(im.server, HttpConfig(api_keys=(KEY,), request_timeout=0.5), handle=im) as h:
                await im.create_group("team", ["alice"])
                s = await Sse.open(h.url, "/v1/events/stream?limit=10", rcvbuf=4096)
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    peak = 0
                    # ~24 MB of events that the client never reads.
                    for i in range(400):
                        await im.post("team", bytes([i % 251]) * 60_000)
                        if h.streams_dropped:
                            break
                    while not h.streams_dropped:
                        await trio.sleep(0.05)
                    peak = tracemalloc.get_traced_memory()[1] - base
                finally:
                    tracemalloc.stop()
                assert h.streams == 0 and h.streams_dropped == 1
                # One page of events (10 x 80 KB of JSON) and the socket
                # buffers, not the 24 MB recorded.
                assert peak < 8_000_000, peak
                [rec] = [r for r in caplog.records if getattr(r, "event", None) == "http_stream_dropped"]
                assert rec.path == "/v1/events/stream"
                await s.aclose()


async def test_a_stalled_event_stream_holds_its_page_once(tmp_path: Path) -> None:
    # A client that stops reading holds one page of the stream until the
    # write timeout -- once: the page was held as the producer's buffer, a
    # bytes copy of it and h11's chunk joined with its framing (three
    # copies), and the events it was made from besides.
    import tracemalloc

    from pimcore.embed import open_pimcore
    from pimcore.http import HttpConfig, open_http_server

    from _net import SECRET

    events, size = 40, 60_000
    with trio.fail_after(60):
        async with open_pimcore(data_dir=tmp_path, secret=SECRET.decode(), events=True, max_payload=size) as im:
            async with open_http_server(im.server, HttpConfig(api_keys=(KEY,), request_timeout=5.0), handle=im) as h:
                await im.create_group("team", ["alice"])
                for i in range(events):
                    await im.post("team", bytes([i]) * size)
                page = events * (size * 4 // 3)  # (each event's payload in base64, the rest of its JSON besides)
                tracemalloc.start()
                try:
                    base = tracemalloc.get_traced_memory()[0]
                    s = await Sse.open(h.url, f"/v1/events/stream?limit={events}", rcvbuf=4096)
                    await trio.sleep(1.0)  # the page is made and its write blocks
                    held = tracemalloc.get_traced_memory()[0] - base
                finally:
                    tracemalloc.stop()
                assert h.streams == 1 and h.streams_dropped == 0
                assert page < held < 1.5 * page, (held, page)
                await s.aclose()


# ---------------------------------------------------------------- metrics


async def test_metrics_list_every_family_the_issue_names_and_the_event_outbox_depth(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, headers, text = await c.request("GET", "/metrics")
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}

    with trio.fail_after(30):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            m = await scrape()
            assert m[("pimcore_event_last_id", ())] == 0
            assert not [k for k in m if k[0] == "pimcore_event_outbox_depth"]  # no consumer yet
            for i in range(3):
                await im.post("team", b"m%d" % i, sender="alice", device="web", idempotency_key=f"k{i}")
            await im.post("team", b"m0", sender="alice", device="web", idempotency_key="k0")  # a duplicate
            _, last = await im.event_cursor("push")
            assert last == 3
            await im.ack_events(1, "push")
            await im.ack_events(0, "audit")
            m = await scrape()
            assert m[("pimcore_event_last_id", ())] == 3
            assert m[("pimcore_event_outbox_depth", (("consumer", "push"),))] == 2
            assert m[("pimcore_event_outbox_depth", (("consumer", "audit"),))] == 3
            await im.ack_events(3, "push")
            assert (await scrape())[("pimcore_event_outbox_depth", (("consumer", "push"),))] == 0
            # HEAD is safe: it makes no consumer (a trial's link checker made
            # durable cursors that held the event log for 90 days); GET does.
            for path in ("/v1/events?consumer=checker", "/v1/events/stream?consumer=checker"):
                assert (await c.request("HEAD", path, key=KEY))[0] == 200, path
            assert not [k for k in await scrape() if k[0] == "pimcore_event_outbox_depth" and ("consumer", "checker") in k[1]]
            assert (await c.request("GET", "/v1/events?consumer=reader", key=KEY))[0] == 200
            assert (await scrape())[("pimcore_event_outbox_depth", (("consumer", "reader"),))] == 3
            # Every family the issue lists.
            names = {name for name, _ in m}
            for want in ("pimcore_connections", "pimcore_logins_total", "pimcore_messages_stored_total",
                         "pimcore_duplicates_total", "pimcore_pushes_total", "pimcore_outbound_queue_bytes",
                         "pimcore_batch_ops_bucket", "pimcore_batch_ops_count", "pimcore_commit_seconds_bucket",
                         "pimcore_commit_seconds_sum", "pimcore_event_outbox_depth"):
                assert want in names, want
            assert m[("pimcore_messages_stored_total", ())] == 3 and m[("pimcore_duplicates_total", ())] == 1
            assert m[("pimcore_auth_failures_total", (("reason", "expired"),))] == 0
            assert m[("pimcore_closes_total", (("code", "KICKED"),))] == 0


# ---------------------------------------------------------------- open_pimcore(http=URL)


async def test_an_embedded_broker_serves_the_http_api_when_asked(tmp_path: Path, monkeypatch) -> None:
    from pimcore.embed import open_pimcore

    from _net import SECRET
    from test_http import Http

    monkeypatch.setenv("PIMCORE_HTTP", "tcp://127.0.0.1:0")  # the environment alone does not open one
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "a", secret=SECRET.decode()) as im:
            assert im.http_url is None and im.http is None
        async with open_pimcore(data_dir=tmp_path / "b", secret=SECRET.decode(), http="tcp://127.0.0.1:0",
                                api_keys=[KEY]) as im:
            assert im.http_url is not None and im.http_url.startswith("http://127.0.0.1:")
            assert not im.http_url.endswith(":0")
            c = Http(im.http_url)
            try:
                assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice"]}))[0] == 201
                assert (await call(c, "POST", MESSAGES, {"messages": [{"conv": "team", "payload": "x"}]}))[1][
                    "results"][0]["status"] == "stored"
                assert [m.payload for m in await im.history("team", "alice")] == [b"x"]
                assert_error(*await call(c, "GET", "/v1/info", key="wrong"), 401, "AUTH_FAILED")
                assert await c.json("GET", "/readyz") == (200, {"status": "ready"})
            finally:
                c.close()
        # No api_keys: a generated key in the data directory, as `pimcore serve --http` does.
        async with open_pimcore(data_dir=tmp_path / "c", secret=SECRET.decode(), http="tcp://127.0.0.1:0") as im:
            key = (tmp_path / "c" / "api-key").read_text().strip()
            c = Http(im.http_url)
            try:
                assert (await c.json("GET", "/v1/info", key=key))[0] == 200
            finally:
                c.close()


# ---------------------------------------------------------------- clients that leave


async def _raw_request(url: str, *requests: bytes) -> trio.SocketStream:
    host, port = host_port(url)
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(b"".join(requests))
    return stream


def _get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n\r\n" % (path.encode(), KEY.encode())


async def test_a_stream_or_long_poll_whose_client_left_frees_its_connection_slot(tmp_path: Path) -> None:
    """max_connections 2: an SSE stream and a long-poll (wait 25 s) take
    both slots; once their clients hang up (one with FIN, one with a reset)
    a new connection is served at once, not after the next keep-alive write
    or the end of the wait."""
    from pimcore.embed import open_pimcore
    from pimcore.http import HttpConfig, open_http_server

    from _net import SECRET

    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path, secret=SECRET.decode(), events=True) as im:
            cfg = HttpConfig(api_keys=(KEY,), max_connections=2, keepalive_timeout=30)
            async with open_http_server(im.server, cfg, handle=im) as h:
                for how in ("fin", "reset"):
                    s = await Sse.open(h.url, "/v1/events/stream?keepalive=20")
                    assert s.status == 200
                    while h.streams != 1:
                        await trio.sleep(0.01)
                    poll = await _raw_request(h.url, _get("/v1/events?consumer=lp&wait=25"))
                    await trio.sleep(0.2)  # the long-poll is waiting
                    full = await _raw_request(h.url, _get("/v1/info"))  # (a probe is served at the limit)
                    try:  # both slots taken: 503 (or its reset, the request being unread)
                        assert (await full.receive_some(65536)).startswith(b"HTTP/1.1 503")
                    except trio.BrokenResourceError:
                        pass
                    await full.aclose()
                    if how == "reset":
                        for sock in (s.stream.socket, poll.socket):
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    await s.aclose()
                    await poll.aclose()
                    with trio.fail_after(3):  # not 20 s (keep-alive) or 25 s (the wait)
                        while h.streams:
                            await trio.sleep(0.02)
                        while True:
                            probe = await _raw_request(h.url, _get("/v1/info"))
                            answer = await probe.receive_some(65536)
                            await probe.aclose()
                            if answer.startswith(b"HTTP/1.1 200"):
                                break
                            await trio.sleep(0.05)


async def test_a_request_pipelined_behind_a_long_poll_is_answered_after_it(tmp_path: Path) -> None:
    """Bytes that arrive while a long-poll waits (the client's next request)
    are kept and answered in order on the same connection."""
    from pimcore.embed import open_pimcore
    from pimcore.http import HttpConfig, open_http_server

    from _net import SECRET

    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path, secret=SECRET.decode(), events=True) as im:
            async with open_http_server(im.server, HttpConfig(api_keys=(KEY,)), handle=im) as h:
                await im.create_group("team", ["alice"])
                _, last = await im.event_cursor("lp")
                stream = await _raw_request(h.url, _get(f"/v1/events?consumer=lp&wait=10&after={last}"))
                await trio.sleep(0.2)  # the long-poll waits; now the next request arrives
                await stream.send_all(_get("/v1/info") + _get("/healthz"))
                await trio.sleep(0.2)
                await im.post("team", b"wake")
                conn = h11.Connection(h11.CLIENT)
                for _ in range(3):
                    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
                    conn.send(h11.EndOfMessage())
                    answers: list[Any] = []
                    while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
                        if ev is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(ev, (h11.Response, h11.Data)):
                            answers.append(ev)
                    assert answers[0].status_code == 200, answers
                    body = json.loads(b"".join(a.data for a in answers[1:]))
                    if _ == 0:
                        assert [base64.b64decode(e["payload_b64"]) for e in body["events"]] == [b"wake"], body
                    elif _ == 1:
                        assert "version" in json.dumps(body), body
                    conn.start_next_cycle()
                await stream.aclose()


async def test_deeply_nested_json_is_a_400_without_a_traceback(tmp_path: Path, caplog) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="pimcore")
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                        b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
                for path in ("/v1/messages", "/v1/groups", "/v1/conversations/team/messages"):
                    assert_error(*await call(c, "POST", path, raw=raw), 400, "BAD_REQUEST")
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


async def test_a_wait_or_keepalive_of_point_five_or_five_point_is_taken(tmp_path: Path) -> None:
    """Seconds as '.5' and '5.' (float() takes them; the ASCII-only check
    first refused them)."""
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            for q in ("wait=.5", "wait=1.", "wait=0.25"):
                status, doc = await call(c, "GET", f"/v1/events?{q}")
                assert status == 200, (q, doc)
