# Wire codecs of the hot path, compiled.  Part of fastroute._core (included
# by _core.pyx before the stage parts, which call its cdef helpers).
#
# Compiled twins of fastroute/wire.py (the specification):
#   pack_frames         = py_pack_frames
#   op_count            = py_op_count
#   OpRun               = PyOpRun
#   decode_sends        = py_decode_sends
#   decode_server_ops   = py_decode_server_ops
#   deliver_tail        = py_deliver_tail
#   tail_fields         = py_tail_fields
#   copy_tail_fields    = py_copy_tail_fields
#   sack_ok_op          = py_sack_ok_op
#   dsend_ok            = py_dsend_ok
#   gsend_ok            = py_gsend_ok
#   decode_pings        = py_decode_pings
#   decode_dacks        = py_decode_dacks
#   frame_offsets       = py_frame_offsets
#   decode_dsends       = py_decode_dsends
#   leading_dsends      = py_leading_dsends
#   decode_gsends       = py_decode_gsends
#   leading_gsends      = py_leading_gsends
#   reply_ok_ops        = py_reply_ok_ops
#
# tests/test_fastpath.py checks that both give the same bytes, or the same
# exception class, for the same input.  The wire format is docs/PROTOCOL.md:
# a frame plaintext is a msgpack array header followed by the packed ops.
# The two decoders are fast paths that may decline a frame (None): the
# caller then decodes it with wire's precise decoder.

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.list cimport PyList_GET_ITEM
from libc.stdint cimport INT64_MAX, uint32_t
from libc.string cimport memcmp, memcpy

cdef extern from *:
    """
    /* A copy of the few to few hundred bytes a message's fields are, inline:
       16-byte moves, the last one overlapping the one before.  memcpy of a
       length known only at run time is a call through the PLT and a
       dispatch on the length, per field (~6 a message on the 1:1 path). */
    static inline void fr_copy(void* dst, const void* src, size_t n) {
        unsigned char* d = (unsigned char*)dst;
        const unsigned char* s = (const unsigned char*)src;
        if (n >= 16) {
            if (n > 256) {
                memcpy(d, s, n);
                return;
            }
            size_t i = 0;
            for (; i + 16 < n; i += 16)
                __builtin_memcpy(d + i, s + i, 16);
            __builtin_memcpy(d + n - 16, s + n - 16, 16);
        } else if (n >= 8) {
            __builtin_memcpy(d, s, 8);
            __builtin_memcpy(d + n - 8, s + n - 8, 8);
        } else if (n >= 4) {
            __builtin_memcpy(d, s, 4);
            __builtin_memcpy(d + n - 4, s + n - 4, 4);
        } else if (n > 0) {
            d[0] = s[0];
            d[n / 2] = s[n / 2];
            d[n - 1] = s[n - 1];
        }
    }
    """
    void fr_copy(void* dst, const void* src, size_t n) noexcept nogil


cdef inline bytes fr_bytes(const void* p, Py_ssize_t n):
    """``bytes`` of the ``n`` bytes at ``p``, copied by :c:func:`fr_copy`:
    what PyBytes_FromStringAndSize(p, n) makes, without its memcpy call
    (for a message's id and body, made per message on the decode paths)."""
    cdef bytes b = PyBytes_FromStringAndSize(NULL, n)
    fr_copy(PyBytes_AS_STRING(b), p, <size_t>n)
    return b


cdef enum:
    WIRE_MAX_PLAINTEXT = 65519   # wire.MAX_PLAINTEXT
    WIRE_MAX_OPS = 8192          # wire.MAX_OPS_PER_FRAME
    WIRE_HEADER = 3              # pack_frames always reserves an array16 header
    WIRE_DELIVER_HEAD = 7        # 0x97 0x12 0xce + 4-byte seq
    WIRE_SACK_LEN = 21           # 0x93 0x11 0xc4 0x10 + 16-byte id + 0x00 (for a 16-byte id)
    WIRE_ROUTED = 0xc1           # wire.ROUTED: a routed tail's first byte
    WIRE_ROUTED_HEAD = 9         # 0xc1 + the mid as a big-endian uint64


cdef inline void put_be16(unsigned char* p, uint32_t v) noexcept:
    p[0] = <unsigned char>(v >> 8)
    p[1] = <unsigned char>v


cdef inline void put_be32(unsigned char* p, uint32_t v) noexcept:
    p[0] = <unsigned char>(v >> 24)
    p[1] = <unsigned char>(v >> 16)
    p[2] = <unsigned char>(v >> 8)
    p[3] = <unsigned char>v


cdef inline Py_ssize_t bin_header_len(Py_ssize_t n) noexcept:
    """Bytes of the msgpack bin header for ``n`` bytes (bin8, bin16, bin32)."""
    return 2 if n < 256 else (3 if n < 65536 else 5)


cdef inline Py_ssize_t str_header_len(Py_ssize_t n) noexcept:
    """Bytes of the msgpack str header for ``n`` bytes of UTF-8 (fixstr..str32)."""
    return 1 if n < 32 else bin_header_len(n)


cdef inline Py_ssize_t array_header_len(Py_ssize_t n) noexcept:
    """Bytes of the msgpack array header for ``n`` items (fixarray, array16, array32)."""
    return 1 if n < 16 else (3 if n < 65536 else 5)


cdef inline Py_ssize_t str_header(unsigned char* p, Py_ssize_t n) noexcept:
    """Write the msgpack str header for ``n`` bytes at ``p``; return its length."""
    if n < 32:
        p[0] = <unsigned char>(0xa0 | n)
        return 1
    if n < 256:
        p[0] = 0xd9
        p[1] = <unsigned char>n
        return 2
    if n < 65536:
        p[0] = 0xda
        put_be16(p + 1, <uint32_t>n)
        return 3
    p[0] = 0xdb
    put_be32(p + 1, <uint32_t>n)
    return 5


cdef inline Py_ssize_t array_header(unsigned char* p, Py_ssize_t n) noexcept:
    """Write the msgpack array header for ``n`` items at ``p``; return its length."""
    if n < 16:
        p[0] = <unsigned char>(0x90 | n)
        return 1
    if n < 65536:
        p[0] = 0xdc
        put_be16(p + 1, <uint32_t>n)
        return 3
    p[0] = 0xdd
    put_be32(p + 1, <uint32_t>n)
    return 5


cdef inline Py_ssize_t bin_header(unsigned char* p, Py_ssize_t n) noexcept:
    """Write the msgpack bin header for ``n`` bytes at ``p``; return its length."""
    if n < 256:
        p[0] = 0xc4
        p[1] = <unsigned char>n
        return 2
    if n < 65536:
        p[0] = 0xc5
        put_be16(p + 1, <uint32_t>n)
        return 3
    p[0] = 0xc6
    put_be32(p + 1, <uint32_t>n)
    return 5


@cython.final  # the packers test ``type(x) is OpRun``: no subclass may pass for one
cdef class OpRun:
    """Packed ops back to back in one bytes object: what a producer of many
    ops at once (a stored batch's SACKs, a pull's DELIVERs) appends to a
    link's outgoing list instead of one bytes object an op.

    :func:`pack_frames` reads a run as the ops it holds, in order, and splits
    it between frames where the ops would have been split; :meth:`ops` gives
    them one by one (``fastroute.wire.flat_ops`` does, for a whole list).
    ``OpRun(data, ends)``: ``ends[k]`` is where op ``k`` ends in ``data``
    (strictly increasing, the last one ``len(data)``).
    """

    cdef readonly bytes data
    cdef Py_ssize_t* ends
    cdef readonly Py_ssize_t count

    def __cinit__(self):
        self.data = b""
        self.ends = NULL
        self.count = 0

    def __init__(self, data, ends):
        if not PyBytes_CheckExact(data):
            raise WrongType("an op run's data must be bytes")
        cdef Py_ssize_t n = len(ends), k, prev = 0, end
        cdef Py_ssize_t* arr = <Py_ssize_t*>PyMem_Malloc(max(n, 1) * sizeof(Py_ssize_t))
        if arr == NULL:
            raise MemoryError()
        try:
            for k in range(n):
                end = ends[k]
                if end <= prev:
                    raise InvalidArgument("an op run's ends must increase")
                arr[k] = end
                prev = end
            if prev != PyBytes_GET_SIZE(data):
                raise InvalidArgument("an op run's last end must be its length")
        except BaseException:
            PyMem_Free(arr)
            raise
        PyMem_Free(self.ends)
        self.ends = arr
        self.count = n
        self.data = data

    def __dealloc__(self):
        PyMem_Free(self.ends)

    def __len__(self):
        return self.count

    def ops(self):
        """The run's ops, one bytes object each, in order."""
        cdef list out = []
        cdef Py_ssize_t k, prev = 0
        cdef const char* d = PyBytes_AS_STRING(self.data)
        for k in range(self.count):
            out.append(PyBytes_FromStringAndSize(d + prev, self.ends[k] - prev))
            prev = self.ends[k]
        return out

    def __reduce__(self):
        # copies (copy.deepcopy in the twin tests) are made from data and ends
        return (OpRun, (self.data, [self.ends[k] for k in range(self.count)]))

    def __repr__(self):
        return f"<OpRun of {self.count} ops, {PyBytes_GET_SIZE(self.data)} bytes>"


cdef object op_run(bytes data, Py_ssize_t* ends, Py_ssize_t count):
    """An :class:`OpRun` of ``count`` ops taking ``ends`` (PyMem_Malloc'd,
    owned by the run from here on, freed here if the run cannot be made)."""
    cdef OpRun run
    try:
        run = OpRun.__new__(OpRun)
    except BaseException:
        PyMem_Free(ends)
        raise
    run.data = data
    run.ends = ends
    run.count = count
    return run


def op_count(list out):
    """How many ops ``out`` holds: one a bytes object, an :class:`OpRun`'s count."""
    cdef Py_ssize_t n = PyList_GET_SIZE(out), i, total = 0
    cdef object x
    for i in range(n):
        x = <object>PyList_GET_ITEM(out, i)
        total += (<OpRun>x).count if type(x) is OpRun else 1
    return total


cdef bytes join_frame(list ops, Py_ssize_t fi, Py_ssize_t fj, Py_ssize_t ti, Py_ssize_t tj,
                      Py_ssize_t count, Py_ssize_t size):
    """One frame plaintext: array header (``count`` ops) + the ops of
    ``ops`` from op ``fj`` of element ``fi`` up to op ``tj`` of element ``ti``
    (excluded), ``size`` bytes of them.  ``ops`` holds exact bytes (one op
    each) and op runs; the caller's own copy, so no code run by the
    allocation can change it, which the copy checks anyway."""
    cdef Py_ssize_t hdr = array_header_len(count)
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, hdr + size)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(frame)
    cdef Py_ssize_t pos = hdr, e, a, b, lo, k
    cdef const char* src
    cdef object x
    cdef OpRun run
    array_header(p, count)
    for e in range(fi, min(ti + 1, PyList_GET_SIZE(ops))):
        if e == ti and tj == 0:
            break
        x = <object>PyList_GET_ITEM(ops, e)
        if PyBytes_CheckExact(x):
            lo = 0
            k = PyBytes_GET_SIZE(x)
            src = PyBytes_AS_STRING(x)
        elif type(x) is OpRun:
            run = <OpRun>x
            a = fj if e == fi else 0
            b = tj if e == ti else run.count
            if b <= a:
                continue
            lo = run.ends[a - 1] if a > 0 else 0
            k = run.ends[b - 1] - lo
            src = PyBytes_AS_STRING(run.data)
        else:
            raise RuntimeError("op list changed while packing")
        if pos + k > hdr + size:
            raise RuntimeError("op list changed while packing")
        memcpy(p + pos, src + lo, <size_t>k)
        pos += k
    if pos != hdr + size:
        raise RuntimeError("op list changed while packing")
    return frame


def pack_frames(list packed_ops, Py_ssize_t max_plaintext=WIRE_MAX_PLAINTEXT,
                Py_ssize_t max_ops=WIRE_MAX_OPS):
    """Compiled :func:`fastroute.wire.pack_frames` for a list of exact bytes
    and op runs (:class:`OpRun`, each read as the ops it holds).

    Same greedy split and bytes as the Python version; returns ``None`` (and
    builds nothing) if an element is anything else, so the caller can fall
    back to the Python version for other buffers.
    """
    cdef Py_ssize_t n, i, j, k, m, prev, limit
    cdef Py_ssize_t fi = 0, fj = 0, count = 0, size = 0
    cdef object x
    cdef OpRun run
    cdef list frames, ops
    if not 16 <= max_plaintext <= WIRE_MAX_PLAINTEXT:
        raise InvalidArgument(f"max_plaintext must be in 16..{WIRE_MAX_PLAINTEXT}")
    if not 1 <= max_ops <= WIRE_MAX_OPS:
        raise InvalidArgument(f"max_ops must be in 1..{WIRE_MAX_OPS}")
    # a copy of the list: the frames' allocations may run any code (the GC),
    # which cannot change this one
    ops = list(packed_ops)
    n = PyList_GET_SIZE(ops)
    for i in range(n):
        x = <object>PyList_GET_ITEM(ops, i)
        if not PyBytes_CheckExact(x) and type(x) is not OpRun:
            return None
    limit = max_plaintext - WIRE_HEADER
    frames = []
    for i in range(n):
        x = <object>PyList_GET_ITEM(ops, i)
        if PyBytes_CheckExact(x):
            run = None
            m = 1
        else:
            run = <OpRun>x
            m = run.count
        prev = 0
        for j in range(m):
            if run is None:
                k = PyBytes_GET_SIZE(x)
            else:
                k = run.ends[j] - prev
                prev = run.ends[j]
            if k > limit:
                raise InvalidArgument("op does not fit in a frame")
            if size + k > limit or count >= max_ops:
                frames.append(join_frame(ops, fi, fj, i, j, count, size))
                fi = i
                fj = j
                count = 0
                size = 0
            size += k
            count += 1
    if count:
        frames.append(join_frame(ops, fi, fj, n, 0, count, size))
    return frames


cdef bytes c_deliver_tail(bytes sender_packed, object cid, object body, bytes ts_packed,
                          int cls, long long mid=-1):
    """:func:`deliver_tail` for C callers (``cid`` and ``body`` checked here);
    with a ``mid``, routed (see :func:`c_deliver_tail_p`)."""
    if not PyBytes_CheckExact(cid) or not PyBytes_CheckExact(body):
        raise WrongType("SEND id and body must be bytes")
    return c_deliver_tail_p(sender_packed, PyBytes_AS_STRING(cid), PyBytes_GET_SIZE(cid),
                            PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), ts_packed, cls,
                            mid)


cdef bytes c_deliver_tail_p(bytes sender_packed, const char* cid, Py_ssize_t nc,
                            const char* body, Py_ssize_t nb, bytes ts_packed, int cls,
                            long long mid=-1):
    """:func:`c_deliver_tail` of an id and a body given as bytes in place
    (``nc`` and ``nb`` long: a frame's, read by :class:`_SendRun`); with a
    ``mid`` (>= 0), the routed tail of that mid (:func:`fastroute.wire.routed_tail`)."""
    if cls != 0 and cls != 1:
        raise InvalidArgument("cls must be 0 or 1")
    cdef Py_ssize_t ns = PyBytes_GET_SIZE(sender_packed)
    cdef Py_ssize_t nt = PyBytes_GET_SIZE(ts_packed)
    cdef Py_ssize_t hb = bin_header_len(nb)
    cdef Py_ssize_t head = WIRE_ROUTED_HEAD if mid >= 0 else 0
    cdef bytes tail = PyBytes_FromStringAndSize(NULL, head + ns + 2 + nc + hb + nb + nt + 1)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(tail)
    if head:
        p[0] = WIRE_ROUTED
        put_be32(p + 1, <uint32_t>(<uint64_t>mid >> 32))
        put_be32(p + 5, <uint32_t><uint64_t>mid)
        p += head
    fr_copy(p, PyBytes_AS_STRING(sender_packed), <size_t>ns)
    p += ns
    p[0] = 0xc4
    p[1] = 0x10
    p += 2
    fr_copy(p, cid, <size_t>nc)
    p += nc
    p += bin_header(p, nb)
    fr_copy(p, body, <size_t>nb)
    p += nb
    fr_copy(p, PyBytes_AS_STRING(ts_packed), <size_t>nt)
    p += nt
    p[0] = <unsigned char>cls
    return tail


def deliver_tail(bytes sender_packed not None, bytes cid not None, bytes body not None,
                 bytes ts_packed not None, int cls):
    """The packed DELIVER fields after seq: from, id (bin8 of 16), body, ts_ms, cls.

    ``sender_packed`` and ``ts_packed`` are already msgpack; ``cid`` is copied
    after a bin8 length-16 header as is (the gate checked its length).
    """
    return c_deliver_tail(sender_packed, cid, body, ts_packed, cls)


cdef inline void sack_ok_at(unsigned char* p, const char* cid) noexcept:
    """The ``WIRE_SACK_LEN`` bytes of ``[17, cid, 0]`` written at ``p`` (``cid``:
    16 bytes)."""
    p[0] = 0x93
    p[1] = 0x11
    p[2] = 0xc4
    p[3] = 0x10
    memcpy(p + 4, cid, 16)
    p[20] = 0


cdef bytes make_sack_ok(object cid):
    """``[17, cid, 0]`` packed, ``cid`` as bin8 (the relay's ids are 16 bytes)."""
    if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
        raise InvalidArgument("message id must be 16 bytes")
    return make_sack_ok_p(PyBytes_AS_STRING(cid))


cdef bytes make_sack_ok_p(const char* cid):
    """:func:`make_sack_ok` of the 16 id bytes at ``cid`` (a frame's, read in place)."""
    cdef bytes op = PyBytes_FromStringAndSize(NULL, WIRE_SACK_LEN)
    sack_ok_at(<unsigned char*>PyBytes_AS_STRING(op), cid)
    return op


cdef object fixed_ops(bytes data, Py_ssize_t count, Py_ssize_t size):
    """``count`` packed ops of ``size`` bytes each, back to back in ``data``:
    one :class:`OpRun`, or ``data`` itself when it holds one op."""
    cdef Py_ssize_t k
    cdef Py_ssize_t* ends
    if count == 1:
        return data
    ends = <Py_ssize_t*>PyMem_Malloc(count * sizeof(Py_ssize_t))
    if ends == NULL:
        raise MemoryError()
    for k in range(count):
        ends[k] = (k + 1) * size
    return op_run(data, ends, count)


def sack_ok_op(cid):
    """The packed SACK ``[17, cid, 0]`` for a 16-byte id (InvalidArgument otherwise)."""
    return make_sack_ok(cid)


# what the relay packs for every accepted feature request, [2000, id, 0, true,
# nil]: fixarray(5), uint16 2000, bin8 of 16, the id, then code 0, true, nil
cdef const unsigned char* REPLY_OK_HEAD = b"\x95\xcd\x07\xd0\xc4\x10"
cdef const unsigned char* REPLY_OK_TAIL = b"\x00\xc3\xc0"


def reply_ok_ops(list cids):
    """The packed REPLY ``[2000, id, 0, true, nil]`` for each 16-byte id of ``cids``
    (InvalidArgument for any other): the answers to a run of accepted requests,
    to extend a link's outgoing list with.  Two or more come as one
    :class:`OpRun` (one allocation, not one a REPLY)."""
    cdef Py_ssize_t i, n
    cdef tuple ids = tuple(cids)  # as it is now: the allocations below may run any code
    cdef object cid
    cdef bytes data
    cdef unsigned char* p
    n = PyTuple_GET_SIZE(ids)
    for i in range(n):
        cid = <object>PyTuple_GET_ITEM(ids, i)
        if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
            raise InvalidArgument("request id must be 16 bytes")
    if n == 0:
        return []
    data = PyBytes_FromStringAndSize(NULL, 25 * n)
    p = <unsigned char*>PyBytes_AS_STRING(data)
    for i in range(n):
        memcpy(p, REPLY_OK_HEAD, 6)
        memcpy(p + 6, PyBytes_AS_STRING(<object>PyTuple_GET_ITEM(ids, i)), 16)
        memcpy(p + 22, REPLY_OK_TAIL, 3)
        p += 25
    return [fixed_ops(data, n, 25)]


# -- client frames: runs of SEND ops ----------------------------------------

from cpython.set cimport PySet_Contains
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8

cdef enum:
    WIRE_MAX_STR = 1024          # wire.MAX_REASON_LEN
    WIRE_MAX_BODY = 61440        # wire.MAX_BODY


ctypedef struct Cursor:
    # a read position in a borrowed frame buffer; never moves past end
    const unsigned char* p
    const unsigned char* end


cdef inline uint32_t get_be16(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t get_be32(const unsigned char* p) noexcept:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline bint is_routed(object o) noexcept:
    """Whether ``o`` is a routed tail (:func:`fastroute.wire.routed_tail`)."""
    return (PyBytes_CheckExact(o) and PyBytes_GET_SIZE(o) > WIRE_ROUTED_HEAD
            and (<const unsigned char*>PyBytes_AS_STRING(o))[0] == WIRE_ROUTED)


cdef inline long long routed_mid(object o) noexcept:
    """The mid of a routed tail (``is_routed(o)`` holds)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(o)
    return <long long>((<uint64_t>get_be32(p + 1) << 32) | get_be32(p + 5))


cdef inline Py_ssize_t take_len(Cursor* c, unsigned char marker8, Py_ssize_t fixbase,
                                Py_ssize_t fixmax) noexcept:
    """Read a str (marker8 = 0xd9) or bin (0xc4) header; -1 if it is neither
    or the buffer ends.  ``fixbase..fixbase+fixmax`` are the fix forms (str)."""
    cdef unsigned char b
    cdef Py_ssize_t n
    if c.p >= c.end:
        return -1
    b = c.p[0]
    if fixmax and fixbase <= b <= fixbase + fixmax:
        c.p += 1
        return b - fixbase
    if b == marker8:
        if c.end - c.p < 2:
            return -1
        n = c.p[1]
        c.p += 2
        return n
    if b == marker8 + 1:
        if c.end - c.p < 3:
            return -1
        n = get_be16(c.p + 1)
        c.p += 3
        return n
    if b == marker8 + 2:
        if c.end - c.p < 5:
            return -1
        n = get_be32(c.p + 1)
        c.p += 5
        return n
    return -1


cdef inline Py_ssize_t take_array(Cursor* c) noexcept:
    """Read an array header (fixarray, array16, array32); its length, or -1."""
    cdef unsigned char b
    if c.p >= c.end:
        return -1
    b = c.p[0]
    if 0x90 <= b <= 0x9f:
        c.p += 1
        return b & 0x0f
    if b == 0xdc and c.end - c.p >= 3:
        c.p += 3
        return get_be16(c.p - 2)
    if b == 0xdd and c.end - c.p >= 5:
        c.p += 5
        return get_be32(c.p - 4)
    return -1


cdef inline Py_ssize_t frame_ops(Cursor* c) noexcept:
    """Read a frame's array header; the op count, or -1."""
    cdef Py_ssize_t size = c.end - c.p, n
    if size > WIRE_MAX_PLAINTEXT or size < 1:
        return -1
    n = take_array(c)
    return n if n <= WIRE_MAX_OPS else -1


cdef struct SendRec:
    # one SEND of a frame, read in place: where its id and body are in the
    # frame's bytes, the body's length, and its cls
    Py_ssize_t cid
    Py_ssize_t body
    Py_ssize_t size
    int cls


@cython.final
cdef class _SendRun:
    """A frame's valid SENDs, read in place: what :func:`decode_sends` gives.

    It reads as the flat list the specification gives, ``id, to, body, cls``
    a SEND (length, items, slices, iteration, ``==``), but holds no id or
    body ``bytes`` of its own: the gate's compiled loop reads them where
    they are in the frame, so a SEND it stores or relays makes only its
    DELIVER tail.  A slice of whole SENDs is another run over the same
    frame; any other slice or item is made when asked for.
    """

    cdef bytes frame          # the plaintext the records point into
    cdef bytes recs_buf       # SendRec records, shared by a run's slices
    cdef list tos             # each SEND's recipient, shared along runs of one
    cdef const SendRec* recs
    cdef Py_ssize_t start, stop

    def __len__(self):
        return 4 * (self.stop - self.start)

    cdef inline const char* cid_at(self, Py_ssize_t k) noexcept:
        return PyBytes_AS_STRING(self.frame) + self.recs[self.start + k].cid

    cdef inline const char* body_at(self, Py_ssize_t k) noexcept:
        return PyBytes_AS_STRING(self.frame) + self.recs[self.start + k].body

    cdef inline Py_ssize_t size_at(self, Py_ssize_t k) noexcept:
        return self.recs[self.start + k].size

    cdef inline int cls_at(self, Py_ssize_t k) noexcept:
        return self.recs[self.start + k].cls

    cdef inline object to_at(self, Py_ssize_t k):
        return <object>PyList_GET_ITEM(self.tos, self.start + k)

    cdef object field(self, Py_ssize_t i):
        # the i-th item of the flat list (0 <= i < len)
        cdef Py_ssize_t k = i >> 2
        cdef int f = <int>(i & 3)
        if f == 0:
            return fr_bytes(self.cid_at(k), 16)
        if f == 1:
            return self.to_at(k)
        if f == 2:
            return fr_bytes(self.body_at(k), self.size_at(k))
        return self.cls_at(k)

    cdef _SendRun view(self, Py_ssize_t a, Py_ssize_t b):
        # SENDs a..b (relative, 0 <= a <= b <= count) over the same records
        cdef _SendRun r = _SendRun.__new__(_SendRun)
        r.frame = self.frame
        r.recs_buf = self.recs_buf
        r.tos = self.tos
        r.recs = self.recs
        r.start = self.start + a
        r.stop = self.start + b
        return r

    def __getitem__(self, index):
        cdef Py_ssize_t n = 4 * (self.stop - self.start), i, a, b, step
        if isinstance(index, slice):
            a, b, step = index.indices(n)
            if step == 1 and a % 4 == 0 and (b % 4 == 0 or b == n):
                # whole SENDs: a run over the same frame
                b = max(a, b)
                return self.view(a >> 2, (b + 3) >> 2)
            return [self.field(i) for i in range(a, b, step)]
        i = index
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("_SendRun index out of range")
        return self.field(i)

    def __iter__(self):
        return iter(self.tolist())

    def tolist(self):
        """The flat list ``id, to, body, cls`` a SEND (what the
        specification's decoder gives)."""
        cdef Py_ssize_t i
        return [self.field(i) for i in range(4 * (self.stop - self.start))]

    def __eq__(self, other):
        if isinstance(other, _SendRun):
            other = other.tolist()
        if not isinstance(other, list):
            return NotImplemented
        return self.tolist() == other

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None

    def __repr__(self):
        return f"_SendRun({self.stop - self.start} SENDs)"

    def __reduce__(self):
        # a copy (the tests deep-copy what they feed both twins) is the list
        return (list, (self.tolist(),))


def decode_sends(plaintext, set addr_ok):
    """The fast path of :func:`fastroute.wire.decode_client_frame`, in C.

    Returns the SENDs as a :class:`_SendRun` (which reads as the flat list
    ``id, to, body, cls`` a SEND, with no tuple or ``bytes`` a message)
    when ``plaintext`` (exact bytes) is a msgpack array of valid SEND ops in
    their usual encoding -- ``[1, id bin8 of 16, to str, body bin, cls 0|1]``
    as fixints -- whose recipients are all in ``addr_ok`` (addresses already
    known valid); ``None`` for anything else, including every error, so the
    caller decodes that frame the slow way and reports exactly what it always
    did.
    """
    if not PyBytes_CheckExact(plaintext):
        return None
    cdef Py_ssize_t size = PyBytes_GET_SIZE(plaintext)
    cdef Cursor c
    cdef Py_ssize_t n, i, k
    cdef unsigned char b
    cdef list tos
    cdef object to, prev_to = None
    cdef const unsigned char* base
    cdef const unsigned char* prev_p = NULL
    cdef Py_ssize_t prev_n = -1
    cdef bytes recs_buf
    cdef SendRec* recs
    cdef _SendRun run
    base = <const unsigned char*>PyBytes_AS_STRING(plaintext)
    c.p = base
    c.end = c.p + size
    n = frame_ops(&c)
    if n < 0:
        return None
    # most frames that are not SENDs (a receiver's DACKs, an end-to-end
    # client's DSENDs and GSENDs) say so in their first op's first bytes:
    # declined before anything is allocated for them
    if n and (c.end - c.p < 2 or c.p[0] != 0x95 or c.p[1] != 0x01):
        return None
    # the bytes object is immutable and we hold a reference: the cursor and
    # the records' offsets stay valid across the allocations below
    recs_buf = PyBytes_FromStringAndSize(NULL, n * sizeof(SendRec) if n else 1)
    recs = <SendRec*>PyBytes_AS_STRING(recs_buf)
    tos = []
    for i in range(n):
        # [1, id: bin8 of 16, ...
        if c.end - c.p < 20 or c.p[0] != 0x95 or c.p[1] != 0x01 \
                or c.p[2] != 0xc4 or c.p[3] != 0x10:
            return None
        recs[i].cid = (c.p + 4) - base
        c.p += 20
        k = take_len(&c, 0xd9, 0xa0, 31)
        if k < 0 or k > WIRE_MAX_STR or c.end - c.p < k:
            return None
        # recipients repeat: reuse the str decoded for the same bytes
        if k == prev_n and memcmp(c.p, prev_p, <size_t>k) == 0:
            to = prev_to
        else:
            try:
                to = PyUnicode_DecodeUTF8(<const char*>c.p, k, NULL)
            except UnicodeDecodeError:
                return None
            if not PySet_Contains(addr_ok, to):
                return None
            prev_to = to
            prev_p = c.p
            prev_n = k
        c.p += k
        k = take_len(&c, 0xc4, 0, 0)
        if k < 0 or k > WIRE_MAX_BODY or c.end - c.p < k + 1:
            return None
        recs[i].body = c.p - base
        recs[i].size = k
        c.p += k
        b = c.p[0]
        if b > 1:
            return None
        recs[i].cls = b
        c.p += 1
        tos.append(to)
    if c.p != c.end:
        return None
    run = _SendRun.__new__(_SendRun)
    run.frame = plaintext
    run.recs_buf = recs_buf
    run.tos = tos
    run.recs = recs
    run.start = 0
    run.stop = n
    return run


cdef inline int take_uint(Cursor* c, unsigned long long* out) noexcept:
    """Read a msgpack unsigned int (fixint, uint8..uint64) into ``out[0]``.

    Returns 1, or 0 (cursor unmoved) for any other encoding or a short buffer.
    """
    cdef unsigned char b
    if c.p >= c.end:
        return 0
    b = c.p[0]
    if b <= 0x7f:
        out[0] = b
        c.p += 1
        return 1
    if b == 0xcc and c.end - c.p >= 2:
        out[0] = c.p[1]
        c.p += 2
        return 1
    if b == 0xcd and c.end - c.p >= 3:
        out[0] = get_be16(c.p + 1)
        c.p += 3
        return 1
    if b == 0xce and c.end - c.p >= 5:
        out[0] = get_be32(c.p + 1)
        c.p += 5
        return 1
    if b == 0xcf and c.end - c.p >= 9:
        out[0] = (<unsigned long long>get_be32(c.p + 1) << 32) | get_be32(c.p + 5)
        c.p += 9
        return 1
    return 0


cdef struct TailSpan:
    # a DELIVER tail's fields, where they lie in its bytes (see tail_span)
    const unsigned char* sender
    Py_ssize_t sender_len
    const unsigned char* cid       # 16 bytes
    const unsigned char* body
    Py_ssize_t body_len
    long long ts
    long long device               # a DDELIVER tail's sender device (tail_span, copy)


cdef int tail_span(object tail, TailSpan* s, bint copy=False, Py_ssize_t skip=0) except -1:
    """Read ``tail`` (a DELIVER tail; with ``copy``, a DDELIVER tail, its
    sender's device id after its sender) into ``s`` as strictly as
    :func:`tail_fields` (:func:`copy_tail_fields`) reads it, all but its
    sender's UTF-8, which the caller checks (once for a run of one sender's
    tails, say).  The tail starts ``skip`` bytes in (a routed tail's head)."""
    if not PyBytes_CheckExact(tail):
        raise WrongType("a DELIVER tail is bytes")
    if not 0 <= skip <= PyBytes_GET_SIZE(tail):
        raise InvalidArgument("a tail's start is within it")
    cdef Cursor c
    cdef Py_ssize_t k
    cdef unsigned long long ts, cls, device
    c.end = <const unsigned char*>PyBytes_AS_STRING(tail) + PyBytes_GET_SIZE(tail)
    c.p = <const unsigned char*>PyBytes_AS_STRING(tail) + skip
    k = take_len(&c, 0xd9, 0xa0, 31)
    if k < 0 or c.end - c.p < k:
        raise InvalidArgument("a DELIVER tail starts with its sender (a str)")
    s.sender = c.p
    s.sender_len = k
    c.p += k
    s.device = 0
    if copy:
        if not take_uint(&c, &device) or device > <unsigned long long>INT64_MAX:
            raise InvalidArgument("a DDELIVER tail's sender device is an unsigned int")
        s.device = <long long>device
    k = take_len(&c, 0xc4, 0, 0)
    if k != 16 or c.end - c.p < k:
        raise InvalidArgument("a DELIVER tail's id is a bin of 16")
    s.cid = c.p
    c.p += 16
    k = take_len(&c, 0xc4, 0, 0)
    if k < 0 or c.end - c.p < k:
        raise InvalidArgument("a DELIVER tail's body is a bin")
    s.body = c.p
    s.body_len = k
    c.p += k
    if (not take_uint(&c, &ts) or ts > <unsigned long long>INT64_MAX
            or not take_uint(&c, &cls) or cls > 1 or c.p != c.end):
        raise InvalidArgument("a DELIVER tail ends with ts_ms and cls (0 or 1)")
    s.ts = <long long>ts
    return 0


cdef int check_utf8(const unsigned char* p, Py_ssize_t n) except -1:
    """InvalidArgument unless ``p[:n]`` is UTF-8 (a DELIVER tail's sender)."""
    try:
        PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError:
        raise InvalidArgument("a DELIVER tail's sender is UTF-8") from None
    return 0


cdef tuple c_tail_fields(object tail, object mid=None, list senders=None,
                         Py_ssize_t skip=0):
    """:func:`tail_fields` for C callers; with ``mid`` (not None) the row
    ``(mid, from, id, body, ts_ms)`` instead.  ``senders`` (a list of one, the
    last sender read) lets a run of one sender's tails share its str.  The
    tail starts ``skip`` bytes in (``WIRE_ROUTED_HEAD``: a routed tail's)."""
    cdef TailSpan s
    cdef Py_ssize_t have
    cdef object sender = None, last
    cdef const char* last_p
    tail_span(tail, &s, False, skip)
    if senders is not None and PyList_GET_SIZE(senders) == 1:
        last = <object>PyList_GET_ITEM(senders, 0)
        if PyUnicode_CheckExact(last):
            last_p = PyUnicode_AsUTF8AndSize(last, &have)
            if have == s.sender_len and memcmp(last_p, s.sender, <size_t>have) == 0:
                sender = last
    if sender is None:
        try:
            sender = PyUnicode_DecodeUTF8(<const char*>s.sender, s.sender_len, NULL)
        except UnicodeDecodeError:
            raise InvalidArgument("a DELIVER tail's sender is UTF-8") from None
        if senders is not None and PyList_GET_SIZE(senders) == 1:
            senders[0] = sender
    return _span_fields(&s, sender, mid)


cdef tuple _span_fields(TailSpan* s, object sender, object mid):
    """``(from, id, body, ts_ms)`` of the tail read into ``s``, ``from`` given
    as ``sender``; with ``mid`` (not None) the row ``(mid, from, id, body,
    ts_ms)`` instead."""
    cdef object cid = fr_bytes(<const char*>s.cid, 16)
    cdef object body = fr_bytes(<const char*>s.body, s.body_len)
    if mid is not None:
        return (mid, sender, cid, body, s.ts)
    return (sender, cid, body, s.ts)


def tail_fields(tail):
    """``(from, id, body, ts_ms)`` of a DELIVER tail: :func:`deliver_tail`'s
    inverse, for the memory store, which keeps a message as its route."""
    return c_tail_fields(tail)


# fixarray(8) + uint16 2001: the DDELIVER head (wire.DDELIVER_HEAD)
cdef bytes DDELIVER_HEAD_BYTES = b"\x98\xcd\x07\xd1"


cdef tuple c_copy_tail_fields(object tail, object mid=None):
    """:func:`copy_tail_fields` for C callers; with ``mid`` (not None) the
    row ``(mid, from, id, body, ts_ms)`` instead."""
    cdef TailSpan s
    cdef object address, sender
    tail_span(tail, &s, True)
    try:
        address = PyUnicode_DecodeUTF8(<const char*>s.sender, s.sender_len, NULL)
    except UnicodeDecodeError:
        raise InvalidArgument("a DELIVER tail's sender is UTF-8") from None
    # the store's sender of a copy (senders.copy_sender)
    sender = f"{address}/{s.device}"
    return _span_fields(&s, sender, mid)


def copy_tail_fields(tail):
    """``(from, id, body, ts_ms)`` of a per-device copy's DDELIVER tail, ``from``
    the store's ``address/device_id`` (see
    ``fastroute.wire.py_copy_tail_fields``)."""
    return c_copy_tail_fields(tail)


cdef object uint_ops(object plaintext, unsigned char opcode):
    """The unsigned second fields of a frame made only of ``[opcode, uint]``
    ops (``opcode`` a positive fixint), or None."""
    if not PyBytes_CheckExact(plaintext):
        return None
    cdef Py_ssize_t size = PyBytes_GET_SIZE(plaintext)
    cdef Cursor c
    cdef Py_ssize_t n, i
    cdef list values
    cdef unsigned long long value = 0
    c.p = <const unsigned char*>PyBytes_AS_STRING(plaintext)
    c.end = c.p + size
    n = frame_ops(&c)
    if n < 0:
        return None
    values = []
    for i in range(n):
        # [opcode, value uint]
        if c.end - c.p < 3 or c.p[0] != 0x92 or c.p[1] != opcode:
            return None
        c.p += 2
        if not take_uint(&c, &value):
            return None
        values.append(value)
    if c.p != c.end:
        return None
    return values


def decode_pings(plaintext):
    """The tokens of a frame made only of PINGs, in C: the cheap op a flooder
    sends by the thousand, read without a Python object per op but its token.

    Returns the list of tokens when ``plaintext`` (exact bytes) is a msgpack
    array of ``[3, token]`` ops with unsigned tokens (any width); ``None`` for
    anything else (other ops, negative tokens, errors), which the caller then
    decodes the precise way.
    """
    return uint_ops(plaintext, 0x03)


def decode_dacks(plaintext):
    """The ``upto_seq`` of each op of a frame made only of DACKs ``[2, upto
    uint]``, in C: what every receiving client sends, most often alone in its
    frame; ``None`` for anything else (see ``fastroute.wire.py_decode_dacks``)."""
    return uint_ops(plaintext, 0x02)


cdef enum:
    WIRE_SCAN_DEPTH = 16         # deeper nesting: declined (no op nests past 3)


cdef int skip_value(Cursor* c, int depth) noexcept:
    """Move past one msgpack value; 0 if it is outside what frame_offsets
    answers for (maps, exts, non-ASCII or long strs, deep nesting, the
    reserved byte) or the buffer ends inside it."""
    cdef unsigned char b
    cdef Py_ssize_t n, i
    if c.p >= c.end:
        return 0
    b = c.p[0]
    if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3:
        c.p += 1
        return 1
    if 0xa0 <= b <= 0xbf or 0xd9 <= b <= 0xdb:
        n = take_len(c, 0xd9, 0xa0, 31)
        if n < 0 or n > WIRE_MAX_STR or c.end - c.p < n:
            return 0
        for i in range(n):
            if c.p[i] >= 0x80:
                return 0  # UTF-8 past ASCII: the precise decoder judges it
        c.p += n
        return 1
    if 0xc4 <= b <= 0xc6:
        n = take_len(c, 0xc4, 0, 0)
        if n < 0 or c.end - c.p < n:
            return 0
        c.p += n
        return 1
    if b == 0xca or b == 0xcb:  # float32, float64
        n = 5 if b == 0xca else 9
    elif 0xcc <= b <= 0xd3:  # uint8..64, int8..64
        n = 1 + (1 << ((b - 0xcc) & 3))
    elif 0x90 <= b <= 0x9f or b == 0xdc or b == 0xdd:
        if depth >= WIRE_SCAN_DEPTH:
            return 0
        n = take_array(c)
        if n < 0 or n > WIRE_MAX_OPS:
            return 0
        for i in range(n):
            if not skip_value(c, depth + 1):
                return 0
        return 1
    else:
        return 0  # maps, exts, 0xc1
    if c.end - c.p < n:
        return 0
    c.p += n
    return 1


def frame_offsets(plaintext):
    """Where each op of a client frame starts, in C, without decoding any:
    the relay then unpacks a long frame a chunk of ops at a time.

    Returns ``[start of op 0, ..., start of op n-1, end]`` (byte offsets, as
    a read-only memoryview of unsigned shorts) when ``plaintext`` (exact
    bytes) is a msgpack array of values made of ints, floats, nil, bools,
    bins, ASCII strs of at most ``MAX_REASON_LEN`` bytes and arrays, with
    nothing after it; ``None`` for anything else, which
    the caller then unpacks whole (maps, exts and the rest are legal there:
    its checks answer them op by op).
    """
    if not PyBytes_CheckExact(plaintext):
        return None
    cdef Py_ssize_t size = PyBytes_GET_SIZE(plaintext)
    cdef Cursor c
    cdef Py_ssize_t n, i
    cdef const unsigned char* base
    cdef bytes offsets
    cdef unsigned short* out
    base = <const unsigned char*>PyBytes_AS_STRING(plaintext)
    c.p = base
    c.end = base + size
    n = frame_ops(&c)
    if n < 0 or n > size:
        return None
    # one uint16 per offset (a frame is under 64 KiB), no Python int each
    offsets = PyBytes_FromStringAndSize(NULL, 2 * (n + 1))
    out = <unsigned short*>PyBytes_AS_STRING(offsets)
    for i in range(n):
        out[i] = <unsigned short>(c.p - base)
        if not skip_value(&c, 1):
            return None
    if c.p != c.end:
        return None
    out[n] = <unsigned short>size
    return memoryview(offsets).cast("H")


def decode_server_ops(plaintext, set addr_ok):
    """The fast path of :func:`fastroute.wire.decode_server_frame`, in C.

    Returns the decoded list when ``plaintext`` (exact bytes) is a msgpack
    array of valid SACK ``[17, id bin8 of 16, code]`` and DELIVER ``[18, seq,
    from str, id bin8 of 16, body bin, ts_ms, cls 0|1]`` ops (ints unsigned,
    any width) whose senders are all in ``addr_ok``; ``None`` for anything
    else, so the caller decodes that frame the slow, precise way.
    """
    if not PyBytes_CheckExact(plaintext):
        return None
    cdef Py_ssize_t size = PyBytes_GET_SIZE(plaintext)
    cdef Cursor c
    cdef Py_ssize_t n, i, k
    cdef unsigned char b
    cdef list ops
    cdef object cid, sender, body, prev = None
    cdef unsigned long long seq = 0, ts = 0, code = 0
    cdef const unsigned char* prev_p = NULL
    cdef Py_ssize_t prev_n = -1
    c.p = <const unsigned char*>PyBytes_AS_STRING(plaintext)
    c.end = c.p + size
    n = frame_ops(&c)
    if n < 0:
        return None
    ops = []
    for i in range(n):
        if c.end - c.p < 2:
            return None
        if c.p[0] == 0x93 and c.p[1] == 0x11:          # SACK
            if c.end - c.p < 20 or c.p[2] != 0xc4 or c.p[3] != 0x10:
                return None
            cid = fr_bytes(<const char*>c.p + 4, 16)
            c.p += 20
            if not take_uint(&c, &code):
                return None
            ops.append((17, cid, PyLong_FromUnsignedLongLong(code)))
            continue
        if c.p[0] != 0x97 or c.p[1] != 0x12:            # DELIVER
            return None
        c.p += 2
        if not take_uint(&c, &seq):
            return None
        k = take_len(&c, 0xd9, 0xa0, 31)
        if k < 0 or k > WIRE_MAX_STR or c.end - c.p < k:
            return None
        if k == prev_n and memcmp(c.p, prev_p, <size_t>k) == 0:
            sender = prev
        else:
            try:
                sender = PyUnicode_DecodeUTF8(<const char*>c.p, k, NULL)
            except UnicodeDecodeError:
                return None
            if not PySet_Contains(addr_ok, sender):
                return None
            prev = sender
            prev_p = c.p
            prev_n = k
        c.p += k
        if c.end - c.p < 18 or c.p[0] != 0xc4 or c.p[1] != 0x10:
            return None
        cid = fr_bytes(<const char*>c.p + 2, 16)
        c.p += 18
        k = take_len(&c, 0xc4, 0, 0)
        if k < 0 or k > WIRE_MAX_BODY or c.end - c.p < k:
            return None
        body = fr_bytes(<const char*>c.p, k)
        c.p += k
        if not take_uint(&c, &ts):
            return None
        if c.p >= c.end or c.p[0] > 1:
            return None
        b = c.p[0]
        c.p += 1
        ops.append((18, PyLong_FromUnsignedLongLong(seq), sender, cid, body,
                    PyLong_FromUnsignedLongLong(ts), b))
    if c.p != c.end:
        return None
    return ops


# registration ids 1..16383 as ints, made once each and kept for the
# process (at most 16,383 of them, ~0.6 MB): a frame of DSENDs names the same
# few devices' ids op after op, and an int above 256 is otherwise allocated
# (and freed a turn later) for every copy
cdef PyObject* _REG_IDS[0x4000]


cdef inline object reg_id_int(unsigned long long reg):
    """``reg`` (1..0x3FFF, checked by the caller) as its one kept int."""
    cdef object o
    cdef PyObject* p = _REG_IDS[reg]
    if p == NULL:
        o = PyLong_FromUnsignedLongLong(reg)
        Py_INCREF(o)  # the table's reference, never released
        _REG_IDS[reg] = <PyObject*>o
        return o
    return <object>p


cdef struct EntryRec:
    # one DSEND entry of a frame, read in place (see _Entries)
    Py_ssize_t body     # where its ciphertext starts in the frame
    Py_ssize_t size
    int did
    int reg


@cython.final
cdef class _EntryRecs:
    """A frame's DSEND entry records, grown as the frame is read and shared by
    its ops' :class:`_Entries` (freed with the last of them)."""

    cdef EntryRec* recs
    cdef Py_ssize_t n, cap

    def __dealloc__(self):
        PyMem_Free(self.recs)

    cdef int add(self, Py_ssize_t body, Py_ssize_t size, int did, int reg) except -1:
        cdef EntryRec* grown
        cdef Py_ssize_t cap
        if self.n == self.cap:
            cap = self.cap * 2 if self.cap else 64
            grown = <EntryRec*>PyMem_Realloc(self.recs, cap * sizeof(EntryRec))
            if grown == NULL:
                raise MemoryError()
            self.recs = grown
            self.cap = cap
        self.recs[self.n].body = body
        self.recs[self.n].size = size
        self.recs[self.n].did = did
        self.recs[self.n].reg = reg
        self.n += 1
        return 0


@cython.final
cdef class _Entries:
    """A DSEND's entries, read in place: what :func:`decode_dsends` gives for
    a non-empty entries (or own) field.

    It reads as the tuple of ``(device id, registration id, ciphertext)``
    tuples the specification gives (length, items, slices, iteration,
    ``==``), but holds no tuple or ``bytes`` of its own: the keys stage's
    compiled loop (``c_dsend_copies``) reads each ciphertext where it is in
    the frame, so an accepted copy makes only its DDELIVER tail.  Any item
    is made when asked for.
    """

    cdef bytes frame          # the plaintext the records point into
    cdef _EntryRecs buf       # the frame's records (their array may move: indices here)
    cdef Py_ssize_t start, stop

    def __len__(self):
        return self.stop - self.start

    cdef inline const EntryRec* rec(self, Py_ssize_t k) noexcept:
        return &self.buf.recs[self.start + k]

    cdef inline const char* body_at(self, Py_ssize_t k) noexcept:
        return PyBytes_AS_STRING(self.frame) + self.buf.recs[self.start + k].body

    cdef Py_ssize_t nbytes(self) noexcept:
        # the ciphertexts' bytes in all
        cdef Py_ssize_t k, total = 0
        for k in range(self.start, self.stop):
            total += self.buf.recs[k].size
        return total

    cdef tuple entry(self, Py_ssize_t k):
        cdef const EntryRec* r = self.rec(k)
        return (PyLong_FromLongLong(r.did), reg_id_int(<unsigned long long>r.reg),
                fr_bytes(self.body_at(k), r.size))

    def totuple(self):
        """The entries as the specification's tuple of tuples."""
        cdef Py_ssize_t k
        return tuple([self.entry(k) for k in range(self.stop - self.start)])

    def __getitem__(self, index):
        cdef Py_ssize_t n = self.stop - self.start, i
        if isinstance(index, slice):
            return self.totuple()[index]
        i = index
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("_Entries index out of range")
        return self.entry(i)

    def __iter__(self):
        return iter(self.totuple())

    def __eq__(self, other):
        if isinstance(other, _Entries):
            other = other.totuple()
        if not isinstance(other, tuple):
            return NotImplemented
        return self.totuple() == other

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None

    def __repr__(self):
        return f"_Entries({self.stop - self.start} entries)"

    def __reduce__(self):
        # a copy (the tests deep-copy what they feed both twins) is the tuple
        return (tuple, (self.totuple(),))


cdef object take_entries(Cursor* c, bytes frame, _EntryRecs buf):
    """A DSEND's ``[[device id 1..127, registration id 1..16383, ciphertext bin
    <= MAX_BODY], ...]`` (at most 127) as :class:`_Entries` over ``frame``
    (records appended to ``buf``; ``()`` when there are none), or None."""
    cdef Py_ssize_t n, i, k, start
    cdef unsigned long long did = 0, reg = 0
    cdef _Entries out
    cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(frame)
    if c.p >= c.end:
        return None
    if 0x90 <= c.p[0] <= 0x9f:
        n = c.p[0] & 0x0f
        c.p += 1
    elif c.p[0] == 0xdc and c.end - c.p >= 3:
        n = get_be16(c.p + 1)
        c.p += 3
    else:
        return None
    if n > 127:
        return None
    start = buf.n
    for i in range(n):
        if c.p >= c.end or c.p[0] != 0x93:
            return None
        c.p += 1
        if not take_uint(c, &did) or did < 1 or did > 127:
            return None
        if not take_uint(c, &reg) or reg < 1 or reg > 0x3FFF:
            return None
        k = take_len(c, 0xc4, 0, 0)
        if k < 0 or k > WIRE_MAX_BODY or c.end - c.p < k:
            return None
        buf.add(c.p - base, k, <int>did, <int>reg)
        c.p += k
    if n == 0:
        return ()
    out = _Entries.__new__(_Entries)
    out.frame = frame
    out.buf = buf
    out.start = start
    out.stop = buf.n
    return out


def decode_dsends(plaintext, set addr_ok):
    """A frame of DSENDs decoded in C (see ``fastroute.wire.py_decode_dsends``).

    Returns the ops when ``plaintext`` (exact bytes) is a msgpack array of
    valid DSEND ops ``[1004, id bin8 of 16, to str, more bool, entries,
    own]`` in the usual encodings whose recipients are all in ``addr_ok``;
    ``None`` for anything else, so the caller decodes that frame the precise
    way.  Non-empty entries come as :class:`_Entries`, read in place (empty
    ones as ``()``).
    """
    if not PyBytes_CheckExact(plaintext):
        return None
    cdef Cursor c
    cdef Py_ssize_t n, i, k
    cdef list ops
    cdef object cid, to = None, more, entries, own
    cdef const unsigned char* prev_p = NULL
    cdef Py_ssize_t prev_n = -1
    # the frame's entry records, one array for all its ops
    cdef _EntryRecs buf = _EntryRecs.__new__(_EntryRecs)
    c.p = <const unsigned char*>PyBytes_AS_STRING(plaintext)
    c.end = c.p + PyBytes_GET_SIZE(plaintext)
    n = frame_ops(&c)
    if n < 0:
        return None
    ops = []
    for i in range(n):
        # [1004 (uint16), id: bin8 of 16, ...
        if c.end - c.p < 22 or c.p[0] != 0x96 or c.p[1] != 0xcd or c.p[2] != 0x03 \
                or c.p[3] != 0xec or c.p[4] != 0xc4 or c.p[5] != 0x10:
            return None
        cid = fr_bytes(<const char*>c.p + 6, 16)
        c.p += 22
        k = take_len(&c, 0xd9, 0xa0, 31)
        if k < 0 or k > WIRE_MAX_STR or c.end - c.p < k:
            return None
        if not (k == prev_n and memcmp(c.p, prev_p, <size_t>k) == 0):
            try:
                to = PyUnicode_DecodeUTF8(<const char*>c.p, k, NULL)
            except UnicodeDecodeError:
                return None
            if not PySet_Contains(addr_ok, to):
                return None
            prev_p = c.p
            prev_n = k
        c.p += k
        if c.p >= c.end or (c.p[0] != 0xc2 and c.p[0] != 0xc3):
            return None
        more = True if c.p[0] == 0xc3 else False
        c.p += 1
        entries = take_entries(&c, <bytes>plaintext, buf)
        if entries is None:
            return None
        own = take_entries(&c, <bytes>plaintext, buf)
        if own is None:
            return None
        ops.append((1004, cid, to, more, entries, own))
    if c.p != c.end:
        return None
    return ops


def decode_gsends(plaintext):
    """A frame of GSENDs decoded in C (see ``fastroute.wire.py_decode_gsends``).

    Returns the ops when ``plaintext`` (exact bytes) is a msgpack array of
    valid GSEND ops ``[1107, id bin8 of 16, group bin8 of 16, version uint,
    body bin]`` in the usual encodings; ``None`` for anything else, so the
    caller decodes that frame the precise way.
    """
    if not PyBytes_CheckExact(plaintext):
        return None
    cdef Cursor c
    cdef Py_ssize_t n, i, k
    cdef list ops
    cdef object cid, gid, body
    cdef unsigned long long version = 0
    c.p = <const unsigned char*>PyBytes_AS_STRING(plaintext)
    c.end = c.p + PyBytes_GET_SIZE(plaintext)
    n = frame_ops(&c)
    if n < 0:
        return None
    ops = []
    for i in range(n):
        # [1107 (uint16), id: bin8 of 16, group: bin8 of 16, ...
        if c.end - c.p < 40 or c.p[0] != 0x95 or c.p[1] != 0xcd or c.p[2] != 0x04 \
                or c.p[3] != 0x53 or c.p[4] != 0xc4 or c.p[5] != 0x10 \
                or c.p[22] != 0xc4 or c.p[23] != 0x10:
            return None
        cid = fr_bytes(<const char*>c.p + 6, 16)
        gid = fr_bytes(<const char*>c.p + 24, 16)
        c.p += 40
        if not take_uint(&c, &version):
            return None
        k = take_len(&c, 0xc4, 0, 0)
        if k < 0 or k > WIRE_MAX_BODY or c.end - c.p < k:
            return None
        body = fr_bytes(<const char*>c.p, k)
        c.p += k
        ops.append((1107, cid, gid, PyLong_FromUnsignedLongLong(version), body))
    if c.p != c.end:
        return None
    return ops


def leading_gsends(list ops):
    """How many leading ops of ``ops`` are GSEND tuples ``(1107, ...)`` of five
    fields (see ``fastroute.wire.py_leading_gsends``)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(ops)
    cdef object op, opcode
    for i in range(n):
        op = <object>PyList_GET_ITEM(ops, i)
        if not PyTuple_CheckExact(op) or PyTuple_GET_SIZE(op) != 5:
            return i
        opcode = <object>PyTuple_GET_ITEM(op, 0)
        if not PyLong_CheckExact(opcode) or opcode != 1107:
            return i
    return n


cdef inline bint _entries_ok(object v) except -1:
    # [device id 1..127, registration id 1..16383, ciphertext bin <= MAX_BODY], at most 127
    cdef Py_ssize_t n, i
    cdef object e, did, reg, body
    if not PyTuple_CheckExact(v):
        return False
    n = PyTuple_GET_SIZE(v)
    if n > 127:
        return False
    for i in range(n):
        e = <object>PyTuple_GET_ITEM(v, i)
        if not PyTuple_CheckExact(e) or PyTuple_GET_SIZE(e) != 3:
            return False
        did = <object>PyTuple_GET_ITEM(e, 0)
        reg = <object>PyTuple_GET_ITEM(e, 1)
        body = <object>PyTuple_GET_ITEM(e, 2)
        if not (PyLong_CheckExact(did) and 1 <= did <= 127 and PyLong_CheckExact(reg)
                and 1 <= reg <= 0x3FFF and PyBytes_CheckExact(body)
                and PyBytes_GET_SIZE(body) <= WIRE_MAX_BODY):
            return False
    return True


def leading_dsends(list ops):
    """How many leading ops of ``ops`` are single-op DSEND tuples ``(1004, id, to,
    False, entries, own)`` (see ``fastroute.wire.py_leading_dsends``)."""
    cdef Py_ssize_t i, n = PyList_GET_SIZE(ops)
    cdef object op, opcode
    for i in range(n):
        op = <object>PyList_GET_ITEM(ops, i)
        if not PyTuple_CheckExact(op) or PyTuple_GET_SIZE(op) != 6:
            return i
        opcode = <object>PyTuple_GET_ITEM(op, 0)
        if not PyLong_CheckExact(opcode) or opcode != 1004 \
                or <object>PyTuple_GET_ITEM(op, 3) is not False:
            return i
    return n


def gsend_ok(object op):
    """:func:`fastroute.wire.py_gsend_ok` in C: whether a decoded op is a valid
    GSEND ``[1107, id, group, version, body]``.  False says nothing: the
    caller checks the op precisely."""
    cdef object opcode, mid, gid, version, body
    if not PyTuple_CheckExact(op) or PyTuple_GET_SIZE(op) != 5:
        return False
    opcode = <object>PyTuple_GET_ITEM(op, 0)
    mid = <object>PyTuple_GET_ITEM(op, 1)
    gid = <object>PyTuple_GET_ITEM(op, 2)
    version = <object>PyTuple_GET_ITEM(op, 3)
    body = <object>PyTuple_GET_ITEM(op, 4)
    return (PyLong_CheckExact(opcode) and opcode == 1107
            and PyBytes_CheckExact(mid) and PyBytes_GET_SIZE(mid) == 16
            and PyBytes_CheckExact(gid) and PyBytes_GET_SIZE(gid) == 16
            and PyLong_CheckExact(version) and version >= 0
            and PyBytes_CheckExact(body) and PyBytes_GET_SIZE(body) <= WIRE_MAX_BODY)


def dsend_ok(object op, set addr_ok):
    """:func:`fastroute.wire.py_dsend_ok` in C: whether a decoded op is a valid
    DSEND ``[1004, id, to, more, entries, own]`` whose recipient is in
    ``addr_ok``.  False says nothing: the caller checks the op precisely."""
    cdef object opcode, mid, to, more
    if not PyTuple_CheckExact(op) or PyTuple_GET_SIZE(op) != 6:
        return False
    opcode = <object>PyTuple_GET_ITEM(op, 0)
    mid = <object>PyTuple_GET_ITEM(op, 1)
    to = <object>PyTuple_GET_ITEM(op, 2)
    more = <object>PyTuple_GET_ITEM(op, 3)
    if not (PyLong_CheckExact(opcode) and opcode == 1004
            and PyBytes_CheckExact(mid) and PyBytes_GET_SIZE(mid) == 16
            and PyUnicode_CheckExact(to) and PySet_Contains(addr_ok, to)
            and (more is True or more is False)):
        return False
    return _entries_ok(<object>PyTuple_GET_ITEM(op, 4)) and _entries_ok(
        <object>PyTuple_GET_ITEM(op, 5))
