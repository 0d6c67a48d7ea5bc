"""A Python SDK client for the C test of the event fields: logs in as the
sender, sends a message mentioning MENTION in CONV (local id 7), edits it,
recalls it, then pins and mutes CONV; prints "done <seq of the message>".

    python sdk_editor.py URL TOKEN DEVICE CONV MENTION
"""

import sys

import trio

from pimcore.client import open_client


async def main(url: str, token: str, device: str, conv: str, mention: str) -> int:
    with trio.fail_after(60):
        async with open_client(url, token, device) as client:
            sent = await client.send(conv, b"original", local_id=7, mentions=[mention])
            await client.edit(conv, sent.seq, b"edited")
            await client.recall(conv, sent.seq)
            await client.set_conversation(conv, pinned=True, muted=True)
            print("done", sent.seq, flush=True)
    return 0


if __name__ == "__main__":
    url, token, device, conv, mention = sys.argv[1:6]
    sys.exit(trio.run(main, url, token, device, conv, mention))
