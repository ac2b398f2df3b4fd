"""Exact per-message accounting of a replay: what was sent, acked, delivered, lost.

The :class:`Accountant` gives each message a 16-byte id (an 8-byte random run
nonce, then the 8-byte big-endian message index) that also opens its body, so a
receiver can tell which message it got and prove the relay did not mix bodies.
It then follows every message through the events the driver reports and
answers, at the end: how many were accepted, how many reached every recipient
device exactly once, how many were lost or duplicated, and with what latency.

Latency is measured from the message's *scheduled* send time (not the moment
the driver managed to send it), so a driver or relay stall is charged to every
message it delayed: the coordinated-omission correction of wrk2.

Memory: state is kept in flat arrays indexed by message (about 25 bytes a
message plus one bit per expected delivery), never one object per message, so
10**6 messages cost tens of megabytes.
"""

from __future__ import annotations

import os
from array import array
from typing import Iterator

from hdrh.histogram import HdrHistogram

from ..errors import InvalidArgument

__all__ = [
    "Accountant",
    "ID_SIZE",
    "NONCE_SIZE",
    "HEADER_SIZE",
    "MIN_BODY",
    "parse_body",
]

#: Bytes of the per-run nonce that opens every message id.
NONCE_SIZE = 8
#: Bytes of a message id (nonce + big-endian index), the wire's ``id bin16``.
ID_SIZE = 16
#: Bytes at the start of every body: the id, then the scheduled time (ns, big-endian).
HEADER_SIZE = ID_SIZE + 8
#: Smallest body the accountant makes; smaller recorded sizes are padded up to it.
MIN_BODY = HEADER_SIZE

# flags per message (one byte each)
_SCHEDULED = 1
_SENT = 2
_ACKED = 4
_REFUSED = 8
_EPHEMERAL = 16

#: Histogram range: 1 us .. 1 hour, 3 significant digits (about 0.1% error).
_HIST_MAX_US = 3_600_000_000
_POOL_SIZE = 1 << 17  # random bytes that bodies are cut from (> 61440 + spread)


def _new_hist() -> HdrHistogram:
    return HdrHistogram(1, _HIST_MAX_US, 3)


def _record(hist: HdrHistogram, seconds: float) -> None:
    # a receive stamped a hair before its schedule (clock granularity) is 1 us;
    # anything beyond the range is clamped rather than silently dropped
    us = int(seconds * 1e6)
    hist.record_value(1 if us < 1 else (_HIST_MAX_US if us > _HIST_MAX_US else us))


def _bump(series: array, bucket: int, value: int = 1) -> None:
    if bucket >= len(series):
        series.extend([0] * (bucket + 1 - len(series)))
    series[bucket] += value


def parse_body(body: bytes) -> tuple[bytes, int, int]:
    """Split an accountant-made body into ``(message_id, index, t_sched_ns)``.

    ``t_sched_ns`` is the scheduled send time in nanoseconds after the run
    start.  Raises :class:`~fastroute.errors.InvalidArgument` if the body is
    shorter than :data:`HEADER_SIZE`.
    """
    if len(body) < HEADER_SIZE:
        raise InvalidArgument(f"body shorter than {HEADER_SIZE} bytes")
    mid = bytes(body[:ID_SIZE])
    return mid, int.from_bytes(mid[NONCE_SIZE:], "big"), int.from_bytes(
        body[ID_SIZE:HEADER_SIZE], "big")


class Accountant:
    """Tracks every message of one replay run and its outcome.

    ``n_messages`` is the number of messages (indices ``0 .. n_messages-1``).
    All times are seconds on the driver's clock (``time.perf_counter`` by
    default; receivers must stamp with the same clock).  ``interval_s`` is the
    width of the time-series buckets.

    Events, in the order a message lives them:

    - ``scheduled(idx, t_sched, n_recipients, ephemeral=False)``: the message
      became due; ``n_recipients`` counts recipient *devices*, numbered
      ``0 .. n_recipients-1`` by the driver;
    - ``sent(idx, t)``: handed to the client;
    - ``acked(idx, t, code)``: the relay's SACK; code 0 means accepted
      (durably stored), any other code is a refusal;
    - ``refused(idx, code)``: refused by the relay or failed locally;
    - ``delivered(idx, recipient, t_recv)``: recipient device ``recipient``
      handed the message to its application.

    Misuse by the driver (an index out of range, scheduling twice) raises
    :class:`~fastroute.errors.InvalidArgument`; misbehaviour of the relay
    (duplicates, deliveries nobody expected) is counted, never raised.
    """

    def __init__(self, n_messages: int, *, nonce: bytes | None = None,
                 interval_s: float = 1.0) -> None:
        if type(n_messages) is not int or n_messages < 0:
            raise InvalidArgument("n_messages must be a non-negative int")
        if nonce is None:
            nonce = os.urandom(NONCE_SIZE)
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise InvalidArgument(f"nonce must be {NONCE_SIZE} bytes")
        if not interval_s > 0:
            raise InvalidArgument("interval_s must be positive")
        #: Number of messages this accountant tracks.
        self.n_messages = n_messages
        #: The run nonce: the first 8 bytes of every message id of this run.
        self.nonce = nonce
        #: Width of the time-series buckets, seconds.
        self.interval_s = float(interval_s)
        #: Clock value of the run start (first scheduled time unless set by start()).
        self.t0: float | None = None
        #: Set by run_open_loop: the driver's own statistics (rates, lag).
        self.loop_stats = None
        self._flags = bytearray(n_messages)
        self._t_sched = array("d", bytes(8 * n_messages))
        self._n_rcpt = array("H", bytes(2 * n_messages))
        self._n_deliv = array("H", bytes(2 * n_messages))
        # first bit of each message's delivery bitset: allocated when the
        # message is scheduled, so events may come in any index order
        self._base = array("q", bytes(8 * n_messages))
        self._bits = bytearray()
        self._nbits = 0
        self._pool = os.urandom(_POOL_SIZE)

        self.scheduled_count = 0
        self.sent_count = 0
        self.acked_count = 0
        self.delivered_count = 0
        self.duplicates = 0
        self.duplicate_acks = 0
        self.unexpected = 0
        self.corrupt = 0
        self.padded = 0
        self.refused_by_code: dict[int, int] = {}

        #: Delivery latency from the scheduled send time (us).
        self.latency = _new_hist()
        #: Ack latency from the scheduled send time (us).
        self.ack_latency = _new_hist()
        #: How late the driver sent, actual minus scheduled (us).
        self.send_lag = _new_hist()

        self._s_sent = array("q")
        self._s_acked = array("q")
        self._s_deliv = array("q")
        self._s_lat_sum = array("d")
        self._s_lat_max = array("d")

    # ------------------------------------------------------------- ids/bodies

    def start(self, t0: float) -> None:
        """Fix the run start (time 0 of the series and of body timestamps)."""
        if self.t0 is None:
            self.t0 = t0

    def message_id(self, idx: int) -> bytes:
        """The 16-byte id of message ``idx``: run nonce + big-endian index."""
        return self.nonce + idx.to_bytes(8, "big")

    def index_of(self, msg_id: bytes) -> int | None:
        """The index of a message id of this run, or None for a foreign or bad id."""
        if len(msg_id) != ID_SIZE or msg_id[:NONCE_SIZE] != self.nonce:
            return None
        idx = int.from_bytes(msg_id[NONCE_SIZE:], "big")
        return idx if idx < self.n_messages else None

    def body_size(self, size: int) -> int:
        """The size of the body made for a recorded ``size`` (at least :data:`MIN_BODY`)."""
        return size if size >= MIN_BODY else MIN_BODY

    def make_body(self, idx: int, size: int) -> bytes:
        """Build the body of scheduled message ``idx`` for a recorded ``size``.

        Layout: id (16 bytes), scheduled time in ns after :attr:`t0` (8 bytes,
        big-endian), then random bytes up to ``size``.  A recorded size below
        :data:`MIN_BODY` (24) is padded up to 24 bytes and counted in
        ``padded``: the id and the time must travel, and 24 bytes is below
        any real encrypted message anyway.  The random filler is cut from a
        per-run pool at a per-message offset, so bodies differ and cost no
        system call each.
        """
        self._check_scheduled(idx)
        if size < MIN_BODY:
            size = MIN_BODY
            self.padded += 1
        t_ns = max(0, int((self._t_sched[idx] - (self.t0 or 0.0)) * 1e9))
        fill = size - HEADER_SIZE
        off = (idx * 40503) % (_POOL_SIZE - fill) if fill else 0
        return b"".join((self.nonce, idx.to_bytes(8, "big"), t_ns.to_bytes(8, "big"),
                         self._pool[off:off + fill]))

    # ----------------------------------------------------------------- events

    def _check_index(self, idx: int) -> None:
        if not 0 <= idx < self.n_messages:
            raise InvalidArgument(f"message index {idx} out of range 0..{self.n_messages - 1}")

    def _check_scheduled(self, idx: int) -> None:
        self._check_index(idx)
        if not self._flags[idx] & _SCHEDULED:
            raise InvalidArgument(f"message {idx} was not scheduled")

    def _bucket(self, t: float) -> int:
        b = int((t - (self.t0 or 0.0)) / self.interval_s)
        return b if b > 0 else 0

    def scheduled(self, idx: int, t_sched: float, n_recipients: int, *,
                  ephemeral: bool = False) -> None:
        """Message ``idx`` is due at ``t_sched`` for ``n_recipients`` devices (1..65535)."""
        self._check_index(idx)
        if self._flags[idx] & _SCHEDULED:
            raise InvalidArgument(f"message {idx} scheduled twice")
        if not 0 < n_recipients <= 0xFFFF:
            raise InvalidArgument("n_recipients must be in 1..65535")
        if self.t0 is None:
            self.t0 = t_sched
        self._flags[idx] = _SCHEDULED | (_EPHEMERAL if ephemeral else 0)
        self._t_sched[idx] = t_sched
        self._n_rcpt[idx] = n_recipients
        self._base[idx] = self._nbits
        self._nbits += n_recipients
        need = (self._nbits + 7) >> 3
        if need > len(self._bits):
            # grow geometrically: extending by a few bytes per message is quadratic-ish
            self._bits.extend(bytes(max(need - len(self._bits), len(self._bits) // 2, 64)))
        self.scheduled_count += 1

    def sent(self, idx: int, t: float) -> None:
        """Message ``idx`` was handed to the client at ``t``."""
        self._check_scheduled(idx)
        f = self._flags[idx]
        if f & _SENT:
            raise InvalidArgument(f"message {idx} sent twice")
        self._flags[idx] = f | _SENT
        self.sent_count += 1
        _record(self.send_lag, t - self._t_sched[idx])
        _bump(self._s_sent, self._bucket(t))

    def acked(self, idx: int, t: float, code: int = 0) -> None:
        """The relay answered message ``idx`` at ``t`` with ``code`` (0 = accepted)."""
        if code:
            self.refused(idx, code)
            return
        self._check_scheduled(idx)
        f = self._flags[idx]
        if f & (_ACKED | _REFUSED):
            self.duplicate_acks += 1
            return
        self._flags[idx] = f | _ACKED
        self.acked_count += 1
        _record(self.ack_latency, t - self._t_sched[idx])
        _bump(self._s_acked, self._bucket(t))

    def refused(self, idx: int, code: int) -> None:
        """Message ``idx`` was refused with error ``code`` (counted once per message)."""
        self._check_scheduled(idx)
        f = self._flags[idx]
        if f & (_ACKED | _REFUSED):
            self.duplicate_acks += 1
            return
        self._flags[idx] = f | _REFUSED
        code = int(code)
        self.refused_by_code[code] = self.refused_by_code.get(code, 0) + 1

    def delivered(self, idx: int, recipient: int, t_recv: float) -> bool:
        """Recipient device ``recipient`` received message ``idx`` at ``t_recv``.

        Returns True for a first delivery.  A second delivery of the same
        message to the same device counts in ``duplicates``; a delivery of a
        message never scheduled, or to a device number the message did not
        have, counts in ``unexpected``; neither raises.
        """
        if not 0 <= idx < self.n_messages or not self._flags[idx] & _SCHEDULED \
                or not 0 <= recipient < self._n_rcpt[idx]:
            self.unexpected += 1
            return False
        bit = self._base[idx] + recipient
        byte, mask = bit >> 3, 1 << (bit & 7)
        if self._bits[byte] & mask:
            self.duplicates += 1
            return False
        self._bits[byte] |= mask
        self._n_deliv[idx] += 1
        self.delivered_count += 1
        lat = t_recv - self._t_sched[idx]
        _record(self.latency, lat)
        b = self._bucket(t_recv)
        _bump(self._s_deliv, b)
        if b >= len(self._s_lat_sum):
            grow = b + 1 - len(self._s_lat_sum)
            self._s_lat_sum.extend([0.0] * grow)
            self._s_lat_max.extend([0.0] * grow)
        self._s_lat_sum[b] += lat
        if lat > self._s_lat_max[b]:
            self._s_lat_max[b] = lat
        return True

    def on_deliver(self, msg_id: bytes, body: bytes, recipient: int, t_recv: float) -> bool:
        """Check a received (id, body) pair and record its delivery.

        The body must start with the id and carry the scheduled time this
        accountant gave it; otherwise the relay altered or mixed bodies and
        the delivery counts in ``corrupt`` (not in ``delivered``).  An id of
        another run counts in ``unexpected``.  Returns True for a first
        delivery.
        """
        idx = self.index_of(bytes(msg_id))
        if idx is None:
            self.unexpected += 1
            return False
        if len(body) < HEADER_SIZE or body[:ID_SIZE] != msg_id or (
                self._flags[idx] & _SCHEDULED and
                int.from_bytes(body[ID_SIZE:HEADER_SIZE], "big") !=
                max(0, int((self._t_sched[idx] - (self.t0 or 0.0)) * 1e9))):
            self.corrupt += 1
            return False
        return self.delivered(idx, recipient, t_recv)

    # ---------------------------------------------------------------- results

    def counts(self) -> dict[str, int]:
        """The outcome counts as of now (``lost`` assumes the run is over).

        ``expected_deliveries``: (message, device) pairs of accepted messages;
        ``lost``: persistent messages accepted (SACK code 0) with at least one
        recipient device that never got them; ``missing_deliveries``: how many
        (message, device) deliveries those lack; ``ephemeral_dropped``:
        accepted ephemeral messages not delivered everywhere (allowed: the
        relay drops signals it cannot deliver at once); ``unacked``: sent but
        neither accepted nor refused.
        """
        lost = missing = eph_dropped = unacked = expected = 0
        flags, n_rcpt, n_deliv = self._flags, self._n_rcpt, self._n_deliv
        for i in range(self.n_messages):
            f = flags[i]
            if not f & _SENT:
                continue
            if f & _ACKED:
                expected += n_rcpt[i]
                short = n_rcpt[i] - n_deliv[i]
                if short > 0:
                    if f & _EPHEMERAL:
                        eph_dropped += 1
                    else:
                        lost += 1
                        missing += short
            elif not f & _REFUSED:
                unacked += 1
        return {
            "scheduled": self.scheduled_count,
            "sent": self.sent_count,
            "acked": self.acked_count,
            "refused_total": sum(self.refused_by_code.values()),
            "unacked": unacked,
            "expected_deliveries": expected,
            "delivered": self.delivered_count,
            "lost": lost,
            "missing_deliveries": missing,
            "ephemeral_dropped": eph_dropped,
            "duplicates": self.duplicates,
            "duplicate_acks": self.duplicate_acks,
            "unexpected": self.unexpected,
            "corrupt": self.corrupt,
            "padded": self.padded,
        }

    def lost_indices(self, limit: int = 100) -> list[int]:
        """Indices of up to ``limit`` lost messages (for diagnosis)."""
        out = []
        for i in range(self.n_messages):
            f = self._flags[i]
            if f & _ACKED and not f & _EPHEMERAL and self._n_deliv[i] < self._n_rcpt[i]:
                out.append(i)
                if len(out) >= limit:
                    break
        return out

    def series(self) -> dict[str, list]:
        """Per-interval series: counts sent/acked/delivered and delivery latency mean/max (s).

        Bucket ``k`` covers ``[t0 + k*interval_s, t0 + (k+1)*interval_s)``; all
        lists have the same length.
        """
        n = max(len(self._s_sent), len(self._s_acked), len(self._s_deliv))

        def pad(a, fill):
            return list(a) + [fill] * (n - len(a))

        deliv = pad(self._s_deliv, 0)
        lat_sum = pad(self._s_lat_sum, 0.0)
        return {
            "sent": pad(self._s_sent, 0),
            "acked": pad(self._s_acked, 0),
            "delivered": deliv,
            "latency_mean_s": [s / d if d else None for s, d in zip(lat_sum, deliv)],
            "latency_max_s": [m if d else None
                              for m, d in zip(pad(self._s_lat_max, 0.0), deliv)],
        }

    def percentile_curve(self, hist: HdrHistogram) -> Iterator[tuple[float, float]]:
        """``(percentile, value_us)`` points of ``hist`` from 0 to its resolution limit.

        Percentiles step evenly in ``log10(1/(1-p))`` (ten steps a decade) up
        to the last one the sample size can resolve, then the maximum.
        """
        total = hist.get_total_count()
        if not total:
            return
        k = 0
        while True:
            tail = 10 ** (-k / 10)  # 1 - p
            if tail * total < 1:
                break
            p = 100.0 * (1.0 - tail)
            yield p, float(hist.get_value_at_percentile(p))
            k += 1
        yield 100.0 * (1.0 - 1.0 / (total + 1)), float(hist.get_max_value())
