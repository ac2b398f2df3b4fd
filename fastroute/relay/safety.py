"""The safety stage (feature "safety"): blocks and spam reports.

* **Blocks.**  A user (an address, from any of its devices) blocks an
  address or a whole provider (``"@provider"``).  A blocked party's SEND,
  DSEND, device-list and bundle fetches of the blocker, and group invites
  and adds of the blocker, get the answer an address that does not exist
  gets, byte for byte (docs/PROTOCOL.md 19.1).  The block table lives in
  memory as ``blocker -> {target, ...}``: the gate's compiled SEND loop reads
  that very dict (:class:`~fastroute.relay.gate.SendGate` ``blocks``), so a
  relay where nobody blocks anyone pays one dict-size test per message and a
  recipient without blocks one dict lookup.  Each change is committed to
  ``safety.db`` (``synchronous=FULL``) before it applies and is answered.
* **Spam reports.**  When the relay stores a persistent message (SEND or
  DSEND) from S for R, it keeps ``HMAC-SHA256(key_g, S NUL R)`` (16 bytes)
  with the time, never the message: ``g`` is the current generation of
  ``report_window_s`` seconds, each with its own random key.  A REPORT of S
  by R counts only if that digest is there and younger than the window, R
  did not report S before in this generation, and fewer than
  ``reports_per_provider`` of R's provider's users did.  A counted report
  adds ``report_points`` scaled by R's age (since the relay first saw R's
  address, full weight at ``report_mature_s``) to S's abuse score
  (:meth:`Gate.score`): throttle, then quarantine, as for the gate's own
  signals.  Generations older than the previous one are deleted with their
  key, so a digest is never kept much longer than two windows.

The digests are written to ``safety.db`` in batches (every second, only
pairs new to the generation), so a report after a restart still counts;
on a SIGKILL the last second's pairs may be lost (a report then does not
count, which is the safe side).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Callable

import msgpack

from .. import wire
from ..errors import ErrorCode

from .replies import Replies

if TYPE_CHECKING:
    from .delivery import Delivery, LinkPort
    from .gate import Gate

__all__ = ["Safety", "SafetyBook"]

log = logging.getLogger("fastroute.relay")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    address TEXT NOT NULL,
    target TEXT NOT NULL,
    since INTEGER NOT NULL,
    PRIMARY KEY (address, target)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS report_keys (
    gen INTEGER PRIMARY KEY,
    key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS delivered (
    gen INTEGER NOT NULL,
    digest BLOB NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (gen, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reports (
    gen INTEGER NOT NULL,
    pair BLOB NOT NULL,
    provider BLOB NOT NULL,
    PRIMARY KEY (gen, pair)
) WITHOUT ROWID;
"""

#: result of a BLOCK that changed nothing (already blocked, or not blocked)
UNCHANGED = 2


class SafetyBook:
    """``safety.db``: blocks, the report keys, delivered-pair digests, counted reports.

    Every method runs on the stage's one writer thread (or before the relay
    serves), so writes apply in the order they were asked for.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # a deleted block, key or digest leaves no readable copy in free pages
        conn.execute("PRAGMA secure_delete = ON")
        conn.executescript(_SCHEMA)
        self.conn = conn

    def blocks(self) -> dict[str, set[str]]:
        """Every address's blocks: address -> {target, ...}."""
        out: dict[str, set[str]] = {}
        for address, target in self.conn.execute("SELECT address, target FROM blocks"):
            out.setdefault(address, set()).add(target)
        return out

    def set_block(self, address: str, target: str, block: bool) -> None:
        """Record (or remove) one block, durably."""
        if block:
            self.conn.execute("INSERT OR IGNORE INTO blocks(address, target, since) "
                              "VALUES (?, ?, ?)", (address, target, int(time.time())))
        else:
            self.conn.execute("DELETE FROM blocks WHERE address = ? AND target = ?",
                              (address, target))

    def keys(self) -> dict[int, bytes]:
        """The report keys kept: generation -> key."""
        return dict(self.conn.execute("SELECT gen, key FROM report_keys"))

    def add_key(self, gen: int, key: bytes) -> None:
        """Keep the key of generation ``gen``."""
        self.conn.execute("INSERT OR REPLACE INTO report_keys(gen, key) VALUES (?, ?)",
                          (gen, key))

    def delivered(self) -> dict[int, dict[bytes, int]]:
        """The delivered-pair digests kept: generation -> {digest: last time}."""
        out: dict[int, dict[bytes, int]] = {}
        for gen, digest, at in self.conn.execute("SELECT gen, digest, at FROM delivered"):
            out.setdefault(gen, {})[digest] = at
        return out

    def add_delivered(self, rows: list[tuple[int, bytes, int]]) -> None:
        """Keep ``(generation, pair digest, time)`` rows, in one transaction."""
        self.conn.execute("BEGIN")
        self.conn.executemany("INSERT OR REPLACE INTO delivered(gen, digest, at) "
                              "VALUES (?, ?, ?)", rows)
        self.conn.execute("COMMIT")

    def reports(self) -> list[tuple[int, bytes, bytes]]:
        """The counted reports kept: ``(generation, pair digest, provider digest)``."""
        return list(self.conn.execute("SELECT gen, pair, provider FROM reports"))

    def add_report(self, gen: int, pair: bytes, provider: bytes) -> None:
        """Keep one counted report (its pair and provider digests)."""
        self.conn.execute("INSERT OR IGNORE INTO reports(gen, pair, provider) VALUES (?, ?, ?)",
                          (gen, pair, provider))

    def forget_before(self, gen: int) -> None:
        """Delete the keys, digests and reports of generations before ``gen``."""
        self.conn.execute("BEGIN")
        for table in ("report_keys", "delivered", "reports"):
            self.conn.execute(f"DELETE FROM {table} WHERE gen < ?", (gen,))
        self.conn.execute("COMMIT")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Close the file."""
        self.conn.close()


class _Generation:
    """One report window's key and what was recorded under it."""

    __slots__ = ("gen", "key", "delivered", "reported", "per_provider", "_inner", "_outer")

    def __init__(self, gen: int, key: bytes) -> None:
        self.gen = gen
        self.key = key
        # HMAC-SHA256 (RFC 2104) with the key's pads absorbed once: a digest
        # is then two hash copies, not a MAC set up from the key (hmac.digest
        # fetched and keyed OpenSSL's MAC on every call: 3.2 us against 1.4,
        # once per stored message when senders send one at a time)
        block = hashlib.sha256(key).digest() if len(key) > 64 else key
        block = block.ljust(64, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        #: pair digest -> last delivery time (wall seconds)
        self.delivered: dict[bytes, int] = {}
        #: (reporter, sender) digests of the counted reports
        self.reported: set[bytes] = set()
        #: (reporting provider, sender) digest -> counted reports
        self.per_provider: dict[bytes, int] = {}

    def digest(self, *parts: str) -> bytes:
        """HMAC-SHA256 of the parts joined by NUL under this window's key, cut to 16 bytes."""
        inner = self._inner.copy()
        inner.update("\x00".join(parts).encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:16]


class Safety:
    """The safety stage of one relay: BLOCK, BLOCKS and REPORT, and the records they read.

    ``blocks`` is the gate's table (shared, never replaced).  The link hands
    it the ops of the feature (which needs ``"e2ee"``: they are answered
    with REPLY, as the keys stage's are); :meth:`hides` is the check the keys
    and groups stages ask before they answer about an address, and
    :meth:`delivered` is told of the stored persistent messages.
    """

    def __init__(self, config: Any, book: SafetyBook, gate: "Gate", delivery: "Delivery",
                 count_error: Callable[[int], None]) -> None:
        self.config = config
        self.book = book
        self.gate = gate
        self.count_error = count_error
        #: this stage's REPLY ops (counted refusals)
        self.replies = Replies(delivery, count_error)
        self.blocks: dict[str, set[str]] = gate.blocks
        self.blocks.update(book.blocks())
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "fastroute-safety")
        #: wall clock (tests move it to step past a window)
        self.clock: Callable[[], float] = time.time
        lim = config.limits
        self.window = float(lim.report_window_s)
        self._gens: dict[int, _Generation] = {}
        keys_kept = book.keys()
        for gen, key in keys_kept.items():
            self._gens[gen] = _Generation(gen, key)
        for gen, rows in book.delivered().items():
            g = self._gens.get(gen)
            if g is not None:
                g.delivered.update(rows)
        for gen, pair, provider in book.reports():
            g = self._gens.get(gen)
            if g is not None:
                g.reported.add(pair)
                g.per_provider[provider] = g.per_provider.get(provider, 0) + 1
        #: digests new to their generation, written by the next flush
        self._pending: list[tuple[int, bytes, int]] = []
        #: the generation :meth:`delivered` last recorded under
        self._now_gen: _Generation | None = None
        #: the last (generation, sender, recipient) noted, and its digest
        self._last_pair: tuple[int, str, str] | None = None
        self._last_digest = b""
        self._timer: asyncio.TimerHandle | None = None
        self.reports_counted = 0
        self.reports_refused = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Flush recorded pairs every second; forget old generations."""
        self._tick()

    def _tick(self) -> None:
        self.flush()
        self._timer = asyncio.get_running_loop().call_later(1.0, self._tick)

    def stop(self) -> None:
        """Stop the timer and queue what is pending (on the event loop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        rows, self._pending = self._pending, []
        if rows:
            self._writer.submit(self.book.add_delivered, rows)

    def close(self) -> None:
        """Finish the queued writes, then close the file (blocking: off the loop)."""
        self._writer.shutdown(wait=True)
        self.book.close()

    def _write(self, fn: Callable, *args: Any) -> asyncio.Future:
        return asyncio.wrap_future(self._writer.submit(fn, *args))

    def flush(self) -> None:
        """Write the pairs recorded since the last flush; drop expired generations."""
        if self.window <= 0:
            return
        rows, self._pending = self._pending, []
        if rows:
            self._write(self.book.add_delivered, rows).add_done_callback(_log_failure)
        keep = self._gen_of(self.clock()) - 1
        old = [g for g in self._gens if g < keep]
        if old:
            for g in old:
                del self._gens[g]
            self._write(self.book.forget_before, keep).add_done_callback(_log_failure)

    # ------------------------------------------------------------ blocks
    def hides(self, recipient: str, sender: str) -> bool:
        """Whether ``recipient`` blocked ``sender`` (the address or its provider)."""
        targets = self.blocks.get(recipient)
        return (targets is not None and recipient != sender
                and (sender in targets or "@" + sender.rpartition("@")[2] in targets))

    def request(self, link: "LinkPort", op: tuple) -> None:
        """Handle one op of feature "safety" of a link that negotiated it."""
        kind = op[0]
        if kind == wire.Op.BLOCK:
            self.block(link, op[1], op[2], op[3])
        elif kind == wire.Op.BLOCKS:
            self.listing(link, op[1])
        elif kind == wire.Op.REPORT:
            self.report(link, op[1], op[2])

    def block(self, link: "LinkPort", cid: bytes, target: str, block: bool) -> None:
        """BLOCK: block or unblock an address or a provider; answered once durable."""
        address = link.address
        if target == address:
            self.replies.reply(link, cid, ErrorCode.BAD_FIELD)
            return
        mine = self.blocks.get(address)
        if (mine is not None and target in mine) == block:
            self.replies.reply(link, cid, 0, UNCHANGED)
            return
        if block and mine is not None and len(mine) >= self.config.limits.max_blocks:
            self.replies.reply(link, cid, ErrorCode.BLOCK_LIMIT)
            return

        def done(f: asyncio.Future) -> None:
            if f.exception() is not None:
                log.error("could not record a block: %s", type(f.exception()).__name__,
                          extra={"event": "safety.store_failed"})
                self.replies.reply(link, cid, ErrorCode.STORE_FAILED)
                return
            targets = self.blocks.get(address)
            if block:
                if targets is None:
                    targets = self.blocks[address] = set()
                targets.add(target)
            elif targets is not None:
                targets.discard(target)
                if not targets:
                    # no entry at all: the SEND loop's lookup misses at once
                    del self.blocks[address]
            self.replies.reply(link, cid, 0, 0)

        self._write(self.book.set_block, address, target, block).add_done_callback(done)

    def listing(self, link: "LinkPort", cid: bytes) -> None:
        """BLOCKS: this user's blocks, sorted (split over REPLY parts when large)."""
        targets = sorted(self.blocks.get(link.address, ()))
        self.replies.reply_parts(link, cid, [msgpack.packb(t) for t in targets])

    # ------------------------------------------------------------ reports
    def _gen_of(self, now: float) -> int:
        return int(now // self.window)

    def _generation(self, gen: int) -> _Generation:
        g = self._gens.get(gen)
        if g is None:
            g = self._gens[gen] = _Generation(gen, os.urandom(32))
            self._write(self.book.add_key, gen, g.key).add_done_callback(_log_failure)
        return g

    def delivered(self, sender: str, recipients: Any) -> None:
        """Note that persistent messages from ``sender`` to ``recipients`` were stored."""
        if self.window <= 0:
            return
        now = int(self.clock())
        g = self._now_gen
        if g is None or g.gen != now // self.window:
            # a window lasts hours: its generation is looked up when it turns
            # (or the clock moves back), not for every stored batch
            g = self._now_gen = self._generation(self._gen_of(now))
        seen = g.delivered
        pending = self._pending
        for to in recipients:
            if to == sender:
                continue
            # a busy conversation stores batch after batch for one pair: its
            # digest is kept from the last batch (one pair, not a table of them)
            pair = (g.gen, sender, to)
            if pair == self._last_pair:
                d = self._last_digest
            else:
                d = g.digest(sender, to)
                self._last_pair, self._last_digest = pair, d
            if d not in seen:
                pending.append((g.gen, d, now))
            seen[d] = now

    def report(self, link: "LinkPort", cid: bytes, sender: str) -> None:
        """REPORT: count ``sender`` as a spammer if it really wrote to this user lately.

        The REPLY's result says whether the report counted (true) or not
        (false: no delivery from ``sender`` within the window, reported
        already in this window, or the reporter's provider's cap is reached).
        """
        reporter = link.address
        counted = self.window > 0 and reporter != sender and self._count(reporter,
                                                                         link.provider, sender)
        if counted:
            self.reports_counted += 1
        else:
            self.reports_refused += 1
        self.replies.reply(link, cid, 0, counted)

    def _count(self, reporter: str, provider: str, sender: str) -> bool:
        now = self.clock()
        cur = self._gen_of(now)
        at = None
        for gen in (cur, cur - 1):
            g = self._gens.get(gen)
            if g is not None:
                at = g.delivered.get(g.digest(sender, reporter))
                if at is not None:
                    break
        if at is None or at < now - self.window:
            return False
        g = self._generation(cur)
        pair = g.digest(reporter, sender)
        if pair in g.reported:
            return False
        pkey = g.digest("@" + provider, sender)
        lim = self.config.limits
        if g.per_provider.get(pkey, 0) >= lim.reports_per_provider:
            return False
        g.reported.add(pair)
        g.per_provider[pkey] = g.per_provider.get(pkey, 0) + 1
        self._write(self.book.add_report, cur, pair, pkey).add_done_callback(_log_failure)
        # weighted by the reporter's age: accounts minted a minute ago weigh ~nothing
        first = self.gate.first_seen(reporter)
        age = max(0.0, time.time() - first) if first is not None else 0.0
        weight = 1.0 if lim.report_mature_s <= 0 else min(1.0, age / lim.report_mature_s)
        if weight > 0 and lim.report_points > 0:
            self.gate.score(self.gate.sender_of(sender), lim.report_points * weight,
                            "spam reports")
        return True


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("safety record write failed: %s", type(fut.exception()).__name__,
                  extra={"event": "safety.store_failed"})
