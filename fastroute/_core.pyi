"""Types and contract of the routing engine (compiled from ext/fastroute/_core.pyx).

``fastroute._model.Router`` has the same interface and semantics, errors
included.  Errors are the classes of :mod:`fastroute.errors`: WrongType for a
wrong argument type (bool is not accepted as an int), InvalidArgument for a
bad value (negative count, address not shaped ``user@provider``),
UnknownAddress / UnknownDevice / UnknownGroup, and MailboxFull.
"""

from collections.abc import Callable, Iterable

__all__ = ["DedupTable", "MAX_MAILBOX_CAPACITY", "Router"]

#: Largest accepted ``mailbox_capacity``.
MAX_MAILBOX_CAPACITY: int

class Router:
    """Address table, per-device bounded mailboxes, groups and fan-out.

    Device and group ids are ints from 1, never reused.  Payloads are any
    objects, stored by reference.  Capacity counts queued plus
    popped-but-unacked messages of a device.
    """

    def __init__(self, mailbox_capacity: int = 1024) -> None: ...
    @property
    def mailbox_capacity(self) -> int:
        """Per-device limit on queued + popped-unacked messages."""

    # -- devices
    def add_device(self, address: str, device_name: str) -> int:
        """Register a device; idempotent per (address, device_name)."""
    def remove_device(self, device_id: int) -> list[tuple[int, object]]:
        """Unregister; return held messages (seq, payload), unacked then queued."""
    def device_id(self, address: str, device_name: str) -> int:
        """Id of (address, device_name); UnknownDevice if absent."""
    def devices(self, address: str) -> list[int]:
        """Ids of the address's devices, ascending; UnknownAddress if none."""
    def device_info(self, device_id: int) -> tuple[str, str]:
        """(address, device_name) of a device."""
    def has_address(self, address: str) -> bool:
        """True if the address has at least one device."""

    # -- routing
    def route(self, address: str, payload: object) -> int:
        """Enter every device of the address; return the count.

        Full or overflowed devices are skipped and flagged overflowed; then
        MailboxFull(entered, full=[(0, device_id), ...]) is raised.
        """
    def route_many(self, items: Iterable[tuple[str, object]]) -> int:
        """route() a batch; all items checked before anything is placed.

        Refusals raise MailboxFull(entered, full=[(item_index, device_id)])
        at the end.
        """
    def route_flat(self, items: Iterable[object]) -> int:
        """route_many() of ``address, payload, address, payload, ...`` without a
        tuple a pair; MailboxFull indices count pairs, an odd length is an
        InvalidArgument."""
    def offer_many(self, items: list[tuple[int, object]]) -> int:
        """Route ``(device_id, payload)`` items, each to one device, in order; how many
        entered.  Every item is checked first (UnknownDevice before anything is placed);
        like route_many it honours the sticky overflow flag and raises
        MailboxFull(entered, [(item_index, device_id), ...]) at the end."""
    def offer_flat(self, items: Iterable[object]) -> int:
        """offer_many() of ``device_id, payload, device_id, payload, ...`` without
        a tuple a pair; MailboxFull indices count pairs, an odd length is an
        InvalidArgument."""
    def offer_shared(self, rows: list[tuple[object, list[int]]]) -> int:
        """offer_many() of the ``(device_id, payload)`` items that ``(payload,
        [device_id, ...])`` rows list, in order, without the items (a group
        message is one row); MailboxFull's item indices count those items."""
    def push(self, device_id: int, payload: object) -> int:
        """Enter one device regardless of its overflow flag; return the seq.

        MailboxFull(0, [(0, device_id)]) at capacity.
        """

    # -- groups (members are addresses; fan-out reaches their current devices)
    def create_group(self, addresses: Iterable[str] = ()) -> int:
        """New group of member addresses (deduplicated, in order); its id."""
    def add_member(self, group_id: int, address: str) -> bool:
        """Add a member; False if it already was one."""
    def remove_member(self, group_id: int, address: str) -> None:
        """Remove a member; UnknownAddress if it was not one."""
    def delete_group(self, group_id: int) -> None:
        """Forget the group."""
    def group_members(self, group_id: int) -> list[str]:
        """Member addresses in the order they were added."""
    def fanout(self, group_id: int, payload: object,
               exclude_device: int | None = None) -> int:
        """Enter every device of every member with the same payload object.

        ``exclude_device`` (an unknown id excludes nothing) is skipped; full
        devices as in route().
        """

    # -- draining
    def pop(self, device_id: int, max_n: int) -> list[tuple[int, object]]:
        """Up to max_n queued messages, FIFO, as (seq, payload); held until acked."""
    def pop_batch(self, device_id: int, max_n: int) -> tuple[int, list[object]]:
        """pop() as (first_seq, payloads): payloads[i] has seq first_seq + i.

        No per-message tuple; with nothing queued, first_seq is the seq the
        next popped message will have.
        """
    def pop_many(self, device_ids: Iterable[int], max_n: int
                 ) -> list[tuple[int, list[tuple[int, object]]]]:
        """pop() over devices; (device_id, messages) for those that had some."""
    def ack(self, device_id: int, upto_seq: int) -> int:
        """Release popped messages with seq <= upto_seq; return how many."""
    def requeue(self, device_id: int) -> int:
        """Popped-unacked messages become poppable again, first, same seqs."""
    def take_ready(self) -> list[int]:
        """Devices that got poppable messages since the last call, each once."""
    def overflowed(self, device_id: int) -> bool:
        """Sticky overflow flag: route/fan-out refuse the device until resume()."""
    def suspend(self, device_id: int) -> bool:
        """Set the overflow flag by hand; return whether it was clear."""
    def resume(self, device_id: int) -> bool:
        """Clear the overflow flag; return whether it was set."""
    def pending(self, device_id: int) -> tuple[int, int]:
        """(queued-not-popped, popped-not-acked)."""
    def stats(self) -> dict[str, int]:
        """Counters only (devices, addresses, groups, queued, unacked, ...)."""

# -- the dedup window (ext/fastroute/_dedup.pxi): the relay's and the client's

class DedupTable:
    """Recently seen (sender, id) pairs and their codes; see fastroute.dedup.DedupWindow."""
    window_s: float
    max_entries: int
    def __init__(self, window_s: float = ..., max_entries: int = ...,
                 clock: object = ..., presize: bool = ...) -> None: ...
    def __len__(self) -> int: ...
    def lookup(self, sender: str, cid: bytes, now: float) -> int | None: ...
    def begin(self, sender: str, cid: bytes, code: int, now: float) -> None: ...
    def wait(self, sender: str, cid: bytes, waiter: object) -> None: ...
    def finish(self, sender: str, cid: bytes, code: int, now: float) -> list | None: ...
    def forget(self, sender: str, cid: bytes) -> list | None: ...
    def get(self, sender: str, cid: bytes) -> tuple[int, float] | None: ...
    def keys(self) -> list[tuple[str, bytes]]: ...
    def warm_with(self, ask: Callable[[DedupTable], object] | None) -> None: ...
    def warm(self) -> int: ...
    def resident(self) -> int: ...
    def expire(self, now: float | None = ...) -> int: ...

# -- the hot-path helpers of the stages and the client (the other .pxi parts)
#
# Internal: the stage modules choose between each and its Python
# specification (fastroute/_compiled.py), and the specification is the
# contract -- same results, same exception classes.  Each part's header names
# them (``#   pull_round = py_pull_round`` in _delivery.pxi: the spec is
# fastroute.relay.delivery.py_pull_round), and tests/test_twins.py checks the
# pairs, tests/test_fastpath.py their answers.  They are not listed here.

def __getattr__(name: str) -> object: ...
