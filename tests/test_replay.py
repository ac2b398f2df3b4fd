"""Replay end to end: the whole CollegeMsg trace against a real relay on loopback.

The relay runs in this process's thread-free event loop in a child process
(``fastroute serve``), the load generator in its own worker processes, as a
user would run them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastroute.identity import Registry
from fastroute.loadtest.trace import TraceRecord, write_trace

from cliutil import ENV

# Committed with the tests (tests/data/README.md: source, licence).
COLLEGE = Path(__file__).resolve().parent / "data" / "CollegeMsg.txt"


@pytest.fixture
def relay_proc(tmp_path):
    """``fastroute serve`` on a free loopback port, stopped with SIGTERM afterwards."""
    data = tmp_path / "relay"
    # every user of a replayed trace is brand new to this relay and writes to
    # strangers at 2,000,000x speed: the new-sender rule is off for load tests
    (tmp_path / "fastroute.toml").write_text("[limits]\nnew_sender_age_s = 0.0\n")
    proc = subprocess.Popen([sys.executable, "-m", "fastroute.cli", "serve", "--data-dir",
                             str(data), "--listen", "127.0.0.1:0", "--admin-socket"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=ENV)
    port = None
    deadline = time.monotonic() + 20
    lines = []
    while port is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "listening on" in line and not line.startswith("20"):
            port = int(line.rsplit(":", 1)[1])
    assert port, "".join(lines)
    yield data, port, lines
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out
    assert "shutting down" in out


def replay(args, timeout=240):
    # cwd outside the checkout: the installed package is the one under test
    return subprocess.run([sys.executable, "-m", "fastroute.cli", "replay", *args],
                          capture_output=True, text=True, timeout=timeout, cwd="/", env=ENV)


def test_collegemsg_replayed_with_nothing_lost_or_duplicated(relay_proc, tmp_path):
    assert COLLEGE.is_file(), f"trace not found at {COLLEGE}"
    data, port, lines = relay_proc
    assert any("fingerprint" in ln for ln in lines)
    # 194 days at 2,000,000x is about 8.4 s of schedule: paced, open loop
    res = replay([str(COLLEGE), "--target", f"127.0.0.1:{port}", "--data-dir", str(data),
                  "--speed", "2000000", "--processes", "2", "--report", str(tmp_path / "rep"),
                  "--no-progress"])
    assert res.returncode == 0, res.stdout + res.stderr
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["scheduled"] == rep["sent"] == rep["acked"] == 59835
    assert rep["delivered"] == 59835
    assert rep["lost"] == 0 and rep["duplicates"] == 0
    assert (tmp_path / "rep" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["latency_ms"]["p99"] is not None
    assert rep["meta"]["processes"] == 2
    # the throwaway provider was removed from the relay's registry
    assert "removed the test provider replay-" in res.stdout
    with Registry(os.path.join(data, "registry.db")) as reg:
        assert [p.name for p in reg.list_providers()] == []


def test_replay_errors_are_one_line_each(tmp_path):
    """No relay at the target, the [replay] extra missing: a message, never a traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        res = replay([str(COLLEGE), "--target", f"127.0.0.1:{port}", "--data-dir",
                      str(tmp_path), "--no-progress"], timeout=60)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stderr.strip().startswith(f"fastroute: no relay answers at 127.0.0.1:{port}")
    assert len(res.stderr.strip().splitlines()) == 1
    # hdrh missing (as after a plain `pip install .`): the extra is named
    shim = tmp_path / "shim" / "hdrh"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'hdrh'\", name='hdrh')\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(shim.parent), ENV["PYTHONPATH"]]))
    res = subprocess.run([sys.executable, "-m", "fastroute.cli", "replay", str(COLLEGE)],
                         capture_output=True, text=True, timeout=60, cwd="/", env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "needs the [replay] extra (missing module hdrh)" in res.stderr
    assert "pip install 'fastroute[replay]'" in res.stderr


def test_small_trace_and_record_tap_round_trip(relay_proc, tmp_path):
    """Replay a tiny trace while `fastroute record` taps the relay: metadata only."""
    data, port, _ = relay_proc
    trace = tmp_path / "t.trace"
    recs = [TraceRecord(i * 1000, f"u{i % 3}", (f"u{(i + 1) % 3}",), 100 + i, "p")
            for i in range(30)]
    write_trace(trace, recs)
    out = tmp_path / "recorded.trace"
    rec = subprocess.Popen([sys.executable, "-m", "fastroute.cli", "record", "--data-dir",
                            str(data), "--out", str(out), "--duration", "20", "--count", "30"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=tmp_path, env=ENV)
    time.sleep(1.0)
    res = replay([str(trace), "--target", f"127.0.0.1:{port}", "--data-dir", str(data),
                  "--speed", "1", "--no-progress"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "lost 0" in res.stdout and "duplicates 0" in res.stdout
    rout, _ = rec.communicate(timeout=30)
    assert rec.returncode == 0, rout
    text = out.read_text()
    from fastroute.loadtest.trace import read_trace
    got = list(read_trace(out))
    assert len(got) == 30
    assert sorted(r.size for r in got) == sorted(r.size for r in recs)
    # pseudonyms, never the replayed addresses
    assert "@" not in text and "u0" not in text.split()
    assert len({r.sender for r in got}) == 3
