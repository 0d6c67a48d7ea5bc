"""A file's ``fdatasync`` in a worker thread: the pure-Python twin of
``pimcore/_fastpath_sync.pxi``.

``DataSyncer()`` starts its worker thread (RuntimeError if it cannot; the
thread is ``.thread``, named ``pimcore-log-sync``, a daemon).  One flush at
a time:

* ``start(fd)`` hands ``fdatasync(fd)`` to the worker and returns at once.
  TypeError unless ``fd`` is an int, ValueError outside 0..2**31-1,
  RuntimeError if the last one was not waited for (one ``wait()`` per
  ``start()``, however fast the flush) or after ``stop()``.
* ``wait()`` blocks until the last started flush ended, then returns None
  or raises the OSError it failed with (errno and strerror as
  ``os.fdatasync`` gives them; EINTR is retried).  Called again, or with
  none started, it returns (or raises) the same outcome at once: a wait an
  interrupt cut short can be repeated and loses nothing.
* ``busy`` is True while a started flush has not ended (``wait()`` would
  block).
* ``stop()`` ends the worker after the flush in flight and joins it;
  harmless again.

After ``os.fork()`` the child has no worker thread (and a lock the worker
held at the fork stays held there): in the child ``start()``, ``wait()``
and ``busy`` raise RuntimeError ("... used after fork() ...") rather than
block for ever, and ``stop()`` does nothing (say, at the child's exit).

``gil_free`` says whether the worker runs without the GIL.  Here it is
False: a Python thread needs the GIL to wake from its wait and to return
from the flush, so a caller holding the GIL (an LMDB apply in Python)
delays both, and overlapping a small flush with it gains nothing
(BENCHMARKS.md, "What is left at 1 x 1").  The compiled twin waits, flushes
and signals in C without the GIL (True).  Its ``wait()`` also releases the
GIL and cannot be interrupted; this one's can (KeyboardInterrupt), and is
repeated as above.

Used by :mod:`pimcore.store.lmdb` to flush a batch's command log record
while LMDB applies the batch.
"""

from __future__ import annotations

import _thread
import operator
import os
import threading

__all__ = ["DataSyncer"]


_FORKED = ("the data syncer is used after fork(): its worker thread runs in the parent "
           "process only (make a new one in the child)")


def _check_fd(fd: object) -> int:
    fd = operator.index(fd)  # type: ignore[arg-type]  # (TypeError for anything but an int)
    if not 0 <= fd <= 0x7FFFFFFF:
        raise ValueError(f"fd must be a file descriptor (0..2**31-1), not {fd}")
    return fd


class DataSyncer:
    """See the module docstring.

    Interrupts: the caller's thread only ever takes ``_lock`` with ``with``
    on the C lock itself (taken and entered with no Python code between, so
    a KeyboardInterrupt can't land after the acquire and before the block
    that releases it -- as it can in ``threading.Condition.__enter__``,
    which then left the lock taken for ever) and blocks on ``_done`` only
    outside it.  ``_wake`` and ``_done`` are one-slot wake-ups (a released
    ``_thread`` lock; released again, nothing changes): the state is in the
    attributes, read under ``_lock`` after every wake-up, so a wake-up an
    interrupt took and dropped loses nothing, and ``wait()`` wakes the
    worker again before blocking (a ``start()`` cut short after it posted).
    """

    gil_free = False

    def __init__(self) -> None:
        self._pid = os.getpid()  # the process that made it (its worker's)
        self._lock = _thread.allocate_lock()
        self._wake = _thread.allocate_lock()  # released: a flush posted, or stop
        self._wake.acquire()
        self._done = _thread.allocate_lock()  # released: a flush ended
        self._done.acquire()
        self._fd = -1
        self._err = 0
        self._posted = 0
        self._finished = 0
        self._stopping = False
        self._unwaited = False  # started, and wait() not called since
        thread = threading.Thread(target=self._serve, name="pimcore-log-sync", daemon=True)
        self.thread = thread
        try:
            thread.start()  # (RuntimeError: "can't start new thread")
        except BaseException:
            # A Ctrl-C in Thread.start (its wait for the thread to run) may
            # come after the worker started: this object is then never
            # returned, so nobody could stop() it, and the worker -- holding
            # a reference to it -- waited for ever.  It is told to end
            # instead, with no call before the flag is set (the interpreter
            # answers a signal at calls and backward jumps, not at an
            # attribute store) and a C call to wake it (``_wake`` is taken:
            # nothing released it yet).
            self._stopping = True
            self._wake.release()
            raise

    @staticmethod
    def _release(lock: "_thread.LockType") -> None:
        try:
            lock.release()
        except RuntimeError:  # (released already: the wake-up is pending)
            pass

    def _serve(self) -> None:
        # (The worker's thread: no KeyboardInterrupt reaches it.)
        while True:
            with self._lock:
                idle = self._posted == self._finished
                if idle and self._stopping:
                    return  # stopping, and nothing posted: end
                fd, posted = self._fd, self._posted
            if idle:
                self._wake.acquire()  # (then look again)
                continue
            err = 0
            try:
                os.fdatasync(fd)  # (retries EINTR itself: PEP 475)
            except OSError as exc:
                err = exc.errno or 0
            with self._lock:
                self._err = err
                self._finished = posted
            self._release(self._done)

    def start(self, fd: int) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(_FORKED)
        fd = _check_fd(fd)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the data syncer is stopped")
            if self._unwaited:
                raise RuntimeError("a flush was started and not waited for: wait() for it first")
            self._unwaited = True
            self._fd = fd
            self._err = 0
            self._posted += 1
        self._release(self._wake)

    def wait(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(_FORKED)
        while True:
            with self._lock:
                if self._finished == self._posted:
                    err = self._err
                    self._unwaited = False
                    break
            self._release(self._wake)  # (again: a start() cut short before it woke the worker)
            self._done.acquire()
        if err:
            raise OSError(err, os.strerror(err))

    @property
    def busy(self) -> bool:
        if os.getpid() != self._pid:
            raise RuntimeError(_FORKED)
        with self._lock:
            return self._posted != self._finished

    def stop(self) -> None:
        if os.getpid() != self._pid:
            return  # (forked: no worker here to stop, and the lock may be held for ever)
        with self._lock:
            self._stopping = True
        self._release(self._wake)
        thread = self.thread
        if thread is not threading.current_thread():
            thread.join()
