"""The integrity gate's building blocks: token buckets and the dedup window."""

from __future__ import annotations

from fastroute.gate import PENDING, DedupWindow, TokenBucket


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


def test_dedup_remembers_results_and_collects_waiters():
    clk = Clock()
    d = DedupWindow(window_s=10.0, max_entries=100, clock=clk)
    assert d.get("a") is None
    d.begin("a")
    assert d.get("a")[0] == PENDING
    d.get("a")[2] = ["waiter"]
    assert d.finish("a", 0) == ["waiter"]
    assert d.get("a")[0] == 0
    clk.t += 11.0
    assert d.get("a") is None  # outside the window: a new message again
    d.finish("b", 7)
    d.forget("b")
    assert d.get("b") is None


def test_dedup_trim_keeps_pending_entries_and_stops():
    clk = Clock()
    d = DedupWindow(window_s=10.0, max_entries=2, clock=clk)
    for k in "abc":
        d.begin(k)  # all pending: nothing may be evicted, and trim must return
    assert set(d.entries) == {"a", "b", "c"}
    d.finish("a", 0)
    d.finish("b", 0)
    d.trim()
    assert len(d.entries) == 2 and "c" in d.entries


def test_dedup_expire_forgets_only_old_decided_entries():
    clk = Clock()
    d = DedupWindow(window_s=10.0, clock=clk)
    d.finish("old", 0)
    d.begin("pending")
    clk.t += 20.0
    d.finish("new", 0)
    assert d.expire() == 1
    assert set(d.entries) == {"pending", "new"}
