"""The integrity gate: checks applied identically to every device's operations.

The relay runs each SEND through the same gate whatever provider made the
client: body size (in the wire decoder), recipient known, rate and byte quotas
(:class:`TokenBucket`), and duplicate client message ids (:class:`DedupWindow`).
Nothing here touches sockets or crypto, so it is tested on its own.
"""

from __future__ import annotations

import time
from typing import Callable, Hashable

__all__ = ["TokenBucket", "DedupWindow", "PENDING"]


class TokenBucket:
    """A token bucket: ``rate`` tokens per second, holding at most ``burst``.

    ``take(n)`` either takes ``n`` tokens and returns True, or takes nothing
    and returns False, so a refused message costs the sender no quota.  A
    batch of messages may instead call :meth:`refill` once, spend from the
    returned count locally, and store what is left in ``tokens``.
    """

    __slots__ = ("rate", "burst", "tokens", "stamp", "_clock")

    def __init__(self, rate: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self.stamp = clock()

    def refill(self) -> float:
        """Add the tokens earned since the last call; return how many there are."""
        now = self._clock()
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        self.tokens = tokens
        return tokens

    def take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if available; return whether it did."""
        if self.refill() >= n:
            self.tokens -= n
            return True
        return False


#: marker stored while a message is accepted but not yet durable
PENDING = -1


class DedupWindow:
    """Recently seen client message ids with the result the relay gave them.

    Bounded twice: entries older than ``window_s`` are forgotten, and so is
    the oldest entry when ``max_entries`` is reached.  A resent id within the
    window is answered with the recorded result instead of being routed
    again, which together with the client's own dedup gives exactly-once
    delivery to the application.  Keys are ``(sender address, id)``; they
    are kept in memory only and never logged.
    """

    __slots__ = ("window_s", "max_entries", "entries", "_clock")

    def __init__(self, window_s: float = 600.0, max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        #: key -> ``[code, stamp, waiters]`` in insertion order (oldest
        #: first).  The relay's hot loop reads and writes it directly, with
        #: the same rules as :meth:`get`, :meth:`begin` and :meth:`finish`,
        #: then calls :meth:`trim` once per batch.
        self.entries: dict[Hashable, list] = {}
        self._clock = clock

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Hashable) -> list | None:
        """Return ``[code, stamp, waiters]`` for a key seen in the window, else None."""
        entry = self.entries.get(key)
        if entry is not None and entry[0] != PENDING and \
                self._clock() - entry[1] > self.window_s:
            del self.entries[key]
            return None
        return entry

    def begin(self, key: Hashable) -> list:
        """Record ``key`` as accepted but not yet decided (code :data:`PENDING`)."""
        entry = [PENDING, self._clock(), None]
        self.entries[key] = entry
        if len(self.entries) > self.max_entries:
            self.trim()
        return entry

    def finish(self, key: Hashable, code: int) -> list | None:
        """Set the final result code; return the waiters that resent meanwhile."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = [code, self._clock(), None]
            return None
        waiters = entry[2]
        entry[0] = code
        entry[1] = self._clock()
        entry[2] = None
        return waiters

    def forget(self, key: Hashable) -> None:
        """Drop a key (a refused message may be resent and tried again)."""
        self.entries.pop(key, None)

    def trim(self) -> None:
        """Forget the oldest entries beyond ``max_entries``.

        Pending entries are never evicted while a commit is outstanding: that
        would let a resend be routed twice.
        """
        d = self.entries
        budget = len(d)  # each entry is looked at once at most
        while len(d) > self.max_entries and budget > 0:
            budget -= 1
            key = next(iter(d))
            if d[key][0] == PENDING:
                d[key] = d.pop(key)  # keep it, at the young end
            else:
                del d[key]

    def expire(self) -> int:
        """Forget decided entries older than the window; return how many."""
        cutoff = self._clock() - self.window_s
        d = self.entries
        n = 0
        for key in list(d):
            entry = d[key]
            if entry[1] > cutoff:
                break
            if entry[0] != PENDING:
                del d[key]
                n += 1
        return n
