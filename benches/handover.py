"""What a hand-over between the event loop and a Python thread costs in CPU.

Run (bounded: a fixed number of round trips)::

    python benches/handover.py [--trips N] [--runs R]

The SQLite store's writer is a Python thread: the loop queues a request
(``queue.SimpleQueue.put``), the writer takes it, commits, and answers on
the loop's thread (``loop.call_soon_threadsafe``), which the loop was asleep
for.  At one message a commit (a chat client's shape) that round trip is
paid once a message, whatever the commit does.  This measures it alone: the
writer does nothing but answer.  The baseline, in the same run: a turn of
the loop with nothing to wait for (a ``call_soon`` chain), what an answer
costs when nothing sleeps.  The round trip runs twice a round: with both
threads free to run on any CPU, and with the process held to one CPU, the
lowest it may use (``os.sched_setaffinity``), as a relay pinned to a core of
its own would be: then neither thread wakes the other across CPUs.  Reported:
the process's CPU (both threads) and the wall time a round trip, medians of
``--runs`` rounds, and their ratios to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import statistics
import threading
import time

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None


async def _handover(trips: int) -> tuple[float, float]:
    """CPU and wall µs a loop -> thread -> loop round trip."""
    loop = asyncio.get_running_loop()
    requests: queue.SimpleQueue = queue.SimpleQueue()

    def writer() -> None:
        while True:
            fut = requests.get()
            if fut is None:
                return
            loop.call_soon_threadsafe(fut.set_result, None)

    thread = threading.Thread(target=writer, name="handover-writer")
    thread.start()
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(trips):
            fut = loop.create_future()
            requests.put(fut)
            await fut
        return ((time.process_time() - c0) / trips * 1e6,
                (time.perf_counter() - w0) / trips * 1e6)
    finally:
        requests.put(None)
        thread.join()


async def _turns(trips: int) -> tuple[float, float]:
    """CPU and wall µs a turn of the loop (a ``call_soon`` chain)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [trips]

    def step() -> None:
        left[0] -= 1
        if left[0]:
            loop.call_soon(step)
        else:
            done.set_result(None)

    c0, w0 = time.process_time(), time.perf_counter()
    loop.call_soon(step)
    await done
    return ((time.process_time() - c0) / trips * 1e6,
            (time.perf_counter() - w0) / trips * 1e6)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, both kinds alternated, and print the medians."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trips", type=int, default=20_000, help="round trips a run")
    ap.add_argument("--runs", type=int, default=5, help="runs of each; medians reported")
    args = ap.parse_args(argv)
    if args.trips < 1 or args.runs < 1:
        ap.error("--trips and --runs must be positive")
    run = uvloop.run if uvloop is not None else asyncio.run
    cpus = os.sched_getaffinity(0)
    one = {min(cpus)}
    hand: list[tuple[float, float]] = []
    held: list[tuple[float, float]] = []
    turn: list[tuple[float, float]] = []
    for _ in range(args.runs):
        hand.append(run(_handover(args.trips)))
        os.sched_setaffinity(0, one)
        try:
            held.append(run(_handover(args.trips)))
        finally:
            os.sched_setaffinity(0, cpus)
        turn.append(run(_turns(args.trips)))
    base = statistics.median(c for c, _ in turn)
    for name, rs in (("loop -> thread -> loop", hand), ("the same on one CPU", held),
                     ("a loop turn (baseline)", turn)):
        cpu = [c for c, _ in rs]
        ratio = statistics.median(cpu) / base if base > 0 else float("nan")
        print(f"{name:<24} CPU {statistics.median(cpu):8.2f} us [{min(cpu):.2f}-{max(cpu):.2f}]"
              f"  wall {statistics.median(w for _, w in rs):8.2f} us  {ratio:6.1f}x a loop turn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
