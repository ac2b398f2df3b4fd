"""Privacy scan: delivered messages leave no trace in the data directory (issue 12).

Recognisable bodies and random ids are sent, delivered and acked through a
real relay on loopback (SQLite store in a temporary data directory) while
other traffic keeps the store busy; then every file under the data
directory is read and searched, while the relay still runs (after the
configured erase bound) and again after a clean stop.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from relayutil import LOOPS, World, nothing_arrives, recv_n, run, world

ERASE_S = 1.0


def scan(data_dir: str, needles: dict[str, bytes]) -> dict[str, list[str]]:
    """``{needle name: [files containing it]}`` over every file under ``data_dir``."""
    hits: dict[str, list[str]] = {}
    for root, _dirs, files in os.walk(data_dir):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as fh:
                    data = fh.read()
            except FileNotFoundError:  # a WAL removed meanwhile
                continue
            for key, needle in needles.items():
                if needle in data:
                    hits.setdefault(key, []).append(os.path.relpath(path, data_dir))
    return hits


async def _load(w, stop: asyncio.Event) -> int:
    """Sustained traffic (sent, delivered, acked) until ``stop``; messages sent."""
    carol = await w.connect("carol@home")
    dave = await w.connect("dave@acme")
    n = 0
    while not stop.is_set():
        await carol.send_many("dave@acme", [b"LOAD-%08d" % (n + i) for i in range(50)])
        await recv_n(dave, 50)
        n += 50
        await asyncio.sleep(0.01)
    return n


async def _round(w, alice, devices, needles: dict, tag: str) -> None:
    """Send recognisable messages to both devices of bob, deliver and ack them."""
    bodies = [b"PRIVACY-%s-BODY-%04d-" % (tag.encode(), i) + os.urandom(12).hex().encode()
              for i in range(100)]
    ids = [os.urandom(16) for _ in bodies]
    for i, (body, cid) in enumerate(zip(bodies, ids)):
        needles[f"{tag}-body{i}"] = body
        needles[f"{tag}-id{i}"] = cid
    await asyncio.gather(*[alice.send_nowait("bob@acme", b, id=c)
                           for b, c in zip(bodies, ids)])
    # big bodies too: they live in SQLite overflow pages
    big = [b"PRIVACY-%s-BIG-%d-" % (tag.encode(), i) + os.urandom(20_000) for i in range(3)]
    for i, b in enumerate(big):
        needles[f"{tag}-big{i}"] = b[-64:]
    await alice.send_many("bob@acme", big)
    for dev in devices:
        got = await recv_n(dev, len(bodies) + len(big))
        assert [m.body for m in got] == bodies + big
    store = w.relay.store
    for device in ("phone", "laptop"):  # acked by both devices: deleted
        key = store.register_device("bob@acme", device)
        for _ in range(100):  # the last DACKs reach the relay (bounded)
            await store.flush()
            if await store.count_pending(key) == 0:
                break
            await asyncio.sleep(0.05)
        assert await store.count_pending(key) == 0


@pytest.mark.parametrize("loop", LOOPS[:1])
def test_delivered_bodies_and_ids_leave_every_file_within_the_bound(loop, tmp_path):
    # the finding: after delivery and ack, store.db-wal held every
    # body and id until some later checkpoint
    needles: dict[str, bytes] = {}
    state: dict = {}

    async def main():
        async with world(tmp_path, erase_s=ERASE_S) as w:
            state["dir"] = w.data_dir
            alice = await w.connect("alice@home")
            devices = [await w.connect("bob@acme", "phone"),
                       await w.connect("bob@acme", "laptop")]  # two devices, one address
            # idle: no later traffic rewrites the WAL by chance
            await _round(w, alice, devices, needles, "idle")
            await asyncio.sleep(2 * ERASE_S + 0.5)  # the bound, from the last ack
            state["idle"] = scan(w.data_dir, needles)
            # under sustained load: checkpoints must still happen
            stop = asyncio.Event()
            load = asyncio.ensure_future(_load(w, stop))
            await asyncio.sleep(0.3)
            await _round(w, alice, devices, needles, "load")
            await asyncio.sleep(2 * ERASE_S + 0.5)
            state["load"] = scan(w.data_dir, needles)
            stop.set()
            assert await load > 0
            state["checkpoints"] = w.relay.store.stats().get("checkpoints", 0)
        state["stopped"] = scan(state["dir"], needles)

    run(loop, main())
    for phase in ("idle", "load", "stopped"):
        hits = state[phase]
        assert hits == {}, f"{phase}: {len(hits)} needles found, e.g. {sorted(hits.items())[:3]}"
    assert state["checkpoints"] >= 2


def test_erasure_does_not_depend_on_the_sqlite_builds_secure_delete_default(
        tmp_path, monkeypatch):
    # This machine's SQLite is built with SECURE_DELETE on; many are not.
    # Every connection the store opens starts with secure_delete OFF here,
    # as on such a build: deleted bodies must still not stay in freed pages.
    import sqlite3

    from fastroute import store as store_mod
    real_connect = sqlite3.connect

    def connect_default_off(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.execute("PRAGMA secure_delete = OFF")
        return conn
    monkeypatch.setattr(store_mod.sqlite3, "connect", connect_default_off)
    path = str(tmp_path / "store.db")
    needles: dict[str, bytes] = {}

    async def main():
        store = await store_mod.SqliteStore.open(path, erase_s=0.2)
        try:
            dev = store.register_device("bob@acme", "phone")
            items = []
            for i in range(200):
                body = b"FREED-PAGE-BODY-%04d-" % i + os.urandom(3000)
                cid = os.urandom(16)
                needles[f"body{i}"] = body[:40]
                needles[f"id{i}"] = cid
                items.append(("alice@home", cid, body, 1, [dev]))
            mids = await store.put_many(items)
            await store.flush()
            store.ack(dev, mids)
            await store.flush()
            await asyncio.sleep(0.6)
            return scan(str(tmp_path), needles)
        finally:
            await store.close()

    running = asyncio.run(main())
    stopped = scan(str(tmp_path), needles)
    assert running == {}, f"{len(running)} needles found while open"
    assert stopped == {}, f"{len(stopped)} needles found after close"


def test_operator_erasure_leaves_nothing_of_the_address(tmp_path, capsys):
    # `fastroute address erase`: its devices, messages to and from it, its
    # consent and its keys in the key directory go; the scan then finds
    # neither its address, nor its bodies, ids or keys, in any file; other
    # users' data stays.
    from fastroute import Relay, RelayConfig
    from fastroute.cli import main as cli

    needles: dict[str, bytes] = {"address": b"erin@home"}
    state: dict = {}

    async def main():
        async with world(tmp_path) as w:
            state["dir"] = w.data_dir
            erin = await w.connect("erin@home")
            bob = await w.connect("bob@acme")
            await erin.set_consent("acme")
            for i in range(20):  # waiting for erin, not delivered (erin does not take)
                cid = os.urandom(16)
                body = b"TO-ERIN-%02d-" % i + os.urandom(8).hex().encode()
                needles[f"to{i}"] = body
                needles[f"to-id{i}"] = cid
                await bob.send("erin@home", body, id=cid)
            await erin.close()
            laptop = await w.connect("bob@acme", "laptop")
            await laptop.close()  # bob has an offline device: erin's messages wait for it
            for i in range(20):
                cid = os.urandom(16)
                body = b"FROM-ERIN-%02d-" % i + os.urandom(8).hex().encode()
                needles[f"from{i}"] = body
                needles[f"from-id{i}"] = cid
            erin = await w.connect("erin@home", "tablet", features=("e2ee", "safety"))
            # her blocks (safety.db) go too
            needles["her block"] = b"blockedbyerin@acme"
            await erin.block("blockedbyerin@acme")
            # her keys in the key directory (keys.db) go with the rest
            ident, one_time = b"ERIN-IDENTITY-" + os.urandom(19), b"ERIN-PREKEY-" + os.urandom(21)
            needles["identity key"], needles["one-time prekey"] = ident, one_time
            await erin.publish_keys(registration_id=77, identity_key=ident,
                                    signed_prekey=(7, os.urandom(33), os.urandom(64)),
                                    last_resort_kem_prekey=(9, os.urandom(1569), os.urandom(64)),
                                    one_time_prekeys=[(1, one_time)], kem_prekeys=[])
            for i in range(20):
                await erin.send("bob@acme", needles[f"from{i}"], id=needles[f"from-id{i}"])
            await erin.close()
            carol = await w.connect("carol@home")
            await carol.send("bob@acme", b"KEEP-carol-to-bob")  # waits for bob's laptop
            state["keys"] = w.keys
            state["before"] = scan(w.data_dir, needles)
        # the relay is stopped: erase
        assert cli(["address", "erase", "erin@home", "--data-dir", state["dir"]]) == 0
        out = capsys.readouterr().out
        assert "devices: 2" in out and "consent_choices: 1" in out
        assert "messages_from_it: 20" in out
        assert "key_directory_devices: 1" in out and "one_time_prekeys: 1" in out
        assert "blocks: 1" in out
        state["after"] = scan(state["dir"], needles)
        # bob's laptop still gets what others sent it, none of erin's
        relay = Relay(RelayConfig(port=0, data_dir=state["dir"], require_consent=False))
        await relay.start()
        w2 = World(relay, state["dir"], state["keys"])
        try:
            laptop = await w2.connect("bob@acme", "laptop")
            assert [m.body for m in await recv_n(laptop, 1)] == [b"KEEP-carol-to-bob"]
            assert await nothing_arrives(laptop)
        finally:
            for c in w2.clients:
                await c.close()
            await relay.close()

    run("asyncio", main())
    assert state["before"], "the scan must see the data before the erasure"
    # the key directory held them (in its WAL or its main file)
    assert any(f.startswith("keys.db") for f in state["before"]["identity key"])
    assert any(f.startswith("safety.db") for f in state["before"]["her block"])
    assert state["after"] == {}, f"left after erasure: {sorted(state['after'].items())[:5]}"


def test_a_pack_acked_in_part_keeps_no_acked_body_past_the_bound(tmp_path):
    # One transaction's messages for one device share a row (a pack); acks
    # that reach part of it must still take those bodies and ids out of
    # every file within the bound, without a flush, while the rest stays.
    from fastroute.store import SqliteStore

    path = str(tmp_path / "store.db")
    acked: dict[str, bytes] = {}
    kept: dict[str, bytes] = {}

    async def main():
        store = await SqliteStore.open(path, erase_s=0.2)
        try:
            dev = store.register_device("bob@acme", "phone")
            items = []
            for i in range(100):
                body = b"PACKED-BODY-%04d-" % i + os.urandom(8).hex().encode()
                cid = os.urandom(16)
                (acked if i % 2 else kept).update({f"body{i}": body, f"id{i}": cid})
                items.append(("alice@home", cid, body, 1, [dev]))
            mids = await store.put_many(items)
            store.ack(dev, mids[1::2])
            await asyncio.sleep(1.0)  # rewrite, then the erasing checkpoint
            gone, there = scan(str(tmp_path), acked), scan(str(tmp_path), kept)
            rows = await store.load(dev, 0, 200)
            assert [r[3] for r in rows] == [kept[f"body{i}"] for i in range(0, 100, 2)]
            return gone, there
        finally:
            await store.close()

    gone, there = asyncio.run(main())
    assert gone == {}, f"{len(gone)} acked needles found, e.g. {sorted(gone)[:3]}"
    # the scan sees what is stored (a needle across an overflow page's
    # boundary is not contiguous in the file, hence not all of them)
    assert len(there) > len(kept) * 3 // 4
    assert scan(str(tmp_path), acked) == {}


def test_the_erase_bound_of_a_part_acked_pack_counts_from_the_ack(tmp_path):
    # A checkpoint that runs between a pack's partial ack and its rewrite
    # (due for an earlier delete) does not erase the rewrite's old pages;
    # the next one must still come erase_s after the ack, not after the
    # rewrite (which would add up to erase_s / 4 to the bound).
    import time

    from fastroute.store import SqliteStore

    path = str(tmp_path / "store.db")
    erase_s = 2.0  # the rewrite comes 0.5 s after the ack
    acked: dict[str, bytes] = {}

    async def main():
        store = await SqliteStore.open(path, erase_s=erase_s)
        try:
            a = store.register_device("bob@acme", "phone")
            b = store.register_device("carol@acme", "phone")
            store.ack(a, await store.put_many([("alice@home", os.urandom(16), b"first", 1, [a])]))
            await store.flush()
            start = time.monotonic()  # a checkpoint is due about erase_s from here
            items = []
            for i in range(20):
                body = b"PART-ACKED-%02d-" % i + os.urandom(8).hex().encode()
                if i % 2:
                    acked[f"body{i}"] = body
                items.append(("alice@home", os.urandom(16), body, 1, [b]))
            mids = await store.put_many(items)
            await asyncio.sleep(max(0.0, start + erase_s - 0.25 - time.monotonic()))
            t_ack = time.monotonic()
            store.ack(b, mids[1::2])
            for _ in range(200):
                if store.rewrites:
                    break
                await asyncio.sleep(0.01)
            assert store.rewrites == 1 and store.checkpoints >= 1
            due = store._erase_due
            assert due is None or due <= t_ack + erase_s + 0.25, due - t_ack
            await asyncio.sleep(max(0.0, t_ack + erase_s + 0.5 - time.monotonic()))
            return scan(str(tmp_path), acked)
        finally:
            await store.close()

    assert asyncio.run(main()) == {}


def test_operator_erasure_takes_an_address_out_of_shared_packs(tmp_path):
    # a pack holds one transaction's messages for one device, from several
    # senders: erasing a sender rewrites it with the others' messages only
    from fastroute.erase import erase_address
    from fastroute.store import SqliteStore

    data_dir = str(tmp_path)
    needles: dict[str, bytes] = {}

    async def main():
        async with await SqliteStore.open(os.path.join(data_dir, "store.db")) as store:
            dan = store.register_device("dan@home", "phone")
            items = []
            for i in range(10):
                sender = "erin@home" if i % 2 else "carol@home"
                body = b"%s-TO-DAN-%02d-" % (sender[:5].encode(), i) + os.urandom(6).hex().encode()
                if sender == "erin@home":
                    needles[f"body{i}"] = body
                items.append((sender, os.urandom(16), body, 1, [dan]))
            await store.put_many(items)
        out = erase_address(data_dir, "erin@home")
        assert out["messages_from_it"] == 5 and out["deliveries_to_it"] == 0
        async with await SqliteStore.open(os.path.join(data_dir, "store.db")) as store:
            rows = await store.load(store.register_device("dan@home", "phone"), 0, 100)
            assert [r[1] for r in rows] == ["carol@home"] * 5
        needles["address"] = b"erin@home"

    asyncio.run(main())
    assert scan(data_dir, needles) == {}
