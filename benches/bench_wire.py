"""Wire codec cost: decoding client frames, encoding deliveries, verifying credentials.

Run (a few seconds)::

    pytest benches/bench_wire.py --benchmark-enable --benchmark-columns=mean,ops

One round of the frame benchmarks handles a whole frame of 256 ops with
100-byte bodies, so ops/s = 256 x the "OPS" column.  The ``raw msgpack``
rows decode or encode the same frame with plain msgpack and no checks: the
gap to the ``fastroute`` rows is what defensive validation costs.
"""

from __future__ import annotations

import os
import time

import msgpack
import pytest

from fastroute import wire
from fastroute.identity import ProviderKey, Registry, issue_credential, verify_credential

N_OPS = 256
BODY = 100
ADDRESSES = [f"user{i}@home.example" for i in range(64)]


def _send_frame() -> bytes:
    ops = [wire.send_op(os.urandom(16), ADDRESSES[i % len(ADDRESSES)], os.urandom(BODY))
           for i in range(N_OPS)]
    [plaintext] = wire.pack_frames(ops)
    return plaintext


def _deliveries() -> list[tuple]:
    return [(18, i + 1, ADDRESSES[i % len(ADDRESSES)], os.urandom(16), os.urandom(BODY),
             1_700_000_000_000 + i, 0) for i in range(N_OPS)]


@pytest.mark.parametrize("impl", ["fastroute", "raw msgpack"])
def test_decode_send_frame(benchmark, impl):
    benchmark.group = f"decode frame of {N_OPS} SEND x {BODY} B"
    benchmark.extra_info["ops_per_round"] = N_OPS
    plaintext = _send_frame()
    if impl == "fastroute":
        fn = wire.decode_client_frame
    else:
        def fn(data: bytes) -> list:
            return msgpack.unpackb(data, use_list=False)
    ops = benchmark(fn, plaintext)
    assert len(ops) == N_OPS and not any(isinstance(op, wire.OpError) for op in ops)


@pytest.mark.parametrize("impl", ["deliver_op+pack_frames", "OpBatcher", "encode_frames",
                                  "raw msgpack"])
def test_encode_deliver_frame(benchmark, impl):
    benchmark.group = f"encode {N_OPS} DELIVER x {BODY} B"
    benchmark.extra_info["ops_per_round"] = N_OPS
    ops = _deliveries()

    if impl == "deliver_op+pack_frames":
        def fn() -> list[bytes]:
            deliver = wire.deliver_op
            return wire.pack_frames([deliver(*op[1:]) for op in ops])
    elif impl == "OpBatcher":
        def fn() -> list[bytes]:
            b = wire.OpBatcher()
            add = b.add
            for op in ops:
                add(op)
            return b.flush()
    elif impl == "encode_frames":
        def fn() -> list[bytes]:
            return wire.encode_frames(ops)
    else:
        def fn() -> list[bytes]:
            return [msgpack.packb(ops)]
    frames = benchmark(fn)
    assert [op for f in frames for op in wire.decode_server_frame(f)] == ops


def test_verify_credential(benchmark, tmp_path):
    benchmark.group = "verify_credential"
    key = ProviderKey.generate()
    static = os.urandom(32)
    with Registry(tmp_path / "registry.db") as reg:
        reg.add_provider("third.example", key.public_key)
        trust = reg.trust()
    cred = issue_credential(key, "third.example", "bob@third.example", "phone", static)
    now = int(time.time())
    result = benchmark(verify_credential, trust, cred, static, now)
    assert result.device == "phone"
