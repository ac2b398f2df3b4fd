"""docs/OPERATING.md works as written: the online backup, taken beside a running relay.

The backup commands are read from the guide and run under bash while the
relay runs and holds undelivered messages; a relay started on a directory
restored from the backup delivers them.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

from cliutil import ENV, Served, fr
from fastroute import Client
from fastroute.identity import ProviderKey, issue_credential
from fastroute.noise import KeyPair

GUIDE = (Path(__file__).resolve().parents[1] / "docs" / "OPERATING.md").read_text()


def backup_commands() -> str:
    block = re.search(r"\n(    mkdir -p backup\n.*?)\n\n", GUIDE, re.S).group(1)
    return "\n".join(line[4:] for line in block.splitlines())


def test_the_documented_online_backup_restores_undelivered_messages(tmp_path):
    relay = Served(tmp_path, "--data-dir", "data", "--listen", "127.0.0.1:0")
    bodies = [f"undelivered-{i}".encode() for i in range(5)]
    try:
        fr("provider", "add", "home", "--generate", "--key-out", "home.key", "--data-dir",
           "data", cwd=tmp_path, ok=True)
        key = ProviderKey.load(tmp_path / "home.key")
        creds = {}
        for user in ("alice", "bob"):
            kp = KeyPair.generate()
            creds[user] = (kp, issue_credential(key, "home", f"{user}@home", "phone",
                                                kp.public))

        async def send() -> None:
            clients = {}
            for user, (kp, cred) in creds.items():
                clients[user] = await Client.connect(
                    "127.0.0.1", relay.port, credential=cred, static=kp,
                    server_key=bytes.fromhex(relay.server_key))
            await clients["bob"].close()  # known to the relay, now offline
            for body in bodies:
                await clients["alice"].send("bob@home", body)
            await clients["alice"].close()

        asyncio.run(send())
        proc = subprocess.run(["bash", "-e", "-c", backup_commands()], cwd=tmp_path,
                              env=ENV, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    finally:
        relay.stop()
    backup = tmp_path / "backup"
    assert sorted(os.listdir(backup)) == ["registry.db", "server.key", "server.pub",
                                          "store.db"]
    assert oct(os.stat(backup / "server.key").st_mode & 0o777) == "0o600"
    # restore into a fresh directory and start a relay there
    shutil.copytree(backup, tmp_path / "restored")
    relay = Served(tmp_path, "--data-dir", "restored", "--listen", "127.0.0.1:0")
    try:
        async def receive() -> list[bytes]:
            kp, cred = creds["bob"]
            bob = await Client.connect("127.0.0.1", relay.port, credential=cred, static=kp,
                                       server_key=bytes.fromhex(relay.server_key))
            got = []
            while len(got) < len(bodies):
                got.extend(m.body for m in await asyncio.wait_for(bob.recv_many(), 10))
            await bob.close()
            return got

        assert sorted(asyncio.run(receive())) == sorted(bodies)
    finally:
        relay.stop()
