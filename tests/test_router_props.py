"""The compiled engine and the pure-Python model, driven by the same random
operation sequences, must give the same results and raise the same errors
(same class, same MailboxFull.entered/full) at every step."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fastroute import _model
from fastroute.errors import MailboxFull

try:
    from fastroute import _core
except ImportError:  # pragma: no cover - only without a build
    _core = None

pytestmark = pytest.mark.skipif(_core is None, reason="compiled engine not built")

# Valid values are repeated so that most steps reach the engine's real paths
# (full mailboxes, fan-out, redelivery); the rest keep error paths honest.
ADDRESSES = [f"u{i}@p{i % 2}" for i in range(4)]
BAD_ADDRESSES = ["nobody", "@p", "u@", 7, None, b"u0@p0"]
addresses = st.sampled_from(ADDRESSES * 8 + BAD_ADDRESSES)
names = st.sampled_from(["phone", "laptop"] * 5 + ["", 3])
ids = st.sampled_from(list(range(1, 9)) * 4 + [0, 40, -1, 1 << 70, "1", None, 1.5, True])
counts = st.sampled_from([1, 2, 3, 5, 0] * 4 + [1 << 80, -1, "2", None])
seqs = st.one_of(st.integers(min_value=0, max_value=20),
                 st.sampled_from([-3, 1 << 80, 2.0]))
batch_items = st.one_of(
    st.tuples(addresses, st.just(None)),
    st.sampled_from([("u0@p0",), ["u0@p0", None], None] + [("u1@p1", None)] * 20),
)


def outcome(call):
    """A call's result, or a comparable description of its exception."""
    try:
        return ("ok", call())
    except MailboxFull as exc:
        return ("raise", MailboxFull, exc.entered, exc.full)
    except Exception as exc:  # every class must match between the twins
        return ("raise", type(exc))


class Twins(RuleBasedStateMachine):
    """Each rule runs on both engines and compares outcomes."""

    @initialize(
        capacity=st.integers(min_value=1, max_value=4),
        devices=st.lists(st.tuples(st.sampled_from(ADDRESSES),
                                   st.sampled_from(["phone", "laptop", "tablet"])),
                         max_size=7),
        groups=st.lists(st.lists(st.sampled_from(ADDRESSES), max_size=4), max_size=3),
    )
    def make(self, capacity, devices, groups):
        # start from a populated engine so that short runs reach deep states
        self.c = _core.Router(capacity)
        self.m = _model.Router(capacity)
        self.counter = 0
        for address, name in devices:
            self.same(lambda r: r.add_device(address, name), "add_device")
        for members in groups:
            self.same(lambda r: r.create_group(members), "create_group")

    def payload(self):
        # unique payloads make any reordering or duplication visible
        self.counter += 1
        return ("msg", self.counter)

    def same(self, fn, label):
        got_c = outcome(lambda: fn(self.c))
        got_m = outcome(lambda: fn(self.m))
        assert got_c == got_m
        # --hypothesis-show-statistics shows which paths the runs reached
        if got_m[0] == "ok":
            event(f"{label}: ok" + (" (non-empty)" if got_m[1] else ""))
        else:
            event(f"{label}: {got_m[1].__name__}")
        return got_m

    # ---------------------------------------------------------- devices

    @rule(address=addresses, name=names)
    def add_device(self, address, name):
        self.same(lambda r: r.add_device(address, name), "add_device")

    @rule(dev=ids)
    def remove_device(self, dev):
        self.same(lambda r: r.remove_device(dev), "remove_device")

    @rule(address=addresses, name=names)
    def lookups(self, address, name):
        self.same(lambda r: r.device_id(address, name), "device_id")
        self.same(lambda r: r.devices(address), "devices")
        self.same(lambda r: r.has_address(address), "has_address")

    @rule(dev=ids)
    def device_state(self, dev):
        self.same(lambda r: r.device_info(dev), "device_info")
        self.same(lambda r: r.pending(dev), "pending")
        self.same(lambda r: r.overflowed(dev), "overflowed")

    # ---------------------------------------------------------- routing

    @rule(address=addresses)
    def route(self, address):
        p = self.payload()
        self.same(lambda r: r.route(address, p), "route")

    @rule(items=st.lists(batch_items, max_size=8))
    def route_many(self, items):
        items = [(it[0], self.payload()) if isinstance(it, tuple) and len(it) == 2
                 else it for it in items]
        self.same(lambda r: r.route_many(items), "route_many")

    @rule(addrs=st.lists(addresses, max_size=8), odd=st.booleans())
    def route_flat(self, addrs, odd):
        # route_many of the pairs, without their tuples (an odd length is refused)
        flat: list = []
        for address in addrs:
            flat += [address, self.payload()]
        if odd:
            flat.append(ADDRESSES[0])
        self.same(lambda r: r.route_flat(flat), "route_flat")

    @rule(dev=ids)
    def push(self, dev):
        p = self.payload()
        self.same(lambda r: r.push(dev, p), "push")

    @rule(devs=st.lists(st.one_of(ids, st.sampled_from([("x",), None])), max_size=8))
    def offer_many(self, devs):
        # per-device routing: bad items and unknown devices first, then sticky overflow
        items = [(d, self.payload()) if not isinstance(d, tuple) and d is not None else d
                 for d in devs]
        self.same(lambda r: r.offer_many(items), "offer_many")

    @precondition(lambda self: self.m._devices)
    @rule(data=st.data())
    def offer_many_live(self, data):
        devs = data.draw(st.lists(st.sampled_from(sorted(self.m._devices)), max_size=6))
        items = [(d, self.payload()) for d in devs]
        self.same(lambda r: r.offer_many(items), "offer_many")

    @rule(devs=st.lists(ids, max_size=8), live=st.booleans(), odd=st.booleans())
    def offer_flat(self, devs, live, odd):
        # offer_many of the pairs, without their tuples (an odd length is refused)
        if live and self.m._devices:
            known = sorted(self.m._devices)
            devs = [known[d % len(known)] if type(d) is int else d for d in devs]
        flat: list = []
        for d in devs:
            flat += [d, self.payload()]
        if odd:
            flat.append(1)
        self.same(lambda r: r.offer_flat(flat), "offer_flat")

    @rule(rows=st.lists(st.one_of(
        st.lists(st.one_of(ids, st.sampled_from([("x",), None, True])), max_size=5),
        st.sampled_from([("x",), None, "row", ()])), max_size=5))
    def offer_shared(self, rows):
        # rows of (payload, device ids): bad rows and unknown devices first
        rows = [(self.payload(), r) if isinstance(r, list) else r for r in rows]
        self.same(lambda r: r.offer_shared(rows), "offer_shared")

    @precondition(lambda self: self.m._devices)
    @rule(data=st.data())
    def offer_shared_live(self, data):
        # a group's messages: rows that share one list of its devices, and
        # rows with lists of their own, each the same as offer_many's items
        known = sorted(self.m._devices)
        group = data.draw(st.lists(st.sampled_from(known), max_size=6))
        rows = [(self.payload(), group if data.draw(st.booleans())
                 else data.draw(st.lists(st.sampled_from(known), max_size=4)))
                for _ in range(data.draw(st.integers(0, 6)))]
        self.same(lambda r: r.offer_shared(rows), "offer_shared")

    # Steps on devices that exist right now, so that runs keep reaching full
    # mailboxes, redelivery and sticky overflow rather than UnknownDevice.

    def live(self, data):
        return data.draw(st.sampled_from(sorted(self.m._devices)))

    @precondition(lambda self: self.m._devices)
    @rule(data=st.data(), n=st.integers(min_value=0, max_value=4))
    def traffic_to_live(self, data, n):
        dev = self.live(data)
        address = self.m.device_info(dev)[0]
        for _ in range(n):
            p = self.payload()
            self.same(lambda r: r.route(address, p), "route")
        p = self.payload()
        self.same(lambda r: r.push(dev, p), "push")

    @precondition(lambda self: self.m._devices)
    @rule(data=st.data(), n=st.integers(min_value=0, max_value=4),
          back=st.integers(min_value=0, max_value=3), requeue=st.booleans())
    def drain_live(self, data, n, back, requeue):
        dev = self.live(data)
        if data.draw(st.booleans()):
            got = self.same(lambda r: r.pop(dev, n), "pop")
            last = got[1][-1][0] if got[1] else 0
        else:
            got = self.same(lambda r: r.pop_batch(dev, n), "pop_batch")
            last = got[1][0] + len(got[1][1]) - 1
        if requeue:
            self.same(lambda r: r.requeue(dev), "requeue")
        elif last > 0:
            upto = max(1, last - back)
            self.same(lambda r: r.ack(dev, upto), "ack")

    @precondition(lambda self: self.m._devices)
    @rule(data=st.data())
    def resume_live(self, data):
        dev = self.live(data)
        if data.draw(st.booleans()):
            self.same(lambda r: r.resume(dev), "resume")
        else:
            self.same(lambda r: r.suspend(dev), "suspend")

    @precondition(lambda self: self.m._groups)
    @rule(data=st.data(), exclude=st.booleans(), drain=st.booleans())
    def fanout_live(self, data, exclude, drain):
        gid = data.draw(st.sampled_from(sorted(self.m._groups)))
        ex = self.live(data) if exclude and self.m._devices else None
        p = self.payload()
        self.same(lambda r: r.fanout(gid, p, exclude_device=ex), "fanout")
        if drain and self.m._devices:
            devs = data.draw(st.lists(st.sampled_from(sorted(self.m._devices)),
                                      max_size=4))
            self.same(lambda r: r.pop_many(devs, 2), "pop_many")

    # ---------------------------------------------------------- groups

    @rule(members=st.lists(addresses, max_size=4))
    def create_group(self, members):
        self.same(lambda r: r.create_group(members), "create_group")

    @rule(gid=ids, address=addresses)
    def add_member(self, gid, address):
        self.same(lambda r: r.add_member(gid, address), "add_member")

    @rule(gid=ids, address=addresses)
    def remove_member(self, gid, address):
        self.same(lambda r: r.remove_member(gid, address), "remove_member")

    @rule(gid=ids)
    def delete_group(self, gid):
        self.same(lambda r: r.delete_group(gid), "delete_group")
        self.same(lambda r: r.group_members(gid), "group_members")

    @rule(gid=ids, exclude=st.one_of(st.none(), ids))
    def fanout(self, gid, exclude):
        p = self.payload()
        self.same(lambda r: r.fanout(gid, p, exclude), "fanout")

    # ---------------------------------------------------------- draining

    @rule(dev=ids, n=counts)
    def pop(self, dev, n):
        self.same(lambda r: r.pop(dev, n), "pop")

    @rule(dev=ids, n=counts)
    def pop_batch(self, dev, n):
        self.same(lambda r: r.pop_batch(dev, n), "pop_batch")

    @rule(devs=st.lists(ids, max_size=5), n=counts)
    def pop_many(self, devs, n):
        self.same(lambda r: r.pop_many(devs, n), "pop_many")

    @rule(dev=ids, upto=seqs)
    def ack(self, dev, upto):
        self.same(lambda r: r.ack(dev, upto), "ack")

    @rule(dev=ids)
    def requeue(self, dev):
        self.same(lambda r: r.requeue(dev), "requeue")

    @rule()
    def take_ready(self):
        self.same(lambda r: r.take_ready(), "take_ready")

    @rule(dev=ids)
    def resume(self, dev):
        self.same(lambda r: r.resume(dev), "resume")

    @rule(dev=ids)
    def suspend(self, dev):
        self.same(lambda r: r.suspend(dev), "suspend")

    @invariant()
    def stats_agree(self):
        if hasattr(self, "c"):
            assert self.c.stats() == self.m.stats()


Twins.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_twins = Twins.TestCase
