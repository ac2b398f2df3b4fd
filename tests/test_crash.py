"""Crash test (issue 12): the relay is SIGKILLed again and again under load.

A real relay process (``fastroute serve``) on a loopback port and one data
directory; real clients in this process that reconnect by themselves:
three senders, a recipient address with two devices (one of them offline
part of the time), and one more recipient device that runs in its own
process, which is killed (SIGKILL) and started again once.  The relay is
SIGKILLed at random moments at least 5 times and restarted on the same data
directory.  Bounded: a fixed number of kills, each after 1-2.5 s of traffic.

Checked at the end: no message acked to its sender is missing at any
recipient device (lost = 0), no application saw a message twice
(duplicates = 0), every device saw each sender's messages in the order
sent (out-of-order = 0), no client gave up; and the device whose process
died lost nothing it had not taken (its application log, written before
each take is acknowledged, is its memory across the restart).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import msgpack

from fastroute import Client
from fastroute.identity import ProviderKey, Registry, issue_credential
from fastroute.noise import KeyPair
from fastroute.relay.server import load_or_create_server_key

from cliutil import ENV, listen_port

KILLS = 5
SENDERS = ["alice@home", "carol@home", "eve@acme"]


class RelayProcess:
    """``fastroute serve`` in a child process, SIGKILLed and restarted at will."""

    def __init__(self, data_dir: str, port: int) -> None:
        self.data_dir = data_dir
        self.port = port
        self.proc: subprocess.Popen | None = None
        cfg = os.path.join(data_dir, "relay.toml")
        with open(cfg, "w") as fh:
            fh.write(f'[relay]\nlisten = "127.0.0.1:{port}"\ndata_dir = "{data_dir}"\n'
                     "require_consent = false\nregistry_poll_s = 0.2\n")
        self.cmd = [sys.executable, "-m", "fastroute.cli", "serve", "--config", cfg]

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=ENV)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# The device that runs in its own process: it appends every message it takes
# to its log (and fsyncs) before the client may ack it, and skips what its
# log already holds after a restart: the persistent dedup PROTOCOL.md 9.2
# recommends.
DEVICE_SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, msgpack
    from fastroute import Client
    from fastroute.noise import KeyPair
    port, cred_path, key_path, pin_path, log_path = sys.argv[1:6]
    async def main():
        seen = set()
        if os.path.exists(log_path):
            with open(log_path, "rb") as fh:
                for sender, cid, body in msgpack.Unpacker(fh):
                    seen.add((sender, cid))
        for _ in range(300):  # the first connection is ours to retry
            try:
                client = await Client.connect(
                    "127.0.0.1", int(port), credential=open(cred_path, "rb").read(),
                    static=KeyPair.from_private(open(key_path, "rb").read()),
                    server_key=open(pin_path, "rb").read(), reconnect=True,
                    auto_ack=False)
                client.reconnect_max_delay = 0.3
                break
            except Exception:
                await asyncio.sleep(0.1)
        with open(log_path, "ab") as log:
            print("up", flush=True)
            while True:
                msg = await client.recv()
                if (msg.sender, msg.id) not in seen:
                    seen.add((msg.sender, msg.id))
                    log.write(msgpack.packb((msg.sender, msg.id, msg.body)))
                    log.flush()
                    os.fsync(log.fileno())
                client.ack(msg.seq)
                if msg.seq % 64 == 0:
                    await asyncio.sleep(0.01)  # a slow application: the inbox fills
    asyncio.run(main())
""")


async def _connect_retrying(port: int, cred: bytes, kp: KeyPair, pin: bytes,
                            **kw) -> Client:
    # the first connection is the caller's: retry it while the relay restarts
    for _ in range(200):
        try:
            return await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                        server_key=pin, **kw)
        except Exception:  # noqa: BLE001 - relay not up yet
            await asyncio.sleep(0.1)
    raise AssertionError("relay never came up")


class Receiver:
    """An in-process device: records what its application takes.

    Its ids persist across the device's client objects, as an application's
    store of processed messages would; a message handed out twice by one
    client object is a duplicate of the client library's making.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[tuple[str, int]] = []   # (sender, n) in the order taken
        self.ids: dict[tuple[str, bytes], int] = {}  # -> id() of the client that gave it
        self.dups = 0

    def take(self, msg, client: Client) -> None:
        gen = self.ids.get((msg.sender, msg.id))
        if gen is not None:
            if gen == id(client):
                self.dups += 1
            return  # a restarted client's redelivery: the application's dedup drops it
        self.ids[(msg.sender, msg.id)] = id(client)
        sender, n = msgpack.unpackb(msg.body)
        self.got.append((sender, n))


def _out_of_order(got: list[tuple[str, int]]) -> int:
    last: dict[str, int] = {}
    bad = 0
    for sender, n in got:
        if n <= last.get(sender, -1):
            bad += 1
        last[sender] = max(n, last.get(sender, -1))
    return bad


def test_relay_sigkilled_repeatedly_loses_duplicates_and_reorders_nothing(tmp_path):
    asyncio.run(asyncio.wait_for(_crash_run(str(tmp_path)), 240))


async def _crash_run(tmp: str) -> None:
    rnd = random.Random(12)
    data_dir = os.path.join(tmp, "relay")
    os.makedirs(data_dir)
    keys = {"home": ProviderKey.generate(), "acme": ProviderKey.generate()}
    with Registry(os.path.join(data_dir, "registry.db")) as reg:
        for name, key in keys.items():
            reg.add_provider(name, key.public_key)
    pin = load_or_create_server_key(data_dir)[0].public
    port = listen_port()
    relay = RelayProcess(data_dir, port)

    def cred(address: str, device: str) -> tuple[KeyPair, bytes]:
        kp = KeyPair.generate()
        provider = address.split("@")[1]
        return kp, issue_credential(keys[provider], provider, address, device, kp.public,
                                    ttl_s=3600)

    creds = {(a, d): cred(a, d) for a, d in
             [*((s, "phone") for s in SENDERS), ("bob@acme", "phone"),
              ("bob@acme", "laptop"), ("dave@home", "tablet")]}
    # the separate device process's files
    dave_kp, dave_cred = creds[("dave@home", "tablet")]
    files = {n: os.path.join(tmp, n) for n in ("cred", "key", "pin", "log")}
    for name, data in (("cred", dave_cred), ("key", dave_kp.private), ("pin", pin)):
        with open(files[name], "wb") as fh:
            fh.write(data)
    device_cmd = [sys.executable, "-c", DEVICE_SCRIPT, str(port), files["cred"], files["key"],
                  files["pin"], files["log"]]

    relay.start()
    clients: list[Client] = []
    device_proc: subprocess.Popen | None = None
    try:
        async def connect(address: str, device: str) -> Client:
            kp, c = creds[(address, device)]
            client = await _connect_retrying(port, c, kp, pin, reconnect=True)
            client.reconnect_max_delay = 0.3
            clients.append(client)
            return client

        # every device connects once before traffic, so the relay knows it
        bob_phone = await connect("bob@acme", "phone")
        bob_laptop = await connect("bob@acme", "laptop")
        device_proc = subprocess.Popen(device_cmd, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, env=ENV)
        await asyncio.get_running_loop().run_in_executor(None, device_proc.stdout.readline)
        senders = [await connect(s, "phone") for s in SENDERS]
        recv = {"phone": Receiver("phone"), "laptop": Receiver("laptop")}
        acked: dict[str, set[tuple[str, int]]] = {"bob@acme": set(), "dave@home": set()}
        stop = asyncio.Event()

        refused: list[BaseException] = []

        async def send_loop(client: Client, sender: str) -> None:
            # pipelined, as a real client sends: up to 8 batches in flight,
            # so some are always unacked when the relay dies
            n = 0
            inflight: list[tuple[asyncio.Future, str, int]] = []

            async def settle(fut: asyncio.Future, to: str, first: int) -> None:
                try:
                    await fut
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    refused.append(exc)
                    return
                acked[to].update((sender, first + i) for i in range(20))

            while not stop.is_set():
                to = "bob@acme" if (n // 20) % 3 else "dave@home"
                batch = [msgpack.packb((sender, n + i)) for i in range(20)]
                inflight.append((client.send_many(to, batch), to, n))
                n += 20
                if len(inflight) >= 8:
                    await settle(*inflight.pop(0))
                await asyncio.sleep(rnd.uniform(0, 0.02))
            for entry in inflight:
                await settle(*entry)

        async def recv_loop(client_box: list, rec: Receiver) -> None:
            while not stop.is_set():
                client = client_box[0]
                try:
                    for msg in await asyncio.wait_for(client.recv_many(64), 0.5):
                        rec.take(msg, client)
                    await asyncio.sleep(0.02)  # a slow application: the inbox fills
                except asyncio.TimeoutError:
                    continue
                except Exception:  # noqa: BLE001 - closed on purpose (offline period)
                    await asyncio.sleep(0.05)

        laptop_box = [bob_laptop]
        tasks = [asyncio.ensure_future(send_loop(c, s)) for c, s in zip(senders, SENDERS)]
        tasks += [asyncio.ensure_future(recv_loop([bob_phone], recv["phone"])),
                  asyncio.ensure_future(recv_loop(laptop_box, recv["laptop"]))]

        for k in range(KILLS):
            await asyncio.sleep(rnd.uniform(1.0, 2.5))
            relay.kill()
            if k == 1:
                # bob's laptop goes offline for a while (a clean close)
                await laptop_box[0].close()
            if k == 2:
                # the separate device's process dies too
                device_proc.send_signal(signal.SIGKILL)
                device_proc.wait()
            await asyncio.sleep(rnd.uniform(0.0, 0.5))
            relay.start()
            if k == 2:
                device_proc = subprocess.Popen(device_cmd, stdout=subprocess.PIPE,
                                               stderr=subprocess.DEVNULL, env=ENV)
                await asyncio.get_running_loop().run_in_executor(
                    None, device_proc.stdout.readline)
            if k == 3:
                laptop_box[0] = await connect("bob@acme", "laptop")
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*tasks[:3])  # every batch in flight settled
        # let every device drain what is still stored for it
        deadline = time.monotonic() + 30
        expect_bob = acked["bob@acme"]
        while time.monotonic() < deadline:
            for name, box in (("phone", [bob_phone]), ("laptop", laptop_box)):
                for msg in box[0].recv_nowait_many():
                    recv[name].take(msg, box[0])
            if all(expect_bob <= set(recv[n].got) for n in recv):
                break
            await asyncio.sleep(0.1)
        for t in tasks[3:]:
            t.cancel()
        await asyncio.sleep(1.0)  # late duplicates would show now
        for name, box in (("phone", [bob_phone]), ("laptop", laptop_box)):
            for msg in box[0].recv_nowait_many():
                recv[name].take(msg, box[0])
        gave_up = [c for c in clients if c.closed and c is not bob_laptop]
        # the device process: give it time to take the rest, then read its log
        deadline = time.monotonic() + 30
        dave_got: list[tuple[str, int]] = []
        while time.monotonic() < deadline:
            dave_got = []
            if os.path.exists(files["log"]):
                with open(files["log"], "rb") as fh:
                    dave_got = [tuple(msgpack.unpackb(body)) for _s, _c, body
                                in msgpack.Unpacker(fh)]
            if acked["dave@home"] <= set(dave_got):
                break
            await asyncio.sleep(0.2)
    finally:
        for c in clients:
            await c.close()
        if device_proc is not None and device_proc.poll() is None:
            device_proc.kill()
            device_proc.wait()
        relay.stop()

    total_acked = sum(len(v) for v in acked.values())
    print(f"crash run: {KILLS} relay SIGKILLs, 1 device process SIGKILL, "
          f"{total_acked} messages acked to senders, "
          f"bob phone/laptop took {len(recv['phone'].got)}/{len(recv['laptop'].got)}, "
          f"dave's process logged {len(dave_got)}")
    assert total_acked > 200, "too little traffic to mean anything"
    for name, rec in recv.items():
        lost = expect_bob - set(rec.got)
        assert not lost, f"bob's {name} lost {len(lost)} acked messages"
        assert rec.dups == 0, f"bob's {name} application saw {rec.dups} duplicates"
        assert _out_of_order(rec.got) == 0, f"bob's {name} saw messages out of order"
    lost = acked["dave@home"] - set(dave_got)
    assert not lost, f"the device whose process died lost {len(lost)} acked messages"
    assert len(dave_got) == len(set(dave_got)), "the restarted device took duplicates"
    assert _out_of_order(dave_got) == 0, "the restarted device saw messages out of order"
    assert not gave_up, f"{len(gave_up)} clients gave up"
    assert not refused, f"{len(refused)} batches refused: {refused[:3]}"
