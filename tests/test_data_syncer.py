"""DataSyncer (pimcore/_pure/sync.py, pimcore/_fastpath_sync.pxi): the
command log's flush in a worker thread.  Each test runs on both backends;
the differential test drives both with the same calls and compares what
each returned or raised."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture
def data_file(tmp_path: Path) -> Any:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield fd
    finally:
        os.close(fd)


def test_a_flush_is_waited_for_and_a_repeated_wait_returns_its_outcome(backend: ModuleType, data_file: int) -> None:
    syncer = backend.DataSyncer()
    try:
        assert syncer.thread.name == "pimcore-log-sync" and syncer.thread.daemon and syncer.thread.is_alive()
        assert syncer.wait() is None  # none started: at once
        os.write(data_file, b"record")
        syncer.start(data_file)
        assert syncer.wait() is None
        assert syncer.wait() is None  # (again: the same outcome)
        syncer.start(data_file)  # the next one
        syncer.wait()
    finally:
        syncer.stop()
    assert not syncer.thread.is_alive()


def test_a_failed_flush_raises_its_errno_at_every_wait_until_the_next_start(backend: ModuleType, tmp_path: Path,
                                                                            data_file: int) -> None:
    syncer = backend.DataSyncer()
    try:
        fd = os.open(tmp_path / "g", os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)  # (a number no file has now)
        syncer.start(fd)
        for _ in range(2):
            with pytest.raises(OSError) as info:
                syncer.wait()
            assert info.value.errno == errno.EBADF and info.value.strerror == os.strerror(errno.EBADF)
        syncer.start(data_file)
        assert syncer.wait() is None
    finally:
        syncer.stop()


def test_one_flush_at_a_time_and_none_after_stop(backend: ModuleType, data_file: int) -> None:
    syncer = backend.DataSyncer()
    syncer.start(data_file)
    with pytest.raises(RuntimeError, match="not waited for"):
        syncer.start(data_file)
    syncer.wait()
    syncer.start(data_file)  # (its flush may have ended: a wait() is still owed)
    import time
    time.sleep(0.05)
    with pytest.raises(RuntimeError, match="not waited for"):
        syncer.start(data_file)
    syncer.wait()
    syncer.stop()
    syncer.stop()  # (harmless again)
    with pytest.raises(RuntimeError, match="stopped"):
        syncer.start(data_file)
    assert syncer.wait() is None


def test_stop_waits_for_the_flush_in_flight(backend: ModuleType, data_file: int) -> None:
    syncer = backend.DataSyncer()
    syncer.start(data_file)
    syncer.stop()
    assert not syncer.thread.is_alive()
    assert syncer.wait() is None  # it ran


@pytest.mark.parametrize(("fd", "error"), [("3", TypeError), (3.0, TypeError), (None, TypeError), (-1, ValueError),
                                           (1 << 31, ValueError), (1 << 70, ValueError)])
def test_bad_file_descriptors(backend: ModuleType, fd: Any, error: type) -> None:
    syncer = backend.DataSyncer()
    try:
        with pytest.raises(error):
            syncer.start(fd)
        assert syncer.wait() is None  # nothing was started
    finally:
        syncer.stop()


def test_the_compiled_flush_ends_while_the_caller_holds_the_gil(both: tuple[ModuleType, ModuleType],
                                                              data_file: int) -> None:
    # What the store relies on (pimcore.store.lmdb._LogState.overlap_ops):
    # the compiled worker flushes while this thread keeps the GIL and never
    # lets go of it (no switch for 100 s; no call below releases it).  A
    # Python worker needs the GIL to return from its flush: the pure twin
    # says so (gil_free False), and its flush would end only at wait().
    import sys
    import time

    cy, pure = both
    assert cy.DataSyncer.gil_free and not pure.DataSyncer.gil_free
    syncer = cy.DataSyncer()
    old = sys.getswitchinterval()
    try:
        os.write(data_file, b"x" * 4096)
        sys.setswitchinterval(100.0)
        syncer.start(data_file)
        give_up = time.monotonic() + 30
        while syncer.busy and time.monotonic() < give_up:
            pass
        ended = not syncer.busy
    finally:
        sys.setswitchinterval(old)
        syncer.wait()
        syncer.stop()
    assert ended


def test_busy_is_true_from_start_until_the_flush_ended(backend: ModuleType, data_file: int) -> None:
    syncer = backend.DataSyncer()
    try:
        assert not syncer.busy
        syncer.start(data_file)
        syncer.wait()
        assert not syncer.busy
    finally:
        syncer.stop()


_CALLS = st.lists(st.sampled_from(["start", "start_bad", "start_closed", "wait", "stop"]), max_size=12)


def _drive(mod: ModuleType, calls: list[str], good: int, closed: int) -> list[Any]:
    syncer = mod.DataSyncer()
    out: list[Any] = []
    try:
        for call in calls:
            try:
                if call == "start":
                    out.append(("ok", syncer.start(good)))
                elif call == "start_bad":
                    out.append(("ok", syncer.start(-5)))
                elif call == "start_closed":
                    out.append(("ok", syncer.start(closed)))
                elif call == "wait":
                    out.append(("ok", syncer.wait()))
                else:
                    out.append(("ok", syncer.stop()))
            except Exception as exc:  # noqa: BLE001 - compared
                out.append((type(exc).__name__, getattr(exc, "errno", None), str(exc)))
    finally:
        syncer.stop()
    return out


@settings(max_examples=60, deadline=None)
@given(calls=_CALLS)
def test_differential(calls: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    from pimcore import _backend

    try:
        cy = _backend.load("cython")
    except ImportError:
        if os.environ.get("PIMCORE_BACKEND") == "cython":
            raise
        pytest.skip("compiled backend not built")
    pure = _backend.load("pure")
    path = tmp_path_factory.mktemp("sync") / "f"
    good = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    closed = os.open(path, os.O_RDONLY)
    os.close(closed)
    try:
        assert _drive(cy, calls, good, closed) == _drive(pure, calls, good, closed)
    finally:
        os.close(good)


def _interrupt_after_c_call(number: int, body: Any) -> bool:
    """Run ``body()`` in this thread with a KeyboardInterrupt raised right
    after its ``number``-th call of a C function (where CPython answers a
    pending SIGINT: the C call has done its work, its result is dropped).
    True if the interrupt was raised."""
    import sys

    count = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return":
            count[0] += 1
            if count[0] == number:
                raise KeyboardInterrupt

    sys.setprofile(profile)
    try:
        body()
    except KeyboardInterrupt:
        return True
    finally:
        sys.setprofile(None)
    return False


def _ends_soon(fn: Any) -> bool:
    """Does ``fn()`` return (or raise) within 5 s?  (In another thread:
    a lock the interrupted thread left held blocks any thread.)"""
    thread = threading.Thread(target=lambda: fn(), daemon=True)
    thread.start()
    thread.join(5)
    return not thread.is_alive()


@pytest.mark.parametrize("where", ["start", "wait"])
def test_an_interrupt_after_any_c_call_in_start_or_wait_leaves_the_syncer_usable(
    backend: ModuleType, data_file: int, where: str
) -> None:
    # Ctrl-C lands right after any C call the caller's thread makes in
    # start() or wait() (the store's writer repeats wait() after an
    # interrupt: pimcore.store.lmdb._LogState.appended).  Found by a fuzzer
    # sending real SIGINTs: the pure twin's ``with self._cond`` --
    # threading.Condition.__enter__, Python code -- was interrupted right
    # after it took the lock, which then stayed taken; the next wait() and
    # stop() (the store's close) hung for ever.
    for number in range(1, 80):
        syncer = backend.DataSyncer()
        try:
            if where == "start":
                hit = _interrupt_after_c_call(number, lambda: syncer.start(data_file))
            else:
                syncer.start(data_file)
                hit = _interrupt_after_c_call(number, syncer.wait)
            # Whatever the interrupt cut short, a wait() ends (the flush, if
            # one was started, runs to its end), and so does stop().
            assert _ends_soon(syncer.wait), (where, number)
            assert _ends_soon(syncer.stop), (where, number)
            assert not syncer.thread.is_alive()
        finally:
            if syncer.thread.is_alive():
                _ends_soon(syncer.stop)  # (a failed case: do not leave it running)
        if not hit:
            break  # (past the last C call: every one was tried)
    else:
        pytest.fail("more C calls than tried")


def test_an_interrupt_in_the_constructor_right_after_the_worker_started_leaves_no_worker(
    backend: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C lands in DataSyncer() just after the worker thread started
    # (in Thread.start's own wait for it, or right after it returned): the
    # constructor raises, so nobody holds the object to stop() it -- its
    # worker must not wait for ever (it held the object, and a thread).
    real = threading.Thread.start
    started: list[threading.Thread] = []

    def start(self: threading.Thread) -> None:
        real(self)
        if self.name == "pimcore-log-sync":
            started.append(self)
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        backend.DataSyncer()
    monkeypatch.undo()
    assert len(started) == 1  # (the interrupt came after the worker started)
    started[0].join(5)
    assert not started[0].is_alive()
    assert started[0] not in threading.enumerate()
    syncer = backend.DataSyncer()  # (the next one works as ever)
    syncer.stop()
    assert not syncer.thread.is_alive()


def _in_a_forked_child(check: Any) -> int:
    """Run ``check()`` in a child forked from this process; its exit code
    (0: it returned, 1: it raised; -1 for a child that had not ended after
    10 s, then killed)."""
    import time

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            check()
            code = 0
        except BaseException:  # noqa: BLE001 - reported by the exit code
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    give_up = time.monotonic() + 10
    while time.monotonic() < give_up:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


@pytest.mark.parametrize("state", ["idle", "started"])
def test_a_syncer_used_after_fork_raises_instead_of_hanging(backend: ModuleType, data_file: int, state: str) -> None:
    # An embedding host may fork (multiprocessing) with a store open: in the
    # child the worker thread does not exist (its mutex may even be held),
    # so a flush started there never ended, and wait() blocked for ever.
    syncer = backend.DataSyncer()
    try:
        syncer.start(data_file)
        syncer.wait()  # (one flush in the parent: it works there)
        if state == "started":
            syncer.start(data_file)

        def child() -> None:
            said = []
            for call in (lambda: syncer.start(data_file), syncer.wait, lambda: syncer.busy):
                try:
                    call()  # (a hang here fails the test: the parent kills the child)
                except RuntimeError as exc:
                    said.append(str(exc))
            syncer.stop()  # (nothing to stop here: harmless, as at the child's exit)
            assert len(said) == 3 and all("used after fork()" in s for s in said), said

        assert _in_a_forked_child(child) == 0
        if state == "started":
            syncer.wait()
        syncer.start(data_file)  # (the parent's syncer goes on)
        syncer.wait()
    finally:
        syncer.stop()


def _drop_and_join(box: list[Any]) -> threading.Thread:
    """Drop the last reference to ``box``'s syncer (and collect); its worker
    thread, joined for up to 5 s."""
    import gc

    thread = box[0].thread
    box.clear()
    gc.collect()
    thread.join(5)
    return thread


def test_a_syncer_dropped_without_stop_ends_its_worker(backend: ModuleType, data_file: int) -> None:
    # Its worker ran a bound method of the syncer, so it kept the syncer
    # alive and waited for ever: one idle thread leaked per dropped syncer.
    box = [backend.DataSyncer()]
    os.write(data_file, b"record")
    box[0].start(data_file)
    box[0].wait()
    thread = _drop_and_join(box)
    assert not thread.is_alive()


def test_a_syncer_dropped_with_a_flush_in_flight_ends_its_worker_after_the_flush(backend: ModuleType,
                                                                                  data_file: int) -> None:
    box = [backend.DataSyncer()]
    os.write(data_file, b"x" * 65536)
    box[0].start(data_file)  # (no wait(): dropped while it may still run)
    thread = _drop_and_join(box)
    assert not thread.is_alive()


def test_a_syncer_dropped_in_a_forked_child_does_not_hang_there(backend: ModuleType, data_file: int) -> None:
    # In the child the worker does not exist and its mutex may be held: the
    # syncer's finalization there must not take it (nor wait for anything).
    box = [backend.DataSyncer()]
    try:
        box[0].start(data_file)
        box[0].wait()

        def child() -> None:
            import gc

            box.clear()
            gc.collect()

        assert _in_a_forked_child(child) == 0
        box[0].start(data_file)  # (the parent's syncer goes on)
        box[0].wait()
    finally:
        box[0].stop()
