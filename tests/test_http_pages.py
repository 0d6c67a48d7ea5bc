"""Pages of the server API bounded in bytes (pimcore.http.api.MAX_PAGE_BYTES):
history, the conversation list and the event poll stop early over large
payloads, `more` set, and following the page's continuation returns every
item exactly once.  (Before, `history?limit=1000` over 64 KiB messages was
one 87 MB body, built in one go on the broker's event loop: a new user's
trial.)"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import trio

from pimcore.http.api import MAX_PAGE_BYTES

from test_http_api import api

KEY_HEADERS = {"Content-Type": "application/json"}

#: Large payloads: this many of them are over the budget (60 KiB each,
#: 80 KiB as base64): several pages, whatever the limit.
BIG = 60 * 1024
COUNT = MAX_PAGE_BYTES // (BIG * 4 // 3) * 2 + 7


async def get_raw(c: Any, path: str) -> tuple[int, bytes]:
    from test_http import KEY

    status, headers, body = await c.request("GET", path, key=KEY, headers=KEY_HEADERS)
    assert headers["content-type"] == "application/json", headers
    return status, body


async def test_a_history_page_over_large_messages_stops_at_the_byte_budget_and_from_seq_goes_on(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with api(tmp_path) as (im, h, c):
            await im.create_group("big", ["alice", "bob"])
            payloads = {}
            for _ in range(COUNT):
                data = os.urandom(BIG)
                payloads[(await im.post("big", data)).seq] = data
            for backward in (True, False):
                seen: list[int] = []
                from_seq, pages = 0, 0
                while True:
                    status, body = await get_raw(c, f"/v1/conversations/big/history?user=bob&limit=1000"
                                                    f"&from_seq={from_seq}&backward={str(backward).lower()}")
                    assert status == 200 and len(body) <= MAX_PAGE_BYTES
                    page = json.loads(body)
                    assert page["messages"], page  # at least one message a page
                    for m in page["messages"]:
                        seen.append(m["seq"])
                        if m["seq"] in payloads:
                            assert base64.b64decode(m["payload_b64"]) == payloads[m["seq"]]
                    pages += 1
                    if not page["more"]:
                        break
                    # The continuation as documented: the last seq of the page.
                    from_seq = page["messages"][-1]["seq"]
                assert pages >= 2
                want = sorted(payloads) + [1]  # (seq 1: the group's JOINED entry)
                assert sorted(seen) == sorted(set(want)) and len(seen) == len(set(seen))
                assert seen == sorted(seen, reverse=backward)
            # A page that the limit ends says whether there is more.
            status, body = await get_raw(c, "/v1/conversations/big/history?user=bob&limit=2")
            page = json.loads(body)
            assert len(page["messages"]) == 2 and page["more"] is True
            status, body = await get_raw(c, "/v1/conversations/big/history?user=bob&from_seq=3&limit=2")
            page = json.loads(body)
            assert [m["seq"] for m in page["messages"]] == [2, 1] and page["more"] is False


async def test_a_conversation_list_page_over_large_last_messages_stops_at_the_byte_budget(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with api(tmp_path) as (im, h, c):
            convs = [f"g{i}" for i in range(COUNT)]
            for conv in convs:
                await im.create_group(conv, ["alice", "bob"])
                await im.post(conv, os.urandom(BIG))
            seen: list[str] = []
            cursor, pages = "", 0
            while True:
                status, body = await get_raw(c, f"/v1/users/bob/conversation-list?limit=1000&cursor={cursor}")
                assert status == 200 and len(body) <= MAX_PAGE_BYTES
                page = json.loads(body)
                assert page["entries"], page
                for e in page["entries"]:
                    assert len(base64.b64decode(e["last"]["payload_b64"])) == BIG
                    seen.append(e["conv"])
                pages += 1
                if not page["more"]:
                    break
                cursor = page["cursor"]
            assert pages >= 2 and sorted(seen) == sorted(convs) and len(seen) == len(set(seen))


async def _post_big_messages(im) -> int:
    """COUNT messages of BIG random bytes in a group "big"; the last event id of consumer "push"."""
    await im.create_group("big", ["alice", "bob"])
    for _ in range(COUNT):
        await im.post("big", os.urandom(BIG), sender="alice", device="web")
    return (await im.event_cursor("push"))[1]


async def test_an_event_poll_over_large_messages_stops_at_the_byte_budget_and_next_goes_on(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with api(tmp_path, events=True) as (im, h, c):
            last = await _post_big_messages(im)
            seen: list[int] = []
            after, pages = 0, 0
            while True:
                status, body = await get_raw(c, f"/v1/events?consumer=push&after={after}&limit=10000")
                assert status == 200 and len(body) <= MAX_PAGE_BYTES
                page = json.loads(body)
                assert page["events"], page
                seen += [ev["id"] for ev in page["events"]]
                assert page["next"] == page["events"][-1]["id"]
                pages += 1
                if not page["more"]:
                    break
                after = page["next"]
            assert pages >= 2 and seen == list(range(1, last + 1))
            assert len(seen) == COUNT  # a message event each


async def test_each_server_sent_events_write_stays_within_the_byte_budget(tmp_path: Path) -> None:
    import h11

    from test_http_batch_sse import Sse

    with trio.fail_after(120):
        async with api(tmp_path, events=True) as (im, h, c):
            last = await _post_big_messages(im)
            s = await Sse.open(h.url, "/v1/events/stream?consumer=push&limit=500&keepalive=60")
            # Each write is one HTTP chunk: h11 marks where each begins and ends.
            chunks: list[bytes] = []
            part = b""
            ids: list[int] = []
            while not ids or ids[-1] < last:
                ev = await s._next()
                assert isinstance(ev, h11.Data), ev
                part += ev.data
                if ev.chunk_end:
                    chunks.append(part)
                    ids += [int(line[4:]) for line in part.split(b"\n") if line.startswith(b"id: ")]
                    part = b""
            await s.aclose()
            assert max(len(chunk) for chunk in chunks) <= MAX_PAGE_BYTES
            assert len(chunks) >= 3  # the stream's opening comment, then at least two writes of events
            assert ids == list(range(1, last + 1))


async def test_a_conversation_list_page_is_one_read_of_the_store_however_many_entries_it_holds(tmp_path: Path) -> None:
    """The store builds the user's whole list for each read of it, so the
    page is cut by bytes from one read (reading a few entries at a time,
    as many as could fit at max_payload each, cost a whole list per piece:
    a review).  Small entries: the page holds them all, from one read."""
    from pimcore.store import MemoryStore
    from pimcore.store.base import ReadConversations

    class CountedReads(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.list_reads = 0

        def read(self, ops: Any) -> Any:
            ops = tuple(ops)
            self.list_reads += sum(isinstance(op, ReadConversations) for op in ops)
            return super().read(ops)

    store = CountedReads()
    # More than one read's worth when reading as many as could fit at
    # max_payload (64 KiB: about 48 entries a read).
    convs = [f"g{i}" for i in range(150)]
    with trio.fail_after(60):
        async with api(tmp_path, store=store) as (im, h, c):
            for conv in convs:
                await im.create_group(conv, ["alice", "bob"])
                await im.post(conv, b"hi")
            before = store.list_reads
            status, body = await get_raw(c, "/v1/users/bob/conversation-list?limit=1000")
            page = json.loads(body)
            assert status == 200 and page["more"] is False
            assert sorted(e["conv"] for e in page["entries"]) == sorted(convs)
            assert store.list_reads - before == 1


async def test_an_event_poll_whose_follow_up_read_finds_nothing_returns_what_it_has(tmp_path: Path, monkeypatch: Any,
                                                                                   autojump_clock: Any) -> None:
    """A poll reads a few events at a time (as many as fit the budget at
    max_payload each) and reads on while the last event id is past what it
    has.  The events past it may be gone by then: reclaimed, every consumer
    with a cursor having acked them (here, between the poll's two reads,
    another consumer acks them all and the reclaim runs).  The follow-up
    read would wait for a new event: it is bounded (a second, or the poll's
    `wait`), and the poll answers with the events it has.  (Virtual time:
    a poll that waited for a new event would reach fail_after.)"""
    from pimcore.core import BrokerConfig
    from pimcore.store import LmdbStore
    from pimcore.store.base import Reclaim, WriteBatch

    from test_http_batch_sse import Sse

    store = LmdbStore(str(tmp_path / "db"), durability="os")
    try:
        with trio.fail_after(600):
            async with api(tmp_path, store=store, events=True) as (im, h, c):
                # One read's worth of events (as many as could fit the budget
                # at max_payload) and two more: the poll reads on for them.
                max_payload = im.server.broker.config.limits.max_payload
                want = (MAX_PAGE_BYTES - 1024) // (4 * ((max_payload + 2) // 3) + 1024) + 1
                await im.create_group("g", ["alice", "bob"])
                while (await im.event_cursor("push"))[1] < want + 2:
                    await im.post("g", b"hi", sender="alice", device="web")
                _, last = await im.event_cursor("push")
                cursor, reads = im.event_cursor, []

                async def reclaimed_before_the_follow_up(consumer: str = "default") -> tuple[int, int]:
                    reads.append(consumer)
                    if len(reads) == 2:  # the poll has its first read's events: the rest go
                        assert await im.ack_events(last, "other") == last
                        cfg = BrokerConfig()
                        (done,) = store.commit(WriteBatch(10**9, (Reclaim(im.server.now(), cfg.device_retention,
                                                                          cfg.inbox_max_age),)))
                        assert done.events == last
                    return await cursor(consumer)

                monkeypatch.setattr(im, "event_cursor", reclaimed_before_the_follow_up)
                s = await Sse.open(h.url, "/v1/events?consumer=push&after=0&limit=10000")
                assert s.status == 200
                page = json.loads(await s.body())
                await s.aclose()
                assert len(reads) == 2  # (the follow-up's check came)
                assert [ev["id"] for ev in page["events"]] == list(range(1, want + 1))
                assert page["next"] == want and page["more"] is False
    finally:
        store.close()

#: A page budget ([http] max_page_bytes) just over one message's JSON at
#: the default max_payload (64 KiB: 93,912 bytes with 64 mentions).
SMALL_BUDGET = 100_000


async def test_a_smaller_page_budget_gives_more_pages_each_within_it_and_every_item_once(tmp_path: Path) -> None:
    """``[http] max_page_bytes`` (here from the config file) bounds every
    page: 12 messages of 30 KiB (40 KiB as base64) are two a page, in
    history, the conversation list and the event poll, each item exactly
    once across the pages."""
    from pimcore.embed import open_pimcore
    from pimcore.http.api import smallest_page_bytes

    from test_http import KEY, Http

    assert smallest_page_bytes(65536, 64) <= SMALL_BUDGET
    cfg = tmp_path / "pimcore.toml"
    cfg.write_text(f"[http]\nmax_page_bytes = {SMALL_BUDGET}\n")
    size, n = 30 * 1024, 12
    with trio.fail_after(120):
        async with open_pimcore(config_file=str(cfg), data_dir=tmp_path / "d", secret="s" * 32, events=True,
                                http="tcp://127.0.0.1:0", api_keys=[KEY]) as im:
            assert im.http_url is not None
            c = Http(im.http_url)
            try:
                await im.create_group("big", ["alice", "bob"])
                seqs = [(await im.post("big", os.urandom(size), sender="alice", device="web")).seq for _ in range(n)]
                convs = [f"g{i}" for i in range(n)]
                for conv in convs:
                    await im.create_group(conv, ["alice", "carol"])
                    await im.post(conv, os.urandom(size))

                async def pages(path: Any, field: str, go_on: Any) -> tuple[list[Any], int]:
                    """Every item of the pages of path(at), at the continuation go_on(page)."""
                    seen: list[Any] = []
                    more, count, at = True, 0, ""
                    while more:
                        status, body = await get_raw(c, path(at))
                        assert status == 200 and len(body) <= SMALL_BUDGET, (status, len(body))
                        page = json.loads(body)
                        assert page[field], page  # at least one item a page
                        seen += page[field]
                        count += 1
                        more, at = page["more"], go_on(page)
                    return seen, count

                history, count = await pages(
                    lambda at: f"/v1/conversations/big/history?user=bob&limit=1000&backward=false&from_seq={at or 0}",
                    "messages", lambda p: p["messages"][-1]["seq"])
                assert [m["seq"] for m in history] == seqs and count >= n // 2
                entries, count = await pages(lambda at: f"/v1/users/carol/conversation-list?limit=1000&cursor={at}",
                                             "entries", lambda p: p["cursor"])
                assert sorted(e["conv"] for e in entries) == sorted(convs) and len(entries) == n and count >= n // 2
                _, last = await im.event_cursor("push")
                events, count = await pages(lambda at: f"/v1/events?consumer=push&limit=10000&after={at or 0}",
                                            "events", lambda p: p["next"])
                assert [ev["id"] for ev in events] == list(range(1, last + 1)) and count >= n
            finally:
                c.close()


async def test_a_message_larger_than_the_page_budget_is_a_page_of_its_own(tmp_path: Path) -> None:
    """A page holds one item however large (a budget below one message, as
    an HttpConfig of a host's may give): each page is one message, `more`
    set but on the last, every message once."""
    from pimcore.embed import open_pimcore
    from pimcore.http import HttpConfig, open_http_server

    from test_http import KEY, Http

    with trio.fail_after(60):
        async with open_pimcore(data_dir=tmp_path, secret="s" * 32) as im:
            async with open_http_server(im.server, HttpConfig(api_keys=(KEY,), max_page_bytes=1000), handle=im) as h:
                c = Http(h.url)
                try:
                    await im.create_group("g", ["alice", "bob"])
                    seqs = [(await im.post("g", os.urandom(2000))).seq for _ in range(4)]
                    got, from_seq = [], 0
                    while True:
                        status, body = await get_raw(c, f"/v1/conversations/g/history?user=bob&backward=false"
                                                        f"&from_seq={from_seq}")
                        page = json.loads(body)
                        assert status == 200 and len(page["messages"]) == 1, page
                        got.append(page["messages"][0]["seq"])
                        from_seq = got[-1]
                        if not page["more"]:
                            break
                    assert got == seqs
                finally:
                    c.close()
