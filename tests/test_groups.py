"""Feature "groups" end to end: membership, admins, events, one ciphertext fanned out.

A real relay on loopback with real SQLite files and real clients.  Bodies
are random bytes standing in for sender-key ciphertexts (the relay never
looks inside them).
"""

from __future__ import annotations

import array
import asyncio
import os
import signal
import sqlite3
from pathlib import Path

import msgpack
import pytest

from fastroute import Relay, RelayConfig, wire
from fastroute.client import Client, GroupEvent, GroupMessage
from fastroute.config import Limits
from fastroute.errors import (
    ErrorCode,
    FastrouteError,
    GroupFull,
    GroupMismatch,
    LastAdmin,
    NotAdmin,
    NotInvited,
    NotMember,
    RateLimited,
    UnknownAddress,
    UnknownGroup,
)
from fastroute.identity import ProviderKey, Registry, issue_credential
from fastroute.noise import KeyPair

from cliutil import serve_data_dir
from fastroute.relay.groups import (
    GEV_ADDED,
    GEV_ADMIN,
    GEV_CREATED,
    GEV_DECLINED,
    GEV_DEVICE_JOINED,
    GEV_DEVICE_LEFT,
    GEV_INVITED,
    GEV_JOINED,
    GEV_LEFT,
    GEV_REMOVED,
)
from relayutil import LOOPS, run, world
from test_e2ee import keyset, recorder

FEATURES = ("e2ee", "groups")


async def member(w, address: str, device: str, reg: int | None = None, **kw) -> Client:
    """A client that negotiated e2ee and groups (and published keys with ``reg``)."""
    c = await w.connect(address, device, features=FEATURES, **kw)
    if reg is not None:
        c.did = await c.publish_keys(**keyset(reg, n_ec=1, n_kem=1))
    return c


async def alice_and_bob(w) -> tuple[Client, Client, bytes, int]:
    """alice's phone and bob's phone with keys, in a group alice made and added
    bob to: ``(alice, bob, group id, its version)``."""
    a1 = await member(w, "alice@home", "phone", 11)
    b1 = await member(w, "bob@home", "phone", 21)
    gid = await a1.create_group()
    await a1.group_add(gid, "bob@home")
    v, _, _ = await a1.group_members(gid)
    return a1, b1, gid, v


async def take(c: Client, n: int, timeout: float = 5.0) -> list:
    """The next ``n`` group messages and group events (other events skipped)."""
    out: list = []
    while len(out) < n:
        m = await asyncio.wait_for(c.recv(), timeout)
        if isinstance(m, (GroupEvent, GroupMessage)):
            out.append(m)
    return out


async def quiet(c: Client, wait: float = 0.3) -> bool:
    """True if no group message or group event arrives within ``wait`` seconds."""
    try:
        await take(c, 1, wait)
    except asyncio.TimeoutError:
        return True
    return False


async def until_message(c: Client, body: bytes, timeout: float = 5.0) -> bool:
    """Take group messages and events until one with ``body``; False if none comes."""
    try:
        while True:
            m = (await take(c, 1, timeout))[0]
            if isinstance(m, GroupMessage) and m.body == body:
                return True
    except asyncio.TimeoutError:
        return False


def kinds(items: list) -> list:
    return [(m.kind, m.data[2:]) if isinstance(m, GroupEvent) else ("msg", m.body)
            for m in items]


def test_negotiation_needs_e2ee_and_group_ops_are_unknown_elsewhere(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            only = await w.connect("alice@home", "phone", features=("groups",))
            assert only.features == frozenset()  # groups builds on e2ee
            assert await only.negotiate(FEATURES) == {"e2ee", "groups"}  # later: both
            e = await w.connect("bob@home", "phone", features=("e2ee",))
            with pytest.raises(FastrouteError):
                await e.create_group()  # the client knows it was not granted
            v1 = await recorder(w, "carol@home", "phone", features=("e2ee",))
            v1._write([wire.group_op(wire.Op.GCREATE, os.urandom(16))])
            await v1.ping()
            ops = [op for pt in v1.plaintexts for op in wire.decode_server_frame(pt)]
            assert [op[0] for op in ops][-2:] == [wire.Op.ERROR, wire.Op.PONG]
            assert ops[-2][1] == ErrorCode.UNKNOWN_OP
    run("asyncio", main())


def test_lifecycle_checks_consent_and_events_in_order(tmp_path):
    async def main():
        async with world(tmp_path, require_consent=True) as w:
            a1 = await member(w, "alice@home", "phone", 11)
            a2 = await member(w, "alice@home", "laptop", 12)
            b = await member(w, "bob@home", "phone", 21)
            c = await member(w, "carol@acme", "phone", 31)
            d = await member(w, "dave@acme", "phone", 41)
            old = await recorder(w, "bob@home", "v1")  # a v1 device of a member
            await c.set_consent("home")
            gid = await a1.create_group()
            assert type(gid) is bytes and len(gid) == 16
            with pytest.raises(UnknownGroup):
                await a1.group_members(os.urandom(16))
            with pytest.raises(NotMember):
                await b.group_members(gid)
            with pytest.raises(NotMember):
                await b.group_send(gid, 1, b"x")
            assert await a1.group_add(gid, "bob@home") == 0  # same provider: added
            assert await a1.group_add(gid, "bob@home") == 2  # already
            assert await a1.group_add(gid, "carol@acme") == 1  # other provider: invited
            # dave did not opt in to home: the same answer as for no such user
            with pytest.raises(UnknownAddress) as no_consent:
                await a1.group_add(gid, "dave@acme")
            with pytest.raises(UnknownAddress) as nobody:
                await a1.group_add(gid, "nobody@acme")
            assert no_consent.value.code == nobody.value.code == ErrorCode.UNKNOWN_RECIPIENT
            with pytest.raises(NotAdmin):
                await b.group_add(gid, "erin@home")
            with pytest.raises(NotInvited):
                await d.group_answer(gid, True)
            # carol is not a member until she accepts: nothing of the group reaches her
            v, members, invitees = await a1.group_members(gid)
            assert invitees == ["carol@acme"] and v == 2
            await a1.group_send(gid, v, b"before carol")
            await c.group_answer(gid, True)
            v, members, _ = await a1.group_members(gid)
            assert v == 3
            assert members == [("alice@home", True, [(1, 11), (2, 12)]),
                               ("bob@home", False, [(1, 21)]),
                               ("carol@acme", False, [(1, 31)])]
            # membership permits the per-device sends of sender-key distribution
            await c.send_to_devices("bob@home", [(1, 21, b"skdm")])
            await a1.group_send(gid, v, b"hello all")
            with pytest.raises(GroupMismatch) as stale:
                await a1.group_send(gid, v - 1, b"stale")
            assert stale.value.version == v and stale.value.code == ErrorCode.DEVICE_MISMATCH
            # a1's other device and the others, in order; the sender's device nothing
            got = await take(a2, 5)
            assert kinds(got) == [(GEV_CREATED, ["alice@home"]),
                                  (GEV_ADDED, ["alice@home", "bob@home"]),
                                  (GEV_INVITED, ["alice@home", "carol@acme"]),
                                  ("msg", b"before carol"),
                                  (GEV_JOINED, ["carol@acme"])]
            assert kinds(await take(a2, 1)) == [("msg", b"hello all")]
            m = got[3]
            assert (m.group, m.sender, m.device) == (gid, "alice@home", a1.did)
            assert [g.data[1] for g in got if isinstance(g, GroupEvent)] == [1, 2, 2, 3]
            gc = await take(c, 3)
            assert kinds(gc) == [(GEV_INVITED, ["alice@home", "carol@acme"]),
                                 (GEV_JOINED, ["carol@acme"]), ("msg", b"hello all")]
            got_b = await take(b, 5)
            assert [k for k, _ in kinds(got_b)] == [GEV_ADDED, GEV_INVITED, "msg", GEV_JOINED,
                                                    "msg"]
            # admins: bob promoted, adds erin, demoted; the last admin stays
            await a1.group_admin(gid, "bob@home", True)
            erin = await member(w, "erin@home", "phone", 51)
            assert await b.group_add(gid, "erin@home") == 0
            await a1.group_admin(gid, "bob@home", False)
            with pytest.raises(NotAdmin):
                await b.group_remove(gid, "erin@home")
            with pytest.raises(LastAdmin):
                await a1.group_admin(gid, "alice@home", False)
            # an invite declined
            await d.set_consent("home")
            assert await a1.group_add(gid, "dave@acme") == 1
            await d.group_answer(gid, False)
            with pytest.raises(NotInvited):
                await d.group_answer(gid, True)
            # carol removed: her removal event is the last of the group she gets
            await a1.group_remove(gid, "carol@acme")
            v, members, invitees = await a1.group_members(gid)
            assert [m[0] for m in members] == ["alice@home", "bob@home", "erin@home"]
            assert invitees == []
            await a1.group_send(gid, v, b"after carol")
            with pytest.raises(NotMember):
                await c.group_send(gid, v, b"me too")
            with pytest.raises(UnknownAddress):  # no group shared with bob any more
                await c.send_to_devices("bob@home", [(1, 21, b"skdm")])
            got_c = await take(c, 6)  # what happened while she was a member, then her removal
            assert [k for k, _ in kinds(got_c)] == [GEV_ADMIN, GEV_ADDED, GEV_ADMIN, GEV_INVITED,
                                                    GEV_DECLINED, GEV_REMOVED]
            assert kinds(got_c)[-1] == (GEV_REMOVED, ["alice@home", "carol@acme"])
            assert await quiet(c)
            got_b = await take(b, 7)
            assert kinds(got_b) == [
                (GEV_ADMIN, ["alice@home", "bob@home", True]),
                (GEV_ADDED, ["bob@home", "erin@home"]),
                (GEV_ADMIN, ["alice@home", "bob@home", False]),
                (GEV_INVITED, ["alice@home", "dave@acme"]),
                (GEV_DECLINED, ["dave@acme"]),
                (GEV_REMOVED, ["alice@home", "carol@acme"]),
                ("msg", b"after carol")]
            assert kinds(await take(erin, 6))[-1] == ("msg", b"after carol")
            # erin leaves; alice leaves last-admin-wise: bob, the oldest member, is promoted
            await erin.group_leave(gid)
            await a1.group_leave(gid)
            got_b = await take(b, 3)
            assert kinds(got_b) == [(GEV_LEFT, ["erin@home"]), (GEV_LEFT, ["alice@home"]),
                                    (GEV_ADMIN, ["", "bob@home", True])]
            assert await b.group_add(gid, "alice@home") == 0
            # the v1 device of a member never saw a group op
            await old.ping()
            assert {op[0] for pt in old.plaintexts for op in wire.decode_server_frame(pt)} <= {
                wire.Op.WELCOME, wire.Op.PONG, wire.Op.FEATURES_OK, wire.Op.REPLY,
                wire.Op.DDELIVER, wire.Op.EVENT}
    run("asyncio", main())


def test_late_member_gets_nothing_from_before_and_a_new_device_changes_the_version(tmp_path):
    async def main():
        async with world(tmp_path, group_max_members=3) as w:
            a = await member(w, "alice@home", "phone", 11)
            b = await member(w, "bob@home", "phone", 21)
            gid = await a.create_group()
            await a.group_add(gid, "bob@home")
            v, _, _ = await a.group_members(gid)
            for i in range(3):
                await a.group_send(gid, v, b"early %d" % i)
            c = await member(w, "carol@home", "phone", 31)
            await a.group_add(gid, "carol@home")
            await member(w, "dave@home", "phone", 41)
            with pytest.raises(GroupFull):
                await a.group_add(gid, "dave@home")
            with pytest.raises(GroupMismatch):
                await a.group_send(gid, v, b"old set")  # carol joined since
            v, _, _ = await a.group_members(gid)
            await a.group_send(gid, v, b"late")
            assert kinds(await take(c, 2)) == [(GEV_ADDED, ["alice@home", "carol@home"]),
                                               ("msg", b"late")]
            assert await quiet(c)
            # bob offline; a device joins his list: a new version, told in order
            await b.close()
            b2 = await member(w, "bob@home", "tablet", 22)
            with pytest.raises(GroupMismatch) as changed:
                await a.group_send(gid, v, b"to the old set")
            assert changed.value.version == v + 1
            got = await take(c, 1)
            assert kinds(got) == [(GEV_DEVICE_JOINED, ["bob@home", 2, 22])]
            await a.group_send(gid, v + 1, b"to the new set", id=b"r" * 16)
            assert kinds(await take(b2, 2)) == [(GEV_DEVICE_JOINED, ["bob@home", 2, 22]),
                                                ("msg", b"to the new set")]
            back = await member(w, "bob@home", "phone")
            got = await take(back, 8)
            assert [x for x in kinds(got) if x[0] == "msg"] == [
                ("msg", b"early 0"), ("msg", b"early 1"), ("msg", b"early 2"),
                ("msg", b"late"), ("msg", b"to the new set")]
            assert [k for k, _ in kinds(got)] == [GEV_ADDED, "msg", "msg", "msg", GEV_ADDED,
                                                  "msg", GEV_DEVICE_JOINED, "msg"]
            assert await quiet(back)
    run("asyncio", main())


def test_the_live_fan_out_follows_devices_that_reconnect_or_negotiate_later(tmp_path):
    # The relay resolves a group's device list to online devices once and
    # reuses that while nothing changes: a device that reconnects, and one
    # that negotiates "groups" after it connected, must be on the live route
    # of the very next group message (not only of its next link's backlog).
    async def main():
        async with world(tmp_path) as w:
            a = await member(w, "alice@home", "phone", 11)
            b = await member(w, "bob@home", "phone", 21)
            c = await w.connect("carol@home", "phone", features=("e2ee",))
            c.did = await c.publish_keys(**keyset(31, n_ec=1, n_kem=1))
            gid = await a.create_group()
            await a.group_add(gid, "bob@home")
            await a.group_add(gid, "carol@home")
            v, _, _ = await a.group_members(gid)
            await a.group_send(gid, v, b"one")
            assert await until_message(b, b"one")
            await b.close()
            groups = w.relay.groups
            placed = groups.fanned_out
            await a.group_send(gid, v, b"while away")
            assert groups.fanned_out == placed  # nobody online to take it live
            b = await member(w, "bob@home", "phone")  # the same device, a new link
            assert await until_message(b, b"while away")  # from the store
            placed = groups.fanned_out
            await a.group_send(gid, v, b"two")
            assert await until_message(b, b"two")
            assert groups.fanned_out == placed + 1  # on the live route, to bob's new link
            assert await quiet(c)  # carol's link cannot read group messages yet
            assert "groups" in await c.negotiate(("groups",))
            placed = groups.fanned_out
            await a.group_send(gid, v, b"three")
            assert await until_message(c, b"three")
            assert groups.fanned_out == placed + 2  # live to bob and to carol
    run("asyncio", main())


def test_a_revoked_member_device_leaves_the_set_and_gets_nothing_more(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a = await member(w, "alice@home", "phone", 11)
            b1 = await member(w, "bob@home", "phone", 21)
            b2 = await member(w, "bob@home", "tablet", 22)
            gid = await a.create_group()
            await a.group_add(gid, "bob@home")
            v, _, _ = await a.group_members(gid)
            await a.group_send(gid, v, b"to both")  # fills the fan-out list of (alice, 1)
            for c in (b1, b2):
                assert kinds(await take(c, 2))[-1] == ("msg", b"to both")
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("bob@home", "tablet")
            got = await take(a, 3)  # alice's device hears bob's tablet left the group's set
            assert kinds(got) == [(GEV_CREATED, ["alice@home"]),
                                  (GEV_ADDED, ["alice@home", "bob@home"]),
                                  (GEV_DEVICE_LEFT, ["bob@home", b2.did])]
            assert got[2].data[1] == v + 1
            with pytest.raises(GroupMismatch):
                await a.group_send(gid, v, b"old set")
            await a.group_send(gid, v + 1, b"without the tablet")
            assert kinds(await take(b1, 2)) == [(GEV_DEVICE_LEFT, ["bob@home", b2.did]),
                                                ("msg", b"without the tablet")]
            tablet = w.relay.store.register_device("bob@home", "tablet")
            await w.relay.store.flush()
            assert await w.relay.store.count_pending(tablet) == 0
            v, members, _ = await a.group_members(gid)
            assert members[1] == ("bob@home", False, [(1, 21)])
    run("asyncio", main())


def test_one_providers_flood_spends_only_its_own_share_of_a_groups_rate(tmp_path):
    async def main():
        async with world(tmp_path, group_msgs_per_group_s=0.001,
                         group_msgs_per_group_burst=3) as w:
            a = await member(w, "alice@home", "phone", 11)
            c = await member(w, "carol@acme", "phone", 31)
            d = await member(w, "dave@acme", "phone", 41)
            gid = await a.create_group()
            for x in (c, d):
                assert await a.group_add(gid, x.address) == 1
                await x.group_answer(gid, True)
            v, _, _ = await a.group_members(gid)
            # acme's two users together get 3 sends, not 3 each
            for x in (c, d, c):
                await x.group_send(gid, v, b"acme")
            with pytest.raises(RateLimited):
                await d.group_send(gid, v, b"one too many")
            # home's share is untouched by acme's flood
            for i in range(3):
                await a.group_send(gid, v, b"home %d" % i)
            with pytest.raises(RateLimited):
                await a.group_send(gid, v, b"home again")
    run("asyncio", main())


def test_a_provider_policy_may_require_invites_for_its_own_users(tmp_path):
    async def main():
        async with world(tmp_path, group_invite_own_users=True) as w:
            a = await member(w, "alice@home", "phone", 11)
            b = await member(w, "bob@home", "phone", 21)
            gid = await a.create_group()
            assert await a.group_add(gid, "bob@home") == 1  # invited, not added
            with pytest.raises(NotMember):
                await b.group_members(gid)
            await b.group_answer(gid, True)
            _, members, _ = await b.group_members(gid)
            assert [m[0] for m in members] == ["alice@home", "bob@home"]
    run("asyncio", main())


def test_groups_survive_sigkill_and_an_offline_member_catches_up_in_order(tmp_path):
    data = tmp_path / "relay"
    data.mkdir()
    pkey = ProviderKey.generate()
    with Registry(str(data / "registry.db")) as reg:
        reg.add_provider("home", pkey.public_key)
    statics = {}

    async def connect(port, address, device):
        kp = statics.setdefault((address, device), KeyPair.generate())
        cred = issue_credential(pkey, "home", address, device, kp.public)
        return await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                    features=FEATURES, keepalive=None)

    async def first(port):
        a = await connect(port, "alice@home", "phone")
        await a.publish_keys(**keyset(11, n_ec=1, n_kem=1))
        b = await connect(port, "bob@home", "phone")
        await b.publish_keys(**keyset(21, n_ec=1, n_kem=1))
        c = await connect(port, "carol@home", "phone")
        await c.publish_keys(**keyset(31, n_ec=1, n_kem=1))
        await b.close()
        await c.close()
        gid = await a.create_group()
        await a.group_add(gid, "bob@home")
        await a.group_add(gid, "carol@home")
        await a.group_admin(gid, "carol@home", True)
        v, members, _ = await a.group_members(gid)
        for i in range(5):
            await a.group_send(gid, v, b"m%d" % i)  # answered: durably stored
        return gid, v, members

    async def second(port, gid, v):
        a = await connect(port, "alice@home", "phone")
        assert await a.group_members(gid) == (v, members, [])
        b = await connect(port, "bob@home", "phone")
        await a.group_send(gid, v, b"after the crash")
        got = await take(b, 9)
        # carol, an admin, may still remove
        c = await connect(port, "carol@home", "phone")
        await c.group_remove(gid, "bob@home")
        for x in (a, b, c):
            await x.close()
        return got

    proc, port = serve_data_dir(data)
    try:
        gid, v, members = asyncio.run(first(port))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc, port = serve_data_dir(data)
    try:
        got = asyncio.run(second(port, gid, v))
    finally:
        proc.terminate()
        proc.wait(20)
    assert kinds(got) == [(GEV_ADDED, ["alice@home", "bob@home"]),
                          (GEV_ADDED, ["alice@home", "carol@home"]),
                          (GEV_ADMIN, ["alice@home", "carol@home", True])] + [
        ("msg", b"m%d" % i) for i in range(5)] + [("msg", b"after the crash")]
    assert len({m.id for m in got if isinstance(m, GroupMessage)}) == 6


def test_a_1000_device_group_stores_one_body_and_every_device_receives(tmp_path):
    """1 sender + 8 users x 125 devices: the store holds the body once, each
    device's share lists it, and all 1000 devices get it."""
    users, per_user = 8, 125

    async def main():
        data = tmp_path / "relay"
        # 125 devices on each address: above the gate's default cap of 16
        async with world(tmp_path, group_changes_burst=1000,
                         limits=Limits(max_devices_per_address=128)) as w:
            sender = await member(w, "alice@home", "phone", 11)
            gid = await sender.create_group()

            async def join(u: int, d: int) -> None:
                c = await Client.connect("127.0.0.1", w.port, **creds[(u, d)],
                                         server_key=w.relay.server_key.public,
                                         features=FEATURES, keepalive=None)
                await c.publish_keys(**keyset(1 + d, n_ec=0, n_kem=0))
                await c.close()

            creds = {}
            for u in range(users):
                for d in range(per_user):
                    kp, cred = w.credential(f"u{u}@home", f"d{d}")
                    creds[(u, d)] = {"credential": cred, "static": kp}
            for u in range(users):
                await asyncio.gather(*(join(u, d) for d in range(per_user)))
                assert await sender.group_add(gid, f"u{u}@home") == 0
            v, members, _ = await sender.group_members(gid)
            assert sum(len(m[2]) for m in members) == 1 + users * per_user
            body = os.urandom(3000)
            mid = await sender.group_send(gid, v, body)
            server_key = w.relay.server_key.public
        # the relay is closed: its store file holds everything it kept
        db = sqlite3.connect(str(data / "store.db"))
        rows = [e[0] for (data,) in db.execute("SELECT data FROM spacks")
                for e in msgpack.unpackb(data) if e[2] == mid]
        assert len(rows) == 1
        holders = {dev for dev, blob in db.execute(
            "SELECT dev, coalesce(mids, (SELECT mids FROM spacks p WHERE p.first = "
            "shares.first)) FROM shares") if rows[0] in array.array("q", blob)}
        assert len(holders) == users * per_user
        db.close()
        raw = b"".join(p.read_bytes() for p in data.glob("store.db*"))
        assert raw.count(body) == 1
        relay = Relay(RelayConfig(port=0, data_dir=str(data), require_consent=False))
        await relay.start()
        try:
            async def receive(u: int, d: int) -> bytes:
                c = await Client.connect("127.0.0.1", relay.port, **creds[(u, d)],
                                         server_key=server_key, features=FEATURES,
                                         keepalive=None)
                try:
                    while True:
                        m = await asyncio.wait_for(c.recv(), 20)
                        if isinstance(m, GroupMessage):
                            return m.body
                finally:
                    await c.close()

            got = []
            for u in range(users):
                got += await asyncio.gather(*(receive(u, d) for d in range(per_user)))
            assert got == [body] * (users * per_user)
        finally:
            await relay.close()

    run("asyncio", main())


def test_the_worked_bytes_of_the_spec_are_the_codes():
    """docs/PROTOCOL.md 18.8, byte for byte from the code that builds them."""
    import re

    import msgpack

    from fastroute.relay.senders import GDELIVER_HEAD

    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    section = doc[doc.index("### 18.8 Worked bytes"):].split("\n## ")[0]
    tokens = [t for block in re.findall(r"```\n(.*?)```", section, re.S)
              for line in block.splitlines() for t in line.split("(")[0].split()
              if re.fullmatch(r"[0-9a-f]{2}", t)]
    cid, gid = bytes(range(16)), b"\xaa" * 16
    sp = msgpack.packb(gid) + msgpack.packb("alice@home") + msgpack.packb(2)
    expected = b"".join((
        wire.group_op(wire.Op.GCREATE, cid), wire.group_op(wire.Op.GADD, cid, gid, "bob@home"),
        wire.group_op(wire.Op.GSEND, cid, gid, 3, b"hi"), wire.reply_op(cid, 306, True, [4]),
        wire.reply_op(cid, 306, True, [4, [["carol@acme", 1, 31]], [["dave@acme", 1]], [], True]),
        GDELIVER_HEAD, b"\xce", (5).to_bytes(4, "big"),
        wire.py_deliver_tail(sp, cid, b"hi", wire.ts_packed(1700000000000), 0)))
    assert bytes.fromhex("".join(tokens)) == expected


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_frame_of_gsends_is_answered_as_one_gsend_at_a_time(loop, tmp_path):
    # the link hands a frame's GSENDs to the groups stage together
    # (Groups.gsend_many: clocks, slot, buckets once per frame); the same frame
    # handed over one GSEND at a time must get the same answers and fan out
    # the same messages, budgets included
    from fastroute.relay.groups import Groups
    from test_e2ee import answer, request_future

    lim = Limits(msgs_per_s=0.001, msgs_burst=6.0)

    async def scenario(path, one_at_a_time: bool):
        async with world(path, limits=lim) as w:
            groups = w.relay.groups
            if one_at_a_time:
                groups.gsend_many = lambda link, ops: [Groups.gsend_many(groups, link, [op])
                                                       for op in ops]
            a1 = await member(w, "alice@home", "phone", 11)
            b1 = await member(w, "bob@home", "phone", 21)
            lone = await member(w, "lone@home", "phone", 41)
            nokeys = await member(w, "carol@home", "phone")
            gid = await a1.create_group()
            await a1.group_add(gid, "bob@home")
            solo = await lone.create_group()
            v, _, _ = await a1.group_members(gid)
            ids = [bytes([i]) * 16 for i in range(1, 11)]
            op = wire.group_op
            ops = [
                op(wire.Op.GSEND, ids[0], gid, v, b"m1"),                # ok
                op(wire.Op.GSEND, ids[1], b"u" * 16, v, b"x"),           # unknown group
                op(wire.Op.GSEND, ids[2], gid, v - 1, b"x"),             # stale version
                op(wire.Op.GSEND, ids[0], gid, v, b"m1"),                # resend
                op(wire.Op.GSEND, ids[3], gid, v, b"m2"),                # ok
                op(wire.Op.GSEND, ids[4], gid, v, b"m3"),                # ok
                op(wire.Op.GSEND, ids[5], gid, v, b"m4"),                # ok
                op(wire.Op.GSEND, ids[6], gid, v, b"m5"),                # ok: 5 used
                op(wire.Op.GSEND, ids[7], gid, v, b"m6"),                # ok: 6 used
                op(wire.Op.GSEND, ids[8], gid, v, b"m7"),                # over budget
            ]
            futs = {cid: request_future(a1, cid) for cid in ids[:9]}
            a1._write(ops)
            answers = [await answer(futs[cid], "version") for cid in ids[:9]]
            # one lone member: accepted, nothing stored; one without keys: refused
            lone_fut = request_future(lone, ids[9])
            lone._write([op(wire.Op.GSEND, ids[9], solo, 1, b"alone")])
            lone_answer = await asyncio.wait_for(lone_fut, 5)
            with pytest.raises(FastrouteError) as nk:
                await nokeys.group_send(gid, v, b"x")
            got: list = []
            while len(got) < 6:
                got += [m.body for m in await take(b1, 1) if isinstance(m, GroupMessage)]
            assert await quiet(b1)
            return answers, got, lone_answer, int(nk.value.code)

    batched = run(loop, scenario(tmp_path / "batched", False))
    assert batched == run(loop, scenario(tmp_path / "spec", True))
    answers, got, lone_answer, nokeys_code = batched
    limited = int(ErrorCode.RATE_LIMITED)
    assert [a[0] for a in answers] == [
        "ok", int(ErrorCode.UNKNOWN_GROUP), int(ErrorCode.DEVICE_MISMATCH), "ok", "ok", "ok",
        "ok", "ok", limited]
    assert got == [b"m1", b"m2", b"m3", b"m4", b"m5", b"m6"]
    assert lone_answer is None and nokeys_code in (int(ErrorCode.NO_KEYS),
                                                   int(ErrorCode.NOT_MEMBER))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_run_of_gsends_is_dispatched_as_one_op_at_a_time(loop, tmp_path):
    # a frame of GSENDs only is decoded by the compiled decoder
    # (wire.decode_gsends) and a frame's leading run of GSENDs is queued for
    # the groups stage at once (wire.leading_gsends); with both cut out, the
    # precise decoder and the loop take them one by one: same answers, same
    # op budget, same counts, same fan-out
    from test_e2ee import answer, request_future

    async def scenario(path, bulk: bool, decoded: bool):
        saved = wire.leading_gsends, wire.decode_gsends
        if not bulk:
            wire.leading_gsends = lambda ops: 0
        if not decoded:
            wire.decode_gsends = lambda plaintext: None
        try:
            async with world(path) as w:
                a1, b1, gid, v = await alice_and_bob(w)
                link = next(ln for ln in w.relay.links if ln.address == "alice@home")
                for bucket in link.budgets.ops:
                    bucket.rate, bucket.tokens = 1e-6, 4.0  # 4 ops left
                ids = [bytes([i]) * 16 for i in range(1, 9)]
                futs = {cid: request_future(a1, cid) for cid in ids}
                ops = [wire.gsend_op(cid, gid, v, cid[:4]) for cid in ids]
                counts0 = dict(w.relay.op_counts)
                a1._write(ops[:3] + [wire.ping_op(7)] + ops[3:5])
                answers = [await answer(futs[cid]) for cid in ids[:5]]
                for bucket in link.budgets.ops:
                    bucket.tokens = 100.0
                a1._write(ops[5:])  # GSENDs only: the compiled decoder's frame
                answers += [await answer(futs[cid]) for cid in ids[5:]]
                got: list = []
                while len(got) < 6:
                    got += [m.body for m in await take(b1, 1) if isinstance(m, GroupMessage)]
                assert await quiet(b1, 0.2)
                counts = {k: v - counts0.get(k, 0) for k, v in w.relay.op_counts.items()
                          if v != counts0.get(k, 0)}
                return answers, got, counts
        finally:
            wire.leading_gsends, wire.decode_gsends = saved

    fast = run(loop, scenario(tmp_path / "fast", True, True))
    assert fast == run(loop, scenario(tmp_path / "loop", False, True))
    assert fast == run(loop, scenario(tmp_path / "precise", True, False))
    answers, got, counts = fast
    limited = int(ErrorCode.RATE_LIMITED)
    assert answers == [("ok", None)] * 3 + [(limited,)] * 2 + [("ok", None)] * 3
    assert got == [cid[:4] for cid in [bytes([i]) * 16 for i in (1, 2, 3, 6, 7, 8)]]
    assert counts[int(wire.Op.GSEND)] == 8 and counts[int(wire.Op.PING)] == 1


@pytest.mark.parametrize("loop", LOOPS)
def test_group_sends_in_one_batch_get_an_outcome_each(loop, tmp_path):
    # group_send_many: one future for the batch, resolved once every message
    # is answered, to an outcome per message in order; a refused one (here a
    # body that is no bytes) fails alone, a stale version fails them all
    async def main():
        async with world(tmp_path) as w:
            a1, b1, gid, v = await alice_and_bob(w)
            bodies = [b"m%d" % i for i in range(20)]
            ids, fut = a1.group_send_many(gid, v, bodies[:7] + ["not bytes"] + bodies[7:])
            got = await asyncio.wait_for(fut, 10)
            assert len(set(ids)) == 21 and got[:7] + got[8:] == [None] * 20
            assert isinstance(got[7], FastrouteError) and got[7].code == ErrorCode.BAD_FIELD
            stale_ids, stale = a1.group_send_many(gid, v - 1, [b"old", b"older"])
            assert [type(x) for x in await stale] == [GroupMismatch] * 2
            msgs: list = []
            while len(msgs) < 20:
                msgs += [m for m in await take(b1, 1) if isinstance(m, GroupMessage)]
            assert [m.body for m in msgs] == bodies
            assert [m.id for m in msgs] == ids[:7] + ids[8:]
            assert all(type(m) is GroupMessage and m.group == gid for m in msgs)
            assert await quiet(b1, 0.2) and not a1._requests
            assert await a1.group_send_many(gid, v, [])[1] == []
    run(loop, main())


def test_a_batch_keeps_each_replys_result_or_error():
    # what the batch calls resolve to when REPLYs carry results (a GSEND's
    # members skipped at a cap) or errors: the client's REPLY loop, fed by hand
    from fastroute.client import _RequestBatch

    async def main():
        c = Client("h", 1, credential=b"", static=None)
        ids = [bytes([i]) * 16 for i in range(4)]
        fut = asyncio.get_running_loop().create_future()
        batch = _RequestBatch(fut, ids)
        for cid in ids:
            c._requests[cid] = (batch, [])
        c._on_reply((2000, ids[2], 0, True, ("bob@home",)))
        c._on_reply((2000, ids[0], int(ErrorCode.DEVICE_MISMATCH), True, (7,)))  # stale: v7
        c._on_reply((2000, ids[3], 0, True, None))
        assert not fut.done() and list(c._requests) == [ids[1]]
        c._on_reply((2000, ids[1], 0, True, None))
        got = await fut
        assert got[1:] == [None, ["bob@home"], None] and not c._requests
        assert type(got[0]) is GroupMismatch
    asyncio.run(main())


def test_group_sends_without_waiting_arrive_in_order(tmp_path):
    # group_send_nowait: no coroutine per message; each future is done once
    # stored, a stale one fails alone (GroupMismatch), the others fan out in order
    async def main():
        async with world(tmp_path) as w:
            a1, b1, gid, v = await alice_and_bob(w)
            sent = [a1.group_send_nowait(gid, v, b"m%d" % i) for i in range(30)]
            stale_id, stale = a1.group_send_nowait(gid, v - 1, b"stale")
            assert await asyncio.gather(*(f for _, f in sent)) == [None] * 30
            with pytest.raises(GroupMismatch) as err:
                await stale
            assert err.value.version == v
            got: list = []
            while len(got) < 30:
                got += [m for m in await take(b1, 1) if isinstance(m, GroupMessage)]
            assert [m.body for m in got] == [b"m%d" % i for i in range(30)]
            assert [m.id for m in got] == [cid for cid, _ in sent]
            assert await quiet(b1) and not a1._requests
    run("asyncio", main())


def test_gsend_op_is_the_group_op_of_gsend():
    gid, cid = b"g" * 16, bytes(range(16))
    for version, body in ((0, b""), (7, b"x" * 300), (2**40, bytes(wire.MAX_BODY))):
        assert (wire.gsend_op(cid, gid, version, body)
                == wire.group_op(wire.Op.GSEND, cid, gid, version, body))

