"""Argument definitions of ``fastroute replay`` and ``fastroute record``.

Kept apart from the implementations so that ``fastroute --help`` does not
import the load-testing dependencies (hdrhistogram, matplotlib).
"""

from __future__ import annotations

import argparse

__all__ = ["add_replay_args", "add_record_args"]


def add_replay_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``fastroute replay TRACE --target HOST:PORT ...``."""
    p.add_argument("trace", help="a fastroute trace (docs/TRACES.md) or a SNAP file 'src dst ts'")
    p.add_argument("--target", default="127.0.0.1:7474", help="relay HOST:PORT")
    p.add_argument("--speed", default="max",
                   help="replay factor (1 = real time, 10000 = 10000x) or 'max' (default)")
    p.add_argument("--report", default=None, help="directory for report.json and report.png")
    p.add_argument("--processes", type=int, default=1,
                   help="worker processes holding the simulated devices")
    p.add_argument("--data-dir", default=None,
                   help="the relay's data directory: enrol a throwaway test provider there "
                        "(removed after the run)")
    p.add_argument("--provider", default=None, help="an enrolled provider's name ...")
    p.add_argument("--provider-key", default=None, help="... and its private key file")
    p.add_argument("--server-key", default=None, help="relay public key (hex) to pin")
    p.add_argument("--limit", type=int, default=0, help="replay only the first N messages")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds without progress before the run ends")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_record_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``fastroute record --data-dir DIR --out TRACE ...``."""
    p.add_argument("--data-dir", default=None,
                   help="the running relay's data directory (its admin.sock); default: "
                        "$FASTROUTE_DATA_DIR, else ./fastroute-data")
    p.add_argument("--out", required=True, help="trace file to write")
    p.add_argument("--duration", type=float, default=60.0, help="seconds to record")
    p.add_argument("--count", type=int, default=0, help="stop after N messages (0: no limit)")
    p.add_argument("--key-file", default=None,
                   help="pseudonym key (16-64 bytes); default: a fresh random key, not saved")
