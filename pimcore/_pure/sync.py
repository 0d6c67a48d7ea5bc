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
* A syncer dropped without ``stop()`` (its last reference gone) ends its
  worker after the flush in flight too, without joining it: the worker
  does not keep the syncer alive.

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
import queue
import threading
import weakref
from typing import Optional

__all__ = ["DataSyncer"]


_FORKED = ("the data syncer is used after fork(): its worker thread runs in the parent "
           "process only (make a new one in the child)")


def _check_fd(fd: object) -> int:
    fd = operator.index(fd)  # type: ignore[arg-type]  # (TypeError for anything but an int)
    if not 0 <= fd <= 0x7FFFFFFF:
        raise ValueError(f"fd must be a file descriptor (0..2**31-1), not {fd}")
    return fd


class _State:
    """What the worker needs, shared by the DataSyncer and its worker: the
    worker runs ``serve`` of this and holds the syncer only by ``owner``, a
    weak reference, so the syncer can be dropped; its death wakes the worker
    (``owner``'s callback), which then ends after the flush in flight."""

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        # A flush posted, a stop, or the owner's death: an item in the
        # queue.  (A SimpleQueue, not a lock: its ``put`` takes any one
        # argument -- the weak reference calls it with itself -- and never
        # fails.)  Each item wakes the worker once; it then reads the state.
        self.wake: "queue.SimpleQueue[object]" = queue.SimpleQueue()
        self.done = _thread.allocate_lock()  # released: a flush ended
        self.done.acquire()
        self.fd = -1
        self.err = 0
        self.posted = 0
        self.finished = 0
        self.stopping = False
        self.unwaited = False  # started, and wait() not called since
        self.owner: "Optional[weakref.ref[DataSyncer]]" = None

    def serve(self) -> None:
        # (The worker's thread: no KeyboardInterrupt reaches it.)
        while True:
            with self.lock:
                idle = self.posted == self.finished
                if idle and (self.stopping or self.owner is None or self.owner() is None):
                    return  # stopping (or dropped), and nothing posted: end
                fd, posted = self.fd, self.posted
            if idle:
                self.wake.get()  # (then look again)
                continue
            err = 0
            try:
                os.fdatasync(fd)  # (retries EINTR itself: PEP 475)
            except OSError as exc:
                err = exc.errno or 0
            with self.lock:
                self.err = err
                self.finished = posted
            _release(self.done)


def _release(lock: "_thread.LockType") -> None:
    try:
        lock.release()
    except RuntimeError:  # (released already: the wake-up is pending)
        pass


class DataSyncer:
    """See the module docstring.

    Interrupts: the caller's thread only ever takes the state's ``lock``
    with ``with`` on the C lock itself (taken and entered with no Python
    code between, so a KeyboardInterrupt can't land after the acquire and
    before the block that releases it -- as it can in
    ``threading.Condition.__enter__``, which then left the lock taken for
    ever) and blocks on ``done`` only outside it.  ``done`` is a one-slot
    wake-up (a released ``_thread`` lock; released again, nothing changes)
    and ``wake`` a queue of wake-ups: the state is in the attributes, read
    under ``lock`` after every wake-up, so a wake-up an interrupt took and
    dropped loses nothing, and ``wait()`` wakes the worker again before
    blocking (a ``start()`` cut short after it posted).

    Dropped without ``stop()``: the worker holds the state (``_State``),
    not this, and ends after the flush in flight.  What tells it is the
    callback of a weak reference to this, ``wake.put`` itself -- C, run
    with no Python frame -- rather than ``__del__`` or a
    ``weakref.finalize`` callback: both run Python code, where a
    KeyboardInterrupt can land before they did anything (at the function's
    entry) and is then dropped ("Exception ignored in ..."), leaving the
    worker waiting for ever.  The weak reference is made before the worker
    starts: a Ctrl-C before it leaves no worker to stop.  No join there: a
    finalizer must not block.
    """

    gil_free = False

    def __init__(self) -> None:
        self._pid = os.getpid()  # the process that made it (its worker's)
        st = self._state = _State()
        st.owner = weakref.ref(self, st.wake.put)
        thread = threading.Thread(target=st.serve, name="pimcore-log-sync", daemon=True)
        self.thread = thread
        try:
            thread.start()  # (RuntimeError: "can't start new thread")
        except BaseException:
            # A Ctrl-C in Thread.start (its wait for the thread to run) may
            # come after the worker started: this object is then never
            # returned, so nobody could stop() it (and a traceback holding
            # this frame may keep it alive a long time).  It is told to end
            # at once, with no call before the flag is set (the interpreter
            # answers a signal at calls and backward jumps, not at an
            # attribute store) and a C call to wake it.
            st.stopping = True
            st.wake.put(None)
            raise

    def start(self, fd: int) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(_FORKED)
        fd = _check_fd(fd)
        st = self._state
        with st.lock:
            if st.stopping:
                raise RuntimeError("the data syncer is stopped")
            if st.unwaited:
                raise RuntimeError("a flush was started and not waited for: wait() for it first")
            st.unwaited = True
            st.fd = fd
            st.err = 0
            st.posted += 1
        st.wake.put(None)

    def wait(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(_FORKED)
        st = self._state
        while True:
            with st.lock:
                if st.finished == st.posted:
                    err = st.err
                    st.unwaited = False
                    break
            st.wake.put(None)  # (again: a start() cut short before it woke the worker)
            st.done.acquire()
        if err:
            raise OSError(err, os.strerror(err))

    @property
    def busy(self) -> bool:
        if os.getpid() != self._pid:
            raise RuntimeError(_FORKED)
        st = self._state
        with st.lock:
            return st.posted != st.finished

    def stop(self) -> None:
        if os.getpid() != self._pid:
            return  # (forked: no worker here to stop, and the lock may be held for ever)
        st = self._state
        with st.lock:
            st.stopping = True
        st.wake.put(None)
        thread = self.thread
        if thread is not threading.current_thread():
            thread.join()
