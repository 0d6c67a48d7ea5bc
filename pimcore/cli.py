"""The ``pimcore`` command: serve, token, chat, info, inspect, group, purge, retention."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence, cast

from . import __version__
from .ids import quote_arg

__all__ = ["main"]

#: Exit codes (docs/OPERATIONS.md, "Exit codes"): 0 done; 1 the command as
#: given could not be done now, for a reason outside it (a port in use, a
#: host that does not resolve, a store, broker or HTTP API that cannot be
#: reached, another broker holding the data directory; bench: sends that
#: failed): the same command may work later; 2 refused as given (usage,
#: settings, files, ids, a refusal of the broker): nothing was done, and
#: the same command fails the same way until it is changed.
EXIT_FAILED = 1
EXIT_REFUSED = 2


def _cmd_info(args: argparse.Namespace) -> int:
    import pimcore
    from pimcore import _backend

    info = {
        "version": __version__,
        "backend": pimcore.BACKEND,
        "available_backends": _backend.available(),
        "python": sys.version.split()[0],
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            print(f"{key:20} {value}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Summarise a data directory's LMDB store (:meth:`LmdbStore.summary`)
    and, with ``--user``, users' inboxes and devices.  Takes the data
    directory (as every other command does) or its store/.  Read-only: safe
    next to a running broker (docs/OPERATIONS.md, "Inspecting the store")."""
    from .errors import StoreError
    from .store import LmdbStore
    from .store.lmdb import SCHEMA_VERSION

    from .ids import id_problem

    for user in args.user:  # (as pimcore token: 'a b' printed a zero summary, exit 0)
        problem = id_problem(user, "user")
        if problem is not None:
            print(f"pimcore inspect: {problem}", file=sys.stderr)  # (it names the id and what is wrong)
            return EXIT_REFUSED
    root = Path(args.data_dir)
    path = None
    for candidate in (root / "store", root):
        try:
            if (candidate / "data.mdb").is_file():
                path = candidate
                break
            os.listdir(candidate)  # (is_file() says False for a directory it may not read)
        except PermissionError as exc:
            print(f"pimcore inspect: cannot read {quote_arg(str(candidate))}: {exc.strerror}", file=sys.stderr)
            return EXIT_REFUSED
        except OSError:
            pass
    if path is None:
        try:  # (a Redis node's directory: its data is in Redis -- a new operator's trial)
            redis = (root / _REDIS_NOTE).read_text().split()[0]
        except (OSError, IndexError):
            redis = None
        if redis is not None:
            print(f"pimcore inspect: the broker keeps its data in Redis ({redis}); this command reads the embedded"
                  " LMDB store only: use the HTTP API (docs/HTTP.md) or redis-cli", file=sys.stderr)
            return EXIT_REFUSED
        print(f"pimcore inspect: no pimcore store in {root} (give the data directory of `pimcore serve`,"
              " which holds store/, or that store/ directory)", file=sys.stderr)
        return EXIT_REFUSED
    try:
        store = LmdbStore(str(path), read_only=True)
    except StoreError as exc:
        print(f"pimcore inspect: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    with store:
        try:
            summary = store.summary()
            missing = [key for key, count in summary.entries.items() if count is None]
            if args.user and (missing or summary.schema != SCHEMA_VERSION):
                print(f"pimcore inspect: --user needs a store in this version's format (schema {SCHEMA_VERSION},"
                      f" every table); this one is schema {summary.schema}"
                      + (f" without {', '.join(missing)}" if missing else "")
                      + ": a broker of this version upgrades it when it next opens it (without --user the summary"
                      " works)", file=sys.stderr)
                return EXIT_REFUSED
            users = {user: _inspect_user(store, user) for user in args.user}
        except StoreError as exc:
            print(f"pimcore inspect: {exc}", file=sys.stderr)
            return EXIT_REFUSED
    if args.json:
        print(json.dumps(_inspect_json(summary, users)))
        return 0
    for line in _inspect_lines(summary):
        print(line)
    for user, seen in users.items():
        if not (seen["inbox_head"] or seen["devices"] or seen["conversations"]):
            print(f"user {user}: no such user in this store (no inbox, no devices, no conversations)")
            continue
        print(f"user {user}: inbox head {seen['inbox_head']}, floor {seen['inbox_floor']}")
        for dev in seen["devices"]:
            print(f"  device {dev['device']}: position {dev['position']},"
                  f" last seen {_utc(dev['last_seen']) or 'never'}")
        for conv in seen["conversations"]:
            print(f"  {conv['conversation']}: last seq {conv['last_seq']}, read {conv['read']},"
                  f" unread {conv['unread']}")
    return 0


def _inspect_user(store: Any, user: str) -> dict[str, Any]:
    """``inspect --user``: one user's inbox, devices and conversations."""
    return {
        "inbox_head": store.inbox_head(user),
        "inbox_floor": store.inbox_floor(user),
        "devices": [{"device": d.device, "position": d.position, "last_seen": d.last_seen} for d in store.devices(user)],
        "conversations": [
            {"conversation": conv, "last_seq": store.last_seq(conv), "read": store.read_marker(user, conv),
             "unread": store.unread(user, conv)}
            for conv in store.conversations(user)
        ],
    }


def _utc(us: Optional[int]) -> Optional[str]:
    """Microseconds since the Unix epoch (server time, pimcore.clock) as an
    ISO 8601 UTC date-time, ``2026-12-03T17:26:32.123456Z``; None for None
    or 0 (nothing stored yet) and for a value past year 9999."""
    import datetime

    if not us:
        return None
    try:
        when = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=us)
    except OverflowError:
        return None
    return when.isoformat(timespec="microseconds") + "Z"


def _size(n: int) -> str:
    """Bytes in words: ``512 bytes``, ``1.5 MiB (1572864 bytes)``."""
    if n < 1024:
        return f"{n} bytes"
    value, unit = float(n), "bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit} ({n} bytes)"


def _inspect_json(summary: Any, users: dict[str, Any]) -> dict[str, Any]:
    """``inspect --json``: the summary's fields (docs/OPERATIONS.md lists
    the keys) plus ``last_server_time_utc``, the checkpoint's
    ``checkpoint_written_at_utc`` and ``users`` (``--user``)."""
    import dataclasses

    out = dataclasses.asdict(summary)
    out["epochs"] = list(summary.epochs)
    out["last_server_time_utc"] = _utc(summary.last_server_time)
    if summary.log is not None:
        out["log"]["files"] = [dataclasses.asdict(f) for f in summary.log.files]
        out["log"]["checkpoint_written_at_utc"] = _utc(summary.log.checkpoint_written_at)
    out["users"] = users
    return out


def _inspect_lines(summary: Any) -> list[str]:
    """``inspect`` as text: one figure a line."""
    import time

    from .ids import bytes_readable
    from .store.lmdb import _DB_LABELS, SCHEMA_VERSION

    broker = summary.broker
    if summary.broker_holder:
        broker += f": {summary.broker_holder}"
    elif broker == "unknown":
        broker += " (broker.lock could not be probed without taking it)"
    schema = str(summary.schema)
    if summary.schema is not None and summary.schema < SCHEMA_VERSION:
        schema += f" (older than this code's {SCHEMA_VERSION}: upgraded when a broker next opens it)"
    t = summary.last_server_time
    lines = [
        f"store               {bytes_readable(summary.path)}",
        f"broker              {broker}",
        f"format              schema {schema}",
        f"node id             {summary.node_id}",
        f"last server time    {t} ({_utc(t) or 'nothing stored yet'})",
        f"epoch               {summary.epoch or '(none yet)'}",
        f"trusted epochs      {len(summary.epochs)}" + "".join(f"\n  {e}" for e in summary.epochs),
        f"map size            {_size(summary.map_size)}",
        f"used                {_size(summary.bytes_used)}: {summary.pages_used} pages of {summary.page_size} bytes"
        f" ({100 * summary.bytes_used / summary.map_size:.1f} % of the map)",
        f"data.mdb            {_size(summary.file_size)}",
        f"reader slots        {summary.readers} of {summary.max_readers} used (high-water mark; this inspect's included)",
        f"last transaction    {summary.last_txnid}",
        "entries",
    ]
    words = {key: text for key, text in _DB_LABELS.values()}
    width = max(len(key) for key in summary.entries)
    for key, count in summary.entries.items():
        lines.append(f"  {key:{width}}  {'absent' if count is None else count:>10}  {words[key]}")
    log = summary.log
    if log is None:
        lines.append("command log         none (durability sync or os)")
        return lines
    lines.append(f"command log         {bytes_readable(log.path)}")
    for f in log.files:
        first = f"first record {f.first_lsn}" if f.first_lsn else "unused"
        lines.append(f"  {f.name:16}  {_size(f.size)}, {first}")
    if log.checkpoint_next_lsn is not None:
        age = ""
        if log.checkpoint_written_at is not None:
            age = f", written {_utc(log.checkpoint_written_at)} ({max(0.0, time.time() - log.checkpoint_written_at / 1e6):.1f} s ago)"
        lines.append(f"  checkpoint        LMDB transaction {log.checkpoint_txnid}; replay from record"
                     f" {log.checkpoint_next_lsn} (log-{log.checkpoint_file} at byte {log.checkpoint_offset}){age}")
        lines.append(f"  after checkpoint  {log.records_after_checkpoint} records (replayed by the next start if the"
                     " broker does not stop cleanly)")
    else:
        lines.append("  checkpoint        none")
    if log.problem:
        lines.append(f"  problem           {log.problem}")
    return lines


def start_warnings(config: Any, http_config: Any) -> list[tuple[str, str]]:
    """(event, words) for settings ``serve`` takes but that work against
    each other, said once at start (a trial: they were taken silently):
    ``http_body_small``, an HTTP body limit under one post of the largest
    message (its JSON: the payload in base64), and ``outbound_small``, a
    connection's outbound limit under 4 x max_frame (docs/OPERATIONS.md)."""
    from .http.api import smallest_page_bytes

    out: list[tuple[str, str]] = []
    limits = config.broker.limits
    if http_config is not None:
        post = smallest_page_bytes(limits.max_payload, limits.max_mentions)
        if http_config.max_body_bytes < post:
            out.append(("http_body_small",
                        f"[http] max_body_bytes {http_config.max_body_bytes} is under one post of a max_payload message"
                        f" (about {post} bytes of JSON: its payload in base64): HTTP posts of the largest messages will"
                        f" be refused 413 PAYLOAD_TOO_LARGE; raise it to {post} or more, or lower max_payload"))
    if config.max_outbound_bytes < 4 * limits.max_frame:
        out.append(("outbound_small",
                    f"max_outbound_bytes {config.max_outbound_bytes} is under 4 x max_frame ({4 * limits.max_frame}):"
                    " a connection pushed a few large messages at once may be closed SLOW_CONSUMER; raise it to"
                    f" {4 * limits.max_frame} or more"))
    return out


def _settings(args: argparse.Namespace):  # -> ServeSettings
    from .config import load_settings

    flags: dict[str, Any] = {
        "data_dir": getattr(args, "data_dir", None),
        "secret_file": getattr(args, "secret_file", None),
    }
    for name in ("durability", "cert", "key", "content_filter", "max_frame", "max_payload", "max_mentions", "window", "send_rate",
                 "heartbeat_ms", "idle_timeout", "login_timeout", "max_outbound_bytes", "max_connections", "http", "log_level",
                 "log_format", "store"):
        if hasattr(args, name):
            flags[name] = getattr(args, name)
    if getattr(args, "verbose", False) and not flags.get("log_level"):
        flags["log_level"] = "debug"
    if getattr(args, "listen", None):
        flags["listen"] = args.listen
    return load_settings(getattr(args, "config", None), flags_are_options=True, **flags)


def _check_data_dir(settings) -> None:  # settings: ServeSettings
    """:func:`pimcore.config._check_data_dir`: the data directory's checks
    are the settings' (``pimcore serve``, ``token`` and
    :func:`pimcore.embed.open_pimcore` say the same sentences)."""
    from .config import _check_data_dir as check

    check(settings)


def _secret(settings, *, create: bool = True, announce: Optional[str] = None) -> bytes:  # settings: ServeSettings
    """--secret / [secret] / $PIMCORE_SECRET / --secret-file, else the data
    directory's own (created on first use, mode 0600): :func:`pimcore.config.token_secret`.

    ``create=False`` (``pimcore token`` without ``--create-secret``): a
    missing ``<data_dir>/secret`` is a ValueError saying where it looked,
    not a new secret -- a token signed with a secret the broker does not use
    is refused at login ("signature is invalid"), far from the mistake.
    ``announce`` (a command name): say on stderr that a secret was created."""
    from .auth import SECRET_FILE
    from .config import token_secret

    path = settings.data_dir / SECRET_FILE
    had = path.exists()
    secret = token_secret(settings, create=create)
    if secret is None:
        raise ValueError(
            f"no token secret in {path}: is {settings.data_dir} the data directory of `pimcore serve`?"
            " Run this where the broker keeps its data, name it with --data-dir or --config, or give"
            " the secret with --secret-file or $PIMCORE_SECRET; --create-secret makes a new one there"
            " (then start the broker with that data directory, or it refuses these tokens)"
        )
    if announce and not had and path.exists():
        print(f"pimcore {announce}: created a new token secret in {path}; only a broker started with"
              f" --data-dir {settings.data_dir} accepts these tokens", file=sys.stderr)
    return secret


#: The collector's generation-0 threshold while serving (CPython's default: 700).
#: A committed batch frees everything made for its messages at once (ops,
#: results, frames, acks), so the count of live container objects rises by
#: several thousand per batch and falls again; at 700 that ran a collection
#: (and promoted the batch's objects, to be traversed again) a few times per
#: batch for nothing.  Measured (bench/bench_hotpath.py, 50 x 16): 3.3 µs of
#: collector time per acked send at 700, 0.0-0.2 µs at 10,000-50,000.
GC_THRESHOLD0 = 50_000


#: File descriptors a broker needs besides its connections: the store's files
#: (data, lock, command log, checkpoint), listeners, the event loop's, logs,
#: webhook and Redis connections -- a margin, not a count.
FD_RESERVE = 64


def raise_nofile(need: int) -> Optional[tuple[int, int]]:
    """Raise this process's soft open-files limit (RLIMIT_NOFILE) toward
    ``need`` descriptors, as far as the hard limit allows -- never lower it
    -- as Redis does for its maxclients: many hosts start processes at a soft
    ``ulimit -n`` of 1,024 under a hard limit in the hundreds of thousands.
    Returns ``(old, new)`` soft limits if it raised it, else None (already
    enough, at the hard limit, unlimited, or not POSIX)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= need:
            return None
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if new <= soft:
            return None
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX, or refused
        return None
    return int(soft), int(new)


def nofile_shortfall(max_connections: int, http_max_connections: int = 0, limit: Optional[int] = -1) -> Optional[str]:
    """The start-up warning when the connections the broker may accept, with
    what it needs besides, exceed its open-files limit (RLIMIT_NOFILE, the
    process's soft ``ulimit -n``; ``limit`` -1: read it), else None.  Past the
    limit accept() fails (EMFILE) and new connections wait, unaccepted, until
    some close."""
    from .net.server import nofile_limit

    if limit == -1:
        limit = nofile_limit()
    need = max_connections + http_max_connections + FD_RESERVE
    if limit is None or need <= limit:
        return None
    http = f" + [http] max_connections {http_max_connections}" if http_max_connections else ""
    return (f"max_connections {max_connections}{http} + about {FD_RESERVE} for the store and listeners needs up to"
            f" {need} file descriptors, over this process's open-files limit {limit} (RLIMIT_NOFILE): past it new"
            f" connections wait unaccepted; raise it (ulimit -n {need}, LimitNOFILE= under systemd) or lower"
            " max_connections (--max-connections)")


def _tune_collector() -> None:
    """For the serving process only (an embedding host keeps its own
    settings): freeze what start-up made (modules, config, caches: never
    garbage, no longer traversed by full collections) and raise the
    generation-0 threshold to :data:`GC_THRESHOLD0`.  Cycles are still
    collected, a little later."""
    import gc

    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, g1, g2)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .config import DataDirStart

    start = DataDirStart()
    code = _serve(args, start)
    if code != 0:
        start.undo()
    return code


#: OS errors at start that may pass by themselves (a full disk or quota once
#: space is freed, descriptors or memory taken by others, an I/O error):
#: ``serve`` exits 1 for them, which a supervisor restarts; not 2 ("refused
#: as given": a read-only file system, no permission, a bad setting).
_TRANSIENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM,
                               errno.EAGAIN})
_TRANSIENT_TEXTS = tuple(os.strerror(code) for code in sorted(_TRANSIENT_ERRNOS))


def _transient(exc: BaseException) -> bool:
    """Whether a failed start's error (or one it was raised from or while
    handling: a ValueError or ConfigError saying an OSError in words, a
    StoreError from LMDB's) may pass without a change (exit 1, else 2)."""
    seen: set[int] = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if getattr(cur, "transient", False):
            return True
        if isinstance(cur, OSError):
            if cur.errno in _TRANSIENT_ERRNOS:
                return True
        elif type(cur).__module__ == "lmdb" or type(cur).__module__.startswith("lmdb."):
            # (py-lmdb's errors carry no errno: their text ends with strerror.)
            if any(str(cur).endswith(text) for text in _TRANSIENT_TEXTS):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


def _say(text: str) -> None:
    """One of serve's progress lines on stdout.  A reader that went away (a
    pipe whose other end died: ``| tee`` killed) does not fail the broker:
    the lines after it go nowhere (a new operator's trial: SIGTERM then
    exited 1 on "Broken pipe", so a supervisor saw a failure)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _in_use(settings: Any, holder: str) -> str:
    """serve's refusal of a data directory whose store another broker holds."""
    return (f"pimcore serve: the data directory {settings.data_dir} is in use by {holder}"
            " (it holds store/broker.lock): stop it, or give this one another --data-dir"
            " (pimcore group, purge and retention work next to a running broker, unless its durability"
            " is log)")


def _serve(args: argparse.Namespace, start: Any) -> int:  # start: config.DataDirStart
    import signal

    import trio

    import pimcore

    from ._util import unwrap_single
    from .auth import JwtAuthenticator
    from .config import ConfigError, render_toml, store_refusal
    from .errors import StoreError, StoreInUse
    from .logs import setup_logging
    from .net.server import open_broker_server
    from .store import LmdbStore
    from contextlib import AsyncExitStack
    from typing import Any

    try:
        settings = _settings(args)
        settings.check_listeners()  # (two on one address: refused before anything is made or bound)
        if args.print_config:
            # Effective settings only: nothing is created, opened or imported;
            # but what serve would refuse is refused here too.
            settings.server_config(check_only=True)
            settings.http_endpoint()
            settings.check_tls_used()
            if settings.secret:  # (given as a value; a secret_file is read by serve only)
                from .config import token_secret

                token_secret(settings, create=False)  # too short: refused, as serve does
            print(render_toml(settings.effective()), end="")
            return 0
        start.begin(settings.data_dir)
        setup_logging(settings.log_level, settings.log_format)
        config = settings.server_config()
        if not config.listeners:
            raise ConfigError("nothing to listen on: give at least one listen URL")
        http_ep = settings.http_endpoint()
        web = getattr(args, "web", False)
        if getattr(args, "demo", False) and not web:
            raise ConfigError("--demo needs --web (it lets the web demo page mint tokens)")
        if web and http_ep is None:
            raise ConfigError("--web needs an HTTP listener (--http tcp://HOST:PORT): the page is served there")
        if web and not any(ep.websocket for ep in settings.endpoints()):
            raise ConfigError("--web needs a WebSocket listener (--listen ws://HOST:PORT/): the page talks to it")
        settings.check_tls_used()
        tls = settings.tls_context()
        if tls is not None:
            config = replace(config, ssl_context=tls)
        _check_data_dir(settings)  # (also when the secret is not kept there: the store is)
        secret = _secret(settings)
        auth = JwtAuthenticator(secret)
        webhook = settings.webhook_config()
        http_config = None
        made_key = False
        if http_ep is not None and settings.store is None:
            # In use: said before the API key is made (a refused start left
            # a new api-key behind -- a new operator's trial; the start's
            # take-back leaves a held store's directory alone).
            state, holder = LmdbStore.broker_state(settings.data_dir / "store")
            if state == "running":
                print(_in_use(settings, holder or "another process"), file=sys.stderr)
                return EXIT_FAILED
        if http_ep is not None:
            had_key = (settings.data_dir / "api-key").exists()
            api_keys = settings.load_api_keys()
            http_config = settings.http_config(tls if http_ep.secure else None, api_keys)
            made_key = not settings.api_keys and not had_key  # said once serving (a failed start takes it back)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"pimcore serve: {exc}", file=sys.stderr)
        return EXIT_FAILED if _transient(exc) else EXIT_REFUSED
    store: Any = None
    note = settings.data_dir / _REDIS_NOTE
    if settings.store is None:
        store_dir = settings.data_dir / "store"
        try:
            # (Private, as the secret makes it: without one kept there --
            # $PIMCORE_SECRET -- the store's makedirs made it as a parent,
            # with the umask's mode.)
            settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            store = LmdbStore(store_dir, durability=settings.durability)
        except StoreInUse as exc:
            # The library's hint (owner=False) is for Python embedders.
            print(_in_use(settings, exc.holder), file=sys.stderr)
            return EXIT_FAILED  # (held by another process, as a port in use: it may be free later)
        except StoreError as exc:
            # (A full disk at replay, an I/O error: 1, restartable; a log of
            # another version, a map at its ceiling: 2.)
            print(f"pimcore serve: {exc}", file=sys.stderr)
            return EXIT_FAILED if _transient(exc) else EXIT_REFUSED
        except OSError as exc:  # (a bare "[Errno 30] Read-only file system: 'd/store'")
            print(f"pimcore serve: {store_refusal(settings, exc, store_dir)}", file=sys.stderr)
            return EXIT_FAILED if _transient(exc) else EXIT_REFUSED
        where = f"data in {settings.data_dir.resolve()} (durability {settings.durability})"
    else:
        # A Redis Cluster store (an AsyncStore): opened inside trio below.
        from .embed import mark_redis_data_dir

        try:
            # What `pimcore group/purge/retention --data-dir` here read: this
            # broker's data is in Redis, not in an LMDB store they would open.
            mark_redis_data_dir(settings)
        except ConfigError as exc:
            print(f"pimcore serve: {exc}", file=sys.stderr)
            return 2
        for module in ("coredis", "hiredis"):
            try:
                __import__(module)
            except ImportError:
                print(f"pimcore serve: --store redis://... needs {module}: pip install 'pimcore[redis]'",
                      file=sys.stderr)
                return 2
        where = f"data in {settings.store} (namespace {settings.store_namespace})"

    async def run() -> None:
        nonlocal store
        async with AsyncExitStack() as stack:
            if settings.store is not None:
                from .embed import open_redis_store

                # (One it cannot reach: a StoreError naming the URL and the setting.)
                store = await stack.enter_async_context(open_redis_store(settings))
            await serve()

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_broker_server(store, auth, config) as server, trio.open_nursery() as nursery:
                start.server = server
                from .embed import Pimcore, start_webhooks

                urls = list(server.urls)
                handle = Pimcore(server, store, settings, secret)
                if webhook is not None:
                    await start_webhooks(handle, webhook, nursery)
                if http_config is not None:
                    from .http import BrokerHttp

                    http = BrokerHttp(server, http_config, handle=handle)
                    if web:
                        from .web import register_web

                        register_web(http.router, handle, ws_urls=[u for u in server.urls if u.startswith("ws")],
                                     demo=args.demo, http_url=lambda: http.url)
                    await nursery.start(http.run)
                    assert http.url is not None  # set once listening
                    urls.append(http.url)
                _say(f"pimcore {__version__} ({pimcore.BACKEND} backend), {where}")
                for url in urls:
                    _say(f"listening on {url}")
                if web:
                    _say(f"web demo on {http.url}/web/" + (" (--demo: it mints tokens for ANY user: never expose it)"
                                                            if args.demo else ""))
                start.ready = True
                if settings.store is None:
                    note.unlink(missing_ok=True)  # this data dir is LMDB's again
                if http_config is not None and made_key:
                    import logging

                    path = settings.data_dir / "api-key"
                    logging.getLogger("pimcore.serve").info("created an HTTP API key in %s", path,
                                                             extra={"event": "api_key_created", "path": str(path)})
                http_conns = http_config.max_connections if http_config is not None else 0
                raised = raise_nofile(config.max_connections + http_conns + FD_RESERVE)
                import logging

                if raised is not None:
                    logging.getLogger("pimcore.serve").info(
                        "raised the open-files limit (ulimit -n) from %d to %d for max_connections", *raised,
                        extra={"event": "nofile_raised", "old": raised[0], "new": raised[1]})
                short = nofile_shortfall(config.max_connections, http_conns)
                if short is not None:
                    logging.getLogger("pimcore.serve").warning(short, extra={"event": "nofile_low"})
                for event, said in start_warnings(config, http_config):
                    logging.getLogger("pimcore.serve").warning(said, extra={"event": event})
                cli_key = os.environ.get("PIMCORE_API_KEY", "").strip()
                if http_config is not None and cli_key and cli_key not in api_keys:
                    # (Allowed next to the settings, as the key pimcore's own
                    # --http commands send; an operator who set it for the
                    # broker got 401s and no word why: a trial.)
                    logging.getLogger("pimcore.serve").warning(
                        "$PIMCORE_API_KEY is set, but it is the key pimcore's --http commands send, not one this"
                        " broker takes: they will get 401. Give it in api_keys or $PIMCORE_API_KEYS to accept it",
                        extra={"event": "api_key_not_taken"})
                _say("ready; Ctrl-C to stop")
                _tune_collector()
                async for sig in signals:
                    _say(f"{signal.Signals(sig).name}: shutting down")
                    break
                if http_config is not None:  # long-polls answered (503), streams ended, within request_timeout
                    await http.shutdown()
                nursery.cancel_scope.cancel()  # the HTTP listener and the webhook sender stop first
            # open_broker_server's exit: stop accepting, finish the batch in
            # flight, Close(SHUTDOWN) every connection.
            st = server.statistics()
            _say(f"served {st.accepted} connections: {st.broker.messages_stored} messages stored in {st.broker.batches}"
                 f" batches ({st.broker.duplicates} duplicates, {st.broker.pushes} pushes,"
                 f" {st.commit_seconds:.2f} s committing)")

    try:
        with unwrap_single():
            trio.run(run)
    except KeyboardInterrupt:
        # A second signal while shutting down is redelivered when the signal
        # receiver closes -- after the graceful shutdown already finished.
        pass
    except (OSError, StoreError) as exc:
        print(f"pimcore serve: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if isinstance(store, LmdbStore):
            store.close()
    _say("stopped")
    return 0


def _ttl_arg(text: str) -> object:
    """--ttl: an int of seconds; anything else is handed on as it was
    typed, for _cmd_token to refuse in its one line (token_ttl_problem)."""
    try:
        return int(text)
    except ValueError:
        return text


def _cmd_token(args: argparse.Namespace) -> int:
    from .auth import issue_token
    from .config import ConfigError
    from .embed import token_ttl_problem
    from .ids import id_problem

    for what, value in (("user", args.user), ("device", args.device)):
        problem = None if value is None else id_problem(value, what)
        if problem is not None:
            print(f"pimcore token: invalid {what} id: {problem}", file=sys.stderr)
            return 2
    problem = token_ttl_problem(args.ttl)
    if problem is not None:
        print(f"pimcore token: invalid --ttl: {problem}", file=sys.stderr)
        return 2
    try:
        secret = _secret(_settings(args), create=args.create_secret, announce="token")
        print(issue_token(secret, args.user, args.device, ttl=args.ttl))
    except (ConfigError, ValueError, OSError) as exc:
        print(f"pimcore token: {exc}", file=sys.stderr)
        return 2
    return 0


def _lmdb_only(command: str, settings: Any, instead: str) -> Optional[str]:
    """Why ``command`` cannot work on these settings' store (None: it can):
    it opens the data directory's LMDB store, and a broker on Redis
    (``store.url``) keeps its data elsewhere -- writing a stray LMDB store
    there would report success and change nothing the broker reads."""
    store = settings.store
    if store is None:
        # serve --store on the command line is not in the settings here: the
        # note serve leaves in the data directory says it.
        try:
            store = (settings.data_dir / _REDIS_NOTE).read_text().split()[0]
        except (OSError, IndexError):
            return None
    return (f"pimcore {command}: the broker keeps its data in Redis ({store}); this command works on"
            f" the embedded LMDB store only: {instead}")


def _refusal(command: str, exc: BaseException) -> str:
    """The line for a maintenance command's failure.  A broker with
    durability log is its store's only writer, and the store's refusal
    says to use its HTTP API: the line says how (``--http``)."""
    # (Only the store's refusal, "(use its HTTP API...)": an --http call's
    # own failure may name the HTTP API too, and --http was given then.)
    hint = " -- give --http URL (its HTTP listener) to do this through it" if "use its HTTP API" in str(exc) else ""
    if str(exc).startswith("no store at "):  # (LmdbStore(create=False): the data directory has none)
        hint = ": give the data directory of pimcore serve (--data-dir DIR or --config FILE), or --http URL for a" \
               " running broker"
    return f"pimcore {command}: {exc}{hint}"


#: Left in the data directory by `serve --store redis://...` (URL and
#: namespace); removed by a serve on LMDB there (pimcore.embed.REDIS_NOTE).
_REDIS_NOTE = "redis-store"


def _cmd_group(args: argparse.Namespace) -> int:
    """Group administration through a running broker's HTTP API (--http),
    or on the data directory's LMDB store (works while serve runs, unless
    it runs with durability log: LMDB serialises writers across processes,
    and the broker reads membership from the store on every send)."""
    import time

    from .config import ConfigError
    from .errors import StoreError
    from .store import LmdbStore

    if args.action is None:
        print("pimcore group: give an action: create, add, remove or show (pimcore group ACTION NAME [USER...])",
              file=sys.stderr)
        return 2
    if args.name is None:
        # (argparse said "the following arguments are required: name, USER".)
        print(f"pimcore group: {args.action}: the group name is required (pimcore group {args.action} NAME"
              f"{'' if args.action == 'show' else ' USER...'})", file=sys.stderr)
        return 2
    if args.history_visible and args.action != "create":
        print("pimcore group: --history-visible is for create (a group's history visibility is set when it is"
              " made)", file=sys.stderr)
        return 2
    if args.action in ("add", "remove") and not args.users:
        # (It exited 0 and changed nothing.)
        print(f"pimcore group: {args.action}: give at least one user (pimcore group {args.action} {args.name}"
              " USER...)", file=sys.stderr)
        return 2
    if args.action == "show" and args.users:
        print("pimcore group: show takes no users (it shows the group's members)", file=sys.stderr)
        return 2
    # Ids before anything else: a refused name must not leave a new data
    # directory behind (it made ./pimcore-data, then said "not a group id").
    # (Worded as the broker's HTTP API refuses them: BAD_REQUEST.)
    from .ids import group_problem, id_problem

    problems = [group_problem(args.name)] + [id_problem(user, "user") for user in args.users]
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        what = "not a group id: " if problems[0] is not None else ""
        print(f"pimcore group: BAD_REQUEST: {what}{problem}", file=sys.stderr)
        return 2
    if args.http:
        return _group_over_http(args)
    if args.action == "create" and not args.users:
        from .ids import EMPTY_GROUP

        # (What the broker and its HTTP API answer: the store would take it.)
        print(f"pimcore group: group {quote_arg(args.name)} not changed: {EMPTY_GROUP}", file=sys.stderr)
        return 2
    try:
        settings = _settings(args)
        why = _lmdb_only("group", settings, "use --http (a running node's HTTP API)")
        if why:
            print(why, file=sys.stderr)
            return 2
        new = args.action == "create" and not (settings.data_dir / "store" / "data.mdb").exists()
        try:
            store = LmdbStore(settings.data_dir / "store", create=args.action == "create", owner=False)
        except OSError as exc:
            from .config import store_refusal

            raise store_refusal(settings, exc, settings.data_dir / "store") from None
    except (ConfigError, StoreError, ValueError, OSError) as exc:
        print(_refusal("group", exc), file=sys.stderr)
        return 2
    if new:
        # (Run in the wrong folder, the group would be in a store no broker uses.)
        print(f"pimcore group: no store in {settings.data_dir} yet: created one (a broker uses it if started with"
              f" --data-dir {settings.data_dir})", file=sys.stderr)
    with store:
        before: Sequence[str] = ()
        try:
            if args.action == "create":
                if store.conversation_exists(args.name):
                    print(f"pimcore group: {_group_refused('ALREADY_EXISTS', args.name)}", file=sys.stderr)
                    return 2
                store.create_group(args.name, args.users, time.time_ns() // 1000, history_visible=args.history_visible)
            elif args.action == "add":
                before = store.members(args.name) if store.conversation_exists(args.name) else ()
                store.add_members(args.name, args.users)
            elif args.action == "remove":
                before = store.members(args.name) if store.conversation_exists(args.name) else ()
                store.remove_members(args.name, args.users)
            elif not store.conversation_exists(args.name):
                raise KeyError(args.name)
        except KeyError:
            print(f"pimcore group: {_group_refused('UNKNOWN_CONVERSATION', args.name)}", file=sys.stderr)
            return 2
        except (ValueError, StoreError) as exc:
            print(_refusal("group", exc), file=sys.stderr)
            return 2
        members = store.members(args.name)
        print(_members_line(args.name, members))
        _note_unchanged(args, before)
        if args.action == "show":
            print(_history_line(store.history_visible(args.name)))
    return 0


#: What ``pimcore group`` says of a refusal, by the HTTP API's code: the
#: same sentence on a data directory and over --http.
_GROUP_REFUSED = {
    "UNKNOWN_CONVERSATION": "no group {name} (pimcore group create {arg} USER... makes one)",
    "ALREADY_EXISTS": "group {name} exists already",
}


def _group_refused(code: str, name: str) -> str:
    """:data:`_GROUP_REFUSED`'s sentence for ``code`` of group ``name``
    (quoted as given; as a command-line argument in the hint)."""
    import shlex

    return _GROUP_REFUSED[code].format(name=quote_arg(name), arg=shlex.quote(name))


def _group_refusal(name: str, exc: BaseException) -> str:
    """The line (without ``pimcore group: ``) for a failure of ``group ...
    --http``: a refusal of the broker worded as on the data directory (the
    API's message, without its code, for a BAD_REQUEST -- the store's
    words); anything else as the HTTP call says it."""
    if isinstance(exc, _Refused):
        if exc.code in _GROUP_REFUSED:
            return _group_refused(exc.code, name)
        if exc.code == "BAD_REQUEST":
            return exc.message
    return str(exc)


def _note_unchanged(args: argparse.Namespace, before: Sequence[str]) -> None:
    """After ``group add``/``remove`` did what it was asked: name the users
    it had nothing to do for (already members, not members), on stderr."""
    if args.action not in ("add", "remove"):
        return
    was = set(before)
    users = list(dict.fromkeys(args.users))
    if args.action == "add":
        same = [u for u in users if u in was]
        what = f"already {'a member' if len(same) == 1 else 'members'} of {quote_arg(args.name)}, so not added"
    else:
        same = [u for u in users if u not in was]
        what = f"not {'a member' if len(same) == 1 else 'members'} of {quote_arg(args.name)}, so not removed"
    if same:
        print(f"pimcore group: {what}: {', '.join(same)}", file=sys.stderr)


def _members_line(name: str, members: Sequence[str]) -> str:
    """``team: 2 members: alice bob`` (``club: 1 member: erin``, ``x: 0 members``)."""
    n = len(members)
    return f"{name}: {n} member{'' if n == 1 else 's'}" + (f": {' '.join(members)}" if members else "")


def _history_line(visible: object) -> str:
    """What ``group show`` says of the group's ``history_visible`` (set at
    ``group create --history-visible``)."""
    said = visible if isinstance(visible, str) else "yes" if visible else "no"
    return f"history visible to later members: {said}"


def _group_over_http(args: argparse.Namespace) -> int:
    """``pimcore group ... --http URL``: the same actions through the
    broker's HTTP API (docs/HTTP.md), printing what the LMDB path prints."""
    import urllib.parse

    group = urllib.parse.quote(args.name, safe="")
    before: Sequence[str] = ()
    try:
        if args.action == "create":
            out = _http_call(args, "POST", "/v1/groups",
                             {"conv": args.name, "members": args.users, "history_visible": args.history_visible})
        elif args.action == "add":
            before = _http_call(args, "GET", f"/v1/groups/{group}/members")["members"]
            out = _http_call(args, "POST", f"/v1/groups/{group}/members", {"users": args.users})
        elif args.action == "remove":
            # All in one call: one store op, refused as a whole (a bad id, or
            # no member left) as on the data directory -- nothing removed.
            out = _http_call(args, "POST", f"/v1/groups/{group}/members/remove", {"users": args.users})
            before = [*out["members"], *out["removed"]]
        else:  # show
            out = _http_call(args, "GET", f"/v1/groups/{group}/members")
        members = list(out["members"])
        visible = out.get("history_visible", "unknown (this broker's HTTP API does not say)") \
            if args.action == "show" else None
    except (ValueError, OSError) as exc:
        print(f"pimcore group: {_group_refusal(args.name, exc)}", file=sys.stderr)
        return _exit_code(exc)
    except (KeyError, TypeError):
        print(f"pimcore group: unexpected answer from {args.http} (no member list)", file=sys.stderr)
        return 2
    print(_members_line(args.name, members))
    _note_unchanged(args, before)
    if visible is not None:
        print(_history_line(visible))
    return 0


class _Unreachable(ValueError):
    """:func:`_http_call` could not connect to the HTTP API (nothing
    listening, a host that does not resolve, no connection in time): not
    the command's mistake, so exit 1 (:data:`EXIT_FAILED`)."""


def _exit_code(exc: BaseException) -> int:
    """The exit code of a maintenance command that failed with ``exc``."""
    return EXIT_FAILED if isinstance(exc, _Unreachable) else EXIT_REFUSED


class _Refused(ValueError):
    """The HTTP API refused a call: ``code`` is its error code
    (``UNKNOWN_CONVERSATION``, ``BAD_REQUEST``, ``AUTH_FAILED``...: upper
    case, the broker's ErrorCode names), the exception's text what to print
    (the code and the message), ``message`` the API's message."""

    def __init__(self, code: str, text: str, message: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.message = message or text


#: --http URL schemes of the commands that call the HTTP API.  tcp:// and
#: tls:// -- how serve's settings write its HTTP listener -- are refused with
#: the http:// or https:// URL to give instead: taken as aliases, they made
#: the broker's binary listener (a tcp:// URL too) look like a valid --http.
_HTTP_SCHEMES = {"http": "http", "https": "https"}
_LISTENER_SCHEMES = {"tcp": "http", "tls": "https"}


def _http_base(url: str) -> str:
    """The base URL (``http[s]://HOST[:PORT]``) of an --http URL, or
    ValueError saying what is wrong with it (in a sentence that does not
    repeat a URL holding a user name or password).  HOST:PORT alone is
    http://; only a host and an optional port may follow the scheme (the
    API's paths are its own)."""
    import urllib.parse

    if "@" in url:
        # (Said without the URL: a password there would be echoed.)
        raise ValueError("--http URL: a user name or password in the URL is not supported (the API key goes in"
                         " --api-key or $PIMCORE_API_KEY)")
    if not url or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"--http {quote_arg(url)}: not a URL (http://HOST:PORT or https://HOST:PORT)")
    full = url if "://" in url else "http://" + url
    try:
        parts = urllib.parse.urlsplit(full)
    except ValueError as exc:  # ("Invalid IPv6 URL", without naming the option)
        raise ValueError(f"--http {url}: not a URL ({exc})") from None
    scheme = _HTTP_SCHEMES.get(parts.scheme.lower())
    web = _LISTENER_SCHEMES.get(parts.scheme.lower())
    if web is not None:
        plain = parts.scheme.lower()
        raise ValueError(f"--http {url}: the HTTP API is at an http:// or https:// URL, not {plain}:// (serve's --http"
                         f" {plain}://HOST:PORT is {web}://HOST:PORT here: --http {web}://{parts.netloc})")
    if scheme is None:
        raise ValueError(f"--http {url}: the HTTP API is at an http:// or https:// URL, not {parts.scheme}://")
    if "?" in full or "#" in full:
        raise ValueError(f"--http {url}: give the listener's address without a query or fragment"
                         " (http://HOST:PORT)")
    if parts.path not in ("", "/"):
        raise ValueError(f"--http {url}: give the listener's address without a path (http://HOST:PORT):"
                         " the API's paths are /v1/...")
    if not parts.hostname:
        raise ValueError(f"--http {url}: no host (http://HOST:PORT)")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"--http {url}: the port must be a number 0..65535") from None
    return f"{scheme}://{parts.netloc}"


def _tls_probe(base: str, timeout: float = 5.0) -> Optional[str]:
    """What the server at ``base`` (``http://HOST[:PORT]``) is, if it
    speaks TLS: to say "try https://" when a plain HTTP request got no
    HTTP answer only if an HTTPS request gets one.  None: no TLS;
    "https": an HTTP answer over TLS; "pimcore": a pimcore frame (the
    broker's tls:// listener's Close to a stranger); "tls": TLS, but no
    HTTP answer over it; "alert": a TLS server that refused the handshake
    (no common cipher, a client certificate wanted), which says so in TLS.
    Nothing is verified (it only tells what speaks there); a HEAD request
    is all that is sent."""
    import socket
    import ssl
    import urllib.parse

    from .client import _pimcore_frame_start

    parts = urllib.parse.urlsplit(base)
    host, port = parts.hostname or "", parts.port or 80
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                try:
                    tls.sendall(f"HEAD / HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode("ascii", "replace"))
                    first = b""
                    # 8 bytes tell a frame from HTTP; an HTTP answer is read
                    # on (the broker's listener says what it is, then hangs up).
                    while len(first) < 8 or (first.startswith(b"HTTP/") and len(first) < 2048):
                        more = tls.recv(2048 - len(first))
                        if not more:
                            break
                        first += more
                except (OSError, ValueError):
                    first = first if first.startswith(b"HTTP/") else b""
    except ssl.SSLError as exc:
        return "alert" if "ALERT" in str(exc.reason or "") else None
    except (OSError, ValueError):
        return None
    if first.startswith(b"HTTP/"):
        # The broker's tls:// listener answers an HTTP request in words
        # (BrokerServer._http_at_stream): it is no HTTPS API.
        return "pimcore" if b"this is the pimcore broker's tls:// listener" in first else "https"
    return "pimcore" if _pimcore_frame_start(first) else "tls"


def _first_line(text: str, limit: int = 200) -> str:
    """The first non-blank line of ``text`` (another server's words), cut
    at ``limit`` characters and with what is not printable escaped (no
    terminal escapes from a stranger); "" if there is none."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    cut = len(line) > limit
    said = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in line[:limit])
    return said + ("..." if cut else "")


#: Seconds :func:`_http_call` waits to connect, and then for each part of
#: the answer.  Most admin calls (one store operation) are answered well
#: within a second, but some are long: a group of 300,000 members took 4 s
#: to create, and purging a user with a large history is one commit of all
#: of it.  Said as "no answer" too early, such a call may still complete on
#: the broker while its caller believes it failed; so the wait stays
#: urlopen's 30 s, and a port that accepts and never answers (another
#: service waiting for its own protocol's first bytes, a stuck process) is
#: said in words, naming the URL and the wait, not a bare "timed out".
#: (Tests make it short.)
_HTTP_TIMEOUT = 30.0


def _http_call(args: argparse.Namespace, method: str, path: str, body: Optional[dict] = None) -> dict:
    """One call of the HTTP server API at ``args.http`` (docs/HTTP.md);
    the API key from --api-key, $PIMCORE_API_KEY or <data-dir>/api-key;
    an https:// API's certificate verified with --cafile's CAs if given,
    else the system's.  ValueError with the server's message if it
    refuses (a :class:`_Refused` carrying the API's error code)."""
    import os
    import http.client
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request
    from pathlib import Path

    from .auth import read_kept_secret
    from .config import API_KEY_FILE

    key = args.api_key or os.environ.get("PIMCORE_API_KEY")
    source = "--api-key" if args.api_key else "$PIMCORE_API_KEY"
    bad = next((c for c in key or "" if not (" " <= c <= "~")), None)
    if bad is not None:
        # (An HTTP header cannot carry it: urllib's "'latin-1' codec can't
        # encode character '\udcff'".)
        given = "--api-key" if args.api_key else "$PIMCORE_API_KEY"
        raise ValueError(f"{given}: an API key is printable ASCII (an HTTP header carries it), and this one has"
                         f" the character {quote_arg(bad)}")
    if not key:
        if args.data_dir == "":  # (as serve refuses it: not ./pimcore-data, silently)
            raise ValueError("--data-dir: cannot be empty")
        data_dir = Path(args.data_dir or "pimcore-data")
        try:
            key = read_kept_secret(data_dir, API_KEY_FILE).decode()
            source = f"the file {data_dir / API_KEY_FILE}"
        except FileNotFoundError:
            raise ValueError(f"no API key: give --api-key or $PIMCORE_API_KEY (none in {data_dir / API_KEY_FILE})") from None
    base = _http_base(args.http)
    context = None
    cafile = getattr(args, "cafile", None)
    if cafile is not None:
        if not base.lower().startswith("https://"):
            raise ValueError(f"--cafile is for an https:// API, not {base}")
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"--cafile {cafile}: cannot load it as a PEM CA bundle: {why}") from None
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=_HTTP_TIMEOUT, context=context) as resp:
            return json.loads(resp.read() or b"{}")
    except TimeoutError:  # (connected and sent: the answer did not come)
        raise ValueError(f"no answer from {base} within {_HTTP_TIMEOUT:g} s: is it pimcore's HTTP API"
                         " (serve --http)?") from None
    except urllib.error.HTTPError as exc:
        try:
            raw = exc.read(64 * 1024)
        except (OSError, http.client.HTTPException):
            raw = b""
        try:
            err = json.loads(raw)["error"]
            code, message = str(err["code"]), str(err["message"])
            # (An older broker's messages hold the code already.)
            why = message if code in message else f"{code}: {message}"
            if exc.code == 401:  # (which key: it said only "the API key is not valid")
                said = f" (the key from {source}; the broker's keys: its api_keys setting or <data_dir>/api-key)"
                why, message = why + said, message + said
        except (ValueError, KeyError, TypeError):  # (not the API's JSON error: a proxy's page...)
            # A short plain-text answer says whose it is (the broker's
            # ws:// listener names itself): its first line.  Not HTML.
            said = ""
            if exc.headers is not None and exc.headers.get_content_type() == "text/plain":
                said = _first_line(raw.decode("utf-8", "replace"))
                # The broker's tcp:// or tls:// listener answers an HTTP
                # request so (BrokerServer._http_at_stream): say what to use.
                binary = re.match(r"this is the pimcore broker's (tcp|tls):// listener", said)
                if binary is not None:
                    _not_the_api(base, binary.group(1) == "tls")
            raise ValueError(f"HTTP {exc.code} from {base}" + (f": {said}" if said else "")) from None
        raise _Refused(code, why, message) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            fix = (f"is --cafile {cafile} the CA that signed it?" if cafile is not None else
                   "give --cafile PATH, the PEM CA bundle that signed it (e.g. for a self-signed certificate)")
            raise ValueError(f"the certificate of {base} did not verify"
                             f" ({exc.reason.verify_message or exc.reason}): {fix}") from None
        if isinstance(exc.reason, ssl.SSLError) and exc.reason.reason == "WRONG_VERSION_NUMBER" \
                and base.startswith("https://"):
            # (It was "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)".)
            raise ValueError(f"cannot use {base}: the server does not speak TLS: try"
                             f" http://{base[len('https://'):]}") from None
        if isinstance(exc.reason, TimeoutError):  # (connecting, or sending the request)
            raise _Unreachable(f"cannot reach {base}: no connection within {_HTTP_TIMEOUT:g} s") from None
        raise _Unreachable(f"cannot reach {base}: {_in_words(exc.reason)}") from None
    except ssl.SSLCertVerificationError as exc:  # (not wrapped in a URLError)
        raise ValueError(f"the certificate of {base} did not verify ({exc.verify_message or exc}): give --cafile"
                         " PATH, the PEM CA bundle that signed it") from None
    except (http.client.HTTPException, ConnectionError) as exc:
        # Something that does not speak HTTP answered: an https:// listener
        # asked in plain HTTP (it closes, resets or answers with a TLS
        # alert), or e.g. the broker's own tcp:// listener given instead of
        # its HTTP one (both are tcp:// URLs).
        # (BadStatusLine's line: what came, read as Latin-1; typeshed lacks it.)
        line = str(getattr(exc, "line", "")) if isinstance(exc, http.client.BadStatusLine) else ""
        if line and not isinstance(exc, http.client.RemoteDisconnected):
            from .client import _pimcore_frame_start

            first = line.encode("latin-1", "replace")
            if _pimcore_frame_start(first):  # the broker's Close to a stranger (UNSUPPORTED_VERSION)
                _not_the_api(base, base.startswith("https://"))
        probe = _tls_probe(base) if base.startswith("http://") else None
        if probe == "pimcore":  # (its TLS alert to the plain request, then its Close over TLS)
            _not_the_api(base, True)
        if probe in ("https", "alert"):
            raise ValueError(f"cannot use {base}: the server speaks TLS: try https://{base[len('http://'):]}") from None
        if probe == "tls":
            raise ValueError(f"cannot use {base}: the server speaks TLS, but gave no HTTP answer over it either (is this"
                             " the --http listener?)") from None
        if isinstance(exc, http.client.RemoteDisconnected):
            what = "it closed the connection without an answer"
        elif isinstance(exc, http.client.BadStatusLine):
            said = _first_line(line)
            what = f'it answered "{said}"' if said else "its answer was no HTTP status line"
        elif isinstance(exc, ConnectionResetError):
            what = "it reset the connection"
        else:
            what = _first_line(str(exc)) or type(exc).__name__
        raise ValueError(f"cannot use {base}: not an HTTP server (is this the --http listener?): {what}") from None


def _not_the_api(base: str, tls: bool) -> NoReturn:
    """Refuse ``base``: a pimcore tcp:// (``tls``: tls://) broker listener."""
    raise ValueError(f"cannot use {base}: it is a pimcore {'tls' if tls else 'tcp'}:// broker listener,"
                     " not the HTTP API: use the --http URL `pimcore serve` prints as 'listening on"
                     f" http://...'{' (or https://...)' if tls else ''}") from None


def _cmd_purge(args: argparse.Namespace) -> int:
    """Purge a conversation or a user: through a running broker's HTTP API
    (--http: live sessions of a purged user are closed), or on the data
    directory's LMDB store (a stopped broker; next to a running one it
    works too, but its connected devices are not closed until they log in
    again)."""
    import time
    import urllib.parse

    from .config import ConfigError
    from .errors import StoreError
    from .ids import conversation_problem, id_problem

    problem = conversation_problem(args.id) if args.what == "conversation" else id_problem(args.id, "user")
    if problem is not None:
        print(f"pimcore purge: {problem}", file=sys.stderr)
        return 2
    try:
        if args.http:
            quoted = urllib.parse.quote(args.id, safe="")
            path = f"/v1/conversations/{quoted}" if args.what == "conversation" else f"/v1/users/{quoted}"
            out = _http_call(args, "DELETE", path)
        else:
            from .store import LmdbStore, PurgeConversation, PurgeUser, Purged, WriteBatch

            settings = _settings(args)
            why = _lmdb_only("purge", settings, "use --http (a running node's HTTP API)")
            if why:
                print(why, file=sys.stderr)
                return 2
            with LmdbStore(settings.data_dir / "store", create=False, owner=False) as store:
                op = PurgeConversation(args.id) if args.what == "conversation" else PurgeUser(
                    args.id, max(time.time_ns() // 1000, store.last_server_time() + 1))
                [res] = store.commit(WriteBatch(0, (op,)))
            if not isinstance(res, Purged):
                raise ValueError(f"refused: {getattr(res, 'code', res)}")
            out = {args.what if args.what == "user" else "conv": args.id, "messages": res.messages,
                   "entries": res.entries}
            if args.what == "user":
                out.update(devices=res.devices, left=[c.conv for c in res.changes])
    except (ConfigError, StoreError, ValueError, OSError) as exc:
        print(_refusal("purge", exc), file=sys.stderr)
        return _exit_code(exc)
    print(json.dumps(out) if args.json else _purged_line(out))
    return 0


def _count(n: int, what: str) -> str:
    """``1 inbox entry``, ``0 devices``."""
    plural = {"entry": "entries", "inbox entry": "inbox entries"}.get(what, what + "s")
    return f"{n} {what if n == 1 else plural}"


def _purged_line(out: dict) -> str:
    """What ``pimcore purge`` prints (its --json: the HTTP API's object):
    ``team: 3 entries and 5 inbox entries removed``, ``bob: 2 messages
    tombstoned, 4 inbox entries and 1 device removed; left 1 group: team``."""
    if "user" in out:
        left = list(out.get("left", ()))
        line = (f"{out['user']}: {_count(out['messages'], 'message')} tombstoned, {_count(out['entries'], 'inbox entry')}"
                f" and {_count(out.get('devices', 0), 'device')} removed")
        return line + (f"; left {_count(len(left), 'group')}: {' '.join(left)}" if left else "")
    return f"{out['conv']}: {_count(out['messages'], 'entry')} and {_count(out['entries'], 'inbox entry')} removed"


def _in_words(reason: Any) -> str:
    """A URLError's reason as chat says it ("connection refused"), not
    "[Errno 111] Connection refused"."""
    import socket

    if isinstance(reason, OSError) and reason.errno is not None and reason.strerror:
        text = reason.strerror if isinstance(reason, socket.gaierror) or reason.errno <= 0 else os.strerror(reason.errno)
        return text[:1].lower() + text[1:]
    return str(reason)


def _retention_line(out: dict) -> str:
    """What ``pimcore retention`` prints (its --json: the HTTP API's object):
    ``team: max age 90 s, max count no limit, history floor 12`` (a field
    the conversation does not set: "the broker default")."""
    from decimal import Decimal

    def said(value: Any, unit: str = "") -> str:
        if value is None:
            return "the broker default"
        if value == 0:
            return "no limit"
        # (Exact and in full: 30 days was "2.592e+06 s".)
        return f"{Decimal(value) / 1_000_000:f} s" if unit == "s" else str(value)

    return (f"{out['conv']}: max age {said(out.get('max_age'), 's')}, max count {said(out.get('max_count'))},"
            f" history floor {out.get('floor')}")


def _cmd_retention(args: argparse.Namespace) -> int:
    """Show or set a conversation's history retention (HTTP API with
    --http, else the data directory's LMDB store)."""
    import urllib.parse

    from .config import ConfigError
    from .errors import StoreError
    from .ids import conversation_problem

    problem = conversation_problem(args.conv)
    if problem is not None:
        print(f"pimcore retention: {problem}", file=sys.stderr)
        return 2
    change = args.default or args.max_age is not None or args.max_count is not None
    given = "--max-age" if args.max_age is not None else "--max-count" if args.max_count is not None else None
    if args.default and given is not None:
        # (It was ignored: the limit given was set.)
        print(f"pimcore retention: --default puts both limits back to the broker default: give it alone, or {given}"
              " alone (the other limit then follows the default)", file=sys.stderr)
        return 2
    if args.max_age is not None and not (math.isfinite(args.max_age) and args.max_age * 1_000_000 < 2**63):
        print(f"pimcore retention: --max-age must be a number of seconds below {2**63 // 1_000_000}, not"
              f" {args.max_age}", file=sys.stderr)
        return 2
    # (The sign is checked on the value given: clamped first, -5 was 0, "no limit".)
    if (args.max_age is not None and args.max_age < 0) or (args.max_count is not None and args.max_count < 0):
        print("pimcore retention: --max-age and --max-count must be >= 0 (0: no limit)", file=sys.stderr)
        return 2
    # (The store refused a count past 64 bits with only "refused: BAD_REQUEST".)
    if args.max_count is not None and args.max_count > 2**63 - 1:
        print(f"pimcore retention: --max-count must be at most 2^63-1 ({2**63 - 1}; 0: no limit), not"
              f" {args.max_count}", file=sys.stderr)
        return 2
    # (µs; a positive age below 1 µs is 1 µs, not 0 -- which means no limit.)
    age = None if args.max_age is None else max(int(args.max_age * 1_000_000), 1 if args.max_age > 0 else 0)
    # (The store and the API answer a read of any well-formed id: the
    # defaults, floor 0 -- as if a group never created existed.)
    no_such = ValueError(f"no such conversation {quote_arg(args.conv)} (UNKNOWN_CONVERSATION): no group has that id"
                         " (pimcore group create makes one; a purged group is gone until created again)")
    try:
        if args.http:
            quoted = urllib.parse.quote(args.conv, safe="")
            path = f"/v1/conversations/{quoted}/retention"
            try:
                if not change:
                    _http_call(args, "GET", f"/v1/groups/{quoted}/members")  # 404 if it does not exist
                out = _http_call(args, "PUT", path, {"max_age": age, "max_count": args.max_count}) if change else \
                    _http_call(args, "GET", path)
            except _Refused as exc:
                if exc.code == "UNKNOWN_CONVERSATION":
                    raise no_such from None
                raise
        else:
            from .store import LmdbStore, Rejected, SetRetention, WriteBatch

            settings = _settings(args)
            why = _lmdb_only("retention", settings, "use --http (a running node's HTTP API)")
            if why:
                print(why, file=sys.stderr)
                return 2
            with LmdbStore(settings.data_dir / "store", create=False, owner=False) as store:
                if not store.conversation_exists(args.conv):
                    raise no_such
                if change:
                    [res] = store.commit(WriteBatch(0, (SetRetention(
                        args.conv, -1 if age is None else age, -1 if args.max_count is None else args.max_count),)))
                    if isinstance(res, Rejected):
                        raise ValueError(f"refused: {res.code.name}")
                state = store.retention(args.conv)
            out = {"conv": args.conv, "max_age": None if state.max_age < 0 else state.max_age,
                   "max_count": None if state.max_count < 0 else state.max_count, "floor": state.floor}
    except (ConfigError, StoreError, ValueError, OSError) as exc:
        print(_refusal("retention", exc), file=sys.stderr)
        return _exit_code(exc)
    print(json.dumps(out) if args.json else _retention_line(out))
    return 0


#: Alternating rounds of ``pimcore bench --compare`` when --rounds is not given.
DEFAULT_COMPARE_ROUNDS = 3

#: The largest --group pimcore bench builds (its member list is in memory).
MAX_BENCH_GROUP = 1_000_000


def _bench_flags_problem(args: argparse.Namespace) -> Optional[str]:
    """What is meaningless in bench's numeric flags as given, naming the
    flag; None if nothing.  ``--group 0`` ran a 1:1 benchmark silently (0
    read as "no --group"), ``--duration nan`` never ended and ``--duration
    inf`` or ``--warmup nan`` measured nothing; the others were refused by
    BenchConfig's field names (``window must be >= 1``), not the flags'."""
    checks = [
        ("--group", args.group, args.group is None or args.group >= 2,
         "a group has at least 2 members (the senders are members)"),
        ("--group", args.group, args.group is None or args.group >= args.conns,
         f"must be >= --conns ({args.conns}): the senders are members"),
        ("--conns", args.conns, args.conns >= 0, "must be >= 0 (0: only the --idle connections)"),
        ("--idle", args.idle, args.idle >= 0, "must be >= 0"),
        ("--conns", args.conns, args.conns > 0 or args.idle > 0, "0 needs --idle N (then only idle connections are held)"),
        ("--window", args.window, args.window >= 1, "must be >= 1 (SendReqs in flight per connection)"),
        ("--size", args.size, args.size >= 8, "must be >= 8 bytes (the payload carries an 8-byte send timestamp)"),
        ("--count", args.count, args.count is None or args.count >= 1, "must be >= 1"),
        # (A connection given no message ran until the clock stopped, which
        # with --count it never does: the run never ended and its broker
        # filled /tmp -- a new user's trial.)
        ("--count", args.count, args.count is None or args.count >= args.conns,
         f"must be >= --conns ({args.conns}): each connection sends at least one"),
        # (Its member list is built in memory: --group 100000000 took 4.8 GB
        # in 12 s and printed nothing -- a new user's trial.)
        ("--group", args.group, args.group is None or args.group <= MAX_BENCH_GROUP,
         f"must be at most {MAX_BENCH_GROUP:,} members"),
        ("--procs", args.procs, args.procs <= max(1, min(64, args.conns + args.idle)),
         f"must be at most the connections ({args.conns + args.idle}) and 64: each is a generator process"),
        ("--duration", args.duration, math.isfinite(args.duration) and args.duration > 0, "must be a number of seconds > 0"),
        ("--warmup", args.warmup, math.isfinite(args.warmup) and args.warmup >= 0, "must be a number of seconds >= 0"),
        ("--hold", args.hold, math.isfinite(args.hold) and args.hold >= 0, "must be a number of seconds >= 0"),
        ("--procs", args.procs, args.procs >= 1, "must be >= 1"),
        # (--rounds without --compare ran one run and said nothing of the
        # rounds asked for -- a new user's trial: "given" is told by its
        # default, None; --compare alone takes 3.)
        ("--rounds", args.rounds, args.rounds is None or args.compare is not None,
         "takes effect only with --compare (a single run has no rounds)"),
        ("--rounds", args.rounds, args.rounds is None or args.rounds >= 1, "must be >= 1"),
    ]
    for flag, value, ok, rule in checks:
        if not ok:
            return f"{flag} {value:g}: {rule}" if isinstance(value, float) else f"{flag} {value}: {rule}"
    return None


#: -c/--conns and -w/--window of pimcore bench when neither they nor --shape are given.
DEFAULT_BENCH_CONNS = 50
DEFAULT_BENCH_WINDOW = 16


def _bench_shape(args: argparse.Namespace, shapes: dict[str, tuple[int, int, bool]]) -> Optional[str]:
    """Fill ``args.conns``, ``args.window`` and ``args.offline`` from
    --shape, or -c/-w's defaults without one; what conflicts, naming both
    flags, or None.  A shape silently overrode -c/-w given with it (``--shape
    1x1 -c 8`` ran one connection -- a new user's trial): -c/-w default to
    None so that given can be told from not given, and one that says what
    the shape says is accepted."""
    if not args.shape:
        args.conns = DEFAULT_BENCH_CONNS if args.conns is None else args.conns
        args.window = DEFAULT_BENCH_WINDOW if args.window is None else args.window
        return None
    conns, window, online = shapes[args.shape]
    if args.group is not None:  # (a group run ignored the shape's layout -- a new user's trial)
        return (f"--shape {args.shape} is a shape of 1:1 chats: it conflicts with --group {args.group} (drop one"
                f" of them; a group run takes -c and -w)")
    for flag, given, want in (("--conns", args.conns, conns), ("--window", args.window, window)):
        if given is not None and given != want:
            return (f"--shape {args.shape} is {conns} connection(s) x {window} in flight: it conflicts with"
                    f" {flag} {given} (drop one of them)")
    if online and args.offline:  # (--offline with an offline shape says what it says)
        return (f"--shape {args.shape} has a recipient online acking every push: it conflicts with --offline"
                f" (drop one of them)")
    args.conns, args.window, args.offline = conns, window, not online
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    import os

    from .loadgen import (SHAPES, BenchConfig, BenchError, BenchRunFailed, BenchUnreachable, broker_environment,
                          format_compare, plot_histograms, print_result, run_bench, run_compare)

    problem = _bench_shape(args, SHAPES)
    if problem is not None:
        print(f"pimcore bench: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    problem = _bench_flags_problem(args)
    if problem is not None:
        print(f"pimcore bench: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    if args.compare and args.rounds is None:
        args.rounds = DEFAULT_COMPARE_ROUNDS
    secret = args.secret or os.environ.get("PIMCORE_SECRET") or None
    if secret is not None:
        from .auth import MIN_SECRET_BYTES
        from .config import n_bytes

        size = len(secret.encode())
        if size < MIN_SECRET_BYTES:  # (said as serve says it: where it came from)
            where = "--secret" if args.secret else "$PIMCORE_SECRET"
            print(f"pimcore bench: the token secret from {where} is {n_bytes(size)}; it must be at least"
                  f" {MIN_SECRET_BYTES}", file=sys.stderr)
            return EXIT_REFUSED
    import signal

    def _on_sigterm(signum: int, frame: object) -> None:
        # SIGTERM (timeout, a CI's cancel) killed the bench and left its
        # broker's data directory in /tmp, growing (a new user's trial): it
        # unwinds as Ctrl-C does, through the runs' cleanup.  SIGHUP (the
        # terminal closed, an ssh session dropped) left /tmp/pimcore-bench-*
        # and /tmp/pimcore-loadgen-* behind: the same.
        raise KeyboardInterrupt

    before_term = signal.signal(signal.SIGTERM, _on_sigterm)
    before_hup = signal.getsignal(signal.SIGHUP)
    if before_hup != signal.SIG_IGN:  # (under nohup it stays ignored: the run goes on)
        signal.signal(signal.SIGHUP, _on_sigterm)
    try:
        cfg = BenchConfig(
            url=",".join(args.url) if args.url else None,
            secret=secret,
            data_dir=args.data_dir,
            store=args.store or (os.environ.get("PIMCORE_STORE") if args.url and args.group is not None else None) or None,
            namespace=args.namespace or os.environ.get("PIMCORE_STORE_NAMESPACE") or "pim",
            conns=args.conns,
            window=args.window,
            size=args.size,
            count=args.count,
            duration=args.duration,
            warmup=args.warmup,
            mode="group" if args.group is not None else "direct",
            group_size=args.group or 1000,
            online=not args.offline,
            idle=args.idle,
            hold=args.hold,
            procs=args.procs,
            durability=args.durability,
            backend=args.backend,
            pin=not args.no_pin,
            zstd=args.zstd,
            progress=not args.no_progress and sys.stderr.isatty(),
            generator=args.generator,
        )
        if cfg.url is None:
            # (Its own broker takes no setting from the caller's environment:
            # an operator's $PIMCORE_WEBHOOKS_URL got the bench's traffic.)
            _, dropped = broker_environment(cfg)
            if dropped:
                print(f"pimcore bench: ignored from the environment: {', '.join(dropped)} (the bench's broker is its"
                      " own)", file=sys.stderr)
        if args.compare:
            import json

            last: dict[str, object] = {}

            def on_round(i: int, name: str, res: object) -> None:
                last[name] = res
                if cfg.progress:
                    print(f"round {i + 1}/{args.rounds}: {name} done", file=sys.stderr)

            report = run_compare(cfg, args.compare, args.rounds, on_round)
            if args.plot and "pimcore" in last:
                plot_histograms(last["pimcore"], args.plot)  # type: ignore[arg-type]
            print(json.dumps(report, indent=2) if args.json else format_compare(report))
            return 1 if any(r[n]["errors"] for r in report["rounds"] for n in r) else 0
        res = run_bench(cfg)
        if args.plot:
            plot_histograms(res, args.plot)
    except (ValueError, BenchError, OSError) as exc:
        print(f"pimcore bench: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, (BenchUnreachable, BenchRunFailed)) else EXIT_REFUSED
    except KeyboardInterrupt:
        # (Ctrl-C, or SIGTERM/SIGHUP as _on_sigterm turns it: the runs' own cleanup
        # ran -- brokers stopped, data directories removed -- on the way out.)
        print("pimcore bench: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, before_term)
        if before_hup is not None:
            signal.signal(signal.SIGHUP, before_hup)
    print_result(res, args.json)
    return 1 if res.errors or res.failed else 0  # (failed: the broker it started died part-way)


def _cmd_chat(args: argparse.Namespace) -> int:
    from .chat import run_chat

    return run_chat(args)


def _http_flags(p: argparse.ArgumentParser) -> None:
    """--http, --api-key and --cafile: of every command that can work
    through a running broker's HTTP API (:func:`_http_call`)."""
    p.add_argument("--http", metavar="URL", help="the broker's HTTP listener, e.g. http://127.0.0.1:7481")
    p.add_argument("--api-key", help="HTTP API key (default $PIMCORE_API_KEY, else <data-dir>/api-key)")
    p.add_argument("--cafile", metavar="PATH",
                   help="with an https:// --http URL: PEM CA bundle to verify the API's certificate with (e.g. the"
                        " CA of a self-signed one; default: the system's CAs)")


def _http_flags_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the --http flags (:func:`_http_flags`) as given,
    found before anything is opened or connected; None if nothing."""
    if args.cafile == "":
        return "--cafile: the path is empty"
    if args.cafile is not None and args.http is None:
        # (It was ignored: the data directory's store was used, verifying nothing.)
        return "--cafile is for an https:// API given with --http URL"
    if args.http is not None:
        try:
            _http_base(args.http)
        except ValueError as exc:
            return str(exc)
    return None


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusals are one line, ``pimcore COMMAND:
    WHAT (pimcore COMMAND --help)``, exit 2 (docs/OPERATIONS.md, "Exit
    codes": argparse printed its whole usage block first), and show a byte
    of an argument that is not UTF-8 as ``\\xff`` (ids.quote_arg), not
    Python's ``'\\udcff'``."""

    def error(self, message: str) -> NoReturn:
        from .ids import bytes_readable

        self.exit(2, f"{self.prog}: {bytes_readable(message)} ({self.prog} --help)\n")


class _SubcommandParser(_Parser):
    """A subcommand's parser; with ``intermixed`` set its options may come
    between its positionals (``group create vis --history-visible alice
    bob``: plain argparse ends the USER list at the option and refuses
    what follows).  Subcommands without it parse as argparse does."""

    intermixed = False
    _mixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        if not self.intermixed or self._mixing:
            return super().parse_known_args(args, namespace)
        # (parse_known_intermixed_args calls parse_known_args itself, twice.)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pimcore", description="pimcore instant-messaging broker core",
        epilog="exit codes: 0 done; 1 could not be done now, for a reason outside the command (a port in use, a"
               " store, broker or HTTP API that cannot be reached): it may work later; 2 refused as given (usage,"
               " settings, files, ids, a refusal of the broker): nothing done (docs/OPERATIONS.md, Exit codes)")
    parser.add_argument("--version", action="version", version=f"pimcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_SubcommandParser)

    p = sub.add_parser("serve", help="run the broker (TCP on 127.0.0.1:7400, LMDB in ./pimcore-data by default)")
    p.add_argument("--config", help="TOML configuration file (see pimcore.config)")
    p.add_argument("--data-dir", help="data directory: LMDB store and generated secret (default ./pimcore-data)")
    p.add_argument("--listen", action="append", metavar="URL",
                   help="tcp://, tls://, ws:// or wss://host:port[/path]; repeatable (default tcp://127.0.0.1:7400)")
    p.add_argument("--cert", help="PEM certificate chain for tls:// and wss://")
    p.add_argument("--key", help="PEM private key for tls:// and wss://")
    p.add_argument("--secret-file", help="file holding the token secret (default: <data-dir>/secret)")
    p.add_argument("--durability", choices=["sync", "log", "os"],
                   help="sync = LMDB flushes every batch before acking (default); log = a command log flushed"
                        " once per batch before acking; os = no flush (docs/OPERATIONS.md)")
    p.add_argument("--store", metavar="URL",
                   help="redis://HOST:PORT[,HOST:PORT...]: keep the data in a Redis Cluster instead of the embedded"
                        " LMDB store (needs coredis: pip install 'pimcore[redis]')")
    p.add_argument("--content-filter", metavar="MODULE:FUNCTION",
                   help="content-security hook f(user, conv, payload) -> None, or a reason to reject")
    p.add_argument("--max-frame", type=int, help="largest frame in bytes (default 1 MiB): larger closes the connection")
    p.add_argument("--max-payload", type=int, help="largest message payload in bytes (default 64 KiB): larger is refused")
    p.add_argument("--max-mentions", type=int,
                   help="users one message may mention (default 64); --max-frame must leave 728 bytes plus 65 per"
                        " mention above --max-payload (refused at start otherwise)")
    p.add_argument("--window", type=int, help="SendReqs in flight per connection")
    p.add_argument("--send-rate", type=float, help="sustained SendReqs/s per connection (0 = unlimited)")
    p.add_argument("--heartbeat-ms", type=int, help="announced to clients: they Ping when idle this long, ms (default 15000)")
    p.add_argument("--idle-timeout", type=float, help="seconds of silence before a connection is dropped")
    p.add_argument("--login-timeout", type=float,
                   help="seconds a new connection has to log in (and on ws://, wss:// to finish its handshakes)"
                        " before it is closed (default 10)")
    p.add_argument("--max-outbound-bytes", type=int, help="queued bytes for a slow reader before it is dropped")
    p.add_argument("--max-connections", type=int, help="connections accepted at once (default 100000)")
    p.add_argument("--http", metavar="URL",
                   help="HTTP listener (health, metrics, server API): tcp://HOST:PORT or tls://HOST:PORT (--cert/--key)")
    p.add_argument("--web", action="store_true",
                   help="serve the web chat demo at /web/ on the --http listener (it talks to a ws:// listener)")
    p.add_argument("--demo", action="store_true",
                   help="with --web: the page mints tokens for ANY user and creates groups (demos only, never in production)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--log-format", choices=["text", "json"], help="json: one object per line (default text)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings (flags > PIMCORE_* environment > file > defaults) as TOML and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="same as --log-level debug")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("token", help="print a signed token for a user (and device)")
    p.add_argument("--user", required=True, help="the user the token logs in as (a user id, e.g. alice)")
    p.add_argument("--device", help="bind the token to this device")
    p.add_argument("--ttl", type=_ttl_arg, default=24 * 3600, help="validity in whole seconds, up to 366 days (default 1 day)")
    p.add_argument("--config", help="the serve configuration file (for its secret)")
    p.add_argument("--data-dir", help="the serve data directory (default ./pimcore-data)")
    p.add_argument("--secret-file", metavar="PATH",
                   help="the file of the secret to sign with (default: the data directory's secret)")
    p.add_argument("--create-secret", action="store_true",
                   help="create <data-dir>/secret if there is none (default: refuse, exit 2; the broker must then use"
                        " that data directory)")
    p.set_defaults(func=_cmd_token)

    p = sub.add_parser("group", help="create a group, add or remove members, show them",
                       usage="pimcore group [options] {create,add,remove,show} NAME [USER ...]",
                       description="Through a running broker's HTTP API with --http (the way next to a broker with"
                                   " durability log, its store's only writer, or one on Redis), else on the data"
                                   " directory's LMDB store (also while the broker runs).  Prints the members after"
                                   " the change; show also says whether members added later may read what was said"
                                   " before they joined (create --history-visible).")
    # nargs="?": argparse's own message for a missing action named USER too.
    p.add_argument("action", nargs="?", choices=["create", "add", "remove", "show"], metavar="ACTION",
                   help="create (a group with its first members), add (members), remove (members), show (the members"
                        " and whether history is visible to later members)")
    p.add_argument("name", nargs="?", metavar="NAME", help="group id, e.g. team-42 (required)")
    p.add_argument("users", nargs="*", metavar="USER", help="members to create with, add or remove")
    p.add_argument(
        "--history-visible",
        action="store_true",
        help="create: members added later may read what was said before they joined (default: not)",
    )
    _http_flags(p)
    p.add_argument("--config", help="the serve configuration file (for its data directory)")
    p.add_argument("--data-dir", help="the serve data directory (default ./pimcore-data)")
    p.set_defaults(func=_cmd_group)
    cast(_SubcommandParser, p).intermixed = True  # options anywhere among the users

    p = sub.add_parser("purge", help="delete a conversation or all data of a user (idempotent)",
                       description="Through a running broker's HTTP API with --http (a purged user's sessions are"
                                   " closed), else on the data directory's store (stop the broker first, or its"
                                   " connected devices stay until they log in again).  Prints what was removed"
                                   " (--json: as a JSON object).")
    p.add_argument("what", choices=["conversation", "user"])
    p.add_argument("id", help="the conversation id (group or d:a:b) or the user id")
    p.add_argument("--json", action="store_true", help="machine-readable output (the HTTP API's JSON object)")
    _http_flags(p)
    p.add_argument("--config", help="the serve configuration file (for its data directory)")
    p.add_argument("--data-dir", help="the serve data directory (default ./pimcore-data)")
    p.set_defaults(func=_cmd_purge)

    p = sub.add_parser("retention", help="show or set a conversation's history retention",
                       description="Without --max-age/--max-count/--default: show it.  A limit of 0 means none;"
                                   " --default makes the conversation follow [server] history_max_age/_count.  A group"
                                   " that does not exist is an error (exit 2).")
    p.add_argument("conv", help="the conversation id")
    p.add_argument("--max-age", type=float, metavar="SECONDS", help="remove entries older than this")
    p.add_argument("--max-count", type=int, metavar="N", help="keep only the newest N entries")
    p.add_argument("--default", action="store_true", help="both limits follow the broker default (alone: with"
                   " --max-age or --max-count, the limit not given follows it already)")
    p.add_argument("--json", action="store_true", help="machine-readable output (the HTTP API's JSON object)")
    _http_flags(p)
    p.add_argument("--config", help="the serve configuration file (for its data directory)")
    p.add_argument("--data-dir", help="the serve data directory (default ./pimcore-data)")
    p.set_defaults(func=_cmd_retention)

    p = sub.add_parser("chat", help="interactive terminal chat with one peer or a group",
                       description="Each line typed is sent.  Commands: /help, /history, /typing, /edit N text,"
                                   " /recall N, /delete N, /quit; any other line that starts with / is refused"
                                   " as an unknown command: type // to send one (//shrug sends /shrug).")
    p.add_argument("--url", default="tcp://127.0.0.1:7400",
                   help="the broker's URL: tcp://, tls://, ws://HOST:PORT/PATH or wss://... (default %(default)s)")
    p.add_argument("--token", required=True, help="from `pimcore token --user ME`")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--to", metavar="PEER", help="the user to chat with")
    who.add_argument("--group", metavar="GROUP", help="a group to chat in (see `pimcore group`)")
    p.add_argument("--device", help="the device to log in as (default: the token's device if it is bound to one,"
                                     " else 'terminal')")
    p.add_argument("--cafile", help="CA certificate to trust for tls:// and wss://")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("info", help="version and the active fast-path backend")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="load generator: throughput and latency of a broker",
                       description="Measure acked sends/s and send->ack / send->delivery latency against a broker"
                                   " it starts (own process, own CPU) or one given by --url.")
    p.add_argument("--url", action="append",
                   help="an existing broker (tcp://); default: start one.  Several --url (or URL,URL): nodes"
                        " sharing one store, connections spread over them round-robin")
    p.add_argument("--secret", help="the existing broker's token secret (default $PIMCORE_SECRET)")
    p.add_argument("--data-dir", help="the existing broker's data dir (group mode creates the group there;"
                   " a broker with durability log is its only writer: create it with its HTTP API first)")
    p.add_argument("--store", help="group mode against nodes over Redis Cluster: their store (redis://...; default"
                                   " $PIMCORE_STORE), where the group is created")
    p.add_argument("--namespace", help="with --store: the nodes' namespace (default $PIMCORE_STORE_NAMESPACE or pim)")
    p.add_argument("-c", "--conns", type=int,
                   help=f"sending connections (default {DEFAULT_BENCH_CONNS}; with --shape, the shape's: another is refused)")
    p.add_argument("-w", "--window", type=int,
                   help=f"SendReqs in flight per connection (default {DEFAULT_BENCH_WINDOW}; with --shape, the shape's:"
                        " another is refused)")
    p.add_argument("-s", "--size", type=int, default=100, help="payload bytes (default 100)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("-n", "--count", type=int, help="send this many messages in all")
    how.add_argument("-d", "--duration", type=float, default=5.0, help="seconds to measure (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds sent before measuring (default 1)")
    p.add_argument("--group", type=int, metavar="SIZE", help="send in one group of SIZE members instead of 1:1 chats")
    p.add_argument("--offline", action="store_true", help="1:1 recipients stay offline (inbox writes only)")
    p.add_argument("--idle", type=int, default=0, help="also hold this many authenticated idle connections")
    p.add_argument("--hold", type=float, default=2.0, help="seconds to hold idle connections when --conns 0")
    p.add_argument("--procs", type=int, default=1, help="generator processes (default 1)")
    p.add_argument("--durability", choices=["sync", "log", "os"], default="sync",
                   help="of the broker it starts (default sync)")
    p.add_argument("--backend", choices=["cython", "pure"], help="PIMCORE_BACKEND of the broker it starts")
    p.add_argument("--no-pin", action="store_true", help="do not pin broker and generator to different CPUs")
    p.add_argument("--zstd", action="store_true", help="negotiate zstd compression")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE", help="write a latency histogram plot (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shape", choices=["1x1", "1x64", "50x16", "e2e-1x64"],
                   help="a shape of BENCHMARKS.md's side-by-side tables (sets --conns, --window and --offline; given with"
                        " it, they must say the same; 1:1 chats, not with --group): 1x1, 1x64 and 50x16 are"
                        " senders only; e2e-1x64 has a recipient that acks every push")
    p.add_argument("--generator", choices=["auto", "c", "python"], default="auto",
                   help="auto (default): the one-thread C generator (bench/loadgen.c, built with cc on first use)"
                        " when it can run the shape, else the trio one")
    p.add_argument("--compare", choices=["redis", "mosquitto"],
                   help="also run the same shape against a redis-server it starts (appendfsync always, XADD;"
                        " senders only) or a mosquitto it starts (MQTT QoS 1, no fsync; with e2e-1x64 a subscriber"
                        " that acks every message), alternating; report both, the medians and the ratios")
    p.add_argument("--rounds", type=int,
                   help=f"with --compare (refused without it): alternating rounds (default {DEFAULT_COMPARE_ROUNDS})")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("inspect", help="summarise an LMDB data directory, read-only (safe next to a running broker)")
    p.add_argument("data_dir", help="the data directory of `pimcore serve` (or its store/ directory)")
    p.add_argument("--user", action="append", default=[],
                   help="show this user's inbox, devices and conversations (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object (keys: docs/OPERATIONS.md, \"Inspecting the store\")")
    p.set_defaults(func=_cmd_inspect)
    return parser


#: Options that say an empty value in their own words (chat --token: where a token comes from).
_OWN_EMPTY_CHECK = frozenset({("chat", "--token")})


def _empty_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[str]:
    """The first option given an empty value (``--config ''``, ``--api-key
    ''``, one ``--listen ''`` of several), as its name; None if none.  An
    empty value is never a choice: taken, it fell back silently to the
    default (./pimcore-data, $PIMCORE_API_KEY or the key file, no CA
    file...), which a shell's unset "$VAR" gives without a word."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[args.command]._actions:
        if not action.option_strings or (args.command, action.option_strings[-1]) in _OWN_EMPTY_CHECK:
            continue
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and v == "" for v in values):
            return action.option_strings[-1]
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import BackendChoiceError
    from .ids import readable_stderr

    readable_stderr()  # (paths and values echoed as given: their bytes that are not UTF-8 as \xff)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("group", "purge", "retention"):
        problem = _http_flags_problem(args)
        if problem is not None:
            print(f"pimcore {args.command}: {problem}", file=sys.stderr)
            return 2
    empty = _empty_option(parser, args)
    if empty is not None:
        print(f"pimcore {args.command}: {empty}: cannot be empty", file=sys.stderr)
        return 2
    try:
        rc = int(args.func(args))
        sys.stdout.flush()  # (here: a reader gone away shows now, not at exit)
        return rc
    except BackendChoiceError as exc:  # PIMCORE_BACKEND=typo: the message says it all
        print(f"pimcore: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`pimcore group show ... | head
        # -1`): stop quietly, as Python's documentation recommends (signal,
        # "Note on SIGPIPE"): stdout to devnull, so that the interpreter's
        # last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
