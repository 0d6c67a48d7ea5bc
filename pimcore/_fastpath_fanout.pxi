# Inbox fan-out of the LMDB store: the compiled twin of pimcore/_pure/fanout.py
# (read its docstring for the contract).  Same API, same validation order and
# the same exceptions, as tests/test_fanout.py checks.
#
# How it is fast: one C loop per call instead of a Python loop per recipient;
# inbox keys are built straight into fresh bytes objects (length-prefixed user
# key + 8-byte big-endian position), result tuples are filled with
# PyTuple_SET_ITEM, and dict lookups use the borrowed-reference C calls.

from cpython.object cimport PyObject
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM, PyTuple_GET_ITEM
from cpython.list cimport PyList_GET_SIZE, PyList_GET_ITEM
from cpython.ref cimport Py_INCREF
from libc.string cimport memcpy, memcmp

from pimcore.errors import StoreError as _FoStoreError

cdef extern from "Python.h":
    # Without Cython's automatic error checks: the sentinel is tested here.
    unsigned long long _fo_as_u64 "PyLong_AsUnsignedLongLong"(object)
    object _fo_from_u64 "PyLong_FromUnsignedLongLong"(unsigned long long)
    PyObject* _fo_dict_get "PyDict_GetItemWithError"(object, object) except? NULL
    bint _fo_is_str "PyUnicode_Check"(object)
    bint _fo_is_str_exact "PyUnicode_CheckExact"(object)
    void _fo_gc_untrack "PyObject_GC_UnTrack"(object)
    bint _fo_is_long_exact "PyLong_CheckExact"(object)
    bint _fo_is_bytes_exact "PyBytes_CheckExact"(object)
    bint _fo_is_list_exact "PyList_CheckExact"(object)
    bint _fo_is_tuple_exact "PyTuple_CheckExact"(object)
    bint _fo_is_dict_exact "PyDict_CheckExact"(object)
    PyObject* _fo_err_occurred "PyErr_Occurred"()
    void _fo_err_clear "PyErr_Clear"()

cdef unsigned long long _FO_U64_MAX = 0xFFFFFFFFFFFFFFFFULL


cdef unsigned long long _fo_head(dict heads, object uk, bint floor=False) except? 0xFFFFFFFFFFFFFFFFULL:
    # heads[uk] as a u64: KeyError / TypeError / ValueError as the pure _head
    cdef object head = heads[uk]
    cdef unsigned long long h
    if not _fo_is_long_exact(head):
        raise TypeError("inbox floor must be int" if floor else "inbox head must be int")
    h = _fo_as_u64(head)
    if h == _FO_U64_MAX and _fo_err_occurred() != NULL:
        # negative (OverflowError) or wider than 64 bits
        _fo_err_clear()
        raise ValueError("inbox floor out of range" if floor else "inbox head out of range")
    return h


cdef inline void _fo_put_u64(unsigned char *p, unsigned long long v) noexcept:
    # 8 bytes big-endian
    cdef int k
    for k in range(7, -1, -1):
        p[k] = <unsigned char>(v & 0xFF)
        v >>= 8


cdef int _fo_check_args(object uks, object a, object b, str names) except -1:
    if not _fo_is_list_exact(uks) and not _fo_is_tuple_exact(uks):
        raise TypeError("uks must be a list or tuple")
    if not _fo_is_dict_exact(a) or not _fo_is_dict_exact(b):
        raise TypeError(names + " must be dicts")
    return 0


cdef inline bytes _fo_key(object uk, unsigned long long pos):
    # uk + U64(pos), big-endian
    cdef Py_ssize_t n = PyBytes_GET_SIZE(uk)
    cdef bytes key = PyBytes_FromStringAndSize(NULL, n + 8)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(key)
    memcpy(p, PyBytes_AS_STRING(uk), <size_t>n)
    _fo_put_u64(p + n, pos)
    return key


def fanout(users, uks, heads, pend, entry):
    """Append ``entry`` to the inbox of every user; return ``(user, position)``
    pairs (see pimcore._pure.fanout)."""
    return _fo_fanout(users, uks, heads, pend, entry)


cdef object _fo_fanout(object users, object uks, object heads, object pend, object entry):
    cdef Py_ssize_t n, i
    cdef unsigned long long h
    cdef object user, uk, queued, pos
    cdef PyObject *found
    cdef tuple out, pair
    if not _fo_is_tuple_exact(users) or not _fo_is_tuple_exact(uks):
        raise TypeError("users and uks must be tuples")
    if not _fo_is_dict_exact(heads) or not _fo_is_dict_exact(pend):
        raise TypeError("heads and pend must be dicts")
    if not _fo_is_bytes_exact(entry):
        raise TypeError("entry must be bytes")
    n = len(<tuple>users)
    if len(<tuple>uks) != n:
        raise ValueError("users and uks differ in length")
    out = PyTuple_New(n)
    for i in range(n):
        user = (<tuple>users)[i]
        uk = (<tuple>uks)[i]
        if not _fo_is_str(user):
            raise TypeError("user must be str")
        if not _fo_is_bytes_exact(uk):
            raise TypeError("uk must be bytes")
        h = _fo_head(<dict>heads, uk)
        if h == _FO_U64_MAX:
            raise ValueError("inbox head out of range")
        found = _fo_dict_get(pend, uk)
        queued = None if found == NULL else <object>found  # a strong reference
        if queued is not None and not _fo_is_list_exact(queued):
            raise TypeError("pending entries must be a list")
        pos = _fo_from_u64(h + 1)
        (<dict>heads)[uk] = pos
        if queued is None:
            (<dict>pend)[uk] = [entry]
        else:
            (<list>queued).append(entry)
        pair = (user, pos)
        if _fo_is_str_exact(user):
            # A tuple of a str and an int can never be in a reference cycle:
            # out of the collector's sight from the start (CPython's own
            # collector untracks such tuples at their first collection, after
            # visiting them).  A 1,000-member group makes 1,000 per message;
            # they live until the batch is answered, often across a
            # collection.  (A str subclass may hold a cycle: left tracked.)
            _fo_gc_untrack(pair)
        Py_INCREF(pair)  # PyTuple_SET_ITEM steals a reference
        PyTuple_SET_ITEM(out, i, pair)
    return out


def inbox_items(uks, pend, heads):
    """An iterator of ``(uk + U64(position), value)`` for the queued values of
    each ``uk`` (see pimcore._pure.fanout): everything is checked here, the
    pairs are made as they are taken."""
    cdef Py_ssize_t j, count
    cdef unsigned long long h
    cdef object queued, value
    cdef _InboxItems it
    _fo_check_args(uks, pend, heads, "pend and heads")
    for uk in uks:
        if not _fo_is_bytes_exact(uk):
            raise TypeError("uk must be bytes")
        queued = (<dict>pend)[uk]
        if not _fo_is_list_exact(queued):
            raise TypeError("pending entries must be a list")
        h = _fo_head(<dict>heads, uk)
        count = PyList_GET_SIZE(queued)
        if <unsigned long long>count > h:
            raise ValueError("more pending entries than inbox positions")
        for j in range(count):
            value = <object>PyList_GET_ITEM(queued, j)
            if not _fo_is_bytes_exact(value):
                raise TypeError("pending entry must be bytes")
    it = _InboxItems.__new__(_InboxItems)
    it.uks = tuple(uks)
    it.pend = <dict>pend
    it.heads = <dict>heads
    return it


cdef class _InboxItems:
    """What inbox_items returns.  Why an iterator and not a list: the pairs
    go to one ``Cursor.putmulti``, which drops each pair after its put, so
    each key and tuple is freed (and its memory reused, still in cache) before
    the next is made -- rather than a list of one pair per inbox entry (a
    1,000-member group's batch of 50 messages: 50,000 pairs) built, walked
    and freed.  The inputs were checked by inbox_items; they are read again
    here (a change in between is caught with the same errors, never a
    crash)."""

    cdef tuple uks
    cdef dict pend
    cdef dict heads
    cdef Py_ssize_t i  # next index in uks
    cdef Py_ssize_t j  # next index in queued
    cdef object uk
    cdef object queued  # pend[uk] of the user being written, None between users
    cdef unsigned long long pos  # the last position made for uk

    def __iter__(self):
        return self

    def __next__(self):
        cdef object value
        cdef unsigned long long h
        cdef Py_ssize_t count
        while True:
            if self.queued is not None:
                if self.j < PyList_GET_SIZE(self.queued):
                    value = <object>PyList_GET_ITEM(self.queued, self.j)
                    if not _fo_is_bytes_exact(value):
                        raise TypeError("pending entry must be bytes")
                    self.j += 1
                    self.pos += 1
                    return (_fo_key(self.uk, self.pos), value)
                self.queued = None
            if self.i >= len(self.uks):
                raise StopIteration
            uk = self.uks[self.i]
            self.i += 1
            if not _fo_is_bytes_exact(uk):
                raise TypeError("uk must be bytes")
            queued = self.pend[uk]
            if not _fo_is_list_exact(queued):
                raise TypeError("pending entries must be a list")
            h = _fo_head(self.heads, uk)
            count = PyList_GET_SIZE(queued)
            if <unsigned long long>count > h:
                raise ValueError("more pending entries than inbox positions")
            self.uk = uk
            self.queued = queued
            self.j = 0
            self.pos = h - <unsigned long long>count


def head_items(uks, heads, floors):
    """``(uk, U64(head) + U64(floor))`` for each ``uk``: the inboxmeta
    records (see pimcore._pure.fanout)."""
    cdef unsigned long long h, f
    cdef list out
    cdef bytes value
    cdef unsigned char *p
    _fo_check_args(uks, heads, floors, "heads and floors")
    out = []
    for uk in uks:
        if not _fo_is_bytes_exact(uk):
            raise TypeError("uk must be bytes")
        h = _fo_head(<dict>heads, uk)
        f = _fo_head(<dict>floors, uk, True)
        value = PyBytes_FromStringAndSize(NULL, 16)
        p = <unsigned char *>PyBytes_AS_STRING(value)
        _fo_put_u64(p, h)
        _fo_put_u64(p + 8, f)
        out.append((uk, value))
    return out


cdef extern from "Python.h":
    long long _fo_as_i64 "PyLong_AsLongLong"(object)


cdef unsigned long long _fo_u64(object value, str name) except? 0xFFFFFFFFFFFFFFFFULL:
    # as pure _int(value, name, 0, U64_MAX)
    cdef unsigned long long v
    if not _fo_is_long_exact(value):
        raise TypeError(name + " must be int")
    v = _fo_as_u64(value)
    if v == _FO_U64_MAX and _fo_err_occurred() != NULL:
        _fo_err_clear()
        raise ValueError(name + " out of range")
    return v


cdef long long _fo_i64(object value, str name) except? -1:
    # as pure _int(value, name, I64_MIN, I64_MAX)
    cdef long long v
    if not _fo_is_long_exact(value):
        raise TypeError(name + " must be int")
    v = _fo_as_i64(value)
    if v == -1 and _fo_err_occurred() != NULL:
        _fo_err_clear()
        raise ValueError(name + " out of range")
    return v


cdef inline unsigned char *_fo_put(unsigned char *p, object b) noexcept:
    # copy a bytes object's contents to p; the end
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(p, PyBytes_AS_STRING(b), <size_t>n)
    return p + n


def stage_message(op, seq, after_seq, ids, ck, dkey, msgs, convidx, dedupe):
    """Stage the records of a message without mentions; its inbox value
    (see pimcore._pure.fanout)."""
    return _fo_stage_message(op, seq, after_seq, ids, ck, dkey, msgs, convidx, dedupe)


cdef object _fo_stage_message(object op, object seq, object after_seq, object ids, object ck, object dkey,
                              object msgs, object convidx, object dedupe):
    cdef unsigned long long useq, ulocal, uafter
    cdef long long client_time, server_time
    cdef object msg_id, payload, digest, sender
    cdef bytes sender_raw, record, key, value, entry
    cdef unsigned char *p
    if not _fo_is_list_exact(msgs) or not _fo_is_list_exact(convidx) or not _fo_is_dict_exact(dedupe):
        raise TypeError("msgs and convidx must be lists, dedupe a dict")
    if not _fo_is_bytes_exact(ids) or not _fo_is_bytes_exact(ck) or not _fo_is_bytes_exact(dkey):
        raise TypeError("ids, ck and dkey must be bytes")
    msg_id = op.msg_id
    if not _fo_is_bytes_exact(msg_id):
        raise TypeError("msg_id must be bytes")
    if PyBytes_GET_SIZE(msg_id) != 16:
        raise ValueError("msg_id must be 16 bytes")
    payload = op.payload
    digest = op.digest
    if not _fo_is_bytes_exact(payload) or not _fo_is_bytes_exact(digest):
        raise TypeError("payload and digest must be bytes")
    sender = op.sender
    if not _fo_is_str(sender) or type(sender) is not str:
        raise TypeError("sender must be str")
    sender_raw = (<str>sender).encode("ascii")
    useq = _fo_u64(seq, "seq")
    ulocal = _fo_u64(op.local_id, "local_id")
    client_time = _fo_i64(op.client_time, "client_time")
    server_time = _fo_i64(op.server_time, "server_time")
    uafter = _fo_u64(after_seq, "after_seq")
    # msgs: >QQqqQB + ids + payload
    record = PyBytes_FromStringAndSize(NULL, 41 + PyBytes_GET_SIZE(ids) + PyBytes_GET_SIZE(payload))
    p = <unsigned char *>PyBytes_AS_STRING(record)
    _fo_put_u64(p, useq)
    _fo_put_u64(p + 8, ulocal)
    _fo_put_u64(p + 16, <unsigned long long>client_time)
    _fo_put_u64(p + 24, <unsigned long long>server_time)
    _fo_put_u64(p + 32, uafter)
    p[40] = 0
    _fo_put(_fo_put(p + 41, ids), payload)
    # convidx: ck + U64(seq) -> msg_id + sender
    key = _fo_key(ck, useq)
    value = PyBytes_FromStringAndSize(NULL, 16 + PyBytes_GET_SIZE(sender_raw))
    _fo_put(_fo_put(<unsigned char *>PyBytes_AS_STRING(value), msg_id), sender_raw)
    # dedupe: msg_id + U64(seq) + I64(server_time) + digest
    dvalue = PyBytes_FromStringAndSize(NULL, 32 + PyBytes_GET_SIZE(digest))
    p = <unsigned char *>PyBytes_AS_STRING(dvalue)
    p = _fo_put(p, msg_id)
    _fo_put_u64(p, useq)
    _fo_put_u64(p + 8, <unsigned long long>server_time)
    _fo_put(p + 16, digest)
    # inbox: msg_id + I64(server_time)
    entry = PyBytes_FromStringAndSize(NULL, 24)
    p = _fo_put(<unsigned char *>PyBytes_AS_STRING(entry), msg_id)
    _fo_put_u64(p, <unsigned long long>server_time)
    (<list>msgs).append((msg_id, record))
    (<list>convidx).append((key, value))
    (<dict>dedupe)[dkey] = dvalue
    return entry


cdef extern from "Python.h":
    Py_ssize_t _fo_ulen "PyUnicode_GET_LENGTH"(object)
    bint _fo_uascii "PyUnicode_IS_ASCII"(object)
    void *_fo_udata "PyUnicode_DATA"(object)
    bint _fo_is_str_exact "PyUnicode_CheckExact"(object)
    long long _fo_as_i64_ovf "PyLong_AsLongLongAndOverflow"(object, int *)


# pimcore.ids.ID_CHARS as a table (filled at import)
cdef unsigned char _FO_ID_CHAR[256]
for _c in range(256):
    _FO_ID_CHAR[_c] = 1 if chr(_c) in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@-" else 0


cdef bint _fo_plain_id(object value) noexcept:
    # pimcore.ids.valid_id for an exact str; anything else is not the common case
    cdef Py_ssize_t n, i
    cdef const unsigned char *p
    if not _fo_is_str_exact(value) or not _fo_uascii(value):
        return False
    n = _fo_ulen(value)
    if n < 1 or n > 64:
        return False
    p = <const unsigned char *>_fo_udata(value)
    for i in range(n):
        if not _FO_ID_CHAR[p[i]]:
            return False
    return True


cdef bint _fo_u64_ok(object value) noexcept:
    # an exact int in [0, 2**64)
    cdef unsigned long long v
    if not _fo_is_long_exact(value):
        return False
    v = _fo_as_u64(value)
    if v == _FO_U64_MAX and _fo_err_occurred() != NULL:
        _fo_err_clear()
        return False
    return True


cdef bint _fo_i64_ok(object value, bint nonneg) noexcept:
    # an exact int in [-2**63, 2**63) (nonneg: [0, 2**63))
    cdef int overflow = 0
    cdef long long v
    if not _fo_is_long_exact(value):
        return False
    v = _fo_as_i64_ovf(value, &overflow)
    if overflow:
        return False
    return not nonneg or v >= 0


def store_plain_message(op, w, dedupe_db, conv_info, device_key, record_ids, appended):
    """The LMDB store's NewMessage in its common case, in one call, or None
    for anything else (see pimcore._pure.fanout)."""
    cdef object sender, device, conv, local_id, after, msg_id, payload, digest, server_time
    cdef object dk, dkey, info, ck, hot, c, last, seq, after_seq, entry, s_dedupe, positions
    cdef unsigned char *p
    if op.mentions or op.mention_all is not False or op.event is not False:
        return None
    sender = op.sender
    device = op.device
    conv = op.conv
    if not (_fo_plain_id(sender) and _fo_plain_id(device) and _fo_is_str_exact(conv)):
        return None
    local_id = op.local_id
    after = op.after_seq
    server_time = op.server_time
    msg_id = op.msg_id
    payload = op.payload
    digest = op.digest
    if not (_fo_u64_ok(local_id) and _fo_u64_ok(after) and _fo_i64_ok(op.client_time, False)
            and _fo_i64_ok(server_time, True)
            and _fo_is_bytes_exact(msg_id) and PyBytes_GET_SIZE(msg_id) == 16
            and _fo_is_bytes_exact(payload) and _fo_is_bytes_exact(digest)
            and w.staging is True):
        return None
    dk = device_key(sender, device)
    if not _fo_is_bytes_exact(dk):
        raise TypeError("device_key must return bytes")
    dkey = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(dk) + 8)
    p = _fo_put(<unsigned char *>PyBytes_AS_STRING(dkey), dk)
    _fo_put_u64(p, _fo_as_u64(local_id))
    s_dedupe = w.s_dedupe
    if dkey in s_dedupe or _fo_dedupe_get(w.txn, dedupe_db, dkey) is not None:
        return None  # a retry (or a conflict): the general path answers it
    info = conv_info(conv)
    if info is None:
        return None
    ck = info[0]
    hot = w.hot
    c = hot.convs.get(ck)
    if (c is None or sender not in c.member_set or not c.flagged or c.heads_gen != hot.heads_gen
            or (after and after <= c.purged)):  # (a purged group's history: the general path refuses it)
        return None
    last = hot.seqs.get(ck)
    if last is None:
        return None
    seq = last + 1
    after_seq = after if after < seq else last
    entry = stage_message(op, seq, after_seq, record_ids(ck, dk), ck, dkey, w.s_msgs, w.s_convidx, s_dedupe)
    hot.seqs[ck] = seq
    w._dirty_seqs.add(ck)
    positions = fanout(c.users, c.uks, hot.heads, w.pend, entry)
    return appended(msg_id, seq, server_time, positions, after_seq)


cdef object _fo_appended(object maker, object msg_id, object seq, object server_time, object positions,
                         object after_seq):
    # maker(msg_id, seq, server_time, positions, after_seq) without the
    # argument tuple when it is a record maker of five fields (records.pxi)
    cdef _RecordMaker m
    cdef object obj
    if type(maker) is _RecordMaker and (<_RecordMaker>maker).n == 5:
        m = <_RecordMaker>maker
        obj = pimcore_cd_alloc(m.ptype)
        pimcore_cd_set_slot(<PyObject*>obj, m.offsets[0], <PyObject*>msg_id)
        pimcore_cd_set_slot(<PyObject*>obj, m.offsets[1], <PyObject*>seq)
        pimcore_cd_set_slot(<PyObject*>obj, m.offsets[2], <PyObject*>server_time)
        pimcore_cd_set_slot(<PyObject*>obj, m.offsets[3], <PyObject*>positions)
        pimcore_cd_set_slot(<PyObject*>obj, m.offsets[4], <PyObject*>after_seq)
        return obj
    return maker(msg_id, seq, server_time, positions, after_seq)


def store_plain_run(ops, start, kind, w, dedupe_db, conv_info, device_key, record_ids, appended, results):
    """``store_plain_message`` over ``ops[start:]`` while it takes them; the
    index of the first op it did not take (see pimcore._pure.fanout)."""
    cdef Py_ssize_t i, n
    cdef object op, sender, device, conv, local_id, after, msg_id, payload, digest, server_time
    cdef object dk, dkey, info, ck, c, last, seq, after_seq, entry, positions, ids
    cdef object txn, s_dedupe, s_msgs, s_convidx, hot, dirty, pend, convs, seqs, heads, heads_gen, hwm
    cdef object dmax, dk_general, dedupe_last, bound
    cdef object last_sender = None, last_device = None, last_dk = None
    cdef object last_conv = None, last_ck = None, last_c = None, ids_ck = None, ids_dk = None, last_ids = None
    cdef unsigned char *p
    if not _fo_is_tuple_exact(ops) and not _fo_is_list_exact(ops):
        raise TypeError("ops must be a tuple or list")
    if not _fo_is_list_exact(results):
        raise TypeError("results must be a list")
    if not _fo_is_long_exact(start):
        raise TypeError("start must be int")
    n = len(ops)
    if not 0 <= start <= n:
        raise ValueError("start out of range")
    i = start
    if i == n or w.staging is not True:
        return i
    txn = w.txn
    s_dedupe = w.s_dedupe
    s_msgs = w.s_msgs
    s_convidx = w.s_convidx
    hot = w.hot
    dirty = w._dirty_seqs
    pend = w.pend
    convs = hot.convs
    seqs = hot.seqs
    heads = hot.heads
    heads_gen = hot.heads_gen
    dmax = hot.dmax
    dk_general = w.dk_general
    dedupe_last = w.dedupe_last
    hwm = w.hwm
    try:
        while i < n:
            op = ops[i]
            if type(op) is not kind:
                break
            if op.mentions or op.mention_all is not False or op.event is not False:
                break
            sender = op.sender
            device = op.device
            conv = op.conv
            if not (_fo_plain_id(sender) and _fo_plain_id(device) and _fo_is_str_exact(conv)):
                break
            local_id = op.local_id
            after = op.after_seq
            server_time = op.server_time
            msg_id = op.msg_id
            payload = op.payload
            digest = op.digest
            if not (_fo_u64_ok(local_id) and _fo_u64_ok(after) and _fo_i64_ok(op.client_time, False)
                    and _fo_i64_ok(server_time, True)
                    and _fo_is_bytes_exact(msg_id) and PyBytes_GET_SIZE(msg_id) == 16
                    and _fo_is_bytes_exact(payload) and _fo_is_bytes_exact(digest)):
                break
            # The key helpers are pure: called once per new argument in a row.
            if last_dk is None or not (sender == last_sender and device == last_device):
                dk = device_key(sender, device)
                if not _fo_is_bytes_exact(dk):
                    raise TypeError("device_key must return bytes")
                last_sender, last_device, last_dk = sender, device, dk
            else:
                dk = last_dk
            dkey = PyBytes_FromStringAndSize(NULL, PyBytes_GET_SIZE(dk) + 8)
            p = _fo_put(<unsigned char *>PyBytes_AS_STRING(dkey), dk)
            _fo_put_u64(p, _fo_as_u64(local_id))
            if dkey in s_dedupe:
                break  # a retry (or a conflict): the general path answers it
            # the device's bound: a local_id above it needs no probe
            bound = dmax.get(dk)
            if bound is None and dk not in dk_general:
                bound = dedupe_last(dk)
                dmax[dk] = bound
            if (bound is None or local_id <= bound) and _fo_dedupe_get(txn, dedupe_db, dkey) is not None:
                break
            if last_ck is not None and conv == last_conv:
                ck, c = last_ck, last_c
            else:
                info = conv_info(conv)
                if info is None:
                    break
                ck = info[0]
                c = convs.get(ck)
                if c is None or not c.flagged or c.heads_gen != heads_gen:
                    break
                last_conv, last_ck, last_c = conv, ck, c
            if sender not in c.member_set or (after and after <= c.purged):
                break  # (after_seq at or below a group's purge point: the general path refuses it)
            last = seqs.get(ck)
            if last is None:
                break
            seq = last + 1
            after_seq = after if after < seq else last
            if ids_ck is not ck or ids_dk is not dk:
                last_ids = record_ids(ck, dk)
                ids_ck, ids_dk = ck, dk
            entry = _fo_stage_message(op, seq, after_seq, last_ids, ck, dkey, s_msgs, s_convidx, s_dedupe)
            seqs[ck] = seq
            dirty.add(ck)
            if bound is not None and local_id > bound:
                dmax[dk] = local_id
            positions = _fo_fanout(c.users, c.uks, heads, pend, entry)
            results.append(_fo_appended(appended, msg_id, seq, server_time, positions, after_seq))
            if server_time > hwm:
                hwm = server_time
            i += 1
    finally:
        w.hwm = hwm
    return i


cdef inline unsigned long long _fo_get_u64(const unsigned char *p) noexcept:
    # 8 bytes big-endian
    cdef unsigned long long v = 0
    cdef int k
    for k in range(8):
        v = (v << 8) | p[k]
    return v


cdef int _fo_flush_run(list out, list run, object key0, Py_ssize_t plen, unsigned long long first,
                       unsigned long long last, Py_ssize_t size) except -1:
    # one record for run (entries of key0's device, local_ids first..last)
    cdef Py_ssize_t k, m = PyList_GET_SIZE(run)
    cdef bytes key, value
    cdef unsigned char *p
    if m == 1:
        out.append((key0, run[0]))
        return 0
    key = PyBytes_FromStringAndSize(NULL, plen + 16)
    p = <unsigned char *>PyBytes_AS_STRING(key)
    memcpy(p, PyBytes_AS_STRING(key0), <size_t>plen)
    _fo_put_u64(p + plen, last)
    _fo_put_u64(p + plen + 8, first)
    value = PyBytes_FromStringAndSize(NULL, m * size)
    p = <unsigned char *>PyBytes_AS_STRING(value)
    for k in range(m):
        memcpy(p + k * size, PyBytes_AS_STRING(<object>PyList_GET_ITEM(run, k)), <size_t>size)
    out.append((key, value))
    return 0


def dedupe_items(items):
    """The ``dedupe`` records of a batch's staged entries, a run of a
    device's consecutive local_ids in one record (see pimcore._pure.fanout)."""
    cdef list out = []
    cdef list run = []
    cdef object item, key, value, key0 = None
    cdef Py_ssize_t j, n, plen = 0, size = 0
    cdef unsigned long long local_id, first = 0, last = 0
    if not _fo_is_list_exact(items):
        raise TypeError("items must be a list")
    for j in range(PyList_GET_SIZE(items)):
        item = <object>PyList_GET_ITEM(items, j)
        if not _fo_is_tuple_exact(item) or len(item) != 2:
            raise TypeError("items must be (key, value) tuples")
        key = <object>PyTuple_GET_ITEM(item, 0)
        value = <object>PyTuple_GET_ITEM(item, 1)
        if not _fo_is_bytes_exact(key) or not _fo_is_bytes_exact(value):
            raise TypeError("dedupe key and value must be bytes")
        n = PyBytes_GET_SIZE(key)
        if n < 9:
            raise ValueError("dedupe key too short")
        local_id = _fo_get_u64(<unsigned char *>PyBytes_AS_STRING(key) + n - 8)
        if (PyList_GET_SIZE(run) and local_id == last + 1 and last != _FO_U64_MAX
                and PyBytes_GET_SIZE(value) == size and n - 8 == plen
                and memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(key0), <size_t>plen) == 0):
            run.append(value)
            last = local_id
            continue
        if PyList_GET_SIZE(run):
            _fo_flush_run(out, run, key0, plen, first, last, size)
        key0, plen, first, last, size = key, n - 8, local_id, local_id, PyBytes_GET_SIZE(value)
        run = [value]
    if PyList_GET_SIZE(run):
        _fo_flush_run(out, run, key0, plen, first, last, size)
    return out


def dedupe_get(txn, db, dkey):
    """The ``dedupe`` entry of ``dkey`` in ``txn``'s sub-database ``db``, a
    single record or within a run, or None; StoreError (store corrupt) for a
    run record dedupe_items cannot have written (see pimcore._pure.fanout)."""
    return _fo_dedupe_get(txn, db, dkey)


cdef object _fo_dedupe_get(object txn, object db, object dkey):
    cdef Py_ssize_t n, size, vlen
    cdef object cur, key, value
    cdef const unsigned char *k
    cdef unsigned long long first, last, local_id
    if not _fo_is_bytes_exact(dkey):
        raise TypeError("dkey must be bytes")
    n = PyBytes_GET_SIZE(dkey)
    if n < 9:
        raise ValueError("dedupe key too short")
    cur = txn.cursor(db)
    if not cur.set_range(dkey):
        return None
    key = cur.key()
    if not _fo_is_bytes_exact(key):
        key = bytes(key)
    if PyBytes_GET_SIZE(key) != n + 8:
        return cur.value() if key == dkey else None
    k = <const unsigned char *>PyBytes_AS_STRING(key)
    if memcmp(k, PyBytes_AS_STRING(dkey), <size_t>(n - 8)) != 0:
        return None  # another device's run
    # A run of this device whose last local_id is at or above dkey's.
    first = _fo_get_u64(k + n)
    last = _fo_get_u64(k + n - 8)
    value = cur.value()
    vlen = len(value)
    # A run dedupe_items cannot have written (pimcore._pure.fanout.dedupe_run):
    # refused before any arithmetic (last - first + 1 wraps to 0 for 0..2^64-1).
    if (last <= first or last - first >= <unsigned long long>vlen
            or vlen % <Py_ssize_t>(last - first + 1) != 0
            or vlen // <Py_ssize_t>(last - first + 1) < 32):
        raise _FoStoreError(f"dedupe run {key.hex()} holds {vlen} bytes for local ids {first}..{last} (store corrupt)")
    size = vlen // <Py_ssize_t>(last - first + 1)
    local_id = _fo_get_u64(<const unsigned char *>PyBytes_AS_STRING(dkey) + n - 8)
    if local_id < first:
        return None
    return value[<Py_ssize_t>(local_id - first) * size : <Py_ssize_t>(local_id - first + 1) * size]
