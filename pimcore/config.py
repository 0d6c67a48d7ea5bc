"""``pimcore serve`` configuration: defaults < a TOML file < environment < flags.

Example (every key optional)::

    data_dir = "pimcore-data"          # embedded LMDB store + generated secret
    durability = "sync"                # "sync" (fsync per batch), "log" (one flush per batch) or "os"
    listen = ["tcp://127.0.0.1:7400", "ws://127.0.0.1:7480/im"]
    secret_file = "/etc/pimcore/secret" # default: <data_dir>/secret, created on first run
    content_filter = "mypkg.moderation:check"  # f(user, conv, payload) -> None or a reason to reject
    api_keys = ["..."]                 # HTTP API bearer keys; default: <data_dir>/api-key, created on first run
    log_level = "info"                 # debug, info, warning, error
    log_format = "text"                # text or json (one object per line)

    [tls]                              # for tls:// and wss:// listeners (and a tls:// http listener)
    cert = "server.pem"
    key = "server.key"

    [limits]                           # see pimcore.core.Limits
    max_frame = 1048576
    max_payload = 65536
    window = 256
    send_rate = 2000.0
    send_burst = 512
    heartbeat_ms = 15000

    [server]
    idle_timeout = 45.0                # seconds
    ack_delay = 0.02                   # seconds delivery acks wait (coalesced per device) before they are committed
    login_timeout = 10.0               # seconds
    max_outbound_bytes = 8388608       # bytes held for a connection: reading pauses at half, SLOW_CONSUMER beyond
    max_outbound_total = 536870912     # bytes held for all connections: pushes wait beyond; 5 s beyond, the biggest holders get SLOW_CONSUMER
    control_rate = 50.0                # Pongs, CalibrateResps and refusals per second per connection...
    control_burst = 200                # ...and at once; beyond: Close(RATE_LIMITED)
    max_connections = 100000
    commit_in_thread = false           # true: fsync in a worker thread (see ARCHITECTURE.md)
    hook_timeout = 10.0                # seconds an async content filter/authenticator may take
    events = false                     # true: record durable host events (docs/EMBEDDING.md, Events)
    typing_ttl = 6.0                   # seconds a relayed typing indicator lasts unless refreshed
    typing_rate = 2.0                  # Typing frames per second per connection (excess dropped silently)...
    typing_burst = 8                   # ...and at once
    typing_max_members = 256           # groups larger than this get no typing relayed
    presence_max_users = 256           # users one presence subscription may name
    history_max_age = 0.0              # seconds: older entries leave every conversation without its own setting (0: keep)
    history_max_count = 0              # entries kept per such conversation, the newest (0: no limit)
    dedupe_window = 60.0               # seconds: retention removes nothing younger, so a retry is still deduplicated (0: no bound)
    consumer_idle = 60.0               # seconds after a host event consumer was last read or acked: deleting it is refused until then
    reclaim_interval = 60.0            # seconds between reclaim passes (inbox entries, devices, history retention)

    [messages]                         # recall, edit, delete-for-self (AmendReq); seconds, 0 = no limit
    recall_window = 86400.0            # a sender may recall a message this long after it was stored
    edit_window = 172800.0             # ...edit it
    delete_window = 0.0                # ...anyone who sees it may delete it for themselves

    [http]                             # the HTTP listener (off unless listen is set); `http = "URL"` is short for listen
    listen = "tcp://127.0.0.1:7481"    # tcp:// or tls:// (with [tls])
    max_header_bytes = 16384
    max_body_bytes = 1048576
    request_timeout = 10.0             # seconds to receive a whole request once it started
    keepalive_timeout = 30.0           # seconds a connection may stay silent between requests (>= 0.1)
    max_connections = 1000
    max_page_bytes = 4194304           # JSON bytes of a history/conversation-list/event page, an event-stream write

    [webhooks]                         # host events POSTed to a URL (docs/EMBEDDING.md, Webhooks); turns events on
    url = "https://backend.example/pimcore-events"
    secret = "..."                     # HMAC-SHA256 key; default: <data_dir>/webhook-secret, created on first run
    timeout = 10.0                     # seconds per request
    retry_base = 1.0                   # seconds: a failed batch is retried after uniform(0, min(cap, base * 2**n))
    retry_cap = 60.0                   # seconds
    batch_size = 100                   # events per request
    max_batch_bytes = 1048576          # JSON bytes per request (one event always goes)
    events = ["message"]               # event types to send; default: all

    [store]                            # default: the embedded LMDB store in <data_dir>/store
    url = "redis://10.0.0.1:7000,10.0.0.2:7000"  # a Redis Cluster (docs/OPERATIONS.md, Redis Cluster); `store = "URL"` is short
    namespace = "pim"                  # prefix of every key: several brokers' data may share a cluster
    address_map = ["10.0.0.1:7000=127.0.0.1:17000"]  # ANNOUNCED=DIAL: connect here for a node the cluster announces there (NAT, containers, proxies)
    read_fanout_above = 100            # groups with more members get read fan-out (docs/OPERATIONS.md, Large groups)

    [moderation]                       # pre-send moderation call (docs/EMBEDDING.md, Webhooks)
    url = "https://backend.example/moderate"
    policy = "closed"                  # required: "open" (no answer: store it) or "closed" (refuse, INTERNAL)
    timeout_ms = 2000
    secret = "..."                     # default: the webhook secret (the same <data_dir>/webhook-secret)

**Environment, one rule:** every key is also ``PIMCORE_<KEY>`` (top level)
or ``PIMCORE_<SECTION>_<KEY>`` (in a section), upper case:
``PIMCORE_DATA_DIR``, ``PIMCORE_LIMITS_SEND_RATE``, ``PIMCORE_HTTP_REQUEST_TIMEOUT``;
``PIMCORE_HTTP`` is ``[http] listen``, ``PIMCORE_STORE`` is ``[store] url``.  Values are read by the key's type
(a number, ``true``/``false``, a string); lists (``listen``, ``api_keys``)
are comma-separated (an empty item, ``"k1,,k2"`` or ``"k1,"``, is refused
by its position).  ``PIMCORE_CONFIG`` names the file.  Any other
``PIMCORE_*`` variable is a :class:`ConfigError` naming it, like an unknown
key in the file (except the project's own :data:`OTHER_ENV`, e.g.
``PIMCORE_BACKEND``; an empty one is unset).  Precedence: flags
> environment > file > defaults (an embedded broker's listeners excepted:
its host's only, never the environment's -- load_settings' ``embedded``).  A value of the wrong type is a
:class:`ConfigError` naming the key: ``limits.send_rate: expected a number, got "fast"``;
so is any other unusable value, and each says where it came from:
``pimcore.toml: ...``, ``... (from $PIMCORE_LIMITS_SEND_RATE)``, or the flag (``--send-rate``).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

if TYPE_CHECKING:
    import ssl

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ._util import shown_url
from .core import SECOND, BrokerConfig, ContentFilter, Limits
from .ids import quote_arg
from .net.server import DEFAULT_BROKER_CONFIG, ServerConfig, server_ssl_context
from .net.streams import Endpoint, parse_url

__all__ = [
    "ServeSettings", "load_settings", "ConfigError", "DEFAULT_LISTEN", "SCHEMA", "env_name", "render_toml",
    "API_KEY_FILE", "MIN_API_KEY_BYTES", "LOG_LEVELS", "LOG_FORMATS",
]

DEFAULT_LISTEN = "tcp://127.0.0.1:7400"
API_KEY_FILE = "api-key"
#: HTTP API keys shorter than this are refused, wherever they come from
#: (``api_keys``, ``$PIMCORE_API_KEYS``, ``<data_dir>/api-key``): 128 bits.
#: Below the token secret's 32 bytes (auth.MIN_SECRET_BYTES) on purpose: a
#: token is an HS256 signature, and one token lets its key be guessed
#: offline; an API key is only compared, so it can be guessed only by
#: asking the broker.  A key made by ``serve`` is 64 characters.
MIN_API_KEY_BYTES = 16
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DURABILITY_MODES = ("sync", "log", "os")

# ---------------------------------------------------------------- the schema
# Types: "str", "path" (relative to the file in a file, to the cwd elsewhere),
# "int", "float", "bool", "list" (of strings).  One table drives the file's
# unknown-key check, the type check, the environment names and --print-config.

_TYPE_OF_DEFAULT = {int: "int", float: "float", bool: "bool", str: "str"}

_TOP: dict[str, str] = {
    "data_dir": "path",
    "durability": "str",
    "listen": "list",
    "secret": "str",
    "secret_file": "path",
    "content_filter": "str",
    "api_keys": "list",
    "log_level": "str",
    "log_format": "str",
}
_SECTIONS: dict[str, dict[str, str]] = {
    "tls": {"cert": "path", "key": "path"},
    "limits": {f.name: _TYPE_OF_DEFAULT[type(f.default)] for f in fields(Limits)},
    "server": {
        "idle_timeout": "float", "login_timeout": "float", "ack_delay": "float", "max_outbound_bytes": "int",
        "max_outbound_total": "int", "max_connections": "int", "commit_in_thread": "bool", "hook_timeout": "float", "read_timeout": "float",
        "consumer_idle": "float",
        "control_rate": "float", "control_burst": "int", "events": "bool",
        "typing_ttl": "float", "typing_rate": "float", "typing_burst": "int", "typing_max_members": "int",
        "presence_max_users": "int",
        "history_max_age": "float", "history_max_count": "int", "reclaim_interval": "float",
        "dedupe_window": "float",
    },
    "http": {
        "listen": "str", "max_header_bytes": "int", "max_body_bytes": "int", "request_timeout": "float",
        "keepalive_timeout": "float", "max_connections": "int", "max_page_bytes": "int",
    },
    "webhooks": {
        "url": "str", "secret": "str", "timeout": "float", "retry_base": "float", "retry_cap": "float",
        "batch_size": "int", "max_batch_bytes": "int", "events": "list",
    },
    "moderation": {"url": "str", "secret": "str", "policy": "str", "timeout_ms": "int"},
    "store": {"url": "str", "namespace": "str", "address_map": "list", "read_fanout_above": "int"},
    "messages": {"recall_window": "float", "edit_window": "float", "delete_window": "float"},
}
#: ``(section or None, key) -> type``, every setting there is.
SCHEMA: dict[tuple[Optional[str], str], str] = {
    **{(None, k): t for k, t in _TOP.items()},
    **{(s, k): t for s, keys in _SECTIONS.items() for k, t in keys.items()},
}
#: Secrets: never printed.
_SECRET_KEYS = {(None, "secret"), (None, "api_keys"), ("webhooks", "secret"), ("moderation", "secret")}

_LIMIT_KEYS = set(_SECTIONS["limits"])
_SERVER_KEYS = set(_SECTIONS["server"])
#: [server] keys that are BrokerConfig fields of typing and presence (typing_ttl in seconds there, µs here).
_EPHEMERAL_KEYS = ("typing_ttl", "typing_rate", "typing_burst", "typing_max_members", "presence_max_users")
_HTTP_KEYS = set(_SECTIONS["http"])
_TOP_KEYS = set(_TOP) | set(_SECTIONS)


def env_name(section: Optional[str], key: str) -> str:
    """The environment variable of a setting: ``PIMCORE_LIMITS_SEND_RATE``;
    ``PIMCORE_HTTP`` for ``[http] listen``."""
    if (section, key) == ("http", "listen"):
        return "PIMCORE_HTTP"
    if (section, key) == ("store", "url"):
        return "PIMCORE_STORE"
    return "PIMCORE_" + (f"{section}_{key}" if section else key).upper()


def n_bytes(n: int) -> str:
    """``n`` as a size in words: "1 byte", "5 bytes"."""
    return f"{n} byte" if n == 1 else f"{n} bytes"


def _ip_literal(name: str) -> Optional[Any]:
    """``name`` as the IP address binding it takes, if it is an IP literal
    (an ipaddress.IPv4Address/IPv6Address), else None.  Beyond what
    :mod:`ipaddress` reads, the C library's numeric forms are literals too
    -- inet_aton's ``127.1``, ``0x7f.0.0.1``, ``2130706433``, ``0`` -- as
    bind reads them: asked of getaddrinfo with AI_NUMERICHOST, which never
    looks a name up (a host name stays a name)."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    found = {info[4][0] for info in infos}
    if len(found) != 1:  # pragma: no cover - a numeric host is one address
        return None
    try:
        return ipaddress.ip_address(found.pop())
    except ValueError:  # pragma: no cover
        return None


def _addresses(host: str) -> set[tuple[int, str]]:
    """What binding ``host`` takes: (IP version, address) pairs, the
    address "*" for a wildcard (0.0.0.0, ::); an IP literal in its
    canonical form (``127.1`` is ``127.0.0.1``, see _ip_literal)."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return {(4, "127.0.0.1"), (6, "::1")}
    ip = _ip_literal(name)
    if ip is None:
        return {(0, name)}  # a host name: only the same name is known to overlap
    return {(ip.version, "*" if ip.is_unspecified else str(ip))}


def _clash_note(a: str, b: str) -> str:
    """Why listener hosts ``a`` and ``b`` (different strings) clash, for the
    error: "127.1 is 127.0.0.1" for two spellings of one address, else
    "0.0.0.0 and 127.0.0.1 overlap" (a wildcard, localhost)."""
    aa, bb = _addresses(a), _addresses(b)
    if aa == bb and len(aa) == 1:
        [(_, canon)] = aa
        if canon != "*":
            a, b = a.strip("[]"), b.strip("[]")
            if b.lower() == canon:
                return f"{a} is {canon}"
            if a.lower() == canon:
                return f"{b} is {canon}"
            return f"{a} and {b} are both {canon}"
    return f"{a} and {b} overlap"


def _overlap(a: str, b: str) -> bool:
    """Do binds of hosts ``a`` and ``b`` (on one port) take a same address?"""
    return any(va == vb and (x == y or (va and "*" in (x, y))) for va, x in _addresses(a) for vb, y in _addresses(b))


def _listen_url_problem(url: str, http: bool = False) -> Optional[str]:
    """What a listen URL (``listen``, ``http``) holds that a listener would
    drop silently, said without repeating a password; None if nothing.  A
    listener binds a host and port and, for WebSocket, serves one path:
    the rules clients' URLs follow too (url_extra_problem)."""
    from .net.streams import url_extra_problem

    return url_extra_problem(url, listen=True, http=http)


class ConfigError(ValueError):
    """A configuration file, variable or flag that cannot be used (message says which)."""


#: A setting, ``(section or None, key)``.
_Key = tuple[Optional[str], str]
#: Where a setting's value came from: ``("file", PATH)`` (or ``"settings"``,
#: load_settings' ``document``), ``("env", "$NAME")`` or ``("flag", "--name")``.
_Origin = tuple[str, str]


def _said_name(key: _Key) -> str:
    """A setting's name in errors: ``limits.window``, ``listen``; ``http``
    for ``[http] listen``."""
    section, name = key
    return "http" if key == ("http", "listen") else f"{section}.{name}" if section else name


def _from(text: str, name: str, origin: _Origin, named: bool = True) -> ConfigError:
    """The error ``text`` about setting ``name`` saying where its value came
    from, one way for every check: ``FILE: text``, ``text (from $NAME)``, or
    the flag's name for the setting's."""
    kind, label = origin
    if kind == "file":
        return ConfigError(f"{label}: {text}")
    if kind == "flag" and named:
        said = _as_flag(text, name, label)
        if said != text:
            return ConfigError(said)
    return ConfigError(f"{text} (from {label})")


def _as_flag(text: str, name: str, flag: str) -> str:
    """``text`` with the setting's ``name`` said as the ``flag`` that gave
    it: where it stands as a word of its own, not inside a path or a value
    that happens to contain it (a --data-dir of /tmp/x_data_dir_y)."""
    return re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w/-])", lambda _: flag, text, count=1)


def _flag_origin(key: _Key, options: bool) -> Optional[_Origin]:
    """The flag (load_settings' keyword) that sets ``key``, as a command-line
    option (``--max-connections``) if ``options``, else as the keyword an
    embedding host gave (``max_connections``); None for a key of a section
    given whole (``webhooks={...}``: its own names say it)."""
    section, name = key
    if section in ("webhooks", "moderation"):
        return None
    flag = "http" if key == ("http", "listen") else "store" if key == ("store", "url") else name
    return ("flag", "--" + flag.replace("_", "-")) if options else ("flag", flag)


#: A value's JSON up to this long is shown whole in a refusal, a longer one
#: cut (_show): a 5,001-digit $PIMCORE_LIMITS_WINDOW was echoed whole.
_SHOW_WHOLE = 80


def _show(value: Any) -> str:
    """``value`` as a refusal quotes it: JSON (a bool as TOML writes it),
    cut past _SHOW_WHOLE characters to the JSON of a prefix (its closing
    quote kept) and how long it was: ``"99...9"...(5,001 chars)``."""
    if isinstance(value, bool):
        return str(value).lower()
    try:
        text = json.dumps(value, default=str)
    except ValueError:  # (an int of more digits than Python converts)
        text = "a number of more than 4,300 digits"
    if len(text) <= _SHOW_WHOLE:
        return text
    if isinstance(value, str):
        n = _SHOW_WHOLE - 10
        while len(cut := json.dumps(value[:n])) > _SHOW_WHOLE - 8:  # (an escape is up to 12 characters)
            n = n * 2 // 3
        return f"{cut}...({len(value):,} chars)"
    return f"{text[:_SHOW_WHOLE - 10]}...({len(text):,} chars)"


_EXPECTED = {"str": "a string", "path": "a string (a path)", "int": "an integer", "float": "a number",
             "bool": "true or false", "list": "a list of strings"}


#: Settings (as _check is given their names) whose values are secrets: a
#: refusal of one says what kind of value it got, never the value.
_SECRET_NAMES = frozenset({"secret", "api_keys", "webhooks.secret", "moderation.secret"})
#: List settings that take one string as a list of it (``listen = "URL"``);
#: the others refuse a string: ``api_keys = "k1,k2"`` was the one key "k1,k2"
#: (the comma rule is the environment's, not the file's).
_ONE_STRING_IS_A_LIST = frozenset({"listen"})


#: What an empty list setting would hold, and what leaving it out means,
#: for its refusal (:func:`_not_empty`).
_EMPTY_LIST_SAID = {
    "api_keys": ("key", " (then <data_dir>/api-key is used)"),
    "listen": ("URL", ""),
    "webhooks.events": ("event type", " (then every type is sent)"),
    "store.address_map": ("ANNOUNCED=DIAL entry", ""),
}


def _not_empty(name: str, typ: str, value: Any) -> Any:
    """``value``, or ConfigError naming ``name`` if it is empty: a string
    ``""`` or a list of nothing (``api_keys = []``, ``$PIMCORE_API_KEYS=","``)
    given explicitly.  Taken, each fell back silently to the default (the
    key file, the data directory's secret, no HTTP listener, every webhook
    event type) or meant nothing."""
    if typ in ("str", "path") and value == "":
        # (A path: it names nothing; taken as unset, a shell's unset "$DIR"
        # given as --data-dir put the data in ./pimcore-data silently; as a
        # Path it is "." (or the file's folder).)
        raise ConfigError(f"{name}: cannot be empty")
    if typ == "list" and not isinstance(value, str) and len(value) == 0:
        what, default = _EMPTY_LIST_SAID.get(name.lstrip("-").replace("-", "_"), ("value", ""))
        raise ConfigError(f"{name}: the list is empty: give at least one {what}, or leave the setting out{default}")
    return value


def _check(name: str, typ: str, value: Any, empty_ok: bool = False) -> Any:
    """``value`` (from TOML or a flag) as ``typ``, or ConfigError naming
    ``name``; an empty one too (:func:`_not_empty`) unless ``empty_ok``."""
    bare = name.lstrip("-").replace("-", "_")
    ok = {
        "str": isinstance(value, str),
        "path": isinstance(value, (str, Path)),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": (isinstance(value, str) and bare in _ONE_STRING_IS_A_LIST)
        or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)),
    }[typ]
    if not ok:
        if typ == "list" and isinstance(value, str):
            shown = "" if bare in _SECRET_NAMES else f": write [{_show(value)}]"
            raise ConfigError(f"{name}: expected a list of strings, got a string{shown}")
        if bare in _SECRET_NAMES:  # (not echoed: the other values of a list may be good keys)
            odd = next(type(v).__name__ for v in value if not isinstance(v, str)) \
                if isinstance(value, (list, tuple)) else type(value).__name__
            got = ("a list holding " if isinstance(value, (list, tuple)) else "") + \
                ("an " if odd[0] in "aeiou" else "a ") + odd
            raise ConfigError(f"{name}: expected {_EXPECTED[typ]}, got {got}")
        raise ConfigError(f"{name}: expected {_EXPECTED[typ]}, got {_show(value)}")
    if not empty_ok:
        # (An empty variable stays unset: the environment's one rule, for
        # docker-compose's "FOO="; a list variable of only commas is refused.)
        _not_empty(name, typ, value)
    if typ == "float":
        return float(_finite(name, value))  # (checked first: an int past a float's range cannot be made one)
    if typ == "int":
        return _finite(name, value)
    if typ == "list" and not isinstance(value, str):
        empty = next((i for i, item in enumerate(value, 1) if not item.strip()), None)
        if empty is not None:
            # (``listen = ["URL", ""]`` said "'': scheme must be ...",
            # ``api_keys = ["k", ""]`` no position.  By its position, never
            # its neighbours: they may be keys; as the environment's.)
            what = _EMPTY_LIST_SAID.get(bare, ("value", ""))[0]
            raise ConfigError(f"{name}: item {empty} of the list is empty: give one {what} in each item,"
                              " or remove it")
    if typ == "list":
        return [value] if isinstance(value, str) else list(value)
    return value


#: Lower bounds checked at load time (so --print-config refuses what serve
#: would): ``name -> (minimum, inclusive)``.  The HttpConfig checks, named.
_LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "http.max_header_bytes": (1, True), "http.max_body_bytes": (1, True), "http.max_connections": (1, True),
    "http.max_page_bytes": (1, True),  # (and at least one message's JSON: ServeSettings._check_page_bytes)
    "http.request_timeout": (0, False),
    "http.keepalive_timeout": (0.1, True),  # (http.server.MIN_KEEPALIVE_TIMEOUT: less closed a connection at once)
    # (Said by the setting's name here: the core's own refusal names its
    # BrokerConfig field, in µs.)
    "server.history_max_age": (0, True), "server.history_max_count": (0, True),
}


#: The largest number a setting takes (in magnitude): seconds become µs in a
#: signed 64-bit integer (9,223,372,036,854 s is about 292,000 years); the
#: rates and everything else stay far below it.
_MAX_NUMBER = 9_223_372_036_854


def _finite(name: str, value: Any, shown: str = "") -> Any:
    """``value`` if finite and within :data:`_MAX_NUMBER`, else ConfigError
    naming ``name`` ("inf" and "nan" parse as floats, and made a traceback
    (OverflowError) or a broker with no limit: a new-user pass)."""
    # (An int is compared as it is: one past a float's range cannot be made
    # a float, and math.isfinite would raise OverflowError.)
    fits = abs(value) <= _MAX_NUMBER if isinstance(value, int) else math.isfinite(value) and abs(value) <= _MAX_NUMBER
    if not fits:
        text = shown or repr(value)
        if len(text) > 40:
            text = text[:39] + "\u2026"
        raise ConfigError(f"{name}: {text} is out of range (a number must be finite and at most"
                          f" {_MAX_NUMBER} in magnitude)")
    return value


def _in_range(name: str, value: Any) -> Any:
    """``value`` if within ``name``'s bound (:data:`_LOWER_BOUNDS`), else ConfigError naming ``name``."""
    bound = _LOWER_BOUNDS.get(name)
    if bound is not None and not (value >= bound[0] if bound[1] else value > bound[0]):
        what = ("an integer >= %d" if isinstance(value, int) and bound[0] == int(bound[0]) else "a number >= %g") % bound[0] if bound[1] \
            else "a number > %g" % bound[0]
        raise ConfigError(f"{name}: expected {what}, got {_show(value)}")
    return value


def _limits_text(exc: Exception) -> str:
    """A Limits refusal said by the settings' names ("limits.window must be
    >= 1, got -1"), not the class's."""
    text = str(exc)
    return text.replace("Limits.", "limits.") if "Limits." in text else f"limits: {text}"


#: A setting named in an error's text: ``limits.window``, ``webhooks.url``.
_NAMED = re.compile(r"\b(" + "|".join(_SECTIONS) + r")\.(\w+)")


def _parse_env(name: str, typ: str, text: str) -> Any:
    """An environment variable's text as ``typ`` (see the module docstring)."""
    s = text.strip()
    try:
        if typ == "int":
            return _finite(name, int(s), s)
        if typ == "float":
            return _finite(name, float(s), s)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{name}: expected {_EXPECTED[typ]}, got {_show(text)}") from None
    if typ == "bool":
        low = s.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false (or 1/0, yes/no, on/off), got {_show(text)}")
    if typ == "list":
        parts = [part.strip() for part in s.split(",")]
        _not_empty(name, typ, [part for part in parts if part])  # (only commas: "the list is empty")
        if "" in parts:
            # ("k1,,k2" or "k1,": the empty item was dropped silently, a key
            # lost to a typo.  Said by its position, never its neighbours:
            # they may be keys.)
            what = _EMPTY_LIST_SAID.get(name, ("value", ""))[0]
            raise ConfigError(f"{name}: item {parts.index('') + 1} of the list is empty (two commas, or one at"
                              f" an end): give one {what} between each two commas")
        return parts
    return text


@dataclass(frozen=True, slots=True)
class ServeSettings:
    data_dir: Path = Path("pimcore-data")
    durability: str = "sync"
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    secret: Optional[str] = None
    secret_file: Optional[Path] = None
    cert: Optional[str] = None
    key: Optional[str] = None
    content_filter: Optional[str] = None  # "module:function"
    limits: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    config_dir: Optional[Path] = None  # the folder of the config file, if one was read
    #: The HTTP listener's URL (tcp:// or tls://, http:// and https:// too); None: no HTTP listener.
    http: Optional[str] = None
    http_options: dict[str, Any] = field(default_factory=dict)  # the other [http] keys
    api_keys: tuple[str, ...] = ()  # empty: <data_dir>/api-key
    log_level: str = "info"
    log_format: str = "text"
    webhooks: dict[str, Any] = field(default_factory=dict)  # the [webhooks] keys given
    moderation: dict[str, Any] = field(default_factory=dict)  # the [moderation] keys given
    messages: dict[str, Any] = field(default_factory=dict)  # the [messages] keys given (seconds)
    #: ``redis://HOST:PORT[,HOST:PORT...]``: a Redis Cluster store; None: LMDB in <data_dir>/store.
    store: Optional[str] = None
    store_namespace: str = "pim"
    #: ``ANNOUNCED_HOST:PORT=DIAL_HOST:PORT`` entries (RedisStore ``address_map``).
    store_address_map: tuple[str, ...] = ()
    #: RedisStore ``read_fanout_above`` (members); None: its default.
    store_read_fanout_above: Optional[int] = None
    #: Where each value given came from (load_settings), for errors found
    #: after the type check: they say it as the type check does.
    origins: dict[_Key, _Origin] = field(default_factory=dict, compare=False, repr=False)
    #: Every setting given a value (load_settings), its origin said or not
    #: (a section an embedding host gave whole has none): the others are
    #: the defaults.
    given: frozenset[_Key] = field(default=frozenset(), compare=False, repr=False)

    def _refused(self, text: str, *keys: _Key, named: bool = True) -> ConfigError:
        """ConfigError ``text`` about ``keys``, saying where each given value
        came from: for one (or all from one file) as :func:`_from` does;
        else each flag by its name and the others after the text,
        ``(limits.max_payload from p.toml; limits.max_frame from $X)``, and
        one given nowhere as the default (``limits.max_frame is the
        default``: unsaid, its value looked given too, to be looked for in
        vain).  ``named=False``: ``text`` does not name the setting (it
        quotes a path, which may be the setting's name: ``--data-dir
        data_dir``), so a flag is said after it, never put in its place."""
        keys = tuple(dict.fromkeys(keys))
        given = [(key, origin) for key in keys if (origin := self.origins.get(key)) is not None]
        if not given:
            return ConfigError(text)
        defaults = [key for key in keys if key not in self.given]
        if not defaults and (len(given) == 1
                             or all(origin == given[0][1] and origin[0] == "file" for _, origin in given)):
            return _from(text, _said_name(given[0][0]), given[0][1], named)
        sources = []
        for key in keys:
            name = _said_name(key)
            if key in defaults:
                sources.append(f"{name} is the default")
            elif key in self.origins:
                kind, label = self.origins[key]
                said = _as_flag(text, name, label) if kind == "flag" else text
                if said != text:
                    text = said
                else:
                    sources.append(f"{name} from {label}")
        return ConfigError(f"{text} ({'; '.join(sources)})" if sources else text)

    def _named(self, text: str) -> ConfigError:
        """:meth:`_refused` for the settings ``text`` names (``limits.window``)."""
        keys = [(m[1], m[2]) for m in _NAMED.finditer(text) if (m[1], m[2]) in SCHEMA]
        return self._refused(text, *keys)

    def _section_error(self, section: str, exc: Exception) -> ConfigError:
        """A refusal of a class built from ``[section]`` ("max_connections
        must be >= 1"), said by the setting's name and where it came from."""
        text = str(exc)
        key = text.split(" ", 1)[0].rstrip(":")
        if (section, key) in SCHEMA:
            return self._refused(f"{section}.{text}", (section, key))
        return ConfigError(f"{section}: {text}")

    def endpoints(self) -> tuple[Endpoint, ...]:
        for url in self.listen:
            problem = _listen_url_problem(url)
            if problem is not None:
                raise self._refused(f"listen: {problem}", (None, "listen"))
        try:
            return tuple(parse_url(u) for u in self.listen)
        except ValueError as exc:
            raise self._refused(f"listen: {exc}", (None, "listen")) from None

    def _content_filter_parts(self) -> tuple[str, str]:
        """``content_filter``'s module and function names; ConfigError if it
        is not of the form ``module:function``."""
        module, _, name = (self.content_filter or "").partition(":")
        if not module or not name:
            raise self._refused(f"content_filter must be 'module:function', not {quote_arg(self.content_filter)}",
                                (None, "content_filter"))
        return module, name

    def load_content_filter(self) -> Optional[ContentFilter]:
        """Import the ``module:function`` content-security hook, if any.  The
        module is looked for next to the config file, then in the current
        folder, then on the usual import path (as ``python -m`` would)."""
        if not self.content_filter:
            return None
        module, name = self._content_filter_parts()
        extra = [str(p) for p in (self.config_dir, Path.cwd()) if p is not None and str(p) not in sys.path]
        sys.path[:0] = extra
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise self._refused(f"content_filter {quote_arg(self.content_filter)}: {exc}", (None, "content_filter")) from None
        finally:
            for p in extra:
                sys.path.remove(p)
        if not callable(fn):
            raise self._refused(f"content_filter {quote_arg(self.content_filter)} is not callable", (None, "content_filter"))
        return fn  # type: ignore[no-any-return]

    def _check_idle_timeout(self, broker: BrokerConfig) -> None:
        """ConfigError for an idle timeout that closes sessions doing right:
        clients Ping when idle for the heartbeat (LoginAck.heartbeat_ms, the
        ceiling of their adaptive interval), so a timeout no longer than it,
        or any timeout without heartbeats, closes every idle session and
        the client reconnects, over and over ("--heartbeat-ms 10000
        --idle-timeout 3" started and did that).  Only here, for settings:
        BrokerConfig itself (a host's, a test's) may pair them freely."""
        idle, beat = broker.idle_timeout, broker.limits.heartbeat_ms
        if not idle or (beat and idle > beat * 1000):  # (µs and ms)
            return
        keys = (("server", "idle_timeout"), ("limits", "heartbeat_ms"))
        if beat:
            raise self._refused(
                f"server.idle_timeout ({idle / SECOND:g} s) must be longer than limits.heartbeat_ms ({beat} ms):"
                " clients Ping only after that long idle, so every idle session would be closed as idle; a few"
                f" heartbeats is usual ({DEFAULT_BROKER_CONFIG.idle_timeout / SECOND:g} s and"
                f" {DEFAULT_BROKER_CONFIG.limits.heartbeat_ms} ms by default)", *keys)
        raise self._refused(
            f"server.idle_timeout ({idle / SECOND:g} s) needs heartbeats: with limits.heartbeat_ms 0 clients never"
            " Ping, so every idle session would be closed as idle; set server.idle_timeout to 0 too", *keys)

    def _check_page_bytes(self, limits: Limits) -> None:
        """ConfigError for an ``[http] max_page_bytes`` given below one
        message's JSON at ``limits.max_payload`` (and max_mentions): every
        page of large messages would pass it (a page holds one item however
        large).  The default (4 MiB) is not refused: with a max_payload
        that large each page is one message."""
        given = self.http_options.get("max_page_bytes")
        if given is None:
            return
        from .http.api import smallest_page_bytes

        least = smallest_page_bytes(limits.max_payload, limits.max_mentions)
        if given < least:
            raise self._refused(
                f"http.max_page_bytes: {given} is less than one message's JSON at limits.max_payload"
                f" {limits.max_payload} (with limits.max_mentions {limits.max_mentions}): set at least {least}",
                ("http", "max_page_bytes"), ("limits", "max_payload"), ("limits", "max_mentions"))

    def server_config(self, *, check_only: bool = False) -> ServerConfig:
        """The broker's ServerConfig.  Raises ConfigError naming the setting
        (and where its value came from) for a value it refuses.
        ``check_only`` (``serve --print-config``): the same checks, with
        nothing imported or created -- the content filter's
        ``module:function`` form is checked, not imported, and no webhook
        secret file is read or made."""
        base = DEFAULT_BROKER_CONFIG
        try:
            limits = replace(base.limits, **self.limits)
        except (TypeError, ValueError) as exc:
            raise self._named(_limits_text(exc)) from None
        if check_only:
            if self.content_filter:
                self._content_filter_parts()
            hook = None
        else:
            hook = self.load_content_filter()
        self._check_page_bytes(limits)
        broker = replace(base, limits=limits, content_filter=hook)
        srv = dict(self.server)
        for key in ("idle_timeout", "login_timeout", "ack_delay", "history_max_age", "reclaim_interval", "dedupe_window"):
            if key in srv:
                seconds = float(srv.pop(key))
                if seconds < 0:  # (BrokerConfig would say it in its own names, in µs)
                    raise self._refused(f"server.{key}: expected seconds >= 0, got {seconds:g}", ("server", key))
                if key == "dedupe_window" and seconds > 86_400:  # (core.MAX_DEDUPE_WINDOW)
                    raise self._refused(f"server.dedupe_window: expected seconds from 0 to 86400 (a day), got {seconds:g}"
                                        " -- longer would keep what a retention limit exists to remove", ("server", key))
                if key in ("login_timeout", "reclaim_interval") and int(seconds * SECOND) <= 0:  # (no "off" for these)
                    raise self._refused(f"server.{key}: expected seconds > 0 (at least 0.000001), got {seconds:g}",
                                        ("server", key))
                timeouts: dict[str, Any] = {key: int(seconds * SECOND)}
                try:
                    broker = replace(broker, **timeouts)
                except (TypeError, ValueError) as exc:
                    raise self._refused(f"server.{key}: {exc}", ("server", key)) from None
        self._check_idle_timeout(broker)
        self._check_events_for_webhooks()
        if "events" in srv:
            broker = replace(broker, record_events=bool(srv.pop("events")))
        if self.webhooks.get("url"):
            broker = replace(broker, record_events=True)  # the webhook sender reads the event log
        for key, value in self.messages.items():
            broker = replace(broker, **{key: int(float(value) * SECOND)})  # type: ignore[arg-type]
        for key in ("control_rate", "control_burst", "history_max_count", "max_outbound_total"):
            if key in srv:
                try:
                    broker = replace(broker, **{key: srv.pop(key)})
                except (TypeError, ValueError) as exc:
                    raise self._refused(f"server.{key}: {exc}", ("server", key)) from None
        for key in _EPHEMERAL_KEYS:  # typing and presence (PROTOCOL.md, "Typing and presence")
            if key in srv:
                value = srv.pop(key)
                try:
                    broker = replace(broker, **{key: int(float(value) * SECOND) if key == "typing_ttl" else value})  # type: ignore[arg-type]
                except (TypeError, ValueError) as exc:
                    raise self._refused(f"server.{key}: {exc}", ("server", key)) from None
        endpoints = self.endpoints()
        if any(e.secure for e in endpoints) and not self.cert:
            raise ConfigError("tls:// and wss:// listeners need a certificate: --cert/--key or [tls] cert/key")
        try:
            return ServerConfig(listeners=endpoints, certfile=self.cert, keyfile=self.key, broker=broker,
                                moderation=self.moderation_config(secret=b"(not read)" if check_only else None), **srv)
        except (TypeError, ValueError) as exc:
            raise self._section_error("server", exc) from None

    def check_listeners(self) -> None:
        """ConfigError if two listeners (``listen`` and ``http``) would take
        the same address and port: the second could not bind.  Port 0 (a
        free port) never collides; ``0.0.0.0`` / ``::`` hold the port on
        every IPv4 / IPv6 address, ``localhost`` on 127.0.0.1 and ::1; IP
        literals are compared as the addresses bind takes (``127.1`` is
        ``127.0.0.1``, ``::0:1`` is ``::1``); other host names are not
        resolved: binding says which listener failed."""
        named = [(f"listen {ep.url}", ep) for ep in self.endpoints()]
        http = self.http_endpoint()
        if http is not None:
            host = f"[{http.host}]" if ":" in http.host else http.host
            named.append((f"http {'https' if http.secure else 'http'}://{host}:{http.port}", http))
        for i, (first, a) in enumerate(named):
            for second, b in named[i + 1:]:
                if a.port and a.port == b.port and _overlap(a.host, b.host):
                    where = f"[{b.host}]" if ":" in b.host else b.host
                    wide = "" if a.host == b.host else f" ({_clash_note(a.host, b.host)})"
                    raise ConfigError(f"{first} and {second} are on the same address {where}:{b.port}{wide}:"
                                      " give each listener its own port")

    def http_endpoint(self) -> Optional[Endpoint]:
        """The HTTP listener's address (scheme tcp or tls), or None."""
        if not self.http:
            return None
        url = self.http
        problem = _listen_url_problem(url, http=True)
        if problem is not None:
            raise self._refused(f"http: {problem}", ("http", "listen"))
        for web, plain in (("http://", "tcp://"), ("https://", "tls://")):
            if url.lower().startswith(web):
                url = plain + url[len(web):]
        scheme = url.partition("://")[0].lower() if "://" in url else "tcp"
        try:
            if scheme not in ("tcp", "tls"):  # (parse_url would list the broker listener's schemes)
                raise ValueError
            ep = parse_url(url, default_port=7481)
        except ValueError as exc:
            if scheme in ("tcp", "tls"):
                raise self._refused(f"http: {exc}", ("http", "listen")) from None
            raise self._refused(f"http: {quote_arg(self.http)}: scheme must be tcp, tls, http or https",
                                ("http", "listen")) from None
        if ep.scheme not in ("tcp", "tls"):
            raise self._refused(f"http: {quote_arg(self.http)}: scheme must be tcp, tls, http or https", ("http", "listen"))
        if ep.secure and not self.cert:
            raise ConfigError("a tls:// http listener needs a certificate: --cert/--key or [tls] cert/key")
        return ep

    def tls_context(self) -> Optional[ssl.SSLContext]:
        """The server TLS context of the tls:// and wss:// listeners and of a
        tls:// HTTP listener, loaded once from ``cert`` and ``key`` (a pipe
        can be read only once); None if none of them is secure.  Raises
        ConfigError, naming the file, if they do not load.  ``pimcore
        serve`` and :func:`pimcore.embed.open_pimcore` call it before the
        data directory is touched and hand the context to both listeners."""
        http = self.http_endpoint()
        if not (any(e.secure for e in self.endpoints()) or (http is not None and http.secure)):
            return None
        if not self.cert:
            raise ConfigError("tls:// and wss:// listeners need a certificate: --cert/--key or [tls] cert/key")
        try:
            return server_ssl_context(self.cert, self.key)
        except ValueError as exc:
            raise ConfigError(f"{exc} (--cert/--key, [tls] cert/key, or cert=/key=)") from None

    def check_tls_used(self) -> None:
        """ConfigError if a certificate or key is given but no listener (nor
        the HTTP listener) uses TLS: ``pimcore serve`` would ignore it."""
        if not (self.cert or self.key):
            return
        http = self.http_endpoint()
        if any(e.secure for e in self.endpoints()) or (http is not None and http.secure):
            return
        raise ConfigError("--cert/--key ([tls] cert/key) given but no listener uses TLS: listen on tls:// or wss://,"
                          " serve --http on https:// (tls://), or drop the certificate")

    def load_api_keys(self, *, create: bool = True) -> tuple[str, ...]:
        """The HTTP API keys: ``api_keys`` (file, $PIMCORE_API_KEYS), else
        ``<data_dir>/api-key`` (created on first use, mode 0600, like the
        token secret).  ValueError for an empty key."""
        if self.api_keys:
            self._check_api_keys()
            return tuple(k.strip() for k in self.api_keys)
        from .auth import load_or_create_secret

        path = self.data_dir / API_KEY_FILE
        if not create and not path.exists():
            return ()
        try:
            key = load_or_create_secret(self.data_dir, API_KEY_FILE)
        except ValueError as exc:  # (said with where the data directory came from)
            raise self._refused(str(exc), (None, "data_dir"), named=False) from None
        if len(key) < MIN_API_KEY_BYTES:  # (as the token secret's file: said with its source)
            raise self._refused(f"the HTTP API key from the file {path} is {n_bytes(len(key))}; it must be at least"
                                f" {MIN_API_KEY_BYTES}", (None, "data_dir"), named=False)
        return (key.decode(),)

    def _check_api_keys(self) -> None:
        """ConfigError, saying where they came from, for ``api_keys`` that
        are empty or shorter than :data:`MIN_API_KEY_BYTES` (never quoted)."""
        for i, key in enumerate(self.api_keys, 1):
            size = len(key.strip().encode())
            if not size:
                raise self._refused("api_keys: an API key cannot be empty", (None, "api_keys"))
            if size < MIN_API_KEY_BYTES:
                raise self._refused(f"api_keys: HTTP API key {i} is {n_bytes(size)}; it must be at least"
                                    f" {MIN_API_KEY_BYTES}", (None, "api_keys"))
            from .http.server import api_key_problem

            problem = api_key_problem(key.strip())
            if problem is not None:
                raise self._refused(f"api_keys: HTTP API key {i} {problem}", (None, "api_keys"))

    def _check_events_for_webhooks(self) -> None:
        """ConfigError for ``[server] events = false`` beside a ``[webhooks]
        url``: the sender is a consumer of the event log, so it needs one.
        Left unset, a webhook URL turns events on; said false, it was turned
        on all the same, without a word (a new user's trial)."""
        if self.webhooks.get("url") and "events" in self.server and not self.server["events"]:
            raise self._refused("server.events: webhooks need the event log (the sender reads it): set events = true,"
                                " or leave events unset (a webhooks.url turns it on)", ("server", "events"))

    def webhook_secret(self) -> bytes:
        """``[webhooks] secret`` ($PIMCORE_WEBHOOKS_SECRET), else
        ``<data_dir>/webhook-secret`` (created on first use, mode 0600)."""
        given = self.webhooks.get("secret")
        if given is not None:
            if not given.strip():
                raise self._refused("webhooks.secret: cannot be empty", ("webhooks", "secret"))
            return given.strip().encode()
        from .auth import load_or_create_secret
        from .webhooks import WEBHOOK_SECRET_FILE

        try:
            return load_or_create_secret(self.data_dir, WEBHOOK_SECRET_FILE)
        except ValueError as exc:
            raise self._refused(str(exc), (None, "data_dir"), named=False) from None

    def webhook_config(self, secret: Optional[bytes] = None) -> Any:  # -> Optional[pimcore.webhooks.WebhookConfig]
        """The event webhook's settings, or None without ``[webhooks] url``.
        ConfigError naming the key for an unusable value.  ``secret``: use
        this one (default :meth:`webhook_secret`)."""
        w = dict(self.webhooks)
        if not w.get("url"):
            if set(w) - {"url", "secret"}:
                key = sorted(set(w) - {"url", "secret"})[0]
                raise self._refused(f"webhooks: {key} is set but webhooks.url is not", ("webhooks", key))
            return None
        from .webhooks import WebhookConfig

        w.pop("secret", None)
        if "events" in w:
            w["events"] = tuple(w["events"])
        try:
            return WebhookConfig(secret=secret or self.webhook_secret(), **w)
        except (TypeError, ValueError) as exc:
            raise self._named(str(exc)) from None

    def moderation_config(self, secret: Optional[bytes] = None) -> Any:  # -> Optional[pimcore.webhooks.ModerationConfig]
        """The moderation webhook's settings, or None without ``[moderation]
        url``.  Its secret: ``[moderation] secret``, else the webhook one."""
        m = dict(self.moderation)
        if not m.get("url"):
            if set(m) - {"url", "secret"}:
                key = sorted(set(m) - {"url", "secret"})[0]
                raise self._refused(f"moderation: {key} is set but moderation.url is not", ("moderation", key))
            return None
        if "policy" not in m:
            raise ConfigError('moderation.policy: required with moderation.url: "open" (no answer lets a message'
                              ' through) or "closed" (no answer refuses it)')
        from .webhooks import ModerationConfig

        own = m.pop("secret", None)
        if own is not None and not own.strip():
            raise self._refused("moderation.secret: cannot be empty", ("moderation", "secret"))
        try:
            return ModerationConfig(secret=secret or (own.strip().encode() if own else self.webhook_secret()), **m)
        except (TypeError, ValueError) as exc:
            raise self._named(str(exc)) from None

    def http_config(self, ssl_context: Any = None, api_keys: tuple[str, ...] = ()) -> Any:  # -> HttpConfig
        """The HTTP listener's :class:`~pimcore.http.HttpConfig` (None without
        one).  ConfigError for another ``[http]`` key set to other than its
        default without ``listen`` (it would go unused: as for [webhooks]
        and [moderation])."""
        ep = self.http_endpoint()
        if ep is None:
            import dataclasses

            from .http import HttpConfig

            # (Keys at their defaults change nothing: --print-config writes
            # them all, and reads back without a listener.)
            defaults = {f.name: f.default for f in dataclasses.fields(HttpConfig)}
            extra = sorted(k for k, v in self.http_options.items() if k != "listen" and v != defaults.get(k, v))
            if extra:
                raise self._refused(f"http: {extra[0]} is set but http.listen is not (no HTTP listener)",
                                    ("http", extra[0]))
            return None
        from .http import HttpConfig

        opts = {k: v for k, v in self.http_options.items() if k != "listen"}
        try:
            return HttpConfig(host=ep.host, port=ep.port, scheme=ep.scheme, ssl_context=ssl_context if ep.secure else None,
                              api_keys=api_keys, **opts)
        except (TypeError, ValueError) as exc:
            raise self._section_error("http", exc) from None

    def effective(self) -> dict[str, Any]:
        """Every setting with its effective value (defaults filled in),
        nested like the file; secrets replaced by "<redacted>"."""
        limits = replace(DEFAULT_BROKER_CONFIG.limits)
        try:
            limits = replace(limits, **self.limits)
        except (TypeError, ValueError) as exc:
            raise self._named(_limits_text(exc)) from None
        b = DEFAULT_BROKER_CONFIG
        base = ServerConfig()
        server: dict[str, Any] = {
            "idle_timeout": b.idle_timeout / SECOND, "login_timeout": b.login_timeout / SECOND,
            "ack_delay": b.ack_delay / SECOND,
            "control_rate": b.control_rate, "control_burst": b.control_burst, "events": b.record_events,
            "typing_ttl": b.typing_ttl / SECOND,
            **{k: getattr(b, k) for k in _EPHEMERAL_KEYS if k != "typing_ttl"},
            "history_max_age": b.history_max_age / SECOND, "history_max_count": b.history_max_count,
            "reclaim_interval": b.reclaim_interval / SECOND, "max_outbound_total": b.max_outbound_total,
            "dedupe_window": b.dedupe_window / SECOND,
            **{
                k: getattr(base, k)
                for k in _SERVER_KEYS
                if k not in ("idle_timeout", "login_timeout", "ack_delay", "control_rate", "control_burst", "events",
                             "history_max_age", "history_max_count", "reclaim_interval", "max_outbound_total",
                             "dedupe_window")
                and k not in _EPHEMERAL_KEYS
            },
        }
        server.update(self.server)
        if self.webhooks.get("url"):
            server["events"] = True  # webhooks read the event log
        from .http.server import HttpConfig

        hbase = HttpConfig()
        http: dict[str, Any] = {k: getattr(hbase, k) for k in _HTTP_KEYS if k != "listen"}
        http.update({k: v for k, v in self.http_options.items() if k != "listen"})
        if self.http:
            http["listen"] = self.http
        # (Paths absolute: a file's relative path is read relative to the
        # file, so printed relative and saved elsewhere it named another.)
        out: dict[str, Any] = {
            "data_dir": str(self.data_dir.absolute()),
            "durability": self.durability,
            "listen": list(self.listen),
            "log_level": self.log_level,
            "log_format": self.log_format,
        }
        if self.secret is not None:
            out["secret"] = "<redacted>"
        if self.secret_file is not None:
            out["secret_file"] = str(self.secret_file.absolute())
        if self.content_filter is not None:
            out["content_filter"] = self.content_filter
        if self.api_keys:  # (unset: left out; ``api_keys = []`` is refused)
            out["api_keys"] = ["<redacted>"] * len(self.api_keys)
        tls = {k: str(Path(v).absolute()) for k, v in (("cert", self.cert), ("key", self.key)) if v is not None}
        if tls:  # (unset: left out, not an empty [tls])
            out["tls"] = tls
        out["limits"] = {f.name: getattr(limits, f.name) for f in fields(limits)}
        out["server"] = {k: server[k] for k in sorted(server)}
        out["http"] = {k: http[k] for k in sorted(http)}
        if self.store is not None:
            out["store"] = {"namespace": self.store_namespace, "url": self.store}
            if self.store_address_map:
                out["store"]["address_map"] = list(self.store_address_map)
            if self.store_read_fanout_above is not None:
                out["store"]["read_fanout_above"] = self.store_read_fanout_above
        if self.webhooks.get("url"):
            from .webhooks import WebhookConfig

            wdefaults = {f.name: f.default for f in fields(WebhookConfig)
                         if f.name not in ("url", "secret")}
            wh: dict[str, Any] = {**wdefaults, **self.webhooks}
            wh["events"] = list(wh["events"])
            if not wh["events"]:  # (every type: left out, as ``events = []`` is refused)
                del wh["events"]
            wh["secret"] = "<redacted>" if "secret" in self.webhooks else f"<{self.data_dir.absolute() / 'webhook-secret'}>"
            wh["url"] = shown_url(wh["url"])  # (a password or a query token: a comment, as a secret's)
            out["webhooks"] = {k: wh[k] for k in sorted(wh)}
        out["messages"] = {
            k: self.messages.get(k, getattr(b, k) / SECOND) for k in ("delete_window", "edit_window", "recall_window")
        }
        if self.moderation.get("url"):
            mod: dict[str, Any] = {"timeout_ms": 2000, **self.moderation}
            mod["secret"] = "<redacted>" if "secret" in self.moderation else "<the webhook secret>"
            mod["url"] = shown_url(mod["url"])
            out["moderation"] = {k: mod[k] for k in sorted(mod)}
        return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a TOML basic string


def _toml_line(section: Optional[str], key: str, value: Any) -> str:
    """``key = value``; a secret's (:data:`_SECRET_KEYS`, printed redacted)
    as a comment saying how to give it: read back, ``"<redacted>"`` was
    taken as the secret itself (``api_keys`` refused as too short)."""
    line = f"{key} = {_toml_value(value)}"
    if key == "url" and isinstance(value, str) and "<redacted>" in value:  # (shown_url)
        return f"# {line}  (holds a secret, not printed: give it in the file or as ${env_name(section, key)})"
    if (section, key) not in _SECRET_KEYS:
        return line
    if value == "<redacted>" or (isinstance(value, list) and value and set(value) == {"<redacted>"}):
        return f"# {line}  (a secret, not printed: give it in the file or as ${env_name(section, key)})"
    return f"# {key}: not set, so {str(value).strip('<>')} is used"  # (effective()'s "<the webhook secret>")


def render_toml(doc: Mapping[str, Any]) -> str:
    """A flat TOML document: top-level scalars, then one table per section
    (an empty one left out).  Secrets are comments (:func:`_toml_line`), so
    ``serve --print-config``'s output reads back as the same settings."""
    lines = [_toml_line(None, k, v) for k, v in doc.items() if not isinstance(v, Mapping)]
    for k, v in doc.items():
        if isinstance(v, Mapping) and v:
            lines += ["", f"[{k}]", *(_toml_line(k, kk, vv) for kk, vv in v.items())]
    return "\n".join(lines) + "\n"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {_said_toml_error(path, str(exc))}") from None
    except UnicodeDecodeError as exc:  # (tomllib decodes before parsing)
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except ValueError:
        # tomllib's int() of more digits than Python reads: its message
        # is advice to raise sys.set_int_max_str_digits().  Said by where
        # the number is and how long it is, found in the file itself.
        raise ConfigError(_long_number(path)) from None
    return _check_doc(doc, str(path))


_TOML_AT = re.compile(r"\(at line (\d+), column (\d+)\)$")
_TOML_KEY = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*"""
_TOML_KEY_LINE = re.compile(rf"\s*({_TOML_KEY})\s*=")
_TOML_TABLE_LINE = re.compile(rf"\s*\[\s*({_TOML_KEY})\s*\]\s*(?:#.*)?$")


def _said_toml_error(path: Path, text: str) -> str:
    """tomllib's message ``text`` about ``path``; "Cannot overwrite a value
    (at line 2, column 15)", a key given twice, said with the key's name
    (``limits.window is given twice ...``), found from the line the error
    is at: the key whose value ends there (on a line of its own or a
    multi-line one's first), or the [table] declared there over a key."""
    at = _TOML_AT.search(text)
    twice = re.match(r"Cannot declare \((.*)\) twice ", text)
    if twice is not None and at is not None:  # "Cannot declare ('limits',) twice": Python's tuple
        table = ".".join(re.findall(r"'([^']*)'", twice.group(1))) or twice.group(1)
        return f"the table [{table}] is declared twice {at.group(0)}: a table may be declared once"
    if not text.startswith("Cannot overwrite a value") or at is None:
        return text
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError):  # pragma: no cover - it was just read
        return text
    line = int(at.group(1))
    name = None
    for i in range(min(line, len(lines)) - 1, -1, -1):
        table = _TOML_TABLE_LINE.match(lines[i])
        if table is not None:
            if i == line - 1:  # `http = "URL"`, then [http]
                return f"[{table.group(1)}] is given twice, as a table and as a key above it {at.group(0)}"
            break
        key = _TOML_KEY_LINE.match(lines[i])
        if key is not None:
            name = key.group(1)
            section = None
            for j in range(i - 1, -1, -1):
                table = _TOML_TABLE_LINE.match(lines[j])
                if table is not None:
                    section = table.group(1)
                    break
            name = f"{section}.{name}" if section else name
            break
    if name is None:  # pragma: no cover - a line tomllib read holds its key
        return text
    return f"{name} is given twice {at.group(0)}: a key may be given once"


def _long_number(path: Path) -> str:
    """Where in ``path`` the first number of more digits than Python reads
    is, in words (for a ValueError out of tomllib)."""
    limit = sys.get_int_max_str_digits()
    data = path.read_bytes()
    found = re.search(rb"\d{%d,}" % (limit + 1), data) if limit else None
    if found is None:
        return f"{path}: holds a number Python cannot read"
    line = data.count(b"\n", 0, found.start()) + 1
    return f"{path}: line {line}: a number of {len(found.group()):,} digits (at most {limit:,} are read)"


def _misplaced(doc: dict[str, Any], keys: set[str], section: Optional[str], as_json: bool) -> str:
    """The hint after "unknown keys" for those of ``keys`` (given in
    ``section``, None: at the top) that are settings elsewhere: where each
    belongs, as the form of ``doc`` says it -- ``; events belongs in
    [server]`` (TOML) or ``; did you mean {"server": {"events": true}}?``
    (a settings document: the C ABI's JSON, open_pimcore_thread's mapping,
    where the keyword ``events=True`` suggests the flat form).  "" if none."""
    table = doc if section is None else doc.get(section, {})
    said = []
    for key in sorted(keys):
        homes = [s for s in (None, *_SECTIONS) if s != section and (s, key) in SCHEMA
                 and not (s is None and key in _SECTIONS)]
        fits = [h for h in homes if _fits(SCHEMA[(h, key)], table[key])]
        homes = fits or homes  # (events = true is [server]'s, not [webhooks]' list of kinds)
        if not homes:
            continue
        if not as_json:
            said.append(f"{key} belongs " + " or ".join("at the top (before any [section])" if h is None else f"in [{h}]"
                                                        for h in homes))
            continue
        try:
            value = json.dumps(table[key])
        except (TypeError, ValueError):
            value = "..."
        said.append(" or ".join(f'{{"{key}": {value}}} at the top' if h is None else f'{{"{h}": {{"{key}": {value}}}}}'
                                for h in homes))
    if not said:
        return ""
    return f"; did you mean {' and '.join(said)}?" if as_json else f"; {'; '.join(said)}"


def _fits(typ: str, value: Any) -> bool:
    """Whether ``value`` (as given, before the type check) is of the
    schema type ``typ``: a string fits all (the environment's form)."""
    if isinstance(value, str):
        return True
    if isinstance(value, bool):
        return typ == "bool"
    if isinstance(value, (int, float)):
        return typ in ("int", "float")
    if isinstance(value, list):
        return typ == "list"
    return False


#: ``pimcore serve`` flags that are no setting (no key, no variable): an
#: unknown key or ``PIMCORE_*`` of their name is said to be one.
_FLAG_ONLY = ("web", "demo", "print_config")


def _close_match(name: str, choices: Any) -> Optional[str]:
    """The one of ``choices`` ``name`` is most likely a typo of, compared
    case- and ``_``-insensitively (``Data_Dir``, ``sendrate``, ``data_dri``);
    None if none is close (difflib)."""
    import difflib

    def norm(text: str) -> str:
        return text.lower().replace("_", "").replace("-", "")

    by_norm = {norm(c): c for c in sorted(choices)}
    if norm(name) in by_norm:
        return by_norm[norm(name)]
    close = difflib.get_close_matches(norm(name), list(by_norm), n=1)
    return by_norm[close[0]] if close else None


def _typo_hint(doc: Mapping[str, Any], keys: set[str], choices: Any, section: Optional[str], as_json: bool) -> str:
    """The hint after "unknown keys" for those of ``keys`` that are none of
    the settings' names but close to one of ``choices``: ``; did you mean
    data_dir?``, ``[limits]`` for a table at the top; a serve flag's name
    (``web``) said to be a flag only.  "" if none."""
    table = doc if section is None else doc.get(section, {})
    said = []
    for key in sorted(keys):
        if any((s, key) in SCHEMA for s in (None, *_SECTIONS)):
            continue  # (said by _misplaced)
        if section is None and key.lower().replace("-", "_") in _FLAG_ONLY:
            said.append(f"{key} is a flag of pimcore serve only (--{key.lower().replace('_', '-')}), not a setting")
            continue
        match = _close_match(key, choices)
        if match is None:
            continue
        if as_json:
            said.append(f"did you mean {json.dumps(match)} for {json.dumps(key)}?")
        elif section is None and match in _SECTIONS and isinstance(table.get(key), Mapping):
            said.append(f"did you mean [{match}] for [{key}]?")
        else:
            said.append(f"did you mean {match} for {key}?")
    return "".join(f"; {text}" for text in said)


#: Sections a string stands for one key of: ``http = "URL"`` is short for
#: ``[http] listen``, ``store = "URL"`` for ``[store] url``.  A refusal of
#: the string names the section, as written (``http: cannot be empty``).
_SHORT_FORMS = {"http": "listen", "store": "url"}


def _check_doc(doc: dict[str, Any], where: str, *, as_json: bool = False) -> dict[str, Any]:
    """``doc`` (a configuration file's tables, or the same shape from JSON:
    ``as_json``, and errors say its keys in that form) with its keys
    checked; ``where`` names it in errors.  An unknown key that is a setting
    of another section (or of the top) is said with where it belongs."""
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}{_misplaced(doc, unknown, None, as_json)}"
                          f"{_typo_hint(doc, unknown, _TOP_KEYS, None, as_json)}")
    for section, allowed in _SECTIONS.items():
        value = doc.get(section, {})
        if isinstance(value, str) and section in _SHORT_FORMS:
            continue  # (read as its table's key by _layer_from_doc)
        if not isinstance(value, dict):
            also = f' or a URL string ({section} = "tcp://HOST:PORT")' if section == "http" else ""
            raise ConfigError(f"{where}: {section}: expected a table [{section}]{also}, got {_show(value)}")
        bad = set(value) - set(allowed)
        if bad:
            raise ConfigError(f"{where}: unknown keys in [{section}]: {sorted(bad)}"
                              f"{_misplaced(doc, bad, section, as_json)}{_typo_hint(doc, bad, allowed, section, as_json)}")
    return doc


def _layer_from_file(path: Path) -> dict[tuple[Optional[str], str], Any]:
    return _layer_from_doc(_read_toml(path), path.parent, str(path))


def _layer_from_doc(doc: dict[str, Any], here: Path, where: str) -> dict[tuple[Optional[str], str], Any]:
    layer: dict[tuple[Optional[str], str], Any] = {}
    for (section, key), typ in SCHEMA.items():
        table = doc.get(section, {}) if section else doc
        name = f"{section}.{key}" if section else key
        if isinstance(table, str) and section is not None:  # http = "URL": said as written, not as http.listen
            table, name = {_SHORT_FORMS[section]: table}, section
        if key not in table or (section is None and key in _SECTIONS):
            continue
        try:
            value = _in_range(name, _check(name, typ, table[key]))
        except ConfigError as exc:
            raise _from(str(exc), name, ("file", where)) from None
        if typ == "path":
            value = Path(value) if os.path.isabs(value) else here / value
        layer[(section, key)] = value
    return layer


#: The token secret's two settings (load_settings: one layer gives one of them).
_TOKEN_SECRET: tuple[_Key, _Key] = ((None, "secret"), (None, "secret_file"))


#: ``PIMCORE_*`` variables that are not settings but are the project's own
#: (read by the build, the test suite, the C ABI): allowed next to the
#: settings' variables; any other ``PIMCORE_*`` is a ConfigError, like an
#: unknown key in the file (a typo must not be ignored silently).
OTHER_ENV = frozenset({"PIMCORE_CONFIG", "PIMCORE_BACKEND", "PIMCORE_PYTHON", "PIMCORE_NO_EXT",
                       "PIMCORE_API_KEY",  # the key of `pimcore group/purge/retention --http` (cli.py)
                       "PIMCORE_CHROMIUM", "PIMCORE_ARTIFACTS"})  # the browser tests' (tests/test_js_client.py)
OTHER_ENV_PREFIXES = ("PIMCORE_REQUIRE_", "PIMCORE_CHAOS_", "PIMCORE_CRASH_")


#: What PIMCORE_<SECTION>_<KEY> gives for the settings whose variable is
#: shorter (env_name): the variable to use instead.
_RULE_NAMES = {"PIMCORE_HTTP_LISTEN": "PIMCORE_HTTP", "PIMCORE_STORE_URL": "PIMCORE_STORE"}


def _check_env_names(env: Mapping[str, str]) -> None:
    known = {env_name(section, key) for section, key in SCHEMA}
    for name, text in env.items():
        if (not name.startswith("PIMCORE_") or name in known or name in OTHER_ENV
                or name.startswith(OTHER_ENV_PREFIXES) or text == ""):
            continue
        flag = name[len("PIMCORE_"):].lower()
        if flag in _FLAG_ONLY:  # ($PIMCORE_WEB suggested $PIMCORE_STORE)
            raise ConfigError(f"unknown environment variable ${name}: --{flag.replace('_', '-')} is a flag of"
                              f" pimcore serve only, with no variable or setting: give"
                              f" pimcore serve --{flag.replace('_', '-')}")
        # (The rule's name of a setting with a short variable: $PIMCORE_HTTP_LISTEN
        # suggested the broker's $PIMCORE_LISTEN.)
        close = _RULE_NAMES.get(name) or _close_match(name, known)
        hint = f" (did you mean ${close}?)" if close else ""
        raise ConfigError(f"unknown environment variable ${name}: not a setting{hint}; settings are "
                          "PIMCORE_<KEY> or PIMCORE_<SECTION>_<KEY> (pimcore serve --print-config lists them)")


def _layer_from_env(env: Mapping[str, str]) -> dict[tuple[Optional[str], str], Any]:
    _check_env_names(env)
    layer: dict[tuple[Optional[str], str], Any] = {}
    for (section, key), typ in SCHEMA.items():
        name = env_name(section, key)
        text = env.get(name)
        if text is None or text == "":
            continue  # an empty variable is unset (docker-compose "FOO=")
        key_name = f"{section}.{key}" if section else key
        try:
            value = _in_range(key_name, _parse_env(key_name, typ, text))
        except ConfigError as exc:
            raise _from(str(exc), key_name, ("env", f"${name}")) from None
        layer[(section, key)] = Path(value) if typ == "path" else value
    return layer


def _layer_from_flags(flags: Mapping[str, Any], options: bool) -> dict[tuple[Optional[str], str], Any]:
    """The flags' layer; a refused one named as the command-line option if
    ``options`` (``--data-dir``), else as the keyword an embedding host gave."""
    layer: dict[tuple[Optional[str], str], Any] = {}
    for name, value in flags.items():
        if value is None:
            continue
        if name in _LIMIT_KEYS:
            where: tuple[Optional[str], str] = ("limits", name)
        elif name in _SERVER_KEYS:
            where = ("server", name)
        elif name in ("cert", "key"):
            where = ("tls", name)
        elif name == "http":
            where = ("http", "listen")
        elif name == "store":
            where = ("store", "url")
        elif name in ("webhooks", "moderation") and isinstance(value, Mapping):
            # A whole section at once (open_pimcore(webhooks={"url": ...})).
            for key, v in value.items():
                if (name, key) not in SCHEMA:
                    close = _close_match(str(key), _SECTIONS[name])
                    raise ConfigError(f"unknown setting {name}.{key}"
                                      + (f" (did you mean {name}.{close}?)" if close else ""))
                if v is not None:
                    layer[(name, key)] = _check(f"{name}.{key}", SCHEMA[(name, key)], v)
            continue
        elif name in _TOP:
            where = (None, name)
        else:
            close = _close_match(name, _FLAG_NAMES)
            raise ConfigError(f"unknown setting {quote_arg(name)}" + (f" (did you mean {close}?)" if close else ""))
        typ = SCHEMA[where]
        if typ == "bool" and not isinstance(value, bool):
            # A keyword argument (open_pimcore(events="true")): not TOML's words.
            raise ConfigError(f"{name}: expected a bool (True or False), got {type(value).__name__} {value!r:.60}")
        # (open_pimcore's own defaults, listen=[] and http="": no listener
        # unless asked for there, as an embedding host may say too.)
        empty_ok = not options and where in ((None, "listen"), ("http", "listen"))
        value = _check(f"--{name.replace('_', '-')}" if options else name, typ, value, empty_ok)
        layer[where] = Path(value) if typ == "path" else value
    return layer


#: The keywords load_settings (open_pimcore) takes as flags.
_FLAG_NAMES = frozenset(_LIMIT_KEYS | _SERVER_KEYS | set(_TOP) | {"cert", "key", "http", "store", "webhooks",
                                                                     "moderation"})


#: The listener settings (load_settings' ``embedded``: its host's only).
_LISTENERS: frozenset[tuple[Optional[str], str]] = frozenset({(None, "listen"), ("http", "listen")})


def load_settings(
    config_file: Optional[str] = None,
    *,
    env: Optional[Mapping[str, str]] = None,
    document: Optional[Mapping[str, Any]] = None,
    flags_are_options: bool = False,
    embedded: bool = False,
    **flags: Any,
) -> ServeSettings:
    """Settings from the defaults, then ``config_file`` (or
    ``$PIMCORE_CONFIG``; paths in it are relative to the file), then
    ``document`` (the file's tables as a mapping, e.g. parsed JSON; paths
    relative to the working directory), then the
    environment (``env``, default ``os.environ``; see the module docstring
    for the names), then the flags that are not None.  ConfigError (naming
    the key, and where its value came from) for anything that cannot be
    used; a flag is named as the keyword given (``max_connections``), or as
    the command-line option if ``flags_are_options`` (``--max-connections``).

    ``embedded``: the settings of an embedded broker (open_pimcore,
    open_pimcore_thread, the C ABI), whose listeners are its host's: ``listen``
    and ``[http] listen`` come from the flags (its arguments), else from
    ``document`` or the ``config_file`` passed, else there is none -- never
    from the environment (``$PIMCORE_LISTEN``, ``$PIMCORE_HTTP``, a
    ``$PIMCORE_CONFIG`` file), which are ``pimcore serve``'s.  Every other
    setting as above."""
    env = os.environ if env is None else env
    #: An embedded broker's listener settings, taken from its host only.
    hosts_only = (_LISTENERS if embedded else ())
    merged: dict[_Key, Any] = {}
    origins: dict[_Key, _Origin] = {}

    def take(layer: dict[_Key, Any], origin: Callable[[_Key], Optional[_Origin]]) -> None:
        # ``secret`` and ``secret_file`` are one setting, the token secret,
        # given two ways: a layer that gives one replaces the other of the
        # layers below it (an environment's $PIMCORE_SECRET_FILE beats the
        # file's secret); one layer giving both is refused, which of them
        # was meant is not ours to guess (the secret won, silently).
        given = [k for k in _TOKEN_SECRET if k in layer]
        if len(given) == 2:
            said = [f"{k[1]} ({_said_source(origin(k), 'given')})" for k in given]
            raise ConfigError(f"{said[0]} and {said[1]} are both given: give one of them (secret_file names a file"
                              " that holds the secret)")
        for k in given:
            other = _TOKEN_SECRET[1 - _TOKEN_SECRET.index(k)]
            merged.pop(other, None)
            origins.pop(other, None)
        merged.update(layer)
        for key in layer:
            o = origin(key)
            if o is None:
                origins.pop(key, None)
            else:
                origins[key] = o

    if config_file == "":  # (not $PIMCORE_CONFIG's file, silently: `pimcore serve --config ''` is refused before)
        raise ConfigError("config_file: cannot be empty")
    hosts_file = bool(config_file)
    config_file = config_file or env.get("PIMCORE_CONFIG") or None
    config_dir = None
    if config_file:
        path = Path(config_file)
        file_layer = _layer_from_file(path)
        if not hosts_file:
            file_layer = {k: v for k, v in file_layer.items() if k not in hosts_only}
        take(file_layer, lambda key: ("file", str(path)))
        config_dir = path.parent
    if document is not None:
        if not isinstance(document, Mapping):
            raise ConfigError(f"settings: expected an object, got {_show(document)}")
        take(_layer_from_doc(_check_doc(dict(document), "settings", as_json=True), Path("."), "settings"),
             lambda key: ("file", "settings"))
    env_layer = {k: v for k, v in _layer_from_env(env).items() if k not in hosts_only}  # (still checked)
    take(env_layer, lambda key: ("env", "$" + env_name(*key)))
    flag_layer = _layer_from_flags(flags, flags_are_options)
    take(flag_layer, lambda key: _flag_origin(key, flags_are_options))

    top = {k: v for (s, k), v in merged.items() if s is None}
    tls = {k: v for (s, k), v in merged.items() if s == "tls"}
    http = {k: v for (s, k), v in merged.items() if s == "http"}
    s = ServeSettings(
        data_dir=top.get("data_dir", Path("pimcore-data")),
        durability=top.get("durability", "sync"),
        listen=tuple(top.get("listen", () if embedded else (DEFAULT_LISTEN,))),
        secret=top.get("secret"),
        secret_file=top.get("secret_file"),
        content_filter=top.get("content_filter"),
        cert=str(tls["cert"]) if "cert" in tls else None,
        key=str(tls["key"]) if "key" in tls else None,
        limits={k: v for (sec, k), v in merged.items() if sec == "limits"},
        server={k: v for (sec, k), v in merged.items() if sec == "server"},
        config_dir=config_dir,
        http=http.pop("listen", None) or None,
        http_options=http,
        api_keys=tuple(top.get("api_keys", ())),
        log_level=str(top.get("log_level", "info")).lower(),
        log_format=str(top.get("log_format", "text")).lower(),
        webhooks={k: v for (sec, k), v in merged.items() if sec == "webhooks"},
        moderation={k: v for (sec, k), v in merged.items() if sec == "moderation"},
        messages={k: v for (sec, k), v in merged.items() if sec == "messages"},
        store=merged.get(("store", "url")) or None,
        store_namespace=str(merged.get(("store", "namespace"), "pim")),
        store_address_map=tuple(merged.get(("store", "address_map"), ())),
        store_read_fanout_above=merged.get(("store", "read_fanout_above")),
        origins=origins,
        given=frozenset(merged),
    )
    if s.store is not None:
        from .store.redis import parse_url as parse_store_url
        from .ids import valid_id

        try:
            parse_store_url(s.store)
        except ValueError as exc:
            raise s._refused(f"store.url: {exc}", ("store", "url")) from None
        if not valid_id(s.store_namespace):
            raise s._refused(f"store.namespace: not a valid id: {_show(s.store_namespace)}", ("store", "namespace"))
        from .store.redis import parse_address_map

        try:
            parse_address_map(s.store_address_map)
        except ValueError as exc:
            raise s._refused(f"store.address_map: {exc}", ("store", "address_map")) from None
        if s.store_read_fanout_above is not None and s.store_read_fanout_above < 0:
            raise s._refused(f"store.read_fanout_above: must be >= 0 members, not {s.store_read_fanout_above}",
                             ("store", "read_fanout_above"))
    elif s.store_address_map:
        raise s._refused("store.address_map: only for a Redis store (set store.url)", ("store", "address_map"))
    elif s.store_read_fanout_above is not None:
        raise s._refused("store.read_fanout_above: only for a Redis store (set store.url)",
                         ("store", "read_fanout_above"))
    elif ("store", "namespace") in merged:  # (it was taken and ignored: a trial)
        raise s._refused("store.namespace: only for a Redis store (set store.url)", ("store", "namespace"))
    for key, value, allowed in (("durability", s.durability, DURABILITY_MODES), ("log_level", s.log_level, LOG_LEVELS),
                                ("log_format", s.log_format, LOG_FORMATS)):
        if value not in allowed:
            raise s._refused(f"{key}: expected one of {', '.join(allowed)}, got {_show(value)}", (None, key))
    for key, value in s.messages.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2**63 / SECOND:
            raise s._refused(f"messages.{key}: expected a number of seconds >= 0 (0 = no limit), got {_show(value)}",
                             ("messages", key))
    s._check_api_keys()  # (so that --print-config refuses them too)
    # Check the webhook sections now (naming the key), without creating a secret.
    s.webhook_config(secret=b"-")
    s._check_events_for_webhooks()
    s.moderation_config(secret=b"-")
    if not s.http:
        s.http_config()  # ([http] keys without a listener: a trial's were taken and unused)
    # No listener is fine for an embedded broker (pimcore.embed); `pimcore
    # serve` refuses it itself.
    return s


# ---------------------------------------------------------------- the token secret and the data directory
# (``pimcore serve``, ``pimcore token`` and pimcore.embed.open_pimcore: one
# set of refusals, each naming where its value came from.)


def _check_data_dir(settings: ServeSettings) -> None:
    """ConfigError in words, saying where the path came from, when the data
    directory or the nearest of its parents that exists is no directory (it
    was a bare "[Errno 20] Not a directory: '.../secret'"), or is a symbolic
    link to nothing: mkdir does not make a link's target, it said "[Errno
    17] File exists".  Also when it is a store's own directory (``pimcore
    inspect`` takes either): it holds LMDB's data.mdb or lock.mdb, or the
    command log's log/ (pimcore.store.lmdb, wal).  It was taken as a data
    directory, and a new secret and a nested ``store/`` were made inside a
    live broker's store."""
    data_dir = seen = settings.data_dir
    held = [name for name in ("data.mdb", "lock.mdb") if (data_dir / name).exists()]
    if any((data_dir / "log" / name).exists() for name in ("checkpoint", "log-0", "log-1")):
        held.append("the command log folder log/")  # (a folder "log" of the user's own is no store's)
    if held:  # (serve would make a secret and a store/ inside the live store)
        parent = data_dir.resolve().parent if data_dir.name in ("", ".", "..") else data_dir.parent
        raise settings._refused(
            f"the data directory {data_dir} is a store directory (it holds {', '.join(held)}), not a data directory:"
            f" give its parent, {parent}, as the data directory", (None, "data_dir"), named=False)
    while not seen.exists() and not seen.is_symlink() and seen.parent != seen:
        seen = seen.parent
    if seen.is_symlink() and not seen.exists():
        what = f"{seen} is a symbolic link to {os.readlink(seen)}, which does not exist"
    elif seen.exists() and not seen.is_dir():
        what = f"{seen} is a file, not a directory"
    else:
        return
    said = f"the data directory {what}" if seen == data_dir else f"the data directory {data_dir} cannot be made: {what}"
    raise settings._refused(said, (None, "data_dir"), named=False)


def _kept_secret(settings: ServeSettings) -> bytes:
    """``<data_dir>/secret``, made on first use; a file there that cannot be
    used is refused saying where the data directory came from."""
    from .auth import load_or_create_secret

    try:
        return load_or_create_secret(settings.data_dir)
    except ValueError as exc:
        raise settings._refused(str(exc), (None, "data_dir"), named=False) from None


def _long_enough(settings: ServeSettings, secret: bytes, source: str,
                 path_key: Optional[tuple[Optional[str], str]] = None) -> bytes:
    """``secret`` if it is long enough to sign tokens with, else a ConfigError
    saying where it came from ("the token secret from $PIMCORE_SECRET is 5
    bytes; it must be at least 32"): JwtAuthenticator's own refusal names no
    source.  ``path_key``: the setting ``source``'s file came from, said as
    every refused path is ("(from --secret-file)")."""
    from .auth import MIN_SECRET_BYTES

    if len(secret) >= MIN_SECRET_BYTES:
        return secret
    text = f"the token secret from {source} is {n_bytes(len(secret))}; it must be at least {MIN_SECRET_BYTES}"
    if path_key is None:
        raise ConfigError(text)
    raise settings._refused(text, path_key, named=False)


def _said_source(origin: Optional[_Origin], default: str) -> str:
    """Where a value came from, as a refusal's "from ..." says it: the file,
    ``$NAME``, ``--option``, or ``the NAME argument`` (a keyword of
    load_settings / open_pimcore)."""
    if origin is None:
        return default
    kind, label = origin
    return f"the {label} argument" if kind == "flag" and not label.startswith("--") else label


def store_refusal(settings: ServeSettings, exc: OSError, store_dir: Path) -> ConfigError:
    """A store (``<data_dir>/store``, or the Redis store's note) that could
    not be opened or made, in words and saying where the data directory came
    from: "cannot make the store d/store: Read-only file system (from
    --data-dir)"; it was a bare "[Errno 30] Read-only file system: 'd/store'"."""
    where = Path(exc.filename) if isinstance(exc.filename, (str, Path)) else store_dir
    if where == settings.data_dir:
        what = f"the data directory {where}"
    elif where == store_dir:
        what = f"the store {where}"
    else:
        what = str(where)
    verb = "open" if where.exists() else "make"
    return settings._refused(f"cannot {verb} {what}: {exc.strerror or exc}", (None, "data_dir"), named=False)


def token_secret(settings: ServeSettings, *, create: bool = True) -> Optional[bytes]:
    """The token secret: ``secret`` ([secret], $PIMCORE_SECRET, a keyword),
    else ``secret_file``, else ``<data_dir>/secret`` (made on first use,
    mode 0600, unless not ``create``: then None if there is none).
    ConfigError naming where it came from for one that cannot be used: a
    file that cannot be read, or a secret shorter than
    auth.MIN_SECRET_BYTES ("the token secret from $PIMCORE_SECRET is 5
    bytes; it must be at least 32")."""
    from .auth import SECRET_FILE

    if settings.secret:
        source = _said_source(settings.origins.get((None, "secret")), "the secret setting")
        return _long_enough(settings, settings.secret.encode(), source)
    env = os.environ.get("PIMCORE_SECRET")
    if env and settings.secret_file is None:  # (a secret_file a layer above gave replaces it: load_settings)
        return _long_enough(settings, env.encode(), "$PIMCORE_SECRET")
    if settings.secret_file is not None:
        key: _Key = (None, "secret_file")
        try:
            text = settings.secret_file.read_text().strip()
        except OSError as exc:  # said as the token secret's file, not a bare errno
            raise settings._refused(f"the token secret file {settings.secret_file}: {exc.strerror or exc}", key,
                                    named=False) from None
        except UnicodeDecodeError:
            raise settings._refused(f"the token secret file {settings.secret_file} is not UTF-8 text", key,
                                    named=False) from None
        if not text:
            raise settings._refused(f"the token secret file {settings.secret_file} is empty", key, named=False)
        return _long_enough(settings, text.encode(), f"the file {settings.secret_file}", key)
    path = settings.data_dir / SECRET_FILE
    _check_data_dir(settings)
    if path.exists():
        return _long_enough(settings, _kept_secret(settings), f"the file {path}", (None, "data_dir"))
    if not create:
        return None
    return _kept_secret(settings)


class DataDirStart:
    """What one start (``pimcore serve``, :func:`pimcore.embed.open_pimcore`)
    found and made in its data directory, so that a start that fails before
    serving takes back what it made: the next start then behaves as if this
    one never ran (it creates -- and logs -- its API key, a secret no broker
    used is not kept...).

    Taken back: the directories it created (the data directory and missing
    parents, each only if empty), and of the files it creates there only
    those absent before the start.  Never anything that existed before, and
    nothing while another broker holds the store's lock (two starts racing
    on one new directory: the one that lost leaves the winner's files)."""

    def __init__(self) -> None:
        self.data_dir: Optional[Path] = None
        self.missing: list[Path] = []  # directories that did not exist, innermost first
        self.before: set[str] = set()
        self.ready = False  # serving: from here on nothing is taken back
        self.server: Any = None  # the BrokerServer once listening: a connection it accepted is serving too

    def begin(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        p = data_dir.absolute()
        while not p.exists() and p != p.parent:
            self.missing.append(p)
            p = p.parent
        try:
            self.before = set(os.listdir(data_dir))
        except OSError:
            self.before = set()

    def undo(self) -> None:
        from .auth import SECRET_FILE
        from .webhooks import WEBHOOK_SECRET_FILE

        d = self.data_dir
        if d is None or self.ready or broker_lock_held(d / "store"):
            return
        if self.server is not None and self.server.statistics().accepted:
            return  # a client may have sent (and been acked) something
        # What a start creates there (the Redis note is kept on purpose: it
        # marks the directory for `pimcore group/purge/retention`).
        for name in (SECRET_FILE, API_KEY_FILE, WEBHOOK_SECRET_FILE, "store"):
            if name in self.before:
                continue
            path = d / name
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError:
                pass
        for path in self.missing:
            try:
                path.rmdir()  # only if empty: what others put there stays
            except OSError:
                return


def broker_lock_held(store_dir: Path) -> bool:
    """Another broker holds ``store_dir``'s ``broker.lock`` (the flock the
    LMDB store takes, one broker per store)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (no flock: assume the worst if a store is there)
        return store_dir.exists()
    try:
        fd = os.open(store_dir / "broker.lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock
    return False
