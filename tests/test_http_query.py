"""Query parameters of the HTTP API are read as strictly as JSON bodies.

Before: an unknown query parameter was ignored (``history?user=bob&Limit=5``
gave 50 messages, ``events?consumr=push`` read the default consumer's
cursor), a blank one was taken as absent (``?consumer=`` read the default
consumer, where ``{"consumer": ""}`` is refused), and the seqs and positions
stopped at 2^63-1 where the wire protocol and the handle take 0..2^64-1.
Now: every endpoint refuses a parameter it does not take, naming it and the
ones it takes; a blank value is refused (but ``cursor=``, the first page's
cursor); seqs and event ids take 0..2^64-1, past it a 400 ``BAD_REQUEST``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from test_http import KEY, Http, assert_error
from test_http_api import api, call
from test_http_batch_sse import Sse

U64 = (1 << 64) - 1

#: Every endpoint the listener serves with the server API, and a valid value
#: of each query parameter it takes (docs/HTTP.md).  A test below checks it
#: lists exactly the routed endpoints: a new one must be added here.
TAKES: dict[tuple[str, str], dict[str, str]] = {
    ("GET", "/"): {},
    ("GET", "/healthz"): {},
    ("GET", "/readyz"): {},
    ("GET", "/metrics"): {},
    ("GET", "/v1/info"): {},
    ("GET", "/v1/openapi.json"): {},
    ("GET", "/v1/conversations/{conv}/retention"): {},
    ("PUT", "/v1/conversations/{conv}/retention"): {},
    ("DELETE", "/v1/conversations/{conv}"): {},
    ("DELETE", "/v1/users/{user}"): {},
    ("POST", "/v1/conversations/{conv}/messages"): {},
    ("POST", "/v1/messages"): {},
    ("POST", "/v1/conversations/{conv}/messages/{seq}/recall"): {},
    ("POST", "/v1/conversations/{conv}/messages/{seq}/edit"): {},
    ("POST", "/v1/conversations/{conv}/messages/{seq}/delete"): {},
    ("GET", "/v1/conversations/{conv}/history"): {"user": "alice", "from_seq": "0", "limit": "10", "backward": "false"},
    ("POST", "/v1/groups"): {},
    ("GET", "/v1/groups/{conv}/members"): {},
    ("POST", "/v1/groups/{conv}/members"): {},
    ("POST", "/v1/groups/{conv}/members/remove"): {},
    ("DELETE", "/v1/groups/{conv}/members/{user}"): {},
    ("POST", "/v1/users/{user}/kick"): {},
    ("POST", "/v1/users/{user}/revoke"): {},
    ("GET", "/v1/users/{user}/conversations"): {},
    ("GET", "/v1/users/{user}/conversation-list"): {"cursor": "", "limit": "5", "include_hidden": "true"},
    ("POST", "/v1/users/{user}/conversations/{conv}/settings"): {},
    ("GET", "/v1/users/{user}/devices"): {},
    ("GET", "/v1/users/{user}/presence"): {},
    ("GET", "/v1/users/{user}/unread"): {"conv": "team"},
    ("GET", "/v1/users/{user}/read-positions"): {},
    ("POST", "/v1/tokens"): {},
    ("GET", "/v1/events"): {"consumer": "push", "after": "0", "limit": "5", "wait": "0"},
    ("GET", "/v1/events/stream"): {"consumer": "push", "after": "0", "limit": "5", "keepalive": "1"},
    ("POST", "/v1/events/ack"): {},
    ("GET", "/v1/events/consumers"): {},
    ("DELETE", "/v1/events/consumers/{consumer}"): {},
}

#: A body each endpoint would act on, were its query taken (so a refusal is
#: the query's, not the body's).
BODIES: dict[tuple[str, str], Any] = {
    ("PUT", "/v1/conversations/{conv}/retention"): {"max_count": 5},
    ("POST", "/v1/conversations/{conv}/messages"): {"payload": "not stored"},
    ("POST", "/v1/messages"): {"messages": [{"conv": "team", "payload": "not stored"}]},
    ("POST", "/v1/conversations/{conv}/messages/{seq}/edit"): {"payload": "not stored"},
    ("POST", "/v1/conversations/{conv}/messages/{seq}/delete"): {"user": "alice"},
    ("POST", "/v1/groups"): {"conv": "newgroup", "members": ["alice"]},
    ("POST", "/v1/groups/{conv}/members"): {"users": ["carol"]},
    ("POST", "/v1/groups/{conv}/members/remove"): {"users": ["bob"]},
    ("POST", "/v1/users/{user}/conversations/{conv}/settings"): {"pinned": True},
    ("POST", "/v1/tokens"): {"user": "alice"},
    ("POST", "/v1/events/ack"): {"consumer": "push", "upto": 0},
}


#: The probes and the scrape, which ignore a query string (what an operator's
#: load balancer or scraper adds must not mark a healthy broker down).
PROBES = ("/", "/healthz", "/readyz", "/metrics")


def concrete(pattern: str) -> str:
    return pattern.replace("{conv}", "team").replace("{user}", "bob").replace("{seq}", "1").replace("{consumer}", "push")


def query(params: dict[str, str]) -> str:
    return "&".join(f"{k}={v}" for k, v in params.items())


def takes_words(params: dict[str, str]) -> str:
    return ("this endpoint takes " + ", ".join(repr(p) for p in params)) if params else "this endpoint takes no query parameters"


async def test_the_table_lists_every_routed_endpoint_and_the_openapi_document_its_parameters(tmp_path: Path) -> None:
    from pimcore.http.openapi import OPS_ROUTES, ROUTES

    with trio.fail_after(20):
        async with api(tmp_path, events=True) as (_im, h, _c):
            assert {(r.method, r.pattern) for r in h.router._routes} == set(TAKES)
    for method, path, _summary, _body, params, *_ in ROUTES + OPS_ROUTES:
        assert [name for name, _ in params] == list(TAKES[method, path]), (method, path)


async def test_every_endpoint_refuses_a_query_parameter_it_does_not_take_and_does_nothing(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"first", sender="alice", device="d")
            before = await im.history("team", "alice")
            for (method, pattern), params in TAKES.items():
                if pattern in PROBES:
                    continue
                for bogus in ("bogus=1", "Limit=5" if params else "limit=5"):
                    path = concrete(pattern) + "?" + "&".join(filter(None, (query(params), bogus)))
                    c.close()
                    c = Http(h.url)
                    status, doc = await call(c, method, path, BODIES.get((method, pattern)))
                    assert_error(status, doc, 400, "BAD_REQUEST")
                    name = bogus.split("=")[0]
                    assert doc["error"]["message"] == f"unknown query parameter {name!r}: {takes_words(params)}", (
                        method, path, doc)
            # Nothing was done by any of them.
            assert await im.history("team", "alice") == before
            assert list(await im.members("team")) == ["alice", "bob"]
            assert (await im.retention("team")).max_count is None
            from pimcore.embed import RequestRefused

            try:
                await im.members("newgroup")
            except RequestRefused:
                pass
            else:
                raise AssertionError("the group was created")
            # A long name is cut in the message.
            status, doc = await call(c, "GET", "/v1/info?" + "x" * 5000 + "=1")
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert len(doc["error"]["message"]) < 300 and "...(5000 chars)" in doc["error"]["message"], doc


async def test_the_probes_and_the_scrape_ignore_a_query_string(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path, events=True) as (_im, h, c):
            for path in PROBES:
                status, _headers, body = await c.request("GET", path + "?bogus=1&cache=")
                assert status == 200, (path, status, body[:200])


async def test_every_documented_query_parameter_still_works(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"first", sender="alice", device="d")
            for (method, pattern), params in TAKES.items():
                if not params or pattern == "/v1/events/stream":
                    continue
                status, doc = await call(c, method, concrete(pattern) + "?" + query(params))
                assert status == 200, (pattern, doc)
            s = await Sse.open(h.url, "/v1/events/stream?" + query(TAKES["GET", "/v1/events/stream"]))
            assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
            await s.stream.aclose()


async def test_a_blank_query_parameter_is_refused_but_the_first_pages_cursor(tmp_path: Path) -> None:
    """``?consumer=`` read the default consumer, where a body's "" is
    refused; ``?limit=`` meant the default.  Now each is 400 naming the
    parameter; ``cursor=`` is the first page's cursor (what a page with no
    entries gives back), taken."""
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            for (method, pattern), params in TAKES.items():
                for name in params:
                    if name == "cursor":
                        continue
                    given = {**params, name: ""}
                    for path in (concrete(pattern) + "?" + query(given),
                                 concrete(pattern) + "?" + query({k: v for k, v in params.items() if k != name}) + f"&{name}"):
                        status, doc = await call(c, method, path)
                        assert_error(status, doc, 400, "BAD_REQUEST")
                        assert doc["error"]["message"] == (
                            f"query parameter {name!r} is empty: give it a value or leave it out"), (path, doc)
            status, doc = await call(c, "GET", "/v1/users/alice/conversation-list?cursor=&limit=5")
            assert status == 200 and [e["conv"] for e in doc["entries"]] == ["team"], doc
            status, doc = await call(c, "GET", "/v1/users/nobody/conversation-list?cursor=&limit=5")
            assert status == 200 and doc["cursor"] == "" and doc["entries"] == [], doc
            # The cursor a page with no entries gives back is taken again.
            status, again = await call(c, "GET", f"/v1/users/nobody/conversation-list?cursor={doc['cursor']}")
            assert status == 200, again


async def test_seqs_and_event_ids_take_the_protocols_range_0_to_2_64_minus_1(tmp_path: Path) -> None:
    """HistoryReq's from_seq and a message's seq are u64 on the wire (0 ..
    2^64-1, frames.py), the handle takes event ids 0..2^64-1 too; the HTTP
    API stopped at 2^63-1.  Past 2^64-1: 400 BAD_REQUEST naming the rule."""
    rule = "an integer from 0 to 2^64-1"
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"first", sender="alice", device="d")
            for top in (1 << 63, U64):
                status, doc = await call(c, "GET", f"/v1/conversations/team/history?user=alice&from_seq={top}")
                assert status == 200 and [m["seq"] for m in doc["messages"]] == [1], doc
                status, doc = await call(c, "GET", f"/v1/conversations/team/history?user=alice&from_seq={top}&backward=false")
                assert status == 200 and doc["messages"] == [], doc
                _, last = await im.event_cursor("push")
                for path in (f"/v1/events?consumer=push&after={top}", f"/v1/events/stream?consumer=push&after={top}"):
                    status, doc = await call(c, "GET", path)
                    assert_error(status, doc, 409, "PAST_LAST_EVENT")
                    assert doc["error"]["message"].startswith(f"after {top} is past the last event id"), doc
                status, doc = await call(c, "GET", "/v1/events/stream?consumer=push", headers={"Last-Event-ID": str(top)})
                assert_error(status, doc, 409, "PAST_LAST_EVENT")
                status, doc = await call(c, "POST", "/v1/events/ack", {"consumer": "push", "upto": top})
                assert_error(status, doc, 409, "PAST_LAST_EVENT")
                for action, body in (("recall", None), ("edit", {"payload": "x"}), ("delete", {"user": "alice"})):
                    status, doc = await call(c, "POST", f"/v1/conversations/team/messages/{top}/{action}", body)
                    assert_error(status, doc, 404, "NO_SUCH_MESSAGE")
            past = str(U64 + 1)
            for path, name in ((f"/v1/conversations/team/history?user=alice&from_seq={past}", "from_seq"),
                               (f"/v1/events?after={past}", "after"), (f"/v1/events/stream?after={past}", "after")):
                status, doc = await call(c, "GET", path)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert doc["error"]["message"] == f"query parameter {name!r} must be {rule}, not {past!r}", doc
            status, doc = await call(c, "GET", "/v1/events/stream", headers={"Last-Event-ID": past})
            assert (status, doc["error"]["message"]) == (400, f"header 'Last-Event-ID' must be {rule}, not {past!r}")
            status, doc = await call(c, "POST", f"/v1/conversations/team/messages/{past}/recall")
            assert (status, doc["error"]["message"]) == (
                400, f"the seq in the path must be an integer from 1 to 2^64-1, not {past!r}")
            status, doc = await call(c, "POST", "/v1/events/ack", {"consumer": "push", "upto": U64 + 1})
            assert (status, doc["error"]["message"]) == (400, "field 'upto' must be 0..2^64-1")
            assert len(await im.history("team", "alice")) == 1 and not (await im.history("team", "alice"))[0].recalled


async def test_an_embedders_route_is_checked_only_when_it_names_its_parameters() -> None:
    """Router.add(query=None), the default: the handler reads what it likes
    (routes added before this change keep working); query=(...): the
    server refuses any other parameter, or a blank one but those in blank."""
    from pimcore.http.server import HttpError, Request, Router

    async def handler(request: Request) -> tuple[int, Any]:
        return 200, dict(request.query)

    r = Router()
    r.add("GET", "/free", handler)
    r.add("GET", "/strict", handler, query=("day", "page"), blank=("page",))

    def req(path: str, query: dict[str, list[str]], names: tuple[str, ...]) -> Request:
        return Request("GET", path, query, {}, b"", {}, names)

    free = r.route("GET", "/free")[0]
    assert await free(req("/free", {"x": ["1"]}, ("x", "y"))) == (200, {"x": ["1"]})
    strict = r.route("GET", "/strict")[0]
    assert await strict(req("/strict", {"day": ["1"]}, ("day", "page"))) == (200, {"day": ["1"]})
    for query_, names, said in (
        ({"x": ["1"]}, ("x",), "unknown query parameter 'x': this endpoint takes 'day', 'page'"),
        ({}, ("day",), "query parameter 'day' is empty: give it a value or leave it out"),
    ):
        try:
            await strict(req("/strict", query_, names))
        except HttpError as exc:
            assert (exc.status, exc.code, exc.message) == (400, "BAD_REQUEST", said)
        else:
            raise AssertionError(names)
