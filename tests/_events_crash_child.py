"""Child process of test_events.py's SIGKILL test: an embedded broker with
host events on (LMDB, durability sync) and a client sending to it over TCP;
the host consumes events and acks only some of them.  The parent kills it.

argv: data_dir, mode ("send": alice sends N messages while the host reads
events; "drain": no client, read every event up to the last one), N.
stdout (one flushed line each):
  START <cursor>        the consumer's durable cursor at start
  EV <id> <json>        the host handled event <id> (as the handle gave it)
  ACKED <cursor>        ack_events returned: this cursor is durable
  DONE
"""

from __future__ import annotations

import base64
import json
import os
import sys

import trio

from pimcore.client import open_client
from pimcore.embed import HostEvent, open_pimcore
from pimcore.store import direct_conversation

AB = direct_conversation("alice", "bob")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def as_dict(ev: HostEvent) -> dict:
    if ev.type != "message":
        return {"type": ev.type, "user": ev.user, "device": ev.device}
    return {
        "type": ev.type, "conv": ev.conv, "seq": ev.seq, "msg_id": ev.msg_id.hex(), "sender": ev.sender,
        "device": ev.device, "server_time": ev.server_time, "payload": base64.b64encode(ev.payload).decode(),
        "recipients": list(ev.recipients),
    }


async def main() -> None:
    data, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    listen = ["tcp://127.0.0.1:0"] if mode == "send" else []
    async with open_pimcore(data_dir=data, events=True, listen=listen) as im:
        cursor, last = await im.event_cursor()
        say(f"START {cursor}")
        sent: list[bytes] = []
        done = trio.Event()

        async def alice() -> None:
            async with open_client(im.urls[0], im.issue_token("alice"), "phone") as client:
                for i in range(n):
                    s = await client.send(AB, b"%d-%d" % (os.getpid(), i))
                    sent.append(s.msg_id)
            done.set()

        async def host() -> None:
            count = 0
            async for ev in im.events():
                say(f"EV {ev.id} {json.dumps(as_dict(ev))}")
                count += 1
                if count % 4 == 0:
                    say(f"ACKED {await im.ack_events(ev.id)}")
                if mode == "drain" and ev.id >= last:
                    return
                if done.is_set() and ev.msg_id == sent[-1]:
                    return

        async with trio.open_nursery() as nursery:
            if mode == "send":
                nursery.start_soon(alice)
            if mode == "send" or last > cursor:
                nursery.start_soon(host)
    say("DONE")


if __name__ == "__main__":
    trio.run(main)
