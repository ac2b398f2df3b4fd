"""Store throughput: messages per second made durable, SQLite vs memory.

Run with pytest-benchmark (timings on, output shown)::

    pytest benches/bench_store.py --benchmark-enable -s

or as a plain script for a short table without pytest::

    python benches/bench_store.py

Cases, each for ``sqlite`` (WAL, synchronous=NORMAL), ``sqlite-full``
(synchronous=FULL: fsync per commit) and ``memory`` (no durability, the
ceiling):

* ``put_many``: one call of 1000 messages x 100 B bodies, fan-out 1 and 3;
  the time is until the future resolves, i.e. until the batch is committed.
* ``put``: 1000 separate ``put`` calls awaited together, the relay's real path
  (one SEND op -> one put); group commit folds them into few transactions,
  and ``commits_per_10k`` says how few.
* ``ack``: 1000 delivery acks then ``flush``: inbox and message rows deleted.

Runs on uvloop when installed, like the relay.  The figures are for the
machine they run on; the tests never assert on them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

import pytest

from fastroute.store import MemoryStore, SqliteStore

try:
    import uvloop
    new_loop = uvloop.new_event_loop
except ImportError:  # pragma: no cover
    new_loop = asyncio.new_event_loop

N = 1000
BODY = b"\xa5" * 100
CID = bytes(range(16))
T0 = 1_700_000_000_000
IMPLS = ("sqlite", "sqlite-full", "memory")
FANOUTS = (1, 3)


async def _open(impl: str, directory: str):
    if impl == "memory":
        return await MemoryStore.open()
    sync = "FULL" if impl == "sqlite-full" else "NORMAL"
    return await SqliteStore.open(os.path.join(directory, f"{impl}.db"), synchronous=sync)


class Env:
    """A store on its own event loop, with three registered devices."""

    def __init__(self, impl: str, directory: str) -> None:
        self.loop = new_loop()
        self.store = self.loop.run_until_complete(_open(impl, directory))
        self.devs = [self.store.register_device("bob@home", f"d{i}") for i in range(3)]

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def items(self, fanout: int) -> list:
        devs = self.devs[:fanout]
        return [("ann@third", CID, BODY, T0, devs) for _ in range(N)]

    async def put_each(self, fanout: int) -> int:
        store, devs = self.store, self.devs[:fanout]
        before = store.commits
        await asyncio.gather(*[store.put("ann@third", CID, BODY, T0, devs)
                               for _ in range(N)])
        return store.commits - before

    async def ack_all(self, mids: list[int]) -> None:
        for dev in self.devs:
            self.store.ack(dev, mids)
        await self.store.flush()

    def close(self) -> None:
        self.run(self.store.close())
        self.loop.close()


@pytest.fixture(params=IMPLS)
def env(request, tmp_path):
    env = Env(request.param, str(tmp_path))
    env.impl = request.param
    yield env
    env.close()


def _report(benchmark, env: Env, case: str, per_round: int, **extra) -> None:
    stats = getattr(benchmark, "stats", None)
    if not stats:  # --benchmark-disable: the function ran once as a smoke test
        return
    mean = stats.stats.mean
    benchmark.extra_info.update(msgs_per_s=round(per_round / mean),
                                us_per_msg=round(mean / per_round * 1e6, 2), **extra)
    more = "".join(f"  {k}={v}" for k, v in extra.items())
    print(f"\n{case:<18} {env.impl:<12} {per_round / mean:>10,.0f} msg/s "
          f"{mean / per_round * 1e6:>8.2f} us/msg{more}")


@pytest.mark.parametrize("fanout", FANOUTS)
def test_put_many(benchmark, env, fanout):
    benchmark.group = f"put_many 1000x100B fanout={fanout}"
    items = env.items(fanout)
    benchmark.pedantic(lambda: env.run(env.store.put_many(items)),
                       rounds=20, warmup_rounds=2, iterations=1)
    _report(benchmark, env, f"put_many fanout={fanout}", N)


@pytest.mark.parametrize("fanout", FANOUTS)
def test_put_concurrent(benchmark, env, fanout):
    benchmark.group = f"put x1000 concurrent fanout={fanout}"
    commits = []
    benchmark.pedantic(lambda: commits.append(env.run(env.put_each(fanout))),
                       rounds=20, warmup_rounds=2, iterations=1)
    per_10k = round(sum(commits) / (len(commits) * N) * 10_000, 1)
    _report(benchmark, env, f"put fanout={fanout}", N, commits_per_10k=per_10k)


def test_ack(benchmark, env):
    benchmark.group = "ack 1000 x 3 devices + flush"

    def setup():
        return (env.run(env.store.put_many(env.items(3))),), {}
    benchmark.pedantic(lambda mids: env.run(env.ack_all(mids)), setup=setup,
                       rounds=20, iterations=1)
    _report(benchmark, env, "ack fanout=3", N * 3)


def main(rounds: int = 10) -> None:
    """Print a plain table: messages/s made durable, and commits per 10k puts."""
    print(f"{'case':<22}{'store':<13}{'msg/s':>10}{'us/msg':>9}{'commits/10k':>13}")
    with tempfile.TemporaryDirectory() as directory:
        for fanout in FANOUTS:
            for case in ("put_many", "put"):
                for impl in IMPLS:
                    env = Env(impl, directory)
                    items = env.items(fanout)
                    commits = 0
                    t0 = time.perf_counter()
                    for _ in range(rounds):
                        if case == "put_many":
                            env.run(env.store.put_many(items))
                        else:
                            commits += env.run(env.put_each(fanout))
                    dt = time.perf_counter() - t0
                    env.close()
                    if impl != "memory":  # start every case from an empty file
                        os.unlink(os.path.join(directory, f"{impl}.db"))
                    n = rounds * N
                    per_10k = (f"{commits / n * 10_000:.1f}"
                               if case == "put" and impl != "memory" else "-")
                    print(f"{case + f' fanout={fanout}':<22}{impl:<13}{n / dt:>10,.0f}"
                          f"{dt / n * 1e6:>9.2f}{per_10k:>13}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
