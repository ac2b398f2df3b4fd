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
# The layout is MemoryStore's: ``inbox`` maps device key -> {mid: (sender,
# id, body, ts_ms, exp_ms), ...} in mid order, one tuple shared by a
# message's inboxes (one dict write a message and device, no table of
# messages beside); ``left`` mid -> inboxes holding it, for the messages
# more than one inbox holds.

from cpython.dict cimport PyDict_Next


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
