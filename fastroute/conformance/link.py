"""Raw protocol links for the conformance kit, written from ``docs/PROTOCOL.md``.

The kit must see what a client or a relay really puts on the wire, so it does
not use :class:`fastroute.Client` or the relay: only the Noise primitives of
``fastroute.noise`` (tested against the official vectors and an independent
implementation) and plain msgpack.  :class:`RawLink` is a device's side (for
checking a relay), :class:`ServerSide` the relay's side (for grading a
client).  Ops are plain Python lists, decoded with ``raw=False`` (bin ->
bytes, str -> str), exactly the types section 13 prescribes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack

from ..noise import PROLOGUE, CipherState, HandshakeState, KeyPair, frame

__all__ = ["Closed", "RawLink", "ServerSide", "pack", "frame_of", "decode_ops", "split_ops"]

SEND, DACK, PING, BYE, CONSENT, MBEGIN, MCHUNK, MFINISH, MGET = range(1, 10)
WELCOME, SACK, DELIVER, ERROR, PONG, SERVER_BYE, MREPLY = range(16, 23)
FEATURES, FEATURES_OK = 10, 23  # section 14.2
KEYS_SET, KEYS_ADD, DEVICES, BUNDLES, DSEND = range(1000, 1005)  # feature "e2ee", 17
REPLY, DDELIVER, EVENT = range(2000, 2003)
GCREATE, GADD, GANSWER, GREMOVE, GLEAVE, GADMIN, GMEMBERS, GSEND = range(1100, 1108)  # 18
GDELIVER, GEVENT = 2100, 2101
BLOCK, BLOCKS, REPORT = range(1200, 1203)  # feature "safety", 19


def pack(obj: Any) -> bytes:
    """msgpack with bin for bytes and str for str (section 13)."""
    return msgpack.packb(obj, use_bin_type=True)


def frame_of(packed_ops: list[bytes]) -> bytes:
    """The plaintext of one transport frame: an array of already packed ops."""
    n = len(packed_ops)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return head + b"".join(packed_ops)


def decode_ops(plaintext: bytes) -> list:
    """A frame's ops; anything that is not a list of lists comes back as is."""
    ops = msgpack.unpackb(plaintext, raw=False, strict_map_key=False)
    return ops if isinstance(ops, list) else [ops]


def split_ops(plaintext: bytes) -> list[tuple[Any, bytes]]:
    """A frame's ops, each with its own bytes as the relay encoded it (for checks
    that compare answers byte for byte); raises as :func:`decode_ops` does."""
    up = msgpack.Unpacker(raw=False, strict_map_key=False)
    up.feed(plaintext)
    try:
        n = up.read_array_header()
    except Exception:  # noqa: BLE001 - not an array: decoded (or refused) as a whole
        return [(op, plaintext) for op in decode_ops(plaintext)]
    out = []
    pos = up.tell()
    for _ in range(n):
        op = up.unpack()
        out.append((op, plaintext[pos:up.tell()]))
        pos = up.tell()
    if pos != len(plaintext):
        raise msgpack.ExtraData(out, plaintext[pos:])
    return out


class Closed(Exception):
    """The peer closed the link; ``bye`` is the SERVER_BYE ``(code, reason)`` if one came."""

    def __init__(self, bye: tuple[int, str] | None) -> None:
        super().__init__(f"link closed ({'SERVER_BYE %d' % bye[0] if bye else 'no SERVER_BYE'})")
        self.bye = bye


class _Frames:
    """Length-prefixed frames over asyncio streams (section 3)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes | None:
        try:
            head = await self.reader.readexactly(2)
            return await self.reader.readexactly(int.from_bytes(head, "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def write(self, msg: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(frame(msg))

    def abort(self) -> None:
        transport = self.writer.transport
        if transport is not None:
            transport.abort()


class RawLink:
    """A device's link to a relay, op by op.

    :meth:`open` runs the XX handshake with whatever client hello it is
    given (so refusals can be provoked), then a background task decrypts
    every relay frame into :attr:`ops`.  ``closed`` is set at EOF; ``bye``
    holds the SERVER_BYE ``(code, reason)`` if one arrived; ``silent`` is
    True when the relay closed without sending a single transport frame.
    """

    def __init__(self, frames: _Frames, tx: CipherState, rx: CipherState,
                 remote_static: bytes, server_hello: Any) -> None:
        self._frames = frames
        self._tx = tx
        self._rx = rx
        self.remote_static = remote_static
        self.server_hello = server_hello
        self.ops: list[list] = []
        self.raw: list[bytes] = []  # each op's bytes, in step with ``ops``
        self.bye: tuple[int, str] | None = None
        self.frames_in = 0
        self.closed = asyncio.Event()
        self._news = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    @classmethod
    async def open(cls, host: str, port: int, static: KeyPair, hello: bytes, *,
                   timeout: float = 5.0, msg3_tamper: bool = False) -> RawLink:
        """Connect and run the handshake; ``hello`` is msg3's payload as sent."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        frames = _Frames(reader, writer)
        try:
            hs = HandshakeState(initiator=True, static=static, prologue=PROLOGUE)
            frames.write(hs.write_message(b""))
            msg2 = await asyncio.wait_for(frames.read(), timeout)
            if msg2 is None:
                raise Closed(None)
            payload = hs.read_message(msg2)
            hello_obj = msgpack.unpackb(payload, raw=False)
            msg3 = hs.write_message(hello)
            if msg3_tamper:
                msg3 = msg3[:-1] + bytes([msg3[-1] ^ 1])
            frames.write(msg3)
            tx, rx = hs.split()
            remote = hs.remote_static
            assert remote is not None
        except BaseException:
            frames.abort()
            raise
        return cls(frames, tx, rx, remote, hello_obj)

    async def _pump(self) -> None:
        try:
            while True:
                msg = await self._frames.read()
                if msg is None:
                    return
                try:
                    plaintext = self._rx.decrypt(msg)
                    ops = split_ops(plaintext)
                except Exception:
                    return  # section 4.3: fatal, without a reply (or not msgpack: broken)
                self.frames_in += 1
                for op, raw in ops:
                    self.raw.append(raw)
                    self.ops.append(op)
                    if isinstance(op, list) and op and op[0] == SERVER_BYE and len(op) == 3:
                        self.bye = (op[1], op[2])
                self._news.set()
        finally:
            self.closed.set()
            self._news.set()
            self._frames.abort()

    @property
    def silent(self) -> bool:
        """The relay closed without a single transport frame (section 4.4)."""
        return self.closed.is_set() and self.frames_in == 0

    def send(self, *ops: Any) -> None:
        """Pack ``ops`` into one frame and send it (an op need not be a list)."""
        self.send_plain(frame_of([pack(list(op) if isinstance(op, tuple) else op)
                                  for op in ops]))

    def send_plain(self, plaintext: bytes) -> None:
        """Send one frame whose plaintext is given byte for byte."""
        self._frames.write(self._tx.encrypt(plaintext))

    async def wait(self, pred, timeout: float = 3.0, after: int = 0) -> list | None:
        """The first op from index ``after`` on (default: the link's start) matching
        ``pred``, or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = after
        while True:
            for op in self.ops[seen:]:
                if isinstance(op, list) and op and pred(op):
                    return op
            seen = len(self.ops)
            if self.closed.is_set():
                return None
            left = deadline - loop.time()
            if left <= 0:
                return None
            self._news.clear()
            try:
                await asyncio.wait_for(self._news.wait(), left)
            except asyncio.TimeoutError:
                return None

    async def op(self, opcode: int, key: Any = None, *, timeout: float = 3.0,
                 after: int = 0) -> list | None:
        """The first op ``opcode`` (whose field 1 equals ``key`` if given)."""
        return await self.wait(lambda o: o[0] == opcode and (key is None or (
            len(o) > 1 and o[1] == key)), timeout, after)

    async def until_closed(self, timeout: float = 3.0) -> bool:
        """True if the relay closed the link within ``timeout``."""
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Drop the TCP connection (no BYE) and wait for the reader to stop."""
        self._frames.abort()
        await asyncio.gather(self._task, return_exceptions=True)


class ServerSide:
    """The relay's side of one accepted connection, for grading a client.

    :meth:`handshake` runs XX as responder with the given relay key and
    returns msg1's and msg3's payloads (or None if the client closed before
    msg3).  Afterwards :meth:`send` writes frames and :meth:`pump` hands
    every decrypted client frame's ops to a callback.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._frames = _Frames(reader, writer)
        self._tx: CipherState | None = None
        self._rx: CipherState | None = None
        self.remote_static: bytes | None = None
        self.msg1_len = -1

    async def handshake(self, key: KeyPair, server_hello: bytes,
                        timeout: float) -> tuple[bytes, bytes] | None:
        """Run the handshake; ``(msg1 payload, msg3 payload)`` or None if msg3 never came."""
        hs = HandshakeState(initiator=False, static=key, prologue=PROLOGUE)
        msg1 = await asyncio.wait_for(self._frames.read(), timeout)
        if msg1 is None:
            return None
        self.msg1_len = len(msg1)
        p1 = hs.read_message(msg1)
        self._frames.write(hs.write_message(server_hello))
        try:
            msg3 = await asyncio.wait_for(self._frames.read(), timeout)
        except asyncio.TimeoutError:
            return None
        if msg3 is None:
            return None
        p3 = hs.read_message(msg3)
        self.remote_static = hs.remote_static
        self._tx, self._rx = hs.split()  # (send, receive) for this side
        return p1, p3

    def send_plain(self, plaintext: bytes) -> None:
        """Send one transport frame."""
        assert self._tx is not None
        self._frames.write(self._tx.encrypt(plaintext))

    def send(self, packed_ops: list[bytes]) -> None:
        """Send already packed ops as one frame."""
        self.send_plain(frame_of(packed_ops))

    async def pump(self, on_ops) -> None:
        """Call ``on_ops(ops)`` per client frame until the connection ends."""
        assert self._rx is not None
        while True:
            msg = await self._frames.read()
            if msg is None:
                return
            try:
                ops = decode_ops(self._rx.decrypt(msg))
            except Exception:
                on_ops(None)  # undecryptable or not msgpack: recorded as garbage
                continue
            on_ops(ops)

    def abort(self) -> None:
        """Drop the TCP connection at once."""
        self._frames.abort()
