# The Noise transport's framing (FrameReader), compiled.  Part of
# fastroute._core (included by _core.pyx).
#
# Compiled twins of fastroute/noise.py (the specification):
#   FrameReader = PyFrameReader
#   seal_frames = py_seal_frames
#
# Every read of every link goes through FrameReader.feed, and every write
# through seal_frames, on the relay and in the client; tests/test_noise.py
# feeds both the same streams, cut anywhere, and compares the frames, and
# seals the same plaintexts with both (the ciphertexts and the nonces after).

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


# fastroute.noise's CipherState and length prefixes, looked up at the first
# seal (noise imports this module: they do not exist yet when it loads)
cdef object _CipherState = None
cdef object _ENCRYPT = None  # its encrypt method, as defined
cdef tuple _LEN_PREFIXES = None
cdef object _MAX_NONCE = 2**64 - 1
cdef Py_ssize_t _MAX_SEALED = 65535 - 16


def seal_frames(cipher, plaintexts):
    """Encrypt each plaintext and frame it, as buffers for ``transport.writelines``
    (``fastroute.noise.py_seal_frames``, compiled).

    Returns ``[len1, ct1, len2, ct2, ...]``.  For a :class:`CipherState` (not a
    subclass) and a plaintext of bytes that fits, its ``encrypt`` is done here
    -- the nonce built in C, the AEAD called once -- with what the method
    would do; anything else (a nonce space exhausted, a plaintext too large or
    of another type) goes through ``cipher.encrypt``, which raises as it does.
    """
    global _CipherState, _ENCRYPT, _LEN_PREFIXES
    if _CipherState is None:
        from fastroute.noise import _LEN_PREFIX, CipherState
        _CipherState = CipherState
        _ENCRYPT = CipherState.encrypt
        _LEN_PREFIXES = _LEN_PREFIX
    cdef list out = []
    cdef object ct, nonce, n_obj, enc
    cdef unsigned long long n
    cdef unsigned char* q
    cdef int i
    if type(cipher) is not _CipherState or _CipherState.encrypt is not _ENCRYPT:
        # another cipher (or a method replaced since): its own encrypt
        encrypt = cipher.encrypt
        for plaintext in plaintexts:
            ct = encrypt(plaintext)
            out.append(_LEN_PREFIXES[len(ct)])
            out.append(ct)
        return out
    enc = cipher._encrypt
    for plaintext in plaintexts:
        n_obj = cipher.n
        if (not PyBytes_CheckExact(plaintext) or PyBytes_GET_SIZE(plaintext) > _MAX_SEALED
                or type(n_obj) is not int or n_obj < 0 or n_obj >= _MAX_NONCE):
            ct = cipher.encrypt(plaintext)
        else:
            n = n_obj
            # 32 zero bits, then n as 64-bit little-endian (Noise rev 34, 12.3)
            nonce = PyBytes_FromStringAndSize(NULL, 12)
            q = <unsigned char*>PyBytes_AS_STRING(nonce)
            q[0] = q[1] = q[2] = q[3] = 0
            for i in range(8):
                q[4 + i] = <unsigned char>((n >> (8 * i)) & 0xff)
            ct = enc(nonce, plaintext, b"")
            cipher.n = n_obj + 1
        out.append(_LEN_PREFIXES[len(ct)])
        out.append(ct)
    return out
