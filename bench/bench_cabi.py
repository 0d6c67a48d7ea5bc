"""The C ABI's costs, measured from C (bench/bench_cabi.c).

    python bench/bench_cabi.py [POSTS] [BATCH]     # figures for BENCHMARKS.md

builds libpimcore (bindings/build.py) and the C bench into a temporary
directory and runs it for durability "os" and "sync": ``pim_post`` latency
(p50, p99) from 1 and from 4 threads, and ``pim_post_batch`` throughput.
Under pytest (the benchmark smoke of .ci/run) it runs once with small counts;
it skips without cffi, gcc or the Python headers.
"""

from __future__ import annotations

import os
import subprocess
import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(out: Path, posts: int, batch: int, durabilities: tuple[str, ...] = ("os", "sync")) -> str:
    subprocess.run([sys.executable, str(ROOT / "bindings" / "build.py"), "--out", str(out)], check=True,
                   capture_output=True)
    exe = out / "bench_cabi"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(ROOT / "bench" / "bench_cabi.c"), f"-I{out}",
                    f"-L{out}", "-lpimcore", f"-Wl,-rpath,{out}"], check=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    report = []
    for durability in durabilities:
        done = subprocess.run([str(exe), str(out / f"data-{durability}"), durability, str(posts), str(batch)],
                              capture_output=True, text=True, env=env, check=True, timeout=600)
        report.append(done.stdout)
    return "".join(report)


def test_cabi_smoke(tmp_path: Path) -> None:
    import pytest

    sys.path.insert(0, str(ROOT / "tests"))
    from test_cabi import _missing  # the same prerequisites as the C ABI tests

    if _missing():
        pytest.skip(_missing())
    report = run(tmp_path, 400, 100, ("os",))
    assert "pim_post, 1 thread: 400 posts" in report and "pim_post_batch of 100" in report


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("posts", nargs="?", type=int, default=5000, help="posts (default 5,000)")
    ap.add_argument("batch", nargs="?", type=int, default=100, help="posts per pim_post_batch (default 100)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(run(Path(tmp), a.posts, a.batch), end="")
