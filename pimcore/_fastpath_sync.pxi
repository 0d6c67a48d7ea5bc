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


cdef class DataSyncer:
    """See pimcore/_pure/sync.py."""

    #: The worker runs without the GIL: a flush overlaps the caller's Python.
    gil_free = True

    cdef pthread_mutex_t _mu
    cdef pthread_cond_t _wake  # a flush posted, or stop
    cdef pthread_cond_t _done  # the posted flush ended
    cdef bint _ready
    cdef int _fd
    cdef int _err
    cdef unsigned long long _posted
    cdef unsigned long long _finished
    cdef bint _stopping
    cdef bint _unwaited  # started, and wait() not called since
    cdef pid_t _pid  # the process that made it (its worker's)
    cdef readonly object thread

    def __cinit__(self):
        pthread_mutex_init(&self._mu, NULL)
        pthread_cond_init(&self._wake, NULL)
        pthread_cond_init(&self._done, NULL)
        self._ready = True
        self._pid = _ds_getpid()

    def __init__(self):
        thread = _ds_threading.Thread(target=self._serve, name="pimcore-log-sync", daemon=True)
        try:
            thread.start()  # (RuntimeError: "can't start new thread")
        except BaseException:
            # A Ctrl-C in Thread.start (Python code: its wait for the thread
            # to run) may come after the worker started: this object is
            # then never returned, so nobody could stop() it, and the worker
            # -- holding a reference to it -- waited for ever.  It is told
            # to end instead.  (This handler is C: no interrupt lands in it.)
            with nogil:
                pthread_mutex_lock(&self._mu)
                self._stopping = True
                pthread_cond_broadcast(&self._wake)
                pthread_mutex_unlock(&self._mu)
            raise
        self.thread = thread

    def __dealloc__(self):
        # (The worker holds a reference to self while it runs: it has ended.)
        if self._ready:
            pthread_cond_destroy(&self._done)
            pthread_cond_destroy(&self._wake)
            pthread_mutex_destroy(&self._mu)

    def _serve(self):
        cdef int fd, rc, err
        with nogil:
            pthread_mutex_lock(&self._mu)
            while True:
                while not self._stopping and self._posted == self._finished:
                    pthread_cond_wait(&self._wake, &self._mu)
                if self._posted == self._finished:
                    break  # stopping, and nothing posted: end
                fd = self._fd
                pthread_mutex_unlock(&self._mu)
                rc = _ds_fdatasync(fd)
                while rc != 0 and _ds_errno == _DS_EINTR:
                    rc = _ds_fdatasync(fd)
                err = _ds_errno if rc != 0 else 0
                pthread_mutex_lock(&self._mu)
                self._err = err
                self._finished = self._posted
                pthread_cond_broadcast(&self._done)
            pthread_mutex_unlock(&self._mu)

    def start(self, fd):
        if _ds_getpid() != self._pid:
            raise RuntimeError(_DS_FORKED)
        fd = _ds_check_fd(fd)
        cdef int cfd = fd
        cdef int why = 0
        with nogil:
            pthread_mutex_lock(&self._mu)
            if self._stopping:
                why = 1
            elif self._unwaited:
                why = 2
            else:
                self._unwaited = True
                self._fd = cfd
                self._err = 0
                self._posted += 1
                pthread_cond_broadcast(&self._wake)
            pthread_mutex_unlock(&self._mu)
        if why == 1:
            raise RuntimeError("the data syncer is stopped")
        if why == 2:
            raise RuntimeError("a flush was started and not waited for: wait() for it first")

    def wait(self):
        cdef int err
        if _ds_getpid() != self._pid:
            raise RuntimeError(_DS_FORKED)
        with nogil:
            pthread_mutex_lock(&self._mu)
            while self._finished != self._posted:
                pthread_cond_wait(&self._done, &self._mu)
            err = self._err
            self._unwaited = False
            pthread_mutex_unlock(&self._mu)
        if err:
            raise OSError(err, _ds_os.strerror(err))

    @property
    def busy(self):
        # (The GIL is kept: the worker holds the mutex only briefly, never
        # waiting for the GIL meanwhile.)
        cdef bint b
        if _ds_getpid() != self._pid:
            raise RuntimeError(_DS_FORKED)
        pthread_mutex_lock(&self._mu)
        b = self._posted != self._finished
        pthread_mutex_unlock(&self._mu)
        return b

    def stop(self):
        if _ds_getpid() != self._pid:
            return  # (forked: no worker here to stop, and the mutex may be held for ever)
        with nogil:
            pthread_mutex_lock(&self._mu)
            self._stopping = True
            pthread_cond_broadcast(&self._wake)
            pthread_mutex_unlock(&self._mu)
        thread = self.thread
        if thread is not None and thread is not _ds_threading.current_thread():
            thread.join()
