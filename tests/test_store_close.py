"""An LMDB store's close() cut short (Ctrl-C at any step) leaves a handle that
writes nothing more, and a second close() completes it: no thread, fd, lock
or gate is left behind, nothing acked is lost (tests/test_command_log.py has
the interrupted wait for a running checkpoint).  The same for an open that is
cut short while it leaves ``log`` durability."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from pimcore.store import LmdbStore, WriteBatch
from pimcore.store import lmdb as lmdb_module
from pimcore.store import wal
from test_command_log import GROUPS, _big_sends, _open_log, _recovered
from test_store_plain import _dump


def _fds_to(path: Path) -> list[int]:
    """This process's file descriptors open on ``path``."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                out.append(int(name))
        except OSError:
            pass
    return out


def _in_thread(fn: Any, timeout: float = 10.0) -> list:
    """Run ``fn`` in a daemon thread; [True] if it returned within
    ``timeout`` seconds, [] if it still runs (a deadlock)."""
    done: list = []

    def run() -> None:
        fn()
        done.append(True)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return done


def test_a_close_interrupted_while_it_waits_for_readers_can_be_completed(tmp_path: Path) -> None:
    # close() enters the gate exclusively, waiting for in-flight reads.  A
    # Ctrl-C during that wait leaves _Gate._exclusive set (it is set before
    # the wait, and the finally that clears it is only reached after the
    # wait): every later read and the second close() wait for ever.
    store = _open_log(tmp_path / "a")
    store.commit(WriteBatch(1, GROUPS))
    want = _dump(store)
    reading, release = threading.Event(), threading.Event()

    def reader() -> None:
        with store._read():  # a read in flight (e.g. a history page being served)
            reading.set()
            release.wait(20)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert reading.wait(10)
    hits: list = []

    class InterruptedCondition(threading.Condition):
        def wait(self, timeout: Any = None) -> bool:
            if not hits:  # Ctrl-C while close() waits for the reader
                hits.append(1)
                raise KeyboardInterrupt
            return super().wait(timeout)

    store._gate._cond = InterruptedCondition(threading.Lock())
    with pytest.raises(KeyboardInterrupt):
        store.close()
    assert hits
    release.set()
    t.join(10)
    assert _in_thread(store.last_server_time, 5), "a read after the interrupted close hangs"
    assert _in_thread(store.close, 5), "the second close() hangs"
    assert _recovered(tmp_path / "a") == want


def test_an_interrupted_close_leaks_no_command_log_fd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CommandLog.close swaps its fd list for [] and then closes them one by
    # one: a Ctrl-C after the first os.close loses log-1's fd for good (the
    # second close() finds an empty list).
    store = _open_log(tmp_path / "a")
    store.commit(WriteBatch(1, GROUPS))
    real_close = wal.CommandLog.close

    def close(self: wal.CommandLog) -> None:
        real = os.close
        hit: list = []

        def close_fd(fd: int) -> None:
            real(fd)
            if not hit:  # the signal handler runs right after the first os.close
                hit.append(fd)
                raise KeyboardInterrupt

        monkeypatch.setattr(os, "close", close_fd)
        try:
            real_close(self)
        finally:
            monkeypatch.setattr(os, "close", real)

    monkeypatch.setattr(wal.CommandLog, "close", close)
    with pytest.raises(KeyboardInterrupt):
        store.close()
    monkeypatch.undo()
    store.close()
    assert _fds_to(tmp_path / "a" / "log" / "log-1") == []


def test_an_interrupted_close_leaks_no_flush_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # stop_flusher() lets go of the flush thread before it asks it to end:
    # a Ctrl-C in between leaves the thread waiting for a job for ever, and
    # the second close() no longer knows it.
    monkeypatch.setattr(lmdb_module._LogState, "overlap_ops", 1)
    store = _open_log(tmp_path / "a")
    store.commit(WriteBatch(1, GROUPS))
    store.commit(WriteBatch(2, _big_sends(3, 10)))  # starts the flush thread
    flusher = store._log._flusher
    assert flusher is not None
    thread = flusher._thread
    hits: list = []

    def stop(self: Any) -> None:
        hits.append(1)
        raise KeyboardInterrupt  # (lands at stop()'s first line)

    monkeypatch.setattr(lmdb_module._Flusher, "stop", stop)
    with pytest.raises(KeyboardInterrupt):
        store.close()
    monkeypatch.undo()
    store.close()
    thread.join(2)
    assert not thread.is_alive(), "the flush thread outlives the completed close()"


@pytest.mark.xfail(strict=True, reason="known gap: an fd is forgotten before it is closed, so that a second close() "
                   "can never close a number the process has reused meanwhile; a Ctrl-C between the two keeps it")
def test_an_interrupted_close_lets_go_of_log_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # _release_broker_lock swaps each fd for None before closing it: a Ctrl-C
    # between the swap of log.lock's fd and its os.close keeps the exclusive
    # flock on log.lock for the life of the process (a new open of the store
    # here waits 10 s and fails; every maintenance write is refused).
    store = _open_log(tmp_path / "a")
    store.commit(WriteBatch(1, GROUPS))
    log_lock_fd = store._log_lock_fd
    real = os.close
    hit: list = []

    def close_fd(fd: int) -> None:
        if fd == log_lock_fd and not hit:
            hit.append(fd)
            raise KeyboardInterrupt  # (after the swap, before the close)
        real(fd)

    monkeypatch.setattr(os, "close", close_fd)
    with pytest.raises(KeyboardInterrupt):
        store.close()
    monkeypatch.undo()
    assert hit
    store.close()
    fd = os.open(tmp_path / "a" / "log.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: still held
    finally:
        os.close(fd)


def test_an_os_store_whose_close_was_interrupted_in_its_final_sync_is_closed_by_the_second(
    tmp_path: Path,
) -> None:
    # In durability "os" close() sets _env = None, then syncs and drops the
    # osrun mark, then env.close().  A Ctrl-C during that sync (an fsync of
    # the whole data file: the longest step of close) skips env.close(), and
    # the second close() sees _env None and returns: LMDB stays open (its
    # fds, its map, its lock.mdb locks) with the broker lock already let go.
    store = LmdbStore(str(tmp_path / "a"), durability="os")
    store.commit(WriteBatch(1, GROUPS))
    calls: list = []

    class Env:  # LMDB's Environment is a C type: wrap it to interrupt its sync
        def __init__(self, env: Any) -> None:
            self.env = env

        def __getattr__(self, name: str) -> Any:
            return getattr(self.env, name)

        def sync(self, force: bool = False) -> None:
            self.env.sync(force)
            if not calls:
                calls.append(1)
                raise KeyboardInterrupt  # (answered right after the fsync returns)

    store._env = Env(store._env)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt) as interrupted:  # (kept, as in an `except KeyboardInterrupt:` block)
        store.close()
    store.close()  # (completes the close)
    assert _fds_to(tmp_path / "a" / "data.mdb") == [], "LMDB is still open after the second close()"
    del interrupted


def test_an_open_interrupted_while_it_leaves_log_durability_leaks_no_command_log_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # _end_log (a broker with another durability recovering a log store) lets
    # go of the command log (self._log = None) before it waits for the
    # checkpoint and syncs LMDB -- the pattern b6c6f4a took out of close():
    # a Ctrl-C there, and the close() that __init__ runs on the way out no
    # longer knows the log, whose two fds stay open.
    store = _open_log(tmp_path / "a")
    store.commit(WriteBatch(1, GROUPS))
    want = _dump(store)
    store.close()
    real_join = lmdb_module._LogState.join
    real_end = LmdbStore._end_log
    ending: list = []
    hits: list = []

    def end_log(self: LmdbStore, *args: Any) -> None:
        ending.append(1)
        real_end(self, *args)

    def join(self: Any) -> None:
        if ending and not hits:  # (in _end_log)
            hits.append(1)
            raise KeyboardInterrupt
        real_join(self)

    monkeypatch.setattr(LmdbStore, "_end_log", end_log)
    monkeypatch.setattr(lmdb_module._LogState, "join", join)
    with pytest.raises(KeyboardInterrupt):
        LmdbStore(str(tmp_path / "a"), durability="sync")
    monkeypatch.undo()
    assert hits
    leaked = _fds_to(tmp_path / "a" / "log" / "log-0") + _fds_to(tmp_path / "a" / "log" / "log-1")
    again = LmdbStore(str(tmp_path / "a"), durability="sync")  # (recovers: nothing lost)
    try:
        assert _dump(again) == want
    finally:
        again.close()
    assert leaked == []
