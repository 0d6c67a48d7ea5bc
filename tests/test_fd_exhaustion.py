"""A broker whose connections use up its file descriptors (RLIMIT_NOFILE):
it stays up, keeps committing (``log`` durability: its checkpoints fail and
are retried), says so in words, and serves clients once connections close.

The trial: ``pimcore serve --durability log`` under ``ulimit -n 256`` exited
1 with ``[Errno 24] Too many open files: '.../store/data.mdb'`` within a
second of 400 idle TCP connections.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from pimcore.auth import issue_token
from pimcore.client import ClientConfig, open_client
from pimcore.store import direct_conversation

from _proc import free_port

FAST = ClientConfig(connect_timeout=10.0, ack_timeout=5.0, send_timeout=20.0, backoff_max=0.5)
LIMIT = 128


def _limited() -> None:  # (in the child, before exec; the hard limit too: serve raises the soft one to it)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


class _Broker:
    def __init__(self, data: Path, port: int) -> None:
        env = dict(os.environ, PYTHONIOENCODING="utf-8")
        env.pop("PIMCORE_SECRET", None)
        self.p = subprocess.Popen(
            [sys.executable, "-m", "pimcore.cli", "serve", "--data-dir", str(data), "--listen",
             f"tcp://127.0.0.1:{port}", "--durability", "log", "--log-level", "info"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_limited)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    async def wait_for(self, needle: str) -> str:
        while True:  # (the caller's fail_after bounds it)
            for line in list(self.lines):
                if needle in line:
                    return line
            assert self.p.poll() is None, "the broker exited:\n" + "\n".join(self.lines)
            await trio.sleep(0.05)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._t.join(5)


async def test_a_log_broker_out_of_file_descriptors_stays_up_commits_and_serves_again(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    broker = _Broker(data, port)
    socks: list[socket.socket] = []
    try:
        with trio.fail_after(120):
            await broker.wait_for("ready")
            # One line at start: max_connections (100000 by default) is far
            # over the descriptors the broker may open.
            warned = [line for line in broker.lines if "open-files limit" in line]
            assert len(warned) == 1 and f"{LIMIT}" in warned[0] and "100000" in warned[0], broker.lines
            assert "ulimit -n" in warned[0]
            secret = (data / "secret").read_bytes().strip()
            url = f"tcp://127.0.0.1:{port}"
            conv = direct_conversation("alice", "bob")
            async with open_client(url, issue_token(secret, "alice"), device="a", config=FAST) as alice:
                await alice.send(conv, b"before the flood")
                # Idle connections until accept fails for want of descriptors.
                for _ in range(2 * LIMIT):
                    try:
                        socks.append(await trio.to_thread.run_sync(socket.create_connection, ("127.0.0.1", port), 2))
                    except OSError:
                        break
                await broker.wait_for("cannot accept connections on")
                # Commits go on (each one starts a checkpoint, which has no
                # descriptor for its file: it fails, and is retried later).
                for n in range(5):
                    await alice.send(conv, b"during the flood %d" % n)
                    await trio.sleep(0.3)  # (past checkpoint_seconds: the next commit tries one)
                assert broker.p.poll() is None, "\n".join(broker.lines)
            for s in socks:
                s.close()
            socks.clear()
            async with open_client(url, issue_token(secret, "bob"), device="b", config=FAST) as bob:
                got = await bob.fetch_history(conv, 0, 20)
                assert [m.payload for m in got][-6:] == [b"before the flood"] + [
                    b"during the flood %d" % n for n in range(5)]
        assert broker.p.poll() is None
        assert not [line for line in broker.lines if "Traceback" in line or "ERROR" in line], "\n".join(broker.lines)
        accept_warnings = [line for line in broker.lines if "cannot accept connections on" in line]
        assert 1 <= len(accept_warnings) <= 5
    finally:
        for s in socks:
            s.close()
        broker.stop()
    assert broker.p.returncode == 0 or broker.p.returncode == -15, "\n".join(broker.lines)


def test_the_start_up_warning_names_both_numbers_and_ulimit() -> None:
    from pimcore.cli import FD_RESERVE, nofile_shortfall

    assert nofile_shortfall(1000, 0, limit=1000 + FD_RESERVE) is None
    assert nofile_shortfall(100_000, 0, limit=None) is None  # unlimited
    said = nofile_shortfall(100_000, 1000, limit=1024)
    assert said is not None
    assert "max_connections 100000 + [http] max_connections 1000" in said
    assert f"up to {101_000 + FD_RESERVE} file descriptors" in said and "open-files limit 1024" in said
    assert f"ulimit -n {101_000 + FD_RESERVE}" in said


def test_serve_raises_its_open_files_limit_toward_what_max_connections_needs() -> None:
    """As Redis does for maxclients: the soft limit rises as far as the hard
    one allows (never lowered), so the start-up warning is left for a hard
    limit too low -- not every start on a host whose default ulimit -n is
    1,024."""
    code = ("import json, resource; R = resource.RLIMIT_NOFILE; resource.setrlimit(R, (256, 4096));"
            " from pimcore.cli import raise_nofile;"
            " print(json.dumps([raise_nofile(1000), raise_nofile(9000), raise_nofile(100), resource.getrlimit(R)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out) == [[256, 1000], [1000, 4096], None, [4096, 4096]]


async def test_a_broker_whose_map_grew_without_its_checkpoint_writes_again_once_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The map grows (it doubles when full) while the broker has no file
    # descriptor left for the resize's command log checkpoint: posts are
    # refused STORE_UNAVAILABLE meanwhile, and once a descriptor is free
    # again the next post writes the checkpoint and goes through -- and the
    # broker's deferred LMDB commits go on (its deferred task took the
    # failed commit for a stopped store and ended: a restart was needed).
    import errno

    from pimcore.embed import open_pimcore
    from pimcore.errors import StoreError
    from pimcore.store import LmdbStore
    from pimcore.store import wal

    real = wal.write_checkpoint

    def no_fd(*a: object, **kw: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    store = LmdbStore(tmp_path / "store", durability="log", map_size=1 << 20)
    assert store._log is not None
    store._log.resize_retry_seconds = 0.0
    posted: list[int] = []
    with trio.fail_after(60):
        async with open_pimcore(data_dir=tmp_path / "data", store=store) as im:
            await im.create_group("team", ["alice", "bob"])
            monkeypatch.setattr(wal, "write_checkpoint", no_fd)
            start = store.map_size
            with pytest.raises(StoreError):
                for i in range(400):  # until the map grows
                    posted.append((await im.post("team", bytes([i % 251]) * 30_000, sender="alice", device="d")).seq)
            assert store.map_size > start and store.halted() is not None
            await trio.sleep(3 * LmdbStore.defer_seconds)  # (past the deferred commit's due time, still failing)
            monkeypatch.setattr(wal, "write_checkpoint", real)
            for i in range(5):
                posted.append((await im.post("team", b"again %d" % i, sender="alice", device="d")).seq)
            while store.commit_delay() is not None:  # the deferred task commits LMDB's transaction
                await trio.sleep(0.05)
            assert store.halted() is None
            history = await im.history("team", "bob", limit=1000)
    live = {m.seq: m.payload for m in history}
    assert set(posted) <= set(live) and len(posted) > 5
    store.close()
    again = LmdbStore(tmp_path / "store", durability="log", map_size=1 << 20)
    try:
        assert {m.seq: m.payload for m in again.history("team", 0, 100_000)} == live
    finally:
        again.close()
