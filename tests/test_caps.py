"""Caps on a recipient's stored backlog (issue 12): a typed refusal to the sender."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from fastroute import wire
from fastroute.errors import ErrorCode, RecipientFull
from fastroute.relay.caps import Caps
from relayutil import LOOPS, recv_n, run, world


@pytest.mark.parametrize("loop", LOOPS)
def test_a_full_recipient_gets_recipient_full_and_recovers_when_it_catches_up(loop, tmp_path):
    async def main():
        async with world(tmp_path, max_stored_msgs_per_device=50) as w:
            bob = await w.connect("bob@acme")
            await bob.close()  # offline: everything for bob is stored
            alice = await w.connect("alice@home")
            results = []
            for i in range(60):
                try:
                    results.append(await alice.send("bob@acme", b"m%d" % i))
                except RecipientFull as exc:
                    assert exc.code == ErrorCode.RECIPIENT_FULL
                    results.append(None)
            assert results.count(None) == 10 and all(results[:50])
            # signals are never stored: never refused for this
            await alice.send("bob@acme", b"typing", ephemeral=True)
            # other recipients are unaffected
            carol = await w.connect("carol@home")
            await alice.send("carol@home", b"hi carol")
            assert (await recv_n(carol, 1))[0].body == b"hi carol"
            bob = await w.connect("bob@acme")
            got = await recv_n(bob, 50)
            assert [m.body for m in got] == [b"m%d" % i for i in range(50)]
            # bob's acks reach the relay (bounded: the test stops by itself)
            for _ in range(200):
                try:
                    await alice.send("bob@acme", b"again", id=b"a" * 16)
                    break
                except RecipientFull:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the cap never let the same id through")
            assert (await recv_n(bob, 1))[0].body == b"again"
    run(loop, main())


def test_caps_per_address_count_every_device_and_reload_from_the_store():
    caps = Caps((0, 0, 3, 0))
    caps.device(1, "bob@x")
    caps.device(2, "bob@x")
    caps.stored([("a@x", b"i" * 16, b"body", 0, [1, 2])])
    assert caps.full == set()
    caps.stored([("a@x", b"j" * 16, b"body", 0, [1])])
    assert caps.full == {"bob@x"}  # 3 stored deliveries for the address
    caps.acked(1, 2)
    assert caps.full == set()
    caps.load({1: (0, 0), 2: (5, 20)})
    assert caps.full == {"bob@x"}
    bytes_cap = Caps((0, 10, 0, 0))
    bytes_cap.device(1, "bob@x")
    bytes_cap.stored([("a@x", b"i" * 16, b"x" * 10, 0, [1])])
    assert bytes_cap.full == {"bob@x"}
    bytes_cap.stored([("a@x", b"i" * 16, b"x" * 10, 0, [1])], -1)  # refused by the store
    assert bytes_cap.full == set()


def test_caps_count_a_put_of_tails_as_its_items():
    # the gate hands the store DELIVER tails (put_tails): counted by the body
    # each tail holds, as the same message as an item
    items = [("a@x", bytes([i]) * 16, b"x" * size, 0, devs)
             for i, (size, devs) in enumerate([(0, [1]), (255, [1, 2]), (256, [2]),
                                               (70_000, [1]), (5, [3])])]
    tails: list = []
    for sender, cid, body, ts, devs in items:
        tails += (devs, wire.deliver_tail(msgpack.packb(sender), cid, body, wire.ts_packed(ts), 0))
    by_item, by_tail = Caps((0, 0, 0, 0)), Caps((0, 0, 0, 0))
    for caps in (by_item, by_tail):
        caps.enabled = True  # counting, no cap
        caps.device(1, "bob@x")
        caps.device(2, "bob@x")
    by_item.stored(items)
    by_tail.stored_tails(tails)
    assert by_tail._dev == by_item._dev == {1: [3, 70_255], 2: [2, 511], 3: [1, 5]}
    assert by_tail._addr == by_item._addr == {"bob@x": [5, 70_766]}
    by_tail.stored_tails(tails, -1)  # refused by the store
    assert by_tail._addr == {"bob@x": [0, 0]}


@pytest.mark.parametrize("loop", LOOPS[:1])
def test_a_revoked_device_is_purged_with_what_waits_for_it(loop, tmp_path):
    # issue 12: messages for revoked devices waited until their TTL and the
    # devices table kept every device forever
    import os

    from fastroute.errors import UnknownAddress
    from fastroute.identity import Registry
    from test_privacy import scan

    async def main():
        async with world(tmp_path, erase_s=1.0) as w:
            frank = await w.connect("frank@acme", "old-phone")
            await frank.close()
            alice = await w.connect("alice@home")
            bodies = [b"FOR-REVOKED-%02d" % i for i in range(10)]
            for b in bodies:
                await alice.send("frank@acme", b)
            store = w.relay.store
            dkey = store.register_device("frank@acme", "old-phone")
            assert await store.count_pending(dkey) == 10
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("frank@acme", "old-phone")
            for _ in range(100):
                if "frank@acme" not in w.relay.delivery.known:
                    break
                await asyncio.sleep(0.05)
            assert all(a != "frank@acme" for _, a, _ in store.known_devices())
            assert await store.count_pending(dkey) == 0
            # an address with no device left is forgotten
            with pytest.raises(UnknownAddress):
                await alice.send("frank@acme", b"anyone?")
            await store.flush()
            await asyncio.sleep(2.5)  # erase_s=1 below: the WAL is truncated by now
            needles = {f"b{i}": b for i, b in enumerate(bodies)}
            needles["address"] = b"frank@acme"
            hits = scan(w.data_dir, needles)
            # the revocation itself is kept in the registry (by design), nothing else
            assert set(hits) <= {"address"}, hits
            assert all(f.startswith("registry.db") for f in hits.get("address", [])), hits
    run(loop, main())


def test_a_refresh_from_the_store_never_undoes_an_ack_not_yet_on_disk(tmp_path):
    # CI found a caught-up recipient held at its cap: the periodic refresh
    # read the store's counts while the deletes of acks already applied in
    # memory were still queued, and put the acked messages back.  The refresh
    # now flushes first and drops a read that an ack crossed.
    async def main():
        async with world(tmp_path, max_stored_msgs_per_device=20) as w:
            bob = await w.connect("bob@acme")
            await bob.close()
            alice = await w.connect("alice@home")
            for i in range(20):
                await alice.send("bob@acme", b"m%d" % i)
            caps = w.relay.delivery.caps
            assert "bob@acme" in caps.full
            # a slow disk: the store's writer takes 0.3 s to apply deletes
            store = w.relay.store
            delete = store._delete

            def slow_delete(*args):
                time.sleep(0.3)
                return delete(*args)

            store._delete = slow_delete
            bob = await w.connect("bob@acme")
            await recv_n(bob, 20)
            for _ in range(200):  # bob's DACK applied in memory (bounded)
                if "bob@acme" not in caps.full:
                    break
                await asyncio.sleep(0.01)
            assert "bob@acme" not in caps.full
            for _ in range(20):  # every refresh now: none may undo the acks
                await w.relay.delivery.refresh_caps()
                assert "bob@acme" not in caps.full
            await alice.send("bob@acme", b"again")
            assert (await recv_n(bob, 1))[0].body == b"again"
    run("asyncio", main())
