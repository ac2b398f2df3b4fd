"""The relay's byte packers and gate loop: compiled twins against the Python ones.

Each helper's pure-Python specification sits in the module of the stage that
uses it (``fastroute.wire``, ``fastroute.relay.gate``, ``fastroute.relay.delivery``,
``fastroute.store``, ``fastroute.client``); ``fastroute._core`` (the ``.pxi``
part named after that stage) has the compiled twin.
Every test runs the Python version against msgpack as the oracle, and, when
the extension is built, checks the compiled version gives the same bytes (or
raises the same exception class) on the same input.
"""

from __future__ import annotations

import array
import asyncio
import collections
import copy
import itertools
import os
import random
import sys

import msgpack
import pytest

import fastroute
from fastroute import _compiled, noise, store, wire
from fastroute import client as client_mod
from fastroute.relay import delivery
from fastroute.relay import gate as gate_mod
from fastroute.relay import batch as batch_mod
from fastroute.relay import keys as keys_mod
from fastroute.relay import senders as senders_mod
from fastroute.relay import groups as groups_mod
from fastroute.errors import (
    BodyTooLarge,
    ErrorCode,
    InvalidArgument,
    ProtocolError,
    UnknownAddress,
    UnknownDevice,
    WrongType,
)
from fastroute import dedup
from fastroute.dedup import PENDING

if fastroute.COMPILED:
    from fastroute import _core
else:  # pragma: no cover - FASTROUTE_NO_EXTENSIONS=1
    _core = None

needs_c = pytest.mark.skipif(not fastroute.COMPILED, reason="compiled core not built")

MID = bytes(range(16))
ADDR = "bob@example.org"
SENDER_PACKED = msgpack.packb("alice@example.org")
TS = 1_700_000_000_123
TS_PACKED = b"\xcf" + TS.to_bytes(8, "big")
BODY_SIZES = [0, 1, 15, 31, 32, 255, 256, 257, 65535, 65536, 70000]


def _unrun(x):
    """``x`` with every op run in its lists read as the ops it holds: the
    compiled producers append an ``OpRun`` where their specifications
    append its ops one by one."""
    if type(x) is list:
        return [_unrun(y) for y in wire.flat_ops(x)]
    if type(x) is tuple:
        return tuple(_unrun(y) for y in x)
    return x


def _same(fn_py, fn_c, *args):
    """Both raise the same exception class, or return equal values (op runs
    read as their ops); returns py's."""
    try:
        want = fn_py(*copy.deepcopy(args))
    except Exception as exc:  # noqa: BLE001 - compared below
        if fn_c is not None:
            with pytest.raises(type(exc)):
                fn_c(*copy.deepcopy(args))
        return exc
    if fn_c is not None:
        assert _unrun(fn_c(*copy.deepcopy(args))) == _unrun(want)
    return want


def _both(spec):
    """``(spec, compiled twin or None)``."""
    return spec, _compiled.compiled_twin(spec)


def _run_or_none(run):
    """``run`` applied to a twin, None kept as None (no compiled core)."""
    return lambda fn: fn and run(fn)


def test_compiled_twins_loaded():
    # the stage modules use the compiled twins whenever the core is built
    pairs = [(wire.deliver_tail, wire.py_deliver_tail), (wire.sack_ok_op, wire.py_sack_ok_op),
             (wire._pack_frames, wire.py_pack_frames), (wire._decode_sends, wire.py_decode_sends),
             (wire.OpRun, wire.PyOpRun), (wire.op_count, wire.py_op_count),
             (wire._decode_server_ops, wire.py_decode_server_ops),
             (wire.dsend_ok, wire.py_dsend_ok), (wire._decode_pings, wire.py_decode_pings),
             (wire.tail_fields, wire.py_tail_fields),
             (wire.copy_tail_fields, wire.py_copy_tail_fields),
             (wire._decode_dacks_compiled or wire.py_decode_dacks, wire.py_decode_dacks),
             (wire.gsend_ok, wire.py_gsend_ok),
             (wire._frame_offsets_compiled or wire.py_frame_offsets, wire.py_frame_offsets),
             (wire._decode_dsends_compiled or wire.py_decode_dsends, wire.py_decode_dsends),
             (gate_mod.accept_sends, gate_mod.py_accept_sends),
             (gate_mod.stored_sacks, gate_mod.py_stored_sacks),
             (gate_mod.flat_routes, gate_mod.py_flat_routes),
             (gate_mod.SendGate, gate_mod.PySendGate), (gate_mod.LinkGate, gate_mod.PyLinkGate),
             (delivery.pack_delivers, delivery.py_pack_delivers),
             (delivery.sync_rows, delivery.py_sync_rows),
             (delivery.pull_round, delivery.py_pull_round),
             (delivery.ack_feed, delivery.py_ack_feed),
             (keys_mod.dsend_copies, keys_mod.py_dsend_copies),
             (keys_mod.dsend_run, keys_mod.py_dsend_run),
             (groups_mod.gsend_run, groups_mod.py_gsend_run),
             (batch_mod.finish_run, batch_mod.py_finish_run),
             (keys_mod.recipients_by_sender, keys_mod.py_recipients_by_sender),
             (keys_mod.new_targets, keys_mod.py_new_targets),
             (keys_mod.copy_tails, keys_mod.py_copy_tails),
             (store.CopyTails, store.PyCopyTails),
             (gate_mod.field_set, gate_mod.py_field_set),
             (wire.reply_ok_ops, wire.py_reply_ok_ops),
             (wire.leading_dsends, wire.py_leading_dsends),
             (wire.leading_gsends, wire.py_leading_gsends),
             (wire._decode_gsends_compiled or wire.py_decode_gsends, wire.py_decode_gsends),
             (delivery.bytes_by_address, delivery.py_bytes_by_address),
             (delivery.shared_items, delivery.py_shared_items),
             (delivery.shared_rows, delivery.py_shared_rows),
             (delivery.devices_of, delivery.py_devices_of),
             (delivery.held_offered, delivery.py_held_offered),
             (delivery.held_shared, delivery.py_held_shared),
             (delivery.copies_online, delivery.py_copies_online),
             (store.Inbox, store.PyInbox),
             (store._mem_put, store.py_mem_put), (store._mem_ack, store.py_mem_ack),
             (store._mem_load, store.py_mem_load), (store._sql_rows, store.py_sql_rows),
             (store._shares_release, store.py_shares_release),
             (store._release_walked, store.py_release_walked),
             (store._ack_device, store.py_ack_device), (store._mid_span, store.py_mid_span),
             (store._mids_blob, store.py_mids_blob),
             (store._gather_acks, store.py_gather_acks), (store._ack_drops, store.py_ack_drops),
             (store._acks_left, store.py_acks_left),
             (store._pack_rows, store.py_pack_rows),
             (gate_mod.TokenBucket, gate_mod.PyTokenBucket),
             (gate_mod.take_upto, gate_mod.py_take_upto),
             (gate_mod.give_back, gate_mod.py_give_back), (gate_mod.take_all, gate_mod.py_take_all),
             (gate_mod.least, gate_mod.py_least),
             (noise.seal_frames, noise.py_seal_frames), (noise.FrameReader, noise.PyFrameReader),
             (client_mod._pack_sends, client_mod.py_pack_sends),
             (client_mod._pack_dsend, client_mod.py_pack_dsend),
             (client_mod._pack_dsends, client_mod.py_pack_dsends),
             (client_mod._dispatch_frame, client_mod.py_dispatch_frame),
             (dedup.DedupTable, dedup.DedupWindow), (fastroute.Router, fastroute._model.Router)]
    assert _compiled.COMPILED is fastroute.COMPILED
    for used, spec in pairs:
        if fastroute.COMPILED:
            assert used is _compiled.compiled_twin(spec) is not None
            assert type(used).__name__ in ("cython_function_or_method", "type")
            assert getattr(_core, used.__name__) is used
        else:
            assert used is spec


# -- DELIVER tails and ops ------------------------------------------------------

@pytest.mark.parametrize("size", BODY_SIZES)
@pytest.mark.parametrize("cls", [0, 1])
def test_deliver_tail_matches_msgpack(size, cls):
    body = bytes(i & 0xFF for i in range(size))
    tail = _same(*_both(wire.py_deliver_tail),
                 SENDER_PACKED, MID, body, TS_PACKED, cls)
    op = b"\x97\x12\xce" + (7).to_bytes(4, "big") + tail
    assert msgpack.unpackb(op) == [18, 7, "alice@example.org", MID, body, TS, cls]


def test_deliver_tail_copies_fields_of_every_length():
    # the compiled tail copies its fields inline, in 16-, 8-, 4- and 1-byte
    # moves chosen by length (fr_copy): every length up to past where it
    # hands over to memcpy, for the sender, the timestamp and the body,
    # each byte distinct so that a move one off shows
    for n in range(0, 300):
        body = bytes((i * 7 + n) & 0xFF for i in range(n))
        sender = msgpack.packb("s" * (n % 40))
        ts = msgpack.packb(n ** 3)
        _same(*_both(wire.py_deliver_tail), sender, MID, body, ts, n & 1)


@pytest.mark.parametrize("cls", [-1, 2])
def test_deliver_tail_refuses_bad_cls(cls):
    exc = _same(*_both(wire.py_deliver_tail),
                SENDER_PACKED, MID, b"x", TS_PACKED, cls)
    assert isinstance(exc, InvalidArgument)


@pytest.mark.parametrize("size", BODY_SIZES)
@pytest.mark.parametrize("sender", ["a@b", "x" * 40 + "@é.org", "s" * 300 + "@p"])
def test_tail_fields_read_back_what_deliver_tail_packed(size, sender):
    # what the memory store reads out of a route it keeps: every str and
    # bin header width, stamps from 0 to the largest int64
    body = bytes(i & 0xFF for i in range(size))
    for ts, cls in ((TS, 0), (0, 1), (2**63 - 1, 0)):
        tail = wire.py_deliver_tail(msgpack.packb(sender), MID, body, wire.ts_packed(ts), cls)
        assert _same(*_both(wire.py_tail_fields), tail) == (sender, MID, body, ts)
        # the stamp in any uint width msgpack has
        short = wire.py_deliver_tail(msgpack.packb(sender), MID, body, msgpack.packb(ts), cls)
        assert _same(*_both(wire.py_tail_fields), short) == (sender, MID, body, ts)
        # what the caps count a stored tail by, from its headers alone
        assert wire.tail_body_size(tail) == wire.tail_body_size(short) == size


def test_tail_fields_refuse_what_is_not_a_deliver_tail():
    good = wire.py_deliver_tail(SENDER_PACKED, MID, b"body", TS_PACKED, 0)
    sp = SENDER_PACKED
    bad = [
        b"", good[:-1], good + b"\x00", good[:len(sp) + 5],
        msgpack.packb(b"alice") + good[len(sp):],             # sender a bin
        b"\xa2\xff\xfe" + good[len(sp):],                     # sender not UTF-8
        sp + b"\xc4\x0f" + MID[:15] + good[len(sp) + 18:],    # id of 15
        sp + msgpack.packb("x" * 16) + good[len(sp) + 18:],    # id a str
        good[:-1] + b"\x02",                                   # cls 2
        good[:-1] + b"\xc3",                                   # cls true
        good[:-10] + b"\xd3" + (-5).to_bytes(8, "big", signed=True) + b"\x00",  # ts < 0
        good[:-10] + b"\xcb" + bytes(8) + b"\x00",            # ts a float
        good[:-10] + b"\xcf" + (2**63).to_bytes(8, "big") + b"\x00",  # ts past int64
    ]
    for tail in bad:
        assert isinstance(_same(*_both(wire.py_tail_fields), tail), InvalidArgument), tail
    # the body's size is read past a sender and an id that are headers of
    # their kind, up to the body's own header
    for tail in (b"\x01" + good[len(sp):], msgpack.packb(b"alice") + good[len(sp):],
                 sp + msgpack.packb("x" * 16) + good[len(sp) + 18:], good[:len(sp) + 18],
                 good[:len(sp) + 18] + msgpack.packb("body") + good[-10:]):
        with pytest.raises(InvalidArgument):
            wire.tail_body_size(tail)
    for tail in (None, bytearray(good), "text"):
        assert isinstance(_same(*_both(wire.py_tail_fields), tail), WrongType)


@pytest.mark.parametrize("size", BODY_SIZES)
@pytest.mark.parametrize("sender,device", [("a@b", 1), ("x" * 40 + "@é.org", 127),
                                           ("s" * 300 + "@p", 2**63 - 1)])
def test_copy_tail_fields_read_back_a_copys_tail(size, sender, device):
    # what the memory store reads out of a per-device copy's route: the
    # store's sender of a copy (address/device) and the DELIVER fields
    body = bytes(i & 0xFF for i in range(size))
    sp = msgpack.packb(sender) + msgpack.packb(device)
    for ts, cls in ((TS, 0), (0, 1), (2**63 - 1, 0)):
        tail = wire.py_deliver_tail(sp, MID, body, wire.ts_packed(ts), cls)
        assert _same(*_both(wire.py_copy_tail_fields), tail) == (
            f"{sender}/{device}", MID, body, ts)
        assert f"{sender}/{device}" == senders_mod.copy_sender(sender, device)


def test_copy_tail_fields_refuse_what_is_not_a_copys_tail():
    sp = msgpack.packb("alice@example.org") + b"\x03"
    good = wire.py_deliver_tail(sp, MID, b"body", TS_PACKED, 0)
    assert _same(*_both(wire.py_copy_tail_fields), good)[0] == "alice@example.org/3"
    n = len(sp)
    bad = [
        b"", good[:-1], good + b"\x00", good[:n + 5],
        wire.py_deliver_tail(SENDER_PACKED, MID, b"body", TS_PACKED, 0),  # a DELIVER tail
        good[:n - 1] + b"\xff" + good[n:],                  # device -1
        good[:n - 1] + b"\xc2" + good[n:],                  # device false
        good[:n - 1] + b"\xcf" + (2**63).to_bytes(8, "big") + good[n:],  # past int64
        good[:n - 1] + b"\xa1" + b"3" + good[n:],           # device a str
        b"\xa2\xff\xfe\x03" + good[n:],                     # sender not UTF-8
        msgpack.packb(b"alice") + b"\x03" + good[n:],        # sender a bin
        good[:n] + b"\xc4\x0f" + MID[:15] + good[n + 18:],   # id of 15
        good[:-1] + b"\x02",                                 # cls 2
    ]
    for tail in bad:
        assert isinstance(_same(*_both(wire.py_copy_tail_fields), tail), InvalidArgument), tail
    for tail in (None, bytearray(good), "text"):
        assert isinstance(_same(*_both(wire.py_copy_tail_fields), tail), WrongType)


@pytest.mark.parametrize("seq,n", [(1, 0), (0, 1), (1, 1000), (2**32 - 1, 1), (2**32 - 3, 3),
                                   (2**32 - 2, 3), (2**32, 1)])
def test_pack_delivers(seq, n):
    tails = [wire.py_deliver_tail(SENDER_PACKED, MID, b"b" * i, TS_PACKED, i & 1)
             for i in range(n)]
    batch = [(i * 3, t) for i, t in enumerate(tails)]

    def run(fn):
        def call(seq, batch):
            out = [b"keep"]
            mids = fn(seq, batch, out)
            return mids, out
        return call

    got = _same(*map(_run_or_none(run), _both(delivery.py_pack_delivers)),
                seq, batch)
    if seq + max(n, 1) - 1 > 0xFFFFFFFF:
        assert isinstance(got, OverflowError)
        return
    mids, out = got
    assert mids == [i * 3 for i in range(n)]
    assert out[0] == b"keep" and len(out) == n + 1
    for i, op in enumerate(out[1:]):
        assert msgpack.unpackb(op) == [18, seq + i, "alice@example.org", MID, b"b" * i, TS,
                                       i & 1]


def _packing(fn):
    """A pack_delivers twin as ``(seq, batch) -> (mids, its ops, flat)``."""
    def call(seq, batch):
        out = []
        return fn(seq, batch, out), wire.flat_ops(out)
    return call


def test_pack_delivers_takes_a_signals_bare_tail_as_mid_0():
    # a signal's payload on the live route is its tail alone: a DELIVER with
    # mid 0, packed among stored messages' (mid, tail) and DDELIVER-shaped ones
    head = b"\x96\xcd\x03\xee"
    batch = [_TAILS[0], (7, _TAILS[1]), _TAILS[2], (9, _TAILS[3], head), _TAILS[1]]

    mids, ops = _same(*map(_run_or_none(_packing), _both(delivery.py_pack_delivers)), 5,
                      batch)
    assert mids == [0, 7, 0, 9, 0]
    # the very ops of (0, tail) pairs
    _, want = _packing(delivery.py_pack_delivers)(
        5, [(0, _TAILS[0]), (7, _TAILS[1]), (0, _TAILS[2]), (9, _TAILS[3], head), (0, _TAILS[1])])
    assert ops == want
    assert [msgpack.unpackb(ops[k])[1] for k in (0, 1, 2, 4)] == [5, 6, 7, 9]


def test_pack_delivers_reads_a_routed_tails_mid_and_packs_its_tail():
    # a stored message's route is one object, its routed tail: packed as its
    # (mid, tail) pair is, among signals' bare tails and (mid, tail[, head])
    head = b"\x96\xcd\x03\xee"
    big = 2**40 + 3  # all eight bytes of the mid read
    batch = [wire.routed_tail(7, _TAILS[1]), _TAILS[0], wire.routed_tail(big, _TAILS[2]),
             (9, _TAILS[3], head), (11, _TAILS[1]), wire.routed_tail(12, _TAILS[3])]

    mids, ops = _same(*map(_run_or_none(_packing), _both(delivery.py_pack_delivers)), 5,
                      batch)
    assert mids == [7, 0, big, 9, 11, 12]
    _, want = _packing(delivery.py_pack_delivers)(
        5, [(7, _TAILS[1]), (0, _TAILS[0]), (big, _TAILS[2]), (9, _TAILS[3], head),
            (11, _TAILS[1]), (12, _TAILS[3])])
    assert ops == want
    assert msgpack.unpackb(ops[0]) == [18, 5, *msgpack.unpackb(b"\x95" + _TAILS[1])]
    # one alone is one op, as bytes
    one = _same(*map(_run_or_none(_packing), _both(delivery.py_pack_delivers)), 1,
                [wire.routed_tail(3, _TAILS[0])])
    assert one == ([3], [b"\x97\x12\xce\x00\x00\x00\x01" + _TAILS[0]])
    # a head the relay never makes (a mid of 2**63 or more): read alike, unsigned
    odd = b"\xc1" + (2**64 - 2).to_bytes(8, "big") + _TAILS[1]
    assert _same(*map(_run_or_none(_packing), _both(delivery.py_pack_delivers)), 1,
                 [odd])[0] == [2**64 - 2]


def test_routed_tail_round_trips_and_is_told_from_a_bare_tail():
    for mid in (0, 1, 500, 2**32, 2**63 - 1):
        r = wire.routed_tail(mid, _TAILS[0])
        assert wire.is_routed(r) and wire.route_parts(r) == (mid, _TAILS[0])
        assert wire.route_mid(r) == mid
        assert len(r) == len(_TAILS[0]) + wire.ROUTED_HEAD_LEN
    # a DELIVER tail starts with its sender, a str: never the routed marker
    assert not any(wire.is_routed(t) for t in _TAILS)
    assert wire.route_parts(_TAILS[0]) == (0, _TAILS[0])
    assert wire.route_parts((4, _TAILS[1], b"h")) == (4, _TAILS[1])
    assert wire.route_mid(_TAILS[0]) == 0 and wire.route_mid((4, _TAILS[1], b"h")) == 4
    assert not wire.is_routed(b"\xc1" + bytes(8))  # a head alone has no tail
    for bad in (-1, 2**63, 1.0, True):
        with pytest.raises(InvalidArgument):
            wire.routed_tail(bad, _TAILS[0])
    for bad in (b"", bytearray(_TAILS[0]), "tail"):
        with pytest.raises(WrongType):
            wire.routed_tail(1, bad)
    with pytest.raises(WrongType):
        wire.route_parts([1, _TAILS[0]])
    with pytest.raises(WrongType):
        wire.route_mid([1, _TAILS[0]])
    # what the overflow path counts a refused route as: its DELIVER tail's length
    for p in (wire.routed_tail(9, _TAILS[2]), (9, _TAILS[2]), (9, _TAILS[2], b"h"), _TAILS[2]):
        assert delivery._tail_len(p) == len(delivery._tail(p)) == len(_TAILS[2])


@pytest.mark.parametrize("batch", [[(1, "str")], [(1,)], [[1, b"x"]], [None], [bytearray(b"x")],
                                   [b"\x00" * 10, (1, "str")]])
def test_pack_delivers_refuses_bad_payloads(batch):
    assert isinstance(_same(*_both(delivery.py_pack_delivers),
                            1, batch, []), TypeError)


class _Popper:
    """A mailbox's ``pop_batch`` answering a set ``(seq, batch)`` once, then
    ``(next seq, [])`` (what both twins of ``pull_round`` call)."""

    def __init__(self, seq, batch):
        self.answers = [(seq, batch)]
        self.calls = []

    def pop_batch(self, dev, max_n):
        self.calls.append((dev, max_n))
        if self.answers:
            seq, batch = self.answers.pop()
            return seq, batch[:max_n]
        return seq, []


_TAILS = [wire.py_deliver_tail(SENDER_PACKED, MID, b"b" * i, TS_PACKED, i & 1) for i in range(4)]


@pytest.mark.parametrize("seq,batch,max_n", [
    (1, [], 8),
    (1, [(5, _TAILS[0])], 8),                       # one message: the relay's common pull
    (9, [(i, t) for i, t in enumerate(_TAILS)], 8),
    (9, [(i, t) for i, t in enumerate(_TAILS)], 2),  # popped no more than max_n
    (3, [(0, _TAILS[1]), (7, _TAILS[2], b"\x96\xcd\x03\xee")], 8),  # a DDELIVER-shaped op last
    (3, [(0, _TAILS[1]), (7, b"no timestamp")], 8),  # the newest tail has no ts_ms
    (3, [(0, b"\x00" * 10)], 8),                   # ten bytes, no uint64 marker
    (2**32 - 2, [(0, _TAILS[0])], 8),                # the last seq that fits
    (2**32 - 2, [(0, _TAILS[0]), (1, _TAILS[1])], 8),  # past it: nothing appended
    (1, [(0, "not bytes")], 8),                      # a bad payload: WrongType, as pack_delivers
    (4, [(3, _TAILS[0]), _TAILS[2]], 8),            # a signal's bare tail last: its ts_ms
    (4, [_TAILS[1], _TAILS[3]], 8),                 # signals only: mids 0
    (4, [_TAILS[1], b"no timestamp"], 8),           # the newest has no ts_ms
    (4, [(3, _TAILS[0]), wire.routed_tail(4, _TAILS[2])], 8),  # a routed tail last: its ts_ms
    # a routed tail too short to hold a ts_ms: its mid's bytes are not read as one
    (4, [wire.routed_tail(0xCF << 48, b"\xa1x\x00")], 8),
    (4, [wire.routed_tail(5, b"\x00" * 10)], 8),
])
def test_pull_round_twins_agree(seq, batch, max_n):
    def run(fn):
        def call(seq, batch):
            popper = _Popper(seq, batch)
            out = [b"queued before"]
            inflight = collections.deque([99])
            got = fn(popper, 7, out, inflight, max_n)
            return got, out, list(inflight), popper.calls
        return call

    got = _same(*map(_run_or_none(run), _both(delivery.py_pull_round)), seq, batch)
    # a signal's bare tail is (0, tail), a routed tail its (mid, tail)
    batch = [wire.route_parts(p) if type(p) is bytes else p for p in batch]
    if isinstance(got, Exception):
        assert isinstance(got, TypeError) and any(type(p[1]) is not bytes for p in batch)
        return
    (n, held, ts_ms), out, inflight, calls = got
    taken = batch[:max_n]
    assert calls == [(7, max_n)]
    if seq + len(taken) >= 2**32:
        assert (n, held, ts_ms) == (-1, 0, -1) and out == [b"queued before"] and inflight == [99]
        return
    assert n == len(taken)
    assert inflight == [99] + [p[0] for p in taken]
    assert out[0] == b"queued before" and len(out) == 1 + n
    # what the engine holds: each op past DELIVER's 7-byte head (+ the head's own)
    assert held == sum(len(p[1]) + (len(p[2]) - 2 if len(p) == 3 else 0) for p in taken)
    for i, p in enumerate(taken):
        assert out[1 + i].endswith(p[1]) and int.from_bytes(
            out[1 + i][-len(p[1]) - 4:-len(p[1])], "big") == seq + i
    newest = taken[-1][1] if taken else b""
    assert ts_ms == (TS if newest in _TAILS else -1)


@pytest.mark.parametrize("max_n", [1, 2, 8])
def test_pull_round_pops_the_compiled_engine_as_its_specification_does(max_n):
    # the compiled pull_round pops a compiled Router's mailbox without a
    # Python call: the same payloads, seqs, mids and bytes as the
    # specification, which calls pop_batch, and the same engine afterwards
    if _core is None:
        pytest.skip("the compiled core is switched off")
    payloads = [(5, _TAILS[0]), _TAILS[1], (7, _TAILS[2], b"\x96\xcd\x03\xee"),
                (8, b"no timestamp"), (9, _TAILS[3]), wire.routed_tail(10, _TAILS[2])]
    results = []
    for fn in (delivery.py_pull_round, _core.pull_round):
        router = _core.Router(16)
        dev = router.add_device("r@home", "phone")
        router.route_flat([x for p in payloads for x in ("r@home", p)])
        out: list = [b"queued before"]
        inflight = collections.deque([99])
        rounds = []
        while True:
            got = fn(router, dev, out, inflight, max_n)
            rounds.append(got)
            if got[0] == 0:
                break
        # the ops (the compiled one packs a round's two or more as one OpRun)
        results.append((rounds, wire.flat_ops(out), list(inflight), router.pending(dev),
                        router.stats()))
    assert results[0] == results[1]
    rounds, out, inflight, pending, _ = results[0]
    assert [r[0] for r in rounds] == [len(payloads[i:i + max_n])
                                      for i in range(0, len(payloads), max_n)] + [0]
    assert inflight == [99, 5, 0, 7, 8, 9, 10] and pending == (0, len(payloads))
    # the last round's newest message, a routed tail: its timestamp read
    assert rounds[-2][2] == TS
    with pytest.raises(UnknownDevice):
        _core.pull_round(_core.Router(16), 42, [], collections.deque(), 1)


class _Acker:
    """An engine's ``ack`` and ``pending`` answering set values, calls recorded."""

    def __init__(self, released, queued):
        self.released, self.queued, self.calls = released, queued, []

    def ack(self, dev, upto):
        self.calls.append(("ack", dev, upto))
        return self.released

    def pending(self, dev):
        self.calls.append(("pending", dev))
        return self.queued, 0


@pytest.mark.parametrize("released,queued,inflight,seq,upto", [
    (0, 0, [4, 5], 10, 11),          # the engine released nothing: nothing else moves
    (2, 0, [4, 5], 10, 9),           # an ack below the feed's window
    (2, 0, [4, 5], 10, 11),          # everything outstanding, nothing queued: all bytes go
    (2, 3, [4, 5], 10, 11),          # everything outstanding, more queued: its share goes
    (1, 0, [0, 0, 7], 10, 10),       # part of them: their share of the popped bytes
    (3, 0, [0, 6, 0], 10, 40),       # an ack past the window takes what there is
    (1, 0, [0], 1, 1),               # a signal: no stored row
])
def test_ack_feed_twins_agree(released, queued, inflight, seq, upto):
    def run(fn):
        def call():
            router = _Acker(released, queued)
            feed = delivery.Feed(None, 3, 30, "bob@example.org", "phone")
            feed.inflight.extend(inflight)
            feed.inflight_seq, feed.inflight_bytes, feed.qbytes = seq, 900, 1500
            got = fn(router, feed, upto)
            return (got, list(feed.inflight), feed.inflight_seq, feed.inflight_bytes,
                    feed.qbytes, router.calls)
        return call

    got = _same(*map(_run_or_none(run), _both(delivery.py_ack_feed)))
    (n, mids, freed), left, new_seq, held, qbytes, calls = got
    k = min(upto - seq + 1, len(inflight))
    assert calls[0] == ("ack", 3, upto)
    if not released or k <= 0:
        assert (n, mids, freed, left, new_seq, held, qbytes) == (0, [], 0, inflight, seq, 900, 1500)
        return
    assert n == released and new_seq == seq + k and left == inflight[k:]
    assert mids == [m for m in inflight[:k] if m]
    want = 900 * k // len(inflight) if left else (1500 if not queued else 900)
    assert freed == want and held == 900 - min(want, 900) and qbytes == 1500 - want
    assert (("pending", 3) in calls) == (not left)


# -- SACKs ----------------------------------------------------------------------------

def test_sack_ok_op():
    want = wire.sack_op(MID, 0)
    assert _same(*_both(wire.py_sack_ok_op), MID) == want
    for bad in (MID[:15], MID + b"x", bytearray(MID), "x" * 16):
        assert isinstance(_same(*_both(wire.py_sack_ok_op), bad),
                          InvalidArgument)


def _table(impl, entries):
    """A dedup table of ``impl`` holding ``entries``: (sender, id, code, stamp, waiters)."""
    t = impl(30.0, 1000)
    for sender, cid, code, stamp, waiters in entries:
        t.begin(sender, cid, code, stamp)
        for w in waiters or ():
            t.wait(sender, cid, w)
    return t


def _contents(t):
    """Every entry as (key, (code, stamp), waiters); empties the table's waiters."""
    return [(k, t.get(*k), t.forget(*k)) for k in t.keys()]


def _twins():
    """The dedup table classes: (specification, compiled or None)."""
    return dedup.DedupWindow, _compiled.compiled_twin(dedup.DedupWindow)


def _stored_run(fn, impl, meta, entries):
    calls = []
    out: list = []

    def ack_all(*a):
        # as if the waiters were on the sender's own link: where their answer
        # lands among its SACKs is part of what is compared
        calls.append(a)
        out.append(b"waiters of " + a[1])

    table = _table(impl, entries)
    fn(copy.deepcopy(meta), "a@b.c", table, 12.5, out, ack_all)
    return wire.flat_ops(out), calls, _contents(table)


def test_stored_sacks():
    ids = [bytes([i]) * 16 for i in range(5)]
    meta = [x for cid in ids for x in (ADDR, b"tail", cid)]  # flat: to, tail, id
    entries = [("a@b.c", ids[0], PENDING, 1.0, None),
               ("a@b.c", ids[1], PENDING, 1.0, [("conn", ids[1])]),
               ("a@b.c", ids[3], PENDING, 2.0, [("c1", ids[3]), ("c2", ids[3])])]
    py, c = _twins()
    got = _stored_run(gate_mod.py_stored_sacks, py, meta, entries)
    if c is not None:
        assert _stored_run(_core.stored_sacks, c, meta, entries) == got
    out, calls, contents = got
    # each message's waiters are answered before its own SACK
    assert out == [wire.sack_op(ids[0], 0), b"waiters of " + ids[1], wire.sack_op(ids[1], 0),
                   wire.sack_op(ids[2], 0), b"waiters of " + ids[3], wire.sack_op(ids[3], 0),
                   wire.sack_op(ids[4], 0)]
    assert calls == [(None, ids[1], 0, [("conn", ids[1])]),
                     (None, ids[3], 0, [("c1", ids[3]), ("c2", ids[3])])]
    # every stored id is now decided at 12.5, absent ones recorded too
    assert [(k[1], v) for k, v, _ in contents] == [(cid, (0, 12.5)) for cid in
                                                   (ids[0], ids[1], ids[3], ids[2], ids[4])]
    # a short id, and a meta that is not whole triples
    for bad in ([ADDR, b"tail", ids[0][:15]], [ADDR, b"tail", ids[0], ADDR]):
        for fn, impl in ((gate_mod.py_stored_sacks, py), (c and _core.stored_sacks, c)):
            if fn is not None:
                with pytest.raises(InvalidArgument):
                    _stored_run(fn, impl, bad, [])


def test_flat_routes():
    # flat, for Router.route_flat: no tuple a pair, one (the payload) a message
    meta = [x for i in range(4) for x in ("u%d@p" % i, b"t%d" % i, ("s", b"%d" % i))]
    assert _same(*_both(gate_mod.py_flat_routes), meta, [10, 11, 12, 13]) == [
        x for i in range(4) for x in ("u%d@p" % i, (10 + i, b"t%d" % i))]
    # fewer mids than messages (a refused batch's tail): the first ones
    assert _same(*_both(gate_mod.py_flat_routes), meta, [7]) == ["u0@p", (7, b"t0")]
    assert _same(*_both(gate_mod.py_flat_routes), [], []) == []


# -- frames ------------------------------------------------------------------------------

def _ops(sizes):
    return [bytes([0xC4, 0]) if n == 2 else b"\xc5" + (n - 3).to_bytes(2, "big") + b"z" * (n - 3)
            for n in sizes]


LIMIT = wire.MAX_PLAINTEXT - 3


@pytest.mark.parametrize("sizes", [
    [], [2], [2] * 15, [2] * 16, [2] * 17, [LIMIT], [LIMIT, 2], [LIMIT - 2, 2],
    [LIMIT - 2, 2, 2], [30000, 30000, 5516, 3], [LIMIT + 1], [2, LIMIT + 1],
    [2] * 8192, [2] * 8193, [2] * 20000,
])
@pytest.mark.parametrize("limits", [(wire.MAX_PLAINTEXT, wire.MAX_OPS_PER_FRAME), (16, 1),
                                    (40000, 7), (15, 1), (wire.MAX_PLAINTEXT + 1, 1),
                                    (100, 0), (100, 8193)])
def test_pack_frames_twins(sizes, limits):
    ops = _ops(sizes)
    frames = _same(wire.py_pack_frames, _core and _core.pack_frames, ops, *limits)
    if isinstance(frames, Exception):
        assert isinstance(frames, InvalidArgument)
        return
    joined = []
    for f in frames:
        count = len(msgpack.unpackb(f))
        assert 1 <= count <= limits[1] and len(f) <= limits[0]
        joined.append(f[1 if count <= 15 else 3:])
    assert b"".join(joined) == b"".join(ops)


def _in_runs(ops, rng, run_cls):
    """``ops`` with random stretches of them joined into op runs (some empty)."""
    out, i = [], 0
    while i < len(ops):
        k = rng.choice([1, 1, 2, 3, 17, 300])
        part = ops[i:i + k]
        i += k
        if len(part) == 1 and rng.random() < 0.5:
            out.append(part[0])
        else:
            ends, at = [], 0
            for op in part:
                at += len(op)
                ends.append(at)
            out.append(run_cls(b"".join(part), ends))
        if rng.random() < 0.05:
            out.append(run_cls(b"", []))
    return out


@pytest.mark.parametrize("sizes", [
    [2] * 17, [LIMIT - 2, 2, 2], [30000, 30000, 5516, 3], [2] * 8193, [2, LIMIT + 1],
    [2, 3, 40, 2, 100, 7, 2] * 50,
])
@pytest.mark.parametrize("limits", [(wire.MAX_PLAINTEXT, wire.MAX_OPS_PER_FRAME), (16, 1),
                                    (40000, 7), (120, 5)])
def test_pack_frames_reads_op_runs_as_their_ops(sizes, limits):
    # a run is split between frames exactly where its ops would have been:
    # the same frames, byte for byte, as from the ops one by one
    rng = random.Random(len(sizes) * 1000 + limits[1])
    ops = _ops(sizes)
    want = _same(wire.py_pack_frames, None, ops, *limits)
    for run_cls in {wire.PyOpRun, wire.OpRun}:
        mixed = _in_runs(ops, rng, run_cls)
        assert wire.flat_ops(mixed) == ops
        assert wire.py_op_count(mixed) == len(ops)
        if run_cls is wire.OpRun:  # the compiled count knows its own runs
            assert wire.op_count(mixed) == len(ops)
        for fn in (wire.py_pack_frames, wire.pack_frames):
            got = _same(fn, None, mixed, *limits)
            if isinstance(want, Exception):
                assert type(got) is type(want)
            else:
                assert got == want


def test_op_runs_check_their_ends():
    for cls in {wire.PyOpRun, wire.OpRun}:
        run = cls(b"abcdef", [1, 3, 6])
        assert (len(run), run.count, run.data) == (3, 3, b"abcdef")
        assert run.ops() == [b"a", b"bc", b"def"]
        assert cls(b"", []).ops() == []
        for data, ends in ((b"abc", [1, 1, 3]), (b"abc", [2]), (b"abc", [0, 3]),
                           (b"abc", [4])):
            with pytest.raises(InvalidArgument):
                cls(data, ends)
        with pytest.raises(WrongType):
            cls(bytearray(b"abc"), [3])


def test_pack_frames_other_buffers_fall_back():
    ops = [b"\x91\x04", bytearray(b"\x91\x04"), memoryview(b"\x91\x04")]
    if fastroute.COMPILED:
        assert _core.pack_frames(ops) is None
    assert wire.pack_frames(ops) == wire.py_pack_frames(ops) == [b"\x93" + b"\x91\x04" * 3]
    assert wire.pack_frames(tuple(ops)) == wire.py_pack_frames(ops)


# -- client frames: the SEND fast path --------------------------------------------------

def _send(cid=MID, to=ADDR, body=b"hello", cls=0):
    return msgpack.packb((1, cid, to, body, cls), use_bin_type=True)


def _frame(ops, header=None):
    return (header or wire._array_header(len(ops))) + b"".join(ops)


def _check_decode(plaintext):
    """C (if built) either declines or agrees with the Python decoder."""
    try:
        want = wire.decode_client_frame_precise(plaintext)
    except ProtocolError as exc:
        want = exc
    for fn in _both(wire.py_decode_sends):
        got = fn and fn(plaintext, wire._ADDR_OK)
        if got is not None:
            # flat: id, to, body, cls a SEND, in the frame's order
            assert not isinstance(want, Exception), plaintext[:64]
            assert len(got) == 4 * len(want)
            assert got == [field for op in want for field in op[1:]]
            assert all(op[0] == 1 for op in want)
    try:
        public = wire.decode_client_frame(plaintext)
    except ProtocolError as exc:
        assert isinstance(want, ProtocolError) and exc.code == want.code
    else:
        assert public == want
    return want


@pytest.fixture(autouse=True)
def _known_recipient():
    wire._ADDR_OK.add(ADDR)


FAST_FRAMES = [
    _frame([]),
    _frame([_send()]),
    _frame([_send(cls=1)] * 15),
    _frame([_send(body=bytes(n)) for n in (0, 1, 255, 256, 4096, 65535 - 64, wire.MAX_BODY)
            if n <= wire.MAX_BODY][:3]),
    _frame([_send(body=bytes(wire.MAX_BODY))]),
    _frame([_send(cid=bytes([i]) * 16) for i in range(16)]),
    _frame([_send()] * 3, header=b"\xdd\x00\x00\x00\x03"),
]


@pytest.mark.parametrize("plaintext", FAST_FRAMES)
def test_decode_sends_fast_frames(plaintext):
    ops = _check_decode(plaintext)
    assert all(op[0] == 1 for op in ops)
    if fastroute.COMPILED:
        assert _core.decode_sends(plaintext, wire._ADDR_OK) is not None


@pytest.mark.skipif(_core is None, reason="the compiled decoder's run; the spec gives a list")
def test_decode_sends_run_reads_as_the_flat_list():
    # what the link and the gate do with a decoded frame of SENDs: lengths,
    # items, slices of whole SENDs (runs again) and any other slice, unpacking
    ops = [(1, bytes([i]) * 16, ADDR, bytes([i]) * i, i & 1) for i in range(6)]
    run = _core.decode_sends(msgpack.packb([list(op) for op in ops]), wire._ADDR_OK)
    flat = _flat_sends(ops)
    assert type(run) is not list and run == flat and flat == run.tolist()
    assert not (run != flat) and run != flat[:-1] and run != "text"
    assert len(run) == 24 and bool(run) and list(run) == flat
    assert [run[i] for i in range(-24, 24)] == flat + flat
    for a, b in ((0, 24), (4, 12), (8, 8), (12, 4), (0, 100), (20, 24), (-8, 24)):
        part = run[a:b]
        assert part == flat[a:b] and len(part) == len(flat[a:b])
        assert type(part) is type(run)  # whole SENDs: a run over the same frame
        assert part[0:4] == flat[a:b][0:4] and part[4:] == flat[a:b][4:]
    for sl in (slice(0, 24, 4), slice(1, 7), slice(3, None, 4), slice(None, None, -1)):
        assert run[sl] == flat[sl] and type(run[sl]) is list
    assert [tuple(run[k:k + 4]) for k in range(0, 24, 4)] == [op[1:] for op in ops]
    assert not run[8:8] and len(run[8:8]) == 0
    with pytest.raises(IndexError):
        run[24]
    with pytest.raises(IndexError):
        run[-25]
    assert copy.deepcopy(run) == flat and type(copy.deepcopy(run)) is list
    assert _core.decode_sends(msgpack.packb([]), wire._ADDR_OK) == []


@pytest.mark.skipif(_core is None, reason="the compiled decoder's run; the spec gives a list")
def test_field_set_reads_a_runs_recipients_as_the_flat_lists():
    # the sender screen's first question, on a frame as the compiled decoder
    # read it: its distinct recipients (and any other field, the same way)
    for tos in (["a@x.org", "b@x.org", "a@x.org", "a@x.org", "c@y.net"], ["a@x.org"], []):
        for t in tos:
            wire._ADDR_OK.add(t)
        ops = [(1, bytes([i]) * 16, t, b"b%d" % i, i & 1) for i, t in enumerate(tos)]
        run = _core.decode_sends(msgpack.packb([list(op) for op in ops]), wire._ADDR_OK)
        flat = _flat_sends(ops)
        for index, step in ((1, 4), (0, 4), (2, 4), (3, 4), (1, 2)):
            want = gate_mod.py_field_set(flat, index, step)
            assert _core.field_set(run, index, step) == want
            assert _core.field_set(run[4:], index, step) == gate_mod.py_field_set(
                flat[4:], index, step)
        assert _core.field_set(run, 1, 4) == set(tos)


def _exactly(size):
    """A frame of SENDs exactly ``size`` bytes long (array16 header)."""
    one = _send(body=bytes(1000))
    n = (size - 3) // len(one)
    rest = size - 3 - n * len(one) - len(_send(body=b""))
    ops = [one] * n + [_send(body=bytes(rest - (1 if rest > 255 else 0)))]
    frame = b"\xdc" + len(ops).to_bytes(2, "big") + b"".join(ops)
    return frame


@pytest.mark.parametrize("size", [wire.MAX_PLAINTEXT, wire.MAX_PLAINTEXT + 1])
def test_decode_sends_frame_size_limit(size):
    frame = _exactly(size)
    assert len(frame) == size
    got = _check_decode(frame)
    if size > wire.MAX_PLAINTEXT:
        assert isinstance(got, ProtocolError) and got.code == ErrorCode.FRAME_TOO_LARGE
    elif fastroute.COMPILED:
        assert _core.decode_sends(frame, wire._ADDR_OK) is not None


SLOW_FRAMES = [
    b"",
    b"\xc0",
    b"\x81\xa1a\x01",
    _frame([_send()]) + b"\x00",                       # trailing byte
    _frame([_send()])[:-1],                            # truncated
    _frame([_send(body=bytes(wire.MAX_BODY + 1))]),    # body too large (per op)
    _frame([_send(cls=2)]),
    _frame([_send(cls=True)]),
    _frame([_send(cid=MID[:15])]),
    _frame([_send(cid="x" * 16)]),
    _frame([_send(to="carol@example.org")]),           # not yet cached: precise check
    _frame([_send(to="not an address")]),
    _frame([_send()[:-1] + b"\xcc\x01"]),              # cls as uint8
    _frame([b"\x95\xcc\x01" + _send()[2:]]),           # opcode as uint8
    _frame([_send(), wire.dack_op(3)]),
    _frame([_send(), wire.bye_op()]),
    _frame([wire.ping_op(1)]),
    _frame([b"\x95\x01\xc4\x10" + MID + b"\xa3\xff\xfe\xfd\xc4\x00\x00"]),  # bad UTF-8
    _frame([b"\x95\x01\xc4\x10" + MID + b"\xd9\x05" + b"a@b.c" + b"\xc4\x00\x00"]),  # str8
    _frame([_send()] * 3, header=b"\xdc\x00\x04"),     # count says 4
    _frame([_send()] * 3, header=b"\xdc\x00\x02"),     # count says 2
    b"\xdd\x00\x00\x20\x01" + _send() * 8193,          # too many ops
    bytearray(_frame([_send()])),
]


@pytest.mark.parametrize("plaintext", SLOW_FRAMES)
def test_decode_sends_declines_the_rest(plaintext):
    _check_decode(bytes(plaintext) if isinstance(plaintext, bytearray) else plaintext)
    if isinstance(plaintext, bytearray):
        wire.decode_client_frame(plaintext)  # other buffers keep working


def _mutants(rng: random.Random, base: list[bytes], n: int = 3000):
    """``n`` frames from ``base`` with 1-3 bytes changed, a fifth of them cut short."""
    for _ in range(n):
        data = bytearray(rng.choice(base))
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.2:
            del data[rng.randrange(len(data)):]
        yield bytes(data)


def test_decode_sends_fuzz():
    rng = random.Random(1234)
    base = [_frame([_send(cid=bytes([i]) * 16, body=bytes(rng.randrange(300)), cls=i & 1)
                    for i in range(k)]) for k in (1, 2, 5, 17)]
    for data in _mutants(rng, base):
        _check_decode(data)


@pytest.mark.parametrize("step", [1, 3, 64])
def test_client_frame_checked_a_slice_at_a_time_is_the_precise_decode(step):
    # the link checks a long frame's ops a share at a time: the slices,
    # joined, must be exactly what the precise decoder gives for the frame
    rng = random.Random(step)
    ops = [_send(), wire.ping_op(5), wire.dack_op(3), _send(to="bad"), msgpack.packb((3, "x")),
           wire.consent_op(MID, "acme", True), msgpack.packb((999, 1)), _send(cls=1)]
    for _ in range(200):
        plaintext = _frame([rng.choice(ops) for _ in range(rng.randrange(1, 40))])
        want = wire.decode_client_frame_precise(plaintext)
        frame, good = wire.unpack_client_frame(plaintext)
        got = []
        for start in range(0, len(frame), step):
            got += wire.check_client_ops(frame, start, min(start + step, len(frame)), good)
        assert got == want


def _check_uint_ops(plaintext, spec, opcode):
    """Both twins of a decoder of ``[opcode, uint]`` frames (``spec``) either
    decline or give exactly the second fields of the precise decoder's ops,
    which must then all be valid ops ``opcode``."""
    try:
        want = wire.decode_client_frame_precise(plaintext)
    except ProtocolError as exc:
        want = exc
    answers = []
    for fn in _both(spec):
        got = fn and fn(plaintext)
        if got is not None:
            assert not isinstance(want, Exception), plaintext[:64]
            assert all(type(op) is tuple and op[0] == opcode for op in want)
            assert got == [op[1] for op in want]
            assert all(type(t) is int for t in got)
        answers.append(got)
    return answers


def _check_pings(plaintext):
    return _check_uint_ops(plaintext, wire.py_decode_pings, wire.Op.PING)


def _check_dacks(plaintext):
    return _check_uint_ops(plaintext, wire.py_decode_dacks, wire.Op.DACK)


PING_FRAMES = [
    _frame([wire.ping_op(t) for t in (0, 1, 127, 128, 255, 256, 65535, 65536, 1 << 32,
                                      (1 << 62), (1 << 64) - 1)]),
    _frame([wire.ping_op(7)] * 2000),
    _frame([wire.ping_op(3)] * 3, header=b"\xdd\x00\x00\x00\x03"),
]


@pytest.mark.parametrize("plaintext", [
    _frame([wire.ping_op(1), wire.dack_op(1)]),
    _frame([wire.ping_op(1), _send()]),
    _frame([wire.ping_op(-1)]),                     # negative: C declines, spec answers
    _frame([msgpack.packb((3, "x"))]),              # not an int token
    _frame([msgpack.packb((3, True))]),             # bool is no token
    _frame([msgpack.packb((3, 1, 2))]),             # extra field
    _frame([msgpack.packb((3,))]),
    _frame([wire.ping_op(1)] * 3, header=b"\xdc\x00\x04"),   # count says 4
    _frame([wire.ping_op(1)] * 3, header=b"\xdc\x00\x02"),   # count says 2
    b"\xdd\x00\x00\x20\x01" + wire.ping_op(1) * 8193,         # too many ops
    b"\x81\x01\x02",                                            # not an array
])
def test_decode_pings_declines_or_agrees(plaintext):
    py, c = _check_pings(plaintext)
    if plaintext != _frame([wire.ping_op(-1)]):
        assert py is None and c is None


DACK_FRAMES = [
    _frame([wire.dack_op(t) for t in (0, 1, 127, 128, 255, 256, 65535, 65536, 1 << 32,
                                      (1 << 62), (1 << 64) - 1)]),
    _frame([wire.dack_op(7)]),
    _frame([wire.dack_op(3)] * 3, header=b"\xdd\x00\x00\x00\x03"),
]


@pytest.mark.parametrize("plaintext", [
    _frame([wire.dack_op(1), wire.ping_op(1)]),
    _frame([_send(), wire.dack_op(1)]),
    _frame([msgpack.packb((2, -1))]),               # negative: an error, for the precise path
    _frame([msgpack.packb((2, "x"))]),
    _frame([msgpack.packb((2, True))]),             # bool is no seq
    _frame([msgpack.packb((2, 1, 2))]),             # extra field
    _frame([msgpack.packb((2,))]),
    _frame([wire.dack_op(1)] * 3, header=b"\xdc\x00\x04"),   # count says 4
    b"\x81\x01\x02",                                            # not an array
])
def test_decode_dacks_declines_other_frames(plaintext):
    assert _check_dacks(plaintext) == [None, None]  # spec and compiled twin decline


def test_decode_dacks_fuzz():
    rng = random.Random(8765)
    base = [_frame([wire.dack_op(rng.randrange(1 << rng.choice((6, 8, 16, 32, 64))))
                    for _ in range(k)]) for k in (1, 2, 5)]
    for data in _mutants(rng, base):
        _check_dacks(data)


def test_decode_pings_fuzz():
    rng = random.Random(4321)
    base = [_frame([wire.ping_op(rng.randrange(1 << rng.choice((6, 8, 16, 32, 64))))
                    for _ in range(k)]) for k in (1, 2, 5, 17)]
    for data in _mutants(rng, base):
        _check_pings(data)


def _check_offsets(plaintext):
    """Both twins of frame_offsets either decline or give offsets whose slices
    unpack to exactly the frame's ops (the spec declines only a frame the
    precise decoder refuses as a whole)."""
    try:
        whole = wire._unpack_frame(plaintext)
    except ProtocolError:
        whole = None
    answers = []
    for fn in _both(wire.py_frame_offsets):
        got = fn and fn(plaintext)
        if got is not None:
            got = list(got)
            assert whole is not None, plaintext[:64]
            assert len(got) == len(whole) + 1 and got[-1] == len(plaintext)
            for i, op in enumerate(whole):
                one = wire._array_header(1) + plaintext[got[i]:got[i + 1]]
                assert wire._unpack_frame(one) == (op,)
            chunk = wire.PackedOps(plaintext, got).unpack(0, len(whole))
            assert chunk == whole
        elif fn is wire.py_frame_offsets:
            assert whole is None
        answers.append(got)
    return answers


OFFSET_FRAMES = [
    _frame([_send(), wire.ping_op(5), wire.dack_op(3), wire.consent_op(MID, "acme", True),
            msgpack.packb((999, 1.5, None, False, [1, [2, [3]]], -7, -(1 << 40), 1 << 63)),
            msgpack.packb((3, "x" * 1024)), msgpack.packb((2, b"y" * 3000))]),
    _frame([_send(to="bad")] * 3, header=b"\xdd\x00\x00\x00\x03"),
    _frame([wire.ping_op(7)] * 2000),
]


@pytest.mark.parametrize("check, plaintext",
                         [(_check_pings, f) for f in PING_FRAMES]
                         + [(_check_dacks, f) for f in DACK_FRAMES]
                         + [(_check_offsets, f) for f in OFFSET_FRAMES],
                         ids=lambda v: getattr(v, "__name__", None) or f"{len(v)}B")
def test_fast_scans_answer_their_frames(check, plaintext):
    # decode_pings and decode_dacks on frames of their ops only, frame_offsets
    # on frames of plain values: the spec answers, and the compiled twin too
    py, c = check(plaintext)
    assert py is not None
    if fastroute.COMPILED:
        assert c == py


@pytest.mark.parametrize("plaintext", [
    _frame([msgpack.packb((3, {"a": 1}))]),           # a map: C declines, spec answers
    _frame([msgpack.packb((3, msgpack.ExtType(5, b"x")))]),  # an ext: the same
    _frame([msgpack.packb((3, "é"))]),                # past ASCII: the same
    _frame([msgpack.packb((3, "x" * 1025))]),         # too long a str: both decline
    _frame([wire.ping_op(1)] * 3, header=b"\xdc\x00\x04"),   # count says 4
    _frame([wire.ping_op(1)] * 3, header=b"\xdc\x00\x02"),   # count says 2
    b"\xdd\x00\x00\x20\x01" + wire.ping_op(1) * 8193,         # too many ops
    b"\x81\x01\x02",                                            # not an array
    _frame([b"\xc1"]),                                        # the reserved byte
    _frame([b"\x91" * 20 + b"\x01"]),                        # deep: C declines
    _frame([b"\xc4\x05ab"]),                                  # a bin cut short
])
def test_frame_offsets_declines_or_agrees(plaintext):
    py, c = _check_offsets(plaintext)
    if fastroute.COMPILED:
        assert c is None


def test_frame_offsets_fuzz():
    rng = random.Random(2468)
    base = [_frame([rng.choice([_send(), wire.ping_op(rng.randrange(1 << 40)), wire.dack_op(2),
                                wire.consent_op(MID, "acme", rng.random() < 0.5),
                                msgpack.packb((7, [1.5, None, [b"z"]]))])
                    for _ in range(k)]) for k in (1, 2, 5, 17, 70)]
    for data in _mutants(rng, base):
        _check_offsets(data)


@needs_c
def test_a_long_frame_is_unpacked_by_the_slice():
    # past LAZY_MIN_OPS the relay unpacks only the slice it checks; the
    # slices, joined, are the precise decode (invalid ops answered in place)
    ops = [_send(), wire.ping_op(5), _send(to="bad"), msgpack.packb((3, "x")),
           wire.consent_op(MID, "acme", True), msgpack.packb((999, 1))]
    rng = random.Random(5)
    plaintext = _frame([rng.choice(ops) for _ in range(wire.LAZY_MIN_OPS * 3)])
    frame, good = wire.unpack_client_frame(plaintext)
    assert type(frame) is wire.PackedOps and good == 0
    assert len(frame) == wire.LAZY_MIN_OPS * 3
    got = []
    for start in range(0, len(frame), 32):
        got += wire.check_client_ops(frame, start, min(start + 32, len(frame)), good)
    assert got == wire.decode_client_frame_precise(plaintext)
    short = _frame([rng.choice(ops) for _ in range(wire.LAZY_MIN_OPS)])
    assert type(wire.unpack_client_frame(short)[0]) is tuple


# -- the gate loop ------------------------------------------------------------------------

def _flat_sends(ops: list) -> list:
    """SEND tuples ``(1, id, to, body, cls)`` as the gate takes them: flat,
    ``id, to, body, cls`` each."""
    return [field for op in ops for field in op[1:]]


def _as_run(ops: list):
    """SEND tuples as the compiled decoder gives a frame of them: a run read
    in place (the flat list's items, made only when asked for)."""
    run = _core.decode_sends(msgpack.packb([list(op) for op in ops]),
                             {op[2] for op in ops})
    assert run is not None and type(run) is not list and run == _flat_sends(ops)
    return run


def _gate_case(fn, impl, gate_cls, link_cls, as_run=False):
    def call(sends, state):
        state = copy.deepcopy(state)
        out = []
        counted = []
        tapped = []
        store_items = []
        meta = []
        taps = [lambda *a: tapped.append(a)] if state["taps"] else []
        table = _table(impl, state["entries"])
        gate = gate_cls(state["known"], table, state["consent"], taps, counted.append,
                        wire.sack_op, (ErrorCode.BODY_TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT,
                                       ErrorCode.CONSENT_REQUIRED, ErrorCode.RATE_LIMITED),
                        state.get("blocks", {}))
        lg = link_cls("conn", out, "alice@example.org", SENDER_PACKED, "example.org", 1000,
                      None, None)
        lg.msg_tokens, lg.byte_tokens = state["mt"], state["bt"]
        ephemeral = fn(gate, lg, _as_run(sends) if as_run else _flat_sends(sends), 100.0, TS,
                       TS_PACKED, store_items, meta, state.get("first_mid"))
        res = (ephemeral, lg.msg_tokens, lg.byte_tokens)
        return res, out, counted, tapped, store_items, meta, _contents(table)
    return call


@pytest.mark.parametrize("require_consent", [False, True])
@pytest.mark.parametrize("tokens", [(1000.0, 1e9), (3.0, 1e9), (1000.0, 2000.0), (0, 0),
                                    (5, 10**6)])
@pytest.mark.parametrize("taps", [False, True])
@pytest.mark.parametrize("first_mid", [None, 500])
@pytest.mark.parametrize("as_run", [False, True])
def test_accept_sends_twins(require_consent, tokens, taps, first_mid, as_run):
    ids = [bytes([i]) * 16 for i in range(12)]
    sends = [
        (1, ids[0], ADDR, b"a" * 10, 0),
        (1, ids[1], ADDR, b"b" * 1001, 0),                 # too large
        (1, ids[2], "nobody@example.org", b"c", 0),      # unknown recipient
        (1, ids[3], "carol@other.net", b"d" * 500, 0),    # other provider: consent
        (1, ids[4], "dave@other.net", b"e", 1),           # consents to example.org
        (1, ids[5], "erin@other.net", b"f", 0),           # consents to "*"
        (1, ids[6], ADDR, b"", 1),                        # ephemeral
        (1, ids[7], ADDR, b"g", 0),                       # duplicate: pending
        (1, ids[8], ADDR, b"h", 0),                       # duplicate: decided, recent
        (1, ids[9], ADDR, b"i", 0),                       # duplicate: decided, expired
        (1, ids[0], ADDR, b"a" * 10, 0),                  # duplicate within the read
        (1, ids[10], ADDR, b"j" * 999, 1),
        (1, ids[11], "ghost@other.net", b"k", 0),       # unknown, other provider
    ]
    state = {
        "known": {ADDR: [1, 2], "carol@other.net": [3], "dave@other.net": [4],
                  "erin@other.net": [5]},
        "entries": [("alice@example.org", ids[7], PENDING, 99.0, None),
                    ("alice@example.org", ids[8], 0, 80.0, None),
                    ("alice@example.org", ids[9], 17, 10.0, None)],
        "consent": ({"dave@other.net": frozenset({"example.org"}),
                     "erin@other.net": frozenset({"*"})} if require_consent else None),
        "mt": tokens[0], "bt": tokens[1], "taps": taps, "first_mid": first_mid,
    }
    py, c = _twins()
    got = _same(_gate_case(gate_mod.py_accept_sends, py, gate_mod.PySendGate,
                           gate_mod.PyLinkGate),
                c and _gate_case(_core.accept_sends, c, _core.SendGate, _core.LinkGate,
                                 as_run),
                sends, state)
    (ephemeral, mt, bt), out, counted, tapped, store_items, meta, contents = got
    entries = {k[1]: (v, w) for k, v, w in contents}
    assert entries[ids[7]] == ((PENDING, 99.0), [("conn", ids[7])])
    if tokens == (1000.0, 1e9) and first_mid is not None:
        # a store that takes the batch at once: decided, SACKed and routed here
        want = [0, 5, 9] if require_consent else [0, 3, 5, 9]
        assert meta[0::2] == [sends[i][2] for i in want]  # flat: to, route
        # each route one object, its routed tail: (mid, tail) with no tuple
        assert all(wire.is_routed(p) for p in meta[1::2])
        parts = [wire.route_parts(p) for p in meta[1::2]]
        assert [m for m, _ in parts] == list(range(500, 500 + len(want)))
        assert all(t.startswith(SENDER_PACKED) for _, t in parts)
        assert [wire.routed_tail(m, t) for m, t in parts] == meta[1::2]
        # the store gets each route itself, after its recipient's device keys,
        # and the route's tail holds what a load gives back
        assert store_items[0::2] == [state["known"][sends[i][2]] for i in want]
        assert all(r is p for r, p in zip(store_items[1::2], meta[1::2], strict=True))
        assert [wire.py_tail_fields(t) for _, t in parts] == [
            ("alice@example.org", ids[i], sends[i][3], TS) for i in want]
        assert entries[ids[0]] == ((0, 100.0), None)  # no second pass to decide it
        assert entries[ids[9]] == ((0, 100.0), None)
        # each stored one SACKed once, the duplicate of ids[0] within the read too
        sacks = [op for op in out if op == wire.sack_op(ids[0], 0)]
        assert len(sacks) == 2 and all(wire.sack_op(ids[i], 0) in out for i in want)
    elif tokens == (1000.0, 1e9):
        want = [0, 5, 9] if require_consent else [0, 3, 5, 9]
        # for put_tails: each message's device keys, then its DELIVER tail,
        # the very object routed (meta's), which holds what the store keeps
        assert store_items[0::2] == [state["known"][sends[i][2]] for i in want]
        assert all(t is m for t, m in zip(store_items[1::2], meta[1::3], strict=True))
        assert [wire.py_tail_fields(t) for t in store_items[1::2]] == [
            ("alice@example.org", ids[i], sends[i][3], TS) for i in want]
        assert meta[0::3] == [sends[i][2] for i in want]  # flat: to, tail, id
        assert ephemeral[0::2] == ["dave@other.net", ADDR, ADDR]  # flat: to, payload
        # a signal's payload is its DELIVER tail alone (mid 0, no tuple)
        assert all(type(t) is bytes and t.startswith(SENDER_PACKED) for t in ephemeral[1::2])
        assert entries[ids[0]] == ((PENDING, 100.0), [("conn", ids[0])])
        assert entries[ids[9]] == ((PENDING, 100.0), None)  # expired: taken anew
        assert entries[ids[6]] == ((0, 100.0), None)  # ephemeral: decided at once
        assert meta[2::3] == [ids[i] for i in want]
        assert wire.sack_op(ids[8], 0) in out
        # no enumeration: for a sender the address never accepted, unknown
        # answers like not opted in (the same code from the same check)
        assert counted == [ErrorCode.BODY_TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT] + (
            [ErrorCode.CONSENT_REQUIRED] * 2 if require_consent
            else [ErrorCode.UNKNOWN_RECIPIENT])
        assert len(tapped) == len(want) + 3 if taps else not tapped
    if tokens == (0, 0):
        assert not store_items and ephemeral is None
        assert (mt, bt) == (0, 0) and type(mt) is int


@pytest.mark.parametrize("require_consent", [False, True])
@pytest.mark.parametrize("as_run", [False, True])
def test_accept_sends_twins_blocks_answer_as_unknown(require_consent, as_run):
    # a block (of the sender's address or of its provider) gets the answer an
    # address that does not exist gets, whether consent is required or not
    ids = [bytes([i]) * 16 for i in range(8)]
    sends = [
        (1, ids[0], ADDR, b"a", 0),                       # blocks someone else: passes
        (1, ids[1], "grace@example.org", b"b", 0),       # blocked alice: as unknown
        (1, ids[2], "nobody@example.org", b"c", 0),      # unknown
        (1, ids[3], "erin@other.net", b"d", 0),           # consents "*", blocked provider
        (1, ids[4], "ghost@other.net", b"e", 0),          # unknown, other provider
        (1, ids[5], "dave@other.net", b"f", 1),           # consents, blocks others only
        (1, ids[6], "alice@example.org", b"g", 0),        # herself: a block never hides it
        (1, ids[7], "grace@example.org", b"h" * 2000, 0),  # too large comes first
    ]
    blocks = {ADDR: {"mallory@example.org"}, "grace@example.org": {"alice@example.org"},
              "erin@other.net": {"@example.org"}, "dave@other.net": {"@evil.net"},
              "alice@example.org": {"@example.org"}}
    state = {
        "known": {ADDR: [1], "grace@example.org": [2], "erin@other.net": [5],
                  "dave@other.net": [4], "alice@example.org": [6]},
        "entries": [],
        "consent": ({"dave@other.net": frozenset({"example.org"}),
                     "erin@other.net": frozenset({"*"})} if require_consent else None),
        "mt": 1000.0, "bt": 1e9, "taps": False, "blocks": blocks,
    }
    py, c = _twins()
    got = _same(_gate_case(gate_mod.py_accept_sends, py, gate_mod.PySendGate,
                           gate_mod.PyLinkGate),
                c and _gate_case(_core.accept_sends, c, _core.SendGate, _core.LinkGate,
                                 as_run),
                sends, state)
    (ephemeral, _, _), out, counted, _, store_items, meta, _ = got
    assert [wire.py_tail_fields(t)[1] for t in store_items[1::2]] == [ids[0], ids[6]]
    assert ephemeral[0::2] == ["dave@other.net"]
    other = ErrorCode.CONSENT_REQUIRED if require_consent else ErrorCode.UNKNOWN_RECIPIENT
    assert counted == [ErrorCode.UNKNOWN_RECIPIENT, ErrorCode.UNKNOWN_RECIPIENT, other, other,
                       ErrorCode.BODY_TOO_LARGE]
    # byte for byte: blocked and unknown get the same SACK (but for the id)
    assert out[0] == wire.sack_op(ids[1], ErrorCode.UNKNOWN_RECIPIENT)
    assert out[2] == wire.sack_op(ids[3], other) and out[3] == wire.sack_op(ids[4], other)


@pytest.mark.parametrize("as_run", [False, True])
@pytest.mark.parametrize("require_consent", [False, True])
def test_accept_sends_twins_read_a_recipient_again_after_python_code_ran(as_run,
                                                                          require_consent):
    # a run of SENDs to one recipient is decided by its first (blocks, known,
    # consent); a tap or a refusal's count is Python code, which may change
    # those tables: the next SEND of the run reads them again, as the
    # specification reads them for every SEND
    ids = [bytes([i]) * 16 for i in range(9)]
    TO = "carol@other.net"  # another provider's: consent applies
    sends = [(1, ids[i], TO, b"m%d" % i, 0) for i in range(9)]

    def call(fn, gate_cls, link_cls, impl, run):
        known = {TO: [1]}
        blocks: dict = {}
        consent = {TO: {"example.org"}} if require_consent else None
        log: list = []

        def tap(now_ms, sender, to, size, cls):
            log.append(("tap", size))
            taps_seen = sum(1 for e in log if e[0] == "tap")
            if taps_seen == 2:
                del known[TO]                          # the next is unknown
            elif taps_seen == 4:
                blocks[TO] = {"alice@example.org"}     # the next is hidden

        def count(code):
            log.append(("refused", int(code)))
            refusals = sum(1 for e in log if e[0] == "refused")
            if refusals == 1:
                known[TO] = [1]                        # known again
            elif refusals == 2:
                blocks.clear()
                if consent is not None:
                    consent.clear()                      # no consent: refused
            elif refusals == 3 and consent is not None:
                consent[TO] = {"*"}
        gate = gate_cls(known, _table(impl, []), consent, [tap], count, wire.sack_op,
                        (ErrorCode.BODY_TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT,
                         ErrorCode.CONSENT_REQUIRED, ErrorCode.RATE_LIMITED), blocks)
        out: list = []
        lg = link_cls("conn", out, "alice@example.org", SENDER_PACKED, "example.org", 1000,
                      None, None)
        lg.msg_tokens, lg.byte_tokens = 1000.0, 1e9
        items: list = []
        meta: list = []
        fn(gate, lg, _as_run(sends) if run else _flat_sends(sends), 100.0, TS, TS_PACKED,
           items, meta, None)
        return log, [wire.py_tail_fields(t)[1] for t in items[1::2]], out

    py, c = _twins()
    want = call(gate_mod.py_accept_sends, gate_mod.PySendGate, gate_mod.PyLinkGate, py, False)
    if c is not None:
        assert call(_core.accept_sends, _core.SendGate, _core.LinkGate, c, as_run) == want
    log, stored, _ = want
    unknown, needs = int(ErrorCode.UNKNOWN_RECIPIENT), int(ErrorCode.CONSENT_REQUIRED)
    assert [e[1] if e[0] == "refused" else "ok" for e in log] == (
        # another provider's address that is unknown or hides itself answers
        # as one that did not consent (no enumeration)
        ["ok", "ok", needs, "ok", "ok", needs, needs, "ok", "ok"] if require_consent
        else ["ok", "ok", unknown, "ok", "ok", unknown, "ok", "ok", "ok"])
    assert stored == [ids[i] for i in ((0, 1, 3, 4, 7, 8) if require_consent
                                       else (0, 1, 3, 4, 6, 7, 8))]


# -- relay frames: the SACK/DELIVER fast path (client side) --------------------------------

SENDER = "alice@example.org"


def _deliver(seq=1, sender=SENDER, cid=MID, body=b"hi", ts=TS, cls=0):
    return msgpack.packb((18, seq, sender, cid, body, ts, cls), use_bin_type=True)


def _check_server_decode(plaintext):
    try:
        want = wire.decode_server_frame_precise(plaintext)
    except ProtocolError as exc:
        want = exc
    for fn in _both(wire.py_decode_server_ops):
        got = fn and fn(plaintext, wire._ADDR_OK)
        if got is not None:
            assert not isinstance(want, Exception)
            assert got == want
            assert [type(x) for op in got for x in op] == [type(x) for op in want for x in op]
    try:
        public = wire.decode_server_frame(plaintext)
    except ProtocolError as exc:
        assert isinstance(want, ProtocolError) and exc.code == want.code
    else:
        assert public == want
    return want


SERVER_FAST = [
    _frame([]),
    _frame([wire.sack_op(MID, 0), wire.sack_op(MID, 2**32 + 5)]),
    _frame([_deliver(seq=s) for s in (0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1)]),
    _frame([b"\x97\x12\xce" + (2**32 - 1).to_bytes(4, "big")
            + wire.py_deliver_tail(msgpack.packb(SENDER), MID, bytes(n), TS_PACKED, 1)
            for n in (0, 255, 256, wire.MAX_BODY)]),
    _frame([_deliver(ts=0), _deliver(ts=2**64 - 1), wire.sack_op(MID, 17)] * 6),
]


@pytest.fixture
def _known_sender():
    wire._ADDR_OK.add(SENDER)


@pytest.mark.parametrize("plaintext", SERVER_FAST)
def test_decode_server_ops_fast(plaintext, _known_sender):
    _check_server_decode(plaintext)
    if fastroute.COMPILED:
        assert _core.decode_server_ops(plaintext, wire._ADDR_OK) is not None


SERVER_SLOW = [
    b"", b"\x90\x00", _frame([_deliver()])[:-1],
    _frame([_deliver(seq=-1)]), _frame([_deliver(cls=2)]), _frame([_deliver(ts=-5)]),
    _frame([_deliver(body=bytes(wire.MAX_BODY + 1))]), _frame([_deliver(cid=MID[:15])]),
    _frame([_deliver(sender="zed@nowhere.example")]), _frame([_deliver(sender="bad")]),
    _frame([msgpack.packb((17, MID, -1))]), _frame([msgpack.packb((17, MID))]),
    _frame([wire.pong_op(3)]), _frame([wire.welcome_op(SENDER, "phone", 1)]),
    _frame([wire.error_op(1, "x"), _deliver()]), _frame([_deliver(), wire.server_bye_op(0)]),
    _frame([_deliver(cls=True)]),
]


@pytest.mark.parametrize("plaintext", SERVER_SLOW)
def test_decode_server_ops_declines_the_rest(plaintext, _known_sender):
    _check_server_decode(plaintext)


def test_decode_server_ops_fuzz(_known_sender):
    rng = random.Random(99)
    base = [_frame([(_deliver(seq=rng.randrange(2**33), body=bytes(rng.randrange(300)))
                     if rng.random() < 0.7 else wire.sack_op(MID, rng.randrange(70)))
                    for _ in range(k)]) for k in (1, 3, 16)]
    for data in _mutants(rng, base):
        _check_server_decode(data)


# -- the client: SEND batches ----------------------------------------------------------------

POOL = bytes(range(256)) * 2


@pytest.mark.parametrize("cls", [0, 1])
@pytest.mark.parametrize("at", [0, 16, 40])
def test_pack_sends_twins(cls, at):
    bodies = [bytes([i]) * n for i, n in enumerate([0, 1, 31, 255, 256, 4096, wire.MAX_BODY])]
    to_packed = msgpack.packb(ADDR)

    def run(fn):
        def call(pool, at, bodies):
            pending = {b"old": 1}
            ids, ops = fn(pool, at, to_packed, bodies, cls, "target", pending)
            return ids, ops, pending
        return call

    ids, ops, pending = _same(*map(_run_or_none(run), _both(client_mod.py_pack_sends)),
                              POOL, at, bodies)
    assert ids == [POOL[at + 16 * i:at + 16 * i + 16] for i in range(len(bodies))]
    assert ops == [wire.send_op(cid, ADDR, body, cls) for cid, body in zip(ids, bodies)]
    assert list(pending.items()) == [(b"old", 1)] + [(cid, "target") for cid in ids]
    if fastroute.COMPILED:
        assert _core.pack_sends(POOL, at, to_packed, bodies, cls, None, None)[1] == ops


@pytest.mark.parametrize("bodies,at,cls,exc", [
    ([b"x", bytearray(b"y")], 0, 0, TypeError),
    ([b"x", "y"], 0, 0, TypeError),
    ([b"x", bytes(wire.MAX_BODY + 1)], 0, 0, BodyTooLarge),
    ([b"x"] * 33, 0, 0, InvalidArgument),              # pool has 32 ids
    ([b"x"], 512 - 15, 0, InvalidArgument),
    ([b"x"], -1, 0, InvalidArgument),
    ([b"x"], 0, 2, InvalidArgument),
])
def test_pack_sends_refusals(bodies, at, cls, exc):
    def run(fn):
        def call(bodies):
            pending = {}
            try:
                return fn(POOL, at, b"\xa3a@b", bodies, cls, None, pending)
            finally:
                assert pending == {}  # nothing registered on a refusal
        return call

    got = _same(*map(_run_or_none(run), _both(client_mod.py_pack_sends)), bodies)
    assert isinstance(got, exc)


# -- the client's DSEND -------------------------------------------------------------------

# every width msgpack has for an int, at both ends of each
DSEND_INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
              -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]


def _dsend_want(cid, to, entries, own):
    return msgpack.packb((1004, cid, to, False, [list(e) for e in entries],
                          [list(e) for e in own]), use_bin_type=True)


def _first_difference(got, want):
    """Where two packed ops part (pytest's own diff of 100 KB of bytes takes minutes)."""
    if got == want:
        return None
    if not isinstance(got, bytes):
        return f"got {type(got).__name__}"
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"at byte {at} of {len(want)}: {got[at:at + 12].hex()} vs {want[at:at + 12].hex()}"


def _pack_dsend_both(spec, *args):
    """The specification's answer; the compiled twin's, if built, must be the same."""
    want = spec(*args)
    if _core is not None:
        got = _core.pack_dsend(*args)
        assert _first_difference(got, want) is None
    return want


@pytest.mark.parametrize("seed", range(30))
def test_pack_dsend_twins_give_msgpack_bytes(seed, monkeypatch):
    rng = random.Random(seed)
    spec = client_mod.py_pack_dsend
    if fastroute.COMPILED:
        # these shapes are the compiled packer's own: it must not hand them on
        def handed_on(*args):
            raise AssertionError("pack_dsend handed a common shape to its specification")
        monkeypatch.setattr(client_mod, "py_pack_dsend", handed_on)

    def entry():
        body = bytes([seed]) * rng.choice([0, 1, 31, 255, 256, 300, 65535, 65536])
        e = (rng.choice(DSEND_INTS), rng.choice(DSEND_INTS), body)
        return e if rng.random() < 0.7 else list(e)

    def seq(n):
        items = [entry() for _ in range(n)]
        return items if rng.random() < 0.5 else tuple(items)

    entries = seq(rng.choice([0, 1, 3, 15, 16, 17]))
    own = seq(rng.choice([0, 1, 2, 16]))
    to = rng.choice(["b@h", "x" * 31 + "@h", "y" * 250 + "@h", "z" * 300 + "@h",
                     "élodie@höme", "\u4e16" * 40 + "@h"])
    cid = rng.choice([MID, MID[:7], bytes(300)])
    weight = sum(len(e[2]) + 16 for e in (*entries, *own))
    want = _dsend_want(cid, to, entries, own)
    for room in (weight, weight + 1, 1 << 30):
        got = _pack_dsend_both(spec, cid, to, entries, own, room)
        assert _first_difference(got, want) is None
    if weight:
        assert _pack_dsend_both(spec, cid, to, entries, own, weight - 1) is None


class _Entry(tuple):
    """A tuple subclass: the compiled packer hands it to the specification."""


@pytest.mark.parametrize("entries,exc", [
    ([_Entry((1, 11, b"x"))], None),
    ([(True, 11, b"x")], None),                 # msgpack packs a bool as a bool
    ([(1, 11, bytearray(b"x"))], None),
    ([(1, 2**64 - 1, b"x")], None),            # uint64: past what C reads as signed
    ([(1, 2**64, b"x")], OverflowError),
    ([(1, 11)], IndexError),
    ([5], TypeError),
    ([(1, 11, "text")], None),                 # packed as a str, as msgpack does
])
def test_pack_dsend_other_shapes_as_the_specification(entries, exc, monkeypatch):
    spec = client_mod.py_pack_dsend
    handed = []

    def counted(*args):
        handed.append(args)
        return spec(*args)

    monkeypatch.setattr(client_mod, "py_pack_dsend", counted)
    got = _same(spec, _core and _core.pack_dsend, MID, "b@h", entries, [], 1 << 20)
    assert len(handed) == (1 if fastroute.COMPILED else 0)  # the compiled one handed it on
    if exc is None:
        assert got == msgpack.packb((1004, MID, "b@h", False, [list(e) for e in entries], []),
                                    use_bin_type=True)
    else:
        assert isinstance(got, exc)
    # a str the UTF-8 codec refuses: msgpack's own error, from both
    assert isinstance(_same(spec, _core and _core.pack_dsend, MID, "\ud800", [(1, 1, b"")],
                            [], 1 << 20), UnicodeEncodeError)


def test_pack_dsends_twins_cut_the_same_ids_and_pack_the_same_ops():
    pool = bytes(range(256)) * 2
    body = b"c" * 40
    heavy = [(1, 11, bytes(600)), (2, 12, bytes(600))]
    shapes = [
        ("b@h", [(1, 11, body)]), ["b@h", ((1, 11, body), [2, 12, body])],
        ("b@h", [(1, 11, body)], [(3, 13, body)]), ("b@h", [], ()),
        ("b@h", heavy),                                  # over the room: None
        ("b@h", iter([(1, 11, body)])),                  # not a list or tuple: None
        ("b@h", [iter((1, 11, body))]),                  # an entry to be read: None
        ("b@h", [_Entry((1, 11, body))]),                # a tuple subclass: None
        ("b@h", [(True, 11, body)]),                     # packed by the specification
        ("b@h", [(1, 11, body)], [(3, 13, body)], "extra"),  # four fields: None
        {"to": "b@h"}, ("b@h",), "b@h",                  # not a message: None
        (5, [(1, 11, body)]),                            # msgpack packs the int
    ]
    for messages in (shapes, tuple(shapes), [], shapes[:1] * 20):
        ids, ops = _same(client_mod.py_pack_dsends, _core and _core.pack_dsends,
                         pool, 16, messages, 1000)
        assert ids == [pool[16 + 16 * i:32 + 16 * i] for i in range(len(messages))]
        assert len(ops) == len(messages)
        for m, cid, op in zip(messages, ids, ops):
            if op is not None:
                assert msgpack.unpackb(op) == [1004, cid, m[0], False,
                                               [list(e) for e in m[1]],
                                               [list(e) for e in (m[2] if len(m) > 2 else ())]]
    assert [op is None for op in ops] == [False] * 20
    assert [op is None for op in _same(client_mod.py_pack_dsends, _core and _core.pack_dsends,
                                       pool, 0, shapes, 1000)[1]] == [
        False, False, False, False, True, True, True, True, False, True, True, True, True,
        False]
    # a pool too short, a bad entry: the specification's answers
    for args in ((pool[:40], 16, shapes[:3], 1000), (pool, 0, [("b@h", [(1, 11)])], 1000)):
        _same(client_mod.py_pack_dsends, _core and _core.pack_dsends, *args)
    if _core is not None:  # a generator of messages (read once: not deep-copied)
        assert (_core.pack_dsends(pool, 0, (m for m in shapes[:3]), 1000)
                == client_mod.py_pack_dsends(pool, 0, (m for m in shapes[:3]), 1000))


# -- the backlog sync ---------------------------------------------------------------------

def _sync_run(fn, rows, routed, cap):
    from fastroute import Router

    router = Router(mailbox_capacity=cap)
    dev = router.add_device("bob@example.org", "phone")
    packed = []
    res = fn(router, dev, rows, routed, {}, lambda s: packed.append(s) or msgpack.packb(s))
    popped = router.pop_many([dev], 100)
    return res, popped[0][1] if popped else [], packed


@pytest.mark.parametrize("routed", [1 << 62, 5])
def test_sync_rows_twins_for_a_removed_device(routed):
    # the compiled twin finds the engine's device itself, at its first push:
    # a device removed meanwhile is UnknownDevice as push says it, and rows
    # that are not pushed (above routed) never look it up
    from fastroute import Router

    rows = [(10, "alice@example.org", b"a" * 16, b"x", TS)]

    def run(fn):
        router = Router(mailbox_capacity=4)
        dev = router.add_device("bob@example.org", "phone")
        router.remove_device(dev)
        return fn(router, dev, rows, routed, {}, msgpack.packb)

    got = _same(lambda: run(delivery.py_sync_rows), _core and (lambda: run(_core.sync_rows)))
    if routed > 10:
        assert isinstance(got, UnknownDevice)
    else:
        assert got == (0, None, 1)


@pytest.mark.parametrize("routed,cap", [(1 << 62, 100), (12, 100), (1 << 62, 3), (10, 3)])
def test_sync_rows_twins(routed, cap):
    rows = [(10 + i, "alice@example.org" if i % 2 else "carol@other.net", bytes([i]) * 16,
             b"b" * i, TS + i) for i in range(6)]
    got = _same(lambda *a: _sync_run(delivery.py_sync_rows, *a),
                _core and (lambda *a: _sync_run(_core.sync_rows, *a)), rows, routed, cap)
    (pushed, last, state), queued, packed = got
    want = min(len(rows), cap, routed - 9)
    assert pushed == want and len(queued) == want
    assert state == (0 if want == len(rows) else 1 if routed - 9 <= cap else 2)
    assert last == (9 + want if want else None)
    assert packed == ["carol@other.net", "alice@example.org"][:want]  # packed once each
    for i, ((seq, (mid, tail)), (rmid, sender, cid, body, ts)) in enumerate(zip(queued, rows)):
        assert (seq, mid) == (i + 1, rmid)
        assert tail == wire.py_deliver_tail(msgpack.packb(sender), cid, body,
                                                  b"\xcf" + ts.to_bytes(8, "big"), 0)


# -- MemoryStore's loops ------------------------------------------------------------------

def _as_routes(items: list, first: int, routed: bool = False) -> list:
    """A put's items as ``MemoryStore.put_now``'s routes (flat device keys,
    ``(mid, tail)``, or with ``routed`` its routed tail, as the relay's gate
    makes them), mids from ``first`` on; a malformed item stays one."""
    out: list = []
    for i, item in enumerate(items):
        if len(item) != 5:
            out += (None, item)
            continue
        sender, cid, body, ts, devs = item
        tail = wire.py_deliver_tail(msgpack.packb(sender), cid, body, wire.ts_packed(int(ts)), 0)
        out += (devs, wire.routed_tail(first + i, tail) if routed else (first + i, tail))
    return out


def _mem_run(put, ack, script, left=None, each=True, routes=False):
    """Run puts and acks on fresh dicts (``left``: the counts' own container;
    ``each`` false: the puts report how many they stored, not each mid;
    ``routes``: the puts are given routes, as put_now gives them, "routed":
    routed tails); return
    every result and the final dicts (the inboxes with what they hold, and
    which of them share a tuple)."""
    left = {} if left is None else left
    inbox, log = {}, []
    nxt = 1
    for step in script:
        if step[0] == "put":
            mids = []
            try:
                try:
                    if routes:
                        put(_as_routes(step[1], nxt, routes == "routed"), left, inbox, nxt,
                            mids, each, True)
                    else:
                        put(step[1], left, inbox, nxt, mids, each)
                finally:
                    if not each:
                        # one count, after an exception too: the mids it stood for
                        assert len(mids) == 1
                        mids = list(range(nxt, nxt + mids[0]))
                log.append(list(mids))
            except Exception as exc:  # noqa: BLE001 - compared between twins
                log.append((type(exc), list(mids)))
            nxt += len(mids)
        else:
            box = inbox.get(step[1])
            if box is not None:
                log.append(ack(box, left, step[2]))
    shared = sorted((m, k) for k, box in inbox.items() for m in box
                    if any(b.get(m) is box[m] for j, b in inbox.items() if j < k))
    return log, dict(left), {k: dict(v) for k, v in inbox.items()}, shared


def test_mem_put_and_ack_twins():
    rng = random.Random(5)
    script = []
    for _ in range(300):
        if rng.random() < 0.5:
            script.append(("put", [("a@x", bytes([i]) * 16, b"b%d" % i, 10 * i,
                                    rng.sample(range(1, 6), rng.randrange(1, 4)))
                                   for i in range(rng.randrange(6))]))
        else:
            script.append(("ack", rng.randrange(1, 7),
                           [rng.randrange(1, 400) for _ in range(rng.randrange(8))]))
    # as the relay puts: a batch's items share one stamp object and, in runs,
    # their recipient's device-key list (interleaved runs, equal lists that
    # are other objects, the same stamp value in another object)
    # lists (a recipient's keys, shared in runs) and tuples (a device's one
    # key, its copies in turns with other devices'; equal ones are one entry)
    keys = [[1, 2], [3], [2, 4, 5], [6], (7,), (3,), (1, 2), tuple([7])]
    for k in range(40):
        ts = 10**12 + k
        picks = [keys[rng.randrange(len(keys))] for _ in range(rng.randrange(1, 5))]
        picks = [p for p in picks for _ in range(rng.randrange(1, 4))]
        if rng.random() < 0.3:
            picks.append(list(picks[0]))
        script.append(("put", [("b@y", bytes([k, i]) * 8, b"c", ts if i % 5 else int(str(ts)),
                                p) for i, p in enumerate(picks)]))
        script.append(("ack", rng.randrange(1, 6), [rng.randrange(300, 700) for _ in range(9)]))
    script.append(("put", [("a@x", MID, b"y", 1, [2]), ("a@x", MID, b"z", 1, [])]))  # no device
    script.append(("put", [("a@x", MID, b"x", 1, [1]), ("bad",)]))  # malformed item
    want = _mem_run(store.py_mem_put, store.py_mem_ack, script)
    assert _mem_run(store.py_mem_put, store.py_mem_ack, script, store.PyInbox()) == want
    # counted, not listed (MemoryStore.put_now): the same stores and answers
    assert _mem_run(store.py_mem_put, store.py_mem_ack, script, each=False) == want
    if _core is not None:
        # the counts in a dict (as the specification's) and in an Inbox (as
        # MemoryStore keeps them when compiled)
        assert _mem_run(_core.mem_put, _core.mem_ack, script) == want
        assert _mem_run(_core.mem_put, _core.mem_ack, script, _core.Inbox()) == want
        assert _mem_run(_core.mem_put, _core.mem_ack, script, each=False) == want
        assert _mem_run(_core.mem_put, _core.mem_ack, script, _core.Inbox(), False) == want
    # as routes (put_now's): the same mids, counts and sharing; the inboxes
    # hold the routes, whose tails hold the items' fields
    routed = _mem_run(store.py_mem_put, store.py_mem_ack, script, each=False, routes=True)
    if _core is not None:
        assert _mem_run(_core.mem_put, _core.mem_ack, script, _core.Inbox(), False,
                        True) == routed
        assert _mem_run(_core.mem_put, _core.mem_ack, script, None, True, True) == routed
    assert [e if type(e) is not tuple else e[1] for e in routed[0]] == [
        e if type(e) is not tuple else e[1] for e in want[0]]
    assert routed[1] == want[1] and routed[3] == want[3]
    assert routed[0][-1][0] is InvalidArgument  # the malformed one: not a route
    assert {k: {m: store._stored_fields(v) for m, v in box.items()}
            for k, box in routed[2].items()} == {
        k: {m: (v[0], v[1], v[2], int(v[3])) for m, v in box.items()}
        for k, box in want[2].items()}
    for box in routed[2].values():
        for after, limit in ((0, 1000), (150, 3), (10**6, 5)):
            rows = store.py_mem_load(box, after, limit)
            assert [r[0] for r in rows] == [m for m in box if m > after][:limit]
            if _core is not None:
                assert _core.mem_load(box, after, limit) == rows
    # as the relay's gate routes them, each a routed tail: the same answers,
    # counts and sharing, and the same rows loaded back
    tails = _mem_run(store.py_mem_put, store.py_mem_ack, script, each=False, routes="routed")
    if _core is not None:
        assert _mem_run(_core.mem_put, _core.mem_ack, script, _core.Inbox(), False,
                        "routed") == tails
        assert _mem_run(_core.mem_put, _core.mem_ack, script, None, True, "routed") == tails
    assert tails[0] == routed[0] and tails[1] == routed[1] and tails[3] == routed[3]
    assert all(wire.is_routed(v) for box in tails[2].values() for v in box.values())
    for k, box in tails[2].items():
        assert {m: store._stored_fields(v) for m, v in box.items()} == {
            m: store._stored_fields(v) for m, v in routed[2][k].items()}
        for after, limit in ((0, 1000), (150, 3), (10**6, 5)):
            rows = store.py_mem_load(box, after, limit)
            assert rows == store.py_mem_load(routed[2][k], after, limit)
            if _core is not None:
                assert _core.mem_load(box, after, limit) == rows
    log, left, inbox, shared = want
    assert log[-1] == (ValueError, [log[-1][1][0]])  # the good item before it was stored
    # loads: the same rows from both, for every device, cursor and limit
    for dk in range(1, 8):
        box = inbox.get(dk, {})
        for after in (0, 5, 150, 10**6):
            for limit in (0, 1, 3, 1000):
                rows = store.py_mem_load(box, after, limit)
                assert [r[0] for r in rows] == [m for m in box if m > after][:limit]
                assert all(r[1:] == box[r[0]][:4] for r in rows)
                if _core is not None:
                    assert _core.mem_load(box, after, limit) == rows
    # a message is in exactly as many inboxes as its count says, the same
    # tuple in each, and the put and ack counts add up to the messages held
    held: dict = {}
    for dk, box in inbox.items():
        for mid, msg in box.items():
            assert held.setdefault(mid, msg) == msg
            assert dk in msg[4]  # the put's item itself: its device keys last
    for mid in held:
        assert left.get(mid, 1) == sum(mid in box for box in inbox.values())
    assert set(left) <= set(held) and all(n > 1 for n in left.values())
    assert len(shared) == sum(left.get(m, 1) - 1 for m in held)
    stored = sum(len(e if type(e) is list else e[1]) for e in log if type(e) is not int)
    assert stored - sum(e for e in log if type(e) is int) == len(held)
    # and a load refuses what an inbox never holds
    for load in (store.py_mem_load, _core and _core.mem_load):
        if load is not None:
            with pytest.raises(WrongType):
                load({1: None}, 0, 5)


def test_mem_load_reads_each_route_its_own_sender():
    # a load shares one str among a run of one sender's routes: a sender of
    # other bytes, of the same length, or one item among them, is read as its own
    senders = ["a@x", "a@x", "é@x", "b@x", "a@xy", "a@x", None, "a@x", "a@x"]
    box: dict = {}
    for mid, sender in enumerate(senders, 1):
        if sender is None:
            box[mid] = ("item@x", MID, b"i", 5, [1])
            continue
        box[mid] = (mid, wire.py_deliver_tail(msgpack.packb(sender), MID, b"%d" % mid,
                                              wire.ts_packed(mid), 0))
    rows = store.py_mem_load(box, 0, 100)
    assert [r[1] for r in rows] == [s or "item@x" for s in senders]
    assert [r[3] for r in rows][:2] == [b"1", b"2"] and rows[1][4] == 2
    if _core is not None:
        for holder in (box, _core.Inbox()):
            for m, v in box.items():
                holder[m] = v
            assert _core.mem_load(holder, 0, 100) == rows


def test_mem_put_keeps_a_copys_route_and_loads_it_as_its_row():
    # the keys stage's per-device copies, kept as the routes the engine got
    # (mid, DDELIVER tail, DDELIVER head) among a gate's routes (mid, tail):
    # a load reads each the way of its kind, the copy's sender address/device
    rng = random.Random(7)
    routes: list = []
    want = {}
    for k in range(60):
        mid = 5 + k
        body = rng.randbytes(rng.randrange(300))
        ts = TS + k
        devs = rng.sample([1, 2, 3], rng.randrange(1, 3))
        if rng.random() < 0.5:
            device = rng.choice([1, 2, 127])
            sender = rng.choice(["s@x.org", "é@x.org"])
            sp = msgpack.packb(sender) + msgpack.packb(device)
            route = (mid, wire.py_deliver_tail(sp, MID, body, wire.ts_packed(ts), 0),
                     wire.DDELIVER_HEAD)
            sender = senders_mod.copy_sender(sender, device)
        else:
            sender = rng.choice(["s@x.org", "t@x.org"])
            tail = wire.py_deliver_tail(msgpack.packb(sender), MID, body, wire.ts_packed(ts), 0)
            # as the relay's gate routes a SEND (a routed tail) or as a test may
            route = wire.routed_tail(mid, tail) if rng.random() < 0.5 else (mid, tail)
        routes += (devs, route)
        want[mid] = ((sender, MID, body, ts), devs, route)
    for put, load, box in ((store.py_mem_put, store.py_mem_load, None),
                           (_core and _core.mem_put, _core and _core.mem_load, None),
                           (_core and _core.mem_put, _core and _core.mem_load,
                            _core and _core.Inbox())):
        if put is None:
            continue
        inbox: dict = {}
        mids: list = []
        put(list(routes), {} if box is None else box, inbox, 5, mids, False, True)
        assert mids == [60]
        for dev in (1, 2, 3):
            held = [m for m, (_, devs, _) in want.items() if dev in devs]
            # the inbox holds the route itself, the one tuple the engine holds
            assert all(inbox[dev][m] is want[m][2] for m in held)
            for after, limit in ((0, 100), (20, 7)):
                rows = load(inbox[dev], after, limit)
                assert rows == [(m, *want[m][0]) for m in held if m > after][:limit]
            assert [store._stored_fields(inbox[dev][m]) for m in held] == [
                want[m][0] for m in held]


def test_mem_put_refuses_routes_that_are_not_the_mids_they_get():
    tail = wire.py_deliver_tail(SENDER_PACKED, MID, b"b", TS_PACKED, 0)
    cases = [
        ([[1], (5, tail), [2], (7, tail)], [5]),   # the second's mid skips one
        ([[1], (4, tail)], []),                    # before the first mid
        ([[1], (5, tail), [2]], []),               # not pairs
        ([[1], (5, bytearray(tail))], []),         # a tail not bytes
        ([[1], (True, tail)], []),                 # a mid not an int
        ([[1], (5, tail, b"head")], []),           # not (mid, tail), nor a copy's
        ([[1], (5, tail, wire.DDELIVER_HEAD, b"")], []),
        ([[1], [5, tail]], []),
        ([[1], (2**64, tail)], []),
        # routed tails: a mid other than the one given, after a good one
        ([[1], wire.routed_tail(5, tail), [2], wire.routed_tail(5, tail)], [5]),
        ([[1], wire.routed_tail(6, tail)], []),
        ([[1], b"\xc1" + bytes(8)], []),            # a routed head without a tail
    ]
    for routes, stored in cases:
        for put, box in ((store.py_mem_put, None), (_core and _core.mem_put, None),
                         (_core and _core.mem_put, _core and _core.Inbox())):
            if put is None:
                continue
            inbox: dict = {}
            mids: list = []
            with pytest.raises(InvalidArgument):
                put(routes, {} if box is None else box, inbox, 5, mids, True, True)
            assert mids == stored and sorted(m for b in inbox.values() for m in b) == stored


def _inbox_script(rng: random.Random, steps: int) -> list:
    """Operations on one inbox: puts of the next mid (as a store makes them)
    and of older ones, acks of the oldest entry and of any, repeats, lookups."""
    script, nxt, held = [], 1, []
    for _ in range(steps):
        r = rng.random()
        if r < 0.45:
            script.append(("put", nxt))
            held.append(nxt)
            nxt += rng.randrange(1, 3)
        elif r < 0.5:
            script.append(("put", rng.randrange(-2, nxt + 2)))
        elif r < 0.85:
            oldest = rng.random() < 0.7 and held
            script.append(("pop", min(held) if oldest else rng.randrange(-2, nxt + 2)))
            if oldest:
                held.remove(min(held))
        else:
            script.append(("get", rng.randrange(-2, nxt + 2)))
    return script


def _inbox_run(box, script) -> list:
    """Apply an :func:`_inbox_script` to ``box``; every answer and, after each
    step, what it holds in order."""
    log = []
    for i, (op, mid) in enumerate(script):
        if op == "put":
            box[mid] = ("a@x", MID, b"b%d" % i, mid, (1,))
        elif op == "pop":
            log.append(box.pop(mid, "absent"))
        else:
            log.append((mid in box, box.get(mid), box.get(mid, 0)))
        # the specification is a dict: its order is the order of insertion,
        # which is mid order as a store puts; compared here sorted
        log.append((len(box), sorted(box.items()) == box.items() if type(box) is not
                    store.PyInbox else True, sorted(box.items()), sorted(box)))
    return log


@needs_c
def test_inbox_twin():
    rng = random.Random(11)
    for _ in range(40):
        script = _inbox_script(rng, 300)
        assert _inbox_run(_core.Inbox(), script) == _inbox_run(store.PyInbox(), script)
    box, spec = _core.Inbox(), store.PyInbox()
    # a backlog that grows and drains, acked oldest first and out of order,
    # then a steady flow acked a few messages behind: the arrays grow,
    # squeeze their holes out and shrink back
    for mid in range(1, 20001):
        box[mid] = spec[mid] = ("a@x", MID, b"", mid, (1,))
    for mid in list(range(1, 19990)) + [19995, 19993]:
        assert box.pop(mid)[3] == spec.pop(mid)[3] == mid
    for mid in range(20001, 70001):
        box[mid] = spec[mid] = ("a@x", MID, b"", mid, (1,))
        if mid % 1000 != 7:  # a few left behind: holes
            assert box.pop(mid - 3) is spec.pop(mid - 3)
        assert len(box) == len(spec)
    assert box.items() == list(spec.items())
    for mid in range(20001, 69998):
        if mid in spec:
            assert box.pop(mid) is spec.pop(mid)
    assert len(box) == len(spec) == 9
    for mid in range(70001, 70500):
        box[mid] = spec[mid] = ("a@x", MID, b"", mid, (1,))
    assert box.keys() == list(spec) == [19990, 19991, 19992, 19994, 19996, 19997,
                                        *range(69998, 70500)]
    assert [v[3] for v in box.values()] == box.keys() == list(box)
    rows = _core.mem_load(box, 19992, 3)
    assert [r[0] for r in rows] == [19994, 19996, 19997] == [
        r[0] for r in store.py_mem_load(spec, 19992, 3)]
    assert _core.mem_load(box, 2**70, 5) == [] and _core.mem_load(box, 2**63 - 1, 5) == []
    assert [r[0] for r in _core.mem_load(box, -2**70, 2)] == [19990, 19991]
    # dict answers where a dict would answer
    with pytest.raises(KeyError):
        box.pop(5)
    with pytest.raises(KeyError):
        del box[5]
    with pytest.raises(KeyError):
        box[5]  # noqa: B018
    assert box.get("x") is None and "x" not in box and box.pop(2**80, 1) == 1
    with pytest.raises(WrongType):
        box[1] = None
    box.clear()
    assert len(box) == 0 and box.items() == [] and repr(box) == "<Inbox 0 messages>"


# -- SqliteStore's put loop ------------------------------------------------------------------

def _sql_puts(rng: random.Random) -> list:
    """One transaction's put requests as the writer gets them: runs of one
    recipient's tuple of keys (the relay's), interleaved recipients, lists,
    equal tuples that are other objects, messages for several devices, and
    every msgpack size class of int, str and bin in the entries."""
    keys = [(1,), (2,), [3], (1, 2), (4, 5, 6), tuple([1]), [2, 1], (1, 2), (7, 7, 8), [9, 9]]
    stamps = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 10**12, -1, -33, -129]
    puts = []
    for _ in range(rng.randrange(1, 5)):
        items = []
        for _ in range(rng.randrange(0, 30)):
            devs = keys[rng.randrange(len(keys))]
            sender = rng.choice(["a@x", "", "é@ü" * rng.randrange(1, 60), "s" * 300])
            body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 31, 255, 256])))
            if rng.random() < 0.02:
                body = b"\x01" * 65536  # bin32
            for _ in range(rng.randrange(1, 4)):  # a run
                items.append((sender, rng.randbytes(16), body, rng.choice(stamps), devs))
        puts.append(items)
    return puts


def test_sql_rows_twins():
    rng = random.Random(11)
    for trial in range(200):
        puts = _sql_puts(rng)
        first = rng.choice([1, 300, 2**31, 2**40])
        ttl = rng.choice([0, 1000, 30 * 86400 * 1000])
        want = store.py_sql_rows(puts, first, ttl)
        if _core is not None:
            assert _core.sql_rows(puts, first, ttl) == want, trial
        spack_rows, share_rows, pack_rows, blocks = want
        # every message is in exactly one place, with its mid in queue order
        items = [it for part in puts for it in part]
        seen = {}
        spacks = {}  # a spack's first -> its columns
        for i in range(0, len(spack_rows), 10):
            lo, hi, n, nbytes, exp, mids, lens, exps, devs, data = spack_rows[i:i + 10]
            entries = store._pack_entries(data)
            got = list(array.array("q", mids))
            assert got == [e[0] for e in entries] and (lo, hi, n) == (got[0], got[-1], len(got))
            assert list(array.array("i", lens)) == [len(e[3]) for e in entries]
            assert list(array.array("q", exps)) == [e[5] for e in entries]
            assert nbytes == sum(len(e[3]) for e in entries) and exp == min(e[5] for e in entries)
            spacks[lo] = (tuple(spack_rows[i:i + 6]), entries, list(array.array("q", devs)))
        holders: dict = {}  # a spack's first -> its devices, from the shares
        for i in range(0, len(share_rows), 7):
            dev, *cols = share_rows[i:i + 7]
            # a device holds the whole spack: its mids are left NULL
            assert tuple(cols) == spacks[cols[0]][0][:5] + (None,)
            holders.setdefault(cols[0], []).append(dev)
        for lo, (_, entries, devs) in spacks.items():
            assert len(set(holders[lo])) == len(holders[lo])  # each device once
            # devs: the devices the spack was written for, as its shares name them
            assert devs == holders[lo]
            for e in entries:
                seen[e[0]] = (sorted(holders[lo]), e[1:])
        if spacks:
            ((lo, bmids, bcounts, bfirsts, bsizes),) = blocks
            shared_mids = sorted(m for _, entries, _ in spacks.values() for m, *_ in entries)
            assert lo == shared_mids[0] and list(array.array("q", bfirsts)) == list(spacks)
            assert list(array.array("q", bmids)) == shared_mids
            assert list(array.array("i", bcounts)) == [len(seen[m][0]) for m in shared_mids]
            assert list(array.array("i", bsizes)) == [len(e) for _, e, _ in spacks.values()]
        else:
            assert blocks == [] and share_rows == []
        for i in range(0, len(pack_rows), 8):
            dev, lo, hi, n, nbytes, exp, mids, data = pack_rows[i:i + 8]
            entries = store._pack_entries(data)
            got = list(array.array("q", mids))
            assert got == [e[0] for e in entries] and (lo, hi, n) == (got[0], got[-1], len(got))
            assert nbytes == sum(len(e[3]) for e in entries)
            assert exp == min(e[5] for e in entries)
            for e in entries:
                seen[e[0]] = ([dev], e[1:])
        assert sorted(seen) == list(range(first, first + len(items)))
        for mid, (sender, cid, body, ts, devs) in zip(range(first, first + len(items)), items):
            # a device named twice in one message holds it once
            assert seen[mid] == (sorted(set(devs)), (sender, cid, body, ts, ts + ttl))


def _as_tails(items: list, cls: int = 0) -> tuple | None:
    """A put request's items as ``put_tails`` hands them to the writer, flat
    device keys, DELIVER tail a message (None: an item with a stamp below 0,
    which no tail carries)."""
    if any(ts < 0 for _, _, _, ts, _ in items):
        return None
    flat: list = []
    for sender, cid, body, ts, devs in items:
        flat += (devs, wire.py_deliver_tail(msgpack.packb(sender), cid, body,
                                            wire.ts_packed(ts), cls))
    return tuple(flat)


def test_sql_rows_lays_out_a_put_of_tails_as_its_items():
    # put_tails' requests (tuples of device keys and tails) among put_many's
    # (lists of items): both twins give the rows of the same messages as items
    rng = random.Random(12)
    mixed = 0
    for trial in range(200):
        puts = _sql_puts(rng)
        some = [t if rng.random() < 0.7 and (t := _as_tails(items, rng.randrange(2))) is not None
                else items for items in puts]
        mixed += len({type(p) for p in some}) == 2
        _laid_out_alike(rng, puts, some, trial)
    assert mixed > 15  # trials that mixed both kinds in one transaction


def _laid_out_alike(rng: random.Random, puts: list, some: list, trial: int) -> None:
    """Both twins lay ``some`` (``puts`` with some requests as tails or
    copies) out as the rows of ``puts``' items, from a mid and a TTL drawn
    from ``rng``."""
    first = rng.choice([1, 300, 2**31, 2**40])
    ttl = rng.choice([0, 1000, 30 * 86400 * 1000])
    want = store.py_sql_rows(puts, first, ttl)
    assert store.py_sql_rows(some, first, ttl) == want, trial
    if _core is not None:
        assert _core.sql_rows(some, first, ttl) == want, trial


def _as_copies(items: list, cls: int = 0) -> tuple | None:
    """A put request's items as ``put_copies`` hands them to the writer
    (:class:`fastroute.store.CopyTails`): each item's sender made the copy
    of a sending device, ``address/device_id`` (None: an item with a stamp
    below 0, or one whose sender is no ``address/device_id``)."""
    flat: list = []
    for sender, cid, body, ts, devs in items:
        address, slash, device = sender.rpartition("/")
        if ts < 0 or not slash or not device.isdigit():
            return None
        sp = msgpack.packb(address) + msgpack.packb(int(device))
        flat += (devs, wire.py_deliver_tail(sp, cid, body, wire.ts_packed(ts), cls))
    return store.CopyTails(flat)


def test_sql_rows_lays_out_a_put_of_copies_as_its_items():
    # put_copies' requests among put_many's and put_tails': both twins give
    # the rows of the items whose sender is each copy's address/device_id
    rng = random.Random(13)
    copies = 0
    for trial in range(200):
        puts = _sql_puts(rng)
        # the items' senders as copies' senders (some of several devices),
        # their stamps as a tail carries them
        puts = [[(f"{s}/{rng.choice([0, 1, 7, 2**40])}", c, b, abs(ts), d)
                 for s, c, b, ts, d in items]
                if rng.random() < 0.6 else items for items in puts]
        some = []
        for items in puts:
            c = _as_copies(items, rng.randrange(2)) if rng.random() < 0.7 else None
            t = _as_tails(items) if c is None and rng.random() < 0.5 else None
            some.append(c if c is not None else t if t is not None else items)
        copies += any(type(p) is store.CopyTails for p in some)
        _laid_out_alike(rng, puts, some, trial)
    assert copies > 50


_TAIL = wire.py_deliver_tail(msgpack.packb("a@x"), MID, b"body", wire.ts_packed(5), 0)
_COPY = wire.py_deliver_tail(msgpack.packb("a@x") + msgpack.packb(3), MID, b"body",
                             wire.ts_packed(5), 0)


@pytest.mark.parametrize("bad, error", [
    (((1,),), InvalidArgument),                          # keys without a tail
    (((1,), _TAIL), InvalidArgument),                    # a v1 tail: no sender device
    (((1,), _COPY[:-1]), InvalidArgument),               # cut
    (((1,), b"\xa3a@x\xff" + _COPY[5:]), InvalidArgument),  # a device id below 0
    (((1,), bytearray(_COPY)), WrongType),
    (((), _COPY), InvalidArgument),                      # nobody to deliver it to
])
def test_sql_rows_twins_refuse_the_same_copies(bad, error):
    puts = [[("a@x", MID, b"ok", 1, (1,))], store.CopyTails(bad)]
    for fn in (store.py_sql_rows, _core and _core.sql_rows):
        if fn is not None:
            with pytest.raises(error):
                fn(puts, 1, 1000)
# another sender of the same length, whose bytes are not UTF-8
_BAD_UTF8 = wire.py_deliver_tail(b"\xa3a\xff\xfe", MID, b"body", wire.ts_packed(5), 0)


@pytest.mark.parametrize("bad, error", [
    (((1,),), InvalidArgument),                          # keys without a tail
    (((1,), bytearray(_TAIL)), WrongType),
    (((1,), _TAIL[:-1]), InvalidArgument),               # cut
    (((1,), _TAIL + b"\x00"), InvalidArgument),          # something after it
    (((1,), b"\x01" + _TAIL[4:]), InvalidArgument),      # no sender
    (((1,), _TAIL, (1,), _BAD_UTF8), InvalidArgument),    # after a good one of its length
    (((), _TAIL), InvalidArgument),                      # nobody to deliver it to
    ({(1,), _TAIL}, WrongType),                          # neither a list nor a tuple
])
def test_sql_rows_twins_refuse_the_same_tails(bad, error):
    puts = [[("a@x", MID, b"ok", 1, (1,))], bad]
    for fn in (store.py_sql_rows, _core and _core.sql_rows):
        if fn is not None:
            with pytest.raises(error):
                fn(puts, 1, 1000)


@pytest.mark.skipif(_core is None, reason="the drafts' buffer pool is the compiled core's")
def test_sql_rows_keeps_a_bounded_pool_of_draft_buffers():
    # each transaction's packs are laid out in buffers kept from the last
    # one: at most 32 of them and 8 MiB, whatever a transaction held, and a
    # kept buffer (larger, or holding an older transaction's bytes) lays out
    # the next one as the specification does
    big = [[("a@x", bytes([d]) * 16, b"x" * 100_000, 1, (d,))
            for d in range(1, 41) for _ in range(3)]]
    small = [[("b@y", bytes([d]) * 16, b"y" * 10, 2, (d,)) for d in range(1, 4)]]
    for puts in (big, small, big, small):
        assert _core.sql_rows(puts, 7, 1000) == store.py_sql_rows(puts, 7, 1000)
        pooled, kept, nbytes = _core._draft_pool_stats()
        # a build without the GIL keeps none (the pool relies on it)
        assert (0 < kept if pooled else kept == 0) and kept <= 32 and nbytes <= 8 << 20


@pytest.mark.parametrize("bad, error", [
    (("a@x", MID, bytearray(b"b"), 1, (1,)), WrongType),
    ((b"a@x", MID, b"b", 1, (1,)), WrongType),
    (("a@x", MID, b"b", 1.0, (1,)), WrongType),
    (("a@x", MID, b"b", 1, ()), InvalidArgument),
    (("a@x", MID, b"b", (1 << 63) - 10, (1,)), OverflowError),
    (("a@x", MID, b"b", 1 << 64, (1,)), OverflowError),
    (("a\udc80", MID, b"b", 1, (1,)), UnicodeEncodeError),  # a lone surrogate
])
def test_sql_rows_twins_refuse_the_same_items(bad, error):
    puts = [[("a@x", MID, b"ok", 1, (1,))], [bad]]
    for fn in (store.py_sql_rows, _core and _core.sql_rows):
        if fn is not None:
            with pytest.raises(error):
                fn(puts, 1, 1000)


def test_shares_release_twins():
    # a block's counts as acks (repeats, unknown mids, ints past 64 bits)
    # release them: both leave the same counts and name the same mids gone
    rng = random.Random(5)
    for trial in range(300):
        mids = sorted(rng.sample(range(-5, 400), rng.randrange(0, 40)))
        counts = [rng.randrange(0, 4) for _ in mids]
        acks = [rng.choice(mids + [401, -6, 1 << 70, -(1 << 70), True])
                if mids and rng.random() < 0.9 else rng.randrange(-10, 500)
                for _ in range(rng.randrange(0, 60))]
        runs = []
        for fn in (store.py_shares_release, _core and _core.shares_release):
            if fn is not None:
                have, held = array.array("q", mids), array.array("i", counts)
                runs.append((fn(have, held, acks), list(held)))
        assert all(r == runs[0] for r in runs), trial
        gone, after = runs[0]
        for m, n0, n1 in zip(mids, counts, after):
            k = sum(1 for a in acks if a == m)
            assert n1 == max(0, n0 - k)
            assert (m in gone) == (n0 > 0 and n0 - k <= 0)
        assert len(gone) == len(set(gone))


def _walked_case(rng: random.Random) -> tuple:
    """A writer's counts (blocks of spacks, as transactions add them) and a
    compiled walk's output over devices' acks: each device's shares (whole
    spacks, or some of their mids), whole packs' mids before some of them,
    shares of spacks the counts never had, mids gone already."""
    counts = store._Counts()
    spacks: list[list[int]] = []
    mid = 1 + rng.randrange(3)
    for _ in range(rng.randrange(1, 5)):  # a transaction's block of spacks
        firsts, sizes, block = [], [], []
        for _ in range(rng.randrange(1, 4)):
            sp = list(range(mid, mid + rng.randrange(1, 9)))
            mid = sp[-1] + 1 + rng.randrange(3)  # other devices' packs between
            spacks.append(sp)
            firsts.append(sp[0])
            sizes.append(len(sp))
            block += sp
        held = [rng.randrange(0, 4) for _ in block]
        counts.add(block[0], array.array("q", block).tobytes(),
                   array.array("i", held).tobytes(), array.array("q", firsts).tobytes(),
                   array.array("i", sizes).tobytes(), [0] * len(firsts))
    counts.begin()
    if rng.random() < 0.3:
        counts._added = list(counts.blocks)[:1]  # a block this transaction added
    stray = [mid + 5, mid + 6]  # a spack the counts do not have
    walked: list = []
    keys: list = []
    acks: dict = {}
    for index in range(rng.randrange(1, 5)):
        key = 100 + index
        mids: list = []
        pool = spacks + [stray]
        for sp in rng.sample(pool, rng.randrange(1, min(4, len(pool)) + 1)):
            if rng.random() < 0.3:
                mids += [mid + 50 + len(mids)]  # a whole pack's mid, before the share
            share = sp if rng.random() < 0.6 else sp[:1] + rng.sample(sp[1:], len(sp[1:]) // 2)
            walked += [index, share[0], len(share)]
            mids += share
        keys.append(key)
        acks[key] = mids
    return counts, walked, keys, acks


def _walked_state(counts) -> tuple:
    return ({k: (list(b[0]), list(b[1]), b[2], list(b[3]), list(b[4]))
             for k, b in counts.blocks.items()},
            {k: (list(v[1]), v[2], list(v[3])) for k, v in counts._saved.items()},
            list(counts._firsts), list(counts._added))


def test_release_walked_twins():
    # the counts each twin leaves, the mids it names gone and where each
    # device's walk ended are the same, and so is what a rollback (or a
    # commit) of the transaction leaves after it
    rng = random.Random(11)
    gone_seen = ends_seen = 0
    for trial in range(400):
        case = _walked_case(rng)
        runs = []
        for fn, from_drops in itertools.product(_both(store.py_release_walked), (False, True)):
            if fn is None:
                continue
            counts, walked, keys, acks = copy.deepcopy(case)
            drops: tuple = ()
            if from_drops:
                # read from the walk's drops (each device's mids as int64s,
                # what ack_drops gives the walk) instead of the acks: the
                # same release
                drops = ([v for key in keys for v in (key, store.py_mids_blob(acks[key]))],)
                acks = {key: None for key in keys}  # not read
            gone: dict = {0: [7]} if trial % 7 == 0 else {}  # released before, kept
            ends = fn(counts, walked, keys, acks, gone, *drops)
            state = _walked_state(counts)
            if trial % 2:
                counts.rollback()
            else:
                counts.commit()
            runs.append((ends, gone, state, _walked_state(counts)))
        assert all(r == runs[0] for r in runs), trial
        ends, gone, _, _ = runs[0]
        gone_seen += sum(len(v) for k, v in gone.items() if k)
        ends_seen += len(ends)
    assert gone_seen > 100 and ends_seen > 400  # the cases released and walked


def test_release_walked_twins_refuse_the_same_input():
    counts = store._Counts()
    counts.add(1, array.array("q", [1, 2]).tobytes(), array.array("i", [1, 1]).tobytes(),
               array.array("q", [1]).tobytes(), array.array("i", [2]).tobytes(), [0])
    for walked, acks, error in [([0, 1, 2], {5: [1, "2"]}, TypeError),
                                ([0, 1, 2, 0], {5: [1, 2]}, IndexError),
                                ([0, 3, 1], {5: [1, 2]}, ValueError),
                                ([0, 1, 2], {5: []}, IndexError),
                                ([0, 1, -1], {5: [1, 2]}, InvalidArgument)]:
        for fn in _both(store.py_release_walked):
            if fn is not None:
                with pytest.raises(error):
                    fn(copy.deepcopy(counts), walked, [5], acks, {})
    # and read from drops: a first not among them, a drop short of its
    # shares, no drop at the index
    blob = array.array("q", [1, 2]).tobytes()
    for walked, drops, error in [([0, 3, 1], [5, blob], ValueError),
                                 ([0, 1, 2, 0], [5, blob], IndexError),
                                 ([0, 1, 2], [5, b""], IndexError),
                                 ([1, 1, 2], [5, blob], IndexError),
                                 ([0, 1, 2], [5, blob[:7]], InvalidArgument),
                                 ([0, 1, 2], [5, list(blob)], InvalidArgument)]:
        for fn in _both(store.py_release_walked):
            if fn is not None:
                with pytest.raises(error):
                    fn(copy.deepcopy(counts), walked, [5, 6], {}, {}, drops)


def _ack_device_case(fn, key, mids, rows, partial, spartial):
    """One device's ack through ``fn``: what it returned (as a set: any order),
    the rows it dropped, the partial acks it left, what it released."""
    released: list = []
    drop_packs: list = []
    drop_shares: list = []
    partial, spartial = dict(partial), dict(spartial)
    left = fn(key, mids, rows, partial, spartial,
              lambda first, m: released.append((first, sorted(m))), drop_packs, drop_shares)
    return sorted(left), drop_packs, drop_shares, partial, spartial, released


def test_ack_device_twins():
    # a device's ack (in order, out of order, repeated, past its rows) against
    # packs and shares (acked whole, in part, in part before): both drop the
    # same rows, leave the same partial acks, release the same mids
    rng = random.Random(11)
    key = 7
    cases = 0
    for trial in range(600):
        rows = []
        partial: dict = {}
        spartial: dict = {}
        at = rng.randrange(1, 50)
        for _ in range(rng.randrange(1, 6)):
            held = sorted(rng.sample(range(at, at + 40), rng.randrange(1, 12)))
            at = held[-1] + 1 + rng.randrange(0, 5)
            shared = rng.randrange(2)
            first = held[0] if rng.random() < 0.8 else held[0] - rng.randrange(1, 5)
            row = (shared, first, array.array("q", held).tobytes())
            rows.append(row if rng.random() < 0.8 else list(row))
            if len(held) > 1 and rng.random() < 0.3:
                # acked in part by an earlier transaction
                (spartial if shared else partial)[(key, first)] = set(
                    rng.sample(held, rng.randrange(1, len(held))))
        every = [m for _, _, b in rows for m in array.array("q", b)]
        kind = trial % 4
        if kind == 0:
            mids = list(every)  # every row's mids, all and in order
        elif kind == 1:
            mids = sorted(rng.sample(every, rng.randrange(1, len(every) + 1)))
        elif kind == 2:
            mids = rng.sample(every, rng.randrange(1, len(every) + 1))  # out of order
            mids += rng.sample(mids, rng.randrange(0, len(mids) + 1))   # repeated
        else:
            mids = every + [rng.randrange(500, 600) for _ in range(rng.randrange(0, 4))]
            rng.shuffle(mids)
        want = _ack_device_case(store.py_ack_device, key, mids, rows, partial, spartial)
        if _core is not None:
            got = _ack_device_case(_core.ack_device, key, mids, rows, partial, spartial)
            assert got == want, trial
        left, drop_packs, drop_shares, after, safter, released = want
        # every acked mid a row holds is accounted for, the rest returned
        held_all = set(every)
        assert set(left) == set(mids) - held_all
        dropped = set(zip(drop_packs[1::2], drop_packs[::2])) | set(
            zip(drop_shares[1::2], drop_shares[::2]))
        for shared, first, blob in rows:
            held = set(array.array("q", blob))
            noted = safter if shared else after
            before = (spartial if shared else partial).get((key, first), set())
            acked = (held & set(mids)) | before
            if not held & set(mids):
                assert noted.get((key, first), set()) == before  # not touched
            elif acked == held:
                assert (first, key) in dropped and (key, first) not in noted
            elif acked:
                assert noted[(key, first)] == acked
        cases += 1
    assert cases == 600


def test_ack_device_twins_on_whole_rows_in_order():
    # a group member's usual ack: its rows' mids, row after row, each in
    # order; the compiled path drops the rows without merging.  Beside it the
    # cases that only look like it: a row acked in part before, an empty row,
    # one mid too many or too few, two mids swapped across rows
    rng = random.Random(13)
    key = 4
    for trial in range(300):
        rows, at = [], rng.randrange(1, 100)
        for _ in range(rng.randrange(1, 7)):
            held = list(range(at, at + rng.randrange(1, 60)))
            at = held[-1] + 1 + rng.randrange(0, 3)
            rows.append((rng.randrange(2), held[0], array.array("q", held).tobytes()))
        every = [m for _, _, b in rows for m in array.array("q", b)]
        partial: dict = {}
        spartial: dict = {}
        mids = list(every)
        kind = trial % 6
        if kind == 1:
            shared, first, blob = rows[rng.randrange(len(rows))]
            held = array.array("q", blob).tolist()
            (spartial if shared else partial)[(key, first)] = {held[0]}
        elif kind == 2:
            rows.insert(rng.randrange(len(rows) + 1), (rng.randrange(2), 5000, b""))
        elif kind == 3:
            mids.append(at + 1000)
        elif kind == 4 and len(mids) > 1:
            mids.pop(rng.randrange(len(mids)))
        elif kind == 5 and len(rows) > 1:
            i = len(array.array("q", rows[0][2]))
            mids[i - 1], mids[i] = mids[i], mids[i - 1]
        want = _ack_device_case(store.py_ack_device, key, mids, rows, partial, spartial)
        if kind == 0:
            # every row goes, its shares' mids released, nothing left over
            assert want[0] == [] and len(want[1]) + len(want[2]) == 2 * len(rows), trial
        if _core is not None:
            got = _ack_device_case(_core.ack_device, key, mids, rows, partial, spartial)
            assert got == want, (trial, kind)


def test_ack_device_twins_complete_rows_acked_in_part():
    # the rest of a row acked in part before: all of it (the row goes), all
    # but one (it stays in part), or as many mids as the rest but one of them
    # acked before (the counts add up, the union does not: it stays)
    rng = random.Random(12)
    key = 3
    for trial in range(400):
        held = sorted(rng.sample(range(10, 90), rng.randrange(2, 20)))
        shared = trial % 2
        before = set(rng.sample(held, rng.randrange(1, len(held))))
        rest = [m for m in held if m not in before]
        kind = trial % 3
        if kind == 0:
            mids = rest
        elif kind == 1:
            mids = rest[:-1] or [rng.choice(sorted(before))]
        else:
            mids = rest[:-1] + [rng.choice(sorted(before))]
        rows = [(shared, held[0], array.array("q", held).tobytes()),
                (1 - shared, 200, array.array("q", [200, 201]).tobytes())]
        noted = {(key, held[0]): set(before)}
        partial, spartial = ({}, noted) if shared else (noted, {})
        want = _ack_device_case(store.py_ack_device, key, sorted(mids), rows, partial, spartial)
        dropped = want[2] if shared else want[1]
        assert (dropped == [key, held[0]]) == (kind == 0), trial
        if _core is not None:
            got = _ack_device_case(_core.ack_device, key, sorted(mids), rows, partial,
                                   spartial)
            assert got == want, trial


def _agrees(compiled, arg, want):
    """``compiled(arg)`` raises what ``want`` is (an exception: returns None)
    or returns what equals it (returned)."""
    if isinstance(want, Exception):
        with pytest.raises(type(want)):
            compiled(arg)
        return None
    got = compiled(arg)
    assert got == want, arg
    return got


def test_mid_span_twins():
    # the least and the greatest acked mid, in and out of order, negatives,
    # one mid; and inputs unlike the relay's (a float, a bool, an int past
    # 64 bits, a tuple, a list subclass, nothing) the specification's way
    rng = random.Random(9)
    cases = [[rng.randrange(-(1 << 63), 1 << 63) for _ in range(rng.randrange(1, 50))]
             for _ in range(200)]
    cases += [[7], [3, 2, 1], [1, 2, 3], [5, 5], [2, 9, 1, 9, 1], [1, 2.5], [True, 3],
              [4, 1 << 70, 2], [-(1 << 64), 1], (4, 2, 8), type("L", (list,), {})([3, 1]),
              [], [1, "2"]]
    for mids in cases:
        want = _same(lambda fn: fn(mids), None, store.py_mid_span)
        if _core is not None:
            got = _agrees(_core.mid_span, mids, want)
            assert got is None or type(got[0]) is type(want[0]), mids


def test_mids_blob_twins():
    # an acking device's mids as native int64s, the bounds and one past them;
    # and inputs unlike the relay's (a float, a bool, a tuple, a list
    # subclass, an int subclass, nothing) the specification's way
    rng = random.Random(10)
    cases = [[rng.randrange(-(1 << 63), 1 << 63) for _ in range(rng.randrange(0, 300))]
             for _ in range(200)]
    big = type("Big", (int,), {})
    cases += [[], [0], [(1 << 63) - 1, -(1 << 63)], [1 << 63], [-(1 << 63) - 1], [1, 2.5],
              [True, 3], [4, 1 << 70, 2], (4, 2, 8), type("L", (list,), {})([3, 1]),
              [1, "2"], [big(5), 6], array.array("q", [9, 8])]
    for mids in cases:
        want = _same(lambda fn: fn(mids), None, store.py_mids_blob)
        if isinstance(want, Exception):
            assert isinstance(want, (OverflowError, TypeError)), mids
        else:
            assert want == b"".join(m.to_bytes(8, sys.byteorder, signed=True) for m in mids)
        if _core is not None:
            got = _agrees(_core.mids_blob, mids, want)
            assert got is None or type(got) is bytes, mids


def _gather_cases(rng: random.Random) -> list:
    """Ack requests as the writer takes them: ``(pairs, acks before, mid)``,
    a device acking twice, mids at and above the batch's next mid, and
    pairs unlike the relay's (a tuple of mids, a bool, a float, an int past
    64 bits, a list subclass, a list pair, no mids)."""
    cases = []
    for _ in range(300):
        mid = rng.randrange(1, 5000)
        pairs = []
        for _ in range(rng.randrange(0, 12)):
            key = rng.randrange(1, 6)
            lo = rng.randrange(0, mid + 50)
            mids = list(range(lo, lo + rng.randrange(1, 80)))
            if rng.random() < 0.3:
                rng.shuffle(mids)
            pairs.append((key, mids))
        before = {k: [rng.randrange(0, mid)] for k in rng.sample(range(1, 6), rng.randrange(0, 3))}
        cases.append((pairs, before, mid))
    lst = type("L", (list,), {})
    cases += [([(1, (4, 2, 9))], {}, 7), ([(1, [True, 3])], {}, 9), ([(1, [1, 2.5])], {}, 9),
              ([(1, [1 << 70, 2])], {}, 9), ([(1, lst([3, 1]))], {}, 2), ([[1, [5, 6]]], {}, 9),
              ([(1, [])], {}, 9), ([(1, [5]), (1, [8, 2])], {1: [1]}, 6),
              ([(1, [-(1 << 63), (1 << 63) - 1])], {}, 0), ([(1, [1, "2"])], {}, 9)]
    return cases


def test_gather_acks_twins():
    # the writer's take of an ack request: each device's mids below the
    # batch's next mid, in the order they came, the caller's list itself
    # kept when nothing is cut; the greatest mid acked, or the bound.  With
    # blobs (filled from empty with acks, as the writer fills them): the
    # same, and beside each device's mids their int64 blob, while every
    # list folded in for it was of int64s
    rng = random.Random(11)
    blobs_seen = 0
    for pairs, before, mid in _gather_cases(rng):
        results = []
        for fn in (store.py_gather_acks, _core and _core.gather_acks):
            if fn is None:
                continue
            acks = {k: list(v) for k, v in before.items()}
            given = copy.deepcopy(pairs)
            with_blobs = {k: list(v) for k, v in before.items()}
            blobs = {k: store.py_mids_blob(v) for k, v in before.items()}
            try:
                hi = fn(given, acks, mid, 0)
            except Exception as exc:  # noqa: BLE001 - compared below
                results.append(type(exc))
                with pytest.raises(type(exc)):
                    fn(copy.deepcopy(pairs), with_blobs, mid, 0, blobs)
                continue
            assert (fn(copy.deepcopy(pairs), with_blobs, mid, 0, blobs), with_blobs) \
                == (hi, acks)
            assert blobs == {k: b for k, v in acks.items()
                             if (b := _blob_or_none(v)) is not None}, (pairs, before, mid)
            blobs_seen += len(blobs)
            for key, mids in acks.items():
                assert all(m < mid for m in mids[len(before.get(key, ())):]), (pairs, mid)
            for key, mids in given:
                if key not in before and type(mids) is list and max(mids) < mid and \
                        sum(1 for k, _ in given if k == key) == 1:
                    assert acks[key] is mids, "the caller's list itself, not a copy"
            results.append((hi, acks, blobs))
        if len(results) == 2:
            assert results[0] == results[1], (pairs, before, mid)
        want = results[0] if isinstance(results[0], type) else results[0][:2]
        if not isinstance(want, type):
            got_hi, got = want
            flat = {}
            for key, mids in pairs:
                flat.setdefault(key, list(before.get(key, [])))
                flat[key] += [m for m in mids if m < mid]
            assert got == {**before, **flat}, (pairs, mid)
            tops = [max(mids) for _, mids in pairs]
            assert got_hi == max([0] + [min(t, mid - 1) for t in tops]), (pairs, mid)
    assert blobs_seen > 500


def _blob_or_none(mids):
    try:
        return store.py_mids_blob(mids)
    except (OverflowError, TypeError):
        return None


def test_ack_drops_twins():
    # the compiled walks' input: a device held back, one with no mids, one
    # whose mids are not all int64s left out; the rest as blobs, in order
    rng = random.Random(12)
    cases = []
    for _ in range(200):
        acks = {k: [rng.randrange(-(1 << 63), 1 << 63) for _ in range(rng.randrange(0, 40))]
                for k in rng.sample(range(1, 50), rng.randrange(0, 12))}
        held = rng.choice([(), set(), set(rng.sample(range(1, 50), 5))])
        cases.append((acks, held))
    cases += [({1: [1, 2.5], 2: [3]}, ()), ({1: [1 << 64], 2: [4, 5]}, ()),
              ({1: (4, 2), 2: [True]}, {3}), ({1: [], 2: [9]}, ()),
              ({1: type("L", (list,), {})([3, 1])}, ()), ({1: [1, "2"], 2: [2]}, {2})]
    for acks, held in cases:
        want = _same(store.py_ack_drops, _core and _core.ack_drops, acks, held)
        # given the blobs gather_acks keeps (one not bytes: made again), the
        # same drops, the blobs themselves
        blobs: dict = {k: b for k, v in acks.items() if (b := _blob_or_none(v)) is not None}
        if blobs:
            blobs[next(iter(blobs))] = [0]
        assert _same(store.py_ack_drops, _core and _core.ack_drops, acks, held, blobs) == want
        drops, keys = want
        if keys:
            # a blob given is taken as it is: the acks' ints are not read again
            given = {keys[0]: b"\x07" * 8}
            got = _same(store.py_ack_drops, _core and _core.ack_drops, acks, held, given)
            assert got == ([keys[0], b"\x07" * 8, *drops[2:]], keys)
        assert drops[::2] == keys
        assert all(k not in held and acks[k] for k in keys)
        for key, blob in zip(drops[::2], drops[1::2]):
            assert blob == store.py_mids_blob(acks[key])


def test_acks_left_twins():
    # what a walk of shares leaves: a walked device's mids after those it
    # took (none: left out), an unwalked device's as they were, in order
    rng = random.Random(13)
    for _ in range(300):
        acks = {k: list(range(k * 100, k * 100 + rng.randrange(0, 20)))
                for k in rng.sample(range(1, 300), rng.randrange(0, 30))}
        walkable = [k for k, m in acks.items() if m]
        keys = rng.sample(walkable, rng.randrange(0, len(walkable) + 1))
        ends = {i: rng.randrange(1, len(acks[k]) + 1) for i, k in enumerate(keys)
                if rng.random() < 0.8}
        taken = {keys[i]: e for i, e in ends.items()}
        for fn in (store.py_acks_left, _core and _core.acks_left):
            if fn is None:
                continue
            got = fn(acks, keys, ends)
            assert list(got) == [k for k, m in acks.items() if len(m) > taken.get(k, 0)]
            for key, mids in got.items():
                assert mids == acks[key][taken.get(key, 0):]
                if key not in taken:
                    assert mids is acks[key], "an unwalked device's own list"


def test_ack_device_twins_take_any_input_as_the_specification():
    # inputs unlike the relay's (a float mid, a mid past 64 bits, a blob out
    # of order or cut short) go the specification's way, errors included; no
    # mids at all, and a mid at int64's bottom, are plain inputs, one just past
    # its top is not: each answered as the specification answers it
    rows = [(1, 1, array.array("q", [1, 2, 3]).tobytes())]
    for mids, rows_ in (([1, 2, 3.0], rows), ([1, 1 << 70], rows), ([True, 2, 3], rows),
                        ([], rows), ([], []), ([1 << 63], rows), ([-(1 << 63)], rows),
                        ([2, 3], [(0, 1, array.array("q", [3, 2]).tobytes())]),
                        ([2], [(0, 1, b"\x01" * 9)]), ([2], [(0, 1, bytearray(8))])):
        want = _same(lambda fn: _ack_device_case(fn, 5, mids, rows_, {}, {}), None,
                     store.py_ack_device)
        if _core is not None:
            if isinstance(want, Exception):
                with pytest.raises(type(want)):
                    _ack_device_case(_core.ack_device, 5, mids, rows_, {}, {})
            else:
                assert _ack_device_case(_core.ack_device, 5, mids, rows_, {}, {}) == want


@pytest.mark.parametrize("have, counts, mids, error", [
    (array.array("l", [1]), array.array("i", [1]), [1], WrongType),
    (array.array("q", [1]), array.array("q", [1]), [1], WrongType),
    (array.array("q", [1, 2]), array.array("i", [1]), [1], WrongType),
    (array.array("q", [1]), array.array("i", [1]), [1.0], TypeError),
    (array.array("q", [1]), array.array("i", [1]), ["1"], TypeError),
])
def test_shares_release_twins_refuse_the_same_input(have, counts, mids, error):
    for fn in (store.py_shares_release, _core and _core.shares_release):
        if fn is not None:
            with pytest.raises(error):
                fn(array.array(have.typecode, have), array.array(counts.typecode, counts),
                   mids)


# -- the client: SACK/DELIVER dispatch against Client._on_frame's Python loop ------------------

class _Plain:
    def decrypt(self, msg):
        return msg


class _Transport:
    def close(self):
        pass

    abort = close


class _Proto:
    open = True
    transport = _Transport()


def _run_client(frames, compiled, pending_spec, window, requests_spec=(), took=None):
    """Feed ``frames`` to a fresh client; return everything _on_frame may change.

    ``requests_spec``: ``(id, state)`` of feature requests waiting for a REPLY
    (state "open", "done" or "parts": a result begun by an earlier REPLY);
    ``took``, a list, gets whether the compiled dispatch took each frame."""
    async def go():
        c = client_mod.Client("h", 1, credential=b"", static=None, dedup_window=window)
        c._rx = _Plain()
        c._proto = _Proto()
        requests = []
        for cid, state in requests_spec:
            fut = c._loop.create_future()
            if state == "done":
                fut.set_result("earlier")
            c._requests[cid] = (fut, ["begun"] if state == "parts" else [])
            requests.append(fut)
        targets = []
        for ids in pending_spec:
            if len(ids) == 1:
                target = c._loop.create_future()
            else:
                target = client_mod._Batch(c._loop.create_future(), list(ids))
            if ids and ids[0] == b"done" * 4:
                (target if len(ids) == 1 else target.fut).set_result(None)
            targets.append(target)
            for cid in ids:
                c._pending[cid] = target if len(ids) > 1 else (target, b"op")
        saved = client_mod._dispatch_frame
        dispatch = _core.dispatch_frame if compiled else client_mod.py_dispatch_frame
        if took is not None:
            def dispatch(*args, _inner=dispatch):
                took.append(_inner(*args))
                return took[-1]
        client_mod._dispatch_frame = dispatch
        try:
            for f in frames:
                c._on_frame(f)
        finally:
            client_mod._dispatch_frame = saved
        outcome = []
        for t in targets:
            fut = t if isinstance(t, asyncio.Future) else t.fut
            state = (fut.done(), getattr(t, "left", None))
            if fut.done():
                exc = fut.exception()
                state += ((type(exc), str(exc), getattr(exc, "code", None),
                           getattr(exc, "ids", None)) if exc else fut.result(),)
            outcome.append(state)
        if c._ack_timer is not None:
            c._ack_timer.cancel()
        inbox = list(c._inbox)
        answered = []
        for f in requests:
            exc = f.exception() if f.done() else None
            answered.append((f.done(), (type(exc), str(exc)) if exc else None,
                             f.result() if f.done() and exc is None else None))
        return (inbox, [type(m) for m in inbox], [type(getattr(m, "ephemeral", None))
                                                  for m in inbox],
                c._seen.keys(), c.duplicates_dropped, c._ack_upto, c._flush_scheduled,
                c._ack_timer is not None, list(c._pending), outcome, c.address,
                sorted(c._requests), answered)

    return asyncio.run(go())


def _ids(k, tag=0):
    return [bytes([tag, i]) * 8 for i in range(k)]


def _dispatch_case(frames, pending_spec=(), window=4, requests_spec=(), took=None):
    want = _run_client(frames, False, pending_spec, window, requests_spec)
    if fastroute.COMPILED:
        assert _run_client(frames, True, pending_spec, window, requests_spec, took) == want
    return want


def test_dispatch_frame_delivers_and_dedups(_known_sender):
    a, b = _ids(6, 1), _ids(2, 2)
    frames = [_frame([_deliver(seq=i + 1, cid=cid, cls=i & 1) for i, cid in enumerate(a)]),
              _frame([_deliver(seq=7, cid=a[5]), _deliver(seq=8, cid=a[0]),   # a[0] evicted
                      _deliver(seq=9, cid=b[0], sender="carol@example.org"),
                      _deliver(seq=10, cid=b[0], sender=SENDER), _deliver(seq=3, cid=b[0])]),
              _frame([_deliver(seq=2**40, cid=b[1], body=bytes(300), ts=0)] * 3)]
    wire._ADDR_OK.add("carol@example.org")
    inbox, *_rest = _dispatch_case(frames)
    assert [m.seq for m in inbox] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 2**40]
    assert _dispatch_case(frames)[4] == 4
    assert _dispatch_case(frames, window=1000)[4] == 5  # a[0] is still known
    inbox, _, _, seen, dropped, *_ = _dispatch_case(frames, window=1)
    assert (len(inbox), dropped) == (10, 4)
    assert seen == [(SENDER, b[1])]  # the newest only


def test_dispatch_frame_sacks(_known_sender):
    batch, refused_batch, single, bad = _ids(5, 1), _ids(3, 2), _ids(1, 3), _ids(1, 4)
    done = [b"done" * 4]
    spec = [batch, refused_batch, single, bad, done, [b"done" * 4, b"x" * 16]]
    frames = [_frame([wire.sack_op(cid, 0) for cid in batch[:3]]
                     + [wire.sack_op(refused_batch[1], ErrorCode.UNKNOWN_RECIPIENT),
                        wire.sack_op(single[0], 0), wire.sack_op(bad[0], 999),
                        wire.sack_op(done[0], 0), wire.sack_op(b"u" * 16, 0)]),
              _frame([wire.sack_op(cid, 0) for cid in batch[3:] + refused_batch]
                     + [wire.sack_op(single[0], 0), _deliver(seq=5), wire.sack_op(b"x" * 16, 0)])]
    *_, pending, outcome, _, _, _ = _dispatch_case(frames, spec)
    assert outcome[0] == (True, 0, batch)
    assert outcome[1][2][0] is UnknownAddress
    assert pending == []


@pytest.mark.parametrize("plaintext", SERVER_FAST + SERVER_SLOW + [
    _frame([wire.sack_op(MID, 0), wire.welcome_op(SENDER, "phone", 1), _deliver()]),
    _frame([_deliver(), wire.server_bye_op(ErrorCode.SHUTTING_DOWN, "bye")]),
    _frame([_deliver(), wire.pong_op(1)]),
])
def test_dispatch_frame_declines_the_rest(plaintext, _known_sender):
    # declined exactly when decode_server_ops declines, before any effect
    if fastroute.COMPILED and _core.decode_server_ops(plaintext, wire._ADDR_OK) is None:
        assert _core.dispatch_frame(plaintext, wire._ADDR_OK, _core.DedupTable(1.0, 4), None,
                                    {}, object, tuple, None, None, None) is None
    _dispatch_case([plaintext, plaintext], [[MID]])


def test_dispatch_frame_fuzz(_known_sender):
    rng = random.Random(7)
    ids = _ids(8, 9)
    base = [_frame([(_deliver(seq=rng.randrange(2**33), cid=rng.choice(ids),
                              body=bytes(rng.randrange(300)))
                     if rng.random() < 0.6 else wire.sack_op(rng.choice(ids), rng.randrange(3)))
                    for _ in range(k)]) for k in (1, 3, 16)]
    _dispatch_case(_mutated(rng, base), [ids[:4], [ids[4]], ids[5:]], window=5)


def _mutated(rng: random.Random, base: list, n: int = 300) -> list:
    """``n`` frames of ``base``, half of them with one or two bytes changed."""
    frames = []
    for _ in range(n):
        data = bytearray(rng.choice(base))
        if rng.random() < 0.5:
            for _ in range(rng.randrange(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        frames.append(bytes(data))
    return frames


def _ddeliver(seq=1, sender=SENDER, device=3, cid=MID, body=b"copy", ts=TS, cls=0):
    # DDELIVER [2001, seq, from, from_device, id, body, ts_ms, cls]
    return msgpack.packb((2001, seq, sender, device, cid, body, ts, cls), use_bin_type=True)


def _gdeliver(seq=1, group=b"g" * 16, sender=SENDER, device=3, cid=MID, body=b"grp", ts=TS,
              cls=0):
    # GDELIVER [2100, seq, group, from, from_device, id, body, ts_ms, cls]
    return msgpack.packb((2100, seq, group, sender, device, cid, body, ts, cls),
                         use_bin_type=True)


def test_dispatch_frame_takes_what_an_e2ee_client_gets(_known_sender):
    # accepted REPLYs (the answers to DSENDs and GSENDs), DDELIVERs and
    # GDELIVERs, mixed with SACKs and DELIVERs: the compiled dispatch takes
    # those frames whole, with exactly the Python loop's effects
    a, r = _ids(6, 1), _ids(6, 2)
    sack_ids = _ids(2, 3)
    requests = [(r[0], "open"), (r[1], "done"), (r[2], "open"), (r[3], "parts"),
                (r[4], "open")]
    frames = [
        _frame([wire.reply_ok_op(r[0]), wire.reply_ok_op(r[1]), wire.reply_ok_op(b"u" * 16),
                wire.sack_op(sack_ids[0], 0)]),
        _frame([_ddeliver(seq=1, cid=a[0]), _ddeliver(seq=2, cid=a[1], device=127,
                                                      body=bytes(300)),
                _gdeliver(seq=3, cid=a[2], cls=1), _deliver(seq=4, cid=a[3]),
                _ddeliver(seq=5, cid=a[0]),                      # a duplicate of seq 1
                _gdeliver(seq=2**40, cid=a[4], group=bytes(16), ts=0, device=0),
                wire.reply_ok_op(r[2]), wire.reply_ok_op(r[2])]),
        _frame([_ddeliver(seq=7, cid=a[5], sender="carol@example.org"),
                _gdeliver(seq=8, cid=a[0], sender="carol@example.org")]),
        # a REPLY whose result came in parts goes to Client._on_reply as before
        _frame([wire.reply_packed_op(r[3], 0, True, [msgpack.packb(1)])]),
    ]
    wire._ADDR_OK.add("carol@example.org")
    took: list = []
    inbox, types, *_rest = _dispatch_case(frames, [[sack_ids[0]]], 8, requests, took)
    assert [m.seq for m in inbox] == [1, 2, 3, 4, 2**40, 7, 8]
    assert types == [client_mod.DeviceMessage, client_mod.DeviceMessage,
                     client_mod.GroupMessage, client_mod.Message, client_mod.GroupMessage,
                     client_mod.DeviceMessage, client_mod.GroupMessage]
    assert inbox[1].device == 127 and inbox[4].group == bytes(16)
    *_, left, answered = _rest
    assert left == [r[4]]
    assert answered[0] == (True, None, None) and answered[1] == (True, None, "earlier")
    assert answered[3] == (True, None, ["begun", 1]) and answered[4] == (False, None, None)
    if fastroute.COMPILED:
        assert took == [True, True, True, None]


@pytest.mark.parametrize("op", [
    wire.reply_op(MID, ErrorCode.RATE_LIMITED),                          # refused
    wire.reply_op(MID, 0, False, [1]),                                   # not the last
    wire.reply_op(MID, 0, True, 5),                                      # with a result
    msgpack.packb((2001, 1, SENDER, -3, MID, b"x", TS, 0)),              # negative device
    msgpack.packb((2001, 1, SENDER, 3, MID, b"x", TS, 2)),               # bad cls
    msgpack.packb((2001, 1, SENDER, 3, MID[:15], b"x", TS, 0)),          # short id
    msgpack.packb((2100, 1, b"g" * 15, SENDER, 3, MID, b"x", TS, 0)),    # short group
    msgpack.packb((2100, 1, b"g" * 16, "no address", 3, MID, b"x", TS, 0)),  # bad sender
    msgpack.packb((2001, 1, SENDER, 3, MID, b"x", TS)),                  # short op
    msgpack.packb((2002, 1, 3, MID, b"x", TS, 0)),                       # EVENT
])
def test_dispatch_frame_declines_other_feature_ops(op, _known_sender):
    # the loop (and its precise decoder) answers them: the compiled dispatch
    # takes only what it can handle exactly as the loop does
    took: list = []
    _dispatch_case([_frame([_ddeliver(), op])], requests_spec=[(MID, "open")], took=took)
    if fastroute.COMPILED:
        assert took == [None]


def test_dispatch_frame_feature_fuzz(_known_sender):
    rng = random.Random(11)
    ids = _ids(8, 9)
    makers = [lambda: _ddeliver(seq=rng.randrange(2**33), cid=rng.choice(ids),
                                device=rng.randrange(200), body=bytes(rng.randrange(300))),
              lambda: _gdeliver(seq=rng.randrange(2**33), cid=rng.choice(ids)),
              lambda: wire.reply_ok_op(rng.choice(ids)),
              lambda: wire.sack_op(rng.choice(ids), rng.randrange(3))]
    base = [_frame([rng.choice(makers)() for _ in range(k)]) for k in (1, 3, 16)]
    _dispatch_case(_mutated(rng, base), [ids[:4]], 5,
                   [(ids[4], "open"), (ids[5], "done"), (ids[6], "open")])


# -- feature e2ee: ops of DELIVER's shape, and stored rows a link may not get ---------

def test_pack_delivers_with_a_head_packs_ddeliver_and_event():
    from fastroute.relay.senders import DDELIVER_HEAD, EVENT_HEAD

    sp = msgpack.packb("alice@example.org") + msgpack.packb(3)
    batch = [(5, wire.py_deliver_tail(sp, MID, b"copy", TS_PACKED, 0), DDELIVER_HEAD),
             (6, wire.py_deliver_tail(SENDER_PACKED, MID, b"v1", TS_PACKED, 0)),
             (7, wire.py_deliver_tail(msgpack.packb(2), MID, b"\x92\x01\x0b", TS_PACKED, 0),
              EVENT_HEAD)]

    def run(fn):
        def call(seq, batch):
            out = []
            return fn(seq, batch, out), out
        return call

    mids, out = _same(*map(_run_or_none(run), _both(delivery.py_pack_delivers)), 40, batch)
    assert mids == [5, 6, 7]
    assert [msgpack.unpackb(op) for op in out] == [
        [2001, 40, "alice@example.org", 3, MID, b"copy", TS, 0],
        [18, 41, "alice@example.org", MID, b"v1", TS, 0],
        [2002, 42, 2, MID, b"\x92\x01\x0b", TS, 0]]
    for bad in ([(1, b"t", b"")], [(1, b"t", "h")], [(1, b"t", b"h", 4)]):
        assert isinstance(_same(*_both(delivery.py_pack_delivers), 1, bad, []), TypeError)


@pytest.mark.parametrize("negotiated", [False, True])
def test_sync_rows_twins_with_per_device_copies(negotiated):
    from fastroute.relay.senders import pack_stored_sender

    rows = [(10, "alice@example.org", b"a" * 16, b"v1", TS),
            (11, "alice@example.org/3", b"b" * 16, b"copy", TS),
            (12, "/1", b"c" * 16, b"\x92\x00\x05", TS),
            (13, "carol@other.net", b"d" * 16, b"v1b", TS)]

    def run(fn):
        from fastroute import Router

        router = Router(mailbox_capacity=10)
        dev = router.add_device("bob@example.org", "phone")
        res = fn(router, dev, rows, 1 << 62, {},
                 lambda s: pack_stored_sender(
                     s, frozenset(("e2ee",)) if negotiated else frozenset()))
        popped = router.pop_many([dev], 100)
        out: list = []
        delivery.py_pack_delivers(1, [p for _, p in popped[0][1]], out)
        return res, [msgpack.unpackb(op) for op in out]

    (pushed, last, state), ops = _same(lambda: run(delivery.py_sync_rows),
                                       _core and (lambda: run(_core.sync_rows)))
    assert (last, state) == (13, 0)
    if negotiated:
        assert pushed == 4
        assert [op[0] for op in ops] == [18, 2001, 2002, 18]
        assert ops[1][2:4] == ["alice@example.org", 3]
    else:  # a v1 link: the copy and the event are passed over, left in the store
        assert pushed == 2
        assert [(op[0], op[4]) for op in ops] == [(18, b"v1"), (18, b"v1b")]


def _dsend_case(fn, entries, skip, slot_class=None, items=True):
    from fastroute.relay.keys import Slot

    cls = slot_class or Slot  # the class in use unless told
    devs = {1: cls("r@x.org", "phone", 1, 11), 2: cls("r@x.org", "laptop", 2, 12),
            5: cls("r@x.org", "tablet", 5, 15)}
    for did, slot in devs.items():
        slot.keyed(100 + did)
    made: list | None = [] if items else None
    copies: list = []
    ok = fn(devs, entries, skip, "r@x.org", "s@x.org/3", MID, TS, SENDER_PACKED, TS_PACKED,
            made, copies)
    return ok, made, copies


@pytest.mark.parametrize("entries,skip,ok", [
    ([(1, 11, b"a"), (2, 12, b"b"), (5, 15, b"c")], 0, True),
    ([(5, 15, b"c"), (1, 11, b"a"), (2, 12, b"b")], 0, True),     # any order
    (((1, 11, b"a"), (2, 12, b"b"), (5, 15, b"c")), 0, True),     # the decoder's tuple
    ([[1, 11, b"a"], [2, 12, b"b"], [5, 15, b"c"]], 0, True),     # entries of any sequence
    ([[1, 11, b"a"], [2, 13, b"b"], [5, 15, b"c"]], 0, False),
    (((1, 11, b"a"), (2, 13, b"b"), (5, 15, b"c")), 0, False),
    ([(1, 11, b"a"), (5, 15, b"c")], 2, True),                   # the sender's own device
    ([(1, 11, b"a"), (2, 12, b"b")], 0, False),                  # missing
    ([(1, 11, b"a"), (2, 12, b"b"), (5, 15, b"c"), (7, 1, b"")], 0, False),  # extra
    ([(1, 11, b"a"), (2, 13, b"b"), (5, 15, b"c")], 0, False),   # stale
    ([(1, 11, b"a"), (1, 11, b"b"), (5, 15, b"c")], 0, False),   # repeated
    ([(1, 11, b"a"), (2, 12, b"b"), (5, 15, b"c")], 2, False),   # names the sender
    ([], 0, False),
])
def test_dsend_copies_twins(entries, skip, ok):
    from fastroute.relay import keys

    got = _same(lambda: _dsend_case(keys.py_dsend_copies, entries, skip),
                _core and (lambda: _dsend_case(_core.dsend_copies, entries, skip)))
    if _core is not None:
        # the compiled loop reads its own slots' fields directly, and takes
        # the specification's slots (any other class) through their attributes
        for cls in (keys.PySlot, _core.Slot):
            assert _dsend_case(_core.dsend_copies, entries, skip, cls) == got
            assert _dsend_case(keys.py_dsend_copies, entries, skip, cls) == got
    if _core is not None:
        # the same entries read in place by the compiled decoder
        frame = _frame([wire.dsend_op(MID, ADDR, False, [tuple(e) for e in entries], [])])
        wire.decode_client_frame_precise(frame)  # its recipient known valid
        in_place = _core.decode_dsends(frame, wire._ADDR_OK)[0][4]
        assert type(in_place).__name__ == ("_Entries" if entries else "tuple")
        for cls in (keys.PySlot, _core.Slot):
            for fn in (_core.dsend_copies, keys.py_dsend_copies):
                assert _dsend_case(fn, in_place, skip, cls) == got
                assert _dsend_case(fn, in_place, skip, cls, items=False) == (
                    got[0], None, got[2])
    # without a list for the store items (a store that keeps the copies'
    # routes), the same answer and copies, and no item made
    bare = _same(lambda: _dsend_case(keys.py_dsend_copies, entries, skip, items=False),
                 _core and (lambda: _dsend_case(_core.dsend_copies, entries, skip,
                                                items=False)))
    assert bare == (got[0], None, got[2])
    assert got[0] is ok
    if not ok:
        assert got[1:] == ([], [])
        return
    names = {1: "phone", 2: "laptop", 5: "tablet"}
    assert [(i[0], i[2], i[4]) for i in got[1]] == [
        ("s@x.org/3", e[2], (100 + e[0],)) for e in entries]
    # flat: address, device name, tail, device keys a copy (the head is
    # DDELIVER_HEAD's)
    assert len(got[2]) == 4 * len(entries)
    for (did, _, body), k in zip(entries, range(0, len(got[2]), 4)):
        target, name, tail, dkeys = got[2][k:k + 4]
        assert (target, name, dkeys) == ("r@x.org", names[did], (100 + did,))
        assert tail == wire.py_deliver_tail(SENDER_PACKED, MID, body, TS_PACKED, 0)


@pytest.mark.skipif(_core is None, reason="the compiled core is not built")
def test_slot_twins():
    from fastroute.relay import keys

    assert keys.Slot is _core.Slot
    for cls in (keys.PySlot, _core.Slot):
        slot = cls("r@x.org", "phone", 3, 12345)
        assert (slot.address, slot.name, slot.device_id, slot.reg_id, slot.seen,
                slot.dkeys) == ("r@x.org", "phone", 3, 12345, 0, (0,))
        slot.keyed(77)
        slot.seen = 1_700_000_000
        slot.reg_id = 9
        assert (slot.dkeys, slot.seen, slot.reg_id) == ((77,), 1_700_000_000, 9)
        assert cls("a", "b", 1, 2, 5).seen == 5
        with pytest.raises(AttributeError):
            slot.other = 1  # a slot holds its six fields and nothing else


def _dsend_run_case(fn, table, seed, with_items=True, decoded=False):
    """A random frame of DSENDs through ``fn`` (py_dsend_run or its twin), run
    after run as Keys.dsend_many calls it (skipping the op a run stops at):
    where each run stopped, the tokens, the items, the requests, the dedup
    entries."""
    from fastroute.relay.keys import Slot

    rng = random.Random(seed)
    lists = {}
    for address in ("r@x.org", "s@x.org"):
        devs = lists[address] = {}
        for did in rng.sample(range(1, 128), rng.randrange(1, 5)):
            devs[did] = Slot(address, f"dev{did}", did, rng.randrange(1, 16384))
            devs[did].keyed((address, did))
    skip = next(iter(lists["s@x.org"]))  # the sending device
    reach = {"r@x.org": True, "s@x.org": True, "far@x.org": False}
    seen = table(600.0, 1000)
    ids = _ids(6, 7)
    seen.begin("s@x.org", ids[0], 0, 1.0)           # decided: a resend
    seen.begin("s@x.org", ids[1], PENDING, 1.0)     # in flight

    def entries(address, own):
        devs = dict(lists[address])
        if own or address == "s@x.org":
            devs.pop(skip)
        out = [(did, slot.reg_id, bytes(rng.randrange(40))) for did, slot in devs.items()]
        rng.shuffle(out)
        roll = rng.random()
        if roll < 0.05 and out:
            out.pop()                                     # missing
        elif roll < 0.1 and out:
            out[0] = (out[0][0], out[0][1] ^ 1, out[0][2])  # stale
        elif roll < 0.13:
            out.append((skip if own else 127, 1, b""))    # extra, or the sender itself
        return tuple(out)

    ops = []
    for _ in range(rng.randrange(1, 40)):
        to = rng.choice(["r@x.org", "r@x.org", "r@x.org", "s@x.org", "far@x.org"])
        own = entries("s@x.org", True) if to != "s@x.org" and rng.random() < 0.4 else ()
        ops.append((1004, rng.choice(ids) if rng.random() < 0.3 else rng.randbytes(16), to,
                    False, entries(to if to in lists else "r@x.org", False)
                    if rng.random() > 0.03 else (), own))
    if decoded:
        # the compiled decoder's ops: entries read in place (_Entries)
        frame = _frame([wire.dsend_op(op[1], op[2], False, op[4], op[5]) for op in ops])
        wire.decode_client_frame_precise(frame)  # its recipients known valid
        ops = _core.decode_dsends(frame, wire._ADDR_OK)
        assert ops is not None and any(type(op[4]).__name__ == "_Entries" for op in ops)
    tokens = [float(rng.randrange(0, 120)), float(rng.randrange(0, 3000))]
    items: list | None = [] if with_items else None
    meta: list = []
    stops = []
    i = 0
    while i < len(ops):
        i = fn(ops, i, lists, reach, skip, "s@x.org", "s@x.org/%d" % skip, TS, SENDER_PACKED,
               TS_PACKED, tokens, seen, 2.0, items, meta, "link")
        stops.append(i)
        i += 1
    return stops, tokens, items, meta, sorted(seen.keys())


@pytest.mark.parametrize("seed", range(40))
def test_dsend_run_twins(seed):
    # the compiled run takes exactly the ops the specification takes, stops
    # where it stops and leaves the same tokens, items, requests and ids
    from fastroute.relay import keys

    want = _dsend_run_case(keys.py_dsend_run, dedup.DedupWindow, seed)
    # with no list for store items (the memory store's path): the same runs
    bare = _dsend_run_case(keys.py_dsend_run, dedup.DedupWindow, seed, False)
    if _core is not None:
        assert _dsend_run_case(_core.dsend_run, _core.DedupTable, seed) == want
        assert _dsend_run_case(_core.dsend_run, _core.DedupTable, seed, False) == bare
        # the same ops decoded by the compiled decoder, their entries in place
        assert _dsend_run_case(_core.dsend_run, _core.DedupTable, seed, True, True) == want
        assert _dsend_run_case(_core.dsend_run, _core.DedupTable, seed, False, True) == bare
        assert _dsend_run_case(keys.py_dsend_run, dedup.DedupWindow, seed, True, True) == want
    assert bare[:2] + bare[3:] == want[:2] + want[3:] and bare[2] is None
    stops, tokens, items, meta, _ = want
    assert tokens[0] >= 0 and tokens[1] >= 0
    assert len(meta) == sum(b - a for a, b in zip([0] + [x + 1 for x in stops], stops))
    # one store item a copy, in the order of the copies
    copies = [c for _, _, (_, cs) in meta for c in cs]
    assert [(i[2], i[4]) for i in items] == [
        (wire.py_tail_fields(t)[2], k) for t, k in zip(copies[2::4], copies[3::4])]


def _gsend_run_case(fn, table, bucket, seed):
    """A random frame of GSENDs through ``fn`` (py_gsend_run or its twin), run
    after run as Groups.gsend_many calls it (skipping the op a run stops at):
    where each run stopped, the tokens left, the items, the requests, the
    dedup entries."""
    rng = random.Random(seed)
    sender, skip = "s@x.org", 3
    groups = {}
    senders = {}
    for k in range(3):
        gid = bytes([k]) * 16
        g = groups_mod.Group(gid, rng.randrange(1, 5))
        for member in rng.sample(["s@x.org", "r@x.org", "t@y.org"], rng.randrange(1, 4)):
            g.members[member] = False
        if rng.random() < 0.8:
            g.buckets["x.org"] = bucket(1000.0, float(rng.randrange(0, 40)))
        if rng.random() < 0.85:
            targets = [("r@x.org", f"d{d}") for d in range(rng.randrange(0, 4))]
            g.fanout[(sender, skip)] = (targets, [(t, 7) for t in targets])
        if rng.random() < 0.85:
            senders[(gid, sender, skip)] = (SENDER_PACKED + bytes([k]), f"#{k}:{sender}/3")
        groups[gid] = g
    groups[b"\xff" * 16] = None  # named, gone
    refilled = {gid for gid in groups if rng.random() < 0.8}
    seen = table(600.0, 1000)
    ids = _ids(6, 7)
    seen.begin(sender, ids[0], 0, 1.0)           # decided: a resend
    seen.begin(sender, ids[1], PENDING, 1.0)     # in flight
    ops = []
    for _ in range(rng.randrange(1, 40)):
        gid = rng.choice(list(groups) + [b"\xee" * 16])
        g = groups.get(gid)
        version = g.version if g is not None and rng.random() < 0.9 else 9
        ops.append((1107, rng.choice(ids) if rng.random() < 0.2 else rng.randbytes(16), gid,
                    version, bytes(rng.randrange(0, 60))))
    buckets = [bucket(1000.0, float(rng.randrange(0, 60))) for _ in range(2)]
    buckets.append(bucket(1e6, float(rng.randrange(0, 1500))))
    items: list = []
    meta: list = []
    stops = []
    i = 0
    while i < len(ops):
        i = fn(ops, i, {k: v for k, v in groups.items() if v is not None}, sender, "x.org", skip,
               senders, refilled, buckets, seen, 2.0, TS, TS_PACKED, senders_mod.GDELIVER_HEAD,
               items, meta, "link")
        stops.append(i)
        i += 1
    tokens = [b.tokens for b in buckets] + [
        g.buckets["x.org"].tokens for g in groups.values() if g is not None and g.buckets]
    return stops, tokens, items, meta, sorted(seen.keys())


@pytest.mark.parametrize("seed", range(40))
def test_gsend_run_twins(seed):
    # the compiled run takes exactly the ops the specification takes, stops
    # where it stops and leaves the same tokens, items, requests and ids
    want = _gsend_run_case(groups_mod.py_gsend_run, dedup.DedupWindow, gate_mod.PyTokenBucket,
                           seed)
    if _core is not None:
        assert _gsend_run_case(_core.gsend_run, _core.DedupTable, _core.TokenBucket,
                               seed) == want
    stops, tokens, items, meta, _ = want
    assert min(tokens) >= 0
    assert len(items) == len(meta) == sum(
        b - a for a, b in zip([0] + [x + 1 for x in stops], stops))
    for (stored, cid, body, ts, dkeys), (link, mcid, (tail, head, targets)) in zip(items, meta):
        assert stored.startswith("#") and ts == TS
        assert mcid == cid and link == "link" and head == senders_mod.GDELIVER_HEAD
        assert targets and dkeys == [(t, 7) for t in targets]
        assert tail.startswith(SENDER_PACKED) and tail.endswith(body + TS_PACKED + b"\x00")
        assert wire.py_deliver_tail(tail[:len(SENDER_PACKED) + 1], cid, body, TS_PACKED, 0) == tail


def _gsend_long_run(fn, table, bucket, window):
    """60 GSENDs to one group that all pass but one mid-frame that resends an
    earlier one's id (pending: never evicted), against a window of
    ``window`` ids already full of decided ones: where each run stopped, the
    items, and the window's ids afterwards."""
    sender, skip, gid = "s@x.org", 3, b"\x01" * 16
    g = groups_mod.Group(gid, 1)
    g.members[sender] = False
    g.members["r@x.org"] = False
    g.buckets["x.org"] = bucket(1000.0, 1000.0)
    targets = [("r@x.org", "d0"), ("r@x.org", "d1")]
    g.fanout[(sender, skip)] = (targets, [(t, 7) for t in targets])
    senders = {(gid, sender, skip): (SENDER_PACKED, f"#1:{sender}/3")}
    seen = table(600.0, window)
    old = _ids(8, window)
    for k, cid in enumerate(old):
        seen.begin(sender, cid, 0, 1.0 + k)
    ops = [(1107, bytes([7, k]) * 8, gid, 1, b"body") for k in range(60)]
    ops[37] = (1107, ops[3][1], gid, 1, b"body")  # op 3's id, pending: the run stops
    buckets = [bucket(1000.0, 1000.0), bucket(1000.0, 1000.0), bucket(1e6, 1e6)]
    items: list = []
    meta: list = []
    stops = []
    i = 0
    while i < len(ops):
        i = fn(ops, i, {gid: g}, sender, "x.org", skip, senders, {gid}, buckets, seen, 2.0,
               TS, TS_PACKED, senders_mod.GDELIVER_HEAD, items, meta, "link")
        stops.append(i)
        i += 1
    return stops, items, meta, sorted(seen.keys())


@needs_c
@pytest.mark.parametrize("window", [5, 16, 40])
def test_gsend_run_twins_in_a_full_window(window):
    # the compiled run hashes and prefetches ids 16 at a time and loads the
    # lines of the entries their inserts evict: in a full window every insert
    # drops the oldest decided id (the frame's own, pending, are rotated),
    # across batch boundaries, and the answers stay the specification's
    want = _gsend_long_run(groups_mod.py_gsend_run, dedup.DedupWindow, gate_mod.PyTokenBucket,
                           window)
    got = _gsend_long_run(_core.gsend_run, _core.DedupTable, _core.TokenBucket, window)
    assert got == want
    stops, items, _, ids = want
    assert stops == [37, 60] and len(items) == 59
    # the frame's ids, pending, are all kept; every decided one was evicted
    assert ids == sorted(("s@x.org", bytes([7, k]) * 8) for k in range(60) if k != 37)


def _gsend_two_groups(fn, table, bucket, order, group_burst=5.0):
    """GSENDs to two groups in ``order`` (a string of ``a``/``b``), ``b`` at a
    version of its own, each group's bucket holding ``group_burst``: where each
    run stopped, every bucket's tokens, and the items' store senders."""
    sender, skip = "s@x.org", 3
    groups, senders = {}, {}
    for k, (name, version) in enumerate((("a", 1), ("b", 7))):
        gid = name.encode() * 16
        g = groups_mod.Group(gid, version)
        g.members[sender] = False
        g.buckets["x.org"] = bucket(1000.0, group_burst)
        targets = [("r@x.org", f"d{k}")]
        g.fanout[(sender, skip)] = (targets, [(t, 7) for t in targets])
        senders[(gid, sender, skip)] = (SENDER_PACKED, f"#{name}:{sender}/3")
        groups[gid] = g
    # each op's group id an object of its own, as the decoder makes them
    ops = [(1107, bytes([9, k]) * 8, c.encode() * 16, 1 if c == "a" else 7, b"body")
           for k, c in enumerate(order)]
    buckets = [bucket(1000.0, 1000.0), bucket(1000.0, 1000.0), bucket(1e6, 1e6)]
    seen = table(600.0, 100)
    items: list = []
    stops = []
    i = 0
    while i < len(ops):
        i = fn(ops, i, groups, sender, "x.org", skip, senders, set(groups), buckets, seen,
               2.0, TS, TS_PACKED, senders_mod.GDELIVER_HEAD, items, [], "link")
        stops.append(i)
        i += 1
    tokens = [b.tokens for b in buckets] + [g.buckets["x.org"].tokens for g in groups.values()]
    return stops, tokens, [item[0] for item in items]


@needs_c
@pytest.mark.parametrize("order", ["aaaa", "abab", "aabbba", "bbbbbbbaa", "abbbbbbba"])
def test_gsend_run_twins_across_groups(order):
    # the compiled run looks a group up again only when the group or the
    # version changes from the op before: each op still spends its own
    # group's tokens, and a group whose bucket runs out (5 tokens) stops the
    # run at its sixth op whatever came between
    want = _gsend_two_groups(groups_mod.py_gsend_run, dedup.DedupWindow,
                             gate_mod.PyTokenBucket, order)
    assert _gsend_two_groups(_core.gsend_run, _core.DedupTable, _core.TokenBucket,
                             order) == want
    stops, tokens, stored = want
    assert stored == [f"#{c}:s@x.org/3" for k, c in enumerate(order)
                      if order[:k + 1].count(c) <= 5]
    assert tokens[3:] == [5.0 - min(5, order.count(c)) for c in "ab"]


@needs_c
def test_gsend_run_leaves_other_buckets_to_the_precise_path():
    # the compiled run spends the compiled buckets in place: buckets of
    # another kind (never the relay's when the core is built) are left to
    # the caller's precise path, op by op, and nothing is spent or taken here
    stops, tokens, stored = _gsend_two_groups(_core.gsend_run, _core.DedupTable,
                                              gate_mod.PyTokenBucket, "aab")
    assert stops == [0, 1, 2] and stored == []
    assert tokens == [1000.0, 1000.0, 1e6, 5.0, 5.0]


@pytest.mark.parametrize("cids", [[], [MID], [bytes([i]) * 16 for i in range(40)],
                                  [MID, MID[:15]], [MID, "x" * 16], [bytearray(MID)]])
def test_reply_ok_ops_twins(cids):
    got = _same(lambda: wire.py_reply_ok_ops(list(cids)),
                _core and (lambda: _core.reply_ok_ops(list(cids))))
    if isinstance(got, list):
        assert got == [wire.reply_op(cid, 0) for cid in cids]
        if len(cids) > 1 and _core is not None:  # one op run, not a bytes object a REPLY
            [run] = _core.reply_ok_ops(list(cids))
            assert type(run) is wire.OpRun and run.ops() == got
        assert [msgpack.unpackb(op) for op in got] == [[2000, cid, 0, True, None]
                                                       for cid in cids]


_LEADING = [
    (1004, MID, "bob@example.org", False, (), ()),
    (1004, MID, "bob@example.org", True, (), ()),      # a part of a multi-op DSEND
    (1004, MID, "bob@example.org", 0, (), ()),         # not False itself
    (1004, MID, "bob@example.org", False, ()),
    (1004.0, MID, "bob@example.org", False, (), ()),
    (1003, MID, "bob@example.org", False, (), ()),
    [1004, MID, "bob@example.org", False, (), ()],
    (1, MID, "bob@example.org", b"x", 0),
    wire.OpError(1004, MID, ErrorCode.BAD_FIELD, "bad"),
]


@pytest.mark.parametrize("seed", range(10))
def test_field_set_and_recipients_by_sender_twins(seed):
    rng = random.Random(seed)
    names = ["a@x.org", "b@x.org", "c@y.org", "a@x.org".upper()]
    # runs of one recipient (the same str object), and equal strs from elsewhere
    meta = [(rng.choice(names) if rng.random() < 0.5 else "".join(rng.choice(names)), i, None)
            for i in range(rng.randrange(0, 50))]
    want = gate_mod.py_field_set(meta, 0)
    assert want == {m[0] for m in meta}
    assert gate_mod.py_field_set(meta, 1) == set(range(len(meta)))
    links = [_Requester(a) for a in names] + [_Requester("a@x.org")]
    reqs = [(rng.choice(links), bytes(16), (rng.choice(names), [])) for _ in range(len(meta))]
    pairs = keys_mod.py_recipients_by_sender(reqs)
    assert sum(len(v) for v in pairs.values()) == len({(r[0].address, r[2][0]) for r in reqs})
    # the gate's flat meta (to, tail, id a message): every third from the first
    flat = [x for m in meta for x in m]
    assert gate_mod.py_field_set(flat, 0, 3) == want
    assert gate_mod.py_field_set(flat, 1, 3) == set(range(len(meta)))
    with pytest.raises(ValueError):
        gate_mod.py_field_set(flat, 0, -3)
    if _core is not None:
        assert _core.field_set(meta, 0) == want
        assert _core.field_set([list(m) for m in meta], 1) == set(range(len(meta)))
        assert _core.field_set(flat, 0, 3) == want
        assert _core.field_set(flat, 1, 3) == set(range(len(meta)))
        with pytest.raises(ValueError):
            _core.field_set(flat, 0, -3)
        assert _core.recipients_by_sender(reqs) == pairs


@pytest.mark.parametrize("seed", range(10))
def test_copy_tails_twins(seed):
    # a stored batch's requests (link, id, (to, copies)), copies flat target,
    # device name, tail, device keys: their keys and tails, flat, in order
    rng = random.Random(seed)
    meta = []
    for i in range(rng.randrange(0, 20)):
        copies: list = []
        for d in range(rng.randrange(1, 5)):
            copies += ("b@x", f"d{d}", rng.randbytes(rng.randrange(1, 40)), (rng.randrange(99),))
        meta.append((object(), bytes([i]) * 16, ("b@x", copies)))
    want = keys_mod.py_copy_tails(meta)
    assert want == [x for _, _, (_, c) in meta for k in range(0, len(c), 4)
                    for x in (c[k + 3], c[k + 2])]
    bad = meta + [(object(), MID, ("b@x", ["b@x", "d0", b"t"]))]
    for fn in (keys_mod.py_copy_tails, _core and _core.copy_tails):
        if fn is not None:
            got = fn(meta)
            assert got == want and all(a is b for a, b in zip(got, want))
            with pytest.raises(InvalidArgument):
                fn(bad)


@pytest.mark.parametrize("seed", range(20))
def test_new_targets_twins(seed):
    # a frame's DSENDs in runs to one peer (one str object, as the decoder
    # gives them) and to others (equal strs made apart), some recipients
    # already answered: each new one once, in the order it first comes
    rng = random.Random(seed)
    names = ["a@x.org", "b@x.org", "c@y.org", "d@y.org"]
    ops = []
    for _ in range(rng.randrange(0, 60)):
        to = rng.choice(names)
        if rng.random() < 0.3:
            to = "".join(list(to))  # equal, not the same object
        op = (1004, bytes(16), to, False, (), ())
        ops.extend([op if rng.random() < 0.8 else list(op)] * rng.randrange(1, 4))
    reach = {n: rng.random() < 0.5 for n in names if rng.random() < 0.5}
    want = keys_mod.py_new_targets(ops, reach)
    firsts = []
    for op in ops:
        if op[2] not in reach and op[2] not in firsts:
            firsts.append(op[2])
    assert want == firsts
    if _core is not None:
        assert _core.new_targets(ops, reach) == want


class _Requester:
    def __init__(self, address):
        self.address = address


@pytest.mark.parametrize("seed", range(20))
def test_finish_run_twins(seed):
    # each link's run of stored requests decided and answered as one
    rng = random.Random(seed)
    links = [_Requester("a@x.org"), _Requester("b@x.org"), _Requester("a@x.org")]
    ids = _ids(12, 5)
    meta = [(rng.choice(links), rng.choice(ids), None) for _ in range(rng.randrange(1, 30))]

    def case(table):
        seen = table(600.0, 100)
        for cid in ids[:4]:
            seen.begin("a@x.org", cid, PENDING, 1.0)
            seen.wait("a@x.org", cid, ("waiter", cid))
        fn = batch_mod.py_finish_run if table is dedup.DedupWindow else _core.finish_run
        out = []
        i = 0
        while i < len(meta):
            cids: list = []
            waiters: list = []
            j = fn(meta, i, seen, 2.0, cids, waiters)
            assert j > i and all(m[0] is meta[i][0] for m in meta[i:j])
            out.append((i, j, cids, waiters))
            i = j
        return out, sorted((k, seen.get(*k)) for k in seen.keys())

    want = case(dedup.DedupWindow)
    if _core is not None:
        assert case(_core.DedupTable) == want
    codes = dict(want[1])
    assert all(codes[(link.address, cid)] == (0, 2.0) for link, cid, _ in meta)
    assert sum(len(w) for *_, w in want[0]) == len({cid for link, cid, _ in meta
                                                    if link.address == "a@x.org"} & set(ids[:4]))


_DSENDS = [
    (1004, MID, "bob@example.org", False, ((1, 5, b"c"),), ()),
    (1004, MID, "bob@example.org", True, ((1, 5, b"c"), (127, 16383, b"")), ((2, 1, b"o"),)),
    (1004, MID, "bob@example.org", False, (), ()),
    (1004, MID, "bob@example.org", 0, ((1, 5, b"c"),), ()),            # more not a bool
    (1004, MID, "bob@example.org", False, ((0, 5, b"c"),), ()),        # device id 0
    (1004, MID, "bob@example.org", False, ((128, 5, b"c"),), ()),      # device id 128
    (1004, MID, "bob@example.org", False, ((True, 5, b"c"),), ()),     # a bool is no int
    (1004, MID, "bob@example.org", False, ((1, 16384, b"c"),), ()),    # reg id 15 bits
    (1004, MID, "bob@example.org", False, ((1, 5, "c"),), ()),         # str body
    (1004, MID, "bob@example.org", False, ((1, 5, b"c" * 61441),), ()),
    (1004, MID, "bob@example.org", False, tuple((1, 5, b"") for _ in range(128)), ()),
    (1004, MID, "bob@example.org", False, ((1, 5),), ()),
    (1004, MID, "bob@example.org", False, [(1, 5, b"c")], ()),         # a list is no array here
    (1004, MID[:15], "bob@example.org", False, (), ()),
    (1004, MID, "not cached@x.org", False, (), ()),
    (1004, MID, "bob@example.org", False, ()),                         # arity
    (1003, MID, "bob@example.org", False, (), ()),
    (True, MID, "bob@example.org", False, (), ()),
    [1004, MID, "bob@example.org", False, (), ()],
]


def _dsend_frames():
    big = [(d, 16383, bytes([d]) * 300) for d in range(1, 128)]
    return [
        _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 5, b"c")], [])]),
        _frame([wire.dsend_op(bytes([i]) * 16, "bob@example.org", i % 2 == 0,
                              [(1, 5, bytes(i)), (127, 300, b"")], [(2, 1, b"own")])
                for i in range(40)]),
        _frame([wire.dsend_op(MID, "bob@example.org", False, big[:60], big[60:])]),
        _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 5, bytes(wire.MAX_BODY))],
                              [])]),
        _frame([]),
    ]


_DSEND_FRAMES_DECLINED = [
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 5, b"c")], []),
            wire.ping_op(1)]),                                         # another op
    _frame([wire.dsend_op(MID, "not cached@x.org", False, [(1, 5, b"c")], [])]),
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(0, 5, b"c")], [])]),
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(128, 5, b"c")], [])]),
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 16384, b"c")], [])]),
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 0, b"c")], [])]),
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 5, "c")], [])]),
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 5, b"c", 4)], [])]),
    _frame([wire.dsend_op(MID, "bob@example.org", False,
                          [(1, 5, b"")] * 128, [])]),                  # over 127 entries
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 5, bytes(wire.MAX_BODY + 1))],
                          [])]),
    _frame([msgpack.packb((1004, MID[:15], "bob@example.org", False, [], []))]),
    _frame([msgpack.packb((1004, MID, "bob@example.org", 0, [], []))]),
    _frame([msgpack.packb((1004, MID, "bob@example.org", False, []))]),
    _frame([msgpack.packb((1004, MID, "bob@example.org", False, [], [], 1))]),
    _frame([msgpack.packb((1004, MID, "bob@example.org", False, [], []))])[:-1],
    _frame([msgpack.packb((1004, MID, "bob@example.org", False, [], []))]) + b"\x00",
]


def _decoder_twins(plaintext, declined, spec, compiled, public):
    """A frame decoder's twins on ``plaintext``: the specification declines
    the ``declined`` frames and answers the others as the precise decoder
    does; the compiled one (if built) answers the same, of the same types;
    the public function answers it with the core, None without."""
    want = spec(plaintext)
    if plaintext in declined:
        assert want is None
    else:
        assert want is not None and want == wire.decode_client_frame_precise(plaintext)
    if _core is not None:
        got = compiled(plaintext)
        assert got == want
        if got:
            # a DSEND's entries read in place read as the spec's tuple
            assert [tuple if type(x).__name__ == "_Entries" else type(x)
                    for op in got for x in op] == [type(x) for op in want for x in op]
    assert public(plaintext) == (want if _core is not None else None)


def _decoder_fuzz(seed, frames, spec, compiled):
    """2000 frames of ``frames`` with a byte or two changed: the compiled
    decoder (if built) declines each or agrees with the specification."""
    rng = random.Random(seed)
    for _ in range(2000):
        data = bytearray(rng.choice(frames))
        for _ in range(rng.randrange(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        got = compiled(bytes(data)) if _core is not None else None
        assert got is None or got == spec(bytes(data))


def _py_decode_dsends(plaintext):
    return wire.py_decode_dsends(plaintext, wire._ADDR_OK)


def _c_decode_dsends(plaintext):
    return _core.decode_dsends(plaintext, wire._ADDR_OK)


@pytest.mark.parametrize("plaintext", _dsend_frames() + _DSEND_FRAMES_DECLINED)
def test_decode_dsends_twins(plaintext):
    _decoder_twins(plaintext, _DSEND_FRAMES_DECLINED, _py_decode_dsends, _c_decode_dsends,
                   wire.decode_dsends)


@needs_c
def test_decode_dsends_keeps_one_int_a_registration_id():
    # registration ids above Python's small ints are made once each and
    # kept: a frame's DSENDs to the same devices share them, and the values
    # are the specification's, at the range's ends too
    regs = [1, 256, 257, 9001, 0x3FFF]
    op = wire.dsend_op(MID, ADDR, False, [(d, r, b"c%d" % d) for d, r in enumerate(regs, 1)],
                       [])
    plaintext = _frame([op, op])
    got = _c_decode_dsends(plaintext)
    assert got == _py_decode_dsends(plaintext)
    first, second = (o[4] for o in got)
    assert [e[1] for e in first] == regs
    assert all(a[1] is b[1] for a, b in zip(first, second))
    assert _c_decode_dsends(plaintext)[0][4][2][1] is first[2][1]  # and from call to call


@needs_c
def test_decoded_entries_read_in_place_as_the_specifications_tuples():
    # a frame's entries: one record array for all its ops; each field reads
    # as the specification's tuple of (device id, registration id, body)
    ops = [wire.dsend_op(bytes([i]) * 16, ADDR, False,
                         [(d, 300 * d, bytes([d]) * (d * 7 % 50)) for d in range(1, 4 + i)],
                         [(9, 16383, b"own")] if i % 2 else []) for i in range(6)]
    plaintext = _frame(ops)
    got = _c_decode_dsends(plaintext)
    want = _py_decode_dsends(plaintext)
    assert got == want
    for g, w in zip(got, want):
        ents, own = g[4], g[5]
        assert type(ents).__name__ == "_Entries" and len(ents) == len(w[4])
        assert tuple(ents) == ents.totuple() == w[4] and list(ents) == list(w[4])
        assert (ents[0], ents[-1], ents[1:], ents[::-1]) == (
            w[4][0], w[4][-1], w[4][1:], w[4][::-1])
        assert ents == w[4] and not ents != w[4] and ents != w[4][:-1] and ents != list(w[4])
        assert copy.deepcopy(ents) == w[4] and type(copy.deepcopy(ents)) is tuple
        assert own == w[5] and (type(own) is tuple) is (not w[5])  # none: ()
        for bad in (len(ents), -len(ents) - 1):
            with pytest.raises(IndexError):
                ents[bad]
        with pytest.raises(TypeError):
            hash(ents)
        assert "entries" in repr(ents) and bool(ents)


def test_decode_dsends_fuzz():
    _decoder_fuzz(3, _dsend_frames()[:3], _py_decode_dsends, _c_decode_dsends)


GID = bytes(range(100, 116))


def _gsend_frames():
    return [
        _frame([wire.gsend_op(MID, GID, 1, b"m")]),
        _frame([wire.gsend_op(bytes([i]) * 16, GID, v, bytes([i]) * n)
                for i, (v, n) in enumerate([(0, 0), (127, 1), (128, 255), (255, 256),
                                            (65535, 300), (65536, 65535 // 4),
                                            (2**32 - 1, 10), (2**32, 10), (2**64 - 1, 10)])]),
        _frame([wire.gsend_op(MID, GID, 7, bytes(wire.MAX_BODY))]),
        _frame([wire.gsend_op(bytes([i]) * 16, GID, 3, b"x" * 100) for i in range(200)]),
    ]


_GSEND_FRAMES_DECLINED = [
    _frame([wire.gsend_op(MID, GID, 1, b"m"), wire.ping_op(1)]),      # another op
    _frame([wire.ping_op(1)]),
    _frame([wire.dsend_op(MID, "bob@example.org", False, [(1, 5, b"c")], [])]),
    _frame([wire.gsend_op(MID, GID, 1, bytes(wire.MAX_BODY + 1))]),
    _frame([msgpack.packb((1107, MID, GID[:15], 1, b"m"))]),
    _frame([msgpack.packb((1107, MID[:15], GID, 1, b"m"))]),
    _frame([msgpack.packb((1107, MID, GID, -1, b"m"))]),
    _frame([msgpack.packb((1107, MID, GID, 1.0, b"m"))]),
    _frame([msgpack.packb((1107, MID, GID, 1, "m"))]),
    _frame([msgpack.packb((1107, MID, GID, 1))]),
    _frame([msgpack.packb((1107, MID, GID, 1, b"m", 0))]),
    _frame([msgpack.packb((1106, MID, GID, 1, b"m"))]),
    _frame([wire.gsend_op(MID, GID, 1, b"m")])[:-1],
    _frame([wire.gsend_op(MID, GID, 1, b"m")]) + b"\x00",
]


@pytest.mark.parametrize("plaintext", _gsend_frames() + _GSEND_FRAMES_DECLINED)
def test_decode_gsends_twins(plaintext):
    _decoder_twins(plaintext, _GSEND_FRAMES_DECLINED, wire.py_decode_gsends,
                   _core and _core.decode_gsends, wire.decode_gsends)


def test_decode_gsends_fuzz():
    _decoder_fuzz(4, _gsend_frames()[:2], wire.py_decode_gsends, _core and _core.decode_gsends)


_LEADING_G = [
    (1107, MID, GID, 1, b"m"),
    (1107, MID, GID, 1),                               # arity
    (1107.0, MID, GID, 1, b"m"),
    [1107, MID, GID, 1, b"m"],
    (1004, MID, "bob@example.org", False, (), ()),
    wire.OpError(1107, MID, ErrorCode.BAD_FIELD, "bad"),
]


@pytest.mark.parametrize("kind", ["dsend", "gsend"])
@pytest.mark.parametrize("seed", range(25))
def test_leading_run_twins(kind, seed):
    # ops of the first shape of the pool, then any: the run is exactly the
    # leading ops of that shape (none of the others counts)
    pool, spec, name = {"dsend": (_LEADING, wire.py_leading_dsends, "leading_dsends"),
                        "gsend": (_LEADING_G, wire.py_leading_gsends, "leading_gsends")}[kind]
    rng = random.Random(seed)
    ops = [pool[0]] * rng.randrange(5) + [rng.choice(pool) for _ in range(4)]
    want = spec(ops)
    assert want == next((i for i, op in enumerate(ops) if op is not pool[0]), len(ops))
    if _core is not None:
        assert getattr(_core, name)(ops) == want


@pytest.mark.parametrize("op", _DSENDS, ids=range(len(_DSENDS)))
def test_dsend_ok_twins_accept_only_what_the_precise_check_accepts(op):
    addr_ok = {"bob@example.org"}
    got = _same(*_both(wire.py_dsend_ok), op, addr_ok)
    precise = wire._check_op(op, wire._CLIENT_CHECKS)
    if got:
        assert precise is op  # the fast path never accepts what the checker refuses
    elif precise is op:
        assert op[2] not in addr_ok  # it only declines what it cannot vouch for


def test_a_packed_frame_is_judged_sends_only_once():
    # a frame taken a piece at a time asks at every piece whether it holds
    # only SENDs: the answer is kept (the scan walks every op of the frame)
    frame = tuple(wire.send_op(bytes([i]) * 16, "bob@example.org", b"x", 0)
                  for i in range(100))
    plaintext = wire._array_header(len(frame)) + b"".join(frame)
    offsets = wire.py_frame_offsets(plaintext)
    packed = wire.PackedOps(plaintext, offsets)
    assert packed.sends_only()
    packed.plaintext = wire._array_header(1) + wire.ping_op(1)  # not looked at again
    assert packed.sends_only()
    other = wire.PackedOps(plaintext[:offsets[1]] + wire.ping_op(1) + plaintext[offsets[2]:],
                           offsets)
    assert not other.sends_only()


_GSENDS = [
    (1107, MID, MID, 3, b"ciphertext"),
    (1107, MID, MID, 0, b""),
    (1107, MID, MID, 2 ** 64 - 1, b"c" * 61440),
    (1107, MID, MID, 3, b"c" * 61441),                               # body too long
    (1107, MID, MID, -1, b"c"),                                      # negative version
    (1107, MID, MID, True, b"c"),                                    # a bool is no int
    (1107, MID, MID, 3.0, b"c"),
    (1107, MID, MID[:15], 3, b"c"),                                  # group id length
    (1107, MID[:15], MID, 3, b"c"),
    (1107, MID, "group", 3, b"c"),
    (1107, MID, MID, 3, "c"),                                        # str body
    (1107, MID, MID, 3),                                             # arity
    (1107, MID, MID, 3, b"c", 0),
    (1, MID, MID, 3, b"c"),
    (True, MID, MID, 3, b"c"),
    [1107, MID, MID, 3, b"c"],
]


@pytest.mark.parametrize("op", _GSENDS, ids=range(len(_GSENDS)))
def test_gsend_ok_twins_accept_exactly_what_the_precise_check_accepts(op):
    got = _same(*_both(wire.py_gsend_ok), op)
    precise = wire._check_op(op, wire._CLIENT_CHECKS)
    assert got == (precise is op)


def test_a_frame_of_gsends_needs_no_precise_check():
    # the run of leading ops the fast check vouches for covers GSENDs too:
    # a frame of them is not checked field by field in Python
    frame = tuple((1107, bytes([i]) * 16, MID, 3, b"c") for i in range(5))
    assert wire._unpack_client_whole(msgpack.packb(frame))[1] == 5
    bad = frame[:2] + ((1107, MID, MID, -1, b"c"),) + frame[3:]
    assert wire._unpack_client_whole(msgpack.packb(bad))[1] == 2


def _flat(pairs: list) -> list:
    return [x for pair in pairs for x in pair]


@pytest.mark.parametrize("batch", [
    [],
    _flat([("a@x", (1, b"abc")), ("b@y", (2, b"")), ("a@x", (3, b"z" * 70000))]),
    _flat([("a@x", (0, b"t")) for _ in range(100)]),
    # runs, interleaved, and an equal address that is another object
    _flat([("a@x", (1, b"ab")), ("a@x", (2, b"c")), ("b@y", (3, b"d")), ("a@x", (4, b"efg")),
           ("".join(["a@", "x"]), (5, b"h")), ("b@y", (6, b"")), ("b@y", (7, b"ij"))]),
    _flat([("a@x", (1, b"ab")), ("a@x", (2, 5))]),  # WrongType from both, mid-run
    ["a@x", (1, "not bytes")],            # WrongType from both
    ["a@x", (1,)],                        # WrongType from both
    ["a@x", [1, b"list"]],
    ["a@x", (1, b"ab"), "b@y"],           # odd: InvalidArgument from both
    # signals: the tail is the payload, among stored messages' pairs
    _flat([("a@x", b"abc"), ("a@x", (2, b"d")), ("b@y", b""), ("a@x", b"ef")]),
    ["a@x", bytearray(b"x")],             # WrongType from both
    # routed tails (the relay's 1:1 routes): their tails counted, not their heads
    _flat([("a@x", wire.routed_tail(1, b"abc")), ("a@x", (2, b"d")),
           ("b@y", wire.routed_tail(2**40, b"efgh")), ("a@x", b"\xc1" + bytes(8))]),
])
def test_bytes_by_address_twins(batch):
    got = _same(delivery.py_bytes_by_address, _core and _core.bytes_by_address, batch)
    if not isinstance(got, Exception):
        assert sum(got.values()) == sum(len(wire.route_parts(p)[1]) for p in batch[1::2])


class _Link:
    def __init__(self, features):
        self.features = frozenset(features)


class _Feed:
    """What the shared fan-out reads of a feed: its engine id, its link's
    features, and the bytes it holds."""

    def __init__(self, dev, features):
        self.dev = dev
        self.link = _Link(features)
        self.qbytes = 0


def _held_runs(online, items, skip, feeds, start):
    """held_offered by each twin on the same feeds (their counts set to ``start``
    first), given ``items`` as (device, payload) pairs and called with them
    flat: its answer (or the type of what it raised: len(None), after what
    came before was counted) and every feed's count after."""
    items = _flat(items)
    totals = []
    for fn in _both(delivery.py_held_offered):
        if fn is None:
            continue
        for f in feeds:
            f.qbytes = start
        try:
            got = fn(online, items, skip)
        except TypeError as exc:
            got = type(exc)
        totals.append((got, {f.dev: f.qbytes for f in feeds}))
    return totals


@pytest.mark.parametrize("seed", range(8))
def test_shared_rows_twins(seed):
    # a stored batch's shared rows: each message's payload with the devices
    # of its targets; devices_of is asked once a run of rows that share one
    # targets list (a group's cached fan-out), again whenever the list changes
    rng = random.Random(seed)
    lists = [[(f"u{k}@home", f"d{j}") for j in range(rng.randrange(0, 4))] for k in range(3)]
    shared = []
    for mid in range(1, 1 + rng.randrange(0, 30)):
        # runs of one list, as a batch of one group's messages, then another
        targets = shared[-1][1][2] if shared and rng.random() < 0.7 else rng.choice(lists)
        shared.append((mid, (bytes([mid]) * 3, b"\x99\xcd\x08\x34", targets)))
    calls = []

    def devices_of(targets, feature):
        calls.append(targets)
        # a fresh list each call: a row's list shows which call made it
        return [len(calls), feature, len(targets)]

    runs = []
    for fn in _both(delivery.py_shared_rows):
        if fn is not None:
            calls.clear()
            rows = fn(shared, devices_of, "groups")
            runs.append((rows, list(calls)))
    rows, made = runs[0]
    assert all(r == runs[0] for r in runs)
    assert [payload for payload, _ in rows] == [(mid, tail, head)
                                                for mid, (tail, head, _) in shared]
    # one call a run of rows with the same list object, in order
    starts = [k for k, (_, (_, _, t)) in enumerate(shared) if k == 0 or t is not
              shared[k - 1][1][2]]
    assert [id(t) for t in made] == [id(shared[k][1][2]) for k in starts]
    for k, (_, devs) in enumerate(rows):
        assert devs == [sum(1 for s in starts if s <= k), "groups",
                        len(shared[k][1][2])]
    for fn in _both(delivery.py_shared_rows):
        if fn is not None:  # a row of another shape fails the same way in both
            with pytest.raises(ValueError):
                fn(shared + [(99, (b"t", b"h"))], devices_of, "groups")


@pytest.mark.parametrize("seed", range(6))
def test_shared_fan_out_twins(seed):
    # rows stored once for many devices go to every listed device online on
    # a link with the feature, one shared payload per row, in order
    rng = random.Random(seed)
    devices = [(f"u{i % 7}@home", f"d{i}") for i in range(40)]
    by_device = {key: _Feed(i, rng.sample(["groups", "e2ee"], rng.randrange(3)))
                 for i, key in enumerate(devices) if rng.random() < 0.7}
    shared = [(mid, (bytes([mid]) * rng.randrange(1, 50), b"\x99\xcd\x08\x34",
                     rng.sample(devices, rng.randrange(len(devices)))))
              for mid in range(1, 1 + rng.randrange(1, 12))]
    runs = []
    rows = []
    repeats = rng.randrange(3)
    for resolve, fan in zip(_both(delivery.py_devices_of), _both(delivery.py_shared_items)):
        if fan is not None:
            rows = [((mid, tail, head), resolve(by_device, targets, "groups"))
                    for mid, (tail, head, targets) in shared]
            # as a batch of one group's messages: rows that share one list
            mid, tail, head = rows[-1][0]
            rows += [((mid + 100 + r, tail, head), rows[-1][1]) for r in range(repeats)]
            runs.append(fan(rows))
    items = runs[0]
    assert all(r == items for r in runs)
    want = [(dev, payload) for payload, devs in rows for dev in devs]
    assert items == want and len(want) >= len(
        [k for _, (_, _, targets) in shared for k in targets
         if k in by_device and "groups" in by_device[k].link.features]) > 0
    if len(runs) == 2:  # the payload object is shared, not copied per device
        firsts = {}
        for _, payload in runs[1]:
            assert firsts.setdefault(payload[0], payload) is payload

    # then what the engine placed is counted against each online feed
    online = {feed.dev: feed for feed in by_device.values() if rng.random() < 0.8}
    skip = frozenset(i for i in range(len(items)) if rng.random() < 0.2)
    totals = _held_runs(online, items, skip, by_device.values(), 0)
    assert all(t == totals[0] for t in totals)
    # and counted from the rows themselves (what offer_shared placed), the same
    for fn in _both(delivery.py_held_shared):
        if fn is not None:
            for f in by_device.values():
                f.qbytes = 0
            assert (fn(online, rows, skip),
                    {f.dev: f.qbytes for f in by_device.values()}) == totals[0]
    added, per_feed = totals[0]
    want_per_feed: dict = {}
    for i, (dev, payload) in enumerate(items):
        if i not in skip and dev in online:
            want_per_feed[dev] = want_per_feed.get(dev, 0) + len(payload[1])
    assert added == sum(want_per_feed.values()) > 0
    assert {d: n for d, n in per_feed.items() if n} == want_per_feed


#: every per-device copy's head (fastroute.relay.senders.DDELIVER_HEAD)
DDELIVER = b"\x98\xcd\x07\xd1"


def _copies(meta: list) -> list:
    """A stored batch's copies as ``(address, device name, tail)``, in order
    (each copy's device keys left out)."""
    return [tuple(copies[k:k + 3]) for _, _, (_, copies) in meta
            for k in range(0, len(copies), 4)]


@pytest.mark.parametrize("seed", range(6))
def test_per_device_copies_online_twins(seed):
    # a stored batch of per-device sends: each copy to its own device when
    # it is online on a link that negotiated e2ee, with its own row id
    rng = random.Random(seed)
    devices = [(f"u{i % 5}@home", f"d{i}") for i in range(20)]
    by_device = {key: _Feed(i, rng.sample(["groups", "e2ee"], rng.randrange(3)))
                 for i, key in enumerate(devices[1:], 1) if rng.random() < 0.7}
    by_device[devices[0]] = _Feed(0, ["e2ee"])  # online: at least one copy goes
    meta, n = [], 0
    for r in range(rng.randrange(1, 8)):
        targets = rng.sample(devices[1:], rng.randrange(0 if r else 1, 6))
        if not r:
            targets.insert(rng.randrange(len(targets)), devices[0])
        copies = [x for j, (a, d) in enumerate(targets)
                  for x in (a, d, bytes([n + j]) * 3, (n + j,))]
        n += len(targets)
        meta.append((object(), os.urandom(16), ("to@home", copies)))
    mids = list(range(100, 100 + n))
    flat = _copies(meta)
    want = [(by_device[(a, d)].dev, (mid, tail, DDELIVER)) for mid, (a, d, tail)
            in zip(mids, flat) if (a, d) in by_device
            and "e2ee" in by_device[(a, d)].link.features]
    runs = [fn(by_device, meta, mids, "e2ee") for fn in _both(delivery.py_copies_online)
            if fn is not None]
    assert len(runs) == (2 if fastroute.COMPILED else 1)
    assert all(r == _flat(want) for r in runs) and want  # flat: device, payload
    # the memory store's way: mids from an int on, and every copy's route
    # (its device keys and the very payload the engine gets, online or not)
    every = [x for k, (mid, (_, _, tail)) in enumerate(zip(mids, flat))
             for x in ((k,), (mid, tail, DDELIVER))]
    for fn in _both(delivery.py_copies_online):
        if fn is None:
            continue
        routes: list = ["before"]
        got = fn(by_device, meta, 100, "e2ee", routes)
        assert got == _flat(want) and routes == ["before"] + every
        payloads = {id(p) for p in routes[2::2]}
        assert all(id(p) in payloads for p in got[1::2])


def test_per_device_copies_online_bad_batches():
    # a copy cut short, or fewer row ids than copies: the same error from both
    assert DDELIVER == senders_mod.DDELIVER_HEAD
    by_device = {("a@home", "d1"): _Feed(7, ["e2ee"])}
    whole = ["a@home", "d1", b"tail", (1,)]
    for fn in _both(delivery.py_copies_online):
        if fn is None:
            continue
        assert fn(by_device, [(None, b"i" * 16, ("a@home", whole))], [5], "e2ee") == \
            [7, (5, b"tail", DDELIVER)]
        with pytest.raises(InvalidArgument, match="address, device name, tail"):
            fn(by_device, [(None, b"i" * 16, ("a@home", whole + ["a@home"]))], [5, 6], "e2ee")
        with pytest.raises(IndexError):
            fn(by_device, [(None, b"i" * 16, ("a@home", whole * 2))], [5], "e2ee")
        # an offline device's copy needs no row id to be skipped
        assert fn({}, [(None, b"i" * 16, ("a@home", whole))], [], "e2ee") == []


@pytest.mark.parametrize("seed", range(6))
def test_copies_in_runs_to_one_device_twins(seed):
    # what the relay sends through these: a sender's copies in runs to one
    # device (equal addresses that are other objects among them), devices
    # offline or on a link without the feature between the runs
    rng = random.Random(seed)
    feeds = {("a@home", "d1"): _Feed(1000 + seed, ["e2ee"]),
             ("a@home", "d2"): _Feed(2000, ["groups"]),
             ("b@home", "d1"): _Feed(3000, ["e2ee", "groups"])}
    keys = list(feeds) + [("c@home", "d9")]  # the last one offline
    meta, n = [], 0
    for _ in range(rng.randrange(3, 9)):
        a, d = keys[rng.randrange(len(keys))]
        copies: list = []
        for _ in range(rng.randrange(1, 5)):
            address = "".join(a) if rng.random() < 0.5 else a  # equal, not the same
            copies += (address, d, bytes([n % 256]) * (1 + n % 7), (n,))
            n += 1
        meta.append((object(), os.urandom(16), (a, copies)))
        if rng.random() < 0.5:
            # a per-device send to every device of one address: copies in turns
            turns = [x for (a2, d2) in keys if a2 == a
                     for x in (a2, d2, b"t%d" % n, (0,))] * 2
            n += len(turns) // 4
            meta.append((object(), os.urandom(16), (a, turns)))
    if seed == 0:  # keys that are not exact strs take the dict's own way
        feeds[(b"x@home", "d1")] = _Feed(4000, ["e2ee"])
        meta.append((object(), os.urandom(16), ("x", [b"x@home", "d1", b"bytes key", (1,),
                                                       "a@home", "d1", b"after", (2,)])))
        n += 2
    mids = list(range(1, n + 1))
    runs = [fn(feeds, meta, mids, "e2ee") for fn in _both(delivery.py_copies_online)
            if fn is not None]
    assert all(r == runs[0] for r in runs)
    flat = _copies(meta)
    pairs = list(zip(runs[0][0::2], runs[0][1::2]))
    assert pairs == [(feeds[(a, d)].dev, (mid, tail, DDELIVER))
                     for mid, (a, d, tail) in zip(mids, flat)
                     if (a, d) in feeds and "e2ee" in feeds[(a, d)].link.features]
    # and what the engine placed of them is counted once per feed and run
    online = {f.dev: f for f in feeds.values()}
    items = pairs + [(9999, (1, b"offline", b""))] + pairs[:3]
    skip = frozenset(i for i in range(len(items)) if rng.random() < 0.25)
    bad = items[:2] + [(items[0][0] if items else 1000 + seed, (5, None, b""))] + items[2:]
    for batch in (items, bad):
        totals = _held_runs(online, batch, skip, feeds.values(), 7)
        assert all(t == totals[0] for t in totals)
    assert totals[0][0] is TypeError or 2 in skip


@pytest.mark.parametrize("make", [
    # DDELIVER [2001, seq, from, from_device, id, body, ts_ms, cls]
    lambda seq: msgpack.packb((2001, seq, SENDER, 3, MID, b"copy", TS, 0), use_bin_type=True),
    # GDELIVER [2100, seq, group, from, from_device, id, body, ts_ms, cls]
    lambda seq: msgpack.packb((2100, seq, b"g" * 16, SENDER, 3, MID, b"grp", TS, 0),
                              use_bin_type=True),
], ids=["ddeliver", "gdeliver"])
def test_a_duplicate_feature_delivery_does_not_ack_its_untaken_original(make, _known_sender):
    # The same rule as for DELIVER: a redelivery dropped as a duplicate must
    # not ack (cumulatively) its original while that still waits in the inbox.
    async def go():
        c = client_mod.Client("h", 1, credential=b"", static=None)
        c._rx = _Plain()
        c._proto = _Proto()
        c._on_frame(_frame([make(1)]))
        c._on_frame(_frame([make(2)]))  # the same (sender, id): a duplicate
        assert len(c._inbox) == 1 and c.duplicates_dropped == 1
        assert c._ack_upto == 0  # nothing taken: nothing may be acked
        if c._ack_timer is not None:
            c._ack_timer.cancel()

    asyncio.run(go())


def _plain_gate(gate_cls, link_cls, table, out):
    """A gate of one known address (no consent, taps or blocks) and a link of
    alice's with ample quota, answering into ``out``."""
    gate = gate_cls({ADDR: [1]}, table, None, [], lambda code: None, wire.sack_op,
                    (ErrorCode.BODY_TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT,
                     ErrorCode.CONSENT_REQUIRED, ErrorCode.RATE_LIMITED), {})
    lg = link_cls("conn", out, "alice@example.org", SENDER_PACKED, "example.org",
                  1000, None, None)
    lg.msg_tokens, lg.byte_tokens = 1000.0, 1e9
    return gate, lg


@needs_c
@pytest.mark.parametrize("max_entries", [5, 23, 1000])
def test_accept_sends_twins_across_prefetch_batches(max_entries):
    # the compiled loop hashes and prefetches ids 16 at a time, probes each
    # once and records it where that probe ended: across batch boundaries,
    # with eviction and growth of the table between probe and record, with
    # duplicates in other batches and a bad id mid-read, it must still
    # answer and record exactly like the specification
    ids = [i.to_bytes(2, "big") * 8 for i in range(60)]
    sends = [(1, ids[i % 45], ADDR, b"x" * (i % 7), i % 3 == 0) for i in range(70)]
    sends = [(1, cid, to, body, int(cls)) for _, cid, to, body, cls in sends]
    gates = []
    for fn, impl, gate_cls, link_cls in (
            (gate_mod.py_accept_sends, dedup.DedupWindow, gate_mod.PySendGate,
             gate_mod.PyLinkGate),
            (_core.accept_sends, _core.DedupTable, _core.SendGate, _core.LinkGate)):
        table = impl(30.0, max_entries)
        for i in range(50, 60):  # older entries, some of them decided
            table.begin("alice@example.org", ids[i], PENDING if i % 2 else 0, 90.0 + i / 10)
        results = []
        for batch in (sends, sends[:37] + [(1, b"short", ADDR, b"", 0)] + sends[37:]):
            out: list = []
            store_items: list = []
            meta: list = []
            gate, lg = _plain_gate(gate_cls, link_cls, table, out)
            try:
                ephemeral = fn(gate, lg, _flat_sends(batch), 100.0, TS, TS_PACKED,
                               store_items, meta)
            except InvalidArgument:
                ephemeral = "raised"
            results.append((ephemeral, wire.flat_ops(out), store_items, meta,
                            [(k, table.get(*k)) for k in table.keys()]))
        gates.append((results, _contents(table)))
    assert gates[0] == gates[1]
    (first, second), _ = gates[0]
    assert second[0] == "raised" and len(second[1]) > 0  # the ids before it were answered
    # stored and ephemeral ones alike are flat pairs
    taken = len(first[2]) // 2 + len(first[0]) // 2
    # a full window forgot decided ids, which are then taken anew
    assert taken == 45 if max_entries == 1000 else taken > 45


def test_accept_sends_refuses_a_cut_send():
    # flat SENDs, four fields each: a list cut short is refused before any
    # id is looked at, by both twins
    for fn, impl, gate_cls, link_cls in (
            (gate_mod.py_accept_sends, dedup.DedupWindow, gate_mod.PySendGate,
             gate_mod.PyLinkGate),
            (gate_mod.accept_sends, dedup.DedupTable, gate_mod.SendGate, gate_mod.LinkGate)):
        table = impl(30.0, 100)
        out: list = []
        gate, lg = _plain_gate(gate_cls, link_cls, table, out)
        sends = [MID, ADDR, b"x", 0, bytes(16), ADDR, b"y"]
        with pytest.raises(InvalidArgument, match="id, to, body, cls"):
            fn(gate, lg, sends, 100.0, TS, TS_PACKED, [], [])
        assert out == [] and len(table) == 0
        items: list = []
        assert fn(gate, lg, sends[:4], 100.0, TS, TS_PACKED, items, []) is None
        assert [wire.py_tail_fields(t)[:3] for t in items[1::2]] == [
            ("alice@example.org", MID, b"x")]


@needs_c
def test_stored_sacks_twins_over_many_ids():
    ids = [i.to_bytes(2, "big") * 8 for i in range(40)]
    meta = [x for cid in ids for x in (ADDR, b"tail", cid)]
    entries = [("a@b.c", ids[i], PENDING, 1.0, [("conn", ids[i])] if i % 5 == 0 else None)
               for i in range(0, 40, 2)]
    py, c = _twins()
    got = _stored_run(gate_mod.py_stored_sacks, py, meta, entries)
    assert _stored_run(_core.stored_sacks, c, meta, entries) == got
    assert [op for op in got[0] if not op.startswith(b"waiters")] == \
        [wire.sack_op(cid, 0) for cid in ids]
    assert len(got[1]) == 4


@needs_c
@pytest.mark.parametrize("seed", range(30))
def test_stored_sacks_and_finish_run_twins_find_a_batch_where_it_lies(seed):
    # The compiled functions look for each entry in the slot after the one
    # before (a batch's pending entries are added in a row) and probe where
    # it is not.  Every way an entry can be elsewhere, and the same answers
    # as the specification's: entries of other senders (one with the same
    # id), of ephemeral ids and holes between a batch's (forget), an entry
    # recorded in place, ids never recorded, pending entries rotated by a
    # full window, a table grown past its first size, a sender str equal but
    # not the same object.
    rng = random.Random(seed)
    sender = "a@b.c"
    twin_sender = "".join(["a@", "b.c"])  # equal, another object
    ids = [rng.randbytes(16) for _ in range(rng.choice([5, 40, 200]))]
    others = [rng.randbytes(16) for _ in range(60)]
    max_entries = rng.choice([8, 50, 1000])
    ops = []
    for cid in rng.sample(ids, len(ids) // 5):  # recorded before, some decided
        ops.append(("begin", sender, cid, rng.choice([0, PENDING]), 0.5))
    for cid in ids:
        r = rng.random()
        if r < 0.1:
            continue  # never recorded: the finish records it
        if r < 0.2:
            ops.append(("begin", "x@y", cid, 0, 0.7))  # another sender's same id
        elif r < 0.25:
            ops.append(("begin", rng.choice(["x@y", sender]), rng.choice(others), 0, 0.7))
        if r < 0.3:
            hole = rng.choice(others)
            ops.append(("begin", sender, hole, 0, 0.7))
            ops.append(("forget", sender, hole))
        ops.append(("begin", rng.choice([sender, twin_sender]), cid, PENDING, 1.0))
        if rng.random() < 0.1:
            ops.append(("wait", sender, cid, ("conn", cid)))

    def case(impl, fn, finish):
        table = impl(30.0, max_entries)
        for op in ops:
            getattr(table, op[0])(*op[1:])
        answered: list = []
        if finish:
            link = _Requester(sender)
            meta = [(link, cid, None) for cid in ids]
            waiters: list = []
            cids: list = []
            assert fn(meta, 0, table, 12.5, cids, waiters) == len(meta)
            answered = [cids, waiters]
        else:
            out: list = []
            fn([x for cid in ids for x in (ADDR, b"tail", cid)], sender, table, 12.5, out,
               lambda *a: answered.append(a))
            answered.append(wire.flat_ops(out))
        return answered, _contents(table)

    for finish, spec, compiled in ((False, gate_mod.py_stored_sacks, _core.stored_sacks),
                                   (True, batch_mod.py_finish_run, _core.finish_run)):
        want = case(dedup.DedupWindow, spec, finish)
        assert case(_core.DedupTable, compiled, finish) == want
        decided = {k[1]: v for k, v, _ in want[1] if k[0] == sender}
        if max_entries >= 2 * len(ids) + len(others):
            # room for all: none evicted by the ids the finish records
            assert all(decided[cid] == (0, 12.5) for cid in ids)


def test_pack_rows_twins():
    # a pack's data as both writers make it (msgpack of (mid, sender, id,
    # body, ts_ms, exp_ms) entries), every length encoding of its strs, bins
    # and ints; senders in runs and not, non-ASCII ones; then data no writer
    # makes (negative ints, a float, a list of 5, a sender as bin, invalid
    # UTF-8, cut short, trailing bytes, not an array) the specification's way
    rng = random.Random(11)
    senders = ["a@p", "b@p", "é@p", "x" * 31 + "@p", "y" * 300 + "@p", "z" * 70000]
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1]
    cases = []
    for _ in range(150):
        n = rng.choice([0, 1, 2, 15, 16, 17, 300, 70000 if rng.random() < 0.02 else 3])
        sender = rng.choice(senders)
        entries = []
        for _ in range(n):
            if rng.random() < 0.3:
                sender = rng.choice(senders)
            size = rng.choice([0, 1, 31, 32, 255, 256, 65535, 65536]) if rng.random() < 0.2 \
                else rng.randrange(0, 120)
            entries.append((rng.choice(ints), sender, os.urandom(16), os.urandom(size),
                            rng.choice(ints), rng.choice(ints)))
        cases.append(msgpack.packb(entries))
    good = msgpack.packb([(1, "a@p", MID, b"body", TS, TS)] * 3)
    cases += [
        msgpack.packb([(1, "a@p", MID, b"b", -5, TS)]),
        msgpack.packb([(1, "a@p", MID, b"b", TS, -1)]),
        msgpack.packb([(1, "a@p", MID, b"b", 1.5, TS)]),
        msgpack.packb([(1, "a@p", MID, b"b", TS)]),
        msgpack.packb([(1, b"a@p", MID, b"b", TS, TS)]),
        msgpack.packb([(1, "a@p", "id", b"b", TS, TS)]),
        b"\x91\x96\x01\xa2\xff\xfe\xc4\x00\xc4\x00\x01\x01",  # invalid UTF-8 sender
        good[:-1], good[:1], good + b"\x00", msgpack.packb(5), msgpack.packb({}), b"",
        bytearray(good), memoryview(good), None,
    ]
    for data in cases:
        want = _same(store.py_pack_rows, _core and _core.pack_rows, data)
        if not isinstance(want, Exception):
            assert all(type(r) is tuple and len(r) == 5 for r in want)
            assert want == [e[:5] for e in msgpack.unpackb(data, use_list=False)]
