"""The admin listener of an embedded Relay: readiness follows the lifecycle, 'off' is off."""

from __future__ import annotations

import asyncio

import pytest

from fastroute import Relay, RelayConfig
from fastroute.errors import StartFailed


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def test_readyz_follows_the_lifecycle_and_off_means_no_listener(tmp_path):
    async def main() -> None:
        relay = Relay(RelayConfig(port=0, data_dir=str(tmp_path / "a")))
        await relay.start()
        port = relay.admin_port
        assert port and relay.admin_host == "127.0.0.1"
        assert await http_get(port, "/readyz") == (200, "ready\n")
        assert (await http_get(port, "/metrics"))[1].startswith("# HELP fastroute_up")
        # a second relay on the same data directory is refused, the first keeps serving
        with pytest.raises(StartFailed, match="another relay"):
            await Relay(RelayConfig(port=0, data_dir=str(tmp_path / "a"))).start()
        assert await http_get(port, "/readyz") == (200, "ready\n")
        assert relay.ready() == (True, "ready")
        await relay.close()
        assert relay.ready() == (False, "shutting down")
        with pytest.raises(OSError):
            await http_get(port, "/healthz")
        # the lock went with close(): the directory can be served again, here without
        # the admin listener
        quiet = Relay(RelayConfig(port=0, data_dir=str(tmp_path / "a"), admin_listen="off"))
        await quiet.start()
        assert quiet.admin_port is None
        await quiet.close()

    asyncio.run(main())
