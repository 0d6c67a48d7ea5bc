# Wire codec: the compiled twin of pimcore/_pure/codec.py.  docs/PROTOCOL.md is
# the spec; the pure module's docstring lists the input-acceptance decisions,
# which this file mirrors exactly (same accepted inputs, same exception class,
# code and message), as the differential tests in tests/test_codec.py check.
#
# How it is fast:
# * one C table per record (kind + slot offset of every field), built at import
#   from _CODEC_SCHEMA and validated against the live classes;
# * encode writes varints into a stack buffer (heap only for big frames) and
#   reads fields straight from the instance slots;
# * decode allocates instances with tp_alloc and stores fields straight into
#   their slots -- what object.__setattr__ / the member descriptor does, minus
#   the frozen-dataclass __setattr__ and the attribute lookups.  The dataclass
#   __init__ only assigns fields, so the result is indistinguishable.
# Any class that does not pass the import-time validation silently takes the
# generic route (cls.__new__ + PyObject_GenericSetAttr / getattr).

from cpython.object cimport PyObject, PyTypeObject, Py_TYPE, PyObject_GenericSetAttr
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_Occurred, PyErr_Clear, PyErr_ExceptionMatches
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from cpython.ref cimport Py_INCREF, Py_XDECREF
from libc.stdint cimport uint64_t, int64_t
from libc.string cimport memcpy, memmove
from libc.stdlib cimport malloc, realloc, free

import dataclasses as _cd_dataclasses
import sys as _cd_sys

from pimcore import frames as _cd_F
from pimcore.errors import EncodeError as _CdEncodeError
from pimcore.errors import ErrorCode as _CdErrorCode
from pimcore.errors import FrameTooLarge as _CdFrameTooLarge
from pimcore.errors import ProtocolError as _CdProtocolError

cdef extern from "Python.h":
    # Re-declared without Cython's automatic error checks: the hot path tests
    # the C sentinel itself and turns the pending exception into EncodeError /
    # ProtocolError in a cold helper.
    const char* _cd_utf8_of "PyUnicode_AsUTF8AndSize"(object, Py_ssize_t*)
    PyObject* _cd_decode_utf8 "PyUnicode_DecodeUTF8"(const char*, Py_ssize_t, const char*)
    unsigned long long _cd_as_u64 "PyLong_AsUnsignedLongLong"(object)
    long long _cd_as_i64 "PyLong_AsLongLong"(object)
    object _cd_from_u64 "PyLong_FromUnsignedLongLong"(unsigned long long)
    object _cd_from_i64 "PyLong_FromLongLong"(long long)
    bint _cd_is_long "PyLong_Check"(object)
    bint _cd_is_bool "PyBool_Check"(object)
    bint _cd_is_str "PyUnicode_Check"(object)
    bint _cd_is_bytes "PyBytes_Check"(object)
    bint _cd_is_bytes_exact "PyBytes_CheckExact"(object)
    bint _cd_is_tuple_exact "PyTuple_CheckExact"(object)
    bint _cd_is_list_exact "PyList_CheckExact"(object)

cdef extern from *:
    """
    #include "structmember.h"  /* PyMemberDef (in descrobject.h from 3.12 on) */
    /* Slot access for __slots__ classes, exactly as a member descriptor does it
       (PyMember_GetOne / PyMember_SetOne for T_OBJECT_EX) minus the lookup.
       Only offsets validated by pimcore_cd_slot_offset + the import-time
       round-trip check are ever used. */
    static inline PyObject *pimcore_cd_get_slot(PyObject *obj, Py_ssize_t off) {
        return *(PyObject **)((char *)obj + off);
    }
    static inline void pimcore_cd_set_slot(PyObject *obj, Py_ssize_t off, PyObject *v) {
        PyObject **slot = (PyObject **)((char *)obj + off);
        PyObject *old = *slot;
        Py_INCREF(v);
        *slot = v;
        Py_XDECREF(old);
    }
    static Py_ssize_t pimcore_cd_slot_offset(PyObject *cls, PyObject *descr) {
        PyMemberDef *m;
        if (descr == NULL || Py_TYPE(descr) != &PyMemberDescr_Type) return -1;
        m = ((PyMemberDescrObject *)descr)->d_member;
        /* 16 = T_OBJECT_EX / Py_T_OBJECT_EX; 1 = READONLY / Py_READONLY */
        if (m->type != 16 || (m->flags & 1)) return -1;
        if (m->offset < (Py_ssize_t)sizeof(PyObject)
            || m->offset + (Py_ssize_t)sizeof(PyObject *) > ((PyTypeObject *)cls)->tp_basicsize)
            return -1;
        return m->offset;
    }
    static PyObject *pimcore_cd_alloc(PyObject *cls) {
        return ((PyTypeObject *)cls)->tp_alloc((PyTypeObject *)cls, 0);
    }
    static int pimcore_cd_generic_alloc(PyObject *cls) {
        return ((PyTypeObject *)cls)->tp_alloc == PyType_GenericAlloc;
    }
    """
    PyObject* pimcore_cd_get_slot(PyObject* obj, Py_ssize_t off)
    void pimcore_cd_set_slot(PyObject* obj, Py_ssize_t off, PyObject* v)
    Py_ssize_t pimcore_cd_slot_offset(PyObject* cls, PyObject* descr)
    object pimcore_cd_alloc(PyObject* cls)
    int pimcore_cd_generic_alloc(PyObject* cls)


DEFAULT_MAX_FRAME_SIZE = 1 << 20
# Head flag bit 0: the body is one zstd frame (section 7 of docs/PROTOCOL.md).
FLAG_ZSTD = 0x01

# Same table as pimcore/_pure/codec.py SCHEMA, kept separately on purpose (see
# there).  Kinds are spelled as in the frames.py comments.
_CODEC_SCHEMA = {
    _cd_F.Login: (("token", "b"), ("device", "t"), ("client_time", "s"), ("position", "u"), ("caps", "u"), ("epoch", "b"), ("sent", "u")),
    _cd_F.LoginAck: (
        ("user", "t"), ("device", "t"), ("server_time", "u"), ("position", "u"), ("head", "u"),
        ("gap", "?"), ("max_frame", "u"), ("max_payload", "u"), ("window", "u"),
        ("heartbeat_ms", "u"), ("caps", "u"), ("epoch", "b"), ("resync", "?"), ("states", "u"),
    ),
    _cd_F.CalibrateReq: (("client_time", "s"),),
    _cd_F.CalibrateResp: (("client_time", "s"), ("server_time", "u")),
    _cd_F.SendReq: (
        ("local_id", "u"), ("conv", "t"), ("client_time", "s"), ("payload", "b"), ("after_seq", "u"),
        ("mentions", "[Mention]"), ("mention_all", "?"),
    ),
    _cd_F.SendAck: (("local_id", "u"), ("code", "u"), ("msg_id", "b"), ("seq", "u"), ("server_time", "u")),
    _cd_F.Push: (("position", "u"), ("messages", "[Message]")),
    _cd_F.PushAck: (("position", "u"),),
    _cd_F.Read: (("conv", "t"), ("seq", "u")),
    _cd_F.ReadStates: (("entries", "[ReadState]"),),
    _cd_F.ReadReceipt: (("conv", "t"), ("reader", "t"), ("seq", "u")),
    _cd_F.HistoryReq: (("req_id", "u"), ("conv", "t"), ("from_seq", "u"), ("limit", "u"), ("backward", "?")),
    _cd_F.HistoryResp: (("req_id", "u"), ("conv", "t"), ("code", "u"), ("messages", "[Message]"), ("more", "?")),
    _cd_F.ReadersReq: (("req_id", "u"), ("conv", "t")),
    _cd_F.ReadersResp: (("req_id", "u"), ("conv", "t"), ("code", "u"), ("readers", "[Reader]")),
    _cd_F.AmendReq: (("local_id", "u"), ("conv", "t"), ("target", "u"), ("action", "u"), ("client_time", "s"), ("payload", "b")),
    _cd_F.ConvListReq: (("req_id", "u"), ("cursor", "b"), ("limit", "u"), ("include_hidden", "?")),
    _cd_F.ConvListResp: (("req_id", "u"), ("code", "u"), ("entries", "[ConvEntry]"), ("cursor", "b"), ("more", "?")),
    _cd_F.ConvSetReq: (("req_id", "u"), ("conv", "t"), ("pinned", "u"), ("muted", "u"), ("hidden", "u")),
    _cd_F.ConvSetResp: (("req_id", "u"), ("conv", "t"), ("code", "u")),
    _cd_F.ConvUpdate: (("entries", "[ConvEntry]"),),
    _cd_F.ConvPurged: (("conv", "t"), ("last_seq", "u"), ("gone", "?")),
    _cd_F.Typing: (("conv", "t"), ("active", "?"), ("user", "t"), ("ttl_ms", "u")),
    _cd_F.PresenceSub: (("req_id", "u"), ("users", "[PresenceUser]")),
    _cd_F.Presence: (("req_id", "u"), ("code", "u"), ("entries", "[PresenceEntry]")),
    _cd_F.PresencePrivacy: (("mode", "u"),),
    _cd_F.Ping: (("nonce", "u"),),
    _cd_F.Pong: (("nonce", "u"),),
    _cd_F.Error: (("code", "u"), ("ref", "u"), ("reason", "t")),
    _cd_F.Close: (("code", "u"), ("reason", "t")),
    _cd_F.Message: (
        ("position", "u"), ("msg_id", "b"), ("conv", "t"), ("seq", "u"), ("sender", "t"),
        ("device", "t"), ("client_time", "s"), ("server_time", "u"), ("payload", "b"),
        ("kind", "u"), ("local_id", "u"), ("after_seq", "u"),
        ("target", "u"), ("edited", "u"), ("recalled", "?"), ("deleted", "?"),
        ("mentions", "[Mention]"), ("mention_all", "?"),
    ),
    _cd_F.ReadState: (("conv", "t"), ("read_seq", "u"), ("last_seq", "u"), ("unread", "u")),
    _cd_F.Reader: (("user", "t"), ("read_seq", "u")),
    _cd_F.Mention: (("user", "t"),),
    _cd_F.ConvEntry: (
        ("conv", "t"), ("last", "[Message]"), ("read_seq", "u"), ("last_seq", "u"), ("unread", "u"),
        ("mention_count", "u"), ("pinned", "?"), ("muted", "?"), ("hidden", "?"),
    ),
    _cd_F.PresenceUser: (("user", "t"),),
    _cd_F.PresenceEntry: (("user", "t"), ("state", "u"), ("last_seen", "u")),
}

cdef enum:
    _CD_U = 1
    _CD_S = 2
    _CD_B = 3
    _CD_T = 4
    _CD_BOOL = 5
    _CD_LIST = 6

cdef enum:
    _CD_MAXF = 24     # most fields of any record (Message has 18)
    _CD_MAXREC = 48   # records in the table (31 frames + 7 nested, with room)

# The length prefix is at most 5 varint bytes, so no frame can be longer.
cdef uint64_t _CD_MAX_LENGTH = (<uint64_t>1 << 35) - 1
cdef unsigned char _CD_HEAD = _cd_F.PROTOCOL_VERSION << 4   # the version in the high nibble, no flags

cdef struct _CdField:
    int kind
    int sub             # record index of the items, for _CD_LIST
    Py_ssize_t offset   # slot offset in the instance
    PyObject* name      # interned attribute name (kept alive by _cd_keep)

cdef struct _CdRec:
    PyObject* cls       # kept alive by _cd_keep
    int ftype           # frame type byte; 0 for nested records
    int nfields
    bint fast           # tp_alloc + direct slot access validated for this class
    _CdField fields[24]

cdef _CdRec _cd_recs[48]
cdef int _cd_nframes = 0
cdef int _cd_by_type[256]   # type byte -> index in _cd_recs, or -1
cdef list _cd_keep = []


# ------------------------------------------------------------------ errors
# Cold paths, kept out of line.  Messages match the pure twin word for word.

cdef int _cd_enc_fail(str msg) except -1:
    raise _CdEncodeError(msg)

cdef int _cd_type_fail(_CdField* f, object v, str expected) except -1:
    raise _CdEncodeError(f"field {<object>f.name!r}: expected {expected}, got {type(v).__name__}")

cdef int _cd_get_fail(_CdField* f) except -1:
    raise _CdEncodeError(f"field {<object>f.name!r} is not set")

cdef int _cd_u_range_fail(_CdField* f, object v) except -1:
    PyErr_Clear()
    n = int.__index__(v)
    if n < 0:
        raise _CdEncodeError(f"field {<object>f.name!r}: {n} is negative (u is unsigned)")
    raise _CdEncodeError(f"field {<object>f.name!r}: {n} does not fit in 64 bits")

cdef int _cd_s_range_fail(_CdField* f, object v) except -1:
    PyErr_Clear()
    n = int.__index__(v)
    raise _CdEncodeError(f"field {<object>f.name!r}: {n} does not fit in a signed 64-bit int")

cdef int _cd_text_fail(_CdField* f, object v) except -1:
    if not PyErr_ExceptionMatches(UnicodeEncodeError):
        return -1  # e.g. MemoryError: let it propagate untouched
    PyErr_Clear()
    try:
        str.encode(v, "utf-8")  # re-run in Python only to get the same reason text
    except UnicodeEncodeError as exc:
        raise _CdEncodeError(f"field {<object>f.name!r}: not encodable as UTF-8 ({exc.reason})") from None
    raise _CdEncodeError(f"field {<object>f.name!r}: not encodable as UTF-8")

cdef int _cd_malformed(str msg) except -1:
    raise _CdProtocolError(_CdErrorCode.MALFORMED_FRAME, msg)

cdef int _cd_utf8_fail() except -1:
    if not PyErr_ExceptionMatches(UnicodeDecodeError):
        return -1
    PyErr_Clear()
    raise _CdProtocolError(_CdErrorCode.MALFORMED_FRAME, "invalid UTF-8 in text field")


# ------------------------------------------------------------------ encode

cdef struct _CdW:
    unsigned char* buf
    Py_ssize_t n
    Py_ssize_t cap
    bint heap           # buf is malloc'ed (else it is the caller's stack buffer)

cdef int _cd_w_grow(_CdW* w, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap
    cdef unsigned char* nb
    if extra > (<Py_ssize_t>1 << 62) - w.n:
        raise MemoryError()
    cap = w.cap * 2
    if cap < w.n + extra:
        cap = w.n + extra
    if w.heap:
        nb = <unsigned char*>realloc(w.buf, <size_t>cap)
    else:
        nb = <unsigned char*>malloc(<size_t>cap)
        if nb != NULL:
            memcpy(nb, w.buf, <size_t>w.n)
    if nb == NULL:
        raise MemoryError()
    w.buf = nb
    w.cap = cap
    w.heap = True
    return 0

cdef inline int _cd_w_need(_CdW* w, Py_ssize_t extra) except -1:
    if w.cap - w.n < extra:
        return _cd_w_grow(w, extra)
    return 0

cdef inline void _cd_w_u(_CdW* w, uint64_t v) noexcept:
    # The caller reserved 10 bytes (the longest u varint).
    cdef unsigned char* q = w.buf + w.n
    while v >= 0x80:
        q[0] = <unsigned char>(v | 0x80)
        v >>= 7
        q += 1
    q[0] = <unsigned char>v
    w.n = (q - w.buf) + 1

cdef inline object _cd_field_value(object obj, _CdRec* rec, _CdField* f):
    cdef PyObject* raw
    if rec.fast:
        raw = pimcore_cd_get_slot(<PyObject*>obj, f.offset)
        if raw == NULL:  # instance made with __new__ and never initialised
            _cd_get_fail(f)
        return <object>raw
    try:
        return getattr(obj, <object>f.name)
    except AttributeError:
        _cd_get_fail(f)

cdef int _cd_enc_record(_CdW* w, object obj, _CdRec* rec) except -1:
    cdef int i, kind
    cdef _CdField* f
    cdef _CdRec* sub
    cdef uint64_t u
    cdef long long s
    cdef const char* data
    cdef Py_ssize_t size
    cdef object v
    for i in range(rec.nfields):
        f = &rec.fields[i]
        v = _cd_field_value(obj, rec, f)
        kind = f.kind
        if kind == _CD_U:
            # bool is an int subclass but never a number on the wire
            if not _cd_is_long(v) or _cd_is_bool(v):
                _cd_type_fail(f, v, "int")
            u = _cd_as_u64(v)
            if u == <unsigned long long>-1 and PyErr_Occurred() != NULL:
                _cd_u_range_fail(f, v)
            _cd_w_need(w, 10)
            _cd_w_u(w, u)
        elif kind == _CD_T:
            if not _cd_is_str(v):
                _cd_type_fail(f, v, "str")
            # zero-copy for ASCII str; strict UTF-8 (lone surrogates fail)
            data = _cd_utf8_of(v, &size)
            if data == NULL:
                _cd_text_fail(f, v)
            _cd_w_need(w, 10 + size)
            _cd_w_u(w, <uint64_t>size)
            memcpy(w.buf + w.n, data, <size_t>size)
            w.n += size
        elif kind == _CD_B:
            if not _cd_is_bytes_exact(v):
                _cd_type_fail(f, v, "bytes")
            size = PyBytes_GET_SIZE(v)
            _cd_w_need(w, 10 + size)
            _cd_w_u(w, <uint64_t>size)
            memcpy(w.buf + w.n, PyBytes_AS_STRING(v), <size_t>size)
            w.n += size
        elif kind == _CD_S:
            if not _cd_is_long(v) or _cd_is_bool(v):
                _cd_type_fail(f, v, "int")
            s = _cd_as_i64(v)
            if s == -1 and PyErr_Occurred() != NULL:
                _cd_s_range_fail(f, v)
            # zigzag in unsigned arithmetic (no signed-shift UB):
            # 0,-1,1,-2,... -> 0,1,2,3,...
            _cd_w_need(w, 10)
            _cd_w_u(w, (<uint64_t>s << 1) ^ (<uint64_t>0 - (<uint64_t>s >> 63)))
        elif kind == _CD_BOOL:
            _cd_w_need(w, 1)
            if v is True:
                w.buf[w.n] = 1
            elif v is False:
                w.buf[w.n] = 0
            else:
                _cd_type_fail(f, v, "bool")
            w.n += 1
        else:  # _CD_LIST
            sub = &_cd_recs[f.sub]
            if not _cd_is_tuple_exact(v) and not _cd_is_list_exact(v):
                _cd_type_fail(f, v, f"a tuple of {(<object>sub.cls).__name__}")
            _cd_w_need(w, 10)
            _cd_w_u(w, <uint64_t>len(v))
            # Nothing below can run Python code (exact classes, C-level reads),
            # so the list cannot change size under this loop.
            for item in v:
                if <PyObject*>Py_TYPE(item) != sub.cls:
                    _cd_type_fail(f, item, f"{(<object>sub.cls).__name__} items")
                _cd_enc_record(w, item, sub)
    return 0

cdef Py_ssize_t _cd_enc_frame(_CdW* w, object frame) except -1:
    """Append one frame; returns where it starts (its prefix is written right
    before the header, so it may start up to 4 bytes after the old w.n)."""
    cdef PyObject* cls = <PyObject*>Py_TYPE(frame)
    cdef _CdRec* rec = NULL
    cdef int i
    cdef Py_ssize_t start, pos
    cdef uint64_t length, v
    cdef int k
    for i in range(_cd_nframes):
        if _cd_recs[i].cls == cls:
            rec = &_cd_recs[i]
            break
    if rec == NULL:
        _cd_enc_fail(f"not a frame: {type(frame).__name__}")
    # reserve the longest (5-byte) length prefix, write header + body, then
    # put the real prefix right-aligned in the reserved space
    start = w.n
    _cd_w_need(w, 7)
    w.buf[start + 5] = _CD_HEAD
    w.buf[start + 6] = <unsigned char>rec.ftype
    w.n = start + 7
    _cd_enc_record(w, frame, rec)
    length = <uint64_t>(w.n - start - 5)
    if length > _CD_MAX_LENGTH:
        _cd_enc_fail(f"frame of {length} bytes exceeds the 5-byte length prefix")
    k = 1
    v = length >> 7
    while v:
        k += 1
        v >>= 7
    pos = start + 5 - k
    v = length
    for i in range(k - 1):
        w.buf[pos + i] = <unsigned char>(v | 0x80)
        v >>= 7
    w.buf[pos + k - 1] = <unsigned char>v
    return pos


def encode_frame(frame) -> bytes:
    """The wire bytes of one frame (length prefix included)."""
    cdef unsigned char stack[4096]
    cdef _CdW w
    cdef Py_ssize_t pos
    w.buf = stack
    w.n = 0
    w.cap = sizeof(stack)
    w.heap = False
    try:
        pos = _cd_enc_frame(&w, frame)
        return PyBytes_FromStringAndSize(<char*>w.buf + pos, w.n - pos)
    finally:
        if w.heap:
            free(w.buf)


def encode_frames(frames) -> bytes:
    """The concatenated wire bytes of several frames (one write)."""
    cdef unsigned char stack[4096]
    cdef _CdW w
    cdef Py_ssize_t pos, start
    w.buf = stack
    w.n = 0
    w.cap = sizeof(stack)
    w.heap = False
    try:
        for frame in frames:
            start = w.n
            pos = _cd_enc_frame(&w, frame)
            if pos != start:  # close the gap left by a short length prefix
                memmove(w.buf + start, w.buf + pos, <size_t>(w.n - pos))
                w.n -= pos - start
        return PyBytes_FromStringAndSize(<char*>w.buf, w.n)
    finally:
        if w.heap:
            free(w.buf)


# ------------------------------------------------------------------ decode
# Readers work on [p, end) of one frame body and never read at or past end.

cdef int _cd_read_u_slow(const unsigned char** pp, const unsigned char* end, uint64_t* out) except -1:
    cdef const unsigned char* p = pp[0]
    cdef uint64_t result = 0
    cdef unsigned int shift = 0
    cdef unsigned char b
    while True:
        if p >= end:
            _cd_malformed("truncated varint")
        b = p[0]
        p += 1
        # The 10th byte carries only bit 63: anything above 1 (including a
        # continuation bit) would overflow 64 bits or run past 10 bytes.
        if shift == 63 and b > 1:
            _cd_malformed("varint overflows 64 bits")
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            # a zero final byte after a continuation adds nothing: non-minimal
            if b == 0 and shift > 0:
                _cd_malformed("non-minimal varint")
            break
        shift += 7
    out[0] = result
    pp[0] = p
    return 0

cdef inline int _cd_read_u(const unsigned char** pp, const unsigned char* end, uint64_t* out) except -1:
    cdef const unsigned char* p = pp[0]
    if p < end and p[0] < 0x80:
        out[0] = p[0]
        pp[0] = p + 1
        return 0
    return _cd_read_u_slow(pp, end, out)

cdef object _cd_dec_record(const unsigned char** pp, const unsigned char* end, _CdRec* rec):
    cdef const unsigned char* p = pp[0]
    cdef int i, kind
    cdef _CdField* f
    cdef _CdRec* sub
    cdef uint64_t u
    cdef Py_ssize_t j, count
    cdef PyObject* raw
    cdef object v, obj, item
    cdef tuple items
    if rec.fast:
        obj = pimcore_cd_alloc(rec.cls)
    else:
        obj = (<object>rec.cls).__new__(<object>rec.cls)
    for i in range(rec.nfields):
        f = &rec.fields[i]
        kind = f.kind
        if kind == _CD_U:
            _cd_read_u(&p, end, &u)
            v = _cd_from_u64(u)
        elif kind == _CD_T:
            _cd_read_u(&p, end, &u)
            if u > <uint64_t>(end - p):
                _cd_malformed("truncated text field")
            raw = _cd_decode_utf8(<const char*>p, <Py_ssize_t>u, NULL)
            if raw == NULL:
                _cd_utf8_fail()
            v = <object>raw   # takes its own reference...
            Py_XDECREF(raw)   # ...so drop the one PyUnicode_DecodeUTF8 gave us
            p += u
        elif kind == _CD_B:
            _cd_read_u(&p, end, &u)
            if u > <uint64_t>(end - p):
                _cd_malformed("truncated bytes field")
            v = PyBytes_FromStringAndSize(<const char*>p, <Py_ssize_t>u)
            p += u
        elif kind == _CD_S:
            _cd_read_u(&p, end, &u)
            v = _cd_from_i64(<long long>((u >> 1) ^ (<uint64_t>0 - (u & 1))))
        elif kind == _CD_BOOL:
            if p >= end:
                _cd_malformed("truncated bool")
            if p[0] > 1:
                _cd_malformed(f"bool byte {p[0]} is neither 0 nor 1")
            v = p[0] == 1
            p += 1
        else:  # _CD_LIST
            sub = &_cd_recs[f.sub]
            _cd_read_u(&p, end, &u)
            # Every field of an item takes at least one byte: a count that
            # cannot fit in what is left is rejected before PyTuple_New, so the
            # allocation is bounded by the bytes actually received.
            if u > <uint64_t>((end - p) // sub.nfields):
                _cd_malformed(f"list count {u} cannot fit in the remaining {end - p} bytes")
            count = <Py_ssize_t>u
            items = PyTuple_New(count)
            for j in range(count):
                item = _cd_dec_record(&p, end, sub)
                Py_INCREF(item)  # PyTuple_SET_ITEM steals one reference
                PyTuple_SET_ITEM(items, j, item)
            v = items
        if rec.fast:
            pimcore_cd_set_slot(<PyObject*>obj, f.offset, <PyObject*>v)
        else:
            PyObject_GenericSetAttr(obj, <object>f.name, v)
    pp[0] = p
    return obj

cdef object _cd_check_decompress(object decompress):
    if decompress is not None and not callable(decompress):
        raise TypeError(f"decompress must be a callable (body, max_size) -> bytes or None, not {type(decompress).__name__}")
    return decompress

cdef bytes _cd_decompressed(object decompress, const unsigned char* p, Py_ssize_t n, object max_size):
    """The decompressed body of a flagged frame (cold path; as the pure twin's
    _decompressed).  ``max_size`` is max_frame_size - 2: a compressed frame
    never decodes to more than an uncompressed one could carry, nor than the
    longest frame (2^35 - 1 bytes) whatever the limit."""
    if max_size > _CD_MAX_LENGTH - 2:
        max_size = _CD_MAX_LENGTH - 2
    out = decompress(PyBytes_FromStringAndSize(<const char*>p, n), max_size)
    if not _cd_is_bytes_exact(out):
        raise TypeError(f"decompress returned {type(out).__name__}, expected bytes")
    if PyBytes_GET_SIZE(out) > max_size:
        raise _CdFrameTooLarge(f"decompressed body of {PyBytes_GET_SIZE(out)} bytes exceeds max_frame_size {max_size + 2}")
    return <bytes>out

cdef object _cd_parse(const unsigned char* p, Py_ssize_t avail, uint64_t limit, object max_size,
                      Py_ssize_t* used, object decompress):
    """The frame at p[0:avail], or None when more bytes are needed (*used = 0).
    Checks run in stream order, each as soon as its bytes are present, so the
    outcome never depends on how the input was split (same as the pure twin).
    ``decompress`` (None = disabled) decompresses a FLAG_ZSTD body."""
    cdef uint64_t length = 0
    cdef Py_ssize_t n = 0
    cdef unsigned char b, head
    cdef int idx = -1
    cdef const unsigned char* body
    cdef const unsigned char* end
    cdef bytes plain
    used[0] = 0
    if avail == 0:
        return None
    # -- length prefix: at most 5 bytes, minimal
    while True:
        if n == avail:
            return None
        b = p[n]
        length |= (<uint64_t>(b & 0x7F)) << (7 * n)
        n += 1
        if b < 0x80:
            break
        if n == 5:
            _cd_malformed("length prefix longer than 5 bytes")
    if n > 1 and p[n - 1] == 0:
        _cd_malformed("non-minimal length prefix")
    if length > limit:
        raise _CdFrameTooLarge(f"frame length {length} exceeds max_frame_size {max_size}")
    if length < 2:
        _cd_malformed(f"frame length {length} is shorter than the 2-byte header")
    # -- header, checked before the body arrives
    if avail > n:
        head = p[n]
        if head >> 4 != _CD_HEAD >> 4:
            raise _CdProtocolError(_CdErrorCode.UNSUPPORTED_VERSION,
                                   f"protocol version {head >> 4} is not supported (this side speaks {_CD_HEAD >> 4})")
        # bit 0 (zstd) is valid only once decompression is enabled; bits 1..3
        # are reserved and always malformed
        if head & 0x0F and (head & 0x0E or decompress is None):
            _cd_malformed(f"reserved or unnegotiated flag bits set: {head & 0x0F:#x}")
    if avail > n + 1:
        idx = _cd_by_type[p[n + 1]]
        if idx < 0:
            raise _CdProtocolError(_CdErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {p[n + 1]:#04x}")
    if <uint64_t>(avail - n) < length:
        return None
    # -- body
    body = p + n + 2
    end = p + n + <Py_ssize_t>length
    if p[n] & 0x01:
        # the head check above let the flag through only with decompress set;
        # the callable may run any Python code, so nothing below reads p again
        plain = _cd_decompressed(decompress, body, <Py_ssize_t>length - 2, max_size - 2)
        body = <const unsigned char*>PyBytes_AS_STRING(plain)
        end = body + PyBytes_GET_SIZE(plain)
    frame = _cd_dec_record(&body, end, &_cd_recs[idx])
    if body != end:
        _cd_malformed(f"{end - body} trailing bytes after the frame body")
    used[0] = n + <Py_ssize_t>length
    return frame

cdef object _cd_check_max(object max_frame_size):
    if not isinstance(max_frame_size, int) or isinstance(max_frame_size, bool) or max_frame_size < 2:
        raise ValueError(f"max_frame_size must be an int >= 2, got {max_frame_size!r}")
    return int.__index__(max_frame_size)

cdef uint64_t _cd_limit(object max_frame_size):
    # No length above _CD_MAX_LENGTH can be expressed, so clamping changes no
    # outcome and keeps huge Python ints out of C arithmetic.
    if max_frame_size > _CD_MAX_LENGTH:
        return _CD_MAX_LENGTH
    return <uint64_t>max_frame_size


cdef class Decoder:
    """Incremental frame decoder (sans-IO): ``feed`` bytes as they arrive, take
    frames with ``next_frame`` or by iterating.

    Any malformation raises ProtocolError; the decoder is then poisoned and
    raises the same error from every later ``feed``/``next_frame``.

    ``decompress`` (``decompress(body, max_size) -> bytes``, e.g. a
    :class:`pimcore.compress.FrameDecompressor`) accepts frames with the zstd
    head flag; without it (the default) such a frame is MALFORMED_FRAME.
    :meth:`enable_decompression` turns it on later: frames are decoded lazily
    by ``next_frame``, so bytes already fed but not yet taken are judged by the
    setting at the time they are taken.
    """

    # live bytes are _buf[_start:_end]; _buf is malloc'ed, _cap bytes
    cdef unsigned char* _buf
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Py_ssize_t _cap
    cdef uint64_t _limit
    cdef object _max
    cdef object _error
    cdef object _decompress
    # set while a frame is being built: a finalizer run by the GC at that
    # moment must not feed() and so move the buffer being read
    cdef bint _busy

    # (no `int` annotation: Cython would turn it into a TypeError check, and
    # the twin contract is ValueError for anything but an int >= 2)
    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE, decompress=None) -> None:
        self._max = _cd_check_max(max_frame_size)
        self._limit = _cd_limit(self._max)
        self._decompress = _cd_check_decompress(decompress)

    def __dealloc__(self):
        free(self._buf)

    @property
    def max_frame_size(self) -> int:
        return self._max

    def raise_max_frame_size(self, max_frame_size) -> None:
        """See pimcore._pure.codec.Decoder.raise_max_frame_size."""
        m = _cd_check_max(max_frame_size)
        if m > self._max:
            self._max = m
            self._limit = _cd_limit(m)

    @property
    def decompress(self):
        """The decompression callable, or None while compressed frames are refused."""
        return self._decompress

    def enable_decompression(self, decompress) -> None:
        """Accept compressed frames from the next ``next_frame`` on (call it
        when CAP_ZSTD was negotiated).  ``decompress(body, max_size) -> bytes``
        must raise ProtocolError for anything it cannot decompress."""
        if decompress is None:
            raise TypeError("enable_decompression() needs a callable, not None")
        self._decompress = _cd_check_decompress(decompress)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._end - self._start

    cdef int _append(self, const unsigned char* data, Py_ssize_t n) except -1:
        cdef Py_ssize_t live = self._end - self._start
        cdef Py_ssize_t cap
        cdef unsigned char* nb
        if n == 0:
            return 0
        if self._cap - self._end < n:
            # Compact only when the dead prefix is at least as big as what
            # must move: each byte is then moved O(1) times amortised.
            if self._start > 0 and self._start >= live:
                memmove(self._buf, self._buf + self._start, <size_t>live)
                self._start = 0
                self._end = live
            if self._cap - self._end < n:
                if n > (<Py_ssize_t>1 << 62) - self._end:
                    raise MemoryError()
                cap = self._cap * 2
                if cap < self._end + n:
                    cap = self._end + n
                if cap < 256:
                    cap = 256
                nb = <unsigned char*>realloc(self._buf, <size_t>cap)
                if nb == NULL:
                    raise MemoryError()
                self._buf = nb
                self._cap = cap
        memcpy(self._buf + self._end, data, <size_t>n)
        self._end += n
        return 0

    def feed(self, data) -> None:
        """Append received bytes (copied)."""
        cdef Py_buffer view
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._busy:
            raise RuntimeError("Decoder.feed() called while next_frame() is running")
        if _cd_is_bytes(data):
            self._append(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            return
        if not isinstance(data, (bytearray, memoryview)):
            raise TypeError(f"feed() takes bytes, bytearray or memoryview, not {type(data).__name__}")
        if isinstance(data, memoryview) and not data.c_contiguous:
            raise BufferError("feed() needs a C-contiguous memoryview")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._append(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def next_frame(self):
        """The next complete frame, or None when more bytes are needed."""
        cdef Py_ssize_t used = 0
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._start == self._end:
            return None
        if self._busy:
            raise RuntimeError("Decoder.next_frame() re-entered")
        self._busy = True
        try:
            frame = _cd_parse(self._buf + self._start, self._end - self._start, self._limit, self._max, &used,
                              self._decompress)
        except _CdProtocolError as exc:
            self._error = exc
            raise
        finally:
            self._busy = False
        if used:
            self._start += used
            if self._start == self._end:
                self._start = self._end = 0
                if self._cap > (1 << 18):  # do not keep a big frame's buffer
                    free(self._buf)
                    self._buf = NULL
                    self._cap = 0
        return frame

    def __iter__(self):
        return self

    def __next__(self):
        frame = self.next_frame()
        if frame is None:
            raise StopIteration
        return frame


def decode_frame(data, max_frame_size=DEFAULT_MAX_FRAME_SIZE, decompress=None):
    """Decode exactly one complete frame; anything more or less is malformed.
    ``decompress`` as for :class:`Decoder`."""
    cdef Py_buffer view
    cdef Py_ssize_t used = 0
    cdef object max_size = _cd_check_max(max_frame_size)
    cdef uint64_t limit = _cd_limit(max_size)
    decompress = _cd_check_decompress(decompress)
    if _cd_is_bytes(data):
        frame = _cd_parse(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                          limit, max_size, &used, decompress)
        size = PyBytes_GET_SIZE(data)
    else:
        if not isinstance(data, (bytearray, memoryview)):
            raise TypeError(f"feed() takes bytes, bytearray or memoryview, not {type(data).__name__}")
        if isinstance(data, memoryview) and not data.c_contiguous:
            raise BufferError("feed() needs a C-contiguous memoryview")
        # the exported buffer also pins a bytearray's size while we read it
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            frame = _cd_parse(<const unsigned char*>view.buf, view.len, limit, max_size, &used, decompress)
            size = view.len
        finally:
            PyBuffer_Release(&view)
    if frame is None:
        _cd_malformed("truncated frame")
    if used != size:
        _cd_malformed(f"{size - used} bytes after the frame")
    return frame


# ------------------------------------------------------------------ tables

cdef bint _cd_validate_fast(object cls, _CdRec* rec) except -1:
    """True when instances of cls can be built with tp_alloc + slot stores."""
    cdef int j
    if not pimcore_cd_generic_alloc(<PyObject*>cls) or cls.__new__ is not object.__new__:
        return False
    for j in range(rec.nfields):
        if rec.fields[j].offset < 0:
            return False
    # Round-trip through the real constructor: each field must land in the
    # slot we computed for it.
    sentinels = [object() for _ in range(rec.nfields)]
    inst = cls(*sentinels)
    for j in range(rec.nfields):
        if pimcore_cd_get_slot(<PyObject*>inst, rec.fields[j].offset) != <PyObject*>sentinels[j]:
            return False
    return True

cdef int _cd_init() except -1:
    global _cd_nframes
    cdef int i, j
    cdef _CdRec* rec
    cdef _CdField* f
    kinds = {"u": _CD_U, "s": _CD_S, "b": _CD_B, "t": _CD_T, "?": _CD_BOOL}
    records = [cls for cls in _CODEC_SCHEMA if not hasattr(cls, "TYPE")]
    frames = [cls for cls in _CODEC_SCHEMA if hasattr(cls, "TYPE")]
    order = frames + records
    if len(order) > _CD_MAXREC:
        raise RuntimeError("codec table too small")
    index = {f"[{cls.__name__}]": i for i, cls in enumerate(order)}
    for i in range(256):
        _cd_by_type[i] = -1
    for i, cls in enumerate(order):
        spec = _CODEC_SCHEMA[cls]
        # a renamed or reordered dataclass field must fail loudly at import
        if tuple(fl.name for fl in _cd_dataclasses.fields(cls)) != tuple(name for name, _ in spec):
            raise RuntimeError(f"codec schema for {cls.__name__} is out of sync with pimcore/frames.py")
        if len(spec) > _CD_MAXF:
            raise RuntimeError("codec record table too small")
        _cd_keep.append(cls)
        rec = &_cd_recs[i]
        rec.cls = <PyObject*>cls
        rec.nfields = len(spec)
        rec.ftype = int(cls.TYPE) if hasattr(cls, "TYPE") else 0
        if rec.ftype:
            _cd_by_type[rec.ftype] = i
        for j, (name, kind) in enumerate(spec):
            name = _cd_sys.intern(name)
            _cd_keep.append(name)
            f = &rec.fields[j]
            f.name = <PyObject*>name
            f.sub = -1
            if kind.startswith("["):
                f.kind = _CD_LIST
                f.sub = index[kind]
            else:
                f.kind = kinds[kind]
            descr = cls.__dict__.get(name)
            f.offset = pimcore_cd_slot_offset(<PyObject*>cls, <PyObject*>descr if descr is not None else NULL)
        rec.fast = _cd_validate_fast(cls, rec)
    _cd_nframes = len(frames)
    return 0

_cd_init()


def _codec_fast_classes() -> list:
    """Classes decoded/encoded through direct slot access (for tests)."""
    return [<object>_cd_recs[i].cls for i in range(len(_CODEC_SCHEMA)) if _cd_recs[i].fast]


def _codec_set_fast(bint enabled) -> None:
    """Tests only: force the generic attribute route (False), or restore the
    validated fast route (True), so both routes stay covered."""
    cdef int i
    for i in range(len(_CODEC_SCHEMA)):
        _cd_recs[i].fast = enabled and _cd_validate_fast(<object>_cd_recs[i].cls, &_cd_recs[i])
