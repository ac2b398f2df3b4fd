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
# The layout is MemoryStore's: ``msgs`` maps mid -> [sender, id, body, ts_ms,
# exp_ms, recipients left]; ``inbox`` maps device key -> {mid: None, ...} in
# mid order.

from cpython.dict cimport PyDict_Next


def mem_put(list items, dict msgs, dict inbox, long long first, long long ttl_ms,
            list mids):
    """Store ``items`` ``(sender, id, body, ts_ms, device_keys)`` from mid ``first`` on.

    Each stored mid is appended to ``mids`` as soon as its message is in
    ``msgs`` and every inbox, so after an exception (a malformed item)
    ``mids`` still tells which mids were used.
    """
    cdef long long mid = first
    cdef object item, sender, cid, body, ts, devs, d, key
    cdef object box
    for item in items:
        sender, cid, body, ts, devs = item
        key = PyLong_FromLongLong(mid)
        msgs[key] = [sender, cid, body, ts, ts + ttl_ms, len(devs)]
        for d in devs:
            box = inbox.get(d)
            if box is None:
                box = inbox[d] = {}
            (<dict?>box)[key] = None
        mids.append(key)
        mid += 1


def mem_ack(dict box, dict msgs, mids):
    """Delete ``mids`` from one device's inbox ``box``; a message no inbox
    holds any more leaves ``msgs``.  Mids not in ``box`` are ignored."""
    cdef object m
    cdef list msg
    cdef Py_ssize_t left
    for m in mids:
        if box.pop(m, 0) is None:  # present (values are None), not a repeat
            msg = msgs[m]
            left = msg[5]
            left -= 1
            if left == 0:
                del msgs[m]
            else:
                msg[5] = left


def mem_load(dict box, dict msgs, after_mid, Py_ssize_t limit):
    """Up to ``limit`` rows ``(mid, sender, id, body, ts_ms)`` of one device's
    inbox ``box`` with mid > ``after_mid``, in mid order."""
    cdef list out = []
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    cdef object m
    cdef list msg
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
