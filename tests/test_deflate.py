"""Per-connection deflate streams (CAP_DEFLATE_DOWN / CAP_DEFLATE_UP, PROTOCOL.md 7.2):
the compressor and decompressor on their own, through both codec backends,
inside a ServerSession, through a live broker and the SDK, the spec's test
vector, and the memory bound per connection."""

from __future__ import annotations

import gc
import re
import tracemalloc
import zlib
from pathlib import Path
from types import ModuleType

import pytest
import trio
import trio.testing
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore import _backend
from pimcore import frames as F
from pimcore.compress import (
    DEFLATE_THRESHOLD,
    DEFLATE_WINDOW_BITS_DOWN,
    DEFLATE_WINDOW_BITS_UP,
    DeflateCompressor,
    DeflateDecompressor,
)
from pimcore.errors import CloseCode, ErrorCode, FrameTooLarge, ProtocolError
from pimcore.protocol import Compression, ServerSession
from pimcore.store import MemoryStore, direct_conversation

from _fuzz import feed_split
from _net import RawConn, client, serving, token
from test_compress import frames as any_frame
from test_compress import traffic

ROOT = Path(__file__).resolve().parents[1]
pure = _backend.load("pure")
MALFORMED = ErrorCode.MALFORMED_FRAME
CAPS_ALL = F.CAP_ZSTD | F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP


def stream(frames: list, window_bits: int = DEFLATE_WINDOW_BITS_UP, **kw: object) -> bytes:
    c = DeflateCompressor(window_bits, **kw)  # type: ignore[arg-type]
    return b"".join(c.compress(pure.encode_frame(f)) for f in frames)


def decode_all(backend: ModuleType, wire: bytes, window_bits: int = DEFLATE_WINDOW_BITS_UP, cuts: tuple = ()) -> tuple:
    dec = backend.Decoder(1 << 20, decompress=DeflateDecompressor(window_bits))
    return feed_split(dec, wire, list(cuts))


# ------------------------------------------------------------ the stream on its own


def test_a_chat_stream_round_trips_and_later_frames_shrink(backend: ModuleType) -> None:
    frames = traffic(11, 400)
    wire = stream(frames)
    got, end = decode_all(backend, wire)
    assert got == frames and end == ("need", 0)
    plain = sum(len(pure.encode_frame(f)) for f in frames)
    alone = sum(len(DeflateCompressor().compress(pure.encode_frame(f))) for f in frames)
    # The stream remembers earlier frames: far better than each frame alone.
    assert len(wire) < plain * 0.65 and len(wire) < alone * 0.9


def test_small_bodies_stay_out_of_the_stream() -> None:
    c = DeflateCompressor()
    for f in (F.PushAck(5), F.Ping(1), F.Pong(2**40)):
        raw = pure.encode_frame(f)
        assert len(raw) - 3 < DEFLATE_THRESHOLD and c.compress(raw) is raw
    assert c.state_size() == 0  # nothing compressed: no zlib state at all
    raw = pure.encode_frame(F.SendReq(1, "g", 0, b"x" * 40))
    out = c.compress(raw)
    assert out[1] == 0x41 and out[2] == 0x05 and c.state_size() > 0
    assert c.statistics().compressed == 1 and c.statistics().frames == 4


@settings(max_examples=150, deadline=None)
@given(st.lists(any_frame, min_size=1, max_size=12), st.lists(st.integers(0, 4000), max_size=6), st.sampled_from([9, 11, 12, 15]))
def test_both_backends_agree_on_any_stream_split_anywhere(frames: list, cuts: list, wbits: int) -> None:
    wire = stream(frames, wbits, threshold=0)  # every frame in the stream
    results = [decode_all(_backend.load(name), wire, wbits, tuple(cuts)) for name in _backend.available()]
    assert results[0] == (frames, ("need", 0))
    assert all(r == results[0] for r in results)


def test_sync_tail_is_dropped_and_frames_decode_on_arrival(backend: ModuleType) -> None:
    # Each frame is decodable as soon as its bytes are in, before the next one.
    frames = traffic(12, 50)
    c = DeflateCompressor()
    dec = backend.Decoder(1 << 20, decompress=DeflateDecompressor(DEFLATE_WINDOW_BITS_DOWN))
    for f in frames:
        out = c.compress(pure.encode_frame(f))
        if out[1] & 1:
            assert not out.endswith(b"\x00\x00\xff\xff")
        dec.feed(out)
        assert dec.next_frame() == f and dec.next_frame() is None


def _flagged(zbody: bytes, type_: int = 0x05) -> bytes:
    n, prefix = 2 + len(zbody), bytearray()
    while n >= 0x80:
        prefix.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(prefix) + bytes((n, 0x41, type_)) + zbody


def _raw_deflate(data: bytes, mode: int = zlib.Z_SYNC_FLUSH, wbits: int = 11) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    return z.compress(data) + z.flush(mode)


def test_decoding_errors(backend: ModuleType) -> None:
    body = pure.encode_frame(F.SendReq(1, "g", 0, b"hello hello hello hello"))[3:]
    good = _raw_deflate(body)[:-4]
    cases = {
        "garbage": (_flagged(b"\xff\xff\xff\xff\xff"), ProtocolError, "does not inflate"),
        "final block": (_flagged(_raw_deflate(body, zlib.Z_FINISH)), ProtocolError, "final block"),
        "empty": (_flagged(_raw_deflate(b"")[:-4]), ProtocolError, "0 bytes"),
        "trailing": (_flagged(good + b"\x07"), ProtocolError, ""),
    }
    for name, (wire, exc, msg) in cases.items():
        dec = backend.Decoder(1 << 20, decompress=DeflateDecompressor())
        _, end = feed_split(dec, wire, [])
        assert end[0] == "error" and issubclass(end[1], exc) and msg in end[3], name
        assert end[2] in (MALFORMED, ErrorCode.FRAME_TOO_LARGE), name
    # Bomb: 1 MiB of zeros in ~1 KiB; the limit is checked while inflating.
    bomb = _flagged(_raw_deflate(b"\x00" * (1 << 20), wbits=15)[:-4])
    d = DeflateDecompressor(15)
    dec = backend.Decoder(1 << 16, decompress=d)
    _, end = feed_split(dec, bomb, [])
    assert end[0] == "error" and end[1] is FrameTooLarge and end[2] == ErrorCode.FRAME_TOO_LARGE
    assert d.state_size() == 0  # the lost stream freed its window
    with pytest.raises(ProtocolError, match="lost earlier"):
        d(good, 1 << 20)


def test_a_flagged_frame_is_malformed_where_that_direction_was_not_granted() -> None:
    s = ServerSession(1 << 20)
    s.receive_data(pure.encode_frame(F.Login(b"t", "d", 0, 0, F.CAP_DEFLATE_DOWN)))
    [login] = s.next_frames()
    s.login_accepted(F.CAP_DEFLATE_DOWN)  # downstream only
    s.receive_data(stream([F.SendReq(1, "g", 0, b"hello " * 20)]))
    with pytest.raises(ProtocolError) as info:
        s.next_frames()
    assert info.value.code == MALFORMED


# ------------------------------------------------------------ the session and the memory bound


def _login(s: ServerSession, caps: int) -> None:
    s.receive_data(pure.encode_frame(F.Login(b"t", "d", 0, 0, caps)))
    assert type(s.next_frames()[0]) is F.Login
    s.login_accepted(caps)
    s.send(F.LoginAck("u", "d", 1, 0, 0, False, 1 << 20, 1 << 16, 8, 30000, caps, b"e" * 16, False))


def test_session_compresses_per_direction_and_state_stays_bounded(backend: ModuleType) -> None:
    frames = traffic(13, 600)
    down = [f for f in frames if type(f) in (F.Push, F.SendAck, F.ReadStates, F.ReadReceipt, F.HistoryResp)]
    up = [f for f in frames if type(f) in (F.SendReq, F.PushAck, F.Read, F.HistoryReq)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        s = ServerSession(1 << 20, backend=backend, compression=Compression())
        _login(s, F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP)
        assert s.compression_state_size() == 0  # nothing allocated until a frame needs it
        client_down = pure.Decoder(1 << 20, decompress=DeflateDecompressor(DEFLATE_WINDOW_BITS_DOWN))
        client_up = DeflateCompressor(DEFLATE_WINDOW_BITS_UP)
        for i in range(0, len(up), 20):
            s.receive_data(b"".join(client_up.compress(pure.encode_frame(f)) for f in up[i : i + 20]))
            got = []
            while batch := s.next_frames():
                got += batch
            assert got == up[i : i + 20]
        wire = s.send_many(down)
        client_down.feed(wire)
        assert list(client_down) == down
        del wire, got, batch, client_down, client_up  # only the broker's side stays
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    st_ = s.compression_state_size()
    # The estimate is zlib's own formula: within 2 KiB of what the allocator saw.
    assert 20_000 < st_ <= 31 * 1024  # two zlib states and the two windows' copies
    assert s.statistics().frames_compressed > len(down) // 2
    # The whole session (decoder, counters, both streams) stays near the estimate.
    assert held <= st_ + 4 * 1024 and held <= 32 * 1024, (held, st_)


# ------------------------------------------------------------ through a live broker


@pytest.mark.parametrize("caps", [CAPS_ALL, F.CAP_DEFLATE_DOWN, F.CAP_DEFLATE_UP, F.CAP_ZSTD, 0])
async def test_sdk_and_broker_negotiate_each_direction(caps: int) -> None:
    from dataclasses import replace

    from _net import FAST_CLIENT

    store = MemoryStore()
    conv = direct_conversation("alice", "bob")
    texts = [f'{{"type":"text","text":"see you at {i} near the station, bring the tickets"}}'.encode() for i in range(30)]
    cfg = replace(FAST_CLIENT, compression_caps=caps)
    with trio.fail_after(20):
        async with serving(store) as srv:
            url = srv.url()
            async with client(url, "alice", config=cfg) as a, client(url, "bob", config=cfg) as b:
                for t in texts:
                    await a.send(conv, t)
                got = []
                async for m in b.messages():
                    got.append(m.payload)
                    if len(got) == len(texts):
                        break
                assert got == texts
                sessions = [c.session for c in srv.broker._conns.values()]  # type: ignore[attr-defined]
                assert sessions and all(s.compressing == bool(caps & (F.CAP_DEFLATE_DOWN | F.CAP_ZSTD)) for s in sessions)
                assert all(s.decompressing == bool(caps & (F.CAP_DEFLATE_UP | F.CAP_ZSTD)) for s in sessions)
                if caps & F.CAP_DEFLATE_DOWN:
                    assert all(s.compression_state_size() <= 32 * 1024 for s in sessions)


async def test_a_broken_upstream_stream_closes_with_protocol_error() -> None:
    with trio.fail_after(10):
        async with serving(MemoryStore()) as srv:
            raw = await RawConn.open(srv.endpoints[0].port)
            ack = await raw.login("alice", caps=F.CAP_DEFLATE_UP)
            assert ack.caps == F.CAP_DEFLATE_UP
            await raw.send_bytes(_flagged(b"\xff\xff\xff\xff\xff"))
            close = await raw.until(F.Close)
            assert close.code == CloseCode.PROTOCOL_ERROR and "MALFORMED_FRAME" in close.reason  # type: ignore[attr-defined]
            assert "inflate" in close.reason  # type: ignore[attr-defined]
            await raw.aclose()


# ------------------------------------------------------------ the spec's test vector


def _doc_vector() -> bytes:
    doc = (ROOT / "docs" / "PROTOCOL.md").read_text("utf-8")
    block = re.search(r"<!-- deflate-vector -->\n```\n(.*?)```", doc, re.S)
    assert block, "the deflate test vector is missing from docs/PROTOCOL.md"
    hexes = [re.match(r"((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:\s|$)", line) for line in block.group(1).splitlines()]
    assert all(hexes)
    return bytes.fromhex(" ".join(m.group(1) for m in hexes))  # type: ignore[union-attr]


VECTOR_FRAMES = [
    F.SendReq(local_id=7, conv="d:u12:u345", client_time=1717200000000000, payload='{"type":"text","text":"see you at 7 🙂"}'.encode()),
    F.SendReq(local_id=8, conv="d:u12:u345", client_time=1717200001000000, payload='{"type":"text","text":"see you at 8 then"}'.encode(), after_seq=41),
    F.PushAck(position=5),
]


def test_protocol_md_deflate_vector(backend: ModuleType) -> None:
    data = _doc_vector()
    got, end = decode_all(backend, data, DEFLATE_WINDOW_BITS_UP)
    assert got == VECTOR_FRAMES and end == ("need", 0)
    # The second frame refers to the first: on its own it does not decode.
    second = data[data[0] + 1 :]
    _, end = decode_all(backend, second)
    assert end[0] == "error"


@pytest.mark.skipif(zlib.ZLIB_RUNTIME_VERSION != "1.2.13", reason="compressed bytes are pinned to the zlib version")
def test_compressor_reproduces_the_deflate_vector() -> None:
    assert stream(VECTOR_FRAMES, DEFLATE_WINDOW_BITS_UP) == _doc_vector()


# ------------------------------------------------------------ idle connections release their state


def test_a_hibernated_session_holds_only_the_windows_and_the_streams_go_on(backend: ModuleType) -> None:
    frames = traffic(14, 400)
    down = [f for f in frames if type(f) in (F.Push, F.SendAck, F.ReadReceipt)]
    up = [f for f in frames if type(f) in (F.SendReq, F.Read, F.HistoryReq)]
    gc.collect()
    tracemalloc.start()  # before the session: its zlib allocations are traced
    try:
        s = ServerSession(1 << 20, backend=backend, compression=Compression())
        _login(s, F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP)
        client_down = pure.Decoder(1 << 20, decompress=DeflateDecompressor(DEFLATE_WINDOW_BITS_DOWN))
        client_up = DeflateCompressor(DEFLATE_WINDOW_BITS_UP)
        got_up, got_down = [], []
        for k in range(0, 100, 10):  # bursts, each followed by an idle period
            s.receive_data(b"".join(client_up.compress(pure.encode_frame(f)) for f in up[k : k + 10]))
            while batch := s.next_frames():
                got_up += batch
            client_down.feed(s.send_many(down[k : k + 10]))
            got_down += list(client_down)
            active = s.compression_state_size()
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            idle = s.hibernate()
            gc.collect()
            freed = before - tracemalloc.get_traced_memory()[0]
            assert idle <= 2 * 2048 + 2 * 1024  # the two windows' bytes (2^11 each, broker side)
            # What state_size says is what the allocator gets back, within 2 KiB.
            assert abs(freed - (active - idle)) < 2048 and freed > 20_000, (active, idle, freed)
            assert s.hibernate() == idle  # again: a no-op
    finally:
        tracemalloc.stop()
    assert got_up == up[:100] and got_down == down[:100]


def test_a_released_stream_resumes_from_its_window_on_both_sides() -> None:
    # The receiver may be released while the sender is not, and the other
    # way round: the bytes are the same stream either way.
    frames = [pure.encode_frame(f) for f in traffic(15, 300)]
    c, d = DeflateCompressor(12), DeflateDecompressor(12)
    dec = pure.Decoder(1 << 20, decompress=d)
    for i, raw in enumerate(frames):
        if i % 7 == 3:
            c.release()
        if i % 5 == 1:
            d.release()
        dec.feed(c.compress(raw))
        assert pure.encode_frame(dec.next_frame()) == raw


async def test_the_broker_releases_idle_connections_compression_state(autojump_clock: trio.testing.MockClock) -> None:
    from dataclasses import replace

    from _net import FAST_CLIENT, server_config

    from pimcore.core import SECOND

    T0 = 1_700_000_000_000_000
    clock = lambda: T0 + int(trio.current_time() * 1e6)  # noqa: E731
    cfg = server_config()
    cfg = replace(cfg, broker=replace(cfg.broker, compression_idle=30 * SECOND))
    conv = direct_conversation("alice", "bob")
    text = b'{"type":"text","text":"see you at the station at seven, bring the tickets please"}'
    from pimcore.auth import JwtAuthenticator
    from pimcore.client import open_client
    from pimcore.net import open_broker_server

    from _net import SECRET

    with trio.fail_after(600):
        async with open_broker_server(MemoryStore(), JwtAuthenticator(SECRET), cfg, clock=clock) as srv:
            # (Tokens issued by the broker's clock, 2023: an iat ahead of it is refused.)
            async with open_client(srv.url(), token("alice", now=clock() / 1e6), "phone", config=FAST_CLIENT, clock=clock) as a, \
                    open_client(srv.url(), token("bob", now=clock() / 1e6), "phone", config=FAST_CLIENT, clock=clock) as b:
                msgs = b.messages()

                def sizes() -> list[int]:
                    return [c.session.compression_state_size() for c in srv.broker._conns.values()]  # type: ignore[attr-defined]

                for round_ in range(3):
                    for i in range(5):
                        await a.send(conv, text + b"%d" % i)
                        assert (await msgs.__anext__()).payload == text + b"%d" % i
                    assert all(16_000 < n <= 32 * 1024 for n in sizes()), sizes()
                    await trio.sleep(70)  # idle but for heartbeats, which do not count
                    assert all(n <= 4096 for n in sizes()), sizes()


# ------------------------------------------------------------ frames within max_frame


async def test_incompressible_pushes_near_the_frame_limit_reach_a_deflate_client() -> None:
    """(Failed before: a new user's trial.)  40 messages of 60,000 random
    bytes to an offline user (end-to-end encrypted payloads, images): the
    core fills a Push up to its 1 MiB window, deflate grows what does not
    compress by 4 %, and the Push went out over max_frame.  The SDK refused
    it (FRAME_TOO_LARGE), reconnected, got the same Push: 0 of 40, for
    ever.  Now every one arrives."""
    await _forty_incompressible_messages_arrive()


async def _forty_incompressible_messages_arrive(limits: object = None) -> None:
    """alice sends bob 40 messages of 60,000 random bytes (deflate both
    ways, the SDK's default config), then bob connects: all arrive, in order."""
    import os

    from dataclasses import replace

    from _net import FAST_CLIENT, server_config, take_messages

    payloads = [os.urandom(60_000) for _ in range(40)]
    cfg = replace(FAST_CLIENT, compression_caps=F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP)
    conv = direct_conversation("alice", "bob")
    with trio.fail_after(30):
        async with serving(MemoryStore(), server_config(limits=limits)) as srv:  # type: ignore[arg-type]
            url = srv.url()
            async with client(url, "alice", config=cfg) as a:
                for p in payloads:
                    await a.send(conv, p)
            async with client(url, "bob", config=cfg) as b:
                got = await take_messages(b, len(payloads))
            assert [m.payload for m in got] == payloads


async def test_an_incompressible_send_near_the_frame_limit_is_acked() -> None:
    """(Failed before: the same trial, upstream.)  A broker whose max_frame
    is just above max_payload: the SDK's deflated SendReq of 65,536 random
    bytes was over it, the broker closed the connection, and the SDK's
    retries sent the same frame until the send timed out."""
    import os

    from dataclasses import replace

    from _net import FAST_CLIENT, server_config

    from pimcore.core import Limits

    cfg = replace(FAST_CLIENT, compression_caps=F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP, send_timeout=8.0)
    payload = os.urandom(65_536)
    with trio.fail_after(20):
        async with serving(MemoryStore(), server_config(limits=Limits(max_frame=66_500, max_payload=65_536, max_mentions=0))) as srv:
            async with client(srv.url(), "alice", config=cfg) as a:
                sent = await a.send(direct_conversation("alice", "bob"), payload)
                assert sent.seq == 1


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(16, 40_000), min_size=1, max_size=8), limit=st.integers(64, 50_000),
       text=st.booleans())
def test_the_compressor_never_sends_a_frame_over_max_frame(sizes: list, limit: int, text: bool) -> None:
    """DeflateCompressor(max_frame=N): a frame whose raw encoding is within
    N stays within N on the wire, compressed or (when deflated it might not
    fit) sent as it is; the stream still inflates to the same frames."""
    import os

    c = DeflateCompressor(DEFLATE_WINDOW_BITS_DOWN, max_frame=limit)
    frames = []
    wire = b""
    for i, n in enumerate(sizes):
        body = (b"see you at the station " * (n // 23 + 1))[:n] if text else os.urandom(n)
        f = F.SendReq(local_id=i + 1, conv="d:a:b", client_time=1, payload=body)
        raw = pure.encode_frame(f)
        out = c.compress(raw)
        if len(raw) <= limit:
            assert len(out) <= limit, (n, limit, len(raw), len(out))
        frames.append(f)
        wire += out
    dec = pure.Decoder(1 << 20, decompress=DeflateDecompressor(DEFLATE_WINDOW_BITS_DOWN))
    assert feed_split(dec, wire, [])[0] == frames
    with pytest.raises(ValueError):
        DeflateCompressor(max_frame=1)


def test_a_push_over_max_frame_is_sent_as_several_within_it(backend: ModuleType) -> None:
    """ServerSession splits a Push whose encoding is over max_frame into
    consecutive Pushes within it: the same messages in order, the first
    covering up to its last message's position, the last up to the Push's
    own -- compressed or not, alone or among other frames."""
    import os

    msgs = tuple(F.Message(p, os.urandom(16), "d:a:b", p, "a", "ph", 1, 2, os.urandom(9_000)) for p in range(3, 40, 3))
    push = F.Push(40, msgs)
    for caps in (0, F.CAP_DEFLATE_DOWN, F.CAP_ZSTD):
        s = ServerSession(50_000, backend=backend, compression=Compression())
        _login(s, caps)
        for wire in (s.send(push), s.send_many([F.Pong(1), push, F.Pong(2)])):
            if caps & F.CAP_ZSTD:
                from pimcore.compress import FrameDecompressor
                dec = backend.Decoder(50_000, decompress=FrameDecompressor())
            elif caps:
                dec = backend.Decoder(50_000, decompress=DeflateDecompressor(DEFLATE_WINDOW_BITS_DOWN))
            else:
                dec = backend.Decoder(50_000)
            decoded, end = feed_split(dec, wire, [])
            assert end[0] == "need", end  # (every frame within the decoder's 50,000 bytes)
            got = [f for f in decoded if type(f) is F.Push]
            assert len(got) > 1 and [m for p in got for m in p.messages] == list(msgs)
            assert [p.position for p in got] == [p.messages[-1].position for p in got[:-1]] + [40]


_LONG_MENTIONS = [("u%02d" % i) + "x" * 61 for i in range(64)]  # 64 valid ids of 64 characters


async def test_a_history_page_of_messages_with_many_mentions_stays_within_max_frame() -> None:
    """(Failed before: review of the frame limit.)  A history page was cut
    by payload and ids, not mentions: 20 messages of 50,000 bytes, each
    with 64 mentions of 64-character ids, made a page of ~1.08 MB, over the
    1 MiB max_frame -- that page could never be fetched, by anyone."""
    import os

    from dataclasses import replace

    from _net import FAST_CLIENT

    cfg = replace(FAST_CLIENT, compression=False)
    conv = direct_conversation("alice", "bob")
    with trio.fail_after(30):
        async with serving(MemoryStore()) as srv:
            async with client(srv.url(), "alice", config=cfg) as a:
                for _ in range(20):
                    await a.send(conv, os.urandom(50_000), mentions=_LONG_MENTIONS)
                got = await a.fetch_history(conv, 0, 200)
            assert 1 <= len(got) < 20


async def test_a_conversation_list_page_with_many_mentions_stays_within_max_frame() -> None:
    """(Failed before: the same review.)  The conversation list counted 24
    bytes per mention of each last message; an id is up to 64 characters:
    100 conversations whose last message has 8,800 bytes and 64 such
    mentions made a page of ~1.3 MB counted as ~1.04 MB."""
    import os

    from dataclasses import replace

    from _net import FAST_CLIENT

    cfg = replace(FAST_CLIENT, compression=False)
    with trio.fail_after(60):
        async with serving(MemoryStore()) as srv:
            async with client(srv.url(), "alice", config=cfg) as a:
                for i in range(100):
                    await a.send(direct_conversation("alice", "peer%03d" % i), os.urandom(8_800), mentions=_LONG_MENTIONS)
                page = await a.conversations(b"", 100)
            assert page


def test_a_decoders_limit_is_raised_never_lowered(backend: ModuleType) -> None:
    """Decoder.raise_max_frame_size (both twins): a frame over the limit is
    refused; after the limit is raised, the same bytes already fed are
    taken; a lower value changes nothing; a bad one is a ValueError."""
    big = pure.encode_frame(F.SendReq(1, "d:a:b", 0, b"x" * 3_000))
    dec = backend.Decoder(2_000)
    dec.raise_max_frame_size(1_000)  # (lower: no change)
    assert dec.max_frame_size == 2_000
    dec.feed(big)
    dec.raise_max_frame_size(4_000)
    assert dec.max_frame_size == 4_000
    assert dec.next_frame() == F.SendReq(1, "d:a:b", 0, b"x" * 3_000)
    for bad in (1, "4000", True, None):
        with pytest.raises(ValueError):
            dec.raise_max_frame_size(bad)
    tight = backend.Decoder(2_000)
    tight.feed(big)
    with pytest.raises(FrameTooLarge):
        tight.next_frame()


@pytest.mark.parametrize("max_frame", [(1 << 35) - 1, 1 << 35, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 100])
@pytest.mark.parametrize("how", ["raised", "constructed"])
def test_a_huge_max_frame_decodes_compressed_frames_and_refuses_bombs(backend: ModuleType, max_frame: int,
                                                                      how: str) -> None:
    """(Failed before: adversarial review, finding 04.)  A LoginAck.max_frame
    is a u64 the broker chooses, and the client raises its decoder's limit to
    it: with 2^63 or more the next deflated frame raised OverflowError from
    zlib (``decompress(..., max_size + 1)`` takes an ssize_t), breaking the
    decoder's contract.  No frame can be longer than 2^35 - 1 bytes
    (PROTOCOL.md section 3), decompressed ones included: a larger limit acts
    as that one, on both twins, for deflate and zstd alike."""
    from pimcore.compress import FrameCompressor, FrameDecompressor

    if how == "raised":
        dec = backend.Decoder()
        dec.raise_max_frame_size(max_frame)
    else:
        dec = backend.Decoder(max_frame)
    assert dec.max_frame_size == max_frame
    dec.enable_decompression(DeflateDecompressor(DEFLATE_WINDOW_BITS_DOWN))
    deflate = DeflateCompressor(DEFLATE_WINDOW_BITS_DOWN, threshold=0)
    frames = [F.Ping(7), F.SendReq(1, "d:a:b", 0, b"x" * 3_000)]
    dec.feed(b"".join(deflate.compress(backend.encode_frame(f)) for f in frames))
    assert [dec.next_frame(), dec.next_frame()] == frames
    z = backend.Decoder(max_frame, decompress=FrameDecompressor())
    z.feed(FrameCompressor(threshold=0).compress(backend.encode_frame(frames[1])))
    assert z.next_frame() == frames[1]
    # A zstd body declaring more than any frame can hold is still refused
    # before anything is allocated.
    # (magic, single segment + 8-byte content size 2^35, an empty last raw block)
    bomb = b"\x28\xb5\x2f\xfd\xe0" + (1 << 35).to_bytes(8, "little") + b"\x01\x00\x00"
    assert zstandard.frame_content_size(bomb) == 1 << 35
    raw = backend.encode_frame(F.Ping(7))
    z.feed(bytes((2 + len(bomb), raw[1] | 1, raw[2])) + bomb)
    with pytest.raises(FrameTooLarge):
        z.next_frame()


def test_the_deflate_decompressor_takes_any_max_size() -> None:
    """The callable itself, given a limit above what zlib takes (an ssize_t):
    the frame inflates, no OverflowError."""
    raw = pure.encode_frame(F.Ping(7))
    wire = DeflateCompressor(DEFLATE_WINDOW_BITS_DOWN, threshold=0).compress(raw)
    n = 1 + (wire[0] >= 0x80)
    out = DeflateDecompressor(DEFLATE_WINDOW_BITS_DOWN)(wire[n + 2 :], 1 << 64)
    assert out == raw[3:]  # (the body: after length, head and type)


async def test_a_broker_max_frame_above_the_sdks_default_still_reaches_the_sdk() -> None:
    """(Failed before: review of the frame limit.)  A broker whose max_frame
    is 2 MiB sizes its Pushes by that; the SDK read with its own
    ClientConfig.max_frame (1 MiB) and refused them at every reconnect: 40
    incompressible messages of 60,000 bytes never arrived.  The SDK now
    accepts what LoginAck announced."""
    from _net import FAST_CLIENT

    from pimcore.core import Limits

    assert FAST_CLIENT.max_frame == 1 << 20
    await _forty_incompressible_messages_arrive(Limits(max_frame=2 << 20, push_window_bytes=2 << 20))
