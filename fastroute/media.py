"""The relay's content-addressed media store for attachments.

Attachments travel out of band: the client encrypts the file itself (the
relay never sees plaintext), uploads the ciphertext in chunks, gets back a
*blob id* (the SHA-256 of the ciphertext, 32 bytes) and sends only that
reference, with the key, inside its end-to-end encrypted message body.

Layout under ``root``::

    root/blobs/ab/cd/abcd...(64 hex)   finished blobs, named by their SHA-256
    root/tmp/<upload id hex>.part      uploads in progress (sparse files)

A finished blob is written to its temporary file, fsynced, and moved into
place with an atomic rename (then the directory is fsynced), so a blob file
either does not exist or is complete and matches its name.  The file's
modification time is the time it was last stored (a repeated upload of the
same content refreshes it); :meth:`MediaStore.expire` deletes blobs older
than ``ttl_s``.  Uploads in progress live only in memory plus their temporary
file; :meth:`MediaStore.open` empties ``root/tmp``, so a restart discards them.

Privacy: the ``owner`` passed to :meth:`MediaStore.begin` (the relay passes
the uploading address) serves only the per-owner limits.  It is never written
to disk, and in memory the store keeps only a keyed hash of it (the key is
random per process), dropped once the owner has no upload in progress and its
daily quota window has passed.

Every coroutine is meant to be awaited on the event loop the store was opened
on; file I/O runs in the store's own small thread pool, never on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import hmac
import os
import shutil
import time
from typing import Callable

from ._args import check_bytes, check_int, check_str
from .errors import (  # noqa: F401 - the media errors are re-exported here
    BlobMismatch,
    BodyTooLarge,
    ChunkRejected,
    FastrouteError,
    InvalidArgument,
    MediaError,
    RateLimited,
    StoreFailed,
    StoreFull,
    UnknownBlob,
    UnknownUpload,
    UploadIncomplete,
    WrongType,
)

__all__ = [
    "MediaStore",
    "MediaError",
    "UnknownBlob",
    "UnknownUpload",
    "ChunkRejected",
    "BlobMismatch",
    "UploadIncomplete",
    "DEFAULT_MAX_BLOB",
    "DEFAULT_CHUNK_SIZE",
    "BLOB_ID_LEN",
    "UPLOAD_ID_LEN",
]

#: Largest blob accepted by default, in bytes (100 MiB).
DEFAULT_MAX_BLOB = 100 * 1024 * 1024
#: Default chunk size: fits one transport frame with room for the op's headers.
DEFAULT_CHUNK_SIZE = 60 * 1024
#: A blob id is the SHA-256 of the blob's bytes.
BLOB_ID_LEN = 32
#: An upload id is 16 random bytes.
UPLOAD_ID_LEN = 16

_DAY_S = 86400
_HASH_BLOCK = 1 << 20
_HEX = frozenset("0123456789abcdef")


def _closed_error() -> FastrouteError:
    return StoreFailed("media store is closed")


def _io_error(what: str, exc: OSError) -> FastrouteError:
    # errno names only: never a path or a byte of content
    name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return StoreFailed(f"media {what} failed: {name}")


# -- argument checks (the shared ones are fastroute._args) ----------------------


def _check_pos(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WrongType(f"{what} must be a number, not {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise InvalidArgument(f"{what} must be a positive finite number")
    return value


# -- blocking helpers (run in the store's thread pool) ------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _pread_exact(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while length > 0:
            part = os.pread(fd, length, offset)
            if not part:
                raise OSError(errno.EIO, "short read")
            parts.append(part)
            offset += len(part)
            length -= len(part)
        return b"".join(parts) if len(parts) != 1 else parts[0]
    finally:
        os.close(fd)


def _create_sparse(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _write_chunk(path: str, offset: int, data: bytes) -> None:
    # no O_CREAT: a write racing an abort must not bring the file back
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        _pwrite_all(fd, data, offset)
    finally:
        os.close(fd)


def _hash_file(path: str) -> tuple[int, bytes]:
    """Stream ``path`` once through SHA-256: ``(size, digest)``."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            size += n
    return size, h.digest()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        _unlink_quiet(path)


class _Upload:
    __slots__ = ("uid", "owner_key", "size", "sha256", "n_chunks", "state", "done",
                 "received", "pending", "path", "last", "day")

    def __init__(self, uid: bytes, owner_key: bytes, size: int, sha256: bytes,
                 n_chunks: int, path: str, now: float, day: int) -> None:
        self.uid = uid
        self.owner_key = owner_key
        self.size = size
        self.sha256 = sha256
        self.n_chunks = n_chunks
        self.state = bytearray(n_chunks)  # 0 missing, 1 being written, 2 written
        self.done = 0                     # chunks in state 2
        self.received = 0                 # bytes in state 2
        self.pending: dict[int, asyncio.Future] = {}
        self.path = path
        self.last = now                   # last activity, for the abandon timeout
        self.day = day                    # quota day the size was charged to


_MISSING, _WRITING, _WRITTEN = 0, 1, 2


class MediaStore:
    """Content-addressed, chunked store of client-encrypted attachment blobs.

    Open with :meth:`open`.  An upload goes ``begin`` → ``put_chunk`` (any
    order, retries allowed) → ``finish`` (or ``abort``); a download is
    ``stat`` then ``read_chunk`` for each index.  Chunks are exactly
    ``chunk_size`` bytes except the last one, which holds the remainder.

    Limits (keyword arguments of :meth:`open`): ``max_blob`` bytes per blob;
    ``chunk_size``; ``max_uploads_per_owner`` uploads in progress at once;
    ``ttl_s`` seconds a blob is kept after it was last stored;
    ``upload_timeout_s`` seconds without a chunk after which an upload counts
    as abandoned; ``daily_quota`` bytes an owner may declare per UTC day
    (``None``: unlimited).  The quota is charged with the declared size at
    ``begin``; an abort or timeout gives back the bytes never received, a
    failed ``finish`` gives back nothing.

    ``clock`` (seconds, default :func:`time.time`) stamps uploads, blobs and
    quota days; tests inject their own.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, root: str, *, max_blob: int,
                 chunk_size: int, max_uploads_per_owner: int, ttl_s: float,
                 upload_timeout_s: float, daily_quota: int | None,
                 clock: Callable[[], float], io_threads: int) -> None:
        self._loop = loop
        self._root = root
        self._blobs = os.path.join(root, "blobs")
        self._tmp = os.path.join(root, "tmp")
        self.max_blob = max_blob
        self.chunk_size = chunk_size
        self.max_uploads_per_owner = max_uploads_per_owner
        self.ttl_s = ttl_s
        self.upload_timeout_s = upload_timeout_s
        self.daily_quota = daily_quota
        self._clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=io_threads, thread_name_prefix="fastroute-media")
        self._salt = os.urandom(32)
        self._closed = False
        #: budget of blobs + uploads in progress, and free bytes to leave on the disk
        self.max_bytes: int | None = None
        self.disk_reserve = 0
        self._index: dict[bytes, int] = {}          # blob id -> size
        self._bytes = 0                             # sum of the index's sizes
        self._uploads: dict[bytes, _Upload] = {}    # uploads accepting chunks
        self._active: dict[bytes, int] = {}         # owner key -> uploads in progress
        self._quota: dict[bytes, list] = {}         # owner key -> [day, bytes charged]
        # serialises the steps that create, refresh or delete a blob file, so
        # that expire() never deletes a blob a concurrent finish() just refreshed
        self._commit_lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------

    @classmethod
    async def open(cls, root: str | os.PathLike, *, max_blob: int = DEFAULT_MAX_BLOB,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, max_uploads_per_owner: int = 4,
                   ttl_s: float = 30 * _DAY_S, upload_timeout_s: float = 600.0,
                   daily_quota: int | None = None,
                   clock: Callable[[], float] = time.time,
                   io_threads: int = 4, max_bytes: int | None = None,
                   disk_reserve: int = 0) -> "MediaStore":
        """Open (creating if needed) the store in directory ``root``.

        ``max_bytes``: the most all blobs and uploads in progress (at their
        declared sizes) may take (``None``: no budget of its own);
        ``disk_reserve``: bytes an upload must leave free on ``root``'s
        filesystem, which the message store shares (attachments must not
        starve messages).  Either refuses ``begin`` with
        :class:`~fastroute.errors.StoreFull`.

        Empties ``root/tmp`` (uploads interrupted by a restart are gone) and
        indexes the blobs already stored.  Raises ``STORE_FAILED`` if the
        directory cannot be used.
        """
        loop = asyncio.get_running_loop()
        if not isinstance(root, (str, os.PathLike)):
            raise WrongType(f"root must be a str or path, not {type(root).__name__}")
        root = os.fspath(root)
        if not root:
            raise InvalidArgument("root must name a directory")
        max_blob = check_int(max_blob, "max_blob", 1)
        chunk_size = check_int(chunk_size, "chunk_size", 1)
        max_uploads_per_owner = check_int(max_uploads_per_owner, "max_uploads_per_owner", 1)
        ttl_s = _check_pos(ttl_s, "ttl_s")
        upload_timeout_s = _check_pos(upload_timeout_s, "upload_timeout_s")
        if daily_quota is not None:
            daily_quota = check_int(daily_quota, "daily_quota", 1)
        if not callable(clock):
            raise WrongType("clock must be callable")
        io_threads = check_int(io_threads, "io_threads", 1)
        if max_bytes is not None:
            max_bytes = check_int(max_bytes, "max_bytes", 1)
        disk_reserve = check_int(disk_reserve, "disk_reserve", 0)
        self = cls(loop, root, max_blob=max_blob, chunk_size=chunk_size,
                   max_uploads_per_owner=max_uploads_per_owner, ttl_s=ttl_s,
                   upload_timeout_s=upload_timeout_s, daily_quota=daily_quota,
                   clock=clock, io_threads=io_threads)
        self.max_bytes = max_bytes
        self.disk_reserve = disk_reserve
        try:
            self._index = await loop.run_in_executor(self._pool, self._open_sync)
            self._bytes = sum(self._index.values())
        except BaseException as exc:
            self._closed = True
            self._pool.shutdown(wait=False)
            if isinstance(exc, OSError):
                raise _io_error("open", exc) from None
            raise
        return self

    def _open_sync(self) -> dict[bytes, int]:
        os.makedirs(self._root, mode=0o700, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        os.makedirs(self._tmp, mode=0o700, exist_ok=True)
        os.makedirs(self._blobs, mode=0o700, exist_ok=True)
        index: dict[bytes, int] = {}
        for d1 in os.scandir(self._blobs):
            if not d1.is_dir(follow_symlinks=False):
                continue
            for d2 in os.scandir(d1.path):
                if not d2.is_dir(follow_symlinks=False):
                    continue
                for f in os.scandir(d2.path):
                    name = f.name
                    if (len(name) == 2 * BLOB_ID_LEN and _HEX.issuperset(name)
                            and name[:2] == d1.name and name[2:4] == d2.name
                            and f.is_file(follow_symlinks=False)):
                        index[bytes.fromhex(name)] = f.stat(follow_symlinks=False).st_size
        return index

    async def close(self) -> None:
        """Discard uploads in progress, wait for pending I/O and stop the threads.

        Idempotent.  Blobs stay on disk for the next :meth:`open`.
        """
        if self._closed:
            return
        self._closed = True
        uploads = list(self._uploads.values())
        self._uploads.clear()
        self._active.clear()
        self._quota.clear()
        try:
            await self._loop.run_in_executor(
                self._pool, _unlink_all, [up.path for up in uploads])
        except OSError:
            pass  # open() empties tmp anyway
        finally:
            await self._loop.run_in_executor(None, self._pool.shutdown, True)

    async def __aenter__(self) -> "MediaStore":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # -- internals ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise _closed_error()

    def _submit(self, fn, *args) -> asyncio.Future:
        try:
            return self._loop.run_in_executor(self._pool, fn, *args)
        except RuntimeError:
            if self._closed:  # the pool is already shut down
                raise _closed_error() from None
            raise

    async def _run(self, fn, *args):
        return await self._submit(fn, *args)

    @staticmethod
    def _chunk_written(up: _Upload, index: int, nbytes: int, work: asyncio.Future,
                       done: asyncio.Future) -> None:
        exc = work.exception() if not work.cancelled() else StoreFailed("write cancelled")
        del up.pending[index]
        if exc is None:
            up.state[index] = _WRITTEN
            up.done += 1
            up.received += nbytes
        else:
            up.state[index] = _MISSING
        # waiters get the outcome as a value: nobody has to retrieve an exception
        done.set_result(exc)

    def _owner_key(self, owner: object) -> bytes:
        raw = check_str(owner, "owner", nonempty=True).encode("utf-8", "surrogatepass")
        return hashlib.blake2b(raw, key=self._salt, digest_size=16).digest()

    def _blob_path(self, blob_id: bytes) -> str:
        h = blob_id.hex()
        return os.path.join(self._blobs, h[:2], h[2:4], h)

    def _n_chunks(self, size: int) -> int:
        return -(-size // self.chunk_size)

    def _chunk_len(self, size: int, index: int) -> int:
        return min(self.chunk_size, size - index * self.chunk_size)

    def _upload(self, upload_id: object) -> _Upload:
        uid = check_bytes(upload_id, "upload_id", UPLOAD_ID_LEN)
        up = self._uploads.get(uid)
        if up is None:
            raise UnknownUpload("no such upload in progress")
        return up

    def _release(self, up: _Upload, refund: bool) -> None:
        """Forget ``up`` for the owner limits (the upload left the table)."""
        key = up.owner_key
        n = self._active.get(key, 0) - 1
        if n > 0:
            self._active[key] = n
        else:
            self._active.pop(key, None)
        if refund:
            entry = self._quota.get(key)
            if entry is not None and entry[0] == up.day:
                entry[1] = max(0, entry[1] - (up.size - up.received))

    # -- uploads ------------------------------------------------------------------

    async def begin(self, owner: str, size: int, sha256: bytes) -> bytes:
        """Start an upload of ``size`` bytes whose SHA-256 is ``sha256``; return its id.

        The id is 16 random bytes.  Refused with ``BodyTooLarge`` above
        ``max_blob`` and with ``RateLimited`` when ``owner`` already has
        ``max_uploads_per_owner`` uploads in progress or its daily quota
        would be exceeded.
        """
        self._check_open()
        key = self._owner_key(owner)
        size = check_int(size, "size", 1)
        sha256 = check_bytes(sha256, "sha256", BLOB_ID_LEN)
        if size > self.max_blob:
            raise BodyTooLarge(f"blob of {size} bytes exceeds the limit of {self.max_blob}")
        if self._active.get(key, 0) >= self.max_uploads_per_owner:
            raise RateLimited(
                f"too many uploads in progress (limit {self.max_uploads_per_owner})")
        self._check_space(size)
        now = self._clock()
        day = int(now // _DAY_S)
        entry = None
        if self.daily_quota is not None:
            entry = self._quota.get(key)
            if entry is None or entry[0] != day:
                entry = [day, 0]
            if entry[1] + size > self.daily_quota:
                raise RateLimited("daily media quota exhausted")
        uid = os.urandom(UPLOAD_ID_LEN)
        path = os.path.join(self._tmp, uid.hex() + ".part")
        # reserve the slot before the await, so concurrent begins see it
        self._active[key] = self._active.get(key, 0) + 1
        if entry is not None:
            entry[1] += size
            self._quota[key] = entry
        up = _Upload(uid, key, size, sha256, self._n_chunks(size), path, now, day)
        try:
            await self._run(_create_sparse, path, size)
        except BaseException as exc:
            self._release(up, refund=True)
            if isinstance(exc, OSError):
                raise _io_error("upload", exc) from None
            raise
        if self._closed:  # closed while the file was being created
            _unlink_quiet(path)
            raise _closed_error()
        self._uploads[uid] = up
        return uid

    def _check_space(self, size: int) -> None:
        """Refuse an upload that would pass the budget or eat the disk's reserve."""
        if self.max_bytes is None and not self.disk_reserve:
            return
        # uploads in progress hold their declared size (sparse files fill up)
        pending = sum(up.size for up in self._uploads.values())
        if self.max_bytes is not None and self._bytes + pending + size > self.max_bytes:
            raise StoreFull("media store full: its budget is used up")
        if self.disk_reserve:
            try:
                st = os.statvfs(self._root)
            except OSError as exc:
                raise _io_error("space check", exc) from None
            if st.f_bavail * st.f_frsize - pending - size < self.disk_reserve:
                raise StoreFull("media store full: the disk's reserve for messages is reached")

    async def put_chunk(self, upload_id: bytes, index: int, data: bytes) -> None:
        """Store chunk ``index`` of an upload.

        Chunks may come in any order.  Each is exactly ``chunk_size`` bytes
        except the last.  Sending a chunk again is harmless if it is
        identical, and refused (``ChunkRejected``) if it differs.
        """
        self._check_open()
        up = self._upload(upload_id)
        index = check_int(index, "index", 0)
        data = check_bytes(data, "chunk data")
        if index >= up.n_chunks:
            raise ChunkRejected(f"chunk index {index} out of range (upload has "
                                f"{up.n_chunks} chunks)")
        want = self._chunk_len(up.size, index)
        if len(data) != want:
            raise ChunkRejected(f"chunk {index} must be {want} bytes, not {len(data)}")
        up.last = self._clock()
        offset = index * self.chunk_size
        state = up.state[index]
        if state == _MISSING:
            done = self._loop.create_future()
            work = self._submit(_write_chunk, up.path, offset, data)
            up.state[index] = _WRITING
            up.pending[index] = done
            # settled by a callback, not by this task: if the caller is
            # cancelled, the chunk stays "being written" until the write ends
            work.add_done_callback(
                lambda w: self._chunk_written(up, index, want, w, done))
            exc = await asyncio.shield(done)
            if isinstance(exc, FileNotFoundError):
                raise UnknownUpload("upload was aborted")
            if isinstance(exc, OSError):
                raise _io_error("write", exc)
            if exc is not None:
                raise exc
            if self._uploads.get(up.uid) is not up:
                raise UnknownUpload("upload was aborted")
            return
        if state == _WRITING:
            await asyncio.shield(up.pending[index])
            if up.state[index] != _WRITTEN:  # the first write failed: try ours
                await self.put_chunk(up.uid, index, data)
                return
        # a duplicate of a written chunk: compare with what is on disk
        try:
            old = await self._run(_pread_exact, up.path, offset, want)
        except FileNotFoundError:
            raise UnknownUpload("upload was aborted") from None
        except OSError as exc:
            raise _io_error("read", exc) from None
        if old != data:
            raise ChunkRejected(f"chunk {index} differs from the one received before")

    async def finish(self, upload_id: bytes) -> bytes:
        """Verify the assembled upload and store it; return the blob id (its SHA-256).

        Raises ``UploadIncomplete`` (upload kept) if chunks are missing.  If
        the size or SHA-256 differs from what ``begin`` declared, raises
        ``BlobMismatch``: the upload is discarded and nothing is left on
        disk.  If the same content is already stored, that blob's expiry is
        refreshed and the upload is dropped.
        """
        self._check_open()
        up = self._upload(upload_id)
        while up.pending:
            await asyncio.gather(*[asyncio.shield(f) for f in up.pending.values()])
        if self._uploads.get(up.uid) is not up:
            raise UnknownUpload("upload was aborted")
        if up.done != up.n_chunks:
            missing = up.n_chunks - up.done
            raise UploadIncomplete(f"{missing} of {up.n_chunks} chunks missing",
                                   missing=missing)
        # From here on the upload takes no more chunks, aborts or finishes;
        # it still counts against its owner until it is settled.
        del self._uploads[up.uid]
        try:
            return await self._finish(up)
        finally:
            self._release(up, refund=False)

    async def _finish(self, up: _Upload) -> bytes:
        renamed = False
        try:
            try:
                size, digest = await self._run(_hash_file, up.path)
            except OSError as exc:
                raise _io_error("read", exc) from None
            if size != up.size:
                raise BlobMismatch(f"upload is {size} bytes, {up.size} were declared")
            if not hmac.compare_digest(digest, up.sha256):
                raise BlobMismatch("upload does not match its declared SHA-256")
            blob_id = digest
            synced = False
            if blob_id not in self._index:
                # fsync outside the lock: it can take a while for a big blob
                await self._run(_fsync_file, up.path)
                synced = True
            async with self._commit_lock:
                self._check_open()
                now = self._clock()
                if blob_id in self._index:
                    await self._run(self._refresh_sync, self._blob_path(blob_id), now)
                else:
                    renamed = True  # from here on, the temporary file may be gone
                    await self._run(self._commit_sync, up.path, blob_id, now, synced)
                    self._index[blob_id] = size
                    self._bytes += size
            return blob_id
        except OSError as exc:
            raise _io_error("commit", exc) from None
        finally:
            if not renamed:
                try:
                    await self._run(_unlink_quiet, up.path)
                except FastrouteError:
                    pass  # closed meanwhile: open() empties tmp

    def _refresh_sync(self, path: str, now: float) -> None:
        os.utime(path, (now, now))
        # no fsync: losing a refresh in a crash only shortens the blob's life

    def _commit_sync(self, tmp: str, blob_id: bytes, now: float, synced: bool) -> None:
        if not synced:
            _fsync_file(tmp)
        os.utime(tmp, (now, now))
        final = self._blob_path(blob_id)
        d2 = os.path.dirname(final)
        d1 = os.path.dirname(d2)
        new_d1 = not os.path.isdir(d1)
        new_d2 = new_d1 or not os.path.isdir(d2)
        os.makedirs(d2, mode=0o700, exist_ok=True)
        os.replace(tmp, final)
        _fsync_dir(d2)
        if new_d2:
            _fsync_dir(d1)
        if new_d1:
            _fsync_dir(self._blobs)

    async def abort(self, upload_id: bytes) -> None:
        """Discard an upload in progress and its temporary file.

        Raises ``UnknownUpload`` if there is no such upload (already finished,
        aborted or timed out).  The owner's quota gets back the bytes never
        received.
        """
        self._check_open()
        up = self._upload(upload_id)
        await self._discard(up)

    async def _discard(self, up: _Upload) -> None:
        del self._uploads[up.uid]
        self._release(up, refund=True)
        try:
            await self._run(_unlink_quiet, up.path)
        except OSError as exc:
            raise _io_error("abort", exc) from None

    # -- downloads ----------------------------------------------------------------

    def stat(self, blob_id: bytes) -> tuple[int, int]:
        """``(size, n_chunks)`` of a stored blob; ``UnknownBlob`` if there is none.

        Answers from memory, without I/O.
        """
        self._check_open()
        blob_id = check_bytes(blob_id, "blob_id", BLOB_ID_LEN)
        size = self._index.get(blob_id)
        if size is None:
            raise UnknownBlob("no such blob")
        return size, self._n_chunks(size)

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._index

    async def read_chunk(self, blob_id: bytes, index: int) -> bytes:
        """Chunk ``index`` of a stored blob (``chunk_size`` bytes, the last one shorter)."""
        blob_id = check_bytes(blob_id, "blob_id", BLOB_ID_LEN)
        size, n = self.stat(blob_id)
        index = check_int(index, "index", 0)
        if index >= n:
            raise ChunkRejected(f"chunk index {index} out of range (blob has {n} chunks)")
        try:
            return await self._run(_pread_exact, self._blob_path(blob_id),
                                   index * self.chunk_size, self._chunk_len(size, index))
        except FileNotFoundError:
            raise UnknownBlob("no such blob") from None  # expired meanwhile
        except OSError as exc:
            raise _io_error("read", exc) from None

    # -- expiry -------------------------------------------------------------------

    async def expire(self, now: float | None = None) -> int:
        """Delete blobs stored more than ``ttl_s`` before ``now`` and uploads
        idle for ``upload_timeout_s``; return how many of both were removed.

        ``now`` is in seconds (default: the store's clock).  Scans the blob
        directories in the thread pool; call it every hour or so.
        """
        self._check_open()
        if now is None:
            now = self._clock()
        elif isinstance(now, bool) or not isinstance(now, (int, float)):
            raise WrongType(f"now must be a number, not {type(now).__name__}")
        removed = 0
        idle = [up for up in self._uploads.values()
                if up.last + self.upload_timeout_s <= now and not up.pending]
        for up in idle:
            if self._uploads.get(up.uid) is up:
                await self._discard(up)
                removed += 1
        today = int(now // _DAY_S)
        for key in [k for k, (day, _) in self._quota.items() if day < today]:
            del self._quota[key]
        cutoff = now - self.ttl_s
        try:
            old = await self._run(self._scan_sync, list(self._index), cutoff)
            if old:
                async with self._commit_lock:
                    gone = await self._run(self._delete_sync, old, cutoff)
                    for blob_id in gone:
                        self._bytes -= self._index.pop(blob_id, 0)
                removed += len(gone)
        except OSError as exc:
            raise _io_error("expire", exc) from None
        return removed

    def _scan_sync(self, blob_ids: list[bytes], cutoff: float) -> list[bytes]:
        old = []
        for blob_id in blob_ids:
            try:
                if os.stat(self._blob_path(blob_id)).st_mtime <= cutoff:
                    old.append(blob_id)
            except FileNotFoundError:
                old.append(blob_id)
        return old

    def _delete_sync(self, candidates: list[bytes], cutoff: float) -> list[bytes]:
        # re-checked under the commit lock: a finish() may have refreshed one
        gone = []
        for blob_id in candidates:
            path = self._blob_path(blob_id)
            try:
                if os.stat(path).st_mtime > cutoff:
                    continue
                os.unlink(path)
            except FileNotFoundError:
                pass
            gone.append(blob_id)
        return gone

    # -- metrics ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters for metrics (no personal data)."""
        return {"blobs": len(self._index), "blob_bytes": self._bytes,
                "uploads": len(self._uploads), "uploaders": len(self._active)}

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MediaStore {state} blobs={len(self._index)} uploads={len(self._uploads)}>"

