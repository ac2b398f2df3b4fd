# Mailbox ring, ready list, full list and identity cache: the C primitives of
# the engine.
# Part of fastroute._core; no Python-visible names.  Specification: the
# mailboxes of fastroute/_model.py (Router).  None of these functions touches a Python object
# other than by Py_INCREF (never a DECREF), so none can run Python code:
# route and fan-out loops may call them while iterating borrowed arrays.


cdef extern from "Python.h":
    # raw-pointer forms, so that the hot loops carry no Cython refcounting;
    # the *_new ones return a new reference or NULL with an exception set
    void Py_INCREF_p "Py_INCREF" (PyObject* o)
    void Py_DECREF_p "Py_DECREF" (PyObject* o)
    PyObject* PyTuple_New_new "PyTuple_New" (Py_ssize_t n)
    PyObject* PyLong_FromUnsignedLongLong_new "PyLong_FromUnsignedLongLong" (
        unsigned long long v)
    # both steal the reference to the item
    void PyTuple_SET_ITEM_steal "PyTuple_SET_ITEM" (PyObject* t, Py_ssize_t i,
                                                    PyObject* o)
    void PyList_SET_ITEM_steal "PyList_SET_ITEM" (PyObject* t, Py_ssize_t i,
                                                  PyObject* o)
    bint PyObject_GC_IsTracked_p "PyObject_GC_IsTracked" (PyObject* o)
    void PyObject_GC_UnTrack_p "PyObject_GC_UnTrack" (void* o)
    bint PyTuple_Check_p "PyTuple_Check" (PyObject* o)
    Py_ssize_t PyTuple_GET_SIZE_p "PyTuple_GET_SIZE" (PyObject* o)
    PyObject* PyTuple_GET_ITEM_p "PyTuple_GET_ITEM" (PyObject* o, Py_ssize_t i)
    PyObject* PyList_GET_ITEM_p "PyList_GET_ITEM" (PyObject* o, Py_ssize_t i)
    bint PyUnicode_CheckExact_p "PyUnicode_CheckExact" (PyObject* o)
    # NULL without an exception for a missing key; with exact str keys no
    # exception is possible at all
    PyObject* PyDict_GetItemWithError_p "PyDict_GetItemWithError" (
        PyObject* d, PyObject* k)


cdef extern from *:
    """
    /* Add n references at once.  A fan-out to N devices would otherwise do
       N dependent read-modify-writes of the same refcount word, which caps
       the loop at one delivery per store-forwarding latency.  Debug and
       free-threaded builds keep the plain loop (reference totals, split
       refcounts); on 3.12+ Py_SET_REFCNT leaves immortal objects alone. */
    static inline void fastroute_incref_n(PyObject *o, Py_ssize_t n) {
    #if defined(Py_REF_DEBUG) || defined(Py_GIL_DISABLED)
        while (n-- > 0) Py_INCREF(o);
    #else
        if (n > 0) Py_SET_REFCNT(o, Py_REFCNT(o) + n);
    #endif
    }
    """
    void incref_n "fastroute_incref_n" (PyObject* o, Py_ssize_t n)


cdef inline uint64_t ring_size_for(uint64_t live) noexcept:
    """Smallest power-of-two ring (>= RING_MIN) holding ``live`` slots."""
    cdef uint64_t size = RING_MIN
    while size < live:
        size <<= 1
    return size


cdef int ring_resize(Mailbox* m, uint64_t size) noexcept:
    """Move the live slots [acked, tail) into a new ring of ``size`` slots.

    ``size`` is a power of two >= tail - acked.  Returns 0, or -1 when out of
    memory, leaving ``m`` untouched.  Slots keep their absolute positions,
    so sequence numbers do not change.
    """
    cdef PyObject** buf = <PyObject**>PyMem_Malloc(size * sizeof(PyObject*))
    cdef uint64_t pos = m.acked
    cdef uint64_t old_mask = m.size - 1
    cdef uint64_t new_mask = size - 1
    if buf is NULL:
        return -1
    while pos < m.tail:
        buf[pos & new_mask] = m.buf[pos & old_mask]
        pos += 1
    PyMem_Free(m.buf)
    m.buf = buf
    m.size = size
    return 0


cdef inline void ring_maybe_shrink(Mailbox* m) noexcept:
    """Give memory back once the ring is at most a quarter full.

    The new ring is at least twice the live count, so it must take as many
    messages again before it grows: no grow/shrink ping-pong.  A failed
    allocation just keeps the bigger ring.
    """
    cdef uint64_t live = m.tail - m.acked
    if m.size > RING_MIN and live * 4 <= m.size:
        ring_resize(m, ring_size_for(live * 2))


cdef int ready_push(ReadyList* r, int64_t dev_id) noexcept:
    """Append an id to the ready list; -1 when out of memory."""
    cdef Py_ssize_t size
    cdef int64_t* ids
    if r.n == r.size:
        size = r.size * 2 if r.size else READY_MIN
        ids = <int64_t*>PyMem_Realloc(r.ids, size * sizeof(int64_t))
        if ids is NULL:
            return -1
        r.ids = ids
        r.size = size
    r.ids[r.n] = dev_id
    r.n += 1
    return 0


cdef inline int mb_put(Mailbox* m, PyObject* payload, ReadyList* ready) noexcept:
    """Append ``payload`` to the mailbox (capacity already checked).

    Returns OFFER_PLACED, or OFFER_NOMEM with nothing changed.  The caller
    owes the slot its reference and the counters their update: placement
    loops settle both once per payload with incref_n() and placed(), before
    anything can run Python code.
    """
    if m.tail - m.acked == m.size:
        if ring_resize(m, m.size * 2 if m.size else RING_MIN) < 0:
            return OFFER_NOMEM
    if m.tail == m.popped and not m.in_ready:
        # empty -> non-empty: the front end must wake this device's writer
        if ready_push(ready, m.dev_id) < 0:
            return OFFER_NOMEM
        m.in_ready = True
    m.buf[m.tail & (m.size - 1)] = payload
    m.tail += 1
    return OFFER_PLACED


cdef inline int mb_offer(Mailbox* m, PyObject* payload, uint64_t cap,
                         ReadyList* ready, Counters* c) noexcept:
    """route/fan-out placement: honours and sets the sticky overflow flag."""
    if m.overflowed:
        return OFFER_FULL
    if m.tail - m.acked >= cap:
        m.overflowed = True
        c.overflowed += 1
        return OFFER_FULL
    return mb_put(m, payload, ready)


cdef inline void placed(Counters* c, PyObject* payload, int64_t n) noexcept:
    """Settle ``n`` placements of ``payload``: its references and the counts."""
    incref_n(payload, n)
    c.queued += n
    c.delivered += n


cdef int full_add(FullList* f, int64_t index, int64_t dev_id) noexcept:
    """Record one (item index, device id) refusal; -1 when out of memory."""
    cdef Py_ssize_t size
    cdef int64_t* pairs
    if f.n == f.size:
        size = f.size * 2 if f.size else 8
        pairs = <int64_t*>PyMem_Realloc(f.pairs, 2 * size * sizeof(int64_t))
        if pairs is NULL:
            return -1
        f.pairs = pairs
        f.size = size
    f.pairs[2 * f.n] = index
    f.pairs[2 * f.n + 1] = dev_id
    f.n += 1
    return 0


cdef inline int idc_find(IdCache* c, PyObject* key) noexcept:
    """Where ``key`` (this very object) is in ``c``, or -1."""
    cdef int j
    for j in range(c.n):
        if c.keys[j] == key:
            return j
    return -1


cdef inline void idc_add(IdCache* c, PyObject* key, PyObject* val, Py_ssize_t num) noexcept:
    """Keep ``key`` -> ``val``/``num`` in ``c`` if it has room (it is a cache)."""
    if c.n < ID_CACHE:
        c.keys[c.n] = key
        c.vals[c.n] = val
        c.nums[c.n] = num
        c.n += 1
