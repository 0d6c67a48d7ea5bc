"""An :class:`~pimcore.store.base.AsyncStore` over Redis Cluster (coredis).

The message model and every op's meaning are those of
:mod:`pimcore.store.base`; the logic mirrors :class:`MemoryStore` (the
oracle) op for op, over Redis hashes instead of dicts.  docs/OPERATIONS.md
("Redis Cluster") describes the deployment; this docstring the mechanics.

Key layout (``NS`` = the namespace, default ``pim``; the ``{...}`` hash tag
decides the slot, so everything of one conversation shares a slot, and so
does everything of one user):

=========================  ===============================================
``NS:{c:CONV}``            hash: ``last`` (last seq), ``grp`` (group created
                           at, µs), ``hv`` (history visible), ``mem``
                           (members, ``\\n``-joined), ``sp:USER`` (membership
                           intervals), ``s:SEQ`` (the stored message),
``NS:{u:USER}``            hash: ``head``, ``floor``, ``i:POS`` (inbox
                           entry: conv + seq + server time), ``dv:DEVICE``
                           (acked position, last seen), ``rd:CONV`` (read
                           marker), ``cv:CONV`` (conversation-list flags),
                           ``cs:CONV`` (the user's settings of the
                           conversation: ``pinned:muted:hidden_at``),
                           ``rv:`` / ``rv:DEVICE`` (tokens revoked before),
                           ``pv`` (1: last-seen hidden, SetPresencePrivacy),
                           ``d:DEVICE/LOCAL_ID`` (dedupe record of the
                           user's sends: the key has no conversation, and
                           the lookup comes before the conversation id is
                           checked)
``NS:{m:MSGID}``           hash: ``r`` = conv + seq (msg id lookup)
``NS:{meta}``              hash: ``node`` (node id), ``epochs``, ``st``
                           (highest server time)
``NS:{meta}:users``        hash: every user with an inbox or a device
                           (what :class:`Reclaim` walks)
``NS:{ev}``                hash: host events (``last``, ``floor``, ``e:ID``,
                           ``c:CONSUMER``)
``NS:{meta}:convs``        hash: every conversation that ever had an entry
                           (what :class:`Expire` walks with a broker default)
``NS:{meta}:ret``          hash: every conversation with a retention
                           setting of its own (``ret`` = ``AGE:COUNT`` in
                           its hash; ``hf`` = its history floor)
=========================  ===============================================

Requests.  A request runs its ops on a transaction object: reads go to
Redis (cached for the rest of the request, so later ops of a batch see
earlier ones), writes are buffered as absolute values (``HSET`` of the new
value, ``HDEL``), never increments, so applying them twice is harmless.

Writes.  A request's writes span slots (the conversation's, each
recipient's), and Redis Cluster has no transaction across slots, so a write
request is made durable in two steps, each ending with ``WAIT 1 <wait_ms>``
on the connection that wrote (a write is acknowledged only when a replica
has it; ``WAIT`` reporting 0 -> :class:`StoreError`, never a result):

1. the redo record: the whole write set, encoded, in ``NS:{wal}`` (one
   slot, so one master and one ``WAIT``);
2. the writes: one pipeline per master, all masters at once (group commit:
   one replication wait per master per request, however many sends) --
   the conversations' keys first, then the users' keys, whose inbox entries
   point at messages in the former.

If step 2 fails (a master dies, a ``WAIT`` times out) it is retried for up
to ``settle`` seconds (a failover takes about twice cluster-node-timeout),
and if it still fails the request raises :class:`StoreError` and its
writes stay pending: the next write request completes them first, and a
store opened later replays the redo record.  Replaying is idempotent, and
the record is overwritten by the next request, so it never holds anything
but the last request's writes.  Outcome of a failed request: unknown (the
client retries with the same local id; the dedupe record decides).

Several writers.  The path above computes values from reads, which is right
for one writer only.  The ops of :data:`redis_scripts.SCRIPTED` -- every op
that takes a seq, an inbox position or merges into a field other ops write
(sends, amends, acks, read markers, groups, revokes, events, conversation
settings) -- run instead as server-side scripts, one slot each
(:mod:`pimcore.store.redis_scripts`: claims, seqs, idempotent fan-out,
outbox sweep, cross-node hints, the namespace's epoch), so any number of
``pimcore serve`` nodes may share a namespace.  The rest take this generic
path, and are safe beside other nodes for these reasons:
SetPresencePrivacy and SetRetention write absolute values (last writer
wins, as for any setting); PurgeUser leaves its groups through the scripted
membership change (the LEFT entries take their seqs atomically), the rest
of it writes only the purged user's fields and tombstones; Expire stops
below any entry whose fan-out is still under way (the conversation's
outbox), and an inbox entry of an entry that a purge removed below the
history floor during its fan-out is a hole reads skip.  What remains: run
at most one Expire / PurgeConversation / PurgeUser at a time per namespace
(admin ops; two at once may write the history floor back), and a send that
races a PurgeConversation of its conversation may survive it (purge again:
idempotent).  The redo record is removed once its writes are confirmed, so
a node that starts replays only a request whose writer died half-way.  A
batch mixing both paths runs its runs of each in request order.  Reads
running beside a write may see part of it (a message before its inbox
entries, never an entry before its message).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import os
import struct
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence

import trio

from .._util import shown_url
from ..errors import ErrorCode, StoreError
from .base import (
    removes_everyone,
    ConversationEntry,
    ConversationSet,
    ConversationsPage,
    ReadConversations,
    SetConversation,
    conversation_entry,
    conversation_page,
    mentioned_recipients,
    mentions_user,
    unread_for,
    purged_tombstone,
    new_settings,
    OPEN,
    SYSTEM,
    AmendMessage,
    amend_entry,
    amend_problem,
    amended,
    AckEvents,
    ConsumerDeleted,
    DeleteConsumer,
    AckPosition,
    Acked,
    AddMembers,
    AppendEvent,
    Appended,
    AsyncStore,
    ConversationState,
    CreateGroup,
    DeviceState,
    DevicesPage,
    Deduped,
    Duplicate,
    EventAppended,
    EventsAcked,
    EventsPage,
    GroupChanged,
    HistoryPage,
    InboxPage,
    LoadSession,
    MarkRead,
    MessageKind,
    NewMessage,
    Op,
    ReadDedupe,
    ReadDevices,
    ReadEvents,
    ReadersPage,
    ReadHistory,
    ReadInbox,
    ReadMarked,
    ReadReaders,
    Reclaim,
    Reclaimed,
    Rejected,
    RemoveMembers,
    Result,
    RevokeTokens,
    SetPresencePrivacy,
    PresencePrivacySet,
    ReadPresence,
    PresenceInfo,
    PresencePage,
    Revoked,
    SessionLoaded,
    StoredEvent,
    StoredMessage,
    StoreRequest,
    TouchDevice,
    Touched,
    Expire,
    EXPIRED_IDS,
    Expired,
    PurgeConversation,
    PurgeUser,
    Purged,
    ReadRetention,
    RetentionSet,
    RetentionState,
    SetRetention,
    after_floor,
    retention_limits,
    direct_members,
    is_direct,
    last_visible,
    last_message_floor,
    AMENDING,
    malformed,
    member_ranges,
    message_event,
    hidden_amend,
    horizon,
    iter_page_seqs,
    sees,
    valid_conversation,
    valid_id,
    visible_ranges,
)

__all__ = ["RedisStore", "parse_url"]

MEMBER = 1
HAS_MESSAGES = 2

#: Default of ``RedisStore(read_fanout_above=)``: groups with more members
#: than this get read fan-out (members take entries from the conversation
#: log at login) instead of an inbox write per member.  From
#: bench/redis_groups.py; see docs/OPERATIONS.md "Large groups".
READ_FANOUT_ABOVE = 100

_HEAD = struct.Struct(">16sQQqqQB")

log = logging.getLogger("pimcore.store.redis")


class _NoBareTraceback(logging.Filter):
    """On coredis's logger.  coredis logs a connection that a dead Redis
    server closed, and a failed connection attempt, with a traceback asked
    for in a ``finally`` block after its handler took the exception: there
    is none, and the formatter printed a bare "NoneType: None" line.  Such
    a record is dropped and told as one pimcore line at its level (the
    store's own retry says what becomes of the request).

    It also makes coredis's "Retry attempt N due to error: ..." lines DEBUG
    (coredis logs one per retried command at INFO: a line per command in
    ``serve``'s log while a node fails over, where the store's own lines
    say what becomes of the requests).  Not the whole logger set to
    WARNING: that also hid the dead server's line above."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and isinstance(record.msg, str) and record.msg.startswith("Retry attempt"):
            # (A filter runs after the logger's level check, at INFO: the
            # record goes on only where DEBUG is wanted, as DEBUG.)
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return True
        info = record.exc_info
        if not (isinstance(info, tuple) and info[0] is None):
            return True
        log.log(record.levelno, "Redis connection: %s (coredis gives no detail: a Redis node died, restarted"
                " or failed over; the store retries and re-reads the cluster layout)",
                record.getMessage().rstrip("!").lower().replace("connection ", "", 1),
                extra={"event": "redis_connection"})
        return False


def _quiet_coredis() -> None:
    lg = logging.getLogger("coredis")
    if not any(isinstance(f, _NoBareTraceback) for f in lg.filters):
        lg.addFilter(_NoBareTraceback())


_quiet_coredis()


def parse_url(url: str) -> list[tuple[str, int]]:
    """``redis://HOST:PORT[,HOST:PORT...]`` -> [(host, port), ...].
    ValueError for anything else."""
    if not url.startswith("redis://"):
        raise ValueError(f"not a redis:// URL: {shown_url(url)!r}")
    if "@" in url or "?" in url:
        # Read as a host name, "user:pw@host" would just fail to resolve.
        raise ValueError(f"credentials and options in a redis:// URL are not supported: {shown_url(url)!r}")
    out = []
    for part in url[len("redis://"):].rstrip("/").split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad HOST:PORT in {url!r}: {part!r}")
        out.append((host.strip("[]"), int(port)))
    return out


Address = tuple[str, int]


def parse_address_map(entries: Iterable[str] | str) -> dict[Address, Address]:
    """``["ANNOUNCED_HOST:PORT=DIAL_HOST:PORT", ...]`` (or one string of
    such entries, comma-separated) -> {announced: dial}.  ValueError for an
    entry that is not two HOST:PORT joined by ``=``, or an announced address
    given twice with different targets."""
    if isinstance(entries, str):
        entries = [e for e in entries.split(",") if e.strip()]
    out: dict[Address, Address] = {}
    for entry in entries:
        left, sep, right = entry.partition("=")
        if not sep:
            raise ValueError(f"bad address map entry {entry!r}: expected ANNOUNCED_HOST:PORT=DIAL_HOST:PORT")
        pair = []
        for side in (left, right):
            host, colon, port = side.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"bad address map entry {entry!r}: bad HOST:PORT {side.strip()!r}")
            pair.append((host.strip("[]"), int(port)))
        if out.get(pair[0], pair[1]) != pair[1]:
            raise ValueError(f"address map: {left.strip()} is mapped twice")
        out[pair[0]] = pair[1]
    return out


def _mapped_pool(dial: Any) -> Any:
    """A coredis ``ClusterConnectionPool`` class whose every socket goes to
    ``dial((host, port))`` instead of the address the cluster announced.

    The cluster layout (slot map, MOVED/ASK redirects, the pool's per-node
    queues) keeps the announced addresses -- only the dial changes, so a
    redirect to an announced address is dialed through the map too.  coredis
    (6.9) dials in two places: the pool's connections (its
    ``connection_class``) and the discovery of the layout (``CLUSTER SLOTS``
    and ``CONFIG GET`` through ``ClusterNodeLocation.as_client``, on the seeds
    and then on every node it learnt); both are redirected here."""
    from anyio import connect_tcp, fail_after
    from coredis.cluster._discovery import DiscoveryService
    from coredis.cluster._node import ClusterNodeLocation
    from coredis.connection import ClusterConnection
    from coredis.pool import ClusterConnectionPool

    class Connection(ClusterConnection):
        async def _connect(self) -> Any:
            # TCPConnection._connect, to the mapped address (the store sets
            # neither TLS nor keepalive options).
            host, port = dial((self.location.host, self.location.port))
            with fail_after(self._connect_timeout):
                return await connect_tcp(host, port)

    class Node(ClusterNodeLocation):
        def as_client(self, **client_args: Any) -> Any:
            return ClusterNodeLocation(*dial((self.host, self.port))).as_client(**client_args)

    def via(nodes: list[Any]) -> None:
        nodes[:] = [n if isinstance(n, Node) or not n else Node(n.host, n.port) for n in nodes]

    class Discovery(DiscoveryService):
        async def get_cluster_layout(self) -> Any:
            # The nodes it asks: the seeds, then (follow_cluster) the nodes
            # of the last layout, which it refills with plain nodes each time.
            via(self._startup_nodes)
            via(self._initial_startup_nodes)
            return await super().get_cluster_layout()

        async def _node_require_full_coverage(self, node: Any) -> bool:
            return await super()._node_require_full_coverage(Node(node.host, node.port))

    class Pool(ClusterConnectionPool):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["connection_class"] = Connection
            super().__init__(*args, **kwargs)
            # No hook for the discovery's dials: the same object, with the
            # two methods above (it has no state of its own).
            self.cluster_layout._discovery_service.__class__ = Discovery

    return Pool


#: Kind-byte bits of a stored message (kinds themselves are below 0x40):
#: _AMENDED -- an amend trailer (target, edited, recalled) follows the texts
#: (RECALL/EDIT/DELETE entries, edited or recalled messages; older values
#: never have it); _HAS_MENTIONS -- then U8 mention_all + U16 count +
#: (U16 length + user) * count.  Both come before the payload, in that order.
_AMENDED = 0x80
_HAS_MENTIONS = 0x40
_AMEND = struct.Struct(">QQB")


def _enc_msg(m: StoredMessage) -> bytes:
    strs = b"".join(
        len(b).to_bytes(2, "big") + b for b in (m.conv.encode(), m.sender.encode(), m.device.encode())
    )
    kind = m.kind
    if m.target or m.edited or m.recalled:
        kind |= _AMENDED
        strs += _AMEND.pack(m.target, m.edited, m.recalled)
    if m.mentions or m.mention_all:
        kind |= _HAS_MENTIONS
        strs += bytes((int(m.mention_all),)) + len(m.mentions).to_bytes(2, "big") + b"".join(
            len(u).to_bytes(2, "big") + u.encode() for u in m.mentions
        )
    return _HEAD.pack(m.msg_id, m.seq, m.local_id, m.client_time, m.server_time, m.after_seq, kind) + strs + m.payload


def _dec_msg(b: bytes) -> StoredMessage:
    msg_id, seq, local_id, client_time, server_time, after_seq, kind = _HEAD.unpack_from(b)
    off = _HEAD.size
    strs = []
    for _ in range(3):
        n = int.from_bytes(b[off:off + 2], "big")
        strs.append(b[off + 2:off + 2 + n].decode())
        off += 2 + n
    target = edited = recalled = 0
    if kind & _AMENDED:
        kind &= ~_AMENDED
        target, edited, recalled = _AMEND.unpack_from(b, off)
        off += _AMEND.size
    mentions: list[str] = []
    mention_all = False
    if kind & _HAS_MENTIONS:
        kind &= ~_HAS_MENTIONS
        mention_all = b[off] == 1
        count = int.from_bytes(b[off + 1:off + 3], "big")
        off += 3
        for _ in range(count):
            n = int.from_bytes(b[off:off + 2], "big")
            mentions.append(b[off + 2:off + 2 + n].decode())
            off += 2 + n
    return StoredMessage(msg_id, strs[0], seq, strs[1], strs[2], local_id, client_time, server_time,
                         bytes(b[off:]), kind, after_seq, target, edited, bool(recalled),
                         mentions=tuple(mentions), mention_all=mention_all)


def _int(v: Optional[bytes], default: int = 0) -> int:
    return default if v is None else int(v)


def _enc_spans(spans: Sequence[tuple[int, int]]) -> bytes:
    return ",".join(f"{a}-{b}" for a, b in spans).encode()


def _dec_spans(v: Optional[bytes]) -> tuple[tuple[int, int], ...]:
    if not v:
        return ()
    out = []
    for part in v.decode().split(","):
        a, b = part.split("-")
        out.append((int(a), int(b)))
    return tuple(out)


def _enc_writes(writes: dict[str, dict[str, Optional[bytes]]]) -> bytes:
    """A write set as bytes: per key, per field, the value or a deletion."""
    out = [len(writes).to_bytes(4, "big")]
    for key, fields in writes.items():
        k = key.encode()
        out.append(len(k).to_bytes(4, "big") + k + len(fields).to_bytes(4, "big"))
        for f, v in fields.items():
            fb = f.encode()
            out.append(len(fb).to_bytes(4, "big") + fb)
            out.append(b"\xff\xff\xff\xff" if v is None else len(v).to_bytes(4, "big") + v)
    return b"".join(out)


def _dec_writes(b: bytes) -> dict[str, dict[str, Optional[bytes]]]:
    off = 0

    def take() -> bytes:
        nonlocal off
        n = int.from_bytes(b[off:off + 4], "big")
        off += 4
        v = b[off:off + n]
        off += n
        return v

    out: dict[str, dict[str, Optional[bytes]]] = {}
    off = 4
    for _ in range(int.from_bytes(b[0:4], "big")):
        key = take().decode()
        nf = int.from_bytes(b[off:off + 4], "big")
        off += 4
        fields: dict[str, Optional[bytes]] = {}
        for _ in range(nf):
            f = take().decode()
            if b[off:off + 4] == b"\xff\xff\xff\xff":
                off += 4
                fields[f] = None
            else:
                fields[f] = bytes(take())
        out[key] = fields
    return out


# KEYS: the redo record. ARGV: a write set -> HDEL of it if it is that one.
_UNLOG = "if redis.call('HGET', KEYS[1], 'w') == ARGV[1] then return redis.call('HDEL', KEYS[1], 'w') end return 0"


class _Tx:
    """One request's view: cached reads, buffered writes (see the module
    docstring).  Keys are str, fields str, values bytes (None = absent)."""

    def __init__(self, store: "RedisStore") -> None:
        self.s = store
        self.cache: dict[tuple[str, str], Optional[bytes]] = {}
        self.dirty: dict[str, dict[str, Optional[bytes]]] = {}
        self.full: dict[str, dict[str, bytes]] = {}  # HGETALL results

    async def get(self, key: str, field: str) -> Optional[bytes]:
        k = (key, field)
        if k in self.cache:
            return self.cache[k]
        if key in self.full:
            v = self.full[key].get(field)
        else:
            v = await self.s._call(lambda: self.s._r.hget(key, field))
        self.cache[k] = v
        return v

    async def mget(self, key: str, fields: Sequence[str]) -> list[Optional[bytes]]:
        missing = [f for f in fields if (key, f) not in self.cache]
        if missing and key not in self.full:
            vals = await self.s._call(lambda: self.s._r.hmget(key, missing))
            for f, v in zip(missing, vals):
                self.cache[(key, f)] = v
        elif missing:
            for f in missing:
                self.cache[(key, f)] = self.full[key].get(f)
        return [self.cache[(key, f)] for f in fields]

    async def prefetch(self, needs: dict[str, set[str]]) -> None:
        """Read many (key, field)s in one cluster pipeline (one round trip
        per master) into the cache: what the ops of a batch will ask for."""
        todo = {k: [f for f in fs if (k, f) not in self.cache] for k, fs in needs.items() if k not in self.full}
        todo = {k: fs for k, fs in todo.items() if fs}
        if not todo:
            return
        async def run() -> list[tuple[str, list[str], Any]]:
            async with self.s._r.pipeline(transaction=False) as pipe:
                pending = [(k, fs, pipe.hmget(k, fs)) for k, fs in todo.items()]
            return [(k, fs, await res) for k, fs, res in pending]

        for k, fs, vals in await self.s._call(run):
            for f, v in zip(fs, vals):
                self.cache.setdefault((k, f), v)

    async def getall(self, key: str) -> dict[str, bytes]:
        """Every field of ``key`` with this request's writes applied."""
        if key not in self.full:
            raw = await self.s._call(lambda: self.s._r.hgetall(key))
            self.full[key] = {(f.decode() if isinstance(f, bytes) else f): v for f, v in raw.items()}
        out = dict(self.full[key])
        for f, v in self.dirty.get(key, {}).items():
            if v is None:
                out.pop(f, None)
            else:
                out[f] = v
        return out

    def put(self, key: str, field: str, value: bytes | int | str) -> None:
        if isinstance(value, int):
            value = str(value).encode()
        elif isinstance(value, str):
            value = value.encode()
        self.cache[(key, field)] = value
        self.dirty.setdefault(key, {})[field] = value

    def delete(self, key: str, field: str) -> None:
        self.cache[(key, field)] = None
        self.dirty.setdefault(key, {})[field] = None

    def forget(self, key: str) -> None:
        """Drop what was read of ``key`` (not this request's writes): it was
        changed outside this request (a scripted op), read it again."""
        self.full.pop(key, None)
        mine = self.dirty.get(key, {})
        for k in [k for k in self.cache if k[0] == key and k[1] not in mine]:
            del self.cache[k]


class RedisStore(AsyncStore):
    """The store over a Redis Cluster reached at ``nodes`` ([(host, port)],
    any of its nodes).  Use :meth:`connect` (an async context manager).

    ``namespace``: prefix of every key (several stores may share a cluster).
    ``wait_ms``: the replication wait per request (``WAIT 1 wait_ms``); a
    request whose writes a replica did not confirm in time raises
    :class:`StoreError`.  ``replicas``: how many replicas must confirm (1).
    ``settle``: seconds a request keeps retrying writes whose redo record is
    stored (through a failover: about 2 x cluster-node-timeout).
    ``address_map``: {announced (host, port): (host, port) to dial} (or
    entries for :func:`parse_address_map`): every connection the store opens
    to a Redis node -- the seeds in ``nodes``, the nodes the cluster
    announces (``CLUSTER SLOTS``, ``MOVED``), the script and hint
    connections -- goes to the mapped address; an address not in the map is
    dialed as it is (NAT, containers, proxies).
    """

    def __init__(self, nodes: Sequence[tuple[str, int]], *, namespace: str = "pim",
                 wait_ms: int = 2000, replicas: int = 1, settle: float = 10.0,
                 address_map: Mapping[Address, Address] | Iterable[str] | str | None = None,
                 read_fanout_above: int = READ_FANOUT_ABOVE) -> None:
        if not nodes:
            raise ValueError("no Redis node given")
        if not valid_id(namespace):
            raise ValueError(f"bad namespace: {namespace!r}")
        if address_map is None:
            address_map = {}
        elif not isinstance(address_map, Mapping):
            address_map = parse_address_map(address_map)
        self.address_map: dict[Address, Address] = {(h, int(p)): (dh, int(dp))
                                                     for (h, p), (dh, dp) in address_map.items()}
        if type(read_fanout_above) is not int or read_fanout_above < 0:
            raise ValueError(f"read_fanout_above must be an int >= 0, not {read_fanout_above!r}")
        #: Groups with more members get read fan-out (ClusterOps.join_groups).
        self.read_fanout_above = read_fanout_above
        self.nodes = list(nodes)
        self.ns = namespace
        self.wait_ms = wait_ms
        self.replicas = replicas
        self._r: Any = None
        self._masters: dict[tuple[str, int], Any] = {}
        self._closed = True
        self._node = b""
        self._epoch = b""
        self._epochs: tuple[bytes, ...] = ()
        self._meta = f"{namespace}:{{meta}}"
        self._users = f"{namespace}:{{meta}}:users"
        self._rets = f"{namespace}:{{meta}}:ret"
        self._convs = f"{namespace}:{{meta}}:convs"
        self._ev = f"{namespace}:{{ev}}"
        self._wal = f"{namespace}:{{wal}}"
        self.settle = settle
        self._pending: Optional[dict[str, dict[str, Optional[bytes]]]] = None
        #: The multi-writer path (pimcore.store.redis_scripts), set on connect.
        self.cluster: Any = None
        self._epoch_lost = False
        self._lost_epoch_written = False  # the new epoch _lost() takes is in Redis
        self._write_lock = trio.Lock()

    # ------------------------------------------------------------ plumbing

    @classmethod
    @asynccontextmanager
    async def connect(cls, nodes: Sequence[tuple[str, int]] | str, **kwargs: Any) -> AsyncIterator["RedisStore"]:
        """``async with RedisStore.connect(nodes) as store``: connect, adopt
        the namespace's epoch (the first node takes one; a later one is
        taken only when lost writes were detected: :meth:`_lost`), close at
        the end.  ``nodes`` may be a redis:// URL.

        Why a context manager: coredis clients are trio-structured (each
        runs tasks of its own), so they are entered and left by one keeper
        task that lives as long as the store; any task may use them."""
        if isinstance(nodes, str):
            nodes = parse_url(nodes)
        self = cls(nodes, **kwargs)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._keeper)
            try:
                await self._connect()
                yield self
            finally:
                await self.aclose()

    async def _keeper(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own every coredis client: enter each in this task, leave them all
        when the store closes."""
        import coredis

        send, receive = trio.open_memory_channel[Any](0)
        self._requests = send
        async with AsyncExitStack() as stack:
            task_status.started()
            async with receive:
                async for addr, box, done in receive:
                    try:
                        if addr is None:
                            from coredis.connection import TCPLocation

                            extra: dict[str, Any] = {}
                            if self.address_map:
                                extra["connection_pool_cls"] = _mapped_pool(self.dial)
                            client: Any = coredis.RedisCluster(
                                startup_nodes=[TCPLocation(h, p) for h, p in self.nodes],
                                decode_responses=False, stream_timeout=10, connect_timeout=5, **extra,
                            )
                        else:
                            host, port = self.dial(addr)
                            client = coredis.Redis(host, port, decode_responses=False,
                                                   stream_timeout=10 + self.wait_ms / 1000, connect_timeout=5)
                        box.append(await stack.enter_async_context(client))
                    except Exception as exc:
                        box.append(exc)
                    done.set()

    def dial(self, addr: Address) -> Address:
        """Where to connect for the Redis node at ``addr`` (as announced):
        its entry in :attr:`address_map`, else ``addr`` itself."""
        return self.address_map.get(addr, addr)

    async def _client(self, addr: Optional[tuple[str, int]]) -> Any:
        """A new client entered by the keeper: the cluster client (None) or
        a plain one on ``addr``."""
        box: list[Any] = []
        done = trio.Event()
        try:
            await self._requests.send((addr, box, done))
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise StoreError("store is closed") from exc
        await done.wait()
        if isinstance(box[0], Exception):
            if addr is None:
                why = await self._not_a_cluster()
                if why:
                    raise StoreError(why) from box[0]
            where = ", ".join(f"{h}:{p}" for h, p in ([addr] if addr else self.nodes))
            raise StoreError(f"cannot reach Redis at {where}: {box[0] or type(box[0]).__name__}") from box[0]
        return box[0]

    async def _not_a_cluster(self) -> str:
        """Why the cluster client failed if a startup node answers but is
        no cluster member ('' if none does: unreachable, or a cluster in
        trouble -- the caller's error says that)."""
        from .redis_scripts import _RawConn

        for addr in self.nodes:
            with trio.move_on_after(5):
                try:
                    conn = await _RawConn.open(*self.dial(addr))
                except OSError:
                    continue
                try:
                    (info,) = await conn.pipeline([("INFO", "cluster")], 5)
                except Exception:
                    continue
                finally:
                    await conn.aclose()
                if isinstance(info, bytes) and b"cluster_enabled:0" in info:
                    return (f"Redis at {addr[0]}:{addr[1]} is reachable but is not a Redis Cluster node "
                            f"(INFO cluster: cluster_enabled:0): --store redis:// needs a Redis Cluster -- start "
                            f"each server with `cluster-enabled yes` and join them (redis-cli --cluster create "
                            f"... --cluster-replicas 1; docs/OPERATIONS.md, Redis Cluster), or leave --store out "
                            f"for the embedded LMDB store")
        return ""

    async def _connect(self) -> None:
        self._closed = False
        self._r = await self._client(None)
        # The last request of the previous writer may be half-applied: its
        # redo record completes it (idempotent: absolute values).
        wal = await self._call(lambda: self._r.hget(self._wal, "w"))
        if wal:
            self._pending = _dec_writes(wal)
            await self._complete_pending()
        # Every process is a node of its own (msg ids carry the node id, so
        # nodes writing at once never make the same id); the epoch is the
        # namespace's, shared by every node (a client may resume on any).
        self._node = os.urandom(8)
        await self._adopt_epoch()
        from .redis_scripts import ClusterOps

        self.cluster = ClusterOps(self)
        await self.cluster.load()

    async def _adopt_epoch(self) -> None:
        """Take the namespace's epoch, creating it if there is none (the
        first node, or a cluster that lost everything: a new history)."""
        fresh = os.urandom(16).hex().encode()

        async def take() -> Any:
            client = await self._master(self._meta)
            async with client.pipeline(transaction=False) as pipe:
                pipe.hsetnx(self._meta, "epoch", fresh)
                pipe.hsetnx(self._meta, "epochs", fresh)
                got = pipe.hmget(self._meta, ["epoch", "epochs"])
                waited = pipe.wait(self.replicas, self.wait_ms)
            if await waited < self.replicas:
                raise StoreError("the epoch was not confirmed by a replica")
            return await got

        epoch, epochs = await self._call(take)
        self._epoch = bytes.fromhex(epoch.decode())
        self._epochs = tuple(bytes.fromhex(e) for e in epochs.decode().split(",") if e)

    async def _lost(self) -> None:
        """Acknowledged writes were lost (see redis_scripts.DataLost): give
        the namespace a new epoch that trusts no older one, so every client
        resynchronizes; every node stops when it sees it."""
        self._epoch_lost = True  # first: no write may run meanwhile (ClusterOps.execute)
        await self._write_lost_epoch()

    async def _write_lost_epoch(self) -> None:
        """Store a new epoch for :meth:`_lost` (once; raises StoreError if
        Redis does not take it: the epoch loop tries again, and stops this
        node once it is written)."""
        if self._lost_epoch_written:
            return
        fresh = os.urandom(16).hex().encode()
        await self._call(lambda: self._r.hset(self._meta, {"epoch": fresh, "epochs": fresh}))
        self._lost_epoch_written = True

    async def _call(self, request: Any) -> Any:
        """Await ``request()`` (a read), retried through a failover for up
        to ``settle`` seconds: the cluster client keeps sending to a dead
        master until its slot map is refreshed, so refresh it and retry."""
        deadline = trio.current_time() + self.settle
        while True:
            self._check_open()
            try:
                return await request()
            except StoreError:
                raise
            except Exception as exc:
                if trio.current_time() >= deadline or self._closed:
                    raise StoreError(f"Redis: {exc!r}") from exc
            await trio.sleep(0.2)
            await self._refresh_layout()

    async def _refresh_layout(self) -> None:
        """Ask the cluster for its slot map now.  (coredis refreshes it by
        itself only after a number of errors, with a backoff of seconds;
        ``_refresh`` is its internal method for that.)"""
        self._masters.clear()
        try:
            await self._r.connection_pool.cluster_layout._refresh()
        except Exception:
            pass  # no node answered: the next try asks again

    async def _master_at(self, addr: tuple[str, int]) -> Any:
        client = self._masters.get(addr)
        if client is None:
            client = self._masters[addr] = await self._client(addr)
        return client

    def _k_conv(self, conv: str) -> str:
        return f"{self.ns}:{{c:{conv}}}"

    def _k_user(self, user: str) -> str:
        return f"{self.ns}:{{u:{user}}}"

    def _k_msg(self, msg_id: bytes) -> str:
        return f"{self.ns}:{{m:{msg_id.hex()}}}"

    def _k_node(self, node_hex: str) -> str:
        return f"{self.ns}:{{n:{node_hex}}}"

    async def _master(self, key: str) -> Any:
        """A plain client on the master serving ``key``'s slot (its own
        connection pool: a pipeline there ends with WAIT on the connection
        that made the writes)."""
        from coredis._utils import hash_slot

        node = self._r.connection_pool.cluster_layout.node_for_slot(hash_slot(key.encode()))
        addr = (node.host, node.port)
        client = self._masters.get(addr)
        if client is None:
            client = self._masters[addr] = await self._client(addr)
        return client

    async def _flush(self, tx: _Tx) -> None:
        """Make ``tx``'s buffered writes durable (see "Writes" in the module
        docstring): the redo record first, then the writes themselves, one
        pipeline per master ending with WAIT on its connection."""
        if not tx.dirty:
            return
        self._check_open()
        writes = {k: dict(v) for k, v in tx.dirty.items()}
        # Until the writes are all confirmed they are pending: a failure
        # anywhere from here leaves them to be completed (idempotently)
        # before the next request -- a redo record that a replica may hold
        # must never be contradicted.
        self._pending = writes
        blob = _enc_writes(writes)
        await self._write_groups({self._wal: {"w": blob}}, "the redo record")
        await self._complete_pending()

    async def _complete_pending(self) -> None:
        """Apply the pending writes, retrying through a failover for up to
        ``settle`` seconds; StoreError if they still are not confirmed (they
        stay pending)."""
        writes = self._pending
        if writes is None:
            return
        deadline = trio.current_time() + self.settle
        # Users' keys last: their inbox entries point at messages in the
        # conversations' keys, so a reader never finds an entry whose
        # message is not there yet.
        user_tag = f"{self.ns}:{{u:"
        first = {k: v for k, v in writes.items() if not k.startswith(user_tag)}
        last = {k: v for k, v in writes.items() if k.startswith(user_tag)}
        while True:
            try:
                for part in (first, last):
                    if part:
                        await self._write_groups(part, "the writes")
                break
            except StoreError:
                if trio.current_time() >= deadline or self._closed:
                    raise
                await trio.sleep(0.2)
                await self._refresh_layout()
        self._pending = None
        # Complete: the redo record goes (if it is still this one -- another
        # node may have written its own since).  A record left behind would
        # be replayed by every node that starts later, writing values
        # computed then over what other nodes wrote since (a revoke undone,
        # a membership span deleted).  Lost in a failover: replayed once more.
        await self._call(lambda: self._r.eval(_UNLOG, keys=[self._wal], args=[_enc_writes(writes)]))

    async def _write_groups(self, writes: dict[str, dict[str, Optional[bytes]]], what: str) -> None:
        by_master: dict[int, tuple[Any, list[str]]] = {}
        for key in writes:
            client = await self._master(key)
            by_master.setdefault(id(client), (client, []))[1].append(key)
        failures: list[str] = []

        async def one(client: Any, keys: list[str]) -> None:
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        fields = writes[key]
                        sets = {f: v for f, v in fields.items() if v is not None}
                        dels = [f for f, v in fields.items() if v is None]
                        if sets:
                            pipe.hset(key, sets)
                        if dels:
                            pipe.hdel(key, dels)
                    waited = pipe.wait(self.replicas, self.wait_ms)
                n = await waited
            except Exception as exc:
                failures.append(repr(exc))
                self._masters.clear()  # the slot map may have moved: rebuild
                return
            if n < self.replicas:
                failures.append(f"WAIT {self.replicas} {self.wait_ms}: {n} replica(s) confirmed")

        async with trio.open_nursery() as nursery:
            for client, keys in by_master.values():
                nursery.start_soon(one, client, keys)
        if failures:
            raise StoreError(f"{what} not confirmed by a replica (outcome unknown): " + "; ".join(failures))

    # ------------------------------------------------------------ identity

    async def node_id(self) -> bytes:
        self._check_open()
        return self._node

    async def epoch(self) -> bytes:
        self._check_open()
        return self._epoch

    async def epochs(self) -> tuple[bytes, ...]:
        self._check_open()
        return self._epochs

    async def last_server_time(self) -> int:
        return _int(await _Tx(self).get(self._meta, "st"))

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    async def aclose(self) -> None:
        """Close the store; the keeper leaves every client (idempotent)."""
        self._closed = True
        self._masters.clear()
        if self.cluster is not None:
            for conn in list(self.cluster._raw.values()):
                await conn.aclose()
            self.cluster._raw.clear()
        requests = getattr(self, "_requests", None)
        if requests is not None:
            await requests.aclose()

    # ------------------------------------------------------------ requests

    async def execute(self, request: StoreRequest) -> tuple[Result, ...]:
        results = await self._execute(request)
        if request.write and self.cluster is not None:
            # Read markers, receipts, revocations, purges and conversation
            # settings reach the user's devices on other nodes (hints).
            await self.cluster.after_commit(request.ops, results)
        return results

    async def _execute(self, request: StoreRequest) -> tuple[Result, ...]:
        self._check_open()
        if request.write:
            from .redis_scripts import SCRIPTED

            if self.cluster is not None:
                for op in request.ops:
                    if type(op) not in SCRIPTED and type(op) not in _HANDLERS:
                        # Nothing applied: the batch fails as a whole.
                        raise StoreError(f"batch {request.request_id} not committed: "
                                         f"not a store op: {type(op).__name__}")
                if all(type(op) in SCRIPTED for op in request.ops):
                    return tuple(await self.cluster.execute(request.ops))
                if any(type(op) in SCRIPTED for op in request.ops):
                    # Ops of the generic path beside scripted ones: runs of
                    # each kind in request order (an op sees every earlier
                    # one, as in one transaction); the generic runs single
                    # writer.
                    merged: list[Result] = []
                    i = 0
                    while i < len(request.ops):
                        scripted = type(request.ops[i]) in SCRIPTED
                        j = i + 1
                        while j < len(request.ops) and (type(request.ops[j]) in SCRIPTED) == scripted:
                            j += 1
                        if scripted:
                            merged.extend(await self.cluster.execute(request.ops[i:j]))
                        else:
                            merged.extend(await self._execute(StoreRequest(request.request_id, tuple(request.ops[i:j]), True)))
                        i = j
                    return tuple(merged)
            async with self._write_lock:
                await self._complete_pending()
                tx = _Tx(self)
                results = []
                try:
                    await self._prefetch(tx, request.ops)
                    for op in request.ops:
                        results.append(await self._apply(tx, op))  # type: ignore[arg-type]
                except StoreError:
                    raise
                except Exception as exc:
                    # Nothing was written yet: the writes are buffered until
                    # every op has run, so the batch takes no effect (but for
                    # PurgeUser's scripted group removals and revoke, done at
                    # once: idempotent, the purge's retry completes them).
                    raise StoreError(f"batch {request.request_id} not committed: {exc!r}") from exc
                await self._flush(tx)
                return tuple(results)
        tx = _Tx(self)
        return tuple([await self._read(tx, op) for op in request.ops])  # type: ignore[arg-type]

    async def _prefetch(self, tx: _Tx, ops: Sequence[Any]) -> None:
        """Warm ``tx``'s cache for the common ops of a batch (sends, acks,
        touches) in two pipelined rounds -- the conversations and senders,
        then the recipients -- instead of several round trips per op.  Only
        a speed-up: the ops read through the cache either way."""
        needs: dict[str, set[str]] = {}

        def need(key: str, *fields: str) -> None:
            needs.setdefault(key, set()).update(fields)

        convs: set[str] = set()
        for op in ops:
            kind = type(op)
            if kind is NewMessage and isinstance(op.conv, str) and isinstance(op.sender, str):
                need(self._k_user(op.sender), f"d:{op.device}/{op.local_id}")
                if isinstance(op.msg_id, bytes):
                    need(self._k_msg(op.msg_id), "r")
                need(self._k_conv(op.conv), "grp", "mem", "last")
                need(self._meta, "st")
                convs.add(op.conv)
            elif kind in (AckPosition, TouchDevice) and isinstance(op.user, str) and isinstance(op.device, str):
                need(self._k_user(op.user), "dv:" + op.device, "head", "floor")
        if not needs:
            return
        await tx.prefetch(needs)
        needs = {}
        for conv in convs:
            if not valid_conversation(conv):
                continue
            for user in await self._group_members(tx, conv) or ():
                need(self._k_user(user), "head", "cv:" + conv, "cs:" + conv)
        await tx.prefetch(needs)

    async def _apply(self, tx: _Tx, op: Op) -> Result:
        handler = _HANDLERS.get(type(op))
        if handler is None:
            raise TypeError(f"not a store op: {type(op).__name__}")
        if malformed(op):
            return Rejected(ErrorCode.BAD_REQUEST)
        return await handler(self, tx, op)

    # -- shared helpers ---------------------------------------------------

    async def _group_members(self, tx: _Tx, conv: str) -> Optional[frozenset[str]]:
        pair = direct_members(conv)
        if pair is not None:
            return frozenset(pair)
        grp, mem = await tx.mget(self._k_conv(conv), ["grp", "mem"])
        if grp is None:
            return None
        return frozenset(mem.decode().split("\n")) if mem else frozenset()

    async def _spans_of(self, tx: _Tx, conv: str, user: str) -> tuple[tuple[int, int], ...]:
        pair = direct_members(conv)
        if pair is not None:
            return ((0, OPEN),) if user in pair else ()
        return _dec_spans(await tx.get(self._k_conv(conv), "sp:" + user))

    async def _flag(self, tx: _Tx, user: str, conv: str, bit: int, on: bool) -> None:
        key = self._k_user(user)
        old = _int(await tx.get(key, "cv:" + conv))
        new = (old | bit) if on else (old & ~bit)
        if new == old:
            return
        if new:
            tx.put(key, "cv:" + conv, new)
        else:
            tx.delete(key, "cv:" + conv)
        tx.put(self._users, user, b"1")

    async def _msg_at(self, tx: _Tx, conv: str, seq: int) -> StoredMessage:
        v = await tx.get(self._k_conv(conv), f"s:{seq}")
        if v is None:
            raise StoreError(f"missing message {conv!r} seq {seq}")
        return _dec_msg(v)

    async def _msgs_at(self, tx: _Tx, conv: str, seqs: Sequence[int]) -> list[StoredMessage]:
        vals = await tx.mget(self._k_conv(conv), [f"s:{s}" for s in seqs]) if seqs else []
        if any(v is None for v in vals):
            raise StoreError(f"missing messages in {conv!r}")
        return [_dec_msg(v) for v in vals]  # type: ignore[arg-type]

    async def _store_entry(self, tx: _Tx, m: StoredMessage, recipients: Iterable[str]) -> tuple[tuple[str, int], ...]:
        """Store ``m`` at its seq and append it to every recipient's inbox."""
        ck = self._k_conv(m.conv)
        tx.put(ck, "last", m.seq)
        if m.seq == 1:
            tx.put(self._convs, m.conv, b"1")  # what Expire walks (one write per conversation)
        tx.put(ck, f"s:{m.seq}", _enc_msg(m))
        tx.put(self._k_msg(m.msg_id), "r", f"{m.seq}:{m.conv}")
        ref = f"{m.seq}:{m.server_time}:{m.conv}"
        positions = []
        for user in sorted(recipients):
            uk = self._k_user(user)
            pos = _int(await tx.get(uk, "head")) + 1
            tx.put(uk, "head", pos)
            tx.put(uk, f"i:{pos}", ref)
            # What the scripted fan-out (redis_scripts FANOUT) keeps: the last
            # seq of the conversation in this inbox and its position; without
            # it a later scripted fan-out would see a gap and deliver this
            # entry a second time.
            tx.put(uk, f"ld:{m.conv}", f"{m.seq}:{pos}")
            await self._flag(tx, user, m.conv, HAS_MESSAGES, True)
            tx.put(self._users, user, b"1")
            positions.append((user, pos))
        if m.server_time > _int(await tx.get(self._meta, "st")):
            tx.put(self._meta, "st", m.server_time)
        return tuple(positions)

    # -- write ops ----------------------------------------------------------

    async def _dedupe_answer(self, tx: _Tx, dkey: str, dfield: str, digest: bytes) -> Optional[Result]:
        """The answer to a send or amend whose dedupe record exists (the
        original identity, or DUPLICATE_CONFLICT for other content); None
        if there is none."""
        prior = await tx.get(dkey, dfield)
        if prior is None:
            return None
        msg_hex, seq_s, st, digest_hex = prior.decode().split(":")
        if bytes.fromhex(digest_hex) == digest:
            return Duplicate(bytes.fromhex(msg_hex), int(seq_s), int(st))
        return Rejected(ErrorCode.DUPLICATE_CONFLICT)

    async def _new_message(self, tx: _Tx, op: NewMessage) -> Result:
        # The dedupe record lives in the SENDER's slot: its key (sender,
        # device, local id) names no conversation, and it is looked up before
        # the conversation id is even checked.
        dkey = self._k_user(op.sender)
        dfield = f"d:{op.device}/{op.local_id}"
        answer = await self._dedupe_answer(tx, dkey, dfield, op.digest)
        if answer is not None:
            return answer
        if not valid_conversation(op.conv):
            return Rejected(ErrorCode.BAD_REQUEST)
        members = await self._group_members(tx, op.conv)
        if members is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        if op.sender not in members and op.sender != SYSTEM:
            return Rejected(ErrorCode.NOT_MEMBER)
        if (0 < op.after_seq and direct_members(op.conv) is None
                and op.after_seq <= _int(await tx.get(self._k_conv(op.conv), "pp"))):
            return Rejected(ErrorCode.PURGED)  # (answers a purged group's history: base.NewMessage)
        if await tx.get(self._k_msg(op.msg_id), "r") is not None:
            return Rejected(ErrorCode.INTERNAL)
        seq = _int(await tx.get(self._k_conv(op.conv), "last")) + 1
        after_seq = min(op.after_seq, seq - 1)
        m = StoredMessage(op.msg_id, op.conv, seq, op.sender, op.device, op.local_id, op.client_time,
                          op.server_time, op.payload, 0, after_seq, mentions=op.mentions, mention_all=op.mention_all)
        positions = await self._store_entry(tx, m, members)
        tx.put(dkey, dfield, f"{op.msg_id.hex()}:{seq}:{op.server_time}:{op.digest.hex()}")
        if op.event:
            muted = [u for u in members if (await self._settings(tx, u, op.conv))[1]]
            await self._append_event(tx, op.server_time, message_event(m, members, muted, mentioned_recipients(m, members)))
        return Appended(op.msg_id, seq, op.server_time, positions, after_seq)

    async def _amend(self, tx: _Tx, op: AmendMessage) -> Result:
        # Same dedupe slot and record as NewMessage (one key space per device).
        dkey = self._k_user(op.sender)
        dfield = f"d:{op.device}/{op.local_id}"
        answer = await self._dedupe_answer(tx, dkey, dfield, op.digest)
        if answer is not None:
            return answer
        if not valid_conversation(op.conv):
            return Rejected(ErrorCode.BAD_REQUEST)
        members = await self._group_members(tx, op.conv)
        if members is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        ck = self._k_conv(op.conv)
        last, hv = await tx.mget(ck, ["last", "hv"])
        raw = await tx.get(ck, f"s:{op.target}") if op.target <= _int(last) else None
        target = _dec_msg(raw) if raw is not None else None
        member, visible = True, True
        if op.kind == MessageKind.DELETE:
            spans = await self._spans_of(tx, op.conv, op.sender)
            member = bool(spans)
            visible = sees(spans, _int(hv) == 1, op.target)
        elif op.sender != SYSTEM:
            member = op.sender in members
            visible = sees(await self._spans_of(tx, op.conv, op.sender), _int(hv) == 1, op.target)
        code = amend_problem(op, member, target, visible)
        if code is not ErrorCode.OK:
            return Rejected(code)
        assert target is not None
        if await tx.get(self._k_msg(op.msg_id), "r") is not None:
            return Rejected(ErrorCode.INTERNAL)
        if op.kind == MessageKind.DELETE:
            entry = amend_entry(op, 0)
            recipients: Iterable[str] = (op.sender,)
            tx.put(self._k_user(op.sender), f"del:{op.conv}/{op.target}", b"1")
            # Not an entry of the conversation: kept under its msg_id, and
            # the inbox names it by that ("x<msg_id hex>" where a seq goes).
            tx.put(ck, f"x:{op.msg_id.hex()}", _enc_msg(entry))
            tx.put(self._k_msg(op.msg_id), "r", f"0:{op.conv}")
            uk = self._k_user(op.sender)
            pos = _int(await tx.get(uk, "head")) + 1
            tx.put(uk, "head", pos)
            tx.put(uk, f"i:{pos}", f"x{op.msg_id.hex()}:{op.server_time}:{op.conv}")
            positions: tuple[tuple[str, int], ...] = ((op.sender, pos),)
            if op.server_time > _int(await tx.get(self._meta, "st")):
                tx.put(self._meta, "st", op.server_time)
        else:
            entry = amend_entry(op, _int(last) + 1)
            # Only to the members who may see the target (base.hidden_amend).
            recipients = [u for u in sorted(members) if sees(await self._spans_of(tx, op.conv, u), _int(hv) == 1, op.target)]
            tx.put(ck, f"s:{op.target}", _enc_msg(amended(target, op)))
            positions = await self._store_entry(tx, entry, recipients)
        tx.put(dkey, dfield, f"{op.msg_id.hex()}:{entry.seq}:{op.server_time}:{op.digest.hex()}")
        if op.event:
            await self._append_event(tx, op.server_time, message_event(replace(entry, payload=op.payload), recipients))
        return Appended(op.msg_id, entry.seq, op.server_time, positions, entry.after_seq)

    async def _current(self, tx: _Tx, msgs: list[StoredMessage], user: str = "") -> list[StoredMessage]:
        """``msgs`` as reads return them: EDIT entries with their target's
        payload now; for ``user`` (history) the messages they deleted for
        themselves with ``deleted`` set and no payload."""
        out = []
        for m in msgs:
            if m.kind == MessageKind.EDIT:
                # Nothing of a message the user deleted for themselves comes
                # back through a later edit.
                target = await tx.get(self._k_conv(m.conv), f"s:{m.target}")
                if target is None or (user and await tx.get(self._k_user(user), f"del:{m.conv}/{m.target}")):
                    m = replace(m, payload=b"")  # (None: retention removed the target)
                else:
                    t = _dec_msg(target)
                    hidden = user and t.edited and await self._edited_after_horizon(tx, m.conv, user, t.edited)
                    m = replace(m, payload=b"" if hidden else t.payload)
            elif user and m.kind == MessageKind.MESSAGE:
                if await tx.get(self._k_user(user), f"del:{m.conv}/{m.seq}"):
                    m = replace(m, payload=b"", deleted=True)
                elif m.edited and await self._edited_after_horizon(tx, m.conv, user, m.edited):
                    m = replace(m, payload=b"")
            out.append(m)
        return out

    async def _edited_after_horizon(self, tx: _Tx, conv: str, user: str, edited: int) -> bool:
        """Was a message of ``conv`` edited (at server time ``edited``) after
        ``user``'s view of it ended (base.horizon)?"""
        h = horizon(await self._spans_of(tx, conv, user), _int(await tx.get(self._k_conv(conv), "last")))
        if not h:
            return False
        left = await tx.get(self._k_conv(conv), f"s:{h}")  # (None: removed by retention -- withheld)
        return left is None or edited > _dec_msg(left).server_time

    async def _device(self, tx: _Tx, user: str, device: str) -> Optional[DeviceState]:
        v = await tx.get(self._k_user(user), "dv:" + device)
        if v is None:
            return None
        pos, seen = v.split(b":")
        return DeviceState(user, device, int(pos), int(seen))

    async def _register(self, tx: _Tx, user: str, device: str, position: int, now: int) -> tuple[DeviceState, bool]:
        uk = self._k_user(user)
        old = await self._device(tx, user, device)
        new = old is None
        head, floor = (_int(v) for v in await tx.mget(uk, ["head", "floor"]))
        if old is None:
            old = DeviceState(user, device, floor, now)
        state = DeviceState(user, device, max(old.position, min(position, head)), max(old.last_seen, now))
        tx.put(uk, "dv:" + device, f"{state.position}:{state.last_seen}")
        tx.put(self._users, user, b"1")
        return state, new

    async def _ack(self, tx: _Tx, op: AckPosition) -> Result:
        state, _ = await self._register(tx, op.user, op.device, op.position, op.now)
        return Acked(op.user, op.device, state.position)

    async def _touch(self, tx: _Tx, op: TouchDevice) -> Result:
        state, new = await self._register(tx, op.user, op.device, op.position, op.now)
        return Touched(op.user, op.device, state.position, new)

    async def _mark_read(self, tx: _Tx, op: MarkRead) -> Result:
        if await self._group_members(tx, op.conv) is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        spans = await self._spans_of(tx, op.conv, op.user)
        if not spans:
            return Rejected(ErrorCode.NOT_MEMBER)
        last = last_visible(spans, _int(await tx.get(self._k_conv(op.conv), "last")))
        uk = self._k_user(op.user)
        old = _int(await tx.get(uk, "rd:" + op.conv))
        new = max(old, min(op.seq, last))
        if new != old:
            tx.put(uk, "rd:" + op.conv, new)
        return ReadMarked(op.user, op.conv, new, last, await self._unread(tx, op.user, op.conv), new != old)

    async def _reclaim(self, tx: _Tx, op: Reclaim) -> Result:
        seen_cutoff = op.now - op.device_retention
        age_cutoff = op.now - op.max_age
        forgotten = removed = 0
        for user in sorted(await tx.getall(self._users)):
            uk = self._k_user(user)
            fields = await tx.getall(uk)
            devs: dict[str, int] = {}
            for f, v in fields.items():
                if f.startswith("dv:"):
                    dpos, seen = v.split(b":")
                    if int(seen) < seen_cutoff:
                        tx.delete(uk, f)
                        forgotten += 1
                    else:
                        devs[f] = int(dpos)
            head, floor = _int(fields.get("head")), _int(fields.get("floor"))
            acked = min(devs.values()) if devs else floor
            pos = floor
            while pos < head:
                ref = fields.get(f"i:{pos + 1}")  # None: a hole (retention, purge)
                st = int(ref.split(b":")[1]) if ref is not None else 0
                if not (ref is None or pos + 1 <= acked or st < age_cutoff):
                    break
                pos += 1
                if ref is not None:
                    tx.delete(uk, f"i:{pos}")
                    removed += 1
            if pos != floor:
                tx.put(uk, "floor", pos)
        evs = await tx.getall(self._ev)
        cursors = [int(v) for f, v in evs.items() if f.startswith("c:")]
        acked = min(cursors) if cursors else 0
        floor = pos = _int(evs.get("floor"))
        last = _int(evs.get("last"))
        while pos < last:
            t = int(evs[f"e:{pos + 1}"].split(b":", 1)[0])
            if not (pos + 1 <= acked or t < age_cutoff):
                break
            pos += 1
            tx.delete(self._ev, f"e:{pos}")
        if pos != floor:
            tx.put(self._ev, "floor", pos)
        return Reclaimed(removed, forgotten, pos - floor)

    async def _revoke(self, tx: _Tx, op: RevokeTokens) -> Result:
        uk = self._k_user(op.user)
        before = max(_int(await tx.get(uk, "rv:" + op.device)), op.before)
        tx.put(uk, "rv:" + op.device, before)
        if op.device:  # in force for the device: the user-wide bound too (base.Revoked)
            before = max(before, _int(await tx.get(uk, "rv:")))
        return Revoked(op.user, op.device, before)

    async def _set_privacy(self, tx: _Tx, op: SetPresencePrivacy) -> Result:
        uk = self._k_user(op.user)
        if op.hide_last_seen:
            tx.put(uk, "pv", 1)
        elif await tx.get(uk, "pv") is not None:
            tx.delete(uk, "pv")
        return PresencePrivacySet(op.user, op.hide_last_seen)

    async def _hides_last_seen(self, tx: _Tx, user: str) -> bool:
        return _int(await tx.get(self._k_user(user), "pv")) == 1

    async def _access(self, tx: _Tx, conv: str, user: str) -> bool:
        members = await self._group_members(tx, conv)
        return members is not None and user in members

    async def _read_presence(self, tx: _Tx, op: ReadPresence) -> Result:
        # As Store._read_presence (base.py), over the transaction object.
        user = op.user
        if not valid_id(user) or not isinstance(op.others, tuple):
            return Rejected(ErrorCode.BAD_REQUEST)
        mine = {c for c in await self._conversations(tx, user) if valid_conversation(c) and await self._access(tx, c, user)}
        entries = []
        for other in op.others:
            if not (isinstance(other, str) and valid_id(other)):
                entries.append(PresenceInfo(other if isinstance(other, str) else "", False, False, 0))
                continue
            visible = other == user
            if not visible:
                for c in await self._conversations(tx, other):
                    if c in mine and await self._access(tx, c, other):
                        visible = True
                        break
            if not visible:
                entries.append(PresenceInfo(other, False, False, 0))
                continue
            last = max((d.last_seen for d in await self._devices(tx, other)), default=0)
            entries.append(PresenceInfo(other, True, await self._hides_last_seen(tx, other), max(last, 0)))
        watched = [e.user for e in entries if e.visible]
        if self.cluster is not None and watched:
            # Several nodes share this store: register this node as watching
            # them first (their changes are pushed here from now on), then
            # say which other live nodes have them online.  Best effort: the
            # watching node's periodic re-check repairs a failure.
            try:
                await self.cluster.watch(watched, more=True)
                where = await self.cluster.online_elsewhere(watched)
            except StoreError:
                where = {}
            entries = [replace(e, elsewhere=tuple(sorted(where.get(e.user, ())))) if e.visible else e for e in entries]
        return PresencePage(user, await self._hides_last_seen(tx, user), tuple(entries))

    async def hides_last_seen(self, user: str) -> bool:
        return valid_id(user) and await self._hides_last_seen(_Tx(self), user)

    async def _append_event(self, tx: _Tx, now: int, data: bytes) -> int:
        eid = _int(await tx.get(self._ev, "last")) + 1
        tx.put(self._ev, "last", eid)
        tx.put(self._ev, f"e:{eid}", str(now).encode() + b":" + data)
        return eid

    async def _append_event_op(self, tx: _Tx, op: AppendEvent) -> Result:
        return EventAppended(await self._append_event(tx, op.now, op.data))

    async def _ack_events(self, tx: _Tx, op: AckEvents) -> Result:
        cur, last = (_int(v) for v in await tx.mget(self._ev, ["c:" + op.consumer, "last"]))
        cursor = max(cur, min(op.upto, last))
        tx.put(self._ev, "c:" + op.consumer, cursor)
        return EventsAcked(op.consumer, cursor)

    async def _delete_consumer(self, tx: _Tx, op: DeleteConsumer) -> Result:
        # (Several writers run it as one HDEL: redis_scripts.ClusterOps.)
        if await tx.get(self._ev, "c:" + op.consumer) is None:
            return ConsumerDeleted(op.consumer, False)
        tx.delete(self._ev, "c:" + op.consumer)
        return ConsumerDeleted(op.consumer, True)

    async def _create_group(self, tx: _Tx, op: CreateGroup) -> Result:
        ck = self._k_conv(op.conv)
        if await tx.get(ck, "grp") is not None:
            return Rejected(ErrorCode.ALREADY_EXISTS)
        tx.put(ck, "grp", op.now)
        tx.put(ck, "hv", 1 if op.history_visible else 0)
        tx.put(ck, "mem", "\n".join(sorted(set(op.members))))
        for user in op.members:
            await self._flag(tx, user, op.conv, MEMBER, True)
            tx.put(ck, "sp:" + user, _enc_spans(((0, OPEN),)))
        return GroupChanged(op.conv, tuple(sorted(op.members)))

    async def _change_members(self, tx: _Tx, op: Any, *, last_may_leave: bool = False) -> Result:
        conv = op.conv
        ck = self._k_conv(conv)
        current = await self._group_members(tx, conv)
        if current is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        if type(op) is RemoveMembers and not last_may_leave and removes_everyone(current, op.users):
            return Rejected(ErrorCode.BAD_REQUEST)  # a group needs a member (see RemoveMembers)
        add = type(op) is AddMembers
        for st in op.stamps:
            if await tx.get(self._k_msg(st[0]), "r") is not None:
                return Rejected(ErrorCode.INTERNAL)
        clock = max(op.now, _int(await tx.get(self._meta, "st")) + 1)
        entries, positions = [], []
        for i, user in enumerate(op.users):
            if (user in current) == add:
                continue
            if op.stamps:
                msg_id, server_time = op.stamps[i]
            else:
                while True:
                    msg_id, server_time = clock.to_bytes(8, "big") + bytes(8), clock
                    clock += 1
                    if await tx.get(self._k_msg(msg_id), "r") is None:
                        break
            seq = _int(await tx.get(ck, "last")) + 1
            spans = _dec_spans(await tx.get(ck, "sp:" + user))
            if add:
                members = current | {user}
                tx.put(ck, "sp:" + user, _enc_spans(spans + ((seq, OPEN),)))
                recipients = members
            else:
                members = current - {user}
                tx.put(ck, "sp:" + user, _enc_spans(spans[:-1] + ((spans[-1][0], seq),)))
                recipients = current
            tx.put(ck, "mem", "\n".join(sorted(members)))
            current = frozenset(members)
            await self._flag(tx, user, conv, MEMBER, add)
            m = StoredMessage(msg_id, conv, seq, user, "", 0, server_time, server_time, op.by.encode("utf-8"),
                              int(MessageKind.JOINED if add else MessageKind.LEFT), seq - 1)
            positions.append(await self._store_entry(tx, m, recipients))
            if op.event:
                await self._append_event(tx, server_time, message_event(m, recipients))
            entries.append(m)
        return GroupChanged(conv, tuple(sorted(current)), tuple(entries), tuple(positions))

    # -- retention and purge (see the ops in pimcore.store.base) ------------

    async def _set_retention(self, tx: _Tx, op: SetRetention) -> Result:
        if await self._group_members(tx, op.conv) is None:
            return Rejected(ErrorCode.UNKNOWN_CONVERSATION)
        ck = self._k_conv(op.conv)
        if (op.max_age, op.max_count) == (-1, -1):
            tx.delete(ck, "ret")
            tx.delete(self._rets, op.conv)
        else:
            tx.put(ck, "ret", f"{op.max_age}:{op.max_count}")
            tx.put(self._rets, op.conv, b"1")
        return RetentionSet(op.conv, op.max_age, op.max_count)

    async def _recipients(self, tx: _Tx, conv: str) -> list[str]:
        """Every user who may hold inbox entries of ``conv``."""
        pair = direct_members(conv)
        if pair is not None:
            return list(pair)
        return sorted(f[3:] for f in await tx.getall(self._k_conv(conv)) if f.startswith("sp:"))

    async def _trim(self, tx: _Tx, conv: str, upto: int) -> tuple[int, int]:
        """Remove the entries of ``conv`` from its history floor up to seq
        ``upto`` (messages, dedupe records, inbox entries); the floor
        becomes ``upto``.  (entries removed, inbox entries removed)."""
        ck = self._k_conv(conv)
        floor = _int(await tx.get(ck, "hf"))
        if upto <= floor:
            return 0, 0
        gone: set[tuple[int, str]] = set()
        for m in await self._msgs_at(tx, conv, list(range(floor + 1, upto + 1))):
            dkey, dfield = self._k_user(m.sender), f"d:{m.device}/{m.local_id}"
            prior = await tx.get(dkey, dfield)
            if prior is not None and prior.split(b":", 1)[0] == m.msg_id.hex().encode():
                tx.delete(dkey, dfield)  # with its message, never before
            tx.delete(ck, f"s:{m.seq}")
            tx.delete(self._k_msg(m.msg_id), "r")
            gone.add((m.seq, conv))
        tx.put(ck, "hf", upto)
        entries = 0
        for user in await self._recipients(tx, conv):
            uk = self._k_user(user)
            for f, v in (await tx.getall(uk)).items():
                if f.startswith("i:"):
                    seq, _, c = v.decode().split(":", 2)
                    # "x<msg_id>": a DELETE entry (no seq) is never trimmed
                    # with the conversation's entries, as in the memory store.
                    if not seq.startswith("x") and (int(seq), c) in gone:
                        tx.delete(uk, f)
                        entries += 1
        return upto - floor, entries

    async def _expire(self, tx: _Tx, op: Expire) -> Result:
        convs: set[str] = set(await tx.getall(self._rets))
        if op.max_age or op.max_count:
            convs.update(await tx.getall(self._convs))
        n_convs = msgs = entries = 0
        ids: list[str] = []
        resume = ""
        # The walk: conversation ids in sorted order, after ``op.after``.
        order = sorted(convs)
        for conv in order[bisect.bisect_right(order, op.after) if op.after else 0 :]:
            if len(ids) >= EXPIRED_IDS:
                resume = ids[-1]  # (more to look at: the next Expire goes on after it)
                break
            ck = self._k_conv(conv)
            ret, hf, last_b = await tx.mget(ck, ["ret", "hf", "last"])
            own = tuple(int(x) for x in ret.split(b":")) if ret else (-1, -1)
            age, count = retention_limits(own, op.max_age, op.max_count)  # type: ignore[arg-type]
            if not (age or count):
                continue
            last = _int(last_b)
            upto = floor = _int(hf)
            if self.cluster is not None:
                # Never past an entry whose fan-out is still under way (its
                # outbox entry, read after ``last``): the inbox entries it is
                # about to add would point at a removed message.
                ob = await self._call(lambda: self._r.hkeys(self.cluster.outbox_key(conv)))
                pending = [int(f) for f in ob if floor < int(f) <= last]
                if pending:
                    last = min(pending) - 1
            if count and _int(last_b) - count > upto:
                upto = min(_int(last_b) - count, last)
            if age:
                cutoff = op.now - age
                while upto < last and (await self._msg_at(tx, conv, upto + 1)).server_time < cutoff:
                    upto += 1
            if op.keep:  # (Expire: nothing younger than keep goes)
                young = op.now - op.keep
                while upto > floor and (await self._msg_at(tx, conv, upto)).server_time >= young:
                    upto -= 1
            if upto > floor:
                n, e = await self._trim(tx, conv, upto)
                n_convs, msgs, entries = n_convs + 1, msgs + n, entries + e
                ids.append(conv)
        return Expired(n_convs, msgs, entries, tuple(ids), resume)

    async def _purge_conversation(self, tx: _Tx, op: PurgeConversation) -> Result:
        conv = op.conv
        ck = self._k_conv(conv)
        users = await self._recipients(tx, conv)
        last = _int(await tx.get(ck, "last"))
        msgs, entries = await self._trim(tx, conv, last)
        if last > _int(await tx.get(ck, "pp")):
            tx.put(ck, "pp", last)  # the purge point a login reads (ConversationState.purged)
        keep_reads = is_direct(conv)  # (a 1:1 chat's markers stay: PurgeConversation)
        for user in users:
            uk = self._k_user(user)
            if not keep_reads:
                tx.delete(uk, "rd:" + conv)
            tx.delete(uk, "cv:" + conv)
            tx.delete(ck, "sp:" + user)
        for f in ("grp", "hv", "mem"):
            tx.delete(ck, f)
        if not keep_reads:  # (a 1:1 chat lives on with its own retention setting: PurgeConversation)
            tx.delete(ck, "ret")
            tx.delete(self._rets, conv)
        return Purged(msgs, entries, last_seq=last, users=() if keep_reads else tuple(sorted(users)))

    async def _purge_user(self, tx: _Tx, op: PurgeUser) -> Result:
        user = op.user
        uk = self._k_user(user)
        changes = []
        for conv in await self._conversations(tx, user):
            members = await self._group_members(tx, conv) if direct_members(conv) is None else None
            if members is not None and user in members:
                if self.cluster is not None:
                    # Scripted (redis_scripts CHANGE): the LEFT entry takes
                    # its seq atomically beside other nodes' sends; what it
                    # changed (the conversation, the user's inbox and flags)
                    # is read again below.
                    (res,) = await self.cluster.execute((RemoveMembers(conv, (user,), op.now),), last_may_leave=True)
                    tx.forget(self._k_conv(conv))
                    tx.forget(uk)
                else:
                    res = await self._change_members(tx, RemoveMembers(conv, (user,), op.now), last_may_leave=True)
                assert isinstance(res, GroupChanged), res
                changes.append(res)
        fields = await tx.getall(uk)
        tombstones = entries = devices = 0
        for f, v in sorted(fields.items()):
            if f.startswith("d:"):
                msg_id = bytes.fromhex(v.decode().split(":", 1)[0])
                ref = await tx.get(self._k_msg(msg_id), "r")
                if ref is not None:
                    seq, _, conv = ref.decode().partition(":")
                    if int(seq):  # 0: a DELETE entry (no seq, no payload of its own)
                        m = await self._msg_at(tx, conv, int(seq))
                        tx.put(self._k_conv(conv), f"s:{m.seq}", _enc_msg(purged_tombstone(m)))
                        tombstones += 1
                tx.delete(uk, f)
            elif f.startswith("i:"):
                tx.delete(uk, f)
                entries += 1
            elif f.startswith("dv:"):
                tx.delete(uk, f)
                devices += 1
            elif f.startswith("rd:"):
                tx.delete(uk, f)
            elif f.startswith("cv:"):
                tx.delete(uk, f)
                if direct_members(f[3:]) is None:
                    tx.delete(self._k_conv(f[3:]), "sp:" + user)
            elif f.startswith(("cs:", "del:")) or f == "pv":
                # The user's settings, deletions for themselves, privacy.  (The
                # last seq delivered per conversation, ``ld:``, stays: a
                # re-added user must not get the entries before it again.)
                tx.delete(uk, f)
        head = _int(fields.get("head"))
        if _int(fields.get("floor")) != head:
            tx.put(uk, "floor", head)
        if self.cluster is not None:
            # Never back (redis_scripts MAXSET): a revoke through another
            # node since the read above must stay in force.
            # (The user's state version moves with it: see ClusterOps.change_key.)
            from .redis_scripts import _Round

            rnd = _Round()
            # What other nodes' re-checks would read of the purged state goes
            # (the revocation below is listed again), and so do the user's
            # registrations as online in groups (read fan-out).
            rnd.raw(self.cluster.change_key(user), "DEL", self.cluster.change_key(user))
            for f in fields:
                if f.startswith("cv:") and direct_members(f[3:]) is None:
                    rnd.hdel(self.cluster.on_key(f[3:]), user)
            rnd.script("MAXSET", (uk, self.cluster.change_key(user)), ("rv:", op.now, 1 << 62))
            await self.cluster.run(rnd)
        elif _int(fields.get("rv:")) < op.now:
            tx.put(uk, "rv:", op.now)
        return Purged(tombstones, entries, devices, tuple(changes))

    # -- reads --------------------------------------------------------------

    async def _read(self, tx: _Tx, op: Any) -> Result:
        kind = type(op)
        if kind is LoadSession:
            return await self._load_session(tx, op)
        if kind is ReadInbox:
            return InboxPage(op.user, tuple(await self._inbox_range(tx, op.user, op.after, op.limit)))
        if kind is ReadHistory:
            return await self._read_history(tx, op)
        if kind is ReadReaders:
            return await self._read_readers(tx, op)
        if kind is ReadEvents:
            return await self._read_events(tx, op)
        if kind is ReadDevices:
            if not valid_id(op.user):
                return Rejected(ErrorCode.BAD_REQUEST)
            return DevicesPage(op.user, tuple(await self._devices(tx, op.user)))
        if kind is ReadDedupe:
            # The record NewMessage writes (same slot: the sender's).
            if not (0 <= op.local_id < 1 << 64 and valid_id(op.sender) and valid_id(op.device)):
                return Deduped(False)
            prior = await tx.get(self._k_user(op.sender), f"d:{op.device}/{op.local_id}")
            return Deduped(prior is not None)
        if kind is ReadConversations:
            return await self._read_conversations(tx, op)
        if kind is ReadPresence:
            return await self._read_presence(tx, op)
        if kind is ReadRetention:
            if not valid_conversation(op.conv):
                return Rejected(ErrorCode.BAD_REQUEST)
            ret, hf = await tx.mget(self._k_conv(op.conv), ["ret", "hf"])
            age, count = (int(x) for x in ret.split(b":")) if ret else (-1, -1)
            return RetentionState(op.conv, age, count, _int(hf))
        raise TypeError(f"not a read op: {kind.__name__}")

    async def _devices(self, tx: _Tx, user: str) -> list[DeviceState]:
        out = []
        for f, v in sorted((await tx.getall(self._k_user(user))).items()):
            if f.startswith("dv:"):
                pos, seen = v.split(b":")
                out.append(DeviceState(user, f[3:], int(pos), int(seen)))
        return out

    async def _inbox_range(self, tx: _Tx, user: str, after: int, limit: int) -> list[tuple[int, StoredMessage]]:
        uk = self._k_user(user)
        head, floor = (_int(v) for v in await tx.mget(uk, ["head", "floor"]))
        start = max(after, floor) + 1
        out: list[tuple[int, StoredMessage]] = []
        # Holes (entries retention or a purge removed) are skipped.
        while start <= head and len(out) < limit:
            end = min(head, start + limit - len(out) - 1)
            positions = list(range(start, end + 1))
            refs = await tx.mget(uk, [f"i:{p}" for p in positions])
            # The page's messages and the user's delete-for-self marks in one
            # pipelined round (one round trip per master) instead of two
            # commands per entry: this read is what every push does.
            needs: dict[str, set[str]] = {}
            for ref in refs:
                if ref is not None:
                    seq, _, conv = ref.decode().split(":", 2)
                    if not seq.startswith("x"):
                        needs.setdefault(self._k_conv(conv), set()).add(f"s:{seq}")
                        needs.setdefault(uk, set()).add(f"del:{conv}/{seq}")
            await tx.prefetch(needs)
            for pos, ref in zip(positions, refs):
                if ref is None:
                    continue
                seq, _, conv = ref.decode().split(":", 2)
                if seq.startswith("x"):  # a DELETE entry (no seq): kept by msg_id
                    v = await tx.get(self._k_conv(conv), "x:" + seq[1:])
                    if v is None:
                        continue  # purged with its conversation
                    out.append((pos, _dec_msg(v)))
                    continue
                ck = self._k_conv(conv)
                if await tx.get(ck, f"s:{seq}") is None and int(seq) <= _int(await tx.get(ck, "hf")):
                    # Removed by retention or a purge on one node while another
                    # node was still fanning it out: a hole, like the others.
                    continue
                out.append((pos, (await self._current(tx, [await self._msg_at(tx, conv, int(seq))], user))[0]))
            start = end + 1
        return out

    async def _unread(self, tx: _Tx, user: str, conv: str) -> int:
        marker = _int(await tx.get(self._k_user(user), "rd:" + conv))
        last, hf = (_int(v) for v in await tx.mget(self._k_conv(conv), ["last", "hf"]))
        marker = max(marker, hf)
        seqs: list[int] = []
        for lo, hi in member_ranges(await self._spans_of(tx, conv, user)):
            seqs.extend(range(max(lo, marker + 1), min(hi, last) + 1))
        counted = [m for m in await self._msgs_at(tx, conv, seqs) if unread_for(m, user)]
        # Messages the user deleted for themselves are not unread.
        gone = await self._deleted_of(tx, user, conv, [m.seq for m in counted])
        return sum(unread_for(m, user, m.seq in gone) for m in counted)

    async def _deleted_of(self, tx: _Tx, user: str, conv: str, seqs: Sequence[int]) -> set[int]:
        """The seqs among ``seqs`` of ``conv`` that ``user`` deleted for
        themselves: one HMGET of their del: fields (none when no seqs)."""
        if not seqs:
            return set()
        marks = await tx.mget(self._k_user(user), [f"del:{conv}/{s}" for s in seqs])
        return {s for s, g in zip(seqs, marks) if g}

    # -- the conversation list ---------------------------------------------

    async def _settings(self, tx: _Tx, user: str, conv: str) -> tuple[bool, bool, int]:
        v = await tx.get(self._k_user(user), "cs:" + conv)
        if v is None:
            return (False, False, 0)
        p, m, h = v.split(b":")
        return (p == b"1", m == b"1", int(h))

    async def _entry(self, tx: _Tx, user: str, conv: str) -> ConversationEntry:
        spans = await self._spans_of(tx, conv, user)
        stored_last, hf = (_int(v) for v in await tx.mget(self._k_conv(conv), ["last", "hf"]))
        last_seq = last_visible(spans, stored_last)
        # The last message is the last MESSAGE/JOINED/LEFT entry, as it is now
        # (RECALL/EDIT entries amend it in place): walk back over amend entries.
        seq, floor, last = last_seq, last_message_floor(spans), None
        while seq >= floor and seq:
            v = await tx.get(self._k_conv(conv), f"s:{seq}")
            if v is None:
                # A purge or retention may have removed the last seq too: it
                # is then at or below the history floor (seqs continue).
                if seq == last_seq and seq > hf:
                    raise StoreError(f"missing message {conv!r} seq {seq}")
                break  # removed by retention
            m = _dec_msg(v)
            if m.kind not in AMENDING:
                # As history returns it to ``user``: one they deleted for
                # themselves is `deleted`, no payload (else every ConvUpdate
                # brought it back into their devices' views).
                (last,) = await self._current(tx, [m], user)
                break
            seq -= 1
        marker = _int(await tx.get(self._k_user(user), "rd:" + conv))
        seqs: list[int] = []
        for lo, hi in member_ranges(spans):
            seqs.extend(range(max(lo, marker + 1, hf + 1), min(hi, last_seq) + 1))
        mentioning = [m for m in await self._msgs_at(tx, conv, seqs) if mentions_user(m, user)]
        # Messages the user deleted for themselves are no mention (as unread).
        gone = await self._deleted_of(tx, user, conv, [m.seq for m in mentioning])
        mentions = sum(mentions_user(m, user, m.seq in gone) for m in mentioning)
        return conversation_entry(conv, last, marker, await self._unread(tx, user, conv), mentions,
                                  await self._settings(tx, user, conv))

    async def _list_access(self, tx: _Tx, user: str, conv: str) -> ErrorCode:
        members = await self._group_members(tx, conv)
        if members is None:
            return ErrorCode.UNKNOWN_CONVERSATION
        if user in members or await tx.get(self._k_user(user), "cv:" + conv) is not None:
            return ErrorCode.OK
        return ErrorCode.NOT_MEMBER

    async def _set_conversation(self, tx: _Tx, op: SetConversation) -> Result:
        code = await self._list_access(tx, op.user, op.conv)
        if code is not ErrorCode.OK:
            return Rejected(code)
        old = await self._settings(tx, op.user, op.conv)
        last_seq = last_visible(await self._spans_of(tx, op.conv, op.user),
                                _int(await tx.get(self._k_conv(op.conv), "last")))
        new = new_settings(op, old, last_seq)
        if new != old:
            if new == (False, False, 0):
                tx.delete(self._k_user(op.user), "cs:" + op.conv)
            else:
                tx.put(self._k_user(op.user), "cs:" + op.conv, f"{int(new[0])}:{int(new[1])}:{new[2]}")
        return ConversationSet(op.user, op.conv, await self._entry(tx, op.user, op.conv), new != old)

    async def _read_conversations(self, tx: _Tx, op: ReadConversations) -> ConversationsPage:
        if not (valid_id(op.user) and type(op.limit) is int and isinstance(op.cursor, bytes)
                and (op.conv == "" or valid_conversation(op.conv))):
            return ConversationsPage(ErrorCode.BAD_REQUEST, ())
        if op.conv:
            code = await self._list_access(tx, op.user, op.conv)
            if code is not ErrorCode.OK:
                return ConversationsPage(code, ())
            return ConversationsPage(ErrorCode.OK, (await self._entry(tx, op.user, op.conv),))
        return conversation_page([await self._entry(tx, op.user, c) for c in await self._conversations(tx, op.user)], op)

    async def _conversations(self, tx: _Tx, user: str) -> list[str]:
        return sorted(f[3:] for f in await tx.getall(self._k_user(user)) if f.startswith("cv:"))

    async def _load_session(self, tx: _Tx, op: LoadSession) -> Result:
        if not (valid_id(op.user) and valid_id(op.device)):
            return Rejected(ErrorCode.BAD_REQUEST)
        user = op.user
        uk = self._k_user(user)
        if self.cluster is not None and op.login:
            # Before anything else is read: the re-check starts from here.
            self.cluster.login_read(user, _int(await tx.get(uk, "sv")))
        listed = await self._conversations(tx, user)
        if self.cluster is not None and op.login:
            # Read fan-out: register this node's session in the user's groups,
            # then take what large groups' logs hold for the user, BEFORE the
            # head is read (the catch-up then covers them).  The list stays
            # (a pull adds entries of listed conversations only).
            await self.cluster.join_groups(user, [c for c in listed if direct_members(c) is None])
            tx = _Tx(self)
        stored = await self._device(tx, user, op.device)
        convs = []
        for conv in listed:
            pair = direct_members(conv)
            peer = "" if pair is None else (pair[1] if pair[0] == user else pair[0])
            last, purged = (_int(v) for v in await tx.mget(self._k_conv(conv), ["last", "pp"]))
            convs.append(ConversationState(
                conv,
                _int(await tx.get(uk, "rd:" + conv)),
                last_visible(await self._spans_of(tx, conv, user), last),
                await self._unread(tx, user, conv),
                peer,
                _int(await tx.get(self._k_user(peer), "rd:" + conv)) if peer else 0,
                purged,
            ))
        head, floor, rv_all, rv_dev = await tx.mget(uk, ["head", "floor", "rv:", "rv:" + op.device])
        return SessionLoaded(user, op.device, _int(head), _int(floor),
                             stored.position if stored is not None else -1, tuple(convs),
                             max(_int(rv_all), _int(rv_dev)))

    async def _read_history(self, tx: _Tx, op: ReadHistory) -> HistoryPage:
        if not (valid_conversation(op.conv) and (valid_id(op.user) or op.user == "")):
            return HistoryPage(ErrorCode.BAD_REQUEST, ())
        if await self._group_members(tx, op.conv) is None:
            return HistoryPage(ErrorCode.UNKNOWN_CONVERSATION, ())
        spans = await self._spans_of(tx, op.conv, op.user) if op.user else ((0, OPEN),)  # ("": the broker's own read)
        if not spans:
            return HistoryPage(ErrorCode.NOT_MEMBER, ())
        ck = self._k_conv(op.conv)
        last, hv, hf = await tx.mget(ck, ["last", "hv", "hf"])
        visible = visible_ranges(spans, _int(hv) == 1)
        seqs = iter_page_seqs(after_floor(visible, _int(hf)), _int(last), op.from_seq, op.backward)
        page: list[StoredMessage] = []
        while len(page) < op.limit:
            # (A chunk at a time: the entries history skips -- hidden_amend --
            # are rare, so the first chunk nearly always fills the page.)
            chunk = list(itertools.islice(seqs, op.limit - len(page)))
            if not chunk:
                break
            page += [m for m in await self._msgs_at(tx, op.conv, chunk) if not hidden_amend(m, visible)]
        return HistoryPage(ErrorCode.OK, tuple(await self._current(tx, page, op.user)))

    async def _read_readers(self, tx: _Tx, op: ReadReaders) -> ReadersPage:
        if not (valid_conversation(op.conv) and (valid_id(op.user) or op.user == "")):
            return ReadersPage(ErrorCode.BAD_REQUEST, ())
        members = await self._group_members(tx, op.conv)
        if members is None:
            return ReadersPage(ErrorCode.UNKNOWN_CONVERSATION, ())
        if op.user and op.user not in members:  # (empty: the broker's own read)
            return ReadersPage(ErrorCode.NOT_MEMBER, ())
        last = _int(await tx.get(self._k_conv(op.conv), "last"))
        out = []
        for u in sorted(members):
            out.append((u, min(_int(await tx.get(self._k_user(u), "rd:" + op.conv)), last)))
        return ReadersPage(ErrorCode.OK, tuple(out))

    async def _read_events(self, tx: _Tx, op: ReadEvents) -> Result:
        if not (valid_id(op.consumer) and (op.after is None or type(op.after) is int) and type(op.limit) is int):
            return Rejected(ErrorCode.BAD_REQUEST)
        cursor, last, floor = (_int(v) for v in await tx.mget(self._ev, ["c:" + op.consumer, "last", "floor"]))
        after = cursor if op.after is None else op.after
        start = max(after, floor) + 1
        end = min(last, start + max(op.limit, 0) - 1)
        ids = list(range(start, end + 1))
        page = []
        for i, v in zip(ids, await tx.mget(self._ev, [f"e:{i}" for i in ids]) if ids else []):
            t, _, data = v.partition(b":")  # type: ignore[union-attr]
            page.append(StoredEvent(i, int(t), bytes(data)))
        consumers: tuple[tuple[str, int], ...] = ()
        if op.limit == 0:
            consumers = tuple(sorted((await self._event_cursors()).items()))
        return EventsPage(cursor, tuple(page), last, consumers)

    async def _event_cursors(self) -> dict[str, int]:
        """consumer -> durable cursor.  HSCAN of the "c:" fields only: the
        hash holds every event kept too, which HGETALL would send whole (for
        each outbox-depth scrape and consumer listing).  A field HSCAN
        returns twice (a rehash between pages) is one entry."""
        out: dict[str, int] = {}
        cursor = 0
        while True:
            cursor, found = await self._call(lambda c=cursor: self._r.hscan(self._ev, c, match="c:*", count=1000))
            for f, v in found.items():
                out[(f.decode() if isinstance(f, bytes) else f)[2:]] = int(v)
            if not cursor:
                return out

    # -- the Store read methods, awaited (for tools and tests) --------------

    async def conversation_exists(self, conv: str) -> bool:
        return valid_conversation(conv) and await self._group_members(_Tx(self), conv) is not None

    async def members(self, conv: str) -> tuple[str, ...]:
        if not valid_conversation(conv):
            return ()
        return tuple(sorted(await self._group_members(_Tx(self), conv) or ()))

    async def is_member(self, conv: str, user: str) -> bool:
        return valid_conversation(conv) and user in (await self._group_members(_Tx(self), conv) or ())

    async def last_seq(self, conv: str) -> int:
        return _int(await _Tx(self).get(self._k_conv(conv), "last"))

    async def history(self, conv: str, from_seq: int, limit: int, backward: bool = False) -> list[StoredMessage]:
        tx = _Tx(self)
        last, floor = (_int(v) for v in await tx.mget(self._k_conv(conv), ["last", "hf"]))
        if limit <= 0:
            return []
        if backward:
            top = last if from_seq <= 0 else min(from_seq - 1, last)
            seqs = list(range(top, max(top - limit, floor), -1))
        else:
            start = max(from_seq, floor) + 1
            seqs = list(range(start, min(last, start + limit - 1) + 1))
        return await self._current(tx, await self._msgs_at(tx, conv, seqs))

    async def message(self, msg_id: bytes) -> Optional[StoredMessage]:
        if not isinstance(msg_id, bytes):
            return None
        tx = _Tx(self)
        ref = await tx.get(self._k_msg(msg_id), "r")
        if ref is None:
            return None
        seq, _, conv = ref.decode().partition(":")
        if seq == "0":  # a DELETE entry: no seq, kept by msg_id
            v = await tx.get(self._k_conv(conv), "x:" + msg_id.hex())
            return _dec_msg(v) if v is not None else None
        return await self._msg_at(tx, conv, int(seq))

    async def inbox_head(self, user: str) -> int:
        return _int(await _Tx(self).get(self._k_user(user), "head"))

    async def inbox_floor(self, user: str) -> int:
        return _int(await _Tx(self).get(self._k_user(user), "floor"))

    async def inbox_range(self, user: str, after: int, limit: int) -> list[tuple[int, StoredMessage]]:
        return await self._inbox_range(_Tx(self), user, after, limit)

    async def device(self, user: str, device: str) -> Optional[DeviceState]:
        return await self._device(_Tx(self), user, device)

    async def devices(self, user: str) -> list[DeviceState]:
        return await self._devices(_Tx(self), user)

    async def revoked_before(self, user: str, device: str) -> int:
        a, b = await _Tx(self).mget(self._k_user(user), ["rv:", "rv:" + device])
        return max(_int(a), _int(b) if device else 0)

    async def read_marker(self, user: str, conv: str) -> int:
        return _int(await _Tx(self).get(self._k_user(user), "rd:" + conv))

    async def read_positions(self, conv: str) -> dict[str, int]:
        if not valid_conversation(conv):
            return {}
        tx = _Tx(self)
        out = {}
        for u in sorted(await self._group_members(tx, conv) or ()):
            out[u] = _int(await tx.get(self._k_user(u), "rd:" + conv))
        return out

    async def unread(self, user: str, conv: str) -> int:
        if not (valid_id(user) and valid_conversation(conv)):
            return 0
        return await self._unread(_Tx(self), user, conv)

    async def spans(self, conv: str, user: str) -> tuple[tuple[int, int], ...]:
        if not (valid_conversation(conv) and valid_id(user)):
            return ()
        return await self._spans_of(_Tx(self), conv, user)

    async def history_visible(self, conv: str) -> bool:
        if not valid_conversation(conv) or direct_members(conv) is not None:
            return False
        return _int(await _Tx(self).get(self._k_conv(conv), "hv")) == 1

    async def conversations(self, user: str) -> list[str]:
        return await self._conversations(_Tx(self), user)


_HANDLERS: dict[type, Any] = {
    NewMessage: RedisStore._new_message,
    AckPosition: RedisStore._ack,
    TouchDevice: RedisStore._touch,
    MarkRead: RedisStore._mark_read,
    Reclaim: RedisStore._reclaim,
    CreateGroup: RedisStore._create_group,
    AddMembers: RedisStore._change_members,
    RemoveMembers: RedisStore._change_members,
    RevokeTokens: RedisStore._revoke,
    SetPresencePrivacy: RedisStore._set_privacy,
    AppendEvent: RedisStore._append_event_op,
    AckEvents: RedisStore._ack_events,
    DeleteConsumer: RedisStore._delete_consumer,
    AmendMessage: RedisStore._amend,
    SetConversation: RedisStore._set_conversation,
    SetRetention: RedisStore._set_retention,
    Expire: RedisStore._expire,
    PurgeConversation: RedisStore._purge_conversation,
    PurgeUser: RedisStore._purge_user,
}
