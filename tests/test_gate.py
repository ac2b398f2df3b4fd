"""The integrity gate's token buckets (the dedup window: tests/test_dedup.py)."""

from __future__ import annotations

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
