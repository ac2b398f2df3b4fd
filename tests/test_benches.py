"""The benches' relay set-up: every rate limit lifted, and a refusal ends a run.

A bench measures the relay's data path, so its relay must not be paced by a
limit layer added after the bench was written: ``benches/e2e_compare.py`` and
``benches/sizing.py`` wrote the device's limits only, and once the address
budgets landed their 1:1 runs were paced at 10,000 messages a second, their
4 KiB runs refused and then stalled for 20 s, and ``sizing.py`` failed.
These tests hold the benches' shared list (``server_cpu.py``) to the relay's
``Limits``, and run ``e2e_compare.py``'s relay past the defaults' bursts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import re
import sys
import time
import tomllib
from pathlib import Path

import pytest

import fastroute
from fastroute.config import Limits, RelayConfig
from fastroute.errors import RateLimited

BENCHES = Path(__file__).resolve().parents[1] / "benches"
sys.path.insert(0, str(BENCHES))

import e2e_compare  # noqa: E402
import server_cpu  # noqa: E402
import wal_pages  # noqa: E402


def _tree() -> str:
    """The fastroute under test (installed, or this checkout built in place):
    the benches run with it first on the path, since a clone's unbuilt
    source must not be imported."""
    import fastroute
    return str(Path(fastroute.__file__).resolve().parents[1])


def _bench(script: str, *args: str, timeout: float = 240):
    """``benches/script`` run as a user runs it, with :func:`_tree`'s fastroute."""
    import subprocess

    from cliutil import ENV
    return subprocess.run([sys.executable, "-P", str(BENCHES / script), *args],
                          env=dict(ENV, PYTHONPATH=_tree()), capture_output=True,
                          text=True, timeout=timeout)


def _rate_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(Limits)
            if f.name.endswith(("_per_s", "_burst", "_burst_s"))}


def test_every_rate_limit_is_lifted_or_named() -> None:
    lifted = set(server_cpu._UNBOUND_LIMITS)
    named = set(server_cpu.LIMITS_NOT_LIFTED)
    assert not lifted & named
    # a new layer of Limits must be lifted for benches, or named with why it
    # does not pace them
    assert _rate_fields() - lifted - named == set()
    # and the names are the relay's: a renamed field is not lifted silently
    assert (lifted | named) - _rate_fields() == set()
    # the provider layers are left because they are off by default
    defaults = Limits()
    for name in named:
        if name.startswith("provider_") and name.endswith("_per_s"):
            assert getattr(defaults, name) == 0


def test_server_cpu_prints_the_sqlite_over_memory_ratio_by_round() -> None:
    # the issue's own bar (SQLite at most 2x the memory store): the medians'
    # ratio and each round's, pairing the runs of the same round only
    results = {"fr-memory": [{"round": 0, "us_per_msg": 1.0}, {"round": 1, "us_per_msg": 2.0},
                             {"round": 2, "us_per_msg": 4.0}],
               "fr-sqlite": [{"round": 0, "us_per_msg": 1.5}, {"round": 2, "us_per_msg": 5.0}]}
    med, rounds = server_cpu.store_ratio(results)
    assert med == pytest.approx(3.25 / 2.0)
    assert rounds == [1.5, 1.25]
    assert server_cpu.store_ratio({"fr-memory": results["fr-memory"]}) is None
    # at FULL too, from its own runs
    results["fr-sqlite-full"] = [{"round": 1, "us_per_msg": 3.0}]
    med, rounds = server_cpu.store_ratio(results, "fr-sqlite-full")
    assert (med, rounds) == (pytest.approx(3.0 / 2.0), [1.5])
    # a run shorter than a clock tick reads no CPU: a round of it has no
    # ratio, and a median of none gives no ratio at all (not a crash)
    results["fr-memory"][2]["us_per_msg"] = 0.0
    med, rounds = server_cpu.store_ratio(results)
    assert (med, rounds) == (pytest.approx(3.25 / 1.0), [1.5])
    results["fr-memory"] = [{"round": 0, "us_per_msg": 0.0}]
    assert server_cpu.store_ratio(results) is None


def test_ratio_interval_resamples_whole_rounds() -> None:
    # where the medians' ratio lies once the rounds' noise is allowed for:
    # rounds are drawn whole, so a drift that moves both stores of a round
    # alike does not widen it; fewer than 5 paired rounds give none
    def runs(cpus: dict) -> list[dict]:
        return [{"us_per_msg": cpu, "round": rnd} for rnd, cpu in cpus.items()]

    drift = [1.0, 1.3, 0.8, 1.1, 0.9, 1.2, 1.0, 0.85]
    results = {"fr-memory": runs({i: 0.5 * d for i, d in enumerate(drift)}),
               "fr-sqlite": runs({i: 0.9 * d for i, d in enumerate(drift)})}
    lo, hi = server_cpu.ratio_interval(results, "fr-sqlite", "fr-memory")
    # every round reads 1.8x: any draw of whole rounds does too (a draw of
    # runs that split rounds would mix slow memory with fast SQLite runs)
    assert (lo, hi) == (pytest.approx(1.8), pytest.approx(1.8))
    # noise of its own in one store widens it, around the medians' ratio
    results["fr-sqlite"] = runs({i: 0.9 * d * (1.25 if i % 2 else 0.8)
                                 for i, d in enumerate(drift)})
    lo, hi = server_cpu.ratio_interval(results, "fr-sqlite", "fr-memory")
    med, _ = server_cpu.cpu_ratio(results, "fr-sqlite", "fr-memory")
    assert lo < med < hi and hi - lo > 0.1
    assert server_cpu.ratio_interval(results, "fr-sqlite", "fr-memory") == (lo, hi)
    # a round one store missed is not drawn; four pairs are too few
    results["fr-sqlite"] = results["fr-sqlite"][:4] + [{"us_per_msg": 1.0, "round": 99}]
    assert server_cpu.ratio_interval(results, "fr-sqlite", "fr-memory") is None


def test_server_cpu_prints_no_store_ratio_for_runs_too_short_to_read(capsys) -> None:
    # a --quick run of a few thousand messages may read no clock tick of the
    # memory store's CPU: the table says so instead of dividing by zero
    run = {"round": 0, "received": 3000, "wall": 0.01}
    results = {"fr-memory": [dict(run, us_per_msg=0.0)],
               "fr-sqlite-full": [dict(run, us_per_msg=3.33)]}
    args = argparse.Namespace(full_window=False, window=1024, batch=256, rate=0.0,
                              messages=3000, incomplete=[])
    server_cpu.print_table(results, args)
    out = capsys.readouterr().out
    assert "SQLite FULL / memory store: n/a" in out
    assert "SQLite NORMAL" not in out.split("ratios)")[-1]  # not run: no line


@pytest.mark.parametrize("system, relay, nats", [
    ("fr-sqlite", "NORMAL", None), ("fr-sqlite-full", "FULL", None),
    ("js-file", None, "2m"), ("js-file-always", None, "always"),
])
def test_server_cpu_pairs_each_sqlite_policy_with_jetstream_s_like_it(system, relay,
                                                                      nats) -> None:
    # the like-for-like pairs: NORMAL (no sync a commit) against a file
    # store synced every 2 min, FULL (a sync before the SACKs) against one
    # synced after every write
    pairs = {fr: nt for _, fr, nt in server_cpu.PAIRS}
    assert pairs["fr-sqlite"] == "js-file" and pairs["fr-sqlite-full"] == "js-file-always"
    assert server_cpu.SYNC[system] == (relay or nats)
    if relay is not None:
        # what the relay started for the system loads as that policy
        text = server_cpu.relay_toml(server_cpu.SYNC[system])
        assert RelayConfig.from_mapping(tomllib.loads(text)).synchronous == relay
    else:
        conf = server_cpu.NATS_JS_CONF.format(store_dir="/x", sync=server_cpu.SYNC[system])
        assert f'sync_interval: "{nats}"' in conf


def test_lifted_limits_load_and_exceed_the_defaults() -> None:
    doc = tomllib.loads("[limits]\n" + server_cpu.relay_limits_toml())
    cfg = RelayConfig.from_mapping(doc)
    defaults = Limits()
    for name in server_cpu._UNBOUND_LIMITS:
        assert getattr(cfg.limits, name) >= 50 * getattr(defaults, name), name


def _run(coro_fn, *args):
    async def main():
        relay = e2e_compare.FastrouteRelay("memory").start()
        try:
            return await coro_fn(relay, *args)
        finally:
            relay.stop()
    return asyncio.run(main())


def test_e2e_compare_runs_past_the_default_bursts() -> None:
    # 4 KiB bodies: 160 MiB, past the address's 128 MiB byte burst, and
    # 41,000 messages, past its 40,000-message one
    n = 41_000
    res = _run(e2e_compare.fr_run, 1, 4096, n, None)
    assert res["delivered"] == n


@pytest.mark.parametrize("batch", [e2e_compare.BATCH, 2_000])
def test_e2e_compare_ends_a_refused_run_at_once(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture,
                                                batch: int) -> None:
    # an address allowed 1 MiB (256 of these bodies) and 1 KiB a second
    # more: refused within the run whatever the relay's speed
    monkeypatch.setattr(e2e_compare, "relay_limits_toml",
                        lambda: "address_bytes_per_s = 1024.0\n"
                                "address_bytes_burst = 1048576.0\n")
    # 2,000: the whole run in one batch, so every send is out before the
    # refusal comes back.  The run then waited for its receivers alone, which
    # never get what was refused: STALLED after 20 s.  It happened now and
    # then (5 runs in 400) with the default batches too, when the last batch
    # went out before the first refusal arrived
    monkeypatch.setattr(e2e_compare, "BATCH", batch)
    t0 = time.monotonic()
    with pytest.raises(RateLimited):
        _run(e2e_compare.fr_run, 1, 4096, 2_000, None)
    # not after RUN_TIMEOUT without progress (a stall): the refusal itself
    assert time.monotonic() - t0 < e2e_compare.RUN_TIMEOUT
    # nor a future left for the GC to report: Python 3.11 formats that report
    # with ast.parse, which broke an ast.parse it interrupted (a SystemError)
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_e2e_compare_unbounded_window_runs_through(monkeypatch: pytest.MonkeyPatch) -> None:
    # --window 0: the sender waits only on the relay's acks past WINDOW
    # unacked sends.  That wait took a batch completing for a stall (the
    # batch left the outstanding set before the wait woke), so every such
    # run reported STALLED, "after 20 s without progress", at its first wait
    monkeypatch.setattr(e2e_compare, "E2E_WINDOW", 0)
    # a small ack window, so that the sender certainly waits on it
    monkeypatch.setattr(e2e_compare, "WINDOW", 2 * e2e_compare.BATCH)
    n = 20_000
    res = _run(e2e_compare.fr_run, 1, 100, n, None)
    assert res["delivered"] == n


def test_store_load_reads_the_whole_backlog_and_compares_two_trees(tmp_path) -> None:
    # the bench of the backlog sync's reads: every row loaded (it stops with
    # an error otherwise), a figure a row, and a run in turns with another tree
    # (the fastroute under test is both trees)
    proc = _bench("store_load.py", "--runs", "2", "--messages", "3000", "--pack", "700",
                  "--limit", "256", "--relay-path", _tree(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    assert lines[0].startswith("backlog of 3000 x 100 B in packs of 700, loads of 256")
    figures = [float(line.split()[1]) for line in lines[1:3]]
    assert all(f > 0 for f in figures), out
    assert "this/other:" in lines[3]


def test_e2e_compare_paces_a_latency_run_at_the_rate_given() -> None:
    # two trees compared at one load: a fixed rate, not half of each tree's
    # own maximum (a faster tree would be paced faster)
    calls: list = []

    async def runner(fanout, size, n, rate):
        calls.append(rate)
        return {"thr": 10_000.0, "send_rate": 10_000.0, "p50": 1.0, "p99": 2.0,
                "delivered": n * fanout, "sent": n}

    res = asyncio.run(e2e_compare.scenario(runner, 10, 4096, 4_000, 1))
    assert calls == [None, 5_000.0] and res["lat_rate"] == 5_000.0
    calls.clear()
    res = asyncio.run(e2e_compare.scenario(runner, 10, 4096, 4_000, 1, lat_rate=1_234.0))
    assert calls == [None, 1_234.0] and res["lat_rate"] == 1_234.0
    ap = argparse.ArgumentParser()
    assert e2e_compare.parse_lat_rates(ap, ["1:10 4096B=12000", "1:1 100B=9e4"]) == {
        "1:10 4096B": 12_000.0, "1:1 100B": 90_000.0}
    for bad in ("1:3 100B=5", "1:1 100B=0", "1:1 100B=fast", "1:1 100B=inf", "12000"):
        with pytest.raises(SystemExit):
            e2e_compare.parse_lat_rates(ap, [bad])


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_sizing_measures_the_store_it_is_given(store: str) -> None:
    # docs/OPERATING's sizing table has a row for each store: the script runs
    # the relay on the one asked for and counts every queued message
    import subprocess

    out = subprocess.run([sys.executable, "-P", str(BENCHES / "sizing.py"), "--devices", "3",
                          "--per-device", "20", "--store", store],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "60 messages of 200 B queued unacked" in out
    assert "3 devices online" in out and "B per queued message" in out
    commits = float(re.search(r"store commits: (\S+)", out).group(1))
    assert (commits == 0) if store == "memory" else (commits > 0)


def _quick_pair(only: str, title: str, label: str, *more: str) -> str:
    """``server_cpu.py --quick`` of 3,000 messages with the systems ``only``
    (and the options ``more``); its output, once pair ``title``'s row shows
    the fastroute system ``label`` with one complete run that delivered them
    all."""
    proc = _bench("server_cpu.py", "--quick", "--messages", "3000", "--only", only, *more)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = [line for line in proc.stdout.splitlines() if line.startswith(title)]
    assert len(row) == 1, proc.stdout
    # runs counted and delivered (its CPU is in clock ticks of 10 ms, which a
    # run this short may not reach)
    runs, _, delivered = row[0].split(label)[1].split()[:3]
    assert (runs, delivered) == ("1", "3000"), proc.stdout
    return proc.stdout


def test_server_cpu_runs_the_interop_pair_across_two_providers() -> None:
    # pair 5: a user of another provider writes to a user who opted in to
    # it; a relay that refused those sends (no consent, the provider not
    # enrolled) would deliver nothing and the run would not count (exit 1)
    _quick_pair("fr-interop,fr-memory", "5 interop memory vs core", "fastroute memory interop")


def test_server_cpu_runs_the_sqlite_store_at_full_beside_the_memory_store() -> None:
    # pair 6's relay side, for real: a SQLite relay at FULL delivers every
    # message, and its CPU over the memory store's is printed
    out = _quick_pair("fr-sqlite-full,fr-memory", "6 SQLite FULL vs JS always",
                      "fastroute SQLite FULL")
    assert "SQLite FULL / memory store: " in out
    assert "SQLite NORMAL / memory store" not in out  # not run: not printed


def test_server_cpu_holds_its_servers_to_the_cpus_it_is_given() -> None:
    # --server-cpus: the relay (read back from its process) on CPU 0, the
    # clients on the rest; a CPU the script may not use is refused
    if len(os.sched_getaffinity(0)) < 2 or 0 not in os.sched_getaffinity(0):
        pytest.fail("needs CPU 0 and one more (CI has 2 cores)")
    out = _quick_pair("fr-memory", "4 HEADLINE memory vs core", "fastroute memory store",
                      "--server-cpus", "0")
    rest = sorted(os.sched_getaffinity(0) - {0})
    assert f"(server held to CPUs [0], its clients to {rest})" in out, out
    proc = _bench("server_cpu.py", "--quick", "--server-cpus", "0,100000")
    assert proc.returncode == 2 and "--server-cpus" in proc.stderr, proc.stderr


_BURNER = """
import sys, threading, time
def burn():
    while time.thread_time() < 0.15:
        pass
sys.stdin.readline()
t = threading.Thread(target=burn)
t.start()
t.join()
print("ended", flush=True)
sys.stdin.readline()
"""


def test_server_cpu_s_cross_check_counts_threads_that_ended() -> None:
    # the relay's dedup warmers are threads of milliseconds: a sum over the
    # live threads' schedstat lost their time (up to ~0.1 us a message of a
    # fresh relay), and the cross-check then read below the ticks
    import subprocess
    proc = subprocess.Popen([sys.executable, "-c", _BURNER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        clock0, live0 = server_cpu.proc_cpu_ns(proc.pid), server_cpu.proc_sched_ns(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "ended\n"
        clock1, live1 = server_cpu.proc_cpu_ns(proc.pid), server_cpu.proc_sched_ns(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert clock1 - clock0 >= 150_000_000  # the ended thread's 0.15 s counted
    assert live1 - live0 < 100_000_000  # the live threads' sum lost it
    line = server_cpu.progress_line({
        "system": "fr-memory", "us_per_msg": 0.8, "ticks": 8, "cpu_s": 0.08,
        "clock_us_per_msg": 0.79, "main_us_per_msg": 0.7, "received": 100_000,
        "sent": 100_000, "n_errors": 0, "stalled": "", "wall": 0.1, "tx_cpu_s": 0.05,
        "rx_cpu_s": 0.05, "tail_ms": 0})
    assert "CPU clock 0.79 us/msg, main thread 0.70" in line, line


def test_server_cpu_reverses_the_order_of_its_systems_every_other_round() -> None:
    # what one run leaves for the next must not fall on one system of a
    # pair in every round
    systems = ["fr-memory", "nats-core", "fr-sqlite"]
    orders = [server_cpu.round_order(systems, rnd) for rnd in range(4)]
    assert orders[0] == orders[2] == systems
    assert orders[1] == orders[3] == systems[::-1]
    assert systems == ["fr-memory", "nats-core", "fr-sqlite"]  # the caller's list kept
    firsts = {a: sum(o.index(a) < o.index(b) for o in orders)
              for a, b in (("fr-memory", "nats-core"), ("nats-core", "fr-memory"))}
    assert firsts == {"fr-memory": 2, "nats-core": 2}


@pytest.mark.parametrize("bench, args, mode", [
    ("e2ee_send.py", ["--devices", "3", "--messages", "2000"], "dsend"),
    ("group_send.py", ["--fanout", "10", "--modes", "gsend", "--scale", "5"], "gsend"),
])
def test_the_per_device_and_group_benches_split_off_the_loop_s_part(bench, args, mode) -> None:
    # with the SQLite store the relay's CPU is its event loop's and its
    # writer's: the bench says which part was the loop's (its main thread),
    # less than the whole by what the writer spent on its commits
    proc = _bench(bench, "--runs", "1", "--store", "sqlite", "--synchronous", "NORMAL",
                  "--no-nats", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = [line for line in proc.stdout.splitlines() if line.lstrip().startswith("devices")]
    assert len(header) == 1 and header[0].split()[-2] == "loop", proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()
            if len(line.split()) > 2 and line.split()[1] == mode]
    assert len(rows) == 1, proc.stdout
    whole = float(rows[0][4 if bench == "group_send.py" else 3])
    loop = float(rows[0][-1])
    assert 0 < loop < whole, proc.stdout


def test_group_send_runs_several_senders_at_once() -> None:
    # --senders 2: two senders, each to a group (v1: an address) of three
    # devices of its own; the run counts every device's deliveries, and a
    # sender that did not send would leave its devices waiting
    proc = _bench("group_send.py", "--runs", "1", "--store", "memory", "--fanout", "3",
                  "--modes", "gsend", "send", "--senders", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "senders=2" in proc.stdout and "nats-server=not run" in proc.stdout, proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.split()[:2] in (["3", "gsend"], ["3", "send"])]
    assert sorted(r[1] for r in rows) == ["gsend", "send"], proc.stdout


def test_group_send_takes_the_window_it_is_given() -> None:
    # --window 300: 2,000 messages a run, so the last window holds 200; every
    # device still gets every message (the run counts them), and the header
    # says the window the run had
    proc = _bench("group_send.py", "--runs", "1", "--store", "memory", "--fanout", "10",
                  "--modes", "gsend", "--no-nats", "--window", "300")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "window=300" in proc.stdout, proc.stdout
    rows = [line.split() for line in proc.stdout.splitlines()
            if line.split()[:2] == ["10", "gsend"]]
    assert len(rows) == 1 and rows[0][2] == "2000", proc.stdout
    proc = _bench("group_send.py", "--window", "0")
    assert proc.returncode == 2 and "--window" in proc.stderr, proc.stderr


@pytest.mark.parametrize("bench, args, runs", [
    ("group_send.py", ["--fanout", "3", "--modes", "gsend"], 1),
    ("e2ee_send.py", ["--devices", "3", "--messages", "300"], 2),  # send, dsend
])
def test_the_per_device_and_group_benches_put_their_stores_where_they_are_told(
        bench, args, runs, tmp_path) -> None:
    # --data-dir: each run's relay (its store.db among its files) lives in a
    # directory of its own under the one given, for the run only, so that
    # the store's syncs are measured on that filesystem
    import threading

    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for run_dir in os.listdir(tmp_path):
                try:
                    seen.update(f"{run_dir}/{f}" for f in os.listdir(tmp_path / run_dir))
                except (FileNotFoundError, NotADirectoryError):
                    pass  # the run ended meanwhile; the disk's sync probe (a file)
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = _bench(bench, "--runs", "1", "--store", "sqlite", "--synchronous", "NORMAL",
                      "--no-nats", "--data-dir", str(tmp_path), *args)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"data-dir={tmp_path} " in proc.stdout, proc.stdout
    if bench == "group_send.py":
        assert proc.stdout.count("disk sync ") == 2, proc.stdout  # at start and end
    run_dirs = {name.split("/")[0] for name in seen if name.endswith("/store.db")}
    assert len(run_dirs) == runs, sorted(seen)  # a fresh store a run
    assert os.listdir(tmp_path) == []  # removed with their runs
    proc = _bench(bench, "--data-dir", str(tmp_path / "absent"))
    assert proc.returncode == 2 and "--data-dir" in proc.stderr, proc.stderr


def test_disk_sync_probes_the_directory_it_is_given(tmp_path) -> None:
    # the line that says what kind of hour a run had for the disk: a median
    # sync wait and its CPU, both read off real syncs of a file in the
    # directory (then removed)
    import re

    seen: list[str] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    os.fdatasync = fdatasync
    try:
        line = server_cpu.disk_sync(str(tmp_path), n=20)
    finally:
        os.fdatasync = real
    wait, cpu, fs = re.fullmatch(
        r"disk sync (\d+) us \((\d+) us CPU\) a 20 KB rewrite, (.+)", line).groups()
    assert int(wait) >= 0 and int(cpu) >= 0
    assert fs == server_cpu.filesystem(str(tmp_path))
    assert len(seen) == 21 and all(p.startswith(f"{tmp_path}/fr-sync-probe-") for p in seen)
    assert os.listdir(tmp_path) == []


def test_filesystem_names_the_mount_and_whether_ext4_keeps_a_journal(tmp_path) -> None:
    # the directory's mount is found by its device number in mountinfo; an
    # ext4 one is looked up under sysfs by the block device that number names
    dev = os.stat(tmp_path).st_dev
    here = f"{os.major(dev)}:{os.minor(dev)}"
    elsewhere = f"{os.major(dev) + 1}:{os.minor(dev)}"
    sysfs = tmp_path / "sys"
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "devices" / "virtual" / "block" / "vdz").mkdir(parents=True)
    os.symlink("../../devices/virtual/block/vdz", sysfs / "dev" / "block" / here)
    (sysfs / "fs" / "ext4" / "vdz").mkdir(parents=True)
    task = sysfs / "fs" / "ext4" / "vdz" / "journal_task"
    mountinfo = tmp_path / "mountinfo"

    def fs(*lines: str) -> str:
        mountinfo.write_text("".join(line + "\n" for line in lines))
        return server_cpu.filesystem(str(tmp_path), str(mountinfo), str(sysfs))

    other = f"22 27 {elsewhere} / /other rw,relatime - xfs /dev/vdy rw"
    ext4 = f"27 1 {here} / / rw,relatime shared:1 - ext4 /dev/vdz rw,discard"
    task.write_text("<none>\n")
    assert fs(other, ext4) == "ext4 without a journal"
    task.write_text("8786\n")
    assert fs(ext4, other) == "ext4 with a journal"
    task.unlink()
    assert fs(ext4) == "ext4"  # no word from sysfs: the type alone
    assert fs(f"25 24 {here} / /dev/shm rw,relatime - tmpfs tmpfs rw") == "tmpfs"
    assert fs(other) == fs() == fs("garbage") == "unknown"
    assert server_cpu.filesystem(str(tmp_path / "absent")) == "unknown"
    # and the real one names the directory's real mount, where the system
    # lists it by the directory's device number
    real = []
    if os.path.exists("/proc/self/mountinfo"):
        with open("/proc/self/mountinfo") as f:
            real = [line.split(" - ")[1].split()[0] for line in f if line.split()[2] == here]
    assert server_cpu.filesystem(str(tmp_path)).split()[0] == (real[0] if real else "unknown")


def test_store_ratios_pair_the_runs_of_a_round() -> None:
    # the ratio of the medians, and the range of the ratios of two runs of
    # the same round; a round one store did not complete pairs with nothing
    import e2ee_send

    def runs(cpus: dict) -> list[dict]:
        return [{"us_per_msg": cpu, "round": rnd} for rnd, cpu in cpus.items()]

    by_round = {"memory": runs({0: 1.0, 1: 2.0, 2: 4.0}), "sqlite": runs({0: 2.0, 1: 3.0})}
    assert e2ee_send.store_ratios(by_round, ["memory", "sqlite"]) == \
        "sqlite / memory x1.25 (the rounds' x1.50-x2.00, 2 pairs)"
    # from 5 pairs on, the interval of the resampled rounds follows
    by_round = {"memory": runs({i: 1.0 for i in range(6)}),
                "sqlite": runs({i: 1.9 for i in range(6)})}
    assert e2ee_send.store_ratios(by_round, ["memory", "sqlite"]) == \
        "sqlite / memory x1.90 (the rounds' x1.90-x1.90, 6 pairs; " \
        "95 % of resampled rounds x1.90-x1.90)"
    assert e2ee_send.store_ratios({"memory": runs({0: 1.0})}, ["memory", "sqlite"]) == \
        "sqlite / memory n/a: no complete run"
    assert e2ee_send.stores_arg("sqlite,memory") == ["sqlite", "memory"]
    for bad in ("disk", "memory,memory", "memory,"):
        with pytest.raises(argparse.ArgumentTypeError):
            e2ee_send.stores_arg(bad)


@pytest.mark.parametrize("bench, args, mode", [
    ("group_send.py", ["--fanout", "3", "--modes", "gsend"], "gsend"),
    ("e2ee_send.py", ["--devices", "3", "--messages", "300"], "dsend"),
])
def test_the_per_device_and_group_benches_read_two_stores_side_by_side(
        bench, args, mode) -> None:
    # --store memory,sqlite: every round runs each fastroute mode with both
    # stores, and the SQLite store's CPU a delivery is printed over the
    # memory store's, the ratio of the two medians printed above it
    proc = _bench(bench, "--runs", "2", "--store", "memory,sqlite", "--synchronous", "NORMAL",
                  "--no-nats", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "store=memory,sqlite " in proc.stdout, proc.stdout
    cpu = {}
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[1] in (f"{mode}:memory", f"{mode}:sqlite"):
            assert fields[1] not in cpu, proc.stdout
            cpu[fields[1]] = float(fields[4 if bench == "group_send.py" else 3])
    assert len(cpu) == 2, proc.stdout
    got = re.search(rf"^\s+3 devices, {mode}: sqlite / memory x([\d.]+) "
                    r"\(the rounds' x([\d.]+)-x([\d.]+), 2 pairs\)$", proc.stdout, re.M)
    assert got is not None, proc.stdout
    ratio, low, high = map(float, got.groups())
    # the printed medians are rounded: their ratio agrees to a few hundredths
    assert abs(ratio - cpu[f"{mode}:sqlite"] / cpu[f"{mode}:memory"]) < 0.05, proc.stdout
    assert 0 < low <= high, proc.stdout
    proc = _bench(bench, "--store", "memory,disk")
    assert proc.returncode == 2 and "--store" in proc.stderr, proc.stderr
    # JetStream is run like one store: with two, which is not said
    js = ["--js"] if bench == "e2ee_send.py" else ["--modes", "js"]
    proc = _bench(bench, "--store", "memory,sqlite", *js)
    assert proc.returncode == 2 and "one store" in proc.stderr, proc.stderr


@pytest.mark.parametrize("bench, args, modes", [
    ("group_send.py", ["--fanout", "3", "--modes", "send", "gsend"], ("send", "gsend")),
    ("e2ee_send.py", ["--devices", "3", "--messages", "300"], ("send", "dsend")),
])
def test_the_per_device_and_group_benches_fill_the_dedup_window_before_they_measure(
        bench, args, modes) -> None:
    # --fill N: N ids through the relay first, to a device of their own (a
    # fill that did not arrive would time the run out); --full-window: the
    # relay's whole window
    proc = _bench(bench, "--runs", "1", "--store", "memory", "--no-nats", "--fill", "700",
                  *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " filled=700 " in proc.stdout, proc.stdout
    # each run says so once its device has every filled id
    said = re.findall(r"^  \(filled: 700 (\w+) ids through the relay first, [\d.]+ s\)$",
                      proc.stdout, re.M)
    assert sorted(said) == sorted(modes), proc.stdout
    rows = {line.split()[1] for line in proc.stdout.splitlines()
            if line.split()[:1] == ["3"] and line.split()[1] != "devices:"}
    assert rows == set(modes), proc.stdout
    proc = _bench(bench, "--fill", "-1")
    assert proc.returncode == 2 and "--fill" in proc.stderr, proc.stderr
    proc = _bench(bench, "--fill", "5", "--full-window")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr, proc.stderr


def test_handover_measures_a_round_trip_through_a_thread_against_a_loop_turn(capsys) -> None:
    # every request is answered from the thread (a lost answer would hang
    # the run), the three figures are read, and the CPUs the process may run
    # on are given back after the runs held to one
    import threading

    import handover

    cpus = os.sched_getaffinity(0)
    got: dict = {}

    def run() -> None:
        # in a thread of its own, so that a hang fails the test at the join;
        # affinity is a thread's, and this one starts with the test's
        got["rc"] = handover.main(["--trips", "300", "--runs", "2"])
        got["after"] = os.sched_getaffinity(0)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "handover.py did not finish in 60 s"
    assert got == {"rc": 0, "after": cpus}
    out = capsys.readouterr().out
    figures = dict(re.findall(r"^(.+?)\s+CPU\s+([\d.]+) us", out, re.M))
    assert set(figures) == {"loop -> thread -> loop", "the same on one CPU",
                            "a loop turn (baseline)"}, out
    assert all(float(v) > 0 for v in figures.values()), out


def test_wal_pages_names_what_a_group_commit_writes() -> None:
    # format 7: a group's commit writes its spack and its members' shares,
    # and no index on exp_ms of either (each was a page of every commit)
    proc = _bench("wal_pages.py", "--devices", "10", "--batch", "64", "--commits", "30",
                  "--warmup", "10", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head = re.search(r": (\d+) commits, ([\d.]+) pages a commit of (\d+) B", proc.stdout)
    assert head, proc.stdout
    assert int(head.group(1)) == 30 and int(head.group(3)) == 8192, proc.stdout
    per = {name: float(n) for n, name in re.findall(r"^\s+([\d.]+) a commit  (.+)$",
                                                     proc.stdout, re.M)}
    assert per["spacks"] >= 1 and per["shares"] >= 0.9, proc.stdout
    assert per["the header and schema (page 1)"] >= 0.9, proc.stdout
    assert not {"spacks_exp", "shares_exp"} & set(per), proc.stdout
    assert abs(sum(per.values()) - float(head.group(2))) < 0.05, proc.stdout


def test_wal_pages_reads_frames_and_commits_from_a_wal_image() -> None:
    import struct

    def frame(page: int, size: int, salts=(7, 9)) -> bytes:
        return struct.pack(">4I", page, size, *salts) + bytes(8) + bytes(512)

    header = struct.pack(">8I", 0x377F0682, 3007000, 512, 0, 7, 9, 0, 0)
    # two commits, a frame not yet committed, then an earlier pass's frame
    wal = header + frame(3, 0) + frame(1, 10) + frame(4, 11) + frame(5, 0) + frame(6, 12, (1, 2))
    size, frames = wal_pages.wal_frames(wal)
    assert size == 512 and frames == [(3, 0), (1, 10), (4, 11), (5, 0)]
    assert wal_pages.commits_of(frames) == [[3, 1], [4]]
    assert wal_pages.wal_frames(b"") == (0, [])
    assert wal_pages.wal_frames(bytes(len(wal))) == (0, [])  # emptied in place: zeroes


def _group_put_ack(batch: str, pattern: str, *args: str) -> re.Match:
    """``store_put_ack.py`` for a group of 10 devices, a commit a batch of
    ``batch`` messages at FULL (3,200 messages), plus ``args``: ``pattern``
    matched in what it printed."""
    proc = _bench("store_put_ack.py", "--devices", "10", "--batch", batch, "--inflight", "1",
                  "--synchronous", "FULL", "--messages", "3200", *args, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(pattern, proc.stdout)
    assert m, proc.stdout
    return m


def test_store_put_ack_holds_a_group_s_acks_back_a_batch() -> None:
    # --ack-lag 1: each batch's acks come with the put after the next; the
    # spacks of two batches are then live at every commit, and the WAL takes
    # more frames a commit (an --ack-lag the bench ignored writes the same).
    # Batches of 32 with 8 KB pages: one batch's spack fits a leaf, two do
    # not (format 7: 520 against 1,566 B a message; batches of 64 write 651
    # at either lag)
    written = {}
    for lag in ("0", "1"):
        m = _group_put_ack("32", r"commits (\d+), written (\d+) B a message",
                           "--ack-lag", lag)
        assert int(m.group(1)) >= 100, m.string  # a commit a batch
        written[lag] = int(m.group(2))
    assert written["1"] > 1.5 * written["0"], written


@pytest.mark.skipif(not fastroute.COMPILED, reason="compiled core not built")
def test_store_put_ack_writes_a_group_commit_s_frames_in_one_call() -> None:
    # --wal default: SQLite's own VFS, two write calls a WAL frame; the
    # store's own writes a commit's frames in one (fastroute.store.py_wal_vfs)
    calls = {}
    for wal in ("default", "gathered"):
        m = _group_put_ack("64", r"commits (\d+), .* ([\d.]+) write calls a commit",
                           "--wal", wal)
        assert int(m.group(1)) >= 50, m.string  # a commit a batch
        calls[wal] = float(m.group(2))
    assert calls["gathered"] <= 1.5 and calls["default"] >= 4 * calls["gathered"], calls


def test_wal_erase_crosses_erasing_checkpoints_in_both_trees() -> None:
    # the bench of a light load across erasing checkpoints: each run spans
    # some, every put is counted, and two trees alternate (the fastroute
    # under test is both)
    proc = _bench("wal_erase.py", "--rounds", "1", "--rate", "100", "--erase-s", "0.5",
                  "--warmup", "1", "--seconds", "1.5", "--relay-path", _tree(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = re.findall(r"round 1 (this|other): writer ([\d.]+) us a put, p50 ([\d.]+) ms, "
                      r"p99 ([\d.]+) ms, p99.9 ([\d.]+) ms, (\d+) puts, ([\d.]+) commits a "
                      r"put, (\d+) erasing checkpoints, (\d+) the writer's own, WAL ([\d,]+) B",
                      proc.stdout)
    assert sorted(r[0] for r in runs) == ["other", "this"], proc.stdout
    for _, cpu, p50, p99, p999, puts, commits, checkpoints, _own, _wal in runs:
        assert float(cpu) > 0 and 0 < float(p50) <= float(p99) <= float(p999), proc.stdout
        assert 120 <= int(puts) <= 151 and int(checkpoints) >= 1, proc.stdout
        # its ack rides the next put's commit (a put each 10 ms, held acks
        # wait 50): not two commits a put (fewer than one where the writer
        # was held up and puts shared a commit)
        assert 0 < float(commits) < 1.5, proc.stdout
    assert re.search(r"this / other: cpu_us x[\d.]+ \(rounds x[\d.]+\); p50_ms", proc.stdout)
