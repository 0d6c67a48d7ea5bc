"""The poller (BrokerServer._poller) when the probe -- its level-triggered
epoll of the plain-TCP sockets -- refuses a socket: ``epoll_ctl(ADD)`` fails
with ENOSPC once the user's ``fs.epoll.max_user_watches`` are taken (each
plain-TCP connection holds two: trio's and the probe's), or ENOMEM.

Since the poller, the probe is what gets a plain-TCP connection read after
its first read, not a hint for inline commits: a socket that is not in it is
never read again.  Simulated here by wrapping the probe (a C object whose
methods cannot be patched).
"""

from __future__ import annotations

import errno
import os

import trio

from pimcore import frames as F
from pimcore.store import LmdbStore, MemoryStore, direct_conversation

from _net import RawConn, serving

AB = direct_conversation("alice", "bob")


class _FullProbe:
    """The server's probe, whose ``register`` fails with ENOSPC once ``full``."""

    def __init__(self, real) -> None:
        self.real = real
        self.full = False

    def fileno(self) -> int:
        return self.real.fileno()

    def poll(self, *args):
        return self.real.poll(*args)

    def unregister(self, fd: int) -> None:
        self.real.unregister(fd)

    def close(self) -> None:  # (run() closes the probe when it ends)
        self.real.close()

    def register(self, fd: int, mask: int) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real.register(fd, mask)


async def test_a_resumed_connection_whose_socket_cannot_rejoin_the_probe_is_not_left_unread(tmp_path):
    """(Failed before the fix: review of the poller.)  A paused connection
    leaves the probe (_read_loop) and rejoins it when resumed (_reprobe),
    which swallowed every OSError ("registered already").  When the rejoin
    failed, the reader parked anyway: nobody watches the socket, the rest of what the client
    sent is never read, and nothing says so -- the connection just stops
    (here its 7th SendReq is never acked; the client waits until its
    send_timeout, the broker until idle_timeout).  Expected: the connection
    is read by its own task (as TLS is), or closed -- not left unread."""
    from test_inline_commit import _paused_greedy
    from test_outbound import fill

    store = LmdbStore(str(tmp_path / "db"), durability="os")
    try:
        fill(store, AB, 200, 16 * 1024)
        with trio.fail_after(30):
            async with serving(store) as srv:
                probe = srv._ready_probe = _FullProbe(srv._ready_probe)
                # Paused as in test_inline_commit: its replies fill its outbound
                # side, then 336 KB more of SendReqs (more than _PAUSE_BYTES).
                _, greedy = await _paused_greedy(srv)
                (peer,) = srv._peers.values()
                assert peer.resume is not None  # paused: out of the probe
                probe.full = True  # the watches ran out meanwhile
                acks: list[int] = []
                with trio.move_on_after(5):
                    while len(acks) < 7:
                        f = await greedy.next()
                        if f is None:
                            break  # closed: acceptable too
                        if isinstance(f, F.SendAck):
                            acks.append(f.local_id)
                closed = f is None or peer.state.name != "OPEN"
                assert acks == list(range(1, 8)) or closed, (acks, peer.state.name, peer.parked is not None)
                if not closed:  # read by its own task now: counted opaque while it lives
                    assert srv._opaque_peers == 1
                await greedy.aclose()
                while srv._peers:
                    await trio.sleep(0.01)
                assert srv._opaque_peers == 0
    finally:
        store.close()


async def test_a_connection_the_probe_cannot_take_does_not_end_the_broker():
    """(Failed before 4f8b785.) _serve_peer registered every plain-TCP
    socket with the probe unguarded; ENOSPC (the user's epoll watches all
    taken: the default is 4 % of RAM at about 200 bytes a watch, some
    100,000 on a 512 MiB host, so about 50,000 connections; anyone can open
    those) escaped the connection's task and ended the whole broker -- every
    other connection dropped -- at one more accept.
    (trio's own registration failing instead only ends that connection:
    _read_loop catches the OSError.)  Expected: that one connection is read
    by its own task (counted opaque, as TLS is) or refused; the others are
    served on."""
    with trio.fail_after(20):
        async with serving(MemoryStore()) as srv:
            probe = srv._ready_probe = _FullProbe(srv._ready_probe)
            port = srv.endpoints[0].port
            ok = await RawConn.open(port)
            await ok.login("alice", "ok")
            probe.full = True
            late = await RawConn.open(port)
            await trio.sleep(0.2)
            await ok.send(F.SendReq(1, AB, 0, b"still served?"))
            ack = await ok.until(F.SendAck)
            assert ack.local_id == 1
            # ... and the late one too (its own task reads it: a first read, then more)
            await late.login("alice", "late")
            for i in (1, 2):
                await late.send(F.SendReq(i, AB, 0, b"late"))
                assert (await late.until(F.SendAck)).local_id == i
            await late.aclose()
            await ok.aclose()
