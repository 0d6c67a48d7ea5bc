"""Several brokers in this process playing ``pimcore serve`` nodes over one
Redis Cluster namespace (issue 16): each an :func:`open_pimcore` handle over
its own :class:`RedisStore`, listening on loopback; and SDK logins to them.
Shared by the relay, typing/presence and large-group tests."""

from __future__ import annotations

import os
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

from pimcore.client import ClientConfig, open_client
from pimcore.embed import open_pimcore

from _net import SECRET

CFG = ClientConfig(ack_timeout=2.0, send_timeout=30.0, connect_timeout=10.0, backoff_initial=0.05, backoff_max=0.5)


@asynccontextmanager
async def two_nodes(cluster: Any, tmp_path: Any, *, events: bool = False, per_node: Any = ({}, {}),
                    **store: Any) -> AsyncIterator[list[Any]]:
    """Two brokers sharing one fresh namespace; ``store``: RedisStore
    arguments (``read_fanout_above``...); ``events``: host events on;
    ``per_node``: each node's own open_pimcore arguments."""
    from pimcore.store.redis import RedisStore

    ns = "t" + os.urandom(6).hex()
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(2):
            s = await stack.enter_async_context(RedisStore.connect(cluster.url, namespace=ns, **store))
            nodes.append(await stack.enter_async_context(open_pimcore(
                data_dir=tmp_path / f"node{i}", listen=["tcp://127.0.0.1:0"], store=s,
                secret=SECRET.decode(), events=events, **per_node[i])))
        yield nodes


async def login(stack: AsyncExitStack, node: Any, user: str, device: str = "phone", config: ClientConfig = CFG) -> Any:
    """An SDK client of ``user``/``device`` on ``node``, connected."""
    c = await stack.enter_async_context(open_client(node.urls[0], node.issue_token(user), device, config=config))
    await c.wait_connected()
    return c
