# The core's durable send path, per message: the compiled twin of
# pimcore/_pure/send.py (read its docstring for the contract).  Same API, the
# same frames taken / sends finished, the same exceptions, as
# tests/test_send_fastpath.py checks.
#
# How it is fast: one C loop per decoded read instead of three Python method
# calls per SendReq (_dispatch, _on_send, _propose_send), the records stored
# straight into their slots through the record makers' tables
# (_fastpath_records.pxi), the msg id built in one buffer, the digest by a
# BLAKE2b in C fed the pieces (no joined copy, no hashlib object), the clock
# handed its ticks once per read.

from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcpy

cdef extern from *:
    """
    static inline int pimcore_sp_generic_getattro(PyObject *t) {
        return ((PyTypeObject *)t)->tp_getattro == PyObject_GenericGetAttr;
    }
    """
    bint _sp_generic_getattro "pimcore_sp_generic_getattro"(PyObject *t)

cdef extern from "Python.h":
    const char* _sp_utf8_of "PyUnicode_AsUTF8AndSize"(object, Py_ssize_t*) except NULL
    bint _sp_is_str_exact "PyUnicode_CheckExact"(object)
    bint _sp_is_long_exact "PyLong_CheckExact"(object)
    bint _sp_is_bytes_exact "PyBytes_CheckExact"(object)
    bint _sp_is_tuple_exact "PyTuple_CheckExact"(object)
    bint _sp_is_list_exact "PyList_CheckExact"(object)
    bint _sp_is_dict_exact "PyDict_CheckExact"(object)
    bint _sp_is_set_exact "PySet_CheckExact"(object)
    PyObject* _sp_dict_get "PyDict_GetItemWithError"(object, object) except? NULL
    unsigned long long _sp_as_u64 "PyLong_AsUnsignedLongLong"(object) except? 0xFFFFFFFFFFFFFFFFULL

cdef extern from *:
    """
    /* BLAKE2b (RFC 7693) with a 16-byte digest, no key: the digest of the
       send path, fed in pieces (conv, NUL, payload) without joining them and
       without a hashlib object per message.  tests/test_send_fastpath.py
       holds it to hashlib.blake2b(..., digest_size=16). */
    #include <stdint.h>
    #include <string.h>
    typedef struct {
        uint64_t h[8];
        uint64_t t0, t1;
        unsigned char buf[128];
        size_t buflen;
    } pimcore_sp_b2;
    static const uint64_t pimcore_sp_b2_iv[8] = {
        0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
        0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
    };
    static const unsigned char pimcore_sp_b2_sigma[12][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
        {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
        {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
        {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
        {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
        {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
        {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
        {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
        {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    };
    static inline uint64_t pimcore_sp_rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }
    static inline uint64_t pimcore_sp_load64(const unsigned char *p) {
        return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) | ((uint64_t)p[3] << 24)
            | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40) | ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
    }
    #define PIMCORE_SP_G(r, i, a, b, c, d) do { \
        a = a + b + m[pimcore_sp_b2_sigma[r][2 * (i)]]; d = pimcore_sp_rotr(d ^ a, 32); \
        c = c + d; b = pimcore_sp_rotr(b ^ c, 24); \
        a = a + b + m[pimcore_sp_b2_sigma[r][2 * (i) + 1]]; d = pimcore_sp_rotr(d ^ a, 16); \
        c = c + d; b = pimcore_sp_rotr(b ^ c, 63); } while (0)
    static void pimcore_sp_b2_compress(pimcore_sp_b2 *S, const unsigned char *block, int last) {
        uint64_t m[16], v[16];
        int i, r;
        for (i = 0; i < 16; i++) m[i] = pimcore_sp_load64(block + 8 * i);
        for (i = 0; i < 8; i++) { v[i] = S->h[i]; v[i + 8] = pimcore_sp_b2_iv[i]; }
        v[12] ^= S->t0;
        v[13] ^= S->t1;
        if (last) v[14] = ~v[14];
        /* unrolled, so that every message word index is a constant (the
           rounds' sigma lookups fold away): about twice as fast */
        #if defined(__GNUC__) && !defined(__clang__)
        #pragma GCC unroll 12
        #elif defined(__clang__)
        #pragma clang loop unroll(full)
        #endif
        for (r = 0; r < 12; r++) {
            PIMCORE_SP_G(r, 0, v[0], v[4], v[8], v[12]);
            PIMCORE_SP_G(r, 1, v[1], v[5], v[9], v[13]);
            PIMCORE_SP_G(r, 2, v[2], v[6], v[10], v[14]);
            PIMCORE_SP_G(r, 3, v[3], v[7], v[11], v[15]);
            PIMCORE_SP_G(r, 4, v[0], v[5], v[10], v[15]);
            PIMCORE_SP_G(r, 5, v[1], v[6], v[11], v[12]);
            PIMCORE_SP_G(r, 6, v[2], v[7], v[8], v[13]);
            PIMCORE_SP_G(r, 7, v[3], v[4], v[9], v[14]);
        }
        for (i = 0; i < 8; i++) S->h[i] ^= v[i] ^ v[i + 8];
    }
    static void pimcore_sp_b2_init(pimcore_sp_b2 *S) {
        int i;
        for (i = 0; i < 8; i++) S->h[i] = pimcore_sp_b2_iv[i];
        S->h[0] ^= 0x01010000ULL ^ 16;  /* depth 1, fanout 1, no key, 16-byte digest */
        S->t0 = S->t1 = 0;
        S->buflen = 0;
    }
    static inline void pimcore_sp_b2_count(pimcore_sp_b2 *S, uint64_t n) {
        S->t0 += n;
        if (S->t0 < n) S->t1++;
    }
    static void pimcore_sp_b2_update(pimcore_sp_b2 *S, const unsigned char *in, size_t n) {
        /* The last block is compressed by final (with the last-block flag),
           so a full buffer waits until more input arrives. */
        while (n > 0) {
            size_t room;
            if (S->buflen == 128) {
                pimcore_sp_b2_count(S, 128);
                pimcore_sp_b2_compress(S, S->buf, 0);
                S->buflen = 0;
            }
            room = 128 - S->buflen;
            if (room > n) room = n;
            memcpy(S->buf + S->buflen, in, room);
            S->buflen += room;
            in += room;
            n -= room;
        }
    }
    static void pimcore_sp_b2_final16(pimcore_sp_b2 *S, unsigned char *out) {
        int i;
        pimcore_sp_b2_count(S, (uint64_t)S->buflen);
        memset(S->buf + S->buflen, 0, 128 - S->buflen);
        pimcore_sp_b2_compress(S, S->buf, 1);
        for (i = 0; i < 16; i++) out[i] = (unsigned char)(S->h[i / 8] >> (8 * (i % 8)));
    }
    """
    ctypedef struct pimcore_sp_b2:
        pass
    void pimcore_sp_b2_init(pimcore_sp_b2 *S) noexcept
    void pimcore_sp_b2_update(pimcore_sp_b2 *S, const unsigned char *data, size_t n) noexcept
    void pimcore_sp_b2_final16(pimcore_sp_b2 *S, unsigned char *out) noexcept
cdef object _SP_SECOND = 1_000_000
cdef object _SP_MAX_TIME = (1 << 63) - 1
cdef object _SP_EMPTY = ()
cdef object _SP_ZERO = 0
cdef object _SP_FALSE = False
cdef object _SP_BUDGET_MAX = 1 << 62
cdef object _SP_NOBODY = object()  # no user (an empty slot of _SpUsers)


cdef object _sp_make(object maker, PyObject **args, Py_ssize_t n):
    # maker(*args[:n]) (borrowed references), with a compiled record maker's
    # slot stores done here: the same as its __call__ when every field is
    # given, without a tuple of the arguments.
    cdef _RecordMaker m
    cdef Py_ssize_t i
    cdef tuple t
    if type(maker) is _RecordMaker:
        m = <_RecordMaker>maker
        if m.n == n:
            obj = pimcore_cd_alloc(m.ptype)
            for i in range(n):
                pimcore_cd_set_slot(<PyObject*>obj, m.offsets[i], args[i])
            return obj
    t = PyTuple_New(n)
    for i in range(n):
        Py_INCREF(<object>args[i])
        PyTuple_SET_ITEM(t, i, <object>args[i])
    return maker(*t)


# Attribute reads of the records the send path handles (SendReq, NewMessage,
# Appended, the pending send), as slot reads: for an object whose type is
# exactly the one a layout was made for, whose attribute access is the
# generic one, and whose field is a slot of that very type (so the MRO finds
# its member descriptor first), reading the slot is what getattr does.  An
# empty slot, or any other type, takes getattr itself (its AttributeError).

cdef class _SpLayout:
    cdef object cls
    cdef tuple names
    cdef bint fast
    cdef Py_ssize_t off[16]


cdef _SpLayout _sp_new_layout(object cls, tuple names):
    cdef _SpLayout lay = _SpLayout.__new__(_SpLayout)
    cdef Py_ssize_t i
    lay.cls = cls
    lay.names = names
    lay.fast = _sp_generic_getattro(<PyObject*>cls) and len(names) <= 16
    if lay.fast:
        d = cls.__dict__
        for i in range(len(names)):
            descr = d.get(names[i])
            lay.off[i] = pimcore_cd_slot_offset(<PyObject*>cls, <PyObject*>descr if descr is not None else NULL)
            if lay.off[i] < 0:
                lay.fast = False
                break
    return lay


cdef list _sp_layouts = [None, None, None, None, None, None]
cdef tuple _SP_NAMES = (
    ("payload", "mentions", "mention_all", "conv", "local_id", "client_time", "after_seq"),  # 0: SendReq
    ("mentions", "local_id", "sender", "device", "conv", "client_time", "payload", "mention_all"),  # 1: NewMessage
    ("msg_id", "seq", "server_time", "positions", "after_seq"),  # 2: Appended
    ("waiters", "key"),  # 3: the pending send
    ("payload", "device", "sender"),  # 4: a Push entry that is a Message (push_slice)
    ("payload", "device", "sender"),  # 5: any other Push entry (the sender's own NewMessage)
)


cdef inline _SpLayout _sp_layout(object obj, int role):
    cdef object lay = (<list>_sp_layouts)[role]
    if lay is None or (<_SpLayout>lay).cls is not type(obj):
        lay = _sp_new_layout(type(obj), (<tuple>_SP_NAMES)[role])
        (<list>_sp_layouts)[role] = lay
    return <_SpLayout>lay


cdef inline object _sp_get(object obj, _SpLayout lay, int i):
    # obj.<name i of the layout's role>
    cdef PyObject *v
    if lay.fast and type(obj) is lay.cls:
        v = pimcore_cd_get_slot(<PyObject*>obj, lay.off[i])
        if v != NULL:
            return <object>v
    return getattr(obj, lay.names[i])


cdef bytes _sp_digest(object conv, object payload):
    # BLAKE2b-128 of conv (UTF-8) + b"\x00" + payload (conv a str, payload
    # bytes); None (no exception) when conv cannot be encoded (a lone
    # surrogate): the caller stops there.
    cdef Py_ssize_t n
    cdef const char *s
    cdef pimcore_sp_b2 S
    cdef unsigned char nul = 0
    cdef bytes out
    try:
        s = _sp_utf8_of(conv, &n)
    except UnicodeEncodeError:
        return None
    pimcore_sp_b2_init(&S)
    pimcore_sp_b2_update(&S, <const unsigned char *>s, <size_t>n)
    pimcore_sp_b2_update(&S, &nul, 1)
    pimcore_sp_b2_update(&S, <const unsigned char *>PyBytes_AS_STRING(payload), <size_t>PyBytes_GET_SIZE(payload))
    out = PyBytes_FromStringAndSize(NULL, 16)
    pimcore_sp_b2_final16(&S, <unsigned char *>PyBytes_AS_STRING(out))
    return out


def send_digest(conv, payload):
    """The 16-byte BLAKE2b digest of conv (UTF-8) + NUL + payload (see
    pimcore._pure.send)."""
    if not _sp_is_str_exact(conv):
        raise TypeError("conv must be str")
    if not _sp_is_bytes_exact(payload):
        raise TypeError("payload must be bytes")
    digest = _sp_digest(conv, payload)
    if digest is None:
        conv.encode()  # raises the UnicodeEncodeError
    return digest


def propose_sends(frames, c, now, limits, members, pending, clock, node_id, record_events,
                  new_message, new_pending, sendreq, ops, ctxs):
    """Propose the leading plain SendReqs of ``frames``; how many were taken
    (see pimcore._pure.send)."""
    cdef Py_ssize_t n, i
    cdef unsigned long long st
    cdef bytes msg_id
    cdef unsigned char *p
    cdef int k
    cdef bint limited
    cdef _SpLayout lay
    cdef PyObject *args[13]
    cdef str last_conv = None
    last_pair = None
    if not _sp_is_list_exact(frames) or not _sp_is_list_exact(ops) or not _sp_is_list_exact(ctxs):
        raise TypeError("frames, ops and ctxs must be lists")
    if not _sp_is_dict_exact(pending):
        raise TypeError("pending must be a dict")
    if not _sp_is_bytes_exact(node_id):
        raise TypeError("node_id must be bytes")
    if not _sp_is_long_exact(now):
        raise TypeError("now must be int")
    n = len(<list>frames)
    if n == 0:
        return 0
    user = c.user
    device = c.device
    conn = c.id
    inflight = c.inflight
    rate = limits.send_rate
    limited = bool(rate)
    burst = tokens = refill_at = t = None
    if limited:
        burst = float(limits.send_burst)
        tokens = c.tokens
        refill_at = c.refill_at
    window = limits.window
    max_payload = limits.max_payload
    last = clock.last
    i = 0
    while i < n:
        f = (<list>frames)[i]
        if type(f) is not sendreq:
            break
        lay = _sp_layout(f, 0)
        if limited:
            t = tokens + (now - refill_at) * rate / _SP_SECOND
            if not t < burst:
                t = burst
            if t < 1.0:
                break
        if inflight >= window:
            break
        payload = _sp_get(f, lay, 0)
        if not _sp_is_bytes_exact(payload) or <object>PyBytes_GET_SIZE(payload) > max_payload:
            break
        mentions = _sp_get(f, lay, 1)
        if not _sp_is_tuple_exact(mentions) or len(<tuple>mentions) != 0 or _sp_get(f, lay, 2) is not False:
            break
        conv = _sp_get(f, lay, 3)
        if not _sp_is_str_exact(conv):
            break
        if last_conv is None or not (conv is last_conv or <str>conv == last_conv):
            # once per run of frames to one conversation (a window of sends)
            last_pair = members(conv)
            last_conv = <str>conv
        pair = last_pair
        if not _sp_is_tuple_exact(pair) or (len(<tuple>pair) != 0 and user not in <tuple>pair):
            break
        local_id = _sp_get(f, lay, 4)
        if not _sp_is_long_exact(local_id):
            break
        key = (user, device, local_id)
        if key in <dict>pending:
            break
        digest = _sp_digest(conv, payload)
        if digest is None:
            break
        server_time = now if now > last else last + 1
        if server_time > _SP_MAX_TIME:
            break
        # Taken: nothing below can refuse it.
        if limited:
            tokens = t - 1.0
            refill_at = now
        inflight += 1
        last = server_time
        st = _sp_as_u64(server_time)
        msg_id = PyBytes_FromStringAndSize(NULL, 8 + PyBytes_GET_SIZE(node_id))
        p = <unsigned char *>PyBytes_AS_STRING(msg_id)
        for k in range(7, -1, -1):
            p[k] = <unsigned char>(st & 0xFF)
            st >>= 8
        memcpy(p + 8, PyBytes_AS_STRING(node_id), <size_t>PyBytes_GET_SIZE(node_id))
        client_time = _sp_get(f, lay, 5)
        after_seq = _sp_get(f, lay, 6)
        args[0] = <PyObject*>msg_id
        args[1] = <PyObject*>conv
        args[2] = <PyObject*>user
        args[3] = <PyObject*>device
        args[4] = <PyObject*>local_id
        args[5] = <PyObject*>client_time
        args[6] = <PyObject*>server_time
        args[7] = <PyObject*>payload
        args[8] = <PyObject*>digest
        args[9] = <PyObject*>after_seq
        args[10] = <PyObject*>record_events
        args[11] = <PyObject*>_SP_EMPTY
        args[12] = <PyObject*>_SP_FALSE
        op = _sp_make(new_message, args, 13)
        waiters = [conn]
        args[0] = <PyObject*>key
        args[1] = <PyObject*>digest
        args[2] = <PyObject*>waiters
        ctx = _sp_make(new_pending, args, 3)
        (<dict>pending)[key] = ctx
        (<list>ops).append(op)
        (<list>ctxs).append(ctx)
        i += 1
    if i:
        c.inflight = inflight
        if limited:
            c.tokens = tokens
            c.refill_at = refill_at
            c.strikes = 0
        clock.observe(last)
    return i


cdef class _SpUsers:
    # finish_sends' memory of the last two users of a run's positions whose
    # head is known and who are online (a 1:1 chat's sender and recipient):
    # their head as it is now in `heads`, their online devices, their list in
    # `fresh`, so that a window of messages between them looks each up once
    # instead of once per message.  Found by identity only (a miss takes the
    # lookups); right because nothing but the run itself changes those dicts
    # while it lasts, and to_pump already holds them.
    cdef object u0, head0, devs0, list0
    cdef object u1, head1, devs1, list1
    cdef bint older1  # which slot a new user replaces


cdef int _sp_check_containers(pending, heads, online, fresh, to_pump, conns, acks, stats) except -1:
    """The TypeErrors finish_send and finish_sends raise for their containers."""
    if not (_sp_is_dict_exact(pending) and _sp_is_dict_exact(heads) and _sp_is_dict_exact(online)
            and _sp_is_dict_exact(fresh) and _sp_is_dict_exact(conns) and _sp_is_dict_exact(acks)
            and _sp_is_dict_exact(stats)):
        raise TypeError("pending, heads, online, fresh, conns, acks and stats must be dicts")
    if not _sp_is_set_exact(to_pump):
        raise TypeError("to_pump must be a set")
    return 0


def finish_send(op, ctx, res, appended, pending, heads, online, fresh, to_pump, conns, acks, stats,
                new_ack, new_message, ok):
    """Finish a stored NewMessage of a committed batch if it is the common
    case (see pimcore._pure.send)."""
    _sp_check_containers(pending, heads, online, fresh, to_pump, conns, acks, stats)
    return _sp_finish_one(op, ctx, res, appended, pending, heads, online, fresh, to_pump, conns, acks, stats,
                          new_ack, new_message, ok, None) == 1


def finish_sends(ops, ctxs, results, start, newmessage, appended, pending, heads, online, fresh, to_pump, conns,
                 acks, stats, new_ack, new_message, ok):
    """Finish the run of common-case stored NewMessages of a committed batch
    from index ``start``; the index of the first op not taken (see
    pimcore._pure.send)."""
    cdef Py_ssize_t n, i
    if not ((_sp_is_list_exact(ops) or _sp_is_tuple_exact(ops)) and (_sp_is_list_exact(ctxs) or _sp_is_tuple_exact(ctxs))
            and (_sp_is_list_exact(results) or _sp_is_tuple_exact(results))):
        raise TypeError("ops, ctxs and results must be lists or tuples")
    if not _sp_is_long_exact(start):
        raise TypeError("start must be int")
    n = len(ops)
    if len(ctxs) != n or len(results) != n:
        raise ValueError("ops, ctxs and results must be of one length")
    if not 0 <= start <= n:
        raise ValueError("start must be within 0..len(ops)")
    _sp_check_containers(pending, heads, online, fresh, to_pump, conns, acks, stats)
    cdef _SpUsers users = _SpUsers.__new__(_SpUsers)
    users.u0 = users.u1 = _SP_NOBODY
    i = start
    while i < n:
        op = ops[i]
        if type(op) is not newmessage:
            break
        if _sp_finish_one(op, ctxs[i], results[i], appended, pending, heads, online, fresh, to_pump, conns, acks,
                          stats, new_ack, new_message, ok, users) == 0:
            break
        i += 1
    return i


cdef int _sp_finish_one(op, ctx, res, appended, pending, heads, online, fresh, to_pump, conns, acks, stats,
                        new_ack, new_message, ok, _SpUsers users) except -1:
    # finish_send after its checks of the containers: 1 done, 0 declined.
    # `users`: finish_sends' memory of the run's users (None: none).
    cdef PyObject *found
    cdef int k
    cdef _SpLayout lo, lr, lc
    cdef PyObject *args[18]
    if type(res) is not appended:
        return 0
    lc = _sp_layout(ctx, 3)
    waiters = _sp_get(ctx, lc, 0)
    if not _sp_is_list_exact(waiters) or len(<list>waiters) != 1:
        return 0
    only = (<list>waiters)[0]
    if not _sp_is_long_exact(only):
        return 0
    lo = _sp_layout(op, 1)
    mentions = _sp_get(op, lo, 0)
    if not _sp_is_tuple_exact(mentions) or len(<tuple>mentions) != 0:
        return 0
    (<dict>pending).pop(_sp_get(ctx, lc, 1), None)
    (<dict>stats)["messages_stored"] += 1
    lr = _sp_layout(res, 2)
    msg_id = _sp_get(res, lr, 0)
    seq = _sp_get(res, lr, 1)
    server_time = _sp_get(res, lr, 2)
    local_id = _sp_get(op, lo, 1)
    args[0] = <PyObject*>local_id
    args[1] = <PyObject*>ok
    args[2] = <PyObject*>msg_id
    args[3] = <PyObject*>seq
    args[4] = <PyObject*>server_time
    ack = _sp_make(new_ack, args, 5)
    sender = _sp_get(op, lo, 2)
    device = _sp_get(op, lo, 3)
    conv = after_seq = client_time = payload = mention_all = None
    loaded = False
    for item in _sp_get(res, lr, 3):
        # (checked by hand: Cython's unpacking words its errors otherwise than CPython's)
        if not _sp_is_tuple_exact(item) and not _sp_is_list_exact(item):
            raise TypeError(f"Appended.positions must be (user, position) pairs, not {type(item).__name__}")
        if len(item) != 2:
            raise ValueError(f"Appended.positions must be (user, position) pairs, got a {type(item).__name__} of {len(item)}")
        user, pos = item
        k = -1
        if users is not None:
            if user is users.u0:
                k = 0
            elif user is users.u1:
                k = 1
        if k >= 0:
            # known: the same as the lookups below, without them
            if pos > (users.head0 if k == 0 else users.head1):
                (<dict>heads)[user] = pos
                if k == 0:
                    users.head0 = pos
                else:
                    users.head1 = pos
            devs = users.devs0 if k == 0 else users.devs1
        else:
            found = _sp_dict_get(heads, user)
            if found == NULL or <object>found is None:
                continue
            head = <object>found
            if users is not None:
                # A user equal to a remembered one but another object (or
                # not a str: it may equal anything): what is remembered for
                # it may go stale below (its head, moved by this lookup).
                if not _sp_is_str_exact(user):
                    users.u0 = users.u1 = _SP_NOBODY
                else:
                    if _sp_is_str_exact(users.u0) and user == users.u0:
                        users.u0 = _SP_NOBODY
                    if _sp_is_str_exact(users.u1) and user == users.u1:
                        users.u1 = _SP_NOBODY
            if pos > head:
                (<dict>heads)[user] = pos
                head = pos
            found = _sp_dict_get(online, user)
            if found == NULL or <object>found is None:
                continue
            devs = <object>found
            (<set>to_pump).add(user)
        if user == sender and len(devs) == 1 and device in devs:
            m = op
        else:
            if not loaded:
                # read once per message, in the order the pure twin reads
                # them for its first Message
                conv = _sp_get(op, lo, 4)
                client_time = _sp_get(op, lo, 5)
                payload = _sp_get(op, lo, 6)
                local_id = _sp_get(op, lo, 1)
                after_seq = _sp_get(res, lr, 4)
                mention_all = _sp_get(op, lo, 7)
                loaded = True
            args[0] = <PyObject*>pos
            args[1] = <PyObject*>msg_id
            args[2] = <PyObject*>conv
            args[3] = <PyObject*>seq
            args[4] = <PyObject*>sender
            args[5] = <PyObject*>device
            args[6] = <PyObject*>client_time
            args[7] = <PyObject*>server_time
            args[8] = <PyObject*>payload
            args[9] = <PyObject*>_SP_ZERO
            args[10] = <PyObject*>local_id
            args[11] = <PyObject*>after_seq
            args[12] = <PyObject*>_SP_ZERO
            args[13] = <PyObject*>_SP_ZERO
            args[14] = <PyObject*>_SP_FALSE
            args[15] = <PyObject*>_SP_FALSE
            args[16] = <PyObject*>_SP_EMPTY
            args[17] = <PyObject*>mention_all
            m = _sp_make(new_message, args, 18)
        if k >= 0:
            (<list>(users.list0 if k == 0 else users.list1)).append((pos, m))
            continue
        found = _sp_dict_get(fresh, user)
        if found == NULL or <object>found is None:
            entries = [(pos, m)]
            (<dict>fresh)[user] = entries
        else:
            entries = <object>found
            entries.append((pos, m))
        if users is not None and _sp_is_list_exact(entries) and _sp_is_str_exact(user):
            # remembered in place of a forgotten one, else of the one used
            # longer ago
            if users.u0 is _SP_NOBODY or (users.u1 is not _SP_NOBODY and not users.older1):
                users.u0, users.head0, users.devs0, users.list0 = user, head, devs, entries
                users.older1 = True
            else:
                users.u1, users.head1, users.devs1, users.list1 = user, head, devs, entries
                users.older1 = False
    found = _sp_dict_get(conns, only)
    if found != NULL and <object>found is not None:
        c = <object>found
        c.inflight -= 1
        found = _sp_dict_get(acks, only)
        if found == NULL or <object>found is None:
            (<dict>acks)[only] = [ack]
        else:
            queued = <object>found
            queued.append(ack)
    return 1


def push_slice(entries, budget, device, user, message):
    """The Push for a device from its next entries, or None (see
    pimcore._pure.send)."""
    cdef long long b, n, size = 0
    cdef Py_ssize_t i = 0
    cdef list pushed
    cdef _SpLayout lay
    if not _sp_is_list_exact(entries) and not _sp_is_tuple_exact(entries):
        return None
    if len(entries) == 0 or not _sp_is_long_exact(budget) or not -_SP_BUDGET_MAX <= budget <= _SP_BUDGET_MAX:
        return None
    b = budget
    pushed = []
    upto = None
    for item in entries:
        # (checked by hand: Cython's unpacking words its errors otherwise than CPython's)
        if not _sp_is_tuple_exact(item) and not _sp_is_list_exact(item):
            raise TypeError(f"push entries must be (position, entry) pairs, not {type(item).__name__}")
        if len(item) != 2:
            raise ValueError(f"push entries must be (position, entry) pairs, got a {type(item).__name__} of {len(item)}")
        pos, m = item
        lay = _sp_layout(m, 4 if type(m) is message else 5)
        payload = _sp_get(m, lay, 0)
        if not _sp_is_bytes_exact(payload):
            return None
        n = PyBytes_GET_SIZE(payload) + 32
        b -= n
        if b < 0 and i > 0:
            break
        i += 1
        upto = pos
        if _sp_get(m, lay, 1) == device and _sp_get(m, lay, 2) == user:
            continue
        if not isinstance(m, message):
            return None
        pushed.append(m)
        size += n
    return tuple(pushed), upto, size
