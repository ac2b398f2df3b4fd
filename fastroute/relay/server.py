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

:class:`Relay` owns the lifecycle (start, close), the configuration, the
counters, and the wiring: it builds each stage and gives each link a
:class:`~fastroute.relay.link.LinkWiring`.  The per-message path never comes
back here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, cast

from .. import Router, identity, wire
from ..config import RelayConfig
from ..errors import ErrorCode, FastrouteError
from ..media import MediaStore
from ..noise import KeyPair
from ..store import MemoryStore, SqliteStore
from .delivery import Delivery, LinkPort
from .gate import Gate
from .link import Link, LinkState, LinkWiring
from .media_ops import MediaOps
from .upkeep import Upkeep, serve_admin

if TYPE_CHECKING:
    from ..store import Store

__all__ = ["Relay", "fingerprint", "fit_fd_limit", "load_or_create_server_key", "run_relay"]

log = logging.getLogger("fastroute.relay")


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
        self.router = Router(mailbox_capacity=self.config.mailbox_capacity)
        self.gate: Gate | None = None
        self.delivery: Delivery | None = None
        self.media_ops: MediaOps | None = None
        self.upkeep: Upkeep | None = None
        self.links: set[Link] = set()
        self._server: asyncio.base_events.Server | None = None
        self._admin: asyncio.AbstractServer | None = None
        self._closing = False
        self._taps: list = []
        # metrics: counts only, never addresses or bodies
        self.refused: dict[int, int] = {}
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
    def fingerprint(self) -> str:
        """Fingerprint of the relay's static Noise key, for clients to pin."""
        assert self.server_key is not None
        return fingerprint(self.server_key.public)

    async def start(self) -> None:
        """Open key, registry and store, build the stages, then listen on ``config.host:port``."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.max_connections = fit_fd_limit(cfg.max_connections)
        if self.server_key is None:
            self.server_key, self.key_created = load_or_create_server_key(cfg.data_dir)
        if self.registry is None:
            os.makedirs(cfg.data_dir, exist_ok=True)
            self.registry = identity.Registry(os.path.join(cfg.data_dir, "registry.db"))
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
        self.delivery = delivery = Delivery(self.router, self.store, cfg.mailbox_capacity,
                                            cfg.queue_memory_bytes, cfg.provider_memory_share)
        delivery.start()
        self.gate = gate = Gate(cfg, delivery, self.registry, self.count_error)
        gate.taps.extend(self._taps)
        self._taps = gate.taps  # one list: taps added later reach the gate too
        self.media_ops = MediaOps(self.media, delivery, self.count_error)
        self.upkeep = Upkeep(cfg, gate, delivery, self.store, self.media, self.count_error)
        wiring = LinkWiring(self.server_key, cfg, gate, delivery, self.media_ops,
                            self.count_error, self._admit, self._online, self._lost)
        self._server = await loop.create_server(lambda: Link(wiring), cfg.host, cfg.port,
                                                reuse_address=True, backlog=4096)
        self.upkeep.start()
        if cfg.admin_socket:
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
        for link in list(self.links):
            if link.state == LinkState.OPEN:
                link.close(ErrorCode.SHUTTING_DOWN, "relay shutting down")
            else:
                link.abort()
        if self.upkeep is not None:
            self.upkeep.stop()
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
            "quarantined": len(gate.quarantined()) if gate else 0,
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

    def count_error(self, code: int) -> None:
        """Count one refusal or error by its code (the only per-code metric)."""
        code = int(code)
        self.refused[code] = self.refused.get(code, 0) + 1

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
        link.preauth_ip = ip
        self._preauth += 1
        self._preauth_by_ip.setdefault(ip, {})[link] = None
        return True

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
        delivery.start_sync(link.feed)
        log.debug("device online (provider %s)", cred.provider)

    def _lost(self, link: LinkPort) -> None:
        # every link of this relay is a Link; the stages see them as LinkPorts
        self.links.discard(cast(Link, link))
        self._authenticated(cast(Link, link))
        if self.delivery is not None:
            self.delivery.detach(link)


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
    assert relay.server_key is not None  # start() loaded or made it
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
