# The client library's per-message paths (fastroute.client.Client), compiled.
# Part of fastroute._core, included after _wire.pxi (it uses its Cursor,
# take_len, take_uint and the msgpack header writers).
#
# Compiled twins of fastroute/client.py (the specification):
#   pack_sends      = py_pack_sends
#   pack_dsend      = py_pack_dsend
#   pack_dsends     = py_pack_dsends
#   dispatch_frame  = py_dispatch_frame
#
# * pack_sends: the SEND ops of Client.send_many (same bytes, same exceptions).
# * pack_dsend: the one DSEND op of Client.send_to_devices_nowait whose copies
#   fit a frame (same bytes as msgpack); entries of other shapes than tuples
#   or lists of ints and bytes are handed to its specification.
# * pack_dsends: the DSEND ops of Client.send_to_devices_many, one
#   pack_dsend each, ids cut from the client's pool (same ids, same ops).
# * dispatch_frame: Client._on_frame for a frame of SACKs and DELIVERs (and
#   the e2ee and groups ops a client gets by the thousand: accepted REPLYs,
#   DDELIVERs, GDELIVERs); it declines (returns None, having done nothing) any other frame, and the
#   client's Python loop -- the oracle the tests compare against -- does it.
#   Its specification declines every frame.

from cpython.list cimport PyList_CheckExact
from cpython.object cimport PyTypeObject
from cpython.sequence cimport PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.type cimport PyType_IsSubtype
from cpython.unicode cimport PyUnicode_AsUTF8AndSize

from fastroute.errors import BodyTooLarge


cdef extern from *:
    """
    /* a tuple subclass instance is a bare tuple up to 3.13; later versions
       may add fields that PyType_GenericAlloc would leave zeroed */
    #if PY_VERSION_HEX < 0x030E0000
    #define FR_TUPLE_GENERIC_ALLOC 1
    #else
    #define FR_TUPLE_GENERIC_ALLOC 0
    #endif
    #define fr_generic_alloc(t, n) PyType_GenericAlloc((PyTypeObject*)(t), (n))
    """
    bint FR_TUPLE_GENERIC_ALLOC
    object fr_generic_alloc(object t, Py_ssize_t n)


def pack_sends(bytes pool not None, Py_ssize_t at, bytes to_packed not None,
               list bodies not None, int cls, object target, dict pending):
    """The packed SEND ops of a batch to one recipient: ``(ids, ops)``.

    The i-th message gets id ``pool[at + 16 i : at + 16 (i + 1)]`` and op
    ``[1, id (bin8 of 16), to, body (bin), cls]`` where ``to_packed`` is the
    recipient already packed as a msgpack str.  Every body is checked before
    anything is built (WrongType unless exact bytes, BodyTooLarge over
    MAX_BODY); then, unless ``pending`` is None, ``pending[id] = target``
    for each message, in order (the caller keeps the ops, for resending).
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(bodies), i, k, hb
    cdef Py_ssize_t nt = PyBytes_GET_SIZE(to_packed)
    cdef object body
    cdef bytes cid, op
    cdef list ids, ops
    cdef unsigned char* p
    cdef const char* src
    if cls != 0 and cls != 1:
        raise InvalidArgument("cls must be 0 or 1")
    if at < 0 or n > (PyBytes_GET_SIZE(pool) - at) // 16:
        raise InvalidArgument("id pool too short for the batch")
    for i in range(n):
        body = <object>PyList_GET_ITEM(bodies, i)
        if not PyBytes_CheckExact(body):
            raise WrongType("SEND needs id: bytes, to: str, body: bytes")
        if PyBytes_GET_SIZE(body) > WIRE_MAX_BODY:
            raise BodyTooLarge(f"body over {WIRE_MAX_BODY} bytes: send it via the media store")
    ids = []
    ops = []
    src = PyBytes_AS_STRING(pool) + at
    for i in range(n):
        # allocations may run the GC, hence any code: re-check what we read
        if i >= PyList_GET_SIZE(bodies):
            raise RuntimeError("bodies changed while packing")
        body = <object>PyList_GET_ITEM(bodies, i)
        if not PyBytes_CheckExact(body) or PyBytes_GET_SIZE(body) > WIRE_MAX_BODY:
            raise RuntimeError("bodies changed while packing")
        k = PyBytes_GET_SIZE(body)
        hb = bin_header_len(k)
        cid = fr_bytes(src + 16 * i, 16)
        op = PyBytes_FromStringAndSize(NULL, 20 + nt + hb + k + 1)
        p = <unsigned char*>PyBytes_AS_STRING(op)
        p[0] = 0x95
        p[1] = 0x01
        p[2] = 0xc4
        p[3] = 0x10
        memcpy(p + 4, PyBytes_AS_STRING(cid), 16)
        fr_copy(p + 20, PyBytes_AS_STRING(to_packed), <size_t>nt)
        p += 20 + nt
        p += bin_header(p, k)
        fr_copy(p, PyBytes_AS_STRING(body), <size_t>k)
        p[k] = <unsigned char>cls
        ids.append(cid)
        ops.append(op)
    if pending is not None:
        # the target itself, not a (target, op) tuple: one container object
        # per message less for the cyclic GC to track and traverse
        for i in range(n):
            pending[ids[i]] = target
    return ids, ops


ctypedef struct ServerOp:
    # one op of a frame dispatch_frame takes, pointing into the frame: a SACK
    # (kind 17), DELIVER (18) or, with the e2ee and groups kinds allowed, an
    # accepted REPLY (2000), a DDELIVER (2001) or a GDELIVER (2100)
    int kind
    unsigned long long seq
    unsigned long long ts
    unsigned long long code
    unsigned long long sdev       # the sending device (DDELIVER, GDELIVER)
    const unsigned char* cid      # 16 bytes
    const unsigned char* group    # 16 bytes (GDELIVER)
    const unsigned char* sender
    Py_ssize_t nsender
    const unsigned char* body
    Py_ssize_t nbody
    int cls


cdef inline int take_id(Cursor* c, const unsigned char** out) noexcept:
    """A 16-byte bin8 id: ``out[0]`` points at its bytes; 0 for anything else."""
    if c.end - c.p < 18 or c.p[0] != 0xc4 or c.p[1] != 0x10:
        return 0
    out[0] = c.p + 2
    c.p += 18
    return 1


cdef inline int take_copy(Cursor* c, ServerOp* op, bint device) noexcept:
    """The fields a DELIVER, DDELIVER and GDELIVER share, from the sender on:
    ``sender[, sender device], id, body, ts_ms, cls``; 0 for anything else."""
    cdef Py_ssize_t k = take_len(c, 0xd9, 0xa0, 31)
    if k < 0 or k > WIRE_MAX_STR or c.end - c.p < k:
        return 0
    op.sender = c.p
    op.nsender = k
    c.p += k
    if device and not take_uint(c, &op.sdev):
        return 0
    if not take_id(c, &op.cid):
        return 0
    k = take_len(c, 0xc4, 0, 0)
    if k < 0 or k > WIRE_MAX_BODY or c.end - c.p < k:
        return 0
    op.body = c.p
    op.nbody = k
    c.p += k
    if not take_uint(c, &op.ts):
        return 0
    if c.p >= c.end or c.p[0] > 1:
        return 0
    op.cls = c.p[0]
    c.p += 1
    return 1


cdef inline int parse_server_op(Cursor* c, ServerOp* op, bint features) noexcept:
    """One SACK or DELIVER in the encodings decode_server_ops accepts (and,
    with ``features``, an accepted REPLY, a DDELIVER or a GDELIVER in the
    relay's encodings); 0 otherwise."""
    if c.end - c.p < 2:
        return 0
    if c.p[0] == 0x93 and c.p[1] == 0x11:              # SACK
        if c.end - c.p < 20 or c.p[2] != 0xc4 or c.p[3] != 0x10:
            return 0
        op.kind = 17
        op.cid = c.p + 4
        c.p += 20
        return take_uint(c, &op.code)
    if c.p[0] == 0x97 and c.p[1] == 0x12:              # DELIVER
        c.p += 2
        op.kind = 18
        return take_uint(c, &op.seq) and take_copy(c, op, False)
    if not features or c.end - c.p < 4 or c.p[1] != 0xcd:
        return 0
    if c.p[0] == 0x95 and c.end - c.p >= 25 and memcmp(c.p, REPLY_OK_HEAD, 6) == 0 \
            and memcmp(c.p + 22, REPLY_OK_TAIL, 3) == 0:   # REPLY, code 0, last, nil
        op.kind = 2000
        op.cid = c.p + 6
        c.p += 25
        return 1
    if c.p[0] == 0x98 and c.p[2] == 0x07 and c.p[3] == 0xd1:   # DDELIVER
        c.p += 4
        op.kind = 2001
        return take_uint(c, &op.seq) and take_copy(c, op, True)
    if c.p[0] == 0x99 and c.p[2] == 0x08 and c.p[3] == 0x34:   # GDELIVER
        c.p += 4
        op.kind = 2100
        return (take_uint(c, &op.seq) and take_id(c, &op.group)
                and take_copy(c, op, True))
    return 0


cdef object new_record(type rec_type, Py_ssize_t n, PyObject** items):
    """``tuple.__new__(rec_type, items[:n])``, one allocation (a NamedTuple of n fields)."""
    cdef object m
    cdef Py_ssize_t i
    if not FR_TUPLE_GENERIC_ALLOC:
        m = PyTuple_New(n)
        for i in range(n):
            Py_INCREF(<object>items[i])
            PyTuple_SET_ITEM(m, i, <object>items[i])
        return tuple.__new__(rec_type, m)
    m = fr_generic_alloc(rec_type, n)
    # no allocation below: the GC never sees the tuple half filled
    for i in range(n):
        Py_INCREF(<object>items[i])
        PyTuple_SET_ITEM(m, i, <object>items[i])
    return m


cdef int check_record_type(object t, str name) except -1:
    cdef PyTypeObject* rt = <PyTypeObject*>t
    cdef PyTypeObject* tt = <PyTypeObject*>tuple
    if type(t) is not type or not PyType_IsSubtype(<type>t, tuple) \
            or rt.tp_basicsize != tt.tp_basicsize or rt.tp_itemsize != tt.tp_itemsize \
            or rt.tp_dictoffset != 0:
        raise WrongType(f"{name} must be a tuple subclass without instance dict")
    return 0


cdef inline Py_ssize_t int_len(long long v) noexcept:
    """Bytes of ``v`` packed as msgpack-python packs an int (the smallest form)."""
    if v >= 0:
        if v < 0x80:
            return 1
        if v < 0x100:
            return 2
        if v < 0x10000:
            return 3
        return 5 if v < 0x100000000LL else 9
    if v >= -32:
        return 1
    if v >= -0x80:
        return 2
    if v >= -0x8000:
        return 3
    return 5 if v >= -0x80000000LL else 9


cdef inline Py_ssize_t put_int(unsigned char* p, long long v) noexcept:
    """Write ``v`` as :func:`int_len` sized it; return its length."""
    cdef unsigned long long u = <unsigned long long>v
    if v >= 0:
        if v < 0x80:
            p[0] = <unsigned char>v
            return 1
        if v < 0x100:
            p[0] = 0xcc
            p[1] = <unsigned char>v
            return 2
        if v < 0x10000:
            p[0] = 0xcd
            put_be16(p + 1, <uint32_t>v)
            return 3
        if v < 0x100000000LL:
            p[0] = 0xce
            put_be32(p + 1, <uint32_t>v)
            return 5
        p[0] = 0xcf
    elif v >= -32:
        p[0] = <unsigned char>(v & 0xff)
        return 1
    elif v >= -0x80:
        p[0] = 0xd0
        p[1] = <unsigned char>(v & 0xff)
        return 2
    elif v >= -0x8000:
        p[0] = 0xd1
        put_be16(p + 1, <uint32_t>(u & 0xffff))
        return 3
    elif v >= -0x80000000LL:
        p[0] = 0xd2
        put_be32(p + 1, <uint32_t>(u & 0xffffffffULL))
        return 5
    else:
        p[0] = 0xd3
    put_be32(p + 1, <uint32_t>(u >> 32))
    put_be32(p + 5, <uint32_t>(u & 0xffffffffULL))
    return 9


cdef inline int fast_entry(PyObject* e, long long* did, long long* reg) except -1:
    """1 when ``e`` is an exact tuple or list ``(int, int, bytes)`` whose ints
    fit 64 signed bits (``did`` and ``reg`` get them), else 0."""
    cdef int overflow = 0
    cdef object o = <object>e, a, b
    if not (PyTuple_CheckExact(o) or PyList_CheckExact(o)) or PySequence_Fast_GET_SIZE(o) != 3:
        return 0
    a = <object>PySequence_Fast_GET_ITEM(o, 0)
    b = <object>PySequence_Fast_GET_ITEM(o, 1)
    if not (PyLong_CheckExact(a) and PyLong_CheckExact(b)
            and PyBytes_CheckExact(<object>PySequence_Fast_GET_ITEM(o, 2))):
        return 0
    did[0] = PyLong_AsLongLongAndOverflow(a, &overflow)
    if overflow:
        return 0
    reg[0] = PyLong_AsLongLongAndOverflow(b, &overflow)
    return 0 if overflow else 1


cdef Py_ssize_t entries_len(object seq, Py_ssize_t* weight) except -2:
    """Packed length of a list or tuple of fast entries (array header
    included), adding each copy's weight (ciphertext + 16) to ``weight``;
    -1 if one is not a fast entry."""
    cdef Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), i, k
    cdef Py_ssize_t size = array_header_len(n)
    cdef long long did = 0, reg = 0
    cdef PyObject* e
    for i in range(n):
        e = PySequence_Fast_GET_ITEM(seq, i)
        if not fast_entry(e, &did, &reg):
            return -1
        k = PyBytes_GET_SIZE(<object>PySequence_Fast_GET_ITEM(<object>e, 2))
        weight[0] += k + 16
        size += 1 + int_len(did) + int_len(reg) + bin_header_len(k) + k
    return size


cdef Py_ssize_t put_entries(unsigned char* p, unsigned char* end, object seq) except -1:
    """Write what :func:`entries_len` measured; return its length.  The
    allocation before may have run the GC, hence any code: every entry is
    checked again and every write bounded."""
    cdef Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), i, k, need
    cdef long long did = 0, reg = 0
    cdef PyObject* e
    cdef object body
    cdef unsigned char* start = p
    if end - p < array_header_len(n):
        raise RuntimeError("entries changed while packing")
    p += array_header(p, n)
    for i in range(n):
        if i >= PySequence_Fast_GET_SIZE(seq):
            raise RuntimeError("entries changed while packing")
        e = PySequence_Fast_GET_ITEM(seq, i)
        if not fast_entry(e, &did, &reg):
            raise RuntimeError("entries changed while packing")
        body = <object>PySequence_Fast_GET_ITEM(<object>e, 2)
        k = PyBytes_GET_SIZE(body)
        need = 1 + int_len(did) + int_len(reg) + bin_header_len(k) + k
        if end - p < need:
            raise RuntimeError("entries changed while packing")
        p[0] = 0x93
        p += 1
        p += put_int(p, did)
        p += put_int(p, reg)
        p += bin_header(p, k)
        fr_copy(p, PyBytes_AS_STRING(body), <size_t>k)
        p += k
    return p - start


def pack_dsend(cid, to, entries, own, Py_ssize_t room):
    """The one packed DSEND ``[1004, id, to, False, entries, own]`` of a
    message whose copies weigh at most ``room`` (a copy: its ciphertext's
    length + 16), else None.

    Entries ``(device id, registration id, ciphertext)`` as exact tuples or
    lists of ints and bytes are packed here, the bytes msgpack would give;
    any other shape goes to the specification (``client.py_pack_dsend``).
    """
    cdef Py_ssize_t weight = 0, ne, no, nc, nt, size
    cdef const char* t
    cdef bytes op
    cdef unsigned char* p
    cdef unsigned char* end
    if (PyBytes_CheckExact(cid) and PyUnicode_CheckExact(to)
            and (PyList_CheckExact(entries) or PyTuple_CheckExact(entries))
            and (PyList_CheckExact(own) or PyTuple_CheckExact(own))):
        ne = entries_len(entries, &weight)
        no = entries_len(own, &weight) if ne >= 0 else -1
        if no >= 0:
            if weight > room:
                return None
            try:
                t = PyUnicode_AsUTF8AndSize(to, &nt)
            except UnicodeEncodeError:
                t = NULL  # msgpack's error, from the specification
            if t != NULL:
                nc = PyBytes_GET_SIZE(cid)
                size = (1 + 3 + bin_header_len(nc) + nc + str_header_len(nt) + nt
                        + 1 + ne + no)
                op = PyBytes_FromStringAndSize(NULL, size)
                p = <unsigned char*>PyBytes_AS_STRING(op)
                end = p + size
                p[0] = 0x96
                p[1] = 0xcd  # 1004, Op.DSEND
                p[2] = 0x03
                p[3] = 0xec
                p += 4
                # id and to are immutable: their lengths still hold
                p += bin_header(p, nc)
                fr_copy(p, PyBytes_AS_STRING(cid), <size_t>nc)
                p += nc
                p += str_header(p, nt)
                fr_copy(p, t, <size_t>nt)
                p += nt
                p[0] = 0xc2  # more: False
                p += 1
                p += put_entries(p, end, entries)
                p += put_entries(p, end, own)
                if p != end:
                    raise RuntimeError("entries changed while packing")
                return op
    from fastroute.client import py_pack_dsend
    return py_pack_dsend(cid, to, entries, own, room)


cdef bint all_arrays(object x):
    """``x`` is an exact list or tuple of exact lists or tuples (``wire._are_arrays``)."""
    cdef Py_ssize_t i
    cdef object e
    if not (PyList_CheckExact(x) or PyTuple_CheckExact(x)):
        return False
    for i in range(len(x)):
        e = x[i]
        if not (PyTuple_CheckExact(e) or PyList_CheckExact(e)):
            return False
    return True


def pack_dsends(pool, Py_ssize_t at, messages, Py_ssize_t room):
    """The DSEND ops of a batch (``client.py_pack_dsends``): ``(ids, ops)``, an
    id cut from ``pool`` per message and its one op, or None where the
    caller's general path must pack it."""
    cdef tuple seq
    cdef list ids = [], ops = []
    cdef Py_ssize_t i, n
    cdef object m, cid, entries, own, op
    if (not PyBytes_CheckExact(pool)
            or not (PyList_CheckExact(messages) or PyTuple_CheckExact(messages))
            or at < 0 or at + 16 * len(messages) > PyBytes_GET_SIZE(pool)):
        from fastroute.client import py_pack_dsends
        return py_pack_dsends(pool, at, messages, room)
    # a snapshot: the packer's specification may run code that changes the list
    seq = tuple(messages)
    n = len(seq)
    for i in range(n):
        m = seq[i]
        cid = fr_bytes(PyBytes_AS_STRING(pool) + at + 16 * i, 16)
        ids.append(cid)
        op = None
        if (PyTuple_CheckExact(m) or PyList_CheckExact(m)) and 2 <= len(m) <= 3:
            entries = m[1]
            own = m[2] if len(m) == 3 else ()
            if all_arrays(entries) and all_arrays(own):
                op = pack_dsend(cid, m[0], entries, own, room)
        ops.append(op)
    return ids, ops


def dispatch_frame(plaintext, set addr_ok, DedupTable seen not None, object inbox,
                   dict pending, type batch_type, type msg_type, object client,
                   object dropped, object refused, dict requests=None, object dev_type=None,
                   object group_type=None, object on_reply=None):
    """Client._on_frame's per-op loop for a frame of SACKs and DELIVERs (and,
    given ``requests`` and the rest, accepted REPLYs, DDELIVERs and GDELIVERs).

    Returns True when ``plaintext`` is a frame that decode_server_ops would
    decode entirely (SACK and DELIVER ops, senders in ``addr_ok``) -- or,
    given ``requests``, such a frame that may also hold REPLY ``[2000, id,
    0, true, nil]``, DDELIVER and GDELIVER ops in the relay's encodings --
    and every op was handled, in order, exactly as the client's Python loop
    does:

    * DELIVER: ``(sender, id)`` already in ``seen`` (a :class:`DedupTable`
      whose window is its size: looked up at time 0) ->
      ``dropped(client, seq)``; else it is recorded with code 0 and
      ``msg_type(seq, sender, id, body, ts_ms, cls == 1)`` appended to
      ``inbox``;
    * SACK: ``pending.pop(id)`` is a ``batch_type`` (counted down on code 0;
      settled at 0) or a ``(future, op)`` tuple: ``set_result(id)`` on code
      0, ``refused(target, code)`` otherwise, unless already done;
    * DDELIVER and GDELIVER: as DELIVER, appending ``dev_type(seq, sender,
      device, id, body, ts_ms)`` and ``group_type(seq, group, sender,
      device, id, body, ts_ms)``;
    * REPLY: ``requests.get(id)`` is None -> nothing; a ``(future, parts)``
      with parts gathered -> ``on_reply(op)`` (the loop's own handling);
      else it is popped and the future, unless done, gets ``None``.

    Returns None, having done nothing, for any other frame.
    """
    cdef Cursor c
    cdef ServerOp op
    cdef Py_ssize_t n, i, slot, at
    cdef object sender = None, cid, body, entry, target, left, code, seq, ts
    cdef object eph, dev, group, parts
    cdef object inbox_append
    cdef int was_seen, seen_code
    cdef Py_hash_t h
    cdef bint features = requests is not None
    cdef PyObject* items[7]
    cdef const unsigned char* prev_p = NULL
    cdef Py_ssize_t prev_n = -1
    check_record_type(msg_type, "msg_type")
    if features:
        check_record_type(dev_type, "dev_type")
        check_record_type(group_type, "group_type")
    if not PyBytes_CheckExact(plaintext):
        return None
    # pass 1: the whole frame is ours, or we decline before any effect
    c.p = <const unsigned char*>PyBytes_AS_STRING(plaintext)
    c.end = c.p + PyBytes_GET_SIZE(plaintext)
    n = frame_ops(&c)
    if n < 0:
        return None
    for i in range(n):
        if not parse_server_op(&c, &op, features):
            return None
        if op.kind != 17 and op.kind != 2000 and not (
                op.nsender == prev_n and memcmp(op.sender, prev_p, <size_t>prev_n) == 0):
            try:
                sender = PyUnicode_DecodeUTF8(<const char*>op.sender, op.nsender, NULL)
            except UnicodeDecodeError:
                return None
            if not PySet_Contains(addr_ok, sender):
                return None
            prev_p = op.sender
            prev_n = op.nsender
    if c.p != c.end:
        return None
    # pass 2: the effects (the bytes object is immutable and held: the
    # cursor stays valid whatever the calls below run)
    inbox_append = inbox.append
    c.p = <const unsigned char*>PyBytes_AS_STRING(plaintext)
    frame_ops(&c)
    prev_n = -1
    for i in range(n):
        parse_server_op(&c, &op, features)
        cid = fr_bytes(<const char*>op.cid, 16)
        if op.kind == 17:
            entry = pending.pop(cid, None)
            if entry is None:
                continue
            target = entry if type(entry) is batch_type else entry[0]
            if type(target) is batch_type and op.code == 0:
                left = target.left - 1
                target.left = left
                if left:
                    continue
            if target.done():
                continue
            if op.code == 0:
                target.set_result(cid)
            else:
                code = PyLong_FromUnsignedLongLong(op.code)
                refused(target, code)
            continue
        if op.kind == 2000:
            entry = requests.get(cid)
            if entry is None:
                continue
            target, parts = entry
            if parts:
                # a result gathered over several REPLYs: the loop's own way
                on_reply((2000, cid, 0, True, None))
                continue
            requests.pop(cid, None)
            if not target.done():
                target.set_result(None)
            continue
        if not (op.nsender == prev_n and memcmp(op.sender, prev_p, <size_t>prev_n) == 0):
            sender = PyUnicode_DecodeUTF8(<const char*>op.sender, op.nsender, NULL)
            prev_p = op.sender
            prev_n = op.nsender
        seq = PyLong_FromUnsignedLongLong(op.seq)
        # ids are unique per sender, not globally; one probe finds the id and
        # where to record it (nothing else touches the window in between)
        h = dedup_hash(sender, cid)
        slot = seen.c_find(sender, cid, h, 0.0, &was_seen, &seen_code, &at)
        if was_seen:
            dropped(client, seq)
            continue
        seen.c_record(sender, cid, h, 0, 0.0, slot, at)
        body = fr_bytes(<const char*>op.body, op.nbody)
        ts = PyLong_FromUnsignedLongLong(op.ts)
        if op.kind == 18:
            eph = True if op.cls == 1 else False
            items[0] = <PyObject*>seq
            items[1] = <PyObject*>sender
            items[2] = <PyObject*>cid
            items[3] = <PyObject*>body
            items[4] = <PyObject*>ts
            items[5] = <PyObject*>eph
            inbox_append(new_record(msg_type, 6, items))
            continue
        dev = PyLong_FromUnsignedLongLong(op.sdev)
        if op.kind == 2001:
            items[0] = <PyObject*>seq
            items[1] = <PyObject*>sender
            items[2] = <PyObject*>dev
            items[3] = <PyObject*>cid
            items[4] = <PyObject*>body
            items[5] = <PyObject*>ts
            inbox_append(new_record(dev_type, 6, items))
            continue
        group = fr_bytes(<const char*>op.group, 16)
        items[0] = <PyObject*>seq
        items[1] = <PyObject*>group
        items[2] = <PyObject*>sender
        items[3] = <PyObject*>dev
        items[4] = <PyObject*>cid
        items[5] = <PyObject*>body
        items[6] = <PyObject*>ts
        inbox_append(new_record(group_type, 7, items))
    return True
