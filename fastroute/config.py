"""Relay configuration: defaults, a TOML file, then command-line flags.

Precedence is the usual one: built-in defaults < ``fastroute.toml`` (or the
file given with ``--config``) < explicit flags.  Every field is documented in
``README.md`` ("Configuration").
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ._model import MAX_MAILBOX_CAPACITY
from .errors import InvalidArgument

__all__ = ["RelayConfig", "Limits", "parse_hostport", "DATA_DIR_ENV"]

DEFAULT_PORT = 7474
#: the environment variable the CLI reads for the data directory (after ``--data-dir``)
DATA_DIR_ENV = "FASTROUTE_DATA_DIR"


def parse_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or a bare host into ``(host, port)``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        port_n = int(port) if port else default_port
    except ValueError:
        raise InvalidArgument(f"bad port in {text!r}") from None
    if not 0 <= port_n <= 65535:
        raise InvalidArgument(f"port out of range in {text!r}")
    return host or "127.0.0.1", port_n


@dataclass
class Limits:
    """Per-device integrity limits, the same for every provider's clients.

    A provider's enrolment may lower (never raise) the rates; see
    :meth:`fastroute.identity.Registry.add_provider`.
    """

    #: largest accepted body in bytes (also bounded by one Noise frame)
    max_body: int = 61440
    #: sustained messages per second per device, and the bucket's burst
    msgs_per_s: float = 5000.0
    msgs_burst: float = 20000.0
    #: sustained body bytes per second per device, and the burst
    bytes_per_s: float = 32.0 * 1024 * 1024
    bytes_burst: float = 64.0 * 1024 * 1024
    #: protocol errors tolerated on one connection before it is closed
    max_protocol_errors: int = 32
    #: every op (SEND, refused or not, PING, CONSENT, DACK, media) takes one token
    #: of the device's op budget; past it ops are refused with RATE_LIMITED
    ops_per_s: float = 10000.0
    ops_burst: float = 20000.0
    #: the same buckets shared by every device of one address (0: no such layer)
    address_msgs_per_s: float = 10000.0
    address_msgs_burst: float = 40000.0
    address_bytes_per_s: float = 64 * 1024 * 1024
    address_bytes_burst: float = 128 * 1024 * 1024
    #: shared by every device of one provider; 0 = unlimited unless the
    #: provider's enrolment sets it (the registry is the per-provider source)
    provider_msgs_per_s: float = 0.0
    provider_bytes_per_s: float = 0.0
    provider_ops_per_s: float = 0.0
    #: a provider bucket holds this many seconds of its rate
    provider_burst_s: float = 2.0
    #: ops one connection may have processed per event-loop turn (plus the
    #: frame that crosses it); the rest of its read waits for the next turn,
    #: so one busy link cannot delay others
    max_ops_per_turn: int = 256
    #: ops all connections together may have processed per event-loop turn
    #: before the busy ones wait for the next (a fresh read gets one frame)
    max_relay_ops_per_turn: int = 1024
    #: milliseconds of work all connections together may do per event-loop
    #: turn before the busy ones wait for the next: ops differ in cost, so a
    #: count alone does not bound how long a quiet link's read waits
    max_turn_ms: float = 0.1
    #: bytes of replies a client has not read (the socket's send buffer)
    #: past which its connection is closed with OUTPUT_LIMIT
    max_output_bytes: int = 8 * 1024 * 1024
    #: distinct devices one address may have (0: no cap)
    max_devices_per_address: int = 16
    #: device credentials never seen before, per provider per hour (0: no cap)
    new_devices_per_provider_per_hour: int = 10000
    #: connections still in their handshake, per source IP address
    max_preauth_per_ip: int = 256
    #: an address younger than this (since the relay first saw one of its
    #: devices) is a new sender: each stranger (an address that never wrote
    #: to it) it starts writing to takes a token of a tight bucket, relaxing
    #: linearly with age (0: the rule is off, e.g. for trace replays)
    new_sender_age_s: float = 7 * 86400.0
    new_sender_msgs_per_s: float = 0.2
    new_sender_burst: float = 20.0
    #: the abuse score (one point per SEND refused by the new-sender rule or
    #: sent to an address that has not opted in; halves every hour): past
    #: ``throttle_score`` the sender is held to ``throttled_msgs_per_s``,
    #: past ``quarantine_score`` it is quarantined until an operator lifts it
    throttle_score: float = 50.0
    quarantine_score: float = 200.0
    throttled_msgs_per_s: float = 1.0
    #: feature "safety": a spam report counts only for a sender the relay
    #: delivered a persistent message from to the reporter within
    #: ``report_window_s`` (0: reports are off and nothing is recorded); a
    #: counted report adds ``report_points`` to the sender's abuse score,
    #: scaled by the reporter's age (since the relay first saw its address)
    #: up to ``report_mature_s``; at most ``reports_per_provider`` reports
    #: from one provider's users count per sender per window
    report_window_s: float = 86400.0
    report_points: float = 10.0
    report_mature_s: float = 7 * 86400.0
    reports_per_provider: int = 15
    #: addresses and providers one address may block
    max_blocks: int = 10000


@dataclass
class RelayConfig:
    """Everything a :class:`fastroute.Relay` needs to start.

    ``data_dir`` holds the server key (``server.key``), the provider registry
    (``registry.db``) and the message store (``store.db``).
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: str = "fastroute-data"
    #: "sqlite" (durable, the default) or "memory" (nothing survives a restart)
    store: str = "sqlite"
    #: SQLite synchronous mode: "FULL" (a SACK survives power loss too, as the
    #: protocol promises) or "NORMAL" (survives a process crash only)
    synchronous: str = "FULL"
    #: unacked deliveries per online device (a client that never DACKs gets
    #: no more), and with the SQLite store also the queued + unacked messages
    #: per online device kept in RAM; the rest stay in the store
    mailbox_capacity: int = 4096
    #: queued + unacked messages a device's mailbox holds in RAM before new
    #: ones wait in the store and reach it by a backlog sync.  0: the
    #: ``mailbox_capacity`` with the SQLite store; with the memory store, no
    #: bound but ``queue_memory_bytes`` (that store keeps every message in RAM
    #: anyway, so a device that is merely slow stays on the live route instead
    #: of being fed again from the store).  Otherwise at least ``mailbox_capacity``
    mailbox_queue_capacity: int = 0
    #: open connections; 0 = as many as the file-descriptor limit allows.  The
    #: relay raises its fd limit at start to fit, and refuses to start when it
    #: cannot
    max_connections: int = 0
    #: connections kept for authenticated devices: past ``max_connections``
    #: minus this, connections still in their handshake are refused
    auth_reserve: int = 64
    #: bytes of queued and unacknowledged messages held in RAM, relay-wide;
    #: past it the fullest mailboxes spill to the store first
    queue_memory_bytes: int = 512 * 1024 * 1024
    #: the part of ``queue_memory_bytes`` one provider's devices may hold
    #: before its mailboxes are the first to spill
    provider_memory_share: float = 0.5
    handshake_timeout: float = 5.0
    #: a connection that sends nothing (not even a ping) for this long is closed
    idle_timeout: float = 300.0
    #: resent client message ids within this window are acked again, not routed twice
    dedup_window_s: float = 600.0
    dedup_max_entries: int = 1_000_000
    #: undelivered messages are deleted after this long
    ttl_s: int = 30 * 86400
    #: a deleted (delivered, expired) message's body, id and sender leave every
    #: file of the store within this many seconds (secure_delete + WAL truncation)
    erase_s: float = 20.0
    #: SQLite store: while messages come faster than the store commits them,
    #: how long a batch may wait for more to share its commit (less CPU a
    #: message, at most this much more latency; 0: none waits)
    group_commit_s: float = 0.001
    #: how often the relay re-reads the registry for revocations and enrolments
    registry_poll_s: float = 0.5
    #: attachments (media store in ``data_dir/media``): largest blob, bytes one
    #: address may upload per day, and how long a blob is kept
    media_max_blob: int = 100 * 1024 * 1024
    media_daily_bytes: int = 1024 * 1024 * 1024
    media_ttl_s: int = 30 * 86400
    #: disk budgets: the message store's database file (0: the disk's), all
    #: attachments together (0: no budget of their own), and the free space an
    #: attachment upload must leave on the data directory's disk for messages
    store_max_bytes: int = 0
    #: caps on what is stored for one recipient (0: none, the default: the
    #: accounting costs ~0.9 us per stored delivery, still in Python): messages
    #: and body bytes per device and per address; past one, SENDs to it get
    #: RECIPIENT_FULL (408)
    max_stored_msgs_per_device: int = 0
    max_stored_bytes_per_device: int = 0
    max_stored_msgs_per_address: int = 0
    max_stored_bytes_per_address: int = 0
    media_max_bytes: int = 0
    disk_reserve_bytes: int = 256 * 1024 * 1024
    #: a user receives messages from another provider's users only after opting in
    #: (CONSENT op); off only for closed deployments and tests
    require_consent: bool = True
    #: end-to-end encryption key directory (``data_dir/keys.db``): the most one-time
    #: EC and KEM prekeys a device's pools hold, and prekey bundles one requester
    #: address may fetch (each consumes one-time prekeys): a token bucket; a device
    #: is told (an EVENT) when one of its pools falls below prekey_low_water
    prekey_ec_cap: int = 500
    prekey_kem_cap: int = 200
    prekey_low_water: int = 10
    #: a device offline and silent this long leaves its address's device list
    device_retention_s: int = 30 * 86400
    prekey_fetches_per_s: float = 2.0
    prekey_fetch_burst: float = 200.0
    #: feature "groups": members (and pending invites) per group (WhatsApp: 1024),
    #: groups one user may be a member of, invites pending for one user
    group_max_members: int = 1024
    groups_per_user: int = 1024
    group_invites_per_user: int = 64
    #: invite (never add directly) users of the adder's own provider too
    group_invite_own_users: bool = False
    #: group SENDs per sender address, and per group and senders' provider (token
    #: buckets: rate, burst; one provider's flood cannot spend another's share),
    #: and membership changes (create, add, remove, admin) per acting address
    group_msgs_per_s: float = 100.0
    group_msgs_burst: float = 1000.0
    group_msgs_per_group_s: float = 1000.0
    group_msgs_per_group_burst: float = 5000.0
    group_changes_per_s: float = 5.0
    group_changes_burst: float = 200.0
    #: listen on ``data_dir/admin.sock`` (mode 0600) for ``fastroute record``; off by default
    admin_socket: bool = False
    #: the read-only HTTP listener for ``/metrics``, ``/healthz`` and ``/readyz``:
    #: ``"auto"`` is 127.0.0.1 on the relay's port + 1 (an ephemeral port when the
    #: relay's port is 0), ``"off"`` disables it, else ``HOST:PORT``
    admin_listen: str = "auto"
    #: log lines as plain text (``"text"``) or one JSON object per line (``"json"``)
    log_format: str = "text"
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> "RelayConfig":
        """Read a TOML file with a ``[relay]`` table and an optional ``[limits]`` table."""
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"{path}: {exc}") from None
        except OSError as exc:
            raise InvalidArgument(f"cannot read the configuration file {os.fspath(path)!r}: "
                                  f"{exc.strerror or exc}") from None
        return cls.from_mapping(doc, source=str(path))

    @classmethod
    def from_mapping(cls, doc: dict[str, Any], source: str = "config") -> "RelayConfig":
        """Build a config from nested dicts (as read from TOML), rejecting unknown keys."""
        unknown = set(doc) - {"relay", "limits"}
        if unknown:
            raise InvalidArgument(f"{source}: unknown tables {sorted(unknown)}")
        cfg = cls()
        relay = dict(doc.get("relay", {}))
        if "listen" in relay:
            cfg.host, cfg.port = parse_hostport(str(relay.pop("listen")))
        cfg._update(relay, source, "relay")
        cfg.limits = _replace_checked(cfg.limits, doc.get("limits", {}), source, "limits")
        cfg.validate()
        return cfg

    def _update(self, values: dict[str, Any], source: str, table: str) -> None:
        names = {f.name for f in dataclasses.fields(self)} - {"limits"}
        for key, value in values.items():
            if key not in names:
                raise InvalidArgument(f"{source}: unknown key [{table}].{key}")
            setattr(self, key, _coerce(_declared(self, key), value, f"[{table}].{key}"))

    def with_overrides(self, **overrides: Any) -> "RelayConfig":
        """Return a copy with the non-None ``overrides`` applied (flags beat the file)."""
        new = dataclasses.replace(self, limits=dataclasses.replace(self.limits))
        new._update({k: v for k, v in overrides.items() if v is not None}, "flags", "relay")
        new.validate()
        return new

    def queue_capacity(self, in_memory: bool) -> int:
        """The engine's bound on one device's mailbox (``Router``'s
        ``mailbox_capacity``): ``mailbox_queue_capacity`` if set, else
        ``mailbox_capacity``, or no bound but the memory budget's when the
        message store keeps its messages in RAM (``in_memory``)."""
        if self.mailbox_queue_capacity:
            return self.mailbox_queue_capacity
        return MAX_MAILBOX_CAPACITY if in_memory else self.mailbox_capacity

    def validate(self) -> None:
        """Raise :class:`InvalidArgument` on values that cannot work."""
        if self.store not in ("sqlite", "memory"):
            raise InvalidArgument("store must be 'sqlite' or 'memory'")
        if self.synchronous.upper() not in ("NORMAL", "FULL"):
            raise InvalidArgument("synchronous must be NORMAL or FULL")
        if self.log_format not in ("text", "json"):
            raise InvalidArgument("log_format must be 'text' or 'json'")
        if self.admin_listen not in ("auto", "off"):
            parse_hostport(self.admin_listen)
        if not 1 <= self.mailbox_capacity <= MAX_MAILBOX_CAPACITY:
            raise InvalidArgument(f"mailbox_capacity must be in 1..{MAX_MAILBOX_CAPACITY}")
        if self.mailbox_queue_capacity and not (
                self.mailbox_capacity <= self.mailbox_queue_capacity <= MAX_MAILBOX_CAPACITY):
            raise InvalidArgument("mailbox_queue_capacity must be 0 or in "
                                  f"mailbox_capacity..{MAX_MAILBOX_CAPACITY}")
        if min(self.prekey_ec_cap, self.prekey_kem_cap) < 1:
            raise InvalidArgument("prekey caps must be >= 1")
        if min(self.group_max_members, self.groups_per_user, self.group_invites_per_user) < 1:
            raise InvalidArgument("group_max_members, groups_per_user and "
                                  "group_invites_per_user must be >= 1")
        if min(self.group_msgs_per_s, self.group_msgs_burst, self.group_msgs_per_group_s,
               self.group_msgs_per_group_burst, self.group_changes_per_s,
               self.group_changes_burst) <= 0:
            raise InvalidArgument("group rates and bursts must be > 0")
        if self.prekey_fetches_per_s <= 0 or self.prekey_fetch_burst < 1:
            raise InvalidArgument("prekey_fetches_per_s must be > 0, prekey_fetch_burst >= 1")
        if self.max_connections < 0 or self.auth_reserve < 0:
            raise InvalidArgument("max_connections and auth_reserve must be >= 0")
        if self.queue_memory_bytes < 1 or not 0 < self.provider_memory_share <= 1:
            raise InvalidArgument("queue_memory_bytes must be >= 1 and "
                                  "provider_memory_share in (0, 1]")
        if (self.limits.max_ops_per_turn < 1 or self.limits.max_relay_ops_per_turn < 1
                or self.limits.max_output_bytes < 65536 or not self.limits.max_turn_ms > 0):
            raise InvalidArgument("limits.max_ops_per_turn must be >= 1, "
                                  "limits.max_turn_ms > 0 and "
                                  "limits.max_output_bytes >= 65536")
        lim = self.limits
        if (lim.report_window_s < 0 or lim.report_points < 0 or lim.report_mature_s < 0
                or lim.reports_per_provider < 0 or lim.max_blocks < 0):
            raise InvalidArgument("limits.report_* and limits.max_blocks must be >= 0")
        if not 0 < self.limits.max_body <= 61440:
            raise InvalidArgument("limits.max_body must be in 1..61440")
        for name in ("store_max_bytes", "media_max_bytes", "disk_reserve_bytes",
                     "max_stored_msgs_per_device", "max_stored_bytes_per_device",
                     "max_stored_msgs_per_address", "max_stored_bytes_per_address"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0")
        if 0 < self.store_max_bytes < 1 << 16:
            raise InvalidArgument("store_max_bytes must be 0 or at least 65536")
        if not 0 <= self.group_commit_s <= 0.1:
            raise InvalidArgument("group_commit_s must be in [0, 0.1]")
        if not 0 < self.erase_s <= 40:
            raise InvalidArgument("erase_s must be in (0, 40]: deleted messages must leave "
                                  "the disk within 60 s")
        for name in ("handshake_timeout", "idle_timeout", "dedup_window_s", "registry_poll_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name} must be > 0")

    def admin_address(self, relay_port: int) -> tuple[str, int] | None:
        """Where the read-only admin HTTP listener binds, or None when it is off."""
        if self.admin_listen == "off":
            return None
        if self.admin_listen == "auto":
            return ("127.0.0.1", relay_port + 1 if self.port else 0)
        return parse_hostport(self.admin_listen, default_port=0)


def _coerce(current: Any, value: Any, name: str) -> Any:
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise InvalidArgument(f"{name} must be true or false, got {value!r}")
        return value
    if not isinstance(current, (int, float, str)):
        return value
    if (type(current) is int and isinstance(value, float) and value.is_integer()):
        value = int(value)  # 4096.0 in a TOML file means 4096
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(current):
        raise InvalidArgument(f"{name} must be {type(current).__name__}, "
                              f"got {type(value).__name__}")
    return value


def _replace_checked(obj: Any, values: dict[str, Any], source: str, table: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    out = dataclasses.replace(obj)
    for key, value in values.items():
        if key not in names:
            raise InvalidArgument(f"{source}: unknown key [{table}].{key}")
        setattr(out, key, _coerce(_declared(out, key), value, f"[{table}].{key}"))
    return out


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _declared(obj: Any, name: str) -> Any:
    """A value of the field's declared type (the default may be an int for a float field)."""
    for f in dataclasses.fields(obj):
        if f.name == name and isinstance(f.type, str) and f.type in _TYPES:
            return _TYPES[f.type]()
    return getattr(obj, name)
