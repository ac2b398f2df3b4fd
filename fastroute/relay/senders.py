"""Stored senders: how a row of the message store says what it carries.

The store keeps one string, ``sender``, beside each row's body; the stages
that write rows (gate: v1 SEND; keys: per-device copies and EVENTs; groups:
group messages and GEVENTs) encode in it what the backlog sync needs to
rebuild the relay op for the row, and the delivery stage reads it back
(:func:`pack_stored_sender`).  The characters that tell the kinds apart
(``/`` and ``#``) are outside the address grammar, so a v1 sender is never
mistaken for another kind.

This module sits below every stage that uses it: the encoding is the
store's contract, not any one stage's.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .. import wire

__all__ = ["DDELIVER_HEAD", "EVENT_HEAD", "GDELIVER_HEAD", "GEVENT_HEAD", "copy_sender",
           "event_sender", "group_sender", "group_event_sender", "pack_group_sender",
           "pack_stored_sender"]

#: DELIVER-like heads of the relay's persistent ops of features, everything
#: before the uint32 seq marker: fixarray(8) + uint16 2001 (DDELIVER) and
#: fixarray(7) + uint16 2002 (EVENT) of feature "e2ee"; fixarray(9) + uint16
#: 2100 (GDELIVER) and fixarray(7) + uint16 2101 (GEVENT) of feature "groups".
#: See ``delivery.py_pack_delivers``.
DDELIVER_HEAD = wire.DDELIVER_HEAD
EVENT_HEAD = b"\x97\xcd" + int(wire.Op.EVENT).to_bytes(2, "big")
GDELIVER_HEAD = b"\x99\xcd" + int(wire.Op.GDELIVER).to_bytes(2, "big")
GEVENT_HEAD = b"\x97\xcd" + int(wire.Op.GEVENT).to_bytes(2, "big")


def copy_sender(address: str, device_id: int) -> str:
    """The store's ``sender`` of a per-device copy: ``address/device_id``.

    ``/`` is outside the address grammar, so the backlog sync tells copies
    (and events, :func:`event_sender`) from v1 messages by it.
    """
    return f"{address}/{device_id}"


def event_sender(kind: int) -> str:
    """The store's ``sender`` of an EVENT: ``/kind`` (no address)."""
    return f"/{kind}"


def group_sender(gid: bytes, address: str, device_id: int) -> str:
    """The store's ``sender`` of a group message: ``#<gid hex>:<address>/<device id>``.

    ``#`` is outside the address grammar: the backlog sync tells group rows
    from the others by it (:func:`pack_stored_sender`).
    """
    return f"#{gid.hex()}:{address}/{device_id}"


def group_event_sender(kind: int) -> str:
    """The store's ``sender`` of a GEVENT: ``#<kind>``."""
    return f"#{kind}"


def pack_group_sender(sender: str) -> tuple[bytes, bytes]:
    """``(head, packed fields before the id)`` of a stored group row."""
    rest = sender[1:]
    gid_hex, colon, tail = rest.partition(":")
    if not colon:
        return (GEVENT_HEAD, msgpack.packb(int(rest)))
    address, _, did = tail.rpartition("/")
    return (GDELIVER_HEAD, msgpack.packb(bytes.fromhex(gid_hex)) + msgpack.packb(address)
            + msgpack.packb(int(did)))


def pack_stored_sender(sender: str, features: frozenset[str]) -> Any:
    """What the backlog sync puts before a stored row's id (``sync_rows``' ``pack_sender``).

    A v1 message's sender packs as before (bytes); a per-device copy or an
    event gives ``(head, packed fields)`` on a link that negotiated e2ee, a
    group message or group event (sender ``#...``) on a link that negotiated
    groups; None (leave it in the store) on any other link.
    """
    if sender[:1] == "#":
        if "groups" not in features:
            return None
        return pack_group_sender(sender)
    address, slash, rest = sender.rpartition("/")
    if not slash:
        return msgpack.packb(sender)
    if "e2ee" not in features:
        return None
    if not address:
        return (EVENT_HEAD, msgpack.packb(int(rest)))
    return (DDELIVER_HEAD, msgpack.packb(address) + msgpack.packb(int(rest)))
