"""Disk full, without skipping anywhere (issue 12): a size-limited message store
(its ``store_max_bytes`` budget, SQLite's ``max_page_count``) and a media store
that cannot eat the message store's reserve, in a real relay on loopback.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from fastroute.errors import ErrorCode, FastrouteError, StoreFull
from relayutil import LOOPS, recv_n, run, world

pytestmark = pytest.mark.parametrize("loop", LOOPS)


def test_a_full_message_store_refuses_with_store_full_then_recovers(loop, tmp_path):
    # No false ack: every SACK 0 is a message that arrives; refusals carry
    # STORE_FULL; the deletes of delivered messages still go through, and
    # the space they free lets the same ids be sent again.
    async def main():
        async with world(tmp_path, store_max_bytes=1 << 20) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme", auto_ack=False)
            body = os.urandom(30_000)
            ids = [os.urandom(16) for _ in range(60)]  # ~1.8 MB: over the budget
            # one at a time: sent together, a busy relay may take all 60 in one
            # store batch, which is refused whole (nothing then to check here)
            results: list = []
            for cid in ids:
                try:
                    results.append(await alice.send("bob@acme", body, id=cid))
                except StoreFull as exc:
                    results.append(exc)
            stored = [cid for cid, r in zip(ids, results) if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, BaseException)]
            assert stored and refused
            assert all(isinstance(r, StoreFull) and r.code == ErrorCode.STORE_FULL
                       for r in refused)
            got = await recv_n(bob, len(stored))
            assert [m.id for m in got] == stored  # no false ack, nothing lost
            # bob takes and acks: the deletes go through on the full store
            bob.ack(got[-1].seq)
            await asyncio.sleep(0.3)
            dkey = w.relay.store.register_device("bob@acme", "phone")
            assert await w.relay.store.count_pending(dkey) == 0
            # recovery: the refused ids are accepted now
            rest = [cid for cid in ids if cid not in stored][:len(stored)]
            await asyncio.gather(*[alice.send_nowait("bob@acme", body, id=cid)
                                   for cid in rest])
            again = await recv_n(bob, len(rest))
            assert [m.id for m in again] == rest
    run(loop, main())


def test_attachments_cannot_eat_the_message_stores_reserve(loop, tmp_path):
    # issue 12: one user's uploads, within quota, filled the disk and every
    # other user's SENDs failed.  The reserve is set just above the free
    # space here, so any upload would eat into it.
    async def main():
        free = os.statvfs(str(tmp_path)).f_bavail * os.statvfs(str(tmp_path)).f_frsize
        async with world(tmp_path, disk_reserve_bytes=free + (1 << 30),
                         media_max_bytes=1 << 20) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            with pytest.raises(StoreFull):
                await alice.upload(os.urandom(1000))
            # messages still flow: the reserve is theirs
            await alice.send("bob@acme", b"still here")
            assert (await recv_n(bob, 1))[0].body == b"still here"
    run(loop, main())


def test_the_media_budget_refuses_with_store_full(loop, tmp_path):
    async def main():
        async with world(tmp_path, disk_reserve_bytes=0, media_max_bytes=100_000) as w:
            alice = await w.connect("alice@home")
            first = await alice.upload(os.urandom(60_000))
            with pytest.raises(FastrouteError) as excinfo:
                await alice.upload(os.urandom(60_000))
            assert excinfo.value.code == ErrorCode.STORE_FULL
            assert await alice.download(first)  # what was stored stays
    run(loop, main())
