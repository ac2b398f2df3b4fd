"""The integrity gate's new layers: their cost, and what they buy under a flood.

Two measurements, each against a baseline run beside it in the same invocation:

``cost``  (default)
    Throughput and the relay's own CPU per delivered message (utime + stime
    of ``/proc/<pid>/stat``, all threads) with the new layers **on** (this
    tree) and **off** (the same relay before them: the tree of ``--base``,
    default the commit this work started from, exported with ``git archive``
    and built in a cache directory).  Runs alternate off/on ``--repeat``
    times; the medians are compared.  Same client (this tree), same load:
    ``--pairs`` 1:1 pairs, ``--messages`` 100-byte messages in all, a window
    of ``--window`` unacked sends per sender, memory store, limits raised so
    that nothing is refused in either tree.

``flood``
    Latency of a quiet pair (one message at a time, send to receipt) on one
    relay (this tree, default limits), first alone, then while a flooding
    provider runs in another process (``--flooders`` devices sending PINGs,
    SENDs to unknown addresses, CONSENTs and SENDs within their limits, one
    of them never reading), the two alternated ``--rounds`` times.  p50/p99
    of each side's pooled latencies, and their ratio.

Usage::

    python benches/gate_layers.py cost [--messages 200000] [--repeat 3]
    python benches/gate_layers.py cost --base COMMIT --base-has-layers   # two later trees
    python benches/gate_layers.py flood [--quiet-messages 1000] [--flooders 8]

Figures, with the machine's load, go in ``benches/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout's fastroute when its core is built in place (development),
# else the installed one: a clone's source tree has no compiled core
if glob.glob(os.path.join(HERE, "fastroute", "_core*.so")):
    sys.path.insert(0, HERE)

import fastroute  # noqa: E402
from fastroute import Client, wire  # noqa: E402
from fastroute.identity import ProviderKey, Registry, issue_credential  # noqa: E402
from fastroute.noise import KeyPair  # noqa: E402

#: the tree whose fastroute the relays under test run ("layers on")
THIS = os.path.dirname(os.path.dirname(os.path.abspath(fastroute.__file__)))

DEFAULT_BASE = "f170cd6"
RELAY_MAIN = """\
import ctypes, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # die with the bench
except Exception:
    pass
sys.path.insert(0, sys.argv.pop(1))
from fastroute.cli import main
sys.exit(main(sys.argv[1:]))
"""
COMMON_TOML = """\
[relay]
registry_poll_s = 5.0
[limits]
msgs_per_s = 10000000.0
msgs_burst = 10000000.0
bytes_per_s = 10000000000
bytes_burst = 10000000000
"""
# the new layers stay on, with limits nothing in this load reaches
LAYERS_TOML = """\
ops_per_s = 10000000.0
ops_burst = 10000000.0
address_msgs_per_s = 10000000.0
address_msgs_burst = 10000000.0
address_bytes_per_s = 10000000000
address_bytes_burst = 10000000000
"""


def proc_ticks(pid: int) -> int:
    """utime + stime of the whole process (every thread), in clock ticks."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def pct(vals: list[float], q: float) -> float:
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(q * len(vals)))]


def base_tree(ref: str) -> str:
    """The tree of ``ref``, exported and built once (cached by commit)."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=HERE, capture_output=True,
                            text=True, check=True).stdout.strip()
    path = os.path.join(tempfile.gettempdir(), f"fastroute-base-{commit[:12]}")
    if not os.path.exists(os.path.join(path, ".built")):
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        archive = subprocess.run(["git", "archive", commit], cwd=HERE, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
        print(f"building the baseline tree {commit[:12]} in {path} ...", flush=True)
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path,
                       check=True, capture_output=True)
        open(os.path.join(path, ".built"), "w").close()
    return path


class Relay:
    """``fastroute serve`` from ``tree`` in a subprocess, provider ``home`` enrolled."""

    def __init__(self, tree: str, toml: str) -> None:
        self.tree = tree
        self.dir = tempfile.mkdtemp(prefix="fr-gate-")
        self.key = ProviderKey.generate()
        self.acme = ProviderKey.generate()
        with Registry(os.path.join(self.dir, "registry.db")) as reg:
            reg.add_provider("home", self.key.public_key)
            reg.add_provider("acme", self.acme.public_key)
        self.acme.save(os.path.join(self.dir, "acme.key"))
        cfg = os.path.join(self.dir, "bench.toml")
        with open(cfg, "w") as fh:
            fh.write(toml)
        self.log = os.path.join(self.dir, "relay.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", RELAY_MAIN, tree, "serve", "--data-dir", self.dir,
                 "--config", cfg, "--listen", "127.0.0.1:0", "--store", "memory"],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                cwd=self.dir)
        deadline = time.monotonic() + 20
        self.port = 0
        self.admin = ""
        while not self.admin and time.monotonic() < deadline and self.proc.poll() is None:
            with open(self.log) as fh:
                for line in fh:
                    if line.startswith("fastroute relay listening on"):
                        self.port = int(line.strip().rsplit(":", 1)[1])
                    elif line.startswith("admin listener (read only): "):
                        self.admin = line.split()[4].rsplit("/", 1)[0]
                    elif line.startswith("admin listener: off"):
                        self.admin = "off"
            time.sleep(0.05)
        if not self.port:
            with open(self.log) as fh:
                out = fh.read()
            self.stop()
            raise RuntimeError(f"relay did not start: {out}")

    async def connect(self, address: str, device: str = "d0") -> Client:
        kp = KeyPair.generate()
        cred = issue_credential(self.key, "home", address, device, kp.public, ttl_s=3600)
        return await Client.connect("127.0.0.1", self.port, credential=cred, static=kp,
                                    keepalive=None)

    def turn_buckets(self) -> dict[str, float]:
        """The relay's ``fastroute_loop_turn_duration_seconds`` buckets now
        (cumulative counts by upper bound; empty for a relay without them)."""
        if not self.admin.startswith("http"):
            return {}
        import urllib.request

        with urllib.request.urlopen(self.admin + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("fastroute_loop_turn_duration_seconds_bucket"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[le] = float(line.rsplit(" ", 1)[1])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------- cost
async def load(relay: Relay, pairs: int, n: int, window: int) -> tuple[float, float]:
    """``n`` messages over ``pairs`` 1:1 pairs; returns (msg/s, relay CPU us per message)."""
    txs, rxs = [], []
    for i in range(pairs):
        rxs.append(await relay.connect(f"r{i}@home"))
        txs.append(await relay.connect(f"s{i}@home"))
    body = os.urandom(100)
    per = n // pairs

    async def send(tx: Client, to: str) -> None:
        sent = 0
        inflight: list = []
        while sent < per:
            k = min(100, per - sent)
            inflight.append(tx.send_many(to, [body] * k))
            sent += k
            if len(inflight) * 100 >= window:
                await inflight.pop(0)
        await asyncio.gather(*inflight)

    async def recv(rx: Client) -> None:
        got = 0
        while got < per:
            got += len(await rx.recv_many(per - got))

    ticks0 = proc_ticks(relay.proc.pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(send(tx, f"r{i}@home") for i, tx in enumerate(txs)),
                         *(recv(rx) for rx in rxs))
    elapsed = time.perf_counter() - t0
    ticks = proc_ticks(relay.proc.pid) - ticks0
    for c in txs + rxs:
        await c.close()
    total = per * pairs
    return total / elapsed, ticks / os.sysconf("SC_CLK_TCK") / total * 1e6


async def cost(args) -> None:
    base = base_tree(args.base)
    runs: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    print(f"loadavg before: {loadavg()}")
    for r in range(args.repeat):
        # a base that has the layers too must have them lifted the same way
        base_toml = COMMON_TOML + (LAYERS_TOML if args.base_has_layers else "")
        for name, tree, toml in (("off", base, base_toml),
                                 ("on", THIS, COMMON_TOML + LAYERS_TOML)):
            relay = Relay(tree, toml)
            try:
                rate, cpu = await load(relay, args.pairs, args.messages, args.window)
            finally:
                relay.stop()
            runs[name].append((rate, cpu))
            print(f"  run {r + 1} layers {name:3}: {rate:9.0f} msg/s, "
                  f"relay CPU {cpu:6.2f} us/msg", flush=True)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for k, v in runs.items()}
    spread = {k: (max(x[1] for x in v) - min(x[1] for x in v)) / med[k][1] * 100
              for k, v in runs.items()}
    print(f"loadavg after: {loadavg()}")
    print(f"median layers off: {med['off'][0]:.0f} msg/s, {med['off'][1]:.2f} us CPU/msg "
          f"(spread {spread['off']:.0f}%)")
    print(f"median layers on:  {med['on'][0]:.0f} msg/s, {med['on'][1]:.2f} us CPU/msg "
          f"(spread {spread['on']:.0f}%)")
    print(f"cost of the layers: CPU/msg {100 * (med['on'][1] / med['off'][1] - 1):+.1f}%, "
          f"throughput {100 * (med['on'][0] / med['off'][0] - 1):+.1f}%")


# --------------------------------------------------------------------- flood
def _add_buckets(total: dict[str, float], before: dict[str, float],
                 after: dict[str, float]) -> dict[str, float]:
    """``total`` plus the turn-length buckets counted between two scrapes."""
    return {le: total.get(le, 0.0) + after[le] - before.get(le, 0.0) for le in after}


def turns_p99(before: dict[str, float], after: dict[str, float]) -> str:
    """The upper bound of the bucket holding the 99th percentile of the relay's
    turn lengths between two scrapes, and how many turns there were."""
    if not after:
        return "n/a (no turn metric in this relay)"
    diff = [(float(le), after[le] - before.get(le, 0.0)) for le in after]
    diff.sort()
    total = diff[-1][1]
    if not total:
        return "no turns (nothing waited)"
    for le, n in diff:
        if n >= 0.99 * total:
            bound = "> 100 ms" if le == float("inf") else f"<= {le * 1e3:g} ms"
            return f"p99 {bound} of {total:.0f} turns"
    return "?"  # pragma: no cover - the +Inf bucket holds every turn


async def quiet_pair(relay: Relay, n: int) -> list[float]:
    t0 = time.perf_counter()
    alice = await relay.connect("alice@home")
    bob = await relay.connect("bob@home")
    print(f"  the quiet pair connected in {(time.perf_counter() - t0) * 1e3:.1f} ms")
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        alice.send_nowait("bob@home", b"q%d" % i)
        await bob.recv()
        lat.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    await alice.close()
    await bob.close()
    print(f"  {n} messages took {sum(lat) / 1e3:.2f} s; closing {time.perf_counter() - t0:.2f} s")
    return lat


async def flooder(port: int, key_path: str, n: int, seconds: float) -> None:
    """Worker: ``n`` acme devices flooding for ``seconds`` (one never reads)."""
    key = ProviderKey.load(key_path)
    clients = []
    for i in range(n):
        kp = KeyPair.generate()
        cred = issue_credential(key, "acme", f"f{i}@acme", "d0", kp.public, ttl_s=3600)
        clients.append(await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                            keepalive=None))
    clients[-1]._proto.transport.pause_reading()
    pings = [wire.ping_op(1 << 62)] * 2000
    unknown = [wire.send_op(os.urandom(16), f"nobody{i}@home", b"x", 0) for i in range(500)]
    consents = [wire.consent_op(os.urandom(16), "home", True) for _ in range(500)]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for c in clients:
            if c._proto is None or c._proto.transport.is_closing():
                continue
            if c._proto.transport.get_write_buffer_size() > 1 << 20:
                continue  # the relay stopped reading it: packing more only burns this CPU
            c.send_many("f0@acme", [b"ok"] * 20).add_done_callback(lambda f: f.exception())
            c._write(pings)
            c._write(unknown)
            c._write(consents)
        await asyncio.sleep(0.005)


async def flood(args) -> None:
    toml = "[relay]\nregistry_poll_s = 0.5\n"
    if args.turn_ops or args.turn_ms:
        toml += "[limits]\n"
    if args.turn_ops:
        toml += f"max_relay_ops_per_turn = {args.turn_ops}\n"
    if args.turn_ms:
        toml += f"max_turn_ms = {args.turn_ms}\n"
    relay = Relay(base_tree(args.base) if args.base else THIS, toml)
    if args.pin:
        # the relay alone on CPU 0; the quiet pair and the flooding clients on
        # CPU 1, the flooder niced so that it does not delay the quiet pair's
        # wake-ups there (on a real deployment the clients are not on the
        # relay's machine at all)
        os.sched_setaffinity(relay.proc.pid, {0})
        os.sched_setaffinity(0, {1})
    if args.provider_ops:
        # the operator's provider-wide budget for the flooding provider
        with Registry(os.path.join(relay.dir, "registry.db")) as reg:
            reg.add_provider("acme", relay.acme.public_key, provider_ops_per_s=args.provider_ops)
        await asyncio.sleep(0.7)  # the relay polls the registry every 0.5 s
    try:
        print(f"loadavg before: {loadavg()}")
        quiet: list[float] = []
        flooded: list[float] = []
        # quiet and flooded runs alternate: a burst of the host's own noise
        # (this bench runs on shared machines) falls on either, not on one
        b1: dict[str, float] = {}  # turn-length buckets of the quiet runs
        b3: dict[str, float] = {}  # ... of the flooded runs
        cpu = 0.0
        level = args.nice or (19 if args.pin else 0)
        nice = ["nice", "-n", str(level)] if level else []
        for r in range(args.rounds):
            before = relay.turn_buckets()
            quiet += await quiet_pair(relay, args.quiet_messages)
            b1 = _add_buckets(b1, before, relay.turn_buckets())
            t0 = time.monotonic()
            worker = await asyncio.create_subprocess_exec(
                *nice, sys.executable, os.path.abspath(__file__), "flooder", str(relay.port),
                os.path.join(relay.dir, "acme.key"), str(args.flooders), str(args.seconds))
            await asyncio.sleep(1.0)  # the flood is under way
            ticks0 = proc_ticks(relay.proc.pid)
            before = relay.turn_buckets()
            lat = await quiet_pair(relay, args.quiet_messages)
            flooded += lat
            b3 = _add_buckets(b3, before, relay.turn_buckets())
            print(f"round {r + 1}: flooded quiet run took {time.monotonic() - t0 - 1.0:.1f} s, "
                  f"its p99 {pct(lat, 0.99):.2f} ms")
            cpu += (proc_ticks(relay.proc.pid) - ticks0) / os.sysconf("SC_CLK_TCK")
            flood_ran = worker.returncode is None  # still flooding when the quiet run ended
            if flood_ran:
                worker.terminate()
            await worker.wait()
            if not flood_ran:
                print("warning: the flood ended before the quiet run did (raise --seconds)")
        print(f"loadavg after: {loadavg()}; relay CPU during the flooded runs: {cpu:.1f} s")
        for name, lat in (("quiet", quiet), ("flooded", flooded)):
            print(f"{name:8} p50 {pct(lat, 0.5):7.2f} ms  p99 {pct(lat, 0.99):7.2f} ms  "
                  f"max {max(lat):7.2f} ms")
        print(f"flooded/quiet: p50 {pct(flooded, 0.5) / pct(quiet, 0.5):.2f}x, "
              f"p99 {pct(flooded, 0.99) / pct(quiet, 0.99):.2f}x")
        print(f"relay's scheduler turns (fastroute_loop_turn_duration_seconds): quiet run "
              f"{turns_p99({}, b1)}; flooded runs {turns_p99({}, b3)}")
    finally:
        relay.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "flooder":
        import uvloop

        uvloop.run(flooder(int(argv[1]), argv[2], int(argv[3]), float(argv[4])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what")
    c = sub.add_parser("cost")
    c.add_argument("--base", default=DEFAULT_BASE)
    c.add_argument("--messages", type=int, default=200_000)
    c.add_argument("--pairs", type=int, default=4)
    c.add_argument("--window", type=int, default=2048)
    c.add_argument("--repeat", type=int, default=3)
    c.add_argument("--base-has-layers", action="store_true",
                   help="the base tree has the layers too (compare two later commits)")
    f = sub.add_parser("flood")
    f.add_argument("--quiet-messages", type=int, default=1000)
    f.add_argument("--rounds", type=int, default=3,
                   help="quiet and flooded runs alternated this many times; the "
                        "percentiles are of all of them pooled")
    f.add_argument("--flooders", type=int, default=8)
    f.add_argument("--seconds", type=float, default=60.0)
    f.add_argument("--provider-ops", type=int, default=10000,
                   help="provider_ops_per_s of the flooding provider in the registry "
                        "(0: none, only the per-device defaults)")
    f.add_argument("--turn-ops", type=int, default=0,
                   help="limits.max_relay_ops_per_turn of the relay (default: the default)")
    f.add_argument("--turn-ms", type=float, default=0.0,
                   help="limits.max_turn_ms of the relay (default: the default)")
    f.add_argument("--nice", type=int, default=0,
                   help="run the flooder process at this nice level (separates the relay's "
                        "scheduling from CPU contention on a small machine)")
    f.add_argument("--base", default="",
                   help="run the relay from this commit's tree (built once) instead of "
                        "this one's: the same flood against an earlier relay")
    f.add_argument("--pin", action="store_true",
                   help="the relay alone on CPU 0, the quiet pair and the flooding process "
                        "(at nice 19 unless --nice) on CPU 1, in both runs: the relay's "
                        "scheduling without the clients' CPU contention with it")
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(flood(args) if args.what == "flood" else cost(args if args.what else
                                                             p.parse_args(["cost"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
