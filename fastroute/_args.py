"""Argument checks: the one place they live.

Every public entry point of fastroute checks its arguments with these
functions, so an argument means the same thing wherever it is passed: the
same types are accepted, the same values refused, with the same exception
classes (:class:`~fastroute.errors.WrongType` for a wrong type,
:class:`~fastroute.errors.InvalidArgument` for a right type with a wrong
value) and messages of the same shape.  Module-specific rules (an address's
syntax, a store's integer width) are built on top of them in their modules.

The compiled Router's checks (``ext/fastroute/_args.pxi``) are the twins of
these for the engine's arguments and must raise the same classes; the
property tests compare the two.

Each check returns the value to use from then on: an instance of a subclass
of ``int`` or ``str`` comes back as a plain ``int`` or ``str`` (a subclass
could override ``__eq__``/``__hash__`` and run code inside dict lookups), and
a ``bytearray`` or ``memoryview`` as ``bytes`` (the caller may reuse its
buffer after the call).
"""

from __future__ import annotations

from .errors import InvalidArgument, WrongType

__all__ = ["check_bytes", "check_int", "check_str"]


def check_int(value: object, what: str, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as a plain int, checked against the optional bounds.

    :class:`WrongType` unless ``value`` is an ``int`` (or a subclass of it)
    and not a ``bool``: ``True`` as a count, key or timestamp is always a bug.
    :class:`InvalidArgument` if it is below ``minimum`` or above ``maximum``
    (both inclusive; ``None``: no bound).  ``what`` names the argument in the
    message.
    """
    if type(value) is int:
        n = value
    elif isinstance(value, int) and not isinstance(value, bool):
        n = int.__int__(value)  # the value itself, whatever the subclass's __int__ says
    else:
        raise WrongType(f"{what} must be int, not {type(value).__name__}")
    if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        if maximum is None:
            raise InvalidArgument(f"{what} must be >= {minimum}")
        if minimum is None:
            raise InvalidArgument(f"{what} must be <= {maximum}")
        raise InvalidArgument(f"{what} must be in {minimum}..{maximum}")
    return n


def check_str(value: object, what: str, *, nonempty: bool = False) -> str:
    """``value`` as a plain str.

    :class:`WrongType` unless ``value`` is a ``str`` (a subclass is copied to
    a plain ``str``); :class:`InvalidArgument` if it is empty and
    ``nonempty`` is set.
    """
    if type(value) is str:
        text = value
    elif isinstance(value, str):
        text = str.__str__(value)
    else:
        raise WrongType(f"{what} must be str, not {type(value).__name__}")
    if nonempty and not text:
        raise InvalidArgument(f"{what} must not be empty")
    return text


def check_bytes(value: object, what: str, length: int | None = None) -> bytes:
    """``value`` as bytes, of exactly ``length`` bytes if that is given.

    Accepts ``bytes`` (returned as is), ``bytearray`` and ``memoryview``
    (copied).  :class:`WrongType` for anything else, :class:`InvalidArgument`
    for the wrong length.
    """
    if type(value) is bytes:
        data = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        raise WrongType(f"{what} must be bytes, not {type(value).__name__}")
    if length is not None and len(data) != length:
        raise InvalidArgument(f"{what} must be {length} bytes, not {len(data)}")
    return data
