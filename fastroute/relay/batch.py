"""One store batch per loop turn for the sends that are answered with a REPLY.

The per-device sends of the keys stage and the group sends of the groups
stage are accepted one by one as their ops are read, stored together at the
end of the loop turn (one store batch, one commit), and answered once the
store has: :class:`TurnBatch` is that bookkeeping, written once for both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from .._compiled import twin
from ..dedup import PENDING
from ..errors import ErrorCode, StoreFailed

if TYPE_CHECKING:
    from .delivery import Delivery, LinkPort

__all__ = ["TurnBatch", "finish_run", "py_finish_run"]

log = logging.getLogger("fastroute.relay")


def py_finish_run(meta: list, i: int, dedup: Any, now: float, cids: list,
                  waiters: list) -> int:
    """The run of ``meta[i:]`` entries ``(link, id, extra)`` of one link, stored:
    each id decided in ``dedup`` (code 0 at ``now``) and appended to ``cids``,
    the waiters that resent it meanwhile appended to ``waiters``; returns
    where the run ends.  The specification of the compiled ``finish_run``."""
    n = len(meta)
    if i >= n:
        return i
    link = meta[i][0]
    sender = link.address
    while i < n and meta[i][0] is link:
        cid = meta[i][1]
        waiters.extend(dedup.finish(sender, cid, 0, now) or ())
        cids.append(cid)
        i += 1
    return i


#: :func:`py_finish_run`, compiled when the core is built
finish_run = twin(py_finish_run)


def _refusal_code(exc: BaseException) -> int:
    """The code a store's refusal answers its batch's requests with."""
    return int(getattr(exc, "code", ErrorCode.STORE_FAILED))


class TurnBatch:
    """Requests accepted in one loop turn, stored in one store batch, then answered.

    Used by the stages whose sends are answered with a REPLY (per-device and
    group sends): a stage appends a request's store items to :attr:`items`
    and ``(link, id, extra)`` to :attr:`meta`, and says how many with
    :meth:`added`; at the end of the turn they go to the store together;
    once it answered,
    ``place(meta, mids)`` puts the committed rows on the live route, and every
    sender (and every resend of the same id that waited meanwhile) gets
    ``reply(link, id, code)``.  A refused batch is not remembered: each sender
    may retry with the same id.

    With ``store_now``, a turn that gathered requests but no items goes to
    ``store_now(meta)`` instead, which stores and places them at once (the
    memory store's routes, made from ``meta`` alone; an exception is the
    store's refusal).  With ``persist_meta``, such a turn goes to
    ``persist_meta(meta)``, which hands the store what ``meta`` holds and
    returns its future (as :meth:`Delivery.persist` does for items).
    """

    def __init__(self, delivery: "Delivery", dedup: Any, reply: Callable[..., None],
                 place: Callable[[list, list], None], what: str, event: str,
                 reply_ok: Callable[[Any, list], None] | None = None,
                 store_now: Callable[[list], None] | None = None,
                 persist_meta: Callable[[list], asyncio.Future] | None = None) -> None:
        self.delivery = delivery
        self.dedup = dedup
        self.reply = reply
        #: ``reply_ok(link, ids)``: what ``reply`` does for each of a link's
        #: accepted ``ids``, for all of them at once (None: ``reply`` each)
        self.reply_ok = reply_ok
        self.place = place
        self.store_now = store_now
        self.persist_meta = persist_meta
        self.what = what  # for the log line: "per-device sends", "group sends"
        self.event = event
        #: the turn's store items and ``(link, id, extra)`` requests so far
        self.items: list = []
        self.meta: list = []
        self._scheduled = False
        #: the running loop, looked up once: asyncio checks the process id
        #: (a system call) on every lookup, and every read of these sends adds
        self._loop: asyncio.AbstractEventLoop | None = None

    def resent(self, link: "LinkPort", cid: bytes, now: float) -> bool:
        """True when ``cid`` was seen from this sender: a decided one is answered
        again, a pending one waits for its batch; either way not stored twice."""
        seen = self.dedup.lookup(link.address, cid, now)
        if seen is None:
            return False
        if seen == PENDING:
            self.dedup.wait(link.address, cid, (link, cid))
        else:
            self.reply(link, cid, seen)
        return True

    def added(self, link: "LinkPort", n: int) -> None:
        """``n`` requests of ``link`` were appended to :attr:`items` and :attr:`meta`."""
        link.storing += n
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._persist)

    def _persist(self) -> None:
        self._scheduled = False
        items, self.items = self.items, []
        meta, self.meta = self.meta, []
        if not meta:
            return
        try:
            if not items and self.store_now is not None:
                self.store_now(meta)
                fut = None
            elif not items and self.persist_meta is not None:
                fut = self.persist_meta(meta)
            else:
                fut = self.delivery.persist(items)
        except Exception as exc:  # noqa: BLE001 - any refusal is answered alike
            # refused at once (a closed store, say): every sender hears it
            log.error("store refused a batch of %d %s", len(meta), self.what,
                      exc_info=True, extra={"event": self.event})
            self._answer(meta, _refusal_code(exc))
            self.delivery.write_pending()
            return
        if fut is None:  # stored and placed at once
            self._answer(meta, 0)
            self.delivery.write_pending()
            return
        if fut.done():  # the memory store answers at once: no hop through the loop
            self._stored(meta, fut)
            # nor one for the writer: this runs among the loop's callbacks,
            # where the writer it woke would run a loop iteration later (a
            # poll, and the wait, between a read and its answer and copies)
            self.delivery.write_pending()
        else:
            fut.add_done_callback(lambda f: self._stored(meta, f))

    def _stored(self, meta: list, fut: asyncio.Future) -> None:
        exc = fut.exception() if not fut.cancelled() else StoreFailed("store closed")
        code = 0
        if exc is not None:
            code = _refusal_code(exc)
            self.delivery.persisted(None, 0)
            log.error("store refused a batch of %d %s (code %d)", len(meta), self.what, code,
                      extra={"event": self.event})
        else:
            self.place(meta, fut.result())
        self._answer(meta, code)

    def _answer(self, meta: list, code: int) -> None:
        """Answer every request of a stored (``code`` 0) or refused batch."""
        now = time.monotonic()
        dedup, reply = self.dedup, self.reply
        if not code and self.reply_ok is not None:
            self._accepted(meta, now)
            return
        for link, cid, _ in meta:
            link.storing -= 1
            try:
                sender = link.address
                if code:
                    # refused, so not remembered: the sender may retry the same id
                    waiters = dedup.forget(sender, cid)
                else:
                    waiters = dedup.finish(sender, cid, 0, now)
                reply(link, cid, code)
                for other, wcid in waiters or ():
                    reply(other, wcid, code)
            finally:
                link.stored_all()

    def _accepted(self, meta: list, now: float) -> None:
        """Answer a stored batch: each link's run of requests at once (a
        batch holds mostly one sender's)."""
        dedup, reply, reply_ok = self.dedup, self.reply, self.reply_ok
        assert reply_ok is not None
        i, n = 0, len(meta)
        while i < n:
            link = meta[i][0]
            cids: list = []
            waiters: list = []
            end = finish_run(meta, i, dedup, now, cids, waiters)
            link.storing -= end - i
            i = end
            try:
                # resends of the same ids that waited for this batch
                for other, wcid in waiters:
                    reply(other, wcid, 0)
                reply_ok(link, cids)
            finally:
                link.stored_all()
