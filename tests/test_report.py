"""The replay report: report.json fields and types, report.png, summary, exit status."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib

import pytest

from fastroute.errors import ErrorCode
from fastroute.loadtest.accounting import Accountant
from fastroute.loadtest.report import (
    REPORT_FORMAT,
    build_report,
    exit_status,
    summary_text,
    write_report,
)
from fastroute.loadtest.schedule import Schedule, run_open_loop
from fastroute.loadtest.trace import synthetic

INT_FIELDS = ("scheduled", "sent", "acked", "delivered", "lost", "duplicates", "unacked",
              "expected_deliveries", "missing_deliveries", "ephemeral_dropped", "unexpected",
              "corrupt", "padded", "duplicate_acks", "refused_total")
PCT_FIELDS = ("p50", "p90", "p99", "p99_9", "max")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, dt: float) -> None:
        self.now += dt


def replay(n=300, *, drop=(), dup=(), refuse=None, speed=20.0):
    """A synthetic trace through an in-memory relay that answers in 1-5 ms."""
    records = list(synthetic(40, n, duration_s=60, seed=5))
    clock = FakeClock()
    acc = Accountant(len(records))
    refuse = refuse or {}

    def send(batch):
        for idx, r, _ in batch:
            now = clock()
            if idx in refuse:
                acc.acked(idx, now + 0.001, refuse[idx])
                continue
            acc.acked(idx, now + 0.001 + (idx % 3) * 0.001, 0)
            if idx in drop:
                continue
            body = acc.make_body(idx, r.size)
            for slot in range(len(r.recipients)):
                for _ in range(2 if idx in dup else 1):
                    acc.on_deliver(acc.message_id(idx), body, slot,
                                   now + 0.002 + (idx % 4) * 0.001)

    asyncio.run(run_open_loop(Schedule(records, speed), send, clock=clock, sleep=clock.sleep,
                              accountant=acc))
    return acc


META = {"speed": 20.0, "trace": "synthetic-seed5", "duration_s": 3.0, "processes": 1}


def test_report_fields_and_types():
    acc = replay(drop={10}, dup={11}, refuse={12: ErrorCode.RATE_LIMITED})
    rep = build_report(acc, META)
    assert rep["format"] == REPORT_FORMAT
    for k in INT_FIELDS:
        assert type(rep[k]) is int, k
    assert rep["lost"] == 1 and rep["duplicates"] == 1
    assert rep["refused"] == {"400": 1}
    for key in ("latency_ms", "ack_latency_ms", "send_lag_ms"):
        for p in PCT_FIELDS:
            assert isinstance(rep[key][p], float), (key, p)
        assert rep[key]["p50"] <= rep[key]["p99"] <= rep[key]["max"]
    assert 2.0 <= rep["latency_ms"]["p50"] <= 5.1
    assert 1.0 <= rep["ack_latency_ms"]["max"] <= 3.1
    tp = rep["throughput"]
    assert tp["interval_s"] == 1.0
    assert sum(tp["sent"]) == rep["sent"] and sum(tp["delivered"]) == rep["delivered"]
    assert len(rep["latency_over_time"]["mean_ms"]) == len(tp["sent"])
    assert isinstance(rep["scheduled_rate"], float) and isinstance(rep["achieved_rate"], float)
    assert rep["generator_bound"] is False
    assert rep["ok"] is False
    assert rep["meta"] == META
    # what build_report returns is exactly what report.json holds
    assert json.loads(json.dumps(rep, allow_nan=False)) == rep


def test_report_of_a_clean_run_is_ok():
    rep = build_report(replay(), {"trace": "t"})
    assert rep["ok"] is True and rep["lost"] == 0 and rep["refused"] == {}
    assert exit_status(rep) == 0
    assert rep["meta"]["speed"] is None and rep["meta"]["trace"] == "t"
    assert "OK" in summary_text(rep)
    assert " speed max " in summary_text(rep)
    # replay passes the word "max" for an unpaced run; it is not a factor
    assert " speed max " in summary_text(build_report(replay(), {"speed": "max"}))
    assert " speed 10.0x " in summary_text(build_report(replay(), {"speed": 10.0}))


def test_exit_status_and_summary_flag_failures():
    rep = build_report(replay(drop={3}, refuse={4: ErrorCode.CONSENT_REQUIRED}), META)
    assert exit_status(rep) == 1
    text = summary_text(rep)
    assert "lost 1" in text and "FAILED" in text
    assert "402 CONSENT_REQUIRED: 1" in text
    assert exit_status(build_report(replay(dup={2}), META)) == 1


def test_generator_bound_is_reported():
    clock = FakeClock()
    records = list(synthetic(10, 50, duration_s=5, seed=1))
    acc = Accountant(len(records))

    def send(batch):
        clock.now += 0.5  # the driver is far slower than the trace

    asyncio.run(run_open_loop(Schedule(records, 1.0), send, clock=clock, sleep=clock.sleep,
                              accountant=acc))
    rep = build_report(acc, META)
    assert rep["generator_bound"] is True
    assert rep["max_lag_ms"] > 100
    assert "fell behind" in summary_text(rep)


def _png_chunks(data: bytes):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_write_report_json_and_png(tmp_path):
    acc = replay(drop={5})
    rep = build_report(acc, META)
    jpath, ppath = write_report(tmp_path / "out", rep, acc)
    assert jpath.name == "report.json" and ppath.name == "report.png"
    assert json.loads(jpath.read_text()) == rep
    chunks = _png_chunks(ppath.read_bytes())
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 100 and height > 100


def test_empty_run_still_reports(tmp_path):
    acc = Accountant(0)
    rep = build_report(acc, None)
    assert rep["scheduled"] == 0 and rep["latency_ms"]["p99"] is None
    assert rep["generator_bound"] is False and rep["ok"] is True
    _, ppath = write_report(tmp_path, rep, acc)
    assert _png_chunks(ppath.read_bytes())[-1][0] == b"IEND"
    assert "scheduled 0" in summary_text(rep)


@pytest.mark.parametrize("speed", [None])
def test_unpaced_run_has_no_scheduled_rate(speed):
    rep = build_report(replay(speed=speed), {"speed": speed})
    assert rep["scheduled_rate"] is None and rep["generator_bound"] is False
    assert "speed max" in summary_text(rep)


def stalled_run(n=700, step=0.01, stall=(3.0, 4.5)):
    """A 7 s run whose deliveries stop for 1.5 s (sends go on), then catch up."""
    from fastroute.loadtest.report import pick_interval

    acc = Accountant(n, interval_s=pick_interval(n * step + 0.01))
    acc.span_s = n * step + 0.01
    acc.start(0.0)
    for idx in range(n):
        t = idx * step
        acc.scheduled(idx, t, 1)
        acc.sent(idx, t)
        acc.acked(idx, t + 0.001, 0)
    for idx in range(n):
        t = idx * step
        t_del = stall[1] + 0.002 + idx * 1e-5 if stall[0] <= t < stall[1] else t + 0.002
        acc.delivered(idx, 0, t_del)
    return acc


def test_short_runs_get_fine_buckets_and_long_runs_coarse_ones():
    from fastroute.loadtest.report import pick_interval

    assert pick_interval(7.0) == 0.05          # 140 points, not 8
    assert pick_interval(0.3) == 0.01
    assert pick_interval(15.0) == 0.1
    assert pick_interval(86400) == 600.0
    for span in (0.05, 1, 7, 60, 3600, 86400):
        assert span / pick_interval(span) <= 200


def test_a_stall_is_shown_not_joined_over(tmp_path):
    from fastroute.loadtest.report import stalls

    acc = stalled_run()
    rep = build_report(acc, {"speed": 1.0, "processes": 2, "trace": "stall", "duration_s": 7.0})
    assert rep["throughput"]["interval_s"] == 0.05
    spans = stalls(rep)
    assert len(spans) == 1
    a, b = spans[0]
    assert 2.95 <= a <= 3.05 and 4.45 <= b <= 4.55
    # the latency line has gaps (null) over the stall, which the plot does not join
    lot = rep["latency_over_time"]["mean_ms"]
    assert all(v is None for v in lot[int(3.05 / 0.05):int(4.45 / 0.05)])
    _, png = write_report(tmp_path, rep, acc)
    assert _png_chunks(png.read_bytes())[-1][0] == b"IEND"
    # a clean run has no stall
    clean = stalled_run(stall=(99.0, 99.0))
    assert stalls(build_report(clean, {})) == []


def test_the_png_summary_box_has_the_figures():
    from fastroute.loadtest.report import _summary_box

    rep = build_report(stalled_run(), {"speed": 1.0, "processes": 2, "duration_s": 7.0})
    text = _summary_box(rep)
    for word in ("p50", "p99 ", "p99.9", "lost 0", "duplicates 0", "speed 1x", "processes 2",
                 "stalls 1", "RESULT OK"):
        assert word in text, word
