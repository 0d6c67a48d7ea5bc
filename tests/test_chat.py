"""``pimcore chat`` against a broker in this process: what the user sees
when something is wrong (one line on stderr, not a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pimcore.cli import main
from pimcore.core import Identity
from pimcore.threaded import open_pimcore_thread


def _plain_tokens(token: bytes, now: int) -> Identity:
    """A host's own authenticator: the token is the user id (no JWT)."""
    return Identity(token.decode())


def test_chat_with_yourself_under_a_non_jwt_authenticator_is_one_line(tmp_path: Path, capsys) -> None:
    # The CLI cannot read the user out of a token it does not know (JWT
    # only): the broker says who logged in, and the chat refuses then.
    with open_pimcore_thread(data_dir=str(tmp_path / "d"), listen=["tcp://127.0.0.1:0"],
                             authenticate=_plain_tokens) as im:
        url = f"tcp://127.0.0.1:{im.port()}"
        assert main(["chat", "--to", "alice", "--token", "alice", "--url", url]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("pimcore chat: ") and "yourself" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
