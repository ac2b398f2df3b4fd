"""Replay CollegeMsg against a local relay: sustained rate at max speed, then p99 at 50% of it.

    python benches/replay_collegemsg.py [--processes 2] [--store sqlite|memory]

Starts ``fastroute serve`` on a free loopback port with a temporary data
directory, runs ``fastroute replay`` as fast as possible, then again paced at
half the rate it achieved, prints both, and stops the relay.  Bounded: the
trace has 59,835 messages and every step has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import fastroute
except ImportError:  # a source checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fastroute

# the relay and replay subprocesses run the same fastroute as this script
ENV = dict(os.environ, PYTHONPATH=str(Path(fastroute.__file__).resolve().parents[1]))
# committed with the tests (tests/data/README.md: source and licence)
TRACE = Path(__file__).resolve().parents[1] / "tests" / "data" / "CollegeMsg.txt"


def start_relay(data: str, store: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-P", "-m", "fastroute.cli", "serve",
                             "--data-dir", data, "--listen", "127.0.0.1:0", "--store", store],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=data,
                            env=ENV)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("fastroute relay listening on"):
            return proc, int(line.rsplit(":", 1)[1])
    proc.kill()
    raise SystemExit("relay did not start")


def run_replay(port: int, data: str, speed: str, processes: int, out: str) -> dict:
    subprocess.run([sys.executable, "-P", "-m", "fastroute.cli", "replay", str(TRACE), "--target",
                    f"127.0.0.1:{port}", "--data-dir", data, "--speed", speed, "--processes",
                    str(processes), "--report", out, "--no-progress"],
                   check=False, timeout=600, cwd=data, capture_output=True, env=ENV)
    return json.loads(Path(out, "report.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--store", default="sqlite", choices=["sqlite", "memory"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "relay")
        os.makedirs(data)
        proc, port = start_relay(data, args.store)
        try:
            load0 = os.getloadavg()[0]
            fast = run_replay(port, data, "max", args.processes, os.path.join(tmp, "max"))
            n = fast["delivered"]
            # sustained = deliveries over the span in which they happened (the
            # send span alone flatters: open-loop sends only fill buffers)
            series = fast["throughput"]["delivered"]
            busy = [i for i, v in enumerate(series) if v]
            span = (busy[-1] - busy[0] + 1) * fast["throughput"]["interval_s"] if busy else 0
            rate = n / span if span else 0.0
            span_s = 194 * 86400  # CollegeMsg spans 194 days
            half = rate / 2
            speed = span_s / (fast["scheduled"] / half)
            paced = run_replay(port, data, f"{speed:.0f}", args.processes,
                               os.path.join(tmp, "half"))
        finally:
            proc.terminate()
            proc.wait(20)
    print(f"CollegeMsg replay, store={args.store}, {args.processes} load processes, "
          f"{os.cpu_count()} CPUs, loadavg {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"  as fast as possible: {rate:,.0f} msg/s sustained (deliveries over "
          f"{span:.0f} s), lost {fast['lost']}, duplicates "
          f"{fast['duplicates']}, p99 {fast['latency_ms']['p99']} ms")
    print(f"  paced at 50% ({speed:,.0f}x real time, ~{half:,.0f} msg/s offered): achieved "
          f"{paced['achieved_rate'] or 0:,.0f} msg/s, latency p50 "
          f"{paced['latency_ms']['p50']} ms p99 {paced['latency_ms']['p99']} ms p99.9 "
          f"{paced['latency_ms']['p99_9']} ms, lost {paced['lost']}, duplicates "
          f"{paced['duplicates']}, generator_bound {paced['generator_bound']}")
    return 0 if fast["ok"] and paced["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
