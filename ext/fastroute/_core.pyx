# cython: language_level=3, embedsignature=True
#
# Compiled twins of fastroute/_model.py (the specification):
#   Router = Router
"""The compiled routing engine of fastroute.

:class:`Router` keeps the address table, one bounded mailbox per device,
groups, and the pending-ack bookkeeping of each device.  It knows nothing of
sockets or crypto.  Its semantics are exactly those of the pure-Python model
``fastroute._model.Router`` (the property tests drive both and compare).
The data layout and its invariants are described in ``_core.pxd``.
"""

cimport cython
from cpython.bool cimport PyBool_Check
from cpython.dict cimport PyDict_GetItemWithError
from cpython.list cimport PyList_GET_SIZE, PyList_New
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow,
    PyLong_Check,
    PyLong_CheckExact,
    PyLong_FromLongLong,
    PyLong_FromUnsignedLongLong,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport (
    PyTuple_Check,
    PyTuple_CheckExact,
    PyTuple_GET_ITEM,
    PyTuple_GET_SIZE,
    PyTuple_New,
    PyTuple_SET_ITEM,
)
from cpython.unicode cimport PyUnicode_Check, PyUnicode_CheckExact
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memmove

from fastroute.errors import (
    InvalidArgument,
    MailboxFull,
    UnknownAddress,
    UnknownDevice,
    UnknownGroup,
    WrongType,
)

# The engine's own parts first, then the stage parts in data-path order;
# each part's header names the Python module that is its specification.
include "_args.pxi"
include "_ring.pxi"
include "_dedup.pxi"
include "_wire.pxi"
include "_noise.pxi"
include "_gate.pxi"
include "_store.pxi"
include "_sqlfast.pxi"
include "_walvfs.pxi"
include "_histogram.pxi"
include "_delivery.pxi"
include "_keys.pxi"
include "_groups.pxi"
include "_batch.pxi"
include "_client.pxi"

__all__ = ["Router", "MAX_MAILBOX_CAPACITY"]

#: Largest accepted ``mailbox_capacity`` (positions are 64-bit integers).
MAX_MAILBOX_CAPACITY = 1 << 40


@cython.auto_pickle(False)
cdef class _Device:
    """One registered device and its mailbox (internal)."""

    def __dealloc__(self):
        # A Router dropped with messages still queued releases them here.
        cdef Mailbox* m = &self.mb
        cdef PyObject* p
        while m.acked < m.tail:
            p = m.buf[m.acked & (m.size - 1)]
            m.acked += 1
            Py_DECREF_p(p)
        PyMem_Free(m.buf)
        m.buf = NULL
        m.size = 0


cdef inline Mailbox* mbox(PyObject* dev) noexcept:
    """The mailbox of a borrowed _Device pointer."""
    return &(<_Device>dev).mb


@cython.auto_pickle(False)
cdef class _Address:
    """An interned address: its devices, and the groups naming it (internal)."""

    def __cinit__(self, str address):
        self.address = address

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self.ndevs):
            Py_DECREF_p(self.devs[i])
        PyMem_Free(self.devs)

    cdef int append(self, _Device dev) except -1:
        """Add a device at the end (ids grow, so the array stays in id order)."""
        cdef Py_ssize_t size
        cdef PyObject** devs
        if self.ndevs == self.size_devs:
            size = self.size_devs * 2 if self.size_devs else 1
            devs = <PyObject**>PyMem_Realloc(self.devs, size * sizeof(PyObject*))
            if devs is NULL:
                raise MemoryError()
            self.devs = devs
            self.size_devs = size
        Py_INCREF(dev)
        self.devs[self.ndevs] = <PyObject*>dev
        self.ndevs += 1
        return 0

    cdef void discard(self, _Device dev) noexcept:
        """Remove a device, keeping the others in order."""
        cdef Py_ssize_t i
        for i in range(self.ndevs):
            if self.devs[i] == <PyObject*>dev:
                memmove(&self.devs[i], &self.devs[i + 1],
                        (self.ndevs - i - 1) * sizeof(PyObject*))
                self.ndevs -= 1
                Py_DECREF_p(<PyObject*>dev)    # the caller still holds one
                return

    cdef PyObject* find(self, str name) except? NULL:
        cdef Py_ssize_t i
        for i in range(self.ndevs):
            if (<_Device>self.devs[i]).name == name:
                return self.devs[i]
        return NULL


@cython.auto_pickle(False)
cdef class _Group:
    """A group's members and its flattened fan-out cache (internal)."""

    def __cinit__(self, object gid, dict members):
        self.gid = gid
        self.members = members

    def __dealloc__(self):
        PyMem_Free(self.cache)


cdef int _forget_group(_Address a, object gid) except -1:
    """Drop a group id from an address (the set goes when it empties)."""
    a.groups.discard(gid)
    if not a.groups:
        a.groups = None
    return 0


cdef inline object _plain_address(object address):
    """A str-subclass address as a plain str; anything else as it is."""
    if PyUnicode_Check(address) and not PyUnicode_CheckExact(address):
        return str.__str__(address)
    return address


cdef object _plain_item(object item):
    """route_many item with a str-subclass address -> the same with a plain str."""
    cdef object address, plain
    if PyTuple_Check(item) and PyTuple_GET_SIZE(item) == 2:
        address = <object>PyTuple_GET_ITEM(item, 0)
        plain = _plain_address(address)
        if plain is not address:
            return (plain, <object>PyTuple_GET_ITEM(item, 1))
    return item


cdef inline list _as_list(object items, str what):
    """``items`` as a list: the list itself, else a copy (WrongType unless iterable)."""
    if type(items) is list:
        return <list>items
    if not isinstance(items, (list, tuple)):
        check_iterable(items, what)
    return list(items)


@cython.auto_pickle(False)
cdef class Router:
    """Address table, per-device bounded mailboxes, groups and fan-out.

    ``Router(mailbox_capacity=1024)``: each device holds at most
    ``mailbox_capacity`` messages, counting queued and popped-but-unacked
    ones.  Device and group ids are ints from 1, never reused.  Payloads are
    arbitrary objects, stored by reference (fan-out shares one object).
    Errors are the classes of :mod:`fastroute.errors`.
    """

    def __cinit__(self, mailbox_capacity=1024):
        check_int(mailbox_capacity, "mailbox_capacity")
        if not 1 <= mailbox_capacity <= MAX_MAILBOX_CAPACITY:
            raise InvalidArgument(
                f"mailbox_capacity must be in 1..{MAX_MAILBOX_CAPACITY}")
        self.cap = mailbox_capacity
        self._devices = {}
        self._addrs = {}
        self._groups = {}
        self.next_dev = 1
        self.next_group = 1

    def __dealloc__(self):
        PyMem_Free(self.ready.ids)

    # ------------------------------------------------------------ lookups

    cdef _Device _device(self, object device_id):
        cdef PyObject* found
        check_int(device_id, "device_id")
        found = PyDict_GetItemWithError(self._devices, device_id)
        if found is NULL:
            raise UnknownDevice(f"no device {device_id}")
        return <_Device>found

    cdef _Group _group(self, object group_id):
        cdef PyObject* found
        check_int(group_id, "group_id")
        found = PyDict_GetItemWithError(self._groups, group_id)
        if found is NULL:
            raise UnknownGroup(f"no group {group_id}")
        return <_Group>found

    cdef _Address _route_target(self, object address):
        cdef PyObject* found
        if not PyUnicode_CheckExact(address):
            address = as_str(address, "address")
        found = PyDict_GetItemWithError(self._addrs, address)
        if found is NULL or (<_Address>found).ndevs == 0:
            # only well-formed addresses are ever interned, so the format
            # check is needed on the miss path alone
            check_address_format(address)
            raise UnknownAddress("address has no devices")
        return <_Address>found

    cdef _Address _intern(self, str address):
        cdef PyObject* found = PyDict_GetItemWithError(self._addrs, address)
        cdef _Address a
        if found is not NULL:
            return <_Address>found
        a = _Address(address)
        self._addrs[address] = a
        return a

    cdef int _release(self, _Address a) except -1:
        if a.ndevs == 0 and a.groups is None:
            del self._addrs[a.address]
        return 0

    cdef int _invalidate(self, _Address a) except -1:
        cdef object gid
        if a.groups is not None:
            for gid in a.groups:
                (<_Group>self._groups[gid]).valid = False
        return 0

    cdef int _rebuild(self, _Group g) except -1:
        cdef Py_ssize_t total = 0, k = 0, i
        cdef _Address a
        cdef Mailbox** cache
        for a in g.members.values():
            total += a.ndevs
        cache = <Mailbox**>PyMem_Realloc(g.cache, (total or 1) * sizeof(Mailbox*))
        if cache is NULL:
            raise MemoryError()
        g.cache = cache
        for a in g.members.values():
            for i in range(a.ndevs):
                if k < total:
                    cache[k] = mbox(a.devs[i])
                    k += 1
        g.ncache = k
        g.valid = True
        return 0

    # ------------------------------------------------------------ devices

    @property
    def mailbox_capacity(self):
        """Per-device limit on queued + popped-unacked messages."""
        return self.cap

    def add_device(self, address, device_name):
        """Register a device of ``address``; return its id.

        Idempotent: the same (address, device_name) gives the same id while
        the device is registered.  WrongType for non-str arguments,
        InvalidArgument for an address not shaped user@provider or an empty
        name.
        """
        cdef str addr = check_address(address)
        cdef str name = check_name(device_name)
        cdef _Address a = self._intern(addr)
        cdef PyObject* found = a.find(name)
        cdef _Device dev
        if found is not NULL:
            return (<_Device>found).mb.dev_id
        dev = _Device.__new__(_Device)
        dev.address = addr
        dev.name = name
        dev.mb.dev_id = self.next_dev
        try:
            a.append(dev)
        except MemoryError:
            self._release(a)
            raise
        self.next_dev += 1
        key = PyLong_FromLongLong(dev.mb.dev_id)
        self._devices[key] = dev
        if a.ndevs == 1:
            self.live_addrs += 1
        self._invalidate(a)
        return key

    def remove_device(self, device_id):
        """Unregister a device and return the messages it held.

        The list is ``[(seq, payload)]``, popped-unacked first then queued,
        in FIFO order, so that the caller can store or reroute them: nothing
        is dropped silently.  Groups forget the device; its id is never
        reused.  UnknownDevice if it is not registered.
        """
        cdef _Device dev = self._device(device_id)
        cdef _Address a = <_Address>self._addrs[dev.address]
        cdef Mailbox* m = &dev.mb
        cdef list out = []
        cdef uint64_t pos
        cdef object obj
        # Detach first: once nothing in the Router can reach the device, the
        # allocations below (and any code they run) cannot disturb its ring.
        del self._devices[device_id]
        a.discard(dev)
        if a.ndevs == 0:
            self.live_addrs -= 1
        self._invalidate(a)
        self._release(a)
        if m.overflowed:
            self.c.overflowed -= 1
        if m.in_ready:
            self.ready.dead += 1
            if self.ready.dead > READY_MIN and self.ready.dead * 2 > self.ready.n:
                self._compact_ready()
        self.c.queued -= <int64_t>(m.tail - m.popped)
        self.c.unacked -= <int64_t>(m.popped - m.acked)
        self.c.returned += <int64_t>(m.tail - m.acked)
        m.popped = m.tail
        while m.acked < m.tail:
            pos = m.acked
            obj = <object>m.buf[pos & (m.size - 1)]
            m.buf[pos & (m.size - 1)] = NULL
            m.acked = pos + 1
            Py_DECREF_p(<PyObject*>obj)   # the ring's reference; obj keeps one
            out.append((pos + 1, obj))
        PyMem_Free(m.buf)
        m.buf = NULL
        m.size = 0
        return out

    cdef int _compact_ready(self) except -1:
        cdef Py_ssize_t i, k = 0
        for i in range(self.ready.n):
            key = PyLong_FromLongLong(self.ready.ids[i])
            if PyDict_GetItemWithError(self._devices, key) is not NULL:
                self.ready.ids[k] = self.ready.ids[i]
                k += 1
        self.ready.n = k
        self.ready.dead = 0
        return 0

    def device_id(self, address, device_name):
        """Id of the device (address, device_name); UnknownDevice if absent."""
        cdef str addr = check_address(address)
        cdef str name = check_name(device_name)
        cdef PyObject* a = PyDict_GetItemWithError(self._addrs, addr)
        cdef PyObject* dev
        if a is not NULL:
            dev = (<_Address>a).find(name)
            if dev is not NULL:
                return (<_Device>dev).mb.dev_id
        raise UnknownDevice("no such device")

    def devices(self, address):
        """Ids of the devices of ``address``, ascending; UnknownAddress if none."""
        cdef str addr = check_address(address)
        cdef PyObject* found = PyDict_GetItemWithError(self._addrs, addr)
        cdef _Address a
        if found is NULL or (<_Address>found).ndevs == 0:
            raise UnknownAddress("address has no devices")
        a = <_Address>found
        return [mbox(a.devs[i]).dev_id for i in range(a.ndevs)]

    def device_info(self, device_id):
        """(address, device_name) of a registered device."""
        cdef _Device dev = self._device(device_id)
        return dev.address, dev.name

    def has_address(self, address):
        """True if ``address`` has at least one registered device."""
        cdef PyObject* found = PyDict_GetItemWithError(self._addrs, check_address(address))
        return found is not NULL and (<_Address>found).ndevs > 0

    # ------------------------------------------------------------ routing

    cdef int _finish(self, FullList* full, bint nomem, int64_t entered) except -1:
        cdef Py_ssize_t i
        cdef list refused
        try:
            if nomem:
                raise MemoryError()
            refused = [(full.pairs[2 * i], full.pairs[2 * i + 1])
                       for i in range(full.n)]
        finally:
            PyMem_Free(full.pairs)
            full.pairs = NULL
        raise MailboxFull("mailbox full", entered, refused)

    def route(self, address, payload):
        """Put ``payload`` in the mailbox of every device of ``address``.

        Returns how many mailboxes took it.  A device that is full (or still
        flagged overflowed, see :meth:`overflowed`) is skipped and flagged;
        after every other device was served, MailboxFull is raised with
        ``entered`` and ``full=[(0, device_id), ...]``.  UnknownAddress if the
        address has no devices.
        """
        cdef _Address a = self._route_target(address)
        cdef FullList full
        cdef int64_t entered = 0
        cdef bint nomem = False
        cdef Py_ssize_t i
        cdef int r
        cdef Mailbox* m
        full.pairs = NULL
        full.n = full.size = 0
        for i in range(a.ndevs):
            m = mbox(a.devs[i])
            r = mb_offer(m, <PyObject*>payload, self.cap, &self.ready, &self.c)
            if r == OFFER_PLACED:
                entered += 1
            elif r == OFFER_FULL:
                if full_add(&full, 0, m.dev_id) < 0:
                    nomem = True
            else:
                nomem = True
        placed(&self.c, <PyObject*>payload, entered)
        if full.n or nomem:
            self._finish(&full, nomem, entered)
        return entered

    cdef int _plan(self, list items, PyObject** plan, bint flat=False) except -1:
        # flat: ``items`` is ``address, payload, address, payload, ...``
        cdef Py_ssize_t i, n = PyList_GET_SIZE(items)
        cdef PyObject* item
        cdef PyObject* address
        cdef PyObject* found = NULL
        cdef PyObject* last = NULL
        cdef PyObject* addrs = <PyObject*>self._addrs
        if flat:
            n //= 2
        # Borrowed pointers throughout: nothing here can run Python code
        # until an error is raised (exact str keys hash and compare in C).
        for i in range(n):
            if flat:
                address = PyList_GET_ITEM_p(<PyObject*>items, 2 * i)
            else:
                item = PyList_GET_ITEM_p(<PyObject*>items, i)
                if not PyTuple_Check_p(item):
                    raise WrongType("each item must be a tuple (address, payload)")
                if PyTuple_GET_SIZE_p(item) != 2:
                    raise InvalidArgument("each item must be (address, payload)")
                address = PyTuple_GET_ITEM_p(item, 0)
            if address == last:
                # bursts to one address skip the lookup
                plan[i] = found
                continue
            if not PyUnicode_CheckExact_p(address):
                if PyUnicode_Check(<object>address):
                    return 1
                raise WrongType(
                    f"address must be str, not {type(<object>address).__name__}")
            found = PyDict_GetItemWithError_p(addrs, address)
            if found is NULL or (<_Address>found).ndevs == 0:
                check_address_format(<str>address)
                raise UnknownAddress("address has no devices")
            plan[i] = found
            last = address
        return 0

    def route_many(self, items):
        """Route a batch of ``(address, payload)`` items, in order.

        Every item is checked first: a wrong item or an UnknownAddress
        raises before anything is placed.  Returns the number of mailboxes
        entered; refusals are collected over the whole batch and raised at
        the end as MailboxFull with ``full=[(item_index, device_id), ...]``.
        A device refused once stays refused for the rest of the batch
        (sticky overflow), so per-device FIFO order holds.
        """
        cdef list lst = _as_list(items, "items")
        cdef int64_t entered = self._route(lst, False)
        if entered == ROUTE_RETRY:
            entered = self._route([_plain_item(item) for item in lst], False)
        return entered

    def route_flat(self, items):
        """:meth:`route_many` of a flat ``address, payload, address,
        payload, ...`` list: the same checks, placement and MailboxFull
        (its indices count pairs), without a tuple a pair.  An odd length
        is an InvalidArgument, raised before anything is placed."""
        cdef list lst = _as_list(items, "items")
        cdef Py_ssize_t i
        cdef int64_t entered
        if PyList_GET_SIZE(lst) % 2:
            raise InvalidArgument("items must be address, payload pairs")
        entered = self._route(lst, True)
        if entered == ROUTE_RETRY:
            lst = list(lst)
            for i in range(0, PyList_GET_SIZE(lst), 2):
                lst[i] = _plain_address(lst[i])
            entered = self._route(lst, True)
        return entered

    cdef int64_t _route(self, list lst, bint flat) except -1:
        """route_many's work (``flat``: route_flat's): the mailboxes entered,
        or ROUTE_RETRY when an address is a str subclass (nothing placed:
        the caller makes it a str and calls again)."""
        cdef PyObject* stack_plan[PLAN_STACK]
        cdef PyObject** plan = stack_plan
        cdef Py_ssize_t n, i, j
        cdef FullList full
        cdef int64_t entered = 0, k
        cdef bint nomem = False
        cdef int r
        cdef PyObject** devs
        cdef Mailbox* m
        cdef PyObject* payload
        n = PyList_GET_SIZE(lst) // 2 if flat else PyList_GET_SIZE(lst)
        full.pairs = NULL
        full.n = full.size = 0
        if n > PLAN_STACK:
            plan = <PyObject**>PyMem_Malloc(n * sizeof(PyObject*))
            if plan is NULL:
                raise MemoryError()
        try:
            if self._plan(lst, plan, flat):
                return ROUTE_RETRY
            # From here to the end of the loop no Python code can run (see
            # _core.pxd), so the borrowed plan and items stay valid.
            for i in range(n):
                if flat:
                    payload = PyList_GET_ITEM_p(<PyObject*>lst, 2 * i + 1)
                else:
                    payload = PyTuple_GET_ITEM_p(PyList_GET_ITEM_p(<PyObject*>lst, i), 1)
                devs = (<_Address>plan[i]).devs
                k = 0
                for j in range((<_Address>plan[i]).ndevs):
                    m = mbox(devs[j])
                    r = mb_offer(m, payload, self.cap, &self.ready, &self.c)
                    if r == OFFER_PLACED:
                        k += 1
                    elif r == OFFER_FULL:
                        if full_add(&full, i, m.dev_id) < 0:
                            nomem = True
                    else:
                        nomem = True
                placed(&self.c, payload, k)
                entered += k
        finally:
            if plan is not stack_plan:
                PyMem_Free(plan)
        if full.n or nomem:
            self._finish(&full, nomem, entered)
        return entered

    def offer_many(self, items):
        """Route a batch of ``(device_id, payload)`` items, each to one device, in order.

        The per-device twin of :meth:`route_many`: every item is checked first
        (a wrong item or an UnknownDevice raises before anything is placed);
        a device that is full or flagged overflowed (:meth:`suspend`) is
        skipped and flagged, and the refusals are raised at the end as
        MailboxFull with ``full=[(item_index, device_id), ...]``.  Unlike
        :meth:`push` it honours the sticky overflow flag, so per-device FIFO
        order holds while the caller feeds a device from its store.
        """
        return self._offer(_as_list(items, "items"), False)

    def offer_flat(self, items):
        """:meth:`offer_many` of a flat ``device_id, payload, device_id,
        payload, ...`` list: the same checks, placement and MailboxFull (its
        indices count pairs), without a tuple a pair.  An odd length is an
        InvalidArgument, raised before anything is placed."""
        cdef list lst = _as_list(items, "items")
        if PyList_GET_SIZE(lst) % 2:
            raise InvalidArgument("items must be device_id, payload pairs")
        return self._offer(lst, True)

    cdef int64_t _offer(self, list lst, bint flat) except -1:
        """offer_many's work (``flat``: offer_flat's): the mailboxes entered."""
        cdef list devs
        cdef Py_ssize_t n, i
        cdef FullList full
        cdef int64_t entered = 0
        cdef bint nomem = False
        cdef int r, j
        cdef Mailbox* m
        cdef object item, key, payload
        cdef _Device dev
        cdef IdCache seen  # device id -> _Device; borrowed: items holds the id, devs the device
        seen.n = 0
        n = PyList_GET_SIZE(lst) // 2 if flat else PyList_GET_SIZE(lst)
        devs = [None] * n
        for i in range(n):
            if flat:
                key = <object>PyList_GET_ITEM_p(<PyObject*>lst, 2 * i)
            else:
                item = lst[i]
                if not PyTuple_Check(item):
                    raise WrongType("each item must be a tuple (device_id, payload)")
                if PyTuple_GET_SIZE(item) != 2:
                    raise InvalidArgument("each item must be (device_id, payload)")
                key = <object>PyTuple_GET_ITEM_p(<PyObject*>item, 0)
            # a batch's copies go to a few devices, in runs or in turns, each
            # under its one id object: found by identity before the dict
            j = idc_find(&seen, <PyObject*>key)
            if j >= 0:
                devs[i] = <object>seen.vals[j]
            else:
                dev = self._device(key)
                devs[i] = dev
                if PyLong_CheckExact(key):
                    idc_add(&seen, <PyObject*>key, <PyObject*>dev, 0)
        full.pairs = NULL
        full.n = full.size = 0
        # devs holds a reference to every device and lst to every payload, so
        # nothing placed below can go away while the loop runs
        for i in range(n):
            if flat:
                payload = <object>PyList_GET_ITEM_p(<PyObject*>lst, 2 * i + 1)
            else:
                payload = (<tuple>lst[i])[1]
            m = &(<_Device>devs[i]).mb
            r = mb_offer(m, <PyObject*>payload, self.cap, &self.ready, &self.c)
            if r == OFFER_PLACED:
                entered += 1
                placed(&self.c, <PyObject*>payload, 1)
            elif r == OFFER_FULL:
                if full_add(&full, i, m.dev_id) < 0:
                    nomem = True
            else:
                nomem = True
        if full.n or nomem:
            self._finish(&full, nomem, entered)
        return entered

    def offer_shared(self, rows):
        """Route a batch of ``(payload, [device_id, ...])`` rows: each payload to
        each of its devices, in order.

        Exactly :meth:`offer_many` of the ``(device_id, payload)`` items the
        rows list, in order (MailboxFull's item indices count those items),
        without the items: a group message is one row however many devices
        get it, and a row whose device list is the row before's (a group's
        messages in a batch) reuses its lookups.
        """
        cdef list lst
        cdef list devs = []     # a _Device per item: every device stays alive
        cdef list pays          # a payload per row: every payload stays alive
        cdef Py_ssize_t nrows, i, j, k, n, at, prev_at = 0, prev_n = -1
        cdef Py_ssize_t* counts
        cdef FullList full
        cdef int64_t entered = 0
        cdef bint nomem = False, plain = False
        cdef int r
        cdef Mailbox* m
        cdef object row, ids, last_ids = None, d
        cdef PyObject* payload
        lst = _as_list(rows, "rows")
        nrows = PyList_GET_SIZE(lst)
        pays = [None] * nrows
        counts = <Py_ssize_t*>PyMem_Malloc((nrows + 1) * sizeof(Py_ssize_t))
        if counts == NULL:
            raise MemoryError()
        full.pairs = NULL
        full.n = full.size = 0
        try:
            for i in range(nrows):
                row = lst[i]
                if not PyTuple_Check(row):
                    raise WrongType("each row must be a tuple (payload, device_ids)")
                if PyTuple_GET_SIZE(row) != 2:
                    raise InvalidArgument("each row must be (payload, device_ids)")
                pays[i] = (<tuple>row)[0]
                ids = (<tuple>row)[1]
                if not isinstance(ids, (list, tuple)):
                    raise WrongType("device_ids must be a list or tuple")
                n = len(ids)
                at = PyList_GET_SIZE(devs)
                if ids is last_ids and plain and n == prev_n:
                    # the row before's list, of exact ints (whose lookups ran
                    # no Python code that could have changed it): its devices
                    for j in range(n):
                        devs.append(<object>PyList_GET_ITEM_p(<PyObject*>devs, prev_at + j))
                else:
                    plain = True
                    for d in ids:
                        plain = plain and PyLong_CheckExact(d)
                        devs.append(self._device(d))
                    n = PyList_GET_SIZE(devs) - at
                    last_ids = ids
                    prev_at = at
                    prev_n = n
                counts[i] = n
            # devs and pays hold a reference to every device and payload, so
            # nothing placed below can go away while the loop runs
            k = 0
            for i in range(nrows):
                payload = PyList_GET_ITEM_p(<PyObject*>pays, i)
                for j in range(k, k + counts[i]):
                    m = &(<_Device>PyList_GET_ITEM_p(<PyObject*>devs, j)).mb
                    r = mb_offer(m, payload, self.cap, &self.ready, &self.c)
                    if r == OFFER_PLACED:
                        entered += 1
                        placed(&self.c, payload, 1)
                    elif r == OFFER_FULL:
                        if full_add(&full, j, m.dev_id) < 0:
                            nomem = True
                    else:
                        nomem = True
                k += counts[i]
        finally:
            PyMem_Free(counts)
        if full.n or nomem:
            self._finish(&full, nomem, entered)
        return entered

    def push(self, device_id, payload):
        """Put ``payload`` in one device's mailbox; return its sequence number.

        For the caller's own re-injection (e.g. spilled messages read back
        from the store): it ignores the sticky overflow flag and does not
        set it.  MailboxFull(entered=0, full=[(0, device_id)]) when the
        device is at capacity.
        """
        cdef _Device dev = self._device(device_id)
        if self._push(dev, payload):
            raise MailboxFull("mailbox full", 0, [(0, dev.mb.dev_id)])
        return PyLong_FromUnsignedLongLong(dev.mb.tail)

    cdef int _push(self, _Device dev, object payload) except -1:
        cdef Mailbox* m = &dev.mb
        if m.tail - m.acked >= self.cap:
            return 1
        if mb_put(m, <PyObject*>payload, &self.ready) == OFFER_NOMEM:
            raise MemoryError()
        placed(&self.c, <PyObject*>payload, 1)
        return 0

    # ------------------------------------------------------------ groups

    def create_group(self, addresses=()):
        """Create a group whose members are ``addresses``; return its id.

        Members are addresses, not devices: a fan-out reaches the devices
        the members have at that moment.  Members need not have devices yet.
        Duplicates are kept once, first occurrence first.
        """
        cdef list checked
        cdef dict members = {}
        cdef str s
        cdef _Address a
        cdef _Group g
        check_iterable(addresses, "addresses")
        checked = [check_address(x) for x in list(addresses)]
        gid = PyLong_FromLongLong(self.next_group)
        self.next_group += 1
        for s in checked:
            if s not in members:
                a = self._intern(s)
                members[s] = a
                if a.groups is None:
                    a.groups = set()
                a.groups.add(gid)
        g = _Group(gid, members)
        self._groups[gid] = g
        return gid

    def add_member(self, group_id, address):
        """Add ``address`` to a group; False if it already was a member."""
        cdef _Group g = self._group(group_id)
        cdef str s = check_address(address)
        cdef _Address a
        if s in g.members:
            return False
        a = self._intern(s)
        g.members[s] = a
        if a.groups is None:
            a.groups = set()
        a.groups.add(g.gid)
        g.valid = False
        return True

    def remove_member(self, group_id, address):
        """Remove ``address`` from a group; UnknownAddress if not a member."""
        cdef _Group g = self._group(group_id)
        cdef str s = check_address(address)
        cdef object found = g.members.pop(s, None)
        if found is None:
            raise UnknownAddress("address is not a member of the group")
        _forget_group(<_Address>found, g.gid)
        g.valid = False
        self._release(<_Address>found)

    def delete_group(self, group_id):
        """Forget a group; its id is never reused."""
        cdef _Group g = self._group(group_id)
        cdef _Address a
        del self._groups[g.gid]
        for a in g.members.values():
            _forget_group(a, g.gid)
            self._release(a)

    def group_members(self, group_id):
        """Member addresses of a group, in the order they were added."""
        return list(self._group(group_id).members)

    def fanout(self, group_id, payload, exclude_device=None):
        """Put the same ``payload`` object in every device of every member.

        ``exclude_device`` (typically the sender's device) is skipped; an id
        that is not registered excludes nothing.  Returns the number of
        mailboxes entered; full devices as in :meth:`route`.
        """
        cdef _Group g = self._group(group_id)
        cdef int64_t exclude = 0        # ids start at 1: 0 excludes nothing
        cdef int overflow = 0
        cdef FullList full
        cdef int64_t entered = 0
        cdef bint nomem = False
        cdef Py_ssize_t i
        cdef int r
        cdef Mailbox* m
        cdef Mailbox** cache
        if exclude_device is not None:
            check_int(exclude_device, "exclude_device")
            exclude = PyLong_AsLongLongAndOverflow(exclude_device, &overflow)
            if overflow:
                exclude = 0
        if not g.valid:
            self._rebuild(g)
        full.pairs = NULL
        full.n = full.size = 0
        cache = g.cache
        for i in range(g.ncache):
            m = cache[i]
            if m.dev_id == exclude:
                continue
            r = mb_offer(m, <PyObject*>payload, self.cap, &self.ready, &self.c)
            if r == OFFER_PLACED:
                entered += 1
            elif r == OFFER_FULL:
                if full_add(&full, 0, m.dev_id) < 0:
                    nomem = True
            else:
                nomem = True
        placed(&self.c, <PyObject*>payload, entered)
        if full.n or nomem:
            self._finish(&full, nomem, entered)
        return entered

    # ------------------------------------------------------------ draining

    cdef list _pop(self, _Device dev, Py_ssize_t max_n):
        cdef Mailbox* m = &dev.mb
        cdef Py_ssize_t n, i = 0
        cdef uint64_t pos
        cdef PyObject* p
        cdef PyObject* seq
        cdef PyObject* item
        cdef list out
        if <uint64_t>max_n < m.tail - m.popped:
            n = max_n
        else:
            n = <Py_ssize_t>(m.tail - m.popped)
        if n == 0:
            return []
        # Allocations below may run the GC and, through __del__, this very
        # Router: take a reference and commit the position before each one,
        # and re-read the ring every time.
        out = PyList_New(n)
        while i < n and m.popped < m.tail:
            pos = m.popped
            p = m.buf[pos & (m.size - 1)]
            Py_INCREF_p(p)
            m.popped = pos + 1
            self.c.queued -= 1
            self.c.unacked += 1
            self.c.popped += 1
            seq = PyLong_FromUnsignedLongLong_new(pos + 1)
            item = PyTuple_New_new(2) if seq is not NULL else NULL
            if item is NULL:
                # out of memory: the message stays popped-unacked, so a
                # requeue() redelivers it
                Py_DECREF_p(p)
                if seq is not NULL:
                    Py_DECREF_p(seq)
                del out[i:]
                raise MemoryError()
            PyTuple_SET_ITEM_steal(item, 0, seq)
            PyTuple_SET_ITEM_steal(item, 1, p)
            if not PyObject_GC_IsTracked_p(p):
                # (int, untracked payload) can never be part of a cycle: do
                # now what the collector would do on its first pass over the
                # tuple, so that big pops do not make it walk them all
                PyObject_GC_UnTrack_p(item)
            PyList_SET_ITEM_steal(<PyObject*>out, i, item)
            i += 1
        if i < n:
            del out[i:]
        return out

    def pop(self, device_id, max_n):
        """Take up to ``max_n`` queued messages, FIFO, as ``[(seq, payload)]``.

        They stay held (and count against capacity) until acked.  Sequence
        numbers are per device, from 1, strictly increasing, never reused; a
        requeued message keeps its number.
        """
        cdef _Device dev = self._device(device_id)
        return self._pop(dev, as_count(max_n, "max_n"))

    def pop_batch(self, device_id, max_n):
        """Like :meth:`pop`, as ``(first_seq, [payload, ...])``.

        One mailbox's sequence numbers are consecutive, so ``payloads[i]``
        has seq ``first_seq + i``; this spares the (seq, payload) tuple and
        the int that pop() builds per message.  With nothing queued it
        returns ``(seq the next popped message will have, [])``.
        """
        cdef _Device dev = self._device(device_id)
        cdef uint64_t first
        cdef list out = self._pop_list(dev, as_count(max_n, "max_n"), &first)
        return PyLong_FromUnsignedLongLong(first + 1), out

    cdef list _pop_list(self, _Device dev, Py_ssize_t max_count, uint64_t* first_out):
        """:meth:`pop_batch`'s work: the payloads popped, and in
        ``first_out`` the ring position of the first (its seq less one)."""
        cdef Mailbox* m = &dev.mb
        cdef Py_ssize_t n, k, i = 0
        cdef uint64_t pos, first
        cdef PyObject* p
        cdef list out
        if <uint64_t>max_count < m.tail - m.popped:
            n = max_count
        else:
            n = <Py_ssize_t>(m.tail - m.popped)
        # The one allocation may run the GC (and through it this Router):
        # read the ring only after it; nothing below can run Python code.
        out = PyList_New(n)
        first = m.popped
        if m.tail - first < <uint64_t>n:
            k = <Py_ssize_t>(m.tail - first)
            del out[k:]
            n = k
        while i < n:
            pos = first + <uint64_t>i
            p = m.buf[pos & (m.size - 1)]
            Py_INCREF_p(p)
            PyList_SET_ITEM_steal(<PyObject*>out, i, p)
            i += 1
        m.popped = first + <uint64_t>n
        self.c.queued -= n
        self.c.unacked += n
        self.c.popped += n
        first_out[0] = first
        return out

    def pop_many(self, device_ids, max_n):
        """:meth:`pop` over several devices.

        Returns ``[(device_id, [(seq, payload), ...])]`` for the devices that
        had messages, in the order given.  Every id is checked before
        anything is popped.
        """
        cdef list devs
        cdef list out = []
        cdef list got
        cdef Py_ssize_t n
        cdef _Device dev
        if not isinstance(device_ids, (list, tuple)):
            check_iterable(device_ids, "device_ids")
        devs = [self._device(d) for d in list(device_ids)]
        n = as_count(max_n, "max_n")
        for dev in devs:
            got = self._pop(dev, n)
            if got:
                out.append((dev.mb.dev_id, got))
        return out

    def ack(self, device_id, upto_seq):
        """Release popped messages with seq <= ``upto_seq``; return how many.

        Queued (not yet popped) messages are never released by an ack.
        """
        cdef _Device dev = self._device(device_id)
        cdef uint64_t upto = <uint64_t>as_count(upto_seq, "upto_seq")
        cdef Mailbox* m = &dev.mb
        cdef Py_ssize_t n = 0
        cdef uint64_t pos
        cdef PyObject* p
        # position p holds seq p + 1: release positions < upto.  The DECREF
        # may run arbitrary code, so the state is committed before it and
        # re-read after it.
        while m.acked < upto and m.acked < m.popped:
            pos = m.acked
            p = m.buf[pos & (m.size - 1)]
            m.buf[pos & (m.size - 1)] = NULL
            m.acked = pos + 1
            self.c.unacked -= 1
            self.c.acked += 1
            n += 1
            Py_DECREF_p(p)
        ring_maybe_shrink(m)
        return n

    def requeue(self, device_id):
        """Make popped-unacked messages poppable again; return how many.

        They come back in their original order, with their original
        sequence numbers, before anything queued after them (a reconnecting
        device sees redelivery first).
        """
        cdef _Device dev = self._device(device_id)
        cdef Mailbox* m = &dev.mb
        cdef int64_t n = <int64_t>(m.popped - m.acked)
        if n:
            if not m.in_ready:
                if ready_push(&self.ready, m.dev_id) < 0:
                    raise MemoryError()
                m.in_ready = True
            m.popped = m.acked
            self.c.queued += n
            self.c.unacked -= n
            self.c.requeued += n
        return n

    def take_ready(self):
        """Device ids that got poppable messages since the last call.

        A device is listed (once, in the order it became ready) when its
        queue went from empty to non-empty or it had messages requeued.
        Removed devices are left out.  The front end uses this to wake the
        writers of those devices.
        """
        cdef ReadyList r = self.ready
        cdef list out = []
        cdef Py_ssize_t i = 0
        cdef PyObject* found
        self.ready.ids = NULL
        self.ready.n = self.ready.size = self.ready.dead = 0
        try:
            while i < r.n:
                key = PyLong_FromLongLong(r.ids[i])
                found = PyDict_GetItemWithError(self._devices, key)
                if found is not NULL:
                    out.append(key)
                    (<_Device>found).mb.in_ready = False
                i += 1
        finally:
            # on error, the ids not handed out yet stay listed
            while i < r.n:
                ready_push(&self.ready, r.ids[i])
                i += 1
            if self.ready.ids is NULL:
                # keep the buffer for the next round
                self.ready.ids = r.ids
                self.ready.size = r.size
            else:
                PyMem_Free(r.ids)
        return out

    def overflowed(self, device_id):
        """True while route/fan-out treat the device as full (sticky).

        Set when a route or fan-out finds the device at capacity; from then
        on every route/fan-out reports the device in MailboxFull.full, even
        once it has room, until :meth:`resume`.  This keeps FIFO order while
        the caller spills the device's traffic to its store and pushes it
        back.
        """
        return self._device(device_id).mb.overflowed

    def suspend(self, device_id):
        """Set the sticky overflow flag by hand; return whether it was clear.

        A caller that must first push a device's backlog from its store (a
        device coming online) suspends the live route to it meanwhile, then
        calls :meth:`resume`: route and fan-out report the device in
        ``MailboxFull.full`` in between, exactly as after a real overflow.
        """
        cdef _Device dev = self._device(device_id)
        if dev.mb.overflowed:
            return False
        dev.mb.overflowed = True
        self.c.overflowed += 1
        return True

    def resume(self, device_id):
        """Clear the sticky overflow flag; return whether it was set."""
        cdef _Device dev = self._device(device_id)
        if dev.mb.overflowed:
            dev.mb.overflowed = False
            self.c.overflowed -= 1
            return True
        return False

    def pending(self, device_id):
        """(queued-not-popped, popped-not-acked) counts of a device."""
        cdef _Device dev = self._device(device_id)
        return (PyLong_FromUnsignedLongLong(dev.mb.tail - dev.mb.popped),
                PyLong_FromUnsignedLongLong(dev.mb.popped - dev.mb.acked))

    def stats(self):
        """Counters of the engine: no addresses, no payloads."""
        return {
            "devices": len(self._devices),
            "addresses": self.live_addrs,
            "groups": len(self._groups),
            "overflowed": self.c.overflowed,
            "queued": self.c.queued,
            "unacked": self.c.unacked,
            "delivered": self.c.delivered,
            "popped": self.c.popped,
            "acked": self.c.acked,
            "requeued": self.c.requeued,
            "returned": self.c.returned,
            "mailbox_capacity": self.cap,
        }

    def __repr__(self):
        return (f"<fastroute._core.Router devices={len(self._devices)} "
                f"groups={len(self._groups)} queued={self.c.queued}>")
