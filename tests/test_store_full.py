"""A store that cannot write because its disk (or its map) is full: the
error says so in words, is logged once per change of state, and ``/readyz``
answers 503 while writes fail (docs/OPERATIONS.md, "When the disk is full")."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from pimcore.errors import StoreError
from pimcore.store import wal

from test_command_log import _FailingCommitTxn
from test_http import assert_error
from test_http_api import api, call


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pimcore.net" and r.levelno >= logging.ERROR]


async def _post(c: Any, text: str) -> tuple[int, Any]:
    return await call(c, "POST", "/v1/conversations/team/messages", {"payload": text})


async def test_a_command_log_without_space_is_named_logged_once_and_not_ready(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pimcore")
    with trio.fail_after(30):
        async with api(tmp_path, durability="log") as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            assert (await _post(c, "fits"))[0] == 201
            assert await c.json("GET", "/readyz") == (200, {"status": "ready"})

            def full(fd: int, data: bytes, offset: int) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(wal, "_pwrite_all", full)
            for i in range(5):
                assert_error(*await _post(c, f"no room {i}"), 503, "STORE_UNAVAILABLE")
            # The 503 says why in words (it said only "the store failed"),
            # without the data directory's path: an API client is no
            # operator, and the operator has it in the log line below.
            for status, doc in [await _post(c, "no room"),
                                await call(c, "POST", "/v1/groups", {"conv": "crew", "members": ["alice"]})]:
                assert_error(status, doc, 503, "STORE_UNAVAILABLE")
                message = doc["error"]["message"]
                assert message.endswith(": the store failed: no space left on the data directory's file system: free"
                                        " space there (or move the data directory to a larger disk), then restart"
                                        " the broker"), message
                assert str(tmp_path) not in message, message
            status, doc = await call(c, "POST", "/v1/messages", {"messages": [{"conv": "team", "payload": "x"}]})
            [result] = doc["results"]
            assert result["code"] == "STORE_UNAVAILABLE" and result["message"].endswith(
                "the store failed: no space left on the data directory's file system: free space there (or move the"
                " data directory to a larger disk), then restart the broker") and str(tmp_path) not in str(doc), doc
            errors = _errors(caplog)
            assert len(errors) == 1, errors  # not one per refused request
            assert "no space left on the data directory's file system" in errors[0], errors
            assert str(tmp_path) in errors[0]
            status, doc = await c.json("GET", "/readyz")
            assert_error(status, doc, 503, "UNAVAILABLE")
            assert "no space left" in doc["error"]["message"], doc
            assert str(tmp_path) not in doc["error"]["message"], doc  # (/readyz needs no API key)


async def test_a_store_that_writes_no_more_until_a_restart_fails_healthz(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``durability log`` a failed flush of the command log stops the
    store until a restart (/readyz said so), but /healthz stayed 200: a
    liveness probe (or systemd Restart=on-failure) never restarted it."""
    with trio.fail_after(30):
        async with api(tmp_path, durability="log") as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            assert await c.json("GET", "/healthz") == (200, {"status": "ok"})

            def full(fd: int, data: bytes, offset: int) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(wal, "_pwrite_all", full)
            assert_error(*await _post(c, "no room"), 503, "STORE_UNAVAILABLE")
            monkeypatch.undo()  # (space again: the store still writes no more until a restart)
            status, doc = await c.json("GET", "/healthz")
            assert_error(status, doc, 503, "UNAVAILABLE")
            assert doc["error"]["message"] == ("the store writes no more: no space left on the data directory's file"
                                               " system: free space there (or move the data directory to a larger"
                                               " disk), then restart the broker"), doc
            assert str(tmp_path) not in str(doc)  # (/healthz needs no API key)
            assert_error(*await _post(c, "room again"), 503, "STORE_UNAVAILABLE")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root and mount: else the test is skipped)."""
    where = tmp_path / "tiny"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(where: Path) -> Path:
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_under_lmdb_is_named_not_ready_and_ready_again_once_a_write_succeeds(
        tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pimcore")
    with trio.fail_after(60):
        async with api(tiny_fs / "d") as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            assert await c.json("GET", "/readyz") == (200, {"status": "ready"})
            filler = _fill(tiny_fs)
            big = "x" * 60_000
            for i in range(5):
                assert_error(*await _post(c, big), 503, "STORE_UNAVAILABLE")
            status, doc = await _post(c, big)
            assert doc["error"]["message"].endswith(": the store failed: no space left on the data directory's file"
                                                    " system: free space there (or move the data directory to a"
                                                    " larger disk)"), doc
            assert str(tiny_fs) not in doc["error"]["message"], doc
            errors = _errors(caplog)
            assert len(errors) == 1, errors
            assert "no space left on the data directory's file system" in errors[0], errors
            status, doc = await c.json("GET", "/readyz")
            assert_error(status, doc, 503, "UNAVAILABLE")
            assert "no space left" in doc["error"]["message"], doc
            # Not ready, but alive: it recovers by itself (no restart needed).
            assert await c.json("GET", "/healthz") == (200, {"status": "ok"})
            filler.unlink()
            assert (await _post(c, big))[0] == 201
            assert await c.json("GET", "/readyz") == (200, {"status": "ready"})
            assert any("succeed" in r.getMessage() for r in caplog.records if r.name == "pimcore.net"), caplog.text


async def test_a_store_failure_whose_text_holds_a_path_is_said_by_its_kind_on_the_probes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """/readyz (no API key) said a failed write's raw StoreError when the
    store gave no cause: a failure other than a full disk ("the command log
    could not be written ([Errno 5] Input/output error: '/srv/d/store/log'
    ...)") put the data directory's path in its body.  Said by its kind;
    the operator's log keeps the error whole."""
    caplog.set_level(logging.INFO, logger="pimcore")
    with trio.fail_after(30):
        async with api(tmp_path, durability="log") as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            where = str(tmp_path / "store" / "log")

            def broken(fd: int, data: bytes, offset: int) -> None:
                raise OSError(errno.EIO, os.strerror(errno.EIO), where)

            monkeypatch.setattr(wal, "_pwrite_all", broken)
            assert_error(*await _post(c, "lost"), 503, "STORE_UNAVAILABLE")
            status, doc = await c.json("GET", "/readyz")
            assert_error(status, doc, 503, "UNAVAILABLE")
            assert doc["error"]["message"] == ("store failing writes: a write to the store failed (the broker's log"
                                               " says why)"), doc
            status, doc = await c.json("GET", "/healthz")
            assert_error(status, doc, 503, "UNAVAILABLE")
            assert str(tmp_path) not in str(doc) and "the store writes no more" in doc["error"]["message"], doc
            assert any(where in e for e in _errors(caplog)), caplog.text  # (the operator's log has it whole)


async def test_a_full_map_is_said_in_words_on_the_api_and_readyz(tmp_path: Path) -> None:
    """A new-user pass: an LMDB map at its ceiling (max_map_size) was logged
    in words, but the HTTP API's 503 said only "the store failed" and
    /readyz "a write to the store failed (the broker's log says why)": the
    StoreError had no cause.  Both now say what and what to do."""
    from pimcore.store import LmdbStore

    store = LmdbStore(tmp_path / "store", durability="os", map_size=1 << 20, max_map_size=1 << 21)
    with trio.fail_after(60):
        async with api(tmp_path, store=store) as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            big = "x" * 60_000
            for _ in range(200):
                status, doc = await _post(c, big)
                if status != 201:
                    break
            assert_error(status, doc, 503, "STORE_UNAVAILABLE")
            full = ("the store failed: the store's map is full (its ceiling, max_map_size): open the store with a"
                    " larger max_map_size, or purge old messages (retention) to make room")
            assert doc["error"]["message"] == "post to 'team' not stored: " + full, doc
            status, doc = await c.json("GET", "/readyz")
            assert_error(status, doc, 503, "UNAVAILABLE")
            assert "the store's map is full" in doc["error"]["message"], doc
            # The embedding handle says it too (a new user's trial: its
            # StoreError said only "the store failed").
            with pytest.raises(StoreError) as failed:
                await im.post("team", big.encode())
            assert str(failed.value) == "post to 'team' not stored: " + full
            assert failed.value.cause is not None and failed.value.cause.startswith("the store's map is full")
    store.close()


# -- Every write-failure path names a full disk (a new operator's trial,
# -- durability log on an 8 MB tmpfs): LMDB reports a short pwrite as EIO.


class _EioCommitEnv:
    """An LMDB environment whose next write transaction's commit fails as
    LMDB's does on a full disk: ``Error('mdb_txn_commit: Input/output error')``."""

    def __init__(self, env: Any) -> None:
        self._env = env

    def __getattr__(self, name: str) -> Any:
        return getattr(self._env, name)

    def begin(self, *a: Any, **kw: Any) -> Any:
        txn = self._env.begin(*a, **kw)
        import lmdb

        return _FailingCommitTxn(txn, lmdb.Error("mdb_txn_commit: Input/output error")) if kw.get("write") else txn


_FULL_CAUSE = ("no space left on the data directory's file system: free space there (or move the data directory"
               " to a larger disk), then restart the broker")


def test_a_deferred_commit_that_fails_on_a_full_disk_names_it_everywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trial logged "deferred commit failed: a deferred commit failed
    (Error('mdb_txn_commit: Input/output error')); restart the broker ..."
    and /readyz "a write to the store failed (the broker's log says why)":
    the deferred commit did not ask whether the disk was full."""
    from pimcore.store import LmdbStore
    from pimcore.store import lmdb as lmdb_module
    from pimcore.errors import StoreError
    from pimcore.store.base import WriteBatch
    from test_command_log import GROUPS, _fixed_batches

    monkeypatch.setattr(lmdb_module, "_free_bytes", lambda path: 4096, raising=False)  # (the disk: full)
    batches = _fixed_batches(2, 12)
    store = LmdbStore(str(tmp_path / "store"), durability="log")
    try:
        store.defer_commits(True)
        store.commit(WriteBatch(1, GROUPS))
        store.commit_open()
        real, store._env = store._env, _EioCommitEnv(store._env)  # type: ignore[assignment]
        store.commit(WriteBatch(2, tuple(batches[0])))  # acked: in the log
        with pytest.raises(StoreError) as failed:
            store.commit_open()
        store._env = real
        text = str(failed.value)
        assert "deferred commit failed" in text and "no space left on the data directory's file system" in text, text
        assert str(tmp_path) in text and "Input/output error" in text, text  # (the operator's log: whole)
        assert failed.value.cause == _FULL_CAUSE, failed.value.cause
        # Each later write is refused with the cause too (the HTTP API's 503 says it).
        with pytest.raises(StoreError) as again:
            store.commit(WriteBatch(3, tuple(batches[1])))
        assert again.value.cause == _FULL_CAUSE, (str(again.value), again.value.cause)
        assert store.halted() == f"the store writes no more: {_FULL_CAUSE}"
    finally:
        store.close()


async def test_a_broker_whose_deferred_commit_fails_on_a_full_disk_says_so_in_its_log_readyz_and_503(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The trial's broker, in words: the log line, /readyz, /healthz and each
    later 503 name the full disk (they said an I/O error, or "the broker's
    log says why")."""
    from pimcore.store import lmdb as lmdb_module

    caplog.set_level(logging.INFO, logger="pimcore")
    with trio.fail_after(30):
        async with api(tmp_path, durability="log") as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            store = im.server.store
            while store.commit_delay() is not None:  # (the group's deferred commit: done first)
                await trio.sleep(0.01)
            monkeypatch.setattr(lmdb_module, "_free_bytes", lambda path: 0, raising=False)
            monkeypatch.setattr(store, "_env", _EioCommitEnv(store._env))
            assert im.server._deferring
            status, doc = await _post(c, "acked, in the log")
            assert status == 201, doc
            for _ in range(200):  # (the deferred commit runs within 0.2 s)
                if _errors(caplog):
                    break
                await trio.sleep(0.01)
            errors = _errors(caplog)
            assert errors and "no space left on the data directory's file system" in errors[0], errors
            assert str(tmp_path) in errors[0], errors
            assert errors[0].startswith("the store stopped writing: a deferred commit failed: "), errors  # (not said twice)
            status, doc = await _post(c, "refused")
            assert_error(status, doc, 503, "STORE_UNAVAILABLE")
            assert doc["error"]["message"].endswith(f": the store failed: {_FULL_CAUSE}"), doc
            status, doc = await c.json("GET", "/readyz")
            assert_error(status, doc, 503, "UNAVAILABLE")
            assert doc["error"]["message"] == f"store failing writes: {_FULL_CAUSE}", doc
            status, doc = await c.json("GET", "/healthz")
            assert_error(status, doc, 503, "UNAVAILABLE")
            assert doc["error"]["message"] == f"the store writes no more: {_FULL_CAUSE}", doc
            monkeypatch.setattr(store, "_env", store._env._env)


class _EioSyncEnv(_EioCommitEnv):
    """An LMDB environment whose flush fails as on a full disk."""

    def begin(self, *a: Any, **kw: Any) -> Any:
        return self._env.begin(*a, **kw)

    def sync(self, force: bool = False) -> None:
        import lmdb

        raise lmdb.Error("mdb_env_sync: Input/output error")


def test_a_checkpoint_whose_data_file_flush_fails_on_a_full_disk_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint's flush of data.mdb cut short by a full disk stopped the
    store as "LMDB's data file could not be flushed (...)" and /healthz said
    "its command log or data file could not be flushed": no full disk."""
    from pimcore.store import LmdbStore
    from pimcore.store import lmdb as lmdb_module
    from pimcore.errors import StoreError
    from pimcore.store.base import WriteBatch
    from test_command_log import GROUPS, _fixed_batches

    caplog.set_level(logging.INFO, logger="pimcore")
    monkeypatch.setattr(lmdb_module, "_free_bytes", lambda path: 0, raising=False)
    store = LmdbStore(str(tmp_path / "store"), durability="log")
    try:
        store.commit(WriteBatch(1, GROUPS))
        st = store._log
        real, store._env = store._env, _EioSyncEnv(store._env)  # type: ignore[assignment]
        with pytest.raises(Exception):
            st.checkpoint_now()
        store._env = real
        assert st.failed is not None and "no space left on the data directory's file system" in st.failed, st.failed
        st._checkpoint_failed(OSError(errno.EIO, os.strerror(errno.EIO)))  # (a checkpoint's write: its warning)
        warned = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "checkpoint_failed"]
        assert warned and all("no space left on the data directory's file system" in w for w in warned), warned
        with pytest.raises(StoreError) as refused:
            store.commit(WriteBatch(2, tuple(_fixed_batches(1, 5)[0])))
        assert refused.value.cause == _FULL_CAUSE, (str(refused.value), refused.value.cause)
        assert store.halted() == f"the store writes no more: {_FULL_CAUSE}"
    finally:
        store.close()


# -- A full disk at start-up is transient (exit 1: a supervisor restarts the
# -- broker once space is freed), not a configuration error (exit 2: "do not
# -- restart", systemd RestartPreventExitStatus=2 kept it down).


def _log_to_replay(where: Path) -> Path:
    """A data directory whose log store holds batches a start must replay
    (the store's files as a crash leaves them)."""
    from pimcore.store import LmdbStore
    from pimcore.store.base import WriteBatch
    from test_command_log import GROUPS, _crash_copy, _fixed_batches

    store = LmdbStore(str(where / "a"), durability="log")
    try:
        store.commit(WriteBatch(1, GROUPS))
        for i, batch in enumerate(_fixed_batches(3, 8)):
            store.commit(WriteBatch(2 + i, tuple(batch)))
        (where / "d").mkdir()
        _crash_copy(where / "a", where / "d" / "store")
    finally:
        store.close()
    return where / "d"


def _serve(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from pimcore.cli import main

    capsys.readouterr()
    code = main(["serve", "--data-dir", str(data_dir), "--durability", "log", "--listen", "tcp://127.0.0.1:0"])
    return code, capsys.readouterr().err


def test_a_replay_on_a_full_disk_exits_1_saying_what_to_do_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The trial: "replaying record 129 ... failed: ... no space left ...;
    writes are retried by the clients", exit 2."""
    import lmdb

    from pimcore.store import LmdbStore
    from pimcore.store import lmdb as lmdb_module

    data_dir = _log_to_replay(tmp_path)
    monkeypatch.setattr(lmdb_module, "_free_bytes", lambda path: 0, raising=False)
    commit = LmdbStore.commit

    def full(self: LmdbStore, batch: Any) -> Any:
        if self._log is not None and self._log.replaying:  # (LMDB's short pwrite, as on the trial's tmpfs)
            try:
                raise lmdb.Error("mdb_txn_commit: Input/output error")
            except lmdb.Error as exc:
                raise self._lmdb_error(exc) from exc
        return commit(self, batch)

    monkeypatch.setattr(LmdbStore, "commit", full)
    code, err = _serve(data_dir, capsys)
    assert code == 1, err
    assert err.startswith("pimcore serve: replaying record "), err
    assert "no space left on the data directory's file system" in err and "writes are retried" not in err, err
    assert "then start the broker again" in err, err
    monkeypatch.setattr(LmdbStore, "commit", commit)
    code, err = _serve_briefly(data_dir)  # space again: the same start works, nothing lost
    assert code == 0, err


def _serve_briefly(data_dir: Path) -> tuple[int, str]:
    """``pimcore serve`` on ``data_dir`` until it says ready, then SIGTERM."""
    import signal
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "pimcore", "serve", "--data-dir", str(data_dir), "--durability", "log",
                          "--listen", "tcp://127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 30
        for line in p.stdout:
            if line.startswith("ready") or time.monotonic() > deadline:
                break
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


@pytest.mark.parametrize("exc, code", [
    (OSError(errno.EMFILE, os.strerror(errno.EMFILE)), 1),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 1),
    (OSError(errno.EIO, os.strerror(errno.EIO)), 1),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), 2),
    (OSError(errno.EACCES, os.strerror(errno.EACCES)), 2),
    ("lmdb:mdb_env_open: Too many open files", 1),
    ("lmdb:mdb_env_open: Input/output error", 1),
    ("lmdb:mdb_env_open: Permission denied", 2),
])
def test_a_store_that_cannot_open_for_now_exits_1_and_for_good_exits_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exc: Any,
        code: int) -> None:
    """Out of descriptors, out of space or an I/O error at the store's open
    may pass (exit 1); a read-only file system or no permission does not
    until someone changes it (exit 2)."""
    import lmdb

    from pimcore.store import LmdbStore
    from pimcore.errors import StoreError

    def refuse(self: LmdbStore, path: str, *a: Any, **kw: Any) -> None:
        if isinstance(exc, str):
            try:
                raise lmdb.Error(exc[len("lmdb:"):])
            except lmdb.Error as inner:
                raise StoreError(f"cannot open LMDB store at {path!r}: {inner}") from inner
        raise OSError(exc.errno, exc.strerror, path)

    monkeypatch.setattr(LmdbStore, "__init__", refuse)
    got, err = _serve(tmp_path / "d", capsys)
    assert got == code, err
    assert err.startswith("pimcore serve: ") and err.count("\n") == 1, err


def test_a_secret_that_cannot_be_written_for_lack_of_space_exits_1(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    got, err = _serve(tmp_path / "d", capsys)
    monkeypatch.setattr(os, "fsync", real)
    assert got == 1, err
    assert "No space left on device" in err, err


# -- Readiness on a (nearly) full disk: not by the last write alone.


@pytest.mark.parametrize("durability", ["sync", "os", "log"])
async def test_readyz_is_503_while_the_data_directory_has_under_1_mib_free_whatever_the_last_write_did(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str) -> None:
    """The trial (durability sync, the disk at 100 %): after failed large
    writes one small write succeeded and /readyz said 200 -- readiness
    flipped with each write.  The rule: 503 while the data directory's file
    system has under 1 MiB free (when an I/O error is taken as a full disk
    too), whatever the last write did; ready again once there is."""
    from pimcore.store import lmdb as lmdb_module

    free = [64 << 20]
    monkeypatch.setattr(lmdb_module, "_free_bytes", lambda path: free[0], raising=False)
    with trio.fail_after(30):
        async with api(tmp_path, durability=durability) as (im, h, c):
            assert (await call(c, "POST", "/v1/groups", {"conv": "team", "members": ["alice", "bob"]}))[0] == 201
            assert await c.json("GET", "/readyz") == (200, {"status": "ready"})
            free[0] = (1 << 20) - 1
            assert (await _post(c, "small: fits"))[0] == 201  # (a small write may still succeed)
            for _ in range(2):  # (each probe alike: no flip)
                status, doc = await c.json("GET", "/readyz")
                assert_error(status, doc, 503, "UNAVAILABLE")
                assert doc["error"]["message"] == (
                    "store short of space: no space left on the data directory's file system (under 1 MiB free):"
                    " free space there (or move the data directory to a larger disk)"), doc
            assert await c.json("GET", "/healthz") == (200, {"status": "ok"})  # (alive: it mends itself)
            free[0] = 1 << 20
            assert await c.json("GET", "/readyz") == (200, {"status": "ready"})
