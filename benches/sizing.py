"""Memory of a running relay per connection and per message queued in RAM (docs/OPERATING.md).

Starts ``fastroute serve`` (SQLite store, or ``--store memory``) in a temporary directory, connects
``--devices`` devices from this process, then has one sender push
``--per-device`` messages of ``--size`` bytes to each of them while they do
not ack (so the messages stay in the relay's mailboxes), reading the relay's
resident memory (``/proc/PID/status`` VmRSS) and open descriptors at each step.
It also times one ``GET /metrics`` with everything online (a scrape walks
every link and every mailbox).
Run: ``python benches/sizing.py`` (about 30 s; loopback only; stops by itself).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape_ms(admin: str) -> float:
    return scrape(admin)[0]


def scrape(admin: str) -> tuple[float, str]:
    """One ``GET /metrics``: how long it took (ms), and the page."""
    import urllib.request

    t = time.perf_counter()
    with urllib.request.urlopen(admin + "/metrics", timeout=30) as resp:
        page = resp.read().decode()
    return (time.perf_counter() - t) * 1000, page


async def run(args, port: int, pid: int, home_key, server_key: bytes, admin: str) -> None:
    from fastroute import Client
    from fastroute.identity import issue_credential
    from fastroute.noise import KeyPair

    async def connect(address: str, device: str, **kw) -> Client:
        kp = KeyPair.generate()
        cred = issue_credential(home_key, "home", address, device, kp.public)
        return await Client.connect("127.0.0.1", port, credential=cred, static=kp,
                                    server_key=server_key, **kw)

    await asyncio.sleep(1.0)
    base, base_fd = rss_kib(pid), fds(pid)
    print(f"relay idle: RSS {base / 1024:.1f} MiB, {base_fd} fds")
    devices = []
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with sem:
            devices.append(await connect(f"u{i}@home", "d", auto_ack=False))

    await asyncio.gather(*(one(i) for i in range(args.devices)))
    await asyncio.sleep(1.0)
    conn = rss_kib(pid)
    print(f"{args.devices} devices online: RSS {conn / 1024:.1f} MiB, {fds(pid)} fds; "
          f"{(conn - base) * 1024 / args.devices / 1024:.1f} KiB per connection, "
          f"{(fds(pid) - base_fd) / args.devices:.2f} fds per connection")
    sender = await connect("sender@home", "d")
    body = os.urandom(args.size)
    for i in range(args.devices):
        await sender.send_many(f"u{i}@home", [body] * args.per_device)
    await asyncio.sleep(2.0)
    queued = rss_kib(pid)
    n = args.devices * args.per_device
    print(f"{n} messages of {args.size} B queued unacked: RSS {queued / 1024:.1f} MiB; "
          f"{(queued - conn) * 1024 / n:.0f} B per queued message")
    loop = asyncio.get_running_loop()
    times = sorted([await loop.run_in_executor(None, scrape_ms, admin) for _ in range(5)])
    print(f"GET /metrics with {args.devices + 1} devices online: median {times[2]:.1f} ms")
    # which store held them: the memory store never commits
    page = (await loop.run_in_executor(None, scrape, admin))[1]
    commits = re.search(r"^fastroute_store_commits_total (\S+)$", page, re.M)
    print(f"store commits: {commits.group(1) if commits else 'n/a'}")
    for c in devices + [sender]:
        await c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--per-device", type=int, default=200)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--store", choices=("sqlite", "memory"), default="sqlite",
                   help="the relay's store (memory: every queued message is also the store's)")
    args = p.parse_args()
    from fastroute.identity import ProviderKey, Registry
    from fastroute.loadtest.replay import raise_fd_limit

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from server_cpu import relay_limits_toml

    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        subprocess.run([sys.executable, "-P", "-m", "fastroute.cli", "init", "--data-dir", data],
                       check=True, capture_output=True)
        # one sender fills every mailbox: lift every rate limit for the run
        # (its device's alone left its address's 40,000-message burst, which
        # refused the run's 200,000 messages), and the new-sender rule, which
        # lets a young address start writing to 20 strangers, not 1,000
        with open(os.path.join(tmp, "fastroute.toml"), "w") as fh:
            fh.write(f'[relay]\nstore = "{args.store}"\n[limits]\n' + relay_limits_toml()
                     + "new_sender_age_s = 0.0\n")
        key = ProviderKey.generate()
        with Registry(os.path.join(data, "registry.db")) as reg:
            reg.add_provider("home", key.public_key)
        proc = subprocess.Popen([sys.executable, "-P", "-m", "fastroute.cli", "serve", "--data-dir",
                                 data, "--listen", "127.0.0.1:0"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                cwd=tmp)
        try:
            port = admin = None
            deadline = time.monotonic() + 30
            while admin is None and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if m := re.match(r"fastroute relay listening on .*:(\d+)$", line.strip()):
                    port = int(m.group(1))
                elif m := re.match(r"admin listener \(read only\): (http://[^/]+)/", line):
                    admin = m.group(1)
            server_key = bytes.fromhex(open(os.path.join(data, "server.pub")).read())
            asyncio.run(run(args, port, proc.pid, key, server_key, admin))
        finally:
            proc.terminate()
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
