"""Log output of the ``fastroute`` command: plain text, or JSON lines.

Every line the relay logs on purpose carries a stable ``event`` name
(``relay.listening``, ``relay.reloaded``, ``device.refused``, ...): either
passed as ``extra={"event": ...}``, or looked up by the line's format string
in :data:`EVENTS` (``tests/test_logs.py`` checks that every log call in the
package has one or the other).  A line from elsewhere (a library) gets
``"log"``.  As at info level everywhere, no line carries a body, a message id
or an address.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["EVENTS", "JsonFormatter", "setup_logging"]

#: event names of the log lines that do not pass ``extra={"event": ...}``, by format string
EVENTS: dict[str, str] = {
    "closing connection: %s": "link.closing",
    "handshake failed: %s": "link.handshake_failed",
    "device refused: code %d (%s)": "device.refused",
    "could not record a consent change: %s": "consent.store_failed",
    "store refused a batch of %d messages (code %d)": "store.batch_refused",
    "fastroute store writer stopped": "store.writer_stopped",
    "fastroute store: %d messages refused: %s": "store.batch_failed",
    "forgot %d revoked devices and what was stored for them": "device.purged",
    "closing a connection that does not read its replies": "link.output_limit",
    "a sender was quarantined (%s)": "sender.quarantined",
    "a sender was throttled (abuse score %.0f)": "sender.throttled",
    "registry write failed: %s": "registry.write_failed",
    "fastroute store: %d deletes and %d registrations kept for retry: %s": "store.deletes_retried",
    "fastroute store: checkpoint failed: %s": "store.checkpoint_failed",
    "fastroute store: the writer's compiled path is off: %s": "store.compiled_path_off",
    "media request failed": "media.failed",
    "sync failed (code %d); closing the device's connection": "delivery.sync_failed",
}

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "event"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event``, ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or EVENTS.get(str(record.msg), "log"),
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(level: int, fmt: str = "text") -> None:
    """Configure the root logger for the command line (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
