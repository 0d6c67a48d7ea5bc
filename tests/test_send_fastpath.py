"""The core's send-path fast functions (pimcore._pure.send and its compiled
twin): ``propose_sends``, ``finish_send``, ``finish_sends``, ``push_slice``,
``send_digest``.

1. through the broker: a run of reads, retries, refusals and commits gives
   the same frames, store ops, closes and statistics with the fast path as
   with it switched off (every send through ``_on_send`` /
   ``_finish_send`` / ``_push_entries``' own Python), on random scenarios;
   and the fast path really takes a plain window of SendReqs in one call;
2. differential hypothesis tests of each function, Cython against pure, on
   good and bad input: the same result or the same exception, the same
   state left behind;
3. ``send_digest`` is the digest the core always used (``message_digest``).
"""

from __future__ import annotations

import copy
import hashlib
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pimcore import core
from pimcore import frames as F
from pimcore.clock import HybridClock
from pimcore.codec import encode_frame
from pimcore.core import BrokerConfig, Limits
from pimcore.errors import ErrorCode
from pimcore.ids import direct_conversation
from pimcore.store import AckPosition, Appended, Duplicate, MemoryStore, NewMessage

from _harness import Harness

NODE = b"N" * 8
EPOCH = b"E" * 16
AB = direct_conversation("al", "bo")
BC = direct_conversation("bo", "cy")


class _Off:
    """core._impl with the send-path fast functions declining everything."""

    def __init__(self, impl: ModuleType) -> None:
        self._impl = impl

    def __getattr__(self, name: str) -> Any:
        return getattr(self._impl, name)

    @staticmethod
    def propose_sends(*args: Any) -> int:
        return 0

    @staticmethod
    def finish_send(*args: Any) -> bool:
        return False

    @staticmethod
    def finish_sends(ops: Any, ctxs: Any, results: Any, start: int, *args: Any) -> int:
        return start

    @staticmethod
    def push_slice(*args: Any) -> None:
        return None


class _Counting(_Off):
    """core._impl counting what the fast paths took."""

    def __init__(self, impl: ModuleType) -> None:
        super().__init__(impl)
        self.taken: list[int] = []
        self.finished = 0
        self.runs: list[int] = []  # what each finish_sends call took

    def propose_sends(self, *args: Any) -> int:  # type: ignore[override]
        n = self._impl.propose_sends(*args)
        self.taken.append(n)
        return n

    def finish_send(self, *args: Any) -> bool:  # type: ignore[override]
        done = self._impl.finish_send(*args)
        self.finished += done
        return done

    def finish_sends(self, ops: Any, ctxs: Any, results: Any, start: int, *args: Any) -> int:  # type: ignore[override]
        end = self._impl.finish_sends(ops, ctxs, results, start, *args)
        self.finished += end - start
        self.runs.append(end - start)
        return end

    def push_slice(self, *args: Any) -> Any:  # type: ignore[override]
        return self._impl.push_slice(*args)


def _scenario(config: BrokerConfig, steps: list) -> dict:
    h = Harness(MemoryStore(NODE), config, driver="inline", node_id=NODE, epoch=EPOCH, last_server_time=0)
    h.hold_commits = True
    conns = {"al1": h.login("al", "ph1"), "al2": h.login("al", "ph2"), "bo": h.login("bo", "ph")}
    h.release()
    for step in steps:
        kind = step[0]
        if kind == "read":
            _, who, frames = step
            if who in conns and conns[who] not in h.closed:
                data = b"".join(encode_frame(f) for f in frames)
                h.feed_bytes(conns[who], data)
        elif kind == "commit":
            if h.held:
                h.commit(h.held.pop(0))
        elif kind == "advance":
            h.now += step[1]
        elif kind == "lose":
            if step[1] in conns and conns[step[1]] not in h.closed:
                h.lose(conns.pop(step[1]))
    h.release()
    return {
        "frames": dict(h.frames),
        "ops": [(c.request_id, c.ops) for c in h.commits],
        "closed": h.closed,
        "stats": h.broker.statistics(),
        "now": h.now,
    }


payload = st.one_of(st.binary(max_size=8), st.binary(max_size=8), st.just(b"x" * 40))
conv = st.one_of(st.just(AB), st.just(AB), st.just(AB), st.just(BC), st.just("g:team"), st.just("bad id!"))
mentions = st.one_of(
    st.just(()), st.just(()), st.just(()),
    st.just((F.Mention("bo"),)), st.just((F.Mention("not valid!"),)),
)
sendreq = st.builds(
    F.SendReq, local_id=st.integers(1, 12), conv=conv, client_time=st.integers(-5, 5), payload=payload,
    after_seq=st.integers(0, 3), mentions=mentions, mention_all=st.sampled_from([False, False, False, True]),
)
frame = st.one_of(sendreq, sendreq, sendreq, sendreq, st.builds(F.Ping, st.integers(0, 9)))
step = st.one_of(
    st.tuples(st.just("read"), st.sampled_from(["al1", "al1", "al2", "bo"]), st.lists(frame, min_size=1, max_size=6)),
    st.tuples(st.just("read"), st.sampled_from(["al1", "bo"]), st.lists(sendreq, min_size=1, max_size=6)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("advance"), st.sampled_from([0, 1, 1000, 700_000])),
    st.tuples(st.just("lose"), st.sampled_from(["al2", "bo"])),
)
config = st.builds(
    lambda rate, burst, window, strikes, events: BrokerConfig(
        limits=Limits(send_rate=rate, send_burst=burst, window=window, max_payload=16, max_mentions=1),
        rate_limit_strikes=strikes, record_events=events,
    ),
    st.sampled_from([0.0, 0.0, 2000.0, 3.0, 7]),
    st.sampled_from([1, 3, 512]),
    st.sampled_from([2, 5, 256]),
    st.sampled_from([2, 1024]),
    st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=config, steps=st.lists(step, min_size=1, max_size=12))
def test_broker_same_with_and_without_the_fast_path(config, steps) -> None:
    impl = core._impl
    fast = _scenario(config, steps)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(core, "_impl", _Off(impl))
        slow = _scenario(config, steps)
    assert fast == slow


def test_a_window_of_plain_sends_is_one_fast_call(monkeypatch) -> None:
    counting = _Counting(core._impl)
    monkeypatch.setattr(core, "_impl", counting)
    h = Harness(MemoryStore(NODE), BrokerConfig(limits=Limits(send_rate=2000.0, send_burst=512)), driver="inline")
    al, bo = h.login("al", "ph"), h.login("bo", "ph")
    h.take(al), h.take(bo)
    h.hold_commits = True
    h.feed_bytes(al, b"".join(encode_frame(F.SendReq(i, AB, i, b"m%d" % i)) for i in range(1, 17)))
    assert counting.taken == [16]
    # a retry of a send in flight, a mention: the ordinary way, after the plain ones
    h.feed_bytes(al, b"".join(encode_frame(f) for f in (
        F.SendReq(17, AB, 0, b"p"), F.SendReq(3, AB, 3, b"m3"), F.SendReq(18, AB, 0, b"q", mentions=(F.Mention("bo"),)),
    )))
    assert counting.taken == [16, 1]
    h.release()
    acks = h.acks(al)
    # the retry waits on its original and is acked in its own place (SendAcks
    # come in SendReq order)
    assert [a.local_id for a in acks] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 3, 18]
    assert all(a.code == ErrorCode.OK for a in acks) and acks[2] == acks[17]
    # all but the mention and the original with two waiters
    assert counting.finished == 16
    assert [m.payload for m in h.pushed(bo)] == [b"m%d" % i for i in range(1, 17)] + [b"p", b"q"]


# ---------------------------------------------------------------- differential


def _digest(conv: str, payload: bytes) -> bytes:
    return hashlib.blake2b(conv.encode() + b"\x00" + payload, digest_size=16).digest()


@settings(max_examples=300)
@given(
    conv=st.one_of(st.text(max_size=20), st.just("\ud800"), st.just(b"d:a:b"), st.just(3)),
    payload=st.one_of(st.binary(max_size=300), st.just(bytearray(b"x")), st.just("p")),
)
def test_send_digest_differential(both, conv, payload) -> None:
    outs = []
    for backend in both:
        try:
            res: Any = backend.send_digest(conv, payload)
        except (TypeError, UnicodeEncodeError) as exc:
            res = ("err", type(exc))
        outs.append(res)
    assert outs[0] == outs[1]
    if type(conv) is str and type(payload) is bytes and not isinstance(outs[0], tuple):
        assert outs[0] == _digest(conv, payload) == core.message_digest(conv, payload)


@pytest.mark.parametrize("size", [0, 1, 100, 126, 127, 128, 129, 254, 255, 256, 257, 1000, 70_000])
def test_send_digest_across_block_boundaries(backend, size) -> None:
    # conv + NUL + payload fills BLAKE2b's 128-byte blocks exactly, one byte
    # short or over, with a one-byte and a multi-byte conversation id
    for conv in ("x", "g:\u00e9t\u00e9-" + "a" * 40):
        payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        assert backend.send_digest(conv, payload) == _digest(conv, payload)


def test_send_digest_errors(backend) -> None:
    assert backend.send_digest("d:al:bo", b"hi") == core.message_digest("d:al:bo", b"hi")
    assert backend.send_digest("é", b"") == _digest("é", b"")
    with pytest.raises(TypeError):
        backend.send_digest(b"c", b"")
    with pytest.raises(TypeError):
        backend.send_digest("c", bytearray())
    with pytest.raises(UnicodeEncodeError):
        backend.send_digest("\udc80", b"")


def _conn(**kw: Any) -> SimpleNamespace:
    base = dict(id=7, user="al", device="ph", inflight=0, tokens=2.0, refill_at=0, strikes=3)
    base.update(kw)
    return SimpleNamespace(**base)


def _members(conv: Any) -> Any:
    if conv == "bad":
        return None
    if conv == "boom":
        raise KeyError("boom")
    if conv == "list":
        return ["al"]
    return core._conv_members(conv) if type(conv) is str else None


def _state(c: SimpleNamespace, clock: HybridClock, pending: dict, ops: list, ctxs: list) -> tuple:
    return (
        vars(c), clock.last, {k: (v.key, v.digest, v.waiters) for k, v in pending.items()}, ops,
        [(x.key, x.digest, x.waiters) for x in ctxs],
    )


good_req = st.builds(
    F.SendReq, local_id=st.integers(0, 5), conv=st.sampled_from([AB, AB, "g:x", BC]), client_time=st.integers(-3, 3),
    payload=st.binary(max_size=12), after_seq=st.integers(0, 2),
)
bad_req = st.one_of(
    st.builds(F.SendReq, local_id=st.sampled_from([True, "1", 1.0, -1]), conv=st.just(AB), client_time=st.just(0),
              payload=st.just(b"")),
    st.builds(F.SendReq, local_id=st.just(1), conv=st.sampled_from(["bad", "boom", "list", b"x", "\ud800", "d:al:zz"]),
              client_time=st.just(0), payload=st.just(b"")),
    st.builds(F.SendReq, local_id=st.just(1), conv=st.just(AB), client_time=st.just(0),
              payload=st.sampled_from([b"y" * 30, bytearray(b"z"), "s"])),
    st.builds(F.SendReq, local_id=st.just(2), conv=st.just(AB), client_time=st.just(0), payload=st.just(b""),
              mentions=st.sampled_from([(F.Mention("bo"),), [], None]), mention_all=st.sampled_from([True, 0, None])),
    st.just(F.Ping(1)),
    st.just("not a frame"),
)


def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy, n: int = 12) -> st.SearchStrategy:
    # good n times in n + 1 (one_of would draw the branches evenly)
    return st.sampled_from([True] * n + [False]).flatmap(lambda ok: good if ok else bad)


req_list = st.lists(_mostly(good_req, bad_req), max_size=8)


@settings(max_examples=500, deadline=None)
@given(
    frames=_mostly(req_list, st.sampled_from([(), None])),
    inflight=st.sampled_from([0, 0, 0, 0, 3, 5, 6]),
    rate=st.sampled_from([0.0, 0.0, 0.0, 0, 1000.0, 1000.0, 3, 0.5, float("inf")]),
    tokens=st.sampled_from([0.0, 1.0, 2.5, 100.0]),
    refill_at=st.sampled_from([0, 999_000, 1_000_000]),
    now=st.sampled_from([1_000_000] * 12 + [5, (1 << 63) - 2, 2.0]),
    last=st.sampled_from([0, 999_999, 1_000_000, 2_000_000, (1 << 63) - 3]),
    pending_keys=st.lists(st.tuples(st.just("al"), st.just("ph"), st.integers(0, 5)), max_size=2),
    node_id=st.sampled_from([NODE] * 12 + [b"", "N" * 8]),
    events=st.booleans(),
)
def test_propose_sends_differential(both, frames, inflight, rate, tokens, refill_at, now, last, pending_keys, node_id,
                                    events) -> None:
    limits = SimpleNamespace(send_rate=rate, send_burst=3, window=6, max_payload=20)
    outs = []
    for backend in both:
        c = _conn(inflight=inflight, tokens=tokens, refill_at=refill_at)
        clock = HybridClock(last)
        pending = {k: core._PendingSend(k, b"d", [1]) for k in pending_keys}
        ops: list = []
        ctxs: list = []
        fr = copy.copy(frames)
        try:
            res: Any = backend.propose_sends(
                fr, c, now, limits, _members, pending, clock, node_id, events, core._new_message, core._pending_send,
                F.SendReq, ops, ctxs,
            )
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            res = ("err", type(exc), str(exc))
        outs.append((res, fr, _state(c, clock, pending, ops, ctxs)))
    assert outs[0] == outs[1]
    res, _, (conn_after, clock_last, pending_after, ops, ctxs) = outs[0]
    if isinstance(res, int):
        assert len(ops) == len(ctxs) == res
        for op, ctx in zip(ops, ctxs):
            assert type(op) is NewMessage and op.mentions == () and op.mention_all is False
            assert op.digest == _digest(op.conv, op.payload) == ctx[1]
            assert ctx[0] == ("al", "ph", op.local_id) and ctx[2] == [7]
            assert op.msg_id == op.server_time.to_bytes(8, "big") + node_id
        assert conn_after["inflight"] == inflight + res
        if res:
            assert clock_last == ops[-1].server_time


def _appended(positions: Any, after_seq: int = 0) -> Appended:
    return Appended(b"M" * 16, 5, 1234, positions, after_seq)


user_name = st.sampled_from(["al", "bo", "cy"])
positions = _mostly(
    st.lists(st.tuples(user_name, st.integers(0, 9)), max_size=4).map(tuple),
    st.sampled_from([(("al", 1, 2),), (("al",),), None, (([], 1),)]),
    6,
)


@settings(max_examples=500, deadline=None)
@given(
    res=_mostly(st.builds(_appended, positions, st.integers(0, 3)), st.sampled_from([Duplicate(b"M" * 16, 5, 1234), "x"]), 9),
    waiters=_mostly(st.just([7]), st.sampled_from([[8], [7, 8], [("post", 1)], [], (7,), [True]]), 6),
    op_mentions=st.sampled_from([()] * 9 + [("bo",), [], None]),
    mention_all=st.booleans(),
    heads=st.dictionaries(user_name, st.one_of(st.integers(0, 9), st.just(None)), max_size=3),
    online=st.dictionaries(user_name, st.sampled_from([{"ph": 1}, {"ph": 1, "pc": 2}, {"pc": 2}, None, "ph"]), max_size=3),
    fresh=st.dictionaries(user_name, st.one_of(st.just([(0, "e")]), st.just(None), st.just(("t",))), max_size=2),
    acks=st.dictionaries(st.sampled_from([7, 8]), st.one_of(st.just(["a0"]), st.just(None)), max_size=1),
    containers_ok=st.sampled_from([True] * 9 + [False]),
)
def test_finish_send_differential(both, res, waiters, op_mentions, mention_all, heads, online, fresh, acks,
                                  containers_ok) -> None:
    op = NewMessage(b"M" * 16, AB, "al", "ph", 3, -1, 1234, b"hi", b"d" * 16, 0, False, op_mentions, mention_all)
    outs = []
    for backend in both:
        ctx = SimpleNamespace(key=("al", "ph", 3), digest=b"d" * 16, waiters=copy.copy(waiters))
        st_ = dict(pending={("al", "ph", 3): ctx, ("x", "y", 1): 0}, heads=dict(heads), online=copy.deepcopy(online),
                   fresh=copy.deepcopy(fresh), to_pump={"zz"}, conns={7: SimpleNamespace(inflight=2), 9: None},
                   acks=copy.deepcopy(acks), stats={"messages_stored": 4})
        if not containers_ok:
            st_["to_pump"] = ["zz"]
        try:
            done: Any = backend.finish_send(
                op, ctx, res, Appended, st_["pending"], st_["heads"], st_["online"], st_["fresh"], st_["to_pump"],
                st_["conns"], st_["acks"], st_["stats"], core._send_ack, core._message, ErrorCode.OK,
            )
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            done = ("err", type(exc), str(exc))  # the same exception, word for word
        st_["pending"] = set(st_["pending"])
        st_["conns"] = st_["conns"][7].inflight
        outs.append((done, st_))
    assert outs[0] == outs[1]
    if outs[0][0] is True:
        after = outs[0][1]
        assert after["stats"] == {"messages_stored": 5} and ("al", "ph", 3) not in after["pending"]
        assert after["conns"] == (1 if 7 in waiters else 2)


def _batch_op(kind: str, local_id: int) -> Any:
    mentions: Any = ("bo",) if kind == "mention" else ()
    if kind in ("plain", "mention"):
        return NewMessage(b"M" * 16, AB, "al", "ph", local_id, -1, 1234, b"hi%d" % local_id, b"d" * 16, 0, False,
                          mentions, False)
    return AckPosition("al", "ph", local_id, 5) if kind == "ack" else "not an op"


batch_item = st.tuples(
    st.sampled_from(["plain"] * 8 + ["mention", "ack", "junk"]),
    _mostly(st.builds(_appended, positions, st.integers(0, 3)), st.sampled_from([Duplicate(b"M" * 16, 5, 1234), "x"]), 9),
    _mostly(st.just([7]), st.sampled_from([[8], [7, 8], [("post", 1)], [], (7,), [True]]), 6),
)


def _finish_sends_state(items: list, heads: dict, online: dict, to_pump: Any) -> dict:
    ops = tuple(_batch_op(kind, i) for i, (kind, _, _) in enumerate(items))
    ctxs = [SimpleNamespace(key=("al", "ph", i), digest=b"d" * 16, waiters=copy.copy(w)) for i, (_, _, w) in enumerate(items)]
    return dict(ops=ops, ctxs=ctxs, results=tuple(r for _, r, _ in items),
                pending={("al", "ph", i): 0 for i in range(len(items))}, heads=dict(heads), online=copy.deepcopy(online),
                fresh={}, to_pump=copy.copy(to_pump), conns={7: SimpleNamespace(inflight=20), 9: None}, acks={},
                stats={"messages_stored": 4})


def _finish_sends_args(s: dict) -> tuple:
    return (s["pending"], s["heads"], s["online"], s["fresh"], s["to_pump"], s["conns"], s["acks"], s["stats"],
            core._send_ack, core._message, ErrorCode.OK)


def _finish_sends_seen(s: dict) -> dict:
    # comparable: contexts by their waiters, the connection by its inflight
    return dict(s, ctxs=[c.waiters for c in s["ctxs"]], pending=set(s["pending"]), conns=s["conns"][7].inflight)


@settings(max_examples=500, deadline=None)
@given(
    items=st.lists(batch_item, max_size=8),
    start=st.sampled_from([0] * 12 + [1, 3, -1, 99, 1.0, True]),
    shape=st.sampled_from(["ok"] * 12 + ["lists", "short ctxs", "short results", "ops as str", "to_pump list"]),
    heads=st.dictionaries(user_name, st.one_of(st.integers(0, 9), st.just(None)), max_size=3),
    online=st.dictionaries(user_name, st.sampled_from([{"ph": 1}, {"ph": 1, "pc": 2}, {"pc": 2}, None, "ph"]), max_size=3),
)
def test_finish_sends_differential(both, items, start, shape, heads, online) -> None:
    outs = []
    for backend in both:
        s = _finish_sends_state(items, heads, online, ["zz"] if shape == "to_pump list" else {"zz"})
        ops, ctxs, results = s["ops"], s["ctxs"], s["results"]
        if shape == "lists":
            ops, results = list(ops), list(results)
        elif shape == "short ctxs":
            ctxs = ctxs[:-1]
        elif shape == "short results":
            results = results[1:]
        elif shape == "ops as str":
            ops = "abc"
        try:
            end: Any = backend.finish_sends(ops, ctxs, results, start, NewMessage, Appended, *_finish_sends_args(s))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            end = ("err", type(exc))  # the type only, as in test_finish_send_differential
        outs.append((end, _finish_sends_seen(s)))
    assert outs[0] == outs[1]
    end = outs[0][0]
    if isinstance(end, int) and 0 <= start <= len(items) and type(start) is int:
        # exactly finish_send op by op, from start to the first op it declines
        backend = both[1]
        s = _finish_sends_state(items, heads, online, {"zz"})
        i = start
        while i < len(items) and type(s["ops"][i]) is NewMessage and backend.finish_send(
            s["ops"][i], s["ctxs"][i], s["results"][i], Appended, *_finish_sends_args(s)
        ):
            i += 1
        assert (end, outs[0][1]) == (i, _finish_sends_seen(s))


def test_finish_sends_takes_a_run_and_stops_before_the_rest(backend) -> None:
    items = [("plain", _appended((("bo", 1),)), [7]), ("plain", _appended((("bo", 2),)), [7]),
             ("ack", None, [7]), ("plain", _appended((("bo", 3),)), [7])]
    s = _finish_sends_state(items, {"bo": 0}, {"bo": {"ph": 1}}, set())
    assert backend.finish_sends(s["ops"], s["ctxs"], s["results"], 0, NewMessage, Appended, *_finish_sends_args(s)) == 2
    assert [a.local_id for a in s["acks"][7]] == [0, 1] and s["heads"] == {"bo": 2}
    assert [pos for pos, _ in s["fresh"]["bo"]] == [1, 2] and s["to_pump"] == {"bo"}
    # the op it stopped at, and what follows, untouched; then on from after it
    assert set(s["pending"]) == {("al", "ph", 2), ("al", "ph", 3)} and s["conns"][7].inflight == 18
    assert backend.finish_sends(s["ops"], s["ctxs"], s["results"], 2, NewMessage, Appended, *_finish_sends_args(s)) == 2
    assert backend.finish_sends(s["ops"], s["ctxs"], s["results"], 3, NewMessage, Appended, *_finish_sends_args(s)) == 4
    assert s["heads"] == {"bo": 3} and s["conns"][7].inflight == 17
    with pytest.raises(ValueError):
        backend.finish_sends(s["ops"], s["ctxs"], s["results"], 5, NewMessage, Appended, *_finish_sends_args(s))


def _msg(pos: int, device: str, sender: str, payload: Any = b"p") -> F.Message:
    return F.Message(pos, b"M" * 16, AB, pos, sender, device, 0, 1, payload)


entry = st.builds(
    lambda pos, dev, sender, size, kind: (
        pos,
        _msg(pos, dev, sender, b"x" * size) if kind == "message"
        else NewMessage(b"M" * 16, AB, sender, dev, 1, 0, 1, b"x" * size, b"d") if kind == "op"
        else _msg(pos, dev, sender, bytearray(size)) if kind == "bytearray"
        else "not a pair" if kind == "junk" else (pos,),
    ),
    st.integers(1, 50), st.sampled_from(["ph", "pc"]), st.sampled_from(["al", "bo"]), st.integers(0, 40),
    st.sampled_from(["message"] * 12 + ["op"] * 3 + ["bytearray", "junk"]),
)


@settings(max_examples=500, deadline=None)
@given(
    entries=_mostly(st.lists(entry, max_size=8), st.sampled_from([(), None, "ab"])),
    as_tuple=st.booleans(),
    budget=st.sampled_from([0, 1, 40, 100, 300, 1 << 20, -5, 1 << 62, (1 << 62) + 1, -(1 << 62), 2.0]),
)
def test_push_slice_differential(both, entries, as_tuple, budget) -> None:
    if as_tuple and isinstance(entries, list):
        entries = tuple(entries)
    outs = []
    for backend in both:
        try:
            res: Any = backend.push_slice(entries, budget, "ph", "al", F.Message)
        except (TypeError, ValueError, AttributeError) as exc:
            res = ("err", type(exc), str(exc))  # the same exception, word for word
        outs.append(res)
    assert outs[0] == outs[1]


def test_push_slice_is_the_push_entries_loop(backend) -> None:
    own = NewMessage(b"M" * 16, AB, "al", "ph", 1, 0, 1, b"x" * 10, b"d")
    entries = [(3, own), (4, _msg(4, "pc", "al", b"y" * 20)), (5, _msg(5, "ph", "bo", b"z" * 30)), (6, _msg(6, "ph", "bo"))]
    # budget for the first three (42 + 52 + 62): the own send is counted, not pushed
    msgs, upto, size = backend.push_slice(entries, 42 + 52 + 62, "ph", "al", F.Message)
    assert (msgs, upto, size) == ((entries[1][1], entries[2][1]), 5, 52 + 62)
    # at least one entry, even over the budget
    assert backend.push_slice(entries[1:], 0, "ph", "al", F.Message) == ((entries[1][1],), 4, 52)
    # only own sends: taken, nothing pushed
    assert backend.push_slice(entries[:1], 100, "ph", "al", F.Message) == ((), 3, 0)
    # a stored entry to convert, or not the plain case: the caller's loop
    assert backend.push_slice([(3, own)], 100, "pc", "al", F.Message) is None
    assert backend.push_slice([], 100, "ph", "al", F.Message) is None
    assert backend.push_slice(entries, 1.0, "ph", "al", F.Message) is None
    with pytest.raises(TypeError):
        backend.push_slice([3], 100, "ph", "al", F.Message)


@pytest.mark.parametrize("item, exc, message", [
    (5, TypeError, "push entries must be (position, entry) pairs, not int"),
    (None, TypeError, "push entries must be (position, entry) pairs, not NoneType"),
    ("ab", TypeError, "push entries must be (position, entry) pairs, not str"),
    ((1,), ValueError, "push entries must be (position, entry) pairs, got a tuple of 1"),
    ([1, 2, 3], ValueError, "push entries must be (position, entry) pairs, got a list of 3"),
])
def test_push_slice_refuses_what_is_not_a_pair_alike(both, item: Any, exc: type, message: str) -> None:
    # (Failed before: adversarial review, finding 02 -- Cython's unpacking
    # said "'int' object is not iterable", CPython's "cannot unpack
    # non-iterable int object".)
    for backend in both:
        for entries in ([item], [(3, _msg(3, "pc", "bo")), item]):
            with pytest.raises(exc) as info:
                backend.push_slice(entries, 1 << 20, "ph", "al", F.Message)
            assert str(info.value) == message, backend


@pytest.mark.parametrize("item, exc, message", [
    (5, TypeError, "Appended.positions must be (user, position) pairs, not int"),
    (None, TypeError, "Appended.positions must be (user, position) pairs, not NoneType"),
    (("al",), ValueError, "Appended.positions must be (user, position) pairs, got a tuple of 1"),
    (("al", 1, 2), ValueError, "Appended.positions must be (user, position) pairs, got a tuple of 3"),
])
def test_finish_send_refuses_positions_that_are_not_pairs_alike(both, item: Any, exc: type, message: str) -> None:
    outs = []
    for backend in both:
        op = NewMessage(b"M" * 16, AB, "al", "ph", 3, -1, 1234, b"hi", b"d" * 16, 0, False, (), False)
        ctx = SimpleNamespace(key=("al", "ph", 3), digest=b"d" * 16, waiters=[7])
        heads = {"bo": 0}
        with pytest.raises(exc) as info:
            backend.finish_send(op, ctx, _appended((("bo", 4), item)), Appended, {("al", "ph", 3): ctx}, heads, {},
                                {}, set(), {7: SimpleNamespace(inflight=1)}, {}, {"messages_stored": 0}, core._send_ack,
                                core._message, ErrorCode.OK)
        assert str(info.value) == message
        outs.append(heads)
    assert outs == [{"bo": 4}, {"bo": 4}]  # (what came before the bad one is done, alike)


def test_finish_sends_same_for_equal_users_that_are_not_one_object(both) -> None:
    # The compiled twin remembers a run's last two users by identity; a user
    # equal to a remembered one but another object (a store decodes names per
    # conversation) takes the lookups and may move its head: the remembered
    # head must not then move it back.  Both twins: the same heads.
    bo, bo2 = "bo", "".join(["b", "o"])
    assert bo2 == bo and bo2 is not bo
    items = [("plain", _appended((("bo", 5),)), [7]), ("plain", _appended(((bo2, 7),)), [7]),
             ("plain", _appended((("bo", 6),)), [7])]
    outs = []
    for backend in both:
        s = _finish_sends_state(items, {"bo": 0}, {"bo": {"ph": 1}}, set())
        end = backend.finish_sends(s["ops"], s["ctxs"], s["results"], 0, NewMessage, Appended, *_finish_sends_args(s))
        outs.append((end, _finish_sends_seen(s)))
    assert outs[0] == outs[1]
    assert outs[1][1]["heads"] == {"bo": 7}
