"""Types and contract of the routing engine (compiled from ext/fastroute/_core.pyx).

``fastroute._model.Router`` has the same interface and semantics, errors
included.  Errors are the classes of :mod:`fastroute.errors`: WrongType for a
wrong argument type (bool is not accepted as an int), InvalidArgument for a
bad value (negative count, address not shaped ``user@provider``),
UnknownAddress / UnknownDevice / UnknownGroup, and MailboxFull.
"""

from collections.abc import Iterable

__all__ = ["Router", "MAX_MAILBOX_CAPACITY"]

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
    def offer_many(self, items: list[tuple[int, object]]) -> int:
        """Route ``(device_id, payload)`` items, each to one device, in order; how many
        entered.  Every item is checked first (UnknownDevice before anything is placed);
        like route_many it honours the sticky overflow flag and raises
        MailboxFull(entered, [(item_index, device_id), ...]) at the end."""
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

# -- relay hot-path helpers (ext/fastroute/_wire.pxi, _gate.pxi); internal:
# use them through the stage modules, which choose between them and their
# Python specifications (fastroute/_compiled.py).

def pack_frames(packed_ops: list[bytes], max_plaintext: int = 65519,
                max_ops: int = 8192) -> list[bytes] | None:
    """fastroute.wire.pack_frames for a list of exact bytes.

    Same greedy split and bytes; None (nothing built) when an element is not
    exactly bytes.  InvalidArgument for bad limits or an op too big for a frame.
    """
def pack_delivers(seq: int, batch: list[tuple[object, bytes]], out: list[bytes]) -> list[object]:
    """Append one packed DELIVER per (mid, tail) to out, seqs from seq (uint32).

    Returns the mids in order; OverflowError if a seq passes 2**32 - 1.
    """
def deliver_tail(sender_packed: bytes, cid: bytes, body: bytes, ts_packed: bytes,
                 cls: int) -> bytes:
    """The packed DELIVER fields after seq: from, id, body, ts_ms, cls (0 or 1)."""
def sack_ok_op(cid: bytes) -> bytes:
    """The packed SACK [17, cid, 0] for a 16-byte id."""
class DedupTable:
    """Recently seen (sender, id) pairs and their codes; see fastroute.dedup.DedupWindow."""
    window_s: float
    max_entries: int
    def __init__(self, window_s: float = ..., max_entries: int = ...,
                 clock: object = ...) -> None: ...
    def __len__(self) -> int: ...
    def lookup(self, sender: str, cid: bytes, now: float) -> int | None: ...
    def begin(self, sender: str, cid: bytes, code: int, now: float) -> None: ...
    def wait(self, sender: str, cid: bytes, waiter: object) -> None: ...
    def finish(self, sender: str, cid: bytes, code: int, now: float) -> list | None: ...
    def forget(self, sender: str, cid: bytes) -> list | None: ...
    def get(self, sender: str, cid: bytes) -> tuple[int, float] | None: ...
    def keys(self) -> list[tuple[str, bytes]]: ...
    def expire(self, now: float | None = ...) -> int: ...
def stored_sacks(meta: list[tuple[str, bytes, bytes]], sender: str, dedup: DedupTable,
                 now: float, out: list[bytes], ack_all: object) -> None:
    """After a store commit: decide dedup entries, answer waiters, SACK-ok each message."""
def route_items(meta: list[tuple[str, bytes, object]], mids: list[int]
                ) -> list[tuple[str, tuple[int, bytes]]]:
    """[(to, (mid, tail)) ...] from the relay's meta and the store's mids."""
def decode_sends(plaintext: object, addr_ok: set[str]) -> list[tuple] | None:
    """decode_client_frame's fast path: a frame of valid SENDs to cached recipients.

    None for anything else (the caller decodes it the slow, precise way).
    """
class SendGate:
    """What the SEND check reads of the relay (one per relay)."""
    known: dict[str, list[int]]
    dedup: DedupTable
    consent: dict[str, frozenset[str]] | None
    taps: list
    count_error: object
    sack_op: object
    refusals: tuple[int, int, int, int]
    blocks: dict[str, set[str]]
    def __init__(self, known: dict[str, list[int]], dedup: DedupTable,
                 consent: dict[str, frozenset[str]] | None, taps: list, count_error: object,
                 sack_op: object, refusals: tuple[int, int, int, int],
                 blocks: dict[str, set[str]]) -> None: ...
class LinkGate:
    """One link's sender as the SEND check sees it."""
    link: object
    out: list[bytes]
    sender: str
    sender_packed: bytes
    provider: str
    own: str
    max_body: int
    msg_bucket: object
    byte_bucket: object
    msg_tokens: float
    byte_tokens: float
    def __init__(self, link: object, out: list[bytes], sender: str, sender_packed: bytes,
                 provider: str, max_body: int, msg_bucket: object,
                 byte_bucket: object) -> None: ...
def accept_sends(gate: SendGate, lg: LinkGate, sends: list[tuple], now: float, now_ms: int,
                 ts_packed: bytes, store_items: list, meta: list) -> list | None:
    """The relay's per-SEND gate loop; returns the ephemeral items (quota left in ``lg``)."""
def decode_server_ops(plaintext: object, addr_ok: set[str]) -> list[tuple] | None:
    """decode_server_frame's fast path: a frame of valid SACKs and DELIVERs.

    None for anything else (the caller decodes it the slow, precise way).
    """

# -- client hot paths (ext/fastroute/_client.pxi) ------------------------------

def pack_sends(pool: bytes, at: int, to_packed: bytes, bodies: list[bytes], cls: int,
               target: object, pending: dict | None) -> tuple[list[bytes], list[bytes]]:
    """Client.send_many's SEND ops: (ids from pool[at:], packed ops); pending[id] = (target, op)."""
def pack_dsend(cid: bytes, to: str, entries: list | tuple, own: list | tuple,
               room: int) -> bytes | None:
    """Client.send_to_devices_nowait's one DSEND op if its copies weigh <= room, else None."""
def dispatch_frame(plaintext: object, addr_ok: set[str], seen: DedupTable,
                   inbox: object, pending: dict, batch_type: type, msg_type: type,
                   client: object, dropped: object, refused: object,
                   requests: dict | None = None, dev_type: type | None = None,
                   group_type: type | None = None,
                   on_reply: object = None) -> bool | None:
    """Client._on_frame's loop for a frame of SACKs and DELIVERs (given ``requests``,
    also accepted REPLYs, DDELIVERs and GDELIVERs); None (no effect) otherwise."""

# -- MemoryStore loops (ext/fastroute/_memstore.pxi) ------------------------------

def mem_put(items: list[tuple], msgs: dict, inbox: dict, first: int, ttl_ms: int,
            mids: list[int]) -> None:
    """Store (sender, id, body, ts_ms, device_keys) items from mid first on; mids gets each."""
def mem_ack(box: dict, msgs: dict, mids: object) -> None:
    """Drop mids from one device's inbox box, and unreferenced messages from msgs."""
