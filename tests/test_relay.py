"""End-to-end tests: a real relay on loopback TCP, real Noise, real SQLite, real clients.

Each test runs under both the asyncio and the uvloop event loop.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time

import msgpack
import pytest

import fastroute

from fastroute import Relay, RelayConfig, wire
from fastroute.errors import (
    BadSignature,
    BodyTooLarge,
    ConnectionClosed,
    CredentialExpired,
    CredentialRevoked,
    ErrorCode,
    FastrouteError,
    HandshakeError,
    KeyMismatch,
    UnknownAddress,
    UnknownProvider,
)
from fastroute.identity import ProviderKey, Registry
from fastroute.noise import KeyPair
from fastroute.store import SqliteStore
from relayutil import LOOPS, nothing_arrives, recv_n, run, world

pytestmark = pytest.mark.parametrize("loop", LOOPS)


def test_home_and_third_party_exchange_both_ways(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            assert (alice.address, bob.address) == ("alice@home", "bob@acme")
            mid = await alice.send("bob@acme", b"ciphertext-1")
            got = (await recv_n(bob, 1))[0]
            assert (got.sender, got.id, got.body, got.ephemeral) == \
                ("alice@home", mid, b"ciphertext-1", False)
            await bob.send("alice@home", b"ciphertext-2")
            back = (await recv_n(alice, 1))[0]
            assert (back.sender, back.body) == ("bob@acme", b"ciphertext-2")
            # a read receipt travels as an ephemeral signal
            await alice.send("bob@acme", b"receipt", ephemeral=True)
            rec = (await recv_n(bob, 1))[0]
            assert rec.ephemeral and rec.body == b"receipt"
            stats = w.relay.stats()
            assert stats["accepted"] == 3
            assert "alice" not in repr(stats) and "bob" not in repr(stats)
    run(loop, main())


def test_every_device_of_an_address_gets_the_message(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            phone = await w.connect("alice@home", "phone")
            laptop = await w.connect("alice@home", "laptop")
            bob = await w.connect("bob@acme")
            await bob.send("alice@home", b"to both")
            for dev in (phone, laptop):
                assert (await recv_n(dev, 1))[0].body == b"to both"
            # a message from one of alice's devices reaches her other device too
            await phone.send("alice@home", b"sync")
            assert (await recv_n(laptop, 1))[0].body == b"sync"
            assert (await recv_n(phone, 1))[0].body == b"sync"
    run(loop, main())


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_per_device_fifo_and_exactly_once_under_load(loop, store, tmp_path):
    # the mailbox overflows again and again while stored batches are still
    # being routed: the sync from the store must wait for them, not spin
    async def main():
        async with world(tmp_path, mailbox_capacity=64, store=store) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            n = 3000
            futs = [alice.send_nowait("bob@acme", i.to_bytes(4, "big")) for i in range(n)]
            got = await recv_n(bob, n, timeout=30)
            await asyncio.gather(*futs)
            assert [int.from_bytes(m.body, "big") for m in got] == list(range(n))
            seqs = [m.seq for m in got]
            assert seqs == sorted(seqs) and len(set(seqs)) == n
            assert await nothing_arrives(bob)
    run(loop, main())


def test_offline_recipient_gets_backlog_in_order_after_restart(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            carol = await w.connect("carol@acme")  # the device becomes known
            await carol.close()
            alice = await w.connect("alice@home")
            for i in range(50):
                await alice.send("carol@acme", b"m%d" % i)
            data_dir, keys = w.data_dir, w.keys
        # a new relay process on the same data directory: the store kept them
        relay = Relay(RelayConfig(port=0, data_dir=data_dir))
        await relay.start()
        try:
            from relayutil import World
            w2 = World(relay, data_dir, keys)
            carol = await w2.connect("carol@acme")
            got = await recv_n(carol, 50)
            assert [m.body for m in got] == [b"m%d" % i for i in range(50)]
            assert all(m.sender == "alice@home" for m in got)
            await carol.close()
        finally:
            await relay.close()
    run(loop, main())


def test_unacked_messages_are_redelivered_on_reconnect_and_acked_ones_are_not(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme", "phone", auto_ack=False)
            ids = [await alice.send("bob@acme", b"x%d" % i) for i in range(4)]
            got = await recv_n(bob, 4)
            bob.ack(got[1].seq)  # acks the first two
            await bob.ping()  # the ack has reached the relay
            await bob.close()
            bob2 = await w.connect("bob@acme", "phone")
            again = await recv_n(bob2, 2)
            assert [m.id for m in again] == ids[2:]
            assert await nothing_arrives(bob2)
    run(loop, main())


def test_frames_of_dacks_are_read_in_c_with_the_loops_effects(loop, tmp_path):
    # a frame of DACKs only (what a receiving client sends) is read by the
    # compiled decoder (wire.decode_dacks) and acked at once; with it cut out,
    # the precise decoder and the loop take it: the same messages acked (and not
    # redelivered), the same op counts, the same refusal counted past the budget
    async def scenario(path, decoded: bool):
        saved = wire.decode_dacks
        if not decoded:
            wire.decode_dacks = lambda plaintext: None
        try:
            async with world(path) as w:
                alice = await w.connect("alice@home")
                bob = await w.connect("bob@acme", "phone", auto_ack=False)
                ids = await alice.send_many("bob@acme", [b"x%d" % i for i in range(8)])
                seqs = [m.seq for m in await recv_n(bob, 8)]
                link = next(ln for ln in w.relay.links if ln.address == "bob@acme")
                counts0, refused0, ops0 = dict(w.relay.op_counts), dict(w.relay.refused), link.ops
                bob._write([wire.dack_op(seqs[1])])  # alone: the usual frame
                bob._write([wire.dack_op(seqs[3]), wire.dack_op(seqs[2])])  # the highest counts
                await bob.ping()
                inflight = len(link.feed.inflight)
                for bucket in link.budgets.ops:
                    bucket.rate, bucket.tokens = 1e-6, 1.0  # one op left: 2 over, still acked
                bob._write([wire.dack_op(seqs[4]), wire.dack_op(seqs[0]), wire.dack_op(seqs[5])])
                for _ in range(100):
                    if link.ops == ops0 + 7:  # the PING too
                        break
                    await asyncio.sleep(0.01)
                left, ops = len(link.feed.inflight), link.ops - ops0
                counts = {k: v - counts0.get(k, 0) for k, v in w.relay.op_counts.items()
                          if v != counts0.get(k, 0)}
                refused = {k: v - refused0.get(k, 0) for k, v in w.relay.refused.items()
                           if v != refused0.get(k, 0)}
                for bucket in link.budgets.ops:
                    bucket.rate = 1e6
                await bob.close()
                bob2 = await w.connect("bob@acme", "phone")
                again = [m.id for m in await recv_n(bob2, 2)]
                assert await nothing_arrives(bob2)
                return again == ids[6:], inflight, left, counts, refused, ops
        finally:
            wire.decode_dacks = saved

    fast = run(loop, scenario(tmp_path / "fast", True))
    assert fast == run(loop, scenario(tmp_path / "precise", False))
    redelivered_the_rest, inflight, left, counts, refused, ops = fast
    assert redelivered_the_rest and (inflight, left, ops) == (4, 2, 7)
    assert counts == {int(wire.Op.DACK): 6, int(wire.Op.PING): 1}
    assert refused == {int(ErrorCode.RATE_LIMITED): 1}


def test_resent_id_is_acked_again_but_delivered_once(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            cid = os.urandom(16)
            assert await alice.send("bob@acme", b"once", id=cid) == cid
            assert await alice.send("bob@acme", b"once", id=cid) == cid
            # the same id twice in one frame, the second before the first is stored
            from fastroute import wire
            cid2 = os.urandom(16)
            f1 = alice.send_nowait("bob@acme", b"twice", id=cid2)
            assert alice.send_nowait("bob@acme", b"twice", id=cid2) is f1
            alice._out.append(wire.send_op(cid2, "bob@acme", b"twice"))
            assert await f1 == cid2
            got = await recv_n(bob, 2)
            assert [m.body for m in got] == [b"once", b"twice"]
            assert await nothing_arrives(bob)
    run(loop, main())


def _counting_put_now(store, fail: int = 0) -> list:
    """Count the batches ``store.put_now`` is given (a list of how many
    messages each had); the first ``fail`` of them it refuses (RuntimeError)."""
    sizes: list = []
    real = store.put_now

    def put_now(items, first_mid):
        sizes.append(len(items) // 2)  # flat: device keys, route a message
        if len(sizes) <= fail:
            raise RuntimeError("injected")
        return real(items, first_mid)
    store.put_now = put_now
    return sizes


class _ItemsOnly:
    """An embedder's store that offers the Store protocol's calls but neither
    ``put_tails`` nor ``put_now``: a SQLite store behind it, counting puts."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.put_manys = 0

    def put_many(self, items, *, validate=True):
        self.put_manys += 1
        assert all(type(item) is tuple and len(item) == 5 for item in items)
        return self.inner.put_many(items, validate=validate)

    def __getattr__(self, name):
        if name in ("put_tails", "put_now", "next_mid"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_a_store_without_put_tails_is_given_the_sends_as_items(loop, tmp_path):
    # the gate hands a store its SENDs as DELIVER tails (put_tails); an
    # embedder's store that has only the protocol's put_many gets them as items
    async def main():
        inner = await SqliteStore.open(str(tmp_path / "embedded.db"))
        store = _ItemsOnly(inner)
        try:
            async with world(tmp_path, embedded_store=store) as w:
                alice = await w.connect("alice@home")
                bob = await w.connect("bob@acme")
                await bob.close()  # offline: his messages wait in the store
                for i in range(3):
                    await alice.send("bob@acme", b"m%d" % i)
                assert store.put_manys >= 3 and await inner.count_pending() == 3
                bob = await w.connect("bob@acme")
                assert [m.body for m in await recv_n(bob, 3)] == [b"m0", b"m1", b"m2"]
        finally:
            await inner.close()
    run(loop, main())


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_a_read_of_mixed_sends_is_answered_alike_by_either_store(loop, store, tmp_path):
    # the memory store takes a batch at once, so the gate decides, SACKs and
    # routes each stored message in its loop: what the clients see is what
    # the SQLite store's path (a future, then a second pass) gives them
    async def main():
        async with world(tmp_path, store=store) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            sizes = _counting_put_now(w.relay.delivery.store) if store == "memory" else None
            await alice.send("bob@acme", b"warm")  # bob's backlog sync is done
            assert [m.body for m in await recv_n(bob, 1)] == [b"warm"]
            cids = [os.urandom(16) for _ in range(4)]
            futs = [alice.send_nowait("bob@acme", b"m0", id=cids[0]),
                    alice.send_nowait("bob@acme", b"signal", id=cids[1], ephemeral=True),
                    alice.send_nowait("nobody@acme", b"lost", id=cids[2]),
                    alice.send_nowait("bob@acme", b"m1", id=cids[3])]
            # the first id again in the same frame: answered, not stored twice
            alice._out.append(wire.send_op(cids[0], "bob@acme", b"m0"))
            assert await futs[0] == cids[0] and await futs[1] == cids[1]
            with pytest.raises(UnknownAddress):
                await futs[2]
            assert await futs[3] == cids[3]
            got = await recv_n(bob, 3)
            # the signal is routed with the read, the stored ones after it
            assert [m.body for m in got] == [b"signal", b"m0", b"m1"]
            # a resend of a stored id is answered and not delivered again
            assert await alice.send("bob@acme", b"m1", id=cids[3]) == cids[3]
            assert await nothing_arrives(bob)
            relay = w.relay
            assert relay.delivery._puts_in_flight == 0
            assert relay.gate.accepted == 4  # warm, signal, m0, m1
            if sizes is not None:
                assert sizes == [1, 2]  # warm; m0 and m1 (the resend: no put)
            await bob.ping()
            assert await relay.store.count_pending() == 0
    run(loop, main())


def test_a_batch_the_memory_store_refuses_is_not_acked_and_its_resends_arrive(
        loop, tmp_path):
    # put_now never fails with the gate's own items; if it did, the SACK-oks
    # the loop queued must not go out: the link closes (STORE_FAILED, a close
    # to reconnect after), the ids are forgotten, and the client's resends
    # are taken anew and delivered once
    async def main():
        async with world(tmp_path, store="memory") as w:
            alice = await w.connect("alice@home", reconnect=True)
            bob = await w.connect("bob@acme")
            calls = _counting_put_now(w.relay.delivery.store, fail=1)
            before = alice.links
            ids = await asyncio.wait_for(
                alice.send_many("bob@acme", [b"a%d" % i for i in range(5)]), 10)
            assert alice.links == before + 1  # closed once, reconnected, resent
            got = await recv_n(bob, 5)
            assert [m.body for m in got] == [b"a%d" % i for i in range(5)]
            assert [m.id for m in got] == ids
            assert await nothing_arrives(bob)
            assert calls == [5, 5]
            assert w.relay.stats()["refused"].get(int(ErrorCode.STORE_FAILED), 0) >= 1
    run(loop, main())


@pytest.mark.skipif(not fastroute.COMPILED, reason="the compiled window is the mapped one")
def test_the_dedup_window_is_warmed_off_the_loop_and_no_warm_outlives_the_relay(
        loop, tmp_path):
    import threading

    # other tests' relays may have warms of their own running
    before = set(threading.enumerate())

    def warm_threads():
        return [t for t in threading.enumerate()
                if t.name.startswith("fastroute-warm") and t not in before]

    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            await w.connect("bob@acme")
            sends, dsends = w.relay.gate.dedup, w.relay.keys.dedup
            assert sends.resident() == dsends.resident() == 0
            await alice.send("bob@acme", b"one")
            # the first SEND's id asked for the SEND window's room: the worker
            # faults in its index and the slots ahead of the newest entry
            deadline = time.monotonic() + 10
            while sends.resident() < 24 * 1024 * 1024:
                assert time.monotonic() < deadline, sends.resident()
                await asyncio.sleep(0.01)
            # a window that no send used takes no memory
            assert dsends.resident() == 0
            warmer = w.relay._warmer
        # closed: no warm thread is left behind, and no new one starts
        deadline = time.monotonic() + 10
        while warm_threads():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        warmer.ask(sends)
        assert warm_threads() == []
    run(loop, main())


def test_unknown_recipient_and_oversize_body_are_refused_with_codes(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            with pytest.raises(UnknownAddress) as err:
                await alice.send("nobody@acme", b"x")
            assert err.value.code == ErrorCode.UNKNOWN_RECIPIENT
            bob = await w.connect("bob@acme")
            with pytest.raises(BodyTooLarge):  # caught by the client library
                await alice.send("bob@acme", b"x" * 61441)
            # ... and by the relay, for a client that does not check
            big_id = os.urandom(16)
            big = alice._loop.create_future()
            alice._pending[big_id] = (big, b"")
            alice._write([msgpack.packb([1, big_id, "bob@acme", b"x" * 61441, 0])])
            with pytest.raises(BodyTooLarge):
                await big
            # the link survives refusals
            await alice.send("bob@acme", b"fine")
            assert [m.body for m in await recv_n(bob, 1)] == [b"fine"]
            assert w.relay.stats()["refused"][int(ErrorCode.UNKNOWN_RECIPIENT)] == 1
    run(loop, main())


def test_credential_failures_get_their_code_and_no_delivery(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            bob = await w.connect("bob@acme")
            port, pin = w.port, w.relay.server_key.public
            from fastroute import Client
            from fastroute.identity import issue_credential

            async def attempt(cred, static):
                return await Client.connect("127.0.0.1", port, credential=cred,
                                            static=static, server_key=pin)

            # expired
            with pytest.raises(CredentialExpired):
                await w.connect("mallory@home", now=int(time.time()) - 7200, ttl_s=60)
            # forged: signed by a key that is not acme's
            with pytest.raises(BadSignature):
                await w.connect("mallory@acme", key=ProviderKey.generate())
            # unenrolled provider
            rogue = ProviderKey.generate()
            kp = KeyPair.generate()
            with pytest.raises(UnknownProvider):
                await attempt(issue_credential(rogue, "rogue", "m@rogue", "d", kp.public), kp)
            # credential for one static key, handshake with another
            kp1, cred = w.credential("mallory@home", "d")
            with pytest.raises(KeyMismatch):
                await attempt(cred, KeyPair.generate())
            # revoked device
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("mallory@home", "stolen")
            with pytest.raises(CredentialRevoked):
                await w.connect("mallory@home", "stolen")
            assert await nothing_arrives(bob)
            stats = w.relay.stats()
            for code in (ErrorCode.CREDENTIAL_EXPIRED, ErrorCode.BAD_SIGNATURE,
                         ErrorCode.UNKNOWN_PROVIDER, ErrorCode.KEY_MISMATCH,
                         ErrorCode.CREDENTIAL_REVOKED):
                assert stats["refused"].get(int(code)) == 1, code
            # none of them became a known address
            alice = await w.connect("alice@home")
            with pytest.raises(UnknownAddress):
                await alice.send("mallory@home", b"x")
    run(loop, main())


def test_revocation_closes_live_connections(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            eve = await w.connect("eve@acme", "tablet")
            alice = await w.connect("alice@home")
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("eve@acme", "tablet")
            with pytest.raises(CredentialRevoked):
                await asyncio.wait_for(eve.recv(), 5)
            # a whole provider
            bob = await w.connect("bob@acme")
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_provider("acme")
            with pytest.raises(CredentialRevoked):
                await asyncio.wait_for(bob.recv(), 5)
            with pytest.raises(CredentialRevoked):
                await w.connect("bob@acme", "other")
            await alice.ping()  # home is unaffected
    run(loop, main())


def test_live_links_are_checked_against_the_trust_only_when_it_changed(loop, tmp_path):
    # the upkeep pass (every registry_poll_s, over every live link) checks a
    # credential against the trust only after a change or once it expired:
    # the same links closed for the same reasons, a few comparisons per link
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            eve = await w.connect("eve@acme", now=int(time.time()) - 57, ttl_s=60)
            gate = w.relay.gate
            real, calls = gate.check_live, []
            gate.check_live = lambda cred, now: (calls.append(cred.address), real(cred, now))[1]
            await asyncio.sleep(0.3)  # a few passes: the first after eve's handshake
            calls.clear()
            await asyncio.sleep(0.5)
            assert calls == []  # ten passes, nothing changed, nobody expired
            with pytest.raises(CredentialExpired):
                await asyncio.wait_for(eve.recv(), 6)
            assert set(calls) == {"eve@acme"}
            calls.clear()
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("alice@home", "phone")
            with pytest.raises(CredentialRevoked):
                await asyncio.wait_for(alice.recv(), 5)
            assert "alice@home" in calls
    run(loop, main())


def test_a_silent_link_is_closed_when_idle_and_a_talking_one_is_not(loop, tmp_path):
    # idle_timeout: a link the relay has not heard from for that long is
    # closed with IDLE_TIMEOUT; any frame (a PING) moves its deadline
    async def main():
        async with world(tmp_path, idle_timeout=0.6) as w:
            silent = await w.connect("alice@home", keepalive=None)
            talker = await w.connect("bob@home", keepalive=None)
            t0 = time.monotonic()
            for _ in range(6):
                await talker.ping()
                await asyncio.sleep(0.2)
            with pytest.raises(FastrouteError) as err:
                await asyncio.wait_for(silent.recv(), 5)
            assert err.value.code == ErrorCode.IDLE_TIMEOUT
            assert time.monotonic() - t0 >= 0.6 - 0.05
            await talker.ping()  # 1.2 s in, still open
            # a reload's idle timeout takes effect at once, for links already
            # waiting on the longer one too
            w.relay.config.idle_timeout = 60.0
            later = await w.connect("carol@home", keepalive=None)
            await asyncio.sleep(0.3)
            w.relay.config.idle_timeout = 0.5  # what a SIGHUP reload sets
            with pytest.raises(FastrouteError) as err:
                await asyncio.wait_for(later.recv(), 3)
            assert err.value.code == ErrorCode.IDLE_TIMEOUT
    run(loop, main())


def test_the_upkeep_pass_looks_only_at_links_that_are_due(loop, tmp_path):
    # every poll looked at every live link (a few comparisons each: with a
    # million mostly idle links, a stall of a fraction of a second per poll);
    # now a link waits for its idle deadline or its credential's expiry, a
    # device revocation checks that device's link, and only a provider gone
    # or revoked checks them all
    async def main():
        async with world(tmp_path, idle_timeout=60) as w:
            delivery = w.relay.delivery
            walks = []
            real = delivery.feeds
            delivery.feeds = lambda: (walks.append(1), real())[1]
            for i in range(8):
                await w.connect(f"u{i}@home", keepalive=None)
            eve = await w.connect("eve@acme", keepalive=None, now=int(time.time()) - 57, ttl_s=60)
            await asyncio.sleep(0.3)  # a pass after the handshakes (which may reload the trust)
            walks.clear()
            await asyncio.sleep(0.6)  # twelve passes
            assert walks == []
            with pytest.raises(CredentialExpired):
                await asyncio.wait_for(eve.recv(), 6)
            assert walks == []
            # short-lived links leave the heap as they fall due, or all at once
            # when they outnumber those online: it stays bounded
            for i in range(150):
                c = await w.connect(f"s{i}@home", keepalive=None)
                await c.close()
                w.clients.remove(c)
            await asyncio.sleep(0.2)
            upkeep = w.relay.upkeep
            assert len(upkeep._due) <= 2 * delivery.online + 64
            # a device revoked: its link is looked up and checked, no other
            acme = await w.connect("mallory@acme", keepalive=None)
            await asyncio.sleep(0.2)
            gate = w.relay.gate
            real_check, checked = gate.check_live, []
            gate.check_live = lambda cred, now: (checked.append(cred.address),
                                                 real_check(cred, now))[1]
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("u0@home", "phone")
            walks.clear()
            with pytest.raises(CredentialRevoked):
                await asyncio.wait_for(w.clients[0].recv(), 5)
            await w.clients[1].ping()  # the others stay
            assert checked == ["u0@home"]
            assert walks == []  # nor does the gate walk the links for it
            # a provider revoked: every live link is checked, its own closed
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_provider("acme")
            with pytest.raises(CredentialRevoked):
                await asyncio.wait_for(acme.recv(), 5)
            assert {"mallory@acme", "u1@home", "u7@home"} <= set(checked)
            await w.clients[1].ping()
    run(loop, main())


@pytest.mark.parametrize("store, queue, overflows", [
    ("sqlite", 0, True),    # past mailbox_capacity the store feeds the device
    ("memory", 4, True),    # the same when asked for
    ("memory", 0, False),   # the memory store's default: the live route queues them
])
def test_slow_consumer_catches_up_in_order_within_its_window(loop, store, queue, overflows,
                                                             tmp_path):
    async def main():
        async with world(tmp_path, mailbox_capacity=4, store=store,
                         mailbox_queue_capacity=queue) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme", auto_ack=False)
            n = 200
            await asyncio.gather(*(alice.send_nowait("bob@acme", b"%04d" % i)
                                   for i in range(n)))
            got = []
            while len(got) < n:
                batch = await asyncio.wait_for(bob.recv_many(), 10)
                # never more unacked than mailbox_capacity, whatever the mailbox holds
                assert len(batch) <= 4
                got.extend(batch)
                bob.ack(batch[-1].seq)
            assert [m.body for m in got] == [b"%04d" % i for i in range(n)]
            seqs = [m.seq for m in got]
            assert seqs == list(range(seqs[0], seqs[0] + n))
            await bob.ping()
            engine = w.relay.router.stats()
            assert engine["queued"] == 0 and engine["unacked"] == 0
            # synced: the device left the live route and was fed from the store
            assert (w.relay.stats()["synced"] > 0) is overflows
            assert w.relay.delivery.queued_bytes == 0
    run(loop, main())


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_signals_past_a_live_devices_full_mailbox_are_dropped_not_fatal(loop, store, tmp_path):
    # a burst of signals (typing indicators) to a device that is online and
    # has not acked: those past its mailbox are dropped, and the sender's
    # link lives on (the memory accounting read a signal's bare tail as a
    # pair and failed the sender's read, closing its connection)
    async def main():
        async with world(tmp_path, mailbox_capacity=4, mailbox_queue_capacity=4,
                         store=store) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme", auto_ack=False)
            await bob.ping()  # its first frame: the (empty) backlog sync runs
            await alice.send("bob@acme", b"stored")
            got = await recv_n(bob, 1)
            await asyncio.wait_for(alice.send_many(
                "bob@acme", [b"typing%d" % i for i in range(10)], ephemeral=True), 5)
            got += await recv_n(bob, 3)
            assert [m.body for m in got] == [b"stored", b"typing0", b"typing1", b"typing2"]
            assert await nothing_arrives(bob)
            assert w.relay.delivery.queued_bytes > 0
            bob.ack(got[-1].seq)
            await bob.ping()
            assert w.relay.delivery.queued_bytes == 0
            # back on the live route: the next signal and message arrive
            await alice.send("bob@acme", b"typing again", ephemeral=True)
            await alice.send("bob@acme", b"stored again")
            assert [m.body for m in await recv_n(bob, 2)] == [b"typing again", b"stored again"]
    run(loop, main())


def test_a_client_that_never_dacks_gets_mailbox_capacity_messages_and_no_more(loop, tmp_path):
    # the memory store queues past the window in the mailbox: the window still holds
    async def main():
        async with world(tmp_path, mailbox_capacity=4, store="memory") as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme", auto_ack=False)
            await alice.send_many("bob@acme", [b"%02d" % i for i in range(10)])
            got = await recv_n(bob, 4)
            assert await nothing_arrives(bob)
            assert w.relay.router.pending(w.relay.delivery.feed_of("bob@acme", "phone").dev) \
                == (6, 4)
            bob.ack(got[1].seq)  # two acked: two more come, no more
            got += await recv_n(bob, 2)
            assert await nothing_arrives(bob)
            bob.ack(got[-1].seq)
            got += await recv_n(bob, 4)
            assert [m.body for m in got] == [b"%02d" % i for i in range(10)]
            assert w.relay.stats()["synced"] == 0
    run(loop, main())


def test_ephemeral_signal_to_offline_device_is_dropped_not_stored(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            carol = await w.connect("carol@acme")
            await carol.close()
            alice = await w.connect("alice@home")
            await alice.send("carol@acme", b"typing", ephemeral=True)
            await alice.send("carol@acme", b"stored")
            carol = await w.connect("carol@acme")
            got = await recv_n(carol, 1)
            assert [m.body for m in got] == [b"stored"]
            assert await nothing_arrives(carol)
    run(loop, main())


def test_graceful_shutdown_tells_clients(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            await w.relay.close()
            with pytest.raises(ConnectionClosed) as err:
                await asyncio.wait_for(alice.recv(), 5)
            assert err.value.code == ErrorCode.SHUTTING_DOWN
    run(loop, main())


def test_wrong_prologue_fails_closed(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            kp, cred = w.credential("alice@home", "phone")
            from fastroute import Client
            with pytest.raises(HandshakeError):
                await Client.connect("127.0.0.1", w.port, credential=cred, static=kp,
                                     prologue=b"fastroute/0", timeout=5)
            await asyncio.sleep(0.05)
            assert w.relay.stats()["connections"] == 0
    run(loop, main())


def test_pinned_key_mismatch_is_refused_by_the_client(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            kp, cred = w.credential("alice@home", "phone")
            from fastroute import Client
            with pytest.raises(HandshakeError):
                await Client.connect("127.0.0.1", w.port, credential=cred, static=kp,
                                     server_key=KeyPair.generate().public)
    run(loop, main())


def test_silent_and_garbage_connections_are_closed_and_leave_nothing(loop, tmp_path):
    async def main():
        async with world(tmp_path, handshake_timeout=0.3) as w:
            # silent: closed by the handshake timeout
            r, wr = await asyncio.open_connection("127.0.0.1", w.port)
            assert await asyncio.wait_for(r.read(), 5) == b""
            wr.close()
            # garbage first frame: closed at once
            r, wr = await asyncio.open_connection("127.0.0.1", w.port)
            wr.write(b"\x00\x05hello")
            assert await asyncio.wait_for(r.read(), 5) == b""
            wr.close()
            # an oversize length prefix with nothing behind it
            r, wr = await asyncio.open_connection("127.0.0.1", w.port)
            wr.write(b"\xff\xff" + b"\x00" * 100)
            assert await asyncio.wait_for(r.read(), 5) == b""
            wr.close()
            await asyncio.sleep(0.05)
            assert w.relay.stats()["connections"] == 0
            # the relay still serves real clients
            alice = await w.connect("alice@home")
            await alice.ping()
    run(loop, main())


def test_replayed_handshake_is_refused(loop, tmp_path):
    async def main():
        from fastroute import wire
        from fastroute.noise import FrameReader, HandshakeState, frame
        async with world(tmp_path) as w:
            kp, cred = w.credential("alice@home", "phone")
            # a real handshake, recorded
            r, wr = await asyncio.open_connection("127.0.0.1", w.port)
            hs = HandshakeState(initiator=True, static=kp)
            m1 = frame(hs.write_message())
            wr.write(m1)
            fr = FrameReader()
            msgs = []
            while not msgs:
                msgs = fr.feed(await r.read(65536))
            hs.read_message(msgs[0])
            m3 = frame(hs.write_message(wire.encode_client_hello(cred)))
            wr.write(m3)
            await asyncio.sleep(0.1)
            wr.close()
            # replaying the recorded client messages on a new connection: the relay
            # chose a new ephemeral key, so msg3 no longer authenticates
            r, wr = await asyncio.open_connection("127.0.0.1", w.port)
            wr.write(m1)
            await asyncio.sleep(0.05)
            wr.write(m3)
            data = b""
            while True:
                chunk = await asyncio.wait_for(r.read(65536), 5)
                if not chunk:
                    break
                data += chunk
            # only msg2 came back, then the close: no WELCOME, no transport frame
            assert len(FrameReader().feed(data)) == 1
            assert w.relay.stats()["refused"].get(int(ErrorCode.HANDSHAKE_FAILED)) == 1
    run(loop, main())


def test_malformed_ops_get_errors_and_valid_ops_in_the_same_frame_survive(loop, tmp_path):
    async def main():
        import msgpack

        from fastroute import wire
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            good = os.urandom(16)
            bad_id = os.urandom(16)
            ops = [wire.send_op(good, "bob@acme", b"ok"),
                   msgpack.packb([1, bad_id, "bob@acme", b"x", 7]),  # class 7 does not exist
                   msgpack.packb([99, 1])]  # unknown opcode
            fut = alice.send_nowait("bob@acme", b"placeholder", id=good)
            alice._out.clear()
            bad_fut = alice._loop.create_future()
            alice._pending[bad_id] = (bad_fut, b"")
            alice._write(ops)
            assert await fut == good
            with pytest.raises(FastrouteError) as err:
                await bad_fut
            assert err.value.code == ErrorCode.BAD_FIELD
            assert [m.body for m in await recv_n(bob, 1)] == [b"ok"]
            await alice.ping()  # still connected
    run(loop, main())


def test_tampered_transport_frame_closes_the_connection(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            alice._proto.transport.write(b"\x00\x20" + os.urandom(32))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(alice.recv(), 5)
            await asyncio.sleep(0.05)
            assert w.relay.stats()["connections"] == 0
            assert w.relay.stats()["refused"].get(int(ErrorCode.DECRYPT_FAILED)) == 1
    run(loop, main())


def test_rate_limit_refuses_with_code_and_keeps_accepted(loop, tmp_path):
    async def main():
        from fastroute.config import Limits
        from fastroute.errors import RateLimited
        lim = Limits(msgs_per_s=1.0, msgs_burst=5.0)
        async with world(tmp_path, limits=lim) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            results = await asyncio.gather(*(alice.send_nowait("bob@acme", b"%d" % i)
                                             for i in range(8)), return_exceptions=True)
            ok = [r for r in results if isinstance(r, bytes)]
            limited = [r for r in results if isinstance(r, RateLimited)]
            assert len(ok) == 5 and len(limited) == 3
            assert [m.body for m in await recv_n(bob, 5)] == [b"%d" % i for i in range(5)]
    run(loop, main())


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_bye_right_after_sends_still_gets_every_sack(loop, store, tmp_path):
    # (the memory store answers them in the read itself, the SQLite store
    # after its commit: the BYE waits for that)
    async def main():
        from fastroute import wire
        async with world(tmp_path, store=store) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            futs = [alice.send_nowait("bob@acme", b"%d" % i) for i in range(100)]
            # SENDs and BYE in one frame: the relay must answer the SENDs first
            alice._out.append(wire.bye_op())
            alice._flush()
            assert len(await asyncio.gather(*futs)) == 100
            assert len(await recv_n(bob, 100)) == 100
    run(loop, main())


def test_second_connection_of_a_device_replaces_the_first(loop, tmp_path):
    async def main():
        from fastroute.errors import AuthError
        async with world(tmp_path) as w:
            kp, cred = w.credential("alice@home", "phone")
            from fastroute import Client
            first = await Client.connect("127.0.0.1", w.port, credential=cred, static=kp)
            second = await Client.connect("127.0.0.1", w.port, credential=cred, static=kp)
            with pytest.raises(AuthError) as err:
                await asyncio.wait_for(first.recv(), 5)
            assert err.value.code == ErrorCode.SESSION_REPLACED
            await second.ping()
            await second.close()
    run(loop, main())


def test_send_many_one_future_for_a_batch_and_typed_refusal(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            bodies = [b"%05d" % i for i in range(5000)]
            ids = await alice.send_many("bob@acme", bodies)
            assert len(ids) == len(set(ids)) == 5000
            got = await recv_n(bob, 5000)
            assert [m.body for m in got] == bodies
            assert [m.id for m in got] == ids
            with pytest.raises(UnknownAddress) as err:
                await alice.send_many("nobody@acme", [b"a", b"b"])
            assert len(err.value.ids) == 2
            with pytest.raises(BodyTooLarge):
                alice.send_many("bob@acme", [b"ok", b"x" * 61441])
            assert await alice.send_many("bob@acme", []) == []
    run(loop, main())


def test_third_party_messages_need_the_recipients_opt_in(loop, tmp_path):
    async def main():
        from fastroute.errors import ConsentRequired
        async with world(tmp_path, require_consent=True) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            carol = await w.connect("carol@home")
            # same provider: no opt-in needed
            await carol.send("alice@home", b"hi")
            # another provider's user: refused, with its code, and not delivered
            with pytest.raises(ConsentRequired) as err:
                await bob.send("alice@home", b"spam?")
            assert err.value.code == ErrorCode.CONSENT_REQUIRED
            with pytest.raises(ConsentRequired):
                await bob.send("alice@home", b"typing", ephemeral=True)
            assert [m.body for m in await recv_n(alice, 1)] == [b"hi"]
            assert await nothing_arrives(alice)
            await alice.set_consent("acme")
            await bob.send("alice@home", b"hello")
            assert [m.body for m in await recv_n(alice, 1)] == [b"hello"]
            await alice.set_consent("acme", allow=False)
            with pytest.raises(ConsentRequired):
                await bob.send("alice@home", b"again")
            await alice.set_consent("*")  # every other provider
            await bob.send("alice@home", b"star")
            assert [m.body for m in await recv_n(alice, 1)] == [b"star"]
            data_dir, keys = w.data_dir, w.keys
        # the opt-in is durable: a restarted relay still honours it
        relay = Relay(RelayConfig(port=0, data_dir=data_dir, require_consent=True))
        await relay.start()
        try:
            from relayutil import World
            w2 = World(relay, data_dir, keys)
            alice = await w2.connect("alice@home")
            bob = await w2.connect("bob@acme")
            await bob.send("alice@home", b"after restart")
            assert [m.body for m in await recv_n(alice, 1)] == [b"after restart"]
            # and bob never opted in to home's users
            with pytest.raises(ConsentRequired):
                await alice.send("bob@acme", b"x")
            for c in w2.clients:
                await c.close()
        finally:
            await relay.close()
    run(loop, main())


def test_attachment_travels_out_of_band_and_only_its_reference_in_the_message(loop, tmp_path):
    async def main():
        import hashlib

        from fastroute import wire
        from fastroute.errors import BlobMismatch, UnknownBlob
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            photo = os.urandom(200_000)  # stands for a client-encrypted file
            blob_id = await alice.upload(photo)
            assert blob_id == hashlib.sha256(photo).digest()
            # the message carries the reference (and, end to end, its key)
            await alice.send("bob@acme", b"attachment:" + blob_id)
            msg = (await recv_n(bob, 1))[0]
            assert await bob.download(msg.body[len(b"attachment:"):]) == photo
            # the same content uploaded again is the same blob
            assert await bob.upload(photo) == blob_id
            with pytest.raises(UnknownBlob):
                await bob.download(hashlib.sha256(b"never uploaded").digest())
            # an upload whose bytes do not match the declared hash leaves nothing
            upload, chunk = await alice._media_call(wire.mbegin_op, 10, bytes(32))
            await alice._media_call(wire.mchunk_op, upload, 0, b"0123456789")
            with pytest.raises(BlobMismatch):
                await alice._media_call(wire.mfinish_op, upload)
            assert w.relay.media.stats()["blobs"] == 1
    run(loop, main())


def test_close_waits_for_unacked_batches_then_says_bye(loop, tmp_path):
    # close() lets the relay answer what is in flight, send_many batches too
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            fut = alice.send_many("bob@acme", [b"%d" % i for i in range(300)])
            single = alice.send_nowait("bob@acme", b"single")
            await alice.close()
            assert len(fut.result()) == 300 and single.result()
            got = await recv_n(bob, 301)
            assert got[-1].body == b"single"
    run(loop, main())


def test_reconnect_resends_unacked_sends_and_each_arrives_once(loop, tmp_path):
    # The link drops while the relay cannot commit (a lock on its store):
    # the client reconnects by itself and resends every unacked id, batches
    # and single sends, in order; the relay's dedup window and the store make
    # that deliver each message exactly once.
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home", reconnect=True)
            bob = await w.connect("bob@acme")
            lock = sqlite3.connect(os.path.join(w.data_dir, "store.db"), isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")  # the relay's writer cannot commit now
            try:
                first = alice.send_many("bob@acme", [b"a%d" % i for i in range(200)])
                single = alice.send_nowait("bob@acme", b"single")
                second = alice.send_many("bob@acme", [b"b%d" % i for i in range(3)])
                await asyncio.sleep(0.2)
                assert not first.done() and alice.unacked_sends == 204
                alice._proto.transport.abort()  # the link drops, nothing acked
                await asyncio.sleep(0.3)  # the client is back (and has resent)
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            ids = await asyncio.wait_for(first, 10)
            assert await asyncio.wait_for(single, 10)
            assert len(await asyncio.wait_for(second, 10)) == 3
            got = await recv_n(bob, 204)
            assert [m.body for m in got] == ([b"a%d" % i for i in range(200)] + [b"single"]
                                             + [b"b%d" % i for i in range(3)])
            assert [m.id for m in got[:200]] == ids
            assert await nothing_arrives(bob)
            assert alice.unacked_sends == 0
    run(loop, main())
