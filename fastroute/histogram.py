"""Latency histograms in the Prometheus style, for the relay's metrics.

Kept apart from :mod:`fastroute.relay.metrics` (which renders them) so that
the stages and the store, which observe into them, need not import the
admin listener.  ``observe`` runs on hot paths (the delivery stage observes
every pull of a mailbox: a group message to ten online devices is ten
observations) and in the store's writer thread.  :class:`PyHistogram` is the
specification: a bisect and three adds, no lock (a scrape may read a count
that is one observation ahead of the sum, which Prometheus tolerates);
:data:`Histogram`, the one in use, is its compiled twin when the core is
built (one call into C, under the GIL throughout).
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING

from ._compiled import twin

__all__ = ["LATENCY_BUCKETS", "LOOP_BUCKETS", "Histogram", "PyHistogram"]

#: latency buckets in seconds (1 ms .. 10 s)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: buckets for the event loop's own work in seconds (50 us .. 100 ms)
LOOP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class PyHistogram:
    """A cumulative Prometheus histogram: observe() is a bisect and three adds."""

    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def observe_since_ms(self, ts_ms: int) -> None:
        """Count the seconds from ``ts_ms`` (wall clock, ms since the epoch)
        to now; none below 0 (a stamp from a clock ahead of this one)."""
        self.observe(max(0.0, time.time() - ts_ms / 1000.0))

    def lines(self, name: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` lines of this histogram."""
        out, acc = [], 0
        for bound, n in zip(self.bounds, self.counts):
            acc += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


# the implementation in use: compiled (the delivery stage observes every pull
# of every device's mailbox) or the specification above
if TYPE_CHECKING:
    Histogram = PyHistogram
else:
    Histogram = twin(PyHistogram)
