"""The server API (pimcore.http.api): the handle's operations over HTTP, with
a real HTTP client (stdlib http.client in a thread, as tests/test_http.py)
against an embedded broker on loopback, observed by SDK clients."""

from __future__ import annotations

import base64
import json
import re
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import trio

from pimcore.client import AuthFailed, ClientClosed, open_client
from pimcore.embed import SYSTEM, Pimcore, open_pimcore
from pimcore.http import ERROR_CODES, BrokerHttp, HttpConfig, open_http_server
from pimcore.store import MemoryStore, direct_conversation

from _net import FAST_CLIENT, SECRET, token
from _proc import procs  # noqa: F401  (a fixture)
from test_http import KEY, Http, assert_error

AB = direct_conversation("alice", "bob")
JSON = {"Content-Type": "application/json"}


def count_remove_calls(monkeypatch: pytest.MonkeyPatch, im: Pimcore) -> list[list[str]]:
    """The users of each ``im.remove_members`` call from now on (one call is
    one RemoveMembers op: one commit)."""
    calls: list[list[str]] = []
    handle_remove = im.remove_members

    async def counted(conv: str, users: Any) -> Any:
        calls.append(list(users))
        return await handle_remove(conv, users)

    monkeypatch.setattr(im, "remove_members", counted)
    return calls


@asynccontextmanager
async def api(tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[Pimcore, BrokerHttp, Http]]:
    """An embedded broker (LMDB in ``tmp_path`` unless ``store=``), its HTTP
    listener with the server API, and one keep-alive HTTP connection."""
    kw.setdefault("listen", ["tcp://127.0.0.1:0"])
    async with open_pimcore(data_dir=tmp_path, secret=SECRET.decode(), **kw) as im:
        async with open_http_server(im.server, HttpConfig(api_keys=(KEY,)), handle=im) as h:
            c = Http(h.url)
            try:
                yield im, h, c
            finally:
                c.close()


async def call(c: Http, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
               headers: dict[str, str] | None = None, key: str | None = KEY) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    return await c.json(method, path, key=key, body=data, headers={**JSON, **(headers or {})})


async def test_post_is_delivered_to_an_sdk_client_and_a_retry_with_the_key_is_one_message(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            assert await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}) == (
                201, {"conv": "team", "members": ["alice", "bob"]})
            async with open_client(im.server.url(), token("bob"), "phone", config=FAST_CLIENT) as bob:
                status, first = await call(c, "POST", "/v1/conversations/team/messages", {"payload": "welcome ✓"},
                                           headers={"Idempotency-Key": "w-1"})
                assert status == 201 and set(first) == {"conv", "msg_id", "seq", "server_time"}
                assert first["conv"] == "team" and first["seq"] == 1 and len(bytes.fromhex(first["msg_id"])) == 16
                # The same key again: the same message, not a second one.
                assert await call(c, "POST", "/v1/conversations/team/messages", {"payload": "welcome ✓"},
                                  headers={"Idempotency-Key": "w-1"}) == (201, first)
                status, as_alice = await call(c, "POST", "/v1/conversations/team/messages",
                                              {"payload_b64": base64.b64encode(b"\x00\xffbin").decode(),
                                               "sender": "alice", "device": "web"})
                assert status == 201 and as_alice["seq"] == 2
                got = []
                async for m in bob.messages():
                    got.append((m.sender, m.device, m.payload, m.seq))
                    if len(got) == 2:
                        break
                assert got == [(SYSTEM, SYSTEM, "welcome ✓".encode(), 1), ("alice", "web", b"\x00\xffbin", 2)]
            # The same key with another payload is a conflict.
            assert_error(*await call(c, "POST", "/v1/conversations/team/messages", {"payload": "other"},
                                     headers={"Idempotency-Key": "w-1"}), 409, "DUPLICATE_CONFLICT")
            status, page = await call(c, "GET", "/v1/conversations/team/history?user=bob&limit=10&backward=false")
            assert status == 200 and [m["seq"] for m in page["messages"]] == [1, 2]
            assert base64.b64decode(page["messages"][1]["payload_b64"]) == b"\x00\xffbin"
            assert page["messages"][0]["sender"] == SYSTEM and page["messages"][0]["msg_id"] == first["msg_id"]


async def test_post_errors(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path, max_payload=100) as (im, h, c):
            await im.create_group("team", ["alice"])
            path = "/v1/conversations/team/messages"
            assert_error(*await call(c, "POST", "/v1/conversations/nope/messages", {"payload": "x"}),
                         404, "UNKNOWN_CONVERSATION")
            assert_error(*await call(c, "POST", path, {"payload": "x", "sender": "mallory", "device": "web"}),
                         403, "NOT_MEMBER")
            assert_error(*await call(c, "POST", path, {"payload": "x" * 101}), 413, "PAYLOAD_TOO_LARGE")
            assert_error(*await call(c, "POST", path, {"payload": "x", "sender": "bad id\n"}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", path, {"payload": "x"}, headers={"Idempotency-Key": "k" * 300}),
                         400, "BAD_REQUEST")
            for body, field in (({}, "payload"), ({"payload": 5}, "payload"), ({"payload": "a", "payload_b64": "YQ=="}, "payload"),
                                ({"payload_b64": "not base64!"}, "payload_b64"), ({"payload": "a", "sender": 1}, "sender"),
                                ({"payload": "a", "device": "web"}, "device"), ([1], "object"),
                                ({"payload": "a \ud800 lone surrogate"}, "payload")):
                status, doc = await call(c, "POST", path, body)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert field in doc["error"]["message"], (body, doc)
            assert_error(*await call(c, "POST", path, raw=b"{nope"), 400, "BAD_REQUEST")
            # A number of more digits than Python reads: its message was
            # Python's advice to call sys.set_int_max_str_digits().
            for raw, said in ((b'{"payload": "x", "sender": ' + b"9" * 5001 + b"}", "5,001"), (b"[-" + b"1" * 4301 + b"]", "4,301")):
                status, doc = await call(c, "POST", path, raw=raw)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert doc["error"]["message"] == (f"the body is not JSON that can be read: it holds a number of {said}"
                                                   " digits (at most 4,300 are read)"), doc
            assert_error(*await call(c, "POST", path, {"payload": "x"}, key=None), 401, "AUTH_FAILED")
            assert await im.history("team", "alice") == []  # nothing refused was stored
            # A sender without a device posts from the device "http".
            assert (await call(c, "POST", path, {"payload": "x", "sender": "alice"}))[0] == 201
            [m] = await im.history("team", "alice")
            assert (m.sender, m.device, m.payload) == ("alice", "http", b"x")


async def test_a_malformed_body_and_a_broker_refusal_have_one_code(tmp_path: Path) -> None:
    """A body that is not JSON (refused by the HTTP layer) and an invalid
    sender id (refused by the broker) are both 400 ``BAD_REQUEST``: the HTTP
    layer's own codes were lower case (``bad_request``), so a backend testing
    ``code == "BAD_REQUEST"`` missed half of the 400s.  The other codes of
    the HTTP layer are upper case too."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            path = "/v1/conversations/team/messages"
            malformed = await call(c, "POST", path, raw=b"{nope")
            refused = await call(c, "POST", path, {"payload": "x", "sender": "bad id\n"})
            assert_error(*malformed, 400, "BAD_REQUEST")
            assert_error(*refused, 400, "BAD_REQUEST")
            assert "not JSON" in malformed[1]["error"]["message"], malformed
            assert_error(*await call(c, "POST", path, {"payload": 5}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", path, {"payload": "x"}, key=None), 401, "AUTH_FAILED")
            assert_error(*await call(c, "GET", "/v1/nope"), 404, "NOT_FOUND")
            assert_error(*await call(c, "PUT", path, {"payload": "x"}), 405, "METHOD_NOT_ALLOWED")


async def test_groups_and_members(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "g", "members": ["alice"]}))[0] == 201
            assert_error(*await call(c, "POST", "/v1/groups", {"conv": "g", "members": ["bob"]}), 409, "ALREADY_EXISTS")
            assert_error(*await call(c, "POST", "/v1/groups", {"conv": "h", "members": "bob"}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", "/v1/groups", {"conv": "h", "members": [1]}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", "/v1/groups", {"members": []}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", "/v1/groups", {"conv": "bad id\n", "members": ["a"]}), 400, "BAD_REQUEST")
            assert await call(c, "POST", "/v1/groups/g/members", {"users": ["bob", "carol"]}) == (
                200, {"conv": "g", "members": ["alice", "bob", "carol"]})
            assert_error(*await call(c, "POST", "/v1/groups/nope/members", {"users": ["bob"]}), 404, "UNKNOWN_CONVERSATION")
            assert_error(*await call(c, "POST", "/v1/groups/g/members", {"user": ["bob"]}), 400, "BAD_REQUEST")
            assert await call(c, "DELETE", "/v1/groups/g/members/carol") == (200, {"conv": "g", "members": ["alice", "bob"]})
            assert_error(*await call(c, "DELETE", "/v1/groups/nope/members/carol"), 404, "UNKNOWN_CONVERSATION")
            status, convs = await call(c, "GET", "/v1/users/bob/conversations")
            assert status == 200 and [x["conv"] for x in convs["conversations"]] == ["g"]
            assert set(convs["conversations"][0]) == {"conv", "read_seq", "last_seq", "unread", "peer", "peer_read_seq"}
            status, page = await call(c, "GET", "/v1/conversations/g/history?user=bob&backward=0")
            assert status == 200 and [(m["kind"], m["sender"]) for m in page["messages"]] == [(1, "bob"), (1, "carol"), (2, "carol")]
            assert_error(*await call(c, "GET", "/v1/conversations/g/history?user=mallory"), 403, "NOT_MEMBER")
            assert_error(*await call(c, "GET", "/v1/conversations/g/history"), 400, "BAD_REQUEST")
            assert_error(*await call(c, "GET", "/v1/conversations/g/history?user="), 400, "BAD_REQUEST")  # (not the broker's own read)
            assert_error(*await call(c, "GET", "/v1/conversations/g/history?user=bob&limit=x"), 400, "BAD_REQUEST")
            assert_error(*await call(c, "GET", "/v1/conversations/nope/history?user=bob"), 404, "UNKNOWN_CONVERSATION")



async def test_a_membership_change_past_the_bound_is_a_400_saying_how_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change of many users in a large group wrote users x members inbox
    entries in one commit (a new-user pass: 22 GB, the broker silent): it
    is refused past MAX_MEMBERSHIP_ENTRIES, saying how many at a time."""
    from pimcore import ids

    monkeypatch.setattr(ids, "MAX_MEMBERSHIP_ENTRIES", 20)
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("g", ["alice", "bob", "carol", "dave"])
            status, body = await call(c, "POST", "/v1/groups/g/members", {"users": ["u1", "u2", "u3", "u4", "u5"]})
            assert status == 400 and body["error"]["code"] == "BAD_REQUEST", body
            assert body["error"]["message"].startswith("group 'g' not changed: 5 users x 9 members"), body
            assert "at most 2 users at a time" in body["error"]["message"], body
            assert tuple(await im.members("g")) == ("alice", "bob", "carol", "dave")
            monkeypatch.setattr(ids, "MAX_MEMBERSHIP_ENTRIES", 10)
            status, body = await call(c, "POST", "/v1/groups/g/members/remove", {"users": ["alice", "bob", "carol"]})
            assert status == 400 and "3 users x 4 members" in body["error"]["message"], body
            assert tuple((await im.remove_members("g", ["alice"])).members) == ("bob", "carol", "dave")  # one: always
            # Only the users that change count: a retry of a change done is taken.
            assert await call(c, "POST", "/v1/groups/g/members", {"users": ["bob", "carol", "dave"]}) == (
                200, {"conv": "g", "members": ["bob", "carol", "dave"]})


async def test_several_members_are_removed_in_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """POST /v1/groups/{conv}/members/remove removes several users with one
    store op (`pimcore group remove --http` sent one DELETE per user, each
    an fsync'd commit: 300 users took 16.5 s), naming whom it removed and
    who was no member; refused as a whole as POST .../members is."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("g", ["alice", "bob", "carol", "dave", "remove"])
            calls = count_remove_calls(monkeypatch, im)
            path = "/v1/groups/g/members/remove"
            assert await call(c, "POST", path, {"users": ["carol", "zed", "bob", "carol", "yan"]}) == (
                200, {"conv": "g", "members": ["alice", "dave", "remove"], "removed": ["bob", "carol"],
                      "not_members": ["yan", "zed"]})
            assert len(calls) == 1  # one RemoveMembers op, one commit
            status, page = await call(c, "GET", "/v1/conversations/g/history?user=alice&backward=0")
            assert status == 200 and [(m["kind"], m["sender"]) for m in page["messages"]] == [(2, "bob"), (2, "carol")]
            # No one to remove: the group as it is.
            assert await call(c, "POST", path, {"users": ["zed"]}) == (
                200, {"conv": "g", "members": ["alice", "dave", "remove"], "removed": [], "not_members": ["zed"]})
            # The validation and limits of POST /v1/groups/{conv}/members.
            assert_error(*await call(c, "POST", "/v1/groups/nope/members/remove", {"users": ["bob"]}), 404,
                         "UNKNOWN_CONVERSATION")
            for body in ({"users": []}, {"users": "alice"}, {"users": [1]}, {"user": ["alice"]}, ["alice"]):
                status, doc = await call(c, "POST", path, body)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert await call(c, "POST", "/v1/groups/g/members", body) == (status, doc), body
            assert_error(*await call(c, "POST", path, {"users": ["alice", "b b"]}), 400, "BAD_REQUEST")
            # Removing everyone is refused as a whole (no one removed).
            status, doc = await call(c, "POST", path, {"users": ["alice", "dave", "remove", "zed"]})
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "to delete the group, purge it" in doc["error"]["message"], doc
            assert await im.members("g") == ("alice", "dave", "remove")
            # The single DELETE stays, for a user named "remove" too.
            assert await call(c, "DELETE", "/v1/groups/g/members/remove") == (
                200, {"conv": "g", "members": ["alice", "dave"]})


async def test_a_refusals_message_does_not_repeat_its_code(tmp_path: Path) -> None:
    """The error's ``code`` is a field of its own: the message said it again
    ("code": "BAD_REQUEST", "message": "group 'g' not changed: BAD_REQUEST:
    a group needs ...").  It says what is wrong once, in words."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("g", ["alice"])
            refusals = {
                ("GET", "/v1/groups/nope/members", None): (404, "UNKNOWN_CONVERSATION",
                                                           "members of 'nope': no such conversation"),
                ("POST", "/v1/groups", (("conv", "g"), ("members", ("bob",)))): (
                    409, "ALREADY_EXISTS", "group 'g' not changed: it exists already"),
                ("POST", "/v1/groups", (("conv", "e"), ("members", ()))): (
                    400, "BAD_REQUEST", "group 'e' not changed: a group needs at least one member"),
                ("DELETE", "/v1/groups/g/members/alice", None): (
                    400, "BAD_REQUEST", "group 'g' not changed: a group needs at least one member: removing all"),
                ("GET", "/v1/conversations/g/history?user=mallory", None): (
                    403, "NOT_MEMBER", "history of 'g' for 'mallory': not a member of the conversation"),
                # (said who: it was "post to 'g' refused: not a member of the conversation")
                ("POST", "/v1/conversations/g/messages", (("sender", "zed"), ("payload", "x"))): (
                    403, "NOT_MEMBER", "post to 'g' refused: 'zed' is not a member of 'g'"),
            }
            for (method, path, body), (status, code, said) in refusals.items():
                got, doc = await call(c, method, path, None if body is None else
                                      {k: list(v) if isinstance(v, tuple) else v for k, v in body})
                assert_error(got, doc, status, code)
                assert doc["error"]["message"].startswith(said) and code not in doc["error"]["message"], doc
            # ... nor does a result of a batch post.
            status, doc = await call(c, "POST", "/v1/messages", {"messages": [
                {"conv": "g", "payload": "x", "sender": "mallory", "device": "web"}]})
            assert status == 200 and doc["results"][0]["code"] == "NOT_MEMBER", doc
            assert "NOT_MEMBER" not in doc["results"][0]["message"] and doc["results"][0]["message"], doc
            assert "'mallory' is not a member of 'g'" in doc["results"][0]["message"], doc


async def test_an_idempotency_key_header_where_none_is_taken_is_refused(tmp_path: Path) -> None:
    # A new operator's trial (MEDIUM): POST /v1/messages ignored the header,
    # so a batch retried with one was stored twice (two 200s, two copies).
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await call(c, "POST", "/v1/groups", {"conv": "g", "members": ["alice"]})
            batch = {"messages": [{"conv": "g", "payload": "x", "sender": "alice", "device": "web"}]}
            for method, path, body in (("POST", "/v1/messages", batch), ("POST", "/v1/groups/g/members", {"users": ["bob"]}),
                                       ("POST", "/v1/tokens", {"user": "bob"})):
                status, doc = await call(c, method, path, body, headers={"Idempotency-Key": "batch-1"})
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert f"{method} {path.replace('/g/', '/{conv}/')} takes no Idempotency-Key header" in doc["error"]["message"], doc
            assert "give each item its own" in (await call(c, "POST", "/v1/messages", batch,
                                                            headers={"Idempotency-Key": "b"}))[1]["error"]["message"]
            assert [m.payload for m in await im.history("g", "alice")] == []  # nothing stored
            # Where it is taken, it still makes a retry safe.
            for _ in range(2):
                status, doc = await call(c, "POST", "/v1/conversations/g/messages", {"payload": "once", "sender": "alice"},
                                         headers={"Idempotency-Key": "k"})
                assert status == 201, doc
            assert [m.payload for m in await im.history("g", "alice")] == [b"once"]


async def test_conversations_show_unread_after_a_client_sends(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            async with open_client(im.server.url(), token("alice"), "phone", config=FAST_CLIENT) as alice:
                await alice.send(AB, b"hi")
                await alice.send(AB, b"there")
                assert await call(c, "GET", "/v1/users/alice/devices") == (200, {"user": "alice", "devices": ["phone"]})
            status, doc = await call(c, "GET", "/v1/users/bob/conversations")
            assert status == 200
            [conv] = doc["conversations"]
            assert (conv["conv"], conv["unread"], conv["last_seq"], conv["peer"]) == (AB, 2, 2, "alice")
            assert await call(c, "GET", "/v1/users/nobody/conversations") == (200, {"conversations": []})
            assert await call(c, "GET", "/v1/users/alice/devices") == (200, {"user": "alice", "devices": []})


async def test_kick_ends_a_session_of_an_sdk_client(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path, store=MemoryStore()) as (im, h, c):
            await im.create_group("team", ["alice"])
            async with open_client(im.server.url(), token("alice"), "phone", config=FAST_CLIENT) as alice, \
                    open_client(im.server.url(), token("alice"), "web", config=FAST_CLIENT) as web:
                assert await call(c, "POST", "/v1/users/alice/kick", {"device": "phone", "reason": "account review"}) == (
                    200, {"user": "alice", "devices": ["phone"]})
                with pytest.raises(ClientClosed, match="account review"):
                    await alice.send("team", b"still here?")
                assert (await web.send("team", b"web is fine")).seq == 1
                assert_error(*await call(c, "POST", "/v1/users/alice/kick", {"reason": 5}), 400, "BAD_REQUEST")
                # No body: every device.
                status, doc = await c.json("POST", "/v1/users/alice/kick", key=KEY)
                assert (status, doc) == (200, {"user": "alice", "devices": ["web"]})
                with pytest.raises(ClientClosed):
                    await web.send("team", b"gone")


async def test_revoke_and_tokens(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            status, doc = await call(c, "POST", "/v1/tokens", {"user": "alice", "ttl": 600})
            assert status == 201
            stale = doc["token"]
            async with open_client(im.server.url(), stale, "phone", config=FAST_CLIENT) as alice:
                assert (await alice.send("team", b"in")).seq == 1
                await trio.sleep(0.01)
                status, doc = await call(c, "POST", "/v1/users/alice/revoke")
                assert status == 200 and doc["user"] == "alice" and doc["device"] is None and doc["before"] > 0
                with pytest.raises(AuthFailed, match="revoked"):  # the live session that used it ends
                    for _ in range(100):
                        await alice.send("team", b"still?")
                        await trio.sleep(0.01)
            with pytest.raises(AuthFailed):
                async with open_client(im.server.url(), stale, "phone", config=FAST_CLIENT):
                    pass  # pragma: no cover
            await trio.sleep(0.01)
            status, doc = await call(c, "POST", "/v1/tokens", {"user": "alice", "device": "tab"})
            assert status == 201
            async with open_client(im.server.url(), doc["token"], "tab", config=FAST_CLIENT) as fresh:
                assert (await fresh.send("team", b"back")).seq == 2
            assert_error(*await call(c, "POST", "/v1/tokens", {"ttl": 5}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", "/v1/tokens", {"user": "alice", "ttl": "5"}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", "/v1/tokens", {"user": "bad id\n"}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", "/v1/users/alice/revoke", {"before": "now"}), 400, "BAD_REQUEST")
            for bad in (-5, 2**70, True):
                status, doc = await call(c, "POST", "/v1/users/alice/revoke", {"before": bad})
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert "before" in doc["error"]["message"]
            assert_error(*await call(c, "POST", "/v1/tokens", {"user": "alice", "ttl": 2**70}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "POST", "/v1/users/bad%0Aid/revoke"), 400, "BAD_REQUEST")


async def test_events_long_poll_and_ack(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            # Nothing yet: an empty page once `wait` has passed.
            status, doc = await call(c, "GET", "/v1/events?consumer=push&wait=0.2")
            assert status == 200 and doc["events"] == [] and doc["after"] == doc["next"] == 0

            async def post_later() -> None:
                await trio.sleep(0.2)
                await im.post("team", b"hello", sender="alice", device="web")

            async with trio.open_nursery() as n:
                n.start_soon(post_later)
                status, doc = await call(c, "GET", "/v1/events?consumer=push&wait=10&limit=10")
            assert status == 200
            [ev] = [e for e in doc["events"] if e["type"] == "message"]
            assert ev["conv"] == "team" and base64.b64decode(ev["payload_b64"]) == b"hello"
            assert ev["recipients"] == ["alice", "bob"] and ev["offline_recipients"] == ["alice", "bob"]
            # Not acked: delivered again from the durable cursor.
            again = (await call(c, "GET", "/v1/events?consumer=push"))[1]
            assert again["events"] == doc["events"]
            assert await call(c, "POST", "/v1/events/ack", {"consumer": "push", "upto": doc["next"]}) == (
                200, {"consumer": "push", "cursor": doc["next"]})
            assert (await call(c, "GET", "/v1/events?consumer=push&wait=0.1"))[1]["events"] == []
            # Another consumer has its own cursor.
            assert (await call(c, "GET", "/v1/events?consumer=audit"))[1]["events"] == doc["events"]
            assert_error(*await call(c, "POST", "/v1/events/ack", {"consumer": "push"}), 400, "BAD_REQUEST")
            assert_error(*await call(c, "GET", "/v1/events?wait=1000"), 400, "BAD_REQUEST")
            for q in ("after=-1", "after=99999999999999999999999", "limit=0", "after=x"):
                assert_error(*await call(c, "GET", f"/v1/events?{q}"), 400, "BAD_REQUEST")
            # After the last event, without wait: an empty page at once.
            assert (await call(c, "GET", f"/v1/events?consumer=push&after={doc['next']}"))[1]["events"] == []
            assert_error(*await call(c, "GET", "/v1/events?consumer=bad%0Aname"), 400, "BAD_REQUEST")


async def test_a_listener_without_a_handle_has_no_server_api(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, store=MemoryStore(), secret=SECRET.decode()) as im:
            async with open_http_server(im.server, HttpConfig(api_keys=(KEY,))) as h:
                c = Http(h.url)
                try:
                    assert_error(*await call(c, "POST", "/v1/groups", {"conv": "g", "members": ["a"]}), 404, "NOT_FOUND")
                finally:
                    c.close()


async def test_pimcore_serve_answers_the_server_api(tmp_path: Path, procs: Any) -> None:
    """``pimcore serve --http``: a group made, a token issued and a post made
    over HTTP reach an SDK client logged in with that token."""
    from test_serve_ops import FAST, LOOPBACK

    data = tmp_path / "data"
    with trio.fail_after(60):
        server = procs.serve("--listen", LOOPBACK, "--http", LOOPBACK, "--data-dir", data)
        c = Http(server.url("http"))
        key = (data / "api-key").read_text().strip()
        try:
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["bob"]}, key=key))[0] == 201
            status, doc = await call(c, "POST", "/v1/tokens", {"user": "bob", "device": "phone", "ttl": 60}, key=key)
            assert status == 201
            async with open_client(server.url("tcp"), doc["token"], "phone", config=FAST) as bob:
                status, posted = await call(c, "POST", "/v1/conversations/team/messages", {"payload": "from http"},
                                            key=key, headers={"Idempotency-Key": "once"})
                assert status == 201 and posted["seq"] == 1
                async for m in bob.messages():
                    assert (m.sender, m.payload, m.seq) == (SYSTEM, b"from http", 1)
                    break
            assert_error(*await call(c, "POST", "/v1/conversations/team/messages", {"payload": "x"}, key="wrong"),
                         401, "AUTH_FAILED")
        finally:
            c.close()


async def test_a_failed_store_is_503_store_unavailable(tmp_path: Path) -> None:
    store = MemoryStore()
    with trio.fail_after(30):
        async with api(tmp_path, store=store) as (im, h, c):
            await im.create_group("team", ["alice"])
            store.close()
            status, doc = await call(c, "POST", "/v1/conversations/team/messages", {"payload": "x"},
                                     headers={"Idempotency-Key": "k"})
            assert_error(status, doc, 503, "STORE_UNAVAILABLE")
            assert_error(*await call(c, "POST", "/v1/groups", {"conv": "g2", "members": ["a"]}), 503, "STORE_UNAVAILABLE")
            assert (await call(c, "GET", "/v1/info"))[0] == 200  # the listener goes on


async def test_the_server_api_over_https(tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path, store=MemoryStore(), secret=SECRET.decode()) as im:
            cfg = HttpConfig(api_keys=(KEY,), scheme="tls", ssl_context=server_ctx)
            async with open_http_server(im.server, cfg, handle=im) as h:
                assert h.url.startswith("https://")
                c = Http(h.url, client_ctx)
                try:
                    assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice"]}))[0] == 201
                    status, posted = await call(c, "POST", "/v1/conversations/team/messages", {"payload": "tls"})
                    assert status == 201 and posted["seq"] == 1
                    status, page = await call(c, "GET", "/v1/conversations/team/history?user=alice")
                    assert [base64.b64decode(m["payload_b64"]) for m in page["messages"]] == [b"tls"]
                finally:
                    c.close()


async def test_the_root_names_the_endpoints_and_the_docs(tmp_path: Path) -> None:
    """(Failed before: a new user's trial.)  `curl http://127.0.0.1:7481/`
    was 404 "no endpoint /": nothing said where to go.  `GET /` (no key: it
    holds no data) lists the endpoints this listener serves, marking those
    that need none, and points to the docs and the OpenAPI document."""
    with trio.fail_after(20):
        async with api(tmp_path) as (_im, h, c):
            status, doc = await call(c, "GET", "/", key=None)
            assert status == 200, doc
            assert doc["docs"] == "docs/HTTP.md" and doc["openapi"] == "/v1/openapi.json", doc
            assert "Authorization: Bearer" in doc["auth"], doc
            routed = {f"{r.method} {r.pattern}" + ("" if r.auth else " (no key)") for r in h.router._routes}
            assert sorted(doc["endpoints"]) == sorted(routed), doc["endpoints"]
            for line in ("GET / (no key)", "GET /healthz (no key)", "GET /v1/openapi.json (no key)", "GET /v1/info",
                         "POST /v1/conversations/{conv}/messages"):
                assert line in doc["endpoints"], (line, doc["endpoints"])
            status, headers, body = await c.request("HEAD", "/")
            assert (status, body) == (200, b""), (status, body)
            assert (await call(c, "GET", "/nowhere", key=None))[0] == 404  # (only / itself)


async def test_the_openapi_document_lists_exactly_the_routed_endpoints(tmp_path: Path) -> None:
    from pimcore.http.api import register_api
    from pimcore.http.openapi import ROUTES
    from pimcore.http.server import Router

    routed = Router()
    register_api(routed, object())  # type: ignore[arg-type]  (handlers are not called)
    pairs = {(r.method, r.pattern) for r in routed._routes}
    assert pairs == {(m, p) for m, p, *_ in ROUTES}
    with trio.fail_after(20):
        async with api(tmp_path) as (_im, _h, c):
            status, doc = await call(c, "GET", "/v1/openapi.json", key=None)  # public: it holds no data
            assert status == 200 and doc["openapi"] == "3.1.0"
            served = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
            # Every endpoint the listener serves: the server API, /v1/info and the probes.
            assert served == {(r.method, r.pattern) for r in _h.router._routes}
            assert served > pairs | {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/info")}
            for path in ("/healthz", "/readyz", "/metrics", "/v1/openapi.json"):  # no key needed
                assert doc["paths"][path]["get"]["security"] == [], path
            assert doc["paths"]["/v1/info"]["get"]["security"] == [{"apiKey": []}]
            assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
            post = doc["paths"]["/v1/conversations/{conv}/messages"]["post"]
            assert [p["name"] for p in post["parameters"]] == ["conv"] and "201" in post["responses"]
            # An error's code is described as what it is: upper case, one spelling.
            error = post["responses"]["default"]["content"]["application/json"]["schema"]["properties"]["error"]
            pattern = re.compile(error["properties"]["code"]["pattern"])
            assert all(pattern.search(code) for code in ERROR_CODES), ERROR_CODES
            assert not pattern.search("bad_request")
            refused = await call(c, "POST", "/v1/conversations/nope/messages", {"payload": 5})
            assert pattern.search(refused[1]["error"]["code"]), refused


async def test_revoke_refuses_a_before_in_the_future(tmp_path: Path) -> None:
    """`before` later than now + 60 s (nanoseconds passed as µs, say) would
    lock the user out for decades with no undo: 400 BAD_REQUEST naming µs,
    nothing revoked, the user's tokens still work.  The handle raises
    RequestRefused(BAD_REQUEST) the same way; up to 60 s ahead is fine."""
    import time

    from pimcore.embed import RequestRefused
    from pimcore.errors import ErrorCode

    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["carol"])
            for bad in (time.time_ns(), int(time.time() * 1e6) + 61_000_000):
                status, doc = await call(c, "POST", "/v1/users/carol/revoke", {"before": bad})
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert "µs" in doc["error"]["message"] and "before" in doc["error"]["message"]
                with pytest.raises(RequestRefused, match="µs") as refused:
                    await im.revoke("carol", "phone", before=bad)
                assert refused.value.code is ErrorCode.BAD_REQUEST
            async with open_client(im.server.url(), im.issue_token("carol"), "phone", config=FAST_CLIENT) as carol:
                assert (await carol.send("team", b"still in")).seq == 1
            soon = int(time.time() * 1e6) + 30_000_000
            status, doc = await call(c, "POST", "/v1/users/carol/revoke", {"before": soon})
            assert status == 200 and doc["before"] == soon


async def test_revoke_refuses_an_empty_device_and_a_before_of_zero(tmp_path: Path) -> None:
    """(A new user's trial.)  `device: ""` revoked every token of the user
    (the store's key for "all devices"), durably and with no undo, while
    kick, tokens and posts refuse ""; and `before: 0` answered 200 and
    revoked nothing (tokens issued before 1970), where the C ABI's 0 means
    now.  Both are 400 BAD_REQUEST in words now, from the handle too, and
    nothing is revoked: the user's tokens still work."""
    from pimcore.embed import RequestRefused
    from pimcore.errors import ErrorCode

    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["carol"])
            status, doc = await call(c, "POST", "/v1/users/carol/revoke", {"device": ""})
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "device" in doc["error"]["message"] and "omit" in doc["error"]["message"], doc
            with pytest.raises(RequestRefused, match="device") as refused:
                await im.revoke("carol", "")
            assert refused.value.code is ErrorCode.BAD_REQUEST
            status, doc = await call(c, "POST", "/v1/users/carol/revoke", {"before": 0})
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "before=0" in doc["error"]["message"] and "omit" in doc["error"]["message"], doc
            with pytest.raises(RequestRefused, match="before=0") as refused:
                await im.revoke("carol", before=0)
            assert refused.value.code is ErrorCode.BAD_REQUEST
            async with open_client(im.server.url(), im.issue_token("carol"), "phone", config=FAST_CLIENT) as carol:
                assert (await carol.send("team", b"still in")).seq == 1


async def test_events_endpoints_answer_409_when_the_broker_records_none(tmp_path: Path) -> None:
    """With events off (the serve default) the event endpoints used to
    answer 200 with nothing (an ack of 5 returned cursor 0): a newcomer
    waited forever.  Now 409 EVENTS_DISABLED naming the setting, at once
    (even with ?wait), and the handle raises EventsDisabled."""
    with trio.fail_after(10):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            await im.post("team", b"hello")
            for method, path, body in (("GET", "/v1/events", None), ("GET", "/v1/events?wait=25", None),
                                       ("GET", "/v1/events/stream", None), ("POST", "/v1/events/ack", {"upto": 5}),
                                       ("GET", "/v1/events/consumers", None),
                                       ("DELETE", "/v1/events/consumers/push", None)):
                status, doc = await call(c, method, path, body)
                assert_error(status, doc, 409, "EVENTS_DISABLED")
                assert "[server] events = true" in doc["error"]["message"] and "PIMCORE_SERVER_EVENTS" in doc["error"]["message"]
            from pimcore.embed import EventsDisabled

            with pytest.raises(EventsDisabled, match="PIMCORE_SERVER_EVENTS"):
                await im.next_events("push")
            with pytest.raises(EventsDisabled):
                await im.ack_events(5, "push")
            with pytest.raises(EventsDisabled):
                im.events("push")
            with pytest.raises(EventsDisabled):
                await im.delete_consumer("push")


async def test_refusals_say_what_was_wrong(tmp_path: Path) -> None:
    """Not just "refused: BAD_REQUEST": the message names the field and the
    rule (a 300-byte Idempotency-Key, an empty sender or device), in the
    single post, the batch and the handle; a batch item's error names the
    item once."""
    from pimcore.embed import RequestRefused
    from pimcore.errors import ErrorCode

    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            path = "/v1/conversations/team/messages"
            status, doc = await call(c, "POST", path, {"payload": "x", "sender": "alice"}, headers={"Idempotency-Key": "k" * 300})
            assert status == 400 and "256 bytes" in doc["error"]["message"] and "300" in doc["error"]["message"], doc
            for body, needle in (({"payload": "x", "sender": ""}, "sender"), ({"payload": "x", "sender": "alice", "device": ""}, "device"),
                                 ({"payload": "x", "sender": "a b"}, "'a b'")):
                status, doc = await call(c, "POST", path, body)
                assert status == 400 and needle in doc["error"]["message"] and doc["error"]["message"] != "", doc
                assert not doc["error"]["message"].endswith("BAD_REQUEST"), doc
            status, doc = await call(c, "POST", "/v1/messages", {"messages": [
                {"conv": "team", "payload": "x", "sender": "alice", "idempotency_key": "k" * 300}, 5,
                {"conv": "team", "payload": "x", "sender": "alice", "device": "a b"}]})
            res = doc["results"]
            assert "256 bytes" in res[0]["message"], res
            assert res[1]["message"].count("messages[1]") == 1, res
            assert "device" in res[2]["message"] and "'a b'" in res[2]["message"], res
            with pytest.raises(RequestRefused, match="empty device id: a post as .alice. needs one of its device ids") as refused:
                await im.post("team", b"x", sender="alice", device=SYSTEM)
            assert refused.value.code is ErrorCode.BAD_REQUEST
            with pytest.raises(RequestRefused, match="256 bytes"):
                await im.post("team", b"x", idempotency_key=b"")


async def test_a_malformed_percent_escape_in_a_path_is_400(tmp_path: Path) -> None:
    """/v1/conversations/%ZZ/messages was taken literally, conversation
    '%ZZ', and got 404 UNKNOWN_CONVERSATION (a new-user pass)."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("a+b", ["alice"])
            for path in ("/v1/conversations/%ZZ/messages", "/v1/conversations/a%2/messages",
                         "/v1/conversations/%FF/messages"):
                status, doc = await call(c, "POST", path, {"payload": "x"})
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert "path segment" in doc["error"]["message"], doc
            status, doc = await call(c, "POST", "/v1/conversations/a%2Bb/messages", {"payload": "x"})
            assert status == 201 and doc["conv"] == "a+b", doc


async def test_percent_escapes_that_are_not_utf8_in_a_query_are_400_not_utf8_as_in_a_path(tmp_path: Path) -> None:
    """?user=%ff was decoded to U+FFFD and refused as "the non-ASCII
    character '\ufffd'", a character the client never sent, where the same
    bytes in a path are "not UTF-8" (a new user's trial)."""
    with trio.fail_after(30):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice"])
            for path, named in (("/v1/conversations/team/history?user=%ff", "'user'"),
                                ("/v1/conversations/team/history?user=al%C3%28ice", "'user'"),
                                ("/v1/users/alice/unread?conv=%80", "'conv'"),
                                ("/v1/events?consumer=a%e9", "'consumer'"),
                                ("/v1/conversations/team/history?user=alice&%ff=1", "'%ff'")):
                status, doc = await call(c, "GET", path)
                assert_error(status, doc, 400, "BAD_REQUEST")
                message = doc["error"]["message"]
                assert "not UTF-8" in message and named in message and "\ufffd" not in message, (path, message)
            # UTF-8 escapes decode: the id is refused for what it holds.
            status, doc = await call(c, "GET", "/v1/conversations/team/history?user=%C3%A9")
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "non-ASCII character 'é'" in doc["error"]["message"], doc
            assert (await call(c, "GET", "/v1/conversations/team/history?user=%61lice"))[0] == 200


async def test_kick_validates_like_revoke_and_caps_the_reason(tmp_path: Path) -> None:
    """An invalid user id is 400 BAD_REQUEST for kick as for revoke and
    unread (it was 200); a reason over 256 bytes is 400 (it was logged
    three times and stored in events, whatever its size)."""
    from pimcore.embed import RequestRefused
    from pimcore.errors import ErrorCode

    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            for path in ("/v1/users/a%20b/kick", "/v1/users/a%20b/revoke"):
                status, doc = await call(c, "POST", path)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert "'a b'" in doc["error"]["message"], doc
                # In the endpoint's own words (a new-user pass saw "online devices: ..." for kick).
                assert doc["error"]["message"].startswith(path.rsplit("/", 1)[1]), doc
            assert_error(*await call(c, "POST", "/v1/users/alice/kick", {"device": "a b"}), 400, "BAD_REQUEST")
            status, doc = await call(c, "POST", "/v1/users/alice/kick", {"reason": "r" * 300_000})
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "256 bytes" in doc["error"]["message"]
            assert await call(c, "POST", "/v1/users/alice/kick", {"reason": "é" * 128}) == (200, {"user": "alice", "devices": []})
            with pytest.raises(RequestRefused) as refused:
                im.kick("a b")
            assert refused.value.code is ErrorCode.BAD_REQUEST
            with pytest.raises(RequestRefused, match="256 bytes"):
                im.kick("alice", reason="é" * 129)


async def test_token_ttl_is_1s_to_366_days(tmp_path: Path) -> None:
    """ttl 0 and ttl 99999999999999999 were accepted: 1..366 days now, in
    the handle (ValueError) and the API (400)."""
    from pimcore.embed import MAX_TOKEN_TTL

    assert MAX_TOKEN_TTL == 366 * 24 * 3600
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            for bad in (0, -1, -5, MAX_TOKEN_TTL + 1, 99999999999999999, 2**63):
                status, doc = await call(c, "POST", "/v1/tokens", {"user": "alice", "ttl": bad})
                # (One wording for every value: a trial saw -5 "must be 0..2^63-1", 0 "1..31622400".)
                assert status == 400 and doc["error"]["message"] == (
                    f"cannot issue a token: ttl must be 1..{MAX_TOKEN_TTL} seconds (366 days), got {bad}"), doc
                with pytest.raises(ValueError, match="366 days"):
                    im.issue_token("alice", ttl=bad)
            for good in (1, MAX_TOKEN_TTL):
                status, doc = await call(c, "POST", "/v1/tokens", {"user": "alice", "ttl": good})
                assert status == 201
                im.issue_token("alice", ttl=good)


async def test_what_a_kicked_or_revoked_sdk_client_sees_in_its_events(tmp_path: Path) -> None:
    """docs/CLIENT.md: KICKED -> Disconnected(KICKED, reason), then events()
    ends; TOKEN_REVOKED -> Disconnected(TOKEN_REVOKED, ...), then AuthFailed.
    Neither reconnects."""
    from pimcore.client import Connected, Disconnected
    from pimcore.errors import CloseCode

    with trio.fail_after(30):
        async with api(tmp_path, store=MemoryStore()) as (im, h, c):
            await im.create_group("team", ["alice"])
            async with open_client(im.server.url(), token("alice"), "phone", config=FAST_CLIENT) as alice:
                seen: list[Any] = []
                async for ev in alice.events():
                    seen.append(ev)
                    if isinstance(ev, Connected):
                        assert (await call(c, "POST", "/v1/users/alice/kick", {"reason": "review"}))[0] == 200
                assert isinstance(seen[0], Connected) and isinstance(seen[-1], Disconnected), seen
                assert [e for e in seen if isinstance(e, (Connected, Disconnected))] == [seen[0], seen[-1]], seen
                assert seen[-1].code is CloseCode.KICKED and seen[-1].reason == "review"
                with pytest.raises(ClientClosed, match="kicked by the host: review"):
                    await alice.send("team", b"x")
            async with open_client(im.server.url(), token("alice"), "web", config=FAST_CLIENT) as web:
                seen = []
                with pytest.raises(AuthFailed, match="revoked"):
                    async for ev in web.events():
                        seen.append(ev)
                        if isinstance(ev, Connected):
                            await trio.sleep(0.01)
                            assert (await call(c, "POST", "/v1/users/alice/revoke"))[0] == 200
                assert isinstance(seen[0], Connected) and isinstance(seen[-1], Disconnected), seen
                assert [e for e in seen if isinstance(e, (Connected, Disconnected))] == [seen[0], seen[-1]], seen
                assert seen[-1].code is CloseCode.TOKEN_REVOKED


async def test_conversation_list_settings_and_mentions_over_http(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            status, _ = await call(c, "POST", "/v1/conversations/team/messages",
                                   {"payload": "@bob", "mentions": ["bob"], "sender": "alice"})
            assert status == 201
            assert_error(*await call(c, "POST", "/v1/conversations/team/messages",
                                     {"payload": "x", "mentions": ["bad id!"]}), 400, "BAD_MENTION")
            await call(c, "POST", f"/v1/conversations/{AB}/messages", {"payload": "hi", "sender": "alice"})
            status, page = await call(c, "GET", "/v1/users/bob/conversation-list?limit=1")
            assert status == 200 and page["more"] and [e["conv"] for e in page["entries"]] == [AB]
            status, page2 = await call(c, "GET", f"/v1/users/bob/conversation-list?limit=1&cursor={page['cursor']}")
            [team] = page2["entries"]
            assert not page2["more"] and (team["conv"], team["unread"], team["mention_count"]) == ("team", 1, 1)
            assert team["last"]["mentions"] == ["bob"] and base64.b64decode(team["last"]["payload_b64"]) == b"@bob"
            assert_error(*await call(c, "GET", "/v1/users/bob/conversation-list?cursor=zz"), 400, "BAD_CURSOR")
            assert_error(*await call(c, "GET", "/v1/users/bob/conversation-list?cursor=00"), 400, "BAD_CURSOR")
            status, entry = await call(c, "POST", "/v1/users/bob/conversations/team/settings", {"pinned": True, "hidden": True})
            assert status == 200 and entry["pinned"] and entry["hidden"] and not entry["muted"]
            status, page = await call(c, "GET", "/v1/users/bob/conversation-list")
            assert [e["conv"] for e in page["entries"]] == [AB]  # hidden until the next message
            status, page = await call(c, "GET", "/v1/users/bob/conversation-list?include_hidden=true")
            assert [e["conv"] for e in page["entries"]] == ["team", AB]  # pinned first
            assert_error(*await call(c, "POST", "/v1/users/carol/conversations/team/settings", {"muted": True}),
                         403, "NOT_MEMBER")
            assert_error(*await call(c, "POST", "/v1/users/bob/conversations/team/settings", {"muted": 1}),
                         400, "BAD_REQUEST")


async def test_batch_post_items_take_mentions_and_mention_all_as_the_single_post_does(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            status, doc = await call(c, "POST", "/v1/messages", {"messages": [
                {"conv": "team", "payload": "@bob", "sender": "alice", "mentions": ["bob"]},
                {"conv": "team", "payload": "@all", "mention_all": True},
                {"conv": "team", "payload": "x", "mentions": "bob"},
                {"conv": "team", "payload": "x", "mention_all": "no"},
                {"conv": "team", "payload": "x", "mentions": ["bad id!"]},
            ]})
            res = doc["results"]
            assert status == 200 and [r["status"] for r in res] == ["stored", "stored", "error", "error", "error"], res
            assert [r["seq"] for r in res[:2]] == [1, 2]
            assert res[2]["code"] == res[3]["code"] == "BAD_REQUEST", res
            assert "mentions" in res[2]["message"] and "mention_all" in res[3]["message"], res
            assert res[4]["code"] == "BAD_MENTION", res
            counts = {}
            for user in ("alice", "bob"):
                [team] = (await call(c, "GET", f"/v1/users/{user}/conversation-list"))[1]["entries"]
                counts[user] = (team["last_seq"], team["mention_count"])
            assert counts == {"alice": (2, 1), "bob": (2, 2)}


async def test_devices_and_unread_refuse_invalid_ids(tmp_path: Path) -> None:
    """An invalid user id is 400 BAD_REQUEST for devices as for the other
    per-user endpoints, and so is an invalid ?conv= of unread (both were
    200: an empty device list, 0 unread)."""
    from pimcore.embed import RequestRefused
    from pimcore.errors import ErrorCode

    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            for user in ("bad%20user", "%00"):
                status, doc = await call(c, "GET", f"/v1/users/{user}/devices")
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert "user id" in doc["error"]["message"], doc
            # (A malformed escape is refused by the router, before any id check.)
            assert_error(*await call(c, "GET", "/v1/users/%ZZ/devices"), 400, "BAD_REQUEST")
            status, doc = await call(c, "GET", "/v1/users/alice/unread?conv=bad%20conv")
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "'bad conv'" in doc["error"]["message"], doc
            assert await call(c, "GET", "/v1/users/alice/devices") == (200, {"user": "alice", "devices": []})
            # (No group "team" here: 404 as for history, it was 200 unread 0.)
            assert_error(*await call(c, "GET", "/v1/users/alice/unread?conv=team"), 404, "UNKNOWN_CONVERSATION")
            with pytest.raises(RequestRefused) as refused:
                im.online_devices("a b")
            assert refused.value.code is ErrorCode.BAD_REQUEST
            with pytest.raises(RequestRefused) as refused:
                await im.unread("alice", "bad conv")
            assert refused.value.code is ErrorCode.BAD_REQUEST


async def test_a_refused_id_says_which_id_and_why(tmp_path: Path) -> None:
    """The core answers BAD_REQUEST without saying which id was wrong; the
    API's message names it and the rule (it said only "BAD_REQUEST")."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            for method, path, body, words in (
                ("POST", "/v1/groups", {"conv": "g", "members": ["alice", "bad user"]}, "'bad user'"),
                ("POST", "/v1/groups", {"conv": "d:alice:bob", "members": ["alice"]}, "d:"),
                ("POST", "/v1/groups/team/members", {"users": ["bad user"]}, "'bad user'"),
                ("GET", "/v1/conversations/bad%20conv/history?user=alice", None, "'bad conv'"),
                ("GET", "/v1/conversations/team/history?user=bad%20user", None, "'bad user'"),
                ("POST", "/v1/users/bad%20user/revoke", {}, "'bad user'"),
                ("GET", "/v1/users/bad%20user/conversation-list", None, "'bad user'"),
            ):
                status, doc = await call(c, method, path, body)
                assert_error(status, doc, 400, "BAD_REQUEST")
                message = doc["error"]["message"]
                assert words in message and not message.endswith("BAD_REQUEST"), (path, message)


async def test_numbers_in_paths_and_queries_are_ascii_digits_only(tmp_path: Path) -> None:
    """"²" is a digit to str.isdigit but not to int(): a seq or Last-Event-ID
    made of it was a 500 with a traceback; "1_0" is an int to Python but no
    number a client means.  Each is a 400 naming the parameter, and a range
    error names the parameter's real range."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            await im.post("team", b"x")
            status, doc = await call(c, "POST", "/v1/conversations/team/messages/%C2%B2/recall")
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "seq" in doc["error"]["message"], doc
            for query, name in (("from_seq=1_0", "from_seq"), ("from_seq=%C2%B2", "from_seq"), ("limit=%C2%B2", "limit"),
                                ("limit=%2B5", "limit"), ("from_seq=%201", "from_seq")):
                status, doc = await call(c, "GET", f"/v1/conversations/team/history?user=alice&{query}")
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert name in doc["error"]["message"], (query, doc)
            status, doc = await call(c, "GET", "/v1/conversations/team/history?user=alice&limit=-1")
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "from 1 to 1000" in doc["error"]["message"], doc
            status, doc = await call(c, "GET", "/v1/users/alice/conversation-list?include_hidden=maybe")
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "include_hidden" in doc["error"]["message"], doc
            assert (await call(c, "GET", "/v1/users/alice/conversation-list?include_hidden=true"))[0] == 200
            # Leading zeros are still numbers.
            assert (await call(c, "GET", "/v1/conversations/team/history?user=alice&from_seq=00&limit=010"))[0] == 200


async def test_retention_of_an_unknown_group_is_404_to_set_and_its_floor_to_read(tmp_path: Path) -> None:
    """HTTP.md: setting the retention of a group that does not exist is 404;
    reading it gives the defaults and the history floor, which a purge
    keeps (seqs continue after it)."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            assert_error(*await call(c, "PUT", "/v1/conversations/nope/retention", {"max_count": 5}),
                         404, "UNKNOWN_CONVERSATION")
            assert await call(c, "GET", "/v1/conversations/nope/retention") == (
                200, {"conv": "nope", "max_age": None, "max_count": None, "floor": 0})
            await im.create_group("team", ["alice"])
            for _ in range(3):
                await im.post("team", b"x")
            assert (await call(c, "DELETE", "/v1/conversations/team"))[0] == 200
            assert await call(c, "GET", "/v1/conversations/team/retention") == (
                200, {"conv": "team", "max_age": None, "max_count": None, "floor": 3})


async def test_a_refusal_cuts_the_input_it_echoes(tmp_path: Path) -> None:
    """A 10,000-character id (in a path, a query or a body) was echoed
    whole in the 400's message (10 KB of it); every refusal now shows it
    cut by ids._show: a prefix and its length."""
    long = "u" * 10_000
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice"])
            for method, path, body in (
                ("GET", f"/v1/users/{long}/devices", None),
                ("GET", f"/v1/users/{long}/unread", None),
                ("GET", f"/v1/users/{long}/presence", None),
                ("GET", f"/v1/users/{long}/read-positions", None),
                ("GET", f"/v1/users/{long}/conversations", None),
                ("GET", f"/v1/users/{long}/conversation-list", None),
                ("POST", f"/v1/users/{long}/kick", None),
                ("POST", f"/v1/users/{long}/revoke", None),
                ("DELETE", f"/v1/users/{long}", None),
                ("DELETE", f"/v1/groups/team/members/{long}", None),
                ("POST", f"/v1/users/{long}/conversations/team/settings", {"muted": True}),
                ("GET", f"/v1/conversations/team/history?user={long}", None),
                ("GET", f"/v1/conversations/{long}/history?user=alice", None),
                ("POST", f"/v1/conversations/{long}/messages", {"payload": "x"}),
                ("GET", f"/v1/conversations/{long}/retention", None),
                ("GET", f"/v1/users/alice/unread?conv={long}", None),
                ("GET", f"/v1/events?consumer={long}", None),
                ("GET", f"/v1/events/stream?consumer={long}", None),
                ("POST", "/v1/events/ack", {"consumer": long, "upto": 0}),
                ("POST", "/v1/tokens", {"user": long}),
                ("POST", "/v1/groups", {"conv": "g", "members": [long]}),
                ("GET", f"/{long}", None),  # 404
                ("GET", f"/v1/users/%ZZ{long}/devices", None),  # the router's own refusal
            ):
                status, doc = await call(c, method, path, body)
                assert status in (400, 404), (path[:60], status, doc)
                message = doc["error"]["message"]
                assert len(message) < 400 and "...(" in message, (method, path[:60], message[:300])


async def test_a_key_or_query_parameter_given_twice_is_refused_naming_it(tmp_path: Path) -> None:
    """{"user": "a", "user": "b"} and ?limit=1&limit=2 were taken silently,
    the last one winning: now 400 BAD_REQUEST naming the key or parameter,
    on every endpoint, nested objects included, and nothing is done."""
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice"])
            for method, path, raw, key in (
                ("POST", "/v1/groups", b'{"conv": "g", "conv": "h", "members": ["alice"]}', "conv"),
                ("POST", "/v1/tokens", b'{"user": "alice", "user": "bob"}', "user"),
                ("POST", "/v1/conversations/team/messages", b'{"payload": "x", "payload": "y"}', "payload"),
                ("POST", "/v1/messages", b'{"messages": [{"conv": "team", "payload": "x", "sender": "a", "sender": "b"}]}',
                 "sender"),
                ("POST", "/v1/events/ack", b'{"upto": 0, "upto": 1}', "upto"),
                ("POST", "/v1/users/alice/kick", b'{"reason": "a", "reason": "b"}', "reason"),
                ("PUT", "/v1/conversations/team/retention", b'{"max_count": 1, "max_count": 2}', "max_count"),
            ):
                status, doc = await call(c, method, path, raw=raw)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert f"the key '{key}' twice" in doc["error"]["message"], (path, doc)
            for path, name in (
                ("/v1/users/alice/conversation-list?limit=1&limit=2", "limit"),
                ("/v1/conversations/team/history?user=alice&user=bob", "user"),
                ("/v1/events?consumer=a&consumer=b", "consumer"),
                ("/v1/events/stream?after=1&after=1", "after"),
                ("/v1/users/alice/unread?conv=team&conv=", "conv"),
                ("/v1/info?x=1&x=2", "x"),
            ):
                c.close()  # (a refused request target ends its connection)
                c = Http(h.url)
                status, doc = await call(c, "GET", path)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert f"query parameter '{name}' is given 2 times" in doc["error"]["message"], (path, doc)
            assert await im.history("team", "alice") == []
            from pimcore.embed import RequestRefused

            with pytest.raises(RequestRefused):
                await im.members("h")  # the group was not created as "h" (nor as "g")
            with pytest.raises(RequestRefused):
                await im.members("g")
            c.close()


async def test_every_query_parameter_refusal_is_worded_the_same_way(tmp_path: Path) -> None:
    """Refusals of query parameters were worded four ways ("must be
    1..1000", "query parameters: 'limit' 1..10000, 'wait' 0..60 seconds,
    'after' >= 0" for any of three, "must be a number of seconds"...) and
    never said what was given.  Now one form: the parameter, its rule, and
    the value given (cut when long)."""
    top = "2^64-1"  # (seqs and event ids: the wire protocol's u64; tests/test_http_query.py)
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice"])
            for path, name, rule, given in (
                ("/v1/users/alice/conversation-list?limit=x", "limit", "an integer from 1 to 1000", "'x'"),
                ("/v1/users/alice/conversation-list?limit=0", "limit", "an integer from 1 to 1000", "'0'"),
                ("/v1/users/alice/conversation-list?include_hidden=maybe", "include_hidden", "true or false (1 or 0, yes or no)", "'maybe'"),
                ("/v1/users/alice/conversation-list?cursor=zz", "cursor", "a cursor this API gave (a page's \"cursor\")", "'zz'"),
                ("/v1/conversations/team/history?user=alice&from_seq=-1", "from_seq", f"an integer from 0 to {top}", "'-1'"),
                ("/v1/conversations/team/history?user=alice&limit=1001", "limit", "an integer from 1 to 1000", "'1001'"),
                ("/v1/conversations/team/history?user=alice&backward=2", "backward", "true or false (1 or 0, yes or no)", "'2'"),
                ("/v1/events?limit=0", "limit", "an integer from 1 to 10000", "'0'"),
                ("/v1/events?after=x", "after", f"an integer from 0 to {top}", "'x'"),
                ("/v1/events?after=99999999999999999999999", "after", f"an integer from 0 to {top}", "'99999999999999999999999'"),
                ("/v1/events?wait=61", "wait", "a number of seconds from 0 to 60", "'61'"),
                ("/v1/events?wait=soon", "wait", "a number of seconds from 0 to 60", "'soon'"),
                ("/v1/events/stream?limit=501", "limit", "an integer from 1 to 500", "'501'"),
                ("/v1/events/stream?keepalive=0.01", "keepalive", "a number of seconds from 0.05 to 300", "'0.01'"),
                ("/v1/users/alice/conversation-list?limit=" + "9" * 10_000, "limit", "an integer from 1 to 1000",
                 "'" + "9" * 70 + "'...(10000 chars)"),
            ):
                status, doc = await call(c, "GET", path)
                assert status == 400, (path[:80], doc)
                assert doc["error"]["message"] == f"query parameter '{name}' must be {rule}, not {given}", (path[:80], doc)
            # The header a reconnecting EventSource sends, and a seq in a path, in the same form.
            status, doc = await call(c, "GET", "/v1/events/stream", headers={"Last-Event-ID": "x"})
            assert (status, doc["error"]["message"]) == (400, f"header 'Last-Event-ID' must be an integer from 0 to {top}, not 'x'")
            status, doc = await call(c, "POST", "/v1/conversations/team/messages/0/recall")
            assert (status, doc["error"]["message"]) == (400, f"the seq in the path must be an integer from 1 to {top}, not '0'")


async def test_an_ack_past_the_last_event_is_409_and_a_bad_consumer_name_says_the_rule(tmp_path: Path) -> None:
    """POST /v1/events/ack {"upto": 10**9} was taken (clamped to the last
    id, 200): a client acking an id no event has is confused, now 409
    PAST_LAST_EVENT naming the last id, and the cursor does not move.  An
    invalid consumer name said only "a malformed request": now which
    character or length, and the rule, on every event endpoint."""
    rule = "consumer ids are 1-64 ASCII characters from A-Z a-z 0-9 _ . @ -"
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            status, doc = await call(c, "POST", "/v1/events/ack", {"consumer": "push", "upto": 1})
            assert_error(status, doc, 409, "PAST_LAST_EVENT")
            assert doc["error"]["message"] == "upto 1 is past the last event id, 0 (no event yet): nothing acked", doc
            await im.create_group("team", ["alice"])
            await im.post("team", b"x")
            last = (await im.event_cursor("push"))[1]
            assert last > 0
            for upto in (last + 1, 10**9):
                status, doc = await call(c, "POST", "/v1/events/ack", {"consumer": "push", "upto": upto})
                assert_error(status, doc, 409, "PAST_LAST_EVENT")
                assert doc["error"]["message"] == f"upto {upto} is past the last event id, {last}: nothing acked", doc
            assert await im.event_cursor("push") == (0, last)  # not moved
            assert await call(c, "POST", "/v1/events/ack", {"consumer": "push", "upto": last}) == (
                200, {"consumer": "push", "cursor": last})
            for method, path, body, why in (
                ("GET", "/v1/events?consumer=bad%0Aname", None, "has the character '\\n'"),
                ("GET", "/v1/events/stream?consumer=a%20b", None, "has the character ' '"),
                ("POST", "/v1/events/ack", {"consumer": "x" * 65, "upto": 0}, "is 65 characters long"),
                ("POST", "/v1/events/ack", {"consumer": "", "upto": 0}, "empty consumer id"),
                ("GET", "/v1/events?consumer=caf%C3%A9", None, "has the non-ASCII character 'é'"),
            ):
                status, doc = await call(c, method, path, body)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert why in doc["error"]["message"] and f"({rule})" in doc["error"]["message"], (path, doc)


async def test_an_ack_with_a_null_or_non_string_consumer_is_400_naming_the_field(tmp_path: Path) -> None:
    """POST /v1/events/ack {"consumer": null, ...} acked as "default" (a new
    user's trial): a client whose consumer variable was unset moved another
    consumer's cursor.  Now 400 naming the field, nothing acked; a consumer
    left out is still "default"."""
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice"])
            await im.post("team", b"x")
            last = (await im.event_cursor("default"))[1]
            assert last > 0
            for given, said in ((None, "null"), (7, "a number"), (["push"], "an array")):
                status, doc = await call(c, "POST", "/v1/events/ack", {"consumer": given, "upto": last})
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert doc["error"]["message"] == (f"field 'consumer' must be a string (a consumer id), not {said};"
                                                   ' leave it out for "default"'), doc
            assert await im.event_cursor("default") == (0, last)  # nothing acked
            assert await call(c, "POST", "/v1/events/ack", {"upto": last}) == (200, {"consumer": "default", "cursor": last})


async def test_the_webhook_senders_consumer_is_not_read_or_acked_through_the_api(tmp_path: Path) -> None:
    """POST /v1/events/ack {"consumer": "webhook", ...} moved the webhook
    sender's own cursor: the events it had not delivered were never sent
    (a trial), and an ack made before webhooks were configured skipped
    those recorded before.  The name is the sender's: reading or acking it
    is 400, nothing moved; listing shows it, and deleting a stale one
    (webhooks off) works."""
    with trio.fail_after(60):
        async with api(tmp_path, events=True, consumer_idle=0) as (im, h, c):
            await im.create_group("team", ["alice"])
            await im.post("team", b"x")
            last = (await im.event_cursor("default"))[1]
            status, doc = await call(c, "POST", "/v1/events/ack", {"consumer": "webhook", "upto": last})
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "webhook sender" in doc["error"]["message"], doc
            for path in ("/v1/events?consumer=webhook", "/v1/events/stream?consumer=webhook"):
                status, doc = await call(c, "GET", path)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert "webhook sender" in doc["error"]["message"], doc
            assert await im.event_consumers() == []  # nothing created, nothing acked
            await im.ack_events(0, "webhook")  # (a stale cursor of a sender configured once)
            assert await call(c, "DELETE", "/v1/events/consumers/webhook") == (200, {"consumer": "webhook", "deleted": True})


async def test_a_consumer_read_within_consumer_idle_is_409_with_retry_after(tmp_path: Path) -> None:
    """A poller between two requests holds none open: deleting its consumer
    then let the reclaim drop what it had not read (a trial).  409 within
    [server] consumer_idle of its last read or ack, Retry-After saying when."""
    with trio.fail_after(60):
        async with api(tmp_path, events=True, consumer_idle=30) as (im, h, c):
            await im.create_group("team", ["alice"])
            await im.post("team", b"x")
            status, page = await call(c, "GET", "/v1/events?consumer=poller")
            assert status == 200 and page["events"]
            assert (await call(c, "POST", "/v1/events/ack", {"consumer": "poller", "upto": page["next"]}))[0] == 200
            status, headers, body = await c.request("DELETE", "/v1/events/consumers/poller", key=KEY)
            doc = json.loads(body)
            assert status == 409 and doc["error"]["code"] == "CONSUMER_IN_USE", doc
            assert "within [server] consumer_idle (30 s)" in doc["error"]["message"], doc
            assert 1 <= int(headers["retry-after"]) <= 30, headers
            assert await im.event_consumers() == [("poller", page["next"])]  # nothing deleted


async def test_a_null_sender_or_device_is_400_not_the_system_or_every_device(tmp_path: Path) -> None:
    """{"sender": null} posted, edited and recalled as the system, unmoderated
    (a trial), as {"consumer": null} once acked "default"; {"device": null}
    would kick or revoke every device.  Each is 400 naming the field, and
    nothing is done; {"sender": ""} on a recall too."""
    with trio.fail_after(60):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("team", ["alice"])
            first = await im.post("team", b"hello", sender="alice", device="web")
            for method, path, body in (
                    ("POST", "/v1/conversations/team/messages", {"payload": "x", "sender": None}),
                    ("POST", "/v1/conversations/team/messages", {"payload": "x", "sender": "alice", "device": None}),
                    ("POST", "/v1/messages", {"messages": [{"conv": "team", "payload": "x", "sender": None}]}),
                    ("POST", "/v1/messages", {"messages": [{"conv": "team", "payload": "x", "idempotency_key": None}]}),
                    ("POST", f"/v1/conversations/team/messages/{first.seq}/edit", {"payload": "y", "sender": None}),
                    ("POST", f"/v1/conversations/team/messages/{first.seq}/recall", {"sender": None}),
                    ("POST", f"/v1/conversations/team/messages/{first.seq}/recall", {"sender": ""}),
                    ("POST", f"/v1/conversations/team/messages/{first.seq}/delete", {"user": "alice", "device": None}),
                    ("POST", "/v1/users/alice/kick", {"device": None}),
                    ("POST", "/v1/users/alice/revoke", {"device": None}),
                    ("POST", "/v1/tokens", {"user": "alice", "device": None})):
                status, doc = await call(c, method, path, body)
                if path == "/v1/messages" and status == 200:  # (a batch answers per item)
                    status, doc = 400, doc["results"][0]
                assert status == 400 and "BAD_REQUEST" in json.dumps(doc), (path, body, status, doc)
                said = json.dumps(doc)
                assert "'sender'" in said or "'device'" in said or "'idempotency_key'" in said, (path, said)
            history = await im.history("team", "alice", from_seq=0, backward=False)
            assert [(m.seq, m.payload, m.sender) for m in history] == [(first.seq, b"hello", "alice")]


async def test_an_unknown_field_in_a_body_is_refused_naming_it_and_the_fields_taken(tmp_path: Path) -> None:
    """{"payload": "x", "Sender": "alice"} was posted as the system, a batch
    item's "idempotencykey" stored without a key, {"history-visible": true}
    made a group whose history is not visible: unknown fields were ignored
    silently, so a typo changed what was stored.  Now 400 BAD_REQUEST naming
    the field and the fields the endpoint takes, on every endpoint that reads
    a body, and nothing is done."""
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"first", sender="alice", device="d")
            for method, path, body, field, takes in (
                ("POST", "/v1/conversations/team/messages", {"payload": "x", "Sender": "alice"}, "Sender",
                 "'payload', 'payload_b64', 'sender', 'device', 'mentions', 'mention_all'"),
                ("POST", "/v1/messages", {"messages": [], "atomic": True}, "atomic", "'messages'"),
                ("POST", "/v1/groups", {"conv": "t", "members": ["a"], "history-visible": True}, "history-visible",
                 "'conv', 'members', 'history_visible'"),
                ("POST", "/v1/conversations/team/messages/1/recall", {"Sender": "alice"}, "Sender", "'sender', 'device'"),
                ("POST", "/v1/conversations/team/messages/1/edit", {"payload": "y", "mentions": []}, "mentions",
                 "'payload', 'payload_b64', 'sender', 'device'"),
                ("POST", "/v1/conversations/team/messages/1/delete", {"user": "bob", "sender": "bob"}, "sender",
                 "'user', 'device'"),
                ("POST", "/v1/groups/team/members", {"users": ["carol"], "user": "dave"}, "user", "'users'"),
                ("POST", "/v1/groups/team/members/remove", {"users": ["bob"], "reason": "x"}, "reason", "'users'"),
                ("POST", "/v1/users/alice/kick", {"devices": "d"}, "devices", "'device', 'reason'"),
                ("POST", "/v1/users/alice/revoke", {"device": "d", "before_us": 1}, "before_us", "'device', 'before'"),
                ("POST", "/v1/tokens", {"user": "alice", "ttl_s": 60}, "ttl_s", "'user', 'device', 'ttl'"),
                ("POST", "/v1/users/alice/conversations/team/settings", {"pin": True}, "pin",
                 "'pinned', 'muted', 'hidden'"),
                ("POST", "/v1/events/ack", {"upto": 0, "consumer_id": "push"}, "consumer_id", "'consumer', 'upto'"),
                ("PUT", "/v1/conversations/team/retention", {"max_age_s": 5}, "max_age_s", "'max_age', 'max_count'"),
            ):
                status, doc = await call(c, method, path, body)
                assert_error(status, doc, 400, "BAD_REQUEST")
                assert doc["error"]["message"] == f"unknown field {field!r}: this endpoint takes {takes}", (path, doc)
            # A batch item's unknown field is that item's error; the others are posted.
            status, doc = await call(c, "POST", "/v1/messages", {"messages": [
                {"conv": "team", "payload": "x", "idempotencykey": "k1"},
                {"conv": "team", "payload": "y", "idempotency_key": "k2"}]})
            assert status == 200, doc
            bad, good = doc["results"]
            assert bad == {"status": "error", "code": "BAD_REQUEST", "message":
                           "messages[0]: unknown field 'idempotencykey': each message takes 'conv', 'payload', "
                           "'payload_b64', 'sender', 'device', 'idempotency_key', 'mentions', 'mention_all'"}, bad
            assert good["status"] == "stored", good
            # A long unknown name is cut as other echoed input is.
            status, doc = await call(c, "POST", "/v1/tokens", {"user": "alice", "u" * 10_000: 1})
            assert_error(status, doc, 400, "BAD_REQUEST")
            assert "'u" in doc["error"]["message"] and "(10000 chars)" in doc["error"]["message"], doc
            assert len(doc["error"]["message"]) < 300, doc
            # Nothing was done by the refused requests.
            assert [m.payload for m in await im.history("team", "alice", backward=False)] == [b"first", b"y"]
            assert await im.members("team") == ("alice", "bob") or list(await im.members("team")) == ["alice", "bob"]
            from pimcore.embed import RequestRefused

            with pytest.raises(RequestRefused):
                await im.members("t")
            assert (await im.retention("team")).max_age is None
            assert await im.event_cursor("push") == (0, (await im.event_cursor("push"))[1])


async def test_a_single_valued_header_given_twice_is_refused_naming_it(tmp_path: Path) -> None:
    """Idempotency-Key: a and Idempotency-Key: b were joined, "a, b", and
    taken as one key: now 400 BAD_REQUEST naming the header, as a query
    parameter given twice is, for every header the API reads that has one
    value (Authorization, Idempotency-Key, Last-Event-ID); nothing is done
    and the connection ends."""
    from test_http import host_port, read_until_eof

    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice"])
            for name, request in (
                ("Idempotency-Key", b"POST /v1/conversations/team/messages HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nIdempotency-Key: a\r\nidempotency-key: b\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"payload\":\"x\"}"),
                ("Last-Event-ID", b"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nLast-Event-ID: 1\r\nLast-Event-ID: 1\r\n\r\n"),
                ("Authorization", b"GET /v1/info HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"),
            ):
                stream = await trio.open_tcp_stream(*host_port(h.url))
                await stream.send_all(request)
                reply = await read_until_eof(stream)
                await stream.aclose()
                assert reply.startswith(b"HTTP/1.1 400 "), (name, reply)
                doc = json.loads(reply.split(b"\r\n\r\n", 1)[1])
                assert_error(400, doc, 400, "BAD_REQUEST")
                assert doc["error"]["message"] == f"header '{name}' is given 2 times: give it once", doc
                assert KEY.encode() not in reply
            assert await im.history("team", "alice") == []
            c.close()


async def test_reading_events_after_an_id_past_the_last_is_409_as_acking_it_is(tmp_path: Path) -> None:
    """GET /v1/events?after=999999 was 200 with "next": 999999, an id an
    ack then refused (409 PAST_LAST_EVENT), and events recorded later were
    skipped until their ids passed it.  Now reading after an id past the
    last event is the same 409 PAST_LAST_EVENT, on /v1/events (after) and
    /v1/events/stream (after, Last-Event-ID); after the last id itself is
    a page of nothing, then what comes next."""
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            status, doc = await call(c, "GET", "/v1/events?after=1")
            assert_error(status, doc, 409, "PAST_LAST_EVENT")
            assert doc["error"]["message"] == "after 1 is past the last event id, 0 (no event yet): nothing read", doc
            await im.create_group("team", ["alice"])
            await im.post("team", b"first")
            last = (await im.event_cursor("default"))[1]
            assert last > 0
            for path, headers, what in (
                (f"/v1/events?after={last + 1}", {}, f"after {last + 1}"),
                ("/v1/events?after=999999", {}, "after 999999"),
                ("/v1/events/stream?after=999999", {}, "after 999999"),
                ("/v1/events/stream", {"Last-Event-ID": "999999"}, "Last-Event-ID 999999"),
            ):
                status, doc = await call(c, "GET", path, headers=headers)
                assert_error(status, doc, 409, "PAST_LAST_EVENT")
                assert doc["error"]["message"] == f"{what} is past the last event id, {last}: nothing read", (path, doc)
            status, doc = await call(c, "GET", f"/v1/events?after={last}")
            assert (status, doc["events"], doc["next"]) == (200, [], last), doc
            await im.post("team", b"x")
            status, doc = await call(c, "GET", f"/v1/events?after={doc['next']}")
            assert status == 200 and [e["type"] for e in doc["events"]] != [], doc
            assert await call(c, "POST", "/v1/events/ack", {"upto": doc["next"]}) == (
                200, {"consumer": "default", "cursor": doc["next"]})
            c.close()


async def test_every_body_refuses_the_fields_its_openapi_schema_does_not_list(tmp_path: Path) -> None:
    """The fields an endpoint takes are the ones its OpenAPI request body
    lists (additionalProperties false, items of a batch too): a field not
    listed is refused, and the refusal lists exactly the schema's fields."""
    import re

    from pimcore.http.openapi import openapi_document

    doc = openapi_document("test")
    bodies = [(m.upper(), p, op["requestBody"]["content"]["application/json"]["schema"])
              for p, ops in doc["paths"].items() for m, op in ops.items() if "requestBody" in op]
    assert len(bodies) >= 14
    with trio.fail_after(60):
        async with api(tmp_path, events=True) as (im, h, c):
            await im.create_group("team", ["alice", "bob"])
            for method, pattern, schema in bodies:
                assert schema.get("additionalProperties") is False, (pattern, schema)
                path = pattern.replace("{conv}", "team").replace("{seq}", "1").replace("{user}", "alice")
                status, out = await call(c, method, path, {"zz_unknown": 1})
                assert_error(status, out, 400, "BAD_REQUEST")
                message = out["error"]["message"]
                assert message.startswith("unknown field 'zz_unknown': this endpoint takes "), (path, message)
                assert set(re.findall(r"'([a-z_0-9]+)'", message.split("takes ", 1)[1])) == set(schema["properties"]), (
                    path, message)
            item = next(s for m, p, s in bodies if p == "/v1/messages")
            item = item["properties"]["messages"]["items"]
            assert item.get("additionalProperties") is False
            status, out = await call(c, "POST", "/v1/messages", {"messages": [{"conv": "team", "payload": "x", "zz": 1}]})
            message = out["results"][0]["message"]
            assert set(re.findall(r"'([a-z_0-9]+)'", message.split("takes ", 1)[1])) == set(item["properties"]), message
            c.close()


async def test_a_polling_consumer_keeps_the_events_it_has_not_acked_from_reclaim(tmp_path: Path) -> None:
    """Was: GET /v1/events from a consumer's cursor did not create the
    cursor, so once another consumer acked, the reclaim dropped events this
    one had read but not acked yet, and its next poll skipped them."""
    with trio.fail_after(30):
        async with api(tmp_path, events=True, reclaim_interval=0.02, dedupe_window=0) as (im, h, c):
            await im.create_group("team", ["alice"])
            await im.set_retention("team", max_count=1)  # its floor shows a reclaim pass ran
            for i in range(2):
                await im.post("team", b"m%d" % i)
            status, doc = await call(c, "GET", "/v1/events?consumer=poller&limit=1")
            assert status == 200 and doc["events"][0]["id"] == 1
            _, last = await im.event_cursor("other")
            await im.ack_events(last, "other")
            await im.post("team", b"m2")
            while (await im.retention("team")).floor < 2:
                await trio.sleep(0.01)
            status, again = await call(c, "GET", "/v1/events?consumer=poller&limit=1")
            assert status == 200 and again["events"] == doc["events"]


async def test_unread_leaves_out_a_message_deleted_for_oneself_and_an_unknown_conversation_is_404(tmp_path: Path) -> None:
    """The trial: three posts from ub1, ua1 deletes #1 for herself: unread
    stayed 3 (now 2).  And ?conv= of a conversation that does not exist was
    200 unread 0 where history and settings answer 404 UNKNOWN_CONVERSATION
    (now 404 too); a user not in an existing one still gets 0."""
    with trio.fail_after(30):
        async with api(tmp_path) as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["ua1", "ub1"]}))[0] == 201
            for n in range(3):
                status, _ = await call(c, "POST", "/v1/conversations/team/messages",
                                       {"payload": f"m{n}", "sender": "ub1"})
                assert status == 201
            assert await call(c, "GET", "/v1/users/ua1/unread?conv=team") == (
                200, {"user": "ua1", "conv": "team", "unread": 3})
            status, _ = await call(c, "POST", "/v1/conversations/team/messages/1/delete", {"user": "ua1"})
            assert status in (200, 201)
            assert await call(c, "GET", "/v1/users/ua1/unread?conv=team") == (
                200, {"user": "ua1", "conv": "team", "unread": 2})
            assert await call(c, "GET", "/v1/users/ua1/unread") == (200, {"user": "ua1", "conv": None, "unread": 2})
            status, doc = await call(c, "GET", "/v1/users/ua1/unread?conv=nosuch")
            assert_error(status, doc, 404, "UNKNOWN_CONVERSATION")
            assert (await call(c, "GET", "/v1/conversations/nosuch/history?user=ua1"))[0] == 404
            assert await call(c, "GET", "/v1/users/carol/unread?conv=team") == (
                200, {"user": "carol", "conv": "team", "unread": 0})
            assert await call(c, "GET", "/v1/users/carol/unread?conv=d:carol:ua1") == (
                200, {"user": "carol", "conv": "d:carol:ua1", "unread": 0})


async def test_an_operator_lists_event_consumers_and_deletes_a_stray_one(tmp_path: Path) -> None:
    """A consumer name read once by mistake held the reclaim of every later
    event back for 90 days, and "there is no call to delete one".  Now GET
    /v1/events/consumers lists the cursors and DELETE
    /v1/events/consumers/{consumer} removes one: 404 NO_SUCH_CONSUMER when
    there is none, 409 CONSUMER_IN_USE while a stream, a long-poll or an
    embedding reader reads it, 400 for an invalid name."""
    from test_http import Http
    from test_http_batch_sse import Sse

    with trio.fail_after(30):
        async with api(tmp_path, events=True, consumer_idle=0) as (im, h, c):
            await im.create_group("team", ["alice"])
            await im.post("team", b"m0")
            assert await call(c, "GET", "/v1/events/consumers") == (200, {"consumers": [], "more": False})
            assert (await call(c, "GET", "/v1/events?consumer=psuh"))[0] == 200  # a typo: read once, never acked
            status, doc = await call(c, "GET", "/v1/events?consumer=push")
            assert await call(c, "POST", "/v1/events/ack", {"consumer": "push", "upto": doc["next"]}) == (
                200, {"consumer": "push", "cursor": doc["next"]})
            assert await call(c, "GET", "/v1/events/consumers") == (200, {"consumers": [
                {"consumer": "psuh", "cursor": 0}, {"consumer": "push", "cursor": doc["next"]}], "more": False})
            series = 'pimcore_event_outbox_depth{consumer="psuh"}'
            assert series in (await c.request("GET", "/metrics"))[2].decode()
            assert await call(c, "DELETE", "/v1/events/consumers/psuh") == (200, {"consumer": "psuh", "deleted": True})
            assert series not in (await c.request("GET", "/metrics"))[2].decode()  # its series is gone too
            status, err = await call(c, "DELETE", "/v1/events/consumers/psuh")
            assert_error(status, err, 404, "NO_SUCH_CONSUMER")
            assert "'psuh'" in err["error"]["message"]
            assert await call(c, "GET", "/v1/events/consumers") == (200, {"consumers": [
                {"consumer": "push", "cursor": doc["next"]}], "more": False})
            status, err = await call(c, "DELETE", "/v1/events/consumers/bad%20name")
            assert_error(status, err, 400, "BAD_REQUEST")
            assert "consumer" in err["error"]["message"]
            # An open SSE stream reads "push": 409, nothing deleted; once it
            # is gone (the server finds the disconnect at its next write), 200.
            s = await Sse.open(h.url, "/v1/events/stream?consumer=push&keepalive=0.05")
            await s.block()  # the stream's opening comment: it runs
            assert_error(*await call(c, "DELETE", "/v1/events/consumers/push"), 409, "CONSUMER_IN_USE")
            await s.aclose()
            while im.consumer_in_use("push"):
                await trio.sleep(0.02)
            assert await call(c, "DELETE", "/v1/events/consumers/push") == (200, {"consumer": "push", "deleted": True})
            # A long-poll waiting on a consumer (with a cursor): 409 until it
            # returns.
            await im.ack_events(0, "poll")
            _, last = await im.event_cursor("poll")
            poller = Http(h.url)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(lambda: call(poller, "GET", f"/v1/events?consumer=poll&after={last}&wait=20"))
                    while not im.consumer_in_use("poll"):
                        await trio.sleep(0.02)
                    assert_error(*await call(c, "DELETE", "/v1/events/consumers/poll"), 409, "CONSUMER_IN_USE")
                    await im.post("team", b"m1")  # the long-poll returns
            finally:
                poller.close()
            # An embedding reader (an open events() stream) too; a name with
            # no cursor is 404 first (nothing to delete, nothing to lose).
            stream = im.events("embedded")
            assert_error(*await call(c, "DELETE", "/v1/events/consumers/embedded"), 404, "NO_SUCH_CONSUMER")
            await im.ack_events(0, "embedded")
            assert_error(*await call(c, "DELETE", "/v1/events/consumers/embedded"), 409, "CONSUMER_IN_USE")
            del stream
            assert await call(c, "DELETE", "/v1/events/consumers/embedded") == (200, {"consumer": "embedded", "deleted": True})
