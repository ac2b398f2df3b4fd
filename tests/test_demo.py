"""The demo is the README's first experience: it must run and check what it claims."""

from __future__ import annotations

import asyncio

from fastroute.demo import run_demo


def test_demo_runs_and_every_check_holds():
    lines: list[str] = []
    assert asyncio.run(asyncio.wait_for(run_demo(messages=3000, print_fn=lines.append), 60)) == 0
    text = "\n".join(lines)
    assert "fingerprint" in text
    assert "SHA-256 matched: yes" in text
    assert "all distinct, in order" in text
    assert "NO" not in text.replace("NOTE", "")
