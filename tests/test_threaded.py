"""The thread-backed host (pimcore.threaded): a broker in a thread of its own,
driven by blocking calls from any thread, through its public API only."""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path

import pytest
import trio

from pimcore.client import open_client
from pimcore.config import ConfigError
from pimcore.embed import SYSTEM, EventsDisabled, RequestRefused
from pimcore.errors import ErrorCode
from pimcore.ids import id_problem
from pimcore.threaded import BrokerAlreadyRunning, BrokerStopped, WouldDeadlock, open_pimcore_thread


def _start(data: Path, **kw):
    kw.setdefault("durability", "os")
    return open_pimcore_thread(data_dir=data, **kw)


def test_blocking_calls_drive_a_broker_that_clients_reach(tmp_path: Path) -> None:
    with _start(tmp_path / "d", listen=["tcp://127.0.0.1:0"]) as im:
        port = im.port()
        assert im.urls == [f"tcp://127.0.0.1:{port}"] and port > 0
        im.create_group("team", ["alice", "bob"])
        with pytest.raises(RequestRefused) as refused:
            im.create_group("team", ["alice"])
        assert refused.value.code is ErrorCode.ALREADY_EXISTS
        posted = im.post("team", b"hello", idempotency_key="k1")
        assert im.post("team", b"hello", idempotency_key="k1") == posted and posted.seq == 1
        im.post("team", b"from alice", sender="alice", device="web")
        with pytest.raises(RequestRefused) as refused:
            im.post("nope", b"x")
        assert refused.value.code is ErrorCode.UNKNOWN_CONVERSATION
        token = im.issue_token("bob")

        async def bob_reads() -> list[tuple[str, bytes]]:
            got = []
            with trio.fail_after(10):
                async with open_client(im.urls[0], token, "phone") as bob:
                    async for m in bob.messages():
                        got.append((m.sender, m.payload))
                        if len(got) == 2:
                            return got
            return got  # pragma: no cover

        assert trio.run(bob_reads) == [(SYSTEM, b"hello"), ("alice", b"from alice")]
        assert im.unread("bob", "team") == 2
        results = im.post_many([{"conv": "team", "payload": b"a"}, {"conv": "nope", "payload": b"b"}])
        assert results[0].seq == 3 and isinstance(results[1], RequestRefused)
        im.add_members("team", ["carol"])
        im.remove_members("team", ["carol"])
        im.kick("bob")
        assert im.revoke("bob") > 0
        assert [m.payload for m in im.history("team", "alice", limit=2)] != []


def test_a_section_setting_given_at_the_top_says_where_it_belongs(tmp_path: Path) -> None:
    """The C ABI's ``{"events": true}`` (the keyword ``events=True`` suggests
    the flat form) said only "unknown keys ['events']"."""
    cases = [
        ({"events": True}, """settings: unknown keys ['events']; did you mean {"server": {"events": true}}?"""),
        ({"max_payload": 5, "nonsense": 1},
         """settings: unknown keys ['max_payload', 'nonsense']; did you mean {"limits": {"max_payload": 5}}?"""),
        ({"server": {"max_payload": 5}},
         """settings: unknown keys in [server]: ['max_payload']; did you mean {"limits": {"max_payload": 5}}?"""),
        ({"nonsense": 1}, "settings: unknown keys ['nonsense']"),
    ]
    for doc, said in cases:
        with pytest.raises(ConfigError) as err:
            open_pimcore_thread(document={"data_dir": str(tmp_path / "a"), **doc})
        assert str(err.value) == said
    assert not (tmp_path / "a").exists()


def test_start_up_errors_are_raised_in_the_caller_unwrapped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _start(tmp_path / "a", durability="sometimes")
    with pytest.raises(ConfigError, match="unknown keys"):
        open_pimcore_thread(document={"data_dir": str(tmp_path / "a"), "nonsense": 1})
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(OSError):
            _start(tmp_path / "b", listen=[f"tcp://127.0.0.1:{busy.getsockname()[1]}"])
    finally:
        busy.close()
    assert not (tmp_path / "b").exists()  # (a failed start takes back the data directory it made)
    with _start(tmp_path / "c"):
        with pytest.raises(BrokerAlreadyRunning):
            _start(tmp_path / "c")
    # The failed starts released their directories: these work now.
    _start(tmp_path / "b").close()
    _start(tmp_path / "c").close()


def test_calls_after_close_raise_and_close_is_idempotent(tmp_path: Path) -> None:
    im = _start(tmp_path / "d")
    im.create_group("team", ["alice"])
    im.close()
    im.close()
    assert im.closed
    for call in (lambda: im.post("team", b"x"), lambda: im.unread("alice", "team"), lambda: im.kick("alice"),
                 lambda: im.issue_token("alice"), lambda: im.create_group("g", ["a"]),
                 lambda: im.set_event_handler(lambda ev: True), lambda: im.port()):
        with pytest.raises(BrokerStopped):
            call()


def test_close_flushes_and_a_restart_on_the_same_directory_keeps_everything(tmp_path: Path) -> None:
    with _start(tmp_path / "d", durability="os") as im:
        im.create_group("team", ["alice", "bob"])
        seqs = [im.post("team", b"m%d" % i).seq for i in range(50)]
    with _start(tmp_path / "d", durability="os") as im:
        assert im.unread("bob", "team") == 50
        page = im.history("team", "bob", limit=100)
        assert sorted(m.seq for m in page) == seqs


def test_threads_post_concurrently_with_exact_counts(tmp_path: Path) -> None:
    with _start(tmp_path / "d") as im:
        im.create_group("team", ["alice", "bob"])
        seqs: list[list[int]] = [[] for _ in range(4)]

        def poster(i: int) -> None:
            for j in range(100):
                seqs[i].append(im.post("team", b"%d-%d" % (i, j), idempotency_key=f"{i}-{j}").seq)

        threads = [threading.Thread(target=poster, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        everything = sorted(s for part in seqs for s in part)
        assert everything == list(range(1, 401))
        assert im.unread("bob", "team") == 400


def test_event_handlers_see_every_message_and_acks_are_durable(tmp_path: Path) -> None:
    with _start(tmp_path / "d", events=True) as im:
        im.create_group("team", ["alice", "bob"])  # 2 JOINED entries: events too
        seen: list[tuple[str, bytes]] = []
        done = threading.Event()

        def handler(ev) -> bool:
            if ev.type == "message" and ev.kind == 0:
                seen.append((threading.current_thread().name, ev.payload))
                if len(seen) == 30:
                    done.set()
            return ev.id <= 12  # acknowledge the first ones only

        im.set_event_handler(handler)
        for i in range(30):
            im.post("team", b"%d" % i)
        assert done.wait(10)
        assert [p for _, p in seen] == [b"%d" % i for i in range(30)]
        im.set_event_handler(None)
        assert im.event_cursor()[0] == 12
        last = im.event_cursor()[1]
        assert im.next_events(after=last, timeout=0.05) == (last, [])  # caught up: empty at the timeout
        with pytest.raises(RequestRefused, match="past the last event id"):
            im.next_events(after=last + 1, timeout=0.05)
    with _start(tmp_path / "d", events=True) as im:
        after, events = im.next_events()
        assert after == 12 and events[0].id == 13  # not acknowledged: delivered again


def test_blocking_calls_that_would_deadlock_raise_instead(tmp_path: Path) -> None:
    with _start(tmp_path / "d", events=True) as im:
        im.create_group("team", ["alice", "bob"])
        outcomes: list[str] = []
        done = threading.Event()

        def record(call) -> None:
            try:
                call()
                outcomes.append("ok")
            except WouldDeadlock:
                outcomes.append("deadlock")

        def on_loop(ev) -> bool:
            if ev.type == "message" and ev.kind == 0:
                record(lambda: im.post("team", b"again"))
                record(lambda: im.unread("bob", "team"))
                done.set()
            return True

        im.set_event_handler(on_loop, on_loop=True)
        im.post("team", b"first")
        assert done.wait(10)
        assert outcomes == ["deadlock", "deadlock"]
        outcomes.clear()
        done.clear()

        def off_loop(ev) -> bool:
            if ev.type == "message" and ev.payload == b"second":
                record(lambda: im.post("team", b"from the handler"))  # works: another thread
                record(im.close)
                record(lambda: im.set_event_handler(None))
                done.set()
            return True

        im.set_event_handler(off_loop)
        im.post("team", b"second")
        assert done.wait(10)
        assert outcomes == ["ok", "deadlock", "deadlock"]
        assert im.unread("bob", "team") == 3


def test_a_handler_needs_events_and_a_valid_consumer(tmp_path: Path) -> None:
    with _start(tmp_path / "d") as im:
        with pytest.raises(EventsDisabled, match="events"):  # a ValueError
            im.set_event_handler(lambda ev: True)
    with _start(tmp_path / "e", events=True) as im:
        with pytest.raises(RequestRefused):
            im.set_event_handler(lambda ev: True, consumer="no spaces allowed")
        # Removing a handler checks the name too, as ack_events does, and
        # says why in words as ack_events does (it said only "events of '':
        # BAD_REQUEST": a new user's trial).
        for name, why in (("", "empty consumer id"), ("no spaces allowed", "has the character ' '")):
            for handler in (None, lambda ev: True):
                with pytest.raises(RequestRefused) as refused:
                    im.set_event_handler(handler, consumer=name)
                assert refused.value.code is ErrorCode.BAD_REQUEST
                assert str(refused.value) == f"set_event_handler: {id_problem(name, 'consumer')}"
                assert why in str(refused.value) and "1-64 ASCII characters" in str(refused.value)
            with pytest.raises(RequestRefused) as refused:
                im.ack_events(1, consumer=name)
            assert str(refused.value) == f"ack_events: {id_problem(name, 'consumer')}"


def test_a_handler_works_when_webhooks_turned_events_on(tmp_path: Path) -> None:
    # "Setting [webhooks] url turns event recording on": no events=True here.
    # Nothing listens on the webhook URL; the sender just keeps retrying.
    with _start(tmp_path / "d", webhooks={"url": "http://127.0.0.1:9/hook"}) as im:
        got = threading.Event()
        im.create_group("team", ["alice"])
        im.set_event_handler(lambda ev: got.set() or True, "push")
        im.post("team", b"hi")
        assert got.wait(10)


def test_the_synchronous_example_of_embedding_md_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    import re

    doc = (Path(__file__).resolve().parent.parent / "docs" / "EMBEDDING.md").read_text()
    section = doc.split("## A synchronous host (a thread)", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "EMBEDDING.md", "exec"), {})
    assert re.fullmatch(r"port \d+ - bob has 1 unread\n", capsys.readouterr().out)
    exec(compile(code, "EMBEDDING.md", "exec"), {})  # again on the same data directory: the group exists
    assert re.fullmatch(r"port \d+ - bob has 2 unread\n", capsys.readouterr().out)
    assert (tmp_path / "embedded-sync-data" / "store").is_dir()


# Intended differences between the trio handle (pimcore.embed.Pimcore) and
# the threaded one.  Everything else must be on both, with the same
# parameters (names, kinds, defaults); keep these short and explained.
_TRIO_ONLY = {
    "serve_stream": "takes a trio stream, which only trio code has",
    "server": "the BrokerServer: trio objects of the broker's thread (reachable as im.handle.server)",
    "http": "the HTTP listener, likewise (its URL is im.http_url)",
}
_THREADED_ONLY = {
    "handle": "the trio handle itself, running in the broker's thread",
    "close": "the trio handle's lifetime is its async with block",
    "closed": "likewise",
    "port": "a convenience for the blocking host: the bound port of a listener",
    "set_event_handler": "event callbacks in a thread; a trio host iterates events()",
}
#: Parameters only the threaded method has.
_THREADED_EXTRA_PARAMETERS = {"next_events": {"timeout"}}  # a blocking wait needs a way out


def _public(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def _parameters(fn, skip: set[str] = set()) -> list[tuple]:
    import inspect

    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name not in skip]


def test_the_threaded_handle_has_the_trio_handles_methods_and_signatures(tmp_path: Path) -> None:
    import inspect
    import re

    from pimcore.embed import Pimcore, open_pimcore
    from pimcore.threaded import ThreadedPimcore

    async def trio_names() -> set[str]:  # instance attributes (server, settings, ...) included
        with trio.fail_after(10):
            async with open_pimcore(data_dir=tmp_path / "t", durability="os") as h:
                return _public(h)

    trio_side = trio.run(trio_names)
    with _start(tmp_path / "d") as im:
        threaded_side = _public(im)
    assert trio_side - threaded_side == set(_TRIO_ONLY)
    assert threaded_side - trio_side == set(_THREADED_ONLY)
    for name in sorted(trio_side & threaded_side):
        theirs, ours = inspect.getattr_static(Pimcore, name, None), inspect.getattr_static(ThreadedPimcore, name, None)
        if theirs is None:  # an instance attribute of the trio handle: a property here
            assert isinstance(ours, property), name
            continue
        assert isinstance(ours, property) == isinstance(theirs, property), name
        if isinstance(theirs, property):
            continue
        assert not inspect.iscoroutinefunction(ours), f"{name} must block, not be async"
        extra = _THREADED_EXTRA_PARAMETERS.get(name, set())
        assert _parameters(ours, extra) == _parameters(theirs), name
        assert {p for p in inspect.signature(ours).parameters} - set(inspect.signature(theirs).parameters) == extra, name
    # ... and every method the docs' table names is there.
    doc = (Path(__file__).resolve().parent.parent / "docs" / "EMBEDDING.md").read_text()
    table = doc.split("## What the handle does", 1)[1].split("\n\n", 2)[1]
    named = {m for row in table.splitlines()[2:] for m in re.findall(r"`(\w+)", row.split("|")[1])}
    assert named and named <= threaded_side and named <= trio_side, named - threaded_side


def test_the_methods_the_trio_handle_has_work_threaded(tmp_path: Path) -> None:
    with _start(tmp_path / "d", events=True, http="tcp://127.0.0.1:0") as im:
        assert im.http_url is not None and im.http_url.startswith("http://127.0.0.1:")
        assert im.events_enabled and im.webhooks is None and im.settings.durability == "os"
        im.create_group("team", ["alice", "bob"])
        im.create_group("other", ["bob"])
        im.post("team", b"1")
        im.post("other", b"2")
        im.post("other", b"3")
        assert (im.unread("bob"), im.unread("bob", "team"), im.unread("bob", conv="other")) == (3, 1, 2)
        positions = im.read_positions("bob")
        assert positions.user == "bob" and dict(positions.markers) == {"team": 0, "other": 0}
        with pytest.raises(RequestRefused) as refused:
            im.read_positions("no spaces")
        assert refused.value.code is ErrorCode.BAD_REQUEST
        assert im.online_anywhere(["alice", "bob"]) == frozenset()
        assert [m.payload for m in im.history("other", "bob", from_seq=0, limit=1, backward=True)] == [b"3"]
        page = im.conversation_list("bob", limit=1)
        assert len(page.entries) == 1 and page.more
        stream = im.events("c")
        got = [next(stream), next(stream), next(stream)]
        assert [ev.payload for ev in got] == [b"1", b"2", b"3"] and stream.after == got[-1].id
        assert im.event_cursor("c")[0] == 0  # the stream's cursor is in memory only
    with _start(tmp_path / "e") as im:
        with pytest.raises(EventsDisabled):
            im.events()


def test_a_content_filter_may_be_a_plain_or_async_function(tmp_path: Path) -> None:
    from pimcore.config import load_settings

    def plain(user: str, conv: str, payload: bytes):
        return "no swearing" if b"darn" in payload else None

    async def in_trio(user: str, conv: str, payload: bytes):  # runs in the broker's trio thread
        await trio.sleep(0)
        return "no shouting" if payload.isupper() else None

    settings = load_settings(None, data_dir=str(tmp_path / "s"), durability="os", listen=[])
    for im, word, reason in ((_start(tmp_path / "p", content_filter=plain), b"darn", "no swearing"),
                             (_start(tmp_path / "a", content_filter=in_trio), b"HEY", "no shouting"),
                             (open_pimcore_thread(settings, content_filter=plain), b"darn", "no swearing")):
        with im:
            im.create_group("team", ["alice"])
            with pytest.raises(RequestRefused, match=reason) as refused:
                im.post("team", word, sender="alice", device="web")
            assert refused.value.code is ErrorCode.REJECTED
            assert im.post("team", b"fine", sender="alice", device="web").seq == 1
            assert im.post("team", word).seq == 2  # the system is trusted
    with pytest.raises(ConfigError, match="content_filter"):
        _start(tmp_path / "n", content_filter=42)
    with pytest.raises(ConfigError, match="content_filter"):  # "module:function", as in the config file
        _start(tmp_path / "m", content_filter="no_such_module_here:check")


def test_non_blocking_methods_work_from_an_on_loop_handler(tmp_path: Path) -> None:
    with _start(tmp_path / "d", events=True, listen=["tcp://127.0.0.1:0"], http="tcp://127.0.0.1:0") as im:
        im.create_group("team", ["alice"])
        results: dict[str, object] = {}
        done = threading.Event()
        calls = {
            "issue_token": lambda: im.issue_token("alice"), "urls": lambda: im.urls, "port": im.port,
            "http_url": lambda: im.http_url, "epoch": lambda: im.epoch, "store_id": lambda: im.store_id,
            "settings": lambda: im.settings, "webhooks": lambda: im.webhooks,
            "events_enabled": lambda: im.events_enabled, "statistics": im.statistics,
            "online_devices": lambda: im.online_devices("alice"), "kick": lambda: im.kick("alice"),
            "events": lambda: im.events("other"),  # iterating it would block: not done here
        }

        def on_loop(ev) -> bool:
            for name, call in calls.items():
                try:
                    results[name] = call()
                except Exception as exc:  # noqa: BLE001 - what the test looks at
                    results[name] = exc
            done.set()
            return True

        im.set_event_handler(on_loop, on_loop=True)
        im.post("team", b"x")
        assert done.wait(10)
        assert {n: v for n, v in results.items() if isinstance(v, Exception)} == {}
        assert results["urls"] == im.urls and results["port"] == im.port() and results["epoch"] == im.epoch
        with pytest.raises(RequestRefused):  # the check ran: an invalid id
            im.kick("no spaces")


def test_a_blocking_call_from_another_brokers_loop_thread_is_would_deadlock(tmp_path: Path) -> None:
    """Broker A's on-loop handler posting to broker B: a blocking call from a
    thread that runs trio cannot wait there (trio refuses from_thread.run
    inside a run).  It raised a bare RuntimeError ("this is a blocking
    function; call it from a thread"), PIM_ERR_INTERNAL through the C ABI;
    it is WouldDeadlock like a call to A itself."""
    with _start(tmp_path / "a", events=True) as a, _start(tmp_path / "b") as b:
        a.create_group("team", ["alice"])
        b.create_group("team", ["alice"])
        outcomes: list[str] = []
        done = threading.Event()

        def on_loop(ev) -> bool:
            if ev.type == "message":
                try:
                    b.post("team", b"from A's loop")
                    outcomes.append("ok")
                except WouldDeadlock:
                    outcomes.append("deadlock")
                except Exception as exc:  # noqa: BLE001 - what the test reports
                    outcomes.append(repr(exc))
                done.set()
            return True

        a.set_event_handler(on_loop, on_loop=True)
        a.post("team", b"go")
        assert done.wait(10)
        assert outcomes == ["deadlock"]
        assert b.history("team", "alice") == []


def test_a_second_close_waits_for_the_first(tmp_path: Path) -> None:
    """pim_broker_stop: "stopping again is PIM_OK" -- after the broker is
    stopped.  A close() while another thread's close() was still flushing
    returned at once, and a restart on the same directory right after it was
    refused (BrokerAlreadyRunning)."""
    im = _start(tmp_path / "d", events=True)
    im.create_group("team", ["alice"])
    running = threading.Event()

    def slow(ev) -> bool:
        running.set()
        threading.Event().wait(0.5)  # a handler close() waits for
        return True

    im.set_event_handler(slow)
    im.post("team", b"x")
    assert running.wait(10)
    first = threading.Thread(target=im.close)
    first.start()
    while not im.closed:
        threading.Event().wait(0.001)
    im.close()  # the second: returns once the broker is stopped
    again = _start(tmp_path / "d")
    again.close()
    first.join()


def test_blocking_calls_work_from_an_asyncio_loop_that_hosts_a_pimcore_asyncio_broker(tmp_path: Path) -> None:
    """A thread that hosts a trio guest run (an asyncio loop with a
    pimcore.asyncio broker) is no trio task between the guest's ticks: a
    blocking call there waits for the threaded broker's own thread, never
    for that run.  The WouldDeadlock check took any thread with a trio run
    for a trio task and refused these calls."""
    import asyncio

    import pimcore.asyncio

    with _start(tmp_path / "t") as im:
        im.create_group("team", ["alice"])

        async def main() -> tuple:
            async with pimcore.asyncio.open_pimcore(data_dir=tmp_path / "a"):
                return im.statistics(), im.post("team", b"from the asyncio loop").seq

        stats, seq = asyncio.run(main())
        assert stats is not None and seq == 1


def _wait(predicate, what: str, limit: float = 20.0) -> None:
    """Poll ``predicate`` (a generous limit: a slow machine is no failure)."""
    import time

    stop, give_up = threading.Event(), time.monotonic() + limit
    while time.monotonic() < give_up:
        if predicate():
            return
        stop.wait(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_handler_that_raises_gets_its_event_again_and_nothing_after_it_is_acked(tmp_path: Path, monkeypatch,
                                                                                  caplog) -> None:
    """A raising handler lost its event: delivery went on, and the next
    true return acknowledged it cumulatively.  Now delivery stops at the
    failed event and retries it (after HANDLER_RETRY_DELAY, doubling), and
    nothing past it is acknowledged before it succeeds."""
    import logging

    import pimcore.threaded as threaded

    monkeypatch.setattr(threaded, "HANDLER_RETRY_DELAY", 0.01)
    caplog.set_level(logging.WARNING, logger="pimcore.net")
    for on_loop in (False, True):
        with _start(tmp_path / f"d{on_loop}", events=True) as im:
            im.create_group("team", ["alice"])
            for i in range(3):
                im.post("team", b"%d" % i)
            target = im.event_cursor()[1] - 1  # the event of b"1"
            calls: list[int] = []
            lock = threading.Lock()

            def handler(ev) -> bool:
                with lock:
                    calls.append(ev.id)
                    if ev.id == target and calls.count(target) <= 3:
                        raise RuntimeError("the push service is down")
                return True

            im.set_event_handler(handler, on_loop=on_loop)
            _wait(lambda: im.event_cursor()[0] == target + 1, "the last event acked")
            im.set_event_handler(None)
            with lock:
                assert calls[calls.index(target):] == [target] * 4 + [target + 1]  # nothing after it before it went through
            failures = [r for r in caplog.records if "failed on event %d" % target in r.getMessage()]
            assert len(failures) == 3 and all(r.exc_info for r in failures)
            assert ["retrying in 0.01 s", "retrying in 0.02 s", "retrying in 0.04 s"] == [
                r.getMessage().rsplit(", ", 1)[1] for r in failures]
            caplog.clear()


def test_a_handler_that_keeps_failing_holds_the_cursor_before_its_event(tmp_path: Path, monkeypatch) -> None:
    import pimcore.threaded as threaded

    monkeypatch.setattr(threaded, "HANDLER_RETRY_DELAY", 0.001)
    with _start(tmp_path / "d", events=True) as im:
        im.create_group("team", ["alice"])
        im.post("team", b"a")
        target = im.event_cursor()[1]
        im.post("team", b"b")
        calls: list[int] = []

        def handler(ev) -> bool:
            calls.append(ev.id)
            if ev.id == target:
                raise RuntimeError("always")
            return True

        im.set_event_handler(handler)
        _wait(lambda: calls.count(target) >= 4, "four tries")
        im.set_event_handler(None)
        assert im.event_cursor()[0] == target - 1
        assert target + 1 not in calls


def test_the_retry_delay_doubles_up_to_a_minute() -> None:
    from pimcore.threaded import HANDLER_RETRY_DELAY, HANDLER_RETRY_MAX, _next_retry_delay

    assert HANDLER_RETRY_DELAY == 1.0 and HANDLER_RETRY_MAX == 60.0
    delays = [HANDLER_RETRY_DELAY]
    for _ in range(8):
        delays.append(_next_retry_delay(delays[-1]))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_an_async_function_is_no_threaded_event_handler(tmp_path: Path) -> None:
    """A coroutine function "ran": it returned a coroutine (truthy, so the
    event was acknowledged) that was never awaited."""
    import functools

    async def handler(ev) -> bool:  # pragma: no cover - never called
        return True

    class Callable_:
        async def __call__(self, ev) -> bool:  # pragma: no cover - never called
            return True

    with _start(tmp_path / "d", events=True) as im:
        for h in (handler, functools.partial(handler), Callable_()):
            with pytest.raises(TypeError, match="async"):
                im.set_event_handler(h)
        with pytest.raises(TypeError, match="callable"):
            im.set_event_handler("not a function")  # type: ignore[arg-type]
        im.set_event_handler(lambda ev: True)  # a plain one is fine
        im.set_event_handler(None)


def test_a_handler_returning_no_bool_acknowledges_nothing(tmp_path: Path, monkeypatch, caplog) -> None:
    """``fn(event) -> bool``: a truthy 1 or "yes" counted as an ack.  It is
    a handler error now (logged, retried): only True acknowledges."""
    import logging

    import pimcore.threaded as threaded

    monkeypatch.setattr(threaded, "HANDLER_RETRY_DELAY", 0.001)
    caplog.set_level(logging.WARNING, logger="pimcore.net")
    with _start(tmp_path / "d", events=True) as im:
        im.create_group("team", ["alice"])
        im.post("team", b"a")
        im.post("team", b"b")
        first, last = im.event_cursor()[1] - 1, im.event_cursor()[1]
        calls: list[int] = []

        def handler(ev):
            calls.append(ev.id)
            return None if ev.id < last else 1

        im.set_event_handler(handler)
        _wait(lambda: calls.count(last) >= 2, "a retry")
        im.set_event_handler(None)
        assert first >= 1 and im.event_cursor()[0] == 0  # None left them unacknowledged, 1 acknowledged nothing
        assert any("must return True, False or None, not int" in r.getMessage() for r in caplog.records)


def test_a_broker_used_only_by_its_host_reclaims_acked_events(tmp_path: Path) -> None:
    """No connection ever: the reclaim pass was armed only by a connection,
    a retention setting or (with a default retention) a post, so acked host
    events piled up for ever in a broker its host alone writes to.  Any host
    write arms it now."""
    with _start(tmp_path / "d", events=True, reclaim_interval=0.02) as im:
        im.create_group("team", ["alice"])
        for i in range(5):
            im.post("team", b"%d" % i)
        last = im.event_cursor("app")[1]
        assert im.ack_events(last, "app") == last

        def first_left() -> int:
            # "probe" reads from an id, so it gets no cursor holding events.
            _, events = im.next_events("probe", after=0, limit=1, timeout=0.05)
            return events[0].id if events else last + 1

        _wait(lambda: first_left() == last + 1, "the acked events reclaimed")


def test_a_redis_store_url_in_the_document_is_used_and_refused_when_unreachable(tmp_path: Path) -> None:
    """{"store": {"url": ...}} (what the C ABI's config_json hands on) at a
    port that refuses: StoreError naming the URL and store.url, not a broker
    started on <data_dir>/store."""
    pytest.importorskip("coredis")
    from pimcore.errors import StoreError

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises(StoreError, match=re.escape(f"cannot reach the Redis store {url} (store.url): ")):
            open_pimcore_thread(document={"data_dir": str(tmp_path / "d"), "store": {"url": url}})
    assert not (tmp_path / "d" / "store").exists()


def test_a_start_up_error_is_raised_once_not_also_logged(tmp_path: Path, caplog) -> None:
    """A data_dir that is a file (ConfigError) and a port in use (OSError):
    raised in the caller, and nothing logged at ERROR for it.  The thread
    also logged "pimcore thread ended: ConfigError(...)" on stderr, so a
    host that reports its exception said it twice."""
    import logging

    caplog.set_level(logging.DEBUG, logger="pimcore")
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ConfigError):
        _start(tmp_path / "file")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError):
            _start(tmp_path / "d", listen=[f"tcp://127.0.0.1:{busy.getsockname()[1]}"])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.redis
def test_two_brokers_on_one_data_dir_with_a_redis_store_both_start_and_on_lmdb_the_second_is_refused(
        tmp_path: Path, redis_cluster) -> None:
    """(Was: the second refused with BrokerAlreadyRunning: the threaded host
    reserved <data_dir>/store, an LMDB store neither broker opens.)  Two
    brokers of one process on one Redis store (two nodes) and one data
    directory both start, and one sees what the other stored; on LMDB the
    second start is still refused, in words."""
    import os

    data = tmp_path / "d"
    doc = {"data_dir": str(data), "durability": "os",
           "store": {"url": redis_cluster.url, "namespace": "t" + os.urandom(6).hex()}}
    with open_pimcore_thread(document=doc) as a, open_pimcore_thread(document=doc) as b:
        a.create_group("team", ["alice", "bob"])
        posted = b.post("team", b"hello", sender="alice", device="web")
        assert [m.payload for m in a.history("team", "bob") if m.seq == posted.seq] == [b"hello"]
    assert not (data / "store").exists()
    with _start(tmp_path / "l"):
        with pytest.raises(BrokerAlreadyRunning, match=re.escape(f"already runs on {str(tmp_path / 'l')!r}")):
            _start(tmp_path / "l")


def test_two_threads_setting_one_consumers_handler_leave_one_handler_and_a_removal_removes_it(tmp_path: Path) -> None:
    """A new user's trial: two threads each set the handler of one consumer
    at once, then one removes it -- and the handler was still called.  Both
    swaps started a dispatcher; the second overwrote the first in the
    registry, and the first one was never cancelled: two handlers ran at
    once (ids out of order, events delivered again and again), and the
    removal removed one of them.  Swaps of one consumer now run one after
    the other: at most one handler exists per consumer, and it runs one call
    at a time, in id order."""
    with _start(tmp_path / "d", events=True) as im:
        im.create_group("g", ["a"])
        lock = threading.Lock()
        active, peak, late = [0], [0], []
        removed = threading.Event()
        out_of_order: list[tuple[int, int]] = []

        def make_handler():
            last = [0]

            def handler(ev) -> bool:
                with lock:
                    active[0] += 1
                    peak[0] = max(peak[0], active[0])
                    if removed.is_set():
                        late.append(ev.id)
                    if ev.id <= last[0]:
                        out_of_order.append((last[0], ev.id))
                    last[0] = ev.id
                threading.Event().wait(0.001)  # long enough for a second dispatcher to overlap
                with lock:
                    active[0] -= 1
                return True

            return handler

        for trial in range(8):
            consumer = f"c{trial}"
            im.post("g", b"x")
            im.ack_events(10**9, consumer)  # the consumer starts at the end
            barrier = threading.Barrier(2)

            def setter() -> None:
                barrier.wait()
                for _ in range(5):
                    im.set_event_handler(make_handler(), consumer)

            threads = [threading.Thread(target=setter) for _ in range(2)]
            for t in threads:
                t.start()
            for i in range(20):
                im.post("g", b"%d" % i)
            for t in threads:
                t.join()
            im.set_event_handler(None, consumer)
            removed.set()
            im.post("g", b"after")
            threading.Event().wait(0.2)
            removed.clear()
            assert late == [], f"trial {trial}: events {late} were handed to a removed handler"
        assert peak[0] == 1, f"{peak[0]} handler calls at once"
        assert out_of_order == [], f"a handler got ids out of order: {out_of_order[:5]}"


def test_listeners_come_from_the_host_never_the_environment_and_other_variables_beat_the_options(
        tmp_path: Path, monkeypatch) -> None:
    """A new user's trial (the C ABI, whose JSON options are open_pimcore_thread's
    ``document``): PIMCORE_LISTEN was ignored when the options had no
    ``listen`` but replaced it when they had one -- one variable, two
    behaviours, by an unrelated key; PIMCORE_HTTP opened an HTTP listener
    here but not in open_pimcore.  One rule now: an embedded broker listens
    where its host says (arguments, else its options), never where the
    environment says; every other PIMCORE_* beats the options and arguments
    beat the environment."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        env_url = f"tcp://127.0.0.1:{held.getsockname()[1]}"  # bound: a broker listening there would fail to start
        monkeypatch.setenv("PIMCORE_LISTEN", env_url)
        monkeypatch.setenv("PIMCORE_HTTP", env_url)
        monkeypatch.setenv("PIMCORE_LIMITS_MAX_PAYLOAD", "4096")
        doc = {"data_dir": str(tmp_path / "a"), "durability": "os", "limits": {"max_payload": 1000}}
        with open_pimcore_thread(document=doc) as im:
            assert im.urls == [] and im.http_url is None
            assert im.settings.limits["max_payload"] == 4096  # the environment beats the options
        doc["listen"] = ["tcp://127.0.0.1:0"]
        with open_pimcore_thread(document=doc) as im:
            assert len(im.urls) == 1 and im.urls[0] != env_url and im.port() != 0
            assert im.http_url is None
        with open_pimcore_thread(document=doc, max_payload=2000) as im:
            assert im.settings.limits["max_payload"] == 2000  # arguments beat the environment
        with _start(tmp_path / "b", listen=["tcp://127.0.0.1:0"]) as im:
            assert len(im.urls) == 1 and im.urls[0] != env_url
        conf = tmp_path / "pimcore.toml"
        conf.write_text('listen = ["tcp://127.0.0.1:0"]\n')
        with _start(tmp_path / "c", config_file=str(conf)) as im:  # the host's own file: its listen is used
            assert len(im.urls) == 1 and im.urls[0] != env_url
        monkeypatch.setenv("PIMCORE_CONFIG", str(conf))  # a file named by the environment: no listener from it
        with _start(tmp_path / "d") as im:
            assert im.urls == []


def test_removing_an_event_handler_without_events_is_events_disabled_as_setting_one(tmp_path: Path) -> None:
    """pimcore.h: pim_set_event_callback needs events, else PIM_ERR_INVALID --
    a removal (NULL) returned PIM_OK all the same (a new user's trial).
    Setting and removing agree now: EventsDisabled (a ValueError)."""
    with _start(tmp_path / "d") as im:
        with pytest.raises(EventsDisabled):
            im.set_event_handler(lambda ev: True)
        with pytest.raises(EventsDisabled):
            im.set_event_handler(None)
        with pytest.raises(EventsDisabled):
            im.set_event_handler(None, "other")


def test_post_many_of_a_str_says_it_takes_a_list(tmp_path: Path) -> None:
    """post_many("notalist") said "got a str at 0" (the threaded handle made
    a list of its letters first); it says what the trio handle says: a list
    of dicts, not a str.  Nothing is posted."""
    with _start(tmp_path / "d") as im:
        im.create_group("team", ["alice"])
        for bad in ("notalist", b"bytes", {"conv": "team", "payload": b"x"}, 5):
            with pytest.raises(TypeError, match=r"takes a list of dicts \(one per post\), not a"):
                im.post_many(bad)  # type: ignore[arg-type]
        assert im.history("team", "alice") == []


def test_two_brokers_whose_handlers_close_each_other_get_would_deadlock_not_a_hang(tmp_path: Path) -> None:
    """A new user's trial: A's event handler closed B while B's handler
    closed A.  close() waits for the broker's handlers to return, so each
    waited for the other for good (and a later close of A from the main
    thread hung too).  The call that would close the wait-for cycle raises
    WouldDeadlock; the other one goes through.  Run under timeouts: without
    the detection the handlers never return and the test fails (the stuck
    brokers are left behind, not closed, so it does not hang)."""
    a = _start(tmp_path / "a", events=True)
    b = _start(tmp_path / "b", events=True)
    for im in (a, b):
        im.create_group("g", ["alice"])
        im.post("g", b"x")
    outcomes: dict[str, str] = {}
    both = threading.Barrier(2, timeout=10)  # both handlers are running before either closes
    returned = [threading.Event(), threading.Event()]

    def handler_for(other, name: str, i: int):
        def handler(ev) -> bool:
            if name not in outcomes:
                outcomes[name] = "running"
                both.wait()
                try:
                    other.close()
                    outcomes[name] = "closed"
                except WouldDeadlock:
                    outcomes[name] = "deadlock"
                except Exception as exc:  # noqa: BLE001 - what the test reports
                    outcomes[name] = repr(exc)
                returned[i].set()
            return True
        return handler

    a.set_event_handler(handler_for(b, "a", 0))
    b.set_event_handler(handler_for(a, "b", 1))
    assert returned[0].wait(15) and returned[1].wait(15), f"the handlers hung in close(): {outcomes}"
    assert sorted(outcomes.values()) == ["closed", "deadlock"], outcomes
    closed = a if outcomes["b"] == "closed" else b
    other = b if closed is a else a
    assert closed.closed
    with pytest.raises(BrokerStopped):
        closed.post("g", b"y")
    other.post("g", b"still up")  # the refused close did nothing
    done = threading.Thread(target=other.close, daemon=True)
    done.start()
    done.join(15)
    assert not done.is_alive(), "closing the other broker from the main thread hung"


def test_a_wait_for_cycle_through_three_brokers_and_a_handler_swap_is_would_deadlock(tmp_path: Path) -> None:
    """The cycle can be longer, and a set_event_handler() that waits for a
    running handler is a wait too: A's handler closes B, B's handler
    replaces C's running handler (it waits for it to return), C's handler
    closes A.  Exactly one call -- the one closing the cycle -- raises
    WouldDeadlock; the others go through once it has.  Under timeouts: the
    brokers of a failed run are left behind, not closed."""
    ims = [_start(tmp_path / n, events=True) for n in "abc"]
    for im in ims:
        im.create_group("g", ["alice"])
        im.post("g", b"x")
    outcomes: dict[int, str] = {}
    all_running = threading.Barrier(3, timeout=10)
    returned = [threading.Event() for _ in ims]
    calls = [ims[1].close, lambda: ims[2].set_event_handler(lambda ev: True), ims[0].close]

    def handler_for(i: int):
        def handler(ev) -> bool:
            if i not in outcomes:
                outcomes[i] = "running"
                all_running.wait()
                try:
                    calls[i]()
                    outcomes[i] = "ok"
                except WouldDeadlock:
                    outcomes[i] = "deadlock"
                except Exception as exc:  # noqa: BLE001 - what the test reports
                    outcomes[i] = repr(exc)
                returned[i].set()
            return True
        return handler

    for i, im in enumerate(ims):
        im.set_event_handler(handler_for(i))
    assert all(r.wait(15) for r in returned), f"the handlers hung: {outcomes}"
    assert sorted(outcomes.values()) == ["deadlock", "ok", "ok"], outcomes
    closing: list[str] = []

    def close_all() -> None:
        for im in ims:
            try:
                im.close()
                closing.append("ok")
            except Exception as exc:  # noqa: BLE001 - what the test reports
                closing.append(repr(exc))

    # (A new thread: it may get the ident of a broker thread that ended --
    # that broker's close() took it for its own loop thread, WouldDeadlock.)
    closer = threading.Thread(target=close_all, daemon=True)
    closer.start()
    closer.join(15)
    assert not closer.is_alive(), "closing the brokers from another thread hung"
    assert closing == ["ok"] * 3


def test_close_again_from_a_new_thread_is_ok_whatever_ident_it_gets(tmp_path: Path) -> None:
    """A closed broker kept its loop thread's ident, and a thread started
    later is often given that ident again (the C library reuses the ended
    thread's): close() from it -- pim_broker_free after pim_broker_stop --
    took it for the loop's own thread and raised WouldDeadlock (a handle
    never freed).  Found by the three-broker test above."""
    im = _start(tmp_path / "d")
    im.close()
    results: list[str] = []

    def again() -> None:
        try:
            im.close()
            results.append("ok")
        except Exception as exc:  # noqa: BLE001 - what the test reports
            results.append(repr(exc))

    for _ in range(10):
        t = threading.Thread(target=again)
        t.start()
        t.join(10)
    assert results == ["ok"] * 10


def test_set_event_handler_racing_close_is_ok_or_broker_stopped(tmp_path: Path) -> None:
    """A new user's trial (pim_set_event_callback racing pim_broker_stop):
    8 of 20 rounds got RuntimeError("Nursery is closed to new arrivals"),
    PIM_ERR_INTERNAL through the C ABI -- the swap started the new
    dispatcher after close() had ended the broker's nursery.  Every call
    returns, or raises BrokerStopped."""
    unexpected: list[str] = []

    def handler(ev) -> bool:
        return True

    for round_ in range(20):
        im = _start(tmp_path / f"d{round_}", events=True)
        stop = threading.Event()

        def setter(consumer: str) -> None:
            i = 0
            while not stop.is_set():
                try:
                    im.set_event_handler(handler if i % 2 else None, consumer)
                except BrokerStopped:
                    pass
                except Exception as exc:  # noqa: BLE001 - what the test reports
                    unexpected.append(repr(exc))
                i += 1

        threads = [threading.Thread(target=setter, args=(f"c{i % 2}",), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        threading.Event().wait(0.1)
        im.close()
        threading.Event().wait(0.02)
        stop.set()
        for t in threads:
            t.join(10)
            assert not t.is_alive(), "a set_event_handler call hung"
    assert unexpected == []


def test_delete_consumer_refuses_a_consumer_with_a_handler_and_deletes_it_once_removed(tmp_path: Path) -> None:
    # A handler is a live reader: deleting its cursor under it would make
    # its next read restart from 0, silently.
    from pimcore.embed import ConsumerInUse

    with _start(tmp_path / "d", events=True, consumer_idle=0) as im:
        im.create_group("team", ["alice"])
        im.post("team", b"m0")
        seen = threading.Event()
        im.set_event_handler(lambda ev: seen.set() or True, consumer="worker")
        assert seen.wait(10)
        with pytest.raises(ConsumerInUse) as refused:
            im.delete_consumer("worker")
        assert refused.value.consumer == "worker"
        assert ("worker", im.event_cursor("worker")[1]) in im.event_consumers()
        im.set_event_handler(None, consumer="worker")
        assert im.delete_consumer("worker") is True
        assert im.delete_consumer("worker") is False
        assert "worker" not in dict(im.event_consumers())
        # An open iterator is a reader too, until let go (of a consumer with
        # a cursor: one with none is "not found" first, nothing to lose).
        stream = im.events("reader")
        assert im.delete_consumer("reader") is False  # never read: no cursor
        im.ack_events(0, "reader")
        with pytest.raises(ConsumerInUse):
            im.delete_consumer("reader")
        del stream
        assert im.delete_consumer("reader") is True
    with _start(tmp_path / "e") as im:
        with pytest.raises(EventsDisabled):
            im.delete_consumer("worker")
