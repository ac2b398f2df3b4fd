"""What blocks cost the compiled SEND loop: nanoseconds per SEND, side by side.

Calls ``fastroute._core.accept_sends`` (the gate's per-message loop) on
batches of 256 persistent 100-byte SENDs from alice@home to bob@home, with
the block table (a) empty, (b) holding two blocks of bob's (neither of
alice), (c) holding only another user's blocks; the three alternate, and the
median per batch is reported with its ratio to (a).

Usage::

    python benches/blocks_cost.py [--rounds 5] [--batches 400]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this checkout's fastroute when its core is built in place (development),
# else the installed one: a clone's source tree has no compiled core
if glob.glob(os.path.join(HERE, "fastroute", "_core*.so")):
    sys.path.insert(0, HERE)

from fastroute import _core, wire  # noqa: E402
from fastroute.errors import ErrorCode  # noqa: E402

REFUSALS = (ErrorCode.BODY_TOO_LARGE, ErrorCode.UNKNOWN_RECIPIENT,
            ErrorCode.CONSENT_REQUIRED, ErrorCode.RATE_LIMITED)
CASES = {"nobody blocks": {},
         "recipient has blocks": {"bob@home": {"mallory@acme", "@evil"}},
         "others have blocks": {"carol@home": {"mallory@acme"}}}


def per_send(blocks: dict, batches: int, n: int = 256) -> float:
    """Median ns per SEND over ``batches`` fresh batches of ``n``."""
    known = {"bob@home": [1]}
    times = []
    ts = wire.ts_packed(1)
    for _ in range(batches):
        gate = _core.SendGate(known, _core.DedupTable(600, 10**7), None, [],
                              lambda c: None, wire.sack_op, REFUSALS, blocks)
        lg = _core.LinkGate("link", [], "alice@home", b"\xaaalice@home", "home", 61440,
                            None, None)
        lg.msg_tokens, lg.byte_tokens = 1e9, 1e12
        # flat, as the relay's decoder gives them: id, to, body, cls a SEND
        sends = [f for _ in range(n) for f in (os.urandom(16), "bob@home", b"x" * 100, 0)]
        t0 = time.perf_counter()
        _core.accept_sends(gate, lg, sends, 1.0, 1, ts, [], [])
        times.append((time.perf_counter() - t0) / n * 1e9)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=400)
    args = p.parse_args()
    got: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.rounds):
        for name, blocks in CASES.items():
            got[name].append(per_send(blocks, args.batches))
    base = statistics.median(got["nobody blocks"])
    for name, vals in got.items():
        med = statistics.median(vals)
        print(f"{name:22} {med:6.0f} ns/SEND  x{med / base:.2f}  "
              f"(rounds {min(vals):.0f}-{max(vals):.0f})")


if __name__ == "__main__":
    main()
