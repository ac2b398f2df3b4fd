"""The delivery stage on its own: engine, store and a stand-in link, no sockets."""

from __future__ import annotations

import asyncio

from fastroute import Router, wire
from fastroute.relay.delivery import Delivery
from fastroute.store import MemoryStore


class FakeLink:
    """The LinkPort surface the delivery stage uses, recording flushes."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.paused = False
        self.feed = None
        self.features: frozenset[str] = frozenset()  # a v1 link
        self.sync_hold = None
        self.flushed: list[bytes] = []

    def flush(self) -> None:
        self.flushed.extend(wire.flat_ops(self.out))  # op runs as the ops they hold
        self.out.clear()

    def close(self, code: int, reason: str) -> None:  # pragma: no cover - not reached
        raise AssertionError(f"closed: {code} {reason}")


async def _online(cap: int):
    store = await MemoryStore.open(":memory:", ttl_s=60)
    delivery = Delivery(Router(mailbox_capacity=cap), store, cap)
    delivery.start()
    link = FakeLink()
    link.feed = delivery.attach(link, "bob@home", "phone")
    delivery.start_sync(link.feed)
    for _ in range(20):  # the empty backlog sync resumes the live route
        await asyncio.sleep(0)
    assert link.feed.live
    return store, delivery, link


def _signals(n: int, start: int = 0) -> list:
    # a routed batch is flat: address, payload, address, payload, ...
    return [x for i in range(start, start + n) for x in ("bob@home", (0, b"tail%d" % i))]


def test_ephemeral_overflow_does_not_stop_later_signals():
    # Signals are dropped while a mailbox is full (never stored), but once the
    # device has room again the next ones must reach it: an overflow caused by
    # signals alone leaves nothing in the store for a sync to catch up on.
    async def go():
        store, delivery, link = await _online(cap=4)
        link.paused = True  # the socket is full: nothing is pulled
        delivery.route(_signals(6), ephemeral=True)  # 4 fit, 2 are dropped
        link.paused = False
        delivery.resume(link)
        await asyncio.sleep(0)
        assert len(link.flushed) == 4
        delivery.dack(link, 4)  # the device took them: room again
        delivery.route(_signals(3, start=10), ephemeral=True)
        await asyncio.sleep(0)
        assert len(link.flushed) == 7, "signals after an overflow never arrived"
        assert link.feed.live
        await store.close()

    asyncio.run(go())


def test_persistent_overflow_still_goes_through_the_store():
    # The fix for signals must not resume a device whose persistent messages
    # overflowed: those are the store's to feed, in order.
    async def go():
        store, delivery, link = await _online(cap=2)
        link.paused = True
        items = [("a@home", b"%016d" % i, b"body", 1000 + i, delivery.known["bob@home"])
                 for i in range(4)]
        mids = await delivery.persist(items)
        delivery.persisted([x for mid in mids for x in ("bob@home", (mid, b"t%d" % mid))],
                           mids[-1])
        assert not link.feed.live  # overflowed: the sync owns the device now
        link.paused = False
        for _ in range(3):
            delivery.resume(link)
            await asyncio.sleep(0)
            delivery.dack(link, link.feed.inflight_seq + len(link.feed.inflight) - 1)
            for _ in range(20):
                await asyncio.sleep(0)
        assert len(link.flushed) == 4  # every message, once, in order
        await store.close()

    asyncio.run(go())
