# The store stage's per-message loops (fastroute.store.MemoryStore), compiled.
# Part of fastroute._core.
#
# Compiled twins of fastroute/store.py (the specification):
#   mem_put   = py_mem_put
#   mem_ack   = py_mem_ack
#   mem_load  = py_mem_load
#   sql_rows  = py_sql_rows
#
# tests/test_fastpath.py runs both on the same inputs and compares the dicts
# they leave.
#
# The layout is MemoryStore's: ``inbox`` maps device key -> {mid: (sender,
# id, body, ts_ms, exp_ms), ...} in mid order, one tuple shared by a
# message's inboxes (one dict write a message and device, no table of
# messages beside); ``left`` mid -> inboxes holding it, for the messages
# more than one inbox holds.

from cpython.dict cimport PyDict_Next
from cpython.list cimport PyList_CheckExact
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport INT64_MAX


def mem_put(list items, dict left, dict inbox, long long first, long long ttl_ms, list mids):
    """Store ``items`` ``(sender, id, body, ts_ms, device_keys)`` from mid ``first`` on
    (an item for no device is refused: InvalidArgument).

    Each stored mid is appended to ``mids`` as soon as its message is in
    every inbox, so after an exception (a malformed item) ``mids`` still
    tells which mids were used.
    """
    cdef long long mid = first
    cdef object item, sender, cid, body, ts, devs, d, key, box, msg
    cdef object last_ts = None, exp = None, last_devs = None
    cdef list boxes = None
    cdef dict by_keys = None  # device keys (a tuple) -> their inboxes, past the first
    cdef PyObject* found
    cdef Py_ssize_t ndevs = 0
    for item in items:
        sender, cid, body, ts, devs = item
        # a batch's messages share their stamp, and a run of them its
        # recipient's device keys: the sum and the inboxes once a run
        if ts is not last_ts:
            exp = ts + ttl_ms
            last_ts = ts
        if devs is not last_devs:
            # per-device copies in turns (a peer's devices, copy after copy)
            # are stored under each device's one tuple of keys: its inboxes
            # are looked up once a batch
            found = NULL
            if by_keys is not None and PyTuple_CheckExact(devs):
                found = PyDict_GetItemWithError(by_keys, devs)
            if found != NULL:
                boxes = <list>found
                ndevs = PyTuple_GET_SIZE(devs)
            else:
                ndevs = len(devs)
                boxes = []
                for d in devs:
                    box = inbox.get(d)
                    if box is None:
                        box = inbox[d] = {}
                    boxes.append(<dict?>box)
                if PyTuple_CheckExact(devs) and last_devs is not None:
                    # a second tuple in this batch: copies in turns (a
                    # batch of one device's copies makes no table)
                    if by_keys is None:
                        by_keys = {}
                    by_keys[devs] = boxes
            last_devs = devs
        if not ndevs:
            raise InvalidArgument("device_keys must not be empty")
        key = PyLong_FromLongLong(mid)
        msg = (sender, cid, body, ts, exp)
        if ndevs > 1:
            left[key] = ndevs
        for box in boxes:
            (<dict>box)[key] = msg
        mids.append(key)
        mid += 1


def mem_ack(dict box, dict left, mids):
    """Delete ``mids`` from one device's inbox ``box``; returns how many
    messages no inbox holds any more.  Mids not in ``box`` are ignored."""
    cdef object m
    cdef PyObject* n
    cdef Py_ssize_t k, gone = 0
    for m in mids:
        if box.pop(m, None) is not None:  # present, not a repeat
            n = PyDict_GetItemWithError(left, m) if left else NULL
            if n == NULL:
                gone += 1
                continue
            k = <object>n
            if k == 2:
                del left[m]  # one inbox left: no entry
            else:
                left[m] = k - 1
    return gone


def mem_load(dict box, after_mid, Py_ssize_t limit):
    """Up to ``limit`` rows ``(mid, sender, id, body, ts_ms)`` of one device's
    inbox ``box`` with mid > ``after_mid``, in mid order."""
    cdef list out = []
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    cdef object m
    cdef tuple msg
    cdef Py_ssize_t size = len(box)
    if limit <= 0:
        return out
    while PyDict_Next(box, &pos, &key, &value):
        if len(box) != size:  # as a Python loop would (an allocation may run the GC)
            raise RuntimeError("dictionary changed size during iteration")
        m = <object>key
        if m > after_mid:
            if not PyTuple_CheckExact(<object>value) or PyTuple_GET_SIZE(<object>value) != 5:
                raise WrongType("an inbox holds (sender, id, body, ts_ms, exp_ms) tuples")
            msg = <object>value
            out.append((m, msg[0], msg[1], msg[2], msg[3]))
            if PyList_GET_SIZE(out) >= limit:
                break
    return out


# -- SqliteStore's put loop: one transaction's new rows -----------------------

cdef struct PackDraft:
    # one device's pack while a transaction's puts are laid out
    long long first, last, n, nbytes, exp
    int64_t* mids
    Py_ssize_t mids_cap
    # the msgpack entries after PACK_HEAD bytes kept for the array header
    unsigned char* data
    Py_ssize_t size, cap


cdef enum:
    PACK_HEAD = 5   # the longest msgpack array header (array32)


cdef int draft_reserve(PackDraft* d, Py_ssize_t more) except -1:
    """Room for ``more`` bytes of entries and one more mid in ``d``."""
    cdef Py_ssize_t cap
    cdef void* p
    if d.n >= d.mids_cap:
        cap = 64 if d.mids_cap == 0 else d.mids_cap * 2
        p = PyMem_Realloc(d.mids, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        d.mids = <int64_t*>p
        d.mids_cap = cap
    if PACK_HEAD + d.size + more > d.cap:
        cap = max(2 * d.cap, PACK_HEAD + d.size + more, 4096)
        p = PyMem_Realloc(d.data, cap)
        if p == NULL:
            raise MemoryError()
        d.data = <unsigned char*>p
        d.cap = cap
    return 0


def sql_rows(list puts, long long mid, long long ttl_ms):
    """The rows of one transaction's new messages (see ``py_sql_rows``): the
    messages for one device msgpack'd straight into its pack, no per-message
    tuple; ``(messages rows, inbox rows, packs rows)``, flat lists."""
    cdef list msg_rows = [], inbox_rows = [], pack_rows = []
    cdef list keys = []             # the drafts' device keys, in draft order
    cdef dict index = {}            # device key -> draft number
    cdef PackDraft* drafts = NULL
    cdef PackDraft* d
    cdef Py_ssize_t ndrafts = 0, cap = 0, i = -1, j, k, ndevs, ulen, clen, blen, hlen, size
    cdef object items, item, sender, cid, body, ts, devs, dv, key, last_devs = None
    cdef PyObject* found
    cdef const char* utf8
    cdef unsigned char* p
    cdef long long ts_v, exp
    cdef int overflow = 0
    cdef void* grown
    try:
        for items in puts:
            if not PyList_CheckExact(items):
                raise WrongType("puts is a list of lists of items")
            for j in range(PyList_GET_SIZE(items)):
                item = <object>PyList_GET_ITEM(items, j)
                if not PyTuple_CheckExact(item) or PyTuple_GET_SIZE(item) != 5:
                    raise WrongType("a put item is a tuple (sender, cid, body, ts_ms, "
                                    "device keys)")
                sender = <object>PyTuple_GET_ITEM(item, 0)
                cid = <object>PyTuple_GET_ITEM(item, 1)
                body = <object>PyTuple_GET_ITEM(item, 2)
                ts = <object>PyTuple_GET_ITEM(item, 3)
                devs = <object>PyTuple_GET_ITEM(item, 4)
                if not (PyUnicode_CheckExact(sender) and PyBytes_CheckExact(cid)
                        and PyBytes_CheckExact(body) and PyLong_CheckExact(ts)):
                    raise WrongType("a put item is (str, bytes, bytes, int, device keys)")
                ts_v = PyLong_AsLongLongAndOverflow(ts, &overflow)
                if overflow or ts_v > INT64_MAX - ttl_ms:
                    raise OverflowError("ts_ms + ttl does not fit 64 bits")
                exp = ts_v + ttl_ms
                ndevs = len(devs)
                if ndevs == 1:
                    # a run of messages for one recipient shares its tuple
                    # of keys: the draft is looked up once a run
                    if devs is not last_devs or not PyTuple_CheckExact(devs):
                        key = devs[0]
                        found = PyDict_GetItemWithError(index, key)
                        if found != NULL:
                            i = <Py_ssize_t><object>found
                        else:
                            if ndrafts == cap:
                                cap = 8 if cap == 0 else 2 * cap
                                grown = PyMem_Realloc(drafts, cap * sizeof(PackDraft))
                                if grown == NULL:
                                    raise MemoryError()
                                drafts = <PackDraft*>grown
                            i = ndrafts
                            drafts[i] = PackDraft(mid, mid, 0, 0, exp, NULL, 0, NULL, 0, 0)
                            ndrafts += 1
                            index[key] = i
                            keys.append(key)
                        last_devs = devs
                    d = &drafts[i]
                    utf8 = PyUnicode_AsUTF8AndSize(sender, &ulen)
                    clen = PyBytes_GET_SIZE(cid)
                    blen = PyBytes_GET_SIZE(body)
                    # (mid, sender, cid, body, ts_ms, exp_ms) as msgpack packs it
                    draft_reserve(d, 1 + int_len(mid) + str_header_len(ulen) + ulen
                                  + bin_header_len(clen) + clen + bin_header_len(blen) + blen
                                  + int_len(ts_v) + int_len(exp))
                    p = d.data + PACK_HEAD + d.size
                    p[0] = 0x96
                    k = 1
                    k += put_int(p + k, mid)
                    k += str_header(p + k, ulen)
                    memcpy(p + k, utf8, ulen)
                    k += ulen
                    k += bin_header(p + k, clen)
                    memcpy(p + k, PyBytes_AS_STRING(cid), clen)
                    k += clen
                    k += bin_header(p + k, blen)
                    memcpy(p + k, PyBytes_AS_STRING(body), blen)
                    k += blen
                    k += put_int(p + k, ts_v)
                    k += put_int(p + k, exp)
                    d.size += k
                    d.mids[d.n] = mid
                    d.n += 1
                    d.last = mid
                    d.nbytes += blen
                    if exp < d.exp:
                        d.exp = exp
                elif ndevs == 0:
                    # nobody would ack it: it would sit on disk until it expires
                    raise InvalidArgument("device_keys must not be empty")
                else:
                    key = PyLong_FromLongLong(mid)
                    msg_rows += (key, None, sender, cid, body, ts, PyLong_FromLongLong(exp))
                    for dv in devs:
                        inbox_rows.append(dv)
                        inbox_rows.append(key)
                mid += 1
        for i in range(ndrafts):
            d = &drafts[i]
            hlen = array_header_len(<Py_ssize_t>d.n)
            array_header(d.data + PACK_HEAD - hlen, <Py_ssize_t>d.n)
            pack_rows += (keys[i], d.first, d.last, d.n, d.nbytes, d.exp,
                          PyBytes_FromStringAndSize(<char*>d.mids, d.n * sizeof(int64_t)),
                          PyBytes_FromStringAndSize(<char*>d.data + PACK_HEAD - hlen,
                                                    d.size + hlen))
    finally:
        for i in range(ndrafts):
            PyMem_Free(drafts[i].mids)
            PyMem_Free(drafts[i].data)
        PyMem_Free(drafts)
    return msg_rows, inbox_rows, pack_rows
