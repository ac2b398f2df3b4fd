"""Replay scheduling (open loop) and per-message accounting against a relay double."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest

from fastroute.errors import ErrorCode, InvalidArgument
from fastroute.loadtest.accounting import (
    HEADER_SIZE,
    ID_SIZE,
    MIN_BODY,
    Accountant,
    parse_body,
)
from fastroute.loadtest.schedule import Schedule, run_open_loop
from fastroute.loadtest.trace import TraceRecord


class FakeClock:
    """A clock that only moves when the code under test sleeps (or a test says so)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, dt: float) -> None:
        self.sleeps.append(dt)
        self.now += dt


def rec(offset_us: int, sender: str = "a", recipients=("b",), size: int = 100,
        cls: str = "p") -> TraceRecord:
    return TraceRecord(offset_us, sender, tuple(recipients), size, cls)


TRACE = [rec(0), rec(0, "c"), rec(1_000_000), rec(2_500_000), rec(2_500_000, "d"),
         rec(4_000_000)]


# ---------------------------------------------------------------- schedule

def test_schedule_times_are_relative_and_scaled():
    recs = [rec(5_000_000), rec(6_000_000), rec(9_000_000)]
    s = Schedule(recs, speed=2.0)
    assert [(t, i) for t, _, i in s] == [(0.0, 0), (0.5, 1), (2.0, 2)]
    assert s.time_of(2) == 2.0 and s.duration_s == 2.0 and len(s) == 3
    assert s.scheduled_rate == 1.0
    unpaced = Schedule(iter(recs), speed=None)
    assert [t for t, _, _ in unpaced] == [0.0, 0.0, 0.0]
    assert unpaced.scheduled_rate is None
    assert Schedule([rec(0, recipients=("b", "c"))]).deliveries(devices_per_user=2) == 4


@pytest.mark.parametrize("speed", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_schedule_rejects_bad_speed(speed):
    with pytest.raises(InvalidArgument):
        Schedule([rec(0)], speed=speed)


def test_open_loop_sends_at_scheduled_offsets_in_batches():
    clock = FakeClock()
    sent: list[tuple[float, list[int], list[float]]] = []

    def send(batch):
        sent.append((clock(), [i for i, _, _ in batch], [t for _, _, t in batch]))

    st = asyncio.run(run_open_loop(Schedule(TRACE, speed=2.0), send, clock=clock,
                                   sleep=clock.sleep))
    # offsets / 2 after the start at t=100; equal offsets share one batch
    assert sent == [(100.0, [0, 1], [100.0, 100.0]), (100.5, [2], [100.5]),
                    (101.25, [3, 4], [101.25, 101.25]), (102.0, [5], [102.0])]
    assert st.n_sent == 6 and st.batches == 4 and st.largest_batch == 2
    assert st.max_lag_s == 0.0 and not st.generator_bound and st.finished
    assert st.scheduled_rate == pytest.approx(5 / 2.0)
    assert st.achieved_rate == pytest.approx(5 / 2.0)


def test_open_loop_batches_are_bounded():
    clock = FakeClock()
    sizes = []
    asyncio.run(run_open_loop(Schedule([rec(0)] * 10, speed=1.0),
                              lambda b: sizes.append(len(b)), clock=clock, sleep=clock.sleep,
                              max_batch=4))
    assert sizes == [4, 4, 2]


def test_open_loop_falls_behind_but_keeps_scheduled_times():
    clock = FakeClock(0.0)
    seen = []

    async def slow_send(batch):
        seen.append((clock(), [(i, t) for i, _, t in batch]))
        if batch[0][0] == 0:
            clock.now += 3.0  # a 3 s stall in the driver: open loop does not wait it out

    st = asyncio.run(run_open_loop(Schedule(TRACE, speed=1.0), slow_send, clock=clock,
                                   sleep=clock.sleep))
    # after the stall everything due is sent at once, with its original time
    assert seen[1] == (3.0, [(2, 1.0), (3, 2.5), (4, 2.5)])
    assert seen[2] == (4.0, [(5, 4.0)])
    assert st.max_lag_s == pytest.approx(2.0)
    assert st.late == 3 and st.generator_bound


def test_open_loop_unpaced_uses_actual_send_time():
    clock = FakeClock(5.0)
    seen = []

    def send(batch):
        seen.append([t for _, _, t in batch])
        clock.now += 1.0

    st = asyncio.run(run_open_loop(Schedule(TRACE, speed=None), send, clock=clock,
                                   sleep=clock.sleep, max_batch=4))
    assert seen == [[5.0] * 4, [6.0] * 2]
    assert st.scheduled_rate is None and not st.generator_bound


def test_open_loop_real_time_order_and_offsets():
    # real clock and sleep: assert order and that nothing leaves early, never speed
    recs = [rec(i * 20_000) for i in range(8)]  # 20 ms apart at speed 1
    stamps = []
    start = []

    def send(batch):
        now = time.perf_counter()
        stamps.extend((i, t, now) for i, _, t in batch)

    async def main():
        start.append(time.perf_counter())
        return await run_open_loop(Schedule(recs, speed=1.0), send)

    st = asyncio.run(main())
    assert [i for i, _, _ in stamps] == list(range(8))
    t_first = stamps[0][1]
    assert t_first >= start[0]
    for i, t_sched, t_sent in stamps:
        assert t_sched == pytest.approx(t_first + i * 0.02, abs=1e-9)
        assert t_sent >= t_sched
    assert st.n_sent == 8


def test_run_with_empty_schedule():
    clock = FakeClock()
    st = asyncio.run(run_open_loop(Schedule([], 1.0), lambda b: None, clock=clock,
                                   sleep=clock.sleep))
    assert st.n_sent == 0 and st.achieved_rate is None and not st.generator_bound


# -------------------------------------------------------------- ids, bodies

def test_ids_and_bodies():
    acc = Accountant(3, nonce=b"N" * 8)
    acc.scheduled(0, 10.0, 1)
    acc.scheduled(2, 10.25, 1)
    mid = acc.message_id(2)
    assert len(mid) == ID_SIZE and mid[:8] == b"N" * 8
    assert acc.index_of(mid) == 2
    assert acc.index_of(b"X" * 8 + mid[8:]) is None        # another run
    assert acc.index_of(acc.nonce + (3).to_bytes(8, "big")) is None  # out of range
    body = acc.make_body(2, 1000)
    assert len(body) == 1000
    assert parse_body(body) == (mid, 2, 250_000_000)       # 0.25 s after t0 = 10.0
    assert acc.make_body(0, 1000)[HEADER_SIZE:] != body[HEADER_SIZE:]
    # sizes below the header are padded and counted
    assert len(acc.make_body(0, 0)) == MIN_BODY
    assert len(acc.make_body(0, MIN_BODY - 1)) == MIN_BODY
    assert len(acc.make_body(0, MIN_BODY)) == MIN_BODY
    assert acc.counts()["padded"] == 2
    with pytest.raises(InvalidArgument):
        acc.make_body(1, 100)  # not scheduled: no time to embed
    with pytest.raises(InvalidArgument):
        parse_body(b"short")


def test_driver_misuse_raises():
    acc = Accountant(2)
    with pytest.raises(InvalidArgument):
        acc.scheduled(2, 0.0, 1)
    acc.scheduled(0, 0.0, 1)
    with pytest.raises(InvalidArgument):
        acc.scheduled(0, 0.0, 1)
    with pytest.raises(InvalidArgument):
        acc.scheduled(1, 0.0, 0)
    with pytest.raises(InvalidArgument):
        acc.sent(1, 0.0)
    acc.sent(0, 0.0)
    with pytest.raises(InvalidArgument):
        acc.sent(0, 0.0)
    with pytest.raises(InvalidArgument):
        Accountant(1, nonce=b"short")


# ------------------------------------------------------------ relay double

class RelayDouble:
    """An in-memory relay: acks after ``ack_s``, delivers to every recipient after
    ``deliver_s``, with injectable faults; deliveries go through body checks."""

    def __init__(self, acc: Accountant, clock: FakeClock, *, ack_s=0.001, deliver_s=0.002,
                 drop=(), duplicate=(), refuse=None, stall_before=None, stall_s=0.0,
                 no_ack=(), devices=1):
        self.acc, self.clock = acc, clock
        self.ack_s, self.deliver_s = ack_s, deliver_s
        self.drop, self.duplicate = set(drop), set(duplicate)
        self.refuse = refuse or {}
        self.stall_before, self.stall_s = stall_before, stall_s
        self.no_ack = set(no_ack)
        self.devices = devices

    def send(self, batch):
        for idx, r, _t_sched in batch:
            if idx == self.stall_before:
                self.clock.now += self.stall_s  # e.g. a GC pause in the driver
            now = self.clock()
            body = self.acc.make_body(idx, r.size)
            mid = self.acc.message_id(idx)
            if idx in self.refuse:
                self.acc.acked(idx, now + self.ack_s, self.refuse[idx])
                continue
            if idx not in self.no_ack:
                self.acc.acked(idx, now + self.ack_s, 0)
            if idx in self.drop:
                continue
            copies = 2 if idx in self.duplicate else 1
            for slot in range(len(r.recipients) * self.devices):
                for _ in range(copies):
                    self.acc.on_deliver(mid, body, slot, now + self.deliver_s)


def run(records, speed=1.0, **faults):
    clock = FakeClock(0.0)
    acc = Accountant(len(records))
    relay = RelayDouble(acc, clock, **faults)
    devices = faults.get("devices", 1)
    asyncio.run(run_open_loop(Schedule(records, speed), relay.send, clock=clock,
                              sleep=clock.sleep, accountant=acc,
                              fanout=lambda r: len(r.recipients) * devices))
    return acc


RECORDS = [rec(i * 100_000, recipients=("b", "c") if i % 5 == 0 else ("b",))
           for i in range(40)]


def test_clean_run_counts_everything_once():
    acc = run(RECORDS, devices=2)
    c = acc.counts()
    expected = 2 * sum(len(r.recipients) for r in RECORDS)
    assert c["scheduled"] == c["sent"] == c["acked"] == 40
    assert c["delivered"] == c["expected_deliveries"] == expected
    assert c["lost"] == c["duplicates"] == c["unacked"] == c["unexpected"] == c["corrupt"] == 0
    assert acc.latency.get_total_count() == expected
    assert acc.latency.get_max_value() == pytest.approx(2000, rel=0.01)   # 2 ms in us
    assert acc.ack_latency.get_max_value() == pytest.approx(1000, rel=0.01)
    assert acc.loop_stats.n_sent == 40


def test_dropped_acked_message_is_lost():
    acc = run(RECORDS, drop={7})
    c = acc.counts()
    assert c["lost"] == 1 and c["missing_deliveries"] == 1
    assert c["acked"] == 40 and c["duplicates"] == 0
    assert acc.lost_indices() == [7]


def test_dropped_group_message_lists_missing_deliveries():
    acc = run(RECORDS, drop={10})  # index 10 has two recipients
    c = acc.counts()
    assert c["lost"] == 1 and c["missing_deliveries"] == 2


def test_duplicated_delivery_is_counted_once_and_flagged():
    acc = run(RECORDS, duplicate={3})
    c = acc.counts()
    assert c["duplicates"] == 1 and c["lost"] == 0
    assert c["delivered"] == c["expected_deliveries"]


def test_refused_codes_are_counted_and_not_lost():
    acc = run(RECORDS, refuse={1: ErrorCode.RATE_LIMITED, 2: ErrorCode.RATE_LIMITED,
                               3: ErrorCode.CONSENT_REQUIRED})
    c = acc.counts()
    assert acc.refused_by_code == {400: 2, 402: 1}
    assert c["refused_total"] == 3 and c["acked"] == 37 and c["lost"] == 0
    # refused messages are not expected anywhere
    assert c["delivered"] == c["expected_deliveries"]


def test_unanswered_message_is_unacked_not_lost():
    acc = run(RECORDS, no_ack={4}, drop={4})
    c = acc.counts()
    assert c["unacked"] == 1 and c["lost"] == 0


def test_ephemeral_drop_is_allowed():
    recs = [rec(0), rec(1000, cls="e"), rec(2000)]
    acc = run(recs, drop={1})
    c = acc.counts()
    assert c["lost"] == 0 and c["ephemeral_dropped"] == 1


def test_latency_is_measured_from_the_scheduled_time():
    # the driver stalls 1 s before sending message 5; the relay is as quick as ever,
    # yet message 5 and those queued behind it show the stall in their latency
    acc = run(RECORDS, stall_before=5, stall_s=1.0)
    assert acc.latency.get_max_value() / 1000 == pytest.approx(1000 + 2, rel=0.01)
    assert acc.ack_latency.get_max_value() / 1000 == pytest.approx(1000 + 1, rel=0.01)
    # message 6 was due at 0.6 s and left when the stall ended at 1.5 s
    assert acc.send_lag.get_max_value() / 1000 == pytest.approx(900, rel=0.01)
    # messages 6..14 were due during the stall (100 ms apart) and left with
    # message 5: each carries the part of the stall it waited through
    assert acc.latency.get_value_at_percentile(50) / 1000 < 10
    lat_ms = sorted(acc.latency.get_value_at_percentile(p) / 1000 for p in (80, 90))
    assert lat_ms[-1] > 100
    assert acc.loop_stats.generator_bound


def test_unexpected_and_corrupt_deliveries():
    acc = Accountant(2, nonce=b"R" * 8)
    acc.scheduled(0, 0.0, 1)
    acc.sent(0, 0.0)
    acc.acked(0, 0.001)
    body = acc.make_body(0, 64)
    mid = acc.message_id(0)
    assert not acc.on_deliver(b"Z" * 16, body, 0, 0.01)          # another run's id
    assert not acc.delivered(0, 1, 0.01)                          # device it was not for
    assert not acc.delivered(1, 0, 0.01)                          # never scheduled
    assert not acc.on_deliver(mid, acc.message_id(1) + body[16:], 0, 0.01)  # mixed body
    tampered = body[:16] + (12345).to_bytes(8, "big") + body[24:]
    assert not acc.on_deliver(mid, tampered, 0, 0.01)             # wrong time
    c = acc.counts()
    assert c["unexpected"] == 3 and c["corrupt"] == 2 and c["lost"] == 1
    assert acc.on_deliver(mid, body, 0, 0.01)
    assert acc.counts()["lost"] == 0


def test_events_may_arrive_in_any_index_order():
    acc = Accountant(3)
    for i, n in ((2, 3), (0, 1), (1, 2)):
        acc.scheduled(i, 0.0, n)
        acc.sent(i, 0.0)
        acc.acked(i, 0.0)
    for i, n in ((1, 2), (2, 3), (0, 1)):
        for s in range(n):
            assert acc.delivered(i, s, 0.1)
    assert not acc.delivered(2, 2, 0.2)
    c = acc.counts()
    assert c["delivered"] == 6 and c["duplicates"] == 1 and c["lost"] == 0


def test_series_bucket_by_interval():
    acc = run(RECORDS)  # 40 messages 100 ms apart: 4 s
    s = acc.series()
    assert sum(s["sent"]) == 40 and sum(s["delivered"]) == acc.counts()["delivered"]
    assert s["sent"][:4] == [10, 10, 10, 10]
    assert len(s["latency_mean_s"]) == len(s["sent"])
    assert s["latency_max_s"][0] == pytest.approx(0.002)


def test_memory_is_flat_per_message():
    n = 50_000
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        acc = Accountant(n)
        for i in range(n):
            acc.scheduled(i, i * 1e-5, 2)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # flat arrays: ~21 bytes a message + 2 bits, plus histograms and a body pool
    assert used < 40 * n + 2_000_000
