"""The delivery stage: the engine, the live route, the backlog sync and the writer.

The engine (:class:`fastroute.Router`) only holds devices that are online.
The store holds every persistent message for every known device of the
recipient until that device acks it, so an offline device, a device that
reconnects, and a slow consumer whose mailbox overflowed are all served by
the same path: a *sync* that loads the device's backlog from the store in
order, then hands the device back to the live route (:meth:`Delivery._sync`).

Once per loop iteration the writer drains every ready mailbox into its
link's outgoing ops and has every link with something to say flush
(:meth:`Delivery.mark`): one encryption and one write per link per turn.

The interface to the other stages is narrow on purpose -- :meth:`attach`,
:meth:`detach`, :meth:`persist` / :meth:`persisted`, :meth:`route`,
:meth:`dack`, :meth:`mark` -- so that a cluster mode can put a message bus
behind it (a device online at another relay node) without touching the link
or the gate.

:func:`py_pack_delivers` and :func:`py_sync_rows` are the specifications of
the compiled twins in ``ext/fastroute/_delivery.pxi``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from .. import wire
from .._compiled import twin
from ..errors import ErrorCode, FastrouteError, MailboxFull, UnknownAddress, WrongType

if TYPE_CHECKING:
    from ..identity import Credential
    from ..store import Store

__all__ = ["Delivery", "Feed", "LinkPort", "bytes_by_address", "pack_delivers",
           "py_bytes_by_address", "py_pack_delivers", "py_sync_rows", "sync_rows"]

log = logging.getLogger("fastroute.relay")

_DELIVER_HEAD = b"\x97\x12\xce"  # fixarray(7), DELIVER, uint32 marker
#: DELIVERs popped from a mailbox per call (one packing call each)
_POP_BATCH = 1024
#: ts_ms = 0 as the DELIVER tail packs it (uint64), for a withheld timestamp
_TS_ZERO = b"\xcf" + bytes(8)


# -- per-message loops: specification -------------------------------------------

def py_pack_delivers(seq: int, batch: list, out: list) -> list:
    """Append a packed DELIVER per ``(mid, tail)`` of ``batch`` (seqs from ``seq``)
    to ``out``; return the mids in order."""
    if batch and seq + len(batch) - 1 > 0xFFFFFFFF:
        raise OverflowError("DELIVER seq does not fit 32 bits")
    mids = []
    append = out.append
    head = _DELIVER_HEAD
    for item in batch:
        if type(item) is not tuple or len(item) != 2:
            raise WrongType("DELIVER payloads must be (mid, tail) tuples")
        mid, tail = item
        if type(tail) is not bytes:
            raise WrongType("DELIVER tail must be bytes")
        append(b"".join((head, seq.to_bytes(4, "big"), tail)))
        mids.append(mid)
        seq += 1
    return mids


def py_sync_rows(router, dev, rows: list, routed, senders: dict, pack_sender):
    """Push stored ``(mid, sender, id, body, ts_ms)`` rows into a device's mailbox.

    Returns ``(pushed, last_mid, state)``: state 1 at the first row above
    ``routed``, 2 when the mailbox is full, 0 when every row was pushed.
    """
    pushed = 0
    last = None
    push = router.push
    for mid, sender, cid, body, ts_ms in rows:
        if mid > routed:
            return pushed, last, 1
        sp = senders.get(sender)
        if sp is None:
            sp = senders[sender] = pack_sender(sender)
        tail = wire.py_deliver_tail(sp, cid, body, wire.ts_packed(ts_ms), 0)
        try:
            push(dev, (mid, tail))
        except MailboxFull:
            return pushed, last, 2
        last = mid
        pushed += 1
    return pushed, last, 0


def py_bytes_by_address(batch: list) -> dict:
    """``{address: total length of its tails}`` of a routed batch of
    ``(address, (mid, tail))`` items (the memory budget's accounting)."""
    out: dict = {}
    for to, payload in batch:
        if type(payload) is not tuple or len(payload) != 2:
            raise WrongType("DELIVER payloads must be (mid, tail) tuples")
        tail = payload[1]
        if type(tail) is not bytes:
            raise WrongType("DELIVER tail must be bytes")
        out[to] = out.get(to, 0) + len(tail)
    return out


#: the implementations in use: compiled (``_delivery.pxi``) or the specifications above
pack_delivers = twin(py_pack_delivers)
sync_rows = twin(py_sync_rows)
bytes_by_address = twin(py_bytes_by_address)


# -- the stage ---------------------------------------------------------------------

class LinkPort(Protocol):
    """What the stages below the link (gate, delivery, media) use of a link.

    :class:`fastroute.relay.link.Link` is the implementation; a cluster mode
    would add another (a device online at a different relay node).  The
    stages queue ops in :attr:`out` and ask the writer to flush the link
    (:meth:`Delivery.mark`); only the link encrypts and writes.
    """

    #: packed ops waiting for the next flush (the same list for the link's life)
    out: list[bytes]
    #: the socket's buffer is full: stop pulling from the mailbox
    paused: bool
    address: str
    cred: "Credential | None"
    last_rx: float
    #: the delivery stage's state while the device is online
    feed: "Feed | None"
    #: the gate's state (a ``LinkGate``) while the device is online
    gate_state: Any
    #: the gate's layered budgets (a ``Budgets``) while the device is online
    budgets: Any
    #: ops refused past the op budget (counted by link and gate)
    refused_ops: int
    #: store batches of this link's SENDs not yet answered
    storing: int
    media_in_flight: int

    def is_open(self) -> bool:
        """Whether ops queued in :attr:`out` will still be written."""

    def flush(self) -> None:
        """Encrypt and write the queued ops."""

    def close(self, code: int, reason: str) -> None:
        """Send a final BYE and close."""

    def stored_all(self) -> None:
        """A store batch of this link's SENDs was answered."""


class Feed:
    """What the delivery stage keeps of one online device.

    ``dev`` is its engine id, ``dkey`` its store key.  ``inflight`` holds
    the mids of popped messages waiting for the device's DACK; their seqs
    are consecutive from ``inflight_seq`` (one mailbox, popped in order,
    never requeued).  ``last_mid``, ``missed_mid`` and ``live`` are the
    sync's cursor (see :meth:`Delivery._sync`).  ``qbytes`` counts the DELIVER
    tails the engine holds for it (the relay-wide memory budget).
    """

    __slots__ = ("link", "dev", "dkey", "address", "device", "inflight", "inflight_seq",
                 "last_mid", "missed_mid", "live", "sync_task", "room", "qbytes",
                 "inflight_bytes", "provider", "no_ts")

    def __init__(self, link: "LinkPort", dev: int, dkey: int, address: str, device: str) -> None:
        self.link = link
        self.dev = dev
        self.dkey = dkey
        self.address = address
        self.device = device
        self.inflight: deque = deque()
        self.inflight_seq = 1
        self.last_mid = 0  # newest stored message already in the engine (sync cursor)
        self.missed_mid = 0  # newest message the live route could not place
        self.live = False  # False while suspended/overflowed: the store feeds the device
        self.sync_task: asyncio.Task | None = None
        self.room = asyncio.Event()
        #: bytes of this device's messages held by the engine (queued + unacked),
        #: and of the popped ones among them
        self.qbytes = 0
        self.inflight_bytes = 0
        self.provider = address.rpartition("@")[2]
        #: its provider's header policy withholds the relay's timestamp
        self.no_ts = False


class Delivery:
    """The delivery stage of one relay: engine, store, live route, sync, writer."""

    def __init__(self, router: Any, store: Store, mailbox_capacity: int,
                 memory_budget: int = 1 << 62, provider_share: float = 1.0) -> None:
        self.router = router
        self.store = store
        self.mailbox_capacity = mailbox_capacity
        #: bytes of DELIVER tails the engine may hold, relay-wide; past it the
        #: fullest mailboxes (first those of providers over their share)
        #: spill: their new messages wait in the store, not in RAM
        self.memory_budget = memory_budget
        self.provider_share = provider_share
        self.queued_bytes = 0
        self.spills = 0
        self._by_address: dict[str, list[Feed]] = {}
        #: address -> store device keys of every device the store knows
        self.known: dict[str, list[int]] = {}
        self.delivered = 0
        self._online: dict[int, Feed] = {}  # engine device id -> feed
        self._by_device: dict[tuple[str, str], Feed] = {}
        self._dirty: set = set()
        self._flush_scheduled = False
        self._routed_mid = 0
        self._puts_in_flight = 0
        self._routed_waiters: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Load the store's known devices; bind to the running loop."""
        self._loop = asyncio.get_running_loop()
        for dkey, address, _device in self.store.known_devices():
            self.known.setdefault(address, []).append(dkey)

    @property
    def online(self) -> int:
        """How many devices are online."""
        return len(self._online)

    def feeds(self) -> list[Feed]:
        """The online devices' feeds."""
        return list(self._online.values())

    # ---------------------------------------------------------- devices
    def feed_of(self, address: str, device: str) -> Feed | None:
        """The feed of an online device, or None."""
        return self._by_device.get((address, device))

    def attach(self, link: "LinkPort", address: str, device: str) -> Feed:
        """Put an authenticated device online: store key, engine mailbox, sync.

        The device starts suspended: its stored backlog goes first, the live
        route must not overtake it.
        """
        dkey = self.store.register_device(address, device)
        keys = self.known.setdefault(address, [])
        if dkey not in keys:
            keys.append(dkey)
        dev = self.router.add_device(address, device)
        self.router.suspend(dev)
        feed = Feed(link, dev, dkey, address, device)
        self._online[dev] = feed
        self._by_device[(address, device)] = feed
        self._by_address.setdefault(address, []).append(feed)
        return feed

    def detach(self, link: "LinkPort") -> None:
        """Take a link's device offline (idempotent).

        Whatever the device had not acked is still in the store (or was an
        ephemeral signal, which is dropped when its device goes away).
        """
        self._dirty.discard(link)
        feed = link.feed
        if feed is None:
            return
        link.feed = None
        if feed.sync_task is not None:
            feed.sync_task.cancel()
            feed.sync_task = None
        self.router.remove_device(feed.dev)
        self._online.pop(feed.dev, None)
        key = (feed.address, feed.device)
        if self._by_device.get(key) is feed:
            del self._by_device[key]
        feeds = self._by_address.get(feed.address)
        if feeds is not None and feed in feeds:
            feeds.remove(feed)
            if not feeds:
                del self._by_address[feed.address]
        self.queued_bytes -= feed.qbytes
        feed.qbytes = 0
        feed.dev = -1
        feed.room.set()

    def dack(self, link: "LinkPort", upto: int) -> None:
        """The device acked every DELIVER up to seq ``upto``: forget them, engine and store."""
        feed = link.feed
        if feed is None:
            return
        n = self.router.ack(feed.dev, upto)
        if not n:
            return
        inflight = feed.inflight
        k = min(upto - feed.inflight_seq + 1, len(inflight))
        if k <= 0:
            return
        feed.inflight_seq += k
        popleft = inflight.popleft
        mids = [mid for mid in [popleft() for _ in range(k)] if mid]
        # popped bytes are known per pop batch, not per message: an ack of
        # part of them frees its share (exact once all are acked)
        if inflight:
            freed = feed.inflight_bytes * k // (k + len(inflight))
        else:
            freed = feed.inflight_bytes
            if not self.router.pending(feed.dev)[0]:
                # nothing held at all: whatever estimate is left goes too
                freed = feed.qbytes
        feed.inflight_bytes -= min(freed, feed.inflight_bytes)
        feed.qbytes -= freed
        self.queued_bytes -= freed
        self.delivered += n
        if mids:
            self.store.ack(feed.dkey, mids, validate=False)
        if not feed.room.is_set():
            feed.room.set()

    # ---------------------------------------------------------- routing
    def persist(self, items: list) -> asyncio.Future:
        """Store accepted messages; :meth:`persisted` must follow when the future is done."""
        fut = self.store.put_many(items, validate=False)
        self._puts_in_flight += 1
        return fut

    def persisted(self, items: list | None, last_mid: int) -> None:
        """A store batch from :meth:`persist` was committed (route ``items``) or refused (None)."""
        self._puts_in_flight -= 1
        try:
            if items is not None:
                self.route(items, ephemeral=False)
                if last_mid > self._routed_mid:
                    self._routed_mid = last_mid
        finally:
            # syncs waiting for the live route to catch up
            waiters, self._routed_waiters = self._routed_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def route(self, batch: list, ephemeral: bool) -> None:
        """Route ``(address, (mid, tail))`` pairs to the online devices of each address."""
        router = self.router
        try:
            router.route_many(batch)
        except UnknownAddress:
            # Some recipients have no device online (the store has their
            # copy): route the rest.  route_many applied nothing.
            batch = [it for it in batch if router.has_address(it[0])]
            if batch:
                self.route(batch, ephemeral)
            return
        except MailboxFull as exc:
            self._held(batch, exc.full)
            if not ephemeral:  # signals are never stored: a full device misses them
                self._missed(batch, exc.full)
        else:
            self._held(batch, ())
        if self.queued_bytes > self.memory_budget:
            self.spill()
        self.wake()

    def _held(self, batch: list, full: Any) -> None:
        """Count the bytes the engine now holds for each live device of the batch."""
        by_address = self._by_address
        added = 0
        # per address in C, then per device of each address here
        for to, size in bytes_by_address(batch).items():
            feeds = by_address.get(to)
            if feeds is None:
                continue
            for feed in feeds:
                if feed.live:
                    feed.qbytes += size
                    added += size
        online = self._online
        for index, dev in full:
            skipped = online.get(dev)
            if skipped is not None and skipped.live:  # it was skipped, not filled
                size = len(batch[index][1][1])
                skipped.qbytes -= size
                added -= size
        self.queued_bytes += added

    def spill(self) -> None:
        """Over the memory budget: the fullest mailboxes stop taking live
        messages (first those of providers over their share); what is sent
        to them meanwhile waits in the store and reaches them by sync, as
        for any slow consumer.  Ephemeral signals to them are dropped."""
        online = list(self._online.values())
        per_provider: dict[str, int] = {}
        for feed in online:
            per_provider[feed.provider] = per_provider.get(feed.provider, 0) + feed.qbytes
        share = self.memory_budget * self.provider_share
        excess = self.queued_bytes - self.memory_budget
        order = sorted((f for f in online if f.live and f.qbytes),
                       key=lambda f: (per_provider[f.provider] <= share, -f.qbytes))
        router = self.router
        for feed in order:
            if excess <= 0:
                break
            router.suspend(feed.dev)
            feed.live = False
            # everything routed so far is in the engine; the sync starts
            # after the newest routed message once this device misses one
            feed.last_mid = self._routed_mid
            excess -= feed.qbytes
            self.spills += 1

    def _missed(self, batch: list, full: list) -> None:
        online = self._online
        for index, dev in full:
            feed = online.get(dev)
            if feed is None:
                continue
            mid = batch[index][1][0]
            if feed.live:
                # The first miss: everything of this device's before it went
                # through the live route, everything from it on (in mid
                # order) is the store's to feed.
                feed.live = False
                feed.last_mid = mid - 1
            if mid > feed.missed_mid:
                feed.missed_mid = mid
            self.start_sync(feed)

    def _next_routed(self) -> asyncio.Future:
        """A future resolved after the next store batch is routed (or failed)."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._routed_waiters.append(fut)
        return fut

    # ---------------------------------------------------------- sync
    def start_sync(self, feed: Feed) -> None:
        """Run :meth:`_sync` for ``feed`` unless it is already running."""
        if feed.sync_task is None and feed.dev >= 0:
            assert self._loop is not None
            feed.sync_task = self._loop.create_task(self._sync(feed))

    async def _sync(self, feed: Feed) -> None:
        """Load a device's backlog from the store into its mailbox, in order.

        While the device is *overflowed* (suspended on connect, or after its
        mailbox was found full), the live route skips it and records the
        newest message it missed in ``missed_mid``; this loop pushes stored
        messages oldest first until it has caught up with everything already
        routed, then resumes the live route.  The check and the resume happen
        in one step of the event loop, so no message can slip between them.
        """
        router = self.router
        store = self.store
        cap = self.mailbox_capacity
        try:
            if feed.last_mid == 0:
                # Acks of this device's previous connection may still be queued
                # in the store's writer; loading before they land would
                # redeliver what the device already acked.
                await store.flush()
            while feed.dev >= 0:
                queued, unacked = router.pending(feed.dev)
                room = cap - queued - unacked
                over = self.queued_bytes > self.memory_budget
                if room <= 0 or (over and queued + unacked):
                    # over the memory budget only an empty mailbox is refilled
                    feed.room.clear()
                    await feed.room.wait()
                    continue
                limit = min(room, 16 if over else 1024)
                missed_before = feed.missed_mid
                rows = await store.load(feed.dkey, feed.last_mid, limit)
                if feed.dev < 0:
                    return
                # Rows committed but not yet routed are left to the live route
                # (it runs after this in commit order), so none is pushed twice.
                # With no store batch in flight, every committed row was routed.
                routed = self._routed_mid if self._puts_in_flight else 1 << 62
                # per row: DELIVER tail, push (compiled when fastroute._core is);
                # a backlog has few distinct senders, packed once each
                senders: dict[str, bytes] = {}
                pushed, last, state = sync_rows(router, feed.dev, rows, routed, senders,
                                                msgpack.packb)
                if pushed:
                    feed.last_mid = last
                    # the bodies plus a tail's overhead (sender, id, ts, cls;
                    # ~40 bytes): an estimate, reset when the device is empty
                    size = sum([len(row[3]) for row in rows[:pushed]]) + 40 * pushed
                    feed.qbytes += size
                    self.queued_bytes += size
                    self.wake()  # the writer drains what was just pushed
                if state == 2:
                    continue  # full: the room check above waits for acks
                if state == 1:
                    # The store is ahead of the live route: wait for the next
                    # routed batch instead of reloading the same rows.
                    await self._next_routed()
                    continue
                if len(rows) >= limit:
                    continue
                # Every row up to what had been missed when the load started
                # was returned (or has expired): the cursor may pass it.
                if missed_before > feed.last_mid:
                    feed.last_mid = missed_before
                if feed.last_mid >= feed.missed_mid:
                    router.resume(feed.dev)
                    feed.live = True
                    self.wake()
                    return
                # new misses arrived while loading: load again (each pass
                # needs a routed batch in between, so this cannot spin)
        except asyncio.CancelledError:
            raise
        except FastrouteError as exc:
            log.warning("sync failed (code %d); closing the device's connection", int(exc.code))
            feed.link.close(ErrorCode.STORE_FAILED, "store unavailable")
        finally:
            if feed.sync_task is asyncio.current_task():
                feed.sync_task = None
            self.wake()

    # ---------------------------------------------------------- writer
    def pull(self, feed: Feed) -> None:
        """Move a device's poppable messages into its link's outgoing ops."""
        link = feed.link
        pop_batch = self.router.pop_batch
        out = link.out
        mids = feed.inflight.extend
        no_ts = feed.no_ts
        dev = feed.dev
        # Stop pulling while the socket's buffer is full: the messages stay
        # in the (bounded) mailbox and, past its capacity, in the store.
        while not link.paused:
            seq, batch = pop_batch(dev, _POP_BATCH)
            if not batch:
                break
            if seq + len(batch) >= 1 << 32:  # pragma: no cover - 4 G messages on one link
                link.close(ErrorCode.OK, "sequence space exhausted; reconnect")
                return
            # one packed DELIVER per message, appended to out (in C when compiled)
            start = len(out)
            mids(pack_delivers(seq, batch, out))
            # what they hold in the engine until acked: their tails' lengths
            feed.inflight_bytes += sum(map(len, out[start:])) - 7 * len(batch)
            if no_ts:
                # header policy: the relay's timestamp is withheld; DELIVER v1
                # is positional, so ts_ms stays, as 0 (same length)
                for i in range(start, len(out)):
                    x = out[i]
                    out[i] = x[:-10] + _TS_ZERO + x[-1:]
            if len(batch) < _POP_BATCH:
                break

    def resume(self, link: "LinkPort") -> None:
        """The link's socket drained: pull what waited in its mailbox."""
        if link.feed is not None:
            self.pull(link.feed)
            self.mark(link)

    def mark(self, link: "LinkPort") -> None:
        """Have ``link`` flush its outgoing ops at the end of this loop turn."""
        self._dirty.add(link)
        self.wake()

    def wake(self) -> None:
        """Schedule the writer for the end of this loop turn."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Once per loop iteration: drain ready mailboxes, write every dirty link."""
        self._flush_scheduled = False
        online = self._online
        dirty = self._dirty
        for dev in self.router.take_ready():
            feed = online.get(dev)
            if feed is not None and not feed.link.paused:
                self.pull(feed)
                dirty.add(feed.link)
        self._dirty = set()
        for link in dirty:
            link.flush()
