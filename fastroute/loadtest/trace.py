"""Message traces: the fastroute trace format, SNAP temporal networks, synthesis.

A trace is a time-ordered list of :class:`TraceRecord` (who sent how many
bytes to whom, and when).  ``docs/TRACES.md`` specifies the text format; this
module reads and writes it, converts SNAP ``src dst unix_ts`` files into it,
and generates synthetic traces with the statistical shape of real messaging
(heavy-tailed activity, bursts, heavy-tailed sizes).

Traces never carry real addresses: senders and recipients are pseudonyms
(``pseudonymize`` turns an address into one with a secret key).
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import io
import itertools
import math
import os
import random
import re
from array import array
from typing import Callable, IO, Iterable, Iterator, NamedTuple, Union

from ..errors import InvalidArgument, TraceFormatError

__all__ = [
    "HEADER",
    "MAX_SIZE",
    "MAX_RECIPIENTS",
    "TraceRecord",
    "read_trace",
    "read_snap",
    "read_any",
    "write_trace",
    "format_record",
    "synthetic",
    "text_message_size",
    "pseudonymize",
]

#: First line of every fastroute trace file (the format's magic and version).
HEADER = "#fastroute-trace v1"
#: Largest body size a record may carry (bytes); matches the relay's default limit.
MAX_SIZE = 61440
#: Most recipients one record may name (a group send).
MAX_RECIPIENTS = 1024

PathOrFile = Union[str, "os.PathLike[str]", IO[str]]

_PSEUDONYM = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
# str.isdigit() accepts other scripts' digits and int() accepts "+1" and "1_0";
# the format allows ASCII digits only so that every reader agrees.
_UINT = re.compile(r"[0-9]{1,19}\Z")
_CLASSES = ("p", "e")


class TraceRecord(NamedTuple):
    """One message of a trace.

    ``offset_us`` is microseconds from the trace start, ``recipients`` a
    non-empty tuple of pseudonyms, ``size`` the body size in bytes and
    ``cls`` ``"p"`` (persistent) or ``"e"`` (ephemeral).
    """

    offset_us: int
    sender: str
    recipients: tuple[str, ...]
    size: int
    cls: str


# --------------------------------------------------------------- validation

def _uint(text: str, what: str, lineno: int | None) -> int:
    if not _UINT.match(text):
        raise TraceFormatError(f"{what} must be a non-negative integer, got {text[:32]!r}",
                               lineno)
    return int(text)


def _pseudonym(text: str, what: str, lineno: int | None) -> str:
    if not _PSEUDONYM.match(text):
        raise TraceFormatError(f"{what} must match [A-Za-z0-9_-]{{1,64}}, got {text[:70]!r}",
                               lineno)
    return text


def _parse_recipients(text: str, lineno: int | None) -> tuple[str, ...]:
    parts = text.split(",")
    if len(parts) > MAX_RECIPIENTS:
        raise TraceFormatError(f"more than {MAX_RECIPIENTS} recipients", lineno)
    rcpts = tuple(_pseudonym(p, "recipient", lineno) for p in parts)
    if len(set(rcpts)) != len(rcpts):
        # a repeated name would make "delivered once per recipient" ambiguous
        raise TraceFormatError("a recipient is listed twice", lineno)
    return rcpts


def _check_size(size: int, lineno: int | None) -> int:
    if size > MAX_SIZE:
        raise TraceFormatError(f"size {size} exceeds {MAX_SIZE}", lineno)
    return size


def _check_record(rec: TraceRecord, prev_offset: int, lineno: int | None) -> None:
    """Validate a record built in Python (write path) with the reader's rules."""
    if type(rec.offset_us) is not int or rec.offset_us < 0:
        raise TraceFormatError("offset_us must be a non-negative int", lineno)
    if rec.offset_us < prev_offset:
        raise TraceFormatError(
            f"offset {rec.offset_us} is before the previous record's {prev_offset}", lineno)
    if not isinstance(rec.sender, str):
        raise TraceFormatError("sender must be a str", lineno)
    _pseudonym(rec.sender, "sender", lineno)
    if not isinstance(rec.recipients, tuple) or not rec.recipients:
        raise TraceFormatError("recipients must be a non-empty tuple", lineno)
    _parse_recipients(",".join(str(r) for r in rec.recipients), lineno)
    if type(rec.size) is not int or rec.size < 0:
        raise TraceFormatError("size must be a non-negative int", lineno)
    _check_size(rec.size, lineno)
    if rec.cls not in _CLASSES:
        raise TraceFormatError(f"class must be 'p' or 'e', got {rec.cls!r}", lineno)


# ------------------------------------------------------------------ reading

def _open_text(path_or_file: PathOrFile) -> tuple[IO[str], Callable[[], None]]:
    """Return (text file, what to do when done with it)."""
    if isinstance(path_or_file, (str, os.PathLike)):
        f = open(path_or_file, "r", encoding="utf-8", newline=None)
        return f, f.close
    if isinstance(path_or_file, (io.RawIOBase, io.BufferedIOBase)):
        # detach when done: a collected wrapper would close the caller's file
        w = io.TextIOWrapper(path_or_file, encoding="utf-8")
        return w, w.detach
    return path_or_file, lambda: None


def _lines(f: IO[str]) -> Iterator[tuple[int, str]]:
    lineno = 0
    try:
        for lineno, line in enumerate(f, 1):
            yield lineno, line
    except UnicodeDecodeError as exc:
        raise TraceFormatError("not UTF-8 text", lineno + 1) from exc


def read_trace(path_or_file: PathOrFile) -> Iterator[TraceRecord]:
    """Iterate the records of a fastroute trace (``docs/TRACES.md``).

    ``path_or_file`` is a path or an open text (or binary) file.  The file is
    read lazily, so a trace of any length streams in constant memory.  The
    first line must be :data:`HEADER`; blank lines and lines whose first
    non-blank character is ``#`` are skipped.

    Raises :class:`~fastroute.errors.TraceFormatError` (with ``lineno``) on the
    first malformed line, including a missing header and an offset smaller
    than the previous record's.
    """
    f, done = _open_text(path_or_file)
    try:
        lines = _lines(f)
        first = next(lines, None)
        if first is None or first[1].lstrip("\ufeff").rstrip() != HEADER:
            raise TraceFormatError(f"missing header {HEADER!r} on the first line", 1)
        prev = 0
        for lineno, line in lines:
            stripped = line.strip()
            if not stripped or stripped[0] == "#":
                continue
            fields = stripped.split()
            if len(fields) != 5:
                raise TraceFormatError(
                    f"expected 5 fields 'offset_us sender recipients size class', "
                    f"got {len(fields)}", lineno)
            off_s, sender, rcpts, size_s, cls = fields
            offset = _uint(off_s, "offset_us", lineno)
            if offset < prev:
                raise TraceFormatError(
                    f"offset {offset} is before the previous record's {prev}", lineno)
            prev = offset
            if cls not in _CLASSES:
                raise TraceFormatError(f"class must be 'p' or 'e', got {cls[:8]!r}", lineno)
            yield TraceRecord(offset, _pseudonym(sender, "sender", lineno),
                              _parse_recipients(rcpts, lineno),
                              _check_size(_uint(size_s, "size", lineno), lineno), cls)
    finally:
        done()


def read_snap(path: PathOrFile, *, body_size: int | None = None,
              size_fn: Callable[[int], int] | None = None,
              seed: int = 0) -> list[TraceRecord]:
    """Convert a SNAP temporal network (``src dst unix_ts`` per line) to records.

    Each edge becomes a persistent 1:1 message from ``u<src>`` to ``u<dst>``
    at ``(ts - first_ts)`` seconds, where ``first_ts`` is the smallest
    timestamp; records are sorted by timestamp, keeping file order among
    equal ones.  Blank lines and ``#``/``%`` comment lines are skipped.

    Sizes: ``body_size`` gives every message that size; else ``size_fn(i)``
    gives the size of the i-th message (in sorted order); else sizes are drawn
    from :func:`text_message_size` with ``random.Random(seed)``, so the same
    file and seed always give the same trace.

    Raises :class:`~fastroute.errors.TraceFormatError` with the line number
    for a line that is not three non-negative integers, and
    :class:`~fastroute.errors.InvalidArgument` for a bad ``body_size`` or a
    ``size_fn`` result outside ``0..MAX_SIZE``.
    """
    if body_size is not None and (type(body_size) is not int or not 0 <= body_size <= MAX_SIZE):
        raise InvalidArgument(f"body_size must be an int in 0..{MAX_SIZE}")
    src = array("q")
    dst = array("q")
    ts = array("q")
    f, done = _open_text(path)
    try:
        for lineno, line in _lines(f):
            stripped = line.strip()
            if not stripped or stripped[0] in "#%":
                continue
            fields = stripped.split()
            if len(fields) != 3:
                raise TraceFormatError(f"expected 3 fields 'src dst unix_ts', got {len(fields)}",
                                       lineno)
            src.append(_uint(fields[0], "src", lineno))
            dst.append(_uint(fields[1], "dst", lineno))
            ts.append(_uint(fields[2], "unix_ts", lineno))
    except OverflowError as exc:  # a 19-digit value above 2**63 - 1
        raise TraceFormatError("integer out of range", lineno) from exc
    finally:
        done()
    if not ts:
        return []
    # sorted() is stable, so equal timestamps keep file order
    order = sorted(range(len(ts)), key=ts.__getitem__)
    t0 = ts[order[0]]
    rng = random.Random(seed)
    out = []
    for i, j in enumerate(order):
        if body_size is not None:
            size = body_size
        elif size_fn is not None:
            size = size_fn(i)
            if type(size) is not int or not 0 <= size <= MAX_SIZE:
                raise InvalidArgument(f"size_fn returned {size!r}, not an int in 0..{MAX_SIZE}")
        else:
            size = text_message_size(rng)
        out.append(TraceRecord((ts[j] - t0) * 1_000_000, f"u{src[j]}", (f"u{dst[j]}",),
                               size, "p"))
    return out


def read_any(path: PathOrFile, **snap_options) -> Iterable[TraceRecord]:
    """Read ``path`` as a fastroute trace if it starts with :data:`HEADER`, else as SNAP.

    ``snap_options`` go to :func:`read_snap` (``body_size``, ``size_fn``,
    ``seed``) and are ignored for a fastroute trace, whose sizes are recorded.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgument("read_any needs a path (it reads the first line twice)")
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        first = f.readline().lstrip("\ufeff").rstrip()
    if first == HEADER:
        return read_trace(path)
    return read_snap(path, **snap_options)


# ------------------------------------------------------------------ writing

def format_record(rec: TraceRecord) -> str:
    """Return the trace line for ``rec`` (without newline); no validation."""
    return f"{rec.offset_us} {rec.sender} {','.join(rec.recipients)} {rec.size} {rec.cls}"


def write_trace(path: PathOrFile, records: Iterable[TraceRecord]) -> int:
    """Write ``records`` as a fastroute trace to ``path`` (a path or text file).

    Every record is validated with the reader's rules first, so whatever this
    writes, :func:`read_trace` reads back identically; a bad record raises
    :class:`~fastroute.errors.TraceFormatError` whose ``lineno`` is the line it
    would have had.  Returns the number of records written.
    """
    f, owned = (open(path, "w", encoding="utf-8", newline="\n"), True) \
        if isinstance(path, (str, os.PathLike)) else (path, False)
    n = 0
    try:
        f.write(HEADER + "\n")
        prev = 0
        buf = []
        for n, rec in enumerate(records, 1):
            rec = TraceRecord(*rec)
            _check_record(rec, prev, n + 1)
            prev = rec.offset_us
            buf.append(format_record(rec))
            if len(buf) >= 4096:
                f.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            f.write("\n".join(buf) + "\n")
    finally:
        if owned:
            f.close()
    return n


# ------------------------------------------------------------ size model

def text_message_size(rng: random.Random) -> int:
    """Draw one encrypted text-message body size (bytes) from a heavy-tailed model.

    97%: plain text, log-normal with a 40-byte median (sigma 1.0) plus 48 bytes
    of end-to-end encryption overhead; 3%: rich messages (link previews,
    attachment references with keys and thumbnails), Pareto with scale 400
    bytes and shape 1.3.  Capped at :data:`MAX_SIZE`.  This is a model with
    the shape reported for chat traffic (mostly tiny, a long tail), not a
    measurement; see ``docs/TRACES.md``.
    """
    if rng.random() < 0.97:
        size = 48 + rng.lognormvariate(math.log(40.0), 1.0)
    else:
        size = 400.0 * rng.paretovariate(1.3)
    return min(int(size), MAX_SIZE)


def _signal_size(rng: random.Random) -> int:
    # receipts, typing and presence: a small fixed-shape payload plus overhead
    return rng.randint(16, 64)


# -------------------------------------------------------------- synthesis

def synthetic(n_users: int, n_messages: int, *, duration_s: float, seed: int,
              zipf_s: float = 1.0, ephemeral_fraction: float = 0.15,
              group_fraction: float = 0.02, max_group: int = 32,
              mean_burst: float = 6.0, burst_gap_s: float = 15.0,
              reply_prob: float = 0.5) -> Iterator[TraceRecord]:
    """Generate a synthetic trace of ``n_messages`` over ``duration_s`` seconds.

    The model (details in ``docs/TRACES.md``):

    - *activity*: user ``k`` (by rank) starts conversations with weight
      ``1 / k**zipf_s`` and is picked as a partner with the same law, so a few
      users send most messages (heavy tail);
    - *bursts*: conversations start as a Poisson process over the duration;
      each has a heavy-tailed number of messages (1 + discrete Pareto with
      mean about ``mean_burst``) separated by exponential gaps of mean
      ``burst_gap_s``, and each message is a reply (roles swap) with
      probability ``reply_prob``: an on/off cluster process, the simplest
      Hawkes-like self-excitation;
    - *groups*: a conversation is a group of 3..``max_group`` members with
      probability ``group_fraction`` (one record, several recipients);
    - *classes*: a message is ephemeral (receipt, typing) with probability
      ``ephemeral_fraction`` and then 16..64 bytes; persistent sizes follow
      :func:`text_message_size`.

    Pseudonyms are ``u0`` .. ``u<n_users-1>``, assigned to ranks in a random
    order.  The result depends only on the arguments: the same ``seed`` gives
    the same records on every platform.  Records are produced in offset order
    from compact arrays (about 40 bytes a message while generating).
    """
    if type(n_users) is not int or n_users < 2:
        raise InvalidArgument("n_users must be an int >= 2")
    if type(n_messages) is not int or n_messages < 0:
        raise InvalidArgument("n_messages must be a non-negative int")
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s)
            and duration_s > 0):
        raise InvalidArgument("duration_s must be a positive finite number")
    for name, p in (("ephemeral_fraction", ephemeral_fraction),
                    ("group_fraction", group_fraction), ("reply_prob", reply_prob)):
        if not 0.0 <= p <= 1.0:
            raise InvalidArgument(f"{name} must be in [0, 1]")
    if mean_burst < 1.0 or burst_gap_s < 0 or zipf_s < 0 or max_group < 3:
        raise InvalidArgument("mean_burst >= 1, burst_gap_s >= 0, zipf_s >= 0, max_group >= 3")
    return _synthetic(n_users, n_messages, float(duration_s), seed, zipf_s,
                      ephemeral_fraction, group_fraction, min(max_group, n_users),
                      mean_burst, burst_gap_s, reply_prob)


def _synthetic(n_users, n_messages, duration_s, seed, zipf_s, eph, group_fraction,
               max_group, mean_burst, burst_gap_s, reply_prob):
    rng = random.Random(seed)
    names = [f"u{i}" for i in range(n_users)]
    rng.shuffle(names)  # rank r -> names[r]: popularity does not follow the id
    cum = list(itertools.accumulate(1.0 / (k ** zipf_s) for k in range(1, n_users + 1)))
    total = cum[-1]

    def pick() -> int:
        return bisect.bisect_left(cum, rng.random() * total)

    def partner(a: int) -> int:
        while True:
            b = pick()
            if b != a:
                return b

    # Discrete Pareto for burst lengths: 1 + floor(xm * (U^(-1/alpha) - 1)),
    # alpha = 2 keeps the variance finite-ish but the tail long; xm sets the mean.
    alpha = 2.0
    xm = (mean_burst - 1.0) * (alpha - 1.0)
    dur_us = max(1, int(duration_s * 1_000_000))
    offs = array("q")
    snd = array("i")
    size = array("i")
    cls = bytearray()
    rcpt_of = array("i")  # index into groups: who is in the conversation
    groups: list[tuple[int, ...]] = []
    made = 0
    while made < n_messages:
        length = 1 + int(xm * (rng.random() ** (-1.0 / alpha) - 1.0)) if xm > 0 else 1
        length = min(length, n_messages - made)
        a = pick()
        if max_group >= 3 and rng.random() < group_fraction:
            members = {a}
            want = rng.randint(3, max_group)
            # popular users are drawn again and again; bound the tries so a
            # group nearly as large as the population cannot stall
            for _ in range(50 * want):
                if len(members) >= want:
                    break
                members.add(pick())
            group = tuple(sorted(members))
        else:
            group = (a, partner(a))
        gid = len(groups)
        groups.append(group)
        t = rng.random() * duration_s
        speaker = a
        for _ in range(length):
            # a conversation running past the end wraps to the start (circular
            # time): clamping would pile its tail up on the last microsecond
            offs.append(int(t * 1_000_000) % dur_us)
            snd.append(speaker)
            rcpt_of.append(gid)
            e = rng.random() < eph
            cls.append(1 if e else 0)
            size.append(_signal_size(rng) if e else text_message_size(rng))
            # reply: another member speaks next (in a pair, the partner)
            if rng.random() < reply_prob:
                others = [m for m in group if m != speaker]
                speaker = others[0] if len(others) == 1 else rng.choice(others)
            t += rng.expovariate(1.0 / burst_gap_s) if burst_gap_s > 0 else 0.0
        made += length
    order = sorted(range(len(offs)), key=offs.__getitem__)
    for j in order:
        s = snd[j]
        rc = tuple(names[m] for m in groups[rcpt_of[j]] if m != s)
        yield TraceRecord(offs[j], names[s], rc, size[j], "e" if cls[j] else "p")


# ------------------------------------------------------------- pseudonyms

_PERSON = b"fastroute-pseud1"  # 16 bytes: BLAKE2b personalisation (domain separation)


def pseudonymize(key: bytes, address: str) -> str:
    """Return the trace pseudonym of ``address`` under the secret ``key``.

    Keyed BLAKE2b (the keyed mode is a MAC) over the UTF-8 address, truncated
    to 96 bits and encoded url-safe base64 without padding: 16 characters of
    ``[A-Za-z0-9_-]``.  Without the key, a pseudonym cannot be linked to an
    address even by trying every known address; with the same key, the same
    address always maps to the same pseudonym, so conversations stay linked.
    ``key`` must be 16..64 bytes (:class:`~fastroute.errors.InvalidArgument`).
    """
    if not isinstance(key, (bytes, bytearray)) or not 16 <= len(key) <= 64:
        raise InvalidArgument("pseudonym key must be 16..64 bytes")
    if not isinstance(address, str):
        raise InvalidArgument("address must be a str")
    digest = hashlib.blake2b(address.encode("utf-8"), key=bytes(key), digest_size=12,
                             person=_PERSON).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")
