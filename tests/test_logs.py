"""JSON-lines logs: every log call of the package has a stable event name."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from fastroute.logs import EVENTS, JsonFormatter

ROOT = Path(__file__).resolve().parents[1] / "fastroute"
CALL = re.compile(r"\blog\.(debug|info|warning|error|exception|critical)\(\s*(f?)\"([^\"]*)\"",
                  re.S)


def test_every_log_call_has_an_event_name():
    calls = 0
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        for m in CALL.finditer(text):
            calls += 1
            template = m.group(3)
            # the call's arguments, up to its closing parenthesis (good enough for our calls)
            tail = text[m.end():m.end() + 400]
            has_extra = "extra={\"event\"" in tail.split("\n\n", 1)[0]
            assert has_extra or template in EVENTS, f"{path.name}: {template!r} has no event"
    assert calls >= 10


def test_the_json_formatter_writes_one_object_per_line():
    fmt = JsonFormatter()
    rec = logging.LogRecord("fastroute.relay", logging.INFO, __file__, 1,
                            "device refused: code %d (%s)", (205, "CREDENTIAL_REVOKED"), None)
    line = fmt.format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["event"] == "device.refused" and doc["level"] == "info"
    assert doc["msg"] == "device refused: code 205 (CREDENTIAL_REVOKED)"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])
    rec = logging.LogRecord("x", logging.WARNING, __file__, 1, "other %s", ("a",), None)
    rec.event = "custom.event"
    assert json.loads(fmt.format(rec))["event"] == "custom.event"
