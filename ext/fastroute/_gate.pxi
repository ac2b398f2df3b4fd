# The relay's per-SEND gate loop (fastroute.server.Relay._accept), compiled.
# Included by _core.pyx after _wire.pxi.  fastroute/_fastpath.py has the
# Python twin, py_accept_sends, line for line; keep the two in step (the
# tests drive both with the same frames and compare every output).

from cpython.unicode cimport PyUnicode_Tailmatch


def accept_sends(list sends, object conn, list out, str sender, bytes sender_packed,
                 dict known, DedupTable dedup not None, object now,
                 object msg_tokens, object byte_tokens, Py_ssize_t max_body,
                 object now_ms, bytes ts_packed, list taps, object consent, str own,
                 str provider, object count_error, object sack_op,
                 tuple refusals, list store_items, list meta):
    """Gate a read's SEND ops: dedup, size, recipient, consent, quota.

    ``sends`` are decoded SEND tuples ``(1, id, to, body, cls)``.  Duplicates
    of a decided id (``dedup``, a :class:`DedupTable`, within its window)
    get their old answer in ``out``; duplicates of a pending one are queued
    on its entry as ``(conn, id)`` (:meth:`DedupTable.wait`).  A refusal (codes
    from ``refusals``: body too large, unknown recipient, consent required,
    rate limited) is counted with ``count_error`` and answered with
    ``sack_op(id, code)``; it is not remembered.  Accepted persistent
    messages get a PENDING entry and one item in ``store_items`` and
    ``meta`` (``(to, tail, id)``) each; accepted ephemeral ones are acked at
    once and recorded with code 0.  ``consent`` is the consent table, or
    None when consent is not required.

    Returns ``(ephemeral, msg_tokens, byte_tokens)``: the ephemeral
    ``(to, (0, tail))`` items (or None) and the quota left (the objects
    passed in when nothing was spent).
    """
    cdef object op, cid, to, body, cls, code, tail, accepted, tap
    cdef Py_ssize_t size
    cdef int seen_code
    cdef double mt = msg_tokens
    cdef double bt = byte_tokens
    cdef double tnow = now
    cdef bint spent = False
    cdef list ephemeral = None
    too_large, unknown, consent_required, rate_limited = refusals
    for op in sends:
        _, cid, to, body, cls = op
        if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
            raise InvalidArgument("message id must be 16 bytes")
        if dedup.c_lookup(sender, cid, tnow, &seen_code):
            if seen_code == DEDUP_PENDING:
                dedup.c_wait(sender, cid, (conn, cid))
            else:
                out.append(sack_op(cid, seen_code))
            continue
        size = len(body)
        if size > max_body:
            code = too_large
        elif to not in known:
            code = unknown
        elif consent is not None and not (
                PyUnicode_Tailmatch(to, own, 0, PY_SSIZE_T_MAX, 1) == 1
                or ((accepted := consent.get(to)) is not None
                    and (provider in accepted or "*" in accepted))):
            code = consent_required
        elif mt < 1.0 or bt < <double>size:
            code = rate_limited  # a refused message costs no quota
        else:
            mt -= 1.0
            bt -= <double>size
            spent = True
            code = None
        if code is not None:
            # A refusal is not remembered: the sender may retry the same id.
            count_error(code)
            out.append(sack_op(cid, int(code)))
            continue
        tail = c_deliver_tail(sender_packed, cid, body, ts_packed, cls)
        if cls == 1:  # CLS_EPHEMERAL
            if ephemeral is None:
                ephemeral = []
            ephemeral.append((to, (0, tail)))
            out.append(make_sack_ok(cid))
            dedup.c_put(sender, cid, 0, tnow)
        else:
            dedup.c_put(sender, cid, DEDUP_PENDING, tnow)
            store_items.append((sender, cid, body, now_ms, known[to]))
            meta.append((to, tail, cid))
        if taps:
            for tap in taps:
                tap(now_ms, sender, to, size, cls)
    if spent:
        return ephemeral, mt, bt
    return ephemeral, msg_tokens, byte_tokens


def sync_rows(object router, object dev, list rows, object routed, dict senders,
              object pack_sender):
    """The relay's backlog sync (``_Conn._sync``): push stored rows into a mailbox.

    ``rows`` are the store's ``(mid, sender, id, body, ts_ms)`` in mid order.
    Each becomes the payload ``(mid, DELIVER tail)`` (cls 0) pushed with
    ``router.push(dev, ...)``, until a row's mid is above ``routed`` (the
    live route has not placed it yet: state 1) or the mailbox is full
    (MailboxFull: state 2).  ``senders`` caches ``pack_sender(sender)``.
    Returns ``(pushed, last_mid, state)``; ``last_mid`` is the mid of the
    last row pushed (None if none), state 0 when every row was pushed.
    """
    cdef Py_ssize_t pushed = 0
    cdef object row, mid, sender, cid, body, ts_ms, sp, last = None
    cdef unsigned long long ts
    cdef bytes ts_packed
    cdef unsigned char* p
    push = router.push
    for row in rows:
        mid, sender, cid, body, ts_ms = row
        if mid > routed:
            return pushed, last, 1
        sp = senders.get(sender)
        if sp is None:
            sp = senders[sender] = pack_sender(sender)
        ts = ts_ms
        ts_packed = PyBytes_FromStringAndSize(NULL, 9)
        p = <unsigned char*>PyBytes_AS_STRING(ts_packed)
        p[0] = 0xcf
        put_be32(p + 1, <uint32_t>(ts >> 32))
        put_be32(p + 5, <uint32_t>(ts & 0xffffffffULL))
        try:
            push(dev, (mid, c_deliver_tail(sp, cid, body, ts_packed, 0)))
        except MailboxFull:
            return pushed, last, 2
        last = mid
        pushed += 1
    return pushed, last, 0
