"""The relay: the server that wires the stages of the data path together.

Data flows down, acks flow up (``docs/PROTOCOL.md`` has the bytes)::

    TCP -> link      Noise XX handshake, then AEAD frames; ops decoded
                     and handed to the stage that owns them   (relay.link)
        -> gate      who is this device, may it send this: credential,
                     dedup, size, recipient, consent, quotas  (relay.gate)
        -> store     durable before the sender's ack           (fastroute.store)
        -> delivery  live route through the engine's per-device mailboxes,
                     backlog sync from the store, the writer   (relay.delivery)
           media     attachment requests, out of band          (relay.media_ops)
           upkeep    revocations, idle links, expiry, admin    (relay.upkeep)
           groups -> keys -> safety   features groups, e2ee, safety (blocks,
                     spam reports), each using only those after it, then
                     the gate   (relay.groups, relay.keys, relay.safety)

:class:`Relay` owns the lifecycle (start, close), the configuration, the
counters, and the wiring: it builds each stage, hands each stage what it
tells the ones above it (the keys stage's device-list watcher) and the pairs
the gate and the keys stage carried to the safety stage (their
``on_carried``), and gives each link a
:class:`~fastroute.relay.link.LinkWiring`.  The per-message path never comes
back here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable, cast

from .. import Router, identity, wire
from ..config import RelayConfig
from ..datadir import KEY_NAME, DataDirLock, prepare
from ..dedup import Warmer
from ..errors import ErrorCode, FastrouteError, StartFailed
from ..media import MediaStore
from ..noise import KeyPair
from ..store import MemoryStore, SqliteStore
from .caps import Caps
from .delivery import Delivery, LinkPort
from .gate import Gate
from .groups import Groups
from .keys import KeyDirectory, Keys
from .link import Link, LinkState, LinkWiring, Turns
from .media_ops import MediaOps
from .metrics import GC_PAUSES, Histogram, serve_metrics
from .safety import Safety, SafetyBook
from .upkeep import Upkeep, serve_admin

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["Relay", "fingerprint", "fit_fd_limit", "load_or_create_server_key", "run_relay"]

log = logging.getLogger("fastroute.relay")


def load_or_create_server_key(data_dir: str) -> tuple[KeyPair, bool]:
    """Load ``data_dir/server.key`` (32 raw bytes), creating it on first start.

    Returns ``(key_pair, created)``.  The file is written with mode 0600.
    Its public half is written beside it as ``server.pub`` (hex, one line),
    the value clients pin.
    """
    prepare(data_dir)
    path = os.path.join(data_dir, KEY_NAME)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if len(raw) != 32:
            raise FastrouteError(f"{path} is not a 32-byte X25519 private key",
                                 code=ErrorCode.INTERNAL)
        kp = KeyPair.from_private(raw)
        _write_public(data_dir, kp)
        return kp, False
    except FileNotFoundError:
        pass
    kp = KeyPair.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(kp.private)
    _write_public(data_dir, kp)
    return kp, True


def _write_public(data_dir: str, kp: KeyPair) -> None:
    path = os.path.join(data_dir, "server.pub")
    text = kp.public.hex() + "\n"
    try:
        with open(path) as fh:
            if fh.read() == text:
                return
    except OSError:
        pass
    try:
        with open(path, "w") as fh:
            fh.write(text)
    except OSError:  # a read-only data dir still serves; clients get the key elsewhere
        pass


#: file descriptors kept for the relay's own files (store, registry, media,
#: admin socket, executor threads) on top of one per connection
FD_RESERVE = 256


def fit_fd_limit(max_connections: int) -> int:
    """Raise this process's open-file limit to fit ``max_connections``; return
    the number of connections the relay may hold.

    ``max_connections`` 0 means "as many as the hard limit allows".  An
    explicit value the hard limit cannot fit raises :class:`FastrouteError`
    saying what to change, instead of failing later with EMFILE while
    legitimate clients are locked out.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard if hard != resource.RLIM_INFINITY else 1 << 20
    want = ceiling if max_connections == 0 else max_connections + FD_RESERVE
    if want > ceiling:
        raise FastrouteError(
            f"max_connections = {max_connections} needs {want} file descriptors, but this "
            f"process may open at most {ceiling} (hard limit).  Raise the hard limit "
            f"(ulimit -Hn, or LimitNOFILE= in a systemd unit) or set max_connections to "
            f"{max(0, ceiling - FD_RESERVE)} or less.", code=ErrorCode.INVALID_ARGUMENT)
    if soft == resource.RLIM_INFINITY or soft >= want:
        got = want if soft == resource.RLIM_INFINITY else soft
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        got = want
    if max_connections:
        return max_connections
    if got <= FD_RESERVE:
        raise FastrouteError(f"the open-file limit ({got}) leaves no room for connections",
                             code=ErrorCode.INVALID_ARGUMENT)
    return got - FD_RESERVE


def fingerprint(public: bytes) -> str:
    """Human-comparable fingerprint of a relay's static key."""
    return identity.key_fingerprint(public)


class Relay:
    """A fastroute relay, embeddable in any asyncio (preferably uvloop) program.

    ::

        relay = Relay(RelayConfig(port=0, data_dir="data"))
        await relay.start()          # listening; relay.port, relay.fingerprint
        ...
        await relay.close()          # graceful: BYE to every device, flush the store

    ``store`` and ``registry`` may be given to share them with the embedding
    service; otherwise they are opened in ``config.data_dir``.  The stages
    (:attr:`gate`, :attr:`delivery`, :attr:`media_ops`, :attr:`upkeep`)
    exist once :meth:`start` has run.
    """

    def __init__(self, config: RelayConfig | None = None, *,
                 server_key: KeyPair | None = None,
                 registry: identity.Registry | None = None,
                 store: Store | None = None, media: MediaStore | None = None) -> None:
        self.config = config or RelayConfig()
        self.server_key = server_key
        self.key_created = False
        self.registry = registry
        self._own_registry = registry is None
        self.store = store
        self._own_store = store is None
        self.media = media
        self._own_media = media is None
        # a store that keeps every message in RAM anyway: a slow device's
        # mailbox may grow (up to the memory budget) rather than the device
        # being fed again from the store
        in_memory = (bool(getattr(store, "in_memory", False)) if store is not None
                     else self.config.store == "memory")
        self.router = Router(mailbox_capacity=self.config.queue_capacity(in_memory))
        self.gate: Gate | None = None
        self.delivery: Delivery | None = None
        self.media_ops: MediaOps | None = None
        self.upkeep: Upkeep | None = None
        self.keys: Keys | None = None
        #: the groups stage (feature "groups"), with the keys stage
        self.groups: Groups | None = None
        #: the safety stage (feature "safety": blocks, spam reports)
        self.safety: Safety | None = None
        self._key_dir: KeyDirectory | None = None
        #: faults the dedup windows' memory in ahead of their writes, off the loop
        self._warmer = Warmer()
        self.links: set[Link] = set()
        self._server: asyncio.base_events.Server | None = None
        self._admin: asyncio.AbstractServer | None = None
        self._closing = False
        self._taps: list = []
        self._lock: DataDirLock | None = None
        self._metrics: asyncio.base_events.Server | None = None
        self.admin_host = ""
        # metrics: counts only, never addresses or bodies
        self.refused: dict[int, int] = {}
        self.started_at = time.time()
        self.accepted_connections = 0
        self.handshake_seconds = Histogram()
        #: the links' fair scheduler (its turn lengths are a metric); set by start()
        self.turns: Turns | None = None
        #: well-formed ops received, by opcode (the links count into it)
        self.op_counts: dict[int, int] = {}
        self._accepted_at: dict[Link, float] = {}
        #: the registry generation whose revocations were applied to live links
        self.applied_generation = 0
        self.reloads = 0
        #: connections refused at accept (limits), and the connections still in
        #: their handshake, in all and per source IP
        self.refused_connections = 0
        self.max_connections = self.config.max_connections
        self._preauth = 0
        self._preauth_by_ip: dict[str, dict[Link, None]] = {}

    # -------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with ``port=0``)."""
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def admin_port(self) -> int | None:
        """The port of the read-only admin listener (``/metrics``), None when off."""
        if self._metrics is None:
            return None
        return self._metrics.sockets[0].getsockname()[1]

    @property
    def closing(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closing

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the relay's static Noise key, for clients to pin."""
        assert self.server_key is not None
        return fingerprint(self.server_key.public)

    async def start(self) -> None:
        """Open key, registry and store, build the stages, then listen on ``config.host:port``."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        GC_PAUSES.install()
        # the fd limit first: a relay that cannot hold its connections says so
        self.max_connections = fit_fd_limit(cfg.max_connections)
        # bind first: an address in use must not leave a new data directory
        # and server key behind; connections wait until the stages exist
        wiring_box: list[LinkWiring] = []
        try:
            self._server = await loop.create_server(lambda: Link(wiring_box[0]), cfg.host,
                                                    cfg.port, reuse_address=True,
                                                    backlog=4096, start_serving=False)
        except OSError as exc:
            raise StartFailed(f"cannot listen on {cfg.host}:{cfg.port}: "
                              f"{exc.strerror or exc}") from None
        try:
            await self._start_stages(wiring_box)
        except BaseException:
            self._server.close()
            self._server = None
            if self._metrics is not None:
                self._metrics.close()
                self._metrics = None
            if self._key_dir is not None:
                self._key_dir.close()
                self._key_dir = None
            if self.safety is not None:
                self.safety.stop()
                self.safety.close()
                self.safety = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            raise
        await self._server.start_serving()
        if self._lock is not None:
            self._lock.publish({"pid": os.getpid(), "listen": f"{cfg.host}:{self.port}",
                                "admin": (f"{self.admin_host}:{self.admin_port}"
                                          if self._metrics is not None else None)})
        log.info("relay listening on %s:%d, key fingerprint %s", cfg.host, self.port,
                 self.fingerprint, extra={"event": "relay.listening"})

    async def _start_stages(self, wiring_box: list[LinkWiring]) -> None:
        cfg = self.config
        owns_dir = (self.server_key is None or self.registry is None
                    or (self.store is None and cfg.store == "sqlite") or self.media is None)
        if owns_dir:
            prepare(cfg.data_dir)
            self._lock = DataDirLock(cfg.data_dir)
            self._lock.acquire()
        if self.server_key is None:
            self.server_key, self.key_created = load_or_create_server_key(cfg.data_dir)
        if self.registry is None:
            self.registry = identity.Registry(os.path.join(cfg.data_dir, "registry.db"))
        if self.store is None:
            if cfg.store == "memory":
                self.store = await MemoryStore.open(":memory:", ttl_s=cfg.ttl_s)
            else:
                self.store = await SqliteStore.open(os.path.join(cfg.data_dir, "store.db"),
                                                    synchronous=cfg.synchronous,
                                                    ttl_s=cfg.ttl_s, erase_s=cfg.erase_s,
                                                    max_bytes=cfg.store_max_bytes or None,
                                                    group_commit_s=cfg.group_commit_s)
        if self.media is None:
            self.media = await MediaStore.open(
                os.path.join(cfg.data_dir, "media"), max_blob=cfg.media_max_blob,
                daily_quota=cfg.media_daily_bytes, ttl_s=cfg.media_ttl_s,
                max_bytes=cfg.media_max_bytes or None, disk_reserve=cfg.disk_reserve_bytes)
        caps = Caps((cfg.max_stored_msgs_per_device, cfg.max_stored_bytes_per_device,
                     cfg.max_stored_msgs_per_address, cfg.max_stored_bytes_per_address))
        self.delivery = delivery = Delivery(self.router, self.store, cfg.mailbox_capacity,
                                            caps, cfg.queue_memory_bytes,
                                            cfg.provider_memory_share)
        delivery.start()
        self.gate = gate = Gate(cfg, delivery, self.registry, self.count_error)
        gate.taps.extend(self._taps)
        self._taps = gate.taps  # one list: taps added later reach the gate too
        self.media_ops = MediaOps(self.media, delivery, self.count_error)
        os.makedirs(cfg.data_dir, exist_ok=True)
        # the key directory is durable whatever the message store is: a
        # consumed one-time prekey must never be handed out again
        self._key_dir = KeyDirectory(os.path.join(cfg.data_dir, "keys.db"),
                                     ec_cap=cfg.prekey_ec_cap, kem_cap=cfg.prekey_kem_cap,
                                     low_water=cfg.prekey_low_water)
        self.keys = Keys(cfg, self._key_dir, gate, delivery, self.count_error)
        self.groups = self.keys.groups = Groups(cfg, self._key_dir, self.keys, delivery,
                                                self.count_error)
        for table in (gate.dedup, self.keys.dedup, self.groups.dedup):
            table.warm_with(self._warmer.ask)
        # blocks and spam-report records: durable whatever the message store is
        self.safety = Safety(cfg, SafetyBook(os.path.join(cfg.data_dir, "safety.db")), gate,
                             delivery, self.count_error)
        self.keys.safety = self.safety
        if self.safety.window > 0:
            gate.on_carried = self.keys.on_carried = self.safety.delivered
        self.safety.start()
        self.upkeep = Upkeep(cfg, gate, delivery, self.store, self.media, self.count_error,
                             self.keys)
        wiring = LinkWiring(self.server_key, cfg, gate, delivery, self.media_ops,
                            self.count_error, self._admit, self._online, self._lost, self.keys,
                            self.groups, self.safety)
        wiring.op_counts = self.op_counts  # one table for every link: the metrics read it
        wiring_box.append(wiring)
        self.turns = wiring.turns  # the fair scheduler, for the metrics
        self.applied_generation = self.registry.version()[0]
        self.upkeep.on_applied = self._applied
        self.upkeep.start()
        if cfg.admin_socket:
            path = os.path.join(cfg.data_dir, "admin.sock")
            if os.path.exists(path):
                os.unlink(path)  # left by a relay that did not shut down cleanly
            self._admin = await serve_admin(self, path)
        admin = cfg.admin_address(self.port)
        if admin is not None:
            self.admin_host = admin[0]
            try:
                self._metrics = await serve_metrics(self, *admin)
            except OSError as exc:
                raise StartFailed(f"cannot listen for the admin listener (admin_listen) on "
                                  f"{admin[0]}:{admin[1]}: {exc.strerror or exc}") from None

    async def serve_forever(self) -> None:
        """Run until :meth:`close` is called (or the task is cancelled)."""
        if self._server is None:
            await self.start()
        assert self._server is not None
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
        if self._metrics is not None:
            self._metrics.close()
        for link in list(self.links):
            if link.state == LinkState.OPEN:
                link.close(ErrorCode.SHUTTING_DOWN, "relay shutting down")
            else:
                link.abort()
        if self.upkeep is not None:
            self.upkeep.stop()
        self._warmer.close()
        if self.media_ops is not None:
            self.media_ops.cancel()
        for link in list(self.links):
            if link.feed is not None and link.feed.sync_task is not None:
                link.feed.sync_task.cancel()
        await asyncio.sleep(0)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
        if self._key_dir is not None:
            # its writer thread finishes what is queued; off the loop
            await asyncio.get_running_loop().run_in_executor(None, self._key_dir.close)
        if self.safety is not None:
            self.safety.stop()
            await asyncio.get_running_loop().run_in_executor(None, self.safety.close)
        if self.store is not None and self._own_store:
            await self.store.close()
        if self.media is not None and self._own_media:
            await self.media.close()
        if self.registry is not None and self._own_registry:
            self.registry.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def __aenter__(self) -> "Relay":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: no addresses, no bodies, no ids."""
        gate, delivery = self.gate, self.delivery
        return {
            "connections": len(self.links),
            "online_devices": delivery.online if delivery else 0,
            "accepted": gate.accepted if gate else 0,
            "delivered": delivery.delivered if delivery else 0,
            "refused": dict(self.refused),
            "refused_connections": self.refused_connections,
            "handshaking": self._preauth,
            "dedup_entries": len(gate.dedup) if gate else 0,
            "queued_bytes": delivery.queued_bytes if delivery else 0,
            "spills": delivery.spills if delivery else 0,
            "synced": delivery.synced if delivery else 0,
            "quarantined": len(gate.quarantined()) if gate else 0,
            "engine": self.router.stats(),
        }

    def ready(self) -> tuple[bool, str]:
        """Whether the relay can take traffic now, and why not (for ``/readyz``)."""
        if self._closing:
            return False, "shutting down"
        if self._server is None or not self._server.is_serving():
            return False, "not listening"
        if self.upkeep is None or self.upkeep.stalled():
            return False, "housekeeping stalled"
        return True, "ready"

    @staticmethod
    def link_state_name(link: Link) -> str:
        """A link's state as a metrics label."""
        state = link.state
        if state in (LinkState.HS_WAIT1, LinkState.HS_WAIT3):
            return "handshake"
        return LinkState(state).name.lower()

    def reload(self, new: RelayConfig) -> list[str]:
        """Apply a re-read configuration without dropping a link (SIGHUP).

        Limits and timeouts take effect at once: limits for every device's
        next connection (live links keep the buckets they have), timeouts
        and the connection cap on the next check.  Settings that need a
        restart (addresses, data directory, store, mailbox capacity,
        require_consent, ...) are kept and returned by name.
        """
        cfg = self.config
        live = ("limits", "max_connections", "handshake_timeout", "idle_timeout",
                "registry_poll_s", "ttl_s", "log_format")
        ignored = []
        for f in dataclasses.fields(cfg):
            if f.name in live:
                setattr(cfg, f.name, getattr(new, f.name))
            elif getattr(new, f.name) != getattr(cfg, f.name):
                ignored.append(f.name)
        if self.gate is not None:
            # the gate keeps one pair of token buckets per device across
            # reconnections; forget them so the next connection gets the new rates
            buckets = getattr(self.gate, "_buckets", None)
            if isinstance(buckets, dict):
                buckets.clear()
        self.reloads += 1
        log.info("configuration reloaded%s", f" (restart needed for: {', '.join(ignored)})"
                 if ignored else "", extra={"event": "relay.reloaded"})
        return ignored

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

    def count_error(self, code: int, n: int = 1) -> None:
        """Count ``n`` refusals or errors by their code (the only per-code metric)."""
        code = int(code)
        self.refused[code] = self.refused.get(code, 0) + n

    # ---------------------------------------------------------- wiring
    def _admit(self, link: Link) -> bool:
        """A new TCP connection: within the connection limit, the limit on
        connections still in their handshake (the last ``auth_reserve`` slots
        are kept for authenticated devices) and the per-source-IP limit?

        At a limit, the oldest handshaking connection of the source IP that
        holds the most of them makes room, if that IP holds more than the
        newcomer's: idle sockets cannot lock legitimate clients out.
        """
        cfg = self.config
        if self._closing:
            return False
        limit = self.max_connections
        peer = link.transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) and peer else "?"
        mine = self._preauth_by_ip.get(ip)
        if mine is not None and len(mine) >= cfg.limits.max_preauth_per_ip:
            self.refused_connections += 1
            return False
        while (len(self.links) >= limit
               or self._preauth >= max(1, limit - cfg.auth_reserve)):
            if not self._evict_handshaking(len(mine) if mine is not None else 0):
                self.refused_connections += 1
                return False
        self.links.add(link)
        self.accepted_connections += 1
        self._accepted_at[link] = time.monotonic()
        link.preauth_ip = ip
        self._preauth += 1
        self._preauth_by_ip.setdefault(ip, {})[link] = None
        return True

    def _applied(self, generation: int) -> None:
        self.applied_generation = generation


    def _evict_handshaking(self, newcomer_holds: int) -> bool:
        by_ip = self._preauth_by_ip
        if not by_ip:
            return False
        ip = max(by_ip, key=lambda k: len(by_ip[k]))
        if len(by_ip[ip]) <= newcomer_holds:
            return False
        victim = next(iter(by_ip[ip]))
        self.refused_connections += 1
        self._authenticated(victim)
        self.links.discard(victim)
        victim.abort()
        return True

    def _authenticated(self, link: Link) -> None:
        """The link left its handshake (authenticated, refused or lost)."""
        ip = link.preauth_ip
        if ip is None:
            return
        link.preauth_ip = None
        self._preauth -= 1
        links = self._preauth_by_ip[ip]
        links.pop(link, None)
        if not links:
            del self._preauth_by_ip[ip]

    def _online(self, link: Link, cred: identity.Credential) -> None:
        """Put an authenticated device online: delivery (engine, store, sync), gate state."""
        delivery, gate = self.delivery, self.gate
        assert delivery is not None and gate is not None
        self._authenticated(link)
        old = delivery.feed_of(cred.address, cred.device)
        if old is not None:
            old.link.close(ErrorCode.SESSION_REPLACED,
                           "replaced by a newer connection of the same device")
            self._lost(old.link)
        link.cred = cred
        link.address = cred.address
        link.provider = cred.provider
        link.feed = delivery.attach(link, cred.address, cred.device)
        link.gate_state = gate.admit(link, cred)
        link.feed.no_ts = gate.withholds_ts(cred.provider)
        link.out.append(wire.welcome_op(cred.address, cred.device, int(time.time() * 1000)))
        delivery.mark(link)
        if self.keys is not None and self.keys.dir.slot(cred.address, cred.device) is not None:
            self.keys.seen(cred.address, cred.device)
            # Its backlog may hold per-device copies, which only a link that
            # negotiated e2ee may get: a client sends FEATURES in its first
            # frame (docs/PROTOCOL.md 14.2), so the sync waits for that frame
            # (or a second, for a downgraded client that says nothing).
            link.hold_sync(1.0)
        else:
            delivery.start_sync(link.feed)
        t0 = self._accepted_at.pop(link, None)
        if t0 is not None:
            self.handshake_seconds.observe(time.monotonic() - t0)
        log.debug("device online (provider %s)", cred.provider, extra={"event": "device.online"})

    def _lost(self, link: LinkPort) -> None:
        # every link of this relay is a Link; the stages see them as LinkPorts
        self.links.discard(cast(Link, link))
        self._accepted_at.pop(cast(Link, link), None)
        if self.keys is not None and link.feed is not None and link.cred is not None:
            self.keys.seen(link.cred.address, link.cred.device)
        self._authenticated(cast(Link, link))
        if self.delivery is not None:
            self.delivery.detach(link)


async def run_relay(config: RelayConfig, *, print_fn=print,
                    reload_config: Callable[[], RelayConfig] | None = None) -> None:
    """Run a relay until SIGINT/SIGTERM, then shut down gracefully (CLI helper).

    SIGHUP calls ``reload_config`` (re-reading the configuration file) and
    applies the result with :meth:`Relay.reload`; links stay up.  A file that
    does not parse is logged and the running configuration kept.

    As a process of its own, the relay also tunes the garbage collector: it
    allocates many short-lived objects (ops, frames, futures) and almost no
    reference cycles, so collecting the young generation every 700
    allocations (Python's default) is mostly wasted work.  What start-up
    built (modules, configuration, tables) lives as long as the process, so
    it is frozen out of the collector's scans once the relay is up
    (``gc.freeze``): a full collection then walks only what came later.  An
    embedding service keeps its own settings; ``Relay`` never touches them.
    """
    gc.set_threshold(50_000, 20, 100)
    relay = Relay(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_hup() -> None:
        if reload_config is None:
            log.info("SIGHUP: no configuration file to re-read", extra={"event": "relay.reloaded"})
            return
        try:
            new = reload_config()
        except FastrouteError as exc:
            log.error("configuration not reloaded: %s [%d]", exc, int(exc.code),
                      extra={"event": "relay.reload_failed"})
            return
        relay.reload(new)

    # handlers first: a SIGTERM right after the start-up lines must stop the
    # relay gracefully, not kill it with the default action
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (NotImplementedError, RuntimeError, AttributeError):  # pragma: no cover
        pass
    await relay.start()
    if relay.key_created:
        print_fn(f"generated server key in {os.path.join(config.data_dir, KEY_NAME)}")
    print_fn(f"fastroute relay listening on {config.host}:{relay.port}")
    print_fn(f"server key fingerprint: {relay.fingerprint}")
    assert relay.server_key is not None  # start() loaded or made it
    print_fn(f"server public key (for clients to pin): {relay.server_key.public.hex()}")
    if relay.admin_port is not None:
        base = f"http://{relay.admin_host}:{relay.admin_port}"
        print_fn(f"admin listener (read only): {base}/metrics {base}/healthz {base}/readyz")
    else:
        print_fn("admin listener: off (admin_listen = \"off\")")
    print_fn(f"data directory: {os.path.abspath(config.data_dir)}", flush=True)
    gc.collect()
    gc.freeze()
    serve = loop.create_task(relay.serve_forever())
    await stop.wait()
    print_fn("shutting down", flush=True)
    await relay.close()
    serve.cancel()
