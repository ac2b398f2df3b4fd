"""The integrity gate against hostile clients: budgets, fairness, bounds, abuse rules.

Real relay on loopback, real Noise, real SQLite.  Assertions are counts and
bounds, never timings (the latencies are in ``benches/gate_layers.py flood``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time

import pytest

import fastroute
from fastroute import wire
from fastroute.config import Limits
from fastroute.errors import ErrorCode
from fastroute.identity import Registry
from relayutil import LOOPS, recv_n, run, world

pytestmark = pytest.mark.parametrize("loop", LOOPS)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _raw(client, ops: list[bytes]) -> None:
    """Write packed ops on a client's link as they are (a hostile client)."""
    client._write(ops)


def _pending(client, cid: bytes):
    """The future the client resolves with the relay's answer to a raw op ``cid``."""
    fut = client._loop.create_future()
    client._pending[cid] = (fut, b"")
    return fut


PINGS_PER_FRAME = 500


def test_flooding_provider_is_charged_and_cannot_starve_a_quiet_pair(loop, tmp_path):
    lim = Limits(ops_per_s=2000.0, ops_burst=3000.0, msgs_per_s=300.0, msgs_burst=300.0,
                 max_ops_per_turn=256, max_output_bytes=256 * 1024)

    async def main():
        async with world(tmp_path, limits=lim, require_consent=True,
                         queue_memory_bytes=8 << 20) as w:
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                # acme's devices together: 5000 ops/s (the registry is the source)
                reg.add_provider("acme", w.keys["acme"].public_key, provider_ops_per_s=5000)
            await asyncio.sleep(0.2)  # the relay polls the registry
            relay = w.relay
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@home")
            flooders = [await w.connect(f"f{i}@acme") for i in range(6)]
            # one more that never reads what the relay answers
            deaf = await w.connect("deaf@acme")
            links = {ln.address: ln for ln in relay.links}
            acme_links = [links[f.address] for f in flooders] + [links["deaf@acme"]]
            # the dedup windows take their memory as ids land, by design (their
            # index at the first id, then 8 MB ahead of the newest entry):
            # bounded by dedup_max_entries, and counted apart below
            tables = [relay.gate.dedup, relay.keys.dedup, relay.groups.dedup]
            rss0 = _rss()
            windows0 = sum(d.resident() for d in tables)

            loop_ = asyncio.get_running_loop()
            turns: list[int] = []  # flooder ops processed, sampled once per loop turn
            stop = False

            def tick():
                turns.append(sum(ln.ops for ln in acme_links))
                if not stop:
                    loop_.call_soon(tick)

            at_quiet: list[tuple[int, int]] = []  # (turn index, flooder ops) per quiet SEND

            def tap(ts_ms, sender, to, size, cls):
                if sender == "alice@home":
                    at_quiet.append((len(turns), sum(ln.ops for ln in acme_links)))

            relay.add_tap(tap)
            loop_.call_soon(tick)
            pings = [wire.ping_op(1 << 62) for _ in range(PINGS_PER_FRAME)]
            unknown = [wire.send_op(os.urandom(16), f"nobody{i}@home", b"x", 0)
                       for i in range(500)]
            consents = [wire.consent_op(os.urandom(16), "home", True) for _ in range(500)]
            deaf._proto.transport.pause_reading()

            sent: list = []

            async def flood(c, rounds):
                for _ in range(rounds):
                    if c._proto is None or c._proto.transport.is_closing():
                        return
                    if c._proto.transport.get_write_buffer_size() > 1 << 20:
                        # the relay stopped reading this flooder (its budget is
                        # spent): what it would write piles up in this process
                        await asyncio.sleep(0.01)
                        continue
                    # sends within limits, to another flooder (same provider)
                    sent.append(c.send_many("f0@acme", [b"ok"] * 20))
                    await asyncio.sleep(0)
                    for _ in range(16):  # 16 frames in one write: one read for the relay
                        _raw(c, pings)
                    _raw(c, unknown)
                    _raw(c, consents)
                    await asyncio.sleep(0.01)

            async def deafen(c, rounds):
                # refused SENDs: every one is answered, and nothing is read
                for _ in range(rounds):
                    if c._proto.transport.is_closing() or relay.refused.get(
                            ErrorCode.OUTPUT_LIMIT):
                        return
                    if c._proto.transport.get_write_buffer_size() > 1 << 20:
                        await asyncio.sleep(0.01)  # not read by the relay: spent
                        continue
                    for _ in range(4):
                        _raw(c, unknown)
                    await asyncio.sleep(0.01)

            t0 = time.monotonic()
            tasks = [asyncio.ensure_future(flood(c, 60)) for c in flooders]
            tasks.append(asyncio.ensure_future(deafen(deaf, 400)))
            # the quiet pair: one message at a time, each waiting for its SACK
            n = 100
            for i in range(n):
                await alice.send("bob@home", b"q%d" % i)
            got = await recv_n(bob, n, timeout=30)
            await asyncio.gather(*tasks, return_exceptions=True)
            if not deaf._proto.transport.is_closing():
                deaf._proto.transport.resume_reading()  # so it sees its link end
            # some sends within limits went through.  The rest are answered as
            # the flooders' backlogs drain at their op budgets' pace, which this
            # test does not wait for: how much is backlogged (here and in the
            # flooders' own buffers) grows with how fast the relay reads.
            def went_through():
                return any(f.done() and not f.cancelled() and f.exception() is None
                           for f in sent)
            for f in sent:
                f.add_done_callback(lambda f: f.cancelled() or f.exception())
            for _ in range(6000):  # at most 60 s: the test stops by itself
                if went_through():
                    break
                await asyncio.sleep(0.01)
            assert went_through()
            stop = True
            relay.remove_tap(tap)

            # every message of the quiet pair arrived, in order
            assert [m.body for m in got] == [b"q%d" % i for i in range(n)]
            # fairness: in no loop turn did a flooder link process more than
            # its share plus the frame that crossed it, twice (a read and the
            # continuation of an earlier one: uvloop runs call_soon callbacks
            # in the same iteration as the I/O that scheduled them)
            share = 2 * (lim.max_ops_per_turn + PINGS_PER_FRAME)
            per_turn = [b - a for a, b in zip(turns, turns[1:])]
            assert max(per_turn) <= len(acme_links) * share
            # and between two quiet messages, only as many turns' worth of
            # flooder ops as there were turns in between
            for (t1, o1), (t2, o2) in zip(at_quiet, at_quiet[1:]):
                assert o2 - o1 <= (t2 - t1 + 1) * len(acme_links) * share
            flooded = [b - a for (_, a), (_, b) in zip(at_quiet, at_quiet[1:])]
            assert max(flooded) > 0  # the flood really ran between quiet messages

            # charged and refused past the budget, per device and for the provider
            granted = [ln.ops - ln.refused_ops for ln in acme_links]
            elapsed = time.monotonic() - t0  # tokens refill until the counters are read
            assert all(ln.refused_ops > 0 for ln in acme_links[:-1])
            for g in granted:
                assert g <= lim.ops_burst + lim.ops_per_s * elapsed + 1
            assert sum(granted) <= 5000 * 2.0 + 5000 * elapsed + 1
            assert relay.refused[ErrorCode.RATE_LIMITED] > 0
            # refused SENDs to unknown addresses got the consent code (no enumeration)
            assert relay.refused[ErrorCode.CONSENT_REQUIRED] > 0
            # the deaf device cannot make the relay hold more than the output
            # cap for it: its budget bounds what it is answered, and past the
            # cap it is closed with a reason (test_a_client_that_never_reads...)
            deaf_link = links["deaf@acme"]
            assert (relay.refused.get(ErrorCode.OUTPUT_LIMIT) == 1
                    or deaf_link.transport.get_write_buffer_size() <= lim.max_output_bytes)
            # memory: what the relay holds is under the queue budget and the
            # output caps; the process's RSS (clients included: they share this
            # process) grew by less than those, the dedup windows' growth and
            # 192 MiB of churn (unbounded, the same flood grew a relay by 343 MB
            # in 30 s).  The churn is the allocator's: ~100 MB of frames pass
            # through this process, and what glibc keeps of them after they are
            # freed depends on the host.  On a 2-core VM (2026-12-05) the
            # process grew 185-204 MB on uvloop, 141-161 MB with glibc's mmap
            # threshold fixed, 122 MB on asyncio's loop; malloc_trim gave back
            # ~30 MB of it.
            stats = relay.stats()
            assert stats["queued_bytes"] <= 8 << 20
            # (a link past the cap is closing: it is dropped within a second)
            assert all(ln.transport.get_write_buffer_size() <= lim.max_output_bytes
                       or ln.closing for ln in relay.links)
            gc.collect()
            grown = _rss() - rss0
            windows = sum(d.resident() for d in tables) - windows0
            assert grown < ((8 << 20) + len(acme_links) * lim.max_output_bytes + windows
                            + (192 << 20)), (grown, windows)
    run(loop, main())


def test_a_client_that_never_reads_is_closed_with_a_reason(loop, tmp_path):
    lim = Limits(ops_per_s=1e6, ops_burst=1e6, max_output_bytes=65536)

    async def main():
        async with world(tmp_path, limits=lim) as w:
            bob = await w.connect("bob@home")
            deaf = await w.connect("deaf@home")
            # accepted for deaf, but never read nor acked by it
            deaf._proto.transport.pause_reading()
            for i in range(5):
                await bob.send("deaf@home", b"m%d" % i)
            frame_ = [wire.ping_op(1 << 62)] * 5000
            for _ in range(400):
                if w.relay.refused.get(ErrorCode.OUTPUT_LIMIT):
                    break
                _raw(deaf, frame_)
                await asyncio.sleep(0.005)
            assert w.relay.refused[ErrorCode.OUTPUT_LIMIT] == 1
            for _ in range(300):
                if len(w.relay.links) == 1:
                    break
                await asyncio.sleep(0.01)
            assert [ln.address for ln in w.relay.links] == ["bob@home"]
            # nothing accepted was lost: the device gets them on its next connection
            again = await w.connect("deaf@home")
            assert [m.body for m in await recv_n(again, 5)] == [b"m%d" % i for i in range(5)]
    run(loop, main())


def test_op_budget_refuses_pings_consents_and_sends_with_codes(loop, tmp_path):
    lim = Limits(ops_per_s=0.01, ops_burst=10.0)

    async def main():
        async with world(tmp_path, limits=lim) as w:
            a = await w.connect("alice@home")
            await w.connect("bob@home")
            link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
            # 10 ops of budget in one frame of 13 others and a SEND: 8 PINGs, a
            # CONSENT and a PING fit; 2 PINGs, a CONSENT and the SEND are refused
            c1, c2, c3 = (os.urandom(16) for _ in range(3))
            f1, f2, f3 = _pending(a, c1), _pending(a, c2), _pending(a, c3)
            _raw(a, [wire.ping_op(i) for i in range(8)] + [wire.consent_op(c1, "acme", True)]
                 + [wire.ping_op(8 + i) for i in range(3)] + [wire.consent_op(c2, "acme", True)]
                 + [wire.send_op(c3, "bob@home", b"over", 0)])
            res = await asyncio.gather(f1, f2, f3, return_exceptions=True)
            assert res[0] == c1
            assert [getattr(r, "code", None) for r in res[1:]] == [ErrorCode.RATE_LIMITED] * 2
            assert link.refused_ops == 2 + 1 + 1
            assert link.ops == 14
            # spent: the link is not read (not even decrypted) until it refills,
            # so a flood past the budget costs the relay nothing
            c4 = os.urandom(16)
            f4 = _pending(a, c4)
            _raw(a, [wire.send_op(c4, "bob@home", b"later", 0)])
            await asyncio.sleep(0.3)
            assert not f4.done() and link.ops == 14
    run(loop, main())



class _Recorder:
    """Stands in for a client's receiving CipherState and keeps every plaintext."""

    def __init__(self, inner, seen: list) -> None:
        self.inner = inner
        self.seen = seen

    def decrypt(self, msg: bytes) -> bytes:
        plaintext = self.inner.decrypt(msg)
        self.seen.append(plaintext)
        return plaintext


def test_no_enumeration_unknown_and_not_opted_in_answer_the_same_bytes(loop, tmp_path):
    async def main():
        async with world(tmp_path, require_consent=True) as w:
            bob = await w.connect("bob@acme")  # exists, never opted in to home
            await bob.close()
            alice = await w.connect("alice@home")
            seen: list[bytes] = []
            alice._rx = _Recorder(alice._rx, seen)
            cid = os.urandom(16)  # refusals are not remembered: the same id twice
            answers = []
            for to in ("bob@acme", "nobody@acme"):
                seen.clear()
                with pytest.raises(Exception) as err:
                    await alice.send(to, b"probe", id=cid)
                assert err.value.code == ErrorCode.CONSENT_REQUIRED
                answers.append(b"".join(seen))
            assert answers[0] == answers[1] and cid in answers[0]
            # a sender of the address's own provider still learns it is unknown
            carol = await w.connect("carol@acme")
            with pytest.raises(Exception) as err:
                await carol.send("nobody@acme", b"x")
            assert err.value.code == ErrorCode.UNKNOWN_RECIPIENT
    run(loop, main())


def _strangers(relay, names):
    """Make addresses known to the relay (a device registered in its store)."""
    for name in names:
        dkey = relay.store.register_device(name, "phone")
        relay.delivery.known.setdefault(name, []).append(dkey)


def test_new_sender_rule_throttle_quarantine_and_lift(loop, tmp_path, capsys):
    from fastroute.cli import main as cli

    month_ago = int(time.time()) - 30 * 86400

    def setup(reg, keys):
        reg.note_devices([("old@home", "phone", "home", month_ago)])

    async def main():
        async with world(tmp_path, setup=setup) as w:
            gate = w.relay.gate
            strangers = [f"s{i}@home" for i in range(250)]
            _strangers(w.relay, strangers)
            newbie = await w.connect("newbie@home")
            old = await w.connect("old@home")
            assert gate.standing("newbie@home") == "new"
            assert gate.standing("old@home") == "ok"
            # a device registered a moment ago writes to 100 strangers at once: it trips
            res = await asyncio.gather(*(newbie.send_nowait(s, b"hi") for s in strangers[:100]),
                                       return_exceptions=True)
            ok = [r for r in res if isinstance(r, bytes)]
            codes = {getattr(r, "code", None) for r in res if not isinstance(r, bytes)}
            # 20 strangers fit the new-sender bucket; the 80 refusals throttle
            # it at once (5 messages of burst), within the same read
            assert 5 <= len(ok) <= 22 and codes == {ErrorCode.RATE_LIMITED}
            assert gate.standing("newbie@home") == "throttled"
            # an address the relay has known for a month does the same: it does not
            res = await asyncio.gather(*(old.send_nowait(s, b"hi") for s in strangers[:100]))
            assert len(res) == 100
            # nor does a new device that answers people who wrote to it first
            fresh = await w.connect("fresh@home")
            await old.send("fresh@home", b"hello")
            await recv_n(fresh, 1)
            await asyncio.gather(*(fresh.send_nowait("old@home", b"r%d" % i) for i in range(100)))
            assert gate.standing("fresh@home") == "new"
            # the newbie keeps at it: quarantined, and told so
            await asyncio.gather(*(newbie.send_nowait(s, b"hi") for s in strangers[100:]),
                                 return_exceptions=True)
            assert gate.standing("newbie@home") == "quarantined"
            with pytest.raises(Exception) as err:
                await newbie.send("old@home", b"anything")
            assert err.value.code == ErrorCode.QUARANTINED
            # the operator lists it, with the reason, and lifts it
            for _ in range(200):
                if w.relay.registry.quarantined():
                    break
                await asyncio.sleep(0.01)
            capsys.readouterr()
            assert cli(["sender", "quarantined", "--data-dir", w.data_dir]) == 0
            out = capsys.readouterr().out
            assert "newbie@home" in out and "abuse score" in out and "old@home" not in out
            # in a thread: the CLI waits for this relay (on this loop) to confirm
            assert await asyncio.to_thread(
                cli, ["sender", "lift", "newbie@home", "--data-dir", w.data_dir]) == 0
            assert "confirmed by the running relay" in capsys.readouterr().out
            for _ in range(200):
                if gate.standing("newbie@home") != "quarantined":
                    break
                await asyncio.sleep(0.01)
            assert await newbie.send("old@home", b"sorry")
            assert cli(["sender", "lift", "newbie@home", "--data-dir", w.data_dir]) == 1
    run(loop, main())


def test_layered_buckets_and_a_live_provider_limit_change(loop, tmp_path):
    lim = Limits(address_msgs_per_s=0.01, address_msgs_burst=30.0)

    async def main():
        async with world(tmp_path, limits=lim) as w:
            # two devices of one address share the address's bucket
            phone = await w.connect("alice@home", "phone")
            laptop = await w.connect("alice@home", "laptop")
            await w.connect("bob@home")
            a = await asyncio.gather(*(phone.send_nowait("bob@home", b"p") for _ in range(20)),
                                     return_exceptions=True)
            b = await asyncio.gather(*(laptop.send_nowait("bob@home", b"l") for _ in range(20)),
                                     return_exceptions=True)
            assert sum(isinstance(r, bytes) for r in a + b) == 30
            # acme's devices together, set in the registry while they are online
            devs = [await w.connect(f"u{i}@acme") for i in range(3)]
            await w.connect("z@acme")
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.add_provider("acme", w.keys["acme"].public_key, provider_msgs_per_s=5)
            await asyncio.sleep(0.3)  # the relay polls the registry every 0.05 s
            t0 = time.monotonic()
            res = await asyncio.gather(*(d.send_nowait("z@acme", b"x") for d in devs
                                         for _ in range(20)), return_exceptions=True)
            elapsed = time.monotonic() - t0
            ok = sum(isinstance(r, bytes) for r in res)
            # a fresh provider bucket holds provider_burst_s (2) seconds of its rate
            assert 10 <= ok <= 10 + 5 * (elapsed + 0.5) + 1
            assert {r.code for r in res if not isinstance(r, bytes)} == {ErrorCode.RATE_LIMITED}
    run(loop, main())


def test_device_caps_per_address_and_new_devices_per_provider(loop, tmp_path):
    from fastroute.errors import PolicyError

    lim = Limits(max_devices_per_address=2, new_devices_per_provider_per_hour=4)

    async def main():
        async with world(tmp_path, limits=lim) as w:
            await w.connect("alice@home", "a")
            await w.connect("alice@home", "b")
            with pytest.raises(PolicyError) as err:
                await w.connect("alice@home", "c")
            assert err.value.code == ErrorCode.DEVICE_LIMIT
            # a device already seen comes back without counting again
            c = await w.connect("alice@home", "a")
            assert c.address == "alice@home"
            await w.connect("bob@home")
            await w.connect("carol@home")
            with pytest.raises(PolicyError) as err:
                await w.connect("dave@home")
            assert err.value.code == ErrorCode.NEW_DEVICE_LIMIT
            # another provider has its own hourly allowance
            assert (await w.connect("dave@acme")).address == "dave@acme"
    run(loop, main())


def test_header_policy_withholds_the_timestamp_and_never_a_required_field(loop, tmp_path):
    from fastroute import Relay, RelayConfig
    from fastroute.errors import InvalidArgument

    def setup(reg, keys):
        reg.add_provider("acme", keys["acme"].public_key, withhold=["ts_ms"])
        for field in ("from", "id", "device", "group"):
            with pytest.raises(InvalidArgument):
                reg.add_provider("acme", keys["acme"].public_key, withhold=[field])

    async def main():
        async with world(tmp_path, setup=setup) as w:
            alice = await w.connect("alice@home")
            bob = await w.connect("bob@acme")
            mid = await alice.send("bob@acme", b"to acme")
            got = (await recv_n(bob, 1))[0]
            # exactly the withheld field differs: ts_ms is 0, the rest as sent
            assert (got.sender, got.id, got.body, got.ts_ms) == ("alice@home", mid, b"to acme", 0)
            await bob.send("alice@home", b"to home")
            back = (await recv_n(alice, 1))[0]
            assert back.ts_ms > 0 and back.sender == "bob@acme"
            # the policy is cleared in the registry: live links follow
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.add_provider("acme", w.keys["acme"].public_key, withhold=[])
            await asyncio.sleep(0.3)
            await alice.send("bob@acme", b"again")
            assert (await recv_n(bob, 1))[0].ts_ms > 0
            # a policy naming a required field, written past the registry's
            # checks, is refused when loaded: the relay does not start on it
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg._write("UPDATE providers SET withhold = 'from' WHERE name = 'acme'", ())
                with pytest.raises(InvalidArgument):
                    reg.trust()
            data_dir = w.data_dir
        # once the first relay is stopped (it holds the data directory's lock)
        relay = Relay(RelayConfig(port=0, data_dir=data_dir))
        with pytest.raises(InvalidArgument):
            await relay.start()
        await relay.close()
    run(loop, main())


@pytest.mark.parametrize("store", ["sqlite", "memory"])
def test_relay_wide_queue_memory_budget_spills_the_fullest_to_the_store(loop, store, tmp_path):
    # the memory store's mailboxes have no bound of their own but this budget
    budget = 2 << 20

    async def main():
        async with world(tmp_path, queue_memory_bytes=budget, store=store) as w:
            sender = await w.connect("alice@home")
            slow = [await w.connect(f"slow{i}@home") for i in range(3)]
            for c in slow:
                c._proto.transport.pause_reading()
            body = b"x" * 30000
            peak = 0
            for _ in range(10):  # 3 x 100 x 30 KB = 9 MB for devices that do not read
                for c in slow:
                    await sender.send_many(c.address, [body] * 10)
                peak = max(peak, w.relay.delivery.queued_bytes)
            # never more than the budget plus one store batch (10 x 30 KB) per device
            assert peak <= budget + 3 * 10 * 30100
            assert w.relay.delivery.spills > 0
            for c in slow:
                c._proto.transport.resume_reading()
            for c in slow:
                got = await recv_n(c, 100, timeout=30)
                assert len(got) == 100 and all(m.body == body for m in got)
    run(loop, main())


def test_fd_limit_is_raised_to_fit_or_refused_clearly(loop, tmp_path):
    import resource

    from fastroute import Relay, RelayConfig
    from fastroute.errors import FastrouteError
    from fastroute.relay.server import FD_RESERVE, fit_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert fit_fd_limit(100) == 100
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 100 + FD_RESERVE
    if hard != resource.RLIM_INFINITY:
        assert fit_fd_limit(0) == hard - FD_RESERVE
        with pytest.raises(FastrouteError, match="hard limit"):
            fit_fd_limit(hard)

    async def main():
        relay = Relay(RelayConfig(port=0, data_dir=str(tmp_path / "r"),
                                  max_connections=1 << 40))
        with pytest.raises(FastrouteError, match="max_connections"):
            await relay.start()
        await relay.close()
    run(loop, main())


def test_idle_handshakes_cannot_lock_out_legitimate_clients(loop, tmp_path):
    lim = Limits(max_preauth_per_ip=16)

    async def main():
        async with world(tmp_path, limits=lim, max_connections=64, auth_reserve=8) as w:
            idle = []
            refused = 0
            # 5 x 20 idle sockets from 127.0.0.2..6 that never say a word
            for host in range(2, 7):
                for _ in range(20):
                    r, wr = await asyncio.open_connection(
                        "127.0.0.1", w.port, local_addr=(f"127.0.0.{host}", 0))
                    idle.append((r, wr))
            await asyncio.sleep(0.1)
            for r, _ in idle:
                try:
                    if await asyncio.wait_for(r.read(1), 0.01) == b"":
                        refused += 1
                except asyncio.TimeoutError:
                    pass
                except ConnectionError:
                    refused += 1
            stats = w.relay.stats()
            assert stats["handshaking"] <= 64 - 8
            assert refused >= 100 - 5 * 16
            # 14 legitimate clients from 127.0.0.1 all get in
            clients = [await w.connect(f"u{i}@home") for i in range(14)]
            assert all(c.address for c in clients)
            assert w.relay.stats()["refused_connections"] >= refused
            for _, wr in idle:
                wr.close()
    run(loop, main())


def test_repeated_consents_cost_no_registry_write(loop, tmp_path):
    async def main():
        async with world(tmp_path, require_consent=True) as w:
            alice = await w.connect("alice@home")
            writes = []
            reg = w.relay.registry
            orig = reg.set_consent

            def counting(*a, **kw):
                writes.append(a)
                return orig(*a, **kw)

            reg.set_consent = counting
            futs = []
            for _ in range(200):
                cid = os.urandom(16)
                futs.append(_pending(alice, cid))
                _raw(alice, [wire.consent_op(cid, "acme", True)])
            assert all(isinstance(r, bytes) for r in await asyncio.gather(*futs))
            # one write for the change; the repeats wait for it or are no-ops
            assert len(writes) == 1
            n = len(writes)
            cid = os.urandom(16)
            fut = _pending(alice, cid)
            _raw(alice, [wire.consent_op(cid, "acme", True)])
            assert await fut == cid and len(writes) == n
            assert "acme" in w.relay.gate.consent["alice@home"]
    run(loop, main())


def test_opposite_consents_in_flight_end_in_the_last_choice(loop, tmp_path):
    async def main():
        async with world(tmp_path, require_consent=True) as w:
            alice = await w.connect("alice@home")
            writes = []
            reg = w.relay.registry
            orig = reg.set_consent

            def counting(*a, **kw):
                writes.append(a[2])
                return orig(*a, **kw)

            reg.set_consent = counting
            futs, ops = [], []
            for allow in (True, False, True, False, True, False):
                cid = os.urandom(16)
                futs.append(_pending(alice, cid))
                ops.append(wire.consent_op(cid, "acme", allow))
            _raw(alice, ops)
            assert all(isinstance(r, bytes) for r in await asyncio.gather(*futs))
            # the first choice is written, then only the last of the others
            assert writes == [True, False]
            assert "alice@home" not in w.relay.gate.consent
            assert "alice@home" not in reg.consents()
    run(loop, main())


@pytest.mark.parametrize("busy", [False, True], ids=["quiet", "busy"])
def test_a_send_frame_past_the_budget_is_taken_as_it_refills_not_refused(loop, tmp_path, busy,
                                                                          monkeypatch):
    # 300 SENDs in one frame, 50 ops of budget refilling at 400/s: the relay
    # takes the frame in parts (the link unread meanwhile) and refuses none;
    # from a link already past half its budget (busy) the frame is not even
    # decoded whole, and still none is refused
    lim = Limits(ops_per_s=400.0, ops_burst=50.0, msgs_per_s=1e6, msgs_burst=1e6)
    n = 300

    async def main():
        async with world(tmp_path, limits=lim) as w:
            a = await w.connect("alice@home")
            b = await w.connect("bob@home")
            link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
            if busy:
                futs = {t: a._loop.create_future() for t in range(1, 41)}
                a._pings.update(futs)
                _raw(a, [wire.ping_op(t) for t in futs])
                await asyncio.wait_for(asyncio.gather(*futs.values()), 5)
                assert not link.quiet()
            decoded = []
            decode = wire.decode_sends

            def counted(plaintext):
                ops = decode(plaintext)
                decoded.append(-1 if ops is None else len(ops) // 4)  # flat: 4 a SEND
                return ops
            monkeypatch.setattr(wire, "decode_sends", counted)
            refused0 = dict(w.relay.refused)
            ops0 = link.ops
            ids = [os.urandom(16) for _ in range(n)]
            futs = [_pending(a, cid) for cid in ids]
            _raw(a, [wire.send_op(cid, "bob@home", b"m%d" % i, 0) for i, cid in enumerate(ids)])
            await asyncio.sleep(0.05)
            # in parts: far fewer than the frame so far (50 + 400/s x the wait)
            assert link.ops - ops0 < n // 2
            assert await asyncio.wait_for(asyncio.gather(*futs), 10) == ids
            got = await recv_n(b, n)
            assert [m.body for m in got] == [b"m%d" % i for i in range(n)]
            assert link.ops - ops0 == n and link.refused_ops == 0
            assert dict(w.relay.refused) == refused0
            # decoded whole by a quiet link, 32 SENDs at a time by a busy one
            # (when the compiled core can find a frame's ops without decoding it)
            assert wire.UNPACKS_BY_THE_SLICE is fastroute.COMPILED
            assert max(decoded) == (32 if busy and fastroute.COMPILED else n)
    run(loop, main())


def test_a_frame_of_pings_past_the_budget_is_answered_in_order_then_refused(loop, tmp_path):
    # the compiled PING-only path: the first ones get their PONGs, the rest
    # one ERROR, exactly as the generic op loop answers them
    lim = Limits(ops_per_s=0.01, ops_burst=10.0)

    async def main():
        async with world(tmp_path, limits=lim) as w:
            a = await w.connect("alice@home")
            link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
            refused0 = w.relay.refused.get(ErrorCode.RATE_LIMITED, 0)
            futs = {t: a._loop.create_future() for t in range(1, 16)}
            a._pings.update(futs)
            _raw(a, [wire.ping_op(t) for t in range(1, 16)])
            await asyncio.wait_for(asyncio.gather(*(futs[t] for t in range(1, 11))), 5)
            await asyncio.sleep(0.1)
            assert not any(futs[t].done() for t in range(11, 16))
            assert link.ops == 15 and link.refused_ops == 5
            assert w.relay.refused[ErrorCode.RATE_LIMITED] == refused0 + 1
            assert link.wiring.op_counts[int(wire.Op.PING)] >= 15
    run(loop, main())


class _OpsPerTurn:
    """Samples a relay link's op count once per loop iteration until stopped."""

    def __init__(self, link) -> None:
        self.link = link
        self.samples: list[int] = []
        self.running = True
        self.loop = asyncio.get_running_loop()
        self.loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.samples.append(self.link.ops)
        if self.running:
            self.loop.call_soon(self._tick)

    def stop(self) -> list[int]:
        """Stop; the ops processed between samples, where any were."""
        self.running = False
        s = self.samples
        return [b - a for a, b in zip(s, s[1:]) if b != a]


async def _ping_frame_steps(w, n: int, pings_only: bool = False) -> list[int]:
    """alice sends one frame of ``n`` PINGs and a DACK (not PINGs only: the
    precise path, checked and dispatched a share at a time; ``pings_only``:
    no DACK, the compiled PING path); once every PONG came, the ops her link
    processed per loop iteration."""
    a = await w.connect("alice@home")
    link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
    futs = {t: a._loop.create_future() for t in range(1, n + 1)}
    a._pings.update(futs)
    ops0 = link.ops
    turns = _OpsPerTurn(link)
    tail = [] if pings_only else [wire.dack_op(0)]
    _raw(a, [wire.ping_op(t) for t in range(1, n + 1)] + tail)
    await asyncio.wait_for(asyncio.gather(*futs.values()), 10)
    steps = turns.stop()
    assert link.ops == ops0 + n + len(tail)
    return steps


@pytest.mark.parametrize("pings_only", [False, True], ids=["precise", "pings-only"])
def test_a_frame_of_many_ops_is_processed_a_share_per_turn(loop, tmp_path, pings_only):
    # the precise path checks and dispatches the frame's ops a share at a
    # time, and a frame of PINGs only is answered a share at a time too, so
    # one frame cannot hold the loop for more than a share
    lim = Limits(ops_per_s=1e6, ops_burst=1e6, max_ops_per_turn=64)
    n = 600

    async def main():
        async with world(tmp_path, limits=lim) as w:
            steps = await _ping_frame_steps(w, n, pings_only)
            # a share per callback; two callbacks may share a loop iteration
            assert max(steps) <= 2 * lim.max_ops_per_turn
            assert len(steps) >= (n + 1) // (2 * lim.max_ops_per_turn)
    run(loop, main())


def test_a_frame_of_refused_sends_is_processed_a_share_per_turn(loop, tmp_path):
    # a frame of SENDs only takes the compiled fast path; its SENDs too go to
    # the gate a share at a time, so a frame of refusals (each answered with
    # its own SACK) cannot hold the loop for more than a share
    lim = Limits(ops_per_s=1e6, ops_burst=1e6, msgs_per_s=1e6, msgs_burst=1e6,
                 max_ops_per_turn=64)
    n = 600

    async def main():
        async with world(tmp_path, limits=lim) as w:
            a = await w.connect("alice@home")
            link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
            refused0 = sum(w.relay.refused.values())
            ops0 = link.ops
            turns = _OpsPerTurn(link)
            _raw(a, [wire.send_op(i.to_bytes(16, "big"), f"nobody{i}@home", b"x", 0)
                     for i in range(n)])
            for _ in range(500):
                if link.ops >= ops0 + n:
                    break
                await asyncio.sleep(0.01)
            steps = turns.stop()
            assert link.ops == ops0 + n
            # every one refused (unknown, or by the new-sender and abuse rules)
            assert sum(w.relay.refused.values()) == refused0 + n
            assert max(steps) <= 2 * lim.max_ops_per_turn
            assert len(steps) >= n // (2 * lim.max_ops_per_turn)
    run(loop, main())


def test_the_turns_clock_cuts_a_share_of_costly_ops_into_chunks(loop, tmp_path):
    # op counts as good as unbounded: only limits.max_turn_ms can end a turn,
    # and it must, a chunk of ops at a time (a count alone let a share of
    # CONSENTs or refused SENDs hold the loop for a millisecond)
    lim = Limits(ops_per_s=1e6, ops_burst=1e6, max_ops_per_turn=100_000,
                 max_relay_ops_per_turn=1_000_000, max_turn_ms=0.001)
    n = 600

    async def main():
        async with world(tmp_path, limits=lim) as w:
            steps = await _ping_frame_steps(w, n)
            chunk = 32  # link._OPS_CHUNK
            assert max(steps) <= 2 * chunk
            assert len(steps) >= (n + 1) // (2 * chunk)
    run(loop, main())


def test_a_busy_links_pieces_are_sized_by_what_its_ops_cost(loop, tmp_path):
    # a busy link's ops are taken a piece at a time, each piece as many ops
    # as its kind has lately cost a quarter of the turn's slice for (25 us by
    # default): one costly op at a time, cheap PINGs by the chunk (a count
    # alone let a piece of CONSENTs hold the loop for ~0.1 ms, what a quiet
    # client's read then waited behind)
    from fastroute.relay import link as link_mod

    lim = Limits(ops_per_s=1e6, ops_burst=1e6, max_ops_per_turn=100_000,
                 max_relay_ops_per_turn=1_000_000)

    async def main():
        async with world(tmp_path, limits=lim) as w:
            a = await w.connect("alice@home")
            link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
            link.quiet = lambda: False  # as past half its op budget
            gate = link.wiring.gate
            set_consent = gate.set_consent

            def costly(*args):  # a CONSENT costing 0.2 ms
                end = time.perf_counter() + 2e-4
                while time.perf_counter() < end:
                    pass
                return set_consent(*args)

            gate.set_consent = costly
            pieces: list[tuple[str, int]] = []
            dispatch, pings = link._dispatch, link._pings

            def counted_dispatch(ops):
                pieces.append(("ops", len(ops)))
                return dispatch(ops)

            def counted_pings(tokens, start, end):
                pieces.append(("pings", end - start))
                return pings(tokens, start, end)

            link._dispatch, link._pings = counted_dispatch, counted_pings
            n = 24
            acks = [_pending(a, bytes([i]) * 16) for i in range(1, n + 1)]
            _raw(a, [wire.consent_op(bytes([i]) * 16, "acme", True) for i in range(1, n + 1)])
            await asyncio.wait_for(asyncio.gather(*acks), 10)
            ops = [size for kind, size in pieces if kind == "ops"]
            assert sum(ops) == n
            # the first piece before any cost is known, then one op a piece
            assert ops[0] == link_mod._FIRST_PIECE[link_mod._PIECE_OPS]
            assert set(ops[1:]) == {1}
            futs = {t: a._loop.create_future() for t in range(1, 401)}
            a._pings.update(futs)
            _raw(a, [wire.ping_op(t) for t in range(1, 401)])
            await asyncio.wait_for(asyncio.gather(*futs.values()), 10)
            sizes = [size for kind, size in pieces if kind == "pings"]
            assert sum(sizes) == 400
            # a PONG costs well under a microsecond: pieces stay large
            assert max(sizes) == link_mod._OPS_CHUNK
            assert len(sizes) <= 400 // 8
            # the piece follows the slice: ops of 10 us, 2 in 25 us, 25 in 0.25 ms
            link.costs[link_mod._PIECE_OPS] = 1e-5
            assert link._piece(link_mod._PIECE_OPS) == 2
            w.relay.turns.slice = 1e-3
            assert link._piece(link_mod._PIECE_OPS) == 25
    run(loop, main())


def test_a_piece_under_its_time_lets_the_next_grow(loop, tmp_path):
    # a piece's cost per op counts the piece's fixed work too (a stage's
    # setup), which a small piece pays nearly whole: sized by that cost alone,
    # a kind whose fixed work is over half the piece's time (12.5 us of 25)
    # kept whatever small size a slow piece once gave it (one op a piece
    # after a cold first piece: each op then paid the fixed work again).  A
    # piece under its time lets the next take half as many ops more; one over
    # it shrinks the next by the cost.
    from fastroute.relay import link as link_mod

    async def main():
        async with world(tmp_path) as w:
            await w.connect("alice@home")
            link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
            kind = link_mod._PIECE_E2EE
            target = w.relay.turns.slice * link_mod._PIECE_OF_SLICE  # 25 us by default
            fixed, per_op = 0.8 * target, 0.02 * target  # 20 us a piece, 0.5 us an op
            # a cold first piece of one op took twice the target
            link._measured(kind, 1, 2 * target)
            sizes = [link._piece(kind)]
            assert sizes == [1]
            for _ in range(12):
                n = sizes[-1]
                link._measured(kind, n, fixed + n * per_op)
                sizes.append(link._piece(kind))
            # 1, 2, 3, 4, 6, 9, 13 (26.5 us: over), then around what the
            # target holds (10 ops, 25 us): never again the cold piece's one
            # op, none much over the target
            assert sizes[:7] == [1, 2, 3, 4, 6, 9, 13]
            assert min(sizes[6:]) >= 7
            assert max(fixed + n * per_op for n in sizes) <= 1.1 * target
            # a kind whose one op is over the piece's time stays at one op a piece
            heavy = [link._piece(link_mod._PIECE_OPS)]
            for _ in range(5):
                link._measured(link_mod._PIECE_OPS, heavy[-1], heavy[-1] * 8 * target)
                heavy.append(link._piece(link_mod._PIECE_OPS))
            assert heavy[1:] == [1] * 5
    run(loop, main())


def test_the_writer_writes_the_links_with_few_ops_first(loop, tmp_path):
    # a quiet client's delivery does not wait behind the encryption and
    # write of a flooder's thousand replies in the same flush
    async def main():
        async with world(tmp_path) as w:
            clients = [await w.connect(f"u{i}@home") for i in range(10)]
            links = {ln.address: ln for ln in w.relay.links}
            order: list[str] = []
            for ln in links.values():
                def flush(ln=ln, write=ln.flush):
                    if ln.out:
                        order.append(ln.address)
                    write()
                ln.flush = flush
            heavy = {f"u{i}@home" for i in range(0, 10, 2)}
            for address, ln in links.items():
                n = 500 if address in heavy else 1
                ln.out.extend([wire.pong_op(1 << 40)] * n)
                w.relay.delivery.mark(ln)
            await asyncio.sleep(0.05)
            assert len(order) == 10
            assert set(order[5:]) == heavy
            for c in clients:
                await c.close()
    run(loop, main())


def test_the_turns_lengths_are_a_metric(loop, tmp_path):
    # each turn of the fair scheduler is timed: the operator's figure for
    # how long a quiet client's read may wait behind busy ones
    from fastroute.relay.metrics import render_metrics

    lim = Limits(ops_per_s=1e6, ops_burst=1e6, max_ops_per_turn=64)
    n = 600

    async def main():
        async with world(tmp_path, limits=lim) as w:
            turns = w.relay.turns
            count0 = turns.durations.count
            await _ping_frame_steps(w, n)
            # a share of 64 per turn: the frame took several turns
            assert turns.durations.count - count0 >= n // 64 - 1
            text = await render_metrics(w.relay)
            values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                      for line in text.splitlines() if line.startswith("fastroute_loop_turn")}
            assert values["fastroute_loop_turn_duration_seconds_count"] == turns.durations.count
            assert values['fastroute_loop_turn_duration_seconds_bucket{le="+Inf"}'] == \
                turns.durations.count
            assert 0 < values["fastroute_loop_turn_duration_seconds_sum"] < 10
    run(loop, main())


class _FakeLink:
    """What :class:`Turns` calls on a link: quiet() and _next_share()."""

    def __init__(self, name: str, quiet: bool, served: list, turns, ops: int) -> None:
        self.name, self._quiet, self.served, self.turns, self.ops = name, quiet, served, turns, ops

    def quiet(self) -> bool:
        return self._quiet

    def _next_share(self) -> None:
        self.served.append(self.name)
        self.turns.begin()
        self.turns.spend(self.ops)


def test_a_turn_serves_a_quiet_read_first_and_writes_before_busy_links_work(loop):
    from fastroute.relay.link import Turns

    async def main():
        served: list = []
        turns = Turns(100, 1.0, lambda: served.append("write"))
        busy = [_FakeLink(f"busy{i}", False, served, turns, 100) for i in range(3)]
        quiet = _FakeLink("quiet", True, served, turns, 1)
        for link in busy:
            turns.enqueue(link)  # frames left from an earlier share
        turns.enqueue(busy[0], fresh=True)  # a busy link's read that waited
        turns.enqueue(quiet, fresh=True)
        await asyncio.sleep(0)
        # the turn: the writer first; the quiet read, though it came last;
        # the writer again; the busy link's read (the turn has room); then
        # the busy links, while the turn has room (100 ops: one of them)
        assert served[:5] == ["write", "quiet", "write", "busy0", "busy0"]
        served.clear()
        await asyncio.sleep(0)
        # the next turn goes on round robin: a busy link at a time
        assert served[:2] == ["write", "busy1"]
        served.clear()
        # a turn whose clock runs out at once: a busy link's fresh read waits
        # with the busy ones, and gets the one share a turn always gives
        slow = Turns(100, 0.0, lambda: served.append("write"))
        for link in busy + [quiet]:
            link.turns = slow
        slow.fresh.extend([busy[2], quiet])
        slow.armed = True
        slow._turn()
        assert served == ["write", "quiet", "write", "busy2"]
        # the turn's writes count on its clock: past the slice, one busy
        # link's piece and no more, however few ops the links have
        def slow_write():
            served.append("write")
            end = time.perf_counter() + 0.002
            while time.perf_counter() < end:
                pass

        served.clear()
        written = Turns(100, 0.001, slow_write)
        light = [_FakeLink(f"light{i}", False, served, written, 1) for i in range(3)]
        written.queue.extend(light)
        written.armed = True
        written._turn()
        assert served == ["write", "light0"]
        # no busy link waiting: no early write (one write per turn batches more)
        served.clear()
        calm = Turns(100, 1.0, lambda: served.append("write"))
        quiet.turns = calm
        calm.fresh.append(quiet)
        calm.armed = True
        calm._turn()
        assert served == ["quiet"]
    run(loop, main())


def test_offline_devices_budgets_are_pruned_only_once_a_fresh_one_would_equal_them(
        loop, tmp_path):
    # Without pruning, the gate kept buckets and sender records for every
    # device ever seen.  Dropping one must change nothing: only offline, full
    # buckets and spent-out sender records go; a drained bucket stays, so a
    # reconnect does not refill its burst.
    lim = Limits(msgs_per_s=2000.0, msgs_burst=20.0, new_sender_age_s=0.0)

    async def main():
        async with world(tmp_path, limits=lim) as w:
            gate = w.relay.gate
            bob = await w.connect("bob@home")
            calm = await w.connect("calm@home")
            await calm.send("bob@home", b"hi")
            await calm.close()
            drained = await w.connect("drained@home")
            # drain its message bucket (refilling at 2000/s it would be full again
            # in 10 ms: slow this device's refill down), then leave at once
            dkey = ("drained@home", "phone")
            gate._buckets[dkey][0].rate = 0.001
            await asyncio.gather(*(drained.send_nowait("bob@home", b"x") for _ in range(20)),
                                 return_exceptions=True)
            assert gate._buckets[dkey][0].refill() < 1.0
            await drained.close()
            await asyncio.sleep(0.2)
            gate.prune()  # the relay's upkeep may have pruned already: the same rule
            assert ("calm@home", "phone") not in gate._buckets
            assert "calm@home" not in gate._abuckets and "calm@home" not in gate._senders
            # still drained: kept; online: kept
            assert dkey in gate._buckets
            assert ("bob@home", "phone") in gate._buckets and "bob@home" in gate._senders
            # the drained device reconnects: no fresh burst
            again = await w.connect("drained@home")
            assert gate._buckets[dkey][0].tokens < 1.0
            with pytest.raises(Exception) as exc:
                await again.send("bob@home", b"more")
            assert getattr(exc.value, "code", None) == ErrorCode.RATE_LIMITED
            # calm comes back: a record like the one dropped, and it sends
            calm = await w.connect("calm@home")
            await calm.send("bob@home", b"back")
            got = await recv_n(bob, 22)
            assert got[0].body == b"hi" and got[-1].body == b"back"
    run(loop, main())


def test_reads_that_wait_for_nothing_start_no_scheduler_turn(loop, tmp_path):
    # every read arms the next turn (it starts the next count of ops), but a
    # turn with no link waiting is not a scheduler turn: the loop-turn metric
    # stays the turns that served waiting work, and the count is reset
    async def main():
        async with world(tmp_path) as w:
            turns = w.relay.turns
            a = await w.connect("alice@home")
            b = await w.connect("bob@home")
            count0 = turns.durations.count
            for i in range(20):
                await a.send("bob@home", b"m%d" % i)
            assert [m.body for m in await recv_n(b, 20)] == [b"m%d" % i for i in range(20)]
            # the last read's turn (a client's DACK may come a moment later)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if not turns.armed:
                    break
            assert turns.used == 0 and not turns.armed
            assert turns.durations.count == count0
    run(loop, main())


def test_a_link_short_of_a_whole_token_is_not_quiet_and_waits(loop, tmp_path):
    # a quiet link's first frame skips a second look at the op budget: quiet
    # must then mean a token in every bucket, not only half the burst (with
    # a burst under 2 the two differ); a frame read short of a token waits
    # for the refill, and is answered, not refused
    async def main():
        async with world(tmp_path) as w:
            a = await w.connect("alice@home")
            link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
            bucket = link.budgets.ops[0]
            bucket.rate, bucket.burst = 2.0, 1.5
            bucket.refill()
            bucket.tokens = 1.2
            assert link.quiet()
            bucket.refill()
            bucket.tokens = 0.8  # over half the burst, under one token
            assert not link.quiet()
            refused0 = dict(w.relay.refused)
            fut = a._loop.create_future()
            a._pings[7] = fut
            t0 = time.monotonic()
            _raw(a, [wire.ping_op(7)])
            await asyncio.wait_for(fut, 5)
            assert time.monotonic() - t0 > 0.05  # it waited for the refill
            assert dict(w.relay.refused) == refused0
    run(loop, main())
