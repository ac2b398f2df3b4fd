"""Group SEND fan-out (feature "groups") to 10, 100 and 1000 devices: end to end and relay CPU.

Run (bounded: fixed message counts and a timeout on every wait)::

    PYTHONPATH=. python benches/group_send.py [--runs R] [--store STORE[,STORE]] [--no-nats]
        [--fanout 10 100 1000] [--relay-path TREE] [--synchronous NORMAL|FULL] [--scale K]
        [--senders S] [--window W] [--data-dir DIR] [--full-window | --fill N]

For each fan-out N, three ways of getting one 100-byte body to N devices:

* ``gsend``: one GSEND to a group whose members have N devices besides the
  sending one (users of at most 100 devices each), stored once with a
  delivery record per device and fanned out by the engine as GDELIVER
  (sent a window at a time with ``Client.group_send_many``, one future per
  window as ``send_many`` for SEND; trees before it: ``group_send_nowait``,
  a future each, or a ``group_send`` coroutine each);
* ``send``: the baseline in the same script: today's v1 SEND to one address
  with N devices online (stored once with a record per device too, fanned
  out by the same engine);
* ``nats``: nats-server (core NATS, no JetStream) publishing to N
  subscriber connections on one subject, for comparison;
* ``js`` (only when asked for with ``--modes``): JetStream like the relay's
  store, a stream kept until every device's consumer acked each message
  (``e2ee_send.nats_run``): the like-for-like pair of a stored group message.

Each run starts a fresh server process and connects every device from this
process (one connection each).  After a warm-up, ``M`` messages are sent
with at most ``WINDOW`` in flight (``--window``, 64 by default: the shape
the bars were set on; fastroute: a window sent, then its answers awaited;
NATS: a flush every WINDOW publishes), and the run ends when every
device has every message.  With ``--senders S``, S senders send at once,
each to a group (an address for ``send``) of its own with N devices: a
relay's commits then hold the windows of several senders, as a relay
with traffic from many users does (one sender, the default, is the worst
case for a store's per-commit costs); the NATS modes are not run then.
The modes of a number of devices take turns, a
run of each a round, in reverse order every other round.  Reported per
case, as the median of ``--runs`` runs: deliveries per second end to end
(first send to last receipt) and the server process's CPU per delivery, all
threads (its CPU clock: threads that ended count too), read before the first
send and after the last receipt, and the part of it the relay's main thread
spent (its event loop; the rest is its helper threads', the SQLite store's
writer among them; ``-`` for nats-server).  The clients share the machine's
cores with the server: on 2 cores the clients, not the server, set the
end-to-end rate, so the CPU per delivery is the figure that speaks for the
server.  ``--store memory,sqlite``: each fastroute mode runs with both stores
in every round, and SQLite's CPU per delivery is printed over the memory
store's (the medians', and the rounds' own ratios, and from 5 rounds on
where the medians' ratio lies with the rounds resampled): the issue's bar
of SQLite at most twice the memory store, read in one command.  The first
and last lines say how the disk under the data directory synced, and
what filesystem it is (``server_cpu.disk_sync``), which the SQLite store's
figures move with.

A fresh relay's dedup window is empty: a run of fewer ids than it holds
(1,000,000 by default) never evicts one, and pays inside the measured
window for the memory the window takes as it fills (a one-off of the
relay's process, which on a host whose memory is not yet backed costs far
more than on one whose is: ``benches/README.md``, session 51).
``--full-window`` first sends that many through the relay, unmeasured, as
``server_cpu.py --full-window`` does: the first sender's, to a group (an
address for ``send``) of one device of its own, so the measured messages
meet the window of a relay that has run a while, where every new id evicts
the oldest; ``--fill N`` sends N instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2ee_send  # noqa: E402
from e2ee_send import start_relay as e2ee_start_relay  # noqa: E402
from server_cpu import disk_sync, find_nats_server, round_order  # noqa: E402

from fastroute import Client  # noqa: E402
from fastroute.identity import ProviderKey, Registry, issue_credential  # noqa: E402
from fastroute.noise import KeyPair  # noqa: E402

WINDOW = 64  # messages in flight
BODY = 100
#: messages per run for each fan-out (about 20-40 k deliveries each)
MESSAGES = {10: 2000, 100: 300, 1000: 40}
TIMEOUT = 60.0
#: the SQLite store's synchronous mode ("": the relay's default, FULL)
SYNCHRONOUS = ""


def start_relay(data: str, store: str) -> tuple[subprocess.Popen, int]:
    """The relay of :mod:`e2ee_send`, with the group limits lifted too."""
    return e2ee_start_relay(
        data, store,
        "group_msgs_per_s = 10000000.0\ngroup_msgs_burst = 10000000.0\n"
        "group_msgs_per_group_s = 10000000.0\ngroup_msgs_per_group_burst = 10000000.0\n"
        "group_changes_burst = 100000.0\nmailbox_capacity = 8192\n"
        + (f'synchronous = "{SYNCHRONOUS}"\n' if SYNCHRONOUS else ""),
        # the v1 baseline puts every device on one address
        "max_devices_per_address = 1000\n")


async def _receive(c: Client, want: int) -> int:
    """Receive until ``want`` messages came to ``c``; how many came."""
    got = 0
    while got < want:
        got += sum(1 for m in await asyncio.wait_for(c.recv_many(), TIMEOUT)
                   if type(m).__name__ in ("GroupMessage", "Message"))
    return got


async def _sender(mode: str, sender: Client, users: list[str], n_dev: int, body: bytes):
    """``send_all(count)`` for one sender: ``count`` messages a window at a
    time, to a new group of ``users`` (gsend: ``n_dev`` devices besides the
    sender's) or to ``users[0]`` (send)."""
    if mode != "gsend":
        async def send_all(count: int) -> None:
            for at in range(0, count, WINDOW):
                await sender.send_many(users[0], [body] * min(WINDOW, count - at))
        return send_all
    gid = await sender.create_group()
    for u in users:
        await sender.group_add(gid, u)
    version, members, _ = await sender.group_members(gid)
    assert sum(len(m[2]) for m in members) == n_dev + 1

    nowait = getattr(sender, "group_send_nowait", None)
    many = getattr(sender, "group_send_many", None)

    async def group_send_all(count: int) -> None:
        for at in range(0, count, WINDOW):
            k = min(WINDOW, count - at)
            if many is not None:
                outcomes = await many(gid, version, [body] * k)[1]
                assert outcomes == [None] * k, outcomes
            elif nowait is not None:
                await asyncio.gather(*(nowait(gid, version, body)[1] for _ in range(k)))
            else:  # trees before group_send_nowait: a coroutine each
                await asyncio.gather(*(sender.group_send(gid, version, body)
                                       for _ in range(k)))
    return group_send_all


async def fastroute_run(mode: str, n_dev: int, messages: int, store: str,
                        senders: int = 1, fill: int = 0) -> tuple[float, float, float]:
    """One run of ``mode`` on a fresh relay: ``senders`` senders at once, each
    to its own group (gsend) or address (send) of ``n_dev`` devices, each
    sending ``messages``; deliveries a second, and the relay's CPU and its
    loop's a delivery, in us.  ``fill``: ids sent first, unmeasured, by the
    first sender to a group (address) of one device of its own, so that they
    take ``fill`` places of the relay's dedup window for ``mode``."""
    with tempfile.TemporaryDirectory(dir=e2ee_send.DATA_DIR) as data:
        pkey = ProviderKey.generate()
        with Registry(os.path.join(data, "registry.db")) as reg:
            reg.add_provider("home", pkey.public_key)
        proc, port = start_relay(data, store)
        clients: list[Client] = []
        features = ("e2ee", "groups") if mode == "gsend" else ()
        try:
            async def connect(address: str, device: str) -> Client:
                kp = KeyPair.generate()
                cred = issue_credential(pkey, "home", address, device, kp.public)
                c = await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                         features=features, keepalive=None)
                clients.append(c)
                if mode == "gsend":
                    await c.publish_keys(1 + len(clients) % 16000, os.urandom(33),
                                         (1, os.urandom(33), os.urandom(64)),
                                         (2, os.urandom(1569), os.urandom(64)))
                return c

            body = os.urandom(BODY)
            devices: list[Client] = []
            sends = []
            for k in range(senders):
                # the first sender's names are those of a run of one sender
                tag = f"x{k}" if k else ""
                sender = await connect(f"s{tag}@home", "phone")
                users = ([f"u{i}{tag}@home" for i in range((n_dev + 99) // 100)]
                         if mode == "gsend" else [f"r{tag}@home"])
                for i in range(n_dev):
                    devices.append(await connect(users[i * len(users) // n_dev], f"d{i}"))
                sends.append(await _sender(mode, sender, users, n_dev, body))
                if fill and not k:
                    # its own group (address): none of the measured devices gets these
                    filler = await connect("f@home", "d0")
                    fill_all = await _sender(mode, sender, ["f@home"], 1, body)
            if fill:
                await e2ee_send.fill_first(mode, fill, fill_all(fill), _receive(filler, fill))

            async def send_all(count: int) -> None:
                await asyncio.gather(*(send(count) for send in sends))

            warm = max(5, messages // 10)
            await asyncio.gather(send_all(warm), *(_receive(c, warm) for c in devices))
            # the relay's CPU and its loop's, a delivery (the clients' is not reported here)
            copies = messages * n_dev * senders
            work = asyncio.gather(send_all(messages), *(_receive(c, messages) for c in devices))
            rate, cpu, _, loop = await e2ee_send.measured(proc.pid, copies, work)
            # the figures are a delivery's: every device got its messages, no more
            got = sum(work.result()[1:])
            if got != copies:
                raise RuntimeError(f"{got} deliveries, not {copies}")
            return rate, cpu, loop
        finally:
            for c in clients:
                await c.close()
            proc.terminate()
            proc.wait(20)


def main() -> None:
    global SYNCHRONOUS, WINDOW
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--store", type=e2ee_send.stores_arg, default=["sqlite"],
                    help=e2ee_send.STORE_HELP)
    ap.add_argument("--fanout", type=int, nargs="*", default=[10, 100, 1000])
    ap.add_argument("--no-nats", action="store_true")
    ap.add_argument("--relay-path", default="",
                    help="run the relay from this source tree (its PYTHONPATH), the "
                         "clients from this one: the relay's A/B with the same clients")
    ap.add_argument("--synchronous", choices=("NORMAL", "FULL"), default="",
                    help="the SQLite store's (the relay's default when not given: FULL)")
    ap.add_argument("--scale", type=int, default=1,
                    help="send K times the messages of a run (longer runs, less noise)")
    ap.add_argument("--senders", type=int, default=1,
                    help="senders at once, each to a group (or address) of its own "
                         "with the fan-out's devices (default 1: the worst case for a "
                         "store's per-commit costs); the NATS modes run one sender only, "
                         "and are left out when it is more")
    ap.add_argument("--window", type=int, default=WINDOW,
                    help=f"messages a sender has in flight, sent a window at a time "
                         f"(default {WINDOW}: the bars' shape; a larger one makes a "
                         f"commit hold more of one sender's messages)")
    ap.add_argument("--data-dir", default=None, help=e2ee_send.DATA_DIR_HELP)
    e2ee_send.fill_args(ap)
    ap.add_argument("--modes", nargs="*", choices=("send", "gsend", "nats", "js"),
                    help="run only these (default: send, gsend and nats, nats only when "
                         "found; js: JetStream like the relay's store, see "
                         "e2ee_send.nats_run); the ratios need send and gsend")
    args = ap.parse_args()
    if args.senders < 1:
        ap.error("--senders must be positive")
    if args.window < 1:
        ap.error("--window must be positive")
    fill = e2ee_send.fill_arg(ap, args)
    stores: list[str] = args.store
    if len(stores) > 1 and args.modes is not None and "js" in args.modes:
        ap.error("the js mode is JetStream like one store: give --store one store with it")
    e2ee_send.RELAY_PATH = args.relay_path
    e2ee_send.DATA_DIR = e2ee_send.data_dir_arg(ap, args.data_dir)
    SYNCHRONOUS = args.synchronous
    WINDOW = args.window
    for k in MESSAGES:
        MESSAGES[k] *= args.scale
    js = e2ee_send.js_like(stores[0], SYNCHRONOUS)
    run = uvloop.run if uvloop is not None else asyncio.run
    server = None if args.no_nats or args.senders > 1 else find_nats_server()
    print(f"store={','.join(stores)} synchronous={args.synchronous or 'default'} "
          f"jetstream={'/'.join(e2ee_send.JS_STORAGE[js])} "
          f"runs={args.runs} body={BODY} B window={WINDOW} senders={args.senders} "
          f"filled={fill} "
          f"data-dir={e2ee_send.DATA_DIR or tempfile.gettempdir()} "
          f"cores={os.cpu_count()} loadavg={open('/proc/loadavg').read().split()[:3]} "
          f"nats-server={server or ('not run' if args.senders > 1 else 'not found')}")
    print(f"at start: {disk_sync(e2ee_send.DATA_DIR)}", flush=True)
    width = 6 if len(stores) == 1 else 6 + max(map(len, stores))
    print(f"{'devices':>7} {'mode':>{width}} {'msgs':>7} {'deliveries/s':>13} "
          f"{'server us/deliv':>16} {'(min-max)':>14} {'loop us/deliv':>14}")
    results = {}
    by_round: dict[tuple[int, str], dict[str, list[dict]]] = {}
    for n in args.fanout:
        modes = ["send", "gsend"] + (["nats", "js"] if server else [])
        modes = [m for m in modes if m in (args.modes if args.modes is not None
                                           else ("send", "gsend", "nats"))]
        # a fastroute mode runs once a round with each store; nats-server's have none
        cases = [(m, st) for m in modes for st in (stores if m in ("send", "gsend") else ("",))]
        runs: dict[tuple[str, str], tuple[list, list, list]] = {c: ([], [], []) for c in cases}
        # interleaved, reversed every other round, as e2ee_send.py's
        for rnd in range(args.runs):
            for mode, store in round_order(cases, rnd):
                if mode in ("nats", "js"):
                    assert server is not None
                    try:
                        rate, cpu, _, loop = run(e2ee_send.nats_run(
                            n, MESSAGES.get(n, 100), server, window=WINDOW,
                            js=js if mode == "js" else ""))
                    except e2ee_send.NatsDropped as exc:
                        print(f"  (a {mode} run left out: {exc})", flush=True)
                        continue
                else:
                    rate, cpu, loop = run(fastroute_run(mode, n, MESSAGES.get(n, 100),
                                                        store, args.senders, fill))
                    by_round.setdefault((n, mode), {}).setdefault(store, []).append(
                        {"us_per_msg": cpu, "round": rnd})
                runs[(mode, store)][0].append(rate)
                runs[(mode, store)][1].append(cpu)
                runs[(mode, store)][2].append(loop)
        for mode, store in cases:
            rates, cpus, loops = runs[(mode, store)]
            label = f"{mode}:{store}" if store and len(stores) > 1 else mode
            if not rates:
                print(f"{n:>7} {label:>{width}} {'n/a: no complete run':>28}", flush=True)
                continue
            results[(n, mode, store)] = (statistics.median(rates), statistics.median(cpus))
            # nats-server's main thread is not where its work is done
            loop = "-" if mode in ("nats", "js") else f"{statistics.median(loops):.3f}"
            print(f"{n:>7} {label:>{width}} {MESSAGES.get(n, 100):>7} "
                  f"{statistics.median(rates):>13.0f} "
                  f"{statistics.median(cpus):>16.3f} {min(cpus):>6.3f}-{max(cpus):<6.3f} "
                  f"{loop:>14}", flush=True)
    print("\nratios against v1 send to the same number of devices (same script, same machine):")
    for n in args.fanout:
        for store in stores:
            if (n, "send", store) not in results or (n, "gsend", store) not in results:
                continue
            rs, cs = results[(n, "send", store)]
            rg, cg = results[(n, "gsend", store)]
            line = (f"  {n:>4} devices{f' ({store})' if len(stores) > 1 else ''}: "
                    f"gsend throughput x{rg / rs:.2f}, server CPU per delivery x{cg / cs:.2f}")
            if (n, "nats", "") in results:
                rn, cn = results[(n, "nats", "")]
                line += f"; nats-server CPU per delivery / gsend's x{cn / cg:.2f}"
            if (n, "js", "") in results:
                # like with like: a stored message kept until every device acks
                line += f"; JetStream's / gsend's x{results[(n, 'js', '')][1] / cg:.2f}"
            print(line)
    e2ee_send.print_store_ratios(by_round, stores, "server CPU per delivery", 4)
    print(f"at end: {disk_sync(e2ee_send.DATA_DIR)}")


if __name__ == "__main__":
    main()
