# The store stage's per-message loops (fastroute.store.MemoryStore), compiled.
# Part of fastroute._core.
#
# Compiled twins of fastroute/store.py (the specification):
#   mem_put   = py_mem_put
#   mem_ack   = py_mem_ack
#   mem_load  = py_mem_load
#
# tests/test_fastpath.py runs both on the same inputs and compares the dicts
# they leave.
#
# The layout is MemoryStore's: ``msgs`` maps mid -> (sender, id, body, ts_ms,
# exp_ms); ``left`` mid -> inboxes holding it, for the messages more than one
# inbox holds (a tuple and no count: one allocation a message, not a list's
# two); ``inbox`` maps device key -> {mid: None, ...} in mid order.

from cpython.dict cimport PyDict_Next


def mem_put(list items, dict msgs, dict left, dict inbox, long long first, long long ttl_ms,
            list mids):
    """Store ``items`` ``(sender, id, body, ts_ms, device_keys)`` from mid ``first`` on.

    Each stored mid is appended to ``mids`` as soon as its message is in
    ``msgs`` and every inbox, so after an exception (a malformed item)
    ``mids`` still tells which mids were used.
    """
    cdef long long mid = first
    cdef object item, sender, cid, body, ts, devs, d, key, box
    cdef object last_ts = None, exp = None, last_devs = None
    cdef list boxes = None
    cdef Py_ssize_t ndevs = 0
    for item in items:
        sender, cid, body, ts, devs = item
        # a batch's messages share their stamp, and a run of them its
        # recipient's device keys: the sum and the inboxes once a run
        if ts is not last_ts:
            exp = ts + ttl_ms
            last_ts = ts
        if devs is not last_devs:
            ndevs = len(devs)
            boxes = []
            for d in devs:
                box = inbox.get(d)
                if box is None:
                    box = inbox[d] = {}
                boxes.append(<dict?>box)
            last_devs = devs
        key = PyLong_FromLongLong(mid)
        msgs[key] = (sender, cid, body, ts, exp)
        if ndevs > 1:
            left[key] = ndevs
        for box in boxes:
            (<dict>box)[key] = None
        mids.append(key)
        mid += 1


def mem_ack(dict box, dict msgs, dict left, mids):
    """Delete ``mids`` from one device's inbox ``box``; a message no inbox
    holds any more leaves ``msgs``.  Mids not in ``box`` are ignored."""
    cdef object m
    cdef PyObject* n
    cdef Py_ssize_t k
    for m in mids:
        if box.pop(m, 0) is None:  # present (values are None), not a repeat
            n = PyDict_GetItemWithError(left, m) if left else NULL
            if n == NULL:
                del msgs[m]
                continue
            k = <object>n
            if k == 2:
                del left[m]  # one inbox left: no entry
            else:
                left[m] = k - 1


def mem_load(dict box, dict msgs, after_mid, Py_ssize_t limit):
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
            msg = msgs[m]
            out.append((m, msg[0], msg[1], msg[2], msg[3]))
            if PyList_GET_SIZE(out) >= limit:
                break
    return out
