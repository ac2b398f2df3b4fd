"""``fastroute record``: a metadata-only trace of a running relay's traffic.

Off by default, twice over: the relay must be started with
``admin_socket = true`` (or ``fastroute serve --admin-socket``), and an
operator must run ``fastroute record`` against that socket, which only root
or the relay's user can open (mode 0600).

What leaves the relay: per accepted message its time, keyed-hash pseudonyms
of sender and recipient (:func:`~fastroute.loadtest.trace.pseudonymize`; the
key is the recorder's and is sent to the relay for this session only), body
size and class.  Never a body, an id or an address.
"""

from __future__ import annotations

import asyncio
import os
import time

from ..errors import ErrorCode, FastrouteError, InvalidArgument
from .trace import TraceRecord, pseudonymize, write_trace

__all__ = ["serve_admin", "record", "cli_record"]


async def serve_admin(relay, path: str) -> asyncio.AbstractServer:
    """Serve the relay's admin socket at ``path`` (``record KEYHEX`` streams taps)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tap = None
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            cmd, _, arg = line.decode("ascii", "replace").strip().partition(" ")
            if cmd != "record":
                writer.write(b"error unknown command\n")
                return
            try:
                key = bytes.fromhex(arg)
                pseudonymize(key, "probe@probe")
            except (ValueError, InvalidArgument):
                writer.write(b"error bad key\n")
                return
            writer.write(b"ok\n")

            def tap(ts_ms: int, sender: str, to: str, size: int, cls: int) -> None:
                # the relay thread never blocks on a slow recorder: past 1 MiB
                # buffered, records are dropped and the recorder sees a gap
                if writer.transport.get_write_buffer_size() < 1 << 20:
                    writer.write(f"{ts_ms * 1000} {pseudonymize(key, sender)} "
                                 f"{pseudonymize(key, to)} {size} {'e' if cls else 'p'}\n"
                                 .encode())

            relay.add_tap(tap)
            await reader.read()  # until the recorder disconnects
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            if tap is not None:
                relay.remove_tap(tap)
            writer.close()

    server = await asyncio.start_unix_server(handle, path=path)
    os.chmod(path, 0o600)
    return server


async def record(path: str, out: str, *, duration: float, count: int = 0,
                 key: bytes | None = None) -> int:
    """Record from the admin socket at ``path`` into trace file ``out``; return the count."""
    key = key or os.urandom(32)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise FastrouteError(f"cannot open the relay's admin socket {path} ({exc}); start the "
                             "relay with admin_socket = true", code=ErrorCode.INTERNAL) from None
    writer.write(f"record {key.hex()}\n".encode())
    if (await reader.readline()).strip() != b"ok":
        raise FastrouteError("the relay refused to record", code=ErrorCode.POLICY)
    records: list[TraceRecord] = []
    deadline = time.monotonic() + duration
    t0 = None
    try:
        while not count or len(records) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = await asyncio.wait_for(reader.readline(), left)
            except asyncio.TimeoutError:
                break
            if not line:
                break
            ts_us, sender, to, size, cls = line.decode().split()
            ts = int(ts_us)
            t0 = ts if t0 is None else t0
            # the relay's clock may step back a little between connections
            offset = max(ts - t0, records[-1].offset_us if records else 0)
            records.append(TraceRecord(offset, sender, (to,), int(size), cls))
    finally:
        writer.close()
    write_trace(out, records)
    return len(records)


def cli_record(args) -> int:
    """``fastroute record`` (arguments from :func:`.cliargs.add_record_args`)."""
    key = None
    if args.key_file:
        with open(args.key_file, "rb") as fh:
            key = fh.read()
    n = asyncio.run(record(os.path.join(args.data_dir, "admin.sock"), args.out,
                           duration=args.duration, count=args.count, key=key))
    print(f"recorded {n} messages (metadata only) to {args.out}")
    return 0
