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
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AuthError, ErrorCode, InvalidArgument

if TYPE_CHECKING:
    from ..media import MediaStore
    from ..store import Store
    from .delivery import Delivery
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

        Runs every poll over every live link, so per link it is kept to a
        few comparisons: a credential is checked against the trust (provider
        and device revocations) only when the trust changed since the last
        pass or the credential expired -- the trust is immutable, every link
        online at the last pass was checked against it, and every link since
        was verified against it at its handshake.
        """
        gate = self.gate
        trust = gate.trust
        changed = trust is not self._checked_for
        now = int(time.time())
        idle_limit = time.monotonic() - self.config.idle_timeout
        for feed in self.delivery.feeds():
            link = feed.link
            cred = link.cred
            assert cred is not None  # online links are authenticated
            if changed or now >= cred.expires_at:
                try:
                    gate.check_live(cred, now)
                except AuthError as exc:
                    self.count_error(exc.code)
                    link.close(exc.code, str(exc))
                    continue
            if link.last_rx < idle_limit:
                link.close(ErrorCode.IDLE_TIMEOUT, "idle timeout")
        # (set once every link was looked at: a pass cut short checks all again)
        self._checked_for = trust

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
