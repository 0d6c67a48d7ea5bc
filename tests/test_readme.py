"""README's embedding example runs as written and says what it shows."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

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
