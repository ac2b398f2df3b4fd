"""When each message of a replay is due, and an open-loop driver that sends on time.

:class:`Schedule` maps trace offsets to send times at a chosen speed.
:func:`run_open_loop` sends each message when it is due and never waits for
acks (open loop), so a slow relay cannot slow the offered load down: if the
driver falls behind it sends late but keeps the *scheduled* time, and the
latency of a late message is measured from when it should have left
(coordinated-omission correction, as wrk2 does).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Iterator, Optional, Sequence

from ..errors import InvalidArgument
from .trace import TraceRecord

__all__ = ["Schedule", "LoopStats", "BatchItem", "run_open_loop"]

#: One message handed to ``send_fn``: (message index, record, scheduled time on the clock).
BatchItem = tuple[int, TraceRecord, float]


class Schedule:
    """The records of a trace and the time each one is due.

    ``speed`` is a replay factor (``10.0`` plays 10 trace seconds per wall
    second) or ``None`` for "as fast as possible".  Times are relative to the
    first record, so a trace that starts at a large offset begins at once.

    Iterating yields ``(scheduled_time_relative_s, record, message_index)`` in
    trace order; ``message_index`` is the record's position (0-based) and is the
    index the :class:`~fastroute.loadtest.accounting.Accountant` uses.  With
    ``speed=None`` every scheduled time is ``0.0``: everything is due at once and
    :func:`run_open_loop` measures from the actual send time instead.
    """

    __slots__ = ("records", "speed", "_t0")

    def __init__(self, records: Iterable[TraceRecord], speed: float | None = 1.0) -> None:
        if speed is not None:
            if isinstance(speed, bool) or not isinstance(speed, (int, float)) \
                    or not math.isfinite(speed) or speed <= 0:
                raise InvalidArgument("speed must be a positive finite number or None")
            speed = float(speed)
        #: The records, indexable by message index (a receiver looks recipients up here).
        self.records: Sequence[TraceRecord] = records if isinstance(records, (list, tuple)) \
            else list(records)
        #: The replay factor, or None for as fast as possible.
        self.speed = speed
        self._t0 = self.records[0].offset_us if self.records else 0

    def __len__(self) -> int:
        return len(self.records)

    def time_of(self, index: int) -> float:
        """Scheduled time (seconds from the run start) of message ``index``."""
        if self.speed is None:
            return 0.0
        return (self.records[index].offset_us - self._t0) / 1e6 / self.speed

    def __iter__(self) -> Iterator[tuple[float, TraceRecord, int]]:
        if self.speed is None:
            for i, rec in enumerate(self.records):
                yield 0.0, rec, i
            return
        t0 = self._t0
        scale = 1e6 * self.speed
        for i, rec in enumerate(self.records):
            yield (rec.offset_us - t0) / scale, rec, i

    @property
    def duration_s(self) -> float:
        """Wall seconds from the first to the last scheduled send (0.0 when unpaced)."""
        return self.time_of(len(self.records) - 1) if self.records else 0.0

    @property
    def scheduled_rate(self) -> float | None:
        """Mean offered load in messages per second, or None if it is unbounded."""
        d = self.duration_s
        if self.speed is None or d <= 0:
            return None
        return (len(self.records) - 1) / d

    def deliveries(self, devices_per_user: int = 1) -> int:
        """Number of (message, recipient device) deliveries the whole schedule expects."""
        return devices_per_user * sum(len(r.recipients) for r in self.records)


@dataclass
class LoopStats:
    """What :func:`run_open_loop` achieved, updated as it runs.

    Times are seconds on the driver's clock; ``start`` is the clock value at
    which the schedule's time 0 was placed.  A message's *lag* is how late it
    left (actual send time minus scheduled time).
    """

    paced: bool = True
    start: float = 0.0
    n_sent: int = 0
    batches: int = 0
    largest_batch: int = 0
    first_sched: float | None = None
    last_sched: float | None = None
    first_send: float | None = None
    last_send: float | None = None
    max_lag_s: float = 0.0
    lag_sum_s: float = 0.0
    #: messages that left more than ``lag_tolerance_s`` late
    late: int = 0
    lag_tolerance_s: float = 0.010
    finished: bool = False

    @property
    def scheduled_rate(self) -> float | None:
        """Offered rate (messages/s) over the scheduled span, None if unpaced or too short."""
        if not self.paced or self.n_sent < 2 or self.last_sched == self.first_sched:
            return None
        return (self.n_sent - 1) / (self.last_sched - self.first_sched)

    @property
    def achieved_rate(self) -> float | None:
        """Sending rate (messages/s) over the actual span, None if too short to tell."""
        if self.n_sent < 2 or self.last_send == self.first_send:
            return None
        return (self.n_sent - 1) / (self.last_send - self.first_send)

    @property
    def mean_lag_s(self) -> float:
        """Mean lag per message (0.0 before any message)."""
        return self.lag_sum_s / self.n_sent if self.n_sent else 0.0

    @property
    def generator_bound(self) -> bool:
        """True if the load generator fell behind its schedule.

        More than 1% of messages left more than ``lag_tolerance_s`` late: the
        offered load was then lower than the trace's, and the results describe
        the driver as much as the relay.  Always False when unpaced.
        """
        return self.paced and self.n_sent > 0 and self.late > 0.01 * self.n_sent


SendFn = Callable[[list[BatchItem]], Optional[Awaitable[None]]]


async def run_open_loop(schedule: Schedule, send_fn: SendFn, *,
                        clock: Callable[[], float] = time.perf_counter,
                        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                        accountant=None,
                        fanout: Callable[[TraceRecord], int] | None = None,
                        max_batch: int = 1024,
                        lag_tolerance_s: float = 0.010,
                        stats: LoopStats | None = None) -> LoopStats:
    """Send every message of ``schedule`` at its scheduled time, without waiting for acks.

    ``send_fn(batch)`` receives a list of ``(index, record, t_sched)`` items that
    are due now (``t_sched`` is the scheduled time on ``clock``), at most
    ``max_batch`` at a time; it may be a plain function or return an awaitable
    (awaited before the next batch: time spent there shows up as lag, never
    hides latency).  An exception from ``send_fn`` ends the run; per-message
    failures should be reported to the accountant as refusals instead.

    Unpaced (``speed=None``) batches go out back to back and ``t_sched`` is the
    batch's actual send time (there is no schedule to be late for).

    When ``accountant`` is given, each message is reported as
    ``accountant.scheduled(index, t_sched, fanout(record), ephemeral=...)`` and
    ``accountant.sent(index, now)`` just before ``send_fn`` is called, so the
    driver can build bodies with ``accountant.make_body``; ``fanout`` counts
    the recipient devices of a record (default: one per recipient).  The
    accountant also gets the loop statistics (``accountant.loop_stats``).

    ``clock`` and ``sleep`` are injectable for deterministic tests.  Returns
    the :class:`LoopStats` (also filled in place in ``stats`` if given, so a
    cancelled run still leaves its numbers behind).
    """
    if type(max_batch) is not int or max_batch < 1:
        raise InvalidArgument("max_batch must be a positive int")
    st = stats if stats is not None else LoopStats()
    st.paced = schedule.speed is not None
    st.lag_tolerance_s = lag_tolerance_s
    if accountant is not None:
        accountant.loop_stats = st
    count = fanout or (lambda rec: len(rec.recipients))
    it = iter(schedule)
    nxt = next(it, None)
    st.start = start = clock()
    if accountant is not None:
        accountant.start(start)

    async def issue(batch: list[BatchItem], now: float) -> None:
        # "sent" is stamped before send_fn runs: time spent inside it (encrypting,
        # awaiting a drain) is then charged to the relay path, whose latency is
        # measured from the scheduled time anyway, not hidden as driver lag
        if accountant is not None:
            for idx, rec, t_sched in batch:
                accountant.scheduled(idx, t_sched, count(rec), ephemeral=rec.cls == "e")
                accountant.sent(idx, now)
        if st.first_send is None:
            st.first_send = now
            st.first_sched = batch[0][2]
        st.last_send = now
        st.last_sched = batch[-1][2]
        st.n_sent += len(batch)
        st.batches += 1
        st.largest_batch = max(st.largest_batch, len(batch))
        res = send_fn(batch)
        if inspect.isawaitable(res):
            await res

    if not st.paced:
        while nxt is not None:
            now = clock()
            batch = []
            while nxt is not None and len(batch) < max_batch:
                batch.append((nxt[2], nxt[1], now))
                nxt = next(it, None)
            await issue(batch, now)
            await sleep(0)  # let acks and deliveries in between bursts
        st.finished = True
        return st

    while nxt is not None:
        now = clock()
        due = start + nxt[0]
        if due > now:
            # sleep() may wake a hair early on a coarser clock: loop and check
            # again rather than send before the scheduled time
            await sleep(due - now)
            continue
        batch = []
        while nxt is not None and len(batch) < max_batch:
            due = start + nxt[0]
            if due > now:
                break
            lag = now - due
            st.lag_sum_s += lag
            if lag > st.max_lag_s:
                st.max_lag_s = lag
            if lag > lag_tolerance_s:
                st.late += 1
            batch.append((nxt[2], nxt[1], due))
            nxt = next(it, None)
        await issue(batch, now)
        if nxt is not None and start + nxt[0] <= clock():
            await sleep(0)  # behind schedule: still let the receivers run
    st.finished = True
    return st
