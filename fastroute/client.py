"""An asyncio client for fastroute relays, for devices and provider services.

::

    client = await Client.connect("127.0.0.1", 7474, credential=cred, static=device_key)
    await client.send("bob@other", ciphertext)          # returns once durably stored
    async for msg in client:                             # Message(seq, sender, id, body, ...)
        ...

Sends issued in the same event-loop iteration share one encrypted frame, so
``send_nowait`` in a loop is the fast path.  Delivery is at-least-once on the
link and exactly-once to the application: the client drops a message whose
id it has already received (a window of recent ids).

What the client guarantees (``README.md`` "Client guarantees"; each is a test
in ``tests/test_client_guarantees.py``):

* **Per-device FIFO of its own sends**, across any number of reconnects:
  after a reconnect every unacked send goes out again, in the order it was
  first queued, *before* any send made since; nothing is written on a new
  link before its WELCOME.
* **Reconnect forever** (``reconnect=True``) with capped, jittered
  exponential backoff after every transient failure: any close before or
  after WELCOME, a refused connection, a SERVER_BYE with a 5xx code
  (``SHUTTING_DOWN``, ``STORE_FAILED``, ...) or ``IDLE_TIMEOUT``, any
  ``OSError``/``RuntimeError`` of the transport, until :meth:`Client.close`.
  Only what the protocol calls final ends it (:data:`FATAL_CODES`: a
  credential revoked, expired or refused, a replaced session, a client the
  relay calls broken); pending sends then fail with that error.
* **Acks only for what the application took**: a DACK never covers a
  message still in the client's inbox.  A redelivery dropped as a
  duplicate is acked only once every message before it was taken, and
  messages received on an earlier link are never acked with the new link's
  numbers (the relay redelivers them; they are dropped as duplicates and
  acked once taken).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import msgpack
import time
from collections import deque
from typing import Any, AsyncIterator, NamedTuple

from . import wire
from ._compiled import twin
from .dedup import DedupTable
from .errors import (
    BlobMismatch,
    BodyTooLarge,
    ConnectionClosed,
    DeviceMismatch,
    GroupMismatch,
    ErrorCode,
    FastrouteError,
    HandshakeError,
    InvalidArgument,
    ProtocolError,
    error_for_code,
    WrongType,
)
from .noise import PROLOGUE, FrameReader, HandshakeState, KeyPair, frame, seal_frames

__all__ = ["Bundle", "Client", "DeviceMessage", "Event", "FATAL_CODES", "GroupEvent",
           "GroupMessage", "Message"]

#: SERVER_BYE codes after which a client must not reconnect (docs/PROTOCOL.md
#: 10.4): the credential was refused, revoked or expired, a newer connection
#: of the same device took over, or the relay says the client is broken
#: (bad hello, error budget spent).  Every other close is transient.
FATAL_CODES = frozenset({
    ErrorCode.MALFORMED, ErrorCode.BAD_FIELD, ErrorCode.INVALID_ARGUMENT,
    ErrorCode.AUTH_FAILED, ErrorCode.UNKNOWN_PROVIDER, ErrorCode.BAD_SIGNATURE,
    ErrorCode.KEY_MISMATCH, ErrorCode.CREDENTIAL_EXPIRED, ErrorCode.CREDENTIAL_REVOKED,
    ErrorCode.SESSION_REPLACED})


def _is_fatal(err: BaseException | None) -> bool:
    """True for a close the protocol says not to retry."""
    if not isinstance(err, FastrouteError):
        return False
    code = int(err.code)
    # an unknown 2xx (authentication) code is final by its range
    return code in FATAL_CODES or 200 <= code < 300


class Message(NamedTuple):
    """A delivered message.  ``body`` is the sender's opaque (encrypted) blob."""

    seq: int
    sender: str
    id: bytes
    body: bytes
    ts_ms: int
    ephemeral: bool


class DeviceMessage(NamedTuple):
    """A per-device copy (feature "e2ee"): ``device`` is the sending device's id,
    which the recipient needs to find its session with that device."""

    seq: int
    sender: str
    device: int
    id: bytes
    body: bytes
    ts_ms: int


class Event(NamedTuple):
    """A relay event of feature "e2ee" (``docs/PROTOCOL.md`` 17.6).

    ``kind`` 1 pool low: ``data`` is ``[pool kind, prekeys left]``; 2 device
    joined (or re-created): ``[device id, registration id]``; 3 device left:
    ``[device id]``.
    """

    seq: int
    kind: int
    data: list


class GroupMessage(NamedTuple):
    """A group message (feature "groups"): one ciphertext for every member device.

    ``group`` is the group's id, ``device`` the sending device's id (its
    sender key is the one to decrypt with).
    """

    seq: int
    group: bytes
    sender: str
    device: int
    id: bytes
    body: bytes
    ts_ms: int


class GroupEvent(NamedTuple):
    """A membership event of feature "groups" (``docs/PROTOCOL.md`` 18.6).

    ``data`` starts with ``[group id, member-device-set version, ...]``; the
    rest depends on ``kind`` (``fastroute.relay.groups.GEV_*``).
    """

    seq: int
    kind: int
    data: list


class Bundle(NamedTuple):
    """One device's prekey bundle, every key byte for byte as its device uploaded it.

    ``one_time_prekey`` is ``(id, public)`` or None when the pool was empty;
    ``kem_prekey`` is ``(id, public, signature)``, the last-resort one when
    ``kem_last_resort``.
    """

    device_id: int
    registration_id: int
    identity_key: bytes
    signed_prekey: tuple
    one_time_prekey: tuple | None
    kem_prekey: tuple
    kem_last_resort: bool


class _Batch:
    """The shared outcome of a :meth:`Client.send_many` call."""

    __slots__ = ("fut", "ids", "ops", "left")

    def __init__(self, fut: asyncio.Future, ids: list[bytes]) -> None:
        self.fut = fut
        self.ids = ids
        self.ops: list[bytes] = []  # the packed SENDs, in ids order, for resending
        self.left = len(ids)

    def done(self) -> bool:
        return self.fut.done()

    def set_result(self, _cid: bytes) -> None:
        # called for the last SACK only: _on_frame counts the others down
        if not self.fut.done():
            self.fut.set_result(self.ids)

    def set_exception(self, exc: BaseException) -> None:
        # the first refusal decides the batch; the other messages may still
        # have been stored, which their ids (in exc.ids) let the caller check
        if not self.fut.done():
            exc.ids = self.ids
            self.fut.set_exception(exc)


class _RequestBatch:
    """The shared outcome of a batch of requests answered by one REPLY each
    (:meth:`Client.send_to_devices_many`, :meth:`Client.group_send_many`).

    Every request of the batch has its own entry in ``Client._requests``,
    all pointing here; the dispatcher pops a request's entry before it
    answers it, so each is counted down once.  The future's result: each
    request's outcome in ids order (its REPLY's result, or its error).
    """

    __slots__ = ("fut", "ids", "left", "results")

    def __init__(self, fut: asyncio.Future, ids: list[bytes]) -> None:
        self.fut = fut
        self.ids = ids
        self.left = len(ids)
        self.results: dict[bytes, object] = {}

    def done(self) -> bool:
        return self.fut.done()

    def set_result(self, _result: object) -> None:
        # an accepted REPLY without a result (the compiled dispatch's): None
        self.left -= 1
        if not self.left:
            self._settle()

    def answer(self, cid: bytes, result: object) -> None:
        """Request ``cid`` was accepted with ``result``."""
        if result is not None:
            self.results[cid] = result
        self.set_result(None)

    def refuse(self, cid: bytes, exc: BaseException) -> None:
        """Request ``cid`` got ``exc`` (a refusal, or the link went down first)."""
        self.results[cid] = exc
        self.set_result(None)

    def set_exception(self, exc: BaseException) -> None:
        # no path of the client's answers a batch entry this way; should one
        # appear, the whole batch fails, with its ids to check (as _Batch)
        if not self.fut.done():
            exc.ids = self.ids  # type: ignore[attr-defined]
            self.fut.set_exception(exc)

    def _settle(self) -> None:
        if not self.fut.done():
            results = self.results
            self.fut.set_result([results.get(cid) for cid in self.ids] if results
                                else [None] * len(self.ids))


def _settle_request(entry: tuple, cid: bytes, exc: BaseException) -> None:
    """Fail one request of ``Client._requests`` (a batch's: that message only)."""
    fut = entry[0]
    if type(fut) is _RequestBatch:
        fut.refuse(cid, exc)
    elif not fut.done():
        fut.set_exception(exc)


_ID_POOL = 16 * 4096
_CLS_BYTE = (b"\x00", b"\x01")


def py_pack_sends(pool: bytes, at: int, to_packed: bytes, bodies: list, cls: int,
                  target, pending: dict | None) -> tuple[list, list]:
    """The packed SEND ops of a batch to one recipient: ``(ids, ops)``.

    Ids are consecutive 16-byte slices of ``pool`` from ``at``; ``to_packed``
    is the recipient as a packed msgpack str.  Every body is checked first;
    then ``pending[id] = target`` per message unless ``pending`` is None.
    The specification of ``_client.pxi``'s ``pack_sends``.
    """
    if cls != 0 and cls != 1:
        raise InvalidArgument("cls must be 0 or 1")
    n = len(bodies)
    if at < 0 or n > (len(pool) - at) // 16:
        raise InvalidArgument("id pool too short for the batch")
    for body in bodies:
        if type(body) is not bytes:
            raise WrongType("SEND needs id: bytes, to: str, body: bytes")
        if len(body) > wire.MAX_BODY:
            raise BodyTooLarge(f"body over {wire.MAX_BODY} bytes: send it via the media store")
    ids = [pool[i:i + 16] for i in range(at, at + 16 * n, 16)]
    cls_byte = _CLS_BYTE[cls]
    ops = [wire.pack_send(cid, to_packed, body, cls_byte) for cid, body in zip(ids, bodies)]
    if pending is not None:
        for cid in ids:
            pending[cid] = target
    return ids, ops


def py_pack_dsend(cid: bytes, to: str, entries: list | tuple, own: list | tuple,
                  room: int) -> bytes | None:
    """The one packed DSEND ``[1004, id, to, False, entries, own]`` of a message
    whose copies weigh at most ``room`` (a copy: its ciphertext's length + 16),
    else None: the caller splits them over parts.

    ``entries`` and ``own`` are lists or tuples of ``(device id, registration
    id, ciphertext)``.  The specification of ``_client.pxi``'s ``pack_dsend``,
    which packs tuples and lists of ints and bytes itself and hands any other
    shape to this function.
    """
    size = 0
    for e in entries:
        size += len(e[2]) + 16
    for e in own:
        size += len(e[2]) + 16
    if size > room:
        return None
    return wire.dsend_op(cid, to, False, entries, own)


def py_pack_dsends(pool: bytes, at: int, messages: list | tuple, room: int
                   ) -> tuple[list, list]:
    """The DSEND ops of :meth:`Client.send_to_devices_many`: ``(ids, ops)``.

    Ids are consecutive 16-byte slices of ``pool`` from ``at``, one per
    message.  A message ``(to, entries)`` or ``(to, entries, own)`` (a list or
    tuple) whose entries and own copies are lists or tuples of lists or tuples
    gets ``_pack_dsend``'s answer: its one op, or None when its copies weigh
    more than ``room``; any other message gets None too, for the caller's
    general path (which splits heavy messages and reads other shapes).  The
    specification of ``_client.pxi``'s ``pack_dsends``.
    """
    ids: list = []
    ops: list = []
    for i, m in enumerate(messages):
        cid = pool[at + 16 * i:at + 16 * i + 16]
        ids.append(cid)
        op = None
        if (type(m) is tuple or type(m) is list) and len(m) in (2, 3):
            entries = m[1]
            own = m[2] if len(m) == 3 else ()
            if wire._are_arrays(entries) and wire._are_arrays(own):
                op = _pack_dsend(cid, m[0], entries, own, room)
        ops.append(op)
    return ids, ops


def py_dispatch_frame(plaintext, addr_ok, seen, inbox, pending, batch_type, message_type,
                      client, drop_duplicate, refused, requests=None, dev_type=None,
                      group_type=None, on_reply=None):
    """Specification of ``_client.pxi``'s ``dispatch_frame``: decline the frame (None).

    The compiled twin handles a frame of SACKs and DELIVERs (given
    ``requests``, also accepted REPLYs, DDELIVERs and GDELIVERs: the answers
    to per-device sends and the copies an end-to-end encrypted client
    receives) exactly as the loop of :meth:`Client._on_frame` does and
    declines every other frame;
    declining every frame is therefore a correct (if slow) implementation,
    and the loop is the oracle ``tests/test_fastpath.py`` compares against.
    """
    return None


_pack_sends = twin(py_pack_sends)
_pack_dsend = twin(py_pack_dsend)
_pack_dsends = twin(py_pack_dsends)
_dispatch_frame = twin(py_dispatch_frame)


def _drop_duplicate(client: "Client", seq: int) -> None:
    # A DELIVER whose (sender, id) the client already received: redelivered
    # after a lost ack or a reconnect, or stored twice by a relay that lost
    # its dedup window.  Its original may still wait, untaken, in the inbox;
    # acking this seq (cumulatively) would then ack the original too.
    client.duplicates_dropped += 1
    client._covered(seq)


def _refused(target, code: int) -> None:
    # a SACK with an error code, for a future or _Batch not done yet
    target.set_exception(error_for_code(code, f"relay refused the message: "
                                              f"{_code_name(code)}"))


class _Proto(asyncio.Protocol):
    def __init__(self, client: "Client") -> None:
        self.client = client
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Queue[bytes] = asyncio.Queue()
        # open: transport keys exist (frames go to Client._on_frame);
        # ready: WELCOME arrived and the resends are queued, the client may write
        self.open = False
        self.ready = False
        self.lost = asyncio.get_running_loop().create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self.reader.feed(data)
        except ProtocolError as exc:
            self.client._link_failed(exc)
            return
        for msg in msgs:
            if self.open:
                self.client._on_frame(msg)
            else:
                self.handshake.put_nowait(msg)
        if self.client._inbox:
            self.client._wake_reader()  # once per read, not per message

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.open = False
        self.ready = False
        if not self.lost.done():
            self.lost.set_result(exc)
        self.handshake.put_nowait(b"")
        self.can_write.set()
        self.client._on_lost(self, exc)


class Client:
    """A connected device (use :meth:`connect`).

    Parameters of :meth:`connect`:

    * ``credential``: the bytes a provider issued with
      :func:`fastroute.identity.issue_credential` for this device's key;
    * ``static``: the device's X25519 :class:`~fastroute.noise.KeyPair`;
    * ``server_key``: the relay's public key to pin (recommended); without
      it any relay key is accepted on first use;
    * ``auto_ack``: ack each message when the application takes it (the
      default); with False call :meth:`ack` yourself;
    * ``reconnect``: reconnect when the link drops, forever, with jittered
      exponential backoff capped at ``reconnect_max_delay`` seconds, until
      :meth:`close` or a close in :data:`FATAL_CODES`; every send the relay
      has not acked is resent with the same id (the relay's dedup window
      makes that safe), before any newer send.  The first connection is
      :meth:`connect`'s: its failure is raised to the caller;
    * ``keepalive``: seconds between PINGs, so a device that only receives
      is not closed as idle (None: never);
    * ``dedup_window``: how many ``(sender, id)`` pairs of received messages
      are remembered to drop redeliveries (at least 1; about 64 bytes each).
    """

    def __init__(self, host: str, port: int, *, credential: bytes, static: KeyPair,
                 server_key: bytes | None = None, auto_ack: bool = True,
                 reconnect: bool = False, timeout: float = 10.0,
                 prologue: bytes = PROLOGUE, dedup_window: int = 65536,
                 keepalive: float | None = 60.0, features: tuple[str, ...] = (),
                 reconnect_max_delay: float = 5.0) -> None:
        self.host = host
        self.port = port
        self.credential = credential
        self.static = static
        self.server_key = server_key
        self.auto_ack = auto_ack
        self.reconnect = reconnect
        #: the backoff between reconnect attempts doubles from 50 ms up to this
        self.reconnect_max_delay = reconnect_max_delay
        #: links that reached WELCOME so far (1 after connect, +1 per reconnect)
        self.links = 0
        self.timeout = timeout
        self.prologue = prologue
        self.address = ""
        self.device = ""
        self.server_time_ms = 0
        self._loop = asyncio.get_running_loop()
        self._proto: _Proto | None = None
        self._tx = None
        self._rx = None
        self._out: list[bytes] = []
        self._flush_scheduled = False
        # id -> what its SACK settles: the _Batch of a send_many (which keeps
        # the ops), or (future, op) for a single send
        self._pending: dict[bytes, _Batch | tuple[asyncio.Future, bytes]] = {}
        # received messages, and the one recv() waiting for more (if any)
        self._inbox: deque = deque()
        self._inbox_waiter: asyncio.Future | None = None
        self._eof = False
        self._ids = b""
        self._ids_at = 0
        self._to_packed: dict[str, bytes] = {}
        # (sender, id) of the messages already handed to the application:
        # the last dedup_window of them, whatever their age
        self._seen = DedupTable(float("inf"), dedup_window)
        self._ack_upto = 0
        self._acked = 0
        # This link's seqs up to which every message was taken by the
        # application or dropped as a duplicate: the most a DACK may cover.
        self._ackable = 0
        # the highest seq dropped as a duplicate while the inbox was not empty
        self._dup_upto = 0
        # messages at the head of the inbox that came on an earlier link:
        # their seqs mean nothing on this one
        self._old_left = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        #: acks are sent when this many messages are unacked, or after ack_delay s
        self.ack_every = 256
        self.ack_delay = 0.005
        self._pings: dict[int, asyncio.Future] = {}
        self._ping_token = 0
        self._closed = False
        self._closing_error: FastrouteError | None = None
        self._welcome: asyncio.Future | None = None
        self._reconnect_task: asyncio.Task | None = None
        self._media: dict[bytes, asyncio.Future] = {}  # request id -> MREPLY
        self._keepalive_s = keepalive
        self._keepalive: asyncio.Task | None = None
        self._up_since = 0.0  # loop time of the last WELCOME
        self._fast_drops = 0  # links in a row that dropped within 2 s of WELCOME
        #: duplicates dropped by the client's own dedup window (for tests and metrics)
        self.duplicates_dropped = 0
        #: features to negotiate on every link (FEATURES, sent with the handshake)
        self.want_features = tuple(features)
        if "groups" in features and "group_lists" not in features:
            # this library reads GSEND's lists (docs/PROTOCOL.md 18.4): ask for them
            self.want_features += ("group_lists",)
        #: features the relay granted on the current link
        self.features: frozenset[str] = frozenset()
        self._features_fut: asyncio.Future | None = None
        self._requests: dict[bytes, tuple[asyncio.Future, list]] = {}  # id -> (fut, parts)

    # ----------------------------------------------------------- connecting
    @classmethod
    async def connect(cls, host: str, port: int, **kwargs) -> "Client":
        """Connect, run the Noise XX handshake, present the credential, await WELCOME.

        Raises the relay's refusal as a typed exception (e.g.
        :class:`~fastroute.errors.CredentialExpired`), or
        :class:`~fastroute.errors.HandshakeError`.
        """
        client = cls(host, port, **kwargs)
        await client._connect()
        return client

    async def _connect(self) -> None:
        loop = self._loop
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Proto(self), self.host, self.port),
                self.timeout)
        except (OSError, RuntimeError, asyncio.TimeoutError) as exc:
            raise ConnectionClosed(f"cannot connect to relay: {type(exc).__name__}",
                                   code=ErrorCode.INTERNAL) from None
        try:
            await asyncio.wait_for(self._handshake(proto), self.timeout)
        except asyncio.TimeoutError:
            proto.transport.abort()
            raise HandshakeError("relay did not complete the handshake in time",
                                 code=ErrorCode.HANDSHAKE_TIMEOUT) from None
        except FastrouteError:
            # typed refusals (some derive from OSError, as the builtins they mirror)
            proto.transport.abort()
            raise
        except (OSError, RuntimeError) as exc:
            # uvloop raises a bare RuntimeError when writing to a transport
            # the relay already closed: a lost connection like any other
            proto.transport.abort()
            raise HandshakeError(f"connection lost during the handshake: "
                                 f"{type(exc).__name__}") from None
        except BaseException:
            proto.transport.abort()
            raise

    async def _handshake(self, proto: _Proto) -> None:
        hs = HandshakeState(initiator=True, static=self.static, prologue=self.prologue)
        proto.transport.write(frame(hs.write_message(b"")))
        msg2 = await proto.handshake.get()
        if not msg2:
            raise HandshakeError("relay closed the connection during the handshake")
        payload = hs.read_message(msg2)
        if self.server_key is not None and hs.remote_static != self.server_key:
            raise HandshakeError("relay's static key does not match the pinned key",
                                 code=ErrorCode.KEY_MISMATCH)
        hello = wire.decode_server_hello(payload)
        self.server_time_ms = hello["t"]
        proto.transport.write(frame(hs.write_message(wire.encode_client_hello(self.credential))))
        self._tx, self._rx = hs.split()
        self.features = frozenset()
        if self.want_features:
            # pipelined with msg3, so the relay knows the link's features
            # before it feeds the device its backlog (docs/PROTOCOL.md 14.2)
            cid = self._new_id()
            self._features_fut = self._loop.create_future()
            self._requests[cid] = (self._features_fut, [])
            proto.transport.writelines(seal_frames(self._tx, wire.pack_frames(
                [wire.features_op(cid, self.want_features)])))
        if self.server_key is None:
            self.server_key = hs.remote_static  # trust on first use, pinned from now on
        self._welcome = self._loop.create_future()
        self._proto = proto
        proto.open = True
        # frames that arrived together with msg2 cannot exist (the relay
        # waits for msg3), so nothing is left in the handshake queue.
        # Nothing is written before WELCOME: _welcomed queues the resends
        # first, in the same step as it lets newer sends through.
        await asyncio.shield(self._welcome)
        if self._features_fut is not None:
            self.features = frozenset(await asyncio.shield(self._features_fut))
            self._features_fut = None
        if self._keepalive_s and self._keepalive is None:
            self._keepalive = self._loop.create_task(self._keepalive_loop())

    def _welcomed(self, proto: _Proto) -> None:
        """WELCOME arrived on ``proto``: a fresh link state, resends first, then open."""
        self.links += 1
        # seqs restart at 1 on every link: acks of the old one are void, and
        # what the inbox still holds came on an earlier link
        self._ack_upto = self._acked = self._ackable = self._dup_upto = 0
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._old_left = len(self._inbox)
        # Whatever the old link had not written is void too (its sends are
        # all in _pending); resend every unacked send in its first order.
        self._out = self._unacked_ops()
        proto.ready = True
        self._up_since = self._loop.time()
        self._schedule_flush()

    def _unacked_ops(self) -> list[bytes]:
        """The SEND ops of every id still pending, in the order they were queued."""
        pending = self._pending
        out: list[bytes] = []
        batches: set[int] = set()
        for entry in pending.values():
            if type(entry) is _Batch:
                if id(entry) in batches:
                    continue
                batches.add(id(entry))
                out.extend(op for cid, op in zip(entry.ids, entry.ops)
                           if pending.get(cid) is entry)
            else:
                out.append(entry[1])
        return out

    def _pending_targets(self) -> list:
        """Each distinct future or _Batch that SACKs still have to settle."""
        return list({id(t): t for t in (e if type(e) is _Batch else e[0]
                                          for e in self._pending.values())}.values())

    # ------------------------------------------------------------- sending
    def _new_id(self) -> bytes:
        # one getrandom() call per 4096 ids instead of one per message
        at = self._ids_at
        if at >= len(self._ids):
            self._ids = os.urandom(_ID_POOL)
            at = 0
        self._ids_at = at + 16
        return self._ids[at:at + 16]

    def _id_room(self, n: int) -> int:
        """Where ``n`` consecutive fresh ids start in the random pool (a fresh
        pool when this one's rest is short); a batch takes them, once packed,
        by moving ``_ids_at`` past them."""
        at = self._ids_at
        if at + 16 * n > len(self._ids):
            self._ids = os.urandom(max(_ID_POOL, 16 * n))
            at = 0
        return at

    def _packed_to(self, to: str) -> bytes:
        packed = self._to_packed.get(to)
        if packed is None:
            # validated once per recipient, through the same checks as send_op
            wire.send_op(bytes(16), to, b"")
            if len(self._to_packed) > 4096:
                self._to_packed.clear()
            packed = self._to_packed[to] = msgpack.packb(to)
        return packed

    def _op(self, cid: bytes, to_packed: bytes, body: bytes, cls: bytes) -> bytes:
        if type(body) is not bytes or type(cid) is not bytes or len(cid) != 16:
            # the slow path says precisely what is wrong
            return wire.send_op(cid, "x@x", body)
        n = len(body)
        if n > wire.MAX_BODY:
            raise BodyTooLarge(f"body over {wire.MAX_BODY} bytes: send it via the media store")
        return wire.pack_send(cid, to_packed, body, cls)

    def _queue(self, cid: bytes, target, op: bytes) -> None:
        self._pending[cid] = (target, op)
        # not ready: the op waits in _pending; _welcomed sends it after the
        # older unacked ones
        if self._proto is not None and self._proto.ready:
            self._out.append(op)

    def send_nowait(self, to: str, body: bytes, *, ephemeral: bool = False,
                    id: bytes | None = None) -> asyncio.Future:
        """Queue a message; the future resolves to its id once the relay acked it.

        The future fails with the relay's typed error (e.g.
        :class:`~fastroute.errors.UnknownAddress` for an unknown recipient).
        """
        if self._closed:
            raise ConnectionClosed("client is closed", code=ErrorCode.OK)
        cid = self._new_id() if id is None else id
        entry = self._pending.get(cid)
        if entry is not None and type(entry) is not _Batch:
            return entry[0]  # already on its way: one id, one message
        op = self._op(cid, self._packed_to(to), body, b"\x01" if ephemeral else b"\x00")
        fut = self._loop.create_future()
        self._queue(cid, fut, op)
        self._schedule_flush()
        return fut

    def send_many(self, to: str, bodies: list[bytes], *,
                  ephemeral: bool = False) -> asyncio.Future:
        """Queue several messages to one address; one future for all of them.

        The future resolves to their ids (in order) once the relay acked every
        one, or fails with the first refusal (its ``ids`` attribute lists the
        batch).  This is the fast path for a provider service: one future and
        one recipient check per batch instead of per message.
        """
        if self._closed:
            raise ConnectionClosed("client is closed", code=ErrorCode.OK)
        fut = self._loop.create_future()
        if type(bodies) is not list:
            bodies = list(bodies)
        if not bodies:
            fut.set_result([])
            return fut
        to_packed = self._packed_to(to)
        at = self._id_room(len(bodies))
        batch = _Batch(fut, bodies)  # left = len(bodies); ids set below
        # checks every body, then packs each op and registers _pending[id] = batch
        ids, ops = _pack_sends(self._ids, at, to_packed, bodies, 1 if ephemeral else 0,
                               batch, self._pending)
        self._ids_at = at + 16 * len(ids)
        batch.ids = ids
        batch.ops = ops
        if self._proto is not None and self._proto.ready:
            self._out.extend(ops)
        self._schedule_flush()
        return fut

    async def send(self, to: str, body: bytes, *, ephemeral: bool = False,
                   id: bytes | None = None) -> bytes:
        """Send one message and wait until the relay acked it (stored durably)."""
        return await self.send_nowait(to, body, ephemeral=ephemeral, id=id)

    async def set_consent(self, provider: str, allow: bool = True) -> None:
        """Opt this user in to (or out of) messages from ``provider``'s users.

        ``"*"`` means every other provider.  Returns once the relay stored
        the choice; relays that require consent (the default) refuse other
        providers' messages to this user with
        :class:`~fastroute.errors.ConsentRequired` until then.
        """
        if self._closed:
            raise ConnectionClosed("client is closed", code=ErrorCode.OK)
        cid = self._new_id()
        fut = self._loop.create_future()
        self._queue(cid, fut, wire.consent_op(cid, provider, allow))
        self._schedule_flush()
        await fut

    @property
    def unacked_sends(self) -> int:
        """Sends the relay has not acked yet."""
        return len(self._pending)

    async def drain(self) -> None:
        """Wait until the socket's write buffer is below its high-water mark."""
        if self._proto is not None:
            await self._proto.can_write.wait()

    @property
    def closed(self) -> bool:
        """True once the client ended for good (:meth:`close` or a fatal close)."""
        return self._closed

    async def ping(self) -> float:
        """Round trip to the relay, in seconds.

        Raises :class:`ConnectionClosed` when no link is up (also if the link
        drops before the PONG).
        """
        if self._closed or self._proto is None or not self._proto.ready:
            raise ConnectionClosed("not connected", code=ErrorCode.OK)
        self._ping_token += 1
        token = self._ping_token
        fut = self._loop.create_future()
        self._pings[token] = fut
        t0 = time.perf_counter()
        self._out.append(wire.ping_op(token))
        self._schedule_flush()
        await fut
        return time.perf_counter() - t0

    # ----------------------------------------------------------- receiving
    async def recv(self) -> Message:
        """The next message (raises :class:`ConnectionClosed` when the link ends for good)."""
        while not self._inbox:
            if self._eof:
                raise self._closing_error or ConnectionClosed("connection closed",
                                                              code=ErrorCode.OK)
            self._inbox_waiter = self._loop.create_future()
            try:
                await self._inbox_waiter
            finally:
                self._inbox_waiter = None
        msg = self._inbox.popleft()
        self._took(1, msg)
        return msg

    def recv_nowait_many(self, max_n: int = 1 << 30) -> list[Message]:
        """Every message already received (up to ``max_n``), without waiting."""
        inbox = self._inbox
        if len(inbox) <= max_n:
            out = list(inbox)
            inbox.clear()
        else:
            popleft = inbox.popleft
            out = [popleft() for _ in range(max_n)]
        if out:
            self._took(len(out), out[-1])
        return out

    def _wake_reader(self) -> None:
        w = self._inbox_waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def recv_many(self, max_n: int = 1 << 30) -> list[Message]:
        """Wait for at least one message, then return all that are already here."""
        first = await self.recv()
        rest = self.recv_nowait_many(max_n - 1)
        return [first, *rest]

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Message]:
        while True:
            try:
                msg = await self.recv()
            except ConnectionClosed:
                return
            yield msg

    def _took(self, n: int, last: Message) -> None:
        """The application took ``n`` messages from the inbox, ``last`` the newest."""
        old = self._old_left
        upto = 0
        if n > old:
            # the newest one came on this link: every earlier one is taken
            self._old_left = 0
            upto = last.seq
        else:
            self._old_left = old - n
        dup = self._dup_upto
        if dup > upto and not self._old_left:
            inbox = self._inbox
            # duplicates dropped earlier are covered once nothing before them waits
            if not inbox or inbox[0].seq > dup:
                upto = dup
        if upto:
            self._advance(upto)

    def _covered(self, seq: int) -> None:
        """A duplicate was dropped at ``seq``: ackable once nothing before it waits."""
        if self._inbox:
            if seq > self._dup_upto:
                self._dup_upto = seq
        else:
            self._advance(seq)

    def _advance(self, seq: int) -> None:
        if seq > self._ackable:
            self._ackable = seq
            if self.auto_ack:
                self._note_ack(seq)

    def ack(self, upto_seq: int) -> None:
        """Ack every delivered message with ``seq <= upto_seq`` (auto_ack=False).

        Seqs number the messages of the current link only (see :attr:`links`:
        a seq taken before a reconnect is void; the relay redelivers what was
        not acked).  The ack never reaches past what the application has
        taken from the inbox on this link.
        """
        upto = min(upto_seq, self._ackable)
        if upto > self._ack_upto:
            self._note_ack(upto)

    # --------------------------------------------------------------- media
    def _media_call(self, build, *args) -> asyncio.Future:
        if self._closed or self._proto is None or not self._proto.ready:
            raise ConnectionClosed("not connected", code=ErrorCode.OK)
        rid = self._new_id()
        fut = self._loop.create_future()
        self._media[rid] = fut
        self._out.append(build(rid, *args))
        self._schedule_flush()
        return fut

    async def upload(self, blob: bytes, *, window: int = 8) -> bytes:
        """Store an attachment on the relay; return its id (the blob's SHA-256).

        ``blob`` must already be encrypted by the client: the relay stores
        and serves it as opaque bytes.  Send the id, with the key, inside an
        end-to-end encrypted message; the recipient calls :meth:`download`.
        ``window`` chunks travel at once.  Refusals raise the relay's typed
        error (:class:`~fastroute.errors.BodyTooLarge`,
        :class:`~fastroute.errors.RateLimited`, ...).
        """
        if type(blob) is not bytes or not blob:
            raise InvalidArgument("blob must be non-empty bytes")
        digest = hashlib.sha256(blob).digest()
        upload_id, chunk = await self._media_call(wire.mbegin_op, len(blob), digest)
        n = -(-len(blob) // chunk)
        sem = asyncio.Semaphore(window)

        async def put(i: int) -> None:
            async with sem:
                await self._media_call(wire.mchunk_op, upload_id, i,
                                       blob[i * chunk:(i + 1) * chunk])

        await asyncio.gather(*(put(i) for i in range(n)))
        blob_id = await self._media_call(wire.mfinish_op, upload_id)
        if blob_id != digest:
            raise BlobMismatch("relay returned another blob id than the content's SHA-256")
        return blob_id

    async def download(self, blob_id: bytes, *, window: int = 8) -> bytes:
        """Fetch an attachment by id; its SHA-256 is checked against the id."""
        size, n, first = await self._media_call(wire.mget_op, blob_id, 0)
        sem = asyncio.Semaphore(window)

        async def get(i: int) -> bytes:
            async with sem:
                return (await self._media_call(wire.mget_op, blob_id, i))[2]

        parts = [first, *await asyncio.gather(*(get(i) for i in range(1, n)))]
        blob = b"".join(parts)
        if len(blob) != size or hashlib.sha256(blob).digest() != blob_id:
            raise BlobMismatch("downloaded blob does not match its id")
        return blob

    # ------------------------------------------------- end-to-end encryption
    def _check_link(self) -> None:
        """ConnectionClosed unless a link is open to send requests on."""
        if self._closed or self._proto is None or not self._proto.open:
            raise ConnectionClosed("not connected", code=ErrorCode.OK)

    def _request(self, ops: list[bytes], cid: bytes) -> asyncio.Future:
        self._check_link()
        fut = self._loop.create_future()
        self._requests[cid] = (fut, [])
        self._out.extend(ops)
        self._schedule_flush()
        return fut

    def _request_many(self, ids: list[bytes], ops: list[bytes]) -> asyncio.Future:
        """Queue requests ``ids`` (their packed ``ops``, in order) under one
        future: an outcome each (see :class:`_RequestBatch`).  The caller
        checked the link before packing."""
        fut = self._loop.create_future()
        if not ids:
            fut.set_result([])
            return fut
        batch = _RequestBatch(fut, ids)
        requests = self._requests
        for cid in ids:
            requests[cid] = (batch, [])
        self._out.extend(ops)
        self._schedule_flush()
        return fut

    def _need(self, feature: str) -> None:
        if feature not in self.features:
            raise FastrouteError(f"feature {feature!r} was not negotiated with the relay "
                                 f"(connect with features=({feature!r},))",
                                 code=ErrorCode.UNKNOWN_OP)

    async def negotiate(self, features: tuple[str, ...] = ("e2ee",)) -> frozenset[str]:
        """Ask the relay for ``features`` on this link; return all granted so far.

        Prefer ``Client.connect(..., features=...)``: it negotiates with the
        handshake, before the relay feeds the device its stored backlog, and
        again after every reconnection.
        """
        cid = self._new_id()
        granted = await self._request([wire.features_op(cid, features)], cid)
        self.features = self.features.union(granted)
        return self.features

    async def publish_keys(self, registration_id: int, identity_key: bytes,
                           signed_prekey: tuple, last_resort_kem_prekey: tuple,
                           one_time_prekeys: list = (), kem_prekeys: list = (),  # type: ignore
                           *, replace: bool = True) -> int:
        """Publish this device's keys; return the device id the relay assigned (1..127).

        ``signed_prekey`` and ``last_resort_kem_prekey`` are ``(id, public,
        signature)``; ``one_time_prekeys`` ``(id, public)`` pairs and
        ``kem_prekeys`` ``(id, public, signature)`` triples, as serialized by
        libsignal.  ``replace`` empties both pools first (a new registration
        id always does).  Pools larger than a frame go in several ops.
        """
        self._need("e2ee")
        cid = self._new_id()
        did = await self._request([wire.keys_set_op(
            cid, registration_id, identity_key, signed_prekey, last_resort_kem_prekey,
            replace)], cid)
        if one_time_prekeys:
            await self.add_prekeys(wire.PREKEY_EC, one_time_prekeys)
        if kem_prekeys:
            await self.add_prekeys(wire.PREKEY_KEM, kem_prekeys)
        return did

    async def add_prekeys(self, kind: int, prekeys: list) -> int:
        """Top up a one-time prekey pool (``wire.PREKEY_EC`` or ``PREKEY_KEM``); its new size."""
        self._need("e2ee")
        prekeys = list(prekeys)
        size = 0
        at = 0
        while at < len(prekeys):
            # as many keys as fit one frame
            room = wire.MAX_PLAINTEXT - 64
            end = at
            used = 0
            while end < len(prekeys):
                n = sum(len(x) + 9 for x in prekeys[end] if type(x) is bytes) + 12
                if used + n > room and end > at:
                    break
                used += n
                end += 1
            cid = self._new_id()
            size = await self._request([wire.keys_add_op(cid, kind, prekeys[at:end])], cid)
            at = end
        return size

    async def devices(self, address: str) -> list[tuple[int, int]]:
        """``[(device id, registration id), ...]`` of ``address``'s devices; consumes
        no keys.  :class:`~fastroute.errors.UnknownAddress` when there is none the
        relay lets this user see."""
        self._need("e2ee")
        cid = self._new_id()
        return [tuple(d) for d in await self._request([wire.devices_op(cid, address)], cid)]

    async def bundles(self, address: str, device_ids: list[int] = ()) -> list[Bundle]:  # type: ignore
        """Prekey bundles of ``address``'s devices (all when ``device_ids`` is empty).

        Each fetch consumes one one-time prekey of each pool of each device.
        """
        self._need("e2ee")
        cid = self._new_id()
        rows = await self._request([wire.bundles_op(cid, address, list(device_ids))], cid)
        return [Bundle(d, r, ik, tuple(spk), tuple(otk) if otk is not None else None,
                       tuple(kem), last) for d, r, ik, spk, otk, kem, last in rows]

    def send_to_devices_nowait(self, to: str, entries: list, own: list = (),  # type: ignore
                               *, id: bytes | None = None  # noqa: A002
                               ) -> tuple[bytes, asyncio.Future]:
        """:meth:`send_to_devices` without waiting: ``(id, future)``, the future
        done (result None) once every copy is durably stored, or failed as
        that method raises.

        For a client that sends many: no coroutine per message, as with
        :meth:`send_nowait` for SEND.
        """
        self._need("e2ee")
        cid = id if id is not None else self._new_id()
        return cid, self._request(self._dsend_ops(cid, to, entries, own), cid)

    def _dsend_ops(self, cid: bytes, to: str, entries: list, own: list) -> list[bytes]:
        """One DSEND's packed ops: one op, or (too heavy for a frame) several."""
        room = wire.MAX_PLAINTEXT - 256
        # lists or tuples of them as they are, any other iterables as lists:
        # weighed by the packer, then split if they must be
        entries = wire._as_arrays(entries)
        own = wire._as_arrays(own)
        # the common case: every copy fits one op, packed in one call
        op = _pack_dsend(cid, to, entries, own, room)
        if op is not None:
            return [op]
        # split the copies over ops that each fit a frame; the last says more=False
        parts: list[tuple[list, list]] = [([], [])]
        used = 0
        for which, group in ((0, entries), (1, own)):
            for e in group:
                n = len(e[2]) + 16
                if used + n > room and (parts[-1][0] or parts[-1][1]):
                    parts.append(([], []))
                    used = 0
                parts[-1][which].append(e)
                used += n
        return [wire.dsend_op(cid, to, i < len(parts) - 1, ents, owns)
                for i, (ents, owns) in enumerate(parts)]

    def send_to_devices_many(self, messages: list) -> tuple[list[bytes], asyncio.Future]:
        """Many per-device sends at once: ``(ids, future)``.

        ``messages`` are ``(to, entries)`` or ``(to, entries, own)``, each as
        for :meth:`send_to_devices`; the ids are new, in that order.  Every
        message is checked and packed before any is sent (a bad one raises
        and sends nothing).  The future resolves once the relay answered every
        message, to a list in ids order: None for a message whose every copy
        is stored, else what it got -- a :class:`~fastroute.errors.DeviceMismatch`
        (refresh, then resend that one with ``send_to_devices(..., id=its
        id)``), another refusal, or :class:`ConnectionClosed` when the link
        went down before its answer (resend it the same way: a resend of a
        message already stored is answered, not stored twice).

        For a client or service that sends many: one future for the batch,
        not one per message, as :meth:`send_many` for SEND.
        """
        self._need("e2ee")
        self._check_link()
        if type(messages) is not list and type(messages) is not tuple:
            messages = list(messages)
        at = self._id_room(len(messages))
        # every message packed (one op each, compiled) before any is queued;
        # the others -- too heavy for one op, or of other shapes -- the general way
        ids, ops = _pack_dsends(self._ids, at, messages, wire.MAX_PLAINTEXT - 256)
        self._ids_at = at + 16 * len(ids)
        if None in ops:
            parts: list[bytes] = []
            for i, op in enumerate(ops):
                if op is None:
                    m = messages[i]
                    parts += self._dsend_ops(ids[i], m[0], m[1], m[2] if len(m) > 2 else ())
                else:
                    parts.append(op)
            ops = parts
        return ids, self._request_many(ids, ops)

    async def send_to_devices(self, to: str, entries: list, own: list = (),  # type: ignore
                              *, id: bytes | None = None) -> bytes:  # noqa: A002
        """Send one ciphertext per device: ``entries`` are ``(device id, registration
        id, ciphertext)`` for every current device of ``to``, ``own`` for this user's
        other devices (optional).  Returns the id once every copy is durably stored.

        :class:`~fastroute.errors.DeviceMismatch` (nothing stored) lists the
        missing, extra and stale devices: refresh the sessions and call again
        with the same ``id``.
        """
        cid, fut = self.send_to_devices_nowait(to, entries, own, id=id)
        await fut
        return cid

    async def refresh(self, address: str, mismatch: DeviceMismatch) -> list[Bundle]:
        """After a :class:`~fastroute.errors.DeviceMismatch` for ``address``: the
        bundles of its missing and stale devices (to start new sessions with),
        fetched in one request; drop the sessions with ``mismatch.extra``
        yourself, then resend with the same id.  Pass this user's own address
        for the ``own_*`` lists."""
        own = address == self.address
        want = sorted(set(mismatch.own_missing if own else mismatch.missing)
                      | set(mismatch.own_stale if own else mismatch.stale))
        return await self.bundles(address, want) if want else []

    # ------------------------------------------------------------- groups
    async def _group(self, opcode: int, *fields: object) -> Any:
        self._need("groups")
        cid = self._new_id()
        return await self._request([wire.group_op(opcode, cid, *fields)], cid)

    async def create_group(self) -> bytes:
        """Create a group whose only member (an admin) is this user; its 16-byte id."""
        return await self._group(wire.Op.GCREATE)

    async def group_add(self, group: bytes, address: str) -> int:
        """Add a user of this user's provider, or invite a user of another one (admins
        only).  0 added, 1 invited, 2 already a member or invitee."""
        return await self._group(wire.Op.GADD, group, address)

    async def group_answer(self, group: bytes, accept: bool) -> None:
        """Accept (become a member) or decline a pending invite to ``group``."""
        await self._group(wire.Op.GANSWER, group, bool(accept))

    async def group_remove(self, group: bytes, address: str) -> None:
        """Remove a member, or withdraw a pending invite (admins only)."""
        await self._group(wire.Op.GREMOVE, group, address)

    async def group_leave(self, group: bytes) -> None:
        """Leave ``group``."""
        await self._group(wire.Op.GLEAVE, group)

    async def group_admin(self, group: bytes, address: str, admin: bool) -> None:
        """Promote (``admin`` true) or demote a member (admins only)."""
        await self._group(wire.Op.GADMIN, group, address, bool(admin))

    async def group_members(self, group: bytes) -> tuple[int, list, list]:
        """``(version, members, invitees)``: members are ``(address, admin,
        [(device id, registration id), ...])`` (members only may ask)."""
        result = await self._group(wire.Op.GMEMBERS, group)
        version, rest = result[0], result[1:]
        members = [(a, admin, [tuple(d) for d in devs]) for a, admin, devs in rest
                   if admin is not None]
        invitees = [a for a, admin, _ in rest if admin is None]
        return version, members, invitees

    async def group_send(self, group: bytes, version: int, body: bytes, *,
                         id: bytes | None = None,  # noqa: A002
                         skipped: list | None = None) -> bytes:
        """Send one ciphertext to every member device but this one; ``version`` is
        the member-device-set version the sender key went to.  Returns the id
        once stored.  :class:`~fastroute.errors.GroupMismatch` (nothing stored)
        carries the current version (and, with ``"group_lists"``, the devices
        missing, extra and stale since ``version``): distribute, then resend
        with the same id.  Members whose backlog is at the relay's cap get no
        copy; with ``"group_lists"`` their addresses are appended to
        ``skipped``.  :class:`~fastroute.errors.RecipientFull` when every
        recipient is at a cap (nothing stored)."""
        cid, fut = self.group_send_nowait(group, version, body, id=id)
        result = await fut
        if skipped is not None and type(result) is list:
            skipped.extend(result)
        return cid

    def group_send_nowait(self, group: bytes, version: int, body: bytes, *,
                          id: bytes | None = None  # noqa: A002
                          ) -> tuple[bytes, asyncio.Future]:
        """:meth:`group_send` without waiting: ``(id, future)``, the future done
        once the message is stored (its result: the members skipped at a cap,
        a list, when ``"group_lists"`` was negotiated and some were; else
        None), or failed as that method raises.  No coroutine per message."""
        self._need("groups")
        cid = id if id is not None else self._new_id()
        return cid, self._request([wire.gsend_op(cid, group, version, body)], cid)

    def group_send_many(self, group: bytes, version: int, bodies: list[bytes]
                        ) -> tuple[list[bytes], asyncio.Future]:
        """Many messages to one group at once: ``(ids, future)``.

        ``bodies`` are Sender Key ciphertexts, each sent as by
        :meth:`group_send` at member-list ``version``; the ids are new, in
        that order.  The future resolves once the relay answered every one,
        to a list in ids order: what :meth:`group_send_nowait`'s future
        gives for that message (None, or the members skipped at a cap), or
        the error it got -- a :class:`~fastroute.errors.GroupMismatch`
        (refresh the member list, then resend that one with
        ``group_send(..., id=its id)``), or :class:`ConnectionClosed` when the
        link went down before its answer (resend it the same way).

        One future for the batch, not one per message, as :meth:`send_many`.
        """
        self._need("groups")
        self._check_link()
        if type(bodies) is not list:
            bodies = list(bodies)
        new_id, gsend_op = self._new_id, wire.gsend_op
        ids = [new_id() for _ in bodies]
        # every op packed (and checked) before any is queued
        ops = [gsend_op(cid, group, version, body) for cid, body in zip(ids, bodies)]
        return ids, self._request_many(ids, ops)

    # ------------------------------------------------------------- safety
    async def _safety(self, opcode: int, *fields: object) -> Any:
        self._need("safety")
        cid = self._new_id()
        return await self._request([wire.safety_op(opcode, cid, *fields)], cid)

    async def block(self, target: str) -> bool:
        """Block an address (``"user@provider"``) or a whole provider
        (``"@provider"``) for this user, from any of its devices; durable.

        To the blocked party this user then looks like an address that does
        not exist (messages, device lists, bundles, group invites).  Returns
        False when it was blocked already.  Needs the feature ``"safety"``.
        """
        return await self._safety(wire.Op.BLOCK, target, True) == 0

    async def unblock(self, target: str) -> bool:
        """Lift a block; False when ``target`` was not blocked."""
        return await self._safety(wire.Op.BLOCK, target, False) == 0

    async def blocked(self) -> list[str]:
        """This user's blocks, sorted: addresses and ``"@provider"`` names."""
        return list(await self._safety(wire.Op.BLOCKS))

    async def report_spam(self, sender: str) -> bool:
        """Report ``sender`` as a spammer; True when the report counted.

        It counts only when the relay delivered a message from ``sender`` to
        this user within its report window, once per sender and window, and
        while the cap of this user's provider for that sender is not reached
        (docs/PROTOCOL.md 19.3).
        """
        return bool(await self._safety(wire.Op.REPORT, sender))

    def _on_reply(self, op: tuple) -> None:
        entry = self._requests.get(op[1])
        if entry is None:
            return
        fut, parts = entry
        _, _, code, last, result = op
        if code:
            self._requests.pop(op[1], None)
            if not fut.done():
                exc: FastrouteError
                if (code == ErrorCode.DEVICE_MISMATCH and type(result) is tuple
                        and len(result) in (1, 5)):
                    # 5: with the lists of "group_lists" (docs/PROTOCOL.md 18.4)
                    exc = GroupMismatch("member device set changed", result[0],
                                        result[1:] if len(result) == 5 else None)
                elif code == ErrorCode.DEVICE_MISMATCH and type(result) is tuple:
                    exc = DeviceMismatch("device list changed", result)
                else:
                    exc = error_for_code(code, f"relay refused the request: {_code_name(code)}")
                _settle_request(entry, op[1], exc)
            return
        if not last:
            parts.extend(result)
            return
        self._requests.pop(op[1], None)
        if parts:
            parts.extend(result)
            result = parts
        if not fut.done():
            result = list(result) if type(result) is tuple else result
            if type(fut) is _RequestBatch:
                fut.answer(op[1], result)
            else:
                fut.set_result(result)

    # ------------------------------------------------------------- closing
    async def close(self) -> None:
        """Say BYE and close; pending sends fail with :class:`ConnectionClosed`."""
        if self._closed:
            return
        self._closed = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        proto = self._proto
        if proto is not None and proto.ready:
            self._flush()
            if self._pending:
                # let the relay answer what is in flight (it does so before BYE too)
                await asyncio.wait([t.fut if type(t) is _Batch else t
                                    for t in self._pending_targets()], timeout=2.0)
            self._write([wire.bye_op()])
            proto.transport.close()
            try:
                await asyncio.wait_for(asyncio.shield(proto.lost), 2.0)
            except asyncio.TimeoutError:
                proto.transport.abort()
        self._finish(ConnectionClosed("client closed", code=ErrorCode.OK))

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ internals
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _note_ack(self, seq: int) -> None:
        # Delayed, cumulative acks (as TCP does): a DACK frame costs the relay
        # a read, a decryption and a store write, so one per batch of 256
        # messages or per 5 ms, whichever comes first; any frame the client
        # sends meanwhile carries the ack anyway.
        self._ack_upto = seq
        if seq - self._acked >= self.ack_every:
            self._schedule_flush()
        elif self._ack_timer is None:
            self._ack_timer = self._loop.call_later(self.ack_delay, self._ack_due)

    def _ack_due(self) -> None:
        self._ack_timer = None
        self._schedule_flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        proto = self._proto
        if proto is None or not proto.ready or proto.transport.is_closing():
            return
        out = self._out
        if self._ack_upto > self._acked:
            self._acked = self._ack_upto
            out.append(wire.dack_op(self._ack_upto))
            if self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None
        if out:
            self._out = []
            self._write(out)

    def _write(self, ops: list[bytes]) -> None:
        try:
            self._proto.transport.writelines(seal_frames(self._tx, wire.pack_frames(ops)))
        except (OSError, RuntimeError):
            # the transport died under us (uvloop raises RuntimeError): its
            # connection_lost follows; unacked sends are still in _pending
            self._proto.transport.abort()

    def _on_frame(self, msg: bytes) -> None:
        try:
            plaintext = self._rx.decrypt(msg)
        except FastrouteError as exc:
            self._link_failed(exc)
            return
        # compiled: a frame of SACKs and DELIVERs (and accepted REPLYs, DDELIVERs,
        # GDELIVERs), handled as the loop below does
        if _dispatch_frame(plaintext, wire._ADDR_OK, self._seen, self._inbox,
                           self._pending, _Batch, Message, self, _drop_duplicate,
                           _refused, self._requests, DeviceMessage, GroupMessage,
                           self._on_reply) is not None:
            return
        try:
            # the compiled dispatch above accepts exactly what the compiled
            # decoder would; past it, only the precise decoder can help
            ops = wire.decode_server_frame_precise(plaintext)
        except FastrouteError as exc:
            self._link_failed(exc)
            return
        pending = self._pending
        inbox_append = self._inbox.append
        seen = self._seen
        new = tuple.__new__  # Message(...) would run namedtuple's Python-level __new__
        for op in ops:
            if type(op) is not tuple:
                # an OpError: a relay that speaks a newer or broken dialect
                continue
            kind = op[0]
            if kind == 18:  # DELIVER, the common case first
                _, seq, sender, cid, body, ts_ms, cls = op
                # ids are unique per sender, not globally
                if seen.lookup(sender, cid, 0.0) is not None:
                    _drop_duplicate(self, seq)
                    continue
                seen.begin(sender, cid, 0, 0.0)
                inbox_append(new(Message, (seq, sender, cid, body, ts_ms, cls == 1)))
            elif kind == 17:  # SACK
                entry = pending.pop(op[1], None)
                if entry is None:
                    continue
                # the _Batch of send_many, or (future, op) of a single send
                target = entry if type(entry) is _Batch else entry[0]
                code = op[2]
                if type(target) is _Batch and not code:
                    target.left -= 1
                    if target.left:
                        continue
                if target.done():
                    continue
                if not code:
                    target.set_result(op[1])
                else:
                    target.set_exception(error_for_code(code, f"relay refused the message: "
                                                        f"{_code_name(code)}"))
            elif kind == 22:  # MREPLY, the answer to a media request
                fut = self._media.pop(op[1], None)
                if fut is not None and not fut.done():
                    if op[2]:
                        fut.set_exception(error_for_code(op[2], f"media request refused: "
                                                         f"{_code_name(op[2])}"))
                    else:
                        fut.set_result(op[3])
            elif kind == 2001:  # DDELIVER: a per-device copy
                _, seq, sender, sdev, cid, body, ts_ms, _cls = op
                if seen.lookup(sender, cid, 0.0) is not None:
                    _drop_duplicate(self, seq)  # as for DELIVER
                    continue
                seen.begin(sender, cid, 0, 0.0)
                inbox_append(DeviceMessage(seq, sender, sdev, cid, body, ts_ms))
            elif kind == 2100:  # GDELIVER: [2100, seq, group, from, from_device, id, body, ...]
                _, seq, group, sender, sdev, cid, body, ts_ms, _cls = op
                if seen.lookup(sender, cid, 0.0) is not None:
                    _drop_duplicate(self, seq)  # as for DELIVER
                    continue
                seen.begin(sender, cid, 0, 0.0)
                inbox_append(GroupMessage(seq, group, sender, sdev, cid, body, ts_ms))
            elif kind == 2101:  # GEVENT: as EVENT
                try:
                    data = msgpack.unpackb(op[4])
                except Exception:  # an event this client cannot read: handed over raw
                    data = op[4]
                inbox_append(GroupEvent(op[1], op[2], data))
            elif kind == 2000:  # REPLY to a feature request
                self._on_reply(op)
            elif kind == 2002:  # EVENT: [2002, seq, kind, id, data (msgpack), ts_ms, cls]
                try:
                    data = msgpack.unpackb(op[4])
                except Exception:  # an event this client cannot read: handed over raw
                    data = op[4]
                inbox_append(Event(op[1], op[2], data))
            elif kind == 23:  # FEATURES_OK
                entry = self._requests.pop(op[1], None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(list(op[2]))
            elif kind == wire.Op.WELCOME:
                self.address, self.device = op[1], op[2]
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_result(None)
                    if self._proto is not None and not self._proto.ready:
                        self._welcomed(self._proto)
            elif kind == wire.Op.PONG:
                fut = self._pings.pop(op[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif kind == wire.Op.ERROR:
                # A per-frame protocol error: the relay kept the link open.  The
                # first UNKNOWN_OP while FEATURES is unanswered is a relay without
                # negotiation (v1), answering the FEATURES of our first frame.
                fut = self._features_fut
                if op[1] == ErrorCode.UNKNOWN_OP and fut is not None and not fut.done():
                    for cid, (f, _) in list(self._requests.items()):
                        if f is fut:
                            del self._requests[cid]
                    fut.set_result([])
            elif kind == wire.Op.SERVER_BYE:
                code = op[1]
                err = error_for_code(code, op[2]) if code else ConnectionClosed(
                    op[2] or "relay closed the connection", code=ErrorCode.OK)
                if code == ErrorCode.SHUTTING_DOWN:
                    err = ConnectionClosed(op[2], code=ErrorCode.SHUTTING_DOWN)
                self._closing_error = err if isinstance(err, FastrouteError) else None
                if self._proto is not None:
                    self._proto.ready = False  # nothing more is read: write nothing
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_exception(err)
                self._proto.transport.close()

    def _link_failed(self, exc: FastrouteError) -> None:
        self._closing_error = exc
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(exc)
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()

    def _on_lost(self, proto: _Proto, exc: BaseException | None) -> None:
        if proto is not self._proto:
            return
        welcomed = self._welcome is not None and self._welcome.done() \
            and not self._welcome.exception()
        if self._welcome is not None and not self._welcome.done():
            # a handshake in progress: _connect raises, its caller decides
            self._welcome.set_exception(self._closing_error or ConnectionClosed(
                "relay closed the connection", code=ErrorCode.OK))
        if self._closed or not welcomed:
            return
        # the link was up: fail what only it could answer (sends stay pending)
        self._link_down()
        err = self._closing_error
        for cid, entry in list(self._requests.items()):
            # key directory requests are not resent: their callers retry
            _settle_request(entry, cid, ConnectionClosed("connection lost", code=ErrorCode.OK))
        self._requests.clear()
        if self.reconnect and not _is_fatal(err):
            if self._reconnect_task is None or self._reconnect_task.done():
                self._reconnect_task = self._loop.create_task(self._reconnect_loop())
            return
        self._finish(err or ConnectionClosed("connection lost", code=ErrorCode.OK))

    def _link_down(self) -> None:
        """Fail the requests of a lost link that a new link would not answer."""
        err = ConnectionClosed("connection lost", code=ErrorCode.OK)
        for futs in (self._media, self._pings):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(err)
            futs.clear()

    async def _keepalive_loop(self) -> None:
        # The relay closes links that stay silent for its idle timeout (300 s
        # by default); a device that only receives must still speak now and then.
        while not self._closed:
            await asyncio.sleep(self._keepalive_s)
            if self._proto is not None and self._proto.ready:
                self._ping_token += 1
                self._out.append(wire.ping_op(self._ping_token))
                self._schedule_flush()

    async def _reconnect_loop(self) -> None:
        # Jitter (a random wait between half and all of a doubling, capped
        # bound): after a relay restart its devices come back spread out, not
        # in one wave.  Only a link that stayed up 2 s resets the bound, so a
        # relay that closes right after WELCOME is not hammered.
        attempt = 0
        if self._loop.time() - self._up_since < 2.0:
            attempt = self._fast_drops = self._fast_drops + 1
        else:
            self._fast_drops = 0
        while not self._closed:
            bound = min(self.reconnect_max_delay, 0.05 * (1 << min(attempt, 16)))
            await asyncio.sleep(random.uniform(bound / 2, bound))
            if self._closed:
                return
            self._closing_error = None
            self._welcome = None
            self._proto = None  # the old link's late callbacks are ignored
            try:
                await self._connect()
                proto = self._proto
                if self._closed or (proto is not None and proto.ready):
                    return
                # lost right after WELCOME, before this task resumed: its
                # _on_lost saw this loop still running and left it to us
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any transport failure is transient
                if _is_fatal(exc):
                    self._finish(exc)  # type: ignore[arg-type]
                    return
            attempt += 1

    def _finish(self, err: FastrouteError) -> None:
        self._closed = True
        self._closing_error = self._closing_error or err
        for target in self._pending_targets():
            if not target.done():
                target.set_exception(ConnectionClosed("connection closed before the relay acked",
                                                      code=err.code))
        self._pending.clear()
        for fut in self._media.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed("connection closed", code=err.code))
        self._media.clear()
        for cid, entry in list(self._requests.items()):
            _settle_request(entry, cid, ConnectionClosed("connection closed", code=err.code))
        self._requests.clear()
        self._eof = True
        self._wake_reader()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed("connection closed", code=err.code))


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)
