"""Feature "groups": the mismatch lists, the limits, caps, memory budget and
per-provider fairness of the group fan-out, over a real relay on loopback.

Counts, never timings: what each device got, in which order, and what the
relay refused with which code.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from fastroute import wire
from fastroute.errors import (
    ErrorCode,
    GroupLimit,
    GroupMismatch,
    RateLimited,
    RecipientFull,
)
from fastroute.relay.groups import GEV_ADDED, GEV_INVITED, GEV_REMOVED

from relayutil import run, world
from test_e2ee import keyset, recorder
from test_groups import FEATURES, kinds, member, quiet, take


async def drain(c, wait: float = 0.3) -> list:
    """Every group message and event ``c`` gets until ``wait`` s pass without one."""
    out: list = []
    while True:
        try:
            out += await take(c, 1, wait)
        except asyncio.TimeoutError:
            return out


async def bodies_until(c, want: int, timeout: float = 10.0) -> list:
    """The group messages ``c`` gets (events skipped) until there are ``want``."""
    out: list = []
    while len(out) < want:
        out += [m for m in await take(c, 1, timeout) if hasattr(m, "body")]
    return out


async def alice_bob_carol(w) -> tuple:
    """Three members on a phone each, and the group alice made and added the others to."""
    a = await member(w, "alice@home", "phone", 11)
    b = await member(w, "bob@home", "phone", 21)
    c = await member(w, "carol@home", "phone", 31)
    gid = await a.create_group()
    await a.group_add(gid, "bob@home")
    await a.group_add(gid, "carol@home")
    return a, b, c, gid


def test_a_stale_gsend_is_told_which_devices_are_missing_extra_and_stale(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            a = await member(w, "alice@home", "phone", 11)
            a2 = await member(w, "alice@home", "laptop", 12)
            b = await member(w, "bob@home", "phone", 21)
            d = await member(w, "dave@home", "phone", 41)
            assert "group_lists" in a.features  # the client asks with "groups"
            gid = await a.create_group()
            await a.group_add(gid, "bob@home")
            await a.group_add(gid, "dave@home")
            v0, _, _ = await a.group_members(gid)
            await a.group_send(gid, v0, b"to v0")  # the key went to the set of v0
            # since v0: carol joins, bob gets a tablet, bob's phone is re-created
            # (new registration id), dave is removed
            c = await member(w, "carol@home", "phone", 31)
            await a.group_add(gid, "carol@home")
            v1, _, _ = await a.group_members(gid)
            b2 = await member(w, "bob@home", "tablet", 22)
            await b.publish_keys(**keyset(29, n_ec=1, n_kem=1))
            await a.group_remove(gid, "dave@home")
            v, members, _ = await a.group_members(gid)
            assert v == v0 + 4
            with pytest.raises(GroupMismatch) as m:
                await a.group_send(gid, v0, b"stale", id=b"s" * 16)
            assert m.value.version == v and m.value.complete is True
            assert m.value.missing == [("bob@home", 2, 22), ("carol@home", 1, 31)]
            assert m.value.extra == [("dave@home", 1)]
            assert m.value.stale == [("bob@home", 1, 29)]
            # relative to the sender's version: from v1 carol is no longer missing
            with pytest.raises(GroupMismatch) as m1:
                await a.group_send(gid, v1, b"stale")
            assert (m1.value.missing, m1.value.extra, m1.value.stale) == (
                [("bob@home", 2, 22)], [("dave@home", 1)], [("bob@home", 1, 29)])
            # a version never issued: every current member device, incomplete
            with pytest.raises(GroupMismatch) as future:
                await a.group_send(gid, v + 5, b"stale")
            assert future.value.complete is False
            assert future.value.missing == [("alice@home", 2, 12), ("bob@home", 1, 29),
                                            ("bob@home", 2, 22), ("carol@home", 1, 31)]
            # exactly those lists redistributed to, the same id goes through
            await a.group_send(gid, v, b"stale", id=b"s" * 16)
            assert [m.body for m in await bodies_until(c, 1)] == [b"stale"]
            assert [m.body for m in await bodies_until(b2, 1)] == [b"stale"]
            assert [m.body for m in await bodies_until(a2, 2)] == [b"to v0", b"stale"]
            assert [m.body for m in await bodies_until(d, 1)] == [b"to v0"]
            rest = await drain(d)
            assert rest and rest[-1].kind == GEV_REMOVED  # its last of the group
            assert not any(hasattr(m, "body") for m in rest)
            # a link without "group_lists" still gets [version] only
            old = await w.connect("bob@home", "old", features=("e2ee",))
            await old.negotiate(("groups",))
            assert "group_lists" not in old.features
            await old.publish_keys(**keyset(23, n_ec=1, n_kem=1))
            with pytest.raises(GroupMismatch) as bare:
                await old.group_send(gid, v, b"x")
            assert bare.value.version == v + 1 and bare.value.complete is None
            assert bare.value.missing == bare.value.extra == bare.value.stale == []
            raw = await recorder(w, "carol@home", "raw", features=("e2ee",))
            await raw.negotiate(("groups",))
            await raw.publish_keys(**keyset(32, n_ec=1, n_kem=1))
            raw._write([wire.group_op(wire.Op.GSEND, b"r" * 16, gid, v0, b"x")])
            await raw.ping()
            replies = [op for pt in raw.plaintexts for op in wire.decode_server_frame(pt)
                       if op[0] == wire.Op.REPLY and op[1] == b"r" * 16]
            assert len(replies) == 1
            assert list(replies[0][2:4]) == [ErrorCode.DEVICE_MISMATCH, True]
            assert list(replies[0][4]) == [v + 2]  # a v1-of-groups client reads this
    run("asyncio", main())


def test_groups_per_user_limit(tmp_path):
    async def main():
        async with world(tmp_path, groups_per_user=2) as w:
            a = await member(w, "alice@home", "phone", 11)
            b = await member(w, "bob@home", "phone", 21)
            c = await member(w, "carol@acme", "phone", 31)
            g1 = await a.create_group()
            g2 = await a.create_group()
            with pytest.raises(GroupLimit) as over:
                await a.create_group()
            assert over.value.code == ErrorCode.GROUP_LIMIT
            gb1, gb2, gb3 = [await b.create_group() for _ in range(2)] + [None]
            # bob is in 2 groups: he cannot be added to a third, nor accept one
            with pytest.raises(GroupLimit):
                await a.group_add(g1, "bob@home")
            assert await b.group_add(gb1, "carol@acme") == 1
            assert await b.group_add(gb2, "carol@acme") == 1
            assert await a.group_add(g1, "carol@acme") == 1
            await c.group_answer(gb1, True)
            await c.group_answer(gb2, True)
            with pytest.raises(GroupLimit):
                await c.group_answer(g1, True)  # the invite stays pending
            v, members, invitees = await a.group_members(g1)
            assert [m[0] for m in members] == ["alice@home"] and invitees == ["carol@acme"]
            # nothing accepted is lost: every group is whole and usable
            for x, g, n in ((a, g2, 1), (b, gb1, 2), (b, gb2, 2)):
                v, members, _ = await x.group_members(g)
                assert len(members) == n
                await x.group_send(g, v, b"still works")
            await c.group_leave(gb1)
            await c.group_answer(g1, True)  # room again
            assert gb3 is None
    run("asyncio", main())


def test_pending_invites_per_user_limit(tmp_path):
    async def main():
        async with world(tmp_path, group_invites_per_user=2) as w:
            a = await member(w, "alice@home", "phone", 11)
            c = await member(w, "carol@acme", "phone", 31)
            gids = [await a.create_group() for _ in range(3)]
            assert await a.group_add(gids[0], "carol@acme") == 1
            assert await a.group_add(gids[1], "carol@acme") == 1
            with pytest.raises(GroupLimit):
                await a.group_add(gids[2], "carol@acme")
            # the two accepted invites reached her, nothing of the third
            got = await take(c, 2)
            assert [(k, g[0]) for k, g in ((m.kind, m.data) for m in got)] == [
                (GEV_INVITED, gids[0]), (GEV_INVITED, gids[1])]
            assert await quiet(c)
            await c.group_answer(gids[0], False)  # declined: one invite pending
            assert await a.group_add(gids[2], "carol@acme") == 1
            await c.group_answer(gids[1], True)
            await c.group_answer(gids[2], True)
            for g in gids[1:]:
                _, members, _ = await a.group_members(g)
                assert [m[0] for m in members] == ["alice@home", "carol@acme"]
    run("asyncio", main())


def test_group_sends_per_sender_limit(tmp_path):
    async def main():
        async with world(tmp_path, group_msgs_per_s=0.001, group_msgs_burst=3) as w:
            a = await member(w, "alice@home", "phone", 11)
            b = await member(w, "bob@home", "phone", 21)
            g1 = await a.create_group()
            g2 = await a.create_group()
            for g in (g1, g2):
                await a.group_add(g, "bob@home")
            v1, _, _ = await a.group_members(g1)
            v2, _, _ = await a.group_members(g2)
            # the limit is per sender, across its groups
            await a.group_send(g1, v1, b"1")
            await a.group_send(g2, v2, b"2")
            await a.group_send(g1, v1, b"3")
            with pytest.raises(RateLimited) as over:
                await a.group_send(g2, v2, b"4")
            assert over.value.code == ErrorCode.RATE_LIMITED
            await b.group_send(g1, v1, b"bob's own")  # another sender: its own budget
            assert [m.body for m in await drain(b) if hasattr(m, "body")] == [b"1", b"2", b"3"]
            assert [m.body for m in await drain(a) if hasattr(m, "body")] == [b"bob's own"]
    run("asyncio", main())


def test_membership_change_rate_limit(tmp_path):
    async def main():
        async with world(tmp_path, group_changes_per_s=0.001, group_changes_burst=3) as w:
            a = await member(w, "alice@home", "phone", 11)
            b = await member(w, "bob@home", "phone", 21)
            await member(w, "carol@home", "phone", 31)
            gid = await a.create_group()  # 1
            await a.group_add(gid, "bob@home")  # 2
            await a.group_admin(gid, "bob@home", True)  # 3
            with pytest.raises(RateLimited):
                await a.group_add(gid, "carol@home")
            with pytest.raises(RateLimited):
                await a.group_remove(gid, "bob@home")
            v, members, _ = await a.group_members(gid)
            assert members == [("alice@home", True, [(1, 11)]), ("bob@home", True, [(1, 21)])]
            # the limit is per acting address: bob may still change the group
            await b.group_add(gid, "carol@home")
            v, members, _ = await b.group_members(gid)
            assert [m[0] for m in members] == ["alice@home", "bob@home", "carol@home"]
            await a.group_send(gid, v, b"all three")  # sends are not changes
    run("asyncio", main())


def test_gsend_skips_members_at_a_backlog_cap_and_refuses_when_all_are(tmp_path):
    async def main():
        async with world(tmp_path, max_stored_msgs_per_device=2) as w:
            a, b, c, gid = await alice_bob_carol(w)
            v, _, _ = await a.group_members(gid)
            await take(c, 1)
            await b.close()  # bob's backlog: 2 events, then nothing is acked
            skipped: list = []
            await a.group_send(gid, v, b"m0", skipped=skipped)
            assert skipped == ["bob@home"]  # at his cap: no copy for him
            assert kinds(await take(c, 1)) == [("msg", b"m0")]
            # a group of alice and bob only: nobody could take it, nothing stored
            g2 = await a.create_group()
            await a.group_add(g2, "bob@home")
            v2, _, _ = await a.group_members(g2)
            with pytest.raises(RecipientFull) as full:
                await a.group_send(g2, v2, b"nobody", id=b"n" * 16)
            assert full.value.code == ErrorCode.RECIPIENT_FULL
            # bob drains his backlog: he gets what was accepted for him, then
            # the cap lets the same id through
            back = await member(w, "bob@home", "phone")
            got = await take(back, 3)
            assert [(m.kind, m.data[0]) for m in got] == [
                (GEV_ADDED, gid), (GEV_ADDED, gid), (GEV_ADDED, g2)]
            assert await quiet(back)
            # his DACKs reach the relay (bounded: the test stops by itself)
            for _ in range(200):
                try:
                    await a.group_send(g2, v2, b"nobody", id=b"n" * 16)
                    break
                except RecipientFull:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the cap never let the same id through")
            assert kinds(await take(back, 1)) == [("msg", b"nobody")]
            again: list = []
            await a.group_send(gid, v, b"m1", skipped=again)
            assert again == []
            assert kinds(await take(c, 1)) == [("msg", b"m1")]
            assert kinds(await take(back, 1)) == [("msg", b"m1")]
            assert await quiet(back)
    run("asyncio", main())


def test_a_slow_providers_backlog_never_spills_another_providers_members(tmp_path):
    """Group fan-out counts against the relay-wide queue-memory budget, and
    one provider's members holding it (they do not read) spill only
    themselves: the other provider's member stays on the live route and
    gets every message; the slow ones get every message too once they read."""
    budget = 512 * 1024
    body = os.urandom(16 * 1024)
    n = 40

    async def main():
        async with world(tmp_path, queue_memory_bytes=budget,
                         provider_memory_share=0.5) as w:
            a = await member(w, "alice@home", "phone", 11)
            b = await member(w, "bob@home", "phone", 21)
            slow = [await member(w, f"s{i}@acme", "phone", 30 + i) for i in range(3)]
            gid = await a.create_group()
            await a.group_add(gid, "bob@home")
            for s in slow:
                assert await a.group_add(gid, s.address) == 1
                await s.group_answer(gid, True)
            v, members, _ = await a.group_members(gid)
            assert len(members) == 5
            await take(b, 7)  # added, then invited and joined for each
            for s in slow:
                s._proto.transport.pause_reading()
            delivery = w.relay.delivery
            bob_feed = delivery.feed_of("bob@home", "phone")
            slow_feeds = [delivery.feed_of(s.address, "phone") for s in slow]
            spilled_bob = peak = 0
            got = []
            for i in range(n):
                await a.group_send(gid, v, body, id=i.to_bytes(16, "big"))
                peak = max(peak, delivery.queued_bytes)
                got += await take(b, 1)
                spilled_bob += not bob_feed.live
                if i == n - 10:
                    held = [f.qbytes for f in slow_feeds]
            assert [m.id for m in got] == [i.to_bytes(16, "big") for i in range(n)]
            assert spilled_bob == 0  # never off the live route
            # the fan-out is counted: the slow devices were spilled, and from
            # then on what is sent to them waits in the store, not in RAM
            assert all(not f.live for f in slow_feeds) and delivery.spills >= 3
            assert [f.qbytes for f in slow_feeds] == held
            assert peak > budget
            for s in slow:
                s._proto.transport.resume_reading()
            for s in slow:
                msgs = await bodies_until(s, n, timeout=30)
                assert [m.id for m in msgs] == [i.to_bytes(16, "big") for i in range(n)]
                assert await quiet(s)
    run("asyncio", main())


def test_group_lists_are_granted_only_with_groups():
    from fastroute.relay.link import SUPPORTED_FEATURES

    assert "group_lists" in SUPPORTED_FEATURES
    assert wire.FEATURE_NEEDS["group_lists"] == {"groups"}
    assert wire.FEATURE_OPS["group_lists"] == frozenset()


def test_group_lists_alone_or_without_e2ee_grants_nothing(tmp_path):
    async def main():
        async with world(tmp_path) as w:
            x = await w.connect("alice@home", "phone", features=("groups", "group_lists"))
            assert x.features == frozenset()
            assert await x.negotiate(("group_lists",)) == frozenset()
            assert await x.negotiate(FEATURES) == {"e2ee", "groups"}
            assert await x.negotiate(("group_lists",)) == {"e2ee", "groups", "group_lists"}
    run("asyncio", main())


def test_the_change_log_is_bounded_and_says_when_it_cannot_tell():
    from types import SimpleNamespace

    from fastroute.relay.groups import CHANGE_LOG, Group

    g = Group(b"g" * 16, 1)
    g.members = {"a@x": True, "b@x": False}
    lists = {"a@x": {1: SimpleNamespace(reg_id=10)}, "b@x": {}}
    # b's device d joins at version 1 + d, one change each, past the bound
    for d in range(1, CHANGE_LOG + 11):
        g.version += 1
        g.log(g.version, "b@x", [(d, None, 100 + d)])
        lists["b@x"][d] = SimpleNamespace(reg_id=100 + d)
    assert len(g.changes) == CHANGE_LOG and g.log_from == 11
    recent = g.mismatch(lists, "a@x", 1, g.version - 2)
    assert recent == [g.version, [["b@x", CHANGE_LOG + 9, 109 + CHANGE_LOG],
                                  ["b@x", CHANGE_LOG + 10, 110 + CHANGE_LOG]], [], [], True]
    edge = g.mismatch(lists, "a@x", 1, g.log_from)
    assert edge[4] is True and len(edge[1]) == CHANGE_LOG
    old = g.mismatch(lists, "a@x", 1, g.log_from - 1)  # its changes were dropped
    assert old[4] is False and len(old[1]) == CHANGE_LOG + 10 and old[2:4] == [[], []]


def test_a_member_whose_mailbox_fills_gets_the_rest_from_the_store_in_order(tmp_path):
    """A group message the engine cannot place for one member device (its
    mailbox is full: it does not read) is that device's to get from the
    store; the others get it live, and the full one, once it reads, gets
    every message once and in order, and the relay's count of queued bytes
    goes back to nothing."""
    n = 30

    async def main():
        async with world(tmp_path, mailbox_capacity=4) as w:
            a, b, c, gid = await alice_bob_carol(w)
            v, members, _ = await a.group_members(gid)
            assert len(members) == 3
            await drain(b)
            await drain(c)
            c._proto.transport.pause_reading()
            delivery = w.relay.delivery
            carol = delivery.feed_of("carol@home", "phone")
            got = []
            for i in range(n):
                await a.group_send(gid, v, b"m%d" % i, id=i.to_bytes(16, "big"))
                got += await take(b, 1)
            ids = [i.to_bytes(16, "big") for i in range(n)]
            assert [m.id for m in got] == ids
            assert not carol.live and carol.missed_mid > 0  # the store has her copies
            c._proto.transport.resume_reading()
            msgs = await bodies_until(c, n, timeout=30)
            assert [m.id for m in msgs] == ids
            assert [m.body for m in msgs] == [b"m%d" % i for i in range(n)]
            assert await quiet(c) and await quiet(b)
            await drain(a)  # the sender's own events, read (and so acked)
            for _ in range(100):
                if delivery.queued_bytes == 0:
                    break
                await asyncio.sleep(0.05)
            assert delivery.queued_bytes == 0
    run("asyncio", main())
