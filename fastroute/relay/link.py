"""The link stage: one device's connection, from bytes on the socket to ops and back.

A :class:`Link` runs the Noise XX handshake (responder), authenticates the
device through the gate, then decrypts frames, decodes their ops and hands
each kind to the stage that owns it: SENDs to the gate (one call per read,
so one store batch per read), DACKs to delivery, CONSENT to the gate, media
requests to the media stage.  Going out, it encrypts the ops the other
stages queued in :attr:`Link.out` into as few frames as fit and writes them
with one call (:meth:`Link.flush`, run by the delivery stage's writer once
per loop turn).

A link knows the other stages only through :class:`LinkWiring`, which the
server fills in; it never reaches into their state.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable

from .. import wire
from ..errors import DecryptError, ErrorCode, FastrouteError, ProtocolError
from ..histogram import LOOP_BUCKETS, Histogram
from ..noise import FrameReader, HandshakeState, KeyPair, frame, seal_frames
from .gate import give_back, least, take_upto

if TYPE_CHECKING:
    from ..identity import Credential
    from .delivery import Delivery, Feed
    from .gate import Gate
    from .groups import Groups
    from .keys import Keys
    from .media_ops import MediaOps
    from .safety import Safety

__all__ = ["Link", "LinkState", "LinkWiring", "Turns"]

log = logging.getLogger("fastroute.relay")


class LinkState(enum.IntEnum):
    """Where a link is in its life."""

    #: waiting for the handshake's first message
    HS_WAIT1 = 0
    #: waiting for the handshake's third message (the client's credential)
    HS_WAIT3 = 1
    #: authenticated (or refused, with its BYE still to flush): ops flow
    OPEN = 2
    #: closed or closing: nothing more is read or written
    CLOSED = 3
    #: the client said BYE; its SENDs' SACKs are still due
    DRAINING = 4


_HS_WAIT1, _HS_WAIT3, _OPEN, _CLOSED, _DRAINING = LinkState
_OP_SEND = int(wire.Op.SEND)
_OP_DACK = int(wire.Op.DACK)
_OP_PING = int(wire.Op.PING)
_OP_BYE = int(wire.Op.BYE)
_OP_CONSENT = int(wire.Op.CONSENT)
_MEDIA_OPS = frozenset((int(wire.Op.MBEGIN), int(wire.Op.MCHUNK), int(wire.Op.MFINISH),
                        int(wire.Op.MGET)))
_OP_FEATURES = int(wire.Op.FEATURES)
_OP_DSEND = int(wire.Op.DSEND)
_OP_GSEND = int(wire.Op.GSEND)
#: opcode -> the feature a link must have negotiated to use it
_FEATURE_OF = {int(op): name for name, ops in wire.FEATURE_OPS.items() for op in ops}
#: the feature whose ops are DSENDs (a link that did not negotiate it sends none)
_E2EE = _FEATURE_OF[_OP_DSEND]
#: the feature whose ops are GSENDs
_GROUPS = _FEATURE_OF[_OP_GSEND]
#: the features this relay grants (FEATURES answers with the intersection)
SUPPORTED_FEATURES = frozenset(wire.FEATURE_OPS)
#: feature -> the :class:`LinkWiring` slot of the stage that serves its ops
#: ("group_lists" has no ops: it changes the groups stage's REPLYs); a
#: feature whose stage a wiring lacks is not granted on its links
_STAGE_OF = {_E2EE: "keys", _GROUPS: "groups", "group_lists": "groups",
             _FEATURE_OF[int(wire.Op.BLOCK)]: "safety"}
_NO_FEATURES: frozenset[str] = frozenset()
#: the third field of :attr:`Link.partial` when its first holds SENDs already
#: decoded by the fast path (else: a frame to check a share at a time)
_DECODED_SENDS = -1
#: ... when its first holds the tokens of a frame of PINGs only (fast path)
_DECODED_PINGS = -2
#: ... when its first holds the seqs of a frame of DACKs only (fast path)
_DECODED_DACKS = -3
#: ... when its first holds a frame of DSENDs or GSENDs only, every op checked
#: by the compiled decoder: taken like SENDs (a quiet link's whole frame, a
#: busy link's pieces sized by their cost), not :data:`_OPS_CHUNK` at a time:
#: the keys stage's compiled run costs about a microsecond an op, and its
#: per-piece work (the sender's slot, clocks, budgets) was a fifth of a
#: 1:1 DSEND's relay CPU in pieces of 32
_DECODED_E2EE = -4
#: ops of a frame (other than a frame of SENDs) checked and dispatched
#: between two looks at the turn's clock: a CONSENT costs some microseconds,
#: so a whole share of them could hold the loop for a millisecond
_OPS_CHUNK = 32
#: ... for a busy link (see :meth:`Link.quiet`): ops of the precise path cost
#: up to ten microseconds each to check and answer (a CONSENT's reply), and a
#: quiet client's read waits behind the chunk being processed
_BUSY_CHUNK = 8
#: a busy link's frame longer than this is decoded a chunk at a time even when
#: made only of SENDs (the compiled decoder takes ~0.7 us per SEND)
_BUSY_DECODE_BYTES = 4096
#: ``checks`` of a busy link's pieces: sized by what its ops cost (see
#: :meth:`Link._piece`), not by a count
_BY_COST = 0
#: kinds of piece whose cost per op a busy link keeps apart: SENDs, PINGs,
#: other ops, compiled DSENDs and GSENDs (a PONG costs a third of a
#: microsecond, a CONSENT ten)
_PIECE_SENDS, _PIECE_PINGS, _PIECE_OPS, _PIECE_E2EE = 0, 1, 2, 3
#: a busy link's piece before its kind's cost is known, by kind (an e2ee
#: op's cost grows with its devices: a short first piece, as for other ops)
_FIRST_PIECE = (_OPS_CHUNK, _OPS_CHUNK, _BUSY_CHUNK, _BUSY_CHUNK)
#: the kind of piece of each decoded frame's ``partial`` marker
_PIECE_KINDS = {_DECODED_SENDS: _PIECE_SENDS, _DECODED_PINGS: _PIECE_PINGS,
                _DECODED_DACKS: _PIECE_PINGS, _DECODED_E2EE: _PIECE_E2EE}
#: what one piece of a busy link should cost, as a share of the turn's time
#: slice (``limits.max_turn_ms``): a turn overruns its slice by one piece at
#: most, and a quiet client's read waits behind no more (with the default
#: 0.1 ms, 25 us; benches/gate_layers.py flood: 50 us kept most of the
#: flooded tail, 12 us gained nothing over 25)
_PIECE_OF_SLICE = 0.25


def _decode_e2ee(plaintext: bytes) -> list | None:
    """A frame (or a long frame's chunk) of only DSENDs or only GSENDs, decoded
    and checked by the compiled decoders; None for anything else (always
    without the core)."""
    ops = wire.decode_dsends(plaintext)
    return ops if ops is not None else wire.decode_gsends(plaintext)


class Turns:
    """The relay's fair scheduler: how much the links processed this loop turn.

    A link processes at most its share (``limits.max_ops_per_turn``) per
    callback, and stops early once the relay as a whole has processed
    ``limits.max_relay_ops_per_turn`` ops or spent ``limits.max_turn_ms`` in
    this turn (ops differ in cost by a hundredfold: a count alone let a
    turn of costly ones run for a millisecond; the writes a turn starts with
    count on its clock); past that, a link still gets a piece of ops (a busy
    link's sized by what its ops cost: :meth:`Link._piece`), never a whole
    share, and a read that arrives waits whole, unless its link is quiet
    (has spent less than half its op budget: a quiet pair's message is taken
    at once).  Waiting links are served once per turn by :meth:`_turn`: when
    busy links wait, the relay's writer first (what earlier turns delivered
    goes out; links with few ops to write first), then every
    quiet link whose read waited, the writer again, then the busy links
    (reads that waited, frames left from an earlier share, links woken by a
    refilled op budget), round robin, while the turn has room, at least one
    of them.  So the work between two turns is bounded whatever number of
    links flood.
    """

    __slots__ = ("budget", "slice", "write", "used", "start", "queue", "fresh", "armed",
                 "durations", "turning", "_loop")

    def __init__(self, budget: int, slice_s: float, write: Callable[[], None]) -> None:
        self.budget = budget
        self.slice = slice_s
        #: the relay's writer: what earlier turns delivered goes out before
        #: this one takes more work (a quiet pair's message is not held
        #: behind a flooder's share)
        self.write = write
        self.used = 0
        self.start = 0.0  # when this turn's first op was processed
        self.queue: deque = deque()  # busy links: frames left after a share
        self.fresh: deque = deque()  # links whose read waited for a turn
        self.armed = False
        #: a turn is under way: its clock started before its writes
        self.turning = False
        #: how long each turn held the loop (the metrics' loop-health figure:
        #: what a quiet client's read may wait behind)
        self.durations = Histogram(LOOP_BUCKETS)
        #: the running loop, looked up once: asyncio checks the process id
        #: (a system call) on every lookup, and every read arms a turn
        self._loop: asyncio.AbstractEventLoop | None = None

    def begin(self) -> None:
        """A link is about to process ops: the turn's clock starts with its first."""
        if self.used == 0 and not self.turning:
            self.start = time.perf_counter()

    def room(self, extra: int) -> bool:
        """Whether ``extra`` more ops fit in this turn (by count and by time)."""
        used = self.used + extra
        return used == 0 or (used < self.budget
                             and time.perf_counter() - self.start < self.slice)

    def spend(self, n: int) -> None:
        """Count ``n`` ops processed in this turn."""
        self.used += n
        self._arm()

    def enqueue(self, link: "Link", fresh: bool = False) -> None:
        """``link`` has frames left (``fresh``: a read that waited): serve it soon."""
        (self.fresh if fresh else self.queue).append(link)
        self._arm()

    def _arm(self) -> None:
        if not self.armed:
            self.armed = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._turn)

    def _turn(self) -> None:
        self.armed = False
        self.used = 0
        if not self.fresh and not self.queue:
            # nothing waited: the turn only starts the next count (every read
            # arms one; a quiet relay's turns are not scheduler turns)
            return
        t0 = time.perf_counter()
        # the writes of the turn count on its clock: they hold the loop too
        self.start = t0
        self.turning = True
        try:
            fresh, self.fresh = self.fresh, deque()
            queue = self.queue
            quiet: list[Link] = []
            busy: list[Link] = []
            for link in fresh:
                (quiet if link.quiet() else busy).append(link)
            # busy links waiting (a look at the first few is enough): what
            # earlier turns delivered goes out before their work, and again
            # after the quiet reads; without them, one write per turn batches more
            flooded = bool(busy) or any(not link.quiet() for link in islice(queue, 8))
            if flooded:
                self.write()
            for link in quiet:
                # quiet clients' reads go first, whatever the turn has left
                link._next_share()
            if flooded and quiet:
                self.write()
            for link in busy:
                # a busy link's read waits for room like its other frames
                if self.room(0):
                    link._next_share()
                else:
                    queue.append(link)
            for i in range(len(queue)):
                if i and not self.room(0):
                    break
                queue.popleft()._next_share()
        finally:
            self.turning = False
        if self.queue or self.fresh:
            self._arm()
        self.durations.observe(time.perf_counter() - t0)


class LinkWiring:
    """What a link may call in the rest of the relay; filled in by the server.

    ``admit(link)`` says whether a new connection may stay (connection
    limit, shutdown); ``online(link, cred)`` puts an authenticated device
    online; ``lost(link)`` takes a link out of every table.  ``op_counts``
    counts the well-formed ops links received, by opcode (for the metrics).
    """

    __slots__ = ("server_key", "config", "gate", "delivery", "media_ops", "count_error",
                 "admit", "online", "lost", "keys", "groups", "safety", "op_counts", "turns")

    def __init__(self, server_key: KeyPair, config: Any, gate: "Gate", delivery: "Delivery",
                 media_ops: "MediaOps", count_error: Callable[[int], None],
                 admit: Callable[["Link"], bool],
                 online: Callable[["Link", "Credential"], None],
                 lost: Callable[["Link"], None], keys: "Keys | None" = None,
                 groups: "Groups | None" = None, safety: "Safety | None" = None) -> None:
        self.server_key = server_key
        self.config = config
        self.gate = gate
        self.delivery = delivery
        self.media_ops = media_ops
        self.count_error = count_error
        self.admit = admit
        self.online = online
        self.lost = lost
        #: the feature stages ("e2ee", "groups", "safety"): a feature is
        #: granted only where its stage is (:attr:`features`)
        self.keys = keys
        self.groups = groups
        self.safety = safety
        self.op_counts: dict[int, int] = {}
        #: the fair scheduler shared by every link of the relay
        self.turns = Turns(config.limits.max_relay_ops_per_turn,
                           config.limits.max_turn_ms / 1000.0, delivery.write_pending)

    @property
    def features(self) -> frozenset[str]:
        """The features whose stage this wiring has: FEATURES grants no other,
        so a feature's op never reaches a stage that is not there."""
        return frozenset(f for f in SUPPORTED_FEATURES
                         if getattr(self, _STAGE_OF.get(f, "_none"), None) is not None)


class Link(asyncio.Protocol):
    """One device connection: handshake, then the op loop; its writer is :meth:`flush`."""

    def __init__(self, wiring: LinkWiring) -> None:
        self.wiring = wiring
        self.state = _HS_WAIT1
        self.transport: Any = None
        self.reader = FrameReader()
        self.hs: HandshakeState | None = None
        self.tx: Any = None  # CipherState, this side -> peer
        self.rx: Any = None
        self.cred: "Credential | None" = None
        self.address = ""
        self.provider = ""
        #: packed ops waiting for the next flush (the list object never changes):
        #: bytes, one op each, or :class:`~fastroute.wire.OpRun`\ s of several
        #: (a batch's SACKs, a pull's DELIVERs)
        self.out: list = []
        self.paused = False
        self.errors = 0
        self.storing = 0  # store batches of this link not yet answered
        # SENDs of the read being processed, flat: id, to, body, cls a SEND
        # (a turn's one frame of SENDs: the decoder's own sequence, which the
        # compiled one reads in place; made a list when a second one comes)
        self.sends: list | None = None
        self.bye_after_sends = False
        self.bye_requested = False
        self.media_in_flight = 0
        self.last_rx = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        # the other stages' per-link state, set when the device is online
        self.feed: "Feed | None" = None
        self.gate_state: Any = None  # the gate's LinkGate: sender, limits, quotas
        #: features negotiated with FEATURES (docs/PROTOCOL.md 14.2); empty: v1
        self.features = _NO_FEATURES
        self.dsends: dict = {}  # the keys stage's multi-op DSENDs being gathered
        self.sync_hold: asyncio.TimerHandle | None = None
        self.budgets: Any = None  # the gate's Budgets: op, message, byte layers
        #: frames read but not processed yet: (frames, next index), while
        #: reading is paused because this link used its share of a loop turn
        self.backlog: tuple[list, int] | None = None
        #: reading is paused until :meth:`_next_share` runs (its share of a
        #: turn is used, or its op budget is spent)
        self.waiting = False
        #: the frame whose ops are being processed a share at a time:
        #: [unpacked ops, next index, count of leading ops needing no check],
        #: or [decoded SENDs, next index, _DECODED_SENDS] (PINGs, DACKs,
        #: DSENDs and GSENDs likewise)
        self.partial: list | None = None
        #: ops of the current share done before the turn's clock cut it
        self.carried = 0
        #: seconds per op of this link's recent busy pieces, by kind of piece
        #: (SENDs, PINGs, other ops, compiled e2ee sends; 0: not measured yet)
        self.costs = [0.0, 0.0, 0.0, 0.0]
        #: by kind, the size the next piece may grow to since the last came
        #: in under its time (0: none; see :meth:`_measured`)
        self.grown = [0, 0, 0, 0]
        #: the kind of the piece just processed
        self.piece_kind = _PIECE_OPS
        #: op-budget tokens the current share took for its non-SEND ops and
        #: has not used yet (-1: none taken yet)
        self.grant = -1
        #: ops processed on this link, and those refused past its op budget
        self.ops = 0
        self.refused_ops = 0
        #: source IP while the link is in its handshake (the server's per-IP count)
        self.preauth_ip: str | None = None
        self.closing = False

    # ---------------------------------------------------------------- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection (or abort it) and start the handshake timer."""
        self.transport = transport
        if not self.wiring.admit(self):
            self.transport.abort()
            return
        self.hs = HandshakeState(initiator=False, static=self.wiring.server_key)
        self.timer = asyncio.get_running_loop().call_later(
            self.wiring.config.handshake_timeout, self._handshake_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Forget the link everywhere; unacked messages stay in the store."""
        self.state = _CLOSED
        if self.timer is not None:
            self.timer.cancel()
        if self.sync_hold is not None:
            self.sync_hold.cancel()
            self.sync_hold = None
        self.wiring.lost(self)

    def pause_writing(self) -> None:
        """The socket's buffer is full: stop pulling from the mailbox."""
        self.paused = True

    def resume_writing(self) -> None:
        """The socket drained: pull again."""
        self.paused = False
        self.wiring.delivery.resume(self)

    def data_received(self, data: bytes) -> None:
        """Decrypt and dispatch the complete frames of this read (a turn's share)."""
        try:
            msgs = self.reader.feed(data)
        except ProtocolError as exc:
            self.fail(exc)
            return
        self.last_rx = time.monotonic()
        if self.backlog is not None:
            # read while paused (a transport may deliver what it already had)
            frames, at = self.backlog
            frames.extend(msgs)
            return
        if self.waiting:
            self.backlog = (msgs, 0)
            return
        turns = self.wiring.turns
        if not turns.room(0) and self.state == _OPEN and not self.quiet():
            # this turn's work is done: a busy link's read waits for a later
            # turn (a quiet one's is taken now, a frame of it at least: what
            # waits for the next turn is only what the clock cuts off)
            self.backlog = (msgs, 0)
            self.waiting = True
            self.transport.pause_reading()
            turns.enqueue(self, fresh=True)
            return
        self._process(msgs, 0)

    def _process(self, msgs: list, at: int) -> None:
        # The SENDs of every frame processed in this turn go to the gate and
        # the store together: one store batch and one commit for all of them.
        self.sends = []
        share = self.wiring.config.limits.max_ops_per_turn
        turns = self.wiring.turns
        turns.begin()
        # a share the turn's clock cut goes on where it stopped: to the op
        # budget it is one share (looked at before it, not between its chunks)
        carried = done = self.carried
        self.carried = 0
        n = len(msgs)
        budgets = self.budgets
        # a busy link (one that spent half its op budget) goes a piece at a
        # time, sized by what its ops cost (:meth:`_piece`), its SENDs to the
        # gate by the piece: the turn's clock then sees the gate's work too
        # (a refused SEND costs microseconds to answer)
        quiet = budgets is None or self.quiet()
        checks = _OPS_CHUNK if quiet else _BY_COST
        clock = time.perf_counter
        # a quiet link was just seen to hold a token in every bucket: its
        # first frame needs no second look at the budget
        looked = quiet
        while at < n or self.partial is not None:
            t_piece = 0.0 if quiet else clock()
            before = done
            if looked:
                looked = False
            elif (budgets is not None and self.state == _OPEN
                    and not (done and self.partial is not None) and self._budget_wait()):
                # spent: its frames are not even decrypted (nor the rest of a
                # frame's ops checked) until it refills
                self.backlog = (msgs, at)
                break
            # a quiet link takes a frame whatever the clock says (it cuts after it)
            room = max(share - done, 1)
            if not quiet:
                room = min(room, _OPS_CHUNK)
            partial = self.partial
            if partial is not None and self.state == _OPEN:
                # the rest of a frame left by an earlier share (or chunk)
                took = self._run_ops(room, checks)
                done += took
                if not took and self.partial is not None:
                    # SENDs the op budget covers no more of before it refills
                    self.backlog = (msgs, at)
                    break
            elif self.state == _OPEN:
                msg = msgs[at]
                at += 1
                try:
                    plaintext = self.rx.decrypt(msg)
                except DecryptError as exc:
                    # A bad tag means the link is no longer trustworthy: the
                    # peer is not who did the handshake, or bytes were altered.
                    self.fail(exc)
                    return
                done += self._on_frame(plaintext, room, checks)
                if self.sync_hold is not None:
                    # the first frame said FEATURES or not: the backlog may go
                    self.release_sync()
            elif self.state in (_CLOSED, _DRAINING):
                break
            else:
                msg = msgs[at]
                at += 1
                self._on_handshake(msg)
                continue
            if not quiet and self.state == _OPEN:
                if len(self.sends) // 4 >= self._piece(_PIECE_SENDS):
                    sends, self.sends = self.sends, []
                    self.wiring.gate.accept(self, sends)
                if done > before:
                    self._measured(self.piece_kind, done - before, clock() - t_piece)
            if self.state != _OPEN:
                self.partial = None
            elif at < n or self.partial is not None:
                # Fair scheduling: this link had its share of the turn, or the
                # turn is used up; the rest of its frames (and of a frame of
                # many ops) wait for a later turn, and its socket is not read
                # meanwhile (TCP pushes back).
                if done >= share:
                    self.backlog = (msgs, at)
                    break
                if not turns.room(done - carried):
                    self.backlog = (msgs, at)
                    self.carried = done
                    break
        done -= carried
        self.ops += done
        turns.spend(done)
        if not self.carried:
            # the share is over: what its grant did not use goes back (before
            # the gate charges this share's SENDs)
            if self.grant > 0:
                give_back(self.budgets.ops, self.grant)
            self.grant = -1
        if self.sends:
            self.wiring.gate.accept(self, self.sends)
            if self.bye_after_sends:
                self._on_bye()
        self.sends = None
        if self.state == _OPEN and not self.waiting:
            # Past its op budget a link is not read until the budget refills:
            # a flooder cannot make the relay decode more than it may send.
            delay = 0.0 if self.carried else self._budget_wait()
            if self.backlog is not None or delay:
                self.waiting = True
                self.transport.pause_reading()
                if delay:
                    asyncio.get_running_loop().call_later(delay, self._refilled)
                else:
                    turns.enqueue(self)

    def quiet(self) -> bool:
        """Whether this link has spent little of its op budget lately (at most
        half of every bucket's burst, and a token left in each): a quiet
        client, whose read the fair scheduler serves before the busy ones'."""
        budgets = self.budgets
        if budgets is None:
            return False  # a handshake's work waits its turn like any
        for bucket in budgets.ops:
            tokens = bucket.refill()
            if tokens < bucket.burst * 0.5 or tokens < 1.0:
                return False
        return True

    def _piece(self, kind: int) -> int:
        """How many ops of ``kind`` a busy link's next piece takes: what a
        quarter of the turn's slice buys at their recent cost (see
        :data:`_PIECE_OF_SLICE`), or more when the last piece came in under
        that time (see :meth:`_measured`); 1 to :data:`_OPS_CHUNK`."""
        cost = self.costs[kind]
        if not cost:
            return _FIRST_PIECE[kind]
        return max(1, self.grown[kind], min(_OPS_CHUNK, int(
            self.wiring.turns.slice * _PIECE_OF_SLICE / cost)))

    def _measured(self, kind: int, ops: int, took: float) -> None:
        """A busy link's piece of ``ops`` ops of ``kind`` took ``took`` seconds.

        Its cost per op, lately, sizes the next pieces.  That cost counts the
        piece's fixed work too (a stage's setup for the piece: the sender's
        slot, clocks, budgets), which a small piece pays nearly whole: where
        that work alone is over half the piece's time, pieces sized by the
        cost kept whatever small size one slow piece gave them, each paying
        it again (DSENDs in the test suite: one a piece, 20 us each, under
        the 25 us a piece may take).  So a piece that came in under its time
        lets the next take half as many ops more; one over it shrinks the
        next by the cost."""
        cost = took / ops
        old = self.costs[kind]
        self.costs[kind] = cost if not old else 0.5 * (old + cost)
        if took < self.wiring.turns.slice * _PIECE_OF_SLICE:
            self.grown[kind] = min(_OPS_CHUNK, ops + max(1, ops // 2))
        else:
            self.grown[kind] = 0

    def _budget_wait(self) -> float:
        """0 while the op budget has a token; once spent, the seconds until it
        holds a share's worth again (at most 1): a spent link is not woken for
        every single token."""
        budgets = self.budgets
        if budgets is None:
            return 0.0
        wait = 0.0
        share = self.wiring.config.limits.max_ops_per_turn
        for bucket in budgets.ops:
            tokens = bucket.refill()
            if tokens < 1.0:
                need = min(float(share), bucket.burst)
                wait = max(wait, (need - tokens) / bucket.rate if bucket.rate > 0 else 1.0)
        return min(wait, 1.0)

    def _refilled(self) -> None:
        """The op budget holds a share again: go on in this turn if it has
        room, else in a later one, behind the reads that waited (a link
        that spent its budget is a busy one, not a quiet one)."""
        if self.wiring.turns.room(0):
            self._next_share()
        else:
            self.wiring.turns.enqueue(self)

    def _next_share(self) -> None:
        """Process the next share of frames left by an earlier turn (or read again)."""
        self.waiting = False
        backlog = self.backlog
        self.backlog = None
        if self.state != _OPEN:
            return
        if backlog is not None:
            self._process(*backlog)
        if not self.waiting and self.state == _OPEN:
            self.transport.resume_reading()

    # -------------------------------------------------------------- handshake
    def _on_handshake(self, msg: bytes) -> None:
        wiring = self.wiring
        hs = self.hs
        assert hs is not None
        try:
            if self.state == _HS_WAIT1:
                hs.read_message(msg)
                hello = wire.encode_server_hello(int(time.time() * 1000))
                self.transport.write(frame(hs.write_message(hello)))
                self.state = _HS_WAIT3
                return
            payload = hs.read_message(msg)
        except FastrouteError as exc:
            wiring.count_error(exc.code)
            log.debug("handshake failed: %s", exc)
            self.abort()
            return
        # msg3 authenticated the client's static key; the link keys exist, so
        # every refusal from here on reaches the client as an encrypted BYE.
        self.tx, self.rx = hs.split()
        self.hs = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert hs.remote_static is not None  # msg3 carried it
        try:
            cred = wiring.gate.authenticate(payload, hs.remote_static)
        except FastrouteError as exc:
            wiring.count_error(exc.code)
            log.info("device refused: code %d (%s)", int(exc.code), exc.code.name
                     if isinstance(exc.code, ErrorCode) else exc.code)
            self.state = _OPEN
            self.close(exc.code, str(exc))
            return
        self.state = _OPEN
        wiring.online(self, cred)

    def hold_sync(self, timeout: float) -> None:
        """Start the device's backlog sync after its first transport frame (or ``timeout``)."""
        self.sync_hold = asyncio.get_running_loop().call_later(timeout, self.release_sync)

    def release_sync(self) -> None:
        """Start the backlog sync held by :meth:`hold_sync` (idempotent)."""
        if self.sync_hold is not None:
            self.sync_hold.cancel()
            self.sync_hold = None
            if self.feed is not None:
                self.wiring.delivery.start_sync(self.feed)

    def _handshake_timeout(self) -> None:
        self.timer = None
        if self.state in (_HS_WAIT1, _HS_WAIT3):
            self.wiring.count_error(ErrorCode.HANDSHAKE_TIMEOUT)
            self.abort()

    # ---------------------------------------------------------------- op loop
    def _on_frame(self, plaintext: bytes, room: int, checks: int = _OPS_CHUNK) -> int:
        """Dispatch one frame's ops, at most ``room`` of them now (the rest
        wait in :attr:`partial`); return how many were processed (SENDs are
        charged to the op budget by the gate, the other ops here)."""
        # fast path (compiled when the core is built): a frame of valid SENDs
        # only; a busy link's long frame is decoded by the chunk instead (a
        # frame of 500 SENDs takes 0.3 ms to decode whole)
        busy_long = (checks < _OPS_CHUNK and len(plaintext) > _BUSY_DECODE_BYTES
                     and wire.UNPACKS_BY_THE_SLICE)
        fast = None if busy_long else wire.decode_sends(plaintext)
        if fast is not None:
            self.piece_kind = _PIECE_SENDS
            count = len(fast) // 4  # flat: id, to, body, cls a SEND
            if (count > room or count > self._send_room()
                    or (checks == _BY_COST and count > self._piece(_PIECE_SENDS))):
                # a share now, the rest in later shares like any frame's ops:
                # a frame of many SENDs (refused ones cost as much to answer)
                # does not hold the loop either
                self.partial = [fast, 0, _DECODED_SENDS]
                return self._run_ops(room, checks)
            return self._take_sends(fast)
        if not busy_long:
            dacks = wire.decode_dacks(plaintext)
            if dacks is not None:
                # what every receiving client sends, most often one DACK alone:
                # read in C, its effects those of the precise path's loop
                self.partial = [dacks, 0, _DECODED_DACKS]
                return self._run_ops(room, checks)
            # compiled (None without the core): a frame of DSENDs, what an
            # end-to-end encrypted client sends for every 1:1 message, or of
            # GSENDs, what it sends for every group message, checked as it is
            # decoded; its ops go the way of any checked frame's
            e2ee = _decode_e2ee(plaintext)
            if e2ee is not None:
                self.partial = [e2ee, 0, _DECODED_E2EE]
                return self._run_ops(room, checks)
        pings = wire.decode_pings(plaintext)
        if pings is not None:
            # answered a share (or chunk) at a time too: a PONG costs a
            # third of a microsecond, a frame holds thousands of PINGs
            self.partial = [pings, 0, _DECODED_PINGS]
            return self._run_ops(room, checks)
        try:
            # the fast paths said "not only SENDs" nor PINGs: go straight to
            # the precise decoder instead of trying them again; its ops are
            # checked a share at a time, so that a frame of many costly ops
            # does not hold the loop (nor its refused ones: the budget is
            # looked at again before each share)
            frame, good = wire.unpack_client_frame(plaintext)
        except ProtocolError as exc:
            self._protocol_error(exc.code, str(exc))
            return 1
        self.partial = [frame, 0, good]
        return self._run_ops(room, checks)

    def _run_ops(self, room: int, checks: int = _OPS_CHUNK) -> int:
        """Process up to ``room`` more ops of :attr:`partial` (of a frame with
        other ops than SENDs or PINGs, ``checks`` at most: the turn's clock is
        looked at between chunks); return how many."""
        partial = self.partial
        assert partial is not None
        frame, start, good = partial
        # a frame of SENDs decoded whole is flat: id, to, body, cls a SEND
        n = len(frame) // 4 if good == _DECODED_SENDS else len(frame)
        sends = None
        by_cost = checks == _BY_COST
        e2ee = None
        if type(frame) is wire.PackedOps:
            end, sends, e2ee = self._packed_chunk(frame, start, room, checks)
            self.piece_kind = (_PIECE_SENDS if sends is not None
                               else _PIECE_E2EE if e2ee is not None else _PIECE_OPS)
        else:
            if good >= 0:
                room = min(room, self._piece(_PIECE_OPS) if by_cost else checks)
                self.piece_kind = _PIECE_OPS
            else:
                self.piece_kind = _PIECE_KINDS[good]
                if by_cost:
                    room = min(room, self._piece(self.piece_kind))
            end = min(start + room, n)
            if good == _DECODED_SENDS:
                end = min(end, start + max(self._send_room(), 0))
                sends = frame[4 * start:4 * end]
        if end < n:
            partial[1] = end
        else:
            self.partial = None
        if sends is not None:
            return self._take_sends(sends)
        if good == _DECODED_PINGS:
            return self._pings(frame, start, end)
        if good == _DECODED_DACKS:
            return self._dacks(frame, start, end)
        if good == _DECODED_E2EE:
            # checked as decoded: no second look at each op
            ops = frame if start == 0 and end == n else frame[start:end]
        elif e2ee is not None:
            ops = e2ee
        else:
            ops = wire.check_client_ops(frame, start, end, good)
        done = self._dispatch(ops)
        if self.state != _OPEN:
            self.partial = None  # BYE or a close: the rest of the frame is not read
        return done

    def _packed_chunk(self, frame: wire.PackedOps, start: int, room: int,
                      checks: int) -> tuple[int, list | None, list | None]:
        """Where the next chunk of a long frame not unpacked yet ends, and its
        SENDs if it is made only of them, or its DSENDs or GSENDs if made only
        of one of those: those are decoded by the compiled fast paths (and,
        in a frame of only SENDs, wait for the op budget as in a frame
        decoded whole); any other chunk is ``checks`` ops at most (a busy
        link's, ``_BY_COST``: as many of each kind as :meth:`_piece` says)."""
        # a frame of SENDs only takes what the op budget covers now (none:
        # they wait for it, and nothing is decoded until then)
        only_sends = frame.sends_only()
        spare = self._send_room() if only_sends else 0
        if only_sends and spare <= 0:
            return start, [], None
        if checks == _BY_COST:
            n_sends = self._piece(_PIECE_SENDS)
            n_e2ee = self._piece(_PIECE_E2EE)
            checks = self._piece(_PIECE_OPS)
            end = min(start + room, len(frame), start + max(n_sends, checks, n_e2ee))
        else:
            n_sends = n_e2ee = _OPS_CHUNK
            end = min(start + room, len(frame), start + _OPS_CHUNK)
        chunk = frame.chunk(start, end)
        sends = wire.decode_sends(chunk)
        if sends is None:
            # a busy link's long frame of DSENDs or GSENDs (what an end-to-end
            # encrypted client sends): read by the compiled decoder as a frame
            # of them would be (None without the core), a piece of their kind
            e2ee = _decode_e2ee(chunk)
            if e2ee is not None:
                end = min(end, start + n_e2ee)
                return end, None, e2ee[:end - start]
            return min(end, start + checks), None, None
        # flat: id, to, body, cls a SEND
        if end - start > n_sends:
            end = start + n_sends
            sends = sends[:4 * n_sends]
        if only_sends and spare < end - start:
            end = start + spare
            sends = sends[:4 * spare]
        return end, sends, None

    def _send_room(self) -> int:
        """How many more SENDs the op budget covers now.

        SENDs are charged when the turn's SENDs reach the gate, so those
        already taken in this turn count here.  Past it a frame of SENDs
        waits for the budget to refill, the link unread, instead of having
        its tail refused: a flooder's excess costs the relay no work (no
        refusal to check, pack and write) and a legitimate burst has
        nothing to resend.
        """
        budgets = self.budgets
        if budgets is None:
            return 1 << 30
        assert self.sends is not None
        return int(least(budgets.ops)) - len(self.sends) // 4

    def _growing_sends(self) -> list:
        """The turn's SENDs as a list more may be added to: a frame of them
        kept as the compiled decoder read it becomes one when a second frame
        of SENDs, or SENDs among other ops, come in the same turn."""
        sends = self.sends
        assert sends is not None
        if type(sends) is not list:
            sends = self.sends = list(sends)
        return sends

    def _take_sends(self, sends: list) -> int:
        """Queue decoded SENDs (flat: ``id, to, body, cls`` each) for the gate
        (at the end of this share); return how many."""
        assert self.sends is not None
        if not self.sends:
            # the turn's first (most often only) frame of SENDs: kept as the
            # decoder gave it (compiled: a run read in place, no id or body
            # bytes a message), not copied into the turn's list
            self.sends = sends
        else:
            self._growing_sends().extend(sends)
        n = len(sends) // 4
        counts = self.wiring.op_counts
        counts[_OP_SEND] = counts.get(_OP_SEND, 0) + n
        return n

    def _dispatch(self, ops: list) -> int:
        """Dispatch decoded ops (a frame's, or a share of one); return how many
        there were (after a BYE or a close the rest are dropped unread)."""
        wiring = self.wiring
        n = len(ops)
        # a leading run of single-op DSENDs or of GSENDs: what an end-to-end
        # encrypted client sends by the thousand (compiled counts)
        lead = wire.leading_dsends(ops)
        kind, feature = _OP_DSEND, _E2EE
        if not lead:
            lead = wire.leading_gsends(ops)
            kind, feature = _OP_GSEND, _GROUPS
        # every op but SEND takes one token of the op budget, taken for the
        # whole frame at once; past it PING, CONSENT and media ops are refused
        if lead == n:
            others = n
        else:
            others = 0
            for op in ops:
                if type(op) is tuple and op[0] != _OP_SEND:
                    others += 1
        granted = self._granted(others) if others else 0
        if granted < others:
            # DACKs are never refused, so they are not counted here
            wiring.count_error(ErrorCode.RATE_LIMITED)
        # single-op DSENDs and GSENDs go to their stages together (their
        # per-link work once), in order with the stages' other ops: before
        # any of them
        e2ee_sends: list = []
        try:
            if (lead and granted >= lead and feature in self.features
                    and (kind == _OP_GSEND or not self.dsends)):
                # the run is queued at once, as the loop below would queue each
                counts = wiring.op_counts
                counts[kind] = counts.get(kind, 0) + lead
                if lead == n:
                    e2ee_sends.extend(ops)
                    return n
                e2ee_sends.extend(ops[:lead])
                return lead + self._dispatch_ops(ops[lead:], granted - lead, e2ee_sends)
            return self._dispatch_ops(ops, granted, e2ee_sends)
        finally:
            if e2ee_sends:
                self._e2ee_sends(e2ee_sends)

    def _dispatch_ops(self, ops: list, granted: int, e2ee_sends: list) -> int:
        """:meth:`_dispatch`'s loop over the ops, ``granted`` of them (not SENDs)
        within the op budget; single-op DSENDs and GSENDs are left in
        ``e2ee_sends`` for :meth:`_e2ee_sends` (handed over before any other
        op of a feature)."""
        wiring = self.wiring
        sends = self._growing_sends()
        op_counts = wiring.op_counts
        over = 0  # PINGs refused past the budget: one ERROR for the frame
        dack = -1  # DACKs are cumulative: one per frame does the work of all
        for op in ops:
            if isinstance(op, wire.OpError):
                feature = _FEATURE_OF.get(op.opcode) if op.opcode is not None else None
                if feature is not None and feature not in self.features:
                    # not negotiated: unknown here, whatever its fields
                    self._protocol_error(ErrorCode.UNKNOWN_OP, "unknown opcode for this direction")
                    if self.state == _CLOSED:
                        return len(ops)
                    continue
                if op.id is not None and op.opcode != _OP_FEATURES:
                    # a malformed request is answered like a refused one: a
                    # feature's in the feature's REPLY, media requests by MREPLY
                    # (PROTOCOL.md, "Media"), the other v1 ones by SACK
                    self.out.append(wire.reply_op(op.id, op.code) if feature is not None
                                    else wire.mreply_op(op.id, op.code) if op.opcode in _MEDIA_OPS
                                    else wire.sack_op(op.id, op.code))
                    wiring.count_error(op.code)
                    wiring.delivery.mark(self)
                    self.errors += 1
                    if self.errors > wiring.config.limits.max_protocol_errors:
                        self.close(ErrorCode.MALFORMED, "too many protocol errors")
                        return len(ops)
                else:
                    self._protocol_error(op.code, op.reason)
                    if self.state == _CLOSED:
                        return len(ops)
                continue
            kind = op[0]
            op_counts[kind] = op_counts.get(kind, 0) + 1
            if kind == _OP_SEND:
                sends += op[1:]  # flat: id, to, body, cls
                continue
            if kind == _OP_DACK:
                # charged, never refused: a refused ack would only cost a redelivery
                granted -= 1
                if op[1] > dack:
                    dack = op[1]
                continue
            if kind == _OP_BYE:
                if e2ee_sends:
                    # the DSENDs and GSENDs before it count among what BYE waits for
                    self._e2ee_sends(e2ee_sends)
                    e2ee_sends.clear()
                # after the SENDs already read: data_received accepts them first
                if dack >= 0:
                    wiring.delivery.dack(self, dack)
                self.bye_after_sends = True
                self.state = _DRAINING
                if not sends:
                    self._on_bye()
                return len(ops)
            feature = _FEATURE_OF.get(kind)
            if feature is not None and feature not in self.features:
                # a feature's op is unknown to a link that did not negotiate
                # it, exactly as to a relay without the feature
                self._protocol_error(ErrorCode.UNKNOWN_OP, "unknown opcode for this direction")
                if self.state == _CLOSED:
                    return len(ops)
                continue
            if kind == _OP_FEATURES:
                # charged, never refused: a client must be able to negotiate
                granted -= 1
                self._features(op[1], op[2])
                continue
            granted -= 1
            if granted < 0:
                self.refused_ops += 1
                if kind == _OP_PING:
                    over += 1
                elif kind == _OP_CONSENT:
                    self.out.append(wire.sack_op(op[1], ErrorCode.RATE_LIMITED))
                elif feature is not None:  # a feature's request: its REPLY
                    self.out.append(wire.reply_op(op[1], ErrorCode.RATE_LIMITED))
                else:  # a media request
                    self.out.append(wire.mreply_op(op[1], ErrorCode.RATE_LIMITED))
                wiring.delivery.mark(self)
            elif kind == _OP_CONSENT:
                wiring.gate.set_consent(self, op[1], op[2], op[3])
            elif kind in _MEDIA_OPS:
                wiring.media_ops.request(self, op)
            elif kind == _OP_PING:
                self.out.append(wire.pong_op(op[1]))
                wiring.delivery.mark(self)
            elif feature is not None:
                if (kind == _OP_DSEND and not op[3] and not self.dsends) or kind == _OP_GSEND:
                    e2ee_sends.append(op)
                    continue
                if e2ee_sends:
                    self._e2ee_sends(e2ee_sends)
                    e2ee_sends.clear()
                # a feature without its stage is not granted (LinkWiring.features)
                getattr(wiring, _STAGE_OF[feature]).request(self, op)
        if dack >= 0:
            # acks and sends are independent: no order to keep
            wiring.delivery.dack(self, dack)
        if over:
            self.out.append(wire.error_op(ErrorCode.RATE_LIMITED,
                                          f"{over} PINGs over the op budget"))
        return len(ops)

    def _e2ee_sends(self, ops: list) -> None:
        """A frame's single-op DSENDs and GSENDs, in order: each run of one kind
        to the keys stage's ``dsend_many`` or the groups stage's ``gsend_many``
        (their per-link work once a run)."""
        wiring = self.wiring
        i, n = 0, len(ops)
        while i < n:
            kind = ops[i][0]
            j = i + 1
            while j < n and ops[j][0] == kind:
                j += 1
            run = ops if i == 0 and j == n else ops[i:j]
            # a feature without its stage is not granted (LinkWiring.features)
            if kind == _OP_DSEND:
                assert wiring.keys is not None
                wiring.keys.dsend_many(self, run)
            else:
                assert wiring.groups is not None
                wiring.groups.gsend_many(self, run)
            i = j

    def _granted(self, n: int) -> int:
        """How many of ``n`` ops (not SENDs: the gate charges those) the op
        budget grants now.

        The budget is looked at once per share, for all of it: a share taken
        a chunk at a time (cut by the turn's clock) is refused past the
        budget exactly as a share taken at once.
        """
        if self.budgets is None:
            return n
        if self.grant < 0:
            self.grant = take_upto(self.budgets.ops,
                                   self.wiring.config.limits.max_ops_per_turn)
        granted = min(n, self.grant)
        self.grant -= granted
        return granted

    def _pings(self, tokens: list, start: int, end: int) -> int:
        """PINGs ``tokens[start:end]`` of a frame of PINGs only (the cheap op a
        flooder sends by the thousand): what :meth:`_dispatch` does for each,
        with no Python object per op; return how many ops this took.

        The op budget grants the first ones a PONG each; once it grants no
        more, the rest of the frame is refused together in one ERROR, so a
        frame of thousands costs the relay little more than its decryption.
        """
        wiring = self.wiring
        n = end - start
        granted = self._granted(n)
        if granted:
            pong = wire.pong_op
            self.out.extend([pong(t) for t in tokens[start:start + granted]])
        if granted < n:
            n = len(tokens) - start
            self.partial = None
            wiring.count_error(ErrorCode.RATE_LIMITED)
            self.refused_ops += n - granted
            self.out.append(wire.error_op(ErrorCode.RATE_LIMITED,
                                          f"{n - granted} PINGs over the op budget"))
        counts = wiring.op_counts
        counts[_OP_PING] = counts.get(_OP_PING, 0) + n
        if n:
            wiring.delivery.mark(self)
        return n

    def _dacks(self, seqs: list, start: int, end: int) -> int:
        """DACKs ``seqs[start:end]`` of a frame of DACKs only: what
        :meth:`_dispatch` does for them (each charged to the op budget, never
        refused; the highest acks them all), with no Python object per op but
        its seq; return how many ops this took."""
        wiring = self.wiring
        n = end - start
        if self._granted(n) < n:
            wiring.count_error(ErrorCode.RATE_LIMITED)
        counts = wiring.op_counts
        counts[_OP_DACK] = counts.get(_OP_DACK, 0) + n
        if n:
            wiring.delivery.dack(self, max(seqs[start:end]) if n > 1 else seqs[start])
        return n

    def _features(self, cid: bytes, names: tuple) -> None:
        """FEATURES: grant the known subset; later FEATURES ops may add more."""
        wanted = self.wiring.features.intersection(names)
        # a feature built on others is granted only with them (or after them)
        # (needs of needs too: drop what is not grantable until nothing changes)
        have = self.features.union(wanted)
        while True:
            ok = frozenset(n for n in have
                           if wire.FEATURE_NEEDS.get(n, _NO_FEATURES).issubset(have))
            if ok == have:
                break
            have = ok
        granted = sorted(wanted & have)
        self.features = self.features.union(granted)
        self.wiring.delivery.features_changed()
        self.out.append(wire.features_ok_op(cid, granted))
        self.wiring.delivery.mark(self)

    def _on_bye(self) -> None:
        if self.storing:
            # answer every SEND of this link before saying goodbye
            self.bye_requested = True
        else:
            self.close(ErrorCode.OK, "bye")

    def _protocol_error(self, code: int, reason: str) -> None:
        wiring = self.wiring
        wiring.count_error(code)
        self.errors += 1
        if self.errors > wiring.config.limits.max_protocol_errors:
            self.close(ErrorCode.MALFORMED, "too many protocol errors")
            return
        self.out.append(wire.error_op(code, reason))
        wiring.delivery.mark(self)

    def stored_all(self) -> None:
        """A store batch of this link was answered; a pending BYE may go out now."""
        if self.bye_requested and not self.storing:
            self.bye_requested = False
            self.close(ErrorCode.OK, "bye")

    # ----------------------------------------------------------------- writer
    def is_open(self) -> bool:
        """Whether ops queued in :attr:`out` will still be written."""
        return self.state == _OPEN or self.state == _DRAINING

    def flush(self) -> None:
        """Encrypt the outgoing ops into as few frames as fit, and write once."""
        out = self.out
        if not out:
            return
        if self.state != _OPEN and self.state != _DRAINING:
            out.clear()
            return
        bufs = seal_frames(self.tx, wire.pack_frames(out))
        out.clear()
        transport = self.transport
        transport.writelines(bufs)
        if (transport.get_write_buffer_size() > self.wiring.config.limits.max_output_bytes
                and not self.closing):
            self._output_limit()

    def _output_limit(self) -> None:
        """The client does not read its replies: close with a reason.

        Nothing accepted is lost: stored messages stay in the store until
        acked, and a SEND whose SACK did not arrive is resent with its id.
        """
        self.wiring.count_error(ErrorCode.OUTPUT_LIMIT)
        log.info("closing a connection that does not read its replies")
        self.close(ErrorCode.OUTPUT_LIMIT, "replies not read: output limit reached")
        # the BYE may never be read either: drop the buffer soon
        asyncio.get_running_loop().call_later(1.0, self.transport.abort)

    # --------------------------------------------------------------- closing
    def close(self, code: int, reason: str) -> None:
        """Send a final BYE (if the link is up) and close after it is written."""
        if self.state == _CLOSED:
            return
        self.closing = True
        self.state = _OPEN  # a draining link may still flush
        if self.tx is not None:
            self.out.append(wire.server_bye_op(int(code), reason))
            self.flush()
        self.state = _CLOSED
        self.transport.close()

    def fail(self, exc: FastrouteError) -> None:
        """Close after a link-level error: with a BYE when the link keys exist."""
        self.wiring.count_error(exc.code)
        log.debug("closing connection: %s", exc)
        if isinstance(exc, DecryptError) or self.tx is None:
            self.abort()
        else:
            self.close(exc.code, str(exc))

    def abort(self) -> None:
        """Drop the connection at once, saying nothing."""
        self.state = _CLOSED
        if self.transport is not None:
            self.transport.abort()
