"""The kit's building blocks: a check is one small declarative unit.

A check is an ``async def`` decorated with :func:`relay_check` (direction 1)
or :func:`client_behaviour` (direction 2): a name, the ``docs/PROTOCOL.md``
section it enforces, and for relay checks the per-provider policy keys its
observation may depend on.  Registering is all it takes to be run and
reported; ``docs/CONFORMANCE.md`` ("Adding a check") shows one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

__all__ = ["Outcome", "Check", "RELAY_CHECKS", "relay_check", "Verdict", "Behaviour",
           "CLIENT_BEHAVIOURS", "client_behaviour", "CheckFailed", "write_json"]

PASS, FAIL, NA = "pass", "fail", "n/a"


class CheckFailed(Exception):
    """Raised inside a check to end it with a failure and a reason."""


@dataclass
class Outcome:
    """What one relay check saw for one column.

    ``observed`` is the provider-independent summary the two columns are
    compared on (codes, counts, orders; never addresses); ``status`` is the
    check's own verdict against the spec; ``policy`` the per-provider policy
    values the expectation was computed from.
    """

    status: str
    observed: str
    detail: str = ""
    policy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Check:
    """A registered relay check (direction 1)."""

    name: str
    section: str
    summary: str
    fn: Callable[..., Awaitable[Outcome]]
    policy_keys: tuple[str, ...] = ()
    needs_registry: bool = False


RELAY_CHECKS: list[Check] = []


def relay_check(name: str, section: str, *, policy: tuple[str, ...] = (),
                needs_registry: bool = False):
    """Register ``async def check(subject) -> Outcome`` as a relay check.

    ``policy`` names the per-provider policy keys (``max_body``,
    ``msgs_per_s``, ``bytes_per_s``) whose values may legitimately make the
    two columns differ; ``needs_registry`` marks checks that need the
    relay's data directory (revocations), reported ``n/a`` without it.
    """
    def deco(fn):
        if any(c.name == name for c in RELAY_CHECKS):
            raise ValueError(f"duplicate relay check {name}")
        summary = (fn.__doc__ or "").strip().split("\n")[0]
        RELAY_CHECKS.append(Check(name, section, summary, fn, policy, needs_registry))
        return fn
    return deco


@dataclass
class Verdict:
    """The grade of one client behaviour."""

    name: str
    section: str
    status: str
    detail: str


@dataclass(frozen=True)
class Behaviour:
    """A registered client scenario (direction 2) and the behaviours it grades."""

    name: str
    grades: tuple[tuple[str, str], ...]  # (behaviour name, PROTOCOL.md section)
    fn: Callable[..., Awaitable[dict[str, tuple[bool | None, str]]]]
    live: bool = True  # needs a connected client (False: grades the session's record)


CLIENT_BEHAVIOURS: list[Behaviour] = []


def client_behaviour(name: str, *grades: tuple[str, str], live: bool = True):
    """Register a client scenario, run in registration order on a live link.

    The scenario returns ``{behaviour: (ok, detail)}`` for each of the
    ``grades`` it declares ``(behaviour, section)``, ``ok`` None for n/a (the
    client does not use what the behaviour is about); a behaviour it does not
    return is reported as failed ("not observed").  With ``live=False`` it
    runs after the others, link or not, on what the session recorded.
    """
    def deco(fn):
        CLIENT_BEHAVIOURS.append(Behaviour(name, tuple(grades) or ((name, ""),), fn, live))
        return fn
    return deco


def write_json(path: str, report: dict[str, Any]) -> None:
    """Write a report as indented JSON."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, sort_keys=False)
        fh.write("\n")


def outcome_dict(o: Outcome) -> dict[str, Any]:
    """An :class:`Outcome` as a JSON-ready dict."""
    return asdict(o)
