"""The wire codec: round trips, every rejection with its code, frame splitting."""

from __future__ import annotations

import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastroute import wire
from fastroute.errors import BodyTooLarge, ErrorCode, ProtocolError
from fastroute.wire import (
    MAX_BODY,
    MAX_OPS_PER_FRAME,
    MAX_PLAINTEXT,
    Op,
    OpBatcher,
    OpError,
    decode_client_frame,
    decode_server_frame,
)

MID = bytes(range(16))
ADDR = "alice@home.example"


def frame_of(*ops: object) -> bytes:
    """Pack arbitrary (possibly invalid) ops as a frame, bypassing the builders."""
    return msgpack.packb(list(ops), use_bin_type=True)


def encode_raw(ops) -> bytes:
    return msgpack.packb(ops, use_bin_type=True)


def test_constants_match_the_contract():
    assert MAX_PLAINTEXT == 65535 - 16
    assert MAX_BODY == 61440
    assert (wire.CLS_PERSISTENT, wire.CLS_EPHEMERAL, wire.PROTOCOL_VERSION) == (0, 1, 1)
    assert [int(o) for o in Op] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000, 1001, 1002, 1003, 1004,
                                    *range(1100, 1108), 1200, 1201, 1202,
                                    16, 17, 18, 19, 20, 21, 22, 23, 2000, 2001, 2002, 2100, 2101]
    # every client opcode in a client range, every relay one outside them
    client = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000, 1001, 1002, 1003, 1004, *range(1100, 1108),
              1200, 1201, 1202}
    assert {int(o) for o in Op if wire.is_client_opcode(o)} == client


def test_media_ops_round_trip_and_checks():
    from fastroute.errors import ErrorCode as EC
    up, blob = bytes(range(16)), bytes(range(32))
    data = b"x" * MAX_BODY
    ops = [wire.mbegin_op(MID, 10, blob), wire.mchunk_op(MID, up, 3, data),
           wire.mfinish_op(MID, up), wire.mget_op(MID, blob, 0)]
    assert wire.decode_client_frame(wire.pack_frames(ops[:1] + ops[2:])[0]) == [
        (6, MID, 10, blob), (8, MID, up), (9, MID, blob, 0)]
    assert wire.decode_client_frame(wire.pack_frames(ops[1:2])[0]) == [(7, MID, up, 3, data)]
    bad = wire.decode_client_frame(encode_raw([
        [6, MID, 0, blob], [6, MID, 5, b"short"], [7, MID, up, -1, b""],
        [7, MID, up, 0, b"y" * (MAX_BODY + 1)], [8, MID], [9, MID, blob]]))
    assert [(o.code, o.id) for o in bad] == [
        (EC.BAD_FIELD, MID), (EC.BAD_FIELD, MID), (EC.BAD_FIELD, MID),
        (EC.BAD_CHUNK, MID), (EC.MALFORMED, MID), (EC.MALFORMED, MID)]
    # the relay's answers, including a full chunk of data
    replies = [wire.mreply_op(MID, 0, [up, MAX_BODY]), wire.mreply_op(MID, 0, blob),
               wire.mreply_op(MID, 0, [100, 1, data]), wire.mreply_op(MID, 304)]
    got = [op for f in wire.pack_frames(replies) for op in wire.decode_server_frame(f)]
    assert got == [(22, MID, 0, (up, MAX_BODY)), (22, MID, 0, blob),
                   (22, MID, 0, (100, 1, data)), (22, MID, 304, None)]
    with pytest.raises(wire.InvalidArgument):
        wire.mget_op(MID, b"short", 0)


def test_consent_op_round_trip_and_checks():
    from fastroute.errors import ErrorCode as EC
    ops = wire.decode_client_frame(encode_raw([[5, MID, "acme", True], [5, MID, "*", False]]))
    assert ops == [(5, MID, "acme", True), (5, MID, "*", False)]
    bad = wire.decode_client_frame(encode_raw([[5, MID, "acme", 1],
                                               [5, MID, "Not A Provider", True],
                                               [5, MID, "acme"]]))
    assert [(type(o).__name__, o.code, o.id) for o in bad] == [
        ("OpError", EC.BAD_FIELD, MID), ("OpError", EC.BAD_FIELD, MID),
        ("OpError", EC.MALFORMED, MID)]
    assert wire.decode_client_frame(wire.pack_frames([wire.consent_op(MID, "*", True)])[0]) == \
        [(5, MID, "*", True)]
    with pytest.raises(wire.InvalidArgument):
        wire.consent_op(MID, "UPPER", True)


def test_client_ops_round_trip():
    ops = [wire.send_op(MID, ADDR, b"body", wire.CLS_EPHEMERAL), wire.dack_op(7),
           wire.ping_op(-3), wire.bye_op()]
    [plaintext] = wire.pack_frames(ops)
    assert decode_client_frame(plaintext) == [
        (1, MID, ADDR, b"body", 1), (2, 7), (3, -3), (4,)]


def test_server_ops_round_trip():
    ops = [wire.welcome_op(ADDR, "phone-1", 1_700_000_000_000), wire.sack_op(MID, 0),
           wire.sack_op(MID, ErrorCode.UNKNOWN_RECIPIENT),
           wire.deliver_op(9, "bob@other.example", MID, b"\x00" * 100, 123, 0),
           wire.error_op(ErrorCode.MALFORMED, "bad"), wire.pong_op(5),
           wire.server_bye_op(ErrorCode.SHUTTING_DOWN, "later")]
    [plaintext] = wire.pack_frames(ops)
    assert decode_server_frame(plaintext) == [
        (16, ADDR, "phone-1", 1_700_000_000_000), (17, MID, 0), (17, MID, 300),
        (18, 9, "bob@other.example", MID, b"\x00" * 100, 123, 0), (19, 100, "bad"),
        (20, 5), (21, 503, "later")]


def test_encode_ops_takes_tuples_in_the_decoded_layout():
    ops = [(1, MID, ADDR, b"x", 0), (2, 1)]
    assert decode_client_frame(wire.encode_ops(ops)) == ops
    assert decode_client_frame(wire.encode_ops([])) == []


def test_directions_are_not_interchangeable():
    [f] = wire.pack_frames([wire.sack_op(MID)])
    [err] = decode_client_frame(f)
    assert err.code == ErrorCode.UNKNOWN_OP and err.opcode == 17
    [f] = wire.pack_frames([wire.dack_op(1)])
    assert decode_server_frame(f)[0].code == ErrorCode.UNKNOWN_OP


BAD_CLIENT_OPS = [
    # (op, expected code, id recoverable)
    ([], ErrorCode.MALFORMED, False),
    ("not an array", ErrorCode.MALFORMED, False),
    (7, ErrorCode.MALFORMED, False),
    (["1", MID, ADDR, b"x", 0], ErrorCode.MALFORMED, False),
    ([True, MID, ADDR, b"x", 0], ErrorCode.MALFORMED, False),  # bool is no opcode
    ([1.0, MID, ADDR, b"x", 0], ErrorCode.MALFORMED, False),
    ([99], ErrorCode.UNKNOWN_OP, False),
    ([-1, 2], ErrorCode.UNKNOWN_OP, False),
    ([2**64 - 1], ErrorCode.UNKNOWN_OP, False),
    ([1, MID, ADDR, b"x"], ErrorCode.MALFORMED, True),  # arity
    ([1, MID, ADDR, b"x", 0, 0], ErrorCode.MALFORMED, True),
    ([1], ErrorCode.MALFORMED, False),
    ([1, MID[:15], ADDR, b"x", 0], ErrorCode.BAD_FIELD, False),
    ([1, MID + b"\x00", ADDR, b"x", 0], ErrorCode.BAD_FIELD, False),
    ([1, MID.hex()[:16], ADDR, b"x", 0], ErrorCode.BAD_FIELD, False),  # str, not bin
    ([1, MID, "no-at-sign", b"x", 0], ErrorCode.BAD_FIELD, True),
    ([1, MID, "a@UPPER", b"x", 0], ErrorCode.BAD_FIELD, True),
    ([1, MID, "a@b@c", b"x", 0], ErrorCode.BAD_FIELD, True),
    ([1, MID, "@b", b"x", 0], ErrorCode.BAD_FIELD, True),
    ([1, MID, "a" * 65 + "@b", b"x", 0], ErrorCode.BAD_FIELD, True),
    ([1, MID, "alice@home.example\n", b"x", 0], ErrorCode.BAD_FIELD, True),
    ([1, MID, b"alice@b", b"x", 0], ErrorCode.BAD_FIELD, True),
    ([1, MID, ADDR, "text body", 0], ErrorCode.BAD_FIELD, True),
    ([1, MID, ADDR, b"x" * (MAX_BODY + 1), 0], ErrorCode.BODY_TOO_LARGE, True),
    ([1, MID, ADDR, b"x", 2], ErrorCode.BAD_FIELD, True),
    ([1, MID, ADDR, b"x", -1], ErrorCode.BAD_FIELD, True),
    ([1, MID, ADDR, b"x", True], ErrorCode.BAD_FIELD, True),
    ([1, MID, ADDR, b"x", None], ErrorCode.BAD_FIELD, True),
    ([1, MID, ADDR, b"x", {"k": 1}], ErrorCode.BAD_FIELD, True),  # maps are never fields
    ([1, MID, ADDR, b"x", msgpack.ExtType(5, b"e")], ErrorCode.BAD_FIELD, True),
    ([1, MID, ADDR, msgpack.Timestamp(1, 0), 0], ErrorCode.BAD_FIELD, True),  # ext -1
    ([2], ErrorCode.MALFORMED, False),
    ([2, 1, 2], ErrorCode.MALFORMED, False),
    ([2, -1], ErrorCode.BAD_FIELD, False),  # negative seq
    ([2, False], ErrorCode.BAD_FIELD, False),
    ([2, 1.5], ErrorCode.BAD_FIELD, False),
    ([2, "3"], ErrorCode.BAD_FIELD, False),
    ([3], ErrorCode.MALFORMED, False),
    ([3, "t"], ErrorCode.BAD_FIELD, False),
    ([3, True], ErrorCode.BAD_FIELD, False),
    ([4, 0], ErrorCode.MALFORMED, False),
]


@pytest.mark.parametrize("op, code, has_id", BAD_CLIENT_OPS,
                         ids=[f"{i}-{c.name}" for i, (_, c, _) in enumerate(BAD_CLIENT_OPS)])
def test_bad_client_op_gives_its_code(op, code, has_id):
    [result] = decode_client_frame(frame_of(op))
    assert isinstance(result, OpError)
    assert result.code == code
    assert result.id == (MID if has_id else None)


BAD_SERVER_OPS = [
    ([16, ADDR, "phone"], ErrorCode.MALFORMED),
    ([16, "nobody", "phone", 1], ErrorCode.BAD_FIELD),
    ([16, ADDR, "bad device", 1], ErrorCode.BAD_FIELD),
    ([16, ADDR, "phone", -1], ErrorCode.BAD_FIELD),
    ([17, MID], ErrorCode.MALFORMED),
    ([17, MID, -2], ErrorCode.BAD_FIELD),
    ([17, b"short", 0], ErrorCode.BAD_FIELD),
    ([18, 1, ADDR, MID, b"x", 0], ErrorCode.MALFORMED),
    ([18, -1, ADDR, MID, b"x", 0, 0], ErrorCode.BAD_FIELD),
    ([18, True, ADDR, MID, b"x", 0, 0], ErrorCode.BAD_FIELD),
    ([18, 1, "x", MID, b"x", 0, 0], ErrorCode.BAD_FIELD),
    ([18, 1, ADDR, b"", b"x", 0, 0], ErrorCode.BAD_FIELD),
    ([18, 1, ADDR, MID, b"x" * (MAX_BODY + 1), 0, 0], ErrorCode.BODY_TOO_LARGE),
    ([18, 1, ADDR, MID, b"x", -5, 0], ErrorCode.BAD_FIELD),
    ([18, 1, ADDR, MID, b"x", 0, 3], ErrorCode.BAD_FIELD),
    ([19, 100], ErrorCode.MALFORMED),
    ([19, "100", "r"], ErrorCode.BAD_FIELD),
    ([19, 100, b"r"], ErrorCode.BAD_FIELD),
    ([20, None], ErrorCode.BAD_FIELD),
    ([21, 0], ErrorCode.MALFORMED),
    ([1, MID, ADDR, b"x", 0], ErrorCode.UNKNOWN_OP),
]


@pytest.mark.parametrize("op, code", BAD_SERVER_OPS,
                         ids=[f"{i}-{c.name}" for i, (_, c) in enumerate(BAD_SERVER_OPS)])
def test_bad_server_op_gives_its_code(op, code):
    [result] = decode_server_frame(frame_of(op))
    assert isinstance(result, OpError) and result.code == code


def test_bad_op_in_the_middle_keeps_its_neighbours():
    good1 = (1, MID, ADDR, b"one", 0)
    good3 = (1, bytes(16), ADDR, b"three", 1)
    ops = decode_client_frame(frame_of(good1, [1, MID, ADDR, b"two", 7], good3))
    assert ops[0] == good1 and ops[2] == good3
    assert isinstance(ops[1], OpError)
    assert (ops[1].code, ops[1].opcode, ops[1].id) == (ErrorCode.BAD_FIELD, 1, MID)


def test_body_limit_is_inclusive_and_maps_to_body_too_large():
    [ok] = decode_client_frame(frame_of([1, MID, ADDR, b"x" * MAX_BODY, 0]))
    [big] = decode_client_frame(frame_of([1, MID, ADDR, b"x" * (MAX_BODY + 1), 0]))
    assert ok[3] == b"x" * MAX_BODY
    assert isinstance(big.exception(), BodyTooLarge)


def test_op_error_is_not_indexable_like_an_op():
    [err] = decode_client_frame(frame_of([99]))
    with pytest.raises(TypeError):
        err[0]


@pytest.mark.parametrize("plaintext", [
    b"",                                   # empty
    b"\xc1",                               # never-used byte
    b"\x93\x01",                           # truncated array
    frame_of([2, 1]) + b"\x00",            # trailing bytes
    msgpack.packb({"op": 1}),              # a map, not an array
    msgpack.packb(5),
    msgpack.packb(b"ops"),
    msgpack.packb(msgpack.ExtType(1, b"x")),
    b"\x91\xa2\xff\xfe",                   # invalid UTF-8 in a str
    b"\x91" * 5000,                        # nesting deeper than msgpack's stack
    b"\xdd\xff\xff\xff\xff",               # array32 claiming 4G elements
    frame_of([19, 1, "r" * (wire.MAX_REASON_LEN + 1)]),  # longer than any allowed str
    b"\x91\x81\x91\x01\x02",               # map with a non-str key (strict_map_key)
])
def test_unusable_frame_raises_malformed(plaintext):
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(plaintext)
    assert info.value.code == ErrorCode.MALFORMED


def test_oversized_frame_is_rejected_before_decoding():
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(b"\x90" + b"\x00" * MAX_PLAINTEXT)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_ops_per_frame_limit():
    def byes(n: int) -> bytes:
        return b"\xdc" + n.to_bytes(2, "big") + b"\x91\x04" * n

    assert len(decode_client_frame(byes(MAX_OPS_PER_FRAME))) == MAX_OPS_PER_FRAME
    with pytest.raises(ProtocolError):
        decode_client_frame(byes(MAX_OPS_PER_FRAME + 1))


def test_duplicate_map_keys_inside_an_op_are_rejected():
    # {"a": 1, "a": 2} hand-encoded: msgpack-python would never produce it
    dup = b"\x82\xa1a\x01\xa1a\x02"
    send = b"\x95\x01\xc4\x10" + MID + b"\xa3a@b\xc4\x00" + dup  # dup map as cls
    plaintext = b"\x92" + frame_of((2, 1))[1:] + send
    ops = decode_client_frame(plaintext)
    assert ops[0] == (2, 1)
    assert ops[1].code == ErrorCode.BAD_FIELD and ops[1].id == MID


def test_deep_nesting_inside_an_op_is_a_field_error():
    [err] = decode_client_frame(frame_of([1, MID, ADDR, [[[[b"x"]]]], 0]))
    assert err.code == ErrorCode.BAD_FIELD


# -- frames --------------------------------------------------------------------

def test_pack_frames_splits_and_keeps_order():
    body = os.urandom(MAX_BODY)
    ops = [wire.deliver_op(i, ADDR, MID, body, i, 0) for i in range(5)]
    frames = wire.pack_frames(ops)
    assert len(frames) == 5  # two max-size bodies never share a frame
    assert all(len(f) <= MAX_PLAINTEXT for f in frames)
    seqs = [op[1] for f in frames for op in decode_server_frame(f)]
    assert seqs == list(range(5))


def test_pack_frames_fills_frames_and_respects_max_ops():
    ops = [wire.deliver_op(i, ADDR, MID, b"b" * 100, i) for i in range(2000)]
    frames = wire.pack_frames(ops)
    assert all(len(f) <= MAX_PLAINTEXT for f in frames)
    # greedy: every frame but the last could not take the next op
    assert len(frames) == -(-sum(len(o) for o in ops) // (MAX_PLAINTEXT - 3))
    assert [op[1] for f in frames for op in decode_server_frame(f)] == list(range(2000))
    small = wire.pack_frames([wire.dack_op(i) for i in range(10)], max_ops=4)
    assert [len(decode_client_frame(f)) for f in small] == [4, 4, 2]


def test_op_batcher_matches_pack_frames():
    ops = [(18, i, ADDR, MID, os.urandom(i * 37 % 3000), i, i & 1) for i in range(300)]
    b = OpBatcher(max_plaintext=20000)
    b.extend(ops[:150])
    for op in ops[150:]:
        b.add_packed(msgpack.packb(op))
    assert len(b) == 300 and b.ready > 0
    frames = b.flush()
    assert len(b) == 0 and b.flush() == []
    assert all(len(f) <= 20000 for f in frames)
    assert frames == wire.pack_frames([msgpack.packb(op) for op in ops], 20000)
    assert [op for f in frames for op in decode_server_frame(f)] == ops


def test_encode_frames_single_and_split():
    ops = [(18, i, ADDR, MID, b"x" * 1000, 0, 0) for i in range(100)]
    [one] = wire.encode_frames(ops[:10])
    assert decode_server_frame(one) == ops[:10]
    many = wire.encode_frames(ops)
    assert len(many) == 2 and [op for f in many for op in decode_server_frame(f)] == ops
    assert wire.encode_frames([]) == []


def test_oversized_op_is_refused_by_the_encoders():
    huge = (1, MID, ADDR, b"x" * MAX_PLAINTEXT, 0)
    with pytest.raises(wire.InvalidArgument):
        wire.encode_ops([huge])
    with pytest.raises(wire.InvalidArgument):
        OpBatcher().add(huge)
    with pytest.raises(wire.InvalidArgument):
        wire.pack_frames([msgpack.packb(huge)])


def test_send_op_checks_its_arguments():
    with pytest.raises(wire.InvalidArgument):
        wire.send_op(b"short", ADDR, b"x")
    with pytest.raises(wire.InvalidArgument):
        wire.send_op(MID, "nobody", b"x")
    # the same class and code the relay would answer with
    with pytest.raises(BodyTooLarge) as err:
        wire.send_op(MID, ADDR, b"x" * (MAX_BODY + 1))
    assert err.value.code == ErrorCode.BODY_TOO_LARGE
    with pytest.raises(wire.InvalidArgument):
        wire.send_op(MID, ADDR, b"x", True)
    with pytest.raises(wire.WrongType):
        wire.send_op(MID, ADDR, "text")


def test_long_reasons_are_cut_to_what_the_decoder_accepts():
    [f] = wire.pack_frames([wire.error_op(ErrorCode.INTERNAL, "é" * 5000)])
    [op] = decode_server_frame(f)
    assert op[0] == Op.ERROR and len(op[2].encode()) <= wire.MAX_REASON_LEN


# -- hellos --------------------------------------------------------------------

def test_hellos_round_trip():
    assert wire.decode_server_hello(wire.encode_server_hello(1234)) == {"v": 1, "t": 1234}
    assert wire.decode_client_hello(wire.encode_client_hello(b"cred")) == {"v": 1, "cred": b"cred"}


@pytest.mark.parametrize("payload", [
    b"\x82\xa1v\x01\xa1v\x01",                                # duplicate key
    b"\x83\xa1v\x01\xa1t\x05\xa1t\x06",                        # duplicate key, other value
    msgpack.packb({"v": 2, "t": 1}),                          # another version
    msgpack.packb({"v": True, "t": 1}),
    msgpack.packb({"v": 1}),                                  # missing key
    msgpack.packb({"v": 1, "t": 1, "x": 0}),                  # unknown key
    msgpack.packb({"v": 1, "t": -1}),
    msgpack.packb({"v": 1, "t": "1"}),
    msgpack.packb({"v": 1, "t": msgpack.Timestamp(1, 0)}),    # ext
    msgpack.packb({"v": 1, "t": msgpack.ExtType(3, b"")}),
    msgpack.packb([1, 1]),
    msgpack.packb({1: 1}),
    b"\x82",
    b"\x80" * 3000,
])
def test_bad_server_hello(payload):
    with pytest.raises(ProtocolError):
        wire.decode_server_hello(payload)


@pytest.mark.parametrize("payload", [
    b"\x83\xa1v\x01\xa4cred\xc4\x01x\xa4cred\xc4\x01y",  # duplicate key
    msgpack.packb({"v": 1, "cred": "text"}),
    msgpack.packb({"v": 1, "cred": b"x" * 5000}),
    msgpack.packb({"v": 1, "t": 5}),
])
def test_bad_client_hello(payload):
    with pytest.raises(ProtocolError):
        wire.decode_client_hello(payload)


# -- fuzz ------------------------------------------------------------------------

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_protocol_errors(data):
    for decode in (decode_client_frame, decode_server_frame):
        try:
            result = decode(data)
        except ProtocolError:
            continue
        assert isinstance(result, list)
    for decode in (wire.decode_client_hello, wire.decode_server_hello):
        try:
            decode(data)
        except ProtocolError:
            pass


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
                  st.floats(allow_nan=False), st.text(max_size=80),
                  st.binary(max_size=40), st.sampled_from([MID, ADDR, 0, 1, 2, 16, 18]))
_values = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_values, max_size=8), max_size=4))
def test_structured_garbage_is_reported_per_op(ops):
    plaintext = msgpack.packb(ops, use_bin_type=True)
    for decode in (decode_client_frame, decode_server_frame):
        result = decode(plaintext)
        assert len(result) == len(ops)
        for got, sent in zip(result, ops):
            assert isinstance(got, OpError) or list(got) == sent


# -- the exact error of every op rule -------------------------------------------

UP, BLOB, BIG = bytes(range(16, 32)), bytes(range(32)), b"x" * (MAX_BODY + 1)
_C, _S = "client", "server"
_M, _F = ErrorCode.MALFORMED, ErrorCode.BAD_FIELD

# One row per reason the decoders can give: (direction, op, code, reason,
# opcode, id).  The reasons reach peers in SACK and ERROR ops, so their exact
# wording, and which id comes back with them, are part of the contract.
IK = b"k" * 33
SPK = [1, b"p" * 33, b"s" * 64]
KEM = [2, b"q" * 1569, b"s" * 64]
PREKEYS_REASON = ("KEYS_ADD prekeys must be a non-empty array of [key id, public key] (EC) or "
                  "[key id, public key, signature] (KEM) within the size limits")
DEVICE_IDS_REASON = "BUNDLES device ids must be an array of at most 127 device ids 1..127"


def ENTRIES_REASON(label):
    return (f"DSEND {label} must be an array of at most 127 [device id, registration id, "
            f"ciphertext <= 61440 bytes]")


OP_ERRORS = [
    (_C, 7, _M, "op must be an array", None, None),
    (_C, [], _M, "op must not be empty", None, None),
    (_C, ["1", MID], _M, "opcode must be an integer", None, None),
    (_C, [99], ErrorCode.UNKNOWN_OP, "unknown opcode for this direction", 99, None),
    (_C, [17, MID, 0], ErrorCode.UNKNOWN_OP, "unknown opcode for this direction", 17, None),
    (_S, [2, 1], ErrorCode.UNKNOWN_OP, "unknown opcode for this direction", 2, None),
    (_C, [1, MID, ADDR, b"x"], _M, "SEND takes 4 fields", 1, MID),
    (_C, [1, MID[:15], ADDR, b"x", 0], _F, "SEND id must be 16 bytes of bin", 1, None),
    (_C, [1, MID, "nobody", b"x", 0], _F, "SEND recipient is not a valid address", 1, MID),
    (_C, [1, MID, ADDR, "x", 0], _F, "SEND body must be bin", 1, MID),
    (_C, [1, MID, ADDR, BIG, 0], ErrorCode.BODY_TOO_LARGE, "SEND body over 61440 bytes", 1,
     MID),
    (_C, [1, MID, ADDR, b"x", True], _F, "SEND cls must be 0 or 1", 1, MID),
    (_C, [2], _M, "DACK takes 1 field", 2, None),
    (_C, [2, -1], _F, "DACK upto_seq must be a non-negative integer", 2, None),
    (_C, [3, 1, 2], _M, "PING takes 1 field", 3, None),
    (_C, [3, True], _F, "PING token must be an integer", 3, None),
    (_C, [4, 0], _M, "BYE takes no fields", 4, None),
    (_C, [5, MID, "acme"], _M, "CONSENT takes 3 fields", 5, MID),
    (_C, [5, b"", "acme", True], _F, "CONSENT id must be 16 bytes of bin", 5, None),
    (_C, [5, MID, "UPPER", True], _F, "CONSENT provider must be a provider name or '*'", 5,
     MID),
    (_C, [5, MID, "*", 1], _F, "CONSENT allow must be a boolean", 5, MID),
    (_C, [6, MID, 1], _M, "MBEGIN takes 3 fields", 6, MID),
    (_C, [6, None, 1, BLOB], _F, "MBEGIN id must be 16 bytes of bin", 6, None),
    (_C, [6, MID, 0, BLOB], _F, "MBEGIN size must be a positive integer", 6, MID),
    (_C, [6, MID, 1, MID], _F, "MBEGIN sha256 must be 32 bytes of bin", 6, MID),
    (_C, [7, MID, UP, 0], _M, "MCHUNK takes 4 fields", 7, MID),
    (_C, [7, 1, UP, 0, b""], _F, "MCHUNK id must be 16 bytes of bin", 7, None),
    (_C, [7, MID, BLOB, 0, b""], _F, "MCHUNK upload id must be 16 bytes of bin", 7, MID),
    (_C, [7, MID, UP, -1, b""], _F, "MCHUNK index must be a non-negative integer", 7, MID),
    (_C, [7, MID, UP, 0, "d"], _F, "MCHUNK data must be bin", 7, MID),
    (_C, [7, MID, UP, 0, BIG], ErrorCode.BAD_CHUNK, "MCHUNK data over 61440 bytes", 7, MID),
    (_C, [8, MID], _M, "MFINISH takes 2 fields", 8, MID),
    (_C, [8, "id", UP], _F, "MFINISH id must be 16 bytes of bin", 8, None),
    (_C, [8, MID, b"up"], _F, "MFINISH upload id must be 16 bytes of bin", 8, MID),
    (_C, [9, MID, BLOB], _M, "MGET takes 3 fields", 9, MID),
    (_C, [9, MID[:1], BLOB, 0], _F, "MGET id must be 16 bytes of bin", 9, None),
    (_C, [9, MID, MID, 0], _F, "MGET blob id must be 32 bytes of bin", 9, MID),
    (_C, [9, MID, BLOB, 1.0], _F, "MGET index must be a non-negative integer", 9, MID),
    (_S, [16, ADDR, "phone"], _M, "WELCOME takes 3 fields", 16, None),
    (_S, [16, "nobody", "phone", 1], _F, "WELCOME address is not a valid address", 16, None),
    (_S, [16, ADDR, "bad device", 1], _F, "WELCOME device is not a valid device name", 16,
     None),
    (_S, [16, ADDR, "phone", -1], _F,
     "WELCOME server_time_ms must be a non-negative integer", 16, None),
    (_S, [17, MID], _M, "SACK takes 2 fields", 17, MID),
    (_S, [17, b"short", 0], _F, "SACK id must be 16 bytes of bin", 17, None),
    (_S, [17, MID, -2], _F, "SACK code must be a non-negative integer", 17, MID),
    (_S, [18, 1, ADDR, MID, b"x", 0], _M, "DELIVER takes 6 fields", 18, MID),
    (_S, [18, -1, ADDR, MID, b"x", 0, 0], _F, "DELIVER seq must be a non-negative integer",
     18, MID),
    # the id comes after the sender: an error before it still reports it only if valid
    (_S, [18, 1, "x", b"", b"x", 0, 0], _F, "DELIVER sender is not a valid address", 18,
     None),
    (_S, [18, 1, ADDR, b"", b"x", 0, 0], _F, "DELIVER id must be 16 bytes of bin", 18, None),
    (_S, [18, 1, ADDR, MID, "x", 0, 0], _F, "DELIVER body must be bin", 18, MID),
    (_S, [18, 1, ADDR, MID, BIG, 0, 0], ErrorCode.BODY_TOO_LARGE,
     "DELIVER body over 61440 bytes", 18, MID),
    (_S, [18, 1, ADDR, MID, b"x", -5, 0], _F, "DELIVER ts_ms must be a non-negative integer",
     18, MID),
    (_S, [18, 1, ADDR, MID, b"x", 0, 3], _F, "DELIVER cls must be 0 or 1", 18, MID),
    (_S, [19, 100], _M, "ERROR takes 2 fields", 19, None),
    (_S, [19, "100", "r"], _F, "ERROR code must be a non-negative integer", 19, None),
    (_S, [19, 100, b"r"], _F, "ERROR reason must be str", 19, None),
    (_S, [20], _M, "PONG takes 1 field", 20, None),
    (_S, [20, None], _F, "PONG token must be an integer", 20, None),
    (_S, [21, 0], _M, "SERVER_BYE takes 2 fields", 21, None),
    (_S, [21, -1, "r"], _F, "SERVER_BYE code must be a non-negative integer", 21, None),
    (_S, [21, 0, None], _F, "SERVER_BYE reason must be str", 21, None),
    (_S, [22, MID, 0], _M, "MREPLY takes 3 fields", 22, MID),
    (_S, [22, 5, 0, None], _F, "MREPLY id must be 16 bytes of bin", 22, None),
    (_S, [22, MID, "0", None], _F, "MREPLY code must be a non-negative integer", 22, MID),
    # negotiation and feature "e2ee" (docs/PROTOCOL.md sections 14 and 17)
    (_C, [10, MID], _M, "FEATURES takes 2 fields", 10, MID),
    (_C, [10, MID, ["e2ee", 3]], _F, "FEATURES features must be an array of at most 64 "
     "feature names", 10, MID),
    (_C, [10, MID, ["x" * 33]], _F, "FEATURES features must be an array of at most 64 "
     "feature names", 10, MID),
    (_S, [23, MID, "e2ee"], _F, "FEATURES_OK features must be an array of at most 64 "
     "feature names", 23, MID),
    (_C, [1000, MID, 0, IK, SPK, KEM, True], _F,
     "KEYS_SET registration id must be an integer 1..16383", 1000, MID),
    (_C, [1000, MID, 16384, IK, SPK, KEM, True], _F,
     "KEYS_SET registration id must be an integer 1..16383", 1000, MID),
    (_C, [1000, MID, 7, b"k" * 65, SPK, KEM, True], ErrorCode.BAD_KEY,
     "KEYS_SET identity key must be 1..64 bytes of bin", 1000, MID),
    (_C, [1000, MID, 7, IK, [1, b"p" * 33, b"s" * 129], KEM, True], ErrorCode.BAD_KEY,
     "KEYS_SET signed prekey must be [key id, public key <= 64 bytes, signature <= 128 "
     "bytes]", 1000, MID),
    (_C, [1000, MID, 7, IK, SPK, [1, b"q" * 2049, b"s" * 64], True], ErrorCode.BAD_KEY,
     "KEYS_SET last resort kem prekey must be [key id, public key <= 2048 bytes, "
     "signature <= 128 bytes]", 1000, MID),
    (_C, [1000, MID, 7, IK, SPK, KEM, 1], _F, "KEYS_SET clear must be a boolean", 1000, MID),
    (_C, [1001, MID, 2, [[1, IK]]], _F, "KEYS_ADD kind must be 0 (EC) or 1 (KEM)", 1001, MID),
    (_C, [1001, MID, 0, []], ErrorCode.BAD_KEY, PREKEYS_REASON, 1001, MID),
    (_C, [1001, MID, 0, [[1, b"k" * 65]]], ErrorCode.BAD_KEY, PREKEYS_REASON, 1001, MID),
    (_C, [1001, MID, 0, [[-1, IK]]], ErrorCode.BAD_KEY, PREKEYS_REASON, 1001, MID),
    (_C, [1002, MID, "nobody"], _F, "DEVICES address is not a valid address", 1002, MID),
    (_C, [1003, MID, ADDR, [0]], _F, DEVICE_IDS_REASON, 1003, MID),
    (_C, [1003, MID, ADDR, list(range(1, 129))], _F, DEVICE_IDS_REASON, 1003, MID),
    (_C, [1004, MID, ADDR, False, [[128, 1, b"c"]], []], _F, ENTRIES_REASON("entries"),
     1004, MID),
    (_C, [1004, MID, ADDR, False, [[1, 0, b"c"]], []], _F, ENTRIES_REASON("entries"),
     1004, MID),
    (_C, [1004, MID, ADDR, False, [[1, 1, BIG]], []], _F, ENTRIES_REASON("entries"),
     1004, MID),
    (_C, [1004, MID, ADDR, False, [], [[1, 1]]], _F, ENTRIES_REASON("own entries"),
     1004, MID),
    (_S, [2000, MID, 0, 1, None], _F, "REPLY last must be a boolean", 2000, MID),
    (_S, [2001, 1, ADDR, -1, MID, b"x", 0, 0], _F,
     "DDELIVER sender device must be a non-negative integer", 2001, MID),
    (_S, [2002, 1, "x", MID, b"", 0, 0], _F, "EVENT kind must be a non-negative integer",
     2002, MID),
    # feature "groups"
    (_C, [1100], _M, "GCREATE takes 1 field", 1100, None),
    (_C, [1101, MID, b"short", ADDR], _F, "GADD group must be 16 bytes of bin", 1101, MID),
    (_C, [1102, MID, MID, 1], _F, "GANSWER accept must be a boolean", 1102, MID),
    (_C, [1103, MID, MID, "not an address"], _F, "GREMOVE address is not a valid address",
     1103, MID),
    (_C, [1104, MID], _M, "GLEAVE takes 2 fields", 1104, MID),
    (_C, [1105, MID, MID, ADDR, 0], _F, "GADMIN admin must be a boolean", 1105, MID),
    (_C, [1106, MID, b""], _F, "GMEMBERS group must be 16 bytes of bin", 1106, MID),
    (_C, [1107, MID, MID, -1, b"x"], _F, "GSEND version must be a non-negative integer",
     1107, MID),
    (_C, [1107, MID, MID, 1, BIG], ErrorCode.BODY_TOO_LARGE, "GSEND body over 61440 bytes",
     1107, MID),
    (_S, [2100, 1, b"short", ADDR, 1, MID, b"x", 0, 0], _F,
     "GDELIVER group must be 16 bytes of bin", 2100, MID),
    (_S, [2101, 1, "x", MID, b"", 0, 0], _F, "GEVENT kind must be a non-negative integer",
     2101, MID),
    # feature "safety"
    (_C, [1200, MID, "@", True], _F,
     "BLOCK target must be an address or '@' and a provider name", 1200, MID),
    (_C, [1200, MID, ADDR, 1], _F, "BLOCK block must be a boolean", 1200, MID),
    (_C, [1201, MID, ADDR], _M, "BLOCKS takes 1 field", 1201, MID),
    (_C, [1202, MID, "@acme"], _F, "REPORT sender is not a valid address", 1202, MID),
]


@pytest.mark.parametrize("direction, op, code, reason, opcode, op_id", OP_ERRORS,
                         ids=[row[3] for row in OP_ERRORS])
def test_each_op_rule_gives_its_exact_error(direction, op, code, reason, opcode, op_id):
    decode = decode_client_frame if direction == _C else decode_server_frame
    [got] = decode(frame_of(op))
    assert got == OpError(code, reason, opcode, op_id)
    assert type(got.code) is ErrorCode and (opcode is None or type(got.opcode) is int)


def test_every_opcode_has_its_error_rows():
    # a new op needs rows above: its reasons are on the wire too
    assert {int(o) for o in Op} <= {row[4] for row in OP_ERRORS}


def test_reply_builders_agree_with_msgpack():
    assert wire.reply_ok_op(MID) == wire.reply_op(MID, 0) == msgpack.packb(
        [2000, MID, 0, True, None])
    items = [msgpack.packb([1, b"k"]), msgpack.packb([2, b"kk"])]
    for last in (False, True):
        assert msgpack.unpackb(wire.reply_packed_op(MID, 0, last, items)) == [
            2000, MID, 0, last, [[1, b"k"], [2, b"kk"]]]
    many = [msgpack.packb(i) for i in range(20)]  # array16 header past 15 items
    assert msgpack.unpackb(wire.reply_packed_op(MID, 0, True, many))[4] == list(range(20))


@pytest.mark.parametrize("op", [
    [2001, 1, ADDR, 3, MID, b"c", 5, 0], [2001, 1, ADDR, -3, MID, b"c", 5, 0],
    [2001, 1, ADDR, 3, MID, b"c", 5, 2], [2001, 1, ADDR, True, MID, b"c", 5, 0],
    [2000, MID, 0, True, None], [2000, MID, 306, True, [[1], [], [], [], [], []]],
    [2000, MID, 0, 1, None], [2000, MID[:3], 0, True, None], [2000, MID, -1, True, None]])
def test_server_fast_path_agrees_with_the_precise_checks(op):
    # the same op after a DELIVER-free prefix (fast path) and alone through the checker
    frame = msgpack.packb([op])
    got = wire.decode_server_frame_precise(frame)
    assert got == [wire._check_op(tuple(msgpack.unpackb(frame, use_list=False)[0]),
                                  wire._SERVER_CHECKS)]


def test_sack_op_is_the_packers_bytes():
    # sack_op joins cached parts for a 16-byte id: byte for byte what msgpack packs
    import random

    rng = random.Random(7)
    codes = [0, 1, 127, 128, 255, 256, 300, 402, 510, 65535, 65536, 1 << 32, -1, -33,
             ErrorCode.CONSENT_REQUIRED, ErrorCode.RATE_LIMITED]
    for code in codes:
        for cid in (bytes(16), bytes(rng.randrange(256) for _ in range(16))):
            want = msgpack.packb((17, cid, int(code)), use_bin_type=True)
            assert wire.sack_op(cid, code) == want
            assert wire.sack_op(cid, code) == want  # from the cache too
    # other ids keep the packer's path
    assert wire.sack_op(b"short", 5) == msgpack.packb((17, b"short", 5), use_bin_type=True)


def test_sack_ops_is_sack_op_for_each_id():
    # the batch form used for a flooder's refused SENDs: the same bytes as one
    # sack_op per id, for well-formed ids and odd ones alike
    ids = [os.urandom(16) for _ in range(5)] + [b"short", b"", b"x" * 17]
    for code in (0, 300, 400, 402, 1200, 70000):
        assert wire.sack_ops(ids, code) == [wire.sack_op(i, code) for i in ids]
    assert wire.sack_ops([], 400) == []
