"""End to end for operators: ``pimcore serve`` with its HTTP listener, log
lines (JSON parsed), settings from PIMCORE_* variables, --print-config,
configuration errors naming the key, and bind errors naming the address.

Real subprocesses on loopback port 0; every wait has a deadline.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import pytest
import trio

from pimcore.auth import issue_token
from pimcore.client import AuthFailed, ClientConfig, SendError, open_client
from pimcore.errors import ErrorCode
from pimcore.store import direct_conversation

from _proc import ProcGroup, free_port, procs, run_pimcore, token_for  # noqa: F401  (procs is a fixture)

AB = direct_conversation("alice", "bob")
LOOPBACK = "tcp://127.0.0.1:0"
FAST = ClientConfig(connect_timeout=5.0, ack_timeout=2.0, send_timeout=10.0, backoff_max=0.5)


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)


def http_get(url: str, path: str, key: Optional[str] = None) -> tuple[int, Any]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        r = conn.getresponse()
        body = r.read()
        return r.status, json.loads(body) if r.getheader("content-type") == "application/json" else body.decode()
    finally:
        conn.close()


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    """Every stderr line parsed as JSON (a line that is not fails the test)."""
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return out


def wait_for_log(server, pred, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in json_lines(list(server.err)):
            if pred(rec):
                return rec
        time.sleep(0.05)
    raise AssertionError(f"no such log line\n{server.describe()}")


# ---------------------------------------------------------------- the HTTP listener and logs


async def test_serve_with_http_and_json_logs(tmp_path: Path, procs: ProcGroup) -> None:
    data = tmp_path / "data"
    with trio.fail_after(60):
        server = procs.serve("--listen", LOOPBACK, "--http", LOOPBACK, "--data-dir", data, "--log-format", "json")
        assert server.url("tcp").startswith("tcp://127.0.0.1:")
        http_url = server.url("http")
        assert http_url.startswith("http://127.0.0.1:") and not http_url.endswith(":0")
        key_file = data / "api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert len(key) >= 32

        assert await in_thread(http_get, http_url, "/healthz") == (200, {"status": "ok"})
        status, doc = await in_thread(http_get, http_url, "/v1/info")
        assert status == 401 and doc["error"]["code"] == "AUTH_FAILED"
        status, info = await in_thread(http_get, http_url, "/v1/info", key)
        assert status == 200 and len(info["epoch"]) == 32 and info["listeners"] == [server.url("tcp")]

        tok = await in_thread(token_for, "alice", data)
        async with open_client(server.url(), tok, "phone", config=FAST) as alice:
            await alice.send(AB, b"hi")
            login = await in_thread(wait_for_log, server, lambda r: r.get("event") == "login")
        with pytest.raises(AuthFailed):
            async with open_client(server.url(), issue_token(b"x" * 32, "mallory"), "pc", config=FAST):
                pass  # pragma: no cover
        refused = await in_thread(wait_for_log, server, lambda r: r.get("event") == "login_refused")
        close = await in_thread(wait_for_log, server, lambda r: r.get("event") == "close" and r.get("code") == "NORMAL")
        offline = await in_thread(wait_for_log, server, lambda r: r.get("event") == "offline")
        connect = await in_thread(wait_for_log, server, lambda r: r.get("event") == "connect")

        status, text = await in_thread(http_get, http_url, "/metrics")
        assert status == 200 and "pimcore_logins_total 1.0" in text and "pimcore_messages_stored_total 1.0" in text

    for rec in (login, refused, close, offline, connect):
        assert set(rec) >= {"ts", "level", "logger", "msg", "event", "conn"}, rec
        assert rec["ts"].endswith("Z") and rec["logger"] == "pimcore.net"
    assert (login["user"], login["device"], login["level"]) == ("alice", "phone", "info")
    assert refused["level"] == "warning" and refused["code"] == "AUTH_FAILED" and "signature" in refused["reason"]
    assert close["conn"] == login["conn"] and close["reason"] == "closed by client"
    assert (offline["user"], offline["device"], offline["code"]) == ("alice", "phone", "NORMAL")
    assert connect["peer"].startswith("127.0.0.1:") and connect["transport"] == "tcp"
    created = [r for r in json_lines(server.err) if r.get("event") == "api_key_created"]
    assert created and created[0]["path"] == str(key_file)

    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()
    json_lines(server.err)  # every line, to the end, is JSON
    assert "Traceback" not in "\n".join(server.err)


async def test_text_logs_and_log_level(tmp_path: Path, procs: ProcGroup) -> None:
    data = tmp_path / "data"
    with trio.fail_after(60):
        quiet = procs.serve("--listen", LOOPBACK, "--data-dir", data, "--log-level", "warning")
        tok = await in_thread(token_for, "alice", data)
        async with open_client(quiet.url(), tok, "phone", config=FAST):
            pass
        with pytest.raises(AuthFailed):
            async with open_client(quiet.url(), issue_token(b"y" * 32, "alice"), "pc", config=FAST):
                pass  # pragma: no cover
        quiet.send_signal(signal.SIGTERM)
        assert await in_thread(quiet.wait) == 0
        # warning: the refused login only, as text
        assert [line for line in quiet.err if "login refused" in line], quiet.describe()
        assert not [line for line in quiet.err if " INFO " in line], quiet.describe()
        assert all(not line.startswith("{") for line in quiet.err)


async def test_each_listener_is_announced_once(tmp_path: Path, procs: ProcGroup) -> None:
    # stdout says "listening on URL" for scripts; the text log at info said
    # it again on stderr (a new user saw every address twice).  JSON logs
    # keep the event for log pipelines.
    with trio.fail_after(60):
        text = procs.serve("--listen", LOOPBACK, "--http", LOOPBACK, "--data-dir", tmp_path / "a")
        text.send_signal(signal.SIGTERM)
        assert await in_thread(text.wait) == 0
        for url in text.urls:
            assert sum(url in line for line in text.out + text.err) == 1, text.describe()
        assert [line for line in text.err if " INFO " in line], text.describe()  # (info lines do show)
        js = procs.serve("--listen", LOOPBACK, "--http", LOOPBACK, "--data-dir", tmp_path / "b", "--log-format", "json")
        js.send_signal(signal.SIGTERM)
        assert await in_thread(js.wait) == 0
    events = [r for r in json_lines(js.err) if r.get("event") == "listening"]
    assert sorted(r["url"] for r in events) == sorted(js.urls), js.describe()


# ---------------------------------------------------------------- environment, precedence, --print-config


async def test_settings_from_environment_variables(tmp_path: Path, procs: ProcGroup) -> None:
    data = tmp_path / "env-data"
    env = {
        "PIMCORE_DATA_DIR": str(data),
        "PIMCORE_LISTEN": "tcp://127.0.0.1:0, ws://127.0.0.1:0/im",
        "PIMCORE_HTTP": "tcp://127.0.0.1:0",
        "PIMCORE_LOG_LEVEL": "warning",
        "PIMCORE_LIMITS_MAX_PAYLOAD": "100",
        "PIMCORE_API_KEYS": "key-one-0123456789, key-two-0123456789",
        # The key pimcore's --http commands send: not one serve takes, and
        # it says so (an operator who set it for the broker got 401s, no word).
        "PIMCORE_API_KEY": "key-three-0123456789",
    }
    with trio.fail_after(60):
        server = procs.serve(env=env, cwd=tmp_path)
        while not [line for line in server.err if "$PIMCORE_API_KEY is set" in line]:
            await trio.sleep(0.05)  # (stderr is read by a thread of its own)
        [said] = [line for line in server.err if "$PIMCORE_API_KEY is set" in line]
        assert " WARNING " in said and "$PIMCORE_API_KEYS to accept it" in said, said
        assert [u.split(":")[0] for u in server.urls] == ["tcp", "ws", "http"]
        assert (data / "secret").is_file() and not (data / "api-key").exists()
        assert (await in_thread(http_get, server.url("http"), "/v1/info", "key-two-0123456789"))[0] == 200
        assert (await in_thread(http_get, server.url("http"), "/v1/info", "key-three-0123456789"))[0] == 401
        tok = await in_thread(token_for, "alice", data)
        async with open_client(server.url(), tok, "phone", config=FAST) as alice:
            assert (await alice.send(AB, b"x" * 100)).seq == 1
            with pytest.raises(SendError) as err:
                await alice.send(AB, b"x" * 101)
            assert err.value.code is ErrorCode.PAYLOAD_TOO_LARGE
        assert not [line for line in server.err if " INFO " in line], server.describe()


def print_config(*args: Any, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> dict[str, Any]:
    r = run_pimcore("serve", "--print-config", *args, env=env, cwd=cwd)
    assert r.returncode == 0, (r.stdout, r.stderr)
    return tomllib.loads(r.stdout)


def test_print_config_shows_effective_settings_flags_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "pimcore.toml"
    cfg.write_text(
        'data_dir = "from-file"\nlisten = "tcp://127.0.0.1:1"\nsecret = "file-secret-0123456789-0123456789"\n'
        'api_keys = ["file-key-0123456789"]\nhttp = "tcp://127.0.0.1:9"\n'
        "[limits]\nwindow = 8\nsend_rate = 5.0\nmax_payload = 100\n[server]\nidle_timeout = 30.0\n"
    )
    env = {"PIMCORE_CONFIG": str(cfg), "PIMCORE_LIMITS_WINDOW": "16", "PIMCORE_SERVER_IDLE_TIMEOUT": "20",
           "PIMCORE_HTTP_REQUEST_TIMEOUT": "2.5", "PIMCORE_SERVER_COMMIT_IN_THREAD": "true",
           "PIMCORE_LISTEN": "tcp://127.0.0.1:2"}
    doc = print_config("--window", "32", env=env, cwd=tmp_path)
    assert doc["limits"]["window"] == 32  # flag > env > file
    assert doc["limits"]["send_rate"] == 5.0  # file > default
    assert doc["limits"]["max_payload"] == 100
    assert doc["limits"]["max_frame"] == 1 << 20  # default shown
    assert doc["server"]["idle_timeout"] == 20.0  # env > file
    assert doc["server"]["commit_in_thread"] is True
    assert doc["server"]["login_timeout"] == 10.0
    assert doc["http"] == {**doc["http"], "listen": "tcp://127.0.0.1:9", "request_timeout": 2.5}
    assert doc["listen"] == ["tcp://127.0.0.1:2"]
    assert doc["data_dir"] == str(tmp_path / "from-file")  # relative to the file
    assert "secret" not in doc and "api_keys" not in doc  # (secrets: comments)
    r = run_pimcore("serve", "--print-config", env=env, cwd=tmp_path)
    assert "file-secret" not in r.stdout and "file-key" not in r.stdout
    assert not (tmp_path / "from-file").exists()  # printing creates nothing

    # The flag --listen beats PIMCORE_LISTEN; --data-dir beats the file.
    doc = print_config("--listen", "ws://127.0.0.1:3/im", "--data-dir", "flagged", env=env, cwd=tmp_path)
    assert doc["listen"] == ["ws://127.0.0.1:3/im"] and doc["data_dir"] == str(tmp_path / "flagged")

    defaults = print_config(env={}, cwd=tmp_path)
    assert defaults["listen"] == ["tcp://127.0.0.1:7400"] and defaults["log_level"] == "info"
    assert "listen" not in defaults["http"] and "api_keys" not in defaults and "tls" not in defaults


def _round_trip(tmp_path: Path, *args: str, env: Optional[dict[str, str]] = None) -> str:
    """``serve --print-config ARGS > rt.toml`` (in a folder of its own),
    then ``serve --config rt.toml --print-config`` from elsewhere, with the
    same environment: the second prints what the first did; the text."""
    out = tmp_path / "elsewhere"
    out.mkdir()
    first = run_pimcore("serve", "--print-config", *args, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (out / "rt.toml").write_text(first.stdout)
    second = run_pimcore("serve", "--config", out / "rt.toml", "--print-config", env=env, cwd=out)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    return first.stdout


def test_print_config_of_the_defaults_reads_back_as_itself(tmp_path: Path) -> None:
    """`serve --print-config > rt.toml; serve --config rt.toml` was refused:
    the printed ``api_keys = []`` ("the list is empty") and an empty [tls]."""
    text = _round_trip(tmp_path, env={})
    assert "api_keys" not in text and "[tls]" not in text
    assert tomllib.loads(text)["data_dir"] == str(tmp_path / "pimcore-data")  # (absolute: read from elsewhere)


def test_print_config_with_settings_reads_back_as_itself(tmp_path: Path) -> None:
    """Listen list, http, API keys, limits, a webhook: printed, read back,
    printed the same; the keys as comments (given again by the environment)."""
    cfg = tmp_path / "in.toml"
    cfg.write_text('[webhooks]\nurl = "https://backend/hook"\n[moderation]\nurl = "https://backend/mod"\n'
                   'policy = "open"\n')
    env = {"PIMCORE_API_KEYS": "key-one-0123456789,key-two-0123456789"}
    text = _round_trip(tmp_path, "--config", str(cfg), "--listen", "tcp://127.0.0.1:17410",
                       "--listen", "ws://127.0.0.1:17411/im", "--http", "tcp://127.0.0.1:17412", "--window", "32",
                       "--send-rate", "5", "--data-dir", "d", env=env)
    doc = tomllib.loads(text)
    assert doc["listen"] == ["tcp://127.0.0.1:17410", "ws://127.0.0.1:17411/im"]
    assert doc["http"]["listen"] == "tcp://127.0.0.1:17412" and doc["limits"]["window"] == 32
    assert "api_keys" not in doc and "key-one" not in text
    assert '# api_keys = ["<redacted>", "<redacted>"]  (a secret, not printed: give it in the file or as' \
           ' $PIMCORE_API_KEYS)' in text
    assert "# secret: not set, so " in text and "secret" not in doc["webhooks"]


@pytest.mark.parametrize(
    "env, needles",
    [
        ({"PIMCORE_LIMITS_SEND_RATE": "fast"}, ['limits.send_rate: expected a number, got "fast"', "PIMCORE_LIMITS_SEND_RATE"]),
        ({"PIMCORE_LIMITS_WINDOW": "2.5"}, ['limits.window: expected an integer, got "2.5"']),
        ({"PIMCORE_SERVER_COMMIT_IN_THREAD": "maybe"}, ['server.commit_in_thread: expected true or false (or 1/0, yes/no, on/off), got "maybe"']),
        ({"PIMCORE_LOG_LEVEL": "loud"}, ["log_level", "loud"]),
        ({"PIMCORE_HTTP": "ws://127.0.0.1:0"}, ["http", "scheme"]),
        ({"PIMCORE_HTTP": "tls://127.0.0.1:0"}, ["http", "certificate"]),
        ({"PIMCORE_CONFIG": "missing.toml"}, ["missing.toml"]),
        ({"PIMCORE_LIMITS_NOPE": "1"}, ["PIMCORE_LIMITS_NOPE", "unknown"]),
    ],
    ids=["number", "integer", "bool", "log-level", "http-scheme", "http-tls-no-cert", "missing-config", "unknown-variable"],
)
def test_bad_environment_exits_2_naming_the_key(tmp_path: Path, env: dict[str, str], needles: list[str]) -> None:
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", env=env, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("pimcore serve: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[limits]\nsend_rate = "fast"\n', 'limits.send_rate: expected a number, got "fast"'),
        ("[limits]\nwindow = 2.5\n", "limits.window: expected an integer, got 2.5"),
        ('[server]\nidle_timeout = "30s"\n', 'server.idle_timeout: expected a number, got "30s"'),
        ("[server]\ncommit_in_thread = 1\n", "server.commit_in_thread: expected true or false, got 1"),
        ("listen = 7400\n", "listen: expected a list of strings, got 7400"),
        ("data_dir = 3\n", "data_dir: expected a string (a path), got 3"),
        ("limits = 3\n", "limits: expected a table [limits], got 3"),
        ('[http]\nmax_body_bytes = "1MB"\n', 'http.max_body_bytes: expected an integer, got "1MB"'),
        ("[http]\nrequest_timeout = 0\n", "http.request_timeout: expected a number > 0, got 0.0"),
        ("[http]\nlisten_to = 1\n", "unknown keys in [http]"),
    ],
)
def test_config_file_type_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "pimcore.toml"
    # An [http] section gets a listener, so that its settings are used.
    cfg.write_text(text.replace("[http]\n", '[http]\nlisten = "tcp://127.0.0.1:0"\n'))
    r = run_pimcore("serve", "--config", cfg, "--data-dir", tmp_path / "d", "--listen", LOOPBACK)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "env, text, needle",
    [
        ({"PIMCORE_HTTP_MAX_BODY_BYTES": "-1"}, "", "http.max_body_bytes: expected an integer >= 1, got -1 (from $PIMCORE_HTTP_MAX_BODY_BYTES)"),
        ({"PIMCORE_HTTP_REQUEST_TIMEOUT": "0"}, "", "http.request_timeout: expected a number > 0, got 0.0 (from $PIMCORE_HTTP_REQUEST_TIMEOUT)"),
        ({}, "[http]\nmax_connections = 0\n", "http.max_connections: expected an integer >= 1, got 0"),
        ({}, "[http]\nkeepalive_timeout = -3\n", "http.keepalive_timeout: expected a number >= 0.1, got -3.0"),
        ({"PIMCORE_HTTP_KEEPALIVE_TIMEOUT": "0.0001"}, "",
         "http.keepalive_timeout: expected a number >= 0.1, got 0.0001 (from $PIMCORE_HTTP_KEEPALIVE_TIMEOUT)"),
        ({}, "[http]\nrequest_timeout = 0\n", "http.request_timeout: expected a number > 0, got 0.0"),
        ({}, "[http]\nmax_header_bytes = -5\n", "http.max_header_bytes: expected an integer >= 1, got -5"),
        ({"PIMCORE_HTTP_MAX_PAGE_BYTES": "0"}, "", "http.max_page_bytes: expected an integer >= 1, got 0 (from $PIMCORE_HTTP_MAX_PAGE_BYTES)"),
        ({}, "http = 5\n", 'http: expected a table [http] or a URL string (http = "tcp://HOST:PORT"), got 5'),
        # (Not http settings, but refused by serve and passed by --print-config: a trial.)
        ({}, 'secret = "short"\n', "the token secret from "),
        ({"PIMCORE_TLS_CERT": "c.pem", "PIMCORE_TLS_KEY": "k.pem"}, "", "given but no listener uses TLS"),
    ],
)
def test_http_settings_serve_refuses_are_refused_by_print_config_too(tmp_path: Path, env: dict[str, str], text: str,
                                                                       needle: str) -> None:
    cfg = tmp_path / "pimcore.toml"
    cfg.write_text(text)
    for extra in (["--print-config"], []):
        r = run_pimcore("serve", "--config", cfg, "--data-dir", tmp_path / "d", "--listen", LOOPBACK, "--http", LOOPBACK,
                        *extra, env=env)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)



def test_a_page_budget_below_one_message_is_refused_at_start_in_one_line(tmp_path: Path) -> None:
    """``[http] max_page_bytes`` must hold one message at max_payload (a
    page holds one item however large: a smaller budget would be passed by
    every page of large messages).  Refused by serve (and --print-config,
    and open_pimcore) in one line saying the least it takes; accepted once
    max_payload is small enough."""
    from pimcore.config import ConfigError
    from pimcore.embed import open_pimcore

    env = {"PIMCORE_HTTP_MAX_PAGE_BYTES": "50000"}
    for extra in (["--print-config"], []):
        r = run_pimcore("serve", "--data-dir", tmp_path / "d", "--listen", LOOPBACK, "--http", LOOPBACK, *extra, env=env)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        assert r.stderr == ("pimcore serve: http.max_page_bytes: 50000 is less than one message's JSON at"
                            " limits.max_payload 65536 (with limits.max_mentions 64): set at least 93912"
                            " (http.max_page_bytes from $PIMCORE_HTTP_MAX_PAGE_BYTES; limits.max_payload is the default;"
                            " limits.max_mentions is the default)\n"), (extra, r.stderr)
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", "--listen", LOOPBACK, "--http", LOOPBACK, "--max-payload",
                    "16384", "--print-config", env=env)
    assert r.returncode == 0 and "max_page_bytes = 50000\n" in r.stdout, r.stderr
    cfg = tmp_path / "pimcore.toml"
    # (With a listener: [http] keys set without one are refused for that.)
    cfg.write_text('[http]\nlisten = "tcp://127.0.0.1:0"\nmax_page_bytes = 50000\n')

    async def embedded() -> None:
        with pytest.raises(ConfigError, match=r"^http.max_page_bytes: 50000 is less than one message's JSON"
                                              r" at limits.max_payload 65536 .*: set at least 93912 "
                                              r"\(http.max_page_bytes from .*pimcore.toml;"):
            async with open_pimcore(config_file=str(cfg), data_dir=tmp_path / "e", secret="s" * 32):
                pass  # pragma: no cover - never opened

    trio.run(embedded)


# ---------------------------------------------------------------- address in use


def test_address_in_use_names_the_listener(tmp_path: Path, procs: ProcGroup) -> None:
    # It said "cannot listen on 127.0.0.1:P (tcp)" for the HTTP listener too:
    # which listener was it?
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, url in ((["--listen", f"tcp://127.0.0.1:{port}"], f"tcp://127.0.0.1:{port}"),
                          (["--listen", f"ws://127.0.0.1:{port}/im"], f"ws://127.0.0.1:{port}/im"),
                          (["--listen", LOOPBACK, "--http", f"tcp://127.0.0.1:{port}"], f"http://127.0.0.1:{port}")):
            r = run_pimcore("serve", "--data-dir", tmp_path / "d", "--log-level", "warning", *args)
            assert r.returncode == 1, (args, r.stdout, r.stderr)
            assert r.stderr == f"pimcore serve: cannot listen on {url}: address already in use\n", (args, r.stderr)
            assert "ready" not in r.stdout


def test_two_listeners_on_one_address_are_a_configuration_error_naming_both(tmp_path: Path) -> None:
    # It bound the first and then said only "Address already in use".
    port = free_port()
    cases = [
        (["--listen", f"tcp://127.0.0.1:{port}", "--http", f"tcp://127.0.0.1:{port}"],
         f"listen tcp://127.0.0.1:{port} and http http://127.0.0.1:{port}"),
        (["--listen", f"tcp://127.0.0.1:{port}", "--listen", f"ws://127.0.0.1:{port}/im"],
         f"listen tcp://127.0.0.1:{port} and listen ws://127.0.0.1:{port}/im"),
        (["--listen", LOOPBACK, "--listen", f"ws://127.0.0.1:{port}/a", "--http", f"http://127.0.0.1:{port}"],
         f"listen ws://127.0.0.1:{port}/a and http http://127.0.0.1:{port}"),
    ]
    for args, both in cases:
        for extra in ([], ["--print-config"]):
            r = run_pimcore("serve", "--data-dir", tmp_path / "d", *args, *extra)
            assert r.returncode == 2, (args, extra, r.stdout, r.stderr)
            assert r.stderr.startswith(f"pimcore serve: {both} are on the same address 127.0.0.1:{port}"), (
                args, r.stderr)
            assert "Traceback" not in r.stderr and r.stdout == "", (args, r.stdout)
            assert not (tmp_path / "d").exists()  # refused before anything was made
    # Port 0 (any free port) never collides.
    r = run_pimcore("serve", "--data-dir", tmp_path / "d", "--listen", LOOPBACK, "--listen", "ws://127.0.0.1:0/",
                    "--http", LOOPBACK, "--print-config")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("listen, http, clash", [
    (["tcp://127.0.0.1:7400"], "tcp://127.0.0.1:7400", True),
    (["tcp://0.0.0.0:7400"], "tcp://127.0.0.1:7400", True),  # the wildcard holds the port on every address
    (["tcp://[::]:7400"], "tcp://[::1]:7400", True),
    (["tcp://127.0.0.1:7400", "ws://127.0.0.2:7400/"], None, False),  # two addresses, one port each
    (["tcp://0.0.0.0:7400"], "tcp://[::1]:7400", False),  # IPv4 and IPv6: two sockets
    (["tcp://127.0.0.1:7400"], "tcp://127.0.0.1:7481", False),
    (["tcp://127.0.0.1:0", "ws://127.0.0.1:0/"], "tcp://127.0.0.1:0", False),
])
def test_the_listener_clash_rule(listen: list[str], http: Optional[str], clash: bool) -> None:
    # (Checked on the settings: nothing is bound.)
    from pimcore.config import ConfigError, load_settings

    settings = load_settings(None, listen=listen, http=http)
    if clash:
        with pytest.raises(ConfigError, match="are on the same address"):
            settings.check_listeners()
    else:
        settings.check_listeners()


@pytest.mark.parametrize("a, b, said", [
    # IPv4 literals in the short forms inet_aton takes (and bind uses):
    # they bound the same address and failed at bind time.
    ("127.1", "127.0.0.1", "127.1 is 127.0.0.1"),
    ("0x7f.0.0.1", "127.0.0.1", "0x7f.0.0.1 is 127.0.0.1"),
    ("2130706433", "127.0.0.1", "2130706433 is 127.0.0.1"),
    ("0", "127.0.0.1", "0 and 127.0.0.1 overlap"),  # "0" is 0.0.0.0, the wildcard
    ("[::0:1]", "[::1]", ":0:1 is ::1"),
])
def test_listener_hosts_that_are_ip_literals_are_compared_as_addresses(a: str, b: str, said: str) -> None:
    from pimcore.config import ConfigError, load_settings

    settings = load_settings(None, listen=[f"tcp://{a}:7400", f"ws://{b}:7400/"])
    with pytest.raises(ConfigError) as e:
        settings.check_listeners()
    msg = str(e.value)
    assert msg.startswith(f"listen tcp://{a}:7400 and listen ws://{b}:7400/ are on the same address"), msg
    assert said in msg, msg


def test_listener_host_names_are_not_looked_up_to_compare_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only numeric hosts are normalised (AI_NUMERICHOST): a name is never
    resolved by the check (binding says which listener failed)."""
    import socket

    from pimcore.config import load_settings

    real = socket.getaddrinfo

    def numeric_only(host, *a, **kw):  # type: ignore[no-untyped-def]
        flags = kw.get("flags", a[4] if len(a) > 4 else 0)  # (host, port, family, type, proto, flags)
        assert flags & socket.AI_NUMERICHOST, host
        return real(host, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)
    load_settings(None, listen=["tcp://box.example:7400", "ws://127.0.0.1:7400/", "tcp://127.1.2:7401"]).check_listeners()


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content); directories as b"<dir>"."""
    return {str(p.relative_to(root)): (b"<dir>" if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _failed_starts(port: int, tmp_path: Path) -> list[list[str]]:
    """Starts that fail after the data directory was prepared: a port in
    use (found once the store is open), a TLS HTTP listener whose
    certificate is missing (found after the secret and the API key)."""
    return [["--listen", f"tcp://127.0.0.1:{port}", "--http", LOOPBACK],
            ["--listen", LOOPBACK, "--http", f"tcp://127.0.0.1:{port}"],
            ["--listen", LOOPBACK, "--http", "tls://127.0.0.1:0", "--cert", str(tmp_path / "no-cert.pem"),
             "--key", str(tmp_path / "no-key.pem")]]


def test_a_failed_start_leaves_no_half_made_data_directory(tmp_path: Path) -> None:
    """serve made the data directory (and its parent) itself and the start
    failed: none of it stays (a secret or API key no broker ever used, an
    empty store)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for args in _failed_starts(taken.getsockname()[1], tmp_path):
            r = run_pimcore("serve", "--data-dir", tmp_path / "new" / "d", "--log-level", "warning", *args)
            assert r.returncode in (1, 2) and r.stderr.startswith("pimcore serve: "), (args, r.stdout, r.stderr)
            assert "Traceback" not in r.stderr and "ready" not in r.stdout, (args, r.stderr)
            assert not (tmp_path / "new").exists(), (args, _tree(tmp_path / "new"))


async def test_a_failed_start_keeps_what_was_there_and_removes_only_what_it_made(tmp_path: Path, procs: ProcGroup) -> None:
    data = tmp_path / "data"
    # A data directory with only a secret (and an operator's file): the failed
    # start's API key and store go, so the next start creates (and logs) its key.
    data.mkdir()
    (data / "secret").write_text("s" * 64 + "\n")
    (data / "notes.txt").write_text("mine\n")
    before = _tree(data)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for args in _failed_starts(taken.getsockname()[1], tmp_path):
            r = run_pimcore("serve", "--data-dir", data, "--log-level", "warning", *args)
            assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stdout, r.stderr)
            assert _tree(data) == before, args
        # A data directory a broker ran in: a failed start changes nothing in it.
        with trio.fail_after(60):
            server = procs.serve("--listen", LOOPBACK, "--http", LOOPBACK, "--data-dir", data)
            async with open_client(server.url(), await in_thread(token_for, "alice", data), "phone", config=FAST) as alice:
                await alice.send(AB, b"kept")
            server.send_signal(signal.SIGTERM)
            assert server.wait() == 0, server.describe()
        before = _tree(data)
        assert "store" in before and "api-key" in before
        for args in _failed_starts(taken.getsockname()[1], tmp_path):
            r = run_pimcore("serve", "--data-dir", data, "--log-level", "warning", *args)
            assert r.returncode in (1, 2) and "Traceback" not in r.stderr, (args, r.stdout, r.stderr)
            after = _tree(data)
            assert after.keys() == before.keys() and after["secret"] == before["secret"], args
            assert after["api-key"] == before["api-key"] and after["notes.txt"] == b"mine\n", args


async def test_sigterm_answers_an_in_flight_long_poll_and_ends_a_stream(tmp_path: Path, procs: ProcGroup) -> None:
    """A long-poll waiting when SIGTERM arrives gets a 503 ``unavailable``
    (not a closed connection: curl's exit 52), an SSE stream its last chunk."""
    data = tmp_path / "data"
    with trio.fail_after(60):
        server = procs.serve("--listen", LOOPBACK, "--data-dir", data, "--http", LOOPBACK,
                             env={"PIMCORE_SERVER_EVENTS": "true"})
        host, port = server.url("http").split("//", 1)[1].rsplit(":", 1)
        key = (data / "api-key").read_text().strip()
        streams = []
        for path in ("/v1/events?consumer=lp&wait=25&after=0", "/v1/events/stream?consumer=sse"):
            s = await trio.open_tcp_stream(host, int(port))
            await s.send_all(b"GET %s HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n\r\n" % (path.encode(), key.encode()))
            streams.append(s)
        first = await streams[1].receive_some(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        await trio.sleep(0.3)  # the long-poll is waiting
        server.send_signal(signal.SIGTERM)
        replies = []
        for s in streams:
            out = b""
            while chunk := await s.receive_some(65536):
                out += chunk
            replies.append(out)
        poll, sse = replies
        assert poll.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), poll
        assert json.loads(poll.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "UNAVAILABLE"
        assert sse.endswith(b"0\r\n\r\n"), sse[-40:]  # the chunked body's end
        assert await in_thread(server.wait) == 0, server.describe()


@pytest.mark.parametrize("given, events", [
    ({}, []),
    ({"PIMCORE_HTTP_MAX_BODY_BYTES": "50000"}, ["http_body_small"]),
    ({"PIMCORE_SERVER_MAX_OUTBOUND_BYTES": "1048576"}, ["outbound_small"]),
    ({"PIMCORE_LIMITS_MAX_PAYLOAD": "2000000", "PIMCORE_LIMITS_MAX_FRAME": "3000000"}, ["http_body_small", "outbound_small"]),
], ids=["defaults", "body", "outbound", "both"])
def test_settings_that_work_against_each_other_are_said_at_start(given: dict[str, str], events: list[str]) -> None:
    """A max_payload whose posts the HTTP body limit cannot carry, a
    connection's outbound limit under 4 x max_frame: taken silently before
    (an operator's trial); serve now says each once at start."""
    from pimcore.cli import start_warnings
    from pimcore.config import load_settings

    s = load_settings(env={"PIMCORE_HTTP": "tcp://127.0.0.1:0", **given})
    said = start_warnings(s.server_config(), s.http_config(None, ("k" * 16,)))
    assert [event for event, _ in said] == events, said
    for event, words in said:
        assert ("max_body_bytes" if event == "http_body_small" else "max_outbound_bytes") in words and "raise it" in words
