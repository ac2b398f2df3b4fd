# The gate stage's per-message loops, compiled.  Part of fastroute._core
# (included by _core.pyx after _dedup.pxi and _wire.pxi, whose cdef helpers
# it calls).
#
# Compiled twins of fastroute/relay/gate.py (the specification):
#   SendGate      = PySendGate
#   LinkGate      = PyLinkGate
#   accept_sends  = py_accept_sends
#   stored_sacks  = py_stored_sacks
#   flat_routes   = py_flat_routes
#   field_set     = py_field_set
#   TokenBucket   = PyTokenBucket
#   take_upto     = py_take_upto
#   give_back     = py_give_back
#   take_all      = py_take_all
#   least         = py_least
#
# The Python versions are written line for line like these; keep the two in
# step (tests/test_fastpath.py drives both with the same frames and compares
# every output).

from cpython.unicode cimport PyUnicode_Tailmatch
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import time

cdef object _MONOTONIC = time.monotonic


cdef inline double monotonic_now() noexcept:
    """``time.monotonic()`` without a Python call: the same clock, read and
    turned into seconds the way CPython does (whole seconds exactly, else
    nanoseconds / 1e9)."""
    cdef timespec ts
    cdef long long t
    clock_gettime(CLOCK_MONOTONIC, &ts)
    t = <long long>ts.tv_sec * 1000000000LL + ts.tv_nsec
    if t % 1000000000LL == 0:
        return <double>(t // 1000000000LL)
    return <double>t / 1e9


cdef class TokenBucket:
    """A token bucket: ``rate`` tokens per second, holding at most ``burst``
    (``fastroute.relay.gate.PyTokenBucket``, compiled: every read of a link
    refills its op budget's buckets, and every read of SENDs its quotas').

    ``take(n)`` takes ``n`` tokens and returns True, or takes nothing and
    returns False; a batch may call :meth:`refill` once, spend locally and
    store what is left in ``tokens``.
    """

    cdef public double rate
    cdef public double burst
    cdef public double tokens
    cdef public double stamp
    cdef object _clock

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst
        self._clock = clock
        self.stamp = clock()

    cpdef double refill(self) except? -1.0:
        """Add the tokens earned since the last call; return how many there are."""
        # the relay's buckets use the default clock: read it in C (a read of
        # a link refills several buckets, each was a Python call)
        cdef double now = (monotonic_now() if self._clock is _MONOTONIC
                           else self._clock())
        # the specification's arithmetic, in its order (IEEE doubles both)
        cdef double tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        self.tokens = tokens
        return tokens

    def take(self, double n=1.0):
        """Take ``n`` tokens if available; return whether it did."""
        if self.refill() >= n:
            self.tokens -= n
            return True
        return False


cdef inline double bucket_refill(object b) except? -1.0:
    if type(b) is TokenBucket:
        return (<TokenBucket>b).refill()
    return b.refill()


def take_upto(buckets, Py_ssize_t n):
    """Take up to ``n`` whole tokens from every bucket of a layered budget at
    once; return how many were taken (the least any layer had)."""
    cdef Py_ssize_t avail = n
    cdef double t
    for b in buckets:
        t = bucket_refill(b)
        if t < avail:
            avail = <Py_ssize_t>t if t > 0 else 0
    if avail > 0:
        for b in buckets:
            if type(b) is TokenBucket:
                (<TokenBucket>b).tokens -= avail
            else:
                b.tokens -= avail
    return avail


def least(buckets):
    """Refill every bucket of a layered budget; return the least any holds."""
    cdef double low = 0.0, t
    cdef bint first = True
    for b in buckets:
        t = bucket_refill(b)
        if first or t < low:
            low = t
            first = False
    if first:
        raise ValueError("least() of no buckets")
    return low


def give_back(buckets, double n):
    """Return ``n`` tokens taken by ``take_upto`` and not used (up to each burst)."""
    cdef double v
    for b in buckets:
        if type(b) is TokenBucket:
            v = (<TokenBucket>b).tokens + n
            (<TokenBucket>b).tokens = v if v < (<TokenBucket>b).burst else (<TokenBucket>b).burst
        else:
            b.tokens = min(b.burst, b.tokens + n)


def take_all(buckets, double n):
    """Take ``n`` tokens from every bucket of a layered budget, or none at all."""
    for b in buckets:
        if bucket_refill(b) < n:
            return False
    for b in buckets:
        if type(b) is TokenBucket:
            (<TokenBucket>b).tokens -= n
        else:
            b.tokens -= n
    return True


cdef class SendGate:
    """What the SEND check reads of the relay: one per relay, shared by every link.

    ``known``: address -> store device keys; ``dedup``: the relay's
    :class:`DedupTable`; ``consent``: address -> providers it accepts (None
    when consent is not required); ``taps``: callables told of each accepted
    message; ``count_error(code)``; ``sack_op(id, code)`` packs a refusal;
    ``refusals``: the codes for body too large, unknown recipient, consent
    required, rate limited, in that order; ``blocks``: address -> the
    addresses and ``"@provider"`` names it blocked (no entry when none).
    """

    cdef public dict known
    cdef public DedupTable dedup
    cdef public object consent
    cdef public list taps
    cdef public object count_error
    cdef public object sack_op
    cdef public tuple refusals
    cdef public dict blocks

    def __init__(self, dict known, DedupTable dedup not None, consent, list taps,
                 count_error, sack_op, tuple refusals, dict blocks not None):
        self.blocks = blocks
        self.known = known
        self.dedup = dedup
        self.consent = consent
        self.taps = taps
        self.count_error = count_error
        self.sack_op = sack_op
        self.refusals = refusals


cdef class LinkGate:
    """One link's sender as the SEND check sees it.

    ``link`` is the waiter token's owner (a resent pending id is queued as
    ``(link, id)``); ``out`` the link's outgoing op list; ``sender`` and
    ``sender_packed`` its address (str and packed); ``provider`` and ``own``
    (``"@" + provider``); ``max_body``; ``msg_bucket`` and ``byte_bucket``
    the device's quotas (token buckets, kept across its reconnections);
    ``msg_tokens`` and ``byte_tokens`` the quota available to this read (the
    caller refills them from the buckets before, and stores them back after).
    """

    cdef public object link
    cdef public list out
    cdef public str sender
    cdef public bytes sender_packed
    cdef public str provider
    cdef public str own
    cdef public Py_ssize_t max_body
    cdef public object msg_bucket
    cdef public object byte_bucket
    cdef public object msg_tokens
    cdef public object byte_tokens

    def __init__(self, link, list out, str sender, bytes sender_packed, str provider,
                 Py_ssize_t max_body, msg_bucket, byte_bucket):
        self.link = link
        self.out = out
        self.sender = sender
        self.sender_packed = sender_packed
        self.provider = provider
        self.own = "@" + provider
        self.max_body = max_body
        self.msg_bucket = msg_bucket
        self.byte_bucket = byte_bucket
        self.msg_tokens = 0.0
        self.byte_tokens = 0.0


cdef enum:
    # what a recipient alone decides of a SEND to it (accept_sends)
    VERDICT_KNOWN = 0     # may be written to: the message's own checks follow
    VERDICT_CONSENT = 1   # CONSENT_REQUIRED
    VERDICT_UNKNOWN = 2   # UNKNOWN_RECIPIENT


def accept_sends(SendGate gate not None, LinkGate lg not None, object sends, object now,
                 object now_ms, bytes ts_packed, list store_items, list meta,
                 object first_mid=None):
    """Gate a read's SEND ops: dedup, size, recipient, consent, quota.

    ``sends`` are a read's decoded SENDs, flat: ``id, to, body, cls`` each
    (no tuple a message): a list, or :func:`decode_sends`' ``_SendRun``,
    whose ids and bodies are read in the frame and made into ``bytes`` only
    where they are kept or answered.  Duplicates
    of a decided id (``gate.dedup``, within its window) get their old answer
    in ``lg.out``; duplicates of a pending one are queued on its entry as
    ``(lg.link, id)`` (:meth:`DedupTable.wait`).  A refusal is counted with
    ``gate.count_error`` and answered with ``gate.sack_op(id, code)``; it is
    not remembered.  Accepted persistent messages get a PENDING entry, two
    entries in ``store_items``, ``device_keys, tail`` (what a store's
    ``put_tails`` takes: the tail holds the sender, id, body and ``ts_ms``),
    and three in ``meta``, ``to, tail, id`` (flat: no tuple a message);
    accepted ephemeral ones are acked at once and recorded with code 0.

    With ``first_mid`` (an int: the store takes the batch at once and gives
    its messages mids from there on, ``MemoryStore.put_now``), an accepted
    persistent message is decided here as an ephemeral one is (code 0, its
    SACK-ok in ``lg.out``) and gets one object, its route: its routed tail
    (:func:`fastroute.wire.routed_tail`, ``(mid, tail)`` as one bytes object):
    ``to, route`` in ``meta`` (flat, what :meth:`Router.route_flat` takes
    once the batch is stored) and ``device_keys, route`` in ``store_items``
    (what ``put_now`` takes).

    Returns the ephemeral messages as a flat ``to, tail, ...`` list (a signal's
    payload is its tail alone, mid 0) for :meth:`Router.route_flat` (or
    None).  The quota
    left is written back to ``lg.msg_tokens`` and ``lg.byte_tokens`` (left
    as they were, the very objects, when nothing was spent).
    """
    cdef list out = lg.out
    cdef str sender = lg.sender
    cdef bytes sender_packed = lg.sender_packed
    cdef str provider = lg.provider
    cdef str own = lg.own
    cdef Py_ssize_t max_body = lg.max_body
    cdef object conn = lg.link
    cdef object msg_tokens = lg.msg_tokens
    cdef object byte_tokens = lg.byte_tokens
    cdef dict known = gate.known
    cdef DedupTable dedup = gate.dedup
    cdef object consent = gate.consent
    cdef list taps = gate.taps
    cdef object count_error = gate.count_error
    cdef object sack_op = gate.sack_op
    cdef tuple refusals = gate.refusals
    cdef dict blocks = gate.blocks
    cdef object cid, to, body, cls, code, tail, accepted, tap, devs
    # the last recipient's verdict (see below); None: none yet, or Python
    # code ran since (a refusal's count, a tap) that may have changed the tables
    cdef object last_to = None, last_devs = None
    cdef int last_verdict = VERDICT_UNKNOWN
    cdef PyObject* pdevs
    cdef set blocked
    cdef bint hidden
    # a _SendRun (decode_sends'): each id and body read where it is in the
    # frame, and made into bytes only where a path keeps or answers it
    cdef _SendRun run = sends if type(sends) is _SendRun else None
    cdef list lst = None if run is not None else <list?>sends
    cdef const char* cidp = NULL
    cdef const char* bodyp = NULL
    cdef int icls = 0
    cdef Py_ssize_t size = 0, base, i, slot, at
    cdef Py_ssize_t n = (run.stop - run.start) if run is not None else PyList_GET_SIZE(lst) // 4
    cdef int seen, seen_code
    cdef double mt = msg_tokens
    cdef double bt = byte_tokens
    cdef double tnow = now
    cdef bint spent = False
    cdef list ephemeral = None
    cdef Py_hash_t h
    # the store takes the batch at once: mids known now, nothing pending
    cdef bint stored_now = first_mid is not None
    cdef long long next_mid = first_mid if stored_now else 0
    cdef Py_hash_t hashes[DEDUP_BATCH]
    # accepted ephemeral SACK-oks not yet in out (one op run for a stretch of them)
    cdef SackRun sacks
    sacks.buf = NULL
    sacks.cap = n
    sacks.first = sacks.count = 0
    too_large, unknown, consent_required, rate_limited = refusals
    if lst is not None and PyList_GET_SIZE(lst) % 4:
        raise InvalidArgument("sends hold id, to, body, cls for each SEND")
    try:
        for base in range(0, n, DEDUP_BATCH):
            # hash the next few ids and prefetch their index lines: the probes
            # below then find them cached (a bad id is left for the loop to refuse
            # in its turn, after the ones before it are done)
            for i in range(base, min(n, base + DEDUP_BATCH)):
                if run is not None:
                    h = dedup_hash_p(sender, run.cid_at(i))
                    hashes[i - base] = h
                    dedup.c_prefetch(h)
                    continue
                if 4 * i >= PyList_GET_SIZE(lst):
                    break  # the list shrank (see below): the loop below says so
                cid = <object>PyList_GET_ITEM(lst, 4 * i)
                if PyBytes_CheckExact(cid) and PyBytes_GET_SIZE(cid) == 16:
                    h = dedup_hash(sender, cid)
                    hashes[i - base] = h
                    dedup.c_prefetch(h)
            for i in range(base, min(n, base + DEDUP_BATCH)):
                if run is not None:
                    # ids of 16 and bodies checked by the decoder; the bytes
                    # objects only where kept or answered (cid None till then)
                    cid = body = None
                    cidp = run.cid_at(i)
                    bodyp = run.body_at(i)
                    size = run.size_at(i)
                    icls = run.cls_at(i)
                    cls = icls
                    to = run.to_at(i)
                else:
                    # the SEND's fields held at once: a tap or a consent lookup may run
                    # code that changes the list
                    if 4 * i + 4 > PyList_GET_SIZE(lst):
                        raise RuntimeError("sends changed while read")
                    cid = <object>PyList_GET_ITEM(lst, 4 * i)
                    to = <object>PyList_GET_ITEM(lst, 4 * i + 1)
                    body = <object>PyList_GET_ITEM(lst, 4 * i + 2)
                    cls = <object>PyList_GET_ITEM(lst, 4 * i + 3)
                    if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
                        raise InvalidArgument("message id must be 16 bytes")
                    cidp = PyBytes_AS_STRING(cid)
                h = hashes[i - base]
                # the id's one probe: its answer, and where to record it if it passes
                slot = dedup.c_find_p(sender, cidp, h, tnow, &seen, &seen_code, &at)
                if seen:
                    if cid is None:
                        cid = fr_bytes(cidp, 16)
                    if seen_code == DEDUP_PENDING:
                        dedup.c_wait(sender, cid, (conn, cid))
                    else:
                        sacks_out(&sacks, out)
                        out.append(sack_op(cid, seen_code))
                        last_to = None  # Python code ran
                    continue
                if run is None:
                    size = len(body)
                devs = None
                if size > max_body:
                    code = too_large
                else:
                    if to is not last_to:
                        # what the recipient alone decides (blocks, whether it
                        # is known, consent), once for a run of SENDs to it
                        # (the decoder hands such a run one str)
                        last_to = to
                        # a recipient that blocked the sender (its address or
                        # provider) is, to that sender, an address that does
                        # not exist; nobody's blocks: one size test, a
                        # recipient without blocks: one lookup
                        hidden = False
                        if blocks:
                            blocked = blocks.get(to)
                            # typed set: two PySet_Contains; the own-address
                            # test only when it matters
                            if (blocked is not None and (sender in blocked or own in blocked)
                                    and to != sender):
                                hidden = True
                        # the recipient's one lookup: whether it is known, and
                        # its device keys if the message is stored (a strong
                        # reference, whatever runs before they are used)
                        last_devs = None
                        pdevs = PyDict_GetItemWithError(known, to)
                        if pdevs != NULL:
                            last_devs = <object>pdevs
                        if consent is not None and not (
                                PyUnicode_Tailmatch(to, own, 0, PY_SSIZE_T_MAX, 1) == 1
                                or (last_devs is not None and not hidden
                                    and (accepted := consent.get(to)) is not None
                                    and (provider in accepted or "*" in accepted))):
                            # an unknown address gets the same answer as one
                            # that did not opt in: a sender the recipient never
                            # accepted cannot tell them apart
                            last_verdict = VERDICT_CONSENT
                        elif hidden or last_devs is None:
                            last_verdict = VERDICT_UNKNOWN
                        else:
                            last_verdict = VERDICT_KNOWN
                    devs = last_devs
                    if last_verdict == VERDICT_CONSENT:
                        code = consent_required
                    elif last_verdict == VERDICT_UNKNOWN:
                        code = unknown
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
                    last_to = None  # Python code ran: the tables are read again
                    sacks_out(&sacks, out)
                    if cid is None:
                        cid = fr_bytes(cidp, 16)
                    out.append(sack_op(cid, int(code)))
                    continue
                # a message stored now is routed as one object, its routed
                # tail: no tuple and no int a message
                if run is None:
                    tail = c_deliver_tail(sender_packed, cid, body, ts_packed, cls,
                                          next_mid if stored_now and cls != 1 else -1)
                    icls = 1 if cls == 1 else 0  # c_deliver_tail checked it is 0 or 1
                else:
                    tail = c_deliver_tail_p(sender_packed, cidp, 16, bodyp, size, ts_packed,
                                            icls, next_mid if stored_now and icls != 1 else -1)
                # nothing since c_find touched the table: slot and at still hold
                if icls == 1:  # CLS_EPHEMERAL
                    dedup.c_record_p(sender, cidp, h, 0, tnow, slot, at)
                    if ephemeral is None:
                        ephemeral = []
                    ephemeral.append(to)
                    ephemeral.append(tail)
                    # its SACK-ok with the ones next to it, as one op run
                    sacks_add_p(&sacks, cidp, out)
                elif stored_now:
                    dedup.c_record_p(sender, cidp, h, 0, tnow, slot, at)
                    # the routed tail is the route: the engine's payload and
                    # what the memory store keeps (it holds the fields)
                    store_items.append(devs)
                    store_items.append(tail)
                    meta.append(to)
                    meta.append(tail)
                    next_mid += 1
                    sacks_add_p(&sacks, cidp, out)
                else:
                    if cid is None:
                        cid = fr_bytes(cidp, 16)
                    dedup.c_record_p(sender, cidp, h, DEDUP_PENDING, tnow, slot, at)
                    # the store reads the message from its tail (put_tails):
                    # no item, no body of its own
                    store_items.append(devs)
                    store_items.append(tail)
                    meta.append(to)
                    meta.append(tail)
                    meta.append(cid)
                if taps:
                    sacks_out(&sacks, out)
                    for tap in taps:
                        tap(now_ms, sender, to, size, cls)
                    last_to = None  # a tap may change the tables
    finally:
        # the ephemeral SACK-oks not yet out (in order: every other answer
        # above put the ones before it out first), whatever stopped the loop
        try:
            sacks_out(&sacks, out)
        finally:
            PyMem_Free(sacks.buf)
    if spent:
        lg.msg_tokens = mt
        lg.byte_tokens = bt
    return ephemeral


def stored_sacks(list meta, str sender, DedupTable dedup not None, double now, list out,
                 ack_all):
    """The relay's per-message bookkeeping after a store batch of ``sender``'s committed.

    For each ``to, tail, id`` of the flat ``meta``: decide the id's dedup entry
    (code 0 at ``now``), answer the waiters that resent it meanwhile through
    ``ack_all(None, id, 0, waiters)``, then append the sender's SACK-ok to
    ``out`` -- in that order, per message.  The SACKs between two answers to
    waiters go in as one :class:`OpRun` (one allocation, not one a SACK; one
    alone as bytes).  Each entry is looked for first in the slot after the
    one before (:meth:`DedupTable.c_finish_next`): :func:`accept_sends` added
    the batch's entries in a row.
    """
    cdef Py_ssize_t i, n = PyList_GET_SIZE(meta)
    cdef Py_ssize_t near = -1
    cdef object cid, waiters
    cdef SackRun sacks
    if n % 3:
        raise InvalidArgument("meta holds to, tail, id for each message")
    n //= 3
    sacks.buf = NULL
    sacks.cap = n
    sacks.first = sacks.count = 0
    try:
        for i in range(n):
            cid = meta[3 * i + 2]
            if not PyBytes_CheckExact(cid) or PyBytes_GET_SIZE(cid) != 16:
                raise InvalidArgument("message id must be 16 bytes")
            waiters = dedup.c_finish_next(sender, cid, &near, 0, now)
            if waiters is not None:
                # the SACKs so far go out first: the order stays per message
                sacks_out(&sacks, out)
                ack_all(None, cid, 0, waiters)
            sacks_add(&sacks, cid, out)
    finally:
        # what was decided is answered, whatever stopped the loop
        try:
            sacks_out(&sacks, out)
        finally:
            PyMem_Free(sacks.buf)


cdef struct SackRun:
    # SACK-oks not yet in a link's list: count of them written at buf from
    # the first-th on; room for cap (a batch's messages), allocated at need
    unsigned char* buf
    Py_ssize_t cap, first, count


cdef inline int sacks_add(SackRun* s, object cid, list out) except -1:
    """Queue ``cid``'s SACK-ok (``cid``: exact bytes of 16, checked by the
    caller); in a batch of one it goes to ``out`` at once, as bytes."""
    return sacks_add_p(s, PyBytes_AS_STRING(cid), out)


cdef inline int sacks_add_p(SackRun* s, const char* cid, list out) except -1:
    """:func:`sacks_add` of the 16 id bytes at ``cid``."""
    if s.cap <= 1:
        out.append(make_sack_ok_p(cid))
        return 0
    if s.buf == NULL:
        s.buf = <unsigned char*>PyMem_Malloc(s.cap * WIRE_SACK_LEN)
        if s.buf == NULL:
            raise MemoryError()
    sack_ok_at(s.buf + (s.first + s.count) * WIRE_SACK_LEN, cid)
    s.count += 1
    return 0


cdef int sacks_out(SackRun* s, list out) except -1:
    """Append the queued SACK-oks to ``out`` as one op run (as bytes when
    there is one): before anything else goes there, so the order holds."""
    if s.count == 0:
        return 0
    out.append(fixed_ops(PyBytes_FromStringAndSize(
        <const char*>s.buf + s.first * WIRE_SACK_LEN, s.count * WIRE_SACK_LEN),
        s.count, WIRE_SACK_LEN))
    s.first += s.count
    s.count = 0
    return 0


def flat_routes(list meta, list mids):
    """``[to, (mid, tail), ...]`` (flat, for :meth:`Router.route_flat`) from the
    relay's flat ``meta`` (``to, tail, id`` a message) and the store's mids."""
    cdef Py_ssize_t n = min(PyList_GET_SIZE(meta) // 3, PyList_GET_SIZE(mids)), i
    # one tuple a message (the engine's payload), none for the pair
    cdef list out = PyList_New(2 * n)
    cdef PyObject* to
    cdef object payload
    for i in range(n):
        payload = (<object>PyList_GET_ITEM_p(<PyObject*>mids, i),
                   <object>PyList_GET_ITEM_p(<PyObject*>meta, 3 * i + 1))
        to = PyList_GET_ITEM_p(<PyObject*>meta, 3 * i)
        Py_INCREF_p(to)
        PyList_SET_ITEM_steal(<PyObject*>out, 2 * i, to)
        Py_INCREF(payload)
        PyList_SET_ITEM_steal(<PyObject*>out, 2 * i + 1, <PyObject*>payload)
    return out


def field_set(object items, Py_ssize_t index, Py_ssize_t step=0):
    """The distinct ``item[index]`` of ``items``, or with ``step`` the distinct
    ``items[index::step]`` of a flat list (see ``py_field_set``): runs of the
    same object (a batch's messages to one recipient) are added once.  The
    recipients of a decoded frame's SENDs (``index`` 1, ``step`` 4 of the
    decoder's run) are read from the run, not made into a list first."""
    cdef set out = set()
    cdef Py_ssize_t i, n, inc = 1
    cdef object item, v, last = None
    cdef bint have = False
    cdef _SendRun run
    if step:
        if step < 0 or index < 0:
            raise ValueError("index and step are not negative")
        inc = step
    if type(items) is _SendRun:
        run = <_SendRun>items
        if step == 4 and index == 1:
            for i in range(run.stop - run.start):
                v = run.to_at(i)
                if v is not last:
                    out.add(v)
                    last = v
            return out
        items = run.tolist()
    n = PyList_GET_SIZE(<list?>items)
    i = index if step else 0
    while i < n:  # a range() with a variable step would be a Python object
        item = <object>PyList_GET_ITEM(items, i)
        i += inc
        if step:
            v = item
        elif PyTuple_CheckExact(item) and 0 <= index < PyTuple_GET_SIZE(item):
            v = <object>PyTuple_GET_ITEM(item, index)
        else:
            v = item[index]
        if have and v is last:
            continue
        out.add(v)
        last = v
        have = True
    return out
