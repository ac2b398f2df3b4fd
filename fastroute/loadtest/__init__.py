"""Load testing a relay with replayed traffic (``fastroute replay``).

- :mod:`.trace`: the trace format (``docs/TRACES.md``), SNAP import, synthesis,
  pseudonyms;
- :mod:`.schedule`: when each message is due and an open-loop sender;
- :mod:`.accounting`: per-message ids and outcomes, HDR latency histograms;
- :mod:`.report`: report.json, report.png and the terminal summary.

Trace and schedule need only the standard library; accounting and report need
the ``replay`` extra (hdrhistogram, matplotlib) and are imported on first use.
"""

from __future__ import annotations

from .schedule import BatchItem, LoopStats, Schedule, run_open_loop
from .trace import (
    HEADER,
    MAX_SIZE,
    TraceRecord,
    format_record,
    pseudonymize,
    read_any,
    read_snap,
    read_trace,
    synthetic,
    text_message_size,
    write_trace,
)

__all__ = [
    "Accountant",
    "BatchItem",
    "HEADER",
    "LoopStats",
    "MAX_SIZE",
    "Schedule",
    "TraceRecord",
    "build_report",
    "exit_status",
    "format_record",
    "parse_body",
    "pseudonymize",
    "read_any",
    "read_snap",
    "read_trace",
    "run_open_loop",
    "summary_text",
    "synthetic",
    "text_message_size",
    "write_report",
    "write_trace",
]

_LAZY = {
    "Accountant": "accounting",
    "parse_body": "accounting",
    "build_report": "report",
    "exit_status": "report",
    "summary_text": "report",
    "write_report": "report",
}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
