"""The dedup window: the compiled DedupTable against its specification, DedupWindow.

Every test runs on both; the random walks also drive both side by side with
the same operations and compare every answer and the full contents.
"""

from __future__ import annotations

import random

import pytest

import fastroute
from fastroute import dedup
from fastroute.dedup import PENDING, DedupWindow
from fastroute.errors import InvalidArgument, WrongType


@pytest.fixture
def impl(impl):
    """The dedup table class under test: the conftest's ``impl`` picks which twin."""
    return impl.of(DedupWindow)


def cid(i: int) -> bytes:
    return i.to_bytes(16, "big")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_remembers_results_and_collects_waiters(impl):
    d = impl(10.0, 100)
    assert d.lookup("a@x", cid(1), 0.0) is None
    d.begin("a@x", cid(1), PENDING, 1.0)
    assert d.lookup("a@x", cid(1), 1e9) == PENDING  # pending never expires
    assert d.lookup("b@x", cid(1), 1.0) is None  # ids are per sender
    d.wait("a@x", cid(1), "w1")
    d.wait("a@x", cid(1), "w2")
    assert d.finish("a@x", cid(1), 0, 5.0) == ["w1", "w2"]
    assert d.finish("a@x", cid(1), 0, 5.0) is None  # answered once
    assert d.lookup("a@x", cid(1), 15.0) == 0
    assert d.lookup("a@x", cid(1), 15.1) is None  # outside the window: new again
    assert d.get("a@x", cid(1)) == (0, 5.0)  # still there until expired or evicted
    with pytest.raises(InvalidArgument):
        d.wait("a@x", cid(1), "w3")  # decided: nothing to wait for
    assert d.finish("c@x", cid(2), 7, 1.0) is None  # recorded though absent
    assert d.lookup("c@x", cid(2), 1.0) == 7
    d.begin("c@x", cid(3), PENDING, 1.0)
    d.wait("c@x", cid(3), "w")
    assert d.forget("c@x", cid(3)) == ["w"]
    assert d.forget("c@x", cid(3)) is None
    assert d.lookup("c@x", cid(3), 1.0) is None
    assert len(d) == 2


def test_senders_compare_by_value(impl):
    d = impl(10.0, 100)
    a1 = "".join(["al", "ice@x"])
    a2 = "".join(["ali", "ce@x"])
    assert a1 == a2 and a1 is not a2
    d.begin(a1, cid(1), 3, 1.0)
    assert d.lookup(a2, cid(1), 1.0) == 3


def test_bad_keys_are_typed_errors(impl):
    d = impl(10.0, 100)
    with pytest.raises(WrongType):
        d.lookup(b"a@x", cid(1), 0.0)
    for bad in (cid(1)[:15], cid(1) + b"x", bytearray(cid(1)), "x" * 16):
        with pytest.raises(InvalidArgument):
            d.begin("a@x", bad, 0, 0.0)
    with pytest.raises(InvalidArgument):
        impl(10.0, 0)
    with pytest.raises(InvalidArgument):
        impl(-1.0, 10)


def test_eviction_drops_oldest_decided_and_keeps_pending(impl):
    d = impl(10.0, 3)
    d.begin("a@x", cid(0), PENDING, 1.0)
    for i in range(1, 6):
        d.begin("a@x", cid(i), 0, 1.0)
    # cid(0) is pending: it moved to the young end instead of going
    assert d.keys() == [("a@x", cid(4)), ("a@x", cid(0)), ("a@x", cid(5))]
    for i in range(6, 9):
        d.begin("a@x", cid(i), PENDING, 1.0)
    # all pending: nothing may be dropped, so the bound gives
    assert d.keys() == [("a@x", cid(i)) for i in (6, 0, 7, 8)]
    assert d.lookup("a@x", cid(0), 1.0) == PENDING


def test_expire_forgets_only_old_decided_entries(impl):
    clk = Clock()
    d = impl(10.0, 100, clk)
    d.finish("a@x", cid(1), 0, clk())
    d.begin("a@x", cid(2), PENDING, clk())
    clk.t += 20.0
    d.finish("a@x", cid(3), 0, clk())
    assert d.expire() == 1
    assert sorted(d.keys()) == [("a@x", cid(2)), ("a@x", cid(3))]
    assert d.expire(clk.t + 100.0) == 1  # the pending one stays whatever its age
    assert d.keys() == [("a@x", cid(2))]


def test_a_full_window_stays_cheap_and_bounded(impl):
    # 200,000 messages through a window of 1,000: the old dict-based window
    # re-walked its deleted prefix on every eviction (quadratic here)
    d = impl(1e9, 1000)
    for i in range(200_000):
        d.begin("a@x", cid(i), PENDING, float(i))
        d.finish("a@x", cid(i), 0, float(i))
    assert len(d) == 1000
    assert d.lookup("a@x", cid(199_999), 199_999.0) == 0
    assert d.lookup("a@x", cid(199_000), 199_999.0) == 0
    assert d.lookup("a@x", cid(198_999), 199_999.0) is None


@pytest.mark.parametrize("presize", [False, True])
def test_every_id_of_a_full_window_is_found_after_each_insert(impl, presize):
    # a full window evicts its oldest id at each insert, which shifts index
    # entries back; the new id's place, found by its lookup before that, may
    # no longer be the first empty one on its probe path: it must be found
    # again, or a lookup that stops at the new empty position would miss it
    d = impl(1e9, 50, presize=presize) if impl is not DedupWindow else impl(1e9, 50)
    held: list = []
    for i in range(20_000):
        key = cid(i * 7919 % 100_003)
        d.begin("a@x" if i % 3 else "b@y", key, 0, float(i))
        held.append(("a@x" if i % 3 else "b@y", key))
        held = held[-50:]
        for sender, k in held[-8:] if i % 50 else held:
            assert d.lookup(sender, k, float(i)) == 0, i
        assert len(d) == min(i + 1, 50)


def _walk(seed: int, impls, steps: int = 4000):
    rng = random.Random(seed)
    tables = [impl(5.0, rng.choice([1, 2, 7, 64, 100, 300])) for impl in impls]
    max_entries = tables[0].max_entries
    tables = [impl(5.0, max_entries) for impl in impls]
    senders = ["a@x", "b@x", "c@y"]
    now = 0.0
    for step in range(steps):
        now += rng.random() * 0.05
        s = rng.choice(senders)
        k = cid(rng.randrange(400))
        op = rng.randrange(8)
        code = PENDING if op == 1 else rng.randrange(3)
        results = []
        for t in tables:
            try:
                if op == 0:
                    r = t.lookup(s, k, now)
                elif op in (1, 2):
                    r = t.begin(s, k, code, now)
                elif op == 3:
                    r = t.wait(s, k, ("w", step))
                elif op == 4:
                    r = t.finish(s, k, 0, now)
                elif op == 5:
                    r = t.forget(s, k)
                elif op == 6:
                    r = t.expire(now)
                else:
                    r = t.get(s, k)
            except InvalidArgument as exc:
                r = ("error", str(exc))
            results.append(r)
        assert all(r == results[0] for r in results), (step, op, results)
        assert len({len(t) for t in tables}) == 1
        if step % 97 == 0:
            assert all(t.keys() == tables[0].keys() for t in tables), step
    return tables


@pytest.mark.parametrize("seed", range(12))
def test_random_walk_matches_the_specification(impl, seed):
    if impl is DedupWindow:
        # the walk of the specification alone: the invariants still hold
        tables = _walk(seed, [DedupWindow])
    else:
        tables = _walk(seed, [DedupWindow, impl])
    t = tables[-1]
    assert len(t) == len(t.keys()) == len(set(t.keys()))


@pytest.mark.parametrize("seed", range(6))
def test_a_presized_table_walks_like_the_specification(impl, seed):
    # the relay's tables take room for their whole window at once (no growth
    # stalls): the ring is then larger than the window from the start, which
    # eviction, rotation of pending ids and holes must not notice
    def presized(window_s, max_entries):
        return impl(window_s, max_entries, presize=True)

    tables = _walk(seed, [DedupWindow, presized])
    assert tables[1].keys() == tables[0].keys()


def test_dedup_module_exports_the_compiled_table(impl):
    want = "DedupTable" if fastroute.COMPILED else "DedupWindow"
    assert dedup.DedupTable.__name__ == want


@pytest.mark.parametrize("presize", [False, True])
def test_a_window_full_of_pending_ids_grows_then_shrinks_back(impl, presize):
    # pending ids are never dropped; making room must not walk all of them
    # on every insert (20,000 pending ids: 2 * 10^8 steps if it did); a
    # presized table grows past its window for them all the same
    d = impl(1e9, 10, presize=presize)
    for i in range(20_000):
        d.begin("a@x", cid(i), PENDING, 1.0)
    assert len(d) == 20_000
    for i in range(20_000):
        d.finish("a@x", cid(i), 0, 2.0)
    for i in range(20_000, 25_000):  # each insert drops up to 8 old decided ids
        d.begin("a@x", cid(i), 0, 3.0)
    assert len(d) == 10
    assert d.keys() == [("a@x", cid(i)) for i in range(24_990, 25_000)]


@pytest.mark.parametrize("presize", [False, True])
def test_evicted_ids_leave_the_index_within_a_lap_of_the_sweep(impl, presize):
    # eviction pops the ring's tail and leaves the id's index entry in place
    # (finding it was a random read of the index an insert); the sweep takes
    # such stale entries out as it goes round.  Without it the index fills
    # with them (probes of a few thousand positions here, then none empty).
    # Pending ids rotated past the tail and forgotten ones (holes) on the way:
    # a rotated id's entry names its new position, a hole's is gone at once.
    # The specification keeps no index: the same walk, the same answers.
    def table(max_entries):
        if presize and impl is not DedupWindow:
            return impl(1e9, max_entries, presize=True)
        return impl(1e9, max_entries)

    # an id just evicted: its index entry is still there, and its slot
    # still holds its hash and bytes (not yet reused), with no sender
    d = table(4)
    for i in range(5):
        d.begin("a@x", cid(i), 0, 1.0)
    assert d.lookup("a@x", cid(0), 2.0) is None
    assert d.lookup("a@x", cid(1), 2.0) == 0
    d = table(1000)
    counts = getattr(d, "_index_counts", None)
    assert (counts is None) == (impl is DedupWindow)
    cap = 1024  # the ring's slots for a window of 1,000; the index has 2 * cap
    pending = [cid(10**9 + j) for j in range(20)]
    for k in pending:
        d.begin("p@x", k, PENDING, 0.0)
    most = 0
    for i in range(1, 60_001):
        d.begin("a@x" if i % 2 else "b@y", cid(i), 0, 1.0)
        if counts is not None and i % 500 == 0:
            live, stale = counts()
            assert live == len(d), i
            # a lap is 2 * cap / 4 evictions, and the evictions of a run not
            # yet swept may be beside them (a run: 512 positions at most, a
            # 16th of this index, 128, here)
            assert stale <= cap // 2 + 512 // 4, i
            most = max(most, stale)
        if i % 97 == 0:
            assert d.forget("a@x" if (i - 1) % 2 else "b@y", cid(i - 1)) is None
        if i >= 1000:
            # full: a forgotten id frees a place until the next insert takes
            # it, and an insert that meets pending ids at the tail rotates up
            # to 8 of them, then leaves the evicting to the next one
            assert 999 <= len(d) <= 1020, i
    if counts is not None:
        assert most > cap // 4  # evicted ids' entries did stay a while
    for k in pending:
        assert d.lookup("p@x", k, 2.0) == PENDING
    assert d.lookup("b@y", cid(60_000), 2.0) == 0
    assert d.lookup("a@x", cid(59_999), 2.0) == 0
    assert d.lookup("a@x", cid(59_101), 2.0) == 0
    assert d.lookup("b@y", cid(59_000), 2.0) is None  # evicted long ago
    assert d.lookup("a@x", cid(59_945), 2.0) is None  # forgotten (59,946 = 97 * 618)


# ------------------------------------------------------------------ warming
# A presized window is mapped, not written: the first write to each of its
# pages faults, and the kernel zeroes the page on the writer's thread (the
# relay's loop).  warm() faults them in ahead, from another thread.

_MB = 1024 * 1024


def test_a_presized_table_asks_to_be_warmed_ahead_of_its_writes(impl):
    d = impl(600.0, 1_000_000, presize=True)
    asks: list = []
    d.warm_with(asks.append)
    if impl is DedupWindow:
        # nothing mapped, nothing to fault in: the twin never asks
        for i in range(1000):
            d.begin("a@x", cid(i), 0, 1.0)
        assert (asks, d.warm(), d.resident()) == ([], 0, 0)
        return
    assert d.resident() == 0  # mapped, not touched
    d.begin("a@x", cid(0), 0, 1.0)
    assert asks == [d]  # at the first insert
    for i in range(1, 1000):
        d.begin("a@x", cid(i), 0, 1.0)
    assert asks == [d]  # not again before the warm asked for has run
    before = d.resident()
    done = d.warm()
    # the index (16 MB) whole, and the slots 8 MB past the newest entry
    assert done >= 8 * _MB
    assert d.resident() >= 24 * _MB > before
    assert d.warm() == 0  # nothing more to do until the writes move on
    # the next ask comes when half of what is ahead is used, not before
    i = 1000
    while not asks[1:]:
        d.begin("a@x", cid(i), 0, 1.0)
        i += 1
    assert 4 * _MB // 48 <= i <= 8 * _MB // 48
    assert d.warm() >= 2 * _MB
    for k in range(0, i, 97):
        assert d.lookup("a@x", cid(k), 2.0) == 0


def test_warming_beside_the_writer_keeps_what_it_writes(impl):
    import threading

    d = impl(600.0, 1_000_000, presize=True)
    asks: list = []
    d.warm_with(asks.append)
    d.begin("a@x", cid(0), 0, 1.0)
    if impl is not DedupWindow:
        assert asks == [d]
    worker = threading.Thread(target=lambda: [t.warm() for t in list(asks)])
    worker.start()
    # the worker faults pages in (without the GIL) while this thread writes
    # entries onto them: populating must not zero what is already written
    for i in range(1, 100_000):
        d.begin("a@x", cid(i), PENDING if i % 3 else 0, 1.0)
    worker.join()
    assert len(d) == 100_000
    assert all(d.lookup("a@x", cid(i), 2.0) == (PENDING if i % 3 else 0)
               for i in range(100_000))


def test_an_ask_that_fails_ends_the_asking_not_the_insert(impl):
    calls: list = []

    def ask(table):
        calls.append(table)
        raise RuntimeError("no worker")

    d = impl(600.0, 1_000_000, presize=True)
    d.warm_with(ask)
    for i in range(300_000):  # past where a second ask would have come
        d.begin("a@x", cid(i), 0, 1.0)
    assert len(d) == 300_000
    assert len(calls) == (0 if impl is DedupWindow else 1)
    with pytest.raises(WrongType):
        d.warm_with(42)


def test_a_table_that_grows_into_mapped_room_asks_for_it(impl):
    # not presized: it starts on the heap (nothing to warm) and asks once a
    # growth maps its arrays; the new arrays are warmed from their start
    d = impl(600.0, 1_000_000)
    asks: list = []
    d.warm_with(asks.append)
    for i in range(30_000):
        d.begin("a@x", cid(i), 0, 1.0)
    assert asks == []
    for i in range(30_000, 150_000):
        d.begin("a@x", cid(i), 0, 1.0)
        while asks:
            asks.pop().warm()
    if impl is DedupWindow:
        return
    # 150,000 entries: a ring of 2**18 slots (12 MB) and its 4 MB index
    assert d.resident() >= 12 * _MB
    assert d.keys()[:2] == [("a@x", cid(0)), ("a@x", cid(1))]
