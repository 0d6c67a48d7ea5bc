"""A Python SDK client for the C test: logs in as the recipient, prints
"ready", then one line per message received in CONV ("<seq> <payload>"),
and exits after COUNT of them (or after 60 s, with status 1).

    python sdk_receiver.py URL TOKEN DEVICE CONV COUNT
"""

import sys

import trio

from pimcore.client import open_client


async def main(url: str, token: str, device: str, conv: str, count: int) -> int:
    with trio.move_on_after(60):
        async with open_client(url, token, device) as client:
            print("ready", flush=True)
            got = 0
            async for m in client.messages():
                if m.conv != conv:
                    continue
                print(m.seq, m.payload.decode(), flush=True)
                got += 1
                if got == count:
                    return 0
    return 1


if __name__ == "__main__":
    url, token, device, conv, count = sys.argv[1:6]
    sys.exit(trio.run(main, url, token, device, conv, int(count)))
