"""A blocking :class:`Store` face on :class:`RedisStore` (an AsyncStore), so
the contract tests of tests/test_store.py run over Redis unchanged: a trio
loop in a thread of its own runs the store; each call is one
``trio.from_thread.run``."""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

import trio

from pimcore.errors import StoreError
from pimcore.store.base import Store, StoreRequest, WriteBatch

from pimcore.store.redis import RedisStore


class BlockingRedisStore(Store):
    def __init__(self, nodes: list[tuple[str, int]], namespace: Optional[str] = None, **kwargs: Any) -> None:
        self.namespace = namespace or "t" + os.urandom(6).hex()
        self._token: Optional[trio.lowlevel.TrioToken] = None
        self._ready = threading.Event()
        self._stop: Optional[trio.Event] = None
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(target=trio.run, args=(self._main, nodes, kwargs), daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error

    async def _main(self, nodes: list[tuple[str, int]], kwargs: dict) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        try:
            async with RedisStore.connect(nodes, namespace=self.namespace, **kwargs) as inner:
                self.inner = inner
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    def _run(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise StoreError("store is closed")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def node_id(self) -> bytes:
        return self._run(self.inner.node_id)

    def epoch(self) -> bytes:
        return self._run(self.inner.epoch)

    def epochs(self) -> tuple[bytes, ...]:
        return self._run(self.inner.epochs)

    def last_server_time(self) -> int:
        return self._run(self.inner.last_server_time)

    def commit(self, batch: WriteBatch) -> tuple:
        return self._run(self.inner.execute, StoreRequest(batch.batch_id, batch.ops, True))

    def execute(self, request: StoreRequest) -> tuple:
        return self._run(self.inner.execute, request)

    def read(self, ops: Any) -> tuple:
        return self._run(self.inner.execute, StoreRequest(0, tuple(ops), False))

    def _read_events(self, op: Any) -> Any:
        return self.read((op,))[0]

    def _read_history(self, op: Any) -> Any:
        return self.read((op,))[0]

    def _read_readers(self, op: Any) -> Any:
        return self.read((op,))[0]

    def deduped(self, sender: str, device: str, local_id: int) -> bool:
        from pimcore.store import ReadDedupe

        return bool(self.read((ReadDedupe(sender, device, local_id),))[0].stored)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)


def _forward(name: str) -> Any:
    def method(self: BlockingRedisStore, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.inner, name)
        return self._run(lambda: fn(*args, **kwargs))

    method.__name__ = name
    return method


for _name in ("conversation_exists", "members", "is_member", "last_seq", "history", "message", "inbox_head",
              "inbox_floor", "inbox_range", "device", "revoked_before", "devices", "read_marker",
              "read_positions", "unread", "spans", "history_visible", "conversations", "hides_last_seen"):
    setattr(BlockingRedisStore, _name, _forward(_name))
BlockingRedisStore.__abstractmethods__ = frozenset()
