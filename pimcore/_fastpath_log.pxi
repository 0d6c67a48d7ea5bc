# Command log records: the compiled twin of pimcore/_pure/log.py (read its
# docstring for the contract).
#
# Why: under ``durability log`` every batch is written to the command log
# before its ack, as a pickle of ``[(kind index, [field tuple, ...]), ...]``
# (pimcore.store.lmdb._encode_ops).  Pickling through the C pickler still
# costs a getattr per field, a tuple per op and a memo-dict insert per object:
# about 0.8 µs per NewMessage, 4-9 % of the broker's CPU at 50 x 16.  This
# encoder writes the same pickle opcodes straight from the instance slots
# into one buffer.  Any value it does not know (a float, an enum, a str
# with a lone surrogate, an int beyond 64 bits, a subclass...) or any op of
# another class hands the whole batch to the fallback, so every record is
# either this encoder's or the fallback's, and both read back through the
# same unpickler as the same ops.  The opcodes are pickle's (protocol 2+
# subset; Lib/pickletools.py documents each): no memo, no frames -- the
# unpickler needs neither.

cdef extern from "Python.h":
    long long _lg_as_i64 "PyLong_AsLongLongAndOverflow"(object, int*) except? -1

cdef enum:
    _LG_MAX_FIELDS = 32

cdef struct _LgKind:
    PyObject* cls
    Py_ssize_t index  # in the kinds given to log_encoder (the record's kind index)
    Py_ssize_t n
    Py_ssize_t offsets[_LG_MAX_FIELDS]


cdef struct _LgBuf:
    unsigned char* p
    Py_ssize_t len
    Py_ssize_t cap


cdef int _lg_grow(_LgBuf* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = b.cap
    cdef unsigned char* q
    while cap - b.len < need:
        cap = cap * 2 if cap else 4096
    q = <unsigned char*>realloc(b.p, cap)
    if q == NULL:
        raise MemoryError()
    b.p = q
    b.cap = cap
    return 0


cdef inline int _lg_put(_LgBuf* b, const void* data, Py_ssize_t n) except -1:
    if b.cap - b.len < n:
        _lg_grow(b, n)
    memcpy(b.p + b.len, data, n)
    b.len += n
    return 0


cdef inline int _lg_op(_LgBuf* b, unsigned char op) except -1:
    if b.cap - b.len < 1:
        _lg_grow(b, 1)
    b.p[b.len] = op
    b.len += 1
    return 0


cdef inline int _lg_op_len(_LgBuf* b, unsigned char short_op, unsigned char long_op, Py_ssize_t n) except -1:
    # A length-prefixed value's opcode and length: 1 byte below 256, else 4 (LE).
    cdef unsigned char head[5]
    if n < 256:
        head[0] = short_op
        head[1] = <unsigned char>n
        return _lg_put(b, head, 2)
    head[0] = long_op
    head[1] = n & 0xFF
    head[2] = (n >> 8) & 0xFF
    head[3] = (n >> 16) & 0xFF
    head[4] = (n >> 24) & 0xFF
    return _lg_put(b, head, 5)


cdef int _lg_int(_LgBuf* b, object v) except -1:
    # 1 if written; 0: not a 64-bit int (the fallback takes the batch).
    cdef int overflow = 0
    cdef long long x = _lg_as_i64(v, &overflow)
    cdef unsigned long long u
    cdef unsigned char out[10]
    cdef int i
    if overflow:
        return 0
    if 0 <= x < 256:
        out[0] = b"K"[0]  # BININT1
        out[1] = <unsigned char>x
        return _lg_put(b, out, 2) + 1
    if 0 <= x < 65536:
        out[0] = b"M"[0]  # BININT2
        out[1] = x & 0xFF
        out[2] = (x >> 8) & 0xFF
        return _lg_put(b, out, 3) + 1
    u = <unsigned long long>x
    if -2147483648 <= x <= 2147483647:
        out[0] = b"J"[0]  # BININT: 4 bytes, signed
        for i in range(4):
            out[1 + i] = (u >> (8 * i)) & 0xFF
        return _lg_put(b, out, 5) + 1
    out[0] = 0x8A  # LONG1: a length byte, then that many bytes, signed
    out[1] = 8
    for i in range(8):
        out[2 + i] = (u >> (8 * i)) & 0xFF
    return _lg_put(b, out, 10) + 1


cdef int _lg_value(_LgBuf* b, object v, int depth) except -1:
    # 1 if ``v`` was written; 0 if the fallback must take the batch.
    cdef Py_ssize_t n, i
    cdef const char* s
    cdef object t = type(v)
    if v is None:
        return _lg_op(b, b"N"[0]) + 1
    if v is True:
        return _lg_op(b, 0x88) + 1  # NEWTRUE
    if v is False:
        return _lg_op(b, 0x89) + 1  # NEWFALSE
    if t is int:
        return _lg_int(b, v)
    if t is bytes:
        n = PyBytes_GET_SIZE(v)
        if n > 0x7FFFFFFF:
            return 0
        _lg_op_len(b, b"C"[0], b"B"[0], n)  # SHORT_BINBYTES / BINBYTES
        return _lg_put(b, PyBytes_AS_STRING(v), n) + 1
    if t is str:
        s = _cd_utf8_of(v, &n)
        if s == NULL:  # a lone surrogate: pickle writes it with surrogatepass
            PyErr_Clear()
            return 0
        if n > 0x7FFFFFFF:
            return 0
        _lg_op_len(b, 0x8C, b"X"[0], n)  # SHORT_BINUNICODE / BINUNICODE
        return _lg_put(b, s, n) + 1
    if t is tuple and depth < 2:
        n = len(v)
        if n == 0:
            return _lg_op(b, b")"[0]) + 1  # EMPTY_TUPLE
        if n > 3:
            _lg_op(b, b"("[0])  # MARK
        for i in range(n):
            if not _lg_value(b, (<tuple>v)[i], depth + 1):
                return 0
        if n > 3:
            return _lg_op(b, b"t"[0]) + 1  # TUPLE
        return _lg_op(b, 0x84 + n) + 1  # TUPLE1, TUPLE2, TUPLE3
    return 0


cdef class _LogEncoder:
    cdef object fallback
    cdef bytes prefix
    cdef object classes  # (keeps the classes of ``kinds`` alive)
    cdef Py_ssize_t nkinds
    cdef _LgKind* kinds

    def __dealloc__(self):
        free(self.kinds)

    def __call__(self, ops):
        cdef _LgBuf b
        cdef Py_ssize_t i, j, n, k, run_kind
        cdef _LgKind* kind
        cdef PyObject* cls
        cdef PyObject* field
        cdef object op
        if not (_cd_is_tuple_exact(ops) or _cd_is_list_exact(ops)):
            return self.fallback(ops)
        b.p = NULL
        b.len = 0
        b.cap = 0
        try:
            _lg_put(&b, PyBytes_AS_STRING(self.prefix), PyBytes_GET_SIZE(self.prefix))
            _lg_put(&b, b"\x80\x05]", 3)  # PROTO 5, EMPTY_LIST: the list of runs
            n = len(ops)
            if n:
                _lg_op(&b, b"("[0])  # MARK: the runs
            run_kind = -1
            for i in range(n):
                op = ops[i]
                cls = <PyObject*>Py_TYPE(op)
                k = 0
                while k < self.nkinds and self.kinds[k].cls != cls:
                    k += 1
                if k == self.nkinds:
                    return self.fallback(ops)  # not a kind this encoder knows (the fallback's error)
                if k != run_kind:
                    if run_kind >= 0:
                        _lg_put(&b, b"e\x86", 2)  # APPENDS (the run's ops), TUPLE2 (index, ops)
                    _lg_int(&b, self.kinds[k].index)
                    _lg_put(&b, b"](", 2)  # EMPTY_LIST, MARK: the run's ops
                    run_kind = k
                kind = &self.kinds[k]
                _lg_op(&b, b"("[0])  # MARK: the op's fields
                for j in range(kind.n):
                    field = pimcore_cd_get_slot(<PyObject*>op, kind.offsets[j])
                    if field == NULL or not _lg_value(&b, <object>field, 0):
                        return self.fallback(ops)
                _lg_op(&b, b"t"[0])  # TUPLE
            if run_kind >= 0:
                _lg_put(&b, b"e\x86e", 3)  # close the last run, APPENDS: the runs
            _lg_op(&b, b"."[0])  # STOP
            return PyBytes_FromStringAndSize(<char*>b.p, b.len)
        finally:
            free(b.p)

    def __repr__(self):
        return f"log_encoder({self.nkinds} kinds)"


def log_encoder(kinds, prefix, fallback):
    """A command log record encoder (see pimcore/_pure/log.py): a callable
    ``encode(ops) -> bytes``; ``prefix`` then a pickle of ``[(index of the
    op's class in kinds, [field tuple, ...]), ...]`` for each run of ops of
    one class, or ``fallback(ops)`` (its value or its error) for a batch
    this encoder does not take.  TypeError if ``kinds`` is not a sequence
    of dataclass types, ``prefix`` not bytes or ``fallback`` not callable."""
    cdef _LogEncoder e
    cdef Py_ssize_t j, k
    kinds = tuple(kinds)
    if not all(isinstance(cls, type) and _cd_dataclasses.is_dataclass(cls) for cls in kinds):
        raise TypeError("log_encoder needs a sequence of dataclass types")
    if type(prefix) is not bytes:
        raise TypeError("log_encoder's prefix must be bytes")
    if not callable(fallback):
        raise TypeError("log_encoder's fallback must be callable")
    e = _LogEncoder.__new__(_LogEncoder)
    e.fallback = fallback
    e.prefix = prefix
    e.classes = kinds
    e.kinds = <_LgKind*>malloc(sizeof(_LgKind) * max(len(kinds), 1))
    if e.kinds == NULL:
        raise MemoryError()
    e.nkinds = 0
    for index, cls in enumerate(kinds):
        fields = _cd_dataclasses.fields(cls)
        if len(fields) > _LG_MAX_FIELDS or cls in kinds[:index]:
            continue  # (its ops go to the fallback)
        k = e.nkinds
        e.kinds[k].cls = <PyObject*>cls
        e.kinds[k].index = index
        e.kinds[k].n = len(fields)
        ok = True
        for j, f in enumerate(fields):
            descr = cls.__dict__.get(f.name)
            e.kinds[k].offsets[j] = pimcore_cd_slot_offset(<PyObject*>cls, <PyObject*>descr if descr is not None else NULL)
            if e.kinds[k].offsets[j] < 0:
                ok = False
        if ok:
            e.nkinds += 1
    return e
