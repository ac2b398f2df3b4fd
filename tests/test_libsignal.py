"""The real Signal Protocol over the relay: the official libsignal, not a home-made one.

``tests/libsignal_peer.js`` runs ``@signalapp/libsignal-client`` (installed by
``tests/libsignal_install.py``) under node and holds every device's keys and
sessions.  The relay serves the bundles those devices published and carries
the per-device ciphertexts; PQXDH sessions are built from what the relay
served, so one flipped byte in the directory would fail here.

Users: alice@home (the home provider) with two devices, bob@acme (a third
party) with one; messages both ways, alice's other device included.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess

import pytest

from libsignal_install import ensure
from relayutil import run, world

from fastroute.client import DeviceMessage, Event

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libsignal_peer.js")


class Peer:
    """The node process, one JSON request per line."""

    def __init__(self) -> None:
        root = ensure()
        self.proc = subprocess.Popen(["node", PEER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, NODE_PATH=os.path.join(
                                         root, "node_modules")))

    def call(self, **req):
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        assert out.pop("ok"), out.get("error")
        return out

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _b(s: str) -> bytes:
    return base64.b64decode(s)


def _s(b: bytes) -> str:
    return base64.b64encode(b).decode()


def peer_bundle(bundle) -> list:
    """A :class:`fastroute.client.Bundle` as the libsignal peer takes it (JSON)."""
    return [bundle.device_id, bundle.registration_id, _s(bundle.identity_key),
            [bundle.signed_prekey[0], _s(bundle.signed_prekey[1]), _s(bundle.signed_prekey[2])],
            None if bundle.one_time_prekey is None else
            [bundle.one_time_prekey[0], _s(bundle.one_time_prekey[1])],
            [bundle.kem_prekey[0], _s(bundle.kem_prekey[1]), _s(bundle.kem_prekey[2])]]


async def publish_peer_device(peer: "Peer", c, name: str, address: str, devs: dict) -> int:
    """Make device ``name``'s keys in the libsignal peer, publish them from
    client ``c``, and tell the peer the device id the relay gave it; record
    ``(c, device_id, registration_id, address)`` in ``devs[name]``."""
    keys = peer.call(op="device", name=name, address=address, n_ec=5, n_kem=5)
    did = await c.publish_keys(
        keys["reg_id"], _b(keys["identity"]),
        (keys["signed"][0], _b(keys["signed"][1]), _b(keys["signed"][2])),
        tuple([keys["last_resort"][0]] + [_b(x) for x in keys["last_resort"][1:]]),
        [(i, _b(p)) for i, p in keys["ec"]],
        [(i, _b(p), _b(s)) for i, p, s in keys["kem"]])
    peer.call(op="set_id", name=name, device_id=did)
    devs[name] = (c, did, keys["reg_id"], address)
    return did


async def distribute_sender_key(peer: "Peer", devs: dict, sessions: set, gid: bytes,
                                name: str, to_names: list) -> None:
    """Send device ``name``'s SenderKeyDistributionMessage for group ``gid`` to
    the devices ``to_names`` by DSEND, one per address, over pairwise
    sessions built from fetched bundles the first time (kept in ``sessions``);
    ``devs``: name -> (client, device id, registration id, address)."""
    c = devs[name][0]
    skdm = peer.call(op="skdm", name=name, group=_s(gid))["body"]
    by_address: dict = {}
    for t in to_names:
        by_address.setdefault(devs[t][3], []).append(t)
    for to, names in by_address.items():
        fresh = [devs[t][1] for t in names if (name, to, devs[t][1]) not in sessions]
        if fresh:
            for bundle in await c.bundles(to, fresh):
                peer.call(op="session", name=name, peer=to, device_id=bundle.device_id,
                          bundle=peer_bundle(bundle))
                sessions.add((name, to, bundle.device_id))
        await c.send_to_devices(to, [(devs[t][1], devs[t][2], _b(peer.call(
            op="encrypt", name=name, peer=to, device_id=devs[t][1],
            plaintext=skdm)["body"])) for t in names])


async def _msg(client, timeout=10.0):
    while True:
        m = await asyncio.wait_for(client.recv(), timeout)
        if not isinstance(m, Event):
            return m


def test_libsignal_pqxdh_sessions_from_relay_bundles_both_ways(tmp_path):
    peer = Peer()

    async def main():
        async with world(tmp_path, require_consent=True) as w:
            devs = {}
            for name, address, device in (("a1", "alice@home", "phone"),
                                          ("a2", "alice@home", "laptop"),
                                          ("b1", "bob@acme", "phone")):
                c = await w.connect(address, device, features=("e2ee",))
                await publish_peer_device(peer, c, name, address, devs)
            a1, a2, b1 = (devs[n][0] for n in ("a1", "a2", "b1"))
            await a1.set_consent("acme")
            await b1.set_consent("home")

            def session(name, address, bundle):
                peer.call(op="session", name=name, peer=address, device_id=bundle.device_id,
                          bundle=peer_bundle(bundle))

            def encrypt(name, address, did, text):
                return _b(peer.call(op="encrypt", name=name, peer=address, device_id=did,
                                    plaintext=_s(text))["body"])

            def decrypt(name, m):
                return _b(peer.call(op="decrypt", name=name, peer=m.sender, device_id=m.device,
                                    body=_s(m.body))["plaintext"])

            # bob (third party) -> both of alice's devices: list, fetch, PQXDH, one copy each
            listed = await b1.devices("alice@home")
            assert listed == [(devs["a1"][1], devs["a1"][2]), (devs["a2"][1], devs["a2"][2])]
            for bundle in await b1.bundles("alice@home"):
                assert bundle.one_time_prekey is not None and not bundle.kem_last_resort
                session("b1", "alice@home", bundle)
            entries = [(did, reg, encrypt("b1", "alice@home", did, b"hello %d" % did))
                       for did, reg in listed]
            assert entries[0][2][0] == 3  # a PreKeySignalMessage (PQXDH)
            await b1.send_to_devices("alice@home", entries)
            for name in ("a1", "a2"):
                m = await _msg(devs[name][0])
                assert isinstance(m, DeviceMessage) and (m.sender, m.device) == (
                    "bob@acme", devs["b1"][1])
                assert decrypt(name, m) == b"hello %d" % devs[name][1]  # exactly its copy

            # alice's phone answers bob and tells her laptop (her own other device)
            [own] = await a1.bundles("alice@home", [devs["a2"][1]])
            session("a1", "alice@home", own)
            await a1.send_to_devices(
                "bob@acme", [(devs["b1"][1], devs["b1"][2],
                              encrypt("a1", "bob@acme", devs["b1"][1], b"hi bob"))],
                own=[(devs["a2"][1], devs["a2"][2],
                      encrypt("a1", "alice@home", devs["a2"][1], b"sent: hi bob"))])
            m = await _msg(b1)
            assert (m.sender, m.device) == ("alice@home", devs["a1"][1])
            assert m.body[0] == 2  # an established session: SignalMessage
            assert decrypt("b1", m) == b"hi bob"
            m = await _msg(a2)
            assert (m.sender, m.device) == ("alice@home", devs["a1"][1])
            assert decrypt("a2", m) == b"sent: hi bob"

            # and bob again, over the ratchet, to both devices
            await b1.send_to_devices("alice@home", [
                (did, reg, encrypt("b1", "alice@home", did, b"again %d" % did))
                for did, reg in listed])
            for name in ("a1", "a2"):
                assert decrypt(name, await _msg(devs[name][0])) == b"again %d" % devs[name][1]

    try:
        run("asyncio", main())
    finally:
        peer.close()


def test_libsignal_sender_keys_over_a_group(tmp_path):
    """Sender Keys by the official libsignal over feature "groups": each member
    device's SenderKeyDistributionMessage goes pairwise (DSEND, permitted by the
    shared group even across providers without CONSENT), then each group message
    is one SenderKeyMessage that every other member device decrypts, exactly
    once and in order; a removed member gets nothing after its removal and the
    sender rotates; a new device makes the old set version fail, then gets the
    key and decrypts; a declined invitee gets nothing; a member added later gets
    nothing from before; a non-admin's add is refused, a promoted member's
    removal works, a demoted one's add is refused again.  The same across a
    relay SIGKILL: tests/test_libsignal_crash.py."""
    from fastroute.client import GroupEvent, GroupMessage
    from fastroute.errors import GroupMismatch, NotAdmin, NotMember
    from fastroute.relay.groups import GEV_DEVICE_JOINED, GEV_REMOVED

    peer = Peer()

    async def main():
        async with world(tmp_path, require_consent=True) as w:
            devs = {}

            async def new_device(name, address, device):
                c = await w.connect(address, device, features=("e2ee", "groups"))
                await publish_peer_device(peer, c, name, address, devs)
                return c

            for name, address, device in (("a1", "alice@home", "phone"),
                                          ("a2", "alice@home", "laptop"),
                                          ("b1", "bob@acme", "phone"),
                                          ("c1", "carol@home", "phone")):
                await new_device(name, address, device)
            a1, b1, c1 = (devs[n][0] for n in ("a1", "b1", "c1"))
            await b1.set_consent("home")  # bob accepts 1:1 from home: he may be invited
            gid = await a1.create_group()
            assert await a1.group_add(gid, "carol@home") == 0
            assert await a1.group_add(gid, "bob@acme") == 1
            await b1.group_answer(gid, True)
            sessions: set = set()
            got: dict = {n: [] for n in devs}

            async def pump(name, want, kind=GroupMessage, timeout=10.0):
                """The next ``want`` items of ``kind`` for device ``name``."""
                c = devs[name][0]
                out = []
                while len(out) < want:
                    m = await asyncio.wait_for(c.recv(), timeout)
                    if isinstance(m, kind):
                        out.append(m)
                    elif isinstance(m, DeviceMessage):
                        # a pairwise copy: a sender key distribution message
                        body = peer.call(op="decrypt", name=name, peer=m.sender,
                                         device_id=m.device, body=_s(m.body))["plaintext"]
                        peer.call(op="sk_process", name=name, peer=m.sender,
                                  device_id=m.device, body=body)
                return out

            async def distribute(name, to_names):
                await distribute_sender_key(peer, devs, sessions, gid, name, to_names)

            async def gsend(name, text, version, **kw):
                body = _b(peer.call(op="gencrypt", name=name, group=_s(gid),
                                    plaintext=_s(text))["body"])
                return await devs[name][0].group_send(gid, version, body, **kw)

            def gdecrypt(name, m):
                assert m.group == gid
                return _b(peer.call(op="gdecrypt", name=name, peer=m.sender,
                                    device_id=m.device, body=_s(m.body))["plaintext"])

            members = ["a1", "a2", "b1", "c1"]
            # bob (acme) and alice (home) never consented to each other: the group permits it
            for sender in ("a1", "b1"):
                await distribute(sender, [n for n in members if n != sender])
            v, _, _ = await a1.group_members(gid)
            await gsend("a1", b"one from alice", v)
            await gsend("b1", b"one from bob", v)
            await gsend("a1", b"two from alice", v)
            for name in members:
                want = [t for s, t in (("a1", b"one from alice"), ("b1", b"one from bob"),
                                       ("a1", b"two from alice")) if s != name]
                ms = await pump(name, len(want))
                got[name] += [gdecrypt(name, m) for m in ms]
                assert got[name] == want, name  # in order, exactly once

            # carol removed: her removal event is her last; alice rotates her key
            await a1.group_remove(gid, "carol@home")
            [ev] = await pump("c1", 1, GroupEvent)
            assert ev.kind == GEV_REMOVED
            with pytest.raises(NotMember):
                await c1.group_send(gid, v, b"still here?")
            peer.call(op="sk_reset", name="a1", group=_s(gid))
            v, _, _ = await a1.group_members(gid)
            await distribute("a1", ["a2", "b1"])
            await gsend("a1", b"after carol", v)
            for name in ("a2", "b1"):
                assert [gdecrypt(name, m) for m in await pump(name, 1)] == [b"after carol"]
            assert await _quiet(c1)

            # bob adds a tablet: alice's send with the old version is refused until
            # she gave the tablet her sender key
            b2 = await new_device("b2", "bob@acme", "tablet")
            with pytest.raises(GroupMismatch) as mismatch:
                await gsend("a1", b"to the new set", v, id=b"n" * 16)
            assert mismatch.value.version == v + 1
            [ev] = await pump("a2", 1, GroupEvent)
            assert ev.kind == GEV_DEVICE_JOINED and ev.data[2:] == ["bob@acme", devs["b2"][1],
                                                                   devs["b2"][2]]
            # a DSEND names every current device of bob: b1 gets the same key again
            await distribute("a1", ["b1", "b2"])
            body = _b(peer.call(op="gencrypt", name="a1", group=_s(gid),
                                plaintext=_s(b"to the new set"))["body"])
            await a1.group_send(gid, v + 1, body, id=b"n" * 16)
            for name in ("a2", "b1", "b2"):
                assert [gdecrypt(name, m) for m in await pump(name, 1)] == [b"to the new set"]
            assert await _quiet(c1) and await _quiet(b2) and await _quiet(a1)  # never its own
            v += 1

            # an invite declined: dave (acme) gets nothing of the group
            d1 = await new_device("d1", "dave@acme", "phone")
            await d1.set_consent("home")
            assert await a1.group_add(gid, "dave@acme") == 1
            await d1.group_answer(gid, False)
            # erin (home) added later: nothing from before reaches her, then
            # alice's key and what alice sends after
            e1 = await new_device("e1", "erin@home", "phone")
            assert await a1.group_add(gid, "erin@home") == 0
            with pytest.raises(GroupMismatch):
                await gsend("a1", b"before erin has the key", v)
            v, _, _ = await a1.group_members(gid)
            await distribute("a1", ["e1"])
            await gsend("a1", b"welcome erin", v)
            for name in ("a2", "b1", "b2", "e1"):
                assert [gdecrypt(name, m) for m in await pump(name, 1)] == [b"welcome erin"]
            assert await _quiet(e1) and await _quiet(d1) and await _quiet(c1)
            # admin rights: a non-admin cannot add; promoted he can, demoted no more
            with pytest.raises(NotAdmin):
                await b1.group_add(gid, "carol@home")
            await a1.group_admin(gid, "bob@acme", True)
            await b1.group_remove(gid, "erin@home")
            await a1.group_admin(gid, "bob@acme", False)
            with pytest.raises(NotAdmin):
                await b1.group_add(gid, "erin@home")
            _, members, _ = await a1.group_members(gid)
            assert [m[0] for m in members] == ["alice@home", "bob@acme"]

    async def _quiet(c, wait=0.3):
        try:
            while True:
                m = await asyncio.wait_for(c.recv(), wait)
                if not isinstance(m, (Event,)) and type(m).__name__ != "GroupEvent":
                    return False
        except asyncio.TimeoutError:
            return True

    try:
        run("asyncio", main())
    finally:
        peer.close()
