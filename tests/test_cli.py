"""The ``pimcore`` command (info, inspect)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pimcore
from pimcore.cli import main
from pimcore.core import drain
from pimcore.store import LmdbStore, direct_conversation

from _harness import Harness

AB = direct_conversation("alice", "bob")


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
