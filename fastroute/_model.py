"""Pure-Python model of the routing engine: the executable specification.

:class:`Router` here has exactly the semantics of the compiled
``fastroute._core.Router`` (same results, same exception classes, same
``MailboxFull.entered``/``full``); the property tests drive both with the same
operations and compare.  It is written to be obviously right rather than fast,
but with sensible data structures, so that the benchmark ratio compiled/model
measures the compilation and the C layout, not a straw man.

``FASTROUTE_NO_EXTENSIONS=1`` makes ``fastroute.Router`` this class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from ._args import check_int, check_str
from .errors import (
    InvalidArgument,
    MailboxFull,
    UnknownAddress,
    UnknownDevice,
    UnknownGroup,
    WrongType,
)

__all__ = ["Router", "MAX_MAILBOX_CAPACITY"]

#: Largest accepted ``mailbox_capacity`` (the compiled engine keeps positions
#: in 64-bit integers; nobody has memory for more anyway).
MAX_MAILBOX_CAPACITY = 1 << 40


# The argument checks are fastroute._args's (the compiled engine's twins are in
# ext/fastroute/_args.pxi); what follows is only the engine's own rules.

def _check_count(value: object, what: str) -> int:
    # the compiled twin (as_count) saturates huge counts to Py_ssize_t, which
    # means the same thing as the unbounded int here: "all of them"
    return check_int(value, what, 0)


def _check_address_format(address: str) -> None:
    user, at, provider = address.rpartition("@")
    if not at or not user or not provider:
        raise InvalidArgument("address must look like user@provider")


def _check_address(value: object) -> str:
    address = check_str(value, "address")
    _check_address_format(address)
    return address


def _check_name(value: object) -> str:
    return check_str(value, "device_name", nonempty=True)


def _pairs(items: object, key: str) -> list[tuple[object, object]]:
    """The pairs of a flat ``key, payload, key, payload, ...`` batch (route_flat,
    offer_flat): WrongType unless a list or iterable, InvalidArgument for an
    odd length, both before anything is placed."""
    if not isinstance(items, (list, tuple)):
        if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
            raise WrongType(f"items must be a list of ({key}, payload)")
        items = list(items)
    if len(items) % 2:
        raise InvalidArgument(f"items must be {key}, payload pairs")
    return list(zip(items[0::2], items[1::2]))


class _Device:
    """One device's mailbox: queued (poppable) then popped-unacked."""

    __slots__ = ("id", "address", "name", "queue", "unacked", "next_seq",
                 "overflowed")

    def __init__(self, dev_id: int, address: str, name: str) -> None:
        self.id = dev_id
        self.address = address
        self.name = name
        self.queue: deque[tuple[int, object]] = deque()
        self.unacked: deque[tuple[int, object]] = deque()
        self.next_seq = 1
        self.overflowed = False


class Router:
    """Address table, per-device bounded mailboxes, groups and fan-out.

    See the compiled twin ``fastroute._core.Router`` (and ``_core.pyi``) for
    the full contract of each method; this class implements the same one.
    """

    def __init__(self, mailbox_capacity: int = 1024) -> None:
        self._cap = check_int(mailbox_capacity, "mailbox_capacity", 1, MAX_MAILBOX_CAPACITY)
        self._devices: dict[int, _Device] = {}
        # address -> {device_name: _Device}, insertion (= id) order
        self._addrs: dict[str, dict[str, _Device]] = {}
        # group id -> {address: None}, insertion order
        self._groups: dict[int, dict[str, None]] = {}
        self._ready: dict[int, None] = {}
        self._next_dev = 1
        self._next_group = 1
        self._n_overflowed = 0
        self._n_queued = 0
        self._n_unacked = 0
        self._n_delivered = 0
        self._n_popped = 0
        self._n_acked = 0
        self._n_requeued = 0
        self._n_returned = 0

    # ------------------------------------------------------------ devices

    @property
    def mailbox_capacity(self) -> int:
        """Per-device limit on queued + popped-unacked messages."""
        return self._cap

    def add_device(self, address: str, device_name: str) -> int:
        """Register a device of ``address``; idempotent per (address, name)."""
        address = _check_address(address)
        device_name = _check_name(device_name)
        devs = self._addrs.get(address)
        if devs is not None:
            dev = devs.get(device_name)
            if dev is not None:
                return dev.id
        dev = _Device(self._next_dev, address, device_name)
        self._next_dev += 1
        self._devices[dev.id] = dev
        self._addrs.setdefault(address, {})[device_name] = dev
        return dev.id

    def _device(self, device_id: object) -> _Device:
        dev = self._devices.get(check_int(device_id, "device_id"))
        if dev is None:
            raise UnknownDevice(f"no device {device_id}")
        return dev

    def remove_device(self, device_id: int) -> list[tuple[int, object]]:
        """Unregister a device; return its held messages, unacked then queued."""
        dev = self._device(device_id)
        del self._devices[dev.id]
        devs = self._addrs[dev.address]
        del devs[dev.name]
        if not devs:
            del self._addrs[dev.address]
        self._ready.pop(dev.id, None)
        if dev.overflowed:
            self._n_overflowed -= 1
        held = list(dev.unacked) + list(dev.queue)
        self._n_queued -= len(dev.queue)
        self._n_unacked -= len(dev.unacked)
        self._n_returned += len(held)
        dev.queue.clear()
        dev.unacked.clear()
        return held

    def device_id(self, address: str, device_name: str) -> int:
        """Id of the device (address, device_name); UnknownDevice if absent."""
        address = _check_address(address)
        device_name = _check_name(device_name)
        dev = self._addrs.get(address, {}).get(device_name)
        if dev is None:
            raise UnknownDevice("no such device")
        return dev.id

    def devices(self, address: str) -> list[int]:
        """Ids of the devices of ``address``, ascending."""
        address = _check_address(address)
        devs = self._addrs.get(address)
        if not devs:
            raise UnknownAddress("address has no devices")
        return [d.id for d in devs.values()]

    def device_info(self, device_id: int) -> tuple[str, str]:
        """(address, device_name) of a device."""
        dev = self._device(device_id)
        return dev.address, dev.name

    def has_address(self, address: str) -> bool:
        """True if ``address`` has at least one device."""
        return _check_address(address) in self._addrs

    # ------------------------------------------------------------ routing

    def _put(self, dev: _Device, payload: object) -> None:
        if not dev.queue:
            self._ready.setdefault(dev.id, None)
        dev.queue.append((dev.next_seq, payload))
        dev.next_seq += 1
        self._n_queued += 1
        self._n_delivered += 1

    def _offer(self, dev: _Device, payload: object) -> bool:
        """Route/fan-out placement: False if the device is (now) overflowed."""
        if dev.overflowed:
            return False
        if len(dev.queue) + len(dev.unacked) >= self._cap:
            dev.overflowed = True
            self._n_overflowed += 1
            return False
        self._put(dev, payload)
        return True

    def _lookup_route(self, address: object) -> dict[str, _Device]:
        address = check_str(address, "address")
        devs = self._addrs.get(address)
        if devs is None:
            _check_address_format(address)
            raise UnknownAddress("address has no devices")
        return devs

    def _offer_all(self, devs: Iterable[_Device], payload: object, index: int,
                   full: list[tuple[int, int]]) -> int:
        """Offer ``payload`` to each device; note refusals in ``full``; return placed."""
        entered = 0
        for dev in devs:
            if self._offer(dev, payload):
                entered += 1
            else:
                full.append((index, dev.id))
        return entered

    def route(self, address: str, payload: object) -> int:
        """Put ``payload`` in every mailbox of ``address``; return how many."""
        full: list[tuple[int, int]] = []
        entered = self._offer_all(self._lookup_route(address).values(), payload, 0, full)
        if full:
            raise MailboxFull("mailbox full", entered, full)
        return entered

    def route_many(self, items: list[tuple[str, object]]) -> int:
        """Route a batch; all addresses are checked before anything is placed."""
        if not isinstance(items, (list, tuple)):
            if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
                raise WrongType("items must be a list of (address, payload)")
            items = list(items)
        plan = []
        for item in items:
            if not isinstance(item, tuple):
                raise WrongType("each item must be a tuple (address, payload)")
            if len(item) != 2:
                raise InvalidArgument("each item must be (address, payload)")
            plan.append((self._lookup_route(item[0]), item[1]))
        entered = 0
        full: list[tuple[int, int]] = []
        for index, (devs, payload) in enumerate(plan):
            entered += self._offer_all(devs.values(), payload, index, full)
        if full:
            raise MailboxFull("mailbox full", entered, full)
        return entered

    def route_flat(self, items: list) -> int:
        """:meth:`route_many` of ``address, payload, address, payload, ...``
        (MailboxFull indices count pairs); an odd length is an InvalidArgument."""
        return self.route_many(_pairs(items, "address"))

    def offer_many(self, items: list[tuple[int, object]]) -> int:
        """Route a batch of ``(device_id, payload)`` items, each to one device, in order."""
        if not isinstance(items, (list, tuple)):
            if not isinstance(items, Iterable) or isinstance(items, (str, bytes)):
                raise WrongType("items must be a list of (device_id, payload)")
            items = list(items)
        plan = []
        for item in items:
            if not isinstance(item, tuple):
                raise WrongType("each item must be a tuple (device_id, payload)")
            if len(item) != 2:
                raise InvalidArgument("each item must be (device_id, payload)")
            plan.append((self._device(item[0]), item[1]))
        return self._place(plan)

    def offer_flat(self, items: list) -> int:
        """:meth:`offer_many` of ``device_id, payload, device_id, payload, ...``
        (MailboxFull indices count pairs); an odd length is an InvalidArgument."""
        return self.offer_many(_pairs(items, "device_id"))

    def _place(self, plan: list[tuple[_Device, object]]) -> int:
        """Offer each payload of ``plan`` to its device, in order; MailboxFull
        at the end for the refused ones (``(index in plan, device id)``)."""
        entered = 0
        full: list[tuple[int, int]] = []
        for index, (dev, payload) in enumerate(plan):
            if self._offer(dev, payload):
                entered += 1
            else:
                full.append((index, dev.id))
        if full:
            raise MailboxFull("mailbox full", entered, full)
        return entered

    def offer_shared(self, rows: list[tuple[object, list[int]]]) -> int:
        """Route a batch of ``(payload, [device_id, ...])`` rows: each payload to
        each of its devices, in order.

        Exactly :meth:`offer_many` of the ``(device_id, payload)`` items the
        rows list, in order (MailboxFull's item indices count those items),
        without the items: a group message is one row however many devices
        get it.
        """
        if not isinstance(rows, (list, tuple)):
            if not isinstance(rows, Iterable) or isinstance(rows, (str, bytes)):
                raise WrongType("rows must be a list of (payload, device_ids)")
            rows = list(rows)
        plan = []
        for row in rows:  # every row and device checked before any is placed
            if not isinstance(row, tuple):
                raise WrongType("each row must be a tuple (payload, device_ids)")
            if len(row) != 2:
                raise InvalidArgument("each row must be (payload, device_ids)")
            payload, devs = row
            if not isinstance(devs, (list, tuple)):
                raise WrongType("device_ids must be a list or tuple")
            plan.extend((self._device(dev), payload) for dev in devs)
        return self._place(plan)

    def push(self, device_id: int, payload: object) -> int:
        """Put ``payload`` in one device's mailbox; return its sequence number."""
        dev = self._device(device_id)
        if len(dev.queue) + len(dev.unacked) >= self._cap:
            raise MailboxFull("mailbox full", 0, [(0, dev.id)])
        seq = dev.next_seq
        self._put(dev, payload)
        return seq

    # ------------------------------------------------------------ groups

    def _group(self, group_id: object) -> dict[str, None]:
        members = self._groups.get(check_int(group_id, "group_id"))
        if members is None:
            raise UnknownGroup(f"no group {group_id}")
        return members

    def create_group(self, addresses: Iterable[str] = ()) -> int:
        """Create a group of member addresses; return its id."""
        if isinstance(addresses, (str, bytes)) or not isinstance(addresses, Iterable):
            raise WrongType("addresses must be an iterable of str")
        members = {_check_address(a): None for a in list(addresses)}
        gid = self._next_group
        self._next_group += 1
        self._groups[gid] = members
        return gid

    def add_member(self, group_id: int, address: str) -> bool:
        """Add ``address`` to a group; False if it already was a member."""
        members = self._group(group_id)
        address = _check_address(address)
        if address in members:
            return False
        members[address] = None
        return True

    def remove_member(self, group_id: int, address: str) -> None:
        """Remove ``address`` from a group; UnknownAddress if not a member."""
        members = self._group(group_id)
        address = _check_address(address)
        if address not in members:
            raise UnknownAddress("address is not a member of the group")
        del members[address]

    def delete_group(self, group_id: int) -> None:
        """Forget a group; its id is never reused."""
        self._group(group_id)
        del self._groups[group_id]

    def group_members(self, group_id: int) -> list[str]:
        """Member addresses of a group, in the order they were added."""
        return list(self._group(group_id))

    def fanout(self, group_id: int, payload: object,
               exclude_device: int | None = None) -> int:
        """Put the same ``payload`` in every device of every member."""
        members = self._group(group_id)
        if exclude_device is not None:
            check_int(exclude_device, "exclude_device")
        full: list[tuple[int, int]] = []
        devs = (dev for address in members for dev in self._addrs.get(address, {}).values()
                if dev.id != exclude_device)
        entered = self._offer_all(devs, payload, 0, full)
        if full:
            raise MailboxFull("mailbox full", entered, full)
        return entered

    # ------------------------------------------------------------ draining

    def _pop(self, dev: _Device, max_n: int) -> list[tuple[int, object]]:
        n = min(max_n, len(dev.queue))
        out = [dev.queue.popleft() for _ in range(n)]
        dev.unacked.extend(out)
        self._n_queued -= n
        self._n_unacked += n
        self._n_popped += n
        return out

    def pop(self, device_id: int, max_n: int) -> list[tuple[int, object]]:
        """Take up to ``max_n`` queued messages (FIFO) as (seq, payload)."""
        dev = self._device(device_id)
        return self._pop(dev, _check_count(max_n, "max_n"))

    def pop_batch(self, device_id: int, max_n: int) -> tuple[int, list[object]]:
        """Like pop(), as (first_seq, payloads); payloads[i] has first_seq + i."""
        dev = self._device(device_id)
        got = self._pop(dev, _check_count(max_n, "max_n"))
        if got:
            return got[0][0], [p for _, p in got]
        return (dev.queue[0][0] if dev.queue else dev.next_seq), []

    def pop_many(self, device_ids: Iterable[int], max_n: int
                 ) -> list[tuple[int, list[tuple[int, object]]]]:
        """pop() over several devices; lists only devices that had items."""
        if isinstance(device_ids, (str, bytes)) or not isinstance(device_ids, Iterable):
            raise WrongType("device_ids must be an iterable of int")
        devs = [self._device(d) for d in list(device_ids)]
        max_n = _check_count(max_n, "max_n")
        out = []
        for dev in devs:
            got = self._pop(dev, max_n)
            if got:
                out.append((dev.id, got))
        return out

    def ack(self, device_id: int, upto_seq: int) -> int:
        """Release popped messages with seq <= ``upto_seq``; return how many."""
        dev = self._device(device_id)
        upto_seq = _check_count(upto_seq, "upto_seq")
        n = 0
        unacked = dev.unacked
        while unacked and unacked[0][0] <= upto_seq:
            unacked.popleft()
            n += 1
        self._n_unacked -= n
        self._n_acked += n
        return n

    def requeue(self, device_id: int) -> int:
        """Make popped-unacked messages poppable again, before newer ones."""
        dev = self._device(device_id)
        n = len(dev.unacked)
        if n:
            dev.unacked.extend(dev.queue)
            dev.queue, dev.unacked = dev.unacked, deque()
            self._ready.setdefault(dev.id, None)
            self._n_queued += n
            self._n_unacked -= n
            self._n_requeued += n
        return n

    def take_ready(self) -> list[int]:
        """Devices that got poppable messages since the last call, each once."""
        ready = list(self._ready)
        self._ready.clear()
        return ready

    def overflowed(self, device_id: int) -> bool:
        """True while route/fan-out treat the device as full (until resume)."""
        return self._device(device_id).overflowed

    def suspend(self, device_id: int) -> bool:
        """Set the sticky overflow flag by hand; return whether it was clear.

        A caller that must first push a device's backlog from its store (a
        device coming online) suspends the live route to it meanwhile, then
        calls :meth:`resume`: route and fan-out report the device in
        ``MailboxFull.full`` in between, exactly as after a real overflow.
        """
        dev = self._device(device_id)
        if dev.overflowed:
            return False
        dev.overflowed = True
        self._n_overflowed += 1
        return True

    def resume(self, device_id: int) -> bool:
        """Clear the sticky overflow flag; return whether it was set."""
        dev = self._device(device_id)
        was = dev.overflowed
        if was:
            dev.overflowed = False
            self._n_overflowed -= 1
        return was

    def pending(self, device_id: int) -> tuple[int, int]:
        """(queued-not-popped, popped-not-acked) of a device."""
        dev = self._device(device_id)
        return len(dev.queue), len(dev.unacked)

    def stats(self) -> dict[str, int]:
        """Counters of the engine (no addresses, no payloads)."""
        return {
            "devices": len(self._devices),
            "addresses": len(self._addrs),
            "groups": len(self._groups),
            "overflowed": self._n_overflowed,
            "queued": self._n_queued,
            "unacked": self._n_unacked,
            "delivered": self._n_delivered,
            "popped": self._n_popped,
            "acked": self._n_acked,
            "requeued": self._n_requeued,
            "returned": self._n_returned,
            "mailbox_capacity": self._cap,
        }

    def __repr__(self) -> str:
        return (f"<fastroute._model.Router devices={len(self._devices)} "
                f"groups={len(self._groups)} queued={self._n_queued}>")
