# Display-order merge: the compiled twin of pimcore/_pure/order.py (read its
# docstring for why this is a merge of per-sender runs and not a sort).
#
# Same API and the same exceptions as the pure twin.  The work is done on a C
# array of records: senders are replaced by their rank among the distinct
# senders (so comparing ranks == comparing the strings), msg_ids are compared
# with memcmp, and the k-way merge uses a binary heap of run heads.

from libc.stdlib cimport malloc, free
from libc.string cimport memcmp
from libc.stdint cimport int64_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

cdef struct _OrdItem:
    int64_t ct
    int64_t st
    Py_ssize_t sender
    const char *mid
    Py_ssize_t mid_len
    Py_ssize_t idx

cdef inline int _mid_cmp(const _OrdItem *a, const _OrdItem *b) noexcept nogil:
    # bytes ordering: lexicographic, a proper prefix sorts first
    cdef Py_ssize_t n = a.mid_len if a.mid_len < b.mid_len else b.mid_len
    cdef int c = memcmp(a.mid, b.mid, <size_t>n)
    if c != 0:
        return c
    if a.mid_len < b.mid_len:
        return -1
    if a.mid_len > b.mid_len:
        return 1
    return 0

cdef inline bint _run_lt(const _OrdItem *a, const _OrdItem *b) noexcept nogil:
    # (sender, client_time, server_time, msg_id, index): groups each sender's
    # run contiguously, in that sender's own order.  A strict total order
    # (index breaks every tie), so any correct sort gives the same result.
    cdef int c
    if a.sender != b.sender:
        return a.sender < b.sender
    if a.ct != b.ct:
        return a.ct < b.ct
    if a.st != b.st:
        return a.st < b.st
    c = _mid_cmp(a, b)
    if c != 0:
        return c < 0
    return a.idx < b.idx


cdef void _sort_indices(Py_ssize_t *ix, Py_ssize_t *tmp, Py_ssize_t n, const _OrdItem *arr) noexcept nogil:
    # Bottom-up merge sort of item indices with the comparison inlined: about
    # 4x faster than libc qsort's function-pointer calls on 48-byte records.
    # Runs of 16 are insertion-sorted first.
    cdef Py_ssize_t lo, hi, i, j, width, mid, a, b, k, v
    cdef Py_ssize_t *src = ix
    cdef Py_ssize_t *dst = tmp
    cdef Py_ssize_t *swap
    lo = 0
    while lo < n:
        hi = lo + 16 if lo + 16 < n else n
        for i in range(lo + 1, hi):
            v = ix[i]
            j = i - 1
            while j >= lo and _run_lt(&arr[v], &arr[ix[j]]):
                ix[j + 1] = ix[j]
                j -= 1
            ix[j + 1] = v
        lo = hi
    width = 16
    while width < n:
        lo = 0
        while lo < n:
            mid = lo + width if lo + width < n else n
            hi = lo + 2 * width if lo + 2 * width < n else n
            a = lo
            b = mid
            k = lo
            while a < mid and b < hi:
                if _run_lt(&arr[src[b]], &arr[src[a]]):
                    dst[k] = src[b]
                    b += 1
                else:
                    dst[k] = src[a]
                    a += 1
                k += 1
            while a < mid:
                dst[k] = src[a]
                a += 1
                k += 1
            while b < hi:
                dst[k] = src[b]
                b += 1
                k += 1
            lo = hi
        swap = src
        src = dst
        dst = swap
        width *= 2
    if src != ix:
        for i in range(n):
            ix[i] = src[i]


cdef inline bint _head_lt(const _OrdItem *a, const _OrdItem *b) noexcept nogil:
    # merge key of run heads: (server_time, sender, msg_id, index)
    cdef int c
    if a.st != b.st:
        return a.st < b.st
    if a.sender != b.sender:
        return a.sender < b.sender
    c = _mid_cmp(a, b)
    if c != 0:
        return c < 0
    return a.idx < b.idx

cdef extern from "Python.h":
    bint PyLong_CheckExact(object o)
    bint PyUnicode_Check(object o)
    bint PyBytes_Check(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1

cdef inline int64_t _ord_int(object v, bint *bad) except? -1:
    # exact ints only (bool is not an int here); out of int64 range -> *bad
    cdef int overflow = 0
    cdef long long x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow:
        bad[0] = True
        return 0
    return <int64_t>x


def interleave(items):
    """Indices of ``items`` in display order (see pimcore._pure.order)."""
    cdef list seq = list(items)
    cdef Py_ssize_t n = len(seq), i, j, k, nruns, child, top
    cdef _OrdItem *arr
    cdef Py_ssize_t *starts
    cdef Py_ssize_t *heap  # run numbers
    cdef Py_ssize_t *pos   # next item of each run (an index into ix)
    cdef Py_ssize_t *ix    # item numbers in run order
    cdef Py_ssize_t *tmp_ix
    cdef dict ranks
    cdef list out, order, remap
    cdef Py_ssize_t tmp
    cdef tuple t
    cdef bint bad

    if n == 0:
        return []
    arr = <_OrdItem *>malloc(n * sizeof(_OrdItem))
    starts = <Py_ssize_t *>malloc((n + 1) * sizeof(Py_ssize_t))
    heap = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    pos = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    ix = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    tmp_ix = <Py_ssize_t *>malloc(n * sizeof(Py_ssize_t))
    if arr == NULL or starts == NULL or heap == NULL or pos == NULL or ix == NULL or tmp_ix == NULL:
        free(arr); free(starts); free(heap); free(pos); free(ix); free(tmp_ix)
        raise MemoryError()
    try:
        # One pass: validate exactly as the pure twin does (same checks, same
        # order, same messages) and fill the C records.  Senders get a
        # provisional id in order of first appearance, remapped to their rank
        # below.  `seq` keeps every msg_id alive, so the raw pointers stay valid.
        ranks = {}
        for i in range(n):
            item = seq[i]
            if type(item) is not tuple and not isinstance(item, tuple):
                raise TypeError("interleave items must be 4-tuples (sender, client_time, server_time, msg_id)")
            t = <tuple>item
            if len(t) != 4:
                raise TypeError("interleave items must be 4-tuples (sender, client_time, server_time, msg_id)")
            sender = t[0]
            ct_o = t[1]
            st_o = t[2]
            mid_o = t[3]
            if not PyUnicode_Check(sender):
                raise TypeError("sender must be str")
            if not PyLong_CheckExact(ct_o) or not PyLong_CheckExact(st_o):
                raise TypeError("client_time and server_time must be int")
            if not PyBytes_Check(mid_o):
                raise TypeError("msg_id must be bytes")
            bad = False
            arr[i].ct = _ord_int(ct_o, &bad)
            arr[i].st = _ord_int(st_o, &bad)
            if bad:
                raise ValueError("times must fit in a signed 64-bit integer")
            r = ranks.get(sender)
            if r is None:
                r = len(ranks)
                ranks[sender] = r
            arr[i].sender = <Py_ssize_t>r
            arr[i].mid = PyBytes_AS_STRING(mid_o)
            arr[i].mid_len = PyBytes_GET_SIZE(mid_o)
            arr[i].idx = i
        # provisional id -> rank of the sender string (so ranks compare like
        # the strings, as in the pure twin's heap keys)
        order = sorted(ranks, key=None)
        remap = [0] * len(order)
        for k in range(len(order)):
            remap[<Py_ssize_t>ranks[order[k]]] = k
        for i in range(n):
            arr[i].sender = <Py_ssize_t>remap[arr[i].sender]
        with nogil:
            for i in range(n):
                ix[i] = i
            _sort_indices(ix, tmp_ix, n, arr)
            # run boundaries
            nruns = 0
            for i in range(n):
                if i == 0 or arr[ix[i]].sender != arr[ix[i - 1]].sender:
                    starts[nruns] = i
                    pos[nruns] = i
                    nruns += 1
            starts[nruns] = n
            # heapify run heads
            for i in range(nruns):
                heap[i] = i
            i = nruns // 2 - 1
            while i >= 0:
                j = i
                while True:
                    child = 2 * j + 1
                    if child >= nruns:
                        break
                    if child + 1 < nruns and _head_lt(&arr[ix[pos[heap[child + 1]]]], &arr[ix[pos[heap[child]]]]):
                        child += 1
                    if _head_lt(&arr[ix[pos[heap[child]]]], &arr[ix[pos[heap[j]]]]):
                        tmp = heap[j]; heap[j] = heap[child]; heap[child] = tmp
                        j = child
                    else:
                        break
                i -= 1
        out = [None] * n
        k = 0
        top = nruns
        while top > 0:
            j = heap[0]
            out[k] = arr[ix[pos[j]]].idx
            k += 1
            pos[j] += 1
            if pos[j] >= starts[j + 1]:
                top -= 1
                heap[0] = heap[top]
            # sift down from the root
            i = 0
            while True:
                child = 2 * i + 1
                if child >= top:
                    break
                if child + 1 < top and _head_lt(&arr[ix[pos[heap[child + 1]]]], &arr[ix[pos[heap[child]]]]):
                    child += 1
                if _head_lt(&arr[ix[pos[heap[child]]]], &arr[ix[pos[heap[i]]]]):
                    tmp = heap[i]; heap[i] = heap[child]; heap[child] = tmp
                    i = child
                else:
                    break
        return out
    finally:
        free(arr); free(starts); free(heap); free(pos); free(ix); free(tmp_ix)
