"""fastroute: relay core for interoperable messaging.

The routing engine is :class:`Router` (compiled from ``ext/fastroute/_core.pyx``;
``FASTROUTE_NO_EXTENSIONS=1`` selects the pure-Python model with the same
semantics).  The network side is :class:`Relay` (server) and :class:`Client`.
"""

from __future__ import annotations

from ._compiled import COMPILED, twin
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

from ._model import Router as _ModelRouter

#: the routing engine: compiled, or its specification (the pure-Python model)
Router = twin(_ModelRouter, "Router")

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
_LAZY = {"Relay": "relay", "RelayConfig": "config", "Client": "client"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastroute' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
