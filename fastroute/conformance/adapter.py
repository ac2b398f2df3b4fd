"""The reference conformance adapter: :class:`fastroute.Client` as an echo device.

Run by the kit (``fastroute conformance --listen 127.0.0.1:0 --client-cmd
"python -m fastroute.conformance.adapter"``) with the paths in the
``FASTROUTE_CONFORMANCE_*`` environment variables.  A vendor writes the same
few lines on top of its own client library (``docs/CONFORMANCE.md``).

:class:`fastroute.Client` hands a refused send (``RateLimited``,
``StoreFailed``) to the application as an exception; retrying it later with
the same id is therefore done here, as the spec asks of the application
(sections 9.2 and 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Any

import msgpack

from .. import Client
from ..client import Event, GroupEvent
from ..errors import DeviceMismatch, FastrouteError, RateLimited, StoreFailed
from ..noise import KeyPair
from .vendor import ENV_CREDENTIAL, ENV_DEVICE_KEY, ENV_HOST, ENV_PORT, ENV_SERVER_KEY

__all__ = ["run_adapter", "apply_group_event", "main"]


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


async def run_adapter(env: dict[str, str] | None = None, *, client_cls: Any = Client,
                      first_retry_s: float = 0.1) -> int:
    """Connect as the kit's device and follow the adapter contract until ``bye``.

    ``client_cls`` and ``first_retry_s`` let tests build deliberately broken
    clients (a ``Client`` subclass, or no backoff at all).
    """
    env = dict(os.environ if env is None else env)
    host, port = env[ENV_HOST], int(env[ENV_PORT])
    kw = dict(credential=_read(env[ENV_CREDENTIAL]),
              static=KeyPair.from_private(_read(env[ENV_DEVICE_KEY])),
              server_key=bytes.fromhex(_read(env[ENV_SERVER_KEY]).decode().strip()),
              reconnect=True, features=("e2ee", "groups"))
    delay = first_retry_s
    while True:
        try:
            client = await client_cls.connect(host, port, **kw)
            break
        except FastrouteError:  # e.g. the pinning probe: never sends msg3, tries again
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, 0.05), 2.0)

    pending: set[asyncio.Task] = set()
    key_ids = iter(range(1, 1 << 32))

    def prekeys(kind: int, n: int) -> list:
        # stand-ins for libsignal's serialized keys: the kit checks shapes, not curves
        if kind == 0:
            return [(next(key_ids), b"\x05" + os.urandom(32)) for _ in range(n)]
        return [(next(key_ids), os.urandom(1569), os.urandom(64)) for _ in range(n)]

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)

    sessions: dict[str, dict[int, int]] = {}  # address -> {device id: registration id}
    groups: dict[bytes, list] = {}  # group id -> [version, members, admins]

    async def per_device(to: str, body: bytes) -> None:
        # the body stands in for each device's ciphertext (no libsignal here)
        cid = os.urandom(16)
        if to not in sessions:
            sessions[to] = {b.device_id: b.registration_id for b in await client.bundles(to)}
        while True:
            entries = [(d, reg, body) for d, reg in sorted(sessions[to].items())]
            try:
                await client.send_to_devices(to, entries, id=cid)
                return
            except DeviceMismatch as mm:  # refresh, then the same id again (17.5)
                for d in mm.extra:
                    sessions[to].pop(d, None)
                for b in await client.refresh(to, mm):
                    sessions[to][b.device_id] = b.registration_id

    if "e2ee" in client.features:
        # a device publishes its keys once, then keeps its pools topped up (17.3)
        await client.publish_keys(
            int.from_bytes(os.urandom(2), "big") % 16383 + 1, b"\x05" + os.urandom(32),
            (next(key_ids), b"\x05" + os.urandom(32), os.urandom(64)),
            prekeys(1, 1)[0], prekeys(0, 20), prekeys(1, 5))

    async def echo(to: str, body: bytes, fut: asyncio.Future, cid: bytes) -> None:
        wait = first_retry_s
        while True:
            try:
                await fut
                return
            except (RateLimited, StoreFailed):
                await asyncio.sleep(wait)  # "resend later with the same id" (12)
                wait = min(wait * 2, 2.0)
                fut = client.send_nowait(to, body, id=cid)

    try:
        async for msg in client:  # taking a message is what acks it (auto_ack)
            if isinstance(msg, Event):
                if msg.kind == 1:  # a one-time pool runs low: top it up
                    spawn(client.add_prekeys(msg.data[0], prekeys(msg.data[0], 20)))
                continue
            if isinstance(msg, GroupEvent):
                apply_group_event(groups, msg.kind, msg.data)
                continue
            body = msg.body
            if body.startswith(b"echo:"):
                cid = os.urandom(16)
                # queued now, so echoes leave in the order the messages were taken
                fut = client.send_nowait(msg.sender, body, id=cid)
                spawn(echo(msg.sender, body, fut, cid))
            elif body.startswith(b"dsend:") and "e2ee" in client.features:
                spawn(per_device(msg.sender, body))
            elif body.startswith(b"group:"):  # report what the group's events built
                version, members, admins = groups.get(body[6:], [0, set(), set()])
                state = msgpack.packb([version, sorted(members), sorted(admins)])
                cid = os.urandom(16)
                spawn(echo(msg.sender, b"group=" + state,
                           client.send_nowait(msg.sender, b"group=" + state, id=cid), cid))
            elif body.startswith(b"pause:"):
                await asyncio.sleep(int(body[6:]) / 1000)
            elif body == b"bye":
                await asyncio.gather(*pending)
                await client.close()
                return 0
        return 1
    finally:
        for task in pending:
            task.cancel()
        # stopped from outside (the kit gave up on us): do not leave reconnect loops behind
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 1.0)


def apply_group_event(groups: dict[bytes, list], kind: int, data: Any) -> None:
    """Apply one GEVENT (``docs/PROTOCOL.md`` 18.6) to ``groups``: group id ->
    ``[version, members, admins]``, as a member's application keeps it."""
    if not isinstance(data, list) or len(data) < 2:
        return
    gid, version = data[0], data[1]
    state = groups.setdefault(gid, [version, set(), set()])
    state[0] = version
    members, admins = state[1], state[2]
    if kind == 1:  # created: [group, version, creator]
        members.add(data[2])
        admins.add(data[2])
    elif kind == 3:  # joined: [group, version, address]
        members.add(data[2])
    elif kind == 5:  # added: [group, version, admin, address]
        members.add(data[3])
    elif kind == 6:  # removed: [group, version, admin, address]
        members.discard(data[3])
        admins.discard(data[3])
    elif kind == 7:  # left: [group, version, address]
        members.discard(data[2])
        admins.discard(data[2])
    elif kind == 8:  # admin changed: [group, version, by, address, admin]
        (admins.add if data[4] else admins.discard)(data[3])


def main() -> int:
    """``python -m fastroute.conformance.adapter``."""
    return asyncio.run(run_adapter())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
