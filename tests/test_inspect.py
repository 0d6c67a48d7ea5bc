"""``pimcore inspect``: the store summary (``LmdbStore.summary``), its
``--json`` form, its safety next to a running broker (read-only: no write,
no lock, no command log replay) and its refusals."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
import trio

import pimcore
from pimcore.cli import main
from pimcore.client import ClientConfig, MessageReceived, open_client
from pimcore.core import drain
from pimcore.errors import StoreError
from pimcore.store import LmdbStore, StoreSummary, direct_conversation

from _harness import Harness
from _proc import ProcGroup, procs, token_for  # noqa: F401  (procs is a fixture)

AB = direct_conversation("alice", "bob")
FAST = ClientConfig(connect_timeout=5.0, ack_timeout=2.0, send_timeout=10.0, backoff_max=0.5)

#: The keys of ``inspect --json`` (docs/OPERATIONS.md, "Inspecting the store").
SUMMARY_KEYS = {
    "path", "broker", "broker_holder", "schema", "node_id", "epoch", "epochs", "last_server_time",
    "last_server_time_utc", "map_size", "page_size", "pages_used", "bytes_used", "file_size", "last_txnid",
    "readers", "max_readers", "entries", "log", "users",
}
ENTRY_KEYS = [
    "meta", "messages", "conversations", "conversation_entries", "groups", "group_members", "user_conversations",
    "inbox_entries", "inboxes", "devices", "dedupe", "read_markers", "revocations", "membership_spans", "events",
    "event_consumers", "conversation_settings", "mentions", "deleted_for_user", "retention",
]
LOG_KEYS = {
    "path", "files", "checkpoint_next_lsn", "checkpoint_file", "checkpoint_offset", "checkpoint_txnid",
    "checkpoint_written_at", "checkpoint_written_at_utc", "records_after_checkpoint", "problem",
}


def _sent(data: Path, n: int) -> None:
    """``data/store`` with ``n`` 1:1 messages alice -> bob, sent through the broker core."""
    with LmdbStore(str(data / "store")) as store:
        h = Harness(store)
        a = h.login("alice", "phone")
        for k in range(n):
            h.send(a, AB, b"m%d" % k)
        drain(h.broker, store, [], h.now)


def _files(store: Path) -> dict[str, tuple[int, int, str]]:
    """(size, mtime_ns, sha256) of every file in the store but LMDB's lock
    file (whose reader table every reader uses)."""
    out = {}
    for p in sorted(store.rglob("*")):
        if p.is_file() and p.name != "lock.mdb":
            st = p.stat()
            out[str(p.relative_to(store))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


#: ``pimcore inspect`` in a process whose audit hook fails it (exit 3) on a
#: flock or lockf, or a Python-level open for writing, creating or
#: truncating, or a rename/remove (LMDB's own C open is checked by
#: test_inspect_opens_nothing_for_writing_and_takes_no_lock).
_AUDITED = """
import os, sys
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def hook(event, args):
    bad = event in ("fcntl.flock", "fcntl.lockf", "os.rename", "os.remove", "os.truncate", "shutil.rmtree")
    if event == "open" and isinstance(args[0], (str, bytes)):
        mode, flags = args[1], args[2]
        bad = bool((mode and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE))
    if bad:
        print("inspect did", event, args, file=sys.stderr)
        os._exit(3)
sys.addaudithook(hook)
from pimcore.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _inspect_json(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _AUDITED, "inspect", "--json", *args], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pimcore.__file__)))


def test_inspect_counts_what_was_sent(tmp_path, capsys):
    data = tmp_path / "data"
    _sent(data, 5)
    assert main(["inspect", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"store               {data / 'store'}" in out
    assert "broker              not running" in out
    assert "format              schema 4" in out
    for key, count in (("messages", 5), ("inbox_entries", 10), ("conversations", 1), ("devices", 1)):
        assert re.search(rf"^  {key} +{count}  ", out, re.M), out
    assert "UTC" not in out and "Z)" in out  # the server time as an ISO date-time
    assert "command log         none" in out


def test_summary_fields_and_units(tmp_path):
    data = tmp_path / "data"
    _sent(data, 4)
    with LmdbStore(str(data / "store"), read_only=True) as store:
        s = store.summary()
        assert isinstance(s, StoreSummary)
        assert s.entries["messages"] == 4 and s.entries["inbox_entries"] == 8  # 1:1: sender and recipient
        assert s.entries["conversation_entries"] == 4 and s.entries["dedupe"] == 4
        assert s.entries["inboxes"] == 2 and s.entries["user_conversations"] == 2
        assert list(s.entries) == ENTRY_KEYS
        assert s.node_id == store.node_id().hex() and s.epoch == store.epoch().hex()
        assert s.epochs == tuple(e.hex() for e in store.epochs()) and s.epoch == s.epochs[-1]
        assert s.last_server_time == store.last_server_time() > 0
        assert s.bytes_used == s.pages_used * s.page_size <= s.file_size
        assert s.map_size == 1 << 30 and s.page_size >= 4096
        assert s.broker == "not running" and s.broker_holder is None and s.log is None
        with pytest.raises(StoreError, match="read-only"):
            store.create_group("team", ["alice", "bob"], 1)  # any write


def test_inspect_json_has_the_documented_keys(tmp_path, capsys):
    data = tmp_path / "data"
    _sent(data, 3)
    assert main(["inspect", str(data), "--json", "--user", "bob", "--user", "alice"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == SUMMARY_KEYS
    assert list(out["entries"]) == ENTRY_KEYS
    assert out["entries"]["messages"] == 3 and out["entries"]["inbox_entries"] == 6
    assert out["path"] == str(data / "store") and out["broker"] == "not running" and out["log"] is None
    assert out["last_server_time_utc"].endswith("Z") and out["last_server_time_utc"].startswith("20")
    assert out["users"]["bob"]["inbox_head"] == 3
    assert out["users"]["bob"]["conversations"] == [{"conversation": AB, "last_seq": 3, "read": 0, "unread": 3}]
    assert out["users"]["alice"]["devices"][0]["device"] == "phone"


def test_inspect_opens_nothing_for_writing_and_takes_no_lock(tmp_path):
    """data.mdb opened O_RDONLY by LMDB; no broker.lock or log.lock made or locked."""
    data = tmp_path / "data"
    _sent(data, 1)
    store_dir = data / "store"
    for name in ("broker.lock", "log.lock"):
        (store_dir / name).unlink(missing_ok=True)
    before = _files(store_dir)
    with LmdbStore(str(store_dir), read_only=True) as store:
        store.summary()
        modes = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(store_dir)):
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
                modes[os.path.basename(target)] = flags & os.O_ACCMODE
    assert modes.get("data.mdb") == os.O_RDONLY, modes
    assert not (store_dir / "broker.lock").exists() and not (store_dir / "log.lock").exists()
    assert _files(store_dir) == before


async def test_inspect_next_to_a_running_broker_disturbs_nothing(tmp_path: Path, procs: ProcGroup) -> None:
    data = tmp_path / "data"
    store_dir = data / "store"
    with trio.fail_after(90):
        server = procs.serve("--listen", "tcp://127.0.0.1:0", "--data-dir", data, "--durability", "log")
        alice_tok = await trio.to_thread.run_sync(token_for, "alice", data)
        bob_tok = await trio.to_thread.run_sync(token_for, "bob", data)
        async with open_client(server.url(), alice_tok, "phone", config=FAST) as alice, open_client(
            server.url(), bob_tok, "laptop", config=FAST
        ) as bob:
            for k in range(3):
                await alice.send(AB, b"before %d" % k)
            # Wait until the broker has settled (its checkpoint written).
            before = _files(store_dir)
            for _ in range(50):
                await trio.sleep(0.2)
                now = _files(store_dir)
                if now == before:
                    break
                before = now
            out = await trio.to_thread.run_sync(_inspect_json, str(data))
            text = await trio.to_thread.run_sync(
                lambda: subprocess.run([sys.executable, "-m", "pimcore", "inspect", str(data)], capture_output=True,
                                       text=True, timeout=60, env=_env()))
            assert _files(store_dir) == before  # inspect wrote nothing (nor did the idle broker)
            assert out["broker"] == "running"
            assert out["broker_holder"].startswith(f"process {server.pid} ") and "serve" in out["broker_holder"]
            assert out["entries"]["messages"] == 3 and out["entries"]["inbox_entries"] == 6
            log = out["log"]
            assert set(log) == LOG_KEYS and log["problem"] is None
            assert log["checkpoint_next_lsn"] >= 1 and log["records_after_checkpoint"] >= 0
            assert log["checkpoint_written_at_utc"].endswith("Z")
            assert {f["name"] for f in log["files"]} == {"log-0", "log-1"}
            assert text.returncode == 0, text.stderr
            assert f"broker              running: process {server.pid} " in text.stdout
            assert "checkpoint        LMDB transaction" in text.stdout
            # The broker keeps serving.
            sent = await alice.send(AB, b"after")
            assert sent.seq == 4
            got = None
            async for ev in bob.events():
                if isinstance(ev, MessageReceived) and ev.message.payload == b"after":
                    got = ev
                    break
            assert got is not None
        server.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(server.wait) == 0


def test_inspect_does_not_recover_a_log_store_a_killed_broker_left(tmp_path, procs: ProcGroup):
    """The old maintenance open replayed the log and left log durability:
    inspect reads as is, and the next broker start still recovers."""
    data = tmp_path / "data"
    store_dir = data / "store"
    server = procs.serve("--listen", "tcp://127.0.0.1:0", "--data-dir", data, "--durability", "log")
    server.kill()
    before = _files(store_dir)
    out = _inspect_json(str(data))
    assert out["broker"] == "not running" and out["log"] is not None and out["log"]["problem"] is None
    assert _files(store_dir) == before
    assert (store_dir / "log" / "checkpoint").is_file()


@pytest.mark.parametrize("case", ["not a store", "not lmdb", "newer schema", "not initialised"])
def test_inspect_refusals_exit_2_without_a_traceback(tmp_path, case):
    data = tmp_path / "data"
    if case == "not a store":
        data.mkdir()
        (data / "notes.txt").write_text("hello")
        said = "no pimcore store in"
    elif case == "not lmdb":
        (data / "store").mkdir(parents=True)
        (data / "store" / "data.mdb").write_bytes(b"\0garbage" * 1000)
        said = "cannot open LMDB store at"
    elif case == "newer schema":
        _sent(data, 1)
        env = lmdb.open(str(data / "store"), max_dbs=32)
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"schema", (99).to_bytes(8, "big"), db=meta)
        env.close()
        said = "store schema version 99, this code reads 4 (a newer pimcore wrote it"
    else:
        (data / "store").mkdir(parents=True)
        env = lmdb.open(str(data / "store"), max_dbs=32)
        env.close()
        said = "is not an initialised pimcore store"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "pimcore", "inspect", str(data)], capture_output=True, text=True,
                       timeout=60, env=_env())
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("pimcore inspect: ") and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # (a lock.mdb was left behind)


@pytest.mark.parametrize("user, said", [
    ("a b", "pimcore inspect: user id 'a b' has the character ' '"),
    ("x" * 5000, "pimcore inspect: user id 'xxxx"),
])
def test_inspect_refuses_an_invalid_user_id(tmp_path, capsys, user, said):
    """`inspect --user 'a b'` printed a zero summary, exit 0."""
    data = tmp_path / "data"
    _sent(data, 1)
    assert main(["inspect", str(data), "--user", user]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(said) and err.count("\n") == 1 and len(err) < 400, err


def test_inspect_says_a_user_it_has_never_seen(tmp_path, capsys):
    data = tmp_path / "data"
    _sent(data, 1)
    assert main(["inspect", str(data), "--user", "nobody"]) == 0
    out = capsys.readouterr().out
    assert "user nobody: no such user in this store (no inbox, no devices, no conversations)" in out
    assert main(["inspect", str(data), "--user", "bob"]) == 0
    assert "no such user" not in capsys.readouterr().out
    assert main(["inspect", str(data), "--user", "alice"]) == 0  # (last seen as UTC, as last server time: was µs)
    assert re.search(r"device phone: position \d+, last seen (\d{4}-\d\d-\d\dT[\d:.]+Z|never)\n",
                     capsys.readouterr().out)


def test_an_unreadable_store_directory_is_said_in_words(tmp_path, capsys, monkeypatch):
    """(As root chmod does not stop a read: the refusal is simulated.)"""
    data = tmp_path / "data"
    _sent(data, 1)
    real = os.listdir

    def listdir(path):
        if str(path).endswith("store"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "is_file", lambda self: False)
    monkeypatch.setattr(os, "listdir", listdir)
    assert main(["inspect", str(data)]) == 2
    err = capsys.readouterr().err
    assert err == f"pimcore inspect: cannot read '{data / 'store'}': Permission denied\n"


def test_broker_state_is_a_probe_not_a_lock(tmp_path):
    import fcntl

    data = tmp_path / "data"
    _sent(data, 1)
    store_dir = str(data / "store")
    assert LmdbStore.broker_state(store_dir) == ("not running", None)
    with open(os.path.join(store_dir, "broker.lock"), "r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.truncate(0)
        f.write(b"4242 pimcore serve --data-dir x\n")
        f.flush()
        # Held by another open file description: reported, and still held.
        state, holder = LmdbStore.broker_state(store_dir)
        assert (state, holder) == ("running", "process 4242 (pimcore serve --data-dir x)")
        with open(os.path.join(store_dir, "broker.lock"), "rb") as g:
            with pytest.raises(OSError):
                fcntl.flock(g, fcntl.LOCK_SH | fcntl.LOCK_NB)
    assert LmdbStore.broker_state(tmp_path / "nowhere") == ("not running", None)


@pytest.mark.parametrize("older", ["missing tables", "schema 2", "schema 3"])
def test_a_store_of_an_older_version_is_summarised_as_is_and_not_upgraded(tmp_path, capsys, older):
    data = tmp_path / "data"
    _sent(data, 2)
    env = lmdb.open(str(data / "store"), max_dbs=32)
    with env.begin(write=True) as txn:
        if older == "missing tables":
            for name in (b"retention", b"deleted"):
                txn.drop(env.open_db(name, txn=txn), delete=True)
        else:
            txn.put(b"schema", int(older[-1]).to_bytes(8, "big"), db=env.open_db(b"meta", txn=txn))
    env.close()
    before = _files(data / "store")
    assert main(["inspect", str(data), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["entries"]["messages"] == 2
    if older == "missing tables":
        assert out["entries"]["retention"] is None and out["entries"]["deleted_for_user"] is None
        assert main(["inspect", str(data)]) == 0
        assert re.search(r"^  retention +absent  ", capsys.readouterr().out, re.M)
    else:
        assert out["schema"] == int(older[-1])
        assert main(["inspect", str(data)]) == 0
        assert f"{older} (older than this code's 4: upgraded when a broker next opens it)" in capsys.readouterr().out
    assert main(["inspect", str(data), "--user", "bob"]) == 2
    assert "pimcore inspect: --user needs a store in this version's format" in capsys.readouterr().err
    assert _files(data / "store") == before  # not upgraded


def test_a_store_path_that_is_not_utf8_is_inspected_and_shown_with_its_bytes(tmp_path):
    _sent(tmp_path / "data", 1)  # (the broker's own open takes UTF-8 paths only)
    os.rename(bytes(tmp_path) + b"/data", bytes(tmp_path) + b"/data\xff")
    data = Path(os.fsdecode(bytes(tmp_path) + b"/data\xff"))
    r = subprocess.run([sys.executable, "-m", "pimcore", "inspect", os.fsencode(data)], capture_output=True,
                       timeout=60, env=_env())
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert f"store               {tmp_path}/data\\xff/store\n".encode() in r.stdout
    r = subprocess.run([sys.executable, "-m", "pimcore", "inspect", "--json", os.fsencode(data)], capture_output=True,
                       timeout=60, env=_env())
    assert r.returncode == 0 and json.loads(r.stdout)["path"] == str(data / "store")


def test_the_command_log_summary_counts_the_records_after_the_checkpoint(tmp_path):
    from pimcore.store import wal

    log_dir = str(tmp_path / "log")
    log = wal.CommandLog(log_dir)
    log.reset()
    log.start()
    log.append(b"one")
    lsn, file, offset = log.position()
    for payload in (b"two", b"three", b"four"):
        log.append(payload)
    log.close()
    wal.write_checkpoint(log_dir, wal.Checkpoint(4096, lsn, file, offset, bytes(2 * 4096)))
    before = _files(tmp_path)
    s = wal.summarize(log_dir)
    assert _files(tmp_path) == before
    assert (s.checkpoint_next_lsn, s.checkpoint_file, s.records_after_checkpoint, s.problem) == (2, 0, 3, None)
    assert [(f.name, f.first_lsn) for f in s.files] == [("log-0", 1), ("log-1", 0)]
    assert s.files[0].size >= 1 << 20 and s.checkpoint_written_at is not None
    # A damaged checkpoint is said, not raised.
    with open(os.path.join(log_dir, "checkpoint"), "r+b") as f:
        f.write(b"X")
    s = wal.summarize(log_dir)
    assert s.checkpoint_next_lsn is None and "damaged" in s.problem
