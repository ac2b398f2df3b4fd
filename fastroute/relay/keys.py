"""The keys stage: the end-to-end encryption key directory, device lists and per-device send.

Feature ``"e2ee"`` of ``docs/PROTOCOL.md`` (section 17).  Every device that
speaks the Signal Protocol publishes public key material here: its own
registration id, identity key, signed EC prekey, last-resort KEM prekey,
and pools of one-time EC and KEM prekeys.  The relay stores and serves those
bytes exactly as uploaded and never interprets them beyond shapes, sizes and
counts (libsignal on the devices checks every signature).

* A device that publishes keys gets a **slot** keyed on (address, device
  name from its credential) with a relay-assigned device id in 1..127; the
  slots of an address are its **device list**.  Device names never leave the
  relay.  A device id freed by revocation is reused only with another
  registration id, so a sender holding a session with the old device is told
  "stale", never silently mismatched.
* A **bundle fetch** consumes one one-time EC and one one-time KEM prekey per
  device, in one SQLite transaction that is committed (``synchronous=FULL``)
  before the answer leaves: never handed out twice, not under concurrency
  (one writer thread), not across a crash.
* A **per-device send** (DSEND) carries one ciphertext per current device of
  the recipient (and optionally of the sender's other devices); anything
  else is refused whole, with the missing, extra and stale device ids.
  Accepted copies go to the message store in one batch (all or nothing)
  before the sender's answer, each for exactly one device.

The hot path of SEND never comes here; DSEND reads the device lists from
memory (:attr:`KeyDirectory.lists`) and touches SQLite only through the
message store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

import msgpack

from .. import wire
from .._compiled import twin
from ..dedup import PENDING, DedupTable
from ..errors import (
    DuplicateId,
    ErrorCode,
    FastrouteError,
    InvalidArgument,
    KeyLimit,
    StoreFailed,
)
from .gate import TokenBucket

from .batch import TurnBatch
from .replies import Replies
from .senders import EVENT_HEAD, copy_sender, event_sender

if TYPE_CHECKING:
    from .delivery import Delivery, LinkPort
    from .gate import Gate
    from .safety import Safety

__all__ = ["DeviceListWatcher", "KeyDirectory", "Keys", "PySlot", "Slot", "EVENT_POOL_LOW",
           "EVENT_DEVICE_JOINED", "EVENT_DEVICE_LEFT", "dsend_copies", "dsend_run", "new_targets",
           "py_dsend_copies", "py_dsend_run", "py_new_targets",
           "py_recipients_by_sender", "recipients_by_sender", "copy_tails", "py_copy_tails"]

log = logging.getLogger("fastroute.relay")

#: EVENT kinds (docs/PROTOCOL.md 17.6)
EVENT_POOL_LOW, EVENT_DEVICE_JOINED, EVENT_DEVICE_LEFT = 1, 2, 3

# opcodes as plain ints: an op's kind is compared with them once per request
_OP_DSEND, _OP_DEVICES, _OP_BUNDLES, _OP_KEYS_SET, _OP_KEYS_ADD = (
    int(wire.Op.DSEND), int(wire.Op.DEVICES), int(wire.Op.BUNDLES), int(wire.Op.KEYS_SET),
    int(wire.Op.KEYS_ADD))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS slots(
    address TEXT NOT NULL,
    name TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    reg_id INTEGER NOT NULL,
    identity BLOB NOT NULL,
    signed BLOB NOT NULL,        -- msgpack [key id, public, signature]
    last_resort BLOB NOT NULL,   -- msgpack [key id, public, signature]
    seen_s INTEGER NOT NULL DEFAULT 0,  -- last connection or disconnection, Unix s
    PRIMARY KEY(address, name),
    UNIQUE(address, device_id));
-- device ids given up by revocation, with the registration id they had
CREATE TABLE IF NOT EXISTS freed(
    address TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    reg_id INTEGER NOT NULL,
    PRIMARY KEY(address, device_id, reg_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS prekeys(
    address TEXT NOT NULL,
    device_id INTEGER NOT NULL,
    kind INTEGER NOT NULL,       -- 0 one-time EC, 1 one-time signed KEM
    key_id INTEGER NOT NULL,
    key BLOB NOT NULL,           -- msgpack [key id, public(, signature)]
    PRIMARY KEY(address, device_id, kind, key_id)) WITHOUT ROWID;
"""


def py_dsend_copies(devs: dict, entries: list | tuple, skip: int, target: str, stored_sender: str,
                    cid: bytes, now_ms: int, sp: bytes, ts_packed: bytes, items: list | None,
                    copies: list) -> bool:
    """The per-copy loop of a DSEND (compiled twin in ``_keys.pxi``).

    True when ``entries`` (``(device_id, reg_id, ciphertext)``) name exactly
    the devices of ``devs`` (device id -> :class:`Slot`) but ``skip``, each once
    and with its current registration id; then ``target, device name, tail,
    slot.dkeys`` is appended to ``copies`` for each copy (flat: no tuple a
    copy; the head of every copy is
    :data:`~fastroute.relay.senders.DDELIVER_HEAD`) and, unless ``items`` is
    None, its store item ``(stored_sender, cid, body, now_ms,
    slot.dkeys)`` to ``items`` (a store that keeps copies as their routes
    needs none: :meth:`Keys._store_now`).  False otherwise, with nothing
    appended: the caller then works out what differs (duplicates, missing,
    extra, stale).
    """
    n = len(devs) - (1 if skip in devs else 0)
    if len(entries) != n:
        return False
    seen = set()
    for did, reg, _ in entries:
        slot = devs.get(did)
        if slot is None or did == skip or slot.reg_id != reg or did in seen:
            return False
        seen.add(did)
    for did, _, body in entries:
        slot = devs[did]
        if items is not None:
            items.append((stored_sender, cid, body, now_ms, slot.dkeys))
        copies += (target, slot.name, wire.py_deliver_tail(sp, cid, body, ts_packed, 0),
                   slot.dkeys)
    return True


#: :func:`py_dsend_copies`, compiled when the core is built
dsend_copies = twin(py_dsend_copies)


def py_dsend_run(ops: list, i: int, lists: dict, reach: dict, skip: int, sender: str,
                 stored_sender: str, now_ms: int, sp: bytes, ts_packed: bytes, tokens: list,
                 dedup: Any, now: float, items: list | None, meta: list, link: Any) -> int:
    """The run of a frame's DSENDs, from ``ops[i]``, that :meth:`Keys.dsend_many`
    accepts without a word to say: returns where the run stops (``len(ops)``
    when it took them all), the op it stopped at untouched.

    An op is taken when its id is new for ``sender`` in ``dedup``, its
    recipient is reachable (``reach[to]`` is True), its entries (and own
    entries) are exactly current (:func:`py_dsend_copies`, ``skip`` the
    sending device's id) and ``tokens`` (``[messages, bytes]``) cover its
    copies and their bytes: then the tokens are spent, the id recorded
    PENDING at ``now``, its store items appended to ``items`` (unless it is
    None) and ``(link, id, (to, copies))`` to ``meta``.  Any other op ends the run (the
    caller answers it the precise way).  The specification of the compiled
    ``dsend_run`` (``_keys.pxi``).
    """
    n = len(ops)
    msg_tokens, byte_tokens = tokens
    try:
        while i < n:
            _, cid, to, _, entries, own = ops[i]
            if dedup.lookup(sender, cid, now) is not None or reach.get(to) is not True:
                break
            if not entries:
                break
            entries = list(entries)
            own = list(own)
            op_items: list | None = None if items is None else []
            copies: list = []
            if not (dsend_copies(lists[to], entries, skip if to == sender else 0, to,
                                 stored_sender, cid, now_ms, sp, ts_packed, op_items, copies)
                    and (not own or (to != sender and dsend_copies(
                        lists.get(sender, {}), own, skip, sender, stored_sender, cid, now_ms,
                        sp, ts_packed, op_items, copies)))):
                break
            size = 0
            for e in entries:
                size += len(e[2])
            for e in own:
                size += len(e[2])
            k = len(copies) // 4
            if msg_tokens < k or byte_tokens < size:
                break
            msg_tokens -= k
            byte_tokens -= size
            dedup.begin(sender, cid, PENDING, now)
            if items is not None and op_items is not None:
                items.extend(op_items)
            meta.append((link, cid, (to, copies)))
            i += 1
    finally:
        tokens[0] = msg_tokens
        tokens[1] = byte_tokens
    return i


#: :func:`py_dsend_run`, compiled when the core is built
dsend_run = twin(py_dsend_run)


def py_recipients_by_sender(meta: list) -> dict[str, set]:
    """A stored batch's ``(link, id, (to, ...))`` requests as sender address ->
    the recipients it reached.  The specification of the compiled
    ``recipients_by_sender``."""
    pairs: dict[str, set] = {}
    for link, _, extra in meta:
        pairs.setdefault(link.address, set()).add(extra[0])
    return pairs


#: :func:`py_recipients_by_sender`, compiled when the core is built
recipients_by_sender = twin(py_recipients_by_sender)


def py_copy_tails(meta: list) -> list:
    """A stored batch's ``(link, id, (to, copies))`` requests' copies as a
    store's ``put_copies`` takes them: flat ``device_keys, tail`` a copy, in
    the order of ``meta`` and of each request's copies (flat ``target,
    device name, tail, device_keys`` a copy).  The specification of the
    compiled ``copy_tails``."""
    out: list = []
    for _, _, extra in meta:
        copies = extra[1]
        if type(copies) is not list:
            raise TypeError("a request's copies are a list")
        if len(copies) % 4:
            raise InvalidArgument("copies hold target, device name, tail, device keys each")
        for k in range(0, len(copies), 4):
            out += (copies[k + 3], copies[k + 2])
    return out


#: :func:`py_copy_tails`, compiled when the core is built
copy_tails = twin(py_copy_tails)


def py_new_targets(ops: list, reach: dict) -> list:
    """The recipients (``op[2]``) of a frame's DSENDs that ``reach`` has no
    answer for yet, each once, in the order they first come.  The
    specification of the compiled ``new_targets`` (this loop costs 19 ns an
    op in Python, 2 compiled)."""
    new: list = []
    seen: set = set()
    for op in ops:
        to = op[2]
        if to not in reach and to not in seen:
            seen.add(to)
            new.append(to)
    return new


#: :func:`py_new_targets`, compiled when the core is built
new_targets = twin(py_new_targets)


class PySlot:
    """One device's place in its address's device list (what memory keeps of it).

    The specification of :data:`Slot`, the class in use (compiled when the
    core is: the DSEND loop reads its fields for every copy).
    """

    __slots__ = ("address", "name", "device_id", "reg_id", "seen", "dkeys")

    def __init__(self, address: str, name: str, device_id: int, reg_id: int,
                 seen: int = 0) -> None:
        self.address = address
        self.name = name
        self.device_id = device_id
        self.reg_id = reg_id
        #: when the device last connected or disconnected (Unix s), for retention
        self.seen = seen
        #: ``(its key in the message store,)``, filled in by the keys stage
        #: (:meth:`keyed`): one tuple for every copy stored for the device
        self.dkeys: tuple = (0,)

    def keyed(self, dkey: int) -> None:
        """Set the device's key in the message store."""
        self.dkeys = (dkey,)


#: the device slot class in use: ``fastroute._core.Slot``, or :class:`PySlot`
Slot = twin(PySlot)


class KeyDirectory:
    """The key directory's storage: one SQLite file, one writer thread, group commit.

    Every write and every consuming read runs as a *work* function in the
    writer thread; the works queued while a transaction commits share the
    next one.  A work that raises a :class:`FastrouteError` is rolled back
    alone (a savepoint) and its caller gets the error; the others commit.
    ``synchronous=FULL``: a fetch's consumption is on disk before its answer.

    :attr:`lists` (address -> device id -> :class:`Slot`) mirrors the slots
    table for the event loop thread; it changes only once a commit landed.
    """

    def __init__(self, path: str, *, ec_cap: int = 500, kem_cap: int = 200,
                 low_water: int = 10) -> None:
        self.path = path
        self.ec_cap = ec_cap
        self.kem_cap = kem_cap
        self.low_water = low_water
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self.lists: dict[str, dict[int, PySlot]] = {}
        self.by_name: dict[tuple[str, str], PySlot] = {}
        for address, name, did, reg, seen in self._conn.execute(
                "SELECT address, name, device_id, reg_id, seen_s FROM slots"):
            self._remember(Slot(address, name, did, reg, seen))
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastroute-keys")
        self._queue: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future]] = []
        self._busy = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.commits = 0

    # --------------------------------------------------------- memory mirror
    def _remember(self, slot: PySlot) -> None:
        self.lists.setdefault(slot.address, {})[slot.device_id] = slot
        self.by_name[(slot.address, slot.name)] = slot

    def _forget(self, slot: PySlot) -> None:
        devs = self.lists.get(slot.address)
        if devs is not None and devs.get(slot.device_id) is slot:
            del devs[slot.device_id]
            if not devs:
                del self.lists[slot.address]
        if self.by_name.get((slot.address, slot.name)) is slot:
            del self.by_name[(slot.address, slot.name)]

    def slot(self, address: str, name: str) -> PySlot | None:
        """The slot of device ``name`` of ``address``, if it published keys."""
        return self.by_name.get((address, name))

    def slot_of(self, link: "LinkPort") -> PySlot | None:
        """The slot of the device ``link`` authenticated as, if it published keys."""
        assert link.cred is not None
        return self.by_name.get((link.address, link.cred.device))

    # ---------------------------------------------------------- the writer
    def submit(self, work: Callable[[sqlite3.Connection], Any]) -> asyncio.Future:
        """Run ``work(conn)`` in the writer thread inside a transaction; its result."""
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        fut = loop.create_future()
        if self._closed:
            fut.set_exception(StoreFailed("key directory is closed"))
            return fut
        self._queue.append((work, fut))
        if not self._busy:
            self._busy = True
            loop.call_soon(self._start)
        return fut

    def _start(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            self._busy = False
            return
        if self._closed:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(StoreFailed("key directory is closed"))
            self._busy = False
            return
        assert self._loop is not None
        cf = self._loop.run_in_executor(self._pool, self._run, [w for w, _ in batch])
        cf.add_done_callback(lambda f: self._settle(batch, f))

    def _run(self, works: list) -> list:
        conn = self._conn
        results: list = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for work in works:
                conn.execute("SAVEPOINT w")
                try:
                    results.append((True, work(conn)))
                except FastrouteError as exc:
                    conn.execute("ROLLBACK TO w")
                    results.append((False, exc))
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        return results

    def _settle(self, batch: list, f: asyncio.Future) -> None:
        exc = f.exception()
        if exc is not None:
            log.error("key directory write failed: %s", type(exc).__name__,
                      extra={"event": "keys.write_failed"})
        for i, (_, fut) in enumerate(batch):
            if fut.done():
                continue
            if exc is not None:
                fut.set_exception(StoreFailed("key directory write failed"))
            else:
                ok, value = f.result()[i]
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
        self._start()

    def close(self) -> None:
        """Finish the running batch and close the file; later work is refused."""
        self._closed = True
        self._pool.shutdown(wait=True)
        self._conn.close()

    # ------------------------------------------------------------- works
    def publish_work(self, address: str, name: str, reg_id: int, identity: bytes,
                     signed: tuple, last_resort: tuple, clear: bool) -> Callable:
        """KEYS_SET: create or update the slot; returns ``(device_id, event)``.

        ``event`` is EVENT_DEVICE_JOINED when the device is new to the list or
        came back with a new registration id (re-created), else 0.
        """
        signed_b = msgpack.packb(list(signed))
        last_b = msgpack.packb(list(last_resort))
        now = int(time.time())

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            row = conn.execute("SELECT device_id, reg_id FROM slots WHERE address = ? AND "
                               "name = ?", (address, name)).fetchone()
            if row is not None:
                did, old_reg = row
                conn.execute("UPDATE slots SET reg_id = ?, identity = ?, signed = ?, "
                             "last_resort = ?, seen_s = ? WHERE address = ? AND name = ?",
                             (reg_id, identity, signed_b, last_b, now, address, name))
                if clear or old_reg != reg_id:
                    # a re-created device's old one-time prekeys belong to keys it lost
                    conn.execute("DELETE FROM prekeys WHERE address = ? AND device_id = ?",
                                 (address, did))
                return did, (EVENT_DEVICE_JOINED if old_reg != reg_id else 0)
            used = {d for (d,) in conn.execute(
                "SELECT device_id FROM slots WHERE address = ?", (address,))}
            # a freed id comes back only with another registration id
            barred = {d for (d,) in conn.execute(
                "SELECT device_id FROM freed WHERE address = ? AND reg_id = ?",
                (address, reg_id))}
            for did in range(1, wire.MAX_DEVICE_ID + 1):
                if did not in used and did not in barred:
                    break
            else:
                raise KeyLimit(f"an address has at most {wire.MAX_DEVICE_ID} devices")
            conn.execute("DELETE FROM prekeys WHERE address = ? AND device_id = ?",
                         (address, did))
            conn.execute("INSERT INTO slots(address, name, device_id, reg_id, identity, "
                         "signed, last_resort, seen_s) VALUES (?,?,?,?,?,?,?,?)",
                         (address, name, did, reg_id, identity, signed_b, last_b, now))
            return did, EVENT_DEVICE_JOINED

        return work

    def add_work(self, address: str, device_id: int, kind: int, prekeys: tuple) -> Callable:
        """KEYS_ADD: add one-time prekeys to a pool; returns the pool's new size."""
        cap = self.ec_cap if kind == wire.PREKEY_EC else self.kem_cap
        rows = [(address, device_id, kind, k[0], msgpack.packb(list(k))) for k in prekeys]

        def work(conn: sqlite3.Connection) -> int:
            (have,) = conn.execute("SELECT count(*) FROM prekeys WHERE address = ? AND "
                                   "device_id = ? AND kind = ?",
                                   (address, device_id, kind)).fetchone()
            if have + len(rows) > cap:
                raise KeyLimit(f"a pool holds at most {cap} prekeys of this kind")
            try:
                conn.executemany("INSERT INTO prekeys(address, device_id, kind, key_id, key) "
                                 "VALUES (?,?,?,?,?)", rows)
            except sqlite3.IntegrityError:
                raise DuplicateId("prekey id already in the pool") from None
            return have + len(rows)

        return work

    def bundles_work(self, address: str, device_ids: list[int]) -> Callable:
        """BUNDLES: one bundle per device, consuming one prekey of each pool.

        Returns ``(bundles, low)``: packed bundles in device id order, and the
        ``(device_id, kind, left)`` of pools that now hold fewer than
        ``low_water`` prekeys.
        """
        low_water = self.low_water

        def take(conn: sqlite3.Connection, did: int, kind: int) -> tuple[bytes | None, int]:
            row = conn.execute("DELETE FROM prekeys WHERE address = ?1 AND device_id = ?2 "
                               "AND kind = ?3 AND key_id = (SELECT min(key_id) FROM prekeys "
                               "WHERE address = ?1 AND device_id = ?2 AND kind = ?3) "
                               "RETURNING key", (address, did, kind)).fetchone()
            if row is None:
                return None, 0
            (left,) = conn.execute("SELECT count(*) FROM prekeys WHERE address = ? AND "
                                   "device_id = ? AND kind = ?", (address, did, kind)).fetchone()
            return row[0], left

        def work(conn: sqlite3.Connection) -> tuple[list, list]:
            out = []
            low = []
            for did in device_ids:
                row = conn.execute("SELECT reg_id, identity, signed, last_resort FROM slots "
                                   "WHERE address = ? AND device_id = ?",
                                   (address, did)).fetchone()
                if row is None:
                    continue
                reg, identity, signed, last_resort = row
                ec, ec_left = take(conn, did, wire.PREKEY_EC)
                kem, kem_left = take(conn, did, wire.PREKEY_KEM)
                for kind, got, left in ((0, ec, ec_left), (1, kem, kem_left)):
                    if got is not None and left < low_water:
                        low.append((did, kind, left))
                # the stored bytes are spliced in as they are: msgpack arrays
                # of [key id, public(, signature)], byte for byte as uploaded
                out.append(b"".join((
                    b"\x97", msgpack.packb(did), msgpack.packb(reg), msgpack.packb(identity),
                    signed, ec if ec is not None else b"\xc0",
                    kem if kem is not None else last_resort,
                    b"\xc2" if kem is not None else b"\xc3")))
            return out, low

        return work

    def seen_work(self, address: str, name: str, now: int) -> Callable:
        """Record that a device connected or disconnected (for retention)."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE slots SET seen_s = ? WHERE address = ? AND name = ?",
                         (now, address, name))

        return work

    def remove_work(self, address: str, name: str) -> Callable:
        """Drop a slot (revocation): its pools go, its device id is marked freed."""

        def work(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("DELETE FROM slots WHERE address = ? AND name = ? "
                               "RETURNING device_id, reg_id", (address, name)).fetchone()
            if row is None:
                return None
            did, reg = row
            conn.execute("DELETE FROM prekeys WHERE address = ? AND device_id = ?",
                         (address, did))
            conn.execute("INSERT OR IGNORE INTO freed(address, device_id, reg_id) "
                         "VALUES (?,?,?)", (address, did, reg))
            return did

        return work


class _Partial:
    """A DSEND whose entries span several ops (``more`` true), being gathered."""

    __slots__ = ("to", "entries", "own", "size")

    def __init__(self, to: str) -> None:
        self.to = to
        self.entries: list = []
        self.own: list = []
        self.size = 0


class DeviceListWatcher(Protocol):
    """What the keys stage tells the stage above it of device lists.

    The groups stage is the one watcher (:attr:`Keys.groups`, set by the
    server): a member device that joins or leaves changes its groups'
    member-device sets, and a shared group lets two users DSEND each other
    their sender keys.  Keys knows it only through this surface.
    """

    def shares_group(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are members of one group."""

    def devices_changing(self, address: str) -> None:
        """The device list of ``address`` is changing now (before it is mirrored)."""

    def bump_work(self, conn: sqlite3.Connection, address: str) -> list:
        """In the directory's transaction that adds a device of ``address``: the
        watcher's own changes, handed back to :meth:`device_bumped`."""

    def device_bumped(self, address: str, device_id: int, reg_id: int | None,
                      before: int | None, bumps: list) -> None:
        """A device joined (``reg_id``) or left (None); ``bumps`` is what
        :meth:`bump_work` returned in the same transaction."""

    def device_changed(self, address: str, device_id: int, reg_id: int | None,
                       before: int | None = None) -> None:
        """A device joined (``reg_id``) or left (None) without a :meth:`bump_work`."""


#: a multi-op DSEND may gather at most this many bytes of ciphertext
MAX_DSEND_BYTES = 2 * wire.MAX_DEVICE_ID * wire.MAX_BODY
#: multi-op DSENDs in progress per link
MAX_PARTIALS = 4


class Keys:
    """The keys stage of one relay: key ops, device lists, per-device send, events."""

    def __init__(self, config: Any, directory: KeyDirectory, gate: "Gate",
                 delivery: "Delivery", count_error: Callable[[int], None]) -> None:
        self.config = config
        self.dir = directory
        self.gate = gate
        self.delivery = delivery
        self.count_error = count_error
        #: this stage's REPLY ops (counted refusals)
        self.replies = Replies(delivery, count_error)
        self.dedup = DedupTable(config.dedup_window_s, config.dedup_max_entries,
                                presize=True)
        register = delivery.store.register_device
        for slot in directory.by_name.values():
            slot.keyed(register(slot.address, slot.name))
        # per sending device: its DDELIVER fields and the store's sender (packed once)
        self._senders: dict[tuple[str, int], tuple[bytes, str]] = {}
        # per requester address: bundles it may still fetch (each consumes prekeys)
        self._fetch_buckets: dict[str, TokenBucket] = {}
        # a store that takes a batch at once (the memory store) keeps each
        # copy as the route its device gets: no store item is made for it
        # (unless the caps count what is stored: they count items)
        store = delivery.store
        self._put_now: Callable[[list, int], int] | None = (
            getattr(store, "put_now", None) if getattr(store, "next_mid", None) is not None
            and not delivery.caps.enabled else None)
        # a store that takes copies as their DDELIVER tails (the SQLite store)
        # is handed the batch's copies themselves: no store item either
        self._put_copies: Callable[..., asyncio.Future] | None = (
            getattr(store, "put_copies", None) if self._put_now is None
            and not delivery.caps.enabled else None)
        # DSENDs accepted in this loop turn, stored together, then answered
        self._batch = TurnBatch(delivery, self.dedup, self.replies.reply, self._place,
                                "per-device sends", "keys.store_failed", self.replies.replies_ok,
                                self._store_now if self._put_now is not None else None,
                                self._persist_copies if self._put_copies is not None else None)
        # pools whose owner was told they run low: (address, device name, kind)
        self._told_low: set[tuple[str, str, int]] = set()
        self.accepted = 0
        #: the groups stage (feature "groups"), told of device list changes
        self.groups: DeviceListWatcher | None = None
        #: the safety stage (feature "safety"): its blocks hide addresses
        #: (:meth:`may_reach`)
        self.safety: "Safety | None" = None
        #: told of each stored batch's senders and their recipients, as the
        #: gate's :attr:`~fastroute.relay.gate.Gate.on_carried` (the server
        #: hands both the safety stage's ``delivered``), or None
        self.on_carried: Callable[[str, Any], None] | None = None

    # ------------------------------------------------------------ helpers
    def may_reach(self, link: "LinkPort", address: str) -> bool:
        """Whether ``link``'s user may message ``address``: same provider or its consent.

        An address without a device list counts as unreachable: the caller
        answers both cases with the same bytes.
        """
        if address not in self.dir.lists:
            return False
        # a user who blocked the requester (or its provider) does not exist
        # for it, whatever else would let it through (a shared group included)
        safety = self.safety
        if safety is not None and safety.blocks and safety.hides(address, link.address):
            return False
        if address.endswith("@" + link.provider) or not self.config.require_consent:
            return True
        accepted = self.gate.consent.get(address)
        if accepted is not None and (link.provider in accepted or "*" in accepted):
            return True
        # members of one group may send each other their sender keys (DSEND)
        groups = self.groups
        return groups is not None and groups.shares_group(link.address, address)

    # ------------------------------------------------------------ requests
    def request(self, link: "LinkPort", op: tuple) -> None:
        """Handle one op of feature "e2ee" of a link that negotiated it."""
        kind = op[0]
        if kind == _OP_DSEND:
            self.dsend(link, op)
        elif kind == _OP_DEVICES:
            self.devices(link, op[1], op[2])
        elif kind == _OP_BUNDLES:
            self.bundles(link, op[1], op[2], op[3])
        elif kind == _OP_KEYS_SET:
            self.publish(link, op)
        elif kind == _OP_KEYS_ADD:
            self.add(link, op[1], op[2], op[3])

    def publish(self, link: "LinkPort", op: tuple) -> None:
        """KEYS_SET: this device's registration id, identity, signed and last-resort keys."""
        _, cid, reg_id, identity, signed, last_resort, clear = op
        assert link.cred is not None
        address, name = link.address, link.cred.device
        work = self.dir.publish_work(address, name, reg_id, identity, signed, last_resort,
                                     clear)
        groups = self.groups

        def publish_and_bump(conn: sqlite3.Connection) -> tuple[int, int, list]:
            did, event = work(conn)
            # a device joining the list changes its groups' member-device sets
            # in the same transaction: memory learns both in one callback, so
            # no GSEND at the old version can be fanned out to it
            return did, event, (groups.bump_work(conn, address)
                                if event and groups is not None else [])

        fut = self.dir.submit(publish_and_bump)

        def done(f: asyncio.Future) -> None:
            exc = f.exception()
            if exc is not None:
                self.replies.reply(link, cid, int(getattr(exc, "code", ErrorCode.STORE_FAILED)))
                return
            did, event, bumps = f.result()
            self._told_low.difference_update({(address, name, 0), (address, name, 1)})
            old = self.dir.slot(address, name)
            if old is not None:
                self.dir._forget(old)
            if self.groups is not None:
                self.groups.devices_changing(address)
            slot = Slot(address, name, did, reg_id, int(time.time()))
            slot.keyed(self.delivery.store.register_device(address, name))
            self.dir._remember(slot)
            self.replies.reply(link, cid, 0, did)
            if event:
                self._event_to_others(address, did, EVENT_DEVICE_JOINED, [did, reg_id])
                if groups is not None:
                    groups.device_bumped(
                        address, did, reg_id,
                        old.reg_id if old is not None and old.device_id == did else None, bumps)

        fut.add_done_callback(done)

    def add(self, link: "LinkPort", cid: bytes, kind: int, prekeys: tuple) -> None:
        """KEYS_ADD: top up one of this device's one-time prekey pools."""
        slot = self.dir.slot_of(link)
        if slot is None:
            self.replies.reply(link, cid, ErrorCode.NO_KEYS)
            return
        want = 3 if kind == wire.PREKEY_KEM else 2
        if any(len(k) != want for k in prekeys):
            self.replies.reply(link, cid, ErrorCode.BAD_KEY)
            return
        if len({k[0] for k in prekeys}) != len(prekeys):
            self.replies.reply(link, cid, ErrorCode.DUPLICATE_ID)
            return
        if kind == wire.PREKEY_EC and len(prekeys) > self.dir.ec_cap or (
                kind == wire.PREKEY_KEM and len(prekeys) > self.dir.kem_cap):
            self.replies.reply(link, cid, ErrorCode.KEY_LIMIT)
            return
        fut = self.dir.submit(self.dir.add_work(slot.address, slot.device_id, kind, prekeys))

        def done(f: asyncio.Future) -> None:
            exc = f.exception()
            if exc is not None:
                self.replies.reply(link, cid, int(getattr(exc, "code", ErrorCode.STORE_FAILED)))
            else:
                self._told_low.discard((slot.address, slot.name, kind))
                self.replies.reply(link, cid, 0, f.result())

        fut.add_done_callback(done)

    def devices(self, link: "LinkPort", cid: bytes, address: str) -> None:
        """DEVICES: ``[[device id, registration id], ...]`` of ``address``; consumes nothing."""
        if not self.may_reach(link, address):
            self.replies.reply(link, cid, ErrorCode.UNKNOWN_RECIPIENT)
            return
        devs = self.dir.lists[address]
        self.replies.reply(link, cid, 0, [[d, devs[d].reg_id] for d in sorted(devs)])

    def _fetch_bucket(self, link: "LinkPort") -> TokenBucket:
        bucket = self._fetch_buckets.get(link.address)
        if bucket is None:
            if len(self._fetch_buckets) > 1 << 20:
                self._fetch_buckets.clear()  # bounded; a refill for all is harmless
            bucket = self._fetch_buckets[link.address] = TokenBucket(
                self.config.prekey_fetches_per_s, self.config.prekey_fetch_burst)
        return bucket

    def bundles(self, link: "LinkPort", cid: bytes, address: str, device_ids: tuple) -> None:
        """BUNDLES: prekey bundles of ``address``'s devices (all when ``device_ids`` is empty)."""
        if not self.may_reach(link, address):
            self.replies.reply(link, cid, ErrorCode.UNKNOWN_RECIPIENT)
            return
        if len(set(device_ids)) != len(device_ids):
            self.replies.reply(link, cid, ErrorCode.DUPLICATE_ID)
            return
        devs = self.dir.lists[address]
        wanted = sorted(device_ids) if device_ids else sorted(devs)
        if not self._fetch_bucket(link).take(max(1, len(wanted))):
            self.replies.reply(link, cid, ErrorCode.RATE_LIMITED)
            return
        fut = self.dir.submit(self.dir.bundles_work(address, wanted))

        def done(f: asyncio.Future) -> None:
            exc = f.exception()
            if exc is not None:
                self.replies.reply(link, cid, int(getattr(exc, "code", ErrorCode.STORE_FAILED)))
                return
            packed, low = f.result()
            self.replies.reply_parts(link, cid, packed)
            for did, kind, left in low:
                slot = self.dir.lists.get(address, {}).get(did)
                # once per pool until it is topped up (memory only: a restart
                # may tell the owner once more, never less)
                if slot is not None and (address, slot.name, kind) not in self._told_low:
                    self._told_low.add((address, slot.name, kind))
                    self.event(address, slot.name, EVENT_POOL_LOW, [kind, left])

        fut.add_done_callback(done)

    # ------------------------------------------------------------ DSEND
    def dsend(self, link: "LinkPort", op: tuple) -> None:
        """DSEND: one ciphertext per device; all stored or nothing (see module doc)."""
        _, cid, to, more, entries, own = op
        partials = link.dsends
        part = partials.get(cid)
        if part is not None and part.to != to:
            partials.pop(cid)
            self.replies.reply(link, cid, ErrorCode.BAD_FIELD, None)
            return
        if more or part is not None:
            if part is None:
                if len(partials) >= MAX_PARTIALS:
                    self.replies.reply(link, cid, ErrorCode.RATE_LIMITED)
                    return
                part = partials[cid] = _Partial(to)
            part.entries.extend(entries)
            part.own.extend(own)
            part.size += sum(len(e[2]) for e in entries) + sum(len(e[2]) for e in own)
            if (part.size > MAX_DSEND_BYTES or len(part.entries) > wire.MAX_DEVICE_ID
                    or len(part.own) > wire.MAX_DEVICE_ID):
                partials.pop(cid)
                self.replies.reply(link, cid, ErrorCode.BAD_FIELD)
                return
            if more:
                return
            partials.pop(cid)
            entries, own = part.entries, part.own
        self.dsend_many(link, [(_OP_DSEND, cid, to, False, entries, own)])

    def dsend_many(self, link: "LinkPort", ops: list) -> None:
        """Whole DSENDs of one link, in order (a frame's single-op ones, which
        the link hands over together when it gathers no multi-op DSEND, or one
        that :meth:`dsend` gathered): each checked, charged and queued for the
        turn's store batch, or answered, with the per-link work done once (the
        sender's slot and packed fields, the clocks, the two budgets, whether
        each recipient may be reached).  Runs of ops accepted without a word
        go through :func:`dsend_run` (compiled); the op a run stops at is
        answered here."""
        sender = link.address
        now = time.monotonic()
        mine = self.dir.slot_of(link)
        now_ms = int(time.time() * 1000)
        ts = wire.ts_packed(now_ms)
        skip = mine.device_id if mine is not None else 0
        sp, stored_sender = (b"", "") if mine is None else self._sender_fields(sender, skip)
        lists = self.dir.lists
        batch = self._batch
        dedup = self.dedup
        lg = link.gate_state
        msg_bucket, byte_bucket = lg.msg_bucket, lg.byte_bucket
        tokens = [msg_bucket.refill(), byte_bucket.refill()]
        reach: dict[str, bool] = {}
        if mine is not None:
            # may_reach has no effects: asked once per recipient of the frame
            for to in new_targets(ops, reach):
                reach[to] = self.may_reach(link, to)
        # no store items when the store keeps the copies' routes (_store_now)
        # or takes the copies themselves (_persist_copies)
        items = batch.items if self._put_now is None and self._put_copies is None else None
        meta = batch.meta
        i, n = 0, len(ops)
        taken = 0
        try:
            while i < n:
                if mine is not None:
                    k = dsend_run(ops, i, lists, reach, skip, sender, stored_sender, now_ms,
                                  sp, ts, tokens, dedup, now, items, meta, link)
                    taken += k - i
                    i = k
                    if i == n:
                        break
                # the op the run stopped at: resent, refused, or (with no
                # keys published) every op; answered here, the precise way
                op = ops[i]
                _, cid, to, _, entries, own = op
                i += 1
                if batch.resent(link, cid, now):
                    continue
                ok = reach.get(to)
                if ok is None:
                    ok = reach[to] = self.may_reach(link, to)
                if not ok:
                    self.replies.reply(link, cid, ErrorCode.UNKNOWN_RECIPIENT)
                    continue
                if mine is None:
                    self.replies.reply(link, cid, ErrorCode.NO_KEYS)
                    continue
                if not entries:
                    self.replies.reply(link, cid, ErrorCode.BAD_FIELD)
                    continue
                if py_dsend_run([op], 0, lists, reach, skip, sender, stored_sender, now_ms,
                                sp, ts, tokens, dedup, now, items, meta, link):
                    # taken after all: the specification is the judge
                    taken += 1
                    continue
                if not self._refuse_dsend(link, cid, to, entries, own, skip):
                    # its entries are exactly current: the budget refused it
                    self.replies.reply(link, cid, ErrorCode.RATE_LIMITED)
        finally:
            if taken:
                batch.added(link, taken)
            msg_bucket.tokens, byte_bucket.tokens = tokens

    def _sender_fields(self, sender: str, device_id: int) -> tuple[bytes, str]:
        """A sending device's packed DDELIVER fields and its store sender (kept)."""
        packed = self._senders.get((sender, device_id))
        if packed is None:
            if len(self._senders) > 1 << 16:
                self._senders.clear()
            packed = self._senders[(sender, device_id)] = (
                msgpack.packb(sender) + msgpack.packb(device_id),
                copy_sender(sender, device_id))
        return packed

    def _refuse_dsend(self, link: "LinkPort", cid: bytes, to: str, entries: list, own: list,
                      skip: int) -> bool:
        """The precise answer to a DSEND whose entries are not exactly current;
        False (nothing answered) when they are."""
        if (len({e[0] for e in entries}) != len(entries)
                or len({e[0] for e in own}) != len(own)):
            self.replies.reply(link, cid, ErrorCode.DUPLICATE_ID)
            return True
        lists = self.dir.lists
        sender = link.address
        missing, extra, stale = _mismatch(lists[to], entries, skip if to == sender else 0)
        own_missing: list = []
        own_extra: list = []
        own_stale: list = []
        if own:
            if to == sender:
                own_extra = sorted(e[0] for e in own)
            else:
                own_missing, own_extra, own_stale = _mismatch(lists.get(sender, {}), own, skip)
        mismatch = [missing, extra, stale, own_missing, own_extra, own_stale]
        if not any(mismatch):
            return False
        self.replies.reply(link, cid, ErrorCode.DEVICE_MISMATCH, mismatch)
        return True

    def _place(self, meta: list, mids: list) -> None:
        """A batch of DSENDs was stored: each copy to its own device."""
        self.delivery.persisted_requests(meta, mids)
        self._placed(meta, len(mids))

    def _persist_copies(self, meta: list) -> asyncio.Future:
        """Store a batch of DSENDs with the store's ``put_copies``: its copies'
        tails and device keys, from ``meta`` (:func:`copy_tails`)."""
        assert self._put_copies is not None
        return self.delivery.persist_copies(copy_tails(meta), self._put_copies)

    def _store_now(self, meta: list) -> None:
        """Store a batch of DSENDs with the store's ``put_now`` and place it,
        at once (the memory store): each copy kept as the route its device
        gets."""
        assert self._put_now is not None
        # a store with put_now has next_mid (checked when _put_now was set)
        first = self.delivery.store.next_mid()  # type: ignore[attr-defined]
        self._placed(meta, self.delivery.stored_copies(meta, first, self._put_now))

    def _placed(self, meta: list, n: int) -> None:
        """``n`` copies of a batch of DSENDs were stored and placed."""
        carried = self.on_carried
        if carried is not None:
            # spam reports count only for pairs the relay really carried;
            # a batch is mostly one sender's: one call per sender, not per DSEND
            for sender, tos in recipients_by_sender(meta).items():
                carried(sender, tos)
        self.accepted += n

    # ------------------------------------------------------------ events
    def event(self, address: str, name: str, kind: int, data: list) -> None:
        """Store an EVENT for one device of the list (persistent, like a message)."""
        self._events([(address, name)], kind, data)

    def _event_to_others(self, address: str, device_id: int, kind: int, data: list) -> None:
        others = [(address, s.name) for d, s in self.dir.lists.get(address, {}).items()
                  if d != device_id]
        if others:
            self._events(others, kind, data)

    def _events(self, targets: list, kind: int, data: list) -> None:
        now_ms = int(time.time() * 1000)
        ts = wire.ts_packed(now_ms)
        body = msgpack.packb(data)
        register = self.delivery.store.register_device
        items = []
        copies = []
        sp = msgpack.packb(kind)
        for address, name in targets:
            eid = os.urandom(16)
            items.append((event_sender(kind), eid, body, now_ms, [register(address, name)]))
            copies.append((address, name, EVENT_HEAD, wire.deliver_tail(sp, eid, body, ts, 0)))
        fut = self.delivery.persist(items)

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                self.delivery.persisted(None, 0)
                log.warning("an e2ee event could not be stored",
                            extra={"event": "keys.event_failed"})
                return
            mids = f.result()
            self.delivery.persisted_copies(
                [(a, n, (mid, tail, head)) for (a, n, head, tail), mid in zip(copies, mids)],
                mids[-1])

        fut.add_done_callback(done)

    # ------------------------------------------------------------ upkeep
    def seen(self, address: str, name: str) -> None:
        """A device with a slot connected or disconnected: it is not silent."""
        slot = self.dir.slot(address, name)
        if slot is not None:
            slot.seen = now = int(time.time())
            fut = self.dir.submit(self.dir.seen_work(address, name, now))
            # best effort: a lost update only makes the device look older
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def prune(self, is_revoked: Callable[[str, str], bool],
              silent_before: float | None = None) -> None:
        """Take revoked devices out of their lists, and (with ``silent_before``, Unix s)
        devices offline and silent since before then; drop their undelivered messages."""
        online = self.delivery.feed_of
        gone = [s for s in self.dir.by_name.values() if is_revoked(s.address, s.name) or (
            silent_before is not None and s.seen < silent_before
            and online(s.address, s.name) is None)]
        for slot in gone:
            self.dir._forget(slot)
            if self.groups is not None:
                self.groups.devices_changing(slot.address)
            fut = self.dir.submit(self.dir.remove_work(slot.address, slot.name))
            self.delivery.forget_device(slot.address, slot.name)

            def done(f: asyncio.Future, slot: PySlot = slot) -> None:
                if not f.cancelled() and f.exception() is None and f.result() is not None:
                    self._event_to_others(slot.address, slot.device_id, EVENT_DEVICE_LEFT,
                                          [slot.device_id])
                    if self.groups is not None:
                        self.groups.device_changed(slot.address, slot.device_id, None,
                                                   slot.reg_id)

            fut.add_done_callback(done)


def _mismatch(current: dict, entries: list, skip: int) -> tuple[list, list, list]:
    """(missing, extra, stale) device ids of ``entries`` against a device list."""
    given = {e[0]: e[1] for e in entries}
    missing = sorted(d for d in current if d != skip and d not in given)
    extra = sorted(d for d in given if d not in current or d == skip)
    stale = sorted(d for d, reg in given.items()
                   if d in current and d != skip and current[d].reg_id != reg)
    return missing, extra, stale
