"""README's examples run as written and do what they say."""

from __future__ import annotations

import contextlib
import io
import os
import time
from pathlib import Path

from _proc import procs  # noqa: F401  (a fixture)

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_embedding_example_runs(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Embedding the core") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    finally:
        os.chdir(cwd)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("LoginAck(user='alice', device='phone'")
    assert lines[1].startswith("SendAck(local_id=1, code=0,") and "seq=1" in lines[1]
    assert int(lines[-1]) > 1_700_000_000_000_000  # a deadline, in µs
    assert (tmp_path / "embedded-data").is_dir()


def _snippet(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_embedding_example_keeps_out_of_the_serve_data_directory() -> None:
    code = _snippet("## Embedding the core")
    assert "pimcore-data" not in code.replace("pimcore-data/store", "")  # only named in a comment
    assert 'LmdbStore("embedded-data")' in code


def test_the_sdk_example_runs_against_pimcore_serve_and_reads_where_messages_arrive(tmp_path: Path, procs) -> None:
    """README's SDK example as a script, against `pimcore serve`: it runs
    main(), and marks each message read in its own conversation (a group
    message in the group, not in the 1:1 chat)."""
    import subprocess
    import sys
    import threading

    import trio

    from pimcore.auth import issue_token, load_or_create_secret
    from pimcore.client import open_client
    from pimcore.ids import direct_conversation

    from _proc import free_port, run_pimcore, token_for

    data = tmp_path / "data"
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    procs.serve("--listen", url, "--data-dir", data)
    made = run_pimcore("group", "create", "team", "alice", "bob", "--data-dir", data)
    assert made.returncode == 0, made.stderr
    code = _snippet("## The client SDK")
    assert code.count("tcp://127.0.0.1:7400") == 1
    script = tmp_path / "example.py"
    script.write_text(code.replace("tcp://127.0.0.1:7400", url), encoding="utf-8")
    example = subprocess.Popen(
        [sys.executable, str(script), token_for("alice", data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
    )
    lines: list[str] = []
    arrived = threading.Condition()

    def pump() -> None:
        assert example.stdout is not None
        for line in example.stdout:
            with arrived:
                lines.append(line.rstrip("\n"))
                arrived.notify_all()

    threading.Thread(target=pump, daemon=True).start()

    def expect(text: str) -> None:
        with arrived:
            assert arrived.wait_for(lambda: any(text in line for line in lines), timeout=20), lines

    ab = direct_conversation("alice", "bob")
    bob_token = issue_token(load_or_create_secret(data), "bob")

    async def bob_sends(conv: str, payload: bytes) -> None:
        with trio.fail_after(20):
            async with open_client(url, bob_token, "laptop") as bob:
                await bob.send(conv, payload)

    try:
        expect(f"sent to {ab} as seq 1")
        trio.run(bob_sends, "team", b"hi team")
        expect("team bob: hi team")
        trio.run(bob_sends, ab, b"hi alice")
        expect(f"{ab} bob: hi alice")

        def read_markers() -> str:
            r = run_pimcore("inspect", data, "--user", "alice")
            assert r.returncode == 0, r.stderr
            return r.stdout

        for _ in range(200):  # the example marks read after printing
            out = read_markers()
            if "team: last seq 1, read 1" in out and f"{ab}: last seq 2, read 2" in out:
                break
            time.sleep(0.05)
        assert "team: last seq 1, read 1, unread 0" in out and f"{ab}: last seq 2, read 2, unread 0" in out, out
    finally:
        example.kill()
        example.wait(10)
