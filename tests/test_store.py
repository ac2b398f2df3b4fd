"""Behaviour of the message store, for both implementations and both loops.

Every behavioural test runs against SqliteStore (a real file in tmp_path) and
MemoryStore, under the asyncio and the uvloop event loop.  Durability, group
commit and failure handling are SQLite-only.  No test asserts a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sqlite3
import sys
import threading

import msgpack
import pytest
from cliutil import thread_counter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastroute.errors import (
    ErrorCode,
    FastrouteError,
    InvalidArgument,
    StoreFailed,
    UnknownDevice,
    WrongType,
)
from fastroute import store as store_mod
from fastroute import wire
from fastroute.store import MemoryStore, SqliteStore, Store

LOOPS = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
    pass
else:
    LOOPS["uvloop"] = uvloop.new_event_loop

CID = bytes(range(16))
T0 = 1_700_000_000_000


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """Run a coroutine to completion on a fresh loop of the given kind."""
    def run(coro):
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(coro)
    return run


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "store.db")


@pytest.fixture(params=["sqlite", "memory"])
def opener(request, db):
    """``await opener(**options)`` opens the implementation under test."""
    cls = SqliteStore if request.param == "sqlite" else MemoryStore

    def open_(**options):
        return cls.open(db, **options)
    open_.cls = cls
    return open_


# -- the Store protocol --------------------------------------------------------------

def _protocol_methods() -> list[str]:
    return sorted(name for name, member in vars(Store).items()
                  if inspect.isfunction(member) and not name.startswith("_"))


def test_store_protocol_is_what_the_relay_calls():
    # the relay's calls, no more: a method added here is one every store
    # (and every embedder's) must then provide
    assert _protocol_methods() == ["ack", "close", "expire", "flush", "known_devices",
                                   "load", "put_many", "register_device"]


def _shape(func) -> tuple:
    sig = inspect.signature(func)
    params = [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values()]
    return inspect.iscoroutinefunction(func), params, sig.return_annotation


@pytest.mark.parametrize("cls", [SqliteStore, MemoryStore], ids=lambda c: c.__name__)
def test_both_stores_satisfy_the_store_protocol(cls):
    assert issubclass(cls, Store)  # runtime_checkable: every member is present
    for name in _protocol_methods():
        # same parameters (names, kinds, defaults, annotations), same
        # return type, async where the protocol is
        assert _shape(getattr(cls, name)) == _shape(getattr(Store, name)), name


def test_an_open_store_is_a_store(run, opener):
    async def go():
        store = await opener()
        try:
            assert isinstance(store, Store)
        finally:
            await store.close()
    run(go())


def raw(db):
    """An independent connection: sees only what is committed."""
    return sqlite3.connect(db, isolation_level=None)


def count(db, sql, *params):
    conn = raw(db)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()


def _on_disk(db) -> bytes:
    """Every byte of the store's file and its WAL (what a disk image would hold)."""
    return b"".join(open(p, "rb").read() for p in (db, db + "-wal") if os.path.exists(p))


def _spacked(db) -> list[int]:
    """The mids of the messages for several devices stored in spacks (all
    held by some device after a flush, which rewrites the spacks)."""
    conn = raw(db)
    try:
        return sorted(m for (blob,) in conn.execute("SELECT mids FROM spacks")
                      for m in store_mod._mids(blob))
    finally:
        conn.close()


async def writer_holds_its_batch(store, idle: bool = False) -> None:
    """Wait until the writer thread has taken its batch and is writing it
    (under a ``write_locked`` block: waiting for the lock); with ``idle``,
    until it has written everything queued and waits for more.  A fixed
    sleep was not enough on a loaded host, where the writer could still be
    gathering and take the requests queued next into the same batch."""
    ident = store._thread.ident
    want, other = ("_take_batch", "_write_batch") if idle else ("_write_batch", "_take_batch")
    for _ in range(5000):
        # the queue first: once it is empty, a _write_batch seen after is
        # that of the batch which took the last request
        if store._queue.qsize():
            await asyncio.sleep(0.001)
            continue
        frame = sys._current_frames().get(ident)
        names = set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        if want in names and other not in names:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the writer never reached {want}")


async def several_puts_in_a_batch(store, db, dev: int, body: bytes, rest: bytes) -> list[int]:
    """Put one message with ``body``, then two with ``rest`` while the writer
    still writes the first, so that those two share its next batch (which
    makes the batch after it wait for more puts); the first put's mids."""
    await writer_holds_its_batch(store, idle=True)
    with write_locked(db):
        first = store.put_many([("s@p", CID, body, T0, [dev])])
        await writer_holds_its_batch(store)
        queued = [store.put_many([("s@p", CID, rest, T0, [dev])]) for _ in range(2)]
    return (await asyncio.gather(first, *queued))[0]


@contextlib.contextmanager
def write_locked(db):
    """Another connection holds the write lock: the writer's next write waits
    (or, past its busy timeout, fails) until the block ends."""
    lock = raw(db)
    lock.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        lock.execute("ROLLBACK")
        lock.close()


def store_failed(excinfo) -> bool:
    return (isinstance(excinfo.value, FastrouteError)
            and excinfo.value.code == ErrorCode.STORE_FAILED)


def store_full(excinfo) -> bool:
    # a full disk or budget: STORE_FULL, still a StoreFailed for Python callers
    return (isinstance(excinfo.value, StoreFailed)
            and excinfo.value.code == ErrorCode.STORE_FULL)


# -- behaviour shared by both implementations --------------------------------

def test_put_then_load_round_trips(run, opener):
    async def main():
        async with await opener() as store:
            dev = store.register_device("bob@home", "phone")
            assert store.register_device("bob@home", "phone") == dev
            mid = await store.put("ann@third", CID, b"\x00body", T0, [dev])
            mid2 = await store.put("ann@third", CID, bytearray(b"two"), T0 + 1, [dev])
            assert mid2 > mid
            assert await store.load(dev, 0, 10) == [
                (mid, "ann@third", CID, b"\x00body", T0),
                (mid2, "ann@third", CID, b"two", T0 + 1)]
            assert await store.count_pending(dev) == 2
    run(main())


def test_put_many_returns_mids_in_order(run, opener):
    async def main():
        async with await opener() as store:
            a = store.register_device("a@p", "1")
            b = store.register_device("b@p", "1")
            assert await store.put_many([]) == []
            mids = await store.put_many(
                [("s@p", CID, bytes([i]), T0 + i, [a, b][: 1 + i % 2]) for i in range(50)])
            assert mids == sorted(mids) and len(set(mids)) == 50
            assert [m[0] for m in await store.load(a, 0, 100)] == mids
            assert [m[0] for m in await store.load(b, 0, 100)] == mids[1::2]
    run(main())


def _routes(first: int, bodies: list, devs: list, sender: str = "s@p", ts: int = T0) -> list:
    """What the relay's gate hands ``MemoryStore.put_now``: flat device keys,
    route ``(mid, DELIVER tail)`` a message, mids from ``first`` on."""
    out: list = []
    for i, (body, keys) in enumerate(zip(bodies, devs, strict=True)):
        tail = wire.deliver_tail(msgpack.packb(sender), CID, body, wire.ts_packed(ts), 0)
        out += (keys, (first + i, tail))
    return out


def _tails(items: list) -> list:
    """``put_tails``' flat ``device_keys, DELIVER tail`` for put_many items."""
    out: list = []
    for sender, cid, body, ts, devs in items:
        out += (devs, wire.deliver_tail(msgpack.packb(sender), cid, body, wire.ts_packed(ts), 0))
    return out


@pytest.mark.parametrize("validate", [True, False])
def test_put_tails_stores_what_put_many_stores(run, opener, validate):
    # the relay's SEND path hands the store each message as the DELIVER tail
    # it routes: stored, loaded and acked as the same message as an item
    async def main():
        async with await opener() as store:
            a = store.register_device("a@p", "1")
            b = store.register_device("b@p", "1")
            items = [("s@p", bytes([i]) * 16, b"x" * (i * 37 % 300), T0 + i, [(a,), (a, b)][i % 2])
                     for i in range(40)]
            assert await store.put_tails([], validate=validate) == []
            by_tail = await store.put_tails(_tails(items[:20]), validate=validate)
            by_item = await store.put_many(items[20:], validate=validate)
            mids = by_tail + by_item
            assert type(by_tail) is list and mids == list(range(mids[0], mids[0] + 40))
            rows = await store.load(a, 0, 100)
            assert rows == [(m, *it[:4]) for m, it in zip(mids, items)]
            assert await store.load(b, 0, 100) == rows[1::2]
            store.ack(a, mids)
            store.ack(b, mids[1::2])
            await store.flush()
            assert await store.count_pending() == 0
    run(main())


def test_put_tails_checks_its_tails_as_put_many_checks_items(run, opener):
    async def main():
        async with await opener() as store:
            a = store.register_device("a@p", "1")
            good = _tails([("s@p", CID, b"ok", T0, (a,))])
            for bad, error in ((good + [(a,)], InvalidArgument),        # keys without a tail
                               ([(a,), good[1][:-1]], InvalidArgument),  # a cut tail
                               ([(a,), bytearray(good[1])], WrongType),
                               ([(a + 1,), good[1]], UnknownDevice),
                               ([(), good[1]], InvalidArgument),
                               ([a, good[1]], WrongType)):
                with pytest.raises(error):
                    store.put_tails(good + bad)  # one bad: nothing queued
            assert await store.count_pending() == 0
    run(main())


def test_sqlite_a_bad_trusted_tail_fails_its_own_put_only(run, db):
    # as a bad trusted item: its request fails, its mids stay unused, and the
    # requests that share its transaction land
    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            await store.flush()
            with write_locked(db):
                first = store.put_tails(_tails([("s@p", CID, b"0", T0, (dev,))]),
                                        validate=False)
                await writer_holds_its_batch(store)
                good = store.put_tails(_tails([("s@p", CID, b"1", T0, (dev,))] * 3),
                                       validate=False)
                cut = _tails([("s@p", CID, b"2", T0, (dev,))] * 2)
                cut[3] = cut[3][:-1]
                bad = store.put_tails(cut, validate=False)
                items = store.put_many([("s@p", CID, b"3", T0, (dev,))], validate=False)
                assert store._queue.qsize() == 3
            (m0,), mids = await first, await good
            with pytest.raises(InvalidArgument):
                await bad
            assert await items == [mids[-1] + 3] and mids == [m0 + 1, m0 + 2, m0 + 3]
            assert store.failed_batches == 0
            assert [r[3] for r in await store.load(dev, 0, 10)] == [b"0", b"1", b"1", b"1", b"3"]
    run(main())


def _copies(items: list) -> list:
    """``put_copies``' flat ``device_keys, DDELIVER tail`` for copies given as
    ``(address, sender device, cid, body, ts_ms, device_keys)``."""
    out: list = []
    for address, device, cid, body, ts, devs in items:
        sp = msgpack.packb(address) + msgpack.packb(device)
        out += (devs, wire.deliver_tail(sp, cid, body, wire.ts_packed(ts), 0))
    return out


@pytest.mark.parametrize("validate", [True, False])
def test_sqlite_put_copies_stores_each_copy_as_a_message_from_its_sending_device(
        run, db, validate):
    # the keys stage hands the SQLite store a DSEND's copies as the DDELIVER
    # tails it delivers: each is stored, loaded and acked as the put_many
    # item whose sender is the copy's address/device_id
    async def main():
        async with await SqliteStore.open(db) as store:
            a = store.register_device("a@p", "1")
            b = store.register_device("a@p", "2")
            copies = [("s@p", 1 + i % 3, bytes([i]) * 16, b"x" * (i * 37 % 300), T0 + i,
                       [(a,), (b,)][i % 2]) for i in range(30)]
            assert await store.put_copies([], validate=validate) == []
            mids = await store.put_copies(_copies(copies), validate=validate)
            assert type(mids) is list and mids == list(range(mids[0], mids[0] + 30))
            want = [(m, f"{addr}/{dev}", cid, body, ts)
                    for m, (addr, dev, cid, body, ts, _) in zip(mids, copies)]
            assert await store.load(a, 0, 100) == want[0::2]
            assert await store.load(b, 0, 100) == want[1::2]
            # the same rows as put_many's items of those fields
            items = [(f"{addr}/{dev}", cid, body, ts, devs)
                     for addr, dev, cid, body, ts, devs in copies]
            again = await store.put_many(items)
            assert await store.load(a, mids[-1], 100) == [
                (m, *it[:4]) for m, it in zip(again, items)][0::2]
            store.ack(a, mids + again)
            store.ack(b, mids + again)
            await store.flush()
            assert await store.count_pending() == 0
    run(main())


def test_sqlite_put_copies_checks_its_tails_and_a_bad_trusted_one_fails_its_put_only(run, db):
    async def main():
        async with await SqliteStore.open(db) as store:
            a = store.register_device("a@p", "1")
            good = _copies([("s@p", 3, CID, b"ok", T0, (a,))])
            v1 = wire.deliver_tail(msgpack.packb("s@p"), CID, b"ok", wire.ts_packed(T0), 0)
            for bad, error in ((good + [(a,)], InvalidArgument),        # keys without a tail
                               ([(a,), v1], InvalidArgument),            # a v1 tail
                               ([(a,), good[1][:-1]], InvalidArgument),  # a cut tail
                               ([(a,), bytearray(good[1])], WrongType),
                               ([(a + 1,), good[1]], UnknownDevice),
                               ([(), good[1]], InvalidArgument)):
                with pytest.raises(error):
                    store.put_copies(good + bad)  # one bad: nothing queued
            assert await store.count_pending() == 0
            # trusted (validate=False): a bad one fails its own request, and
            # the requests that share its transaction land
            with write_locked(db):
                first = store.put_copies(good, validate=False)
                await writer_holds_its_batch(store)
                worse = store.put_copies(good + [(a,), v1], validate=False)
                after = store.put_copies(good * 2, validate=False)
            (m0,) = await first
            with pytest.raises(InvalidArgument):
                await worse
            assert await after == [m0 + 3, m0 + 4]  # the bad request's mids unused
            rows = await store.load(a, 0, 10)
            assert [r[0] for r in rows] == [m0, m0 + 3, m0 + 4]
            assert {r[1] for r in rows} == {"s@p/3"}
    run(main())


def test_memory_store_refuses_trusted_tails_without_their_pairs_and_stores_none(run):
    # validate=False takes the tails as given, but a flat list of odd length
    # has lost a message's keys or tail: refused before anything is stored
    async def main():
        store = await MemoryStore.open()
        a = store.register_device("a@p", "1")
        good = _tails([("s@p", CID, b"ok", T0, (a,))] * 2)
        first = store.next_mid()
        with pytest.raises(InvalidArgument):
            store.put_tails(good[:3], validate=False)
        assert await store.count_pending() == 0 and store.next_mid() == first
        assert await store.put_tails(good, validate=False) == [first, first + 1]
        await store.close()
    run(main())


def test_memory_store_puts_a_batch_at_once_from_the_mid_it_named(run):
    async def main():
        store = await MemoryStore.open()
        a = store.register_device("a@p", "1")
        b = store.register_device("b@p", "1")
        first = store.next_mid()
        bodies = [b"%d" % i for i in range(5)]
        routes = _routes(first, bodies, [[a, b][: 1 + i % 2] for i in range(5)])
        assert store.put_now(routes, first) == 5
        # a load reads each message back out of its route's tail
        assert await store.load(a, 0, 10) == [(first + i, "s@p", CID, bodies[i], T0)
                                              for i in range(5)]
        assert [m[3] for m in await store.load(b, 0, 10)] == [b"1", b"3"]
        assert store.next_mid() == first + 5
        # a batch whose mids would not be the ones its caller routed is
        # refused whole, before anything is stored
        with pytest.raises(InvalidArgument):
            store.put_now(routes, first)
        with pytest.raises(InvalidArgument):  # routes that do not carry those mids
            store.put_now(_routes(first + 6, [b"x"], [[a]]), first + 5)
        with pytest.raises(InvalidArgument):  # not flat pairs
            store.put_now(routes[:3], first + 5)
        assert await store.count_pending() == 7 and store.next_mid() == first + 5
        # a route that fails halfway (the gate never makes one): what came
        # before it is stored, and the mids go on after it
        bad = _routes(first + 5, [b"ok", b"no device"], [[a], []])
        with pytest.raises(InvalidArgument):
            store.put_now(bad, first + 5)
        assert store.next_mid() == first + 6 and await store.count_pending() == 8
        assert store.put_now(_routes(first + 6, [b"0"], [[a]]), first + 6) == 1
        assert [m[3] for m in await store.load(a, first + 4, 10)] == [b"ok", b"0"]
        await store.close()
        assert store.next_mid() is None
        with pytest.raises(FastrouteError):
            store.put_now(routes, first + 5)
    run(main())


def test_memory_store_routes_count_expire_and_mix_with_puts_as_items_do(run):
    async def main():
        store = await MemoryStore.open(ttl_s=60)
        a = store.register_device("a@p", "1")
        b = store.register_device("b@p", "1")
        old = _routes(store.next_mid(), [b"old", b"x" * 300], [[a], [a, b]], ts=T0)
        store.put_now(old, store.next_mid())
        mid = (await store.put_many([("t@p", CID, b"item", T0 + 30_000, [a, b])]))[0]
        young = _routes(store.next_mid(), [b"young"], [[b]], sender="u@p", ts=T0 + 40_000)
        store.put_now(young, store.next_mid())
        assert [(m[0], m[1], m[3]) for m in await store.load(b, 0, 10)] == [
            (mid - 1, "s@p", b"x" * 300), (mid, "t@p", b"item"), (mid + 1, "u@p", b"young")]
        # the caps' counts: messages and body bytes, a route's body from its tail
        assert await store.backlog_counts() == {a: (3, 3 + 300 + 4), b: (3, 300 + 4 + 5)}
        # expiry reads a route's stamp from its tail as an item's from the item
        assert await store.expire(T0 + 60_000) == 2
        assert [m[3] for m in await store.load(a, 0, 10)] == [b"item"]
        assert await store.expire(T0 + 100_000) == 2
        assert await store.count_pending() == 0 and await store.backlog_counts() == {}
        await store.close()
    run(main())


def test_memory_store_keeps_a_per_device_copy_as_its_route(run):
    # the keys stage's copies: (mid, DDELIVER tail, DDELIVER head), loaded
    # with the store's sender of a copy (address/device), counted, expired
    # and acked as any message
    async def main():
        store = await MemoryStore.open(ttl_s=60)
        a = store.register_device("a@p", "1")
        b = store.register_device("b@p", "1")
        first = store.next_mid()
        sp = msgpack.packb("s@p") + msgpack.packb(3)
        routes: list = []
        for i, (body, ts, devs) in enumerate(((b"one", T0, (a,)), (b"x" * 300, T0, (b,)),
                                              (b"three", T0 + 40_000, (a,)))):
            routes += (devs, (first + i, wire.deliver_tail(sp, CID, body, wire.ts_packed(ts), 0),
                              wire.DDELIVER_HEAD))
        assert store.put_now(routes, first) == 3
        assert await store.load(a, 0, 10) == [(first, "s@p/3", CID, b"one", T0),
                                              (first + 2, "s@p/3", CID, b"three", T0 + 40_000)]
        assert await store.backlog_counts() == {a: (2, 8), b: (1, 300)}
        with pytest.raises(InvalidArgument):  # a third field that is no copy's head
            store.put_now([(a,), (first + 3, routes[1][1], b"\x97\xcd\x07\xd2")], first + 3)
        assert await store.expire(T0 + 60_000) == 2
        store.ack(a, [first + 2])
        assert await store.count_pending() == 0 and store.stats()["messages"] == 0
        await store.close()
    run(main())


def test_ack_deletes_message_only_after_last_device(run, opener, db):
    async def main():
        async with await opener() as store:
            devs = [store.register_device("bob@home", d) for d in ("a", "b", "c")]
            mid = await store.put("ann@p", CID, b"x", T0, devs)
            other = await store.put("ann@p", CID, b"y", T0, devs)
            sqlite = isinstance(store, SqliteStore)
            if sqlite:  # the body is stored once for the three devices
                assert len(_spacked(db)) == 2
                assert count(db, "SELECT count(*) FROM messages") == 0
            for i, dev in enumerate(devs):
                store.ack(dev, [mid])
                store.ack(dev, [mid])  # repeated acks are harmless
                await store.flush()
                assert [m[0] for m in await store.load(dev, 0, 10)] == [other]
                for later in devs[i + 1:]:
                    assert [m[0] for m in await store.load(later, 0, 10)] == [mid, other]
                if sqlite:
                    alive = int(mid in _spacked(db))
                    assert alive == (0 if dev == devs[-1] else 1)
            assert await store.count_pending() == 3
            for dev in devs:
                store.ack(dev, [other])
            assert await store.count_pending() == 0
            if sqlite:
                await store.flush()
                assert len(_spacked(db)) == 0
                assert count(db, "SELECT count(*) FROM shares") == 0
    run(main())


def test_load_is_in_mid_order_and_pages(run, opener):
    async def main():
        async with await opener() as store:
            me = store.register_device("me@p", "d")
            noise = store.register_device("you@p", "d")
            mids = []
            for i in range(25):
                mids.append(await store.put("s@p", CID, b"%d" % i, T0, [me]))
                await store.put("s@p", CID, b"not mine", T0, [noise])
            pages, after = [], 0
            while page := await store.load(me, after, 10):
                pages.append([m[0] for m in page])
                after = page[-1][0]
            assert [len(p) for p in pages] == [10, 10, 5]
            assert sum(pages, []) == mids
            assert [m[3] for m in await store.load(me, mids[3], 2)] == [b"4", b"5"]
            assert await store.load(me, mids[-1], 10) == []
            assert await store.load(12345, 0, 10) == []  # unknown device: nothing
    run(main())


def test_expire_deletes_expired_messages_and_inbox_rows(run, opener):
    async def main():
        async with await opener(ttl_s=10) as store:
            a = store.register_device("a@p", "1")
            b = store.register_device("b@p", "1")
            old = await store.put("s@p", CID, b"old", T0, [a, b])
            new = await store.put("s@p", CID, b"new", T0 + 5_000, [a])
            assert await store.expire(T0 + 9_999) == 0
            assert await store.expire(T0 + 10_000) == 1  # expiry is inclusive
            assert [m[0] for m in await store.load(a, 0, 10)] == [new]
            assert await store.load(b, 0, 10) == []
            assert await store.count_pending() == 1
            store.ack(b, [old])  # a late ack of an expired message is a no-op
            assert await store.expire(T0 + 10_000) == 0
            assert await store.expire(T0 + 15_000) == 1
            assert await store.count_pending() == 0
    run(main())


def test_forget_device_drops_its_inbox_and_orphans(run, opener, db):
    async def main():
        async with await opener() as store:
            a = store.register_device("a@p", "1")
            b = store.register_device("b@p", "1")
            only_a = await store.put("s@p", CID, b"1", T0, [a])
            shared = await store.put("s@p", CID, b"2", T0, [a, b])
            store.forget_device(a)
            store.forget_device(a)  # unknown by now: ignored
            assert [k for k, _, _ in store.known_devices()] == [b]
            with pytest.raises(UnknownDevice):
                store.put("s@p", CID, b"3", T0, [a])
            assert await store.count_pending() == 1
            assert await store.load(a, 0, 10) == []
            assert [m[0] for m in await store.load(b, 0, 10)] == [shared]
            if isinstance(store, SqliteStore):
                await store.flush()
                assert count(db, "SELECT count(*) FROM messages WHERE mid = ?", only_a) == 0
            again = store.register_device("a@p", "1")
            assert again not in (a, b)  # keys are never reused
    run(main())


def test_closed_store_refuses_everything(run, opener):
    async def main():
        store = await opener()
        dev = store.register_device("a@p", "1")
        await store.close()
        await store.close()  # idempotent
        assert store.closed
        calls = [lambda: store.put("s@p", CID, b"", T0, [dev]),
                 lambda: store.put_many([]),
                 lambda: store.ack(dev, [1]),
                 lambda: store.forget_device(dev),
                 lambda: store.register_device("b@p", "1")]
        for call in calls:
            with pytest.raises(FastrouteError) as excinfo:
                call()
            assert store_failed(excinfo) and "closed" in str(excinfo.value)
        for coro in (store.load(dev, 0, 1), store.flush(), store.expire(T0),
                     store.count_pending()):
            with pytest.raises(FastrouteError) as excinfo:
                await coro
            assert store_failed(excinfo)
    run(main())


def test_bad_input_is_a_typed_error_and_stores_nothing(run, opener):
    async def main():
        async with await opener() as store:
            dev = store.register_device("a@p", "1")
            ok = ("s@p", CID, b"b", T0, [dev])
            bad = [
                (WrongType, ("s@p", CID, "text body", T0, [dev])),
                (WrongType, (b"s@p", CID, b"b", T0, [dev])),
                (WrongType, ("s@p", CID, b"b", 1.5, [dev])),
                (WrongType, ("s@p", CID, b"b", True, [dev])),
                (WrongType, ("s@p", CID, b"b", T0, dev)),
                (WrongType, ("s@p", CID, b"b", T0, [[dev]])),
                (InvalidArgument, ("s@p", CID[:15], b"b", T0, [dev])),
                (InvalidArgument, ("s@p", CID, b"b", -1, [dev])),
                (InvalidArgument, ("s@p", CID, b"b", 1 << 63, [dev])),
                (InvalidArgument, ("s@p", CID, b"b", T0, [])),
                (InvalidArgument, ("\ud800@p", CID, b"b", T0, [dev])),
                (InvalidArgument, ("", CID, b"b", T0, [dev])),
                (UnknownDevice, ("s@p", CID, b"b", T0, [dev + 1])),
            ]
            for exc, args in bad:
                with pytest.raises(exc) as excinfo:
                    store.put(*args)
                assert excinfo.value.code == exc.code
                with pytest.raises(exc):  # one bad item rejects the whole batch
                    store.put_many([ok, args])
            with pytest.raises(WrongType):
                store.put_many([ok[:4]])
            with pytest.raises(WrongType):
                store.ack(dev, [1.0])
            with pytest.raises(InvalidArgument):
                store.ack(dev, [-1])
            with pytest.raises(InvalidArgument):
                await store.load(dev, 0, 0)
            with pytest.raises(WrongType):
                store.register_device("a@p", None)
            with pytest.raises(InvalidArgument):
                store.register_device("", "1")
            assert await store.count_pending() == 0
            # fan-out listing one device twice stores it once
            mid = await store.put("s@p", CID, b"b", T0, [dev, dev])
            assert await store.count_pending(dev) == 1
            # the caller's buffer is copied, not borrowed
            buf = bytearray(b"orig")
            await store.put("s@p", CID, memoryview(buf), T0, [dev])
            buf[:] = b"XXXX"
            assert [m[3] for m in await store.load(dev, mid, 1)] == [b"orig"]
    run(main())


def test_cancelled_put_does_not_disturb_the_store(run, opener):
    async def main():
        async with await opener() as store:
            dev = store.register_device("a@p", "1")
            fut = store.put("s@p", CID, b"b", T0, [dev])
            fut.cancel()
            assert await store.put("s@p", CID, b"c", T0, [dev]) > 0
    run(main())


# -- SQLite only: durability, group commit, failures --------------------------

@pytest.mark.parametrize("sync", ["NORMAL", "FULL"])
def test_sqlite_survives_close_and_reopen(run, db, sync):
    async def main():
        async with await SqliteStore.open(db, synchronous=sync) as store:
            a = store.register_device("bob@home", "phone")
            b = store.register_device("bob@home", "laptop")
            m1 = await store.put("ann@p", CID, b"kept", T0, [a, b])
            m2 = await store.put("ann@p", CID, b"acked", T0, [a])
            store.ack(a, [m2])  # queued only: close must commit it
        async with await SqliteStore.open(db, synchronous=sync) as store:
            assert store.known_devices() == [(a, "bob@home", "phone"),
                                             (b, "bob@home", "laptop")]
            assert store.register_device("bob@home", "laptop") == b
            assert await store.load(a, 0, 10) == [(m1, "ann@p", CID, b"kept", T0)]
            assert await store.count_pending() == 2
            # the newest message was deleted: its mid must still not come back
            assert await store.put("ann@p", CID, b"new", T0, [a]) > m2
            assert store.register_device("carl@p", "1") > b
    run(main())


def test_sqlite_put_resolves_only_after_commit(run, db):
    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            await store.flush()
            with write_locked(db):  # the writer cannot commit now
                fut = store.put("s@p", CID, b"b", T0, [dev])
                for _ in range(5):
                    await asyncio.sleep(0.01)
                    assert not fut.done()
            mid = await fut
            # visible to an independent connection the moment the future is done
            # (a message for one device is in that device's pack: no inbox row)
            assert count(db, "SELECT count(*) FROM packs WHERE first = ? AND dev = ?",
                         mid, dev) == 1
    run(main())


@pytest.mark.parametrize("max_batch", [4096, 100])
def test_sqlite_group_commit_groups_concurrent_puts(run, db, max_batch):
    async def main():
        async with await SqliteStore.open(db, max_batch=max_batch) as store:
            dev = store.register_device("a@p", "1")
            await store.flush()
            before = store.commits
            # Hold the write lock so the first transaction waits: every put
            # below queues up behind it, whatever the machine's speed.
            with write_locked(db):
                futs = [store.put("s@p", CID, b"b", T0, [dev]) for _ in range(1000)]
                await asyncio.sleep(0.01)
            mids = await asyncio.gather(*futs)
            commits = store.commits - before
            assert len(set(mids)) == 1000
            if max_batch == 4096:
                assert 1 <= commits <= 2
            else:  # no transaction takes more than max_batch messages
                assert 10 <= commits <= 11
            # without the lock, still far fewer transactions than puts
            before = store.commits
            await asyncio.gather(*[store.put("s@p", CID, b"b", T0, [dev])
                                   for _ in range(1000)])
            assert store.commits - before <= 100
    run(main())


def _disk_full(store: SqliteStore) -> None:
    # Cap the database at its current size on the writer's connection: the
    # next write that needs a page fails with SQLITE_FULL, as on a full disk.
    store._wconn.execute("PRAGMA max_page_count = 1")


def _disk_ok(store: SqliteStore) -> None:
    store._wconn.execute("PRAGMA max_page_count = 1073741823")


def test_sqlite_failed_batch_fails_its_futures_and_recovers(run, db):
    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            kept = await store.put("s@p", CID, b"kept", T0, [dev])
            await store.flush()  # the writer is idle: safe to touch its connection
            _disk_full(store)
            big = b"x" * 200_000
            futs = [store.put("s@p", CID, big, T0, [dev]),
                    store.put_many([("s@p", CID, big, T0, [dev])])]
            late = store.register_device("late@p", "1")  # same failing batch
            store.ack(dev, [kept])
            for fut in futs:
                with pytest.raises(FastrouteError) as excinfo:
                    await fut
                assert store_full(excinfo)
                assert "disk full" in str(excinfo.value)
            # the ack was in the failing batch: it is the puts' failure, not
            # its own, and not the next flusher's either (issue 12)
            await store.flush()
            assert store.failed_batches >= 1
            assert await store.load(dev, 0, 10) == []  # the ack was applied
            _disk_ok(store)
            # the writer survived, nothing of the failed batch was half-applied
            mid = await store.put("s@p", CID, b"after", T0, [dev, late])
            assert [m[0] for m in await store.load(dev, 0, 10)] == [mid]
            assert [m[0] for m in await store.load(late, 0, 10)] == [mid]
        # the registration from the failed batch was retried and persisted
        async with await SqliteStore.open(db) as store:
            assert (late, "late@p", "1") in store.known_devices()
    run(main())


def test_sqlite_failed_deletes_are_retried_not_reported_to_the_next_flush(run, db):
    # Issue 12: during a disk-full episode an ack batch failed; its error went
    # to whichever device flushed next (a SERVER_BYE 504 for an uninvolved
    # device) and the deletes were dropped (delivered bodies stayed on disk).
    async def main():
        async with await SqliteStore.open(db) as store:
            a = store.register_device("a@p", "1")
            b = store.register_device("b@p", "1")
            mids = await store.put_many([("s@p", CID, b"m%d" % i, T0, [a]) for i in range(10)])
            await store.flush()  # the writer is idle: safe to touch its connection
            store._wconn.execute("PRAGMA busy_timeout = 50")
            with write_locked(db):  # nothing can be written now
                store.ack(a, mids)
                await asyncio.sleep(0.3)  # the ack batch fails (SQLITE_BUSY)
                assert store.failed_batches >= 1
                waiting = getattr(store, "deletes_waiting", None)
            await store.flush()  # device b connects: not told about a's ack
            await asyncio.sleep(1.0)  # the retry runs every 0.5 s when idle
            await store.flush()
            assert await store.count_pending(a) == 0  # retried, applied
            assert waiting == 10 and store.deletes_waiting == 0
            assert await store.count_pending(b) == 0
    run(main())


def test_sqlite_close_reports_a_failed_final_flush(run, db):
    async def main():
        store = await SqliteStore.open(db)
        dev = store.register_device("a@p", "1")
        await store.flush()
        _disk_full(store)
        fut = store.put("s@p", CID, b"x" * 200_000, T0, [dev])
        with pytest.raises(FastrouteError) as excinfo:
            await store.close()
        assert store_full(excinfo)
        with pytest.raises(FastrouteError):
            await fut
        assert store.closed
    run(main())


def test_sqlite_open_errors_are_clear(run, tmp_path):
    async def main():
        with pytest.raises(FastrouteError) as excinfo:
            await SqliteStore.open(tmp_path / "no" / "such" / "dir.db")
        assert store_failed(excinfo) and "cannot open store" in str(excinfo.value)
        junk = tmp_path / "junk.db"
        junk.write_bytes(b"this is not a database" * 100)
        with pytest.raises(FastrouteError) as excinfo:
            await SqliteStore.open(junk)
        assert store_failed(excinfo)
        with pytest.raises(InvalidArgument):
            await SqliteStore.open(tmp_path / "a.db", synchronous="OFF")
        with pytest.raises(InvalidArgument):
            await SqliteStore.open(":memory:")
        with pytest.raises(InvalidArgument):
            await SqliteStore.open(tmp_path / "a.db", max_batch=0)
    run(main())


def test_sqlite_uses_wal_and_the_documented_schema(run, db):
    async def main():
        async with await SqliteStore.open(db) as store:
            store.register_device("a@p", "1")
            await store.flush()
        conn = raw(db)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            cols = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")]
                    for t in ("messages", "inbox", "devices", "packs", "spacks", "shares")}
            indexes = {r[0]: r[1] for r in conn.execute(
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' "
                "AND name NOT LIKE 'sqlite_autoindex%'")}
        finally:
            conn.close()
        # spacks and shares have none on exp_ms: every group send would write
        # (and its acks delete) an entry of it a spack and a member
        assert indexes == {"messages_exp": "messages", "messages_dev": "messages",
                           "inbox_mid": "inbox", "packs_key": "packs", "packs_exp": "packs"}
        assert cols == {"messages": ["mid", "sender", "cid", "body", "ts_ms", "exp_ms", "dev"],
                        "inbox": ["device_key", "mid"],
                        "devices": ["device_key", "address", "device"],
                        "packs": ["dev", "first", "last", "n", "nbytes", "exp_ms", "mids",
                                  "data"],
                        "spacks": ["first", "last", "n", "nbytes", "exp_ms", "mids", "lens",
                                   "exps", "devs", "data"],
                        "shares": ["dev", "first", "last", "n", "nbytes", "exp_ms", "mids"]}
    run(main())


# -- the two implementations agree on any sequence of operations --------------

_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.lists(st.integers(0, 3), min_size=1, max_size=4),
              st.integers(0, 20)),
    st.tuples(st.just("ack"), st.integers(0, 3), st.lists(st.integers(0, 25), max_size=6)),
    st.tuples(st.just("forget"), st.integers(0, 3)),
    st.tuples(st.just("expire"), st.integers(0, 40)),
    # one batch: several messages for one device share a pack, with expiries
    # of their own, acked and expired in part
    st.tuples(st.just("many"), st.lists(st.tuples(
        st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True), st.integers(0, 20)),
        min_size=1, max_size=8)),
), max_size=30)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_sqlite_matches_memory_model(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("model") / "store.db")

    async def apply(store, op):
        kind, *args = op
        try:
            if kind == "put":
                devs, dt = args
                return await store.put("s@p", CID, b"%d" % dt, T0 + dt * 1000,
                                       [keys[d] for d in devs])
            if kind == "many":
                return await store.put_many([("s@p", CID, b"%d" % dt, T0 + dt * 1000,
                                              [keys[d] for d in devs])
                                             for devs, dt in args[0]])
            if kind == "ack":
                store.ack(keys[args[0]], args[1])
            elif kind == "forget":
                store.forget_device(keys[args[0]])
            else:
                return await store.expire(T0 + args[0] * 1000)
        except FastrouteError as exc:
            return type(exc)

    async def main():
        async with await SqliteStore.open(path, ttl_s=10) as real, \
                await MemoryStore.open(ttl_s=10) as model:
            nonlocal keys
            keys = [real.register_device("a@p", str(i)) for i in range(4)]
            assert [model.register_device("a@p", str(i)) for i in range(4)] == keys
            for op in ops:
                assert await apply(real, op) == await apply(model, op), op
            held = set()
            for key in keys:
                assert await real.count_pending(key) == await model.count_pending(key)
                assert await real.load(key, 0, 100) == await model.load(key, 0, 100)
                assert await real.load(key, 3, 2) == await model.load(key, 3, 2)
                held.update(row[0] for row in await model.load(key, 0, 10**6))
            assert real.known_devices() == model.known_devices()
            # the model counts the messages some inbox holds, whatever happened
            assert model.stats()["messages"] == len(held)
            _expiry_bounds_hold(real, path)
            # reopened, the writer's counts come from the file: expiries still
            # find every spack (there is no index on exp_ms to find them by)
            await real.close()
            async with await SqliteStore.open(path, ttl_s=10) as again:
                _expiry_bounds_hold(again, path)
                for dt in (15, 25, 60):
                    now = T0 + dt * 1000
                    assert await again.expire(now) == await model.expire(now), dt
                    for key in keys:
                        assert await again.load(key, 0, 100) == await model.load(key, 0, 100)
                _expiry_bounds_hold(again, path)

    keys: list[int] = []
    asyncio.run(main())


def test_sqlite_expiry_finds_a_spack_again_by_its_next_expiry(run, db):
    # spacks have no index on exp_ms: the writer's counts bound each one's
    # earliest expiry, and a spack that expires in part is bound again by
    # what it has left, so each later expiry finds it once more
    async def main():
        async with await SqliteStore.open(db, ttl_s=10) as store:
            a, b = (store.register_device("g@p", d) for d in "ab")
            mids = await store.put_many([("s@p", CID, b"m%d" % i, T0 + i * 5000, [a, b])
                                         for i in range(3)])
            store.ack(b, mids[1:2])
            await store.flush()
            first = mids[0]

            def bound() -> int:
                key, _, at = store._counts._locate(first)
                return store._counts.exps[key][at]

            assert bound() == T0 + 10_000
            assert await store.expire(T0 + 9_999) == 0
            assert await store.expire(T0 + 10_000) == 1
            assert bound() == T0 + 15_000 == count(db, "SELECT exp_ms FROM spacks")
            assert await store.expire(T0 + 15_000) == 1
            assert bound() == T0 + 20_000
            assert [r[0] for r in await store.load(a, 0, 10)] == mids[2:]
            assert [r[0] for r in await store.load(b, 0, 10)] == mids[2:]
            assert await store.expire(T0 + 20_000) == 1
            assert await store.count_pending() == 0
        assert count(db, "SELECT count(*) FROM spacks") == 0
        assert count(db, "SELECT count(*) FROM shares") == 0
    run(main())


def test_counts_expiry_bounds_roll_back_with_their_transaction():
    # a bound raised by an expiry's rewrite that rolls back would outrun the
    # row's exp_ms, which did not change: it goes back with the counts
    arr = store_mod.array.array
    counts = store_mod._Counts()
    counts.begin()
    counts.add(10, arr("q", [10, 11, 20]).tobytes(), arr("i", [2, 2, 1]).tobytes(),
               arr("q", [10, 20]).tobytes(), arr("i", [2, 1]).tobytes(), [500, 700])
    counts.commit()
    assert counts.expiring(499, 100) == [] and counts.expiring(600, 100) == [10]
    assert counts.expiring(700, 100) == [10, 20] and counts.expiring(700, 20) == [10]
    counts.begin()
    counts.expires(10, 650)
    assert counts.expiring(600, 100) == []
    counts.rollback()
    assert list(counts.exps[10]) == [500, 700]
    counts.begin()
    counts.expires(20, 900)
    counts.commit()
    assert list(counts.exps[10]) == [500, 900]
    # a spack nobody holds anything of is not looked for
    counts.begin()
    assert counts.drop(10, [10, 11]) == 2
    counts.commit()
    assert counts.expiring(1000, 100) == [20]


def _expiry_bounds_hold(store, path) -> None:
    """Every spack in the file is in the writer's counts, with a bound on its
    earliest expiry at or below its exp_ms (what expiry finds it by)."""
    conn = raw(path)
    try:
        rows = conn.execute("SELECT first, exp_ms FROM spacks").fetchall()
    finally:
        conn.close()
    counts = store._counts
    for first, exp in rows:
        found = counts._locate(first)
        assert found is not None, first
        assert counts.exps[found[0]][found[2]] <= exp, first


def test_sqlite_large_batches_match_memory_model(tmp_path):
    # The writer puts rows and deletes acked ones many per statement (128, then
    # powers of two): batch sizes around those edges, fan-out rows, acks with
    # repeats, gaps and unknown mids must give what the model gives.
    import random

    rng = random.Random(11)
    path = str(tmp_path / "big.db")

    async def main():
        async with await SqliteStore.open(path) as real, await MemoryStore.open() as model:
            keys = [real.register_device("a@p", str(i)) for i in range(3)]
            assert [model.register_device("a@p", str(i)) for i in range(3)] == keys
            for size in (1, 127, 128, 129, 255, 300, 1000):
                items = [("s@p", bytes([i % 256]) * 16, b"%d" % i, T0 + i,
                          rng.sample(keys, rng.randrange(1, 4))) for i in range(size)]
                got = await asyncio.gather(real.put_many(items), model.put_many(items))
                assert got[0] == got[1]
                mids = got[0]
                for key in keys:
                    acked = [m for m in mids if rng.random() < 0.7] + mids[:3] + [10**9]
                    real.ack(key, acked)
                    model.ack(key, acked)
                await real.flush()
                for key in keys:
                    assert await real.count_pending(key) == await model.count_pending(key)
                    assert await real.load(key, 0, 5000) == await model.load(key, 0, 5000)
            await real.flush()
            model_msgs = model.stats()["messages"]
        with sqlite3.connect(path) as conn:
            stored = {m for (blob,) in conn.execute("SELECT mids FROM spacks")
                      for m in store_mod._mids(blob)}
            # the flush rewrote every pack and spack acked in part: n is what is left
            n_msgs = len(stored)
            n_msgs += conn.execute("SELECT coalesce(sum(n), 0) FROM packs").fetchone()[0]
            listed = {m for (blob,) in conn.execute(
                "SELECT " + store_mod._SHARE_MIDS.format("shares") + " FROM shares")
                for m in store_mod._mids(blob)}
            # no shared message that no share lists, no listed one that is gone
            orphans = len(stored ^ listed)
            assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
        return n_msgs, orphans, model_msgs

    n_msgs, orphans, model_msgs = asyncio.run(main())
    assert orphans == 0  # every fully acked message is gone
    assert n_msgs == model_msgs > 0  # and the others are all still there


# what formats 1 and 2 have in common: inbox, devices (two of one address), meta
_OLD_TABLES = """
CREATE TABLE inbox(device_key INTEGER NOT NULL, mid INTEGER NOT NULL,
    PRIMARY KEY(device_key, mid)) WITHOUT ROWID;
CREATE INDEX inbox_mid ON inbox(mid);
CREATE TABLE devices(device_key INTEGER PRIMARY KEY, address TEXT NOT NULL,
    device TEXT NOT NULL, UNIQUE(address, device));
CREATE TABLE meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO devices VALUES (1, 'a@p', 'phone'), (2, 'a@p', 'laptop');
INSERT INTO meta VALUES ('next_mid', 3), ('next_device', 3);
"""

_V1_SCHEMA = """
CREATE TABLE messages(mid INTEGER PRIMARY KEY, sender TEXT NOT NULL, cid BLOB NOT NULL,
    body BLOB NOT NULL, ts_ms INTEGER NOT NULL, exp_ms INTEGER NOT NULL);
CREATE INDEX messages_exp ON messages(exp_ms);
""" + _OLD_TABLES + """
INSERT INTO messages VALUES (1, 's@p', x'00000000000000000000000000000001', x'6f6c64', 1, 9e15);
INSERT INTO messages VALUES (2, 's@p', x'00000000000000000000000000000002', x'6f6c6432', 2, 9e15);
INSERT INTO inbox VALUES (1, 1), (2, 1), (1, 2);
PRAGMA user_version = 1;
"""


def _old_store(db, schema: str) -> None:
    """A store file as an earlier fastroute left it."""
    conn = raw(db)
    conn.executescript(schema)
    conn.close()


def test_sqlite_migrates_a_version_1_store(run, db):
    # version 1 kept every recipient in inbox; its rows must stay deliverable
    # and ackable after the upgrade, next to new single-device rows
    _old_store(db, _V1_SCHEMA)

    async def main():
        async with await SqliteStore.open(db) as store:
            assert [r[0] for r in await store.load(1, 0, 10)] == [1, 2]
            mid = await store.put("s@p", CID, b"new", T0, [1])
            assert mid == 3
            assert [(r[0], r[3]) for r in await store.load(1, 0, 10)] == [
                (1, b"old"), (2, b"old2"), (3, b"new")]
            assert await store.count_pending(1) == 3
            store.ack(1, [1, 2, 3])
            await store.flush()
            assert await store.load(1, 0, 10) == []
            assert [r[0] for r in await store.load(2, 0, 10)] == [1]  # still device 2's
        assert count(db, "SELECT count(*) FROM messages") == 1
        assert count(db, "SELECT count(*) FROM packs") == 0
        assert count(db, "PRAGMA user_version") == store_mod._SCHEMA_VERSION
    run(main())


_V2_SCHEMA = """
CREATE TABLE messages(mid INTEGER PRIMARY KEY, sender TEXT NOT NULL, cid BLOB NOT NULL,
    body BLOB NOT NULL, ts_ms INTEGER NOT NULL, exp_ms INTEGER NOT NULL, dev INTEGER);
CREATE INDEX messages_exp ON messages(exp_ms);
CREATE INDEX messages_dev ON messages(dev, mid) WHERE dev IS NOT NULL;
""" + _OLD_TABLES + """
INSERT INTO messages VALUES (1, 's@p', x'00000000000000000000000000000001', x'6f6c64', 1, 9e15, 1);
INSERT INTO messages VALUES (2, 's@p', x'00000000000000000000000000000002', x'6f6c6432', 2, 9e15,
    NULL);
INSERT INTO inbox VALUES (1, 2), (2, 2);
PRAGMA user_version = 2;
"""


def test_sqlite_migrates_a_version_2_store(run, db):
    # version 2 kept a one-device message in its own row: it stays readable
    # and ackable next to the packs a version 3 store writes, in mid order
    _old_store(db, _V2_SCHEMA)

    async def main():
        async with await SqliteStore.open(db) as store:
            mids = await store.put_many([("s@p", CID, b"new%d" % i, T0, [1]) for i in range(3)])
            assert mids == [3, 4, 5]
            assert [(r[0], r[3]) for r in await store.load(1, 0, 10)] == [
                (1, b"old"), (2, b"old2"), (3, b"new0"), (4, b"new1"), (5, b"new2")]
            assert [r[0] for r in await store.load(1, 1, 2)] == [2, 3]
            assert await store.count_pending(1) == 5
            assert await store.backlog_counts() == {1: (5, 3 + 4 + 3 * 4), 2: (1, 4)}
            store.ack(1, [1, 2, 4])
            await store.flush()
            assert [r[0] for r in await store.load(1, 0, 10)] == [3, 5]
        assert count(db, "SELECT count(*) FROM messages") == 1  # device 2's
        assert count(db, "SELECT n FROM packs WHERE dev = 1") == 2
        assert count(db, "PRAGMA user_version") == store_mod._SCHEMA_VERSION
    run(main())


def _pack_bodies(db, dev):
    conn = raw(db)
    try:
        return [e[3] for (data,) in conn.execute("SELECT data FROM packs WHERE dev = ?", (dev,))
                for e in store_mod._pack_entries(data)]
    finally:
        conn.close()


def test_sqlite_one_transaction_stores_a_devices_messages_in_one_pack(run, db):
    async def main():
        async with await SqliteStore.open(db) as store:
            a = store.register_device("a@p", "1")
            b = store.register_device("b@p", "1")
            # interleaved recipients, one shared message: a's pack skips mids
            items = [("s@p", CID, b"m%d" % i, T0, [[a], [b], [a, b]][i % 3]) for i in range(12)]
            mids = await store.put_many(items)
            assert count(db, "SELECT count(*) FROM packs") == 2
            assert count(db, "SELECT n FROM packs WHERE dev = ?", a) == 4
            assert len(_spacked(db)) == 4  # the shared ones
            assert count(db, "SELECT count(*) FROM shares") == 2
            mine = [m for i, m in enumerate(mids) if i % 3 != 1]
            assert [r[0] for r in await store.load(a, 0, 100)] == mine
            assert [r[0] for r in await store.load(a, mine[2], 3)] == mine[3:6]
            # acked in part: the pack is rewritten without them at the flush
            store.ack(a, mids[0:7])
            await store.flush()
            assert [r[0] for r in await store.load(a, 0, 100)] == [mids[8], mids[9], mids[11]]
            assert sorted(_pack_bodies(db, a)) == [b"m9"]  # acked bodies left the pack
            assert count(db, "SELECT n FROM packs WHERE dev = ?", a) == 1
            # and a's share of the shared ones without m2 and m5 (b's is whole)
            assert count(db, "SELECT n FROM shares WHERE dev = ?", a) == 2
            assert count(db, "SELECT n FROM shares WHERE dev = ?", b) == 4
            assert store.rewrites == 2
            assert await store.count_pending(a) == 3  # m9 and the shared m8, m11
            store.ack(a, mids)
            await store.flush()
            assert count(db, "SELECT count(*) FROM packs WHERE dev = ?", a) == 0
            assert count(db, "SELECT count(*) FROM shares WHERE dev = ?", a) == 0
            assert store.rewrites == 2  # a pack acked whole is deleted, not rewritten
    run(main())


def test_sqlite_a_page_of_a_long_backlog_unpacks_only_the_packs_it_needs(run, db, monkeypatch):
    # a device back after a while: 40 transactions of 100 messages each; a
    # page of 150 must not unpack the 150 packs the query may return
    unpacked = []
    real = store_mod._pack_rows
    monkeypatch.setattr(store_mod, "_pack_rows", lambda data: unpacked.append(1) or real(data))

    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            mids = []
            for t in range(40):
                mids += await store.put_many([("s@p", CID, b"%d-%d" % (t, i), T0, [dev])
                                              for i in range(100)])
            rows = await store.load(dev, mids[49], 150)
            assert [r[0] for r in rows] == mids[50:200]
            assert len(unpacked) == 2  # the packs holding them, no more
            assert [r[0] for r in await store.load(dev, mids[-2], 150)] == mids[-1:]
    run(main())


def test_sqlite_a_pack_acked_message_by_message_is_rewritten_at_most_once_a_while(run, db):
    # A device that acks one message at a time must not make the writer
    # rewrite its pack once per ack; the rewrite comes once, when due.
    async def main():
        async with await SqliteStore.open(db) as store:
            store._rewrite_s = 3600.0  # only a flush rewrites in this part
            dev = store.register_device("a@p", "1")
            other = store.register_device("b@p", "1")
            mids = await store.put_many([("s@p", CID, b"%d" % i, T0, [dev]) for i in range(50)])
            commits = store.commits
            for mid in mids[:-1]:
                store.ack(dev, [mid])
                # a put in between: every ack goes to a transaction of its own
                await store.put("s@p", CID, b"x", T0, [other])
            assert store.commits - commits >= 49
            assert store.rewrites == 0
            assert count(db, "SELECT n FROM packs WHERE dev = ?", dev) == 50
            assert [r[0] for r in await store.load(dev, 0, 100)] == mids  # not yet flushed
            store.ack(dev, mids[-1:])
            await store.flush()
            assert count(db, "SELECT count(*) FROM packs WHERE dev = ?", dev) == 0
            assert store.rewrites == 0
            # without a flush, the writer rewrites a part-acked pack on its own
            store._rewrite_s = 0.05
            mids = await store.put_many([("s@p", CID, b"%d" % i, T0, [dev]) for i in range(5)])
            store.ack(dev, mids[:2])
            for _ in range(200):
                if count(db, "SELECT n FROM packs WHERE dev = ?", dev) == 3:
                    break
                await asyncio.sleep(0.02)
            assert count(db, "SELECT n FROM packs WHERE dev = ?", dev) == 3
            # the rewrite is on disk once its COMMIT returns, its count a few
            # lines after, on the writer's thread: a flush answers after both
            await store.flush()
            assert store.rewrites == 1
    run(main())


def test_sqlite_a_failed_pack_rewrite_is_retried_until_it_lands(run, db):
    # the rewrite of a pack acked in part fails with its transaction (here
    # the database is locked): it is tried again on the writer's own
    # timer, not lost and not retried in a tight loop
    async def main():
        async with await SqliteStore.open(db, erase_s=0.4) as store:
            dev = store.register_device("a@p", "1")
            mids = await store.put_many([("s@p", CID, b"m%d" % i, T0, [dev])
                                         for i in range(10)])
            await store.flush()  # the writer is idle: safe to touch its connection
            store._wconn.execute("PRAGMA busy_timeout = 50")
            store._rewrite_s = 0.3
            store.ack(dev, mids[:4])
            for _ in range(100):  # the ack committed: the rewrite is due in 0.3 s
                if store._partial:
                    break
                await asyncio.sleep(0.01)
            assert store._partial and store.failed_batches == 0
            with write_locked(db):  # nothing can be written now
                await asyncio.sleep(1.0)  # the rewrite comes due and fails
                assert 1 <= store.failed_batches <= 3  # again every 0.5 s, not a spin
                assert store.rewrites == 0
            for _ in range(100):  # no flush: the writer's retry lands it
                if count(db, "SELECT n FROM packs WHERE dev = ?", dev) == 6:
                    break
                await asyncio.sleep(0.05)
            assert count(db, "SELECT n FROM packs WHERE dev = ?", dev) == 6
            await store.flush()  # the counts: on the writer's thread, after the COMMIT
            assert store.rewrites == 1 and store.deletes_waiting == 0
            assert [r[0] for r in await store.load(dev, 0, 20)] == mids[4:]
    run(main())


def test_sqlite_expiry_of_a_pack_spares_messages_queued_after_it(run, db):
    # an expiry and puts in one transaction: the expiry's bound is the first
    # mid queued after it, and a pack may hold mids on both sides
    async def main():
        async with await SqliteStore.open(db, ttl_s=10) as store:
            dev = store.register_device("a@p", "1")
            await store.flush()
        conn = raw(db)
        try:
            rows = [dev, *store_mod._pack_fields([
                (m, "s@p", CID, b"%d" % m, T0, T0 + 10_000 + (m % 2)) for m in range(1, 9)])]
            conn.execute(store_mod._rows_sql(store_mod._SQL_PUT_PACK, 8, 1), rows)
            # due at T0 + 10 s: the even mids; of them only those below mid 5
            assert store._expire(conn, T0 + 10_000, 5, {}, {}, {}) == 2
            left = [e[0] for (d,) in conn.execute("SELECT data FROM packs")
                    for e in store_mod._pack_entries(d)]
            assert left == [1, 3, 5, 6, 7, 8]
            assert conn.execute("SELECT n, exp_ms FROM packs").fetchone() == (6, T0 + 10_000)
            # acked in part (noted, not yet rewritten) and expired: both go, and
            # only the unacked count as expired (1 and 5, not 3 and 6)
            partial = {(dev, 1): {3, 6}}
            assert store._expire(conn, T0 + 10_001, 7, partial, {}, {}) == 2
            assert partial == {}
            left = [e[0] for (d,) in conn.execute("SELECT data FROM packs")
                    for e in store_mod._pack_entries(d)]
            assert left == [7, 8]
            conn.commit()
        finally:
            conn.close()
    run(main())


def test_sqlite_a_reader_delays_the_erase_checkpoint_without_stalling_puts(run, db):
    # A TRUNCATE checkpoint waits for readers; an outside reader (a backup
    # tool) must neither stall the writer nor cancel the erasure for good.
    async def main():
        async with await SqliteStore.open(db, erase_s=0.1) as store:
            dev = store.register_device("a@p", "1")
            mids = await store.put_many([("s@p", CID, b"x" * 100, T0, [dev])] * 10)
            reader = sqlite3.connect(db, isolation_level=None)
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM messages").fetchone()  # holds a snapshot
            try:
                store.ack(dev, mids)
                await store.flush()
                await asyncio.sleep(0.5)  # checkpoints due, blocked by the reader
                t0 = asyncio.get_running_loop().time()
                await store.put("s@p", CID, b"y", T0, [dev])
                assert asyncio.get_running_loop().time() - t0 < 2.5  # not the 5 s busy timeout
                before = store.checkpoints
            finally:
                reader.execute("COMMIT")
                reader.close()
            await asyncio.sleep(1.5)  # retried once the reader is gone
            store.ack(dev, [m for m, *_ in await store.load(dev, 0, 10)])
            await store.flush()
            await asyncio.sleep(0.5)
            assert store.checkpoints > before
            # emptied: cut to nothing (SQLite's own way), or overwritten
            # with zeroes in place (the compiled core's WAL layer)
            with open(db + "-wal", "rb") as f:
                assert not f.read().strip(b"\0")
    run(main())


def test_sqlite_a_bad_trusted_item_fails_its_own_put_only(run, db):
    # validate=False trusts the caller; an item that is not what it vouched
    # for fails its own request, not the writer nor the other requests that
    # share its transaction
    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            await store.flush()
            with write_locked(db):  # the writer's next transaction waits
                first = store.put_many([("s@p", CID, b"0", T0, (dev,))], validate=False)
                # taken, and the writer waits for the lock: the next
                # requests share a batch
                await writer_holds_its_batch(store)
                good = store.put_many([("s@p", CID, b"1", T0, (dev,))] * 3, validate=False)
                bad = store.put_many([("s@p", CID, bytearray(b"2"), T0, (dev,))],
                                     validate=False)
                nobody = store.put_many([("s@p", CID, b"3", T0, ())], validate=False)
                last = store.put_many([("s@p", CID, b"4", T0, (dev,))], validate=False)
                assert store._queue.qsize() == 4
            (m0,), mids = await first, await good
            with pytest.raises(WrongType):
                await bad
            with pytest.raises(InvalidArgument):
                await nobody
            # the refused requests' mids are left unused
            assert await last == [mids[-1] + 3] and mids == [m0 + 1, m0 + 2, m0 + 3]
            assert store.failed_batches == 0 and store.commits >= 2
            rows = await store.load(dev, 0, 10)
            assert [r[3] for r in rows] == [b"0", b"1", b"1", b"1", b"4"]
            await store.flush()  # the writer still serves
    run(main())


def test_sqlite_new_stores_use_8k_pages_and_old_ones_keep_theirs(run, db, monkeypatch):
    async def fill(body):
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            await store.put_many([("s@p", CID, body, T0, [dev])] * 50)
            return [r[3] for r in await store.load(dev, 0, 200)]

    # a store made before: other pages (16 KB until December 2026, 4 KB
    # before that), no auto_vacuum
    for old in (16384, 4096):
        monkeypatch.setattr(store_mod, "_PAGE_SIZE", old)
        monkeypatch.setattr(store_mod, "_AUTO_VACUUM", "NONE")
        assert run(fill(b"x" * 300)) == [b"x" * 300] * 50
        monkeypatch.undo()
        assert run(fill(b"y" * 300)) == [b"x" * 300] * 50 + [b"y" * 300] * 50
        assert count(db, "PRAGMA page_size") == old and count(db, "PRAGMA auto_vacuum") == 0
        os.remove(db)
    assert run(fill(b"z")) == [b"z"] * 50
    assert count(db, "PRAGMA page_size") == 8192 and count(db, "PRAGMA auto_vacuum") == 1


@pytest.mark.parametrize("auto_vacuum", ["FULL", "NONE"])
def test_sqlite_a_new_store_gives_back_the_pages_its_deletes_free(run, db, monkeypatch,
                                                                   auto_vacuum):
    # a new store file keeps no free pages past a commit, so the next
    # commit's messages take those its own deletes free (each page written
    # once, not zeroed and then another one written beside it); a file made
    # without auto_vacuum keeps them on its freelist
    monkeypatch.setattr(store_mod, "_AUTO_VACUUM", auto_vacuum)

    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            mids = await store.put_many([("s@p", CID, os.urandom(900), T0, [dev])] * 200)
            await store.flush()
            full = count(db, "PRAGMA page_count")
            store.ack(dev, mids)
            await store.flush()
            assert await store.count_pending() == 0
            return full, count(db, "PRAGMA page_count"), count(db, "PRAGMA freelist_count")

    full, pages, free = run(main())
    if auto_vacuum == "FULL":
        assert free == 0 and pages < full - 8  # the pack's pages went back
    else:
        assert free >= 8 and pages == full


def test_sqlite_acks_in_a_batch_with_puts_reach_old_and_new_messages(run, db):
    # the writer deletes what earlier batches committed before it inserts
    # (freed pages are reused, written once); an ack of a mid put in the same
    # batch, queued after its put, must still reach it
    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            other = store.register_device("b@p", "1")
            old = await store.put_many([("s@p", CID, b"old%d" % i, T0, [dev])
                                        for i in range(40)])
            store._linger_s = 0.0  # each request below goes as soon as taken
            store.ack(dev, old[:3])  # the pack is acked in part before the batch
            await writer_holds_its_batch(store, idle=True)
            with write_locked(db):  # the writer's next transaction waits
                # a put always writes: the writer waits for the lock (an ack
                # in part of a pack may write nothing and not wait)
                blocker = store.put_many([("s@p", CID, b"x", T0, [other])])
                await writer_holds_its_batch(store)
                store.ack(dev, old[3:30])
                new = store.put_many([("s@p", CID, b"new%d" % i, T0, [dev])
                                      for i in range(20)])
                guess = list(range(old[-1] + 2, old[-1] + 22))  # the mids it will get
                store.ack(dev, guess[:5] + old[30:32])
                # the last ack waits on the loop's side for its timer (0 s)
                assert store.stats()["queued_requests"] == 3
            assert await blocker == [old[-1] + 1]
            assert await new == guess
            await store.flush()
            rows = await store.load(dev, 0, 100)
            assert [r[0] for r in rows] == old[32:] + guess[5:]
            assert [r[3] for r in rows][-1] == b"new19"
    run(main())


def test_sqlite_acks_wait_for_the_next_puts_commit_and_commit_alone_if_none_comes(run, db):
    # under load a transaction of acks alone fell between two of puts: a
    # commit (at FULL, a sync) of its own for deletes the next one could carry
    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            mids = await store.put_many([("s@p", CID, b"m%d" % i, T0, [dev])
                                         for i in range(10)])
            store._linger_s = 30.0  # far longer than this test: puts end the wait
            before = store.commits
            store.ack(dev, mids[:4])
            # the ack is held (not even handed to the writer, which it would
            # wake) ...
            assert store._queue.qsize() == 0 and store.stats()["queued_requests"] == 1
            await asyncio.sleep(0.05)
            assert store.commits == before  # ... and not committed
            more = await store.put_many([("s@p", CID, b"n", T0, [dev])])
            assert store.commits == before + 1  # one commit for both
            await store.flush()  # (reads see part of a pack acked after one)
            assert [r[0] for r in await store.load(dev, 0, 100)] == mids[4:] + more
            # with nobody to wait for, acks commit on their own after the wait
            store._linger_s = 0.05
            before = store.commits
            store.ack(dev, mids[4:])
            for _ in range(5000):
                if store.commits > before:
                    break
                await asyncio.sleep(0.001)
            assert store.commits == before + 1
            await store.flush()
            assert [r[0] for r in await store.load(dev, 0, 100)] == more
    run(main())


def test_sqlite_at_a_chat_s_pace_each_ack_rides_the_next_put_s_commit(run, db):
    # puts 20 ms apart, each acked as soon as it is stored: the acks wait for
    # the next put (a commit and a sync a message, not one for the put and
    # one for its ack), and the last one commits alone once nothing comes
    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            await store.flush()
            before = store.commits
            for i in range(10):
                mids = await store.put_many([("s@p", CID, b"m%d" % i, T0, [dev])])
                store.ack(dev, mids)
                await asyncio.sleep(0.02)
            # (~20 where each ack paid a commit of its own)
            assert store.commits - before <= 11
            await store.flush()
            assert await store.count_pending() == 0
    run(main())


def test_sqlite_when_puts_come_far_apart_an_ack_commits_alone_soon(run, db):
    # puts further apart than the long wait: it would not catch the next,
    # and the ack's commit would run on a thread gone cold; it goes after
    # the short wait (4 ms, and 4 more on the writer's side), as before
    async def main():
        async with await SqliteStore.open(db) as store:
            store._ride_s = 0.5  # the long wait, long enough to tell apart
            dev = store.register_device("a@p", "1")
            await store.put_many([("s@p", CID, b"a", T0, [dev])])
            await asyncio.sleep(0.6)
            mids = await store.put_many([("s@p", CID, b"b", T0, [dev])])
            before = store.commits
            store.ack(dev, mids)
            loop = asyncio.get_running_loop()
            end = loop.time() + 0.3  # well before the long wait's end
            while store.commits == before and loop.time() < end:
                await asyncio.sleep(0.001)
            assert store.commits == before + 1
            assert await store.count_pending(dev) == 1
    run(main())


def test_sqlite_held_acks_go_to_the_writer_as_one_request(run, db):
    # a group's members each ack a window: handed to the writer with the
    # next put as one request, in the order they came, not one a device (ten
    # takes and checks of the writer's a commit)
    async def main():
        async with await SqliteStore.open(db) as store:
            devs = [store.register_device("a@p", str(i)) for i in range(10)]
            mids = await store.put_many([("s@p", CID, b"m%d" % i, T0, devs)
                                         for i in range(5)])
            store._linger_s = 30.0  # far longer than this test: the put ends the wait
            with write_locked(db):  # the writer's next transaction waits
                blocker = store.put_many([("s@p", CID, b"x", T0, devs[:1])])
                await writer_holds_its_batch(store)
                for dev in devs:
                    store.ack(dev, mids[:3])
                store.ack(devs[0], mids[3:])  # the same device again: after its first
                assert store._queue.qsize() == 0 and store.stats()["queued_requests"] == 1
                new = store.put_many([("s@p", CID, b"y", T0, devs)])
                assert store._queue.qsize() == 2  # the acks, then the put
            (x,), (y,) = await blocker, await new
            await store.flush()
            assert [r[0] for r in await store.load(devs[0], 0, 100)] == [x, y]
            for dev in devs[1:]:
                assert [r[0] for r in await store.load(dev, 0, 100)] == mids[3:] + [y]
    run(main())


def test_sqlite_puts_wait_for_more_only_while_puts_come_faster_than_commits(run, db):
    # under load the writer committed about two puts a transaction; while
    # puts come faster than it commits them, one waits up to a budget for
    # more, and their commit is shared.  A put that comes alone (a chat
    # client's one message at a time) never waits.
    async def main():
        with pytest.raises(InvalidArgument, match="group_commit_s"):
            await SqliteStore.open(db, group_commit_s=0.5)
        async with await SqliteStore.open(db, max_batch=40, group_commit_s=0.1) as store:
            dev = store.register_device("a@p", "1")
            await store.flush()
            store._group_s = 30.0  # far longer than this test: only a full batch ends it
            # one message at a time, each awaited: a batch of one put is not
            # held (else each of these would wait the budget)
            for _ in range(20):
                await asyncio.wait_for(store.put_many([("s@p", CID, b"1", T0, [dev])]), 10)
            # puts queued while the writer is busy: a batch of several puts ...
            await several_puts_in_a_batch(store, db, dev, b"2", b"3")
            # ... so the next put waits for more: none of it is committed
            before = store.commits
            held = store.put_many([("s@p", CID, b"4", T0, [dev])])
            await asyncio.sleep(0.05)
            assert not held.done() and store.commits == before
            # until the batch is full (or the budget is over): one commit for both
            full = store.put_many([("s@p", CID, b"5", T0, [dev]) for _ in range(39)])
            assert len(await asyncio.wait_for(full, 10)) == 39
            assert held.done() and store.commits == before + 1
            # a budget of 0: every batch goes as soon as it is taken
            store._group_s = 0.0
            for _ in range(3):
                await asyncio.wait_for(asyncio.gather(*[
                    store.put_many([("s@p", CID, b"6", T0, [dev])]) for _ in range(3)]), 10)
            assert [r[3] for r in await store.load(dev, 0, 1000)] == (
                [b"1"] * 20 + [b"2", b"3", b"3", b"4"] + [b"5"] * 39 + [b"6"] * 9)
    run(main())


def _wakeups(thread: threading.Thread) -> int:
    """How many times ``thread`` went to sleep and was woken so far (its
    voluntary context switches, Linux)."""
    return thread_counter(thread.native_id, "status", "voluntary_ctxt_switches")


async def writer_naps(store) -> None:
    """Wait until the writer naps for more puts (in ``_nap_for``)."""
    for _ in range(5000):
        frame = sys._current_frames().get(store._thread.ident)
        while frame is not None and frame.f_code.co_name != "_nap_for":
            frame = frame.f_back
        if frame is not None:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the writer never napped")


def test_sqlite_writer_naps_through_the_puts_it_waits_for(run, db):
    # while the writer waits for more puts, the puts that come do not wake
    # it (each was a wake-up of both threads, and the GIL taken back from a
    # busy loop); only the one that fills its batch does
    async def main():
        async with await SqliteStore.open(db, max_batch=100, group_commit_s=0.1) as store:
            dev = store.register_device("a@p", "1")
            await store.flush()
            # puts queued while the writer is busy: its next batch waits for more
            first = await several_puts_in_a_batch(store, db, dev, b"1", b"1")
            store._group_s = 30.0  # far longer than this test: only a full batch ends it
            before = store.commits
            held = store.put_many([("s@p", CID, b"2", T0, [dev])])
            await writer_naps(store)
            woken = _wakeups(store._thread)
            for _ in range(30):
                store.put_many([("s@p", CID, b"3", T0, [dev])])
                await asyncio.sleep(0.002)
            # an ack handed to it counts too (1 of the batch's 100)
            store.ack(dev, first[:1])
            assert _wakeups(store._thread) - woken <= 2  # not 30
            assert not held.done() and store.commits == before
            full = store.put_many([("s@p", CID, b"4", T0, [dev]) for _ in range(68)])
            assert len(await asyncio.wait_for(full, 10)) == 68
            assert held.done() and store.commits == before + 1
            assert [r[3] for r in await store.load(dev, 0, 1000)] == (
                [b"1"] * 2 + [b"2"] + [b"3"] * 30 + [b"4"] * 68)
            store._group_s = 0.0  # close() does not wait the budget for more
    run(main())


def test_sqlite_waits_after_a_pause_for_the_rest_of_a_burst(run, db):
    # a sender's burst comes as several frames, each read apart: after a
    # pause, while puts came in bursts (the last batch had several, or its
    # put came while the writer was busy), the first put of the next batch
    # waits (0.2 ms) for the rest, and the burst shares one commit; a put
    # that came alone to an idle writer goes at once after a pause
    async def burst_shares_a_commit(store, dev, body):
        await asyncio.sleep(0.2)  # a pause: past the group budget
        before = store.commits
        held = store.put_many([("s@p", CID, body, T0, [dev])])
        await asyncio.sleep(0.1)  # two budgets: it would have gone by now
        assert not held.done() and store.commits == before
        rest = store.put_many([("s@p", CID, body, T0, [dev])])
        await asyncio.wait_for(asyncio.gather(held, rest), 10)
        assert store.commits == before + 1  # the burst's one commit

    async def main():
        async with await SqliteStore.open(db, group_commit_s=0) as store:
            assert store._burst_s == 0.0  # a budget of 0: no wait at all
        async with await SqliteStore.open(db, group_commit_s=0.05) as store:
            assert store._burst_s == store_mod._BURST_S == 0.0002
            dev = store.register_device("a@p", "1")
            await store.flush()
            # a put that comes while the writer is busy: puts come in bursts
            with write_locked(db):
                first = store.put_many([("s@p", CID, b"1", T0, [dev])])
                await writer_holds_its_batch(store)
                second = store.put_many([("s@p", CID, b"2", T0, [dev])])
            await asyncio.gather(first, second)
            store._burst_s = 0.5  # long enough to see on a loaded host
            await burst_shares_a_commit(store, dev, b"3")
            # that batch had two puts: so does the next burst
            await burst_shares_a_commit(store, dev, b"4")
            # a batch of one put that came to an idle writer (after a short wait) ...
            store._burst_s = 0.0002
            await asyncio.sleep(0.2)
            await asyncio.wait_for(store.put_many([("s@p", CID, b"5", T0, [dev])]), 10)
            # ... so a put after a pause is alone: at once, however long a burst's wait
            store._burst_s = 30.0
            await asyncio.sleep(0.2)
            before = store.commits
            await asyncio.wait_for(store.put_many([("s@p", CID, b"6", T0, [dev])]), 10)
            assert store.commits == before + 1
            assert [r[3] for r in await store.load(dev, 0, 100)] == [
                b"1", b"2", b"3", b"3", b"4", b"4", b"5", b"6"]
    run(main())


def test_sqlite_frees_what_the_loop_made_on_the_loops_thread(run, db):
    # a put's items and an ack's ids are made on the loop's thread; freed in
    # the writer, each block's cache line went from one core to the other and
    # back (the loop's allocations and the writer's frees were a tenth of each
    # thread's profile in a 1:1 relay run)
    freed: list[tuple[str, int]] = []

    class Keys(list):
        def __del__(self):
            freed.append(("keys", threading.get_ident()))

    class Mids(list):
        def __del__(self):
            freed.append(("mids", threading.get_ident()))

    async def main():
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            mids = await store.put_many([("s@p", CID, b"m", T0, Keys([dev]))], validate=False)
            assert type(mids) is list  # the writer's range, a list by the time it is read
            store.ack(dev, Mids(mids), validate=False)
            await store.flush()  # a later batch: the writer has moved on
            await store.flush()
            for _ in range(3):
                await asyncio.sleep(0)
            assert sorted(freed) == [("keys", loop_thread), ("mids", loop_thread)]
            assert await store.load(dev, 0, 10) == []
    loop_thread = threading.get_ident()
    run(main())


def test_sqlite_reserves_mids_a_block_at_a_time(run, db):
    # meta's next_mid is written once a block of mids, not every transaction;
    # a reopened store starts past the block, so no mid ever comes back
    block = store_mod._MID_BLOCK

    async def main(n):
        async with await SqliteStore.open(db) as store:
            dev = store.register_device("a@p", "1")
            mids = []
            for _ in range(n):
                mids += await store.put_many([("s@p", CID, b"x", T0, [dev])] * 3)
                assert count(db, "SELECT v FROM meta WHERE k = 'next_mid'") > mids[-1]
            store.ack(dev, mids)
            return mids, store.commits

    first, commits = run(main(5))
    assert first == list(range(1, 16)) and commits >= 5
    assert count(db, "SELECT v FROM meta WHERE k = 'next_mid'") == 4 + block
    again, _ = run(main(2))
    assert again[0] == 4 + block
    assert count(db, "SELECT v FROM meta WHERE k = 'next_mid'") == 7 + 2 * block


# -- messages for several devices (formats 4, 5): stored once, counted in memory --


def _shares_of(db, dev) -> list[int]:
    conn = raw(db)
    try:
        return sorted(m for (blob,) in conn.execute(
            "SELECT " + store_mod._SHARE_MIDS.format("shares") + " FROM shares WHERE dev = ?",
            (dev,)) for m in store_mod._mids(blob))
    finally:
        conn.close()


def test_sqlite_a_shared_message_goes_with_its_last_holder_across_a_reopen(run, db):
    # the holders of each shared message are counted in memory; a reopened
    # store counts them again from the shares, acked in part ones included
    async def main(step):
        async with await SqliteStore.open(db) as store:
            a, b, c = (store.register_device("g@p", d) for d in "abc")
            if step == 0:
                items = [("s@p", CID, b"g%d" % i, T0, [(a, b, c), (a, b), (a,)][i % 3])
                         for i in range(9)]
                mids = await store.put_many(items)
                assert len(_spacked(db)) == 6
                assert len(store._counts) == 6
                assert _shares_of(db, c) == mids[0:9:3]
                store.ack(a, mids)
                store.ack(b, mids[:3])  # part of b's share: rewritten at close
                await asyncio.sleep(0.05)
                store.ack(b, mids[:3])  # again, before the rewrite: counted once
                await store.flush()
                assert len(store._counts) == 5  # mids[1] is gone: a and b acked it
                assert len(_spacked(db)) == 5
                return mids
            mids = step
            assert len(store._counts) == 5
            assert [r[0] for r in await store.load(b, 0, 10)] == [mids[3], mids[4], mids[6],
                                                                 mids[7]]
            store.ack(c, mids)
            await store.flush()
            assert len(_spacked(db)) == 4  # b still has them
            store.ack(b, mids[3:5])
            await store.flush()
            assert len(_spacked(db)) == 2
            store.ack(b, mids)
            await store.flush()
            assert len(store._counts) == 0 and store._counts.blocks == {}
            assert await store.count_pending() == 0
        return None

    mids = run(main(0))
    assert _shares_of(db, 2) == [mids[3], mids[4], mids[6], mids[7]]
    run(main(mids))
    assert len(_spacked(db)) == 0
    assert count(db, "SELECT count(*) FROM shares") == 0


def test_sqlite_opens_shares_that_outlived_their_messages(run, db):
    # a share may list a message no longer stored (it expired, it was
    # erased) and, were a file damaged, a shared message may have no share:
    # reads skip the first, the open deletes the second, counts stay right
    async def main(step):
        async with await SqliteStore.open(db) as store:
            a, b = (store.register_device("g@p", d) for d in "ab")
            if step == 0:
                return await store.put_many([("s@p", CID, b"m%d" % i, T0, [a, b])
                                             for i in range(4)])
            mids = step
            assert len(_spacked(db)) == 3  # the orphan is gone
            assert [r[3] for r in await store.load(a, 0, 10)] == [b"m0", b"m2", b"m3"]
            assert [r[0] for r in await store.load(a, mids[0], 1)] == [mids[2]]
            # the shares were rewritten without the message that is gone
            assert await store.backlog_counts() == {a: (3, 6), b: (2, 4)}
            store.ack(a, mids)
            store.ack(b, mids)
            await store.flush()
            assert len(_spacked(db)) == 0
            assert count(db, "SELECT count(*) FROM shares") == 0
            return None

    mids = run(main(0))
    conn = raw(db)
    # a's and b's share list it
    store_mod._keep_spack(conn, mids[0], lambda e: e[0] != mids[1])
    conn.execute("UPDATE shares SET mids = ?, n = 3, nbytes = 6 WHERE dev = 2", (
        store_mod.array.array("q", [mids[0], mids[1], mids[2]]).tobytes(),))  # not m3
    conn.close()
    run(main(mids))


def test_sqlite_a_failed_ack_leaves_the_counts_as_they_were(run, db):
    # an ack batch that fails is retried; had the rolled back transaction
    # left its count down, the retry would take it down again and delete a
    # message another device still has to get
    async def main():
        async with await SqliteStore.open(db) as store:
            a, b = (store.register_device("g@p", d) for d in "ab")
            mid = await store.put("s@p", CID, b"both", T0, [a, b])
            await store.flush()  # the writer is idle: safe to touch its connection
            store._wconn.execute("PRAGMA busy_timeout = 50")
            with write_locked(db):
                store.ack(a, [mid])
                await asyncio.sleep(0.3)
                assert store.failed_batches >= 1
            await asyncio.sleep(1.0)  # retried every 0.5 s when idle
            await store.flush()
            assert store.deletes_waiting == 0
            assert await store.load(a, 0, 10) == []
            assert [r[3] for r in await store.load(b, 0, 10)] == [b"both"]
            store.ack(b, [mid])
            await store.flush()
            assert len(_spacked(db)) == 0
    run(main())


def test_sqlite_forget_and_expire_release_shared_messages(run, db):
    async def main():
        async with await SqliteStore.open(db, ttl_s=10) as store:
            a, b, c = (store.register_device("g@p", d) for d in "abc")
            old = await store.put_many([("s@p", CID, b"old", T0, [a, b, c])] * 2)
            new = await store.put("s@p", CID, b"new", T0 + 5_000, [a, b])
            store.ack(a, old[:1])  # a's share acked in part, not yet rewritten
            store.forget_device(c)
            await store.flush()
            assert _shares_of(db, c) == []
            assert await store.expire(T0 + 10_000) == 2  # each message once
            assert len(store._counts) == 1
            assert [r[0] for r in await store.load(a, 0, 10)] == [new]
            assert _shares_of(db, a) == [new] and _shares_of(db, b) == [new]
            store.forget_device(b)
            store.ack(a, [new])
            await store.flush()
            assert len(_spacked(db)) == 0
            assert count(db, "SELECT count(*) FROM shares") == 0
            assert store._counts.blocks == {}
    run(main())


_V3_SCHEMA = _V2_SCHEMA.replace("PRAGMA user_version = 2;", """
CREATE TABLE packs(dev INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    n INTEGER NOT NULL, nbytes INTEGER NOT NULL, exp_ms INTEGER NOT NULL, mids BLOB NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY(dev, first)) WITHOUT ROWID;
CREATE INDEX packs_exp ON packs(exp_ms);
PRAGMA user_version = 3;
""")


def test_sqlite_migrates_a_version_3_store(run, db):
    # version 3 kept a message for several devices in messages with inbox
    # rows: it stays readable and ackable next to the shares of version 4
    _old_store(db, _V3_SCHEMA)

    async def main():
        async with await SqliteStore.open(db) as store:
            mids = await store.put_many([("s@p", CID, b"new%d" % i, T0, [1, 2])
                                         for i in range(2)])
            assert mids == [3, 4]
            assert [(r[0], r[3]) for r in await store.load(2, 0, 10)] == [
                (2, b"old2"), (3, b"new0"), (4, b"new1")]
            assert await store.backlog_counts() == {1: (4, 3 + 4 + 2 * 4), 2: (3, 4 + 2 * 4)}
            for dev in (1, 2):
                store.ack(dev, [1, 2, 3, 4])
            await store.flush()
            assert await store.count_pending() == 0
        assert count(db, "SELECT count(*) FROM messages") == 0
        assert count(db, "SELECT count(*) FROM inbox") == 0
        assert len(_spacked(db)) == 0
        assert count(db, "PRAGMA user_version") == store_mod._SCHEMA_VERSION
    run(main())


_V4_SCHEMA = _V3_SCHEMA.replace("PRAGMA user_version = 3;", """
CREATE TABLE shared(mid INTEGER PRIMARY KEY, sender TEXT NOT NULL, cid BLOB NOT NULL,
    body BLOB NOT NULL, ts_ms INTEGER NOT NULL, exp_ms INTEGER NOT NULL);
CREATE INDEX shared_exp ON shared(exp_ms);
CREATE TABLE shares(dev INTEGER NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL,
    n INTEGER NOT NULL, nbytes INTEGER NOT NULL, exp_ms INTEGER NOT NULL, mids BLOB NOT NULL,
    PRIMARY KEY(dev, first)) WITHOUT ROWID;
CREATE INDEX shares_exp ON shares(exp_ms);
PRAGMA user_version = 4;
""")


def test_sqlite_moves_a_version_4_stores_shared_rows_into_spacks(run, db):
    # version 4 kept a message for several devices in a row of its own;
    # opening the store moves them into spacks (one a transaction, keyed as
    # the shares name it) and drops the table, bodies included
    _old_store(db, _V4_SCHEMA)
    conn = raw(db)
    int64s = store_mod.array.array
    conn.executemany("INSERT INTO shared VALUES (?, 's@p', ?, ?, 1, ?)",
                     [(m, CID, b"V4-BODY-%d" % m, 9 * 10**15) for m in (3, 4, 5, 7)])
    # transaction 3: 3, 4, 5 for devices 1 and 2 (2 acked 4 already); 7
    # alone in transaction 7 for device 2; 6 was deleted (no row, listed)
    conn.executemany("INSERT INTO shares VALUES (?, ?, ?, ?, 0, 0, ?)", [
        (1, 3, 5, 3, int64s("q", [3, 4, 5]).tobytes()),
        (2, 3, 6, 3, int64s("q", [3, 5, 6]).tobytes()),
        (2, 7, 7, 1, int64s("q", [7]).tobytes())])
    conn.close()

    async def main():
        async with await SqliteStore.open(db) as store:
            assert [(r[0], r[3]) for r in await store.load(2, 0, 10)] == [
                (2, b"old2"), (3, b"V4-BODY-3"), (5, b"V4-BODY-5"), (7, b"V4-BODY-7")]
            assert [r[0] for r in await store.load(1, 2, 2)] == [3, 4]
            assert len(store._counts) == 4
            new = await store.put("s@p", CID, b"new", T0, [1, 2])
            assert new > 7
            store.ack(1, [3, 4, 5, new])
            await store.flush()
            assert _spacked(db) == [3, 5, 7, new]  # 4 had no other holder
            store.ack(2, [2, 3, 5, 7, new])
            await store.flush()
            assert await store.count_pending() == 2  # device 1's of version 3 (1, 2)
        assert count(db, "SELECT count(*) FROM sqlite_master WHERE name = 'shared'") == 0
        assert count(db, "SELECT count(*) FROM spacks") == 0
        assert count(db, "PRAGMA user_version") == store_mod._SCHEMA_VERSION
        raw_bytes = _on_disk(db)
        assert b"V4-BODY" not in raw_bytes
    run(main())


def test_sqlite_moved_version_4_spacks_name_their_devices(run, db):
    # the spacks made from version 4's shared rows get devs from its shares,
    # and an expiry finds those shares through them
    _old_store(db, _V4_SCHEMA)
    conn = raw(db)
    int64s = store_mod.array.array
    conn.executemany("INSERT INTO shared VALUES (?, 's@p', ?, x'78', 1, ?)",
                     [(m, CID, exp) for m, exp in ((3, 50), (4, 90), (7, 50))])
    conn.executemany("INSERT INTO shares VALUES (?, ?, ?, ?, 1, ?, ?)", [
        (1, 3, 4, 2, 50, int64s("q", [3, 4]).tobytes()),
        (2, 3, 4, 2, 50, int64s("q", [3, 4]).tobytes()),
        (2, 7, 7, 1, 50, int64s("q", [7]).tobytes())])
    conn.close()

    async def main():
        async with await SqliteStore.open(db) as store:
            assert _devs(db) == {3: [1, 2], 7: [2]}
            assert await store.expire(60) == 2  # 3 and 7
            await store.flush()
            assert [r[0] for r in await store.load(1, 0, 10)] == [1, 2, 4]  # 1, 2: version 3's
            assert [r[0] for r in await store.load(2, 0, 10)] == [2, 4]
        assert _share_rows(db) == [(1, 3, [4]), (2, 3, [4])]
    run(main())


def _devs(db) -> dict[int, list[int]]:
    """Each spack's devs (its first -> the device keys)."""
    conn = raw(db)
    try:
        return {first: list(store_mod._mids(blob))
                for first, blob in conn.execute("SELECT first, devs FROM spacks")}
    finally:
        conn.close()


def _share_rows(db) -> list[tuple[int, int, list[int] | None]]:
    """Every share: device, spack, its own mids (None: all its spack holds)."""
    conn = raw(db)
    try:
        return [(dev, first, None if blob is None else list(store_mod._mids(blob)))
                for dev, first, blob in conn.execute(
                    "SELECT dev, first, mids FROM shares ORDER BY dev, first")]
    finally:
        conn.close()


# version 6's spacks, without devs (the rest of its schema is this one's,
# with shares' index on exp_ms)
_V6_SPACKS = """
CREATE TABLE spacks_v7 AS SELECT * FROM spacks;
DROP TABLE spacks;
CREATE TABLE spacks(first INTEGER PRIMARY KEY, last INTEGER NOT NULL, n INTEGER NOT NULL,
    nbytes INTEGER NOT NULL, exp_ms INTEGER NOT NULL, mids BLOB NOT NULL, lens BLOB NOT NULL,
    exps BLOB NOT NULL, data BLOB NOT NULL);
CREATE INDEX spacks_exp ON spacks(exp_ms);
INSERT INTO spacks SELECT first, last, n, nbytes, exp_ms, mids, lens, exps, data FROM spacks_v7;
DROP TABLE spacks_v7;
CREATE INDEX shares_exp ON shares(exp_ms);
PRAGMA user_version = 6;
"""


def test_sqlite_gives_a_version_6_stores_spacks_their_devices(run, db):
    # version 6 found the shares to rewrite at an expiry by their own index
    # on exp_ms; opening its store drops that index and fills each spack's
    # devs from its shares, through which expiry then finds them
    async def make():
        async with await SqliteStore.open(db, ttl_s=10) as store:
            a, b, c = (store.register_device("g@p", d) for d in "abc")
            early = await store.put_many([("s@p", CID, b"EARLY-%d" % i, T0, [c, a, b])
                                          for i in range(3)])
            late = await store.put_many([("s@p", CID, b"LATE-%d" % i, T0 + 60_000, [a, b])
                                         for i in range(2)])
            store.ack(c, early)
            store.ack(b, early[:1])
            await store.flush()
            # as written: the set's order, c's share gone with its ack
            assert _devs(db) == {early[0]: [c, a, b], late[0]: [a, b]}
        return (a, b, c), early, late

    (a, b, c), early, late = run(make())
    conn = raw(db)
    conn.executescript(f"BEGIN;{_V6_SPACKS}COMMIT;")
    conn.close()
    assert count(db, "SELECT count(*) FROM sqlite_master "
                 "WHERE name IN ('shares_exp', 'spacks_exp')") == 2

    async def main():
        async with await SqliteStore.open(db, ttl_s=10) as store:
            assert count(db, "PRAGMA user_version") == store_mod._SCHEMA_VERSION
            assert count(db, "SELECT count(*) FROM sqlite_master "
                         "WHERE name IN ('shares_exp', 'spacks_exp')") == 0
            # from the shares that are left, in key order
            assert _devs(db) == {early[0]: [a, b], late[0]: [a, b]}
            assert [r[3] for r in await store.load(b, 0, 10)] == [
                b"EARLY-1", b"EARLY-2", b"LATE-0", b"LATE-1"]
            assert await store.expire(T0 + 10_000) == 3
            await store.flush()
            assert [r[0] for r in await store.load(a, 0, 10)] == late
            assert await store.backlog_counts() == {a: (2, 12), b: (2, 12)}
        # the early spack's shares went with its messages; the late ones stay whole
        assert _share_rows(db) == [(a, late[0], None), (b, late[0], None)]
        assert sorted(_devs(db)) == [late[0]]
        assert b"EARLY-" not in _on_disk(db)
    run(main())


def test_sqlite_one_transaction_keeps_each_groups_messages_in_a_spack(run, db):
    # two groups' messages interleave in one transaction: a spack each, and
    # a device in both has two shares whose mids interleave; reads still
    # come in mid order, a page at a time
    async def main():
        async with await SqliteStore.open(db) as store:
            a, b, c = (store.register_device("g@p", d) for d in "abc")
            g1, g2 = (a, b), (a, c)
            items = [("s@p", CID, b"m%d" % i, T0, [g1, g2, [a, b], (c, a)][i % 4])
                     for i in range(12)]
            mids = await store.put_many(items)
            # (a, b) and [a, b] are one set; (a, c) and (c, a) are two
            assert count(db, "SELECT count(*) FROM spacks") == 3
            assert count(db, "SELECT count(*) FROM shares WHERE dev = ?", a) == 3
            assert [r[0] for r in await store.load(a, 0, 100)] == mids
            for after in (0, mids[2], mids[7]):
                for limit in (1, 2, 5):
                    want = [m for m in mids if m > after][:limit]
                    assert [r[0] for r in await store.load(a, after, limit)] == want
            assert [r[3] for r in await store.load(c, 0, 3)] == [b"m1", b"m3", b"m5"]
            store.ack(a, mids)
            store.ack(b, mids)
            await store.flush()
            assert _spacked(db) == [m for i, m in enumerate(mids) if i % 2]  # c's
            store.ack(c, mids)
            await store.flush()
            assert count(db, "SELECT count(*) FROM spacks") == 0
            assert store._counts.blocks == {}
    run(main())


def test_sqlite_a_spack_loses_what_no_device_holds_at_the_rewrite(run, db):
    # messages every device acked leave their spack (the body with them)
    # by the rewrite, not only when the whole spack goes; until then reads
    # of a device that did not ack them still find the others
    async def main():
        async with await SqliteStore.open(db) as store:
            a, b = (store.register_device("g@p", d) for d in "ab")
            mids = await store.put_many([("s@p", CID, b"GONE-%d" % i, T0, [a, b])
                                         for i in range(4)])
            store.ack(a, mids[:2])
            store.ack(b, mids[:2])
            await asyncio.sleep(0.05)
            assert count(db, "SELECT n FROM spacks") == 4  # not rewritten at once
            assert store._sgone == {mids[0]: frozenset(mids[:2])}
            await store.flush()
            assert count(db, "SELECT n, nbytes, last FROM spacks") == 2
            conn = raw(db)
            try:
                (first, data, lens), = conn.execute("SELECT first, data, lens FROM spacks")
            finally:
                conn.close()
            assert first == mids[0]  # the key stays: the shares name it
            assert b"GONE-0" not in data and b"GONE-2" in data
            assert list(store_mod.array.array("i", lens)) == [6, 6]
            assert store._sgone == {} and store.rewrites >= 1
            assert [r[0] for r in await store.load(a, 0, 10)] == mids[2:]
            store.ack(a, mids)
            store.ack(b, mids[2:3])
            await store.flush()
            assert _spacked(db) == [mids[3]]
            assert await store.backlog_counts() == {b: (1, 6)}
    run(main())


def test_sqlite_counts_loaded_in_blocks_of_whole_spacks(run, db, monkeypatch):
    # a reopened store counts its spacks in blocks (a block's counts are
    # copied by a transaction's first change): many small spacks across
    # several blocks still find their counts
    monkeypatch.setattr(store_mod._Counts, "LOADED_BLOCK", 3)

    async def main(step):
        async with await SqliteStore.open(db) as store:
            devs = [store.register_device("g@p", d) for d in "abcd"]
            if step is None:
                out = []
                for i in range(6):  # one spack a transaction, two messages each
                    out += await store.put_many([("s@p", CID, b"x", T0, devs[:2 + i % 3])] * 2)
                return out
            mids = step
            assert len(store._counts.blocks) == 3
            assert len(store._counts) == 12
            for dev in devs:
                store.ack(dev, mids[::2])
            await store.flush()
            assert _spacked(db) == mids[1::2]
            assert len(store._counts) == 6
            for dev in devs[1:]:
                store.ack(dev, mids)
            await store.flush()
            assert _spacked(db) == mids[1::2]  # device a still holds them
            store.ack(devs[0], mids)
            await store.flush()
            assert _spacked(db) == [] and store._counts.blocks == {}
        return None

    run(main(run(main(None))))


def test_sqlite_a_whole_share_acked_after_part_of_it_releases_each_message_once(run, db):
    # a device acks part of its share, then (before the rewrite) all of it
    # in order: the second ack names the first's message again, which must
    # not count as a second release (b still has to get it)
    async def main():
        async with await SqliteStore.open(db) as store:
            a, b = (store.register_device("g@p", d) for d in "ab")
            mids = await store.put_many([("s@p", CID, b"m%d" % i, T0, [a, b])
                                         for i in range(3)])
            store.ack(a, mids[:1])
            await asyncio.sleep(0.05)  # its own transaction, no rewrite yet
            assert store._spartial
            store.ack(a, mids)
            await store.flush()
            assert [r[0] for r in await store.load(b, 0, 10)] == mids
            assert _spacked(db) == mids
            store.ack(b, mids)
            await store.flush()
            assert _spacked(db) == [] and await store.count_pending() == 0
    run(main())


def test_erasing_an_address_from_a_version_4_store_upgrades_it_first(db, tmp_path):
    # `fastroute address erase` on a stopped relay's older store: the file is
    # upgraded (its shared rows moved into spacks), then the address's
    # messages are taken out of them, and the others' shares follow
    from fastroute.erase import erase_address
    _old_store(db, _V4_SCHEMA)
    conn = raw(db)
    conn.execute("INSERT INTO devices VALUES (3, 'erin@home', 'phone')")
    conn.executemany("INSERT INTO shared VALUES (?, ?, ?, ?, 1, ?)", [
        (m, sender, CID, b"V4-%s-%d" % (sender[:4].encode(), m), 9 * 10**15)
        for m, sender in ((3, "carol@home"), (4, "erin@home"), (5, "carol@home"))])
    # devices 1 and 2 hold all three; erin's own device 3 holds 5 only
    conn.executemany("INSERT INTO shares VALUES (?, 3, ?, ?, 0, 0, ?)", [
        (1, 5, 3, store_mod.array.array("q", [3, 4, 5]).tobytes()),
        (2, 5, 3, store_mod.array.array("q", [3, 4, 5]).tobytes()),
        (3, 5, 1, store_mod.array.array("q", [5]).tobytes())])
    conn.close()
    out = erase_address(str(tmp_path), "erin@home")
    assert out["devices"] == 1 and out["deliveries_to_it"] == 1
    assert out["messages_from_it"] == 1
    assert count(db, "PRAGMA user_version") == store_mod._SCHEMA_VERSION
    assert _spacked(db) == [3, 5] and _shares_of(db, 1) == [3, 5] == _shares_of(db, 2)
    assert count(db, "SELECT count(*) FROM shares WHERE dev = 3") == 0
    # the spack named erin's device among those it went to: not any more
    assert _devs(db) == {3: [1, 2]}
    raw_bytes = _on_disk(db)
    assert b"V4-erin" not in raw_bytes and b"erin@home" not in raw_bytes
    assert b"V4-caro" in raw_bytes


def test_sqlite_moves_a_version_5_stores_packs_into_a_rowid_table(run, db):
    # version 5 kept packs WITHOUT ROWID, whose seeks read whole packs to
    # compare keys; opening the store moves them into the rowid table and
    # drops the old one, its rows zeroed
    async def write():
        async with await SqliteStore.open(db) as store:
            _devices(store, 2)
            await store.put_many([("s@p", CID, b"V5-BODY-%d" % i, T0, [1]) for i in range(5)])
            await store.put_many([("s@p", CID, b"V5-BODY-%d" % i, T0, [1, 2])
                                  for i in range(5, 7)])
    run(write())
    before = _pack_rows(db)
    conn = raw(db)
    conn.executescript("""
        BEGIN;
        CREATE TABLE packs_v5(dev INTEGER NOT NULL, first INTEGER NOT NULL,
            last INTEGER NOT NULL, n INTEGER NOT NULL, nbytes INTEGER NOT NULL,
            exp_ms INTEGER NOT NULL, mids BLOB NOT NULL, data BLOB NOT NULL,
            PRIMARY KEY(dev, first)) WITHOUT ROWID;
        INSERT INTO packs_v5 SELECT * FROM packs;
        DROP TABLE packs;
        ALTER TABLE packs_v5 RENAME TO packs;
        CREATE INDEX packs_exp ON packs(exp_ms);
        PRAGMA user_version = 5;
        COMMIT;
    """)
    conn.close()
    assert "WITHOUT ROWID" in _packs_sql(db) and _pack_rows(db) == before

    async def main():
        async with await SqliteStore.open(db) as store:
            got = await store.load(1, 0, 10)
            assert [r[3] for r in got] == [b"V5-BODY-%d" % i for i in range(7)]
            assert [r[3] for r in await store.load(1, got[2][0], 2)] == [b"V5-BODY-3",
                                                                          b"V5-BODY-4"]
            store.ack(1, [r[0] for r in got])
            store.ack(2, [r[0] for r in got[5:]])
            await store.flush()
            assert await store.count_pending() == 0
    run(main())
    assert "WITHOUT ROWID" not in _packs_sql(db)
    assert count(db, "SELECT count(*) FROM sqlite_master WHERE name = 'packs_v5'") == 0
    assert count(db, "SELECT count(*) FROM sqlite_master WHERE name = 'packs_key'") == 1
    assert count(db, "PRAGMA user_version") == store_mod._SCHEMA_VERSION
    raw_bytes = _on_disk(db)
    assert b"V5-BODY" not in raw_bytes


def _devices(store, n: int) -> None:
    """Register devices 1 to ``n`` (device keys count from 1)."""
    assert [store.register_device(f"d{i}@p", "phone") for i in range(1, n + 1)] == \
        list(range(1, n + 1))


def _packs_sql(db) -> str:
    return count(db, "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'packs'")


def _pack_rows(db) -> list:
    conn = raw(db)
    try:
        return conn.execute("SELECT * FROM packs ORDER BY dev, first").fetchall()
    finally:
        conn.close()


def _fresh_load(db, dev, after, limit) -> list:
    """What a load returns from an independent connection, no pack's rest kept."""
    conn = raw(db)
    try:
        return store_mod._load(conn, dev, after, limit)
    finally:
        conn.close()


def test_a_backlog_is_loaded_from_a_pack_without_unpacking_it_again(run, db, monkeypatch):
    # one transaction, one pack of 3000 messages: loads of 1000 from where
    # the last one stopped take the rest the reader kept of it
    async def main():
        async with await SqliteStore.open(db) as store:
            _devices(store, 2)
            await store.put_many([("s@p", CID, b"%04d" % i, T0 + i, [1]) for i in range(3000)])
            assert count(db, "SELECT count(*) FROM packs") == 1
            calls = []
            real = store_mod._pack_rows
            monkeypatch.setattr(store_mod, "_pack_rows",
                                lambda data: calls.append(len(data)) or real(data))
            loads = []
            got: list = []
            after = 0
            while True:
                rows = await store.load(1, after, 1000)
                loads.append((after, rows))
                if not rows:
                    break
                got += rows
                after = rows[-1][0]
            monkeypatch.undo()
            for after, rows in loads:
                assert rows == _fresh_load(db, 1, after, 1000)
            assert [r[3] for r in got] == [b"%04d" % i for i in range(3000)]
            assert len(calls) == 1  # unpacked once, not at each of the three loads
            assert store._rpacks == {} and store._rpacks.nbytes == 0  # all taken
    run(main())


def test_a_packs_kept_rest_is_used_only_while_it_is_what_the_store_holds(run, db):
    async def main():
        async with await SqliteStore.open(db) as store:
            _devices(store, 2)
            shared = await store.put_many([("s@p", CID, b"%04d" % i, T0, [1, 2])
                                           for i in range(5)])
            mids = await store.put_many([("s@p", CID, b"%04d" % i, T0, [1])
                                         for i in range(100)])
            first = await store.load(1, 0, 30)
            assert [r[0] for r in first] == shared + mids[:25]
            after = first[-1][0]
            assert 1 in store._rpacks
            # acked ahead of the cursor: the pack is rewritten without them at
            # the flush, and the kept rest (which still has them) is not used
            store.ack(1, mids[50:60])
            await store.flush()
            rows = await store.load(1, after, 100)
            assert rows == _fresh_load(db, 1, after, 100)
            assert [r[0] for r in rows] == mids[25:50] + mids[60:]
            # a load from before where the last one started reads the pack again
            ahead = await store.load(1, mids[40], 5)
            assert [r[0] for r in ahead] == mids[41:46]
            again = await store.load(1, mids[10], 5)
            assert [r[0] for r in again] == mids[11:16]
            assert again == _fresh_load(db, 1, mids[10], 5)
            assert 1 in store._rpacks
            store.forget_device(1)
            await store.load(2, 0, 1)  # the reader ran the drop before this
            assert 1 not in store._rpacks
            assert store._rpacks.nbytes == sum(kept[4] for kept in store._rpacks.values())
    run(main())


def test_the_kept_rests_of_packs_are_bounded(run, db, monkeypatch):
    monkeypatch.setattr(store_mod, "_PACK_RESTS_BYTES", 3000)

    async def main():
        async with await SqliteStore.open(db) as store:
            _devices(store, 3)
            for dev in (1, 2, 3):
                await store.put_many([("s@p", CID, b"x" * 100, T0, [dev])] * 10)
            sizes = {}
            for dev in (1, 2, 3):
                assert len(await store.load(dev, 0, 5)) == 5
                sizes[dev] = store._rpacks[dev][4]
                assert store._rpacks.nbytes <= 3000
            # each pack is ~1.2 KB: the oldest rest went first
            assert list(store._rpacks) == [2, 3] and 1 not in store._rpacks
            assert store._rpacks.nbytes == sizes[2] + sizes[3]
            rows = await store.load(1, 5, 10)
            assert [r[3] for r in rows] == [b"x" * 100] * 5
    run(main())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["put", "load", "ack", "flush"]),
                          st.integers(0, 40), st.integers(1, 60), st.integers(1, 2)),
                min_size=1, max_size=40))
def test_loads_with_kept_rests_equal_loads_without(tmp_path_factory, steps):
    # the specification: every load returns what a load with nothing kept does
    db = str(tmp_path_factory.mktemp("rests") / "store.db")

    async def main():
        async with await SqliteStore.open(db) as store:
            _devices(store, 2)
            mids: list = []
            cursor = {1: 0, 2: 0}
            for op, a, b, dev in steps:
                if op == "put":
                    devs = [dev] if a % 3 else [1, 2]
                    mids += await store.put_many([("s@p", CID, b"%d" % i, T0, devs)
                                                  for i in range(b)])
                elif op == "load":
                    # mostly from where the last load stopped, as a sync does
                    after = cursor[dev] if a % 4 else (mids[a % len(mids)] if mids else 0)
                    rows = await store.load(dev, after, b)
                    assert rows == _fresh_load(db, dev, after, b)
                    if rows:
                        cursor[dev] = rows[-1][0]
                elif op == "ack" and mids:
                    store.ack(dev, mids[a % len(mids):][:b])
                else:
                    await store.flush()
    asyncio.run(main())


def test_a_load_that_ends_inside_a_short_pack_keeps_its_rest(run, db):
    # packs of 10 and 15, loads of 20: the first load takes the first pack
    # whole and 10 of the second, whose data the listing already read; the
    # next load goes on from there with the rows kept of it
    async def main():
        async with await SqliteStore.open(db) as store:
            _devices(store, 1)
            mids = await store.put_many([("s@p", CID, b"a%d" % i, T0, [1]) for i in range(10)])
            mids += await store.put_many([("s@p", CID, b"b%d" % i, T0, [1]) for i in range(15)])
            first = await store.load(1, 0, 20)
            assert [r[0] for r in first] == mids[:20]
            assert store._rpacks[1][0][0] == mids[10]  # the second pack's rest
            rest = await store.load(1, mids[19], 20)
            assert [r[0] for r in rest] == mids[20:]
            assert rest == _fresh_load(db, 1, mids[19], 20)
    run(main())
