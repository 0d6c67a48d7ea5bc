"""The instruments of the throughput issue: the one-thread C load generator
(bench/loadgen.c) against a live broker and against redis-server, the
side-by-side report of ``pimcore bench --compare redis``, and what the
report says limited a run.

No figure is judged here -- only that the instruments count right and say
what they did.  Tests that need ``cc`` or ``redis-server`` skip with the
reason when they are missing.
"""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from pimcore import loadgen
from pimcore.loadgen import (BenchConfig, BenchError, BenchResult, RedisProcess, c_generator, format_compare,
                             format_result, resp_command, run_bench, run_compare, run_redis)

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
    # Read from /proc/<redis pid> (clock ticks: 0 for so short a run is possible).
    assert res.broker_cpu_us_per_msg is not None and res.broker_peak_rss
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


def test_compare_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    cfg = BenchConfig(conns=1, count=10, online=False, **SMALL)
    with pytest.raises(BenchError, match="apt-get install redis-server"):
        run_compare(cfg, "redis")
    with pytest.raises(BenchError, match="apt-get install redis-server"):
        RedisProcess()
    with pytest.raises(BenchError, match="apt-get install mosquitto"):
        run_compare(cfg, "mosquitto")


def test_cli_compare_and_shapes() -> None:
    r = run_pimcore("bench", "--shape", "1x1", "--compare", "mosquitto", timeout=60)
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
    idle = d(_result(broker_commit_seconds=0.5, broker_batches=100, broker_messages_stored=100))
    assert idle.startswith("round trips")
    os_commit = d(_result(config={"durability": "os", "warmup": 1.0}, broker_commit_seconds=3.0, broker_batches=10,
                          broker_messages_stored=10))
    assert os_commit.startswith("commit wait (durability os")
    assert d(_result(broker_cpu_util=None)).startswith("unknown")
    assert d(_result(peer="redis", broker_cpu_util=0.95)).startswith("redis CPU")
    shared = d(_result(broker_cpu_util=0.4, broker_cpu_wait=0.5, broker_commit_seconds=4.0, broker_batches=1,
                       broker_messages_stored=1))
    assert shared.startswith("broker CPU on a shared core: it ran 40% and waited for its CPU 50%")
    busy_machine = d(_result(broker_cpu_util=0.3, broker_cpu_wait=0.3, broker_commit_seconds=4.0, broker_batches=1,
                             broker_messages_stored=1))
    assert busy_machine.startswith("CPU contention: the broker waited for its CPU 30% of the time")
