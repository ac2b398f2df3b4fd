"""The relay, as a pipeline of stages: one module per step of the data path.

``link`` (handshake, frames, op dispatch) -> ``gate`` (credential and every
check an op passes) -> the store (:mod:`fastroute.store`) -> ``delivery``
(engine, live route, backlog sync, writer); beside them ``media_ops``
(attachments), the feature stages the link hands their ops to, each using
only the ones after it (``groups`` -> ``keys`` -> ``safety`` -> ``gate``),
and ``upkeep`` (timers, revocations, admin socket); ``server`` wires them
together, hands each stage what it tells the stages above it, and owns the
lifecycle.  ``batch``, ``replies`` and ``senders`` are shared below the
stages that use them.
"""

from __future__ import annotations

from .server import Relay, fingerprint, load_or_create_server_key, run_relay

__all__ = ["Relay", "fingerprint", "load_or_create_server_key", "run_relay"]
