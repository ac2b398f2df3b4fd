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
                keys = peer.call(op="device", name=name, address=address, n_ec=5, n_kem=5)
                c = await w.connect(address, device, features=("e2ee",))
                did = await c.publish_keys(
                    keys["reg_id"], _b(keys["identity"]),
                    (keys["signed"][0], _b(keys["signed"][1]), _b(keys["signed"][2])),
                    tuple([keys["last_resort"][0]] + [_b(x) for x in keys["last_resort"][1:]]),
                    [(i, _b(p)) for i, p in keys["ec"]],
                    [(i, _b(p), _b(s)) for i, p, s in keys["kem"]])
                peer.call(op="set_id", name=name, device_id=did)
                devs[name] = (c, did, keys["reg_id"], address)
            a1, a2, b1 = (devs[n][0] for n in ("a1", "a2", "b1"))
            await a1.set_consent("acme")
            await b1.set_consent("home")

            def session(name, address, bundle):
                peer.call(op="session", name=name, peer=address, device_id=bundle.device_id,
                          bundle=[bundle.device_id, bundle.registration_id,
                                  _s(bundle.identity_key),
                                  [bundle.signed_prekey[0], _s(bundle.signed_prekey[1]),
                                   _s(bundle.signed_prekey[2])],
                                  None if bundle.one_time_prekey is None else
                                  [bundle.one_time_prekey[0], _s(bundle.one_time_prekey[1])],
                                  [bundle.kem_prekey[0], _s(bundle.kem_prekey[1]),
                                   _s(bundle.kem_prekey[2])]])

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
