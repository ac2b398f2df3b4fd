"""The gate stage: every check an operation passes before the relay acts on it.

The relay runs each client op through the same gate whatever provider made
the client.  The frame and op shapes are checked by the wire decoder
(:mod:`fastroute.wire`: types, arities, body size); this stage checks what
needs the relay's state:

* SEND: duplicate ids (the dedup window, :mod:`fastroute.dedup`), the
  device's body limit, a known recipient, the recipient's consent (DMA
  opt-in for other providers' users), the device's message and byte quotas
  (:class:`TokenBucket`).  Accepted persistent messages go to the delivery
  stage, which stores them durably and routes them; the sender's SACK goes
  out once they are stored.
* CONSENT: a user opts in to (or out of) another provider's senders.

Nothing here touches sockets or crypto.  The per-message loop is written
twice: :func:`py_accept_sends`, :func:`py_stored_sacks` and
:func:`py_route_items` (with the state objects :class:`PySendGate` and
:class:`PyLinkGate`) are the specification; ``ext/fastroute/_gate.pxi``
has the compiled twins that :class:`Gate` uses when the core is built.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import msgpack

from .. import identity, wire
from .._compiled import twin
from ..dedup import PENDING, DedupTable
from ..errors import ErrorCode, FastrouteError, InvalidArgument

if TYPE_CHECKING:
    from .delivery import Delivery, LinkPort

__all__ = ["Gate", "LinkGate", "PyLinkGate", "PySendGate", "SendGate", "TokenBucket",
           "accept_sends", "py_accept_sends", "py_route_items", "py_stored_sacks",
           "route_items", "stored_sacks"]

log = logging.getLogger("fastroute.relay")

#: the gate's refusal codes, in the order :func:`py_accept_sends` reads them
REFUSALS = (ErrorCode.BODY_TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT,
            ErrorCode.CONSENT_REQUIRED, ErrorCode.RATE_LIMITED)


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


# -- the per-message loop: specification ---------------------------------------

class PySendGate:
    """What the SEND check reads of the relay: one per relay, shared by every link.

    ``known``: address -> store device keys; ``dedup``: the relay's dedup
    window; ``consent``: address -> providers it accepts (None when consent
    is not required); ``taps``: callables told of each accepted message;
    ``count_error(code)``; ``sack_op(id, code)`` packs a refusal;
    ``refusals``: the codes for body too large, unknown recipient, consent
    required, rate limited, in that order.
    """

    __slots__ = ("known", "dedup", "consent", "taps", "count_error", "sack_op", "refusals")

    def __init__(self, known: dict, dedup: Any, consent: dict | None, taps: list,
                 count_error: Callable[[int], None], sack_op: Callable[..., bytes],
                 refusals: tuple) -> None:
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
                    ts_packed: bytes, store_items: list, meta: list) -> list | None:
    """Gate a read's SEND ops (the relay's hot loop); see ``_gate.pxi`` for the contract.

    Returns the ephemeral ``(to, (0, tail))`` items (or None); the quota
    left is written back to ``lg`` when any was spent.
    """
    out, sender, conn = lg.out, lg.sender, lg.link
    known, dedup, consent, taps = gate.known, gate.dedup, gate.consent, gate.taps
    count_error, sack_op = gate.count_error, gate.sack_op
    too_large, unknown, consent_required, rate_limited = gate.refusals
    msg_tokens, byte_tokens = lg.msg_tokens, lg.byte_tokens
    max_body, own, provider = lg.max_body, lg.own, lg.provider
    spent = False
    ephemeral = None
    for _, cid, to, body, cls in sends:
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
        if size > max_body:
            code = too_large
        elif to not in known:
            code = unknown
        elif consent is not None and not to.endswith(own) and not (
                (accepted := consent.get(to)) is not None
                and (provider in accepted or "*" in accepted)):
            code = consent_required
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
            ephemeral.append((to, (0, tail)))
            out.append(wire.py_sack_ok_op(cid))
            dedup.begin(sender, cid, 0, now)
        else:
            dedup.begin(sender, cid, PENDING, now)
            store_items.append((sender, cid, body, now_ms, known[to]))
            meta.append((to, tail, cid))
        if taps:
            for tap in taps:
                tap(now_ms, sender, to, size, cls)
    if spent:
        lg.msg_tokens = msg_tokens
        lg.byte_tokens = byte_tokens
    return ephemeral


def py_stored_sacks(meta: list, sender: str, dedup: Any, now: float, out: list,
                    ack_all: Callable) -> None:
    """Decide each stored message's dedup entry, answer its waiters, SACK the sender."""
    append = out.append
    for _, _, cid in meta:
        waiters = dedup.finish(sender, cid, 0, now)
        if waiters is not None:
            ack_all(None, cid, 0, waiters)
        append(wire.py_sack_ok_op(cid))


def py_route_items(meta: list, mids: list) -> list:
    """``[(to, (mid, tail)) ...]`` from the gate's ``meta`` and the store's mids."""
    return [(to, (mid, tail)) for (to, tail, _), mid in zip(meta, mids)]


#: the implementations in use: compiled (``_gate.pxi``) or the specifications above
SendGate = twin(PySendGate)
LinkGate = twin(PyLinkGate)
accept_sends = twin(py_accept_sends)
stored_sacks = twin(py_stored_sacks)
route_items = twin(py_route_items)


# -- the stage -----------------------------------------------------------------

class Gate:
    """The gate stage of one relay: its SEND check, consent table and quotas.

    ``accept(link, sends)`` is the SEND path: checks, then hands accepted
    persistent messages to the delivery stage (store, then route) and
    answers the sender once they are durable.  The relay's counters live in
    ``count_error``, a callable it passes in.
    """

    def __init__(self, config: Any, delivery: "Delivery", registry: identity.Registry,
                 count_error: Callable[[int], None]) -> None:
        self.config = config
        self.delivery = delivery
        self.registry = registry
        self.count_error = count_error
        self.trust: identity.Trust = identity.Trust.load(registry)
        self._trust_version = registry.version()
        self.dedup = DedupTable(config.dedup_window_s, config.dedup_max_entries)
        #: address -> providers (or "*") whose users it accepts messages from
        self.consent: dict[str, frozenset[str]] = registry.consents()
        self.taps: list = []
        self.accepted = 0
        # Buckets belong to the device, not the link: reconnecting must not
        # refill a burst.  (Kept in memory: bounded by the known devices.)
        self._buckets: dict[tuple[str, str], tuple[TokenBucket, TokenBucket]] = {}
        self._tables = SendGate(delivery.known, self.dedup,
                                self.consent if config.require_consent else None,
                                self.taps, count_error, wire.sack_op, REFUSALS)

    # ------------------------------------------------------------ identity
    def reload_trust(self) -> bool:
        """Reload providers and revocations if the registry changed (one cheap PRAGMA).

        True when it did.
        """
        version = self.registry.version()
        if version != self._trust_version:
            self.trust = identity.Trust.load(self.registry)
            self._trust_version = version
            return True
        return False

    def authenticate(self, hello: bytes, remote_static: bytes) -> identity.Credential:
        """Who is this device: its credential chain, checked against the handshake's key.

        Raises the typed refusal (AuthError and kin) the link sends in its BYE.
        """
        # A revocation or enrolment written a moment ago must count for
        # this device already.
        self.reload_trust()
        cred = wire.decode_client_hello(hello)["cred"]
        return identity.verify_credential(self.trust, cred, remote_static, int(time.time()))

    def check_live(self, cred: identity.Credential, now: int) -> None:
        """AuthError if ``cred`` was revoked or has expired since its link opened."""
        self.trust.check_live(cred, now)

    # ------------------------------------------------------------ SEND
    def admit(self, link: "LinkPort", cred: identity.Credential) -> Any:
        """The SEND-check state (a :data:`LinkGate`) of a link whose device just
        authenticated: its sender, limits and quotas."""
        address, device, provider = cred.address, cred.device, cred.provider
        quota = self.trust.quota(provider)
        lim = self.config.limits
        key = (address, device)
        buckets = self._buckets.get(key)
        if buckets is None:
            buckets = self._buckets[key] = (
                TokenBucket(min(lim.msgs_per_s, quota.get("msgs_per_s") or lim.msgs_per_s),
                            lim.msgs_burst),
                TokenBucket(min(lim.bytes_per_s, quota.get("bytes_per_s") or lim.bytes_per_s),
                            lim.bytes_burst))
        max_body = min(lim.max_body, quota.get("max_body") or lim.max_body)
        return LinkGate(link, link.out, address, msgpack.packb(address), provider, max_body,
                        *buckets)

    def accept(self, link: "LinkPort", sends: list) -> None:
        """Run a read's SEND ops through the check; store and route what passes.

        The hot loop of the relay: everything per message happens in one
        call (:func:`accept_sends`: dedup entries, quota arithmetic, the
        packed DELIVER tail), and the bookkeeping that can be done once per
        read is done here.
        """
        lg = link.gate_state
        msg_bucket, byte_bucket = lg.msg_bucket, lg.byte_bucket
        lg.msg_tokens = msg_bucket.refill()
        lg.byte_tokens = byte_bucket.refill()
        now_ms = int(time.time() * 1000)
        store_items: list = []
        meta: list = []
        if self.delivery.caps.full:
            sends = self._refuse_full(link, sends)
        ephemeral = accept_sends(self._tables, lg, sends, time.monotonic(), now_ms,
                                 wire.ts_packed(now_ms), store_items, meta)
        msg_bucket.tokens = lg.msg_tokens
        byte_bucket.tokens = lg.byte_tokens
        delivery = self.delivery
        if ephemeral:
            self.accepted += len(ephemeral)
            delivery.route(ephemeral, ephemeral=True)
        if store_items:
            link.storing += 1
            fut = delivery.persist(store_items)
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
        keep = []
        code = int(ErrorCode.RECIPIENT_FULL)
        for op in sends:
            cid = op[1]
            if (op[2] in full and op[4] == 0 and type(cid) is bytes and len(cid) == 16
                    and dedup.lookup(sender, cid, now) is None):
                self.count_error(code)
                link.out.append(wire.sack_op(cid, code))
                continue
            keep.append(op)
        if len(keep) < len(sends):
            self.delivery.mark(link)
        return keep

    def _stored(self, link: "LinkPort", meta: list, fut: asyncio.Future) -> None:
        """The store answered a batch: route it, then answer every sender."""
        link.storing -= 1
        delivery = self.delivery
        dedup = self.dedup
        sender = link.address
        try:
            exc = fut.exception() if not fut.cancelled() else FastrouteError(
                "store closed", code=ErrorCode.STORE_FAILED)
            if exc is not None:
                delivery.persisted(None, 0)
                code = int(getattr(exc, "code", ErrorCode.STORE_FAILED))
                log.error("store refused a batch of %d messages (code %d)", len(meta), code)
                for _, _, cid in meta:
                    # refused, so not remembered: the sender may retry the same id
                    self.ack_all(link, cid, code, dedup.forget(sender, cid))
                return
            mids = fut.result()
            delivery.persisted(route_items(meta, mids), mids[-1])
            self.accepted += len(meta)
            out = link.out if link.is_open() else []
            # per message: dedup entry stored, its waiters answered, SACK-ok to the sender
            stored_sacks(meta, sender, dedup, time.monotonic(), out, self.ack_all)
            delivery.mark(link)
        finally:
            link.stored_all()

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
        """A user opts in to (or out of) another provider's senders; ack once durable."""
        address = link.address

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
            self.ack_all(link, cid, code, None)

        # The registry commits with fsync: off the event loop.
        fut = asyncio.get_running_loop().run_in_executor(
            None, self.registry.set_consent, address, provider, allow)
        fut.add_done_callback(done)

    def expire(self) -> None:
        """Forget dedup entries older than the window (housekeeping)."""
        self.dedup.expire()
