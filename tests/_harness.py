"""A synchronous, in-process driver for the sans-IO broker, for tests.

Frames go in through the real codec (``receive_data`` with encoded bytes), so
every core test also exercises the active codec backend.  Commits are run on
the store immediately unless ``hold_commits`` is set, in which case they wait
in ``held`` until the test releases them -- that is how tests observe that no
SendAck leaves before the batch is durable.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from pimcore import frames as F
from pimcore.codec import encode_frame
from pimcore.core import Broker, BrokerConfig, CloseConnection, Commit, Identity, SendFrame
from pimcore.errors import AuthError, StoreError
from pimcore.store import Store

T0 = 1_700_000_000_000_000  # µs


def token_auth(token: bytes, now: int) -> Identity:
    """Test tokens: ``user`` or ``user/device``; ``expired:...`` is refused."""
    text = token.decode("utf-8", "replace")
    if not text or text.startswith("expired:") or text == "forged":
        raise AuthError(f"token refused: {text!r}")
    if text.startswith("until:"):  # until:<µs>:user -- a token that expires
        _, expires, user = text.split(":", 2)
        return Identity(user, expires=int(expires))
    if "/" in text:
        user, device = text.split("/", 1)
        return Identity(user, device)
    return Identity(text)


class Harness:
    def __init__(self, store: Store, config: Optional[BrokerConfig] = None, **kw) -> None:
        self.store = store
        self.broker = Broker(store, token_auth, config or BrokerConfig(), **kw)
        self.now = T0
        self.frames: dict[int, list] = defaultdict(list)
        self.closed: dict[int, CloseConnection] = {}
        self.hold_commits = False
        self.fail_commits = False
        self.held: list[Commit] = []
        self.commits: list[Commit] = []
        self._next_conn = 1
        self._local = defaultdict(int)

    # -- plumbing ---------------------------------------------------------

    def run(self, cmds) -> None:
        for cmd in cmds:
            if isinstance(cmd, SendFrame):
                self.frames[cmd.conn].append(cmd.frame)
            elif isinstance(cmd, CloseConnection):
                self.closed[cmd.conn] = cmd
            elif isinstance(cmd, Commit):
                self.commits.append(cmd)
                if self.hold_commits:
                    self.held.append(cmd)
                else:
                    self.commit(cmd)
            else:  # pragma: no cover
                raise AssertionError(f"unknown command {cmd!r}")

    def commit(self, cmd: Commit) -> None:
        try:
            if self.fail_commits:
                raise StoreError("disk on fire")
            results = self.store.commit(cmd.batch)
        except StoreError as exc:
            self.run(self.broker.batch_failed(cmd.batch.batch_id, exc, self.now))
        else:
            self.run(self.broker.batch_committed(cmd.batch.batch_id, results, self.now))

    def release(self) -> None:
        """Commit every held batch (and whatever they trigger)."""
        hold, self.hold_commits = self.hold_commits, False
        while self.held:
            self.commit(self.held.pop(0))
        self.hold_commits = hold

    def advance(self, us: int) -> None:
        self.now += us
        self.run(self.broker.tick(self.now))

    # -- a client's view ----------------------------------------------------

    def open(self) -> int:
        conn = self._next_conn
        self._next_conn += 1
        self.run(self.broker.connection_made(conn, self.now))
        return conn

    def feed(self, conn: int, frame) -> None:
        self.run(self.broker.receive_data(conn, encode_frame(frame), self.now))

    def feed_bytes(self, conn: int, data: bytes) -> None:
        self.run(self.broker.receive_data(conn, data, self.now))

    def login(self, user: str, device: str, position: int = 0, token: Optional[bytes] = None) -> int:
        conn = self.open()
        self.feed(conn, F.Login(token if token is not None else user.encode(), device, self.now, position, 0))
        return conn

    def lose(self, conn: int) -> None:
        self.run(self.broker.connection_lost(conn, self.now))

    def send(self, conn: int, conv: str, payload: bytes, local_id: Optional[int] = None, client_time: Optional[int] = None) -> int:
        if local_id is None:
            self._local[conn] += 1
            local_id = self._local[conn]
        self.feed(conn, F.SendReq(local_id, conv, self.now if client_time is None else client_time, payload))
        return local_id

    def take(self, conn: int, kind=None) -> list:
        """Pop the frames received on ``conn`` (only those of ``kind`` if given)."""
        got = self.frames[conn]
        if kind is None:
            self.frames[conn] = []
            return got
        keep = [f for f in got if not isinstance(f, kind)]
        mine = [f for f in got if isinstance(f, kind)]
        self.frames[conn] = keep
        return mine

    def acks(self, conn: int) -> list[F.SendAck]:
        return self.take(conn, F.SendAck)

    def pushed(self, conn: int) -> list[F.Message]:
        return [m for p in self.take(conn, F.Push) for m in p.messages]

    def last_upto(self, conn: int) -> int:
        pushes = [f for f in self.frames[conn] if isinstance(f, F.Push)]
        return pushes[-1].position if pushes else 0

    def drain_device(self, conn: int) -> list[F.Message]:
        """Take and ack everything pushed to ``conn`` until nothing more comes."""
        got: list[F.Message] = []
        while True:
            pushes = self.take(conn, F.Push)
            if not pushes:
                return got
            for p in pushes:
                got.extend(p.messages)
            self.feed(conn, F.PushAck(pushes[-1].position))
