"""A client written from docs/PROTOCOL.md: every media request gets its MREPLY.

The spec promises exactly one ``MREPLY [22, id, code, result]`` per media
request, malformed ones included; a client that waits for it must not wait
forever because the relay answered with a SACK instead.
"""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest

from fastroute.errors import ErrorCode, FastrouteError
from relayutil import run, world

MALFORMED = {
    "MBEGIN size 0": lambda rid: [6, rid, 0, b"\x00" * 32],
    "MBEGIN negative size": lambda rid: [6, rid, -5, b"\x00" * 32],
    "MBEGIN short sha256": lambda rid: [6, rid, 10, b"\x00" * 31],
    "MCHUNK index not an int": lambda rid: [7, rid, b"\x00" * 16, "0", b"x"],
    "MFINISH upload id too short": lambda rid: [8, rid, b"\x00" * 3],
    "MGET missing index": lambda rid: [9, rid, b"\x00" * 32],
}


@pytest.mark.parametrize("loop", ["uvloop"])
@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_media_request_is_answered_by_mreply(loop, tmp_path, name):
    async def main():
        async with world(tmp_path) as w:
            alice = await w.connect("alice@home")
            rid = os.urandom(16)
            fut = alice._loop.create_future()
            alice._media[rid] = fut  # wait for the MREPLY as a spec client does
            alice._write([msgpack.packb(MALFORMED[name](rid))])
            with pytest.raises(FastrouteError) as err:
                await asyncio.wait_for(fut, 5)
            assert err.value.code in (ErrorCode.BAD_FIELD, ErrorCode.MALFORMED)
            await alice.ping()  # still connected
            # and the SEND path is unchanged: a malformed SEND still gets its SACK
            bad = os.urandom(16)
            sack = alice._loop.create_future()
            alice._pending[bad] = (sack, b"")
            alice._write([msgpack.packb([1, bad, "bob@acme", b"x", 7])])
            with pytest.raises(FastrouteError):
                await asyncio.wait_for(sack, 5)
    run(loop, main())
