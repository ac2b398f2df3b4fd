# The store batch of the sends answered with a REPLY (DSEND, GSEND), compiled.
# Part of fastroute._core (included by _core.pyx after _dedup.pxi, whose
# DedupTable it calls).
#
# Compiled twins of fastroute/relay/batch.py (the specification):
#   finish_run     = py_finish_run
#
# tests/test_fastpath.py runs both on the same inputs and compares.


def finish_run(list meta, Py_ssize_t i, DedupTable dedup not None, double now, list cids,
               list waiters):
    """The run of stored requests of one link from ``meta[i]`` (``(link, id,
    extra)``): each id decided (code 0 at ``now``) and appended to ``cids``,
    the waiters of each appended to ``waiters``; returns where the run ends
    (see ``fastroute.relay.batch.py_finish_run``)."""
    cdef Py_ssize_t n = PyList_GET_SIZE(meta), j, k
    cdef object link, sender, entry, cid, w
    cdef Py_hash_t hashes[DEDUP_BATCH]
    if i >= n:
        return i
    link = meta[i][0]
    sender = link.address
    if not PyUnicode_CheckExact(sender):
        raise WrongType("sender must be a str")
    while i < n:
        # hash the run's next few ids and prefetch their index lines, as
        # stored_sacks does: the misses of a large window overlap
        k = 0
        while i + k < n and k < DEDUP_BATCH:
            entry = meta[i + k]
            if not PyTuple_CheckExact(entry) or PyTuple_GET_SIZE(entry) < 2 \
                    or <object>PyTuple_GET_ITEM(entry, 0) is not link:
                break
            cid = <object>PyTuple_GET_ITEM(entry, 1)
            if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
                break
            hashes[k] = dedup_hash(sender, cid)
            dedup.c_prefetch(hashes[k])
            k += 1
        if k == 0:
            # the run's end, or an entry the loop takes one by one (and refuses)
            entry = meta[i]
            if entry[0] is not link:
                break
            cid = entry[1]
            if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
                raise InvalidArgument("message id must be 16 bytes")
            hashes[0] = dedup_hash(sender, cid)
            k = 1
        for j in range(k):
            cid = meta[i + j][1]
            w = dedup.c_finish_h(sender, cid, hashes[j], 0, now)
            if w is not None:
                waiters.extend(w)
            cids.append(cid)
        i += k
    return i
