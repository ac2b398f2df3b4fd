"""The SQLite store under light load, across its erasing checkpoints: what a
commit costs after the WAL was emptied, this tree against another checkout.

Run (bounded: each run lasts ``--warmup + --seconds``)::

    PYTHONPATH=. python benches/wal_erase.py [--relay-path OTHER_TREE] [--rounds 5]
        [--rate 100] [--seconds 10] [--erase-s 2] [--size 100] [--data-dir DIR]

``OTHER_TREE`` is another checkout with its compiled core built in place (``git
archive REV | tar -x -C TREE`` and ``python setup.py build_ext --inplace`` there).
Each run is a process of its own, with this tree's (``PYTHONPATH``'s) or the
other's ``fastroute`` first on its path, alternating, ``--rounds`` of each.  A
run opens a ``SqliteStore`` (``synchronous = FULL``, ``erase_s`` of ``--erase-s``)
and plays a chat at ``--rate`` messages a second, paced: a put of one message for
one device, acked as soon as its mid is known (a recipient that keeps up), so
every put is a commit of its own and its ack is in another.  The first
``--warmup`` seconds (longer than ``erase_s``: the first erasing checkpoint
falls in them, and before it both trees write a new WAL alike) are not
counted.  Then, over ``--seconds``: the store's writer thread's CPU a put (its
commits, the acks' and the erasing checkpoints' included) and each put's
latency (the call to its future's result) at p50, p99 and p99.9 (the tail
where a WAL checkpoint that ran inside a put's commit shows: one in a few
hundred puts); each run also says its commits a put (the acks' own
included) and its checkpoints, erasing and the writer's own (trees from
session 63 on).  Reported: each run, each tree's medians, and this tree's
over the other's (the medians' ratio, and the rounds' own ratios).

What it shows: the store's writer runs ``wal_checkpoint(TRUNCATE)`` at most
``erase_s`` after a delete.  SQLite then truncates the WAL to nothing, and at a
light load every commit until the next erasing checkpoint extends the file,
which makes its sync write the file's new size and blocks too.  With the
compiled core the WAL is emptied in place (zeroes over its first 16 MB, synced),
so those commits overwrite blocks the file has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


async def _child(rate: float, warmup: float, seconds: float, erase_s: float, size: int,
                 data_dir: str | None) -> dict:
    # here, not at the top: the parent runs no store, only the trees' children
    from store_put_ack import _thread_cpu

    from fastroute.store import SqliteStore
    with tempfile.TemporaryDirectory(prefix="fr-wal-erase-", dir=data_dir) as d:
        store = await SqliteStore.open(os.path.join(d, "store.db"), synchronous="FULL",
                                       erase_s=erase_s)
        try:
            dk = store.register_device("r@x", "d1")
            body = os.urandom(size)
            loop = asyncio.get_running_loop()
            waits: list[float] = []
            counting = False
            acks: list[asyncio.Task] = []

            async def one(cid: bytes) -> None:
                t = time.perf_counter()
                mids = await store.put_many([("s@x", cid, body, 1, [dk])], validate=False)
                if counting:
                    waits.append(time.perf_counter() - t)
                store.ack(dk, mids, validate=False)

            start = loop.time()
            end_warm = start + warmup
            end = end_warm + seconds
            step = 1.0 / rate
            due = start
            cpu0 = None
            puts = 0
            checkpoints0 = 0
            while True:
                now = loop.time()
                if not counting and now >= end_warm:
                    counting = True
                    await store.flush()
                    cpu0 = _thread_cpu(store._thread)
                    checkpoints0 = store.stats()["checkpoints"]
                    commits0 = store.commits
                    # trees before session 63 have no writer checkpoints of their own
                    walck0 = getattr(store, "wal_checkpoints", 0)
                if now >= end:
                    break
                if now < due:
                    await asyncio.sleep(due - now)
                    continue
                acks.append(loop.create_task(one(os.urandom(16))))
                if counting:
                    puts += 1
                due += step
                if len(acks) > 64:
                    acks = [t for t in acks if not t.done()]
            await asyncio.gather(*acks)
            await store.flush()
            cpu = _thread_cpu(store._thread) - cpu0
            stats = store.stats()
            wal = os.path.join(d, "store.db-wal")
            waits.sort()
            return {"puts": puts, "cpu_us": cpu / puts * 1e6,
                    "p50_ms": waits[len(waits) // 2] * 1e3,
                    "p99_ms": waits[int(len(waits) * 0.99)] * 1e3,
                    "p999_ms": waits[int(len(waits) * 0.999)] * 1e3,
                    "commits": (store.commits - commits0) / puts,
                    "checkpoints": stats["checkpoints"] - checkpoints0,
                    "wal_checkpoints": getattr(store, "wal_checkpoints", 0) - walck0,
                    "wal_bytes": os.path.getsize(wal) if os.path.exists(wal) else 0}
        finally:
            await store.close()


def _run(tree: str, args) -> dict:
    """One measured run in a process of its own, with ``tree`` first on its path."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, "-P", os.path.abspath(__file__), "--child",
           "--rate", str(args.rate), "--warmup", str(args.warmup),
           "--seconds", str(args.seconds), "--erase-s", str(args.erase_s),
           "--size", str(args.size)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         timeout=args.warmup + args.seconds + 60)
    if out.returncode:
        raise SystemExit(f"run in {tree} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--relay-path", help="another checkout (its core built in place), "
                    "run in turns with this one")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rate", type=float, default=100.0, help="puts a second")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds not counted (default: erase_s + 1)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds counted")
    ap.add_argument("--erase-s", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--data-dir", default=None, help="where the stores go (the temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = args.erase_s + 1.0
    if args.child:
        print(json.dumps(asyncio.run(_child(args.rate, args.warmup, args.seconds,
                                            args.erase_s, args.size, args.data_dir))))
        return 0
    here = os.environ.get("PYTHONPATH") or os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))
    trees = {"this": here}
    if args.relay_path:
        trees["other"] = args.relay_path
    print(f"rate={args.rate:g}/s warmup={args.warmup:g} s seconds={args.seconds:g} "
          f"erase_s={args.erase_s:g} size={args.size} B rounds={args.rounds} "
          + " ".join(f"{name}={os.path.abspath(tree)}" for name, tree in trees.items()))
    got: dict[str, list[dict]] = {name: [] for name in trees}
    names = list(trees)
    for r in range(args.rounds):
        # alternated, and the order turned every round
        for name in (names if r % 2 == 0 else names[::-1]):
            res = _run(trees[name], args)
            got[name].append(res)
            print(f"  round {r + 1} {name}: writer {res['cpu_us']:.1f} us a put, "
                  f"p50 {res['p50_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms, "
                  f"p99.9 {res['p999_ms']:.3f} ms, {res['puts']} puts, "
                  f"{res['commits']:.2f} commits a put, {res['checkpoints']} erasing "
                  f"checkpoints, {res['wal_checkpoints']} the writer's own, "
                  f"WAL {res['wal_bytes']:,} B at the end", flush=True)
    keys = ("cpu_us", "p50_ms", "p99_ms", "p999_ms")
    med = {name: {k: statistics.median(x[k] for x in runs) for k in keys}
           for name, runs in got.items()}
    for name in names:
        m = med[name]
        print(f"{name}: writer {m['cpu_us']:.1f} us a put, p50 {m['p50_ms']:.3f} ms, "
              f"p99 {m['p99_ms']:.3f} ms, p99.9 {m['p999_ms']:.3f} ms "
              f"(medians of {args.rounds})")
    if "other" in trees:
        print("this / other: " + "; ".join(
            f"{k} x{med['this'][k] / med['other'][k]:.2f} (rounds " + ", ".join(
                f"x{a[k] / b[k]:.2f}" for a, b in zip(got["this"], got["other"])) + ")"
            for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
