# The groups stage's group send (GSEND) loop, compiled.  Part of
# fastroute._core (included by _core.pyx after _wire.pxi and _dedup.pxi,
# whose c_deliver_tail and dedup probes it calls).
#
# Compiled twins of fastroute/relay/groups.py (the specification):
#   gsend_run      = py_gsend_run
#
# tests/test_fastpath.py runs both on the same inputs and compares.


def gsend_run(list ops, Py_ssize_t i, dict groups, str sender, str provider, long skip,
              dict senders, set refilled, list buckets, DedupTable dedup not None,
              double now, object now_ms, bytes ts_packed, bytes head, list items,
              list meta, object link):
    """The run of a frame's GSENDs, from ``ops[i]``, accepted without a word to say;
    returns where it stops (see ``fastroute.relay.groups.py_gsend_run``).

    A frame's GSENDs mostly go to one group: what the checks read of a group
    (its version, members, bucket, fan-out and the sender's fields) is looked
    up when the group or the version changes from the op before, not for
    every op.  Nothing the loop calls runs Python code, so none of it can
    change during the call.  The buckets are the compiled ones (the relay's
    when the core is built): their tokens are read and spent in place.
    """
    cdef Py_ssize_t n = PyList_GET_SIZE(ops), slot, at, size
    cdef Py_ssize_t hbase = i, hend = i
    cdef int seen, code
    cdef Py_hash_t h
    cdef Py_hash_t hashes[DEDUP_BATCH]
    cdef object op, cid, gid, version, body, g, bucket, targets, dkeys, sp, stored_sender
    cdef object cached = None, packed = None
    cdef TokenBucket mine_bucket, msg_bucket, byte_bucket, group_bucket = None
    # the group (and version) whose checks the last op passed; None: none yet
    cdef object last_gid = None, last_version = None
    mine, msgs, nbytes = buckets
    if (type(mine) is not TokenBucket or type(msgs) is not TokenBucket
            or type(nbytes) is not TokenBucket):
        return i  # the run takes nothing: the caller's precise path does it all
    mine_bucket = <TokenBucket>mine
    msg_bucket = <TokenBucket>msgs
    byte_bucket = <TokenBucket>nbytes
    while i < n:
        op = ops[i]
        if not PyTuple_CheckExact(op) or PyTuple_GET_SIZE(op) != 5:
            break  # the decoder's ops never stop here; the precise path answers
        cid = <object>PyTuple_GET_ITEM(op, 1)
        gid = <object>PyTuple_GET_ITEM(op, 2)
        version = <object>PyTuple_GET_ITEM(op, 3)
        body = <object>PyTuple_GET_ITEM(op, 4)
        if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
            break
        if i >= hend:
            # the next few ids hashed, their lines on their way, as
            # accept_sends does: the misses of a full window overlap instead
            # of each GSEND waiting for two of its own (op i is a checked
            # tuple: it is among them)
            hbase = i
            hend = dedup.c_hash_ops(ops, i, sender, hashes)
        h = hashes[i - hbase]
        # the id's one probe: whether it was seen, and where to record it
        slot = dedup.c_find(sender, cid, h, now, &seen, &code, &at)
        if seen:
            break
        if not (last_gid is not None and PyBytes_CheckExact(gid)
                and PyLong_CheckExact(version) and version == last_version
                and gid == last_gid):
            # another group (or version) than the op before's: its checks
            # (exact bytes and ints only are compared, whose equality runs no code)
            last_gid = None
            g = groups.get(gid)
            if (g is None or version != g.version or sender not in g.members
                    or gid not in refilled):
                break
            bucket = g.buckets.get(provider)
            cached = g.fanout.get((sender, skip))
            packed = senders.get((gid, sender, skip))
            if bucket is None or cached is None or packed is None or not cached[0]:
                break
            if type(bucket) is not TokenBucket:
                break  # not the relay's: the precise path spends it
            group_bucket = <TokenBucket>bucket
            if PyBytes_CheckExact(gid) and PyLong_CheckExact(version):
                last_gid = gid
                last_version = version
        size = len(body)
        if (mine_bucket.tokens < 1.0 or group_bucket.tokens < 1.0 or msg_bucket.tokens < 1.0
                or byte_bucket.tokens < <double>size):
            break
        mine_bucket.tokens -= 1.0
        group_bucket.tokens -= 1.0
        msg_bucket.tokens -= 1.0
        byte_bucket.tokens -= <double>size
        targets, dkeys = cached
        sp, stored_sender = packed
        # nothing since c_find touched the table: slot and at still hold
        dedup.c_record(sender, cid, h, DEDUP_PENDING, now, slot, at)
        items.append((stored_sender, cid, body, now_ms, dkeys))
        meta.append((link, cid, (c_deliver_tail(sp, cid, body, ts_packed, 0), head, targets)))
        i += 1
    return i
