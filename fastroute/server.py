"""The relay: a thin uvloop front end around the routing core.

Data flows down, acks flow up (``docs/PROTOCOL.md`` has the bytes)::

    TCP -> Noise XX handshake, then AEAD frames           (fastroute.noise)
        -> integrity gate: credential chain, quotas,       (identity, gate, wire)
           schema, duplicate ids -> a stable error code
        -> store: durable before the sender's ack          (fastroute.store)
        -> routing core: per-device mailboxes              (fastroute.Router)
        -> per-connection writer: drains mailboxes,
           encrypts, writes many frames per system call

The engine only holds devices that are online.  The store holds every
persistent message for every known device of the recipient until that device
acks it, so an offline device, a device that reconnects, and a slow consumer
whose mailbox overflowed are all served by the same path: a *sync* that loads
the device's backlog from the store in order, then hands the device back to
the live route (see :meth:`_Conn._sync`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections import deque
from typing import Any

import msgpack

from . import Router
from . import _fastpath, identity, wire
from .config import RelayConfig
from .errors import (
    AuthError,
    DecryptError,
    ErrorCode,
    FastrouteError,
    MailboxFull,
    ProtocolError,
    RateLimited,
    UnknownAddress,
)
from .gate import TokenBucket
from .noise import FrameReader, HandshakeState, KeyPair, frame, seal_frames
from .media import MediaStore
from .store import MemoryStore, SqliteStore

__all__ = ["Relay", "load_or_create_server_key"]

log = logging.getLogger("fastroute.relay")

_OP_SEND = int(wire.Op.SEND)
_OP_DACK = int(wire.Op.DACK)
_OP_PING = int(wire.Op.PING)
_OP_BYE = int(wire.Op.BYE)
_OP_CONSENT = int(wire.Op.CONSENT)
_MEDIA_OPS = frozenset((int(wire.Op.MBEGIN), int(wire.Op.MCHUNK), int(wire.Op.MFINISH),
                        int(wire.Op.MGET)))
#: media requests one connection may have in progress; more are refused
_MAX_MEDIA_IN_FLIGHT = 32
# A DELIVER op is [18, seq, from, id, body, ts_ms, cls]; everything after seq
# is the same for every recipient device, so it is packed once per message
# (the "tail") and each delivery only adds its own sequence number, always as
# a msgpack uint32 (any msgpack int encoding is valid on the wire).  The byte
# packers live in fastroute._fastpath (compiled twins in ext/fastroute/_wire.pxi).
_pack_delivers = _fastpath.pack_delivers
_stored_sacks = _fastpath.stored_sacks
_route_items = _fastpath.route_items
_accept_sends = _fastpath.accept_sends
_sync_rows = _fastpath.sync_rows
_ts_packed = _fastpath.ts_packed
_decode_sends = _fastpath.decode_sends_c  # None without the compiled core
_ADDR_OK = wire._ADDR_OK
# the gate's refusal codes, in the order _fastpath.accept_sends takes them
_REFUSALS = (ErrorCode.BODY_TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT,
             ErrorCode.CONSENT_REQUIRED, ErrorCode.RATE_LIMITED)


# connection states (_DRAINING: the client said BYE, its SACKs are still due)
_HS_WAIT1, _HS_WAIT3, _OPEN, _CLOSED, _DRAINING = range(5)


def load_or_create_server_key(data_dir: str) -> tuple[KeyPair, bool]:
    """Load ``data_dir/server.key`` (32 raw bytes), creating it on first start.

    Returns ``(key_pair, created)``.  The file is written with mode 0600.
    """
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "server.key")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if len(raw) != 32:
            raise FastrouteError(f"{path} is not a 32-byte X25519 private key",
                                 code=ErrorCode.INTERNAL)
        return KeyPair.from_private(raw), False
    except FileNotFoundError:
        pass
    kp = KeyPair.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(kp.private)
    return kp, True


def fingerprint(public: bytes) -> str:
    """Human-comparable fingerprint of a relay's static key."""
    return identity.key_fingerprint(public)


class _Conn(asyncio.Protocol):
    """One device connection: handshake, then the op loop and its writer."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.state = _HS_WAIT1
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.hs: HandshakeState | None = None
        self.tx = None  # CipherState, this side -> peer
        self.rx = None
        self.dev = -1  # engine device id while online
        self.dkey = -1  # store device key
        self.cred: identity.Credential | None = None
        self.address = ""
        self.provider = ""
        self.out: list[bytes] = []  # packed ops waiting for the next flush
        # mids of popped messages waiting for DACK; seqs are consecutive from
        # inflight_seq (one mailbox, popped in order, never requeued)
        self.inflight: deque = deque()
        self.inflight_seq = 1
        self.sender_packed = b""
        self.paused = False
        self.errors = 0
        self.storing = 0  # store batches of this link not yet committed
        self.sends: list | None = None  # SENDs of the read being processed
        self.bye_after_sends = False
        self.media_in_flight = 0
        self.bye_requested = False
        self.last_rx = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.msg_bucket: TokenBucket | None = None
        self.byte_bucket: TokenBucket | None = None
        self.max_body = 0  # the device's body limit, set with its quotas
        # sync state: see _sync()
        self.last_mid = 0  # newest stored message already in the engine (sync cursor)
        self.missed_mid = 0  # newest message the live route could not place
        self.live = False  # False while suspended/overflowed: the store feeds the device
        self.sync_task: asyncio.Task | None = None
        self.room = asyncio.Event()

    # ---------------------------------------------------------------- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        relay = self.relay
        self.transport = transport  # type: ignore[assignment]
        if len(relay._all_conns) >= relay.config.max_connections or relay._closing:
            transport.abort()
            return
        relay._all_conns.add(self)
        self.hs = HandshakeState(initiator=False, static=relay.server_key)
        self.timer = relay._loop.call_later(relay.config.handshake_timeout,
                                            self._handshake_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.state = _CLOSED
        if self.timer is not None:
            self.timer.cancel()
        self.relay._drop_conn(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.dev >= 0:
            self.pull()
            self.relay._mark(self)

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self.reader.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        # The SENDs of every frame in this read go to the gate and the store
        # together: one store batch and one commit for all of them.
        self.sends = []
        for msg in msgs:
            if self.state == _OPEN:
                try:
                    plaintext = self.rx.decrypt(msg)
                except DecryptError as exc:
                    # A bad tag means the link is no longer trustworthy: the
                    # peer is not who did the handshake, or bytes were altered.
                    self._fail(exc)
                    return
                self._on_frame(plaintext)
            elif self.state in (_CLOSED, _DRAINING):
                break
            else:
                self._on_handshake(msg)
        self.last_rx = time.monotonic()
        if self.sends:
            self.relay._accept(self, self.sends)
            if self.bye_after_sends:
                self._on_bye()
        self.sends = None

    # -------------------------------------------------------------- handshake
    def _on_handshake(self, msg: bytes) -> None:
        relay = self.relay
        hs = self.hs
        try:
            if self.state == _HS_WAIT1:
                hs.read_message(msg)
                hello = wire.encode_server_hello(int(time.time() * 1000))
                self.transport.write(frame(hs.write_message(hello)))
                self.state = _HS_WAIT3
                return
            payload = hs.read_message(msg)
        except FastrouteError as exc:
            relay._count_error(exc.code)
            log.debug("handshake failed: %s", exc)
            self._abort()
            return
        # msg3 authenticated the client's static key; the link keys exist, so
        # every refusal from here on reaches the client as an encrypted BYE.
        self.tx, self.rx = hs.split()
        self.hs = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            # A revocation or enrolment written a moment ago must count for
            # this device already; the check is one cheap PRAGMA.
            relay._reload_trust()
            hello = wire.decode_client_hello(payload)
            cred = identity.verify_credential(relay.trust, hello["cred"],
                                              hs.remote_static, int(time.time()))
        except FastrouteError as exc:
            relay._count_error(exc.code)
            log.info("device refused: code %d (%s)", int(exc.code), exc.code.name
                     if isinstance(exc.code, ErrorCode) else exc.code)
            self.state = _OPEN
            self._bye(exc.code, str(exc))
            return
        self.state = _OPEN
        relay._register(self, cred)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.state in (_HS_WAIT1, _HS_WAIT3):
            self.relay._count_error(ErrorCode.HANDSHAKE_TIMEOUT)
            self._abort()

    # ---------------------------------------------------------------- op loop
    def _on_frame(self, plaintext: bytes) -> None:
        if _decode_sends is not None:
            # compiled fast path: a frame of valid SENDs only (None otherwise)
            fast = _decode_sends(plaintext, _ADDR_OK)
            if fast is not None:
                self.sends.extend(fast)
                return
        relay = self.relay
        try:
            # the compiled pass above already said "not only SENDs": go
            # straight to the precise decoder instead of trying it again
            ops = (wire._py_decode_client_frame if _decode_sends is not None
                   else wire.decode_client_frame)(plaintext)
        except ProtocolError as exc:
            self._protocol_error(exc.code, str(exc))
            return
        sends = self.sends
        for op in ops:
            if isinstance(op, wire.OpError):
                if op.id is not None:
                    self.out.append(wire.sack_op(op.id, op.code))
                    relay._count_error(op.code)
                    relay._mark(self)
                    self.errors += 1
                    if self.errors > relay.config.limits.max_protocol_errors:
                        self._bye(ErrorCode.MALFORMED, "too many protocol errors")
                        return
                else:
                    self._protocol_error(op.code, op.reason)
                    if self.state == _CLOSED:
                        return
                continue
            kind = op[0]
            if kind == _OP_SEND:
                sends.append(op)
            elif kind == _OP_DACK:
                self._dack(op[1])  # acks and sends are independent: no order to keep
            elif kind == _OP_CONSENT:
                relay._set_consent(self, op[1], op[2], op[3])
            elif kind in _MEDIA_OPS:
                relay._media_request(self, op)
            elif kind == _OP_PING:
                self.out.append(wire.pong_op(op[1]))
                relay._mark(self)
            elif kind == _OP_BYE:
                # after the SENDs already read: data_received accepts them first
                self.bye_after_sends = True
                self.state = _DRAINING
                if not sends:
                    self._on_bye()
                return

    def _on_bye(self) -> None:
        if self.storing:
            # answer every SEND of this link before saying goodbye
            self.bye_requested = True
        else:
            self._bye(ErrorCode.OK, "bye")

    def _protocol_error(self, code: int, reason: str) -> None:
        relay = self.relay
        relay._count_error(code)
        self.errors += 1
        if self.errors > relay.config.limits.max_protocol_errors:
            self._bye(ErrorCode.MALFORMED, "too many protocol errors")
            return
        self.out.append(wire.error_op(code, reason))
        relay._mark(self)

    def _dack(self, upto: int) -> None:
        if self.dev < 0:
            return
        relay = self.relay
        n = relay.router.ack(self.dev, upto)
        if not n:
            return
        inflight = self.inflight
        k = min(upto - self.inflight_seq + 1, len(inflight))
        if k <= 0:
            return
        self.inflight_seq += k
        popleft = inflight.popleft
        mids = [mid for mid in [popleft() for _ in range(k)] if mid]
        relay.delivered += n
        if mids:
            relay.store.ack(self.dkey, mids, validate=False)
        if not self.room.is_set():
            self.room.set()

    # ----------------------------------------------------------------- writer
    def pull(self) -> None:
        """Move this device's poppable messages into the outgoing batch."""
        pop_batch = self.relay.router.pop_batch
        out = self.out
        mids = self.inflight.extend
        dev = self.dev
        # Stop pulling while the socket's buffer is full: the messages stay
        # in the (bounded) mailbox and, past its capacity, in the store.
        while not self.paused:
            seq, batch = pop_batch(dev, 1024)
            if not batch:
                break
            if seq + len(batch) >= 1 << 32:  # pragma: no cover - 4 G messages on one link
                self._bye(ErrorCode.OK, "sequence space exhausted; reconnect")
                return
            # one packed DELIVER per message, appended to out (in C when compiled)
            mids(_pack_delivers(seq, batch, out))
            if len(batch) < 1024:
                break

    def flush(self) -> None:
        """Encrypt the outgoing ops into as few frames as fit, and write once."""
        out = self.out
        if not out or self.state not in (_OPEN, _DRAINING):
            out.clear()
            return
        self.out = []
        bufs = seal_frames(self.tx, wire.pack_frames(out))
        self.transport.writelines(bufs)

    # --------------------------------------------------------------- closing
    def _bye(self, code: int, reason: str) -> None:
        """Send a final BYE (if the link is up) and close after it is written."""
        if self.state == _CLOSED:
            return
        self.state = _OPEN  # a draining link may still flush
        if self.tx is not None:
            self.out.append(wire.server_bye_op(int(code), reason))
            self.flush()
        self.state = _CLOSED
        self.transport.close()

    def _fail(self, exc: FastrouteError) -> None:
        self.relay._count_error(exc.code)
        log.debug("closing connection: %s", exc)
        if isinstance(exc, DecryptError) or self.tx is None:
            self._abort()
        else:
            self._bye(exc.code, str(exc))

    def _abort(self) -> None:
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ sync
    async def _sync(self) -> None:
        """Load this device's backlog from the store into its mailbox, in order.

        While the device is *overflowed* (suspended on connect, or after its
        mailbox was found full), the live route skips it and records the
        newest message it missed in ``missed_mid``; this loop pushes stored
        messages oldest first until it has caught up with everything already
        routed, then resumes the live route.  The check and the resume happen
        in one step of the event loop, so no message can slip between them.
        """
        relay = self.relay
        router = relay.router
        store = relay.store
        cap = relay.config.mailbox_capacity
        try:
            if self.last_mid == 0:
                # Acks of this device's previous connection may still be queued
                # in the store's writer; loading before they land would
                # redeliver what the device already acked.
                await store.flush()
            while self.dev >= 0:
                queued, unacked = router.pending(self.dev)
                room = cap - queued - unacked
                if room <= 0:
                    self.room.clear()
                    await self.room.wait()
                    continue
                limit = min(room, 1024)
                missed_before = self.missed_mid
                rows = await store.load(self.dkey, self.last_mid, limit)
                if self.dev < 0:
                    return
                # Rows committed but not yet routed are left to the live route
                # (it runs after this in commit order), so none is pushed twice.
                # With no store batch in flight, every committed row was routed.
                routed = relay._routed_mid if relay._puts_in_flight else 1 << 62
                # per row: DELIVER tail, push (compiled when fastroute._core is);
                # a backlog has few distinct senders, packed once each
                pushed, last, state = _sync_rows(router, self.dev, rows, routed, {},
                                                 msgpack.packb)
                if pushed:
                    self.last_mid = last
                    relay._wake()  # the writer drains what was just pushed
                if state == 2:
                    continue  # full: the room check above waits for acks
                if state == 1:
                    # The store is ahead of the live route: wait for the next
                    # routed batch instead of reloading the same rows.
                    await relay._next_routed()
                    continue
                if len(rows) >= limit:
                    continue
                # Every row up to what had been missed when the load started
                # was returned (or has expired): the cursor may pass it.
                if missed_before > self.last_mid:
                    self.last_mid = missed_before
                if self.last_mid >= self.missed_mid:
                    router.resume(self.dev)
                    self.live = True
                    relay._wake()
                    return
                # new misses arrived while loading: load again (each pass
                # needs a routed batch in between, so this cannot spin)
        except asyncio.CancelledError:
            raise
        except FastrouteError as exc:
            log.warning("sync failed (code %d); closing the device's connection", int(exc.code))
            self._bye(ErrorCode.STORE_FAILED, "store unavailable")
        finally:
            if self.sync_task is asyncio.current_task():
                self.sync_task = None
            relay._wake()

    def start_sync(self) -> None:
        """Run :meth:`_sync` unless it is already running."""
        if self.sync_task is None and self.dev >= 0:
            self.sync_task = self.relay._loop.create_task(self._sync())


class Relay:
    """A fastroute relay, embeddable in any asyncio (preferably uvloop) program.

    ::

        relay = Relay(RelayConfig(port=0, data_dir="data"))
        await relay.start()          # listening; relay.port, relay.fingerprint
        ...
        await relay.close()          # graceful: BYE to every device, flush the store

    ``store`` and ``registry`` may be given to share them with the embedding
    service; otherwise they are opened in ``config.data_dir``.
    """

    def __init__(self, config: RelayConfig | None = None, *,
                 server_key: KeyPair | None = None,
                 registry: "identity.Registry | None" = None,
                 store: Any = None, media: "MediaStore | None" = None) -> None:
        self.config = config or RelayConfig()
        self.server_key = server_key
        self.key_created = False
        self.registry = registry
        self._own_registry = registry is None
        self.store = store
        self._own_store = store is None
        self.media = media
        self._own_media = media is None
        self.router = Router(mailbox_capacity=self.config.mailbox_capacity)
        self.trust: identity.Trust | None = None
        self._trust_version = None
        self._server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._all_conns: set[_Conn] = set()
        self._online: dict[int, _Conn] = {}  # engine device id -> connection
        self._by_device: dict[tuple[str, str], _Conn] = {}
        self._known: dict[str, list[int]] = {}  # address -> store device keys
        self._buckets: dict[tuple[str, str], tuple[TokenBucket, TokenBucket]] = {}
        #: address -> providers (or "*") whose users it accepts messages from
        self._consent: dict[str, frozenset[str]] = {}
        self._dedup = _fastpath.DedupTable(self.config.dedup_window_s,
                                           self.config.dedup_max_entries)
        self._dirty: set[_Conn] = set()
        self._flush_scheduled = False
        self._routed_mid = 0
        self._puts_in_flight = 0
        self._routed_waiters: list[asyncio.Future] = []
        self._media_tasks: set[asyncio.Task] = set()
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self._taps: list = []
        self._admin: asyncio.AbstractServer | None = None
        # metrics: counts only, never addresses or bodies
        self.accepted = 0
        self.delivered = 0
        self.refused: dict[int, int] = {}

    # -------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``port=0``)."""
        return self._server.sockets[0].getsockname()[1]

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the relay's static Noise key, for clients to pin."""
        return fingerprint(self.server_key.public)

    async def start(self) -> None:
        """Open key, registry and store, then listen on ``config.host:port``."""
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        if self.server_key is None:
            self.server_key, self.key_created = load_or_create_server_key(cfg.data_dir)
        if self.registry is None:
            os.makedirs(cfg.data_dir, exist_ok=True)
            self.registry = identity.Registry(os.path.join(cfg.data_dir, "registry.db"))
        self._reload_trust()
        self._consent = self.registry.consents()
        if self.store is None:
            if cfg.store == "memory":
                self.store = await MemoryStore.open(":memory:", ttl_s=cfg.ttl_s)
            else:
                os.makedirs(cfg.data_dir, exist_ok=True)
                self.store = await SqliteStore.open(os.path.join(cfg.data_dir, "store.db"),
                                                    synchronous=cfg.synchronous,
                                                    ttl_s=cfg.ttl_s)
        if self.media is None:
            self.media = await MediaStore.open(
                os.path.join(cfg.data_dir, "media"), max_blob=cfg.media_max_blob,
                daily_quota=cfg.media_daily_bytes, ttl_s=cfg.media_ttl_s)
        for dkey, address, _device in self.store.known_devices():
            self._known.setdefault(address, []).append(dkey)
        self._server = await self._loop.create_server(lambda: _Conn(self), cfg.host, cfg.port,
                                                      reuse_address=True, backlog=4096)
        self._tasks.append(self._loop.create_task(self._housekeeping()))
        if cfg.admin_socket:
            from .loadtest.record import serve_admin

            path = os.path.join(cfg.data_dir, "admin.sock")
            if os.path.exists(path):
                os.unlink(path)  # left by a relay that did not shut down cleanly
            self._admin = await serve_admin(self, path)
        log.info("relay listening on %s:%d, key fingerprint %s", cfg.host, self.port,
                 self.fingerprint)

    async def serve_forever(self) -> None:
        """Run until :meth:`close` is called (or the task is cancelled)."""
        if self._server is None:
            await self.start()
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        """Stop accepting, say BYE to every device, flush the store, release all."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._admin is not None:
            self._admin.close()
        for conn in list(self._all_conns):
            if conn.state == _OPEN:
                conn._bye(ErrorCode.SHUTTING_DOWN, "relay shutting down")
            else:
                conn._abort()
        for task in [*self._tasks, *self._media_tasks]:
            task.cancel()
        for conn in list(self._all_conns):
            if conn.sync_task is not None:
                conn.sync_task.cancel()
        await asyncio.sleep(0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
        if self.store is not None and self._own_store:
            await self.store.close()
        if self.media is not None and self._own_media:
            await self.media.close()
        if self.registry is not None and self._own_registry:
            self.registry.close()

    async def __aenter__(self) -> "Relay":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: no addresses, no bodies, no ids."""
        return {
            "connections": len(self._all_conns),
            "online_devices": len(self._online),
            "accepted": self.accepted,
            "delivered": self.delivered,
            "refused": dict(self.refused),
            "dedup_entries": len(self._dedup),
            "engine": self.router.stats(),
        }

    def add_tap(self, fn) -> None:
        """Call ``fn(ts_ms, sender, recipient, size, cls)`` for every accepted message.

        Off unless someone calls this (``fastroute record`` does, explicitly):
        the tap sees addresses, so whoever installs it takes responsibility for
        pseudonymising them (:func:`fastroute.loadtest.trace.pseudonymize`).
        """
        self._taps.append(fn)

    def remove_tap(self, fn) -> None:
        """Stop calling a tap installed with :meth:`add_tap`."""
        self._taps.remove(fn)

    # ------------------------------------------------------------- internals
    def _count_error(self, code: int) -> None:
        code = int(code)
        self.refused[code] = self.refused.get(code, 0) + 1

    def _reload_trust(self) -> None:
        version = self.registry.version()
        if version == self._trust_version:
            return
        self.trust = identity.Trust.load(self.registry)
        self._trust_version = version

    def _recheck_live(self) -> None:
        """Close connections whose credential was revoked or has expired."""
        now = int(time.time())
        idle_limit = time.monotonic() - self.config.idle_timeout
        for conn in list(self._online.values()):
            cred = conn.cred
            try:
                self.trust.check_live(cred, now)
            except AuthError as exc:
                self._count_error(exc.code)
                conn._bye(exc.code, str(exc))
                continue
            if conn.last_rx < idle_limit:
                conn._bye(ErrorCode.IDLE_TIMEOUT, "idle timeout")

    async def _housekeeping(self) -> None:
        cfg = self.config
        last_expire = 0.0
        while True:
            await asyncio.sleep(cfg.registry_poll_s)
            try:
                old = self._trust_version
                self._reload_trust()
                if self._trust_version != old or True:
                    self._recheck_live()
                now = time.monotonic()
                if now - last_expire > 60.0:
                    last_expire = now
                    self._dedup.expire()
                    await self.store.expire(int(time.time() * 1000))
                    await self.media.expire()
            except asyncio.CancelledError:
                raise
            except Exception:  # housekeeping must never take the relay down
                log.exception("housekeeping step failed")

    def _register(self, conn: _Conn, cred: "identity.Credential") -> None:
        """Put an authenticated device online: engine, store, backlog sync."""
        key = (cred.address, cred.device)
        old = self._by_device.get(key)
        if old is not None:
            old._bye(ErrorCode.SESSION_REPLACED,
                     "replaced by a newer connection of the same device")
            self._drop_conn(old)
        conn.cred = cred
        conn.address = cred.address
        conn.sender_packed = msgpack.packb(cred.address)
        conn.provider = cred.provider
        conn.dkey = self.store.register_device(cred.address, cred.device)
        keys = self._known.setdefault(cred.address, [])
        if conn.dkey not in keys:
            keys.append(conn.dkey)
        conn.dev = self.router.add_device(cred.address, cred.device)
        # Stored backlog first: the live route must not overtake it.
        self.router.suspend(conn.dev)
        self._online[conn.dev] = conn
        self._by_device[key] = conn
        lim = self.config.limits
        quota = self.trust.quota(cred.provider)
        # Buckets belong to the device, not the link: reconnecting must not
        # refill a burst.  (Kept in memory: bounded by the known devices.)
        buckets = self._buckets.get(key)
        if buckets is None:
            buckets = self._buckets[key] = (
                TokenBucket(min(lim.msgs_per_s, quota.get("msgs_per_s") or lim.msgs_per_s),
                            lim.msgs_burst),
                TokenBucket(min(lim.bytes_per_s, quota.get("bytes_per_s") or lim.bytes_per_s),
                            lim.bytes_burst))
        conn.msg_bucket, conn.byte_bucket = buckets
        conn.max_body = min(lim.max_body, quota.get("max_body") or lim.max_body)
        conn.out.append(wire.welcome_op(cred.address, cred.device, int(time.time() * 1000)))
        self._mark(conn)
        conn.start_sync()
        log.debug("device online (provider %s)", cred.provider)

    def _drop_conn(self, conn: _Conn) -> None:
        self._all_conns.discard(conn)
        self._dirty.discard(conn)
        if conn.sync_task is not None:
            conn.sync_task.cancel()
            conn.sync_task = None
        if conn.dev >= 0:
            dev = conn.dev
            conn.dev = -1
            # Whatever the device had not acked is still in the store (or was
            # an ephemeral signal, which is dropped when its device goes away).
            self.router.remove_device(dev)
            self._online.pop(dev, None)
            key = (conn.cred.address, conn.cred.device)
            if self._by_device.get(key) is conn:
                del self._by_device[key]
            conn.room.set()

    def _accept(self, conn: _Conn, sends: list) -> None:
        """Run a frame's SEND ops through the gate; store and route what passes.

        The hot loop of the relay: everything per message happens in one
        call (:func:`fastroute._fastpath.accept_sends`: dedup entries, quota
        arithmetic, the packed DELIVER tail), and the bookkeeping that can be
        done once per frame is done here.
        """
        out = conn.out
        sender = conn.address
        sender_packed = conn.sender_packed
        known = self._known
        now = time.monotonic()
        msg_tokens = conn.msg_bucket.refill()
        byte_tokens = conn.byte_bucket.refill()
        max_body = conn.max_body
        now_ms = int(time.time() * 1000)
        ts_packed = _ts_packed(now_ms)
        taps = self._taps
        consent = self._consent if self.config.require_consent else None
        own = "@" + conn.provider
        store_items = []
        meta = []
        # the per-SEND loop (dedup, size, recipient, consent, quota, DELIVER
        # tail, store item): fastroute._fastpath, compiled when available
        ephemeral, msg_tokens, byte_tokens = _accept_sends(
            sends, conn, out, sender, sender_packed, known, self._dedup, now,
            msg_tokens, byte_tokens, max_body, now_ms, ts_packed, taps, consent, own,
            conn.provider, self._count_error, wire.sack_op, _REFUSALS,
            store_items, meta)
        conn.msg_bucket.tokens = msg_tokens
        conn.byte_bucket.tokens = byte_tokens
        if ephemeral:
            self.accepted += len(ephemeral)
            self._route(ephemeral, ephemeral=True)
        if store_items:
            fut = self.store.put_many(store_items, validate=False)
            self._puts_in_flight += 1
            conn.storing += 1
            fut.add_done_callback(lambda f: self._stored(conn, meta, f))
        self._mark(conn)

    def _stored(self, conn: _Conn, items: list, fut: asyncio.Future) -> None:
        """The store committed a batch: route it, then ack every sender."""
        self._puts_in_flight -= 1
        conn.storing -= 1
        try:
            self._stored_batch(conn, items, fut)
        finally:
            self._notify_routed()  # syncs waiting for the live route to catch up
            if conn.bye_requested and not conn.storing:
                self._flush_conn_then_bye(conn)

    def _flush_conn_then_bye(self, conn: _Conn) -> None:
        conn.bye_requested = False
        self._dirty.discard(conn)
        conn._bye(ErrorCode.OK, "bye")

    def _stored_batch(self, conn: _Conn, meta: list, fut: asyncio.Future) -> None:
        dedup = self._dedup
        sender = conn.address
        exc = fut.exception() if not fut.cancelled() else FastrouteError(
            "store closed", code=ErrorCode.STORE_FAILED)
        if exc is not None:
            code = int(getattr(exc, "code", ErrorCode.STORE_FAILED))
            log.error("store refused a batch of %d messages (code %d)", len(meta), code)
            for _, _, cid in meta:
                # refused, so not remembered: the sender may retry the same id
                self._ack_all(conn, cid, code, dedup.forget(sender, cid))
            return
        mids = fut.result()
        self._route(_route_items(meta, mids), ephemeral=False)
        self._routed_mid = max(self._routed_mid, mids[-1])
        self.accepted += len(meta)
        out = conn.out if conn.state in (_OPEN, _DRAINING) else []
        # per message: dedup entry stored, its waiters answered, SACK-ok to the sender
        _stored_sacks(meta, sender, dedup, time.monotonic(), out, self._ack_all)
        self._mark(conn)

    def _media_request(self, conn: _Conn, op: tuple) -> None:
        """Start one media op (MBEGIN, MCHUNK, MFINISH, MGET); it answers with MREPLY."""
        rid = op[1]
        if conn.media_in_flight >= _MAX_MEDIA_IN_FLIGHT:
            self._count_error(ErrorCode.RATE_LIMITED)
            conn.out.append(wire.mreply_op(rid, ErrorCode.RATE_LIMITED))
            self._mark(conn)
            return
        conn.media_in_flight += 1
        task = self._loop.create_task(self._media_op(conn, op))
        self._media_tasks.add(task)
        task.add_done_callback(self._media_tasks.discard)

    async def _media_op(self, conn: _Conn, op: tuple) -> None:
        media = self.media
        kind, rid = op[0], op[1]
        result: object = None
        try:
            if kind == wire.Op.MBEGIN:
                upload = await media.begin(conn.address, op[2], op[3])
                result = [upload, media.chunk_size]
            elif kind == wire.Op.MCHUNK:
                # attachment bytes count against the same byte quota as messages
                if not conn.byte_bucket.take(len(op[4])):
                    raise RateLimited("byte quota exhausted")
                await media.put_chunk(op[2], op[3], op[4])
            elif kind == wire.Op.MFINISH:
                result = await media.finish(op[2])
            else:
                data = await media.read_chunk(op[2], op[3])
                size, chunks = media.stat(op[2])
                result = [size, chunks, data]
            code = 0
        except FastrouteError as exc:
            code = int(exc.code)
            result = None
            self._count_error(code)
        except Exception:  # a bug must cost one request, never the relay
            log.exception("media request failed")
            code = int(ErrorCode.INTERNAL)
            result = None
        finally:
            conn.media_in_flight -= 1
        if conn.state in (_OPEN, _DRAINING):
            conn.out.append(wire.mreply_op(rid, code, result))
            self._mark(conn)

    def _set_consent(self, conn: _Conn, cid: bytes, provider: str, allow: bool) -> None:
        """A user opts in to (or out of) another provider's senders; ack once durable."""
        address = conn.address

        def done(fut: asyncio.Future) -> None:
            if fut.exception() is not None:
                log.error("could not record a consent change: %s", type(fut.exception()).__name__)
                code = int(ErrorCode.STORE_FAILED)
            else:
                accepted = set(self._consent.get(address, ()))
                if allow:
                    accepted.add(provider)
                else:
                    accepted.discard(provider)
                if accepted:
                    self._consent[address] = frozenset(accepted)
                else:
                    self._consent.pop(address, None)
                code = 0
            self._ack_all(conn, cid, code, None)

        # The registry commits with fsync: off the event loop.
        fut = self._loop.run_in_executor(None, self.registry.set_consent, address, provider,
                                         allow)
        fut.add_done_callback(done)

    def _next_routed(self) -> asyncio.Future:
        """A future resolved after the next store batch is routed (or failed)."""
        fut = self._loop.create_future()
        self._routed_waiters.append(fut)
        return fut

    def _notify_routed(self) -> None:
        waiters, self._routed_waiters = self._routed_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _ack_all(self, conn: _Conn | None, cid: bytes, code: int,
                 waiters: list | None) -> None:
        if conn is not None and conn.state in (_OPEN, _DRAINING):
            conn.out.append(wire.sack_op(cid, code))
            self._mark(conn)
        for other, wcid in waiters or ():
            if other.state in (_OPEN, _DRAINING):
                other.out.append(wire.sack_op(wcid, code))
                self._mark(other)

    def _route(self, batch: list, ephemeral: bool) -> None:
        """Route ``(address, payload)`` pairs to the online devices of each address."""
        router = self.router
        try:
            router.route_many(batch)
        except UnknownAddress:
            # Some recipients have no device online (the store has their
            # copy): route the rest.  route_many applied nothing.
            batch = [it for it in batch if router.has_address(it[0])]
            if batch:
                self._route(batch, ephemeral)
            return
        except MailboxFull as exc:
            if not ephemeral:  # signals are never stored: a full device misses them
                self._missed(batch, exc.full)
        self._wake()

    def _missed(self, batch: list, full: list) -> None:
        online = self._online
        for index, dev in full:
            conn = online.get(dev)
            if conn is None:
                continue
            mid = batch[index][1][0]
            if conn.live:
                # The first miss: everything of this device's before it went
                # through the live route, everything from it on (in mid
                # order) is the store's to feed.
                conn.live = False
                conn.last_mid = mid - 1
            if mid > conn.missed_mid:
                conn.missed_mid = mid
            conn.start_sync()

    def _mark(self, conn: _Conn) -> None:
        self._dirty.add(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _wake(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Once per loop iteration: drain ready mailboxes, write every dirty connection."""
        self._flush_scheduled = False
        online = self._online
        dirty = self._dirty
        for dev in self.router.take_ready():
            conn = online.get(dev)
            if conn is not None and not conn.paused:
                conn.pull()
                dirty.add(conn)
        self._dirty = set()
        for conn in dirty:
            if conn.state in (_OPEN, _DRAINING):
                conn.flush()


async def run_relay(config: RelayConfig, *, print_fn=print) -> None:
    """Run a relay until SIGINT/SIGTERM, then shut down gracefully (CLI helper).

    As a process of its own, the relay also tunes the garbage collector: it
    allocates many short-lived objects (ops, frames, futures) and almost no
    reference cycles, so collecting the young generation every 700
    allocations (Python's default) is mostly wasted work.  An embedding
    service keeps its own settings; ``Relay`` never touches them.
    """
    gc.set_threshold(50_000, 20, 100)
    relay = Relay(config)
    await relay.start()
    if relay.key_created:
        print_fn(f"generated server key in {os.path.join(config.data_dir, 'server.key')}")
    print_fn(f"fastroute relay listening on {config.host}:{relay.port}")
    print_fn(f"server key fingerprint: {relay.fingerprint}")
    print_fn(f"server public key (for clients to pin): {relay.server_key.public.hex()}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    serve = loop.create_task(relay.serve_forever())
    await stop.wait()
    print_fn("shutting down")
    await relay.close()
    serve.cancel()
