"""The integrity gate's token buckets (the dedup window: tests/test_dedup.py)."""

from __future__ import annotations

import random

import pytest

import fastroute
from fastroute.relay import gate
from fastroute.relay.gate import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_refuses_without_charging_and_refills_at_rate():
    clk = Clock()
    b = TokenBucket(rate=2.0, burst=3.0, clock=clk)
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    assert not b.take(0.5)  # nothing was charged by the refusals: still empty
    clk.t += 1.0
    assert b.take(2.0) and not b.take(0.1)
    clk.t += 100.0
    assert b.refill() == 3.0  # never above the burst


@pytest.mark.parametrize("cls", [gate.PyTokenBucket, TokenBucket], ids=["py", "in-use"])
def test_a_bucket_on_the_default_clock_reads_time_monotonic(cls):
    # the compiled bucket reads that clock in C: the same clock, the same
    # seconds (a stamp between two readings of time.monotonic around it)
    import time

    b = cls(rate=1e6, burst=1e12)
    for _ in range(200):
        b.tokens = 0.0
        before = time.monotonic()
        b.stamp = before
        got = b.refill()
        after = time.monotonic()
        assert before <= b.stamp <= after
        assert got == (b.stamp - before) * 1e6 >= 0.0


def _bucket_run(cls, take_upto, give_back, take_all, seed: int, least=gate.py_least) -> list:
    """A random life of three buckets (one unlimited, as the gate's provider
    layer without a quota) on a test clock: every answer and state."""
    rng = random.Random(seed)
    clk = Clock()
    bs = (cls(2.0, 3.0, clk), cls(1000.0, 20000.0, clk), cls(1e18, 1e18, clk))
    out: list = []
    for _ in range(300):
        step = rng.randrange(8)
        if step == 0:
            clk.t += rng.choice([0.0, 0.001, 0.37, 1.0, 50.0])
        elif step == 1:
            b = rng.choice(bs)
            out.append(("take", b.take(rng.choice([0.5, 1.0, 2.0, 3.5]))))
        elif step == 2:
            out.append(("upto", take_upto(rng.choice([bs, bs[:2], bs[1:]]),
                                          rng.choice([0, 1, 5, 64, 30000]))))
        elif step == 3:
            give_back(rng.choice([bs, bs[:1]]), rng.choice([1, 2.5, 100]))
        elif step == 4:
            out.append(("all", take_all(rng.choice([bs, bs[1:]]), rng.choice([1.0, 4.0]))))
        elif step == 5:
            b = rng.choice(bs[:2])
            b.rate, b.burst = rng.choice([(2.0, 3.0), (0.5, 10.0), (2000.0, 5.0)])
        elif step == 6:
            out.append(("refill", [b.refill() for b in bs]))
        else:
            out.append(("least", least(rng.choice([bs, bs[:2], bs[1:], bs[:1]]))))
        out.append([(b.tokens, b.stamp, b.rate, b.burst) for b in bs])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_token_bucket_twins_answer_alike(seed):
    # the compiled bucket and helpers (what every read of a link calls) against
    # their specifications, float for float
    want = _bucket_run(gate.PyTokenBucket, gate.py_take_upto, gate.py_give_back,
                       gate.py_take_all, seed)
    if fastroute.COMPILED:
        assert gate.TokenBucket is not gate.PyTokenBucket
        assert _bucket_run(gate.TokenBucket, gate.take_upto, gate.give_back,
                           gate.take_all, seed, gate.least) == want
    # the helpers on a mixture of both kinds of bucket: the same again
    pick = random.Random(seed).random
    mixed = _bucket_run(lambda *a: (gate.PyTokenBucket if pick() < 0.5 else gate.TokenBucket)(*a),
                        gate.take_upto, gate.give_back, gate.take_all, seed, gate.least)
    assert mixed == want
    for fn in {gate.least, gate.py_least}:
        with pytest.raises(ValueError):
            fn(())
