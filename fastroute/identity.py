"""Providers, their Ed25519 keys, device credentials and the trust registry.

The relay trusts a device because its provider signed a *credential* binding
``(address, device, static Noise key, validity)``; it trusts the provider
because the provider's public key is enrolled in the :class:`Registry`.
Enrolling a third party is one row in that registry: no bespoke integration.

Wire format (``docs/PROTOCOL.md``, "Credentials")::

    credential = msgpack [body: bin, sig: bin(64)]
    body       = msgpack [1, provider: str, address: str, device: str,
                          static_pub: bin(32), issued_at: int, expires_at: int]
    sig        = Ed25519(provider key, b"fastroute/cred/1\\x00" + body)

The signature covers the *encoded* body bytes, so a verifier never has to
re-encode anything to check it (re-encoding is where signature schemes over
structured data usually go wrong).

:func:`verify_credential` runs on every handshake.  It works on a
:class:`Trust` snapshot whose Ed25519 public keys are already loaded, so the
hot path is one msgpack decode, a few comparisons and one signature check.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ._args import check_bytes, check_int, check_str
from .errors import (
    AuthError,
    BadSignature,
    CredentialExpired,
    CredentialRevoked,
    ErrorCode,
    InvalidArgument,
    KeyMismatch,
    PolicyError,
    ProtocolError,
    UnknownProvider,
    WrongType,
)

__all__ = [
    "CREDENTIAL_DOMAIN",
    "CREDENTIAL_VERSION",
    "DEFAULT_TTL_S",
    "MAX_CREDENTIAL_LEN",
    "MAX_SKEW_S",
    "Credential",
    "ProviderKey",
    "ProviderRecord",
    "Registry",
    "Trust",
    "fingerprint",
    "is_valid_address",
    "key_fingerprint",
    "is_valid_device",
    "is_valid_provider",
    "issue_credential",
    "parse_address",
    "parse_credential",
    "parse_public_key",
    "verify_credential",
]

CREDENTIAL_DOMAIN = b"fastroute/cred/1\x00"
"""Prefix of every signed credential body: a signature made for anything
else (another protocol, another version) can never pass as a credential."""

CREDENTIAL_VERSION = 1
"""First element of the credential body."""

DEFAULT_TTL_S = 30 * 86400
"""Default credential lifetime: 30 days."""

MAX_SKEW_S = 300
"""How far in the future ``issued_at`` may be (clock skew between the
provider's issuer and the relay)."""

MAX_CREDENTIAL_LEN = 1024
"""Upper bound of an encoded credential.  The longest valid one is about 400
bytes; anything larger is rejected before msgpack looks at it."""

# Names: ASCII only, so that two different byte strings can never render as
# the same name (no homoglyphs, no Unicode normalisation questions).
_PROVIDER_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ADDRESS_RE = re.compile(r"([A-Za-z0-9._-]{1,64})@([a-z0-9][a-z0-9.-]{0,62})")


def is_valid_provider(name: object) -> bool:
    """True if ``name`` is a provider name: ``[a-z0-9][a-z0-9.-]{0,62}``."""
    return type(name) is str and _PROVIDER_RE.fullmatch(name) is not None


def is_valid_device(name: object) -> bool:
    """True if ``name`` is a device name: 1..64 of ``[A-Za-z0-9._-]``."""
    return type(name) is str and _NAME_RE.fullmatch(name) is not None


def is_valid_address(address: object) -> bool:
    """True if ``address`` is ``user@provider`` with both parts well formed."""
    return type(address) is str and _ADDRESS_RE.fullmatch(address) is not None


def parse_address(address: str) -> tuple[str, str]:
    """Split ``user@provider``; :class:`InvalidArgument` if it is not one."""
    m = _ADDRESS_RE.fullmatch(check_str(address, "address"))
    if m is None:
        raise InvalidArgument("address must be user@provider "
                              "(user: 1-64 of A-Z a-z 0-9 . _ -; provider: "
                              "lower-case [a-z0-9][a-z0-9.-]{0,62})")
    return m.group(1), m.group(2)


def _check_provider(name: object) -> str:
    name = check_str(name, "provider")
    if _PROVIDER_RE.fullmatch(name) is None:
        raise InvalidArgument("provider name must match [a-z0-9][a-z0-9.-]{0,62}")
    return name


def _check_device(name: object) -> str:
    name = check_str(name, "device")
    if _NAME_RE.fullmatch(name) is None:
        raise InvalidArgument("device name must be 1-64 of A-Z a-z 0-9 . _ -")
    return name


def fingerprint(public_key: bytes) -> str:
    """Short human-comparable id of a 32-byte public key.

    The first 16 bytes of its SHA-256 in hex, grouped by 2 bytes:
    ``"3f2a:09bc:...:e1d4"`` (8 groups).  Print it when enrolling a key and
    compare it out of band.
    """
    digest = hashlib.sha256(bytes(public_key)).hexdigest()[:32]
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


key_fingerprint = fingerprint
"""Alias of :func:`fingerprint` (reads better next to other key helpers)."""


def parse_public_key(data: bytes | str) -> bytes:
    """Read an Ed25519 public key given as raw 32 bytes, 64 hex digits or PEM.

    A ``str`` that is not 64 hex digits is taken as the path of a file
    holding one of those forms.  Returns the raw 32 bytes.  This is what
    ``fastroute provider add`` accepts for a third party's key, so providers
    can hand over whichever form their tooling produces.
    """
    if isinstance(data, str):
        text = data.strip()
        if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text):
            data = text.encode("ascii")
        else:
            try:
                with open(text, "rb") as fh:
                    data = fh.read(64 * 1024)
            except OSError as exc:
                raise InvalidArgument(
                    f"public key is neither 64 hex digits nor a readable file: {exc}") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WrongType(f"public key must be bytes or str, not {type(data).__name__}")
    data = bytes(data)
    if len(data) == 32:
        raw = data
    elif data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise InvalidArgument(f"unreadable PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidArgument("PEM public key is not an Ed25519 key")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        try:
            raw = bytes.fromhex(data.strip().decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise InvalidArgument("public key must be 32 raw bytes, 64 hex digits or PEM") from None
        if len(raw) != 32:
            raise InvalidArgument(f"hex public key must be 32 bytes, got {len(raw)}")
    _load_public(raw)  # refuse keys the verifier could not load later
    return raw


def _load_public(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise InvalidArgument(f"not a valid Ed25519 public key: {exc}") from None


class ProviderKey:
    """A provider's Ed25519 signing key (the private half).

    It never leaves the provider's issuing service; the relay only ever needs
    :attr:`public_key`.  Files are written as unencrypted PKCS#8 PEM with mode
    0600, and :meth:`load` refuses a file that group or others can read.
    """

    __slots__ = ("_key", "_public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        if not isinstance(key, Ed25519PrivateKey):
            raise WrongType(f"expected an Ed25519PrivateKey, not {type(key).__name__}")
        self._key = key
        self._public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> ProviderKey:
        """A fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_raw(cls, data: bytes) -> ProviderKey:
        """Load from the 32-byte raw private key (the RFC 8032 seed)."""
        return cls(Ed25519PrivateKey.from_private_bytes(check_bytes(data, "private key", 32)))

    def to_raw(self) -> bytes:
        """The 32-byte raw private key.  Secret: handle like the PEM file."""
        return self._key.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    @classmethod
    def from_pem(cls, data: bytes) -> ProviderKey:
        """Load from an unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
        if isinstance(data, str):
            data = data.encode("ascii", "replace")
        try:
            key = serialization.load_pem_private_key(bytes(data), password=None)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"unreadable PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidArgument("PEM private key is not an Ed25519 key")
        return cls(key)

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM of the private key."""
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def public_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM of the public key (safe to publish)."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the PEM to ``path`` with mode 0600, atomically.

        The temporary file is created 0600 from the start (never briefly
        world-readable) and renamed over ``path``.
        """
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.to_pem())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProviderKey:
        """Read a key written by :meth:`save` (or any Ed25519 PKCS#8 PEM).

        Like ssh, refuses (:class:`InvalidArgument`) a key file that group or
        others may read: a leaked provider key lets anyone impersonate every
        user of that provider.
        """
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise InvalidArgument(
                    f"key file {os.fspath(path)!r} is accessible by group/others "
                    f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 on it")
            return cls.from_pem(fh.read())

    @property
    def public_key(self) -> bytes:
        """The 32-byte raw Ed25519 public key (what the relay enrols)."""
        return self._public

    def fingerprint(self) -> str:
        """:func:`fingerprint` of :attr:`public_key`."""
        return fingerprint(self._public)

    def sign(self, data: bytes) -> bytes:
        """Raw Ed25519 signature (64 bytes) over ``data``."""
        return self._key.sign(data)

    def __repr__(self) -> str:  # never the secret
        return f"<ProviderKey {self.fingerprint()}>"


@dataclass(frozen=True, slots=True)
class Credential:
    """The decoded body of a device credential.

    Decoding does not mean trusted: only :func:`verify_credential` says that.
    """

    provider: str
    address: str
    device: str
    static_pub: bytes
    issued_at: int
    expires_at: int


def issue_credential(provider_key: ProviderKey, provider: str, address: str,
                     device: str, static_pub: bytes, *, ttl_s: int = DEFAULT_TTL_S,
                     now: int | None = None) -> bytes:
    """Sign a device credential; returns the encoded credential bytes.

    ``address`` must be ``user@<provider>``; ``static_pub`` is the device's
    32-byte X25519 Noise static public key.  Valid from ``now`` (default: the
    current time) for ``ttl_s`` seconds.
    """
    if not isinstance(provider_key, ProviderKey):
        raise WrongType(f"provider_key must be a ProviderKey, not {type(provider_key).__name__}")
    _check_provider(provider)
    _, addr_provider = parse_address(address)
    if addr_provider != provider:
        raise InvalidArgument("address does not belong to the provider")
    _check_device(device)
    static_pub = check_bytes(static_pub, "static_pub", 32)
    ttl_s = check_int(ttl_s, "ttl_s", 1)
    now = int(time.time()) if now is None else check_int(now, "now", 0)
    body = msgpack.packb([CREDENTIAL_VERSION, provider, address, device, static_pub,
                          now, now + ttl_s], use_bin_type=True)
    sig = provider_key.sign(CREDENTIAL_DOMAIN + body)
    return msgpack.packb([body, sig], use_bin_type=True)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("msgpack ext types are not allowed in credentials",
                        code=ErrorCode.MALFORMED)


def _strict_unpack(data: bytes, max_array: int) -> Any:
    # Lengths are bounded by len(data) <= MAX_CREDENTIAL_LEN already; maps and
    # ext types never occur in a credential, so any of them is malformed.
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True,
                               max_str_len=MAX_CREDENTIAL_LEN,
                               max_bin_len=MAX_CREDENTIAL_LEN,
                               max_array_len=max_array, max_map_len=0,
                               max_ext_len=0, ext_hook=_reject_ext)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several ValueError kinds
        raise ProtocolError(f"credential is not valid msgpack ({type(exc).__name__})",
                            code=ErrorCode.MALFORMED) from None


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(f"credential: {reason}", code=ErrorCode.BAD_FIELD)


def parse_credential(data: bytes) -> tuple[Credential, bytes, bytes]:
    """Strictly decode a credential; returns ``(credential, body, sig)``.

    Checks the structure and the grammar of every field, but neither the
    signature nor the trust chain.  Anything unexpected raises
    :class:`ProtocolError` with code ``MALFORMED`` (not msgpack, wrong shape)
    or ``BAD_FIELD`` (a field of the wrong type or value).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"credential must be bytes, not {type(data).__name__}",
                            code=ErrorCode.BAD_FIELD)
    if len(data) > MAX_CREDENTIAL_LEN:
        raise ProtocolError("credential too long", code=ErrorCode.MALFORMED)
    outer = _strict_unpack(data, 2)
    if type(outer) is not list or len(outer) != 2:
        raise ProtocolError("credential must be a 2-element array", code=ErrorCode.MALFORMED)
    body, sig = outer
    if type(body) is not bytes:
        raise _bad("body must be bin")
    if type(sig) is not bytes or len(sig) != 64:
        raise _bad("signature must be 64 bytes of bin")
    fields = _strict_unpack(body, 7)
    if type(fields) is not list or len(fields) != 7:
        raise ProtocolError("credential body must be a 7-element array",
                            code=ErrorCode.MALFORMED)
    version, provider, address, device, static_pub, issued_at, expires_at = fields
    if type(version) is not int or version != CREDENTIAL_VERSION:
        raise _bad("unsupported credential version")
    if not is_valid_provider(provider):
        raise _bad("bad provider name")
    if not is_valid_address(address):
        raise _bad("bad address")
    if not is_valid_device(device):
        raise _bad("bad device name")
    if type(static_pub) is not bytes or len(static_pub) != 32:
        raise _bad("static key must be 32 bytes of bin")
    if type(issued_at) is not int or type(expires_at) is not int:
        raise _bad("validity times must be integers")
    if issued_at < 0 or expires_at <= issued_at:
        raise _bad("validity interval is empty or negative")
    return (Credential(provider, address, device, static_pub, issued_at, expires_at),
            body, sig)


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """One enrolled provider as stored in the registry.

    Quotas are ``None`` when the relay's defaults apply.
    """

    name: str
    public_key: bytes
    enrolled_at: int
    revoked_at: int | None
    msgs_per_s: int | None
    bytes_per_s: int | None
    max_body: int | None
    #: limits shared by all of the provider's devices together (None: the
    #: relay's ``limits.provider_*`` defaults)
    provider_msgs_per_s: int | None = None
    provider_bytes_per_s: int | None = None
    provider_ops_per_s: int | None = None
    #: optional DELIVER header fields its devices do not receive
    withhold: tuple[str, ...] = ()

    @property
    def revoked(self) -> bool:
        """True while the provider is revoked (:meth:`Registry.restore_provider` lifts it)."""
        return self.revoked_at is not None

    @property
    def fingerprint(self) -> str:
        """:func:`fingerprint` of the provider's public key."""
        return fingerprint(self.public_key)


class Trust:
    """An immutable snapshot of the registry, ready for fast verification.

    Holds each provider's loaded :class:`Ed25519PublicKey` (loading one costs
    more than verifying with it) and the revocations as sets.  Build it with
    :meth:`Registry.trust`; swap in a new one when :meth:`Registry.version`
    changes.  ``version`` is the registry version it was taken at.  Safe to
    share between threads.
    """

    __slots__ = ("_providers", "_keys", "_revoked_devices", "version", "quarantined")

    def __init__(self, providers: Iterable[ProviderRecord],
                 revoked_devices: Iterable[tuple[str, str]] = (),
                 version: object = None,
                 quarantined: dict[str, tuple[int, str]] | None = None) -> None:
        self._providers = {p.name: p for p in providers}
        self._keys = {name: _load_public(p.public_key) for name, p in self._providers.items()}
        self._revoked_devices = frozenset(revoked_devices)
        self.version = version
        #: quarantined sender address -> (since, reason)
        self.quarantined = dict(quarantined or {})

    @classmethod
    def load(cls, registry: Registry) -> Trust:
        """The current snapshot of ``registry`` (same as ``registry.trust()``)."""
        return registry.trust()

    def provider(self, name: str) -> ProviderRecord:
        """The record of an enrolled provider; :class:`UnknownProvider` if none."""
        try:
            return self._providers[name]
        except KeyError:
            raise UnknownProvider("provider is not enrolled") from None

    def providers(self) -> list[ProviderRecord]:
        """All enrolled providers (revoked ones included), sorted by name."""
        return sorted(self._providers.values(), key=lambda p: p.name)

    def public_key(self, name: str) -> Ed25519PublicKey:
        """The loaded verification key of provider ``name``."""
        try:
            return self._keys[name]
        except KeyError:
            raise UnknownProvider("provider is not enrolled") from None

    def quota(self, name: str) -> dict[str, int | None]:
        """The per-device and provider-wide quotas of provider ``name``.

        Keys: ``msgs_per_s``, ``bytes_per_s``, ``max_body`` (per device; may
        only lower the relay's defaults) and ``provider_msgs_per_s``,
        ``provider_bytes_per_s``, ``provider_ops_per_s`` (all its devices
        together).

        ``None`` values mean the relay's defaults apply.
        """
        rec = self.provider(name)
        return {"msgs_per_s": rec.msgs_per_s, "bytes_per_s": rec.bytes_per_s,
                "max_body": rec.max_body, "provider_msgs_per_s": rec.provider_msgs_per_s,
                "provider_bytes_per_s": rec.provider_bytes_per_s,
                "provider_ops_per_s": rec.provider_ops_per_s}

    def check_live(self, cred: Credential, now: int) -> None:
        """Re-check an already verified credential of a live connection.

        Raises what :func:`verify_credential` would for a change since the
        handshake: the provider gone (:class:`UnknownProvider`) or revoked,
        the device revoked (:class:`CredentialRevoked`), or expiry
        (:class:`CredentialExpired`).  No signature work: the relay calls it
        for every connection each time it reloads the registry.
        """
        rec = self._providers.get(cred.provider)
        if rec is None:
            raise UnknownProvider("provider is not enrolled")
        if rec.revoked_at is not None:
            raise CredentialRevoked("provider was revoked")
        if (cred.address, cred.device) in self._revoked_devices:
            raise CredentialRevoked("device was revoked")
        if now >= cred.expires_at:
            raise CredentialExpired("credential expired")

    def revoked_since(self, old: "Trust") -> tuple[frozenset[tuple[str, str]], frozenset[str]]:
        """What may fail :meth:`check_live` here that passed against ``old``:
        the ``(address, device)`` pairs revoked since, and the providers gone
        or revoked since (their every credential).  A live link's credential
        checked against ``old`` needs checking again only if it is named."""
        providers = frozenset(
            name for name, rec in old._providers.items()
            if rec.revoked_at is None and (
                name not in self._providers or self._providers[name].revoked_at is not None))
        return self._revoked_devices - old._revoked_devices, providers

    def same_policies(self, old: "Trust") -> bool:
        """True when this snapshot's providers (keys, quotas, header policies,
        revocations of whole providers) and quarantines are ``old``'s: what
        differs, if anything, is device revocations alone."""
        return self._providers == old._providers and self.quarantined == old.quarantined

    def is_revoked(self, address: str, device: str) -> bool:
        """True if the device, or the whole provider of ``address``, is revoked."""
        if (address, device) in self._revoked_devices:
            return True
        _, _, provider = address.rpartition("@")
        rec = self._providers.get(provider)
        return rec is not None and rec.revoked_at is not None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS providers (
    name            TEXT PRIMARY KEY,
    public_key      BLOB NOT NULL,
    enrolled_at     INTEGER NOT NULL,
    revoked_at      INTEGER,
    max_msgs_per_s  INTEGER,
    max_bytes_per_s INTEGER,
    max_body        INTEGER
);
CREATE TABLE IF NOT EXISTS revoked_devices (
    provider   TEXT NOT NULL,
    address    TEXT NOT NULL,
    device     TEXT NOT NULL,
    revoked_at INTEGER NOT NULL,
    PRIMARY KEY (address, device)
);
CREATE TABLE IF NOT EXISTS consent (
    address    TEXT NOT NULL,
    provider   TEXT NOT NULL,
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (address, provider)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices_seen (
    address    TEXT NOT NULL,
    device     TEXT NOT NULL,
    provider   TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (address, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    address TEXT PRIMARY KEY,
    since   INTEGER NOT NULL,
    reason  TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', 1), ('generation', 0);
"""

_PROVIDER_COLS = ("name, public_key, enrolled_at, revoked_at, "
                  "max_msgs_per_s, max_bytes_per_s, max_body, "
                  "provider_msgs_per_s, provider_bytes_per_s, provider_ops_per_s, withhold")

#: columns added after schema 1 (ALTER TABLE on open when missing)
_ADDED_PROVIDER_COLS = (("provider_msgs_per_s", "INTEGER"), ("provider_bytes_per_s", "INTEGER"),
                        ("provider_ops_per_s", "INTEGER"), ("withhold", "TEXT"))

#: DELIVER header fields a provider's policy may withhold from its devices (v1:
#: the relay's timestamp, sent as 0 so the op keeps its fixed positions)
WITHHOLDABLE = frozenset({"ts_ms"})
#: fields a client needs to decrypt or deduplicate: never withheld
REQUIRED_FIELDS = frozenset({"from", "id", "device", "group", "seq", "body", "cls"})


def check_withhold(fields: Iterable[str]) -> tuple[str, ...]:
    """A header policy's field list, checked: InvalidArgument for a field that
    may never be withheld (sender address, message id, sending device, group
    id, ...) or one the relay does not know."""
    out = []
    for f in fields:
        if f in REQUIRED_FIELDS:
            raise InvalidArgument(f"header field {f!r} can never be withheld: clients "
                                  "need it to decrypt or deduplicate")
        if f not in WITHHOLDABLE:
            raise InvalidArgument(f"unknown header field {f!r} (withholdable: "
                                  f"{sorted(WITHHOLDABLE)})")
        if f not in out:
            out.append(f)
    return tuple(sorted(out))


class Registry:
    """Enrolled providers and revocations, persisted in a SQLite file (WAL).

    Several processes may open the same file: typically the relay (reading)
    and the ``fastroute`` CLI (enrolling, revoking).  The relay polls
    :meth:`version` and rebuilds its :class:`Trust` when it changes, so a
    revocation takes effect without a restart.  Every method is safe to call
    from several threads of one process.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE) so a
        # writer never upgrades a read lock and deadlocks against another one
        try:
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise InvalidArgument(f"cannot open the registry {self.path!r}: {exc}") from None
        self._lock = threading.RLock()
        self._trust: Trust | None = None
        with self._lock:
            self._db.execute("PRAGMA synchronous=FULL")  # revocations must survive a crash
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # executescript() would COMMIT behind our back; run statements one by one
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                have = {r[1] for r in self._db.execute("PRAGMA table_info(providers)")}
                for column, kind in _ADDED_PROVIDER_COLS:
                    if column not in have:
                        self._db.execute(f"ALTER TABLE providers ADD COLUMN {column} {kind}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- writing ---------------------------------------------------------

    def _write(self, sql: str, args: tuple[Any, ...], bump: bool = True) -> int:
        """Run one statement in its own transaction and bump the generation."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._db.execute(sql, args).rowcount
                if n and bump:
                    self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return n

    def add_provider(self, name: str, public_key: bytes, *,
                     msgs_per_s: int | None = None,
                     bytes_per_s: int | None = None,
                     max_body: int | None = None,
                     provider_msgs_per_s: int | None = None,
                     provider_bytes_per_s: int | None = None,
                     provider_ops_per_s: int | None = None,
                     withhold: Iterable[str] | None = None,
                     now: int | None = None) -> ProviderRecord:
        """Enrol a provider; returns its record.

        Quotas (``None`` = the relay's defaults): messages and bytes per
        second per device, and the largest body (these may only lower the
        relay's defaults); ``provider_*``: messages, body bytes and ops per
        second of all the provider's devices together; ``withhold``: the
        optional DELIVER header fields its devices do not receive (see
        :func:`check_withhold`; ``[]`` clears it).  The registry is the one
        source of per-provider limits: a running relay applies a change to
        live connections within ``registry_poll_s``.  Enrolling the
        same name with the same key again is a no-op apart from updating the
        quotas given (not ``None``).  It never lifts a revocation: a revoked
        name raises :class:`PolicyError` (use :meth:`restore_provider`).  The
        same name with a different key raises :class:`InvalidArgument` (use
        :meth:`rotate_provider_key`).
        """
        _check_provider(name)
        public_key = check_bytes(public_key, "public_key", 32)
        _load_public(public_key)
        quotas: tuple[tuple[str, str, Any], ...] = (
            ("max_msgs_per_s", "msgs_per_s", msgs_per_s),
            ("max_bytes_per_s", "bytes_per_s", bytes_per_s),
            ("max_body", "max_body", max_body),
            ("provider_msgs_per_s", "provider_msgs_per_s", provider_msgs_per_s),
            ("provider_bytes_per_s", "provider_bytes_per_s", provider_bytes_per_s),
            ("provider_ops_per_s", "provider_ops_per_s", provider_ops_per_s))
        for column, what, value in quotas:
            if value is not None:
                # a provider-wide rate of 0 clears it (the relay's default applies)
                check_int(value, what, 0 if column.startswith("provider_") else 1)
        if withhold is not None:
            quotas += (("withhold", "withhold", ",".join(check_withhold(withhold))),)
        now = int(time.time()) if now is None else check_int(now, "now", 0)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT public_key, revoked_at FROM providers "
                                       "WHERE name = ?", (name,)).fetchone()
                if row is not None and row[1] is not None:
                    raise PolicyError(f"provider {name!r} is revoked; restore it first "
                                      f"(fastroute provider restore {name})")
                if row is None:
                    self._db.execute(
                        "INSERT INTO providers (name, public_key, enrolled_at) VALUES (?, ?, ?)",
                        (name, public_key, now))
                elif not hmac.compare_digest(bytes(row[0]), public_key):
                    raise InvalidArgument(f"provider {name!r} is already enrolled with another "
                                          f"key; to replace it: fastroute provider rotate {name}")
                # new or re-enrolled with the same key: the quotas given apply
                for column, _, value in quotas:
                    if value is not None:
                        self._db.execute(f"UPDATE providers SET {column} = ? WHERE name = ?",
                                         (value or None, name))
                self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get_provider(name)

    def revoke_provider(self, name: str, *, now: int | None = None) -> bool:
        """Revoke a provider: every credential it signed stops verifying.

        Revoking twice keeps the first time (returns False the second time);
        :meth:`restore_provider` lifts it.  :class:`UnknownProvider` if the
        name is not enrolled.
        """
        _check_provider(name)
        now = int(time.time()) if now is None else check_int(now, "now", 0)
        self.get_provider(name)
        return bool(self._write(
            "UPDATE providers SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (now, name)))

    def restore_provider(self, name: str) -> bool:
        """Lift a provider's revocation; its unexpired credentials verify again.

        Devices revoked one by one stay revoked.  Returns False if the provider
        was not revoked; :class:`UnknownProvider` if it is not enrolled.
        """
        _check_provider(name)
        self.get_provider(name)
        return bool(self._write(
            "UPDATE providers SET revoked_at = NULL WHERE name = ? AND revoked_at IS NOT NULL",
            (name,)))

    def remove_provider(self, name: str) -> bool:
        """Forget a provider entirely (a test provider after a replay).

        Its live connections close at the relay's next poll (the provider is
        no longer enrolled); its devices' individual revocations go with it.
        Returns False if it was not enrolled.
        """
        _check_provider(name)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._db.execute("DELETE FROM providers WHERE name = ?", (name,)).rowcount
                self._db.execute("DELETE FROM revoked_devices WHERE provider = ?", (name,))
                if n:
                    self._db.execute(
                        "UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(n)

    def rotate_provider_key(self, name: str, public_key: bytes) -> ProviderRecord:
        """Replace a provider's signing key (a leaked or retired key).

        Credentials signed by the old key stop verifying at once (live links
        close within the relay's poll interval); the provider re-issues its
        devices' credentials with the new key.  Quotas and the revocation
        state are kept.  :class:`UnknownProvider` if not enrolled,
        :class:`InvalidArgument` if the key is the current one.
        """
        _check_provider(name)
        public_key = check_bytes(public_key, "public_key", 32)
        _load_public(public_key)
        old = self.get_provider(name)
        if hmac.compare_digest(old.public_key, public_key):
            raise InvalidArgument(f"provider {name!r} already has that key")
        self._write("UPDATE providers SET public_key = ? WHERE name = ?", (public_key, name))
        return self.get_provider(name)

    def device_revoked_at(self, address: str, device: str) -> int | None:
        """When one device was revoked by name, or None (its provider's state aside)."""
        with self._lock:
            row = self._db.execute(
                "SELECT revoked_at FROM revoked_devices WHERE address = ? AND device = ?",
                (address, device)).fetchone()
        return None if row is None else int(row[0])

    def revoke_device(self, address: str, device: str, *, now: int | None = None) -> bool:
        """Revoke one device of an address (a lost phone); idempotent.

        Permanent for that ``(address, device)`` pair: a replacement device
        gets a new device name.  The provider need not be enrolled.
        """
        _, provider = parse_address(address)
        _check_device(device)
        now = int(time.time()) if now is None else check_int(now, "now", 0)
        return bool(self._write(
            "INSERT OR IGNORE INTO revoked_devices (provider, address, device, revoked_at) "
            "VALUES (?, ?, ?, ?)", (provider, address, device, now)))

    def set_consent(self, address: str, provider: str, allow: bool, *,
                    now: int | None = None) -> None:
        """Record a user's opt-in (``allow``) or opt-out for a provider's senders.

        ``provider`` is a provider name, or ``"*"`` for every third-party
        provider.  Durable when this returns (the relay acks the user's
        CONSENT op only then).  Consent is not a trust change, so it does not
        bump :meth:`version`; the relay that wrote it keeps its own copy.
        """
        parse_address(address)
        if provider != "*":
            _check_provider(provider)
        if allow:
            now = int(time.time()) if now is None else check_int(now, "now", 0)
            self._write("INSERT OR REPLACE INTO consent (address, provider, granted_at) "
                        "VALUES (?, ?, ?)", (address, provider, now), bump=False)
        else:
            self._write("DELETE FROM consent WHERE address = ? AND provider = ?",
                        (address, provider), bump=False)

    def consents(self) -> dict[str, frozenset[str]]:
        """Every opt-in: address -> the providers (or ``"*"``) it accepts messages from."""
        out: dict[str, set[str]] = {}
        with self._lock:
            for address, provider in self._db.execute("SELECT address, provider FROM consent"):
                out.setdefault(address, set()).add(provider)
        return {a: frozenset(p) for a, p in out.items()}

    def note_devices(self, rows: Iterable[tuple[str, str, str, int]]) -> None:
        """Record ``(address, device, provider, first_seen)`` of devices the relay
        saw for the first time (kept: the age of a sender and the per-provider
        cap on new devices are counted from them)."""
        rows = list(rows)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO devices_seen (address, device, provider, first_seen) "
                    "VALUES (?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def devices_seen(self) -> list[tuple[str, str, str, int]]:
        """Every device ever seen: ``(address, device, provider, first_seen)``."""
        with self._lock:
            return self._db.execute(
                "SELECT address, device, provider, first_seen FROM devices_seen").fetchall()

    def quarantine(self, address: str, reason: str, *, now: int | None = None) -> None:
        """Quarantine a sender address: the relay refuses its sends with QUARANTINED
        until :meth:`lift_quarantine`.  Keeps the first time and reason."""
        parse_address(address)
        now = int(time.time()) if now is None else check_int(now, "now", 0)
        self._write("INSERT OR IGNORE INTO quarantine (address, since, reason) VALUES (?, ?, ?)",
                    (address, now, str(reason)[:200]))

    def lift_quarantine(self, address: str) -> bool:
        """Lift a sender's quarantine; False if it was not quarantined."""
        parse_address(address)
        return self._write("DELETE FROM quarantine WHERE address = ?", (address,)) > 0

    def quarantined(self) -> list[tuple[str, int, str]]:
        """Quarantined senders as ``(address, since, reason)``, oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT address, since, reason FROM quarantine ORDER BY since, address").fetchall()

    # -- reading ---------------------------------------------------------

    def get_provider(self, name: str) -> ProviderRecord:
        """The record of ``name``; :class:`UnknownProvider` if not enrolled."""
        with self._lock:
            row = self._db.execute(f"SELECT {_PROVIDER_COLS} FROM providers WHERE name = ?",
                                   (name,)).fetchone()
        if row is None:
            raise UnknownProvider(f"provider {name!r} is not enrolled")
        return _record(row)

    def list_providers(self) -> list[ProviderRecord]:
        """All enrolled providers (revoked included), sorted by name."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_PROVIDER_COLS} FROM providers ORDER BY name").fetchall()
        return [_record(r) for r in rows]

    def is_revoked(self, address: str, device: str) -> bool:
        """True if the device, or the whole provider of ``address``, is revoked."""
        _, provider = parse_address(address)
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM revoked_devices WHERE address = ? AND device = ? "
                "UNION ALL SELECT 1 FROM providers WHERE name = ? AND revoked_at IS NOT NULL "
                "LIMIT 1", (address, device, provider)).fetchone()
        return row is not None

    def version(self) -> tuple[int, int]:
        """An opaque value that changes whenever any process changes the file.

        Compare with ``!=``; cheap enough to poll every second.  It combines
        the generation counter that every write through this class bumps
        (covers this connection's own writes) with ``PRAGMA data_version``
        (changes when *another* connection commits, even one that bypassed
        this class).
        """
        with self._lock:
            dv = self._db.execute("PRAGMA data_version").fetchone()[0]
            gen = self._db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        return (gen, dv)

    def trust(self) -> Trust:
        """A :class:`Trust` snapshot, rebuilt only when :meth:`version` changed."""
        with self._lock:
            version = self.version()
            trust = self._trust
            if trust is not None and trust.version == version:
                return trust
            # one read transaction so the snapshot is consistent
            self._db.execute("BEGIN")
            try:
                providers = [_record(r) for r in self._db.execute(
                    f"SELECT {_PROVIDER_COLS} FROM providers")]
                devices = self._db.execute(
                    "SELECT address, device FROM revoked_devices").fetchall()
                quarantined = {a: (since, why) for a, since, why in self._db.execute(
                    "SELECT address, since, reason FROM quarantine")}
            finally:
                self._db.execute("COMMIT")
            trust = Trust(providers, devices, version, quarantined)
            self._trust = trust
            return trust

    def close(self) -> None:
        """Close the database connection (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record(row: tuple[Any, ...]) -> ProviderRecord:
    name, key, enrolled, revoked, mps, bps, body, pmps, pbps, pops, withhold = row
    # a policy written by hand past add_provider is checked when it is loaded
    fields = check_withhold(withhold.split(",")) if withhold else ()
    return ProviderRecord(name, bytes(key), enrolled, revoked, mps, bps, body, pmps, pbps, pops,
                          fields)


def verify_credential(trust: Trust | Registry, data: bytes, handshake_static: bytes,
                      now: int) -> Credential:
    """Check a device's credential against the trust chain; returns it if good.

    ``handshake_static`` is the remote static key the Noise handshake
    authenticated.  The checks run in this order, and the first failure
    raises:

    1. decodable (:class:`ProtocolError`, ``MALFORMED``/``BAD_FIELD``)
    2. provider enrolled (:class:`UnknownProvider`)
    3. provider not revoked (:class:`CredentialRevoked`)
    4. signature valid (:class:`BadSignature`)
    5. the address belongs to the provider (:class:`AuthError`)
    6. the bound static key is the handshake's (:class:`KeyMismatch`)
    7. not expired (:class:`CredentialExpired`); not issued more than
       :data:`MAX_SKEW_S` in the future (:class:`InvalidArgument`)
    8. device not revoked (:class:`CredentialRevoked`)

    The signature is checked before anything the signer vouches for, so an
    error past step 4 is about a genuine credential.  On the hot path pass
    the :class:`Trust` (a :class:`Registry` costs a version query per call).
    """
    if isinstance(trust, Registry):
        trust = trust.trust()
    elif not isinstance(trust, Trust):
        raise WrongType(f"expected a Trust or Registry, not {type(trust).__name__}")
    if type(handshake_static) is not bytes or len(handshake_static) != 32:
        raise WrongType("handshake_static must be 32 bytes")
    cred, body, sig = parse_credential(data)
    record = trust._providers.get(cred.provider)
    if record is None:
        raise UnknownProvider("provider is not enrolled")
    if record.revoked_at is not None:
        raise CredentialRevoked("provider was revoked")
    try:
        trust._keys[cred.provider].verify(sig, CREDENTIAL_DOMAIN + body)
    except InvalidSignature:
        raise BadSignature("credential signature does not verify") from None
    if cred.address.rpartition("@")[2] != cred.provider:
        raise AuthError("address does not belong to the signing provider")
    if not hmac.compare_digest(cred.static_pub, handshake_static):
        raise KeyMismatch("credential is bound to another static key")
    if now >= cred.expires_at:
        raise CredentialExpired("credential expired")
    if cred.issued_at > now + MAX_SKEW_S:
        raise InvalidArgument("credential issued in the future (clock skew?)")
    if (cred.address, cred.device) in trust._revoked_devices:
        raise CredentialRevoked("device was revoked")
    return cred
