"""Shared fixtures.  Keep this file to fixtures every test module may use."""

from __future__ import annotations

import compileall
import logging
import os
import sys
from types import ModuleType
from typing import Iterator

import pytest
from hypothesis import settings

from pimcore import _backend

# No per-example deadline anywhere: timing is for bench/, and a loaded CI
# machine must not turn a slow fsync into a failure.  Failing examples print a
# blob that reproduces them (@reproduce_failure).
settings.register_profile("pimcore", deadline=None, print_blob=True)
settings.load_profile("pimcore")


def pytest_configure(config: pytest.Config) -> None:
    """Compile pimcore's modules to bytecode once, in the controller, when
    this Python writes none (``PYTHONDONTWRITEBYTECODE``, set on some CI
    images) and pimcore runs from its source tree (README's ``pip install
    -e``, which compiles nothing).  Why: the suite starts some hundreds of
    ``pimcore`` processes, and each then compiled ~30 modules from source,
    0.7 of its 1.5 s start (measured on the 2-core VM, 2026-12-03).  Up-to-date
    files are skipped, so it costs nothing the second time."""
    if sys.dont_write_bytecode and not hasattr(config, "workerinput"):
        compileall.compile_dir(os.path.dirname(_backend.__file__), quiet=2)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: two workers per CPU (README's command caps them with
    ``--maxprocesses``).  Most tests wait -- on sockets, fsyncs, child
    processes' start -- rather than compute: on the 2-core VM one pass took
    16-17 minutes with 2 workers (CI43) and 12 with 4 (2026-12-03)."""
    return 2 * (os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """The root logger as the test found it.  A test that runs a command in
    this process (``cli.main(["serve", ...])``) configures logging to that
    moment's stderr -- pytest's capture, closed after the test -- and every
    later test's broker thread then logged "--- Logging error ---" into its
    own captured stderr (a test asserting no traceback failed only when run
    after such a test)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(params=["cython", "pure"], scope="session")
def backend(request: pytest.FixtureRequest) -> ModuleType:
    """Each fast-path backend in turn.  The compiled one is skipped when it is
    not built -- unless PIMCORE_BACKEND=cython demands it, then that fails."""
    name = request.param
    try:
        return _backend.load(name)
    except ImportError as exc:
        if os.environ.get("PIMCORE_BACKEND", "").strip().lower() == name:
            pytest.fail(f"PIMCORE_BACKEND={name} but the backend does not import: {exc}")
        pytest.skip(f"backend {name!r} is not available: {exc}")


@pytest.fixture(scope="session")
def active() -> ModuleType:
    """The backend PIMCORE_BACKEND selected (what the public modules use)."""
    return _backend.impl


@pytest.fixture(scope="session")
def both() -> tuple[ModuleType, ModuleType]:
    """(cython, pure) for differential tests; skipped when the compiled
    backend is not built (a failure if PIMCORE_BACKEND=cython demands it)."""
    try:
        cy = _backend.load("cython")
    except ImportError as exc:
        if os.environ.get("PIMCORE_BACKEND", "").strip().lower() == "cython":
            pytest.fail(f"PIMCORE_BACKEND=cython but the extension does not import: {exc}")
        pytest.skip(f"compiled backend not built: {exc}")
    return cy, _backend.load("pure")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A 3-master 3-replica Redis Cluster on loopback (tests/_redis_cluster.py),
    started on first use -- only a session that runs a Redis test pays for
    it -- and killed at the end of the session.  Skipped when redis-server,
    redis-cli or coredis is missing, unless PIMCORE_REQUIRE_REDIS=1 (CI) makes
    that a failure."""
    from _redis_cluster import RedisCluster, missing

    why = missing()
    if why is not None:
        if os.environ.get("PIMCORE_REQUIRE_REDIS") == "1":
            pytest.fail(f"PIMCORE_REQUIRE_REDIS=1 but {why}")
        pytest.skip(why)
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
