"""An in-process driver for the sans-IO broker, for tests.

Frames go in through the real codec (``receive_data`` with encoded bytes), so
every core test also exercises the active codec backend.  The harness plays
the host: it runs store requests, answers the authentication and content
hooks, and delivers timer events when a test advances the clock.

Two ways of running store requests (``driver``):

* ``"inline"`` -- each request runs on the store the moment the core emits
  it, as the served LMDB broker does;
* ``"latency"`` -- every request goes through
  :class:`pimcore.testing.LatencyStore` (the asynchronous store contract with
  a random delay per request, under trio's autojump clock), so reads complete
  out of order and long after the event that caused them.  Each harness call
  returns once everything it set off has settled.

``DRIVER`` is the default for harnesses that do not name one; the core test
modules run every test under both (the ``store_driver`` fixture).

Writes wait in ``held`` while ``hold_commits`` is set, until the test
releases them -- that is how tests observe that no SendAck leaves before the
batch is durable.  ``hold_hooks`` does the same for hook requests
(Authenticate, CheckContent): they wait in ``held_hooks`` until answered
with :meth:`answer_hooks`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import pytest
import trio
import trio.testing

from pimcore import frames as F
from pimcore.codec import Decoder, encode_frame
from pimcore.core import (
    AdminDone,
    PostDone,
    Authenticate,
    Broker,
    BrokerConfig,
    CheckContent,
    CloseConnection,
    DeviceOffline,
    DeviceOnline,
    Identity,
    PauseReading,
    ResumeReading,
    SendData,
    StoreRequest,
    TypingElsewhere,
    PushOverMaxFrame,
)
from pimcore.errors import AuthError, StoreError
from pimcore.store import GroupChanged, Store
from pimcore.testing.latency import LatencyStore

T0 = 1_700_000_000_000_000  # µs

DRIVER = "inline"


@pytest.fixture(params=["inline", "latency"])
def store_driver(request):
    """Run the test once with inline store requests and once through the
    latency store (reads out of order)."""
    global DRIVER
    DRIVER = request.param
    yield request.param
    DRIVER = "inline"


@pytest.fixture(name="store", params=["memory", "lmdb"])
def memory_or_lmdb_store(request, tmp_path):
    """A test module that imports this has a ``store`` fixture: the test
    runs over a MemoryStore and over an LmdbStore (durability "os")."""
    from pimcore.store import LmdbStore, MemoryStore

    s = MemoryStore() if request.param == "memory" else LmdbStore(str(tmp_path / "db"), durability="os")
    yield s
    s.close()


def token_auth(token: bytes, now: int) -> Identity:
    """Test tokens: ``user`` or ``user/device``; ``expired:...`` is refused."""
    text = token.decode("utf-8", "replace")
    if not text or text.startswith("expired:") or text == "forged":
        raise AuthError(f"token refused: {text!r}")
    if text.startswith("issued:"):  # issued:<µs>:user[/device] -- a token with an issue time
        _, at, rest = text.split(":", 2)
        user, _, device = rest.partition("/")
        return Identity(user, device or None, issued_at=int(at))
    if text.startswith("until:"):  # until:<µs>:user -- a token that expires
        _, expires, user = text.split(":", 2)
        return Identity(user, expires=int(expires))
    if "/" in text:
        user, device = text.split("/", 1)
        return Identity(user, device)
    return Identity(text)


class Harness:
    def __init__(self, store: Store, config: Optional[BrokerConfig] = None, *, driver: Optional[str] = None, seed: int = 0, **kw) -> None:
        self.store = store
        kw.setdefault("node_id", store.node_id())
        kw.setdefault("last_server_time", store.last_server_time())
        kw.setdefault("epoch", store.epoch())
        kw.setdefault("trusted_epochs", store.epochs())
        # (dedupe_window 0 by default here: the harness's clock moves µs at a
        # time, and its retention tests trim what was just stored.)
        self.broker = Broker(config or BrokerConfig(dedupe_window=0), **kw)
        self.driver = driver or DRIVER
        if self.driver not in ("inline", "latency"):
            raise ValueError(f"unknown driver {self.driver!r}")
        self.latency = LatencyStore(store, seed=seed) if self.driver == "latency" else None
        self.now = T0
        self.frames: dict[int, list] = defaultdict(list)
        self.closed: dict[int, CloseConnection] = {}
        self.paused: set[int] = set()  # connections the core asked not to read
        # Connections whose client does not read: their bytes are not
        # reported written (Broker.data_sent) until take_outbound().
        self.stalled: set[int] = set()
        self.unsent: dict[int, list[bytes]] = defaultdict(list)
        self._sent: dict[int, int] = defaultdict(int)  # written, to report
        self._reporting = False
        # What each connection received, decoded as a client would (zstd
        # after a LoginAck that granted it).
        self._decoders: dict[int, Decoder] = {}
        self.hold_commits = False
        self.fail_commits = False
        self.fail_reads = False
        self.held: list[StoreRequest] = []
        self.commits: list[StoreRequest] = []
        self.reads: list[StoreRequest] = []
        self.hold_hooks = False
        self.held_hooks: list = []
        self.admin: dict[int, object] = {}
        # DeviceOnline / DeviceOffline in order; ``online`` is checked to pair
        # them: one offline per online, for the same conn, user and device.
        self.presence: list = []
        self.online: dict[int, DeviceOnline] = {}
        self.over_max_frame: list[PushOverMaxFrame] = []
        self.elsewhere: list[TypingElsewhere] = []  # Typing for the other nodes (Broker.relay_elsewhere)
        self._next_conn = 1
        self._next_ref = 1
        self._local = defaultdict(int)
        self._queued: list[StoreRequest] = []
        self._nursery: Optional[trio.Nursery] = None

    # -- plumbing ---------------------------------------------------------

    def run(self, cmds) -> None:
        for cmd in cmds:
            if isinstance(cmd, SendData):
                if cmd.conn in self.stalled:
                    self.unsent[cmd.conn].append(cmd.data)  # held, as a host would
                else:
                    self._received(cmd.conn, cmd.data)
                    self._sent[cmd.conn] += len(cmd.data)
            elif isinstance(cmd, CloseConnection):
                self.closed[cmd.conn] = cmd
                if cmd.data:
                    close = Decoder(1 << 20)
                    close.feed(cmd.data)
                    frame = close.next_frame()
                    assert frame == F.Close(cmd.code, cmd.reason) and close.next_frame() is None, frame
            elif isinstance(cmd, PauseReading):
                self.paused.add(cmd.conn)
            elif isinstance(cmd, ResumeReading):
                self.paused.discard(cmd.conn)
            elif isinstance(cmd, StoreRequest):
                if cmd.write:
                    self.commits.append(cmd)
                    if self.hold_commits:
                        self.held.append(cmd)
                        continue
                else:
                    self.reads.append(cmd)
                self._execute(cmd)
            elif isinstance(cmd, (Authenticate, CheckContent)):
                if self.hold_hooks:
                    self.held_hooks.append(cmd)
                else:
                    self._answer(cmd)
            elif isinstance(cmd, AdminDone):
                self.admin[cmd.ref] = cmd.result
            elif isinstance(cmd, PostDone):
                self.admin[cmd.ref] = cmd
            elif isinstance(cmd, DeviceOnline):
                assert cmd.conn not in self.online, cmd
                self.online[cmd.conn] = cmd
                self.presence.append(cmd)
            elif isinstance(cmd, DeviceOffline):
                on = self.online.pop(cmd.conn, None)
                assert on is not None and (on.user, on.device) == (cmd.user, cmd.device), (on, cmd)
                self.presence.append(cmd)
            elif isinstance(cmd, TypingElsewhere):
                self.elsewhere.append(cmd)
            elif isinstance(cmd, PushOverMaxFrame):
                self.over_max_frame.append(cmd)
            else:  # pragma: no cover
                raise AssertionError(f"unknown command {cmd!r}")
        self._settle()
        if not self._reporting:
            # Tell the core what was written, in a loop (what that sets off
            # is reported by this loop too, not by nested calls).
            self._reporting = True
            try:
                while self._sent:
                    conn, n = self._sent.popitem()
                    self.run(self.broker.data_sent(conn, n, self.now))
            finally:
                self._reporting = False

    def take_outbound(self, conn: int) -> None:
        """The stalled client of ``conn`` reads again: everything is written."""
        self.stalled.discard(conn)
        data = b"".join(self.unsent.pop(conn, []))
        if data:
            self._received(conn, data)
            self._sent[conn] += len(data)
            self.run([])

    def _received(self, conn: int, data: bytes) -> None:
        dec = self._decoders.get(conn)
        if dec is None:
            dec = self._decoders[conn] = Decoder(1 << 30)
        dec.feed(data)
        while (frame := dec.next_frame()) is not None:
            self.frames[conn].append(frame)
            if type(frame) is F.LoginAck and frame.caps & F.CAP_ZSTD:
                from pimcore.compress import FrameDecompressor

                dec.enable_decompression(FrameDecompressor())

    def _answer(self, cmd, reason=None, identity=None) -> None:
        if isinstance(cmd, Authenticate):
            if identity is None:
                try:
                    identity = token_auth(cmd.token, cmd.now)
                except AuthError as exc:
                    identity = exc
            self.run(self.broker.auth_completed(cmd.request_id, identity, self.now))
        else:
            if reason is None:
                hook = self.broker.config.content_filter
                reason = hook(cmd.user, cmd.conv, cmd.payload) if hook is not None else None
            self.run(self.broker.content_checked(cmd.request_id, reason, self.now))

    def answer_hooks(self, which=None, **kw) -> None:
        """Answer held hook requests (all, or those ``which(cmd)`` picks), as
        the harness would have; ``reason=``/``identity=`` override."""
        keep, go = [], []
        for cmd in self.held_hooks:
            (go if which is None or which(cmd) else keep).append(cmd)
        self.held_hooks = keep
        for cmd in go:
            self._answer(cmd, **kw)

    def _execute(self, cmd: StoreRequest) -> None:
        if self.latency is not None:
            if self._nursery is not None:
                self._nursery.start_soon(self._execute_async, cmd)
            else:
                self._queued.append(cmd)
            return
        try:
            if self.fail_commits and cmd.write or self.fail_reads and not cmd.write:
                raise StoreError("disk on fire")
            results = self.store.execute(cmd)
        except StoreError as exc:
            self.run(self.broker.store_failed(cmd.request_id, exc, self.now))
        else:
            self.run(self.broker.store_completed(cmd.request_id, results, self.now))

    async def _execute_async(self, cmd: StoreRequest) -> None:
        assert self.latency is not None
        self.latency.fail_writes, self.latency.fail_reads = self.fail_commits, self.fail_reads
        try:
            results = await self.latency.execute(cmd)
        except StoreError as exc:
            self.run(self.broker.store_failed(cmd.request_id, exc, self.now))
        else:
            self.run(self.broker.store_completed(cmd.request_id, results, self.now))

    def _settle(self) -> None:
        """Latency driver: run the queued requests (and all they set off)
        until nothing is left, under a mock clock (no real waiting)."""
        if self._nursery is not None or not self._queued:
            return

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while self._queued:
                    nursery.start_soon(self._execute_async, self._queued.pop(0))

        try:
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        finally:
            self._nursery = None

    def commit(self, cmd: StoreRequest) -> None:
        self._execute(cmd)
        self._settle()

    def release(self) -> None:
        """Commit every held batch (and whatever they trigger)."""
        hold, self.hold_commits = self.hold_commits, False
        while self.held:
            self.commit(self.held.pop(0))
        self.hold_commits = hold

    def advance(self, us: int) -> None:
        self.now += us
        self.run(self.broker.handle_timer(self.now))

    # -- control plane ------------------------------------------------------

    def _admin(self, method, *args):
        ref = self._next_ref
        self._next_ref += 1
        self.run(method(*args, self.now, ref=ref))
        result = self.admin.pop(ref, None)
        if self.hold_commits and result is None:
            return None
        if not isinstance(result, GroupChanged):
            raise ValueError(f"group admin refused: {result!r}")
        return result

    def create_group(self, conv: str, members) -> GroupChanged:
        """Create a group through the broker (an op of the next batch)."""
        return self._admin(self.broker.create_group, conv, members)

    def add_members(self, conv: str, users) -> GroupChanged:
        return self._admin(self.broker.add_members, conv, users)

    def remove_members(self, conv: str, users) -> GroupChanged:
        return self._admin(self.broker.remove_members, conv, users)

    def host_call(self, method, *args, **kw):
        """A host call answered by ref (post -> PostDone, revoke -> the
        store's result); None while commits are held."""
        ref = self._next_ref
        self._next_ref += 1
        self.run(method(*args, self.now, ref=ref, **kw))
        return self.admin.pop(ref, None)

    def post(self, conv: str, payload: bytes, **kw):
        return self.host_call(self.broker.post, conv, payload, **kw)

    def revoke(self, user: str, device, before: int):
        return self.host_call(self.broker.revoke, user, device, before)

    def kick(self, user: str, device=None, reason: str = "") -> None:
        self.run(self.broker.kick(user, device, self.now, reason))

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

    def login(
        self, user: str, device: str, position: int = 0, token: Optional[bytes] = None, epoch: Optional[bytes] = None,
        sent: int = 0, caps: int = 0,
    ) -> int:
        """Log ``device`` in with resume cursor ``position`` from ``epoch``
        (default: the broker's, as a client that was here before), the
        position of its own sends ``sent`` (Login.sent) and ``caps``."""
        conn = self.open()
        epoch = self.broker.epoch if epoch is None else epoch
        self.feed(conn, F.Login(token if token is not None else user.encode(), device, self.now, position, caps, epoch, sent))
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
