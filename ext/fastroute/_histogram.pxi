# The relay's Prometheus histograms (Histogram), compiled.  Part of
# fastroute._core (included by _core.pyx).
#
# Compiled twins of fastroute/histogram.py (the specification):
#   Histogram = PyHistogram
#
# The delivery stage observes a latency for every pull of a device's mailbox:
# a group message to ten online devices is ten observations, each a call of
# time.time(), a bisect and three adds on Python objects, in Python (~7 % of
# the relay's instructions for a group message sent one a read).  Here an
# observation is one call into C: the counts are C integers, the sum a
# double, and observe_since_ms reads the wall clock itself.
# tests/test_metrics.py feeds both twins the same values and compares every
# figure and line.

from libc.stdlib cimport calloc, free
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec


cdef class Histogram:
    """A cumulative Prometheus histogram (``fastroute.histogram.PyHistogram``,
    compiled): :meth:`observe` is a call into C, no Python object made.

    Calls hold the GIL from start to end, so an observation from another
    thread (the SQLite store's writer) is never half made.
    """

    cdef readonly tuple bounds
    cdef double* _bounds
    cdef long long* _counts
    cdef Py_ssize_t _n           # len(bounds); the counts are _n + 1
    cdef readonly double total
    cdef readonly long long count

    def __cinit__(self, *args, **kwargs):
        # one bucket and no bound until __init__: never a NULL to count into
        self._bounds = <double*>calloc(1, sizeof(double))
        self._counts = <long long*>calloc(1, sizeof(long long))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        self.bounds = ()

    def __init__(self, bounds=None):
        cdef Py_ssize_t i, n
        cdef double* b
        cdef long long* c
        if bounds is None:
            # the specification's default, read where it is defined (that
            # module imports this one: not yet there when the core loads)
            from fastroute.histogram import LATENCY_BUCKETS
            bounds = LATENCY_BUCKETS
        bounds = tuple(bounds)
        n = len(bounds)
        b = <double*>calloc(n + 1, sizeof(double))
        c = <long long*>calloc(n + 1, sizeof(long long))
        if b == NULL or c == NULL:
            free(b)
            free(c)
            raise MemoryError()
        try:
            for i in range(n):
                b[i] = bounds[i]
        except BaseException:
            free(b)
            free(c)
            raise
        free(self._bounds)
        free(self._counts)
        self._bounds, self._counts, self._n = b, c, n
        self.bounds = bounds
        self.total = 0.0
        self.count = 0

    def __dealloc__(self):
        free(self._bounds)
        free(self._counts)

    cdef inline void _add(self, double value) noexcept:
        # bisect_left: the first bound not below value (a NaN is below none)
        cdef Py_ssize_t lo = 0, hi = self._n, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        self._counts[lo] += 1
        self.total += value
        self.count += 1

    def observe(self, double value):
        """Count one observation."""
        self._add(value)

    def observe_since_ms(self, long long ts_ms):
        """Count the seconds from ``ts_ms`` (wall clock, ms since the epoch)
        to now; none below 0 (a stamp from a clock ahead of this one)."""
        cdef timespec ts
        cdef double value
        clock_gettime(CLOCK_REALTIME, &ts)
        value = (<double>ts.tv_sec + <double>ts.tv_nsec * 1e-9) - <double>ts_ms / 1000.0
        self._add(value if value > 0.0 else 0.0)

    @property
    def counts(self):
        """The observations in each bucket (the last: above every bound), a list."""
        return [self._counts[i] for i in range(self._n + 1)]

    def lines(self, str name):
        """The ``_bucket``, ``_sum`` and ``_count`` lines of this histogram."""
        cdef list out = []
        cdef long long acc = 0
        cdef Py_ssize_t i
        for i in range(self._n):
            acc += self._counts[i]
            out.append(f'{name}_bucket{{le="{self.bounds[i]:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.count}")
        return out
