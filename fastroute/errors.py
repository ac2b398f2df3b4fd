"""The exception hierarchy of fastroute and the stable error codes of the wire.

Every exception that fastroute raises on purpose derives from
:class:`FastrouteError`; each one also derives from the builtin exception a
caller would naturally catch (``KeyError`` for an unknown name, ``TypeError``
for a wrong type, ...), the way msgpack's exceptions do.  Each class carries a
numeric ``code`` that never changes meaning: the relay puts the same number on
the wire (``docs/PROTOCOL.md``, "Error codes"), so a client in any language and
a Python embedder see the same classification.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "FastrouteError",
    "InvalidArgument",
    "WrongType",
    "UnknownAddress",
    "UnknownDevice",
    "UnknownGroup",
    "MailboxFull",
    "ProtocolError",
    "HandshakeError",
    "DecryptError",
    "AuthError",
    "UnknownProvider",
    "BadSignature",
    "KeyMismatch",
    "CredentialExpired",
    "CredentialRevoked",
    "PolicyError",
    "RateLimited",
    "BodyTooLarge",
    "ConsentRequired",
    "RecipientFull",
    "Quarantined",
    "TraceFormatError",
    "ConnectionClosed",
    "StoreFailed",
    "StartFailed",
    "StoreFull",
    "MediaError",
    "UnknownBlob",
    "UnknownUpload",
    "ChunkRejected",
    "BlobMismatch",
    "UploadIncomplete",
    "BadKey",
    "DuplicateId",
    "DeviceMismatch",
    "NoKeys",
    "KeyLimit",
    "NotMember",
    "NotInvited",
    "NotAdmin",
    "GroupFull",
    "GroupLimit",
    "BlockLimit",
    "LastAdmin",
    "GroupMismatch",
    "error_for_code",
]


class ErrorCode(enum.IntEnum):
    """Stable numeric error codes, shared by the Python API and the wire.

    Ranges: 0 success; 1xx protocol/framing; 2xx authentication; 3xx routing;
    4xx limits and policy; 5xx server side.  A code is never reused for a
    different meaning; new codes are only appended.
    """

    OK = 0
    # 1xx: the bytes or their structure are wrong
    MALFORMED = 100
    UNKNOWN_OP = 101
    BAD_FIELD = 102
    FRAME_TOO_LARGE = 103
    HANDSHAKE_FAILED = 104
    DECRYPT_FAILED = 105
    BAD_PROLOGUE = 106
    HANDSHAKE_TIMEOUT = 107
    IDLE_TIMEOUT = 108
    INVALID_ARGUMENT = 110
    WRONG_TYPE = 111
    BAD_CHUNK = 112
    MEDIA_MISMATCH = 113
    UPLOAD_INCOMPLETE = 114
    BAD_KEY = 115
    DUPLICATE_ID = 116
    # 2xx: who is this device
    AUTH_FAILED = 200
    UNKNOWN_PROVIDER = 201
    BAD_SIGNATURE = 202
    KEY_MISMATCH = 203
    CREDENTIAL_EXPIRED = 204
    CREDENTIAL_REVOKED = 205
    SESSION_REPLACED = 206
    # 3xx: where does it go
    UNKNOWN_RECIPIENT = 300
    UNKNOWN_DEVICE = 301
    UNKNOWN_GROUP = 302
    MAILBOX_FULL = 303
    MEDIA_NOT_FOUND = 304
    UPLOAD_NOT_FOUND = 305
    DEVICE_MISMATCH = 306
    NO_KEYS = 307
    NOT_MEMBER = 308
    NOT_INVITED = 309
    # 4xx: may it be sent
    RATE_LIMITED = 400
    BODY_TOO_LARGE = 401
    CONSENT_REQUIRED = 402
    POLICY = 403
    KEY_LIMIT = 404
    QUARANTINED = 405
    OUTPUT_LIMIT = 406
    DEVICE_LIMIT = 407
    RECIPIENT_FULL = 408
    NEW_DEVICE_LIMIT = 409
    NOT_ADMIN = 410
    GROUP_FULL = 411
    GROUP_LIMIT = 412
    LAST_ADMIN = 413
    BLOCK_LIMIT = 414
    # 5xx: the relay's side
    INTERNAL = 500
    SHUTTING_DOWN = 503
    STORE_FAILED = 504
    STORE_FULL = 505
    #: never on the wire: the relay could not start (address in use, data
    #: directory locked by another relay, unwritable or not a directory)
    START_FAILED = 510


class _NotFound(KeyError):
    """KeyError whose message reads as written (KeyError would repr() it)."""

    def __str__(self) -> str:
        return Exception.__str__(self)


class FastrouteError(Exception):
    """Root of every exception fastroute raises on purpose.

    ``code`` is an :class:`ErrorCode`; ``str(exc)`` is a human-readable reason
    that never contains message bodies.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, *args: object, code: ErrorCode | int | None = None) -> None:
        super().__init__(*args)
        if code is not None:
            self.code = ErrorCode(code)


class InvalidArgument(FastrouteError, ValueError):
    """An argument has the right type but an unacceptable value."""

    code = ErrorCode.INVALID_ARGUMENT


class WrongType(FastrouteError, TypeError):
    """An argument has the wrong type."""

    code = ErrorCode.WRONG_TYPE


class UnknownAddress(FastrouteError, _NotFound):
    """The address has no registered device (routing) or is not known."""

    code = ErrorCode.UNKNOWN_RECIPIENT



class UnknownDevice(FastrouteError, _NotFound):
    """No device with that id (or name) is registered."""

    code = ErrorCode.UNKNOWN_DEVICE



class UnknownGroup(FastrouteError, _NotFound):
    """No group with that id exists."""

    code = ErrorCode.UNKNOWN_GROUP



class MailboxFull(FastrouteError, BufferError):
    """One or more device mailboxes could not take the message.

    Raised *after* every other mailbox of the call was served: nothing the
    call could place was dropped.  ``entered`` counts the mailboxes that did
    take a message during the call; ``full`` lists ``(item_index, device_id)``
    pairs that did not (``item_index`` is 0 for single-message calls and the
    position in the batch for ``route_many``).  The caller spills those to
    its store.
    """

    code = ErrorCode.MAILBOX_FULL

    def __init__(self, message: str, entered: int = 0,
                 full: list[tuple[int, int]] | None = None) -> None:
        super().__init__(message)
        self.entered = entered
        self.full = list(full or ())


class ProtocolError(FastrouteError, ValueError):
    """The peer sent bytes or a structure the protocol does not allow."""

    code = ErrorCode.MALFORMED


class HandshakeError(ProtocolError):
    """The Noise handshake failed; the connection is closed."""

    code = ErrorCode.HANDSHAKE_FAILED


class DecryptError(ProtocolError):
    """A Noise message failed authentication (bad tag); the link is dead."""

    code = ErrorCode.DECRYPT_FAILED


class AuthError(FastrouteError, PermissionError):
    """The device's credential chain did not verify."""

    code = ErrorCode.AUTH_FAILED


class UnknownProvider(AuthError):
    """The credential names a provider that is not enrolled."""

    code = ErrorCode.UNKNOWN_PROVIDER


class BadSignature(AuthError):
    """The credential's signature does not verify under the provider key."""

    code = ErrorCode.BAD_SIGNATURE


class KeyMismatch(AuthError):
    """The credential binds a static key other than the handshake's."""

    code = ErrorCode.KEY_MISMATCH


class CredentialExpired(AuthError):
    """The credential's expiry is in the past."""

    code = ErrorCode.CREDENTIAL_EXPIRED


class CredentialRevoked(AuthError):
    """The device or its whole provider was revoked."""

    code = ErrorCode.CREDENTIAL_REVOKED


class PolicyError(FastrouteError, PermissionError):
    """The integrity gate refused the operation."""

    code = ErrorCode.POLICY


class RateLimited(PolicyError):
    """A message or byte quota is exhausted for now."""

    code = ErrorCode.RATE_LIMITED


class BodyTooLarge(PolicyError):
    """The body exceeds the relay's size limit."""

    code = ErrorCode.BODY_TOO_LARGE


class ConsentRequired(PolicyError):
    """The recipient has not opted in to messages from this provider."""

    code = ErrorCode.CONSENT_REQUIRED


class RecipientFull(PolicyError):
    """The recipient's stored backlog is at its cap (messages or bytes, per
    device or per address); resend later with the same id."""

    code = ErrorCode.RECIPIENT_FULL


class Quarantined(PolicyError):
    """The sender is quarantined for abuse; an operator may lift it."""

    code = ErrorCode.QUARANTINED


class TraceFormatError(FastrouteError, ValueError):
    """A trace file line could not be parsed; ``lineno`` says which."""

    code = ErrorCode.INVALID_ARGUMENT

    def __init__(self, message: str, lineno: int | None = None) -> None:
        super().__init__(message if lineno is None else f"line {lineno}: {message}")
        self.lineno = lineno


class ConnectionClosed(FastrouteError, ConnectionError):
    """The link to the relay ended; ``code`` is the relay's reason (0 = orderly)."""

    code = ErrorCode.OK


class StoreFailed(FastrouteError, OSError):
    """The message store could not read or write (disk full, closed, I/O error)."""

    code = ErrorCode.STORE_FAILED


class StartFailed(FastrouteError, OSError):
    """The relay could not start: its address is in use, another relay holds the
    data directory, or the directory cannot be created or written."""

    code = ErrorCode.START_FAILED


class StoreFull(StoreFailed):
    """The message store reached its disk budget (or the disk is full); so
    did the media store.  Nothing was stored; resend later with the same id."""

    code = ErrorCode.STORE_FULL


class MediaError(FastrouteError, ValueError):
    """A media upload or download was refused."""

    code = ErrorCode.INVALID_ARGUMENT


class UnknownBlob(MediaError, _NotFound):
    """No blob with that id is stored (never uploaded, or expired)."""

    code = ErrorCode.MEDIA_NOT_FOUND



class UnknownUpload(MediaError, _NotFound):
    """No upload in progress has that id (never begun, finished, aborted or timed out)."""

    code = ErrorCode.UPLOAD_NOT_FOUND



class ChunkRejected(MediaError):
    """A chunk has the wrong size, an index out of range, or differs from an
    earlier chunk with the same index.  The upload itself is kept."""

    code = ErrorCode.BAD_CHUNK


class BlobMismatch(MediaError):
    """The assembled upload does not have the declared size or SHA-256.

    The upload is discarded and nothing of it is left on disk.
    """

    code = ErrorCode.MEDIA_MISMATCH


class UploadIncomplete(MediaError):
    """``finish`` was called before every chunk arrived; the upload is kept.

    ``missing`` is how many chunks are still missing.
    """

    code = ErrorCode.UPLOAD_INCOMPLETE

    def __init__(self, message: str, missing: int = 0, *,
                 code: ErrorCode | int | None = None) -> None:
        super().__init__(message, code=code)
        self.missing = missing


def _index() -> dict[int, type[FastrouteError]]:
    # The class for a code is the first one in __all__ that declares it
    # itself: stable, whatever other modules subclass later.
    table: dict[int, type[FastrouteError]] = {}
    for name in __all__:
        cls = globals()[name]
        if isinstance(cls, type) and issubclass(cls, FastrouteError) and "code" in vars(cls):
            table.setdefault(int(cls.code), cls)
    return table


_TABLE: dict[int, type[FastrouteError]] | None = None


class BadKey(ProtocolError):
    """Key material of the wrong shape or size (an oversized key, a missing
    signature); nothing of the request was stored."""

    code = ErrorCode.BAD_KEY


class DuplicateId(ProtocolError):
    """A request repeats a prekey id or a device id (within itself, or a
    prekey id already in the pool); nothing of the request was stored."""

    code = ErrorCode.DUPLICATE_ID


class DeviceMismatch(FastrouteError, LookupError):
    """A per-device send named other devices than the recipient's current ones.

    Nothing was stored.  ``missing``, ``extra`` and ``stale`` are device ids of
    the recipient; ``own_missing``, ``own_extra``, ``own_stale`` those of the
    sender's own other devices.  Refresh (list devices, fetch bundles for the
    missing and stale ones, drop sessions with the extra ones) and resend
    with the same id.
    """

    code = ErrorCode.DEVICE_MISMATCH

    def __init__(self, message: str = "device list changed", lists: tuple = ((),) * 6, *,
                 code: ErrorCode | int | None = None) -> None:
        super().__init__(message, code=code)
        (self.missing, self.extra, self.stale,
         self.own_missing, self.own_extra, self.own_stale) = (list(x) for x in lists)


class NoKeys(FastrouteError, LookupError):
    """The sending device has published no keys, so it has no device id to
    send per-device copies from (publish keys first)."""

    code = ErrorCode.NO_KEYS


class KeyLimit(PolicyError):
    """A prekey pool or an address's device list is at its cap."""

    code = ErrorCode.KEY_LIMIT


class NotMember(FastrouteError, LookupError):
    """The requester is not a member of the group (feature "groups")."""

    code = ErrorCode.NOT_MEMBER


class NotInvited(FastrouteError, LookupError):
    """An answer to a group invite that is not (or no longer) pending."""

    code = ErrorCode.NOT_INVITED


class NotAdmin(PolicyError):
    """Only the group's admins may do that (add, remove, promote, demote)."""

    code = ErrorCode.NOT_ADMIN


class GroupFull(PolicyError):
    """The group is at its member cap (members and pending invites)."""

    code = ErrorCode.GROUP_FULL


class GroupLimit(PolicyError):
    """A user is at its cap of groups, or of pending invites."""

    code = ErrorCode.GROUP_LIMIT


class LastAdmin(PolicyError):
    """Demoting the group's last admin is refused (leaving is not)."""

    code = ErrorCode.LAST_ADMIN


class BlockLimit(PolicyError):
    """An address is at its cap of blocked addresses and providers (feature "safety")."""

    code = ErrorCode.BLOCK_LIMIT


class GroupMismatch(FastrouteError, LookupError):
    """A group SEND named an out-of-date member-device-set version; nothing stored.

    ``version`` is the current one.  On a link that negotiated
    ``"group_lists"`` the relay also says what changed since the version the
    sender named: ``missing`` and ``stale`` are ``(address, device id, reg
    id)`` of the member devices to send the sender key to (stale: re-created,
    start a new session), ``extra`` ``(address, device id)`` of those gone
    (rotate the sender key if one was removed); ``complete`` is False when
    the relay could not tell (``missing`` is then every current member
    device).  Without the lists (``complete`` None) fetch the members.  Then
    resend with the same id and the new version.
    """

    code = ErrorCode.DEVICE_MISMATCH

    def __init__(self, message: str = "member device set changed", version: int = 0,
                 lists: tuple | None = None, *,
                 code: ErrorCode | int | None = None) -> None:
        super().__init__(message, code=code)
        self.version = version
        self.missing: list = []
        self.extra: list = []
        self.stale: list = []
        self.complete: bool | None = None
        if lists is not None:
            missing, extra, stale, complete = lists
            self.missing = [tuple(x) for x in missing]
            self.extra = [tuple(x) for x in extra]
            self.stale = [tuple(x) for x in stale]
            self.complete = bool(complete)


def error_for_code(code: int, reason: str = "") -> FastrouteError:
    """Build the exception that best matches a wire error ``code``.

    A code without a class of its own, or unknown to this version (from a
    newer relay), gives the class of its range (1xx :class:`ProtocolError`,
    2xx :class:`AuthError`, 4xx :class:`PolicyError`, else
    :class:`FastrouteError`) still carrying the numeric code.
    """
    global _TABLE
    if _TABLE is None:
        _TABLE = _index()
    code = int(code)
    cls = _TABLE.get(code)
    if cls is None or cls in (MailboxFull, TraceFormatError, ConnectionClosed):
        cls = {1: ProtocolError, 2: AuthError, 4: PolicyError}.get(code // 100, FastrouteError)
    try:
        ecode = ErrorCode(code)
    except ValueError:
        exc = cls(reason or f"error {code}")
        exc.code = code  # type: ignore[assignment]
        return exc
    return cls(reason or ecode.name, code=ecode)
