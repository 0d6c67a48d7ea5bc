"""The id grammar lives in pimcore.ids, and the client does not drag the
store (or LMDB) in with it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pimcore import ids
from pimcore.store import base


def test_store_reexports_the_same_functions() -> None:
    for name in ("valid_id", "direct_conversation", "direct_members", "valid_conversation", "member_set", "check_ids"):
        assert getattr(base, name) is getattr(ids, name)


def test_direct_conversation_is_symmetric_and_canonical() -> None:
    assert ids.direct_conversation("bob", "alice") == ids.direct_conversation("alice", "bob") == "d:alice:bob"
    assert ids.direct_members("d:alice:bob") == ("alice", "bob")
    assert ids.direct_members("d:bob:alice") is None  # not canonical
    assert not ids.valid_conversation("d:bob:alice")
    with pytest.raises(ValueError):
        ids.direct_conversation("alice", "alice")
    with pytest.raises(ValueError):
        ids.member_set("alice")


@pytest.mark.parametrize("module", ["pimcore.client", "pimcore.client_session", "pimcore.ids", "pimcore.net.streams"])
def test_client_side_imports_load_no_store(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in sys.modules if m == 'lmdb' or m.startswith('pimcore.store') or m == 'pimcore.core')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"{module} loaded {out.stdout.strip()}"
