/*
 * The public functions of libpimcore: plain C (argument checks, the
 * thread-local error buffer, starting Python) in front of internal Python
 * callbacks (bindings/glue.py).  This text is cffi's set_source preamble
 * (bindings/build.py): Python.h is already included, and the
 * extern "Python" callbacks _pim_py_* are defined by cffi below it.
 *
 * Why the public functions are not cffi's exported extern "Python"
 * functions: when cffi's init code fails those return 0, which a C caller
 * reads as PIM_OK.  Here every call first makes sure Python and the glue
 * came up (pim__ready) and fails with PIM_ERR_INIT otherwise.
 */
#define PIM_BUILDING 1
#include "pimcore.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef PIM__BUILD_PYTHON
#error "PIM__BUILD_PYTHON (the python of the environment pimcore is installed in) must be defined"
#endif

struct pim_broker {
    int64_t id; /* the glue's registry key */
};

/* ------------------------------------------------------------ errors */

static __thread char pim__err[1024];

/* After a text was cut to fit buf: drop a UTF-8 sequence cut in the middle
 * at its end, so that what the caller reads is valid UTF-8 (the glue cuts
 * at a character boundary already; this covers the C side's messages). */
static void pim__utf8_trim(char *buf)
{
    size_t n = strlen(buf), i = n, cont = 0;
    while (i > 0 && cont < 4 && ((unsigned char)buf[i - 1] & 0xC0) == 0x80) {
        i--;
        cont++;
    }
    if (i == 0)
        return;
    unsigned char lead = (unsigned char)buf[i - 1];
    size_t want = lead < 0x80 ? 0 : (lead >> 5) == 6 ? 1 : (lead >> 4) == 14 ? 2 : (lead >> 3) == 30 ? 3 : cont;
    if (lead >= 0x80 && cont < want)
        buf[i - 1] = 0; /* the last character lacks bytes: drop it */
}

/* Called by the glue (Python) too, on the calling thread. */
static void _pim_set_error(const char *msg)
{
    if (snprintf(pim__err, sizeof pim__err, "%s", msg ? msg : "") >= (int)sizeof pim__err)
        pim__utf8_trim(pim__err);
}

static int pim__fail(int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(pim__err, sizeof pim__err, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof pim__err)
        pim__utf8_trim(pim__err);
    return rc;
}

PIM_EXPORT const char *pim_last_error(void)
{
    return pim__err;
}

PIM_EXPORT const char *pim_strerror(int rc)
{
    switch (rc) {
    case PIM_OK: return "success";
    case PIM_ERR_INVALID: return "invalid argument";
    case PIM_ERR_CONFIG: return "invalid options";
    case PIM_ERR_INIT: return "the embedded Python or pimcore did not start";
    case PIM_ERR_VERSION: return "pimcore.h and libpimcore versions differ";
    case PIM_ERR_STOPPED: return "the broker was stopped";
    case PIM_ERR_ALREADY_RUNNING: return "a broker already runs on that data directory's LMDB store";
    case PIM_ERR_WOULD_DEADLOCK: return "the call would deadlock (made from a library callback)";
    case PIM_ERR_UNKNOWN_CONVERSATION: return "unknown conversation";
    case PIM_ERR_NOT_MEMBER: return "not a member of the conversation";
    case PIM_ERR_ALREADY_EXISTS: return "already exists";
    case PIM_ERR_DUPLICATE_CONFLICT: return "idempotency key reused for another message";
    case PIM_ERR_PAYLOAD_TOO_LARGE: return "payload too large";
    case PIM_ERR_REFUSED: return "refused by the broker";
    case PIM_ERR_STORE: return "store failure";
    case PIM_ERR_IO: return "I/O error";
    case PIM_ERR_NOT_FOUND: return "not found";
    case PIM_ERR_NOMEM: return "out of memory";
    case PIM_ERR_INTERNAL: return "internal error";
    default: return "unknown status code";
    }
}

PIM_EXPORT const char *pim_version(int *major, int *minor, int *patch)
{
    if (major) *major = PIM_VERSION_MAJOR;
    if (minor) *minor = PIM_VERSION_MINOR;
    if (patch) *patch = PIM_VERSION_PATCH;
#define PIM__STR2(x) #x
#define PIM__STR(x) PIM__STR2(x)
    return PIM__STR(PIM_VERSION_MAJOR) "." PIM__STR(PIM_VERSION_MINOR) "." PIM__STR(PIM_VERSION_PATCH);
}

PIM_EXPORT void pim_free(void *p)
{
    free(p);
}

/* ------------------------------------------------------------ starting Python */

static pthread_once_t pim__once = PTHREAD_ONCE_INIT;
static char pim__init_msg[1024];           /* why start-up failed */
static int pim__python_failed;             /* Python not started: no such program, or Py_InitializeFromConfig failed */
static char pim__program[4096];            /* the python we started ("" if the host had one) */
static int pim__glue_state;                /* 0 not yet, 1 up, -1 failed (atomic) */
static pid_t pim__pid;                     /* the process that started Python here (0: none yet; atomic) */

/* Called by the glue when cffi's init code has run. */
static void _pim_init_done(int ok, const char *msg)
{
    if (!ok && snprintf(pim__init_msg, sizeof pim__init_msg, "%s", msg ? msg : "the init code failed")
                   >= (int)sizeof pim__init_msg)
        pim__utf8_trim(pim__init_msg);
    __atomic_store_n(&pim__glue_state, ok ? 1 : -1, __ATOMIC_RELEASE);
}

static const char *_pim_program(void)
{
    return pim__program;
}

/* Start the interpreter ourselves, once, so that it is the one of the
 * environment pimcore is installed in: left to itself an embedded CPython
 * derives sys.prefix from the host's PATH (a venv's packages missing, or
 * another standard library).  program_name = that environment's python,
 * baked in at build time, overridable with $PIMCORE_PYTHON.  No signal
 * handlers: the host owns signals.  Never finalized (atexit never runs:
 * pim_broker_stop flushes).  Loaded into a running Python (ctypes), the
 * host's interpreter is used as it is. */
static void pim__init_python(void)
{
    __atomic_store_n(&pim__pid, getpid(), __ATOMIC_RELEASE);
    if (Py_IsInitialized())
        return;
    const char *env = getenv("PIMCORE_PYTHON");
    const char *prog = env && *env ? env : PIM__BUILD_PYTHON;
    snprintf(pim__program, sizeof pim__program, "%s", prog);
    /* A path that is no program: say so.  Started with it anyway, CPython
     * found some other environment, and the error said sys.prefix. (A bare
     * name is looked up on PATH by CPython: left to it.) */
    if (strchr(prog, '/') != NULL && access(prog, X_OK) != 0) {
        int err = errno;
        if (snprintf(pim__init_msg, sizeof pim__init_msg, "%s%s: %s; set %s to the python of the environment"
                     " pimcore is installed in", prog == env ? "PIMCORE_PYTHON=" : "the python libpimcore was built"
                     " with, ", prog, err == ENOENT ? "no such file" : strerror(err),
                     prog == env ? "it" : "PIMCORE_PYTHON")
            >= (int)sizeof pim__init_msg)
            pim__utf8_trim(pim__init_msg);
        pim__python_failed = 1;
        return;
    }
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0;
    config.parse_argv = 0;
    PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, prog);
    if (!PyStatus_Exception(st))
        st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) {
        if (snprintf(pim__init_msg, sizeof pim__init_msg, "Python did not start (program %s): %s%s%s", prog,
                     st.func ? st.func : "", st.func ? ": " : "", st.err_msg ? st.err_msg : "unknown error")
            >= (int)sizeof pim__init_msg)
            pim__utf8_trim(pim__init_msg);
        pim__python_failed = 1;
        return;
    }
    PyEval_SaveThread(); /* release the GIL: callers take it per call */
}

static void _pim_py_hello(void);

/* Run cffi's init code (the glue), which calls _pim_init_done: once per
 * process, through pim__glue_once.  Why a once of its own, entered before
 * the GIL is taken: cffi takes its start-up lock inside the first call, and
 * its init code lets go of the GIL now and then (any os.stat).  Two threads
 * that both took the GIL before the lock deadlocked: one held the GIL and
 * waited for the lock, the other held the lock and waited for the GIL.
 * pthread_once makes the other threads wait without the GIL.
 *
 * cffi (before Python 3.12) guards its start-up with a spin lock on
 * PyCapsule_Type.tp_version_tag, expecting 0 there; in an interpreter that
 * already looked up an attribute of a capsule it is not 0 and cffi spins
 * forever (seen loading the library with ctypes into a running Python
 * 3.11).  Under the GIL, so no lookup runs meanwhile, we hand cffi the 0 it
 * expects and put the tag back. */
static pthread_once_t pim__glue_once = PTHREAD_ONCE_INIT;

/* cffi's start-up imports _cffi_backend and, if that fails, prints a
 * traceback on stderr (the library promises to print nothing) and runs
 * none of the glue.  Import it first ourselves: if it is missing (an
 * environment without cffi), say so through pim_last_error and never start
 * cffi.  Under the GIL; 0 if it imports. */
static int pim__no_cffi_backend(void)
{
    PyObject *mod = PyImport_ImportModule("_cffi_backend");
    if (mod != NULL) {
        Py_DECREF(mod);
        return 0;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject *text = value ? PyObject_Str(value) : NULL;
    const char *why = text ? PyUnicode_AsUTF8(text) : NULL;
    if (why == NULL) {
        PyErr_Clear();
        why = "unknown error";
    }
    const char *name = type ? ((PyTypeObject *)type)->tp_name : "ImportError";
    if (snprintf(pim__init_msg, sizeof pim__init_msg,
                 "cffi's _cffi_backend cannot be imported in the embedded Python (%s%s): %s: %s; install cffi there,"
                 " or set PIMCORE_PYTHON to the python of the environment pimcore is installed in",
                 pim__program[0] ? "program " : "the host's interpreter", pim__program, name, why)
        >= (int)sizeof pim__init_msg)
        pim__utf8_trim(pim__init_msg);
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
    __atomic_store_n(&pim__glue_state, -1, __ATOMIC_RELEASE);
    return 1;
}

static void pim__init_glue(void)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    if (pim__no_cffi_backend()) {
        PyGILState_Release(gil);
        return;
    }
#if PY_VERSION_HEX >= 0x03080000 && PY_VERSION_HEX < 0x030C0000
    unsigned int tag = PyCapsule_Type.tp_version_tag;
    PyCapsule_Type.tp_version_tag = 0;
    _pim_py_hello();
    PyCapsule_Type.tp_version_tag = tag;
#else
    _pim_py_hello();
#endif
    PyGILState_Release(gil);
}

/* Is this process a fork() child of the one that started Python?  Its
 * copy of the interpreter has none of the parent's threads (the brokers'
 * loops, whoever held the GIL): any call into it would wait forever. */
static int pim__forked(void)
{
    pid_t pid = __atomic_load_n(&pim__pid, __ATOMIC_ACQUIRE);
    return pid != 0 && pid != getpid();
}

static int pim__fail_forked(void)
{
    return pim__fail(PIM_ERR_INIT,
                     "libpimcore is not fork-safe: this process is a fork() child of process %ld, which started"
                     " pimcore; use the library only there (or exec in the child)",
                     (long)__atomic_load_n(&pim__pid, __ATOMIC_ACQUIRE));
}

/* PIM_OK once Python and the glue are up in this process, else PIM_ERR_INIT
 * (with the reason in pim_last_error). */
static int pim__ready(void)
{
    pim__err[0] = 0;
    if (pim__forked())
        return pim__fail_forked();
    if (__atomic_load_n(&pim__glue_state, __ATOMIC_ACQUIRE) == 1)
        return PIM_OK;
    pthread_once(&pim__once, pim__init_python);
    if (pim__python_failed)
        return pim__fail(PIM_ERR_INIT, "%s", pim__init_msg);
    pthread_once(&pim__glue_once, pim__init_glue);
    switch (__atomic_load_n(&pim__glue_state, __ATOMIC_ACQUIRE)) {
    case 1: return PIM_OK;
    case -1: return pim__fail(PIM_ERR_INIT, "%s", pim__init_msg);
    default: return pim__fail(PIM_ERR_INIT, "pimcore's Python init code failed (its traceback is on stderr)");
    }
}

/* ------------------------------------------------------------ the internal Python callbacks */

static int _pim_py_start(const char *config_json, int64_t *out_id);
static int _pim_py_stop(int64_t id, int release);
static int _pim_py_port(int64_t id, int *out_port);
static int _pim_py_http_port(int64_t id, int *out_port);
static int _pim_py_post(int64_t id, const char *conv, const char *sender, const char *device, const void *payload,
                        size_t len, const char *key, uint8_t *out_msg_id, uint64_t *out_seq);
static int _pim_py_post_batch(int64_t id, pim_post_item *items, size_t n);
static int _pim_py_group(int64_t id, int op, const char *conv, const char *const *users, size_t n);
static int _pim_py_kick(int64_t id, const char *user, const char *device, const char *reason);
static int _pim_py_revoke(int64_t id, const char *user, const char *device, int64_t before, int64_t *out_before);
static int _pim_py_token(int64_t id, const char *user, const char *device, int64_t ttl, char **out);
static int _pim_py_unread(int64_t id, const char *user, const char *conv, uint64_t *out);
static int _pim_py_set_event_cb(int64_t id, const char *consumer, void *cb, void *userdata, unsigned flags);
static int _pim_py_ack(int64_t id, const char *consumer, uint64_t upto, uint64_t *out_cursor);
static int _pim_py_delete_consumer(int64_t id, const char *consumer, int *out_deleted);

/* The glue calls event callbacks through this (cffi releases the GIL around it). */
static int _pim_invoke_event_cb(void *cb, const pim_event *ev, void *userdata)
{
    return ((pim_event_cb)cb)(ev, userdata);
}

static void *_pim_malloc(size_t n)
{
    return malloc(n);
}

/* ------------------------------------------------------------ the public functions */

#define PIM__CHECK(cond, what)                                   \
    do {                                                         \
        if (!(cond))                                             \
            return pim__fail(PIM_ERR_INVALID, "%s", what);       \
    } while (0)

#define PIM__ENTER(b)                                            \
    do {                                                         \
        pim__err[0] = 0;                                         \
        PIM__CHECK((b) != NULL, "the broker is NULL");           \
        int rc_ = pim__ready();                                  \
        if (rc_ != PIM_OK)                                       \
            return rc_;                                          \
    } while (0)

/* The oldest header this library serves: 0.1.0, the first. */
#define PIM__OLDEST_HEADER 100

PIM_EXPORT int pim_broker_start_(const char *config_json, pim_broker **out, int header_version)
{
    pim__err[0] = 0;
    if (out != NULL)
        *out = NULL;
    if (header_version < PIM__OLDEST_HEADER || header_version / 10000 != PIM_VERSION_MAJOR
        || header_version > PIM_VERSION_NUMBER)
        return pim__fail(PIM_ERR_VERSION,
                         "pimcore.h is version %d, the library %d: it takes headers %d to %d (PIM_VERSION_NUMBER)",
                         header_version, PIM_VERSION_NUMBER, PIM__OLDEST_HEADER, PIM_VERSION_NUMBER);
    PIM__CHECK(out != NULL, "out is NULL");
    PIM__CHECK(config_json != NULL, "config_json is NULL (\"{}\" for the defaults)");
    int rc = pim__ready();
    if (rc != PIM_OK)
        return rc;
    pim_broker *b = (pim_broker *)calloc(1, sizeof *b);
    if (!b)
        return pim__fail(PIM_ERR_NOMEM, "out of memory");
    rc = _pim_py_start(config_json, &b->id);
    if (rc != PIM_OK) {
        free(b);
        return rc;
    }
    *out = b;
    return PIM_OK;
}

PIM_EXPORT int pim_broker_stop(pim_broker *b)
{
    PIM__ENTER(b);
    return _pim_py_stop(b->id, 0);
}

PIM_EXPORT int pim_broker_free(pim_broker *b)
{
    pim__err[0] = 0; /* NULL too: a call like any other replaces the last error */
    if (b == NULL)
        return PIM_OK;
    if (pim__forked()) { /* the broker runs on in the parent: release this copy of the handle */
        free(b);
        return pim__fail_forked();
    }
    PIM__ENTER(b);
    int rc = _pim_py_stop(b->id, 1);
    if (rc == PIM_ERR_WOULD_DEADLOCK)
        return rc; /* still usable: free it from another thread */
    free(b);
    return rc;
}

PIM_EXPORT int pim_broker_port(pim_broker *b, int *out_port)
{
    PIM__ENTER(b);
    PIM__CHECK(out_port != NULL, "out_port is NULL");
    return _pim_py_port(b->id, out_port);
}

PIM_EXPORT int pim_broker_http_port(pim_broker *b, int *out_port)
{
    PIM__ENTER(b);
    PIM__CHECK(out_port != NULL, "out_port is NULL");
    return _pim_py_http_port(b->id, out_port);
}

PIM_EXPORT int pim_post(pim_broker *b, const char *conv, const char *sender, const char *device,
                        const void *payload, size_t len, const char *idempotency_key,
                        uint8_t out_msg_id[16], uint64_t *out_seq)
{
    PIM__ENTER(b);
    PIM__CHECK(conv != NULL, "conv is NULL");
    PIM__CHECK(payload != NULL || len == 0, "payload is NULL with a length");
    PIM__CHECK((sender == NULL) == (device == NULL), "sender and device: both or neither (the system)");
    return _pim_py_post(b->id, conv, sender, device, payload, len, idempotency_key, out_msg_id, out_seq);
}

/* Statuses are truthful per item (a caller may trust them alone): invalid
 * items get PIM_ERR_INVALID and are skipped, the valid ones are posted; an
 * item the glue did not reach (the call as a whole failed) gets the call's
 * status.  PIM__PENDING marks "not decided yet" between here and the glue. */
#define PIM__PENDING (-1)

static void pim__batch_mark(pim_post_item *items, size_t n, int rc)
{
    for (size_t i = 0; i < n; i++)
        if (items[i].status == PIM__PENDING)
            items[i].status = rc;
}

PIM_EXPORT int pim_post_batch(pim_broker *b, pim_post_item *items, size_t n)
{
    pim__err[0] = 0;
    PIM__CHECK(items != NULL || n == 0, "items is NULL");
    size_t first_bad = n, valid = 0;
    for (size_t i = 0; i < n; i++) {
        pim_post_item *it = &items[i];
        it->seq = 0;
        memset(it->msg_id, 0, sizeof it->msg_id);
        if (it->conv == NULL || (it->payload == NULL && it->len != 0) || ((it->sender == NULL) != (it->device == NULL))) {
            it->status = PIM_ERR_INVALID;
            if (first_bad == n)
                first_bad = i;
        } else {
            it->status = PIM__PENDING;
            valid++;
        }
    }
    if (b == NULL) {
        pim__batch_mark(items, n, PIM_ERR_INVALID);
        return pim__fail(PIM_ERR_INVALID, "the broker is NULL");
    }
    int rc = pim__ready();
    if (rc == PIM_OK && valid > 0)
        rc = _pim_py_post_batch(b->id, items, n);
    for (size_t i = 0; i < n; i++) {
        if (items[i].status == PIM__PENDING) { /* the call failed before the glue decided this item */
            pim__batch_mark(items, n, rc == PIM_OK ? PIM_ERR_INTERNAL : rc);
            return rc == PIM_OK ? pim__fail(PIM_ERR_INTERNAL, "pim_post_batch: item %zu was not decided", i) : rc;
        }
    }
    for (size_t i = 0; i < n; i++) {
        if (items[i].status == PIM_OK)
            continue;
        if (i == first_bad)
            return pim__fail(PIM_ERR_INVALID, "item %zu: conv NULL, payload NULL with a length, or only one of sender/device", i);
        return items[i].status; /* the glue set the error text of its first failed item */
    }
    return PIM_OK;
}

static int pim__group(pim_broker *b, int op, const char *conv, const char *const *users, size_t n)
{
    PIM__ENTER(b);
    PIM__CHECK(conv != NULL, "conv is NULL");
    PIM__CHECK(users != NULL || n == 0, "the user list is NULL");
    for (size_t i = 0; i < n; i++)
        if (users[i] == NULL)
            return pim__fail(PIM_ERR_INVALID, "user %zu is NULL", i);
    return _pim_py_group(b->id, op, conv, users, n);
}

PIM_EXPORT int pim_group_create(pim_broker *b, const char *conv, const char *const *members, size_t n)
{
    return pim__group(b, 0, conv, members, n);
}

PIM_EXPORT int pim_group_add_members(pim_broker *b, const char *conv, const char *const *users, size_t n)
{
    return pim__group(b, 1, conv, users, n);
}

PIM_EXPORT int pim_group_remove_members(pim_broker *b, const char *conv, const char *const *users, size_t n)
{
    return pim__group(b, 2, conv, users, n);
}

PIM_EXPORT int pim_kick(pim_broker *b, const char *user, const char *device, const char *reason)
{
    PIM__ENTER(b);
    PIM__CHECK(user != NULL, "user is NULL");
    return _pim_py_kick(b->id, user, device, reason);
}

PIM_EXPORT int pim_revoke(pim_broker *b, const char *user, const char *device, int64_t before_us, int64_t *out_before)
{
    PIM__ENTER(b);
    PIM__CHECK(user != NULL, "user is NULL");
    PIM__CHECK(before_us >= 0, "before_us is negative");
    return _pim_py_revoke(b->id, user, device, before_us, out_before);
}

PIM_EXPORT int pim_token_issue(pim_broker *b, const char *user, const char *device, int64_t ttl_seconds, char **out_token)
{
    PIM__ENTER(b);
    PIM__CHECK(out_token != NULL, "out_token is NULL");
    *out_token = NULL;
    PIM__CHECK(user != NULL, "user is NULL");
    PIM__CHECK(ttl_seconds > 0, "ttl_seconds must be positive");
    return _pim_py_token(b->id, user, device, ttl_seconds, out_token);
}

PIM_EXPORT int pim_unread_count(pim_broker *b, const char *user, const char *conv, uint64_t *out_count)
{
    PIM__ENTER(b);
    PIM__CHECK(user != NULL && conv != NULL, "user or conv is NULL");
    PIM__CHECK(out_count != NULL, "out_count is NULL");
    return _pim_py_unread(b->id, user, conv, out_count);
}

PIM_EXPORT int pim_set_event_callback(pim_broker *b, const char *consumer, pim_event_cb cb, void *userdata, unsigned flags)
{
    PIM__ENTER(b);
    PIM__CHECK((flags & ~PIM_EVENTS_ON_LOOP_THREAD) == 0, "unknown flags");
    return _pim_py_set_event_cb(b->id, consumer ? consumer : "default", (void *)cb, userdata, flags);
}

PIM_EXPORT int pim_ack_events(pim_broker *b, const char *consumer, uint64_t upto, uint64_t *out_cursor)
{
    PIM__ENTER(b);
    return _pim_py_ack(b->id, consumer ? consumer : "default", upto, out_cursor);
}

PIM_EXPORT int pim_delete_consumer(pim_broker *b, const char *consumer, int *out_deleted)
{
    PIM__ENTER(b);
    return _pim_py_delete_consumer(b->id, consumer ? consumer : "default", out_deleted);
}
