# cython: language_level=3
#
# Interface of the compiled routing engine, fastroute._core.
#
# Read this file as the map of the engine; _core.pyx has the Python-visible
# methods, _ring.pxi the mailbox ring primitives, _args.pxi argument checks.
# The pure-Python model fastroute/_model.py is the specification both follow.
#
# The same extension module carries the compiled twins of the relay's and
# the client's per-message paths, one part per stage, each header naming
# its Python specification:
#   _dedup.pxi     DedupTable                       fastroute/dedup.py
#   _wire.pxi      frame packers and fast decoders  fastroute/wire.py
#   _gate.pxi      the SEND check                   fastroute/relay/gate.py
#   _store.pxi     MemoryStore's loops              fastroute/store.py
#   _delivery.pxi  DELIVER packing, backlog sync    fastroute/relay/delivery.py
#   _client.pxi    the client's send and dispatch   fastroute/client.py
#
# Ownership in one paragraph: the Router owns dicts of _Device, _Address and
# _Group objects; an _Address also owns its _Device objects.  A _Device
# embeds its Mailbox (a C struct); _Group.cache is a C array of Mailbox*
# *borrowed* from those _Device objects, valid only while the device is
# registered: adding or removing a device invalidates the cache of every
# group that names its address.  A queued payload is one strong reference in
# a ring slot.  No reference cycles: dropping a Router frees it at once.
# Ring slots are invisible to the cyclic GC, so a payload that refers back
# to its own Router would keep both alive: payloads should be plain data.
#
# Re-entrancy rule: a Py_DECREF of a payload, or any allocation of a Python
# object (which may run the cyclic GC and so arbitrary __del__ code), may
# call back into this Router.  Loops that can do either re-read the Mailbox
# fields on every iteration and commit their position before the call; loops
# over borrowed Mailbox* arrays (route, fan-out) allocate no Python object.

cimport cython
from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint64_t


cdef enum:
    # Smallest ring allocated; an idle device keeps this many slots (64 bytes)
    # so that a 1:1 push/pop/ack cycle never touches the allocator.
    RING_MIN = 8
    READY_MIN = 64
    # route_many plans this many items without a heap allocation
    PLAN_STACK = 32
    # _route's answer for a batch to plan again with plain str addresses
    ROUTE_RETRY = -2
    # objects an IdCache holds (a batch's few devices: at most 16 an address)
    ID_CACHE = 16


cdef enum Offer:
    # outcome of offering one payload to one mailbox (route/fan-out)
    OFFER_NOMEM = -1     # allocation failed; nothing changed
    OFFER_FULL = 0       # device full or sticky-overflowed; nothing placed
    OFFER_PLACED = 1


ctypedef struct Mailbox:
    # Ring of payload references.  Positions are absolute and per device:
    # the message at position p has sequence number p + 1 and lives in
    # buf[p & (size - 1)].  Because one mailbox's seqs are consecutive, no
    # seq is stored: 8 bytes per queued message.
    #     acked <= popped <= tail,  tail - acked <= size
    #     [acked, popped)  popped, waiting for ack
    #     [popped, tail)   queued, poppable
    PyObject** buf       # NULL until the first message; freed on removal
    uint64_t size        # 0 or a power of two >= RING_MIN
    uint64_t acked
    uint64_t popped
    uint64_t tail
    int64_t dev_id
    bint overflowed      # sticky: route/fan-out report it full until resume()
    bint in_ready        # listed in Router.ready since the last take_ready()


ctypedef struct ReadyList:
    # device ids that became poppable, in order, each once (Mailbox.in_ready);
    # ids of devices removed meanwhile are skipped by take_ready()
    int64_t* ids
    Py_ssize_t n
    Py_ssize_t size
    Py_ssize_t dead      # entries whose device was removed (compaction hint)


ctypedef struct IdCache:
    # a batch loop's lookups of the objects the relay hands again and again
    # (a device's id, name or tuple of keys), found by identity before a
    # dict hashes them: borrowed pointers, to objects the caller keeps alive
    # for the call; vals or nums, whichever the caller keeps
    PyObject* keys[ID_CACHE]
    PyObject* vals[ID_CACHE]
    Py_ssize_t nums[ID_CACHE]
    int n


ctypedef struct FullList:
    # (item index, device id) pairs of one call's MailboxFull; heap storage
    # is taken only when a mailbox is actually full
    int64_t* pairs
    Py_ssize_t n
    Py_ssize_t size


ctypedef struct Counters:
    int64_t overflowed   # devices currently flagged
    int64_t queued       # sum of tail - popped
    int64_t unacked      # sum of popped - acked
    int64_t delivered    # messages ever placed (route, fan-out, push)
    int64_t popped
    int64_t acked
    int64_t requeued
    int64_t returned     # handed back by remove_device()


cdef class _Device:
    # one registered device; dropped (and its ring freed) on remove_device
    cdef Mailbox mb
    cdef str address
    cdef str name


@cython.final  # its cdef methods called directly (see Router)
cdef class _Address:
    # An interned address: the record is the address's identity inside the
    # engine.  It exists while it has devices or a group names it.  Kept
    # small (an idle device costs a few hundred bytes in all): a user has
    # few devices, so a name lookup scans `devs` instead of a dict.
    cdef str address
    cdef PyObject** devs     # owned references to _Device, in id order
    cdef Py_ssize_t ndevs
    cdef Py_ssize_t size_devs
    cdef set groups          # ids of the groups naming it; None when none

    cdef int append(self, _Device dev) except -1
    # drop the array's reference to `dev`; the caller must hold its own
    cdef void discard(self, _Device dev) noexcept
    # borrowed _Device named `name`, or NULL
    cdef PyObject* find(self, str name) except? NULL


cdef class _Group:
    cdef object gid
    cdef dict members        # address -> _Address, insertion order
    # Flattened Mailbox* of every device of every member, built on the first
    # fan-out after a change so that fan-out is one tight C loop.
    cdef Mailbox** cache
    cdef Py_ssize_t ncache
    cdef bint valid


# final: the per-message paths call its cdef methods directly, not through
# the vtable, and the C compiler may inline them
@cython.final
cdef class Router:
    cdef uint64_t cap
    cdef dict _devices       # device id (int) -> _Device
    cdef dict _addrs         # address (str) -> _Address
    cdef dict _groups        # group id (int) -> _Group
    cdef int64_t next_dev    # ids start at 1 and are never reused
    cdef int64_t next_group
    cdef int64_t live_addrs  # addresses with at least one device
    cdef ReadyList ready
    cdef Counters c

    # lookups raising the contract's errors (object returns propagate them)
    cdef _Device _device(self, object device_id)
    cdef _Group _group(self, object group_id)
    cdef _Address _route_target(self, object address)
    cdef _Address _intern(self, str address)
    # drop an _Address with no devices and no groups
    cdef int _release(self, _Address a) except -1
    # drop ids of removed devices from the ready list (bounded memory for
    # embedders that never call take_ready)
    cdef int _compact_ready(self) except -1
    # mark the caches of the groups naming `a` stale
    cdef int _invalidate(self, _Address a) except -1
    cdef int _rebuild(self, _Group g) except -1
    # push(): 1 (nothing placed) when the device is at capacity, else 0;
    # the backlog sync calls it for every row, without a Python call
    cdef int _push(self, _Device dev, object payload) except -1
    # pop up to max_n queued messages of one device as [(seq, payload)]
    cdef list _pop(self, _Device dev, Py_ssize_t max_n)
    # pop_batch's work: [payload, ...], the first one's ring position (its
    # seq less one) in first; the delivery stage's pull_round calls it
    cdef list _pop_list(self, _Device dev, Py_ssize_t max_count, uint64_t* first)
    # raise MemoryError / MailboxFull for a finished placement loop
    cdef int _finish(self, FullList* full, bint nomem, int64_t entered) except -1
    # check every (address, payload) of a batch before anything is placed
    # (flat: items is address, payload, address, payload, ...); fills
    # plan[i] with the borrowed _Address of pair i.  Returns 1 (and fills
    # nothing usable) when an address is a str subclass: the caller
    # normalises the batch to plain str, allocating, then plans again.
    cdef int _plan(self, list items, PyObject** plan, bint flat=*) except -1
    # route_many / route_flat: plan, then place; ROUTE_RETRY for _plan's 1
    cdef int64_t _route(self, list lst, bint flat) except -1
    # offer_many / offer_flat: check every device, then place
    cdef int64_t _offer(self, list lst, bint flat) except -1


# -- relay hot-path packers (_wire.pxi, _gate.pxi) ---------------------------
# They work on exact bytes only and write with memcpy into a bytes object
# allocated at its final size.  An allocation may run the GC and so any
# code: loops over caller lists re-check their length and item types after
# each allocation instead of trusting what they saw before it.

# frame plaintext: msgpack array header + `count` ops of `ops` (exact bytes
# and OpRuns) from op fj of element fi to op tj of element ti, `size` bytes
cdef bytes join_frame(list ops, Py_ssize_t fi, Py_ssize_t fj, Py_ssize_t ti, Py_ssize_t tj,
                      Py_ssize_t count, Py_ssize_t size)
# an OpRun of `count` ops owning `ends` (PyMem_Malloc'd; freed on failure)
cdef object op_run(bytes data, Py_ssize_t* ends, Py_ssize_t count)
# packed DELIVER fields after seq; WrongType unless cid and body are bytes,
# InvalidArgument unless cls is 0 or 1
cdef bytes c_deliver_tail(bytes sender_packed, object cid, object body, bytes ts_packed,
                          int cls)
# packed [17, cid, 0]; InvalidArgument unless cid is 16 bytes
cdef bytes make_sack_ok(object cid)

# -- client hot paths (_client.pxi) -------------------------------------------
# rec_type(*items[:n]) for a tuple subclass (a NamedTuple), one allocation
cdef object new_record(type rec_type, Py_ssize_t n, PyObject** items)
