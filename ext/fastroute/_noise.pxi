# The Noise transport's framing (FrameReader), compiled.  Part of
# fastroute._core (included by _core.pyx).
#
# Compiled twins of fastroute/noise.py (the specification):
#   FrameReader = PyFrameReader
#
# Every read of every link goes through FrameReader.feed, on the relay and
# in the client; tests/test_noise.py feeds both the same streams, cut
# anywhere, and compares the frames.

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE


cdef class FrameReader:
    """Incremental parser of length-prefixed frames from a byte stream
    (``fastroute.noise.PyFrameReader``, compiled).

    :meth:`feed` takes chunks as they arrive (split or merged arbitrarily)
    and returns the complete frames they finish, in order.  Only the tail of
    an unfinished frame is kept (at most one frame, 65537 bytes).
    """

    cdef bytearray _buf

    def __init__(self):
        self._buf = bytearray()

    @property
    def buffered(self):
        """Bytes held of a frame not yet complete (non-zero at EOF means truncation)."""
        return PyByteArray_GET_SIZE(self._buf)

    def feed(self, data):
        """Add ``data`` (any bytes-like object) and return the frames it completes."""
        cdef bytearray buf = self._buf
        cdef list frames = []
        cdef const unsigned char* p
        cdef Py_ssize_t end, pos = 0, stop
        if PyByteArray_GET_SIZE(buf) == 0 and PyBytes_CheckExact(data):
            # the common case for a relay: whole frames per read, parsed
            # straight from the caller's bytes; only a leftover is copied
            p = <const unsigned char*>PyBytes_AS_STRING(data)
            end = PyBytes_GET_SIZE(data)
        else:
            buf += data
            p = <const unsigned char*>PyByteArray_AS_STRING(buf)
            end = PyByteArray_GET_SIZE(buf)
        # (no Python code runs below until the buffer is trimmed: p stays valid)
        while end - pos >= 2:
            stop = pos + 2 + ((<Py_ssize_t>p[pos] << 8) | p[pos + 1])
            if stop > end:
                break
            frames.append(PyBytes_FromStringAndSize(<const char*>p + pos + 2, stop - pos - 2))
            pos = stop
        if PyByteArray_GET_SIZE(buf):
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]
        return frames

    def __repr__(self):
        return f"<FrameReader buffered={PyByteArray_GET_SIZE(self._buf)}>"
