"""Durable host events (BrokerConfig.record_events): the store's event log,
what the core records, the trio and asyncio handles, and a SIGKILLed broker
that delivers every unacknowledged event again after restart."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from pimcore import frames as F
from pimcore.client import open_client
from pimcore.core import BrokerConfig
from pimcore.embed import EventsDisabled, RequestRefused, open_pimcore
from pimcore.errors import CloseCode, ErrorCode
from pimcore.store import LmdbStore, MemoryStore, direct_conversation
from pimcore.store.base import (
    AckEvents,
    AppendEvent,
    EventAppended,
    EventsAcked,
    EventsPage,
    NewMessage,
    ReadEvents,
    Reclaim,
    Reclaimed,
    Rejected,
    WriteBatch,
)

from _harness import Harness, store_driver  # noqa: F401

AB = direct_conversation("alice", "bob")
HERE = Path(__file__).resolve().parent
DAY = 86_400_000_000


@pytest.fixture(params=["memory", "lmdb"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


def _msg(i: int, event: bool = True, conv: str = AB, sender: str = "alice") -> NewMessage:
    return NewMessage(i.to_bytes(16, "big"), conv, sender, "phone", i, i, 1000 + i, b"m%d" % i, b"d%d" % i, 0, event)


def _page(store, consumer="host", after=None, limit=100) -> EventsPage:
    (page,) = store.read([ReadEvents(consumer, after, limit)])
    return page


def _data(ev) -> dict:
    return json.loads(ev.data)


# ---------------------------------------------------------------- store contract


def test_events_append_gap_free_and_read_from_the_durable_cursor(store):
    assert _page(store) == EventsPage(0, (), 0)
    res = store.commit(WriteBatch(1, (_msg(1), AppendEvent(b'{"type":"x"}', 5), _msg(2, event=False), _msg(3))))
    assert res[1] == EventAppended(2)
    page = _page(store)
    assert [e.id for e in page.events] == [1, 2, 3] and page.last_id == 3 and page.cursor == 0
    first = _data(page.events[0])
    assert first["type"] == "message" and first["seq"] == 1 and first["recipients"] == ["alice", "bob"]
    assert bytes.fromhex(first["msg_id"]) == (1).to_bytes(16, "big") and base64.b64decode(first["payload"]) == b"m1"
    assert page.events[0].time == 1001 and page.events[1] .time == 5
    assert _data(page.events[2])["seq"] == 3  # the message without an event still took seq 2
    assert [e.id for e in _page(store, after=1, limit=1).events] == [2]
    # Acks move the cursor forward only, clamped to the last id; per consumer.
    assert store.commit(WriteBatch(2, (AckEvents("host", 2), AckEvents("host", 1), AckEvents("other", 99)))) == (
        EventsAcked("host", 2), EventsAcked("host", 2), EventsAcked("other", 3),
    )
    assert [e.id for e in _page(store).events] == [3] and _page(store).cursor == 2
    assert _page(store, "other").events == () and _page(store, "new").cursor == 0
    # Malformed requests.
    assert store.commit(WriteBatch(3, (AckEvents("bad consumer", 1), AppendEvent("text", 1)))) == (  # type: ignore[arg-type]
        Rejected(ErrorCode.BAD_REQUEST), Rejected(ErrorCode.BAD_REQUEST),
    )
    assert _page(store, "bad consumer") == Rejected(ErrorCode.BAD_REQUEST)


def test_a_probe_lists_every_consumers_cursor(store):
    """ReadEvents with limit 0: no events, every consumer's durable cursor
    (what the outbox-depth metric reads); other pages leave it empty."""
    assert _page(store, limit=0) == EventsPage(0, (), 0, ())
    store.commit(WriteBatch(1, tuple(AppendEvent(b"{}", t) for t in (1, 2, 3))))
    store.commit(WriteBatch(2, (AckEvents("zeta", 1), AckEvents("alpha", 3), AckEvents("mid", 0))))
    assert _page(store, "mid", limit=0) == EventsPage(0, (), 3, (("alpha", 3), ("mid", 0), ("zeta", 1)))
    assert _page(store, "mid").consumers == () and len(_page(store, "mid").events) == 3


def test_a_message_and_its_event_commit_together_or_not_at_all(store):
    class Boom:  # not an op: the batch fails after the message was applied
        pass

    with pytest.raises(Exception):
        store.commit(WriteBatch(1, (_msg(1), Boom())))  # type: ignore[arg-type]
    assert store.last_seq(AB) == 0 and _page(store) == EventsPage(0, (), 0)
    store.commit(WriteBatch(2, (_msg(1),)))
    assert store.last_seq(AB) == 1 and [e.id for e in _page(store).events] == [1]
    # A duplicate (same dedupe key) and a rejected message record nothing.
    store.commit(WriteBatch(3, (_msg(1), _msg(4, conv="nogroup"))))
    assert _page(store).last_id == 1


def test_membership_entries_get_message_events(store):
    from pimcore.store.base import AddMembers, CreateGroup, RemoveMembers

    store.commit(WriteBatch(1, (CreateGroup("team", ("alice", "bob"), 1),)))
    store.commit(WriteBatch(2, (AddMembers("team", ("carol",), 10, event=True), RemoveMembers("team", ("bob",), 20, event=True))))
    kinds = [(d["kind"], d["sender"], d["recipients"]) for d in map(_data, _page(store).events)]
    assert kinds == [(1, "carol", ["alice", "bob", "carol"]), (2, "bob", ["alice", "bob", "carol"])]


def test_reclaim_drops_events_every_consumer_acked_or_too_old(store):
    store.commit(WriteBatch(1, tuple(AppendEvent(b"{}", t) for t in (100, 200, 300, 400))))
    # No consumer yet: only max_age reclaims.
    assert store.commit(WriteBatch(2, (Reclaim(1_000, DAY, DAY),))) == (Reclaimed(0, 0, 0),)
    store.commit(WriteBatch(3, (AckEvents("a", 3), AckEvents("b", 1))))
    assert store.commit(WriteBatch(4, (Reclaim(1_000, DAY, DAY),))) == (Reclaimed(0, 0, 1),)
    assert [e.id for e in _page(store, "b").events] == [2, 3, 4]
    # Older than max_age (time < now - max_age): dropped whatever the cursors.
    assert store.commit(WriteBatch(5, (Reclaim(1_000, DAY, 650),))) == (Reclaimed(0, 0, 2),)
    assert [e.id for e in _page(store, "b").events] == [4]
    assert [e.id for e in _page(store, "a", after=0).events] == [4]  # reclaimed ids are skipped
    # Ids are never reused.
    store.commit(WriteBatch(6, (AckEvents("a", 4), AckEvents("b", 4))))
    store.commit(WriteBatch(7, (Reclaim(1_000, DAY, DAY),)))
    assert store.commit(WriteBatch(8, (AppendEvent(b"{}", 5),))) == (EventAppended(5),)


def test_events_survive_reopening_the_lmdb_store(tmp_path):
    path = str(tmp_path / "db")
    with LmdbStore(path) as s:
        s.commit(WriteBatch(1, (_msg(1), _msg(2), AckEvents("host", 1))))
    with LmdbStore(path) as s:
        page = _page(s)
        assert page.cursor == 1 and [e.id for e in page.events] == [2] and page.last_id == 2
        assert s.commit(WriteBatch(2, (AppendEvent(b"{}", 1),))) == (EventAppended(3),)


# ---------------------------------------------------------------- the core


def _types(store, after=0):
    return [(d["type"], d.get("user", d.get("sender"))) for d in map(_data, _page(store, after=after, limit=1000).events)]


@pytest.mark.usefixtures("store_driver")
def test_the_core_records_nothing_unless_enabled(store):
    h = Harness(store)
    a = h.login("alice", "phone")
    h.send(a, AB, b"hi")
    h.lose(a)
    assert _page(store).last_id == 0


@pytest.mark.usefixtures("store_driver")
def test_the_core_records_messages_reads_presence_and_kicks(store):
    h = Harness(store, BrokerConfig(record_events=True))
    h.create_group("team", ["alice", "bob"])
    a = h.login("alice", "phone")
    b = h.login("bob", "laptop")
    h.send(a, "team", b"hello")
    assert h.post("team", b"from the host").code == ErrorCode.OK
    h.add_members("team", ["carol"])
    h.drain_device(b)
    h.feed(b, F.Read("team", 2))
    h.kick("alice", reason="bye")
    h.lose(b)
    h.run(h.broker.flush(h.now))
    events = [_data(e) for e in _page(store, limit=1000).events]
    kinds = [(d["type"], d.get("user", d.get("sender")), d.get("kind")) for d in events]
    assert kinds == [
        ("online", "alice", None), ("online", "bob", None),
        ("message", "alice", 0), ("message", "", 0), ("message", "carol", 1),
        ("read", "bob", None), ("kicked", "alice", None), ("offline", "alice", None), ("offline", "bob", None),
    ]
    assert events[2]["recipients"] == ["alice", "bob"] and events[4]["recipients"] == ["alice", "bob", "carol"]
    assert events[5]["seq"] == 2 and events[6]["reason"] == "bye" and events[7]["code"] == "KICKED"
    assert events[8]["code"] is None  # the connection was lost
    stored = h.store.history("team", 0, 10)
    assert [(bytes.fromhex(d["msg_id"]), d["seq"]) for d in events[2:5]] == [(m.msg_id, m.seq) for m in stored]
    # Acked through the core (an op of the batch; durable when AdminDone comes).
    res = h.host_call(h.broker.ack_events, "host", 4)
    assert res == EventsAcked("host", 4) and _page(store).cursor == 4


@pytest.mark.usefixtures("store_driver")
def test_a_failed_batch_leaves_neither_the_message_nor_its_event(store):
    h = Harness(store, BrokerConfig(record_events=True))
    a = h.login("alice", "phone")
    h.run(h.broker.flush(h.now))
    before = _page(store).last_id  # alice online
    h.fail_commits = True
    h.send(a, AB, b"important", local_id=1)
    assert h.acks(a)[0].code == ErrorCode.STORE_UNAVAILABLE
    assert _page(store).last_id == before and store.last_seq(AB) == 0
    h.fail_commits = False
    h.send(a, AB, b"important", local_id=1)
    assert h.acks(a)[0].code == ErrorCode.OK
    assert [d["type"] for d in map(_data, _page(store, after=before).events)] == ["message"]


# ---------------------------------------------------------------- the handles


async def test_trio_handle_events_ack_and_restart_from_the_cursor(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with trio.fail_after(30):
        async with open_pimcore(data_dir=data, events=True, listen=["tcp://127.0.0.1:0"]) as im:
            await im.create_group("team", ["alice", "bob"])
            async with open_client(im.urls[0], im.issue_token("alice"), "phone") as alice:
                sent = await alice.send("team", b"hello bob")
                stream = im.events()
                online = await stream.__anext__()
                assert (online.type, online.user, online.device) == ("online", "alice", "phone")
                ev = await stream.__anext__()
                assert (ev.type, ev.msg_id, ev.seq, ev.sender, ev.payload) == ("message", sent.msg_id, 1, "alice", b"hello bob")
                # Alice is online, Bob is not: the push-notification hook.
                assert ev.recipients == ("alice", "bob") and ev.offline_recipients == ("bob",)
            posted = await im.post("team", b"system note")
            ev = await stream.__anext__()
            while ev.type != "message":  # alice's offline event (lazy: before or after the post)
                ev = await stream.__anext__()
            assert ev.msg_id == posted.msg_id and ev.offline_recipients == ("alice", "bob")
            assert await im.ack_events(ev.id - 1) == ev.id - 1  # the post's event stays unacked
            # A reader that is caught up waits for the next commit.
            async with trio.open_nursery() as n:
                got = []

                async def read_one() -> None:
                    got.append(await stream.__anext__())

                n.start_soon(read_one)
                await trio.sleep(0.05)
                assert got == []
                await im.post("team", b"later")
            assert got[0].payload == b"later"
            last = ev.id
            with pytest.raises(RequestRefused) as refused:
                await im.ack_events(1, consumer="no spaces allowed")
            assert refused.value.code is ErrorCode.BAD_REQUEST
        async with open_pimcore(data_dir=data, events=True) as im:
            # From the durable cursor: the unacked post again, then "later".
            stream = im.events()
            again = [await stream.__anext__() for _ in range(2)]
            assert [e.id for e in again] == [last, last + 1] and again[0].msg_id == posted.msg_id
            # Another consumer has its own cursor (from the start).
            first = await im.events("audit").__anext__()
            assert first.id == 1
            # Explicit ``after`` ignores the cursor.
            assert (await im.events(after=last).__anext__()).payload == b"later"


async def test_kick_is_an_event(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "d", events=True, listen=["tcp://127.0.0.1:0"]) as im:
            async with open_client(im.urls[0], im.issue_token("bob"), "tablet") as bob:
                await bob.send(AB, b"x")
                im.kick("bob", reason="maintenance")
                seen = []
                async for ev in im.events():
                    seen.append((ev.type, ev.user or ev.sender, ev.reason, ev.code))
                    if ev.type == "offline":
                        break
            assert seen == [
                ("online", "bob", "", None), ("message", "bob", "", None),
                ("kicked", "bob", "maintenance", None), ("offline", "bob", "maintenance", "KICKED"),
            ]


def test_asyncio_handle_events_and_ack(tmp_path: Path) -> None:
    import pimcore.asyncio as pa

    async def main() -> None:
        async with pa.open_pimcore(data_dir=tmp_path / "data", events=True) as im:
            await im.create_group("team", ["alice", "bob"])
            busy = asyncio.create_task(asyncio.sleep(0.01))  # the host keeps its own tasks
            posted = [await im.post("team", b"p%d" % i) for i in range(3)]
            stream = im.events()
            got = [await asyncio.wait_for(stream.__anext__(), 10) for _ in range(3)]
            assert [e.msg_id for e in got] == [p.msg_id for p in posted]
            assert got[0].offline_recipients == ("alice", "bob")
            assert await im.ack_events(got[1].id) == got[1].id
            # A cancelled wait loses nothing: the next read gets the next event.
            waiting = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.05)
            assert not waiting.done()
            waiting.cancel()
            later = await im.post("team", b"later")
            assert (await asyncio.wait_for(stream.__anext__(), 10)).msg_id == later.msg_id
            fresh = im.events()  # from the durable cursor
            assert (await asyncio.wait_for(fresh.__anext__(), 10)).msg_id == posted[2].msg_id
            await busy

    asyncio.run(main())


async def test_trio_event_stream_cancelled_while_handing_an_event_out_loses_nothing(tmp_path: Path) -> None:
    # The stream refreshes offline_recipients (an await) before it returns an
    # event: a cancellation landing there must leave the event for the next call.
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data", events=True) as im:
            await im.create_group("team", ["alice", "bob"])
            posted = [await im.post("team", b"p%d" % i) for i in range(3)]
            stream = im.events()
            first = await stream.__anext__()
            while first.msg_id != posted[0].msg_id:
                first = await stream.__anext__()
            real = im.online_anywhere

            async def cancelled_here(users):  # the caller is cancelled right at this await
                scope.cancel()
                await trio.lowlevel.checkpoint()
                return await real(users)

            im.online_anywhere = cancelled_here  # type: ignore[method-assign]
            with trio.CancelScope() as scope:
                await stream.__anext__()
            assert scope.cancelled_caught
            del im.online_anywhere
            assert (await stream.__anext__()).msg_id == posted[1].msg_id  # not lost: handed out now
            assert (await stream.__anext__()).msg_id == posted[2].msg_id


def test_asyncio_event_stream_cancelled_while_handing_an_event_out_loses_nothing(tmp_path: Path) -> None:
    import pimcore.asyncio as pa

    async def main() -> None:
        async with pa.open_pimcore(data_dir=tmp_path / "data", events=True) as im:
            await im.create_group("team", ["alice", "bob"])
            posted = [await im.post("team", b"p%d" % i) for i in range(3)]
            stream = im.events()
            first = await asyncio.wait_for(stream.__anext__(), 5)
            while first.msg_id != posted[0].msg_id:
                first = await asyncio.wait_for(stream.__anext__(), 5)
            real, entered = im.handle.online_anywhere, asyncio.Event()

            async def stuck(users):  # the second await of __anext__ never returns
                entered.set()
                await trio.sleep_forever()

            im.handle.online_anywhere = stuck  # type: ignore[method-assign]
            waiting = asyncio.ensure_future(stream.__anext__())
            await asyncio.wait_for(entered.wait(), 5)
            waiting.cancel()  # asyncio.wait_for's timeout does this
            with pytest.raises(asyncio.CancelledError):
                await waiting
            im.handle.online_anywhere = real  # type: ignore[method-assign]
            assert (await asyncio.wait_for(stream.__anext__(), 5)).msg_id == posted[1].msg_id  # not lost
            assert (await asyncio.wait_for(stream.__anext__(), 5)).msg_id == posted[2].msg_id

    asyncio.run(main())


def test_config_key_and_default(tmp_path: Path) -> None:
    from pimcore.config import load_settings

    assert load_settings(None, data_dir=tmp_path).server_config().broker.record_events is False
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nevents = true\n")
    settings = load_settings(str(cfg), data_dir=tmp_path)
    assert settings.server_config().broker.record_events is True
    assert settings.effective()["server"]["events"] is True


# ---------------------------------------------------------------- SIGKILL


def _child(data: Path, mode: str, n: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, str(HERE / "_events_crash_child.py"), str(data), mode, str(n)], stdout=subprocess.PIPE, env=env
    )


def test_events_not_acked_survive_sigkill_and_come_again(tmp_path: Path) -> None:
    seed = int(os.environ.get("PIMCORE_CRASH_SEED") or random.SystemRandom().getrandbits(32))
    rnd = random.Random(seed)
    data = tmp_path / "data"
    delivered: dict[int, dict] = {}  # event id -> its data, as the host saw it
    prev_acked, prev_seen = 0, 0
    kills = redelivered = 0
    for cycle in range(4):
        final = cycle == 3
        child = _child(data, "drain" if final else "send", 30)
        assert child.stdout is not None
        kill_after = rnd.randint(3, 35)
        lines = []
        for raw in child.stdout:
            lines.append(raw)
            if not final and len(lines) >= kill_after:
                child.send_signal(signal.SIGKILL)
                kills += 1
                break
        lines.extend(child.stdout.read().splitlines(keepends=True))
        child.wait(timeout=60)
        lines = [raw.decode() for raw in lines if raw.endswith(b"\n")]  # a torn last line was never reported
        assert lines and lines[0].startswith("START "), f"seed {seed}: {lines[:3]}"
        start = int(lines[0].split()[1])
        # The durable cursor: at least what an ack that returned confirmed,
        # at most what the host had seen (it acks only what it handled).
        assert prev_acked <= start <= prev_seen, f"seed {seed}: cursor {start} not in [{prev_acked}, {prev_seen}]"
        ids = []
        for line in lines[1:]:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "EV":
                eid, body = rest.split(" ", 1)
                ids.append(int(eid))
                d = json.loads(body)
                assert delivered.setdefault(int(eid), d) == d, f"seed {seed}: event {eid} changed"
            elif kind == "ACKED":
                prev_acked = int(rest)
        redelivered += sum(1 for i in ids if i <= prev_seen)
        # Everything after the cursor, in order, none that was acked.
        assert ids == list(range(start + 1, start + 1 + len(ids))), f"seed {seed}: not from the cursor: {ids[:5]}"
        prev_seen = max(prev_seen, start + len(ids), prev_acked)
        if final:
            assert lines[-1] == "DONE\n", f"seed {seed}: the final run did not finish"
            last_id = start + len(ids)
    assert kills >= 1, f"seed {seed}: no child was killed"
    with LmdbStore(str(data / "store"), create=False) as store:
        (page,) = store.read([ReadEvents("check", 0, 1_000_000)])
        assert page.last_id == last_id, f"seed {seed}: the final run stopped before the last event"
        stored = {m.msg_id.hex(): m for m in store.history(AB, 0, 100_000)}
    messages = {i: d for i, d in delivered.items() if d["type"] == "message"}
    assert set(delivered) == set(range(1, last_id + 1)), f"seed {seed}: an event never reached the host"
    # One event per stored message, exactly matching it.
    assert sorted(d["msg_id"] for d in messages.values()) == sorted(stored), f"seed {seed}"
    for d in messages.values():
        m = stored[d["msg_id"]]
        assert (d["conv"], d["seq"], d["sender"], d["device"], d["server_time"], base64.b64decode(d["payload"])) == (
            m.conv, m.seq, m.sender, m.device, m.server_time, m.payload,
        )
        assert d["recipients"] == ["alice", "bob"]


async def test_a_broker_without_listeners_still_commits(tmp_path: Path) -> None:
    # Was: with listen=[] the server's nursery cancelled its committer and
    # timer right after starting, so the first post after the group hung.
    with trio.fail_after(10):
        async with open_pimcore(data_dir=tmp_path / "d") as im:
            await im.create_group("team", ["alice"])
            assert (await im.post("team", b"one")).seq == 1
            assert (await im.post("team", b"two")).seq == 2


def test_message_event_is_the_generic_json_written_out() -> None:
    from pimcore.store.base import StoredMessage, event_data, message_event

    m = StoredMessage(bytes(range(16)), 'g"\\x', 7, "alice", "web", 2**64 - 1, -5, 1_700_000_000_000_000, b"\x00\xff", 2, 6)
    generic = event_data(
        "message", conv=m.conv, seq=7, msg_id=m.msg_id.hex(), sender="alice", device="web", kind=2,
        server_time=m.server_time, local_id=m.local_id, payload=base64.b64encode(m.payload).decode(), recipients=["a", "b"],
    )
    assert message_event(m, ["b", "a"]) == generic
    assert json.loads(generic)["conv"] == 'g"\\x'


async def test_offline_recipients_are_as_of_when_the_event_is_handed_out(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "d", events=True, listen=["tcp://127.0.0.1:0"]) as im:
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"one")
            await im.post("team", b"two")
            stream = im.events()
            first = await stream.__anext__()  # its page holds "two" as well
            assert first.payload == b"one" and first.offline_recipients == ("alice", "bob")
            async with open_client(im.urls[0], im.issue_token("bob"), "phone"):
                second = await stream.__anext__()
                assert second.payload == b"two" and second.offline_recipients == ("alice",)


async def test_a_consumer_that_reads_but_never_acks_keeps_its_events_from_reclaim(tmp_path: Path) -> None:
    # Was: a consumer had a durable cursor only once it acked, so the
    # reclaim dropped what every *other* consumer had acked while this one
    # was still reading: after a restart it started past events it never
    # handled (the C program's "keeper" consumer, under a slow CI run).
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "d", events=True, reclaim_interval=0.02, dedupe_window=0) as im:
            await im.create_group("team", ["alice", "bob"])
            await im.set_retention("team", max_count=1)  # its floor shows a reclaim pass ran
            for i in range(3):
                await im.post("team", b"m%d" % i)
            reading = im.events("late")
            first = await reading.__anext__()  # read, never acked
            _, last = await im.event_cursor("audit")
            assert await im.ack_events(last, "audit") == last  # another consumer handled everything
            await im.post("team", b"m3")
            while (await im.retention("team")).floor < 3:
                await trio.sleep(0.01)
            # A fresh reader of "late" starts after its durable cursor: nothing
            # it has not acked was reclaimed.
            again = await im.events("late").__anext__()
            assert again.id == first.id == 1
            assert (await im.event_cursor("late"))[0] == 0
            # Once every consumer has acked, the reclaim does drop them.
            _, last = await im.event_cursor("late")
            await im.ack_events(last, "late")
            await im.ack_events(last, "audit")
            await im.post("team", b"m4")
            while (await im.retention("team")).floor < 4:
                await trio.sleep(0.01)
            assert (await im.events(after=0).__anext__()).id > last


async def test_reading_after_an_id_past_the_last_event_is_refused_not_a_silent_skip(tmp_path: Path) -> None:
    # Was: next_events(after=50) with the last id 1 waited, then skipped
    # events 2..50 recorded later (the HTTP API answered 409 for this).
    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "d", events=True) as im:
            await im.create_group("team", ["alice"])
            await im.post("team", b"m0")
            _, last = await im.event_cursor("c")
            for read in (lambda: im.next_events("c", after=last + 49), lambda: im.events("c", after=last + 1).__anext__()):
                with pytest.raises(RequestRefused) as refused:
                    await read()
                assert refused.value.code is ErrorCode.BAD_REQUEST
                assert f"is past the last event id, {last}: nothing read" in str(refused.value)
            # At the last id it waits for the next event, as before.
            await im.post("team", b"m1")
            _, page = await im.next_events("c", after=last)
            assert page[0].id == last + 1


# ---------------------------------------------------------------- deleting a consumer


async def test_delete_consumer_frees_the_reclaim_a_stray_reader_held(tmp_path: Path) -> None:
    """A consumer name read once by mistake (a typo) held the reclaim of
    every later event back for 90 days and nothing could delete it.
    delete_consumer removes its cursor (True; False once gone), events the
    real consumer acked are reclaimed, and the name read again starts from
    a fresh cursor at 0, as a first read does."""
    from pimcore.embed import ConsumerInUse

    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "d", events=True, reclaim_interval=0.02, dedupe_window=0, consumer_idle=0) as im:
            await im.create_group("team", ["alice", "bob"])
            await im.set_retention("team", max_count=1)  # its floor shows a reclaim pass ran
            for i in range(3):
                await im.post("team", b"m%d" % i)
            typo = im.events("hots")
            assert (await typo.__anext__()).id == 1  # read, never acked: a cursor at 0
            # An open stream is a live reader: deleting under it would
            # restart it from 0 silently.
            with pytest.raises(ConsumerInUse) as refused:
                await im.delete_consumer("hots")
            assert refused.value.consumer == "hots" and "hots" in str(refused.value)
            del typo  # the stream let go: no reader left
            assert ("hots", 0) in await im.event_consumers()
            _, last = await im.event_cursor("host")
            assert await im.ack_events(last, "host") == last
            await im.post("team", b"m3")
            while (await im.retention("team")).floor < 3:
                await trio.sleep(0.01)
            assert (await im.events(after=0).__anext__()).id == 1  # held back by "hots"
            assert await im.delete_consumer("hots") is True
            assert await im.delete_consumer("hots") is False  # no such consumer (any more)
            assert await im.delete_consumer("never-read") is False
            assert [c for c, _ in await im.event_consumers()] == ["host"]
            await im.post("team", b"m4")
            while (await im.retention("team")).floor < 4:
                await trio.sleep(0.01)
            first = (await im.events(after=0).__anext__()).id
            assert first > last  # what "host" acked is gone now
            # The name again: a new consumer, from a fresh cursor at 0 (the
            # oldest event kept), its cursor made by the read as the first was.
            assert (await im.events("hots").__anext__()).id == first
            assert dict(await im.event_consumers())["hots"] == 0
            # A stream let go inside a reference cycle (a cancelled task's
            # traceback) is no reader once the cycle collector runs: the
            # delete runs it rather than refuse.
            import gc

            gc.disable()
            try:
                cycle: list = [im.events("cyc")]
                cycle.append(cycle)
                del cycle
                assert im.consumer_in_use("cyc")
                assert await im.delete_consumer("cyc") is False
            finally:
                gc.enable()
            # An invalid name says the rule, as ack_events does.
            with pytest.raises(RequestRefused) as bad:
                await im.delete_consumer("no spaces")
            assert bad.value.code is ErrorCode.BAD_REQUEST and "delete_consumer" in str(bad.value)


async def test_delete_consumer_refuses_a_consumer_a_poller_read_within_consumer_idle(tmp_path: Path) -> None:
    # A trial: a consumer that polls (GET a page, ack, GET again) holds no
    # request open between its reads; deleted then, the next reclaim dropped
    # what the others had acked and it had not read, and its next read
    # started from the oldest event kept -- events 6-10 gone for it.
    # Refused now within [server] consumer_idle of its last read or ack.
    from pimcore.embed import ConsumerInUse

    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "d", events=True, reclaim_interval=0.02, dedupe_window=0,
                                consumer_idle=0.5) as im:
            await im.create_group("team", ["alice"])
            for i in range(10):
                await im.post("team", b"m%d" % i)
            _, page = await im.next_events("p", limit=5)
            await im.ack_events(page[-1].id, "p")
            _, rest = await im.next_events("q", limit=100)
            await im.ack_events(rest[-1].id, "q")
            with pytest.raises(ConsumerInUse) as refused:
                await im.delete_consumer("p")
            assert refused.value.ago is not None and refused.value.ago < 0.5
            assert "within [server] consumer_idle (0.5 s)" in str(refused.value), str(refused.value)
            await trio.sleep(0.6)  # (no read since: idle)
            assert await im.delete_consumer("p") is True
            # A reader of a name never read here is no poller: deleted at once.
            await im.ack_events(0, "stray")
            await trio.sleep(0.6)
            assert await im.delete_consumer("stray") is True


async def test_delete_consumer_after_a_restart_waits_consumer_idle(tmp_path: Path) -> None:
    # A trial: the recent reads are in memory only, so right after a restart
    # a poller's consumer (read seconds before the stop) was deleted at once
    # and the next reclaim dropped what it had not read.  A restarted broker
    # counts every consumer as read at its start; a name with no cursor is
    # "not found" (False, HTTP 404) first, whatever its recent reads.
    from pimcore.embed import ConsumerInUse

    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "d", events=True, consumer_idle=0) as im:
            await im.create_group("team", ["alice"])
            await im.post("team", b"x")
            _, page = await im.next_events("slow", limit=1)
            await im.ack_events(page[-1].id, "slow")
        async with open_pimcore(data_dir=tmp_path / "d", events=True, consumer_idle=0.5) as im:
            with pytest.raises(ConsumerInUse) as refused:
                await im.delete_consumer("slow")
            assert "the broker started" in str(refused.value), str(refused.value)
            await im.next_events("never-acked", after=0)  # (read, but no cursor: nothing to lose)
            assert await im.delete_consumer("never-acked") is False
            await trio.sleep(0.6)
            assert await im.delete_consumer("slow") is True


async def test_delete_consumer_refuses_a_consumer_a_reader_is_waiting_on(tmp_path: Path) -> None:
    from pimcore.embed import ConsumerInUse

    with trio.fail_after(30):
        async with open_pimcore(data_dir=tmp_path / "d", events=True, consumer_idle=0) as im:
            await im.create_group("team", ["alice"])
            await im.post("team", b"m0")
            _, last = await im.event_cursor("poller")
            await im.ack_events(last, "poller")
            async with trio.open_nursery() as n:
                n.start_soon(lambda: im.next_events("poller"))  # caught up: waits (a long-poll)
                await trio.sleep(0.05)
                with pytest.raises(ConsumerInUse):
                    await im.delete_consumer("poller")
                n.cancel_scope.cancel()
            assert await im.delete_consumer("poller") is True  # the poll ended: deleted
        async with open_pimcore(data_dir=tmp_path / "d") as im:
            with pytest.raises(EventsDisabled):
                await im.delete_consumer("poller")
            with pytest.raises(EventsDisabled):
                await im.event_consumers()


def test_asyncio_handle_deletes_a_consumer_and_refuses_one_with_an_open_stream(tmp_path: Path) -> None:
    import pimcore.asyncio as pa
    from pimcore.embed import ConsumerInUse

    async def main() -> None:
        async with pa.open_pimcore(data_dir=tmp_path / "data", events=True, consumer_idle=0) as im:
            await im.create_group("team", ["alice"])
            await im.post("team", b"p0")
            stream = im.events("typo")
            assert (await asyncio.wait_for(stream.__anext__(), 10)).type == "message"
            with pytest.raises(ConsumerInUse):
                await im.delete_consumer("typo")
            assert dict(await im.event_consumers()) == {"typo": 0}
            del stream
            assert await im.delete_consumer("typo") is True
            assert await im.event_consumers() == []
            with pytest.raises(RequestRefused):
                await im.delete_consumer("no spaces")

    asyncio.run(main())
