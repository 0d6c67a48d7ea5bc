# The command log's flush off the writer's thread, without the GIL: the
# compiled twin of pimcore/_pure/sync.py (read its docstring for the
# contract).
#
# Why: with ``durability log`` each batch's record is written and
# fdatasync'd before LMDB commits it, and the flush (100-200 µs on this
# project's disks) can overlap the batch's apply into LMDB.  A Python worker
# thread needs the GIL to wake up and to return from the flush, which the
# writer holds through the apply: the overlap then saved nothing at 1 x 1
# (BENCHMARKS.md, "What is left at 1 x 1").  Here the worker is a thread
# that never holds the GIL after it started: it waits on a pthread
# condition variable, calls fdatasync(2) and signals, all in C; the writer
# waits for it with the GIL released.

cimport cython
from posix.types cimport pid_t
from posix.unistd cimport fdatasync as _ds_fdatasync, getpid as _ds_getpid
from libc.errno cimport errno as _ds_errno, EINTR as _DS_EINTR

import operator as _ds_operator
import os as _ds_os
import threading as _ds_threading


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, const void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_cond_init(pthread_cond_t*, const void*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_broadcast(pthread_cond_t*)


_DS_FORKED = ("the data syncer is used after fork(): its worker thread runs in the parent "
              "process only (make a new one in the child)")


def _ds_check_fd(fd):
    fd = _ds_operator.index(fd)  # (TypeError for anything but an int)
    if not 0 <= fd <= 0x7FFFFFFF:
        raise ValueError(f"fd must be a file descriptor (0..2**31-1), not {fd}")
    return fd



cdef class _SyncState:
    """What the worker needs, shared by the DataSyncer and its worker: the
    worker runs ``_serve`` of this, never holding the DataSyncer, which so
    can be dropped (its __dealloc__ then tells the worker to end)."""

    cdef pthread_mutex_t mu
    cdef pthread_cond_t wake  # a flush posted, or stop
    cdef pthread_cond_t done  # the posted flush ended
    cdef bint ready
    cdef int fd
    cdef int err
    cdef unsigned long long posted
    cdef unsigned long long finished
    cdef bint stopping
    cdef bint unwaited  # started, and wait() not called since
    cdef pid_t pid  # the process that made it (its worker's)

    def __cinit__(self):
        pthread_mutex_init(&self.mu, NULL)
        pthread_cond_init(&self.wake, NULL)
        pthread_cond_init(&self.done, NULL)
        self.ready = True
        self.pid = _ds_getpid()

    def __dealloc__(self):
        # (The worker holds a reference to self while it runs: it has ended.
        # In a forked child it never ran there, and the mutex or a condition
        # may be left taken or waited on by the parent's worker: not
        # destroyed then -- glibc's pthread_cond_destroy waits for waiters.)
        if self.ready and _ds_getpid() == self.pid:
            pthread_cond_destroy(&self.done)
            pthread_cond_destroy(&self.wake)
            pthread_mutex_destroy(&self.mu)

    cdef void tell_stop(self) noexcept nogil:
        pthread_mutex_lock(&self.mu)
        self.stopping = True
        pthread_cond_broadcast(&self.wake)
        pthread_mutex_unlock(&self.mu)

    def _serve(self):
        cdef int fd, rc, err
        with nogil:
            pthread_mutex_lock(&self.mu)
            while True:
                while not self.stopping and self.posted == self.finished:
                    pthread_cond_wait(&self.wake, &self.mu)
                if self.posted == self.finished:
                    break  # stopping, and nothing posted: end
                fd = self.fd
                pthread_mutex_unlock(&self.mu)
                rc = _ds_fdatasync(fd)
                while rc != 0 and _ds_errno == _DS_EINTR:
                    rc = _ds_fdatasync(fd)
                err = _ds_errno if rc != 0 else 0
                pthread_mutex_lock(&self.mu)
                self.err = err
                self.finished = self.posted
                pthread_cond_broadcast(&self.done)
            pthread_mutex_unlock(&self.mu)


# (Not cleared by the cycle collector: __dealloc__ needs ``_st`` to tell the
# worker to end, and a syncer in a reference cycle -- a subclass's instance
# holding itself -- would otherwise lose it before.)
@cython.no_gc_clear
cdef class DataSyncer:
    """See pimcore/_pure/sync.py."""

    #: The worker runs without the GIL: a flush overlaps the caller's Python.
    gil_free = True

    cdef _SyncState _st
    cdef pid_t _pid  # the process that made it (its worker's)
    cdef readonly object thread

    def __cinit__(self):
        self._st = _SyncState()
        self._pid = _ds_getpid()

    def __init__(self):
        # (The worker runs the state's loop: it holds the state, not self.)
        thread = _ds_threading.Thread(target=self._st._serve, name="pimcore-log-sync", daemon=True)
        try:
            thread.start()  # (RuntimeError: "can't start new thread")
        except BaseException:
            # A Ctrl-C in Thread.start (Python code: its wait for the thread
            # to run) may come after the worker started: this object is
            # then never returned, so nobody could stop() it (and a
            # traceback holding this frame may keep it alive a long time).
            # It is told to end at once.  (This handler is C: no interrupt
            # lands in it.)
            with nogil:
                self._st.tell_stop()
            raise
        self.thread = thread

    def __dealloc__(self):
        # Dropped without stop(): the worker ends after the flush in flight
        # (no join: a finalizer must not block).  C, so no interrupt lands
        # in it.  Not in a forked child: no worker there, and the mutex may
        # be held for ever.
        if self._st is not None and _ds_getpid() == self._pid:
            with nogil:
                self._st.tell_stop()

    def start(self, fd):
        if _ds_getpid() != self._pid:
            raise RuntimeError(_DS_FORKED)
        fd = _ds_check_fd(fd)
        cdef int cfd = fd
        cdef int why = 0
        cdef _SyncState st = self._st
        with nogil:
            pthread_mutex_lock(&st.mu)
            if st.stopping:
                why = 1
            elif st.unwaited:
                why = 2
            else:
                st.unwaited = True
                st.fd = cfd
                st.err = 0
                st.posted += 1
                pthread_cond_broadcast(&st.wake)
            pthread_mutex_unlock(&st.mu)
        if why == 1:
            raise RuntimeError("the data syncer is stopped")
        if why == 2:
            raise RuntimeError("a flush was started and not waited for: wait() for it first")

    def wait(self):
        cdef int err
        cdef _SyncState st = self._st
        if _ds_getpid() != self._pid:
            raise RuntimeError(_DS_FORKED)
        with nogil:
            pthread_mutex_lock(&st.mu)
            while st.finished != st.posted:
                pthread_cond_wait(&st.done, &st.mu)
            err = st.err
            st.unwaited = False
            pthread_mutex_unlock(&st.mu)
        if err:
            raise OSError(err, _ds_os.strerror(err))

    @property
    def busy(self):
        # (The GIL is kept: the worker holds the mutex only briefly, never
        # waiting for the GIL meanwhile.)
        cdef bint b
        cdef _SyncState st = self._st
        if _ds_getpid() != self._pid:
            raise RuntimeError(_DS_FORKED)
        pthread_mutex_lock(&st.mu)
        b = st.posted != st.finished
        pthread_mutex_unlock(&st.mu)
        return b

    def stop(self):
        if _ds_getpid() != self._pid:
            return  # (forked: no worker here to stop, and the mutex may be held for ever)
        with nogil:
            self._st.tell_stop()
        thread = self.thread
        if thread is not None and thread is not _ds_threading.current_thread():
            thread.join()
