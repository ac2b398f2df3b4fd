"""``fastroute demo``: a relay and two providers' users, end to end, in one process.

It shows the plug-and-play path of ``docs/PROTOCOL.md``: enrol a home
provider and a third-party provider by their keys, issue device credentials,
connect over Noise on loopback, exchange messages and read receipts both
ways (multi-device included), then time a burst of messages.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

from .client import Client
from .config import RelayConfig
from .identity import ProviderKey, Registry, issue_credential
from .noise import KeyPair
from .relay import Relay

__all__ = ["run_demo", "make_device"]


def make_device(pkey: ProviderKey, provider: str, address: str, device: str,
                ttl_s: int = 3600) -> tuple[KeyPair, bytes]:
    """A fresh device key pair and its credential signed by ``pkey``."""
    kp = KeyPair.generate()
    return kp, issue_credential(pkey, provider, address, device, kp.public, ttl_s=ttl_s)


async def run_demo(messages: int = 20000, print_fn=print) -> int:
    """Run the demo; return 0 when every check held."""
    with tempfile.TemporaryDirectory(prefix="fastroute-demo-") as data_dir:
        home, acme = ProviderKey.generate(), ProviderKey.generate()
        reg = Registry(os.path.join(data_dir, "registry.db"))
        reg.add_provider("home", home.public_key)
        reg.add_provider("acme", acme.public_key)
        reg.close()
        print_fn("enrolled providers: home (first party), acme (third party)")
        relay = Relay(RelayConfig(port=0, data_dir=data_dir))
        await relay.start()
        print_fn(f"relay on 127.0.0.1:{relay.port}, key fingerprint {relay.fingerprint}")
        try:
            return await _exchange(relay, home, acme, messages, print_fn)
        finally:
            await relay.close()


async def _exchange(relay: Relay, home: ProviderKey, acme: ProviderKey, messages: int,
                    print_fn) -> int:
    port = relay.port
    pin = relay.server_key.public

    async def connect(pkey, provider, address, device):
        kp, cred = make_device(pkey, provider, address, device)
        return await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                    server_key=pin)

    alice_phone = await connect(home, "home", "alice@home", "phone")
    alice_laptop = await connect(home, "home", "alice@home", "laptop")
    bob = await connect(acme, "acme", "bob@acme", "phone")
    print_fn("connected: alice@home (phone, laptop), bob@acme (phone)")
    # Opt-in first: a user hears from another provider's users only after choosing to.
    await alice_phone.set_consent("acme")
    await bob.set_consent("home")
    print_fn("alice opted in to acme's users, bob to home's")

    # The relay never reads bodies: here they stand for end-to-end ciphertext.
    await alice_phone.send("bob@acme", b"<e2e ciphertext: hi bob>")
    got = await asyncio.wait_for(bob.recv(), 5)
    print_fn(f"bob got a {len(got.body)}-byte message from {got.sender} (seq {got.seq})")
    await bob.send("alice@home", b"<e2e: read receipt>", ephemeral=True)
    await bob.send("alice@home", b"<e2e ciphertext: hello alice>")
    ok = True
    for dev in (alice_phone, alice_laptop):
        first = await asyncio.wait_for(dev.recv(), 5)
        second = await asyncio.wait_for(dev.recv(), 5)
        ok &= first.ephemeral and not second.ephemeral
    print_fn(f"alice's two devices each got bob's receipt and reply: {'yes' if ok else 'NO'}")

    # An attachment: uploaded out of band as (client-encrypted) bytes; the
    # message carries only its id, and the recipient fetches it by that id.
    photo = os.urandom(300_000)
    blob_id = await alice_laptop.upload(photo)
    await alice_laptop.send("bob@acme", b"<e2e: photo, key + id " + blob_id.hex().encode() + b">")
    note = await asyncio.wait_for(bob.recv(), 5)
    ref = bytes.fromhex(note.body.split(b"id ")[1].rstrip(b">").decode())
    same = await bob.download(ref) == photo
    ok &= same
    print_fn(f"alice sent a {len(photo) // 1000} kB attachment by reference; bob downloaded it "
             f"and its SHA-256 matched: {'yes' if same else 'NO'}")

    t0 = time.perf_counter()
    futs = []
    # send_many: one future per batch, the fast path for a provider service
    for start in range(0, messages, 1024):
        bodies = [i.to_bytes(4, "big") * 25 for i in range(start, min(start + 1024, messages))]
        futs.append(alice_phone.send_many("bob@acme", bodies))
        await alice_phone.drain()
        await asyncio.sleep(0)
    received = 0
    seen = set()
    in_order = True
    last = -1
    while received < messages:
        batch = await asyncio.wait_for(bob.recv_many(), 10)
        for m in batch:
            seen.add(m.body[:4])
            n = int.from_bytes(m.body[:4], "big")
            in_order &= n > last
            last = n
        received += len(batch)
    await asyncio.gather(*futs)
    ok &= in_order
    dt = time.perf_counter() - t0
    ok &= len(seen) == messages
    print_fn(f"{messages} messages alice@home -> bob@acme, stored in SQLite, acked and "
             f"delivered in {dt:.2f} s: {messages / dt:,.0f} msg/s, "
             f"{'all distinct' if len(seen) == messages else 'MISSING SOME'}, "
             f"{'in order' if in_order else 'OUT OF ORDER'}")
    stats = relay.stats()
    print_fn(f"relay counters (no personal data): accepted={stats['accepted']} "
             f"delivered={stats['delivered']}")
    for c in (alice_phone, alice_laptop, bob):
        await c.close()
    return 0 if ok else 1
