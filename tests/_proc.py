"""Run the real ``pimcore`` command in subprocesses (end-to-end tests).

``Proc`` wraps one process: a reader thread per output stream feeds its
lines to a queue, so a test can wait for a line with a timeout
(:meth:`Proc.expect`) while the process keeps running.  ``Server`` is a
``pimcore serve`` that waits for ``ready`` and parses its listen URLs.
``ProcGroup`` kills whatever is still running at the end of a test; use the
``procs`` fixture (import it into the test module).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence, Union

import pytest

__all__ = ["PIMCORE", "run_pimcore", "Proc", "Server", "ProcGroup", "procs", "free_port", "token_for"]

#: The command: ``python -m pimcore.cli`` with the test's interpreter.
PIMCORE = [sys.executable, "-m", "pimcore.cli"]

Arg = Union[str, os.PathLike, int, float]


def _env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"  # the chat prints ✓ and …
    env.pop("PIMCORE_SECRET", None)  # the tests choose the secret source
    if extra:
        env.update(extra)
    return env


def run_pimcore(*args: Arg, timeout: float = 30.0, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> subprocess.CompletedProcess[str]:
    """Run ``pimcore ARGS`` to completion (text output captured)."""
    return subprocess.run(
        [*PIMCORE, *map(str, args)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        env=_env(env),
        cwd=cwd,
    )


def token_for(user: str, data_dir: Path, *extra: Arg) -> str:
    """``pimcore token --user USER --data-dir DATA_DIR`` -> the token."""
    r = run_pimcore("token", "--user", user, "--data-dir", data_dir, *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessEnded(AssertionError):
    pass


class Proc:
    """One ``pimcore`` subprocess with line-buffered, queued output."""

    def __init__(self, args: Sequence[Arg], *, stdin: bool = False, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> None:
        self.args = [*PIMCORE, *map(str, args)]
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(env),
            cwd=cwd,
        )
        self.out: list[str] = []  # stdout lines so far (without newlines)
        self.err: list[str] = []
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout, self.out, self._lines), daemon=True),
            threading.Thread(target=self._pump, args=(self.popen.stderr, self.err, None), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream: IO[bytes], sink: list[str], q: Optional[queue.Queue[Optional[str]]]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sink.append(line)
            if q is not None:
                q.put(line)
        if q is not None:
            q.put(None)  # EOF

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.poll()

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.args[2:])}\n--- stdout\n" + "\n".join(self.out) + "\n--- stderr\n" + "\n".join(self.err)
        )

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait for the next stdout line matching ``pattern`` (re.search);
        lines before it are consumed.  Fails on timeout or end of output."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s\n{self.describe()}") from None
            if line is None:
                self._lines.put(None)  # stay at EOF
                time.sleep(0.1)  # let the stderr pump catch up for the message
                raise ProcessEnded(f"output ended before a line matching {pattern!r}\n{self.describe()}")
            m = rx.search(line)
            if m:
                return m

    def write(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def close_stdin(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (if still running) and reap."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for exit; then all output has been collected."""
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s\n{self.describe()}") from None
        for t in self._threads:
            t.join(timeout=5)
        return rc

    def close(self) -> None:
        self.close_stdin()
        self.kill()
        for t in self._threads:
            t.join(timeout=5)
        for s in (self.popen.stdout, self.popen.stderr):
            if s is not None:
                s.close()


class Server(Proc):
    """``pimcore serve``; construct, then :meth:`wait_ready`."""

    def __init__(self, *args: Arg, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> None:
        super().__init__(["serve", *args], env=env, cwd=cwd)
        self.urls: list[str] = []
        self.banner = ""

    def wait_ready(self, timeout: float = 20.0) -> "Server":
        deadline = time.monotonic() + timeout
        self.banner = self.expect(r"^pimcore .* data in ", timeout).string
        while True:
            m = self.expect(r"^(?:listening on (\S+)|ready; Ctrl-C to stop)$", max(0.1, deadline - time.monotonic()))
            if m.group(1) is None:
                return self
            self.urls.append(m.group(1))

    def url(self, scheme: str = "tcp") -> str:
        for u in self.urls:
            if u.startswith(scheme + "://"):
                return u
        raise LookupError(f"no {scheme} listener in {self.urls}")


class ProcGroup:
    """Starts processes and kills the ones still running at the end."""

    def __init__(self) -> None:
        self.all: list[Proc] = []

    def start(self, *args: Arg, stdin: bool = False, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> Proc:
        p = Proc(args, stdin=stdin, env=env, cwd=cwd)
        self.all.append(p)
        return p

    def serve(self, *args: Arg, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None, ready: bool = True) -> Server:
        s = Server(*args, env=env, cwd=cwd)
        self.all.append(s)
        if ready:
            s.wait_ready()
        return s

    def close(self) -> None:
        for p in self.all:
            try:
                p.close()
            except Exception:  # pragma: no cover - best effort
                pass


@pytest.fixture
def procs() -> Iterator[ProcGroup]:
    """A ProcGroup whose leftover processes are killed after the test."""
    group = ProcGroup()
    try:
        yield group
    finally:
        group.close()
