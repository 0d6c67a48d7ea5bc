"""``pimcore bench``, the load generator: its counts are the broker's real
answers (every acked send is a SendAck OK from a broker process, every
delivery a Push that carried the message), in every mode it offers.

No figure is judged here -- only that the instrument counts right.
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path
from typing import Optional

import pytest

from pimcore.loadgen import BenchConfig, BenchError, BrokerProcess, format_result, run_bench

from _proc import free_port, run_pimcore

# Small runs on "os" durability: these tests check counting, not speed.
SMALL = dict(window=4, durability="os", progress=False, pin=False, drain=20.0)


def check_latency(h: dict[str, float], count: int) -> None:
    assert h["count"] == count
    assert 0 < h["p50"] <= h["p90"] <= h["p99"] <= h["p99.9"] <= h["max"]


def test_direct_with_online_recipients_counts_every_ack_and_delivery() -> None:
    res = run_bench(BenchConfig(conns=3, count=300, **SMALL))
    assert res.errors == {}
    assert res.acked == 300
    assert res.deliveries == 300  # each message pushed to its online recipient once
    check_latency(res.ack_latency_us, 300)
    check_latency(res.delivery_latency_us, 300)
    assert res.acked_per_s == pytest.approx(300 / res.seconds)
    assert res.stored_entries_per_s == pytest.approx(2 * res.acked_per_s)  # both inboxes of a 1:1 chat
    assert res.broker["connections"] == 6 and res.logged_in == 6
    # Read from /proc/<broker pid> in clock ticks (10 ms): a fast machine runs
    # these 300 messages in too few of them for a figure, and then says so.
    if res.broker_cpu_us_per_msg is None:
        assert res.broker_cpu_reason is not None and res.broker_cpu_reason.startswith("run too short")
    else:
        assert res.broker_cpu_us_per_msg > 0 and res.broker_cpu_reason is None
    assert res.broker_peak_rss is not None and res.broker_peak_rss > 1 << 20
    assert sum(n for _, n in res.ack_histogram) == 300
    table = format_result(res)
    assert "acked sends" in table and "send -> SendAck" in table and "send -> delivery" in table


def test_offline_recipients_get_nothing_pushed() -> None:
    res = run_bench(BenchConfig(conns=2, count=100, online=False, **SMALL))
    assert res.errors == {}
    assert (res.acked, res.deliveries) == (100, 0)
    assert res.broker["connections"] == 2
    assert res.delivery_latency_us == {"count": 0}


def test_group_mode_fans_out_to_every_member() -> None:
    res = run_bench(BenchConfig(conns=3, count=90, mode="group", group_size=25, **SMALL))
    assert res.errors == {}
    assert res.acked == 90
    # The three senders are the online members: each gets the other two's messages.
    assert res.deliveries == 90 * 2
    assert res.stored_entries_per_s == pytest.approx(25 * res.acked_per_s)
    check_latency(res.delivery_latency_us, 180)


def test_duration_mode_measures_only_the_window_after_warmup() -> None:
    res = run_bench(BenchConfig(conns=2, duration=0.6, warmup=0.3, **SMALL))
    assert res.errors == {}
    assert res.seconds == 0.6
    assert res.acked > 0
    assert res.ack_latency_us["count"] == res.acked
    assert res.deliveries == res.acked  # sends of the window, all delivered after the drain


def test_idle_connections_over_several_processes() -> None:
    res = run_bench(BenchConfig(conns=0, idle=60, procs=2, hold=0.2, **SMALL))
    assert res.errors == {}
    assert res.logged_in == 60 and res.broker["connections"] == 60
    assert res.broker_bytes_per_connection is not None
    assert "60 authenticated idle connections" in format_result(res)


def test_load_spread_over_processes_keeps_pairs_together() -> None:
    res = run_bench(BenchConfig(conns=4, count=200, procs=2, **SMALL))
    assert res.errors == {}
    assert (res.acked, res.deliveries) == (200, 200)


def test_external_broker_with_a_wrong_secret_is_a_clear_error() -> None:
    with BrokerProcess(BenchConfig(conns=1, **SMALL)) as broker:
        cfg = BenchConfig(url=broker.url, secret="not-the-secret-" * 3, conns=1, count=5, **SMALL)
        with pytest.raises(BenchError, match="login refused"):
            run_bench(cfg)
        good = run_bench(BenchConfig(url=broker.url, secret=broker.secret, conns=1, count=5, **SMALL))
        assert good.acked == 5 and good.broker["pid"] is None


def test_unreachable_broker_is_a_clear_error() -> None:
    with BrokerProcess(BenchConfig(conns=1, **SMALL)) as broker:
        url = broker.url
    with pytest.raises(BenchError, match=f"cannot connect to {url}: connection refused"):
        run_bench(BenchConfig(url=url, secret="x" * 40, conns=1, count=1, **SMALL))


@pytest.mark.parametrize(
    "kwargs",
    [dict(size=7), dict(size=(16 << 20) + 1), dict(window=0), dict(conns=0), dict(mode="fanout"), dict(mode="group", group_size=2, conns=5),
     dict(url="tcp://127.0.0.1:1"), dict(count=0), dict(procs=0)],
)
def test_bad_configurations_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BenchConfig(**kwargs)


def test_cli_json_output() -> None:
    r = run_pimcore("bench", "-n", "40", "-c", "2", "-w", "2", "--durability", "os", "--json", "--no-pin", "--no-progress",
                    timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["acked"] == 40 and doc["deliveries"] == 40 and doc["errors"] == {}
    assert doc["ack_latency_us"]["count"] == 40


def test_cli_table_and_bad_flags() -> None:
    r = run_pimcore("bench", "-n", "20", "-c", "1", "--durability", "os", "--no-pin", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "acked sends" in r.stdout and "20" in r.stdout
    bad = run_pimcore("bench", "--size", "3")
    assert bad.returncode == 2 and "--size 3: must be >= 8" in bad.stderr


@pytest.mark.parametrize("flags, said", [
    (["--group", "0"], "--group 0: a group has at least 2 members"),
    (["--group", "1"], "--group 1: a group has at least 2 members"),
    (["--group", "-3"], "--group -3: a group has at least 2 members"),
    (["--group", "2", "-c", "5"], "--group 2: must be >= --conns (5): the senders are members"),
    (["-c", "-1"], "--conns -1: must be >= 0"),
    (["-c", "0"], "--conns 0: 0 needs --idle N"),
    (["--idle", "-1"], "--idle -1: must be >= 0"),
    (["-w", "0"], "--window 0: must be >= 1"),
    (["-s", "0"], "--size 0: must be >= 8 bytes"),
    (["-n", "0"], "--count 0: must be >= 1"),
    (["-d", "0"], "--duration 0: must be a number of seconds > 0"),
    (["-d", "nan"], "--duration nan: must be a number of seconds > 0"),
    (["-d", "inf"], "--duration inf: must be a number of seconds > 0"),
    (["--warmup", "nan"], "--warmup nan: must be a number of seconds >= 0"),
    (["--hold", "-1"], "--hold -1: must be a number of seconds >= 0"),
    (["--procs", "0"], "--procs 0: must be >= 1"),
    (["--rounds", "0", "--compare", "redis"], "--rounds 0: must be >= 1"),
    # A new user's trial: --rounds without --compare ran one run and said
    # nothing of the rounds asked for.
    (["--rounds", "5"], "--rounds 5: takes effect only with --compare"),
    (["--rounds", "3", "-n", "100"], "--rounds 3: takes effect only with --compare"),
    # A new user's trial: -n below the connections never ended (a connection
    # given none sent until a clock that count mode never stops), --group
    # 100000000 took 4.8 GB in 12 s, --procs 1000 -c 2 started 1,000.
    (["-n", "49"], "--count 49: must be >= --conns (50): each connection sends at least one"),
    (["--group", "100000000", "-c", "1"], "--group 100000000: must be at most 1,000,000 members"),
    (["--procs", "1000", "-c", "2"], "--procs 1000: must be at most the connections (2) and 64"),
    # A new user's trial: --shape silently overrode -c and -w given with it
    # (--shape 1x1 -c 8 ran one connection).
    (["--shape", "1x1", "-c", "8"], "--shape 1x1 is 1 connection(s) x 1 in flight: it conflicts with --conns 8"),
    (["--shape", "50x16", "-w", "4"], "--shape 50x16 is 50 connection(s) x 16 in flight: it conflicts with --window 4"),
    (["--shape", "1x64", "-c", "1", "--window", "32"],
     "--shape 1x64 is 1 connection(s) x 64 in flight: it conflicts with --window 32"),
    (["--shape", "e2e-1x64", "--offline"],
     "--shape e2e-1x64 has a recipient online acking every push: it conflicts with --offline"),
    # A new user's trial: --shape with --group was accepted and the group
    # run ignored the shape's layout (--compare refuses --group).
    (["--shape", "1x64", "--group", "100"],
     "--shape 1x64 is a shape of 1:1 chats: it conflicts with --group 100 (drop one of them"),
    (["--shape", "50x16", "--group", "1000", "-c", "50"],
     "--shape 50x16 is a shape of 1:1 chats: it conflicts with --group 1000 (drop one of them"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_meaningless_numeric_flags_are_refused_naming_the_flag(flags: list, said: str, capsys) -> None:
    """``--group 0`` ran a 1:1 benchmark silently (0 read as no --group);
    ``-d nan`` never ended, ``-d inf`` and ``--warmup nan`` measured
    nothing; the others were named by BenchConfig's fields.  Refused before
    a broker starts, naming the flag, exit 2.  (``-c 0 --idle N`` holds idle
    connections only: kept.)"""
    from pimcore.cli import main

    assert main(["bench", *flags, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"pimcore bench: {said}") and err.count("\n") == 1, err


def test_percentiles_match_the_samples() -> None:
    from pimcore.loadgen import _percentiles

    samples = array("q", (i * 1000 for i in range(1, 10_001)))  # 1..10,000 µs in ns
    p = _percentiles(samples)
    assert p["count"] == 10_000
    assert p["p50"] == pytest.approx(5000, rel=1e-3)
    assert p["p99"] == pytest.approx(9900, rel=1e-3)
    assert p["p99.9"] == pytest.approx(9990, rel=1e-3)
    assert p["max"] == pytest.approx(10_000, rel=1e-3)


def test_compressed_links_count_the_same() -> None:
    # zstd negotiated: the broker compresses what it sends, the generator decodes it.
    res = run_bench(BenchConfig(conns=2, count=200, size=300, zstd=True, **SMALL))
    assert res.errors == {}
    assert (res.acked, res.deliveries) == (200, 200)


def test_payloads_above_the_default_limit_are_measured_not_refused() -> None:
    # The broker bench starts takes the payload size it is asked to measure
    # (100 KB is above the default 64 KiB max_payload: every send was refused).
    res = run_bench(BenchConfig(conns=2, count=40, size=100_000, **SMALL))
    assert res.errors == {}
    assert (res.acked, res.deliveries) == (40, 40)


def test_plot_writes_a_file_or_says_what_is_missing(tmp_path) -> None:
    from pimcore.loadgen import plot_histograms

    res = run_bench(BenchConfig(conns=1, count=50, **SMALL))
    out = tmp_path / "lat.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(BenchError, match="needs matplotlib"):
            plot_histograms(res, str(out))
        r = run_pimcore("bench", "-n", "10", "-c", "1", "--durability", "os", "--no-pin", "--plot", str(out), timeout=120)
        assert r.returncode == 2 and "needs matplotlib" in r.stderr
    else:
        plot_histograms(res, str(out))
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = dict(SMALL, progress=True)
    res = run_bench(BenchConfig(conns=1, duration=0.6, warmup=0.2, **cfg))
    assert res.errors == {}
    err = capsys.readouterr().err
    assert "[" in err and "acked" in err and "/0.6 s" in err


def test_several_urls_run_the_trio_generator_and_the_c_one_says_it_drives_one_broker() -> None:
    # The same broker named twice stands for two nodes sharing one store.
    with BrokerProcess(BenchConfig(conns=1, **SMALL)) as broker:
        urls = f"{broker.url},{broker.url}"
        res = run_bench(BenchConfig(url=urls, secret=broker.secret, conns=2, count=40, **SMALL))
        assert res.errors == {} and (res.acked, res.deliveries) == (40, 40)
        with pytest.raises(BenchError, match="drives one broker"):
            run_bench(BenchConfig(url=urls, secret=broker.secret, conns=2, count=40, generator="c", **SMALL))


def test_a_second_run_against_the_same_broker_counts_its_own_sends() -> None:
    # The store remembers every (user, device, local id) it acked: a rerun
    # with the same users would be refused DUPLICATE_CONFLICT (or, with the
    # same payloads, answered with the first run's acks).
    with BrokerProcess(BenchConfig(conns=1, **SMALL)) as broker:
        for _ in range(2):
            res = run_bench(BenchConfig(url=broker.url, secret=broker.secret, conns=2, count=40, **SMALL))
            assert res.errors == {} and (res.acked, res.deliveries) == (40, 40)


@pytest.mark.parametrize("generator", ["python", "c"])
def test_a_second_group_run_against_the_same_broker_is_no_retry_of_the_first(tmp_path, generator) -> None:
    # The group's members and devices are the same each run: its local ids
    # come from the time (as the SDK's), or the second run's sends would be
    # taken for retries of the first's (DUPLICATE_CONFLICT).
    if generator == "c":
        from pimcore.loadgen import c_generator

        exe, why = c_generator()
        if exe is None:
            pytest.skip(f"no C generator: {why}")
    with BrokerProcess(BenchConfig(conns=1, **SMALL)) as broker:
        for _ in range(2):
            res = run_bench(BenchConfig(url=broker.url, secret=broker.secret, data_dir=broker.data_dir, conns=2,
                                        count=40, mode="group", group_size=4, generator=generator, **SMALL))
            assert res.errors == {} and res.acked == 40


@pytest.mark.redis
def test_group_mode_against_nodes_over_redis_creates_the_group_in_their_store(redis_cluster, tmp_path) -> None:
    """pimcore bench --group against nodes over Redis Cluster: --store
    creates the bench group where the nodes read it (without it, --data-dir
    made it in a stray LMDB store and every send was UNKNOWN_CONVERSATION)."""
    import os

    from _proc import ProcGroup

    ns = "t" + os.urandom(6).hex()
    procs = ProcGroup()
    try:
        env = {"PIMCORE_SECRET": "bench-secret-0123456789abcdef-0123456789", "PIMCORE_STORE_NAMESPACE": ns}
        nodes = [procs.serve("--listen", "tcp://127.0.0.1:0", "--data-dir", tmp_path / f"n{i}",
                             "--store", redis_cluster.url, env=env) for i in range(2)]
        urls = ",".join(n.url() for n in nodes)
        with pytest.raises(BenchError, match="--store"):
            run_bench(BenchConfig(url=urls, secret=env["PIMCORE_SECRET"], conns=2, count=20, mode="group",
                                  group_size=4, **SMALL))
        for _ in range(2):
            res = run_bench(BenchConfig(url=urls, secret=env["PIMCORE_SECRET"], store=redis_cluster.url, namespace=ns,
                                        conns=2, count=20, mode="group", group_size=4, **SMALL))
            assert (res.errors, res.acked, res.deliveries) == ({}, 20, 20)  # each to the other sender
    finally:
        procs.close()


def test_group_mode_against_a_log_broker_that_lacks_the_group_is_a_clear_error() -> None:
    # A log broker is the only writer of its store: bench cannot create the
    # group there itself (it died with a StoreError traceback), and says how.
    with BrokerProcess(BenchConfig(conns=1, **{**SMALL, "durability": "log"})) as broker:
        with pytest.raises(BenchError, match=r"POST /v1/groups"):
            run_bench(BenchConfig(url=broker.url, secret=broker.secret, data_dir=broker.data_dir, conns=2,
                                  count=10, mode="group", group_size=4, **SMALL))


# -- bench --url at what is not a pimcore broker: the SDK's words, at once --


def _bench_at(url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from pimcore.cli import main

    rc = main(["bench", "--url", url, "--secret", "s" * 32, "-n", "1", "-c", "1", "--warmup", "0", "--no-progress",
               "--no-pin"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("service", ["redis-server", "mosquitto"])
def test_bench_at_another_services_port_says_so_with_the_sdks_words(tmp_path, capsys, service: str) -> None:
    """At a redis-server the C generator waited 60 s in silence, then "the C
    load generator failed (exit 2): loadgen: logins did not complete within
    60 s"; at mosquitto "connection closed during login", exit 2.  bench
    checks the URL with one SDK connect first: its words, and exit 1 (a
    port that does not answer as a broker may be one that is not up yet)."""
    import shutil
    import subprocess

    exe = shutil.which(service) or shutil.which(service, path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        pytest.skip(f"no {service}")
    port = free_port()
    if service == "redis-server":
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    else:
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        argv = [exe, "-c", str(conf)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket
        import time

        for _ in range(500):  # until it listens (not a timing assertion)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        url = f"tcp://127.0.0.1:{port}"
        rc, out, err = _bench_at(url, capsys)
    finally:
        proc.terminate()
        proc.wait(10)
    assert rc == 1 and out == "" and "Traceback" not in err, (rc, out, err)
    assert err.startswith(f"pimcore bench: cannot connect to {url}"), err
    assert "load generator" not in err and len(err.splitlines()) == 1, err
    if service == "redis-server":
        assert err.rstrip().endswith("no answer to the login (is it a pimcore broker?)"), err


def test_bench_at_a_port_that_speaks_first_is_refused_as_given(capsys) -> None:
    """A service that speaks first (an SSH banner): the SDK says it is
    another service's port, and the same URL fails the same way: exit 2."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def ssh() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                while conn.recv(65536):
                    pass

    thread = threading.Thread(target=ssh, daemon=True)
    thread.start()
    try:
        url = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        rc, out, err = _bench_at(url, capsys)
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)
    assert rc == 2 and out == "", (rc, out, err)
    assert err == (f"pimcore bench: cannot connect to {url}: the server answered in text ('SSH-2.0-...'), not in"
                   " pimcore's protocol: is it another service's port?\n"), err


def test_bench_at_a_closed_port_says_connection_refused_in_words(capsys) -> None:
    """It said the C generator's raw "Connection refused"."""
    import socket

    with socket.socket() as held:  # bound, not listening
        held.bind(("127.0.0.1", 0))
        url = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        rc, out, err = _bench_at(url, capsys)
    assert rc == 1 and out == "", (rc, out, err)
    assert err == f"pimcore bench: cannot connect to {url}: connection refused\n", err


def test_a_path_that_is_not_utf8_is_echoed_with_its_bytes_as_the_cli_says_them(monkeypatch, tmp_path) -> None:
    """bench echoed the --data-dir it was given with ``!r``: a byte that was
    not UTF-8 read ``'\\udcff'`` (Python's surrogate escape), not ``\\xff``
    as every other refusal of the CLI says it (ids.quote_arg).  (The store
    is a stand-in that refuses the write: LMDB itself refuses such a path
    before this message.)"""
    import os

    import pimcore.store
    from pimcore.errors import StoreError
    from pimcore.loadgen import _create_group

    class Refusing:
        def __init__(self, path: str, **kwargs: object) -> None:
            pass

        def conversation_exists(self, conv: str) -> bool:
            raise StoreError("a broker with durability 'log' is running on this store: only it writes")

        def close(self) -> None:
            pass

    monkeypatch.setattr(pimcore.store, "LmdbStore", Refusing)
    store_dir = os.path.join(os.fsdecode(bytes(tmp_path) + b"/d\xff"), "store")
    with pytest.raises(BenchError) as err:
        _create_group(store_dir, 4, "sync")
    said = str(err.value)
    assert said.startswith(f"cannot create the bench group in '{tmp_path}/d\\xff/store': a broker with"), said
    assert "udcff" not in said


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_bench_stopped_by_a_signal_cleans_up_and_says_so(tmp_path: Path, sig: str) -> None:
    """A new user's trial: SIGTERM (timeout, a CI's cancel) killed the bench
    and left its broker's data directory in /tmp, still growing; Ctrl-C
    cleaned up but printed a KeyboardInterrupt traceback.  Both now unwind
    through the runs' cleanup and say "interrupted", exit 130.  SIGHUP (the
    terminal closed, an ssh session dropped) left /tmp/pimcore-bench-* and
    /tmp/pimcore-loadgen-* behind: it does the same."""
    import signal
    import subprocess
    import time

    from _proc import PIMCORE, _env

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.Popen([*PIMCORE, "bench", "-c", "1", "-d", "60", "--durability", "os", "--no-pin", "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env({"TMPDIR": str(tmp)}))
    try:
        deadline = time.monotonic() + 30
        while not list(tmp.glob("pimcore-bench-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(tmp.glob("pimcore-bench-*")), "the bench made no data directory"
        time.sleep(2.0)  # (under way: the broker up, the generator sending)
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130 and err.rstrip().endswith("pimcore bench: interrupted"), (p.returncode, err)
    assert "Traceback" not in err, err
    assert not list(tmp.glob("pimcore-*")), list(tmp.iterdir())


@pytest.mark.parametrize("flags, rounds", [([], 3), (["--rounds", "1"], 1), (["--rounds", "4"], 4)])
def test_compare_runs_the_rounds_given_or_3(flags: list, rounds: int, monkeypatch, capsys) -> None:
    """--rounds defaults to None so that "given" can be told from "not
    given" (refused without --compare); --compare alone still runs 3."""
    from pimcore import loadgen
    from pimcore.cli import main

    asked = []

    def fake_compare(cfg: BenchConfig, peer: str, n: int, on_round: object) -> dict:
        asked.append((peer, n))
        raise BenchError("stop here")

    monkeypatch.setattr(loadgen, "run_compare", fake_compare)
    assert main(["bench", "--compare", "redis", *flags, "--no-progress"]) == 2
    assert asked == [("redis", rounds)]
    assert capsys.readouterr().err == "pimcore bench: stop here\n"


@pytest.mark.parametrize("flags, want", [
    (["--shape", "1x64"], (1, 64, False)),
    (["--shape", "1x64", "-c", "1", "-w", "64"], (1, 64, False)),  # agrees with the shape: accepted
    (["--shape", "50x16", "--conns", "50", "--offline"], (50, 16, False)),
    (["--shape", "e2e-1x64", "-w", "64"], (1, 64, True)),
    ([], (50, 16, True)),  # no shape: the defaults
    (["-c", "3", "-w", "2"], (3, 2, True)),
])
def test_a_shape_takes_flags_that_agree_with_it(flags: list, want: tuple, monkeypatch, capsys) -> None:
    """-c/-w default to None so that a shape can tell given from not
    given: flags that say what the shape says are accepted; the run gets
    the shape's connections, window and recipients."""
    from pimcore import loadgen
    from pimcore.cli import main

    got = []

    def fake_run(cfg: BenchConfig) -> object:
        got.append((cfg.conns, cfg.window, cfg.online))
        raise BenchError("stop here")

    monkeypatch.setattr(loadgen, "run_bench", fake_run)
    assert main(["bench", *flags, "--no-progress"]) == 2
    assert got == [want] and capsys.readouterr().err == "pimcore bench: stop here\n"


def _broker_of(pid: int) -> Optional[int]:
    """The pid of the `pimcore serve` a bench process started, or None yet."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            if b"serve" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
        except OSError:
            pass
    return None


@pytest.mark.parametrize("generator, sig", [("c", "SIGKILL"), ("python", "SIGKILL"), ("python", "SIGTERM")])
def test_a_broker_that_dies_part_way_fails_the_run_and_says_so(generator: str, sig: str, tmp_path: Path) -> None:
    """A new user's trial: the broker killed part-way through a run gave a
    report that divided what it acked before it died by the whole window
    -- a low throughput figure, as if the broker had been slow.  The run now
    says the broker exited (its status and last lines), gives no rates,
    and exits 1; --json says the same with ``failed`` and ``broker_exit``."""
    import signal
    import subprocess
    import time

    from _proc import PIMCORE, _env

    if generator == "c":
        from pimcore.loadgen import c_generator

        if c_generator()[0] is None:
            pytest.skip("no C load generator (cc)")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = subprocess.Popen([*PIMCORE, "bench", "-c", "2", "-d", "6", "--warmup", "0.2", "--durability", "os", "--no-pin",
                          "--no-progress", "--generator", generator, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env({"TMPDIR": str(tmp)}))
    try:
        deadline = time.monotonic() + 30
        while (broker := _broker_of(p.pid)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker is not None, "no broker started"
        # Logged in (a couple of tenths of a second; seconds on a loaded CI
        # machine) and sending: part-way through.
        time.sleep(3.0)
        os.kill(broker, getattr(signal, sig))
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, (p.returncode, out, err)
    assert not list(tmp.glob("pimcore-*")), list(tmp.iterdir())
    if not out and "the broker exited" in err and "(the generator: " in err:
        # On a loaded machine (a CI run) the kill can come before the window
        # began, during the logins: then there is no report, only the
        # broker's exit -- the other correct outcome (and its own test's).
        return
    doc = json.loads(out)
    assert doc["failed"].startswith("the broker exited part-way through the run"), doc["failed"]
    status = doc["broker_exit"]["status"]
    if sig == "SIGKILL":
        assert status == -9 and "killed by SIGKILL" in doc["failed"], doc["broker_exit"]
    else:  # a graceful stop: its exit line is among its last lines
        assert any("served" in line for line in doc["broker_exit"]["last_lines"]), doc["broker_exit"]
    assert doc["acked_per_s"] is None and doc["deliveries_per_s"] is None  # no rate over a window it did not live
    assert doc["acked"] > 0  # what it did ack is still counted
    assert not list(tmp.glob("pimcore-*")), list(tmp.iterdir())


def test_the_report_of_a_run_whose_broker_died_says_so_without_rates() -> None:
    """The table (not --json) of such a run: FAILED, the exit, the broker's
    last lines; the acks counted before, no rate and no limit guessed."""
    res = run_bench(BenchConfig(conns=1, count=20, **SMALL))
    res.failed = "the broker exited part-way through the run (killed by SIGKILL)"
    res.broker_exit = {"status": -9, "last_lines": ["Traceback (most recent call last):", "MemoryError"]}
    res.acked_per_s = res.deliveries_per_s = res.stored_entries_per_s = None
    table = format_result(res)
    assert "FAILED: the broker exited part-way through the run (killed by SIGKILL)" in table, table
    assert "broker said: MemoryError" in table and "/s" not in table, table


def test_a_generator_that_gives_up_on_a_dead_broker_is_said_as_the_broker_exiting(monkeypatch) -> None:
    """When the generator itself fails because the broker died (no result
    to report at all), the error says the broker exited and how, with the
    generator's words after: BenchBrokerExited, exit 1 from the CLI."""
    import signal
    import time

    from pimcore import loadgen

    def dying(cfg: BenchConfig, url: str, secret: str, pid: int, backend: str) -> object:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        raise BenchError("the C load generator failed (exit 1): connection reset")

    monkeypatch.setattr(loadgen, "_run_against", dying)
    with pytest.raises(loadgen.BenchBrokerExited) as err:
        run_bench(BenchConfig(conns=1, count=5, **SMALL))
    said = str(err.value)
    assert said.startswith("the broker exited part-way through the run (killed by SIGKILL)"), said
    assert said.endswith("(the generator: the C load generator failed (exit 1): connection reset)"), said


def test_cpu_below_a_few_clock_ticks_is_no_figure() -> None:
    """/proc counts CPU in clock ticks (10 ms at 100 Hz): a run whose broker
    used a few of them gave "0.0 µs per send (0% of a core)" or, one tick
    later, hundreds -- noise, printed as a figure (a new user's trial at
    -d 0.1).  Below MIN_CPU_TICKS the figure is None with the reason; above
    it, the figure."""
    from pimcore.loadgen import MIN_CPU_TICKS, _server_figures

    tick = 1 / os.sysconf("SC_CLK_TCK")
    res = run_bench(BenchConfig(conns=1, count=1, **SMALL))  # (any result: its figures are replaced)
    short = {"ready": (1.0, {}, 10.0, 0.0), "done": (1.0 + (MIN_CPU_TICKS - 1) * tick, {"VmHWM": 1 << 20}, 10.5, 0.0)}
    _server_figures(res, short, 1000)
    assert res.broker_cpu_us_per_msg is None and res.broker_cpu_util is None
    assert res.broker_cpu_reason is not None
    assert res.broker_cpu_reason.startswith(f"run too short: the kernel counts CPU in {tick * 1000:g} ms ticks")
    assert res.broker_peak_rss == 1 << 20  # the rest of the figures stay
    long = {"ready": (1.0, {}, 10.0, 0.0), "done": (1.0 + MIN_CPU_TICKS * tick, {}, 10.5, 0.0)}
    _server_figures(res, long, 1000)
    assert res.broker_cpu_us_per_msg == pytest.approx(MIN_CPU_TICKS * tick / 1000 * 1e6)
    assert res.broker_cpu_reason is None and res.broker_cpu_util is not None


def test_a_run_of_milliseconds_says_its_cpu_figure_is_too_coarse() -> None:
    """Text and --json of a run of a few messages: n/a with the reason,
    null with ``broker_cpu_reason`` -- and the rest of the report."""
    r = run_pimcore("bench", "-n", "2", "-c", "1", "--warmup", "0", "--durability", "os", "--no-pin", "--no-progress",
                    timeout=120)
    assert r.returncode == 0, r.stderr
    assert "broker CPU         n/a per send, run too short: the kernel counts CPU in" in r.stdout, r.stdout
    assert "acked sends" in r.stdout and "send -> SendAck" in r.stdout and "limited by" in r.stdout
    assert "(run too short for a steady rate: 2 sends in flight at once against 2 acked" in r.stdout, r.stdout
    r = run_pimcore("bench", "-n", "2", "-c", "1", "--warmup", "0", "--durability", "os", "--no-pin", "--no-progress",
                    "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["broker_cpu_us_per_msg"] is None and doc["broker_cpu_reason"].startswith("run too short"), doc
    assert doc["acked"] == 2 and doc["acked_per_s"] > 0
    # The rate too (a trial: -d 0.01 said 80,000 acked/s, a 2 s run 30,800):
    # the sends in flight at the start, acked in the first round trip, are
    # most of such a run.
    assert doc["rate_note"].startswith("run too short for a steady rate: 2 sends in flight at once"), doc


def test_a_steady_run_has_no_rate_note() -> None:
    from pimcore.loadgen import rate_note

    assert rate_note(acked=8_000, in_flight=800) is None
    assert rate_note(acked=1, in_flight=1).startswith("run too short for a steady rate: 1 send in flight at once")
    assert rate_note(acked=7_999, in_flight=800) == ("run too short for a steady rate: 800 sends in flight at once"
                                                     " against 7,999 acked (want 10x as many acked; run longer)")


def test_the_benchs_broker_takes_no_settings_from_the_callers_environment(tmp_path: Path) -> None:
    """A new user's trial: run from an operator's shell with
    $PIMCORE_WEBHOOKS_URL, $PIMCORE_MODERATION_URL and $PIMCORE_STORE
    exported, the bench's own broker took them: its traffic was POSTed to
    the production webhook and moderation services and written to that
    Redis.  Every setting's PIMCORE_* (and $PIMCORE_CONFIG) is now left
    out of the broker's environment, said on stderr; a listener at the URLs
    they name hears nothing, and the run succeeds."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []

    def listen() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    heard.append(conn.recv(200) or b"(connected)")
                except OSError:
                    heard.append(b"(connected)")

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    at = f"127.0.0.1:{server.getsockname()[1]}"
    env = {"PIMCORE_MODERATION_URL": f"http://{at}/moderate", "PIMCORE_MODERATION_POLICY": "open",
           "PIMCORE_WEBHOOKS_URL": f"http://{at}/hook", "PIMCORE_STORE": f"redis://{at}/0",
           "PIMCORE_LIMITS_MAX_PAYLOAD": "8",
           "PIMCORE_CONFIG": str(tmp_path / "no-such.toml"), "PIMCORE_SERVER_HISTORY_MAX_COUNT": "",
           "TMPDIR": str(tmp_path)}
    try:
        r = run_pimcore("bench", "-n", "20", "-c", "1", "--warmup", "0", "--durability", "os", "--no-pin",
                        "--no-progress", "--json", env=env, timeout=120)
    finally:
        server.close()
        thread.join(5)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert heard == [], heard  # no webhook, no moderation request
    doc = json.loads(r.stdout)
    assert doc["acked"] == 20 and not doc["errors"], doc
    if os.environ.get("PIMCORE_BACKEND"):  # (the backend selector is no setting: kept without --backend)
        assert doc["broker"]["backend"] == os.environ["PIMCORE_BACKEND"], doc["broker"]
    assert ("pimcore bench: ignored from the environment: PIMCORE_CONFIG, PIMCORE_LIMITS_MAX_PAYLOAD,"
            " PIMCORE_MODERATION_POLICY, PIMCORE_MODERATION_URL, PIMCORE_STORE, PIMCORE_WEBHOOKS_URL (the bench's"
            " broker is its own)") in r.stderr, r.stderr
    assert not list(tmp_path.glob("pimcore-*")), list(tmp_path.iterdir())


@pytest.mark.parametrize("generator, sig", [("c", "SIGTERM"), ("c", "SIGKILL"), ("python", "SIGTERM")])
def test_a_broker_that_exits_before_the_measured_window_is_said_as_a_broker_exit(
        generator: str, sig: str, monkeypatch, capsys) -> None:
    """A new user's trial: the bench's broker died during the logins and
    bench said "the C load generator failed (exit 2): loadgen: connection
    closed during login", exit 2 -- blaming the generator (and 2 is the
    refused-option status).  A broker stopping (SIGTERM: it closes the
    connections first, then takes a moment to exit) right after it said
    "ready", while the generator logs in: bench waits for it, says the broker
    exited (its status, its last lines) with the generator's words after,
    exit 1."""
    import signal

    from pimcore import loadgen
    from pimcore.cli import main

    if generator == "c" and loadgen.c_generator()[0] is None:
        pytest.skip("no C load generator (cc)")
    ready = loadgen.BrokerProcess._wait_ready

    def ready_then_stopped(self: BrokerProcess) -> None:
        ready(self)
        assert self.proc is not None
        os.kill(self.proc.pid, getattr(signal, sig))

    monkeypatch.setattr(loadgen.BrokerProcess, "_wait_ready", ready_then_stopped)
    rc = main(["bench", "-c", "2", "-d", "1", "--warmup", "0.5", "--durability", "os", "--no-pin", "--no-progress",
               "--generator", generator, "--json"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "", (rc, out, err)
    assert err.startswith("pimcore bench: the broker exited part-way through the run ("), err
    if sig == "SIGKILL":
        assert "(killed by SIGKILL)" in err, err
    assert "(the generator: " in err and "Traceback" not in err, err


@pytest.mark.parametrize("said, tail", [("", "(no output)"), ("loadgen: first\\nloadgen: last words", "loadgen: first | loadgen: last words")])
def test_a_generator_killed_by_a_signal_says_the_signal_and_fails_the_run(said: str, tail: str, tmp_path: Path,
                                                                         monkeypatch, capsys) -> None:
    """A new user's trial: a C generator killed by a signal gave "the C load
    generator failed (exit -9): " -- nothing after the colon -- and exit 2,
    the refused-option status.  It now says the signal by name and the
    generator's last words (or "(no output)"), exit 1: a failed run."""
    from pimcore import loadgen
    from pimcore.cli import main

    exe = tmp_path / "loadgen"
    exe.write_text(f"#!/bin/sh\nprintf '{said}' >&2\nkill -KILL $$\n")
    exe.chmod(0o755)
    monkeypatch.setattr(loadgen, "c_generator", lambda: (str(exe), ""))
    rc = main(["bench", "-n", "5", "-c", "1", "--warmup", "0", "--durability", "os", "--no-pin", "--no-progress",
               "--generator", "c"])
    out, err = capsys.readouterr()
    assert (rc, out) == (1, ""), (rc, out, err)
    assert err == f"pimcore bench: the C load generator was killed by SIGKILL: {tail}\n", err
