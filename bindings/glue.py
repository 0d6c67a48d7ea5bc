# The Python side of libpimcore: cffi's embedding init code (bindings/build.py
# bakes this text into the library).  It runs once per process, under the GIL,
# on the first call into Python, with `ffi` and `lib` of the _pimcore_cffi
# module in scope.  It defines the extern "Python" callbacks _pim_py_* that
# the public C functions (pimcore_abi.c) call, each returning a PIM status
# and setting the calling thread's error text with lib._pim_set_error.
#
# Every broker is a pimcore.threaded.ThreadedPimcore in a registry keyed by
# the int64 id the C handle holds.

def _pim_c_text(text, limit=1000):
    """``text`` as UTF-8 for pim_last_error, at most ``limit`` bytes, cut at a
    character boundary (the C buffer holds 1023)."""
    data = text.encode("utf-8", "replace")
    if len(data) > limit:
        data = data[:limit].decode("utf-8", "ignore").encode("utf-8")
    return data


def _pim_glue_main(ffi, lib):
    import os
    import sys
    import threading
    import traceback

    @ffi.def_extern()
    def _pim_py_hello():
        pass

    expected = BUILD_PY_VERSION  # noqa: F821 - baked in by build.py
    if "%d.%d" % sys.version_info[:2] != expected:
        raise RuntimeError("libpimcore was built for Python %s, this process runs %d.%d" % ((expected,) + sys.version_info[:2]))
    program = ffi.string(lib._pim_program()).decode()
    if program:  # we started the interpreter: is it the environment we were built for?
        want = os.path.dirname(os.path.dirname(os.path.abspath(program)))
        if os.path.realpath(sys.prefix) != os.path.realpath(want):
            raise RuntimeError(
                "the embedded Python found sys.prefix %r, not %r (the environment of %s): set PIMCORE_PYTHON to the"
                " python of the environment pimcore is installed in" % (sys.prefix, want, program)
            )

    # No stray stderr output from a C library: errors reach the caller through
    # pim_last_error.  Without a handler Python's logging would print
    # pimcore's warnings to stderr ("last resort"); a NullHandler stops that
    # and still lets a Python host's own logging configuration see them.
    # PIM_DEBUG=debug|info|warning|error (or 1: debug) prints them on stderr.
    import logging

    pim_log = logging.getLogger("pimcore")
    pim_log.addHandler(logging.NullHandler())
    debug = os.environ.get("PIM_DEBUG", "").strip().lower()
    if debug and debug != "0":
        to_stderr = logging.StreamHandler(sys.stderr)
        to_stderr.setFormatter(logging.Formatter("libpimcore %(levelname)s %(name)s: %(message)s"))
        pim_log.addHandler(to_stderr)
        pim_log.setLevel(logging.DEBUG if debug == "1" else getattr(logging, debug.upper(), logging.DEBUG))

    from pimcore._util import DuplicateKey, TooManyDigits, read_json
    from pimcore.config import ConfigError
    from pimcore.errors import ErrorCode, PimError, StoreError
    from pimcore.embed import ConsumerInUse, RequestRefused
    from pimcore.ids import _show
    from pimcore.threaded import BrokerAlreadyRunning, BrokerStopped, WouldDeadlock, open_pimcore_thread

    OK, INVALID, CONFIG, INIT, VERSION, STOPPED, ALREADY_RUNNING, WOULD_DEADLOCK = range(8)
    UNKNOWN_CONVERSATION, NOT_MEMBER, ALREADY_EXISTS, DUPLICATE_CONFLICT, PAYLOAD_TOO_LARGE = range(8, 13)
    REFUSED, STORE, IO, NOT_FOUND, NOMEM, INTERNAL = range(13, 19)
    refusals = {
        ErrorCode.UNKNOWN_CONVERSATION: UNKNOWN_CONVERSATION,
        ErrorCode.NOT_MEMBER: NOT_MEMBER,
        ErrorCode.ALREADY_EXISTS: ALREADY_EXISTS,
        ErrorCode.DUPLICATE_CONFLICT: DUPLICATE_CONFLICT,
        ErrorCode.PAYLOAD_TOO_LARGE: PAYLOAD_TOO_LARGE,
        ErrorCode.BAD_REQUEST: INVALID,
    }

    brokers = {}
    ids = iter(range(1, 1 << 62))
    registry_lock = threading.Lock()
    #: keeps each broker's C callbacks' cffi objects alive: (id, consumer) -> handler
    handlers = {}

    def status_of(exc):
        if isinstance(exc, WouldDeadlock):
            return WOULD_DEADLOCK
        if isinstance(exc, BrokerStopped):
            return STOPPED
        if isinstance(exc, BrokerAlreadyRunning):
            return ALREADY_RUNNING
        if isinstance(exc, ConfigError):
            return CONFIG
        if isinstance(exc, RequestRefused):
            return refusals.get(exc.code, REFUSED)
        if isinstance(exc, ConsumerInUse):  # (pim_delete_consumer: a reader of it runs)
            return REFUSED
        if isinstance(exc, StoreError):
            return STORE
        if isinstance(exc, LookupError):
            return NOT_FOUND
        if isinstance(exc, (ValueError, TypeError, UnicodeError)):
            return INVALID
        if isinstance(exc, OSError):
            return IO
        if isinstance(exc, MemoryError):
            return NOMEM
        return INTERNAL

    def entry(fn):
        """An extern "Python" callback: exceptions become a status code and
        the thread's error text; nothing escapes into C."""

        def call(*args):
            try:
                return fn(*args)
            except BaseException as exc:  # noqa: BLE001 - never into C
                rc = status_of(exc)
                text = str(exc) or type(exc).__name__
                if rc == INTERNAL:
                    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                lib._pim_set_error(_pim_c_text(text))
                return rc

        call.__name__ = fn.__name__
        ffi.def_extern(name=fn.__name__)(call)
        return fn

    def text(p, what):
        if p == ffi.NULL:
            return None
        try:
            return ffi.string(p).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("%s is not UTF-8" % what) from None

    def _lone_surrogate(value, at):
        """Where in the JSON ``value`` a string holds a lone surrogate (a
        key or a value: "data_dir", "listen[1]"), None if none does."""
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return at or "the document"
            return None
        if isinstance(value, dict):
            for key, item in value.items():
                name = "%s.%s" % (at, key) if at else str(key)
                found = _lone_surrogate(key, name + " (its key)") or _lone_surrogate(item, name)
                if found is not None:
                    return found
        elif isinstance(value, list):
            for i, item in enumerate(value):
                found = _lone_surrogate(item, "%s[%d]" % (at, i))
                if found is not None:
                    return found
        return None

    def broker(bid):
        im = brokers.get(bid)
        if im is None:
            raise ValueError("not a broker of this library (freed?)")
        return im

    @entry
    def _pim_py_start(config_json, out_id):
        source = text(config_json, "config_json")  # not UTF-8: PIM_ERR_INVALID, as for every string
        try:
            doc = read_json(source)
        except (TooManyDigits, DuplicateKey) as exc:  # (Python's own words: advice to raise its limit)
            raise ConfigError("config_json holds %s" % exc) from None
        except ValueError as exc:
            raise ConfigError("config_json is not JSON: %s" % exc) from None
        except RecursionError:
            raise ConfigError("config_json is nested too deeply") from None
        if not isinstance(doc, dict):
            raise ConfigError("config_json: expected a JSON object")
        where = _lone_surrogate(doc, "")
        if where is not None:  # (JSON's "\\ud800" escapes: no UTF-8 for them, no path or id either)
            raise ConfigError("config_json: %s is not valid Unicode (a lone surrogate escape such as \\ud800)" % where)
        im = open_pimcore_thread(document=doc, name="pimcore-broker")
        with registry_lock:
            bid = next(ids)
            brokers[bid] = im
        out_id[0] = bid
        return OK

    @entry
    def _pim_py_stop(bid, release):
        im = broker(bid)

        def forget():
            with registry_lock:
                brokers.pop(bid, None)
                for key in [k for k in handlers if k[0] == bid]:
                    del handlers[key]

        try:
            im.close()
        except WouldDeadlock:
            raise  # the handle stays usable: stop or free it from another thread
        except BaseException:
            if release:
                forget()  # the C side frees the handle whatever the error
            raise
        if release:
            forget()
        return OK

    @entry
    def _pim_py_port(bid, out_port):
        out_port[0] = broker(bid).port("tcp")
        return OK

    @entry
    def _pim_py_http_port(bid, out_port):
        from urllib.parse import urlsplit

        url = broker(bid).http_url
        if url is None:
            raise LookupError('no HTTP listener (give one in the config: {"http": {"listen": "tcp://HOST:PORT"}})')
        out_port[0] = urlsplit(url).port
        return OK

    def identity(sender, device):
        # The system is sender and device both NULL; "" is no id (embed's
        # SYSTEM is "", so it must not get through as a user's identity).
        if sender is None:
            return {}
        if sender == "" or device == "":
            raise ValueError("sender and device must be ids, not empty (both NULL: the system)")
        return {"sender": sender, "device": device}

    def payload_of(im, conv, payload, n):
        """The n bytes at ``payload``, copied -- only once n is known to be
        within max_payload: a wrong length must not read past the caller's
        buffer (or ask for terabytes).  RequestRefused(PAYLOAD_TOO_LARGE)
        otherwise, as the broker's refusal says it."""
        limit = im._alive().server.broker.config.limits.max_payload
        if n > limit:
            raise RequestRefused(ErrorCode.PAYLOAD_TOO_LARGE, "post to %s refused: PAYLOAD_TOO_LARGE: %d bytes, max_payload"
                                 " is %d" % (_show(conv), n, limit))
        return ffi.buffer(payload, n)[:] if n else b""

    @entry
    def _pim_py_post(bid, conv, sender, device, payload, n, key, out_msg_id, out_seq):
        im = broker(bid)
        conv = text(conv, "conv")
        posted = im.post(
            conv, payload_of(im, conv, payload, n),
            idempotency_key=text(key, "idempotency_key"),
            **identity(text(sender, "sender"), text(device, "device")),
        )
        if out_msg_id != ffi.NULL:
            ffi.memmove(out_msg_id, posted.msg_id, 16)
        if out_seq != ffi.NULL:
            out_seq[0] = posted.seq
        return OK

    @entry
    def _pim_py_post_batch(bid, items, n):
        # The C side marked each item PIM_ERR_INVALID or pending (-1); decide
        # every pending one (posted, or its own error) so statuses are truthful.
        im = broker(bid)
        posts, where, failed = [], [], []
        for i in range(n):
            it = items[i]
            if it.status != -1:
                continue
            try:
                conv = text(it.conv, "conv")
                kw = {"conv": conv, "payload": payload_of(im, conv, it.payload, it.len)}
                key = text(it.idempotency_key, "idempotency_key")
                if key is not None:
                    kw["idempotency_key"] = key
                kw.update(identity(text(it.sender, "sender"), text(it.device, "device")))
            except ValueError as exc:
                failed.append((i, INVALID, exc))
                continue
            except RequestRefused as exc:  # (too large: not read)
                failed.append((i, status_of(exc), exc))
                continue
            posts.append(kw)
            where.append(i)
        for i, result in zip(where, im.post_many(posts) if posts else ()):
            it = items[i]
            if isinstance(result, PimError):
                failed.append((i, status_of(result), result))
            else:
                it.status = OK
                it.seq = result.seq
                ffi.memmove(it.msg_id, result.msg_id, 16)
        for i, status, exc in failed:
            items[i].status = status
        if not failed:
            return OK
        i, status, exc = min(failed, key=lambda f: f[0])
        lib._pim_set_error(_pim_c_text("item %d: %s" % (i, exc)))
        return status

    @entry
    def _pim_py_group(bid, op, conv, users, n):
        im = broker(bid)
        names = [text(users[i], "user") for i in range(n)]
        method = (im.create_group, im.add_members, im.remove_members)[op]
        method(text(conv, "conv"), names)
        return OK

    @entry
    def _pim_py_kick(bid, user, device, reason):
        broker(bid).kick(text(user, "user"), text(device, "device"), text(reason, "reason") or "")
        return OK

    @entry
    def _pim_py_revoke(bid, user, device, before, out_before):
        when = broker(bid).revoke(text(user, "user"), text(device, "device"), before=before or None)
        if out_before != ffi.NULL:
            out_before[0] = when
        return OK

    @entry
    def _pim_py_token(bid, user, device, ttl, out):
        token = broker(bid).issue_token(text(user, "user"), text(device, "device"), ttl=ttl).encode()
        p = lib._pim_malloc(len(token) + 1)
        if p == ffi.NULL:
            raise MemoryError("out of memory")
        ffi.memmove(p, token + b"\0", len(token) + 1)
        out[0] = ffi.cast("char *", p)
        return OK

    @entry
    def _pim_py_unread(bid, user, conv, out):
        out[0] = broker(bid).unread(text(user, "user"), text(conv, "conv"))
        return OK

    def c_handler(cb, userdata):
        def handler(ev):
            keep = []

            def s(value):
                b = ffi.new("char[]", value.encode())
                keep.append(b)
                return b

            def names(values):
                arr = ffi.new("const char *[]", [s(v) for v in values] or [ffi.NULL])
                keep.append(arr)
                return arr, len(values)

            c = ffi.new("pim_event *")
            c.id = ev.id
            c.type = s(ev.type)
            c.time = ev.time
            c.conv = s(ev.conv)
            c.seq = ev.seq
            if ev.msg_id:
                ffi.memmove(c.msg_id, ev.msg_id, 16)
            c.sender = s(ev.sender)
            c.device = s(ev.device)
            c.kind = ev.kind
            c.server_time = ev.server_time
            payload = ffi.from_buffer(ev.payload)
            c.payload = payload
            c.payload_len = len(ev.payload)
            c.recipients, c.n_recipients = names(ev.recipients)
            c.offline_recipients, c.n_offline_recipients = names(ev.offline_recipients)
            c.user = s(ev.user)
            c.unread = ev.unread
            c.code = s(ev.code) if ev.code is not None else ffi.NULL
            c.reason = s(ev.reason)
            c.target = ev.target
            c.local_id = ev.local_id
            c.muted_recipients, c.n_muted_recipients = names(ev.muted)
            c.mentioned, c.n_mentioned = names(ev.mentioned)
            c.mention_all = bool(ev.mention_all)
            if ev.type == "conversation":
                c.pinned = bool(ev.pinned)
                c.muted = bool(ev.muted)
                c.hidden = bool(ev.hidden)
            return lib._pim_invoke_event_cb(cb, c, userdata) == 0

        return handler

    @entry
    def _pim_py_set_event_cb(bid, consumer, cb, userdata, flags):
        im = broker(bid)
        name = text(consumer, "consumer")
        if cb == ffi.NULL:
            im.set_event_handler(None, name)
            handlers.pop((bid, name), None)
            return OK
        handler = c_handler(cb, userdata)
        im.set_event_handler(handler, name, on_loop=bool(flags & 1))
        handlers[(bid, name)] = handler
        return OK

    @entry
    def _pim_py_ack(bid, consumer, upto, out_cursor):
        cursor = broker(bid).ack_events(upto, text(consumer, "consumer"))
        if out_cursor != ffi.NULL:
            out_cursor[0] = cursor
        return OK

    @entry
    def _pim_py_delete_consumer(bid, consumer, out_deleted):
        deleted = broker(bid).delete_consumer(text(consumer, "consumer"))
        if out_deleted != ffi.NULL:
            out_deleted[0] = 1 if deleted else 0
        return OK


try:
    from _pimcore_cffi import ffi, lib  # noqa: E402 - the module cffi built
except ImportError:  # pragma: no cover - the module is registered under its name before this runs
    raise
try:
    _pim_glue_main(ffi, lib)
except BaseException as _exc:  # noqa: BLE001 - reported to C as PIM_ERR_INIT
    lib._pim_init_done(0, _pim_c_text("pimcore did not start in the embedded Python: %s: %s" % (type(_exc).__name__, _exc)))
else:
    lib._pim_init_done(1, b"")
