"""The trio handle (pimcore.embed) under misuse: calls at and after the
end of the ``open_pimcore`` block, and arguments of the wrong type or value
-- each gets one clear, documented error, never a hang or a raw internal
exception, and nothing half done."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from pimcore.embed import Posted, RequestRefused, open_pimcore
from pimcore.errors import BrokerStopped, ErrorCode


async def test_calls_in_flight_at_close_and_after_it_raise_broker_stopped(tmp_path: Path) -> None:
    outcomes: list[object] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            async with open_pimcore(data_dir=tmp_path / "data") as im:
                await im.create_group("team", ["alice", "bob"])

                async def poster() -> None:
                    # Posts until one fails: every post either stores or raises.
                    while True:
                        try:
                            await im.post("team", b"x")
                        except BrokerStopped as exc:
                            outcomes.append(exc)
                            return

                for _ in range(20):
                    outer.start_soon(poster)
                await trio.sleep(0.2)
            server = im.server
        # Every poster ended (the nursery exited within fail_after).
        assert len(outcomes) == 20
        calls = [
            lambda: im.post("team", b"y"),
            lambda: im.post_many([{"conv": "team", "payload": b"z"}]),
            lambda: im.create_group("g", ["a"]),
            lambda: im.add_members("team", ["carol"]),
            lambda: im.remove_members("team", ["bob"]),
            lambda: im.revoke("alice"),
            lambda: im.recall("team", 1),
            lambda: im.edit("team", 1, b"e"),
            lambda: im.delete_for("alice", "team", 1),
            lambda: im.set_retention("team", max_count=5),
            lambda: im.purge_conversation("team"),
            lambda: im.purge_user("bob"),
            lambda: im.set_presence_privacy("alice", True),
            lambda: im.set_conversation("alice", "team", pinned=True),
            lambda: im.history("team", "alice"),
            lambda: im.conversations("alice"),
            lambda: im.unread("alice"),
            lambda: im.read_positions("alice"),
            lambda: im.presence("alice"),
            lambda: im.retention("team"),
            lambda: im.conversation_list("alice"),
        ]
        for call in calls:
            with pytest.raises(BrokerStopped):
                await call()
        for sync_call in (lambda: im.kick("alice"), lambda: im.online_devices("alice"), lambda: im.issue_token("alice")):
            with pytest.raises(BrokerStopped):
                sync_call()
        assert server._admin_waiters == {}


async def test_event_readers_waiting_at_close_raise_broker_stopped(tmp_path: Path) -> None:
    with trio.fail_after(20):
        errors: list[BaseException] = []
        async with trio.open_nursery() as outer:
            async with open_pimcore(data_dir=tmp_path / "data", events=True) as im:
                await im.create_group("team", ["alice"])
                await im.post("team", b"x")
                _, page = await im.next_events("c")
                await im.ack_events(page[-1].id, "c")

                async def reader() -> None:
                    try:
                        await im.next_events("c")  # caught up: waits for the next commit
                    except BrokerStopped as exc:
                        errors.append(exc)

                outer.start_soon(reader)
                await trio.sleep(0.1)
        assert len(errors) == 1
        with pytest.raises(BrokerStopped):
            im.events("c")
        for call in (lambda: im.next_events("c"), lambda: im.ack_events(1, "c"), lambda: im.event_cursor("c"),
                     lambda: im.online_anywhere(["alice"])):
            with pytest.raises(BrokerStopped):
                await call()


def test_the_threaded_handle_raises_the_same_broker_stopped() -> None:
    import pimcore.threaded

    assert pimcore.threaded.BrokerStopped is BrokerStopped
    assert issubclass(BrokerStopped, RuntimeError)  # as the threaded handle's was


async def test_a_payload_too_large_says_its_size_and_the_limit(tmp_path: Path) -> None:
    """It said only "refused: PAYLOAD_TOO_LARGE" (a new-user pass)."""
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            await im.create_group("team", ["alice", "bob"])
            expected = "PAYLOAD_TOO_LARGE: 70000 bytes, max_payload is 65536"
            with pytest.raises(RequestRefused, match=expected) as refused:
                await im.post("team", b"x" * 70_000)
            assert refused.value.code is ErrorCode.PAYLOAD_TOO_LARGE
            [result] = await im.post_many([{"conv": "team", "payload": b"x" * 70_000}])
            assert isinstance(result, RequestRefused) and expected in str(result), result
            await im.post("team", b"ok")
            with pytest.raises(RequestRefused, match=expected):
                await im.edit("team", 1, b"x" * 70_000)


async def test_a_long_conversation_id_is_cut_short_in_refusals(tmp_path: Path) -> None:
    """A 5,000-character id came back whole in "post to '...' refused" (a new-user pass)."""
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            for call in (lambda conv: im.post(conv, b"x"), lambda conv: im.recall(conv, 1)):
                with pytest.raises(RequestRefused) as refused:
                    await call("a" * 5000)
                assert len(str(refused.value)) < 400 and "...(5000 chars)" in str(refused.value), str(refused.value)


async def test_a_conversation_id_that_is_a_huge_int_is_refused_in_words(tmp_path: Path) -> None:
    """An int of 5,001 digits as a conversation id raised Python's own
    ValueError ("Exceeds the limit (4300 digits) for integer string
    conversion ... use sys.set_int_max_str_digits()"): the refusal's repr
    of it.  Refused like any other id that is not text, shown cut: its
    first digits and how many it has."""
    huge = 10**5000
    shown = "1" + "0" * 69 + "...(an int of 5,001 digits)"
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            for call in (lambda: im.post(huge, b"x"), lambda: im.recall(huge, 1), lambda: im.history(huge, "alice"),
                         lambda: im.add_members(huge, ["alice"]), lambda: im.post([huge], b"x")):
                with pytest.raises(RequestRefused) as refused:
                    await call()
                said = str(refused.value)
                assert shown in said and "sys.set_int_max_str_digits" not in said and len(said) < 400, said


async def test_an_idempotency_key_that_is_not_utf8_refuses_that_post_alone(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            await im.create_group("team", ["alice", "bob"])
            results = await im.post_many([{"conv": "team", "payload": b"good1"},
                                          {"conv": "team", "payload": b"bad", "idempotency_key": "\udc80"},
                                          {"conv": "team", "payload": b"good2", "sender": "alice", "device": "web",
                                           "idempotency_key": "k\ud800"}])
            assert isinstance(results[0], Posted)
            for bad in results[1:]:
                assert isinstance(bad, RequestRefused) and bad.code is ErrorCode.BAD_REQUEST
                assert "idempotency key" in str(bad) and "UTF-8" in str(bad)
            assert [m.payload for m in await im.history("team", "alice")] == [b"good1"]
            for call in (lambda: im.post("team", b"x", idempotency_key="\udc80"),
                         lambda: im.post("team", b"x", sender="alice", device="web", idempotency_key="\udc80"),
                         lambda: im.recall("team", 1, idempotency_key="\udc80"),
                         lambda: im.edit("team", 1, b"e", idempotency_key="\udc80"),
                         lambda: im.delete_for("alice", "team", 1, idempotency_key="\udc80")):
                with pytest.raises(RequestRefused, match="idempotency key") as refused:
                    await call()
                assert refused.value.code is ErrorCode.BAD_REQUEST
            assert im.server._admin_waiters == {}


@pytest.mark.parametrize("payload", [5, 10**9, [104, 105], "text", None, {1: 2}])
async def test_a_payload_that_is_not_bytes_is_a_type_error_and_stores_nothing(tmp_path: Path, payload: object) -> None:
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"first")
            for call in (lambda: im.post("team", payload),  # type: ignore[arg-type]
                         lambda: im.post("team", payload, sender="alice", device="web"),  # type: ignore[arg-type]
                         lambda: im.edit("team", 1, payload),  # type: ignore[arg-type]
                         lambda: im.post_many([{"conv": "team", "payload": b"ok"}, {"conv": "team", "payload": payload}])):
                with pytest.raises(TypeError, match="payload must be bytes"):
                    await call()
            assert [m.payload for m in await im.history("team", "alice")] == [b"first"]
            # The bytes-like types are taken.
            await im.post("team", bytearray(b"ba"))
            await im.post("team", memoryview(b"mv"))
            await im.edit("team", 1, memoryview(b"edited"))
            (posted,) = await im.post_many([{"conv": "team", "payload": bytearray(b"many")}])
            assert isinstance(posted, Posted)
            assert [m.payload for m in await im.history("team", "alice", limit=3)] == [b"many", b"edited", b"mv"]
            # Any buffer-protocol object, as bytes() took them before.
            import array

            await im.post("team", array.array("B", b"arr"))
            assert (await im.history("team", "alice", limit=1))[0].payload == b"arr"


async def test_a_string_where_a_list_of_user_ids_goes_is_a_type_error(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            for bad in ("alice", b"alice", 5, ["alice", 5], None):
                with pytest.raises(TypeError, match="user ids"):
                    await im.create_group("team", bad)  # type: ignore[arg-type]
            assert await im.conversations("alice") == [] and await im.conversations("a") == []
            await im.create_group("team", ("alice",))
            for method in (im.add_members, im.remove_members):
                with pytest.raises(TypeError, match="user ids"):
                    await method("team", "bob")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="user ids"):
                await im.online_anywhere("bob")
            assert await im.conversations("b") == [] and await im.conversations("o") == []
            changed = await im.add_members("team", {"bob"})
            assert changed.members == ("alice", "bob")
            assert (await im.remove_members("team", iter(["bob"]))).members == ("alice",)
            assert im.server._admin_waiters == {}


async def test_a_kick_reason_that_is_not_utf8_is_refused_before_anyone_is_kicked(tmp_path: Path) -> None:
    from pimcore.client import open_client

    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data", listen=["tcp://127.0.0.1:0"], events=True) as im:
            await im.create_group("team", ["alice"])
            async with open_client(im.urls[0], im.issue_token("alice"), "phone"):
                for reason in ("bye \udc80", "x" * 257, "é" * 129, 5):
                    with pytest.raises(RequestRefused, match="reason") as refused:
                        im.kick("alice", reason=reason)  # type: ignore[arg-type]
                    assert refused.value.code is ErrorCode.BAD_REQUEST
                assert im.online_devices("alice") == ["phone"]
                im.kick("alice", reason="é" * 128)  # 256 bytes: the most
            cursor, last = await im.event_cursor("c")
            _, events = await im.next_events("c", after=0, limit=100)
            assert [(e.type, e.reason) for e in events if e.type == "kicked"] == [("kicked", "é" * 128)]


async def test_arguments_of_the_wrong_type_or_value_get_clear_documented_errors(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            await im.create_group("team", ["alice", "bob"])
            await im.post("team", b"one")
            cases = [
                (lambda: im.history("team", "alice", from_seq="1"), TypeError, "from_seq"),
                (lambda: im.history("team", "alice", from_seq=-1), ValueError, "from_seq"),
                (lambda: im.history("team", "alice", limit="5"), TypeError, "limit"),
                (lambda: im.history("team", "alice", limit=-1), ValueError, "limit"),
                (lambda: im.history("team", "alice", limit=0), ValueError, "limit"),
                (lambda: im.revoke("alice", before="2026-01-01"), TypeError, "before"),
                (lambda: im.revoke("alice", before=1.5), TypeError, "before"),
                (lambda: im.revoke("alice", before=-1), ValueError, "before"),
                (lambda: im.post_many([{"conv": "team"}]), TypeError, "payload"),
                (lambda: im.post_many([{"payload": b"x"}]), TypeError, "conv"),
                (lambda: im.post_many("abc"), TypeError, "list of dicts"),
                (lambda: im.post_many([b"x"]), TypeError, "list of dicts"),
                (lambda: im.post_many({"conv": "team", "payload": b"x"}), TypeError, "list of dicts"),
                (lambda: im.conversation_list("alice", cursor="abc"), TypeError, "cursor"),
            ]
            for call, error, word in cases:
                with pytest.raises(error, match=word):
                    await call()
            assert [m.payload for m in await im.history("team", "alice")] == [b"one"]
            with pytest.raises(RequestRefused, match="device") as refused:
                await im.revoke("alice", "no such device!")
            assert refused.value.code is ErrorCode.BAD_REQUEST
            for call, action in ((lambda: im.recall("team", 99), "recall"), (lambda: im.edit("team", 99, b"e"), "edit"),
                                 (lambda: im.delete_for("alice", "team", 99), "delete")):
                with pytest.raises(RequestRefused) as refused:
                    await call()
                assert refused.value.code is ErrorCode.NO_SUCH_MESSAGE
                assert str(refused.value).startswith(f"{action} in 'team' refused: NO_SUCH_MESSAGE")
            assert im.server._admin_waiters == {}


async def test_unusable_settings_are_config_errors(tmp_path: Path) -> None:
    from pimcore.config import ConfigError

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    cases = [
        ({"data_dir": tmp_path / "d1", "secret_file": str(tmp_path / "nonexistent" / "secret")}, "secret"),
        ({"data_dir": a_file}, "not a directory"),
        ({"data_dir": tmp_path / "d2", "events": "true"}, "expected a bool"),
    ]
    for kw, words in cases:
        with trio.fail_after(20):
            with pytest.raises(ConfigError, match=words):
                async with open_pimcore(**kw):
                    pass


def test_the_threaded_handle_refuses_a_string_of_members_too(tmp_path: Path) -> None:
    from pimcore.threaded import open_pimcore_thread

    im = open_pimcore_thread(data_dir=tmp_path / "data")
    try:
        with pytest.raises(TypeError, match="user ids"):
            im.create_group("team", "alice")  # type: ignore[arg-type]
        im.create_group("team", ["alice"])
        for method in (im.add_members, im.remove_members):
            with pytest.raises(TypeError, match="user ids"):
                method("team", "bob")  # type: ignore[arg-type]
        assert im.conversations("a") == [] and im.conversations("b") == []
    finally:
        im.close()


async def test_a_post_the_core_fails_on_mid_list_keeps_the_others_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """post_many hands its posts to the core one by one.  A hand-over that
    raised (a fault in the core) ended the call with that exception: the
    posts handed before it were stored all the same, and their results --
    their seqs, and that they were stored at all -- were lost to the caller,
    whose retry without keys would post them twice."""
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            await im.create_group("team", ["alice", "bob"])
            real = im.server.broker.post

            def post(conv, payload, *args, **kw):  # type: ignore[no-untyped-def]
                if payload == b"boom":
                    raise RuntimeError("a fault in the core")
                return real(conv, payload, *args, **kw)

            monkeypatch.setattr(im.server.broker, "post", post)
            results = await im.post_many([{"conv": "team", "payload": p} for p in (b"one", b"boom", b"two")])
            assert isinstance(results[0], Posted) and isinstance(results[2], Posted), results
            assert isinstance(results[1], RequestRefused) and results[1].code is ErrorCode.INTERNAL, results
            assert "a fault in the core" in str(results[1])
            assert sorted(m.payload for m in await im.history("team", "alice")) == [b"one", b"two"]
            assert results[0].seq < results[2].seq
            assert im.server._admin_waiters == {}


_NOT_A_BOOL = ["false", "true", "", 0, 1, None, [], 1.0]


async def test_history_visible_must_be_a_bool_and_nothing_is_created_otherwise(tmp_path: Path) -> None:
    """``create_group(..., history_visible='false')`` took the string's
    truthiness: the group was created with history visible.  Anything but
    True or False (0 and 1 too, as POST /v1/groups refuses them) is a
    TypeError, and no group is created."""
    with trio.fail_after(20):
        async with open_pimcore(data_dir=tmp_path / "data") as im:
            for bad in _NOT_A_BOOL:
                with pytest.raises(TypeError, match="history_visible must be a bool"):
                    await im.create_group("gf", ["alice"], history_visible=bad)  # type: ignore[arg-type]
            assert await im.conversations("alice") == []
            await im.create_group("gf", ["alice"], history_visible=False)
            assert await im.history_visible("gf") is False
            await im.create_group("gt", ["alice"], history_visible=True)
            assert await im.history_visible("gt") is True
            assert im.server._admin_waiters == {}


def test_history_visible_must_be_a_bool_on_the_threaded_and_asyncio_handles(tmp_path: Path) -> None:
    import asyncio

    import pimcore.asyncio
    from pimcore.threaded import open_pimcore_thread

    im = open_pimcore_thread(data_dir=tmp_path / "t")
    try:
        for bad in _NOT_A_BOOL:
            with pytest.raises(TypeError, match="history_visible must be a bool"):
                im.create_group("gf", ["alice"], history_visible=bad)  # type: ignore[arg-type]
        assert im.conversations("alice") == []
        im.create_group("gt", ["alice"], history_visible=True)
        assert im.history_visible("gt") is True
    finally:
        im.close()

    async def main() -> None:
        async with pimcore.asyncio.open_pimcore(data_dir=tmp_path / "a") as aim:
            for bad in _NOT_A_BOOL:
                with pytest.raises(TypeError, match="history_visible must be a bool"):
                    await aim.create_group("gf", ["alice"], history_visible=bad)  # type: ignore[arg-type]
            assert await aim.conversations("alice") == []
            await aim.create_group("gt", ["alice"], history_visible=True)
            assert await aim.history_visible("gt") is True

    asyncio.run(main())


@pytest.mark.parametrize("flag", ["pinned", "muted", "hidden"])
@pytest.mark.parametrize("value", ["false", 0, 1, "yes"])
async def test_set_conversation_flags_must_be_bools_and_nothing_changes_otherwise(tmp_path: Path, flag: str,
                                                                                 value: object) -> None:
    """``pinned="false"`` pinned the conversation (truthiness), 0 unpinned
    it: a flag is True, False or None, else TypeError (as history_visible
    and hide_last_seen), before anything is stored."""
    async with open_pimcore(data_dir=tmp_path / "data") as im:
        await im.create_group("team", ["alice"])
        before = await im.set_conversation("alice", "team")
        with pytest.raises(TypeError, match=f"{flag} must be True, False or None"):
            await im.set_conversation("alice", "team", **{flag: value})
        assert await im.set_conversation("alice", "team") == before
        entry = await im.set_conversation("alice", "team", **{flag: True})
        assert getattr(entry, flag) is True


async def test_event_page_and_ack_arguments_get_clear_errors(tmp_path: Path) -> None:
    """next_events(limit=-5) read one event (max(1, limit)), limit=10**9
    was handed to the store as asked, limit="10" or after=1.5 came back as
    a bare "events of 'default': BAD_REQUEST", and ack_events(-1) or
    ack_events("3") went to the store.  Now: TypeError for a value that is
    no int (a bool neither), RequestRefused(BAD_REQUEST) saying the range
    for one out of it -- limit 1..MAX_EVENTS_PAGE (10000), after and upto
    0..2**64-1 -- and nothing read or acked."""
    from pimcore.embed import MAX_EVENTS_PAGE

    assert MAX_EVENTS_PAGE == 10_000
    async with open_pimcore(data_dir=tmp_path / "data", events=True) as im:
        await im.create_group("team", ["alice"])
        await im.post("team", b"x")
        for kw in ({"limit": 0}, {"limit": -5}, {"limit": MAX_EVENTS_PAGE + 1}, {"after": -1}, {"after": 1 << 64}):
            with pytest.raises(RequestRefused, match="must be in") as refused:
                await im.next_events(**kw)
            assert refused.value.code is ErrorCode.BAD_REQUEST
            with pytest.raises(RequestRefused, match="must be in"):
                im.events(**kw)
        for kw in ({"limit": "10"}, {"limit": 2.0}, {"limit": True}, {"after": 1.5}, {"after": "0"}):
            with pytest.raises(TypeError, match="must be an int"):
                await im.next_events(**kw)
            with pytest.raises(TypeError, match="must be an int"):
                im.events(**kw)
        for bad, error in ((-1, RequestRefused), (1 << 64, RequestRefused), ("3", TypeError), (2.0, TypeError),
                           (True, TypeError), (None, TypeError)):
            with pytest.raises(error, match="upto"):
                await im.ack_events(bad, "app")  # type: ignore[arg-type]
        assert await im.event_cursor("app") == (0, 1)  # nothing acked (no cursor made either)
        after, page = await im.next_events(after=0, limit=MAX_EVENTS_PAGE)
        assert after == 0 and len(page) == 1


@pytest.mark.parametrize("store", ["memory", "redis://127.0.0.1:7000", 0])
async def test_a_store_that_is_no_store_object_is_a_value_error_naming_the_stores(tmp_path: Path, store: object) -> None:
    """open_pimcore(store="memory") failed deep in the server with
    AttributeError: 'str' object has no attribute 'node_id'."""
    with pytest.raises(ValueError, match="LmdbStore, MemoryStore") as err:
        async with open_pimcore(data_dir=tmp_path / "data", store=store):
            pass  # pragma: no cover
    assert "AsyncStore" in str(err.value) and repr(store)[:10] in str(err.value)


@pytest.mark.parametrize("value", [0, 1e-9])
async def test_a_reclaim_interval_of_zero_says_seconds(tmp_path: Path, value: float) -> None:
    """reclaim_interval is seconds in the settings, but the refusal said
    "BrokerConfig.reclaim_interval must be > 0 µs"."""
    from pimcore.config import ConfigError

    with pytest.raises(ConfigError, match=r"reclaim_interval: expected seconds > 0") as err:
        async with open_pimcore(data_dir=tmp_path / "data", reclaim_interval=value):
            pass  # pragma: no cover
    assert "µs" not in str(err.value)


async def test_delete_for_twice_stores_one_entry(tmp_path: Path) -> None:
    """Each delete_for without a key got a random local id: a repeat (a
    retry after a timeout) stored a second DELETE entry -- one more inbox
    entry and host event for the same (user, message)."""
    async with open_pimcore(data_dir=tmp_path / "data", events=True) as im:
        await im.create_group("team", ["alice", "bob"])
        posted = await im.post("team", b"x")
        first = await im.delete_for("alice", "team", posted.seq)
        again = await im.delete_for("alice", "team", posted.seq)
        assert again == first and again.duplicate and not first.duplicate
        positions = await im.read_positions("alice")
        assert positions.head == 2  # the message and one DELETE entry
        _, events = await im.next_events(after=0)
        assert [e.kind for e in events if e.type == "message"] == [0, 5]
        # Another user's delete of it is their own entry.
        assert not (await im.delete_for("bob", "team", posted.seq)).duplicate
