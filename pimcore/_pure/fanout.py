"""Inbox fan-out of the LMDB store: the pure-Python twin of
``pimcore/_fastpath_fanout.pxi``.

Storing a group message appends one inbox entry per member.  The store does
that in two steps per commit (see ``pimcore.store.lmdb``):

1. :func:`fanout`, once per message: give every member the next position of
   their inbox (``heads[uk] += 1``) and queue the message's inbox value under
   the member (``pend[uk].append(entry)``); return the ``(user, position)``
   pairs of the store's ``Appended`` result.
2. :func:`inbox_items`, once per commit: turn the queued values into the
   ``(T(user) + U64(position), value)`` pairs of the ``inbox`` sub-database,
   in key order, for one ``Cursor.putmulti`` call; :func:`head_items` does
   the same for the ``inboxmeta`` records (``U64 head + U64 floor``) of the
   users whose head moved.

A user's queued values always take the LAST ``len(pend[uk])`` positions up to
``heads[uk]`` (positions are handed out one by one and nothing else moves the
head), so the queue needs no positions of its own.

``uk`` is the length-prefixed user key ``T(user)`` of the key layout; keys of
different users never prefix each other, so sorting the users' keys sorts the
whole output.  Both backends validate in the same order and raise the same
exceptions (tests/test_fanout.py holds them to it); an element that fails
validation is left unchanged, the earlier ones stay applied.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator, Sequence, Union

from ..errors import StoreError

__all__ = ["fanout", "inbox_items", "head_items", "stage_message", "store_plain_message", "store_plain_run",
           "dedupe_items", "dedupe_get"]

_U64 = struct.Struct(">Q")
_HEAD_FLOOR = struct.Struct(">QQ")
_U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_RECORD = struct.Struct(">QQqqQB")
_U64_I64 = struct.Struct(">Qq")
_I64 = struct.Struct(">q")


def _head(heads: dict, uk: bytes, what: str = "inbox head") -> int:
    head = heads[uk]
    if type(head) is not int:
        raise TypeError(f"{what} must be int")
    if not 0 <= head <= _U64_MAX:
        raise ValueError(f"{what} out of range")
    return head


def _check_args(uks: object, a: object, b: object, names: str) -> None:
    if type(uks) is not list and type(uks) is not tuple:
        raise TypeError("uks must be a list or tuple")
    if type(a) is not dict or type(b) is not dict:
        raise TypeError(f"{names} must be dicts")


def fanout(
    users: tuple[str, ...],
    uks: tuple[bytes, ...],
    heads: dict[bytes, int],
    pend: dict[bytes, list[bytes]],
    entry: bytes,
) -> tuple[tuple[str, int], ...]:
    """Append ``entry`` to the inbox of every user; return ``(user, position)``
    pairs in the order of ``users``.

    ``users[i]`` is the user whose key is ``uks[i]``; ``heads`` maps each
    ``uk`` to its inbox head (advanced in place), ``pend`` maps ``uk`` to the
    list of values queued in this commit (created when missing).
    """
    if type(users) is not tuple or type(uks) is not tuple:
        raise TypeError("users and uks must be tuples")
    if type(heads) is not dict or type(pend) is not dict:
        raise TypeError("heads and pend must be dicts")
    if type(entry) is not bytes:
        raise TypeError("entry must be bytes")
    if len(users) != len(uks):
        raise ValueError("users and uks differ in length")
    out = []
    for user, uk in zip(users, uks):
        if not isinstance(user, str):
            raise TypeError("user must be str")
        if type(uk) is not bytes:
            raise TypeError("uk must be bytes")
        head = _head(heads, uk)
        if head == _U64_MAX:
            raise ValueError("inbox head out of range")
        queued = pend.get(uk)
        if queued is not None and type(queued) is not list:
            raise TypeError("pending entries must be a list")
        head += 1
        heads[uk] = head
        if queued is None:
            pend[uk] = [entry]
        else:
            queued.append(entry)
        out.append((user, head))
    return tuple(out)


def inbox_items(
    uks: Union[Sequence[bytes], tuple[bytes, ...]],
    pend: dict[bytes, list[bytes]],
    heads: dict[bytes, int],
) -> Iterator[tuple[bytes, bytes]]:
    """An iterator of ``(uk + U64(position), value)`` for the queued values
    of each ``uk`` in ``uks`` (a list or tuple; pass them sorted for key
    order), positions ending at ``heads[uk]``.  Every input is checked here
    (the errors below come from this call, not from the iteration); the
    pairs are made as they are taken, so leave ``pend`` and ``heads`` alone
    until the iterator is spent (it reads them again; a change in between
    raises the same errors).  Why an iterator: the one ``Cursor.putmulti``
    it feeds drops each pair after its put, so no list of one pair per
    inbox entry is built and freed.  Raises TypeError (a non-bytes uk or
    value, a non-list queue), KeyError (a uk without a queue or head),
    ValueError (a head out of range, more values than positions)."""
    _check_args(uks, pend, heads, "pend and heads")
    for uk in uks:
        queued, _ = _queued(uk, pend, heads)
        for value in queued:
            if type(value) is not bytes:
                raise TypeError("pending entry must be bytes")
    return _inbox_pairs(tuple(uks), pend, heads)


def _queued(uk: bytes, pend: dict[bytes, list[bytes]], heads: dict[bytes, int]) -> tuple[list[bytes], int]:
    """``pend[uk]`` and the position before its first value, checked."""
    if type(uk) is not bytes:
        raise TypeError("uk must be bytes")
    queued = pend[uk]
    if type(queued) is not list:
        raise TypeError("pending entries must be a list")
    head = _head(heads, uk)
    if len(queued) > head:
        raise ValueError("more pending entries than inbox positions")
    return queued, head - len(queued)


def _inbox_pairs(uks: tuple[bytes, ...], pend: dict[bytes, list[bytes]],
                 heads: dict[bytes, int]) -> Iterator[tuple[bytes, bytes]]:
    for uk in uks:
        queued, pos = _queued(uk, pend, heads)
        j = 0
        while j < len(queued):  # (re-read: the same as the compiled twin)
            value = queued[j]
            if type(value) is not bytes:
                raise TypeError("pending entry must be bytes")
            j += 1
            pos += 1
            yield uk + _U64.pack(pos), value


def head_items(
    uks: Union[Sequence[bytes], tuple[bytes, ...]],
    heads: dict[bytes, int],
    floors: dict[bytes, int],
) -> list[tuple[bytes, bytes]]:
    """``(uk, U64(heads[uk]) + U64(floors[uk]))`` for each ``uk`` in ``uks``:
    the ``inboxmeta`` records."""
    _check_args(uks, heads, floors, "heads and floors")
    out: list[tuple[bytes, bytes]] = []
    for uk in uks:
        if type(uk) is not bytes:
            raise TypeError("uk must be bytes")
        head = _head(heads, uk)
        floor = _head(floors, uk, "inbox floor")
        out.append((uk, _HEAD_FLOOR.pack(head, floor)))
    return out


def _int(value: object, name: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be int")
    if not lo <= value <= hi:
        raise ValueError(f"{name} out of range")
    return value


def stage_message(
    op: object,
    seq: int,
    after_seq: int,
    ids: bytes,
    ck: bytes,
    dkey: bytes,
    msgs: list[tuple[bytes, bytes]],
    convidx: list[tuple[bytes, bytes]],
    dedupe: dict[bytes, bytes],
) -> bytes:
    """Stage the records of a message without mentions (a NewMessage ``op``
    stored at ``seq``, ``after_seq`` already clamped); return its inbox
    value ``msg_id + I64(server_time)``.

    Appends ``(msg_id, record)`` to ``msgs`` (record: ``>QQqqQB`` seq,
    local_id, client_time, server_time, after_seq, kind 0, then ``ids`` =
    ``T(conv) T(sender) T(device)``, then the payload), ``(ck + U64(seq),
    msg_id + sender)`` to ``convidx``, and sets ``dedupe[dkey] = msg_id +
    U64(seq) + I64(server_time) + digest``: the LMDB key layout (see
    ``pimcore.store.lmdb``).  Everything is checked before anything is
    staged: TypeError for a wrong type, ValueError for a msg_id that is not
    16 bytes or an integer out of its u64/i64 range, UnicodeEncodeError for
    a non-ASCII sender.
    """
    if type(msgs) is not list or type(convidx) is not list or type(dedupe) is not dict:
        raise TypeError("msgs and convidx must be lists, dedupe a dict")
    if type(ids) is not bytes or type(ck) is not bytes or type(dkey) is not bytes:
        raise TypeError("ids, ck and dkey must be bytes")
    msg_id = op.msg_id  # type: ignore[attr-defined]
    if type(msg_id) is not bytes:
        raise TypeError("msg_id must be bytes")
    if len(msg_id) != 16:
        raise ValueError("msg_id must be 16 bytes")
    payload, digest = op.payload, op.digest  # type: ignore[attr-defined]
    if type(payload) is not bytes or type(digest) is not bytes:
        raise TypeError("payload and digest must be bytes")
    sender = op.sender  # type: ignore[attr-defined]
    if type(sender) is not str:
        raise TypeError("sender must be str")
    sender_raw = sender.encode("ascii")
    _int(seq, "seq", 0, _U64_MAX)
    local_id = _int(op.local_id, "local_id", 0, _U64_MAX)  # type: ignore[attr-defined]
    client_time = _int(op.client_time, "client_time", _I64_MIN, _I64_MAX)  # type: ignore[attr-defined]
    server_time = _int(op.server_time, "server_time", _I64_MIN, _I64_MAX)  # type: ignore[attr-defined]
    _int(after_seq, "after_seq", 0, _U64_MAX)
    msgs.append((msg_id, _RECORD.pack(seq, local_id, client_time, server_time, after_seq, 0) + ids + payload))
    convidx.append((ck + _U64.pack(seq), msg_id + sender_raw))
    dedupe[dkey] = msg_id + _U64_I64.pack(seq, server_time) + digest
    return msg_id + _I64.pack(server_time)


#: The characters of a user or device id (pimcore.ids.ID_CHARS, spelled out).
_ID_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@-")
_ID_MAX = 64  # pimcore.ids.MAX_ID_LEN


def _plain_id(value: object) -> bool:
    # pimcore.ids.valid_id for an exact str (anything else: not the common case)
    if type(value) is not str or not 1 <= len(value) <= _ID_MAX or not value.isascii():
        return False
    return all(c in _ID_CHARS for c in value.encode("ascii"))


def store_plain_message(
    op: object, w: object, dedupe_db: object, conv_info: object, device_key: object, record_ids: object,
    appended: object,
) -> object:
    """The LMDB store's NewMessage in its common case, in one call: a plain
    message (no mentions, no host event) from a user's device, not stored
    before, into a conversation whose members, last seq and inbox heads the
    batch ``w`` (a ``pimcore.store.lmdb._Batch``, staging) already holds.
    Returns ``appended(msg_id, seq, server_time, positions, after_seq)``
    having staged the records (:func:`stage_message`), moved the last seq
    and fanned the entry out (:func:`fanout`), exactly as the store's general
    path would; or None, having changed nothing, for anything else -- a
    field the general path would refuse or that needs it (mentions, events,
    the system sender, a retry, an unknown or unloaded conversation, a
    non-member, an after_seq at or below the conversation's purge point
    ``c.purged``, a batch not staging) -- so that the caller runs the general
    path, which gives the answer.

    ``dedupe_db`` is the ``dedupe`` sub-database (read with
    :func:`dedupe_get`, through ``w.txn.cursor(dedupe_db)``); ``conv_info``, ``device_key``,
    ``record_ids`` are the store's cached key helpers.  Raises only what
    those callables raise.
    """
    if op.mentions or op.mention_all is not False or op.event is not False:  # type: ignore[attr-defined]
        return None
    sender, device, conv = op.sender, op.device, op.conv  # type: ignore[attr-defined]
    if not (_plain_id(sender) and _plain_id(device) and type(conv) is str):
        return None
    local_id, after, client_time, server_time = (op.local_id, op.after_seq, op.client_time,  # type: ignore[attr-defined]
                                                 op.server_time)  # type: ignore[attr-defined]
    msg_id, payload, digest = op.msg_id, op.payload, op.digest  # type: ignore[attr-defined]
    if not (
        type(local_id) is int and 0 <= local_id <= _U64_MAX
        and type(after) is int and 0 <= after <= _U64_MAX
        and type(client_time) is int and _I64_MIN <= client_time <= _I64_MAX
        and type(server_time) is int and 0 <= server_time <= _I64_MAX
        and type(msg_id) is bytes and len(msg_id) == 16
        and type(payload) is bytes and type(digest) is bytes
        and w.staging is True  # type: ignore[attr-defined]
    ):
        return None
    dk = device_key(sender, device)  # type: ignore[operator]
    dkey = dk + _U64.pack(local_id)
    if dkey in w.s_dedupe or dedupe_get(w.txn, dedupe_db, dkey) is not None:  # type: ignore[attr-defined]
        return None  # a retry (or a conflict): the general path answers it
    info = conv_info(conv)  # type: ignore[operator]
    if info is None:
        return None
    ck = info[0]
    hot = w.hot  # type: ignore[attr-defined]
    c = hot.convs.get(ck)
    if (c is None or sender not in c.member_set or not c.flagged or c.heads_gen != hot.heads_gen
            or (after and after <= c.purged)):  # (a purged group's history: the general path refuses it)
        return None
    last = hot.seqs.get(ck)
    if last is None:
        return None
    seq = last + 1
    after_seq = after if after < seq else last
    entry = stage_message(op, seq, after_seq, record_ids(ck, dk), ck, dkey, w.s_msgs, w.s_convidx,  # type: ignore
                          w.s_dedupe)  # type: ignore[attr-defined]
    hot.seqs[ck] = seq
    w._dirty_seqs.add(ck)  # type: ignore[attr-defined]
    positions = fanout(c.users, c.uks, hot.heads, w.pend, entry)  # type: ignore[attr-defined]
    return appended(msg_id, seq, server_time, positions, after_seq)  # type: ignore[operator]


def _plain_fields(op: Any) -> bool:
    # store_plain_message's checks of the op's own fields
    if op.mentions or op.mention_all is not False or op.event is not False:
        return False
    if not (_plain_id(op.sender) and _plain_id(op.device) and type(op.conv) is str):
        return False
    local_id, after, client_time, server_time = op.local_id, op.after_seq, op.client_time, op.server_time
    msg_id = op.msg_id
    return (
        type(local_id) is int and 0 <= local_id <= _U64_MAX
        and type(after) is int and 0 <= after <= _U64_MAX
        and type(client_time) is int and _I64_MIN <= client_time <= _I64_MAX
        and type(server_time) is int and 0 <= server_time <= _I64_MAX
        and type(msg_id) is bytes and len(msg_id) == 16
        and type(op.payload) is bytes and type(op.digest) is bytes
    )


def store_plain_run(
    ops: Any, start: Any, kind: Any, w: Any, dedupe_db: object, conv_info: Any, device_key: Any,
    record_ids: Any, appended: Any, results: Any,
) -> int:
    """:func:`store_plain_message` over ``ops[start]``, ``ops[start + 1]``, ...
    for as long as it takes them: the LMDB store's run of common-case
    NewMessage ops, in one call per run instead of one per op.  It also
    reads ``w.hot.dmax``, ``w.dk_general`` and ``w.dedupe_last``: the
    dedupe probe is skipped for a local_id above the device's bound (see
    ``pimcore.store.lmdb._Hot.dmax``), which the run seeds and raises.  Returns the
    index of the first op not taken (``len(ops)`` if it took them all); that
    op, if any, changed nothing and goes to the store's general path.

    An op is taken if its type is exactly ``kind`` (the store's NewMessage)
    and :func:`store_plain_message` would take it; its ``Appended`` record
    (``appended(msg_id, seq, server_time, positions, after_seq)``) is
    appended to ``results`` and ``w.hwm`` is raised to its server time, so
    the caller inspects no result.  The batch's state is read once per call,
    and the key helpers (pure functions of their arguments) are called only
    when their arguments differ from the previous op's.

    TypeError if ``ops`` is not a tuple or list, ``results`` not a list or
    ``start`` not an int; ValueError if ``start`` is outside ``0..len(ops)``;
    otherwise raises only what the callables raise (an op taken before the
    error stays taken).
    """
    if type(ops) is not tuple and type(ops) is not list:
        raise TypeError("ops must be a tuple or list")
    if type(results) is not list:
        raise TypeError("results must be a list")
    if type(start) is not int:
        raise TypeError("start must be int")
    n = len(ops)
    if not 0 <= start <= n:
        raise ValueError("start out of range")
    i = start
    if i == n or w.staging is not True:
        return i
    txn, s_dedupe, s_msgs, s_convidx = w.txn, w.s_dedupe, w.s_msgs, w.s_convidx
    hot, dirty, pend = w.hot, w._dirty_seqs, w.pend
    convs, seqs, heads, heads_gen = hot.convs, hot.seqs, hot.heads, hot.heads_gen
    dmax, dk_general, dedupe_last = hot.dmax, w.dk_general, w.dedupe_last
    last_sender = last_device = last_dk = last_conv = last_ck = ids_ck = ids_dk = last_ids = None
    last_c: Any = None
    while i < n:
        op = ops[i]
        if type(op) is not kind or not _plain_fields(op):
            break
        sender, device, conv = op.sender, op.device, op.conv
        # The key helpers are pure: called once per new argument in a row.
        if last_dk is None or not (sender == last_sender and device == last_device):
            dk = device_key(sender, device)
            if type(dk) is not bytes:
                raise TypeError("device_key must return bytes")
            last_sender, last_device, last_dk = sender, device, dk
        else:
            dk = last_dk
        local_id = op.local_id
        dkey = dk + _U64.pack(local_id)
        if dkey in s_dedupe:
            break  # a retry (or a conflict): the general path answers it
        # The device's bound (seeded once, see LmdbStore's _Hot.dmax): a
        # local_id above it was never stored, so the probe is skipped.
        bound = dmax.get(dk)
        if bound is None and dk not in dk_general:
            bound = dmax[dk] = dedupe_last(dk)
        if (bound is None or local_id <= bound) and dedupe_get(txn, dedupe_db, dkey) is not None:
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
        after = op.after_seq
        if sender not in c.member_set or (after and after <= c.purged):
            break  # (after_seq at or below a group's purge point: the general path refuses it)
        last = seqs.get(ck)
        if last is None:
            break
        seq = last + 1
        after_seq = after if after < seq else last
        if ids_ck is not ck or ids_dk is not dk:
            last_ids, ids_ck, ids_dk = record_ids(ck, dk), ck, dk
        entry = stage_message(op, seq, after_seq, last_ids, ck, dkey, s_msgs, s_convidx, s_dedupe)  # type: ignore
        seqs[ck] = seq
        dirty.add(ck)
        if bound is not None and local_id > bound:
            dmax[dk] = local_id
        server_time = op.server_time
        results.append(appended(op.msg_id, seq, server_time, fanout(c.users, c.uks, heads, pend, entry), after_seq))
        if server_time > w.hwm:
            w.hwm = server_time
        i += 1
    return i


def dedupe_items(items: Any) -> list[tuple[bytes, bytes]]:
    """The ``dedupe`` records of a batch's staged entries: ``items`` is a list
    of ``(T(sender) T(device) U64(local_id), entry)`` pairs (entry: msg_id +
    U64 seq + I64 server_time + digest), sorted by key.  Each run of
    consecutive local_ids of one device whose entries have one length
    becomes ONE record ``(T(sender) T(device) U64(last) U64(first), the
    entries concatenated)``; an entry alone stays ``(key, entry)`` as given
    (the key layout of ``pimcore.store.lmdb``).  Returns the records in key
    order.  TypeError if ``items`` is not a list, an item not a 2-tuple or
    a key or entry not bytes; ValueError for a key shorter than 9 bytes."""
    if type(items) is not list:
        raise TypeError("items must be a list")
    out: list[tuple[bytes, bytes]] = []
    run: list[bytes] = []
    prefix = b""
    first = last = size = 0
    for item in items:
        if type(item) is not tuple or len(item) != 2:
            raise TypeError("items must be (key, value) tuples")
        key, value = item
        if type(key) is not bytes or type(value) is not bytes:
            raise TypeError("dedupe key and value must be bytes")
        n = len(key)
        if n < 9:
            raise ValueError("dedupe key too short")
        local_id = _U64.unpack_from(key, n - 8)[0]
        if run and local_id == last + 1 and len(value) == size and key[: n - 8] == prefix:
            run.append(value)
            last = local_id
            continue
        if run:
            _flush_run(out, prefix, first, last, run)
        prefix, first, last, size = key[: n - 8], local_id, local_id, len(value)
        run = [value]
    if run:
        _flush_run(out, prefix, first, last, run)
    return out


def _flush_run(out: list[tuple[bytes, bytes]], prefix: bytes, first: int, last: int, run: list[bytes]) -> None:
    if len(run) == 1:
        out.append((prefix + _U64.pack(first), run[0]))
    else:
        out.append((prefix + _U64.pack(last) + _U64.pack(first), b"".join(run)))


def dedupe_get(txn: Any, db: object, dkey: Any) -> Any:
    """The ``dedupe`` entry of ``dkey`` (``T(sender) T(device) U64(local_id)``)
    in the LMDB transaction ``txn``'s sub-database ``db``: msg_id + U64 seq
    + I64 server_time + digest, or None.  Either the record of that key (a
    single entry), or the entry of that local_id in the run record of the
    device that holds it (see :func:`dedupe_items`): one cursor
    ``set_range(dkey)`` finds both, since a run's key ``T(sender) T(device)
    U64(last) U64(first)`` sorts right after the keys of its local_ids.
    TypeError if ``dkey`` is not bytes, ValueError if it is shorter than 9
    bytes; StoreError (store corrupt) if the lookup reaches a run record of
    the device that :func:`dedupe_items` cannot have written (see
    :func:`dedupe_run`); otherwise raises what the cursor raises."""
    if type(dkey) is not bytes:
        raise TypeError("dkey must be bytes")
    n = len(dkey)
    if n < 9:
        raise ValueError("dedupe key too short")
    cur = txn.cursor(db)
    if not cur.set_range(dkey):
        return None
    key = cur.key()
    if len(key) != n + 8:
        return cur.value() if key == dkey else None
    if key[: n - 8] != dkey[: n - 8]:
        return None  # another device's run
    # A run of this device whose last local_id is at or above dkey's.
    value = cur.value()
    first, _, size = dedupe_run(key, n - 8, value)
    local_id = _U64.unpack_from(dkey, n - 8)[0]
    if local_id < first:
        return None
    at = (local_id - first) * size
    return value[at : at + size]


#: The fixed part of a dedupe entry: msg_id (16) + U64 seq + I64 server_time;
#: the digest follows.
DEDUPE_ENTRY_MIN = 32


def dedupe_run(key: bytes, end: int, value: bytes) -> tuple[int, int, int]:
    """``(first, last, entry length)`` of the ``dedupe`` run record ``key``
    (``T(sender) T(device) U64(last) U64(first)``, the prefix ``end`` bytes
    long) holding ``value``.  StoreError (store corrupt) for a record that
    :func:`dedupe_items` cannot have written: last not above first (a run
    holds two entries or more), or ``value`` not last - first + 1 entries of
    one length of at least msg_id + seq + server_time (32 bytes).  Not a
    twin: the store's Python readers of runs use it, the Cython
    ``dedupe_get`` checks the same with the same message."""
    last = _U64.unpack_from(key, end)[0]
    first = _U64.unpack_from(key, end + 8)[0]
    n = len(value)
    if last <= first or last - first >= n or n % (last - first + 1) or n // (last - first + 1) < DEDUPE_ENTRY_MIN:
        raise StoreError(f"dedupe run {key.hex()} holds {n} bytes for local ids {first}..{last} (store corrupt)")
    return first, last, n // (last - first + 1)
