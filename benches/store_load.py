"""A backlog read back from the SQLite store, as a device's backlog sync reads it.

Run: ``PYTHONPATH=. python benches/store_load.py [--messages 50000] [--pack 2500]
[--limit 1024] [--size 100] [--runs 5] [--relay-path OTHER_TREE]``.

A device's messages are stored ``--pack`` to a transaction (so a pack of
that many: a relay's writer under a fast sender to a recipient that fell
behind writes packs of thousands), then loaded ``--limit`` at a time, each
load from the last mid the one before returned, as ``Delivery._sync``
does.  Prints the process's CPU (the event loop and the store's reader
thread) per row loaded, median and every run.  ``--relay-path`` runs the
same in turns with another checkout's store (each run a process of its own,
the two alternated) and prints the ratio of the medians: the comparison to
read on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time


async def _one(messages: int, pack: int, limit: int, size: int) -> float:
    """CPU ns a row of one load of the whole backlog (a fresh store)."""
    from fastroute.store import SqliteStore

    with tempfile.TemporaryDirectory() as tmp:
        async with await SqliteStore.open(os.path.join(tmp, "store.db"),
                                          synchronous="NORMAL") as store:
            dev = store.register_device("bob@home", "phone")
            left = messages
            while left:
                k = min(pack, left)
                await store.put_many([("alice@home", os.urandom(16), os.urandom(size),
                                       1_700_000_000_000, [dev]) for _ in range(k)])
                left -= k
            t0 = time.process_time()
            n = after = 0
            while True:
                rows = await store.load(dev, after, limit)
                if not rows:
                    break
                n += len(rows)
                after = rows[-1][0]
            cpu = time.process_time() - t0
    if n != messages:
        raise SystemExit(f"loaded {n} rows of {messages}")
    return cpu / n * 1e9


def _run_in(tree: str | None, args: argparse.Namespace) -> float:
    """One measured run in a process of its own, with ``tree`` first on its path."""
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = os.path.abspath(tree)
    out = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--one",
                          "--messages", str(args.messages), "--pack", str(args.pack),
                          "--limit", str(args.limit), "--size", str(args.size)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--pack", type=int, default=2_500)
    ap.add_argument("--limit", type=int, default=1_024)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--relay-path", help="another checkout, run in turns with this one")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(asyncio.run(_one(args.messages, args.pack, args.limit, args.size)))
        return 0
    here = os.environ.get("PYTHONPATH") or os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))
    trees = [("this", here)] + ([("other", args.relay_path)] if args.relay_path else [])
    got: dict[str, list[float]] = {name: [] for name, _ in trees}
    for r in range(args.runs):
        # alternated, and the order turned every round
        for name, tree in (trees if r % 2 == 0 else trees[::-1]):
            got[name].append(_run_in(tree, args))
    print(f"backlog of {args.messages} x {args.size} B in packs of {args.pack}, loads of "
          f"{args.limit}: process CPU ns a row loaded")
    for name, tree in trees:
        runs = got[name]
        print(f"  {name:5} {statistics.median(runs):7.0f}  runs {[round(x) for x in runs]}"
              f"  ({tree})")
    if args.relay_path:
        ratios = [a / b for a, b in zip(got["this"], got["other"])]
        ratio = statistics.median(got["this"]) / statistics.median(got["other"])
        print(f"  this/other: {ratio:.2f} (rounds {', '.join(f'{x:.2f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
