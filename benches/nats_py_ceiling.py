"""How fast can nats-py go on this machine?  The baseline of e2e_compare.py, checked.

e2e_compare.py runs nats-py's publisher and subscriber in one process, paced
by an end-to-end window, as it runs fastroute's clients.  This script measures
the same 100-byte 1:1 case three more ways, so that the baseline is known not
to be held back by that harness:

* ``publish only``: no subscriber at all (the publisher's own ceiling);
* ``1:1 one process``: publish everything, then wait for every delivery;
* ``1:1 two processes``: the subscriber in a process of its own (one core
  each for publisher and subscriber; nats-server is the third process).

Run: ``PYTHONPATH=. python benches/nats_py_ceiling.py [--messages N]``; it
installs nats-server (Debian package) if needed, starts it on loopback, and
stops it.  Each run is bounded by RUN_TIMEOUT.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_compare import RUN_TIMEOUT, NatsServer, machine_info  # noqa: E402

BODY = b"x" * 100
SUBJECT = "ceiling"


def _url(port: int) -> str:
    return f"nats://127.0.0.1:{port}"


async def _subscribe(nc, n: int):
    """Subscribe with a counting callback; returns (future done at n, [first time])."""
    done = asyncio.get_running_loop().create_future()
    got = [0]

    async def cb(_msg) -> None:
        got[0] += 1
        if got[0] == n and not done.done():
            done.set_result(time.perf_counter())

    await nc.subscribe(SUBJECT, cb=cb, pending_msgs_limit=10_000_000,
                       pending_bytes_limit=2**34)
    await nc.flush()
    return done


async def _publish(port: int, n: int, subject: str = SUBJECT) -> tuple[float, float]:
    import nats

    pub = await nats.connect(_url(port), pending_size=64 * 1024 * 1024)
    t0 = time.perf_counter()
    for i in range(n):
        await pub.publish(subject, BODY)
        if i % 256 == 255:
            await asyncio.sleep(0)  # let the subscriber (same loop) run, as e2e_compare does
    await pub.flush()
    t1 = time.perf_counter()
    await pub.close()
    return t0, t1


async def publish_only(port: int, n: int) -> float:
    t0, t1 = await _publish(port, n, "nobody.listens")
    return n / (t1 - t0)


async def one_process(port: int, n: int) -> float:
    import nats

    sub = await nats.connect(_url(port))
    try:
        done = await _subscribe(sub, n)
        t0, _ = await _publish(port, n)
        return n / (await asyncio.wait_for(done, RUN_TIMEOUT) - t0)
    finally:
        await sub.close()


def _sub_process(port: int, n: int, q) -> None:
    import nats

    async def go() -> None:
        nc = await nats.connect(_url(port))
        done = await _subscribe(nc, n)
        q.put("ready")
        try:
            q.put(await asyncio.wait_for(done, RUN_TIMEOUT))
        finally:
            await nc.close()

    uvloop.run(go())


def two_processes(port: int, n: int) -> float:
    # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_sub_process, args=(port, n, q))
    proc.start()
    try:
        if q.get(timeout=RUN_TIMEOUT) != "ready":
            raise RuntimeError("subscriber did not start")
        t0, _ = uvloop.run(_publish(port, n))
        return n / (q.get(timeout=RUN_TIMEOUT) - t0)
    finally:
        proc.join(RUN_TIMEOUT)
        if proc.is_alive():
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    args = ap.parse_args(argv)
    n = args.messages
    print(f"machine: {machine_info()}")
    server = NatsServer().start()
    try:
        rows = [("publish only", uvloop.run(publish_only(server.port, n))),
                ("1:1 one process", uvloop.run(one_process(server.port, n))),
                ("1:1 two processes", two_processes(server.port, n))]
    finally:
        server.stop()
    for name, rate in rows:
        print(f"nats-py 100 B {name:<20} {rate:>10,.0f} msg/s")
    print(f"machine after: {machine_info()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
