"""Child process of test_broker_crash.py: a broker (core + LmdbStore, durable)
with two simulated clients in-process, killed at random moments by the parent.

argv: store_dir, bob_cursor, then the local ids alice must (re)send.
stdout protocol (one flushed line per event):
  ACK <local_id> <seq> <msg_id hex>    alice's SendAck arrived (durable)
  GOT <pos> <msg_id hex>               bob's app processed an inbox entry
"""

from __future__ import annotations

import os
import sys

from pimcore import frames as F
from pimcore.errors import ErrorCode
from pimcore.store import LmdbStore, direct_conversation

from _harness import Harness

AB = direct_conversation("alice", "bob")


def main() -> None:
    store_dir, cursor = sys.argv[1], int(sys.argv[2])
    to_send = [int(x) for x in sys.argv[3:]]
    out = sys.stdout
    h = Harness(LmdbStore(store_dir, durability=os.environ.get("PIMCORE_CRASH_DURABILITY", "sync")))
    alice = h.login("alice", "phone")
    bob = h.login("bob", "laptop", position=cursor)
    for i, lid in enumerate(to_send):
        h.send(alice, AB, b"message %d" % lid, local_id=lid)
        for ack in h.acks(alice):
            if ack.code == ErrorCode.OK:
                out.write(f"ACK {ack.local_id} {ack.seq} {ack.msg_id.hex()}\n")
        for push in h.take(bob, F.Push):
            for m in push.messages:
                if m.position > cursor:  # a re-push of what the app already has is dropped
                    out.write(f"GOT {m.position} {m.msg_id.hex()}\n")
            cursor = max(cursor, push.position)
            out.flush()  # processed ...
            if i % 3 == 0:
                h.feed(bob, F.PushAck(cursor))  # ... then (sometimes) acked
        out.flush()
    h.feed(bob, F.PushAck(cursor))
    out.write("DONE\n")
    out.flush()


if __name__ == "__main__":
    main()
