"""The core's durable send path, per message: the pure-Python twin of
``pimcore/_fastpath_send.pxi``.

The broker (``pimcore.core``) hands these functions the common case of a
send and keeps its own Python for everything else, so behaviour is the same
whichever backend runs:

1. :func:`propose_sends`, once per decoded read of a connection: the leading
   run of plain SendReqs (no mentions, nothing to refuse, not a retry of a
   send still in flight) becomes NewMessage ops and their pending-send
   contexts, exactly as ``Broker._on_send`` + ``Broker._propose_send`` would
   make them.  It stops at the first frame that needs anything else,
   before changing any state for it, and the broker dispatches that frame
   the ordinary way.
2. :func:`finish_send`, once per stored NewMessage of a committed batch: the
   ``Appended`` result of a message without mentions acked to its one
   waiting connection, and its Push entries queued for the online
   recipients, exactly as ``Broker._finish_send`` + ``Broker._ack_waiters``
   would.  False (and nothing changed) for anything else.
   :func:`finish_sends` does the same for a run of a batch's ops in one
   call, stopping at the first op it does not take.
3. :func:`push_slice`, once per Push: which of a device's next entries go
   in it (``Broker._push_entries``'s loop), when every entry pushed is
   already a Message.

Both backends stop/decline on the same inputs and raise the same exceptions
(tests/test_send_fastpath.py holds them to it).  An exception can only come
from the objects handed in (a ``members`` or maker that raises, an attribute
missing); the checks that decide whether to stop read plain values and
never raise.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional

__all__ = ["propose_sends", "finish_send", "finish_sends", "push_slice", "send_digest"]

SECOND = 1_000_000
_BUDGET_MAX = 1 << 62
_MAX_TIME = (1 << 63) - 1
_blake2b = hashlib.blake2b


def send_digest(conv: str, payload: bytes) -> bytes:
    """The 16-byte BLAKE2b digest of ``conv`` (UTF-8) + ``b"\\x00"`` +
    ``payload``: what a retry of a SendReq must repeat exactly.  TypeError
    unless ``conv`` is a str and ``payload`` bytes; UnicodeEncodeError for a
    str that is not valid UTF-8 (a lone surrogate)."""
    if type(conv) is not str:
        raise TypeError("conv must be str")
    if type(payload) is not bytes:
        raise TypeError("payload must be bytes")
    return _blake2b(conv.encode() + b"\x00" + payload, digest_size=16).digest()


def propose_sends(
    frames: list,
    c: Any,
    now: int,
    limits: Any,
    members: Callable[[str], Optional[tuple[str, ...]]],
    pending: dict,
    clock: Any,
    node_id: bytes,
    record_events: bool,
    new_message: Callable[..., Any],
    new_pending: Callable[..., Any],
    sendreq: Any,
    ops: list,
    ctxs: list,
) -> int:
    """Propose the leading plain SendReqs of ``frames`` (a list); return how
    many were taken (0..len(frames)).

    A frame is taken when it is exactly a ``sendreq`` (the SendReq class)
    and ``Broker._on_send`` would propose it without a word: the token
    bucket (``limits.send_rate``, ``send_burst``; µs ``now``) has a token,
    ``c.inflight < limits.window``, the payload is bytes of at most
    ``limits.max_payload``, no mentions and not ``mention_all``, the
    conversation is a str that ``members`` (``core._conv_members``) maps to
    ``()`` or a pair holding ``c.user`` (``members`` is called once for
    each run of frames to one conversation), ``local_id`` is an int, the key
    ``(c.user, c.device, local_id)`` is not in ``pending``, and ``clock``
    (a HybridClock) can tick.  For each: ``c.inflight += 1`` (and the
    bucket's ``tokens``/``refill_at``/``strikes``), a server time from the
    clock, the op ``new_message(msg_id, conv, user, device, local_id,
    client_time, server_time, payload, digest, after_seq, record_events, (),
    False)`` with ``msg_id = U64(server_time) + node_id``, the context
    ``new_pending(key, digest, [c.id])`` put in ``pending[key]``, and both
    appended to ``ops`` / ``ctxs``.  The first frame that fails a check
    changes nothing.  The clock's ticks are handed to it once, at the end
    (``clock.observe``).
    """
    if type(frames) is not list or type(ops) is not list or type(ctxs) is not list:
        raise TypeError("frames, ops and ctxs must be lists")
    if type(pending) is not dict:
        raise TypeError("pending must be a dict")
    if type(node_id) is not bytes:
        raise TypeError("node_id must be bytes")
    if type(now) is not int:
        raise TypeError("now must be int")
    n = len(frames)
    if n == 0:
        return 0
    user, device, conn = c.user, c.device, c.id
    inflight = c.inflight
    rate = limits.send_rate
    if rate:
        burst = float(limits.send_burst)
        tokens, refill_at = c.tokens, c.refill_at
    window, max_payload = limits.window, limits.max_payload
    last = clock.last
    last_conv: Optional[str] = None
    last_pair = None
    i = 0
    while i < n:
        f = frames[i]
        if type(f) is not sendreq:
            break
        if rate:
            # min(burst, ...) as Broker._on_send has it
            t = tokens + (now - refill_at) * rate / SECOND
            if not t < burst:
                t = burst
            if t < 1.0:
                break
        if inflight >= window:
            break
        payload = f.payload
        if type(payload) is not bytes or len(payload) > max_payload:
            break
        mentions = f.mentions
        if type(mentions) is not tuple or mentions or f.mention_all is not False:
            break
        conv = f.conv
        if type(conv) is not str:
            break
        if conv != last_conv:
            # once per run of frames to one conversation (a window of sends)
            last_pair = members(conv)
            last_conv = conv
        pair = last_pair
        if type(pair) is not tuple or (pair and user not in pair):
            break
        local_id = f.local_id
        if type(local_id) is not int:
            break
        key = (user, device, local_id)
        if key in pending:
            break
        try:
            data = conv.encode()
        except UnicodeEncodeError:
            break
        server_time = now if now > last else last + 1
        if server_time > _MAX_TIME:
            break
        # Taken: nothing below can refuse it.
        digest = _blake2b(data + b"\x00" + payload, digest_size=16).digest()
        if rate:
            tokens, refill_at = t - 1.0, now
        inflight += 1
        last = server_time
        op = new_message(
            server_time.to_bytes(8, "big") + node_id, conv, user, device, local_id, f.client_time, server_time,
            payload, digest, f.after_seq, record_events, (), False,
        )
        ctx = new_pending(key, digest, [conn])
        pending[key] = ctx
        ops.append(op)
        ctxs.append(ctx)
        i += 1
    if i:
        c.inflight = inflight
        if rate:
            c.tokens, c.refill_at, c.strikes = tokens, refill_at, 0
        clock.observe(last)
    return i


def fan_out_stored(
    op: Any, res: Any, heads: dict, online: dict, fresh: dict, to_pump: set, new_message: Callable[..., Any],
    mentions: tuple,
) -> None:
    """The broker's side of a stored NewMessage ``op`` (``res`` its Appended):
    for each ``(user, pos)`` of ``res.positions`` whose inbox head is known
    (``heads``) the head moves up to ``pos``; if the user has online devices
    (``online[user]``, device -> session) the user joins ``to_pump`` and
    ``(pos, entry)`` is appended to ``fresh[user]``.  The entry is ``op``
    itself when the sending device is the user's only online device (it is
    never pushed its own send, so no Message is built for nobody), else
    ``new_message(...)`` with every field of the Push entry in order and
    ``mentions`` (F.Mention tuple).  Shared by :func:`finish_send` and the
    core's general path (``Broker._finish_send``, for sends with mentions).
    A position that is not a tuple or list raises TypeError, one of another
    length than 2 ValueError ("Appended.positions must be (user, position)
    pairs ..."), after the positions before it are done."""
    msg_id, seq, server_time = res.msg_id, res.seq, res.server_time
    sender, device = op.sender, op.device
    for item in res.positions:
        if type(item) is not tuple and type(item) is not list:
            raise TypeError(f"Appended.positions must be (user, position) pairs, not {type(item).__name__}")
        if len(item) != 2:
            raise ValueError(f"Appended.positions must be (user, position) pairs, got a {type(item).__name__} of {len(item)}")
        user, pos = item
        head = heads.get(user)
        if head is None:
            continue
        if pos > head:
            heads[user] = pos
        devs = online.get(user)
        if devs is None:
            continue
        to_pump.add(user)
        if user == sender and len(devs) == 1 and device in devs:
            m = op
        else:
            m = new_message(
                pos, msg_id, op.conv, seq, sender, device, op.client_time, server_time, op.payload,
                0, op.local_id, res.after_seq, 0, 0, False, False, mentions, op.mention_all,
            )
        entries = fresh.get(user)
        if entries is None:
            fresh[user] = [(pos, m)]
        else:
            entries.append((pos, m))


def _check_containers(
    pending: Any, heads: Any, online: Any, fresh: Any, to_pump: Any, conns: Any, acks: Any, stats: Any
) -> None:
    """The TypeErrors finish_send and finish_sends raise for their containers."""
    if not (
        type(pending) is dict and type(heads) is dict and type(online) is dict and type(fresh) is dict
        and type(conns) is dict and type(acks) is dict and type(stats) is dict
    ):
        raise TypeError("pending, heads, online, fresh, conns, acks and stats must be dicts")
    if type(to_pump) is not set:
        raise TypeError("to_pump must be a set")


def finish_send(
    op: Any,
    ctx: Any,
    res: Any,
    appended: Any,
    pending: dict,
    heads: dict,
    online: dict,
    fresh: dict,
    to_pump: set,
    conns: dict,
    acks: dict,
    stats: dict,
    new_ack: Callable[..., Any],
    new_message: Callable[..., Any],
    ok: Any,
) -> bool:
    """Finish a stored NewMessage ``op`` of a committed batch; True if it was
    the common case and is done, False (nothing changed) otherwise.

    The common case: ``res`` is exactly an ``appended`` (the Appended
    class), ``op`` has no mentions, and ``ctx`` (its pending send) has one
    waiter, a connection id.  Then, as ``Broker._finish_send``: ``ctx.key``
    leaves ``pending``, ``stats["messages_stored"] += 1``, and for each
    ``(user, pos)`` of ``res.positions`` whose inbox head is known
    (``heads``): the head moves up to ``pos``, and if the user has online
    devices (``online[user]``, device -> session) the user joins
    ``to_pump`` and ``(pos, entry)`` is appended to ``fresh[user]``, the
    entry being ``op`` itself when the sending device is the user's only
    online device (it is never pushed its own send), else
    ``new_message(pos, msg_id, conv, seq, sender, device, client_time,
    server_time, payload, 0, local_id, after_seq, 0, 0, False, False, (),
    mention_all)``.  Last, the ack ``new_ack(local_id, ok, msg_id, seq,
    server_time)`` is queued in ``acks[conn]`` and ``conns[conn].inflight``
    drops by one, unless the connection is gone (not in ``conns``).
    """
    _check_containers(pending, heads, online, fresh, to_pump, conns, acks, stats)
    return _finish_one(op, ctx, res, appended, pending, heads, online, fresh, to_pump, conns, acks, stats, new_ack,
                       new_message, ok)


def finish_sends(
    ops: Any,
    ctxs: Any,
    results: Any,
    start: int,
    newmessage: Any,
    appended: Any,
    pending: dict,
    heads: dict,
    online: dict,
    fresh: dict,
    to_pump: set,
    conns: dict,
    acks: dict,
    stats: dict,
    new_ack: Callable[..., Any],
    new_message: Callable[..., Any],
    ok: Any,
) -> int:
    """Finish the run of common-case stored NewMessages of a committed batch
    that starts at index ``start``; return the index of the first op not
    taken (``len(ops)`` when the run reaches the end).

    ``ops``, ``ctxs`` and ``results`` (lists or tuples of one length: the
    batch's ops, their contexts, the store's results) are read from
    ``start`` on; op ``i`` is taken when it is exactly a ``newmessage``
    (the NewMessage class) and :func:`finish_send` of ``(ops[i], ctxs[i],
    results[i], appended, ...)`` (the same arguments after those) takes it,
    with exactly its effects.  The op it stops at is left unchanged, as is
    everything after it.  Raises TypeError for sequences that are not lists
    or tuples, a ``start`` that is not an int, or the containers
    :func:`finish_send` refuses; ValueError for lengths that differ or a
    ``start`` outside ``0..len(ops)``; anything else as :func:`finish_send`.
    """
    if not (type(ops) is list or type(ops) is tuple) or not (type(ctxs) is list or type(ctxs) is tuple) or not (
        type(results) is list or type(results) is tuple
    ):
        raise TypeError("ops, ctxs and results must be lists or tuples")
    if type(start) is not int:
        raise TypeError("start must be int")
    n = len(ops)
    if len(ctxs) != n or len(results) != n:
        raise ValueError("ops, ctxs and results must be of one length")
    if not 0 <= start <= n:
        raise ValueError("start must be within 0..len(ops)")
    _check_containers(pending, heads, online, fresh, to_pump, conns, acks, stats)
    i = start
    while i < n:
        op = ops[i]
        if type(op) is not newmessage or not _finish_one(
            op, ctxs[i], results[i], appended, pending, heads, online, fresh, to_pump, conns, acks, stats, new_ack,
            new_message, ok,
        ):
            break
        i += 1
    return i


def _finish_one(
    op: Any, ctx: Any, res: Any, appended: Any, pending: dict, heads: dict, online: dict, fresh: dict, to_pump: set,
    conns: dict, acks: dict, stats: dict, new_ack: Callable[..., Any], new_message: Callable[..., Any], ok: Any,
) -> bool:
    # finish_send after its checks of the containers
    if type(res) is not appended:
        return False
    waiters = ctx.waiters
    if type(waiters) is not list or len(waiters) != 1:
        return False
    only = waiters[0]
    if type(only) is not int:
        return False
    mentions = op.mentions
    if type(mentions) is not tuple or mentions:
        return False
    pending.pop(ctx.key, None)
    stats["messages_stored"] += 1
    ack = new_ack(op.local_id, ok, res.msg_id, res.seq, res.server_time)
    fan_out_stored(op, res, heads, online, fresh, to_pump, new_message, ())
    c = conns.get(only)
    if c is not None:
        c.inflight -= 1
        queued = acks.get(only)
        if queued is None:
            acks[only] = [ack]
        else:
            queued.append(ack)
    return True


def push_slice(entries: Any, budget: int, device: str, user: str, message: type) -> Optional[tuple[tuple, Any, int]]:
    """The Push for a device from ``entries`` (a non-empty list or tuple of
    ``(position, entry)``, the device's next positions): ``(messages, upto,
    size)``, or None when an entry to push is not already a ``message``
    (a Message: the caller converts stored entries itself) or the inputs
    are out of the plain case (``entries`` not a list or tuple, or empty,
    ``budget`` not an int within +-2**62, a payload not bytes).

    As ``Broker._push_entries``: entries are taken in order while
    ``budget`` (bytes the device's window has left) covers ``len(payload)
    + 32`` each, at least one; ``upto`` is the position of the last one
    taken; entries of ``device`` of ``user`` (its own sends, which it has)
    are taken but not pushed; ``size`` is the bytes counted for those
    pushed.  An entry taken that is not a tuple or list raises TypeError,
    one of another length than 2 ValueError ("push entries must be
    (position, entry) pairs ..."); one that lacks
    ``payload``/``device``/``sender`` raises as attribute access does.
    """
    if type(entries) is not list and type(entries) is not tuple:
        return None
    if not entries or type(budget) is not int or not -_BUDGET_MAX <= budget <= _BUDGET_MAX:
        return None
    pushed = []
    size = 0
    upto = None
    i = 0
    for item in entries:
        if type(item) is not tuple and type(item) is not list:
            raise TypeError(f"push entries must be (position, entry) pairs, not {type(item).__name__}")
        if len(item) != 2:
            raise ValueError(f"push entries must be (position, entry) pairs, got a {type(item).__name__} of {len(item)}")
        pos, m = item
        payload = m.payload
        if type(payload) is not bytes:
            return None
        n = len(payload) + 32
        budget -= n
        if budget < 0 and i > 0:
            break
        i += 1
        upto = pos
        if m.device == device and m.sender == user:
            continue
        if not isinstance(m, message):
            return None
        pushed.append(m)
        size += n
    return tuple(pushed), upto, size
