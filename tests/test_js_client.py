"""The JavaScript client (clients/js): its Node test suite, run by pytest.

``npm ci`` then ``node --test`` in clients/js: the codec against
docs/PROTOCOL.md's vectors, the display order against pimcore.order, and the
client against live ``pimcore serve`` processes (started by the Node tests
with this interpreter, so under this backend), interop with the Python SDK
included, and the demo page in Chromium when it and playwright-core are
there (clients/js/test/browser.test.mjs; it skips itself otherwise, saying
why).  Skips when node (>= 20) or npm is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parent.parent / "clients" / "js"


def _node_major() -> int:
    node = shutil.which("node")
    if node is None:
        return 0
    out = subprocess.run([node, "--version"], capture_output=True, text=True).stdout
    m = re.match(r"v(\d+)", out.strip())
    return int(m.group(1)) if m else 0


@pytest.mark.skipif(_node_major() < 20, reason="node >= 20 is not installed (the JS client's tests need it)")
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (the JS client's tests need it)")
def test_js_client_node_suite(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PIMCORE_PYTHON"] = sys.executable
    repo = str(JS.parent.parent)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PIMCORE_ARTIFACTS"] = str(tmp_path)  # the browser test's screenshot goes here
    env.pop("PIMCORE_SECRET", None)
    r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"npm ci failed:\n{r.stdout}\n{r.stderr}"
    r = subprocess.run(["node", "--experimental-websocket", "--test", "--test-reporter=spec", "test/"], cwd=JS, env=env,
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-20000:])
    assert r.returncode == 0, f"node --test failed:\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    # The suite must actually have run its tests: "ℹ pass N" with N > 0 and no failures.
    passed = re.search(r"pass (\d+)", r.stdout)
    assert passed and int(passed.group(1)) > 0, r.stdout[-3000:]
