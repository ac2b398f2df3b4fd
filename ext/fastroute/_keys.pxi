# The keys stage's per-device send (DSEND) loops, compiled.  Part of
# fastroute._core (included by _core.pyx after _wire.pxi, whose c_deliver_tail
# it calls).
#
# Compiled twins of fastroute/relay/keys.py (the specification):
#   Slot           = PySlot
#   dsend_copies   = py_dsend_copies
#   dsend_run      = py_dsend_run
#   recipients_by_sender = py_recipients_by_sender
#   copy_tails     = py_copy_tails
#   new_targets    = py_new_targets
#
# tests/test_fastpath.py runs both on the same inputs and compares.

cdef class Slot:
    """One device's place in its address's device list (what memory keeps of it).

    The DSEND loop below reads a slot's registration id, name and store key
    for every copy; as fields of a C struct they cost a load each, where a
    Python class's attributes cost a lookup each (about 140 instructions).
    """

    cdef public object address, name, device_id, reg_id, seen, dkeys

    def __init__(self, address, name, device_id, reg_id, seen=0):
        self.address = address
        self.name = name
        self.device_id = device_id
        self.reg_id = reg_id
        self.seen = seen
        self.dkeys = (0,)

    def keyed(self, dkey):
        """Set the device's key in the message store."""
        self.dkeys = (dkey,)


def dsend_copies(dict devs, object entries, long skip, str target, str stored_sender,
                 bytes cid, object now_ms, bytes sp, bytes ts_packed, list items,
                 list copies):
    """Check a DSEND's entries against a device list; build its copies (and store items).

    True when ``entries`` name exactly the devices of ``devs`` (device id ->
    Slot) but ``skip``, each once and with its current registration id; then
    one routed copy per entry is appended to ``copies`` (four entries: to,
    device name, tail, device keys) and, unless ``items`` is None, one store
    item to ``items``.  False with
    nothing appended otherwise.  Device ids are 1..127 (checked by the
    decoder), so "each once" is a 128-bit mask.  ``entries`` is a tuple (the
    decoder's) or any sequence.
    """
    # the decoder's entries as they are: no copy per DSEND
    return c_copies_of(devs, _decoded_entries(entries), skip, target, stored_sender, cid,
                       now_ms, sp, ts_packed, items, copies)


cdef inline object _decoded_entries(object entries):
    # a DSEND's entries as c_copies_of takes them: the decoder's (_Entries or
    # a tuple) as they are, a tuple copy of any other sequence
    if PyTuple_CheckExact(entries) or type(entries) is _Entries:
        return entries
    return tuple(entries)


cdef inline bint _take_device(unsigned long long* seen, long did, long skip) noexcept:
    # whether an entry's device id (1..127) may be taken: not the one
    # skipped, not seen before in this DSEND (then marked seen)
    if did == skip or seen[did >> 6] & (1ULL << (did & 63)):
        return False
    seen[did >> 6] |= 1ULL << (did & 63)
    return True


# a slot's fields: a compiled Slot's are struct members; a slot of any other
# class (the specification's, in the twin tests) has attributes
cdef inline object _slot_reg_id(PyObject* slot):
    return (<Slot>slot).reg_id if type(<object>slot) is Slot else (<object>slot).reg_id


cdef inline object _slot_name(PyObject* slot):
    return (<Slot>slot).name if type(<object>slot) is Slot else (<object>slot).name


cdef inline object _slot_dkeys(PyObject* slot):
    return (<Slot>slot).dkeys if type(<object>slot) is Slot else (<object>slot).dkeys


cdef inline bint c_copies_of(dict devs, object ents, long skip, str target,
                             str stored_sender, bytes cid, object now_ms, bytes sp,
                             bytes ts_packed, list items, list copies) except -1:
    # dsend_copies of the decoder's entries (_Entries or a tuple), for dsend_run
    if type(ents) is _Entries:
        return c_dsend_copies_in_place(devs, <_Entries>ents, skip, target, stored_sender,
                                       cid, now_ms, sp, ts_packed, items, copies)
    return c_dsend_copies(devs, <tuple>ents, skip, target, stored_sender, cid, now_ms, sp,
                          ts_packed, items, copies)


cdef bint c_dsend_copies_in_place(dict devs, _Entries ents, long skip, str target,
                                  str stored_sender, bytes cid, object now_ms, bytes sp,
                                  bytes ts_packed, list items, list copies) except -1:
    # c_dsend_copies of entries read in place: each copy's tail is made from
    # its ciphertext where it lies in the frame (no tuple or bytes an entry;
    # a store item's body is made only when one is asked for).  The decoder
    # checked the ranges: device ids 1..127, registration ids 1..16383.
    cdef Py_ssize_t n = ents.stop - ents.start, i
    cdef unsigned long long seen[2]
    cdef long did
    cdef const EntryRec* r
    cdef object rid, dkeys
    cdef PyObject* found
    cdef PyObject* slots[127]
    cdef int overflow
    cdef Py_ssize_t want = len(devs) - (1 if skip in devs else 0)
    if n != want or n > 127:
        return False
    seen[0] = 0
    seen[1] = 0
    for i in range(n):
        r = ents.rec(i)
        did = r.did
        if not _take_device(seen, did, skip):
            return False
        found = PyDict_GetItemWithError(devs, PyLong_FromLongLong(did))
        if found == NULL:
            return False
        rid = _slot_reg_id(found)
        # a slot's registration id is an int: compared as one, without an
        # object for the entry's
        if PyLong_CheckExact(rid):
            if PyLong_AsLongLongAndOverflow(rid, &overflow) != r.reg or overflow:
                return False
        elif rid != reg_id_int(<unsigned long long>r.reg):
            return False
        slots[i] = found
    for i in range(n):
        r = ents.rec(i)
        dkeys = _slot_dkeys(slots[i])
        if items is not None:
            items.append((stored_sender, cid,
                          fr_bytes(ents.body_at(i), r.size), now_ms, dkeys))
        copies.append(target)
        copies.append(_slot_name(slots[i]))
        copies.append(c_deliver_tail_p(sp, PyBytes_AS_STRING(cid), PyBytes_GET_SIZE(cid),
                                       ents.body_at(i), r.size, ts_packed, 0))
        copies.append(dkeys)
    return True


cdef bint c_dsend_copies(dict devs, tuple ents, long skip, str target, str stored_sender,
                         bytes cid, object now_ms, bytes sp, bytes ts_packed, list items,
                         list copies) except -1:
    # dsend_copies, called by dsend_run without a Python call's argument
    # parsing (eleven arguments, once or twice a DSEND)
    cdef Py_ssize_t n = PyTuple_GET_SIZE(ents), i
    cdef unsigned long long seen[2]
    cdef long did
    cdef object entry, body, reg, key, dkeys
    cdef PyObject* found
    # each entry's slot, found once (borrowed: devs holds them, and nothing
    # below runs code that could change it)
    cdef PyObject* slots[127]
    cdef Py_ssize_t want = len(devs) - (1 if skip in devs else 0)
    if n != want or n > 127:
        return False
    seen[0] = 0
    seen[1] = 0
    for i in range(n):
        entry = <object>PyTuple_GET_ITEM(ents, i)
        if PyTuple_CheckExact(entry) and PyTuple_GET_SIZE(entry) == 3:
            # the decoder's (device id, reg id, body): no generic item lookup
            key = <object>PyTuple_GET_ITEM(entry, 0)
            reg = <object>PyTuple_GET_ITEM(entry, 1)
        else:
            key = entry[0]
            reg = entry[1]
        did = key
        if did < 1 or did > 127 or not _take_device(seen, did, skip):
            return False
        found = PyDict_GetItemWithError(devs, key)
        if found == NULL:
            return False
        if _slot_reg_id(found) != reg:
            return False
        slots[i] = found
    for i in range(n):
        entry = <object>PyTuple_GET_ITEM(ents, i)
        if PyTuple_CheckExact(entry) and PyTuple_GET_SIZE(entry) == 3:
            body = <object>PyTuple_GET_ITEM(entry, 2)
        else:
            body = entry[2]
        dkeys = _slot_dkeys(slots[i])
        if items is not None:
            items.append((stored_sender, cid, body, now_ms, dkeys))
        # flat, four entries a copy: no tuple of its own (its head is
        # DDELIVER_HEAD_BYTES, the same for every copy)
        copies.append(target)
        copies.append(_slot_name(slots[i]))
        copies.append(c_deliver_tail(sp, cid, body, ts_packed, 0))
        copies.append(dkeys)
    return True


def dsend_run(list ops, Py_ssize_t i, dict lists, dict reach, long skip, str sender,
              str stored_sender, object now_ms, bytes sp, bytes ts_packed, list tokens,
              DedupTable dedup not None, double now, list items, list meta, object link):
    """The run of a frame's DSENDs, from ``ops[i]``, accepted without a word to say;
    returns where it stops (see ``fastroute.relay.keys.py_dsend_run``).

    ``ops`` are checked DSEND tuples ``(1004, id, to, more, entries, own)``
    (the decoder's: id 16 bytes, entries ``(device id 1..127, reg id, body)``).
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(ops), j, k, size, slot, at, start
    cdef Py_ssize_t hbase = i, hend = i
    cdef double msg_tokens = tokens[0], byte_tokens = tokens[1]
    cdef int seen, code
    cdef Py_hash_t h
    cdef Py_hash_t hashes[DEDUP_BATCH]
    cdef object op, cid, to, entries, devs, ents, owns
    cdef list copies
    try:
        while i < n:
            op = ops[i]
            cid = op[1]
            to = op[2]
            if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
                break  # the decoder's ops never stop here; the precise path answers
            if i >= hend:
                # the next few ids hashed, their lines on their way, as
                # accept_sends does: the misses of a large window overlap
                hbase = i
                hend = dedup.c_hash_ops(ops, i, sender, hashes)
                if hend == i:  # op i is no tuple: hashed here alone
                    hashes[0] = dedup_hash(sender, cid)
                    hend = i + 1
            # the id's one probe: whether it was seen, and where to record it
            h = hashes[i - hbase]
            slot = dedup.c_find(sender, cid, h, now, &seen, &code, &at)
            if seen or reach.get(to) is not True:
                break
            entries = op[4]
            if not entries:
                break
            # the decoder's entries as they are, in place or tuples (a tuple
            # copy of any other sequence)
            ents = _decoded_entries(entries)
            owns = _decoded_entries(op[5])
            # the op's store items go straight into items, taken back if it
            # stops the run
            start = PyList_GET_SIZE(items) if items is not None else 0
            copies = []
            devs = lists[to]
            if not c_copies_of(devs, ents, skip if to == sender else 0, to, stored_sender,
                               cid, now_ms, sp, ts_packed, items, copies):
                break
            if len(owns) and (to == sender or not c_copies_of(
                    lists.get(sender, {}), owns, skip, sender, stored_sender, cid, now_ms,
                    sp, ts_packed, items, copies)):
                if items is not None:
                    del items[start:]
                break
            size = _entries_bytes(ents) + _entries_bytes(owns)
            k = PyList_GET_SIZE(copies) >> 2
            if msg_tokens < k or byte_tokens < size:
                if items is not None:
                    del items[start:]
                break
            msg_tokens -= k
            byte_tokens -= size
            # nothing since c_find touched the table: slot and at still hold
            dedup.c_record(sender, cid, h, DEDUP_PENDING, now, slot, at)
            meta.append((link, cid, (to, copies)))
            i += 1
    finally:
        tokens[0] = msg_tokens
        tokens[1] = byte_tokens
    return i


cdef Py_ssize_t _entries_bytes(object ents) except -1:
    # the ciphertexts' bytes of a DSEND's entries (_Entries or a tuple)
    cdef Py_ssize_t j, size = 0
    if type(ents) is _Entries:
        return (<_Entries>ents).nbytes()
    for j in range(PyTuple_GET_SIZE(ents)):
        size += len((<object>PyTuple_GET_ITEM(ents, j))[2])
    return size


def recipients_by_sender(list meta):
    """A stored batch's ``(link, id, (to, ...))`` requests as sender address ->
    the set of recipients (see ``py_recipients_by_sender``)."""
    cdef dict pairs = {}
    cdef Py_ssize_t i, n = PyList_GET_SIZE(meta)
    cdef object entry, link, last = None
    cdef set tos = None
    for i in range(n):
        entry = meta[i]
        link = entry[0]
        if tos is None or link is not last:
            address = link.address
            tos = pairs.get(address)
            if tos is None:
                tos = pairs[address] = set()
            last = link
        tos.add(entry[2][0])
    return pairs


def copy_tails(list meta):
    """A stored batch's copies as a store's ``put_copies`` takes them: flat
    ``device_keys, tail`` a copy, in order (see ``py_copy_tails``)."""
    cdef list out = []
    cdef Py_ssize_t i, j, n = PyList_GET_SIZE(meta)
    cdef object entry, extra
    cdef list copies
    for i in range(n):
        entry = <object>PyList_GET_ITEM(meta, i)
        extra = entry[2]
        copies = <list?>extra[1]
        if PyList_GET_SIZE(copies) % 4:
            raise InvalidArgument("copies hold target, device name, tail, device keys each")
        for j in range(0, PyList_GET_SIZE(copies), 4):
            out.append(<object>PyList_GET_ITEM(copies, j + 3))
            out.append(<object>PyList_GET_ITEM(copies, j + 2))
    return out


def new_targets(list ops, dict reach):
    """The recipients (``op[2]``) of ``ops`` that ``reach`` has no answer for
    yet, each once, in the order they first come (see
    ``fastroute.relay.keys.py_new_targets``)."""
    cdef list new = []
    cdef set seen = None  # past the first new recipient
    cdef Py_ssize_t i, n = PyList_GET_SIZE(ops)
    cdef object op, to, last = None
    for i in range(n):
        op = <object>PyList_GET_ITEM(ops, i)
        if PyTuple_CheckExact(op) and PyTuple_GET_SIZE(op) > 2:
            to = <object>PyTuple_GET_ITEM(op, 2)
        else:
            to = op[2]
        # a frame's DSENDs mostly go to one peer: the decoder's ops share
        # its str, so the same object as the op before is known at once
        if last is not None and to is last:
            continue
        last = to
        if to in reach:
            continue
        if seen is None:
            seen = set()
        elif to in seen:
            continue
        seen.add(to)
        new.append(to)
    return new
