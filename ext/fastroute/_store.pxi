# The store stage's per-message loops (fastroute.store.MemoryStore), compiled.
# Part of fastroute._core.
#
# Compiled twins of fastroute/store.py (the specification):
#   Inbox     = PyInbox
#   mem_put   = py_mem_put
#   mem_ack   = py_mem_ack
#   mem_load  = py_mem_load
#   sql_rows  = py_sql_rows
#   CopyTails = PyCopyTails
#   shares_release = py_shares_release
#   release_walked = py_release_walked
#   ack_device = py_ack_device
#   mid_span  = py_mid_span
#   mids_blob = py_mids_blob
#   gather_acks = py_gather_acks
#   ack_drops = py_ack_drops
#   acks_left = py_acks_left
#   pack_rows = py_pack_rows
#
# tests/test_fastpath.py runs both on the same inputs and compares the dicts
# they leave.
#
# The layout is MemoryStore's: ``inbox`` maps device key -> an Inbox of mid
# -> (sender, id, body, ts_ms, device_keys) in mid order, the put's item
# itself shared by a message's inboxes (no table of messages beside, no
# tuple of its own); ``left`` mid -> inboxes holding it, for the messages
# more than one inbox holds.

from cpython cimport array as carray
from cpython.dict cimport PyDict_Next
from cpython.list cimport PyList_CheckExact
from cpython.long cimport PyLong_AsLongLong
from cpython.object cimport PyObject_GetItem
from cpython.set cimport PySet_Contains, PySet_GET_SIZE
from cpython.ref cimport Py_XDECREF
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport INT64_MAX, int32_t
from libc.stdio cimport snprintf
from libc.stdlib cimport qsort


cdef object _NO_DEFAULT = object()

cdef enum:
    # entries an inbox's arrays keep room for however few it holds
    INBOX_KEEP = 64


cdef inline Py_ssize_t _int64_lower_bound(const int64_t* a, Py_ssize_t lo, Py_ssize_t hi,
                                          int64_t v) noexcept nogil:
    # bisect_left over a[lo:hi] (ascending): the first position not below v
    cdef Py_ssize_t k
    while lo < hi:
        k = lo + (hi - lo) // 2
        if a[k] < v:
            lo = k + 1
        else:
            hi = k
    return lo


@cython.final  # the store's loops call its cdef methods directly
cdef class Inbox:
    """One device's inbox in the memory store: mid -> the put's item, in mid
    order (compiled; its specification is ``fastroute.store.PyInbox``, a dict).

    It answers the dict methods the store uses (``len``, ``in``, iteration
    over the mids, ``keys``, ``values``, ``items``, ``get``, ``pop``, ``[]``
    and ``del``); keys are ints.  A store's mids only grow, so the inbox is
    two arrays in mid order: a put appends, the ack of the oldest entry moves
    the start, any other is found by bisection and leaves a hole (NULL) that
    the next growth squeezes out.  Per message that is no hashing, no dict
    resize (a dict whose keys come and go is rebuilt every few hundred
    writes) and no object for the cyclic GC to track.
    """

    cdef int64_t* mids
    cdef PyObject** msgs    # strong references; NULL: deleted out of order
    cdef Py_ssize_t start, end, cap, n
    cdef Py_ssize_t hint    # where the next lookup looks first

    def __dealloc__(self):
        self._clear()

    cdef void _clear(self) noexcept:
        cdef Py_ssize_t i
        cdef PyObject** msgs = self.msgs
        cdef Py_ssize_t start = self.start, end = self.end
        # the arrays leave first: a message freed below cannot reach them
        self.msgs = NULL
        self.start = self.end = self.n = self.cap = 0
        PyMem_Free(self.mids)
        self.mids = NULL
        if msgs != NULL:
            for i in range(start, end):
                Py_XDECREF(msgs[i])
            PyMem_Free(msgs)

    cdef Py_ssize_t _lower(self, int64_t mid) noexcept:
        """The first position from ``start`` whose mid is >= ``mid`` (``end``: none)."""
        cdef Py_ssize_t lo = self.start, hi = self.end, h = self.hint
        if lo < hi and self.mids[lo] >= mid:
            return lo  # an ack of the oldest entry, the usual case
        if lo < h < hi and self.mids[h] >= mid and self.mids[h - 1] < mid:
            # the one after the last found: a device acks its mids in order,
            # and a group message's count is found again after the oldest
            # (any position is checked before it is trusted)
            self.hint = h + 1
            return h
        lo = _int64_lower_bound(self.mids, lo, hi, mid)
        self.hint = lo + 1
        return lo

    cdef Py_ssize_t _index(self, int64_t mid) noexcept:
        """The position of ``mid`` if the inbox holds it, else -1."""
        cdef Py_ssize_t i = self._lower(mid)
        if i < self.end and self.mids[i] == mid and self.msgs[i] != NULL:
            return i
        return -1

    cdef int _reserve(self) except -1:
        """Room for one entry at ``end``: squeeze out the holes, and double
        the arrays when more than half of them is live."""
        cdef Py_ssize_t cap = self.cap, i, j = 0
        cdef int64_t* mids
        cdef PyObject** msgs
        if self.end < cap:
            return 0
        if self.n * 2 >= cap:
            cap = max(8, cap * 2)
            mids = <int64_t*>PyMem_Realloc(self.mids, cap * sizeof(int64_t))
            if mids == NULL:
                raise MemoryError()
            self.mids = mids
            msgs = <PyObject**>PyMem_Realloc(self.msgs, cap * sizeof(PyObject*))
            if msgs == NULL:
                raise MemoryError()
            self.msgs = msgs
            self.cap = cap
        for i in range(self.start, self.end):
            if self.msgs[i] != NULL:
                self.mids[j] = self.mids[i]
                self.msgs[j] = self.msgs[i]
                j += 1
        self.start = 0
        self.end = j
        if cap > INBOX_KEEP and j * 8 <= cap:
            # a backlog drained: give back most of what it grew (a quarter
            # is still twice what is held)
            cap //= 4
            mids = <int64_t*>PyMem_Realloc(self.mids, cap * sizeof(int64_t))
            if mids != NULL:
                # from here cap is the smaller size (a msgs array left
                # larger, its shrink refused, is harmless)
                self.mids = mids
                self.cap = cap
                msgs = <PyObject**>PyMem_Realloc(self.msgs, cap * sizeof(PyObject*))
                if msgs != NULL:
                    self.msgs = msgs
        return 0

    cdef int c_put(self, int64_t mid, object msg) except -1:
        """Hold ``msg`` under ``mid`` (replacing what it held)."""
        cdef Py_ssize_t i
        cdef PyObject* old
        if self.end == self.start or mid > self.mids[self.end - 1]:
            self._reserve()
            i = self.end
            self.end += 1
        else:
            # not the newest mid: a store never does this, a caller may
            i = self._lower(mid)
            if self.mids[i] == mid:
                old = self.msgs[i]
                Py_INCREF(msg)
                self.msgs[i] = <PyObject*>msg
                if old == NULL:
                    self.n += 1
                else:
                    Py_XDECREF(old)
                return 0
            self._reserve()
            i = self._lower(mid)
            memmove(&self.mids[i + 1], &self.mids[i], (self.end - i) * sizeof(int64_t))
            memmove(&self.msgs[i + 1], &self.msgs[i], (self.end - i) * sizeof(PyObject*))
            self.end += 1
        Py_INCREF(msg)
        self.mids[i] = mid
        self.msgs[i] = <PyObject*>msg
        self.n += 1
        return 0

    cdef object c_pop(self, int64_t mid):
        """Remove ``mid`` and return what it held (None: not held)."""
        cdef Py_ssize_t i = self._index(mid)
        cdef object msg
        if i < 0:
            return None
        msg = <object>self.msgs[i]  # our reference now, not the array's
        Py_XDECREF(self.msgs[i])
        self.msgs[i] = NULL
        self.n -= 1
        if self.n == 0:
            self.start = self.end = 0
        elif i == self.start:
            while self.msgs[self.start] == NULL:
                self.start += 1
        return msg

    cdef object _get(self, object key):
        cdef int64_t mid
        cdef Py_ssize_t i
        if not PyLong_Check(key):
            return None
        try:
            mid = key
        except OverflowError:
            return None
        i = self._index(mid)
        return None if i < 0 else <object>self.msgs[i]

    def __len__(self):
        return self.n

    def __contains__(self, key):
        return self._get(key) is not None

    def __getitem__(self, key):
        msg = self._get(key)
        if msg is None:
            raise KeyError(key)
        return msg

    def get(self, key, default=None):
        """What ``key`` holds, or ``default``."""
        msg = self._get(key)
        return default if msg is None else msg

    def __setitem__(self, key, msg):
        if msg is None:
            raise WrongType("an inbox does not hold None")
        self.c_put(key, msg)

    def pop(self, key, default=_NO_DEFAULT):
        """Remove ``key`` and return what it held; ``default`` (or KeyError) if absent."""
        msg = None
        if PyLong_Check(key):
            try:
                msg = self.c_pop(key)
            except OverflowError:
                pass
        if msg is None:
            if default is _NO_DEFAULT:
                raise KeyError(key)
            return default
        return msg

    def __delitem__(self, key):
        self.pop(key)

    def keys(self):
        """The mids held, in order (a list)."""
        cdef Py_ssize_t i
        return [self.mids[i] for i in range(self.start, self.end) if self.msgs[i] != NULL]

    def values(self):
        """What the mids hold, in mid order (a list)."""
        cdef Py_ssize_t i
        return [<object>self.msgs[i] for i in range(self.start, self.end)
                if self.msgs[i] != NULL]

    def items(self):
        """``(mid, item)`` pairs in mid order (a list)."""
        cdef Py_ssize_t i
        return [(self.mids[i], <object>self.msgs[i]) for i in range(self.start, self.end)
                if self.msgs[i] != NULL]

    def __iter__(self):
        return iter(self.keys())

    def clear(self):
        """Drop every entry."""
        self._clear()

    def __repr__(self):
        return f"<Inbox {self.n} messages>"


def mem_put(list items, left, dict inbox, long long first, list mids, bint each=True,
            bint routes=False):
    """Store ``items`` ``(sender, id, body, ts_ms, device_keys)`` from mid ``first`` on
    (an item for no device is refused: InvalidArgument).

    Each stored mid is appended to ``mids`` as soon as its message is in
    every inbox, so after an exception (a malformed item) ``mids`` still
    tells which mids were used.  With ``each`` false, ``mids`` gets one int
    instead, how many were stored (after an exception too): no int a
    message for a caller that knows its mids (``MemoryStore.put_now``).

    With ``routes``, ``items`` is flat, ``device_keys, route`` a message: the
    route the relay made for it, a routed tail (``wire.routed_tail``) or
    ``(mid, tail)`` (``tail``: its DELIVER tail), which the inboxes then hold
    as it is; a per-device copy's is ``(mid, tail, DDELIVER head)``.  A route
    whose mid is not the one it is stored at is refused (InvalidArgument).
    """
    cdef long long mid = first
    cdef object item, sender, cid, body, ts, devs, d, box, msg
    cdef object last_devs = None
    cdef list boxes = None
    cdef Inbox ib
    cdef Inbox lb = left if type(left) is Inbox else None
    cdef dict left_d = None if lb is not None else <dict?>left
    cdef dict by_keys = None  # device keys (a tuple) -> their inboxes, past the first
    # by_keys' first tuples and their inboxes, found by identity before the
    # dict hashes a tuple (the relay's copies carry each device's one tuple);
    # borrowed: by_keys holds both
    cdef IdCache seen
    cdef int j
    cdef PyObject* found
    cdef Py_ssize_t ndevs = 0, k, step = 2 if routes else 1
    cdef Py_ssize_t n = PyList_GET_SIZE(items) // step
    cdef int overflow
    seen.n = 0
    if routes and PyList_GET_SIZE(items) % 2:
        raise InvalidArgument("routes hold device_keys, (mid, tail) for each message")
    try:
        for k in range(n):
            if step * k + step > PyList_GET_SIZE(items):
                raise RuntimeError("items changed while read")
            if routes:
                # the route itself is what the inboxes hold, as the engine
                # does: no tuple of the store's own a message
                devs = <object>PyList_GET_ITEM(items, 2 * k)
                msg = <object>PyList_GET_ITEM(items, 2 * k + 1)
                if is_routed(msg):
                    # the relay's own route: one object, its mid in it
                    if routed_mid(msg) != mid:
                        raise InvalidArgument("a route's mid is not the one it is stored at")
                elif (not PyTuple_CheckExact(msg) or not 2 <= PyTuple_GET_SIZE(msg) <= 3
                        or not PyLong_CheckExact(<object>PyTuple_GET_ITEM(msg, 0))
                        or not PyBytes_CheckExact(<object>PyTuple_GET_ITEM(msg, 1))
                        or (PyTuple_GET_SIZE(msg) == 3
                            and <object>PyTuple_GET_ITEM(msg, 2) is not DDELIVER_HEAD_BYTES
                            and <object>PyTuple_GET_ITEM(msg, 2) != DDELIVER_HEAD_BYTES)):
                    raise InvalidArgument("a route is a routed tail, (mid, tail bytes) or a "
                                          "copy's (mid, tail bytes, DDELIVER head)")
                elif (PyLong_AsLongLongAndOverflow(<object>PyTuple_GET_ITEM(msg, 0), &overflow)
                        != mid or overflow):
                    raise InvalidArgument("a route's mid is not the one it is stored at")
            else:
                item = <object>PyList_GET_ITEM(items, k)
                # the item itself is what the inboxes hold (one tuple less a
                # message); a caller's list or subclass is copied into a tuple
                if PyTuple_CheckExact(item) and PyTuple_GET_SIZE(item) == 5:
                    msg = item
                    devs = <object>PyTuple_GET_ITEM(item, 4)
                else:
                    sender, cid, body, ts, devs = item
                    msg = (sender, cid, body, ts, devs)
            # a run of a batch's messages shares its recipient's device keys:
            # the inboxes once a run
            if devs is not last_devs:
                # per-device copies in turns (a peer's devices, copy after copy)
                # are stored under each device's one tuple of keys: its inboxes
                # are looked up once a batch
                j = idc_find(&seen, <PyObject*>devs)
                found = seen.vals[j] if j >= 0 else NULL
                if found == NULL and by_keys is not None and PyTuple_CheckExact(devs):
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
                            box = inbox[d] = Inbox()
                        boxes.append(<Inbox?>box)
                    if PyTuple_CheckExact(devs) and last_devs is not None:
                        # a second tuple in this batch: copies in turns (a
                        # batch of one device's copies makes no table)
                        if by_keys is None:
                            by_keys = {}
                        by_keys[devs] = boxes
                        idc_add(&seen, <PyObject*>devs, <PyObject*>boxes, 0)
                last_devs = devs
            if not ndevs:
                raise InvalidArgument("device_keys must not be empty")
            if ndevs > 1:
                if lb is not None:
                    lb.c_put(mid, ndevs)
                else:
                    left_d[PyLong_FromLongLong(mid)] = ndevs
            for ib in boxes:
                ib.c_put(mid, msg)
            if each:
                mids.append(PyLong_FromLongLong(mid))
            mid += 1
    finally:
        if not each:
            mids.append(mid - first)


cdef int _mem_unref(dict left_d, Inbox lb, object m, long long mid, bint has_mid) except -1:
    """One inbox less holds ``m`` (``mid`` its value, if ``has_mid``: an int64):
    1 if it was the last one (``store._unref``)."""
    cdef PyObject* n
    cdef PyObject* old
    cdef Py_ssize_t k, i
    cdef object fewer
    if lb is not None:
        if lb.n == 0 or not has_mid:
            return 1
        i = lb._index(mid)
        if i < 0:
            return 1
        k = <object>lb.msgs[i]
        if k == 2:
            lb.c_pop(mid)  # one inbox left: no entry
        else:
            fewer = k - 1
            Py_INCREF(fewer)
            old = lb.msgs[i]
            lb.msgs[i] = <PyObject*>fewer
            Py_XDECREF(old)
        return 0
    n = PyDict_GetItemWithError(left_d, m) if left_d else NULL
    if n == NULL:
        return 1
    k = <object>n
    if k == 2:
        del left_d[m]
    else:
        left_d[m] = k - 1
    return 0


def mem_ack(box, left, mids):
    """Delete ``mids`` from one device's inbox ``box``; returns how many
    messages no inbox holds any more.  Mids not in ``box`` are ignored."""
    cdef object m, got
    cdef Py_ssize_t gone = 0
    cdef Inbox ib = box if type(box) is Inbox else None
    cdef dict d = None if ib is not None else <dict?>box
    cdef Inbox lb = left if type(left) is Inbox else None
    cdef dict left_d = None if lb is not None else <dict?>left
    cdef int overflow
    cdef long long mid = 0
    cdef bint has_mid = False
    for m in mids:
        if ib is not None or lb is not None:
            # the mid's int64, once for the inbox and the counts
            has_mid = False
            if PyLong_Check(m):
                mid = PyLong_AsLongLongAndOverflow(m, &overflow)
                has_mid = not overflow
        if ib is not None:
            got = ib.c_pop(mid) if has_mid else None
        else:
            got = d.pop(m, None)
        if got is not None:  # present, not a repeat
            gone += _mem_unref(left_d, lb, m, mid, has_mid)
    return gone


cdef tuple mem_row(object mid, object value, list senders):
    """A loaded row ``(mid, sender, id, body, ts_ms)`` from what an inbox
    holds: a put's item, or a route: a routed tail, ``(mid, tail)`` or
    ``(mid, tail, head)``
    (``mem_put``'s ``routes``;
    ``senders``: the last sender read from a tail, see ``c_tail_fields``)."""
    cdef tuple msg
    if is_routed(value):
        return c_tail_fields(value, mid, senders, WIRE_ROUTED_HEAD)
    if PyTuple_CheckExact(value) and PyTuple_GET_SIZE(value) == 5:
        msg = <tuple>value
        return (mid, msg[0], msg[1], msg[2], msg[3])
    if PyTuple_CheckExact(value) and PyTuple_GET_SIZE(value) == 2:
        return c_tail_fields((<tuple>value)[1], mid, senders)
    if PyTuple_CheckExact(value) and PyTuple_GET_SIZE(value) == 3:
        # a per-device copy's route, (mid, tail, DDELIVER head)
        return c_copy_tail_fields((<tuple>value)[1], mid)
    raise WrongType("an inbox holds (sender, id, body, ts_ms, device_keys) items "
                    "or routes: routed tails, (mid, tail[, head])")


def mem_load(box, after_mid, Py_ssize_t limit):
    """Up to ``limit`` rows ``(mid, sender, id, body, ts_ms)`` of one device's
    inbox ``box`` with mid > ``after_mid``, in mid order."""
    cdef list out = []
    cdef Py_ssize_t pos = 0
    cdef PyObject* key
    cdef PyObject* value
    cdef object m
    cdef Py_ssize_t size = len(box), i
    cdef Inbox ib
    # a backlog's rows come in runs of one sender's: one str a run
    cdef list senders = [None]
    cdef int overflow
    cdef long long after
    if limit <= 0:
        return out
    if type(box) is Inbox:
        ib = <Inbox>box
        # a cursor beyond the int64 mids: nothing after it, or all
        after = PyLong_AsLongLongAndOverflow(after_mid, &overflow)
        if overflow > 0 or (overflow == 0 and after == INT64_MAX):
            return out
        i = ib.start if overflow < 0 else ib._lower(after + 1)
        while i < ib.end and PyList_GET_SIZE(out) < limit:
            if ib.msgs[i] != NULL:
                out.append(mem_row(ib.mids[i], <object>ib.msgs[i], senders))
            i += 1
        return out
    if not isinstance(box, dict):
        raise WrongType("an inbox is an Inbox or a dict")
    while PyDict_Next(box, &pos, &key, &value):
        if len(box) != size:  # as a Python loop would (an allocation may run the GC)
            raise RuntimeError("dictionary changed size during iteration")
        m = <object>key
        if m > after_mid:
            out.append(mem_row(m, <object>value, senders))
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


cdef struct SpackDraft:
    # one set of devices' messages of a transaction: a pack, and its
    # messages' body lengths and expiries
    PackDraft pack
    int32_t* lens
    int64_t* exps
    Py_ssize_t lens_cap, exps_cap


cdef int grow_array(void** items, Py_ssize_t* cap, Py_ssize_t n, size_t item) except -1:
    """Room for one more item of ``item`` bytes past ``n`` in ``*items``."""
    cdef Py_ssize_t new
    cdef void* p
    if n < cap[0]:
        return 0
    new = 64 if cap[0] == 0 else cap[0] * 2
    p = PyMem_Realloc(items[0], new * item)
    if p == NULL:
        raise MemoryError()
    items[0] = p
    cap[0] = new
    return 0


# The drafts' entry buffers, kept from one transaction to the next.  Each
# transaction's packs grew from 4 KB by realloc (a copy at every doubling),
# and the writer's arena, trimmed between transactions, had its pages
# faulted in again.  Bounded in count and bytes; only touched with the GIL
# held (sql_rows never lets it go), so a build without the GIL keeps none.
cdef extern from *:
    """
    #ifdef Py_GIL_DISABLED
    #define FASTROUTE_DRAFT_POOL 0
    #else
    #define FASTROUTE_DRAFT_POOL 1
    #endif
    """
    const bint DRAFT_POOL "FASTROUTE_DRAFT_POOL"

cdef enum:
    DRAFT_POOL_SLOTS = 32
cdef unsigned char* _draft_pool_buf[32]
cdef Py_ssize_t _draft_pool_cap[32]
cdef Py_ssize_t _draft_pool_n = 0
cdef Py_ssize_t _draft_pool_bytes = 0
cdef Py_ssize_t DRAFT_POOL_MAX_BYTES = 8 << 20


cdef inline void draft_pool_take(PackDraft* d) noexcept:
    """Give ``d`` (no buffer yet) a kept buffer, if one is kept."""
    global _draft_pool_n, _draft_pool_bytes
    if _draft_pool_n:
        _draft_pool_n -= 1
        d.data = _draft_pool_buf[_draft_pool_n]
        d.cap = _draft_pool_cap[_draft_pool_n]
        _draft_pool_bytes -= d.cap


cdef inline void draft_pool_give(PackDraft* d) noexcept:
    """Keep ``d``'s buffer for a later transaction, or free it."""
    global _draft_pool_n, _draft_pool_bytes
    if d.data == NULL:
        return
    if (DRAFT_POOL and _draft_pool_n < DRAFT_POOL_SLOTS
            and _draft_pool_bytes + d.cap <= DRAFT_POOL_MAX_BYTES):
        _draft_pool_buf[_draft_pool_n] = d.data
        _draft_pool_cap[_draft_pool_n] = d.cap
        _draft_pool_n += 1
        _draft_pool_bytes += d.cap
    else:
        PyMem_Free(d.data)
    d.data = NULL
    d.cap = 0


def _draft_pool_stats():
    """(whether buffers are kept, buffers kept, bytes kept) of the drafts'
    pool (for tests)."""
    return bool(DRAFT_POOL), _draft_pool_n, _draft_pool_bytes


cdef int draft_reserve(PackDraft* d, Py_ssize_t more) except -1:
    """Room for ``more`` bytes of entries and one more mid in ``d``."""
    cdef Py_ssize_t cap
    cdef void* p
    if d.data == NULL:
        draft_pool_take(d)
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


cdef int draft_append(PackDraft* d, long long mid, object sender, object cid, object body,
                      long long ts_v, long long exp) except -1:
    """Append the entry (mid, sender, cid, body, ts_ms, exp_ms) to ``d`` as
    msgpack packs it."""
    cdef Py_ssize_t ulen
    cdef const char* utf8 = PyUnicode_AsUTF8AndSize(sender, &ulen)
    return draft_put(d, mid, <const unsigned char*>utf8, ulen,
                     <const unsigned char*>PyBytes_AS_STRING(cid), PyBytes_GET_SIZE(cid),
                     <const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body),
                     ts_v, exp)


cdef int draft_put(PackDraft* d, long long mid, const unsigned char* utf8, Py_ssize_t ulen,
                   const unsigned char* cid, Py_ssize_t clen, const unsigned char* body,
                   Py_ssize_t blen, long long ts_v, long long exp) except -1:
    """:func:`draft_append` from the fields' bytes (an item's objects, or a
    DELIVER tail read in place by :func:`tail_span`)."""
    cdef Py_ssize_t k
    cdef unsigned char* p
    draft_reserve(d, 1 + int_len(mid) + str_header_len(ulen) + ulen
                  + bin_header_len(clen) + clen + bin_header_len(blen) + blen
                  + int_len(ts_v) + int_len(exp))
    p = d.data + PACK_HEAD + d.size
    p[0] = 0x96
    k = 1
    k += put_int(p + k, mid)
    k += str_header(p + k, ulen)
    fr_copy(p + k, utf8, ulen)
    k += ulen
    k += bin_header(p + k, clen)
    fr_copy(p + k, cid, clen)
    k += clen
    k += bin_header(p + k, blen)
    fr_copy(p + k, body, blen)
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
    return 0


cdef tuple draft_columns(PackDraft* d):
    """``d``'s columns first, last, n, nbytes, exp_ms, mids, data."""
    cdef Py_ssize_t hlen = array_header_len(<Py_ssize_t>d.n)
    array_header(d.data + PACK_HEAD - hlen, <Py_ssize_t>d.n)
    return (d.first, d.last, d.n, d.nbytes, d.exp,
            PyBytes_FromStringAndSize(<char*>d.mids, d.n * sizeof(int64_t)),
            PyBytes_FromStringAndSize(<char*>d.data + PACK_HEAD - hlen, d.size + hlen))


class CopyTails(tuple):
    """A put of per-device copies, flat ``device_keys, tail`` a copy, each tail
    a DDELIVER copy's (see ``fastroute.store.PyCopyTails``): a tuple the
    writer tells from a put of DELIVER tails by its type."""

    __slots__ = ()


cdef Py_ssize_t copy_sender_into(unsigned char** buf, Py_ssize_t* cap,
                                 const unsigned char* address, Py_ssize_t alen,
                                 long long device) except -1:
    """Write a copy's stored sender, ``address/device`` (the store's sender of
    a copy, ``fastroute.wire.copy_tail_fields``), into ``buf[0]`` (grown as
    needed); returns its length."""
    cdef char digits[24]
    cdef Py_ssize_t k = snprintf(digits, sizeof(digits), "%lld", device)
    cdef Py_ssize_t n = alen + 1 + k
    cdef void* grown
    if n > cap[0]:
        grown = PyMem_Realloc(buf[0], n)
        if grown == NULL:
            raise MemoryError()
        buf[0] = <unsigned char*>grown
        cap[0] = n
    memcpy(buf[0], address, alen)
    buf[0][alen] = 0x2f  # "/"
    memcpy(buf[0] + alen + 1, digits, k)
    return n


def sql_rows(list puts, long long mid, long long ttl_ms):
    """The rows of one transaction's new messages (see ``py_sql_rows``): each
    message msgpack'd straight into its pack or spack, no per-message tuple;
    ``(spacks rows, shares rows, packs rows, block)``, flat lists."""
    cdef list spack_rows = [], share_rows = [], pack_rows = [], blocks = []
    cdef list keys = []             # the drafts' device keys, in draft order
    cdef dict index = {}            # device key -> draft number
    cdef PackDraft* drafts = NULL
    cdef PackDraft* d
    cdef Py_ssize_t ndrafts = 0, cap = 0, i = -1, j, ndevs, blen, count
    cdef object items, dv, key, last_devs = None
    # an item's fields are read through borrowed pointers: the loop's thread
    # made them and frees them, and a reference count written here would
    # move each one's cache line to this thread and back
    cdef PyObject* item
    cdef PyObject* sender = NULL  # NULLs: a put of tails sets none of them
    cdef PyObject* cid = NULL
    cdef PyObject* body = NULL
    cdef PyObject* devs
    cdef PyObject* found
    cdef long long ts_v, exp
    cdef int overflow = 0
    cdef bint tails, copies = False
    # a put_tails request's message, read in place from its DELIVER tail;
    # its sender's UTF-8 checked once for a run of one sender's tails
    cdef TailSpan span
    cdef const unsigned char* utf8_ok = NULL
    cdef Py_ssize_t utf8_ok_len = -1
    # a copy's stored sender, address/device: made once for a run of one
    # sending device's copies
    cdef unsigned char* cbuf = NULL
    cdef Py_ssize_t ccap_ = 0, clen = 0
    cdef long long cdevice = -1
    cdef const unsigned char* sender_p = NULL
    cdef Py_ssize_t sender_n = 0
    cdef void* grown
    cdef tuple cols
    # the shared messages: one spack a set of device keys, the block
    cdef list skeys = []            # each spack's distinct device keys
    cdef dict sindex = {}           # device keys (a tuple) -> spack number
    cdef SpackDraft* spacks = NULL
    cdef SpackDraft* sp
    cdef Py_ssize_t nspacks = 0, scap = 0, si = -1, nblock = 0, bcap = 0, ccap = 0
    cdef object last_sdevs = None
    cdef int64_t* block_mids = NULL
    cdef int32_t* block_counts = NULL
    cdef int64_t* firsts = NULL
    cdef int32_t* sizes = NULL
    try:
        for items in puts:
            if PyList_CheckExact(items):
                tails = False
                count = PyList_GET_SIZE(items)
            elif PyTuple_CheckExact(items) or type(items) is CopyTails:
                tails = True
                copies = not PyTuple_CheckExact(items)
                if PyTuple_GET_SIZE(items) % 2:
                    raise InvalidArgument("a put of tails holds device keys, tail a message")
                count = PyTuple_GET_SIZE(items) // 2
            else:
                raise WrongType("puts is a list of lists of items and tuples of tails")
            for j in range(count):
                if tails:
                    devs = PyTuple_GET_ITEM(<object>items, 2 * j)
                    tail_span(<object>PyTuple_GET_ITEM(<object>items, 2 * j + 1), &span,
                              copies)
                    if span.sender_len != utf8_ok_len or memcmp(
                            span.sender, utf8_ok, <size_t>utf8_ok_len) != 0:
                        check_utf8(span.sender, span.sender_len)
                        utf8_ok = span.sender
                        utf8_ok_len = span.sender_len
                        cdevice = -1  # another sender: its copies' sender made anew
                    sender_p = span.sender
                    sender_n = span.sender_len
                    if copies:
                        if span.device != cdevice:
                            clen = copy_sender_into(&cbuf, &ccap_, span.sender,
                                                    span.sender_len, span.device)
                            cdevice = span.device
                        sender_p = cbuf
                        sender_n = clen
                    ts_v = span.ts
                    blen = span.body_len
                else:
                    item = PyList_GET_ITEM(items, j)
                    if not PyTuple_CheckExact(<object>item) or PyTuple_GET_SIZE(<object>item) != 5:
                        raise WrongType("a put item is a tuple (sender, cid, body, ts_ms, "
                                        "device keys)")
                    sender = PyTuple_GET_ITEM(<object>item, 0)
                    cid = PyTuple_GET_ITEM(<object>item, 1)
                    body = PyTuple_GET_ITEM(<object>item, 2)
                    devs = PyTuple_GET_ITEM(<object>item, 4)
                    if not (PyUnicode_CheckExact(<object>sender)
                            and PyBytes_CheckExact(<object>cid)
                            and PyBytes_CheckExact(<object>body)
                            and PyLong_CheckExact(<object>PyTuple_GET_ITEM(<object>item, 3))):
                        raise WrongType("a put item is (str, bytes, bytes, int, device keys)")
                    ts_v = PyLong_AsLongLongAndOverflow(
                        <object>PyTuple_GET_ITEM(<object>item, 3), &overflow)
                    blen = PyBytes_GET_SIZE(<object>body)
                if overflow or ts_v > INT64_MAX - ttl_ms:
                    raise OverflowError("ts_ms + ttl does not fit 64 bits")
                exp = ts_v + ttl_ms
                ndevs = len(<object>devs)
                if ndevs == 1:
                    # a run of messages for one recipient shares its keys
                    # (a tuple, or a list: a put's keys do not change once
                    # it is queued, see SqliteStore.put_many): the draft is
                    # looked up once a run
                    if devs != <PyObject*>last_devs:
                        key = (<object>devs)[0]
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
                        last_devs = <object>devs
                    if tails:
                        draft_put(&drafts[i], mid, sender_p, sender_n, span.cid, 16,
                                  span.body, blen, ts_v, exp)
                    else:
                        draft_append(&drafts[i], mid, <object>sender, <object>cid,
                                     <object>body, ts_v, exp)
                elif ndevs == 0:
                    # nobody would ack it: it would sit on disk until it expires
                    raise InvalidArgument("device_keys must not be empty")
                else:
                    if devs != <PyObject*>last_sdevs:
                        # a run of one group's messages shares its keys (the
                        # relay's group fan-out: one list a group), as a
                        # recipient's do above: the spack is looked up once a
                        # run, not its keys made a tuple, hashed and compared
                        # for each message
                        key = (<object>devs if PyTuple_CheckExact(<object>devs)
                               else tuple(<object>devs))
                        found = PyDict_GetItemWithError(sindex, key)
                        if found != NULL:
                            si = <Py_ssize_t><object>found
                        else:
                            if nspacks == scap:
                                scap = 4 if scap == 0 else 2 * scap
                                grown = PyMem_Realloc(spacks, scap * sizeof(SpackDraft))
                                if grown == NULL:
                                    raise MemoryError()
                                spacks = <SpackDraft*>grown
                            si = nspacks
                            spacks[si].pack = PackDraft(mid, mid, 0, 0, exp, NULL, 0, NULL,
                                                        0, 0)
                            spacks[si].lens = NULL
                            spacks[si].exps = NULL
                            spacks[si].lens_cap = 0
                            spacks[si].exps_cap = 0
                            nspacks += 1
                            skeys.append(list(dict.fromkeys(key)))
                            sindex[key] = si
                        last_sdevs = <object>devs
                    sp = &spacks[si]
                    grow_array(<void**>&sp.lens, &sp.lens_cap, <Py_ssize_t>sp.pack.n,
                               sizeof(int32_t))
                    grow_array(<void**>&sp.exps, &sp.exps_cap, <Py_ssize_t>sp.pack.n,
                               sizeof(int64_t))
                    sp.lens[sp.pack.n] = <int32_t>blen
                    sp.exps[sp.pack.n] = exp
                    if tails:
                        draft_put(&sp.pack, mid, sender_p, sender_n, span.cid, 16,
                                  span.body, blen, ts_v, exp)
                    else:
                        draft_append(&sp.pack, mid, <object>sender, <object>cid,
                                     <object>body, ts_v, exp)
                    grow_array(<void**>&block_mids, &bcap, nblock, sizeof(int64_t))
                    grow_array(<void**>&block_counts, &ccap, nblock, sizeof(int32_t))
                    block_mids[nblock] = mid
                    block_counts[nblock] = <int32_t>PyList_GET_SIZE(skeys[si])
                    nblock += 1
                mid += 1
        for i in range(ndrafts):
            pack_rows.append(keys[i])
            pack_rows += draft_columns(&drafts[i])
        if nspacks:
            firsts = <int64_t*>PyMem_Malloc(nspacks * sizeof(int64_t))
            sizes = <int32_t*>PyMem_Malloc(nspacks * sizeof(int32_t))
            if firsts == NULL or sizes == NULL:
                raise MemoryError()
        for i in range(nspacks):
            sp = &spacks[i]
            cols = draft_columns(&sp.pack)
            spack_rows += cols[:6]
            spack_rows += (PyBytes_FromStringAndSize(<char*>sp.lens,
                                                     sp.pack.n * sizeof(int32_t)),
                           PyBytes_FromStringAndSize(<char*>sp.exps,
                                                     sp.pack.n * sizeof(int64_t)),
                           mids_blob(<list>skeys[i]), cols[6])
            cols = cols[:5] + (None,)  # a device holds all of the spack
            for dv in <list>skeys[i]:
                share_rows.append(dv)
                share_rows += cols
            firsts[i] = sp.pack.first
            sizes[i] = <int32_t>sp.pack.n
        if nblock:
            blocks.append((firsts[0],
                           PyBytes_FromStringAndSize(<char*>block_mids,
                                                     nblock * sizeof(int64_t)),
                           PyBytes_FromStringAndSize(<char*>block_counts,
                                                     nblock * sizeof(int32_t)),
                           PyBytes_FromStringAndSize(<char*>firsts, nspacks * sizeof(int64_t)),
                           PyBytes_FromStringAndSize(<char*>sizes, nspacks * sizeof(int32_t))))
    finally:
        PyMem_Free(cbuf)
        for i in range(ndrafts):
            PyMem_Free(drafts[i].mids)
            draft_pool_give(&drafts[i])
        PyMem_Free(drafts)
        for i in range(nspacks):
            PyMem_Free(spacks[i].pack.mids)
            draft_pool_give(&spacks[i].pack)
            PyMem_Free(spacks[i].lens)
            PyMem_Free(spacks[i].exps)
        PyMem_Free(spacks)
        PyMem_Free(block_mids)
        PyMem_Free(block_counts)
        PyMem_Free(firsts)
        PyMem_Free(sizes)
    return spack_rows, share_rows, pack_rows, blocks


def shares_release(carray.array have, carray.array counts, mids):
    """One device no longer holds ``mids``: one off the count in ``counts`` of
    each in ``have`` (see ``py_shares_release``); the mids held by none now."""
    cdef list gone = []
    cdef Py_ssize_t lo, end
    cdef long long m
    cdef int overflow = 0
    cdef int64_t* keys
    cdef int32_t* held
    cdef object v
    if (have.ob_descr.typecode != b'q' or counts.ob_descr.typecode != b'i'
            or len(have) != len(counts)):
        raise WrongType("have is an int64 array, counts an int32 array as long")
    end = len(have)
    keys = <int64_t*>have.data.as_voidptr
    held = <int32_t*>counts.data.as_voidptr
    for v in mids:
        if not PyLong_Check(v):
            raise TypeError("a mid is an int")
        m = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow:
            continue  # no int64 mid: not in have
        lo = _int64_lower_bound(keys, 0, end, m)
        if lo < end and keys[lo] == m and held[lo] > 0:
            held[lo] -= 1
            if held[lo] == 0:
                gone.append(v)
    return gone


def release_walked(counts, list walked, list keys, dict acks, dict gone, list drops=None):
    """Release in ``counts`` the messages of the shares a compiled walk
    deleted (see ``fastroute.store.py_release_walked``): the mids no device
    holds any more appended to ``gone``; by drop index, where its last
    share's mids end in its acks.

    The acked mids are read from the walk's ``drops`` (a device's blob of
    int64s), or without them through borrowed pointers (the loop's thread
    made those ints and frees them); the mids gone are new ints.  A spack's
    block is found and saved for a rollback as ``_Counts._find`` does."""
    cdef dict blocks = counts.blocks
    cdef list firsts = counts._firsts
    cdef dict saved = counts._saved
    cdef list added = counts._added
    cdef dict ends = {}
    cdef Py_ssize_t i, nwalked = len(walked), at = 0, n, j, stop, lo, hi, k, end, spack_at
    cdef Py_ssize_t nmids = 0, ngone
    cdef long long first, m
    cdef int overflow = 0
    cdef object index, last = None, block_key, out, known, value
    cdef list mids = None, block
    cdef carray.array have, held, bfirsts
    cdef int64_t* have_p
    cdef int32_t* held_p
    cdef int64_t* bfirsts_p
    cdef PyObject* item
    cdef object blob
    cdef const char* bp = NULL  # the device's blob, when drops are given
    for i in range(0, nwalked, 3):
        # bounds checked here: the module is built without Cython's
        if i + 2 >= nwalked:
            raise IndexError("list index out of range")
        index = walked[i]
        first = walked[i + 1]
        n = walked[i + 2]
        if n < 0:
            raise InvalidArgument("a share has no negative number of mids")
        if last is None or index != last:
            last = index
            if drops is None:
                value = acks[PyObject_GetItem(keys, index)]
                mids = value if type(value) is list else list(value)
                nmids = PyList_GET_SIZE(mids)
            else:
                # Python's indexing (the module's own skips the bounds)
                blob = PyObject_GetItem(drops, 2 * index + 1)
                if not PyBytes_CheckExact(blob) or PyBytes_GET_SIZE(blob) % 8:
                    raise InvalidArgument("a drop's mids are int64s")
                bp = PyBytes_AS_STRING(blob)
                nmids = PyBytes_GET_SIZE(blob) // 8
            at = 0
        if at >= nmids:
            raise IndexError("list index out of range")
        if drops is not None:
            if _blob_mid(bp, at) != first:
                # as below: the share's first further on
                j = at + 1
                while j < nmids and _blob_mid(bp, j) != first:
                    j += 1
                if j == nmids:
                    raise ValueError(f"{first} is not in the drop's mids")
                at = j
        elif _borrowed_mid(mids, at) != first:
            # whole packs walked before it: their mids are not in walked,
            # and none of them is this share's first
            at = mids.index(walked[i + 1], at)
        stop = at + n if at + n < nmids else nmids
        # the spack's block: the last block key at or below it
        lo = 0
        hi = PyList_GET_SIZE(firsts)
        while lo < hi:
            k = (lo + hi) >> 1
            if first < <long long>firsts[k]:
                hi = k
            else:
                lo = k + 1
        if lo > 0:
            block_key = firsts[lo - 1]
            block = blocks[block_key]
            if PyList_GET_SIZE(block) != 5:
                raise WrongType("a block is [mids, counts, live, firsts, sizes]")
            bfirsts = block[3]
            end = len(bfirsts)
            bfirsts_p = <int64_t*>bfirsts.data.as_voidptr
            spack_at = _int64_lower_bound(bfirsts_p, 0, end, first)
            if spack_at < end and bfirsts_p[spack_at] == first:
                if block_key not in saved and block_key not in added:
                    saved[block_key] = (block, carray.copy(block[1]), block[2],
                                        carray.copy(block[4]))
                have = block[0]
                held = block[1]
                if (have.ob_descr.typecode != b'q' or held.ob_descr.typecode != b'i'
                        or len(have) != len(held)):
                    raise WrongType("have is an int64 array, counts an int32 array as long")
                end = len(have)
                have_p = <int64_t*>have.data.as_voidptr
                held_p = <int32_t*>held.data.as_voidptr
                out = None
                ngone = 0
                lo = end
                for j in range(at, stop):
                    if drops is not None:
                        m = _blob_mid(bp, j)
                    else:
                        item = <PyObject*>PyList_GET_ITEM(mids, j)
                        if not PyLong_Check(<object>item):
                            raise TypeError("a mid is an int")
                        m = PyLong_AsLongLongAndOverflow(<object>item, &overflow)
                        if overflow:
                            continue  # no int64 mid: not in have
                    # a share's mids are its spack's, ascending and next to
                    # each other in the block: the one after the last found
                    # first, a search only when it is not that one
                    lo += 1
                    if lo >= end or have_p[lo] != m:
                        lo = _int64_lower_bound(have_p, 0, end, m)
                    if lo < end and have_p[lo] == m and held_p[lo] > 0:
                        held_p[lo] -= 1
                        if held_p[lo] == 0:
                            if out is None:
                                out = []
                            out.append(PyLong_FromLongLong(m))
                            ngone += 1
                if ngone:
                    block[2] = block[2] - ngone
                    block[4][spack_at] = block[4][spack_at] - ngone
                    known = gone.get(walked[i + 1])
                    if known is None:
                        gone[walked[i + 1]] = out
                    else:
                        known.extend(out)
        at += n
        ends[index] = at
    return ends


cdef inline long long _borrowed_mid(list mids, Py_ssize_t at) except? -1:
    # a mid of the loop's list, read without a reference of this thread's
    cdef PyObject* item = <PyObject*>PyList_GET_ITEM(mids, at)
    cdef int overflow = 0
    cdef long long v
    if not PyLong_CheckExact(<object>item):
        return -1  # not an int64: never a share's first (the slow lookup decides)
    v = PyLong_AsLongLongAndOverflow(<object>item, &overflow)
    return -1 if overflow else v


cdef bytes _list_blob(list mids, long long* hi=NULL):
    # mids_blob of a list of exact int64 ints; None for any other list.
    # With hi, the greatest mid too, read in the same pass (a non-empty list)
    cdef Py_ssize_t i, n = PyList_GET_SIZE(mids)
    cdef PyObject* m
    cdef long long v, top = -0x7fffffffffffffffLL - 1
    cdef int overflow = 0
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 8 * n)
    cdef char* p = PyBytes_AS_STRING(out)
    for i in range(n):
        m = PyList_GET_ITEM(mids, i)
        if not PyLong_CheckExact(<object>m):
            return None
        v = PyLong_AsLongLongAndOverflow(<object>m, &overflow)
        if overflow:
            return None
        memcpy(p + 8 * i, &v, 8)
        if v > top:
            top = v
    if hi != NULL:
        hi[0] = top
    return out


def mids_blob(mids):
    """``mids`` as native int64s (see ``fastroute.store.py_mids_blob``).

    Read through borrowed pointers, as :func:`mid_span` reads them: the
    writer thread makes each acking device's mids a blob for the compiled
    walks, and ``array.array("q", mids)`` would write every int's reference
    count from the writer's core (the loop's thread made them and frees
    them), at ~14 ns an int where this takes ~2."""
    return _mids_blob(mids)


cdef bytes _mids_blob(object mids):
    # mids_blob, called without a Python call by ack_drops
    cdef bytes out
    if PyList_CheckExact(mids):
        out = _list_blob(<list>mids)
        if out is not None:
            return out
    # anything else (another sequence, a bool, an int past 64 bits): the
    # specification's answer, or its error
    from fastroute.store import py_mids_blob
    return py_mids_blob(mids)


def ack_drops(dict acks not None, held, dict blobs=None):
    """The compiled walks' input for ``acks`` (see
    ``fastroute.store.py_ack_drops``): each device's mids made a blob as
    :func:`mids_blob` makes it, or taken from ``blobs``, in one call for
    every device of a commit."""
    cdef list drops = [], keys = []
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    cdef PyObject* b
    cdef object key, mids
    cdef bytes blob
    # the steady state's held is (): no device is in it
    cdef bint check = not (PyTuple_CheckExact(held) and PyTuple_GET_SIZE(held) == 0)
    while PyDict_Next(acks, &pos, &k, &v):
        key = <object>k
        mids = <object>v
        if not mids or (check and key in held):
            continue
        b = NULL if blobs is None else PyDict_GetItemWithError(blobs, key)
        if b != NULL and PyBytes_CheckExact(<object>b):
            blob = <bytes>b
        else:
            try:
                blob = _mids_blob(mids)
            except (OverflowError, TypeError):
                continue
        drops.append(key)
        drops.append(blob)
        keys.append(key)
    return drops, keys


cdef int _cmp_int64(const void* x, const void* y) noexcept nogil:
    cdef int64_t a = (<const int64_t*>x)[0], b = (<const int64_t*>y)[0]
    return (a > b) - (a < b)


cdef inline int64_t _blob_mid(const char* p, Py_ssize_t i) noexcept:
    # the blob's i-th native int64, wherever the bytes' data is aligned
    cdef int64_t v
    memcpy(&v, p + 8 * i, 8)
    return v


cdef bint _list_span(list mids, long long* lo, long long* hi) except -1:
    # the least and the greatest of a non-empty list of exact int64 ints,
    # read through borrowed pointers (see mid_span); False: not such a list
    cdef Py_ssize_t i, n = PyList_GET_SIZE(mids)
    cdef PyObject* m
    cdef long long v
    cdef int overflow = 0
    if n == 0:
        return False
    for i in range(n):
        m = PyList_GET_ITEM(mids, i)
        if not PyLong_CheckExact(<object>m):
            return False
        v = PyLong_AsLongLongAndOverflow(<object>m, &overflow)
        if overflow:
            return False
        if i == 0:
            lo[0] = hi[0] = v
        elif v < lo[0]:
            lo[0] = v
        elif v > hi[0]:
            hi[0] = v
    return True


def mid_span(mids):
    """The least and the greatest of ``mids`` (see ``fastroute.store.py_mid_span``).

    The writer thread reads acked mids through borrowed pointers: the loop's
    thread made those ints and frees them, and ``min``/``max`` would write
    each one's reference count from the writer's core."""
    cdef long long lo = 0, hi = 0
    if PyList_CheckExact(mids) and _list_span(<list>mids, &lo, &hi):
        return lo, hi
    from fastroute.store import py_mid_span
    return py_mid_span(mids)


def acks_left(dict acks not None, list keys not None, dict ends not None):
    """The acks a compiled walk of shares left to the general path (see
    ``fastroute.store.py_acks_left``): a large group's commit, hundreds of
    devices that acked whole shares, in one call."""
    cdef dict taken = {}, rest = {}
    cdef Py_ssize_t pos = 0, end
    cdef PyObject* k
    cdef PyObject* v
    cdef PyObject* t
    cdef object mids
    while PyDict_Next(ends, &pos, &k, &v):
        taken[keys[<object>k]] = <object>v
    pos = 0
    while PyDict_Next(acks, &pos, &k, &v):
        mids = <object>v
        t = PyDict_GetItemWithError(taken, <object>k)
        end = 0 if t == NULL else <Py_ssize_t><object>t
        if end < len(mids):
            rest[<object>k] = mids[end:] if end else mids
    return rest


def gather_acks(list pairs not None, dict acks not None, long long mid, hi,
                dict blobs=None):
    """Fold an ack request's ``(device key, mids)`` pairs into ``acks`` (see
    ``fastroute.store.py_gather_acks``): the greatest mid of each list read
    through borrowed pointers (see :func:`mid_span`), the list itself kept
    unless some of its mids are cut.  Each list's ints are read once, into
    its blob (kept in ``blobs`` when given), the greatest mid in the same
    pass.  A pair of another shape goes the specification's way."""
    cdef Py_ssize_t i, j
    cdef object pair, key, mids
    cdef PyObject* m
    cdef PyObject* known
    cdef PyObject* had
    cdef long long top = 0, chi = 0
    cdef int overflow = 0
    cdef list kept
    cdef bytes blob
    # the bound as a C int while it is one (the writer's always is)
    cdef bint exact = PyLong_CheckExact(hi)
    if exact:
        chi = PyLong_AsLongLongAndOverflow(hi, &overflow)
        exact = not overflow
    for i in range(PyList_GET_SIZE(pairs)):
        pair = <object>PyList_GET_ITEM(pairs, i)
        if PyTuple_CheckExact(pair) and PyTuple_GET_SIZE(pair) == 2:
            key = <object>PyTuple_GET_ITEM(pair, 0)
            mids = <object>PyTuple_GET_ITEM(pair, 1)
        else:
            mids = None
        # the list's ints read once, into its blob, the greatest mid with
        # them (the writer keeps the blob in blobs)
        blob = (_list_blob(<list>mids, &top)
                if PyList_CheckExact(mids) and PyList_GET_SIZE(mids) else None)
        if not exact or blob is None:
            from fastroute.store import py_gather_acks
            hi = py_gather_acks([pair], acks, mid, chi if exact else hi, blobs)
            exact = PyLong_CheckExact(hi)
            if exact:
                chi = PyLong_AsLongLongAndOverflow(hi, &overflow)
                exact = not overflow
            continue
        if top >= mid:
            kept = []
            for j in range(PyList_GET_SIZE(mids)):
                m = PyList_GET_ITEM(mids, j)
                if PyLong_AsLongLong(<object>m) < mid:  # an int64: read as one above
                    kept.append(<object>m)
            mids = kept
            top = mid - 1
            if blobs is not None:
                blob = _list_blob(kept)
        known = PyDict_GetItemWithError(acks, key)
        if known == NULL:
            acks[key] = mids
            if blobs is not None:
                blobs[key] = blob
        else:
            acks[key] = <object>known + mids
            if blobs is not None:
                had = PyDict_GetItemWithError(blobs, key)
                if had != NULL:
                    blobs[key] = <object>had + blob
        if top > chi:
            chi = top
    return chi if exact else hi


cdef bint _ack_inputs_plain(list mids, list rows) except -1:
    """Whether ``ack_device``'s inputs have the shape the relay gives them:
    exact int mids in int64 range, rows of three with a bytes blob of
    strictly ascending int64s.  Anything else goes to the specification."""
    cdef Py_ssize_t i, j, n
    cdef object row, blob
    cdef long long lo, hi
    cdef const char* p
    # no mids is plain too (the span's loop refuses an empty list)
    if PyList_GET_SIZE(mids) and not _list_span(mids, &lo, &hi):
        return False
    for i in range(PyList_GET_SIZE(rows)):
        row = <object>PyList_GET_ITEM(rows, i)
        if not (PyTuple_CheckExact(row) or PyList_CheckExact(row)) or len(row) != 3:
            return False
        blob = row[2]
        if not PyBytes_CheckExact(blob) or PyBytes_GET_SIZE(blob) % 8:
            return False
        p = PyBytes_AS_STRING(blob)
        n = PyBytes_GET_SIZE(blob) // 8
        for j in range(1, n):
            if _blob_mid(p, j - 1) >= _blob_mid(p, j):
                return False
    return True


cdef bint _acks_whole_rows(object key, list mids, list rows, dict partial,
                           dict spartial) except -1:
    """Whether ``mids`` are exactly the rows' mids, row after row, each
    row's in order, and no row was acked in part before (inputs checked by
    ``_ack_inputs_plain``)."""
    cdef Py_ssize_t n = PyList_GET_SIZE(mids), pos = 0, r, i, hn
    cdef object row, shared, first, blob
    cdef dict noted
    cdef const char* p
    for r in range(PyList_GET_SIZE(rows)):
        row = <object>PyList_GET_ITEM(rows, r)
        shared, first, blob = row
        hn = PyBytes_GET_SIZE(blob) // 8
        if hn == 0 or pos + hn > n:
            return False  # an empty row stays: the general path's answer
        noted = spartial if shared else partial
        if noted and (key, first) in noted:
            return False
        p = PyBytes_AS_STRING(blob)
        for i in range(hn):
            if _blob_mid(p, i) != <int64_t>(<object>PyList_GET_ITEM(mids, pos + i)):
                return False
        pos += hn
    return pos == n


def ack_device(object key, list mids not None, list rows not None, dict partial not None,
               dict spartial not None, object release, list drop_packs not None,
               list drop_shares not None):
    """One device's ack against its rows (see ``fastroute.store.py_ack_device``):
    each row's acked mids found by a merge of two ascending int64 runs, not
    by sets; the acked mids none of the rows holds returned ascending."""
    cdef Py_ssize_t n = PyList_GET_SIZE(mids), nr = PyList_GET_SIZE(rows)
    cdef Py_ssize_t m, i, j, r, hn, nh
    cdef int64_t* acked = NULL
    cdef Py_ssize_t* hits = NULL
    cdef unsigned char* found = NULL
    cdef const char* p
    cdef object row, shared, first, blob, tkey, before, hit, new
    cdef dict noted
    cdef list hit_list, out
    cdef bint sorted_run = True, fresh
    if not _ack_inputs_plain(mids, rows):
        from fastroute.store import py_ack_device
        return py_ack_device(key, mids, rows, partial, spartial, release, drop_packs,
                             drop_shares)
    if nr and _acks_whole_rows(key, mids, rows, partial, spartial):
        # the common case: the device acks its rows' mids, all and in order
        # (a group's member, the shares of the few transactions since its
        # last ack: in a relay's group send, nearly every call): each row
        # goes whole, without a merge or an int a mid
        j = 0
        for r in range(nr):
            row = <object>PyList_GET_ITEM(rows, r)
            shared, first, blob = row
            hn = PyBytes_GET_SIZE(blob) // 8
            (drop_shares if shared else drop_packs).extend((key, first))
            if shared:
                release(first, mids if nr == 1 else mids[j:j + hn])
            j += hn
        return []
    acked = <int64_t*>PyMem_Malloc((n + 1) * sizeof(int64_t))
    found = <unsigned char*>PyMem_Malloc(n + 1)
    hits = <Py_ssize_t*>PyMem_Malloc((n + 1) * sizeof(Py_ssize_t))
    try:
        if acked == NULL or found == NULL or hits == NULL:
            raise MemoryError()
        for i in range(n):
            acked[i] = <int64_t>(<object>PyList_GET_ITEM(mids, i))
            if i and acked[i - 1] >= acked[i]:
                sorted_run = False
        m = n
        if not sorted_run:
            # a set's worth: ascending, each once
            qsort(acked, n, sizeof(int64_t), _cmp_int64)
            m = 0
            for i in range(n):
                if m == 0 or acked[m - 1] != acked[i]:
                    acked[m] = acked[i]
                    m += 1
        memset(found, 0, m + 1)
        for r in range(nr):
            row = <object>PyList_GET_ITEM(rows, r)
            shared, first, blob = row
            p = PyBytes_AS_STRING(blob)
            hn = PyBytes_GET_SIZE(blob) // 8
            # both ascending: one pass over each
            nh = 0
            i = 0
            j = 0
            while i < m and j < hn:
                if acked[i] < _blob_mid(p, j):
                    i += 1
                elif acked[i] > _blob_mid(p, j):
                    j += 1
                else:
                    hits[nh] = i
                    nh += 1
                    i += 1
                    j += 1
            if not nh:
                continue
            hit_list = PyList_New(0)
            for i in range(nh):
                found[hits[i]] = 1
                hit_list.append(PyLong_FromLongLong(acked[hits[i]]))
            noted = spartial if shared else partial
            tkey = (key, first)
            before = noted.get(tkey)
            # fresh: none of these mids was acked before (so for a row not
            # acked in part yet, and for the usual rest of one that was):
            # all are new, and the row is complete when the counts add up,
            # without the union of two sets
            fresh = before is None
            if not fresh and type(before) is set:
                for i in range(nh):
                    if PySet_Contains(before, <object>PyList_GET_ITEM(hit_list, i)):
                        break
                else:
                    fresh = True
            if fresh:
                if shared:
                    release(first, hit_list)
                if nh + (0 if before is None else PySet_GET_SIZE(before)) == hn:
                    (drop_shares if shared else drop_packs).extend(tkey)
                    noted.pop(tkey, None)
                elif before is None:
                    noted[tkey] = set(hit_list)
                else:
                    noted[tkey] = before.union(hit_list)
                continue
            hit = set(hit_list)
            if shared:
                new = hit - before
                if new:
                    release(first, new)
            hit = before | hit
            if len(hit) == hn:
                (drop_shares if shared else drop_packs).extend(tkey)
                noted.pop(tkey, None)
            else:
                noted[tkey] = hit
        out = []
        for i in range(m):
            if not found[i]:
                out.append(PyLong_FromLongLong(acked[i]))
        return out
    finally:
        PyMem_Free(acked)
        PyMem_Free(found)
        PyMem_Free(hits)


def pack_rows(object data):
    """A pack's rows ``(mid, sender, id, body, ts_ms)`` (see
    ``fastroute.store.py_pack_rows``): read with a C cursor, one tuple a
    row and a sender decoded once a run of the same one, when the entries
    are in the writers' encoding; anything else (or an error) by the
    specification, which says what is wrong."""
    cdef Cursor c
    cdef Py_ssize_t n, i, k
    cdef unsigned long long mid, ts, exp
    cdef object sender = None, cid, body
    cdef const unsigned char* prev_p = NULL
    cdef Py_ssize_t prev_n = -1
    cdef list rows = []
    if not PyBytes_CheckExact(data):
        return _pack_rows_spec(data)
    # the bytes object is immutable and held: the cursor stays valid
    c.p = <const unsigned char*>PyBytes_AS_STRING(data)
    c.end = c.p + PyBytes_GET_SIZE(data)
    n = take_array(&c)
    if n < 0:
        return _pack_rows_spec(data)
    for i in range(n):
        if c.p >= c.end or c.p[0] != 0x96:
            return _pack_rows_spec(data)
        c.p += 1
        if not take_uint(&c, &mid):
            return _pack_rows_spec(data)
        k = take_len(&c, 0xd9, 0xa0, 31)
        if k < 0 or c.end - c.p < k:
            return _pack_rows_spec(data)
        if k != prev_n or memcmp(c.p, prev_p, <size_t>k) != 0:
            try:
                sender = PyUnicode_DecodeUTF8(<const char*>c.p, k, NULL)
            except UnicodeDecodeError:
                return _pack_rows_spec(data)
            prev_p = c.p
            prev_n = k
        c.p += k
        k = take_len(&c, 0xc4, 0, 0)
        if k < 0 or c.end - c.p < k:
            return _pack_rows_spec(data)
        cid = fr_bytes(<const char*>c.p, k)
        c.p += k
        k = take_len(&c, 0xc4, 0, 0)
        if k < 0 or c.end - c.p < k:
            return _pack_rows_spec(data)
        body = fr_bytes(<const char*>c.p, k)
        c.p += k
        if not take_uint(&c, &ts) or not take_uint(&c, &exp):
            return _pack_rows_spec(data)
        rows.append((PyLong_FromUnsignedLongLong(mid), sender, cid, body,
                     PyLong_FromUnsignedLongLong(ts)))
    if c.p != c.end:
        return _pack_rows_spec(data)
    return rows


cdef object _pack_rows_spec(object data):
    # the specification itself (imported late: fastroute.store imports this
    # module)
    from fastroute.store import py_pack_rows
    return py_pack_rows(data)
