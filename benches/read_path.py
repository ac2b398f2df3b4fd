"""The relay's own work for one message per read, without the kernel in the figure.

A chat client sends one message and waits for its SACK; its recipient's
client acknowledges what it got.  Per message the relay then runs its whole
read path for a frame of one op: decrypt, decode, the gate, the store, the
route, and the writer's two flushes (the SACK to the sender, the DELIVER to the
recipient), each encrypted.  ``server_cpu.py --batch 1 --window 1`` measures
that over loopback TCP, where the system calls and the wake-ups of four
processes move the figure by a fifth from run to run; this bench measures the
relay's part alone, in one process: a relay and two clients connect over
loopback for real (handshakes, credentials), then the relay's two links get a
transport that keeps what is written, and the bench feeds the sender's link
frames sealed with the sender's own link keys, one message per read, letting
the loop run its callbacks between reads as it would (the scheduler's turn,
the writer).  Every ``--ack-every`` messages the recipient's link reads a DACK
of all it was sent.  ``--op dsend --devices N``: the per-device send of an
end-to-end encrypted client, a copy for each of the recipient's N devices (each
device's link DACKs); ``--op gsend --devices N``: a group message to a group of
the sender and the recipient, whose N devices each get it; ``--batch N``: N ops
a read instead of one (256 is what ``server_cpu.py`` sends); ``--full-window``:
the relay's dedup window full before the first read, as on a relay that has
run a while (every new id then evicts the oldest one: without it a run of a
few thousand messages measures a window that only grows, in the cache).

Figures are microseconds of the relay's work per message (wall time of one
process with nothing else to run; ``time.process_time`` agrees within a few
per cent); each run also prints the 99th percentile and the longest of its
reads' times (from a read to its writes: a stall of the loop, such as a page
fault the relay took itself, shows there).  ``--relay-path OTHER_TREE`` runs
that checkout's relay the same way in turns with this one (each run a process
of its own), for a ratio measured under the same noise::

    PYTHONPATH=. python benches/read_path.py --runs 6 --relay-path ../baseline

``--instructions`` runs each measured run under valgrind's callgrind
(Debian's ``valgrind``), instrumented only while the reads are fed, and
reports instructions a message instead of time: slower by ~50x, but the same
count run after run whatever else the machine does (the kernel's work, such
as page faults, is not counted).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency
    uvloop = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from server_cpu import _UNBOUND_LIMITS  # noqa: E402

# the group limits lifted too, for --op gsend (trees before groups lack them)
_GROUP_LIMITS = {"group_msgs_per_s": 1e7, "group_msgs_burst": 1e7,
                 "group_msgs_per_group_s": 1e7, "group_msgs_per_group_burst": 1e7}

from fastroute import Client, Relay, RelayConfig, wire  # noqa: E402
from fastroute.config import Limits  # noqa: E402
from fastroute.identity import ProviderKey, Registry, issue_credential  # noqa: E402
from fastroute.noise import KeyPair, seal_frames  # noqa: E402


class _Kept:
    """A transport that keeps the byte count of what the relay writes."""

    def __init__(self, real: asyncio.Transport) -> None:
        self.real = real
        self.written = 0
        self.writes = 0

    def writelines(self, bufs: list) -> None:
        self.writes += 1
        self.written += sum(len(b) for b in bufs)

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def _sealed(client: Client, ops: list[bytes]) -> bytes:
    """``ops`` as the bytes ``client`` would put on its link (its keys, its nonces)."""
    return b"".join(seal_frames(client._tx, wire.pack_frames(ops)))


def _callgrind(state: str) -> None:
    """Switch callgrind's instrumentation of this process on or off."""
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], check=True,
                   stdout=subprocess.DEVNULL)


async def _measure(op: str, devices: int, messages: int, ack_every: int, ephemeral: bool,
                   store: str, batch: int = 1, counting: bool = False,
                   full_window: bool = False) -> dict:
    known = getattr(Limits, "__dataclass_fields__", {})
    # every rate limit lifted, and the sender an established one: most
    # messages a relay carries are not from addresses created this week
    # (a young sender's screen is the gate bench's to measure)
    limits = Limits(**{k: v for k, v in dict(_UNBOUND_LIMITS, new_sender_age_s=0.0).items()
                       if k in known})
    features = {"dsend": ("e2ee",), "gsend": ("e2ee", "groups")}.get(op, ())
    with tempfile.TemporaryDirectory() as data:
        pkey = ProviderKey.generate()
        with Registry(os.path.join(data, "registry.db")) as reg:
            reg.add_provider("home", pkey.public_key)
        group_limits = {k: v for k, v in _GROUP_LIMITS.items()
                        if k in getattr(RelayConfig, "__dataclass_fields__", {})}
        relay = Relay(RelayConfig(port=0, data_dir=data, store=store, require_consent=False,
                                  limits=limits, prekey_fetch_burst=1e6, **group_limits))
        await relay.start()
        try:
            async def connect(address: str, device: str) -> Client:
                kp = KeyPair.generate()
                cred = issue_credential(pkey, "home", address, device, kp.public)
                client = await Client.connect("127.0.0.1", relay.port, credential=cred,
                                              static=kp, keepalive=None, features=features)
                if features:
                    # registration ids as clients pick them (random, 14 bits),
                    # not the small ints Python caches
                    await client.publish_keys(
                        secrets.randbelow(0x3F00) + 0x100, os.urandom(33),
                        (1, os.urandom(33), os.urandom(64)),
                        (2, os.urandom(1569), os.urandom(64)))
                return client

            alice = await connect("alice@home", "phone")
            bobs = [await connect("bob@home", f"d{i}") for i in range(devices)]
            body = os.urandom(100)
            # a first message to every device (and its DACK, which the clients
            # send on their own): the seqs the bench's DACKs follow
            if op == "dsend":
                listed = await alice.devices("bob@home")
                entries = [(d, r, body) for d, r in listed]
                await alice.send_to_devices_nowait("bob@home", entries)[1]
            elif op == "gsend":
                gid = await alice.create_group()
                await alice.group_add(gid, "bob@home")
                version = (await alice.group_members(gid))[0]
                await alice.group_send(gid, version, b"hello")
            else:
                await alice.send("bob@home", b"hello")
            seq0 = []
            for b in bobs:
                got = await b.recv()
                while op == "gsend" and type(got).__name__ != "GroupMessage":
                    got = await b.recv()  # the group's events come first
                seq0.append(got.seq)
            deadline = time.monotonic() + 10
            while relay.delivery.delivered < devices:
                if time.monotonic() > deadline:
                    raise SystemExit("the first message was never acknowledged")
                await asyncio.sleep(0.01)
            # the group's events are acknowledged on their own time (slowly
            # under valgrind): the count must be still before it is the base
            still = 0
            while op == "gsend" and still < 5 and time.monotonic() < deadline:
                before = relay.delivery.delivered
                await asyncio.sleep(0.05)
                still = still + 1 if relay.delivery.delivered == before else 0
            if full_window:
                # the window the op's ids go to, filled to its bound with
                # another sender's decided ids (stamped now: none expires)
                table = {"dsend": relay.keys.dedup,
                         "gsend": relay.groups.dedup}.get(op, relay.gate.dedup)
                now = time.monotonic()
                begin = table.begin
                for k in range(table.max_entries - len(table)):
                    begin("filler@home", k.to_bytes(16, "big"), 0, now)
            a_link = next(ln for ln in relay.links if ln.address == "alice@home")
            b_links = {ln.cred.device: ln for ln in relay.links
                       if ln.address == "bob@home"}
            a_out = _Kept(a_link.transport)
            a_link.transport = a_out
            b_outs = []
            for i in range(devices):
                link = b_links[f"d{i}"]
                b_outs.append(_Kept(link.transport))
                link.transport = b_outs[-1]
            cls = wire.CLS_EPHEMERAL if ephemeral else wire.CLS_PERSISTENT
            # the frames are made before the clock starts: the client's work is not timed
            if op == "dsend":
                ops = [wire.dsend_op(os.urandom(16), "bob@home", False, entries, [])
                       for _ in range(messages)]
            elif op == "gsend":
                ops = [wire.gsend_op(os.urandom(16), gid, version, body)
                       for _ in range(messages)]
            else:
                ops = [wire.send_op(os.urandom(16), "bob@home", body, cls)
                       for _ in range(messages)]
            # ``batch`` ops a read (in as few frames as they fit)
            reads = [_sealed(alice, ops[k:k + batch]) for k in range(0, messages, batch)]
            delivered0 = relay.delivery.delivered
            # after the read that passes each ack_every-th message, each
            # device's DACK of all it was sent
            acks: dict[int, list] = {}
            for r in range(1, len(reads) + 1):
                sent = min(r * batch, messages)
                if sent // ack_every > (r - 1) * batch // ack_every:
                    acks[r] = [(b_links[f"d{k}"].data_received,
                                _sealed(b, [wire.dack_op(seq0[k] + sent)]))
                               for k, b in enumerate(bobs)]
            feed_a = a_link.data_received
            pause = asyncio.sleep
            # as ``fastroute serve`` runs it: start-up's objects frozen out of
            # the collector's scans, the young generation collected rarely
            gc.collect()
            gc.freeze()
            await pause(0)
            if counting:
                _callgrind("on")
            clock = time.perf_counter
            spans = []  # each read's time to its last write: the loop's stalls show here
            t0 = clock()
            c0 = time.process_time()
            for i, data_in in enumerate(reads, 1):
                r0 = clock()
                feed_a(data_in)
                await pause(0)  # the turn and the writer run, as after a real read
                while a_link.backlog is not None or a_link.partial is not None:
                    await pause(0)  # a read of many ops may take several turns
                spans.append(clock() - r0)
                ack = acks.get(i)
                if ack is not None:
                    # a DACK follows its DELIVER: a per-device send's may go out a
                    # loop iteration after its read (stored at the end of the turn)
                    await pause(0)
                    for feed_b, dack in ack:
                        feed_b(dack)
                    await pause(0)
            wall = clock() - t0
            cpu = time.process_time() - c0
            if counting:
                _callgrind("off")
            await asyncio.sleep(0.05)
            result = {
                "us_per_msg": wall / messages * 1e6,
                "cpu_us_per_msg": cpu / messages * 1e6,
                "sender_writes": a_out.writes,
                "recipient_writes": sum(o.writes for o in b_outs),
                "answered_bytes": a_out.written,
                "delivered_bytes": sum(o.written for o in b_outs),
                "acked": relay.delivery.delivered - delivered0,
                "refused": sum(relay.refused.values()),
                "refusals": {str(k): v for k, v in relay.refused.items() if v},
                "read_p99_us": sorted(spans)[int(len(spans) * 0.99)] * 1e6,
                "read_max_us": max(spans) * 1e6,
            }
            a_link.transport = a_out.real
            for i, o in enumerate(b_outs):
                b_links[f"d{i}"].transport = o.real
            return result
        finally:
            await relay.close()


def _child(args: argparse.Namespace) -> None:
    gc.set_threshold(50_000, 20, 100)  # fastroute serve's setting (relay/server.py)
    run = uvloop.run if uvloop is not None else asyncio.run
    out = run(_measure(args.op, args.devices, args.messages, args.ack_every, args.ephemeral,
                       args.store, args.batch, args.instructions, args.full_window))
    print(json.dumps(out))


def _spawn(tree: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    script = os.path.abspath(__file__)
    if tree:
        # that checkout's relay, driven by this bench (the same harness for both)
        env["PYTHONPATH"] = os.path.abspath(tree)
    cmd = [sys.executable, "-P", script, "--child", "--messages", str(args.messages),
           "--ack-every", str(args.ack_every), "--store", args.store, "--op", args.op,
           "--devices", str(args.devices), "--batch", str(args.batch)]
    if args.ephemeral:
        cmd.append("--ephemeral")
    if args.full_window:
        cmd.append("--full-window")
    with tempfile.TemporaryDirectory() as tmp:
        counts = os.path.join(tmp, "callgrind.out")
        if args.instructions:
            cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                   f"--callgrind-out-file={counts}", *cmd, "--instructions"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"run failed ({tree or 'this tree'}):\n{done.stderr[-2000:]}")
        got = json.loads(done.stdout.strip().splitlines()[-1])
        if args.instructions:
            with open(counts) as fh:
                total = next(int(line.split()[1]) for line in fh
                             if line.startswith("totals:"))
            # reported in the figure's place: instructions a message
            got["us_per_msg"] = total / args.messages
            got["mem_per_msg"] = _libc_mem(counts) / args.messages
    return got


def _libc_mem(counts: str) -> int:
    """Instructions the run spent in libc's memcpy/memmove/memset.

    Reported apart because callgrind counts a ``rep movsb``/``rep stosb``
    (what glibc uses for large copies and fills) once per iteration: one
    copy of a 38 KB frame counts like ~38,000 instructions, though the CPU
    moves it in a few hundred cycles, so a change that copies the same bytes
    in fewer, larger pieces looks dearer than it is.
    """
    listing = subprocess.run(["callgrind_annotate", "--threshold=100", counts],
                             capture_output=True, text=True, check=True).stdout
    total = 0
    for line in listing.splitlines():
        if re.search(r"/(memset|memmove)-vec-unaligned-erms\.S:", line):
            total += int(line.split()[0].replace(",", ""))
    return total


def main() -> None:
    """Run the bench (or, with ``--child``, one measured run) and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=8000)
    ap.add_argument("--ack-every", type=int, default=8,
                    help="the recipient's link reads a DACK every N messages")
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--op", default="send", choices=("send", "dsend", "gsend"),
                    help="SEND (one body for every device of the recipient), DSEND "
                         "(a ciphertext per device: what an end-to-end encrypted client "
                         "sends) or GSEND (one sender-key ciphertext to a group whose "
                         "member devices are the recipient's)")
    ap.add_argument("--devices", type=int, default=1, help="the recipient's devices")
    ap.add_argument("--batch", type=int, default=1,
                    help="ops a read (1: a chat client's; 256: server_cpu.py's batches)")
    ap.add_argument("--ephemeral", action="store_true", help="signals (cls 1), not stored")
    ap.add_argument("--full-window", action="store_true",
                    help="the relay's dedup window full before the first read (each new id "
                         "evicts the oldest, as on a relay that has run a while)")
    # the memory store only: the SQLite store answers from its writer thread,
    # a loop iteration or a commit later, which a bench that feeds the next
    # read after one iteration would not wait for (and its figure would be
    # the thread's, not the read path's: server_cpu.py measures that store)
    ap.add_argument("--store", default="memory", choices=("memory",))
    ap.add_argument("--relay-path", default="",
                    help="a checkout whose relay to run in turns with this one's")
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions a message under callgrind instead of timing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # whole rounds of DACKs: the last one acknowledges the last message
    args.messages -= args.messages % args.ack_every
    if args.child:
        _child(args)
        return
    unit = "instructions" if args.instructions else "us"
    trees = [("this tree", "")] + ([("baseline", args.relay_path)] if args.relay_path else [])
    figures: dict[str, list[float]] = {name: [] for name, _ in trees}
    # with --instructions: the same without libc's mem* (see _libc_mem)
    others: dict[str, list[float]] = {name: [] for name, _ in trees}
    for r in range(args.runs):
        # alternated (ABBA): a drift of the machine's speed hits both alike
        order = trees if r % 2 == 0 else trees[::-1]
        for name, tree in order:
            got = _spawn(tree, args)
            if got["acked"] != args.messages * args.devices or got["refused"]:
                raise SystemExit(f"{name}: {got['acked']} of {args.messages * args.devices} "
                                 f"copies acked, "
                                 f"{got['refused']} refused: the run did not deliver")
            figures[name].append(got["us_per_msg"])
            mem = ""
            if args.instructions:
                others[name].append(got["us_per_msg"] - got["mem_per_msg"])
                mem = f", {got['mem_per_msg']:.0f} of them in libc mem*"
            print(f"run {r + 1} {name:9s} {got['us_per_msg']:7.2f} {unit} a message{mem} "
                  f"(cpu {got['cpu_us_per_msg']:.2f}; writes {got['sender_writes']} to the "
                  f"sender, {got['recipient_writes']} to the recipient; a read's time "
                  f"p99 {got['read_p99_us']:.0f} us, max {got['read_max_us']:.0f})", flush=True)
    kind = "ephemeral" if args.ephemeral else f"{args.store} store"
    if args.full_window:
        kind += ", dedup window full"
    print(f"\n{args.batch} {args.op.upper()} a read to {args.devices} device(s), {kind}, "
          f"{args.messages} messages, DACK every {args.ack_every}:")
    for name, values in figures.items():
        print(f"  {name:9s} median {statistics.median(values):7.2f} {unit} a message, "
              f"least {min(values):.2f} (runs: {', '.join(f'{v:.2f}' for v in values)})")
    if args.relay_path:
        # the least too: on a shared machine a run is only ever slowed down
        ratios = [f(figures["this tree"]) / f(figures["baseline"])
                  for f in (statistics.median, min)]
        # and round by round: the two runs of a round ran back to back, under
        # the same phase of the host's load
        paired = statistics.median(m / b for m, b in zip(figures["this tree"],
                                                         figures["baseline"]))
        print(f"  this tree / baseline: {ratios[0]:.3f} (medians), {ratios[1]:.3f} (least), "
              f"{paired:.3f} (median of the rounds' ratios)")
        if args.instructions:
            rest = statistics.median(others["this tree"]) / statistics.median(others["baseline"])
            print(f"  without libc mem* (callgrind counts its rep-string copies by the "
                  f"byte): {statistics.median(others['this tree']):.2f} against "
                  f"{statistics.median(others['baseline']):.2f}, {rest:.3f}")


if __name__ == "__main__":
    main()
