"""The sans-IO client session, driven by hand: no sockets, no trio.

Each test plays the broker: it feeds the session encoded broker frames
(pimcore.frames + pimcore.codec.encode_frame, zstd-compressed where the test
says so), moves a fake µs clock by hand, and decodes the bytes the session
emits to check they are the right frames.
"""

from __future__ import annotations

import dataclasses

from dataclasses import FrozenInstanceError
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pimcore import frames as F
from pimcore.client_session import (
    AuthFailed,
    ClientClosed,
    ClientConfig,
    ClientSession,
    ClientStatistics,
    ConnectFailed,
    Connected,
    ConversationPurged,
    Disconnected,
    Event,
    HistoryCompleted,
    HistoryTimeout,
    MessageReceived,
    NO_HEARTBEAT_ANSWER,
    ReadStateChanged,
    ReceiptReceived,
    ReconnectBackoff,
    BrokerRefused,
    SendCompleted,
    SendError,
    SendsResumed,
    SendsStalled,
    SendTimeout,
    SessionState,
)
from pimcore.codec import Decoder, encode_frame
from pimcore.compress import FrameCompressor, FrameDecompressor
from pimcore.errors import CloseCode, EncodeError, ErrorCode
from pimcore.protocol import PRE_LOGIN_MAX_FRAME

MS = 1_000
S = 1_000_000
T0 = 1_700_000_000 * S  # the device clock at the start of every test (µs)
CONV = "d:alice:bob"
CFG = ClientConfig(time_samples=1, ack_timeout=1.0, send_timeout=30.0, connect_timeout=2.0, ack_delay=0.02)


def ack_frame(*, position: int = 0, window: int = 8, heartbeat_ms: int = 0, caps: int = 0, gap: bool = False, user: str = "alice") -> F.LoginAck:
    return F.LoginAck(user, "phone", T0, position, position, gap, 1 << 20, 1 << 16, window, heartbeat_ms, caps)


def msg(position: int, seq: int, *, sender: str = "bob", conv: str = CONV, payload: Optional[bytes] = None,
        server_time: Optional[int] = None) -> F.Message:
    at = T0 + seq if server_time is None else server_time
    return F.Message(position, b"m%015d" % seq, conv, seq, sender, "laptop", at, at, payload if payload is not None else b"p%d" % seq)


def head_flags(data: bytes) -> list[int]:
    """The head byte of every frame in ``data`` (0x40 plain, 0x41 zstd)."""
    heads, i = [], 0
    while i < len(data):
        length = shift = 0
        while True:
            b = data[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        heads.append(data[i])
        i += length
    return heads


class Broker:
    """The broker's end of one connection: decodes what the session sends,
    encodes what the test answers (compressed once zstd was granted)."""

    def __init__(self, session: ClientSession) -> None:
        self.s = session
        self.decoder = Decoder(1 << 22)
        self.compressor: Optional[FrameCompressor] = None
        self.raw = b""  # every byte the session sent on this connection

    def read(self) -> list[object]:
        data = self.s.data_to_send()
        self.raw += data
        self.decoder.feed(data)
        return list(self.decoder)

    def read_one(self, kind: type) -> object:
        frames = self.read()
        assert [type(f) for f in frames] == [kind], frames
        return frames[0]

    def encode(self, *frames: F.Frame) -> bytes:
        out = b""
        for f in frames:
            raw = encode_frame(f)
            out += self.compressor.compress(raw) if self.compressor is not None and type(f) is not F.LoginAck else raw
        return out

    def feed(self, now: int, *frames: F.Frame) -> None:
        self.s.receive_data(self.encode(*frames), now)

    def grant_zstd(self) -> None:
        self.decoder.enable_decompression(FrameDecompressor())
        self.compressor = FrameCompressor()


def connect(s: ClientSession, now: int, ack: Optional[F.LoginAck] = None, *, offset: int = 0, token: bytes = b"tok") -> Broker:
    """connection_made, LoginAck, answer every CalibrateReq at once (rtt 0,
    broker clock = device clock + offset); returns the broker end, drained up
    to and including calibration."""
    s.connection_made(now, token)
    b = Broker(s)
    login, req = b.read()  # the first calibration sample rides behind the Login
    assert type(login) is F.Login and type(req) is F.CalibrateReq
    assert login.token == token and login.device == s.device  # type: ignore[attr-defined]
    ack = ack or ack_frame()
    s.receive_data(encode_frame(ack), now)
    if ack.caps & F.CAP_ZSTD and login.caps & F.CAP_ZSTD:  # type: ignore[attr-defined]
        b.grant_zstd()
    b.feed(now, F.CalibrateResp(req.client_time, req.client_time + offset))  # type: ignore[attr-defined]
    assert s.state is SessionState.ACTIVE
    return b


def events(s: ClientSession, now: int) -> list[Event]:
    out: list[Event] = []
    while (ev := s.next_event(now)) is not None:
        out.append(ev)
    return out


def session(**kw: object) -> ClientSession:
    cfg = ClientConfig(**{**{f: getattr(CFG, f) for f in CFG.__dataclass_fields__}, **kw})  # type: ignore[arg-type]
    return ClientSession("phone", cfg, seed=1)


def ok(lid: int, seq: int) -> F.SendAck:
    return F.SendAck(lid, ErrorCode.OK, b"id%014d" % seq, seq, T0 + seq)


# ---------------------------------------------------------------- login & calibration


def test_login_then_calibration_then_active():
    s = session(time_samples=3, compression=False)
    assert s.state is SessionState.DISCONNECTED and s.next_deadline() is None
    s.connection_made(T0, b"secret")
    b = Broker(s)
    # The first calibration sample is pipelined behind the Login: its answer
    # comes right behind the LoginAck, one round trip after the stream is up.
    assert b.read() == [F.Login(b"secret", "phone", T0, 0, F.CAP_CONV_PURGED), F.CalibrateReq(T0)]
    assert s.state is SessionState.AWAITING_LOGIN_ACK
    assert s.next_deadline() == T0 + 2 * S  # connect_timeout
    b.feed(T0 + 1 * MS, F.Ping(7))  # answered even before LoginAck
    assert b.read() == [F.Pong(7)]
    b.feed(T0 + 2 * MS, ack_frame(position=4, gap=True, heartbeat_ms=0))
    assert s.state is SessionState.CALIBRATING and s.user == "alice"
    assert b.read() == []  # the sample is already on its way
    assert events(s, T0) == []  # nothing before Connected
    b.feed(T0 + 3 * MS, F.CalibrateResp(T0, 0))
    assert s.state is SessionState.ACTIVE and s.connections_established == 1
    [ev] = events(s, T0)
    assert ev == Connected("alice", "phone", 4, True, s.clock_offset, 3 * MS)
    assert s.statistics().connects == 1 and s.statistics().taken_upto == 4
    # The other two samples follow on the ACTIVE connection, one at a time.
    for i in range(2):
        t = T0 + (3 + i) * MS
        assert b.read() == [F.CalibrateReq(t)]
        b.feed(t + MS, F.CalibrateResp(t, 0))
    assert b.read() == [] and s.rtt == 1 * MS and s.state is SessionState.ACTIVE


def test_calibration_keeps_the_sample_with_the_smallest_round_trip():
    s = session(time_samples=3)
    s.connection_made(T0, b"t")
    b = Broker(s)
    login, req = b.read()
    b.feed(T0, ack_frame())
    b.decoder.feed(encode_frame(req))  # read_one below finds the pipelined sample first
    skew = 30 * 60 * S  # the broker's clock is 30 minutes ahead
    t = T0
    # (rtt, where in the round trip the broker read its clock): the 10 ms
    # sample is the one whose error is bounded tightest.
    for rtt, at in [(40 * MS, 35 * MS), (10 * MS, 5 * MS), (30 * MS, 2 * MS)]:
        req = b.read_one(F.CalibrateReq)
        assert req.client_time == t  # type: ignore[attr-defined]
        b.feed(t + rtt, F.CalibrateResp(t, t + at + skew))
        t += rtt
    assert s.state is SessionState.ACTIVE
    assert s.rtt == 10 * MS
    assert s.clock_offset == skew + 5 * MS - 5 * MS  # read at +5 ms, assumed at the middle (+5 ms)
    [connected] = events(s, t)
    # Connected came with the first sample (the later ones refine the offset).
    assert connected.clock_offset == skew + 15 * MS and connected.rtt == 40 * MS  # type: ignore[attr-defined]
    assert s.server_now(t) == t + s.clock_offset
    # Outgoing stamps are calibrated...
    s.send(CONV, b"x", t)
    req = b.read_one(F.SendReq)
    assert req.client_time == t + s.clock_offset  # type: ignore[attr-defined]


def test_calibrated_stamps_never_go_backwards_across_logins():
    s = session()
    b = connect(s, T0, offset=10 * S)
    s.send(CONV, b"1", T0)
    first = b.read_one(F.SendReq).client_time  # type: ignore[attr-defined]
    assert first == T0 + 10 * S
    s.connection_lost(T0 + 1)
    # The next login finds the broker 10 s *behind* where it was: the
    # calibrated clock jumps back, one sender's stamps must not.
    b = connect(s, T0 + 2, offset=0)
    assert s.clock_offset == 0
    b.read()  # the first send, again, with its original stamp
    s.send(CONV, b"2", T0 + 3)
    second = b.read_one(F.SendReq).client_time  # type: ignore[attr-defined]
    assert second == first + 1


def test_an_unanswered_calibration_sample_ends_calibration_with_what_it_has():
    s = session(time_samples=3)
    s.connection_made(T0, b"t")
    b = Broker(s)
    b.read()  # Login and the first sample
    b.feed(T0, ack_frame())
    assert s.next_deadline() == T0 + S  # ack_timeout for the first sample, from the LoginAck
    s.handle_timer(T0 + S - 1)
    assert s.state is SessionState.CALIBRATING
    s.handle_timer(T0 + S)  # lost: ACTIVE without a sample (the previous offset stays)
    assert s.state is SessionState.ACTIVE and s.clock_offset == 0
    assert b.read() == []  # no background samples without a first one
    # Next login: the first sample answers, the second is lost in the background.
    s.connection_lost(T0 + 2 * S)
    t = T0 + 3 * S
    s.connection_made(t, b"t")
    b = Broker(s)
    b.read()
    b.feed(t, ack_frame())
    b.feed(t + 4 * MS, F.CalibrateResp(t, t + 2 * MS + 777))
    assert s.state is SessionState.ACTIVE and (s.rtt, s.clock_offset) == (4 * MS, 777)
    second = b.read_one(F.CalibrateReq)
    assert s.next_deadline() == second.client_time + S  # type: ignore[attr-defined]  # ack_timeout
    s.handle_timer(t + 4 * MS + S)
    assert b.read() == []  # given up: no third sample
    # A late answer on the active connection is only a sign of life.
    b.feed(t + 2 * S, F.CalibrateResp(second.client_time, 0))  # type: ignore[attr-defined]
    assert s.clock_offset == 777


def _login(s: ClientSession, t: int) -> tuple[Broker, int]:
    """connection_made and LoginAck at ``t``, the first sample unanswered:
    (the broker end, that sample's t0)."""
    s.connection_made(t, b"t")
    b = Broker(s)
    _, req = b.read()
    b.feed(t, ack_frame())
    return b, req.client_time  # type: ignore[attr-defined]


def _answer(b: Broker, t0: int, rtt: int, offset: int, *, read_at: int = 0) -> None:
    """Answer the sample sent at ``t0`` after ``rtt``: the broker (whose clock
    is the device's + ``offset``) read its clock ``read_at`` µs into the round trip."""
    b.feed(t0 + rtt, F.CalibrateResp(t0, t0 + read_at + offset))


def test_a_slow_sample_at_login_does_not_replace_a_better_estimate():
    """The client was stopped (SIGSTOP) for 5 s while its first sample was
    out: that sample's rtt was 3.8 s and its offset 1.9 s off, and the SDK
    took it (it was the login's only one so far).  A sample far slower than
    the estimate in use is an outlier: the previous estimate stays."""
    skew = 7 * S
    s = session(time_samples=3)
    b, t0 = _login(s, T0)
    _answer(b, t0, 2 * MS, skew, read_at=1 * MS)
    for _ in range(2):
        t0 = b.read_one(F.CalibrateReq).client_time  # type: ignore[attr-defined]
        _answer(b, t0, 2 * MS, skew, read_at=1 * MS)
    assert (s.rtt, s.clock_offset) == (2 * MS, skew)
    events(s, T0 + S)
    s.connection_lost(T0 + 10 * S)
    t = T0 + 20 * S
    b, t0 = _login(s, t)
    # Stopped right after writing the Login: the broker answered at once,
    # the answer was read 3.8 s later (the midpoint is then 1.9 s off).
    _answer(b, t0, 3_800 * MS, skew, read_at=0)
    assert s.state is SessionState.ACTIVE
    [connected] = [e for e in events(s, t0 + 3_800 * MS) if isinstance(e, Connected)]
    assert (connected.clock_offset, connected.rtt) == (skew, 2 * MS)  # type: ignore[attr-defined]
    assert (s.rtt, s.clock_offset) == (2 * MS, skew)
    s.send(CONV, b"x", t0 + 3_800 * MS)
    frames = b.read()
    [req] = [f for f in frames if type(f) is F.SendReq]
    assert req.client_time == t0 + 3_800 * MS + skew  # type: ignore[attr-defined]  # not 1.9 s early
    # The next sample is a good one: it is this login's estimate.
    [cal] = [f for f in frames if type(f) is F.CalibrateReq]
    _answer(b, cal.client_time, 3 * MS, skew, read_at=1 * MS + 500)  # type: ignore[attr-defined]
    assert (s.rtt, s.clock_offset) == (3 * MS, skew)


def test_a_slow_only_sample_is_used_at_the_first_login_and_refined():
    """With no estimate yet, a slow sample is better than none: taken, then
    replaced by the next, faster one."""
    s = session(time_samples=2)
    b, t0 = _login(s, T0)
    _answer(b, t0, 4 * S, 0, read_at=0)
    assert (s.rtt, s.clock_offset) == (4 * S, -2 * S)
    t0 = b.read_one(F.CalibrateReq).client_time  # type: ignore[attr-defined]
    _answer(b, t0, 2 * MS, 0, read_at=1 * MS)
    assert (s.rtt, s.clock_offset) == (2 * MS, 0)


def test_two_slow_samples_of_a_login_are_a_slower_path_not_an_outlier():
    """Every sample of a login far slower than the last estimate: the path
    itself got slower (or the broker is another one): the login's best is
    taken once two samples agree -- with time_samples=1, one more sample
    is taken to see whether the first was an outlier."""
    s = session(time_samples=1)
    b, t0 = _login(s, T0)
    _answer(b, t0, 1 * MS, 5 * S, read_at=500)
    assert (s.rtt, s.clock_offset) == (1 * MS, 5 * S)
    assert b.read() == []  # time_samples=1
    s.connection_lost(T0 + S)
    t = T0 + 2 * S
    b, t0 = _login(s, t)
    _answer(b, t0, 900 * MS, 6 * S, read_at=450 * MS)
    assert (s.rtt, s.clock_offset) == (1 * MS, 5 * S)  # an outlier so far
    t0 = b.read_one(F.CalibrateReq).client_time  # type: ignore[attr-defined]  # one more, to tell
    _answer(b, t0, 800 * MS, 6 * S, read_at=400 * MS)
    assert (s.rtt, s.clock_offset) == (800 * MS, 6 * S)
    assert b.read() == []  # calibration is over


def test_a_sample_below_the_floor_is_never_an_outlier():
    """A fast estimate (rtt 0 on loopback) does not make every later
    sample an outlier: up to CALIBRATION_RTT_FLOOR (an error of at most half
    of it) a new login's sample replaces the old estimate."""
    from pimcore.client_session import CALIBRATION_RTT_FLOOR

    s = session(time_samples=1)
    b, t0 = _login(s, T0)
    _answer(b, t0, 0, 5 * S)
    s.connection_lost(T0 + S)
    b, t0 = _login(s, T0 + 2 * S)
    _answer(b, t0, CALIBRATION_RTT_FLOOR, 6 * S, read_at=CALIBRATION_RTT_FLOOR // 2)
    assert (s.rtt, s.clock_offset) == (CALIBRATION_RTT_FLOOR, 6 * S)
    assert b.read() == []


def test_frames_during_calibration_are_held_until_connected_is_out():
    s = session(time_samples=1)
    s.connection_made(T0, b"t")
    b = Broker(s)
    _, req = b.read()
    b.feed(T0, ack_frame())
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 1, 2, 1),)), F.Push(1, (msg(1, 2),)))
    assert events(s, T0) == []
    b.feed(T0 + MS, F.CalibrateResp(req.client_time, T0))  # type: ignore[attr-defined]
    kinds = [type(e) for e in events(s, T0 + MS)]
    assert kinds == [Connected, ReadStateChanged, MessageReceived]


def test_no_login_ack_in_time_ends_the_connection():
    s = session()
    s.connection_made(T0, b"t")
    Broker(s).read()
    s.handle_timer(T0 + 2 * S - 1)
    assert s.state is SessionState.AWAITING_LOGIN_ACK
    s.handle_timer(T0 + 2 * S)
    assert s.state is SessionState.DISCONNECTED
    [ev] = events(s, T0)
    assert isinstance(ev, Disconnected) and ev.code is None and "timed out" in ev.reason
    connect(s, T0 + 3 * S)  # and the next connection is fine


def test_zstd_is_negotiated_and_used_in_both_directions():
    s = session(compression=True)
    s.connection_made(T0, b"t")
    b = Broker(s)
    login, req = b.read()
    # Asks for everything; a broker that knows only CAP_ZSTD grants that.
    assert login.caps == F.CAP_ZSTD | F.CAP_DEFLATE_DOWN | F.CAP_DEFLATE_UP | F.CAP_CONV_PURGED  # type: ignore[attr-defined]
    assert head_flags(b.raw) == [0x40, 0x40]  # Login (and the sample behind it) are never compressed
    b.feed(T0, ack_frame(caps=F.CAP_ZSTD))
    b.grant_zstd()
    b.feed(T0, F.CalibrateResp(req.client_time, T0))  # type: ignore[attr-defined]
    assert s.state is SessionState.ACTIVE
    # Upstream: a chatty payload goes out compressed and decodes to the SendReq.
    text = b'{"type":"text","text":"see you at the station at seven, bring the tickets"}'
    lid = s.send(CONV, text, T0)
    before = len(b.raw)
    [req] = b.read()
    assert (req.local_id, req.conv, req.payload) == (lid, CONV, text)  # type: ignore[attr-defined]
    assert head_flags(b.raw[before:]) == [0x41]
    # Downstream: a compressed Push is decoded.
    wire = b.encode(F.Push(1, (msg(1, 1, payload=text),)))
    assert head_flags(wire) == [0x41]
    s.receive_data(wire, T0)
    [ev] = [e for e in events(s, T0) if isinstance(e, MessageReceived)]
    assert ev.message.payload == text


def test_a_compressed_frame_without_a_grant_is_malformed():
    s = session(compression=True)
    b = connect(s, T0, ack_frame(caps=0))  # the broker did not grant zstd
    events(s, T0)
    wire = FrameCompressor().compress(encode_frame(F.Push(1, (msg(1, 1, payload=b"x" * 200),))))
    assert head_flags(wire) == [0x41]
    s.receive_data(wire, T0)
    assert s.state is SessionState.DISCONNECTED
    [close] = b.read()
    assert isinstance(close, F.Close) and close.code == CloseCode.PROTOCOL_ERROR


# ---------------------------------------------------------------- sends


def test_an_unacked_send_is_written_once_per_connection_and_again_after_a_reconnect():
    # TCP delivers the first copy: another on the same connection would only
    # queue behind it on a slow link.  A silent broker is the heartbeat's job.
    s = session()
    b = connect(s, T0)
    lid = s.send(CONV, b"hello", T0 + 10)
    first = b.read_one(F.SendReq)
    assert first.local_id == lid and first.payload == b"hello"  # type: ignore[attr-defined]
    for t in (T0 + 10 + S, T0 + 5 * S, T0 + 20 * S):  # well past ack_timeout (1 s)
        s.handle_timer(t)
        assert b.read() == []  # no duplicate on the same connection
    assert s.statistics().retransmits == 0
    s.connection_lost(T0 + 21 * S)
    b2 = connect(s, T0 + 22 * S)
    assert b2.read() == [first]  # same local id, same stamp, same payload
    assert s.statistics().retransmits == 1
    b2.feed(T0 + 23 * S, ok(lid, 1))
    [done] = s.completions()
    assert done.local_id == lid and done.error is None and done.result.seq == 1  # type: ignore[union-attr]
    assert done.result.client_time == first.client_time  # type: ignore[union-attr,attr-defined]
    assert s.statistics().pending_sends == 0


def test_a_reconnect_resends_everything_unacked_in_the_original_order():
    s = session()
    b = connect(s, T0, ack_frame(window=2))
    lids = [s.send(CONV, b"m%d" % i, T0 + i) for i in range(5)]
    assert lids == sorted(lids)
    assert [f.local_id for f in b.read()] == lids[:2]  # type: ignore[attr-defined]  # the window
    b.feed(T0 + 10, ok(lids[1], 1))  # the second is acked, the first is not
    assert [f.local_id for f in b.read()] == [lids[2]]  # type: ignore[attr-defined]
    s.connection_lost(T0 + 20)
    [ev] = [e for e in events(s, T0) if isinstance(e, Disconnected)]
    assert ev.code is None
    b = connect(s, T0 + 30, ack_frame(window=8))
    # The send window (2, grown to the old LoginAck.window) is kept across
    # reconnects: no burst; then it grows by one per answer.
    resent = b.read()
    assert [f.local_id for f in resent] == [lids[0], lids[2]]  # type: ignore[attr-defined]
    b.feed(T0 + 40, ok(lids[0], 2), ok(lids[2], 3))
    resent += b.read()
    assert [f.local_id for f in resent] == [lids[0], lids[2], lids[3], lids[4]]  # type: ignore[attr-defined]
    assert [f.payload for f in resent] == [b"m0", b"m2", b"m3", b"m4"]  # type: ignore[attr-defined]
    assert [c.local_id for c in s.completions()] == [lids[1], lids[0], lids[2]]


def test_pending_sends_survive_while_disconnected_and_go_out_at_login():
    s = session()
    lid = s.send(CONV, b"offline", T0)
    assert s.data_to_send() == b""
    b = connect(s, T0 + S)
    [req] = b.read()
    assert req.local_id == lid  # type: ignore[attr-defined]


def test_a_duplicate_ack_of_a_finished_send_is_ignored():
    s = session()
    b = connect(s, T0)
    lid = s.send(CONV, b"once", T0)
    b.read()
    other = s.send(CONV, b"other", T0 + S)
    b.read()
    b.feed(T0 + S + 1, ok(lid, 1))
    b.feed(T0 + S + 2, ok(lid, 1), F.SendAck(lid, ErrorCode.RATE_LIMITED, b"", 0, 0))  # late duplicates
    done = s.completions()
    assert [(c.local_id, c.result.seq) for c in done] == [(lid, 1)]  # type: ignore[union-attr]
    assert s.statistics().pending_sends == 1  # only `other`
    assert [m.payload for m in s.view(CONV)] == [b"once"]
    b.feed(T0 + S + 3, ok(other, 2))
    assert [c.local_id for c in s.completions()] == [other]


@pytest.mark.parametrize("code, words", [
    *((code, None) for code in sorted({ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_CONVERSATION, ErrorCode.NOT_MEMBER,
                                       ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.DUPLICATE_CONFLICT, ErrorCode.REJECTED,
                                       ErrorCode.PURGED})),
    # A new user's trial (LOW): these came back as the bare code name, where
    # NOT_MEMBER and UNKNOWN_CONVERSATION say what is wrong.
    (ErrorCode.TOO_MANY_MENTIONS, "mentions more users than the broker takes"),
    (ErrorCode.BAD_MENTION, "a mentioned user id is not a valid user id"),
    (ErrorCode.TOO_LATE, "recall_window or edit_window"),
])
def test_a_final_refusal_completes_the_send_with_its_code(code, words):
    s = session()
    b = connect(s, T0)
    lid = s.send(CONV, b"no", T0)
    b.read()
    b.feed(T0 + 1, F.SendAck(lid, code, b"", 0, 0))
    [done] = s.completions()
    assert isinstance(done.error, SendError) and done.error.code is code and done.error.local_id == lid
    if words is not None:  # (said in words when the broker gave no reason)
        assert words in done.error.reason and f"{code.name}: " in str(done.error)
    s.handle_timer(T0 + 10 * S)
    assert b.read() == []  # never sent again
    s.connection_lost(T0 + 11 * S)
    assert connect(s, T0 + 12 * S).read() == []


def test_the_reason_of_a_refused_send_goes_to_its_error_not_to_the_log(caplog):
    # The broker explains a refusal with an Error frame (ref = the local id)
    # right before the SendAck.  The app gets the reason on SendError; a
    # warning line per refusal (per retry, for INTERNAL) was noise on the
    # app's stderr (pimcore chat printed it next to its own line).  An Error
    # about nothing pending (a refused Read has no id) goes to the app as a
    # BrokerRefused event, the log only at info.
    import logging

    caplog.set_level(logging.DEBUG, logger="pimcore.client")
    s = session()
    b = connect(s, T0)
    lid = s.send(CONV, b"spam", T0)
    b.read()
    b.feed(T0 + 1, F.Error(ErrorCode.REJECTED, lid, "no links, please"), F.SendAck(lid, ErrorCode.REJECTED, b"", 0, 0))
    [done] = s.completions()
    assert done.error.reason == "no links, please"  # type: ignore[union-attr]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    b.feed(T0 + 2, F.Error(ErrorCode.BAD_REQUEST, 0, "something else"), F.Error(ErrorCode.TYPING_NOT_RELAYED, 0, "big group"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    assert [e for e in events(s, T0 + 3) if isinstance(e, BrokerRefused)] == [BrokerRefused(ErrorCode.BAD_REQUEST, 0, "something else")]


@pytest.mark.parametrize("code", [ErrorCode.STORE_UNAVAILABLE, ErrorCode.TOO_MANY_IN_FLIGHT, ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL, 99])
def test_a_transient_refusal_holds_then_resends_the_same_local_id(code):
    s = session(backoff_initial=0.1, backoff_max=10.0)
    b = connect(s, T0)
    lid = s.send(CONV, b"later", T0)
    first = b.read_one(F.SendReq)
    b.feed(T0 + 1, F.SendAck(lid, code, b"", 0, 0))
    assert s.completions() == []
    # Held: a new send waits too (sending it would only earn a refusal).
    other = s.send(CONV, b"behind", T0 + 2)
    assert b.read() == []
    hold = s.next_deadline()
    # backoff_initial, jittered x0.5..1.5; RATE_LIMITED with no rate known yet: backoff_initial.
    assert hold is not None and T0 + 1 + 50 * MS <= hold <= T0 + 1 + 150 * MS
    s.handle_timer(hold - 1)
    assert b.read() == []
    s.handle_timer(hold)
    again = b.read()
    assert [f.local_id for f in again] == [lid, other] and again[0] == first  # type: ignore[attr-defined]


def refused(lid: int, code: ErrorCode = ErrorCode.RATE_LIMITED) -> F.SendAck:
    return F.SendAck(lid, code, b"", 0, 0)


@pytest.mark.parametrize("code", [ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_IN_FLIGHT, ErrorCode.STORE_UNAVAILABLE])
def test_the_refusals_of_one_window_are_one_congestion_event(code):
    """Issue 10, item 6: every refused ack of one window used to halve the
    window and double the hold, so one burst of refusals drove the window
    to 1 and the hold to backoff_max.  Like TCP (once per round trip), the
    refusals of what was on the wire are one event: one halving, one hold."""
    s = session(backoff_initial=0.1, backoff_max=10.0)
    b = connect(s, T0, ack_frame(window=8))
    lids = [s.send(CONV, b"%d" % i, T0) for i in range(30)]
    assert len(b.read()) == 8 and s.send_window == 8
    for lid in lids[:8]:
        b.feed(T0 + 1 * MS, refused(lid, code))
    assert s.send_window == 4 and s.statistics().send_window == 4
    assert s.statistics().congestion_events == 1
    hold = s.next_deadline()
    assert hold is not None and hold <= T0 + 1 * MS + 150 * MS  # backoff_initial (jittered), not 10 s
    s.handle_timer(hold)
    out = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    assert out == lids[:4]  # the refused ones first, in order, 4 at a time
    # A late second refusal of the first window (an earlier retransmit's) is part of that event.
    b.feed(hold, refused(lids[5], code))
    assert s.statistics().congestion_events == 1 and s.send_window == 4


def test_the_hold_grows_only_across_windows_refused_whole():
    s = session(backoff_initial=0.1, backoff_max=10.0)
    b = connect(s, T0, ack_frame(window=8))
    lids = [s.send(CONV, b"%d" % i, T0) for i in range(30)]
    t = T0
    holds = []
    for window in range(3):  # three windows, each refused whole
        sent = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
        for lid in sent:
            b.feed(t, refused(lid))
        hold = s.next_deadline()
        assert hold is not None
        holds.append(hold - t)
        t = hold
        s.handle_timer(t)
    assert s.statistics().congestion_events == 3 and s.send_window == 1
    assert holds[1] == 2 * holds[0] and holds[2] == 4 * holds[0]
    # One answered send: the next refused window is held for the base time again.
    (nxt,) = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    b.feed(t, ok(nxt, 1))
    sent = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    assert len(sent) == 2  # +1 per answer
    for lid in sent:
        b.feed(t, refused(lid))
    assert s.statistics().congestion_events == 4
    assert s.next_deadline() - t <= holds[0]  # type: ignore[operator]


@pytest.mark.parametrize("code", [ErrorCode.STORE_UNAVAILABLE, ErrorCode.INTERNAL])
def test_a_failing_store_is_one_stalled_event_per_episode_and_sends_are_kept(code):
    """Issue 10, item 6: STORE_UNAVAILABLE used to be retried silently until
    send_timeout.  Now the app gets SendsStalled once per episode (not per
    refusal, not per window), the sends stay pending and go again, and the
    first stored one brings SendsResumed."""
    s = session(backoff_initial=0.1, backoff_max=10.0)
    b = connect(s, T0, ack_frame(window=4))
    events(s, T0)
    lids = [s.send(CONV, b"%d" % i, T0) for i in range(6)]
    t = T0
    for _ in range(3):  # three windows, each refused whole
        sent = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
        assert sent
        for lid in sent:
            b.feed(t, refused(lid, code))
        t = s.next_deadline()  # type: ignore[assignment]
        s.handle_timer(t)
    assert events(s, t) == [SendsStalled(code, 6, T0)]
    assert s.completions() == [] and s.statistics().pending_sends == 6
    sent = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    b.feed(t, refused(sent[0], ErrorCode.RATE_LIMITED))  # back-pressure is not a failure: nothing new
    b.feed(t, F.SendAck(sent[-1], ErrorCode.NOT_MEMBER, b"", 0, 0))  # a final answer is not a stored send
    assert events(s, t) == []
    b.feed(t + 1, ok(lids[1] if sent[0] != lids[1] else lids[2], 1))
    assert events(s, t + 1) == [SendsResumed(T0, 4)]
    t = s.next_deadline()  # type: ignore[assignment]
    s.handle_timer(t)
    sent = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    b.feed(t, refused(sent[0], code))  # a new episode
    assert events(s, t) == [SendsStalled(code, 4, t)]


def test_aimd_grows_the_window_by_one_per_answer_up_to_the_login_window():
    s = session(backoff_initial=0.01, backoff_max=0.01)
    b = connect(s, T0, ack_frame(window=8))
    lids = [s.send(CONV, b"%d" % i, T0) for i in range(30)]
    assert len(b.read()) == 8 and s.send_window == 8
    t = T0 + 1
    b.feed(t, refused(lids[0]))
    b.feed(t, refused(lids[1]))
    assert s.send_window == 4  # one window, one halving
    t += 20 * MS
    s.handle_timer(t)  # the hold is over; 6 on the wire > 4: nothing new goes
    assert b.read() == []
    seq = 0
    for lid in lids[2:8]:  # answers to the refused window: no growth (it was halved for them)
        seq += 1
        b.feed(t, ok(lid, seq))
    assert s.send_window == 4
    out = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    assert out == lids[:2] + lids[8:10]  # the two refused ones first, in order, then new ones
    for lid in out:  # answers to what went after the event: +1 each
        seq += 1
        b.feed(t, ok(lid, seq))
    assert s.send_window == 8
    out = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    assert s.statistics().in_flight == 8
    for _ in range(5):
        b.feed(t, ok(out.pop(0), seq := seq + 1))
    assert s.send_window == 8  # never above LoginAck.window


def test_a_link_lost_with_sends_in_flight_restarts_the_window_small_like_tcp_after_a_timeout():
    # A trial on a link reset every few KiB: each reconnect wrote the whole
    # window (256) again, 35x the sends.  The loss is TCP's retransmission
    # timeout (RFC 5681 section 3.1): ssthresh = max(flight / 2, 2), the
    # window restarts small (LOSS_WINDOW), slow start (+1 per answer) up to
    # ssthresh, then +1 per window of answers.
    s = session()
    b = connect(s, T0, ack_frame(window=256))
    lids = [s.send(CONV, b"%d" % i, T0) for i in range(800)]
    assert len(b.read()) == 256 and s.send_window == 256
    s.connection_lost(T0 + S)
    b = connect(s, T0 + 2 * S, ack_frame(window=256))
    first = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    assert first == lids[:4]  # the loss window, oldest first (PROTOCOL.md section 6)
    assert s.send_window == 4 and s.statistics().in_flight == 4
    seq, t, out = 0, T0 + 3 * S, first
    for expect in (8, 16, 32, 64, 128):  # slow start: doubled per round trip
        for lid in out:
            b.feed(t, ok(lid, seq := seq + 1))
        out = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
        assert s.send_window == expect and len(out) == expect
        assert out == lids[seq:seq + expect]  # in local-id order
    for lid in out:  # at ssthresh (256 / 2): +1/cwnd per answer, about one per window
        b.feed(t, ok(lid, seq := seq + 1))
    out = [f.local_id for f in b.read()]  # type: ignore[attr-defined]
    assert len(out) == 128 and s.send_window == 128  # 128 + 1/128 + 1/128.008 + ... just under 129
    for lid in out:
        b.feed(t, ok(lid, seq := seq + 1))
    assert s.send_window == 129


def test_a_link_lost_with_nothing_in_flight_keeps_the_window():
    # Nothing unanswered: nothing says the path lost anything, the window
    # stays (so does a session whose sends wait offline, not on the wire).
    s = session()
    b = connect(s, T0, ack_frame(window=64))
    lids = [s.send(CONV, b"%d" % i, T0) for i in range(64)]
    assert len(b.read()) == 64
    for i, lid in enumerate(lids):
        b.feed(T0 + 1, ok(lid, i + 1))
    s.connection_lost(T0 + S)
    more = [s.send(CONV, b"x%d" % i, T0 + 2 * S) for i in range(100)]
    b = connect(s, T0 + 3 * S, ack_frame(window=64))
    assert [f.local_id for f in b.read()] == more[:64]  # type: ignore[attr-defined]
    assert s.send_window == 64


def test_a_broker_close_with_sends_in_flight_keeps_the_window():
    # The broker's Close (a restart, a drain) is its decision, not a loss on
    # the path: the sends go again at the window in use.
    s = session()
    b = connect(s, T0, ack_frame(window=32))
    lids = [s.send(CONV, b"%d" % i, T0) for i in range(32)]
    assert len(b.read()) == 32
    b.feed(T0 + 1, F.Close(CloseCode.SHUTDOWN, "restarting"))
    b = connect(s, T0 + S, ack_frame(window=32))
    assert [f.local_id for f in b.read()] == lids  # type: ignore[attr-defined]


def test_a_send_times_out_even_while_disconnected():
    s = session()
    lid = s.send(CONV, b"void", T0, timeout=3 * S)
    assert s.next_deadline() == T0 + 3 * S
    s.handle_timer(T0 + 3 * S - 1)
    assert s.completions() == []
    s.handle_timer(T0 + 3 * S)
    [done] = s.completions()
    assert isinstance(done.error, SendTimeout) and done.error.local_id == lid
    assert s.statistics().pending_sends == 0 and s.next_deadline() is None
    b = connect(s, T0 + 4 * S)
    assert b.read() == []  # given up: not sent any more


def test_a_retry_after_send_timeout_carries_the_first_attempts_send_req():
    """The same local id carries the same SendReq: a retry after SendTimeout
    stamps and places (after_seq) the message as the first attempt did, so
    the broker's original ack matches what it stored, and the sender's view
    shows what every other device shows."""
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Push(1, (msg(1, 1),)))
    events(s, T0)
    lid = s.send(CONV, b"x", T0, timeout=1 * S)
    [first] = [f for f in b.read() if type(f) is F.SendReq]
    s.handle_timer(T0 + 1 * S)
    [done] = s.completions()
    assert isinstance(done.error, SendTimeout)
    b.feed(T0 + 1 * S, F.Push(2, (msg(2, 3),)))  # seq 3 seen since
    events(s, T0 + 1 * S)
    assert s.send(CONV, b"x", T0 + 2 * S, local_id=lid) == lid
    [again] = [f for f in b.read() if type(f) is F.SendReq]
    assert again == first  # type: ignore[comparison-overlap]
    b.feed(T0 + 2 * S, ok(lid, 2))
    [sent] = s.completions()
    assert sent.result is not None and sent.result.client_time == first.client_time  # type: ignore[attr-defined]


def test_local_ids_are_consecutive_within_a_run_from_the_clock_at_its_first_send():
    """(A new user's trial of the store's dedupe runs: the SDK took each
    local id from the µs clock, so a burst's ids were increasing but never
    consecutive and the store wrote one dedupe record per send.)  The
    first auto id of a run is the clock then; the next ones follow it by
    one however the clock moves, so a burst is one record per batch.  An
    explicit local id above them moves them on; one below the first does
    not pull them down (they stay unique against earlier runs)."""
    s = session()
    connect(s, T0)
    ids = [s.send(CONV, b"x", T0 + 50 * i) for i in range(5)]
    assert ids == [T0 + i for i in range(5)]
    assert s.send(CONV, b"x", T0 + 10 * S, local_id=T0 + 100) == T0 + 100
    assert s.send(CONV, b"x", T0 + 11 * S) == T0 + 101
    late = session()
    connect(late, T0)
    assert late.send(CONV, b"x", T0, local_id=7) == 7
    assert late.send(CONV, b"x", T0 + 3) == T0 + 3  # the clock, not 8
    assert late.send(CONV, b"x", T0 + 9) == T0 + 4


def test_send_with_a_pending_local_id_does_not_queue_a_second_copy():
    s = session()
    b = connect(s, T0)
    lid = s.send(CONV, b"x", T0, timeout=1 * S)
    assert s.send(CONV, b"x", T0 + 1, local_id=lid, timeout=5 * S) == lid
    assert len(b.read()) == 1
    s.handle_timer(T0 + 2 * S)  # the first deadline moved to the later one
    assert [c.local_id for c in s.completions()] == []
    b.feed(T0 + 2 * S, ok(lid, 1))
    assert [c.local_id for c in s.completions()] == [lid]


@pytest.mark.parametrize("change", [
    {"conv": "d:alice:carol"}, {"payload": b"y"}, {"mentions": ("bob",)}, {"mention_all": True},
])
def test_send_with_a_pending_local_id_and_a_different_message_is_refused(change: dict) -> None:
    """(Was: the second message was dropped and its caller got the first
    one's outcome.)  A local id still pending names one message: another
    message with it raises ValueError naming the local id, before anything
    changes (nothing queued or sent, no deadline moved); the same message
    again is a retry (the mentions in any order)."""
    s = session()
    b = connect(s, T0)
    first = {"conv": CONV, "payload": b"x", "mentions": ("bob", "carol"), "mention_all": False}
    lid = s.send(**first, now=T0, timeout=1 * S)  # type: ignore[arg-type]
    b.read()
    deadline = s.next_deadline()
    [name] = change
    with pytest.raises(ValueError, match=f"^send: local id {lid} is still pending with a different message \\(not the same {name}\\)"):
        s.send(**{**first, **change}, now=T0 + 1, local_id=lid, timeout=5 * S)  # type: ignore[arg-type]
    assert b.read() == [] and s.statistics().pending_sends == 1 and s.next_deadline() == deadline
    again = {**first, "mentions": ("carol", "bob")}
    assert s.send(**again, now=T0 + 2, local_id=lid, timeout=5 * S) == lid  # type: ignore[arg-type]
    assert b.read() == []
    s.handle_timer(T0 + 2 * S)
    assert s.completions() == []  # the retry's later deadline
    b.feed(T0 + 2 * S, ok(lid, 1))
    [done] = s.completions()
    assert done.result is not None and done.result.conv == CONV


def test_a_send_or_amend_reusing_a_pending_amends_local_id_is_refused():
    """An amend pending under a local id is a different message from any
    send, and from another amend (target, action or payload)."""
    s = session()
    b = connect(s, T0)
    lid = s.amend(CONV, 3, F.MessageKind.EDIT, T0, payload=b"new")
    b.read()
    with pytest.raises(ValueError, match=f"local id {lid} is still pending with a different message"
                                         " \\(the pending one is an amend, this a send\\)"):
        s.send(CONV, b"new", T0, local_id=lid)
    for target, action, payload, differ in ((4, F.MessageKind.EDIT, b"new", "target"),
                                            (3, F.MessageKind.RECALL, b"", "action and payload"),
                                            (3, F.MessageKind.EDIT, b"other", "payload")):
        with pytest.raises(ValueError, match=f"^amend: local id {lid} is still pending with a different message \\(not the same {differ}\\)"):
            s.amend(CONV, target, action, T0, payload=payload, local_id=lid)
    sid = s.send(CONV, b"new", T0)
    assert [type(f) for f in b.read()] == [F.SendReq]
    with pytest.raises(ValueError, match=f"local id {sid} is still pending with a different message"):
        s.amend(CONV, 3, F.MessageKind.EDIT, T0, payload=b"new", local_id=sid)
    assert s.amend(CONV, 3, F.MessageKind.EDIT, T0, payload=b"new", local_id=lid) == lid
    assert b.read() == [] and s.statistics().pending_sends == 2


def test_arguments_no_frame_can_carry_raise_before_anything_changes():
    s = session()
    connect(s, T0)
    with pytest.raises(EncodeError):
        s.send(CONV, b"x", T0, local_id=1 << 64)
    with pytest.raises(EncodeError):
        s.mark_read("\ud800", 1, T0)
    # A payload is bytes: text is not encoded for you, and an int is not a
    # length (bytes(5) would send five zero bytes).
    for payload in ("hi", 5, None, [104, 105]):
        with pytest.raises(EncodeError, match="payload must be bytes"):
            s.send(CONV, payload, T0)  # type: ignore[arg-type]
    assert s.statistics().pending_sends == 0 and s.data_to_send() == b""


# ---------------------------------------------------------------- pushes and positions


def test_pushes_are_acked_cumulatively_only_after_the_app_took_them():
    s = session()
    b = connect(s, T0)
    events(s, T0)
    b.feed(T0, F.Push(3, (msg(1, 1), msg(2, 2), msg(3, 3))))
    s.handle_timer(T0 + 10 * S)
    assert b.read() == []  # received is not taken: no ack, ever
    t = T0 + 10 * S
    assert s.next_event(t).message.position == 1  # type: ignore[union-attr]
    assert s.next_event(t).message.position == 2  # type: ignore[union-attr]
    assert s.next_event(t).message.position == 3  # type: ignore[union-attr]
    assert s.next_deadline() == t + 20 * MS  # ack_delay: batch with more takes
    b.feed(t + 1, F.Push(5, (msg(4, 4), msg(5, 5))))
    events(s, t + 2)
    s.handle_timer(t + 20 * MS - 1)
    assert b.read() == []
    s.handle_timer(t + 20 * MS)
    assert b.read() == [F.PushAck(5)]  # one cumulative ack for both pushes
    assert s.statistics().acks_sent == 1 and s.statistics().taken_upto == 5


def test_each_message_taken_from_a_catch_up_push_moves_taken_upto_and_the_ack():
    """A catch-up Push carries many messages (holes between them are
    entries this device does not need): taking one moves taken_upto to its
    own position, the batched PushAck acks what was taken so far, and the
    last one taken acks the whole Push."""
    s = session()
    b = connect(s, T0)
    events(s, T0)
    # Positions 2, 5 and 7 are not this device's to show (its own sends).
    b.feed(T0, F.Push(7, (msg(1, 1), msg(3, 2), msg(4, 3), msg(6, 4))))
    t = T0 + S
    assert s.taken_upto == 0
    assert s.next_event(t).message.position == 1  # type: ignore[union-attr]
    assert s.taken_upto == 1 and s.next_deadline() == t + 20 * MS
    assert s.next_event(t).message.position == 3  # type: ignore[union-attr]
    assert s.taken_upto == 3
    s.handle_timer(t + 20 * MS)
    assert b.read() == [F.PushAck(3)]  # one batched ack, in the middle of the Push
    assert s.next_event(t + S).message.position == 4  # type: ignore[union-attr]
    assert s.taken_upto == 4
    assert s.next_event(t + S).message.position == 6  # type: ignore[union-attr]
    assert s.taken_upto == 7  # the last message taken covers the whole Push
    s.handle_timer(t + S + 20 * MS)
    assert b.read() == [F.PushAck(7)]
    assert s.statistics().acks_sent == 2 and s.statistics().taken_upto == 7


def test_closing_mid_push_acks_what_was_taken_and_no_more():
    s = session()
    b = connect(s, T0)
    events(s, T0)
    b.feed(T0, F.Push(5, tuple(msg(i, i) for i in range(1, 6))))
    taken = [s.next_event(T0).message.position for _ in range(3)]  # type: ignore[union-attr]
    assert taken == [1, 2, 3] and s.taken_upto == 3
    s.close(T0)
    assert b.read()[0] == F.PushAck(3)  # the 4th and 5th are pushed again next time
    assert s.taken_upto == 3


def test_a_push_of_only_own_messages_is_acked_in_turn():
    s = session()
    b = connect(s, T0)
    events(s, T0)
    b.feed(T0, F.Push(2, (msg(1, 1),)), F.Push(4, ()))
    assert [type(e) for e in events(s, T0)] == [MessageReceived]  # nothing to show for 2..4
    s.handle_timer(T0 + S)
    assert b.read() == [F.PushAck(4)]


def test_re_pushed_messages_are_dropped_by_position_and_login_claims_what_is_held():
    s = session()
    b = connect(s, T0)
    events(s, T0)
    b.feed(T0, F.Push(2, (msg(1, 1), msg(2, 2))), F.Push(3, (msg(3, 3),)))
    taken = events(s, T0)
    assert [e.message.position for e in taken] == [1, 2, 3]  # type: ignore[attr-defined]
    b.feed(T0, F.Push(4, (msg(4, 4),)))  # queued, not taken
    s.connection_lost(T0 + 1)  # before the PushAck went out
    s.connection_made(T0 + 2, b"t")
    b = Broker(s)
    login, req = b.read()
    # What it holds: taken (3) and queued (4) -- the broker checks that
    # against its history (test_epoch: a store restored from a hot copy).
    assert login.position == 4  # type: ignore[attr-defined]
    assert s.taken_upto == 3
    b.feed(T0 + 3, ack_frame(position=4))
    assert b.read() == []  # the calibration sample went with the Login
    b.feed(T0 + 3, F.CalibrateResp(req.client_time, T0))  # type: ignore[attr-defined]
    assert s.taken_upto == 3  # 4 is still queued: the app takes it next
    # A push from before 4 again (already queued) and 5 (new).
    b.feed(T0 + 4, F.Push(5, (msg(4, 4), msg(5, 5))))
    got = [e for e in events(s, T0 + 4) if isinstance(e, MessageReceived)]
    assert [e.message.position for e in got] == [4, 5]  # 4 once, not twice
    assert s.statistics().duplicates_dropped == 1
    b.feed(T0 + 5, F.Push(5, (msg(4, 4), msg(5, 5))))  # an entirely stale push
    assert events(s, T0 + 5) == [] and s.statistics().duplicates_dropped == 3
    s.handle_timer(T0 + S)
    assert b.read() == [F.PushAck(5)]


def test_unread_counts_follow_pushes():
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 1, 1, 0),)))
    b.feed(T0, F.Push(3, (msg(1, 2), msg(2, 3, sender="alice"), msg(3, 4))))
    assert s.read_state(CONV) == F.ReadState(CONV, 1, 4, 2)  # the own message is not unread
    assert s.unread(CONV) == 2


# ---------------------------------------------------------------- liveness


def test_a_ping_goes_out_when_nothing_was_sent_for_a_heartbeat_period():
    s = session(dead_after=3.0)
    b = connect(s, T0, ack_frame(heartbeat_ms=1000))
    assert s.next_deadline() == T0 + S  # the CalibrateReq was the last thing sent
    s.handle_timer(T0 + S - 1)
    assert b.read() == []
    s.handle_timer(T0 + S)
    [ping] = b.read()
    assert isinstance(ping, F.Ping)
    b.feed(T0 + S, F.Pong(ping.nonce))
    lid = s.send(CONV, b"x", T0 + S + 500 * MS)  # sending counts: the next ping moves
    b.read()
    b.feed(T0 + S + 500 * MS, ok(lid, 1))
    s.handle_timer(T0 + 2 * S)
    assert b.read() == []
    s.handle_timer(T0 + 2 * S + 500 * MS)
    assert [type(f) for f in b.read()] == [F.Ping]
    # A Ping from the broker is answered.
    b.feed(T0 + 2 * S + 600 * MS, F.Ping(42))
    assert b.read() == [F.Pong(42)]


def test_silence_for_dead_after_periods_ends_the_connection():
    s = session(dead_after=3.0)
    b = connect(s, T0, ack_frame(heartbeat_ms=1000))
    lid = s.send(CONV, b"x", T0)
    b.read()
    b.feed(T0 + 2 * S, F.Pong(1))  # any frame is a sign of life
    s.handle_timer(T0 + 5 * S - 1)
    assert s.state is SessionState.ACTIVE
    s.handle_timer(T0 + 5 * S)
    assert s.state is SessionState.DISCONNECTED
    assert b.read() == []  # the Ping queued meanwhile is not worth writing into a dead link
    ev = [e for e in events(s, T0) if isinstance(e, Disconnected)][-1]
    assert ev.code is None and "dead" in ev.reason
    b = connect(s, T0 + 6 * S)
    assert [f.local_id for f in b.read()] == [lid]  # type: ignore[attr-defined]


def run_timers(s: ClientSession, b: Broker, until: int) -> list[object]:
    """Call handle_timer at every deadline up to ``until`` (a broker that
    answers nothing); returns every frame the session wrote meanwhile."""
    frames: list[object] = []
    for _ in range(1000):
        at = s.next_deadline()
        if at is None or at > until or s.state is not SessionState.ACTIVE:
            break
        s.handle_timer(at)
        frames += b.read()
    else:
        raise AssertionError("next_deadline does not move")
    return frames


def test_a_silent_broker_is_found_dead_within_two_intervals_even_while_the_client_sends():
    # ack_timeout (0.4 s) < heartbeat (1 s): the client writes more often
    # than once an interval; what counts is that nothing came back.
    s = session(dead_after=3.0, ack_timeout=0.4)
    b = connect(s, T0, ack_frame(heartbeat_ms=1000))
    s.send(CONV, b"x", T0)
    b.read()
    frames = run_timers(s, b, T0 + 2 * S)
    assert any(isinstance(f, F.Ping) for f in frames)
    assert s.state is SessionState.DISCONNECTED  # within 2 x heartbeat of the last frame received
    ev = [e for e in events(s, T0) if isinstance(e, Disconnected)][-1]
    assert ev.code is None and "no Pong" in ev.reason  # the Ping rule, not the dead_after fallback


def test_a_dead_uplink_is_found_though_the_broker_keeps_pushing():
    # The client -> broker direction is dead (a half-broken route): the broker
    # still pushes every 100 ms, the client takes and acks every message into
    # the void, and no Pong ever comes back.  Pushes are no answer to a Ping:
    # the link is found dead within two intervals of the last proof that the
    # broker heard us (here the calibration answer at T0), not left to the
    # broker's idle timeout.
    s = session(dead_after=3.0, ack_timeout=0.4, ack_delay=0.02)
    b = connect(s, T0, ack_frame(heartbeat_ms=1000))
    pings = []
    now, pos = T0, 0
    while s.state is SessionState.ACTIVE and now < T0 + 10 * S:
        now += 100 * MS
        pos += 1
        b.feed(now, F.Push(pos, (msg(pos, pos, server_time=now - 50 * MS),)))  # new messages, stored just now
        assert [type(e) for e in events(s, now) if not isinstance(e, Connected)] == [MessageReceived]
        at = s.next_deadline()
        while at is not None and at <= now + 100 * MS and s.state is SessionState.ACTIVE:
            s.handle_timer(at)
            pings += [f for f in b.read() if isinstance(f, F.Ping)]
            at = s.next_deadline()
    assert s.state is SessionState.DISCONNECTED
    # Within two intervals of the calibration, plus ack_timeout: messages stored
    # up to then after the Ping may be ahead of its Pong (+ the push step).
    assert now <= T0 + 2 * S + 400 * MS + 100 * MS
    assert len(pings) == 1  # the acks did not put the Ping off, and it was not repeated
    ev = [e for e in events(s, now) if isinstance(e, Disconnected)][-1]
    assert ev.code is None and ev.reason == NO_HEARTBEAT_ANSWER and "no answer to the heartbeat" in ev.reason


def test_a_busy_downlink_gives_the_pong_a_full_interval_and_a_pong_keeps_the_link():
    # Pushes queued ahead of the Pong (a slow link draining a backlog) may
    # delay it beyond ack_timeout: as long as frames keep coming, the Pong has
    # one interval.  Its arrival keeps the link; a busy client that only acks
    # pushes then pings once an interval (nothing else proves the broker hears it).
    s = session(dead_after=3.0, ack_timeout=0.4, ack_delay=0.02)
    b = connect(s, T0, ack_frame(heartbeat_ms=1000))
    pings: list = []
    now, pos = T0, 0
    while now < T0 + 5 * S:
        now += 100 * MS
        pos += 1
        frames: list = [F.Push(pos, (msg(pos, pos),))]
        if pings and now >= pings[-1][0] + 900 * MS and pings[-1][1] is not None:
            frames.append(F.Pong(pings[-1][1].nonce))  # answered 0.9 s late, behind pushes
            pings[-1] = (pings[-1][0], None)
        b.feed(now, *frames)
        events(s, now)
        at = s.next_deadline()
        while at is not None and at <= now + 100 * MS and s.state is SessionState.ACTIVE:
            s.handle_timer(at)
            pings += [(at, f) for f in b.read() if isinstance(f, F.Ping)]
            at = s.next_deadline()
        assert s.state is SessionState.ACTIVE
    assert 2 <= len(pings) <= 5  # one per interval while busy, none in between


def test_a_slow_downlink_draining_a_backlog_keeps_the_link_until_the_pong_comes():
    # A healthy but slow way down (12 KB/s) draining a backlog stored before
    # the Ping: the Pong is queued behind it and comes several intervals
    # late.  Those pushes could all be ahead of it, so each one gives the
    # Pong another interval; the session said NO_HEARTBEAT_ANSWER one
    # interval after the Ping and reconnected every ~2 intervals, never
    # catching up (new-user finding).  Pushes of messages stored after the
    # Ping cannot be ahead of its Pong: they give it no more time (the test
    # above).
    s = session(dead_after=3.0, ack_timeout=0.4, ack_delay=0.02)
    b = connect(s, T0, ack_frame(heartbeat_ms=1000))
    backlog_stored = T0 - 60 * S  # a minute before the login
    ping = None
    answered = 0
    now, pos = T0, 0
    while now < T0 + 8 * S:
        now += 300 * MS
        pos += 1
        frames: list = [F.Push(pos, (msg(pos, pos, server_time=backlog_stored + pos),))]
        if ping is not None and now >= ping[0] + 5 * S:
            frames.append(F.Pong(ping[1].nonce))  # five intervals late, behind the backlog
            ping = None
            answered += 1
        b.feed(now, *frames)
        events(s, now)
        at = s.next_deadline()
        while at is not None and at <= now + 300 * MS and s.state is SessionState.ACTIVE:
            s.handle_timer(at)
            got = [f for f in b.read() if isinstance(f, F.Ping)]
            if got and ping is None:
                ping = (at, got[0])
            at = s.next_deadline()
        assert s.state is SessionState.ACTIVE, [e for e in events(s, now) if isinstance(e, Disconnected)]
    assert answered >= 1  # (a late Pong did come, and kept the link)


def test_a_push_frame_longer_than_an_interval_on_the_wire_keeps_the_link():
    # One Push frame (up to 64 messages) can take longer than an interval to
    # arrive on a slow way down: the Pong queued behind it is late.  Only a
    # finished push gave the Pong more time, so the session said
    # NO_HEARTBEAT_ANSWER in the middle of the frame (a new-user recheck: 64
    # x 8 KiB at 20 KB/s).  Bytes of a frame still arriving give it more time.
    s = session(dead_after=3.0, ack_timeout=0.4, ack_delay=0.02)
    b = connect(s, T0, ack_frame(heartbeat_ms=1000))
    now = T0 + 1 * S
    s.handle_timer(now)
    [ping] = [f for f in b.read() if isinstance(f, F.Ping)]
    big = b.encode(F.Push(1, (msg(1, 1, payload=b"x" * 50_000, server_time=T0 - 60 * S),)))
    for i in range(0, len(big), 1_000):  # 1 KB every 200 ms: 10 s, ten intervals
        now += 200 * MS
        at = s.next_deadline()
        while at is not None and at <= now and s.state is SessionState.ACTIVE:
            s.handle_timer(at)
            at = s.next_deadline()
        assert s.state is SessionState.ACTIVE, [e for e in events(s, now) if isinstance(e, Disconnected)]
        s.receive_data(big[i:i + 1_000], now)
    b.feed(now, F.Pong(ping.nonce))  # behind the frame
    assert [e.message.seq for e in events(s, now) if isinstance(e, MessageReceived)] == [1]
    s.handle_timer(now + 500 * MS)
    assert s.state is SessionState.ACTIVE


def test_the_reconnect_backoff_resets_at_each_completed_login_and_honours_closes_that_ask_to_wait():
    import random

    b = ReconnectBackoff(0.1, 10.0, random.Random(1))
    # Dials that never log in: doubling (jittered x0.5..1.5) up to backoff_max.
    delays = [b.delay(False, None, 0.0) for _ in range(10)]
    assert 0.1 <= delays[0] < 0.3 and max(delays) < 15.0 and delays[-1] >= 5.0
    # A login that worked, then a cut 1.5 s later: back to backoff_initial, every time.
    for _ in range(20):
        assert 0.05 <= b.delay(True, None, 1.5) < 0.15
    # The broker closes right after each login asking clients to wait: the delay grows.
    for code in (CloseCode.OVERLOADED, CloseCode.RATE_LIMITED, CloseCode.INTERNAL):
        b = ReconnectBackoff(0.1, 10.0, random.Random(1))
        assert [round(b.delay(True, code, 0.2) / 0.1 / 2 ** (i + 1), 1) >= 0.5 for i in range(5)] == [True] * 5
        assert b.failures == 5
    # A restart (SHUTDOWN) of a session that lived: at once, and the backoff restarts ...
    b = ReconnectBackoff(0.1, 10.0, random.Random(1))
    b.failures = 4
    assert b.delay(True, CloseCode.SHUTDOWN, 1.0) == 0.0 and b.failures == 0
    # ... also after a short session, once; but a broker that closes every
    # login at once is no tight loop: after the immediate redial, it grows.
    assert b.delay(True, CloseCode.SHUTDOWN, 0.1) > 0
    assert [b.delay(True, CloseCode.SHUTDOWN, 0.1) > 0 for _ in range(3)] == [True] * 3 and b.failures == 4
    assert b.delay(True, CloseCode.IDLE_TIMEOUT, 60.0) == 0.0  # a session that lived: at once again
    b.delay(True, None, 1.0)  # a transport failure ends the streak ...
    assert b.delay(True, CloseCode.SHUTDOWN, 0.1) == 0.0  # ... so a restart is redialled at once


# ---------------------------------------------------------------- read state


def test_mark_read_is_sent_again_on_every_connection_until_read_states_confirms_it():
    # (Each login's states name CONV: a conversation a login leaves out is
    # gone, its unconfirmed marker with it.)
    listed = dataclasses.replace(ack_frame(), states=1)
    s = session()
    s.mark_read(CONV, 5, T0)  # offline: remembered
    b = connect(s, T0, listed)
    assert b.read() == [F.Read(CONV, 5)]
    s.mark_read(CONV, 7, T0)
    assert b.read() == [F.Read(CONV, 7)]
    b.feed(T0 + 1, F.ReadStates((F.ReadState(CONV, 0, 9, 9),)))  # (the login's: before the Reads)
    s.connection_lost(T0 + 1)
    b = connect(s, T0 + 2, listed)
    assert b.read() == [F.Read(CONV, 7)]  # not confirmed yet: again
    b.feed(T0 + 3, F.ReadStates((F.ReadState(CONV, 6, 9, 3),)))  # not far enough
    s.connection_lost(T0 + 4)
    b = connect(s, T0 + 5, listed)
    assert b.read() == [F.Read(CONV, 7)]
    b.feed(T0 + 6, F.ReadStates((F.ReadState(CONV, 7, 9, 2),)))  # confirmed
    s.connection_lost(T0 + 7)
    b = connect(s, T0 + 8, listed)
    assert b.read() == []


def test_read_markers_never_move_back_and_receipts_only_forward():
    s = session()
    b = connect(s, T0)
    events(s, T0)
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 5, 9, 4),)))
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 3, 9, 6),)))  # stale
    assert s.read_state(CONV) == F.ReadState(CONV, 5, 9, 4)
    b.feed(T0, F.ReadReceipt(CONV, "bob", 4), F.ReadReceipt(CONV, "bob", 2))
    assert s.receipt(CONV, "bob") == 4
    assert events(s, T0) == [ReadStateChanged(F.ReadState(CONV, 5, 9, 4)), ReceiptReceived(CONV, "bob", 4)]
    s.mark_read(CONV, 9, T0)
    assert s.read_state(CONV) == F.ReadState(CONV, 9, 9, 0)  # optimistic until confirmed


def test_the_unread_count_before_the_confirmation_is_at_most_what_lies_past_the_new_marker():
    # Found by a reviewer: right after mark_read(4) with last_seq 10 the local
    # state said unread=10 until the broker confirmed -- at most 6 can be.
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 0, 10, 10), F.ReadState("g", 0, 10, 3))))
    s.mark_read(CONV, 4, T0)
    assert s.read_state(CONV) == F.ReadState(CONV, 4, 10, 6)
    s.mark_read("g", 4, T0)  # 3 unread (others are own or recalled): not raised to 6
    assert s.read_state("g") == F.ReadState("g", 4, 10, 3)
    s.mark_read(CONV, 10, T0)
    assert s.read_state(CONV) == F.ReadState(CONV, 10, 10, 0)
    b.read()
    b.feed(T0 + 1, F.ReadStates((F.ReadState(CONV, 10, 10, 0), F.ReadState("g", 4, 10, 2))))
    assert s.read_state("g") == F.ReadState("g", 4, 10, 2)  # the broker's exact count


def test_a_read_marker_beyond_the_last_seq_is_clamped_like_the_broker_does():
    # Found by a new user: mark_read(conv, 100) with one message showed
    # read_seq 100 and, after the next message, unread 0 -- while the broker
    # (and every other device) had read_seq 1, unread 1.  The Read was also
    # sent again on every connection, never confirmed.
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 0, 1, 1),)))
    s.mark_read(CONV, 100, T0)
    assert s.read_state(CONV) == F.ReadState(CONV, 1, 1, 0)
    b.read()
    b.feed(T0 + 1, F.ReadStates((F.ReadState(CONV, 1, 1, 0),)))  # the broker clamped it
    b.feed(T0 + 2, F.Push(1, (F.Message(1, bytes(16), CONV, 2, "bob", "p", T0, T0, b"next"),)))
    assert s.read_state(CONV) == F.ReadState(CONV, 1, 2, 1)
    s.connection_lost(T0 + 3)
    b = connect(s, T0 + 4)
    assert [f for f in b.read() if isinstance(f, F.Read)] == []  # confirmed, not resent
    # A former member: the broker clamps to the LEFT entry and says so.
    b.feed(T0 + 5, F.ReadStates((F.ReadState("g", 0, 8, 0),)))
    s.mark_read("g", 100, T0 + 5)
    b.feed(T0 + 6, F.ReadStates((F.ReadState("g", 8, 8, 0),)))
    assert s.read_state("g") == F.ReadState("g", 8, 8, 0)


# ---------------------------------------------------------------- bounds


def test_the_local_view_keeps_the_newest_view_limit_messages():
    s = session(view_limit=3)
    b = connect(s, T0)
    b.feed(T0, F.Push(5, tuple(msg(i, i) for i in range(1, 6))))
    assert [m.seq for m in s.view(CONV)] == [3, 4, 5]
    lid = s.send(CONV, b"mine", T0)
    b.read()
    b.feed(T0, ok(lid, 6))
    assert [m.seq for m in s.view(CONV)] == [4, 5, 6]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=6), min_size=1, max_size=30), st.integers(1, 8))
def test_the_local_view_is_always_the_newest_view_limit_messages_by_seq(pushes: list, limit: int) -> None:
    # Pushes of seqs in any order, the same message again (a page, a
    # reconnect's redelivery), an older one after the view is full: the
    # view is always the newest `limit` distinct messages by seq.  (The
    # lowest is found through a heap, not a scan: bench/bench_catchup.py.)
    s = session(view_limit=limit)
    b = connect(s, T0)
    seen: set[int] = set()
    position = 0
    for seqs in pushes:
        position += len(seqs)
        b.feed(T0, F.Push(position, tuple(msg(position - len(seqs) + k + 1, q) for k, q in enumerate(seqs))))
        seen.update(seqs)
        assert sorted(m.seq for m in s.view(CONV)) == sorted(seen)[-limit:]


def test_the_event_queue_sheds_old_notifications_but_never_messages_or_acks():
    s = session(event_limit=6)
    b = connect(s, T0)
    events(s, T0)
    b.feed(T0, F.Push(2, (msg(1, 1), msg(2, 2))))
    for seq in range(1, 20):
        b.feed(T0, F.ReadStates((F.ReadState(CONV, seq, 20, 20 - seq),)))
    st = s.statistics()
    assert st.events_dropped > 0 and st.queued_events <= 6 + 2
    assert s.read_state(CONV).read_seq == 19  # the state itself is current
    got = events(s, T0)
    assert [e.message.seq for e in got if isinstance(e, MessageReceived)] == [1, 2]
    assert got[-1] == ReadStateChanged(F.ReadState(CONV, 19, 20, 1))  # the newest kept
    s.handle_timer(T0 + S)
    assert b.read() == [F.PushAck(2)]


# ---------------------------------------------------------------- endings


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff\xff\xff\x01", b"\x03\x1f\x0e\x00", b"\x03\x40\x7f\x00", b"\x04\x40\x07\x01\x05"],
    ids=["length-prefix", "reserved-flags", "unknown-type", "bad-body"],
)
def test_malformed_bytes_close_the_connection_not_the_session(garbage):
    s = session(max_frame=4096)
    b = connect(s, T0)
    events(s, T0)
    lid = s.send(CONV, b"survives", T0)
    b.read()
    b.feed(T0, F.Push(1, (msg(1, 1),)))
    s.mark_read(CONV, 1, T0)  # queued: superseded by the Close
    s.receive_data(garbage + encode_frame(F.Push(2, (msg(2, 2),))), T0 + 1)  # no exception
    assert s.state is SessionState.DISCONNECTED
    [close] = b.read()
    assert isinstance(close, F.Close) and close.code == CloseCode.PROTOCOL_ERROR
    evs = events(s, T0)
    assert [e.message.seq for e in evs if isinstance(e, MessageReceived)] == [1]  # before the bad bytes: kept
    [ev] = [e for e in evs if isinstance(e, Disconnected)]
    assert ev.code is None and "malformed" in ev.reason
    s.receive_data(b"\x00\x00 more garbage", T0 + 2)  # a dead connection's bytes: ignored
    b = connect(s, T0 + 3, dataclasses.replace(ack_frame(), states=1))  # (its states will name CONV)
    assert b.read() == [F.SendReq(lid, CONV, T0, b"survives"), F.Read(CONV, 1)]  # all again


@pytest.mark.parametrize("code", [CloseCode.SHUTDOWN, CloseCode.TOKEN_EXPIRED, CloseCode.IDLE_TIMEOUT, 99])
def test_a_close_from_the_broker_ends_the_connection_and_says_why(code):
    s = session()
    b = connect(s, T0)
    events(s, T0)
    s.mark_read(CONV, 3, T0)  # queued, not yet written...
    b.feed(T0, F.Close(code, "bye"))
    assert s.state is SessionState.DISCONNECTED
    assert s.data_to_send() == b""  # ...and never: a receiver of Close stops sending
    [ev] = events(s, T0)
    assert ev == Disconnected(code if code != 99 else None, "bye")
    connect(s, T0 + 1)  # and it may come back


@pytest.mark.parametrize("code, error", [(CloseCode.AUTH_FAILED, AuthFailed), (CloseCode.REPLACED, ClientClosed)])
def test_auth_failed_and_replaced_close_the_session_for_good(code, error):
    s = session()
    b = connect(s, T0)
    events(s, T0)
    s.send(CONV, b"pending", T0)
    b.read()
    req_id = s.request_history(CONV, 0, 10, False, T0)
    b.feed(T0, F.Close(code, "no"))
    assert s.state is SessionState.CLOSED and isinstance(s.error, error)
    assert events(s, T0) == [Disconnected(code, "no")]
    done = s.completions()
    assert {type(c) for c in done} == {SendCompleted, HistoryCompleted}
    assert all(isinstance(c.error, error) for c in done) and [c.req_id for c in done if isinstance(c, HistoryCompleted)] == [req_id]
    with pytest.raises(error):
        s.connection_made(T0, b"t")
    with pytest.raises(error):
        s.send(CONV, b"x", T0)
    assert s.next_deadline() is None


def test_close_acks_what_was_taken_then_says_goodbye():
    s = session()
    b = connect(s, T0)
    events(s, T0)
    b.feed(T0, F.Push(1, (msg(1, 1),)))
    events(s, T0)
    lid = s.send(CONV, b"unanswered", T0)
    b.read()
    s.close(T0)
    assert b.read() == [F.PushAck(1), F.Close(CloseCode.NORMAL, "client closing")]
    [done] = s.completions()
    assert isinstance(done.error, ClientClosed)
    # The message may have been stored: the error names its local id, for a
    # retry with it from a new client (as SendTimeout.local_id).
    assert done.error.local_id == lid and s.error is not None and s.error.local_id is None
    assert s.state is SessionState.CLOSED
    s.close(T0)  # idempotent


def test_connection_lost_discards_bytes_meant_for_the_dead_connection():
    s = session()
    b = connect(s, T0)
    s.mark_read(CONV, 1, T0)  # queued, never written
    s.connection_lost(T0)
    assert s.data_to_send() == b""
    s.connection_lost(T0)  # a no-op once lost
    assert b.read() == []
    s.connection_made(T0, b"t")
    with pytest.raises(RuntimeError):
        s.connection_made(T0, b"t")  # one connection at a time


# ---------------------------------------------------------------- history


def test_history_requests_match_by_id_and_are_asked_again_on_each_new_connection_until_answered():
    s = session()
    b = connect(s, T0)
    r1 = s.request_history(CONV, 0, 10, True, T0)
    r2 = s.request_history("g:team", 5, 2, False, T0)
    assert b.read() == [F.HistoryReq(r1, CONV, 0, 10, True), F.HistoryReq(r2, "g:team", 5, 2, False)]
    assert r1 != r2
    page = (msg(0, 6, conv="g:team"), msg(0, 7, conv="g:team"))
    b.feed(T0 + 1, F.HistoryResp(r2, "g:team", ErrorCode.OK, page, True))
    [done] = s.completions()
    assert done == HistoryCompleted(r2, page, None, more=True)  # the broker said more follow
    assert [m.seq for m in s.view("g:team")] == [6, 7]
    s.handle_timer(T0 + 2 * S)  # 2 x ack_timeout without an answer: not asked again on this connection
    s.handle_timer(T0 + 3 * S)
    assert b.read() == []
    s.connection_lost(T0 + 3 * S)
    b = connect(s, T0 + 4 * S)
    assert b.read() == [F.HistoryReq(r1, CONV, 0, 10, True)]  # but on the new connection
    b.feed(T0 + 5 * S, F.HistoryResp(r1, CONV, ErrorCode.NOT_MEMBER, (), False))
    [done] = s.completions()
    assert isinstance(done.error, SendError) and done.error.code is ErrorCode.NOT_MEMBER
    b.feed(T0 + 5 * S, F.HistoryResp(r1, CONV, ErrorCode.OK, (), False))  # a late duplicate
    assert s.completions() == []


def test_a_history_request_times_out():
    s = session()
    r = s.request_history(CONV, 0, 10, False, T0, timeout=2 * S)
    s.handle_timer(T0 + 2 * S)
    [done] = s.completions()
    assert done.req_id == r and isinstance(done.error, HistoryTimeout)


# ---------------------------------------------------------------- time and statistics


def test_a_clock_stepping_back_does_not_stall_the_timers():
    s = session(dead_after=3.0)
    b = connect(s, T0, ack_frame(heartbeat_ms=1000))
    s.send(CONV, b"x", T0)
    b.read()
    assert s.next_deadline() == T0 + S
    # The device clock is set back an hour: the Ping is still one heartbeat
    # interval after the last traffic, counted on the new clock.
    back = T0 - 3600 * S
    s.handle_timer(back)
    assert b.read() == []
    assert s.next_deadline() == back + S
    s.handle_timer(back + S)
    assert [type(f) for f in b.read()] == [F.Ping]


def test_statistics_is_a_frozen_slotted_record():
    s = session()
    st = s.statistics()
    assert isinstance(st, ClientStatistics)
    with pytest.raises(FrozenInstanceError):
        st.connects = 3  # type: ignore[misc]
    assert not hasattr(st, "__dict__")
    assert st.connects == 0 and st.pending_sends == 0 and st.queued_events == 0


# ---------------------------------------------------------------- random interleavings


class FakeBroker:
    """Just enough broker to check the upstream guarantee: stores a SendReq
    once per local id (the real broker's dedupe), answers OK with the stored
    seq or a transient refusal, and may answer twice."""

    def __init__(self) -> None:
        self.stored: dict[int, tuple[int, bytes, int]] = {}  # local id -> (seq, payload, client_time)
        self.inbox: list[F.SendReq] = []  # received on this connection, not processed
        self.answers: list[F.SendAck] = []  # processed, not yet delivered
        self.b: Optional[Broker] = None

    def drain(self) -> None:
        assert self.b is not None
        for f in self.b.read():
            if type(f) is F.SendReq:
                self.inbox.append(f)  # type: ignore[arg-type]

    def process(self, n: int, refuse: bool) -> None:
        for req in self.inbox[:n]:
            if req.local_id in self.stored:
                seq, payload, stamp = self.stored[req.local_id]
                assert (payload, stamp) == (req.payload, req.client_time), "a retry changed the SendReq"
            elif refuse:
                self.answers.append(F.SendAck(req.local_id, ErrorCode.RATE_LIMITED, b"", 0, 0))
                continue
            else:
                seq = len(self.stored) + 1
                self.stored[req.local_id] = (seq, req.payload, req.client_time)
            self.answers.append(ok(req.local_id, seq))
        del self.inbox[:n]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 0)),
        st.tuples(st.just("process"), st.integers(1, 4)),
        st.tuples(st.just("refuse"), st.integers(1, 2)),
        st.tuples(st.just("answer"), st.integers(1, 4)),
        st.tuples(st.just("duplicate"), st.integers(0, 0)),
        st.tuples(st.just("drop"), st.integers(0, 0)),
        st.tuples(st.just("connect"), st.integers(1, 6)),
        st.tuples(st.just("wait"), st.integers(1, 3000)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(ops)
def test_random_acks_refusals_and_reconnects_never_lose_or_duplicate_a_send(script):
    s = session(send_timeout=10_000.0, backoff_initial=0.05, backoff_max=0.2)
    broker = FakeBroker()
    now = T0
    sent: list[int] = []
    done: dict[int, SendCompleted] = {}
    window = 4

    def collect() -> None:
        for c in s.completions():
            assert isinstance(c, SendCompleted)
            assert c.local_id not in done, "a send completed twice"
            done[c.local_id] = c
        assert s.statistics().in_flight <= window

    def connect_now(w: int) -> None:
        nonlocal window
        window = w
        broker.inbox.clear()
        broker.answers.clear()
        broker.b = connect(s, now, ack_frame(window=w))
        broker.drain()

    for op, arg in script:
        if op == "send":
            sent.append(s.send(CONV, b"msg %d" % len(sent), now))
        elif op in ("process", "refuse") and s.connection_open:
            broker.process(arg, refuse=op == "refuse")
        elif op == "answer" and s.connection_open:
            for a in broker.answers[:arg]:
                broker.b.feed(now, a)  # type: ignore[union-attr]
            del broker.answers[:arg]
        elif op == "duplicate" and s.connection_open and broker.stored:
            lid = next(iter(broker.stored))
            broker.b.feed(now, ok(lid, broker.stored[lid][0]))  # type: ignore[union-attr]
        elif op == "drop" and s.connection_open:
            s.connection_lost(now)
        elif op == "connect" and not s.connection_open:
            connect_now(arg)
        elif op == "wait":
            now += arg * MS
            s.handle_timer(now)
        if s.connection_open:
            broker.drain()
        collect()

    # Then a good network until everything is answered.
    if not s.connection_open:
        connect_now(4)
    for _ in range(10_000):
        if not sent or len(done) == len(sent):
            break
        broker.process(len(broker.inbox), refuse=False)
        for a in broker.answers:
            broker.b.feed(now, a)  # type: ignore[union-attr]
        broker.answers.clear()
        broker.drain()
        collect()
        if broker.inbox:
            continue  # what the answers let out is processed before time moves on
        deadline = s.next_deadline()
        if deadline is not None and deadline > now:
            now = deadline
        s.handle_timer(now)
        broker.drain()
        collect()
    assert sorted(done) == sorted(sent), "a send was lost"
    for lid in sent:
        c = done[lid]
        assert c.error is None and c.result is not None, c
        assert c.result.seq == broker.stored[lid][0]  # the answer is the one stored copy
    assert len(broker.stored) == len(sent)
    assert s.statistics().pending_sends == 0


# ---------------------------------------------------------------- oversize sends


def test_a_payload_above_the_brokers_max_payload_fails_at_once_and_is_never_sent():
    s = session()
    b = connect(s, T0)  # LoginAck: max_payload 64 KiB, max_frame 1 MiB
    big = s.send(CONV, b"x" * ((1 << 16) + 1), T0)
    edit = s.amend(CONV, 1, F.MessageKind.EDIT, T0, payload=b"y" * ((1 << 16) + 1))
    done = {c.local_id: c for c in s.completions()}
    assert set(done) == {big, edit}
    for c in done.values():
        assert isinstance(c.error, SendError) and c.error.code is ErrorCode.PAYLOAD_TOO_LARGE
        assert "max_payload" in str(c.error)
    assert b.read() == []
    small = s.send(CONV, b"x" * (1 << 16), T0)  # exactly the limit: fine, and not stuck behind the refused ones
    [req] = b.read()
    assert req.local_id == small  # type: ignore[attr-defined]
    assert s.statistics().pending_sends == 1


def test_before_the_first_login_a_frame_above_the_default_max_frame_fails_at_once():
    s = session()
    lid = s.send(CONV, b"x" * (1 << 20), T0)  # its SendReq frame is above 1 MiB
    [c] = s.completions()
    assert c.local_id == lid and isinstance(c.error, SendError) and c.error.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert s.statistics().pending_sends == 0


def test_a_send_queued_before_login_above_the_announced_max_payload_is_refused_not_sent():
    s = session()
    big = s.send(CONV, b"x" * 100_000, T0)  # fits the default frame size; the broker allows 64 KiB
    small = s.send(CONV, b"ok", T0)
    b = connect(s, T0 + S)
    [req] = b.read()
    assert req.local_id == small  # type: ignore[attr-defined]
    [c] = s.completions()
    assert c.local_id == big and isinstance(c.error, SendError) and c.error.code is ErrorCode.PAYLOAD_TOO_LARGE
    s.connection_lost(T0 + 2 * S)
    [again] = connect(s, T0 + 3 * S).read()
    assert again.local_id == small  # type: ignore[attr-defined]


@pytest.mark.parametrize("seq,error", [(0, ValueError), (-1, ValueError), (1 << 64, ValueError), (1 << 70, ValueError),
                                       ("1", TypeError), (None, TypeError), (1.0, TypeError), (True, TypeError)])
@pytest.mark.parametrize("action", [F.MessageKind.RECALL, F.MessageKind.EDIT, F.MessageKind.DELETE])
def test_an_amend_of_a_seq_outside_1_to_2_64_minus_1_raises_before_anything_is_queued(seq, error, action):
    s = session()
    b = connect(s, T0)
    with pytest.raises(error, match="seq"):
        s.amend(CONV, seq, action, T0, payload=b"new" if action == F.MessageKind.EDIT else b"")
    assert b.read() == [] and s.completions() == [] and s.statistics().pending_sends == 0
    s.amend(CONV, (1 << 64) - 1, action, T0)  # the largest seq is fine
    assert s.statistics().pending_sends == 1


def test_a_delete_for_me_of_a_held_unread_message_lowers_the_unread_count_once():
    # Found by a reviewer: the broker stops counting a message the user
    # deleted for themselves; the session's count stayed until the next read.
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Push(3, (msg(1, 1), msg(2, 2), msg(3, 3, sender="alice"))))
    assert s.unread(CONV) == 2  # (alice's own message is not unread)

    def delete(position: int, target: int) -> F.Message:
        return dataclasses.replace(msg(position, 0, sender="alice"), kind=F.MessageKind.DELETE, target=target, payload=b"")

    b.feed(T0, F.Push(4, (delete(4, 1),)))
    assert s.read_state(CONV) == F.ReadState(CONV, 0, 3, 1)
    b.feed(T0, F.Push(5, (delete(5, 1),)))  # again: counted once
    b.feed(T0, F.Push(6, (delete(6, 3),)))  # alice's own: never unread
    assert s.unread(CONV) == 1
    # Not in the local view: whose it was (and whether it still counts) is
    # unknown, the count stays until the broker's next ReadState.
    b.feed(T0, F.Push(7, (delete(7, 99),)))
    assert s.unread(CONV) == 1


def test_login_too_large_counts_the_widest_login_a_reconnect_sends():
    # Found by a reviewer: a Login that just fit the pre-login limit on the
    # first connection did not on a reconnect (it also carries the epoch and
    # the inbox position, and Login.sent): refused for good, looped for ever.
    s = session()
    fits_first = b"a" * 65_513  # device "phone": the first Login is 65,536 bytes
    assert s.login_frame_length(T0, fits_first) == PRE_LOGIN_MAX_FRAME
    assert s.login_frame_length(T0, fits_first, widest=True) == PRE_LOGIN_MAX_FRAME + 34
    assert s.login_too_large(T0, fits_first) == (
        "the token is 65,513 bytes: its Login frame (65,570 bytes at most: a reconnect's carries the epoch and the"
        " inbox position) is over the broker's pre-login limit (65,536 bytes: a frame before the Login is granted)")
    assert s.login_too_large(T0, b"a" * (65_513 - 34)) is None
    connect(s, T0)
    s.connection_lost(T0 + 1)
    err = ConnectFailed("cannot connect: too large")
    s.give_up(T0 + 2, err)
    assert s.state is SessionState.CLOSED and s.error is err


def test_a_delete_for_me_or_a_recall_lowers_the_conversation_list_entry_as_unread():
    # The list entry kept its own counts: a delete for me or a recall lowered
    # unread() and left the entry's badge stale until the next page.  One rule
    # for both, for the mentions too: a recalled message (a tombstone
    # mentions nobody) and one deleted for oneself are no mention, as the
    # broker counts (the delete's kept its mention until the next page).
    s = session()
    b = connect(s, T0)
    me = [F.Mention("alice")]
    m1, m2, m3 = (dataclasses.replace(msg(i, i), mentions=tuple(me)) for i in (1, 2, 3))
    rid = s.list_conversations(T0)
    b.feed(T0, F.ConvListResp(rid, 0, (F.ConvEntry(CONV, (m3,), 0, 3, 3, 3, False, False, False),), b"", False))
    b.feed(T0, F.Push(3, (m1, m2, m3)))
    assert (s.unread(CONV), s.conversations[CONV].unread) == (3, 3)

    def amend(position: int, target: int, kind: F.MessageKind, sender: str) -> F.Message:
        return dataclasses.replace(msg(position, 0, sender=sender), kind=kind, target=target, payload=b"")

    b.feed(T0, F.Push(4, (amend(4, 1, F.MessageKind.DELETE, "alice"),)))
    b.feed(T0, F.Push(5, (amend(5, 2, F.MessageKind.RECALL, "bob"),)))
    e = s.conversations[CONV]
    assert (s.unread(CONV), e.unread, e.mention_count) == (1, 1, 1)
    # Again, or both on one message: counted once.
    b.feed(T0, F.Push(6, (amend(6, 1, F.MessageKind.DELETE, "alice"), amend(7, 2, F.MessageKind.RECALL, "bob"))))
    b.feed(T0, F.Push(8, (amend(8, 1, F.MessageKind.RECALL, "bob"),)))
    e = s.conversations[CONV]
    assert (s.unread(CONV), e.unread, e.mention_count) == (1, 1, 1)


def listed(*, hidden: bool = False) -> tuple[ClientSession, Broker]:
    """A connected session holding CONV's list entry and read state: bob's
    two messages, both unread (``hidden``: the entry is hidden)."""
    s = session()
    b = connect(s, T0)
    rid = s.list_conversations(T0)
    assert [type(f) for f in b.read()] == [F.ConvListReq]
    b.feed(T0, F.ConvListResp(rid, 0, (F.ConvEntry(CONV, (msg(2, 2),), 0, 2, 2, 0, False, False, hidden),), b"", False))
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 0, 2, 2),)))
    return s, b


def test_a_send_moves_the_conversations_last_seq_and_list_entry_as_the_brokers_do():
    # A new user's trial: after a send, read_state(conv).last_seq and the
    # conversation list entry left the device's own message out until the
    # next ReadStates or page, while the broker counts it (its last seq, the
    # entry's last message, un-hidden) -- never as unread, and the sender's
    # marker does not move.
    s, b = listed(hidden=True)
    lid = s.send(CONV, b"mine", T0)
    req = b.read_one(F.SendReq)
    b.feed(T0, F.SendAck(lid, ErrorCode.OK, b"id%014d" % 3, 3, T0 + 3))
    assert s.read_state(CONV) == F.ReadState(CONV, 0, 3, 2)
    e = s.conversations[CONV]
    assert (e.last_seq, e.unread, e.hidden, e.read_seq) == (3, 2, False, 0)
    assert [(m.seq, m.sender, m.payload) for m in e.last] == [(3, "alice", b"mine")]
    assert req.payload == b"mine"  # type: ignore[attr-defined]
    # A conversation the device held no state of: its first message.
    lid = s.send("team", b"first", T0)
    b.read_one(F.SendReq)
    b.feed(T0, F.SendAck(lid, ErrorCode.OK, b"id%014d" % 1, 1, T0 + 4))
    assert s.read_state("team") == F.ReadState("team", 0, 1, 0)
    # A refusal moves nothing.
    lid = s.send(CONV, b"no", T0)
    b.read_one(F.SendReq)
    b.feed(T0, F.SendAck(lid, ErrorCode.NOT_MEMBER, b"", 0, 0))
    assert s.read_state(CONV) == F.ReadState(CONV, 0, 3, 2)


def test_sent_upto_covers_own_sends_past_messages_the_app_has_not_taken():
    # A new user's third trial: a send-only app whose event queue held a
    # message it had not taken saved a cursor below its own sends, and a
    # store restored from a hot copy that lost them trusted it.  The session
    # keeps the highest position of its own sends it was told (the
    # positions a Push covers without carrying them) and logs in with it
    # (Login.sent) next to what the app took.
    epoch = b"E" * 16
    s = session()
    b = connect(s, T0, dataclasses.replace(ack_frame(), epoch=epoch))
    b.feed(T0, F.Push(1, (msg(1, 1),)))  # queued: the app takes nothing
    lid = s.send(CONV, b"mine", T0)
    b.read_one(F.SendReq)
    b.feed(T0, F.SendAck(lid, ErrorCode.OK, b"id%014d" % 2, 2, T0 + 2), F.Push(2, ()))
    assert (s.taken_upto, s.sent_upto) == (0, 2)
    # A Push whose messages skip positions (its own sends, or entries
    # removed since): the highest it covers without carrying counts.
    b.feed(T0, F.Push(5, (msg(4, 3),)))
    assert s.sent_upto == 5
    b.feed(T0, F.Push(7, (msg(6, 4), msg(7, 5))))
    assert s.sent_upto == 5
    # A live reconnect claims everything it holds: nothing more to say.
    s.connection_lost(T0 + 1)
    s.connection_made(T0 + 2, b"tok")
    b = Broker(s)
    login, _ = b.read()
    assert (login.position, login.epoch, login.sent) == (7, epoch, 0)  # type: ignore[attr-defined]
    # The app restarts from what it saved: the Login says both.
    again = ClientSession("phone", CFG, seed=2, position=s.taken_upto, epoch=s.epoch, sent=s.sent_upto)
    again.connection_made(T0 + 3, b"tok")
    login, _ = Broker(again).read()
    assert (login.position, login.epoch, login.sent) == (0, epoch, 5)  # type: ignore[attr-defined]
    # A resync forgets it with every other position.
    again.receive_data(encode_frame(dataclasses.replace(ack_frame(), epoch=b"N" * 16, resync=True)), T0 + 4)
    assert again.sent_upto == 0
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match=r"^sent must be an int in 0\.\.2\*\*64-1"):
            ClientSession("phone", CFG, sent=bad)
        with pytest.raises(ValueError, match=r"^position must be an int in 0\.\.2\*\*64-1"):
            ClientSession("phone", CFG, position=bad)
    with pytest.raises(ValueError, match="^epoch must be bytes"):
        ClientSession("phone", CFG, epoch="ab" * 16)  # type: ignore[arg-type]


def test_messages_pushed_after_an_own_send_with_lower_seqs_still_count_as_unread():
    # A new user's trial (a regression of the fix above): a SendAck can come
    # before the Push of others' messages stored just before it (lower
    # seqs).  Counted only past last_seq, which the send had raised, they
    # were never counted: 4 of 8 rounds of a live chat lost a whole burst
    # from unread(), and the list entry's mention count stayed 0.  What a
    # count accounts for (the broker's last ReadState or page, and the
    # pushes since) is kept apart from the last seq shown.
    s, b = listed()
    b.feed(T0, F.Push(2, (msg(1, 1), msg(2, 2))))
    lid = s.send(CONV, b"mine", T0)
    b.read_one(F.SendReq)
    b.feed(T0, F.SendAck(lid, ErrorCode.OK, b"id%014d" % 5, 5, T0 + 5))
    mention = dataclasses.replace(msg(4, 4), mentions=(F.Mention("alice"),))
    b.feed(T0, F.Push(5, (msg(3, 3), mention)))
    assert s.read_state(CONV) == F.ReadState(CONV, 0, 5, 4)
    e = s.conversations[CONV]
    assert (e.last_seq, e.unread, e.mention_count) == (5, 4, 1)
    assert [m.payload for m in e.last] == [b"mine"]  # the highest seq stays last
    # A recall of one of them uncounts it.
    recall = dataclasses.replace(msg(6, 6), kind=F.MessageKind.RECALL, target=3, payload=b"")
    b.feed(T0, F.Push(6, (recall,)))
    assert s.read_state(CONV).unread == 3 and s.conversations[CONV].unread == 3


def test_the_sending_device_holds_its_message_with_its_mentions():
    # A new user's trial: the sender's own view showed its message without
    # the mentions every other device (and history) shows -- as the broker
    # stores them: sorted, unique, never the sender.
    s = session()
    b = connect(s, T0)
    lid = s.send("team", b"hi", T0, mentions=["carol", "bob", "carol", "alice"], mention_all=True)
    b.read_one(F.SendReq)
    b.feed(T0, F.SendAck(lid, ErrorCode.OK, b"id%014d" % 1, 1, T0 + 1))
    [m] = s.view("team")
    assert (m.mentions, m.mention_all) == ((F.Mention("bob"), F.Mention("carol")), True)


def test_mentions_given_as_one_string_are_refused():
    # A new user's trial: mentions="carol" was taken as five users, c, a, r,
    # o and l, each of whom got a mention counted.
    s = session()
    connect(s, T0)
    with pytest.raises(TypeError, match="mentions"):
        s.send("team", b"hi", T0, mentions="carol")  # type: ignore[arg-type]
    assert not s.data_to_send()


def test_a_list_entry_never_shows_more_mentions_than_unread_messages_after_a_read_elsewhere():
    # A new user's trial: while the phone was offline its laptop read most of
    # a group; the login's ReadStates set the entry's unread to 1 and left
    # its mention count at 6, which no state of the broker's can be (a
    # mention is an unread message that mentions the user).
    s, b = listed()
    mentions = tuple(dataclasses.replace(msg(i, i), mentions=(F.Mention("alice"),)) for i in (3, 4, 5, 6, 7, 8))
    b.feed(T0, F.Push(8, mentions))
    e = s.conversations[CONV]
    assert (e.unread, e.mention_count) == (8, 6)
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 7, 8, 1),)))
    e = s.conversations[CONV]
    assert (e.read_seq, e.unread, e.mention_count) == (7, 1, 1)


def test_flags_that_are_not_bools_are_refused_at_the_call():
    # A new user's trial: set_conversation(pinned="no") pinned it ("no" is
    # truthy), as mention_all="false" would have mentioned everyone.
    s = session()
    connect(s, T0)
    for bad in ("no", "false", 1, 0):
        with pytest.raises(TypeError, match="pinned must be True, False or None"):
            s.set_conversation(CONV, T0, pinned=bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="mention_all must be True or False"):
            s.send(CONV, b"x", T0, mention_all=bad)  # type: ignore[arg-type]
    assert not s.data_to_send()


def test_a_read_elsewhere_drops_the_mentions_the_device_holds_below_the_new_marker():
    # A new user's trial: the laptop read past the two messages that
    # mentioned the user while the phone was offline; the phone held both,
    # yet its list entry kept mention_count 2 (CLIENT.md: the count drops
    # when the device holds the message).
    s, b = listed()
    me = (F.Mention("alice"),)
    b.feed(T0, F.Push(8, tuple(dataclasses.replace(msg(i, i), mentions=me if i in (3, 4) else ()) for i in range(3, 9))))
    e = s.conversations[CONV]
    assert (e.unread, e.mention_count) == (8, 2)
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 4, 8, 4),)))
    e = s.conversations[CONV]
    assert (e.read_seq, e.unread, e.mention_count) == (4, 4, 0)


def test_a_conversation_left_out_of_a_logins_read_states_is_dropped():
    # A new user's trial: a device offline while its group was purged kept
    # the group's unread count (and list entry) for good: nothing said it
    # was gone.  LoginAck.states says how many ReadState entries the login
    # sends; once they came, what the device held of any other conversation
    # is dropped.  State made since the LoginAck stays (an own send's).
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Push(2, (msg(1, 1, conv="team"), msg(2, 2, conv="team"))))
    rid = s.list_conversations(T0)
    b.read()
    entries = tuple(F.ConvEntry(c, (msg(0, 3, conv=c),), 0, 3, 3, 0, False, False, False) for c in ("club", "team"))
    b.feed(T0, F.ConvListResp(rid, 0, entries, b"", False))
    b.feed(T0, F.ReadStates((F.ReadState("club", 0, 3, 3), F.ReadState("team", 0, 3, 3))))
    assert s.unread("team") == 3
    s.connection_lost(T0 + 1)
    s.connection_made(T0 + 2, b"tok")
    b = Broker(s)
    b.read()
    b.feed(T0 + 3, dataclasses.replace(ack_frame(), states=2), F.CalibrateResp(T0 + 2, T0 + 2))
    lid = s.send("new", b"first", T0 + 3)
    b.read_one(F.SendReq)
    b.feed(T0 + 3, F.SendAck(lid, ErrorCode.OK, b"id%014d" % 1, 1, T0 + 4))
    b.feed(T0 + 3, F.ReadStates((F.ReadState("club", 3, 3, 0),)))
    assert s.unread("team") == 3  # (one of two so far)
    b.feed(T0 + 3, F.ReadStates((F.ReadState(CONV, 0, 1, 1),)))
    assert "team" not in s.read_states and s.unread("team") == 0 and "team" not in s.conversations
    assert s.view("team") == []  # (its messages were purged with it: a re-created group showed them)
    assert set(s.read_states) == {"club", CONV, "new"} and set(s.conversations) == {"club"}


def test_a_purge_told_while_online_drops_what_the_device_holds_of_it():
    # A new user's trial: a device online while its group was purged kept
    # the purged messages in its view until its next login (a group
    # re-created with the same id showed them beside its new ones).  The
    # session asks for CAP_CONV_PURGED at every login; a ConvPurged drops
    # the view up to its last seq and, for a conversation gone (a group),
    # its read state and list entry too, and is emitted.
    s, b = listed()
    b.feed(T0, F.Push(4, (msg(3, 1, conv="team"), msg(4, 2, conv="team"))))
    b.feed(T0, F.Push(6, (msg(5, 3), msg(6, 4))))
    events(s, T0)
    assert [m.seq for m in s.view("team")] == [1, 2] and s.unread("team") == 2
    b.feed(T0, F.ReadStates((F.ReadState("team", 2, 2, 0),)), F.ConvPurged("team", 2, True))
    assert s.view("team") == [] and "team" not in s.read_states and s.unread("team") == 0
    assert events(s, T0)[-1] == ConversationPurged("team", 2, True)
    # A 1:1 chat stays: only what the purge removed leaves the view, and its
    # list entry keeps no purged message (a trial found it dropped, and
    # the next message did not bring it back until a page).
    assert [m.seq for m in s.view(CONV)] == [2, 3, 4]  # (2: the list entry's last)
    b.feed(T0, F.ConvPurged(CONV, 3, False))
    assert [m.seq for m in s.view(CONV)] == [4] and CONV in s.read_states
    assert [m.seq for m in s.conversations[CONV].last] == [4]  # (after the purge: kept)
    b.feed(T0, F.ConvPurged(CONV, 4, False))  # (purged again, the last one with it)
    assert s.conversations[CONV].last == () and s.view(CONV) == []
    assert events(s, T0) == [ConversationPurged(CONV, 3, False), ConversationPurged(CONV, 4, False)]
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 0, 4, 0),)))  # (the broker's, after the purge)
    b.feed(T0, F.Push(8, (msg(8, 5),)))
    e = s.conversations[CONV]
    assert [m.seq for m in e.last] == [5] and e.unread == 1
    # The group created again: its seqs continue after the purged ones.
    b.feed(T0, F.Push(9, (msg(9, 3, conv="team"),)))
    assert [m.seq for m in s.view("team")] == [3] and s.unread("team") == 1
    # Every Login asks for it (with or without compression).
    for cfg in ({}, {"compression": False}):
        s = session(**cfg)
        s.connection_made(T0, b"tok")
        login = Broker(s).read()[0]
        assert isinstance(login, F.Login) and login.caps & F.CAP_CONV_PURGED


def test_argument_checks_of_read_state_epoch_and_mentions():
    # A new user's trial (LOW): read_state(5) answered a ReadState of conv 5,
    # a 17-byte saved epoch was taken (and the next login resynced the
    # device: every message again), and mentions=None said "'NoneType'
    # object is not iterable".  Now: TypeError naming conv, ValueError at
    # the constructor, and None means no mentions.
    s = session()
    for call in (s.read_state, s.unread, s.view):
        with pytest.raises(TypeError, match="conv must be a conversation id"):
            call(5)  # type: ignore[arg-type]
    for bad in (b"x" * 17, b"x" * 15):
        with pytest.raises(ValueError, match="epoch must be 16 bytes"):
            ClientSession("phone", CFG, epoch=bad)
    ClientSession("phone", CFG, epoch=b"")  # (a fresh install)
    b = connect(s, T0)
    b.read()
    s.send(CONV, b"x", T0, mentions=None)
    [req] = b.read()
    assert isinstance(req, F.SendReq) and req.mentions == ()


def test_a_request_the_broker_would_close_the_connection_for_is_refused_at_the_call():
    # A new user's trial (HIGH): fetch_page("g" * 2_000_000) was sent, the
    # broker closed the connection (FRAME_TOO_LARGE), the session asked
    # again on every new connection until its timeout (60 s), and a send
    # meanwhile got no SendAck.  Now a malformed conversation id is
    # SendError(BAD_REQUEST) at the call, as for mark_read, and a request
    # whose frame is above max_frame SendError(PAYLOAD_TOO_LARGE), as for
    # a send: nothing sent, nothing remembered.
    s = session()
    b = connect(s, T0)
    b.read()
    huge = "g" * 2_000_000
    for call in (lambda: s.request_history(huge, 0, 10, True, T0), lambda: s.request_readers(huge, T0),
                 lambda: s.set_conversation(huge, T0, pinned=True), lambda: s.request_history(5, 0, 10, True, T0)):  # type: ignore[arg-type]
        with pytest.raises(SendError) as refused:
            call()
        assert refused.value.code is ErrorCode.BAD_REQUEST
        # (In words, also for no text at all: a trial's fetch_history(None)
        # said only "the broker found a field of the request invalid".)
        assert "invalid conversation id: " in str(refused.value), str(refused.value)
    for bad in (None, 5, b"team"):
        with pytest.raises(SendError, match=f"invalid conversation id: a conversation id must be text, not {type(bad).__name__}"):
            s.request_history(bad, 0, 10, True, T0)  # type: ignore[arg-type]
    with pytest.raises(SendError) as refused:
        s.list_conversations(T0, cursor=b"x" * 2_000_000)
    assert refused.value.code is ErrorCode.PAYLOAD_TOO_LARGE and "max_frame" in str(refused.value)
    for bad in ({"cursor": "abc"}, {"include_hidden": "yes"}):
        with pytest.raises(TypeError):
            s.list_conversations(T0, **bad)  # type: ignore[arg-type]
    assert not b.read() and not s._history
    # The next good one goes out.
    s.request_history(CONV, 0, 10, True, T0)
    assert [type(f) for f in b.read()] == [F.HistoryReq]


def test_typing_in_a_malformed_conversation_id_is_refused_at_the_call():
    # From a new user's trial (LOW): typing sent any id, and a malformed one
    # came back only as a BrokerRefused; mark_read refuses such an id at the
    # call, with the reason.  ("zzz:::" is a well-formed group id: an unknown
    # group is still the broker's to say.)
    s = session()
    b = connect(s, T0)
    b.read()
    with pytest.raises(SendError) as refused:
        s.typing("a b", T0)
    assert refused.value.code is ErrorCode.BAD_REQUEST and "invalid conversation id" in str(refused.value)
    assert not b.read()
    assert s.typing(CONV, T0) is True


def test_a_conversation_dropped_at_login_is_emitted_and_its_pending_marker_forgotten():
    # A new user's trial (MEDIUM): a device offline while its group was
    # purged dropped it at login without a word (an app that stores
    # messages kept them for good), and re-sent its unconfirmed marker of
    # the group at every reconnect (refused UNKNOWN_CONVERSATION; once the
    # group was created again, stored in the new group).
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Push(2, (msg(1, 1, conv="team"), msg(2, 2, conv="team"))))
    b.feed(T0, F.ReadStates((F.ReadState("team", 0, 2, 2),)))
    s.connection_lost(T0 + 1)
    s.mark_read("team", 2, T0 + 1)
    events(s, T0 + 1)
    s.connection_made(T0 + 2, b"tok")
    b = Broker(s)
    b.read()
    b.feed(T0 + 3, dataclasses.replace(ack_frame(), states=1), F.CalibrateResp(T0 + 2, T0 + 2))
    assert [f.conv for f in b.read() if isinstance(f, F.Read)] == ["team"]  # (sent before the states came)
    b.feed(T0 + 3, F.ReadStates((F.ReadState(CONV, 0, 0, 0),)))
    assert ConversationPurged("team", 2, True) in events(s, T0 + 3)
    s.connection_lost(T0 + 4)
    s.connection_made(T0 + 5, b"tok")
    b = Broker(s)
    assert not [f for f in b.read() if isinstance(f, F.Read)]


def test_a_purge_told_at_login_drops_the_purged_messages_and_a_groups_old_marker():
    # A new user's trial (HIGH): offline while a group was purged and created
    # again with a message, the phone kept the purged messages beside the
    # new one, and its old marker (3) over the new group's (0): unread 3
    # where the broker counted 1.  The login's ConvPurged (before its
    # ReadStates) drops them; a group's markers went with it, so the read
    # state the login sends is taken as it is.
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Push(5, tuple(msg(i, i, conv="team") for i in range(1, 6))))
    s.mark_read("team", 3, T0)
    b.feed(T0, F.ReadStates((F.ReadState("team", 3, 5, 2),)))
    events(s, T0)
    s.connection_lost(T0 + 1)
    s.connection_made(T0 + 2, b"tok")
    b = Broker(s)
    b.read()
    b.feed(T0 + 3, dataclasses.replace(ack_frame(), states=1), F.CalibrateResp(T0 + 2, T0 + 2))
    b.feed(T0 + 3, F.ConvPurged("team", 5, False), F.ReadStates((F.ReadState("team", 0, 6, 1),)))
    assert s.view("team") == [] and s.read_state("team") == F.ReadState("team", 0, 6, 1) and s.unread("team") == 1
    assert ConversationPurged("team", 5, False) in events(s, T0 + 3)
    b.feed(T0 + 3, F.Push(6, (msg(6, 6, conv="team"),)))
    assert [m.seq for m in s.view("team")] == [6] and s.unread("team") == 1


def test_a_purge_resets_a_held_entrys_mention_count_to_what_is_left():
    # A new user's trial (HIGH): away while its group was purged and created
    # again with one message (no mention), the phone showed mention_count 1
    # (the purged messages' 3, clamped to unread) where the broker said 0: a
    # ReadState carries no mention count.  The purge takes its mentions.
    s, b = listed()
    me = (F.Mention("alice"),)
    b.feed(T0, F.Push(5, tuple(dataclasses.replace(msg(i, i), mentions=me) for i in (3, 4, 5))))
    assert s.conversations[CONV].mention_count == 3
    b.feed(T0, F.ConvPurged(CONV, 5, False), F.ReadStates((F.ReadState(CONV, 0, 6, 1),)))
    b.feed(T0, F.Push(6, (msg(6, 6),)))
    e = s.conversations[CONV]
    assert (e.unread, e.mention_count) == (1, 0)
    b.feed(T0, F.Push(7, (dataclasses.replace(msg(7, 7), mentions=me),)))
    assert s.conversations[CONV].mention_count == 1


def test_a_one_to_one_chat_dropped_at_login_keeps_its_read_marker():
    # A new user's trial (MEDIUM): a 1:1 chat purged while the phone was
    # away left the login's list (no message since); the phone dropped its
    # read state, and the next message showed read_seq 0 where the broker
    # kept 1 (a 1:1 chat's markers stay after a purge).
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Push(2, (msg(1, 1), msg(2, 2))))
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 1, 2, 1),)))
    s.connection_lost(T0 + 1)
    s.connection_made(T0 + 2, b"tok")
    b = Broker(s)
    b.read()
    b.feed(T0 + 3, dataclasses.replace(ack_frame(), states=0), F.CalibrateResp(T0 + 2, T0 + 2))
    assert s.view(CONV) == [] and s.read_state(CONV) == F.ReadState(CONV, 1, 2, 0)
    b.feed(T0 + 3, F.Push(3, (msg(3, 3),)))
    assert s.read_state(CONV) == F.ReadState(CONV, 1, 3, 1)


def test_presence_of_one_user_id_given_as_a_str_and_bad_send_timeouts_are_refused_at_the_call():
    # A new user's trial (MEDIUM): subscribe_presence("bob") subscribed "b"
    # and "o"; send(timeout=-1) raised SendTimeout at once with the message
    # stored anyway, timeout="5" said "can't multiply sequence".
    s = session()
    b = connect(s, T0)
    b.read()
    with pytest.raises(TypeError, match="users must be an iterable of user ids"):
        s.subscribe_presence("bob", T0)
    # (A later trial: an invalid id was sent, and the broker's answer -- an
    # unknown user -- hid the mistake.)
    with pytest.raises(ValueError, match=r"subscribe_presence: user id 'a b' has the character ' '"):
        s.subscribe_presence(["bob", "a b"], T0)
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be"):
            s.send(CONV, b"x", T0, timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout must be"):
        s.send(CONV, b"x", T0, timeout="5")  # type: ignore[arg-type]
    assert not b.read()


def test_open_client_refuses_a_config_that_is_no_client_config_and_a_retry_callback_that_is_not_callable():
    # A new user's trial (LOW): config="fast" said "'str' object has no
    # attribute 'compression'"; on_connect_retry=5 failed only at the first
    # retry ("'int' object is not callable").
    from pimcore.client import Client

    with pytest.raises(TypeError, match="config must be a ClientConfig"):
        Client("tcp://127.0.0.1:7400", b"t", "phone", config="fast")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_connect_retry must be a callable"):
        Client("tcp://127.0.0.1:7400", b"t", "phone", on_connect_retry=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="timeout must be a number of s"):
        from pimcore.client import _check_seconds
        _check_seconds("send", "5")


def test_the_purge_point_a_login_repeats_is_emitted_once_per_running_session():
    # The broker sends each conversation's purge point at every login (it
    # cannot know what a device holds); the session emits it once (a third
    # trial: an event per purged conversation at every reconnect).
    s = session()
    b = connect(s, T0)
    b.feed(T0, F.Push(2, (msg(1, 1, conv="team"), msg(2, 2, conv="team"))))
    events(s, T0)
    b.feed(T0, F.ConvPurged("team", 2, False))
    b.feed(T0, F.ConvPurged("team", 2, False))
    assert [e for e in events(s, T0) if isinstance(e, ConversationPurged)] == [ConversationPurged("team", 2, False)]
    b.feed(T0, F.ConvPurged("team", 4, False))  # (purged again)
    assert [e for e in events(s, T0) if isinstance(e, ConversationPurged)] == [ConversationPurged("team", 4, False)]


def test_a_group_purge_forgets_the_seqs_seen_so_the_next_send_answers_nothing_purged():
    # A send whose after_seq is at or below a group's purge point is refused
    # (PURGED: written while the device showed the old group, it would go
    # to the members of a group created again with the id -- a new user's
    # trial).  So the session forgets what it saw of a purged group: its
    # next send there says after_seq 0, or a seq after the purge; a send
    # written before the purge keeps its own and is refused, for good,
    # with the reason in words.  A 1:1 chat goes on as before.
    s, b = listed()
    b.feed(T0, F.Push(4, (msg(3, 1, conv="team"), msg(4, 2, conv="team"))))
    events(s, T0)
    early = s.send("team", b"written before", T0)
    assert b.read_one(F.SendReq).after_seq == 2  # type: ignore[attr-defined]
    b.feed(T0, F.ConvPurged("team", 2, True))
    s.send("team", b"after", T0)
    assert b.read_one(F.SendReq).after_seq == 0  # type: ignore[attr-defined]
    b.feed(T0, F.Push(5, (msg(5, 3, conv="team"),)))
    s.send("team", b"reply", T0)
    assert b.read_one(F.SendReq).after_seq == 3  # type: ignore[attr-defined]
    b.feed(T0, F.SendAck(early, ErrorCode.PURGED, b"", 0, 0))
    [done] = [c for c in s.completions() if getattr(c, "local_id", None) == early]
    assert isinstance(done.error, SendError) and done.error.code is ErrorCode.PURGED
    assert "group 'team' was purged after this message was written" in str(done.error)
    s.send(CONV, b"1:1", T0)
    b.feed(T0, F.ConvPurged(CONV, 2, False))
    s.send(CONV, b"1:1 again", T0)
    assert [r.after_seq for r in b.read() if isinstance(r, F.SendReq)] == [2, 2]  # type: ignore[attr-defined]


def test_after_the_last_local_id_a_send_says_none_is_left_and_nothing_changes():
    # A new user's trial: after send(local_id=2**64-1) every send the SDK
    # numbered itself failed with the codec's "does not fit in 64 bits".
    s = session()
    b = connect(s, T0)
    s.send(CONV, b"last", T0, local_id=(1 << 64) - 1)
    b.read()
    for _ in range(2):
        with pytest.raises(EncodeError, match=r"no local id is left above the last one taken .*: give local_id"):
            s.send(CONV, b"next", T0)
    assert s.send(CONV, b"given", T0, local_id=7) == 7 and b.read()


def _amend(position: int, target: int, kind: F.MessageKind, sender: str, payload: bytes = b"", at: int = 0) -> F.Message:
    """A RECALL / EDIT / DELETE entry of CONV acting on seq ``target``."""
    m = dataclasses.replace(msg(position, 0, sender=sender, server_time=at or None), kind=kind, target=target, payload=payload)
    return m


def test_a_list_entrys_last_never_undoes_a_deletion_nor_an_amend_the_device_holds():
    # A new user's trial (HIGH): alice deleted bob's message for herself on
    # one device, then any ConvUpdate (a mark_read on another) or page
    # carried it as `last` undeleted, and the session wrote that copy over
    # the held one: view() showed its text again on every device (and a
    # later edit's).  The broker's `last` is now as history returns it; the
    # session still never takes a list entry's copy of a message over a
    # held one that is more amended -- a deletion for oneself and a recall
    # are final, an edit is newer by its server time -- (an entry read
    # before the amend committed may arrive after it) and the entry's
    # `last` shows the held state.
    s, b = listed()
    b.feed(T0, F.Push(2, (msg(1, 1), msg(2, 2))))
    b.feed(T0, F.Push(3, (_amend(3, 2, F.MessageKind.DELETE, "alice"),)))

    def shown() -> list[tuple[int, bytes, bool]]:
        return [(m.seq, m.payload, m.deleted) for m in s.view(CONV)]

    assert shown() == [(1, b"p1", False), (2, b"", True)]
    # the delete's own push makes the entry's `last` deleted too
    assert [(m.payload, m.deleted) for m in s.conversations[CONV].last] == [(b"", True)]
    stale = F.ConvEntry(CONV, (msg(0, 2),), 2, 2, 0, 0, False, False, False)
    b.feed(T0, F.ConvUpdate((stale,)))
    rid = s.list_conversations(T0)
    b.feed(T0, F.ConvListResp(rid, 0, (stale,), b"", False))
    assert shown() == [(1, b"p1", False), (2, b"", True)]
    e = s.conversations[CONV]
    assert [(m.seq, m.payload, m.deleted) for m in e.last] == [(2, b"", True)] and e.read_seq == 2
    # an edit pushed after the delete (its payload blanked for her) brings nothing back
    b.feed(T0, F.Push(4, (_amend(4, 2, F.MessageKind.EDIT, "bob", b"", at=T0 + 50),)))
    assert shown()[1] == (2, b"", True) and s.conversations[CONV].last[0].payload == b""
    # An edit the device holds is not undone by an older copy (edited
    # earlier), nor a recall by an unrecalled one.
    b.feed(T0, F.Push(5, (msg(5, 5),)))
    b.feed(T0, F.Push(6, (_amend(6, 5, F.MessageKind.EDIT, "bob", b"v2", at=T0 + 20),)))
    older = dataclasses.replace(msg(0, 5), payload=b"v1", edited=T0 + 10)
    stale = F.ConvEntry(CONV, (older,), 2, 5, 1, 0, False, False, False)
    b.feed(T0, F.ConvUpdate((stale,)))
    assert shown()[-1] == (5, b"v2", False)
    assert [(m.payload, m.edited) for m in s.conversations[CONV].last] == [(b"v2", T0 + 20)]
    b.feed(T0, F.Push(7, (_amend(7, 5, F.MessageKind.RECALL, "bob"),)))
    b.feed(T0, F.ConvUpdate((stale,)))
    assert [(m.seq, m.payload, m.recalled) for m in s.view(CONV)][-1] == (5, b"", True)
    assert [(m.payload, m.recalled) for m in s.conversations[CONV].last] == [(b"", True)]
    # a newer state is taken: an edit the device missed
    b.feed(T0, F.Push(8, (msg(8, 8),)))
    newer = dataclasses.replace(msg(0, 8), payload=b"p8 edited", edited=T0 + 90)
    b.feed(T0, F.ConvUpdate((F.ConvEntry(CONV, (newer,), 2, 8, 1, 0, False, False, False),)))
    assert shown()[-1] == (8, b"p8 edited", False)
    assert s.conversations[CONV].last[0].payload == b"p8 edited"


def test_a_read_state_never_moves_the_list_entrys_last_seq_so_a_hidden_entry_stays_hidden():
    # A new user's trial (MEDIUM): bob sent two messages and edited the
    # second; alice hid the chat, then marked it read.  The broker still
    # hid it, but the session's entry said hidden=False: the ReadStates
    # handler raised the entry's last_seq (the seq of its last message) to
    # the read state's (the conversation's last seq, the EDIT entry
    # included), so the ConvUpdate that followed looked older than the entry
    # ("a newer message came") and was un-hidden; last_seq flipped 2 -> 3.
    # One meaning per field: the entry's last_seq is its last message's.
    s, b = listed(hidden=True)
    b.feed(T0, F.Push(2, (msg(1, 1), msg(2, 2))))
    b.feed(T0, F.Push(3, (_amend(3, 2, F.MessageKind.EDIT, "bob", b"two, edited", at=T0 + 30),)))
    e = s.conversations[CONV]
    assert (e.hidden, e.last_seq) == (True, 2)
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 1, 3, 1),)))
    e = s.conversations[CONV]
    assert (e.hidden, e.last_seq, e.read_seq, e.unread) == (True, 2, 1, 1)
    assert s.read_state(CONV) == F.ReadState(CONV, 1, 3, 1)  # the read state keeps its own meaning
    edited = dataclasses.replace(msg(0, 2), payload=b"two, edited", edited=T0 + 30)
    b.feed(T0, F.ConvUpdate((F.ConvEntry(CONV, (edited,), 1, 2, 1, 0, False, False, True),)))
    e = s.conversations[CONV]
    assert (e.hidden, e.last_seq, e.read_seq, e.unread) == (True, 2, 1, 1)
    b.feed(T0, F.ReadStates((F.ReadState(CONV, 3, 3, 0),)))
    b.feed(T0, F.ConvUpdate((F.ConvEntry(CONV, (edited,), 3, 2, 0, 0, False, False, True),)))
    e = s.conversations[CONV]
    assert (e.hidden, e.last_seq, e.read_seq, e.unread) == (True, 2, 3, 0)
    # a new message still un-hides it
    b.feed(T0, F.Push(4, (msg(4, 4),)))
    e = s.conversations[CONV]
    assert (e.hidden, e.last_seq, e.unread) == (False, 4, 1)
