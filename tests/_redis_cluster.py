"""A throwaway Redis Cluster for tests: 3 masters, 3 replicas on loopback.

:class:`RedisCluster` starts six ``redis-server`` processes on free loopback
ports, each in a directory of its own under ``root``, joins them with
``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`` and
waits until every node says ``cluster_state:ok`` and every master has its
replica linked (before that ``WAIT 1`` reports 0 and ``min-replicas-to-write``
refuses writes).  :meth:`RedisCluster.stop` kills them all.

Settings, and why (docs/OPERATIONS.md, "Redis Cluster"; measured facts in
the design notes):

* ``min-replicas-to-write 1`` (with ``min-replicas-max-lag 10``): a master
  cut off from its replica stops taking writes rather than accepting writes
  a failover will drop.
* ``appendonly yes`` + ``appendfsync everysec``: a node restarted in place
  keeps what it had up to a second ago.  What makes an acknowledged write
  survive a master's death is not the AOF (a failed-over master rejoins as
  a replica and its AOF is discarded by the full resync) but ``WAIT 1`` on
  the writing connection reporting the replica has it.
* ``repl-diskless-sync yes`` with delay 0: replicas link at once (with the
  default 5 s delay ``WAIT`` blocks for the first seconds).
* ``cluster-node-timeout``: 2000 ms by default.  The prototype used 500 ms
  (replica promoted 1.7 s after a kill -9), but this machine is shared by a
  full test suite on 2 cores: a stall of half a second must not fail over a
  healthy master in the middle of an unrelated test.

Only the standard library: the readiness checks speak through ``redis-cli``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["RedisCluster", "missing", "free_port_pair"]

#: How long bring-up may take before it is an error (seconds).  2.2 s is
#: typical on loopback; a loaded CI machine gets ample slack.
START_TIMEOUT = 60.0


def missing() -> Optional[str]:
    """Why a Redis Cluster cannot be run here (None if it can): the reason a
    test that needs one is skipped."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install redis-server)"
    try:
        import coredis  # noqa: F401
        import hiredis  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install 'pimcore[redis]')"
    return None


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int]) -> int:
    """A loopback port P such that P and P + 10000 (Redis Cluster's bus port)
    are both free now.  Ports come from the kernel's ephemeral allocator,
    retried until the bus port fits below 65536 and is free too."""
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # The kernel's ephemeral range is usually 32768-60999: map it into
        # 20000-29999 so P + 10000 is a valid port too.
        port = 20000 + port % 10000
        if port in taken or port + 10000 in taken:
            continue
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free loopback port pair for a Redis node")


@dataclass
class RedisCluster:
    """A 3-master 3-replica cluster rooted at ``root`` (a fresh directory)."""

    root: Path
    masters: int = 3
    node_timeout_ms: int = 2000
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    # -- lifecycle ------------------------------------------------------

    def start(self) -> "RedisCluster":
        taken: set[int] = set()
        for _ in range(self.masters * 2):
            port = free_port_pair(taken)
            taken.update((port, port + 10000))
            self.ports.append(port)
        try:
            for port in self.ports:
                self._spawn(port)
            deadline = time.monotonic() + START_TIMEOUT
            for port in self.ports:
                self._wait_ping(port, deadline)
            out = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", "1", "--cluster-yes"],
                capture_output=True, text=True, timeout=START_TIMEOUT,
            )
            if out.returncode != 0 or "[OK] All 16384 slots covered" not in out.stdout:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
            self.wait_healthy(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, port: int) -> None:
        d = self.root / str(port)
        d.mkdir(parents=True, exist_ok=True)
        args = [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--dir", str(d),
            "--logfile", str(d / "redis.log"),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--min-replicas-to-write", "1",
            "--min-replicas-max-lag", "10",
            "--repl-diskless-sync", "yes",
            "--repl-diskless-sync-delay", "0",
        ]
        self.procs[port] = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Kill every node (SIGKILL: nothing of theirs is kept) and wait."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a wedged process
                pass
        self.procs.clear()

    def __enter__(self) -> "RedisCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection -----------------------------------------------------

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.ports]

    @property
    def url(self) -> str:
        """``redis://HOST:PORT,HOST:PORT,...`` naming every node (what
        ``pimcore serve --store`` takes)."""
        return "redis://" + ",".join(f"{h}:{p}" for h, p in self.addresses)

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True, text=True, timeout=timeout,
        )
        return out.stdout

    def alive(self, port: int) -> bool:
        proc = self.procs.get(port)
        return proc is not None and proc.poll() is None

    def roles(self) -> dict[int, str]:
        """port -> "master" or "slave", for the nodes that are alive."""
        out = {}
        for port in self.ports:
            if self.alive(port):
                for line in self.cli(port, "role").splitlines()[:1]:
                    out[port] = line.strip()
        return out

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now (as a live node
        sees it in CLUSTER NODES)."""
        port0 = self.live_port()
        slot = int(self.cli(port0, "cluster", "keyslot", key).strip())
        for line in self.cli(port0, "cluster", "nodes").splitlines():
            parts = line.split()
            if len(parts) < 9 or "master" not in parts[2] or "fail" in parts[2]:
                continue
            for rng in parts[8:]:
                if rng.startswith("["):
                    continue  # a slot being migrated
                lo, _, hi = rng.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return int(parts[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"no master found for slot {slot}")

    def live_port(self) -> int:
        for port in self.ports:
            if self.alive(port):
                return port
        raise RuntimeError("every node is dead")

    def kill(self, port: int) -> None:
        """kill -9 one node."""
        proc = self.procs[port]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Start a killed node again in its directory: its nodes.conf makes
        it rejoin (a failed-over master comes back as a replica and resyncs
        in full).  Returns once it answers PING; call :meth:`wait_healthy`
        for the cluster."""
        if self.alive(port):
            raise RuntimeError(f"node {port} is running")
        self._spawn(port)
        self._wait_ping(port, time.monotonic() + START_TIMEOUT)

    # -- readiness ------------------------------------------------------

    def _wait_ping(self, port: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.alive(port):
                log = (self.root / str(port) / "redis.log")
                raise RuntimeError(f"redis-server on {port} exited:\n"
                                   + (log.read_text()[-2000:] if log.exists() else ""))
            if self.cli(port, "ping").strip() == "PONG":
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on {port} does not answer PING")

    def healthy(self) -> bool:
        """Every live node sees cluster_state:ok, and every live master has
        at least one replica linked (so ``WAIT 1`` can succeed)."""
        masters = 0
        for port in self.ports:
            if not self.alive(port):
                continue
            if "cluster_state:ok" not in self.cli(port, "cluster", "info"):
                return False
            info = self.cli(port, "info", "replication")
            if "role:master" in info:
                masters += 1
                if "connected_slaves:0" in info or "connected_slaves:" not in info:
                    return False
                if "state=online" not in info:
                    return False
        return masters == self.masters

    def wait_healthy(self, deadline: Optional[float] = None) -> None:
        deadline = deadline if deadline is not None else time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.healthy():
                return
            time.sleep(0.1)
        raise TimeoutError("Redis Cluster did not become healthy:\n"
                           + "\n".join(f"{p}: {self.cli(p, 'cluster', 'nodes')}" for p in self.ports
                                       if self.alive(p)))
