"""Helpers for tests that start a real relay on loopback (port 0) and real clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field

import pytest

from fastroute import Client, Relay, RelayConfig
from fastroute.identity import ProviderKey, Registry, issue_credential
from fastroute.noise import KeyPair

LOOPS = ["asyncio", "uvloop"]


def run(loop_kind: str, coro):
    """Run ``coro`` on a fresh event loop of the given kind, with a hard time limit."""
    async def bounded():
        return await asyncio.wait_for(coro, 60)

    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(bounded())
    return asyncio.run(bounded())


@dataclass
class World:
    """A relay with two enrolled providers, ``home`` and ``acme`` (third party)."""

    relay: Relay
    data_dir: str
    keys: dict[str, ProviderKey]
    clients: list[Client] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.relay.port

    def credential(self, address: str, device: str, *, ttl_s: int = 3600,
                   now: int | None = None, key: ProviderKey | None = None,
                   static: KeyPair | None = None) -> tuple[KeyPair, bytes]:
        provider = address.split("@", 1)[1]
        kp = static or KeyPair.generate()
        cred = issue_credential(key or self.keys[provider], provider, address, device,
                                kp.public, ttl_s=ttl_s, now=now)
        return kp, cred

    async def connect(self, address: str, device: str = "phone", **kw) -> Client:
        cred_kw = {k: kw.pop(k) for k in ("ttl_s", "now", "key") if k in kw}
        kp, cred = self.credential(address, device, **cred_kw)
        client = await Client.connect("127.0.0.1", self.port, credential=cred, static=kp,
                                      server_key=self.relay.server_key.public, **kw)
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def world(tmp_path, setup=None, embedded_store=None, **cfg_kw):
    """Start a relay (SQLite store in ``tmp_path``) with providers home and acme.

    ``setup(registry, keys)``, if given, runs on the registry before the relay starts.
    ``embedded_store``: a store object the relay is given instead (an embedder's).
    """
    data_dir = str(tmp_path / "relay")
    os.makedirs(data_dir, exist_ok=True)
    keys = {"home": ProviderKey.generate(), "acme": ProviderKey.generate()}
    with Registry(os.path.join(data_dir, "registry.db")) as reg:
        for name, key in keys.items():
            reg.add_provider(name, key.public_key)
        if setup is not None:
            setup(reg, keys)
    cfg_kw.setdefault("registry_poll_s", 0.05)
    # most tests exchange messages across providers; opt-in has tests of its own
    cfg_kw.setdefault("require_consent", False)
    relay = Relay(RelayConfig(port=0, data_dir=data_dir, **cfg_kw), store=embedded_store)
    await relay.start()
    w = World(relay, data_dir, keys)
    try:
        yield w
    finally:
        for c in w.clients:
            await c.close()
        await relay.close()


async def recv_n(client: Client, n: int, timeout: float = 10.0) -> list:
    """Receive exactly ``n`` messages or fail the test after ``timeout``."""
    out = []
    while len(out) < n:
        out.extend(await asyncio.wait_for(client.recv_many(n - len(out)), timeout))
    return out


async def nothing_arrives(client: Client, wait: float = 0.3) -> bool:
    """True if no message arrives within ``wait`` seconds."""
    try:
        await asyncio.wait_for(client.recv(), wait)
    except asyncio.TimeoutError:
        return True
    return False
