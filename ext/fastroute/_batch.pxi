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
    cdef Py_ssize_t n = PyList_GET_SIZE(meta)
    # each entry looked for first next to the one before, as in stored_sacks
    cdef Py_ssize_t near = -1
    cdef object link, sender, entry, cid, w
    if i >= n:
        return i
    link = meta[i][0]
    sender = link.address
    if not PyUnicode_CheckExact(sender):
        raise WrongType("sender must be a str")
    while i < n:
        entry = meta[i]
        if not PyTuple_CheckExact(entry) or PyTuple_GET_SIZE(entry) < 2:
            # an entry the loop takes one by one (and refuses)
            if entry[0] is not link:
                break
            cid = entry[1]
        else:
            if <object>PyTuple_GET_ITEM(entry, 0) is not link:
                break
            cid = <object>PyTuple_GET_ITEM(entry, 1)
        if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
            raise InvalidArgument("message id must be 16 bytes")
        w = dedup.c_finish_next(sender, cid, &near, 0, now)
        if w is not None:
            waiters.extend(w)
        cids.append(cid)
        i += 1
    return i
