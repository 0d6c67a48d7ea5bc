"""Embedding pimcore in a synchronous program (WSGI apps, scripts, the C ABI).

:func:`open_pimcore_thread` runs the broker -- the :mod:`pimcore.embed`
handle a trio host gets -- in a thread of its own (``trio.run`` there) and
returns a :class:`ThreadedPimcore` whose methods are plain blocking calls
with the same arguments, results and errors (every method and property of
the trio handle but ``serve_stream``, ``server`` and ``http``, which are
trio's; ``events()`` is a blocking iterator)::

    im = open_pimcore_thread(data_dir="chat-data", listen=["tcp://127.0.0.1:7400"])
    try:
        im.create_group("team", ["alice", "bob"])
        im.post("team", b"welcome")
    finally:
        im.close()                      # flushes and closes the store

How a call crosses over: the calling thread enters the broker's trio run
with ``trio.from_thread.run(..., trio_token=...)`` and blocks until the
coroutine finished there.  Any number of threads may call at once.  Two
calls cannot work, and raise :class:`WouldDeadlock` instead of hanging: a
blocking method from the broker's own thread (an event handler running on
the loop), and :meth:`ThreadedPimcore.close` or
:meth:`ThreadedPimcore.set_event_handler` from inside an event handler
(they wait for the handler to return) -- of the same broker, or of another
one whose handler waits in turn for the caller's handler (A's handler
closing B while B's closes A: the call that would close the wait-for cycle
raises, with nothing done; the other proceeds once the refused handler
returns).  What does not wait for the broker
works from its thread too: ``issue_token``, ``statistics``, ``kick``,
``online_devices``, ``port``, the properties, and creating (not iterating)
``events()``.  After :meth:`ThreadedPimcore.close` every method raises
:class:`BrokerStopped`.

This is also the layer the C ABI (``bindings/``) stands on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import trio

from . import embed
from ._util import first_leaf
from .config import ConfigError, ServeSettings, load_settings
from .embed import (
    SYSTEM, Conversation, ConversationListPage, EventsDisabled, HostEvent, Pimcore, Posted, ReadPositions, RequestRefused,
)
from .errors import BrokerStopped, ErrorCode, PimError
from .store.base import GroupChanged, StoredMessage

__all__ = [
    "open_pimcore_thread", "ThreadedPimcore", "ThreadedEventStream", "WouldDeadlock", "BrokerStopped", "BrokerAlreadyRunning",
    "RequestRefused", "Posted", "Conversation", "HostEvent", "SYSTEM",
]

_log = logging.getLogger("pimcore.net")


class WouldDeadlock(RuntimeError):
    """A blocking call from a thread the call would have to wait for: the
    broker's loop thread (an event handler with ``on_loop=True``), or
    close/set_event_handler from inside an event handler of that broker, or
    of another broker one of whose handlers waits for this one's (a
    wait-for cycle across brokers).  Nothing was done."""


class BrokerAlreadyRunning(RuntimeError):
    """A broker of this process already runs on that data directory's LMDB
    store."""


#: LMDB store directories of the brokers this process runs (realpath), so a
#: second start on one is a clear error rather than LMDB's lock refusal.
_running_dirs: set[str] = set()
_running_lock = threading.Lock()
#: ``dispatching``: the ThreadedPimcore whose event handler this thread runs.
_tls = threading.local()

#: The wait-for graph of close() and set_event_handler() across brokers,
#: under _wait_lock: thread ident -> (the broker it waits for, the consumer
#: whose handler it waits for, None: every one -- close()).  Why: broker A's
#: handler closing B while B's handler closes A waited for each other for
#: good (a new user's trial); a check of the caller's own broker alone
#: cannot see a cycle through another broker.
_waiting: dict[int, tuple["ThreadedPimcore", Optional[str]]] = {}
_wait_lock = threading.Lock()


def _would_close_a_cycle(me: int, im: "ThreadedPimcore", consumer: Optional[str]) -> bool:
    """Would thread ``me`` waiting for ``im`` (its ``consumer``'s handler,
    every handler when None) wait for itself, through threads that already
    wait for other brokers?  Under _wait_lock: the check and the caller's
    registration are one step, so of two calls closing a cycle at once the
    second sees the first and is refused -- one is always refused, never both
    (the first's wait then ends when the refused handler returns)."""
    seen: set[tuple[int, Optional[str]]] = set()
    todo = [(im, consumer)]
    while todo:
        broker, cons = todo.pop()
        if (id(broker), cons) in seen:
            continue
        seen.add((id(broker), cons))
        for ident in broker._threads_waited_for(cons):
            if ident == me:
                return True
            nxt = _waiting.get(ident)
            if nxt is not None:
                todo.append(nxt)
    return False

EventHandler = Callable[[HostEvent], Optional[bool]]

#: Seconds before an event whose handler raised (or returned something other
#: than True, False or None) is handed to it again; doubled after each
#: failure in a row, up to :data:`HANDLER_RETRY_MAX`.
HANDLER_RETRY_DELAY = 1.0
#: The longest wait between two tries of a failing event (s).
HANDLER_RETRY_MAX = 60.0


def _next_retry_delay(delay: float) -> float:
    """The wait (s) after the next failure in a row, ``delay`` the last one:
    doubled, at most HANDLER_RETRY_MAX."""
    return min(delay * 2, HANDLER_RETRY_MAX)


def _is_async(fn: object) -> bool:
    """Is ``fn`` a coroutine function (plain, a partial of one, or an object
    with an ``async def __call__``)?  Called from a thread it would return
    a coroutine that never runs."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _runs_trio() -> bool:
    """Is this call made from inside a trio task (another broker's on-loop
    handler, a trio host)?  Not merely a thread that hosts a trio guest run
    (an asyncio loop with a pimcore.asyncio broker): between the guest's
    ticks no task runs there, and a blocking call from it waits for this
    broker's thread, never for that run."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class ThreadedPimcore:
    """A broker running in its own thread; create it with
    :func:`open_pimcore_thread`.  Methods mirror :class:`pimcore.embed.Pimcore`
    (blocking) and raise what it raises (RequestRefused with an ErrorCode,
    StoreError), plus WouldDeadlock and BrokerStopped (module docstring)."""

    def __init__(self) -> None:
        self.handle: Optional[Pimcore] = None
        self._token: Optional[trio.lowlevel.TrioToken] = None
        self._thread: Optional[threading.Thread] = None
        self._loop_ident: Optional[int] = None
        self._stop: Optional[trio.Event] = None
        self._nursery: Optional[trio.Nursery] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._close_done = threading.Event()  # set when the first close() has stopped the broker
        self._store_dir: Optional[str] = None
        #: consumer -> (cancel scope, trio.Event set when the dispatcher ended)
        self._handlers: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        #: consumer -> the lock its set_event_handler swaps take, whole, one
        #: at a time (in the broker's thread; only while a swap is pending)
        self._swap_locks: dict[str, trio.Lock] = {}
        #: ident -> consumer of each worker thread in one of this broker's
        #: event handlers now (under _wait_lock; for the wait-for graph)
        self._handler_threads: dict[int, str] = {}

    # ------------------------------------------------------------ the thread

    def _start(self, settings: ServeSettings, kwargs: dict[str, Any], name: str) -> None:
        self._thread = threading.Thread(target=self._main, args=(settings, kwargs), name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            exc = first_leaf(self._error)
            raise exc.with_traceback(exc.__traceback__)

    def _main(self, settings: ServeSettings, kwargs: dict[str, Any]) -> None:
        self._loop_ident = threading.get_ident()
        try:
            trio.run(self._serve, settings, kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller / close()
            self._error = exc
            if self._ready.is_set():  # it was serving: said now, re-raised by close() later
                _log.error("pimcore thread ended: %r", first_leaf(exc))
            else:  # start-up: raised in the caller by open_pimcore_thread (said once, there)
                _log.debug("pimcore thread: the start failed: %r (raised to the caller)", first_leaf(exc))
        finally:
            # Its ident is free for a new thread from now on: kept, a later
            # thread given it was taken for this loop's own -- close() (or
            # pim_broker_free after a stop) from it raised WouldDeadlock.
            self._loop_ident = None
            self._ready.set()

    async def _serve(self, settings: ServeSettings, kwargs: dict[str, Any]) -> None:
        async with embed.open_pimcore(settings, **kwargs) as handle:
            async with trio.open_nursery() as nursery:
                self.handle = handle
                self._nursery = nursery
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()  # event dispatchers; in-flight calls are system tasks

    def _threads_waited_for(self, consumer: Optional[str]) -> list[int]:
        """The threads a close() (``consumer`` None) or a set_event_handler
        of ``consumer`` waits for: the broker's own thread (it runs the
        swap, ends the run, and runs on-loop handlers) while it runs, and the
        workers in those handlers now.  Under _wait_lock."""
        idents = [i for i, c in self._handler_threads.items() if consumer is None or c == consumer]
        thread = self._thread
        if thread is not None and thread.is_alive() and self._loop_ident is not None:
            idents.append(self._loop_ident)  # (not once it ended: a later thread may get its ident)
        return idents

    @contextlib.contextmanager
    def _wait_for_handlers(self, consumer: Optional[str], what: str) -> Iterator[None]:
        """Around a call that waits for this broker's event handlers (all of
        them, ``consumer`` None, or that consumer's): WouldDeadlock, with
        nothing done, when one of them waits -- through any number of other
        brokers' close() or set_event_handler() -- for the calling thread."""
        me = threading.get_ident()
        with _wait_lock:
            if _would_close_a_cycle(me, self, consumer):
                raise WouldDeadlock(
                    f"{what} would deadlock: it waits for this broker's event handlers (and its thread), and one of"
                    " them waits, through another broker's close() or set_event_handler(), for the calling thread"
                    " (an event handler of that other broker): call it from a thread that is in no event handler")
            _waiting[me] = (self, consumer)
        try:
            yield
        finally:
            with _wait_lock:
                _waiting.pop(me, None)

    def _alive(self) -> Pimcore:
        """The trio handle, for a call that does not wait for the broker's
        thread (it works from there too); BrokerStopped after close()."""
        if self._closed or self._token is None or self.handle is None:
            raise BrokerStopped("the broker was closed")
        return self.handle

    def _check(self) -> trio.lowlevel.TrioToken:
        """The trio token, for a blocking call; WouldDeadlock from the
        broker's own thread, which that call would wait for."""
        self._alive()
        if threading.get_ident() == self._loop_ident:
            raise WouldDeadlock("a blocking pimcore call from the broker's own thread (an on-loop event handler) would deadlock")
        if _runs_trio():
            # Another broker's loop thread (its on-loop handler), or a trio
            # host's: a blocking wait there would stall that loop, and trio
            # refuses from_thread.run inside a run.
            raise WouldDeadlock("a blocking pimcore call from a thread that runs a trio loop (another broker's on-loop"
                                " event handler?) would block that loop: call it from another thread")
        assert self._token is not None
        return self._token

    def _call(self, afn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        token = self._check()
        try:
            return trio.from_thread.run(functools.partial(afn, *args, **kwargs), trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled) as exc:
            raise BrokerStopped("the broker stopped during the call") from (self._error or exc)

    def _call_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A synchronous method of the trio handle: in the broker's thread
        (directly when already there: it does not wait)."""
        self._alive()
        if threading.get_ident() == self._loop_ident:
            return fn(*args)
        token = self._check()
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=token)
        except trio.RunFinishedError as exc:
            raise BrokerStopped("the broker stopped during the call") from (self._error or exc)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the broker gracefully (clients get Close(SHUTDOWN), committed
        work flushed, the store closed: nothing waits for interpreter exit)
        and join its thread.  Idempotent.  Raises WouldDeadlock, with nothing
        done, from the broker's thread or an event handler of it, or from
        another broker's handler while one of this broker's handlers waits
        for that one (it closes or sets a handler of the caller's broker:
        a wait-for cycle); re-raises (once) an error the broker's thread
        ended with."""
        if threading.get_ident() == self._loop_ident or getattr(_tls, "dispatching", None) is self:
            raise WouldDeadlock("close() from an event handler would wait for itself")
        with self._wait_for_handlers(None, "close()"):  # checked before anything is done
            self._close()

    def _close(self) -> None:
        with self._close_lock:
            first, self._closed = not self._closed, True
        if not first:
            # Another thread's close() may still be flushing: return once
            # the broker is stopped, as that first close() does.
            self._close_done.wait()
            return
        try:
            if self._token is not None and self._stop is not None:
                self._token.run_sync_soon(self._stop.set)
        except trio.RunFinishedError:
            pass
        try:
            assert self._thread is not None
            self._thread.join()
            with _running_lock:
                _running_dirs.discard(self._store_dir or "")
        finally:
            self._close_done.set()
        error, self._error = self._error, None
        if error is not None:
            exc = first_leaf(error)
            raise exc.with_traceback(exc.__traceback__)

    def __enter__(self) -> "ThreadedPimcore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ identity

    @property
    def urls(self) -> list[str]:
        """The listeners' URLs (fixed once started)."""
        return self._alive().urls

    def port(self, scheme: str = "tcp") -> int:
        """The bound port of the first ``scheme`` listener (the one the OS
        chose for port 0).  Raises LookupError if there is none."""
        for url in self.urls:
            if url.startswith(scheme + "://"):
                return int(url.rsplit(":", 1)[1].split("/", 1)[0])
        raise LookupError(f"no {scheme} listener")

    @property
    def http_url(self) -> Optional[str]:
        """The HTTP listener's URL (the real port), None unless opened with
        ``http=URL``."""
        return self._alive().http_url

    @property
    def settings(self) -> ServeSettings:
        """The settings the broker runs with."""
        return self._alive().settings

    @property
    def webhooks(self) -> Any:
        """The event webhook sender (:class:`pimcore.webhooks.WebhookSender`)
        when ``[webhooks]`` is configured, else None: to read its state (it
        runs in the broker's thread)."""
        return self._alive().webhooks

    @property
    def events_enabled(self) -> bool:
        """Does the broker record host events (``events=True``, or turned on
        by ``[webhooks] url``)?"""
        return self._alive().events_enabled

    @property
    def epoch(self) -> bytes:
        return self._alive().epoch

    @property
    def store_id(self) -> str:
        """The store's id (16 hex digits): events are unique by (store_id, id)."""
        return self._alive().store_id

    def statistics(self) -> Any:
        assert self.handle is not None
        return self._call_sync(self.handle.statistics)

    def issue_token(self, user: str, device: Optional[str] = None, *, ttl: int = 3600) -> str:
        """As Pimcore.issue_token (signing only: runs in the calling thread)."""
        return self._alive().issue_token(user, device, ttl=ttl)

    # ------------------------------------------------------------ the handle's methods

    def create_group(self, conv: str, members: Sequence[str], *, history_visible: bool = False) -> GroupChanged:
        assert self.handle is not None
        visible = embed._history_flag(history_visible)  # checked in the caller's thread
        return self._call(self.handle.create_group, conv, embed._user_ids(members, "members"),  # a copy, checked
                          history_visible=visible)

    def members(self, conv: str) -> tuple[str, ...]:
        assert self.handle is not None
        return self._call(self.handle.members, conv)

    def history_visible(self, conv: str) -> bool:
        assert self.handle is not None
        return self._call(self.handle.history_visible, conv)

    def add_members(self, conv: str, users: Sequence[str]) -> GroupChanged:
        assert self.handle is not None
        users = embed._some_users(users, "add_members", conv)  # checked in the caller's thread
        return self._call(self.handle.add_members, conv, users)

    def remove_members(self, conv: str, users: Sequence[str]) -> GroupChanged:
        assert self.handle is not None
        users = embed._some_users(users, "remove_members", conv)  # checked in the caller's thread
        return self._call(self.handle.remove_members, conv, users)

    def post(
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
        """As Pimcore.post: returns once the message is durable."""
        assert self.handle is not None
        return self._call(self.handle.post, conv, payload, sender=sender, device=device, idempotency_key=idempotency_key,
                          mentions=mentions, mention_all=mention_all)  # checked by Pimcore.post

    def post_many(self, posts: Sequence[dict[str, Any]]) -> list[Union[Posted, PimError]]:
        assert self.handle is not None
        embed._check_posts(posts)  # before list(): a str is no list of its letters
        return self._call(self.handle.post_many, list(posts))

    def recall(
        self, conv: str, seq: int, *, sender: str = SYSTEM, device: str = SYSTEM,
        idempotency_key: Union[str, bytes, None] = None,
    ) -> Posted:
        """As Pimcore.recall: returns once the RECALL entry is durable."""
        assert self.handle is not None
        return self._call(self.handle.recall, conv, seq, sender=sender, device=device, idempotency_key=idempotency_key)

    def edit(
        self, conv: str, seq: int, payload: bytes, *, sender: str = SYSTEM, device: str = SYSTEM,
        idempotency_key: Union[str, bytes, None] = None,
    ) -> Posted:
        """As Pimcore.edit."""
        assert self.handle is not None
        return self._call(self.handle.edit, conv, seq, payload, sender=sender, device=device,
                          idempotency_key=idempotency_key)

    def delete_for(
        self, user: str, conv: str, seq: int, *, device: str = "host", idempotency_key: Union[str, bytes, None] = None,
    ) -> Posted:
        """As Pimcore.delete_for."""
        assert self.handle is not None
        return self._call(self.handle.delete_for, user, conv, seq, device=device, idempotency_key=idempotency_key)

    def kick(self, user: str, device: Optional[str] = None, reason: str = "") -> None:
        assert self.handle is not None
        self._call_sync(self.handle.kick, user, device, reason)

    def revoke(self, user: str, device: Optional[str] = None, *, before: Optional[int] = None) -> int:
        assert self.handle is not None
        return self._call(self.handle.revoke, user, device, before=before)

    def set_retention(self, conv: str, *, max_age: Optional[int] = None, max_count: Optional[int] = None) -> Any:
        assert self.handle is not None
        return self._call(self.handle.set_retention, conv, max_age=max_age, max_count=max_count)

    def retention(self, conv: str) -> Any:
        assert self.handle is not None
        return self._call(self.handle.retention, conv)

    def purge_conversation(self, conv: str) -> Any:
        assert self.handle is not None
        return self._call(self.handle.purge_conversation, conv)

    def purge_user(self, user: str) -> Any:
        assert self.handle is not None
        return self._call(self.handle.purge_user, user)

    def online_devices(self, user: str) -> list[str]:
        assert self.handle is not None
        return self._call_sync(self.handle.online_devices, user)

    def online_anywhere(self, users: Iterable[str]) -> frozenset[str]:
        """As Pimcore.online_anywhere."""
        assert self.handle is not None
        return self._call(self.handle.online_anywhere, list(users))

    def conversations(self, user: str) -> list[Conversation]:
        assert self.handle is not None
        return self._call(self.handle.conversations, user)

    def presence(self, user: str) -> Any:
        assert self.handle is not None
        return self._call(self.handle.presence, user)

    def set_presence_privacy(self, user: str, hide_last_seen: bool) -> bool:
        assert self.handle is not None
        return self._call(self.handle.set_presence_privacy, user, hide_last_seen)

    def unread(self, user: str, conv: Optional[str] = None) -> int:
        """As Pimcore.unread: without ``conv``, the total over the user's
        conversations."""
        assert self.handle is not None
        return self._call(self.handle.unread, user, conv)

    def read_positions(self, user: str) -> ReadPositions:
        """As Pimcore.read_positions."""
        assert self.handle is not None
        return self._call(self.handle.read_positions, user)

    def conversation_list(
        self, user: str, *, cursor: bytes = b"", limit: int = 50, include_hidden: bool = False
    ) -> ConversationListPage:
        """As Pimcore.conversation_list."""
        assert self.handle is not None
        return self._call(self.handle.conversation_list, user, cursor=cursor, limit=limit, include_hidden=include_hidden)

    def set_conversation(
        self, user: str, conv: str, *, pinned: Optional[bool] = None, muted: Optional[bool] = None,
        hidden: Optional[bool] = None,
    ) -> Any:
        """As Pimcore.set_conversation."""
        assert self.handle is not None
        return self._call(self.handle.set_conversation, user, conv, pinned=pinned, muted=muted, hidden=hidden)

    def history(
        self, conv: str, user: str, *, from_seq: int = 0, limit: int = 50, backward: bool = True
    ) -> list[StoredMessage]:
        """As Pimcore.history."""
        assert self.handle is not None
        return self._call(self.handle.history, conv, user, from_seq=from_seq, limit=limit, backward=backward)

    def events(self, consumer: str = "default", *, after: Optional[int] = None, limit: int = 256) -> "ThreadedEventStream":
        """As Pimcore.events, as a blocking iterator: ``for ev in
        im.events(consumer):`` waits for each next event (it never ends by
        itself; a close() ends the wait with BrokerStopped).  Raises
        EventsDisabled when the broker records no events; RequestRefused
        (BAD_REQUEST, an invalid consumer name) when iterated."""
        return ThreadedEventStream(self, self._alive().events(consumer, after=after, limit=limit))

    def next_events(
        self, consumer: str = "default", *, after: Optional[int] = None, limit: int = 256, timeout: Optional[float] = None
    ) -> tuple[int, list[HostEvent]]:
        """As Pimcore.next_events; with ``timeout`` (seconds) it returns
        ``(after, [])`` when no event came in time (``after`` then is the
        value passed, or the durable cursor when that was None)."""
        handle = self.handle
        assert handle is not None

        async def page() -> tuple[int, list[HostEvent]]:
            if timeout is None:
                return await handle.next_events(consumer, after=after, limit=limit)
            with trio.move_on_after(timeout):
                return await handle.next_events(consumer, after=after, limit=limit)
            cursor = after if after is not None else (await handle.event_cursor(consumer))[0]
            return cursor, []

        return self._call(page)

    def event_cursor(self, consumer: str = "default") -> tuple[int, int]:
        assert self.handle is not None
        return self._call(self.handle.event_cursor, consumer)

    def ack_events(self, upto: int, consumer: str = "default") -> int:
        assert self.handle is not None
        return self._call(self.handle.ack_events, upto, consumer)

    def delete_consumer(self, consumer: str = "default") -> bool:
        """As :meth:`pimcore.embed.Pimcore.delete_consumer` (ConsumerInUse
        while a handler of it is set: remove it first)."""
        assert self.handle is not None
        return self._call(self.handle.delete_consumer, consumer)

    def event_consumers(self, limit: int = embed.MAX_EVENT_CONSUMERS) -> list[tuple[str, int]]:
        assert self.handle is not None
        return self._call(self.handle.event_consumers, limit)

    def consumer_in_use(self, consumer: str) -> bool:
        """As :meth:`pimcore.embed.Pimcore.consumer_in_use` (does not block)."""
        assert self.handle is not None
        return self.handle.consumer_in_use(consumer)

    # ------------------------------------------------------------ event handlers

    def set_event_handler(self, handler: Optional[EventHandler], consumer: str = "default", *, on_loop: bool = False) -> None:
        """Hand ``consumer``'s host events to ``handler(event) -> bool | None``,
        one at a time in id order, until replaced (``None`` removes it; a
        replaced handler's running call finishes first).  ``True``
        acknowledges the event, and with it every earlier one (acks are
        cumulative, done after each page); ``False`` or ``None`` leaves it
        to :meth:`ack_events` and delivery goes on.  Delivery starts after
        the consumer's durable cursor: what was not acknowledged comes again
        after a restart.

        A handler that raises -- or returns anything but True, False or None
        (a truthy 1 is no acknowledgement: that is a handler bug) -- fails
        its event: it is logged (ERROR, with the traceback), the events
        acknowledged before it are, and delivery stops there: the same event
        is handed to the handler again after :data:`HANDLER_RETRY_DELAY`
        (1 s), the wait doubling with each failure in a row up to
        :data:`HANDLER_RETRY_MAX` (60 s), until it returns.  Nothing after a
        failing event is delivered or acknowledged meanwhile.

        The handler runs in a worker thread (it may call this handle's
        methods, but not close() or set_event_handler(), which raise
        WouldDeadlock; nor another broker's when one of that broker's
        handlers waits for this one: WouldDeadlock too, module docstring), or with ``on_loop=True`` in the broker's thread
        itself: cheaper, but it must not block and every blocking method
        called from it raises WouldDeadlock (issue_token, statistics, kick,
        online_devices, port and the properties do not block: they work).

        Raises EventsDisabled (a ValueError) when the broker records no
        events (``events`` off and no ``[webhooks] url``) -- removing a
        handler (``None``) too, nothing to remove --, RequestRefused
        (BAD_REQUEST) for an invalid consumer name (removing a handler
        too, as ack_events); TypeError for a handler that is not callable,
        or is an ``async def`` function (it would never run: a trio host
        iterates :meth:`pimcore.embed.Pimcore.events` instead)."""
        if handler is not None:
            if not callable(handler):
                raise TypeError(f"the event handler must be callable (fn(event) -> bool), not {type(handler).__name__}")
            if _is_async(handler):
                raise TypeError("the event handler is an async def function, which a thread cannot run (its coroutine"
                                " would never be awaited): pass a plain function, or iterate events() in async code")
        if getattr(_tls, "dispatching", None) is self:
            raise WouldDeadlock("set_event_handler() from an event handler would wait for itself")
        self._check()
        # Why, in words, as ack_events says it ("events of '': BAD_REQUEST"
        # left a caller to guess the rule: a new user's trial).
        embed._check_consumer(consumer, "set_event_handler")
        handle = self.handle
        assert handle is not None
        if not handle.events_enabled:  # [server] events, or turned on by [webhooks] url
            # A removal too, as pimcore.h says of pim_set_event_callback: it
            # returned PIM_OK for a callback that could never have been set
            # (a new user's trial), while setting one was refused.
            raise EventsDisabled()

        async def swap() -> None:
            # One swap of a consumer at a time, whole: two overlapping ones
            # (two threads setting it at once) each started a dispatcher, the
            # second overwrote the first here, and the first ran on, never
            # cancelled -- two handlers at once, ids out of order, and a
            # removal that left one running (a new user's trial).
            lock = self._swap_locks.get(consumer)
            if lock is None:
                lock = self._swap_locks[consumer] = trio.Lock()
            try:
                async with lock:
                    old = self._handlers.pop(consumer, None)
                    if old is not None:
                        old[0].cancel()
                        await old[1].wait()
                    if handler is not None:
                        await handle.event_cursor(consumer)  # RequestRefused for a bad consumer name, here
                        await handle._hold_events(consumer)  # its cursor exists before this returns: nothing reclaimed under it
                        assert self._nursery is not None and self._stop is not None
                        if self._stop.is_set():
                            # close() ended (or is ending) the nursery the
                            # dispatcher would run in: start() raised
                            # "Nursery is closed to new arrivals", an internal
                            # error through the C ABI (a new user's trial).
                            # No checkpoint between this check and start():
                            # the nursery is open when the stop is not set.
                            raise BrokerStopped("the broker was stopped during the call")
                        self._handlers[consumer] = await self._nursery.start(self._dispatch, handler, consumer, on_loop)
            finally:
                if not lock.locked() and lock.statistics().tasks_waiting == 0:
                    self._swap_locks.pop(consumer, None)  # no swap of it pending: not kept per consumer ever set

        with self._wait_for_handlers(consumer, "set_event_handler()"):  # the swap waits for the old handler
            self._call(swap)

    async def _dispatch(
        self, handler: EventHandler, consumer: str, on_loop: bool, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        handle = self.handle
        assert handle is not None
        ended = trio.Event()
        # A live reader of the consumer from before this handler is set until
        # it is removed: delete_consumer refuses it meanwhile.
        reading = handle._reader(consumer)
        try:
            with trio.CancelScope() as scope:
                task_status.started((scope, ended))
                after: Optional[int] = None
                delay = HANDLER_RETRY_DELAY
                while True:
                    after, events = await handle.next_events(consumer, after=after)
                    if on_loop:
                        upto, failed = _deliver(handler, events)
                    else:
                        upto, failed = await trio.to_thread.run_sync(self._deliver_off_loop, handler, consumer, events)
                    if upto is not None:
                        await handle.ack_events(upto, consumer)
                    if failed is None:
                        after = events[-1].id
                        delay = HANDLER_RETRY_DELAY
                        continue
                    # Stop at the failed event: read again from just before it.
                    after = failed.id - 1
                    _log.error("pimcore event handler of %r failed on event %d: %s; not acknowledged, retrying in %s",
                               consumer, failed.id, failed.error, f"{delay:g} s", exc_info=failed.error)
                    await trio.sleep(delay)
                    delay = _next_retry_delay(delay)
        except Exception:  # noqa: BLE001 - a store failure ends this dispatcher, not the broker
            _log.exception("pimcore event dispatcher for %r ended", consumer)
        finally:
            reading()
            ended.set()
            entry = self._handlers.get(consumer)
            if entry is not None and entry[1] is ended:
                del self._handlers[consumer]

    def _deliver_off_loop(
        self, handler: EventHandler, consumer: str, events: list[HostEvent]
    ) -> tuple[Optional[int], Optional["_Failed"]]:
        me = threading.get_ident()
        _tls.dispatching = self
        with _wait_lock:  # a node of the wait-for graph while the handler runs here
            self._handler_threads[me] = consumer
        try:
            return _deliver(handler, events)
        finally:
            with _wait_lock:
                self._handler_threads.pop(me, None)
            _tls.dispatching = None


class ThreadedEventStream:
    """``for ev in im.events(...)``: host events one by one, each
    :func:`next` blocking until there is one (:class:`pimcore.embed.EventStream`
    driven from this thread).  Its cursor lives in memory; only
    :meth:`ThreadedPimcore.ack_events` moves the durable one."""

    def __init__(self, im: ThreadedPimcore, stream: embed.EventStream) -> None:
        self._im = im
        self._stream = stream

    @property
    def consumer(self) -> str:
        return self._stream.consumer

    @property
    def after(self) -> Optional[int]:
        """The id of the last event handed out (None: not started yet)."""
        return self._stream.after

    def __iter__(self) -> "ThreadedEventStream":
        return self

    def __next__(self) -> HostEvent:
        event: HostEvent = self._im._call(self._stream.__anext__)
        return event


class _Failed:
    """The event a handler failed on, and why (its exception)."""

    __slots__ = ("id", "error")

    def __init__(self, id: int, error: BaseException) -> None:
        self.id = id
        self.error = error


def _deliver(handler: EventHandler, events: list[HostEvent]) -> tuple[Optional[int], Optional[_Failed]]:
    """Call ``handler`` for each event until one fails (raises, or returns
    anything but True, False or None): (the last id it acknowledged or
    None, the failure or None)."""
    upto = None
    for ev in events:
        try:
            answer = handler(ev)
            if answer is not None and type(answer) is not bool:
                raise TypeError(f"the event handler must return True, False or None, not {type(answer).__name__} "
                                f"{answer!r:.60}: only True acknowledges an event")
        except Exception as exc:  # noqa: BLE001 - logged by the dispatcher, the event tried again
            return upto, _Failed(ev.id, exc)
        if answer:
            upto = ev.id
    return upto, None


def open_pimcore_thread(
    settings: Optional[ServeSettings] = None,
    *,
    config_file: Optional[str] = None,
    document: Optional[dict[str, Any]] = None,
    name: str = "pimcore",
    **kwargs: Any,
) -> ThreadedPimcore:
    """Start a broker in a new thread and return its handle once it is up
    (listening, if it listens).  Settings as :func:`pimcore.embed.open_pimcore`
    (``settings``, or ``config_file``/``document``/overrides, listening nowhere
    unless ``listen`` says so); ``store=``/``authenticate=`` are passed on,
    and so is ``content_filter=`` when it is a function (a string is the
    configuration's ``"module:function"``).  Hooks run in the broker's
    thread: a plain one must not block (and any blocking method of this
    handle raises WouldDeadlock there), an ``async def`` one is trio code.
    Call :meth:`ThreadedPimcore.close` when done.

    Raises, in the calling thread and unwrapped from trio's exception groups,
    what the broker's start-up raised: ConfigError, StoreError, OSError (a
    listener cannot bind); BrokerAlreadyRunning when a broker of this process
    already uses the data directory's LMDB store (not for a broker on the
    ``store.url`` Redis store, or on a ``store=`` passed in: those share a
    data directory)."""
    passed: dict[str, Any] = {k: kwargs.pop(k) for k in ("store", "authenticate") if k in kwargs}
    hook = kwargs.get("content_filter")
    if hook is not None and not isinstance(hook, str):  # a str is the configuration's "module:function"
        if not callable(hook):
            raise ConfigError("content_filter must be a function f(user, conv, payload) -> None | reason "
                              f"(plain or async def) or a 'module:function' string, not {hook!r:.80}")
        passed["content_filter"] = kwargs.pop("content_filter")
    if settings is None:
        # Listeners only where the host says (load_settings' embedded rule).
        settings = load_settings(config_file, document=document, embedded=True, **kwargs)
    elif config_file is not None or document is not None or kwargs:
        raise TypeError("pass either settings or config_file/document/overrides, not both")
    store_dir = None
    if passed.get("store") is None and settings.store is None:
        # LMDB in <data_dir>/store, one broker per store (a broker on the
        # store.url Redis store opens none: brokers of one process share a
        # data directory then, as pimcore serve's and open_pimcore's do).
        store_dir = os.path.realpath(Path(settings.data_dir) / "store")
        with _running_lock:
            if store_dir in _running_dirs:
                raise BrokerAlreadyRunning(
                    f"a broker of this process already runs on {str(settings.data_dir)!r} (its LMDB store,"
                    " <data_dir>/store, has one broker at a time): close it first, or give this one another data_dir")
            _running_dirs.add(store_dir)
    im = ThreadedPimcore()
    im._store_dir = store_dir
    try:
        im._start(settings, passed, name)
    except BaseException:
        with _running_lock:
            _running_dirs.discard(store_dir or "")
        raise
    return im
