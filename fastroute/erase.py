"""Erasure of an address from a relay's data directory (``fastroute address erase``).

An operator's answer to an erasure request: everything the relay keeps about
one address goes, and the command says what it removed.  It works on the
files of a **stopped** relay (the relay keeps its device registry in memory
and would write the address back).

What is removed, each with ``secure_delete = ON`` on the connection that
deletes it and a ``wal_checkpoint(TRUNCATE)`` afterwards, so neither freed
pages nor WAL frames keep a readable copy:

* ``store.db``: the address's devices (their keys too, where other group
  messages name the devices they went to); every message still waiting for
  one of them; every message the address sent that is still waiting for
  anyone;
* ``registry.db``: its consent choices (opt-ins) and the record of its
  devices first seen (the gate's new-device caps);
* ``keys.db``: its device slots in the key directory (identity keys, signed
  and last-resort prekeys), its one-time prekeys, and its freed device ids;
* ``safety.db``: its blocks (the addresses and providers it blocked).

What is not, and why:

* revocations of its devices (``revoked_devices``): security records; erasing
  one would make a revoked credential valid again;
* a quarantine of the address as a sender: erasing it would lift the abuse
  protection (an operator lifts it with ``fastroute sender lift``);
* attachments it uploaded: the media store never records who uploaded a blob
  (blobs are content-addressed, encrypted by the client, and expire after
  ``media_ttl_s``), so there is nothing that ties a blob to the address;
* other users' blocks of the address: their choice, not its data to take
  away (erasing one would let the address reach them again);
* spam-report records: keyed hashes of (sender, recipient) pairs and of
  counted reports, which cannot be found for one address without the other
  party's; they go with their key after at most two ``report_window_s``;
* groups: its memberships are changed by the groups' own ops, not here.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import InvalidArgument, StoreFailed
from .identity import parse_address
from .store import _keep_pack, _keep_spack, _mids, _prune_shares, _upgrade, py_mids_blob

__all__ = ["erase_address"]


@contextmanager
def _erasing(path: str) -> Iterator[sqlite3.Connection]:
    """One write transaction on ``path`` with secure_delete on; on success it
    commits and truncates the WAL, so no erased row outlives it in a file."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    try:
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()  # an exception: closing rolls back


def _in(n: int) -> str:
    return "(" + ",".join("?" * n) + ")"


def _erase_store(path: str, address: str) -> dict[str, int]:
    # a file of an older format is brought to this one first (as the relay
    # would on its next start): the erasure then knows every table it has
    conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    try:
        conn.execute("PRAGMA secure_delete = ON")
        _upgrade(conn)
    finally:
        conn.close()
    with _erasing(path) as conn:
        keys = [k for (k,) in conn.execute(
            "SELECT device_key FROM devices WHERE address = ?", (address,))]
        to_devices = 0
        touched: set[int] = set()
        for key in keys:
            to_devices += conn.execute("DELETE FROM messages WHERE dev = ?", (key,)).rowcount
            touched.update(m for (m,) in conn.execute(
                "SELECT mid FROM inbox WHERE device_key = ?", (key,)))
            to_devices += conn.execute("DELETE FROM inbox WHERE device_key = ?",
                                       (key,)).rowcount
        # each row of either lists n messages for its device
        for table in ("packs", "shares"):
            for key in keys:
                to_devices += conn.execute(f"SELECT coalesce(sum(n), 0) FROM {table} WHERE "
                                           "dev = ?", (key,)).fetchone()[0]
                conn.execute(f"DELETE FROM {table} WHERE dev = ?", (key,))
        from_it = 0
        # the sender is inside each pack's data: every pack is read (once,
        # by _keep_pack, which writes only a pack that loses messages)
        for key, first in conn.execute("SELECT dev, first FROM packs").fetchall():
            from_it += _keep_pack(conn, key, first, lambda e: e[1] != address)
        # the shared messages only its devices held go first (they were
        # deliveries to it), then those it sent from every spack, then the
        # others' shares lose the mids erased
        _prune_shares(conn)
        for (first,) in conn.execute("SELECT first FROM spacks").fetchall():
            from_it += _keep_spack(conn, first, lambda e: e[1] != address)
        _prune_shares(conn)
        # the spacks left name the devices they went to (devs): its devices'
        # keys come out of them too
        erased = set(keys)
        for first, blob in (conn.execute("SELECT first, devs FROM spacks").fetchall()
                            if erased else ()):
            devs = _mids(blob)
            kept = [k for k in devs if k not in erased]
            if len(kept) < len(devs):
                conn.execute("UPDATE spacks SET devs = ? WHERE first = ?",
                             (py_mids_blob(kept), first))
        sent = [m for (m,) in conn.execute("SELECT mid FROM messages WHERE sender = ?",
                                           (address,))]
        for i in range(0, len(sent), 500):
            chunk = sent[i:i + 500]
            conn.execute(f"DELETE FROM inbox WHERE mid IN {_in(len(chunk))}", chunk)
            conn.execute(f"DELETE FROM messages WHERE mid IN {_in(len(chunk))}", chunk)
        # shared messages no device is left for
        orphans = sorted(touched - set(sent))
        for i in range(0, len(orphans), 500):
            chunk = orphans[i:i + 500]
            conn.execute("DELETE FROM messages WHERE dev IS NULL AND NOT EXISTS "
                         "(SELECT 1 FROM inbox WHERE inbox.mid = messages.mid) "
                         f"AND mid IN {_in(len(chunk))}", chunk)
        devices = conn.execute("DELETE FROM devices WHERE address = ?", (address,)).rowcount
    return {"devices": devices, "deliveries_to_it": to_devices,
            "messages_from_it": len(sent) + from_it}


def _erase_registry(path: str, address: str) -> dict[str, int]:
    with _erasing(path) as conn:
        consent = conn.execute("DELETE FROM consent WHERE address = ?", (address,)).rowcount
        seen = conn.execute("DELETE FROM devices_seen WHERE address = ?", (address,)).rowcount
        kept = conn.execute("SELECT count(*) FROM revoked_devices WHERE address = ?",
                            (address,)).fetchone()[0]
        quarantine = conn.execute("SELECT count(*) FROM quarantine WHERE address = ?",
                                  (address,)).fetchone()[0]
    return {"consent_choices": consent, "devices_seen": seen, "revocations_kept": kept,
            "quarantine_kept": quarantine}


def _erase_keys(path: str, address: str) -> dict[str, int]:
    with _erasing(path) as conn:
        slots = conn.execute("DELETE FROM slots WHERE address = ?", (address,)).rowcount
        prekeys = conn.execute("DELETE FROM prekeys WHERE address = ?", (address,)).rowcount
        conn.execute("DELETE FROM freed WHERE address = ?", (address,))
    return {"key_directory_devices": slots, "one_time_prekeys": prekeys}


def _erase_safety(path: str, address: str) -> dict[str, int]:
    with _erasing(path) as conn:
        blocks = conn.execute("DELETE FROM blocks WHERE address = ?", (address,)).rowcount
        kept = conn.execute("SELECT count(*) FROM blocks WHERE target = ?",
                            (address,)).fetchone()[0]
    return {"blocks": blocks, "blocks_of_it_kept": kept}


def erase_address(data_dir: str, address: str) -> dict[str, int]:
    """Remove ``address`` from the stopped relay's ``data_dir``; counts of what went.

    The keys of the result: ``devices``, ``deliveries_to_it`` (stored
    deliveries waiting for its devices), ``messages_from_it`` (stored
    messages it sent), ``consent_choices``, ``devices_seen``,
    ``key_directory_devices`` and ``one_time_prekeys`` (with a key
    directory), ``blocks`` (its own), and ``revocations_kept``,
    ``quarantine_kept`` and ``blocks_of_it_kept`` (kept on purpose, see the
    module docstring).
    """
    parse_address(address)
    if not os.path.isdir(data_dir):
        raise InvalidArgument(f"no data directory at {data_dir!r}")
    out: dict[str, int] = {}
    try:
        for name, erase in (("store.db", _erase_store), ("registry.db", _erase_registry),
                            ("keys.db", _erase_keys), ("safety.db", _erase_safety)):
            path = os.path.join(data_dir, name)
            if os.path.exists(path):
                out.update(erase(path, address))
    except sqlite3.Error as exc:
        raise StoreFailed(f"erase failed: {type(exc).__name__}: {exc}") from None
    return out
