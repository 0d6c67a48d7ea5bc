"""``pimcore bench``: the load generator.

What it measures is what pimcore exists for: durable, acknowledged delivery.
Every number comes from the wire, through a real broker process:

* **acked sends/s** -- SendAcks with code OK (each one means "durable");
* **send->SendAck** and **send->delivery** latency histograms (HdrHistogram,
  exact to 3 significant digits; p50/p90/p99/p99.9/max);
* **stored inbox entries/s** -- acked sends times the inboxes each message is
  written to (2 for a 1:1 chat, the group size for a group);
* the broker's **CPU time per acked send** and **peak memory** (read from
  ``/proc/<pid>``), and the generator's own CPU use, with a warning when the
  generator, not the broker, was the bottleneck.

Why it is built this way
------------------------
* **The broker runs in its own process** (``python -m pimcore serve`` on a
  fresh data directory), pinned to one CPU while the generator is pinned to
  the other, so the two never compete for a core.  ``--url`` measures an
  existing broker instead.
* **Raw frames, not the SDK.**  The SDK does much per-message bookkeeping
  (retries, local view, events) that a load generator does not need; here a
  connection keeps ``window`` SendReqs in flight and answers each chunk of
  reads with one write (new SendReqs plus one cumulative PushAck).
* **A generator in C by default.**  ``bench/loadgen.c`` (one thread, epoll,
  nonblocking sockets; built with ``cc`` into ``~/.cache/pimcore`` on first
  use) spends about 1 µs of CPU per message, so it can drive Redis at 250,000
  XADDs/s; the trio generator (one task per connection, the codec) spends
  ~15 µs and stays as the fallback when there is no compiler, and for
  ``--procs`` and ``--zstd``.  The Python side issues the tokens and hands
  the C side a plan (one line per connection).
* **Side by side** (``--compare redis``): the same shape against a
  ``redis-server`` it starts (``appendfsync always``: fsync before each reply,
  like durability sync), XADD through the C generator's RESP mode,
  alternating with the pimcore run for N rounds; medians and ratios.
  ``--compare mosquitto``: the same against a ``mosquitto`` it starts, QoS 1
  PUBLISH/PUBACK through the C generator's MQTT mode, end to end too (a
  subscriber that PUBACKs every message); Mosquitto never fsyncs per ack.
* **What limited the run** is stated: the generator's CPU, the server's CPU
  (one core), fsync wait (the broker's commits -- fsync included, run on its
  event loop -- filled most of the time, the broker mostly off CPU; from its
  exit line), the broker's CPU between flushes (commits filled most of the
  time but the broker ran for most of each: with one message a commit, its
  CPU per round trip), or round trips; with commits, the broker's CPU and
  off-CPU time per commit.
* **Timestamps travel in the payload** (its first 8 bytes are the sender's
  ``CLOCK_MONOTONIC`` in ns), so send->delivery latency is measured at the
  receiver even when it is in another generator process.
* **Samples go into plain arrays** while the clock runs and into the
  histograms afterwards: recording into a histogram costs ~2 us per sample,
  too much inside the measured window.
* **Several generator processes** (``--procs``) for connection counts beyond
  one process's file limit (e.g. 19,000 idle connections with ``--idle``).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Optional, TextIO, TypeVar

import trio

from . import frames as F
from ._util import BaseExceptionGroup, first_leaf
from .codec import Decoder, encode_frame
from .core import Limits, message_overhead
from .errors import CloseCode, ErrorCode

__all__ = ["BenchConfig", "BenchResult", "run_bench", "format_result", "BrokerProcess", "BenchError", "BenchBrokerExited", "SHAPES",
           "c_generator", "RedisProcess", "run_redis", "MosquittoProcess", "run_mosquitto", "mqtt_connect",
           "run_compare", "format_compare"]

GROUP_ID = "bench-group"
_NS = 1_000_000_000
_CLOSE_CODES = frozenset(int(c) for c in CloseCode)


class BenchError(Exception):
    """The benchmark could not run (broker did not start, login refused...)."""


class BenchUnreachable(BenchError):
    """A broker (or the peer of --compare) did not take the connection: no
    mistake in the command (``pimcore bench`` exits 1 for it, not 2)."""


class BenchRunFailed(BenchError):
    """The run failed part-way for no mistake in the command (the generator
    killed by a signal, say): ``pimcore bench`` exits 1, as unreachable."""


class BenchBrokerExited(BenchUnreachable):
    """The broker this run started exited part-way and the generator could
    not finish at all (no result to report): exit 1, as unreachable."""


#: Largest payload a run sends (bytes): the broker it starts takes frames of
#: that size, and its max_outbound_bytes (64 MiB) must stay >= 4 frames.
MAX_SIZE = 16 << 20


@dataclass(frozen=True, slots=True)
class BenchConfig:
    url: Optional[str] = None  # None: start a broker process of our own; "URL,URL": several nodes
    secret: Optional[str] = None  # the broker's token secret (required with url)
    data_dir: Optional[str] = None  # with url: the broker's data dir (group creation)
    #: With url, group mode over Redis Cluster: the nodes' store
    #: (redis://...) and namespace, where the bench group is created.
    store: Optional[str] = None
    namespace: str = "pim"
    #: Tags the 1:1 users of this run (bench-RUN-s0 ...): a store keeps every
    #: (user, device, local id) it acked, so a second run against the same
    #: broker with the same users would be refused DUPLICATE_CONFLICT.
    run: str = field(default_factory=lambda: os.urandom(3).hex())
    conns: int = 50  # sending connections
    window: int = 16  # SendReqs in flight per sending connection
    size: int = 100  # payload bytes (at least 8: the send timestamp)
    count: Optional[int] = None  # total messages; None: run for `duration`
    duration: float = 5.0  # seconds measured
    warmup: float = 1.0  # seconds sent before measuring (not counted)
    mode: str = "direct"  # "direct" (1:1 chats) or "group"
    group_size: int = 1000  # members of the group in group mode
    online: bool = True  # direct mode: recipients connected and acking pushes
    idle: int = 0  # extra authenticated connections that only sit there
    hold: float = 2.0  # seconds to hold idle connections (idle-only runs)
    procs: int = 1  # generator processes
    durability: str = "sync"  # broker's durability when we start it
    backend: Optional[str] = None  # PIMCORE_BACKEND for the broker we start
    pin: bool = True  # pin broker and generator to different CPUs
    zstd: bool = False  # negotiate compression
    drain: float = 10.0  # seconds to wait for outstanding acks/deliveries
    progress: bool = True
    # "auto": the one-thread C generator (bench/loadgen.c, built with cc on
    # first use) when it can run this shape, else the trio one; "c" or "python"
    # to insist.  The C one spends ~1 µs of CPU per message, the trio one ~15.
    generator: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in ("direct", "group"):
            raise ValueError("mode must be 'direct' or 'group'")
        if self.generator not in ("auto", "c", "python"):
            raise ValueError("generator must be 'auto', 'c' or 'python'")
        if self.generator == "c" and (self.procs > 1 or self.zstd):
            raise ValueError("the C generator runs one process without compression: drop --procs/--zstd or use"
                             " --generator python")
        if self.conns < 0 or self.idle < 0 or (self.conns == 0 and self.idle == 0):
            raise ValueError("need conns >= 1 or idle >= 1")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.size < 8:
            raise ValueError("size must be >= 8 (the payload carries an 8-byte send timestamp)")
        if self.size > MAX_SIZE:
            raise ValueError(f"size must be <= {MAX_SIZE} bytes")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be >= 1")
        if self.count is not None and self.count < self.conns:
            # (A connection given no message would run until the clock stops,
            # which in count mode it never does.)
            raise ValueError(f"count must be >= conns ({self.conns}): each connection sends at least one")
        if self.duration <= 0 or self.warmup < 0 or self.hold < 0:
            raise ValueError("duration must be > 0, warmup and hold >= 0")
        if self.mode == "group" and self.group_size < max(2, self.conns):
            raise ValueError("group_size must be >= conns (the senders are members) and >= 2")
        if self.procs < 1:
            raise ValueError("procs must be >= 1")
        if self.url is not None and not self.secret:
            raise ValueError("--url needs the broker's token secret (--secret or $PIMCORE_SECRET)")

    @property
    def inboxes_per_message(self) -> int:
        return self.group_size if self.mode == "group" else 2


# ---------------------------------------------------------------- histogram


def _percentiles(samples: "array[int]") -> dict[str, float]:
    """p50..max of ns samples, in µs, via HdrHistogram (3 significant digits)."""
    from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

    out: dict[str, float] = {"count": len(samples)}
    if not samples:
        return out
    h = HdrHistogram(1, 3600 * _NS, 3)
    record = h.record_value
    for v in samples:
        record(v if v > 0 else 1)
    for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
        out[name] = h.get_value_at_percentile(p) / 1000
    out["max"] = h.get_max_value() / 1000
    out["mean"] = h.get_mean_value() / 1000
    return out


def _histogram_buckets(samples: "array[int]", per_decade: int = 20) -> list[tuple[float, int]]:
    """Log-spaced buckets (upper bound µs, count) for plots and --json."""
    if not samples:
        return []
    counts: dict[int, int] = {}
    for v in samples:
        b = math.ceil(math.log10(max(v, 1) / 1000) * per_decade) if v > 1000 else 0
        counts[b] = counts.get(b, 0) + 1
    return [(round(10 ** (b / per_decade), 3), counts[b]) for b in sorted(counts)]


# ---------------------------------------------------------------- broker process


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11], [12] are utime and stime (14th and 15th of the full line).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_cpu_wait(pid: int) -> Optional[float]:
    """Seconds the process's threads spent runnable, waiting for a CPU
    (the second field of /proc/<pid>/task/*/schedstat); None without it."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (FileNotFoundError, ProcessLookupError):
                pass  # a thread that just ended
    except OSError:
        return None
    return total / 1e9


def _proc_memory(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon"):
                out[key] = int(rest.split()[0]) * 1024
    return out


#: ``PIMCORE_*`` variables the bench's own broker keeps from the caller's
#: environment: the project's own (build, test hooks, the backend selector
#: -- replaced by --backend), none a setting.  Every other one is left out
#: (broker_environment): an operator's shell with $PIMCORE_WEBHOOKS_URL,
#: $PIMCORE_MODERATION_URL or $PIMCORE_STORE exported had the bench's
#: traffic POSTed to the production services and written to that Redis (a
#: new user's trial).  $PIMCORE_CONFIG (a settings file) and
#: $PIMCORE_API_KEY (the CLI's HTTP key) are left out too.
def _kept_env(name: str) -> bool:
    from .config import OTHER_ENV, OTHER_ENV_PREFIXES

    if name in ("PIMCORE_CONFIG", "PIMCORE_API_KEY"):
        return False
    return name in OTHER_ENV or name.startswith(OTHER_ENV_PREFIXES)


def broker_environment(cfg: BenchConfig, secret: str = "") -> tuple[dict[str, str], list[str]]:
    """(the environment of the broker bench starts, the PIMCORE_* variables
    of the caller's left out of it that had a value, sorted): the caller's
    environment without its settings' PIMCORE_* and $PIMCORE_CONFIG -- the
    bench's broker is configured by bench alone (its flags, ``secret`` as
    $PIMCORE_SECRET, ``cfg.backend`` as $PIMCORE_BACKEND)."""
    env: dict[str, str] = {}
    dropped = []
    for name, value in os.environ.items():
        if name.startswith("PIMCORE_") and not _kept_env(name):
            if value and name != "PIMCORE_SECRET":  # (bench reads $PIMCORE_SECRET for --url only)
                dropped.append(name)
            continue
        env[name] = value
    env["PIMCORE_SECRET"] = secret
    if cfg.backend:
        env["PIMCORE_BACKEND"] = cfg.backend
    return env, sorted(dropped)


class BrokerProcess:
    """``python -m pimcore serve`` on a fresh data directory, for benchmarks.

    Use as a context manager; ``url``, ``secret`` and ``pid`` are set once it
    is ready.  On exit it is stopped with SIGTERM (graceful) and the data
    directory removed.
    """

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.data_dir = tempfile.mkdtemp(prefix="pimcore-bench-")
        self.secret = secrets.token_hex(32)
        self.url = ""
        self.proc: Optional[subprocess.Popen[str]] = None
        self.backend = ""
        # From the broker's last line at a graceful exit ("served N connections:
        # M messages stored in B batches (... S s committing)"); empty if absent.
        self.final: dict[str, float] = {}
        self.ready = False
        # Its exit status when it exited before __exit__ stopped it, after it
        # was ready (died part-way: killed, crashed, stopped by someone
        # else); None if it lived to be stopped.
        self.exited: Optional[int] = None
        # The last lines it wrote (stdout and stderr, merged) after "ready".
        self.last_lines: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> "BrokerProcess":
        cfg = self.config
        if cfg.mode == "group":
            _create_group(os.path.join(self.data_dir, "store"), cfg.group_size, cfg.durability)
        env, _ = broker_environment(cfg, self.secret)  # (none of the caller's settings)
        cmd = [
            sys.executable, "-m", "pimcore", "serve",
            "--data-dir", self.data_dir,
            "--listen", "tcp://127.0.0.1:0",
            "--durability", cfg.durability,
            "--send-rate", "0",
            "--window", str(max(cfg.window, 256)),
            "--heartbeat-ms", "0",
            "--idle-timeout", "0",
            "--max-connections", str(cfg.conns * 2 + cfg.idle + 100),
            "--max-outbound-bytes", str(64 << 20),
            # The payload size asked for, beyond the default limits (a frame
            # holds one such message and its header).
            "--max-payload", str(max(cfg.size, Limits().max_payload)),
            "--max-frame", str(max(cfg.size + message_overhead(Limits().max_mentions), Limits().max_frame)),
            "--log-level", "warning",  # its stderr is read only until ready: a line per login would fill the pipe
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     preexec_fn=_die_with_parent)
        if cfg.pin and _can_pin():
            os.sched_setaffinity(self.proc.pid, {0})
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("pimcore ") and "backend" in line:
                self.backend = line.split("(", 1)[1].split(" ", 1)[0]
            if line.startswith("listening on tcp://"):
                self.url = line.split()[-1]
            if line.startswith("ready"):
                self.ready = True
                return
        raise BenchError("the broker did not start:\n" + "".join(lines))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.ready and isinstance(exc[1] if len(exc) > 1 else None, BenchError):
            # The generator failed or gave up: a broker on its way out (a
            # graceful stop closes the connections first, then exits) is
            # given a moment to finish, so that its exit is said and not the
            # generator's "connection closed during login" (a new user's
            # trial: exit 2, the generator blamed for a broker that died).
            try:
                self.proc.wait(BROKER_EXIT_GRACE)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None and self.ready and self.proc.poll() is not None:
            self.exited = self.proc.returncode
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            try:
                said = self.proc.stdout.read()
                self.final = _parse_served(said)
                self.last_lines = [line for line in said.splitlines() if line.strip()][-BROKER_LAST_LINES:]
            except (OSError, ValueError):
                pass
            self.proc.stdout.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


#: Seconds a broker still running when the generator failed is given to exit
#: on its own (a graceful stop's last steps) before it is told a live one.
BROKER_EXIT_GRACE = 2.0

#: Lines of a broker's last words quoted when it died part-way through a run.
BROKER_LAST_LINES = 5


def _exit_words(status: int) -> str:
    """A process's exit status as a person says it."""
    if status < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def _parse_served(text: str) -> dict[str, float]:
    """The counts in ``pimcore serve``'s exit line (see cli._cmd_serve)."""
    import re

    m = re.search(r"served (\d+) connections: (\d+) messages stored in (\d+) batches .*?([\d.]+) s committing", text)
    if not m:
        return {}
    return {"messages_stored": int(m.group(2)), "batches": int(m.group(3)), "commit_seconds": float(m.group(4))}


def _die_with_parent() -> None:
    """In the broker child: SIGTERM it if the generator dies (Linux), so a
    killed benchmark leaves no broker behind."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: cleaned up by __exit__ only
        pass


def _create_group(store_dir: str, size: int, durability: str) -> None:
    """The bench group (``GROUP_ID``, members ``bench-u0`` ...) in the LMDB
    store at ``store_dir``: created, or its missing members added.  Raises
    BenchError if the store refuses the write (a running broker with
    durability ``log`` is its only writer)."""
    from .errors import StoreError
    from .ids import quote_arg
    from .store import LmdbStore

    store = LmdbStore(store_dir, durability=durability, owner=False)  # setup, not a broker run
    members = [_member(i) for i in range(size)]
    try:
        if not store.conversation_exists(GROUP_ID):
            store.create_group(GROUP_ID, members, time.time_ns() // 1000)
        else:
            have = set(store.members(GROUP_ID))
            missing = [m for m in members if m not in have]
            if missing:
                store.add_members(GROUP_ID, missing)
    except StoreError as exc:
        raise BenchError(
            f"cannot create the bench group in {quote_arg(store_dir)}: {exc}. Create it through the broker's HTTP API"
            f" first (POST /v1/groups with conv {GROUP_ID!r} and members bench-u0 ... bench-u{size - 1}),"
            " then run the bench again"
        ) from None
    finally:
        store.close()


def _create_group_redis(url: str, namespace: str, size: int) -> None:
    """The bench group in a Redis Cluster store the nodes share (created, or
    its missing members added)."""
    import trio

    from .errors import StoreError
    from .store.base import AddMembers, CreateGroup, GroupChanged, Rejected, StoreRequest

    members = tuple(_member(i) for i in range(size))

    async def main() -> None:
        from .store.redis import RedisStore

        async with RedisStore.connect(url, namespace=namespace) as store:
            now = time.time_ns() // 1000
            (res,) = await store.execute(StoreRequest(1, (CreateGroup(GROUP_ID, members, now),), True))
            if isinstance(res, Rejected) and res.code.name == "ALREADY_EXISTS":
                (res,) = await store.execute(StoreRequest(2, (AddMembers(GROUP_ID, members, now),), True))
            if not isinstance(res, GroupChanged):
                raise BenchError(f"cannot create the bench group in {url}: {res}")

    try:
        trio.run(main)
    except (StoreError, OSError, ImportError) as exc:
        raise BenchError(f"cannot create the bench group in {url}: {exc}") from None


def _can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


@contextlib.contextmanager
def _generator_cpus(pin: bool) -> Iterator[None]:
    """For one run: this process (the generator's parent; the C generator
    inherits it) off CPU 0, which the server of the run has; its CPUs are
    given back afterwards, so that the next run of a ``--compare`` starts
    its server as the first did (before, a run left this process narrowed,
    and every later server inherited the generator's CPU)."""
    if not (pin and _can_pin()):
        yield
        return
    cpus = os.sched_getaffinity(0)
    ordered = sorted(cpus)
    os.sched_setaffinity(0, set(ordered[1:]) or cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def _member(i: int) -> str:
    return f"bench-u{i}"


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class _Role:
    user: str
    send_to: Optional[str]  # conversation to send in, None for receivers/idle
    quota: int  # messages to send in count mode (0 = until the clock stops)
    receives: bool  # records deliveries


def _roles(cfg: BenchConfig) -> tuple[list[list[_Role]], list[_Role]]:
    """(units of active roles, idle roles) for the whole run.  A unit (a
    sender and its online peer) always lands in one generator process, so
    each process can tell when its own deliveries are complete."""
    from .ids import direct_conversation

    active: list[list[_Role]] = []
    quotas = [0] * cfg.conns
    if cfg.count is not None:
        for i in range(cfg.conns):
            quotas[i] = cfg.count // cfg.conns + (1 if i < cfg.count % cfg.conns else 0)
    for i in range(cfg.conns):
        if cfg.mode == "group":
            # Senders are the first members; the others are offline members
            # whose inboxes are written all the same.
            active.append([_Role(_member(i), GROUP_ID, quotas[i], True)])
        else:
            a, b = f"bench-{cfg.run}-s{i}", f"bench-{cfg.run}-r{i}"
            unit = [_Role(a, direct_conversation(a, b), quotas[i], False)]
            if cfg.online:
                unit.append(_Role(b, None, 0, True))
            active.append(unit)
    idle = [_Role(f"bench-{cfg.run}-idle{i}", None, 0, False) for i in range(cfg.idle)]
    return active, idle


# ---------------------------------------------------------------- one worker


class _Stats:
    __slots__ = ("acked", "ack_lat", "deliveries", "del_lat", "errors", "sent", "closes", "measure_from", "measure_to",
                 "first_send", "last_ack")

    def __init__(self) -> None:
        self.acked = 0
        self.sent = 0
        self.deliveries = 0
        self.ack_lat: array[int] = array("q")
        self.del_lat: array[int] = array("q")
        self.errors: dict[str, int] = {}
        self.closes: dict[str, int] = {}
        self.measure_from = 0
        self.measure_to = 1 << 62
        self.first_send = 0
        self.last_ack = 0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


class _Worker:
    """Drives its share of the connections inside one trio run."""

    def __init__(self, cfg: BenchConfig, url: str, secret: str, roles: list[_Role], idle: list[_Role]) -> None:
        from .net.streams import parse_url

        self.cfg = cfg
        # Several brokers (nodes sharing one store): "URL,URL,...";
        # connections are spread over them round-robin, in login order.
        self.addrs = []
        for one in url.split(","):
            ep = parse_url(one.strip())
            if ep.scheme != "tcp":
                raise BenchError("the load generator speaks raw frames over tcp:// only")
            self.addrs.append((ep.host, ep.port))
        self.host, self.port = self.addrs[0]
        self._logins = 0
        self.secret = secret
        self.roles = roles
        self.idle = idle
        self.stats = _Stats()
        self.stop_sending = 0  # monotonic ns; 0 = not yet known
        self.senders_left = sum(1 for r in roles if r.send_to is not None)
        self.all_acked = trio.Event()
        self.filler = secrets.token_bytes(max(0, cfg.size - 8))
        self.streams: list[trio.SocketStream] = []
        self.cpu0 = 0.0

    async def _login(self, role: _Role, device: str) -> tuple[trio.SocketStream, Decoder, bytes]:
        from .auth import issue_token

        token = issue_token(self.secret, role.user, ttl=24 * 3600).encode()
        host, port = self.addrs[self._logins % len(self.addrs)]
        self._logins += 1
        stream = await trio.open_tcp_stream(host, port)
        caps = F.CAP_ZSTD if self.cfg.zstd else 0
        await stream.send_all(encode_frame(F.Login(token, device, time.time_ns() // 1000, 0, caps)))
        dec = Decoder(1 << 24)
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                raise BenchError(f"{role.user}: connection closed during login")
            dec.feed(data)
            for frame in dec:
                if type(frame) is F.LoginAck:
                    if frame.caps & F.CAP_ZSTD:
                        from .compress import FrameDecompressor

                        dec.enable_decompression(FrameDecompressor())
                    # Frames after the LoginAck (ReadStates, a catch-up Push)
                    # stay in the decoder for the run loop.
                    return stream, dec, bytes(data)
                if type(frame) is F.Close:
                    raise BenchError(f"{role.user}: login refused: {frame.reason}")

    async def connect_all(self, nursery: trio.Nursery) -> list[tuple[_Role, trio.SocketStream, Decoder]]:
        """Log in every connection (bounded concurrency: a listen backlog
        overflow would only add SYN retransmit delays)."""
        limit = trio.Semaphore(128)
        ready: list[tuple[_Role, trio.SocketStream, Decoder]] = []

        async def one(role: _Role, idle: bool) -> None:
            async with limit:
                stream, dec, _ = await self._login(role, "bench")
                self.streams.append(stream)
                if not idle:
                    ready.append((role, stream, dec))
                else:
                    nursery.start_soon(self._idle, stream)

        async with trio.open_nursery() as n:
            for role in self.roles:
                n.start_soon(one, role, False)
            for role in self.idle:
                n.start_soon(one, role, True)
        return ready

    async def _idle(self, stream: trio.SocketStream) -> None:
        # Read and discard (ReadStates at login, a Close at shutdown).
        try:
            while await stream.receive_some(1 << 12):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def run_conn(self, role: _Role, stream: trio.SocketStream, dec: Decoder) -> None:
        cfg, st = self.cfg, self.stats
        conv = role.send_to
        send_conv = conv or ""
        window = cfg.window if conv is not None else 0
        quota = role.quota
        sent_here = 0
        inflight: dict[int, int] = {}
        # From the time (µs), as the SDK does: a second run with the same
        # users and devices (group mode) is not a retry of the first.
        local_ids = iter(range(time.time_ns() // 1000, 1 << 62))
        filler = self.filler
        mono = time.monotonic_ns
        pushed_upto = 0
        acked_upto = 0
        done_sending = conv is None

        def more() -> list[bytes]:
            nonlocal sent_here, done_sending
            out = []
            while len(inflight) < window and not done_sending:
                now = mono()
                if (quota and sent_here >= quota) or (not quota and self.stop_sending and now >= self.stop_sending):
                    done_sending = True
                    break
                lid = next(local_ids)
                inflight[lid] = now
                sent_here += 1
                out.append(encode_frame(F.SendReq(lid, send_conv, now // 1000, now.to_bytes(8, "big") + filler)))
            return out

        try:
            first = more()
            if first:
                if not st.first_send:
                    st.first_send = mono()
                st.sent += len(first)
                await stream.send_all(b"".join(first))
            while True:
                for frame in dec:
                    t = type(frame)
                    if t is F.SendAck:
                        sent_at = inflight.pop(frame.local_id, None)
                        if sent_at is None:
                            st.error("unexpected SendAck")
                            continue
                        if frame.code != ErrorCode.OK:
                            st.error(ErrorCode(frame.code).name)
                            continue
                        now = mono()
                        st.last_ack = now
                        if st.measure_from <= sent_at < st.measure_to:
                            st.acked += 1
                            st.ack_lat.append(now - sent_at)
                    elif t is F.Push:
                        if frame.position > pushed_upto:
                            pushed_upto = frame.position
                        if role.receives:
                            now = mono()
                            for m in frame.messages:
                                sent_at = int.from_bytes(m.payload[:8], "big")
                                if st.measure_from <= sent_at < st.measure_to:
                                    st.deliveries += 1
                                    st.del_lat.append(now - sent_at)
                    elif t is F.Close:
                        name = CloseCode(frame.code).name if frame.code in _CLOSE_CODES else str(frame.code)
                        st.closes[name] = st.closes.get(name, 0) + 1
                        return
                    elif t is F.Error:
                        st.error(f"Error {ErrorCode(frame.code).name}")
                out = more()
                if out:
                    st.sent += len(out)
                if pushed_upto > acked_upto:
                    acked_upto = pushed_upto
                    out.append(encode_frame(F.PushAck(pushed_upto)))
                if out:
                    await stream.send_all(b"".join(out) if len(out) > 1 else out[0])
                if done_sending and not inflight and conv is not None:
                    conv = None  # this sender is finished; keep acking pushes
                    self.senders_left -= 1
                    if self.senders_left == 0:
                        self.all_acked.set()
                data = await stream.receive_some(1 << 16)
                if not data:
                    st.error("connection closed by broker")
                    return
                dec.feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            st.error(f"connection error: {type(exc).__name__}")
        finally:
            if conv is not None:
                self.senders_left -= 1
                if self.senders_left == 0:
                    self.all_acked.set()

    async def close_all(self) -> None:
        for s in self.streams:
            with trio.move_on_after(1):
                try:
                    await s.send_all(encode_frame(F.Close(0, "bench done")))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
            await trio.aclose_forcefully(s)


async def _run_worker(cfg: BenchConfig, url: str, secret: str, roles: list[_Role], idle: list[_Role], control: Any) -> dict[str, Any]:
    """Connect, tell `control` we are ready, wait for the go (the shared
    measuring window), run, report."""
    w = _Worker(cfg, url, secret, roles, idle)
    st = w.stats
    async with trio.open_nursery() as nursery:
        t_connect = time.monotonic()
        conns = await w.connect_all(nursery)
        t_connect = time.monotonic() - t_connect
        go = await control.ready()  # (measure_from, measure_to) in monotonic ns; count mode: everything
        st.measure_from, st.measure_to = go
        if cfg.count is None:
            w.stop_sending = st.measure_to
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        async with trio.open_nursery() as conn_nursery:
            for role, stream, dec in conns:
                conn_nursery.start_soon(w.run_conn, role, stream, dec)
            if w.senders_left == 0:
                w.all_acked.set()
            if cfg.progress and control.shows_progress:
                conn_nursery.start_soon(_progress, cfg, st)
            await w.all_acked.wait()
            if cfg.conns == 0:
                await trio.sleep(cfg.hold)  # idle-only run: just hold them
            # Deliveries of the last messages are still on their way.
            expect = _expected_deliveries(cfg, st.acked, len(roles))
            with trio.move_on_after(cfg.drain):
                while expect and st.deliveries < expect:
                    await trio.sleep(0.01)
            conn_nursery.cancel_scope.cancel()
        cpu = time.process_time() - cpu0
        wall = time.monotonic() - wall0
        await control.done()  # connections still up: the broker is sampled
        await w.close_all()
        nursery.cancel_scope.cancel()
    return {
        "acked": st.acked,
        "sent": st.sent,
        "deliveries": st.deliveries,
        "ack_lat": st.ack_lat.tobytes(),
        "del_lat": st.del_lat.tobytes(),
        "errors": st.errors,
        "closes": st.closes,
        "first_send": st.first_send,
        "last_ack": st.last_ack,
        "cpu": cpu,
        "wall": wall,
        "logged_in": len(w.streams),
        "connect_seconds": t_connect,
    }


def _expected_deliveries(cfg: BenchConfig, acked: int, roles: int) -> int:
    """Deliveries this worker's measured sends should produce at its online
    receivers (0: do not wait for any)."""
    if cfg.mode == "direct":
        return acked if cfg.online else 0
    # Group: every sending member receives the others' messages -- known
    # here only when all senders are in this process.
    return acked * (cfg.conns - 1) if roles == cfg.conns else 0


async def _progress(cfg: BenchConfig, st: _Stats) -> None:
    out = sys.stderr
    width = 30
    try:
        while True:
            await trio.sleep(0.25)
            now = time.monotonic_ns()
            if cfg.count is None:
                total = (st.measure_to - st.measure_from) / _NS
                done = min(max(0.0, (now - st.measure_from) / _NS), total)
                frac = done / total if total else 1.0
                label = f"{done:5.1f}/{total:.1f} s" if now >= st.measure_from else "warm-up"
            else:
                frac = min(1.0, st.acked / cfg.count)
                label = f"{st.acked:,}/{cfg.count:,}"
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            out.write(f"\r[{bar}] {label}  {st.acked:,} acked  {st.deliveries:,} delivered ")
            out.flush()
    finally:
        out.write("\r" + " " * (width + 70) + "\r")
        out.flush()


# ---------------------------------------------------------------- coordination


class _LocalControl:
    """One generator process: the window starts right after login."""

    shows_progress = True

    def __init__(self, cfg: BenchConfig, on_ready: Any, on_done: Any) -> None:
        self.cfg = cfg
        self.on_ready = on_ready
        self.on_done = on_done

    async def ready(self) -> tuple[int, int]:
        self.on_ready()
        return _window(self.cfg)

    async def done(self) -> None:
        self.on_done()


def _window(cfg: BenchConfig) -> tuple[int, int]:
    start = time.monotonic_ns() + int(cfg.warmup * _NS)
    if cfg.count is not None:
        return 0, 1 << 62
    return start, start + int(cfg.duration * _NS)


class _PipeControl:
    """A generator subprocess: report ready, wait for the parent's go."""

    shows_progress = False

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def ready(self) -> tuple[int, int]:
        self.conn.send(("ready", None))
        kind, go = await trio.to_thread.run_sync(self.conn.recv)
        assert kind == "go"
        return go

    async def done(self) -> None:
        # Idle connections must stay up until the parent has sampled memory.
        self.conn.send(("done", None))
        kind, _ = await trio.to_thread.run_sync(self.conn.recv)
        assert kind == "release"


def _run_trio(cfg: BenchConfig, url: str, secret: str, roles: list[_Role], idle: list[_Role], control: Any) -> dict[str, Any]:
    """trio.run the worker; failures inside its nurseries (every connection
    refused the same way, say) come out as one BenchError, not a group."""
    try:
        return trio.run(_run_worker, cfg, url, secret, roles, idle, control)
    except BaseExceptionGroup as group:
        leaf = first_leaf(group)
        if isinstance(leaf, BenchError):
            raise leaf from None
        if isinstance(leaf, OSError):
            raise BenchUnreachable(f"cannot reach the broker at {url}: {leaf}") from None
        if isinstance(leaf, (trio.BrokenResourceError, trio.ClosedResourceError)):
            # (A connection reset during the logins: a traceback, not a word
            # of the broker, which had died -- a new user's trial.)
            raise BenchError(f"a connection to the broker at {url} broke: {leaf}") from None
        raise
    except OSError as exc:
        raise BenchUnreachable(f"cannot reach the broker at {url}: {exc}") from None


def _child(cfg: BenchConfig, url: str, secret: str, roles: list[_Role], idle: list[_Role], conn: Any) -> None:
    try:
        result = _run_trio(cfg, url, secret, roles, idle, _PipeControl(conn))
        conn.send(("result", result))
    except BaseException as exc:  # report, do not hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


# ---------------------------------------------------------------- the run


@dataclass(slots=True)
class BenchResult:
    config: dict[str, Any]
    broker: dict[str, Any]
    seconds: float
    acked: int
    # The rates are None when the run failed (``failed``): what a dead
    # broker acked divided by a window it did not live through is no rate.
    acked_per_s: Optional[float]
    deliveries: int
    deliveries_per_s: Optional[float]
    stored_entries_per_s: Optional[float]
    ack_latency_us: dict[str, float]
    delivery_latency_us: dict[str, float]
    errors: dict[str, int]
    generator_cpu: float  # fraction of one core, busiest generator process
    generator_saturated: bool
    broker_cpu_us_per_msg: Optional[float] = None
    broker_cpu_util: Optional[float] = None
    broker_peak_rss: Optional[int] = None
    # Anonymous (heap) part of the RSS at the end, connections still open; the
    # rest of the RSS is mostly LMDB's memory-mapped file, which the kernel
    # can drop and re-read at will.
    broker_rss_anon: Optional[int] = None
    idle_connections: int = 0
    logged_in: int = 0  # connections that completed Login (all of them, or the run fails)
    login_seconds: float = 0.0  # time to connect and log them all in
    broker_bytes_per_connection: Optional[float] = None
    ack_histogram: list[tuple[float, int]] = field(default_factory=list)
    delivery_histogram: list[tuple[float, int]] = field(default_factory=list)
    peer: str = "pimcore"  # or "redis" (run_redis)
    generator: str = "python"  # "c" (bench/loadgen.c) or "python" (trio)
    generator_note: str = ""  # why the trio generator ran when "auto" was asked
    # From the broker's exit line (brokers this tool started): time in write
    # requests, fsync included, and the group commit's batches.
    broker_commit_seconds: Optional[float] = None
    broker_batches: Optional[int] = None
    broker_messages_stored: Optional[int] = None
    limit: str = ""  # what limited the run, in words (_diagnose)
    # Time the server was runnable but waiting for a CPU (other processes on
    # its core), as a fraction of the run (/proc/<pid>/task/*/schedstat).
    broker_cpu_wait: Optional[float] = None
    # The generators' CPU (all processes) per message sent, µs: what it costs
    # to drive the server; 1e6 / this is the most one core of it can drive.
    generator_cpu_us_per_msg: Optional[float] = None
    # Why broker_cpu_us_per_msg and broker_cpu_util are None for a server
    # this tool watched: the run was too short for /proc's clock ticks.
    broker_cpu_reason: Optional[str] = None
    # Why the run failed, in words ("" if it did not): the broker it started
    # exited part-way.  Then ``broker_exit`` is {"status": its exit status
    # (negative: the signal), "last_lines": what it wrote last}.
    failed: str = ""
    broker_exit: Optional[dict[str, Any]] = None
    # Why the rates are no steady figures (rate_note), or None.
    rate_note: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


#: A run's rate is a steady figure once it acked this many times the sends
#: it had in flight at once: those are acked within the first round trip,
#: whatever the duration, and add about a tenth at most then.
STEADY_RATE_FACTOR = 10


def rate_note(acked: int, in_flight: int) -> Optional[str]:
    """Why a run's acked/s is no steady figure, or None: ``in_flight`` sends
    at once (conns x window, or fewer with a count) against ``acked`` --
    a 10 ms run of 50 x 16 said 80,000 acked/s, a 2 s one 30,800 (a trial)."""
    if in_flight <= 0 or acked >= STEADY_RATE_FACTOR * in_flight:
        return None
    return (f"run too short for a steady rate: {in_flight:,} send{'s' if in_flight != 1 else ''} in flight at once"
            f" against {acked:,} acked"
            f" (want {STEADY_RATE_FACTOR}x as many acked; run longer)")


def run_bench(cfg: BenchConfig) -> BenchResult:
    """Run one benchmark as configured; see the module docstring."""
    res = _run_bench(cfg)
    if not res.failed and cfg.conns:
        in_flight = cfg.conns * cfg.window
        res.rate_note = rate_note(res.acked, in_flight if cfg.count is None else min(in_flight, cfg.count))
    return res


def _run_bench(cfg: BenchConfig) -> BenchResult:
    if cfg.url is None:
        broker = BrokerProcess(cfg)
        try:
            with broker:
                res = _run_against(cfg, broker.url, broker.secret, broker.pid, broker.backend)
        except BenchError as exc:
            # The generator gave up (the C one cannot reconnect, say) because
            # the broker was gone: say that, not only the generator's words.
            if broker.exited is None:
                raise
            raise BenchBrokerExited(f"{_broker_exited(broker.exited)}{_quoted(broker.last_lines)}"
                                    f" (the generator: {exc})") from None
        if broker.exited is not None:
            # Died part-way (killed, crashed, stopped by someone else): the
            # counts are what it did before; its rates are no rates and no
            # limit is guessed (a new user's trial read 16,000/s of a run
            # whose broker was killed at half time as a slow broker).
            res.failed = _broker_exited(broker.exited)
            res.broker_exit = {"status": broker.exited, "last_lines": broker.last_lines}
            res.acked_per_s = res.deliveries_per_s = res.stored_entries_per_s = None
            res.errors["broker exited"] = res.errors.get("broker exited", 0) + 1
            res.limit = res.failed
            return res
        if broker.final:
            res.broker_commit_seconds = broker.final["commit_seconds"]
            res.broker_batches = int(broker.final["batches"])
            res.broker_messages_stored = int(broker.final["messages_stored"])
        res.limit = _diagnose(res)
        return res
    assert cfg.secret is not None
    for one in cfg.url.split(","):
        _check_broker(one, cfg.secret)
    if cfg.mode == "group":
        if cfg.store is not None:
            _create_group_redis(cfg.store, cfg.namespace, cfg.group_size)
        elif cfg.data_dir is None:
            raise BenchError("group mode against --url needs --data-dir (the broker's LMDB store) or --store"
                             " (the nodes' Redis Cluster store) to create the bench group")
        else:
            _create_group(os.path.join(cfg.data_dir, "store"), cfg.group_size, "sync")
    assert cfg.secret is not None
    res = _run_against(cfg, cfg.url, cfg.secret, None, "")
    res.limit = _diagnose(res)
    return res


def _broker_exited(status: int) -> str:
    return f"the broker exited part-way through the run ({_exit_words(status)})"


def _quoted(lines: list[str]) -> str:
    """A broker's last lines, for a one-line message: "; its last words: ... | ..."."""
    return "; its last words: " + " | ".join(lines) if lines else "; it said nothing"


def _check_broker(url: str, secret: str) -> None:
    """One SDK connect to ``url`` before the load starts: a port that is not
    a pimcore broker's is said in the SDK's words within its connect_timeout
    (the generators waited up to 60 s for logins, then said less).  Raises
    BenchUnreachable (exit 1) for what may work later, BenchError (exit 2)
    for the wrong kind of port or a refused token.  It logs in as a user of
    its own (bench-probe), never one the run sends to."""
    from .auth import issue_token
    from .client import AuthFailed, ConnectFailed, open_client

    async def probe() -> None:
        async with open_client(url.strip(), issue_token(secret, "bench-probe", ttl=600), device="bench-probe"):
            pass

    try:
        trio.run(probe)
    except ConnectFailed as exc:
        if exc.wrong_port:
            raise BenchError(str(exc)) from None
        raise BenchUnreachable(str(exc)) from None
    except AuthFailed as exc:
        raise BenchError(f"login refused by the broker at {url.strip()}: {exc} (is --secret its token secret?)") from None


def _run_against(cfg: BenchConfig, url: str, secret: str, pid: Optional[int], backend: str) -> BenchResult:
    with _generator_cpus(cfg.pin and pid is not None):
        return _drive(cfg, url, secret, pid, backend)


#: The fewest clock ticks of server CPU a run must measure for its CPU
#: figures: /proc/<pid>/stat counts whole ticks (10 ms at 100 Hz), so a
#: difference of two readings is off by up to one tick -- 20 % at 5, about
#: the noise between runs here; below, "0.0 µs per send (0% of a core)" or
#: one tick later hundreds were noise printed as a figure (a new user's
#: trial at -d 0.1).
MIN_CPU_TICKS = 5


def _server_figures(res: "BenchResult", samples: dict[str, Any], sent: int) -> None:
    """Fill ``res``'s server CPU and memory figures from the samples taken at
    "ready" and "done" (CPU s, /proc memory, monotonic s, CPU wait s).  CPU
    per message divides by everything sent: the warm-up and the drain are
    inside the window (end to end that covers the delivery and its ack).
    Under MIN_CPU_TICKS of CPU the CPU figures are None and
    ``broker_cpu_reason`` says why; memory and CPU wait (schedstat counts
    ns) stay."""
    if "ready" not in samples or "done" not in samples:
        return
    (cpu0, _, t0, w0), (cpu1, mem, t1, w1) = samples["ready"], samples["done"]
    if w0 is not None and w1 is not None:
        res.broker_cpu_wait = (w1 - w0) / max(t1 - t0, 1e-9)
    tick = 1 / os.sysconf("SC_CLK_TCK")
    ticks = round((cpu1 - cpu0) / tick)
    if ticks < MIN_CPU_TICKS:
        res.broker_cpu_us_per_msg = res.broker_cpu_util = None
        res.broker_cpu_reason = (f"run too short: the kernel counts CPU in {tick * 1000:g} ms ticks and the server"
                                 f" used {ticks} of them (fewer than {MIN_CPU_TICKS}: no figure)")
    else:
        res.broker_cpu_us_per_msg = (cpu1 - cpu0) / sent * 1e6 if sent else None
        res.broker_cpu_util = (cpu1 - cpu0) / max(t1 - t0, 1e-9)
        res.broker_cpu_reason = None
    res.broker_peak_rss = mem.get("VmHWM")
    res.broker_rss_anon = mem.get("RssAnon")


def _drive(cfg: BenchConfig, url: str, secret: str, pid: Optional[int], backend: str) -> BenchResult:
    units, idle = _roles(cfg)
    n_conns = sum(len(u) for u in units) + len(idle)
    samples: dict[str, Any] = {}

    def sample(name: str) -> None:
        if pid is not None:
            samples[name] = (_proc_cpu_seconds(pid), _proc_memory(pid), time.monotonic(), _proc_cpu_wait(pid))

    sample("start")

    exe, note = _generator_for(cfg, url)
    if exe is not None:
        from .auth import issue_token
        from .net.streams import parse_url

        ep = parse_url(url)
        if ep.scheme != "tcp":
            raise BenchError("the load generator speaks raw frames over tcp:// only")
        lines = [
            f"{int(r.send_to is not None)} {int(r.receives)} {r.quota} {r.send_to or '-'}"
            f" {issue_token(secret, r.user, ttl=24 * 3600)}"
            for r in [r for unit in units for r in unit] + idle
        ]
        results = [_run_c(cfg, exe, "pim", ep.host, ep.port, lines, _expected_deliveries(cfg, 1, cfg.conns),
                          lambda: sample("ready"), lambda: sample("done"))]
    elif cfg.procs == 1:
        roles = [r for unit in units for r in unit]
        control = _LocalControl(cfg, lambda: sample("ready"), lambda: sample("done"))
        results = [_run_trio(cfg, url, secret, roles, idle, control)]
    else:
        results = _run_procs(cfg, url, secret, units, idle, lambda: sample("ready"), lambda: sample("done"))

    errors: dict[str, int] = {}
    for r in results:
        for k, v in {**r["errors"], **{f"Close {c}": n for c, n in r["closes"].items()}}.items():
            errors[k] = errors.get(k, 0) + v
    ack_lat: array[int] = array("q")
    del_lat: array[int] = array("q")
    for r in results:
        ack_lat.frombytes(r["ack_lat"])
        del_lat.frombytes(r["del_lat"])
    acked = sum(r["acked"] for r in results)
    deliveries = sum(r["deliveries"] for r in results)
    if cfg.count is None:
        seconds = cfg.duration
    else:
        first = min((r["first_send"] for r in results if r["first_send"]), default=0)
        last = max((r["last_ack"] for r in results), default=0)
        seconds = max(1e-9, (last - first) / _NS)
    gen_cpu = max((r["cpu"] / r["wall"] for r in results if r["wall"] > 0), default=0.0)
    res = BenchResult(
        config=asdict(cfg),
        broker={"url": url, "pid": pid, "backend": backend, "connections": n_conns},
        seconds=seconds,
        acked=acked,
        acked_per_s=acked / seconds,
        deliveries=deliveries,
        deliveries_per_s=deliveries / seconds,
        stored_entries_per_s=acked * cfg.inboxes_per_message / seconds,
        ack_latency_us=_percentiles(ack_lat),
        delivery_latency_us=_percentiles(del_lat),
        errors=errors,
        generator_cpu=gen_cpu,
        # A generator process near one full core was (part of) the bottleneck.
        generator_saturated=gen_cpu >= 0.9,
        idle_connections=cfg.idle,
        logged_in=sum(r["logged_in"] for r in results),
        login_seconds=max(r["connect_seconds"] for r in results),
        ack_histogram=_histogram_buckets(ack_lat),
        delivery_histogram=_histogram_buckets(del_lat),
        generator="c" if exe is not None else "python",
        generator_note=note,
    )
    sent_all = sum(r["sent"] for r in results)
    if sent_all:
        res.generator_cpu_us_per_msg = sum(r["cpu"] for r in results) / sent_all * 1e6
    _server_figures(res, samples, sent_all)
    if "ready" in samples and "done" in samples:
        if n_conns and "start" in samples:
            res.broker_bytes_per_connection = (samples["ready"][1]["VmRSS"] - samples["start"][1]["VmRSS"]) / n_conns
    return res


def _run_procs(cfg: BenchConfig, url: str, secret: str, units: list[list[_Role]], idle: list[_Role],
               on_ready: Any, on_done: Any) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    n = cfg.procs
    pipes, procs = [], []
    child_cfg = replace(cfg, progress=False)
    for i in range(n):
        parent_end, child_end = ctx.Pipe()
        roles = [r for unit in units[i::n] for r in unit]
        p = ctx.Process(target=_child, args=(child_cfg, url, secret, roles, idle[i::n], child_end), daemon=True)
        p.start()
        pipes.append(parent_end)
        procs.append(p)

    def expect(conn: Any, want: str) -> Any:
        kind, payload = conn.recv()
        if kind == "error":
            raise BenchError(f"generator process failed: {payload}")
        if kind != want:
            raise BenchError(f"generator process said {kind!r}, expected {want!r}")
        return payload

    try:
        for conn in pipes:
            expect(conn, "ready")
        on_ready()
        go = _window(cfg)
        for conn in pipes:
            conn.send(("go", go))
        started = time.monotonic()
        total = cfg.duration + cfg.warmup if cfg.count is None else None
        for conn in pipes:
            while not conn.poll(0.25):
                if cfg.progress and total:
                    done = min(time.monotonic() - started, total)
                    sys.stderr.write(f"\r[{'#' * int(done / total * 30):.<30}] {done:5.1f}/{total:.1f} s ")
                    sys.stderr.flush()
            expect(conn, "done")
        if cfg.progress:
            sys.stderr.write("\r" + " " * 60 + "\r")
        # Every worker is finished and still holds its connections.
        on_done()
        for conn in pipes:
            conn.send(("release", None))
        return [expect(conn, "result") for conn in pipes]
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()


# ---------------------------------------------------------------- the C generator

#: Named shapes of issue 13's table: (conns, window, recipients online).
SHAPES: dict[str, tuple[int, int, bool]] = {
    "1x1": (1, 1, False),  # latency: one send at a time, p50 send->SendAck
    "1x64": (1, 64, False),  # one pipelined connection
    "50x16": (50, 16, False),  # throughput, broker CPU per send
    "e2e-1x64": (1, 64, True),  # end to end: a recipient that acks every push
}

_C_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "loadgen.c")


def c_generator() -> tuple[Optional[str], str]:
    """(path of the built C generator, "") or (None, why not).

    Built from bench/loadgen.c with ``$CC`` or ``cc`` into
    ``$XDG_CACHE_HOME/pimcore`` (default ``~/.cache/pimcore``) on first use,
    named after the source's hash, so an edited source is rebuilt; never
    installed or committed as a binary."""
    import hashlib

    if not os.path.exists(_C_SOURCE):
        return None, f"no C generator source at {_C_SOURCE} (pimcore installed without its source tree)"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc) for the C load generator: apt-get install gcc"
    with open(_C_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + cc.encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pimcore")
    exe = os.path.join(cache, f"loadgen-{digest}")
    if os.path.exists(exe):
        return exe, ""
    try:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{exe}.{os.getpid()}.tmp"
        try:
            done = subprocess.run([cc, "-O2", "-o", tmp, _C_SOURCE], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                return None, f"the C load generator did not build with {cc}:\n{done.stderr.strip()}"
            os.replace(tmp, exe)  # atomic: concurrent builds are harmless
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"the C load generator did not build with {cc}: {exc}"
    return exe, ""


def _generator_for(cfg: BenchConfig, url: str) -> tuple[Optional[str], str]:
    """(C generator path or None, note for the report)."""
    if cfg.generator == "python" or cfg.conns == 0:  # idle-only runs: the trio generator holds them for `hold`
        return None, ""
    if "," in url:  # several nodes sharing one store
        if cfg.generator == "c":
            raise BenchError("the C generator drives one broker: use --generator python with several --url")
        return None, "several --url: the trio generator (the C one drives one broker)"
    if cfg.procs > 1 or cfg.zstd:
        return None, "the C generator runs one process without compression (--procs/--zstd): trio generator"
    exe, why = c_generator()
    if exe is None:
        if cfg.generator == "c":
            raise BenchError(why)
        return None, why + "; falling back to the trio generator (its CPU may limit the run)"
    return exe, ""


def _run_c(cfg: BenchConfig, exe: str, proto: str, host: str, port: int, plan: list[str], del_per_ack: int,
           on_ready: Any, on_done: Any) -> dict[str, Any]:
    """Run bench/loadgen.c over ``plan`` (one line per connection, see its
    header) and return the same dict as a trio worker."""
    with tempfile.TemporaryDirectory(prefix="pimcore-loadgen-") as tmp:
        plan_path, ack_path, del_path = (os.path.join(tmp, n) for n in ("plan", "ack", "del"))
        with open(plan_path, "w") as f:
            f.write("\n".join(plan) + "\n")
        timed = cfg.count is None
        args = [exe, proto, host, str(port), plan_path, str(cfg.window), str(cfg.size),
                str(cfg.warmup if timed else 0), str(cfg.duration if timed else 0), str(cfg.drain),
                str(del_per_ack), ack_path, del_path]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out: dict[str, Any] = {}
        bar = cfg.progress
        go = 0.0
        try:
            assert proc.stdout is not None and proc.stderr is not None
            for line in proc.stdout:
                if line.startswith("p "):
                    if bar:
                        _c_progress(cfg, line, time.monotonic() - go)
                elif line == "ready\n":
                    on_ready()
                    go = time.monotonic()
                elif line == "done\n":
                    if bar:
                        sys.stderr.write("\r" + " " * 100 + "\r")
                        sys.stderr.flush()
                    on_done()
                elif line.startswith("{"):
                    out = json.loads(line)
            err = proc.stderr.read()
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode == 3:
            what = {"pim": "broker", "resp": "redis-server", "mqtt": "mosquitto"}[proto]
            raise BenchUnreachable(f"cannot reach the {what} at {host}:{port}: {err.strip().split(': ', 2)[-1]}")
        last = [line.strip() for line in err.splitlines() if line.strip()][-GENERATOR_LAST_LINES:]
        words = " | ".join(last) or "(no output)"
        if proc.returncode < 0:
            # (It said "failed (exit -9): " with nothing after the colon, exit
            # 2 as a refused option -- a new user's trial: a failed run, 1.)
            raise BenchRunFailed(f"the C load generator was {_exit_words(proc.returncode)}: {words}")
        if proc.returncode != 0 or not out:
            raise BenchError(f"the C load generator failed (exit {proc.returncode}): {words}")
        with open(ack_path, "rb") as f:
            out["ack_lat"] = f.read()
        with open(del_path, "rb") as f:
            out["del_lat"] = f.read()
    errors: dict[str, int] = {}
    closes: dict[str, int] = {}
    for code, n in out.pop("ack_codes").items():
        name = ErrorCode(int(code)).name if proto == "pim" and int(code) in _ERROR_CODES else f"code {code}"
        errors[name] = errors.get(name, 0) + n
    for code, n in out.pop("error_codes").items():
        name = ErrorCode(int(code)).name if proto == "pim" and int(code) in _ERROR_CODES else code
        key = f"Error {name}" if proto == "pim" else "error reply"
        errors[key] = errors.get(key, 0) + n
    for code, n in out.pop("close_codes").items():
        closes[CloseCode(int(code)).name if int(code) in _CLOSE_CODES else code] = n
    for key, name in (("unexpected_acks", "unexpected SendAck"), ("closed_by_peer", "connection closed by broker"),
                      ("connection_errors", "connection error"), ("unanswered", "unanswered at the end")):
        if out.get(key):
            errors[name] = out[key]
    out["errors"] = errors
    out["closes"] = closes
    return out


_ERROR_CODES = frozenset(int(c) for c in ErrorCode)

#: Lines of the C generator's stderr quoted when it failed.
GENERATOR_LAST_LINES = 3


def _c_progress(cfg: BenchConfig, line: str, elapsed: float) -> None:
    """One progress-bar update from the C generator's "p ACKED DELIVERED"."""
    _, acked, delivered = line.split()
    width = 30
    if cfg.count is None:
        total = cfg.duration
        done = min(max(0.0, elapsed - cfg.warmup), total)
        frac = done / total
        label = f"{done:5.1f}/{total:.1f} s" if elapsed >= cfg.warmup else "warm-up"
    else:
        frac = min(1.0, int(acked) / cfg.count)
        label = f"{int(acked):,}/{cfg.count:,}"
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    sys.stderr.write(f"\r[{bar}] {label}  {int(acked):,} acked  {int(delivered):,} delivered ")
    sys.stderr.flush()


# ---------------------------------------------------------------- what limited the run


def _diagnose(res: BenchResult) -> str:
    """What limited the run, in words: the generator's CPU, the server's CPU
    (one core: the broker and Redis are single-threaded), fsync wait (the
    broker's commits, fsync included, filled most of the time and it was
    mostly off CPU), the broker's CPU between flushes (commits filled most
    of the time but it ran for most of each), or round trips (nobody was
    busy: more in flight would go faster)."""
    util = res.broker_cpu_util
    # ("the redis waited for its CPU" -- a new user's trial: the peers by name.)
    server = {"pimcore": "broker", "redis": "Redis", "mosquitto": "Mosquitto"}.get(res.peer, res.peer)
    the_server = "the broker" if server == "broker" else server
    refused = sum(res.errors.values()) if res.errors else 0
    if refused and refused >= res.acked:
        # Most sends were answered with an error (a payload above the
        # broker's limit, say): whatever else was busy, that is the story.
        top = ", ".join(f"{code} x{n:,}" for code, n in sorted(res.errors.items(), key=lambda kv: -kv[1])[:3])
        return (f"refusals: {the_server} answered {refused:,} sends with an error ({top}) and acked {res.acked:,};"
                f" the figures are not a throughput")
    if res.generator_saturated:
        return (f"generator CPU ({res.generator_cpu:.0%} of a core): the figures are a lower bound for {the_server}")
    if util is None:
        return f"unknown ({res.broker_cpu_reason or 'an external broker: its CPU is not visible'})"
    wait = res.broker_cpu_wait
    if util >= 0.85:
        return f"{server} CPU ({util:.0%} of one core)"
    if wait is not None and wait >= 0.15:
        # Runnable but not running: another process held the server's core.
        # The figures then say more about the machine than about the server.
        if util + wait >= 0.85:  # always running or runnable: its share of a crowded core was the limit
            return (f"{server} CPU on a shared core: it ran {util:.0%} and waited for its CPU {wait:.0%} of the time"
                    f" (other processes held it); the figures understate it")
        return (f"CPU contention: {the_server} waited for its CPU {wait:.0%} of the time (other processes),"
                f" ran {util:.0%}; the figures understate it")
    commit = ""
    if res.broker_commit_seconds is not None and res.broker_batches:
        busy = res.broker_commit_seconds / max(res.seconds + res.config["warmup"], 1e-9)
        per = (res.broker_messages_stored or 0) / res.broker_batches
        mode = res.config["durability"]
        sync = {"sync": " (fsync included)", "log": " (the log's fdatasync included)"}.get(mode, "")
        commit = f"commits{sync} {min(busy, 1.0):.0%} of the time, {per:,.0f} messages per commit"
        if busy >= 0.5:
            # Commits run on the broker's event loop: the time it is off CPU
            # inside them is the fsync (the broker is idle otherwise); with
            # durability os, the kernel's writeback of the pages it dirtied.
            # A commit's time also holds its CPU (the apply): when the broker
            # ran for most of each commit cycle (1 x 1: one message a commit),
            # that CPU between the flushes is the limit, not the fsync
            # (BENCHMARKS.md, "1 x 1: the broker's CPU between flushes").
            if mode == "os":
                what = "commit wait (durability os: no fsync)"
            elif util > 0.5:
                what = "broker CPU between flushes"
            else:
                what = "fsync wait"
            cycle = max(res.seconds + res.config["warmup"], 1e-9) / res.broker_batches * 1e6  # µs per commit
            return (f"{what}: {commit}; per commit the broker ran {util * cycle:,.0f} µs and was off CPU"
                    f" {(1 - util) * cycle:,.0f} µs (the flush at most); broker CPU {util:.0%} of one core,"
                    f" off CPU {1 - util:.0%}")
    if res.peer == "redis":
        return (f"fsync wait or round trips (appendfsync always: every reply waits for a write+fsync;"
                f" Redis CPU {util:.0%} of one core)")
    return (f"round trips: neither side was busy ({server} CPU {util:.0%}, generator {res.generator_cpu:.0%}"
            + (f"; {commit}" if commit else "") + "); more in flight would go faster")


# ---------------------------------------------------------------- Redis, the reference peer


_P = TypeVar("_P", bound="_ServerProcess")


class _ServerProcess:
    """A reference peer's server binary on loopback, a free port and a
    temporary directory (``dir``, removed on exit), pinned to CPU 0 like the
    broker unless ``pin`` is False.  A subclass says how to start it
    (:meth:`_launch`, for ``self.port``) and how to see it ready
    (:meth:`_probe`); ``__enter__`` tries up to 5 free ports, waiting up to
    10 s on each, and raises BenchError with the tail of its log file
    (``log_name`` in ``dir``) when it never answers."""

    name = ""  #: the binary's name, for "<name> did not start"
    dir_prefix = ""  #: ``dir``'s name starts with it
    log_name = ""  #: its log file in ``dir``

    def __init__(self, exe: Optional[str], missing: str, pin: bool) -> None:
        if exe is None:
            raise BenchError(missing)
        self.exe: str = exe
        self.pin = pin
        self.dir = tempfile.mkdtemp(prefix=self.dir_prefix)
        self.port = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.version = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, self.log_name)

    def _launch(self) -> subprocess.Popen[bytes]:  # pragma: no cover - abstract
        """Start the server on ``self.port``."""
        raise NotImplementedError

    def _probe(self) -> None:  # pragma: no cover - abstract
        """Return once the server answers (setting ``version``); OSError until then."""
        raise NotImplementedError

    def __enter__(self: _P) -> _P:
        import socket

        for _ in range(5):  # a free port can be taken between probe and bind: try another
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.proc = self._launch()
            if self.pin and _can_pin():
                os.sched_setaffinity(self.proc.pid, {0})
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self._probe()
                    return self
                except OSError:
                    time.sleep(0.05)
            self._stop()
        log = ""
        try:
            with open(self.log_path) as f:
                log = f.read()[-2000:]
        except OSError:
            pass
        self.__exit__(None, None, None)
        raise BenchError(f"{self.name} did not start:\n{log}")

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self._stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisProcess(_ServerProcess):
    """``redis-server`` on loopback, a free port and a temporary directory,
    with ``appendonly yes`` and ``appendfsync always`` (fsync before each
    reply, like pimcore's durability sync); pinned to CPU 0 like the broker.
    BenchError when redis-server is not installed."""

    name = "redis-server"
    dir_prefix = "pimcore-bench-redis-"
    log_name = "redis.log"

    def __init__(self, pin: bool = True) -> None:
        super().__init__(shutil.which("redis-server"),
                         "--compare redis needs redis-server on the PATH: apt-get install redis-server", pin)

    def _launch(self) -> subprocess.Popen[bytes]:
        cmd = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
               "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
               "--daemonize", "no", "--logfile", self.log_path]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent)

    def _probe(self) -> None:
        info = resp_command("127.0.0.1", self.port, b"INFO", b"server")
        self.version = next((ln.split(":", 1)[1] for ln in info.decode().splitlines()
                             if ln.startswith("redis_version:")), "?")


def resp_encode(*args: bytes) -> bytes:
    """One RESP command (an array of bulk strings)."""
    return b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args])


def resp_command(host: str, port: int, *args: bytes, timeout: float = 2.0) -> bytes:
    """Send one command on a fresh connection and return the reply's value
    (bulk or simple string, integer as text); OSError when unreachable,
    BenchError for an error reply."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(resp_encode(*args))
        buf = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            buf += chunk
            head, sep, rest = buf.partition(b"\r\n")
            if not sep:
                continue
            if head[:1] == b"-":
                raise BenchError(f"redis: {head[1:].decode(errors='replace')}")
            if head[:1] in (b"+", b":"):
                return head[1:]
            if head[:1] == b"$":
                n = int(head[1:])
                if n < 0:
                    return b""
                if len(rest) >= n + 2:
                    return rest[:n]
                continue
            raise BenchError(f"redis: unexpected reply {head[:40]!r}")


def run_redis(cfg: BenchConfig) -> BenchResult:
    """The same shape as ``run_bench(cfg)`` against a fresh redis-server with
    ``appendfsync always``: each connection XADDs to its own stream
    (``XADD bench:sN MAXLEN ~ 100000 * d PAYLOAD``: trimmed, so memory stays
    bounded) with ``window`` commands in flight; send->reply is the ack
    latency.  Senders only: a recipient has no Redis counterpart here.
    Driven by the C generator's RESP mode, or by a trio RESP driver (with a
    note: its CPU may be the limit) when there is no C generator or
    ``generator="python"``.  BenchError when redis-server is missing, or for
    ``generator="c"`` without a C generator."""
    note = ""
    if cfg.generator == "python":
        exe: Optional[str] = None
    else:
        exe, why = c_generator()
        if exe is None:
            if cfg.generator == "c":
                raise BenchError(why)
            note = why + "; Redis driven by the trio RESP driver (its CPU may limit the run)"
    with RedisProcess(cfg.pin) as redis, _generator_cpus(cfg.pin):
        samples: dict[str, Any] = {}

        def sample(name: str) -> None:
            samples[name] = (_proc_cpu_seconds(redis.pid), _proc_memory(redis.pid), time.monotonic(),
                             _proc_cpu_wait(redis.pid))

        quotas = [0] * cfg.conns
        if cfg.count is not None:
            quotas = [cfg.count // cfg.conns + (1 if i < cfg.count % cfg.conns else 0) for i in range(cfg.conns)]
        plan = [f"1 0 {quotas[i]} bench:s{i} -" for i in range(cfg.conns)]
        if exe is not None:
            r = _run_c(cfg, exe, "resp", "127.0.0.1", redis.port, plan, 0, lambda: sample("ready"),
                       lambda: sample("done"))
        else:
            r = trio.run(_resp_trio, cfg, redis.port, quotas, lambda: sample("ready"), lambda: sample("done"))
        version = redis.version
    ack_lat: array[int] = array("q")
    ack_lat.frombytes(r["ack_lat"])
    seconds = cfg.duration if cfg.count is None else max(1e-9, (r["last_ack"] - r["first_send"]) / _NS)
    gen_cpu = r["cpu"] / r["wall"] if r["wall"] > 0 else 0.0
    errors = {**r["errors"], **{f"Close {c}": n for c, n in r["closes"].items()}}
    res = BenchResult(
        config=asdict(replace(cfg, online=False)),
        broker={"url": f"redis://127.0.0.1:{redis.port}", "pid": redis.pid, "backend": f"redis {version}",
                "connections": cfg.conns},
        seconds=seconds,
        acked=r["acked"],
        acked_per_s=r["acked"] / seconds,
        deliveries=0,
        deliveries_per_s=0.0,
        stored_entries_per_s=r["acked"] / seconds,
        ack_latency_us=_percentiles(ack_lat),
        delivery_latency_us={"count": 0},
        errors=errors,
        generator_cpu=gen_cpu,
        generator_saturated=gen_cpu >= 0.9,
        logged_in=r["logged_in"],
        login_seconds=r["connect_seconds"],
        ack_histogram=_histogram_buckets(ack_lat),
        peer="redis",
        generator="c" if exe is not None else "python",
        generator_note=note,
        generator_cpu_us_per_msg=r["cpu"] / r["sent"] * 1e6 if r["sent"] else None,
    )
    _server_figures(res, samples, r["sent"])
    res.limit = _diagnose(res)
    return res


async def _resp_trio(cfg: BenchConfig, port: int, quotas: list[int], on_ready: Any, on_done: Any) -> dict[str, Any]:
    """The trio twin of the C generator's RESP mode: one task per connection
    XADDing to ``bench:sN`` with ``window`` commands in flight, replies
    matched in order; returns the same dict as :func:`_run_c`."""
    st = _Stats()
    errors: dict[str, int] = {}
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(cfg.conns)]
    filler = secrets.token_bytes(cfg.size - 8)
    on_ready()
    st.measure_from, st.measure_to = _window(cfg)
    stop = st.measure_to if cfg.count is None else 0
    cpu0, wall0 = time.process_time(), time.monotonic()

    async def conn(i: int, stream: trio.SocketStream) -> None:
        key = b"bench:s%d" % i
        head = b"*8\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$6\r\n100000\r\n$1\r\n*\r\n$1\r\nd\r\n$%d\r\n" % (
            len(key), key, cfg.size)
        inflight: list[int] = []  # send times, in order: Redis replies in order
        first = 0
        sent = 0
        buf = b""
        mono = time.monotonic_ns
        while True:
            out = []
            while len(inflight) - first < cfg.window:
                now = mono()
                if (quotas[i] and sent >= quotas[i]) or (not quotas[i] and stop and now >= stop):
                    break
                inflight.append(now)
                sent += 1
                out.append(head + now.to_bytes(8, "big") + filler + b"\r\n")
            if out:
                st.sent += len(out)
                if not st.first_send:
                    st.first_send = mono()
                await stream.send_all(b"".join(out))
            if first == len(inflight):
                return
            data = await stream.receive_some(1 << 16)
            if not data:
                errors["connection closed by broker"] = errors.get("connection closed by broker", 0) + 1
                return
            buf += data
            while True:
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    break
                kind = buf[:1]
                used = line_end + 2
                if kind == b"$":
                    n = int(buf[1:line_end])
                    if n >= 0:
                        if len(buf) < used + n + 2:
                            break
                        used += n + 2
                buf = buf[used:]
                sent_at = inflight[first]
                first += 1
                if kind == b"-":
                    errors["error reply"] = errors.get("error reply", 0) + 1
                    continue
                now = mono()
                st.last_ack = now
                if st.measure_from <= sent_at < st.measure_to:
                    st.acked += 1
                    st.ack_lat.append(now - sent_at)

    async with trio.open_nursery() as nursery:
        for i, stream in enumerate(streams):
            nursery.start_soon(conn, i, stream)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    on_done()
    for stream in streams:
        await stream.aclose()
    return {"acked": st.acked, "sent": st.sent, "deliveries": 0, "ack_lat": st.ack_lat.tobytes(), "del_lat": b"",
            "errors": errors, "closes": {}, "first_send": st.first_send, "last_ack": st.last_ack, "cpu": cpu,
            "wall": wall, "logged_in": len(streams), "connect_seconds": 0.0}


# ---------------------------------------------------------------- Mosquitto, the MQTT peer

_MOSQUITTO_MISSING = "--compare mosquitto needs mosquitto on the PATH (or in /usr/sbin): apt-get install mosquitto"
#: MQTT packet ids are 16 bits: the C generator's MQTT mode keeps at most this many in flight.
_MQTT_MAX_WINDOW = 16384


def _mosquitto_exe() -> Optional[str]:
    """The mosquitto binary: on the PATH, else where Debian puts it
    (/usr/sbin, not on an ordinary user's PATH)."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin")


class MosquittoProcess(_ServerProcess):
    """``mosquitto`` (MQTT 3.1.1/5 broker) on loopback and a free port, from a
    temporary config file: anonymous, ``persistence false`` (Mosquitto never
    fsyncs before a PUBACK in any setting: its persistence is a periodic
    snapshot), ``max_inflight_messages 0`` (no per-client limit on QoS 1
    messages in flight to a subscriber; the default, 20, would throttle a
    window of 64), ``max_queued_messages 100000`` (default 1000) and
    ``set_tcp_nodelay true`` (off by default; the broker and Redis both turn
    Nagle off); pinned to CPU 0 like the broker.  Its log (stderr) goes to a
    file in the temporary directory.  BenchError when mosquitto is not
    installed or does not start."""

    name = "mosquitto"
    dir_prefix = "pimcore-bench-mosquitto-"
    log_name = "mosquitto.log"

    def __init__(self, pin: bool = True) -> None:
        super().__init__(_mosquitto_exe(), _MOSQUITTO_MISSING, pin)

    def config(self) -> str:
        """The config file's text for ``self.port``."""
        return (f"listener {self.port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                "max_inflight_messages 0\n"
                "max_queued_messages 100000\n"
                "set_tcp_nodelay true\n")

    def _launch(self) -> subprocess.Popen[bytes]:
        conf = os.path.join(self.dir, "mosquitto.conf")
        with open(conf, "w") as f:
            f.write(self.config())
        with open(self.log_path, "ab") as logf:
            return subprocess.Popen([self.exe, "-c", conf], stdout=logf, stderr=logf, preexec_fn=_die_with_parent)

    def _probe(self) -> None:
        mqtt_connect("127.0.0.1", self.port)
        try:
            with open(self.log_path) as f:
                self.version = next((ln.split("version ", 1)[1].split()[0] for ln in f
                                     if "mosquitto version" in ln), "?")
        except OSError:
            self.version = "?"


def mqtt_connect(host: str, port: int, timeout: float = 2.0) -> None:
    """One MQTT 3.1.1 CONNECT (clean session) and its CONNACK on a fresh
    connection, then DISCONNECT: is an MQTT broker there?  OSError when
    unreachable or the connection closes, BenchError for a refusal or a
    reply that is not a CONNACK."""
    import socket

    client_id = f"pimbench-probe-{os.getpid()}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(bytes([0x10, len(body)]) + body)
        buf = b""
        while len(buf) < 4:
            chunk = s.recv(4 - len(buf))
            if not chunk:
                raise ConnectionError("the MQTT broker closed the connection")
            buf += chunk
        if buf[:2] != b"\x20\x02":
            raise BenchError(f"mqtt: unexpected reply to CONNECT {buf!r}")
        if buf[3]:
            raise BenchError(f"mqtt: CONNECT refused (CONNACK return code {buf[3]})")
        s.sendall(b"\xe0\x00")


def run_mosquitto(cfg: BenchConfig) -> BenchResult:
    """The same shape as ``run_bench(cfg)`` against a fresh mosquitto
    (:class:`MosquittoProcess`): connection N PUBLISHes at QoS 1 to topic
    ``bench/sN`` with ``window`` packet ids in flight; send->PUBACK is the ack
    latency.  With ``cfg.online`` (e.g. the e2e-1x64 shape) each sender has a
    subscriber on its topic (SUBSCRIBE QoS 1) that PUBACKs every message, and
    deliveries and send->delivery latency are counted, as for the broker's
    recipients.  Driven by the C generator's MQTT mode only.  BenchError when
    mosquitto is missing, for ``generator="python"`` or without a C
    generator."""
    if cfg.generator == "python":
        raise BenchError("--compare mosquitto runs the C generator only (there is no trio MQTT driver)")
    exe, why = c_generator()
    if exe is None:
        raise BenchError(why + "; --compare mosquitto needs the C generator")
    with MosquittoProcess(cfg.pin) as mq, _generator_cpus(cfg.pin):
        samples: dict[str, Any] = {}

        def sample(name: str) -> None:
            samples[name] = (_proc_cpu_seconds(mq.pid), _proc_memory(mq.pid), time.monotonic(),
                             _proc_cpu_wait(mq.pid))

        quotas = [0] * cfg.conns
        if cfg.count is not None:
            quotas = [cfg.count // cfg.conns + (1 if i < cfg.count % cfg.conns else 0) for i in range(cfg.conns)]
        plan = []
        for i in range(cfg.conns):
            plan.append(f"1 0 {quotas[i]} bench/s{i} -")
            if cfg.online:
                plan.append(f"0 1 0 bench/s{i} -")
        r = _run_c(cfg, exe, "mqtt", "127.0.0.1", mq.port, plan, 1 if cfg.online else 0, lambda: sample("ready"),
                   lambda: sample("done"))
        version = mq.version
    ack_lat: array[int] = array("q")
    ack_lat.frombytes(r["ack_lat"])
    del_lat: array[int] = array("q")
    del_lat.frombytes(r["del_lat"])
    seconds = cfg.duration if cfg.count is None else max(1e-9, (r["last_ack"] - r["first_send"]) / _NS)
    gen_cpu = r["cpu"] / r["wall"] if r["wall"] > 0 else 0.0
    errors = {**r["errors"], **{f"Close {c}": n for c, n in r["closes"].items()}}
    res = BenchResult(
        config=asdict(cfg),
        broker={"url": f"mqtt://127.0.0.1:{mq.port}", "pid": mq.pid, "backend": f"mosquitto {version}",
                "connections": len(plan)},
        seconds=seconds,
        acked=r["acked"],
        acked_per_s=r["acked"] / seconds,
        deliveries=r["deliveries"],
        deliveries_per_s=r["deliveries"] / seconds,
        stored_entries_per_s=0.0,  # nothing is stored: persistence false, and a QoS 1 PUBACK means "taken"
        ack_latency_us=_percentiles(ack_lat),
        delivery_latency_us=_percentiles(del_lat),
        errors=errors,
        generator_cpu=gen_cpu,
        generator_saturated=gen_cpu >= 0.9,
        logged_in=r["logged_in"],
        login_seconds=r["connect_seconds"],
        ack_histogram=_histogram_buckets(ack_lat),
        delivery_histogram=_histogram_buckets(del_lat),
        peer="mosquitto",
        generator="c",
        generator_cpu_us_per_msg=r["cpu"] / r["sent"] * 1e6 if r["sent"] else None,
    )
    _server_figures(res, samples, r["sent"])
    res.limit = _diagnose(res)
    return res


# ---------------------------------------------------------------- side by side


def _median(xs: list[float]) -> Optional[float]:
    import statistics

    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _compare_medians(rounds: list[dict[str, Any]], peer: str) -> tuple[dict[str, dict[str, Any]], list[int]]:
    """The medians of a comparison's rounds, per side and field, over the
    rounds where neither side had errors (all of them if every round had):
    ``(median, counted)``, ``counted`` the 1-based numbers of those rounds.
    Why: a round whose broker died half-way (its throughput divided by a
    window it did not live through) went into the medians and the ratio
    unmarked (a new user's trial: 0.13x)."""
    clean = [i for i, r in enumerate(rounds, 1) if not any(r[n]["errors"] for n in ("pimcore", peer))]
    use = clean or list(range(1, len(rounds) + 1))
    rows = [rounds[i - 1] for i in use]
    median = {name: {k: _median([r[name][k] for r in rows]) for k in rows[0][name] if k not in _WORDS}
              for name in ("pimcore", peer)}
    return median, use


#: The fields of a compare round's summary that are words, not figures.
_WORDS = ("limit", "server_cpu_reason")


def _summary(res: BenchResult) -> dict[str, Any]:
    return {
        "acked_per_s": res.acked_per_s,
        "deliveries_per_s": res.deliveries_per_s,
        "p50_us": res.ack_latency_us.get("p50"),
        "p99_us": res.ack_latency_us.get("p99"),
        "delivery_p50_us": res.delivery_latency_us.get("p50"),
        "server_cpu_us_per_msg": res.broker_cpu_us_per_msg,
        "server_cpu_util": res.broker_cpu_util,
        "server_cpu_wait": res.broker_cpu_wait,
        "server_cpu_reason": res.broker_cpu_reason,  # why server_cpu_us_per_msg is None (a run too short)
        "generator_cpu": res.generator_cpu,
        "errors": sum(res.errors.values()),
        "limit": res.limit,
    }


def run_compare(cfg: BenchConfig, peer: str = "redis", rounds: int = 3,
                on_round: Optional[Any] = None) -> dict[str, Any]:
    """pimcore and ``peer`` alternately, ``rounds`` times each, the same shape
    (a fresh broker / server per run: the machine's noise hits both alike).

    Returns ``{"peer", "shape", "rounds": [{"pimcore": summary, peer:
    summary}], "median": {"pimcore": .., peer: ..}, "ratio": {"acked_per_s":
    pimcore/peer, "p50": pimcore/peer}, "notes": [..]}``; ``on_round(i,
    name, BenchResult)`` is called after each run.  BenchError for an unknown
    or missing peer ("redis" or "mosquitto").  With ``cfg.online`` (end to
    end) ``ratio`` also has ``deliveries_per_s`` (None against Redis, which
    runs the senders only)."""
    if peer not in ("redis", "mosquitto"):
        raise BenchError(f"--compare {peer}: unknown peer (redis, mosquitto)")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    if cfg.url is not None:
        raise BenchError("--compare starts its own broker: drop --url")
    if peer == "redis" and shutil.which("redis-server") is None:
        raise BenchError("--compare redis needs redis-server on the PATH: apt-get install redis-server")
    if peer == "mosquitto":
        if _mosquitto_exe() is None:
            raise BenchError(_MOSQUITTO_MISSING)
        if cfg.window > _MQTT_MAX_WINDOW:  # refused before the pimcore rounds run, not after
            raise BenchError(f"--compare mosquitto: --window must be <= {_MQTT_MAX_WINDOW} (16-bit MQTT packet ids)")
        if cfg.generator == "python":
            raise BenchError("--compare mosquitto runs the C generator only (there is no trio MQTT driver)")
        exe, why = c_generator()
        if exe is None:
            raise BenchError(why + "; --compare mosquitto needs the C generator")
    notes = []
    if cfg.mode != "direct":
        raise BenchError("--compare runs 1:1 shapes only (no --group)")
    if cfg.online and peer == "redis":
        notes.append("Redis runs the senders only (XADD, no reader): its figures are send->reply, not end to end")
    if peer == "redis" and cfg.durability == "os":
        # (As the mosquitto comparison says its peer never fsyncs: here it is
        # pimcore that did not -- a new user's trial read the table as like
        # for like.)
        notes.append("pimcore: durability os -- it did not fsync before a SendAck, while Redis (appendfsync always)"
                     " fsyncs before every reply: not like for like (--durability log or sync is)")
    if peer == "mosquitto":
        notes.append(f"Mosquitto: QoS 1, persistence false -- it never fsyncs before a PUBACK"
                     f" (pimcore: durability {cfg.durability})")
        if cfg.idle:
            notes.append(f"--idle {cfg.idle}: the idle connections are held against pimcore only")
    out: list[dict[str, Any]] = []
    for i in range(rounds):
        row: dict[str, Any] = {}
        for name, run in (("pimcore", run_bench), (peer, run_redis if peer == "redis" else run_mosquitto)):
            res = run(cfg)
            row[name] = _summary(res)
            if res.generator_note and f"{name}: {res.generator_note}" not in notes:
                notes.append(f"{name}: {res.generator_note}")
            if on_round is not None:
                on_round(i, name, res)
        out.append(row)
    coarse = _coarse_note(out, peer)
    if coarse:  # (the text said it, --json's notes did not -- a new user's trial)
        notes.append(coarse)
    median, counted = _compare_medians(out, peer)

    def ratio(k: str) -> Optional[float]:
        a, b = median["pimcore"][k], median[peer][k]
        return a / b if a is not None and b else None

    ratios = {"acked_per_s": ratio("acked_per_s"), "p50": ratio("p50_us"),
              "server_cpu_us_per_msg": ratio("server_cpu_us_per_msg")}
    if cfg.online:
        ratios["deliveries_per_s"] = ratio("deliveries_per_s")
        ratios["delivery_p50"] = ratio("delivery_p50_us")
    return {
        "peer": peer,
        "shape": {"conns": cfg.conns, "window": cfg.window, "size": cfg.size, "online": cfg.online,
                  "durability": cfg.durability, "duration": cfg.duration, "warmup": cfg.warmup},
        "rounds": out,
        "median": median,
        "counted": counted,
        "ratio": ratios,
        "notes": notes,
    }


def _coarse_note(rounds: list[dict[str, Any]], peer: str) -> Optional[str]:
    """The note of rounds too short for a server CPU figure (their CPU
    µs/msg is '-' in the table, null in --json), or None."""
    coarse = next((r[n].get("server_cpu_reason") for r in rounds for n in ("pimcore", peer)
                   if r[n].get("server_cpu_reason")), None)
    return f"CPU µs/msg '-': {coarse.split(' and ')[0]}" if coarse else None


def format_compare(rep: dict[str, Any]) -> str:
    """The side-by-side table of :func:`run_compare`'s report."""
    sh, peer = rep["shape"], rep["peer"]

    def num(v: Optional[float], fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    e2e = bool(sh.get("online")) and peer == "mosquitto"  # deliveries on both sides
    w = 11 if peer == "mosquitto" else 9
    head = (f"{'round':<7}{'peer':<{w}}{'acked/s':>11}" + (f"{'deliv/s':>11}{'deliv p50':>10}" if e2e else "")
            + f"{'p50 µs':>9}{'p99 µs':>9}{'CPU µs/msg':>11}{'srv CPU':>8}{'CPU wait':>9}{'gen CPU':>8}  limit")
    how = ("redis appendfsync always" if peer == "redis"
           else "mosquitto QoS 1, persistence false (no fsync)")
    lines = [
        f"pimcore bench --compare {peer}: {sh['conns']} conns x {sh['window']} in flight"
        + (", a recipient acking every message" if sh.get("online") else "") + f", {sh['size']} B payloads,"
        f" pimcore durability {sh['durability']}, {how};"
        f" {len(rep['rounds'])} alternating round(s) of {sh['duration']:g} s",
        "",
        head,
    ]

    def row(label: str, name: str, s: dict[str, Any]) -> str:
        deliv = (f"{num(s.get('deliveries_per_s'), ',.0f'):>11}{num(s.get('delivery_p50_us'), ',.0f'):>10}"
                 if e2e else "")
        return (f"{label:<7}{name:<{w}}{num(s['acked_per_s'], ',.0f'):>11}{deliv}{num(s['p50_us'], ',.0f'):>9}"
                f"{num(s['p99_us'], ',.0f'):>9}{num(s['server_cpu_us_per_msg'], '.1f'):>11}"
                f"{num(s['server_cpu_util'], '.0%'):>8}{num(s.get('server_cpu_wait'), '.0%'):>9}"
                f"{num(s['generator_cpu'], '.0%'):>8}  {s.get('limit', '')}")

    counted = rep.get("counted") or list(range(1, len(rep["rounds"]) + 1))
    for i, r in enumerate(rep["rounds"], 1):
        for name in ("pimcore", peer):
            lines.append(row(str(i) if i in counted else f"{i}*", name, r[name]))
    if len(counted) < len(rep["rounds"]):
        lines.append(f"* a round with errors: not in the medians ({len(counted)} of {len(rep['rounds'])} rounds are)")
    elif any(r[n]["errors"] for r in rep["rounds"] for n in ("pimcore", peer)):
        lines.append("every round had errors: the medians take them all")
    lines.append("")
    for name in ("pimcore", peer):
        lines.append(row("median", name, rep["median"][name]))
    ra = rep["ratio"]
    lines.append("")

    def times(v: Optional[float]) -> str:  # (it said "-x" for no ratio -- a new user's trial)
        return "n/a" if v is None else f"{v:.2f}x"

    lines.append(f"pimcore / {peer}: acked sends/s {times(ra['acked_per_s'])}, p50 send->ack"
                 f" {times(ra['p50'])}, server CPU per message {times(ra['server_cpu_us_per_msg'])}")
    if e2e:
        lines.append(f"pimcore / {peer}: deliveries/s {times(ra.get('deliveries_per_s'))}, p50 send->delivery"
                     f" {times(ra.get('delivery_p50'))}")
    if any(r[n]["errors"] for r in rep["rounds"] for n in ("pimcore", peer)):
        lines.append("WARNING: some runs had errors (see --json)")
    coarse = _coarse_note(rep["rounds"], peer)
    if coarse and coarse not in rep["notes"]:  # (a report of before the note was among the notes)
        lines.append(f"note: {coarse}")
    for n in rep["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


# ---------------------------------------------------------------- output


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / (1 << 20):,.1f} MiB"


def format_result(res: BenchResult) -> str:
    """The human-readable table."""
    c = res.config
    what = (
        f"group of {c['group_size']:,}" if c["mode"] == "group"
        else f"1:1 chats, recipients {'online' if c['online'] else 'offline'}"
    )
    if c["conns"] == 0:
        return "\n".join([
            f"pimcore bench: {res.logged_in:,} authenticated idle connections held {c['hold']:.1f} s"
            f" (logged in within {res.login_seconds:.1f} s by {c['procs']} generator process(es))",
            f"broker {res.broker['url']} (pid {res.broker['pid'] or '-'}, {res.broker['backend'] or '?'} backend)",
            "",
            f"  broker memory      peak RSS {_mib(res.broker_peak_rss)}, heap {_mib(res.broker_rss_anon)}",
            "  memory/connection  " + ("-" if res.broker_bytes_per_connection is None
                                        else f"{res.broker_bytes_per_connection / 1024:.1f} KiB (RSS growth / connections)"),
            f"  errors             {sum(res.errors.values()):,}" + (f"   {res.errors}" if res.errors else ""),
        ])
    if res.failed:
        return _format_failed(res, what)
    lines = [
        f"pimcore bench: {what}; {c['conns']} conns x {c['window']} in flight, {c['size']} B payloads,"
        f" durability {c['durability'] if not c['url'] else '(external broker)'}",
        f"broker {res.broker['url']} (pid {res.broker['pid'] or '-'}, {res.broker['backend'] or '?'} backend),"
        f" {res.broker['connections']:,} connections, generator {c['procs']} process(es)",
        f"measured {res.seconds:.2f} s" + (f" after {c['warmup']:.1f} s warm-up" if c["count"] is None else ""),
        "",
        f"  acked sends        {res.acked:>12,}   {res.acked_per_s:>12,.0f} /s",
    ]
    if res.rate_note:
        lines.append(f"                     ({res.rate_note})")
    if res.deliveries or c["mode"] == "group" or c["online"]:
        lines.append(f"  deliveries         {res.deliveries:>12,}   {res.deliveries_per_s:>12,.0f} /s  (pushed to online devices)")
    lines.append(f"  inbox entries                       {res.stored_entries_per_s:>12,.0f} /s  (stored, {res.config['mode']} fan-out)")
    lines.append(f"  errors             {sum(res.errors.values()):>12,}" + (f"   {res.errors}" if res.errors else ""))
    lines.append("")
    lines.append(f"  latency (µs)       {'p50':>9} {'p90':>9} {'p99':>9} {'p99.9':>9} {'max':>9}")
    for name, h in (("send -> SendAck", res.ack_latency_us), ("send -> delivery", res.delivery_latency_us)):
        if h.get("count"):
            lines.append(f"  {name:<18}" + "".join(f" {h[k]:>9,.0f}" for k in ("p50", "p90", "p99", "p99.9", "max")))
    lines.append("")
    if res.broker_cpu_reason is not None:
        lines.append(f"  broker CPU         n/a per send, {res.broker_cpu_reason}")
    elif res.broker_cpu_us_per_msg is not None:
        lines.append(f"  broker CPU         {res.broker_cpu_us_per_msg:>9.1f} µs per send   ({res.broker_cpu_util:.0%} of a core"
                     + (f", waited for a CPU {res.broker_cpu_wait:.0%} of the time)" if res.broker_cpu_wait is not None
                        else ")"))
    if res.broker_peak_rss is not None:
        lines.append(f"  broker memory      peak RSS {_mib(res.broker_peak_rss)}, heap {_mib(res.broker_rss_anon)} at the end"
                     " (the rest is LMDB's mapped file)")
    if res.broker_bytes_per_connection is not None and c["idle"]:
        lines.append(f"  memory/connection  {res.broker_bytes_per_connection / 1024:>9.1f} KiB (broker RSS growth / connections)")
    per = "" if res.generator_cpu_us_per_msg is None else f", {res.generator_cpu_us_per_msg:.1f} µs per send"
    lines.append(f"  generator CPU      {res.generator_cpu:>9.0%} of a core (busiest process{per};"
                 f" {'C, one thread, epoll' if res.generator == 'c' else 'trio'} generator)")
    if res.generator_note:
        lines.append(f"  note: {res.generator_note}")
    if res.limit:
        lines.append(f"  limited by         {res.limit}")
    if res.generator_saturated:
        lines.append("  WARNING: the generator's CPU was saturated: these figures are a lower bound for the broker;"
                     " use --procs or fewer connections")
    return "\n".join(lines)


def _format_failed(res: BenchResult, what: str) -> str:
    """The report of a failed run: why, what the broker said last, what was
    counted before -- no rates, no CPU figures, no limit."""
    c = res.config
    lines = [
        f"pimcore bench: {what}; {c['conns']} conns x {c['window']} in flight, {c['size']} B payloads,"
        f" durability {c['durability'] if not c['url'] else '(external broker)'}",
        f"broker {res.broker['url']} (pid {res.broker['pid'] or '-'}, {res.broker['backend'] or '?'} backend)",
        "",
        f"  FAILED: {res.failed}: no rates (the run did not last its window)",
    ]
    for line in (res.broker_exit or {}).get("last_lines") or []:
        lines.append(f"  broker said: {line}")
    lines.append(f"  acked sends        {res.acked:>12,}   before it exited")
    if res.deliveries or c["mode"] == "group" or c["online"]:
        lines.append(f"  deliveries         {res.deliveries:>12,}")
    lines.append(f"  errors             {sum(res.errors.values()):>12,}" + (f"   {res.errors}" if res.errors else ""))
    return "\n".join(lines)


def _rate(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def plot_histograms(res: BenchResult, path: str) -> None:
    """Latency histograms (log x) to an image file; needs matplotlib."""
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BenchError("--plot needs matplotlib: pip install 'pimcore[plot]'") from exc
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, buckets in (("send → SendAck", res.ack_histogram), ("send → delivery", res.delivery_histogram)):
        if buckets:
            xs, ys = zip(*buckets)
            ax.step(xs, ys, where="pre", label=label)  # a bucket counts (previous bound, its bound]
    # p50 / p99 as dashed / dotted lines in each curve's colour.
    curves = (res.ack_latency_us, res.delivery_latency_us) if res.ack_histogram else (res.delivery_latency_us,)
    for i, (line, h) in enumerate(zip(list(ax.get_lines()), curves)):
        for j, (key, style) in enumerate((("p50", "--"), ("p99", ":"))):
            if h.get(key):
                ax.axvline(h[key], color=line.get_color(), linestyle=style, linewidth=1)
                ax.annotate(f"{key} {h[key]:,.0f} µs", (h[key], 1), xycoords=("data", "axes fraction"),
                            xytext=(3, -12 - 11 * j - 24 * i), textcoords="offset points", fontsize=8,
                            color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("latency (µs)")
    ax.set_ylabel("messages")
    ax.set_title(f"{res.peer} bench: {_rate(res.acked_per_s)} acked sends/s; limited by {res.limit.split(':')[0].split(' (')[0]}"
                 if res.limit else f"{res.peer} bench: {_rate(res.acked_per_s)} acked sends/s", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_result(res: BenchResult, as_json: bool, out: TextIO = sys.stdout) -> None:
    out.write((res.to_json() if as_json else format_result(res)) + "\n")
