"""The integrity gate against hostile clients: budgets, fairness, bounds, abuse rules.

Real relay on loopback, real Noise, real SQLite.  Assertions are counts and
bounds, never timings (the latencies are in ``benches/bench_flood.py``).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

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


PINGS_PER_FRAME = 2000


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
            rss0 = _rss()

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
                    # sends within limits, to another flooder (same provider)
                    sent.append(c.send_many("f0@acme", [b"ok"] * 20))
                    await asyncio.sleep(0)
                    _raw(c, [pings[0]] * PINGS_PER_FRAME)
                    _raw(c, unknown)
                    _raw(c, consents)
                    await asyncio.sleep(0.01)

            t0 = time.monotonic()
            tasks = [asyncio.ensure_future(flood(c, 60)) for c in flooders]
            tasks.append(asyncio.ensure_future(flood(deaf, 200)))
            # the quiet pair: one message at a time, each waiting for its SACK
            n = 100
            for i in range(n):
                await alice.send("bob@home", b"q%d" % i)
            got = await recv_n(bob, n, timeout=30)
            await asyncio.gather(*tasks, return_exceptions=True)
            elapsed = time.monotonic() - t0
            if not deaf._proto.transport.is_closing():
                deaf._proto.transport.resume_reading()  # so it sees its link end
            results = await asyncio.wait_for(asyncio.gather(*sent, return_exceptions=True), 10)
            # some sends within limits went through, past the limits they were refused
            assert any(not isinstance(r, BaseException) for r in results)
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
            assert all(ln.refused_ops > 0 for ln in acme_links[:-1])
            for g in granted:
                assert g <= lim.ops_burst + lim.ops_per_s * elapsed + 1
            assert sum(granted) <= 5000 * 2.0 + 5000 * elapsed + 1
            assert relay.refused[ErrorCode.RATE_LIMITED] > 0
            # refused SENDs to unknown addresses got the consent code (no enumeration)
            assert relay.refused[ErrorCode.CONSENT_REQUIRED] > 0
            # the deaf device was closed with a reason; nothing accepted was lost
            assert relay.refused[ErrorCode.OUTPUT_LIMIT] == 1
            for _ in range(300):
                if "deaf@acme" not in {ln.address for ln in relay.links}:
                    break
                await asyncio.sleep(0.01)
            assert "deaf@acme" not in {ln.address for ln in relay.links}
            # memory: under the configured queue budget plus the output caps
            grown = _rss() - rss0
            assert grown < (8 << 20) + len(acme_links) * lim.max_output_bytes + (48 << 20), grown
            stats = relay.stats()
            assert stats["queued_bytes"] <= 8 << 20
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

    def pending(client, cid):
        fut = client._loop.create_future()
        client._pending[cid] = (fut, b"")
        return fut

    async def main():
        async with world(tmp_path, limits=lim) as w:
            a = await w.connect("alice@home")
            await w.connect("bob@home")
            link = next(iter(ln for ln in w.relay.links if ln.address == "alice@home"))
            # 10 ops of budget: 8 PINGs and a CONSENT, then one SEND
            cid = os.urandom(16)
            fut = pending(a, cid)
            _raw(a, [wire.ping_op(i) for i in range(8)] + [wire.consent_op(cid, "acme", True)])
            assert await fut == cid
            await a.send("bob@home", b"fits")
            assert link.refused_ops == 0
            # the budget is spent: PINGs, CONSENT and SEND are refused with codes
            c2, c3 = os.urandom(16), os.urandom(16)
            f2, f3 = pending(a, c2), pending(a, c3)
            _raw(a, [wire.ping_op(i) for i in range(5)] + [wire.consent_op(c2, "acme", True)]
                 + [wire.send_op(c3, "bob@home", b"over", 0)])
            res = await asyncio.gather(f2, f3, return_exceptions=True)
            assert [getattr(r, "code", None) for r in res] == [ErrorCode.RATE_LIMITED] * 2
            assert link.refused_ops == 5 + 1 + 1
            assert link.ops == 8 + 1 + 1 + 5 + 1 + 1
    run(loop, main())
