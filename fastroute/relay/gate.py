"""The gate stage: every check an operation passes before the relay acts on it.

The relay runs each client op through the same gate whatever provider made
the client.  The frame and op shapes are checked by the wire decoder
(:mod:`fastroute.wire`: types, arities, body size); this stage checks what
needs the relay's state:

* SEND: duplicate ids (the dedup window, :mod:`fastroute.dedup`), the
  device's body limit, the recipient's consent (DMA opt-in for other
  providers' users; an unknown address answers the same, so it cannot be
  told apart: no enumeration), a known recipient that did not block the
  sender (a block answers as an unknown address does), the message and byte
  quotas (:class:`TokenBucket`).  Accepted persistent messages go to the delivery
  stage, which stores them durably and routes them; the sender's SACK goes
  out once they are stored.
* CONSENT: a user opts in to (or out of) another provider's senders.
* Budgets (:class:`Budgets`): every op a link reads costs one token of its
  device's op budget (and its provider's); messages and body bytes are
  taken from layered buckets: device, address, provider.  Devices are
  capped per address, new devices per provider per hour.
* Abuse (:class:`Sender`): an address younger than ``new_sender_age_s``
  has a tight bucket for messages to strangers; refusals feed a decaying
  score; past thresholds the sender is throttled, then quarantined (durably,
  in the registry, until an operator lifts it).

Nothing here touches sockets or crypto.  The per-message loop is written
twice: :func:`py_accept_sends`, :func:`py_stored_sacks` and
:func:`py_flat_routes` (with the state objects :class:`PySendGate` and
:class:`PyLinkGate`) are the specification; ``ext/fastroute/_gate.pxi``
has the compiled twins that :class:`Gate` uses when the core is built.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import msgpack

from .. import identity, wire
from .._compiled import twin
from ..dedup import PENDING, DedupTable
from ..errors import ErrorCode, FastrouteError, InvalidArgument, PolicyError

if TYPE_CHECKING:
    from .delivery import Delivery, LinkPort

__all__ = ["Budgets", "Gate", "LinkGate", "PyLinkGate", "PySendGate", "SendGate", "Sender",
           "TokenBucket", "give_back", "least", "take_all", "take_upto",
           "accept_sends", "field_set", "flat_routes", "py_accept_sends", "py_field_set",
           "py_flat_routes", "py_stored_sacks", "stored_sacks"]

log = logging.getLogger("fastroute.relay")

#: the gate's refusal codes, in the order :func:`py_accept_sends` reads them
REFUSALS = (ErrorCode.BODY_TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT,
            ErrorCode.CONSENT_REQUIRED, ErrorCode.RATE_LIMITED)


class PyTokenBucket:
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


def py_take_upto(buckets: tuple, n: int) -> int:
    """Take up to ``n`` whole tokens from every bucket of a layered budget at
    once; return how many were taken (the least any layer had)."""
    avail = n
    for b in buckets:
        t = b.refill()
        if t < avail:
            avail = int(t) if t > 0 else 0
    if avail > 0:
        for b in buckets:
            b.tokens -= avail
    return avail


def py_least(buckets: tuple) -> float:
    """Refill every bucket of a layered budget; return the least any holds."""
    low = 0.0
    first = True
    for b in buckets:
        t = b.refill()
        if first or t < low:
            low = t
            first = False
    if first:
        raise ValueError("least() of no buckets")
    return low


def py_give_back(buckets: tuple, n: float) -> None:
    """Return ``n`` tokens taken by :func:`take_upto` and not used (up to each burst)."""
    for b in buckets:
        b.tokens = min(b.burst, b.tokens + n)


def py_take_all(buckets: tuple, n: float) -> bool:
    """Take ``n`` tokens from every bucket of a layered budget, or none at all."""
    for b in buckets:
        if b.refill() < n:
            return False
    for b in buckets:
        b.tokens -= n
    return True


# the implementations in use: compiled (every read of a link refills its op
# budget's buckets several times) or the specifications above
if TYPE_CHECKING:
    TokenBucket = PyTokenBucket
else:
    TokenBucket = twin(PyTokenBucket)
take_upto = twin(py_take_upto)
give_back = twin(py_give_back)
take_all = twin(py_take_all)
least = twin(py_least)


class Sender:
    """What the gate knows of one sender address, shared by all its links.

    ``born``: when the relay first saw a device of the address (wall
    seconds), None once it is older than ``new_sender_age_s``;
    ``strangers``: the new-sender bucket, one token per stranger (an
    address that never wrote to it) it starts writing to; ``score``
    (decaying, see :meth:`Gate.score`);
    ``throttle``: a bucket added to its message layers while throttled;
    ``quarantined``: the reason, while quarantined.
    """

    __slots__ = ("address", "born", "strangers", "started", "score", "stamp", "throttle",
                 "quarantined")

    def __init__(self, address: str, born: float | None) -> None:
        self.address = address
        self.born = born
        self.strangers: TokenBucket | None = None
        #: strangers it already wrote to while new (each cost one token)
        self.started: set[str] = set()
        self.score = 0.0
        self.stamp = time.monotonic()
        self.throttle: TokenBucket | None = None
        self.quarantined: str | None = None


class Budgets:
    """One link's layered budgets: ``ops``, ``msgs`` and ``bytes`` are tuples of
    :class:`TokenBucket` (device, then address and provider layers);
    ``sender`` is the address's :class:`Sender`."""

    __slots__ = ("ops", "msgs", "bytes", "sender", "watched")

    def __init__(self, ops: tuple, msgs: tuple, bytes_: tuple, sender: Sender) -> None:
        self.ops = ops
        self.msgs = msgs
        self.bytes = bytes_
        self.sender = sender
        #: the SENDs of this link go through the sender screen first
        self.watched = sender.born is not None or sender.quarantined is not None


# -- the per-message loop: specification ---------------------------------------

class PySendGate:
    """What the SEND check reads of the relay: one per relay, shared by every link.

    ``known``: address -> store device keys; ``dedup``: the relay's dedup
    window; ``consent``: address -> providers it accepts (None when consent
    is not required); ``taps``: callables told of each accepted message;
    ``count_error(code)``; ``sack_op(id, code)`` packs a refusal;
    ``refusals``: the codes for body too large, unknown recipient, consent
    required, rate limited, in that order; ``blocks``: address -> the
    addresses and ``"@provider"`` names it blocked (no entry when none).
    """

    __slots__ = ("known", "dedup", "consent", "taps", "count_error", "sack_op", "refusals",
                 "blocks")

    def __init__(self, known: dict, dedup: Any, consent: dict | None, taps: list,
                 count_error: Callable[[int], None], sack_op: Callable[..., bytes],
                 refusals: tuple, blocks: dict) -> None:
        self.blocks = blocks
        self.known = known
        self.dedup = dedup
        self.consent = consent
        self.taps = taps
        self.count_error = count_error
        self.sack_op = sack_op
        self.refusals = refusals


class PyLinkGate:
    """One link's sender as the SEND check sees it.

    ``link`` is the waiter token's owner (a resent pending id is queued as
    ``(link, id)``); ``out`` the link's outgoing op list; ``sender`` and
    ``sender_packed`` its address (str and packed); ``provider`` and ``own``
    (``"@" + provider``); ``max_body``; ``msg_bucket`` and ``byte_bucket``
    the device's quotas (:class:`TokenBucket`, kept across its
    reconnections); ``msg_tokens`` and ``byte_tokens`` the quota available
    to this read (refilled from the buckets before the loop, stored back
    after).
    """

    __slots__ = ("link", "out", "sender", "sender_packed", "provider", "own", "max_body",
                 "msg_bucket", "byte_bucket", "msg_tokens", "byte_tokens")

    def __init__(self, link: Any, out: list, sender: str, sender_packed: bytes,
                 provider: str, max_body: int, msg_bucket: Any, byte_bucket: Any) -> None:
        self.link = link
        self.out = out
        self.sender = sender
        self.sender_packed = sender_packed
        self.provider = provider
        self.own = "@" + provider
        self.max_body = max_body
        self.msg_bucket = msg_bucket
        self.byte_bucket = byte_bucket
        self.msg_tokens: Any = 0.0
        self.byte_tokens: Any = 0.0


def py_accept_sends(gate: PySendGate, lg: PyLinkGate, sends: list, now: float, now_ms: int,
                    ts_packed: bytes, store_items: list, meta: list,
                    first_mid: int | None = None) -> list | None:
    """Gate a read's SEND ops (the relay's hot loop); see ``_gate.pxi`` for the contract.

    ``sends`` are flat, ``id, to, body, cls`` a SEND (as
    :func:`fastroute.wire.decode_sends` gives them).  Returns the ephemeral
    messages as a flat ``to, tail, ...`` list (or None), for
    ``Router.route_flat``: a signal's payload is its tail alone (mid 0,
    never stored; no tuple a message); the quota
    left is written back to ``lg`` when any was spent.  With ``first_mid``
    (a store that takes the batch at once, from that mid on) a persistent
    message is decided and SACKed here, and its route (its routed tail,
    :func:`fastroute.wire.routed_tail`: ``(mid, tail)`` as one object) goes
    to ``meta`` as ``to, route`` and to ``store_items`` as
    ``device_keys, route``.  Without it, one gets a PENDING entry, ``to,
    tail, id`` in ``meta`` and ``device_keys, tail`` in ``store_items``
    (what a store's ``put_tails`` takes: the tail holds what it keeps).
    """
    out, sender, conn = lg.out, lg.sender, lg.link
    known, dedup, consent, taps = gate.known, gate.dedup, gate.consent, gate.taps
    count_error, sack_op, blocks = gate.count_error, gate.sack_op, gate.blocks
    too_large, unknown, consent_required, rate_limited = gate.refusals
    msg_tokens, byte_tokens = lg.msg_tokens, lg.byte_tokens
    max_body, own, provider = lg.max_body, lg.own, lg.provider
    spent = False
    ephemeral: list | None = None
    if len(sends) % 4:
        raise InvalidArgument("sends hold id, to, body, cls for each SEND")
    for k in range(0, len(sends), 4):
        cid, to, body, cls = sends[k:k + 4]
        if type(cid) is not bytes or len(cid) != 16:
            raise InvalidArgument("message id must be 16 bytes")
        seen = dedup.lookup(sender, cid, now)
        if seen is not None:
            if seen == PENDING:
                dedup.wait(sender, cid, (conn, cid))
            else:
                out.append(sack_op(cid, seen))
            continue
        size = len(body)
        # a recipient that blocked the sender (its address or provider) is,
        # to that sender, an address that does not exist; nobody's blocks:
        # one size test, a recipient without blocks: one lookup
        hidden = False
        if blocks:
            blocked = blocks.get(to)
            if blocked is not None and (sender in blocked or own in blocked) and to != sender:
                hidden = True
        if size > max_body:
            code = too_large
        elif consent is not None and not to.endswith(own) and not (
                to in known and not hidden and (accepted := consent.get(to)) is not None
                and (provider in accepted or "*" in accepted)):
            # an unknown address gets the same answer as one that did not
            # opt in: a sender the recipient never accepted cannot tell them apart
            code = consent_required
        elif hidden or to not in known:
            code = unknown
        elif msg_tokens < 1.0 or byte_tokens < size:
            code = rate_limited  # a refused message costs no quota
        else:
            msg_tokens -= 1.0
            byte_tokens -= size
            spent = True
            code = None
        if code is not None:
            # A refusal is not remembered: the sender may retry the same id.
            count_error(code)
            out.append(sack_op(cid, int(code)))
            continue
        tail = wire.py_deliver_tail(lg.sender_packed, cid, body, ts_packed, cls)
        if cls == 1:  # CLS_EPHEMERAL
            if ephemeral is None:
                ephemeral = []
            ephemeral += (to, tail)
            out.append(wire.py_sack_ok_op(cid))
            dedup.begin(sender, cid, 0, now)
        elif first_mid is not None:
            # one object, the engine's payload and the store's message
            route = wire.routed_tail(first_mid, tail)
            store_items += (known[to], route)
            meta += (to, route)
            first_mid += 1
            out.append(wire.py_sack_ok_op(cid))
            dedup.begin(sender, cid, 0, now)
        else:
            dedup.begin(sender, cid, PENDING, now)
            store_items += (known[to], tail)  # for put_tails: the tail holds the fields
            meta += (to, tail, cid)  # flat: no tuple a message
        if taps:
            for tap in taps:
                tap(now_ms, sender, to, size, cls)
    if spent:
        lg.msg_tokens = msg_tokens
        lg.byte_tokens = byte_tokens
    return ephemeral


def py_stored_sacks(meta: list, sender: str, dedup: Any, now: float, out: list,
                    ack_all: Callable) -> None:
    """Decide each stored message's dedup entry, answer its waiters, SACK the sender
    (``meta`` is flat: ``to, tail, id`` a message)."""
    if len(meta) % 3:
        raise InvalidArgument("meta holds to, tail, id for each message")
    append = out.append
    for cid in meta[2::3]:
        waiters = dedup.finish(sender, cid, 0, now)
        if waiters is not None:
            ack_all(None, cid, 0, waiters)
        append(wire.py_sack_ok_op(cid))


def py_flat_routes(meta: list, mids: list) -> list:
    """``[to, (mid, tail), ...]`` (flat, for ``Router.route_flat``) from the
    gate's flat ``meta`` (``to, tail, id`` a message) and the store's mids."""
    return [x for to, tail, mid in zip(meta[0::3], meta[1::3], mids)
            for x in (to, (mid, tail))]


def py_field_set(items: list, index: int, step: int = 0) -> set:
    """The distinct ``item[index]`` of ``items``, or with ``step`` the distinct
    ``items[index::step]`` of a flat list (the recipients of a batch's SENDs or
    stored messages, once per batch rather than per message)."""
    if step:
        if step < 0 or index < 0:
            raise ValueError("index and step are not negative")
        return set(items[index::step])
    return {item[index] for item in items}


#: the implementations in use: compiled (``_gate.pxi``) or the specifications above
SendGate = twin(PySendGate)
LinkGate = twin(PyLinkGate)
accept_sends = twin(py_accept_sends)
stored_sacks = twin(py_stored_sacks)
flat_routes = twin(py_flat_routes)
field_set = twin(py_field_set)


# -- the stage -----------------------------------------------------------------

class Gate:
    """The gate stage of one relay: its SEND check, consent table, budgets and abuse rules.

    ``accept(link, sends)`` is the SEND path: checks, then hands accepted
    persistent messages to the delivery stage (store, then route) and
    answers the sender once they are durable.  The relay's counters live in
    ``count_error``, a callable it passes in.
    """

    def __init__(self, config: Any, delivery: "Delivery", registry: identity.Registry,
                 count_error: Callable[[int, int], None]) -> None:
        self.config = config
        self.delivery = delivery
        self.registry = registry
        self._count_error = count_error
        self.trust: identity.Trust = identity.Trust.load(registry)
        self._trust_version = registry.version()
        #: a sender was quarantined here since the trust was last applied
        self._quarantined_here = False
        self.dedup = DedupTable(config.dedup_window_s, config.dedup_max_entries,
                                presize=True)
        #: address -> providers (or "*") whose users it accepts messages from
        self.consent: dict[str, frozenset[str]] = registry.consents()
        self.taps: list = []
        self.accepted = 0
        #: SENDs refused because the recipient had not opted in (feeds the score)
        self.consent_refusals = 0
        # Buckets belong to the device, not the link: reconnecting must not
        # refill a burst.  (Kept in memory: bounded by the known devices.)
        self._buckets: dict[tuple[str, str], tuple[TokenBucket, TokenBucket, TokenBucket]] = {}
        self._abuckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self._pbuckets: dict[str, tuple[TokenBucket, TokenBucket, TokenBucket]] = {}
        self._senders: dict[str, Sender] = {}
        # (address, provider) -> consent writes: [allow, [(link, id) ...]], the
        # first in flight, at most one more queued
        self._consent_writes: dict[tuple[str, str], list] = {}
        # devices the relay has seen: address -> {device: first_seen}; the
        # per-provider times of the last hour's new devices
        self._seen: dict[str, dict[str, int]] = {}
        self._new_devices: dict[str, deque] = {}
        now = int(time.time())
        for address, device, provider, first in registry.devices_seen():
            self._seen.setdefault(address, {})[device] = first
            if first > now - 3600:
                self._new_devices.setdefault(provider, deque()).append(first)
        for q in self._new_devices.values():
            q_sorted = sorted(q)
            q.clear()
            q.extend(q_sorted)
        # (writer, reader) pairs of messages to new senders: a new sender's
        # message to someone who wrote to it first is not to a stranger
        self._contacts: set[tuple[str, str]] = set()
        self._contacts_old: set[tuple[str, str]] = set()
        self._young: set[str] = set()
        #: address -> the addresses and "@provider" names it blocked (the
        #: safety stage fills it; the SEND loop reads it)
        self.blocks: dict[str, set[str]] = {}
        #: told of each stored batch: its sender and distinct recipients (the
        #: safety stage's :meth:`~fastroute.relay.safety.Safety.delivered`:
        #: spam reports count only pairs the relay carried), or None
        self.on_carried: Callable[[str, set], None] | None = None
        self._tables = SendGate(delivery.known, self.dedup,
                                self.consent if config.require_consent else None,
                                self.taps, self.count_error, wire.sack_op, REFUSALS,
                                self.blocks)

    def count_error(self, code: int, n: int = 1) -> None:
        """Count ``n`` refusals (the relay's counter), noting consent refusals for the score."""
        if code == _CONSENT_REQUIRED:
            self.consent_refusals += n
        self._count_error(code, n)

    # ------------------------------------------------------------ identity
    def reload_trust(self) -> bool:
        """Reload providers and revocations if the registry changed (one cheap PRAGMA).

        True when it did.  A quota or quarantine change reaches the devices
        already online.
        """
        version = self.registry.version()
        if version != self._trust_version:
            try:
                trust = identity.Trust.load(self.registry)
            except FastrouteError as exc:
                # e.g. a header policy written past add_provider: keep the old trust
                log.error("registry refused: %s", exc, extra={"event": "registry.refused"})
                self._trust_version = version
                return False
            old, self.trust = self.trust, trust
            self._trust_version = version
            if self._quarantined_here or not trust.same_policies(old):
                # a quota, a header policy or a quarantine changed (or a
                # sender was quarantined here, ahead of the registry): every
                # bucket and live link takes it.  A device revocation (what
                # providers do every day) changes none of them, and this walks
                # every device the relay has seen.
                self._quarantined_here = False
                self._apply_limits()
            return True
        return False

    def authenticate(self, hello: bytes, remote_static: bytes) -> identity.Credential:
        """Who is this device: its credential chain, checked against the handshake's key.

        Then the device caps: a device never seen before must fit the
        address's device cap and its provider's hourly cap on new devices.
        Raises the typed refusal (AuthError and kin) the link sends in its BYE.
        """
        # A revocation or enrolment written a moment ago must count for
        # this device already.
        self.reload_trust()
        raw = wire.decode_client_hello(hello)["cred"]
        cred = identity.verify_credential(self.trust, raw, remote_static, int(time.time()))
        self._note_device(cred)
        return cred

    def _note_device(self, cred: identity.Credential) -> None:
        address, device, provider = cred.address, cred.device, cred.provider
        devices = self._seen.get(address)
        if devices is not None and device in devices:
            return
        lim = self.config.limits
        now = int(time.time())
        cap = lim.max_devices_per_address
        if cap and devices is not None:
            live = sum(1 for d in devices if not self.trust.is_revoked(address, d))
            if live >= cap:
                raise PolicyError(f"this address has {cap} devices already",
                                  code=ErrorCode.DEVICE_LIMIT)
        hourly = lim.new_devices_per_provider_per_hour
        recent = self._new_devices.setdefault(provider, deque())
        while recent and recent[0] <= now - 3600:
            recent.popleft()
        if hourly and len(recent) >= hourly:
            raise PolicyError("too many new devices of this provider in the last hour; "
                              "retry later", code=ErrorCode.NEW_DEVICE_LIMIT)
        recent.append(now)
        self._seen.setdefault(address, {})[device] = now
        # durable off the event loop (the registry fsyncs); the in-memory
        # copy above already counts
        row = (address, device, provider, now)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - the relay always runs in a loop
            self.registry.note_devices([row])
            return
        fut = loop.run_in_executor(None, self.registry.note_devices, [row])
        fut.add_done_callback(_log_failure)

    def check_live(self, cred: identity.Credential, now: int) -> None:
        """AuthError if ``cred`` was revoked or has expired since its link opened."""
        self.trust.check_live(cred, now)

    # ------------------------------------------------------------ budgets
    def _device_rates(self, provider: str) -> tuple[float, float]:
        lim = self.config.limits
        try:
            quota = self.trust.quota(provider)
        except FastrouteError:
            quota = {}
        return (min(lim.msgs_per_s, quota.get("msgs_per_s") or lim.msgs_per_s),
                min(lim.bytes_per_s, quota.get("bytes_per_s") or lim.bytes_per_s))

    def _provider_rates(self, provider: str) -> tuple[float, float, float]:
        lim = self.config.limits
        try:
            quota = self.trust.quota(provider)
        except FastrouteError:
            quota = {}
        return (float(quota.get("provider_msgs_per_s") or lim.provider_msgs_per_s),
                float(quota.get("provider_bytes_per_s") or lim.provider_bytes_per_s),
                float(quota.get("provider_ops_per_s") or lim.provider_ops_per_s))

    def _apply_limits(self) -> None:
        """Set every existing bucket's rate from the current trust (live links too)."""
        lim = self.config.limits
        for (address, _), (msgs, nbytes, _ops) in self._buckets.items():
            msgs.rate, nbytes.rate = self._device_rates(address.rpartition("@")[2])
        burst_s = lim.provider_burst_s
        for provider, buckets in self._pbuckets.items():
            for b, rate in zip(buckets, self._provider_rates(provider)):
                # a rate of 0 means no such layer: a bucket that never runs dry
                b.rate = rate if rate > 0 else _UNLIMITED
                b.burst = rate * burst_s if rate > 0 else _UNLIMITED
        quarantined = self.trust.quarantined
        for address, sender in self._senders.items():
            why = quarantined.get(address)
            was = sender.quarantined
            sender.quarantined = why[1] if why is not None else None
            if was is not None and why is None:
                # lifted by an operator: a fresh start
                sender.score = 0.0
                sender.throttle = None
                if sender.strangers is not None:
                    sender.strangers.tokens = sender.strangers.burst
        for feed in self.delivery.feeds():
            feed.no_ts = self.withholds_ts(feed.provider)
            budgets = getattr(feed.link, "budgets", None)
            if budgets is not None:
                budgets.watched = (budgets.sender.born is not None
                                   or budgets.sender.quarantined is not None)

    def withholds_ts(self, provider: str) -> bool:
        """Whether ``provider``'s header policy withholds the relay's timestamp."""
        try:
            return "ts_ms" in self.trust.provider(provider).withhold
        except FastrouteError:
            return False

    def _sender(self, address: str) -> Sender:
        sender = self._senders.get(address)
        if sender is None:
            devices = self._seen.get(address)
            born: float | None = float(min(devices.values())) if devices else time.time()
            assert born is not None
            if time.time() - born >= self.config.limits.new_sender_age_s:
                born = None
            else:
                self._young.add(address)
            sender = self._senders[address] = Sender(address, born)
            why = self.trust.quarantined.get(address)
            if why is not None:
                sender.quarantined = why[1]
        return sender

    def sender_of(self, address: str) -> Sender:
        """What the sender rules know of ``address`` (created on first use)."""
        return self._sender(address)

    def first_seen(self, address: str) -> float | None:
        """When the relay first saw a device of ``address`` (wall seconds), or None."""
        devices = self._seen.get(address)
        return float(min(devices.values())) if devices else None

    def budgets(self, cred: identity.Credential) -> Budgets:
        """The layered budgets of a device that just authenticated."""
        lim = self.config.limits
        address, device, provider = cred.address, cred.device, cred.provider
        key = (address, device)
        dev = self._buckets.get(key)
        if dev is None:
            mps, bps = self._device_rates(provider)
            dev = self._buckets[key] = (TokenBucket(mps, lim.msgs_burst),
                                        TokenBucket(bps, lim.bytes_burst),
                                        TokenBucket(lim.ops_per_s, lim.ops_burst))
        addr = self._abuckets.get(address)
        if addr is None:
            addr = self._abuckets[address] = (
                _bucket(lim.address_msgs_per_s, lim.address_msgs_burst),
                _bucket(lim.address_bytes_per_s, lim.address_bytes_burst))
        prov = self._pbuckets.get(provider)
        if prov is None:
            rates = self._provider_rates(provider)
            prov = self._pbuckets[provider] = tuple(  # type: ignore[assignment]
                _bucket(r, r * lim.provider_burst_s) for r in rates)
        assert prov is not None
        return Budgets((dev[2], prov[2]), (dev[0], addr[0], prov[0]),
                       (dev[1], addr[1], prov[1]), self._sender(address))

    def charge_op(self, link: "LinkPort") -> bool:
        """Charge one non-SEND op to the link's op budget; False past it."""
        budgets = link.budgets
        if budgets is None:
            return True
        if take_upto(budgets.ops, 1):
            return True
        self.count_error(ErrorCode.RATE_LIMITED)
        return False

    # ------------------------------------------------------------ SEND
    def admit(self, link: "LinkPort", cred: identity.Credential) -> Any:
        """The SEND-check state (a :data:`LinkGate`) of a link whose device just
        authenticated: its sender, limits and quotas; sets ``link.budgets``."""
        address, provider = cred.address, cred.provider
        quota = self.trust.quota(provider)
        lim = self.config.limits
        budgets = link.budgets = self.budgets(cred)
        max_body = min(lim.max_body, quota.get("max_body") or lim.max_body)
        return LinkGate(link, link.out, address, msgpack.packb(address), provider, max_body,
                        budgets.msgs[0], budgets.bytes[0])

    def _refuse(self, link: "LinkPort", sends: list, code: int) -> None:
        # a flooder's refused SENDs come by the hundred: counted once, and
        # their SACKs made in one call
        if sends:
            self.count_error(code, len(sends) // 4)
            link.out.extend(wire.sack_ops(sends[0::4], code))

    def _screen(self, link: "LinkPort", budgets: Budgets, sends: list) -> list:
        """The sender rules, for links whose address is new or quarantined:
        quarantine refuses everything; a new sender's messages to strangers
        take the new-sender bucket (relaxing with age); refusals feed its score."""
        sender = budgets.sender
        if sender.quarantined is not None:
            self._refuse(link, sends, ErrorCode.QUARANTINED)
            return []
        born = sender.born
        if born is None:
            budgets.watched = False
            return sends
        lim = self.config.limits
        age = time.time() - born
        if age >= lim.new_sender_age_s:
            sender.born = None
            self._young.discard(sender.address)
            budgets.watched = False
            return sends
        # tighter limits that relax linearly with age, to 10x at new_sender_age_s
        factor = 1.0 + 9.0 * age / lim.new_sender_age_s
        bucket = sender.strangers
        if bucket is None:
            bucket = sender.strangers = TokenBucket(lim.new_sender_msgs_per_s,
                                                    lim.new_sender_burst)
        bucket.rate = lim.new_sender_msgs_per_s * factor
        bucket.burst = lim.new_sender_burst * factor
        me = sender.address
        contacts, old = self._contacts, self._contacts_old
        started = sender.started
        if field_set(sends, 1, 4) <= started:
            return sends  # only conversations it already has: the common case
        if type(sends) is not list:
            sends = list(sends)  # the compiled decoder's run, read op by op below
        keep: list = []
        refused: list = []
        for k in range(0, len(sends), 4):
            op = sends[k:k + 4]
            to = op[1]
            if to == me or to in started or (to, me) in contacts or (to, me) in old:
                keep += op
            elif len(started) < _MAX_STARTED and bucket.take(1.0):
                # the first message to each stranger costs a token; the rest
                # of that conversation is held to the ordinary limits
                started.add(to)
                keep += op
            else:
                refused += op
        if refused:
            self._refuse(link, refused, ErrorCode.RATE_LIMITED)
            self.score(sender, len(refused) // 4)
        return keep

    def score(self, sender: Sender, points: float, cause: str = "") -> None:
        """Add ``points`` to a sender's abuse score (halving every hour);
        throttle or quarantine it past the thresholds (``cause`` goes in the
        quarantine's reason)."""
        lim = self.config.limits
        now = time.monotonic()
        sender.score = sender.score * 0.5 ** ((now - sender.stamp) / 3600.0) + points
        sender.stamp = now
        if sender.quarantined is not None:
            return
        if sender.score >= lim.quarantine_score:
            reason = f"abuse score {sender.score:.0f}" + (f" ({cause})" if cause else "")
            sender.quarantined = reason
            # ahead of the registry: the next reload re-applies the trust's
            # quarantines whatever else changed (an operator may lift it
            # before the poll sees it recorded)
            self._quarantined_here = True
            log.warning("a sender was quarantined (%s)", reason)
            # its live links screen their next SENDs at once, not after the
            # registry write comes back (rare: a scan of the links is fine)
            for feed in self.delivery.feeds():
                budgets = getattr(feed.link, "budgets", None)
                if budgets is not None and budgets.sender is sender:
                    budgets.watched = True
            fut = asyncio.get_running_loop().run_in_executor(
                None, self.registry.quarantine, sender.address, reason)
            fut.add_done_callback(_log_failure)
        elif sender.score >= lim.throttle_score and sender.throttle is None:
            rate = lim.throttled_msgs_per_s
            sender.throttle = TokenBucket(rate, max(1.0, rate * 5))
            log.info("a sender was throttled (abuse score %.0f)", sender.score)

    def accept(self, link: "LinkPort", sends: list) -> None:
        """Run a read's SEND ops (flat: ``id, to, body, cls`` a SEND) through
        the check; store and route what passes.

        The hot loop of the relay: everything per message happens in one
        call (:func:`accept_sends`: dedup entries, quota arithmetic, the
        packed DELIVER tail), and the bookkeeping that can be done once per
        read is done here: the op budget (every SEND, refused or not, costs
        one op), the sender screen, and the layered message and byte budgets
        (the least any layer has is what the loop may spend).
        """
        lg = link.gate_state
        budgets = link.budgets
        n = len(sends) // 4  # flat: id, to, body, cls a SEND
        allowed = take_upto(budgets.ops, n)
        if allowed < n:
            link.refused_ops += n - allowed
            self._refuse(link, sends[4 * allowed:], ErrorCode.RATE_LIMITED)
            sends = sends[:4 * allowed]
        if budgets.watched:
            sends = self._screen(link, budgets, sends)
        delivery = self.delivery
        if not sends:
            delivery.mark(link)
            return
        msgs, nbytes = budgets.msgs, budgets.bytes
        throttle = budgets.sender.throttle
        if throttle is not None:
            msgs = msgs + (throttle,)
        m0 = least(msgs)
        b0 = least(nbytes)
        lg.msg_tokens = m0
        lg.byte_tokens = b0
        refusals = self.consent_refusals
        now_ms = int(time.time() * 1000)
        store_items: list = []
        meta: list = []
        if self.delivery.caps.full:
            sends = self._refuse_full(link, sends)
        store = delivery.store
        put_now = getattr(store, "put_now", None)
        next_mid = getattr(store, "next_mid", None)
        # a store that takes a batch at once (the memory store): each message
        # is decided, SACKed and given its route in the loop, with no second
        # pass after a future (the caps count a batch through that pass)
        first = (next_mid() if put_now is not None and next_mid is not None
                 and not delivery.caps.enabled else None)
        ephemeral = accept_sends(self._tables, lg, sends, time.monotonic(), now_ms,
                                 wire.ts_packed(now_ms), store_items, meta, first)
        spent = m0 - lg.msg_tokens
        if spent:
            for b in msgs:
                b.tokens -= spent
            spent = b0 - lg.byte_tokens
            for b in nbytes:
                b.tokens -= spent
        if self.consent_refusals != refusals:
            # probing addresses that did not opt in is what a spammer does
            self.score(budgets.sender, self.consent_refusals - refusals)
        if ephemeral:
            self.accepted += len(ephemeral) // 2
            delivery.route(ephemeral, ephemeral=True)
        if store_items and first is not None and put_now is not None:
            self._stored_now(link, put_now, store_items, meta, first)
        elif store_items:
            link.storing += 1
            fut = delivery.persist_tails(store_items)
            if fut.done():
                # the memory store answers at once: route and SACK now, not
                # a loop iteration later (one hop less for every message)
                self._stored(link, meta, fut)
            else:
                fut.add_done_callback(lambda f: self._stored(link, meta, f))
        delivery.mark(link)

    def _refuse_full(self, link: "LinkPort", sends: list) -> list:
        """SACK ``RECIPIENT_FULL`` to persistent SENDs for a recipient at a cap.

        Runs only while some recipient is at a cap.  A resend of an id already
        in the dedup window passes: it gets its first answer, not a refusal.
        """
        full = self.delivery.caps.full
        dedup = self.dedup
        sender = link.address
        now = time.monotonic()
        keep: list = []
        code = int(ErrorCode.RECIPIENT_FULL)
        for k in range(0, len(sends), 4):  # flat: id, to, body, cls a SEND
            cid, to, body, cls = sends[k:k + 4]
            if (to in full and cls == 0 and type(cid) is bytes and len(cid) == 16
                    and self._may_write(link, to)
                    and dedup.lookup(sender, cid, now) is None):
                self.count_error(code)
                link.out.append(wire.sack_op(cid, code))
                continue
            keep += (cid, to, body, cls)
        if len(keep) < len(sends):
            self.delivery.mark(link)
        return keep

    def _may_write(self, link: "LinkPort", to: str) -> bool:
        """Whether ``link``'s user may message ``to`` (consent, blocks): a sender who
        may not gets the unknown-address answer from the SEND loop, never a code
        that tells the address exists (such as ``RECIPIENT_FULL``)."""
        blocked = self.blocks.get(to)
        if blocked is not None and to != link.address and (
                link.address in blocked or "@" + link.provider in blocked):
            return False
        if not self.config.require_consent or to.endswith("@" + link.provider):
            return True
        accepted = self.consent.get(to)
        return accepted is not None and (link.provider in accepted or "*" in accepted)

    def _stored(self, link: "LinkPort", meta: list, fut: asyncio.Future) -> None:
        """The store answered a batch: route it, then answer every sender."""
        link.storing -= 1
        delivery = self.delivery
        dedup = self.dedup
        sender = link.address
        try:
            # one call for the common answer (the memory store's, a message at
            # a time, comes here for every read); a refusal is the exception
            try:
                mids = fut.result()
                exc: BaseException | None = None
            except asyncio.CancelledError:
                exc = FastrouteError("store closed", code=ErrorCode.STORE_FAILED)
            except Exception as refused:  # noqa: BLE001 - any refusal is answered alike
                exc = refused
            if exc is not None:
                delivery.persisted(None, 0)
                code = int(getattr(exc, "code", ErrorCode.STORE_FAILED))
                log.error("store refused a batch of %d messages (code %d)", len(meta) // 3,
                          code)
                for cid in meta[2::3]:
                    # refused, so not remembered: the sender may retry the same id
                    self.ack_all(link, cid, code, dedup.forget(sender, cid))
                return
            delivery.persisted(flat_routes(meta, mids), mids[-1])
            self._carried(sender, meta, 3)
            out = link.out if link.is_open() else []
            # per message: dedup entry stored, its waiters answered, SACK-ok to the sender
            stored_sacks(meta, sender, dedup, time.monotonic(), out, self.ack_all)
            delivery.mark(link)
        finally:
            link.stored_all()

    def _stored_now(self, link: "LinkPort", put_now: Callable[[list, int], int],
                    items: list, routes: list, first: int) -> None:
        """Store a batch :func:`accept_sends` already decided (``first``: its
        first mid, from the store's ``next_mid``; ``items`` flat, device keys
        and route a message) and route it.

        Its SACK-oks are in ``link.out`` already.  The relay's own items never
        make ``put_now`` fail; if it did, not one of those SACK-oks may go out:
        the link is closed with STORE_FAILED and the ids forgotten, so the
        client's resends (of every SEND it has no SACK for) are taken anew.
        """
        try:
            n = put_now(items, first)
        except Exception:
            log.error("store refused a batch of %d messages (code %d)", len(items) // 2,
                      ErrorCode.STORE_FAILED, exc_info=True)
            sender = link.address
            for route in items[1::2]:  # device keys, route a message
                self.dedup.forget(sender, wire.tail_fields(wire.route_parts(route)[1])[1])
            link.out.clear()
            self.count_error(ErrorCode.STORE_FAILED)
            link.close(ErrorCode.STORE_FAILED, "store failed")
            return
        self.delivery.stored_now(routes, first + n - 1)
        self._carried(link.address, routes, 2)

    def _carried(self, sender: str, meta: list, step: int) -> None:
        """Bookkeeping of a stored batch of ``sender``'s (flat ``meta``, its
        recipient every ``step``-th entry from the first): counted, and
        recorded for the new-sender rule and the spam reports."""
        self.accepted += len(meta) // step
        young = self._young
        carried = self.on_carried
        if young or carried is not None:
            tos = field_set(meta, 0, step)  # the distinct recipients, once for both
            if young:
                # who wrote to a new sender: its answers to them are not to strangers
                contacts = self._contacts
                for to in tos & young:
                    contacts.add((sender, to))
                if len(contacts) > _MAX_CONTACTS:
                    self._contacts_old, self._contacts = contacts, set()
            if carried is not None:
                carried(sender, tos)

    def ack_all(self, link: "LinkPort | None", cid: bytes, code: int,
                waiters: list | None) -> None:
        """SACK ``cid`` with ``code`` to ``link`` and to every ``(link, id)`` waiter."""
        if link is not None and link.is_open():
            link.out.append(wire.sack_op(cid, code))
            self.delivery.mark(link)
        for other, wcid in waiters or ():
            if other.is_open():
                other.out.append(wire.sack_op(wcid, code))
                self.delivery.mark(other)

    def set_consent(self, link: "LinkPort", cid: bytes, provider: str, allow: bool) -> None:
        """A user opts in to (or out of) another provider's senders; ack once durable.

        One registry write (fsync'd) per change, not per op: a CONSENT that
        changes nothing is acked at once, and CONSENTs arriving while a write
        for the same (address, provider) is in flight wait for it (the same
        choice) or are written once after it (the opposite one, the last
        wins), so a flood of them costs op tokens, not fsyncs.
        """
        address = link.address
        key = (address, provider)
        queue = self._consent_writes.get(key)
        if queue is None:
            if (provider in self.consent.get(address, ())) == allow:
                self.ack_all(link, cid, 0, None)
                return
            self._consent_writes[key] = queue = []
            queue.append([allow, [(link, cid)]])
            self._write_consent(key)
            return
        last = queue[-1]
        if last[0] == allow:
            last[1].append((link, cid))
        elif len(queue) == 1:
            queue.append([allow, [(link, cid)]])
        else:
            # [written, opposite, ...]: the queued opposite of the opposite is
            # this one again: the last word wins, all of them wait for it
            queue[1][0] = allow
            queue[1][1].append((link, cid))

    def _write_consent(self, key: tuple[str, str]) -> None:
        address, provider = key
        queue = self._consent_writes[key]
        allow, waiters = queue[0]

        def done(fut: asyncio.Future) -> None:
            if fut.exception() is not None:
                log.error("could not record a consent change: %s", type(fut.exception()).__name__)
                code = int(ErrorCode.STORE_FAILED)
            else:
                accepted = set(self.consent.get(address, ()))
                if allow:
                    accepted.add(provider)
                else:
                    accepted.discard(provider)
                if accepted:
                    self.consent[address] = frozenset(accepted)
                else:
                    self.consent.pop(address, None)
                code = 0
            for link, cid in waiters:
                self.ack_all(link, cid, code, None)
            queue.pop(0)
            if queue:
                self._write_consent(key)
            else:
                del self._consent_writes[key]

        # The registry commits with fsync: off the event loop.
        fut = asyncio.get_running_loop().run_in_executor(
            None, self.registry.set_consent, address, provider, allow)
        fut.add_done_callback(done)

    def standing(self, address: str) -> str:
        """``"quarantined"``, ``"throttled"``, ``"new"`` or ``"ok"``: how the
        sender rules treat ``address`` now (operators and tests)."""
        sender = self._senders.get(address)
        if sender is None:
            return "quarantined" if address in self.trust.quarantined else "ok"
        if sender.quarantined is not None:
            return "quarantined"
        if sender.throttle is not None:
            return "throttled"
        return "new" if sender.born is not None else "ok"

    def quarantined(self) -> dict[str, str]:
        """Quarantined senders known to this relay: address -> reason (operators only)."""
        out = {a: why for a, (_, why) in self.trust.quarantined.items()}
        for address, sender in self._senders.items():
            if sender.quarantined is not None:
                out.setdefault(address, sender.quarantined)
        return out

    def expire(self) -> None:
        """Housekeeping: forget dedup entries older than the window, and the
        budgets and sender records of devices and addresses that are offline
        and that a fresh record would equal (full buckets, no score left)."""
        self.dedup.expire()
        self.prune()

    def prune(self) -> int:
        """Drop what the gate keeps per device and per address when nothing
        would change by dropping it: no live link uses it, its buckets are
        full again (a reconnect gets a full burst either way), and its sender
        record is old, unthrottled, unquarantined, its score decayed to ~0.
        Without this the tables grow with every device the relay ever saw.
        Returns how many entries went."""
        live_buckets: set[int] = set()
        live_addresses: set[str] = set()
        for feed in self.delivery.feeds():
            budgets = getattr(feed.link, "budgets", None)
            if budgets is not None:
                live_buckets.add(id(budgets.msgs[0]))
                live_addresses.add(budgets.sender.address)
        dropped = 0

        def full(buckets: tuple) -> bool:
            return all(b.refill() >= b.burst for b in buckets)

        for key, dev in list(self._buckets.items()):
            if id(dev[0]) not in live_buckets and full(dev):
                del self._buckets[key]
                dropped += 1
        for address, addr in list(self._abuckets.items()):
            if address not in live_addresses and full(addr):
                del self._abuckets[address]
                dropped += 1
        now = time.monotonic()
        for address, sender in list(self._senders.items()):
            if (address not in live_addresses and sender.born is None
                    and sender.quarantined is None and sender.throttle is None
                    and sender.score * 0.5 ** ((now - sender.stamp) / 3600.0) < 0.01):
                del self._senders[address]
                self._young.discard(address)
                dropped += 1
        return dropped


#: a rate that never runs dry: a layer configured off
_UNLIMITED = 1e18
_CONSENT_REQUIRED = int(ErrorCode.CONSENT_REQUIRED)
#: (writer, reader) pairs remembered for the new-sender rule, per generation
_MAX_CONTACTS = 1_000_000
#: strangers one new sender may have started writing to (past it, refused)
_MAX_STARTED = 10_000


def _bucket(rate: float, burst: float) -> TokenBucket:
    """A token bucket, or one that never runs dry when ``rate`` is 0 (layer off)."""
    if rate <= 0:
        return TokenBucket(_UNLIMITED, _UNLIMITED)
    return TokenBucket(rate, burst)


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("registry write failed: %s", type(fut.exception()).__name__)
