# The dedup window of the relay's gate and of the client (DedupTable),
# compiled.  Part of fastroute._core, included before _gate.pxi and
# _client.pxi, which call its cdef methods per message.
#
# Compiled twins of fastroute/dedup.py (the specification):
#   DedupTable = DedupWindow
#
# tests/test_dedup.py drives both with the same operations and compares
# every answer.
#
# Why not a dict: the relay keeps up to a million recent ids.  As a dict of
# (sender, id) -> [code, stamp, waiters] that is five Python objects per
# entry (about 250 bytes, all tracked by the cyclic GC), a lookup that
# misses the cache several times, and FIFO eviction by deleting a dict's
# first key, which leaves a dummy that every later "first key" walks past:
# quadratic once the window is full.  Here an entry is one 48-byte slot in a
# ring (oldest at ``tail``, newest at ``head - 1``), found through an
# open-addressing index of ring positions; eviction pops the tail and leaves
# the index alone (its entry is stale from then on, and swept out later).
#
# Ownership: a live slot holds one strong reference to its sender (an exact
# str, so comparing senders never runs Python code); the ids are copied in.
# Waiters (rare: an id resent while its first copy is still being stored)
# live in a dict keyed by (sender, id), flagged on the slot.

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.object cimport PyObject_Hash
from cpython.ref cimport Py_DECREF
from libc.errno cimport errno
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport (
    MADV_HUGEPAGE,
    MAP_ANONYMOUS,
    MAP_FAILED,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    madvise,
    mincore,
    mmap,
    munmap,
)
from posix.unistd cimport _SC_PAGESIZE, sysconf

cdef extern from "Python.h":
    int PyUnicode_Compare(object left, object right) except? -1

cdef extern from *:
    """
    /* a hint to the CPU (never faults): start loading the line that a later
       probe reads and writes */
    static inline void fr_prefetch(const void* p) { __builtin_prefetch(p, 1, 3); }
    """
    void fr_prefetch(const void* p) noexcept nogil


cdef enum:
    DEDUP_MIN_CAP = 64
    DEDUP_PENDING = -1   # fastroute.gate.PENDING
    DEDUP_EVICT_STEP = 8  # fastroute.gate._EVICT_STEP
    # ids hashed and prefetched ahead of their probes by the batch loops of
    # _gate.pxi: enough misses in flight to overlap, few enough that the
    # lines are still cached when probed
    DEDUP_BATCH = 16
    # index positions swept for stale entries per position the ring's tail
    # advances (see DedupTable._sweep): a lap of the index every
    # 2 * cap / DEDUP_SWEEP evictions, so about cap / 2 stale entries at most
    # (a full window of a million: ~260,000 on average, the index ~60 % full)
    DEDUP_SWEEP = 4
    # ... in runs of this many positions (64 lines; a 16th of a small
    # table's index): a run is read ahead as a stream, where a line at a
    # time would wait for each
    DEDUP_SWEEP_RUN = 512


cdef struct DSlot:
    PyObject* sender     # strong reference; NULL: a hole left by forget()
    Py_hash_t hash
    double stamp
    int code
    int has_waiters
    unsigned char cid[16]


cdef enum:
    # arrays this big are mapped on their own, in huge pages where the kernel
    # allows: a full window is ~64 MB probed at random, and with 4 KB pages
    # nearly every lookup paid a TLB miss on top of its cache miss
    DEDUP_MAP_MIN = 2 * 1024 * 1024
    # DedupTable.warm: pages are made resident in steps of a huge page, and
    # this far past the newest entry (a million ids a second fill 8 MB of
    # slots in 170 ms); the next warm is asked for when half of it is used
    DEDUP_WARM_STEP = 2 * 1024 * 1024
    DEDUP_WARM_AHEAD = 8 * 1024 * 1024
    # Linux >= 5.14: fault pages in as a write would, without changing what
    # they hold (so a thread may do it beside the loop that writes them)
    DEDUP_MADV_POPULATE_WRITE = 23


cdef long long DEDUP_NEVER = 0x7fffffffffffffffLL


cdef inline bint dedup_mapped(size_t size) noexcept:
    """Whether an array of ``size`` bytes is mapped (else on the heap): only
    mapped arrays are taken page by page, so only they are warmed."""
    return size >= DEDUP_MAP_MIN


cdef void* dedup_zalloc(size_t size) noexcept:
    """``size`` zeroed bytes (NULL: no memory); free with :func:`dedup_free`."""
    cdef void* p
    if not dedup_mapped(size):
        p = PyMem_Malloc(size)
        if p != NULL:
            memset(p, 0, size)
        return p
    # anonymous pages come zeroed, and are only touched when used
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if p == MAP_FAILED:
        return NULL
    madvise(p, size, MADV_HUGEPAGE)  # advice only: without it, plain pages
    return p


cdef void dedup_free(void* p, size_t size) noexcept:
    if p == NULL:
        return
    if not dedup_mapped(size):
        PyMem_Free(p)
    else:
        munmap(p, size)


cdef size_t _resident_bytes(char* p, size_t size) except? 0:
    """Bytes of the mapping ``p[:size]`` in memory (0 unless mapped)."""
    cdef size_t page = <size_t>sysconf(_SC_PAGESIZE), pages, i, n = 0
    cdef unsigned char* vec
    if p == NULL or not dedup_mapped(size):
        return 0
    pages = (size + page - 1) // page
    vec = <unsigned char*>PyMem_Malloc(pages)
    if vec == NULL:
        raise MemoryError()
    try:
        if mincore(p, size, vec) != 0:
            raise OSError(errno, "mincore failed")
        for i in range(pages):
            n += vec[i] & 1
    finally:
        PyMem_Free(vec)
    return n * page


cdef extern from "Python.h":
    # what hash() of a bytes object is (and caches): the id of a frame read
    # in place hashes as its bytes would, so both meet in one table
    Py_hash_t _Py_HashBytes(const void* src, Py_ssize_t len)


cdef inline Py_hash_t dedup_hash_p(object sender, const char* cid) except? -1:
    """:func:`dedup_hash` of the 16 id bytes at ``cid``."""
    cdef uint64_t hc = <uint64_t>_Py_HashBytes(cid, 16)
    cdef uint64_t hs = <uint64_t>PyObject_Hash(sender)
    return <Py_hash_t>(hc ^ (hs * <uint64_t>0x5bd1e995ULL))


cdef inline Py_hash_t dedup_hash(object sender, object cid) except? -1:
    # str and bytes hashes are SipHash with the process's random key (no
    # chosen-collision floods) and are cached in the objects; mixed in
    # unsigned arithmetic, where overflow wraps instead of being undefined
    cdef uint64_t hc = <uint64_t>PyObject_Hash(cid)
    cdef uint64_t hs = <uint64_t>PyObject_Hash(sender)
    return <Py_hash_t>(hc ^ (hs * <uint64_t>0x5bd1e995ULL))


cdef uint64_t DEDUP_SLOT_MASK = 0xffffffffULL
cdef uint64_t DEDUP_TAG_MASK = 0xffffffff00000000ULL
# an index entry's low 32 bits: its entry's ring position modulo 2**31, + 1
# (0 is an empty position); the ring has at most 2**30 slots
cdef uint64_t DEDUP_POS_MASK = 0x7fffffffULL


cdef inline bint dedup_behind(uint64_t v, uint64_t tail, uint64_t span) noexcept:
    # whether the non-empty index entry ``v`` names a ring position behind
    # ``tail`` (``span``: head - tail); see DedupTable._stale
    return (((v & DEDUP_SLOT_MASK) - 1 - tail) & DEDUP_POS_MASK) >= span


cdef inline uint64_t dedup_tag(Py_hash_t h) noexcept:
    # the hash's low 32 bits, which include its home position in the index
    # (the index never has 2**32 entries): shifting entries back after a
    # removal needs no slot read
    return (<uint64_t>h) << 32


# final: its cdef methods are then called directly, not through the vtable,
# and the C compiler inlines the small ones into the per-message paths
@cython.final
cdef class DedupTable:
    """Recently seen client message ids and the result each one got (compiled).

    The same contract as :class:`fastroute.gate.DedupWindow`, its Python
    twin: keys are ``(sender, id)`` with ``sender`` a str and ``id`` 16
    bytes; codes are ints, :data:`~fastroute.gate.PENDING` while a message
    is accepted but not yet stored.  At most ``max_entries`` entries are
    kept, plus pending ones: the oldest decided one goes first, a pending
    one is never dropped (it moves to the young end instead).  Decided entries older than
    ``window_s`` count as absent.  ``presize`` allocates room for
    ``max_entries`` at once instead of growing (the relay's tables).
    """

    cdef DSlot* slots
    cdef Py_ssize_t cap          # ring slots, a power of two
    cdef long long head, tail    # logical ring positions
    cdef Py_ssize_t live
    # 2 * cap entries: the hash's low 32 bits << 32 | ring position + 1 (see
    # DEDUP_POS_MASK); 0 = empty.  Probing compares those hash bits here, so
    # a lookup touches a slot (one more cache miss in a table of a million)
    # only when they match.  An entry whose position the tail has passed is
    # stale: an evicted id's, left in place (evicting touches only the ring,
    # read in order, not the index at random) until _sweep takes it out.
    cdef uint64_t* index
    cdef Py_ssize_t imask
    cdef Py_ssize_t _sweep_at     # where the sweep goes on in the index
    cdef long long _swept_tail    # the tail it has kept up with
    cdef readonly double window_s
    cdef readonly Py_ssize_t max_entries
    cdef dict _waiters
    cdef object _clock
    # warming (see warm_with): who is asked, at which ring position next,
    # how far the slots are resident (bytes from the start of the first
    # lap), whether the index is; _warm_gen changes when the arrays do
    cdef object _warm_ask
    cdef long long _warm_at
    cdef size_t _warmed
    cdef bint _index_warm
    cdef bint _warming
    cdef long long _warm_gen
    cdef list _retired

    def __cinit__(self, double window_s=600.0, Py_ssize_t max_entries=1_000_000,
                  clock=None, bint presize=False):
        cdef Py_ssize_t cap = DEDUP_MIN_CAP
        if max_entries < 1:
            raise InvalidArgument("max_entries must be positive")
        if not window_s >= 0.0:
            raise InvalidArgument("window_s must be >= 0")
        self.window_s = window_s
        self.max_entries = max_entries
        self._waiters = {}
        self._warm_at = DEDUP_NEVER
        self._retired = []
        if clock is None:
            import time
            clock = time.monotonic
        self._clock = clock
        if presize:
            # room for the whole window now: growing copies every entry and
            # rebuilds the index at once, a stall of the relay's loop of
            # ~45 ms at half a million entries.  The arrays are mapped, so a
            # page costs memory only once an entry lands on it.
            while cap < max_entries and cap < (1 << 30):
                cap *= 2
        self._alloc(cap)

    def __dealloc__(self):
        cdef long long pos
        cdef DSlot* s
        if self.slots != NULL:
            for pos in range(self.tail, self.head):
                s = &self.slots[pos & (self.cap - 1)]
                if s.sender != NULL:
                    Py_DECREF(<object>s.sender)
                    s.sender = NULL
            dedup_free(self.slots, self.cap * sizeof(DSlot))
            self.slots = NULL
        dedup_free(self.index, 2 * self.cap * sizeof(uint64_t))
        self.index = NULL

    cdef int _alloc(self, Py_ssize_t cap) except -1:
        cdef DSlot* slots = <DSlot*>dedup_zalloc(cap * sizeof(DSlot))
        cdef uint64_t* index = <uint64_t*>dedup_zalloc(2 * cap * sizeof(uint64_t))
        if slots == NULL or index == NULL:
            dedup_free(slots, cap * sizeof(DSlot))
            dedup_free(index, 2 * cap * sizeof(uint64_t))
            raise MemoryError()
        self.slots = slots
        self.index = index
        self.cap = cap
        self.imask = 2 * cap - 1
        self.head = self.tail = 0
        self._sweep_at = 0
        self._swept_tail = 0
        return 0

    def __len__(self):
        return self.live

    # ------------------------------------------------------------ internals
    cdef inline Py_ssize_t _find(self, object sender, object cid, Py_hash_t h,
                                 Py_ssize_t* at) except -2:
        """The slot of (sender, cid), or -1; ``at`` gets its index position
        (or the empty position where it would go)."""
        return self._find_p(sender, PyBytes_AS_STRING(cid), h, at)

    cdef inline Py_ssize_t _find_p(self, object sender, const char* c, Py_hash_t h,
                                   Py_ssize_t* at) except -2:
        """:meth:`_find` of the 16 id bytes at ``c`` (a frame's, read in place)."""
        cdef Py_ssize_t i = <Py_ssize_t>(<size_t>h & <size_t>self.imask), slot
        cdef uint64_t v, tag = dedup_tag(h)
        cdef DSlot* s
        while True:
            v = self.index[i]
            if v == 0:
                at[0] = i
                return -1
            # a stale entry's slot may hold a newer id, or none: not read
            if (v & DEDUP_TAG_MASK) == tag and not self._stale(v):
                slot = self._slot_of(v)
                s = &self.slots[slot]
                if s.hash == h and memcmp(s.cid, c, 16) == 0 and (
                        s.sender == <PyObject*>sender
                        or PyUnicode_Compare(<object>s.sender, sender) == 0):
                    at[0] = i
                    return slot
            i = (i + 1) & self.imask

    cdef inline uint64_t _value(self, long long pos, Py_hash_t h) noexcept:
        """The index entry of the id of hash ``h`` at ring position ``pos``."""
        return dedup_tag(h) | ((<uint64_t>pos & DEDUP_POS_MASK) + 1)

    cdef inline Py_ssize_t _slot_of(self, uint64_t v) noexcept:
        return <Py_ssize_t>(((v & DEDUP_SLOT_MASK) - 1) & <uint64_t>(self.cap - 1))

    cdef inline bint _stale(self, uint64_t v) noexcept:
        """Whether the (non-empty) entry ``v`` is behind the tail: evicted.

        Positions are compared modulo 2**31: a live one is less than
        ``head - tail`` (at most 2**30) past the tail, and a stale one is
        swept out within a lap of the sweep (cap / 2 evictions), long
        before it is 2**30 behind it.
        """
        return dedup_behind(v, <uint64_t>self.tail, <uint64_t>(self.head - self.tail))

    cdef Py_ssize_t _index_of(self, long long pos) noexcept:
        """The index position of the live entry at ring position ``pos``."""
        cdef Py_hash_t h = self.slots[pos & (self.cap - 1)].hash
        cdef Py_ssize_t i = <Py_ssize_t>(<size_t>h & <size_t>self.imask)
        cdef uint64_t v = self._value(pos, h)
        while self.index[i] != v:
            i = (i + 1) & self.imask
        return i

    cdef void _unindex(self, Py_ssize_t i) noexcept:
        # linear probing: shift later members of the probe run back so that
        # no lookup ever stops at the hole (no tombstones in the index)
        cdef Py_ssize_t j = i, k
        cdef uint64_t v
        while True:
            j = (j + 1) & self.imask
            v = self.index[j]
            if v == 0:
                break
            k = <Py_ssize_t>(<size_t>(v >> 32) & <size_t>self.imask)
            if (i <= j and i < k <= j) or (i > j and (k > i or k <= j)):
                continue  # its home is after the hole: it stays
            self.index[i] = v
            i = j
        self.index[i] = 0

    cdef void _drop(self, Py_ssize_t slot, Py_ssize_t i) noexcept:
        """Remove a live slot (index position ``i``); leaves a hole in the ring."""
        self._unindex(i)
        self._vacate(slot)

    cdef void _vacate(self, Py_ssize_t slot) noexcept:
        """Empty a live slot, its index entry left to the caller."""
        cdef DSlot* s = &self.slots[slot]
        cdef PyObject* sender = s.sender
        s.sender = NULL
        s.has_waiters = 0
        self.live -= 1
        Py_DECREF(<object>sender)  # a str: no code runs

    cdef void _skip_holes(self) noexcept:
        while self.tail < self.head and self.slots[self.tail & (self.cap - 1)].sender == NULL:
            self.tail += 1

    cdef void _rotate(self) noexcept:
        """Move the (live, pending) tail entry to the young end."""
        cdef Py_ssize_t p = <Py_ssize_t>(self.tail & (self.cap - 1))
        cdef Py_ssize_t q = <Py_ssize_t>(self.head & (self.cap - 1))
        # its index entry names its new position, in place (no entry moves)
        self.index[self._index_of(self.tail)] = self._value(self.head, self.slots[p].hash)
        if p != q:  # else the ring is full and the slot already is the young end
            self.slots[q] = self.slots[p]
            self.slots[p].sender = NULL
            self.slots[p].has_waiters = 0
        self.tail += 1
        self.head += 1
        if self.head >= self._warm_at:
            self._ask_warm()

    cdef bint _retire_oldest(self) noexcept:
        """Drop the (live) tail entry if it is decided and return True; a
        pending one moves to the young end instead (False).

        The dropped entry's index entry stays, stale once the tail is past
        it (see :meth:`_sweep`): finding it would be one more read of the
        index at random, a cache miss an insert in a full window of a million.
        """
        cdef Py_ssize_t p = <Py_ssize_t>(self.tail & (self.cap - 1))
        if self.slots[p].code == DEDUP_PENDING:
            self._rotate()
            return False
        self._vacate(p)
        self.tail += 1
        return True

    cdef void _sweep(self) noexcept:
        """Take stale entries out of the index, ``DEDUP_SWEEP`` positions
        for each position the tail moved since the last sweep.

        The sweep goes round the index in order, in runs read ahead: a stale
        entry is gone within a lap, 2 * cap / DEDUP_SWEEP evictions, so
        about cap / 2 at most are left and probes stay short.  In the
        relay at a full window of a million this cost less than the random
        read of the index that finding each evicted entry took (a bench's
        A/B, not a single-threaded loop of inserts, where that read hid
        behind the probe's own miss).  It shifts entries back (:meth:`_unindex`):
        an empty position found before a sweep may no longer be the first
        on its probe path, so it runs only after an insert, or after
        evictions with none to follow.
        """
        cdef long long due = self.tail - self._swept_tail
        cdef Py_ssize_t n, c = self._sweep_at, imask = self.imask
        cdef uint64_t v
        # _stale's test, with what it reads held here (_unindex changes
        # neither the ring's ends nor where the index is)
        cdef uint64_t tail = <uint64_t>self.tail, span = <uint64_t>(self.head - self.tail)
        cdef uint64_t* index = self.index
        n = imask + 1
        if due < n // DEDUP_SWEEP:
            n = <Py_ssize_t>due * DEDUP_SWEEP
        if n < DEDUP_SWEEP_RUN and n < (imask + 1) >> 4:
            return  # a run's worth is not due yet
        self._swept_tail = self.tail
        while n > 0:
            if (c & 7) == 0:
                fr_prefetch(&index[(c + 256) & imask])
            v = index[c]
            if v != 0 and dedup_behind(v, tail, span):
                self._unindex(c)  # what followed it may now be at c: look again
                continue
            c = (c + 1) & imask
            n -= 1
        self._sweep_at = c

    cdef int _grow(self) except -1:
        cdef DSlot* old = self.slots
        cdef uint64_t* old_index = self.index
        cdef Py_ssize_t old_cap = self.cap, i
        cdef long long pos, tail = self.tail, head = self.head
        cdef DSlot* s
        if old_cap >= (1 << 30):
            raise MemoryError("dedup table over 2**30 entries")
        self.slots = NULL
        self.index = NULL
        try:
            self._alloc(old_cap * 2)
        except MemoryError:
            self.slots = old
            self.index = old_index
            self.cap = old_cap
            self.imask = 2 * old_cap - 1
            self.head = head
            self.tail = tail
            raise
        # compact in ring order: the live entries, oldest first
        for pos in range(tail, head):
            s = &old[pos & (old_cap - 1)]
            if s.sender == NULL:
                continue
            self.slots[self.head] = s[0]
            i = <Py_ssize_t>(<size_t>s.hash & <size_t>self.imask)
            while self.index[i] != 0:
                i = (i + 1) & self.imask
            self.index[i] = self._value(self.head, s.hash)
            self.head += 1
        if self._warming:
            # a worker may be faulting pages of the old arrays in right now
            # (without the GIL): they are unmapped when it is done
            self._retired.append((<size_t>old, old_cap * sizeof(DSlot)))
            self._retired.append((<size_t>old_index, 2 * old_cap * sizeof(uint64_t)))
        else:
            dedup_free(old, old_cap * sizeof(DSlot))
            dedup_free(old_index, 2 * old_cap * sizeof(uint64_t))
        # the new arrays are cold: warm them from the start, at the next insert
        self._warm_gen += 1
        self._warmed = 0
        self._index_warm = False
        if self._warm_ask is not None and self._mapped():
            self._warm_at = self.head
        return 0

    cdef int _make_room(self) except -1:
        """Evict or grow as needed before an insert; 1 if that moved index
        entries (an empty position found before is then stale), else 0:
        evictions leave their entries in place and a rotation rewrites its
        own, so only growing does."""
        cdef Py_ssize_t budget
        # a bounded step per insert: pending entries at the tail are rotated,
        # not dropped, and walking all of them on every insert would make a
        # window full of pending ids quadratic; the next inserts go on from
        # where this one stopped
        budget = min(<Py_ssize_t>DEDUP_EVICT_STEP, self.live)
        while self.live >= self.max_entries and budget > 0:
            budget -= 1
            self._skip_holes()
            self._retire_oldest()
        self._skip_holes()
        if self.head - self.tail >= self.cap:
            self._grow()
            return 1
        return 0

    cdef Py_ssize_t _add(self, object sender, object cid, Py_hash_t h, int code,
                         double stamp, Py_ssize_t at) except -1:
        """Append a new entry (the key must be absent); ``at`` is the empty
        index position its lookup ended at, just before."""
        return self._add_p(sender, PyBytes_AS_STRING(cid), h, code, stamp, at)

    cdef Py_ssize_t _add_p(self, object sender, const char* cid, Py_hash_t h, int code,
                           double stamp, Py_ssize_t at) except -1:
        """:meth:`_add` of the 16 id bytes at ``cid``."""
        cdef Py_ssize_t q
        cdef DSlot* s
        if self._make_room():
            self._find_p(sender, cid, h, &at)  # growth moved entries
        q = <Py_ssize_t>(self.head & (self.cap - 1))
        s = &self.slots[q]
        Py_INCREF(sender)
        s.sender = <PyObject*>sender
        s.hash = h
        s.stamp = stamp
        s.code = code
        s.has_waiters = 0
        memcpy(s.cid, cid, 16)
        self.index[at] = self._value(self.head, h)
        self.head += 1
        self.live += 1
        self._sweep()  # after the insert: it may shift entries back past ``at``
        if self.head >= self._warm_at:
            self._ask_warm()
        return q

    cdef void _ask_warm(self) noexcept:
        # once per few MB of new entries (DEDUP_NEVER until the warm asked for
        # has run); warming is advice: an ask that fails ends it, never an insert
        self._warm_at = DEDUP_NEVER
        try:
            self._warm_ask(self)
        except Exception:
            self._warm_ask = None

    cdef inline void c_prefetch(self, Py_hash_t h) noexcept:
        """Start loading the index line where the key of hash ``h`` is probed.

        The batch loops hash a few ids ahead and prefetch their lines, so the
        cache misses of a table of a million entries, read at random,
        overlap instead of following one another.  The line after it too:
        a probe may run on into it (an unknown id's reads ~2.3 entries at
        the index's load), and in a profile of a relay with a full window
        half of the probes' samples waited there.
        """
        cdef Py_ssize_t i = <Py_ssize_t>(<size_t>h & <size_t>self.imask)
        fr_prefetch(&self.index[i])
        fr_prefetch(&self.index[(i + 7) & self.imask])

    cdef Py_ssize_t c_hash_ops(self, list ops, Py_ssize_t i, object sender,
                               Py_hash_t* hashes) except -1:
        """Hash the ids of up to DEDUP_BATCH ops from ``ops[i]`` on into
        ``hashes`` and prefetch their index lines, so that the probes of a
        large window overlap their misses; returns where the hashed ops end.  An op is
        the decoders' tuple with its 16-byte id at 1; hashing stops at the
        first that is not (``i`` itself, if op ``i`` is not: the caller then
        hashes its id alone)."""
        cdef Py_ssize_t end = i
        cdef object e
        # the list's size read at each step: never an item past its end
        while end < PyList_GET_SIZE(ops) and end - i < DEDUP_BATCH:
            e = <object>PyList_GET_ITEM(ops, end)
            if not PyTuple_CheckExact(e) or PyTuple_GET_SIZE(e) < 2:
                break
            e = <object>PyTuple_GET_ITEM(e, 1)
            if not PyBytes_CheckExact(e) or PyBytes_GET_SIZE(e) != 16:
                break
            hashes[end - i] = dedup_hash(sender, e)
            self.c_prefetch(hashes[end - i])
            end += 1
        return end

    cdef inline Py_ssize_t c_find(self, object sender, object cid, Py_hash_t h,
                                  double now, int* seen, int* code,
                                  Py_ssize_t* at) except -2:
        """One probe for (sender, cid) of hash ``h``: its slot or -1, ``at``
        its index position (or the empty one where it would go); ``seen`` 1
        and ``code`` its code if it counts as seen at ``now`` (as
        :meth:`c_lookup`), else ``seen`` 0.  Hand slot and ``at`` to
        :meth:`c_record` if nothing else touched the table since."""
        return self.c_find_p(sender, PyBytes_AS_STRING(cid), h, now, seen, code, at)

    cdef inline Py_ssize_t c_find_p(self, object sender, const char* cid, Py_hash_t h,
                                    double now, int* seen, int* code,
                                    Py_ssize_t* at) except -2:
        """:meth:`c_find` of the 16 id bytes at ``cid``."""
        cdef Py_ssize_t slot = self._find_p(sender, cid, h, at)
        cdef DSlot* s
        seen[0] = 0
        if slot >= 0:
            s = &self.slots[slot]
            if s.code == DEDUP_PENDING or not now - s.stamp > self.window_s:
                seen[0] = 1
                code[0] = s.code
        return slot

    cdef inline int c_record(self, object sender, object cid, Py_hash_t h, int code,
                             double now, Py_ssize_t slot, Py_ssize_t at) except -1:
        """:meth:`c_put` after :meth:`c_find` answered ``slot`` and ``at``: no second probe."""
        return self.c_record_p(sender, PyBytes_AS_STRING(cid), h, code, now, slot, at)

    cdef inline int c_record_p(self, object sender, const char* cid, Py_hash_t h, int code,
                               double now, Py_ssize_t slot, Py_ssize_t at) except -1:
        """:meth:`c_record` of the 16 id bytes at ``cid``."""
        if slot >= 0:
            self.slots[slot].code = code
            self.slots[slot].stamp = now
        else:
            self._add_p(sender, cid, h, code, now, at)
        return 0

    cdef inline int c_lookup(self, object sender, object cid, double now,
                             int* code) except -1:
        """1 and ``code`` if (sender, cid) counts as seen at ``now``, else 0."""
        cdef Py_ssize_t at
        cdef Py_ssize_t slot = self._find(sender, cid, dedup_hash(sender, cid), &at)
        cdef DSlot* s
        if slot < 0:
            return 0
        s = &self.slots[slot]
        if s.code != DEDUP_PENDING and now - s.stamp > self.window_s:
            return 0
        code[0] = s.code
        return 1

    cdef int c_put(self, object sender, object cid, int code, double now) except -1:
        """Record (sender, cid) with ``code`` at ``now`` (in place if present)."""
        cdef Py_ssize_t at
        cdef Py_hash_t h = dedup_hash(sender, cid)
        cdef Py_ssize_t slot = self._find(sender, cid, h, &at)
        if slot >= 0:
            self.slots[slot].code = code
            self.slots[slot].stamp = now
        else:
            self._add(sender, cid, h, code, now, at)
        return 0

    cdef object c_finish(self, object sender, object cid, int code, double now):
        """Decide (sender, cid); returns its waiters (or None)."""
        cdef Py_ssize_t near = -1  # no slot to look in first: it is probed for
        return self.c_finish_next(sender, cid, &near, code, now)

    cdef object c_finish_next(self, object sender, object cid, Py_ssize_t* near, int code,
                              double now):
        """:meth:`c_finish` of an entry looked for first in slot ``near[0]``;
        ``near[0]`` is then the slot after the entry's.

        A store batch's pending entries were added one after another, so each
        is usually in the slot after the one before: the entry found there
        (its sender and id compared, as a probe does: a key is in one slot at
        most) needs neither its hash nor a probe of the index, whose lines a
        table of a million has long dropped from the cache by the time the
        batch committed.  Anywhere else (a first entry, one recorded in place
        or rotated, the table grown or compacted since) it is probed for.
        """
        cdef Py_ssize_t p = near[0], at, slot = -1
        cdef Py_hash_t h
        cdef DSlot* s
        if 0 <= p < self.cap:
            s = &self.slots[p]
            if s.sender != NULL and memcmp(s.cid, PyBytes_AS_STRING(cid), 16) == 0 and (
                    s.sender == <PyObject*>sender
                    or PyUnicode_Compare(<object>s.sender, sender) == 0):
                slot = p
        if slot < 0:
            h = dedup_hash(sender, cid)
            slot = self._find(sender, cid, h, &at)
            if slot < 0:
                slot = self._add(sender, cid, h, code, now, at)
                near[0] = (slot + 1) & (self.cap - 1)
                return None
        near[0] = (slot + 1) & (self.cap - 1)
        s = &self.slots[slot]
        s.code = code
        s.stamp = now
        if s.has_waiters:
            s.has_waiters = 0
            return self._waiters.pop((sender, cid), None)
        return None

    cdef int c_wait(self, object sender, object cid, object waiter) except -1:
        cdef Py_ssize_t at
        cdef Py_ssize_t slot = self._find(sender, cid, dedup_hash(sender, cid), &at)
        cdef list lst
        if slot < 0 or self.slots[slot].code != DEDUP_PENDING:
            raise InvalidArgument("only a pending id has waiters")
        key = (sender, cid)
        lst = self._waiters.get(key)
        if lst is None:
            lst = self._waiters[key] = []
        lst.append(waiter)
        self.slots[slot].has_waiters = 1
        return 0

    # ------------------------------------------------------------ Python API
    cdef inline int _check(self, object sender, object cid) except -1:
        if not PyUnicode_CheckExact(sender):
            raise WrongType("sender must be a str")
        if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
            raise InvalidArgument("message id must be 16 bytes")
        return 0

    def lookup(self, sender, cid, double now):
        """The code recorded for ``(sender, cid)``, or None if absent or expired.

        A pending entry never expires: it answers :data:`~fastroute.gate.PENDING`.
        """
        cdef int code
        self._check(sender, cid)
        if self.c_lookup(sender, cid, now, &code):
            return code
        return None

    def begin(self, sender, cid, int code, double now):
        """Record ``(sender, cid)`` with ``code`` (PENDING or a final code) at ``now``.

        An existing entry is updated in place (it keeps its age rank).
        """
        self._check(sender, cid)
        self.c_put(sender, cid, code, now)

    def wait(self, sender, cid, waiter):
        """Queue ``waiter`` on a pending entry; :meth:`finish` or :meth:`forget` returns it."""
        self._check(sender, cid)
        self.c_wait(sender, cid, waiter)

    def finish(self, sender, cid, int code, double now):
        """Set the final code (recording the id if absent); return the waiters or None."""
        self._check(sender, cid)
        return self.c_finish(sender, cid, code, now)

    def forget(self, sender, cid):
        """Drop ``(sender, cid)`` (a refused id may be tried again); return its waiters."""
        cdef Py_ssize_t at, slot
        cdef bint had
        self._check(sender, cid)
        slot = self._find(sender, cid, dedup_hash(sender, cid), &at)
        if slot < 0:
            return None
        had = self.slots[slot].has_waiters
        self._drop(slot, at)
        return self._waiters.pop((sender, cid), None) if had else None

    def get(self, sender, cid):
        """``(code, stamp)`` of the entry, expired or not, or None (for inspection)."""
        cdef Py_ssize_t at, slot
        self._check(sender, cid)
        slot = self._find(sender, cid, dedup_hash(sender, cid), &at)
        if slot < 0:
            return None
        return (self.slots[slot].code, self.slots[slot].stamp)

    def warm_with(self, ask):
        """Have ``ask(table)`` called whenever the next writes near memory not yet resident.

        A presized table is mapped, not written: each first write to one of
        its pages faults, and the kernel zeroes the page (2 MB in a huge
        page, ~0.1-0.3 ms) on the thread that writes -- the relay's loop,
        once per ~44,000 new ids until the window is full.  ``ask`` is
        called on that thread (rarely, and never twice before the warm it
        asked for has run) and should have :meth:`warm` run on another; it
        must return at once.  If it raises, the table stops asking.  A table
        whose arrays are not mapped (small ones) never asks.
        """
        if ask is not None and not callable(ask):
            raise WrongType("ask must be callable or None")
        self._warm_ask = ask
        if ask is None:
            self._warm_at = DEDUP_NEVER
        elif self._warmed < self.cap * sizeof(DSlot) and self._mapped():
            self._warm_at = self.head + 1  # at the next insert
        return None

    cdef bint _mapped(self) noexcept:
        return (dedup_mapped(self.cap * sizeof(DSlot))
                or dedup_mapped(2 * self.cap * sizeof(uint64_t)))

    cdef int _populate(self, char* base, size_t start, size_t end, long long gen) except -2:
        """Fault ``base[start:end]`` in, a step at a time without the GIL;
        1 when done, 0 if the arrays changed meanwhile, -1 if the kernel refuses."""
        cdef size_t at = start, step
        cdef int rc
        while at < end:
            if self._warm_gen != gen:
                return 0
            step = min(<size_t>DEDUP_WARM_STEP, end - at)
            with nogil:
                rc = madvise(base + at, step, DEDUP_MADV_POPULATE_WRITE)
            if rc != 0:
                return -1
            at += step
        return 1

    def warm(self):
        """Make resident the pages the next writes land on; the bytes faulted in.

        For a worker thread (see :meth:`warm_with`): the GIL is released
        while the kernel works.  The index first (it is written at random
        from the first id on), then the slots from where the last warm
        stopped to 8 MB past the newest entry.  What the pages hold is not
        changed, so entries written meanwhile stay; arrays replaced
        meanwhile (a growing table) are left for the next ask.  Returns 0
        where there is nothing to do or the kernel cannot (Linux before
        5.14: then the table stops asking).
        """
        cdef long long gen = self._warm_gen
        cdef size_t slot_bytes, index_bytes, start, upto, done = 0
        cdef int rc = 1
        if self._warming or self.slots == NULL:
            return 0
        self._warming = True
        try:
            index_bytes = 2 * self.cap * sizeof(uint64_t)
            if not self._index_warm and dedup_mapped(index_bytes):
                rc = self._populate(<char*>self.index, 0, index_bytes, gen)
                if rc == 1:
                    self._index_warm = True
                    done += index_bytes
            slot_bytes = self.cap * sizeof(DSlot)
            if rc == 1 and dedup_mapped(slot_bytes) and self._warmed < slot_bytes:
                start = self._warmed
                # the head as it is now: the loop went on while the index warmed
                upto = min(slot_bytes, <size_t>min(self.head, self.cap) * sizeof(DSlot)
                           + <size_t>DEDUP_WARM_AHEAD)
                upto = min(slot_bytes, (upto + DEDUP_WARM_STEP - 1)
                           // DEDUP_WARM_STEP * DEDUP_WARM_STEP)
                if upto > start:
                    rc = self._populate(<char*>self.slots, start, upto, gen)
                    if rc == 1:
                        self._warmed = upto
                        done += upto - start
            if rc == -1:
                self._warm_ask = None  # this kernel cannot: stop asking
            elif self._warm_gen == gen and self._warm_ask is not None:
                if self._warmed >= slot_bytes or not dedup_mapped(slot_bytes):
                    self._warm_at = DEDUP_NEVER  # later laps reuse the pages
                else:
                    # ask again when half of what is ahead is used
                    self._warm_at = max(0, (<long long>self._warmed - DEDUP_WARM_AHEAD // 2)
                                        // <long long>sizeof(DSlot))
            return done
        finally:
            self._warming = False
            while self._retired:
                addr, size = self._retired.pop()
                dedup_free(<void*><size_t>addr, <size_t>size)

    def resident(self):
        """Bytes of the table's mapped arrays that are in memory now (``mincore``).

        0 for arrays that are not mapped (a small table's, on the heap).
        """
        cdef size_t total = 0
        total += _resident_bytes(<char*>self.slots, self.cap * sizeof(DSlot))
        total += _resident_bytes(<char*>self.index, 2 * self.cap * sizeof(uint64_t))
        return total

    def _index_counts(self):
        """``(live, stale)``: the index's entries of ids in the window and of
        evicted ones not yet swept out (for tests)."""
        cdef Py_ssize_t i, live = 0, stale = 0
        for i in range(self.imask + 1):
            if self.index[i] != 0:
                if self._stale(self.index[i]):
                    stale += 1
                else:
                    live += 1
        return live, stale

    def keys(self):
        """The ``(sender, id)`` keys, oldest first (for inspection and tests)."""
        cdef long long pos
        cdef DSlot* s
        out = []
        for pos in range(self.tail, self.head):
            s = &self.slots[pos & (self.cap - 1)]
            if s.sender != NULL:
                out.append((<object>s.sender, PyBytes_FromStringAndSize(<char*>s.cid, 16)))
        return out

    def expire(self, now=None):
        """Forget decided entries older than the window, oldest first; return how many.

        Stops at the first entry still inside the window (entries are
        roughly in age order); a pending one moves to the young end.
        """
        cdef double cutoff = (self._clock() if now is None else <double>now) - self.window_s
        cdef Py_ssize_t budget = self.live, n = 0
        while budget > 0:
            self._skip_holes()
            if self.slots[self.tail & (self.cap - 1)].stamp > cutoff:
                break
            budget -= 1
            n += self._retire_oldest()
        self._skip_holes()
        self._sweep()
        return n

    def __repr__(self):
        return f"<DedupTable entries={self.live} max_entries={self.max_entries}>"
