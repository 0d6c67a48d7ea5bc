"""The C ABI (bindings/): build libpimcore.so with cffi, then

* compile the C test program with gcc and run it (errors, a Python SDK
  client receiving what C posts, 4 threads x 5,000 posts, event callbacks,
  stop and restart), also under AddressSanitizer, and with a Python that
  cannot start;
* compile the header as C++ and the README's example as C (and run it);
* load the library with ctypes inside this process (the Python side).

Skipped, with the reason, without cffi, gcc or the Python headers (.ci/run
installs them, and sets PIMCORE_REQUIRE_CABI=1 so that there they fail
instead).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BINDINGS = ROOT / "bindings"
TESTS_C = BINDINGS / "tests"
#: Posts per thread of the C test (4 threads).
POSTS_PER_THREAD = int(os.environ.get("PIM_TEST_POSTS", "5000"))


def _missing() -> str:
    try:
        import cffi  # noqa: F401
    except ImportError:
        return "cffi is not installed (pip install cffi)"
    if shutil.which("gcc") is None:
        return "gcc is not installed (apt-get install gcc)"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        return f"the Python headers are missing ({include}/Python.h; apt-get install python3-dev)"
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return "this Python has no shared libpython to embed"
    return ""


_WHY = _missing()
if _WHY and os.environ.get("PIMCORE_REQUIRE_CABI"):  # .ci/run: these tests must run there
    raise RuntimeError(f"PIMCORE_REQUIRE_CABI is set but {_WHY}")
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The library starts this environment's python; the tree under test first.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PIM_TEST_DIR"] = str(TESTS_C)
    env.update(extra)
    return env


def _build(out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, str(BINDINGS / "build.py"), "--out", str(out), *extra], check=True,
                   capture_output=True, timeout=300)
    return out / "libpimcore.so"


def _gcc(out: Path, source: Path, libdir: Path, *flags: str, compiler: str = "gcc") -> Path:
    cmd = [compiler, "-Wall", "-Wextra", "-Werror", "-g", "-O1", "-pthread", *flags, "-o", str(out), str(source),
           f"-I{libdir}", f"-L{libdir}", "-lpimcore", f"-Wl,-rpath,{libdir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def libdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("libpimcore")
    lib = _build(out)
    assert lib.exists() and (out / "pimcore.h").exists()
    return out


@pytest.fixture(scope="module")
def abi_exe(libdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/c/test_abi.c built once against ``libdir`` (read-only: each test
    runs it in a directory of its own)."""
    return _gcc(tmp_path_factory.mktemp("test_abi") / "test_abi", TESTS_C / "test_abi.c", libdir)


def _exported(lib: Path) -> set[str]:
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in nm.stdout.splitlines() if " T " in line}


def test_the_library_exports_only_the_pim_functions(libdir: Path) -> None:
    if shutil.which("nm") is None:
        pytest.skip("nm is not installed")
    names = _exported(libdir / "libpimcore.so")
    header = (BINDINGS / "pimcore.h").read_text()
    declared = set(re.findall(r"PIM_EXPORT [^;(]*?\b(pim_\w+)\(", header))
    assert declared <= names
    assert {n for n in names if not n.startswith("PyInit_")} == declared


@pytest.mark.slow
def test_the_c_program(abi_exe: Path, tmp_path: Path) -> None:
    done = subprocess.run([str(abi_exe), "main", str(tmp_path / "data"), sys.executable, str(POSTS_PER_THREAD)],
                          capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    report = done.stdout + done.stderr
    assert done.returncode == 0 and " 0 failed" in done.stdout, report
    assert "FAIL" not in done.stdout
    # Errors (a port in use among them) reach the caller through pim_last_error only.
    assert done.stderr == "", done.stderr


def test_pim_debug_sends_the_library_log_to_stderr(abi_exe: Path, tmp_path: Path) -> None:
    """PIM_DEBUG=debug: pimcore's log lines (the bind error) on stderr.  A
    start-up error is the caller's (PIM_ERR_IO and pim_last_error), so it is
    logged at DEBUG only, not as an ERROR as well."""
    done = subprocess.run([str(abi_exe), "main", str(tmp_path / "data"), sys.executable, "10"],
                          capture_output=True, text=True, env=_env(PIM_DEBUG="debug"), timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout[-3000:]
    bind = [line for line in done.stderr.splitlines() if "address already in use" in line.lower()]
    assert bind and all(line.startswith("libpimcore DEBUG") for line in bind), done.stderr


def test_threads_making_the_first_calls_at_once_all_get_their_answer(abi_exe: Path, tmp_path: Path) -> None:
    """pimcore.h: "Every function may be called from any thread,
    concurrently"; the first calls of a process start Python.  Eight
    threads doing so at once hung the process, every time (the GIL against
    cffi's start-up lock).  Five runs, a timeout for the hang."""
    for _ in range(5):
        try:
            done = subprocess.run([str(abi_exe), "first-calls-race"], capture_output=True, text=True, env=_env(),
                                  timeout=60, cwd=tmp_path)
        except subprocess.TimeoutExpired:
            pytest.fail("the first calls from 8 threads at once hung the process")
        assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr


def test_the_event_callback_gets_every_kind_with_its_fields(abi_exe: Path, tmp_path: Path) -> None:
    """A client's edit and recall reach the C callback as kinds 4 and 3 and
    its settings as a "conversation" event: pimcore.h defines them
    (PIM_KIND_*) and pim_event has what they need (target, the settings,
    the mentions).  The header knew kinds 0-2 and types without
    "conversation", and had no target field."""
    try:
        done = subprocess.run([str(abi_exe), "event-kinds", str(tmp_path / "data"), sys.executable],
                              capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"event-kinds hung: {exc.stdout!r}")
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr


def test_calls_in_a_forked_child_fail_fast(abi_exe: Path, tmp_path: Path) -> None:
    """libpimcore is not fork-safe: after fork() the child's calls fail at
    once with PIM_ERR_INIT (pimcore.h says so).  They hung forever: the
    child has the parent's Python state but none of its threads."""
    try:
        done = subprocess.run([str(abi_exe), "fork", str(tmp_path / "data")], capture_output=True, text=True,
                              env=_env(), timeout=60, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"a call in the forked child hung: {exc.stdout!r}")
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr


def test_a_long_error_text_is_cut_at_a_character_boundary(abi_exe: Path, tmp_path: Path) -> None:
    """pim_last_error() is UTF-8 (pimcore.h, CONVENTIONS): an error naming a
    conversation of 750 "ü" was cut at 1000 bytes, in the middle of one."""
    done = subprocess.run([str(abi_exe), "last-error-utf8", str(tmp_path / "data")], capture_output=True, text=True,
                          env=_env(), timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr


def test_arguments_are_checked_as_documented(abi_exe: Path, tmp_path: Path) -> None:
    """A negative header version, a config string not UTF-8, empty sender
    and device ids, an empty consumer name, a data_dir that is a file, an
    ack past the last event: each as pimcore.h and bindings/README.md say.
    Before: -5 was accepted as a header version, the non-UTF-8 config was
    PIM_ERR_CONFIG, ("", "") posted as the system and
    pim_set_event_callback(b, "", NULL, ...) succeeded."""
    done = subprocess.run([str(abi_exe), "argument-checks", str(tmp_path / "data")], capture_output=True, text=True,
                          env=_env(), timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("broken", [{"PIMCORE_PYTHON": "/nonexistent/bin/python"}, {"PYTHONHOME": "/nonexistent"}],
                         ids=["wrong-environment", "no-standard-library"])
def test_python_failing_to_start_is_a_clear_init_code(abi_exe: Path, broken: dict[str, str]) -> None:
    """A PIMCORE_PYTHON that does not exist says so, naming the variable
    (it was reported as a sys.prefix mismatch: the embedded Python started
    without it and found another environment)."""
    done = subprocess.run([str(abi_exe), "init-fails"], capture_output=True, text=True, env=_env(**broken), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the reason: " in done.stdout
    if "PIMCORE_PYTHON" in broken:  # (without a standard library CPython prints its path configuration itself)
        assert "the reason: PIMCORE_PYTHON=/nonexistent/bin/python: no such file" in done.stdout, done.stdout
        assert "sys.prefix" not in done.stdout, done.stdout
        assert done.stderr == "", done.stderr
    else:
        assert "Python did not start" in done.stdout, done.stdout


def test_an_environment_without_cffi_is_a_clear_init_code_and_nothing_on_stderr(abi_exe: Path, tmp_path: Path) -> None:
    """PIMCORE_PYTHON names a python whose environment lacks cffi's
    _cffi_backend: every call is PIM_ERR_INIT naming it, and, as pimcore.h
    says, the library writes nothing on stderr.  cffi printed its start-up
    traceback there."""
    venv = tmp_path / "no-cffi"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True,
                   timeout=120)
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import _cffi_backend"], capture_output=True, timeout=60)
    if probe.returncode == 0:  # pragma: no cover - a base Python whose venvs see cffi
        pytest.skip("a new venv of this Python imports _cffi_backend")
    done = subprocess.run([str(abi_exe), "init-fails"], capture_output=True, text=True,
                          env=_env(PIMCORE_PYTHON=str(python)), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the reason: " in done.stdout and "_cffi_backend" in done.stdout, done.stdout
    assert done.stderr == "", done.stderr


@pytest.mark.slow
def test_the_c_program_under_address_sanitizer(tmp_path: Path) -> None:
    asan = tmp_path / "asan"
    try:
        _build(asan, "--sanitize", "address")
    except subprocess.CalledProcessError as exc:  # pragma: no cover - depends on the compiler
        pytest.skip(f"no AddressSanitizer here: {exc.stderr[-300:]!r}")
    exe = _gcc(asan / "test_abi", TESTS_C / "test_abi.c", asan, "-fsanitize=address", "-fno-omit-frame-pointer")
    # Leak detection needs ptrace (LeakSanitizer), which containers often
    # refuse; Python's own allocations would need suppressions anyway.
    env = _env(ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86")
    done = subprocess.run([str(exe), "main", str(tmp_path / "data"), sys.executable, "300"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    report = done.stdout + done.stderr
    assert "AddressSanitizer" not in report, report[-5000:]
    assert done.returncode == 0 and " 0 failed" in done.stdout, report[-5000:]


def test_the_readme_names_every_durability_mode_the_options_take() -> None:
    """bindings/README.md, Options: durability is "sync" or "os" -- the
    options also take "log" (pimcore.config.DURABILITY_MODES)."""
    from pimcore.config import DURABILITY_MODES

    text = (BINDINGS / "README.md").read_text(encoding="utf-8")
    said = text[text.index("## Options"):].split("`durability` (", 1)[1].split(")", 1)[0]
    assert set(re.findall(r'`"(\w+)"`', said)) == set(DURABILITY_MODES), said


def test_the_header_compiles_as_cpp(libdir: Path, tmp_path: Path) -> None:
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed (apt-get install g++)")
    src = tmp_path / "use.cpp"
    src.write_text(
        '#include "pimcore.h"\n#include <cstdio>\n'
        "static int on_event(const pim_event *ev, void *) { return ev->id ? PIM_EVENT_ACK : PIM_EVENT_KEEP; }\n"
        "int main() {\n"
        "    pim_broker *b = nullptr;\n"
        '    int rc = pim_broker_start("{not json", &b);\n'
        '    std::printf("%s %d\\n", pim_strerror(rc), pim_set_event_callback(b, nullptr, on_event, nullptr, 0));\n'
        "    pim_post_item item = {};\n"
        "    return rc == PIM_ERR_CONFIG && pim_post_batch(b, &item, 1) == PIM_ERR_INVALID ? 0 : 1;\n"
        "}\n"
    )
    exe = _gcc(tmp_path / "use", src, libdir, "-std=c++11", "-pedantic", compiler="g++")
    done = subprocess.run([str(exe)], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("invalid options"), done.stdout + done.stderr


def test_the_readme_example_compiles_and_runs(libdir: Path, tmp_path: Path) -> None:
    readme = (BINDINGS / "README.md").read_text()
    blocks = re.findall(r"```c\n(.*?)```", readme, re.S)
    example = (BINDINGS / "example.c").read_text()
    assert example in blocks, "bindings/README.md shows bindings/example.c"
    assert len(example.strip().splitlines()) <= 35
    exe = _gcc(tmp_path / "example", BINDINGS / "example.c", libdir, "-std=c99", "-pedantic")
    for expect in ("seq 1, bob has 1 unread", "seq 2, bob has 2 unread"):  # a second run: the same data
        done = subprocess.run([str(exe)], capture_output=True, text=True, env=_env(), timeout=120, cwd=tmp_path)
        assert done.returncode == 0 and expect in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------- in process (ctypes)


class _Event(ctypes.Structure):
    _fields_ = [
        ("id", ctypes.c_uint64), ("type", ctypes.c_char_p), ("time", ctypes.c_int64), ("conv", ctypes.c_char_p),
        ("seq", ctypes.c_uint64), ("msg_id", ctypes.c_uint8 * 16), ("sender", ctypes.c_char_p),
        ("device", ctypes.c_char_p), ("kind", ctypes.c_int), ("server_time", ctypes.c_int64),
        ("payload", ctypes.c_void_p), ("payload_len", ctypes.c_size_t),
        ("recipients", ctypes.POINTER(ctypes.c_char_p)), ("n_recipients", ctypes.c_size_t),
        ("offline_recipients", ctypes.POINTER(ctypes.c_char_p)), ("n_offline_recipients", ctypes.c_size_t),
        ("user", ctypes.c_char_p), ("unread", ctypes.c_uint64), ("code", ctypes.c_char_p), ("reason", ctypes.c_char_p),
    ]


EVENT_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_Event), ctypes.c_void_p)


def test_in_process_through_ctypes(libdir: Path, tmp_path: Path) -> None:
    """The library loaded into this (running) interpreter: it uses it as it
    is, and the glue drives pimcore.threaded here."""
    lib = ctypes.CDLL(str(libdir / "libpimcore.so"))
    lib.pim_last_error.restype = ctypes.c_char_p
    lib.pim_strerror.restype = ctypes.c_char_p
    lib.pim_version.restype = ctypes.c_char_p
    vp = ctypes.c_void_p
    lib.pim_post.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                             ctypes.c_char_p, vp, ctypes.POINTER(ctypes.c_uint64)]
    lib.pim_unread_count.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint64)]
    lib.pim_set_event_callback.argtypes = [vp, ctypes.c_char_p, EVENT_CB, vp, ctypes.c_uint]
    lib.pim_broker_stop.argtypes = lib.pim_broker_free.argtypes = [vp]
    lib.pim_group_create.argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t]
    lib.pim_token_issue.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64, ctypes.POINTER(vp)]
    lib.pim_free.argtypes = [vp]
    assert lib.pim_version(None, None, None) == b"0.3.0"

    b = vp()
    config = b'{"data_dir": "%s", "durability": "os", "server": {"events": true}}' % str(tmp_path / "d").encode()
    assert lib.pim_broker_start_(b"{not json", ctypes.byref(b), 100) == 2  # PIM_ERR_CONFIG
    assert b"JSON" in lib.pim_last_error()
    # A number of more digits than Python reads: said so, not Python's
    # advice to call sys.set_int_max_str_digits().
    assert lib.pim_broker_start_(b'{"limits": {"window": %s}}' % (b"9" * 5001), ctypes.byref(b), 100) == 2
    assert lib.pim_last_error() == b"config_json holds a number of 5,001 digits (at most 4,300 are read)", lib.pim_last_error()
    # A key given twice: json kept the last silently (read_json refuses it, as for an HTTP body).
    twice = b'{"data_dir": "%s", "data_dir": "%s"}' % (str(tmp_path / "a").encode(), str(tmp_path / "b").encode())
    assert lib.pim_broker_start_(twice, ctypes.byref(b), 100) == 2
    assert lib.pim_last_error() == b"config_json holds the key 'data_dir' twice in one object (give each key once)", \
        lib.pim_last_error()
    assert lib.pim_broker_start_(config, ctypes.byref(b), 100) == 0, lib.pim_last_error()
    members = (ctypes.c_char_p * 2)(b"alice", b"bob")
    assert lib.pim_group_create(b, b"team", members, 2) == 0
    # Adding or removing no one is refused (it "changed" nothing, PIM_OK).
    for change in (lib.pim_group_add_members, lib.pim_group_remove_members):
        change.argtypes = lib.pim_group_create.argtypes
        assert change(b, b"team", members, 0) == 1  # PIM_ERR_INVALID
        assert b"at least one user" in lib.pim_last_error()
    seq = ctypes.c_uint64()
    msg_id = (ctypes.c_uint8 * 16)()
    assert lib.pim_post(b, b"team", b"alice", b"web", b"hi", 2, b"k", msg_id, ctypes.byref(seq)) == 0
    assert seq.value == 1 and any(msg_id)
    assert lib.pim_post(b, b"nope", None, None, b"x", 1, None, None, None) == 8  # UNKNOWN_CONVERSATION
    assert b"nope" in lib.pim_last_error()
    n = ctypes.c_uint64()
    assert lib.pim_unread_count(b, b"bob", b"team", ctypes.byref(n)) == 0 and n.value == 1
    token = vp()
    assert lib.pim_token_issue(b, b"bob", None, 60, ctypes.byref(token)) == 0
    assert ctypes.string_at(token.value).count(b".") == 2  # a JWT
    lib.pim_free(token)
    lib.pim_revoke.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    before = ctypes.c_int64()
    assert lib.pim_revoke(b, b"bob", None, time.time_ns(), ctypes.byref(before)) == 1  # PIM_ERR_INVALID: ns, not µs
    assert "µs".encode() in lib.pim_last_error() and before.value == 0
    for ttl in (0, 366 * 24 * 3600 + 1):
        assert lib.pim_token_issue(b, b"bob", None, ttl, ctypes.byref(token)) == 1  # PIM_ERR_INVALID
        assert b"ttl" in lib.pim_last_error() and (ttl == 0 or b"366 days" in lib.pim_last_error())
    lib.pim_kick.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]
    assert lib.pim_kick(b, b"a b", None, None) == 1 and b"'a b'" in lib.pim_last_error()
    assert lib.pim_kick(b, b"bob", None, b"r" * 257) == 1 and b"256 bytes" in lib.pim_last_error()
    assert lib.pim_kick(b, b"bob", None, b"r" * 256) == 0

    seen: list[tuple[int, bytes, bytes, list[bytes]]] = []
    reentry: list[int] = []
    got = threading.Event()

    @EVENT_CB
    def on_event(ev, userdata):  # on the loop thread (PIM_EVENTS_ON_LOOP_THREAD)
        e = ev.contents
        if e.type == b"message" and e.kind == 0:
            payload = ctypes.string_at(e.payload, e.payload_len)
            seen.append((e.seq, e.conv, payload, [e.recipients[i] for i in range(e.n_recipients)]))
            reentry.append(lib.pim_post(b, b"team", None, None, b"again", 5, None, None, None))
            got.set()
        return 0

    assert lib.pim_set_event_callback(b, None, on_event, None, 1) == 0
    assert got.wait(20)
    assert seen == [(1, b"team", b"hi", [b"alice", b"bob"])]
    assert reentry == [7]  # PIM_ERR_WOULD_DEADLOCK, not a hang
    assert lib.pim_set_event_callback(b, None, EVENT_CB(), None, 0) == 0  # removed

    start = time.monotonic()
    assert lib.pim_broker_stop(b) == 0
    assert time.monotonic() - start < 10
    assert lib.pim_post(b, b"team", None, None, b"late", 4, None, None, None) == 5  # PIM_ERR_STOPPED
    assert lib.pim_strerror(5) == b"the broker was stopped"
    assert lib.pim_broker_free(b) == 0


def test_in_process_pim_broker_http_port_gives_the_http_listeners_port(libdir: Path, tmp_path: Path) -> None:
    """The config takes an HTTP listener ({"http": {"listen": "tcp://127.0.0.1:0"}})
    and pim_broker_http_port gives its bound port: /healthz answers there.
    Without one, PIM_ERR_NOT_FOUND.  There was no way to learn the port
    (pim_broker_port is the first tcp:// listener's)."""
    import json
    import urllib.request

    lib = ctypes.CDLL(str(libdir / "libpimcore.so"))
    lib.pim_last_error.restype = ctypes.c_char_p
    vp = ctypes.c_void_p
    lib.pim_broker_http_port.argtypes = lib.pim_broker_port.argtypes = [vp, ctypes.POINTER(ctypes.c_int)]
    lib.pim_broker_free.argtypes = [vp]
    b = vp()
    config = {"data_dir": str(tmp_path / "d"), "durability": "os", "listen": ["tcp://127.0.0.1:0"],
              "http": {"listen": "tcp://127.0.0.1:0"}}
    assert lib.pim_broker_start_(json.dumps(config).encode(), ctypes.byref(b), 200) == 0, lib.pim_last_error()
    try:
        port, http_port = ctypes.c_int(), ctypes.c_int()
        assert lib.pim_broker_port(b, ctypes.byref(port)) == 0
        assert lib.pim_broker_http_port(b, ctypes.byref(http_port)) == 0, lib.pim_last_error()
        assert 0 < http_port.value != port.value
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port.value}/healthz", timeout=10) as answer:
            assert answer.status == 200
        assert lib.pim_broker_http_port(b, None) == 1  # PIM_ERR_INVALID
    finally:
        assert lib.pim_broker_free(b) == 0
    del config["http"]
    config["data_dir"] = str(tmp_path / "e")
    assert lib.pim_broker_start_(json.dumps(config).encode(), ctypes.byref(b), 200) == 0, lib.pim_last_error()
    try:
        assert lib.pim_broker_http_port(b, ctypes.byref(http_port)) == 16  # PIM_ERR_NOT_FOUND
        assert b"HTTP listener" in lib.pim_last_error(), lib.pim_last_error()
    finally:
        assert lib.pim_broker_free(b) == 0


def test_in_process_a_redis_store_it_cannot_reach_is_pim_err_store(libdir: Path, tmp_path: Path) -> None:
    """{"store": {"url": ...}} at a port that refuses: PIM_ERR_STORE naming
    the URL and store.url, no LMDB store made.  The broker started on
    <data_dir>/store and ignored the setting."""
    pytest.importorskip("coredis")
    import json
    import socket

    lib = ctypes.CDLL(str(libdir / "libpimcore.so"))
    lib.pim_last_error.restype = ctypes.c_char_p
    b = ctypes.c_void_p()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{held.getsockname()[1]}"
        config = {"data_dir": str(tmp_path / "d"), "store": {"url": url}}
        rc = lib.pim_broker_start_(json.dumps(config).encode(), ctypes.byref(b), 200)
        if rc == 0:
            ctypes.CDLL(str(libdir / "libpimcore.so")).pim_broker_free(b)
    said = lib.pim_last_error().decode()
    assert rc == 14 and said.startswith(f"settings: cannot reach the Redis store {url} (store.url): "), (rc, said)
    assert not b and not (tmp_path / "d" / "store").exists()


class _Item(ctypes.Structure):
    _fields_ = [
        ("conv", ctypes.c_char_p), ("sender", ctypes.c_char_p), ("device", ctypes.c_char_p),
        ("payload", ctypes.c_void_p), ("len", ctypes.c_size_t), ("idempotency_key", ctypes.c_char_p),
        ("status", ctypes.c_int), ("seq", ctypes.c_uint64), ("msg_id", ctypes.c_uint8 * 16),
    ]


class _Event02(ctypes.Structure):
    """pim_event up to local_id (header 0.2)."""

    _fields_ = _Event._fields_ + [("target", ctypes.c_uint64), ("local_id", ctypes.c_uint64)]


def test_in_process_a_payload_length_is_checked_before_it_is_read_and_free_null_clears_the_error(
        libdir: Path, tmp_path: Path) -> None:
    """pim_post / pim_post_batch copied ``len`` bytes before the limit was
    looked at: a wrong length (a size_t underflow, say) read past the
    caller's buffer or asked for terabytes (PIM_ERR_NOMEM), instead of
    PIM_ERR_PAYLOAD_TOO_LARGE.  pim_broker_free(NULL) returned PIM_OK with
    the previous call's error still in pim_last_error (every other call
    replaces it).  And a host post's event carries a local id (the header
    said 0)."""
    lib = ctypes.CDLL(str(libdir / "libpimcore.so"))
    lib.pim_last_error.restype = ctypes.c_char_p
    vp = ctypes.c_void_p
    lib.pim_post.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                             ctypes.c_char_p, vp, ctypes.POINTER(ctypes.c_uint64)]
    lib.pim_post_batch.argtypes = [vp, ctypes.POINTER(_Item), ctypes.c_size_t]
    lib.pim_broker_stop.argtypes = lib.pim_broker_free.argtypes = [vp]
    lib.pim_group_create.argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t]
    cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_Event02), ctypes.c_void_p)
    lib.pim_set_event_callback.argtypes = [vp, ctypes.c_char_p, cb_type, vp, ctypes.c_uint]

    b = vp()
    config = (b'{"data_dir": "%s", "durability": "os", "limits": {"max_payload": 1024}, "server": {"events": true}}'
              % str(tmp_path / "d").encode())
    assert lib.pim_broker_start_(config, ctypes.byref(b), 200) == 0, lib.pim_last_error()
    try:
        assert lib.pim_group_create(b, b"team", (ctypes.c_char_p * 1)(b"alice"), 1) == 0
        small = ctypes.create_string_buffer(b"hi", 2)
        huge = 1 << 62  # no such buffer: reading it would crash or fail to allocate
        assert lib.pim_post(b, b"team", None, None, small, huge, None, None, None) == 12, lib.pim_last_error()
        assert lib.pim_last_error() == b"post to 'team' refused: PAYLOAD_TOO_LARGE: %d bytes, max_payload is 1024" % huge
        assert lib.pim_post(b, b"team", None, None, small, 1025, None, None, None) == 12
        items = (_Item * 2)(_Item(b"team", None, None, ctypes.cast(small, vp), huge, None),
                            _Item(b"team", None, None, ctypes.cast(small, vp), 2, None))
        assert lib.pim_post_batch(b, items, 2) == 12
        assert (items[0].status, items[0].seq, items[1].status, items[1].seq) == (12, 0, 0, 1)
        assert lib.pim_last_error() == b"item 0: post to 'team' refused: PAYLOAD_TOO_LARGE: %d bytes, max_payload is 1024" % huge

        assert lib.pim_broker_free(None) == 0
        assert lib.pim_last_error() == b""  # as every call but pim_last_error/strerror/version/free

        local_ids: list[int] = []
        got = threading.Event()

        @cb_type
        def on_event(ev, userdata):
            e = ev.contents
            if e.type == b"message" and e.kind == 0:
                local_ids.append(e.local_id)
                if len(local_ids) == 3:
                    got.set()
            return 0

        assert lib.pim_post(b, b"team", b"alice", b"web", small, 2, b"key", None, None) == 0
        assert lib.pim_post(b, b"team", None, None, small, 2, None, None, None) == 0
        assert lib.pim_set_event_callback(b, None, on_event, None, 1) == 0
        assert got.wait(20)
        assert lib.pim_set_event_callback(b, None, cb_type(), None, 0) == 0
        assert len(local_ids) == 3 and all(local_ids), local_ids  # never 0 for a host post
        assert lib.pim_broker_stop(b) == 0
    finally:
        assert lib.pim_broker_free(b) == 0


def test_two_threads_setting_one_consumers_callback_leave_one_and_a_removal_removes_it(abi_exe: Path,
                                                                                       tmp_path: Path) -> None:
    """A new user's trial: two threads each called pim_set_event_callback for
    one consumer, then one removed it, and the callback was still called
    (30 of 30 trials); under pressure 24 calls ran at once, ids went
    backwards.  Settings of one consumer now replace one another whole."""
    try:
        done = subprocess.run([str(abi_exe), "callback-race", str(tmp_path / "data")], capture_output=True, text=True,
                              env=_env(), timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"callback-race hung: {exc.stdout!r}")
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr


def test_two_brokers_whose_callbacks_stop_each_other_get_would_deadlock_not_a_hang(abi_exe: Path,
                                                                                   tmp_path: Path) -> None:
    """A new user's trial (cross.c): A's event callback called
    pim_broker_stop(B) while B's called pim_broker_stop(A).  Both waited
    for each other forever, and pim_broker_free(A) from main hung after
    them.  The stop that closes the cycle is PIM_ERR_WOULD_DEADLOCK."""
    (tmp_path / "data").mkdir()
    try:
        done = subprocess.run([str(abi_exe), "cross-stop", str(tmp_path / "data")], capture_output=True, text=True,
                              env=_env(), timeout=60, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"cross-stop hung: {exc.stdout!r}")
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr


def test_set_event_callback_racing_stop_is_ok_or_stopped(abi_exe: Path, tmp_path: Path) -> None:
    """A new user's trial (setcb_stop.c): pim_set_event_callback racing
    pim_broker_stop returned PIM_ERR_INTERNAL "RuntimeError: Nursery is
    closed to new arrivals" in 8 of 20 rounds."""
    try:
        done = subprocess.run([str(abi_exe), "setcb-stop", str(tmp_path / "data")], capture_output=True, text=True,
                              env=_env(), timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"setcb-stop hung: {exc.stdout!r}")
    assert done.returncode == 0 and " 0 failed" in done.stdout, done.stdout + done.stderr


def test_the_version_the_header_quotes_is_the_headers_version() -> None:
    """pimcore.h said pim_version returns "0.2.0" while the header (and so
    the library) was 0.3.0 (a new user's trial): a version written out in
    the header's or the README's text is the one PIM_VERSION_* define."""
    header = (BINDINGS / "pimcore.h").read_text()
    parts = [re.search(rf"#define PIM_VERSION_{p} (\d+)", header).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
    version = ".".join(parts)
    for name in ("pimcore.h", "README.md"):
        quoted = re.findall(r'"(\d+\.\d+\.\d+)"', (BINDINGS / name).read_text())
        assert all(q == version for q in quoted), f"bindings/{name} quotes {quoted}, the header is {version}"
