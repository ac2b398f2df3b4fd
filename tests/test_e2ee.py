"""Feature "e2ee" end to end: negotiation, key directory, device lists, per-device send.

A real relay on loopback with real SQLite files and real clients; key
material here is random bytes of libsignal's sizes (the relay never looks
inside it), and tests/test_libsignal.py runs the real Signal Protocol over
the same ops.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import traceback

import msgpack
import pytest

from fastroute import wire
from fastroute.client import Client, DeviceMessage, Event, Message
from fastroute.errors import (
    BadKey,
    ConnectionClosed,
    ConsentRequired,
    DeviceMismatch,
    DuplicateId,
    ErrorCode,
    FastrouteError,
    KeyLimit,
    RateLimited,
    StoreFailed,
    UnknownAddress,
)
from fastroute.identity import ProviderKey, Registry, issue_credential
from fastroute.noise import KeyPair
from fastroute.config import Limits

from cliutil import serve_data_dir
from relayutil import LOOPS, nothing_arrives, run, world

EC, KEM = wire.PREKEY_EC, wire.PREKEY_KEM


def keyset(reg: int, n_ec: int = 5, n_kem: int = 5, first: int = 1):
    """Random key material of libsignal's sizes: identity 33, EC 33, Kyber1024 1569."""
    return dict(registration_id=reg, identity_key=os.urandom(33),
                signed_prekey=(7, os.urandom(33), os.urandom(64)),
                last_resort_kem_prekey=(99999, os.urandom(1569), os.urandom(64)),
                one_time_prekeys=[(i, os.urandom(33)) for i in range(first, first + n_ec)],
                kem_prekeys=[(i, os.urandom(1569), os.urandom(64))
                             for i in range(first, first + n_kem)])


async def e2ee(w, address: str, device: str, reg: int | None = None, **kw) -> Client:
    c = await w.connect(address, device, features=("e2ee",))
    if reg is not None:
        c.did = await c.publish_keys(**keyset(reg, **kw))
    return c


def request_future(c: Client, cid: bytes) -> asyncio.Future:
    """The future ``c`` resolves with the relay's REPLY to a raw request ``cid``."""
    fut = c._loop.create_future()
    c._requests[cid] = (fut, [])
    return fut


async def answer(fut: asyncio.Future, *fields: str) -> tuple:
    """``("ok", result)`` once ``fut`` (a raw request's) is done, or its refusal's
    ``(code, *fields)`` (attributes of the error, None when absent)."""
    try:
        return ("ok", await asyncio.wait_for(fut, 5))
    except FastrouteError as exc:
        return (int(exc.code), *(getattr(exc, f, None) for f in fields))


async def recv(c: Client, timeout: float = 5.0):
    return await asyncio.wait_for(c.recv(), timeout)


async def no_message(c: Client, wait: float = 0.3) -> bool:
    """True if nothing but events arrives within ``wait`` seconds."""
    try:
        await recv_msg(c, wait)
    except asyncio.TimeoutError:
        return True
    return False


async def alice_twice_and_bob(w) -> tuple[Client, Client, Client]:
    """alice@home's phone and laptop (device ids 1 and 2) and bob@acme's phone,
    keys published, alice's phone told that her laptop joined."""
    a1 = await e2ee(w, "alice@home", "phone", 11)
    a2 = await e2ee(w, "alice@home", "laptop", 12)
    b1 = await e2ee(w, "bob@acme", "phone", 21)
    await recv(a1)  # a2 joined
    return a1, a2, b1


async def refused_then_taken(a1: Client, a2: Client, b1: Client, cid: bytes,
                             restore) -> None:
    """b1's DSEND ``cid`` to alice's two devices, refused by the store: the
    sender hears STORE_FAILED and no copy arrives; after ``await restore()``
    the same id is taken anew (the refusal was not remembered) and both arrive."""
    both = [(1, 11, b"one"), (2, 12, b"two")]
    with pytest.raises(StoreFailed):
        await b1.send_to_devices("alice@home", both, id=cid)
    assert await nothing_arrives(a1) and await nothing_arrives(a2)
    await restore()
    assert await b1.send_to_devices("alice@home", both, id=cid) == cid
    assert [(await recv_msg(c)).body for c in (a1, a2)] == [b"one", b"two"]


async def recv_msg(c: Client, timeout: float = 5.0):
    """The next message, past the events (pool low, device joined/left)."""
    while True:
        m = await recv(c, timeout)
        if not isinstance(m, Event):
            return m


# -- negotiation -----------------------------------------------------------------------

def test_features_grant_the_known_subset_and_gate_the_ops(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a = await w.connect("alice@home", "phone", features=("groups-v9", "e2ee"))
            assert a.features == {"e2ee"}
            v1 = await recorder(w, "bob@home", "phone")
            assert v1.features == frozenset()
            # an e2ee op on a link that did not negotiate it: UNKNOWN_OP, as from a v1 relay
            v1._write([wire.devices_op(os.urandom(16), "alice@home")])
            await v1.ping()
            ops = [op for pt in v1.plaintexts for op in wire.decode_server_frame(pt)]
            assert [op[0] for op in ops] == [wire.Op.WELCOME, wire.Op.ERROR, wire.Op.PONG]
            assert ops[1][1] == ErrorCode.UNKNOWN_OP
            with pytest.raises(FastrouteError):
                await v1.devices("alice@home")  # the client knows it was not granted
            # negotiating later on the same link works too
            assert await v1.negotiate() == {"e2ee"}
            with pytest.raises(UnknownAddress):  # no device list: no such address
                await v1.devices("alice@home")
    run("asyncio", main())


def test_a_wiring_grants_only_the_features_whose_stage_it_has(tmp_path):
    # a LinkWiring built without a feature stage (an embedder's) does not grant
    # that feature, so its ops are refused as unknown, never dropped unanswered
    async def main():
        async with world(tmp_path) as w:
            every = ("e2ee", "groups", "group_lists", "safety")
            a = await w.connect("alice@home", "phone", features=every)
            assert a.features == set(every)
            wiring = next(iter(w.relay.links)).wiring
            assert wiring.features == frozenset(every)
            wiring.groups = wiring.safety = None
            try:
                assert wiring.features == {"e2ee"}
                v1 = await recorder(w, "carol@home", "phone", features=every)
                assert v1.features == {"e2ee"}
                v1._write([wire.group_op(wire.Op.GCREATE, os.urandom(16)),
                           wire.safety_op(wire.Op.BLOCK, os.urandom(16), "alice@home", True)])
                await v1.ping()
                ops = [op for pt in v1.plaintexts for op in wire.decode_server_frame(pt)]
                assert [op[0] for op in ops][-3:] == [wire.Op.ERROR, wire.Op.ERROR, wire.Op.PONG]
                assert [op[1] for op in ops[-3:-1]] == [ErrorCode.UNKNOWN_OP] * 2
                wiring.keys = None
                assert wiring.features == frozenset()
            finally:
                wiring.keys, wiring.groups, wiring.safety = (w.relay.keys, w.relay.groups,
                                                             w.relay.safety)
            with pytest.raises(UnknownAddress):  # e2ee still answered: no device list yet
                await a.devices("alice@home")
    run("asyncio", main())


# -- key directory ---------------------------------------------------------------------

def test_publish_list_and_fetch_serve_keys_byte_for_byte_and_consume_once(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a1 = await w.connect("alice@home", "phone", features=("e2ee",))
            ks = keyset(1234, n_ec=2, n_kem=1)
            assert await a1.publish_keys(**ks) == 1
            a2 = await e2ee(w, "alice@home", "laptop", 55)
            assert a2.did == 2
            bob = await e2ee(w, "bob@home", "phone", 77)
            assert await bob.devices("alice@home") == [(1, 1234), (2, 55)]
            assert await bob.devices("alice@home") == [(1, 1234), (2, 55)]  # consumed nothing
            got = []
            for _ in range(3):
                [b] = await bob.bundles("alice@home", [1])
                got.append(b)
            b = got[0]
            assert (b.device_id, b.registration_id, b.identity_key, b.signed_prekey) == (
                1, 1234, ks["identity_key"], ks["signed_prekey"])
            assert [g.one_time_prekey for g in got] == ks["one_time_prekeys"] + [None]
            assert [g.kem_prekey for g in got] == ks["kem_prekeys"] + [
                ks["last_resort_kem_prekey"]] * 2
            assert [g.kem_last_resort for g in got] == [False, True, True]
            both = await bob.bundles("alice@home")
            assert [x.device_id for x in both] == [1, 2]
            # renewing the credential (a new connection of the same name) keeps the slot
            await a1.close()
            a1b = await e2ee(w, "alice@home", "phone")
            assert await a1b.publish_keys(**keyset(1234)) == 1
    run("asyncio", main())


def test_uploads_and_answers_larger_than_a_frame(tmp_path):
    async def main():
        # 45 devices on one address: above the gate's default cap of 16 devices
        async with world(tmp_path, prekey_kem_cap=200,
                         limits=Limits(max_devices_per_address=64)) as w:
            a = await e2ee(w, "alice@home", "phone")
            ks = keyset(9, n_ec=100, n_kem=100)  # 100 Kyber keys: ~169 KB, several frames
            await a.publish_keys(**ks)
            # the bundles of 45 devices, each with a 1569-byte KEM key, need two REPLY parts
            devs = [await e2ee(w, "carol@home", f"d{i}", 100 + i, n_ec=1, n_kem=1)
                    for i in range(45)]
            bob = await e2ee(w, "bob@home", "phone", 5)
            bundles = await bob.bundles("carol@home")
            assert [b.device_id for b in bundles] == [d.did for d in devs] == list(range(1, 46))
            assert sum(len(b.kem_prekey[1]) for b in bundles) > wire.MAX_PLAINTEXT
            [mine] = await bob.bundles("alice@home")
            assert mine.kem_prekey == ks["kem_prekeys"][0]
    run("asyncio", main())


def test_bad_key_material_gets_typed_codes_and_stores_nothing(tmp_path):
    async def main():
        async with world(tmp_path, prekey_ec_cap=10, prekey_kem_cap=4) as w:
            a = await e2ee(w, "alice@home", "phone", 1, n_ec=3, n_kem=2)
            bob = await e2ee(w, "bob@home", "phone", 2, n_kem=2)

            async def raw(op_builder, *args):
                cid = os.urandom(16)
                return await a._request([op_builder(cid, *args)], cid)

            ks = keyset(1)
            with pytest.raises(BadKey):  # oversized identity key
                await raw(wire.keys_set_op, 1, os.urandom(65), ks["signed_prekey"],
                          ks["last_resort_kem_prekey"], True)
            with pytest.raises(BadKey):  # oversized KEM key
                await a.add_prekeys(KEM, [(50, os.urandom(2049), os.urandom(64))])
            with pytest.raises(BadKey):  # a KEM prekey without its signature
                await a.add_prekeys(KEM, [(50, os.urandom(1569))])
            with pytest.raises(KeyLimit):  # too many prekeys: 3 + 8 > 10
                await a.add_prekeys(EC, [(100 + i, os.urandom(33)) for i in range(8)])
            with pytest.raises(DuplicateId):  # duplicate ids in one upload
                await a.add_prekeys(EC, [(100, os.urandom(33)), (100, os.urandom(33))])
            with pytest.raises(DuplicateId):  # an id already in the pool
                await a.add_prekeys(EC, [(1, os.urandom(33))])
            # nothing of the refused uploads was stored: still the 3 + 2 first keys
            got = [await bob.bundles("alice@home") for _ in range(4)]
            assert [g[0].one_time_prekey[0] if g[0].one_time_prekey else None
                    for g in got] == [1, 2, 3, None]
            assert [g[0].kem_last_resort for g in got] == [False, False, True, True]
            # device lists that are empty, huge or repeated
            with pytest.raises(DuplicateId):
                await bob.bundles("alice@home", [1, 1])
            with pytest.raises(FastrouteError) as err:
                await bob._request([wire.bundles_op(b"x" * 16, "alice@home",
                                                    list(range(1, 129)))], b"x" * 16)
            assert err.value.code == ErrorCode.BAD_FIELD
            with pytest.raises(FastrouteError) as err:
                await bob.send_to_devices("alice@home", [])
            assert err.value.code == ErrorCode.BAD_FIELD
            with pytest.raises(DuplicateId):
                await bob.send_to_devices("alice@home", [(1, 1, b"x"), (1, 1, b"y")])
            assert await no_message(a)
            await a.ping()  # the link is still up
    run("asyncio", main())


def test_device_ids_stay_in_1_to_127_and_revocation_frees_them_for_new_reg_ids(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a1 = await e2ee(w, "alice@home", "phone", 10)
            a2 = await e2ee(w, "alice@home", "laptop", 20)
            bob = await e2ee(w, "bob@home", "phone", 30)
            ev = await recv(a1)  # the other device is told: one joined
            assert isinstance(ev, Event) and (ev.kind, ev.data) == (2, [a2.did, 20])
            await a2.close()  # offline: its copy waits in the store
            await bob.send_to_devices("alice@home", [(1, 10, b"x"), (2, 20, b"y")])
            laptop = w.relay.store.register_device("alice@home", "laptop")
            assert await w.relay.store.count_pending(laptop) == 1
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("alice@home", "laptop")
            assert (await recv_msg(a1)).body == b"x"
            ev = await recv(a1)  # and one left
            assert isinstance(ev, Event) and (ev.kind, ev.data) == (3, [a2.did])
            await w.relay.store.flush()
            assert [k for k, *_ in w.relay.store.known_devices()].count(laptop) == 0
            assert await w.relay.store.count_pending(laptop) == 0  # its undelivered copy went
            for _ in range(50):
                if await bob.devices("alice@home") == [(1, 10)]:
                    break
                await asyncio.sleep(0.05)
            assert await bob.devices("alice@home") == [(1, 10)]
            # id 2 was freed with registration id 20: a new device with reg 20 gets 3,
            # one with another reg id may take 2
            a3 = await e2ee(w, "alice@home", "tablet", 20)
            assert a3.did == 3
            a4 = await e2ee(w, "alice@home", "watch", 21)
            assert a4.did == 2
    run("asyncio", main())


# -- per-device send -----------------------------------------------------------------

# both stores: each keeps per-device copies its own way
STORES = ["sqlite", "memory"]


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("loop", LOOPS)
def test_per_device_send_reaches_each_device_once_with_the_sender_device(loop, tmp_path, kind):
    async def main():
        async with world(tmp_path, store=kind) as w:
            a1, a2, b1 = await alice_twice_and_bob(w)
            cid = await b1.send_to_devices("alice@home", [(1, 11, b"for a1"), (2, 12, b"a2")])
            m1, m2 = await recv_msg(a1), await recv_msg(a2)
            assert isinstance(m1, DeviceMessage) and isinstance(m2, DeviceMessage)
            assert (m1.sender, m1.device, m1.id, m1.body) == ("bob@acme", 1, cid, b"for a1")
            assert (m2.sender, m2.device, m2.id, m2.body) == ("bob@acme", 1, cid, b"a2")
            # each copy is deleted on its own device's ack (the clients ack on receipt)
            store = w.relay.store
            for name in ("phone", "laptop"):
                key = store.register_device("alice@home", name)
                for _ in range(100):
                    await store.flush()
                    if await store.count_pending(key) == 0:
                        break
                    await asyncio.sleep(0.02)
                assert await store.count_pending(key) == 0
            # own other devices in the same send
            cid = await a2.send_to_devices("bob@acme", [(1, 21, b"hi")], own=[(1, 11, b"sync")])
            assert (await recv_msg(b1)).body == b"hi"
            m = await recv_msg(a1)
            assert (m.sender, m.device, m.body) == ("alice@home", 2, b"sync")
            assert await nothing_arrives(a2)
            # a resend with the same id is answered again, never delivered twice
            await a2.send_to_devices("bob@acme", [(1, 21, b"hi")], own=[(1, 11, b"sync")],
                                     id=cid)
            assert await nothing_arrives(b1) and await nothing_arrives(a1)
            # copies larger than a frame in total
            bodies = [os.urandom(wire.MAX_BODY) for _ in range(2)]
            await b1.send_to_devices("alice@home", [(1, 11, bodies[0]), (2, 12, bodies[1])])
            assert (await recv_msg(a1)).body == bodies[0]
            assert (await recv_msg(a2)).body == bodies[1]
    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_per_device_sends_without_waiting_arrive_in_order(loop, tmp_path):
    # send_to_devices_nowait: no coroutine per message; each future is done
    # once its copies are stored, a refused one fails alone, and every copy
    # reaches its device in the order sent (the REPLYs come back on the
    # client's compiled path, the copies too)
    async def main():
        async with world(tmp_path) as w:
            a1, a2, b1 = await alice_twice_and_bob(w)
            sent = [b1.send_to_devices_nowait("alice@home",
                                              [(1, 11, b"a1-%d" % i), (2, 12, b"a2-%d" % i)])
                    for i in range(40)]
            bad_id, bad = b1.send_to_devices_nowait("alice@home", [(1, 11, b"x")])
            big = os.urandom(wire.MAX_BODY)
            big_id, big_fut = b1.send_to_devices_nowait("alice@home",
                                                        [(1, 11, big), (2, 12, big)])
            assert len({cid for cid, _ in sent} | {bad_id, big_id}) == 42
            assert await asyncio.gather(*(f for _, f in sent), big_fut) == [None] * 41
            with pytest.raises(DeviceMismatch) as err:
                await bad
            assert err.value.missing == [2]
            for c, name in ((a1, b"a1"), (a2, b"a2")):
                got = [await recv_msg(c) for _ in range(41)]
                assert [m.body for m in got[:40]] == [name + b"-%d" % i for i in range(40)]
                assert [m.id for m in got] == [cid for cid, _ in sent] + [big_id]
                assert all(type(m) is DeviceMessage and m.device == 1 for m in got)
                assert got[40].body == big
            assert await nothing_arrives(a1) and not b1._requests
    run(loop, main())


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("loop", LOOPS)
def test_per_device_sends_in_one_batch_get_an_outcome_each(loop, tmp_path, store):
    # send_to_devices_many: one future for the batch, resolved once every
    # message is answered, to an outcome per message in order: None (stored),
    # or the refusal that one got; the refused one is resent alone with its id
    async def main():
        async with world(tmp_path, store=store) as w:
            a1, a2, b1 = await alice_twice_and_bob(w)
            c1 = await e2ee(w, "carol@home", "phone", 31)
            both = [(1, 11, b"both"), (2, 12, b"both")]
            big = os.urandom(wire.MAX_BODY)  # two copies: more than a frame, split
            ids, fut = b1.send_to_devices_many([
                ("alice@home", both), ("carol@home", [(1, 31, b"c")]),
                ("alice@home", [(1, 11, b"stale")]),  # alice's laptop is missing
                ["alice@home", ((1, 11, big), (2, 12, big)), ()],
                ("nobody@home", [(1, 1, b"n")])])
            assert len(set(ids)) == 5 and all(len(i) == 16 for i in ids)
            got = await asyncio.wait_for(fut, 10)
            assert [type(x).__name__ for x in got] == [
                "NoneType", "NoneType", "DeviceMismatch", "NoneType", "UnknownAddress"]
            assert got[2].missing == [2] and not b1._requests
            await b1.send_to_devices("alice@home", both, id=ids[2])
            for c, want in ((a1, [b"both", big, b"both"]), (a2, [b"both", big, b"both"]),
                            (c1, [b"c"])):
                msgs = [await recv_msg(c) for _ in want]
                assert [m.body for m in msgs] == want
                assert [m.id for m in msgs] == ([ids[0], ids[3], ids[2]] if c is not c1
                                                else [ids[1]])
            assert await nothing_arrives(a1)
            assert await b1.send_to_devices_many([])[1] == []
    run(loop, main())


def test_a_store_refusing_a_batch_of_copies_stores_none_and_forgets_the_ids(tmp_path):
    # the memory store keeps copies as their routes (put_now, no future):
    # when it refuses a batch, every sender hears STORE_FAILED, no copy is
    # delivered, and the ids are not remembered (a resend is taken anew)
    async def main():
        async with world(tmp_path, store="memory") as w:
            a1, a2, b1 = await alice_twice_and_bob(w)
            keys = w.relay.keys
            real = keys._put_now
            assert real is not None  # the memory store's way, not items
            calls = []

            def refuse(routes, first):
                calls.append(len(routes) // 2)
                raise StoreFailed("injected")

            async def restore():
                assert calls == [2] and await w.relay.store.count_pending() == 0
                keys._put_now = real
            keys._put_now = refuse
            await refused_then_taken(a1, a2, b1, b"r" * 16, restore)
    run("asyncio", main())


def test_the_sqlite_store_is_handed_the_copies_and_a_refusal_forgets_the_ids(tmp_path):
    # the SQLite store takes a batch's copies as their DDELIVER tails
    # (put_copies), no item a copy; when it refuses the batch (its future
    # fails, or the call itself raises) every sender hears STORE_FAILED, no
    # copy is delivered, and the ids are not remembered
    async def main():
        async with world(tmp_path, store="sqlite") as w:
            a1, a2, b1 = await alice_twice_and_bob(w)
            keys = w.relay.keys
            real = keys._put_copies
            assert real is not None and keys._put_now is None
            handed = []

            def spy(items, validate=True):
                handed.append(list(items))
                return real(items, validate=validate)

            def refuse_later(items, validate=True):
                fut = asyncio.get_running_loop().create_future()
                fut.set_exception(StoreFailed("injected"))
                return fut

            def refuse_now(items, validate=True):
                raise StoreFailed("injected")

            both = [(1, 11, b"one"), (2, 12, b"two")]
            keys._put_copies = spy
            first = await b1.send_to_devices("alice@home", both)
            got = [await recv_msg(c) for c in (a1, a2)]
            assert [(m.id, m.body, m.sender, m.device) for m in got] == [
                (first, b"one", "bob@acme", 1), (first, b"two", "bob@acme", 1)]
            (flat,) = handed
            assert len(flat) == 4 and all(type(k) is tuple for k in flat[0::2])
            assert [wire.copy_tail_fields(t)[:3] for t in flat[1::2]] == [
                ("bob@acme/1", first, b"one"), ("bob@acme/1", first, b"two")]

            async def restore():
                keys._put_copies = spy

            for refuse, cid in ((refuse_later, b"r" * 16), (refuse_now, b"q" * 16)):
                keys._put_copies = refuse
                await refused_then_taken(a1, a2, b1, cid, restore)
            assert len(handed) == 3
    run("asyncio", main())


def test_a_store_that_refuses_a_batch_of_items_at_once_answers_every_sender(tmp_path):
    # a store given the copies as put_many items (one without put_copies, or
    # with caps on) that raises instead of returning a future (closed, say):
    # the senders hear its code, nothing is delivered, the ids are not kept
    async def main():
        async with world(tmp_path, store="sqlite") as w:
            a1, a2, b1 = await alice_twice_and_bob(w)
            keys, store = w.relay.keys, w.relay.store
            keys._put_copies = keys._batch.persist_meta = None  # the items' path
            real = store.put_many
            seen = []

            def refuse(items, validate=True):
                seen.append(len(items))
                raise StoreFailed("injected")
            async def restore():
                assert seen == [2]
                store.put_many = real
            store.put_many = refuse
            await refused_then_taken(a1, a2, b1, b"i" * 16, restore)
    run("asyncio", main())


def test_a_bad_message_in_a_batch_sends_none_of_it(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a1, a2, b1 = await alice_twice_and_bob(w)
            out = len(b1._out)
            with pytest.raises(IndexError):  # an entry without its ciphertext
                b1.send_to_devices_many([("alice@home", [(1, 11, b"ok"), (2, 12, b"ok")]),
                                         ("alice@home", [(1, 11)])])
            assert not b1._requests and len(b1._out) == out
            assert await nothing_arrives(a1)
    run("uvloop", main())


def test_a_batch_outstanding_when_the_link_drops_answers_connection_closed(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a1, a2, b1 = await alice_twice_and_bob(w)
            b1.reconnect = False
            ids, fut = b1.send_to_devices_many([("alice@home", [(1, 11, b"x"), (2, 12, b"x")])
                                                for _ in range(3)])
            b1._proto.transport.abort()  # before the frame is even written
            got = await asyncio.wait_for(fut, 5)
            assert [type(x) for x in got] == [ConnectionClosed] * 3 and not b1._requests
    run("uvloop", main())


def test_dsend_op_packs_entries_of_any_shape_alike():
    cid = bytes(range(16))
    want = msgpack.packb((1004, cid, "alice@home", True, [[1, 11, b"x"], [2, 12, b"y"]],
                          [[3, 13, b"z"]]), use_bin_type=True)
    entry = collections.namedtuple("entry", "device reg body")
    shapes = [([(1, 11, b"x"), (2, 12, b"y")], [(3, 13, b"z")]),
              ([[1, 11, b"x"], [2, 12, b"y"]], ([3, 13, b"z"],)),
              (iter([(1, 11, b"x"), iter((2, 12, b"y"))]), [entry(3, 13, b"z")])]
    for entries, own in shapes:
        assert wire.dsend_op(cid, "alice@home", 1, entries, own) == want


@pytest.mark.parametrize("heavy", [False, True])
def test_send_to_devices_nowait_packs_entries_of_any_shape_alike(heavy):
    # tuples, lists, named tuples and one-shot iterators, in lists, tuples or
    # generators: the same ops, whether they fit one op or are split
    # (nothing is sent: the request is captured before it would be written)
    cid = bytes(range(16))
    body = bytes(wire.MAX_PLAINTEXT // 3 if heavy else 40)
    rows = [(1, 11, body), (2, 12, body)]
    mine = [(3, 13, body)]
    entry = collections.namedtuple("entry", "device reg body")
    shapes = [(rows, mine), ([list(e) for e in rows], tuple(list(e) for e in mine)),
              ([entry(*e) for e in rows], [iter(e) for e in mine]),
              ((e for e in rows), iter([entry(*e) for e in mine]))]

    async def sent_ops(entries, own) -> list:
        c = Client("h", 1, credential=b"", static=None)
        c.features = frozenset({"e2ee"})
        sent: list = []
        c._request = lambda ops, rid: sent.append((rid, ops))  # type: ignore[method-assign]
        c.send_to_devices_nowait("alice@home", entries, own, id=cid)
        return sent

    got = [asyncio.run(sent_ops(entries, own)) for entries, own in shapes]
    assert all(g == got[0] for g in got)
    [(rid, ops)] = got[0]
    assert rid == cid and len(ops) == (2 if heavy else 1)
    parts = [msgpack.unpackb(op) for op in ops]
    assert [p[3] for p in parts] == [True, False][-len(ops):]
    assert [e for p in parts for e in p[4]] == [list(e) for e in rows]
    assert [e for p in parts for e in p[5]] == [list(e) for e in mine]


@pytest.mark.parametrize("loop", LOOPS)
def test_mismatches_missing_extra_stale_then_refresh_and_resend_once(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a1 = await e2ee(w, "alice@home", "phone", 11)
            b1 = await e2ee(w, "bob@home", "phone", 21)
            sessions = {d: r for d, r in await b1.devices("alice@home")}
            assert sessions == {1: 11}
            # a device is added: missing
            a2 = await e2ee(w, "alice@home", "laptop", 12)
            assert isinstance(await recv(a1), Event)
            cid = os.urandom(16)
            with pytest.raises(DeviceMismatch) as err:
                await b1.send_to_devices("alice@home", [(1, 11, b"m1")], id=cid)
            assert (err.value.missing, err.value.extra, err.value.stale) == ([2], [], [])
            assert await nothing_arrives(a1, 0.1)  # nothing stored on refusal
            [b] = await b1.refresh("alice@home", err.value)  # fetches only what it lacks
            assert b.device_id == 2
            sessions[b.device_id] = b.registration_id
            await b1.send_to_devices("alice@home", [(d, r, b"m1") for d, r in
                                                    sessions.items()], id=cid)
            assert (await recv_msg(a1)).body == (await recv_msg(a2)).body == b"m1"
            # a device re-created with a new registration id: stale
            await a2.publish_keys(**keyset(13))
            assert (await recv(a1)).kind == 2
            cid = os.urandom(16)
            with pytest.raises(DeviceMismatch) as err:
                await b1.send_to_devices("alice@home", [(d, r, b"m2") for d, r in
                                                        sessions.items()], id=cid)
            assert (err.value.missing, err.value.extra, err.value.stale) == ([], [], [2])
            [b] = await b1.refresh("alice@home", err.value)
            assert (b.device_id, b.registration_id) == (2, 13)
            sessions[2] = 13
            # a device revoked: extra
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("alice@home", "laptop")
            assert (await recv(a1)).kind == 3
            with pytest.raises(DeviceMismatch) as err:
                await b1.send_to_devices("alice@home", [(d, r, b"m2") for d, r in
                                                        sessions.items()], id=cid)
            assert (err.value.missing, err.value.extra, err.value.stale) == ([], [2], [])
            del sessions[2]
            await b1.send_to_devices("alice@home", [(d, r, b"m2") for d, r in
                                                    sessions.items()], id=cid)
            assert (await recv_msg(a1)).body == b"m2"
            assert await nothing_arrives(a1)
            # the sender's own devices are checked too
            b2 = await e2ee(w, "bob@home", "laptop", 22)
            with pytest.raises(DeviceMismatch) as err:
                await b1.send_to_devices("alice@home", [(1, 11, b"x")], own=[(3, 5, b"y")])
            assert (err.value.own_missing, err.value.own_extra) == ([2], [3])
            assert await nothing_arrives(b2, 0.1)
    run(loop, main())


@pytest.mark.parametrize("store", STORES)
def test_offline_devices_get_their_copies_in_order_and_v1_links_never_do(tmp_path, store):
    async def main():
        async with world(tmp_path, mailbox_capacity=4, store=store) as w:
            a1 = await e2ee(w, "alice@home", "phone", 11)
            b1 = await e2ee(w, "bob@home", "phone", 21)
            await a1.close()
            sent = []
            for i in range(12):  # more than the mailbox: the store feeds the rest
                sent.append(await b1.send_to_devices("alice@home", [(1, 11, b"%d" % i)]))
                await b1.send("alice@home", b"v1-%d" % i)
            # the same device back without negotiating: v1 messages only, the
            # copies wait in the store
            loads = collections.Counter()
            real_load = w.relay.store.load

            def counted(*args):
                loads["n"] += 1
                return real_load(*args)
            w.relay.store.load = counted
            v1 = await w.connect("alice@home", "phone")
            got = [await recv_msg(v1) for _ in range(12)]
            assert [m.body for m in got] == [b"v1-%d" % i for i in range(12)]
            assert all(type(m) is Message for m in got)
            assert await nothing_arrives(v1)
            # the sync passed the copies over once, not in a loop that loads
            # them again and again (a busy loop; with the memory store, whose
            # loads never wait, one that froze the relay)
            assert loads["n"] <= 30, loads
            await v1.close()
            back = await e2ee(w, "alice@home", "phone")
            got = [await recv_msg(back) for _ in range(12)]
            assert [m.id for m in got] == sent
            assert [m.body for m in got] == [b"%d" % i for i in range(12)]
            assert await nothing_arrives(back)
    run("asyncio", main())


class Recorder(Client):
    """A client that keeps every frame plaintext the relay sent it (v1 unless
    connected with ``features``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.plaintexts = []

    def _on_frame(self, msg):
        rx = self._rx
        n = rx.n
        self.plaintexts.append(rx.decrypt(msg))
        rx.n = n
        super()._on_frame(msg)


async def recorder(w, address, device, **kw) -> Recorder:
    kp, cred = w.credential(address, device)
    c = await Recorder.connect("127.0.0.1", w.port, credential=cred, static=kp,
                               server_key=w.relay.server_key.public, **kw)
    w.clients.append(c)
    return c


def test_a_v1_device_sees_v1_bytes_beside_e2ee_devices_of_its_address(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            old = await recorder(w, "alice@home", "old")
            a1 = await e2ee(w, "alice@home", "phone", 11)
            b1 = await e2ee(w, "bob@home", "phone", 21)
            assert await b1.devices("alice@home") == [(1, 11)]  # the v1 device is not listed
            await b1.send_to_devices("alice@home", [(1, 11, b"copy")])
            await b1.bundles("alice@home")
            with pytest.raises(DeviceMismatch):  # the v1 device cannot be addressed
                await b1.send_to_devices("alice@home", [(1, 11, b"x"), (2, 1, b"y")])
            ids = [await b1.send("alice@home", b"v1-%d" % i) for i in range(3)]
            assert [(await recv_msg(a1)).body for _ in range(4)] == [b"copy", b"v1-0", b"v1-1",
                                                                 b"v1-2"]
            got = [await recv_msg(old) for _ in range(3)]
            assert [m.id for m in got] == ids
            assert await nothing_arrives(old)
            # byte for byte what a v1 relay sends: WELCOME, then DELIVERs packed as v1
            ops = [op for pt in old.plaintexts for op in msgpack.unpackb(pt)]
            assert [op[0] for op in ops] == [16, 18, 18, 18]
            seen = b"".join(old.plaintexts[1:])
            for m in got:
                packed = (b"\x97\x12\xce" + m.seq.to_bytes(4, "big") + wire.py_deliver_tail(
                    msgpack.packb("bob@home"), m.id, m.body, wire.ts_packed(m.ts_ms), 0))
                assert packed in seen
    run("asyncio", main())


# -- gating ------------------------------------------------------------------------

def test_no_enumeration_without_consent_and_per_requester_fetch_limits(tmp_path):
    async def main():
        async with world(tmp_path, require_consent=True, prekey_fetch_burst=3.0,
                         prekey_fetches_per_s=0.001) as w:
            alice = await e2ee(w, "alice@home", "phone", 11)
            mallory = await recorder(w, "mallory@acme", "phone", features=("e2ee",))
            await mallory.publish_keys(**keyset(66))
            cid = b"\x01" * 16
            answers = {}
            for target in ("alice@home", "nobody@home"):
                frames = []
                for op in (wire.devices_op(cid, target), wire.bundles_op(cid, target, []),
                           wire.dsend_op(cid, target, False, [(1, 11, b"x")], [])):
                    with pytest.raises(UnknownAddress):
                        await mallory._request([op], cid)
                    frames.append(mallory.plaintexts[-1])
                answers[target] = frames
            assert answers["alice@home"] == answers["nobody@home"]
            assert answers["alice@home"][0] == b"\x91" + wire.reply_op(
                cid, ErrorCode.UNKNOWN_RECIPIENT)
            # after alice opts in, the same requests see her
            await alice.set_consent("acme")
            assert await mallory.devices("alice@home") == [(1, 11)]
            for _ in range(3):
                await mallory.bundles("alice@home")
            with pytest.raises(RateLimited):  # past its limit: nothing more is consumed
                await mallory.bundles("alice@home")
            # v1 SEND: an unknown address and one that has not opted in get the
            # same answer too (PROTOCOL.md, SEND, "No enumeration"): 402
            with pytest.raises(ConsentRequired):
                await mallory.send("nobody@home", b"x")
            await e2ee(w, "bob@home", "phone", 3)
            with pytest.raises(ConsentRequired):
                await mallory.send("bob@home", b"x")
    run("asyncio", main())


# -- one-time prekeys under load and across a crash ------------------------------------

def test_1000_concurrent_fetches_against_pools_of_100(tmp_path):
    async def main():
        async with world(tmp_path, prekey_fetch_burst=10000.0) as w:
            ks = keyset(5, n_ec=100, n_kem=100)
            a = await e2ee(w, "alice@home", "phone")
            await a.publish_keys(**ks)
            fetchers = [await e2ee(w, f"f{i}@home", "phone") for i in range(10)]
            results = await asyncio.gather(*(
                fetchers[i % 10].bundles("alice@home") for i in range(1000)))
            bundles = [b for [b] in results]
            ec = [b.one_time_prekey for b in bundles if b.one_time_prekey is not None]
            kem = [b.kem_prekey for b in bundles if not b.kem_last_resort]
            assert sorted(ec) == sorted(ks["one_time_prekeys"])  # 100 distinct, each once
            assert sorted(kem) == sorted(ks["kem_prekeys"])
            rest = [b for b in bundles if b.one_time_prekey is None]
            assert len(rest) == 900
            assert all(b.kem_last_resort and b.kem_prekey == ks["last_resort_kem_prekey"]
                       for b in rest)
            ev = await recv(a)  # the owner was told once that its pools ran low
            assert isinstance(ev, Event) and ev.kind == 1
    run("asyncio", main())


def test_no_one_time_prekey_is_handed_out_twice_across_sigkill(tmp_path):
    data = tmp_path / "relay"
    data.mkdir()
    pkey = ProviderKey.generate()
    with Registry(str(data / "registry.db")) as reg:
        reg.add_provider("home", pkey.public_key)
    ks = keyset(5, n_ec=30, n_kem=30)

    async def connect(port, address, device):
        kp = KeyPair.generate()
        cred = issue_credential(pkey, "home", address, device, kp.public)
        return await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                    features=("e2ee",), keepalive=None)

    async def first(port):
        a = await connect(port, "alice@home", "phone")
        await a.publish_keys(**ks)
        b = await connect(port, "bob@home", "phone")
        # answered means committed: the relay dies right after these
        got = [await b.bundles("alice@home") for _ in range(10)]
        return [g[0] for g in got]

    async def second(port):
        b = await connect(port, "bob@home", "phone")
        got = await asyncio.gather(*(b.bundles("alice@home") for _ in range(25)))
        await b.close()
        return [g[0] for g in got]

    proc, port = serve_data_dir(data)
    try:
        before = asyncio.run(first(port))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc, port = serve_data_dir(data)
    try:
        after = asyncio.run(second(port))
    finally:
        proc.terminate()
        proc.wait(20)
    handed = [b.one_time_prekey for b in before + after if b.one_time_prekey]
    kems = [b.kem_prekey for b in before + after if not b.kem_last_resort]
    assert len(handed) == len(set(handed)) == 30 and len(kems) == len(set(kems)) == 30
    assert sorted(handed) == sorted(ks["one_time_prekeys"])
    assert [b.one_time_prekey for b in before] == ks["one_time_prekeys"][:10]


def test_a_device_silent_past_the_retention_period_leaves_the_list(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a1 = await e2ee(w, "alice@home", "phone", 10)
            a2 = await e2ee(w, "alice@home", "laptop", 20)
            bob = await e2ee(w, "bob@home", "phone", 30)
            assert (await recv(a1)).kind == 2
            keys = w.relay.keys
            await a2.close()
            await asyncio.sleep(0.05)
            cutoff = keys.dir.slot("alice@home", "laptop").seen + 1
            assert keys.dir.slot("alice@home", "phone").seen < cutoff
            keys.prune(lambda a, d: False, cutoff)  # a1 is online, a2 silent since cutoff
            ev = await recv(a1)
            assert (ev.kind, ev.data) == (3, [a2.did])
            assert await bob.devices("alice@home") == [(1, 10)]
            # the slot is gone on disk too: a restarted relay would not list it
            rows = keys.dir._conn.execute("SELECT name FROM slots WHERE address = ?",
                                          ("alice@home",)).fetchall()
            assert rows == [("phone",)]
    run("asyncio", main())


def test_feature_ops_with_bad_fields_follow_the_negotiation_rule(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            v1 = await recorder(w, "bob@home", "phone")
            e = await recorder(w, "carol@home", "phone", features=("e2ee",))
            bad = msgpack.packb([1003, b"r" * 16, "alice@home", [0]])  # device id 0
            for c in (v1, e):
                c._write([bad, msgpack.packb([10, b"f" * 16, ["e2ee", 7]])])
                await c.ping()
            ops = [op for pt in v1.plaintexts[1:] for op in wire.decode_server_frame(pt)]
            # v1 link: the feature op is unknown whatever its fields, the bad FEATURES an ERROR
            assert [(op[0], op[1]) for op in ops[:2]] == [
                (wire.Op.ERROR, ErrorCode.UNKNOWN_OP), (wire.Op.ERROR, ErrorCode.BAD_FIELD)]
            ops = [op for pt in e.plaintexts[1:] for op in wire.decode_server_frame(pt)]
            ops = [op for op in ops if op[0] != wire.Op.FEATURES_OK]
            assert ops[0][:3] == (wire.Op.REPLY, b"r" * 16, ErrorCode.BAD_FIELD)
            assert (ops[1][0], ops[1][1]) == (wire.Op.ERROR, ErrorCode.BAD_FIELD)
    run("asyncio", main())


def test_multi_part_dsend_limits_and_parts_for_another_recipient(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a1 = await e2ee(w, "alice@home", "phone", 11)
            bob = await e2ee(w, "bob@home", "phone", 21)
            cid = os.urandom(16)
            # a part for one recipient, the rest for another: refused, nothing stored
            with pytest.raises(FastrouteError) as err:
                await bob._request([wire.dsend_op(cid, "alice@home", True, [(1, 11, b"a")], []),
                                    wire.dsend_op(cid, "carol@home", False, [], [])], cid)
            assert err.value.code == ErrorCode.BAD_FIELD
            # more entries over the parts than a device list can hold
            cid = os.urandom(16)
            parts = [wire.dsend_op(cid, "alice@home", True,
                                   [(d, 11, b"x") for d in range(1, 101)], [])
                     for _ in range(2)]
            with pytest.raises(FastrouteError) as err:
                await bob._request(parts, cid)
            assert err.value.code == ErrorCode.BAD_FIELD
            # at most 4 unfinished multi-part sends per link
            for _ in range(4):
                bob._write([wire.dsend_op(os.urandom(16), "alice@home", True, [], [])])
            cid = os.urandom(16)
            with pytest.raises(RateLimited):
                await bob._request([wire.dsend_op(cid, "alice@home", True, [], [])], cid)
            assert await no_message(a1)
            # a sender without keys cannot send per device
            nokeys = await e2ee(w, "dave@home", "phone")
            with pytest.raises(FastrouteError) as err:
                await nokeys.send_to_devices("alice@home", [(1, 11, b"x")])
            assert err.value.code == ErrorCode.NO_KEYS
    run("asyncio", main())


def test_a_relay_without_negotiation_leaves_the_client_on_v1(tmp_path, monkeypatch):
    async def main():
        async with world(tmp_path) as w:
            # what a v1 relay does with FEATURES: an opcode it does not know
            monkeypatch.delitem(wire._CLIENT_CHECKS, int(wire.Op.FEATURES))
            c = await w.connect("alice@home", "phone", features=("e2ee",))
            assert c.features == frozenset()
            with pytest.raises(FastrouteError):
                await c.devices("bob@home")
            bob = await w.connect("bob@home", "phone")
            await c.send("bob@home", b"v1 still works")
            assert (await recv_msg(bob)).body == b"v1 still works"
    run("asyncio", main())


def test_pool_low_is_told_once_until_a_top_up_and_replace_false_keeps_the_pools(tmp_path):
    async def main():
        async with world(tmp_path, prekey_low_water=3) as w:
            a = await e2ee(w, "alice@home", "phone", 1, n_ec=4, n_kem=10)
            bob = await e2ee(w, "bob@home", "phone", 2)
            for _ in range(4):  # EC pool 4 -> 0: below 3 after the second fetch
                await bob.bundles("alice@home")
            ev = await recv(a)
            assert (ev.kind, ev.data) == (1, [EC, 2])
            assert await nothing_arrives(a)  # once, not at every fetch below the mark
            assert await a.add_prekeys(EC, [(50, os.urandom(33))]) == 1
            # a new signed prekey without clearing: the pools stay
            ks = keyset(1)
            await a.publish_keys(ks["registration_id"], ks["identity_key"], ks["signed_prekey"],
                                 ks["last_resort_kem_prekey"], replace=False)
            [b] = await bob.bundles("alice@home")
            assert b.one_time_prekey[0] == 50 and b.signed_prekey == ks["signed_prekey"]
            ev = await recv(a)  # told again after the top-up: 1 left, then 0
            assert (ev.kind, ev.data) == (1, [EC, 0])
    run("asyncio", main())


@pytest.mark.parametrize("loop", LOOPS)
def test_a_frame_of_dsends_is_answered_as_one_dsend_at_a_time(loop, tmp_path):
    # the link hands a frame's single-op DSENDs to the keys stage together
    # (Keys.dsend_many: its per-link work, budgets and reachability once per
    # frame); the same frame handed over one DSEND at a time must get the
    # same answers and deliver the same copies, budgets included
    from fastroute.relay.keys import Keys

    lim = Limits(msgs_per_s=0.001, msgs_burst=7.0)

    async def scenario(path, one_at_a_time: bool):
        async with world(path, limits=lim) as w:
            keys = w.relay.keys
            if one_at_a_time:
                keys.dsend_many = lambda link, ops: [Keys.dsend_many(keys, link, [op])
                                                     for op in ops]
            a1 = await e2ee(w, "alice@home", "phone", 11)
            a2 = await e2ee(w, "alice@home", "laptop", 12)
            await recv(a1)  # a2 joined
            b1 = await e2ee(w, "bob@home", "phone", 21)
            b2 = await e2ee(w, "bob@home", "laptop", 22)
            await recv(b1)  # b2 joined
            ids = [bytes([i]) * 16 for i in range(1, 11)]
            both = [(1, 11, b"m1"), (2, 12, b"m2")]
            ops = [
                wire.dsend_op(ids[0], "alice@home", False, both, []),          # ok, 2 copies
                wire.dsend_op(ids[1], "nobody@home", False, both, []),         # unknown
                wire.dsend_op(ids[2], "alice@home", False, both[:1], []),      # missing 2
                wire.dsend_op(ids[3], "alice@home", False,
                              [(1, 11, b"x"), (2, 99, b"y")], []),              # stale 2
                wire.dsend_op(ids[4], "alice@home", False,
                              [(1, 11, b"x"), (1, 11, b"y")], []),              # duplicate
                wire.dsend_op(ids[0], "alice@home", False, both, []),          # resend
                wire.dsend_op(ids[5], "alice@home", False,
                              [(1, 11, b"s1"), (2, 12, b"s2")], [(2, 22, b"own")]),  # ok, 3
                wire.dsend_op(ids[6], "alice@home", False, [], []),            # no entries
                wire.dsend_op(ids[7], "alice@home", False,
                              [(1, 11, b"t1"), (2, 12, b"t2")], []),            # ok, 2: 7 used
                wire.dsend_op(ids[8], "alice@home", False,
                              [(1, 11, b"u1"), (2, 12, b"u2")], []),            # over budget
            ]
            futs = {cid: request_future(b1, cid) for cid in ids[:9]}
            replies: list[bytes] = []

            class Counted:
                # the REPLYs on the wire, whichever path the client takes them by
                def __init__(self, rx):
                    self.rx = rx

                def decrypt(self, msg):
                    plaintext = self.rx.decrypt(msg)
                    replies.extend(op[1] for op in wire.decode_server_frame_precise(plaintext)
                                   if type(op) is tuple and op[0] == wire.Op.REPLY)
                    return plaintext

            b1._rx = Counted(b1._rx)
            b1._write(ops)
            answers = [await answer(futs[cid], "missing", "extra", "stale") for cid in ids[:9]]
            got = {}
            for name, c, n in (("a1", a1, 3), ("a2", a2, 3), ("b2", b2, 1)):
                got[name] = sorted([(m.id, m.device, m.body) for m in
                                    [await recv_msg(c) for _ in range(n)]])
                assert await nothing_arrives(c, 0.2)
            # every op answered once: the resend too (it waited for the batch)
            assert sorted(replies) == sorted(ids[:9] + ids[:1])
            return answers, got

    batched = run(loop, scenario(tmp_path / "batched", False))
    spec = run(loop, scenario(tmp_path / "spec", True))
    assert batched == spec
    # a compiled run that took nothing would change nothing either: every op
    # is then answered by the precise path, which the specification judges
    import fastroute.relay.keys as keys_mod

    saved = keys_mod.dsend_run
    keys_mod.dsend_run = lambda ops, i, *rest: i
    try:
        assert run(loop, scenario(tmp_path / "declined", False)) == batched
    finally:
        keys_mod.dsend_run = saved
    answers, got = batched
    codes = [a[0] for a in answers]
    assert codes == ["ok", int(ErrorCode.UNKNOWN_RECIPIENT), int(ErrorCode.DEVICE_MISMATCH),
                     int(ErrorCode.DEVICE_MISMATCH), int(ErrorCode.DUPLICATE_ID), "ok",
                     int(ErrorCode.BAD_FIELD), "ok", int(ErrorCode.RATE_LIMITED)]
    assert answers[2][1:] == ([2], [], []) and answers[3][1:] == ([], [], [2])
    assert [body for _, _, body in got["a1"]] == [b"m1", b"s1", b"t1"]
    assert got["b2"] == [(bytes([6]) * 16, 1, b"own")]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_run_of_dsends_is_dispatched_as_one_op_at_a_time(loop, tmp_path):
    # the link queues a frame's leading run of DSENDs for the keys stage at
    # once (wire.leading_dsends); with that run cut to nothing the loop takes
    # them one by one: same answers, same op budget, same counts
    from fastroute import wire as wire_mod

    async def scenario(path, bulk: bool):
        saved = wire_mod.leading_dsends
        if not bulk:
            wire_mod.leading_dsends = lambda ops: 0
        try:
            async with world(path) as w:
                a1 = await e2ee(w, "alice@home", "phone", 11)
                b1 = await e2ee(w, "bob@home", "phone", 21)
                link = next(ln for ln in w.relay.links if ln.address == "bob@home")
                for bucket in link.budgets.ops:
                    bucket.rate, bucket.tokens = 1e-6, 4.0  # 4 ops left
                ids = [bytes([i]) * 16 for i in range(1, 6)]
                futs = {cid: request_future(b1, cid) for cid in ids}
                ops = [wire.dsend_op(cid, "alice@home", False, [(1, 11, cid[:4])], [])
                       for cid in ids]
                counts0 = dict(w.relay.op_counts)
                b1._write(ops[:3] + [wire.ping_op(7)] + ops[3:])
                answers = [await answer(futs[cid]) for cid in ids]
                got = [(await recv_msg(a1)).body for _ in range(3)]
                assert await nothing_arrives(a1, 0.2)
                counts = {k: v - counts0.get(k, 0) for k, v in w.relay.op_counts.items()
                          if v != counts0.get(k, 0)}
                return answers, got, counts, [b.tokens < 1 for b in link.budgets.ops]
        finally:
            wire_mod.leading_dsends = saved

    bulk = run(loop, scenario(tmp_path / "bulk", True))
    assert bulk == run(loop, scenario(tmp_path / "each", False))
    answers, got, counts, spent = bulk
    limited = int(ErrorCode.RATE_LIMITED)
    assert answers == [("ok", None)] * 3 + [(limited,)] * 2
    assert got == [bytes([i]) * 4 for i in range(1, 4)]
    assert counts == {int(wire.Op.DSEND): 5, int(wire.Op.PING): 1} and all(spent)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_frame_of_dsends_goes_to_the_keys_stage_like_a_frame_of_sends(loop, tmp_path):
    # checked as the compiled decoder read them, a frame's DSENDs are taken
    # like SENDs: a quiet link's frame in one piece (32 at a time cost a
    # fifth of a DSEND's relay CPU), a busy link's in pieces sized by what
    # its DSENDs cost, never more than a chunk (a frame short enough to be
    # decoded whole, and a longer one, which a busy link decodes by the
    # chunk).  Without the compiled core the precise decoder reads them: 32
    # at a time, a busy link's sized as other ops.  Either way, the same
    # answers and copies, in order.
    from fastroute import _compiled
    from fastroute.relay import link as link_mod

    compiled = _compiled.core is not None
    kind = link_mod._PIECE_E2EE if compiled else link_mod._PIECE_OPS

    lim = Limits(ops_per_s=1e6, ops_burst=1e6, max_ops_per_turn=100_000,
                 max_relay_ops_per_turn=1_000_000)

    async def main():
        async with world(tmp_path, limits=lim) as w:
            a1 = await e2ee(w, "alice@home", "phone", 11)
            b1 = await e2ee(w, "bob@home", "phone", 21)
            link = next(ln for ln in w.relay.links if ln.address == "bob@home")
            pieces: list[int] = []
            dispatch = link._dispatch

            def counted(ops):
                pieces.append(len(ops))
                return dispatch(ops)

            link._dispatch = counted
            bodies = []
            phases = ((False, 200), (True, 60), (True, 200))
            for phase, (busy, n) in enumerate(phases):
                if busy:
                    link.quiet = lambda: False  # as past half its op budget
                    # each busy frame's pieces from the first, by their own kind
                    link.costs = [0.0] * len(link.costs)
                    link.grown = [0] * len(link.grown)
                del pieces[:]
                ids = [os.urandom(16) for _ in range(n)]
                futs = [request_future(b1, cid) for cid in ids]
                ops = [wire.dsend_op(cid, "alice@home", False, [(1, 11, b"%d %d" % (phase, i))],
                                     []) for i, cid in enumerate(ids)]
                assert (phase == 1) == (sum(map(len, ops)) < link_mod._BUSY_DECODE_BYTES)
                b1._write(ops)
                assert await asyncio.wait_for(asyncio.gather(*futs), 10) == [None] * n
                bodies += [(await recv_msg(a1)).body for _ in ids]
                assert sum(pieces) == n
                if not busy:
                    chunk = n if compiled else link_mod._OPS_CHUNK
                    assert pieces == [chunk] * (n // chunk) + [n % chunk] * (n % chunk > 0)
                else:
                    assert pieces[0] == link_mod._FIRST_PIECE[kind]
                    assert len(pieces) > 1 and max(pieces) <= link_mod._OPS_CHUNK
                    # measured as their kind only
                    assert [k for k, c in enumerate(link.costs) if c] == [kind]
            # in order, none lost, none twice
            assert bodies == [b"%d %d" % (phase, i)
                              for phase, (_, n) in enumerate(phases) for i in range(n)]
    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_bye_right_after_dsends_still_gets_every_reply(loop, tmp_path):
    # DSENDs and BYE in one frame: the DSENDs the link gathered for the keys
    # stage go to it before the BYE, which then waits for their answers
    async def main():
        async with world(tmp_path) as w:
            a1 = await e2ee(w, "alice@home", "phone", 11)
            b1 = await e2ee(w, "bob@home", "phone", 21)
            ids = [os.urandom(16) for _ in range(20)]
            futs = [request_future(b1, cid) for cid in ids]
            b1._write([wire.dsend_op(cid, "alice@home", False, [(1, 11, b"%d" % i)], [])
                       for i, cid in enumerate(ids)] + [wire.bye_op()])
            await asyncio.wait_for(asyncio.gather(*futs), 5)
            bodies = sorted([(await recv_msg(a1)).body for _ in ids])
            assert bodies == sorted(b"%d" % i for i in range(20))
    run(loop, main())


class _Ticks:
    """Loop iterations, counted by a callback that runs once in each."""

    def __init__(self) -> None:
        self.n = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.n += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_per_device_send_is_answered_and_delivered_in_the_iteration_of_its_read(
        loop, tmp_path):
    # the per-device sends of a turn are stored together at its end, among
    # the loop's callbacks; with the memory store the answer and the copies
    # are written right there, not a loop iteration later (a poll and its
    # wait between a read and its answer), as a SEND's are
    async def main():
        async with world(tmp_path, store="memory") as w:
            a = await e2ee(w, "alice@home", "phone", 11)
            b = await e2ee(w, "bob@home", "phone", 21)
            links = {ln.address: ln for ln in w.relay.links}
            ticks = _Ticks()
            seen: dict = collections.defaultdict(list)

            class Reader:
                def __init__(self, name, real):
                    self.name, self.real = name, real

                def feed(self, data):
                    seen[self.name + " read"].append(ticks.n)
                    return self.real.feed(data)

            class Writes:
                def __init__(self, name, real):
                    self.name, self.real = name, real

                def writelines(self, bufs):
                    seen[self.name + " write"].append(ticks.n)
                    self.real.writelines(bufs)

                def __getattr__(self, attr):
                    return getattr(self.real, attr)

            for name, ln in links.items():
                ln.reader = Reader(name, ln.reader)
                ln.transport = Writes(name, ln.transport)
            try:
                for op in ("SEND", "DSEND"):
                    seen.clear()
                    if op == "SEND":
                        await a.send("bob@home", b"plain")
                    else:
                        await a.send_to_devices("bob@home", [(b.did, 21, b"sealed")])
                    assert (await recv_msg(b)).body in (b"plain", b"sealed")
                    read = seen["alice@home read"][0]
                    assert seen["alice@home write"][0] - read <= 1, (op, dict(seen))
                    assert seen["bob@home write"][0] - read <= 1, (op, dict(seen))
            finally:
                ticks.stop()
    run(loop, main())


@pytest.mark.parametrize("loop", LOOPS)
def test_reads_do_not_look_the_loop_up(loop, tmp_path, monkeypatch):
    # asyncio.get_running_loop() checks the process id, a system call, on
    # every lookup: the relay's per-read paths (the scheduler's turn, the
    # turn's store batch) keep the loop they found the first time
    async def main():
        async with world(tmp_path, store="memory") as w:
            a = await e2ee(w, "alice@home", "phone", 11)
            b = await e2ee(w, "bob@home", "phone", 21)
            await a.send("bob@home", b"warm")
            await a.send_to_devices("bob@home", [(b.did, 21, b"warm")])
            for _ in range(2):
                await recv_msg(b)
            calls = collections.Counter()
            real = asyncio.get_running_loop

            def counted():
                calls[traceback.extract_stack(limit=2)[0].filename] += 1
                return real()
            monkeypatch.setattr(asyncio, "get_running_loop", counted)
            for i in range(30):
                await a.send("bob@home", b"s%d" % i)
                await a.send_to_devices("bob@home", [(b.did, 21, b"d%d" % i)])
            for _ in range(60):
                await recv_msg(b)
            relay_calls = {f: n for f, n in calls.items() if "/relay/" in f}
            assert sum(relay_calls.values()) <= 4, relay_calls
    run(loop, main())
