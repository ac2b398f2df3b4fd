"""The groups stage: membership, admins, and one ciphertext fanned out to every member device.

Feature ``"groups"`` of ``docs/PROTOCOL.md`` (section 18), which needs
``"e2ee"`` on the same link.  Groups use Sender Keys: each member device
distributes its sender key to the other member devices with per-device sends
(DSEND, which a shared group permits), then every group message is **one**
ciphertext that the relay stores once and fans out to every member device.

* A group has a relay-assigned random 16-byte id, members (each an admin or
  not), pending invites and a **member-device-set version** that changes
  whenever a member joins or goes, or a member's device joins or leaves its
  device list.  The relay stores nothing else of a group (no title, no
  avatar: those travel end-to-end encrypted inside group messages).
* State lives in the key directory's SQLite file (its writer thread and
  group commit, ``synchronous=FULL``); memory mirrors it once a change
  committed, and every change is then told to the member devices as a
  persistent GEVENT, one stored row for all of them, in the same per-device
  stream as messages.  A change commits, then its event is stored, then the
  next change's: events reach every device in the order of the changes.
* GSEND names the version the sender distributed its key to; a stale version
  is refused whole (``DEVICE_MISMATCH`` with the current version and, on
  links that negotiated ``"group_lists"``, the devices missing, extra and
  stale since that version, from a bounded in-memory log of the set's
  changes).  The accepted message is stored once with an inbox row per
  recipient device, and the engine gets the same payload object for each
  online recipient device (``Router.offer_many``): one tail, shared, never
  copied per device.  Members whose backlog is at a ``RECIPIENT_FULL`` cap
  get no row (the others do); a send none of whose recipients could take it
  is refused with ``RECIPIENT_FULL``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import msgpack

from .. import wire
from .._compiled import twin
from ..dedup import PENDING, DedupTable
from ..errors import ErrorCode, GroupFull, NotInvited, StoreFailed
from .gate import TokenBucket

from .batch import TurnBatch
from .replies import Replies
from .senders import GDELIVER_HEAD, GEVENT_HEAD, group_event_sender, group_sender

if TYPE_CHECKING:
    from .delivery import Delivery, LinkPort
    from .keys import KeyDirectory, Keys

__all__ = ["Group", "Groups", "GEV_CREATED", "GEV_INVITED", "GEV_JOINED", "GEV_DECLINED",
           "GEV_ADDED", "GEV_REMOVED", "GEV_LEFT", "GEV_ADMIN", "GEV_DEVICE_JOINED",
           "GEV_DEVICE_LEFT", "gsend_run", "py_gsend_run"]

log = logging.getLogger("fastroute.relay")
#: GSEND's opcode as a plain int (compared once per group request)
_OP_GSEND = int(wire.Op.GSEND)

#: GEVENT kinds (docs/PROTOCOL.md 18.6)
(GEV_CREATED, GEV_INVITED, GEV_JOINED, GEV_DECLINED, GEV_ADDED, GEV_REMOVED, GEV_LEFT,
 GEV_ADMIN, GEV_DEVICE_JOINED, GEV_DEVICE_LEFT) = range(1, 11)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups(
    gid BLOB PRIMARY KEY,
    version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members(
    gid BLOB NOT NULL,
    address TEXT NOT NULL,
    admin INTEGER NOT NULL,
    since INTEGER NOT NULL,      -- join order within the group
    PRIMARY KEY(gid, address)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_invites(
    gid BLOB NOT NULL,
    address TEXT NOT NULL,
    inviter TEXT NOT NULL,
    PRIMARY KEY(gid, address)) WITHOUT ROWID;
"""

#: GADD's result: added as a member, invited, or already a member or invitee
ADDED, INVITED, ALREADY = 0, 1, 2

#: the feature whose links get GSEND's mismatch lists and skipped members
#: (docs/PROTOCOL.md 18.4); needs "groups"
LISTS = "group_lists"
#: member-device-set changes remembered per group, for the mismatch lists
#: (older versions are answered with every current device, ``complete`` false)
CHANGE_LOG = 512


def py_gsend_run(ops: list, i: int, groups: dict, sender: str, provider: str, skip: int,
                 senders: dict, refilled: set, buckets: list, dedup: Any, now: float,
                 now_ms: int, ts_packed: bytes, head: bytes, items: list, meta: list,
                 link: Any) -> int:
    """The run of a frame's GSENDs, from ``ops[i]``, that :meth:`Groups.gsend_many`
    accepts without a word to say: returns where the run stops (``len(ops)``
    when it took them all), the op it stopped at untouched.

    An op ``(opcode, id, group, version, body)`` is taken when its id is new
    for ``sender`` in ``dedup``, its group (in ``groups``) has ``sender`` as a
    member at the op's version, the group's bucket for ``provider`` was
    refilled in this frame (its id in ``refilled``), the fan-out to the
    member devices but the sending device ``skip`` is cached on the group and
    is not empty, the sender's fields for the group are cached in ``senders``
    (``(group, sender, skip) -> (packed fields, store sender)``), and the
    group's bucket and ``buckets`` (the sender's group bucket, its link's
    message and byte buckets) cover it.  Then one token of each (and the
    body's bytes) are spent, the id is recorded PENDING at ``now``, its store
    item is appended to ``items`` and ``(link, id, (GDELIVER tail, head,
    targets))`` to ``meta``.  Any other op ends the run (the caller answers
    it, or fills the caches, the precise way).  The specification of the
    compiled ``gsend_run`` (``_groups.pxi``).
    """
    n = len(ops)
    mine_bucket, msg_bucket, byte_bucket = buckets
    while i < n:
        _, cid, gid, version, body = ops[i]
        if dedup.lookup(sender, cid, now) is not None:
            break
        g = groups.get(gid)
        if g is None or version != g.version or sender not in g.members or gid not in refilled:
            break
        group_bucket = g.buckets.get(provider)
        cached = g.fanout.get((sender, skip))
        packed = senders.get((gid, sender, skip))
        if group_bucket is None or cached is None or packed is None or not cached[0]:
            break
        size = len(body)
        if (mine_bucket.tokens < 1 or group_bucket.tokens < 1
                or msg_bucket.tokens < 1 or byte_bucket.tokens < size):
            break
        mine_bucket.tokens -= 1
        group_bucket.tokens -= 1
        msg_bucket.tokens -= 1
        byte_bucket.tokens -= size
        targets, dkeys = cached
        sp, stored_sender = packed
        dedup.begin(sender, cid, PENDING, now)
        items.append((stored_sender, cid, body, now_ms, dkeys))
        meta.append((link, cid, (wire.deliver_tail(sp, cid, body, ts_packed, 0), head, targets)))
        i += 1
    return i


#: :func:`py_gsend_run`, compiled when the core is built
gsend_run = twin(py_gsend_run)


class Group:
    """What memory keeps of one group (mirrors the tables once a change committed)."""

    __slots__ = ("gid", "version", "members", "invites", "buckets", "fanout", "changes",
                 "log_from")

    def __init__(self, gid: bytes, version: int) -> None:
        self.gid = gid
        self.version = version
        #: ``(version, address, device id, reg id before, reg id after)`` of every
        #: member device that joined (before None), left (after None) or was
        #: re-created since version :attr:`log_from`, oldest first.  Memory
        #: only: after a restart the log starts at the current version.
        self.changes: deque = deque()
        self.log_from = version
        #: address -> admin, in join order
        self.members: dict[str, bool] = {}
        #: invitee address -> inviter address
        self.invites: dict[str, str] = {}
        #: group SENDs per provider of the senders (one provider's flood spends
        #: only its own share of the group's rate)
        self.buckets: dict[str, TokenBucket] = {}
        #: (sender address, sending device id) -> (recipient devices, their store keys);
        #: emptied whenever a member or a member's device list changes
        self.fanout: dict[tuple[str, int], tuple[list, list]] = {}

    def log(self, version: int, address: str, devices: list) -> None:
        """Remember that ``devices`` (``(device id, reg before, reg after)``) of
        ``address`` changed at ``version``; the log keeps :data:`CHANGE_LOG`."""
        changes = self.changes
        for did, before, after in devices:
            changes.append((version, address, did, before, after))
        while len(changes) > CHANGE_LOG:
            self.log_from = max(self.log_from, changes.popleft()[0])

    def mismatch(self, lists: dict, sender: str, skip: int, version: int) -> list:
        """GSEND's ``DEVICE_MISMATCH`` result for a sender whose key went to the
        member devices of ``version``: ``[current version, missing, extra, stale,
        complete]`` (docs/PROTOCOL.md 18.4).  The set at ``version`` is the
        current one with the logged changes since undone, newest first."""
        current = {}
        for address in self.members:
            for did, slot in lists.get(address, {}).items():
                current[(address, did)] = slot.reg_id
        current.pop((sender, skip), None)
        if not self.log_from <= version < self.version:
            # too old for the log (or from before a restart), or never issued:
            # every current device, so the sender redistributes to all
            return [self.version, [[a, d, r] for (a, d), r in sorted(current.items())], [],
                    [], False]
        before = dict(current)
        for v, address, did, old, _ in reversed(self.changes):
            if v <= version:
                break
            if old is None:
                before.pop((address, did), None)
            else:
                before[(address, did)] = old
        before.pop((sender, skip), None)
        missing = [[a, d, r] for (a, d), r in sorted(current.items()) if (a, d) not in before]
        extra = [[a, d] for (a, d) in sorted(before) if (a, d) not in current]
        stale = [[a, d, r] for (a, d), r in sorted(current.items())
                 if (a, d) in before and before[(a, d)] != r]
        return [self.version, missing, extra, stale, True]


class Groups:
    """The groups stage of one relay: group ops, membership events, group SEND."""

    def __init__(self, config: Any, directory: "KeyDirectory", keys: "Keys",
                 delivery: "Delivery", count_error: Callable[[int], None]) -> None:
        self.config = config
        self.dir = directory
        self.keys = keys
        self.delivery = delivery
        self.count_error = count_error
        #: this stage's REPLY ops (counted refusals)
        self.replies = Replies(delivery, count_error)
        self.dedup = DedupTable(config.dedup_window_s, config.dedup_max_entries,
                                presize=True)
        self.groups: dict[bytes, Group] = {}
        #: address -> ids of the groups it is a member of / invited to
        self.member_of: dict[str, set[bytes]] = {}
        self.invited_to: dict[str, set[bytes]] = {}
        self._send_buckets: dict[str, TokenBucket] = {}
        self._change_buckets: dict[str, TokenBucket] = {}
        self._senders: dict[tuple[bytes, str, int], tuple[bytes, str]] = {}
        self.accepted = 0
        self.fanned_out = 0
        #: members skipped by accepted GSENDs because their backlog was at a cap
        self.skipped_full = 0
        #: (sender, id) -> addresses an accepted GSEND skipped, for its REPLY
        self._skipped: dict[tuple[str, bytes], list] = {}
        # GSENDs accepted in this loop turn, stored together, then answered
        self._batch = TurnBatch(delivery, self.dedup, self._reply, self._place,
                                "group sends", "groups.store_failed", self._replies_ok)
        self._load()

    # ------------------------------------------------------------ state
    def _load(self) -> None:
        conn = sqlite3.connect(self.dir.path)
        try:
            conn.executescript(_SCHEMA)
            for gid, version in conn.execute("SELECT gid, version FROM groups"):
                self.groups[gid] = Group(gid, version)
            for gid, address, admin in conn.execute(
                    "SELECT gid, address, admin FROM group_members ORDER BY gid, since"):
                g = self.groups.get(gid)
                if g is not None:
                    g.members[address] = bool(admin)
                    self.member_of.setdefault(address, set()).add(gid)
            for gid, address, inviter in conn.execute(
                    "SELECT gid, address, inviter FROM group_invites"):
                g = self.groups.get(gid)
                if g is not None:
                    g.invites[address] = inviter
                    self.invited_to.setdefault(address, set()).add(gid)
        finally:
            conn.close()

    def shares_group(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` are members of one group (permits their DSENDs)."""
        ga = self.member_of.get(a)
        gb = self.member_of.get(b)
        return bool(ga and gb and not ga.isdisjoint(gb))

    def devices_changing(self, address: str) -> None:
        """A member's device list is changing now: forget the fan-out lists of its groups."""
        for gid in self.member_of.get(address, ()):
            g = self.groups.get(gid)
            if g is not None:
                g.fanout.clear()

    def _regs(self, address: str) -> list:
        """``[(device id, reg id), ...]`` of the device list of ``address``."""
        return [(did, slot.reg_id) for did, slot in self.dir.lists.get(address, {}).items()]

    def _join(self, g: Group, address: str, admin: bool) -> None:
        g.fanout.clear()
        g.members[address] = admin
        self.member_of.setdefault(address, set()).add(g.gid)

    def _drop_member(self, g: Group, address: str) -> None:
        g.fanout.clear()
        g.members.pop(address, None)
        mine = self.member_of.get(address)
        if mine is not None:
            mine.discard(g.gid)
            if not mine:
                del self.member_of[address]

    def _drop_invite(self, g: Group, address: str) -> None:
        g.invites.pop(address, None)
        mine = self.invited_to.get(address)
        if mine is not None:
            mine.discard(g.gid)
            if not mine:
                del self.invited_to[address]

    def _forget_group(self, g: Group) -> None:
        for address in list(g.members):
            self._drop_member(g, address)
        for address in list(g.invites):
            self._drop_invite(g, address)
        self.groups.pop(g.gid, None)

    # ------------------------------------------------------------ helpers
    def _reply(self, link: "LinkPort", cid: bytes, code: int, result: Any = None) -> None:
        if self._skipped and result is None:
            # an accepted GSEND that skipped members at a cap says which (group_lists)
            skipped = self._skipped.pop((link.address, cid), None)
            if not code and skipped is not None:
                result = skipped
        self.replies.reply(link, cid, code, result)

    def _replies_ok(self, link: "LinkPort", cids: list) -> None:
        """:meth:`_reply` with code 0 for each of ``cids``, at once when no
        accepted GSEND waits to say which members it skipped."""
        if self._skipped:
            for cid in cids:
                self._reply(link, cid, 0)
        else:
            self.replies.replies_ok(link, cids)

    @staticmethod
    def _refund(mine: TokenBucket, group: TokenBucket, lg: Any, size: int) -> None:
        """Give back what a GSEND refused after its quotas were taken had spent."""
        mine.tokens += 1
        group.tokens += 1
        lg.msg_bucket.tokens += 1
        lg.byte_bucket.tokens += size

    @staticmethod
    def _bucket(table: dict, key: str, rate: float, burst: float) -> TokenBucket:
        bucket = table.get(key)
        if bucket is None:
            if len(table) > 1 << 20:
                table.clear()  # bounded; a refill for all is harmless
            bucket = table[key] = TokenBucket(rate, burst)
        return bucket

    def _change_allowed(self, link: "LinkPort", cid: bytes) -> bool:
        cfg = self.config
        if self._bucket(self._change_buckets, link.address, cfg.group_changes_per_s,
                        cfg.group_changes_burst).take():
            return True
        self._reply(link, cid, ErrorCode.RATE_LIMITED)
        return False

    def _member_group(self, link: "LinkPort", cid: bytes, gid: bytes,
                      admin: bool = False) -> Group | None:
        """The group if the requester is a member (an admin, with ``admin``); else answer."""
        g = self.groups.get(gid)
        if g is None:
            self._reply(link, cid, ErrorCode.UNKNOWN_GROUP)
            return None
        is_admin = g.members.get(link.address)
        if is_admin is None:
            self._reply(link, cid, ErrorCode.NOT_MEMBER)
            return None
        if admin and not is_admin:
            self._reply(link, cid, ErrorCode.NOT_ADMIN)
            return None
        return g

    def _submit(self, link: "LinkPort", cid: bytes, work: Callable,
                then: Callable[[Any], Any]) -> None:
        """Run ``work`` in the directory's writer; ``then(result)`` gives the REPLY result."""
        fut = self.dir.submit(work)

        def done(f: asyncio.Future) -> None:
            exc = f.exception() if not f.cancelled() else StoreFailed("closed")
            if exc is not None:
                self._reply(link, cid, int(getattr(exc, "code", ErrorCode.STORE_FAILED)))
                return
            self._reply(link, cid, 0, then(f.result()))

        fut.add_done_callback(done)

    # ------------------------------------------------------------ requests
    def request(self, link: "LinkPort", op: tuple) -> None:
        """Handle one op of feature "groups" (the link negotiated it)."""
        kind = op[0]
        if kind == _OP_GSEND:
            self.gsend(link, op[1], op[2], op[3], op[4])
        elif kind == wire.Op.GMEMBERS:
            self.members(link, op[1], op[2])
        elif kind == wire.Op.GCREATE:
            self.create(link, op[1])
        elif kind == wire.Op.GADD:
            self.add(link, op[1], op[2], op[3])
        elif kind == wire.Op.GANSWER:
            self.answer(link, op[1], op[2], op[3])
        elif kind == wire.Op.GREMOVE:
            self.remove(link, op[1], op[2], op[3])
        elif kind == wire.Op.GLEAVE:
            self.leave(link, op[1], op[2])
        elif kind == wire.Op.GADMIN:
            self.admin(link, op[1], op[2], op[3], op[4])

    def create(self, link: "LinkPort", cid: bytes) -> None:
        """GCREATE: a new group whose only member, an admin, is the requester."""
        if self.dir.slot_of(link) is None:
            self._reply(link, cid, ErrorCode.NO_KEYS)
            return
        address = link.address
        if len(self.member_of.get(address, ())) >= self.config.groups_per_user:
            self._reply(link, cid, ErrorCode.GROUP_LIMIT)
            return
        if not self._change_allowed(link, cid):
            return
        gid = os.urandom(16)

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO groups(gid, version) VALUES (?, 1)", (gid,))
            conn.execute("INSERT INTO group_members(gid, address, admin, since) "
                         "VALUES (?, ?, 1, 1)", (gid, address))

        def then(_: None) -> bytes:
            g = self.groups[gid] = Group(gid, 1)
            self._join(g, address, True)
            self._event(g, [address], GEV_CREATED, [gid, 1, address])
            return gid

        self._submit(link, cid, work, then)

    def add(self, link: "LinkPort", cid: bytes, gid: bytes, address: str) -> None:
        """GADD: an admin adds a user of its own provider, or invites anyone else's."""
        g = self._member_group(link, cid, gid, admin=True)
        if g is None:
            return
        if address in g.members or address in g.invites:
            self._reply(link, cid, 0, ALREADY)
            return
        # the same bytes as for an address that does not exist: no directory
        if not self.keys.may_reach(link, address):
            self._reply(link, cid, ErrorCode.UNKNOWN_RECIPIENT)
            return
        cfg = self.config
        if len(g.members) + len(g.invites) >= cfg.group_max_members:
            self._reply(link, cid, ErrorCode.GROUP_FULL)
            return
        # a provider's policy may require invites for its own users too
        direct = address.endswith("@" + link.provider) and not cfg.group_invite_own_users
        if direct and len(self.member_of.get(address, ())) >= cfg.groups_per_user or (
                not direct and len(self.invited_to.get(address, ())) >= cfg.group_invites_per_user):
            self._reply(link, cid, ErrorCode.GROUP_LIMIT)
            return
        if not self._change_allowed(link, cid):
            return
        by = link.address
        cap = cfg.group_max_members

        def work(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute("SELECT (SELECT count(*) FROM group_members WHERE gid = ?1) + "
                                "(SELECT count(*) FROM group_invites WHERE gid = ?1)",
                                (gid,)).fetchone()
            if n >= cap:
                raise GroupFull(f"a group has at most {cap} members and invites")
            if direct:
                (since,) = conn.execute("SELECT coalesce(max(since), 0) + 1 FROM group_members "
                                        "WHERE gid = ?", (gid,)).fetchone()
                if not conn.execute("INSERT OR IGNORE INTO group_members(gid, address, admin, "
                                    "since) VALUES (?, ?, 0, ?)",
                                    (gid, address, since)).rowcount:
                    return -1  # a concurrent GADD added it first
                (version,) = conn.execute("UPDATE groups SET version = version + 1 "
                                          "WHERE gid = ? RETURNING version", (gid,)).fetchone()
                return int(version)
            if not conn.execute("INSERT OR IGNORE INTO group_invites(gid, address, inviter) "
                                "VALUES (?, ?, ?)", (gid, address, by)).rowcount:
                return -1
            return 0

        def then(version: int) -> int:
            if self.groups.get(gid) is not g or version < 0:
                return ALREADY
            if direct:
                g.version = version
                g.log(version, address, [(d, None, r) for d, r in self._regs(address)])
                self._join(g, address, False)
                self._event(g, list(g.members), GEV_ADDED, [gid, version, by, address])
                return ADDED
            g.invites[address] = by
            self.invited_to.setdefault(address, set()).add(gid)
            self._event(g, [*g.members, address], GEV_INVITED, [gid, g.version, by, address])
            return INVITED

        self._submit(link, cid, work, then)

    def answer(self, link: "LinkPort", cid: bytes, gid: bytes, accept: bool) -> None:
        """GANSWER: the invitee accepts (becomes a member) or declines an invite."""
        address = link.address
        g = self.groups.get(gid)
        if g is None or address not in g.invites:
            self._reply(link, cid, ErrorCode.NOT_INVITED)
            return
        if accept and len(self.member_of.get(address, ())) >= self.config.groups_per_user:
            self._reply(link, cid, ErrorCode.GROUP_LIMIT)
            return
        if accept and self.dir.slot_of(link) is None:
            self._reply(link, cid, ErrorCode.NO_KEYS)
            return

        def work(conn: sqlite3.Connection) -> int:
            if not conn.execute("DELETE FROM group_invites WHERE gid = ? AND address = ?",
                                (gid, address)).rowcount:
                raise NotInvited("the invite is no longer pending")
            if not accept:
                return 0
            (since,) = conn.execute("SELECT coalesce(max(since), 0) + 1 FROM group_members "
                                    "WHERE gid = ?", (gid,)).fetchone()
            conn.execute("INSERT INTO group_members(gid, address, admin, since) "
                         "VALUES (?, ?, 0, ?)", (gid, address, since))
            (version,) = conn.execute("UPDATE groups SET version = version + 1 WHERE gid = ? "
                                      "RETURNING version", (gid,)).fetchone()
            return int(version)

        def then(version: int) -> None:
            if self.groups.get(gid) is not g or address not in g.invites:
                return
            self._drop_invite(g, address)
            if accept:
                g.version = version
                g.log(version, address, [(d, None, r) for d, r in self._regs(address)])
                self._join(g, address, False)
                self._event(g, list(g.members), GEV_JOINED, [gid, version, address])
            else:
                self._event(g, [*g.members, address], GEV_DECLINED, [gid, g.version, address])

        self._submit(link, cid, work, then)

    def remove(self, link: "LinkPort", cid: bytes, gid: bytes, address: str) -> None:
        """GREMOVE: an admin removes a member, or withdraws a pending invite."""
        g = self._member_group(link, cid, gid, admin=True)
        if g is None:
            return
        if address not in g.members and address not in g.invites:
            self._reply(link, cid, ErrorCode.NOT_MEMBER)
            return
        if not self._change_allowed(link, cid):
            return
        self._take_out(link, cid, g, address, link.address, GEV_REMOVED)

    def leave(self, link: "LinkPort", cid: bytes, gid: bytes) -> None:
        """GLEAVE: the requester leaves; the last admin's leaving promotes the oldest member."""
        g = self._member_group(link, cid, gid)
        if g is None:
            return
        self._take_out(link, cid, g, link.address, link.address, GEV_LEFT)

    def _take_out(self, link: "LinkPort", cid: bytes, g: Group, address: str, by: str,
                  kind: int) -> None:
        gid = g.gid
        invite = address not in g.members

        def work(conn: sqlite3.Connection) -> tuple[int, str | None]:
            if invite:
                conn.execute("DELETE FROM group_invites WHERE gid = ? AND address = ?",
                             (gid, address))
                return 0, None
            conn.execute("DELETE FROM group_members WHERE gid = ? AND address = ?",
                         (gid, address))
            left = conn.execute("SELECT address, admin FROM group_members WHERE gid = ? "
                                "ORDER BY since", (gid,)).fetchall()
            if not left:
                conn.execute("DELETE FROM group_invites WHERE gid = ?", (gid,))
                conn.execute("DELETE FROM groups WHERE gid = ?", (gid,))
                return 0, None
            promoted = None
            if not any(admin for _, admin in left):
                promoted = left[0][0]
                conn.execute("UPDATE group_members SET admin = 1 WHERE gid = ? AND address = ?",
                             (gid, promoted))
            (version,) = conn.execute("UPDATE groups SET version = version + 1 WHERE gid = ? "
                                      "RETURNING version", (gid,)).fetchone()
            return int(version), promoted

        def then(result: tuple[int, str | None]) -> None:
            version, promoted = result
            if self.groups.get(gid) is not g:
                return
            if invite:
                if address in g.invites:
                    self._drop_invite(g, address)
                    self._event(g, [*g.members, address], GEV_REMOVED,
                                [gid, g.version, by, address])
                return
            if address not in g.members:
                return
            # the removed member's devices get this event last of the group
            targets = list(g.members)
            self._drop_member(g, address)
            if not version:
                self._event(g, targets, kind, [gid, 0, by, address] if kind == GEV_REMOVED
                            else [gid, 0, address])
                self._forget_group(g)
                return
            g.version = version
            g.log(version, address, [(d, r, None) for d, r in self._regs(address)])
            self._event(g, targets, kind, [gid, version, by, address] if kind == GEV_REMOVED
                        else [gid, version, address])
            if promoted is not None:
                g.members[promoted] = True
                self._event(g, list(g.members), GEV_ADMIN, [gid, version, "", promoted, True])

        self._submit(link, cid, work, then)

    def admin(self, link: "LinkPort", cid: bytes, gid: bytes, address: str,
              admin: bool) -> None:
        """GADMIN: an admin promotes or demotes a member (never the last admin)."""
        g = self._member_group(link, cid, gid, admin=True)
        if g is None:
            return
        if address not in g.members:
            self._reply(link, cid, ErrorCode.NOT_MEMBER)
            return
        if g.members[address] == admin:
            self._reply(link, cid, 0, ALREADY)
            return
        if not admin and sum(g.members.values()) <= 1:
            self._reply(link, cid, ErrorCode.LAST_ADMIN)
            return
        if not self._change_allowed(link, cid):
            return
        by = link.address

        def work(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE group_members SET admin = ? WHERE gid = ? AND address = ?",
                         (int(admin), gid, address))

        def then(_: None) -> int:
            if self.groups.get(gid) is g and address in g.members:
                g.members[address] = admin
                self._event(g, list(g.members), GEV_ADMIN, [gid, g.version, by, address, admin])
            return 0

        self._submit(link, cid, work, then)

    def members(self, link: "LinkPort", cid: bytes, gid: bytes) -> None:
        """GMEMBERS: ``[version, [address, admin, [[device id, reg id], ...]], ...,
        [invitee, nil, []], ...]``, members only; split over REPLYs past a frame."""
        g = self._member_group(link, cid, gid)
        if g is None:
            return
        lists = self.dir.lists
        packb = msgpack.packb
        items = [packb(g.version)]
        for address, is_admin in g.members.items():
            devs = lists.get(address, {})
            items.append(packb([address, is_admin,
                                [[d, devs[d].reg_id] for d in sorted(devs)]]))
        for address in g.invites:
            items.append(packb([address, None, []]))
        self.replies.reply_parts(link, cid, items)

    # ------------------------------------------------------------ GSEND
    def gsend(self, link: "LinkPort", cid: bytes, gid: bytes, version: int,
              body: bytes) -> None:
        """GSEND: one ciphertext for every member device but the sender's (module doc)."""
        self.gsend_many(link, [(_OP_GSEND, cid, gid, version, body)])

    def gsend_many(self, link: "LinkPort", ops: list) -> None:
        """GSENDs ``(opcode, id, group, version, body)`` of one link, in order (a
        frame's, which the link hands over together): each answered or queued
        for the turn's store batch as :meth:`gsend` says, with the per-link
        work done once: the clocks, the sender's slot, and its send bucket and
        link budgets refilled once (each op spends from them, as a DSEND frame
        does); a group's bucket is refilled the first time the frame names it."""
        sender = link.address
        now = time.monotonic()
        mine = self.dir.slot_of(link)
        cfg = self.config
        mine_bucket = self._bucket(self._send_buckets, sender, cfg.group_msgs_per_s,
                                   cfg.group_msgs_burst)
        lg = link.gate_state
        msg_bucket, byte_bucket = lg.msg_bucket, lg.byte_bucket
        mine_bucket.refill()
        msg_bucket.refill()
        byte_bucket.refill()
        refilled: set = set()
        now_ms = int(time.time() * 1000)
        ts = wire.ts_packed(now_ms)
        batch = self._batch
        lists = self.dir.lists
        full = self.delivery.caps.full
        groups = self.groups
        dedup = self.dedup
        seen = dedup.lookup
        items, meta = batch.items, batch.meta
        taken = 0
        buckets = [mine_bucket, msg_bucket, byte_bucket]
        provider = link.provider
        i, n = 0, len(ops)
        try:
            while i < n:
                if mine is not None and not full:
                    # the run of ops accepted without a word to say, compiled:
                    # what a member's client sends for every group message
                    k = gsend_run(ops, i, groups, sender, provider, mine.device_id,
                                  self._senders, refilled, buckets, dedup, now, now_ms, ts,
                                  GDELIVER_HEAD, items, meta, link)
                    taken += k - i
                    i = k
                    if i == n:
                        break
                # the op the run stopped at: answered, or the caches it
                # missed filled, here
                _, cid, gid, version, body = ops[i]
                i += 1
                if seen(sender, cid, now) is not None and batch.resent(link, cid, now):
                    continue
                g = groups.get(gid)
                if g is None or sender not in g.members:
                    self._member_group(link, cid, gid)  # its refusal
                    continue
                if mine is None:
                    self._reply(link, cid, ErrorCode.NO_KEYS)
                    continue
                if version != g.version:
                    if LISTS not in link.features:
                        self._reply(link, cid, ErrorCode.DEVICE_MISMATCH, [g.version])
                    elif mine_bucket.tokens >= 1:
                        # the lists cost a walk of the member devices: a send token each
                        mine_bucket.tokens -= 1
                        self._reply(link, cid, ErrorCode.DEVICE_MISMATCH,
                                    g.mismatch(lists, sender, mine.device_id, version))
                    else:
                        self._reply(link, cid, ErrorCode.RATE_LIMITED)
                    continue
                group_bucket = g.buckets.get(link.provider)
                if group_bucket is None:
                    group_bucket = g.buckets[link.provider] = TokenBucket(
                        cfg.group_msgs_per_group_s, cfg.group_msgs_per_group_burst)
                if gid not in refilled:
                    group_bucket.refill()
                    refilled.add(gid)
                size = len(body)
                if (mine_bucket.tokens < 1 or group_bucket.tokens < 1
                        or msg_bucket.tokens < 1 or byte_bucket.tokens < size):
                    self._reply(link, cid, ErrorCode.RATE_LIMITED)
                    continue
                mine_bucket.tokens -= 1
                group_bucket.tokens -= 1
                msg_bucket.tokens -= 1
                byte_bucket.tokens -= size
                skip = mine.device_id
                cached = g.fanout.get((sender, skip))
                if cached is None:
                    cached = self._fanout(g, lists, sender, skip)
                targets, dkeys = cached
                packed = self._senders.get((gid, sender, skip))
                if packed is None:
                    packed = self._sender_fields(gid, sender, skip)
                sp, stored_sender = packed
                if full and targets:
                    # as SEND to them would be: members whose backlog is at a cap get
                    # no row; the others get the message (one member's backlog never
                    # stops a group); none left: refused like a SEND
                    skipped = sorted({a for a, _ in targets if a in full})
                    if skipped:
                        kept = [i for i, (a, _) in enumerate(targets) if a not in full]
                        if not kept:
                            self._refund(mine_bucket, group_bucket, lg, size)
                            self._reply(link, cid, ErrorCode.RECIPIENT_FULL)
                            continue
                        targets = [targets[i] for i in kept]
                        dkeys = [dkeys[i] for i in kept]
                        self.skipped_full += len(skipped)
                        if LISTS in link.features:
                            if len(self._skipped) > 1 << 16:
                                self._skipped.clear()
                            self._skipped[(sender, cid)] = skipped
                if not targets:
                    # no other member device: accepted, nothing to store
                    dedup.begin(sender, cid, 0, now)
                    self._reply(link, cid, 0)
                    continue
                dedup.begin(sender, cid, PENDING, now)
                items.append((stored_sender, cid, body, now_ms, dkeys))
                meta.append((link, cid, (wire.deliver_tail(sp, cid, body, ts, 0), GDELIVER_HEAD,
                                         targets)))
                taken += 1
        finally:
            if taken:
                # said once for the frame's accepted ones, as Keys.dsend_many does
                batch.added(link, taken)

    def _fanout(self, g: Group, lists: dict, sender: str, skip: int) -> tuple[list, list]:
        """The ``(address, device name)`` targets and store keys of ``g``'s member
        devices but the sender's ``skip``, cached on the group (cleared when a
        member joins or leaves, or a member's device list changes)."""
        targets: list = []
        dkeys: list = []
        for address in g.members:
            for did, slot in lists.get(address, {}).items():
                if address != sender or did != skip:
                    targets.append((address, slot.name))
                    dkeys.append(slot.dkeys[0])
        if len(g.fanout) > 64:
            g.fanout.clear()
        cached = g.fanout[(sender, skip)] = (targets, dkeys)
        return cached

    def _sender_fields(self, gid: bytes, sender: str, skip: int) -> tuple[bytes, str]:
        """The packed GDELIVER sender fields and the stored sender of a group
        message from ``sender``'s device ``skip``, cached."""
        if len(self._senders) > 1 << 16:
            self._senders.clear()
        packed = self._senders[(gid, sender, skip)] = (
            msgpack.packb(gid) + msgpack.packb(sender) + msgpack.packb(skip),
            group_sender(gid, sender, skip))
        return packed

    def _place(self, meta: list, mids: list) -> None:
        """A batch of GSENDs was stored: fan each out to its member devices."""
        self.fanned_out += self.delivery.persisted_shared(
            [(mid, shared) for mid, (_, _, shared) in zip(mids, meta)], mids[-1], "groups")
        self.accepted += len(mids)

    # ------------------------------------------------------------ events
    def _event(self, g: Group, addresses: list, kind: int, data: list) -> None:
        """Store one GEVENT row for every device of ``addresses``; route it."""
        lists = self.dir.lists
        targets = []
        dkeys = []
        for address in addresses:
            for slot in lists.get(address, {}).values():
                targets.append((address, slot.name))
                dkeys.append(slot.dkeys[0])
        if not targets:
            return
        now_ms = int(time.time() * 1000)
        body = msgpack.packb(data)
        eid = os.urandom(16)
        tail = wire.deliver_tail(msgpack.packb(kind), eid, body, wire.ts_packed(now_ms), 0)
        fut = self.delivery.persist([(group_event_sender(kind), eid, body, now_ms, dkeys)])

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                self.delivery.persisted(None, 0)
                log.warning("a group event could not be stored",
                            extra={"event": "groups.event_failed"})
                return
            (mid,) = f.result()
            self.delivery.persisted_shared([(mid, (tail, GEVENT_HEAD, targets))], mid, "groups")

        fut.add_done_callback(done)

    @staticmethod
    def bump_work(conn: sqlite3.Connection, address: str) -> list:
        """In a directory transaction: a new version for every group ``address``
        is a member of (read from the tables, so it is exact within the
        transaction); ``[(group id, version), ...]`` for :meth:`device_bumped`."""
        return [(gid, int(version)) for gid, version in conn.execute(
            "UPDATE groups SET version = version + 1 WHERE gid IN "
            "(SELECT gid FROM group_members WHERE address = ?) RETURNING gid, version",
            (address,)).fetchall()]

    def device_bumped(self, address: str, device_id: int, reg_id: int | None,
                      before: int | None, bumps: list) -> None:
        """The versions :meth:`bump_work` committed for a device of ``address``
        that joined (``reg_id``) or left (None): mirror them, log the change,
        tell the member devices."""
        self.devices_changing(address)
        for gid, version in sorted(bumps):
            g = self.groups.get(gid)
            if g is None:
                continue
            g.version = version
            g.log(version, address, [(device_id, before, reg_id)])
            if reg_id is not None:
                self._event(g, list(g.members), GEV_DEVICE_JOINED,
                            [gid, version, address, device_id, reg_id])
            else:
                self._event(g, list(g.members), GEV_DEVICE_LEFT,
                            [gid, version, address, device_id])

    def device_changed(self, address: str, device_id: int, reg_id: int | None,
                       before: int | None = None) -> None:
        """A member's device joined its list (``reg_id``) or left it (None): every
        group of the address gets a new version and tells its member devices.
        ``before`` is the device's registration id until now (a re-created
        device, or one that left), None if it is new.  (A joining device is
        bumped in the transaction that lists it, :meth:`bump_work`, so no
        GSEND at the old version can reach it; this is for devices leaving.)"""
        if not self.member_of.get(address):
            return
        self.devices_changing(address)
        fut = self.dir.submit(lambda conn: self.bump_work(conn, address))

        def done(f: asyncio.Future) -> None:
            if f.cancelled() or f.exception() is not None:
                log.warning("a group version could not be stored",
                            extra={"event": "groups.version_failed"})
                return
            self.device_bumped(address, device_id, reg_id, before, f.result())

        fut.add_done_callback(done)
