"""The durable message store: a message is on disk before its sender is acked.

Two implementations share one asyncio-facing API:

* :class:`SqliteStore`, the embedded default: SQLite in WAL mode, written by a
  single dedicated thread that does *group commit* (every request queued while
  the previous transaction was committing goes into the next transaction, so
  the fsync/commit cost is paid once per batch, not once per message).
* :class:`MemoryStore`: the same API and behaviour **without any durability**
  (everything is lost when the process ends).  For benchmarks, tests, and
  embedders who accept that trade-off.

What is kept is only what routing needs: the sender address, the client
message id (16 bytes), the opaque body, the server timestamp, the expiry, and
which devices still have to receive the message.  A message is deleted when
its last recipient device acks it (:meth:`SqliteStore.ack`), never on send,
or when it expires (:meth:`SqliteStore.expire`, TTL 30 days by default).

Every method is meant to be called from the thread of the event loop the
store was opened on; none of them blocks that loop on disk I/O.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import concurrent.futures
import functools
import logging
import math
import os
import queue
import sqlite3
import sys
import threading
import time
import urllib.parse
from typing import (TYPE_CHECKING, Callable, Iterable, Iterator, Protocol, Sequence,
                    runtime_checkable)

import msgpack

from ._args import check_bytes, check_int, check_str
from .errors import (
    FastrouteError,
    InvalidArgument,
    StoreFailed,
    StoreFull,
    UnknownDevice,
    WrongType,
)
from ._compiled import twin
from .histogram import Histogram
from .wire import DDELIVER_HEAD, copy_tail_fields, is_routed, route_parts, tail_fields

__all__ = ["Store", "SqliteStore", "MemoryStore", "StoredMessage", "PutItem",
           "DEFAULT_TTL_S", "CID_LEN", "tail_items"]

log = logging.getLogger(__name__)

#: One row handed back by ``load``: ``(mid, sender, cid, body, ts_ms)``.
StoredMessage = tuple[int, str, bytes, bytes, int]
#: One message for ``put_many``: ``(sender, cid, body, ts_ms, device_keys)``.
PutItem = tuple[str, bytes, bytes, int, Sequence[int]]


@runtime_checkable
class Store(Protocol):
    """What the relay needs of a message store: exactly the calls it makes.

    :class:`SqliteStore` and :class:`MemoryStore` provide it (mypy checks that
    below, ``tests/test_store.py`` at run time); so may any object an
    embedder passes to the relay as its ``store``.  Every call comes from the
    thread of the event loop the store was opened on.  The relay calls
    ``put_many`` and ``ack`` with ``validate=False``: it built the items
    itself, from device keys ``register_device`` gave it.  An optional
    ``in_memory`` attribute, true, says that the store holds every message
    in RAM (:class:`MemoryStore`): the relay then lets a slow device's
    mailbox grow past ``mailbox_capacity`` instead of feeding it again from
    the store (``RelayConfig.mailbox_queue_capacity``).  A store that takes
    a batch at once may also offer ``next_mid()`` and ``put_now(items,
    first_mid)`` (:class:`MemoryStore` does): the relay's SEND path then uses
    them instead of ``put_many``, and answers each message in the same pass
    that checks it.  A store may offer ``put_tails(items, validate=False)``
    (both do): the relay then hands it each persistent SEND as the DELIVER
    tail it routes, not as a ``put_many`` item made beside it; and
    ``put_copies(items, validate=False)`` (:class:`SqliteStore` does): the
    keys stage then hands it each per-device copy as its DDELIVER tail.
    """

    def register_device(self, address: str, device: str) -> int:
        """The device key of ``(address, device)``, created if new; stable
        across restarts and never reused."""

    def known_devices(self) -> list[tuple[int, str, str]]:
        """Every registered device as ``(device_key, address, device)``, by key."""

    def put_many(self, items: Sequence[PutItem], *,
                 validate: bool = True) -> asyncio.Future[list[int]]:
        """Queue messages; the future gives their mids, in order, once every
        one of them is stored (that is when their senders may be acked)."""

    def ack(self, device_key: int, mids: Sequence[int], *, validate: bool = True) -> None:
        """Record, fire-and-forget, that ``device_key`` received ``mids``;
        a delete that fails (disk full) is retried until it succeeds."""

    async def flush(self) -> None:
        """Wait until everything queued so far was written or, for a
        fire-and-forget write that failed, kept for a retry.  Never raises
        another caller's failure."""

    async def load(self, device_key: int, after_mid: int,
                   limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages for ``device_key`` with mid > ``after_mid``,
        in mid order."""

    async def expire(self, now_ms: int) -> int:
        """Delete the messages whose expiry is ``<= now_ms``; return how many."""

    async def close(self) -> None:
        """Store everything queued, then release the store; idempotent."""

#: How long an undelivered message is kept, in seconds (30 days).
DEFAULT_TTL_S = 30 * 86400
#: Length of a client message id, in bytes.
CID_LEN = 16
# SQLite integers are signed 64-bit; a bigger Python int would fail inside the
# writer and take a whole batch of innocent messages down with it.
_INT_MAX = (1 << 63) - 1
_INT_MIN = -(1 << 63)
_SCHEMA_VERSION = 7
# the page size a new store file is made with (files made by earlier
# versions have 16 KB or 4 KB pages, and keep them)
_PAGE_SIZE = 8192
# A new store file empties its freelist at every commit (auto_vacuum FULL:
# the file's last pages are moved into the free ones and the file is cut).
# SQLite takes a free page by its place in the freelist, not the ones the
# same transaction freed; with secure_delete a freed page is written zeroed,
# so a commit whose acks free a pack's pages and whose puts need as many
# wrote both the zeroed ones and other free pages for the new pack.  With
# an empty freelist at its start, a transaction's puts take the pages its
# own deletes freed, written once: about a quarter fewer bytes written to
# the store's files and less of the writer's CPU (benches/README.md, session
# 38).  An existing file keeps its setting (only a VACUUM changes it).
_AUTO_VACUUM = "FULL"
# mids are reserved on disk this many at a time: meta's page is written once
# a block, not in every transaction (a reopened store starts past the block,
# so a mid is never reused; ids are 64-bit, the gap costs nothing)
_MID_BLOCK = 1 << 16

# Version 2 added messages.dev: a message for exactly one device (most of
# them) names it there and has no inbox row, so storing it and deleting it on
# ack touch one table instead of two and need no orphan check.  Messages for
# several devices keep dev NULL and one inbox row per device, as in version 1
# (whose stores are migrated by adding the column: their rows stay valid).
#
# Version 3 added packs: the messages for exactly one device that one write
# transaction stores go to that device in one row, so a batch costs SQLite
# one row (and its index entries) per device instead of one per message; a
# row per message cost the writer ~5 us of CPU per message stored and acked,
# twice what the relay spends on everything else.  Rows of a version 2 store
# stay where they are and are read and deleted as before.
#
# Version 4 added shared and shares: a message for several devices (a
# group's) was one row of shared, and the shared messages that one write
# transaction stores for a device are one row of shares (their mids): a
# group message to N devices cost N inbox rows (each two b-tree entries,
# written, then deleted with an orphan check), ~15 us of the writer's CPU
# for 10 devices.  How many devices still hold each shared message is kept
# in memory (SqliteStore._counts, rebuilt from shares on open): the last
# ack deletes the message.  A version 3 store's messages and inbox rows
# stay where they are and are read and deleted as before.
#
# Version 5 replaced shared with spacks: the messages one transaction stores
# for one set of devices (a group's) are one row, as a pack is for one
# device, and each of those devices' shares names it by its first mid.  A
# row per message (and its expiry index entry), written and then deleted,
# was a third of the writer's CPU at 10 devices.  A version 4 store's shared
# rows are moved into spacks when it is opened (_upgrade).
#
# Version 6 made packs a rowid table keyed by a unique index on (dev, first).
# A pack is tens to hundreds of KB, in overflow pages, and a WITHOUT ROWID
# table keeps its whole row in the b-tree's key: SQLite reads a key that
# spills to overflow pages whole to compare it, so every seek into packs
# (an ack, a load) read several packs end to end.  A slow recipient's
# backlog (packs of thousands of messages) cost the relay ~3x the CPU a
# message of one that keeps up.  A version 3 to 5 store's packs are moved
# into the new table when it is opened (_upgrade).
#
# Version 7 dropped the indexes on exp_ms of shares and spacks, and gave
# each spack the keys of the devices it was written for (devs).  A group
# send wrote its spack and every member's share into those indexes and
# deleted them again on the acks: two of the seven b-tree pages a commit of
# a group of 10 wrote (benches/README.md, session 53).  Expiry finds the
# spacks it rewrites by the writer's counts, which keep a bound on each
# spack's earliest expiry (_Counts.exps, from exp_ms on open), and the
# shares through those spacks: a share lists messages of its own spack
# only, so a share holding an expired message belongs to a spack whose
# exp_ms has passed, and to one of its devs.  A version 5 or 6 store's
# spacks are moved into the new table, devs filled from shares, when it is
# opened.
_PACKS_SCHEMA = """
-- one device's messages of one write transaction: mids its int64 array
-- (native byte order), data the msgpack array of [mid, sender, cid, body,
-- ts_ms, exp_ms]; n, nbytes and exp_ms (the earliest) describe what is left
-- in it.  A device's packs never overlap in mids (each holds one
-- transaction's, and transactions take ascending mids), so ordering them by
-- first orders their messages.
CREATE TABLE IF NOT EXISTS packs(
    dev INTEGER NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    n INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    exp_ms INTEGER NOT NULL,
    mids BLOB NOT NULL,
    data BLOB NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS packs_key ON packs(dev, first);
CREATE INDEX IF NOT EXISTS packs_exp ON packs(exp_ms);
"""
_SHARES_SCHEMA = """
-- one device's messages of one spack: first the spack's key, last the
-- device's last mid, mids its int64 array (NULL: every message the spack
-- holds, as when it is written), and n, nbytes and exp_ms (the earliest)
-- describe what is left in it.  A mid may outlive its message here
-- (expired, erased): reads skip it.  No index on exp_ms: expiry finds a
-- share through its spack's (spacks.devs).
CREATE TABLE IF NOT EXISTS shares(
    dev INTEGER NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    n INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    exp_ms INTEGER NOT NULL,
    mids BLOB,
    PRIMARY KEY(dev, first)) WITHOUT ROWID;
"""
# the messages of one write transaction for one set of devices (a group's
# members): first its first mid (its key, kept when it is rewritten), mids
# the int64 array of its messages, lens their bodies' lengths (int32s), exps
# their expiries (int64s), devs the keys of the devices it was written for
# (int64s, the set's order: a device's share of it exists only while that
# device holds some of it), data the msgpack array of its entries as a
# pack's; last, n, nbytes and exp_ms (the earliest) describe what is left.
# A message no device holds any more may stay in it for a while (see
# SqliteStore._sgone).
_SPACKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS spacks(
    first INTEGER PRIMARY KEY,
    last INTEGER NOT NULL,
    n INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    exp_ms INTEGER NOT NULL,
    mids BLOB NOT NULL,
    lens BLOB NOT NULL,
    exps BLOB NOT NULL,
    devs BLOB NOT NULL,
    data BLOB NOT NULL);
"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS messages(
    mid INTEGER PRIMARY KEY,
    sender TEXT NOT NULL,
    cid BLOB NOT NULL,
    body BLOB NOT NULL,
    ts_ms INTEGER NOT NULL,
    exp_ms INTEGER NOT NULL,
    dev INTEGER);
CREATE INDEX IF NOT EXISTS messages_exp ON messages(exp_ms);
CREATE INDEX IF NOT EXISTS messages_dev ON messages(dev, mid) WHERE dev IS NOT NULL;
CREATE TABLE IF NOT EXISTS inbox(
    device_key INTEGER NOT NULL,
    mid INTEGER NOT NULL,
    PRIMARY KEY(device_key, mid)) WITHOUT ROWID;
-- finds the other recipients of a message: needed to drop the message row
-- when its last inbox row goes, and to expire inbox rows without a scan
CREATE INDEX IF NOT EXISTS inbox_mid ON inbox(mid);
CREATE TABLE IF NOT EXISTS devices(
    device_key INTEGER PRIMARY KEY,
    address TEXT NOT NULL,
    device TEXT NOT NULL,
    UNIQUE(address, device));
{_PACKS_SCHEMA}{_SPACKS_SCHEMA}{_SHARES_SCHEMA}
-- high-water marks, so ids are never reused even after the newest rows are
-- deleted and the store reopened
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;
"""

# Statements that take many rows (or mids) at once, completed by _rows_sql:
# the writer runs one statement per up to _ROWS_PER_STATEMENT rows instead of
# one per row.  Each statement is one sqlite3_step, and the sqlite3 module
# releases the GIL around every step; per row, the writer thread had to win
# the GIL back from the busy event loop thread once per row and statement.
_SQL_ACK_DIRECT = "DELETE FROM messages WHERE dev = ? AND mid IN "
_SQL_ACK = "DELETE FROM inbox WHERE device_key = ? AND mid IN "
_SQL_ORPHAN = ("DELETE FROM messages WHERE dev IS NULL AND NOT EXISTS "
               "(SELECT 1 FROM inbox WHERE inbox.mid = messages.mid) AND mid IN ")
_SQL_PUT_PACK = ("INSERT INTO packs(dev, first, last, n, nbytes, exp_ms, mids, data) "
                 "VALUES ")
# a share's mids: NULL in the row while the device holds all its spack holds
# (as every device does when the spack is written: its rows stay small)
_SHARE_MIDS = ("coalesce({0}.mids, (SELECT sp.mids FROM spacks sp WHERE sp.first = {0}.first), "
               "x'')")
# the packs and shares holding any of each device's mids in [lo, hi], for
# many devices in one statement: the columns before a pack's data only, so
# SQLite does not read the data's overflow pages.  Every statement (and
# every row it returns) is a sqlite3_step, around which the writer thread
# gives up the GIL and must win it back from the busy event loop: a
# statement per device and table was most of the writer's cost in a relay.
_SQL_ACK_ROWS = ("WITH a(dev, hi, lo) AS (VALUES {}) "
                 "SELECT a.dev, 0, p.first, p.mids FROM a JOIN packs p ON p.dev = a.dev "
                 "AND p.first <= a.hi AND p.last >= a.lo UNION ALL "
                 "SELECT a.dev, 1, s.first, " + _SHARE_MIDS.format("s") + " "
                 "FROM a JOIN shares s ON s.dev = a.dev "
                 "AND s.first <= a.hi AND s.last >= a.lo")
# rows by their keys, many a statement (the primary key serves each pair)
_SQL_ROWS_DROP = ("DELETE FROM {} WHERE (dev, first) IN "
                  "(SELECT column1, column2 FROM (VALUES {}))")
_SQL_PACK_DATA = "SELECT data FROM packs WHERE dev = ? AND first = ?"
_SQL_PACK_DROP = "DELETE FROM packs WHERE dev = ? AND first = ?"
_SQL_PACK_KEEP = ("UPDATE packs SET last = ?, n = ?, nbytes = ?, exp_ms = ?, mids = ?, "
                  "data = ? WHERE dev = ? AND first = ?")
# a pack's data only when the load may take all of it (past the cursor, no
# more than it can take): a slow device's packs of thousands are read by the
# next statement only when the reader kept none of their rows
_SQL_LOAD_PACKS = ("SELECT rowid, first, last, n, CASE WHEN first > ?2 AND n <= ?3 THEN data END "
                   "FROM packs WHERE dev = ?1 AND last > ?2 ORDER BY first LIMIT ?3")
_SQL_PACK_READ = "SELECT mids, data FROM packs WHERE rowid = ?"
_SQL_PUT_SPACK = ("INSERT INTO spacks(first, last, n, nbytes, exp_ms, mids, lens, exps, "
                  "devs, data) VALUES ")
_SQL_PUT_SHARES = "INSERT INTO shares(dev, first, last, n, nbytes, exp_ms, mids) VALUES "
_SQL_SPACK_DROP = "DELETE FROM spacks WHERE first IN "
_SQL_SPACK_DATA = "SELECT data FROM spacks WHERE first = ?"
# a spack's columns before its data: what is in it, without its bodies
_SQL_SPACK_META = "SELECT mids, lens, exps FROM spacks WHERE first = ?"
_SQL_SPACK_KEEP = ("UPDATE spacks SET last = ?, n = ?, nbytes = ?, exp_ms = ?, mids = ?, "
                   "lens = ?, exps = ?, data = ? WHERE first = ?")
_SQL_SHARES_OF = "SELECT first, " + _SHARE_MIDS.format("shares") + " FROM shares WHERE dev = ?"
_SQL_LOAD_SHARES = _SQL_SHARES_OF + " AND last > ? ORDER BY first"
# SQLite before 3.32 allows 999 variables a statement: the rows per statement
# are at most 128 and fewer for wide rows (7 columns x 128 rows = 896)
_ROWS_PER_STATEMENT = 128
# up to this many rows go in one statement of their exact size; a statement
# for 10 devices' rows was two (8 and 2), each a step of its own
_EXACT_ROWS = 32
# a transaction with at most this many new shares takes the compiled common
# path; a larger group's takes the general one, whose statements take up to
# 128 rows each (a group of 700 devices: the compiled path's pack probe for
# each acking device and its statement for 32 shares cost 4.2 ms a
# transaction against 3.9).  Its members' acks of whole shares are still
# applied by a compiled walk (_drop_shares) on the general path.
_FAST_SHARES = 64
# the writer's statement cache: the texts of every size _chunks gives, for
# each kind of statement (the sqlite3 module's default keeps 128)
_CACHED_STATEMENTS = 1024
_MAX_VARIABLES = 999
_SQL_META = "INSERT OR REPLACE INTO meta(k, v) VALUES (?, ?)"
# each side reads at most LIMIT rows through its index, then the two merge
_SQL_LOAD = ("SELECT * FROM (SELECT mid, sender, cid, body, ts_ms FROM messages "
             "WHERE dev = ?1 AND mid > ?2 ORDER BY mid LIMIT ?3) "
             "UNION ALL SELECT * FROM (SELECT m.mid, m.sender, m.cid, m.body, m.ts_ms "
             "FROM inbox i JOIN messages m ON m.mid = i.mid "
             "WHERE i.device_key = ?1 AND i.mid > ?2 ORDER BY i.mid LIMIT ?3) "
             "ORDER BY 1 LIMIT ?3")

# length() of a blob reads its size from the record header, not the blob
_SQL_BACKLOG = ("SELECT dev, count(*), sum(length(body)) FROM messages "
                "WHERE dev IS NOT NULL GROUP BY dev UNION ALL "
                "SELECT dev, sum(n), sum(nbytes) FROM packs GROUP BY dev UNION ALL "
                "SELECT dev, sum(n), sum(nbytes) FROM shares GROUP BY dev UNION ALL "
                "SELECT i.device_key, count(*), sum(length(m.body)) FROM inbox i "
                "JOIN messages m ON m.mid = i.mid GROUP BY i.device_key")

# no new rows (a transaction of deletes only)
_NO_PUTS: tuple = ([], [], [], [])

# Writer request kinds.  A request is a tuple (kind, arg, future-or-None).
_PUT, _PUT_MANY, _ACK, _REG, _FORGET, _EXPIRE, _FLUSH, _STOP, _PUT_TAILS = range(9)
# the kinds that store messages (the loop times them, the writer counts them)
_PUT_KINDS = frozenset((_PUT, _PUT_MANY, _PUT_TAILS))

_SYNC_MODES = ("NORMAL", "FULL", "EXTRA")
# the flush of close(): it reports what the final batch could not write
_STOP_REPORT = "stop"
# seconds between retries of deletes that failed (disk full), when idle
_RETRY_S = 0.5
# How long a batch that nobody waits on (acks, forgets, registrations) may wait
# for one that somebody does.  Under load a transaction of acks alone fell
# between two of puts: a commit of its own (at FULL, a sync) for deletes that
# the next puts' commit could carry; a few milliseconds cost an ack nothing.
_LINGER_S = 0.004
# How long the loop holds acks for the next put while puts come less than
# that apart (otherwise _LINGER_S).  At a chat's pace puts come tens of ms
# apart, and 4 ms left every message two commits, its put's and its ack's,
# each with its sync and both threads' wake-ups; this makes it one.  At 50
# puts a second the writer's CPU a put fell to x0.58, and a put's latency
# rose x1.13 at the median: its commit carries the ack's delete (~80 us of
# the writer's CPU).  A backlog's read flushes held acks first; a crash
# loses at most this much of them (their messages come again, and clients
# drop repeats).  Held that long where no put came (5 puts a second),
# the ack's commit ran ~0.1 s after the put's and cost ~70 us more of the
# writer's CPU than 4 ms after it (a thread and caches gone cold): x1.2 a
# put.  benches/README.md, sessions 62 and 63.
_RIDE_S = 0.05
# The WAL's frames at which the writer checkpoints it, between batches,
# where the compiled core holds SQLite's automatic checkpoint (its default
# mark, where SQLite ran it in a commit): a WAL of about 8 MB of 8 KB pages
_CHECKPOINT_FRAMES = 1000
# How long a put somebody waits on may wait for more puts while puts come
# faster than the writer commits them: their commit is then shared.  Under
# load the writer otherwise committed about two puts a transaction.
_GROUP_S = 0.001
# How long the first put after a pause may wait for the rest of a burst
# while puts come in bursts (never longer than the budget above).  A
# sender's burst comes as several frames, each read apart: at 100 k msg/s in
# 5 ms bursts (2 frames each) a commit as each came made 1.65 commits a
# burst, each with its fixed cost (~100 us of the writer's CPU in the
# compiled transaction alone, and wake-ups of both threads); waiting this
# long makes it one.
_BURST_S = 0.0002
_MAX_GROUP_S = 0.1  # RelayConfig.group_commit_s has the same bound


@functools.lru_cache(maxsize=_CACHED_STATEMENTS)
def _rows_sql(head: str, ncols: int, nrows: int) -> str:
    """``head`` completed with ``nrows`` groups of ``ncols`` placeholders:
    ``VALUES (?,?),(?,?)`` for a ``... VALUES `` head, ``(?,?,?)`` for ``IN ``;
    a head holding ``{}`` (a ``VALUES`` list inside the statement) gets the
    groups there."""
    if head.endswith("IN "):
        return head + "(" + ",".join("?" * nrows) + ")"
    row = "(" + ",".join("?" * ncols) + ")"
    if "{}" in head:
        return head.format(",".join([row] * nrows))
    return head + ",".join([row] * nrows)


def _chunks(n: int, most: int = _ROWS_PER_STATEMENT):
    """Row counts that add up to ``n``: full statements of ``most`` rows, then
    what is left in one statement if at most _EXACT_ROWS, else powers of two
    (so a bounded set of SQL texts serves every batch size from the
    statement cache, and a group's devices, usually a few, take one)."""
    while n:
        if n >= most:
            k = most
        elif n <= _EXACT_ROWS:
            k = n
        else:
            k = 1 << (n.bit_length() - 1)
        yield k
        n -= k


def _execute_rows(conn: sqlite3.Connection, head: str, ncols: int, first: list,
                  flat: list) -> None:
    """Run ``head`` completed by :func:`_rows_sql` over ``flat`` (``ncols``
    values a row), ``first`` bound before each statement's rows."""
    at = 0
    most = min(_ROWS_PER_STATEMENT, (_MAX_VARIABLES - len(first)) // ncols)
    for k in _chunks(len(flat) // ncols, most):
        conn.execute(_rows_sql(head, ncols, k), first + flat[at:at + k * ncols])
        at += k * ncols


def _execute_in(conn: sqlite3.Connection, head: str, first: list, values: list) -> None:
    """Run ``head (?, ...)`` (an ``IN`` list) over ``values``, ``first`` bound before."""
    _execute_rows(conn, head, 1, first, values)


def _select_in(conn: sqlite3.Connection, head: str, values: list) -> list:
    """Every row of ``head (?, ...)`` (a query ending in an ``IN`` list) over
    ``values``, many per statement."""
    rows: list = []
    at = 0
    for k in _chunks(len(values)):
        rows += conn.execute(_rows_sql(head, 1, k), values[at:at + k]).fetchall()
        at += k
    return rows


def _store_error(reason: str) -> FastrouteError:
    # a full disk or budget has its own code: the sender should wait, not
    # suspect the relay (see _reason)
    return StoreFull(reason) if "(SQLITE_FULL)" in reason else StoreFailed(reason)


def _closed_error() -> FastrouteError:
    return _store_error("store is closed")


def _reason(exc: BaseException) -> str:
    """Why an SQLite call failed, in words that never contain row values."""
    name = getattr(exc, "sqlite_errorname", None)
    if name == "SQLITE_FULL":
        return "disk full (SQLITE_FULL)"
    if name:
        # SQLite's messages name tables and columns, never bound values
        return f"{name}: {exc}"
    return type(exc).__name__


def _check_text(value: object, what: str) -> str:
    text = check_str(value, what, nonempty=True)
    # a lone surrogate cannot be encoded as UTF-8 and would fail the writer's
    # whole batch; refuse it here, where only its own caller is affected
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument(f"{what} is not valid Unicode") from None
    return text


def _check_sql_int(value: object, what: str, minimum: int = 0) -> int:
    # the bounds of a SQLite integer: a bigger Python int would fail inside
    # the writer and take a whole batch down with it (see _INT_MAX)
    return check_int(value, what, minimum, _INT_MAX)


def _check_seq(value: object, what: str) -> Sequence:
    if not isinstance(value, (list, tuple)):
        raise WrongType(f"{what} must be a list, not {type(value).__name__}")
    return value


def tail_items(items: Sequence) -> Iterator[tuple]:
    """``put_tails``' flat ``device_keys, tail`` pairs as ``put_many`` items
    ``(sender, id, body, ts_ms, device_keys)``, each read from its DELIVER
    tail (:func:`fastroute.wire.tail_fields`) as it is reached: a bad tail
    raises where it stands, after the items before it."""
    return ((*tail_fields(tail), devs) for devs, tail in zip(items[0::2], items[1::2]))


def copy_items(items: Sequence) -> Iterator[tuple]:
    """``put_copies``' flat ``device_keys, tail`` pairs as ``put_many`` items,
    each read from its DDELIVER copy tail (:func:`fastroute.wire.copy_tail_fields`:
    the sender is the copy's ``address/device_id``) as it is reached."""
    return ((*copy_tail_fields(tail), devs) for devs, tail in zip(items[0::2], items[1::2]))


class PyCopyTails(tuple):
    """A put of per-device copies (:meth:`SqliteStore.put_copies`): flat
    ``device_keys, tail`` a copy, each tail a DDELIVER copy's.  A tuple of
    its own type, so that the writer's put loop (:func:`py_sql_rows`) tells
    it from a put of DELIVER tails."""

    __slots__ = ()


#: the type the writer's put loop takes for a put of copies (compiled when the core is built)
CopyTails = twin(PyCopyTails)


class _BaseStore:
    """Validation and the device registry, shared by both implementations.

    The registry lives in memory (and, for SQLite, in the ``devices`` table):
    ``register_device`` answers synchronously from it, and ``put`` rejects
    device keys it does not know, so no write can reference a device that
    does not exist.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, ttl_s: int) -> None:
        self._loop = loop
        self._ttl_ms = ttl_s * 1000
        self._closed = False
        self._by_name: dict[tuple[str, str], int] = {}
        self._by_key: dict[int, tuple[str, str]] = {}
        self._next_key = 1

    # -- context manager ----------------------------------------------------

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    # -- devices ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise _closed_error()

    def register_device(self, address: str, device: str) -> int:
        """Return the device key of ``(address, device)``, creating it if new.

        Idempotent: the same pair always gets the same key, also across
        restarts.  Keys are never reused, even after :meth:`forget_device`.
        """
        self._check_open()
        name = (_check_text(address, "address"), _check_text(device, "device"))
        key = self._by_name.get(name)
        if key is None:
            key = self._next_key
            # persist first: if that raises, the registry is left unchanged
            self._persist_device(key, name)
            self._next_key = key + 1
            self._by_name[name] = key
            self._by_key[key] = name
        return key

    def _persist_device(self, key: int, name: tuple[str, str]) -> None:
        pass

    def known_devices(self) -> list[tuple[int, str, str]]:
        """Every registered device as ``(device_key, address, device)``, by key."""
        return [(k, a, d) for k, (a, d) in sorted(self._by_key.items())]

    def _drop_device(self, device_key: object) -> int | None:
        key = _check_sql_int(device_key, "device_key")
        name = self._by_key.pop(key, None)
        if name is None:
            return None
        del self._by_name[name]
        return key

    # -- validation ---------------------------------------------------------

    def _check_put(self, sender, cid, body, ts_ms, device_keys) -> tuple:
        sender = _check_text(sender, "sender")
        # copies of a bytearray or memoryview: the caller may reuse its buffer
        # before the writer runs
        cid = check_bytes(cid, "cid", CID_LEN)
        body = check_bytes(body, "body")
        # its expiry, ts_ms + ttl, has to be a SQLite integer too
        ts_ms = check_int(ts_ms, "ts_ms", 0, _INT_MAX - self._ttl_ms)
        seq = _check_seq(device_keys, "device_keys")
        if not seq:
            # a message nobody will ack would sit on disk until it expires
            raise InvalidArgument("device_keys must not be empty")
        by_key = self._by_key
        keys: list[int] = []
        for d in seq:
            key = check_int(d, "device key")
            if key not in by_key:
                raise UnknownDevice(f"unknown device key {key}")
            keys.append(key)
        # fan-out twice to one device is a no-op, not an error
        devs = tuple(dict.fromkeys(keys)) if len(keys) > 1 else tuple(keys)
        return (sender, cid, body, ts_ms, devs)

    def _check_many(self, items, validate: bool = True) -> list[tuple]:
        if not validate:
            # the caller built the items itself (the relay's hot path): taken
            # as given (a copy of the list: the caller may reuse its own)
            return list(items)
        items = _check_seq(items, "items")
        rows = []
        for item in items:
            if not isinstance(item, tuple) or len(item) != 5:
                raise WrongType("each item must be a tuple "
                                "(sender, cid, body, ts_ms, device_keys)")
            rows.append(self._check_put(*item))
        return rows

    def _check_tails(self, items, read: Callable[[Sequence], Iterator[tuple]] = tail_items
                     ) -> list[tuple]:
        """``put_tails``' flat ``device_keys, tail`` pairs (``put_copies``'
        with ``read`` :func:`copy_items`), each read and checked as a
        ``put_many`` item is: the checked items."""
        items = _check_seq(items, "items")
        if len(items) % 2:
            raise InvalidArgument("items hold device keys, tail for each message")
        return [self._check_put(*item) for item in read(items)]

    @staticmethod
    def _check_mids(mids) -> list[int]:
        return [_check_sql_int(m, "mid") for m in _check_seq(mids, "mids")]

    @staticmethod
    def _check_load(device_key, after_mid, limit) -> None:
        _check_sql_int(device_key, "device_key")
        _check_sql_int(after_mid, "after_mid")
        _check_sql_int(limit, "limit", 1)


class SqliteStore(_BaseStore):
    """Durable store on one SQLite file in WAL mode, with group commit.

    Open it with ``store = await SqliteStore.open(path)``; close it with
    ``await store.close()`` (or use ``async with``).

    One dedicated writer thread owns the write connection.  Requests from the
    event loop are queued; the writer takes everything queued (up to
    ``max_batch`` messages), applies it in **one** transaction, commits, and
    then resolves the batch's futures with a single
    ``loop.call_soon_threadsafe``.  While puts come faster than it commits
    them (its last batch had several), it first waits up to
    ``group_commit_s`` for more, so that they share a commit.  After a
    pause, while puts come in bursts (the last batch had several, or its put
    came while the writer was busy), it waits up to 0.2 ms (never longer)
    for the rest of a burst, whose frames are read apart; a put that comes
    alone to an idle writer goes at once.  It naps through such a wait: the
    puts that come in it do not wake it, one that fills its batch does.
    A future from :meth:`put`
    therefore resolves only once its message is committed.  Reads (:meth:`load`,
    :meth:`count_pending`) run on a second connection in a reader thread; WAL
    lets them proceed while the writer commits.  The writer's most common
    transactions (acks that empty whole packs, then new packs for single
    devices; and with a group's traffic, its members' acks of whole shares,
    then new spacks and shares) run compiled, in calls that each release
    the GIL once (``fastroute._core.SqlFast``, on the same connection); the
    sqlite3 module would release and retake it around every statement,
    each time a hand-off with the busy event loop.  Everything else, and
    every store without the compiled core, goes through the sqlite3 module,
    to the same rows.

    Durability: with ``synchronous="FULL"`` (the default) the WAL is synced
    on every commit, so a message whose future resolved survives a process
    crash, an OS crash and a power loss (as far as the disk honours fsync):
    what the sender's SACK promises.  ``"NORMAL"`` survives a process crash
    only: after a power loss or OS crash the last transactions before it may
    be rolled back, acked messages included.  Group commit makes the sync a
    cost per batch, not per message (``benches/store_put_ack.py
    --synchronous``).  Acks are handed to the writer with the next request
    of another kind, or 50 ms after the first of them while puts come less
    than 50 ms apart (4 ms otherwise); a batch that nobody waits on (acks,
    forgotten devices) waits up to 4 ms more for one that somebody does (a
    put, a flush).  So the deletes ride on the puts' commit instead of
    paying one of their own, nor waking the writer for it: under load, and
    at a chat's pace too.  With the compiled core the WAL's checkpoints
    (SQLite's, every 1,000 frames) run after a batch's answers are posted,
    not inside the commit somebody waits on.

    Layout: the messages one transaction stores for exactly one device (most
    messages) share one row of ``packs`` with that device; those it stores
    for one set of several devices (a group's members) share one row of
    ``spacks``, and each of those devices has one row of ``shares`` listing
    its mids in it.  An ack that empties a pack (or a share) deletes it; one
    that reaches part of one is applied in memory and the row rewritten
    without the acked messages once, ``min(0.5, erase_s / 4)`` seconds after
    the first such ack or at the next flush (reads after a flush never see
    them; a crash before the rewrite redelivers them, as it would an ack not
    yet committed).  How many devices still hold each shared message is
    counted in memory (about 12 bytes a message, rebuilt from ``shares`` on
    open): when none does, the message leaves its spack on the same terms
    (the whole spack goes at once when that was its last).  A new file is
    made with 8 KB pages (an existing one keeps its size).

    Failures: a batch that fails (disk full, I/O error) is rolled back; its
    new messages and its deletes are then retried apart, so each failure is
    attributed to the operation that failed: a put's future fails with
    :class:`~fastroute.errors.FastrouteError` of code ``STORE_FAILED`` (a
    ``put_many(validate=False)`` whose items are not what it vouched for
    fails alone, with that item's error, before anything is written);
    fire-and-forget writes (:meth:`ack`, :meth:`forget_device`, device
    registrations) that fail are kept and retried (every 0.5 s when idle)
    until they succeed, and are never reported to an unrelated caller
    (``deletes_waiting`` counts them).  The writer keeps serving later
    requests.

    Erasure: a message deleted (acked by its last device, forgotten or
    expired) leaves no readable trace in ``store.db``, ``store.db-wal`` or
    ``store.db-shm`` after ``erase_s`` (20 s by default).  The writer sets
    ``PRAGMA secure_delete = ON`` itself (the build's default may be OFF or
    FAST), so deleted rows are zeroed in their pages and freed pages; and at
    most ``erase_s`` after a delete commits it runs ``wal_checkpoint(TRUNCATE)``,
    which writes the zeroed pages into the database and empties the WAL,
    where the pages' older images (bodies, ids, senders) would otherwise
    stay (with the compiled core, by overwriting its first 16 MB with
    zeroes in place and cutting the rest, see :func:`py_wal_vfs`; without
    it, by cutting the file to nothing).  A reader with an open snapshot
    delays that (retried every second); the relay's only reader is its own
    short backlog loads.  A clean close checkpoints too.  Threat model and
    limits: this protects against someone who later reads the data
    directory (a stolen disk image, a backup or copy made after the bound);
    it does not scrub blocks the filesystem already released (a WAL's old
    blocks past its first 16 MB, or all of them without the compiled core,
    those the database file gives back as it shrinks, SSD remapping), nor a
    copy taken while the message was still stored.

    The store is bound to the event loop it was opened on; call its methods
    from that loop's thread only.
    """

    def __init__(self, loop, path: str, synchronous: str, max_batch: int,
                 ttl_s: int, erase_s: float = 20.0, max_bytes: int | None = None,
                 group_commit_s: float = _GROUP_S) -> None:
        super().__init__(loop, ttl_s)
        self._max_bytes = max_bytes
        self._erase_s = erase_s
        # monotonic time by which the WAL must be checkpointed and truncated
        # (writer thread only); None: nothing deleted since the last one
        self._erase_due: float | None = None
        #: TRUNCATE checkpoints run to erase deleted messages from the WAL
        self.checkpoints = 0
        #: PASSIVE checkpoints the writer ran between batches (SQLite's own,
        #: taken out of the commits where the compiled core is)
        self.wal_checkpoints = 0
        # the writer runs them (SqlFast.hold_checkpoints)
        self._checkpoints_held = False
        self._path = path
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fastroute-store-read")
        self._rconn: sqlite3.Connection | None = None  # reader thread only
        # the rest of a pack a load stopped in, per device (reader thread
        # only): see _load
        self._rpacks = _PackRests()
        # the following are touched by the writer thread only
        self._wconn: sqlite3.Connection | None = None
        # the common transaction's compiled path on _wconn (None: not used)
        self._fast: PySqlFast | None = None
        self._next_mid = 1
        # meta's next_mid: every mid below it is reserved (writer thread only)
        self._mid_mark = 1
        self._carry: list[tuple] = []
        #: acked mids and forgotten devices whose delete failed and waits for a retry
        self.deletes_waiting = 0
        self._dead: str | None = None
        #: Number of committed write transactions since open (metrics, tests).
        self.commits = 0
        #: Number of batches that failed and were rolled back.
        self.failed_batches = 0
        #: seconds from BEGIN to the end of COMMIT (fsync included), per transaction
        self.commit_seconds = Histogram()
        # Acks that reached part of a pack (writer thread only): (device key,
        # pack's first mid) -> the pack's acked mids.  Rewriting a pack at
        # every partial ack would let a device that acks one message at a time
        # make the writer rewrite a whole pack per message; the pack is
        # rewritten without them once, at the first transaction _rewrite_s
        # after the first such ack (or at a flush, so reads after one see it).
        self._partial: dict[tuple[int, int], set[int]] = {}
        # the same for the rows of shares: (device key, first) -> acked mids
        self._spartial: dict[tuple[int, int], set[int]] = {}
        # and for spacks: a spack's first -> its messages no device holds any
        # more (deleted at once when that is all of them)
        self._sgone: dict[int, frozenset[int]] = {}
        # how many devices hold each shared message (writer thread only)
        self._counts = _Counts()
        self._rewrite_due: float | None = None
        # when the oldest of those acks committed: the erasing checkpoint
        # after the rewrite is due erase_s after it, not after the rewrite
        self._partial_since: float | None = None
        # well inside erase_s: the rewrite, then the checkpoint that erases it
        self._rewrite_s = min(0.5, erase_s / 4)
        self._linger_s = _LINGER_S
        self._ride_s = _RIDE_S
        # when the last put was handed to the writer (monotonic), and how
        # long after the one before it: acks wait _ride_s for the next while
        # puts come less than that apart
        self._put_at = -math.inf
        self._put_gap = math.inf
        # acks not yet handed to the writer, and the timer that hands them
        # over when no other request does first (the loop's thread only)
        self._acks_held: list[tuple] = []  # (device_key, mids) pairs, in order
        self._acks_timer: asyncio.TimerHandle | None = None
        self._group_s = group_commit_s
        self._burst_s = min(group_commit_s, _BURST_S)
        # how many puts the writer's last batch with any had, and whether
        # puts came in bursts: it had several, or its first came while the
        # writer was busy (writer thread only)
        self._puts_last = 0
        self._bursts = False
        # While the writer waits for more puts it naps on this lock, not in
        # the queue's get: a put that comes then does not wake it, only one
        # that fills its batch (the loop's _came releases the lock once _room
        # more messages came; a release after the nap ended is used up by the
        # next).  Woken at each put, the writer took the GIL back from a busy
        # loop each time: 1:1 at full speed, ~4 puts a commit.
        self._nap = threading.Lock()
        self._nap.acquire()
        self._room = 0  # messages the napping writer's batch has room for; 0: awake
        #: packs, shares and spacks rewritten without their acked (or no longer held)
        #: messages (metrics, tests)
        self.rewrites = 0

    # -- lifecycle ----------------------------------------------------------

    @classmethod
    async def open(cls, path: str | os.PathLike, *, synchronous: str = "FULL",
                   max_batch: int = 4096, ttl_s: int = DEFAULT_TTL_S,
                   erase_s: float = 20.0, max_bytes: int | None = None,
                   group_commit_s: float = _GROUP_S) -> "SqliteStore":
        """Open (creating if needed) the store at ``path`` and start its writer.

        ``synchronous`` is SQLite's ``PRAGMA synchronous`` for the WAL:
        ``"NORMAL"`` or ``"FULL"`` (``"EXTRA"`` also accepted).  ``max_batch``
        bounds how many messages one transaction takes.  ``ttl_s`` is how long
        an undelivered message is kept.  ``erase_s``: a deleted message's
        body, id and sender leave every file of the store at most this long
        after the delete committed (see "Erasure" in the class docstring).
        ``max_bytes``: the database file's budget (``None``: the disk's);
        a put that would grow it further fails with
        :class:`~fastroute.errors.StoreFull` (code ``STORE_FULL``) while
        deletes still go through, so space comes back as devices ack.  The
        WAL comes on top (it is truncated at least every ``erase_s``).
        ``group_commit_s``: while puts come faster than the writer commits
        them, how long one may wait for more to share its commit (0: none
        waits; after a pause, 0.2 ms at most); a put that comes alone never
        waits.
        """
        loop = asyncio.get_running_loop()
        if not isinstance(path, (str, os.PathLike)):
            raise WrongType(f"path must be a str or path, not {type(path).__name__}")
        path = os.fspath(path)
        if not path or path == ":memory:" or path.startswith("file:"):
            # the reader needs its own connection to the same database
            raise InvalidArgument("path must name a database file")
        if not isinstance(synchronous, str) or synchronous.upper() not in _SYNC_MODES:
            raise InvalidArgument(f"synchronous must be one of {_SYNC_MODES}")
        max_batch = _check_sql_int(max_batch, "max_batch", 1)
        ttl_s = _check_sql_int(ttl_s, "ttl_s", 1)
        if isinstance(erase_s, bool) or not isinstance(erase_s, (int, float)) \
                or not 0 < erase_s <= 3600:
            raise InvalidArgument("erase_s must be a number of seconds in (0, 3600]")
        if max_bytes is not None:
            max_bytes = _check_sql_int(max_bytes, "max_bytes", 1 << 16)
        if isinstance(group_commit_s, bool) or not isinstance(group_commit_s, (int, float)) \
                or not 0 <= group_commit_s <= _MAX_GROUP_S:
            raise InvalidArgument(f"group_commit_s must be a number of seconds in "
                                  f"[0, {_MAX_GROUP_S}]")
        self = cls(loop, path, synchronous.upper(), max_batch, ttl_s, float(erase_s),
                   max_bytes, float(group_commit_s))
        ready = loop.create_future()
        self._thread = threading.Thread(target=self._writer_main, args=(ready,),
                                        name="fastroute-store-write", daemon=True)
        self._thread.start()
        try:
            devices, next_key = await ready
        except BaseException:
            self._closed = True
            # a cancelled open must not leave the writer waiting forever
            self._queue.put((_STOP, False, loop.create_future()))
            self._reader.shutdown(wait=False)
            raise
        for key, address, device in devices:
            self._by_key[key] = (address, device)
            self._by_name[(address, device)] = key
        self._next_key = next_key
        return self

    async def close(self) -> None:
        """Commit everything queued, stop the writer and close the database.

        Idempotent.  Raises ``STORE_FAILED`` if the final writes failed
        (new messages, or deletes still waiting for their retry: those are
        lost with the process, so the messages are redelivered next time).
        """
        if self._closed:
            return
        self._closed = True
        fut = self._loop.create_future()
        self._hand_acks()  # what was acked is deleted before the store closes
        if self._dead is None:
            self._queue.put((_STOP, True, fut))
        else:  # pragma: no cover - the writer is gone, nobody would answer
            fut.set_exception(_store_error(self._dead))
        try:
            await fut
        finally:
            thread = self._thread
            if thread is not None:
                await self._loop.run_in_executor(None, thread.join)
            try:
                await self._loop.run_in_executor(self._reader, self._close_reader)
            finally:
                self._reader.shutdown(wait=False)

    def _close_reader(self) -> None:
        self._rpacks.clear()
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    # -- writes -------------------------------------------------------------

    def _submit(self, kind: int, arg, fut) -> None:
        if self._closed:
            raise _closed_error()
        if self._dead is not None:
            raise _store_error(self._dead)
        if self._acks_held:
            self._hand_acks()  # first: the writer keeps the order of requests
        if kind in _PUT_KINDS:
            now = time.monotonic()
            self._put_gap = now - self._put_at
            self._put_at = now
        self._queue.put((kind, arg, fut))
        if self._room > 0:
            self._came(_request_size(kind, arg))

    def _hand_acks(self) -> None:
        """Queue the acks :meth:`ack` held, in the order they came."""
        timer, self._acks_timer = self._acks_timer, None
        if timer is not None:
            timer.cancel()
        held, self._acks_held = self._acks_held, []
        if self._dead is None and held:
            # one request for all of them: a group's members ack a window
            # each, and ten requests were ten takes and checks of the writer
            self._queue.put((_ACK, held, None))
            if self._room > 0:
                self._came(len(held))

    def _came(self, n: int) -> None:
        """``n`` messages were queued while the writer naps: wake it once
        they fill its batch (the loop's thread)."""
        room = self._room - n
        self._room = room
        if room <= 0:
            try:
                self._nap.release()
            except RuntimeError:  # released already: the writer is awake
                pass

    def _persist_device(self, key, name) -> None:
        # Ordered before any put that uses the key: same FIFO queue.
        self._submit(_REG, (key, name[0], name[1]), None)

    def put(self, sender: str, cid: bytes, body: bytes, ts_ms: int,
            device_keys: Sequence[int]) -> asyncio.Future[int]:
        """Queue one message for ``device_keys``; the future gives its ``mid``.

        The future resolves after the transaction holding the message has
        committed (that is when the sender may be acked).  Bad input raises
        at once (``WrongType``, ``InvalidArgument``, ``UnknownDevice``).
        """
        self._check_open()
        row = self._check_put(sender, cid, body, ts_ms, device_keys)
        fut = self._loop.create_future()
        self._submit(_PUT, row, fut)
        return fut

    def put_many(self, items: Sequence[PutItem], *,
                 validate: bool = True) -> asyncio.Future[list[int]]:
        """Queue several messages; the future gives their mids, in order.

        All of them commit in the same transaction.  Input is validated
        first: one bad item raises and queues nothing.  ``validate=False``
        skips that for items the caller built from known devices (the
        relay's hot path); device keys must then be distinct and registered,
        and each item exactly ``(str, bytes, bytes, int, tuple or list of
        keys)``, not changed afterwards (the writer reads the items, a list
        of keys included, when it commits them; items of one run may share
        one list): one that is not fails this future (``WrongType``,
        ``InvalidArgument``), not the store.
        """
        self._check_open()
        rows = self._check_many(items, validate)
        fut = self._loop.create_future()
        if not rows:
            fut.set_result([])
            return fut
        self._submit(_PUT_MANY, rows, fut)
        return fut

    def put_tails(self, items: Sequence, *,
                  validate: bool = True) -> asyncio.Future[list[int]]:
        """Queue messages given as their DELIVER tails; the future gives their
        mids, in order, as :meth:`put_many`'s does.

        ``items`` is flat, ``device_keys, tail`` a message: ``tail`` the packed
        DELIVER fields after the mid (:func:`fastroute.wire.deliver_tail`),
        which hold the sender, id, body and ``ts_ms`` it is stored with.  The
        relay routes each stored message as that tail: handed over as it is,
        the writer reads the fields in place, and the loop makes no item of
        them.  ``validate=True`` reads each tail and checks it as
        :meth:`put_many` checks an item (one bad: raises, nothing queued).
        ``validate=False`` takes them as given (the relay's hot path): a tail
        that is not one fails this future, not the store.
        """
        # a tuple: its own copy (the caller may reuse its list), and how the
        # writer tells it from a put_many's list of items
        return self._put_flat(items, validate, tail_items, tuple)

    def put_copies(self, items: Sequence, *,
                   validate: bool = True) -> asyncio.Future[list[int]]:
        """Queue per-device copies given as their DDELIVER tails; the future
        gives their mids, in order, as :meth:`put_many`'s does.

        ``items`` is flat, ``device_keys, tail`` a copy: ``tail`` the packed
        DDELIVER fields after the mid, the sender's address and device id
        first (what the keys stage delivers a copy as).  Each is stored as a
        message whose sender is ``address/device_id``
        (:func:`fastroute.wire.copy_tail_fields`), as a ``put_many`` item of
        those fields would be: the writer reads them in place, and the loop
        makes no item of a copy.  ``validate`` as for :meth:`put_tails`.
        """
        return self._put_flat(items, validate, copy_items, CopyTails)

    def _put_flat(self, items: Sequence, validate: bool,
                  read: Callable[[Sequence], Iterator[tuple]],
                  wrap: Callable[[Sequence], tuple]) -> asyncio.Future[list[int]]:
        """:meth:`put_tails` and :meth:`put_copies`: checked, the messages
        ``read`` gives go as ``put_many``'s items; trusted, the writer gets
        ``wrap(items)`` (a tuple, or a :class:`CopyTails`)."""
        self._check_open()
        if validate:
            return self.put_many(self._check_tails(items, read), validate=False)
        fut = self._loop.create_future()
        if not items:
            fut.set_result([])
            return fut
        self._submit(_PUT_TAILS, wrap(items), fut)
        return fut

    def ack(self, device_key: int, mids: Sequence[int], *, validate: bool = True) -> None:
        """Record that ``device_key`` received ``mids`` (fire-and-forget).

        Deletes the device's inbox rows, and a message once no device is left
        to receive it.  Unknown pairs are ignored (acks may be repeated).
        A delete that fails (disk full) is kept and retried until it succeeds.
        The writer gets it with the next other request (a put, a flush), or
        when the oldest ack it has not got has waited 50 ms (while puts come
        less than 50 ms apart) or 4 ms (otherwise).
        """
        self._check_open()
        key = device_key
        if validate:  # the relay passes ints it got from the store itself
            key = _check_sql_int(device_key, "device_key")
            mids = self._check_mids(mids)
        if mids and key in self._by_key:
            if self._dead is not None:
                raise _store_error(self._dead)
            # Held on the loop's thread until the next request of another
            # kind, or a while (below): an ack alone woke the writer, which
            # then waited _linger_s for a put to commit with (a wake-up of a
            # thread each, under load about one a window of messages).
            self._acks_held.append((key, mids))
            if self._acks_timer is None:
                hold = self._linger_s
                if self._put_gap < self._ride_s and hold < self._ride_s:
                    hold = self._ride_s  # puts come often: wait for the next
                self._acks_timer = self._loop.call_later(hold, self._hand_acks)

    def forget_device(self, device_key: int) -> None:
        """Remove a device and everything still queued for it (fire-and-forget).

        Messages whose only remaining recipient it was are deleted too.
        Unknown keys are ignored.
        """
        self._check_open()
        key = self._drop_device(device_key)
        if key is not None:
            self._submit(_FORGET, key, None)
            # the reader's rows of its packs go too (its one thread runs this
            # after the reads before it)
            try:
                self._reader.submit(self._rpacks.drop, key)
            except RuntimeError:  # pragma: no cover - the reader is shutting down
                pass

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (or, for a
        fire-and-forget write that failed, kept for its retry).

        Never raises another caller's failure: an ack that failed is
        retried, not reported to whoever flushes next.
        """
        self._check_open()
        fut = self._loop.create_future()
        self._submit(_FLUSH, True, fut)
        await fut

    async def expire(self, now_ms: int) -> int:
        """Delete messages with expiry ``<= now_ms``; return how many.

        Runs as one transaction in the writer: puts queued meanwhile wait for
        it, so call it often (e.g. every minute) to keep each run small.
        """
        self._check_open()
        now_ms = _check_sql_int(now_ms, "now_ms")
        fut = self._loop.create_future()
        self._submit(_EXPIRE, now_ms, fut)
        return await fut

    # -- reads --------------------------------------------------------------

    async def load(self, device_key: int, after_mid: int,
                   limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages for ``device_key`` with mid > ``after_mid``.

        In mid order (the order they were stored), as
        ``(mid, sender, cid, body, ts_ms)``.  Sees every committed write;
        acks still queued (not yet flushed) may not be visible.
        """
        self._check_open()
        self._check_load(device_key, after_mid, limit)
        return await self._read(_load, device_key, after_mid, limit, self._rpacks)

    async def count_pending(self, device_key: int | None = None) -> int:
        """Inbox rows not yet acked, for one device or in total.

        Counts everything queued before the call (it waits for the writer).
        For tests and metrics; it is a full count, not a cheap call.
        """
        self._check_open()
        params: tuple[int, ...] = ()
        if device_key is None:
            sql = ("SELECT (SELECT count(*) FROM inbox) + "
                   "(SELECT count(*) FROM messages WHERE dev IS NOT NULL) + "
                   "(SELECT coalesce(sum(n), 0) FROM packs) + "
                   "(SELECT coalesce(sum(n), 0) FROM shares)")
        else:
            sql = ("SELECT (SELECT count(*) FROM inbox WHERE device_key = ?1) + "
                   "(SELECT count(*) FROM messages WHERE dev = ?1) + "
                   "(SELECT coalesce(sum(n), 0) FROM packs WHERE dev = ?1) + "
                   "(SELECT coalesce(sum(n), 0) FROM shares WHERE dev = ?1)")
            params = (_check_sql_int(device_key, "device_key"),)
        fut = self._loop.create_future()
        self._submit(_FLUSH, False, fut)
        await fut
        return (await self._read(_fetch, sql, params))[0][0]

    async def _read(self, work, *args) -> list:
        """``work(connection, *args)`` on the reader thread's connection."""
        try:
            return await self._loop.run_in_executor(self._reader, self._read_sync,
                                                    work, args)
        except RuntimeError:
            if self._closed:  # executor already shut down
                raise _closed_error() from None
            raise

    def _read_sync(self, work, args: tuple) -> list:
        try:
            conn = self._rconn
            if conn is None:
                conn = self._rconn = sqlite3.connect(
                    self._path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA query_only = ON")
                conn.execute("PRAGMA busy_timeout = 5000")
            return work(conn, *args)
        except sqlite3.Error as exc:
            raise _store_error(f"store read failed: {_reason(exc)}") from None

    async def backlog_counts(self) -> dict[int, tuple[int, int]]:
        """``device key -> (messages, body bytes)`` still stored for each device
        (for the relay's caps, :mod:`fastroute.relay.caps`)."""
        self._check_open()
        rows = await self._read(_fetch, _SQL_BACKLOG, ())
        out: dict[int, tuple[int, int]] = {}
        for dkey, n, nbytes in rows:
            m, b = out.get(dkey, (0, 0))
            out[dkey] = (m + n, b + (nbytes or 0))
        return out

    # -- metrics ------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters for metrics (no personal data)."""
        return {"commits": self.commits, "failed_batches": self.failed_batches,
                "queued_requests": self._queue.qsize() + bool(self._acks_held),
                "devices": len(self._by_key),
                "checkpoints": self.checkpoints, "deletes_waiting": self.deletes_waiting}

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SqliteStore {state} commits={self.commits}>"

    # -- the writer thread --------------------------------------------------

    def _setup(self) -> tuple[list, int]:
        target, uri = _writer_target(self._path, _wal_vfs())
        conn = self._wconn = sqlite3.connect(target, uri=uri, isolation_level=None,
                                             cached_statements=_CACHED_STATEMENTS,
                                             check_same_thread=False)
        # A new file only (an existing one keeps its own).  Each page a
        # commit touches is a WAL frame (written, checksummed, synced): a
        # batch's pack is tens of KB in overflow pages, which larger pages
        # write in fewer frames, while a group commit touches a few pages
        # of index and small rows, which larger pages only make longer.
        # 8 KB pages cost the group commits ~7 % less than 16 KB, 1:1 the
        # same, DSEND and a backlog's read ~5 % more (benches/README.md,
        # session 52; 4 KB made 1:1 dearer).
        conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        conn.execute(f"PRAGMA auto_vacuum = {_AUTO_VACUUM}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot enable WAL (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        # Zero deleted rows in their pages and in freed pages, whatever this
        # SQLite build's default (ON, OFF or FAST, which leaves freed pages
        # as they were): delivered bodies must not stay in the file.
        conn.execute("PRAGMA secure_delete = ON")
        if conn.execute("PRAGMA secure_delete").fetchone()[0] != 1:
            raise sqlite3.OperationalError("cannot enable secure_delete")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA temp_store = MEMORY")
        if self._max_bytes is not None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(1, self._max_bytes // page)}")
        _upgrade(conn)
        self._counts.load(conn)
        meta = dict(conn.execute("SELECT k, v FROM meta"))
        top_mid = max(conn.execute("SELECT max(mid) FROM messages").fetchone()[0] or 0,
                      conn.execute("SELECT max(last) FROM packs").fetchone()[0] or 0,
                      conn.execute("SELECT max(last) FROM spacks").fetchone()[0] or 0,
                      conn.execute("SELECT max(last) FROM shares").fetchone()[0] or 0)
        self._next_mid = self._mid_mark = max(meta.get("next_mid", 1), top_mid + 1)
        devices = conn.execute(
            "SELECT device_key, address, device FROM devices ORDER BY device_key").fetchall()
        top_key = max(
            conn.execute("SELECT max(device_key) FROM devices").fetchone()[0] or 0,
            conn.execute("SELECT max(device_key) FROM inbox").fetchone()[0] or 0,
            conn.execute("SELECT max(dev) FROM messages").fetchone()[0] or 0,
            conn.execute("SELECT max(dev) FROM packs").fetchone()[0] or 0,
            conn.execute("SELECT max(dev) FROM shares").fetchone()[0] or 0)
        if _SqlFast is not None:
            try:
                self._fast = _SqlFast(conn, self._path)
            except Exception as exc:
                # every transaction then takes the general path (slower only
                # by the GIL's hand-offs between the writer and the loop)
                log.info("fastroute store: the writer's compiled path is off: %s",
                         _reason(exc))
            else:
                # the WAL's checkpoints then run after a batch's answers are
                # posted (_checkpoint), not inside the commit of whichever
                # batch crossed SQLite's mark, which its waiters waited for
                self._checkpoints_held = self._fast.hold_checkpoints()
        return devices, max(meta.get("next_device", 1), top_key + 1)

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _writer_main(self, ready: asyncio.Future) -> None:
        try:
            result = self._setup()
        except Exception as exc:
            if self._wconn is not None:
                if self._fast is not None:
                    self._fast.close()
                self._wconn.close()
            err = _store_error(f"cannot open store: {_reason(exc)}")
            self._post(_settle_one, ready, None, err)
            return
        self._post(_settle_one, ready, result, None)
        try:
            while True:
                # The requests' objects (the messages' tuples and bodies, the
                # acked ids) were made on the loop's thread: they are freed
                # there too, by emptying this holder (the writer keeps no other
                # reference once _write_batch returns).  Freed here, each block
                # was a cache line that the writer's core took from the loop's
                # and gave back when the loop reused it: in a 1:1 run the
                # loop's allocations and the writer's frees were a tenth of
                # each thread's profile.
                held = [self._take_batch()]
                stop, done = (self._write_batch(held[0])
                              if held[0] or self._rewrite_due is not None else (False, []))
                if done:
                    # one call on the loop's thread answers the waiters and
                    # frees the batch (a batch nobody waits on, acks alone, is
                    # freed here: a wake-up of the loop costs more than that)
                    self._post(_settle_all, done, held)
                if stop:
                    # a clean stop leaves no WAL behind: its frames hold the
                    # bodies of messages deleted since the last checkpoint
                    self._erase_due = 0.0
                    self._checkpoint()
                    break
                self._checkpoint()
        except BaseException as exc:  # pragma: no cover - a bug, not I/O
            # Never die silently: fail every waiter and refuse new requests.
            self._dead = f"store writer stopped: {type(exc).__name__}"
            log.exception("fastroute store writer stopped")
            self._fail_queued()
        finally:
            assert self._wconn is not None  # _setup made it
            if self._fast is not None:
                self._fast.close()  # its statements, before their connection
            self._wconn.close()

    def _fail_queued(self) -> None:  # pragma: no cover - see _writer_main
        futs = []
        while True:
            try:
                _, _, fut = self._queue.get_nowait()
            except queue.Empty:
                break
            if fut is not None:
                futs.append(fut)
        if futs:
            self._post(_fail_all, futs, self._dead)

    def _take_batch(self) -> list[tuple]:
        """The next batch of requests; [] when a checkpoint falls due first."""
        q = self._queue
        batch = self._carry
        self._carry = []
        # writes kept for a retry go again at least every _RETRY_S; a due
        # checkpoint runs even when no request comes
        timeout = _RETRY_S if batch else None
        # when the writer next has work of its own (the erasing checkpoint,
        # the rewrite of partly acked rows), monotonic; None: nothing due.
        # Only the writer moves them: it holds for the wait below.
        due = self._erase_due
        if self._rewrite_due is not None and (due is None or self._rewrite_due < due):
            due = self._rewrite_due
        monotonic = time.monotonic
        idle = monotonic()
        if due is not None:
            wait = max(0.0, due - idle)
            timeout = wait if timeout is None else min(timeout, wait)
        # the writer is the queue's one taker: a size above 0 holds for the
        # take after it (a take of an empty queue raised an exception a commit)
        if q.qsize():
            batch.append(q.get_nowait())
            queued = True  # it came while the writer was busy
        else:
            queued = False
            try:
                batch.append(q.get(timeout=timeout))
            except queue.Empty:
                return batch
        n = 0
        limit = self._max_batch
        group = self._group_s
        # held for more puts only while that pays: the last batch had more
        # than one (puts came while the writer was busy, or during its
        # wait), and this one's first came without a pause of the budget;
        # after a pause, for the rest of a burst only, while puts came in
        # bursts (a put that comes alone, to an idle writer, never waits)
        close = self._puts_last > 1 and monotonic() - idle < group
        burst = self._burst_s if self._bursts else 0.0
        puts = 0
        deadline = None  # when the batch goes, whatever else comes
        put_end = None  # the deadline, if a waiter's budget set it
        while True:
            kind, arg, fut = batch[-1]
            n += _request_size(kind, arg)
            if kind in _PUT_KINDS:
                puts += 1
            if fut is not None:
                # somebody waits: at once, or, while puts come faster than
                # the budget, once it has waited that long for more of them
                end = monotonic() + (group if close else burst)
                if deadline is None or end < deadline:
                    deadline = put_end = end
            if n >= limit:
                break
            if q.qsize():
                batch.append(q.get_nowait())
                continue
            if deadline is None:
                deadline = monotonic() + self._linger_s
            if due is not None and due < deadline:
                deadline = due
            wait = deadline - monotonic()
            if wait <= 0:
                break
            try:
                if deadline == put_end:
                    # the budget's rest (for more puts, or a burst's): napped
                    # through, not woken at each put (a wake-up of both
                    # threads each), only by one that fills the batch
                    batch.append(self._nap_for(wait, limit - n))
                else:
                    batch.append(q.get(timeout=wait))
            except queue.Empty:
                break
        if puts:
            self._puts_last = puts
            self._bursts = puts > 1 or queued
        return batch

    def _nap_for(self, wait: float, room: int) -> tuple:
        """The next request, after ``wait`` seconds or as soon as ``room``
        more messages were queued; raises ``queue.Empty`` if none came."""
        nap = self._nap
        nap.acquire(False)  # a wake-up left from an earlier nap: used up
        self._room = room
        try:
            nap.acquire(timeout=wait)
        finally:
            self._room = 0
        return self._queue.get_nowait()

    def _write_batch(self, batch: list[tuple]) -> tuple[bool, list[tuple]]:
        """Apply ``batch`` in one transaction; return whether it held the stop
        request, and the ``(future, result)`` pairs the loop is to settle
        (failures are posted here)."""
        mid = self._next_mid
        puts: list[list] = []           # the put requests' items, in queue order
        done: list[tuple] = []          # (future, result) settled on success
        regs: list[tuple] = []
        acks: dict[int, list[int]] = {}  # device_key -> mids
        blobs: dict[int, bytes] = {}    # device_key -> its mids as int64s
        forgets: list[int] = []
        expires: list[tuple] = []
        flushes: list[tuple] = []       # (future, kind of flush)
        acks_hi = 0                     # no acked mid is above it
        stop = False
        for kind, arg, fut in batch:
            if kind == _PUT_MANY:
                # mids are given in queue order; the rows are laid out below
                puts.append(arg)
                # a range: the loop's thread makes the list (see _settle_all)
                done.append((fut, range(mid, mid + len(arg))))
                mid += len(arg)
            elif kind == _PUT_TAILS:
                puts.append(arg)  # a tuple: sql_rows reads each tail in place
                done.append((fut, range(mid, mid + len(arg) // 2)))
                mid += len(arg) // 2
            elif kind == _PUT:
                puts.append([arg])
                done.append((fut, mid))
                mid += 1
            elif kind == _ACK:
                # Inserts run before deletes below; so that this equals queue
                # order, an ack only reaches mids that existed when it was
                # queued (a mid is known only once its batch committed).
                acks_hi = _gather_acks(arg, acks, mid, acks_hi, blobs)
            elif kind == _REG:
                regs.append(arg)
            elif kind == _FORGET:
                forgets.append(arg)
            elif kind == _EXPIRE:
                expires.append((fut, arg, mid))  # same bound as for acks
            elif kind == _FLUSH:
                flushes.append((fut, arg))
            elif kind == _STOP:
                flushes.append((fut, _STOP_REPORT if arg else False))
                stop = True
        puts_error: str | None = None   # the puts' own failure, for their senders
        other_error: str | None = None  # registrations, deletes, expiries
        expired: list[int] = []
        # every new row: the messages' own (several devices), their inbox
        # rows, the packs (one device); compiled when fastroute._core is
        rows = _NO_PUTS
        if puts:
            try:
                rows = _sql_rows(puts, self._next_mid, self._ttl_ms)
            except Exception:
                # an item the caller vouched for (validate=False) is bad: its
                # request fails, not the writer nor the batch's other requests
                rows = self._rows_apart(puts, done)
        new = bool(rows[0] or rows[2])
        partial = bool(self._partial or self._spartial or self._sgone)
        # partly acked packs and shares are rewritten when due, and before a
        # flush answers (reads after it must not see their acked messages)
        rewrite = (self._rewrite_due is not None and time.monotonic() >= self._rewrite_due) \
            or bool(flushes and (partial or acks or expires))
        if acks or forgets or expires or (rewrite and partial):
            self._deleted()
        if new or acks or regs or forgets or expires or (rewrite and partial):
            try:
                # the common case: everything in one transaction, one commit
                expired = self._transaction(regs, rows, mid, acks, forgets, expires,
                                            rewrite, acks_hi, common=True, blobs=blobs)
            except Exception as exc:
                self.failed_batches += 1
                self._deleted()  # a rolled back write may leave frames in the WAL
                if self._partial or self._spartial or self._sgone:
                    # the rewrite failed with the rest: again in a while, not at once
                    self._rewrite_due = time.monotonic() + _RETRY_S
                reason = f"store write failed: {_reason(exc)}"
                if new and (regs or acks or forgets or expires or rewrite):
                    # Say which failed: a full disk refuses new messages but
                    # usually still lets deletes through (they free pages);
                    # one must not take the other down, nor be reported to
                    # someone else.
                    try:
                        expired = self._transaction(regs, _NO_PUTS, mid, acks, forgets,
                                                    expires, rewrite)
                    except Exception as exc2:
                        other_error = f"store write failed: {_reason(exc2)}"
                    try:
                        self._transaction([], rows, mid, {}, [], [], False)
                    except Exception as exc3:
                        puts_error = f"store write failed: {_reason(exc3)}"
                elif new:
                    puts_error = reason
                else:
                    other_error = reason
        if puts_error is not None:
            log.warning("fastroute store: %d messages refused: %s",
                        mid - self._next_mid, puts_error)
            self._post(_fail_all, [f for f, _ in done], puts_error)
            done = []
        elif new:
            self._next_mid = mid
        if other_error is not None:
            # Registrations and deletes have no waiter: keep them, first in
            # the next batch, until they succeed (a delete dropped here would
            # leave a delivered message on disk until its TTL).
            kept = [(k, m) for k, m in acks.items() if m]
            self._carry = ([(_REG, r, None) for r in regs]
                           + ([(_ACK, kept, None)] if kept else [])
                           + [(_FORGET, k, None) for k in forgets])
            self.deletes_waiting = sum(len(m) for m in acks.values()) + len(forgets)
            log.warning("fastroute store: %d deletes and %d registrations kept for retry: %s",
                        self.deletes_waiting, len(regs), other_error)
            self._post(_fail_all, [e[0] for e in expires], other_error)
        else:
            self.deletes_waiting = 0
            if expires:
                done.extend((fut, n) for (fut, _, _), n in zip(expires, expired))
        for fut, report in flushes:
            if report == _STOP_REPORT and other_error is not None:
                # the store closes with deletes it could not apply: say so
                self._post(_fail_all, [fut], other_error)
            elif report == _STOP_REPORT and puts_error is not None:
                self._post(_fail_all, [fut], puts_error)
            else:
                done.append((fut, None))
        return stop, done

    def _rows_apart(self, puts: list, done: list) -> tuple:
        """The rows of ``puts`` laid out one request at a time; a request whose
        items cannot be is failed with that error and dropped from ``done``
        (its future's entry, the same index), its mids left unused."""
        rows: tuple = ([], [], [], [])
        kept = []
        first = self._next_mid
        for items, entry in zip(puts, done):
            try:
                part = _sql_rows([items], first, self._ttl_ms)
            except Exception as exc:
                self._post(_settle_one, entry[0], None, exc)
            else:
                for whole, some in zip(rows, part):
                    whole += some
                kept.append(entry)
            first += len(items) // 2 if isinstance(items, tuple) else len(items)
        done[:] = kept
        return rows

    def _checkpoint(self) -> None:
        """Erase what deletes left in the WAL, once the bound says it is time;
        else, where checkpoints are held (:meth:`PySqlFast.hold_checkpoints`),
        copy the WAL into the database once it holds SQLite's mark of frames.

        Deleted rows are zeroed in their pages (``secure_delete = ON``), but
        the WAL still holds the older page images, bodies and ids included,
        until a checkpoint copies the pages back and a TRUNCATE empties the
        file (a PASSIVE checkpoint or a WAL reset only rewinds it: old frames
        beyond the new end stay readable).  A reader holding an old snapshot
        blocks TRUNCATE; then it is retried every second.
        """
        due = self._erase_due
        if due is None or time.monotonic() < due:
            if self._checkpoints_held:
                self._copy_wal()
            return
        conn = self._wconn
        assert conn is not None
        try:
            # a reader would otherwise hold the writer (and every put) for the
            # whole busy timeout: wait briefly, retry in a second instead
            conn.execute("PRAGMA busy_timeout = 100")
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                conn.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.Error as exc:
            log.warning("fastroute store: checkpoint failed: %s", _reason(exc))
            busy = 1
        if busy:
            self._erase_due = time.monotonic() + 1.0
        else:
            self._erase_due = None
            self.checkpoints += 1

    def _copy_wal(self) -> None:
        """The checkpoint SQLite would have run inside a commit (held by the
        compiled core): PASSIVE, once the WAL holds its mark of frames."""
        fast = self._fast
        assert fast is not None
        if fast.wal_frames < _CHECKPOINT_FRAMES:
            return
        try:
            fast.checkpoint()
        except sqlite3.Error as exc:
            # as SQLite's own in a commit: the next commit retries
            log.warning("fastroute store: checkpoint failed: %s", _reason(exc))
        else:
            self.wal_checkpoints += 1

    def _deleted(self) -> None:
        # a delete (or a rolled back write) left old page images in the WAL
        if self._erase_due is None:
            self._erase_due = time.monotonic() + self._erase_s

    def _transaction(self, regs: list, puts: tuple, mid: int, acks: dict, forgets: list,
                     expires: list, rewrite: bool, acks_hi: int | None = None,
                     common: bool = False, blobs: dict | None = None) -> list[int]:
        """Apply one set of writes in one transaction; the expiries' counts.

        ``puts``: the new rows, ``(spack_rows, share_rows, pack_rows,
        blocks)`` (:func:`py_sql_rows`).  ``rewrite``: rewrite every partly
        acked pack and share without its acked messages, and every spack
        without the messages no device holds.  ``acks_hi``: no mid in
        ``acks`` is above it (None: not known).  Rolls back and raises on any
        failure, leaving nothing half-applied (the partial acks
        and the counts kept in memory included).

        ``common``: a transaction of acks of committed messages and new
        packs, nothing else (the steady state of 1:1 and per-device traffic),
        may run through :meth:`_transaction_fast`, which takes ``blobs``,
        the acks' blobs as :func:`py_gather_acks` made them.
        """
        conn = self._wconn
        assert conn is not None  # _setup made it, before the first batch
        expired: list[int] = []
        spack_rows, share_rows, pack_rows, blocks = puts
        # the partial acks as this transaction leaves them; kept only if it
        # commits (a set is replaced, never changed in place)
        partial = dict(self._partial)
        spartial = dict(self._spartial)
        sgone = dict(self._sgone)
        counts = self._counts
        mark = self._mid_mark  # kept, like partial, only if this commits
        rewritten = 0
        t0 = time.perf_counter()
        try:
            counts.begin()
            if (common and self._fast is not None and not (
                    regs or forgets or expires or rewrite)
                    and len(share_rows) <= 7 * _FAST_SHARES
                    and (not acks or acks_hi is not None and acks_hi < self._next_mid)):
                # as below: the acks of committed messages, then the new rows
                meta = -1
                if (pack_rows or spack_rows) and mid > mark:
                    mark = meta = mid + _MID_BLOCK
                for block in blocks:
                    counts.add(*block, spack_rows[4::10])
                self._transaction_fast(conn, acks, puts, meta, partial, spartial, sgone,
                                       blobs)
            else:
                conn.execute("BEGIN")
                # Order inside the transaction follows the queue's causality:
                # a device exists before messages for it, messages exist
                # before anything can ack them.
                if regs:
                    conn.executemany(
                        "INSERT OR IGNORE INTO devices(device_key, address, device) "
                        "VALUES (?,?,?)", regs)
                    conn.execute(_SQL_META, ("next_device", max(r[0] for r in regs) + 1))
                if acks and (spack_rows or pack_rows):
                    # Acks of messages committed before this batch go first: the
                    # pages their deletes free (zeroed) are then the ones the new
                    # rows take, each written to the WAL once, not zeroes and
                    # then another page's new rows.
                    committed = self._next_mid  # every mid below it was, before this batch
                    if acks_hi is None:
                        acks_hi = max(max(v, default=0) for v in acks.values())
                    if acks_hi < committed:
                        early, acks = acks, {}  # as always unless a mid was guessed
                    else:
                        early = {k: [m for m in v if m < committed] for k, v in acks.items()}
                        acks = {k: v2 for k, v in acks.items()
                                if (v2 := [m for m in v if m >= committed])}
                    self._delete(conn, early, [], partial, spartial, sgone)
                if spack_rows or pack_rows:
                    _execute_rows(conn, _SQL_PUT_SPACK, 10, [], spack_rows)
                    _execute_rows(conn, _SQL_PUT_SHARES, 7, [], share_rows)
                    _execute_rows(conn, _SQL_PUT_PACK, 8, [], pack_rows)
                    for block in blocks:
                        counts.add(*block, spack_rows[4::10])
                    if mid > mark:
                        mark = mid + _MID_BLOCK
                        conn.execute(_SQL_META, ("next_mid", mark))
                if acks or forgets:
                    self._delete(conn, acks, forgets, partial, spartial, sgone)
                for _, now, bound in expires:
                    expired.append(self._expire(conn, now, bound, partial, spartial, sgone))
                if rewrite:
                    # spacks first: a share's rewrite reads what its spack holds
                    for first, gone in sgone.items():
                        _keep_spack(conn, first, lambda e: e[0] not in gone)
                    for (key, first), acked in partial.items():
                        _keep_pack(conn, key, first, lambda e: e[0] not in acked)
                    for (key, first), acked in spartial.items():
                        _keep_share(conn, key, first, acked)
                    rewritten = len(partial) + len(spartial) + len(sgone)
                    partial = {}
                    spartial = {}
                    sgone = {}
                conn.execute("COMMIT")
        except BaseException:
            counts.rollback()
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        counts.commit()
        if (partial or spartial or sgone) and not (self._partial or self._spartial
                                                   or self._sgone):
            self._partial_since = time.monotonic()
            self._rewrite_due = self._partial_since + self._rewrite_s
        elif not (partial or spartial or sgone):
            since = self._partial_since
            if rewritten and since is not None:
                # a checkpoint may have run since those acks (for an earlier
                # delete): the one that erases the rewrite's old pages is due
                # erase_s after the acks
                due = since + self._erase_s
                if self._erase_due is None or due < self._erase_due:
                    self._erase_due = due
            self._partial_since = self._rewrite_due = None
        self._partial = partial
        self._spartial = spartial
        self._sgone = sgone
        self._mid_mark = mark
        self.rewrites += rewritten
        self.commit_seconds.observe(time.perf_counter() - t0)
        self.commits += 1
        return expired

    def _transaction_fast(self, conn: sqlite3.Connection, acks: dict, puts: tuple,
                          mark: int, partial: dict, spartial: dict, sgone: dict,
                          blobs: dict | None = None) -> None:
        """BEGIN, the acks, the new rows (``puts``, :func:`py_sql_rows`'),
        ``next_mid`` (unless ``mark`` is negative) and COMMIT, in one
        compiled call that releases the GIL once.

        A device's acks are applied there while they list whole packs and
        shares, each in order (each row is deleted: what
        :func:`py_ack_device` does for it).  The shares deleted (a group
        member's steady state) have their messages released in the call,
        and the spacks no device holds anything of now are deleted there.
        When some acks were left (part of a row, a device with a row acked
        in part before), the call hands the transaction back: the shares'
        messages are released, the rest goes to :meth:`_delete`, and a second
        call deletes the spacks no device holds anything of, inserts the new
        rows and commits.  The acks still go first, so the pages their
        deletes free are the ones the new rows take.  ``blobs``: the acks'
        int64 blobs, :func:`py_gather_acks`' (the walks and the release read
        them, not the acks' ints).
        """
        spack_rows, share_rows, pack_rows, _ = puts
        fast = self._fast
        assert fast is not None
        # a device with a row acked in part: the row no longer has the mids
        # it lists, so the general path applies its acks
        held: set[int] | tuple = ()
        if partial or spartial:
            held = {key for key, _ in partial} | {key for key, _ in spartial}
        drops, tried = _ack_drops(acks, held, blobs)
        if len(tried) == len(acks):
            others = {}  # every device's acks in the drops (the steady state)
        else:
            others = {key: mids for key, mids in acks.items() if mids}
            for key in tried:
                del others[key]
        walked: list = []
        if others:
            missed = fast.run(drops, [], -1, True, False, shares=walked)
        else:
            gone: dict[int, list[int]] = {}
            missed = fast.run(drops, pack_rows, mark, True, True, spack_rows, share_rows,
                              shares=walked, release=(self._counts, tried, acks, gone))
            if not missed:
                # committed; the spacks of gone no device holds were deleted
                _settle_gone(self._counts, gone, sgone, [])
                return
        # handed back: the acks left go the general way, then a second call
        # inserts the new rows and commits
        for i, done in missed:
            others[tried[i]] = acks[tried[i]][done:]
        dead: list[int] = []
        self._delete(conn, others, [], partial, spartial, sgone,
                     walked=(walked, tried, acks), dead=dead)
        fast.run([], pack_rows, mark, False, True, spack_rows, share_rows, dead)

    def _delete(self, conn: sqlite3.Connection, acks: dict, forgets: list, partial: dict,
                spartial: dict, sgone: dict, walked: tuple | None = None,
                dead: list | None = None) -> None:
        """Apply ``acks`` (device key -> mids) and ``forgets`` (device keys)
        inside the open transaction.  ``walked``: the shares a compiled walk
        already deleted, ``(shares, keys, acks)``: ``shares`` flat ``index,
        first, n`` as :meth:`PySqlFast.run` gives them, ``keys`` the drops'
        device keys by index, ``acks`` the mids they came from; their
        messages are released here.  ``dead``: a list that takes the keys of
        the spacks no device holds anything of now (the caller deletes
        them); without it they are deleted here."""
        touched: set[int] = set()
        counts = self._counts
        gone: dict[int, list[int]] = {}  # spack -> its messages no device holds now

        def release(first: int, mids) -> None:
            out = counts.release(first, mids)
            if out:
                gone.setdefault(first, []).extend(out)

        if walked is not None:
            _release_walked(counts, *walked, gone)
        # each shared message a device held is released: the last
        # holder's ack deletes it
        if acks and self._fast is not None:
            acks = self._drop_shares(acks, spartial, gone)
        left = _ack_rows(conn, acks, partial, spartial, release) if acks else {}
        for key, mids in left.items():  # each non-empty
            # a store of version 3 or older: the device's own messages go
            # at once; of the shared ones, its inbox rows, then (below)
            # those no device is left for
            before = conn.total_changes
            _execute_in(conn, _SQL_ACK_DIRECT, [key], mids)
            if conn.total_changes - before < len(mids):
                touched.update(mids)
                _execute_in(conn, _SQL_ACK, [key], mids)
        for key in forgets:
            for first, blob in conn.execute(_SQL_SHARES_OF, (key,)).fetchall():
                acked = spartial.pop((key, first), ())
                release(first, [m for m in _mids(blob) if m not in acked])
            conn.execute("DELETE FROM shares WHERE dev = ?", (key,))
            touched.update(m for (m,) in conn.execute(
                "SELECT mid FROM inbox WHERE device_key = ?", (key,)))
            conn.execute("DELETE FROM messages WHERE dev = ?", (key,))
            conn.execute("DELETE FROM packs WHERE dev = ?", (key,))
            conn.execute("DELETE FROM inbox WHERE device_key = ?", (key,))
            conn.execute("DELETE FROM devices WHERE device_key = ?", (key,))
            for pack in [p for p in partial if p[0] == key]:
                del partial[pack]
        if gone:
            out = [] if dead is None else dead
            _settle_gone(counts, gone, sgone, out)
            if out and dead is None:
                _execute_in(conn, _SQL_SPACK_DROP, [], sorted(out))
        if touched:
            # One indexed probe per touched message (many per statement).  A
            # per-row AFTER DELETE trigger measured the same for acks but would
            # also fire on expire's bulk inbox delete, whose messages go
            # anyway; so it is done here.
            _execute_in(conn, _SQL_ORPHAN, [], sorted(touched))

    def _drop_shares(self, acks: dict, spartial: dict, gone: dict) -> dict:
        """The devices' acks of whole shares, in order (a group member's
        steady state), applied in one compiled call (:meth:`PySqlFast.drop_shares`),
        their messages released (those no device holds now into ``gone``, as
        :func:`py_release_walked` fills it); returns the acks left to the
        general path.
        (The common transaction walks shares with packs in its own call:
        this is for the acks that reach the general path.)

        A device with a share acked in part keeps the general path: that
        share's row still lists the mids acked before.
        """
        fast = self._fast
        assert fast is not None
        drops, keys = _ack_drops(acks, {key for key, _ in spartial} if spartial else ())
        if not drops:
            return acks
        # a walk of shares alone: each device's start at the head of its acks
        ends = _release_walked(self._counts, fast.drop_shares(drops), keys, acks, gone, drops)
        return _acks_left(acks, keys, ends)

    def _expire(self, conn: sqlite3.Connection, now_ms: int, bound: int, partial: dict,
                spartial: dict, sgone: dict) -> int:
        conn.execute("DELETE FROM inbox WHERE mid IN (SELECT mid FROM messages "
                     "WHERE exp_ms <= ? AND mid < ?)", (now_ms, bound))
        n = conn.execute("DELETE FROM messages WHERE exp_ms <= ? AND mid < ?",
                         (now_ms, bound)).rowcount
        counts = self._counts
        dead = []
        # the shares that may hold an expired message: a share lists messages
        # of its own spack only, so it is one of the devs of a spack whose
        # earliest expiry has passed (shares have no index on exp_ms)
        sharers: list[tuple[int, int]] = []
        # the spacks that may hold an expired message, by the counts' bounds
        # (spacks have no index on exp_ms either)
        rows = _select_in(conn, "SELECT first, mids, exps, devs, exp_ms FROM spacks "
                          "WHERE first IN ", counts.expiring(now_ms, bound))
        for first, blob, eblob, dblob, exp in rows:
            if exp > now_ms:
                counts.expires(first, exp)  # rewritten since without its earliest
                continue
            sharers += [(key, first) for key in _mids(dblob)]
            expiries = list(zip(_mids(blob), _mids(eblob)))  # (mid, exp_ms) each
            # a spack may hold messages not yet expired, or queued after the
            # expiry (a mid at or above bound): they stay
            out = [m for m, e in expiries if e <= now_ms and m < bound]
            n += counts.drop(first, out)
            gone = sgone.pop(first, frozenset())
            if counts.left(first):
                # what is left: neither expired nor held by nobody
                out_set = set(out)
                _keep_spack(conn, first, lambda e: e[0] not in gone and e[0] not in out_set)
                counts.expires(first, min([e for m, e in expiries
                                           if m not in gone and m not in out_set],
                                          default=exp))
            else:
                dead.append(first)
        if dead:
            _execute_in(conn, _SQL_SPACK_DROP, [], dead)
        for key, first in sharers:
            row = conn.execute("SELECT exp_ms FROM shares WHERE dev = ? AND first = ?",
                               (key, first)).fetchone()
            if row is not None and row[0] <= now_ms:
                # the row keeps what is still stored (a mid at or above
                # bound, one not yet expired) and was not acked
                _keep_share(conn, key, first, spartial.pop((key, first), ()),
                            sgone.get(first, ()))
        for key, first in conn.execute("SELECT dev, first FROM packs WHERE exp_ms <= ? "
                                       "AND first < ?", (now_ms, bound)).fetchall():
            # a pack may hold messages not yet expired, or queued after the
            # expiry (a mid at or above bound): they stay
            acked = partial.pop((key, first), ())
            n += _keep_pack(conn, key, first,
                            lambda e: e[0] not in acked and (e[5] > now_ms or e[0] >= bound),
                            count=lambda e: e[0] not in acked)
        return n


def _request_size(kind: int, arg) -> int:
    """How many messages a writer's request counts for in its batch's limit
    (a put's messages; acks, one a device's; any other request, 1)."""
    if kind == _PUT_TAILS:
        return len(arg) // 2  # flat device_keys, tail pairs
    if kind == _PUT_MANY or kind == _ACK:
        return len(arg)
    return 1


def py_gather_acks(pairs: list, acks: dict, mid: int, hi: int,
                   blobs: dict | None = None) -> int:
    """Fold an ack request's ``(device key, mids)`` pairs into ``acks``
    (device key -> mids, in the order they came), each pair's mids below
    ``mid`` only; return the greatest mid they may hold, ``hi`` at least.

    The writer's take of one ack request (a list, see
    :meth:`SqliteStore._hand_acks`).  A device's first list goes in as the
    caller's list itself, not a copy (a copy would write every int's
    reference count from the writer's thread; the loop's thread frees
    them); one with a mid at or above ``mid`` goes in as a new list of the
    rest.  Each pair's mids: a non-empty sequence of ints.

    ``blobs`` (a dict, filled from empty with ``acks``): a device's mids as
    well as native int64s (:func:`py_mids_blob`), while every list folded
    in for it was of int64s; else the device has none.  The commit's walks
    and releases take the blobs (:func:`py_ack_drops`,
    :func:`py_release_walked`), so the compiled writer reads each acked int
    once, here, not once more for each of them."""
    for key, mids in pairs:
        known = acks.get(key)
        top = _mid_span(mids)[1]
        if top >= mid:
            mids = [m for m in mids if m < mid]
            top = mid - 1
        elif type(mids) is not list:
            mids = list(mids)
        acks[key] = mids if known is None else known + mids
        if blobs is not None and (known is None or key in blobs):
            try:
                blob = py_mids_blob(mids)
            except (OverflowError, TypeError):
                blobs.pop(key, None)
            else:
                blobs[key] = blob if known is None else blobs[key] + blob
        if top > hi:
            hi = top
    return hi


#: :func:`py_gather_acks`, compiled when the core is built (a group's commit
#: takes one ack request of a pair a member device)
_gather_acks = twin(py_gather_acks)


def py_ack_drops(acks: dict, held, blobs: dict | None = None) -> tuple[list, list[int]]:
    """The compiled walks' input for ``acks`` (device key -> acked mids):
    flat ``key, mids blob`` pairs (native int64s), and their keys in order.
    A device in ``held``, one with no mids, and one whose mids are not all
    int64s (no row's: the general path says what they are) are left out.
    ``blobs``: the devices' blobs :func:`py_gather_acks` made with ``acks``,
    taken as they are (a device without one, bytes, has its blob made
    here)."""
    drops: list = []
    keys: list[int] = []
    for key, mids in acks.items():
        if mids and key not in held:
            blob = None if blobs is None else blobs.get(key)
            if type(blob) is not bytes:
                try:
                    blob = _mids_blob(mids)
                except (OverflowError, TypeError):
                    continue
            drops += (key, blob)
            keys.append(key)
    return drops, keys


#: :func:`py_ack_drops`, compiled when the core is built
_ack_drops = twin(py_ack_drops)


def py_acks_left(acks: dict, keys: list, ends: dict) -> dict:
    """The acks (device key -> mids) a compiled walk of shares left to the
    general path: a walked device's (``ends``: by its index in ``keys``, how
    many of its mids the walk took, :func:`py_release_walked`'s answer)
    after those, any other device's as they were, in ``acks``' order; a
    device with none left is left out (a large group's members ack whole
    shares: most are left out, and each was two lines of Python a commit)."""
    taken = {keys[index]: end for index, end in ends.items()}
    rest = {}
    for key, mids in acks.items():
        end = taken.get(key, 0)
        if end < len(mids):
            rest[key] = mids[end:] if end else mids
    return rest


#: :func:`py_acks_left`, compiled when the core is built
_acks_left = twin(py_acks_left)


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a store file to this format (:data:`_SCHEMA_VERSION`): its tables
    made, an older format's columns added, a version 5 or 6 store's spacks
    given their devs and a version 4 store's ``shared`` rows moved into
    ``spacks``; a newer format is refused.  Run on open and before an
    erasure (:mod:`fastroute.erase`), with ``secure_delete`` on."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > _SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"store format {version} is newer than this fastroute ({_SCHEMA_VERSION})")
    migrate = "ALTER TABLE messages ADD COLUMN dev INTEGER;" if version == 1 else ""
    old = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'packs'"
                       ).fetchone()
    if old is not None and "WITHOUT ROWID" in old[0].upper():
        # Version 3 to 5: the packs move into the rowid table (a crash
        # before the COMMIT leaves the file as it was).  Its rows are deleted
        # before the old table is dropped, so secure_delete zeroes them.
        migrate += ("ALTER TABLE packs RENAME TO packs_v5; DROP INDEX packs_exp;"
                    f"{_PACKS_SCHEMA}INSERT INTO packs SELECT * FROM packs_v5;"
                    "DELETE FROM packs_v5; DROP TABLE packs_v5;")
    old = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'spacks'"
                       ).fetchone()
    # Version 5 and 6: the spacks move into a table with devs (before data,
    # which spills to overflow pages), filled below from their shares
    spacks = old is not None and "devs" not in old[0]
    moved = ""
    if spacks:
        migrate += "ALTER TABLE spacks RENAME TO spacks_v6; DROP INDEX spacks_exp;"
        moved = ("INSERT INTO spacks(first, last, n, nbytes, exp_ms, mids, lens, exps, devs, "
                 "data) SELECT first, last, n, nbytes, exp_ms, mids, lens, exps, x'', data "
                 "FROM spacks_v6; DELETE FROM spacks_v6; DROP TABLE spacks_v6;")
    try:
        # the transaction is left open to the fill (a crash before its
        # COMMIT leaves the file as it was)
        conn.executescript(f"BEGIN IMMEDIATE;{migrate}{_SCHEMA}{moved}"
                           "DROP INDEX IF EXISTS shares_exp; DROP INDEX IF EXISTS spacks_exp;")
        if spacks:
            holders: dict[int, list[int]] = {}
            for dev, first in conn.execute("SELECT dev, first FROM shares"):
                holders.setdefault(first, []).append(dev)
            conn.executemany("UPDATE spacks SET devs = ? WHERE first = ?",
                             [(py_mids_blob(devs), first) for first, devs in holders.items()])
        conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'shared'"
                    ).fetchone() is None:
        return
    # Version 4: a share's first was its transaction's first shared mid, and
    # every shared message of that transaction is listed by shares of that
    # first only; those messages become the spack of that key.  Idempotent
    # (the table goes in the same transaction), so a crash in between only
    # repeats it on the next open.
    conn.execute("BEGIN IMMEDIATE")
    try:
        listed: dict[int, set[int]] = {}
        holders: dict[int, list[int]] = {}
        for dev, first, blob in conn.execute("SELECT dev, first, mids FROM shares"):
            listed.setdefault(first, set()).update(_mids(blob))
            holders.setdefault(first, []).append(dev)
        rows: list = []
        for first in sorted(listed):
            entries = [tuple(r) for r in _select_in(
                conn, "SELECT mid, sender, cid, body, ts_ms, exp_ms FROM shared WHERE mid IN ",
                sorted(listed[first]))]
            if entries:
                entries.sort()
                rows += _spack_row(first, entries, holders[first])
        _execute_rows(conn, _SQL_PUT_SPACK, 10, [], rows)
        # the rows go first (zeroed: secure_delete), then the table
        conn.execute("DELETE FROM shared")
        conn.execute("DROP TABLE shared")
        # version 4's shares had mids NOT NULL: the table is made again
        conn.execute("ALTER TABLE shares RENAME TO shares_v4")
        conn.execute(_SHARES_SCHEMA)
        conn.execute("INSERT INTO shares SELECT * FROM shares_v4")
        conn.execute("DELETE FROM shares_v4")
        conn.execute("DROP TABLE shares_v4")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _fetch(conn: sqlite3.Connection, sql: str, params: tuple) -> list:
    """Every row of one query."""
    return conn.execute(sql, params).fetchall()


class _PackRests(dict):
    """What :func:`_load` keeps of the packs it stopped in: device key ->
    ``((first, last, n), after, mids, rows, size)``, the rows of the pack
    ``(first, last, n)`` (every one past mid ``after``, where that load
    started) and their mids.  A pack is written by one transaction and holds up to
    thousands of messages: a device's backlog sync loads it a thousand rows
    at a time, and unpacking it whole at each load cost the reader most of
    its time (a slow recipient's store path).

    The rows are used only by a load from ``after`` or later, and only while
    the pack is still ``(first, last, n)`` in that load's snapshot (a pack is
    only ever rewritten smaller, by acks and expiry), so a load returns what
    a fresh unpack would.  At most :data:`_PACK_RESTS_BYTES` of packs (their
    stored ``size``) are kept, the oldest dropped first.
    """

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def keep(self, key: int, pack: tuple, after: int, mids: list, rows: list,
             size: int) -> None:
        """Keep ``rows`` (mids ``mids``) of ``pack`` past ``after`` for ``key``."""
        self.drop(key)
        while self and self.nbytes + size > _PACK_RESTS_BYTES:
            self.drop(next(iter(self)))
        if size <= _PACK_RESTS_BYTES:
            self[key] = (pack, after, mids, rows, size)
            self.nbytes += size

    def drop(self, key: int) -> None:
        """Forget what is kept for ``key``."""
        kept = self.pop(key, None)
        if kept is not None:
            self.nbytes -= kept[4]

    def clear(self) -> None:
        """Forget everything."""
        super().clear()
        self.nbytes = 0


#: the most stored bytes of packs :class:`_PackRests` keeps rows of
_PACK_RESTS_BYTES = 16 << 20


def _load(conn: sqlite3.Connection, device_key: int, after_mid: int, limit: int,
          rests: _PackRests | None = None) -> list:
    """``load`` on the reader's connection: the rows and the packs in one snapshot
    (a shared message committed between two reads would otherwise be missed).
    ``rests``: the reader's :class:`_PackRests`."""
    rows: list = []
    conn.execute("BEGIN")
    try:
        shared = conn.execute(_SQL_LOAD, (device_key, after_mid, limit)).fetchall()
        # packs come in mid order: the first `limit` messages past after_mid
        # are in the first packs that hold `limit` of them (a backlog's pack
        # holds hundreds: unpacking `limit` packs would be wasted work)
        cur = conn.execute(_SQL_LOAD_PACKS, (device_key, after_mid, limit))
        try:
            for rowid, first, last, n, data in cur:
                if data is not None and n <= limit - len(rows):
                    # all of it, and nothing to keep: most packs of a device
                    # that was offline hold a message or a few
                    rows += _pack_rows(data)
                    if rests:
                        rests.drop(device_key)
                    if len(rows) >= limit:
                        break
                    continue
                pack = (first, last, n)
                kept = rests.get(device_key) if rests is not None else None
                if kept is not None and kept[0] == pack and kept[1] <= after_mid:
                    mids, entries, size = kept[2], kept[3], kept[4]
                elif data is None:
                    blob, data = conn.execute(_SQL_PACK_READ, (rowid,)).fetchone()
                    entries = _pack_rows(data)
                    mids = _mids(blob)  # the entries' mids, in order
                    size = len(data)
                else:
                    # the listing read it (a pack the load takes only part
                    # of): not read again
                    entries = _pack_rows(data)
                    mids = [r[0] for r in entries]
                    size = len(data)
                at = bisect.bisect_right(mids, after_mid)
                end = at + limit - len(rows)
                rows += entries[at:end]
                if rests is not None:
                    if end < len(entries):
                        # this load stops in the pack: the next one (from
                        # where the device's sync got to) starts in it
                        rests.keep(device_key, pack, after_mid, mids, entries, size)
                    else:
                        rests.drop(device_key)
                if len(rows) >= limit:
                    break
        finally:
            cur.close()  # a statement left open would hold the read snapshot
        rows += _load_shared(conn, device_key, after_mid, limit)
    finally:
        conn.execute("COMMIT")
    if not rows:
        return shared
    rows += shared
    rows.sort()
    del rows[limit:]
    return rows


def _load_shared(conn: sqlite3.Connection, device_key: int, after_mid: int,
                 limit: int) -> list:
    """The first ``limit`` shared messages past ``after_mid`` that ``device_key``'s
    shares list and are still stored (a listed mid may have expired).

    A device's shares of one transaction's spacks may interleave in mids: a
    share is read while its first could still be among the first ``limit``.
    """
    rows: list = []
    pending: list[tuple[int, int]] = []  # (mid, its spack) listed, not yet read
    cur = conn.execute(_SQL_LOAD_SHARES, (device_key, after_mid))
    try:
        nxt = cur.fetchone()
        while len(rows) < limit:
            need = limit - len(rows)
            while nxt is not None:
                if len(pending) >= need:
                    pending.sort()
                    if nxt[0] > pending[need - 1][0]:
                        break
                first = nxt[0]
                pending += [(m, first) for m in _mids(nxt[1]) if m > after_mid]
                nxt = cur.fetchone()
            if not pending:
                break
            pending.sort()
            take = pending[:need]
            del pending[:need]
            rows += _spack_rows(conn, take)
    finally:
        cur.close()
    return rows


def _spack_rows(conn: sqlite3.Connection, wanted: list[tuple[int, int]]) -> list:
    """The rows ``(mid, sender, cid, body, ts_ms)`` of the ``(mid, spack)`` pairs
    in ``wanted`` that are still stored, each spack read once."""
    by_spack: dict[int, set[int]] = {}
    for m, first in wanted:
        by_spack.setdefault(first, set()).add(m)
    rows: list = []
    for first, mids in by_spack.items():
        got = conn.execute(_SQL_SPACK_DATA, (first,)).fetchone()
        if got is not None:
            rows += [r for r in _pack_rows(got[0]) if r[0] in mids]
    return rows


def py_sql_rows(puts: list, mid: int, ttl_ms: int) -> tuple[list, list, list, list]:
    """The SQLite store's put loop: the rows of one transaction's new messages.

    ``puts``: the batch's put requests, whose messages' mids run from ``mid``
    on in order: lists of items ``(sender, cid, body, ts_ms, device_keys)``
    (:meth:`SqliteStore.put_many`), tuples flat ``device_keys, tail``
    a message, its DELIVER tail (:meth:`SqliteStore.put_tails`: the fields
    are read from the tail, :func:`fastroute.wire.tail_fields`), and
    :class:`CopyTails`, the same with a copy's DDELIVER tail
    (:meth:`SqliteStore.put_copies`, :func:`fastroute.wire.copy_tail_fields`).
    A message expires at ``ts_ms + ttl_ms``.
    Returns four flat lists (the rows go to SQLite many per statement):

    * ``spacks`` rows (first, last, n, nbytes, exp_ms, mids, lens, exps,
      devs, data), one per set of device keys (a tuple of them; the same keys
      in another order are another set) that messages for several devices
      went to, in the order of its first message: its messages' mids
      (int64s), body lengths (int32s), expiries (int64s), the set's distinct
      keys (int64s, in the set's order) and its entries as a pack's;
    * ``shares`` rows (dev, first, last, n, nbytes, exp_ms, mids), for each
      spack one per device of its set (a key named twice counts once), in
      the set's order: the spack's own columns, mids None (a device holds
      all of it);
    * ``packs`` rows (dev, first, last, n, nbytes, exp_ms, mids, data), one
      per device that messages for it alone went to, in the order of its
      first message: a pack's ``mids`` are native int64s, its ``data`` the
      msgpack array of its entries ``(mid, sender, cid, body, ts_ms,
      exp_ms)``: the columns :func:`_pack_fields` gives;
    * the shared messages' block, ``[(first, mids, counts, firsts, sizes)]``
      or ``[]``: their mids (int64s) and how many devices each went to
      (int32s), the spacks' firsts (int64s) and sizes (int32s): the counts
      the writer keeps in memory (``SqliteStore._counts``).

    The items are trusted (the store built or checked each): ``sender`` a
    str, ``cid`` and ``body`` bytes, ``ts_ms`` an int (``WrongType`` for
    another type, as the compiled twin, which writes them itself).
    """
    packs: dict = {}        # device key -> its entries, in mid order
    groups: dict = {}       # device keys (a tuple) -> [entries, distinct keys]
    block_mids = array.array("q")
    counts = array.array("i")
    for items in puts:
        if type(items) is tuple or type(items) is CopyTails:
            if len(items) % 2:
                raise InvalidArgument("a put of tails holds device keys, tail a message")
            # read as the loop goes (a bad tail fails where the compiled twin's does)
            items = tail_items(items) if type(items) is tuple else copy_items(items)
        elif type(items) is not list:
            raise WrongType("puts is a list of lists of items and tuples of tails")
        for sender, cid, body, ts, devs in items:
            if (type(sender) is not str or type(cid) is not bytes or type(body) is not bytes
                    or type(ts) is not int):
                raise WrongType("a put item is (str, bytes, bytes, int, device keys)")
            exp = ts + ttl_ms
            if not (_INT_MIN <= ts and exp <= _INT_MAX):
                raise OverflowError("ts_ms + ttl does not fit 64 bits")
            if len(devs) == 1:
                entries = packs.get(devs[0])
                if entries is None:
                    entries = packs[devs[0]] = []
                entries.append((mid, sender, cid, body, ts, exp))
            elif not devs:
                # nobody would ack it: it would sit on disk until it expires
                raise InvalidArgument("device_keys must not be empty")
            else:
                keys = devs if type(devs) is tuple else tuple(devs)
                group = groups.get(keys)
                if group is None:
                    group = groups[keys] = [[], list(dict.fromkeys(keys))]
                group[0].append((mid, sender, cid, body, ts, exp))
                block_mids.append(mid)
                counts.append(len(group[1]))
            mid += 1
    spack_rows: list = []
    share_rows: list = []
    firsts = array.array("q")
    sizes = array.array("i")
    for entries, keys in groups.values():
        row = _spack_row(entries[0][0], entries, keys)
        spack_rows += row
        share = row[:5] + (None,)  # first, last, n, nbytes, exp_ms; mids: all
        for key in keys:
            share_rows.append(key)
            share_rows += share
        firsts.append(row[0])
        sizes.append(row[2])
    pack_rows: list = []
    for key, entries in packs.items():
        pack_rows.append(key)
        pack_rows += _pack_fields(entries)
    blocks = [(firsts[0], block_mids.tobytes(), counts.tobytes(), firsts.tobytes(),
               sizes.tobytes())] if block_mids else []
    return spack_rows, share_rows, pack_rows, blocks


_sql_rows = twin(py_sql_rows)


def _pack_fields(entries: list) -> tuple:
    """A pack's columns after ``dev`` for ``entries`` (in mid order): first,
    last, n, nbytes, exp_ms, mids, data."""
    mids = array.array("q", [e[0] for e in entries])
    return (mids[0], mids[-1], len(entries), sum([len(e[3]) for e in entries]),
            min([e[5] for e in entries]), mids.tobytes(), msgpack.packb(entries))


def _spack_fields(first: int, entries: list) -> tuple:
    """A spack's columns for ``entries`` (in mid order) under the key ``first``:
    first, last, n, nbytes, exp_ms, mids, lens, exps, data (all but devs,
    which a rewrite keeps)."""
    fields = _pack_fields(entries)
    return ((first,) + fields[1:6] + (array.array("i", [len(e[3]) for e in entries]).tobytes(),
            array.array("q", [e[5] for e in entries]).tobytes(), fields[6]))


def _spack_row(first: int, entries: list, keys) -> tuple:
    """A new spack's row, as :data:`_SQL_PUT_SPACK` takes it: its columns for
    ``entries`` (:func:`_spack_fields`), devs (``keys``, the devices it goes
    to) before its data."""
    fields = _spack_fields(first, entries)
    return fields[:8] + (py_mids_blob(keys), fields[8])


def _pack_entries(data: bytes) -> list:
    """A pack's entries, ``(mid, sender, cid, body, ts_ms, exp_ms)`` tuples."""
    return msgpack.unpackb(data, use_list=False)


def py_pack_rows(data: bytes) -> list:
    """A pack's rows as a load returns them, ``(mid, sender, cid, body, ts_ms)``
    (a backlog's packs hold thousands: the compiled twin reads them with a C
    cursor, one tuple a row)."""
    return [e[:5] for e in _pack_entries(data)]


#: :func:`py_pack_rows`, compiled when the core is built
_pack_rows = twin(py_pack_rows)


def _keep_pack(conn: sqlite3.Connection, key: int, first: int, keep, count=None) -> int:
    """Rewrite the pack ``(key, first)`` with the entries ``keep`` accepts (delete
    it if none); return how many of the dropped entries ``count`` accepts (all
    without it).  The pack keeps its key: a device's packs stay in mid order."""
    row = conn.execute(_SQL_PACK_DATA, (key, first)).fetchone()
    if row is None:
        return 0
    kept: list = []
    dropped: list = []
    for e in _pack_entries(row[0]):
        (kept if keep(e) else dropped).append(e)
    if not dropped:
        return 0
    if kept:
        # the key stays; every other column describes what is left
        conn.execute(_SQL_PACK_KEEP, _pack_fields(kept)[1:] + (key, first))
    else:
        conn.execute(_SQL_PACK_DROP, (key, first))
    if count is None:
        return len(dropped)
    return sum(1 for e in dropped if count(e))


def _mids(blob: bytes) -> array.array:
    """A pack's or share's mids (native int64s)."""
    mids = array.array("q")
    mids.frombytes(blob)
    return mids


def _ack_rows(conn: sqlite3.Connection, acks: dict[int, list[int]], partial: dict,
              spartial: dict, release) -> dict[int, list[int]]:
    """Apply the devices' acks (``key -> mids``) to their packs and shares
    (rows listing mids); return, per device, the mids none of them holds.

    A row whose every mid is acked is deleted; one acked in part is noted in
    ``partial`` (a pack) or ``spartial`` (a share), rewritten later (see
    ``SqliteStore._partial``).  Each mid a share held and that was not acked
    before is passed on to ``release(first, mids)``.  A few statements for
    all the devices, whatever their number.
    """
    keys = [k for k, m in acks.items() if m]
    found_rows: dict[int, list] = {}
    at = 0
    for k in _chunks(len(keys)):
        args: list = []
        for key in keys[at:at + k]:
            lo, hi = _mid_span(acks[key])
            args += (key, hi, lo)
        for key, *row in conn.execute(_rows_sql(_SQL_ACK_ROWS, 3, k), args):
            found_rows.setdefault(key, []).append(row)
        at += k
    left: dict[int, list[int]] = {}
    drop: tuple[list, list] = ([], [])  # (dev, first) flat, of packs and of shares
    for key in keys:
        mids = acks[key]
        rows = found_rows.get(key)
        if rows is None:
            left[key] = mids
            continue
        # compiled when fastroute._core is: per acking device, per row
        out = _ack_device(key, mids, rows, partial, spartial, release, drop[0], drop[1])
        if out:
            left[key] = out
    for table, flat in zip(("packs", "shares"), drop):
        _execute_rows(conn, _SQL_ROWS_DROP.format(table, "{}"), 2, [], flat)
    return left


def py_ack_device(key: int, mids: list[int], rows: list, partial: dict, spartial: dict,
                  release, drop_packs: list, drop_shares: list) -> list[int]:
    """One device's ack (``mids``, ints) against its rows that the ack's range
    found, ``(shared, first, mids blob)`` each (a share if ``shared``, else a
    pack; the blob's int64s ascending); return the acked mids none of them
    holds (any order).

    A row whose every mid is now acked has ``key, first`` appended to
    ``drop_shares`` or ``drop_packs`` (and leaves ``spartial`` or
    ``partial``); a row acked in part gets the set of its acked mids there.
    Each mid a share held and that was not acked before is passed on to
    ``release(first, mids)``.
    """
    if len(rows) == 1:
        # the common case: the device acks one row's mids, all and in order
        shared, first, blob = rows[0]
        if (len(blob) == 8 * len(mids)
                and (key, first) not in (spartial if shared else partial)
                and blob == array.array("q", mids).tobytes()):
            (drop_shares if shared else drop_packs).extend((key, first))
            if shared:
                release(first, mids)
            return []
    acked = set(mids)
    found: set[int] = set()
    for shared, first, blob in rows:
        held = _mids(blob)
        hit = acked.intersection(held)
        if not hit:
            continue
        found |= hit
        noted = spartial if shared else partial
        before = noted.get((key, first))
        if shared:
            new = hit if before is None else hit - before
            if new:
                release(first, new)
        if before is not None:
            hit = before | hit
        if len(hit) == len(held):
            (drop_shares if shared else drop_packs).extend((key, first))
            noted.pop((key, first), None)
        else:
            noted[(key, first)] = hit
    if len(found) < len(acked):
        return [m for m in acked if m not in found]
    return []


#: :func:`py_ack_device`, compiled when the core is built
_ack_device = twin(py_ack_device)


class PySqlFast:
    """The SQLite writer's common transaction (specification of
    ``fastroute._core.SqlFast``, which runs it in one call that releases the
    GIL once): see :meth:`run`.  Made on the writer's thread for its
    connection ``conn`` (a ``sqlite3.Connection`` with ``isolation_level``
    None, on the file ``path``); used there only.
    """

    SQL_FIND = "SELECT mids FROM packs WHERE dev = ?1 AND first = ?2"
    # the general path's statements (a pack dropped by its key; one row of
    # new packs: its columns, in its order)
    SQL_DROP = _SQL_PACK_DROP
    SQL_PACK = _SQL_PUT_PACK + "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    SQL_MARK = "INSERT OR REPLACE INTO meta(k, v) VALUES ('next_mid', ?1)"
    # a device's share of a spack: its mids (NULL: all the spack holds), and
    # the share dropped by its key
    SQL_SFIND = ("SELECT " + _SHARE_MIDS.format("s") + " FROM shares s "
                 "WHERE s.dev = ?1 AND s.first = ?2")
    SQL_SDROP = "DELETE FROM shares WHERE dev = ?1 AND first = ?2"
    # one row of new spacks and of new shares (the general path's columns)
    SQL_SPACK = _SQL_PUT_SPACK + "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    SQL_SHARE = _SQL_PUT_SHARES + "(?1, ?2, ?3, ?4, ?5, ?6, ?7)"
    # shares SHARES_CHUNK a statement while that many are left: a statement a
    # row opens the table (and its index, in format 6) for each row, ~1 us
    # more a row for a large group's hundreds (measured in format 6)
    SHARES_CHUNK = 32
    SQL_SHARES = _rows_sql(_SQL_PUT_SHARES, 7, SHARES_CHUNK)
    # a spack no device holds anything of, by its key
    SQL_SPDROP = "DELETE FROM spacks WHERE first = ?1"

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        if type(conn) is not sqlite3.Connection:
            raise WrongType("conn is a sqlite3.Connection")
        try:
            name = conn.execute("PRAGMA database_list").fetchone()[2]
        except sqlite3.ProgrammingError:
            raise RuntimeError("the connection is closed") from None
        if not name or os.path.realpath(name) != os.path.realpath(path):
            raise RuntimeError("the connection is not on that file")
        self._conn: sqlite3.Connection | None = conn
        #: transactions :meth:`run` committed, and those it left open to the caller
        self.committed = 0
        self.handed_back = 0

    def hold_checkpoints(self) -> bool:
        """Take SQLite's automatic checkpoint out of the connection's commits,
        to be run by the caller (:meth:`checkpoint`) once :attr:`wal_frames`
        reaches SQLite's mark; True if done.

        SQLite runs it inside the commit that brings the WAL to 1,000 frames,
        so a transaction somebody waits on takes a checkpoint's copy and
        syncs with it.  The compiled twin replaces SQLite's WAL hook (which
        runs it) with one that only notes the WAL's frames after each commit.
        The sqlite3 module has no such hook: here nothing changes and this
        returns False (SQLite keeps checkpointing in the commits).
        """
        return False

    @property
    def wal_frames(self) -> int:
        """Frames in the WAL at the last commit since the last
        :meth:`checkpoint` (0: none since), while checkpoints are held; here
        always 0."""
        return 0

    def checkpoint(self) -> tuple[int, int]:
        """Run a PASSIVE checkpoint: copy what the WAL holds into the
        database as far as no reader's snapshot needs it, without waiting for
        one.  Returns ``(frames in the WAL, frames copied)``."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("closed")
        _, log, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return log, copied

    def close(self) -> None:
        """Let the connection go; :meth:`run` raises after this."""
        self._conn = None

    def run(self, drops: list, pack_rows: list, mark: int, begin: bool,
            commit: bool, spack_rows: list | None = None,
            share_rows: list | None = None, spack_drops: list | None = None,
            shares: list | None = None,
            release: tuple | None = None) -> list[tuple[int, int]]:
        """BEGIN (when ``begin``); apply ``drops``, flat ``key, mids blob``
        pairs (a device's acked mids, int64s); then, if every drop was
        applied whole and no share deleted (see below), delete the spacks
        keyed by ``spack_drops`` (ints), insert ``spack_rows``,
        ``share_rows`` and ``pack_rows`` (flat, :func:`py_sql_rows`' layout),
        set meta's ``next_mid`` to ``mark`` unless it is negative, and COMMIT
        (when ``commit``).

        A drop's mids are walked pack by pack: while the device has a pack
        whose first mid is the next acked one and whose mids all come next,
        in order, that pack is deleted.  With ``shares`` (a list), the walk
        takes the device's shares as it takes packs, one row at a time of
        either kind, and appends each share it deleted to ``shares`` as
        ``index, first, n`` (the drop's index, the share's key, its mids).
        Returns ``(index, matched)`` for each drop that stopped short,
        ``matched`` the mids it applied.  When one did, or a share was
        deleted, nothing after the drops was done, and the transaction is
        left open for the caller to apply the rest (the shares' counts
        first) and finish (as it is when ``commit`` is false).

        With ``release``, ``(counts, keys, acks, gone)``, shares deleted by
        drops that were all applied whole do not hand the transaction back:
        their messages are released in ``counts`` as
        :func:`py_release_walked` releases them, reading each device's mids
        from its drop (``walked`` the shares
        deleted, as appended to ``shares``; ``keys`` the drops' device keys
        by index, ``acks`` the mids the drops came from, ``gone`` the dict
        that takes the mids no device holds now, by spack), the spacks in
        ``gone`` none of whose messages a device holds now are deleted with
        ``spack_drops``, and the rest is done: a group's steady state in one
        call.  A value of the wrong type raises before anything is written;
        an SQLite error, or an error of the release, rolls the transaction
        back and raises.
        """
        conn = self._conn
        if conn is None:
            raise RuntimeError("closed")
        spack_rows = [] if spack_rows is None else spack_rows
        share_rows = [] if share_rows is None else share_rows
        spack_drops = [] if spack_drops is None else spack_drops
        if len(drops) % 2 or len(pack_rows) % 8 or len(spack_rows) % 10 or len(share_rows) % 7:
            raise InvalidArgument("drops are pairs and pack, spack and share rows have "
                                  "8, 10 and 7 columns")
        if shares is not None and type(shares) is not list:
            raise WrongType("shares is a list")
        if release is not None:
            if type(release) is not tuple:
                raise WrongType("release is a tuple")
            if shares is None:
                raise InvalidArgument("a release needs the shares list")
            if (len(release) != 4 or type(release[1]) is not list
                    or type(release[2]) is not dict or type(release[3]) is not dict):
                raise WrongType("release is (counts, keys list, acks dict, gone dict)")
        pairs = [(drops[i], drops[i + 1]) for i in range(0, len(drops), 2)]
        rows = [tuple(pack_rows[i:i + 8]) for i in range(0, len(pack_rows), 8)]
        spacks = [tuple(spack_rows[i:i + 10]) for i in range(0, len(spack_rows), 10)]
        share_list = [tuple(share_rows[i:i + 7]) for i in range(0, len(share_rows), 7)]
        for row, nints in ([(p, 1) for p in pairs] + [(r, 5) for r in spacks]
                           + [(r[:6] if r[6] is None else r, 6) for r in share_list]
                           + [(r, 6) for r in rows]):
            array.array("q", row[:nints])  # int64s, or TypeError / OverflowError
            if any(type(blob) is not bytes for blob in row[nints:]):
                raise WrongType("a blob column is bytes")
        array.array("q", spack_drops)
        if any(len(blob) % 8 for _, blob in pairs):
            raise InvalidArgument("a drop's mids are int64s")
        kinds = [(self.SQL_FIND, self.SQL_DROP)]
        if shares is not None:
            kinds.append((self.SQL_SFIND, self.SQL_SDROP))
        missed = []
        done: list[int] = []
        try:
            if begin:
                conn.execute("BEGIN")
            # the acks first: the pages their deletes free (zeroed) are the
            # ones the new rows then take, written to the WAL once
            for i, (key, blob) in enumerate(pairs):
                # the rows of the last kind are recorded: shares, when walked
                at = self._walk(conn, kinds, key, blob, done if shares is not None else [], i)
                if at < len(blob):
                    missed.append((i, at // 8))
            released = bool(not missed and done and release is not None)
            if released:
                counts, keys, acks, gone = release
                py_release_walked(counts, done, keys, acks, gone, drops)
                spack_drops = [*spack_drops, *(f for f in gone if not counts.left(f))]
            if not missed and (not done or released):
                conn.executemany(self.SQL_SPDROP, [(first,) for first in spack_drops])
                conn.executemany(self.SQL_SPACK, spacks)
                whole = len(share_list) - len(share_list) % self.SHARES_CHUNK
                for i in range(0, whole, self.SHARES_CHUNK):
                    conn.execute(self.SQL_SHARES,
                                 [v for r in share_list[i:i + self.SHARES_CHUNK] for v in r])
                conn.executemany(self.SQL_SHARE, share_list[whole:])
                conn.executemany(self.SQL_PACK, rows)
                if mark >= 0:
                    conn.execute(self.SQL_MARK, (mark,))
                if commit:
                    conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if shares is not None:
            shares += done
        if commit and not missed and (not done or released):
            self.committed += 1
        else:
            self.handed_back += 1
        return missed

    def drop_shares(self, drops: list) -> list[int]:
        """Apply ``drops``, flat ``key, mids blob`` pairs (a device's acked
        mids, int64s), to the devices' shares, inside the caller's open
        transaction.

        A drop's mids are walked share by share, as :meth:`run` walks packs:
        while the device has a share keyed by the next acked mid whose mids
        (its spack's, when it lists none) all come next, in order, that
        share is deleted.  Returns the shares deleted, in order, flat
        ``index, first, n`` (the drop's index, the share's key, its mids) as
        :meth:`run` records them: the caller releases their messages' counts
        and applies the rest of the drops' mids.  A value of the wrong type
        raises before anything is written; an SQLite error raises, and the
        caller rolls back.
        """
        conn = self._conn
        if conn is None:
            raise RuntimeError("closed")
        if len(drops) % 2:
            raise InvalidArgument("drops are pairs")
        pairs = [(drops[i], drops[i + 1]) for i in range(0, len(drops), 2)]
        for key, blob in pairs:
            array.array("q", [key])  # an int64, or TypeError / OverflowError
            if type(blob) is not bytes:
                raise WrongType("a blob column is bytes")
            if len(blob) % 8:
                raise InvalidArgument("a drop's mids are int64s")
        if not conn.in_transaction:
            raise InvalidArgument("drop_shares runs inside a transaction")
        done: list[int] = []
        for i, (key, blob) in enumerate(pairs):
            self._walk(conn, [(self.SQL_SFIND, self.SQL_SDROP)], key, blob, done, i)
        return done

    @staticmethod
    def _walk(conn: sqlite3.Connection, kinds: list, key: int, blob: bytes, done: list,
              index: int) -> int:
        """One device's acked mids (``blob``) walked row by row, through the
        kinds of row that ``kinds`` find and drop (``(find, drop)``
        statements: packs, then shares): while the device has a row of one
        of them keyed by the next acked mid whose whole int64s all come
        next, in order, that row is deleted; each row of the last kind
        deleted appends ``index, first, n`` to ``done``.  Returns the bytes
        of ``blob`` applied."""
        at = 0
        while at < len(blob):
            first = int.from_bytes(blob[at:at + 8], sys.byteorder, signed=True)
            held = b""
            kind = 0
            while not held and kind < len(kinds):
                row = conn.execute(kinds[kind][0], (key, first)).fetchone()
                if (row is not None and row[0] and not len(row[0]) % 8
                        and row[0] == blob[at:at + len(row[0])]):
                    held = row[0]
                else:
                    kind += 1
            if not held:
                break  # not this ack's next mids: the rest waits
            conn.execute(kinds[kind][1], (key, first))
            if kind == len(kinds) - 1:
                done += (index, first, len(held) // 8)
            at += len(held)
        return at


#: The writer's common transaction: :class:`PySqlFast`'s compiled twin.
#: Without the core, None: the specification would save nothing over the
#: general path (it is the GIL's hand-offs around each statement that the
#: twin saves), so every transaction takes that path.
_SqlFast: type[PySqlFast] | None = twin(PySqlFast)
if _SqlFast is PySqlFast:
    _SqlFast = None


def py_wal_vfs() -> str | None:
    """The SQLite VFS the writer opens its file with, by name; None: SQLite's
    default, which writes each WAL frame as two calls (its header, then its
    page), so a commit of n pages as 2n calls.

    The compiled twin registers a VFS that gathers a commit's frames and
    writes them in one call (up to 128 KB a call), and gives its name
    (``ext/fastroute/_walvfs.pxi``): the same bytes, at the same offsets, in
    the file before the commit returns.  On the benches' host a write call
    to an ext4 file cost ~4.5 us of CPU whatever its size: a probe of a
    group commit's 7 frames took ~75 us in writes, ~17 gathered
    (benches/README.md, session 55).  It also empties a WAL in place: where
    ``wal_checkpoint(TRUNCATE)`` cuts it to nothing here, it overwrites its
    first 16 MB with zeroes (synced) and cuts only what lies past them, so
    the commits after an erasing checkpoint overwrite blocks the file has
    instead of extending it, whose sync also writes the file's new size and
    blocks (at a light load, every commit from one erasing checkpoint to the
    next: benches/wal_erase.py, benches/README.md session 62).
    """
    return None


_wal_vfs = twin(py_wal_vfs)


def _writer_target(path: str, vfs: str | None) -> tuple[str, bool]:
    """What ``sqlite3.connect`` opens for the writer, and whether it is a URI:
    ``path`` itself with SQLite's default VFS (``vfs`` None), or a ``file:``
    URI naming ``vfs`` (the path percent-encoded: ``?``, ``#`` and ``%`` are
    a URI's).  The writer passes :func:`py_wal_vfs`'s twin's name."""
    if vfs is None:
        return path, False
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?vfs={vfs}", True


def py_mid_span(mids) -> tuple[int, int]:
    """The least and the greatest of ``mids`` (a non-empty sequence of ints)."""
    return min(mids), max(mids)


#: :func:`py_mid_span`, compiled when the core is built (it reads the ints
#: without writing their reference counts from the writer's thread)
_mid_span = twin(py_mid_span)


def py_mids_blob(mids) -> bytes:
    """``mids`` (ints) as native int64s, the blob a compiled walk takes for a
    device's acks.  OverflowError: one does not fit 64 bits; TypeError: one
    is not an int."""
    return array.array("q", mids).tobytes()


#: :func:`py_mids_blob`, compiled when the core is built (as :data:`_mid_span`)
_mids_blob = twin(py_mids_blob)


def _keep_share(conn: sqlite3.Connection, key: int, first: int, acked, gone=()) -> None:
    """Rewrite the share ``(key, first)`` without the mids in ``acked``, those in
    ``gone`` (no device holds them) and those its spack no longer holds;
    delete it if none is left."""
    row = conn.execute("SELECT mids FROM shares WHERE dev = ? AND first = ?",
                       (key, first)).fetchone()
    if row is None:
        return
    meta = conn.execute(_SQL_SPACK_META, (first,)).fetchone()
    left: list = []
    if meta is not None:
        lens = array.array("i")
        lens.frombytes(meta[1])
        stored = {m: (n, e) for m, n, e in zip(_mids(meta[0]), lens, _mids(meta[2]))}
        # NULL: all the spack holds
        left = [(m, *stored[m]) for m in _mids(meta[0] if row[0] is None else row[0])
                if m in stored and m not in acked and m not in gone]
    if not left:
        conn.execute("DELETE FROM shares WHERE dev = ? AND first = ?", (key, first))
        return
    mids = array.array("q", [r[0] for r in left])
    conn.execute("UPDATE shares SET last = ?, n = ?, nbytes = ?, exp_ms = ?, mids = ? "
                 "WHERE dev = ? AND first = ?",
                 (mids[-1], len(mids), sum([r[1] for r in left]),
                  min([r[2] for r in left]), mids.tobytes(), key, first))


def _keep_spack(conn: sqlite3.Connection, first: int, keep) -> int:
    """Rewrite the spack ``first`` with the entries ``keep`` accepts (delete it
    if none); return how many it dropped.  It keeps its key: its shares name
    it by that."""
    row = conn.execute(_SQL_SPACK_DATA, (first,)).fetchone()
    if row is None:
        return 0
    entries = _pack_entries(row[0])
    kept = [e for e in entries if keep(e)]
    if len(kept) < len(entries):
        if kept:
            conn.execute(_SQL_SPACK_KEEP, _spack_fields(first, kept)[1:] + (first,))
        else:
            conn.execute("DELETE FROM spacks WHERE first = ?", (first,))
    return len(entries) - len(kept)


def _prune_shares(conn: sqlite3.Connection) -> tuple[dict[int, dict[int, int]],
                                                     dict[int, int]]:
    """Take the mids of messages no longer stored out of every share, and
    the messages no share lists out of every spack (on open, and after an
    erasure with the relay stopped).  Returns, for each spack still stored,
    how many shares list each of its messages; and each spack's exp_ms as
    read before the pruning (a bound on its earliest expiry: a rewrite here
    only takes messages out, so it can only raise it)."""
    stored: dict[int, set[int]] = {}
    exps: dict[int, int] = {}
    for first, blob, exp in conn.execute("SELECT first, mids, exp_ms FROM spacks"):
        stored[first] = set(_mids(blob))
        exps[first] = exp
    tally: dict[int, dict[int, int]] = {}
    stale: list[tuple[int, int]] = []
    for dev, first, blob, n in conn.execute("SELECT dev, first, mids, n FROM shares"):
        have = stored.get(first, ())
        held = tally.setdefault(first, {})
        if blob is None:
            # all its spack holds: n says what that was when it was written
            for m in have:
                held[m] = held.get(m, 0) + 1
            if n != len(have):
                stale.append((dev, first))
            continue
        for m in _mids(blob):
            if m in have:
                held[m] = held.get(m, 0) + 1
            elif not stale or stale[-1] != (dev, first):
                stale.append((dev, first))
    for dev, first in stale:
        _keep_share(conn, dev, first, ())
    dead = []
    for first, mids in stored.items():
        held = tally.get(first)
        if not held:
            dead.append(first)
        elif len(held) < len(mids):
            _keep_spack(conn, first, lambda e: e[0] in held)
    _execute_in(conn, _SQL_SPACK_DROP, [], dead)
    return {first: held for first, held in tally.items() if held}, exps


class _Counts:
    """How many devices still hold each shared message: the SqliteStore
    writer's, kept in memory (the ``shares`` rows say it too, but only a
    scan of them would).

    ``blocks`` maps a block's first mid (a transaction's first shared mid)
    to ``[mids, counts, live, firsts, sizes]``: its shared mids (array of
    int64, ascending), how many devices hold each (array of int32), how many
    are held at all, its spacks' firsts (int64s, ascending) and how many of
    each spack's messages are held (int32s): about 12 bytes a message.
    ``exps`` maps a block's first mid to a bound on each of its spacks'
    earliest expiry (int64s, as its firsts; at or below the spack's exp_ms,
    which a rewrite may raise): what expiry finds the spacks by.  A
    share lists messages of its own spack only, so what a device releases
    is taken off that spack's size.  Changes inside a
    transaction are undone by :meth:`rollback` (each touched block's counts
    copied once a transaction, not a journal entry per message).
    """

    # a block rebuilt on open holds at least this many messages (a block's
    # counts are copied whole by the first change of a transaction)
    LOADED_BLOCK = 1024

    def __init__(self) -> None:
        self.blocks: dict[int, list] = {}
        self._firsts: list[int] = []  # the blocks' keys, ascending
        self._saved: dict[int, tuple] = {}  # first -> (block, counts, live, sizes) before
        self._added: list[int] = []
        self.exps: dict[int, array.array] = {}
        self._exps_saved: dict[int, array.array] = {}  # first -> its exps before

    def __len__(self) -> int:
        """Shared messages some device still holds."""
        return sum(b[2] for b in self.blocks.values())

    def load(self, conn: sqlite3.Connection) -> None:
        """Count from the file (on open), pruned first (:func:`_prune_shares`:
        a share listing messages no longer stored is rewritten without them,
        a spack's messages no share lists, none should be, are deleted)."""
        conn.execute("BEGIN")
        tally, exp_of = _prune_shares(conn)
        conn.execute("COMMIT")
        self.blocks = {}
        self._firsts = []
        self.exps = {}
        spacks = sorted(tally)
        at = 0
        while at < len(spacks):
            # spacks in key order, a block of whole spacks: a spack's key
            # finds its block (the last block key at or below it)
            rows: list = []
            firsts = array.array("q")
            sizes = array.array("i")
            while at < len(spacks) and len(rows) < self.LOADED_BLOCK:
                held = tally[spacks[at]]
                rows += held.items()
                firsts.append(spacks[at])
                sizes.append(len(held))
                at += 1
            rows.sort()
            self.blocks[firsts[0]] = [array.array("q", [r[0] for r in rows]),
                                      array.array("i", [r[1] for r in rows]), len(rows),
                                      firsts, sizes]
            self.exps[firsts[0]] = array.array("q", [exp_of[f] for f in firsts])
            self._firsts.append(firsts[0])

    def begin(self) -> None:
        """A transaction starts: what follows is undone by :meth:`rollback`."""
        self._saved = {}
        self._added = []
        self._exps_saved = {}

    def commit(self) -> None:
        """The transaction committed: blocks no device holds anything of go."""
        blocks = self.blocks
        for first in [*self._saved, *self._added]:
            block = blocks.get(first)
            if block is not None and block[2] == 0:
                del blocks[first]
                del self.exps[first]
                at = bisect.bisect_left(self._firsts, first)
                del self._firsts[at]
        self._saved = {}
        self._added = []
        self._exps_saved = {}

    def rollback(self) -> None:
        """The transaction rolled back: the counts are as at :meth:`begin`."""
        for first in reversed(self._added):
            self.blocks.pop(first, None)
            self.exps.pop(first, None)
            self._firsts.pop()  # added last, in order
        for block, counts, live, sizes in self._saved.values():
            block[1] = counts
            block[2] = live
            block[4] = sizes
        for first, exps in self._exps_saved.items():
            if first in self.exps:
                self.exps[first] = exps
        self._saved = {}
        self._added = []
        self._exps_saved = {}

    def add(self, first: int, mids: bytes, counts: bytes, firsts: bytes,
            sizes: bytes, exps: list[int]) -> None:
        """A transaction's shared messages (:func:`py_sql_rows`' block), and
        its spacks' earliest expiries (their rows' exp_ms, in order)."""
        block = [_mids(mids), array.array("i"), 0, _mids(firsts), array.array("i")]
        block[1].frombytes(counts)
        block[2] = len(block[1])
        block[4].frombytes(sizes)
        self.blocks[first] = block
        self.exps[first] = array.array("q", exps)
        self._firsts.append(first)
        self._added.append(first)

    def release(self, spack: int, mids: Iterable[int]) -> list[int]:
        """One device no longer holds ``mids`` (of spack ``spack``); return
        those no device holds any more."""
        found = self._find(spack)
        if found is None:
            return []
        block, at = found
        gone = _shares_release(block[0], block[1], mids)
        block[2] -= len(gone)
        block[4][at] -= len(gone)
        return gone

    def drop(self, spack: int, mids: list[int]) -> int:
        """``mids`` of spack ``spack`` are deleted (expired): no device holds
        them; return how many some device held."""
        found = self._find(spack)
        if found is None:
            return 0
        block, at = found
        have, counts = block[0], block[1]
        n = 0
        for m in mids:
            i = bisect.bisect_left(have, m)
            if i < len(have) and have[i] == m and counts[i] > 0:
                counts[i] = 0
                n += 1
        block[2] -= n
        block[4][at] -= n
        return n

    def expiring(self, now_ms: int, bound: int) -> list[int]:
        """The spacks below ``bound`` some device holds anything of whose
        bound on the earliest expiry is at or below ``now_ms``: every spack
        that may hold a message expired by then (and some rewritten since)."""
        out: list[int] = []
        for first, exps in self.exps.items():
            if min(exps) > now_ms:
                continue
            block = self.blocks[first]
            firsts, sizes = block[3], block[4]
            out += [firsts[i] for i, e in enumerate(exps)
                    if e <= now_ms and firsts[i] < bound and sizes[i] > 0]
        return out

    def expires(self, spack: int, exp_ms: int) -> None:
        """Spack ``spack``'s earliest expiry is now ``exp_ms`` (a rewrite took
        its earlier messages)."""
        found = self._locate(spack)
        if found is not None:
            first, _, at = found
            if first not in self._exps_saved and first not in self._added:
                self._exps_saved[first] = array.array("q", self.exps[first])
            self.exps[first][at] = exp_ms

    def left(self, spack: int) -> int:
        """How many of spack ``spack``'s messages some device holds."""
        found = self._locate(spack)
        return 0 if found is None else found[1][4][found[2]]

    def _locate(self, spack: int) -> tuple[int, list, int] | None:
        """Spack ``spack``'s block (its key and itself) and its number in it."""
        firsts = self._firsts
        if not firsts or spack < firsts[0]:
            return None
        first = firsts[bisect.bisect_right(firsts, spack) - 1]
        block = self.blocks[first]
        at = bisect.bisect_left(block[3], spack)
        if at == len(block[3]) or block[3][at] != spack:
            return None
        return first, block, at

    def _find(self, spack: int) -> tuple[list, int] | None:
        """Spack ``spack``'s block, its counts saved for a rollback (once a
        transaction), and the spack's number in it."""
        found = self._locate(spack)
        if found is None:
            return None
        first, block, at = found
        if first not in self._saved and first not in self._added:
            self._saved[first] = (block, array.array("i", block[1]), block[2],
                                  array.array("i", block[4]))
        return block, at


def py_shares_release(have: array.array, counts: array.array, mids: Iterable[int]) -> list[int]:
    """One device no longer holds ``mids``: one off the count in ``counts``
    (int32s) of each in ``have`` (ascending int64s, the counts' mids); return
    those no device holds any more.  A mid not in ``have``, or already held by
    none, is ignored."""
    if have.typecode != "q" or counts.typecode != "i" or len(have) != len(counts):
        raise WrongType("have is an int64 array, counts an int32 array as long")
    end = len(have)
    gone = []
    for m in mids:
        if not isinstance(m, int):
            raise TypeError("a mid is an int")
        i = bisect.bisect_left(have, m)
        if i < end and have[i] == m:
            n = counts[i]
            if n > 0:
                counts[i] = n - 1
                if n == 1:
                    gone.append(m)
    return gone


_shares_release = twin(py_shares_release)


def py_release_walked(counts: _Counts, walked: list, keys: list, acks: dict,
                      gone: dict, drops: list | None = None) -> dict[int, int]:
    """Release in ``counts`` the messages of the shares a compiled walk
    deleted: ``walked`` flat ``index, first, n`` as :meth:`PySqlFast.run`
    gives them (``index`` the drop's, its device key in ``keys``; ``first``
    the share's spack), each share's mids the next ``n`` of that device's
    acks (``acks``: key -> list of mids).  The mids no device holds any more
    are appended to ``gone`` (spack -> list).  Returns, by drop index, where
    its last share's mids end in its acks.

    Compiled, the acked mids are read in place (the loop's thread made those
    ints and frees them: a slice of them would write each one's reference
    count from the writer's core) and a group commit's ten devices cost one
    call instead of a dozen each.

    ``drops``: the walk's own input, :func:`py_ack_drops`' flat ``key, mids
    blob`` pairs in the order of ``keys``; a device's mids are then read
    from its blob (the same mids as its acks, as int64s) instead of its
    acks' ints."""
    ends: dict[int, int] = {}
    at = 0
    last = -1
    for i in range(0, len(walked), 3):
        index, first, n = walked[i], walked[i + 1], walked[i + 2]
        if n < 0:
            raise InvalidArgument("a share has no negative number of mids")
        if index != last:
            last = index
            if drops is None:
                mids = acks[keys[index]]
            else:
                blob = drops[2 * index + 1]
                if type(blob) is not bytes or len(blob) % 8:
                    raise InvalidArgument("a drop's mids are int64s")
                mids = array.array("q")
                mids.frombytes(blob)
            at = 0
        if mids[at] != first:
            # whole packs walked before it: their mids are not in walked,
            # and none of them is this share's first
            at = mids.index(first, at)
        out = counts.release(first, mids[at:at + n])
        if out:
            gone.setdefault(first, []).extend(out)
        at += n
        ends[index] = at
    return ends


_release_walked = twin(py_release_walked)


def _settle_gone(counts: _Counts, gone: dict, sgone: dict, dead: list) -> None:
    """The spacks of ``gone`` (spack -> its mids no device holds now): one
    none of whose messages any device holds is appended to ``dead`` (to be
    deleted now); one with some still held keeps those mids in ``sgone``, to
    be rewritten later (as a pack acked in part), unless the rest goes
    first."""
    for first, mids in gone.items():
        if counts.left(first):
            sgone[first] = sgone.get(first, frozenset()).union(mids)
        else:
            dead.append(first)
            sgone.pop(first, None)


# Callbacks run on the event loop thread (posted by the writer).

def _settle_one(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


def _settle_all(pairs: list[tuple], held: list) -> None:
    for fut, result in pairs:
        if not fut.done():
            # a put_many's mids come as a range: their ints are made on the
            # thread that uses and frees them (see SqliteStore._writer_main)
            fut.set_result(list(result) if type(result) is range else result)
    held.clear()  # the batch's last reference: freed on this thread


def _fail_all(futs: Iterable[asyncio.Future], reason: str) -> None:
    for fut in futs:
        if not fut.done():
            # one exception object per waiter: a shared one would collect
            # every awaiting task's traceback
            fut.set_exception(_store_error(reason))


# -- MemoryStore's per-message loops: the specifications of _store.pxi's twins --


class PyInbox(dict):
    """One device's inbox in the memory store: ``mid -> (sender, id, body,
    ts_ms, device_keys)``, the put's item (or ``mid -> (mid, tail)``, the
    relay's route, from ``MemoryStore.put_now``), in mid order (a store's
    mids only grow).

    The specification of the compiled :class:`Inbox`, which answers the dict
    methods the store uses (``len``, ``in``, iteration over the mids,
    ``keys``, ``values``, ``items``, ``get``, ``pop``, ``[]``, ``del`` and
    ``clear``) from two arrays in mid order instead of a hash table: a put
    appends, an ack of the oldest entry moves its start.  The compiled one's
    ``keys``, ``values`` and ``items`` are lists, its keys ints, and it holds
    no None.
    """

    __slots__ = ()


def py_mem_put(items: list, left: dict, inbox: dict, first: int, mids: list,
               each: bool = True, routes: bool = False) -> None:
    """MemoryStore's put loop: store ``(sender, id, body, ts_ms, device_keys)``
    items from mid ``first`` on, appending each mid to ``mids`` once stored
    (an item for no device is refused, as a validated put refuses it: every
    stored message is in some inbox, which acks or expiry empty).  With
    ``each`` false, ``mids`` gets one int instead: how many were stored,
    after an exception too.

    Each device's inbox gets ``mid -> (sender, id, body, ts_ms, device_keys)``,
    the item itself (a tuple copy of one that is not exactly a tuple), shared
    by the message's inboxes, not a tuple of its own (the store expires a
    message by its stamp: ``MemoryStore.expire``).  ``left`` holds the number
    of inboxes holding a message when it is more than one (most messages are
    for one device: their one ack deletes them).

    With ``routes``, ``items`` is flat, ``device_keys, route`` a message
    (``MemoryStore.put_now``): the route the relay made for it, a routed tail
    (:func:`~fastroute.wire.routed_tail`) or ``(mid, tail)``, ``tail`` the
    DELIVER tail, is what the inboxes hold, and its mid must be the one it is
    stored at.  A per-device copy's route is ``(mid, tail, head)``, its head
    :data:`~fastroute.wire.DDELIVER_HEAD` and its tail the DDELIVER tail
    (:func:`~fastroute.wire.copy_tail_fields`).
    """
    mid = first
    if routes and len(items) % 2:
        raise InvalidArgument("routes hold device_keys, (mid, tail) for each message")
    try:
        for k in range(len(items) // 2 if routes else len(items)):
            if routes:
                devs, msg = items[2 * k], items[2 * k + 1]
                if is_routed(msg):
                    at = route_parts(msg)[0]
                elif (type(msg) is not tuple or not 2 <= len(msg) <= 3
                        or type(msg[0]) is not int or type(msg[1]) is not bytes
                        or (len(msg) == 3 and msg[2] != DDELIVER_HEAD)):
                    raise InvalidArgument("a route is a routed tail, (mid, tail bytes) or a "
                                          "copy's (mid, tail bytes, DDELIVER head)")
                else:
                    at = msg[0]
                if at != mid:
                    raise InvalidArgument("a route's mid is not the one it is stored at")
            else:
                item = items[k]
                sender, cid, body, ts, devs = item
                msg = item if type(item) is tuple else (sender, cid, body, ts, devs)
            if not devs:
                raise InvalidArgument("device_keys must not be empty")
            if len(devs) > 1:
                left[mid] = len(devs)
            for d in devs:
                box = inbox.get(d)
                if box is None:
                    box = inbox[d] = PyInbox()
                box[mid] = msg
            if each:
                mids.append(mid)
            mid += 1
    finally:
        if not each:
            mids.append(mid - first)


def py_mem_load(box: dict, after_mid: int, limit: int) -> list:
    """MemoryStore's load loop: up to ``limit`` rows ``(mid, sender, id, body,
    ts_ms)`` of one device's inbox ``box`` with mid > ``after_mid``, in order."""
    out: list = []
    if limit <= 0:
        return out
    for m, msg in box.items():
        if m > after_mid:
            out.append((m, *_stored_fields(msg)))
            if len(out) >= limit:
                break
    return out


def _stored_fields(msg: tuple) -> tuple:
    """``(sender, id, body, ts_ms)`` of what a memory-store inbox holds: a
    put's item, or a route, a routed tail, ``(mid, tail)`` or a copy's
    ``(mid, tail, head)`` (:meth:`MemoryStore.put_now`)."""
    if is_routed(msg):
        return tail_fields(route_parts(msg)[1])
    if type(msg) is tuple and len(msg) == 5:
        return msg[:4]
    if type(msg) is tuple and len(msg) == 2:
        return tail_fields(msg[1])
    if type(msg) is tuple and len(msg) == 3:
        return copy_tail_fields(msg[1])
    raise WrongType("an inbox holds (sender, id, body, ts_ms, device_keys) items "
                    "or routes: routed tails, (mid, tail[, head])")


def py_mem_ack(box: dict, left: dict, mids) -> int:
    """MemoryStore's ack loop: drop ``mids`` from one device's inbox ``box``;
    returns how many messages no inbox holds any more (they are gone)."""
    gone = 0
    for m in mids:
        if box.pop(m, None) is not None:  # present, not a repeat
            gone += _unref(left, m)
    return gone


def _unref(left: dict, mid: int) -> int:
    """One inbox less holds ``mid``: 1 if it was the last one."""
    n = left.get(mid)
    if n is None:
        return 1
    if n == 2:
        del left[mid]  # one inbox left: no entry
    else:
        left[mid] = n - 1
    return 0


Inbox = twin(PyInbox)
_mem_put = twin(py_mem_put)
_mem_load = twin(py_mem_load)
_mem_ack = twin(py_mem_ack)


class MemoryStore(_BaseStore):
    """The :class:`SqliteStore` API in process memory, **without durability**.

    Everything is lost when the process ends, so a relay using it acks
    senders for messages a crash would lose.  Meant for benchmarks, tests and
    embedders who make that choice knowingly.  Futures from :meth:`put` are
    already resolved when returned; ``commits`` stays 0.
    """

    #: every message is held in RAM (the relay's mailboxes then hold a slow
    #: device's messages too, bounded by its memory budget alone:
    #: ``RelayConfig.mailbox_queue_capacity``)
    in_memory = True

    def __init__(self, loop, ttl_s: int) -> None:
        super().__init__(loop, ttl_s)
        # device_key -> its Inbox, mid -> (sender, cid, body, ts_ms, device_keys)
        # or a route (a routed tail or (mid, tail)) in mid order (the put's
        # item or put_now's route, shared by a message's inboxes), mid -> inboxes
        # holding it for the messages more than one inbox holds, and how many
        # messages some inbox holds
        self._inbox: dict[int, PyInbox] = {}
        self._left: PyInbox = Inbox()  # mids only grow here too
        self._messages = 0
        self._next_mid = 1
        #: Always 0: nothing is ever committed anywhere.
        self.commits = 0

    @classmethod
    async def open(cls, path: str | os.PathLike | None = None, *,
                   synchronous: str = "FULL", max_batch: int = 4096,
                   ttl_s: int = DEFAULT_TTL_S) -> "MemoryStore":
        """Create an empty store.  ``path``, ``synchronous`` and
        ``max_batch`` are accepted for API compatibility and ignored."""
        ttl_s = _check_sql_int(ttl_s, "ttl_s", 1)
        return cls(asyncio.get_running_loop(), ttl_s)

    async def close(self) -> None:
        """Mark the store closed and drop its contents."""
        self._closed = True
        self._left.clear()
        self._inbox.clear()
        self._messages = 0

    def put(self, sender: str, cid: bytes, body: bytes, ts_ms: int,
            device_keys: Sequence[int]) -> asyncio.Future[int]:
        """Store one message; the returned future is already resolved."""
        self._check_open()
        fut = self._loop.create_future()
        fut.set_result(self._store_trusted([self._check_put(sender, cid, body, ts_ms,
                                                             device_keys)])[0])
        return fut

    def put_many(self, items: Sequence[PutItem], *,
                 validate: bool = True) -> asyncio.Future[list[int]]:
        """Store several messages; the returned future is already resolved."""
        self._check_open()
        if validate:
            mids = self._store_trusted(self._check_many(items, True))
        else:
            mids = self._store_trusted(items)
        fut = self._loop.create_future()
        fut.set_result(mids)
        return fut

    def put_tails(self, items: Sequence, *,
                  validate: bool = True) -> asyncio.Future[list[int]]:
        """Store messages given as their DELIVER tails (flat ``device_keys,
        tail`` a message, as :meth:`SqliteStore.put_tails`); the returned
        future is already resolved.  Kept as routes, as :meth:`put_now` keeps
        them; ``validate=False`` takes the tails as given, as ``put_now``
        does (a bad one would fail its load, not this call)."""
        self._check_open()
        if validate:  # checked, the messages are put_many's items
            return self.put_many(self._check_tails(items), validate=False)
        if len(items) % 2:
            raise InvalidArgument("items hold device keys, tail for each message")
        first = self._next_mid
        routes: list = []
        for k in range(0, len(items), 2):
            routes += (items[k], (first + k // 2, items[k + 1]))
        n = self.put_now(routes, first)
        fut = self._loop.create_future()
        fut.set_result(list(range(first, first + n)))
        return fut

    def next_mid(self) -> int | None:
        """The mid :meth:`put_now` will give the first message of its next
        batch (mids follow on from it), or None once the store is closed."""
        return None if self._closed else self._next_mid

    def put_now(self, routes: list, first_mid: int) -> int:
        """Store the relay's own routes at once, without a future; returns how many.

        The relay's memory-store path: it reads :meth:`next_mid` first, and
        decides and routes each message as it builds ``routes``, flat
        ``device_keys, route`` a message: the route it hands the engine, its
        routed tail (:func:`~fastroute.wire.routed_tail`: its mid and DELIVER
        tail, which holds the sender, id, body and stamp, as one object) or
        ``(mid, tail)``, with mids from ``first_mid`` on.  The inboxes hold
        that very route: no object of the store's own a message, the body
        once.
        There is no validation (the gate made them) but of the mids: a batch
        that would not get the ones its routes carry (another put came
        between, or the store was closed) is refused whole, before anything
        is stored.
        """
        self._check_open()
        if first_mid != self._next_mid:
            raise InvalidArgument(
                f"the batch's mids would start at {self._next_mid}, not {first_mid}")
        # how many were stored, not a list of their mids: the caller knows them
        done: list[int] = []
        try:
            _mem_put(routes if type(routes) is list else list(routes), self._left,
                     self._inbox, first_mid, done, False, True)
        finally:
            n = done[0] if done else 0
            self._next_mid += n  # mids stay unique even if an item was bad
            self._messages += n
        return n

    def _store_trusted(self, items: Sequence[PutItem]) -> list[int]:
        # every put ends here; the relay's hot path (validate=False) comes
        # straight: the expiry and the inboxes in one loop, compiled when
        # fastroute._core is
        mids: list[int] = []
        try:
            _mem_put(items if type(items) is list else list(items), self._left, self._inbox,
                     self._next_mid, mids)
        finally:
            self._next_mid += len(mids)  # mids stay unique even if an item was bad
            self._messages += len(mids)  # each of them is in some inbox
        return mids

    def ack(self, device_key: int, mids: Sequence[int], *, validate: bool = True) -> None:
        """Delete the device's inbox entries for ``mids`` (and orphaned messages)."""
        self._check_open()
        key = device_key
        if validate:  # the relay passes ints it got from the store itself
            key = _check_sql_int(device_key, "device_key")
            mids = self._check_mids(mids)
        box = self._inbox.get(key)
        if box is None:
            return
        # per delivered message: compiled when fastroute._core is
        self._messages -= _mem_ack(box, self._left, mids)

    def forget_device(self, device_key: int) -> None:
        """Remove a device and its inbox; unknown keys are ignored."""
        self._check_open()
        key = self._drop_device(device_key)
        if key is None:
            return
        for m in self._inbox.pop(key, ()):
            self._messages -= _unref(self._left, m)

    async def flush(self) -> None:
        """Nothing to wait for; kept for API compatibility."""
        self._check_open()

    async def expire(self, now_ms: int) -> int:
        """Delete messages with expiry ``<= now_ms``; return how many."""
        self._check_open()
        now_ms = _check_sql_int(now_ms, "now_ms")
        dead: set[int] = set()
        # a message expires ttl after its stamp: the stamps up to this one
        oldest = now_ms - self._ttl_ms
        for box in self._inbox.values():
            # a put's item holds its stamp, put_now's route (mid, tail) its tail
            gone = [m for m, msg in box.items()
                    if (msg[3] if len(msg) == 5 else _stored_fields(msg)[3]) <= oldest]
            for m in gone:
                del box[m]
            dead.update(gone)
        for m in dead:
            self._left.pop(m, None)
        self._messages -= len(dead)
        return len(dead)

    async def load(self, device_key: int, after_mid: int,
                   limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages for ``device_key`` after ``after_mid``, in order."""
        self._check_open()
        self._check_load(device_key, after_mid, limit)
        box = self._inbox.get(device_key)
        if box is None:
            return []
        # compiled when fastroute._core is: a backlog sync calls this per 1024 rows
        return _mem_load(box, after_mid, limit)

    async def backlog_counts(self) -> dict[int, tuple[int, int]]:
        """``device key -> (messages, body bytes)`` still stored for each device."""
        self._check_open()
        out: dict[int, tuple[int, int]] = {}
        for key, box in self._inbox.items():
            if box:
                out[key] = (len(box), sum(len(msg[2] if len(msg) == 5 else _stored_fields(msg)[2])
                                          for msg in box.values()))
        return out

    async def count_pending(self, device_key: int | None = None) -> int:
        """Inbox entries not yet acked, for one device or in total."""
        self._check_open()
        if device_key is None:
            return sum(len(b) for b in self._inbox.values())
        return len(self._inbox.get(_check_sql_int(device_key, "device_key"), ()))

    def stats(self) -> dict[str, int]:
        """Counters for metrics (no personal data)."""
        return {"commits": 0, "failed_batches": 0, "queued_requests": 0,
                "devices": len(self._by_key), "messages": self._messages}

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MemoryStore {state} messages={self._messages}>"


if TYPE_CHECKING:
    # mypy checks here that both implementations satisfy Store (the tests do
    # it at run time, signatures included)
    _IMPLEMENTATIONS: tuple[type[Store], ...] = (SqliteStore, MemoryStore)
