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
    "TraceFormatError",
    "ConnectionClosed",
    "StoreFailed",
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
    # 4xx: may it be sent
    RATE_LIMITED = 400
    BODY_TOO_LARGE = 401
    CONSENT_REQUIRED = 402
    POLICY = 403
    # 5xx: the relay's side
    INTERNAL = 500
    SHUTTING_DOWN = 503
    STORE_FAILED = 504


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


class UnknownAddress(FastrouteError, KeyError):
    """The address has no registered device (routing) or is not known."""

    code = ErrorCode.UNKNOWN_RECIPIENT

    def __str__(self) -> str:  # KeyError would repr() the argument
        return Exception.__str__(self)


class UnknownDevice(FastrouteError, KeyError):
    """No device with that id (or name) is registered."""

    code = ErrorCode.UNKNOWN_DEVICE

    def __str__(self) -> str:
        return Exception.__str__(self)


class UnknownGroup(FastrouteError, KeyError):
    """No group with that id exists."""

    code = ErrorCode.UNKNOWN_GROUP

    def __str__(self) -> str:
        return Exception.__str__(self)


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


def _index() -> dict[int, type[FastrouteError]]:
    table: dict[int, type[FastrouteError]] = {}
    stack: list[type[FastrouteError]] = [FastrouteError]
    while stack:
        cls = stack.pop()
        table.setdefault(int(cls.code), cls)
        stack.extend(cls.__subclasses__())
    return table


def error_for_code(code: int, reason: str = "") -> FastrouteError:
    """Build the exception that best matches a wire error ``code``.

    Unknown codes (from a newer relay) give a plain :class:`FastrouteError`
    that still carries the numeric code.
    """
    cls = _index().get(int(code))
    try:
        ecode = ErrorCode(code)
    except ValueError:
        exc = FastrouteError(reason or f"error {code}")
        exc.code = code  # type: ignore[assignment]
        return exc
    if cls is None or cls in (MailboxFull, TraceFormatError, ConnectionClosed):
        # codes without a class of their own fall back on their range's class
        cls = {1: ProtocolError, 2: AuthError, 4: PolicyError}.get(
            int(code) // 100, FastrouteError)
    return cls(reason or ecode.name, code=ecode)
