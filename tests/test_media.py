"""Behaviour of the media store: real files in tmp_path, asyncio loop, injected clock.

No test asserts a timing; the big-upload test only checks that a blob of many
chunks round-trips (a quadratic implementation would make it visibly slow).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import pytest

from fastroute.errors import (
    BodyTooLarge,
    ErrorCode,
    FastrouteError,
    InvalidArgument,
    RateLimited,
    StoreFailed,
    WrongType,
    error_for_code,
)
from fastroute.media import (
    BlobMismatch,
    ChunkRejected,
    MediaError,
    MediaStore,
    UnknownBlob,
    UnknownUpload,
    UploadIncomplete,
)

OWNER = "alice.uploader@thirdparty.example"
CHUNK = 1024
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro):
    with asyncio.Runner() as runner:
        return runner.run(coro)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def files_under(path) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(path):
        out.extend(os.path.join(dirpath, n) for n in names)
    return sorted(out)


async def opened(root, **limits) -> MediaStore:
    limits.setdefault("chunk_size", CHUNK)
    limits.setdefault("clock", Clock())
    return await MediaStore.open(root, **limits)


async def upload(ms: MediaStore, data: bytes, owner: str = OWNER, *,
                 order=None) -> bytes:
    uid = await ms.begin(owner, len(data), sha(data))
    parts = chunks(data, ms.chunk_size)
    for i in (order if order is not None else range(len(parts))):
        await ms.put_chunk(uid, i, parts[i])
    return await ms.finish(uid)


async def download(ms: MediaStore, blob_id: bytes) -> bytes:
    size, n = ms.stat(blob_id)
    data = b"".join([await ms.read_chunk(blob_id, i) for i in range(n)])
    assert len(data) == size
    return data


def test_round_trip_out_of_order_with_short_last_chunk(tmp_path):
    data = os.urandom(5 * CHUNK + 123)

    async def main():
        async with await opened(tmp_path) as ms:
            order = [5, 2, 0, 4, 1, 3]
            blob_id = await upload(ms, data, order=order)
            assert blob_id == sha(data)
            assert ms.stat(blob_id) == (len(data), 6)
            assert len(await ms.read_chunk(blob_id, 5)) == 123
            assert await download(ms, blob_id) == data
            # concurrent chunk writes of one upload, in random order
            data2 = os.urandom(40 * CHUNK + 1)
            uid = await ms.begin(OWNER, len(data2), sha(data2))
            parts = chunks(data2)
            idx = list(range(len(parts)))
            random.Random(7).shuffle(idx)
            await asyncio.gather(*[ms.put_chunk(uid, i, parts[i]) for i in idx])
            assert await download(ms, await ms.finish(uid)) == data2
            assert not os.listdir(tmp_path / "tmp")
        path = tmp_path / "blobs" / blob_id.hex()[:2] / blob_id.hex()[2:4] / blob_id.hex()
        assert path.read_bytes() == data

    run(main())


def test_exact_multiple_and_single_chunk(tmp_path):
    async def main():
        async with await opened(tmp_path) as ms:
            for data in (b"x", os.urandom(CHUNK), os.urandom(3 * CHUNK)):
                blob_id = await upload(ms, data)
                assert ms.stat(blob_id) == (len(data), -(-len(data) // CHUNK))
                assert await download(ms, blob_id) == data

    run(main())


def test_dedup_refreshes_expiry(tmp_path):
    data = os.urandom(2 * CHUNK + 5)
    clock = Clock()

    async def main():
        async with await opened(tmp_path, clock=clock, ttl_s=100) as ms:
            first = await upload(ms, data)
            clock.t += 80
            second = await upload(ms, data, owner="bob@home.example")
            assert first == second
            assert ms.stats()["blobs"] == 1
            assert len(files_under(tmp_path / "blobs")) == 1
            assert not os.listdir(tmp_path / "tmp")
            # 110 s after the first upload, 30 s after the second: still there
            assert await ms.expire(T0 + 110) == 0
            assert await download(ms, first) == data
            assert await ms.expire(T0 + 180) == 1
            with pytest.raises(UnknownBlob):
                ms.stat(first)

    run(main())


@pytest.mark.parametrize("kind", ["hash", "size", "truncated"])
def test_mismatch_leaves_nothing_behind(tmp_path, kind):
    data = os.urandom(3 * CHUNK + 10)

    async def main():
        async with await opened(tmp_path) as ms:
            if kind == "hash":        # right size, wrong content
                uid = await ms.begin(OWNER, len(data), sha(data[::-1]))
                upload_data = data
            elif kind == "size":      # the client declared a size its file does not have
                real = data + b"tail"
                uid = await ms.begin(OWNER, len(data), sha(real))
                upload_data = data
                with pytest.raises(ChunkRejected):
                    await ms.put_chunk(uid, 3, real[3 * CHUNK:])
            else:                     # the temporary file lost bytes behind our back
                uid = await ms.begin(OWNER, len(data), sha(data))
                upload_data = data
            for i, part in enumerate(chunks(upload_data)):
                await ms.put_chunk(uid, i, part)
            if kind == "truncated":
                (part_file,) = files_under(tmp_path / "tmp")
                os.truncate(part_file, len(data) - 1)
            with pytest.raises(BlobMismatch) as info:
                await ms.finish(uid)
            assert isinstance(info.value, FastrouteError)
            assert isinstance(info.value, ValueError)
            assert files_under(tmp_path) == []
            assert ms.stats()["blobs"] == 0
            with pytest.raises(UnknownUpload):   # discarded: gone for good
                await ms.finish(uid)
            with pytest.raises(UnknownUpload):
                await ms.put_chunk(uid, 0, data[:CHUNK])
            # and its slot is free again
            assert ms.stats()["uploaders"] == 0

    run(main())


def test_oversize_refused_at_begin(tmp_path):
    async def main():
        async with await opened(tmp_path, max_blob=10 * CHUNK) as ms:
            with pytest.raises(BodyTooLarge) as info:
                await ms.begin(OWNER, 10 * CHUNK + 1, sha(b""))
            assert info.value.code == ErrorCode.BODY_TOO_LARGE
            assert files_under(tmp_path) == []
            await ms.abort(await ms.begin(OWNER, 10 * CHUNK, sha(b"")))
        async with await MediaStore.open(tmp_path / "default") as ms:
            assert ms.max_blob == 100 * 1024 * 1024 and ms.chunk_size == 60 * 1024
            with pytest.raises(BodyTooLarge):
                await ms.begin(OWNER, 100 * 1024 * 1024 + 1, sha(b""))

    run(main())


def test_bad_arguments_are_typed(tmp_path):
    async def main():
        async with await opened(tmp_path) as ms:
            with pytest.raises(WrongType):
                await ms.begin(b"owner", 10, sha(b""))
            with pytest.raises(InvalidArgument):
                await ms.begin("", 10, sha(b""))
            with pytest.raises(InvalidArgument):
                await ms.begin(OWNER, 0, sha(b""))
            with pytest.raises(WrongType):
                await ms.begin(OWNER, "10", sha(b""))
            with pytest.raises(InvalidArgument):
                await ms.begin(OWNER, 10, b"short")
            with pytest.raises(UnknownUpload):
                await ms.put_chunk(os.urandom(16), 0, b"x")
            with pytest.raises(InvalidArgument):
                await ms.put_chunk(b"bad id", 0, b"x")
            with pytest.raises(UnknownBlob):
                ms.stat(os.urandom(32))
            with pytest.raises(UnknownBlob):
                await ms.read_chunk(os.urandom(32), 0)
            with pytest.raises(UnknownUpload):
                await ms.abort(os.urandom(16))
            blob_id = await upload(ms, b"abc")
            with pytest.raises(ChunkRejected):
                await ms.read_chunk(blob_id, 1)
        for bad in ({"chunk_size": 0}, {"ttl_s": 0}, {"max_uploads_per_owner": 0},
                    {"daily_quota": 0}, {"upload_timeout_s": -1}):
            with pytest.raises(InvalidArgument):
                await opened(tmp_path / "x", **bad)

    run(main())


def test_chunk_errors_are_typed_and_keep_the_upload(tmp_path):
    data = os.urandom(2 * CHUNK + 7)
    parts = chunks(data)

    async def main():
        async with await opened(tmp_path) as ms:
            uid = await ms.begin(OWNER, len(data), sha(data))
            with pytest.raises(ChunkRejected):          # too short, not the last
                await ms.put_chunk(uid, 0, parts[0][:-1])
            with pytest.raises(ChunkRejected):          # too long
                await ms.put_chunk(uid, 0, parts[0] + b"!")
            with pytest.raises(ChunkRejected):          # last chunk must be exact too
                await ms.put_chunk(uid, 2, parts[2] + b"!")
            with pytest.raises(ChunkRejected):          # index out of range
                await ms.put_chunk(uid, 3, b"x")
            with pytest.raises(WrongType):
                await ms.put_chunk(uid, -1 + 1.0, parts[0])
            with pytest.raises(InvalidArgument):
                await ms.put_chunk(uid, -1, parts[0])
            with pytest.raises(WrongType):
                await ms.put_chunk(uid, 0, "text")
            await ms.put_chunk(uid, 0, parts[0])
            await ms.put_chunk(uid, 0, bytearray(parts[0]))   # identical duplicate: fine
            with pytest.raises(ChunkRejected) as info:        # conflicting duplicate
                await ms.put_chunk(uid, 0, os.urandom(CHUNK))
            assert info.value.code == ErrorCode.BAD_CHUNK
            # concurrent identical duplicates of a chunk being written
            await asyncio.gather(ms.put_chunk(uid, 1, parts[1]),
                                 ms.put_chunk(uid, 1, parts[1]))
            with pytest.raises(UploadIncomplete) as inc:
                await ms.finish(uid)
            assert inc.value.missing == 1
            await ms.put_chunk(uid, 2, parts[2])
            assert await download(ms, await ms.finish(uid)) == data

    run(main())


def test_concurrent_upload_limit_per_owner(tmp_path):
    async def main():
        async with await opened(tmp_path, max_uploads_per_owner=2) as ms:
            a = await ms.begin(OWNER, 10, sha(b"0" * 10))
            await ms.begin(OWNER, 10, sha(b""))
            with pytest.raises(RateLimited) as info:
                await ms.begin(OWNER, 10, sha(b""))
            assert info.value.code == ErrorCode.RATE_LIMITED
            other = await ms.begin("bob@home.example", 10, sha(b""))  # per owner
            await ms.abort(a)
            b = await ms.begin(OWNER, 10, sha(b"1" * 10))
            await ms.put_chunk(b, 0, b"1" * 10)
            await ms.finish(b)
            c = await ms.begin(OWNER, 10, sha(b""))       # finish freed a slot too
            with pytest.raises(RateLimited):
                await ms.begin(OWNER, 10, sha(b""))
            # begins racing each other cannot overshoot
            res = await asyncio.gather(
                *[ms.begin("carol@x.example", 10, sha(b"")) for _ in range(5)],
                return_exceptions=True)
            assert sum(isinstance(r, bytes) for r in res) == 2
            assert sum(isinstance(r, RateLimited) for r in res) == 3
            for uid in (other, c):
                await ms.abort(uid)

    run(main())


def test_daily_byte_quota(tmp_path):
    clock = Clock(T0 - T0 % 86400 + 3600)  # 01:00 UTC
    data = os.urandom(3 * CHUNK)

    async def main():
        async with await opened(tmp_path, clock=clock, daily_quota=8 * CHUNK) as ms:
            await upload(ms, data)
            await upload(ms, data)                      # 6 chunks' worth used
            with pytest.raises(RateLimited):
                await ms.begin(OWNER, 3 * CHUNK, sha(data))
            await upload(ms, data, owner="bob@home.example")   # quota is per owner
            # an aborted upload gives back what it never received
            uid = await ms.begin(OWNER, 2 * CHUNK, sha(data[:2 * CHUNK]))
            await ms.put_chunk(uid, 0, data[:CHUNK])
            await ms.abort(uid)
            uid = await ms.begin(OWNER, CHUNK, sha(data[:CHUNK]))
            with pytest.raises(RateLimited):
                await ms.begin(OWNER, 1, sha(b"x"))
            await ms.abort(uid)
            clock.t += 86400                            # next UTC day
            await ms.expire()
            await upload(ms, data)

    run(main())


def test_expiry_of_blobs_and_abandoned_uploads(tmp_path):
    clock = Clock()
    old_data, new_data = os.urandom(CHUNK + 1), os.urandom(CHUNK + 2)

    async def main():
        async with await opened(tmp_path, clock=clock, ttl_s=1000,
                                upload_timeout_s=60) as ms:
            old = await upload(ms, old_data)
            clock.t += 500
            new = await upload(ms, new_data)
            idle = await ms.begin(OWNER, 2 * CHUNK, sha(b""))
            busy = await ms.begin(OWNER, 2 * CHUNK, sha(b""))
            clock.t += 50
            await ms.put_chunk(busy, 0, bytes(CHUNK))     # activity resets the timeout
            clock.t += 20
            assert await ms.expire(clock.t) == 1          # only the idle upload
            with pytest.raises(UnknownUpload):
                await ms.put_chunk(idle, 0, bytes(CHUNK))
            await ms.put_chunk(busy, 1, bytes(CHUNK))
            assert len(os.listdir(tmp_path / "tmp")) == 1
            # idle for 60 s since its last chunk (T0 + 570): the busy upload goes,
            # both blobs stay
            assert await ms.expire(T0 + 629) == 0
            assert await ms.expire(T0 + 999) == 1
            assert ms.stats()["blobs"] == 2 and ms.stats()["uploads"] == 0
            assert await ms.expire(T0 + 1000) == 1        # old blob, 1000 s after storing
            with pytest.raises(UnknownBlob):
                await ms.read_chunk(old, 0)
            assert await download(ms, new) == new_data
            clock.t = T0 + 2000
            assert await ms.expire() == 1                 # the new blob
            assert files_under(tmp_path) == []
            assert ms.stats() == {"blobs": 0, "blob_bytes": 0, "uploads": 0,
                                  "uploaders": 0}

    run(main())


def test_restart_discards_partial_uploads_but_keeps_blobs(tmp_path):
    clock = Clock()
    data = os.urandom(4 * CHUNK + 9)

    async def main():
        ms = await opened(tmp_path, clock=clock, ttl_s=1000)
        blob_id = await upload(ms, data)
        uid = await ms.begin(OWNER, 3 * CHUNK, sha(b""))
        await ms.put_chunk(uid, 1, bytes(CHUNK))
        await ms.close()
        await ms.close()  # idempotent
        with pytest.raises(StoreFailed):
            ms.stat(blob_id)
        # a crash leaves the temporary file behind: simulate one
        (tmp_path / "tmp" / "deadbeef.part").write_bytes(b"partial")
        ms = await opened(tmp_path, clock=clock, ttl_s=1000)
        try:
            assert not os.listdir(tmp_path / "tmp")
            with pytest.raises(UnknownUpload):
                await ms.put_chunk(uid, 0, bytes(CHUNK))
            assert ms.stat(blob_id) == (len(data), 5)
            assert await download(ms, blob_id) == data
            # the blob's age survived the restart
            assert await ms.expire(T0 + 1000) == 1
        finally:
            await ms.close()

    run(main())


def test_no_owner_on_disk(tmp_path):
    data = os.urandom(3 * CHUNK + 1)

    async def main():
        async with await opened(tmp_path) as ms:
            await upload(ms, data)
            uid = await ms.begin(OWNER, 2 * CHUNK, sha(b""))   # one in progress too
            await ms.put_chunk(uid, 0, bytes(CHUNK))
            needles = [OWNER.encode(), OWNER.encode("utf-16-le"), b"alice"]
            found = []
            for dirpath, dirnames, names in os.walk(tmp_path):
                for name in dirnames + names:
                    if "alice" in name:
                        found.append(name)
                for name in names:
                    with open(os.path.join(dirpath, name), "rb") as fh:
                        content = fh.read()
                    found.extend(n for n in needles if n in content)
            assert found == []
            assert OWNER not in repr(ms) and OWNER not in str(ms.stats())

    run(main())


def test_errors_are_typed_fastroute_errors():
    for cls in (UnknownBlob, UnknownUpload, ChunkRejected, BlobMismatch, UploadIncomplete):
        assert issubclass(cls, MediaError)
        assert issubclass(cls, FastrouteError) and issubclass(cls, ValueError)
    assert issubclass(UnknownBlob, KeyError) and issubclass(UnknownUpload, KeyError)
    assert str(UnknownBlob("no such blob")) == "no such blob"
    # each has a wire code of its own, and a code decodes to its class
    assert type(error_for_code(ErrorCode.INVALID_ARGUMENT)) is InvalidArgument
    for cls, code in ((UnknownBlob, 304), (UnknownUpload, 305), (ChunkRejected, 112),
                      (BlobMismatch, 113), (UploadIncomplete, 114)):
        assert cls.code == code and type(error_for_code(code)) is cls


def test_closed_store_refuses(tmp_path):
    async def main():
        ms = await opened(tmp_path)
        await ms.close()
        with pytest.raises(StoreFailed):
            await ms.begin(OWNER, 1, sha(b"x"))
        with pytest.raises(StoreFailed):
            await ms.expire()

    run(main())


def test_large_upload_default_chunks(tmp_path):
    # 16 MiB in 60 KiB chunks: 274 chunks, hashed once at finish
    data = os.urandom(16 * 1024 * 1024 + 17)

    async def main():
        async with await MediaStore.open(tmp_path) as ms:
            uid = await ms.begin(OWNER, len(data), sha(data))
            step = ms.chunk_size
            view = memoryview(data)
            n = -(-len(data) // step)
            for start in range(0, n, 32):           # a client pipelining 32 chunks
                await asyncio.gather(*[ms.put_chunk(uid, i, view[i * step:(i + 1) * step])
                                       for i in range(start, min(n, start + 32))])
            blob_id = await ms.finish(uid)
            assert blob_id == sha(data)
            assert ms.stat(blob_id) == (len(data), n)
            assert await ms.read_chunk(blob_id, n - 1) == data[(n - 1) * step:]

    run(main())


def test_cancelled_put_chunk_still_settles(tmp_path):
    data = os.urandom(2 * CHUNK)

    async def main():
        async with await opened(tmp_path) as ms:
            uid = await ms.begin(OWNER, len(data), sha(data))
            task = asyncio.ensure_future(ms.put_chunk(uid, 0, data[:CHUNK]))
            await asyncio.sleep(0)          # the write is now in the thread pool
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await ms.put_chunk(uid, 1, data[CHUNK:])
            # finish waits for the orphaned write, which did land
            assert await download(ms, await ms.finish(uid)) == data

    run(main())
