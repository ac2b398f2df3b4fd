"""The relay's read-only admin listener: ``/metrics``, ``/healthz``, ``/readyz``.

Plain HTTP/1.0 on a separate socket, loopback by default (``admin_listen``),
so the data port never speaks HTTP and a firewall can keep the two apart.
It only reads: nothing that changes state is reachable from here (that stays
with the CLI, which writes the registry the relay polls).

The Prometheus text exposition format (version 0.0.4) is written by hand
rather than with ``prometheus-client``: the relay exposes a few dozen series,
all computed at scrape time from counters the stages keep anyway, so the
library's registry, collectors and global state would add a dependency and
an allocation on every count for no gain; the format is a few lines of text.

Privacy: labels carry only provider names (enrolled organisations, not
people), connection states and error codes; never an address, a device
name, a message id or a body.  Mailbox depth is an aggregate across devices
(how many online devices hold at most N messages), never a series per device.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from .. import wire
from ..errors import ErrorCode
from ..histogram import LOOP_BUCKETS, Histogram

if TYPE_CHECKING:
    from ..config import RelayConfig
    from .delivery import Delivery
    from .link import Link, Turns

__all__ = ["GC_PAUSES", "GcPauses", "Histogram", "Observed", "render_metrics",
           "serve_metrics"]


class Observed(Protocol):
    """What the admin listener reads of a relay, and all it may read.

    :class:`~fastroute.relay.server.Relay` is the one implementation (the
    server starts this listener on itself).  Listing the surface here keeps
    what a scrape can reach in one place, to be read with the privacy rule
    above: counts, levels and states, never an address.
    """

    @property
    def config(self) -> "RelayConfig":
        """The relay's configuration (the store kind, the data directory)."""

    @property
    def closing(self) -> bool:
        """True once the relay is shutting down."""

    @property
    def started_at(self) -> float:
        """When the relay started (Unix time)."""

    @property
    def accepted_connections(self) -> int:
        """TCP connections accepted."""

    @property
    def applied_generation(self) -> int:
        """The registry generation the relay applied last."""

    @property
    def reloads(self) -> int:
        """Registry reloads applied."""

    @property
    def op_counts(self) -> dict[int, int]:
        """Well-formed ops received, by opcode."""

    @property
    def handshake_seconds(self) -> Histogram:
        """Noise handshake durations."""

    @property
    def links(self) -> "set[Link]":
        """The open connections (their states and providers are counted)."""

    @property
    def router(self) -> Any:
        """The engine, compiled or its model (its mailboxes' depths are aggregated)."""

    @property
    def delivery(self) -> "Delivery | None":
        """The delivery stage, once started (its online feeds)."""

    @property
    def store(self) -> Any:
        """The message store (its counters)."""

    @property
    def turns(self) -> "Turns | None":
        """The fair scheduler of the links' turns, once started."""

    def stats(self) -> dict[str, Any]:
        """The relay's counters."""

    def ready(self) -> tuple[bool, str]:
        """Whether the relay is ready, and why not."""

    def link_state_name(self, link: "Link") -> str:
        """A link's state as a metrics label."""

log = logging.getLogger("fastroute.relay")

#: mailbox depth buckets in messages
DEPTH_BUCKETS = (0, 1, 10, 100, 1000, 4096, 16384, 65536)
#: the engine's cumulative counts (the rest of its stats are levels)
_ENGINE_COUNTERS = frozenset({"delivered", "popped", "acked", "requeued", "returned"})
#: links (and online devices) a scrape looks at before it lets the loop run:
#: each costs about a microsecond, and a relay of 100 k links would otherwise
#: stop every client for a tenth of a second at every scrape
SCRAPE_SLICE = 2000


class GcPauses:
    """This process's garbage collections: how many, by generation, and how
    long each held the interpreter (a pause every connection waits out).

    Installed once per process by the first relay that starts (a callback in
    ``gc.callbacks``; the collector's settings are not touched).
    """

    def __init__(self) -> None:
        #: collections finished, by generation (0, 1, 2)
        self.collections = [0, 0, 0]
        #: seconds from each collection's start to its end
        self.pauses = Histogram(LOOP_BUCKETS)
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        """Start counting (idempotent)."""
        if not self._installed:
            self._installed = True
            gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        # a collection holds the GIL from start to stop: no other thread's
        # collection can come between the two calls
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.observe(time.perf_counter() - self._started)
            generation = info.get("generation", 2)
            if 0 <= generation < 3:
                self.collections[generation] += 1


#: the process's collector, as the metrics report it
GC_PAUSES = GcPauses()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


async def render_metrics(relay: Observed) -> str:
    """The relay's metrics in the Prometheus text format (counts only)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value!r}")

    stats = relay.stats()
    delivery, store = relay.delivery, relay.store
    metric("fastroute_up", "gauge", "1 while the relay accepts connections.",
           [("", 0 if relay.closing else 1)])
    metric("fastroute_start_time_seconds", "gauge", "When the relay started (Unix time).",
           [("", round(relay.started_at, 3))])
    states: dict[str, int] = {}
    providers: dict[str, int] = {}
    for i, link in enumerate(list(relay.links)):
        if i and not i % SCRAPE_SLICE:
            await asyncio.sleep(0)
        state = relay.link_state_name(link)
        states[state] = states.get(state, 0) + 1
        if link.provider:
            providers[link.provider] = providers.get(link.provider, 0) + 1
    for state in ("handshake", "open", "draining", "closed"):
        states.setdefault(state, 0)
    metric("fastroute_connections", "gauge", "TCP connections by link state.",
           [(f'{{state="{s}"}}', n) for s, n in sorted(states.items())])
    metric("fastroute_connections_authenticated", "gauge",
           "Authenticated connections by the provider that vouched for the device.",
           [(f'{{provider="{_label(p)}"}}', n) for p, n in sorted(providers.items())])
    metric("fastroute_connections_accepted_total", "counter", "TCP connections accepted.",
           [("", relay.accepted_connections)])
    metric("fastroute_messages_accepted_total", "counter",
           "Messages stored and acked to their sender.", [("", stats["accepted"])])
    metric("fastroute_messages_delivered_total", "counter",
           "Messages acked by a recipient device.", [("", stats["delivered"])])
    refusals = []
    for code, n in sorted(stats["refused"].items()):
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = "UNKNOWN"
        refusals.append((f'{{code="{code}",reason="{name}"}}', n))
    metric("fastroute_refusals_total", "counter",
           "Refusals and errors sent to clients, by error code.", refusals)
    metric("fastroute_handshake_duration_seconds", "histogram",
           "From TCP accept to the device being online.", [])
    lines.extend(relay.handshake_seconds.lines("fastroute_handshake_duration_seconds"))
    ops: list[tuple[str, float]] = []
    for opcode, n in sorted(relay.op_counts.items()):
        try:
            name = wire.Op(opcode).name
        except ValueError:  # pragma: no cover - only known opcodes pass the decoder
            name = "UNKNOWN"
        ops.append((f'{{op="{name}"}}', n))
    metric("fastroute_ops_received_total", "counter",
           "Well-formed ops received from clients, by op.", ops)
    if delivery is not None:
        metric("fastroute_delivery_latency_seconds", "histogram",
               "From acceptance by the relay to the DELIVER written to the recipient's link "
               "(one sample per mailbox pull; backlog from the store included).", [])
        lines.extend(delivery.latency.lines("fastroute_delivery_latency_seconds"))
    turns = relay.turns
    if turns is not None:
        metric("fastroute_loop_turn_duration_seconds", "histogram",
               "How long each turn of the fair scheduler held the event loop (reads that "
               "waited, busy connections' shares, the writes before them): what a quiet "
               "connection's read may wait behind.", [])
        lines.extend(turns.durations.lines("fastroute_loop_turn_duration_seconds"))
    metric("fastroute_delivery_spills_total", "counter",
           "Mailboxes taken off the live route over the relay's memory budget "
           "(queue_memory_bytes).", [("", stats["spills"])])
    metric("fastroute_delivery_synced_total", "counter",
           "Messages a backlog sync pushed from the store into a mailbox (a device that "
           "was offline, or whose mailbox overflowed or spilled, catching up).",
           [("", stats["synced"])])
    metric("fastroute_dedup_entries", "gauge", "Message ids in the dedup window.",
           [("", stats["dedup_entries"])])
    engine = stats["engine"]
    for key in sorted(engine):
        if not isinstance(engine[key], int):
            continue
        if key in _ENGINE_COUNTERS:
            metric(f"fastroute_engine_{key}_total", "counter",
                   f"Routing engine: messages {key} since start.", [("", engine[key])])
        else:
            metric(f"fastroute_engine_{key}", "gauge", f"Routing engine: {key} now.",
                   [("", engine[key])])
    # mailbox depth: an aggregate over online devices, never a series per device
    depth_counts = [0] * (len(DEPTH_BUCKETS) + 1)
    total_depth = 0
    online = 0
    feeds = delivery.feeds() if delivery is not None else []
    for i, feed in enumerate(feeds):
        if i and not i % SCRAPE_SLICE:
            await asyncio.sleep(0)
        if feed.link.feed is not feed:
            continue  # went offline while the scrape let the loop run
        queued, unacked = relay.router.pending(feed.dev)
        d = queued + unacked
        total_depth += d
        online += 1
        depth_counts[bisect.bisect_left(DEPTH_BUCKETS, d)] += 1
    lines.append("# HELP fastroute_mailbox_depth_messages Online devices by the messages "
                 "queued or unacked in their mailbox (a histogram over devices, now).")
    lines.append("# TYPE fastroute_mailbox_depth_messages histogram")
    acc = 0
    for bound, n in zip(DEPTH_BUCKETS, depth_counts):
        acc += n
        lines.append(f'fastroute_mailbox_depth_messages_bucket{{le="{bound}"}} {acc}')
    lines.append(f'fastroute_mailbox_depth_messages_bucket{{le="+Inf"}} {online}')
    lines.append(f"fastroute_mailbox_depth_messages_sum {total_depth}")
    lines.append(f"fastroute_mailbox_depth_messages_count {online}")
    if store is not None:
        # stats() and count_pending() are what both stores offer beyond the
        # Store protocol; a third-party store without them just has fewer series
        stats_fn = getattr(store, "stats", None)
        sstats = stats_fn() if callable(stats_fn) else {}
        if "commits" in sstats:
            metric("fastroute_store_commits_total", "counter", "Store group commits.",
                   [("", sstats["commits"])])
        commit_seconds = getattr(store, "commit_seconds", None)
        if commit_seconds is not None:
            metric("fastroute_store_commit_duration_seconds", "histogram",
                   "One store transaction, BEGIN to COMMIT (fsync included).", [])
            lines.extend(commit_seconds.lines("fastroute_store_commit_duration_seconds"))
        if "failed_batches" in sstats:
            metric("fastroute_store_failed_batches_total", "counter",
                   "Store batches that failed to commit.", [("", sstats["failed_batches"])])
        if "queued_requests" in sstats:
            metric("fastroute_store_queued_requests", "gauge",
                   "Requests waiting for the store's writer.", [("", sstats["queued_requests"])])
        count_pending = getattr(store, "count_pending", None)
        try:
            pending = await asyncio.wait_for(count_pending(), 2.0) if count_pending else None
        except Exception:  # noqa: BLE001 - a scrape never fails on a busy store
            pending = None
        if pending is not None:
            metric("fastroute_store_pending_rows", "gauge",
                   "Undelivered (device, message) rows in the store.", [("", pending)])
        if relay.config.store == "sqlite":
            size = 0
            for suffix in ("", "-wal", "-shm"):
                try:
                    size += os.path.getsize(os.path.join(relay.config.data_dir,
                                                         "store.db" + suffix))
                except OSError:
                    pass
            metric("fastroute_store_size_bytes", "gauge",
                   "Size of store.db with its WAL and shared-memory files.", [("", size)])
    metric("fastroute_registry_generation", "gauge",
           "Registry generation whose revocations the relay has applied to live links.",
           [("", relay.applied_generation)])
    metric("fastroute_config_reloads_total", "counter", "Configurations reloaded (SIGHUP).",
           [("", relay.reloads)])
    metric("fastroute_gc_collections_total", "counter",
           "Garbage collections of the relay's process, by generation.",
           [(f'{{generation="{g}"}}', n) for g, n in enumerate(GC_PAUSES.collections)])
    metric("fastroute_gc_pause_seconds", "histogram",
           "How long each garbage collection held the interpreter (every connection "
           "waits it out).", [])
    lines.extend(GC_PAUSES.pauses.lines("fastroute_gc_pause_seconds"))
    return "\n".join(lines) + "\n"


async def serve_metrics(relay: Observed, host: str, port: int) -> asyncio.base_events.Server:
    """Start the read-only admin HTTP listener on ``host:port``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", "read only\n"
            elif path == "/metrics":
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                body = await render_metrics(relay)
            elif path == "/healthz":
                status, ctype, body = "200 OK", "text/plain", "ok\n"
            elif path == "/readyz":
                ready, why = relay.ready()
                status = "200 OK" if ready else "503 Service Unavailable"
                ctype, body = "text/plain", why + "\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", "not found\n"
            data = body.encode()
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(data)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        except Exception:  # the admin listener must never take the relay down
            log.exception("admin request failed", extra={"event": "admin.error"})
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True, limit=8192)


def now_s() -> float:
    """The clock latencies are measured with."""
    return time.monotonic()
