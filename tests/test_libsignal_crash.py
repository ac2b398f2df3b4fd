"""Sender Keys by the official libsignal across a relay SIGKILL in the middle.

A real ``fastroute serve`` process is killed with SIGKILL while group messages
and sender-key distributions are stored but not yet delivered or acked, then
started again on the same port; the clients reconnect by themselves (their
libsignal state lives in the node peer, as a real device's would).  Every
device must end up having decrypted exactly the group messages it should, in
order, exactly once: nothing accepted is lost, nothing is decrypted twice (a
second groupDecrypt of the same message would fail in libsignal), and a
removed member gets nothing sent after its removal.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from cliutil import serve_data_dir
from fastroute.client import Client, DeviceMessage, GroupEvent, GroupMessage
from fastroute.errors import GroupMismatch
from fastroute.identity import ProviderKey, Registry, issue_credential
from fastroute.noise import KeyPair
from fastroute.relay.groups import GEV_DEVICE_JOINED, GEV_REMOVED
from test_libsignal import Peer, _b, _s, distribute_sender_key, publish_peer_device


def test_libsignal_sender_keys_survive_a_relay_sigkill_mid_run(tmp_path):
    data = tmp_path / "relay"
    data.mkdir()
    pkeys = {"home": ProviderKey.generate(), "acme": ProviderKey.generate()}
    with Registry(str(data / "registry.db")) as reg:
        for name, key in pkeys.items():
            reg.add_provider(name, key.public_key)
    peer = Peer()
    proc, port = serve_data_dir(data)

    async def main():
        nonlocal proc
        devs: dict = {}
        clients: list = []

        async def new_device(name, address, device):
            kp = KeyPair.generate()
            cred = issue_credential(pkeys[address.split("@")[1]], address.split("@")[1],
                                    address, device, kp.public)
            c = await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                     features=("e2ee", "groups"), keepalive=None,
                                     reconnect=True, reconnect_max_delay=0.3)
            clients.append(c)
            await publish_peer_device(peer, c, name, address, devs)
            return c

        for name, address, device in (("a1", "alice@home", "phone"),
                                      ("a2", "alice@home", "laptop"),
                                      ("b1", "bob@acme", "phone"),
                                      ("c1", "carol@home", "phone")):
            await new_device(name, address, device)
        a1, b1, c1 = (devs[n][0] for n in ("a1", "b1", "c1"))
        await b1.set_consent("home")
        gid = await a1.create_group()
        assert await a1.group_add(gid, "carol@home") == 0
        assert await a1.group_add(gid, "bob@acme") == 1
        await b1.group_answer(gid, True)
        sessions: set = set()
        #: every plaintext each device decrypted, in the order it did
        got: dict = {n: [] for n in ("a1", "a2", "b1", "b2", "c1")}
        events: dict = {n: [] for n in got}

        async def pump(name, want, timeout=15.0):
            """Decrypt ``name``'s next ``want`` group messages (SKDMs on the way)."""
            c = devs[name][0]
            n = 0
            while n < want:
                m = await asyncio.wait_for(c.recv(), timeout)
                if isinstance(m, GroupMessage):
                    assert m.group == gid
                    got[name].append(_b(peer.call(op="gdecrypt", name=name, peer=m.sender,
                                                  device_id=m.device,
                                                  body=_s(m.body))["plaintext"]))
                    n += 1
                elif isinstance(m, GroupEvent):
                    events[name].append(m.kind)
                elif isinstance(m, DeviceMessage):
                    body = peer.call(op="decrypt", name=name, peer=m.sender,
                                     device_id=m.device, body=_s(m.body))["plaintext"]
                    peer.call(op="sk_process", name=name, peer=m.sender,
                              device_id=m.device, body=body)

        async def drained(name, wait=0.5):
            """True if no group message (and no SKDM) reaches ``name`` within ``wait``."""
            c = devs[name][0]
            try:
                while True:
                    m = await asyncio.wait_for(c.recv(), wait)
                    if isinstance(m, GroupEvent):
                        events[name].append(m.kind)
                    elif isinstance(m, (GroupMessage, DeviceMessage)):
                        return False
            except asyncio.TimeoutError:
                return True

        async def distribute(name, to_names):
            await distribute_sender_key(peer, devs, sessions, gid, name, to_names)

        async def gsend(name, text, version, **kw):
            body = _b(peer.call(op="gencrypt", name=name, group=_s(gid),
                                plaintext=_s(text))["body"])
            return await devs[name][0].group_send(gid, version, body, **kw)

        members = ["a1", "a2", "b1", "c1"]
        for sender in ("a1", "b1"):
            await distribute(sender, [n for n in members if n != sender])
        v, _, _ = await a1.group_members(gid)
        sent = [("a1", b"m1"), ("b1", b"m2"), ("a1", b"m3")]
        for s, text in sent:
            await gsend(s, text, v)
        # part-way: a2 read everything, c1 one message, b1 nothing yet
        await pump("a2", 3)
        await pump("c1", 1)
        # carol removed, alice rotates and sends; the relay dies right after
        # the send was acknowledged (durably stored), before most deliveries
        await a1.group_remove(gid, "carol@home")
        peer.call(op="sk_reset", name="a1", group=_s(gid))
        v, _, _ = await a1.group_members(gid)
        await distribute("a1", ["a2", "b1"])
        await gsend("a1", b"m4 after carol", v)
        sent.append(("a1", b"m4 after carol"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc, again = serve_data_dir(data, port)
        assert again == port
        deadline = time.monotonic() + 20
        while any(c.links < 2 or "groups" not in c.features for c in clients):
            assert time.monotonic() < deadline, "clients did not reconnect"
            await asyncio.sleep(0.05)

        # after the restart: everyone catches up, each message exactly once
        await pump("b1", 3)
        await pump("a2", 1)
        await pump("c1", 2)  # m2 and m3, sent before her removal
        await pump("a1", 1)  # bob's m2
        assert await drained("c1") and events["c1"][-1] == GEV_REMOVED
        # a new device for bob: the old version is refused with the lists,
        # which name exactly the device to give the key to
        await new_device("b2", "bob@acme", "tablet")
        with pytest.raises(GroupMismatch) as mismatch:
            await gsend("a1", b"m5 to the new set", v, id=b"n" * 16)
        assert mismatch.value.version == v + 1 and mismatch.value.complete is True
        assert mismatch.value.missing == [("bob@acme", devs["b2"][1], devs["b2"][2])]
        assert mismatch.value.extra == mismatch.value.stale == []
        await distribute("a1", ["b1", "b2"])  # DSEND names all of bob's devices
        body = _b(peer.call(op="gencrypt", name="a1", group=_s(gid),
                            plaintext=_s(b"m5 to the new set"))["body"])
        await a1.group_send(gid, v + 1, body, id=b"n" * 16)
        sent.append(("a1", b"m5 to the new set"))
        await pump("a2", 1)
        await pump("b1", 1)
        await pump("b2", 1)
        assert events["a2"].count(GEV_DEVICE_JOINED) == 1
        for name in ("a1", "a2", "b1", "b2", "c1"):
            assert await drained(name), name

        texts = [t for _, t in sent]
        assert got["a2"] == texts  # alice's other device: every message, hers too
        assert got["b1"] == [t for s, t in sent if s != "b1"]
        assert got["a1"] == [t for s, t in sent if s != "a1"] == [b"m2"]
        assert got["c1"] == texts[:3]  # nothing after her removal
        assert got["b2"] == [b"m5 to the new set"]  # nothing from before it joined
        for c in clients:
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        peer.close()
