"""fastroute: relay core for interoperable messaging.

The routing engine is :class:`Router` (compiled from ``ext/fastroute/_core.pyx``;
``FASTROUTE_NO_EXTENSIONS=1`` selects the pure-Python model with the same
semantics).  The network side is :class:`Relay` (server) and :class:`Client`.
"""

from __future__ import annotations

import os as _os

from .errors import (
    AuthError,
    ErrorCode,
    FastrouteError,
    InvalidArgument,
    MailboxFull,
    ProtocolError,
    UnknownAddress,
    UnknownDevice,
    UnknownGroup,
    WrongType,
)

if _os.environ.get("FASTROUTE_NO_EXTENSIONS", "") not in ("", "0"):
    from ._model import Router
    COMPILED = False
else:
    try:
        from ._core import Router
    except ImportError as _err:  # pragma: no cover - depends on the install
        raise ImportError(
            "fastroute's compiled core (fastroute._core) is not built: reinstall "
            "with a C compiler (pip install .), or set FASTROUTE_NO_EXTENSIONS=1 "
            "to use the pure-Python model") from _err
    COMPILED = True

__version__ = "0.1.0"

__all__ = [
    "COMPILED",
    "AuthError",
    "Client",
    "ErrorCode",
    "FastrouteError",
    "InvalidArgument",
    "MailboxFull",
    "ProtocolError",
    "Relay",
    "RelayConfig",
    "Router",
    "UnknownAddress",
    "UnknownDevice",
    "UnknownGroup",
    "WrongType",
    "__version__",
]

# The network layer pulls in uvloop, cryptography and msgpack; an embedder
# that only wants the engine should not pay for them at import time.
_LAZY = {"Relay": "server", "RelayConfig": "config", "Client": "client"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastroute' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
