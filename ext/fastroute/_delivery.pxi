# The delivery stage's per-message loops, compiled.  Part of fastroute._core
# (included by _core.pyx after _wire.pxi, whose cdef helpers it calls).
#
# Compiled twins of fastroute/relay/delivery.py (the specification):
#   pack_delivers  = py_pack_delivers
#   pull_round     = py_pull_round
#   ack_feed       = py_ack_feed
#   sync_rows      = py_sync_rows
#   bytes_by_address = py_bytes_by_address
#   devices_of     = py_devices_of
#   shared_rows    = py_shared_rows
#   shared_items   = py_shared_items
#   held_offered   = py_held_offered
#   held_shared    = py_held_shared
#   copies_online  = py_copies_online
#
# tests/test_fastpath.py runs both on the same inputs and compares.


def pack_delivers(seq, list batch, list out):
    """Append one packed DELIVER op per ``(mid, tail)`` of ``batch`` to ``out``.

    ``tail`` is the packed fields after seq (:func:`deliver_tail`); a routed
    tail (:func:`fastroute.wire.routed_tail`) is ``(mid, tail)`` as one
    object; a bare tail (bytes) is a signal's, mid 0 (see
    ``py_pack_delivers``); the i-th
    op gets seq ``seq + i`` as a msgpack uint32.  Returns the list of mids,
    in order.  OverflowError if a seq does not fit 32 bits (nothing appended).
    Two ops or more go in as one :class:`OpRun` (one allocation, not one an
    op), one alone as bytes.
    """
    return c_pack_delivers(seq, batch, out)


cdef list c_pack_delivers(unsigned long long first, list batch, list out):
    # pack_delivers' work, called from C by pull_round without a Python call
    cdef Py_ssize_t n, i, k, h, skip, total = 0
    cdef list mids
    cdef tuple items
    cdef object item, tail, head
    cdef bytes data
    cdef unsigned char* p
    cdef Py_ssize_t* ends = NULL
    # the caller's list as it is now: the allocations below may run any code
    items = tuple(batch)
    n = PyTuple_GET_SIZE(items)
    if n and first + <unsigned long long>(n - 1) > 0xffffffffULL:
        raise OverflowError("DELIVER seq does not fit 32 bits")
    mids = [None] * n
    for i in range(n):
        item = <object>PyTuple_GET_ITEM(items, i)
        if PyBytes_CheckExact(item):
            if is_routed(item):
                # a stored message's route, its mid before its tail
                total += WIRE_DELIVER_HEAD + PyBytes_GET_SIZE(item) - WIRE_ROUTED_HEAD
                # unsigned, as the specification reads it (the relay's mids
                # are below 2**63; a hand-made head may not be)
                mids[i] = <unsigned long long>routed_mid(item)
            else:
                # a signal's tail alone: no stored row, no tuple
                total += WIRE_DELIVER_HEAD + PyBytes_GET_SIZE(item)
                mids[i] = 0
            continue
        if not PyTuple_Check(item) or not 2 <= PyTuple_GET_SIZE(item) <= 3:
            raise WrongType(
                "DELIVER payloads must be (mid, tail) or (mid, tail, head) tuples, "
                "or a tail (bytes)")
        tail = <object>PyTuple_GET_ITEM(item, 1)
        if not PyBytes_CheckExact(tail):
            raise WrongType("DELIVER tail must be bytes")
        if PyTuple_GET_SIZE(item) == 3:
            # another op of DELIVER's shape: its own array header and opcode
            head = <object>PyTuple_GET_ITEM(item, 2)
            if not PyBytes_CheckExact(head) or PyBytes_GET_SIZE(head) == 0:
                raise WrongType("DELIVER head must be non-empty bytes")
            total += PyBytes_GET_SIZE(head) + 5
        else:
            total += WIRE_DELIVER_HEAD
        total += PyBytes_GET_SIZE(tail)
        mids[i] = <object>PyTuple_GET_ITEM(item, 0)
    if n == 0:
        return mids
    data = PyBytes_FromStringAndSize(NULL, total)
    p = <unsigned char*>PyBytes_AS_STRING(data)
    if n > 1:
        ends = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t))
        if ends == NULL:
            raise MemoryError()
    for i in range(n):
        # checked above, held by items: their types and sizes stand
        item = <object>PyTuple_GET_ITEM(items, i)
        tail = item if PyBytes_CheckExact(item) else <object>PyTuple_GET_ITEM(item, 1)
        skip = WIRE_ROUTED_HEAD if is_routed(item) else 0
        k = PyBytes_GET_SIZE(tail) - skip
        if not PyBytes_CheckExact(item) and PyTuple_GET_SIZE(item) == 3:
            head = <object>PyTuple_GET_ITEM(item, 2)
            h = PyBytes_GET_SIZE(head)
            fr_copy(p, PyBytes_AS_STRING(head), <size_t>h)
            p[h] = 0xce
            put_be32(p + h + 1, <uint32_t>(first + <unsigned long long>i))
            p += h + 5
        else:
            p[0] = 0x97
            p[1] = 0x12
            p[2] = 0xce
            put_be32(p + 3, <uint32_t>(first + <unsigned long long>i))
            p += WIRE_DELIVER_HEAD
        fr_copy(p, PyBytes_AS_STRING(tail) + skip, <size_t>k)
        p += k
        if ends != NULL:
            ends[i] = <Py_ssize_t>(p - <unsigned char*>PyBytes_AS_STRING(data))
    out.append(op_run(data, ends, n) if n > 1 else data)
    return mids


def pull_round(object router, object dev, list out, object inflight, Py_ssize_t max_n):
    """One round of ``Delivery.pull`` (see ``py_pull_round``): pop up to
    ``max_n`` of ``dev``'s messages, pack a DELIVER each onto ``out``, their
    mids onto ``inflight``; returns ``(n, held bytes, newest ts_ms or -1)``,
    n -1 when their seqs would not fit 32 bits (nothing appended)."""
    cdef object seq
    cdef list batch
    cdef Py_ssize_t n, i, start, k, held = 0
    cdef object tail, x
    cdef const unsigned char* t
    cdef unsigned long long ts
    cdef uint64_t first  # the first popped message's seq
    cdef Router engine = router if type(router) is Router else None
    if engine is not None:
        # the compiled engine's mailbox popped without a Python call (a
        # device is pulled once a message when messages come one a read)
        batch = engine._pop_list(engine._device(dev), as_count(max_n, "max_n"), &first)
        first += 1
        n = PyList_GET_SIZE(batch)
        if n and first + <uint64_t>n >= (<uint64_t>1 << 32):
            return -1, 0, -1
    else:
        # any other router (the model's, in the twin tests)
        seq, batch = router.pop_batch(dev, max_n)
        n = PyList_GET_SIZE(batch)
        if n and seq + n >= (1 << 32):
            return -1, 0, -1
        first = seq if n else 0  # as pack_delivers takes it: its errors, if any
    if n == 0:
        return 0, 0, -1
    start = PyList_GET_SIZE(out)
    inflight.extend(c_pack_delivers(first, batch, out))
    for i in range(start, PyList_GET_SIZE(out)):
        # bytes (one op) or an OpRun: its ops' bytes
        x = <object>PyList_GET_ITEM(out, i)
        held += PyBytes_GET_SIZE(x) if PyBytes_CheckExact(x) else len((<OpRun?>x).data)
    held -= 7 * n
    # pack_delivers checked every item: a tail, or a tuple whose [1] is one
    tail = <object>PyList_GET_ITEM(batch, n - 1)
    if not PyBytes_CheckExact(tail):
        tail = <object>PyTuple_GET_ITEM(tail, 1)
    k = PyBytes_GET_SIZE(tail)
    t = <const unsigned char*>PyBytes_AS_STRING(tail)
    if is_routed(tail):  # the DELIVER tail after its routed head
        k -= WIRE_ROUTED_HEAD
        t += WIRE_ROUTED_HEAD
    if k < 10 or t[k - 10] != 0xcf:
        return n, held, -1
    ts = (<unsigned long long>get_be32(t + k - 9) << 32) | get_be32(t + k - 5)
    return n, held, ts


def ack_feed(object router, object feed, object upto):
    """The engine's side of a DACK of an online device (see ``py_ack_feed``):
    returns ``(n released, mids of the stored ones, bytes freed)``."""
    cdef object n = router.ack(feed.dev, upto)
    cdef object inflight, mids, freed, held
    cdef Py_ssize_t k, left, i, j
    if not n:
        return 0, [], 0
    inflight = feed.inflight
    left = len(inflight)
    k = min(upto - feed.inflight_seq + 1, left)
    if k <= 0:
        return 0, [], 0
    feed.inflight_seq += k
    if k == left:
        mids = list(inflight)
        inflight.clear()
    else:
        popleft = inflight.popleft
        mids = [popleft() for i in range(k)]
    left -= k
    # ephemeral copies have no stored row (mid 0): compacted in place
    j = 0
    for i in range(PyList_GET_SIZE(mids)):
        m = <object>PyList_GET_ITEM(mids, i)
        if m:
            if j != i:
                mids[j] = m
            j += 1
    if j != PyList_GET_SIZE(mids):
        del mids[j:]
    held = feed.inflight_bytes
    if left:
        freed = held * k // (k + left)
    else:
        freed = held
        if not router.pending(feed.dev)[0]:
            freed = feed.qbytes
    feed.inflight_bytes = held - min(freed, held)
    feed.qbytes -= freed
    return n, mids, freed


def sync_rows(object router, object dev, list rows, object routed, dict senders,
              object pack_sender):
    """The relay's backlog sync (``Delivery._sync``): push stored rows into a mailbox.

    ``rows`` are the store's ``(mid, sender, id, body, ts_ms)`` in mid order;
    ``pack_sender`` may also give ``(head, fields)`` (pushed as ``(mid, tail,
    head)``) or None (the row is passed over, left in the store).  Each
    other row becomes the payload ``(mid, DELIVER tail)`` (cls 0) pushed with
    ``router.push(dev, ...)``, until a row's mid is above ``routed`` (the
    live route has not placed it yet: state 1) or the mailbox is full
    (MailboxFull: state 2).  ``senders`` caches ``pack_sender(sender)``.
    Returns ``(pushed, last_mid, state)``; ``last_mid`` is the mid of the
    last row pushed (None if none), state 0 when every row was pushed.
    """
    cdef Py_ssize_t pushed = 0
    cdef object row, mid, sender, cid, body, ts_ms, sp, last = None
    cdef unsigned long long ts, packed_ts = 0
    cdef bytes ts_packed = None
    cdef unsigned char* p
    # the compiled engine's mailbox is filled without a Python call a row
    # (a device fed from the store gets every message this way); any other
    # router (the model's, in the twin tests) through its push
    cdef Router engine = router if type(router) is Router else None
    cdef _Device device = None
    cdef object payload
    cdef object push = router.push if engine is None else None
    for row in rows:
        mid, sender, cid, body, ts_ms = row
        if mid > routed:
            return pushed, last, 1
        if sender in senders:
            sp = senders[sender]
        else:
            sp = senders[sender] = pack_sender(sender)
        if sp is None:
            # left in the store for a link that can read it
            last = mid
            continue
        ts = ts_ms
        if ts_packed is None or ts != packed_ts:
            # a backlog's rows come in runs of one stamp (a store batch's):
            # packed once a run
            ts_packed = PyBytes_FromStringAndSize(NULL, 9)
            p = <unsigned char*>PyBytes_AS_STRING(ts_packed)
            p[0] = 0xcf
            put_be32(p + 1, <uint32_t>(ts >> 32))
            put_be32(p + 5, <uint32_t>(ts & 0xffffffffULL))
            packed_ts = ts
        if PyTuple_Check(sp):
            payload = (mid, c_deliver_tail((<tuple>sp)[1], cid, body, ts_packed, 0),
                       (<tuple>sp)[0])
        else:
            payload = (mid, c_deliver_tail(sp, cid, body, ts_packed, 0))
        if engine is not None:
            if device is None:
                device = engine._device(dev)  # UnknownDevice as push raises it
            if engine._push(device, payload):
                return pushed, last, 2
        else:
            try:
                push(dev, payload)
            except MailboxFull:
                return pushed, last, 2
        last = mid
        pushed += 1
    return pushed, last, 0


def bytes_by_address(list batch):
    """``{address: total length of its tails}`` of a routed batch, flat:
    ``address, route, ...``, a route a routed tail or ``(mid, tail)``, or
    ``address, tail, ...`` (a signal's), the memory budget's accounting."""
    cdef dict out = {}
    cdef Py_ssize_t i, n = PyList_GET_SIZE(batch), run = 0
    cdef object to, payload, tail, last = None
    if n % 2:
        raise InvalidArgument("a routed batch holds address, payload pairs")
    n //= 2
    for i in range(n):
        to = <object>PyList_GET_ITEM(batch, 2 * i)
        payload = <object>PyList_GET_ITEM(batch, 2 * i + 1)
        # checked before indexing: the core is compiled without bounds checks
        if PyBytes_CheckExact(payload):
            tail = payload
        elif type(payload) is not tuple or PyTuple_GET_SIZE(payload) != 2:
            raise WrongType("DELIVER payloads must be (mid, tail) tuples or tails")
        else:
            tail = payload[1]
        if not PyBytes_CheckExact(tail):
            raise WrongType("DELIVER tail must be bytes")
        if to is not last:
            # a batch is mostly runs to one recipient (one sender's read):
            # the dict is written once a run, not once a message
            if i:
                _add_run(out, last, run)
            last = to
            run = 0
        run += PyBytes_GET_SIZE(tail) - (WIRE_ROUTED_HEAD if is_routed(tail) else 0)
    if n:
        _add_run(out, last, run)
    return out


cdef inline int _add_run(dict out, object key, Py_ssize_t run) except -1:
    """``out[key] += run``, from 0 (a run's bytes added to its recipient's or feed's)."""
    cdef object have = out.get(key)
    out[key] = run if have is None else <Py_ssize_t>have + run
    return 0


cdef object _OFFLINE = object()


cdef inline object _device_online(dict by_device, object key, str feature):
    """The engine id of the feed ``by_device`` holds for ``key`` (``(address,
    device name)``) if it is online on a link that negotiated ``feature``,
    else ``_OFFLINE``."""
    cdef PyObject* found = PyDict_GetItemWithError(by_device, key)
    cdef object feed
    if found == NULL:  # (an error in the lookup is raised by Cython)
        return _OFFLINE
    feed = <object>found
    if feature in feed.link.features:
        return feed.dev
    return _OFFLINE


def devices_of(dict by_device, list targets, str feature):
    """The engine ids of the feeds in ``by_device`` named by ``targets``
    (``(address, device name)`` keys) whose link negotiated ``feature``."""
    cdef list devs = []
    cdef object key, dev
    for key in targets:
        dev = _device_online(by_device, key, feature)
        if dev is not _OFFLINE:
            devs.append(dev)
    return devs


def shared_rows(shared, devices_of, str feature):
    """The rows for ``Router.offer_shared`` of a stored batch of messages each
    stored once for many devices (see ``py_shared_rows``): a payload and a
    row tuple a message, ``devices_of`` called when the targets list changes."""
    cdef list rows = []
    cdef object entry, mid, rest, tail, head, targets, devs = None, last = None
    for entry in shared:
        mid, rest = entry
        tail, head, targets = rest
        if devs is None or targets is not last:
            devs = devices_of(targets, feature)
            last = targets
        rows.append(((mid, tail, head), devs))
    return rows


def shared_items(list rows):
    """The engine's ``(device id, payload)`` items for rows stored once for many
    devices, ``(payload, [engine id, ...])``: what ``Router.offer_shared``
    places for the rows, item by item."""
    cdef list items = []
    cdef object row, payload, devs, dev
    for row in rows:
        payload, devs = row
        for dev in devs:
            items.append((dev, payload))
    return items


cdef Py_ssize_t _feed_entry(dict online, dict entry_of, list feeds, object dev,
                            bint* added) except -2:
    """``dev``'s entry in ``feeds`` (-1: not online), for held_offered and
    held_shared: each device is looked up online once a call (``entry_of``
    keeps the answers, ``feeds`` the online feeds in order of first sight);
    ``added`` tells whether this lookup made the entry."""
    cdef PyObject* found = PyDict_GetItemWithError(entry_of, dev)
    cdef Py_ssize_t k
    added[0] = False
    if found != NULL:
        return <Py_ssize_t><object>found
    found = PyDict_GetItemWithError(online, dev)
    if found == NULL:
        k = -1
    else:
        k = PyList_GET_SIZE(feeds)
        feeds.append(<object>found)
    entry_of[dev] = k
    added[0] = True
    return k


cdef int _credit_feeds(list feeds, const Py_ssize_t* sums, Py_ssize_t nfeeds) except -1:
    """Add the bytes summed for each of the first ``nfeeds`` feeds to its
    ``qbytes``: one write a feed, whatever its number of items."""
    cdef Py_ssize_t k
    cdef object feed
    for k in range(nfeeds):
        if sums[k]:
            feed = <object>PyList_GET_ITEM(feeds, k)
            feed.qbytes += sums[k]
    return 0


def held_shared(dict online, list rows, object skip):
    """``held_offered`` for rows ``((mid, tail, head), [engine id, ...])`` (what
    ``Router.offer_shared`` placed): each placed item's tail length is added
    to its online feed's ``qbytes``; an item's index counts the rows'
    devices in order."""
    cdef Py_ssize_t index = 0, size, added = 0, k, j, n, nfeeds = 0
    cdef object row, payload, devs, dev, last_devs = None
    cdef bint new
    cdef bint skipping = len(skip) > 0
    # a batch's rows are a group's messages, whose device lists are one
    # cached list: its devices are looked up online once a list, their
    # entries kept in order, and each feed's bytes summed in C and written
    # once at the end (or at an error: what was counted stays counted)
    cdef dict entry_of = {}  # device -> its entry in feeds (-1: not online)
    cdef list feeds = []
    cdef Py_ssize_t* sums = NULL
    cdef Py_ssize_t* grown
    cdef Py_ssize_t* entries = NULL  # the last list's devices' entries
    cdef Py_ssize_t nentries = 0, cap = 0
    cdef bint plain = False
    try:
        for row in rows:
            payload, devs = row
            size = len(payload[1])
            # the row before's list, of exact ints (whose lookups ran no
            # Python code that could have changed it): its entries hold
            if devs is not last_devs or not plain:
                plain = True
                n = len(devs)
                PyMem_Free(entries)
                entries = <Py_ssize_t*>PyMem_Malloc((n + 1) * sizeof(Py_ssize_t))
                if entries == NULL:
                    raise MemoryError()
                nentries = 0
                for dev in devs:
                    plain = plain and PyLong_CheckExact(dev)
                    k = _feed_entry(online, entry_of, feeds, dev, &new)
                    if new and k >= 0:
                        if k == cap:
                            cap = cap * 2 + 8
                            grown = <Py_ssize_t*>PyMem_Realloc(sums, cap * sizeof(Py_ssize_t))
                            if grown == NULL:
                                raise MemoryError()
                            sums = grown
                        sums[k] = 0
                        nfeeds += 1
                    if nentries < n:
                        entries[nentries] = k
                        nentries += 1
                last_devs = devs
            for j in range(nentries):
                k = entries[j]
                if k >= 0 and not (skipping and (index + j) in skip):
                    sums[k] += size
                    added += size
            index += nentries
    finally:
        try:
            _credit_feeds(feeds, sums, nfeeds)
        finally:
            PyMem_Free(sums)
            PyMem_Free(entries)
    return added


def held_offered(dict online, list items, object skip):
    """Add the tail length of each placed copy of the flat ``engine device id,
    (mid, tail, head), ...`` batch to its online feed's ``qbytes`` (pairs whose
    index is in ``skip`` were not placed); return the bytes added in all."""
    cdef Py_ssize_t index, n = PyList_GET_SIZE(items), size, added = 0
    cdef Py_ssize_t cur = -1, nfeeds = 0
    cdef object payload, dev, last_dev = None
    cdef bint new
    cdef bint skipping = len(skip) > 0
    # a batch's copies go to a few devices, in runs (one peer's device) or in
    # turns (a group's devices, copy after copy): each device is looked up
    # online once, its bytes summed in C (one dict probe an item at most,
    # none in a run), and each feed's count written once at the end (or at
    # an error: what was counted before it stays counted, as item by item)
    cdef dict entry_of = {}  # device -> its entry in feeds (-1: not online)
    # entry_of's first devices and entries, by identity (borrowed: it holds them)
    cdef IdCache seen
    cdef int j
    cdef list feeds = []
    cdef Py_ssize_t* sums
    if n % 2:
        raise InvalidArgument("a batch of copies holds device id, payload pairs")
    n //= 2
    sums = <Py_ssize_t*>PyMem_Malloc((n + 1) * sizeof(Py_ssize_t))
    if sums == NULL:
        raise MemoryError()
    seen.n = 0
    try:
        for index in range(n):
            if skipping and index in skip:
                continue
            dev = <object>PyList_GET_ITEM(items, 2 * index)
            payload = <object>PyList_GET_ITEM(items, 2 * index + 1)
            if last_dev is None or dev is not last_dev:
                # copies in turns: each device's one id object, by identity
                j = idc_find(&seen, <PyObject*>dev)
                if j >= 0:
                    cur = seen.nums[j]
                else:
                    cur = _feed_entry(online, entry_of, feeds, dev, &new)
                    if new:
                        if cur >= 0:
                            sums[cur] = 0
                            nfeeds += 1
                        idc_add(&seen, <PyObject*>dev, NULL, cur)
                last_dev = dev
            if cur < 0:
                continue
            size = len(payload[1])
            sums[cur] += size
            added += size
    finally:
        try:
            _credit_feeds(feeds, sums, nfeeds)
        finally:
            PyMem_Free(sums)
    return added


def copies_online(dict by_device, list meta, object mids, str feature, list routes=None):
    """The engine's flat ``device id, (mid, tail, head), ...`` batch (for
    :meth:`Router.offer_flat`) of a stored batch of per-device copies
    (``meta``: ``(link, id, (to, copies))`` per request, ``copies`` flat:
    ``address, device name, tail, device keys`` a copy, its head the
    DDELIVER head; ``mids``: one row id per copy, or an int, the first of
    as many in a row), for the devices online on a link that negotiated
    ``feature``; with ``routes``, ``device keys, payload`` for every copy
    appended to it (see ``py_copies_online``)."""
    cdef list items = []
    cdef list copies
    cdef list mid_list = None
    cdef long long first = 0
    cdef Py_ssize_t at = 0, i, n
    cdef object request, address, name, tail, dev, payload, mid
    cdef object last_address = None, last_name = None
    cdef dict devs = None  # the last address's device names -> engine id (None: not here)
    # devs' names and engine ids found by identity first (the keys stage
    # hands each device's one name object: a lookup without a hash or a
    # compare); borrowed, devs holds both
    cdef IdCache seen
    cdef int j
    cdef PyObject* found
    seen.n = 0
    if PyLong_CheckExact(mids):
        first = mids
    else:
        mid_list = <list?>mids
    for request in meta:
        copies = request[2][1]
        n = PyList_GET_SIZE(copies)
        if n % 4:
            raise InvalidArgument("copies hold address, device name, tail, device keys "
                                  "for each copy")
        for i in range(0, n, 4):
            # the copy's fields held at once: a lookup below may run code (a
            # key that is not an exact str) that changes the list
            if i + 4 > PyList_GET_SIZE(copies):
                raise RuntimeError("a batch's copies changed while read")
            address = <object>PyList_GET_ITEM(copies, i)
            name = <object>PyList_GET_ITEM(copies, i + 1)
            tail = <object>PyList_GET_ITEM(copies, i + 2)
            # a batch's copies go to one peer's devices, in runs or in turns:
            # each device's feed is looked up once for a run of copies to its
            # address; the keys are exact strs, so equal ones are one entry
            if not (PyUnicode_CheckExact(address) and PyUnicode_CheckExact(name)):
                dev = _device_online(by_device, (address, name), feature)
                last_address = None
            elif last_address is not None and (address is last_address
                                               or address == last_address):
                if name is not last_name:
                    j = idc_find(&seen, <PyObject*>name)
                    if j >= 0:
                        dev = <object>seen.vals[j]
                    elif name == last_name:
                        pass  # the same device as the copy before: dev holds
                    else:
                        # another device of the same address (copies in
                        # turns): the address's devices are kept by name
                        # from its second on
                        if devs is None:
                            devs = {last_name: dev}
                            idc_add(&seen, <PyObject*>last_name, <PyObject*>dev, 0)
                        found = PyDict_GetItemWithError(devs, name)
                        if found == NULL:
                            dev = _device_online(by_device, (address, name), feature)
                            devs[name] = dev
                            idc_add(&seen, <PyObject*>name, <PyObject*>dev, 0)
                        else:
                            dev = <object>found
                    last_name = name
            else:
                # another address: its first device
                devs = None
                seen.n = 0
                last_address = address
                dev = _device_online(by_device, (address, name), feature)
                last_name = name
            if dev is not _OFFLINE or routes is not None:
                if mid_list is None:
                    mid = PyLong_FromLongLong(first + at)
                elif at < PyList_GET_SIZE(mid_list):
                    mid = <object>PyList_GET_ITEM(mid_list, at)
                else:
                    raise IndexError("fewer row ids than copies")
                payload = (mid, tail, DDELIVER_HEAD_BYTES)
                if routes is not None:
                    # the device keys read here: the lookups above may have
                    # changed the list (checked again)
                    if i + 4 > PyList_GET_SIZE(copies):
                        raise RuntimeError("a batch's copies changed while read")
                    routes.append(<object>PyList_GET_ITEM(copies, i + 3))
                    routes.append(payload)
                if dev is not _OFFLINE:
                    items.append(dev)
                    items.append(payload)
            at += 1
    return items
