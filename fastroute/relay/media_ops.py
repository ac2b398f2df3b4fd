"""The media stage: attachment requests (MBEGIN, MCHUNK, MFINISH, MGET) of a link.

Attachments travel out of band: encrypted-by-client blobs put to and fetched
from the content-addressed :class:`~fastroute.media.MediaStore`; a message
carries only the reference.  Each request runs as a task of its own (the
store does file I/O on threads) and is answered with an MREPLY carrying the
request's id; a link may have at most :data:`MAX_IN_FLIGHT` in progress.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from .. import wire
from ..errors import ErrorCode, FastrouteError, RateLimited
from ..media import MediaStore
from .gate import take_all

if TYPE_CHECKING:
    from .delivery import Delivery, LinkPort

__all__ = ["MAX_IN_FLIGHT", "MediaOps"]

log = logging.getLogger("fastroute.relay")

#: media requests one link may have in progress; more are refused
MAX_IN_FLIGHT = 32


class MediaOps:
    """Runs a relay's media requests against its media store."""

    def __init__(self, media: MediaStore, delivery: "Delivery",
                 count_error: Callable[[int], None]) -> None:
        self.media = media
        self.delivery = delivery
        self.count_error = count_error
        self._tasks: set[asyncio.Task] = set()

    def request(self, link: "LinkPort", op: tuple) -> None:
        """Start one media op; it answers with MREPLY when done."""
        rid = op[1]
        if link.media_in_flight >= MAX_IN_FLIGHT:
            self.count_error(ErrorCode.RATE_LIMITED)
            link.out.append(wire.mreply_op(rid, ErrorCode.RATE_LIMITED))
            self.delivery.mark(link)
            return
        link.media_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(link, op))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, link: "LinkPort", op: tuple) -> None:
        media = self.media
        kind, rid = op[0], op[1]
        result: object = None
        try:
            if kind == wire.Op.MBEGIN:
                upload = await media.begin(link.address, op[2], op[3])
                result = [upload, media.chunk_size]
            elif kind == wire.Op.MCHUNK:
                # attachment bytes count against the same byte quota as messages
                if not take_all(link.budgets.bytes, len(op[4])):
                    raise RateLimited("byte quota exhausted")
                await media.put_chunk(op[2], op[3], op[4])
            elif kind == wire.Op.MFINISH:
                result = await media.finish(op[2])
            else:
                data = await media.read_chunk(op[2], op[3])
                size, chunks = media.stat(op[2])
                result = [size, chunks, data]
            code = 0
        except FastrouteError as exc:
            code = int(exc.code)
            result = None
            self.count_error(code)
        except Exception:  # a bug must cost one request, never the relay
            log.exception("media request failed")
            code = int(ErrorCode.INTERNAL)
            result = None
        finally:
            link.media_in_flight -= 1
        if link.is_open():
            link.out.append(wire.mreply_op(rid, code, result))
            self.delivery.mark(link)

    def cancel(self) -> None:
        """Cancel every request in progress (relay shutdown)."""
        for task in list(self._tasks):
            task.cancel()
