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

from ..errors import ErrorCode, FastrouteError
from .trace import TraceRecord, write_trace

__all__ = ["record", "cli_record"]


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
    from ..config import DATA_DIR_ENV
    from ..datadir import require_initialised

    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV) or "fastroute-data"
    require_initialised(data_dir, "from --data-dir" if args.data_dir else
                        f"from ${DATA_DIR_ENV}" if os.environ.get(DATA_DIR_ENV)
                        else "the default ./fastroute-data")
    n = asyncio.run(record(os.path.join(data_dir, "admin.sock"), args.out,
                           duration=args.duration, count=args.count, key=key))
    print(f"recorded {n} messages (metadata only) to {args.out}")
    return 0
