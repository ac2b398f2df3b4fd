"""Caps on what the store keeps for one recipient: messages and bytes, per device
and per address (issue 12: only the TTL bounded a backlog before).

A persistent SEND to an address whose backlog, or one of whose devices'
backlog, is at its cap is refused with ``RECIPIENT_FULL`` (408), so the
sender knows to resend later (same id) rather than fill the disk for
everyone.  Ephemeral signals are never stored and never refused for this.

The counts are kept in memory: raised when a batch is handed to the store,
lowered again if the store refuses it, lowered when a device acks (bytes
by the device's average message size: acks carry mids, not sizes), and
set from the store itself (:meth:`Caps.load`) at start and every minute,
which also accounts for expiry and corrects the averages.  A cap is
therefore exact after each refresh and close to it in between.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..wire import tail_body_size

__all__ = ["Caps"]


class Caps:
    """Per-device and per-address backlog counts, and the addresses at a cap.

    ``limits``: ``(msgs_per_device, bytes_per_device, msgs_per_address,
    bytes_per_address)``, 0 meaning no cap.  :attr:`full` is the set of
    addresses refused right now; the gate checks it only when non-empty.
    """

    def __init__(self, limits: tuple[int, int, int, int]) -> None:
        self.dev_msgs, self.dev_bytes, self.addr_msgs, self.addr_bytes = limits
        self.enabled = any(limits)
        self._dev: dict[int, list[int]] = {}      # device key -> [messages, bytes]
        self._addr: dict[str, list[int]] = {}     # address -> [messages, bytes]
        self._addr_of: dict[int, str] = {}        # device key -> address
        self._keys_of: dict[str, list[int]] = {}  # address -> device keys
        #: addresses whose backlog (or one of whose devices') is at a cap
        self.full: set[str] = set()

    def device(self, dkey: int, address: str) -> None:
        """Know which address a device key belongs to."""
        if dkey not in self._addr_of:
            self._addr_of[dkey] = address
            self._keys_of.setdefault(address, []).append(dkey)

    def _check(self, address: str) -> None:
        a = self._addr.get(address)
        over = a is not None and ((self.addr_msgs and a[0] >= self.addr_msgs)
                                  or (self.addr_bytes and a[1] >= self.addr_bytes))
        if not over and (self.dev_msgs or self.dev_bytes):
            for dkey in self._keys_of.get(address, ()):
                d = self._dev.get(dkey)
                if d is not None and ((self.dev_msgs and d[0] >= self.dev_msgs)
                                      or (self.dev_bytes and d[1] >= self.dev_bytes)):
                    over = True
                    break
        if over:
            self.full.add(address)
        else:
            self.full.discard(address)

    def stored(self, items: list, sign: int = 1) -> None:
        """A batch of ``(sender, id, body, ts_ms, device_keys)`` went to the store
        (``sign`` -1: the store refused it)."""
        if self.enabled:
            self._count([len(item[2]) for item in items], [item[4] for item in items], sign)

    def stored_tails(self, items: list, sign: int = 1) -> None:
        """A batch of flat ``device_keys, tail`` (a store's ``put_tails``) went
        to the store (``sign`` -1: the store refused it)."""
        if self.enabled:
            self._count(map(tail_body_size, items[1::2]), items[0::2], sign)

    def _count(self, sizes: Iterable[int], devs_each: Iterable, sign: int) -> None:
        """Count a stored message's body size for each of its device keys, the
        two side by side (``sign`` -1: take them back)."""
        # per stored delivery, on the relay's hot path: plain dict and list
        # arithmetic, and a cap check only where a count grows
        dev, addr, addr_of, full = self._dev, self._addr, self._addr_of, self.full
        dm, db, am, ab = self.dev_msgs, self.dev_bytes, self.addr_msgs, self.addr_bytes
        shrunk = set()
        for size, devs in zip(sizes, devs_each):
            size *= sign
            for dkey in devs:
                d = dev.get(dkey)
                if d is None:
                    d = dev[dkey] = [0, 0]
                d[0] += sign
                d[1] += size
                name = addr_of.get(dkey)
                if name is None:
                    continue
                a = addr.get(name)
                if a is None:
                    a = addr[name] = [0, 0]
                a[0] += sign
                a[1] += size
                if sign < 0:
                    if name in full:
                        shrunk.add(name)
                elif ((dm and d[0] >= dm) or (db and d[1] >= db)
                      or (am and a[0] >= am) or (ab and a[1] >= ab)):
                    full.add(name)
        for name in shrunk:
            self._check(name)

    def acked(self, dkey: int, n: int) -> None:
        """``dkey`` acked ``n`` stored messages."""
        if not self.enabled:
            return
        d = self._dev.get(dkey)
        if d is None or not d[0]:
            return
        nbytes = n * (d[1] // d[0])
        d[0] = max(0, d[0] - n)
        d[1] = max(0, d[1] - nbytes)
        name = self._addr_of.get(dkey)
        if name is None:
            return
        a = self._addr.get(name)
        if a is not None:
            a[0] = max(0, a[0] - n)
            a[1] = max(0, a[1] - nbytes)
        if name in self.full:
            self._check(name)

    def load(self, counts: dict[int, tuple[int, int]]) -> None:
        """Replace every count by the store's: ``device key -> (messages, bytes)``."""
        self._dev = {k: [n, b] for k, (n, b) in counts.items()}
        self._addr = {}
        for dkey, (n, b) in counts.items():
            address = self._addr_of.get(dkey)
            if address is not None:
                a = self._addr.setdefault(address, [0, 0])
                a[0] += n
                a[1] += b
        self.full = set()
        for address in self._addr:
            self._check(address)

    def stats(self) -> dict[str, Any]:
        """Counts for metrics (no addresses)."""
        return {"recipients_full": len(self.full)}
