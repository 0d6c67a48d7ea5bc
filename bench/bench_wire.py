"""Wire bytes of small chat frames, end to end through a live broker, and the
compression methods compared frame by frame (issue 17).

    python bench/bench_wire.py            # the full run (2,000 messages), prints both tables
    pytest bench/bench_wire.py            # a 100-message smoke run (CI)

The stream: user A sends 2,000 one-message chats to user B in a 1:1
conversation, one at a time (each ``send()`` waits for its SendAck), so every
message reaches B in a Push of its own.  Texts are JSON ``{"type":"text",
"text": ...}`` of 1..12 words drawn from a 200-word vocabulary with Zipf
weights (as words are in chat); a Push frame of one message is ~150 bytes.

**Live table** (``live()``): the broker (MemoryStore, over loopback) and two
SDK clients, once per compression setting (none, ``CAP_ZSTD`` only, the
deflate streams).  Bytes are the broker's own per-connection counters
(``ServerSession.statistics()``): everything after login, every frame counted
(SendReq, SendAck, Push, PushAck, the Pushes covering A's own entries, Pings
and Pongs if any), in both directions.  Per delivered message: A's
SendReq+SendAck and B's Push+PushAck bytes / messages.  The Ping/Pong bytes
per heartbeat are reported beside it (a Ping is never compressed: 4..6 bytes).

**Method table** (``methods()``): the Push frames of the stream compressed one
by one as a broker sends them, per method: wire ratio, CPU per frame
(compress + inflate, µs, best of 3), and the state each needs per connection
and direction (tracemalloc: deflate and inflate for the deflate rows, zstd's
own ``memory_size()`` for the zstd rows; per-frame zstd keeps no connection
state).
"""

from __future__ import annotations

import gc
import json
import random
import argparse
import sys
import time
import tracemalloc
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import trio
import zstandard

from pimcore import frames as F
from pimcore._pure import codec as pure
from pimcore.auth import JwtAuthenticator, issue_token
from pimcore.client import ClientConfig, open_client
from pimcore.compress import DeflateCompressor, DeflateDecompressor, FrameCompressor, FrameDecompressor, load_dictionary
from pimcore.ids import direct_conversation
from pimcore.net import Endpoint, ServerConfig, open_broker_server
from pimcore.store import MemoryStore

SECRET = b"bench-secret-0123456789abcdef-0123456789"
A, B = "u10483", "u27714"
CONV = direct_conversation(A, B)

WORDS = (
    "the i you to a it and is that of in we for on be so are this at have with just my not what can do me your "
    "was will get all if no like see now know go up one time about think here today tomorrow there good ok okay "
    "yes lol thanks sure love when how out back going then got did want need let's meeting call later tonight "
    "dinner home work sorry great nice sounds well really still also haha omg btw please send check photo pic "
    "weekend morning night soon free busy coming right new day next week yeah maybe cool guys team project "
    "deadline friday monday office train bus car late early leave wait minute hour already done finished start "
    "lunch coffee tea party birthday happy thank agree idea plan link file doc slides review update fix bug "
    "release test build deploy server down working again looks fine perfect awesome exactly probably definitely "
    "anyway actually honestly everyone someone anything nothing something where why who which would could should "
    "them they their our us he she his her him its been were has had from by as or but an more most very much "
    "many some any only other into over after before because than then"
).split()
_ZIPF = [1.0 / (k + 1) for k in range(len(WORDS))]


def chat_payloads(n: int, seed: int = 17) -> list[bytes]:
    """``n`` JSON chat texts of 1..12 Zipf-weighted words."""
    r = random.Random(seed)
    return [
        json.dumps({"type": "text", "text": " ".join(r.choices(WORDS, weights=_ZIPF, k=r.randint(1, 12)))}, separators=(",", ":")).encode()
        for _ in range(n)
    ]


# ------------------------------------------------------------ live, through the broker


@dataclass
class Live:
    mode: str
    messages: int
    up: int  #: client -> broker bytes, both connections
    down: int  #: broker -> client bytes, both connections
    sender: tuple[int, int]  #: A's (in, out) bytes: SendReqs / SendAcks (+ own-entry Pushes)
    recipient: tuple[int, int]  #: B's (in, out) bytes: PushAcks / Pushes
    frames: tuple[int, int]  #: (frames in, frames out), both connections
    state: int  #: ServerSession.compression_state_size(), largest of the two
    seconds: float


MODES: dict[str, int] = {
    "none": 0,
    "zstd per frame": F.CAP_ZSTD,
    "deflate streams": F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP,
}


async def _live(mode: str, payloads: list[bytes]) -> Live:
    caps = MODES[mode]
    cfg = ClientConfig(compression=bool(caps), compression_caps=caps or F.CAP_ZSTD, send_timeout=120.0)
    store = MemoryStore()
    config = ServerConfig(listeners=(Endpoint("tcp"),))
    async with open_broker_server(store, JwtAuthenticator(SECRET), config) as srv:
        url = srv.url()
        ta, tb = issue_token(SECRET, A, None, ttl=600.0), issue_token(SECRET, B, None, ttl=600.0)
        async with open_client(url, ta, "ios-7f3a", config=cfg) as a, open_client(url, tb, "android-02c1", config=cfg) as b:
            await a.send(CONV, b"hi")  # both sessions are up and past login
            async for _ in b.messages():
                break
            await trio.sleep(0.1)
            conns = {c.user: c.session for c in srv.broker._conns.values()}  # type: ignore[attr-defined]
            before = {u: s.statistics() for u, s in conns.items()}
            got = 0
            t0 = time.perf_counter()

            async def take() -> None:
                nonlocal got
                async for _ in b.messages():
                    got += 1
                    if got == len(payloads):
                        return

            async with trio.open_nursery() as n:
                n.start_soon(take)
                for p in payloads:
                    await a.send(CONV, p)
            seconds = time.perf_counter() - t0
            await trio.sleep(0.2)  # the last PushAck (ack_delay) reaches the broker
            after = {u: s.statistics() for u, s in conns.items()}
            d = {u: (after[u].bytes_in - before[u].bytes_in, after[u].bytes_out - before[u].bytes_out) for u in conns}
            fr = [(after[u].frames_in - before[u].frames_in, after[u].frames_out - before[u].frames_out) for u in conns]
            state = max(s.compression_state_size() for s in conns.values())
    return Live(
        mode, len(payloads), d[A][0] + d[B][0], d[A][1] + d[B][1], d[A], d[B],
        (sum(f[0] for f in fr), sum(f[1] for f in fr)), state, seconds,
    )


def live(n: int = 2000) -> list[Live]:
    payloads = chat_payloads(n)
    return [trio.run(_live, mode, payloads) for mode in MODES]


def ping_bytes() -> int:
    """Ping + Pong bytes of one heartbeat (the SDK's nonces are small counters)."""
    return len(pure.encode_frame(F.Ping(1000))) + len(pure.encode_frame(F.Pong(1000)))


# ------------------------------------------------------------ methods, frame by frame


def push_frames(n: int = 2000, seed: int = 17) -> list[bytes]:
    """Encoded Pushes of one message each, as the broker builds them."""
    r = random.Random(seed)
    node = r.randbytes(8)
    t0 = 1_780_000_000_000_000
    out = []
    for i, p in enumerate(chat_payloads(n, seed)):
        st = t0 + i * 2_000_000 + r.randrange(1_000_000)
        m = F.Message(1000 + 2 * i, st.to_bytes(8, "big") + node, CONV, 500 + i, A, "ios-7f3a", st - r.randrange(5000),
                      st, p, 0, st - r.randrange(10**6), 499 + i)
        out.append(pure.encode_frame(F.Push(1000 + 2 * i, (m,))))
    return out


@dataclass
class Method:
    name: str
    ratio: float
    cpu_us: float  #: compress + inflate per frame
    state: int  #: bytes per connection and direction (sender + receiver)


def _backend_name() -> str:
    from pimcore import _backend

    return _backend.impl.__name__.rsplit(".", 1)[-1]


def _body(raw: bytes) -> int:
    """Where the body of an encoded frame starts (after length, head, type)."""
    return (1 if raw[0] < 0x80 else 2) + 2


def _time(fn: Callable[[], Any], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _traced(make: Callable[[], Any]) -> tuple[Any, int]:
    gc.collect()
    tracemalloc.start()
    try:
        a = tracemalloc.get_traced_memory()[0]
        obj = make()
        gc.collect()
        return obj, tracemalloc.get_traced_memory()[0] - a
    finally:
        tracemalloc.stop()


def _deflate_row(frames: list[bytes], wbits: int, mem: int, zdict: Optional[bytes] = None) -> Method:
    kw = {} if zdict is None else {"zdict": zdict}
    raw = sum(map(len, frames))

    def run() -> list[bytes]:
        c = zlib.compressobj(6, zlib.DEFLATED, -wbits, mem, **kw)
        d = zlib.decompressobj(-wbits, **kw)
        outs = []
        for f in frames:
            z = (c.compress(f[_body(f) :]) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
            outs.append(z)
            d.decompress(z + b"\x00\x00\xff\xff")
        return outs

    wire = sum(len(z) + 3 for z in run())  # length, head, type + zbody (all frames are < 128 bytes compressed)

    def states() -> tuple[Any, Any]:
        c = zlib.compressobj(6, zlib.DEFLATED, -wbits, mem, **kw)
        d = zlib.decompressobj(-wbits, **kw)
        z = (c.compress(frames[0][_body(frames[0]) :]) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]
        d.decompress(z + b"\x00\x00\xff\xff")
        return c, d

    _, state = _traced(states)
    name = f"deflate stream, window 2^{wbits}, memLevel {mem}" + (", preset dictionary" if zdict else "")
    return Method(name, raw / wire, _time(run) / len(frames) * 1e6, state)


def _zstd_stream_row(frames: list[bytes], wlog: int, hlog: int, clog: int, dictionary: bool) -> Method:
    raw = sum(map(len, frames))
    dic = load_dictionary() if dictionary else None
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=wlog, hash_log=hlog, chain_log=clog, write_content_size=False, write_checksum=False, write_dict_id=False
    )

    def run() -> int:
        c = zstandard.ZstdCompressor(compression_params=params, dict_data=dic).compressobj()
        d = zstandard.ZstdDecompressor(dict_data=dic).decompressobj()
        total = 0
        for f in frames:
            z = c.compress(f[_body(f) :]) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
            d.decompress(z)
            total += len(z) + 3
        return total

    wire = run()
    cctx = zstandard.ZstdCompressor(compression_params=params, dict_data=dic)
    # The streaming context's working set (window, tables) plus a decompression context and window.
    state = cctx.memory_size() + zstandard.ZstdDecompressor(dict_data=dic).memory_size() + (1 << wlog)
    name = f"zstd stream, level 3, window 2^{wlog}, hash 2^{hlog}, chain 2^{clog}" + (", dictionary" if dictionary else "")
    return Method(name, raw / wire, _time(run) / len(frames) * 1e6, state)


def methods(n: int = 2000) -> list[Method]:
    frames = push_frames(n)
    raw = sum(map(len, frames))
    comp, dec = FrameCompressor(), FrameDecompressor()

    def per_frame() -> int:
        total = 0
        for f in frames:
            out = comp.compress(f)
            k = 1 if out[0] < 0x80 else 2  # length prefix
            if out[k] & 1:
                dec(out[k + 2 :], 1 << 20)
            total += len(out)
        return total

    rows = [Method("zstd per frame, shipped dictionary (CAP_ZSTD)", raw / per_frame(), _time(per_frame) / n * 1e6, 0)]
    for wbits, mem in ((10, 1), (11, 1), (12, 1), (12, 4), (15, 8)):
        rows.append(_deflate_row(frames, wbits, mem))
    rows.append(_deflate_row(frames, 11, 1, zdict=load_dictionary().as_bytes()[-2048:]))
    for args in ((12, 10, 10, False), (12, 10, 10, True), (14, 12, 12, True)):
        rows.append(_zstd_stream_row(frames, *args))
    # The classes the broker and SDK use (window 2^11, memLevel 1, threshold 16), for the CPU figure.
    from pimcore import codec

    c, d = DeflateCompressor(11), codec.Decoder(1 << 20, decompress=DeflateDecompressor(12))

    def ours() -> None:
        for f in frames:
            d.feed(c.compress(f))
            d.next_frame()

    t = _time(ours, rounds=1) / n * 1e6
    rows.append(Method(f"pimcore DeflateCompressor + Decoder ({_backend_name()}), frame decode included", 0.0, t, 0))
    return rows


# ------------------------------------------------------------ report


def report(n: int = 2000, out: Any = sys.stdout) -> tuple[list[Live], list[Method]]:
    rows = methods(n)
    print(f"\nMethods: {n} Push frames of one message, {sum(map(len, push_frames(n))) / n:.0f} bytes each on average", file=out)
    print("| method | fewer wire bytes | CPU per frame (compress + inflate) | state per connection and direction |", file=out)
    print("|---|---:|---:|---:|", file=out)
    for m in rows:
        ratio = f"{m.ratio:.2f}×" if m.ratio else "–"
        state = f"{m.state / 1024:.1f} KiB" if m.state else "none"
        print(f"| {m.name} | {ratio} | {m.cpu_us:.1f} µs | {state} |", file=out)
    lv = live(n)
    print(f"\nLive: {n} messages A -> B through the broker, after login (every frame counted)", file=out)
    print("| compression | up bytes | down bytes | total | fewer wire bytes | per message: SendReq+SendAck | Push+PushAck | state/conn | frames in/out |", file=out)
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|", file=out)
    base = lv[0].up + lv[0].down
    for r in lv:
        tot = r.up + r.down
        print(
            f"| {r.mode} | {r.up:,} | {r.down:,} | {tot:,} | {base / tot:.2f}× (up {lv[0].up / r.up:.2f}×, down {lv[0].down / r.down:.2f}×) "
            f"| {sum(r.sender) / r.messages:.1f} B | {sum(r.recipient) / r.messages:.1f} B | {r.state / 1024:.1f} KiB "
            f"| {r.frames[0]:,}/{r.frames[1]:,} |",
            file=out,
        )
    print(f"\nPing + Pong per heartbeat: {ping_bytes()} bytes (never compressed)", file=out)
    return lv, rows


def test_bench_wire_smoke() -> None:
    lv, rows = report(100)
    assert lv[0].messages == 100 and all(r.up and r.down for r in lv)
    assert lv[2].up + lv[2].down < lv[0].up + lv[0].down  # deflate saves bytes even on 100 messages


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("messages", nargs="?", type=int, default=2000, help="messages per level (default 2,000)")
    report(ap.parse_args().messages)
