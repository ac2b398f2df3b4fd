"""Trace formats: the fastroute v1 text format, SNAP import, synthesis, pseudonyms."""

from __future__ import annotations

import io
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from fastroute.errors import ErrorCode, InvalidArgument, TraceFormatError
from fastroute.loadtest.trace import (
    HEADER,
    MAX_SIZE,
    TraceRecord,
    pseudonymize,
    read_any,
    read_snap,
    read_trace,
    synthetic,
    write_trace,
)


def data_file(name: str) -> Path:
    """A file committed under tests/data/ (see its README.md); missing fails the test."""
    path = Path(__file__).resolve().parent / "data" / name
    assert path.is_file(), f"{path} not found"
    return path


SAMPLE = f"""{HEADER}
# a comment, then a blank line

0 u1 u2 112 p
1500\tu2\tu1 36 e
1500 u2 u1 87 p
   # indented comment
2000000 u3 u1,u2,u4 640 p
"""


def test_read_trace_parses_records_comments_and_groups():
    recs = list(read_trace(io.StringIO(SAMPLE)))
    assert recs == [
        TraceRecord(0, "u1", ("u2",), 112, "p"),
        TraceRecord(1500, "u2", ("u1",), 36, "e"),
        TraceRecord(1500, "u2", ("u1",), 87, "p"),
        TraceRecord(2000000, "u3", ("u1", "u2", "u4"), 640, "p"),
    ]


def test_read_trace_from_path_and_binary_file(tmp_path):
    p = tmp_path / "t.trace"
    p.write_text(SAMPLE)
    assert len(list(read_trace(p))) == 4
    assert len(list(read_trace(str(p)))) == 4
    with open(p, "rb") as f:
        assert len(list(read_trace(f))) == 4
        assert not f.closed  # the caller's file stays the caller's


def test_read_trace_streams_lazily():
    # the error on line 3 only surfaces when iteration reaches it
    it = read_trace(io.StringIO(f"{HEADER}\n0 a b 1 p\n1 a b x p\n"))
    assert next(it).sender == "a"
    with pytest.raises(TraceFormatError):
        next(it)


@pytest.mark.parametrize("line, lineno, words", [
    ("1x a b 10 p", 3, "offset_us"),             # bad int
    ("+5 a b 10 p", 3, "offset_us"),             # signs are not digits here
    ("5 a b 10", 3, "5 fields"),                 # missing field
    ("5 a b 10 p extra", 3, "5 fields"),          # extra field
    ("5 a b -3 p", 3, "size"),                   # negative size
    (f"5 a b {MAX_SIZE + 1} p", 3, "exceeds"),    # too large
    ("0 a b 10 p", 3, "before"),                 # decreasing offset (previous is 1)
    ("5 a b 10 x", 3, "class"),                  # bad class
    ("5 a b 10 P", 3, "class"),
    ("5 a! b 10 p", 3, "sender"),                # bad pseudonym
    ("5 a b,,c 10 p", 3, "recipient"),           # empty recipient
    ("5 a b,b 10 p", 3, "twice"),                # repeated recipient
    ("5 " + "x" * 65 + " b 10 p", 3, "sender"),   # pseudonym too long
])
def test_malformed_lines_name_the_line(line, lineno, words):
    text = f"{HEADER}\n1 a b 10 p\n{line}\n2 a b 10 p\n"
    with pytest.raises(TraceFormatError) as ei:
        list(read_trace(io.StringIO(text)))
    assert ei.value.lineno == lineno
    assert f"line {lineno}" in str(ei.value)
    assert words in str(ei.value)
    assert ei.value.code == ErrorCode.INVALID_ARGUMENT
    assert isinstance(ei.value, ValueError)


def test_line_numbers_count_comments_and_blank_lines():
    text = f"{HEADER}\n# c\n\n0 a b 1 p\n\n# c\n1 a b 1 q\n"
    with pytest.raises(TraceFormatError) as ei:
        list(read_trace(io.StringIO(text)))
    assert ei.value.lineno == 7


@pytest.mark.parametrize("text", [
    "0 a b 10 p\n",                       # no header at all
    "# fastroute trace\n0 a b 10 p\n",     # wrong header
    "\n" + HEADER + "\n",                  # header not first
    "#fastroute-trace v2\n",               # unknown version
    "",                                    # empty file
])
def test_missing_header_is_line_1(text):
    with pytest.raises(TraceFormatError) as ei:
        list(read_trace(io.StringIO(text)))
    assert ei.value.lineno == 1


def test_non_utf8_is_a_format_error(tmp_path):
    p = tmp_path / "bad.trace"
    p.write_bytes(HEADER.encode() + b"\n0 a b 1 p\n\xff\xfe 1 a b 1 p\n")
    with pytest.raises(TraceFormatError):
        list(read_trace(p))


def test_write_then_read_roundtrip(tmp_path):
    recs = list(synthetic(50, 500, duration_s=60, seed=3))
    p = tmp_path / "s.trace"
    assert write_trace(p, recs) == 500
    assert p.read_text().splitlines()[0] == HEADER
    assert list(read_trace(p)) == recs
    buf = io.StringIO()
    write_trace(buf, recs[:3])
    assert list(read_trace(io.StringIO(buf.getvalue()))) == recs[:3]


@pytest.mark.parametrize("bad", [
    TraceRecord(-1, "a", ("b",), 1, "p"),
    TraceRecord(0, "a b", ("b",), 1, "p"),
    TraceRecord(0, "a", (), 1, "p"),
    TraceRecord(0, "a", ("b",), MAX_SIZE + 1, "p"),
    TraceRecord(0, "a", ("b",), 1, "persistent"),
])
def test_write_trace_rejects_what_the_reader_would(tmp_path, bad):
    with pytest.raises(TraceFormatError) as ei:
        write_trace(tmp_path / "x.trace", [TraceRecord(0, "a", ("b",), 1, "p"), bad])
    assert ei.value.lineno == 3


def test_write_trace_rejects_decreasing_offsets(tmp_path):
    with pytest.raises(TraceFormatError):
        write_trace(tmp_path / "x.trace", [TraceRecord(5, "a", ("b",), 1, "p"),
                                           TraceRecord(4, "a", ("b",), 1, "p")])


# ------------------------------------------------------------------ SNAP

SNAP = """# Directed temporal network
1 2 1000

3 4 1005
5 2 1000
2\t1   1002
"""


def test_read_snap_sorts_stably_and_makes_offsets_relative():
    recs = read_snap(io.StringIO(SNAP), body_size=100)
    assert [(r.offset_us, r.sender, r.recipients) for r in recs] == [
        (0, "u1", ("u2",)), (0, "u5", ("u2",)), (2_000_000, "u2", ("u1",)),
        (5_000_000, "u3", ("u4",))]
    assert all(r.size == 100 and r.cls == "p" for r in recs)


def test_read_snap_sizes_default_seeded_or_from_size_fn():
    a = read_snap(io.StringIO(SNAP))
    b = read_snap(io.StringIO(SNAP))
    assert a == b  # deterministic for the default seed
    assert all(0 <= r.size <= MAX_SIZE for r in a)
    c = read_snap(io.StringIO(SNAP), size_fn=lambda i: 10 * i)
    assert [r.size for r in c] == [0, 10, 20, 30]
    with pytest.raises(InvalidArgument):
        read_snap(io.StringIO(SNAP), size_fn=lambda i: -1)
    with pytest.raises(InvalidArgument):
        read_snap(io.StringIO(SNAP), body_size=MAX_SIZE + 1)


@pytest.mark.parametrize("text, lineno", [
    ("1 2 3\n1 2\n", 2),
    ("1 2 3\n\n1 2 3 4\n", 3),
    ("1 x 3\n", 1),
    ("1 2 -3\n", 1),
    ("1 2 3.5\n", 1),
    ("1 2 3\n1 2 99999999999999999999\n", 2),
    ("1 2 3\n1 2 9999999999999999999\n", 2),
])
def test_read_snap_malformed_lines(text, lineno):
    with pytest.raises(TraceFormatError) as ei:
        read_snap(io.StringIO(text))
    assert ei.value.lineno == lineno


def test_read_snap_collegemsg():
    path = data_file("CollegeMsg.txt")
    recs = read_snap(path)
    assert len(recs) == 59_835
    users = {r.sender for r in recs} | {u for r in recs for u in r.recipients}
    assert len(users) == 1_899
    assert recs[0].offset_us == 0
    assert all(a.offset_us <= b.offset_us for a, b in zip(recs, recs[1:]))
    assert all(0 <= r.size <= MAX_SIZE for r in recs)
    # it is a trace like any other: read_any picks SNAP for it
    assert sum(1 for _ in read_any(path, body_size=64)) == 59_835


def test_read_any_picks_the_fastroute_format(tmp_path):
    p = tmp_path / "t.trace"
    p.write_text(SAMPLE)
    assert len(list(read_any(p))) == 4


# ------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_per_seed():
    a = list(synthetic(100, 2000, duration_s=600, seed=7))
    b = list(synthetic(100, 2000, duration_s=600, seed=7))
    c = list(synthetic(100, 2000, duration_s=600, seed=8))
    assert a == b
    assert a != c
    assert len(a) == 2000


def test_synthetic_records_are_valid():
    recs = list(synthetic(300, 5000, duration_s=120, seed=1, group_fraction=0.1))
    assert all(a.offset_us <= b.offset_us for a, b in zip(recs, recs[1:]))
    assert all(0 <= r.offset_us < 120_000_000 for r in recs)
    assert all(r.sender not in r.recipients for r in recs)
    assert any(len(r.recipients) > 1 for r in recs)
    assert {r.cls for r in recs} == {"p", "e"}
    assert 0.05 < sum(r.cls == "e" for r in recs) / len(recs) < 0.3
    assert all(0 <= r.size <= MAX_SIZE for r in recs)


def test_synthetic_is_heavy_tailed_and_bursty():
    recs = list(synthetic(1000, 20000, duration_s=36000, seed=11))
    per_sender = Counter(r.sender for r in recs)
    counts = sorted(per_sender.values(), reverse=True)
    top = counts[: max(1, len(per_sender) // 10)]
    assert sum(top) > 0.4 * len(recs)
    # bursts: per sender, gaps far shorter than the mean gap are common
    # (a Poisson sender has about 10% of gaps under a tenth of its mean)
    times = defaultdict(list)
    for r in recs:
        times[r.sender].append(r.offset_us)
    gaps = [b - a for ts in times.values() for a, b in zip(ts, ts[1:])]
    mean = statistics.mean(gaps)
    assert sum(g < mean / 10 for g in gaps) > 0.3 * len(gaps)
    # sizes: mostly small, with a long tail
    sizes = sorted(r.size for r in recs if r.cls == "p")
    assert sizes[len(sizes) // 2] < 200 < sizes[-1] // 10


@pytest.mark.parametrize("kw", [
    {"n_users": 1}, {"n_messages": -1}, {"duration_s": 0}, {"duration_s": float("nan")},
    {"ephemeral_fraction": 1.5},
])
def test_synthetic_rejects_bad_arguments(kw):
    args = {"n_users": 10, "n_messages": 10, "duration_s": 10, "seed": 0}
    args.update(kw)
    with pytest.raises(InvalidArgument):
        synthetic(**args)


def test_synthetic_tiny_population():
    recs = list(synthetic(2, 50, duration_s=5, seed=0, group_fraction=1.0))
    assert {r.sender for r in recs} <= {"u0", "u1"}
    assert all(len(r.recipients) == 1 for r in recs)


# ------------------------------------------------------------- pseudonyms

def test_pseudonymize_is_keyed_stable_and_trace_safe():
    k1, k2 = b"k" * 32, b"j" * 32
    p = pseudonymize(k1, "alice@home.example")
    assert p == pseudonymize(k1, "alice@home.example")
    assert p != pseudonymize(k2, "alice@home.example")
    assert p != pseudonymize(k1, "alice@other.example")
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", p)
    assert "alice" not in p
    # usable in a trace line
    rec = TraceRecord(0, p, (pseudonymize(k1, "bob@x"),), 10, "p")
    buf = io.StringIO()
    write_trace(buf, [rec])
    assert list(read_trace(io.StringIO(buf.getvalue()))) == [rec]


@pytest.mark.parametrize("key", [b"", b"short", b"x" * 65, "not-bytes-but-long-enough"])
def test_pseudonymize_rejects_weak_keys(key):
    with pytest.raises(InvalidArgument):
        pseudonymize(key, "alice@home")
