"""End-to-end fastroute 1:1 path: sender client -> relay process -> recipient client.

Run (a few seconds)::

    pytest benches/bench_e2e.py --benchmark-enable --benchmark-columns=mean,min,max,rounds

The relay runs as ``fastroute serve --store memory`` in a subprocess (uvloop,
every rate limit raised), the two clients in the test process on
uvloop.  One round = ``N_MSGS`` sends of 100 B bodies queued with
``send_nowait`` in batches of 256 (``drain`` after each), timed until the
recipient has received them all and the relay has acked every send;
msgs/s = ``N_MSGS`` / mean, also stored in ``extra_info``.  The NATS
comparison lives in ``benches/e2e_compare.py`` (a script, not run here).
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from e2e_compare import FastrouteRelay, fr_receive, body_of, BATCH, RUN_TIMEOUT  # noqa: E402

uvloop = pytest.importorskip("uvloop")

N_MSGS = 3000  # below the relay mailbox capacity (4096): no overflow path
SIZE = 100


@pytest.fixture(scope="module")
def e2e():
    loop = uvloop.new_event_loop()
    relay = FastrouteRelay("memory").start()
    try:
        tx, rx = loop.run_until_complete(relay.pair(1))
        try:
            yield loop, tx, rx[0]
        finally:
            loop.run_until_complete(_close(tx, rx[0]))
    finally:
        relay.stop()
        loop.close()


async def _close(*clients) -> None:
    for c in clients:
        await c.close()


async def _round(tx, rx, n: int) -> None:
    to = rx.address
    recv = asyncio.ensure_future(fr_receive(rx, n, None))
    futs = []
    sent = 0
    while sent < n:
        k = min(BATCH, n - sent)
        for _ in range(k):
            futs.append(tx.send_nowait(to, body_of(SIZE)))
        sent += k
        await tx.drain()
        await asyncio.sleep(0)
    await asyncio.wait_for(recv, RUN_TIMEOUT)
    await asyncio.wait_for(asyncio.gather(*futs), RUN_TIMEOUT)


def test_e2e_1to1_100B(benchmark, e2e):
    loop, tx, rx = e2e
    benchmark.pedantic(lambda: loop.run_until_complete(_round(tx, rx, N_MSGS)),
                       rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["msgs_per_s"] = round(N_MSGS / benchmark.stats.stats.mean)
