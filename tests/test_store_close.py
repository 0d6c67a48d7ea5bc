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


def _interrupt_at_line(code: Any, lineno: int) -> list:
    """A trace function (for sys.settrace) that raises KeyboardInterrupt
    once, just before line ``lineno`` of ``code`` runs, as a Ctrl-C landing
    there would; the list it returns records the hit."""
    hit: list = []

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == lineno and not hit:
            hit.append(lineno)
            raise KeyboardInterrupt  # (tracing stops: CPython drops a trace function that raises)
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    tracer.hit = hit  # type: ignore[attr-defined]
    return tracer  # type: ignore[return-value]


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_close_interrupted_anywhere_in_letting_go_of_the_locks_is_completed_by_the_second(tmp_path: Path) -> None:
    # A Ctrl-C on any line of _release_broker_lock: the second close() must
    # let go of broker.lock and log.lock all the same.  (It used to swap each
    # fd for None before closing it: a Ctrl-C between the two kept the
    # exclusive flock on log.lock for the life of the process -- a new open
    # of the store here waited 10 s and failed.)
    import inspect
    import sys

    code = LmdbStore._release_broker_lock.__code__
    lines, first = inspect.getsourcelines(LmdbStore._release_broker_lock)
    body = [first + i for i, text in enumerate(lines) if i > 0 and text.strip() and not text.strip().startswith(("#", '"'))]
    interrupted = []
    for n, lineno in enumerate(body):
        path = tmp_path / str(n)
        store = _open_log(path)
        store.commit(WriteBatch(1, GROUPS))
        tracer = _interrupt_at_line(code, lineno)
        sys.settrace(tracer)
        try:
            store.close()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        interrupted += tracer.hit  # type: ignore[attr-defined]
        store.close()
        assert _lock_is_free(path / "broker.lock"), f"broker.lock still held after a Ctrl-C at line {lineno}"
        assert _lock_is_free(path / "log.lock"), f"log.lock still held after a Ctrl-C at line {lineno}"
    assert len(interrupted) >= 2, interrupted  # (the test interrupted something)


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


def test_a_store_dropped_without_close_leaves_no_flush_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (Its worker thread holds the DataSyncer, not the store: the store was
    # collected and the thread lived on, idle, for the process's life.)
    import gc
    import weakref

    monkeypatch.setattr(lmdb_module._LogState, "overlap_ops", 1)
    store = _open_log(tmp_path / "a")
    store.commit(WriteBatch(1, GROUPS))
    store.commit(WriteBatch(2, _big_sends(3, 10)))  # (overlapped: starts the worker)
    thread = store._log._flusher._thread
    assert thread.is_alive()
    gone = weakref.ref(store)
    del store
    gc.collect()
    assert gone() is None
    thread.join(5)
    assert not thread.is_alive()
