"""Which pages the SQLite store's commits write, named by the table or index
they belong to.

Run: ``PYTHONPATH=. python benches/wal_pages.py [--devices 10] [--batch 64]
[--commits 60] [--ack-lag 1]``.
The store's writer takes the relay's group pattern: batches of ``--batch``
messages of 100 B, each to the same ``--devices`` devices (1: one device, a
1:1 chat's pack), a commit a batch, and every device acks a batch once
``--ack-lag`` more were put (1: a group's acks come with the put after the
next, as in a relay under ``group_send.py``).  Then the WAL is read back frame
by frame: each frame is one page a commit wrote, named through SQLite's
``dbstat`` (page 1 is the file's header and schema; pages no table or index
owns are the auto-vacuum's pointer maps and free pages).  What a commit costs
the writer follows how many pages it writes (``store_put_ack.py`` gives the
bytes and the CPU): this says which they are.

The WAL starts over after a checkpoint (1,000 pages by default), so the
figures are those of the last commits before the store closes, at most
``--commits`` of them after ``--warmup`` commits left out.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import sqlite3
import struct
import sys
import tempfile

from fastroute.store import SqliteStore

#: a WAL file's header and each frame's header, in bytes (sqlite.org/fileformat2.html)
_WAL_HEADER = 32
_FRAME_HEADER = 24
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # the header's first word (checksums' byte order)


def wal_frames(wal: bytes) -> tuple[int, list[tuple[int, int]]]:
    """The page size and the frames ``(page number, database size in pages
    after the commit or 0)`` of the WAL image ``wal``, from its start while
    their salts are the header's (frames after those are an earlier pass's)."""
    if len(wal) < _WAL_HEADER:
        return 0, []
    magic, _, page_size, _, salt1, salt2, _, _ = struct.unpack(">8I", wal[:_WAL_HEADER])
    if magic not in _WAL_MAGIC or not page_size:
        # no WAL (as SQLite reads it): the store's writer empties one by
        # overwriting it with zeroes, not by cutting it to nothing
        return 0, []
    frames = []
    at = _WAL_HEADER
    while at + _FRAME_HEADER + page_size <= len(wal):
        page, size, s1, s2 = struct.unpack(">4I", wal[at:at + 16])
        if (s1, s2) != (salt1, salt2):
            break
        frames.append((page, size))
        at += _FRAME_HEADER + page_size
    return page_size, frames


def commits_of(frames: list[tuple[int, int]]) -> list[list[int]]:
    """The pages of each committed transaction in ``frames`` (a commit's last
    frame carries the database's size; frames after the last commit are
    left out)."""
    out: list[list[int]] = []
    pages: list[int] = []
    for page, size in frames:
        pages.append(page)
        if size:
            out.append(pages)
            pages = []
    return out


async def run(devices: int, batch: int, commits: int, ack_lag: int, warmup: int) -> dict:
    """Run the pattern on a fresh store in a temporary directory; return what
    the commits wrote (see :func:`main`)."""
    with tempfile.TemporaryDirectory(prefix="fr-wal-pages-") as d:
        path = os.path.join(d, "store.db")
        # no erasing checkpoint during the run: it would empty the WAL
        store = await SqliteStore.open(path, erase_s=3600)
        try:
            keys = [store.register_device("r@x", f"d{i}") for i in range(devices)]
            body = os.urandom(100)
            lagged: list[list[int]] = []
            for _ in range(warmup + commits):
                items = [("s@x", os.urandom(16), body, 1_700_000_000_000, keys)
                         for _ in range(batch)]
                lagged.append(await store.put_many(items, validate=False))
                while len(lagged) > ack_lag:
                    mids = lagged.pop(0)
                    for key in keys:
                        store.ack(key, mids, validate=False)
            await store.flush()
            # a copy of the file and its WAL as they are (close checkpoints)
            shutil.copy(path, os.path.join(d, "copy.db"))
            shutil.copy(path + "-wal", os.path.join(d, "copy.db-wal"))
        finally:
            await store.close()
        with open(os.path.join(d, "copy.db-wal"), "rb") as f:
            page_size, frames = wal_frames(f.read())
        conn = sqlite3.connect(os.path.join(d, "copy.db"))
        try:
            try:
                owner = dict(conn.execute("SELECT pageno, name FROM dbstat"))
            except sqlite3.OperationalError:  # a build without dbstat
                owner = {}
            file_pages = conn.execute("PRAGMA page_count").fetchone()[0]
        finally:
            conn.close()
    done = commits_of(frames)[-commits:]
    by: collections.Counter = collections.Counter()
    for pages in done:
        for page in pages:
            by["the header and schema (page 1)" if page == 1
               else owner.get(page, "pointer map or free page")] += 1
    return {"page_size": page_size, "commits": len(done),
            "frames": sum(len(p) for p in done), "file_pages": file_pages, "by": by}


def main(argv: list[str] | None = None) -> int:
    """Print the pages a commit wrote, by table or index."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10,
                    help="devices each message goes to (1: a 1:1 chat's pack)")
    ap.add_argument("--batch", type=int, default=64, help="messages a commit")
    ap.add_argument("--commits", type=int, default=60, help="commits read back")
    ap.add_argument("--ack-lag", type=int, default=1,
                    help="batches put before a batch's acks")
    ap.add_argument("--warmup", type=int, default=20, help="commits left out first")
    args = ap.parse_args(argv)
    got = asyncio.run(run(args.devices, args.batch, args.commits, args.ack_lag,
                          args.warmup))
    n = got["commits"]
    if not n:
        print("no commit found in the WAL", file=sys.stderr)
        return 1
    print(f"{args.batch} messages a commit to {args.devices} device(s), ack lag "
          f"{args.ack_lag}: {n} commits, {got['frames'] / n:.2f} pages a commit of "
          f"{got['page_size']} B; the file {got['file_pages']} pages")
    for name, count in got["by"].most_common():
        print(f"  {count / n:5.2f} a commit  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
