# The core's durable send path, per message: the compiled twin of
# pimcore/_pure/send.py (read its docstring for the contract).  Same API, the
# same frames taken / sends finished, the same exceptions, as
# tests/test_send_fastpath.py checks.
#
# How it is fast: one C loop per decoded read instead of three Python method
# calls per SendReq (_dispatch, _on_send, _propose_send), the records stored
# straight into their slots through the record makers' tables
# (_fastpath_records.pxi), the msg id and the digest's input built in one
# buffer each, the clock handed its ticks once per read.

import hashlib as _sp_hashlib

from cpython.object cimport PyObject
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memcpy

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

_sp_blake2b = _sp_hashlib.blake2b
cdef object _SP_SECOND = 1_000_000
cdef object _SP_MAX_TIME = (1 << 63) - 1
cdef object _SP_EMPTY = ()


cdef object _sp_make(object maker, tuple args):
    # maker(*args), with a compiled record maker's slot stores done here
    # (the same as its __call__: every field given, positionally).
    cdef _RecordMaker m
    cdef Py_ssize_t i
    if type(maker) is _RecordMaker:
        m = <_RecordMaker>maker
        if m.n == len(args):
            obj = pimcore_cd_alloc(m.ptype)
            for i in range(m.n):
                pimcore_cd_set_slot(<PyObject*>obj, m.offsets[i], <PyObject*>args[i])
            return obj
    return maker(*args)


cdef bytes _sp_digest_input(object conv, object payload):
    # conv (UTF-8) + b"\x00" + payload; None (no exception) when conv cannot
    # be encoded (a lone surrogate): the caller stops there.
    cdef Py_ssize_t n
    cdef const char *s
    cdef bytes out
    cdef char *p
    try:
        s = _sp_utf8_of(conv, &n)
    except UnicodeEncodeError:
        return None
    out = PyBytes_FromStringAndSize(NULL, n + 1 + PyBytes_GET_SIZE(payload))
    p = PyBytes_AS_STRING(out)
    memcpy(p, s, <size_t>n)
    p[n] = 0
    memcpy(p + n + 1, PyBytes_AS_STRING(payload), <size_t>PyBytes_GET_SIZE(payload))
    return out


def send_digest(conv, payload):
    """The 16-byte BLAKE2b digest of conv (UTF-8) + NUL + payload (see
    pimcore._pure.send)."""
    if not _sp_is_str_exact(conv):
        raise TypeError("conv must be str")
    if not _sp_is_bytes_exact(payload):
        raise TypeError("payload must be bytes")
    data = _sp_digest_input(conv, payload)
    if data is None:
        conv.encode()  # raises the UnicodeEncodeError
    return _sp_blake2b(data, digest_size=16).digest()


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
        if limited:
            t = tokens + (now - refill_at) * rate / _SP_SECOND
            if not t < burst:
                t = burst
            if t < 1.0:
                break
        if inflight >= window:
            break
        payload = f.payload
        if not _sp_is_bytes_exact(payload) or <object>PyBytes_GET_SIZE(payload) > max_payload:
            break
        mentions = f.mentions
        if not _sp_is_tuple_exact(mentions) or len(<tuple>mentions) != 0 or f.mention_all is not False:
            break
        conv = f.conv
        if not _sp_is_str_exact(conv):
            break
        pair = members(conv)
        if not _sp_is_tuple_exact(pair) or (len(<tuple>pair) != 0 and user not in <tuple>pair):
            break
        local_id = f.local_id
        if not _sp_is_long_exact(local_id):
            break
        key = (user, device, local_id)
        if key in <dict>pending:
            break
        data = _sp_digest_input(conv, payload)
        if data is None:
            break
        server_time = now if now > last else last + 1
        if server_time > _SP_MAX_TIME:
            break
        # Taken: nothing below can refuse it.
        digest = _sp_blake2b(data, digest_size=16).digest()
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
        op = _sp_make(new_message, (
            msg_id, conv, user, device, local_id, f.client_time, server_time,
            payload, digest, f.after_seq, record_events, _SP_EMPTY, False,
        ))
        ctx = _sp_make(new_pending, (key, digest, [conn]))
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


def finish_send(op, ctx, res, appended, pending, heads, online, fresh, to_pump, conns, acks, stats,
                new_ack, new_message, ok):
    """Finish a stored NewMessage of a committed batch if it is the common
    case (see pimcore._pure.send)."""
    cdef PyObject *found
    cdef Py_ssize_t np, j
    if not (_sp_is_dict_exact(pending) and _sp_is_dict_exact(heads) and _sp_is_dict_exact(online)
            and _sp_is_dict_exact(fresh) and _sp_is_dict_exact(conns) and _sp_is_dict_exact(acks)
            and _sp_is_dict_exact(stats)):
        raise TypeError("pending, heads, online, fresh, conns, acks and stats must be dicts")
    if not _sp_is_set_exact(to_pump):
        raise TypeError("to_pump must be a set")
    if type(res) is not appended:
        return False
    waiters = ctx.waiters
    if not _sp_is_list_exact(waiters) or len(<list>waiters) != 1:
        return False
    only = (<list>waiters)[0]
    if not _sp_is_long_exact(only):
        return False
    mentions = op.mentions
    if not _sp_is_tuple_exact(mentions) or len(<tuple>mentions) != 0:
        return False
    (<dict>pending).pop(ctx.key, None)
    (<dict>stats)["messages_stored"] += 1
    msg_id = res.msg_id
    seq = res.seq
    server_time = res.server_time
    ack = _sp_make(new_ack, (op.local_id, ok, msg_id, seq, server_time))
    sender = op.sender
    device = op.device
    conv = after_seq = client_time = payload = local_id = mention_all = None
    loaded = False
    for user, pos in res.positions:
        found = _sp_dict_get(heads, user)
        if found == NULL or <object>found is None:
            continue
        if pos > <object>found:
            (<dict>heads)[user] = pos
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
                conv = op.conv
                client_time = op.client_time
                payload = op.payload
                local_id = op.local_id
                after_seq = res.after_seq
                mention_all = op.mention_all
                loaded = True
            m = _sp_make(new_message, (
                pos, msg_id, conv, seq, sender, device, client_time, server_time, payload,
                0, local_id, after_seq, 0, 0, False, False, _SP_EMPTY, mention_all,
            ))
        found = _sp_dict_get(fresh, user)
        if found == NULL or <object>found is None:
            (<dict>fresh)[user] = [(pos, m)]
        else:
            entries = <object>found
            entries.append((pos, m))
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
    return True
