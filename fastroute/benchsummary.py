"""Routing engine at a glance: compiled vs pure-Python model, side by side.

    fastroute bench                      # about 30 s
    fastroute bench --full               # + 10 million queued messages and
                                         #   10**7 routed+acked (about 1 min)
    python benches/router_summary.py     # the same, from a source checkout

Prints, measured in this process on this machine:

* ns per message for each scenario, compiled and model, and their ratio;
* fan-out deliveries per second to a 1000-device group, with the cost of
  draining those deliveries (pop_many + ack) shown separately;
* engine memory per queued message (payload objects excluded: one payload
  object is shared by every message), by tracemalloc and by RSS;
* a leak check: payload refcount and RSS across many routed+acked messages.

Timings are the best of several repeats (the median is shown to give an
idea of the noise); run it twice to see run-to-run variation.  The same
scenarios back the pytest-benchmark suite in ``benches/bench_router.py``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc

import fastroute
from fastroute import _model
from fastroute._compiled import core as _core

IMPLS = {"compiled": _core.Router if _core else None, "model": _model.Router}


# Stand-in for what a relay routes: an encrypted body the engine never looks
# into.  One object is shared by every message of a run.
PAYLOAD = bytes(200)


def _drain(r, devs):
    for dev, msgs in r.pop_many(devs, 1 << 30):
        r.ack(dev, msgs[-1][0])


# Each scenario builds a router and returns (run, reset, messages):
# run() is timed and handles `messages` messages (deliveries for routes and
# fan-outs); reset() restores the starting state and is not timed.

def sc_route_single(Router, n_addr=1000, per_address=1):
    r = Router(4096)
    addrs = [f"user{i}@bench" for i in range(n_addr)]
    devs = [r.add_device(a, f"d{j}") for a in addrs for j in range(per_address)]
    payload = PAYLOAD
    route = r.route

    def run():
        for a in addrs:
            route(a, payload)
    return run, lambda: _drain(r, devs), n_addr * per_address


def sc_route_many(Router, batch=1000, n_addr=1000):
    r = Router(4096)
    addrs = [f"user{i}@bench" for i in range(n_addr)]
    devs = [r.add_device(a, "d0") for a in addrs]
    payload = PAYLOAD
    items = [(addrs[i % n_addr], payload) for i in range(batch)]
    route_many = r.route_many
    rounds = max(1, 1000 // batch)

    def run():
        for _ in range(rounds):
            route_many(items)
    return run, lambda: _drain(r, devs), batch * rounds


def sc_cycle(Router, batch=1000, n_addr=10):
    """route_many of a batch, then pop_many + ack: a relay's whole 1:1 path."""
    r = Router(4096)
    addrs = [f"user{i}@bench" for i in range(n_addr)]
    devs = [r.add_device(a, "d0") for a in addrs]
    payload = PAYLOAD
    items = [(addrs[i % n_addr], payload) for i in range(batch)]

    def run():
        r.route_many(items)
        for dev, msgs in r.pop_many(devs, batch):
            r.ack(dev, msgs[-1][0])
    return run, lambda: None, batch


def sc_cycle_batch(Router, batch=1000, n_addr=10):
    """sc_cycle, draining with pop_batch (first_seq, payloads) per device."""
    r = Router(4096)
    addrs = [f"user{i}@bench" for i in range(n_addr)]
    devs = [r.add_device(a, "d0") for a in addrs]
    payload = PAYLOAD
    items = [(addrs[i % n_addr], payload) for i in range(batch)]
    per_dev = -(-batch // n_addr)

    def run():
        r.route_many(items)
        for dev in devs:
            first, payloads = r.pop_batch(dev, per_dev)
            if payloads:
                r.ack(dev, first + len(payloads) - 1)
    return run, lambda: None, batch


def sc_pop_ack(Router, n_dev=10, per_dev=100):
    r = Router(4096)
    addrs = [f"user{i}@bench" for i in range(n_dev)]
    devs = [r.add_device(a, "d0") for a in addrs]
    payload = PAYLOAD
    items = [(a, payload) for a in addrs] * per_dev

    def run():
        for dev in devs:
            msgs = r.pop(dev, per_dev)
            r.ack(dev, msgs[-1][0])
    return run, lambda: r.route_many(items), n_dev * per_dev


def sc_fanout(Router, group=1000, fanouts=None):
    fanouts = fanouts or max(1, 10_000 // group)
    r = Router(fanouts + 8)
    addrs = [f"user{i}@bench" for i in range(group)]
    devs = [r.add_device(a, "d0") for a in addrs]
    gid = r.create_group(addrs)
    payload = PAYLOAD
    fanout = r.fanout

    def run():
        for _ in range(fanouts):
            fanout(gid, payload)
    return run, lambda: _drain(r, devs), group * fanouts


def sc_fanout_drain(Router, group=1000, fanouts=10, batch=False):
    """Only the drain of fan-out deliveries: pop_many (or pop_batch) + ack."""
    r = Router(fanouts + 8)
    addrs = [f"user{i}@bench" for i in range(group)]
    devs = [r.add_device(a, "d0") for a in addrs]
    gid = r.create_group(addrs)
    payload = PAYLOAD

    def fill():
        for _ in range(fanouts):
            r.fanout(gid, payload)

    def drain_batch():
        for dev in devs:
            first, payloads = r.pop_batch(dev, fanouts)
            r.ack(dev, first + len(payloads) - 1)
    return (drain_batch if batch else lambda: _drain(r, devs)), fill, group * fanouts


SCENARIOS = [
    # (label, factory, kwargs)
    ("route 1:1, batch 1", sc_route_single, {}),
    ("route 1:1, batch 1000 (route_many)", sc_route_many, {"batch": 1000}),
    ("route to a 3-device address", sc_route_single, {"n_addr": 334, "per_address": 3}),
    ("route_many 1000 + pop_many + ack, 10 dev", sc_cycle, {}),
    ("  same, drained with pop_batch", sc_cycle_batch, {}),
    ("route_many 1000 + pop_many + ack, 100 dev", sc_cycle, {"n_addr": 100}),
    ("pop + ack, 100 per call", sc_pop_ack, {}),
    ("fan-out, group of 10", sc_fanout, {"group": 10}),
    ("fan-out, group of 100", sc_fanout, {"group": 100}),
    ("fan-out, group of 1000", sc_fanout, {"group": 1000}),
    ("drain fan-out 1000: pop_many + ack", sc_fanout_drain, {}),
    ("drain fan-out 1000: pop_batch + ack", sc_fanout_drain, {"batch": True}),
]


def measure(factory, Router, kwargs, budget):
    """Best and median ns per message over repeats filling ``budget`` s."""
    run, reset, n = factory(Router, **kwargs)
    reset()
    run()                       # warm up: rings and caches at their size
    samples = []
    spent = 0.0
    while spent < budget or len(samples) < 5:
        reset()
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        spent += dt
        samples.append(dt * 1e9 / n)
        if len(samples) >= 400:
            break
    return min(samples), statistics.median(samples)


def rss_bytes() -> int:
    """Resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def fill_queued(Router, n_devices, per_device):
    r = Router(per_device)
    addrs = [f"user{i}@bench" for i in range(n_devices)]
    for a in addrs:
        r.add_device(a, "d0")
    return r, addrs


def memory_per_message(Router, total, per_device=1000):
    """Engine bytes per queued message (tracemalloc, and RSS).

    Includes the devices' own records, spread over their messages: with
    few messages per device that share dominates.
    """
    n_dev = max(1, total // per_device)
    payload = PAYLOAD
    batch = [(f"user{i}@bench", payload) for i in range(n_dev)]
    gc.collect()
    rss0 = rss_bytes()
    r, _ = fill_queued(Router, n_dev, per_device)
    for _ in range(per_device):
        r.route_many(batch)
    rss_per = (rss_bytes() - rss0) / (n_dev * per_device)
    del r
    gc.collect()
    tracemalloc.start()
    try:
        t0 = tracemalloc.get_traced_memory()[0]
        r, _ = fill_queued(Router, n_dev, per_device)
        for _ in range(per_device):
            r.route_many(batch)
        traced_per = (tracemalloc.get_traced_memory()[0] - t0) / (n_dev * per_device)
    finally:
        tracemalloc.stop()
    assert r.stats()["queued"] == n_dev * per_device
    del r
    gc.collect()
    return n_dev * per_device, traced_per, rss_per


def leak_check(Router, total):
    """Route, pop and ack ``total`` messages; report refcount and RSS drift."""
    r = Router(4096)
    addrs = [f"user{i}@bench" for i in range(100)]
    devs = [r.add_device(a, "d0") for a in addrs]
    payload = PAYLOAD
    items = [(addrs[i % 100], payload) for i in range(1000)]

    def cycle(rounds):
        for _ in range(rounds):
            r.route_many(items)
            for dev, msgs in r.pop_many(devs, 1000):
                r.ack(dev, msgs[-1][0])

    base_refs = sys.getrefcount(payload)
    cycle(max(1, total // 10_000))          # warm up allocator and rings
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    cycle(total // 1000)
    dt = time.perf_counter() - t0
    gc.collect()
    drift = rss_bytes() - rss0
    st = r.stats()
    ok = (sys.getrefcount(payload) == base_refs and st["queued"] == 0
          and st["unacked"] == 0)
    return ok, drift, dt


def main(argv=None) -> int:
    """Print the summary; returns the exit status (1 if the leak check fails)."""
    ap = argparse.ArgumentParser(prog="fastroute bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true",
                    help="10 million queued messages and 10**7 routed+acked")
    ap.add_argument("--budget", type=float, default=0.3,
                    help="seconds of timed runs per scenario and engine")
    args = ap.parse_args(argv)
    if _core is None:
        print("fastroute._core is not in use (FASTROUTE_NO_EXTENSIONS is set): unset it"
              " to compare the compiled engine with the model", file=sys.stderr)
        return 2

    print(f"fastroute {fastroute.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs; default Router is "
          f"{'compiled' if fastroute.COMPILED else 'the pure-Python model'}")
    print()
    head = f"{'scenario':42} {'compiled ns/msg':>17} {'model ns/msg':>15} {'ratio':>7}"
    print(head)
    print("-" * len(head))
    results = {}
    for label, factory, kwargs in SCENARIOS:
        c_best, c_med = measure(factory, IMPLS["compiled"], kwargs, args.budget)
        m_best, m_med = measure(factory, IMPLS["model"], kwargs, args.budget)
        results[label] = (c_best, m_best)
        print(f"{label:42} {c_best:8.1f} ({c_med:6.1f}) {m_best:7.0f} ({m_med:5.0f})"
              f" {m_best / c_best:6.1f}x", flush=True)
    print("(per message or delivery; best of repeats, median in parentheses;"
          " ratio = model / compiled, best;\n 'dev' = recipient devices per batch;"
          " pop_batch is the tuple-free drain, see Router.pop_batch)")

    print()
    fan = results["fan-out, group of 1000"][0]
    drain = results["drain fan-out 1000: pop_many + ack"][0]
    drain_b = results["drain fan-out 1000: pop_batch + ack"][0]
    print(f"fan-out to a 1000-device group: {1e3 / fan:,.0f} M deliveries/s "
          f"(compiled, one shared payload object)")
    print(f"draining those deliveries: {1e3 / drain:,.1f} M msg/s with pop_many + ack, "
          f"{1e3 / drain_b:,.1f} M msg/s with pop_batch + ack")

    print()
    total = 10_000_000 if args.full else 1_000_000
    for per_device in (1000, 10):
        n, traced, rss = memory_per_message(IMPLS["compiled"], total, per_device)
        print(f"engine memory per queued message, compiled, {n:,} queued, "
              f"{per_device} per device: {traced:.1f} B (tracemalloc), "
              f"{rss:.1f} B (RSS)")
    n_m = min(total, 1_000_000)
    n_m, traced_m, rss_m = memory_per_message(IMPLS["model"], n_m)
    print(f"engine memory per queued message, model, {n_m:,} queued, "
          f"1000 per device: "
          f"{traced_m:.1f} B (tracemalloc), {rss_m:.1f} B (RSS)")

    print()
    total = 10_000_000 if args.full else 1_000_000
    ok, drift, dt = leak_check(IMPLS["compiled"], total)
    print(f"leak check, compiled, {total:,} routed+popped+acked in {dt:.1f} s: "
          f"payload refcount back to baseline: {'yes' if ok else 'NO'}; "
          f"RSS drift {drift / 1024:+.0f} KiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
