"""The dedup window: recently seen client message ids and the answer each one got.

Used by the relay's gate (a resent id is answered, not routed twice) and by
the client (a redelivered message is acked, not handed to the application
twice).  :class:`DedupWindow` is the specification; :data:`DedupTable` is
the implementation in use: the compiled twin from ``ext/fastroute/_dedup.pxi``
when the core is built, the specification otherwise.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable

from ._compiled import twin
from .errors import InvalidArgument, WrongType

__all__ = ["PENDING", "DedupTable", "DedupWindow"]


#: marker stored while a message is accepted but not yet durable
PENDING = -1
# entries DedupWindow looks at per insert to make room (DEDUP_EVICT_STEP in _dedup.pxi)
_EVICT_STEP = 8


class DedupWindow:
    """Recently seen client message ids with the result each one got.

    Bounded twice: decided entries older than ``window_s`` count as absent
    (and :meth:`expire` forgets them), and at most ``max_entries`` entries
    are kept, plus pending ones: the oldest decided one goes first, while a
    :data:`PENDING` one is never dropped (it moves to the young end instead:
    forgetting it would let a resend be routed twice).  A resent id within the window is
    answered with the recorded result instead of being routed again, which
    together with the client's own dedup gives exactly-once delivery to the
    application.  Keys are ``(sender address, 16-byte id)``; they are kept in
    memory only and never logged.

    This is the specification; the relay and the client use
    :data:`DedupTable`, the compiled twin with the same methods and answers
    (``tests/test_dedup.py`` compares them), unless :data:`fastroute.COMPILED`
    is False.  Lookups and inserts are O(1):
    eviction pops the oldest key of an :class:`~collections.OrderedDict`.
    """

    __slots__ = ("window_s", "max_entries", "entries", "_clock")

    def __init__(self, window_s: float = 600.0, max_entries: int = 1_000_000,
                 clock: Callable[[], float] = time.monotonic, presize: bool = False) -> None:
        # presize: the compiled twin allocates its whole window at once (no
        # growth stalls); a dict has nothing to allocate ahead
        if max_entries < 1:
            raise InvalidArgument("max_entries must be positive")
        if not window_s >= 0.0:
            raise InvalidArgument("window_s must be >= 0")
        self.window_s = float(window_s)
        self.max_entries = max_entries
        #: ``(sender, id) -> [code, stamp, waiters]``, oldest first
        self.entries: OrderedDict[tuple[str, bytes], list] = OrderedDict()
        self._clock = clock

    def __len__(self) -> int:
        return len(self.entries)

    @staticmethod
    def _check(sender: str, cid: bytes) -> None:
        if type(sender) is not str:
            raise WrongType("sender must be a str")
        if type(cid) is not bytes or len(cid) != 16:
            raise InvalidArgument("message id must be 16 bytes")

    def lookup(self, sender: str, cid: bytes, now: float) -> int | None:
        """The code recorded for ``(sender, cid)``, or None if absent or expired.

        A pending entry never expires: it answers :data:`PENDING`.
        """
        self._check(sender, cid)
        entry = self.entries.get((sender, cid))
        if entry is None or (entry[0] != PENDING and now - entry[1] > self.window_s):
            return None
        return entry[0]

    def _make_room(self) -> None:
        d = self.entries
        # a bounded step per insert: pending entries at the old end are
        # rotated, not dropped, and walking all of them on every insert would
        # make a window full of pending ids quadratic
        budget = min(_EVICT_STEP, len(d))
        while len(d) >= self.max_entries and budget > 0:
            budget -= 1
            self._retire_oldest()

    def _retire_oldest(self) -> bool:
        """Drop the oldest entry if it is decided and return True; a pending
        one moves to the young end instead (False)."""
        d = self.entries
        key, entry = next(iter(d.items()))
        if entry[0] == PENDING:
            d.move_to_end(key)
            return False
        del d[key]
        return True

    def begin(self, sender: str, cid: bytes, code: int, now: float) -> None:
        """Record ``(sender, cid)`` with ``code`` (PENDING or a final code) at ``now``.

        An existing entry is updated in place (it keeps its age rank).
        """
        self._check(sender, cid)
        key = (sender, cid)
        entry = self.entries.get(key)
        if entry is not None:
            entry[0] = code
            entry[1] = float(now)
            return
        self._make_room()
        self.entries[key] = [code, float(now), None]

    def wait(self, sender: str, cid: bytes, waiter: object) -> None:
        """Queue ``waiter`` on a pending entry; :meth:`finish` or :meth:`forget` returns it."""
        self._check(sender, cid)
        entry = self.entries.get((sender, cid))
        if entry is None or entry[0] != PENDING:
            raise InvalidArgument("only a pending id has waiters")
        if entry[2] is None:
            entry[2] = []
        entry[2].append(waiter)

    def finish(self, sender: str, cid: bytes, code: int, now: float) -> list | None:
        """Set the final code (recording the id if absent); return the waiters or None."""
        self._check(sender, cid)
        entry = self.entries.get((sender, cid))
        if entry is None:
            self._make_room()
            self.entries[(sender, cid)] = [code, float(now), None]
            return None
        waiters = entry[2]
        entry[0] = code
        entry[1] = float(now)
        entry[2] = None
        return waiters

    def forget(self, sender: str, cid: bytes) -> list | None:
        """Drop ``(sender, cid)`` (a refused id may be tried again); return its waiters."""
        self._check(sender, cid)
        entry = self.entries.pop((sender, cid), None)
        return None if entry is None else entry[2]

    def get(self, sender: str, cid: bytes) -> tuple[int, float] | None:
        """``(code, stamp)`` of the entry, expired or not, or None (for inspection)."""
        self._check(sender, cid)
        entry = self.entries.get((sender, cid))
        return None if entry is None else (entry[0], entry[1])

    def keys(self) -> list[tuple[str, bytes]]:
        """The ``(sender, id)`` keys, oldest first (for inspection and tests)."""
        return list(self.entries)

    def warm_with(self, ask: Callable[["DedupWindow"], object] | None) -> None:
        """Where the compiled twin would have ``ask`` run :meth:`warm` ahead of its writes.

        A dict takes its memory as entries arrive and has no mapped room to
        fault in ahead: this one never asks.
        """
        if ask is not None and not callable(ask):
            raise WrongType("ask must be callable or None")

    def warm(self) -> int:
        """Bytes made resident ahead of the next writes: none here (nothing is mapped)."""
        return 0

    def resident(self) -> int:
        """Bytes of the table's mapped arrays in memory: none here (nothing is mapped)."""
        return 0

    def expire(self, now: float | None = None) -> int:
        """Forget decided entries older than the window, oldest first; return how many.

        Stops at the first entry still inside the window (entries are
        roughly in age order); a pending one moves to the young end.
        """
        cutoff = (self._clock() if now is None else now) - self.window_s
        d = self.entries
        budget = len(d)
        n = 0
        while budget > 0:
            if next(iter(d.values()))[1] > cutoff:
                break
            budget -= 1
            n += self._retire_oldest()
        return n


#: the dedup window in use: ``fastroute._core.DedupTable``, or :class:`DedupWindow`
DedupTable = twin(DedupWindow, "DedupTable")


class Warmer:
    """Faults dedup tables' memory in ahead of their writes, on threads of its own.

    ``table.warm_with(warmer.ask)``: when a table's next writes near pages
    not yet resident, it calls :meth:`ask` (on the loop's thread) and a
    short-lived thread runs ``table.warm()``, which releases the GIL while
    the kernel zeroes the pages.  The relay's loop then does not stop for a
    page fault of its windows as they fill (one per 2 MB page: ~0.1-0.3 ms
    each, ~15 % of the loop's time while its first million ids arrive), and
    memory is still taken only as a window fills, a few MB ahead of it.
    (The index is written at random from the first id on: the loop faults
    most of its pages itself in the first milliseconds, before the warm
    asked for at that id reaches them.)  A table asks
    again only after the warm it asked for has run, so a relay's three
    windows have at most three such threads, for milliseconds, once per
    ~4 MB of new entries; none is left waiting.  After :meth:`close` asks
    are dropped (the tables stop asking).
    """

    def __init__(self) -> None:
        self._closed = False

    def ask(self, table: DedupWindow) -> None:
        """Have ``table.warm()`` run on a thread of its own; returns at once."""
        if self._closed:
            return
        threading.Thread(target=table.warm, name="fastroute-warm", daemon=True).start()

    def close(self) -> None:
        """Start no more warms (one running ends on its own, within milliseconds)."""
        self._closed = True
