"""Build libpimcore.so and pimcore.h with cffi's embedding mode.

    python bindings/build.py [--out DIR]      (or: make -C bindings)

Run it with the python of the environment pimcore is installed in: the
library starts that environment's interpreter (its path is baked in;
``$PIMCORE_PYTHON`` overrides it at run time).  Needs cffi, a C compiler and
the Python headers.  Output: ``DIR/libpimcore.so`` and ``DIR/pimcore.h``
(default DIR: ``bindings/build``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: What the glue (Python) calls in C, and the C->Python callbacks.
CDEF = r"""
typedef struct pim_post_item {
    const char *conv; const char *sender; const char *device;
    const void *payload; size_t len; const char *idempotency_key;
    int status; uint64_t seq; uint8_t msg_id[16];
} pim_post_item;
typedef struct pim_event {
    uint64_t id; const char *type; int64_t time; const char *conv; uint64_t seq; uint8_t msg_id[16];
    const char *sender; const char *device; int kind; int64_t server_time;
    const void *payload; size_t payload_len;
    const char *const *recipients; size_t n_recipients;
    const char *const *offline_recipients; size_t n_offline_recipients;
    const char *user; uint64_t unread; const char *code; const char *reason;
    uint64_t target; uint64_t local_id; const char *const *muted_recipients; size_t n_muted_recipients;
    const char *const *mentioned; size_t n_mentioned; int mention_all; int pinned; int muted; int hidden;
} pim_event;

static void _pim_set_error(const char *msg);
static void _pim_init_done(int ok, const char *msg);
static const char *_pim_program(void);
static int _pim_invoke_event_cb(void *cb, const pim_event *ev, void *userdata);
static void *_pim_malloc(size_t n);

extern "Python" void _pim_py_hello(void);
extern "Python" int _pim_py_start(const char *config_json, int64_t *out_id);
extern "Python" int _pim_py_stop(int64_t id, int release);
extern "Python" int _pim_py_port(int64_t id, int *out_port);
extern "Python" int _pim_py_http_port(int64_t id, int *out_port);
extern "Python" int _pim_py_post(int64_t id, const char *conv, const char *sender, const char *device,
                                 const void *payload, size_t len, const char *key, uint8_t *out_msg_id,
                                 uint64_t *out_seq);
extern "Python" int _pim_py_post_batch(int64_t id, pim_post_item *items, size_t n);
extern "Python" int _pim_py_group(int64_t id, int op, const char *conv, const char *const *users, size_t n);
extern "Python" int _pim_py_kick(int64_t id, const char *user, const char *device, const char *reason);
extern "Python" int _pim_py_revoke(int64_t id, const char *user, const char *device, int64_t before,
                                   int64_t *out_before);
extern "Python" int _pim_py_token(int64_t id, const char *user, const char *device, int64_t ttl, char **out);
extern "Python" int _pim_py_unread(int64_t id, const char *user, const char *conv, uint64_t *out);
extern "Python" int _pim_py_set_event_cb(int64_t id, const char *consumer, void *cb, void *userdata,
                                         unsigned flags);
extern "Python" int _pim_py_ack(int64_t id, const char *consumer, uint64_t upto, uint64_t *out_cursor);
extern "Python" int _pim_py_delete_consumer(int64_t id, const char *consumer, int *out_deleted);
"""


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build(out: Path, *, verbose: bool = False, sanitize: str = "") -> Path:
    """Build into ``out``; returns the library's path.  ``sanitize``: e.g.
    "address" to instrument the library's C code (for the tests)."""
    import cffi

    out.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.embedding_api("")  # embedding mode; the exported API is the plain C of pimcore_abi.c
    ffi.cdef(CDEF)
    py_version = "%d.%d" % sys.version_info[:2]
    init = (HERE / "glue.py").read_text()
    ffi.embedding_init_code(f"BUILD_PY_VERSION = {py_version!r}\n" + init)
    # sys.executable as the venv spells it (not resolved: a venv's python is
    # a symlink to the base interpreter, and the venv is found from its path).
    program = os.path.abspath(sys.executable)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    san = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"] if sanitize else []
    ffi.set_source(
        "_pimcore_cffi",
        (HERE / "pimcore_abi.c").read_text(),
        include_dirs=[str(HERE)],
        define_macros=[("PIM__BUILD_PYTHON", _c_string(program))],
        extra_compile_args=["-fvisibility=hidden", "-O2", "-Wall", "-g"] + san,
        extra_link_args=([f"-Wl,-rpath,{libdir}"] if libdir else []) + san,
        libraries=["pthread"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        built = ffi.compile(tmpdir=tmp, target="libpimcore.*", verbose=verbose)
        lib = out / "libpimcore.so"
        shutil.copyfile(built, lib)
    shutil.copyfile(HERE / "pimcore.h", out / "pimcore.h")
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "build", help="output directory (default: bindings/build)")
    ap.add_argument("--sanitize", default="", help="instrument the C code, e.g. address (tests)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    lib = build(args.out.resolve(), verbose=args.verbose, sanitize=args.sanitize)
    print(f"built {lib} and {args.out.resolve() / 'pimcore.h'} (Python {sys.executable})")


if __name__ == "__main__":
    main()
