"""Helpers for tests that use the ``fastroute`` command as a user does: subprocesses."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fastroute

# Child processes import the same fastroute as this test (installed, or the
# source tree in a development checkout), whatever their working directory.
# PYTHONSAFEPATH keeps ``python -m`` (and its own children) from putting the
# working directory first on sys.path: run from a fresh clone, that directory
# holds the unbuilt source tree, which would shadow the installed package.
ENV = dict(os.environ, PYTHONSAFEPATH="1", PYTHONPATH=os.pathsep.join(
    [str(Path(fastroute.__file__).resolve().parents[1])] +
    [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
ENV.pop("FASTROUTE_DATA_DIR", None)


def fr(*args: str, cwd, env: dict | None = None, timeout: float = 60,
       ok: bool | None = None) -> subprocess.CompletedProcess:
    """Run ``fastroute ARGS`` in ``cwd``; never a traceback, whatever the outcome.

    ``ok=True`` asserts exit status 0, ``ok=False`` a non-zero one.
    """
    proc = subprocess.run([sys.executable, "-m", "fastroute.cli", *args], cwd=cwd,
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    if ok is True:
        assert proc.returncode == 0, proc.stderr
    elif ok is False:
        assert proc.returncode != 0, proc.stdout
    return proc


class Served:
    """A ``fastroute serve`` subprocess, with what it printed at start."""

    def __init__(self, cwd, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fastroute.cli", "serve", *args],
                                     cwd=cwd, env=env or ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.port = self.admin = self.server_key = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if m := re.match(r"fastroute relay listening on .*:(\d+)$", line.strip()):
                self.port = int(m.group(1))
            elif m := re.match(r"server public key \(for clients to pin\): ([0-9a-f]+)", line):
                self.server_key = m.group(1)
            elif m := re.match(r"admin listener \(read only\): (http://[^/]+)/metrics", line):
                self.admin = m.group(1)
            elif line.startswith("data directory:"):
                break
        assert self.port, "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop the relay; assert a clean exit; return the rest of its output."""
        self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert self.proc.returncode == 0, "".join(self.lines) + out
        assert "Traceback" not in out, out
        return out

    def kill(self) -> None:
        """Stop without checks (cleanup after a failed test)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def serve_data_dir(data, port: int = 0) -> tuple[subprocess.Popen, int]:
    """``fastroute serve --data-dir DATA`` on 127.0.0.1 (``port`` 0: a free one
    from :func:`listen_port`), for tests that SIGKILL it and start it again on
    the same port: the process and the port it listens on."""
    port = port or listen_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastroute.cli", "serve", "--data-dir",
                             str(data), "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**ENV, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "listening on" in line and not line.startswith("20"):
            # the pipe is not read from now on: the relay's output stays small
            return proc, int(line.rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("".join(lines))


def listen_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a relay
    that a test restarts on the same port: a port from the ephemeral range
    can be taken, while the relay is down, as the local port of a client's
    reconnect attempt, and the restart then fails to bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(100):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def thread_counter(tid: int, name: str, field: str) -> int:
    """The counter ``field`` of this process's thread ``tid`` in its
    ``/proc/self/task/TID/name`` (Linux): ``io``'s ``syscw`` (write calls),
    ``status``'s ``voluntary_ctxt_switches`` (sleeps it was woken from)."""
    with open(f"/proc/self/task/{tid}/{name}") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/task/{tid}/{name}")
