"""``pimcore serve`` configuration: a TOML file, overridden by flags.

Example (every key optional)::

    data_dir = "pimcore-data"          # embedded LMDB store + generated secret
    durability = "sync"                # "sync" (fsync per batch) or "os"
    listen = ["tcp://127.0.0.1:7400", "ws://127.0.0.1:7480/im"]
    secret_file = "/etc/pimcore/secret" # default: <data_dir>/secret, created on first run
    content_filter = "mypkg.moderation:check"  # f(user, conv, payload) -> None or a reason to reject

    [tls]                              # for tls:// and wss:// listeners
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
    ack_delay = 0.02                   # seconds a batch of only delivery acks waits for a message to share its sync
    login_timeout = 10.0               # seconds
    max_outbound_bytes = 8388608       # bytes held for a connection: reading pauses at half, SLOW_CONSUMER beyond
    control_rate = 50.0                # Pongs, CalibrateResps and refusals per second per connection...
    control_burst = 200                # ...and at once; beyond: Close(RATE_LIMITED)
    max_connections = 100000
    commit_in_thread = false           # true: fsync in a worker thread (see ARCHITECTURE.md)
    hook_timeout = 10.0                # seconds an async content filter/authenticator may take
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .core import SECOND, ContentFilter, Limits
from .net.server import DEFAULT_BROKER_CONFIG, ServerConfig
from .net.streams import Endpoint, parse_url

__all__ = ["ServeSettings", "load_settings", "ConfigError", "DEFAULT_LISTEN"]

DEFAULT_LISTEN = "tcp://127.0.0.1:7400"
_LIMIT_KEYS = {f.name for f in fields(Limits)}
_SERVER_KEYS = {
    "idle_timeout", "login_timeout", "ack_delay", "max_outbound_bytes", "max_connections", "commit_in_thread", "hook_timeout",
    "read_timeout", "control_rate", "control_burst",
}
_TOP_KEYS = {"data_dir", "durability", "listen", "secret", "secret_file", "content_filter", "tls", "limits", "server"}


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used (message says which)."""


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

    def endpoints(self) -> tuple[Endpoint, ...]:
        try:
            return tuple(parse_url(u) for u in self.listen)
        except ValueError as exc:
            raise ConfigError(f"listen: {exc}") from None

    def load_content_filter(self) -> Optional[ContentFilter]:
        """Import the ``module:function`` content-security hook, if any.  The
        module is looked for next to the config file, then in the current
        folder, then on the usual import path (as ``python -m`` would)."""
        if not self.content_filter:
            return None
        module, _, name = self.content_filter.partition(":")
        if not module or not name:
            raise ConfigError(f"content_filter must be 'module:function', not {self.content_filter!r}")
        extra = [str(p) for p in (self.config_dir, Path.cwd()) if p is not None and str(p) not in sys.path]
        sys.path[:0] = extra
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"content_filter {self.content_filter!r}: {exc}") from None
        finally:
            for p in extra:
                sys.path.remove(p)
        if not callable(fn):
            raise ConfigError(f"content_filter {self.content_filter!r} is not callable")
        return fn  # type: ignore[no-any-return]

    def server_config(self) -> ServerConfig:
        base = DEFAULT_BROKER_CONFIG
        try:
            limits = replace(base.limits, **self.limits)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"limits: {exc}") from None
        broker = replace(base, limits=limits, content_filter=self.load_content_filter())
        srv = dict(self.server)
        for key in ("idle_timeout", "login_timeout", "ack_delay"):
            if key in srv:
                timeouts: dict[str, Any] = {key: int(float(srv.pop(key)) * SECOND)}
                try:
                    broker = replace(broker, **timeouts)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"server: {key}: {exc}") from None
        for key in ("control_rate", "control_burst"):
            if key in srv:
                try:
                    broker = replace(broker, **{key: srv.pop(key)})
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"server: {key}: {exc}") from None
        endpoints = self.endpoints()
        if any(e.secure for e in endpoints) and not self.cert:
            raise ConfigError("tls:// and wss:// listeners need a certificate: --cert/--key or [tls] cert/key")
        try:
            return ServerConfig(listeners=endpoints, certfile=self.cert, keyfile=self.key, broker=broker, **srv)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"server: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    for section, allowed in (("limits", _LIMIT_KEYS), ("server", _SERVER_KEYS), ("tls", {"cert", "key"})):
        bad = set(doc.get(section, {})) - allowed
        if bad:
            raise ConfigError(f"{path}: unknown keys in [{section}]: {sorted(bad)}")
    return doc


def load_settings(config_file: Optional[str] = None, **flags: Any) -> ServeSettings:
    """Settings from ``config_file`` (paths in it are relative to the file),
    then the flags that are not None."""
    s = ServeSettings()
    if config_file:
        path = Path(config_file)
        doc = _read_toml(path)
        here = path.parent

        def rel(p: str) -> Path:
            return Path(p) if os.path.isabs(p) else here / p

        listen = doc.get("listen", list(s.listen))
        if isinstance(listen, str):
            listen = [listen]
        tls = doc.get("tls", {})
        s = replace(
            s,
            data_dir=rel(doc["data_dir"]) if "data_dir" in doc else s.data_dir,
            durability=doc.get("durability", s.durability),
            listen=tuple(listen),
            secret=doc.get("secret"),
            secret_file=rel(doc["secret_file"]) if "secret_file" in doc else None,
            content_filter=doc.get("content_filter"),
            cert=str(rel(tls["cert"])) if "cert" in tls else None,
            key=str(rel(tls["key"])) if "key" in tls else None,
            limits=dict(doc.get("limits", {})),
            server=dict(doc.get("server", {})),
            config_dir=here,
        )
    limits = dict(s.limits)
    server = dict(s.server)
    for name, value in flags.items():
        if value is None:
            continue
        if name in _LIMIT_KEYS:
            limits[name] = value
        elif name in _SERVER_KEYS:
            server[name] = value
        elif name == "listen":
            s = replace(s, listen=tuple(value))
        elif name in ("data_dir", "secret_file"):
            paths: dict[str, Any] = {name: Path(value)}
            s = replace(s, **paths)
        elif name in ("durability", "secret", "cert", "key", "content_filter"):
            values: dict[str, Any] = {name: value}
            s = replace(s, **values)
        else:
            raise ConfigError(f"unknown setting {name!r}")
    if s.durability not in ("sync", "os"):
        raise ConfigError(f"durability must be 'sync' or 'os', not {s.durability!r}")
    return replace(s, limits=limits, server=server)
