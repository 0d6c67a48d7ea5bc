"""End to end: the real ``pimcore serve`` / ``token`` / ``chat`` commands in
subprocesses, on loopback, talking to the client SDK.

Every server listens on port 0 and the tests read the URL it prints.  Every
wait has a deadline: ``trio.fail_after`` around async test bodies, timeouts
on every subprocess wait; the ``procs`` fixture kills what is left.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
import time
from pathlib import Path

import pytest
import trio
import trustme

from pimcore.auth import issue_token
from pimcore.client import (
    AuthFailed,
    ClientConfig,
    Connected,
    ConnectFailed,
    Disconnected,
    MessageReceived,
    SendError,
    open_client,
)
from pimcore.errors import CloseCode, ErrorCode
from pimcore.store import direct_conversation

from _proc import ProcGroup, Server, procs, run_pimcore, token_for  # noqa: F401  (procs is a fixture)

AB = direct_conversation("alice", "bob")
LOOPBACK = "tcp://127.0.0.1:0"
# Short enough that a broken test fails fast; the first connection is to a
# broker that already printed "ready".
FAST = ClientConfig(connect_timeout=5.0, ack_timeout=2.0, send_timeout=10.0, backoff_max=0.5)
# A first connection that fails in a way that might be transient (overload,
# plain bytes to a TLS port ending in a hang-up or a stalled WebSocket
# handshake) is retried until connect_timeout: keep it short for refusals.
REFUSED = ClientConfig(connect_timeout=2.0, backoff_max=0.5)


async def in_thread(fn, *args):
    """Run a blocking helper (waiting for a subprocess) off the event loop."""
    return await trio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)


async def next_event(client, kind, timeout: float = 10.0):
    with trio.fail_after(timeout):
        async for ev in client.events():
            if isinstance(ev, kind):
                return ev
    raise AssertionError(f"events ended before a {kind.__name__}")


def assert_clean_exit_2(r, *needles: str, command: str = "serve", code: int = 2) -> None:
    """A one-line refusal (exit 2: refused as given; ``code`` 1: could not be done now)."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"pimcore {command}: "), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    assert "ready" not in r.stdout


# ---------------------------------------------------------------- serve + token


async def test_the_data_directory_is_private_when_the_secret_is_not_kept_there(tmp_path: Path, procs: ProcGroup) -> None:
    """(Review.)  With $PIMCORE_SECRET nothing makes the data directory
    before the store does: os.makedirs gave it the umask's mode (0755),
    only store/ 0700."""
    data = tmp_path / "new" / "data"
    env = {"PIMCORE_SECRET": "s" * 40}
    with trio.fail_after(60):
        procs.serve("--listen", LOOPBACK, "--data-dir", data, env=env)
        assert not (data / "secret").exists()
        for path in (data, data / "store"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, (path, oct(path.stat().st_mode))


async def test_serve_creates_a_private_secret_and_accepts_its_tokens(tmp_path: Path, procs: ProcGroup) -> None:
    data = tmp_path / "data"
    with trio.fail_after(60):
        server = procs.serve("--listen", LOOPBACK, "--data-dir", data)
        assert "(durability sync)" in server.banner  # the default
        assert len(server.urls) == 1 and server.url("tcp").startswith("tcp://127.0.0.1:")
        assert not server.url("tcp").endswith(":0")
        secret = data / "secret"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert len(secret.read_text().strip()) >= 32
        assert (data / "store" / "data.mdb").is_file()
        # The data directory, the store and its files: the owner's alone (they hold every message).
        for path in (data, data / "store"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        assert stat.S_IMODE((data / "store" / "data.mdb").stat().st_mode) == 0o600

        alice_tok = await in_thread(token_for, "alice", data)
        bob_tok = await in_thread(token_for, "bob", data)
        assert alice_tok.count(".") == 2  # a JWT
        async with open_client(server.url(), alice_tok, "phone", config=FAST) as alice, open_client(
            server.url(), bob_tok, "laptop", config=FAST
        ) as bob:
            assert alice.user == "alice" and bob.user == "bob"
            sent = await alice.send(AB, b"hello over the wire")
            assert sent.seq == 1
            got = await next_event(bob, MessageReceived)
            assert got.message.payload == b"hello over the wire"
            assert got.message.sender == "alice" and got.message.device == "phone"
            assert got.message.msg_id == sent.msg_id


async def test_tokens_of_another_secret_expired_or_for_another_device_are_refused(tmp_path: Path, procs: ProcGroup) -> None:
    data = tmp_path / "data"
    with trio.fail_after(60):
        server = procs.serve("--listen", LOOPBACK, "--data-dir", data)
        url = server.url()
        secret = (data / "secret").read_text().strip()

        forged = issue_token(b"another secret, 32 bytes or more!!", "alice")
        with pytest.raises(AuthFailed):
            async with open_client(url, forged, "phone", config=FAST):
                pass  # pragma: no cover

        expired = issue_token(secret, "alice", ttl=-100)  # `pimcore token --ttl -100` refuses (exit 2)
        with pytest.raises(AuthFailed):
            async with open_client(url, expired, "phone", config=FAST):
                pass  # pragma: no cover
        long_ago = issue_token(secret, "alice", ttl=60, now=time.time() - 3600)
        with pytest.raises(AuthFailed):
            async with open_client(url, long_ago, "phone", config=FAST):
                pass  # pragma: no cover

        # The broker tolerates a little clock skew (30 s leeway).
        just_expired = issue_token(secret, "alice", ttl=-5)
        async with open_client(url, just_expired, "phone", config=FAST) as c:
            assert c.user == "alice"

        bound = await in_thread(token_for, "alice", data, "--device", "phone")
        with pytest.raises(AuthFailed):
            async with open_client(url, bound, "laptop", config=FAST):
                pass  # pragma: no cover
        async with open_client(url, bound, "phone", config=FAST) as c:
            assert (await c.send(AB, b"bound")).seq == 1

    # Refusals are not crashes: the broker is still serving, then stops cleanly.
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()
    assert "Traceback" not in "\n".join(server.err), server.describe()


def test_token_refuses_bad_ids(tmp_path: Path) -> None:
    r = run_pimcore("token", "--user", "al ice", "--data-dir", tmp_path / "d")
    assert r.returncode == 2 and "invalid user id" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_gracefully_and_clients_see_shutdown(tmp_path: Path, procs: ProcGroup, sig: signal.Signals) -> None:
    data = tmp_path / "data"
    with trio.fail_after(60):
        server = procs.serve("--listen", LOOPBACK, "--data-dir", data)
        tok = await in_thread(token_for, "alice", data)
        async with open_client(server.url(), tok, "phone", config=FAST) as alice:
            await next_event(alice, Connected)
            await alice.send(AB, b"before the signal")
            server.send_signal(sig)
            ev = await next_event(alice, Disconnected)
            assert ev.code is CloseCode.SHUTDOWN, ev  # told, not just hung up on
            assert ev.reason == "broker shutting down"
            rc = await in_thread(server.wait)
        assert rc == 0, server.describe()
        assert f"{sig.name}: shutting down" in server.out, server.describe()
        assert server.out[-1] == "stopped", server.describe()
        assert "Traceback" not in "\n".join(server.err), server.describe()


def test_a_reader_of_stdout_that_went_away_does_not_fail_the_shutdown(tmp_path: Path) -> None:
    """A new operator's trial: `pimcore serve | tee log` with tee killed --
    SIGTERM then exited 1 with "Broken pipe", and a supervisor saw a
    failure.  The lines after the reader went go nowhere; the exit is 0."""
    import subprocess

    from _proc import PIMCORE, _env

    proc = subprocess.Popen([*PIMCORE, "serve", "--listen", LOOPBACK, "--data-dir", str(tmp_path / "d")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env())
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:  # (until it serves)
            if line.startswith(b"ready"):
                break
        proc.stdout.close()  # the reader goes away
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()
        err = proc.stderr.read().decode()
        assert "Broken pipe" not in err and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- configuration file


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


async def test_config_file_is_honoured(tmp_path: Path, procs: ProcGroup) -> None:
    cfg = write_config(
        tmp_path / "pimcore.toml",
        """
data_dir = "from-config"          # relative to this file
durability = "os"
listen = ["tcp://127.0.0.1:0", "ws://127.0.0.1:0/im"]

[limits]
max_payload = 100
window = 8

[server]
idle_timeout = 30.0
max_connections = 2
""",
    )
    other = tmp_path / "elsewhere"
    other.mkdir()
    with trio.fail_after(60):
        # Started from another directory: paths in the file are relative to it.
        server = procs.serve("--config", cfg, cwd=other)
        assert "(durability os)" in server.banner
        assert (tmp_path / "from-config" / "secret").is_file()
        assert not (other / "pimcore-data").exists()
        tcp, ws = server.url("tcp"), server.url("ws")
        assert ws.endswith("/im")

        # `pimcore token --config` finds the same secret through the file.
        r = await in_thread(run_pimcore, "token", "--config", cfg, "--user", "alice")
        assert r.returncode == 0, r.stderr
        alice_tok = r.stdout.strip()
        bob_tok = await in_thread(token_for, "bob", tmp_path / "from-config")

        async with open_client(tcp, alice_tok, "phone", config=FAST) as alice, open_client(
            ws, bob_tok, "laptop", config=FAST
        ) as bob:
            assert (await alice.send(AB, b"x" * 100)).seq == 1  # at the limit: fine
            with pytest.raises(SendError) as err:
                await alice.send(AB, b"x" * 101)
            assert err.value.code is ErrorCode.PAYLOAD_TOO_LARGE
            got = await next_event(bob, MessageReceived)  # over WebSocket
            assert got.message.payload == b"x" * 100
            assert (await bob.send(AB, b"reply over ws")).seq == 2
            assert (await next_event(alice, MessageReceived)).message.payload == b"reply over ws"

            # [server] max_connections = 2: a third connection is turned away.
            with pytest.raises(ConnectFailed, match="OVERLOADED|too many"):
                async with open_client(tcp, alice_tok, "tablet", config=ClientConfig(connect_timeout=1.0)):
                    pass  # pragma: no cover

        # Flags override the file.
        server.send_signal(signal.SIGTERM)
        assert await in_thread(server.wait) == 0
        server2 = procs.serve("--config", cfg, "--max-payload", "1000", "--listen", LOOPBACK)
        assert len(server2.urls) == 1
        async with open_client(server2.url(), alice_tok, "phone", config=FAST) as alice:
            assert (await alice.send(AB, b"y" * 1000)).seq == 3


@pytest.mark.parametrize(
    "text, needles",
    [
        ('listen = "tcp://127.0.0.1:0"\nlisten_backlog = 5\n', ["unknown keys", "listen_backlog"]),
        ('events = true\n', ["unknown keys ['events']; events belongs in [server]\n"]),
        ('[server]\nmax_payload = 10\n', ["unknown keys in [server]: ['max_payload']; max_payload belongs in [limits]"]),
        ('[limits]\nmax_payloads = 10\n', ["[limits]", "max_payloads"]),
        ('[server]\nidle = 3\n', ["[server]", "idle"]),
        ('[tls]\ncertificate = "x.pem"\n', ["[tls]", "certificate"]),
        ('listen = ["udp://127.0.0.1:0"]\n', ["listen", "udp://127.0.0.1:0", "scheme"]),
        ('listen = "tcp://127.0.0.1:70000"\n', ["listen", "70000"]),
        ('durability = "never"\n', ["durability", "never"]),
        ("[limits]\nmax_payload = 2000000\n", ["limits", "max_payload"]),
        ("listen = [\n", ["pimcore.toml"]),  # not TOML
        ("[server]\nlogin_timeout = -1\n", ["server", "login_timeout"]),
        ("[server]\nidle_timeout = -5\n", ["server", "idle_timeout"]),
        ("[server]\nmax_connections = 0\n", ["server", "max_connections"]),
        ("[server]\nhook_timeout = 0\n", ["server", "hook_timeout"]),
    ],
    ids=[
        "top-key", "section-key-at-the-top", "key-of-another-section", "limits-key", "server-key", "tls-key", "scheme", "port", "durability", "payload>frame", "syntax",
        "login-timeout", "idle-timeout", "max-connections", "hook-timeout",
    ],
)
def test_bad_config_file_exits_2_with_a_clear_message(tmp_path: Path, text: str, needles: list[str]) -> None:
    cfg = write_config(tmp_path / "pimcore.toml", f'data_dir = "d"\n{text}')
    r = run_pimcore("serve", "--config", cfg)
    assert_clean_exit_2(r, *needles)


async def test_serve_takes_login_timeout_as_a_flag(tmp_path: Path, procs: ProcGroup) -> None:
    """(Failed before: a new user's trial: `pimcore serve --help` had no
    --login-timeout, though the file and $PIMCORE_SERVER_LOGIN_TIMEOUT set
    it.)  `--login-timeout 0.5` closes a connection that sends no Login
    with LOGIN_TIMEOUT after half a second, not the default 10 s; a
    value of 0 is refused naming the flag, as --idle-timeout's are."""
    from pimcore import frames as F
    from pimcore.codec import Decoder

    r = run_pimcore("serve", "--help")
    assert "--login-timeout" in r.stdout, r.stdout
    r = run_pimcore("serve", "--data-dir", tmp_path / "refused", "--listen", LOOPBACK, "--login-timeout", "0")
    assert_clean_exit_2(r, "--login-timeout: expected seconds > 0")
    with trio.fail_after(30):
        server = procs.serve("--listen", LOOPBACK, "--data-dir", tmp_path / "data", "--login-timeout", "0.5")
        host, port = server.url("tcp")[len("tcp://"):].rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            start = time.monotonic()
            decoder = Decoder()
            with trio.fail_after(5):  # (the default, 10 s, would fail here)
                while (frame := decoder.next_frame()) is None:
                    data = await stream.receive_some(4096)
                    assert data, "hung up without a Close"
                    decoder.feed(data)
            waited = time.monotonic() - start
        assert isinstance(frame, F.Close) and frame.code == CloseCode.LOGIN_TIMEOUT, frame
        assert 0.3 <= waited < 5, waited


@pytest.mark.parametrize("args, said", [
    (["--heartbeat-ms", "10000", "--idle-timeout", "3"],
     "--idle-timeout (3 s) must be longer than --heartbeat-ms (10000 ms): clients Ping only after that long idle,"
     " so every idle session would be closed as idle; a few heartbeats is usual (45 s and 15000 ms by default)"),
    (["--idle-timeout", "0.001"],
     "--idle-timeout (0.001 s) must be longer than limits.heartbeat_ms (15000 ms): clients Ping only after that long"
     " idle, so every idle session would be closed as idle; a few heartbeats is usual (45 s and 15000 ms by default)"
     " (limits.heartbeat_ms is the default)"),
    (["--heartbeat-ms", "0"],
     "server.idle_timeout (45 s) needs heartbeats: with --heartbeat-ms 0 clients never Ping, so every idle session"
     " would be closed as idle; set server.idle_timeout to 0 too (server.idle_timeout is the default)"),
], ids=["under-heartbeat", "tiny", "no-heartbeat"])
def test_an_idle_timeout_no_longer_than_the_heartbeat_is_refused(tmp_path: Path, args: list[str], said: str) -> None:
    """`--heartbeat-ms 10000 --idle-timeout 3` started: every idle client
    was closed IDLE_TIMEOUT and reconnected, six times in 13 s; with
    `--idle-timeout 0.001` nothing could connect, and chat said no reason
    (a new-user pass).  Clients Ping when idle for the heartbeat, so an
    idle timeout must be longer."""
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", "--listen", "tcp://127.0.0.1:0", *args, cwd=tmp_path)
    assert_clean_exit_2(r, said)


@pytest.mark.parametrize("text, said", [
    ('data_dir = "a"\ndata_dir = "b"\n', "data_dir is given twice (at line 2, column 15): a key may be given once"),
    ('[limits]\nwindow = 8\n# again\nwindow = 9  # more\n', "limits.window is given twice (at line 4, column 11)"),
    ('listen = [\n  "tcp://127.0.0.1:1",\n]\nlisten = [\n  "tcp://127.0.0.1:2",\n]\n',
     "listen is given twice (at line 6, column 2)"),
    ('[webhooks]\nurl = "http://a/"\n[limits]\nwindow = 8\n[webhooks]\n',
     "the table [webhooks] is declared twice (at line 5, column 10)"),
    ('http = "tcp://127.0.0.1:1"\n[http]\nlisten = "tcp://127.0.0.1:2"\n',
     "[http] is given twice, as a table and as a key above it (at line 2, column 6)"),
], ids=["top", "section", "multi-line", "table", "key-then-table"])
def test_a_key_given_twice_in_the_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                                said: str) -> None:
    """A key given twice was tomllib's bare "Cannot overwrite a value (at
    line 2, column 18)": which key?  Named, with the file and the position."""
    from pimcore.cli import main

    cfg = write_config(tmp_path / "p.toml", text)
    assert main(["serve", "--config", str(cfg), "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"pimcore serve: {cfg}: {said}") and err.count("\n") == 1, err


def test_a_number_of_more_digits_than_python_reads_is_refused_in_words_and_shown_cut(tmp_path: Path) -> None:
    """A config file with ``window = 999...9`` (5,001 digits) was refused with
    Python's own advice to call sys.set_int_max_str_digits(); the same from
    $PIMCORE_LIMITS_WINDOW quoted all 5,001 digits back.  A value is shown
    cut, as ids are, and the file's number by its line and length."""
    big = "9" * 5001
    cfg = write_config(tmp_path / "p.toml", f'data_dir = "d"\n[limits]\n# a comment 123\nwindow = {big}\n')
    r = run_pimcore("serve", "--config", cfg, "--listen", "tcp://127.0.0.1:0", cwd=tmp_path)
    assert_clean_exit_2(r, f"{cfg}: line 4: a number of 5,001 digits (at most 4,300 are read)")
    assert "set_int_max_str_digits" not in r.stderr
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", "--listen", "tcp://127.0.0.1:0",
                    env={"PIMCORE_LIMITS_WINDOW": big}, cwd=tmp_path)
    assert_clean_exit_2(r, 'limits.window: expected an integer, got "99999', '9"...(5,001 chars) (from $PIMCORE_LIMITS_WINDOW)')
    assert len(r.stderr) < 300, r.stderr


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--listen", "http://127.0.0.1:0"], ["http://127.0.0.1:0", "scheme"]),
        (["--listen", "tcp://127.0.0.1:99999"], ["99999"]),
        (["--listen", "tcp://:7400"], ["no host"]),
        (["--config", "does-not-exist.toml"], ["does-not-exist.toml"]),
    ],
    ids=["scheme", "port", "host", "missing-config"],
)
def test_bad_flags_exit_2_with_a_clear_message(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", *args, cwd=tmp_path)
    assert_clean_exit_2(r, *needles)


@pytest.mark.parametrize(
    "args, toml, said",
    [
        # A port out of range was Python's "Port out of range 0-65535".
        (["--listen", "tcp://127.0.0.1:99999"], None,
         "--listen: 'tcp://127.0.0.1:99999': the port must be a number 0-65535, not '99999'"),
        (["--listen", "ws://127.0.0.1:port/im"], None,
         "--listen: 'ws://127.0.0.1:port/im': the port must be a number 0-65535, not 'port'"),
        ([], 'listen = ["tcp://127.0.0.1:99999"]\n',
         "listen: 'tcp://127.0.0.1:99999': the port must be a number 0-65535, not '99999'"),
        (["--http", "tcp://127.0.0.1:70000"], None,
         "--http: 'tcp://127.0.0.1:70000': the port must be a number 0-65535, not '70000'"),
        # A ws:// listen URL's query and fragment were dropped silently; so
        # were a tcp:// one's path and any URL's user name and password.
        (["--listen", "ws://127.0.0.1:0/im?x=1"], None,
         "--listen: 'ws://127.0.0.1:0/im?x=1': a listen URL has no query or fragment"),
        (["--listen", "ws://127.0.0.1:0/im#top"], None,
         "--listen: 'ws://127.0.0.1:0/im#top': a listen URL has no query or fragment"),
        ([], 'listen = ["wss://127.0.0.1:0/im?v=2"]\n',
         "listen: 'wss://127.0.0.1:0/im?v=2': a listen URL has no query or fragment"),
        (["--http", "tcp://127.0.0.1:0/?x=1"], None,
         "--http: 'tcp://127.0.0.1:0/?x=1': a listen URL has no query or fragment"),
        (["--listen", "tcp://127.0.0.1:0/im"], None,
         "--listen: 'tcp://127.0.0.1:0/im': a tcp:// listen URL has no path (paths are for ws:// and wss://)"),
        (["--http", "http://127.0.0.1:0/v1"], None,
         "--http: 'http://127.0.0.1:0/v1': an HTTP listen URL has no path (the API's paths are its own)"),
        (["--listen", "tcp://me:pw@127.0.0.1:0"], None,
         "--listen: a listen URL has no user name or password"),
    ],
    ids=["port", "port-name", "port-toml", "http-port", "query", "fragment", "query-toml", "http-query", "tcp-path",
         "http-path", "userinfo"],
)
def test_a_listen_url_with_a_bad_port_or_parts_it_would_drop_is_refused_naming_the_setting(
        tmp_path: Path, args: list[str], toml, said: str) -> None:
    if toml is not None:
        cfg = tmp_path / "p.toml"
        cfg.write_text(toml)
        args = [*args, "--config", cfg]
        said = f"{cfg}: {said}"
    for extra in (["--print-config"], []):
        r = run_pimcore("serve", "--data-dir", tmp_path / "d", *args, *extra, cwd=tmp_path)
        assert_clean_exit_2(r)
        assert r.stderr == f"pimcore serve: {said}\n", (extra, r.stderr)
        assert "pw" not in r.stderr
    assert not (tmp_path / "d").exists()


def test_a_data_dir_that_is_a_file_or_a_missing_secret_file_is_said_in_words(tmp_path: Path) -> None:
    """They were bare errnos: "[Errno 20] Not a directory: '.../secret'" and
    "[Errno 2] No such file or directory: '/nonexistent'" (a new-user pass)."""
    (tmp_path / "afile").write_text("")
    r = run_pimcore("serve", "--data-dir", tmp_path / "afile", "--listen", "tcp://127.0.0.1:0", cwd=tmp_path)
    assert_clean_exit_2(r, "the data directory", "is a file, not a directory")
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", "--secret-file", tmp_path / "nope", "--listen", "tcp://127.0.0.1:0",
                    cwd=tmp_path)
    assert_clean_exit_2(r, "the token secret file", "No such file or directory")
    assert not (tmp_path / "d").exists()
    # A parent that is a file (a re-check pass: a bare errno again, and
    # `token` suggested --create-secret, which then failed the same way).
    r = run_pimcore("serve", "--data-dir", tmp_path / "afile" / "sub", "--listen", "tcp://127.0.0.1:0", cwd=tmp_path)
    assert_clean_exit_2(r, "cannot be made", "afile is a file, not a directory")
    for extra in ([], ["--create-secret"]):
        r = run_pimcore("token", "--data-dir", tmp_path / "afile" / "sub", "--user", "alice", *extra, cwd=tmp_path)
        assert_clean_exit_2(r, "cannot be made", "afile is a file, not a directory", command="token")
    (tmp_path / "garbage").write_bytes(bytes(range(128, 256)))
    r = run_pimcore("token", "--data-dir", tmp_path / "d", "--secret-file", tmp_path / "garbage", "--user", "alice", cwd=tmp_path)
    assert_clean_exit_2(r, "the token secret file", "is not UTF-8 text", command="token")


async def test_a_data_dir_that_is_a_live_store_directory_is_refused_naming_its_parent(tmp_path: Path,
                                                                                     procs: ProcGroup) -> None:
    """``serve --data-dir pimcore-data/store`` (the folder ``pimcore inspect``
    also takes) was taken as a data directory while another broker used that
    store: a new ``secret`` and a nested ``store/`` were made inside the live
    LMDB directory and an empty broker served (a new-user review)."""
    data = tmp_path / "data"
    with trio.fail_after(60):
        procs.serve("--listen", LOOPBACK, "--data-dir", data, "--durability", "log")
        before = sorted(p.name for p in (data / "store").iterdir())
        for command in ("serve", "token"):
            args = ["--listen", LOOPBACK] if command == "serve" else ["--user", "alice", "--create-secret"]
            r = run_pimcore(command, "--data-dir", data / "store", *args, cwd=tmp_path)
            assert_clean_exit_2(r, f"the data directory {data / 'store'} is a store directory (it holds data.mdb,",
                                f"give its parent, {data}, as the data directory (from --data-dir)", command=command)
        assert sorted(p.name for p in (data / "store").iterdir()) == before  # no secret, no store/ made in it


def test_a_data_dir_that_is_a_dangling_symlink_is_said_in_words(tmp_path: Path) -> None:
    """``ln -s /nonexistent d; pimcore serve --data-dir d`` said a bare
    "[Errno 17] File exists: 'd'", and `token` suggested --create-secret,
    which then failed the same way (a new-user pass).  Said as the other
    refused data directories are, also when the secret comes from elsewhere
    (the store's directory was the first thing made there, and a data
    directory that is a file said "[Errno 20] Not a directory")."""
    listen = ("--listen", "tcp://127.0.0.1:0")
    gone = tmp_path / "gone"
    (tmp_path / "d").symlink_to(gone)
    dangling = f"d is a symbolic link to {gone}, which does not exist"
    r = run_pimcore("serve", "--data-dir", "d", *listen, cwd=tmp_path)
    assert_clean_exit_2(r, f"the data directory {dangling} (from --data-dir)")
    r = run_pimcore("serve", *listen, env={"PIMCORE_DATA_DIR": "d"}, cwd=tmp_path)
    assert_clean_exit_2(r, f"the data directory {dangling} (from $PIMCORE_DATA_DIR)")
    for extra in ([], ["--create-secret"]):
        r = run_pimcore("token", "--data-dir", "d", "--user", "alice", *extra, cwd=tmp_path)
        assert_clean_exit_2(r, f"the data directory {dangling} (from --data-dir)", command="token")
    r = run_pimcore("serve", "--data-dir", Path("d") / "sub", *listen, cwd=tmp_path)
    assert_clean_exit_2(r, f"the data directory {Path('d') / 'sub'} cannot be made: {dangling} (from --data-dir)")
    (tmp_path / "secret").write_text("s" * 64 + "\n")
    (tmp_path / "afile").write_text("")
    for data, said in (("d", dangling), ("afile", "afile is a file, not a directory")):
        for how in (["--secret-file", "secret"], ["--store", "redis://127.0.0.1:1"]):
            r = run_pimcore("serve", "--data-dir", data, *how, *listen, cwd=tmp_path)
            assert_clean_exit_2(r, f"the data directory {said} (from --data-dir)")
    assert (tmp_path / "d").is_symlink() and not gone.exists()  # nothing made through the link
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d", "secret"]


def test_an_empty_path_setting_is_refused_naming_it(tmp_path: Path) -> None:
    """``--data-dir ""`` (a shell's unset "$DIR") or ``data_dir = ""`` used
    ./pimcore-data silently, and an empty --secret-file was ignored for the
    data directory's secret (a new-user pass): an empty path is no path.
    Refused for every path setting, naming it and where it came from.  (An
    empty variable stays unset, OPERATIONS.md's one rule for them.)"""
    listen = ("--listen", "tcp://127.0.0.1:0")
    data = ("--data-dir", tmp_path / "d")
    for flag in ("--data-dir", "--secret-file"):
        args = (*data, flag, "") if flag != "--data-dir" else (flag, "")
        r = run_pimcore("serve", *args, *listen, cwd=tmp_path)
        assert_clean_exit_2(r, f"{flag}: cannot be empty")
        r = run_pimcore("token", *args, "--user", "alice", "--create-secret", cwd=tmp_path)
        assert_clean_exit_2(r, f"{flag}: cannot be empty", command="token")
    r = run_pimcore("serve", *data, "--key", "", *listen, cwd=tmp_path)
    assert_clean_exit_2(r, "--key: cannot be empty")
    for section, key in ((None, "data_dir"), (None, "secret_file"), ("tls", "cert"), ("tls", "key")):
        cfg = write_config(tmp_path / "p.toml", (f"[{section}]\n" if section else "") + f'{key} = ""\n')
        name = f"{section}.{key}" if section else key
        r = run_pimcore("token", "--config", cfg, "--user", "alice", "--create-secret", cwd=tmp_path)
        assert_clean_exit_2(r, f"{cfg}: {name}: cannot be empty", command="token")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml"]  # no ./pimcore-data, no d/secret


@pytest.mark.parametrize("text, said", [
    ('secret = ""', "secret: cannot be empty"),
    ('content_filter = ""', "content_filter: cannot be empty"),
    ('http = ""', "http: cannot be empty"),
    ('[http]\nlisten = ""', "http.listen: cannot be empty"),
    ('store = ""', "store: cannot be empty"),
    ('[store]\nurl = ""', "store.url: cannot be empty"),
    ("api_keys = []", "api_keys: the list is empty: give at least one key, or leave the setting out"),
    ("listen = []", "listen: the list is empty: give at least one URL"),
    ('[webhooks]\nurl = "http://127.0.0.1:1/e"\nevents = []',
     "webhooks.events: the list is empty: give at least one event type"),
    ('[webhooks]\nurl = ""', "webhooks.url: cannot be empty"),
], ids=["secret", "content_filter", "http", "http.listen", "store", "store.url", "api_keys", "listen", "events",
        "webhooks.url"])
def test_an_empty_value_in_the_file_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         text: str, said: str) -> None:
    """``secret = ""`` used the data directory's secret, ``api_keys = []``
    the key file, ``http = ""`` no HTTP listener, ``events = []`` every
    webhook event type: an empty value was taken silently (a new-user
    review).  Refused as an empty path is, naming the setting and the file;
    the short forms (``http = ""``, ``store = ""``) by what was written, not
    the table key they stand for (``http.listen``, which the file did not say)."""
    from pimcore.cli import main

    cfg = write_config(tmp_path / "p.toml", text + "\n")
    assert main(["serve", "--config", str(cfg), "--data-dir", str(tmp_path / "d"), "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"pimcore serve: {cfg}: {said}"), err
    assert "Traceback" not in err and not (tmp_path / "d").exists()


@pytest.mark.parametrize("name, text, said", [
    ("PIMCORE_API_KEYS", ",", "api_keys: the list is empty: give at least one key"),
    ("PIMCORE_LISTEN", " , ", "listen: the list is empty: give at least one URL"),
])
def test_a_list_variable_of_only_commas_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch, name: str, text: str,
                                                             said: str) -> None:
    """``PIMCORE_API_KEYS=","`` was no key, and the key file was used
    silently.  (An empty variable stays unset: the environment's one rule.)"""
    from pimcore.cli import main

    monkeypatch.setenv(name, text)
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"pimcore serve: {said}") and f"(from ${name})" in err, err


@pytest.mark.parametrize("name, text, said", [
    ("PIMCORE_API_KEYS", "key-one-0123456789,,key-two-0123456789",
     "api_keys: item 2 of the list is empty (two commas, or one at an end): give one key between each two commas"),
    ("PIMCORE_API_KEYS", "key-one-0123456789,",
     "api_keys: item 2 of the list is empty (two commas, or one at an end): give one key between each two commas"),
    ("PIMCORE_API_KEYS", ", key-one-0123456789",
     "api_keys: item 1 of the list is empty (two commas, or one at an end): give one key between each two commas"),
    ("PIMCORE_LISTEN", "tcp://127.0.0.1:0, ,tcp://127.0.0.1:0",
     "listen: item 2 of the list is empty (two commas, or one at an end): give one URL between each two commas"),
], ids=["between", "trailing", "leading", "listen"])
def test_an_empty_item_of_a_list_variable_is_refused_naming_its_position(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        name: str, text: str, said: str) -> None:
    """``PIMCORE_API_KEYS="k1,,k2"`` (or ``"k1,"``) dropped the empty item
    silently, though ``","`` alone is refused: a key lost to a typo, or a
    variable pasted short, said nothing.  Refused naming the variable and
    the item's position (never its neighbours: they may be keys)."""
    from pimcore.cli import main

    monkeypatch.setenv(name, text)
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"pimcore serve: {said} (from ${name})\n", err
    assert "0123456789" not in err and not (tmp_path / "d").exists()


def test_an_empty_config_option_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``pimcore serve --config ''`` read $PIMCORE_CONFIG's file, or none,
    silently; so did load_settings(""), open_pimcore's config_file."""
    from pimcore.cli import main
    from pimcore.config import ConfigError, load_settings

    other = write_config(tmp_path / "other.toml", 'listen = ["tcp://127.0.0.1:0"]\n')
    monkeypatch.setenv("PIMCORE_CONFIG", str(other))
    for cmd in (["serve", "--print-config"], ["token", "--user", "alice"], ["group", "show", "team"]):
        assert main([*cmd, "--config", "", "--data-dir", str(tmp_path / "d")]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"pimcore {cmd[0]}: --config: cannot be empty\n", err
    with pytest.raises(ConfigError, match="^config_file: cannot be empty$"):
        load_settings("")
    assert not (tmp_path / "d").exists()


def test_a_data_dir_that_cannot_be_made_is_said_as_the_data_dir_with_where_it_came_from(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A data directory that cannot be made (no permission on its parent, a
    read-only file system) was said as the token secret's file, made first
    in it: "cannot make the token secret file d/secret: Permission denied".
    Said as the data directory, with where it came from; the same for the
    HTTP API key's and the webhook secret's files.  (mkdir refused in
    process: the tests may run as root, whom a mode 0555 folder does not stop.)"""
    from pimcore.cli import main
    from pimcore.config import load_settings

    data = tmp_path / "ro" / "d"
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == data:
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    said = f"cannot make the data directory {data}: Permission denied"
    assert main(["token", "--user", "alice", "--data-dir", str(data), "--create-secret"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"pimcore token: {said} (from --data-dir)\n", err
    monkeypatch.setenv("PIMCORE_DATA_DIR", str(data))
    assert main(["token", "--user", "alice", "--create-secret"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"pimcore token: {said} (from $PIMCORE_DATA_DIR)\n", err
    monkeypatch.delenv("PIMCORE_DATA_DIR")
    settings = load_settings(data_dir=str(data), flags_are_options=True, env={})
    for make in (settings.load_api_keys, settings.webhook_secret):
        with pytest.raises(ValueError) as info:
            make()
        assert str(info.value) == f"{said} (from --data-dir)"


@pytest.mark.parametrize("bad", ["not-utf8", "directory", "empty"])
def test_a_bad_secret_in_the_data_dir_is_said_in_words_with_where_the_dir_came_from(tmp_path: Path, bad: str) -> None:
    """``<data_dir>/secret`` not UTF-8, a directory: Python's bare error
    ("'utf-8' codec can't decode byte 0xff", "[Errno 21] Is a directory"), as
    --secret-file's were before (a new-user pass).  Said now as
    --secret-file's are, with where the data directory came from; and the
    same for the HTTP API key's file next to it."""
    listen = ("--listen", "tcp://127.0.0.1:0")
    data = tmp_path / "d"
    data.mkdir()
    said = {"not-utf8": "is not UTF-8 text", "directory": ": Is a directory", "empty": " is empty"}[bad]
    for name, what, command, args in [
        ("secret", "the token secret file", "serve", ["serve", *listen]),
        ("secret", "the token secret file", "token", ["token", "--user", "alice"]),
        ("api-key", "the HTTP API key file", "serve", ["serve", *listen, "--http", "http://127.0.0.1:0"]),
    ]:
        path = data / name
        if path.is_dir():
            path.rmdir()
        elif path.exists():
            path.unlink()
        if bad == "not-utf8":
            path.write_bytes(b"\xff\xfe" + bytes(range(128, 200)))
        elif bad == "directory":
            path.mkdir()
        else:
            path.write_text("\n")
        if name == "api-key":  # (a good token secret next to it)
            if (data / "secret").is_dir():
                (data / "secret").rmdir()
            (data / "secret").write_text("s" * 64 + "\n")
        r = run_pimcore(*args, "--data-dir", data, cwd=tmp_path)
        sep = "" if said.startswith((":", " ")) else " "
        assert_clean_exit_2(r, f"{what} {path}{sep}{said} (from --data-dir)", command=command)
        r = run_pimcore(*args, env={"PIMCORE_DATA_DIR": str(data)}, cwd=tmp_path)
        assert_clean_exit_2(r, f"{what} {path}{sep}{said} (from $PIMCORE_DATA_DIR)", command=command)


def _uncreatable_dir() -> Path:
    """A directory where even root cannot create a file (sysfs: EACCES), or
    a skip: what a read-only file system does to ``<data_dir>/secret``."""
    import os

    d = Path("/sys")
    try:
        os.close(os.open(d / "secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:
        return d
    else:
        os.unlink(d / "secret")
    pytest.skip("no directory here refuses to have a file made in it")


def test_a_kept_secret_that_cannot_be_made_is_said_in_words(tmp_path: Path) -> None:
    """``<data_dir>/secret`` on a read-only file system (or another OSError
    making it) said a bare "[Errno 30] Read-only file system: '.../secret'",
    where every other refused data directory says where its path came from.
    The same for the HTTP API key's and the webhook secret's files."""
    data = _uncreatable_dir()
    listen = ("--listen", "tcp://127.0.0.1:0")
    (tmp_path / "s").write_text("s" * 64 + "\n")
    why = "Permission denied"  # (sysfs; a read-only mount says "Read-only file system")
    r = run_pimcore("serve", "--data-dir", data, *listen, cwd=tmp_path)
    assert_clean_exit_2(r, f"cannot make the token secret file {data / 'secret'}: {why} (from --data-dir)")
    r = run_pimcore("serve", *listen, env={"PIMCORE_DATA_DIR": str(data)}, cwd=tmp_path)
    assert_clean_exit_2(r, f"cannot make the token secret file {data / 'secret'}: {why} (from $PIMCORE_DATA_DIR)")
    r = run_pimcore("token", "--data-dir", data, "--user", "alice", "--create-secret", cwd=tmp_path)
    assert_clean_exit_2(r, f"cannot make the token secret file {data / 'secret'}: {why} (from --data-dir)", command="token")
    r = run_pimcore("serve", "--data-dir", data, "--secret-file", "s", "--http", "http://127.0.0.1:0", *listen, cwd=tmp_path)
    assert_clean_exit_2(r, f"cannot make the HTTP API key file {data / 'api-key'}: {why} (from --data-dir)")
    cfg = write_config(tmp_path / "p.toml", f'data_dir = "{data}"\n[webhooks]\nurl = "http://127.0.0.1:1/hook"\n')
    r = run_pimcore("serve", "--config", cfg, "--secret-file", "s", *listen, cwd=tmp_path)
    assert_clean_exit_2(r, f"{cfg}: cannot make the webhook secret file {data / 'webhook-secret'}: {why}")
    assert not any((data / name).exists() for name in ("secret", "api-key", "webhook-secret"))


def test_a_store_that_cannot_be_made_in_the_data_directory_is_said_in_words(tmp_path: Path) -> None:
    """With --secret-file nothing is made in the data directory before the
    store, and a read-only one said a bare "[Errno 30] Read-only file system:
    '.../store'" (or "[Errno 1] Operation not permitted"): serve, group, the
    Redis store's note and embedding say what could not be made, and where
    the data directory came from."""
    from pimcore.config import ConfigError
    from pimcore.embed import open_pimcore

    base = _uncreatable_dir()
    listen = ("--listen", "tcp://127.0.0.1:0")
    (tmp_path / "s").write_text("s" * 64 + "\n")
    for data, what in ((base, f"the store {base / 'store'}"), (base / "pimcore-x", f"the data directory {base / 'pimcore-x'}")):
        r = run_pimcore("serve", "--data-dir", data, "--secret-file", "s", *listen, cwd=tmp_path)
        assert_clean_exit_2(r, f"cannot make {what}: ")
        assert r.stderr.endswith(" (from --data-dir)\n") and "[Errno" not in r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1, r.stderr
        r = run_pimcore("serve", "--secret-file", "s", *listen, env={"PIMCORE_DATA_DIR": str(data)}, cwd=tmp_path)
        assert r.stderr.startswith(f"pimcore serve: cannot make {what}: ") and "[Errno" not in r.stderr, r.stderr
        assert r.stderr.endswith(" (from $PIMCORE_DATA_DIR)\n"), r.stderr
        r = run_pimcore("group", "create", "team", "alice", "--data-dir", data, cwd=tmp_path)
        assert_clean_exit_2(r, f"cannot make {what}: ", " (from --data-dir)", command="group")
        assert "[Errno" not in r.stderr, r.stderr

        async def main() -> None:
            async with open_pimcore(data_dir=data, secret_file=str(tmp_path / "s")):
                pass  # pragma: no cover

        with pytest.raises(ConfigError) as err:
            trio.run(main)
        assert str(err.value).startswith(f"cannot make {what}: ") and str(err.value).endswith(" (from data_dir)"), err.value
    # A broker on Redis leaves a note in its data directory: the same.
    r = run_pimcore("serve", "--data-dir", base / "pimcore-x", "--secret-file", "s", "--store", "redis://127.0.0.1:1",
                    *listen, cwd=tmp_path)
    assert_clean_exit_2(r, f"cannot make the data directory {base / 'pimcore-x'}: ", " (from --data-dir)")
    assert "[Errno" not in r.stderr, r.stderr


def test_a_refused_data_dir_or_secret_file_says_where_the_path_came_from(tmp_path: Path) -> None:
    """Every other refused setting says where its value came from (a flag, a
    variable, a file); the data directory and the secret file did not -- a
    $PIMCORE_DATA_DIR left in a shell looked like a broken --data-dir
    default (a LOW of the last notes)."""
    (tmp_path / "afile").write_text("")
    listen = ("--listen", "tcp://127.0.0.1:0")
    r = run_pimcore("serve", *listen, env={"PIMCORE_DATA_DIR": str(tmp_path / "afile")}, cwd=tmp_path)
    assert_clean_exit_2(r, f"the data directory {tmp_path / 'afile'} is a file, not a directory (from $PIMCORE_DATA_DIR)")
    cfg = write_config(tmp_path / "p.toml", f'data_dir = "{tmp_path / "afile" / "sub"}"\n')
    r = run_pimcore("token", "--config", cfg, "--user", "alice", cwd=tmp_path)
    assert_clean_exit_2(r, f"{cfg}: the data directory {tmp_path / 'afile' / 'sub'} cannot be made", command="token")
    # (A path with the setting's name in it stays as it is: the name was
    # replaced by the option's wherever it was found first.)
    # A path that is, or has as a word, the setting's name too (a new-user
    # pass: `--data-dir data_dir` was said as "the data directory --data-dir").
    for name in ("my_data_dir", "data_dir", "my data_dir.d"):
        (tmp_path / name).write_text("")
        r = run_pimcore("serve", "--data-dir", name, *listen, cwd=tmp_path)
        assert_clean_exit_2(r, f"the data directory {name} is a file, not a directory (from --data-dir)")
    (tmp_path / "secret_file").write_text("")
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", "--secret-file", "secret_file", *listen, cwd=tmp_path)
    assert_clean_exit_2(r, "the token secret file secret_file is empty (from --secret-file)")
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", *listen, env={"PIMCORE_SECRET_FILE": str(tmp_path / "nope")},
                    cwd=tmp_path)
    assert_clean_exit_2(r, f"the token secret file {tmp_path / 'nope'}: No such file or directory (from $PIMCORE_SECRET_FILE)")
    (tmp_path / "empty").write_text("\n")
    cfg = write_config(tmp_path / "q.toml", f'secret_file = "{tmp_path / "empty"}"\n')
    r = run_pimcore("token", "--config", cfg, "--user", "alice", cwd=tmp_path)
    assert_clean_exit_2(r, f"{cfg}: the token secret file {tmp_path / 'empty'} is empty", command="token")


def test_port_in_use_exits_1_without_a_traceback(tmp_path: Path, procs: ProcGroup) -> None:
    first = procs.serve("--listen", LOOPBACK, "--data-dir", tmp_path / "a")
    r = run_pimcore("serve", "--listen", first.url(), "--data-dir", tmp_path / "b")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("pimcore serve: ") and "in use" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_data_dir_in_use_by_another_broker_says_what_a_cli_user_can_do(tmp_path: Path, procs: ProcGroup) -> None:
    """It said "open the store with owner=False for maintenance", a Python
    argument a CLI user cannot give."""
    data = tmp_path / "data"
    first = procs.serve("--listen", LOOPBACK, "--data-dir", data)
    r = run_pimcore("serve", "--listen", LOOPBACK, "--data-dir", data)
    # Exit 1, as a port in use: held by another process, not a mistake in the command (it was 2).
    assert_clean_exit_2(r, str(data), f"is in use by process {first.popen.pid} (", " serve --listen", "--data-dir",
                        "pimcore group", code=1)
    assert "owner=False" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # What it says works while the other broker runs does.
    made = run_pimcore("group", "create", "team", "alice", "bob", "--data-dir", data)
    assert made.returncode == 0, made.stderr
    # With --http too, the same words, and no API key left behind (a new
    # operator's trial: the refused start had made one).
    r = run_pimcore("serve", "--listen", LOOPBACK, "--http", LOOPBACK, "--data-dir", data)
    assert r.returncode == 1 and f"is in use by process {first.popen.pid} (" in r.stderr, r.stderr
    assert not (data / "api-key").exists()


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    chain, key = d / "server.pem", d / "server.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key))
    return ca, chain, key


def tls_server(procs: ProcGroup, tls_files, data: Path, scheme: str) -> Server:
    ca, chain, key = tls_files
    listen = f"{scheme}://127.0.0.1:0" + ("/im" if scheme == "wss" else "")
    return procs.serve("--listen", listen, "--cert", chain, "--key", key, "--data-dir", data)


@pytest.mark.parametrize("scheme", ["tls", "wss"])
async def test_tls_listener(tmp_path: Path, procs: ProcGroup, tls_files, scheme: str) -> None:
    ca = tls_files[0]
    data = tmp_path / "data"
    with trio.fail_after(60):
        server = tls_server(procs, tls_files, data, scheme)
        url = server.url(scheme)
        tok = await in_thread(token_for, "alice", data)

        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        async with open_client(url, tok, "phone", config=FAST, ssl_context=trusting) as alice:
            assert (await alice.send(AB, b"encrypted")).seq == 1

        stranger = ssl.create_default_context()  # system CAs only
        with pytest.raises(ConnectFailed):
            async with open_client(url, tok, "phone", config=REFUSED, ssl_context=stranger):
                pass  # pragma: no cover
        # Plain TCP (or ws) to a TLS port is no way in either.
        plain = url.replace(f"{scheme}://", "tcp://" if scheme == "tls" else "ws://")
        with pytest.raises(ConnectFailed):
            async with open_client(plain, tok, "phone", config=REFUSED):
                pass  # pragma: no cover

        # The broker survived the bad handshakes.
        async with open_client(url, tok, "phone", config=FAST, ssl_context=trusting) as alice:
            assert (await alice.send(AB, b"still there")).seq == 2

    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()


@pytest.mark.parametrize("scheme", ["tls", "wss"])
async def test_untrusted_certificate_fails_fast_and_says_why(tmp_path: Path, procs: ProcGroup, tls_files, scheme: str) -> None:
    data = tmp_path / "data"
    server = tls_server(procs, tls_files, data, scheme)
    tok = await in_thread(token_for, "alice", data)
    # "Fast" = without waiting out a long connect_timeout: a certificate that
    # does not verify is not retried.  The hard deadline is far below it.
    patient = ClientConfig(connect_timeout=120.0, backoff_max=0.5)
    with trio.fail_after(30):
        with pytest.raises(ConnectFailed) as err:
            async with open_client(server.url(scheme), tok, "phone", config=patient, ssl_context=ssl.create_default_context()):
                pass  # pragma: no cover
    assert "certificate verify failed" in str(err.value).lower(), str(err.value)


def test_chat_over_tls_needs_the_ca(tmp_path: Path, procs: ProcGroup, tls_files) -> None:
    ca = tls_files[0]
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    data = tmp_path / "data"
    server = tls_server(procs, tls_files, data, "tls")
    tok = token_for("alice", data)
    chat = ["chat", "--url", server.url("tls"), "--token", tok, "--to", "bob"]

    ok = procs.start(*chat, "--cafile", cafile, stdin=True)
    ok.expect(r"^connected as alice")
    ok.write("/quit")
    ok.expect(r"^bye$")
    assert ok.wait() == 0, ok.describe()

    refused = run_pimcore(*chat)  # trusts only the system CAs
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    connecting, error = refused.stderr.splitlines()  # "connecting to ..." at once, then the error
    assert connecting.startswith("pimcore chat: connecting to tls://"), refused.stderr
    assert error.startswith("pimcore chat: cannot connect"), refused.stderr
    assert "certificate verify failed" in refused.stderr and "Traceback" not in refused.stderr
    # (A new-user pass: nothing said how to trust the broker's CA.)
    assert error.endswith("(give --cafile PATH: the CA certificate that signed the broker's)"), refused.stderr


def test_chat_with_a_token_bound_to_another_device_names_it(tmp_path: Path, procs: ProcGroup) -> None:
    """It said only "token is bound to another device" (a new-user pass)."""
    data = tmp_path / "data"
    server = procs.serve("--listen", LOOPBACK, "--data-dir", data)
    tok = token_for("bob", data, "--device", "term2")
    refused = run_pimcore("chat", "--url", server.url(), "--token", tok, "--to", "alice", "--device", "terminal")
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    error = refused.stderr.splitlines()[-1]
    assert error == ("pimcore chat: token refused: token is bound to device 'term2', not 'terminal'"
                     " (pimcore chat --device term2)"), refused.stderr
    # Without --device, chat takes the token's device (it was refused the
    # same way, though the token says which device: a new-user pass).
    ok = run_pimcore("chat", "--url", server.url(), "--token", tok, "--to", "alice")
    assert ok.returncode == 0, (ok.stdout, ok.stderr)
    assert ok.stdout.startswith("connected as bob (term2)"), ok.stdout


async def test_connect_timeout_is_reported_as_a_timeout() -> None:
    with socket.socket() as silent:  # accepts (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with trio.fail_after(20):
            with pytest.raises(ConnectFailed) as err:
                async with open_client(f"tcp://127.0.0.1:{port}", "token", "phone", config=REFUSED):
                    pass  # pragma: no cover
    msg = str(err.value)
    assert "cancel" not in msg.lower(), msg
    assert "time" in msg.lower() or "slow" in msg.lower(), msg


@pytest.mark.parametrize("listen", ["tls://127.0.0.1:0", "wss://127.0.0.1:0/im"])
def test_secure_listener_without_a_certificate_exits_2(tmp_path: Path, listen: str) -> None:
    r = run_pimcore("serve", "--listen", listen, "--data-dir", tmp_path / "d")
    assert_clean_exit_2(r, "certificate", "--cert")


@pytest.mark.parametrize("args", [["--listen", "tls://127.0.0.1:0"], ["--listen", "wss://127.0.0.1:0/im"],
                                  ["--listen", "tcp://127.0.0.1:0", "--http", "tls://127.0.0.1:0"]])
def test_a_certificate_that_does_not_load_exits_2_naming_the_file(tmp_path: Path, tls_files, args: list[str]) -> None:
    """A missing file said only "[Errno 2] No such file or directory" (and
    exit 1 for a listener, found once listening began)."""
    _, chain, key = tls_files
    missing = tmp_path / "nope.pem"
    for cert_args, needle in ((["--cert", missing, "--key", key], str(missing)),
                              (["--cert", chain, "--key", missing], str(missing)),
                              (["--cert", key, "--key", key], str(key))):  # a key is no certificate
        r = run_pimcore("serve", *args, *cert_args, "--data-dir", tmp_path / "d")
        assert_clean_exit_2(r, needle)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("how", ["flags", "env", "toml"])
def test_a_certificate_with_no_tls_listener_exits_2(tmp_path: Path, tls_files, how: str) -> None:
    """--cert/--key ([tls] cert/key, $PIMCORE_TLS_CERT/KEY) with only tcp://
    and ws:// listeners and no https HTTP listener were silently ignored."""
    _, chain, key = tls_files
    args: list = ["--listen", LOOPBACK, "--http", "http://127.0.0.1:0"]
    env = None
    if how == "flags":
        args += ["--cert", chain, "--key", key]
    elif how == "env":
        env = {"PIMCORE_TLS_CERT": str(chain), "PIMCORE_TLS_KEY": str(key)}
    else:
        config = tmp_path / "pimcore.toml"
        config.write_text(f'[tls]\ncert = "{chain}"\nkey = "{key}"\n')
        args += ["--config", config]
    r = run_pimcore("serve", *args, "--data-dir", tmp_path / "d", env=env)
    assert_clean_exit_2(r, "--cert", "tls://", "https://")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "d").exists()


def test_a_certificate_for_the_https_listener_only_is_used(tmp_path: Path, tls_files) -> None:
    """No TLS broker listener but an https:// HTTP one: the certificate is its."""
    from pimcore.config import load_settings

    _, chain, key = tls_files
    settings = load_settings(None, env={}, listen=[LOOPBACK], http="https://127.0.0.1:0", cert=str(chain), key=str(key))
    assert settings.tls_context() is not None
    settings.check_tls_used()  # no error


# ---------------------------------------------------------------- the one-minute tour


def test_one_minute_tour(tmp_path: Path, procs: ProcGroup) -> None:
    """README: serve, two tokens, two `pimcore chat` terminals."""
    data = tmp_path / "data"
    server = procs.serve("--listen", LOOPBACK, "--data-dir", data)
    url = server.url()
    alice_tok = token_for("alice", data)
    bob_tok = token_for("bob", data)

    alice = procs.start("chat", "--url", url, "--token", alice_tok, "--to", "bob", stdin=True)
    bob = procs.start("chat", "--url", url, "--token", bob_tok, "--to", "alice", stdin=True)
    alice.expect(r"^connected as alice \(terminal\); chatting with bob")
    bob.expect(r"^connected as bob \(terminal\); chatting with alice")

    alice.write("hello bob")
    alice.expect(r"^✓ sent \(#1\): hello bob$")
    bob.expect(r"\] alice: hello bob  \(#1\)$")
    alice.expect(r"^✓✓ read by bob \(up to #1\)$")

    bob.write("hi alice")
    bob.expect(r"^✓ sent \(#2\): hi alice$")
    alice.expect(r"\] bob: hi alice  \(#2\)$")
    bob.expect(r"^✓✓ read by alice \(up to #2\)$")

    for p in (alice, bob):
        p.write("/quit")
    for p in (alice, bob):
        p.expect(r"^bye$")
        assert p.wait(timeout=15) == 0, p.describe()
        assert "Traceback" not in "\n".join(p.err), p.describe()
    assert not any("✗" in line for line in alice.out + bob.out)

    # A later session shows the conversation from the stored history.
    again = procs.start("chat", "--url", url, "--token", alice_tok, "--to", "bob", stdin=True)
    again.expect(r"\] me: hello bob  \(#1\)$")
    again.expect(r"\] bob: hi alice  \(#2\)$")
    again.close_stdin()  # end of input leaves too
    again.expect(r"^bye$")
    assert again.wait(timeout=15) == 0, again.describe()

    server.send_signal(signal.SIGINT)
    assert server.wait() == 0 and server.out[-1] == "stopped", server.describe()


@pytest.mark.slow
def test_groups_are_administered_while_serving_and_chatted_in(tmp_path: Path, procs: ProcGroup) -> None:
    data = tmp_path / "data"
    server = procs.serve("--listen", LOOPBACK, "--data-dir", data)
    url = server.url()

    made = run_pimcore("group", "create", "team", "alice", "bob", "--data-dir", data)
    assert made.returncode == 0 and made.stdout.strip() == "team: 2 members: alice bob", made
    again = run_pimcore("group", "create", "team", "carol", "--data-dir", data)
    assert again.returncode == 2 and again.stderr.startswith("pimcore group:") and "Traceback" not in again.stderr
    missing = run_pimcore("group", "add", "nosuch", "carol", "--data-dir", data)
    assert missing.returncode == 2 and "no group 'nosuch'" in missing.stderr

    alice = procs.start("chat", "--url", url, "--token", token_for("alice", data), "--group", "team", stdin=True)
    carol = procs.start("chat", "--url", url, "--token", token_for("carol", data), "--group", "team", stdin=True)
    alice.expect(r"^connected as alice \(terminal\); chatting in team")
    carol.expect(r"^connected as carol \(terminal\); chatting in team")
    carol.expect(r"^⚠ you \(carol\) are not a member of group team: .*\(pimcore group add team carol\)")  # before typing
    carol.write("let me in")
    carol.expect(r"^✗ not sent \(NOT_MEMBER: carol is not a member of group 'team'\): let me in$")

    added = run_pimcore("group", "add", "team", "carol", "--data-dir", data)  # while serving
    assert added.returncode == 0 and added.stdout.strip() == "team: 3 members: alice bob carol", added
    # Adding her is entry #1 of the conversation (JOINED), shown as a notice.
    alice.write("welcome carol")
    alice.expect(r"^✓ sent \(#2\): welcome carol$")
    carol.expect(r"^— carol joined  \(#1\)$")
    carol.expect(r"\] alice: welcome carol  \(#2\)$")
    carol.write("thanks")
    alice.expect(r"\] carol: thanks  \(#3\)$")

    removed = run_pimcore("group", "remove", "team", "carol", "--data-dir", data)
    assert removed.returncode == 0 and "carol" not in removed.stdout.split(":")[-1]
    carol.write("still here?")
    carol.expect(r"^✗ not sent \(NOT_MEMBER: carol is not a member of group 'team'\): still here\?$")
    shown = run_pimcore("group", "show", "team", "--data-dir", data)
    assert shown.stdout == "team: 2 members: alice bob\nhistory visible to later members: no\n", shown
    for p in (alice, carol):
        p.write("/quit")
        assert p.wait(timeout=15) == 0, p.describe()
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()
