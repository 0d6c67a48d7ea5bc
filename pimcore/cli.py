"""The ``pimcore`` command.

This issue ships the inspection commands; ``serve``, ``token`` and ``chat``
arrive with the network layer.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from . import __version__

__all__ = ["main"]


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
    """Summarise an LMDB data directory: users' inboxes and devices."""
    from .errors import StoreError
    from .store import LmdbStore

    try:
        store = LmdbStore(args.data_dir, create=False)
    except StoreError as exc:
        print(f"pimcore: {exc}", file=sys.stderr)
        return 2
    with store:
        print(f"node id             {store.node_id().hex()}")
        print(f"last server time    {store.last_server_time()}")
        for user in args.user:
            print(f"user {user}: inbox head {store.inbox_head(user)}, floor {store.inbox_floor(user)}")
            for dev in store.devices(user):
                print(f"  device {dev.device}: position {dev.position}, last seen {dev.last_seen}")
            for conv in store.conversations(user):
                print(
                    f"  {conv}: last seq {store.last_seq(conv)}, read {store.read_marker(user, conv)},"
                    f" unread {store.unread(user, conv)}"
                )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pimcore", description="pimcore instant-messaging broker core")
    parser.add_argument("--version", action="version", version=f"pimcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="version and the active fast-path backend")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("inspect", help="summarise an LMDB data directory")
    p.add_argument("data_dir")
    p.add_argument("--user", action="append", default=[], help="show this user's inbox, devices and conversations")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
