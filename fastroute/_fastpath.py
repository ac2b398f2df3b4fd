"""Byte packers of the relay's hot path, in pure Python and compiled.

Every helper here is written twice: the Python version below is the
specification, and ``ext/fastroute/_wire.pxi`` (part of ``fastroute._core``)
has a C twin producing the same bytes.  The module-level names are bound to
the compiled twins when :data:`fastroute.COMPILED`, to the Python versions
otherwise (``FASTROUTE_NO_EXTENSIONS=1``); ``tests/test_fastpath.py`` runs
both on the same inputs.

The layouts are those of :mod:`fastroute.wire` (``docs/PROTOCOL.md``):

* a DELIVER op is ``[18, seq, from, id, body, ts_ms, cls]``; everything after
  seq is the same for every recipient device, so the relay packs it once per
  message (the *tail*, :func:`deliver_tail`) and each delivery only adds its
  head and its own seq, always as a msgpack uint32 (:func:`pack_delivers`);
* a SACK-ok is ``[17, id, 0]`` with the id as bin8 (:func:`sack_ok_op`);
* the client's SEND is ``[1, id, to, body, cls]``, the id as bin8 and ``to``
  packed once per recipient (:func:`pack_sends`).

The client's frame dispatch (``dispatch_frame_c``, ``ext/fastroute/_client.pxi``)
has no twin here: its specification is the loop of ``Client._on_frame``.
:data:`DedupTable` is ``ext/fastroute/_dedup.pxi``'s compiled dedup window,
or its specification :class:`fastroute.gate.DedupWindow`.
"""

from __future__ import annotations

from . import COMPILED
from .errors import BodyTooLarge, InvalidArgument, MailboxFull, WrongType
from .gate import PENDING, DedupWindow

__all__ = ["COMPILED_FASTPATH", "DedupTable", "accept_sends", "decode_sends_c",
           "decode_server_ops_c", "deliver_tail", "dispatch_frame_c", "mem_ack", "mem_load",
           "mem_put", "pack_delivers", "pack_frames_c", "pack_sends", "route_items",
           "sack_ok_op", "stored_sacks", "sync_rows", "ts_packed"]

_DELIVER_HEAD = b"\x97\x12\xce"  # fixarray(7), 18, uint32 marker
_SACK_HEAD = b"\x93\x11\xc4\x10"  # fixarray(3), 17, bin8 of 16
_ID_HEAD = b"\xc4\x10"
_CLS_BYTE = (b"\x00", b"\x01")
_BIN8 = tuple(b"\xc4" + bytes((i,)) for i in range(256))
_SEND_HEAD = b"\x95\x01\xc4\x10"  # fixarray(5), 1, bin8 of 16
_MAX_BODY = 61440  # wire.MAX_BODY (wire imports this module)


def _bin_header(n: int) -> bytes:
    if n < 256:
        return _BIN8[n]
    return b"\xc5" + n.to_bytes(2, "big") if n < 65536 else b"\xc6" + n.to_bytes(4, "big")


def ts_packed(ts_ms: int) -> bytes:
    """``ts_ms`` packed as a msgpack uint64 (the DELIVER tail's timestamp field)."""
    return b"\xcf" + ts_ms.to_bytes(8, "big")


def _py_deliver_tail(sender_packed: bytes, cid: bytes, body: bytes, ts_packed: bytes,
                     cls: int) -> bytes:
    """The packed DELIVER fields after seq: from, id, body, ts_ms, cls."""
    if cls != 0 and cls != 1:
        raise InvalidArgument("cls must be 0 or 1")
    return b"".join((sender_packed, _ID_HEAD, cid, _bin_header(len(body)), body,
                     ts_packed, _CLS_BYTE[cls]))


def _py_pack_delivers(seq: int, batch: list, out: list) -> list:
    """Append a packed DELIVER per ``(mid, tail)`` of ``batch`` (seqs from ``seq``)
    to ``out``; return the mids in order."""
    if batch and seq + len(batch) - 1 > 0xFFFFFFFF:
        raise OverflowError("DELIVER seq does not fit 32 bits")
    mids = []
    append = out.append
    head = _DELIVER_HEAD
    for item in batch:
        if type(item) is not tuple or len(item) != 2:
            raise WrongType("DELIVER payloads must be (mid, tail) tuples")
        mid, tail = item
        if type(tail) is not bytes:
            raise WrongType("DELIVER tail must be bytes")
        append(b"".join((head, seq.to_bytes(4, "big"), tail)))
        mids.append(mid)
        seq += 1
    return mids


def _py_sack_ok_op(cid: bytes) -> bytes:
    """The packed SACK ``[17, cid, 0]`` for a 16-byte id."""
    if type(cid) is not bytes or len(cid) != 16:
        raise InvalidArgument("message id must be 16 bytes")
    return b"".join((_SACK_HEAD, cid, b"\x00"))


def _py_pack_sends(pool: bytes, at: int, to_packed: bytes, bodies: list, cls: int,
                   target, pending: dict | None) -> tuple[list, list]:
    """The packed SEND ops of a batch to one recipient: ``(ids, ops)``.

    Ids are consecutive 16-byte slices of ``pool`` from ``at``; ``to_packed``
    is the recipient as a packed msgpack str.  Every body is checked first;
    then ``pending[id] = target`` per message unless ``pending`` is None.
    """
    if cls != 0 and cls != 1:
        raise InvalidArgument("cls must be 0 or 1")
    n = len(bodies)
    if at < 0 or n > (len(pool) - at) // 16:
        raise InvalidArgument("id pool too short for the batch")
    for body in bodies:
        if type(body) is not bytes:
            raise WrongType("SEND needs id: bytes, to: str, body: bytes")
        if len(body) > _MAX_BODY:
            raise BodyTooLarge(f"body over {_MAX_BODY} bytes: send it via the media store")
    ids = [pool[i:i + 16] for i in range(at, at + 16 * n, 16)]
    head = _SEND_HEAD
    tail = _CLS_BYTE[cls]
    ops = [b"".join((head, cid, to_packed, _bin_header(len(body)), body, tail))
           for cid, body in zip(ids, bodies)]
    if pending is not None:
        for cid in ids:
            pending[cid] = target
    return ids, ops


def _py_stored_sacks(meta: list, sender: str, dedup, now: float, out: list,
                     ack_all) -> None:
    """Decide each stored message's dedup entry, answer its waiters, SACK the sender."""
    append = out.append
    for _, _, cid in meta:
        waiters = dedup.finish(sender, cid, 0, now)
        if waiters is not None:
            ack_all(None, cid, 0, waiters)
        append(_py_sack_ok_op(cid))


def _py_route_items(meta: list, mids: list) -> list:
    """``[(to, (mid, tail)) ...]`` from the relay's ``meta`` and the store's mids."""
    return [(to, (mid, tail)) for (to, tail, _), mid in zip(meta, mids)]


def _py_accept_sends(sends: list, conn, out: list, sender: str, sender_packed: bytes,
                     known: dict, dedup, now: float, msg_tokens,
                     byte_tokens, max_body: int, now_ms: int, ts_packed: bytes, taps: list,
                     consent, own: str, provider: str, count_error, sack_op,
                     refusals: tuple, store_items: list, meta: list):
    """Gate a read's SEND ops (the relay's hot loop); see ``_gate.pxi`` for the contract.

    Returns ``(ephemeral, msg_tokens, byte_tokens)``.
    """
    too_large, unknown, consent_required, rate_limited = refusals
    ephemeral = None
    for _, cid, to, body, cls in sends:
        if type(cid) is not bytes or len(cid) != 16:
            raise InvalidArgument("message id must be 16 bytes")
        seen = dedup.lookup(sender, cid, now)
        if seen is not None:
            if seen == PENDING:
                dedup.wait(sender, cid, (conn, cid))
            else:
                out.append(sack_op(cid, seen))
            continue
        size = len(body)
        if size > max_body:
            code = too_large
        elif to not in known:
            code = unknown
        elif consent is not None and not to.endswith(own) and not (
                (accepted := consent.get(to)) is not None
                and (provider in accepted or "*" in accepted)):
            code = consent_required
        elif msg_tokens < 1.0 or byte_tokens < size:
            code = rate_limited  # a refused message costs no quota
        else:
            msg_tokens -= 1.0
            byte_tokens -= size
            code = None
        if code is not None:
            # A refusal is not remembered: the sender may retry the same id.
            count_error(code)
            out.append(sack_op(cid, int(code)))
            continue
        tail = _py_deliver_tail(sender_packed, cid, body, ts_packed, cls)
        if cls == 1:  # CLS_EPHEMERAL
            if ephemeral is None:
                ephemeral = []
            ephemeral.append((to, (0, tail)))
            out.append(_py_sack_ok_op(cid))
            dedup.begin(sender, cid, 0, now)
        else:
            dedup.begin(sender, cid, PENDING, now)
            store_items.append((sender, cid, body, now_ms, known[to]))
            meta.append((to, tail, cid))
        if taps:
            for tap in taps:
                tap(now_ms, sender, to, size, cls)
    return ephemeral, msg_tokens, byte_tokens


def _py_sync_rows(router, dev, rows: list, routed, senders: dict, pack_sender):
    """Push stored ``(mid, sender, id, body, ts_ms)`` rows into a device's mailbox.

    Returns ``(pushed, last_mid, state)``: state 1 at the first row above
    ``routed``, 2 when the mailbox is full, 0 when every row was pushed.
    """
    pushed = 0
    last = None
    push = router.push
    for mid, sender, cid, body, ts_ms in rows:
        if mid > routed:
            return pushed, last, 1
        sp = senders.get(sender)
        if sp is None:
            sp = senders[sender] = pack_sender(sender)
        tail = _py_deliver_tail(sp, cid, body, ts_packed(ts_ms), 0)
        try:
            push(dev, (mid, tail))
        except MailboxFull:
            return pushed, last, 2
        last = mid
        pushed += 1
    return pushed, last, 0


def _py_mem_put(items: list, msgs: dict, inbox: dict, first: int, ttl_ms: int,
                mids: list) -> None:
    """MemoryStore's put loop: store ``(sender, id, body, ts_ms, device_keys)``
    items from mid ``first`` on, appending each mid to ``mids`` once stored."""
    mid = first
    for sender, cid, body, ts, devs in items:
        msgs[mid] = [sender, cid, body, ts, ts + ttl_ms, len(devs)]
        for d in devs:
            box = inbox.get(d)
            if box is None:
                box = inbox[d] = {}
            box[mid] = None
        mids.append(mid)
        mid += 1


def _py_mem_load(box: dict, msgs: dict, after_mid: int, limit: int) -> list:
    """MemoryStore's load loop: up to ``limit`` rows ``(mid, sender, id, body,
    ts_ms)`` of one device's inbox ``box`` with mid > ``after_mid``, in order."""
    out: list = []
    if limit <= 0:
        return out
    for m in box:
        if m > after_mid:
            s, c, b, t, _, _ = msgs[m]
            out.append((m, s, c, b, t))
            if len(out) >= limit:
                break
    return out


def _py_mem_ack(box: dict, msgs: dict, mids) -> None:
    """MemoryStore's ack loop: drop ``mids`` from one device's inbox ``box``,
    and from ``msgs`` the messages no inbox holds any more."""
    for m in mids:
        if box.pop(m, 0) is None:  # present (values are None), not a repeat
            msg = msgs[m]
            msg[5] -= 1
            if msg[5] == 0:
                del msgs[m]


if COMPILED:
    from ._core import (  # type: ignore[attr-defined]
        DedupTable,
        accept_sends,
        deliver_tail,
        mem_ack,
        mem_load,
        mem_put,
        pack_delivers,
        pack_sends,
        route_items,
        sack_ok_op,
        stored_sacks,
        sync_rows,
    )
    from ._core import decode_sends as decode_sends_c  # type: ignore[attr-defined]
    from ._core import decode_server_ops as decode_server_ops_c  # type: ignore[attr-defined]
    from ._core import dispatch_frame as dispatch_frame_c  # type: ignore[attr-defined]
    from ._core import pack_frames as pack_frames_c  # type: ignore[attr-defined]
else:
    DedupTable = DedupWindow  # type: ignore[misc,assignment]
    accept_sends = _py_accept_sends
    sync_rows = _py_sync_rows
    mem_ack = _py_mem_ack
    mem_load = _py_mem_load
    mem_put = _py_mem_put
    deliver_tail = _py_deliver_tail
    pack_delivers = _py_pack_delivers
    pack_sends = _py_pack_sends
    route_items = _py_route_items
    sack_ok_op = _py_sack_ok_op
    stored_sacks = _py_stored_sacks
    pack_frames_c = None
    decode_sends_c = None
    decode_server_ops_c = None
    dispatch_frame_c = None

#: True when the helpers above are the compiled ones.
COMPILED_FASTPATH = COMPILED
