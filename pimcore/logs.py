"""Log setup for ``pimcore serve``: text or JSON lines on stderr.

The broker logs through the standard :mod:`logging` loggers ``pimcore.net``
and ``pimcore.http``; structured fields travel in ``extra=`` (``event``,
``conn``, ``user``, ``device``, ``code``, ``reason``, ``peer``...).  The
text format shows the message (which names the same fields); the JSON
format writes one object per line::

    {"ts": "2026-11-29T19:49:09.123Z", "level": "info", "logger": "pimcore.net",
     "msg": "login conn=3 user=alice device=phone", "event": "login", "conn": 3,
     "user": "alice", "device": "phone"}

An embedding host keeps its own logging setup; this module is for the CLI.
The HTTP client the webhooks and moderation use (httpx, httpcore) logs a
line per request at INFO: :func:`setup_logging` keeps those loggers at
WARNING (:data:`QUIET_LOGGERS`), so info has no line per message; an
embedding host may want the same (docs/EMBEDDING.md).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Optional

__all__ = ["JsonFormatter", "setup_logging", "QUIET_LOGGERS"]

#: Libraries' loggers kept at WARNING: httpx logs "HTTP Request: POST ..."
#: at INFO for every webhook batch and every moderation call.
QUIET_LOGGERS = ("httpx", "httpcore")

#: LogRecord attributes that are not structured fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601, ms), level, logger,
    msg, the record's ``extra`` fields, and ``exc`` (the traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text", stream: Optional[IO[str]] = None) -> None:
    """Configure the root logger: ``level`` debug/info/warning/error,
    ``fmt`` "text" or "json", to ``stream`` (default stderr).  In text,
    the ``listening`` lines are left out: ``serve`` prints them to stdout."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # serve prints "listening on URL" to stdout (scripts read it): in
        # text the log's own line would show every address twice.
        handler.addFilter(lambda record: getattr(record, "event", None) != "listening")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
