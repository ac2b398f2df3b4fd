"""REPLY ops of the feature stages (keys, groups, safety) to a link.

Every request of a feature (``docs/PROTOCOL.md`` 17-19) is answered with a
REPLY carrying the request's id, a code and an optional result; the three
stages that answer them share this one writer of those ops, so none of them
reaches into another's helpers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from .. import wire

if TYPE_CHECKING:
    from .delivery import Delivery, LinkPort

__all__ = ["Replies"]


class Replies:
    """Queues a feature stage's REPLY ops on a link and marks it for the writer.

    ``count_error`` counts every refusal (non-zero code) on the relay's
    counters.
    """

    __slots__ = ("delivery", "count_error")

    def __init__(self, delivery: "Delivery", count_error: Callable[[int], None]) -> None:
        self.delivery = delivery
        self.count_error = count_error

    def reply(self, link: "LinkPort", cid: bytes, code: int, result: Any = None,
              last: bool = True) -> None:
        """REPLY ``cid`` with ``code`` (and ``result``; ``last`` false for a part)."""
        if code:
            self.count_error(code)
        if link.is_open():
            link.out.append(wire.reply_ok_op(cid) if not code and result is None and last
                            else wire.reply_op(cid, code, last, result))
            self.delivery.mark(link)

    def replies_ok(self, link: "LinkPort", cids: list) -> None:
        """:meth:`reply` with code 0 for each of ``cids``, at once."""
        if link.is_open():
            link.out.extend(wire.reply_ok_ops(cids))
            self.delivery.mark(link)

    def reply_parts(self, link: "LinkPort", cid: bytes, packed: list[bytes]) -> None:
        """Answer with a result array (its items packed) split over as many
        REPLY ops as frames need."""
        if not link.is_open():
            return
        room = wire.MAX_PLAINTEXT - 64
        part: list[bytes] = []
        size = 0
        for item in packed:
            if part and size + len(item) > room:
                link.out.append(wire.reply_packed_op(cid, 0, False, part))
                part, size = [], 0
            part.append(item)
            size += len(item)
        link.out.append(wire.reply_packed_op(cid, 0, True, part))
        self.delivery.mark(link)
