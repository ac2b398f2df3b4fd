"""The one place that chooses between the compiled core and its Python specifications.

fastroute keeps every hot path twice, yarl-style: a Python specification in
the module of the domain that uses it (``fastroute/relay/gate.py`` for the
gate loop, ``fastroute/wire.py`` for the frame packers, ...) and a compiled
twin in one extension module, ``fastroute._core``, whose ``.pxi`` parts are
named by stage (``ext/fastroute/_gate.pxi`` ...).  Each ``.pxi`` header names
its specification; ``tests/test_sourcecode.py`` checks that it exists.

This module reads ``FASTROUTE_NO_EXTENSIONS`` once, imports the core once,
and hands out implementations through :func:`twin`.  Nothing else in the
package looks at the environment or at ``fastroute._core`` directly.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, TypeVar

__all__ = ["COMPILED", "NO_EXTENSIONS", "compiled_twin", "core", "twin"]

T = TypeVar("T")

#: True when the user asked for the pure-Python model (no C compiler needed).
NO_EXTENSIONS: bool = os.environ.get("FASTROUTE_NO_EXTENSIONS", "") not in ("", "0")

core: ModuleType | None
if NO_EXTENSIONS:
    core = None
else:
    try:
        from . import _core as core
    except ImportError as _err:  # pragma: no cover - depends on the install
        _here = os.path.dirname(os.path.abspath(__file__))
        if os.path.exists(os.path.join(os.path.dirname(_here), "setup.py")):
            # Running from a source checkout that was never built in place:
            # the usual cause is a script run from the clone root, which
            # imports this tree instead of the installed package.
            raise ImportError(
                f"fastroute is being imported from the source tree ({_here}), where the "
                "compiled core is not built.  Run from outside the clone so the installed "
                "package is imported, or build in place with "
                "`python setup.py build_ext --inplace`") from _err
        raise ImportError(
            "fastroute's compiled core (fastroute._core) is missing from this install: "
            "reinstall with a C compiler and the Python headers (pip install --force-reinstall "
            "fastroute)") from _err

#: True when the compiled twins are the ones in use.
COMPILED: bool = core is not None

# spec -> compiled twin (None without the core), for tests and the source check
_TWINS: dict[Any, Any] = {}


def _compiled_name(spec: Any) -> str:
    name: str = spec.__name__
    for prefix in ("py_", "Py"):
        if name.startswith(prefix):
            return name[len(prefix):]
    raise ValueError(f"{name}: a specification's name starts with py_ (function) or Py (class)")


def twin(spec: T, name: str | None = None) -> T:
    """The implementation of ``spec`` to use: its compiled twin, or ``spec`` itself.

    The twin is ``fastroute._core.<name>``, by default the spec's name less
    its ``py_`` (function) or ``Py`` (class) prefix.  A missing twin in a
    built core is a packaging bug and raises AttributeError at import time.
    """
    cname = name or _compiled_name(spec)
    compiled = getattr(core, cname) if core is not None else None
    _TWINS[spec] = compiled
    return compiled if compiled is not None else spec


def compiled_twin(spec: Any) -> Any:
    """The compiled twin registered for ``spec`` by :func:`twin` (None without the core)."""
    return _TWINS[spec]
