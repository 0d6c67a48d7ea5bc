"""Embedding pimcore in an asyncio program (FastAPI, aiohttp, ...).

:func:`open_pimcore` runs the broker -- the same :mod:`pimcore.embed`
handle a trio host gets -- inside the running asyncio loop, with trio's
*guest mode* (``trio.lowlevel.start_guest_run``): trio's scheduler is
driven by asyncio callbacks on the same thread, so no thread is added and
the asyncio app keeps running its own tasks.  The returned
:class:`AsyncPimcore` has the methods of :class:`pimcore.embed.Pimcore`
with the same arguments, results and errors: its coroutines are asyncio
coroutines here, its plain functions (``kick``, ``issue_token``,
``online_devices``, ``statistics``, ``events``) and properties
(``events_enabled``, ``urls``...) stay plain::

    async def main():
        async with pimcore.asyncio.open_pimcore(data_dir="chat-data", listen=["tcp://127.0.0.1:7400"]) as im:
            await im.create_group("team", ["alice", "bob"])
            ...

    asyncio.run(main())

Call the handle from the event loop that opened it (another thread:
``asyncio.run_coroutine_threadsafe(im.post(...), loop)``); a coroutine
method awaited in another loop raises RuntimeError before it does anything,
and so does a plain method (``kick``, ``online_devices``, ``statistics``,
``events``) called in another thread than the loop's.  ``issue_token``
(signing only) and the properties (fixed once started) work from anywhere.

How a call crosses over: the asyncio side asks trio (through the run's
TrioToken, which may be used from outside the run) to start the handle's
coroutine in a nursery of the guest run; its outcome comes back through the
loop's ``call_soon_threadsafe`` into an asyncio future.  Only one guest run
may exist per thread, so one broker per asyncio loop.

When the ``async with`` block exits, every call still running there (a
``next_events`` waiting for events included) raises :class:`BrokerStopped`
-- it may or may not have taken effect, as when a trio caller is cancelled
-- and so does every call made after it.  Cancelling an asyncio call
cancels its trio task (each runs in a cancel scope of its own).
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Generator, Iterable, Optional, TypeVar

import trio

from . import embed
from .embed import SYSTEM, Conversation, HostEvent, Pimcore, Posted, ReadPositions, RequestRefused
from .threaded import BrokerStopped

__all__ = [
    "open_pimcore", "AsyncPimcore", "AsyncEventStream", "BrokerStopped",
    "RequestRefused", "Conversation", "Posted", "HostEvent", "SYSTEM",
]

T = TypeVar("T")


def _settle(fut: "asyncio.Future[Any]", ok: bool, value: Any) -> None:
    if fut.done():  # the asyncio caller was cancelled meanwhile
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class _Done:
    """An awaitable that is already done (its result None)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # (a generator: awaiting it returns at once)


_DONE = _Done()


class AsyncPimcore:
    """The :class:`pimcore.embed.Pimcore` handle, for asyncio code.  Raises
    what it raises, plus :class:`BrokerStopped` for a call still running
    when the broker stops and for every call after that."""

    def __init__(self, handle: Pimcore, loop: asyncio.AbstractEventLoop, token: trio.lowlevel.TrioToken, nursery: trio.Nursery) -> None:
        self.handle = handle
        self._loop = loop
        #: The loop's thread, which the guest run shares (made in it).
        self._thread = threading.get_ident()
        self._token = token
        self._nursery = nursery
        #: Set when the ``async with`` block exits, or the guest run ended.
        self._closed = False
        #: Why the guest run ended, if with an error (the cause of BrokerStopped).
        self._error: Optional[BaseException] = None

    def _stopped(self, what: str = "the broker was closed") -> BrokerStopped:
        exc = BrokerStopped(what)
        exc.__cause__ = self._error
        return exc

    def _check_loop(self) -> None:
        """RuntimeError unless called from the broker's own event loop: the
        answer of a call comes back through a future of that loop, which
        another loop cannot await -- so refuse before anything is handed to
        the broker (the call would take effect, and its caller see only an
        error)."""
        try:
            running: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise RuntimeError("this pimcore.asyncio handle belongs to another event loop (the one that opened it):"
                               " call it from that loop (asyncio.run_coroutine_threadsafe(..., loop) from another"
                               " thread), or use pimcore.threaded from threads; nothing was done")

    def _check_thread(self, what: str) -> None:
        """For a plain method: RuntimeError unless called in the loop's thread.  The guest run lives in that
        thread and these work on its state directly, without crossing over:
        kick() from another thread closed the sessions' bookkeeping, then
        failed waking a trio task it is no run of (AttributeError:
        'RunContext' object has no attribute 'runner'), and the client was
        never told (a new user's trial); the reads raced the loop.  Checked
        before anything is done."""
        if threading.get_ident() != self._thread:
            raise RuntimeError(f"this pimcore.asyncio handle's {what}() was called from another thread than its event"
                               " loop's: call it in that loop (loop.call_soon_threadsafe(...), or an async def wrapper"
                               " with asyncio.run_coroutine_threadsafe(..., loop)), or use pimcore.threaded from"
                               " threads; nothing was done")

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise self._stopped()
        self._check_loop()
        fut: asyncio.Future[T] = self._loop.create_future()
        loop = self._loop
        # Cancelled when the asyncio caller is: its trio task ends too.
        scope = trio.CancelScope()

        async def run_in_trio() -> None:
            ok: bool = False
            value: Any = None
            try:
                with scope:
                    value = await fn(*args, **kwargs)
                    ok = True
            except Exception as exc:  # noqa: BLE001 - handed to the asyncio caller
                value = exc
            finally:
                # Cancelled (the broker is stopping) or another BaseException:
                # the caller must not wait for ever.
                if not ok and value is None:
                    value = self._stopped("the broker stopped during the call")
                loop.call_soon_threadsafe(_settle, fut, ok, value)

        def start() -> None:  # in trio; must not raise (that would crash the run)
            if fut.done():  # the asyncio caller was cancelled meanwhile
                return
            try:
                self._nursery.start_soon(run_in_trio)
            except RuntimeError:  # the calls nursery is closed: the broker is stopping
                loop.call_soon_threadsafe(_settle, fut, False, self._stopped())

        try:
            self._token.run_sync_soon(start)
        except trio.RunFinishedError:
            raise self._stopped() from self._error
        try:
            return await fut
        except asyncio.CancelledError:
            # After `start` (FIFO): a call not started yet never starts.
            try:
                self._token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass
            raise

    # Plain reads of in-memory state run directly: guest mode is the same
    # thread, and these never await.
    @property
    def urls(self) -> list[str]:
        return self.handle.urls

    @property
    def epoch(self) -> bytes:
        return self.handle.epoch

    @property
    def store_id(self) -> str:
        return self.handle.store_id

    @property
    def http_url(self) -> Optional[str]:
        return self.handle.http_url

    @property
    def webhooks(self) -> Any:
        """The event webhook sender (counters), None without ``[webhooks]``."""
        return self.handle.webhooks

    def statistics(self) -> Any:
        self._check_thread("statistics")
        return self.handle.statistics()

    def issue_token(self, user: str, device: Optional[str] = None, *, ttl: int = 3600) -> str:
        # (Any thread, as the threaded handle's: signing changes nothing, and
        # the revocations it reads are one dict lookup.  A sync web framework
        # endpoint -- a worker thread -- issues tokens.)
        return self.handle.issue_token(user, device, ttl=ttl)

    def online_devices(self, user: str) -> list[str]:
        self._check_thread("online_devices")
        return self.handle.online_devices(user)

    @property
    def events_enabled(self) -> bool:
        """Does the broker record host events (``[server] events``)?"""
        return self.handle.events_enabled

    def kick(self, user: str, device: Optional[str] = None, reason: str = "") -> "_Done":
        """As :meth:`pimcore.embed.Pimcore.kick`: a plain call, done when it
        returns.  Safe from asyncio code: in guest mode trio's run lives on
        this thread, and kick only uses trio's synchronous calls (which wake
        the guest run).  Raises BrokerStopped after the broker stopped, and
        RuntimeError (nobody kicked) from another thread than the loop's.
        Returns an awaitable that is already done, so that code written when
        kick was a coroutine (``await im.kick(...)``) keeps working."""
        if self._closed:
            raise self._stopped()
        self._check_thread("kick")
        self.handle.kick(user, device, reason)
        return _DONE

    async def post(self, conv: str, payload: bytes, **kwargs: Any) -> Posted:
        return await self._call(self.handle.post, conv, payload, **kwargs)

    async def post_many(self, posts: list[dict[str, Any]]) -> list[Any]:
        return await self._call(self.handle.post_many, posts)

    async def recall(self, conv: str, seq: int, **kwargs: Any) -> Posted:
        return await self._call(self.handle.recall, conv, seq, **kwargs)

    async def edit(self, conv: str, seq: int, payload: bytes, **kwargs: Any) -> Posted:
        return await self._call(self.handle.edit, conv, seq, payload, **kwargs)

    async def delete_for(self, user: str, conv: str, seq: int, **kwargs: Any) -> Posted:
        return await self._call(self.handle.delete_for, user, conv, seq, **kwargs)

    async def revoke(self, user: str, device: Optional[str] = None, **kwargs: Any) -> int:
        return await self._call(self.handle.revoke, user, device, **kwargs)

    async def set_retention(self, conv: str, **kwargs: Any) -> Any:
        return await self._call(self.handle.set_retention, conv, **kwargs)

    async def retention(self, conv: str) -> Any:
        return await self._call(self.handle.retention, conv)

    async def purge_conversation(self, conv: str) -> Any:
        return await self._call(self.handle.purge_conversation, conv)

    async def purge_user(self, user: str) -> Any:
        return await self._call(self.handle.purge_user, user)

    async def create_group(self, conv: str, members: list[str], *, history_visible: bool = False) -> Any:
        visible = embed._history_flag(history_visible)  # checked before crossing over
        return await self._call(self.handle.create_group, conv, members, history_visible=visible)

    async def members(self, conv: str) -> Any:
        return await self._call(self.handle.members, conv)

    async def history_visible(self, conv: str) -> Any:
        return await self._call(self.handle.history_visible, conv)

    async def add_members(self, conv: str, users: list[str]) -> Any:
        return await self._call(self.handle.add_members, conv, embed._some_users(users, "add_members", conv))

    async def remove_members(self, conv: str, users: list[str]) -> Any:
        return await self._call(self.handle.remove_members, conv, embed._some_users(users, "remove_members", conv))

    async def online_anywhere(self, users: Iterable[str]) -> frozenset[str]:
        """As :meth:`pimcore.embed.Pimcore.online_anywhere`."""
        return await self._call(self.handle.online_anywhere, embed._user_ids(users, "users"))

    async def conversations(self, user: str) -> list[Conversation]:
        return await self._call(self.handle.conversations, user)

    async def presence(self, user: str) -> Any:
        return await self._call(self.handle.presence, user)

    async def set_presence_privacy(self, user: str, hide_last_seen: bool) -> bool:
        return await self._call(self.handle.set_presence_privacy, user, hide_last_seen)

    async def unread(self, user: str, conv: Optional[str] = None) -> int:
        return await self._call(self.handle.unread, user, conv)

    async def conversation_list(self, user: str, **kwargs: Any) -> Any:
        return await self._call(self.handle.conversation_list, user, **kwargs)

    async def set_conversation(self, user: str, conv: str, **kwargs: Any) -> Any:
        return await self._call(self.handle.set_conversation, user, conv, **kwargs)

    async def read_positions(self, user: str) -> ReadPositions:
        return await self._call(self.handle.read_positions, user)

    async def history(self, conv: str, user: str, **kwargs: Any) -> list[Any]:
        return await self._call(self.handle.history, conv, user, **kwargs)

    def events(self, consumer: str = "default", *, after: Optional[int] = None, limit: int = 256) -> "AsyncEventStream":
        """As :meth:`pimcore.embed.Pimcore.events`, an asyncio async iterator
        (raises EventsDisabled here, when the broker records no events).
        Checked at the call, as the trio handle's: BrokerStopped after the
        block, ``after`` and ``limit`` (RequestRefused BAD_REQUEST out of
        range, TypeError for no int); the consumer name when iterated.  It
        returned a stream after the block (BrokerStopped only once
        iterated) and took any ``after``/``limit`` until then (a trial)."""
        if self._closed:
            raise self._stopped()
        self._check_thread("events")
        if not self.events_enabled:
            raise embed.EventsDisabled()
        embed._check_page(after, limit)
        return AsyncEventStream(self, consumer, after, limit)

    async def next_events(self, consumer: str = "default", **kwargs: Any) -> tuple[int, list[HostEvent]]:
        return await self._call(self.handle.next_events, consumer, **kwargs)

    async def event_cursor(self, consumer: str = "default") -> tuple[int, int]:
        return await self._call(self.handle.event_cursor, consumer)

    async def ack_events(self, upto: int, consumer: str = "default") -> int:
        return await self._call(self.handle.ack_events, upto, consumer)

    async def delete_consumer(self, consumer: str = "default") -> bool:
        return await self._call(self.handle.delete_consumer, consumer)

    async def event_consumers(self, limit: int = embed.MAX_EVENT_CONSUMERS) -> list[tuple[str, int]]:
        return await self._call(self.handle.event_consumers, limit)

    def consumer_in_use(self, consumer: str) -> bool:
        """As :meth:`pimcore.embed.Pimcore.consumer_in_use` (does not wait)."""
        return self.handle.consumer_in_use(consumer)


class AsyncEventStream:
    """Host events for asyncio code.  Each page is fetched in trio with
    :meth:`pimcore.embed.Pimcore.next_events`, which changes nothing until it
    returns, and an event leaves the stream only when ``__anext__`` returns
    it: an asyncio caller cancelled while waiting loses no event."""

    def __init__(self, api: AsyncPimcore, consumer: str, after: Optional[int], limit: int) -> None:
        self._api = api
        self.consumer = consumer
        api.handle._track_reader(self, consumer)  # a live reader until let go (delete_consumer refuses it)
        self.after = after
        self._limit = limit
        self._buf: list[HostEvent] = []

    def __aiter__(self) -> "AsyncEventStream":
        return self

    async def __anext__(self) -> HostEvent:
        if not self._buf:
            after, events = await self._api.next_events(self.consumer, after=self.after, limit=self._limit)
            self.after = after
            self._buf = events[::-1]
        # The event is consumed only when it is returned: a cancellation at
        # this await (asyncio.wait_for's timeout) leaves it for the next call.
        (ev,) = await self._api._call(embed.fresh_page, self._api.handle, (self._buf[-1],))
        self._buf.pop()
        self.after = ev.id
        return ev


@asynccontextmanager
async def open_pimcore(*args: Any, **kwargs: Any) -> AsyncIterator[AsyncPimcore]:
    """Run a broker inside the running asyncio loop for the duration of the
    block.  Arguments, settings and errors as :func:`pimcore.embed.open_pimcore`
    (raised here, in asyncio).  On exit the broker shuts down gracefully and
    the guest run ends before this returns.  One broker per event loop: a
    second one while the first runs raises RuntimeError."""
    loop = asyncio.get_running_loop()
    if trio.lowlevel.in_trio_run():
        raise RuntimeError(
            "pimcore.asyncio.open_pimcore: trio already runs in this thread (another pimcore.asyncio broker "
            "in this event loop?): one broker per asyncio event loop -- share the first one's handle"
        )
    ready: asyncio.Future[AsyncPimcore] = loop.create_future()
    done: asyncio.Future[None] = loop.create_future()
    stop: list[trio.Event] = []

    async def trio_main() -> None:
        async with embed.open_pimcore(*args, **kwargs) as handle:
            async with trio.open_nursery() as calls:
                stop.append(trio.Event())
                api = AsyncPimcore(handle, loop, trio.lowlevel.current_trio_token(), calls)
                loop.call_soon_threadsafe(_settle, ready, True, api)
                await stop[0].wait()
                calls.cancel_scope.cancel()

    def finished(outcome: Any) -> None:
        # Called by trio when the guest run is over, possibly before `ready`
        # (the broker could not start): the error goes to whoever waits.
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            ready.result()._closed = True
        try:
            outcome.unwrap()
        except BaseException as exc:  # noqa: BLE001
            if ready.done() and not ready.cancelled() and ready.exception() is None:
                ready.result()._error = exc
            _settle(ready, False, exc)
            _settle(done, False, exc)
        else:
            _settle(ready, False, RuntimeError("pimcore stopped before it started"))
            _settle(done, True, None)

    trio.lowlevel.start_guest_run(
        trio_main,
        run_sync_soon_threadsafe=loop.call_soon_threadsafe,
        done_callback=finished,
        host_uses_signal_set_wakeup_fd=True,
    )
    try:
        api = await ready
    except BaseException:
        # The same error ends the guest run: wait for that (and retrieve
        # it, so asyncio does not report it a second time).
        try:
            await asyncio.shield(done)
        except BaseException:  # noqa: BLE001
            pass
        raise
    try:
        yield api
    finally:
        api._closed = True  # calls from now on raise BrokerStopped
        try:
            api._token.run_sync_soon(stop[0].set)
        except trio.RunFinishedError:  # the run ended by itself (an error: `done` has it)
            pass
        await asyncio.shield(done)
