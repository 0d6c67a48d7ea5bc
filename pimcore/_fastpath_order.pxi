# Display order: the compiled twin of pimcore/_pure/order.py (read its
# docstring for the rule, why it is a greedy merge and not a sort, and how a
# cycle is broken).
#
# Same API and the same exceptions as the pure twin.  The work is done on a C
# array of records: senders and devices are replaced by their rank among the
# distinct strings (so comparing ranks == comparing the strings), msg_ids are
# compared with memcmp.  Every structure is a C array of item numbers: the
# seq frontier, the after_seq release order, the per-(sender, device) chains
# by local_id, the cycle-breaker order, one binary heap of ready items per
# sender (a slice of one array) and an indexed binary heap of senders.

from libc.stdlib cimport malloc, free
from libc.string cimport memcmp
from libc.stdint cimport int64_t, uint64_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_Occurred, PyErr_Clear

cdef struct _OrdItem:
    int64_t ct
    int64_t st
    uint64_t lid
    uint64_t aseq
    uint64_t seq
    Py_ssize_t sender
    Py_ssize_t device
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

# The keys, exactly as the pure twin spells them.  Each is a strict total
# order (index breaks the last tie), so any correct sort or heap agrees.

cdef inline bint _local_lt(const _OrdItem *a, const _OrdItem *b) noexcept nogil:
    # a sender's own order: (client_time, server_time, msg_id, device,
    # local_id, seq, after_seq, index)
    cdef int c
    if a.ct != b.ct:
        return a.ct < b.ct
    if a.st != b.st:
        return a.st < b.st
    c = _mid_cmp(a, b)
    if c != 0:
        return c < 0
    if a.device != b.device:
        return a.device < b.device
    if a.lid != b.lid:
        return a.lid < b.lid
    if a.seq != b.seq:
        return a.seq < b.seq
    if a.aseq != b.aseq:
        return a.aseq < b.aseq
    return a.idx < b.idx

cdef inline bint _pick_lt(const _OrdItem *a, const _OrdItem *b) noexcept nogil:
    # between senders' candidates: (server_time, sender, msg_id, index)
    cdef int c
    if a.st != b.st:
        return a.st < b.st
    if a.sender != b.sender:
        return a.sender < b.sender
    c = _mid_cmp(a, b)
    if c != 0:
        return c < 0
    return a.idx < b.idx

DEF _K_SEQ = 0    # (seq, index)
DEF _K_AFTER = 1  # (after_seq, index)
DEF _K_CHAIN = 2  # (sender, device, local_id, index)
DEF _K_FORCE = 3  # (seq, server_time, sender, msg_id, device, local_id, after_seq, client_time, index)

cdef inline bint _key_lt(int kind, const _OrdItem *a, const _OrdItem *b) noexcept nogil:
    cdef int c
    if kind == _K_SEQ:
        if a.seq != b.seq:
            return a.seq < b.seq
        return a.idx < b.idx
    if kind == _K_AFTER:
        if a.aseq != b.aseq:
            return a.aseq < b.aseq
        return a.idx < b.idx
    if kind == _K_CHAIN:
        if a.sender != b.sender:
            return a.sender < b.sender
        if a.device != b.device:
            return a.device < b.device
        if a.lid != b.lid:
            return a.lid < b.lid
        return a.idx < b.idx
    if a.seq != b.seq:
        return a.seq < b.seq
    if a.st != b.st:
        return a.st < b.st
    if a.sender != b.sender:
        return a.sender < b.sender
    c = _mid_cmp(a, b)
    if c != 0:
        return c < 0
    if a.device != b.device:
        return a.device < b.device
    if a.lid != b.lid:
        return a.lid < b.lid
    if a.aseq != b.aseq:
        return a.aseq < b.aseq
    if a.ct != b.ct:
        return a.ct < b.ct
    return a.idx < b.idx


cdef void _sort_by(int kind, Py_ssize_t *ix, Py_ssize_t *tmp, Py_ssize_t n, const _OrdItem *arr) noexcept nogil:
    # Bottom-up merge sort of item numbers with the comparison inlined: about
    # 4x faster than libc qsort's function-pointer calls.  Runs of 16 are
    # insertion-sorted first.
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
            while j >= lo and _key_lt(kind, &arr[v], &arr[ix[j]]):
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
                if _key_lt(kind, &arr[src[b]], &arr[src[a]]):
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


DEF _DONE = 1
DEF _PUSHED = 2
DEF _SEQ_OK = 4
DEF _CHAIN_OK = 8

cdef struct _Ord:
    _OrdItem *arr
    unsigned char *flags
    Py_ssize_t n
    # seq frontier: items with seq > 0 by (seq, index); fp -> first not output
    Py_ssize_t *by_seq
    Py_ssize_t nseq
    Py_ssize_t fp
    # items by (after_seq, index); ap -> first not yet seq-ready
    Py_ssize_t *by_after
    Py_ssize_t ap
    # chains: items by (sender, device, local_id, index), cut into groups of
    # one local_id; a chain is a run of groups, named by its first group
    Py_ssize_t *by_chain
    Py_ssize_t *group_of   # item -> group
    Py_ssize_t *g_start    # group -> first position in by_chain (ng + 1 entries)
    Py_ssize_t *g_left     # group -> members not yet output
    Py_ssize_t *g_chain    # group -> its chain
    Py_ssize_t *chain_cur  # chain -> the group whose turn it is
    Py_ssize_t ng
    # ready items: one binary heap per sender (by _local_lt), sender s owns
    # hstore[s_off[s] : s_off[s] + its item count]
    Py_ssize_t *s_off
    Py_ssize_t *s_size
    Py_ssize_t *hstore
    # senders with a ready item, by their head's _pick_lt; spos[s] = -1 if absent
    Py_ssize_t *sheap
    Py_ssize_t *spos
    Py_ssize_t stop
    Py_ssize_t *out
    Py_ssize_t nout

cdef inline bint _s_lt(_Ord *o, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return _pick_lt(&o.arr[o.hstore[o.s_off[a]]], &o.arr[o.hstore[o.s_off[b]]])

cdef void _s_up(_Ord *o, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t p, s = o.sheap[k]
    while k > 0:
        p = (k - 1) >> 1
        if _s_lt(o, s, o.sheap[p]):
            o.sheap[k] = o.sheap[p]
            o.spos[o.sheap[k]] = k
            k = p
        else:
            break
    o.sheap[k] = s
    o.spos[s] = k

cdef void _s_down(_Ord *o, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t c, s = o.sheap[k]
    while True:
        c = 2 * k + 1
        if c >= o.stop:
            break
        if c + 1 < o.stop and _s_lt(o, o.sheap[c + 1], o.sheap[c]):
            c += 1
        if _s_lt(o, o.sheap[c], s):
            o.sheap[k] = o.sheap[c]
            o.spos[o.sheap[k]] = k
            k = c
        else:
            break
    o.sheap[k] = s
    o.spos[s] = k

cdef inline void _s_fix(_Ord *o, Py_ssize_t k) noexcept nogil:
    # the sender at k has a new head: its pick key may have moved either way
    # (a smaller local key can carry a larger server time)
    cdef Py_ssize_t s = o.sheap[k]
    _s_up(o, k)
    if o.spos[s] == k:
        _s_down(o, k)

cdef void _try_push(_Ord *o, Py_ssize_t i) noexcept nogil:
    # i becomes ready once both conditions hold; push it into its sender's
    # heap; if it became the sender's head, fix the sender's place.
    cdef unsigned char f = o.flags[i]
    cdef Py_ssize_t s, k, p
    cdef Py_ssize_t *h
    if f & (_DONE | _PUSHED) or (f & (_SEQ_OK | _CHAIN_OK)) != (_SEQ_OK | _CHAIN_OK):
        return
    o.flags[i] = f | _PUSHED
    s = o.arr[i].sender
    h = o.hstore + o.s_off[s]
    k = o.s_size[s]
    o.s_size[s] = k + 1
    while k > 0:
        p = (k - 1) >> 1
        if _local_lt(&o.arr[i], &o.arr[h[p]]):
            h[k] = h[p]
            k = p
        else:
            break
    h[k] = i
    if k == 0:
        if o.spos[s] < 0:
            o.sheap[o.stop] = s
            o.stop += 1
            _s_up(o, o.stop - 1)
        else:
            _s_fix(o, o.spos[s])

cdef Py_ssize_t _pop_next(_Ord *o) noexcept nogil:
    # the best sender's head: remove it from the sender's heap
    cdef Py_ssize_t s = o.sheap[0]
    cdef Py_ssize_t *h = o.hstore + o.s_off[s]
    cdef Py_ssize_t i = h[0], size, last, k, c
    size = o.s_size[s] - 1
    o.s_size[s] = size
    if size > 0:
        last = h[size]
        k = 0
        while True:
            c = 2 * k + 1
            if c >= size:
                break
            if c + 1 < size and _local_lt(&o.arr[h[c + 1]], &o.arr[h[c]]):
                c += 1
            if _local_lt(&o.arr[h[c]], &o.arr[last]):
                h[k] = h[c]
                k = c
            else:
                break
        h[k] = last
        _s_fix(o, 0)
    else:
        o.spos[s] = -1
        o.stop -= 1
        if o.stop > 0:
            o.sheap[0] = o.sheap[o.stop]
            _s_down(o, 0)
    return i

cdef void _release_seq(_Ord *o) noexcept nogil:
    # Advance the frontier F past output seqs; every item with after_seq < F
    # has all its seq predecessors output.
    cdef bint bounded
    cdef uint64_t frontier = 0
    cdef Py_ssize_t i
    while o.fp < o.nseq and o.flags[o.by_seq[o.fp]] & _DONE:
        o.fp += 1
    bounded = o.fp < o.nseq
    if bounded:
        frontier = o.arr[o.by_seq[o.fp]].seq
    while o.ap < o.n:
        i = o.by_after[o.ap]
        if bounded and o.arr[i].aseq >= frontier:
            break
        o.flags[i] |= _SEQ_OK
        _try_push(o, i)
        o.ap += 1

cdef void _emit(_Ord *o, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t g, c, cur, nx, p, j
    o.flags[i] |= _DONE
    o.out[o.nout] = i
    o.nout += 1
    g = o.group_of[i]
    o.g_left[g] -= 1
    c = o.g_chain[g]
    # the chain's turn moves on once its current local_id group is all output
    # (groups emptied by the cycle breaker are skipped)
    while True:
        cur = o.chain_cur[c]
        if o.g_left[cur] != 0:
            break
        nx = cur + 1
        if nx >= o.ng or o.g_chain[nx] != c:
            break
        o.chain_cur[c] = nx
        for p in range(o.g_start[nx], o.g_start[nx + 1]):
            j = o.by_chain[p]
            o.flags[j] |= _CHAIN_OK
            _try_push(o, j)
    _release_seq(o)

cdef void _run(_Ord *o, Py_ssize_t *by_force, Py_ssize_t *tmp) noexcept nogil:
    cdef Py_ssize_t fq = 0
    cdef bint sorted_force = False
    _release_seq(o)
    while o.nout < o.n:
        if o.stop > 0:
            _emit(o, _pop_next(o))
        else:
            # nothing ready, items remain: a cycle (every sender heap is
            # empty here).  Output the smallest remaining by the force key
            # (sorted on first need: consistent input never gets here).
            if not sorted_force:
                _sort_by(_K_FORCE, by_force, tmp, o.n, o.arr)
                sorted_force = True
            while o.flags[by_force[fq]] & _DONE:
                fq += 1
            _emit(o, by_force[fq])


cdef extern from "Python.h":
    bint PyLong_CheckExact(object o)
    bint PyUnicode_Check(object o)
    bint PyBytes_Check(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object o)  # errors checked by hand

cdef inline int64_t _ord_int(object v, bint *bad) except? -1:
    # exact ints only (bool is not an int here); out of int64 range -> *bad
    cdef int overflow = 0
    cdef long long x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow:
        bad[0] = True
        return 0
    return <int64_t>x

cdef inline uint64_t _ord_uint(object v, bint *bad):
    # exact ints only; negative or beyond 2**64-1 -> *bad (OverflowError cleared)
    cdef unsigned long long x = PyLong_AsUnsignedLongLong(v)
    if x == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()
        bad[0] = True
        return 0
    return <uint64_t>x

_ORD_SHAPE = "interleave items must be 8-tuples (sender, device, local_id, after_seq, seq, client_time, server_time, msg_id)"


cdef list _ranks(dict first_seen):
    # provisional id (order of first appearance) -> rank of the string
    cdef list order = sorted(first_seen)
    cdef list remap = [0] * len(order)
    cdef Py_ssize_t k
    for k in range(len(order)):
        remap[<Py_ssize_t>first_seen[order[k]]] = k
    return remap


def interleave(items):
    """Indices of ``items`` in display order (see pimcore._pure.order)."""
    cdef list seq = list(items)
    cdef Py_ssize_t n = len(seq), i, k, p, ng, nsend
    cdef _OrdItem *arr
    cdef unsigned char *flags
    cdef Py_ssize_t *buf
    cdef Py_ssize_t *tmp
    cdef Py_ssize_t *by_force
    cdef _Ord o
    cdef dict sranks, dranks
    cdef list sremap, dremap, out
    cdef tuple t
    cdef bint bad
    cdef const _OrdItem *a
    cdef const _OrdItem *b

    if n == 0:
        return []
    arr = <_OrdItem *>malloc(n * sizeof(_OrdItem))
    flags = <unsigned char *>malloc(n)
    buf = <Py_ssize_t *>malloc((16 * n + 1) * sizeof(Py_ssize_t))
    if arr == NULL or flags == NULL or buf == NULL:
        free(arr); free(flags); free(buf)
        raise MemoryError()
    try:
        # One pass: validate exactly as the pure twin does (same checks, same
        # order, same messages) and fill the C records.  `seq` keeps every
        # msg_id alive, so the raw pointers stay valid.
        sranks = {}
        dranks = {}
        for i in range(n):
            item = seq[i]
            if not isinstance(item, tuple):
                raise TypeError(_ORD_SHAPE)
            t = <tuple>item
            if len(t) != 8:
                raise TypeError(_ORD_SHAPE)
            sender = t[0]
            device = t[1]
            if not PyUnicode_Check(sender) or not PyUnicode_Check(device):
                raise TypeError("sender and device must be str")
            if not (PyLong_CheckExact(t[2]) and PyLong_CheckExact(t[3]) and PyLong_CheckExact(t[4])
                    and PyLong_CheckExact(t[5]) and PyLong_CheckExact(t[6])):
                raise TypeError("local_id, after_seq, seq, client_time and server_time must be int")
            mid_o = t[7]
            if not PyBytes_Check(mid_o):
                raise TypeError("msg_id must be bytes")
            bad = False
            arr[i].lid = _ord_uint(t[2], &bad)
            arr[i].aseq = _ord_uint(t[3], &bad)
            arr[i].seq = _ord_uint(t[4], &bad)
            if bad:
                raise ValueError("local_id, after_seq and seq must fit in an unsigned 64-bit integer")
            arr[i].ct = _ord_int(t[5], &bad)
            arr[i].st = _ord_int(t[6], &bad)
            if bad:
                raise ValueError("times must fit in a signed 64-bit integer")
            r = sranks.get(sender)
            if r is None:
                r = len(sranks)
                sranks[sender] = r
            arr[i].sender = <Py_ssize_t>r
            r = dranks.get(device)
            if r is None:
                r = len(dranks)
                dranks[device] = r
            arr[i].device = <Py_ssize_t>r
            arr[i].mid = PyBytes_AS_STRING(mid_o)
            arr[i].mid_len = PyBytes_GET_SIZE(mid_o)
            arr[i].idx = i
        # provisional ids -> ranks, through C arrays (scratch space in buf)
        sremap = _ranks(sranks)
        dremap = _ranks(dranks)
        nsend = len(sremap)
        for k in range(nsend):
            buf[k] = <Py_ssize_t>sremap[k]
        for k in range(len(dremap)):
            buf[n + k] = <Py_ssize_t>dremap[k]
        for i in range(n):
            arr[i].sender = buf[arr[i].sender]
            arr[i].device = buf[n + arr[i].device]

        o.arr = arr
        o.flags = flags
        o.n = n
        o.by_seq = buf
        o.by_after = buf + n
        o.by_chain = buf + 2 * n
        by_force = buf + 3 * n
        tmp = buf + 4 * n
        o.group_of = buf + 5 * n
        o.g_start = buf + 6 * n        # n + 1 entries
        o.g_left = buf + 7 * n + 1
        o.g_chain = buf + 8 * n + 1
        o.chain_cur = buf + 9 * n + 1
        o.s_off = buf + 10 * n + 1
        o.s_size = buf + 11 * n + 1
        o.hstore = buf + 12 * n + 1
        o.sheap = buf + 13 * n + 1
        o.spos = buf + 14 * n + 1
        o.out = buf + 15 * n + 1
        with nogil:
            o.nseq = 0
            for i in range(n):
                flags[i] = 0
                o.by_after[i] = i
                o.by_chain[i] = i
                by_force[i] = i
                if arr[i].seq > 0:
                    o.by_seq[o.nseq] = i
                    o.nseq += 1
            _sort_by(_K_SEQ, o.by_seq, tmp, o.nseq, arr)
            _sort_by(_K_AFTER, o.by_after, tmp, n, arr)
            _sort_by(_K_CHAIN, o.by_chain, tmp, n, arr)
            # groups (one local_id of one chain) and chains; the first group
            # of each chain has its turn from the start
            ng = 0
            for p in range(n):
                i = o.by_chain[p]
                a = &arr[i]
                if p > 0:
                    b = &arr[o.by_chain[p - 1]]
                if p == 0 or a.sender != b.sender or a.device != b.device:
                    o.g_start[ng] = p
                    o.g_left[ng] = 0
                    o.g_chain[ng] = ng
                    o.chain_cur[ng] = ng
                    ng += 1
                elif a.lid != b.lid:
                    o.g_start[ng] = p
                    o.g_left[ng] = 0
                    o.g_chain[ng] = o.g_chain[ng - 1]
                    ng += 1
                o.group_of[i] = ng - 1
                o.g_left[ng - 1] += 1
                if o.g_chain[ng - 1] == ng - 1:
                    flags[i] = _CHAIN_OK
            o.g_start[ng] = n
            o.ng = ng
            # one heap slice per sender
            for k in range(nsend):
                o.s_size[k] = 0
                o.spos[k] = -1
            for i in range(n):
                o.s_size[arr[i].sender] += 1
            p = 0
            for k in range(nsend):
                o.s_off[k] = p
                p += o.s_size[k]
                o.s_size[k] = 0
            o.stop = 0
            o.fp = 0
            o.ap = 0
            o.nout = 0
            _run(&o, by_force, tmp)
        out = [None] * n
        for k in range(n):
            out[k] = o.out[k]
        return out
    finally:
        free(arr); free(flags); free(buf)
