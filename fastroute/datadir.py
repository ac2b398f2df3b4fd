"""The relay's data directory: what makes one, and the lock a running relay holds.

A data directory is *initialised* once it holds ``server.key`` (the relay's
static key, written by ``fastroute init`` or the first ``fastroute serve``).
The admin verbs of the CLI act only on an initialised directory: a typo in a
path must not create an empty registry next to the real one and report
success.

A running relay holds an exclusive ``flock`` on ``DATA_DIR/relay.lock`` for its
whole life and writes into it, as JSON, its process id and where it listens
(the relay and its read-only admin listener).  A second relay on the same
directory is refused; the CLI reads the file to find the running relay and
confirm that a change reached it.  The kernel releases the lock when the
process dies, however it dies, so a stale file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

from .errors import InvalidArgument, StartFailed

__all__ = ["LOCK_NAME", "KEY_NAME", "DataDirLock", "is_initialised", "require_initialised",
           "running_relay", "prepare"]

LOCK_NAME = "relay.lock"
KEY_NAME = "server.key"


def is_initialised(path: str) -> bool:
    """True if ``path`` is a directory holding a relay's ``server.key``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, KEY_NAME))


def require_initialised(path: str, how: str) -> None:
    """Raise :class:`InvalidArgument` unless ``path`` is an initialised data directory.

    ``how`` says where the path came from (``--data-dir``, the environment, ...).
    """
    if not os.path.exists(path):
        raise InvalidArgument(
            f"no relay data directory at {path!r} ({how}); give the relay's with --data-dir "
            f"or FASTROUTE_DATA_DIR, or create one with `fastroute init --data-dir {path}`")
    if not os.path.isdir(path):
        raise InvalidArgument(f"{path!r} ({how}) is not a directory")
    if not is_initialised(path):
        raise InvalidArgument(
            f"{path!r} ({how}) is not a relay data directory (it has no {KEY_NAME}); "
            f"give the relay's with --data-dir or FASTROUTE_DATA_DIR, or create one with "
            f"`fastroute init --data-dir {path}`")


def prepare(path: str) -> None:
    """Create the data directory (and parents) for a relay; :class:`StartFailed` if impossible."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise StartFailed(f"the data directory {path!r} is a file, not a directory") from None
    except NotADirectoryError:
        raise StartFailed(f"cannot create the data directory {path!r}: "
                          f"a part of the path is a file") from None
    except OSError as exc:
        raise StartFailed(f"cannot create the data directory {path!r}: "
                          f"{exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise StartFailed(f"the data directory {path!r} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartFailed(f"the data directory {path!r} is not writable by this user")


class DataDirLock:
    """The exclusive lock a running relay holds on its data directory."""

    def __init__(self, path: str) -> None:
        self.path = os.path.join(path, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`StartFailed` naming the relay that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StartFailed(f"cannot create {self.path!r}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = _read(self.path)
            who = f" (pid {info['pid']})" if info and "pid" in info else ""
            raise StartFailed(
                f"another relay{who} is running on the data directory "
                f"{os.path.dirname(self.path)!r}; two relays cannot share one store") from None
        self._fd = fd

    def publish(self, info: dict[str, Any]) -> None:
        """Write where this relay listens into the lock file (for the CLI)."""
        assert self._fd is not None
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Release the lock (closing the descriptor releases it)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:  # pragma: no cover - best effort
                pass
            os.close(self._fd)
            self._fd = None


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        info = json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def running_relay(data_dir: str) -> dict[str, Any] | None:
    """What the relay running on ``data_dir`` published, or None if none runs."""
    path = os.path.join(data_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(path) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
