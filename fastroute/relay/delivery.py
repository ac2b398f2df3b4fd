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
from itertools import islice
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Protocol


from .. import wire
from .._compiled import twin
from ..histogram import Histogram
from .caps import Caps
from ..errors import (ErrorCode, FastrouteError, InvalidArgument, MailboxFull, UnknownAddress,
                      WrongType)
from ..store import tail_items
from .senders import pack_stored_sender

if TYPE_CHECKING:
    from ..identity import Credential
    from ..store import Store

__all__ = ["Delivery", "Feed", "LinkPort", "ack_feed", "bytes_by_address", "pack_delivers",
           "pull_round", "py_ack_feed", "py_bytes_by_address", "py_pack_delivers",
           "py_pull_round", "py_sync_rows", "sync_rows"]

log = logging.getLogger("fastroute.relay")

_DELIVER_HEAD = b"\x97\x12\xce"  # fixarray(7), DELIVER, uint32 marker
#: DELIVERs popped from a mailbox per call (one packing call each)
_POP_BATCH = 1024
#: a link with at most this many ops to write is written first in a flush
_LIGHT_OPS = 8
#: ts_ms = 0 as the DELIVER tail packs it (uint64), for a withheld timestamp
_TS_ZERO = b"\xcf" + bytes(8)
#: a stored row's body (``(mid, sender, id, body, ts_ms)``)
_BODY = itemgetter(3)


def _tail(payload: Any) -> bytes:
    """The DELIVER tail of a routed payload: a signal's payload is its bare
    tail, a stored message's its routed tail (:func:`fastroute.wire.routed_tail`)
    or ``(mid, tail[, head])``."""
    return wire.route_parts(payload)[1]


def _tail_len(payload: Any) -> int:
    """``len(_tail(payload))``, without copying a routed tail's DELIVER tail."""
    if wire.is_routed(payload):
        return len(payload) - wire.ROUTED_HEAD_LEN
    return len(_tail(payload))


# -- per-message loops: specification -------------------------------------------

def py_pack_delivers(seq: int, batch: list, out: list) -> list:
    """Append a packed DELIVER per ``(mid, tail)`` of ``batch`` to ``out``
    (seqs from ``seq``); return the mids in order.

    A ``(mid, tail, head)`` item is another op with DELIVER's shape (a
    feature's DDELIVER or EVENT): ``head`` is its array header and opcode,
    written before the uint32 seq in place of DELIVER's.  A routed tail
    (:func:`fastroute.wire.routed_tail`) is ``(mid, tail)`` as one object.  A
    bare ``tail`` (bytes) is a signal's (an ephemeral message, never stored):
    mid 0, no tuple a message on the live route.  A bad payload
    anywhere in ``batch`` appends nothing.  (The compiled twin appends two
    ops or more as one ``OpRun``: :func:`fastroute.wire.flat_ops` of both
    lists is the same.)
    """
    if batch and seq + len(batch) - 1 > 0xFFFFFFFF:
        raise OverflowError("DELIVER seq does not fit 32 bits")
    for item in batch:
        if type(item) is bytes:
            continue
        if type(item) is not tuple or not 2 <= len(item) <= 3:
            raise WrongType("DELIVER payloads must be (mid, tail) or (mid, tail, head) tuples, "
                            "or a tail (bytes)")
        if type(item[1]) is not bytes:
            raise WrongType("DELIVER tail must be bytes")
        if len(item) == 3 and (type(item[2]) is not bytes or not item[2]):
            raise WrongType("DELIVER head must be non-empty bytes")
    mids = []
    append = out.append
    for item in batch:
        mid, tail = wire.route_parts(item)
        if type(item) is tuple and len(item) == 3:
            append(b"".join((item[2], b"\xce", seq.to_bytes(4, "big"), tail)))
        else:
            append(b"".join((_DELIVER_HEAD, seq.to_bytes(4, "big"), tail)))
        mids.append(mid)
        seq += 1
    return mids


def py_pull_round(router: Any, dev: int, out: list, inflight: deque,
                  max_n: int) -> tuple[int, int, int]:
    """One round of :meth:`Delivery.pull`: pop up to ``max_n`` of device
    ``dev``'s messages, append a packed DELIVER per message to ``out``
    (:func:`py_pack_delivers`) and its mid to ``inflight``.

    Returns ``(n, held, ts_ms)``: how many were popped (-1: their seqs would
    not fit 32 bits, nothing appended), the bytes the engine holds for them
    until acked (their packed ops' lengths past DELIVER's 7-byte head), and
    the relay's timestamp in the newest one's tail (-1 if it has none).
    """
    seq, batch = router.pop_batch(dev, max_n)
    n = len(batch)
    if not n:
        return 0, 0, -1
    if seq + n >= 1 << 32:
        return -1, 0, -1
    start = len(out)
    inflight.extend(py_pack_delivers(seq, batch, out))
    # a DELIVER tail ends with ts_ms (uint64) and cls
    tail = _tail(batch[-1])
    ts_ms = int.from_bytes(tail[-9:-1], "big") if len(tail) >= 10 and tail[-10] == 0xCF else -1
    return n, sum(map(len, out[start:])) - 7 * n, ts_ms


def py_ack_feed(router: Any, feed: Any, upto: int) -> tuple[int, list, int]:
    """The engine's side of a DACK up to seq ``upto`` of an online device's
    :class:`Feed`: release its messages in the engine, pop their mids from
    ``feed.inflight`` and take their bytes off ``feed.inflight_bytes`` and
    ``feed.qbytes``.

    Returns ``(n, mids, freed)``: how many the engine released (0: nothing
    else was done), the row ids of the stored ones among them (ephemeral
    copies have none) and the bytes freed.
    """
    n = router.ack(feed.dev, upto)
    if not n:
        return 0, [], 0
    inflight = feed.inflight
    k = min(upto - feed.inflight_seq + 1, len(inflight))
    if k <= 0:
        return 0, [], 0
    feed.inflight_seq += k
    if k == len(inflight):
        # the common ack: everything outstanding
        mids = list(inflight)
        inflight.clear()
    else:
        popleft = inflight.popleft
        mids = [popleft() for _ in range(k)]
    if not all(mids):
        mids = list(filter(None, mids))
    # popped bytes are known per pop batch, not per message: an ack of part
    # of them frees its share (exact once all are acked)
    if inflight:
        freed = feed.inflight_bytes * k // (k + len(inflight))
    else:
        freed = feed.inflight_bytes
        if not router.pending(feed.dev)[0]:
            # nothing held at all: whatever estimate is left goes too
            freed = feed.qbytes
    feed.inflight_bytes -= min(freed, feed.inflight_bytes)
    feed.qbytes -= freed
    return n, mids, freed


def py_sync_rows(router, dev, rows: list, routed, senders: dict, pack_sender):
    """Push stored ``(mid, sender, id, body, ts_ms)`` rows into a device's mailbox.

    ``pack_sender(sender)`` (cached in ``senders``) gives the packed fields
    before the id: bytes for a DELIVER, ``(head, fields)`` for an op of
    DELIVER's shape (pushed as ``(mid, tail, head)``), or None to leave the
    row in the store (passed over, not pushed).  Returns ``(pushed,
    last_mid, state)``: state 1 at the first row above ``routed``, 2 when
    the mailbox is full, 0 when every row was pushed or passed over.
    """
    pushed = 0
    last = None
    push = router.push
    for mid, sender, cid, body, ts_ms in rows:
        if mid > routed:
            return pushed, last, 1
        if sender in senders:
            sp = senders[sender]
        else:
            sp = senders[sender] = pack_sender(sender)
        if sp is None:
            last = mid
            continue
        payload: tuple
        if type(sp) is tuple:
            payload = (mid, wire.py_deliver_tail(sp[1], cid, body, wire.ts_packed(ts_ms), 0),
                       sp[0])
        else:
            payload = (mid, wire.py_deliver_tail(sp, cid, body, wire.ts_packed(ts_ms), 0))
        try:
            push(dev, payload)
        except MailboxFull:
            return pushed, last, 2
        last = mid
        pushed += 1
    return pushed, last, 0


def _pairs(flat: list) -> list:
    """The ``(key, payload)`` pairs of a flat ``key, payload, key, payload, ...``
    batch (what Router.route_flat and offer_flat take)."""
    return list(zip(flat[0::2], flat[1::2]))


def py_bytes_by_address(batch: list) -> dict:
    """``{address: total length of its tails}`` of a routed batch, flat:
    ``address, route, ...``, a route a routed tail or ``(mid, tail)``, or
    ``address, tail, ...`` (a signal's), the memory budget's accounting."""
    if len(batch) % 2:
        raise InvalidArgument("a routed batch holds address, payload pairs")
    out: dict = {}
    for to, payload in _pairs(batch):
        if type(payload) is bytes:
            tail = wire.route_parts(payload)[1]
        elif type(payload) is not tuple or len(payload) != 2:
            raise WrongType("DELIVER payloads must be (mid, tail) tuples or tails")
        else:
            tail = payload[1]
        if type(tail) is not bytes:
            raise WrongType("DELIVER tail must be bytes")
        out[to] = out.get(to, 0) + len(tail)
    return out


def py_devices_of(by_device: dict, targets: list, feature: str) -> list:
    """The engine ids of the feeds in ``by_device`` named by ``targets``
    (``(address, device name)`` keys) whose link negotiated ``feature``."""
    devs: list = []
    for key in targets:
        feed = by_device.get(key)
        if feed is not None and feature in feed.link.features:
            devs.append(feed.dev)
    return devs


def py_shared_rows(shared: list, devices_of: Callable[[list, str], list],
                   feature: str) -> list:
    """The rows for ``Router.offer_shared`` of a stored batch of messages each
    stored once for many devices, ``(mid, (tail, head, targets))``:
    ``((mid, tail, head), devices_of(targets, feature))`` each.  A batch's rows
    are mostly one group's messages, whose ``targets`` are one cached list:
    ``devices_of`` is asked again only when the list is another than the
    row before's (the same list gets the same answer within a batch)."""
    rows: list = []
    last: list | None = None
    devs: list | None = None
    for mid, (tail, head, targets) in shared:
        if devs is None or targets is not last:
            devs = devices_of(targets, feature)
            last = targets
        rows.append(((mid, tail, head), devs))
    return rows


def py_shared_items(rows: list) -> list:
    """The engine's ``(device id, payload)`` items for rows stored once for many
    devices, ``(payload, [engine id, ...])``: what ``Router.offer_shared``
    places for the rows, item by item (the rows' items are only made when
    the engine refused some: :meth:`Delivery._missed` reads them)."""
    items: list = []
    append = items.append
    for payload, devs in rows:
        for dev in devs:
            append((dev, payload))
    return items


def py_held_shared(online: dict, rows: list, skip) -> int:
    """:func:`py_held_offered` for rows ``((mid, tail, head), [engine id, ...])``
    (what ``Router.offer_shared`` placed): each placed item's tail length is
    added to its online feed's ``qbytes``; an item's index counts the rows'
    devices in order, as :func:`py_shared_items` lists them (the compiled
    twin does it without the items)."""
    return py_held_offered(online, [x for item in py_shared_items(rows) for x in item], skip)


def py_copies_online(by_device: dict, meta: list, mids: list | int, feature: str,
                     routes: list | None = None) -> list:
    """The engine's flat ``device id, (mid, tail, head), ...`` batch (for
    ``Router.offer_flat``) of a stored batch of per-device copies: ``meta``
    holds ``(link, id, (to, copies))`` per request, ``copies`` flat
    (``address, device name, tail, device keys`` a copy, as
    :func:`~fastroute.relay.keys.py_dsend_copies` builds them; every copy's
    head is ``wire.DDELIVER_HEAD``), and ``mids`` one row id per copy in that
    order (or an int: the first of as many in a row); a copy goes to its
    device if it is online on a link that negotiated ``feature`` (the store
    keeps the rest).

    With ``routes`` (a list), ``device keys, (mid, tail, head)`` is appended
    to it for every copy, online or not, its payload the one the batch
    holds: the routes ``MemoryStore.put_now`` keeps (the store and the
    engine then share one tuple a copy)."""
    items: list = []
    at = 0
    for _, _, (_, copies) in meta:
        if len(copies) % 4:
            raise InvalidArgument("copies hold address, device name, tail, device keys "
                                  "for each copy")
        for k in range(0, len(copies), 4):
            address, name, tail, dkeys = copies[k:k + 4]
            feed = by_device.get((address, name))
            online = feed is not None and feature in feed.link.features
            if online or routes is not None:
                mid = mids[at] if isinstance(mids, list) else mids + at
                payload = (mid, tail, wire.DDELIVER_HEAD)
                if routes is not None:
                    routes += (dkeys, payload)
                if online and feed is not None:
                    items += (feed.dev, payload)
            at += 1
    return items


def py_held_offered(online: dict, items: list, skip) -> int:
    """Add the tail length of each placed copy of the flat ``engine device id,
    (mid, tail, head), ...`` batch to its online feed's ``qbytes`` (pairs whose
    index is in ``skip`` were not placed); return the bytes added in all."""
    if len(items) % 2:
        raise InvalidArgument("a batch of copies holds device id, payload pairs")
    added = 0
    for index, (dev, payload) in enumerate(_pairs(items)):
        if index in skip:
            continue
        feed = online.get(dev)
        if feed is not None:
            size = len(payload[1])
            feed.qbytes += size
            added += size
    return added


#: cached group fan-outs kept at most (see ``Delivery._fanouts``)
_MAX_FANOUTS = 1024

#: the implementations in use: compiled (``_delivery.pxi``) or the specifications above
pack_delivers = twin(py_pack_delivers)
pull_round = twin(py_pull_round)
ack_feed = twin(py_ack_feed)
sync_rows = twin(py_sync_rows)
bytes_by_address = twin(py_bytes_by_address)
devices_of = twin(py_devices_of)
shared_rows = twin(py_shared_rows)
shared_items = twin(py_shared_items)
held_offered = twin(py_held_offered)
held_shared = twin(py_held_shared)
copies_online = twin(py_copies_online)


# -- the stage ---------------------------------------------------------------------

class LinkPort(Protocol):
    """What the stages below the link (gate, delivery, media) use of a link.

    :class:`fastroute.relay.link.Link` is the implementation; a cluster mode
    would add another (a device online at a different relay node).  The
    stages queue ops in :attr:`out` and ask the writer to flush the link
    (:meth:`Delivery.mark`); only the link encrypts and writes.
    """

    #: packed ops waiting for the next flush (the same list for the link's
    #: life): bytes, one op each, or op runs of several (``wire.OpRun``)
    out: list
    #: the socket's buffer is full: stop pulling from the mailbox
    paused: bool
    address: str
    provider: str
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
    #: feature names this link negotiated (FEATURES); empty for a v1 client
    features: frozenset[str]
    #: multi-op DSENDs being gathered, by id (the keys stage's)
    dsends: dict
    #: set while the backlog sync waits for the link's first frame (see Link.hold_sync)
    sync_hold: Any

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
                 "inflight_bytes", "provider", "no_ts", "window_full")

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
        #: a pull stopped at the unacked window (``mailbox_capacity``): the
        #: next DACK pulls again
        self.window_full = False


class Delivery:
    """The delivery stage of one relay: engine, store, live route, sync, writer.

    ``mailbox_capacity`` is the most deliveries a device has unacked (the
    protocol's flow control) and what a backlog sync fills its mailbox to.
    The engine's own bound on a mailbox (``router.mailbox_capacity``) may be
    larger: the live route then queues a slow device's messages past the
    window, and the writer delivers them as DACKs make room.
    """

    def __init__(self, router: Any, store: Store, mailbox_capacity: int,
                 caps: Caps | None = None, memory_budget: int = 1 << 62,
                 provider_share: float = 1.0) -> None:
        self.router = router
        self.store = store
        #: what the store keeps per recipient, and the addresses at a cap
        self.caps = caps if caps is not None else Caps((0, 0, 0, 0))
        self._puts_begun = 0
        #: acks applied to the caps' counts (a store count read across one is stale)
        self._acks_counted = 0
        self.mailbox_capacity = mailbox_capacity
        #: bytes of DELIVER tails the engine may hold, relay-wide; past it the
        #: fullest mailboxes (first those of providers over their share)
        #: spill: their new messages wait in the store, not in RAM
        self.memory_budget = memory_budget
        self.provider_share = provider_share
        self.queued_bytes = 0
        self.spills = 0
        #: messages backlog syncs pushed from the store into mailboxes (an
        #: offline, overflowed or spilled device catching up), not the live route
        self.synced = 0
        self._by_address: dict[str, list[Feed]] = {}
        #: address -> store device keys of every device the store knows
        self.known: dict[str, list[int]] = {}
        self.delivered = 0
        #: acceptance to DELIVER written, one sample per mailbox pull
        self.latency = Histogram()
        self._online: dict[int, Feed] = {}  # engine device id -> feed
        self._by_device: dict[tuple[str, str], Feed] = {}
        # A group's fan-out names its devices as (address, device name); a
        # thousand dict probes and feed lookups a message cost ~0.6 us a
        # delivery (memory-bound, compiled or not).  The same targets list
        # (a group's, cached by the groups stage per membership) resolves to
        # the same engine ids until a device comes, goes or gains a feature:
        # id(targets) -> (targets, generation, feature, engine ids).
        self._fanouts: dict[int, tuple] = {}
        self._feeds_gen = 0
        #: feeds attached since take_attached() last ran, once watched
        self._attached: list[Feed] | None = None
        self._dirty: set = set()
        #: the writer's pending call, if one is scheduled
        self._flush_scheduled: asyncio.Handle | None = None
        self._routed_mid = 0
        self._puts_in_flight = 0
        self._routed_waiters: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Load the store's known devices; bind to the running loop."""
        self._loop = asyncio.get_running_loop()
        for dkey, address, _device in self.store.known_devices():
            self.known.setdefault(address, []).append(dkey)
            self.caps.device(dkey, address)

    @property
    def online(self) -> int:
        """How many devices are online."""
        return len(self._online)

    def feeds(self) -> list[Feed]:
        """The online devices' feeds."""
        return list(self._online.values())

    def watch_attached(self) -> None:
        """Keep the feeds attached from now on for :meth:`take_attached`
        (the upkeep stage schedules each new link once, instead of walking
        every link on every pass)."""
        if self._attached is None:
            self._attached = []

    def take_attached(self) -> list[Feed]:
        """The feeds attached since the last call (see :meth:`watch_attached`)."""
        attached = self._attached
        if not attached:
            return []
        self._attached = []
        return attached

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
        self.caps.device(dkey, address)
        keys = self.known.setdefault(address, [])
        if dkey not in keys:
            keys.append(dkey)
        dev = self.router.add_device(address, device)
        self.router.suspend(dev)
        feed = Feed(link, dev, dkey, address, device)
        self._online[dev] = feed
        self._by_device[(address, device)] = feed
        self._feeds_gen += 1
        if self._attached is not None:
            self._attached.append(feed)
        self._by_address.setdefault(address, []).append(feed)
        return feed

    def forget_device(self, address: str, device: str) -> None:
        """Drop a revoked device's undelivered messages; later SENDs no longer store for it.

        A store without ``forget_device`` (the :class:`~fastroute.store.Store`
        protocol does not require it) keeps them until their TTL.
        """
        store = self.store
        forget = getattr(store, "forget_device", None)
        if forget is None:
            return
        dkey = store.register_device(address, device)
        keys = self.known.get(address)
        if keys is not None and dkey in keys:
            keys.remove(dkey)
            if not keys:
                del self.known[address]
        forget(dkey)

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
        self._feeds_gen += 1
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
        # the engine and the feed's bookkeeping (one C call when compiled:
        # every receiving client acks, most often a message or two at a time)
        n, mids, freed = ack_feed(self.router, feed, upto)
        if not n:
            return
        self.queued_bytes -= freed
        self.delivered += n
        if mids:
            self.store.ack(feed.dkey, mids, validate=False)
            self.caps.acked(feed.dkey, len(mids))
            self._acks_counted += 1
        if not feed.room.is_set():
            feed.room.set()
        if feed.window_full:
            # messages queued past the window: the ack made room for them
            feed.window_full = False
            if not link.paused:
                self.pull(feed)
                self.mark(link)

    # ---------------------------------------------------------- routing
    def persist(self, items: list) -> asyncio.Future:
        """Store accepted messages; :meth:`persisted` must follow when the future is done."""
        return self._putting(self.store.put_many(items, validate=False), items,
                             self.caps.stored)

    def persist_copies(self, items: list, put_copies: Callable[..., asyncio.Future]
                       ) -> asyncio.Future:
        """Store per-device copies given flat as ``device_keys, tail`` (their
        DDELIVER tails) with the store's ``put_copies``; :meth:`persisted`
        (or the keys stage's placing) must follow when the future is done.
        Only without caps: they count items or v1 tails (with caps on, the
        keys stage hands the store items)."""
        if self.caps.enabled:
            raise RuntimeError("the caps cannot count copies' tails; store them as items")
        return self._putting(put_copies(items, validate=False), items, self.caps.stored)

    def persist_tails(self, items: list) -> asyncio.Future:
        """Store accepted SENDs given as flat ``device_keys, tail`` (the gate's
        DELIVER tails); :meth:`persisted` must follow when the future is done.
        A store without ``put_tails`` gets them as ``put_many`` items."""
        put_tails = getattr(self.store, "put_tails", None)
        if put_tails is None:
            return self.persist(list(tail_items(items)))
        return self._putting(put_tails(items, validate=False), items, self.caps.stored_tails)

    def _putting(self, fut: asyncio.Future, items: list,
                 count: Callable[..., None]) -> asyncio.Future:
        """A store batch in flight: counted, and in the caps (``count``) until
        the store refuses it."""
        self._puts_in_flight += 1
        self._puts_begun += 1
        if self.caps.enabled:
            count(items)
            # a refused batch was never stored: give its counts back
            fut.add_done_callback(
                lambda f: count(items, -1) if f.cancelled() or f.exception() else None)
        return fut

    def purge_revoked(self, is_revoked: Any) -> int:
        """Forget every offline device ``is_revoked(address, device)`` says is revoked.

        A revoked credential never connects again, so what the store keeps
        for it would only wait for its TTL: the device, its stored messages
        and (once no device is left) its address go now.  Online ones are
        being closed by the upkeep; a later pass takes them.  Returns how
        many devices were forgotten.
        """
        n = 0
        forget = getattr(self.store, "forget_device", None)
        if forget is None:
            return 0
        for dkey, address, device in self.store.known_devices():
            if (address, device) in self._by_device or not is_revoked(address, device):
                continue
            forget(dkey)
            keys = self.known.get(address)
            if keys is not None and dkey in keys:
                keys.remove(dkey)
                if not keys:
                    del self.known[address]  # unknown from now on: UNKNOWN_RECIPIENT
            n += 1
        if n:
            log.info("forgot %d revoked devices and what was stored for them", n)
        return n

    async def refresh_caps(self) -> None:
        """Set the caps' counts from the store (expiry, drift), if it can count.

        Only from a quiet moment: a batch in flight during the read would be
        counted by neither side (in memory, replaced; on disk, not yet), and
        an ack applied in memory during the read may not be on disk yet (the
        read would count its messages again, and hold a caught-up recipient
        at its cap until the next refresh).
        """
        counts = getattr(self.store, "backlog_counts", None)
        if counts is None or not self.caps.enabled or self._puts_in_flight:
            return
        begun, acked = self._puts_begun, self._acks_counted
        # the acks applied so far in memory: on disk before the count is read
        await self.store.flush()
        result = await counts()
        if (self._puts_begun == begun and not self._puts_in_flight
                and self._acks_counted == acked):
            self.caps.load(result)

    def persisted(self, items: list | None, last_mid: int) -> None:
        """A store batch from :meth:`persist` was committed (route ``items``, flat
        ``address, (mid, tail), ...``) or refused (None)."""
        self._puts_in_flight -= 1
        self._route_stored(items, last_mid)

    def stored_now(self, items: list, last_mid: int) -> None:
        """A batch the store took at once (``put_now``, no future): route
        ``items`` (flat ``address, route, ...``, each route a routed tail,
        :func:`fastroute.wire.routed_tail`), as :meth:`persisted` does (it was
        never in flight)."""
        self._puts_begun += 1
        self._route_stored(items, last_mid)

    def _route_stored(self, items: list | None, last_mid: int) -> None:
        # a stored batch goes live: the live route's cursor passes its last
        # mid, and syncs waiting for that are woken (also when it was refused)
        try:
            if items is not None:
                self.route(items, ephemeral=False)
                if last_mid > self._routed_mid:
                    self._routed_mid = last_mid
        finally:
            if self._routed_waiters:
                self._wake_routed()

    def _wake_routed(self) -> None:
        # syncs waiting for the live route to catch up (called only when
        # some wait: most stored batches have none to wake)
        waiters, self._routed_waiters = self._routed_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _offer(self, build: Callable[[], list], last_mid: int, shared: bool = False) -> int:
        """The end of a committed batch of rows each meant for named devices:
        ``build()`` lists ``engine device id, payload, ...`` (flat) for the
        devices online on a link that may get them (``shared``: ``(payload,
        [engine device id, ...])`` rows, one a message stored once for many
        devices), the engine places them (those it cannot are the store's to
        feed), and the live route's cursor passes ``last_mid``.  Returns how
        many were placed."""
        self._puts_in_flight -= 1
        placed = 0
        try:
            batch = build()
            if batch:
                full: list = []
                try:
                    if shared:
                        placed = self.router.offer_shared(batch)
                    else:
                        placed = self.router.offer_flat(batch)
                except MailboxFull as exc:
                    placed = exc.entered
                    full = exc.full
                    # the items are only made when some were refused
                    self._missed(shared_items(batch) if shared else batch, full, not shared)
                # the tails the engine now holds count against each live device
                # and the relay-wide memory budget, as routed ones do (_held)
                skip = {index for index, _ in full} if full else frozenset()
                held = held_shared if shared else held_offered
                self.queued_bytes += held(self._online, batch, skip)
                self.wake()
            if last_mid > self._routed_mid:
                self._routed_mid = last_mid
            if self.queued_bytes > self.memory_budget:
                # after the cursor moved: what was just placed is in the engine
                self.spill()
        finally:
            if self._routed_waiters:
                self._wake_routed()
        return placed

    def route(self, batch: list, ephemeral: bool) -> None:
        """Route a flat ``address, route, ...`` batch (a route a routed tail or
        ``(mid, tail)``; ``address, tail, ...`` for signals) to the online
        devices of each address (no tuple a pair: ``Router.route_flat``)."""
        router = self.router
        try:
            router.route_flat(batch)
        except UnknownAddress:
            # Some recipients have no device online (the store has their
            # copy): route the rest.  route_flat applied nothing.
            batch = [x for to, payload in _pairs(batch)
                     if router.has_address(to) for x in (to, payload)]
            if batch:
                self.route(batch, ephemeral)
            return
        except MailboxFull as exc:
            self._held(batch, exc.full)
            if ephemeral:
                self._signals_dropped(exc.full)
            else:
                self._missed(batch, exc.full)
        else:
            self._held(batch, ())
        if self.queued_bytes > self.memory_budget:
            self.spill()
        self.wake()

    def _signals_dropped(self, full: list) -> None:
        # Signals are never stored: a full device misses them.  The engine
        # left its overflow flag set, though, and a device that was live has
        # nothing in the store to catch up on, so no sync would ever clear
        # it: put it back on the live route now, or it would get no signal
        # again until a persistent message happened to overflow too.
        online = self._online
        for _, dev in full:
            feed = online.get(dev)
            if feed is not None and feed.live:
                self.router.resume(dev)

    def persisted_requests(self, meta: list, mids: list) -> None:
        """Like :meth:`persisted_copies` for a stored batch of per-device sends
        (the keys stage's ``(link, id, (to, copies))`` per request, one row id
        per copy in ``mids``), without a list of the copies in between."""
        by_device = self._by_device
        self._offer(lambda: copies_online(by_device, meta, mids, "e2ee"), mids[-1])

    def stored_copies(self, meta: list, first: int, put_now: Callable[[list, int], int]) -> int:
        """Store a batch of per-device sends (the keys stage's ``(link, id, (to,
        copies))`` per request) at once with ``put_now`` (the memory store's,
        its mids from ``first`` on, the store's ``next_mid``), as the routes
        their online devices get: the store and the engine share one payload
        a copy, and nothing waits for a future.  Returns how many copies were
        stored; raises what ``put_now`` raised (then nothing was routed)."""
        routes: list = []
        batch = copies_online(self._by_device, meta, first, "e2ee", routes)
        n = put_now(routes, first)
        self._puts_begun += 1
        self._puts_in_flight += 1  # what _offer takes back
        self._offer(lambda: batch, first + n - 1)
        return n

    def persisted_copies(self, copies: list, last_mid: int) -> None:
        """Like :meth:`persisted` for per-device copies ``(address, device name,
        (mid, tail, head))``: each goes to its one device, if it is online on a
        link that negotiated e2ee; the store keeps it for the others."""
        by_device = self._by_device

        def build() -> list:
            items: list = []
            for address, name, payload in copies:
                feed = by_device.get((address, name))
                # a device online on a link that cannot read the copy gets it
                # from the store on its next link that negotiated e2ee
                if feed is not None and "e2ee" in feed.link.features:
                    items += (feed.dev, payload)
            return items

        self._offer(build, last_mid)

    def _held(self, batch: list, full: Any) -> None:
        """Count the bytes the engine now holds for each live device of the
        flat batch (``full`` indices count its pairs)."""
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
        # a full device's items come in runs (an overflowed one's are all
        # refused): its feed is looked up once a run
        last_dev = skipped = None
        for index, dev in full:
            if dev != last_dev:
                last_dev = dev
                skipped = online.get(dev)
                if skipped is not None and not skipped.live:
                    skipped = None  # not live: its bytes were never counted
            if skipped is not None:  # it was skipped, not filled
                size = _tail_len(batch[2 * index + 1])
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
        # A provider within its share is spilled only if the relay would be
        # over budget even were every provider held to its share: bytes that
        # one provider's slow devices hold (spilled or not) never push
        # another provider's devices off the live route (a group's flood at
        # one provider does not delay its members at the others).
        fair_excess = sum(min(b, share) for b in per_provider.values()) - self.memory_budget
        order = sorted((f for f in online if f.live and f.qbytes),
                       key=lambda f: (per_provider[f.provider] <= share, -f.qbytes))
        router = self.router
        for feed in order:
            if excess <= 0:
                break
            within = per_provider[feed.provider] <= share
            if within:
                if fair_excess <= 0:
                    break  # sorted: the rest are within their shares too
                fair_excess -= feed.qbytes
            router.suspend(feed.dev)
            feed.live = False
            # everything routed so far is in the engine; the sync starts
            # after the newest routed message once this device misses one
            feed.last_mid = self._routed_mid
            excess -= feed.qbytes
            self.spills += 1

    def persisted_shared(self, shared: list, last_mid: int, feature: str) -> int:
        """Like :meth:`persisted` for rows stored once for many devices:
        ``(mid, (tail, head, [(address, device name), ...]))``.  One payload
        object per row goes to every listed device online on a link that
        negotiated ``feature`` (the engine shares it, copies nothing); the
        store keeps the row for the others.  Returns how many were placed."""
        # one row a message, its devices a list cached per group: the engine
        # places the payload for each, no item a delivery
        return self._offer(lambda: shared_rows(shared, self._devices_of, feature),
                           last_mid, shared=True)

    def _devices_of(self, targets: list, feature: str) -> list:
        """The engine ids of the devices of ``targets`` (``(address, device
        name)``) online on a link that negotiated ``feature``, cached per list."""
        cached = self._fanouts.get(id(targets))
        if (cached is not None and cached[0] is targets and cached[1] == self._feeds_gen
                and cached[2] == feature):
            return cached[3]
        devs = devices_of(self._by_device, targets, feature)
        if len(self._fanouts) >= _MAX_FANOUTS:
            self._fanouts.clear()
        # the list itself is kept: its id cannot be reused while cached
        self._fanouts[id(targets)] = (targets, self._feeds_gen, feature, devs)
        return devs

    def features_changed(self) -> None:
        """A link was granted features: cached fan-outs may now include its device."""
        self._feeds_gen += 1

    def _missed(self, batch: list, full: list, flat: bool = True) -> None:
        """The engine could not place ``full``'s ``(index, device id)`` items
        of ``batch`` (flat ``key, payload, ...``; ``flat`` false: ``(key,
        payload)`` pairs): from its first miss on, the store feeds the device."""
        online = self._online
        # a device that overflowed misses every message until its sync has
        # caught up: per refused message only its mid is read, its feed is
        # looked up once a run and its sync started once
        missed: dict = {}
        last_dev = feed = None
        for index, dev in full:
            if dev != last_dev:
                last_dev = dev
                feed = online.get(dev)
                if feed is not None:
                    missed[feed] = None
            if feed is None:
                continue
            mid = wire.route_mid(batch[2 * index + 1] if flat else batch[index][1])
            if feed.live:
                # The first miss: everything of this device's before it went
                # through the live route, everything from it on (in mid
                # order) is the store's to feed.
                feed.live = False
                feed.last_mid = mid - 1
            if mid > feed.missed_mid:
                feed.missed_mid = mid
        for feed in missed:
            self.start_sync(feed)

    def _next_routed(self) -> asyncio.Future:
        """A future resolved after the next store batch is routed (or failed)."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._routed_waiters.append(fut)
        return fut

    @staticmethod
    def _sender_packer(feed: Feed) -> Any:
        """``sync_rows``' ``pack_sender`` for this device's link."""
        features = feed.link.features
        return lambda sender: pack_stored_sender(sender, features)

    # ---------------------------------------------------------- sync
    def start_sync(self, feed: Feed) -> None:
        """Run :meth:`_sync` for ``feed`` unless it is already running, or held
        until the link's first frame (:meth:`~fastroute.relay.link.Link.hold_sync`,
        whose release calls this again)."""
        if feed.sync_task is None and feed.dev >= 0 and feed.link.sync_hold is None:
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
                pushed, last, state = sync_rows(router, feed.dev, rows, routed, {},
                                                self._sender_packer(feed))
                if last is not None:
                    # past the rows passed over too (copies a link without
                    # the feature leaves in the store): a load made only of
                    # them would otherwise be made again and again, a busy
                    # loop, and with the memory store one that never yields
                    feed.last_mid = last
                if pushed:
                    self.synced += pushed
                    # the bodies plus a tail's overhead (sender, id, ts, cls;
                    # ~40 bytes): an estimate, reset when the device is empty
                    size = sum(map(len, map(_BODY, islice(rows, pushed)))) + 40 * pushed
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
        router = self.router
        out = link.out
        inflight = feed.inflight
        no_ts = feed.no_ts
        dev = feed.dev
        window = self.mailbox_capacity
        # Stop pulling while the socket's buffer is full: the messages stay
        # in the (bounded) mailbox and, past its capacity, in the store.
        while not link.paused:
            want = window - len(inflight)
            if want <= 0:
                # as many deliveries unacked as the device may have: the rest
                # wait in its mailbox until a DACK makes room (dack pulls)
                feed.window_full = True
                break
            if want > _POP_BATCH:
                want = _POP_BATCH
            # one packed DELIVER per message appended to out, its mid to
            # inflight (one C call when compiled: a device online on a busy
            # relay is pulled a message or two at a time, once per turn)
            start = len(out)
            n, held, ts_ms = pull_round(router, dev, out, inflight, want)
            if n <= 0:
                if n < 0:  # pragma: no cover - 4 G messages on one link
                    link.close(ErrorCode.OK, "sequence space exhausted; reconnect")
                break
            if ts_ms >= 0:
                # latency from acceptance to this write, sampled once per pull
                # (one call into C when compiled: a group message to N online
                # devices is N pulls)
                self.latency.observe_since_ms(ts_ms)
            feed.inflight_bytes += held
            if no_ts:
                # header policy: the relay's timestamp is withheld; DELIVER v1
                # is positional, so ts_ms stays, as 0 (same length)
                ops = wire.flat_ops(out[start:])
                del out[start:]
                out += [x[:-10] + _TS_ZERO + x[-1:] for x in ops]
            if n < want:
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
        if self._flush_scheduled is None:
            assert self._loop is not None
            self._flush_scheduled = self._loop.call_soon(self._flush)

    def write_pending(self) -> None:
        """Run the writer now if it is due (the fair scheduler does, before a
        turn's work: what earlier work delivered goes out first)."""
        handle = self._flush_scheduled
        if handle is not None:
            handle.cancel()  # one write per batch, not a second, smaller one
            self._flush()

    def _flush(self) -> None:
        """Once per loop iteration: drain ready mailboxes, write every dirty link."""
        self._flush_scheduled = None
        online = self._online
        dirty = self._dirty
        for dev in self.router.take_ready():
            feed = online.get(dev)
            if feed is not None and not feed.link.paused:
                self.pull(feed)
                dirty.add(feed.link)
        self._dirty = set()
        # links with a few ops to write go first: a quiet client's message
        # does not wait behind the encryption of a flooder's thousand replies
        heavy = []
        for link in dirty:
            if wire.op_count(link.out) > _LIGHT_OPS:
                heavy.append(link)
            else:
                link.flush()
        for link in heavy:
            link.flush()
