"""The instruments of the throughput issue: the one-thread C load generator
(bench/loadgen.c) against a live broker, against redis-server and against
mosquitto (and its MQTT mode against a fake MQTT broker that splits every
packet), the side-by-side report of ``pimcore bench --compare redis`` and
``--compare mosquitto``, and what the report says limited a run.

No figure is judged here -- only that the instruments count right and say
what they did.  Tests that need ``cc``, ``redis-server`` or ``mosquitto``
skip with the reason when they are missing.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import replace
import os
import shutil
import socket
import statistics
import threading
import time
from typing import Optional

import pytest

from pimcore import loadgen
from pimcore.loadgen import (BenchConfig, BenchError, BenchResult, MosquittoProcess, RedisProcess, c_generator,
                             format_compare, format_result, mqtt_connect, resp_command, run_bench, run_compare,
                             run_mosquitto, run_redis)

from _proc import run_pimcore

SMALL = dict(window=4, durability="os", progress=False, pin=False, drain=20.0)


def need_c() -> str:
    exe, why = c_generator()
    if exe is None:
        pytest.skip(f"C load generator unavailable: {why}")
    return exe


def need_redis() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")


def need_mosquitto() -> None:
    if loadgen._mosquitto_exe() is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")


# ---------------------------------------------------------------- against the broker


@pytest.mark.parametrize("generator", ["c", "python"])
def test_each_generator_counts_every_ack_and_delivery(generator: str) -> None:
    if generator == "c":
        need_c()
    res = run_bench(BenchConfig(conns=3, count=600, generator=generator, **SMALL))
    assert res.generator == generator
    assert res.errors == {}
    assert (res.acked, res.deliveries) == (600, 600)  # every SendAck OK, every message pushed once
    assert res.ack_latency_us["count"] == 600 and res.delivery_latency_us["count"] == 600
    assert 0 < res.ack_latency_us["p50"] <= res.ack_latency_us["p99"]
    assert res.logged_in == 6
    assert res.limit  # it says what limited the run
    assert res.generator_cpu_us_per_msg is not None and res.generator_cpu_us_per_msg >= 0
    assert ("C, one thread" in format_result(res)) == (generator == "c")


def test_c_generator_runs_a_timed_window_against_a_live_broker() -> None:
    need_c()
    res = run_bench(BenchConfig(conns=2, duration=1.0, warmup=0.2, window=16, online=True, generator="c",
                                durability="os", progress=False, pin=False))
    assert res.errors == {}
    assert res.seconds == 1.0 and res.acked > 0
    assert res.ack_latency_us["count"] == res.acked
    assert res.deliveries == res.acked  # the window's sends, all delivered after the drain
    assert res.broker_cpu_us_per_msg is not None and res.broker_cpu_util is not None
    assert res.broker_cpu_wait is not None and 0 <= res.broker_cpu_wait < 1.5
    # The broker's exit line was read: its group commit is reported.
    assert res.broker_batches and res.broker_messages_stored and res.broker_messages_stored >= res.acked


def test_without_the_c_source_it_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen, "_C_SOURCE", "/nonexistent/loadgen.c")
    res = run_bench(BenchConfig(conns=1, count=20, **SMALL))
    assert res.generator == "python" and res.acked == 20
    assert "no C generator source" in res.generator_note and "trio generator" in res.generator_note
    assert "note: no C generator source" in format_result(res)
    with pytest.raises(BenchError, match="no C generator source"):
        run_bench(BenchConfig(conns=1, count=20, generator="c", **SMALL))


def test_a_broken_compiler_falls_back_too(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # not the cached build
    exe, why = c_generator()
    assert exe is None and "did not build with /bin/false" in why


def test_idle_only_runs_are_held_by_the_trio_generator() -> None:
    res = run_bench(BenchConfig(conns=0, idle=5, hold=0.3, **SMALL))
    assert res.generator == "python" and res.generator_note == ""  # it holds them for `hold` seconds
    assert res.errors == {} and res.logged_in == 5


def test_c_generator_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="--generator python"):
        BenchConfig(generator="c", procs=2)
    with pytest.raises(ValueError, match="generator must be"):
        BenchConfig(generator="rust")


# ---------------------------------------------------------------- against Redis


def test_resp_driver_xadds_every_message_to_redis() -> None:
    need_redis()
    exe = need_c()
    cfg = BenchConfig(conns=2, count=300, online=False, **SMALL)
    with RedisProcess(pin=False) as redis:
        assert resp_command("127.0.0.1", redis.port, b"PING") == b"PONG"
        assert b"aof_enabled:1" in resp_command("127.0.0.1", redis.port, b"INFO", b"persistence")
        seen = []
        r = loadgen._run_c(cfg, exe, "resp", "127.0.0.1", redis.port, ["1 0 100 bench:a -", "1 0 200 bench:b -"], 0,
                           lambda: seen.append("ready"), lambda: seen.append("done"))
        assert seen == ["ready", "done"]
        assert r["errors"] == {} and r["acked"] == 300 and r["sent"] == 300
        assert len(r["ack_lat"]) == 300 * 8
        # Every reply was for a stored entry: the streams hold them all, 100-byte payloads.
        assert resp_command("127.0.0.1", redis.port, b"XLEN", b"bench:a") == b"100"
        assert resp_command("127.0.0.1", redis.port, b"XLEN", b"bench:b") == b"200"
        with pytest.raises(BenchError, match="WRONGTYPE|wrong kind"):
            resp_command("127.0.0.1", redis.port, b"LPUSH", b"bench:a", b"x")


def test_each_redis_reply_is_timed_from_its_own_command() -> None:
    # Redis answers in order, so the C generator times each reply from the
    # oldest command in flight.  It used to look that command up by a reply
    # counter starting at 1 while commands were filed under their local id
    # (from the time): unless the two agreed modulo the slots (1 run in
    # 4 * window), each reply was timed from a command sent several round
    # trips earlier -- or, for the first, from no command at all (time 0).
    need_redis()
    exe = need_c()
    cfg = BenchConfig(conns=2, count=2_000, online=False, **{**SMALL, "window": 64})
    with RedisProcess(pin=False) as redis:
        t0 = time.monotonic()
        r = loadgen._run_c(cfg, exe, "resp", "127.0.0.1", redis.port, ["1 0 1000 bench:a -", "1 0 1000 bench:b -"],
                           0, lambda: None, lambda: None)
        wall_ns = (time.monotonic() - t0) * 1e9
    assert r["errors"] == {} and r["acked"] == 2_000
    lat = array("q", r["ack_lat"])
    assert len(lat) == 2_000
    # No reply can take longer than the whole run (a correctness bound, not a timing target).
    assert 0 < min(lat) and max(lat) < wall_ns


def test_redis_error_replies_are_counted_not_acked() -> None:
    need_redis()
    exe = need_c()
    cfg = BenchConfig(conns=1, count=50, online=False, **SMALL)
    with RedisProcess(pin=False) as redis:
        resp_command("127.0.0.1", redis.port, b"SET", b"bench:str", b"not a stream")
        r = loadgen._run_c(cfg, exe, "resp", "127.0.0.1", redis.port, ["1 0 50 bench:str -"], 0,
                           lambda: None, lambda: None)
    assert r["acked"] == 0 and r["errors"] == {"error reply": 50}


def test_run_redis_reports_the_server_side() -> None:
    need_redis()
    need_c()
    res = run_redis(BenchConfig(conns=2, count=400, online=False, **SMALL))
    assert res.peer == "redis" and res.generator == "c"
    assert res.errors == {} and res.acked == 400
    assert res.broker["backend"].startswith("redis ")
    # Read from /proc/<redis pid> in clock ticks: so short a run may use too
    # few for a figure, and then says so (broker_cpu_reason).
    assert (res.broker_cpu_us_per_msg is None) == (res.broker_cpu_reason is not None) and res.broker_peak_rss
    assert res.limit


def test_trio_resp_driver_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    need_redis()
    monkeypatch.setattr(loadgen, "_C_SOURCE", "/nonexistent/loadgen.c")
    res = run_redis(BenchConfig(conns=2, count=300, online=False, **SMALL))
    assert res.generator == "python" and "trio RESP driver" in res.generator_note
    assert res.errors == {} and res.acked == 300 and res.ack_latency_us["count"] == 300
    timed = run_redis(BenchConfig(conns=2, duration=0.3, warmup=0.1, online=False, generator="python", **SMALL))
    assert timed.errors == {} and timed.acked > 0 and timed.ack_latency_us["count"] == timed.acked
    with pytest.raises(BenchError, match="no C generator source"):
        run_redis(BenchConfig(conns=1, count=10, online=False, generator="c", **SMALL))


def test_compare_report_alternates_and_takes_medians() -> None:
    need_redis()
    need_c()
    cfg = BenchConfig(conns=2, duration=0.4, warmup=0.1, online=False, **SMALL)
    order = []
    rep = run_compare(cfg, "redis", rounds=2, on_round=lambda i, name, res: order.append((i, name)))
    assert order == [(0, "pimcore"), (0, "redis"), (1, "pimcore"), (1, "redis")]  # alternating
    assert len(rep["rounds"]) == 2
    for name in ("pimcore", "redis"):
        rows = [r[name] for r in rep["rounds"]]
        assert all(r["errors"] == 0 and r["acked_per_s"] > 0 and r["limit"] for r in rows)
        assert rep["median"][name]["acked_per_s"] == statistics.median(r["acked_per_s"] for r in rows)
        assert rep["median"][name]["p50_us"] == statistics.median(r["p50_us"] for r in rows)
    assert rep["ratio"]["acked_per_s"] == pytest.approx(
        rep["median"]["pimcore"]["acked_per_s"] / rep["median"]["redis"]["acked_per_s"])
    assert rep["shape"]["conns"] == 2 and rep["shape"]["window"] == 4
    json.dumps(rep)  # --json prints it
    table = format_compare(rep)
    assert table.count("median") == 2 and "pimcore / redis: acked sends/s" in table


def test_a_round_with_errors_is_marked_and_left_out_of_the_medians() -> None:
    # A new user's trial: the broker killed in round 1 gave 1,333/s there,
    # and that round went into the medians and the ratio (0.13x), unmarked.
    from pimcore.loadgen import _compare_medians

    def side(acked: float, p50: Optional[float], errors: int) -> dict:
        return {"acked_per_s": acked, "p50_us": p50, "p99_us": p50, "server_cpu_us_per_msg": 5.0, "server_cpu_util": 0.5,
                "server_cpu_wait": 0.0, "generator_cpu": 0.1, "errors": errors, "limit": "x"}

    rounds = [{"pimcore": side(1_333, 900, 100), "redis": side(250_000, 2_700, 0)},
              {"pimcore": side(120_000, 5_500, 0), "redis": side(260_000, 2_600, 0)},
              {"pimcore": side(130_000, 5_400, 0), "redis": side(0, None, 50)},
              {"pimcore": side(128_000, 5_600, 0), "redis": side(280_000, 2_500, 0)}]
    median, counted = _compare_medians(rounds, "redis")
    assert counted == [2, 4]
    assert median["pimcore"]["acked_per_s"] == 124_000 and median["redis"]["p50_us"] == 2_550
    rep = {"peer": "redis", "shape": {"conns": 50, "window": 16, "size": 100, "durability": "log", "duration": 4},
           "rounds": rounds, "median": median, "counted": counted, "notes": [],
           "ratio": {"acked_per_s": 124_000 / 270_000, "p50": 5_550 / 2_550, "server_cpu_us_per_msg": 1.0}}
    table = format_compare(rep)
    assert [ln.split()[0] for ln in table.splitlines() if ln[:1].isdigit()] == ["1*", "1*", "2", "2", "3*", "3*", "4", "4"]
    assert "* a round with errors: not in the medians (2 of 4 rounds are)" in table
    # Every round with errors: all of them, and the table says so.
    median, counted = _compare_medians(rounds[:1], "redis")
    assert counted == [1]
    table = format_compare({**rep, "rounds": rounds[:1], "median": median, "counted": counted})
    assert "every round had errors: the medians take them all" in table


def test_compare_rounds_too_short_for_a_cpu_figure_say_so() -> None:
    """A round whose server used fewer clock ticks than a CPU figure needs
    has server_cpu_us_per_msg None and server_cpu_reason (--json); the
    medians skip both (a word is no figure), the table shows '-' and why."""
    from pimcore.loadgen import _compare_medians

    why = "run too short: the kernel counts CPU in 10 ms ticks and the server used 2 of them (fewer than 5: no figure)"

    def side(cpu: Optional[float]) -> dict:
        return {"acked_per_s": 1000.0, "p50_us": 500.0, "p99_us": 600.0, "server_cpu_us_per_msg": cpu,
                "server_cpu_util": None if cpu is None else 0.5, "server_cpu_wait": 0.0,
                "server_cpu_reason": None if cpu is not None else why, "generator_cpu": 0.1, "errors": 0, "limit": "x"}

    rounds = [{"pimcore": side(None), "redis": side(None)}, {"pimcore": side(20.0), "redis": side(None)}]
    median, counted = _compare_medians(rounds, "redis")
    assert median["pimcore"]["server_cpu_us_per_msg"] == 20.0 and median["redis"]["server_cpu_us_per_msg"] is None
    assert "server_cpu_reason" not in median["pimcore"]
    rep = {"peer": "redis", "shape": {"conns": 1, "window": 1, "size": 100, "durability": "os", "duration": 0.1},
           "rounds": rounds, "median": median, "counted": counted, "notes": [],
           "ratio": {"acked_per_s": 1.0, "p50": 1.0, "server_cpu_us_per_msg": None}}
    table = format_compare(rep)
    assert "note: CPU µs/msg '-': run too short: the kernel counts CPU in 10 ms ticks" in table, table


def test_compare_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    cfg = BenchConfig(conns=1, count=10, online=False, **SMALL)
    with pytest.raises(BenchError, match="apt-get install redis-server"):
        run_compare(cfg, "redis")
    with pytest.raises(BenchError, match="apt-get install redis-server"):
        RedisProcess()
    monkeypatch.setattr(loadgen, "_mosquitto_exe", lambda: None)  # (it is looked for in /usr/sbin too)
    with pytest.raises(BenchError, match="apt-get install mosquitto"):
        run_compare(cfg, "mosquitto")


def test_cli_compare_and_shapes() -> None:
    r = run_pimcore("bench", "--shape", "1x1", "--compare", "mosquitto", "--generator", "python", timeout=60)
    assert r.returncode == 2 and "mosquitto" in r.stderr
    r = run_pimcore("bench", "--shape", "1x64", "-d", "0.3", "--warmup", "0.1", "--durability", "os", "--no-pin",
                    "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["config"]["conns"], doc["config"]["window"], doc["config"]["online"]) == (1, 64, False)
    assert doc["limit"] and doc["acked"] > 0
    if shutil.which("redis-server") and c_generator()[0]:
        r = run_pimcore("bench", "--shape", "50x16", "-d", "0.3", "--warmup", "0.1", "--durability", "os", "--no-pin",
                        "--compare", "redis", "--rounds", "1", timeout=120)
        assert r.returncode == 0, r.stderr
        assert "50 conns x 16 in flight" in r.stdout and "pimcore / redis" in r.stdout


# ---------------------------------------------------------------- what limited the run


def _result(**kw: object) -> BenchResult:
    base = dict(config={"durability": "sync", "warmup": 1.0}, broker={}, seconds=4.0, acked=1, acked_per_s=1.0,
                deliveries=0, deliveries_per_s=0.0, stored_entries_per_s=1.0, ack_latency_us={}, delivery_latency_us={},
                errors={}, generator_cpu=0.1, generator_saturated=False, broker_cpu_util=0.3)
    base.update(kw)
    return BenchResult(**base)  # type: ignore[arg-type]


def test_diagnosis_names_the_limit() -> None:
    d = loadgen._diagnose
    assert d(_result(generator_cpu=0.97, generator_saturated=True, broker_cpu_util=0.99)).startswith("generator CPU")
    assert d(_result(broker_cpu_util=0.95)).startswith("broker CPU (95% of one core)")
    fsync = d(_result(broker_commit_seconds=4.0, broker_batches=100, broker_messages_stored=30_000))
    assert fsync.startswith("fsync wait") and "300 messages per commit" in fsync and "off CPU 70%" in fsync
    # One message per commit, the broker on CPU for most of each round trip
    # (1 x 1 with durability log): its CPU between the flushes is the limit,
    # not the fsync -- 5 s over 10,000 commits is 500 µs a commit, 65 % of
    # it on CPU.
    serial = d(_result(config={"durability": "log", "warmup": 1.0}, broker_cpu_util=0.65, broker_commit_seconds=3.4,
                       broker_batches=10_000, broker_messages_stored=10_000))
    assert serial.startswith("broker CPU between flushes: commits (the log's fdatasync included) 68% of the time,"), serial
    assert "per commit the broker ran 325 µs and was off CPU 175 µs" in serial, serial
    assert "per commit the broker ran 150 µs and was off CPU 350 µs" in d(
        _result(broker_commit_seconds=4.0, broker_batches=10_000, broker_messages_stored=10_000))
    idle = d(_result(broker_commit_seconds=0.5, broker_batches=100, broker_messages_stored=100))
    assert idle.startswith("round trips")
    os_commit = d(_result(config={"durability": "os", "warmup": 1.0}, broker_commit_seconds=3.0, broker_batches=10,
                          broker_messages_stored=10))
    assert os_commit.startswith("commit wait (durability os")
    assert d(_result(broker_cpu_util=None)).startswith("unknown")
    assert d(_result(peer="redis", broker_cpu_util=0.95)).startswith("Redis CPU")
    shared = d(_result(broker_cpu_util=0.4, broker_cpu_wait=0.5, broker_commit_seconds=4.0, broker_batches=1,
                       broker_messages_stored=1))
    assert shared.startswith("broker CPU on a shared core: it ran 40% and waited for its CPU 50%")
    busy_machine = d(_result(broker_cpu_util=0.3, broker_cpu_wait=0.3, broker_commit_seconds=4.0, broker_batches=1,
                             broker_messages_stored=1))
    assert busy_machine.startswith("CPU contention: the broker waited for its CPU 30% of the time")
    # Sends refused (here: payloads above the broker's limit) are the story, whatever else was busy.
    refused = d(_result(broker_cpu_util=0.95, acked=0, errors={"PAYLOAD_TOO_LARGE": 1200}))
    assert refused.startswith("refusals: the broker answered 1,200 sends with an error (PAYLOAD_TOO_LARGE x1,200)")
    assert d(_result(broker_cpu_util=0.95, acked=5000, errors={"RATE_LIMITED": 3})).startswith("broker CPU")


# ---------------------------------------------------------------- against Mosquitto


def test_compare_mosquitto_counts_senders_only_and_end_to_end() -> None:
    need_mosquitto()
    need_c()
    for shape in (dict(conns=2, window=4, online=False, idle=2), dict(conns=1, window=64, online=True)):
        cfg = BenchConfig(duration=0.4, warmup=0.1, **{**SMALL, **shape})
        runs: list[tuple[int, str, BenchResult]] = []
        rep = run_compare(cfg, "mosquitto", rounds=1,
                          on_round=lambda i, name, res, runs=runs: runs.append((i, name, res)))
        assert [(i, name) for i, name, _ in runs] == [(0, "pimcore"), (0, "mosquitto")]
        mq = runs[1][2]
        assert mq.peer == "mosquitto" and mq.broker["backend"].startswith("mosquitto 2.")
        for _, name, res in runs:
            assert res.errors == {} and res.acked > 0, (name, res.errors)
            assert res.ack_latency_us["count"] == res.acked
            if cfg.online:  # every acked send delivered to the acking recipient, once
                assert res.deliveries == res.acked and res.delivery_latency_us["count"] == res.acked, name
            else:
                assert res.deliveries == 0, name
        assert (mq.broker_cpu_us_per_msg is None) == (mq.broker_cpu_reason is not None)  # a figure, or why not
        assert mq.broker_peak_rss and mq.limit
        assert mq.broker["connections"] == cfg.conns * (2 if cfg.online else 1)
        assert rep["peer"] == "mosquitto" and rep["rounds"][0]["mosquitto"]["errors"] == 0
        assert ("deliveries_per_s" in rep["ratio"]) == cfg.online
        assert any("held against pimcore only" in n for n in rep["notes"]) == bool(cfg.idle)
        table = format_compare(rep)
        assert "pimcore / mosquitto: acked sends/s" in table and "persistence false" in table
        if cfg.online:
            med = rep["median"]
            assert rep["ratio"]["deliveries_per_s"] == pytest.approx(
                med["pimcore"]["deliveries_per_s"] / med["mosquitto"]["deliveries_per_s"])
            assert "pimcore / mosquitto: deliveries/s" in table and "deliv/s" in table
        json.dumps(rep)


def test_run_mosquitto_count_mode_delivers_every_message_once() -> None:
    need_mosquitto()
    need_c()
    res = run_mosquitto(BenchConfig(conns=3, count=900, online=True, **{**SMALL, "window": 16}))
    assert res.errors == {} and res.acked == 900 and res.deliveries == 900
    assert res.logged_in == 6 and res.delivery_latency_us["count"] == 900
    with MosquittoProcess(pin=False) as mq:
        mqtt_connect("127.0.0.1", mq.port)
        assert "max_inflight_messages 0" in mq.config() and "persistence false" in mq.config()
    with pytest.raises(BenchError, match="C generator only"):
        run_mosquitto(BenchConfig(conns=1, count=10, generator="python", **SMALL))


def test_compare_mosquitto_without_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(BenchError, match="apt-get install mosquitto"):
        MosquittoProcess()
    with pytest.raises(BenchError, match="apt-get install mosquitto"):
        run_compare(BenchConfig(conns=1, count=10, **SMALL), "mosquitto")


def test_compare_mosquitto_finds_it_in_sbin_and_refuses_a_window_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    # Debian installs mosquitto in /usr/sbin, which an ordinary user's PATH lacks.
    monkeypatch.setattr(shutil, "which", lambda name, mode=None, path=None: (
        "/usr/sbin/" + name if path and "/usr/sbin" in path.split(":") and name == "mosquitto" else None))
    assert loadgen._mosquitto_exe() == "/usr/sbin/mosquitto"
    monkeypatch.undo()
    need_mosquitto()
    need_c()
    runs: list = []
    with pytest.raises(BenchError, match="--window must be <= 16384"):
        run_compare(BenchConfig(conns=1, count=10, **{**SMALL, "window": 20000}), "mosquitto",
                    on_round=lambda *a: runs.append(a))
    assert runs == []  # refused before any round ran


class FakeMqtt:
    """A minimal MQTT 3.1.1 broker for the C generator's MQTT mode: CONNECT,
    SUBSCRIBE, PUBLISH QoS 1 forwarded to the topic's subscribers (own packet
    ids), PUBACKs recorded.  Everything it writes is cut into chunks of 1, 2,
    3, 5 and 7 bytes with a pause between them, so the generator reads
    packets, fixed headers and remaining lengths split across reads.
    ``connack`` is the raw reply to CONNECT; ``puback_offset`` shifts the
    packet id of every PUBACK it sends (nonzero: an id not in flight)."""

    def __init__(self, connack: bytes = b"\x20\x02\x00\x00", puback_offset: int = 0) -> None:
        self.connack, self.puback_offset = connack, puback_offset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.subs: dict[bytes, list[FakeMqtt.Conn]] = {}
        self.forwarded: set[int] = set()  # packet ids of PUBLISHes sent to subscribers
        self.pubacked: set[int] = set()  # ... and the PUBACKs the subscribers sent back
        self.lock = threading.Lock()
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    class Conn:
        def __init__(self, sock: socket.socket) -> None:
            self.sock, self.out, self.cv, self.closed = sock, bytearray(), threading.Condition(), False

        def write(self, data: bytes) -> None:
            with self.cv:
                self.out += data
                self.cv.notify()

        def writer(self) -> None:
            sizes, k = (1, 2, 3, 5, 7), 0
            while True:
                with self.cv:
                    while not self.out and not self.closed:
                        self.cv.wait(0.1)
                    if not self.out:
                        return
                    n = sizes[k % len(sizes)]
                    chunk, self.out[:n] = bytes(self.out[:n]), b""
                k += 1
                try:
                    self.sock.sendall(chunk)
                except OSError:
                    return
                time.sleep(0.0002)

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = FakeMqtt.Conn(sock)
            threading.Thread(target=conn.writer, daemon=True).start()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: "FakeMqtt.Conn") -> None:
        buf = b""
        next_pid = 0
        try:
            while True:
                try:
                    chunk = conn.sock.recv(65536)
                except ConnectionResetError:
                    # The generator refused this broker and hung up with
                    # bytes unread: a reset, the end of this connection (it
                    # surfaced as an unhandled thread exception in CI).
                    return
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 2:
                    n, shift, i = 0, 0, 1
                    while i < len(buf):
                        n |= (buf[i] & 0x7F) << shift
                        shift += 7
                        i += 1
                        if not buf[i - 1] & 0x80:
                            break
                    else:
                        break
                    if len(buf) < i + n:
                        break
                    head, body, buf = buf[0], buf[i:i + n], buf[i + n:]
                    if head == 0x10:
                        conn.write(self.connack)
                    elif head == 0x82:  # SUBSCRIBE: pid, topic, qos
                        tl = int.from_bytes(body[2:4], "big")
                        with self.lock:
                            self.subs.setdefault(body[4:4 + tl], []).append(conn)
                        conn.write(b"\x90\x03" + body[:2] + b"\x01")
                    elif head == 0x32:  # PUBLISH QoS 1: topic, pid, payload
                        tl = int.from_bytes(body[:2], "big")
                        topic, pid, payload = body[2:2 + tl], int.from_bytes(body[2 + tl:4 + tl], "big"), body[4 + tl:]
                        for sub in self.subs.get(topic, []):
                            next_pid = next_pid % 65535 + 1
                            with self.lock:
                                self.forwarded.add(next_pid)
                            rest = len(topic).to_bytes(2, "big") + topic + next_pid.to_bytes(2, "big") + payload
                            assert 127 < len(rest) < 16384  # a two-byte remaining length
                            sub.write(bytes([0x32, len(rest) & 0x7F | 0x80, len(rest) >> 7]) + rest)
                        conn.write(b"\x40\x02" + ((pid + self.puback_offset) % 65536).to_bytes(2, "big"))
                    elif head == 0x40:
                        with self.lock:
                            self.pubacked.add(int.from_bytes(body, "big"))
                    elif head == 0xE0:
                        return
        finally:
            with conn.cv:
                conn.closed = True
                conn.cv.notify()

    def close(self) -> None:
        self.stop = True
        self.listener.close()


def _mqtt_run(fake: FakeMqtt, plan: list[str], count: int, del_per_ack: int) -> dict:
    exe = need_c()
    cfg = BenchConfig(conns=1, count=count, window=8, size=200, online=False, durability="os", progress=False,
                      pin=False, drain=10.0)
    try:
        return loadgen._run_c(cfg, exe, "mqtt", "127.0.0.1", fake.port, plan, del_per_ack, lambda: None,
                              lambda: None)
    finally:
        fake.close()


def test_mqtt_mode_reads_packets_split_anywhere() -> None:
    fake = FakeMqtt()
    r = _mqtt_run(fake, ["0 1 0 bench/x -", "1 0 60 bench/x -"], 60, 1)
    assert r["errors"] == {} and r["logged_in"] == 2
    assert (r["acked"], r["sent"], r["deliveries"]) == (60, 60, 60)
    assert len(r["ack_lat"]) == len(r["del_lat"]) == 60 * 8
    deadline = time.monotonic() + 5  # the recipient's PUBACKs: one per forwarded packet id
    while fake.pubacked != fake.forwarded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fake.forwarded) == 60 and fake.pubacked == fake.forwarded


@pytest.mark.parametrize("fake, message", [
    (dict(puback_offset=1000), r"exit 2\).*PUBACK for packet id \d+, which is not in flight"),
    (dict(connack=b"\x20\x02\x00\x05"), r"exit 2\).*connect refused \(CONNACK return code 5\)"),
    (dict(connack=b"\x20\x80\x80\x80\x80\x01"), r"exit 2\).*malformed remaining length"),
    (dict(connack=b"\x20\x03\x00\x00\x00"), r"exit 2\).*malformed CONNACK"),
    (dict(connack=b"\x32\x02\x00\x05"), r"exit 2\).*malformed PUBLISH"),
])  # fmt: skip
def test_mqtt_mode_refuses_a_confused_broker(fake: dict, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        _mqtt_run(FakeMqtt(**fake), ["1 0 20 bench/x -"], 20, 0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning needs sched_setaffinity and at least 2 CPUs")
def test_every_run_of_a_compare_is_pinned_as_the_first() -> None:
    # Each run pins its server to CPU 0 and the generator (this process) to
    # the others for the run only: a run that left this process narrowed
    # made every later server of a --compare inherit the generator's CPU.
    need_c()
    need_redis()
    cpus = os.sched_getaffinity(0)
    servers: list[set[int]] = []
    real = loadgen._proc_cpu_seconds

    def seen(pid: int) -> float:
        servers.append(os.sched_getaffinity(pid))
        return real(pid)

    cfg = BenchConfig(conns=1, count=50, online=False, **{**SMALL, "pin": True})
    mp = pytest.MonkeyPatch()
    mp.setattr(loadgen, "_proc_cpu_seconds", seen)
    try:
        for run in (run_bench, run_redis, run_bench, run_redis):
            servers.clear()
            run(cfg)
            assert os.sched_getaffinity(0) == cpus, run.__name__
            assert servers and all(s == {0} for s in servers), (run.__name__, servers)
        if loadgen._mosquitto_exe() is not None:
            servers.clear()
            run_mosquitto(cfg)
            assert os.sched_getaffinity(0) == cpus
            assert servers and all(s == {0} for s in servers), servers
    finally:
        mp.undo()
        os.sched_setaffinity(0, cpus)


def test_compare_redis_reads_as_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new user's trial of --compare redis: the ratio line said "server
    CPU per message -x" when a side had no CPU figure, the limit column
    "the redis waited for its CPU", the text's "run too short" note was
    missing from --json's ``notes`` (an empty list), and --durability os
    against Redis's appendfsync always carried no word that pimcore did not
    fsync (the mosquitto comparison says its peer never does)."""
    why = "run too short: the kernel counts CPU in 10 ms ticks and the server used 2 of them (fewer than 5: no figure)"

    def fake(peer: str) -> object:
        def run(cfg: BenchConfig) -> BenchResult:
            return _result(peer=peer, config={"durability": cfg.durability, "warmup": 0.0},
                           ack_latency_us={"p50": 500.0, "p99": 600.0}, broker_cpu_util=None,
                           broker_cpu_us_per_msg=None, broker_cpu_reason=why)
        return run

    monkeypatch.setattr(loadgen, "run_bench", fake("pimcore"))
    monkeypatch.setattr(loadgen, "run_redis", fake("redis"))
    monkeypatch.setattr(loadgen.shutil, "which", lambda name, *a, **k: f"/usr/bin/{name}")
    cfg = BenchConfig(conns=1, count=10, online=False, **{**SMALL, "window": 1})  # (SMALL: durability os)
    rep = run_compare(cfg, "redis", rounds=1)
    table = format_compare(rep)
    assert "-x" not in table and "server CPU per message n/a" in table, table
    assert any(n.startswith("CPU µs/msg '-': run too short") for n in rep["notes"]), rep["notes"]
    fsync = [n for n in rep["notes"] if "did not fsync" in n]
    assert fsync and "appendfsync always" in fsync[0], rep["notes"]
    assert table.count("run too short") == 1, table  # (said once, as a note)
    assert json.loads(json.dumps(rep))["notes"] == rep["notes"]
    assert not [n for n in run_compare(replace(cfg, durability="sync"), "redis", rounds=1)["notes"]
                if "did not fsync" in n]
    contention = loadgen._diagnose(_result(peer="redis", broker_cpu_util=0.3, broker_cpu_wait=0.3))
    assert contention.startswith("CPU contention: Redis waited for its CPU 30% of the time"), contention
    assert "the redis" not in contention
