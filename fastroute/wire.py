"""The operations carried inside encrypted transport frames, as msgpack.

Each transport frame's plaintext is one msgpack array of ops; each op is an
array whose first element is its opcode (:class:`Op`)::

    client -> relay   [1, id bin16, to str, body bin, cls int]   SEND
                      [2, upto_seq int]                          DACK
                      [3, token int]                             PING
                      [4]                                        BYE
                      [5, id bin16, provider str, allow bool]    CONSENT
                      [6, id bin16, size int, sha256 bin32]      MBEGIN
                      [7, id bin16, upload bin16, index int, data bin]  MCHUNK
                      [8, id bin16, upload bin16]                MFINISH
                      [9, id bin16, blob bin32, index int]       MGET
    relay -> client   [16, address str, device str, server_time_ms int]   WELCOME
                      [17, id bin16, code int]                   SACK (0 = stored)
                      [18, seq int, from str, id bin16, body bin, ts_ms int, cls int]  DELIVER
                      [19, code int, reason str]                 ERROR
                      [20, token int]                            PONG
                      [21, code int, reason str]                 SERVER_BYE
                      [22, id bin16, code int, result]           MREPLY

Decoded ops are **plain tuples** in exactly that layout (``op[0]`` is the
opcode): msgpack builds them anyway, and wrapping each in a named tuple
would cost more than the decode itself at a million ops a second.  The
``*_op`` builders return one op already packed (bytes); :func:`pack_frames`
and :class:`OpBatcher` join packed ops into frames of at most
:data:`MAX_PLAINTEXT` bytes.

The decoder treats every byte as hostile.  Lengths are bounded before
msgpack allocates anything; ext types and maps never form a valid op; bools
are not integers; every field's type and range is checked.  Errors are
reported per op (:class:`OpError` in place of the op) so one bad op does not
cost the valid ops sharing its frame.  Only a frame msgpack itself cannot
decode within the limits raises :class:`~fastroute.errors.ProtocolError`:
not msgpack or trailing bytes, top level not an array, more than
:data:`MAX_PLAINTEXT` bytes (``FRAME_TOO_LARGE``), any array longer than
:data:`MAX_OPS_PER_FRAME`, any string longer than :data:`MAX_REASON_LEN`
bytes or not UTF-8, a map key that is not a string.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Iterable, NamedTuple, Sequence, TypedDict, Union

import msgpack

from ._compiled import compiled_twin, twin
from .errors import (
    BodyTooLarge,
    ErrorCode,
    FastrouteError,
    InvalidArgument,
    ProtocolError,
    WrongType,
    error_for_code,
)
from .identity import MAX_CREDENTIAL_LEN, is_valid_address, is_valid_device, is_valid_provider

__all__ = [
    "CLS_EPHEMERAL",
    "CLS_PERSISTENT",
    "ID_LEN",
    "MAX_BODY",
    "MAX_FRAME",
    "MAX_HELLO_LEN",
    "MAX_OPS_PER_FRAME",
    "MAX_PLAINTEXT",
    "MAX_REASON_LEN",
    "PROTOCOL_VERSION",
    "TAG_LEN",
    "ClientHello",
    "DecodedOp",
    "Op",
    "OpBatcher",
    "OpError",
    "OpRun",
    "PyOpRun",
    "ServerHello",
    "bye_op",
    "consent_op",
    "dack_op",
    "decode_client_frame",
    "decode_client_hello",
    "decode_server_frame",
    "decode_server_hello",
    "deliver_op",
    "encode_client_hello",
    "encode_frames",
    "encode_ops",
    "encode_server_hello",
    "error_op",
    "flat_ops",
    "op_count",
    "pack_frames",
    "ping_op",
    "pong_op",
    "mbegin_op",
    "mchunk_op",
    "mfinish_op",
    "mget_op",
    "mreply_op",
    "MEDIA_ID_LEN",
    "sack_op",
    "sack_ops",
    "send_op",
    "server_bye_op",
    "welcome_op",
]

PROTOCOL_VERSION = 1
"""Version carried in both hello payloads."""

MAX_FRAME = 65535
"""Largest Noise transport message (the 2-byte length prefix's limit)."""

TAG_LEN = 16
"""ChaCha20-Poly1305 tag appended to every transport message."""

MAX_PLAINTEXT = MAX_FRAME - TAG_LEN
"""Largest frame plaintext, i.e. largest encoded op array: 65519 bytes."""

MAX_BODY = 60 * 1024
"""Largest message body (61440 bytes); larger payloads go to the media store."""

MAX_OPS_PER_FRAME = 8192
"""Most ops one frame may carry; bounds the decoder's work per frame."""

MAX_REASON_LEN = 1024
"""Longest string (in UTF-8 bytes) the decoder accepts anywhere in a frame;
the encoders cut ``reason`` texts to fit."""

ID_LEN = 16
"""Length of a client message id (random bytes)."""

CLS_PERSISTENT = 0
"""Message class: stored until the recipient device acks it."""

CLS_EPHEMERAL = 1
"""Message class: receipts, typing, presence; never stored, dropped if the
recipient is offline."""


class Op(enum.IntEnum):
    """Opcodes.  1-15 flow client -> relay, 16-31 relay -> client."""

    SEND = 1
    DACK = 2
    PING = 3
    BYE = 4
    CONSENT = 5
    MBEGIN = 6
    MCHUNK = 7
    MFINISH = 8
    MGET = 9
    #: negotiation (docs/PROTOCOL.md section 14): never sent by a v1 client
    FEATURES = 10
    # feature "e2ee" (key directory, device lists, per-device send): 1000-1099
    KEYS_SET = 1000
    KEYS_ADD = 1001
    DEVICES = 1002
    BUNDLES = 1003
    DSEND = 1004
    # feature "groups" (membership, admins, one ciphertext fanned out): 1100-1199
    GCREATE = 1100
    GADD = 1101
    GANSWER = 1102
    GREMOVE = 1103
    GLEAVE = 1104
    GADMIN = 1105
    GMEMBERS = 1106
    GSEND = 1107
    # feature "safety" (blocks, spam reports): 1200-1299; answered by REPLY
    BLOCK = 1200
    BLOCKS = 1201
    REPORT = 1202
    WELCOME = 16
    SACK = 17
    DELIVER = 18
    ERROR = 19
    PONG = 20
    SERVER_BYE = 21
    MREPLY = 22
    #: the answer to FEATURES; only ever sent to a link that sent FEATURES
    FEATURES_OK = 23
    # feature "e2ee", relay -> client: 2000-2099
    REPLY = 2000
    DDELIVER = 2001
    EVENT = 2002
    # feature "groups", relay -> client: 2100-2199
    GDELIVER = 2100
    GEVENT = 2101


def is_client_opcode(opcode: int) -> bool:
    """Whether ``opcode`` is in a client -> relay range (1-15, 1000-1999)."""
    return 1 <= opcode <= 15 or 1000 <= opcode <= 1999


#: feature name -> the opcodes it adds (the spec's registry, section 14).
#: A link may use, and is sent, a feature's ops only once FEATURES granted it.
FEATURE_OPS: dict[str, frozenset[int]] = {
    "e2ee": frozenset((Op.KEYS_SET, Op.KEYS_ADD, Op.DEVICES, Op.BUNDLES, Op.DSEND,
                       Op.REPLY, Op.DDELIVER, Op.EVENT)),
    # requires "e2ee" on the same link (its requests are answered with REPLY)
    "groups": frozenset((Op.GCREATE, Op.GADD, Op.GANSWER, Op.GREMOVE, Op.GLEAVE, Op.GADMIN,
                         Op.GMEMBERS, Op.GSEND, Op.GDELIVER, Op.GEVENT)),
    # requires "e2ee" on the same link (its requests are answered with REPLY)
    "safety": frozenset((Op.BLOCK, Op.BLOCKS, Op.REPORT)),
    # no ops of its own: GSEND's REPLY gains the mismatch lists and the members
    # skipped at a cap (docs/PROTOCOL.md 18.4), only on links that asked
    "group_lists": frozenset(),
}
#: feature -> the features a link must be granted with it (or before it)
FEATURE_NEEDS: dict[str, frozenset[str]] = {"groups": frozenset(("e2ee",)),
                                            "safety": frozenset(("e2ee",)),
                                            "group_lists": frozenset(("groups",))}
#: most feature names one FEATURES op may carry, and longest name
MAX_FEATURES = 64
MAX_FEATURE_NAME = 32


# Module-level ints for the builders, which run once per message: looking up
# Op.DELIVER costs more than packing the whole op.  Taken from Op, the one
# table of opcodes, never written out again.
_SEND, _DACK, _PING, _CONSENT = Op.SEND.value, Op.DACK.value, Op.PING.value, Op.CONSENT.value
_MBEGIN, _MCHUNK = Op.MBEGIN.value, Op.MCHUNK.value
_MFINISH, _MGET = Op.MFINISH.value, Op.MGET.value
_WELCOME, _SACK, _DELIVER = Op.WELCOME.value, Op.SACK.value, Op.DELIVER.value
_ERROR, _PONG = Op.ERROR.value, Op.PONG.value
_SERVER_BYE, _MREPLY = Op.SERVER_BYE.value, Op.MREPLY.value

MEDIA_ID_LEN = 32
"""Length of a blob id: the SHA-256 of the (client-encrypted) blob."""


class OpError:
    """Stands in the decoded list for an op that failed validation.

    ``code`` is the :class:`~fastroute.errors.ErrorCode` to report;
    ``opcode`` and ``id`` are filled in when they could be recovered, so the
    relay can answer a bad SEND with a SACK carrying ``code``.  Deliberately
    not a tuple: code that indexes ops (``op[0]``) fails loudly on it.
    """

    __slots__ = ("code", "reason", "opcode", "id")

    def __init__(self, code: ErrorCode, reason: str, opcode: int | None = None,
                 id: bytes | None = None) -> None:  # noqa: A002 - wire field name
        self.code = code
        self.reason = reason
        self.opcode = opcode
        self.id = id

    def exception(self) -> FastrouteError:
        """The exception matching :attr:`code` (e.g. ``BodyTooLarge``)."""
        return error_for_code(self.code, self.reason)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpError):
            return NotImplemented
        return (self.code, self.reason, self.opcode, self.id) == (
            other.code, other.reason, other.opcode, other.id)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"OpError({self.code!r}, {self.reason!r}, opcode={self.opcode!r}, "
                f"id={self.id!r})")


DecodedOp = Union[tuple, OpError]
"""An element of a decoded frame: the op tuple, or the error replacing it."""


# -- decoding ---------------------------------------------------------------

class _Invalid:
    """Stands in for a decoded map or ext value: never valid in an op."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<invalid map/ext>"


_INVALID = _Invalid()


def _invalid_ext(code: int, data: bytes) -> _Invalid:
    return _INVALID


def _invalid_map(pairs: list[tuple[Any, Any]]) -> _Invalid:
    # never builds a dict: no duplicate-key ambiguity, no hashing work
    return _INVALID


def _unpack_frame(plaintext: bytes) -> tuple:
    if not isinstance(plaintext, (bytes, bytearray, memoryview)):
        raise WrongType(f"frame must be bytes, not {type(plaintext).__name__}")
    if len(plaintext) > MAX_PLAINTEXT:
        raise ProtocolError("frame larger than MAX_PLAINTEXT", code=ErrorCode.FRAME_TOO_LARGE)
    try:
        # unpackb on a buffer whose length is already bounded is the
        # Unpacker(max_buffer_size=MAX_PLAINTEXT) contract, without the
        # streaming overhead.  Bins may be as long as a frame so that an
        # oversized body is reported on its op (BODY_TOO_LARGE), not the frame.
        # Timestamps (ext -1) bypass ext_hook and come back as
        # msgpack.Timestamp; the field checks reject those like any non-int.
        frame = msgpack.unpackb(
            plaintext, raw=False, use_list=False, strict_map_key=True,
            max_str_len=MAX_REASON_LEN, max_bin_len=MAX_PLAINTEXT,
            max_array_len=MAX_OPS_PER_FRAME, max_map_len=MAX_OPS_PER_FRAME,
            max_ext_len=MAX_PLAINTEXT, ext_hook=_invalid_ext,
            object_pairs_hook=_invalid_map)
    except Exception as exc:  # msgpack raises many ValueError kinds, plus UnicodeDecodeError
        raise ProtocolError(f"frame is not valid msgpack ({type(exc).__name__})",
                            code=ErrorCode.MALFORMED) from None
    if type(frame) is not tuple:
        raise ProtocolError("frame must be a msgpack array of ops", code=ErrorCode.MALFORMED)
    return frame


# Addresses seen valid recently: a set lookup is ~8x cheaper than the regex
# and recipients repeat a lot.  Bounded; cleared wholesale when full.
_ADDR_OK: set[str] = set()
_ADDR_CACHE_MAX = 1 << 16


def _address_ok(address: object) -> bool:
    if type(address) is not str:
        return False
    if address in _ADDR_OK:
        return True
    if not is_valid_address(address):
        return False
    if len(_ADDR_OK) >= _ADDR_CACHE_MAX:
        _ADDR_OK.clear()
    _ADDR_OK.add(address)
    return True


def _is_uint(v: object) -> bool:
    return type(v) is int and v >= 0


def _is_id(v: object) -> bool:
    return type(v) is bytes and len(v) == ID_LEN


def _is_cls(v: object) -> bool:
    return type(v) is int and 0 <= v <= 1


# -- op validation: one table, one interpreter -----------------------------------
#
# Every op is checked the same way: its arity, then its fields in wire order,
# each with one predicate and one reason, stopping at the first failure.  So
# the rules are data (_OP_TABLE, one row per opcode) and _check_op is their
# only interpreter: a new op is a row, and an error's code and wording cannot
# drift between ops that check the same kind of field.  The reasons go on the
# wire (SACK/ERROR) and tests pin them; the table reproduces them exactly.

class _Kind(NamedTuple):
    """What one op field may hold: the predicate and how its reason ends."""

    ok: Callable[[Any], bool]
    requirement: str
    #: the code of a failure (None: BAD_FIELD)
    code: ErrorCode | None = None


_ID = _Kind(_is_id, f"must be {ID_LEN} bytes of bin")
_MEDIA_ID = _Kind(lambda v: type(v) is bytes and len(v) == MEDIA_ID_LEN,
                  f"must be {MEDIA_ID_LEN} bytes of bin")
_UINT = _Kind(_is_uint, "must be a non-negative integer")
_POSITIVE = _Kind(lambda v: _is_uint(v) and v != 0, "must be a positive integer")
_INT = _Kind(lambda v: type(v) is int, "must be an integer")
_CLS = _Kind(_is_cls, "must be 0 or 1")
_BOOL = _Kind(lambda v: type(v) is bool, "must be a boolean")
_STR = _Kind(lambda v: type(v) is str, "must be str")
_ADDRESS = _Kind(_address_ok, "is not a valid address")
_DEVICE = _Kind(is_valid_device, "is not a valid device name")
_PROVIDER = _Kind(lambda v: v == "*" or is_valid_provider(v),
                  "must be a provider name or '*'")
_BIN = _Kind(lambda v: type(v) is bytes, "must be bin")
#: what BLOCK names: an address, or a whole provider as ``"@provider"``
_BLOCK_TARGET = _Kind(lambda v: type(v) is str and (
    _address_ok(v) or (v[:1] == "@" and is_valid_provider(v[1:]))),
    "must be an address or '@' and a provider name")
# A body is two checks: bin (BAD_FIELD), then at most MAX_BODY bytes, under
# the op's own ``oversize`` code (the relay answers BODY_TOO_LARGE for a
# message, BAD_CHUNK for a media chunk).
_BODY = _Kind(lambda v: len(v) <= MAX_BODY, f"over {MAX_BODY} bytes")
_ANY = None  # a field the decoder passes through unchecked


# -- feature "e2ee": key material is checked for shape and size only; the relay
# stores and serves it byte for byte (libsignal checks the signatures).
MAX_EC_KEY = 64
"""Largest EC public key (libsignal's serialized Curve25519 key is 33 bytes)."""
MAX_KEM_KEY = 2048
"""Largest KEM public key (libsignal's serialized Kyber1024 key is 1569 bytes)."""
MAX_SIGNATURE = 128
"""Largest prekey signature (XEdDSA: 64 bytes)."""
MAX_DEVICE_ID = 127
"""Device ids are 1..127 (what libsignal's ``ProtocolAddress`` accepts)."""
MAX_REGISTRATION_ID = 0x3FFF
"""Registration ids are 14-bit, 1..16383, generated by the device."""
PREKEY_EC, PREKEY_KEM = 0, 1


def _is_key_id(v: object) -> bool:
    return type(v) is int and 0 <= v <= 0xFFFFFFFF


def _is_bin(v: object, most: int) -> bool:
    return type(v) is bytes and 0 < len(v) <= most


def _is_signed(v: object, most: int) -> bool:
    return (type(v) is tuple and len(v) == 3 and _is_key_id(v[0]) and _is_bin(v[1], most)
            and _is_bin(v[2], MAX_SIGNATURE))


def _is_device_id(v: object) -> bool:
    return type(v) is int and 1 <= v <= MAX_DEVICE_ID


def _is_entries(v: object) -> bool:
    # [device id, registration id, ciphertext] entries; duplicates are the relay's
    # check.  A loop, not all(): this runs for every DSEND the relay reads.
    if type(v) is not tuple or len(v) > MAX_DEVICE_ID:
        return False
    for e in v:
        if not (type(e) is tuple and len(e) == 3):
            return False
        did, reg, body = e
        if not (type(did) is int and 1 <= did <= MAX_DEVICE_ID and type(reg) is int
                and 1 <= reg <= MAX_REGISTRATION_ID and type(body) is bytes
                and len(body) <= MAX_BODY):
            return False
    return True


def _is_prekeys(v: object) -> bool:
    # [key id, public] (EC) or [key id, public, signature] (KEM); the kind is
    # checked against the op's own kind field by the relay
    return type(v) is tuple and 0 < len(v) <= MAX_OPS_PER_FRAME and all(
        type(k) is tuple and (
            (len(k) == 2 and _is_key_id(k[0]) and _is_bin(k[1], MAX_EC_KEY))
            or _is_signed(k, MAX_KEM_KEY)) for k in v)


_FEATURE_LIST = _Kind(lambda v: type(v) is tuple and len(v) <= MAX_FEATURES and all(
    type(f) is str and 0 < len(f) <= MAX_FEATURE_NAME for f in v),
    f"must be an array of at most {MAX_FEATURES} feature names")
_REG_ID = _Kind(lambda v: type(v) is int and 1 <= v <= MAX_REGISTRATION_ID,
                f"must be an integer 1..{MAX_REGISTRATION_ID}")
_IDENTITY_KEY = _Kind(lambda v: _is_bin(v, MAX_EC_KEY), f"must be 1..{MAX_EC_KEY} bytes of bin",
                      ErrorCode.BAD_KEY)
_SIGNED_EC = _Kind(lambda v: _is_signed(v, MAX_EC_KEY),
                   f"must be [key id, public key <= {MAX_EC_KEY} bytes, "
                   f"signature <= {MAX_SIGNATURE} bytes]", ErrorCode.BAD_KEY)
_SIGNED_KEM = _Kind(lambda v: _is_signed(v, MAX_KEM_KEY),
                    f"must be [key id, public key <= {MAX_KEM_KEY} bytes, "
                    f"signature <= {MAX_SIGNATURE} bytes]", ErrorCode.BAD_KEY)
_PREKEY_KIND = _Kind(lambda v: type(v) is int and v in (PREKEY_EC, PREKEY_KEM),
                     "must be 0 (EC) or 1 (KEM)")
_PREKEYS = _Kind(_is_prekeys, "must be a non-empty array of [key id, public key] (EC) or "
                 "[key id, public key, signature] (KEM) within the size limits",
                 ErrorCode.BAD_KEY)
_DEVICE_IDS = _Kind(lambda v: type(v) is tuple and len(v) <= MAX_DEVICE_ID
                    and all(_is_device_id(d) for d in v),
                    f"must be an array of at most {MAX_DEVICE_ID} device ids 1..{MAX_DEVICE_ID}")
_ENTRIES = _Kind(_is_entries, f"must be an array of at most {MAX_DEVICE_ID} [device id, "
                 f"registration id, ciphertext <= {MAX_BODY} bytes]")


class _OpSpec(NamedTuple):
    """One row of the op table: how one opcode is validated.

    ``fields`` are the op's elements after the opcode, in wire order, each a
    ``(label, kind)`` whose label is the word used in the reason.
    ``id_field`` names the field reported as :attr:`OpError.id` (when it is
    valid) so the relay can answer a bad request with its id.
    """

    op: Op
    fields: tuple[tuple[str, _Kind | None], ...]
    id_field: str | None = None
    oversize: ErrorCode = ErrorCode.BODY_TOO_LARGE


_OP_TABLE = (
    # client -> relay
    _OpSpec(Op.SEND, (("id", _ID), ("recipient", _ADDRESS), ("body", _BODY),
                      ("cls", _CLS)), "id"),
    _OpSpec(Op.DACK, (("upto_seq", _UINT),)),
    _OpSpec(Op.PING, (("token", _INT),)),
    _OpSpec(Op.BYE, ()),
    _OpSpec(Op.CONSENT, (("id", _ID), ("provider", _PROVIDER), ("allow", _BOOL)), "id"),
    _OpSpec(Op.MBEGIN, (("id", _ID), ("size", _POSITIVE), ("sha256", _MEDIA_ID)), "id"),
    _OpSpec(Op.MCHUNK, (("id", _ID), ("upload id", _ID), ("index", _UINT),
                        ("data", _BODY)), "id", ErrorCode.BAD_CHUNK),
    _OpSpec(Op.MFINISH, (("id", _ID), ("upload id", _ID)), "id"),
    _OpSpec(Op.MGET, (("id", _ID), ("blob id", _MEDIA_ID), ("index", _UINT)), "id"),
    _OpSpec(Op.FEATURES, (("id", _ID), ("features", _FEATURE_LIST)), "id"),
    _OpSpec(Op.KEYS_SET, (("id", _ID), ("registration id", _REG_ID),
                          ("identity key", _IDENTITY_KEY), ("signed prekey", _SIGNED_EC),
                          ("last resort kem prekey", _SIGNED_KEM), ("clear", _BOOL)), "id"),
    _OpSpec(Op.KEYS_ADD, (("id", _ID), ("kind", _PREKEY_KIND), ("prekeys", _PREKEYS)), "id"),
    _OpSpec(Op.DEVICES, (("id", _ID), ("address", _ADDRESS)), "id"),
    _OpSpec(Op.BUNDLES, (("id", _ID), ("address", _ADDRESS), ("device ids", _DEVICE_IDS)),
            "id"),
    _OpSpec(Op.DSEND, (("id", _ID), ("recipient", _ADDRESS), ("more", _BOOL),
                       ("entries", _ENTRIES), ("own entries", _ENTRIES)), "id"),
    _OpSpec(Op.GCREATE, (("id", _ID),), "id"),
    _OpSpec(Op.GADD, (("id", _ID), ("group", _ID), ("address", _ADDRESS)), "id"),
    _OpSpec(Op.GANSWER, (("id", _ID), ("group", _ID), ("accept", _BOOL)), "id"),
    _OpSpec(Op.GREMOVE, (("id", _ID), ("group", _ID), ("address", _ADDRESS)), "id"),
    _OpSpec(Op.GLEAVE, (("id", _ID), ("group", _ID)), "id"),
    _OpSpec(Op.GADMIN, (("id", _ID), ("group", _ID), ("address", _ADDRESS),
                        ("admin", _BOOL)), "id"),
    _OpSpec(Op.GMEMBERS, (("id", _ID), ("group", _ID)), "id"),
    _OpSpec(Op.GSEND, (("id", _ID), ("group", _ID), ("version", _UINT),
                       ("body", _BODY)), "id"),
    _OpSpec(Op.BLOCK, (("id", _ID), ("target", _BLOCK_TARGET), ("block", _BOOL)), "id"),
    _OpSpec(Op.BLOCKS, (("id", _ID),), "id"),
    _OpSpec(Op.REPORT, (("id", _ID), ("sender", _ADDRESS)), "id"),
    # relay -> client
    _OpSpec(Op.WELCOME, (("address", _ADDRESS), ("device", _DEVICE),
                         ("server_time_ms", _UINT))),
    _OpSpec(Op.SACK, (("id", _ID), ("code", _UINT)), "id"),
    _OpSpec(Op.DELIVER, (("seq", _UINT), ("sender", _ADDRESS), ("id", _ID), ("body", _BODY),
                         ("ts_ms", _UINT), ("cls", _CLS)), "id"),
    _OpSpec(Op.ERROR, (("code", _UINT), ("reason", _STR))),
    _OpSpec(Op.PONG, (("token", _INT),)),
    _OpSpec(Op.SERVER_BYE, (("code", _UINT), ("reason", _STR))),
    _OpSpec(Op.MREPLY, (("id", _ID), ("code", _UINT), ("result", _ANY)), "id"),
    _OpSpec(Op.FEATURES_OK, (("id", _ID), ("features", _FEATURE_LIST)), "id"),
    _OpSpec(Op.REPLY, (("id", _ID), ("code", _UINT), ("last", _BOOL), ("result", _ANY)), "id"),
    _OpSpec(Op.DDELIVER, (("seq", _UINT), ("sender", _ADDRESS), ("sender device", _UINT),
                          ("id", _ID), ("body", _BODY), ("ts_ms", _UINT), ("cls", _CLS)), "id"),
    _OpSpec(Op.EVENT, (("seq", _UINT), ("kind", _UINT), ("id", _ID), ("data", _BODY),
                       ("ts_ms", _UINT), ("cls", _CLS)), "id"),
    _OpSpec(Op.GDELIVER, (("seq", _UINT), ("group", _ID), ("sender", _ADDRESS),
                          ("sender device", _UINT), ("id", _ID), ("body", _BODY),
                          ("ts_ms", _UINT), ("cls", _CLS)), "id"),
    _OpSpec(Op.GEVENT, (("seq", _UINT), ("kind", _UINT), ("id", _ID), ("data", _BODY),
                        ("ts_ms", _UINT), ("cls", _CLS)), "id"),
)


class _Check(NamedTuple):
    """An :class:`_OpSpec` compiled for :func:`_check_op`: reasons prebuilt."""

    arity: int
    arity_reason: str
    id_index: int  # 0: the op has no id to report
    steps: tuple[tuple[int, Callable[[Any], bool], ErrorCode, str], ...]


_M, _F = ErrorCode.MALFORMED, ErrorCode.BAD_FIELD


def _compile(spec: _OpSpec) -> _Check:
    name = spec.op.name
    n = len(spec.fields)
    arity_reason = f"{name} takes {n or 'no'} field{'' if n == 1 else 's'}"
    steps: list[tuple[int, Callable[[Any], bool], ErrorCode, str]] = []
    id_index = 0
    for index, (label, kind) in enumerate(spec.fields, 1):
        if label == spec.id_field:
            id_index = index
        if kind is _BODY:
            steps.append((index, _BIN.ok, _F, f"{name} {label} {_BIN.requirement}"))
            steps.append((index, kind.ok, spec.oversize, f"{name} {label} {kind.requirement}"))
        elif kind is not None:
            steps.append((index, kind.ok, kind.code or _F, f"{name} {label} {kind.requirement}"))
    return _Check(n + 1, arity_reason, id_index, tuple(steps))


# Opcodes 1-15 flow client -> relay, 16-31 relay -> client (see Op).
_CLIENT_CHECKS = {int(s.op): _compile(s) for s in _OP_TABLE if is_client_opcode(s.op)}
_SERVER_CHECKS = {int(s.op): _compile(s) for s in _OP_TABLE if not is_client_opcode(s.op)}


def _check_op(op: object, checks: dict[int, _Check]) -> DecodedOp:
    """Slow path: full validation with a precise error."""
    if type(op) is not tuple:
        return OpError(_M, "op must be an array")
    if not op:
        return OpError(_M, "op must not be empty")
    opcode = op[0]
    if type(opcode) is not int:
        return OpError(_M, "opcode must be an integer")
    check = checks.get(opcode)
    if check is None:
        return OpError(ErrorCode.UNKNOWN_OP, "unknown opcode for this direction", opcode)
    # the id is reported with any error once it is itself valid, even when
    # the arity is wrong: the relay can still answer that request by its id
    at = check.id_index
    mid = op[at] if at and len(op) > at and _is_id(op[at]) else None
    if len(op) != check.arity:
        return OpError(_M, check.arity_reason, opcode, mid)
    for index, ok, code, reason in check.steps:
        if not ok(op[index]):
            return OpError(code, reason, opcode, mid)
    return op


def _slow(frame: tuple, start: int, checks: dict[int, _Check]) -> list[DecodedOp]:
    """Validate ``frame[start:]`` op by op; ``frame[:start]`` is known good."""
    ops = list(frame)
    for i in range(start, len(ops)):
        op = ops[i]
        checked = _check_op(op, checks)
        if checked is not op:
            ops[i] = checked
    return ops


def decode_client_frame(plaintext: bytes) -> list[DecodedOp]:
    """Decode a client -> relay frame into op tuples and :class:`OpError`\\ s.

    The list keeps the frame's order; each element is the op tuple itself
    (``(1, id, to, body, cls)`` for SEND ...) or an :class:`OpError` in its
    place.  Raises :class:`~fastroute.errors.ProtocolError` (``MALFORMED``,
    ``FRAME_TOO_LARGE``) only if the frame as a whole is unusable.
    """
    # the common frame (only valid SENDs to known-good recipients) in one
    # pass; None means "not that frame", and the precise decoder takes it
    flat = decode_sends(plaintext)
    if flat is None:
        return decode_client_frame_precise(plaintext)
    return [(1, *flat[k:k + 4]) for k in range(0, len(flat), 4)]


def decode_sends(plaintext: bytes) -> list | None:
    """The SENDs of a frame made only of valid SENDs to cached recipients,
    flat (``id, to, body, cls`` a SEND: no tuple a message), else None.

    The relay's fast path (compiled when the core is built): a None answer
    says nothing about the frame, which :func:`decode_client_frame_precise` then decodes.
    Compiled, the answer is a sequence that reads as that list (length,
    items, slices, ``==``) but keeps the frame and offsets into it, which the
    compiled gate reads without an id or body ``bytes`` a message; a caller
    that changes it in place makes a ``list`` of it first.
    """
    return _decode_sends(plaintext, _ADDR_OK)


def _fast_sends(frame: tuple, addr_ok: set[str], dsend: Any = None, gsend: Any = None) -> int:
    """How many leading ops of ``frame`` are valid SENDs to recipients in ``addr_ok``
    (or, given ``dsend`` (:data:`dsend_ok`) and ``gsend`` (:data:`gsend_ok`),
    valid per-device and group sends too).

    Checked inline, locals and literals only (global lookups cost more than
    the checks); the opcode is a literal for the same reason: 1 is Op.SEND.
    """
    max_body = MAX_BODY
    i = 0
    for op in frame:
        if type(op) is tuple and len(op) == 5:
            opcode, mid, to, body, cls = op
            if (opcode == 1 and type(opcode) is int                  # Op.SEND
                    and type(mid) is bytes and len(mid) == 16        # ID_LEN
                    and type(to) is str and to in addr_ok
                    and type(body) is bytes and len(body) <= max_body
                    and type(cls) is int and 0 <= cls <= 1):
                i += 1
                continue
            if gsend is not None and gsend(op):  # compiled when the core is built
                i += 1
                continue
        elif dsend is not None and dsend(op, addr_ok):  # compiled when the core is built
            i += 1
            continue
        break
    return i


def _frame_or_none(plaintext: object) -> tuple | None:
    """The ops of a frame's exact bytes, or None for anything else (the fast
    paths' specifications decline rather than raise)."""
    if type(plaintext) is not bytes:
        return None
    try:
        return _unpack_frame(plaintext)
    except ProtocolError:
        return None


def py_decode_sends(plaintext: object, addr_ok: set[str]) -> list | None:
    """Specification of the compiled ``decode_sends``: the SENDs of ``plaintext``
    (exact bytes), flat (``id, to, body, cls`` each), when every op is a valid
    SEND whose recipient is in ``addr_ok``; None for any other frame, errors
    included.  Either twin may decline more (the compiled one declines unusual
    integer encodings), never answer else."""
    frame = _frame_or_none(plaintext)
    if frame is None or _fast_sends(frame, addr_ok) != len(frame):
        return None
    return [field for op in frame for field in op[1:]]


def py_dsend_ok(op: object, addr_ok: set[str]) -> bool:
    """Specification of the compiled ``dsend_ok``: whether a decoded op is a valid
    DSEND (what :func:`_check_op` would accept) whose recipient is in
    ``addr_ok``.  False says nothing about the op: the precise check follows."""
    if type(op) is not tuple or len(op) != 6:
        return False
    opcode, mid, to, more, entries, own = op
    return (opcode == 1004 and type(opcode) is int                      # Op.DSEND
            and type(mid) is bytes and len(mid) == ID_LEN
            and type(to) is str and to in addr_ok and type(more) is bool
            and _is_entries(entries) and _is_entries(own))


def py_leading_dsends(ops: list) -> int:
    """How many leading ops of ``ops`` (checked ones) are single-op DSENDs:
    ``(1004, id, to, False, entries, own)`` tuples.  The specification of the
    compiled ``leading_dsends``."""
    i = 0
    for op in ops:
        if not (type(op) is tuple and len(op) == 6 and type(op[0]) is int and op[0] == 1004
                and op[3] is False):
            break
        i += 1
    return i


def py_gsend_ok(op: object) -> bool:
    """Specification of the compiled ``gsend_ok``: whether a decoded op is a valid
    GSEND ``[1107, id, group, version, body]`` (what :func:`_check_op` would
    accept).  False says nothing about the op: the precise check follows."""
    if type(op) is not tuple or len(op) != 5:
        return False
    opcode, mid, gid, version, body = op
    return (opcode == 1107 and type(opcode) is int                      # Op.GSEND
            and type(mid) is bytes and len(mid) == ID_LEN
            and type(gid) is bytes and len(gid) == ID_LEN
            and type(version) is int and version >= 0
            and type(body) is bytes and len(body) <= MAX_BODY)


def py_frame_offsets(plaintext: object) -> list[int] | None:
    """Where each op of a client frame starts: ``[start of op 0, ..., start of
    op n-1, len(plaintext)]`` (byte offsets) when ``plaintext`` (exact bytes)
    unpacks as :func:`unpack_client_frame` unpacks a frame; None for any
    other frame, errors included.

    Specification of the compiled ``frame_offsets``, which may decline more
    (maps, exts, strs past ASCII: frames the relay then unpacks whole),
    never answer else.  The ops between two offsets, behind an array header,
    unpack to exactly those ops of the frame (msgpack values are
    self-delimiting).
    """
    if _frame_or_none(plaintext) is None:
        return None
    assert isinstance(plaintext, bytes)
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(plaintext), 1))
    unpacker.feed(plaintext)
    offsets = []
    for _ in range(unpacker.read_array_header()):
        offsets.append(unpacker.tell())
        unpacker.skip()
    offsets.append(unpacker.tell())
    return offsets


def decode_dsends(plaintext: bytes) -> list[DecodedOp] | None:
    """The ops of a frame made only of valid DSENDs to cached recipients, else
    None (always None without the compiled core: unpacking the frame here
    would cost what the precise decoder then spends again).

    The relay's fast path for what an end-to-end encrypted client sends for
    every 1:1 message: a None answer says nothing about the frame, which
    :func:`unpack_client_frame` then takes.
    """
    if _decode_dsends_compiled is None:
        return None
    return _decode_dsends_compiled(plaintext, _ADDR_OK)


def py_decode_dsends(plaintext: object, addr_ok: set[str]) -> list[DecodedOp] | None:
    """Specification of the compiled ``decode_dsends``: the ops of ``plaintext``
    (exact bytes) when every op is a valid DSEND (:func:`py_dsend_ok`) whose
    recipient is in ``addr_ok``; None for any other frame, errors included.
    The compiled twin may decline more (unusual encodings), never answer else."""
    frame = _frame_or_none(plaintext)
    if frame is None:
        return None
    return list(frame) if all(py_dsend_ok(op, addr_ok) for op in frame) else None


def decode_gsends(plaintext: bytes) -> list[DecodedOp] | None:
    """The ops of a frame made only of valid GSENDs, else None (always None
    without the compiled core, as :func:`decode_dsends`).

    The relay's fast path for what a group member's client sends for every
    group message: a None answer says nothing about the frame, which
    :func:`unpack_client_frame` then takes.
    """
    if _decode_gsends_compiled is None:
        return None
    return _decode_gsends_compiled(plaintext)


def py_decode_gsends(plaintext: object) -> list[DecodedOp] | None:
    """Specification of the compiled ``decode_gsends``: the ops of ``plaintext``
    (exact bytes) when every op is a valid GSEND (:func:`py_gsend_ok`); None
    for any other frame, errors included.  The compiled twin may decline more
    (unusual encodings), never answer else."""
    frame = _frame_or_none(plaintext)
    if frame is None:
        return None
    return list(frame) if all(py_gsend_ok(op) for op in frame) else None


def py_leading_gsends(ops: list) -> int:
    """How many leading ops of ``ops`` (checked ones) are GSENDs: ``(1107, id,
    group, version, body)`` tuples.  The specification of the compiled
    ``leading_gsends``."""
    i = 0
    for op in ops:
        if not (type(op) is tuple and len(op) == 5 and type(op[0]) is int and op[0] == 1107):
            break
        i += 1
    return i


def decode_pings(plaintext: bytes) -> list[int] | None:
    """The tokens of a frame made only of valid PINGs, else None.

    The relay's fast path for the cheap op a flooder sends by the thousand
    (compiled when the core is built): a None answer says nothing about the
    frame, which :func:`decode_client_frame_precise` then decodes.
    """
    return _decode_pings(plaintext)


def _second_fields(plaintext: object, opcode: int, valid: Callable[[object], bool]
                   ) -> list[int] | None:
    """The second fields, in order, of a frame (exact bytes) made only of
    two-field ops ``opcode`` whose second field is ``valid``; None for any
    other frame, errors included (the precise decoder then says what is wrong)."""
    frame = _frame_or_none(plaintext)
    if frame is None:
        return None
    out = []
    for op in frame:
        if (type(op) is not tuple or len(op) != 2 or type(op[0]) is not int
                or op[0] != opcode or not valid(op[1])):
            return None
        out.append(op[1])
    return out


def _is_int(v: object) -> bool:
    return type(v) is int


def py_decode_pings(plaintext: object) -> list[int] | None:
    """Specification of the compiled ``decode_pings``: the tokens of
    ``plaintext`` (exact bytes) in order when every op is a valid PING; None
    for any other frame, errors included.  The compiled twin may decline more
    (negative tokens), never answer else."""
    return _second_fields(plaintext, _PING, _is_int)


def decode_dacks(plaintext: bytes) -> list[int] | None:
    """The ``upto_seq`` of each op of a frame made only of valid DACKs, else
    None (always None without the compiled core, as :func:`decode_dsends`:
    the link tries it on every frame that is not SENDs, and unpacking here
    would cost what the precise decoder then spends again).

    The relay's fast path for the frame every receiving client sends, often
    holding one DACK: a None answer says nothing about the frame.
    """
    if _decode_dacks_compiled is None:
        return None
    return _decode_dacks_compiled(plaintext)


def py_decode_dacks(plaintext: object) -> list[int] | None:
    """The ``upto_seq`` of each op, in order, when ``plaintext`` (exact bytes)
    is a frame made only of valid DACKs; None for any other frame.

    The relay's fast path for the frame every receiving client sends, often
    holding one DACK; the specification of the compiled ``decode_dacks``.
    """
    return _second_fields(plaintext, _DACK, _is_uint)


def decode_client_frame_precise(plaintext: bytes) -> list[DecodedOp]:
    """:func:`decode_client_frame` without its SEND fast path: every op checked
    precisely (the oracle the fast path is tested against)."""
    frame, i = _unpack_client_whole(plaintext)
    return list(frame) if i == len(frame) else _slow(frame, i, _CLIENT_CHECKS)


class PackedOps:
    """The ops of a client frame not unpacked yet, and where each starts
    (:func:`py_frame_offsets`): :func:`check_client_ops` unpacks the slice it
    checks, so a long frame costs the relay a chunk of work at a time, its
    unpacking included.  ``len()`` is its number of ops."""

    __slots__ = ("plaintext", "offsets", "_sends_only")

    def __init__(self, plaintext: bytes, offsets: Sequence[int]) -> None:
        self.plaintext = plaintext
        self.offsets = offsets
        self._sends_only: bool | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def chunk(self, start: int, end: int) -> bytes:
        """Ops ``start:end`` as a frame plaintext of their own."""
        offsets = self.offsets
        return _array_header(end - start) + self.plaintext[offsets[start]:offsets[end]]

    def unpack(self, start: int, end: int) -> tuple:
        """Ops ``start:end``, unpacked exactly as the whole frame would be."""
        return _unpack_frame(self.chunk(start, end))

    def sends_only(self) -> bool:
        """Whether every op is a SEND (by its first two bytes: a frame that
        :func:`decode_sends` would take whole, if each is valid).  Looked at
        once per frame: a frame taken a piece at a time asks at every piece."""
        if self._sends_only is None:
            plaintext = self.plaintext
            offsets = self.offsets
            self._sends_only = all(plaintext[offsets[i]:offsets[i] + 2] == b"\x95\x01"
                                   for i in range(len(offsets) - 1))
        return self._sends_only


#: a frame of more ops than this is unpacked by the slice (when the core is
#: built): fewer take less time to unpack whole than one slice to check
LAZY_MIN_OPS = 64


def unpack_client_frame(plaintext: bytes) -> tuple[tuple | PackedOps, int]:
    """The first half of :func:`decode_client_frame_precise`: the frame's ops as
    unpacked, not checked yet, and how many leading ones need no check.

    Raises like it for a frame unusable as a whole.  With
    :func:`check_client_ops` a caller checks (and pays for) a frame's ops a
    slice at a time: a frame of thousands of ops need not be checked in one
    go before the relay may turn to another link.  A long frame whose ops
    the compiled :func:`py_frame_offsets` can find comes back as
    :class:`PackedOps` (with 0), not even unpacked yet: the slices are.
    """
    if _frame_offsets_compiled is not None:
        offsets = _frame_offsets_compiled(plaintext)
        if offsets is not None and len(offsets) > LAZY_MIN_OPS + 1:
            return PackedOps(plaintext, offsets), 0
    return _unpack_client_whole(plaintext)


def _unpack_client_whole(plaintext: bytes) -> tuple[tuple, int]:
    frame = _unpack_frame(plaintext)
    # A run of valid SENDs (and per-device sends) whose recipients are cached
    # needs no more checks; the first op that misses it -- an error, another
    # opcode, a new recipient -- hands the rest of the frame to the precise checks.
    return frame, _fast_sends(frame, _ADDR_OK, dsend_ok, gsend_ok)


def check_client_ops(frame: tuple | PackedOps, start: int, end: int,
                     good: int) -> list[DecodedOp]:
    """``frame[start:end]`` checked exactly as :func:`decode_client_frame_precise`
    checks them (each op on its own); ``good`` is :func:`unpack_client_frame`'s
    count of leading ops that need no check."""
    if type(frame) is PackedOps:
        chunk = frame.unpack(start, end)
        return check_client_ops(chunk, 0, len(chunk),
                                _fast_sends(chunk, _ADDR_OK, dsend_ok, gsend_ok))
    ops = list(frame[start:end])
    for i in range(max(good - start, 0), len(ops)):
        op = ops[i]
        checked = _check_op(op, _CLIENT_CHECKS)
        if checked is not op:
            ops[i] = checked
    return ops


def decode_server_frame(plaintext: bytes) -> list[DecodedOp]:
    """Decode a relay -> client frame; the client-side twin of
    :func:`decode_client_frame` (fast paths: DELIVER and SACK, the ops that
    come by the thousand, then DDELIVER and REPLY)."""
    ops = _decode_server_ops(plaintext, _ADDR_OK)
    return ops if ops is not None else decode_server_frame_precise(plaintext)


def _fast_server_ops(frame: tuple, addr_ok: set[str], features: bool = False) -> int:
    """How many leading ops of ``frame`` are valid SACKs, or DELIVERs from senders
    in ``addr_ok`` (and, with ``features``, DDELIVERs and REPLYs).  Literal
    opcodes (17 is Op.SACK, 18 is Op.DELIVER, 2001 Op.DDELIVER, 2000 Op.REPLY)
    and locals, as in :func:`_fast_sends`: global lookups cost more than the checks."""
    max_body = MAX_BODY
    i = 0
    for op in frame:
        if type(op) is tuple and len(op) == 3:
            opcode, mid, code = op
            if (opcode == 17 and type(opcode) is int                 # Op.SACK
                    and type(mid) is bytes and len(mid) == 16        # ID_LEN
                    and type(code) is int and code >= 0):
                i += 1
                continue
        elif type(op) is tuple and len(op) == 7:
            opcode, seq, sender, mid, body, ts, cls = op
            if (opcode == 18 and type(opcode) is int                 # Op.DELIVER
                    and type(seq) is int and seq >= 0
                    and type(sender) is str and sender in addr_ok
                    and type(mid) is bytes and len(mid) == 16        # ID_LEN
                    and type(body) is bytes and len(body) <= max_body
                    and type(ts) is int and ts >= 0
                    and type(cls) is int and 0 <= cls <= 1):
                i += 1
                continue
        elif not features:
            break
        elif type(op) is tuple and len(op) == 8:
            opcode, seq, sender, sdev, mid, body, ts, cls = op
            if (opcode == 2001 and type(opcode) is int               # Op.DDELIVER
                    and type(seq) is int and seq >= 0
                    and type(sender) is str and sender in addr_ok
                    and type(sdev) is int and sdev >= 0
                    and type(mid) is bytes and len(mid) == 16        # ID_LEN
                    and type(body) is bytes and len(body) <= max_body
                    and type(ts) is int and ts >= 0
                    and type(cls) is int and 0 <= cls <= 1):
                i += 1
                continue
        elif type(op) is tuple and len(op) == 5:
            # REPLY (the answer to each per-device send); its result is any value
            opcode, mid, code, last = op[:4]
            if (opcode == 2000 and type(opcode) is int               # Op.REPLY
                    and type(mid) is bytes and len(mid) == 16
                    and type(code) is int and code >= 0 and type(last) is bool):
                i += 1
                continue
        break
    return i


def py_decode_server_ops(plaintext: object, addr_ok: set[str]) -> list[DecodedOp] | None:
    """Specification of the compiled ``decode_server_ops``: the ops of a frame made
    only of valid SACKs and DELIVERs (senders in ``addr_ok``), else None."""
    frame = _frame_or_none(plaintext)
    if frame is None:
        return None
    return list(frame) if _fast_server_ops(frame, addr_ok) == len(frame) else None


def decode_server_frame_precise(plaintext: bytes) -> list[DecodedOp]:
    """:func:`decode_server_frame` without its fast path: every op checked
    precisely (the oracle the fast path is tested against)."""
    frame = _unpack_frame(plaintext)
    i = _fast_server_ops(frame, _ADDR_OK, features=True)
    return list(frame) if i == len(frame) else _slow(frame, i, _SERVER_CHECKS)


# -- building ops -------------------------------------------------------------
#
# Builders return the msgpack encoding of ONE op (bytes).  A frame is then an
# array header plus the concatenation of its packed ops (pack_frames), so a
# writer can queue packed ops as they are produced, size frames exactly and
# keep an op's bytes for a retransmission without packing twice.

# One Packer reused: constructing one per call (what msgpack.packb does)
# costs more than packing a small op.  Packer.pack never releases the GIL and
# these tuples hold no objects with Python-level hooks, so sharing it between
# threads is safe on the GIL build.
_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def send_op(id: bytes, to: str, body: bytes, cls: int = CLS_PERSISTENT) -> bytes:  # noqa: A002
    """A packed SEND op, checked (client side: mistakes surface before the relay)."""
    if type(id) is not bytes or type(to) is not str or type(body) is not bytes:
        raise WrongType("SEND needs id: bytes, to: str, body: bytes")
    if len(id) != ID_LEN:
        raise InvalidArgument(f"message id must be {ID_LEN} bytes")
    if not is_valid_address(to):
        raise InvalidArgument("recipient is not a valid address")
    if len(body) > MAX_BODY:
        raise BodyTooLarge(f"body over {MAX_BODY} bytes: send it via the media store")
    if type(cls) is bool or cls not in (CLS_PERSISTENT, CLS_EPHEMERAL):
        raise InvalidArgument("cls must be CLS_PERSISTENT or CLS_EPHEMERAL")
    return pack_send(id, _pack(to), body, _CLS_BYTE[cls])


def consent_op(id: bytes, provider: str, allow: bool) -> bytes:  # noqa: A002
    """A packed CONSENT op: opt in to (or out of) messages from ``provider`` ("*": all)."""
    if type(id) is not bytes or len(id) != ID_LEN:
        raise InvalidArgument(f"consent id must be {ID_LEN} bytes")
    if not (provider == "*" or is_valid_provider(provider)):
        raise InvalidArgument("provider must be a provider name or '*'")
    return _pack((_CONSENT, id, provider, bool(allow)))


def dack_op(upto_seq: int) -> bytes:
    """A packed DACK op: every delivered message with seq <= ``upto_seq`` is handled."""
    return _pack((_DACK, upto_seq))


def ping_op(token: int) -> bytes:
    """A packed PING op; the relay answers PONG with the same token."""
    return _pack((_PING, token))


def bye_op() -> bytes:
    """The client's packed BYE op (orderly close)."""
    return b"\x91\x04"  # fixarray(1), Op.BYE: constant, so packed once by hand


# Relay-side builders do no checks: they run per delivered message and their
# inputs were validated when the SEND came in.

def welcome_op(address: str, device: str, server_time_ms: int) -> bytes:
    """The packed WELCOME op sent after a successful handshake."""
    return _pack((_WELCOME, address, device, server_time_ms))


def sack_op(id: bytes, code: int = 0) -> bytes:  # noqa: A002
    """A packed SACK op: 0 = stored (persistent) / accepted (ephemeral), else an error code."""
    code = int(code)
    if type(id) is bytes and len(id) == ID_LEN:
        # the common case (a refusal answered per op, by the thousand under a
        # flood): the same bytes as the packer's, joined from cached parts
        return b"".join((_SACK_OK_HEAD, id, _sack_tail(code)))
    return _pack((_SACK, id, code))


def sack_ops(ids: list, code: int) -> list[bytes]:
    """Packed SACK ops answering every id of ``ids`` with the same ``code``
    (what :func:`sack_op` makes for each, the code packed once)."""
    code = int(code)
    tail = _sack_tail(code)
    head = _SACK_OK_HEAD
    return [b"".join((head, i, tail)) if type(i) is bytes and len(i) == ID_LEN
            else _pack((_SACK, i, code)) for i in ids]


def _sack_tail(code: int) -> bytes:
    """A SACK's packed code (the bytes after its id), cached by code."""
    tail = _SACK_CODES.get(code)
    if tail is None:
        tail = _pack(code)
        if len(_SACK_CODES) < 1024:
            _SACK_CODES[code] = tail
    return tail


#: packed SACK codes, by code (filled as codes are used; a few dozen exist)
_SACK_CODES: dict[int, bytes] = {}


def deliver_op(seq: int, from_: str, id: bytes, body: bytes, ts_ms: int,  # noqa: A002
               cls: int = CLS_PERSISTENT) -> bytes:
    """A packed DELIVER op for the recipient device."""
    return _pack((_DELIVER, seq, from_, id, body, ts_ms, cls))


def _cut(reason: str) -> str:
    # the decoder rejects strings over MAX_REASON_LEN UTF-8 bytes
    data = reason.encode("utf-8", "replace")
    if len(data) <= MAX_REASON_LEN:
        return reason
    return data[:MAX_REASON_LEN].decode("utf-8", "ignore")


def error_op(code: int, reason: str = "") -> bytes:
    """A packed ERROR op (a problem that does not close the link).

    ``reason`` is cut to :data:`MAX_REASON_LEN` bytes; never put bodies or
    addresses in it.
    """
    return _pack((_ERROR, int(code), _cut(reason)))


def pong_op(token: int) -> bytes:
    """The packed PONG answering a PING."""
    return _pack((_PONG, token))


def _media_id(value: object, length: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != length:
        raise InvalidArgument(f"{what} must be {length} bytes")
    return value


def mbegin_op(id: bytes, size: int, sha256: bytes) -> bytes:  # noqa: A002
    """A packed MBEGIN: start uploading a blob of ``size`` bytes with this SHA-256."""
    if type(size) is not int or size <= 0:
        raise InvalidArgument("size must be a positive int")
    return _pack((_MBEGIN, _media_id(id, ID_LEN, "request id"), size,
                  _media_id(sha256, MEDIA_ID_LEN, "sha256")))


def mchunk_op(id: bytes, upload_id: bytes, index: int, data: bytes) -> bytes:  # noqa: A002
    """A packed MCHUNK: chunk ``index`` of an upload."""
    if type(index) is not int or index < 0 or type(data) is not bytes or len(data) > MAX_BODY:
        raise InvalidArgument(f"chunk index must be an int >= 0 and data <= {MAX_BODY} bytes")
    return _pack((_MCHUNK, _media_id(id, ID_LEN, "request id"),
                  _media_id(upload_id, ID_LEN, "upload id"), index, data))


def mfinish_op(id: bytes, upload_id: bytes) -> bytes:  # noqa: A002
    """A packed MFINISH: every chunk is sent, verify and store the blob."""
    return _pack((_MFINISH, _media_id(id, ID_LEN, "request id"),
                  _media_id(upload_id, ID_LEN, "upload id")))


def mget_op(id: bytes, blob_id: bytes, index: int) -> bytes:  # noqa: A002
    """A packed MGET: chunk ``index`` of a stored blob."""
    if type(index) is not int or index < 0:
        raise InvalidArgument("chunk index must be an int >= 0")
    return _pack((_MGET, _media_id(id, ID_LEN, "request id"),
                  _media_id(blob_id, MEDIA_ID_LEN, "blob id"), index))


def mreply_op(id: bytes, code: int, result: object = None) -> bytes:  # noqa: A002
    """The relay's packed answer to a media request (``result`` depends on the request)."""
    return _pack((_MREPLY, id, int(code), result))


# -- negotiation and feature "e2ee" (docs/PROTOCOL.md sections 14 and 17) -------

_FEATURES, _FEATURES_OK = Op.FEATURES.value, Op.FEATURES_OK.value
_REPLY = Op.REPLY.value
_DSEND = Op.DSEND.value
_GSEND = Op.GSEND.value


def features_op(id: bytes, names: Iterable[str]) -> bytes:  # noqa: A002
    """A packed FEATURES op: the feature names this client speaks."""
    names = list(names)
    if type(id) is not bytes or len(id) != ID_LEN:
        raise InvalidArgument(f"request id must be {ID_LEN} bytes")
    if len(names) > MAX_FEATURES or not all(
            type(n) is str and 0 < len(n) <= MAX_FEATURE_NAME for n in names):
        raise InvalidArgument("features must be at most 64 names of 1..32 characters")
    return _pack((_FEATURES, id, names))


def features_ok_op(id: bytes, granted: list[str]) -> bytes:  # noqa: A002
    """The relay's packed answer to FEATURES: the subset it granted."""
    return _pack((_FEATURES_OK, id, granted))


def reply_op(id: bytes, code: int, last: bool = True, result: object = None) -> bytes:  # noqa: A002
    """The relay's packed REPLY to a feature request (``result`` nil unless code is 0,
    or the mismatch lists of DEVICE_MISMATCH)."""
    return _pack((_REPLY, id, int(code), bool(last), result))


_REPLY_HEAD = b"\x95\xcd" + _REPLY.to_bytes(2, "big") + b"\xc4\x10"


_REPLY_OK_TAIL = b"\x00\xc3\xc0"  # code 0, last true, result nil


def reply_ok_op(id: bytes) -> bytes:  # noqa: A002
    """``reply_op(id, 0)`` without msgpack: the answer to every accepted DSEND."""
    return b"".join((_REPLY_HEAD, id, _REPLY_OK_TAIL))


def py_reply_ok_ops(cids: list) -> list[bytes]:
    """:func:`reply_ok_op` for each id of ``cids`` (16 bytes each, else
    InvalidArgument): a stored run of accepted requests' answers, to extend
    a link's outgoing list with.  The specification of the compiled
    ``reply_ok_ops``, which gives two or more as one :class:`OpRun`
    (:func:`flat_ops` of both lists is the same)."""
    for cid in cids:
        if type(cid) is not bytes or len(cid) != ID_LEN:
            raise InvalidArgument("request id must be 16 bytes")
    return [b"".join((_REPLY_HEAD, cid, _REPLY_OK_TAIL)) for cid in cids]


def reply_packed_op(id: bytes, code: int, last: bool, items: list[bytes]) -> bytes:  # noqa: A002
    """A REPLY whose result is an array of already packed items (spliced, not re-packed)."""
    n = len(items)
    head = bytes((0x90 | n,)) if n <= 15 else b"\xdc" + n.to_bytes(2, "big")
    return b"".join((_REPLY_HEAD, id, _pack(int(code)), b"\xc3" if last else b"\xc2", head,
                     *items))


def keys_set_op(id: bytes, reg_id: int, identity_key: bytes,  # noqa: A002
                signed_prekey: tuple, last_resort_kem: tuple, clear: bool = True) -> bytes:
    """A packed KEYS_SET: this device's registration id, identity key, signed EC
    prekey ``(id, public, signature)`` and last-resort KEM prekey (same shape)."""
    return _pack((Op.KEYS_SET.value, id, reg_id, identity_key, list(signed_prekey),
                  list(last_resort_kem), bool(clear)))


def keys_add_op(id: bytes, kind: int, prekeys: list) -> bytes:  # noqa: A002
    """A packed KEYS_ADD: one-time prekeys for pool ``kind`` (PREKEY_EC: ``(id, public)``,
    PREKEY_KEM: ``(id, public, signature)``)."""
    return _pack((Op.KEYS_ADD.value, id, kind, [list(k) for k in prekeys]))


def devices_op(id: bytes, address: str) -> bytes:  # noqa: A002
    """A packed DEVICES: the device list of ``address`` (consumes no keys)."""
    return _pack((Op.DEVICES.value, id, address))


def bundles_op(id: bytes, address: str, device_ids: list[int]) -> bytes:  # noqa: A002
    """A packed BUNDLES: prekey bundles of ``address``'s devices (``[]``: all)."""
    return _pack((Op.BUNDLES.value, id, address, list(device_ids)))


def dsend_op(id: bytes, to: str, more: bool, entries: list, own: list) -> bytes:  # noqa: A002
    """A packed DSEND part: ``[device id, registration id, ciphertext]`` entries for
    ``to`` and for the sender's own other devices; ``more``: further parts follow."""
    # msgpack packs a tuple as it packs a list: only other iterables are copied
    return _pack((_DSEND, id, to, bool(more), _as_arrays(entries),
                  _as_arrays(own)))


def _are_arrays(entries: Any) -> bool:
    """``entries`` is a list or tuple of lists or tuples (what msgpack packs as
    arrays of arrays, as it is)."""
    return ((type(entries) is list or type(entries) is tuple)
            and all(type(e) is tuple or type(e) is list for e in entries))


def _as_arrays(entries: Any) -> list | tuple:
    """``entries`` as they are when :func:`_are_arrays`, else a list of lists
    (any iterables, read once)."""
    return entries if _are_arrays(entries) else [list(e) for e in entries]


def gsend_op(id: bytes, group: bytes, version: int, body: bytes) -> bytes:  # noqa: A002
    """A packed GSEND ``[1107, id, group, version, body]``: ``group_op(Op.GSEND,
    ...)`` without looking the opcode up (a client sends it per message)."""
    return _pack((_GSEND, id, group, version, body))


def group_op(opcode: int, id: bytes, *fields: object) -> bytes:  # noqa: A002
    """A packed request of feature "groups" (docs/PROTOCOL.md 18): ``[opcode, id,
    *fields]``, e.g. ``group_op(Op.GADD, id, group, address)``."""
    if int(opcode) not in FEATURE_OPS["groups"] or not is_client_opcode(int(opcode)):
        raise InvalidArgument("not a client op of feature 'groups'")
    return _pack((int(opcode), id, *fields))


def safety_op(opcode: int, id: bytes, *fields: object) -> bytes:  # noqa: A002
    """A packed request of feature "safety" (docs/PROTOCOL.md 19): ``[opcode, id,
    *fields]``, e.g. ``safety_op(Op.BLOCK, id, "mallory@acme", True)``."""
    if int(opcode) not in FEATURE_OPS["safety"]:
        raise InvalidArgument("not a client op of feature 'safety'")
    return _pack((int(opcode), id, *fields))


def server_bye_op(code: int, reason: str = "") -> bytes:
    """The relay's packed BYE op (opcode 21): the relay closes the link after it."""
    return _pack((_SERVER_BYE, int(code), _cut(reason)))


# -- frames ---------------------------------------------------------------------

def _array_header(n: int) -> bytes:
    if n <= 15:
        return bytes((0x90 | n,))
    return b"\xdc" + n.to_bytes(2, "big")


# A frame of 16+ ops needs the 3-byte array16 header; sizing always reserves it.
_HEADER = 3


def _check_limits(max_plaintext: int, max_ops: int) -> None:
    if not 16 <= max_plaintext <= MAX_PLAINTEXT:
        raise InvalidArgument(f"max_plaintext must be in 16..{MAX_PLAINTEXT}")
    if not 1 <= max_ops <= MAX_OPS_PER_FRAME:
        raise InvalidArgument(f"max_ops must be in 1..{MAX_OPS_PER_FRAME}")


class PyOpRun:
    """Packed ops back to back in one bytes object: what a producer of many
    ops at once (a stored batch's SACKs, a pull's DELIVERs) may append to a
    link's outgoing list instead of one bytes object an op (compiled twin
    ``OpRun``; the relay's compiled producers make them, their
    specifications append the ops one by one).

    :func:`pack_frames` reads a run as the ops it holds, in order, and splits
    it between frames where the ops would have been split; :meth:`ops` gives
    them one by one (:func:`flat_ops` does, for a whole list).
    ``PyOpRun(data, ends)``: ``ends[k]`` is where op ``k`` ends in ``data``
    (strictly increasing, the last one ``len(data)``).
    """

    __slots__ = ("data", "_ends", "count")

    def __init__(self, data: bytes, ends: Sequence[int]) -> None:
        if type(data) is not bytes:
            raise WrongType("an op run's data must be bytes")
        prev = 0
        for end in ends:
            if end <= prev:
                raise InvalidArgument("an op run's ends must increase")
            prev = end
        if prev != len(data):
            raise InvalidArgument("an op run's last end must be its length")
        #: the ops, back to back
        self.data = data
        self._ends = list(ends)
        #: how many ops the run holds
        self.count = len(self._ends)

    def __len__(self) -> int:
        return self.count

    def ops(self) -> list[bytes]:
        """The run's ops, one bytes object each, in order."""
        starts = [0, *self._ends[:-1]]
        return [self.data[a:b] for a, b in zip(starts, self._ends)]

    def __repr__(self) -> str:
        return f"<OpRun of {self.count} ops, {len(self.data)} bytes>"


def flat_ops(out: Iterable) -> list:
    """The ops of an outgoing list one by one: an op run gives the ops it holds."""
    return [op for x in out for op in (x.ops() if type(x) in _RUNS else (x,))]


def py_op_count(out: list) -> int:
    """How many ops an outgoing list holds: one a bytes object, an op run's count."""
    return sum(x.count if type(x) in _RUNS else 1 for x in out)


def pack_frames(packed_ops: list, max_plaintext: int = MAX_PLAINTEXT,
                max_ops: int = MAX_OPS_PER_FRAME) -> list[bytes]:
    """Join packed ops (from the ``*_op`` builders, or :class:`OpRun`\\ s of
    them) into frame plaintexts.

    Greedy and order-preserving: each frame takes as many ops as fit in
    ``max_plaintext`` bytes and ``max_ops`` ops.  :class:`InvalidArgument` if
    one op alone does not fit.  ``[]`` for no ops.
    """
    if type(packed_ops) is list:
        # the compiled twin declines (None) a list of other buffers than bytes
        frames = _pack_frames(packed_ops, max_plaintext, max_ops)
        if frames is not None:
            return frames
    return py_pack_frames(packed_ops, max_plaintext, max_ops)


def py_pack_frames(packed_ops: list[bytes], max_plaintext: int = MAX_PLAINTEXT,
                   max_ops: int = MAX_OPS_PER_FRAME) -> list[bytes]:
    """The pure-Python :func:`pack_frames` (the specification of the compiled one)."""
    _check_limits(max_plaintext, max_ops)
    if any(type(x) in _RUNS for x in packed_ops):
        packed_ops = flat_ops(packed_ops)
    limit = max_plaintext - _HEADER
    frames = []
    start = 0
    size = 0
    for i, op in enumerate(packed_ops):
        n = len(op)
        if n > limit:
            raise InvalidArgument("op does not fit in a frame")
        if size + n > limit or i - start >= max_ops:
            frames.append(_array_header(i - start) + b"".join(packed_ops[start:i]))
            start = i
            size = 0
        size += n
    if start < len(packed_ops):
        frames.append(_array_header(len(packed_ops) - start) + b"".join(packed_ops[start:]))
    return frames


def encode_ops(ops: Iterable[tuple]) -> bytes:
    """Encode op tuples (the decoders' layout) as one frame plaintext.

    :class:`InvalidArgument` if they do not fit one frame (use
    :func:`encode_frames` or :class:`OpBatcher` for that).
    """
    if not isinstance(ops, (list, tuple)):
        ops = list(ops)
    if len(ops) > MAX_OPS_PER_FRAME:
        raise InvalidArgument(f"more than {MAX_OPS_PER_FRAME} ops in one frame")
    data = _pack(ops)
    if len(data) > MAX_PLAINTEXT:
        raise InvalidArgument("ops do not fit in one frame; use encode_frames()")
    return data


def encode_frames(ops: Iterable[tuple], max_plaintext: int = MAX_PLAINTEXT) -> list[bytes]:
    """Encode op tuples into as many frames as needed (usually one).

    Packs the whole batch at once first, the fast path when it fits one
    frame; otherwise packs op by op and splits.  ``[]`` for no ops.
    """
    if not isinstance(ops, (list, tuple)):
        ops = list(ops)
    if not ops:
        return []
    if len(ops) <= MAX_OPS_PER_FRAME:
        data = _pack(ops)
        if len(data) <= max_plaintext:
            return [data]
    return pack_frames([_pack(op) for op in ops], max_plaintext)


class OpBatcher:
    """Packs ops into as few frames as possible, each a valid frame plaintext.

    Each op is encoded when added (so sizes are exact); a frame is closed as
    soon as the next op would push it past ``max_plaintext`` bytes or
    ``max_ops`` ops, so :attr:`ready` frames can be encrypted and written
    while more ops arrive::

        b = OpBatcher()
        for seq, msg in popped:
            b.add_packed(deliver_op(seq, ...))
        for plaintext in b.flush():
            writer.write(frame(cipher.encrypt(plaintext)))

    Not thread-safe; one per connection writer.
    """

    __slots__ = ("_parts", "_size", "_frames", "_limit", "_max_ops", "_count")

    def __init__(self, max_plaintext: int = MAX_PLAINTEXT,
                 max_ops: int = MAX_OPS_PER_FRAME) -> None:
        _check_limits(max_plaintext, max_ops)
        self._limit = max_plaintext - _HEADER
        self._max_ops = max_ops
        self._parts: list[bytes] = []
        self._size = 0
        self._frames: list[bytes] = []
        self._count = 0

    def add(self, op: tuple) -> None:
        """Append an op tuple (decoder layout); packs it now."""
        data = _pack(op)
        n = len(data)
        if n > self._limit:
            raise InvalidArgument("op does not fit in a frame")
        if self._size + n > self._limit or len(self._parts) >= self._max_ops:
            self._close_frame()
        self._parts.append(data)
        self._size += n
        self._count += 1

    def add_packed(self, data: bytes) -> None:
        """Append an op already packed by a ``*_op`` builder.

        :class:`InvalidArgument` if it alone exceeds a frame.
        """
        n = len(data)
        if n > self._limit:
            raise InvalidArgument("op does not fit in a frame")
        if self._size + n > self._limit or len(self._parts) >= self._max_ops:
            self._close_frame()
        self._parts.append(data)
        self._size += n
        self._count += 1

    def extend(self, ops: Iterable[tuple]) -> None:
        """:meth:`add` each op tuple in order."""
        add = self.add
        for op in ops:
            add(op)

    def _close_frame(self) -> None:
        parts = self._parts
        if parts:
            self._frames.append(_array_header(len(parts)) + b"".join(parts))
            self._parts = []
            self._size = 0

    @property
    def ready(self) -> int:
        """Frames already full (closed), not counting the one being filled."""
        return len(self._frames)

    def flush(self) -> list[bytes]:
        """Every frame built so far (the last may be partly filled); resets."""
        self._close_frame()
        frames, self._frames = self._frames, []
        self._count = 0
        return frames

    def __len__(self) -> int:
        """Ops added since the last :meth:`flush`."""
        return self._count


# -- hello payloads (inside Noise handshake messages 2 and 3) ----------------

MAX_HELLO_LEN = 2048
"""Largest hello payload accepted."""


class ServerHello(TypedDict):
    """Decoded payload of handshake message 2 (relay -> client)."""

    v: int
    t: int


class ClientHello(TypedDict):
    """Decoded payload of handshake message 3 (client -> relay)."""

    v: int
    cred: bytes


def encode_server_hello(server_time_ms: int) -> bytes:
    """``{"v": PROTOCOL_VERSION, "t": server_time_ms}`` as msgpack."""
    return msgpack.packb({"v": PROTOCOL_VERSION, "t": int(server_time_ms)})


def encode_client_hello(credential: bytes) -> bytes:
    """``{"v": PROTOCOL_VERSION, "cred": credential}`` as msgpack."""
    if type(credential) is not bytes:
        raise WrongType("credential must be bytes")
    return msgpack.packb({"v": PROTOCOL_VERSION, "cred": credential}, use_bin_type=True)


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ProtocolError("duplicate key in hello map", code=ErrorCode.MALFORMED)
    return d


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack ext types are not allowed", code=ErrorCode.MALFORMED)


def _decode_hello(data: bytes, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be bytes", code=ErrorCode.MALFORMED)
    if len(data) > MAX_HELLO_LEN:
        raise ProtocolError(f"{what} too long", code=ErrorCode.MALFORMED)
    try:
        hello = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=64,
                                max_bin_len=MAX_CREDENTIAL_LEN, max_array_len=0,
                                max_map_len=8, max_ext_len=0, ext_hook=_reject_ext,
                                object_pairs_hook=_unique_pairs)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__})",
                            code=ErrorCode.MALFORMED) from None
    if type(hello) is not dict:
        raise ProtocolError(f"{what} must be a map", code=ErrorCode.MALFORMED)
    v = hello.get("v")
    if type(v) is not int:
        raise ProtocolError(f"{what} needs an integer 'v'", code=ErrorCode.BAD_FIELD)
    if v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {v}", code=ErrorCode.BAD_FIELD)
    # the peer's version is known by now (the server hello goes first), so an
    # unknown key is a bug, not a newer feature
    if set(hello) != set(keys):
        raise ProtocolError(f"{what} must have exactly the keys {', '.join(keys)}",
                            code=ErrorCode.BAD_FIELD)
    return hello


def decode_server_hello(data: bytes) -> ServerHello:
    """Strictly decode the relay's hello (handshake message 2 payload).

    Returns ``{"v": 1, "t": server_time_ms}``; :class:`ProtocolError` for a
    duplicate, missing or unknown key, a wrong type or another version.
    """
    hello = _decode_hello(data, ("v", "t"), "server hello")
    t = hello["t"]
    if not _is_uint(t):
        raise ProtocolError("server hello 't' must be a non-negative integer",
                            code=ErrorCode.BAD_FIELD)
    return hello  # type: ignore[return-value]


def decode_client_hello(data: bytes) -> ClientHello:
    """Strictly decode the client's hello (handshake message 3 payload).

    Returns ``{"v": 1, "cred": credential}``.  The credential is returned undecoded: pass it to
    :func:`fastroute.identity.verify_credential`.
    """
    hello = _decode_hello(data, ("v", "cred"), "client hello")
    cred = hello["cred"]
    if type(cred) is not bytes:
        raise ProtocolError("client hello 'cred' must be bin", code=ErrorCode.BAD_FIELD)
    return hello  # type: ignore[return-value]


# -- the hot path's packers ---------------------------------------------------
#
# The relay packs a DELIVER's fields after seq once per message (the *tail*,
# the same for every recipient device) and each delivery only adds its own
# head and seq (fastroute.relay.delivery.py_pack_delivers); a SACK-ok is a
# fixed 21 bytes.  These are the specifications of the compiled twins in
# ext/fastroute/_wire.pxi.

_ID_HEAD = b"\xc4\x10"  # bin8 of 16
_SACK_OK_HEAD = b"\x93\x11\xc4\x10"  # fixarray(3), SACK, bin8 of 16
_CLS_BYTE = (b"\x00", b"\x01")
_BIN8 = tuple(b"\xc4" + bytes((i,)) for i in range(256))


def bin_header(n: int) -> bytes:
    """The msgpack bin header for ``n`` bytes (bin8, bin16 or bin32)."""
    if n < 256:
        return _BIN8[n]
    return b"\xc5" + n.to_bytes(2, "big") if n < 65536 else b"\xc6" + n.to_bytes(4, "big")


_SEND_HEAD = b"\x95\x01\xc4\x10"  # fixarray(5), SEND, bin8 of 16


def pack_send(cid: bytes, to_packed: bytes, body: bytes, cls_byte: bytes) -> bytes:
    """The one SEND packer: ``[1, cid, to, body, cls]`` from checked parts.

    ``cid`` is 16 bytes, ``to_packed`` the recipient already packed as a
    msgpack str, ``cls_byte`` ``b"\\x00"`` or ``b"\\x01"``; nothing is checked
    here (:func:`send_op` is the checked form).
    """
    return b"".join((_SEND_HEAD, cid, to_packed, bin_header(len(body)), body, cls_byte))


def ts_packed(ts_ms: int) -> bytes:
    """``ts_ms`` packed as a msgpack uint64 (the DELIVER tail's timestamp field)."""
    return b"\xcf" + ts_ms.to_bytes(8, "big")


def py_deliver_tail(sender_packed: bytes, cid: bytes, body: bytes, ts_packed: bytes,
                    cls: int) -> bytes:
    """The packed DELIVER fields after seq: from, id, body, ts_ms, cls."""
    if cls != 0 and cls != 1:
        raise InvalidArgument("cls must be 0 or 1")
    return b"".join((sender_packed, _ID_HEAD, cid, bin_header(len(body)), body,
                     ts_packed, _CLS_BYTE[cls]))


def py_tail_fields(tail: bytes) -> tuple[str, bytes, bytes, int]:
    """``(from, id, body, ts_ms)`` of a DELIVER tail (:func:`py_deliver_tail`'s
    inverse): how the memory store reads a message it keeps as its route."""
    if type(tail) is not bytes:
        raise WrongType("a DELIVER tail is bytes")
    try:
        # the tail is the DELIVER op's last five fields: an array of them
        sender, cid, body, ts, cls = msgpack.unpackb(b"\x95" + tail, raw=False)
    except (ValueError, TypeError) as exc:  # malformed, extra data, bad UTF-8
        raise InvalidArgument(f"not a DELIVER tail: {exc}") from None
    return _tail_checked(sender, cid, body, ts, cls)


#: a routed tail's first byte: msgpack's never-used 0xc1, which no DELIVER
#: tail starts with (a tail starts with its sender, a str)
ROUTED = 0xC1
#: a routed tail's bytes before its DELIVER tail: ROUTED and the mid (uint64)
ROUTED_HEAD_LEN = 9


def routed_tail(mid: int, tail: bytes) -> bytes:
    """A stored message's route as one object: ``0xc1``, ``mid`` as a big-endian
    uint64, then its DELIVER ``tail``.

    The relay's own form of ``(mid, tail)``, never on the wire: the engine's
    payload and what the memory store keeps, with no tuple and no int a
    message (each would be allocated when the message is routed and freed,
    out of the cache, when it is acknowledged).  :func:`route_parts` reads it.
    """
    if type(mid) is not int or not 0 <= mid < 1 << 63:
        raise InvalidArgument("a routed tail's mid is an int in [0, 2**63)")
    if type(tail) is not bytes or not tail:
        raise WrongType("a DELIVER tail is non-empty bytes")
    return b"\xc1" + mid.to_bytes(8, "big") + tail


def is_routed(payload: Any) -> bool:
    """Whether ``payload`` is a routed tail (:func:`routed_tail`)."""
    return type(payload) is bytes and len(payload) > ROUTED_HEAD_LEN and payload[0] == ROUTED


def route_mid(payload: Any) -> int:
    """The mid of a routed payload (:func:`route_parts`' first), without
    copying a routed tail's DELIVER tail out of it."""
    if type(payload) is bytes:
        return int.from_bytes(payload[1:ROUTED_HEAD_LEN], "big") if is_routed(payload) else 0
    return route_parts(payload)[0]


def route_parts(payload: Any) -> tuple[int, bytes]:
    """``(mid, tail)`` of a routed payload: a routed tail (:func:`routed_tail`),
    a ``(mid, tail[, head])`` tuple, or a signal's bare tail (mid 0)."""
    if type(payload) is bytes:
        if is_routed(payload):
            return (int.from_bytes(payload[1:ROUTED_HEAD_LEN], "big"),
                    payload[ROUTED_HEAD_LEN:])
        return 0, payload
    if type(payload) is not tuple or not 2 <= len(payload) <= 3:
        raise WrongType("a routed payload is a routed tail, a (mid, tail[, head]) tuple "
                        "or a signal's tail")
    return payload[0], payload[1]


def _tail_checked(sender: Any, cid: Any, body: Any, ts: Any,
                  cls: Any) -> tuple[str, bytes, bytes, int]:
    """A DELIVER tail's unpacked fields, checked: ``(from, id, body, ts_ms)``."""
    if type(sender) is not str:
        raise InvalidArgument("a DELIVER tail starts with its sender (a str)")
    if type(cid) is not bytes or len(cid) != ID_LEN:
        raise InvalidArgument("a DELIVER tail's id is a bin of 16")
    if type(body) is not bytes:
        raise InvalidArgument("a DELIVER tail's body is a bin")
    if type(ts) is not int or not 0 <= ts < 1 << 63 or type(cls) is not int or cls not in (0, 1):
        raise InvalidArgument("a DELIVER tail ends with ts_ms and cls (0 or 1)")
    return sender, cid, body, ts


#: a DDELIVER op's head, everything before its uint32 seq marker: fixarray(8)
#: and uint16 2001 (the memory store keeps a per-device copy's route with it)
DDELIVER_HEAD = b"\x98\xcd" + int(Op.DDELIVER).to_bytes(2, "big")


def py_copy_tail_fields(tail: bytes) -> tuple[str, bytes, bytes, int]:
    """``(from, id, body, ts_ms)`` of a per-device copy's DDELIVER tail: its
    sender's address and device id, then a DELIVER tail's fields (what the
    keys stage makes, :func:`py_deliver_tail` after both).  ``from`` is the
    store's sender of a copy, ``address/device_id``
    (:func:`fastroute.relay.senders.copy_sender`): how the memory store reads a
    copy it keeps as its route."""
    if type(tail) is not bytes:
        raise WrongType("a DELIVER tail is bytes")
    try:
        sender, device, cid, body, ts, cls = msgpack.unpackb(b"\x96" + tail, raw=False)
    except (ValueError, TypeError) as exc:  # malformed, extra data, bad UTF-8
        raise InvalidArgument(f"not a DDELIVER tail: {exc}") from None
    if type(sender) is str and (type(device) is not int or not 0 <= device < 1 << 63):
        raise InvalidArgument("a DDELIVER tail's sender device is an unsigned int")
    sender, cid, body, ts = _tail_checked(sender, cid, body, ts, cls)
    return f"{sender}/{device}", cid, body, ts


def tail_body_size(tail: bytes) -> int:
    """The length of the body in a DELIVER tail (:func:`py_deliver_tail`), from
    its headers alone (the relay's caps count stored bytes by it, without a
    copy of the body)."""
    b = tail[0]
    if 0xa0 <= b <= 0xbf:  # fixstr, str8, str16, str32: the sender
        k = 1 + (b & 0x1F)
    elif 0xd9 <= b <= 0xdb:
        w = 1 << (b - 0xd9)
        k = 1 + w + int.from_bytes(tail[1:1 + w], "big")
    else:
        raise InvalidArgument("a DELIVER tail starts with its sender (a str)")
    if tail[k:k + 2] != _ID_HEAD:
        raise InvalidArgument("a DELIVER tail's id is a bin of 16")
    k += 2 + ID_LEN
    b = tail[k] if k < len(tail) else 0
    if not 0xc4 <= b <= 0xc6:  # bin8, bin16, bin32: the body
        raise InvalidArgument("a DELIVER tail's body is a bin")
    w = 1 << (b - 0xc4)
    return int.from_bytes(tail[k + 1:k + 1 + w], "big")


def py_sack_ok_op(cid: bytes) -> bytes:
    """The packed SACK ``[17, cid, 0]`` for a 16-byte id."""
    if type(cid) is not bytes or len(cid) != ID_LEN:
        raise InvalidArgument("message id must be 16 bytes")
    return b"".join((_SACK_OK_HEAD, cid, b"\x00"))


# the implementations in use: compiled (fastroute._core) or the specs above
_decode_sends = twin(py_decode_sends)
_decode_pings = twin(py_decode_pings)
#: the compiled :func:`py_decode_dacks`, or None (see :func:`decode_dacks`)
twin(py_decode_dacks)
_decode_dacks_compiled = compiled_twin(py_decode_dacks)
#: the compiled :func:`py_frame_offsets`, or None: the spec costs more than
#: it saves, so without the core frames are unpacked whole
twin(py_frame_offsets)
_frame_offsets_compiled = compiled_twin(py_frame_offsets)
#: whether :func:`unpack_client_frame` gives long frames as :class:`PackedOps`
#: (the compiled core is built)
UNPACKS_BY_THE_SLICE = _frame_offsets_compiled is not None
#: :func:`py_dsend_ok`, compiled when the core is built
dsend_ok = twin(py_dsend_ok)
#: the compiled :func:`py_decode_dsends`, or None (see :func:`decode_dsends`)
twin(py_decode_dsends)
_decode_dsends_compiled = compiled_twin(py_decode_dsends)
#: the compiled :func:`py_decode_gsends`, or None (see :func:`decode_gsends`)
twin(py_decode_gsends)
_decode_gsends_compiled = compiled_twin(py_decode_gsends)
#: :func:`py_gsend_ok`, compiled when the core is built
gsend_ok = twin(py_gsend_ok)
_decode_server_ops = twin(py_decode_server_ops)
_pack_frames = twin(py_pack_frames)
#: :class:`PyOpRun`, compiled when the core is built
OpRun = twin(PyOpRun)
_RUNS = (OpRun, PyOpRun)
#: :func:`py_op_count`, compiled when the core is built
op_count = twin(py_op_count)
#: :func:`py_deliver_tail`, compiled when the core is built
deliver_tail = twin(py_deliver_tail)
#: :func:`py_tail_fields`, compiled when the core is built
tail_fields = twin(py_tail_fields)
#: :func:`py_copy_tail_fields`, compiled when the core is built
copy_tail_fields = twin(py_copy_tail_fields)
#: :func:`py_sack_ok_op`, compiled when the core is built
sack_ok_op = twin(py_sack_ok_op)
#: :func:`py_reply_ok_ops`, compiled when the core is built
reply_ok_ops = twin(py_reply_ok_ops)
#: :func:`py_leading_dsends`, compiled when the core is built
leading_dsends = twin(py_leading_dsends)
leading_gsends = twin(py_leading_gsends)
