# The keys stage's per-copy loop of a per-device send (DSEND), compiled.  Part of
# fastroute._core (included by _core.pyx after _wire.pxi, whose c_deliver_tail
# it calls).
#
# Compiled twins of fastroute/relay/keys.py (the specification):
#   dsend_copies   = py_dsend_copies
#
# tests/test_fastpath.py runs both on the same inputs and compares.

# fixarray(8) + uint16 2001: the DDELIVER head (keys.DDELIVER_HEAD)
cdef bytes DDELIVER_HEAD_BYTES = b"\x98\xcd\x07\xd1"


def dsend_copies(dict devs, list entries, long skip, str target, str stored_sender,
                 bytes cid, object now_ms, bytes sp, bytes ts_packed, list items,
                 list copies):
    """Check a DSEND's entries against a device list; build its store items and copies.

    True when ``entries`` name exactly the devices of ``devs`` (device id ->
    Slot) but ``skip``, each once and with its current registration id; then
    one store item and one routed copy per entry are appended.  False with
    nothing appended otherwise.  Device ids are 1..127 (checked by the
    decoder), so "each once" is a 128-bit mask.
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(entries), i
    cdef unsigned long long seen[2]
    cdef long did
    cdef object entry, slot, body, name
    cdef Py_ssize_t want = len(devs) - (1 if skip in devs else 0)
    if n != want:
        return False
    seen[0] = 0
    seen[1] = 0
    for i in range(n):
        entry = entries[i]
        did = entry[0]
        if did < 1 or did > 127 or did == skip:
            return False
        if seen[did >> 6] & (1ULL << (did & 63)):
            return False
        seen[did >> 6] |= 1ULL << (did & 63)
        slot = devs.get(did)
        if slot is None or slot.reg_id != entry[1]:
            return False
    for i in range(n):
        entry = entries[i]
        body = entry[2]
        slot = devs[entry[0]]
        name = slot.name
        items.append((stored_sender, cid, body, now_ms, [slot.dkey]))
        copies.append((target, name,
                       (DDELIVER_HEAD_BYTES, c_deliver_tail(sp, cid, body, ts_packed, 0))))
    return True
