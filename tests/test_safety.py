"""Feature "safety" end to end: blocks and spam reports over a real relay.

A real relay on loopback with real SQLite files and real clients; the
answers a blocked party gets are compared byte for byte with those for an
address that does not exist and one that never opted in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time

import pytest

from fastroute import Client, Relay, RelayConfig, wire
from fastroute.config import Limits
from fastroute.errors import BlockLimit, ErrorCode, FastrouteError
from fastroute.identity import ProviderKey, Registry, issue_credential
from fastroute.noise import KeyPair

from cliutil import serve_data_dir
from relayutil import LOOPS, nothing_arrives, recv_n, run, world
from test_e2ee import keyset, recorder

FEATURES = ("e2ee", "groups", "safety")
MONTH_AGO = int(time.time()) - 30 * 86400


async def user(w, address: str, reg: int | None = None, device: str = "phone",
               record: bool = False) -> Client:
    """A client with every feature (and published keys with ``reg``)."""
    if record:
        c = await recorder(w, address, device, features=FEATURES)
    else:
        c = await w.connect(address, device, features=FEATURES)
    if reg is not None:
        c.did = await c.publish_keys(**keyset(reg, n_ec=3, n_kem=3))
    return c


def last_frame(c) -> bytes:
    return c.plaintexts[-1]


async def answers(c, to: str, gid: bytes) -> list[bytes]:
    """The frames ``c`` gets for SEND, DEVICES, BUNDLES, DSEND and GADD naming ``to``,
    each with the same request id (refusals are not remembered)."""
    cid = b"\x07" * 16
    out = []
    with pytest.raises(FastrouteError):
        await c.send(to, b"probe", id=cid)
    out.append(last_frame(c))
    for op in (wire.devices_op(cid, to), wire.bundles_op(cid, to, []),
               wire.dsend_op(cid, to, False, [(1, 11, b"x")], []),
               wire.group_op(wire.Op.GADD, cid, gid, to)):
        with pytest.raises(FastrouteError):
            await c._request([op], cid)
        out.append(last_frame(c))
    return out


@pytest.mark.parametrize("loop", LOOPS)
def test_a_block_answers_like_an_unknown_address_byte_for_byte(loop, tmp_path):
    async def main():
        async with world(tmp_path, require_consent=True) as w:
            alice = await user(w, "alice@home", 11)
            await user(w, "bob@home", 21)  # exists, never opted in to acme
            mallory = await user(w, "mallory@acme", 31, record=True)
            trudy = await user(w, "trudy@acme", 41, record=True)
            carl = await user(w, "carl@home", 51, record=True)
            await alice.set_consent("acme")
            gid = await mallory.create_group()
            # before the block mallory reaches alice
            await mallory.send("alice@home", b"hello")
            assert [m.body for m in await recv_n(alice, 1)] == [b"hello"]
            assert await mallory.devices("alice@home") == [(1, 11)]

            assert await alice.block("mallory@acme") is True
            assert await alice.block("mallory@acme") is False  # already
            blocked = await answers(mallory, "alice@home", gid)
            unknown = await answers(mallory, "nobody@home", gid)
            not_opted_in = await answers(mallory, "bob@home", gid)
            assert blocked == unknown == not_opted_in
            assert blocked[0] == b"\x91" + wire.sack_op(b"\x07" * 16,
                                                        ErrorCode.CONSENT_REQUIRED)
            assert blocked[1] == b"\x91" + wire.reply_op(b"\x07" * 16,
                                                         ErrorCode.UNKNOWN_RECIPIENT)
            # trudy, of the same provider, is not blocked
            await trudy.send("alice@home", b"from trudy")
            assert [m.body for m in await recv_n(alice, 1)] == [b"from trudy"]
            assert await nothing_arrives(alice)  # nothing of mallory's probes

            # a user of the blocker's own provider: unknown answers 300, so does a block
            await alice.block("carl@home")
            assert await answers(carl, "alice@home", gid) == await answers(
                carl, "nobody@home", gid)
            assert carl.plaintexts[-5] == b"\x91" + wire.sack_op(
                b"\x07" * 16, ErrorCode.UNKNOWN_RECIPIENT)

            # a whole provider; then unblocking restores
            assert await alice.block("@acme") is True
            assert await answers(trudy, "alice@home", gid) == await answers(
                trudy, "nobody@home", gid)
            assert await alice.blocked() == ["@acme", "carl@home", "mallory@acme"]
            # from another device of alice's, the same list
            laptop = await user(w, "alice@home", device="laptop")
            assert await laptop.blocked() == ["@acme", "carl@home", "mallory@acme"]
            assert await laptop.unblock("@acme") is True
            assert await laptop.unblock("@acme") is False
            await trudy.send("alice@home", b"trudy again")
            assert await alice.unblock("mallory@acme") is True
            await mallory.send("alice@home", b"mallory again")
            assert [m.body for m in await recv_n(alice, 2)] == [b"trudy again",
                                                                b"mallory again"]
            assert await mallory.devices("alice@home") == [(1, 11)]
            assert await mallory.group_add(gid, "alice@home") == 1  # invited
            assert await alice.blocked() == ["carl@home"]
            # a block never hides a user from herself; own address refused
            await alice.send("alice@home", b"note to self")
            with pytest.raises(FastrouteError) as err:
                await alice.block("alice@home")
            assert err.value.code == ErrorCode.BAD_FIELD
    run(loop, main())


def test_block_cap_bad_targets_and_v1_links_cannot_use_the_ops(tmp_path):
    async def main():
        async with world(tmp_path, limits=Limits(max_blocks=2)) as w:
            alice = await user(w, "alice@home", 11)
            await alice.block("a@acme")
            await alice.block("@acme")
            with pytest.raises(BlockLimit):
                await alice.block("b@acme")
            for bad in ("nobody", "@", "x@y@z", ""):
                with pytest.raises(FastrouteError) as err:
                    await alice._safety(wire.Op.BLOCK, bad, True)
                assert err.value.code == ErrorCode.BAD_FIELD
            # safety builds on e2ee; without it nothing of it is granted
            only = await w.connect("carol@home", features=("safety",))
            assert only.features == frozenset()
            with pytest.raises(FastrouteError):
                await only.block("a@acme")  # the client knows it was not granted
            # a v1 link: the op is unknown, and a v1 client still works
            v1 = await recorder(w, "dave@home", "v1")
            v1._write([wire.safety_op(wire.Op.BLOCK, os.urandom(16), "a@acme", True)])
            await v1.ping()
            ops = [op for pt in v1.plaintexts for op in wire.decode_server_frame(pt)]
            assert [op[0] for op in ops][-2:] == [wire.Op.ERROR, wire.Op.PONG]
            assert ops[-2][1] == ErrorCode.UNKNOWN_OP
            await v1.send("alice@home", b"v1 still works")
            assert [m.body for m in await recv_n(alice, 1)] == [b"v1 still works"]
    run("asyncio", main())


def test_blocks_survive_sigkill_and_are_erased_with_the_address(tmp_path, capsys):
    from fastroute.cli import main as cli

    data = tmp_path / "relay"
    data.mkdir()
    pkey = ProviderKey.generate()
    with Registry(str(data / "registry.db")) as reg:
        reg.add_provider("home", pkey.public_key)
    statics = {}

    async def connect(port, address, device="phone"):
        kp = statics.setdefault((address, device), KeyPair.generate())
        cred = issue_credential(pkey, "home", address, device, kp.public)
        return await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                    features=FEATURES, keepalive=None)

    async def first(port):
        a = await connect(port, "alice@home")
        b = await connect(port, "bob@home")
        await b.block("alice@home")
        assert await a.block("mallory@home")  # answered: durably recorded
        await b.close()

    async def second(port):
        a = await connect(port, "alice@home")
        m = await connect(port, "mallory@home")
        assert await a.blocked() == ["mallory@home"]
        with pytest.raises(FastrouteError) as err:
            await m.send("alice@home", b"x")
        assert err.value.code == ErrorCode.UNKNOWN_RECIPIENT
        await a.close()
        await m.close()

    proc, port = serve_data_dir(data)
    try:
        asyncio.run(first(port))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc, port = serve_data_dir(data)
    try:
        asyncio.run(second(port))
    finally:
        proc.terminate()
        proc.wait(20)
    capsys.readouterr()
    assert cli(["address", "erase", "alice@home", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "blocks: 1" in out and "blocks_of_it_kept: 1" in out
    conn = sqlite3.connect(str(data / "safety.db"))
    assert conn.execute("SELECT address, target FROM blocks").fetchall() == [
        ("bob@home", "alice@home")]
    conn.close()


def _old(*addresses):
    def setup(reg, keys):
        reg.note_devices([(a, "phone", a.split("@")[1], MONTH_AGO) for a in addresses])
    return setup


@pytest.mark.parametrize("loop", LOOPS)
def test_spam_reports_count_only_after_a_delivery_and_quarantine_then_lift(
        loop, tmp_path, capsys):
    from fastroute.cli import main as cli

    reporters = ["r1@home", "r2@home", "r3@home", "r4@acme", "r5@acme", "r6@acme"]
    limits = Limits(report_window_s=3600.0, reports_per_provider=2, report_points=10.0,
                    throttle_score=25.0, quarantine_score=39.0)  # the score decays

    async def main():
        async with world(tmp_path, setup=_old(*reporters, "spam@acme", "quiet@home"),
                         limits=limits) as w:
            gate = w.relay.gate
            spam = await w.connect("spam@acme")
            rs = {a: await user(w, a) for a in reporters + ["quiet@home"]}
            for a in reporters:  # a real delivery to each reporter (not to quiet)
                await spam.send(a, b"buy now")
            for a in reporters:
                await recv_n(rs[a], 1)
            # no delivery from spam to quiet: not counted, no points
            assert await rs["quiet@home"].report_spam("spam@acme") is False
            assert await rs["r1@home"].report_spam("spam@acme") is True
            assert await rs["r1@home"].report_spam("spam@acme") is False  # once per window
            assert await rs["r2@home"].report_spam("spam@acme") is True
            assert gate.standing("spam@acme") == "ok"  # 20 points
            # home's cap for this sender is reached: r3's report does not count
            assert await rs["r3@home"].report_spam("spam@acme") is False
            assert gate.standing("spam@acme") == "ok"
            # past the window (the relay's clock moved on), a delivery no longer counts
            safety = w.relay.safety
            real = safety.clock
            safety.clock = lambda: real() + 3601.0
            assert await rs["r4@acme"].report_spam("spam@acme") is False
            safety.clock = real
            assert await rs["r4@acme"].report_spam("spam@acme") is True
            assert gate.standing("spam@acme") == "throttled"  # 30 points
            assert await rs["r5@acme"].report_spam("spam@acme") is True
            assert gate.standing("spam@acme") == "quarantined"  # 40 points (a hair less: decay)
            with pytest.raises(FastrouteError) as err:
                await spam.send("r1@home", b"more")
            assert err.value.code == ErrorCode.QUARANTINED
            assert (safety.reports_counted, safety.reports_refused) == (4, 4)
            # the operator sees why, and lifts it
            for _ in range(200):
                if w.relay.registry.quarantined():
                    break
                await asyncio.sleep(0.01)
            capsys.readouterr()
            assert cli(["sender", "quarantined", "--data-dir", w.data_dir]) == 0
            out = capsys.readouterr().out
            assert "spam@acme" in out and "spam reports" in out
            assert await asyncio.to_thread(
                cli, ["sender", "lift", "spam@acme", "--data-dir", w.data_dir]) == 0
            for _ in range(200):
                if gate.standing("spam@acme") != "quarantined":
                    break
                await asyncio.sleep(0.01)
            assert gate.standing("spam@acme") == "ok"
            await spam.send("r1@home", b"sorry")
            # acme's cap is reached too
            assert await rs["r6@acme"].report_spam("spam@acme") is False
            assert (safety.reports_counted, safety.reports_refused) == (4, 5)
    run(loop, main())


def test_a_delivery_is_recorded_in_the_window_of_its_own_time(tmp_path):
    # Safety keeps the generation it last recorded under: a delivery made
    # after the clock moved on (two windows: the one before is looked at
    # too) must be recorded in its own window, and one made after the clock
    # moved back in its own again.
    limits = Limits(report_window_s=3600.0, report_points=10.0)

    async def main():
        async with world(tmp_path, setup=_old("r@home", "r2@home", "spam@acme"),
                         limits=limits) as w:
            safety = w.relay.safety
            spam = await w.connect("spam@acme")
            r = await user(w, "r@home")
            r2 = await user(w, "r2@home")
            await spam.send("r@home", b"one")
            await recv_n(r, 1)
            real = safety.clock
            safety.clock = lambda: real() + 7200.0
            # that delivery is two windows old: it no longer counts
            assert await r.report_spam("spam@acme") is False
            await spam.send("r@home", b"two")
            await recv_n(r, 1)
            assert await r.report_spam("spam@acme") is True
            safety.clock = real
            # back in the first window: a delivery there counts there
            await spam.send("r2@home", b"three")
            await recv_n(r2, 1)
            assert await r2.report_spam("spam@acme") is True
            assert safety.reports_counted == 2
    run("asyncio", main())


def test_a_new_reporter_counts_for_almost_nothing_and_reports_survive_a_restart(tmp_path):
    limits = Limits(report_window_s=3600.0, report_points=10.0)

    async def main():
        async with world(tmp_path, setup=_old("old@home", "old2@home"), limits=limits) as w:
            spam = await w.connect("spam@acme")
            old = await user(w, "old@home")
            new = await user(w, "new@home")  # first seen a moment ago
            await (await user(w, "old2@home")).close()
            for to in ("old@home", "new@home", "old2@home"):
                await spam.send(to, b"x")
            await recv_n(old, 1)
            await recv_n(new, 1)
            sender = w.relay.gate.sender_of("spam@acme")
            assert await new.report_spam("spam@acme") is True
            assert sender.score < 0.01  # weight: age / report_mature_s
            assert await old.report_spam("spam@acme") is True
            assert 9.9 < sender.score < 10.1
            # a per-device send (DSEND) is a delivery too
            spam2 = await user(w, "spam2@acme", 61)
            dana = await user(w, "dana@home", 71)
            assert await dana.report_spam("spam2@acme") is False
            await spam2.send_to_devices("dana@home", [(dana.did, 71, b"ciphertext")])
            assert await dana.report_spam("spam2@acme") is True
        # what the relay delivered and who reported survive a restart
        relay = Relay(RelayConfig(port=0, data_dir=w.data_dir, limits=limits,
                                  registry_poll_s=0.05))
        await relay.start()
        try:
            clients = []
            for address in ("old@home", "old2@home"):
                kp, cred = w.credential(address, "phone")
                clients.append(await Client.connect(
                    "127.0.0.1", relay.port, credential=cred, static=kp,
                    server_key=relay.server_key.public, features=FEATURES))
            assert await clients[0].report_spam("spam@acme") is False  # reported already
            assert await clients[1].report_spam("spam@acme") is True  # delivered before
            for c in clients:
                await c.close()
        finally:
            await relay.close()
        return w.data_dir

    data_dir = run("asyncio", main())
    conn = sqlite3.connect(os.path.join(data_dir, "safety.db"))
    (n_delivered,) = conn.execute("SELECT count(*) FROM delivered").fetchone()
    (n_reports,) = conn.execute("SELECT count(*) FROM reports").fetchone()
    conn.close()
    assert (n_delivered, n_reports) == (4, 4)
    # the digests name no address
    raw = b"".join(open(os.path.join(data_dir, f), "rb").read()
                   for f in os.listdir(data_dir) if f.startswith("safety.db"))
    assert b"spam@acme" not in raw and b"old@home" not in raw


def test_the_worked_bytes_of_section_19_are_what_the_code_packs():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "PROTOCOL.md"),
               encoding="utf-8").read()
    section = doc[doc.index("### 19.4 Worked bytes"):].split("\n## ")[0]
    blocks = section.split("```")[1::2]
    hexes: list[bytes] = []
    for block in blocks:
        for line in block.strip("\n").splitlines():
            words = line.split("(")[0].split()
            if words[0].isalpha() and len(words[0]) > 2:  # "BLOCK ...": a new op
                hexes.append(bytes.fromhex("".join(words[1:])))
            elif not line[0].isspace() and words[:2] in (["95", "cd"], ["93", "11"]):
                hexes.append(bytes.fromhex("".join(words)))  # a new relay op
            else:
                hexes[-1] += bytes.fromhex("".join(words))
    cid = bytes(range(16))
    want = [wire.safety_op(wire.Op.BLOCK, cid, "mallory@acme", True),
            wire.safety_op(wire.Op.BLOCK, cid, "@acme", True),
            wire.safety_op(wire.Op.BLOCKS, cid),
            wire.safety_op(wire.Op.REPORT, cid, "spam@acme"),
            wire.reply_op(cid, 0, True, 0),
            wire.reply_op(cid, 0, True, ["@acme", "mallory@acme"]),
            wire.reply_op(cid, 0, True, True),
            wire.reply_op(cid, ErrorCode.BLOCK_LIMIT),
            wire.sack_op(cid, ErrorCode.CONSENT_REQUIRED),
            wire.reply_op(cid, ErrorCode.UNKNOWN_RECIPIENT)]
    assert hexes == want


def test_a_blocker_at_its_backlog_cap_still_answers_as_unknown(tmp_path):
    # RECIPIENT_FULL would tell that the address exists: a blocked sender gets 300
    async def main():
        async with world(tmp_path, max_stored_msgs_per_device=3) as w:
            bob = await user(w, "bob@acme")
            await bob.block("carol@home")
            await bob.close()  # offline: everything for bob is stored
            alice = await w.connect("alice@home")
            carol = await w.connect("carol@home")
            for i in range(3):
                await alice.send("bob@acme", b"m%d" % i)
            codes = {}
            for who, to in ((alice, "bob@acme"), (carol, "bob@acme"), (carol, "nobody@acme")):
                with pytest.raises(FastrouteError) as err:
                    await who.send(to, b"more")
                codes[(who.address, to)] = err.value.code
            assert codes == {("alice@home", "bob@acme"): ErrorCode.RECIPIENT_FULL,
                             ("carol@home", "bob@acme"): ErrorCode.UNKNOWN_RECIPIENT,
                             ("carol@home", "nobody@acme"): ErrorCode.UNKNOWN_RECIPIENT}
    run("asyncio", main())


@pytest.mark.parametrize("key_len", [16, 32, 64, 65, 100])
def test_pair_digests_are_hmac_sha256_as_kept_on_disk(key_len):
    # the digests are kept in the safety book across restarts: computed with
    # the key's pads absorbed once, they must stay HMAC-SHA256 (RFC 2104),
    # the bytes earlier relays wrote, for keys of any length
    import hmac

    from fastroute.relay.safety import _Generation

    key = os.urandom(key_len)
    g = _Generation(7, key)
    for parts in [("alice@home", "bob@acme"), ("@acme", "eve@x.org"), ("", ""), ("ü@x", "y")]:
        want = hmac.digest(key, "\x00".join(parts).encode(), "sha256")[:16]
        assert g.digest(*parts) == want
        assert g.digest(*parts) == want  # the absorbed pads are copied, never spent
