"""The SQLite store's common transaction, compiled, specified and general.

``SqliteStore`` applies a transaction of acks of committed messages and new
packs, spacks and shares (nothing else) in one compiled call that releases
the GIL once (``fastroute._core.SqlFast``, specified by
``fastroute.store.PySqlFast``), and group members' acks of whole shares in
another; every other transaction, and every ack that lists neither whole
packs nor whole shares, takes the general path through the sqlite3 module.
These tests
run the same traffic through a store with the twin, with its specification
and with neither, and compare what each gives back and leaves in its file.
"""

from __future__ import annotations

import array
import ast
import asyncio
import logging
import random
import re
import sqlite3
import sys
from pathlib import Path

import pytest

import fastroute
from fastroute import store as store_mod
from fastroute.store import SqliteStore

needs_c = pytest.mark.skipif(not fastroute.COMPILED, reason="compiled core not built")

T0 = 1_700_000_000_000
TABLES = {
    "packs": "dev, first, last, n, nbytes, exp_ms, mids, data",
    "shares": "dev, first, last, n, nbytes, exp_ms, mids",
    "spacks": "first, last, n, nbytes, exp_ms, mids, lens, exps, data",
    "messages": "mid, dev, sender, cid, body, ts_ms, exp_ms",
    "inbox": "device_key, mid",
    "meta": "k, v",
}


def _rows(path: str) -> dict[str, list]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT {cols} FROM {t} ORDER BY 1, 2").fetchall()
                for t, cols in TABLES.items()}
    finally:
        conn.close()


class _CountedWalks:
    """A store's compiled transaction (``store._fast``), counting the mids
    of the shares each :meth:`run` walk deleted (and released, in the call
    or, handed back, in the store's ``_delete``)."""

    def __init__(self, fast, counted: list[int]) -> None:
        self._fast = fast
        self._counted = counted

    def run(self, *args, **kwargs):
        shares = kwargs.get("shares")
        start = 0 if shares is None else len(shares)
        missed = self._fast.run(*args, **kwargs)
        if shares is not None:
            self._counted.append(sum(shares[start + 2::3]))
        return missed

    def __getattr__(self, name: str):
        return getattr(self._fast, name)


def _count_compiled_shares(store: SqliteStore) -> tuple[list[int], list[int]]:
    """Count, call by call, the mids of whole shares the store's compiled
    walks applied: the common transaction's (``SqlFast.run``) and the general
    path's (``_drop_shares``)."""
    by_walk: list[int] = []
    by_drops: list[int] = []
    drop_shares = store._drop_shares

    def dropped(acks: dict, spartial: dict, gone: dict) -> dict:
        rest = drop_shares(acks, spartial, gone)
        by_drops.append(sum(map(len, acks.values())) - sum(map(len, rest.values())))
        return rest

    if store._fast is not None:
        store._fast = _CountedWalks(store._fast, by_walk)
    store._drop_shares = dropped
    return by_walk, by_drops


async def _traffic(path: str, seed: int) -> tuple[list, dict]:
    """One seeded run of puts and acks of every shape; what the store gave
    back (mids, loads, counts) and its counters."""
    rng = random.Random(seed)
    store = await SqliteStore.open(path, synchronous="NORMAL")
    seen: list = []
    # the mids of whole shares the compiled walks applied (the common
    # transaction's, and the general path's SqliteStore._drop_shares)
    by_walk, by_drops = _count_compiled_shares(store)
    try:
        keys = [store.register_device(f"u{i}@p", "1") for i in range(5)]
        await store.flush()
        packs: dict[int, list[list[int]]] = {k: [] for k in keys}  # each put's mids a device
        shared: dict[int, list[int]] = {k: [] for k in keys}
        n = 0
        for step in range(80):
            # acks first, queued before the put: they share its transaction
            # or come in one of their own, as under load
            for key in keys:
                if not packs[key] or rng.random() < 0.3:
                    continue
                shape = rng.random()
                mids = packs[key].pop(rng.randrange(len(packs[key])))
                cut = rng.randrange(1, len(mids)) if len(mids) > 1 else 1
                if shape < 0.4:
                    acked = mids                         # one whole pack, in order
                elif shape < 0.5:
                    acked = mids[::-1]                   # one pack, out of order
                elif shape < 0.6 and len(mids) > 1:
                    acked = mids[:cut]                   # part of one, the rest later
                    packs[key].append(mids[cut:])
                elif shape < 0.7 and packs[key]:
                    acked = mids + packs[key].pop()      # two packs at once
                elif shape < 0.8 and packs[key]:
                    nxt = packs[key].pop()               # a pack, then part of the next
                    acked = mids + nxt[:cut]
                    if nxt[cut:]:
                        packs[key].append(nxt[cut:])
                elif shape < 0.85:
                    store.ack(key, mids[:cut])           # one pack in two requests
                    acked = mids[cut:]
                elif shape < 0.93:
                    acked = mids + mids                  # the same mids twice
                else:
                    store.ack(key, mids)                 # a pack, then a mid of it again
                    acked = mids[:1]
                store.ack(key, acked)
            for key in keys:
                if not shared[key] or rng.random() < 0.5:
                    continue
                shape = rng.random()
                held = shared[key]
                cut = rng.randrange(1, len(held)) if len(held) > 1 else 1
                if shape < 0.4:
                    acked, shared[key] = held, []        # its shares, whole, in order
                elif shape < 0.5:
                    acked, shared[key] = held[::-1], []  # out of order
                elif shape < 0.55:
                    acked, shared[key] = held[:cut], held[cut:]  # part, the rest later
                elif shape < 0.6:
                    acked = held[:cut]                   # part, then all of it again later
                elif shape < 0.65 and len(held) > 2:
                    # all but its second mid, never acked: the key's share
                    # found, but not all its mids next
                    acked, shared[key] = held[:1] + held[2:], []
                elif shape < 0.75:
                    acked, shared[key] = held + held, []  # twice in one ack
                elif shape < 0.85 and packs[key]:
                    # a pack's and its shares' mids in one ack, in mid order
                    acked, shared[key] = sorted(held + packs[key].pop()), []
                else:
                    store.ack(key, held[cut:])           # the rest first, then all
                    acked, shared[key] = held, []
                store.ack(key, acked)
            if step % 4 == 3:
                # a group's messages: a spack and a share a device
                members = rng.sample(keys, 3)
                items = [("g@p", rng.randbytes(16), rng.randbytes(rng.randrange(1, 300)),
                          T0 + n + i, members) for i in range(rng.randrange(1, 6))]
                mids = await store.put_many(items)
                for key in members:
                    shared[key] += mids
            else:
                items = []
                for _ in range(rng.randrange(1, 40)):
                    key = rng.choice(keys)
                    items.append(("s@p", rng.randbytes(16), rng.randbytes(rng.randrange(0, 400)),
                                  T0 + n, [key]))
                mids = await store.put_many(items)
                mine: dict[int, list[int]] = {}
                for (_, _, _, _, (key,)), mid in zip(items, mids):
                    mine.setdefault(key, []).append(mid)
                for key, got in mine.items():
                    packs[key].append(got)
            n += 100
            seen.append(list(mids))
            if step % 10 == 9:
                await store.flush()
                for key in keys:
                    seen.append([tuple(m) for m in await store.load(key, 0, 10_000)])
        await store.flush()
        seen.append(sorted((await store.backlog_counts()).items()))
        seen.append(await store.count_pending())
        fast = store._fast
        counters = {"committed": fast.committed if fast else 0,
                    "handed_back": fast.handed_back if fast else 0,
                    "commits": store.commits, "rewrites": store.rewrites,
                    "failed": store.failed_batches,
                    "by_walk": sum(by_walk), "by_drops": sum(by_drops)}
    finally:
        await store.close()
    return seen, counters


def _ways() -> list:
    ways = [pytest.param(store_mod.PySqlFast, id="specification")]
    if fastroute.COMPILED:
        from fastroute._core import SqlFast
        ways.append(pytest.param(SqlFast, id="compiled"))
    return ways


@pytest.mark.parametrize("way", _ways())
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_common_transaction_leaves_what_the_general_path_leaves(tmp_path, monkeypatch,
                                                                    way, seed):
    fast_db, slow_db = str(tmp_path / "fast.db"), str(tmp_path / "slow.db")
    monkeypatch.setattr(store_mod, "_SqlFast", way)
    fast_seen, fast = asyncio.run(_traffic(fast_db, seed))
    monkeypatch.setattr(store_mod, "_SqlFast", None)
    slow_seen, slow = asyncio.run(_traffic(slow_db, seed))
    # both ways were taken: whole transactions in one call, and ones it
    # handed back to the general path (an ack it could not apply alone)
    assert fast["committed"] > 0 and fast["handed_back"] > 0, fast
    # group members' acks of whole shares, compiled: in the common
    # transaction's walk, and (after a row acked in part) the general path's
    assert fast["by_walk"] > 0 and fast["by_drops"] > 0, fast
    assert slow["committed"] == slow["handed_back"] == 0, slow
    assert slow["by_walk"] == slow["by_drops"] == 0, slow
    # no transaction failed over to the general path's split (which leaves
    # the same rows, so only this says the compiled one did its part)
    assert fast["failed"] == slow["failed"] == 0
    assert fast_seen == slow_seen
    assert _rows(fast_db) == _rows(slow_db)


def test_without_the_core_the_store_takes_the_general_path():
    # the specification would save nothing there: it is the GIL's hand-offs
    # around each of the sqlite3 module's statements that the twin saves
    if fastroute.COMPILED:
        from fastroute._core import SqlFast
        assert store_mod._SqlFast is SqlFast
    else:
        assert store_mod._SqlFast is None


@needs_c
def test_the_compiled_transaction_carries_a_device_that_acks_every_delivery(tmp_path):
    # the 1:1 steady state: each transaction acks the pack the last one wrote
    async def main():
        store = await SqliteStore.open(str(tmp_path / "s.db"), synchronous="NORMAL")
        key = store.register_device("a@p", "1")
        await store.flush()
        before = store._fast.committed
        last = None
        for i in range(20):
            if last is not None:
                store.ack(key, last, validate=False)
            last = list(await store.put_many(
                [("s@p", bytes([i]) * 16, b"x" * 100, T0, [key])] * 8))
        store.ack(key, last)
        await store.flush()
        left = await store.count_pending(key)
        committed = store._fast.committed - before
        handed_back = store._fast.handed_back
        await store.close()
        return left, committed, handed_back
    left, committed, handed_back = asyncio.run(main())
    assert left == 0
    assert committed >= 20 and handed_back == 0  # every one of them, whole
    rows = _rows(str(tmp_path / "s.db"))
    assert rows["packs"] == [] and rows["messages"] == []


@needs_c
def test_the_compiled_transaction_carries_a_group_whose_members_ack_every_delivery(
        tmp_path, monkeypatch):
    # a group's steady state: each transaction stores a spack and its shares
    # and applies the members' acks of the last one's, in one compiled call
    # (the shares' messages released in it, the spacks acked by every member
    # deleted in it), none of it through the general path's statements
    general: list = []
    ack_rows = store_mod._ack_rows

    def spy(conn, acks, *args):
        general.extend(m for m in acks.values() if m)
        return ack_rows(conn, acks, *args)

    monkeypatch.setattr(store_mod, "_ack_rows", spy)
    # the statements the writer's connection ran, the compiled call's too
    traced: list[str] = []
    setup = SqliteStore._setup

    def traced_setup(self):
        out = setup(self)
        self._wconn.set_trace_callback(traced.append)
        return out

    monkeypatch.setattr(SqliteStore, "_setup", traced_setup)

    async def main():
        store = await SqliteStore.open(str(tmp_path / "s.db"), synchronous="NORMAL")
        keys = [store.register_device(f"m{i}@p", "1") for i in range(3)]
        await store.flush()
        before = store._fast.committed, store._fast.handed_back
        traced.clear()
        last = None
        spacks = []
        reader = sqlite3.connect(str(tmp_path / "s.db"))
        for i in range(20):
            if last is not None:
                for key in keys:
                    store.ack(key, last, validate=False)
            last = list(await store.put_many(
                [("s@p", bytes([i, j]) * 8, b"x" * 100, T0, keys) for j in range(8)]))
            spacks.append(reader.execute("SELECT count(*) FROM spacks").fetchone()[0])
        reader.close()
        committed = store._fast.committed - before[0]
        handed_back = store._fast.handed_back - before[1]
        for key in keys:
            store.ack(key, last)
        await store.flush()
        left = await store.count_pending()
        await store.close()
        return left, committed, handed_back, spacks
    left, committed, handed_back, spacks = asyncio.run(main())
    assert left == 0
    assert committed == 20 and handed_back == 0
    # each member's acks found its share without a seek in packs first: the
    # walk starts with the kind of row it matched last (one probe of packs
    # in all, the first drop's, where each drop began with packs: 57)
    probes = [sql for sql in traced if sql.startswith("SELECT mids FROM packs")]
    assert len(probes) <= 1, len(probes)
    # and every share was deleted: the last spack's by the acks after the loop
    assert sum(sql.startswith("DELETE FROM shares") for sql in traced) == 20 * 3
    # the spack every member acked went in the transaction of the next one
    assert spacks == [1] * 20
    assert general == []
    rows = _rows(str(tmp_path / "s.db"))
    assert rows["spacks"] == [] and rows["shares"] == [] and rows["messages"] == []


def _blank(tmp_path, way) -> tuple[sqlite3.Connection, object]:
    """A store file with the schema and no rows, and ``way`` made on it."""
    path = str(tmp_path / "x.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(store_mod._SCHEMA)
    return conn, way(conn, path)


def _mids(*ms: int) -> bytes:
    """A mids blob (native int64s)."""
    return array.array("q", ms).tobytes()


def _pack(first: int, *rest: int) -> list:
    """A pack row of device 1 holding mids ``first, *rest``."""
    return [1, first, (rest or (first,))[-1], 1 + len(rest), 10, 99, _mids(first, *rest),
            b"data"]


def _spack(first: int, *rest: int) -> list:
    """A spack row holding mids ``first, *rest``."""
    every = (first, *rest)
    return [first, every[-1], len(every), 10, 99, _mids(*every),
            array.array("i", [1] * len(every)).tobytes(), _mids(*[99] * len(every)), _mids(1),
            b"d"]


def _share(dev: int, first: int, last: int) -> list:
    """A share row: device ``dev`` holds all spack ``first`` holds (to ``last``)."""
    return [dev, first, last, 1, 10, 99, None]


@pytest.mark.parametrize("way", _ways())
def test_a_failing_common_transaction_rolls_back_and_says_why(tmp_path, way):
    conn, fast = _blank(tmp_path, way)
    mids = _mids

    def packs() -> list:
        return conn.execute("SELECT dev, first FROM packs ORDER BY 2").fetchall()

    assert fast.run([], _pack(5, 6) + _pack(7) + _pack(8, 9), 7, True, True) == []
    assert not conn.in_transaction
    # the same pack again: the primary key refuses it, nothing stays half-done
    with pytest.raises(sqlite3.IntegrityError) as excinfo:
        fast.run([1, mids(5, 6)], _pack(20) + _pack(7), -1, True, True)
    # the primary code's name (the sqlite3 module may add the extended one's)
    assert excinfo.value.sqlite_errorname.startswith("SQLITE_CONSTRAINT")
    assert not conn.in_transaction
    assert packs() == [(1, 5), (1, 7), (1, 8)]
    # acks walked pack by pack: two whole packs, then one that stops short
    # (part of a pack) and one that finds none; the rows wait for the caller
    assert fast.run([1, mids(5, 6, 7), 1, mids(8), 2, mids(5)], _pack(30), 31, True,
                    True) == [(1, 0), (2, 0)]
    assert conn.in_transaction
    assert packs() == [(1, 8)]
    # ... which applies the rest, then finishes with a second call
    assert fast.run([], _pack(30), 31, False, True) == []
    assert not conn.in_transaction
    assert packs() == [(1, 8), (1, 30)]
    assert conn.execute("SELECT v FROM meta WHERE k = 'next_mid'").fetchone() == (31,)
    # whole packs until a mid no pack starts with; a pack longer than the rest
    assert fast.run([1, mids(8, 9, 30, 31)], [], -1, True, True) == [(0, 3)]
    assert packs() == []
    conn.execute("ROLLBACK")
    assert fast.run([1, mids(8)], [], -1, True, True) == [(0, 0)]
    conn.execute("ROLLBACK")
    # a failure after a call that left the transaction open rolls back all of it
    assert fast.run([1, mids(30)], [], -1, True, False) == []
    assert conn.in_transaction
    with pytest.raises(sqlite3.IntegrityError):
        fast.run([], _pack(40) + _pack(40), -1, False, True)
    assert not conn.in_transaction
    assert packs() == [(1, 8), (1, 30)]
    with pytest.raises(fastroute.errors.WrongType):
        fast.run([1, "not bytes"], [], -1, True, True)
    with pytest.raises(OverflowError):
        fast.run([1 << 63, mids(8)], [], -1, True, True)
    with pytest.raises(fastroute.errors.InvalidArgument):
        fast.run([1, b"seven b"], [], -1, True, True)
    with pytest.raises(fastroute.errors.InvalidArgument):
        fast.run([1], [], -1, True, True)
    assert not conn.in_transaction
    assert (fast.committed, fast.handed_back) == (2, 4)
    fast.close()
    with pytest.raises(RuntimeError):
        fast.run([], [], -1, True, True)
    conn.close()


@pytest.mark.parametrize("way", _ways())
def test_whole_shares_in_order_are_dropped_and_the_rest_left(tmp_path, way):
    conn, fast = _blank(tmp_path, way)
    mids = _mids

    def share(dev: int, first: int, held: bytes | None, last: int) -> list:
        return [dev, first, last, 1, 10, 99, held]

    def shares() -> list:
        return conn.execute("SELECT dev, first FROM shares ORDER BY 1, 2").fetchall()

    # spacks 10 (10-12), 20 (20-21) and 30 (30); device 1 holds all of
    # each (mids NULL), device 2 only 11 and 12 of spack 10 (a rewritten share)
    rows = (share(1, 10, None, 12) + share(1, 20, None, 21) + share(1, 30, None, 30)
            + share(2, 10, mids(11, 12), 12))
    assert fast.run([], [], -1, True, True, _spack(10, 11, 12) + _spack(20, 21) + _spack(30),
                    rows) == []
    assert len(shares()) == 4
    with pytest.raises(fastroute.errors.InvalidArgument, match="transaction"):
        fast.drop_shares([1, mids(10, 11, 12)])
    conn.execute("BEGIN")
    # device 1: two whole shares in order, then 30 with a mid past it; device
    # 2: a share not keyed by its first mid (11: the key is 10); device 3: none
    assert fast.drop_shares([1, mids(10, 11, 12, 20, 21, 30, 31), 2, mids(11, 12),
                             3, mids(10)]) == [0, 10, 3, 0, 20, 2, 0, 30, 1]
    assert shares() == [(2, 10)]
    conn.execute("ROLLBACK")
    conn.execute("BEGIN")
    # the key's share found, but not all its mids next (11 is not acked), or
    # in another order, or fewer than it holds: each stops there
    assert fast.drop_shares([1, mids(10, 12, 20), 1, mids(10, 12, 11), 1, mids(10, 11)]) \
        == []
    # a drop of the mids after a whole share's: the next share only
    assert fast.drop_shares([1, mids(20, 21, 10, 11, 12)]) == [0, 20, 2, 0, 10, 3]
    assert shares() == [(1, 30), (2, 10)]
    conn.execute("ROLLBACK")
    with pytest.raises(fastroute.errors.WrongType):
        conn.execute("BEGIN")
        fast.drop_shares([1, "not bytes"])
    with pytest.raises(OverflowError):
        fast.drop_shares([1 << 63, mids(10)])
    with pytest.raises(fastroute.errors.InvalidArgument):
        fast.drop_shares([1, b"seven b"])
    with pytest.raises(fastroute.errors.InvalidArgument):
        fast.drop_shares([1])
    conn.execute("ROLLBACK")
    assert len(shares()) == 4  # nothing was written by the refused calls
    # a spack or share row of the wrong shape or type writes nothing
    with pytest.raises(fastroute.errors.InvalidArgument):
        fast.run([], [], -1, True, True, _spack(40)[:-1], [])
    with pytest.raises(fastroute.errors.WrongType):
        fast.run([], [], -1, True, True, [], share(1, 40, "text", 40))
    # a share for a key already there: refused, and its spack with it
    with pytest.raises(sqlite3.IntegrityError):
        fast.run([], [], -1, True, True, _spack(40), share(1, 40, None, 40) * 2)
    assert not conn.in_transaction
    assert conn.execute("SELECT first FROM spacks ORDER BY 1").fetchall() == [(10,), (20,), (30,)]
    fast.close()
    with pytest.raises(RuntimeError):
        fast.drop_shares([])
    conn.close()


def _counts_of(*spacks: list[int], held: int) -> store_mod._Counts:
    """A writer's counts of ``spacks`` (one transaction's block), each of
    their messages held by ``held`` devices."""
    counts = store_mod._Counts()
    every = [m for sp in spacks for m in sp]
    counts.add(every[0], _mids(*every), array.array("i", [held] * len(every)).tobytes(),
               _mids(*[sp[0] for sp in spacks]),
               array.array("i", [len(sp) for sp in spacks]).tobytes(), [0] * len(spacks))
    counts.begin()
    counts.commit()
    return counts


@pytest.mark.parametrize("way", _ways())
def test_a_group_commit_releases_its_shares_in_the_call(tmp_path, way):
    # a group's steady state, one call: the members' acks walk their shares,
    # the shares' messages are released in the counts, a spack no member
    # holds anything of is deleted, and the new rows are written and committed
    conn, fast = _blank(tmp_path, way)
    mids = _mids

    def table(name: str) -> list:
        return conn.execute(f"SELECT * FROM {name} ORDER BY 1, 2").fetchall()

    # spacks 10 (10-12) and 20 (20-21), devices 1 and 2 holding all of each
    assert fast.run([], [], -1, True, True, _spack(10, 11, 12) + _spack(20, 21),
                    _share(1, 10, 12) + _share(2, 10, 12) + _share(1, 20, 21)
                    + _share(2, 20, 21)) == []
    counts = _counts_of([10, 11, 12], [20, 21], held=2)
    before = fast.committed, fast.handed_back
    # device 1 acks spack 10's, device 2 spack 10's and 20's; a new spack
    # (30) and its shares come with them
    keys = [1, 2]
    acks = {1: [10, 11, 12], 2: [10, 11, 12, 20, 21]}
    gone: dict = {}
    walked: list = []
    assert fast.run([1, mids(10, 11, 12), 2, mids(10, 11, 12, 20, 21)], [], 40, True, True,
                    _spack(30), _share(1, 30, 30) + _share(2, 30, 30), [], walked,
                    (counts, keys, acks, gone)) == []
    assert (fast.committed, fast.handed_back) == (before[0] + 1, before[1])
    assert not conn.in_transaction
    assert walked == [0, 10, 3, 1, 10, 3, 1, 20, 2]
    # every message of spack 10 is gone, and the spack with them; spack 20's
    # are still device 1's
    assert gone == {10: [10, 11, 12]}
    assert counts.left(10) == 0 and counts.left(20) == 2
    assert [r[0] for r in table("spacks")] == [20, 30]
    assert [r[:2] for r in table("shares")] == [(1, 20), (1, 30), (2, 30)]
    assert table("meta") == [("next_mid", 40)]
    # without a release the same walk hands the transaction back (as before
    # it: the caller releases and finishes)
    walked = []
    assert fast.run([1, mids(20, 21)], [], -1, True, True, [], [], [], walked) == []
    assert conn.in_transaction and walked == [0, 20, 2]
    assert fast.handed_back == before[1] + 1
    conn.execute("ROLLBACK")
    # a drop that stops short hands it back too, its walked shares not
    # released: the caller's general path does both
    gone = {}
    walked = []
    assert fast.run([1, mids(20, 21, 30, 31)], [], -1, True, True, [], [], [], walked,
                    (counts, [1], {1: [20, 21, 30, 31]}, gone)) == [(0, 3)]
    assert conn.in_transaction and walked == [0, 20, 2, 0, 30, 1] and gone == {}
    assert counts.left(20) == 2
    conn.execute("ROLLBACK")
    # an error of the release (counts that are not the writer's: the
    # release reads the drop's own mids, never the acks) rolls the whole
    # transaction back: the walk's deletes too
    rows = table("shares"), table("spacks")
    with pytest.raises(AttributeError):
        fast.run([1, mids(20, 21)], [], -1, True, True, _spack(40), [], [], [],
                 (object(), [1], {}, {}))
    assert not conn.in_transaction
    assert (table("shares"), table("spacks")) == rows
    # so does an SQLite error after the release (spack 20 deleted, then
    # spack 30's key taken); the counts are the caller's to roll back, as
    # the store's writer does
    counts.begin()
    with pytest.raises(sqlite3.IntegrityError):
        fast.run([1, mids(20, 21)], [], -1, True, True, _spack(30), [], [], [],
                 (counts, [1], {1: [20, 21]}, {}))
    assert not conn.in_transaction
    assert (table("shares"), table("spacks")) == rows
    assert counts.left(20) == 0
    counts.rollback()
    assert counts.left(20) == 2
    # a release of the wrong shape writes nothing
    for release, error in (([counts, [1], {}, {}], fastroute.errors.WrongType),
                           ((counts, [1], {}), fastroute.errors.WrongType),
                           ((counts, (1,), {}, {}), fastroute.errors.WrongType),
                           ((counts, [1], [], {}), fastroute.errors.WrongType)):
        with pytest.raises(error):
            fast.run([1, mids(20, 21)], [], -1, True, True, [], [], [], [], release)
    with pytest.raises(fastroute.errors.InvalidArgument, match="shares"):
        fast.run([1, mids(20, 21)], [], -1, True, True, [], [], [], None,
                 (counts, [1], {1: [20, 21]}, {}))
    assert not conn.in_transaction
    assert (table("shares"), table("spacks")) == rows
    fast.close()
    conn.close()


@pytest.mark.parametrize("way", _ways())
def test_a_walk_takes_packs_and_shares_as_they_come(tmp_path, way):
    conn, fast = _blank(tmp_path, way)
    mids = _mids

    def rows() -> tuple:
        return (conn.execute("SELECT dev, first FROM packs ORDER BY 1, 2").fetchall(),
                conn.execute("SELECT dev, first FROM shares ORDER BY 1, 2").fetchall(),
                conn.execute("SELECT first FROM spacks ORDER BY 1").fetchall())

    # device 1: pack 5 (5, 6), its share of spack 10 (10, 11), pack 20, its
    # share of spack 30 (30); device 2: its shares of spacks 10 and 30
    assert fast.run([], _pack(5, 6) + _pack(20), -1, True, True, _spack(10, 11) + _spack(30),
                    _share(1, 10, 11) + _share(2, 10, 11) + _share(1, 30, 30)
                    + _share(2, 30, 30)) == []
    # without shares the walk stops at the first share, as before
    assert fast.run([1, mids(5, 6, 10, 11, 20)], [], -1, True, False) == [(0, 2)]
    conn.execute("ROLLBACK")
    # with them it takes either kind as it comes, and records the shares
    walked: list = []
    assert fast.run([1, mids(5, 6, 10, 11, 20, 30), 2, mids(10, 11)], _pack(40), 41, True,
                    True, shares=walked) == []
    assert walked == [0, 10, 2, 0, 30, 1, 1, 10, 2]
    # a share was deleted: nothing after the drops, the transaction handed back
    assert conn.in_transaction
    assert rows() == ([], [(2, 30)], [(10,), (30,)])
    # the caller's second call: the spacks no device holds, the new rows, COMMIT
    assert fast.run([], _pack(40), 41, False, True, [], [], [10]) == []
    assert not conn.in_transaction
    assert rows() == ([(1, 40)], [(2, 30)], [(30,)])
    assert conn.execute("SELECT v FROM meta WHERE k = 'next_mid'").fetchone() == (41,)
    # a share acked in part stops the walk there: what it matched is counted
    walked = []
    assert fast.run([2, mids(40, 30, 31)], [], -1, True, True, shares=walked) == [(0, 0)]
    conn.execute("ROLLBACK")
    assert fast.run([1, mids(40), 2, mids(30, 31)], [], -1, True, True,
                    shares=walked) == [(1, 1)]
    assert walked == [1, 30, 1]
    conn.execute("ROLLBACK")
    # only packs walked whole, no share: one call, committed as before
    assert fast.run([1, mids(40)], [], -1, True, True, shares=walked) == []
    assert not conn.in_transaction and walked == [1, 30, 1]
    # values of the wrong type write nothing
    before = rows()
    with pytest.raises(TypeError):
        fast.run([], [], -1, True, True, None, None, ["30"])
    with pytest.raises(OverflowError):
        fast.run([], [], -1, True, True, None, None, [1 << 63])
    with pytest.raises(TypeError):
        fast.run([2, mids(30)], [], -1, True, True, shares=())
    assert not conn.in_transaction and rows() == before
    conn.close()


@pytest.mark.parametrize("way", _ways())
def test_a_large_group_s_shares_go_a_chunk_a_statement(tmp_path, way):
    # 2 whole chunks and 6 more: the rows are the same whichever statement
    conn, fast = _blank(tmp_path, way)
    n = 2 * store_mod.PySqlFast.SHARES_CHUNK + 6
    spack = [5, 5, 1, 10, 99, _mids(5), array.array("i", [1]).tobytes(), _mids(99),
             _mids(*range(1, 2 * store_mod.PySqlFast.SHARES_CHUNK + 7)), b"d"]
    shares = []
    for dev in range(1, n + 1):
        shares += [dev, 5, 5, 1, 10, 99, None if dev % 3 else _mids(5)]
    assert fast.run([], [], -1, True, True, spack, shares) == []
    got = conn.execute("SELECT dev, first, last, n, nbytes, exp_ms, mids FROM shares "
                       "ORDER BY dev").fetchall()
    assert got == [tuple(shares[i:i + 7]) for i in range(0, len(shares), 7)]
    conn.close()


@needs_c
def test_a_large_group_s_transaction_takes_the_general_path_and_its_acks_compiled(tmp_path):
    # past _FAST_SHARES new shares the sqlite3 module's statements of 128
    # rows cost less than the compiled path's; the acks of whole shares are
    # still applied by the compiled call
    async def main():
        store = await SqliteStore.open(str(tmp_path / "s.db"), synchronous="NORMAL")
        many = [store.register_device(f"m{i}@p", "1") for i in range(store_mod._FAST_SHARES + 1)]
        await store.flush()
        fast = store._fast
        before = fast.committed, fast.handed_back
        mids = list(await store.put_many([("s@p", b"a" * 16, b"x", T0, many)]))
        after_large = fast.committed, fast.handed_back
        by_walk, by_drops = _count_compiled_shares(store)
        for key in many:
            store.ack(key, mids, validate=False)
        await store.put_many([("s@p", b"b" * 16, b"x", T0, many[:10])])
        after_small = fast.committed
        await store.flush()
        left = await store.count_pending()
        await store.close()
        return before, after_large, after_small, by_walk + by_drops, left
    before, after_large, after_small, dropped, left = asyncio.run(main())
    assert after_large == before  # the large group's put: the general path
    assert after_small == after_large[0] + 1  # a small group's: the compiled one
    assert sum(dropped) == store_mod._FAST_SHARES + 1
    assert left == 10


def test_the_twin_runs_its_specification_s_statements():
    ext = Path(__file__).resolve().parents[1] / "ext" / "fastroute"
    text = (ext / "_sqlfast.pxi").read_text()
    # each statement: b"..." or (b"..." b"..."), evaluated as Python reads it
    literal = r'^SQ_TEXT\[\d+\] = (\((?:\s*b"[^"]*")+\s*\)|b"[^"]*")'
    texts = {ast.literal_eval(m.group(1)).decode() for m in re.finditer(literal, text, re.M)}
    spec = store_mod.PySqlFast
    assert texts == {"BEGIN", "COMMIT", "ROLLBACK", spec.SQL_FIND, spec.SQL_DROP,
                     spec.SQL_PACK, spec.SQL_MARK, spec.SQL_SFIND, spec.SQL_SDROP,
                     spec.SQL_SPACK, spec.SQL_SHARE, spec.SQL_SPDROP}
    if fastroute.COMPILED:
        from fastroute import _core
        assert _core.SQ_SHARES_TEXT.decode() == spec.SQL_SHARES


@pytest.mark.parametrize("way", _ways())
def test_the_common_transaction_refuses_a_connection_it_cannot_vouch_for(tmp_path, way):
    conn = sqlite3.connect(str(tmp_path / "a.db"))
    with pytest.raises(RuntimeError):
        way(conn, str(tmp_path / "b.db"))  # not the file it is on
    with pytest.raises(fastroute.errors.WrongType):
        way(object(), str(tmp_path / "a.db"))
    conn.close()
    with pytest.raises(RuntimeError, match="closed"):
        way(conn, str(tmp_path / "a.db"))


def test_without_the_compiled_transaction_the_store_still_serves(tmp_path, monkeypatch, caplog):
    class Unavailable:
        def __init__(self, conn, path):
            raise RuntimeError("the sqlite3 C API is not reachable")

    monkeypatch.setattr(store_mod, "_SqlFast", Unavailable)

    async def main():
        store = await SqliteStore.open(str(tmp_path / "s.db"))
        key = store.register_device("a@p", "1")
        mids = await store.put_many([("s@p", bytes(16), b"hi", T0, [key])])
        store.ack(key, mids)
        await store.flush()
        left = await store.count_pending(key)
        fast = store._fast
        await store.close()
        return left, fast
    with caplog.at_level(logging.INFO, logger="fastroute.store"):
        left, fast = asyncio.run(main())
    assert left == 0 and fast is None
    assert "compiled path is off" in caplog.text


@needs_c
def test_the_twin_refuses_a_python_whose_connection_layout_it_does_not_know(tmp_path,
                                                                          monkeypatch):
    # the handle is read from inside the sqlite3 module's object: only where
    # its place is known, before anything is read there
    from fastroute._core import SqlFast
    path = str(tmp_path / "a.db")
    conn = sqlite3.connect(path)
    conn.executescript(store_mod._SCHEMA)
    monkeypatch.setattr(sys, "version_info", (3, 99, 0, "final", 0))
    with pytest.raises(RuntimeError, match="layout is not known"):
        SqlFast(conn, path)
    monkeypatch.undo()
    SqlFast(conn, path).close()
    conn.close()


def _commits(conn: sqlite3.Connection, n: int) -> None:
    """``n`` transactions of a row each (a frame or more each in the WAL)."""
    for _ in range(n):
        conn.execute("INSERT INTO t VALUES (?)", (bytes(3000),))


@needs_c
@pytest.mark.parametrize("held", [True, False], ids=["held", "sqlite-s-own"])
def test_held_checkpoints_leave_the_commits_and_run_when_asked(tmp_path, held):
    # SQLite checkpoints inside the commit that brings the WAL to 1,000
    # frames; held, the commits only note the frames and the writer copies
    # them when it asks (after the batch's answers were posted)
    from fastroute._core import SqlFast
    path = str(tmp_path / "w.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    conn.executescript(store_mod._SCHEMA)  # the twin's statements are on it
    conn.execute("CREATE TABLE t(x BLOB)")
    fast = SqlFast(conn, path)
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    if held:
        assert fast.hold_checkpoints() is True
        # SQLite reads its mark from its own hook: replaced, it says 0
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    size = Path(path).stat().st_size
    _commits(conn, 1200)
    if not held:
        # SQLite copied the WAL at its mark and started it over
        assert fast.wal_frames == 0
        assert Path(path).stat().st_size > size
        _, log, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert log < 1000
        fast.close()
        conn.close()
        return
    frames = fast.wal_frames
    assert frames >= 1200
    assert Path(path).stat().st_size == size  # nothing copied in any commit
    assert fast.checkpoint() == (frames, frames)
    assert fast.wal_frames == 0
    assert Path(path).stat().st_size > size
    # all of it was copied: the next commit starts the WAL over
    _commits(conn, 1)
    assert 0 < fast.wal_frames < 10
    fast.close()
    # SQLite has its own hook back, and checkpoints in the commits again
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    conn.close()


def test_the_specification_leaves_sqlite_s_checkpoints_in_the_commits(tmp_path):
    # the sqlite3 module cannot replace SQLite's WAL hook: nothing held, and
    # a checkpoint asked for still runs
    conn, spec = _blank(tmp_path, store_mod.PySqlFast)
    conn.execute("PRAGMA journal_mode = WAL")
    assert spec.hold_checkpoints() is False
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    conn.execute("INSERT INTO meta(k, v) VALUES ('x', 1)")
    log, copied = spec.checkpoint()
    assert log == copied > 0
    assert spec.wal_frames == 0
    spec.close()
    conn.close()


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_c), False],
                         ids=["compiled", "no-core"])
def test_the_store_s_writer_checkpoints_the_wal_between_batches(tmp_path, monkeypatch,
                                                                compiled):
    # 1,500 puts of 6 KB, each a commit of a frame or more: the WAL crosses
    # SQLite's mark at least once; held, the writer checkpoints it (and
    # counts it), and the WAL never holds much more than the mark's frames
    if not compiled:
        monkeypatch.setattr(store_mod, "_SqlFast", None)
    path = str(tmp_path / "s.db")

    async def main():
        store = await SqliteStore.open(path, synchronous="NORMAL")
        key = store.register_device("a@p", "1")
        body = bytes(6000)
        for i in range(1500):
            await store.put_many([("s@p", i.to_bytes(16, "big"), body, T0, [key])],
                                 validate=False)
        seen = store.wal_checkpoints, store._checkpoints_held
        frames = store._fast.wal_frames if store._fast is not None else None
        await store.close()
        return seen, frames
    (checkpoints, held), frames = asyncio.run(main())
    assert held is compiled
    if compiled:
        assert checkpoints >= 1
        assert frames < store_mod._CHECKPOINT_FRAMES
    else:
        assert checkpoints == 0
    # the WAL's size is the most it held (the compiled layer empties it in
    # place): the mark's frames and a commit's, not the 1,500 puts'
    page = store_mod._PAGE_SIZE
    wal = Path(path + "-wal")
    assert not wal.exists() or wal.stat().st_size <= (store_mod._CHECKPOINT_FRAMES + 16) \
        * (page + 24) + 32
