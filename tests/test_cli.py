"""The ``pimcore`` command (info, inspect)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

import pimcore
from pimcore.cli import main
from pimcore.core import drain
from pimcore.store import LmdbStore, direct_conversation

from _harness import Harness

AB = direct_conversation("alice", "bob")


def _now_us() -> int:
    """The broker's clock as an authenticator is given it (µs since 1970)."""
    import time

    return int(time.time() * 1_000_000)


def test_info_reports_the_active_backend(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == pimcore.BACKEND
    assert info["version"] == pimcore.__version__
    assert pimcore.BACKEND in info["available_backends"]


def test_backend_env_override_is_visible_at_runtime():
    env = dict(os.environ, PIMCORE_BACKEND="pure")
    out = subprocess.run(
        [sys.executable, "-m", "pimcore.cli", "info", "--json"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out)["backend"] == "pure"
    env["PIMCORE_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-m", "pimcore.cli", "info"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "PIMCORE_BACKEND" in bad.stderr


def test_inspect_summarises_a_data_directory(tmp_path, capsys):
    path = str(tmp_path / "data")
    with LmdbStore(path) as store:
        h = Harness(store)
        a = h.login("alice", "phone")
        for k in range(3):
            h.send(a, AB, b"m%d" % k)
        drain(h.broker, store, [], h.now)
    assert main(["inspect", path, "--user", "bob"]) == 0
    out = capsys.readouterr().out
    assert "user bob: inbox head 3, floor 0" in out
    assert f"{AB}: last seq 3, read 0, unread 3" in out


def test_inspect_refuses_a_missing_directory(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing-here")]) == 2
    assert "nothing-here" in capsys.readouterr().err
    assert not (tmp_path / "nothing-here").exists()  # inspecting never creates


def test_inspect_of_a_redis_nodes_data_directory_says_where_its_data_is(tmp_path, capsys):
    # A new operator's trial: it said "no pimcore store in DIR", where group,
    # purge and retention say the data is in Redis.
    from pimcore.embed import REDIS_NOTE

    (tmp_path / REDIS_NOTE).write_text("redis://127.0.0.1:7000 pimcore\n")  # (as serve --store leaves it)
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "keeps its data in Redis (redis://127.0.0.1:7000)" in err and "HTTP API" in err, err


def test_a_content_filter_module_next_to_the_config_file_is_found(tmp_path, monkeypatch):
    from pimcore.config import load_settings

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "moderation_next_to_config.py").write_text(
        "def check(user, conv, payload):\n    return 'no shouting' if payload.isupper() else None\n"
    )
    (tmp_path / "conf" / "pimcore.toml").write_text('content_filter = "moderation_next_to_config:check"\n')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    hook = load_settings(str(tmp_path / "conf" / "pimcore.toml")).server_config().broker.content_filter
    assert hook is not None and hook("a", "c", b"HELLO") == "no shouting" and hook("a", "c", b"hi") is None
    assert str(tmp_path / "conf") not in sys.path  # the search path is put back


# -- tools that trap a newcomer (issue 10, item 8) ---------------------------


def test_token_without_a_broker_secret_refuses_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./pimcore-data here
    monkeypatch.delenv("PIMCORE_SECRET", raising=False)
    assert main(["token", "--user", "alice"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "no token secret" in err and "pimcore-data" in err and "--create-secret" in err
    assert list(tmp_path.iterdir()) == []  # no secret, no data directory
    assert main(["token", "--user", "alice", "--data-dir", str(tmp_path / "typo")]) == 2
    assert "typo" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_token_ttl_is_whole_seconds_and_the_token_lives_at_least_that(tmp_path, monkeypatch, capsys):
    """--ttl 1.5 gave a token living ~0.66 s (exp cut to a whole second
    below iat + ttl, a new user's trial): --ttl takes whole seconds, as the
    handle and POST /v1/tokens do, and exp is rounded up."""
    import base64
    import json

    monkeypatch.setenv("PIMCORE_SECRET", "e" * 32)
    assert main(["token", "--user", "alice", "--ttl", "1.5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "invalid --ttl: ttl must be whole seconds" in err and "'1.5'" in err
    for _ in range(10):
        assert main(["token", "--user", "alice", "--ttl", "1"]) == 0
        body = capsys.readouterr().out.strip().split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        assert claims["exp"] >= claims["iat"] + 1, claims


def test_token_with_create_secret_says_what_it_did_and_the_broker_accepts_it(tmp_path, monkeypatch, capsys):
    from pimcore.auth import JwtAuthenticator, load_or_create_secret

    monkeypatch.delenv("PIMCORE_SECRET", raising=False)
    data = tmp_path / "data"
    assert main(["token", "--user", "alice", "--data-dir", str(data), "--create-secret"]) == 0
    out, err = capsys.readouterr()
    assert "created a new token secret" in err and str(data / "secret") in err
    secret = load_or_create_secret(data)  # what `pimcore serve --data-dir data` will use
    assert JwtAuthenticator(secret)(out.strip().encode(), _now_us()).user == "alice"
    # Once it exists, no flag is needed and nothing is said.
    assert main(["token", "--user", "bob", "--data-dir", str(data)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and JwtAuthenticator(secret)(out.strip().encode(), _now_us()).user == "bob"


def test_token_uses_the_secret_of_a_broker_that_ran(tmp_path, monkeypatch, capsys):
    from pimcore.auth import JwtAuthenticator, load_or_create_secret

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIMCORE_SECRET", raising=False)
    secret = load_or_create_secret(tmp_path / "pimcore-data")  # as `pimcore serve` does on first start
    assert main(["token", "--user", "alice", "--device", "d" * 64]) == 0
    ident = JwtAuthenticator(secret)(capsys.readouterr().out.strip().encode(), _now_us())
    assert (ident.user, ident.device) == ("alice", "d" * 64)
    monkeypatch.setenv("PIMCORE_SECRET", "e" * 32)  # an explicit secret needs no data directory
    monkeypatch.chdir(tmp_path / "pimcore-data")
    assert main(["token", "--user", "a" * 64]) == 0
    assert JwtAuthenticator(b"e" * 32)(capsys.readouterr().out.strip().encode(), _now_us()).user == "a" * 64
    assert not (tmp_path / "pimcore-data" / "pimcore-data").exists()


def test_token_refuses_invalid_ids_saying_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIMCORE_SECRET", "e" * 32)
    assert main(["token", "--user", "a" * 65]) == 2
    assert "65 characters" in capsys.readouterr().err
    assert main(["token", "--user", "jürgen"]) == 2
    assert "non-ASCII" in capsys.readouterr().err


def _read_only(monkeypatch, data) -> None:
    """Creating a file in ``data`` fails as on a read-only file system."""
    import errno

    import pimcore.auth

    real_open = os.open

    def fake_open(path, flags, *args, **kw):
        if os.path.dirname(os.fspath(path)) == str(data) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(pimcore.auth.os, "open", fake_open)


def test_a_secret_on_a_read_only_data_dir_is_said_in_words(tmp_path, monkeypatch, capsys):
    # Was a bare "[Errno 30] Read-only file system: '.../secret'".
    data = tmp_path / "d"
    data.mkdir()
    _read_only(monkeypatch, data)
    said = f"cannot make the token secret file {data / 'secret'}: Read-only file system"
    assert main(["token", "--user", "alice", "--data-dir", str(data), "--create-secret"]) == 2
    assert capsys.readouterr().err == f"pimcore token: {said} (from --data-dir)\n"
    monkeypatch.setenv("PIMCORE_DATA_DIR", str(data))
    assert main(["serve", "--listen", "tcp://127.0.0.1:0"]) == 2
    assert capsys.readouterr().err == f"pimcore serve: {said} (from $PIMCORE_DATA_DIR)\n"
    assert sorted(os.listdir(data)) == []


def test_kept_secrets_that_cannot_be_made_are_value_errors_in_words(tmp_path, monkeypatch):
    from pimcore.auth import load_or_create_secret
    from pimcore.config import load_settings

    data = tmp_path / "d"
    data.mkdir()
    _read_only(monkeypatch, data)
    with pytest.raises(ValueError, match=r"^cannot make the HTTP API key file .*api-key: Read-only file system$"):
        load_or_create_secret(data, "api-key")
    settings = load_settings(None, flags_are_options=True, data_dir=str(data))
    with pytest.raises(ValueError, match=r"cannot make the HTTP API key file .*: Read-only file system \(from --data-dir\)"):
        settings.load_api_keys()
    with pytest.raises(ValueError, match=r"cannot make the webhook secret file .*: Read-only file system \(from --data-dir\)"):
        settings.webhook_secret()


def test_a_short_token_secret_says_where_it_came_from(tmp_path, monkeypatch, capsys):
    # Was "the token secret must be at least 32 bytes", whichever of five
    # places it came from.
    monkeypatch.delenv("PIMCORE_SECRET", raising=False)
    monkeypatch.chdir(tmp_path)
    rule = "is 5 bytes; it must be at least 32"
    data = tmp_path / "d"
    data.mkdir()
    (data / "secret").write_text("short\n")
    (tmp_path / "short").write_text("short\n")
    cfg = tmp_path / "p.toml"
    cfg.write_text('secret = "short"\n')
    os.chmod(cfg, 0o600)
    for args, env, said in [
        ([], {"PIMCORE_SECRET": "short"}, f"the token secret from $PIMCORE_SECRET {rule}"),
        (["--config", str(cfg)], {}, f"the token secret from {cfg} {rule}"),
        (["--secret-file", "short"], {}, f"the token secret from the file short {rule} (from --secret-file)"),
        ([], {"PIMCORE_SECRET_FILE": "short"}, f"the token secret from the file short {rule} (from $PIMCORE_SECRET_FILE)"),
        (["--data-dir", str(data)], {}, f"the token secret from the file {data / 'secret'} {rule} (from --data-dir)"),
    ]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for command, more in (("token", ["--user", "alice"]), ("serve", ["--listen", "tcp://127.0.0.1:0"])):
            if command == "serve" and "--data-dir" not in args:
                more = [*more, "--data-dir", str(data)]
            assert main([command, *more, *args]) == 2
            assert capsys.readouterr().err == f"pimcore {command}: {said}\n"
        for name in env:
            monkeypatch.delenv(name)


def test_inspect_accepts_the_data_directory_as_every_other_command_does(tmp_path, capsys):
    data = tmp_path / "pimcore-data"
    with LmdbStore(str(data / "store")) as store:  # the layout `pimcore serve` makes
        h = Harness(store)
        a = h.login("alice", "phone")
        h.send(a, AB, b"m")
        drain(h.broker, store, [], h.now)
    for path in (data, data / "store"):  # the data directory, or its store
        assert main(["inspect", str(path), "--user", "bob"]) == 0
        assert f"{AB}: last seq 1, read 0, unread 1" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path)]) == 2  # neither
    assert "no pimcore store" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [data]


# -- settings: environment by one rule, typed errors (issue 11, section 3) ----


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e30", "1e400", "9" * 400])
@pytest.mark.parametrize("how", ["file", "env", "flag"])
def test_a_number_that_is_not_finite_or_too_large_is_refused_naming_the_key(tmp_path, how, text):
    """--idle-timeout inf was a traceback (OverflowError, turning seconds
    into µs) and --send-rate nan a broker that started with it (a new-user
    pass): every number setting is refused when it is not finite or past
    what seconds in 64-bit µs hold, from a file, a variable or a flag."""
    from pimcore.config import SCHEMA, ConfigError, env_name, load_settings

    floats = [(section, key) for (section, key), typ in SCHEMA.items() if typ == "float"]
    assert ("server", "idle_timeout") in floats and ("limits", "send_rate") in floats
    for section, key in floats:
        cfg = tmp_path / "pimcore.toml"
        if how == "file":
            cfg.write_text((f"[{section}]\n" if section else "") + f"{key} = {text}\n")
            load = lambda: load_settings(str(cfg), env={})  # noqa: E731
        elif how == "env":
            load = lambda: load_settings(env={env_name(section, key): text})  # noqa: E731
        else:
            if section not in (None, "limits", "server"):
                continue  # (flags exist for the top level, [limits] and [server] only)
            load = lambda: load_settings(env={}, **{key: float(text)})  # noqa: E731
        with pytest.raises(ConfigError) as err:
            load().server_config()
        assert key in str(err.value) or f"--{key.replace('_', '-')}:" in str(err.value), (section, key, str(err.value))
        assert "is out of range (a number must be finite" in str(err.value)


@pytest.mark.parametrize("how", ["file", "env"])
def test_an_integer_past_64_bit_us_is_refused_naming_the_key(tmp_path, how):
    """PIMCORE_LIMITS_WINDOW=10**30 started a broker whose every login
    failed (EncodeError: the LoginAck's window does not fit in 64 bits, a
    re-check pass): integers are bounded as numbers are."""
    from pimcore.config import SCHEMA, ConfigError, env_name, load_settings

    ints = [(section, key) for (section, key), typ in SCHEMA.items() if typ == "int"]
    assert ("limits", "window") in ints and ("server", "max_outbound_total") in ints
    for (section, key), big in itertools.product(ints, (10**30, -(10**30), int("9" * 400))):
        if how == "file":
            cfg = tmp_path / "pimcore.toml"
            cfg.write_text((f"[{section}]\n" if section else "") + f"{key} = {big}\n")
            load = lambda: load_settings(str(cfg), env={})  # noqa: E731
        else:
            load = lambda: load_settings(env={env_name(section, key): str(big)})  # noqa: E731
        with pytest.raises(ConfigError) as err:
            load().server_config()
        assert key in str(err.value) and "is out of range" in str(err.value), (section, key, str(err.value))


@pytest.mark.parametrize("flags, said", [
    ({"window": -1}, "--window must be >= 1, got -1"),
    ({"heartbeat_ms": -1}, "--heartbeat-ms must be >= 0, got -1"),
    ({"send_rate": -2.5}, "--send-rate must be >= 0, got -2.5"),
    ({"idle_timeout": -5.0}, "--idle-timeout: expected seconds >= 0, got -5"),
    ({"window": 1 << 40}, "--window must be at most 4294967295, got 1099511627776"),
    ({"heartbeat_ms": 1 << 40}, "--heartbeat-ms must be at most 4294967295, got 1099511627776"),
], ids=["window", "heartbeat", "send-rate", "idle-timeout", "window-huge", "heartbeat-huge"])
def test_a_limit_out_of_range_is_said_by_its_setting_and_value(flags, said):
    """It said "limits: Limits.window must be >= 1" (the class's name), and
    "Limits.heartbeat_ms and Limits.send_rate must be >= 0" for either (a
    new-user pass).  Given as flags, each is said by its flag, as a type
    error is (by the keyword an embedding host gave, e.g. open_pimcore's;
    by the option on the command line); from the environment or a file, by
    its setting."""
    from pimcore.config import ConfigError, load_settings

    [(key, value)] = flags.items()
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, flags_are_options=True, **flags).server_config()
    assert str(err.value) == said
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, **flags).server_config()
    assert str(err.value) == said.replace("--" + key.replace("_", "-"), key)
    section = "server" if key == "idle_timeout" else "limits"
    var = f"PIMCORE_{section}_{key}".upper()
    with pytest.raises(ConfigError) as err:
        load_settings(env={var: str(value)}).server_config()
    assert str(err.value) == f"{said.replace('--' + key.replace('_', '-'), f'{section}.{key}')} (from ${var})"


def _least_frame(max_payload: int, max_mentions: int = 64) -> str:
    """What a refusal of max_payload above max_frame says after "cannot
    exceed limits.max_frame (N)": the least max_frame that holds it."""
    from pimcore.core import message_overhead

    over = message_overhead(max_mentions)
    return (f": a message's Push adds up to {over} bytes of ids, times and limits.max_mentions ({max_mentions})"
            f" mentions, so limits.max_frame must be at least {max_payload + over}")


def test_a_refusal_of_two_settings_says_where_each_came_from(tmp_path):
    """"limits.max_payload (70000) cannot exceed limits.max_frame (1000)"
    named the source of the first given setting only (a LOW of the last
    notes): with max_payload in a file and max_frame in the environment it
    said the file, and the variable that made the frame small went
    unsaid."""
    from pimcore.config import ConfigError, load_settings

    cfg = tmp_path / "p.toml"
    cfg.write_text("[limits]\nmax_payload = 70000\n")
    env = {"PIMCORE_LIMITS_MAX_FRAME": "1000"}
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env=env).server_config()
    assert str(err.value) == (f"limits.max_payload (70000) cannot exceed limits.max_frame (1000){_least_frame(70000)}"
                              f" (limits.max_payload from {cfg}; limits.max_frame from $PIMCORE_LIMITS_MAX_FRAME;"
                              f" limits.max_mentions is the default)")
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env={}, flags_are_options=True, max_frame=1000).server_config()
    assert str(err.value) == (f"limits.max_payload (70000) cannot exceed --max-frame (1000){_least_frame(70000)}"
                              f" (limits.max_payload from {cfg}; limits.max_mentions is the default)")
    # Both from one file: said once, as a single setting's refusal is (the
    # least max_frame it says depends on limits.max_mentions, the default).
    cfg.write_text("[limits]\nmax_payload = 70000\nmax_frame = 1000\nmax_mentions = 64\n")
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env={}).server_config()
    assert str(err.value) == f"{cfg}: limits.max_payload (70000) cannot exceed limits.max_frame (1000){_least_frame(70000)}"


def test_a_refusal_of_two_settings_says_which_one_is_the_default(tmp_path, capsys, monkeypatch):
    """With one of the two given and the other not given anywhere, it said
    where the given one came from only ("limits.max_payload (65536) cannot
    exceed limits.max_frame (1000) (from $PIMCORE_LIMITS_MAX_FRAME)"): the
    65536 looked given too, and a user looked for it in vain (a new-user
    pass).  The default is said to be one."""
    from pimcore.config import ConfigError, load_settings

    cfg = tmp_path / "p.toml"
    cfg.write_text("[limits]\nmax_payload = 2000000\n")
    for argv, env, said in [
        (["--config", str(cfg)], {}, f"limits.max_payload (2000000) cannot exceed limits.max_frame (1048576)"
                                     f"{_least_frame(2000000)} (limits.max_payload from {cfg};"
                                     f" limits.max_frame is the default; limits.max_mentions is the default)"),
        (["--max-frame", "1000"], {}, f"limits.max_payload (65536) cannot exceed --max-frame (1000){_least_frame(65536)}"
                                      " (limits.max_payload is the default; limits.max_mentions is the default)"),
        ([], {"PIMCORE_LIMITS_MAX_FRAME": "1000"}, "limits.max_payload (65536) cannot exceed limits.max_frame (1000)"
         f"{_least_frame(65536)} (limits.max_payload is the default; limits.max_frame from $PIMCORE_LIMITS_MAX_FRAME;"
         " limits.max_mentions is the default)"),
        # (Was: "cannot exceed" alone; the least max_frame is said, as when
        # max_frame leaves too little room for the Push.)
        (["--max-payload", "2000000"], {}, "--max-payload (2000000) cannot exceed limits.max_frame (1048576)"
         f"{_least_frame(2000000)} (limits.max_frame is the default; limits.max_mentions is the default)"),
    ]:
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            assert main(["serve", "--print-config", *argv]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"pimcore serve: {said}\n", err
    with pytest.raises(ConfigError) as err:  # an embedding host's keyword
        load_settings(env={}, max_frame=1000).server_config()
    assert str(err.value) == (f"limits.max_payload (65536) cannot exceed max_frame (1000){_least_frame(65536)}"
                              " (limits.max_payload is the default; limits.max_mentions is the default)")


_DURABILITY = 'durability: expected one of sync, log, os, got "bogus"'
_LOG_LEVEL = 'log_level: expected one of debug, info, warning, error, got "loud"'
_LISTEN = "listen: 'bogus://127.0.0.1:0': scheme must be one of tcp, tls, ws, wss"
_HTTP = "http: 'ws://127.0.0.1:0': scheme must be tcp, tls, http or https"


def _print_config_refuses(tmp_path, monkeypatch, capsys, args, env, toml, said):
    """`serve --print-config ARGS` with only ``env`` of the PIMCORE_ variables
    (and ``toml`` as the config file, if any) exits 2 saying ``said``
    ({cfg}: the file's path), prints nothing and creates nothing."""
    for name in [n for n in os.environ if n.startswith("PIMCORE_") and n != "PIMCORE_BACKEND"]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "pimcore.toml"
    if toml:
        cfg.write_text(toml)
        args = [*args, "--config", str(cfg)]
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--print-config", *args]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"pimcore serve: {said.format(cfg=cfg)}\n", out
    assert list(tmp_path.iterdir()) == ([cfg] if toml else [])


@pytest.mark.parametrize("args, env, toml, said", [
    ([], {"PIMCORE_DURABILITY": "bogus"}, "", f"{_DURABILITY} (from $PIMCORE_DURABILITY)"),
    ([], {}, 'durability = "bogus"\n', f"{{cfg}}: {_DURABILITY}"),
    ([], {"PIMCORE_LOG_LEVEL": "loud"}, "", f"{_LOG_LEVEL} (from $PIMCORE_LOG_LEVEL)"),
    ([], {}, 'log_level = "LOUD"\n', f"{{cfg}}: {_LOG_LEVEL}"),
    (["--listen", "bogus://127.0.0.1:0"], {}, "", _LISTEN.replace("listen", "--listen", 1)),
    ([], {"PIMCORE_LISTEN": "bogus://127.0.0.1:0"}, "", f"{_LISTEN} (from $PIMCORE_LISTEN)"),
    ([], {}, 'listen = ["bogus://127.0.0.1:0"]\n', f"{{cfg}}: {_LISTEN}"),
    (["--http", "ws://127.0.0.1:0"], {}, "", _HTTP.replace("http", "--http", 1)),
    ([], {"PIMCORE_HTTP": "ws://127.0.0.1:0"}, "", f"{_HTTP} (from $PIMCORE_HTTP)"),
    ([], {}, 'http = "ws://127.0.0.1:0"\n', f"{{cfg}}: {_HTTP}"),
    (["--window", "0"], {}, "", "--window must be >= 1, got 0"),
    ([], {"PIMCORE_LIMITS_WINDOW": "0"}, "", "limits.window must be >= 1, got 0 (from $PIMCORE_LIMITS_WINDOW)"),
    ([], {}, "[limits]\nwindow = 0\n", "{cfg}: limits.window must be >= 1, got 0"),
    (["--max-frame", "1"], {}, "", f"limits.max_payload (65536) cannot exceed --max-frame (1){_least_frame(65536)}"
                                   " (limits.max_payload is the default; limits.max_mentions is the default)"),
    (["--store", "redis://h"], {}, "", "--store: bad HOST:PORT in 'redis://h': 'h'"),
    ([], {}, "[messages]\nrecall_window = -1\n",
     "{cfg}: messages.recall_window: expected a number of seconds >= 0 (0 = no limit), got -1.0"),
    ([], {"PIMCORE_WEBHOOKS_URL": "http://127.0.0.1:1/x", "PIMCORE_WEBHOOKS_BATCH_SIZE": "0"}, "",
     "webhooks.batch_size: must be 1..10000, got 0 (from $PIMCORE_WEBHOOKS_BATCH_SIZE)"),
], ids=["durability-env", "durability-file", "log-level-env", "log-level-file", "listen-flag", "listen-env",
        "listen-file", "http-flag", "http-env", "http-file", "window-flag", "window-env", "window-file",
        "frame-flag", "store-flag", "messages-file", "webhooks-env"])
def test_a_value_refused_after_its_type_check_says_where_it_came_from(tmp_path, monkeypatch, capsys, args, env,
                                                                      toml, said):
    """`PIMCORE_DURABILITY=bogus pimcore serve` said "durability must be
    'sync', 'log' or 'os', not 'bogus'", a bad listen URL "listen: ...":
    which flag, variable or file it came from was left to guess, where a
    type error says it.  Now said as the type check says it."""
    _print_config_refuses(tmp_path, monkeypatch, capsys, args, env, toml, said)


@pytest.mark.parametrize("args, toml, said", [
    (["--http", "127.0.0.1:17440"], "",
     "--http: '127.0.0.1:17440': the scheme is missing: write tcp://127.0.0.1:17440 (or http://, https://, tls://)"),
    (["--listen", "127.0.0.1:7400"], "",
     "--listen: '127.0.0.1:7400': the scheme is missing: write tcp://127.0.0.1:7400 (or tls://, ws://, wss://)"),
    (["--listen", "localhost:7400"], "",
     "--listen: 'localhost:7400': the scheme is missing: write tcp://localhost:7400 (or tls://, ws://, wss://)"),
    ([], 'listen = ["tcp://127.0.0.1:17410", "127.0.0.1:17411"]\n',
     "{cfg}: listen: '127.0.0.1:17411': the scheme is missing: write tcp://127.0.0.1:17411 (or tls://, ws://, wss://)"),
], ids=["http-flag", "listen-flag", "listen-name", "listen-file-item"])
def test_a_listen_url_without_a_scheme_says_so(tmp_path, monkeypatch, capsys, args, toml, said):
    """`serve --http 127.0.0.1:17440` said "an HTTP listen URL has no path",
    `--listen 127.0.0.1:7400` listed the schemes: neither said what was
    missing nor the URL to write."""
    _print_config_refuses(tmp_path, monkeypatch, capsys, args, {}, toml, said)


_SERVER_REFUSED = [
    (["--max-connections", "0"], {}, "", "--max-connections must be >= 1, got 0"),
    ([], {"PIMCORE_SERVER_MAX_CONNECTIONS": "0"}, "",
     "server.max_connections must be >= 1, got 0 (from $PIMCORE_SERVER_MAX_CONNECTIONS)"),
    ([], {}, "[server]\nmax_connections = 0\n", "{cfg}: server.max_connections must be >= 1, got 0"),
    (["--idle-timeout", "-5"], {}, "", "--idle-timeout: expected seconds >= 0, got -5"),
]


@pytest.mark.parametrize("args, env, toml, said", _SERVER_REFUSED, ids=["flag", "env", "file", "timeout-flag"])
def test_a_server_setting_serve_refuses_says_where_it_came_from(tmp_path, args, env, toml, said):
    """As above, for what only serve checks (--print-config does not build
    the server's configuration); in a process of its own: serve sets up
    logging before it gets there."""
    cfg = tmp_path / "pimcore.toml"
    if toml:
        cfg.write_text(toml)
        args = [*args, "--config", str(cfg)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIMCORE_") or k == "PIMCORE_BACKEND"}
    clean["PYTHONPATH"] = os.path.dirname(os.path.dirname(pimcore.__file__))  # this pimcore, whatever the cwd
    r = subprocess.run([sys.executable, "-m", "pimcore", "serve", "--data-dir", str(tmp_path / "d"),
                        "--listen", "tcp://127.0.0.1:0", *args], env={**clean, **env}, capture_output=True,
                       text=True, timeout=60)
    assert (r.returncode, r.stdout) == (2, ""), (r.returncode, r.stdout, r.stderr)
    assert r.stderr == f"pimcore serve: {said.format(cfg=cfg)}\n", r.stderr


@pytest.mark.parametrize("args, env, toml, said", [
    *_SERVER_REFUSED,
    ([], {"PIMCORE_SERVER_IDLE_TIMEOUT": "-1"}, "", "server.idle_timeout: expected seconds >= 0, got -1"
                                                    " (from $PIMCORE_SERVER_IDLE_TIMEOUT)"),
    (["--http", "ftp://127.0.0.1:1"], {}, "", "--http: 'ftp://127.0.0.1:1': scheme must be tcp, tls, http or https"),
    ([], {}, 'http = "ftp://127.0.0.1:1"\n', "{cfg}: http: 'ftp://127.0.0.1:1': scheme must be tcp, tls, http or https"),
    (["--content-filter", "nocolon"], {}, "", "--content-filter must be 'module:function', not 'nocolon'"),
    # (A new operator's trial: 1e9 s was taken -- no delivery ack would ever be saved.)
    ([], {"PIMCORE_SERVER_ACK_DELAY": "1e9"}, "", "server.ack_delay: ack_delay must be at most 3600 s, got 1e+09 s"
                                                   " (from $PIMCORE_SERVER_ACK_DELAY)"),
], ids=["flag", "env", "file", "timeout-flag", "timeout-env", "http-scheme-flag", "http-scheme-file", "content-filter",
        "ack-delay"])
def test_print_config_refuses_what_serve_refuses(tmp_path, monkeypatch, capsys, args, env, toml, said):
    """`serve --print-config --idle-timeout -1` (or max_connections 0, a
    content_filter that is no module:function) printed the settings and
    exited 0; serve then refused them (a new-user pass).  It refuses them
    too now, in the same words -- still without importing the filter or
    creating anything.  An unknown --http scheme was said with the broker
    listener's schemes (tcp, tls, ws, wss)."""
    _print_config_refuses(tmp_path, monkeypatch, capsys, args, env, toml, said)


def test_print_config_imports_no_content_filter_and_makes_no_secret(tmp_path, monkeypatch, capsys):
    """The checks --print-config now runs import nothing and create nothing:
    a content_filter naming a module that does not exist, and a moderation
    webhook whose secret would be made in the data dir, still print."""
    for name in [n for n in os.environ if n.startswith("PIMCORE_") and n != "PIMCORE_BACKEND"]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "pimcore.toml"
    cfg.write_text('content_filter = "no_such_module_here:check"\n'
                   '[moderation]\nurl = "http://127.0.0.1:9/m"\npolicy = "open"\n')
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--print-config", "--config", str(cfg)]) == 0
    out = capsys.readouterr()
    assert 'content_filter = "no_such_module_here:check"' in out.out, out
    assert list(tmp_path.iterdir()) == [cfg]


def test_every_setting_has_an_environment_variable_by_one_rule():
    from pimcore.config import SCHEMA, env_name, load_settings

    names = {env_name(section, key): (section, key) for section, key in SCHEMA}
    assert len(names) == len(SCHEMA)  # no two settings share a variable
    assert names["PIMCORE_DATA_DIR"] == (None, "data_dir")
    assert names["PIMCORE_LIMITS_SEND_RATE"] == ("limits", "send_rate")
    assert names["PIMCORE_HTTP"] == ("http", "listen")
    assert names["PIMCORE_HTTP_REQUEST_TIMEOUT"] == ("http", "request_timeout")
    s = load_settings(env={"PIMCORE_LIMITS_SEND_RATE": "12.5", "PIMCORE_LIMITS_WINDOW": "9", "PIMCORE_SERVER_COMMIT_IN_THREAD": "yes",
                           "PIMCORE_LISTEN": "tcp://127.0.0.1:1, tcp://127.0.0.1:2", "PIMCORE_LOG_FORMAT": "JSON",
                           "PIMCORE_BACKEND": "pure", "PIMCORE_DATA_DIR": ""})  # not settings / empty: ignored
    assert s.limits == {"send_rate": 12.5, "window": 9} and s.server == {"commit_in_thread": True}
    assert s.listen == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2") and s.log_format == "json"
    assert str(s.data_dir) == "pimcore-data"
    assert s.server_config().broker.limits.send_rate == 12.5


def test_an_unknown_pimcore_environment_variable_is_an_error_naming_it():
    """Like an unknown key in the file: a typo (PIMCORE_LIMITS_SENDRATE)
    must not be ignored silently.  The project's own variables that are not
    settings stay allowed."""
    import pytest

    from pimcore.config import ConfigError, load_settings

    for name, hint in (("PIMCORE_LIMITS_NOPE", None), ("PIMCORE_LIMITS_SENDRATE", "PIMCORE_LIMITS_SEND_RATE"),
                       ("PIMCORE_SERVER_EVENT", "PIMCORE_SERVER_EVENTS")):
        with pytest.raises(ConfigError, match=name) as err:
            load_settings(env={name: "1"})
        assert "unknown" in str(err.value)
        if hint is not None:
            assert hint in str(err.value)
    allowed = {"PIMCORE_BACKEND": "pure", "PIMCORE_PYTHON": "/usr/bin/python3", "PIMCORE_REQUIRE_CABI": "1",
               "PIMCORE_NO_EXT": "1", "PIMCORE_CHAOS_SEED": "7", "PIMCORE_CHAOS_MESSAGES": "5", "PIMCORE_CRASH_SEED": "3",
               "PIMCORE_CONFIG": "", "PIMCORE_SECRET": "s" * 32, "PIMCORE_LIMITS_NOPE": ""}  # empty: unset
    assert load_settings(env=allowed).secret == "s" * 32


def test_a_secret_file_flag_beats_a_secret_from_the_environment(tmp_path):
    from pimcore.config import load_settings

    env = {"PIMCORE_SECRET": "s" * 32}
    assert load_settings(env=env).secret == "s" * 32
    s = load_settings(env=env, secret_file=str(tmp_path / "secret"))
    assert s.secret is None and s.secret_file == tmp_path / "secret"


def test_json_log_lines_carry_structured_fields():
    import io
    import logging

    from pimcore.logs import JsonFormatter

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("pimcore.test-json")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("login refused conn=%d", 7, extra={"event": "login_refused", "conn": 7, "reason": "token has expired"})
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    first, second = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert first["msg"] == "login refused conn=7" and first["level"] == "warning" and first["logger"] == "pimcore.test-json"
    assert (first["event"], first["conn"], first["reason"]) == ("login_refused", 7, "token has expired")
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "error" and "RuntimeError: boom" in second["exc"]


def test_serve_logging_keeps_httpx_request_lines_out_at_info():
    """httpx logs "HTTP Request: POST ..." at INFO for every webhook and
    moderation call -- one per message with moderation.  serve's logging
    (setup_logging) keeps httpx/httpcore at WARNING; pimcore's own info
    lines stay."""
    import io
    import logging

    import httpx

    from pimcore.logs import setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level,
             {n: logging.getLogger(n).level for n in ("httpx", "httpcore")})
    buf = io.StringIO()
    try:
        setup_logging("info", "text", stream=buf)
        with httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200))) as client:
            assert client.post("http://backend.example/moderate", json={}).status_code == 200
        logging.getLogger("httpx").warning("httpx warns")
        logging.getLogger("pimcore.net").info("login conn=1 user=alice")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        for name, level in saved[2].items():
            logging.getLogger(name).setLevel(level)
    out = buf.getvalue()
    assert "HTTP Request" not in out, out
    assert "httpx warns" in out and "login conn=1 user=alice" in out


def test_serve_tunes_the_collector_after_start_up() -> None:
    # `pimcore serve` (only it: an embedding host keeps its own settings)
    # freezes start-up objects and raises the gen-0 threshold (issue 13).
    import gc

    from pimcore import cli

    before = gc.get_threshold()
    try:
        cli._tune_collector()
        assert gc.get_threshold() == (cli.GC_THRESHOLD0, before[1], before[2])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.parametrize("module", ["coredis", "hiredis"])
def test_serve_on_redis_without_the_redis_extra_says_what_to_install(tmp_path, monkeypatch, capsys, module):
    # A None entry in sys.modules makes `import module` raise ImportError.
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setenv("PIMCORE_SECRET", "s" * 40)
    code = main(["serve", "--data-dir", str(tmp_path / "d"), "--store", "redis://127.0.0.1:1"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"needs {module}" in err and "pimcore[redis]" in err


@pytest.mark.parametrize("argv", [["show", "nosuch"], ["add", "nosuch", "carol"], ["remove", "nosuch", "alice"]],
                         ids=["show", "add", "remove"])
def test_a_group_that_does_not_exist_is_said_with_the_command_that_creates_it(tmp_path, capsys, argv):
    """(Failed before: a new user's trial.)  `pimcore group show nosuch`
    said "no group 'nosuch'" and nothing of how to make one: it names the
    command that creates it (over --http too: test_retention_api)."""
    data = str(tmp_path / "data")
    assert main(["group", "create", "team", "alice", "--data-dir", data]) == 0
    capsys.readouterr()
    assert main(["group", *argv, "--data-dir", data]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "pimcore group: no group 'nosuch' (pimcore group create nosuch USER... makes one)\n", err


@pytest.mark.parametrize("argv", [["group", "create", "team", "alice", "bob"], ["group", "show", "team"],
                                  ["purge", "conversation", "team"], ["retention", "team", "--max-count", "5"]])
def test_lmdb_commands_refuse_a_broker_on_redis_and_write_nothing(tmp_path, monkeypatch, capsys, argv):
    # They open the data directory's LMDB store: with store.url set the broker
    # reads Redis, so a stray LMDB store would report success and change nothing.
    monkeypatch.setenv("PIMCORE_SECRET", "s" * 40)
    monkeypatch.setenv("PIMCORE_STORE", "redis://127.0.0.1:1")
    assert main([*argv, "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "keeps its data in Redis" in err and "--http" in err
    assert not (tmp_path / "d" / "store").exists()


@pytest.mark.parametrize("url", ["redis://user:pw@127.0.0.1:7000", "redis://127.0.0.1:7000?ssl=true", "redis://nohost"])
def test_serve_refuses_a_redis_url_it_cannot_honour_saying_why(tmp_path, monkeypatch, capsys, url):
    monkeypatch.setenv("PIMCORE_SECRET", "s" * 40)
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--store", url]) == 2
    err = capsys.readouterr().err
    from pimcore._util import shown_url

    # (Quoted as logs show it: a password or a query is redacted -- a trial.)
    assert shown_url(url) in err and ("not supported" in err or "HOST:PORT" in err)
    assert "pw@" not in err


def test_lmdb_commands_refuse_a_data_dir_whose_broker_serves_from_redis(tmp_path, monkeypatch, capsys):
    # serve --store on its command line is not in the group command's
    # settings: the note serve leaves in the data directory says it (the
    # command made a stray LMDB store there and reported success).
    monkeypatch.setenv("PIMCORE_SECRET", "s" * 40)
    monkeypatch.setitem(sys.modules, "coredis", None)  # serve stops right after taking the data dir
    d = str(tmp_path / "d")
    assert main(["serve", "--data-dir", d, "--store", "redis://127.0.0.1:1"]) == 2
    capsys.readouterr()
    assert main(["group", "create", "team", "alice", "bob", "--data-dir", d]) == 2
    err = capsys.readouterr().err
    assert "keeps its data in Redis (redis://127.0.0.1:1)" in err
    assert not (tmp_path / "d" / "store").exists()


def test_a_config_file_that_is_not_utf8_is_an_error_naming_it(tmp_path):
    import pytest

    from pimcore.config import ConfigError, load_settings

    path = tmp_path / "pimcore.toml"
    path.write_bytes(b'[server]\nidle_timeout = 1.0  # caf\xe9 in Latin-1\n')
    with pytest.raises(ConfigError, match="pimcore.toml") as err:
        load_settings(str(path))
    assert "UTF-8" in str(err.value)


# -- bad input to `pimcore chat` gets a one-line error, not a traceback -------


def test_chat_with_yourself_is_refused_saying_why(capsys):
    from _net import token

    assert main(["chat", "--to", "alice", "--token", token("alice"), "--url", "tcp://127.0.0.1:1"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("pimcore chat: ") and "yourself" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("url", ["http://127.0.0.1:7481", "tcp://", "tcp://127.0.0.1:99999", "foo"])
def test_chat_refuses_a_bad_url_saying_why(capsys, url):
    from _net import token

    assert main(["chat", "--to", "bob", "--token", token("alice"), "--url", url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("pimcore chat: --url ") and url in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("cmd", ["chat", "bench"])
@pytest.mark.parametrize("url, why", [
    ("tcp://127.0.0.1:1/foo", "'tcp://127.0.0.1:1/foo': a tcp:// URL has no path"),
    ("tcp://bob:s3cret@127.0.0.1:1", "a URL to connect to has no user name or password"),
    ("ws://127.0.0.1:1/im?x=1", "'ws://127.0.0.1:1/im?x=1': a URL to connect to has no query or fragment"),
    ("tls://127.0.0.1:1#top", "has no query or fragment"),
])
def test_chat_and_bench_refuse_a_url_part_they_would_ignore(capsys, cmd, url, why):
    """chat and bench connected to ``tcp://127.0.0.1:1/foo`` (or with a user
    name, a query...) dropping the part silently: refused up front, exit 2,
    never echoing a password."""
    from _net import token

    if cmd == "chat":
        argv = ["chat", "--to", "bob", "--token", token("alice"), "--url", url]
    else:
        argv = ["bench", "--url", url, "--secret", "s" * 32, "-n", "1", "-c", "1", "--warmup", "0", "--no-progress"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"pimcore {cmd}: ") and why in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "s3cret" not in err


@pytest.mark.parametrize("argv, said", [
    (["chat", "--to", "b\udcffob", "--token", "{token}", "--url", "tcp://127.0.0.1:1"], "'b\\xffob'"),
    (["chat", "--to", "bob", "--token", "{token}", "--url", "tcp://\udcff:1"], "'tcp://\\xff:1': '\\xff' is not a host name"),
    (["chat", "--to", "bob", "--token", "{token}", "--url", "ws://127.0.0.1:1/\udcff"], "'/\\xff'"),
    (["group", "sh\udcffow", "team"], "invalid choice: 'sh\\xffow'"),
    (["sh\udcffow"], "invalid choice: 'sh\\xffow'"),
    (["token", "--user", "alice", "\udcff"], "unrecognized arguments: \\xff"),
    (["group", "show", "team", "--http", "http://127.0.0.1:1/\udcff", "--api-key", "k"], "'http://127.0.0.1:1/\\xff'"),
    (["serve", "--content-filter", "a\udcff"], "not 'a\\xff'"),
    (["serve", "--http", "ftp://\udcff"], "'ftp://\\xff'"),
    (["chat", "--to", "bob", "--token", "x\udcff", "--url", "tcp://127.0.0.1:1"], "the character '\\xff'"),
    (["group", "show", "team", "--http", "http://127.0.0.1:1", "--api-key", "k\udcff"], "the character '\\xff'"),
])
def test_an_argument_that_is_not_utf8_is_echoed_with_its_bytes_readable(tmp_path, capsys, argv, said):
    """A byte that is not UTF-8 in an argument was echoed as Python's
    surrogate escape ('b\\udcffob'; a host name's was a UnicodeError
    traceback): shown as the byte, '\\xff', in one line, exit 2."""
    from _net import token

    argv = [a.replace("{token}", token("alice")) for a in argv]
    if argv[0] == "serve":
        argv += ["--data-dir", str(tmp_path / "d")]
    try:
        rc = main(argv)
    except SystemExit as exc:  # (argparse's refusals)
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert said in err and "udc" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, said", [
    (["serve", "--max-frame", "1MiB"], "pimcore serve: argument --max-frame: invalid int value: '1MiB'"
                                       " (pimcore serve --help)"),
    (["group", "frob"], "pimcore group: argument ACTION: invalid choice: 'frob' (choose from 'create', 'add', 'remove',"
                        " 'show') (pimcore group --help)"),
    (["nosuch"], None),
])
def test_a_usage_error_is_one_line(capsys, argv, said):
    """(A new user's trial, LOW.)  A usage error printed argparse's whole
    usage block before its error, where OPERATIONS.md promises every
    refusal in one line, `pimcore COMMAND: ...`, exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2 and out == "", (exc.value.code, out, err)
    assert len(err.splitlines()) == 1 and err.startswith("pimcore") and "usage:" not in err, err
    if said is not None:
        assert err == said + "\n", err


@pytest.mark.parametrize("argv, said", [
    ([b"chat", b"--to", b"bob", b"--token", b"{token}", b"--url", b"tcp://127.0.0.1:1", b"--cafile", b"/nonexistent/\xff"],
     "--cafile /nonexistent/\\xff: no such file"),
    ([b"inspect", b"/nonexistent/\xffno"], "no pimcore store in /nonexistent/\\xffno"),
    ([b"group", b"show", b"team", b"--data-dir", b"/nonexistent/\xffno"], "'/nonexistent/\\xffno/store'"),
])
def test_a_path_that_is_not_utf8_is_echoed_with_its_bytes_readable(argv, said):
    """A path (or other value) echoed as given, unquoted or quoted by the
    store, was written as Python's surrogate escape ('/tmp/\\udcff'): the
    CLI's stderr writes such a byte as '\\xff' (a real process: its
    arguments are bytes)."""
    from _net import token

    argv = [a.replace(b"{token}", token("alice").encode()) for a in argv]
    r = subprocess.run([sys.executable, "-m", "pimcore", *argv], capture_output=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pimcore.__file__))))
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode in (1, 2) and said in err and "udc" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("ttl", ["inf", "nan", "0", "-5", "99999999999", "31622401"])
def test_token_refuses_a_ttl_outside_what_the_http_api_allows(monkeypatch, capsys, ttl):
    from pimcore.embed import MAX_TOKEN_TTL

    monkeypatch.setenv("PIMCORE_SECRET", "e" * 32)
    assert main(["token", "--user", "alice", "--ttl", ttl]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("pimcore token: ") and f"1..{MAX_TOKEN_TTL}" in err
    assert len(err.strip().splitlines()) == 1
    for ok in ("1", str(MAX_TOKEN_TTL)):
        assert main(["token", "--user", "alice", "--ttl", ok]) == 0 and capsys.readouterr().out.strip()


@pytest.mark.parametrize("argv", [["info"], ["token", "--user", "alice"]])
def test_an_unknown_backend_is_one_line_on_stderr_not_a_traceback(argv):
    env = dict(os.environ, PIMCORE_BACKEND="foo", PIMCORE_SECRET="e" * 32)
    bad = subprocess.run([sys.executable, "-m", "pimcore", *argv], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "pimcore: PIMCORE_BACKEND='foo': expected 'cython', 'pure' or 'auto'"


# -- --http URL of group, purge and retention --------------------------------

_HTTP_COMMANDS = [["group", "show", "team"], ["purge", "user", "bob"], ["retention", "team"]]


@pytest.mark.parametrize("cmd", _HTTP_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("url, why", [
    ("ftp://127.0.0.1:1/", "http:// or https://"),  # hung 30 s, then an empty reason
    ("file:///tmp/f", "http:// or https://"),  # read a local file as if it were the API
    ("http://127.0.0.1:1/?x=1", "query"),  # "no endpoint /"
    ("http://127.0.0.1:1#top", "fragment"),
    ("http://127.0.0.1:1/v1", "path"),
    ("http://:7481", "host"),
    ("http://127.0.0.1:port", "port"),
    ("http://127.0.0.1:99999", "port"),
    ("https://admin:s3cret@127.0.0.1:1", "user name or password"),  # echoed the password
    ("https://admin:s3/cret@127.0.0.1:1/", "user name or password"),  # (a "/" in the password)
    # serve's spelling of its listener, taken as http:// and https:// here:
    # the broker's binary listener is a tcp:// URL too (new-user pass).
    ("tcp://127.0.0.1:1", "http:// or https:// URL, not tcp:// (serve's --http tcp://HOST:PORT is http://HOST:PORT"
                          " here: --http http://127.0.0.1:1)"),
    ("TLS://localhost:1", "http:// or https:// URL, not tls:// (serve's --http tls://HOST:PORT is https://HOST:PORT"
                          " here: --http https://localhost:1)"),
])
def test_a_bad_http_url_is_refused_up_front_in_one_line(tmp_path, capsys, cmd, url, why):
    rc = main([*cmd, "--http", url, "--api-key", "k", "--data-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err, (rc, out, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"pimcore {cmd[0]}: --http "), err
    assert why in err, err
    assert "s3" not in err and "cret" not in err, err  # never the password


@pytest.mark.parametrize("url", ["127.0.0.1:1", "http://127.0.0.1:1", "http://127.0.0.1:1/", "HTTPS://127.0.0.1:1",
                                 "http://[::1]:1/"])
def test_a_good_http_url_gets_past_the_check(tmp_path, capsys, url):
    assert main(["group", "show", "team", "--http", url, "--api-key", "k"]) == 1  # (nothing listens on port 1)
    err = capsys.readouterr().err
    assert err.startswith("pimcore group: cannot reach "), err


@pytest.mark.parametrize("bad", ["empty-dir", "not-utf8", "directory", "empty-key"])
def test_an_admin_commands_api_key_file_that_cannot_be_used_is_said_in_words(tmp_path, capsys, monkeypatch, bad):
    """`pimcore group show --http URL` reads the API key from
    <data-dir>/api-key: `--data-dir ""` meant ./pimcore-data silently (serve
    refuses it), a key file not UTF-8 was Python's "'utf-8' codec can't
    decode byte 0xff", an empty one was sent as an empty key."""
    monkeypatch.delenv("PIMCORE_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    key = tmp_path / "d" / "api-key"
    key.parent.mkdir()
    if bad == "not-utf8":
        key.write_bytes(b"\xff\xfe key")
    elif bad == "directory":
        key.mkdir()
    elif bad == "empty-key":
        key.write_text("\n")
    data_dir = "" if bad == "empty-dir" else str(tmp_path / "d")
    rc = main(["group", "show", "team", "--http", "http://127.0.0.1:1", "--data-dir", data_dir])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "Traceback" not in err, (rc, out, err)
    said = {"empty-dir": "--data-dir: cannot be empty",
            "not-utf8": f"the HTTP API key file {key} is not UTF-8 text",
            "directory": f"the HTTP API key file {key}: Is a directory",
            "empty-key": f"the HTTP API key file {key} is empty"}[bad]
    assert err == f"pimcore group: {said}\n", err


def _group_show_at_a_server_answering(answer: bytes, connections: int, capsys):
    """``pimcore group show team --http`` at a loopback server that answers
    each of its first ``connections`` connections with ``answer`` once it has
    read the request (or the TLS handshake the CLI tries next): (exit code,
    stdout, stderr, port).  The set-up of the tests of servers that are not
    pimcore's HTTP API."""
    import socket
    import threading

    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(20)
        port = srv.getsockname()[1]

        def serve() -> None:
            for _ in range(connections):
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(20)
                    conn.recv(4096)
                    conn.sendall(answer)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        rc = main(["group", "show", "team", "--http", f"http://127.0.0.1:{port}", "--api-key", "k"])
        t.join(20)
    out, err = capsys.readouterr()
    return rc, out, err, port


def test_http_at_a_server_answering_with_a_tls_alert_says_to_use_https(capsys):
    """Another TLS server's answer to a plain HTTP request: a TLS alert
    record (0x15 0x03 ...), read by http.client as a bad status line; as to
    the handshake the CLI then tries.  Said as "try https://"."""
    alert = b"\x15\x03\x01\x00\x02\x02\x46"  # fatal protocol_version
    rc, out, err, port = _group_show_at_a_server_answering(alert, 2, capsys)  # the request, then the handshake
    assert rc == 2 and out == "", (rc, out, err)
    assert err == (f"pimcore group: cannot use http://127.0.0.1:{port}: the server speaks TLS:"
                   f" try https://127.0.0.1:{port}\n"), err


@pytest.mark.parametrize("over_tls", [b"", b"\x00\x01\x02 not http\r\n", b"HTTP/1.0 404 Not Found\r\n\r\n"],
                         ids=["hangs-up", "not-http", "http"])
def test_http_at_a_tls_server_says_try_https_only_if_it_answers_http_over_tls(tmp_path, capsys, over_tls):
    """A TLS server (its alert to the plain request, then a handshake):
    "the server speaks TLS: try https://" was said whatever it then spoke,
    so https:// failed in turn (at the broker's tls:// listener, at any
    TLS service that is no HTTPS one).  Said only if it answers HTTP over
    TLS; otherwise that it speaks TLS but no HTTP."""
    import socket
    import ssl
    import threading

    cert, key, _ = _tls_files(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(20)
        port = srv.getsockname()[1]

        def serve() -> None:
            for i in range(2):  # the plain request, then the CLI's probe over TLS
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(20)
                    if i == 0:
                        conn.recv(4096)
                        conn.sendall(b"\x15\x03\x03\x00\x02\x02\x0a")
                        continue
                    try:
                        with ctx.wrap_socket(conn, server_side=True) as tls:
                            tls.recv(4096)
                            tls.sendall(over_tls)
                    except (OSError, ssl.SSLError):
                        pass

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        rc = main(["group", "show", "team", "--http", f"http://127.0.0.1:{port}", "--api-key", "k"])
        t.join(20)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    if over_tls.startswith(b"HTTP/"):
        assert err == (f"pimcore group: cannot use http://127.0.0.1:{port}: the server speaks TLS:"
                       f" try https://127.0.0.1:{port}\n"), err
    else:
        assert err == (f"pimcore group: cannot use http://127.0.0.1:{port}: the server speaks TLS, but gave no HTTP"
                       " answer over it either (is this the --http listener?)\n"), err


def test_http_at_a_port_that_never_answers_says_so_after_a_bounded_wait(capsys, monkeypatch):
    """A port that accepts and never answers (another service waiting for
    its own protocol's first bytes, a stuck process): it was about 32 s
    (urlopen's timeout=30), then a bare "timed out".  Said with the URL,
    the wait and a hint; the wait made short here (the default is 30 s)."""
    import socket
    import time

    import pimcore.cli

    assert pimcore.cli._HTTP_TIMEOUT == 30.0
    monkeypatch.setattr(pimcore.cli, "_HTTP_TIMEOUT", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as srv:  # (the kernel accepts; nobody reads)
        port = srv.getsockname()[1]
        started = time.monotonic()
        rc = main(["group", "show", "team", "--http", f"http://127.0.0.1:{port}", "--api-key", "k"])
        took = time.monotonic() - started
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert err == (f"pimcore group: no answer from http://127.0.0.1:{port} within 0.5 s:"
                   " is it pimcore's HTTP API (serve --http)?\n"), err
    assert took < 5, took


def _tls_files(tmp_path):
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as f:
        for blob in issued.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(str(cafile))
    return cert, key, cafile


@pytest.mark.parametrize("listener", ["tcp", "tls", "ws", "tls-as-http"])
def test_http_at_one_of_the_brokers_other_listeners_says_which_it_is(tmp_path, capsys, caplog, listener):
    """--http at the broker's tcp:// listener printed the Close frame's raw
    bytes in a BadStatusLine repr; at its ws:// listener only "HTTP 400",
    dropping the text/plain body that names the listener.  http:// at its
    tls:// listener said "the server speaks TLS: try https://", which then
    failed again (the listener is no HTTPS server): said at once."""
    import logging

    from pimcore.threaded import open_pimcore_thread

    # (The in-test broker's info lines are no part of the CLI's output: kept
    # out of stderr, where an earlier test's logging setup may send them.)
    caplog.set_level(logging.WARNING, logger="pimcore")

    cert, key, cafile = _tls_files(tmp_path)
    plain_at_tls = listener == "tls-as-http"
    listener = listener.partition("-")[0]
    listen = f"{listener}://127.0.0.1:0" + ("/im" if listener == "ws" else "")
    with open_pimcore_thread(data_dir=str(tmp_path / "d"), listen=[listen], cert=str(cert), key=str(key)) as im:
        port = im.port(listener)
        scheme = "https" if listener == "tls" and not plain_at_tls else "http"
        base = f"{scheme}://127.0.0.1:{port}"
        rc = main(["group", "show", "team", "--http", base, "--api-key", "k",
                   *(["--cafile", str(cafile)] if scheme == "https" else [])])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    said = {"tcp": f"cannot use {base}: it is a pimcore tcp:// broker listener, not the HTTP API: use the --http URL"
                   " `pimcore serve` prints as 'listening on http://...'",
            "tls": f"cannot use {base}: it is a pimcore tls:// broker listener, not the HTTP API: use the --http URL"
                   " `pimcore serve` prints as 'listening on http://...' (or https://...)",
            "ws": f"HTTP 400 from {base}: this is a pimcore ws:// listener (path /im): it takes a WebSocket upgrade"
                  " request to /im and nothing else"}[listener]
    if plain_at_tls:
        said = (f"cannot use {base}: it is a pimcore tls:// broker listener, not the HTTP API: use the --http URL"
                " `pimcore serve` prints as 'listening on http://...' (or https://...)")
    assert err == f"pimcore group: {said}\n", err


@pytest.mark.parametrize("answer, said", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", 'it answered "SSH-2.0-OpenSSH_9.6"'),
    (b"\x00\x01\x1b[2J junk\n", 'it answered "\\x00\\x01\\x1b[2J junk"'),  # (escaped, not a repr)
    (b"", "it closed the connection without an answer"),
])
def test_http_at_another_service_says_what_it_answered_in_words(capsys, answer, said):
    rc, out, err, port = _group_show_at_a_server_answering(answer, 2, capsys)  # the request, then the TLS handshake tried
    assert rc == 2 and out == "", (rc, out, err)
    assert err == (f"pimcore group: cannot use http://127.0.0.1:{port}: not an HTTP server (is this the --http"
                   f" listener?): {said}\n"), err


@pytest.mark.parametrize("ctype, body, said", [
    ("text/html", b"<html><body><h1>404 Not Found</h1></body></html>", ""),  # (no markup)
    ("text/plain; charset=utf-8", b"no such page\r\nsecond line\n", ": no such page"),
    ("text/plain", b"bell\x07 \x1b[31mred\n", ": bell\\x07 \\x1b[31mred"),  # (no terminal escapes)
    ("text/plain", b"x" * 500, ": " + "x" * 200 + "..."),
    ("text/plain", b"", ""),
])
def test_http_at_another_http_server_says_its_status_and_a_short_plain_text(capsys, ctype, body, said):
    answer = (b"HTTP/1.1 404 Not Found\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
              b"Connection: close\r\n\r\n%s" % (ctype.encode(), len(body), body))
    rc, out, err, port = _group_show_at_a_server_answering(answer, 1, capsys)
    assert rc == 2 and out == "", (rc, out, err)
    assert err == f"pimcore group: HTTP 404 from http://127.0.0.1:{port}{said}\n", err


@pytest.mark.parametrize("cmd", _HTTP_COMMANDS, ids=lambda c: c[0])
def test_cafile_without_http_or_empty_is_refused(tmp_path, capsys, cmd):
    """--cafile without --http was ignored silently (the data directory was
    used), and --cafile '' said nothing useful."""
    data = tmp_path / "data"
    with LmdbStore(data / "store") as store:
        store.create_group("team", ["alice", "bob"], 1)
    ca = tmp_path / "ca.pem"
    ca.write_text("not read\n")
    assert main([*cmd, "--cafile", str(ca), "--data-dir", str(data)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"pimcore {cmd[0]}: --cafile is for an https:// API given with --http URL\n", err
    for extra in ([], ["--http", "https://127.0.0.1:1"]):
        assert main([*cmd, "--cafile", "", *extra, "--api-key", "k", "--data-dir", str(data)]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"pimcore {cmd[0]}: --cafile: the path is empty\n", err
    with LmdbStore(data / "store", owner=False) as store:
        assert store.members("team") == ("alice", "bob")  # nothing done


@pytest.mark.parametrize("argv, said", [
    (["group"], "pimcore group: give an action: create, add, remove or show (pimcore group ACTION NAME [USER...])"),
    (["group", "show"], "pimcore group: show: the group name is required (pimcore group show NAME)"),
    (["group", "add"], "pimcore group: add: the group name is required (pimcore group add NAME USER...)"),
    (["group", "add", "g1"], "pimcore group: add: give at least one user (pimcore group add g1 USER...)"),
    (["group", "remove", "g1"], "pimcore group: remove: give at least one user (pimcore group remove g1 USER...)"),
    # (These made the data directory, then refused.)
    (["group", "create", "bad name", "alice"], "pimcore group: BAD_REQUEST: not a group id: group id 'bad name' is not"
                                                " 1-128 printable ASCII characters without spaces"),
    (["group", "create", "g1", "alice", "bad user"],
     "pimcore group: BAD_REQUEST: user id 'bad user' has the character ' ' (user ids are 1-64 ASCII characters from"
     " A-Z a-z 0-9 _ . @ -)"),
])
def test_group_without_its_name_or_users_says_what_is_missing(tmp_path, capsys, argv, said):
    """add/remove with no user exited 0 silently; show with no name said
    "the following arguments are required: name, USER", and no action at all
    "required: action, USER"."""
    assert main([*argv, "--data-dir", str(tmp_path / "d")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == said + "\n", err
    assert not (tmp_path / "d").exists()  # nothing opened


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    # `pimcore group show team --data-dir D | head -1`: the rest of the output
    # hit a closed pipe, and the command printed a BrokenPipeError traceback.
    data = tmp_path / "data"
    store = LmdbStore(str(data / "store"))
    store.create_group("team", [f"user{i}" for i in range(2000)], now=1)
    store.close()
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "pimcore.cli", "group", "show", "team", "--data-dir", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before the command writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_the_api_key_variable_of_the_http_commands_does_not_upset_the_others(tmp_path):
    # OPERATIONS.md gives $PIMCORE_API_KEY to `pimcore group --http`; set, it
    # made every other command refuse to start ("unknown environment
    # variable $PIMCORE_API_KEY: not a setting").
    env = dict(os.environ, PIMCORE_API_KEY="k" * 32, PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", "pimcore.cli", "token", "--data-dir", str(tmp_path / "data"), "--user", "alice", "--create-secret"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip(), (r.returncode, r.stderr)


# -- exit codes: 1 could not be done now, 2 refused as given (OPERATIONS.md) --


def _refusing_port():
    """A loopback socket bound but not listening: connecting is refused at once."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    return held


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_on_a_redis_store_it_cannot_reach_exits_1_naming_the_url_and_the_setting(tmp_path, monkeypatch, capsys,
                                                                                        how):
    """It said "cannot reach Redis at [('127.0.0.1', 1)]: RedisClusterError('Redis
    Cluster cannot be connected...')": a Python list and an exception's repr."""
    pytest.importorskip("coredis")
    monkeypatch.setenv("PIMCORE_SECRET", "s" * 40)
    with _refusing_port() as held:
        url = f"redis://127.0.0.1:{held.getsockname()[1]}"
        if how == "env":
            monkeypatch.setenv("PIMCORE_STORE", url)
        argv = ["serve", "--data-dir", str(tmp_path / "d"), "--log-level", "warning"]
        code = main(argv + (["--store", url] if how == "flag" else []))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, err
    where = "(--store)" if how == "flag" else "(store.url)"
    assert err.startswith(f"pimcore serve: cannot reach the Redis store {url} {where}: "), err
    assert "RedisClusterError(" not in err and "[('" not in err, err
    if how == "env":
        assert err.endswith(" (from $PIMCORE_STORE)"), err


@pytest.mark.parametrize("cmd", _HTTP_COMMANDS, ids=lambda c: c[0])
def test_an_admin_command_that_cannot_reach_the_http_api_exits_1(tmp_path, capsys, cmd):
    """Nothing listening is no mistake in the command (a broker down, not yet
    up): exit 1, as serve's port in use and chat's refused connection; it was
    2, the code of a command refused as given."""
    with _refusing_port() as held:
        base = f"http://127.0.0.1:{held.getsockname()[1]}"
        rc = main([*cmd, "--http", base, "--api-key", "k"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "", (rc, out, err)
    assert err.startswith(f"pimcore {cmd[0]}: cannot reach {base}: "), err


def test_bench_that_cannot_reach_its_broker_exits_1(capsys):
    with _refusing_port() as held:
        url = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        rc = main(["bench", "--url", url, "--secret", "s" * 32, "-n", "1", "-c", "1", "--warmup", "0", "--no-progress",
                   "--generator", "python"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "", (rc, out, err)
    assert err == f"pimcore bench: cannot connect to {url}: connection refused\n", err  # the SDK's words


# -- api_keys: a list of strings, each long enough, refused naming its source --


@pytest.mark.parametrize("key, text", [
    ("api_keys", 'api_keys = "abc-0123456789-0123456789"\n'),
    ("webhooks.events", '[webhooks]\nurl = "http://127.0.0.1:9/"\nevents = "message"\n'),
    ("store.address_map", '[store]\nurl = "redis://127.0.0.1:7000"\naddress_map = "10.0.0.1:7000=127.0.0.1:7000"\n'),
])
def test_a_string_where_a_list_of_strings_is_expected_is_refused(tmp_path, key, text):
    """`api_keys = "abc..."` was taken as one key (and `api_keys = "k1,k2"` as
    the one key "k1,k2", the environment's comma rule not being the file's).
    `listen = "URL"` stays the short form of one listener."""
    from pimcore.config import ConfigError, load_settings

    cfg = tmp_path / "p.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env={})
    said = str(err.value)
    assert said.startswith(f"{cfg}: {key}: expected a list of strings, got a string"), said
    if key == "api_keys":
        assert "abc" not in said, said  # (a secret is not echoed)
    cfg.write_text('listen = "tcp://127.0.0.1:0"\n')
    assert load_settings(str(cfg), env={}).listen == ("tcp://127.0.0.1:0",)


def test_a_secret_of_the_wrong_type_is_not_echoed(tmp_path):
    from pimcore.config import ConfigError, load_settings

    cfg = tmp_path / "p.toml"
    cfg.write_text('api_keys = ["good-key-0123456789", 12345678901234567]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env={})
    assert "12345678901234567" not in str(err.value) and "good-key" not in str(err.value), str(err.value)
    assert str(err.value).startswith(f"{cfg}: api_keys: expected a list of strings"), str(err.value)


@pytest.mark.parametrize("how", ["file", "env", "keyword", "kept"])
def test_a_short_api_key_is_refused_saying_where_it_came_from(tmp_path, how, capsys):
    """API keys had no minimum length ("k" was a key of the HTTP API)."""
    from pimcore.config import MIN_API_KEY_BYTES, ConfigError, load_settings

    assert MIN_API_KEY_BYTES == 16
    cfg = tmp_path / "p.toml"
    data = tmp_path / "d"
    env: dict = {}
    kw: dict = {}
    if how == "file":
        cfg.write_text('api_keys = ["long-enough-0123456789", "short"]\n')
        said = f"{cfg}: api_keys: HTTP API key 2 is 5 bytes; it must be at least 16"
    elif how == "env":
        env = {"PIMCORE_API_KEYS": "short,long-enough-0123456789"}
        said = "api_keys: HTTP API key 1 is 5 bytes; it must be at least 16 (from $PIMCORE_API_KEYS)"
    elif how == "keyword":
        kw = {"api_keys": ["short"]}
        said = "api_keys: HTTP API key 1 is 5 bytes; it must be at least 16 (from api_keys)"
    else:
        data.mkdir()
        (data / "api-key").write_text("short\n")
        said = f"the HTTP API key from the file {data / 'api-key'} is 5 bytes; it must be at least 16 (from data_dir)"
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg) if how == "file" else None, env=env, data_dir=str(data), **kw).load_api_keys()
    assert str(err.value) == said, str(err.value)
    if how == "keyword":  # (one byte is "1 byte", a new user's trial: "is 1 bytes")
        with pytest.raises(ConfigError) as err:
            load_settings(None, env={}, data_dir=str(data), api_keys=["k"]).load_api_keys()
        assert "HTTP API key 1 is 1 byte;" in str(err.value), str(err.value)
    # serve (and --print-config, for those in the settings) refuses it, exit 2.
    argv = ["serve", "--data-dir", str(data), "--listen", "tcp://127.0.0.1:0", "--http", "tcp://127.0.0.1:0"]
    if how == "file":
        argv += ["--config", str(cfg)]
    if how == "keyword":
        return
    import os as _os

    old = {k: _os.environ.get(k) for k in env}
    _os.environ.update(env)
    try:
        for extra in ([], ["--print-config"]) if how != "kept" else ([],):
            assert main([*argv, *extra]) == 2
            err_text = capsys.readouterr().err
            expected = said.replace("(from data_dir)", "(from --data-dir)")
            assert err_text == f"pimcore serve: {expected}\n", err_text
    finally:
        for k, v in old.items():
            if v is None:
                _os.environ.pop(k, None)
            else:
                _os.environ[k] = v
    assert not (data / "store").exists()


# -- purge and retention print text, as group does (--json: the API's object) --


def test_retention_prints_a_long_age_in_whole_seconds_and_refuses_default_with_a_limit(tmp_path, capsys):
    """--max-age 2592000 (30 days) printed "max age 2.592e+06 s"; --max-age
    10 --default set the age and silently ignored --default (which puts both
    limits back to the broker default): refused, exit 2, nothing changed."""
    data = tmp_path / "data"
    with LmdbStore(data / "store") as store:
        store.create_group("g1", ["alice"], 1)
    d = ["--data-dir", str(data)]
    assert main(["retention", "g1", "--max-age", "2592000", *d]) == 0
    assert capsys.readouterr().out == "g1: max age 2592000 s, max count the broker default, history floor 0\n"
    assert main(["retention", "g1", "--max-age", "0.5", *d]) == 0  # (a fraction stays one)
    assert capsys.readouterr().out == "g1: max age 0.5 s, max count the broker default, history floor 0\n"
    for limit in (["--max-age", "10"], ["--max-count", "3"]):
        assert main(["retention", "g1", *limit, "--default", *d]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err == (f"pimcore retention: --default puts both limits back to the broker default:"
                                     f" give it alone, or {limit[0]} alone (the other limit then follows the"
                                     f" default)\n"), err
    assert main(["retention", "g1", *d]) == 0
    assert capsys.readouterr().out == "g1: max age 0.5 s, max count the broker default, history floor 0\n"


def test_admin_command_at_a_closed_port_says_connection_refused_in_words(capsys):
    """It said "cannot reach http://...: [Errno 111] Connection refused"."""
    with _refusing_port() as held:
        base = f"http://127.0.0.1:{held.getsockname()[1]}"
        rc = main(["group", "show", "g1", "--http", base, "--api-key", "k"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "", (rc, out, err)
    assert err == f"pimcore group: cannot reach {base}: connection refused\n", err


def test_purge_and_retention_print_text_like_group_and_json_with_json(tmp_path, capsys):
    """retention (and purge) printed a JSON object where group prints a line
    of text: text now, the JSON object with --json (as info and bench)."""
    data = tmp_path / "data"
    with LmdbStore(data / "store") as store:
        store.create_group("team", ["alice", "bob"], 1)
        store.create_group("club", ["alice"], 1)
    d = ["--data-dir", str(data)]
    assert main(["group", "show", "team", *d]) == 0
    assert capsys.readouterr().out.startswith("team: 2 members: alice bob\n")
    assert main(["retention", "team", *d]) == 0
    assert capsys.readouterr().out == "team: max age the broker default, max count the broker default, history floor 0\n"
    assert main(["retention", "team", "--max-count", "2", "--max-age", "90", *d]) == 0
    assert capsys.readouterr().out == "team: max age 90 s, max count 2, history floor 0\n"
    assert main(["retention", "team", "--max-count", "0", *d]) == 0  # (the age not given: the default again)
    assert capsys.readouterr().out == "team: max age the broker default, max count no limit, history floor 0\n"
    assert main(["retention", "team", "--json", *d]) == 0
    assert json.loads(capsys.readouterr().out) == {"conv": "team", "max_age": None, "max_count": 0, "floor": 0}
    assert main(["purge", "user", "bob", *d]) == 0
    assert capsys.readouterr().out == "bob: 0 messages tombstoned, 1 inbox entry and 0 devices removed; left 1 group: team\n"
    assert main(["purge", "user", "bob", "--json", *d]) == 0
    assert json.loads(capsys.readouterr().out) == {"user": "bob", "messages": 0, "entries": 0, "devices": 0, "left": []}
    assert main(["purge", "conversation", "team", *d]) == 0
    assert capsys.readouterr().out == "team: 1 entry and 1 inbox entry removed\n"
    assert main(["purge", "conversation", "club", "--json", *d]) == 0
    assert json.loads(capsys.readouterr().out) == {"conv": "club", "messages": 0, "entries": 0}


@pytest.mark.parametrize("how", ["option", "env"])
def test_bench_with_a_short_secret_says_where_it_came_from(monkeypatch, capsys, how):
    """It said "the token secret must be at least 32 bytes", as serve did
    before it named the source."""
    monkeypatch.delenv("PIMCORE_SECRET", raising=False)
    argv = ["bench", "--url", "tcp://127.0.0.1:1", "-n", "1", "-c", "1", "--no-progress"]
    if how == "option":
        argv += ["--secret", "short"]
    else:
        monkeypatch.setenv("PIMCORE_SECRET", "short")
    assert main(argv) == 2
    where = "--secret" if how == "option" else "$PIMCORE_SECRET"
    assert capsys.readouterr().err == f"pimcore bench: the token secret from {where} is 5 bytes; it must be at least 32\n"


@pytest.mark.parametrize("cmd", [
    ["chat", "--to", "bob", "--token", "t", "--cafile", ""],
    ["chat", "--to", "bob", "--token", "t", "--device", ""],
    ["chat", "--to", "bob", "--token", "t", "--url", ""],
    ["group", "show", "team", "--http", "http://127.0.0.1:1", "--api-key", ""],
    ["purge", "user", "bob", "--http", "http://127.0.0.1:1", "--api-key", ""],
    ["retention", "team", "--data-dir", ""],
    ["token", "--user", "alice", "--device", ""],
    ["bench", "--secret", ""],
    ["bench", "--url", "tcp://127.0.0.1:1", "--url", ""],
    ["serve", "--listen", "tcp://127.0.0.1:0", "--listen", ""],
], ids=lambda c: f"{c[0]}{c[-2]}")
def test_an_empty_option_is_refused_naming_it(tmp_path, capsys, monkeypatch, cmd):
    """An option given '' (a shell's unset "$VAR") fell back silently:
    --api-key '' to $PIMCORE_API_KEY or the key file, --cafile '' to the
    system's CAs, bench --secret '' to $PIMCORE_SECRET.  Refused naming the
    option, exit 2, nothing done."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIMCORE_API_KEY", "k" * 32)
    assert main(cmd) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"pimcore {cmd[0]}: {cmd[-2]}: cannot be empty\n", err
    assert list(tmp_path.iterdir()) == []


from pimcore.config import ConfigError, load_settings  # noqa: E402


@pytest.mark.parametrize("toml, said", [
    ('data_dri = "x"\n', "unknown keys ['data_dri']; did you mean data_dir for data_dri?"),
    ('Data_Dir = "x"\n', "unknown keys ['Data_Dir']; did you mean data_dir for Data_Dir?"),
    ("[limit]\nwindow = 8\n", "unknown keys ['limit']; did you mean [limits] for [limit]?"),
    ("[limits]\nsendrate = 5.0\n", "unknown keys in [limits]: ['sendrate']; did you mean send_rate for sendrate?"),
    ("web = true\n", "unknown keys ['web']; web is a flag of pimcore serve only (--web), not a setting"),
    ('nonsense = "x"\n', "unknown keys ['nonsense']"),
], ids=["typo", "case", "section", "in-section", "flag-only", "no-match"])
def test_an_unknown_file_key_suggests_the_close_setting(tmp_path, toml, said):
    """`data_dri = "x"`, `Data_Dir`, `[limit]` said "unknown keys" and no
    more, where an unknown environment variable is said with the close one."""
    cfg = tmp_path / "p.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env={})
    assert str(err.value) == f"{cfg}: {said}"


def test_an_unknown_embedding_keyword_suggests_the_close_one():
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, sendrate=5)
    assert str(err.value) == "unknown setting 'sendrate' (did you mean send_rate?)"
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, webhooks={"URL": "http://x"})
    assert str(err.value) == "unknown setting webhooks.URL (did you mean webhooks.url?)"
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, nonsense=5)
    assert str(err.value) == "unknown setting 'nonsense'"


def test_a_variable_of_a_flag_only_option_says_it_is_a_flag():
    """PIMCORE_WEB=maybe suggested $PIMCORE_STORE."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={"PIMCORE_WEB": "maybe"})
    assert str(err.value) == ("unknown environment variable $PIMCORE_WEB: --web is a flag of pimcore serve only,"
                              " with no variable or setting: give pimcore serve --web")
    with pytest.raises(ConfigError) as err:
        load_settings(env={"PIMCORE_DATA_DRI": "x"})
    assert "(did you mean $PIMCORE_DATA_DIR?)" in str(err.value)


def test_the_rules_variable_of_a_setting_with_a_short_one_names_the_short_one():
    """$PIMCORE_HTTP_LISTEN (what PIMCORE_<SECTION>_<KEY> gives for [http]
    listen) suggested the broker's $PIMCORE_LISTEN: following it moved the
    broker's listener."""
    for given, meant in (("PIMCORE_HTTP_LISTEN", "PIMCORE_HTTP"), ("PIMCORE_STORE_URL", "PIMCORE_STORE")):
        with pytest.raises(ConfigError) as err:
            load_settings(env={given: "tcp://127.0.0.1:7481"})
        assert f"(did you mean ${meant}?)" in str(err.value), str(err.value)


def test_secret_and_secret_file_are_one_setting(tmp_path):
    """Given both in one place, the secret won and secret_file was ignored
    silently: refused now.  From two layers, the upper one's wins, as for
    every setting (a file's secret and $PIMCORE_SECRET_FILE: the file)."""
    long = "s" * 40
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'secret = "{long}"\nsecret_file = "/etc/pimcore/secret"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env={})
    assert str(err.value) == (f"secret ({cfg}) and secret_file ({cfg}) are both given: give one of them"
                              " (secret_file names a file that holds the secret)")
    with pytest.raises(ConfigError) as err:
        load_settings(env={"PIMCORE_SECRET": long, "PIMCORE_SECRET_FILE": "/x"})
    assert "are both given" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, secret=long, secret_file="/x")
    assert "are both given" in str(err.value)
    cfg.write_text(f'secret = "{long}"\n')
    s = load_settings(str(cfg), env={"PIMCORE_SECRET_FILE": str(tmp_path / "f")})
    assert s.secret is None and s.secret_file == tmp_path / "f"
    cfg.write_text('secret_file = "f"\n')
    s = load_settings(str(cfg), env={"PIMCORE_SECRET": long})
    assert s.secret == long and s.secret_file is None


@pytest.mark.parametrize("toml, said", [
    ("[server]\nhistory_max_count = -1\n", "server.history_max_count: expected an integer >= 0, got -1"),
    ("[server]\nhistory_max_age = -0.5\n", "server.history_max_age: expected a number >= 0, got -0.5"),
])
def test_a_negative_retention_setting_is_said_by_its_name(tmp_path, toml, said):
    """It named the core's BrokerConfig.history_max_age (µs) for either."""
    cfg = tmp_path / "p.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env={})
    assert str(err.value) == f"{cfg}: {said}"


@pytest.mark.parametrize("value, said", [
    ("-1", "server.dedupe_window: expected seconds >= 0, got -1"),
    # (A last trial: 3600000 -- ms for s -- kept everything for 41 days,
    # whatever retention said.)
    ("3600000", "server.dedupe_window: expected seconds from 0 to 86400 (a day), got 3.6e+06"),
])
def test_dedupe_window_is_bounded(tmp_path, monkeypatch, capsys, value, said):
    monkeypatch.setenv("PIMCORE_SERVER_DEDUPE_WINDOW", value)
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--print-config"]) == 2
    assert said in capsys.readouterr().err
    monkeypatch.setenv("PIMCORE_SERVER_DEDUPE_WINDOW", "86400")
    assert main(["serve", "--data-dir", str(tmp_path / "d"), "--print-config"]) == 0
    assert "dedupe_window = 86400.0" in capsys.readouterr().out


@pytest.mark.parametrize("toml, kw, said", [
    ('listen = ["tcp://127.0.0.1:17410", ""]\n', {"listen": ["tcp://127.0.0.1:17410", ""]},
     "listen: item 2 of the list is empty: give one URL in each item, or remove it"),
    ('api_keys = ["key-one-0123456789", " "]\n', {"api_keys": ["key-one-0123456789", ""]},
     "api_keys: item 2 of the list is empty: give one key in each item, or remove it"),
    ('[webhooks]\nurl = "http://127.0.0.1:1/h"\nevents = ["", "message"]\n', {},
     "webhooks.events: item 1 of the list is empty: give one event type in each item, or remove it"),
], ids=["listen", "api-keys", "webhook-events"])
def test_an_empty_list_item_in_the_file_or_embedded_is_said_by_its_position(tmp_path, toml, kw, said):
    """`listen = ["URL", ""]` said "listen: '': scheme must be one of ...",
    `api_keys = ["k", ""]` "an API key cannot be empty", without the item."""
    cfg = tmp_path / "p.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings(str(cfg), env={})
    assert str(err.value) == f"{cfg}: {said}"
    if kw:
        with pytest.raises(ConfigError) as err:
            load_settings(env={}, **kw)
        assert str(err.value) == said


@pytest.mark.parametrize("argv", [["group", "show", "team"], ["purge", "user", "bob"], ["retention", "team"]])
def test_a_command_in_a_folder_with_no_data_says_how_to_name_it(tmp_path, monkeypatch, capsys, argv):
    """`pimcore group show team` in a folder with no data said "no store at
    'pimcore-data/store'" and not how to point it at one."""
    for name in [n for n in os.environ if n.startswith("PIMCORE_") and n != "PIMCORE_BACKEND"]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"pimcore {argv[0]}: no store at 'pimcore-data/store': give the data directory of"
                                 " pimcore serve (--data-dir DIR or --config FILE), or --http URL for a running"
                                 " broker\n"), err
    assert list(tmp_path.iterdir()) == []
