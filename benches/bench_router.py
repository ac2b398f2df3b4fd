"""pytest-benchmark suite of the routing engine, compiled next to the model.

    pytest benches/bench_router.py --benchmark-enable                 # all
    pytest benches/bench_router.py --benchmark-enable -k compiled     # one side
    pytest benches/bench_router.py --benchmark-enable --benchmark-group-by=group

Every benchmark sets ``benchmark.group`` to its scenario, so each table shows
the compiled engine and the model side by side; ``extra_info["messages"]``
says how many messages (or deliveries) one round handles, to turn times into
ns per message.  The scenarios are those of ``fastroute bench``
(``fastroute/benchsummary.py``: the one-screen summary with ratios, memory
and a leak check).
"""

from __future__ import annotations

import pytest

from fastroute import benchsummary as rs

IMPLS = {name: cls for name, cls in rs.IMPLS.items() if cls is not None}

impls = pytest.mark.parametrize("impl", sorted(IMPLS))


def run_pedantic(benchmark, label, impl, factory, rounds, **kwargs):
    run, reset, n = factory(IMPLS[impl], **kwargs)
    reset()
    run()                                   # rings and caches at their size
    benchmark.group = label
    benchmark.extra_info["messages"] = n
    benchmark.extra_info["impl"] = impl
    # the model is ~10-100x slower: fewer rounds keep the suite short
    rounds = rounds if impl == "compiled" else max(5, rounds // 10)
    # pedantic() reads a setup's return value as call arguments: drop it
    benchmark.pedantic(run, setup=lambda: void(reset()), rounds=rounds,
                       iterations=1)


def void(_result: object) -> None:
    return None


@impls
@pytest.mark.parametrize("per_address", [1, 3])
def test_route_batch1(benchmark, impl, per_address):
    """route() one message at a time to 1000 (or 334 x 3) devices."""
    n_addr = 1000 // per_address
    run_pedantic(benchmark, f"route, batch 1, {per_address}-device address",
                 impl, rs.sc_route_single, 200, n_addr=n_addr,
                 per_address=per_address)


@impls
@pytest.mark.parametrize("batch", [1, 1000])
def test_route_many(benchmark, impl, batch):
    """route_many() with batches of 1 or 1000 items, 1000 messages a round."""
    run_pedantic(benchmark, f"route_many, batch {batch}", impl, rs.sc_route_many,
                 200, batch=batch)


@impls
@pytest.mark.parametrize("devices", [10, 100])
def test_cycle(benchmark, impl, devices):
    """route_many(1000) + pop_many + ack: the whole 1:1 path of a relay."""
    run_pedantic(benchmark, f"route_many 1000 + pop_many + ack, {devices} devices",
                 impl, rs.sc_cycle, 200, n_addr=devices)


@impls
def test_cycle_pop_batch(benchmark, impl):
    """As test_cycle, drained with pop_batch (no per-message tuples)."""
    run_pedantic(benchmark, "route_many 1000 + pop_batch + ack, 10 devices",
                 impl, rs.sc_cycle_batch, 200)


@impls
def test_pop_ack(benchmark, impl):
    """pop(100) + ack per device, 10 devices; refilled between rounds."""
    run_pedantic(benchmark, "pop + ack, 100 per call", impl, rs.sc_pop_ack, 200)


@impls
@pytest.mark.parametrize("group", [10, 100, 1000])
def test_fanout(benchmark, impl, group):
    """fanout() of one shared payload to a group of N single-device members."""
    run_pedantic(benchmark, f"fan-out to {group} devices", impl, rs.sc_fanout,
                 100, group=group)


@impls
@pytest.mark.parametrize("how", ["pop_many", "pop_batch"])
def test_fanout_drain(benchmark, impl, how):
    """Draining 10 fan-outs to 1000 devices: the cost after the fan-out."""
    run_pedantic(benchmark, f"drain fan-out 1000 with {how} + ack", impl,
                 rs.sc_fanout_drain, 50, batch=(how == "pop_batch"))
