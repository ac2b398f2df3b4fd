"""The upkeep stage: what the relay does on a timer, and its admin socket.

Every ``registry_poll_s``: reload the trust registry if it changed (a
revocation or enrolment made with the CLI), and close links whose credential
was revoked or has expired, or that have been idle past ``idle_timeout``.
Every minute: expire the dedup window, undelivered messages past their TTL
and old attachments.  The admin socket (``admin_socket = true``) streams
pseudonymised traffic metadata to ``fastroute record``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AuthError, ErrorCode, InvalidArgument
from ..identity import Trust

if TYPE_CHECKING:
    from ..media import MediaStore
    from ..store import Store
    from .delivery import Delivery, Feed
    from .gate import Gate
    from .keys import Keys

__all__ = ["Upkeep", "serve_admin"]

log = logging.getLogger("fastroute.relay")

#: seconds between expiry passes (dedup window, message TTL, media TTL)
EXPIRE_EVERY_S = 60.0


class Upkeep:
    """The housekeeping task of one relay."""

    def __init__(self, config: Any, gate: "Gate", delivery: "Delivery", store: "Store",
                 media: "MediaStore", count_error: Callable[[int], None],
                 keys: "Keys | None" = None) -> None:
        self.config = config
        self.gate = gate
        self.delivery = delivery
        self.store = store
        self.media = media
        self.count_error = count_error
        self.keys = keys
        self._pruned_for: Any = None  # the Trust the device lists were last pruned against
        self._checked_for: Any = None  # the Trust every live link was last checked against
        #: (monotonic time, tie, feed): when to look at a live link next -- its
        #: idle deadline or its credential's expiry, whichever comes first
        self._due: list[tuple[float, int, "Feed"]] = []
        self._tie = itertools.count()
        #: the idle_timeout those deadlines were set with (a reload may change it)
        self._idle_for = config.idle_timeout
        delivery.watch_attached()
        self._task: asyncio.Task | None = None
        #: called with the registry generation once its revocations reached live links
        self.on_applied: Callable[[int], None] | None = None
        self.last_pass = time.monotonic()

    def stalled(self) -> bool:
        """True if no housekeeping pass completed for a long while (readiness)."""
        return time.monotonic() - self.last_pass > max(10.0, 20 * self.config.registry_poll_s)

    def start(self) -> None:
        """Start the housekeeping loop in the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        """Stop the housekeeping loop."""
        if self._task is not None:
            self._task.cancel()

    def recheck_live(self) -> None:
        """Close links whose credential was revoked or has expired, or that went idle.

        Runs every poll, so its work is kept to what is due: each live link
        waits in a heap for its idle deadline or its credential's expiry,
        whichever comes first, and is looked at then (a link that talked
        meanwhile goes back with its new deadline).  A relay of a million
        mostly idle links then spends nothing on them between deadlines,
        where a walk over every link would hold the loop for a fraction of
        a second each poll.  A change of the trust checks again the live
        links it may fail: those of the devices revoked since the last pass
        (a provider gone or revoked: every link) -- the trust is immutable,
        every link online at the last pass was checked against the trust of
        that pass, and every link since was verified at its handshake against
        a trust at least as new.
        """
        gate = self.gate
        trust = gate.trust
        delivery = self.delivery
        now = int(time.time())
        now_m = time.monotonic()
        idle_limit = now_m - self.config.idle_timeout
        for feed in delivery.take_attached():
            self._schedule(feed, now, now_m)
        old = self._checked_for
        if trust is not old:
            revoked = (trust.revoked_since(old)
                       if isinstance(trust, Trust) and isinstance(old, Trust) else None)
            if revoked is None or revoked[1]:
                # the first pass, or a provider gone: every live link
                for feed in delivery.feeds():
                    self._check(feed.link, now)
            else:
                # a device revocation (what providers do every day) looks up
                # the links of the devices it names, not every link
                for address, device in revoked[0]:
                    named = delivery.feed_of(address, device)
                    if named is not None:
                        self._check(named.link, now)
            # (set once every link was looked at: a pass cut short checks all again)
            self._checked_for = trust
        due = self._due
        taken = []
        while due and due[0][0] <= now_m:
            taken.append(heapq.heappop(due)[2])
        for feed in taken:
            link = feed.link
            if link.feed is not feed or not link.is_open():
                continue  # offline since, or closed above: forgotten
            cred = link.cred
            assert cred is not None  # online links are authenticated
            if now >= cred.expires_at and not self._check(link, now):
                continue
            if link.last_rx < idle_limit:
                link.close(ErrorCode.IDLE_TIMEOUT, "idle timeout")
                continue
            self._schedule(feed, now, now_m)
        if (len(due) > 2 * delivery.online + 64
                or self.config.idle_timeout != self._idle_for):
            # links that went offline wait in the heap until their time;
            # many short-lived links would pile up (holding their objects):
            # start over from those online -- as when a reload changed the
            # idle timeout, which takes effect at once
            self._idle_for = self.config.idle_timeout
            self._due = []
            for feed in delivery.feeds():
                self._schedule(feed, now, now_m)

    def _check(self, link: Any, now: int) -> bool:
        """Check a live link's credential against the trust; close it if that fails."""
        try:
            self.gate.check_live(link.cred, now)
        except AuthError as exc:
            self.count_error(exc.code)
            link.close(exc.code, str(exc))
            return False
        return True

    def _schedule(self, feed: "Feed", now: int, now_m: float) -> None:
        """Put a live link in the heap at its next deadline (idle or expiry)."""
        link = feed.link
        cred = link.cred
        assert cred is not None  # online links are authenticated
        at = min(link.last_rx + self.config.idle_timeout, now_m + max(0, cred.expires_at - now))
        heapq.heappush(self._due, (at, next(self._tie), feed))

    async def _run(self) -> None:
        last_expire = 0.0
        purge_again = False
        purged_version = self.gate.trust.version
        while True:
            await asyncio.sleep(self.config.registry_poll_s)
            try:
                # the trust may not have changed, but credentials expire
                # and links go idle all the same: recheck every time
                self.gate.reload_trust()
                self.recheck_live()
                if self.keys is not None and self.gate.trust is not self._pruned_for:
                    # revoked devices leave their device lists
                    self._pruned_for = self.gate.trust
                    self.keys.prune(self.gate.trust.is_revoked)
                self.last_pass = time.monotonic()
                version = self.gate.trust.version
                if self.on_applied is not None and isinstance(version, tuple):
                    self.on_applied(version[0])
                now = time.monotonic()
                # (a handshake may have reloaded the trust first: compare versions)
                changed = self.gate.trust.version != purged_version
                if changed or purge_again:
                    purged_version = self.gate.trust.version
                    # revoked devices online now are closed above; they are
                    # purged on the next pass, once offline
                    purge_again = changed
                    self.delivery.purge_revoked(self.gate.trust.is_revoked)
                if now - last_expire > EXPIRE_EVERY_S:
                    last_expire = now
                    self.delivery.purge_revoked(self.gate.trust.is_revoked)
                    self.gate.expire()
                    if self.keys is not None:
                        # devices silent past the retention period leave their lists
                        self.keys.prune(self.gate.trust.is_revoked,
                                        time.time() - self.config.device_retention_s)
                    await self.store.expire(int(time.time() * 1000))
                    await self.media.expire()
                    # the caps' counts from the store itself: expiry, drift
                    await self.delivery.refresh_caps()
            except asyncio.CancelledError:
                raise
            except Exception:  # housekeeping must never take the relay down
                log.exception("housekeeping step failed", extra={"event": "upkeep.failed"})


async def serve_admin(relay: Any, path: str) -> asyncio.AbstractServer:
    """Serve the relay's admin socket at ``path`` (``record KEYHEX`` streams taps).

    Only root or the relay's user can open it (mode 0600).  What leaves the
    relay per accepted message: its time, keyed-hash pseudonyms of sender
    and recipient (the key is the recorder's, for this session only), body
    size and class; never a body, an id or an address.
    """
    # the trace format owns the pseudonyms; imported here, off the relay's
    # start-up path unless an operator turned the socket on
    from ..loadtest.trace import pseudonymize

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tap = None
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            cmd, _, arg = line.decode("ascii", "replace").strip().partition(" ")
            if cmd != "record":
                writer.write(b"error unknown command\n")
                return
            try:
                key = bytes.fromhex(arg)
                pseudonymize(key, "probe@probe")
            except (ValueError, InvalidArgument):
                writer.write(b"error bad key\n")
                return
            writer.write(b"ok\n")

            def tap(ts_ms: int, sender: str, to: str, size: int, cls: int) -> None:
                # the relay thread never blocks on a slow recorder: past 1 MiB
                # buffered, records are dropped and the recorder sees a gap
                if writer.transport.get_write_buffer_size() < 1 << 20:
                    writer.write(f"{ts_ms * 1000} {pseudonymize(key, sender)} "
                                 f"{pseudonymize(key, to)} {size} {'e' if cls else 'p'}\n"
                                 .encode())

            relay.add_tap(tap)
            await reader.read()  # until the recorder disconnects
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            if tap is not None:
                relay.remove_tap(tap)
            writer.close()

    server = await asyncio.start_unix_server(handle, path=path)
    os.chmod(path, 0o600)
    return server
