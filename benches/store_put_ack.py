"""The store alone under relay-like load: put_many batches, then ack them.

Run: ``PYTHONPATH=. python benches/store_put_ack.py [--size 100] [--messages 100000]
[--store sqlite|memory] [--synchronous FULL|NORMAL] [--batch 256] [--devices 1]
[--inflight 9] [--ack-every 1] [--ack-lag 0] [--wal gathered|default]``.
Batches of 256 messages (``--batch``) to one device (1:1), or each message to
``--devices`` devices (a group's fan-out, which every one of them acks); at most
``--inflight`` batches in flight, each acked as soon as its mids are known, as the
relay does for recipients that keep up (``--ack-every K``: the mids of K batches
in one ack, as a receiver that acks what one read brought).  ``--inflight 1
--batch 50 --ack-every 5`` is what a relay's writer sees under a 10-device group's
fan-out: a commit per put, each device acking ~250 mids at a time.  ``--ack-lag L``
holds each ack back until L more batches were put (``--devices 10 --batch 64
--inflight 1 --ack-lag 1``: the spacks of two batches are live at every commit, not
one, and the WAL takes twice the frames).
``--wal default`` opens the SQLite store's writer with SQLite's default VFS
(each WAL frame written as two calls, as without the compiled core), not the
one that writes a commit's frames in one call (``gathered``, the store's own
with the compiled core: ``fastroute.store.py_wal_vfs``).
Prints messages/s, CPU seconds of the whole process (event loop plus writer
thread) and of the SQLite store's writer thread alone, commits, bytes handed
to write calls a message and write calls a commit (Linux: ``/proc/self/io``);
a ratio against ``--store memory`` (or the other ``--synchronous``, or the
other ``--wal``) in the same shell session is the comparison to read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

from fastroute import store as store_mod
from fastroute.store import MemoryStore, SqliteStore


def _thread_cpu(thread) -> float:
    """CPU seconds (user and system) of this process's ``thread``: from its
    CPU clock (nanoseconds) where there is one, else from ``/proc`` (Linux,
    clock ticks: 10 ms, too coarse to tell two trees apart in one run)."""
    if hasattr(time, "pthread_getcpuclockid"):
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _io(field: str) -> int:
    """This process's ``/proc/self/io`` counter ``field``: ``wchar``, the
    bytes handed to write calls (the WAL, checkpoints), or ``syscw``, the
    write calls."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


async def run(store_kind: str, n: int, size: int, batch: int = 256,
              synchronous: str | None = None, devices: int = 1, inflight_most: int = 8,
              ack_every: int = 1, ack_lag: int = 0) -> None:
    with tempfile.TemporaryDirectory(prefix="fr-store-probe-") as d:
        cls = SqliteStore if store_kind == "sqlite" else MemoryStore
        kw = {} if synchronous is None else {"synchronous": synchronous}
        store = await cls.open(os.path.join(d, "store.db"), **kw)
        try:
            dks = [store.register_device("r@x", f"d{i}") for i in range(devices)]
            body = os.urandom(size)
            ids = [os.urandom(16) for _ in range(batch)]
            writer = getattr(store, "_thread", None)
            t0 = time.perf_counter()
            c0 = time.process_time()
            wc0 = _thread_cpu(writer) if writer is not None else 0.0
            w0, s0 = _io("wchar"), _io("syscw")
            inflight: list[asyncio.Future] = []
            known: list[int] = []  # mids not yet acked
            lagged: list[list[int]] = []  # acks held back by --ack-lag, oldest first
            taken = 0
            done = 0

            def ack(mids: list[int]) -> None:
                for dk in dks:
                    store.ack(dk, mids, validate=False)

            async def take() -> None:
                nonlocal known, taken
                known += await inflight.pop(0)
                taken += 1
                if taken % ack_every == 0:
                    lagged.append(known)
                    known = []
                    while len(lagged) > ack_lag:
                        ack(lagged.pop(0))

            while done < n:
                items = [("s@x", cid, body, 1, dks) for cid in ids]
                inflight.append(store.put_many(items, validate=False))
                if len(inflight) >= inflight_most:
                    await take()
                done += batch
            while inflight:
                await take()
            for mids in lagged + [known]:
                if mids:
                    ack(mids)
            await store.flush()
            wcpu = _thread_cpu(writer) - wc0 if writer is not None else 0.0
            dt = time.perf_counter() - t0
            mode = getattr(store, "_synchronous", "-")
            cpu = time.process_time() - c0
            commits = store.stats()["commits"]
            to = "1:1" if devices == 1 else f"to {devices} devices"
            print(f"{store_kind} ({mode}) {size} B put+ack {to}: {done / dt:,.0f} msg/s, "
                  f"cpu {cpu:.2f} s ({cpu / (done * devices) * 1e6:.2f} us a delivery; "
                  f"writer thread {wcpu / (done * devices) * 1e6:.3f}), "
                  f"commits {commits}, "
                  f"written {(_io('wchar') - w0) / done:.0f} B a message, "
                  f"{(_io('syscw') - s0) / max(commits, 1):.1f} write calls a commit")
        finally:
            await store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--synchronous", choices=["NORMAL", "FULL"], default=None,
                    help="the store's default when not given")
    ap.add_argument("--batch", type=int, default=256,
                    help="messages a put_many (1: a chat relay's; several batches "
                         "share a commit when they queue behind one)")
    ap.add_argument("--devices", type=int, default=1,
                    help="devices each message goes to, each acking it (1: 1:1)")
    ap.add_argument("--inflight", type=int, default=9,
                    help="put_many calls in flight at most (1: a commit per put)")
    ap.add_argument("--ack-every", type=int, default=1,
                    help="batches whose mids each device acks at once")
    ap.add_argument("--ack-lag", type=int, default=0,
                    help="acks held back until this many more batches were put")
    ap.add_argument("--wal", choices=["gathered", "default"], default="gathered",
                    help="default: SQLite's own VFS for the writer (a WAL frame two "
                         "write calls), as without the compiled core")
    args = ap.parse_args(argv)
    if args.wal == "default":
        store_mod._wal_vfs = store_mod.py_wal_vfs
    elif args.store == "sqlite" and store_mod._wal_vfs() is None:
        ap.error("--wal gathered needs the compiled core")
    asyncio.run(run(args.store, args.messages, args.size, batch=args.batch,
                    synchronous=args.synchronous, devices=args.devices,
                    inflight_most=args.inflight, ack_every=args.ack_every,
                    ack_lag=args.ack_lag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
