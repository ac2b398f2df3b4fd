"""The relay's transport: ``Noise_XX_25519_ChaChaPoly_SHA256`` and its framing.

This follows the Noise Protocol Framework, revision 34
(https://noiseprotocol.org/noise.html), sections 4 (crypto functions),
5 (processing rules) and 7.5 (the XX pattern).  The primitives come from the
``cryptography`` package: X25519, ChaCha20-Poly1305 and HMAC-SHA256 / SHA-256;
nothing here implements a primitive itself.

XX as the relay uses it::

    -> e                    msg1, initiator (client), payload empty
    <- e, ee, s, es         msg2, responder (relay), payload = server hello
    -> s, se                msg3, initiator, payload = client hello + credential

After msg3 both sides :meth:`HandshakeState.split` into two
:class:`CipherState` objects, one per direction.  On the wire every Noise
message travels in a frame: a 2-byte big-endian length, then the message
(:func:`frame`, :class:`FrameReader`).

Errors: everything a peer can do wrong during the handshake raises
:class:`~fastroute.errors.HandshakeError`; a transport message that fails
authentication raises :class:`~fastroute.errors.DecryptError`; an oversize
frame raises :class:`~fastroute.errors.ProtocolError` with code
``FRAME_TOO_LARGE``.  All three mean "close the connection".
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ._compiled import twin
from .errors import (
    DecryptError,
    ErrorCode,
    FastrouteError,
    HandshakeError,
    InvalidArgument,
    ProtocolError,
    WrongType,
)

__all__ = [
    "PROTOCOL_NAME",
    "PROLOGUE",
    "DHLEN",
    "HASHLEN",
    "TAGLEN",
    "MAX_MESSAGE_LEN",
    "MAX_NONCE",
    "KeyPair",
    "CipherState",
    "SymmetricState",
    "HandshakeState",
    "frame",
    "seal_frames",
    "py_seal_frames",
    "FrameReader",
]

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
"""The full Noise protocol name; hashed into the handshake (rev 34, 5.2)."""

PROLOGUE = b"fastroute/1"
"""Default prologue: both sides must agree on it or the handshake fails."""

DHLEN = 32
"""Length of an X25519 public key and of a DH output."""

HASHLEN = 32
"""Length of a SHA-256 digest (the chaining key and the handshake hash)."""

TAGLEN = 16
"""Length of a ChaCha20-Poly1305 authentication tag."""

MAX_MESSAGE_LEN = 65535
"""Largest Noise message, handshake or transport (rev 34, 3)."""

MAX_NONCE = 2**64 - 1
"""Reserved nonce value: used only by rekey, never for a message."""

_MAX_PLAINTEXT = MAX_MESSAGE_LEN - TAGLEN

# The ChaChaPoly nonce is 32 zero bits then n as 64-bit little-endian
# (rev 34, 12.3).  One struct call builds the 12 bytes, zero prefix included,
# without an intermediate concatenation.
_nonce = struct.Struct("<4xQ").pack
_frame_len = struct.Struct(">H").pack

_SHA256 = hashes.SHA256()
_REKEY_NONCE = _nonce(MAX_NONCE)
_ZEROS32 = bytes(32)


def _hash(data: bytes) -> bytes:
    h = hashes.Hash(_SHA256)
    h.update(data)
    return h.finalize()


def _hmac(key: bytes, data: bytes) -> bytes:
    h = hmac.HMAC(key, _SHA256)
    h.update(data)
    return h.finalize()


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """HKDF of rev 34, 4.3, with two outputs (all that XX ever needs)."""
    temp_key = _hmac(chaining_key, ikm)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    return out1, out2


def _load_public(public: bytes) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(public)
    except ValueError as exc:
        raise HandshakeError("invalid X25519 public key from peer") from exc


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise WrongType(f"{what} must be bytes-like, not {type(value).__name__}")


class KeyPair:
    """An X25519 key pair: ``private`` and ``public``, 32 raw bytes each.

    ``repr()`` shows only the start of the public key, so a key pair that
    ends up in a log or a traceback does not leak its secret.
    """

    __slots__ = ("private", "public", "_key")

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key
        self.private: bytes = key.private_bytes_raw()
        self.public: bytes = key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh random key pair (the OS CSPRNG, through ``cryptography``)."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private(cls, private: bytes) -> KeyPair:
        """The key pair of a 32-byte private key (e.g. one loaded from disk).

        Raises :class:`~fastroute.errors.WrongType` for a non-bytes argument
        and :class:`~fastroute.errors.InvalidArgument` for a wrong length.
        """
        private = _as_bytes(private, "private key")
        if len(private) != DHLEN:
            raise InvalidArgument(f"X25519 private key must be {DHLEN} bytes, got {len(private)}")
        return cls(X25519PrivateKey.from_private_bytes(private))

    def dh(self, public: bytes) -> bytes:
        """X25519 of our private key with a peer's 32-byte public key.

        A low-order peer key (shared secret of all zeros) is refused with
        :class:`~fastroute.errors.HandshakeError`; that is the "may reject"
        choice of rev 34, 12.1, and costs nothing for honest peers.
        """
        return self._exchange(_load_public(public))

    def _exchange(self, public: X25519PublicKey) -> bytes:
        try:
            return self._key.exchange(public)
        except ValueError as exc:
            raise HandshakeError("invalid X25519 public key from peer") from exc

    def __repr__(self) -> str:
        return f"<KeyPair public={self.public[:4].hex()}…>"


class CipherState:
    """One direction of an encrypted channel: a ChaCha20-Poly1305 key and nonce.

    ``n`` is the nonce of the next message; it starts at 0 and grows by one
    per successful encrypt or decrypt.  A message whose tag does not verify
    raises :class:`~fastroute.errors.DecryptError` and leaves ``n``
    unchanged (rev 34, 5.1); the transport treats that as fatal, since with
    in-order TCP delivery it means tampering, replay or a lost frame.

    Unlike the spec's CipherState this one always has a key: the
    "no key yet" state of the handshake lives in :class:`SymmetricState`, so
    an unkeyed object can never pass plaintext through by mistake.
    """

    __slots__ = ("n", "_k", "_encrypt", "_decrypt")

    def __init__(self, key: bytes, n: int = 0) -> None:
        key = _as_bytes(key, "key")
        if len(key) != 32:
            raise InvalidArgument(f"ChaCha20-Poly1305 key must be 32 bytes, got {len(key)}")
        self.n: int = n
        self._set_key(key)

    def _set_key(self, key: bytes) -> None:
        self._k = key
        # One AEAD object per key, and its bound methods looked up once:
        # the relay calls these for every frame.
        aead = ChaCha20Poly1305(key)
        self._encrypt = aead.encrypt
        self._decrypt = aead.decrypt

    def encrypt(self, plaintext: bytes, ad: bytes = b"") -> bytes:
        """Encrypt one message: ciphertext plus 16-byte tag, nonce ``n``.

        ``plaintext`` may be any bytes-like object (no copy is made); it may
        be at most 65519 bytes so that the message fits a frame.
        """
        n = self.n
        if n >= MAX_NONCE:
            # 2^64-1 messages never happen in practice; refuse anyway rather
            # than reuse a nonce.
            raise FastrouteError("Noise nonce space exhausted; start a new handshake")
        if len(plaintext) > _MAX_PLAINTEXT:
            raise ProtocolError(f"plaintext of {len(plaintext)} bytes exceeds one Noise message",
                                code=ErrorCode.FRAME_TOO_LARGE)
        try:
            ciphertext = self._encrypt(_nonce(n), plaintext, ad)
        except TypeError as exc:
            raise WrongType(str(exc)) from None
        self.n = n + 1
        return ciphertext

    def decrypt(self, ciphertext: bytes, ad: bytes = b"") -> bytes:
        """Authenticate and decrypt one message with nonce ``n``.

        Raises :class:`~fastroute.errors.DecryptError` (code
        ``DECRYPT_FAILED``) when the tag does not verify, including a
        message shorter than a tag, a replayed or reordered one, or one
        longer than 65535 bytes.
        """
        n = self.n
        if n >= MAX_NONCE:
            raise DecryptError("Noise nonce space exhausted")
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise DecryptError("Noise message longer than 65535 bytes")
        try:
            plaintext = self._decrypt(_nonce(n), ciphertext, ad)
        except InvalidTag:
            raise DecryptError("Noise message failed authentication") from None
        except TypeError as exc:
            raise WrongType(str(exc)) from None
        self.n = n + 1
        return plaintext

    def rekey(self) -> None:
        """Replace the key by ENCRYPT(k, 2^64-1, "", zeros) truncated (rev 34, 4.2).

        Both sides must rekey at the same point of the stream; ``n`` is kept.
        """
        self._set_key(self._encrypt(_REKEY_NONCE, _ZEROS32, b"")[:32])

    def __repr__(self) -> str:
        return f"<CipherState n={self.n}>"


class SymmetricState:
    """The handshake's running hash ``h``, chaining key ``ck`` and cipher (rev 34, 5.2).

    Exposed for tests and for a future IK pattern; applications use
    :class:`HandshakeState`.
    """

    __slots__ = ("ck", "h", "_cipher")

    def __init__(self, protocol_name: bytes = PROTOCOL_NAME) -> None:
        if len(protocol_name) <= HASHLEN:
            h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            h = _hash(protocol_name)
        self.h: bytes = h
        self.ck: bytes = h
        self._cipher: CipherState | None = None

    @property
    def has_key(self) -> bool:
        """True once a DH result has been mixed in (payloads are encrypted)."""
        return self._cipher is not None

    def mix_key(self, ikm: bytes) -> None:
        """MixKey: fold a DH output into ``ck`` and derive a new cipher key."""
        self.ck, temp_k = _hkdf2(self.ck, ikm)
        self._cipher = CipherState(temp_k)

    def mix_hash(self, data: bytes) -> None:
        """MixHash: ``h = SHA256(h || data)``."""
        self.h = _hash(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash: encrypt with ``h`` as associated data (if keyed), then hash."""
        cipher = self._cipher
        ciphertext = plaintext if cipher is None else cipher.encrypt(plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash: the inverse; DecryptError if the tag does not verify."""
        cipher = self._cipher
        plaintext = ciphertext if cipher is None else cipher.decrypt(ciphertext, self.h)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Split: the two transport ciphers (initiator->responder, responder->initiator)."""
        k1, k2 = _hkdf2(self.ck, b"")
        return CipherState(k1), CipherState(k2)


# XX message patterns (rev 34, 7.5).  Even indexes are written by the
# initiator, odd ones by the responder.
_XX = (("e",), ("e", "ee", "s", "es"), ("s", "se"))

# Bytes each XX message adds around its payload, to refuse an oversize
# payload before any state changes: msg1 carries e in clear and no key yet;
# msg2 e + encrypted s + payload tag; msg3 encrypted s + payload tag.
_OVERHEAD = (DHLEN, DHLEN + (DHLEN + TAGLEN) + TAGLEN, (DHLEN + TAGLEN) + TAGLEN)


class HandshakeState:
    """One side of a ``Noise_XX_25519_ChaChaPoly_SHA256`` handshake.

    The initiator calls ``write_message``, ``read_message``,
    ``write_message``; the responder ``read_message``, ``write_message``,
    ``read_message``.  A call out of turn, any call after the handshake
    completed or after one failed, and any malformed or unauthenticated
    message from the peer raise :class:`~fastroute.errors.HandshakeError`
    (code ``HANDSHAKE_FAILED``); a failed handshake stays failed.

    ``ephemeral`` exists for test vectors only: production code must let
    the state generate a fresh one.
    """

    __slots__ = ("initiator", "_s", "_e", "_rs", "_re", "_rs_key", "_re_key", "_ss",
                 "_index", "_failed", "_split", "_ciphers")

    def __init__(self, initiator: bool, static: KeyPair, prologue: bytes = PROLOGUE,
                 ephemeral: KeyPair | None = None) -> None:
        if not isinstance(static, KeyPair):
            raise WrongType("static must be a KeyPair")
        if ephemeral is not None and not isinstance(ephemeral, KeyPair):
            raise WrongType("ephemeral must be a KeyPair or None")
        self.initiator: bool = bool(initiator)
        self._s = static
        self._e = ephemeral
        self._rs: bytes | None = None
        self._re: bytes | None = None
        # The peer's keys parsed once on receipt: each is used by two DHs.
        self._rs_key: X25519PublicKey | None = None
        self._re_key: X25519PublicKey | None = None
        self._ss = SymmetricState(PROTOCOL_NAME)
        self._ss.mix_hash(_as_bytes(prologue, "prologue"))
        self._index = 0
        self._failed = False
        self._split = False
        self._ciphers: tuple[CipherState, CipherState] | None = None

    @property
    def complete(self) -> bool:
        """True once all three messages were written or read."""
        return self._index == len(_XX)

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key (32 bytes) once it has been received.

        The responder learns it from msg3, the initiator from msg2.  It is
        authenticated by the handshake but not yet *trusted*: the caller
        decides (credential check, pinned key) whether this key is welcome.
        """
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """The running handshake hash ``h``; final (and equal on both sides) once complete.

        Use it for channel binding, e.g. to sign "this session" (rev 34, 11.2).
        """
        return self._ss.h

    @property
    def writes_next(self) -> bool:
        """True when the next call must be ``write_message``."""
        return (self._index % 2 == 0) == self.initiator

    def _check_turn(self, writing: bool) -> None:
        if self._failed:
            raise HandshakeError("handshake already failed")
        if self._index >= len(_XX):
            raise HandshakeError("handshake already complete")
        if self.writes_next != writing:
            expected = "write_message" if self.writes_next else "read_message"
            raise HandshakeError(f"out of turn: expected {expected}")

    def _finish_message(self) -> None:
        self._index += 1
        if self._index == len(_XX):
            c1, c2 = self._ss.split()
            self._ciphers = (c1, c2) if self.initiator else (c2, c1)

    def _dh(self, token: str) -> bytes:
        # ee: e with re.  es: initiator e with rs, responder s with re.
        # se: initiator s with re, responder e with rs.
        if token == "ee":
            return self._e._exchange(self._re_key)  # type: ignore[union-attr,arg-type]
        if (token == "es") == self.initiator:
            return self._e._exchange(self._rs_key)  # type: ignore[union-attr,arg-type]
        return self._s._exchange(self._re_key)  # type: ignore[arg-type]

    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce the next handshake message, carrying ``payload``.

        The payload of msg1 travels in clear (no key exists yet); those of
        msg2 and msg3 are encrypted, though msg2's only to a not yet
        authenticated initiator (rev 34, 7.7).
        """
        self._check_turn(True)
        payload = _as_bytes(payload, "payload")
        if len(payload) + _OVERHEAD[self._index] > MAX_MESSAGE_LEN:
            raise ProtocolError("handshake payload too large for one Noise message",
                                code=ErrorCode.FRAME_TOO_LARGE)
        ss = self._ss
        out = bytearray()
        try:
            for token in _XX[self._index]:
                if token == "e":
                    if self._e is None:
                        self._e = KeyPair.generate()
                    out += self._e.public
                    ss.mix_hash(self._e.public)
                elif token == "s":
                    out += ss.encrypt_and_hash(self._s.public)
                else:
                    ss.mix_key(self._dh(token))
            out += ss.encrypt_and_hash(payload)
        except BaseException:
            self._failed = True
            raise
        self._finish_message()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message and return its payload.

        Raises :class:`~fastroute.errors.HandshakeError` for a message that
        is too short, too long, or does not authenticate (wrong prologue,
        tampering, wrong keys); the original DecryptError is its cause.
        """
        self._check_turn(False)
        message = _as_bytes(message, "handshake message")
        index = self._index
        if len(message) > MAX_MESSAGE_LEN:
            self._failed = True
            raise HandshakeError("handshake message longer than 65535 bytes")
        if len(message) < _OVERHEAD[index]:
            self._failed = True
            raise HandshakeError(
                f"handshake message {index + 1} too short ({len(message)} bytes)")
        ss = self._ss
        pos = 0
        try:
            for token in _XX[index]:
                if token == "e":
                    self._re = message[pos:pos + DHLEN]
                    self._re_key = _load_public(self._re)
                    pos += DHLEN
                    ss.mix_hash(self._re)
                elif token == "s":
                    size = DHLEN + TAGLEN if ss.has_key else DHLEN
                    self._rs = ss.decrypt_and_hash(message[pos:pos + size])
                    self._rs_key = _load_public(self._rs)
                    pos += size
                else:
                    ss.mix_key(self._dh(token))
            payload = ss.decrypt_and_hash(message[pos:])
        except DecryptError as exc:
            self._failed = True
            raise HandshakeError(f"handshake message {index + 1} failed authentication") from exc
        except BaseException:
            self._failed = True
            raise
        self._finish_message()
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport ciphers for this side: ``(send, recv)``.

        Only valid once :attr:`complete`; callable once, so that two owners
        can never share (and desynchronise) a nonce counter.  The handshake's
        ephemeral key is dropped at that point.
        """
        if self._ciphers is None:
            raise HandshakeError("handshake not complete" if not self._split
                                 else "split() already called")
        ciphers, self._ciphers = self._ciphers, None
        self._split = True
        self._e = None
        return ciphers

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "responder"
        state = "failed" if self._failed else f"message {self._index}/{len(_XX)}"
        return f"<HandshakeState {role} {state}>"


def frame(msg: bytes) -> bytes:
    """Prefix one Noise message with its 2-byte big-endian length.

    Raises :class:`~fastroute.errors.ProtocolError` (code
    ``FRAME_TOO_LARGE``) for a message over 65535 bytes.
    """
    size = len(msg)
    if size > MAX_MESSAGE_LEN:
        raise ProtocolError(f"frame of {size} bytes exceeds {MAX_MESSAGE_LEN}",
                            code=ErrorCode.FRAME_TOO_LARGE)
    return _frame_len(size) + msg


# A tuple, not a list: the cyclic GC untracks a tuple of bytes, while it
# would visit all 65,536 items of a list (one cache miss each) in every full
# collection of every process that imports this module.
_LEN_PREFIX = tuple(n.to_bytes(2, "big") for n in range(MAX_MESSAGE_LEN + 1))


def py_seal_frames(cipher: "CipherState", plaintexts: list[bytes]) -> list[bytes]:
    """Encrypt each plaintext and frame it, as buffers for ``transport.writelines``.

    Returns ``[len1, ct1, len2, ct2, ...]``: the length prefixes are shared
    constants and no ciphertext is copied again to join it to its prefix.
    Plaintexts must fit one Noise message (``CipherState.encrypt`` checks).
    """
    encrypt = cipher.encrypt
    lens = _LEN_PREFIX
    out = []
    for plaintext in plaintexts:
        ct = encrypt(plaintext)
        out.append(lens[len(ct)])
        out.append(ct)
    return out


class PyFrameReader:
    """Incremental parser of length-prefixed frames from a byte stream.

    :meth:`feed` takes chunks as they arrive (split or merged arbitrarily)
    and returns the complete frames they finish, in order.  Only the tail
    of an unfinished frame is kept, so the buffer never exceeds one frame
    (65537 bytes) whatever the peer sends.  Zero-length frames are valid
    and come back as ``b""``.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete (non-zero at EOF means truncation)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` (any bytes-like object) and return the frames it completes."""
        buf = self._buf
        if buf:
            buf += data
            view = memoryview(buf)
        else:
            # Common case for a relay: whole frames per read.  Parse straight
            # from the caller's buffer and copy only what is left over.
            view = memoryview(data).cast("B")
        frames: list[bytes] = []
        end = len(view)
        pos = 0
        try:
            while end - pos >= 2:
                stop = pos + 2 + ((view[pos] << 8) | view[pos + 1])
                if stop > end:
                    break
                frames.append(bytes(view[pos + 2:stop]))
                pos = stop
        finally:
            view.release()
        if buf:
            del buf[:pos]
        elif pos < end:
            buf += memoryview(data).cast("B")[pos:]
        return frames

    def __repr__(self) -> str:
        return f"<FrameReader buffered={len(self._buf)}>"


# the implementations in use: compiled (every read and every write of every
# link goes through them, on the relay and in the client) or the
# specifications above
if TYPE_CHECKING:
    FrameReader = PyFrameReader
else:
    FrameReader = twin(PyFrameReader)
seal_frames = twin(py_seal_frames)
