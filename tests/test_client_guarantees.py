"""The client's written guarantees (README "Client guarantees"), each a regression test.

A real relay on loopback, real clients; the failures are provoked the way
they happened in the crash runs of issue 12: a relay that closes during the
reconnect handshake, a SERVER_BYE 504, a link that drops while sends are
unacked or deliveries untaken, a device process that dies.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from fastroute import Client, Relay, RelayConfig
from fastroute.identity import Registry
from fastroute.noise import KeyPair
from fastroute.errors import CredentialRevoked, ErrorCode, FastrouteError, StoreFailed
from relayutil import LOOPS, nothing_arrives, recv_n, run, world

pytestmark = pytest.mark.parametrize("loop", LOOPS)


def fast(client: Client) -> Client:
    """Shorter reconnect delays, for tests (the defaults suit real networks)."""
    client.reconnect_max_delay = 0.2
    return client


def _new_link(client: Client, old) -> bool:
    """A new link has its transport keys (it may not have had WELCOME yet)."""
    proto = client._proto
    return proto is not None and proto is not old and proto.open


async def _wait_for(cond, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0)


def test_sends_made_during_the_reconnect_handshake_go_after_the_resends(loop, tmp_path):
    # The relay never saw the first batch (the network ate it); the link
    # drops; a send made after the new link's handshake but before WELCOME
    # must still reach the recipient after the batch (per-device FIFO).
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home", reconnect=True)
            bob = await w.connect("bob@acme")
            alice._write = lambda ops: None  # the network eats everything
            first = alice.send_many("bob@acme", [b"a%d" % i for i in range(100)])
            await asyncio.sleep(0.05)
            del alice._write
            old = alice._proto
            old.transport.abort()
            await _wait_for(lambda: _new_link(alice, old))
            late = alice.send_nowait("bob@acme", b"late")
            await asyncio.wait_for(first, 10)
            await asyncio.wait_for(late, 10)
            got = await recv_n(bob, 101)
            assert [m.body for m in got] == [b"a%d" % i for i in range(100)] + [b"late"]
    run(loop, main())


class _Closer:
    """A TCP listener that closes every connection as soon as it is accepted."""

    def __init__(self, port: int, abort: bool) -> None:
        self.port = port
        self.abort = abort
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        def factory():
            closer = self

            class P(asyncio.Protocol):
                def connection_made(self, transport):
                    closer.accepted += 1
                    sock = transport.get_extra_info("socket")
                    if closer.abort and sock is not None:
                        # RST instead of FIN: the client's first write may fail
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    transport.close()
            return P()
        self.server = await asyncio.get_running_loop().create_server(
            factory, "127.0.0.1", self.port, reuse_address=True)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("abort", [False, True])
def test_relay_closing_during_the_reconnect_handshake_is_retried_until_it_is_back(
        loop, abort, tmp_path):
    # A second crash during the reconnect wave, max_connections, fd
    # exhaustion: the relay closes at accept.  The client keeps trying (it
    # must neither give up nor hang) and its pending sends go out once a
    # relay answers again.
    async def main():
        async with world(tmp_path) as w:
            port = w.port
            alice = fast(await w.connect("alice@home", reconnect=True))
            bob = fast(await w.connect("bob@acme", reconnect=True))
            await w.relay.close()
            closer = _Closer(port, abort)
            await closer.start()
            fut = alice.send_nowait("bob@acme", b"while away")
            await _wait_for(lambda: closer.accepted >= 6)
            assert not alice._closed and not bob._closed
            await closer.stop()
            # no admin listener: "auto" would bind port + 1, which a client's
            # ephemeral port may hold by then
            w.relay = Relay(RelayConfig(port=port, data_dir=w.data_dir, admin_listen="off",
                                        registry_poll_s=0.05, require_consent=False))
            await w.relay.start()
            assert await asyncio.wait_for(fut, 10)
            got = await recv_n(bob, 1)
            assert got[0].body == b"while away"
    run(loop, main())


def test_connect_to_a_relay_that_closes_at_accept_raises_a_typed_error(loop, tmp_path):
    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for abort in (False, True):
            closer = _Closer(port, abort)
            await closer.start()
            try:
                for _ in range(5):
                    with pytest.raises(FastrouteError):
                        await Client.connect("127.0.0.1", port, credential=b"x" * 10,
                                             static=KeyPair.generate(), timeout=2.0)
            finally:
                await closer.stop()
    run(loop, main())


def test_server_bye_504_is_not_fatal(loop, tmp_path):
    # docs/PROTOCOL.md 10.4: STORE_FAILED at connect means "reconnect with backoff"
    async def main():
        async with world(tmp_path) as w:
            bob = fast(await w.connect("bob@acme", reconnect=True))
            alice = await w.connect("alice@home")
            await alice.ping()
            await bob.ping()
            store = w.relay.store
            real_load = store.load
            failures = []
            bob_key = store.register_device("bob@acme", "phone")

            async def failing_load(*args):
                if args[0] == bob_key and len(failures) < 2:
                    failures.append(1)
                    raise StoreFailed("injected: backlog could not be loaded")
                return await real_load(*args)
            store.load = failing_load
            bob._proto.transport.abort()
            await _wait_for(lambda: len(failures) >= 2)
            await alice.send("bob@acme", b"after 504")
            got = await recv_n(bob, 1)
            assert got[0].body == b"after 504" and not bob._closed
    run(loop, main())


def test_fatal_codes_end_the_client_and_fail_pending_sends(loop, tmp_path):
    # revoked credentials are what the protocol says is final
    async def main():
        async with world(tmp_path) as w:
            alice = fast(await w.connect("alice@home", reconnect=True))
            with Registry(os.path.join(w.data_dir, "registry.db")) as reg:
                reg.revoke_device("alice@home", "phone")
            fut = alice.send_nowait("bob@acme", b"never")
            with pytest.raises(CredentialRevoked):
                await asyncio.wait_for(alice.recv(), 10)
            assert alice._closed
            assert alice._closing_error.code == ErrorCode.CREDENTIAL_REVOKED
            with pytest.raises(FastrouteError):
                await fut
    run(loop, main())


def test_redeliveries_of_untaken_messages_are_not_acked_after_a_reconnect(loop, tmp_path):
    # 300 messages in bob's inbox, not taken; the link drops; the relay
    # redelivers them (the client drops them as duplicates of its inbox);
    # bob takes 100, then its process dies.  The 200 it never took must
    # still be on the relay for its next start.
    async def main():
        async with world(tmp_path) as w:
            bob = fast(await w.connect("bob@acme", reconnect=True))
            alice = await w.connect("alice@home")
            bodies = [b"m%03d" % i for i in range(300)]
            await alice.send_many("bob@acme", bodies)
            await _wait_for(lambda: len(bob._inbox) == 300)
            old = bob._proto
            old.transport.abort()
            await _wait_for(lambda: _new_link(bob, old))
            await _wait_for(lambda: bob.duplicates_dropped == 300)
            taken = [await bob.recv() for _ in range(100)]
            assert [m.body for m in taken] == bodies[:100]
            await asyncio.sleep(0.3)  # room for any (wrong) DACK to reach the relay
            # the device's process dies: no BYE, no further acks
            bob._closed = True
            bob._proto.transport.abort()
            kp, cred = bob.static, bob.credential
            again = await Client.connect("127.0.0.1", w.port, credential=cred, static=kp,
                                         server_key=w.relay.server_key.public)
            w.clients.append(again)
            got = [m.body for m in await recv_n(again, 200)]
            # at least every untaken one, in order (taken-but-unacked may repeat)
            rest = got + [m.body for m in again.recv_nowait_many()]
            assert rest[-200:] == bodies[100:]
    run(loop, main())


def test_a_duplicate_does_not_ack_an_untaken_original_on_the_same_link(loop, tmp_path):
    # The relay lost its dedup window (restart) and stored a resend twice:
    # both copies reach bob on one link.  Dropping the second must not ack
    # the first while it is still in bob's inbox.
    async def main():
        async with world(tmp_path) as w:
            bob = await w.connect("bob@acme")
            alice = await w.connect("alice@home")
            cid = b"\x07" * 16
            await alice.send("bob@acme", b"once", id=cid)
            w.relay.gate.dedup.forget("alice@home", cid)  # as after a relay restart
            await alice.send("bob@acme", b"once", id=cid)
            await _wait_for(lambda: bob.duplicates_dropped == 1)
            await asyncio.sleep(0.2)
            dkey = w.relay.store.register_device("bob@acme", "phone")
            assert await w.relay.store.count_pending(dkey) >= 1  # the original is kept
            (await bob.recv())
            await asyncio.sleep(0.2)
            assert await w.relay.store.count_pending(dkey) == 0
    run(loop, main())


def test_manual_ack_cannot_cover_what_the_application_did_not_take(loop, tmp_path):
    async def main():
        async with world(tmp_path) as w:
            bob = await w.connect("bob@acme", auto_ack=False)
            alice = await w.connect("alice@home")
            await alice.send_many("bob@acme", [b"x%d" % i for i in range(10)])
            await _wait_for(lambda: len(bob._inbox) == 10)
            first = await bob.recv()
            bob.ack(10)  # a seq the application has not been given yet
            await asyncio.sleep(0.2)
            dkey = w.relay.store.register_device("bob@acme", "phone")
            assert await w.relay.store.count_pending(dkey) == 9
            assert first.body == b"x0"
            assert await nothing_arrives(alice, 0.05)
    run(loop, main())


def test_reconnect_backoff_doubles_is_jittered_and_capped(loop, tmp_path, monkeypatch):
    # connection refused, again and again: the waits grow to the cap and stay there
    import fastroute.client as client_mod
    bounds: list[tuple[float, float]] = []
    real_uniform = client_mod.random.uniform

    def recording(lo: float, hi: float) -> float:
        bounds.append((lo, hi))
        return real_uniform(lo, hi)
    monkeypatch.setattr(client_mod.random, "uniform", recording)

    async def main():
        async with world(tmp_path) as w:
            alice = fast(await w.connect("alice@home", reconnect=True))
            await w.relay.close()  # nothing listens on the port any more
            await _wait_for(lambda: len(bounds) >= 8)
            assert not alice.closed
            await alice.close()
    run(loop, main())
    highs = [hi for _, hi in bounds]
    assert highs == sorted(highs) and highs[-1] == 0.2 and highs[0] < 0.2
    assert all(lo == hi / 2 for lo, hi in bounds)
