"""Embedding pimcore in a trio program: :func:`open_pimcore` and its handle.

A backend that embeds pimcore runs the broker in its own process::

    async with open_pimcore(data_dir="chat-data", listen=["tcp://127.0.0.1:7400"]) as im:
        token = im.issue_token("alice", ttl=3600)       # hand it to the app
        await im.create_group("team", ["alice", "bob"])
        print(await im.unread("bob", "team"))

The handle is the one surface the other hosts share: :mod:`pimcore.asyncio`
wraps the same handle for asyncio programs (trio's guest mode), and the C ABI
(``bindings/``) wraps it for everything else.

Everything the handle reads goes through the store's request interface
(:class:`~pimcore.store.StoreRequest`), so it works the same over the
embedded LMDB store, the memory store and an asynchronous (networked) store.
"""

from __future__ import annotations

import base64
import collections
import functools
import gc
import itertools
import json
import logging
import threading
import time
import weakref
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import (TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Optional,
                    Sequence, Union)

import trio

from ._util import unwrap_single
from .auth import JwtAuthenticator, issue_token
from .core import Authenticator, ContentFilter, Identity
from .config import (ConfigError, DataDirStart, ServeSettings, _check_data_dir, load_settings, store_refusal,
                     token_secret)
from .errors import BrokerStopped, ErrorCode, PimError, StoreError
from .frames import MessageKind
from . import ids
from .ids import EMPTY_GROUP, LAST_MEMBERS, SYSTEM, _show, conversation_problem, group_problem, id_problem, valid_id
from .net.server import BrokerServer, ServerStatistics, open_broker_server
from .store import AsyncStore, LmdbStore, Store
from .store.base import (
    ConsumerDeleted,
    DeleteConsumer,
    EventsAcked,
    EventsPage,
    ReadEvents,
    StoredEvent,
    ConversationState,
    DevicesPage,
    GroupChanged,
    HistoryPage,
    LoadSession,
    ReadDevices,
    ReadHistory,
    ReadOp,
    ReadPresence,
    PresencePage,
    PresencePrivacySet,
    Rejected,
    SessionLoaded,
    StoredMessage,
    StoreRequest,
    Purged,
    ReadRetention,
    RetentionState,
)

if TYPE_CHECKING:
    import ssl

__all__ = [
    "open_pimcore", "Pimcore", "RequestRefused", "Posted", "Conversation", "ConversationListPage", "ReadPositions", "DevicePosition",
    "HostEvent", "EventStream", "SYSTEM", "EventsDisabled", "ConsumerInUse", "UserPresence", "Retention", "Purged",
    "BrokerStopped", "MIN_RETENTION_AGE", "MAX_EVENTS_PAGE", "MAX_EVENT_CONSUMERS",
]

_log = logging.getLogger("pimcore.net")

#: How far after now (µs) :meth:`Pimcore.revoke`'s ``before`` may be: a
#: little clock skew between the host and the broker, no more.
REVOKE_AHEAD = 60 * 1_000_000

#: Shortest ``max_age`` (µs) :meth:`Pimcore.set_retention` takes, 0 (no
#: limit) aside: one minute.  Shorter, the reclaim pass deletes messages
#: faster than devices can read them -- and a host passing seconds for µs
#: (``max_age=30``) would wipe the conversation's history.
MIN_RETENTION_AGE = 60 * 1_000_000

#: Most host events one :meth:`Pimcore.next_events` page holds (``limit``),
#: as ``GET /v1/events``'s ``limit``.
MAX_EVENTS_PAGE = 10_000

#: Most names the recent-read record of :meth:`Pimcore.delete_consumer`'s
#: ``consumer_idle`` rule holds (the oldest leave first).
_MAX_RECENT_READS = 65_536

#: Most consumers :meth:`Pimcore.event_consumers` lists (sorted by name):
#: a broker has a few, an answer stays bounded whatever the store holds.
MAX_EVENT_CONSUMERS = 10_000

#: Longest token lifetime :meth:`Pimcore.issue_token` issues (s): 366 days.
MAX_TOKEN_TTL = 366 * 24 * 3600


def token_ttl_problem(ttl: object) -> Optional[str]:
    """Why ``ttl`` is no token lifetime :meth:`Pimcore.issue_token` (and
    ``pimcore token``) issues -- None if it is one: an int, 1 ..
    MAX_TOKEN_TTL s (as POST /v1/tokens and the C ABI take it)."""
    if type(ttl) is not int:
        return f"ttl must be whole seconds, 1..{MAX_TOKEN_TTL} (366 days), got {ttl!r:.40}"
    if not 1 <= ttl <= MAX_TOKEN_TTL:
        return f"ttl must be 1..{MAX_TOKEN_TTL} seconds (366 days), got {ttl!r}"
    return None

#: Longest kick reason (UTF-8 bytes): it is logged and stored in events.
MAX_KICK_REASON = 256


def _reason_problem(reason: object) -> Optional[str]:
    """Why ``reason`` is no kick reason (None if it is one): a str of at
    most MAX_KICK_REASON bytes in UTF-8 (it is logged, sent in the Close
    frame and stored in events)."""
    what = f"the reason must be a string of at most {MAX_KICK_REASON} bytes (UTF-8)"
    if not isinstance(reason, str):
        return f"{what}, got {type(reason).__name__}"
    try:
        size = len(reason.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return f"{what}, got text that is not valid UTF-8 ({exc.reason} at {exc.start})"
    if size > MAX_KICK_REASON:
        return f"{what}, got {size} bytes"
    return None


#: Device id the handle's reads use where the store wants one (never a
#: real device: it is not registered by a read).
_READER_DEVICE = "pimcore-host"


def _why(code: ErrorCode, *, users: Sequence[object] = (), conv: object = None, group: object = None) -> str:
    """``": <the rule>"`` for the first invalid id among those given when
    ``code`` is BAD_REQUEST, else "": the core refuses with the code alone,
    and a host's error should say which id broke which rule."""
    if code is not ErrorCode.BAD_REQUEST:
        return ""
    if group is not None and (problem := group_problem(group)) is not None:
        return f": {problem}"
    if conv is not None and (problem := conversation_problem(conv)) is not None:
        return f": {problem}"
    for user in users:
        if (problem := id_problem(user)) is not None:
            return f": {problem}"
    return ""


class RequestRefused(PimError):
    """The broker refused a host request; ``code`` says why (an ErrorCode:
    BAD_REQUEST, UNKNOWN_CONVERSATION, NOT_MEMBER, ALREADY_EXISTS, ...)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class EventsDisabled(PimError, ValueError):
    """The broker records no host events (``[server] events`` is off), so
    there are none to read or acknowledge: start it with events on."""

    def __init__(self) -> None:
        super().__init__(EVENTS_DISABLED)


class ConsumerInUse(PimError, RuntimeError):
    """:meth:`Pimcore.delete_consumer` refused: ``consumer`` has a live
    reader in this broker -- an open :meth:`Pimcore.events` stream, a
    :meth:`Pimcore.next_events` call waiting, an event handler
    (``set_event_handler``), the webhook sender, an HTTP ``/v1/events``
    long-poll or stream -- or was read or acked here within the last
    ``[server] consumer_idle`` seconds (``ago``: how long ago, s; None for
    a live reader): a reader that polls between its reads.  Deleting its
    cursor under it would restart it from 0 at its next read, silently,
    past what it had not read: stop the reader first.  Nothing was
    deleted."""

    def __init__(self, consumer: str, ago: Optional[float] = None, idle: float = 0.0, restarted: bool = False) -> None:
        if ago is None:
            said = ("is in use by a reader of this broker (an open event stream or a waiting read, an event"
                    " handler or callback, the webhook sender, an HTTP /v1/events long-poll or stream): stop it first")
        elif restarted:
            said = (f"may have a poller from before a restart: the broker started {ago:.1f} s ago, within"
                    f" [server] consumer_idle ({idle:g} s); try again in {max(idle - ago, 0.1):.1f} s, with the"
                    " reader stopped")
        else:
            said = (f"was read or acked {ago:.1f} s ago, within [server] consumer_idle ({idle:g} s): a reader that"
                    f" polls may still be reading it; stop it, and try again in {max(idle - ago, 0.1):.1f} s")
        super().__init__(f"delete_consumer: consumer {_show(consumer)} {said} (deleted under a reader, the next"
                         " reclaim would drop what it had not read, and it would restart from the oldest event kept)")
        self.consumer = consumer
        self.ago = ago
        #: Seconds until a delete may succeed (None: a live reader: when it stops).
        self.retry_after = None if ago is None else max(idle - ago, 0.0)


#: The message of :class:`EventsDisabled` (and of the HTTP API's 409
#: ``EVENTS_DISABLED``).
EVENTS_DISABLED = ("the broker records no host events: start it with [server] events = true "
                   "(PIMCORE_SERVER_EVENTS=true, open_pimcore(events=True))")


@dataclass(frozen=True, slots=True)
class Posted:
    """A durable host post: its identity (a retry with the same idempotency
    key gets the same values).  ``duplicate``: this call stored nothing, the
    key named a message already stored (or in flight); not part of equality,
    so a retry compares equal to the original."""

    conv: str
    msg_id: bytes  # 16 bytes
    seq: int
    server_time: int  # µs, the broker's clock
    duplicate: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Conversation:
    """One conversation of a user, as :meth:`Pimcore.conversations` lists it:
    the user's read marker, the last seq, the exact unread count, and for a
    1:1 chat the peer and the peer's marker ("" and 0 for a group)."""

    conv: str
    read_seq: int
    last_seq: int
    unread: int
    peer: str
    peer_read_seq: int


@dataclass(frozen=True, slots=True)
class ConversationListPage:
    """A page of :meth:`Pimcore.conversation_list`: ``entries``
    (:class:`~pimcore.store.base.ConversationEntry`) in list order,
    ``cursor`` for the next page (opaque bytes), ``more``."""

    entries: list[Any]
    cursor: bytes
    more: bool


@dataclass(frozen=True, slots=True)
class HostEvent:
    """One host event (``open_pimcore(..., events=True)``; see the Events
    section of docs/EMBEDDING.md).  ``id``: gap-free u64, ascending, the
    cursor to ack; ``time``: µs (the message's server time for "message").

    ``type`` and the fields it fills (the others keep their defaults):

    * "message" -- a stored entry: ``conv``, ``seq``, ``msg_id``, ``sender``,
      ``device`` (the sender's), ``kind`` (frames.MessageKind: 0 a message,
      1 JOINED, 2 LEFT, 3 RECALL, 4 EDIT, 5 DELETE), ``server_time``,
      ``local_id``, ``payload`` (an EDIT's: the new payload),
      ``recipients`` (every user it was fanned out to, the sender included,
      sorted), ``offline_recipients`` (those of them with no device
      online on this broker -- nor, over a store shared by several nodes,
      on another live node -- when the event was handed to the host: the
      push-notification hook), ``target`` (RECALL / EDIT / DELETE: the
      seq of the message acted on), ``muted`` (recipients who muted the
      conversation), ``mentioned`` (recipients the message mentions, the
      sender never) and ``mention_all`` (it mentions everyone);
    * "read" -- ``user``'s read marker in ``conv`` moved to ``seq``
      (``unread`` left);
    * "online" / "offline" -- ``user``'s ``device`` logged in / its session
      ended (``code``: the CloseCode name, None if the connection was lost;
      ``reason``);
    * "kicked" -- the host kicked ``user``'s ``device`` (``reason``);
    * "conversation" -- ``user`` changed their settings of ``conv``:
      ``pinned``, ``hidden``, and ``muted`` = (``user``,) when muted.
    """

    id: int
    type: str
    time: int
    conv: str = ""
    seq: int = 0
    msg_id: bytes = b""
    sender: str = ""
    device: str = ""
    kind: int = 0
    server_time: int = 0
    local_id: int = 0
    payload: bytes = b""
    recipients: tuple[str, ...] = ()
    offline_recipients: tuple[str, ...] = ()
    user: str = ""
    unread: int = 0
    code: Optional[str] = None
    reason: str = ""
    target: int = 0
    muted: tuple[str, ...] = ()
    mentioned: tuple[str, ...] = ()
    mention_all: bool = False
    pinned: bool = False
    hidden: bool = False


@dataclass(frozen=True, slots=True)
class DevicePosition:
    """One device of a user in :class:`ReadPositions`."""

    device: str
    position: int  # the highest inbox position the device acked
    last_seen: int  # µs, its last login or ack
    online: bool  # connected to this broker now


@dataclass(frozen=True, slots=True)
class Retention:
    """:meth:`Pimcore.retention`: the conversation's own history retention
    (None per field: it follows the broker default, ``[server]
    history_max_age`` / ``history_max_count``; 0: no limit) -- ``max_age``
    in µs, ``max_count`` in entries -- and its history floor: seqs <=
    ``floor`` were removed by retention or a purge (history starts after
    it; 0 if nothing was)."""

    conv: str
    max_age: Optional[int]
    max_count: Optional[int]
    floor: int


@dataclass(frozen=True, slots=True)
class ReadPositions:
    """:meth:`Pimcore.read_positions`: ``markers`` are (conv, read seq)
    sorted by conv; ``head``/``floor`` the user's inbox positions (entries
    above ``floor`` are still stored); ``devices`` sorted by device id."""

    user: str
    head: int
    floor: int
    markers: tuple[tuple[str, int], ...]
    devices: tuple[DevicePosition, ...]


@dataclass(frozen=True, slots=True)
class UserPresence:
    """:meth:`Pimcore.presence`: what the broker knows of ``user`` --
    online on this broker now, the last time one of their devices was
    heard from (µs; 0 while online or if never), and their "hide my
    last-seen time" setting (the host sees the time regardless)."""

    user: str
    online: bool
    last_seen: int
    hide_last_seen: bool


def _host_event(ev: StoredEvent, online: Callable[[str], list[str]]) -> HostEvent:
    d = json.loads(ev.data)
    type_ = d.pop("type", "")
    if type_ == "message":
        d["msg_id"] = bytes.fromhex(d["msg_id"])
        d["payload"] = base64.b64decode(d["payload"])
        d["recipients"] = tuple(d["recipients"])
        d["offline_recipients"] = tuple(u for u in d["recipients"] if not online(u))
        d["muted"] = tuple(d.get("muted", ()))
        d["mentioned"] = tuple(d.get("mentioned", ()))
    elif type_ == "conversation":
        d["muted"] = (d.get("user", ""),) if d.get("muted") else ()
    known = {k: v for k, v in d.items() if k in HostEvent.__dataclass_fields__ and k not in ("id", "type", "time")}
    return HostEvent(ev.id, type_, ev.time, **known)


class EventStream:
    """``async for ev in handle.events(...)``: host events one by one,
    waiting for the next commit when caught up (it never ends by itself).
    Its cursor lives in memory; only :meth:`Pimcore.ack_events` moves the
    durable one."""

    def __init__(self, handle: "Pimcore", consumer: str, after: Optional[int], limit: int) -> None:
        self._handle = handle
        self.consumer = consumer
        handle._track_reader(self, consumer)  # a live reader until let go
        #: The id of the last event handed out (None: not started yet).
        self.after = after
        self._limit = limit
        self._buf: list[HostEvent] = []

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> HostEvent:
        if not self._buf:
            after, self._buf = await self._handle.next_events(self.consumer, after=self.after, limit=self._limit)
            self._buf.reverse()
            self.after = after
        # Consumed only once returned: a cancellation at this await keeps it.
        (ev,) = await fresh_page(self._handle, (self._buf[-1],))
        self._buf.pop()
        self.after = ev.id
        return ev


def fresh_presence(ev: HostEvent, online: Callable[[str], Any]) -> HostEvent:
    """``ev`` with ``offline_recipients`` as of now (a page is read ahead:
    the event streams recompute it when they hand an event out);
    ``online(user)`` is truthy for a user online now."""
    if ev.type != "message":
        return ev
    return replace(ev, offline_recipients=tuple(u for u in ev.recipients if not online(u)))


async def fresh_page(handle: "Pimcore", page: Sequence[HostEvent]) -> list[HostEvent]:
    """``page`` with every message event's ``offline_recipients`` as of now
    (:meth:`Pimcore.online_anywhere`: one read for the whole page)."""
    users = {u for ev in page if ev.type == "message" for u in ev.recipients}
    online = await handle.online_anywhere(users) if users else frozenset()
    return [fresh_presence(ev, online.__contains__) for ev in page]


class Pimcore:
    """An embedded broker; create it with :func:`open_pimcore`.

    Methods are trio-async where they wait for the broker or the store, and
    raise :class:`RequestRefused` (with an ErrorCode) for requests the broker
    refuses, :class:`~pimcore.errors.StoreError` when the store failed.
    Once the ``open_pimcore`` block exits, every method (the properties
    aside) raises :class:`~pimcore.errors.BrokerStopped`, and so do the
    calls still waiting for the broker then.
    """

    def __init__(self, server: BrokerServer, store: Union[Store, AsyncStore], settings: ServeSettings, secret: Optional[bytes]) -> None:
        self.server = server
        self.settings = settings
        self._store = store
        self._secret = secret
        self._started = time.monotonic()
        self._ids = itertools.count(1)
        self._held: set[str] = set()  # consumers whose durable cursor this handle made sure of
        #: consumer -> its live readers in this broker (streams, waiting
        #: calls, handlers, HTTP readers): delete_consumer refuses those.
        #: A lock, not the trio loop: a stream is let go (weakref.finalize)
        #: in whatever thread drops it last -- an asyncio or threaded host's.
        self._readers: dict[str, int] = {}
        #: consumer -> when (time.monotonic) a reader of this broker last let
        #: it go or acked it: a poller between two reads is no live reader,
        #: yet deleting its cursor then dropped what it had not read (a
        #: trial) -- refused within ``consumer_idle`` of it, as Kafka keeps a
        #: group's member for its session timeout after its last poll.
        #: Oldest first (an OrderedDict), so expired names leave from the
        #: front in O(1) each; at most _MAX_RECENT_READS names (a client
        #: making names up cannot grow it, nor slow each read).  A name
        #: not in it counts as read at the broker's start: a poller of
        #: before a restart is protected for consumer_idle after it too.
        self._last_read: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._readers_lock = threading.Lock()
        #: The HTTP listener (server API, /metrics...) when opened with ``http=URL``.
        self.http: Optional[Any] = None
        #: The event webhook sender (pimcore.webhooks.WebhookSender) when ``[webhooks]`` is configured.
        self.webhooks: Any = None

    # ------------------------------------------------------------ identity

    @property
    def urls(self) -> list[str]:
        """The listeners' URLs (empty when the broker has none)."""
        return self.server.urls

    @property
    def http_url(self) -> Optional[str]:
        """The HTTP listener's URL (``http://`` or ``https://``, the real
        port), None unless opened with ``http=URL``."""
        return self.http.url if self.http is not None else None

    @property
    def epoch(self) -> bytes:
        """The store's current epoch (16 bytes, see Store.epoch)."""
        return self.server.broker.epoch

    @property
    def store_id(self) -> str:
        """The store's id (16 hex digits; Store.node_id), fixed when the store
        was created: event ids are unique per store, so a receiver dedupes
        events by (store_id, event id) -- a new data directory restarts ids."""
        return self.server.broker.node_id.hex()

    def statistics(self) -> ServerStatistics:
        return self.server.statistics()

    def issue_token(self, user: str, device: Optional[str] = None, *, ttl: int = 3600) -> str:
        """A login token for ``user`` (bound to ``device`` if given), valid for
        ``ttl`` seconds (1 .. :data:`MAX_TOKEN_TTL`, 366 days), signed with
        the broker's secret, issued now -- or at the revocation in force
        for the user (or the device) when this broker knows one later than
        now (:meth:`revoke`), so that a token issued right after a
        revocation logs in.  Raises ValueError for invalid ids or a ttl out
        of range, TypeError for a ttl that is no int (1.5: whole seconds),
        RuntimeError if the broker was opened with its own authenticator (it
        has no secret to sign with)."""
        self.server.check_running()
        if self._secret is None:
            raise RuntimeError("this broker authenticates with a custom authenticator: it cannot issue tokens")
        if isinstance(ttl, bool) or not isinstance(ttl, int):
            # Whole seconds, as documented and as POST /v1/tokens and the C
            # ABI take it: a float was taken and its token lived less than
            # ttl (a new user's trial; exp is rounded up now as well).
            raise TypeError(f"cannot issue a token: ttl must be an int of seconds, 1..{MAX_TOKEN_TTL} (366 days),"
                            f" not {type(ttl).__name__} {ttl!r:.40}")
        problem = token_ttl_problem(int(ttl))
        if problem is not None:
            raise ValueError(f"cannot issue a token: {problem}")
        # Stamped at the revocation in force when this broker knows one later
        # than now: revoke() moves its bound past a live session's token
        # stamped ahead (up to the authenticator's 5 s), and a token stamped
        # now was refused in those seconds (a new user's trial).  One more
        # than 5 s ahead (revoke's before=, up to REVOKE_AHEAD) logs in once
        # that is within 5 s; stamped now it never would.
        issued = time.time()
        bound = self.server.broker.revoked_before(user, device)
        return issue_token(self._secret, user, device, ttl=ttl,
                           now=bound / 1e6 if bound > issued * 1e6 else None)

    # ------------------------------------------------------------ groups

    async def create_group(self, conv: str, members: Iterable[str], *, history_visible: bool = False) -> GroupChanged:
        """Create group ``conv`` with ``members`` (a list, tuple or set of
        user ids), ordered with the messages around it.  ``history_visible``:
        members added later may read what was said before they joined
        (default: not).  Raises RequestRefused (BAD_REQUEST: a malformed id,
        or no members -- a group needs at least one; ALREADY_EXISTS),
        StoreError if the store failed; TypeError (nothing changed) for a
        str instead of a list -- it would be one user per letter -- or an id
        that is no str (so do add_members and remove_members), and for a
        ``history_visible`` that is not True or False (a str such as
        ``'false'``, or 0/1, as POST /v1/groups refuses them)."""
        visible = _history_flag(history_visible)
        users = _user_ids(members, "members")
        if not users:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"group {_show(conv)} not changed: BAD_REQUEST: {EMPTY_GROUP}")
        create = functools.partial(self.server.broker.create_group, history_visible=visible)
        return await self._admin(create, conv, users)

    async def members(self, conv: str) -> tuple[str, ...]:
        """The members of group ``conv``, sorted (the two users of a direct
        conversation id).  Raises RequestRefused (BAD_REQUEST: a malformed
        id; UNKNOWN_CONVERSATION: no such group), StoreError."""
        members = await self._group_read(conv, "members", lambda store: store.members(conv))
        if members is None:
            raise RequestRefused(ErrorCode.UNKNOWN_CONVERSATION, f"members of {_show(conv)}: UNKNOWN_CONVERSATION")
        return tuple(members)

    async def _group_read(self, conv: str, what: str, read: Callable[[Any], Any]) -> Any:
        """``read(store)`` (awaited for an AsyncStore) for a well-formed
        ``conv`` (else RequestRefused BAD_REQUEST naming ``what``); None if
        the conversation does not exist (an empty answer is asked about)."""
        problem = conversation_problem(conv)
        if problem is not None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"{what}: {problem}")
        self.server.check_running()
        store = self._store
        if isinstance(store, AsyncStore):
            value = await read(store)
            exists = bool(value) or await store.conversation_exists(conv)
        else:
            value = read(store)
            exists = bool(value) or store.conversation_exists(conv)
        return value if exists else None

    async def history_visible(self, conv: str) -> bool:
        """Whether members added to group ``conv`` later may read what was
        said before they joined (``create_group(..., history_visible=True)``,
        fixed at creation; False for a direct conversation: both users see
        it all anyway).  Raises RequestRefused (BAD_REQUEST: a malformed id;
        UNKNOWN_CONVERSATION: no such group), StoreError."""
        visible = await self._group_read(conv, "history_visible", lambda store: store.history_visible(conv))
        if visible is None:
            raise RequestRefused(ErrorCode.UNKNOWN_CONVERSATION, f"group {_show(conv)}: UNKNOWN_CONVERSATION")
        return bool(visible)

    async def add_members(self, conv: str, users: Iterable[str]) -> GroupChanged:
        """Raises RequestRefused (BAD_REQUEST, UNKNOWN_CONVERSATION), StoreError;
        ValueError (nothing changed) for no users."""
        some = _some_users(users, "add_members", conv)
        await self._check_membership_change(conv, some, adding=True)
        return await self._admin(self.server.broker.add_members, conv, some)

    async def remove_members(self, conv: str, users: Iterable[str]) -> GroupChanged:
        """Raises RequestRefused (BAD_REQUEST: a malformed id, or the
        removal would leave the group with no member -- refused as a whole,
        no one removed; purge the group to delete it; UNKNOWN_CONVERSATION),
        StoreError; ValueError (nothing changed) for no users."""
        some = _some_users(users, "remove_members", conv)
        await self._check_membership_change(conv, some, adding=False)
        return await self._admin(self.server.broker.remove_members, conv, some, bad_request=LAST_MEMBERS)

    async def _check_membership_change(self, conv: str, users: list[str], *, adding: bool) -> None:
        """RequestRefused (BAD_REQUEST, nothing changed) for a change of
        several users past :data:`pimcore.ids.MAX_MEMBERSHIP_ENTRIES` (see
        :func:`~pimcore.ids.membership_change_problem`).  The members are
        read first: a change racing it is bounded as of that read."""
        distinct = set(users)
        if len(distinct) < 2 or group_problem(conv) is not None or any(id_problem(u) for u in distinct):
            return  # (one user is always taken; a malformed id is refused by the change itself)
        try:
            current = set(await self.members(conv))
        except RequestRefused:
            return  # (no such group: the change itself says so)
        # Only the users that change write entries (a retry of a change done
        # writes none).
        changing = len(distinct - current) if adding else len(distinct & current)
        problem = ids.membership_change_problem(changing, len(current) + (changing if adding else 0))
        if problem is not None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"group {_show(conv)} not changed: BAD_REQUEST: {problem}")

    async def _admin(self, method: Callable[..., Any], conv: str, users: list[str], *,
                     bad_request: str = "") -> GroupChanged:
        """``bad_request``: why a BAD_REQUEST with well-formed ids is."""
        result = await self.server.admin_result(method, conv, users)
        if isinstance(result, Rejected):
            if result.code is ErrorCode.STORE_UNAVAILABLE:
                raise _store_failed(f"group {_show(conv)}", self.server.store_failure_cause(), "not changed")
            why = _why(result.code, users=users, group=conv)
            if not why and result.code is ErrorCode.BAD_REQUEST and bad_request:
                why = f": {bad_request}"
            raise RequestRefused(result.code, f"group {_show(conv)} not changed: {result.code.name}" + why)
        assert isinstance(result, GroupChanged)
        return result

    # ------------------------------------------------------------ messages and sessions

    async def post(
        self,
        conv: str,
        payload: bytes,
        *,
        sender: str = SYSTEM,
        device: str = SYSTEM,
        idempotency_key: Union[str, bytes, None] = None,
        mentions: Sequence[str] = (),
        mention_all: bool = False,
    ) -> Posted:
        """Store ``payload`` in ``conv`` and deliver it like a client's
        message, once it is durable.  ``sender``/``device``: a member and one
        of its device ids, or the system (``pimcore.ids.SYSTEM``, the default;
        allowed in every conversation, shown as the system by clients).
        ``idempotency_key`` (at most 256 bytes) makes retries safe: posts with
        the same sender, device and key are one message (the original's
        identity comes back), exactly like a client's local id: a post with
        the key's conversation and payload is that message, whatever its
        mentions (the first post's stand); another conversation or payload
        is DUPLICATE_CONFLICT.  Raises
        RequestRefused (BAD_REQUEST, PAYLOAD_TOO_LARGE, UNKNOWN_CONVERSATION,
        NOT_MEMBER, DUPLICATE_CONFLICT), StoreError if the store failed.

        A post as a user passes the checks a client's send does -- the
        content filter, then the moderation webhook (``[moderation]``) --
        and is refused with REJECTED (and the reason) if they say no, or
        INTERNAL if they could not answer (retry with the same key).  A
        system post is trusted: it is not checked.

        ``mentions`` (user ids) and ``mention_all`` mention members as a
        client's send does (their mention counts, the event's
        ``mentioned``); RequestRefused BAD_MENTION / TOO_MANY_MENTIONS.
        TypeError (nothing stored) unless ``payload`` is bytes, bytearray or
        memoryview, ``mentions`` a list or tuple of str and ``mention_all``
        a bool."""
        ms = _mentions(mentions, mention_all)
        payload = _payload(payload)
        _refuse_key(idempotency_key, f"post to {_show(conv)}")
        refused = await self._check_post(conv, payload, sender, device, idempotency_key, mentions=ms)
        if refused is not None:
            raise refused
        done = await self.server.host_call(
            self.server.broker.post, conv, payload, sender=sender, device=device, key=idempotency_key,
            mentions=ms, mention_all=mention_all,
        )
        result = _posted(conv, done, sender, device, idempotency_key, size=self._size(payload),
                         mentions=self._mentions_said(ms), cause=self.server.store_failure_cause())
        if isinstance(result, PimError):
            raise result
        return result

    async def recall(
        self, conv: str, seq: int, *, sender: str = SYSTEM, device: str = SYSTEM,
        idempotency_key: Union[str, bytes, None] = None,
    ) -> Posted:
        """Recall the message at ``seq`` of ``conv`` for everyone: a RECALL
        entry is stored and delivered like a message, and no payload of it
        is left in the store.  As the system (the default) any message, at
        any age; as ``sender`` (with one of its devices) only that user's
        own.  Returns the RECALL entry (``Posted.seq``).  Raises
        RequestRefused (NO_SUCH_MESSAGE, NOT_SENDER, RECALLED, NOT_MEMBER,
        UNKNOWN_CONVERSATION, BAD_REQUEST, DUPLICATE_CONFLICT), StoreError.
        ``idempotency_key`` as for :meth:`post`.  ``seq`` must be an int in
        1..2**64-1: TypeError / ValueError otherwise (as for :meth:`edit`
        and :meth:`delete_for`), nothing stored."""
        return await self._amend(conv, seq, MessageKind.RECALL, b"", sender, device, idempotency_key)

    async def edit(
        self, conv: str, seq: int, payload: bytes, *, sender: str = SYSTEM, device: str = SYSTEM,
        idempotency_key: Union[str, bytes, None] = None,
    ) -> Posted:
        """Replace the payload of the message at ``seq`` of ``conv`` (an EDIT
        entry, delivered like a message); as :meth:`recall` otherwise (an
        edit as a user passes the content checks a post does).  TypeError
        (nothing stored) unless ``payload`` is bytes, bytearray or
        memoryview."""
        return await self._amend(conv, seq, MessageKind.EDIT, _payload(payload), sender, device, idempotency_key)

    async def delete_for(
        self, user: str, conv: str, seq: int, *, device: str = "host",
        idempotency_key: Union[str, bytes, None] = None,
    ) -> Posted:
        """Delete the message at ``seq`` of ``conv`` for ``user`` only (as
        their DeleteReq would, from ``device``): their devices get a DELETE
        entry (``Posted.seq`` 0) and history returns the message to them with
        ``deleted`` set and no payload.  Idempotent without a key too: a
        repeat for the same user, device and message stores nothing more
        and returns the first one's Posted (``duplicate`` set) -- the
        default key is derived from ``conv`` and ``seq``.  Raises
        RequestRefused (NO_SUCH_MESSAGE, NOT_MEMBER, ...), StoreError."""
        if idempotency_key is None:
            _check_seq(seq)
            if conversation_problem(conv) is None:  # (a malformed id: the broker's BAD_REQUEST says why)
                idempotency_key = f"pimcore-delete-for\x00{conv}\x00{seq}"
        return await self._amend(conv, seq, MessageKind.DELETE, b"", user, device, idempotency_key)

    async def _amend(
        self, conv: str, seq: int, action: int, payload: bytes, sender: str, device: str,
        key: Union[str, bytes, None],
    ) -> Posted:
        _check_seq(seq)
        what = f"{_ACTION_NAMES.get(action, 'post')} in {_show(conv)}"
        _refuse_key(key, what)
        if action == MessageKind.EDIT:
            refused = await self._check_post(conv, payload, sender, device, key, what, seq)
            if refused is not None:
                raise refused
        done = await self.server.host_call(
            self.server.broker.amend, conv, seq, action, payload=payload, sender=sender, device=device, key=key
        )
        result = _posted(conv, done, sender, device, key, what, size=self._size(payload) if payload is not None else "",
                         cause=self.server.store_failure_cause())
        if isinstance(result, PimError):
            raise result
        return result

    def _checked(self, sender: str) -> bool:
        """Does a post as ``sender`` pass the content checks?  A user's does
        when a content filter or moderation is configured; the system's is
        trusted."""
        return sender != SYSTEM and (self.server.config.broker.content_filter is not None
                                     or self.server.moderator is not None)

    async def _precheck(self, conv: str, payload: bytes, sender: str, device: str, key: Union[str, bytes, None],
                        what: str, seq: Optional[int], mentions: Sequence[str] = ()) -> Optional[RequestRefused]:
        """The broker's own refusal of a post (or, with ``seq``, an edit) as
        ``sender`` that it refuses anyway, in its words, or None: checked
        before the content checks, which asked first -- and under the
        closed policy with the service down answered INTERNAL, "send again
        later", instead of the final error (trials).  Malformed ids, the
        key, the size, the conversation, the sender's membership (one
        read), and an edit's target (one read: none, another's, recalled).
        Refused here, never stored unchecked: a member added meanwhile is
        NOT_MEMBER as if it came a moment earlier.  None when in doubt (the
        content checks and the broker decide)."""
        what = what or f"post to {_show(conv)}"

        def refused(code: ErrorCode, why: str = "") -> RequestRefused:
            return RequestRefused(code, f"{what} refused: {code.name}" + (f": {why}" if why else ""))

        problem = _post_problem(conv, sender, device, key)
        if problem is not None:
            return refused(ErrorCode.BAD_REQUEST, problem)
        limits = self.server.broker.config.limits
        if len(payload) > limits.max_payload:
            return refused(ErrorCode.PAYLOAD_TOO_LARGE, self._size(payload))
        if len(mentions) > limits.max_mentions:
            return refused(ErrorCode.TOO_MANY_MENTIONS, self._mentions_said(tuple(mentions)))
        bad = next((m for m in mentions if not valid_id(m)), None)
        if bad is not None:
            return refused(ErrorCode.BAD_MENTION, f"{_show(bad)} is no user id")
        try:
            members = await self.members(conv)
        except RequestRefused as exc:
            return refused(exc.code)
        if sender not in members:
            return refused(ErrorCode.NOT_MEMBER, f"{_show(sender)} is not a member of {_show(conv)}")
        if seq is not None:
            # What the sender may see at seq: the message, or nothing to edit
            # (none, an entry that is no message, one from before they could
            # see the history) -- NO_SUCH_MESSAGE, as the store says.
            page = await self.history(conv, sender, from_seq=seq - 1, limit=1, backward=False)
            target = page[0] if page and page[0].seq == seq else None
            if target is None or target.kind != MessageKind.MESSAGE:
                return refused(ErrorCode.NO_SUCH_MESSAGE)
            if target.sender != sender:
                return refused(ErrorCode.NOT_SENDER)
            if target.recalled:
                return refused(ErrorCode.RECALLED)
        return None

    async def _check_post(
        self, conv: str, payload: bytes, sender: str, device: str, key: Union[str, bytes, None], what: str = "",
        seq: Optional[int] = None, mentions: Sequence[str] = (),
    ) -> Optional[RequestRefused]:
        """The content filter, then moderation, for one post as a user (the
        checks a client's send passes): the refusal (REJECTED, or INTERNAL
        when no answer came), or None to store it.  Every entry point
        (post, post_many, the HTTP API, the C ABI) comes through here."""
        if not self._checked(sender):
            return None
        from .core import idempotency_local_id

        # The local id the message will have; None without a key (the
        # moderation service is told null: "0" named a local id no post
        # has).  An unusable key is left to the broker's BAD_REQUEST.
        local_id: Optional[int] = None
        if key is not None:
            local_id = idempotency_local_id(key)
            if local_id is None:
                return None
            if _post_problem(conv, sender, device, key) is None and await self.server.stored_before(sender, device,
                                                                                                    local_id):
                # A retry of a stored post: the broker answers the original
                # (checked neither here nor by the content checks), even for
                # a sender who left since.
                return None
        early = await self._precheck(conv, payload, sender, device, key, what, seq, mentions)
        if early is not None:
            return early
        reason, code = await self.server.check_content(sender, device, conv, bytes(payload), local_id)
        if reason is not None:
            return RequestRefused(code, f"{what or f'post to {_show(conv)}'} refused: {reason}")
        return None

    async def post_many(self, posts: Sequence[dict[str, Any]]) -> list[Union[Posted, PimError]]:
        """Several posts at once (each a dict of :meth:`post`'s arguments:
        ``conv``, ``payload``, optional ``sender``, ``device``,
        ``idempotency_key``, ``mentions``, ``mention_all``), handed to the broker in list order -- posts to
        one conversation get ascending seqs in that order -- and committed
        together where the broker can.  One result per post, in order:
        Posted (``duplicate`` set for a retried key), or the
        RequestRefused/StoreError that :meth:`post` would raise.  Posts as
        a user pass the same content checks as :meth:`post` (run
        concurrently, before any is handed to the broker); a refused post
        gets its RequestRefused and the others go on.  Raises TypeError (and
        posts none) unless ``posts`` is a list of dicts, for a dict without
        ``conv`` or ``payload`` or with other keys, or with a ``payload``,
        ``mentions`` or ``mention_all`` of the wrong type (see :meth:`post`)."""
        _check_posts(posts)
        broker = self.server.broker
        calls = []
        for n, kw in enumerate(posts):
            if not isinstance(kw, Mapping):
                raise TypeError(f"post_many takes a list of dicts (one per post), got a {type(kw).__name__} at {n}")
            kw = dict(kw)
            for required in ("conv", "payload"):
                if required not in kw:
                    raise TypeError(f"post_many: post {n} has no {required!r}")
            conv, payload = kw.pop("conv"), kw.pop("payload")
            sender = kw.pop("sender", SYSTEM)
            device = kw.pop("device", SYSTEM)
            key = kw.pop("idempotency_key", None)
            mention_all = kw.pop("mention_all", False)
            ms = _mentions(kw.pop("mentions", ()), mention_all)
            if kw:
                raise TypeError(f"post_many: unexpected keys {sorted(kw)}")
            extra = {"mentions": ms, "mention_all": mention_all} if ms or mention_all else {}
            calls.append((broker.post, (conv, _payload(payload)), {"sender": sender, "device": device, "key": key, **extra}))
        results: list[Union[Posted, PimError, None]] = [None] * len(calls)
        for i, (_, (conv, _), kw) in enumerate(calls):
            problem = _key_problem(kw["key"])
            if problem is not None:  # refused here: the core would raise on it
                results[i] = RequestRefused(ErrorCode.BAD_REQUEST, f"post to {_show(conv)} refused: BAD_REQUEST: {problem}")
        checked = [i for i, call in enumerate(calls) if results[i] is None and self._checked(call[2]["sender"])]
        if checked:
            async def check(i: int) -> None:
                (conv, payload), kw = calls[i][1], calls[i][2]
                results[i] = await self._check_post(conv, payload, kw["sender"], kw["device"], kw["key"],
                                                    mentions=kw.get("mentions", ()))

            async with trio.open_nursery() as nursery:
                for i in checked:
                    nursery.start_soon(check, i)
        todo = [i for i, r in enumerate(results) if r is None]
        done = await self.server.host_calls([calls[i] for i in todo]) if todo else []
        for i, d in zip(todo, done):
            kw = calls[i][2]
            if isinstance(d, PimError):
                results[i] = d
            elif isinstance(d, Exception):  # a fault in the core, logged by host_calls: this post alone
                results[i] = RequestRefused(ErrorCode.INTERNAL, f"post to {_show(calls[i][1][0])} failed in the broker: {d}")
            else:
                results[i] = _posted(calls[i][1][0], d, kw["sender"], kw["device"], kw["key"], size=self._size(calls[i][1][1]),
                                     mentions=self._mentions_said(kw.get("mentions", ())),
                                     cause=self.server.store_failure_cause())
        return results  # type: ignore[return-value]

    def _size(self, payload: Any) -> str:
        """A payload's size against ``Limits.max_payload``, in words."""
        n = len(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else 0
        return f"{n} bytes, max_payload is {self.server.broker.config.limits.max_payload}" if n else ""

    def _mentions_said(self, mentions: Sequence[str]) -> str:
        """The mentions against ``Limits.max_mentions``, in words."""
        return f"{len(mentions)} mentions, max_mentions is {self.server.broker.config.limits.max_mentions}"

    def kick(self, user: str, device: Optional[str] = None, reason: str = "") -> None:
        """End ``user``'s sessions now (only ``device``'s if given) with
        Close(KICKED); the SDK does not log in again by itself.  Not
        durable: to keep the user out, :meth:`revoke` too.  ``reason``: at
        most :data:`MAX_KICK_REASON` (256) UTF-8 bytes (it is logged and
        sent).  Raises RequestRefused (BAD_REQUEST: an invalid user or device
        id, a longer reason or one that is not UTF-8 text), before anyone is
        kicked."""
        for value, what in ((user, "user"), (device, "device")):
            problem = None if value is None and what == "device" else id_problem(value, what)
            if problem is not None:
                raise RequestRefused(ErrorCode.BAD_REQUEST, f"kick: {problem}")
        problem = _reason_problem(reason)
        if problem is not None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"kick: {problem}")
        self.server.check_running()
        self.server.kick(user, device, reason)

    async def revoke(self, user: str, device: Optional[str] = None, *, before: Optional[int] = None) -> int:
        """Refuse ``user``'s tokens (only ``device``'s if given) issued before
        ``before`` (µs since the epoch; default now), durably, and end the
        live sessions that used one (Close(TOKEN_REVOKED)).  Tokens issued
        afterwards work -- after the returned bound: when a live session's
        token was stamped ahead (an issuer's clock up to the authenticator's
        5 s ahead), the bound moves past that stamp, so a token stamped now
        is refused in those few seconds: :meth:`issue_token` stamps its
        tokens at the bound then; sign your own with
        ``pimcore.auth.issue_token(..., now=bound / 1e6)`` or later.  Returns the
        revocation time in force (µs) -- for ``device``, the later of the
        user-wide one and the device's, since both apply to its tokens.  Raises
        RequestRefused (BAD_REQUEST: an invalid id -- ``""`` too, omit
        ``device`` for all devices --, ``before`` 0, which would revoke no
        token (the C ABI's 0 means now: here omit it), or ``before`` later
        than now + :data:`REVOKE_AHEAD` -- a revocation cannot be lowered
        again, so a time in the future, nanoseconds for µs say, would lock
        the user out for good), StoreError; TypeError / ValueError unless
        ``before`` is None or an int >= 0 (µs, not a date or a float)."""
        if before is not None:
            _check_int(before, "before (µs since the epoch)", 0, (1 << 63) - 1)
            if before == 0:
                raise RequestRefused(
                    ErrorCode.BAD_REQUEST,
                    f"revoke {_show(user)}: before=0 would revoke no token (those issued before 1970); omit before"
                    " to revoke every token issued until now")
        now = self.server.now()
        when = now if before is None else before
        if when > now + REVOKE_AHEAD:
            raise RequestRefused(
                ErrorCode.BAD_REQUEST,
                f"revoke {_show(user)}: before={when} is more than {REVOKE_AHEAD // 1_000_000} s after now ({now}); "
                "it is µs since the epoch (not ns), and a revocation cannot be undone",
            )
        said = "*" if device is None else device
        _log.info("revoke user=%s device=%s before=%d", user, said, when,
                  extra={"event": "revoke", "user": user, "device": said, "before": when})
        # (None: up to the core's now, which covers the live sessions' tokens
        # whatever their iat says -- Broker.revoke.)
        result = await self.server.host_call(self.server.broker.revoke, user, device, before)
        if isinstance(result, Rejected):
            if result.code is ErrorCode.STORE_UNAVAILABLE:
                raise _store_failed("revocation", self.server.store_failure_cause())
            why = _why(result.code, users=(user,))
            if not why and result.code is ErrorCode.BAD_REQUEST and device is not None:
                problem = id_problem(device, "device")
                why = f": {problem}; omit the device to revoke all of the user's devices" if problem is not None else ""
            raise RequestRefused(result.code, f"revoke {_show(user)}: {result.code.name}" + why)
        return int(result.before)

    # ------------------------------------------------------------ retention and purge

    async def set_retention(self, conv: str, *, max_age: Optional[int] = None,
                            max_count: Optional[int] = None) -> Retention:
        """Set the history retention of ``conv`` (a group or a direct id),
        stored with it: keep no entry older than ``max_age`` µs (by server
        time) and at most the newest ``max_count`` entries.  Per field: None
        = follow the broker default, 0 = no limit.  Applied at the next
        reclaim (``BrokerConfig.reclaim_interval``, a minute by default):
        removed entries take their inbox entries and dedupe records with
        them.  Returns the setting now stored.  Raises RequestRefused
        (BAD_REQUEST: a malformed id, a negative value, or a ``max_age`` of
        1 µs up to :data:`MIN_RETENTION_AGE` (60 s) exclusive -- it would
        delete messages faster than devices can read them, and is most
        likely seconds passed for µs; nothing stored; UNKNOWN_CONVERSATION),
        StoreError; TypeError for a value that is no int (or None)."""
        for value, what in ((max_age, "max_age"), (max_count, "max_count")):
            if value is not None and type(value) is not int:
                raise TypeError(f"set_retention: {what} must be None or an int, not {value!r:.40}")
        if type(max_age) is int and 0 < max_age < MIN_RETENTION_AGE:
            raise RequestRefused(
                ErrorCode.BAD_REQUEST,
                f"retention of {_show(conv)}: max_age is µs and must be 0 (no limit) or at least {MIN_RETENTION_AGE} µs"
                f" (MIN_RETENTION_AGE, 60 s), got {max_age} µs ({f'{max_age / 1_000_000:.6f}'.rstrip('0').rstrip('.')} s):"
                " a shorter one deletes"
                " messages before devices can read them",
            )
        return await self._set_retention(conv, max_age=max_age, max_count=max_count)

    async def _set_retention(self, conv: str, *, max_age: Optional[int] = None,
                             max_count: Optional[int] = None) -> Retention:
        """:meth:`set_retention` without the MIN_RETENTION_AGE floor (the
        HTTP API's PUT retention: an operator's call, docs/HTTP.md)."""
        problem = conversation_problem(conv)
        if problem is not None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"retention: {problem}")
        limits = []
        for value, what in ((max_age, "max_age"), (max_count, "max_count")):
            if value is not None and (type(value) is not int or not 0 <= value < 1 << 63):
                raise RequestRefused(ErrorCode.BAD_REQUEST,
                                     f"retention of {_show(conv)}: {what} must be None or an integer 0..2^63-1, got {value!r}")
            limits.append(-1 if value is None else value)
        result = await self.server.host_call(self.server.broker.set_retention, conv, *limits)
        if isinstance(result, Rejected):
            if result.code is ErrorCode.STORE_UNAVAILABLE:
                raise _store_failed(f"retention of {_show(conv)}", self.server.store_failure_cause())
            raise RequestRefused(result.code, f"retention of {_show(conv)}: {result.code.name}")
        return await self.retention(conv)

    async def retention(self, conv: str) -> Retention:
        """The retention setting and history floor of ``conv``.  Raises
        RequestRefused (BAD_REQUEST: a malformed id)."""
        state = await self._read_one(ReadRetention(conv))
        if isinstance(state, Rejected):
            raise RequestRefused(state.code, f"retention: {conversation_problem(conv) or 'bad id'}")
        assert isinstance(state, RetentionState)
        return Retention(conv, None if state.max_age < 0 else state.max_age,
                         None if state.max_count < 0 else state.max_count, state.floor)

    async def purge_conversation(self, conv: str) -> Purged:
        """Delete ``conv``: every stored entry (payloads included), their
        inbox entries and dedupe records, every read marker and
        conversation-list entry of it, its retention setting and, for a
        group, the group itself (it answers UNKNOWN_CONVERSATION until
        created again; seqs then continue after the purged ones).
        Idempotent: purging again (or an id never used) removes nothing.
        Returns Purged (``messages``: entries removed, ``entries``: inbox
        entries removed).  Raises RequestRefused (BAD_REQUEST), StoreError."""
        problem = conversation_problem(conv)
        if problem is not None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"purge: {problem}")
        _log.info("purge conversation=%s", conv, extra={"event": "purge", "conv": conv})
        return self._purged(await self.server.host_call(self.server.broker.purge_conversation, conv), repr(conv))

    async def purge_user(self, user: str) -> Purged:
        """Delete all data of ``user``: their live sessions end now
        (Close(KICKED)); they leave every group (a LEFT entry each, which
        the members get); every message they sent becomes a tombstone (empty
        payload; seq, sender and times stay, so conversations keep their
        order); their dedupe records, inbox, devices, read markers and
        conversation list are deleted; every token issued to them until now
        is revoked (a token issued later logs in as a new user).
        Idempotent.  Returns Purged (``messages``: tombstones made,
        ``entries``: inbox entries removed, ``devices``, ``changes``: the
        groups left).  Raises RequestRefused (BAD_REQUEST), StoreError."""
        problem = id_problem(user, "user")
        if problem is not None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"purge: {problem}")
        _log.info("purge user=%s", user, extra={"event": "purge", "user": user})
        return self._purged(await self.server.host_call(self.server.broker.purge_user, user), f"user {_show(user)}")

    def _purged(self, result: Any, what: str) -> Purged:
        if isinstance(result, Rejected):
            if result.code is ErrorCode.STORE_UNAVAILABLE:
                raise _store_failed(f"purge of {what}", self.server.store_failure_cause(), "not done")
            raise RequestRefused(result.code, f"purge of {what}: {result.code.name}")
        assert isinstance(result, Purged)
        return result

    # ------------------------------------------------------------ reads

    def online_devices(self, user: str) -> list[str]:
        """The devices of ``user`` connected to this broker now, sorted.
        Raises RequestRefused (BAD_REQUEST) for an invalid user id."""
        self.server.check_running()
        problem = id_problem(user, "user")
        if problem is not None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"online devices: {problem}")
        return self.server.broker.online_devices(user)

    async def online_anywhere(self, users: Iterable[str]) -> frozenset[str]:
        """Those of ``users`` with a device online now: on this broker or,
        over a store shared by several nodes (Redis Cluster), on another
        live node (one read of the device-to-node records; if the store
        cannot answer, this broker's view).  What ``offline_recipients`` of
        host events is computed from (push notifications go to the others)."""
        self.server.check_running()
        users = list(dict.fromkeys(_user_ids(users, "users")))
        broker = self.server.broker
        online = {u for u in users if broker.online_devices(u)}
        cluster = getattr(self.server.store, "cluster", None)
        rest = [u for u in users if u not in online]
        if cluster is not None and rest:
            try:
                where = await cluster.online_elsewhere(rest)
            except StoreError:
                where = {}
            online.update(u for u, nodes in where.items() if nodes)
        return frozenset(online)

    async def presence(self, user: str) -> UserPresence:
        """``user``'s presence as the host sees it (privacy aside): online
        on this broker or, over a store shared by several nodes, on another
        live node; last seen (the latest of this broker's memory and the
        devices' stored last_seen), and the user's privacy setting.  Raises
        RequestRefused (BAD_REQUEST) for an invalid user id, StoreError."""
        page = await self._read_one(ReadPresence(user, (user,)))
        if isinstance(page, Rejected):
            raise RequestRefused(page.code, id_problem(user) or f"invalid user id {_show(user)}")
        assert isinstance(page, PresencePage)
        online, seen = self.server.broker.presence(user)
        online = online or bool(page.entries[0].elsewhere)
        last = 0 if online else max(seen, page.entries[0].last_seen)
        return UserPresence(user, online, last, page.hide_last_seen)

    async def set_presence_privacy(self, user: str, hide_last_seen: bool) -> bool:
        """Set ``user``'s "hide my last-seen time" setting (durable; the
        user's online devices and the users watching them are told, as for
        the client's PresencePrivacy).  Returns the setting in force.
        Raises RequestRefused (BAD_REQUEST) for an invalid user id,
        StoreError if the store failed."""
        if type(hide_last_seen) is not bool:
            raise TypeError("hide_last_seen must be a bool")
        result = await self.server.host_call(self.server.broker.set_presence_privacy, user, hide_last_seen)
        if isinstance(result, Rejected):
            if result.code is ErrorCode.STORE_UNAVAILABLE:
                raise _store_failed("presence setting", self.server.store_failure_cause())
            raise RequestRefused(result.code, f"presence privacy of {_show(user)}: {result.code.name}")
        assert isinstance(result, PresencePrivacySet)
        return result.hide_last_seen

    async def conversations(self, user: str) -> list[Conversation]:
        """Every conversation of ``user`` with its read state, sorted by id."""
        loaded = await self._read_one(LoadSession(user, _READER_DEVICE, login=False))
        if isinstance(loaded, Rejected):
            raise RequestRefused(loaded.code, id_problem(user) or f"invalid user id {_show(user)}")
        assert isinstance(loaded, SessionLoaded)
        return [_conversation(c) for c in loaded.conversations]

    async def conversation_list(
        self, user: str, *, cursor: bytes = b"", limit: int = 50, include_hidden: bool = False
    ) -> "ConversationListPage":
        """A page of ``user``'s conversation list, as a client's ConvListReq
        gets it (docs/PROTOCOL.md, *Conversation list*): pinned first, then
        by the server time of the last entry (newest first), each a
        :class:`~pimcore.store.base.ConversationEntry` (last message, read
        marker, unread and mention counts, the user's pinned / muted /
        hidden).  ``cursor``: b"" or the page's ``cursor`` for the next
        one.  Raises RequestRefused (BAD_REQUEST, BAD_CURSOR), StoreError."""
        from .store.base import ConversationsPage, ReadConversations, conversation_cursor

        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"limit must be 1..1000, got {limit!r}")
        if not isinstance(cursor, (bytes, bytearray, memoryview)):
            raise TypeError(f"cursor must be bytes (b\"\" or a page's cursor), not {type(cursor).__name__}")
        page = await self._read_one(ReadConversations(user, bytes(cursor), limit, bool(include_hidden)))
        assert isinstance(page, (ConversationsPage, Rejected))
        if page.code != ErrorCode.OK:
            raise RequestRefused(page.code, f"conversation list of {_show(user)}: {page.code.name}"
                                 + _why(page.code, users=(user,)))
        entries = list(page.entries)  # type: ignore[union-attr]
        cursor_out = conversation_cursor(entries[-1]) if entries else bytes(cursor)
        return ConversationListPage(entries, cursor_out, page.more)  # type: ignore[union-attr]

    async def set_conversation(
        self, user: str, conv: str, *, pinned: Optional[bool] = None, muted: Optional[bool] = None,
        hidden: Optional[bool] = None,
    ) -> Any:
        """Change ``user``'s own settings of ``conv`` (None = unchanged), as
        one of their devices would; their online devices get a ConvUpdate.
        Returns the entry after the change
        (:class:`~pimcore.store.base.ConversationEntry`).  Raises
        RequestRefused (BAD_REQUEST, UNKNOWN_CONVERSATION, NOT_MEMBER),
        StoreError if the store failed; TypeError (nothing changed) for a
        flag that is not True, False or None (``"false"`` is truthy, and
        0/1 are refused as for ``history_visible``)."""
        from .store.base import ConversationSet

        for name, flag in (("pinned", pinned), ("muted", muted), ("hidden", hidden)):
            if flag is not None and type(flag) is not bool:
                raise TypeError(f"{name} must be True, False or None (unchanged), not {type(flag).__name__} {flag!r:.60}")

        def v(x: Optional[bool]) -> int:
            return 0 if x is None else (1 if x else 2)

        result = await self.server.host_call(
            self.server.broker.set_conversation, user, conv, pinned=v(pinned), muted=v(muted), hidden=v(hidden)
        )
        if isinstance(result, Rejected):
            if result.code is ErrorCode.STORE_UNAVAILABLE:
                raise _store_failed(f"settings of {_show(conv)} for {_show(user)}", self.server.store_failure_cause(), "not changed")
            raise RequestRefused(result.code, f"settings of {_show(conv)} for {_show(user)}: {result.code.name}")
        assert isinstance(result, ConversationSet)
        return result.entry

    async def unread(self, user: str, conv: Optional[str] = None) -> int:
        """Exact number of messages from others in ``conv`` after ``user``'s
        read marker, leaving out those the user deleted for themselves (0
        for a conversation the user is not in); without ``conv``, the sum
        over all of the user's conversations (a badge).  Raises
        RequestRefused (BAD_REQUEST for an invalid user or conversation id,
        UNKNOWN_CONVERSATION for a group that does not exist, as history
        and settings)."""
        problem = None if conv is None else conversation_problem(conv)
        if problem is not None:
            raise RequestRefused(ErrorCode.BAD_REQUEST, f"unread: {problem}")
        convs = await self.conversations(user)
        if conv is None:
            return sum(c.unread for c in convs)
        for c in convs:
            if c.conv == conv:
                return c.unread
        store = self._store
        exists = (await store.conversation_exists(conv) if isinstance(store, AsyncStore)
                  else store.conversation_exists(conv))
        if not exists:
            raise RequestRefused(ErrorCode.UNKNOWN_CONVERSATION, f"unread in {_show(conv)}: UNKNOWN_CONVERSATION")
        return 0

    async def read_positions(self, user: str) -> "ReadPositions":
        """Where ``user`` is, read in one store snapshot: the read marker
        (a seq) in each conversation, the inbox head and floor (positions),
        and each known device's acked inbox position with its last-seen
        time (µs) and whether it is online now.  Raises RequestRefused
        (BAD_REQUEST) for an invalid user id, StoreError."""
        loaded, devs = await self._read(LoadSession(user, _READER_DEVICE, login=False), ReadDevices(user))
        if isinstance(loaded, Rejected) or isinstance(devs, Rejected):
            raise RequestRefused(ErrorCode.BAD_REQUEST, id_problem(user) or f"invalid user id {_show(user)}")
        assert isinstance(loaded, SessionLoaded) and isinstance(devs, DevicesPage)
        online = set(self.online_devices(user))
        return ReadPositions(
            user, loaded.head, loaded.floor,
            tuple((c.conv, c.read_seq) for c in loaded.conversations),
            tuple(DevicePosition(d.device, d.position, d.last_seen, d.device in online) for d in devs.devices),
        )

    async def history(
        self, conv: str, user: str, *, from_seq: int = 0, limit: int = 50, backward: bool = True
    ) -> list[StoredMessage]:
        """A page of ``conv`` as ``user`` may see it (``from_seq``/``backward``
        as in HistoryReq: backward from ``from_seq`` exclusive, 0 = newest).
        Raises RequestRefused (BAD_REQUEST, UNKNOWN_CONVERSATION, NOT_MEMBER);
        TypeError / ValueError unless ``from_seq`` is an int in 0..2**64-1
        and ``limit`` an int >= 1."""
        _check_int(from_seq, "from_seq", 0)
        _check_int(limit, "limit", 1)
        # (An empty user is the broker's own unchecked read to the store:
        # refused here as the malformed id it is to a host.)
        page = await self._read_one(ReadHistory(conv, user, from_seq, limit, bool(backward))) if user != "" \
            else HistoryPage(ErrorCode.BAD_REQUEST, ())
        assert isinstance(page, HistoryPage)
        if page.code != ErrorCode.OK:
            raise RequestRefused(page.code, f"history of {_show(conv)} for {_show(user)}: {page.code.name}"
                                 + _why(page.code, users=(user,), conv=conv))
        return list(page.messages)

    async def _read_one(self, op: ReadOp) -> Any:
        (result,) = await self._read(op)
        return result

    async def _read(self, *ops: ReadOp) -> tuple[Any, ...]:
        """Results of ``ops``, one store request (one snapshot)."""
        self.server.check_running()
        request = StoreRequest(next(self._ids), ops, False)
        store = self._store
        if isinstance(store, AsyncStore):
            return tuple(await store.execute(request))
        return tuple(store.execute(request))

    # ------------------------------------------------------------ host events

    def events(self, consumer: str = "default", *, after: Optional[int] = None, limit: int = 256) -> EventStream:
        """The host events after id ``after`` (None: after ``consumer``'s
        durable cursor), as an async iterator that waits for new ones
        (:class:`HostEvent`).  At least once: whatever was not acked with
        :meth:`ack_events` is delivered again by a later call -- after a
        restart, a crash included (see docs/EMBEDDING.md, Events).  Needs
        ``events=True`` (``[server] events``): without it raises
        EventsDisabled.  Raises RequestRefused (BAD_REQUEST: an invalid
        consumer name) when iterated; ``after`` and ``limit`` as for
        :meth:`next_events` (checked here)."""
        self.server.check_running()
        self._need_events()
        _check_page(after, limit)
        return EventStream(self, consumer, after, limit)

    @property
    def events_enabled(self) -> bool:
        """Does the broker record host events (``[server] events``)?"""
        return bool(self.server.config.broker.record_events)

    def _need_events(self) -> None:
        if not self.events_enabled:
            raise EventsDisabled()

    async def next_events(
        self, consumer: str = "default", *, after: Optional[int] = None, limit: int = 256
    ) -> tuple[int, list[HostEvent]]:
        """One page of host events after ``after`` (None: ``consumer``'s
        durable cursor), waiting until there is at least one: (the ``after``
        used, the events ascending, at most ``limit``).  Nothing changes
        until the page is returned, so a cancelled call loses nothing --
        except that reading from the durable cursor creates it (at 0) if
        the consumer has none: from then on the reclaim keeps every event
        it has not acknowledged.
        ``after``: None or an event id, 0..2**64-1; ``limit``: 1 ..
        :data:`MAX_EVENTS_PAGE` (10000) events.
        Raises EventsDisabled when the broker records none (it would wait
        forever), RequestRefused (BAD_REQUEST) for an invalid consumer, an
        ``after`` or ``limit`` out of its range, or an ``after`` past the
        last event id (events recorded later would be skipped until their
        ids passed it); TypeError for an ``after`` or ``limit`` that is no
        int.  Nothing is read then."""
        self._need_events()
        _check_consumer(consumer, "events")
        _check_page(after, limit)
        with self._reading(consumer):
            return await self._next_events(consumer, after, limit)

    async def _next_events(self, consumer: str, after: Optional[int], limit: int) -> tuple[int, list[HostEvent]]:
        if after is None:
            await self._hold_events(consumer)
        while True:
            committed = self.server.committed  # before the read: no wake-up is missed
            page = await self._read_one(ReadEvents(consumer, after, limit))
            if isinstance(page, Rejected):
                raise RequestRefused(page.code, f"events of {_show(consumer)}: {page.code.name}")
            assert isinstance(page, EventsPage)
            if after is None:
                after = page.cursor
            elif after > page.last_id and not page.events:
                # (The HTTP API's 409 PAST_LAST_EVENT.)  An id no event has
                # is a confused caller's (another broker's, a store that was
                # replaced): read from it, events recorded later would be
                # skipped, silently, until their ids passed it.
                raise RequestRefused(ErrorCode.BAD_REQUEST,
                                     f"events of {_show(consumer)}: after {after} is past the last event id, "
                                     f"{page.last_id}{' (no event yet)' if page.last_id == 0 else ''}: nothing read")
            if page.events:
                online = self.server.broker.online_devices
                return after, [_host_event(ev, online) for ev in page.events]
            await committed.wait()

    async def _hold_events(self, consumer: str) -> None:
        """Make sure ``consumer`` has a durable cursor, once per consumer
        and handle: an ack of 0 creates it at 0 and moves an existing one
        nowhere.  Why: the reclaim keeps an event until every consumer *with
        a cursor* has acked it, so a consumer that reads from its cursor but
        has not acked yet must have one, or the events it is handling can be
        dropped under it once the others ack (after a restart it would
        start past them).  A store failing writes does not fail the read:
        the next one tries again."""
        if consumer in self._held:
            return
        try:
            await self.ack_events(0, consumer)
        except StoreError:
            return
        if len(self._held) >= 4096:  # a cache, not a registry: bounded, and re-holding is harmless
            self._held.clear()
        self._held.add(consumer)

    async def event_cursor(self, consumer: str = "default") -> tuple[int, int]:
        """(``consumer``'s durable cursor, the last event id): the events
        still to handle are ``last - cursor`` at most.  Raises RequestRefused
        (BAD_REQUEST) for an invalid consumer name."""
        _check_consumer(consumer, "events")
        page = await self._read_one(ReadEvents(consumer, None, 0))
        if isinstance(page, Rejected):
            raise RequestRefused(page.code, f"events of {_show(consumer)}: {page.code.name}")
        return page.cursor, page.last_id

    async def ack_events(self, upto: int, consumer: str = "default") -> int:
        """``consumer`` has handled every event up to id ``upto``: its
        durable cursor moves there (never back; clamped to the last id),
        durable when this returns.  Returns the cursor in force.  Raises
        EventsDisabled when the broker records none, RequestRefused
        (BAD_REQUEST: an invalid consumer name, an ``upto`` outside
        0..2**64-1), StoreError; TypeError for an ``upto`` that is no int
        (a bool, a str, a float).  Nothing is acked then."""
        self._need_events()
        _check_consumer(consumer, "ack_events")
        _check_event_arg(upto, "upto", 0, (1 << 64) - 1, "ack_events")
        result = await self.server.host_call(self.server.broker.ack_events, consumer, upto)
        if isinstance(result, Rejected):
            if result.code is ErrorCode.STORE_UNAVAILABLE:
                raise _store_failed("event ack", self.server.store_failure_cause())
            raise RequestRefused(result.code, f"ack_events {_show(consumer)}: {result.code.name}")
        assert isinstance(result, EventsAcked)
        with self._readers_lock:
            self._touch_reader(consumer)
        return result.cursor

    async def delete_consumer(self, consumer: str = "default") -> bool:
        """Delete ``consumer``'s durable cursor (a name read by mistake, a
        test's, a retired reader's): the periodic reclaim stops waiting for
        it -- what every other consumer acked is dropped -- and it leaves
        :meth:`event_consumers` and the ``pimcore_event_outbox_depth``
        metric.  No event is touched.  Reading the name again later creates
        a fresh cursor at 0, as a first read does (from the oldest event
        kept).  Durable when this returns.  Returns True if it had a
        cursor, False if there was none (nothing changed).
        Raises EventsDisabled when the broker records none,
        :class:`ConsumerInUse` while a reader of this broker reads it (an
        open :meth:`events` stream, a waiting :meth:`next_events`, an event
        handler, the webhook sender, an HTTP long-poll or stream -- a reader
        of another broker sharing the store cannot be seen: stop it first),
        RequestRefused (BAD_REQUEST: an invalid consumer name), StoreError.
        Nothing is deleted then.  (Readers are checked when it is called: one
        that starts while the delete is in flight is not refused.)"""
        self._need_events()
        _check_consumer(consumer, "delete_consumer")
        if self._in_use(consumer) is True:
            # A stream let go inside a reference cycle (a cancelled task's
            # traceback holds its frame) counts until the cycle collector
            # runs: once, here -- a rare operator call, not a hot path.
            gc.collect()
        used = self._in_use(consumer)
        if used is not False:
            # A name with no cursor is "not found" first: there is nothing to
            # delete and nothing a reader could lose (a read with ``after``
            # and HEAD make none -- they were 409 with no cursor behind).
            listed = await self.event_consumers()
            if len(listed) < MAX_EVENT_CONSUMERS and consumer not in dict(listed):
                return False
            with self._readers_lock:
                restarted = consumer not in self._last_read
            raise ConsumerInUse(consumer, None if used is True else float(used), self.server.config.consumer_idle,
                                restarted)
        result = await self.server.host_call(self.server.broker.delete_consumer, consumer)
        # Whatever the answer: a later read must make sure of a cursor again.
        self._held.discard(consumer)
        if isinstance(result, Rejected):
            if result.code is ErrorCode.STORE_UNAVAILABLE:
                raise _store_failed("consumer delete", self.server.store_failure_cause())
            raise RequestRefused(result.code, f"delete_consumer {_show(consumer)}: {result.code.name}")
        assert isinstance(result, ConsumerDeleted)
        return result.deleted

    async def event_consumers(self, limit: int = MAX_EVENT_CONSUMERS) -> list[tuple[str, int]]:
        """Every consumer with a durable cursor, as (name, cursor), sorted
        by name, at most ``limit`` (1 .. :data:`MAX_EVENT_CONSUMERS`): how
        an operator finds a stray one to :meth:`delete_consumer`.  A store
        keeps a broker's few consumers in one small table, read whole.
        Raises EventsDisabled when the broker records none."""
        self._need_events()
        if type(limit) is not int or not 1 <= limit <= MAX_EVENT_CONSUMERS:
            raise RequestRefused(ErrorCode.BAD_REQUEST,
                                 f"event_consumers: limit must be 1..{MAX_EVENT_CONSUMERS}, not {limit!r}")
        page = await self._read_one(ReadEvents("default", None, 0))
        assert isinstance(page, EventsPage)
        return list(page.consumers[:limit])

    def consumer_in_use(self, consumer: str) -> bool:
        """Does a reader of this broker read ``consumer`` now, or did one
        read or ack it within ``[server] consumer_idle`` seconds (what
        :meth:`delete_consumer` refuses: :class:`ConsumerInUse`)?"""
        return self._in_use(consumer) is not False

    def _in_use(self, consumer: str) -> Union[bool, float]:
        """False; True for a live reader; else the seconds since ``consumer``
        was last read or acked here -- or since the broker started, for one
        not read since -- when within ``consumer_idle``."""
        idle = self.server.config.consumer_idle
        with self._readers_lock:
            if self._readers.get(consumer, 0) > 0:
                return True
            at = self._last_read.get(consumer, self._started)
        ago = time.monotonic() - at
        return ago if ago < idle else False

    def _touch_reader(self, consumer: str) -> None:
        """``consumer`` was read or acked now (under _readers_lock)."""
        now = time.monotonic()
        last = self._last_read
        last[consumer] = now
        last.move_to_end(consumer)
        idle = self.server.config.consumer_idle
        while last:
            name, at = next(iter(last.items()))
            if now - at < idle and len(last) <= _MAX_RECENT_READS:
                break
            del last[name]

    def _reader(self, consumer: str) -> Callable[[], None]:
        """Count a live reader of ``consumer``; returns its release (once)."""
        with self._readers_lock:
            self._readers[consumer] = self._readers.get(consumer, 0) + 1
        done = False

        def release() -> None:
            nonlocal done
            with self._readers_lock:
                if done:
                    return
                done = True
                self._touch_reader(consumer)
                left = self._readers[consumer] - 1
                if left:
                    self._readers[consumer] = left
                else:
                    del self._readers[consumer]  # (not kept per consumer ever read)

        return release

    @contextmanager
    def _reading(self, consumer: str) -> Iterator[None]:
        """``consumer`` has a live reader for the block (a call, a handler,
        an HTTP long-poll or stream)."""
        release = self._reader(consumer)
        try:
            yield
        finally:
            release()

    def _track_reader(self, stream: object, consumer: str) -> None:
        """``stream`` reads ``consumer`` until it is let go (collected): an
        iterator has no close a host would call."""
        weakref.finalize(stream, self._reader(consumer))

    # ------------------------------------------------------------ streams

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client over an already open byte stream (an in-process
        pipe, a socket accepted by the host): returns when it ends."""
        await self.server.serve_stream(stream)


def _check_consumer(consumer: str, call: str) -> None:
    """RequestRefused (BAD_REQUEST) saying why, in ``call``'s words, unless
    ``consumer`` is a valid consumer name (the id rule: the store said only
    BAD_REQUEST, which left a caller to guess the rule)."""
    problem = id_problem(consumer, "consumer")
    if problem is not None:
        raise RequestRefused(ErrorCode.BAD_REQUEST, f"{call}: {problem}")


def _post_problem(conv: str, sender: str, device: str, key: Union[str, bytes, None]) -> Optional[str]:
    """Why the broker refused a post with BAD_REQUEST, in words (it says
    only the code): asked after the refusal, so a post pays nothing."""
    if sender == SYSTEM:
        if device != SYSTEM:
            return f"sender {sender!r} is the system, which posts without a device (device {_show(device)} must be {SYSTEM!r} too)"
    elif device == SYSTEM:  # (post(conv, b"..", sender="alice") and no device)
        return (f"device: empty device id: a post as {_show(sender)} needs one of its device ids (device=...;"
                f" the HTTP API's default is \"http\"); only the system, the default sender, posts without one")
    else:
        for value, what in ((sender, "sender"), (device, "device")):
            problem = id_problem(value, "device" if what == "device" else "user")
            if problem is not None:
                return f"{what}: {problem}"
    problem = conversation_problem(conv)
    if problem is not None:
        return problem
    return _key_problem(key)


def _key_problem(key: object) -> Optional[str]:
    """Why ``key`` is no idempotency key, or None when it is one (or is
    None: no key): 1..256 bytes, or text of 1..256 bytes in UTF-8."""
    if key is None:
        return None
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"the idempotency key must be valid UTF-8 text, got {key!r:.80} ({exc.reason} at {exc.start})"
    else:
        raw = key  # type: ignore[assignment]
    if not isinstance(raw, bytes) or not 0 < len(raw) <= 256:
        size = f"{len(raw)} bytes" if isinstance(raw, bytes) else type(key).__name__
        return f"the idempotency key must be 1..256 bytes, got {size}"
    return None


def _refuse_key(key: object, what: str) -> None:
    """RequestRefused (BAD_REQUEST) for an unusable idempotency key,
    before anything is handed to the broker."""
    problem = _key_problem(key)
    if problem is not None:
        raise RequestRefused(ErrorCode.BAD_REQUEST, f"{what} refused: BAD_REQUEST: {problem}")


def _mentions(mentions: Any, mention_all: Any) -> tuple[str, ...]:
    """Check a post's ``mentions`` (a list or tuple of user ids: a str would
    be iterated letter by letter) and ``mention_all`` (a bool: "no" is
    truthy); TypeError otherwise.  The ids themselves are the broker's to
    check (BAD_MENTION)."""
    if not isinstance(mentions, (list, tuple)) or not all(isinstance(u, str) for u in mentions):
        raise TypeError(f"mentions must be a list or tuple of user ids (str), got {mentions!r:.80}")
    if not isinstance(mention_all, bool):
        raise TypeError(f"mention_all must be a bool, got {type(mention_all).__name__}")
    return tuple(mentions)


def _user_ids(users: Any, what: str) -> list[str]:
    """``users`` (a list, tuple, set or other iterable of user ids) as a
    list; TypeError for a str or bytes (it would be iterated letter by
    letter: one user per letter), a non-iterable or an id that is no str.
    The ids themselves are the broker's to check (BAD_REQUEST)."""
    if isinstance(users, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be a list of user ids (str), not a {type(users).__name__}: "
                        f"write [{users!r:.60}] for one user")
    try:
        ids = list(users)
    except TypeError:
        raise TypeError(f"{what} must be a list of user ids (str), not {type(users).__name__}") from None
    for u in ids:
        if not isinstance(u, str):
            raise TypeError(f"{what} must be a list of user ids (str), got {type(u).__name__} {u!r:.60} in it")
    return ids


def _some_users(users: Any, call: str, conv: str) -> list[str]:
    """:func:`_user_ids` of ``add_members``/``remove_members`` (``call``),
    and ValueError for none: a change of no one is refused, as ``pimcore
    group add/remove NAME`` without users and create_group refuse it (it
    returned a GroupChanged that changed nothing)."""
    ids = _user_ids(users, "users")
    if not ids:
        raise ValueError(f"{call} of group {_show(conv)}: give at least one user (no user given, nothing changed)")
    return ids


def _history_flag(value: Any) -> bool:
    """``create_group``'s ``history_visible``: True or False exactly.  Any
    other value is a TypeError: its truthiness is no answer (``'false'`` is
    true), and 0/1 are refused as POST /v1/groups refuses them."""
    if type(value) is not bool:
        raise TypeError(f"history_visible must be a bool (True or False), not {type(value).__name__} {value!r:.60}")
    return value


#: What :meth:`Pimcore.recall` / ``edit`` / ``delete_for`` are called in refusals.
_ACTION_NAMES: dict[int, str] = {MessageKind.RECALL: "recall", MessageKind.EDIT: "edit", MessageKind.DELETE: "delete"}


def _payload(payload: Any) -> bytes:
    """A message payload as bytes: bytes, or any object with the buffer
    protocol (bytearray, memoryview, array.array, mmap, ...) is taken as
    its bytes; anything else is a TypeError before anything is allocated
    (``bytes(n)`` of an int would be n zero bytes, of a list its items)."""
    if isinstance(payload, bytes):
        return payload
    if not isinstance(payload, str):
        try:
            view = memoryview(payload)
        except TypeError:
            pass
        else:
            with view:
                return view.tobytes()
    raise TypeError(f"payload must be bytes or a bytes-like object (buffer protocol), not {type(payload).__name__}"
                    + (" (encode text first, e.g. payload.encode())" if isinstance(payload, str) else ""))


def _check_int(value: Any, name: str, low: int, high: int = (1 << 64) - 1) -> None:
    """``value`` is an int (no bool) in low..high: TypeError / ValueError
    naming ``name`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, not {value}")


def _check_event_arg(value: Any, name: str, low: int, high: int, call: str) -> None:
    """An event id or page size of ``call``: TypeError unless an int (no
    bool), RequestRefused(BAD_REQUEST) unless in low..high (the events
    API refuses with BAD_REQUEST, and the HTTP API answers it with 400)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{call}: {name} must be an int, not {type(value).__name__} {value!r:.60}")
    if not low <= value <= high:
        raise RequestRefused(ErrorCode.BAD_REQUEST, f"{call}: {name} must be in {low}..{high}, not {value}")


def _check_posts(posts: Any) -> None:
    """post_many's argument: a list (any iterable but a str, bytes or a
    single dict) -- TypeError otherwise, in every handle's words (the
    threaded one made a list of a str's letters and said "got a str at 0")."""
    if isinstance(posts, (str, bytes, bytearray, memoryview, Mapping)) or not isinstance(posts, Iterable):
        raise TypeError(f"post_many takes a list of dicts (one per post), not a {type(posts).__name__}")


def _check_page(after: Any, limit: Any, call: str = "events") -> None:
    """``after`` (None, or an event id 0..2**64-1) and ``limit`` (1 ..
    MAX_EVENTS_PAGE) of an events read (see _check_event_arg)."""
    if after is not None:
        _check_event_arg(after, "after", 0, (1 << 64) - 1, call)
    _check_event_arg(limit, "limit", 1, MAX_EVENTS_PAGE, call)


def _check_seq(seq: Any) -> None:
    """A message's seq: an int in 1..2**64-1 (TypeError / ValueError)."""
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise TypeError(f"seq must be an int, not {type(seq).__name__}")
    if not 1 <= seq < 1 << 64:
        raise ValueError(f"seq must be in 1..2**64-1, not {seq}")


def _store_failed(what: str, cause: Optional[str], outcome: str = "not stored") -> StoreError:
    """The handle's StoreError for ``what`` (``outcome``: "not stored"),
    with the store's ``cause`` in words when it said one
    (BrokerServer.store_failure_cause: "the store's map is full ...", as
    the HTTP API's 503 says it)."""
    return StoreError(f"{what} {outcome}: the store failed" + (f": {cause}" if cause else ""), cause=cause)


def _posted(conv: str, done: Any, sender: str = SYSTEM, device: str = SYSTEM,
            key: Union[str, bytes, None] = None, what: str = "", size: str = "", mentions: str = "",
            cause: Optional[str] = None) -> Union[Posted, PimError]:
    """A PostDone as the handle answers it; ``what`` names the call in
    errors (default ``post to 'conv'``; ``recall in 'conv'`` ...);
    ``size``: the payload's size against the limit, said for
    PAYLOAD_TOO_LARGE; ``mentions``: theirs, for TOO_MANY_MENTIONS;
    ``cause``: the store's failure in words, said for STORE_UNAVAILABLE."""
    what = what or f"post to {_show(conv)}"
    if done.code is ErrorCode.STORE_UNAVAILABLE:
        return _store_failed(what, cause)
    if done.code is not ErrorCode.OK:
        why = _post_problem(conv, sender, device, key) if done.code is ErrorCode.BAD_REQUEST else None
        if done.code is ErrorCode.PAYLOAD_TOO_LARGE and size:
            why = size
        if done.code is ErrorCode.TOO_MANY_MENTIONS and mentions:
            why = mentions
        if done.code is ErrorCode.NOT_MEMBER and sender != SYSTEM:  # (who: the HTTP API's said no one)
            why = f"{_show(sender)} is not a member of {_show(conv)}"
        return RequestRefused(done.code, f"{what} refused: {done.code.name}" + (f": {why}" if why else ""))
    return Posted(conv, done.msg_id, done.seq, done.server_time, done.duplicate)


def _conversation(c: ConversationState) -> Conversation:
    return Conversation(c.conv, c.read_seq, c.last_seq, c.unread, c.peer, c.peer_read_seq)


Auth = Union[Authenticator, Callable[[bytes, int], Awaitable[Identity]]]


@asynccontextmanager
async def open_pimcore(
    settings: Optional[ServeSettings] = None,
    *,
    config_file: Optional[str] = None,
    store: Union[Store, AsyncStore, None] = None,
    authenticate: Optional[Auth] = None,
    content_filter: Optional[Union[ContentFilter, Callable[[str, str, bytes], Awaitable[Optional[str]]]]] = None,
    **overrides: Any,
) -> AsyncIterator[Pimcore]:
    """Run a broker in this trio program for the duration of the block.

    Settings are those of ``pimcore serve``: ``settings``, or the TOML
    ``config_file`` with ``overrides`` (flag names: ``data_dir``,
    ``durability``, ``listen``, ``secret``, ``secret_file``, ``http``,
    ``api_keys``, ``cert``/``key``, any ``[limits]``/``[server]`` key).
    Unlike ``pimcore serve`` an embedded broker listens nowhere unless
    ``listen`` (or the ``config_file``'s) says so -- never because of
    ``$PIMCORE_LISTEN``/``$PIMCORE_HTTP`` (docs/EMBEDDING.md, Settings and
    the environment) -- and serves HTTP only with ``http="tcp://HOST:PORT"``
    (or ``tls://``): then the same listener as ``pimcore serve --http``
    (server API, /metrics, /healthz, /readyz; API keys from ``api_keys`` or
    ``<data_dir>/api-key``), its URL in :attr:`Pimcore.http_url`.

    ``store`` defaults to the settings' Redis Cluster store when they set
    ``store.url`` (``[store] url``, ``$PIMCORE_STORE``: connected as
    ``pimcore serve`` connects it, :func:`open_redis_store`), else to LMDB
    in ``<data_dir>/store``; either is opened here and closed on exit (a
    store passed in stays open).  ``authenticate`` defaults
    to JWTs signed with the broker secret (``<data_dir>/secret``, created if
    missing, as ``pimcore serve`` does).  On exit the broker shuts down
    gracefully (committed acks flushed, Close(SHUTDOWN) to every client).

    ``content_filter``: ``f(user, conv, payload) -> None | reason``, a plain
    or an ``async def`` function (then it runs in a task per message, at
    most ``[server] hook_timeout``); it replaces the configured
    ``content_filter``.  A reason refuses the message with REJECTED.

    With ``[webhooks] url`` set (``webhooks={"url": ...}`` as an override)
    the event webhook sender runs for the duration of the block
    (``handle.webhooks``), and events are recorded; with ``[moderation]
    url`` every user's message is moderated (docs/EMBEDDING.md, Webhooks).

    Raises ConfigError for unusable settings (a value of the wrong type, a
    ``data_dir`` that is not a directory, a ``secret_file`` that cannot be
    read), StoreError if the store cannot be opened (a Redis store it cannot
    reach: naming the URL, store.url and where it came from), OSError if a listener
    cannot bind (a failed start takes back what it made in the data
    directory, as ``pimcore serve``'s: docs/OPERATIONS.md, data_dir); ValueError for a ``store`` that is no store object (a
    name or URL string: the stores are LmdbStore, MemoryStore and the
    Redis Cluster AsyncStore).
    """
    if store is not None and not isinstance(store, (Store, AsyncStore)):
        raise ValueError(
            f"store must be None (LMDB in <data_dir>/store) or an opened store object: a pimcore.store.Store"
            f" (LmdbStore, MemoryStore) or a pimcore.store.AsyncStore (the Redis Cluster store) -- not"
            f" {type(store).__name__} {store!r:.60}"
        )
    if settings is None:
        # Listeners only where the host says (load_settings' embedded rule).
        settings = load_settings(config_file, embedded=True, **overrides)
    elif config_file is not None or overrides:
        raise TypeError("pass either settings or config_file/overrides, not both")
    _check_data_dir(settings)  # (as pimcore serve says it, naming where data_dir came from)
    start = DataDirStart()
    start.begin(Path(settings.data_dir))
    try:
        async with _started(settings, store, authenticate, content_filter, start) as handle:
            start.ready = True  # serving: nothing is taken back from here on
            yield handle
    except BaseException:
        start.undo()  # a failed start takes back what it made there, as pimcore serve's
        raise


@asynccontextmanager
async def _started(settings: ServeSettings, store: Union[Store, AsyncStore, None], authenticate: Optional[Auth],
                   content_filter: Any, start: DataDirStart) -> AsyncIterator[Pimcore]:
    """:func:`open_pimcore` once its settings are checked: everything it
    makes and opens (``start`` learns the server once it listens)."""
    config = settings.server_config()
    tls = settings.tls_context()
    if tls is not None:
        config = replace(config, ssl_context=tls)
    if content_filter is not None:
        config = replace(config, broker=replace(config.broker, content_filter=content_filter))  # type: ignore[arg-type]  # async: run by the server
    webhook = settings.webhook_config()
    secret: Optional[bytes] = None
    if authenticate is None:
        secret = _secret_of(settings)
        authenticate = JwtAuthenticator(secret)  # (long enough: _secret_of says where a short one came from)
    http_config = _http_config(settings, tls)
    own_store = store is None
    if store is None and settings.store is not None:
        mark_redis_data_dir(settings)  # (the Redis store itself is connected below, in trio)
    elif store is None:
        try:
            Path(settings.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)  # (private: pimcore serve's)
            store = LmdbStore(Path(settings.data_dir) / "store", durability=settings.durability)
        except OSError as exc:  # (as pimcore serve says it: what, and where data_dir came from)
            raise store_refusal(settings, exc, Path(settings.data_dir) / "store") from None
    try:
        with unwrap_single():
            async with AsyncExitStack() as stack:
                if store is None:  # store.url: the Redis Cluster store, as pimcore serve connects it
                    store = await stack.enter_async_context(open_redis_store(settings))
                server = await stack.enter_async_context(open_broker_server(store, authenticate, config))
                start.server = server  # (a connection it accepted: serving, nothing taken back)
                handle = Pimcore(server, store, settings, secret)
                nursery = None
                if webhook is not None:
                    # Before the HTTP listener, as pimcore serve starts them:
                    # a webhook start that fails then fails the start before
                    # any HTTP post could be acked (DataDirStart takes the
                    # store back on a failed start).
                    nursery = await stack.enter_async_context(trio.open_nursery())
                    await start_webhooks(handle, webhook, nursery)
                if http_config is not None:
                    from .http import open_http_server

                    handle.http = await stack.enter_async_context(
                        open_http_server(server, http_config, handle=handle))
                if own_store and settings.store is None:
                    (Path(settings.data_dir) / REDIS_NOTE).unlink(missing_ok=True)  # LMDB's again (as serve)
                yield handle
                if nursery is not None:
                    nursery.cancel_scope.cancel()  # the webhook sender stops, then the HTTP listener closes
    finally:
        if own_store and isinstance(store, Store):  # (a Redis store: closed by its context above)
            store.close()


#: Left in the data directory of a broker on a Redis store (its URL and
#: namespace): ``pimcore group/purge/retention --data-dir`` read it and
#: refuse to write an LMDB store there that no broker reads.  Removed by a
#: broker started there on LMDB.
REDIS_NOTE = "redis-store"


def mark_redis_data_dir(settings: ServeSettings) -> None:
    """Write :data:`REDIS_NOTE` for a broker on ``settings.store``
    (making the data directory, private, if missing); ConfigError in words
    if it cannot be written."""
    note = Path(settings.data_dir) / REDIS_NOTE
    try:
        Path(settings.data_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        note.write_text(f"{settings.store} {settings.store_namespace}\n")
    except OSError as exc:
        raise store_refusal(settings, exc, note) from None


def redis_refusal(settings: ServeSettings, exc: StoreError) -> StoreError:
    """The Redis store of ``settings.store`` failing to connect, in words
    naming the URL, the setting and where it came from: "cannot reach the
    Redis store redis://127.0.0.1:1 (store.url): ... (from $PIMCORE_STORE)".
    (It was "cannot reach Redis at [('127.0.0.1', 1)]: RedisClusterError('...')".)"""
    said = str(exc)
    if said.startswith("cannot reach Redis at "):
        text = f"cannot reach the Redis store {settings.store} (store.url): {said.split(': ', 1)[-1]}"
    else:
        text = f"the Redis store {settings.store} (store.url): {said}"
    return StoreError(str(settings._refused(text, ("store", "url"))))


@asynccontextmanager
async def open_redis_store(settings: ServeSettings) -> AsyncIterator[AsyncStore]:
    """The Redis Cluster store of ``settings.store`` (``[store] url``,
    ``$PIMCORE_STORE``, ``--store``) with its ``namespace``,
    ``address_map`` and ``read_fanout_above``, connected for the block:
    what ``pimcore serve`` and :func:`open_pimcore` run on.  ConfigError if
    coredis/hiredis are missing, :func:`redis_refusal`'s StoreError if it
    cannot be reached."""
    assert settings.store is not None  # (the caller's test: store.url is set)
    for module in ("coredis", "hiredis"):
        try:
            __import__(module)
        except ImportError:
            raise settings._refused(f"store.url {settings.store} needs {module}: pip install 'pimcore[redis]'",
                                    ("store", "url")) from None
    from .store.redis import RedisStore

    extra = {} if settings.store_read_fanout_above is None else {"read_fanout_above": settings.store_read_fanout_above}
    async with AsyncExitStack() as stack:
        try:
            with unwrap_single():
                store = await stack.enter_async_context(RedisStore.connect(
                    settings.store, namespace=settings.store_namespace, address_map=settings.store_address_map,
                    **extra))
        except StoreError as exc:
            raise redis_refusal(settings, exc) from exc
        yield store


def _http_config(settings: ServeSettings, tls: Optional[ssl.SSLContext]) -> Any:
    """The HttpConfig of ``settings.http`` (None without one): API keys and
    TLS (``tls``: ``settings.tls_context()``) as ``pimcore serve --http``
    has them (docs/HTTP.md)."""
    ep = settings.http_endpoint()
    if ep is None:
        return None
    return settings.http_config(tls if ep.secure else None, settings.load_api_keys())


async def start_webhooks(handle: Pimcore, config: Any, nursery: trio.Nursery) -> Any:
    """Start a :class:`pimcore.webhooks.WebhookSender` for ``handle`` in
    ``nursery`` (returns once its event log cursor exists) and show it on
    the handle and in ``/metrics``."""
    from .webhooks import WebhookSender

    sender = WebhookSender(handle, config)
    handle.webhooks = sender
    handle.server.webhook_sender = sender
    await nursery.start(sender.run)
    return sender


def _secret_of(settings: ServeSettings) -> bytes:
    """The token secret as ``pimcore serve`` finds it (config.token_secret):
    a refusal says where it came from ("the token secret from the secret
    argument is 5 bytes; it must be at least 32"), and a data directory
    whose secret cannot be read or made says so in words."""
    try:
        secret = token_secret(settings)
    except OSError as exc:  # (not a ConfigError: made one, naming where data_dir came from)
        raise settings._refused(f"the data directory {settings.data_dir}: cannot read or create its token secret:"
                                f" {exc.strerror or exc}", (None, "data_dir"), named=False) from None
    assert secret is not None  # (create: made if missing)
    return secret
