"""The store writer's WAL frames written a commit a call (``ext/fastroute/_walvfs.pxi``).

Its specification is SQLite's default VFS (``fastroute.store.py_wal_vfs``
gives no name): the layer may change how many calls carry a commit's frames
to the file, never which bytes reach it, where, or when a commit is in the
file.  So these tests run the same transactions both ways and compare what a
second connection sees after each, and the files' sizes; count the write
calls of the thread that commits; kill a process right after a commit
returned and look for it in the file; and make the file refuse a write to
see both ways fail alike.  One difference is the layer's on purpose: a WAL
emptied (``wal_checkpoint(TRUNCATE)``) keeps its first 16 MB as zeroes
instead of being cut to nothing, so the commits after it do not extend the
file; the tests read that file as no WAL, as SQLite does, and check that it
holds nothing else.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from cliutil import ENV, thread_counter

import fastroute
from fastroute import store as store_mod
from fastroute.store import SqliteStore, py_wal_vfs

needs_c = pytest.mark.skipif(not fastroute.COMPILED, reason="compiled core not built")


def _vfs() -> str:
    name = store_mod._wal_vfs()
    assert name is not None, "the compiled twin could not register its VFS"
    return name


def _connect(path: str, vfs: str | None) -> sqlite3.Connection:
    target, uri = store_mod._writer_target(path, vfs)  # as the store's writer opens it
    return sqlite3.connect(target, uri=uri, isolation_level=None)


def _wal_db(path: str, vfs: str | None, synchronous: str, page_size: int) -> sqlite3.Connection:
    """A new database at ``path`` in WAL mode, opened through ``vfs``."""
    conn = _connect(path, vfs)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


def _writes_of(tid: int) -> int:
    """The write calls (write, pwrite, writev, ...) thread ``tid`` made so far."""
    return thread_counter(tid, "io", "syscw")


def test_the_specification_names_no_vfs_and_the_twin_one_that_opens():
    assert py_wal_vfs() is None
    if not fastroute.COMPILED:
        assert store_mod._wal_vfs is py_wal_vfs
        assert store_mod._writer_target("/a/b.db", store_mod._wal_vfs()) == ("/a/b.db", False)
        return
    name = _vfs()
    assert name == "fastroute-wal" and store_mod._wal_vfs() == name  # registered once
    # the writer's URI keeps a path that a URI would read otherwise
    target, uri = store_mod._writer_target("/tmp/a b?c#d%e.db", name)
    assert uri and target == "file:/tmp/a%20b%3Fc%23d%25e.db?vfs=fastroute-wal"


@needs_c
def test_a_path_a_uri_would_misread_opens_the_same_file(tmp_path):
    path = str(tmp_path / "a b?c#d%e.db")
    target, uri = store_mod._writer_target(path, _vfs())
    conn = sqlite3.connect(target, uri=uri, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t(k)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    assert sorted(os.listdir(tmp_path)) == ["a b?c#d%e.db"]
    assert sqlite3.connect(path).execute("SELECT k FROM t").fetchall() == [(1,)]


def _commits(conn: sqlite3.Connection, n: int, tables: int) -> None:
    # each commit changes a row of each table: a page (a frame) each
    for i in range(n):
        conn.execute("BEGIN")
        for t in range(tables):
            conn.execute(f"INSERT OR REPLACE INTO t{t} VALUES (?, ?)", (i % 40, os.urandom(300)))
        conn.execute("COMMIT")


@needs_c
@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
def test_a_commit_s_frames_go_in_one_write_call(tmp_path, synchronous):
    tables, n = 8, 60
    per_commit = {}
    for vfs in (None, _vfs()):
        conn = _wal_db(str(tmp_path / f"{vfs}.db"), vfs, synchronous, 8192)
        for t in range(tables):
            conn.execute(f"CREATE TABLE t{t}(k INTEGER PRIMARY KEY, v BLOB)")
        _commits(conn, 5, tables)  # the WAL and its index made, outside the count
        tid = threading.get_native_id()
        before = _writes_of(tid)
        _commits(conn, n, tables)
        per_commit[vfs] = (_writes_of(tid) - before) / n
        conn.close()
    # SQLite's own way: two calls a frame (its header, its page), a frame
    # a changed page, a page a table at least
    assert per_commit[None] >= 2 * tables, per_commit
    # gathered: one call a commit (the WAL index's file grows now and then)
    assert per_commit[_vfs()] <= 1.5, per_commit


def _script(conn: sqlite3.Connection, reader: sqlite3.Connection, wal: str) -> list:
    """Transactions of every shape the layer must carry; after each, what
    another connection (the default VFS) sees and how large the WAL is."""
    seen = []

    def look(step: str) -> None:
        rows = reader.execute("SELECT k, length(v), hex(substr(v, 1, 8)) FROM t ORDER BY k")
        seen.append((step, rows.fetchall(), os.path.getsize(wal) if os.path.exists(wal) else -1))

    conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    look("create")
    blob = bytes(range(256)) * 64
    for i in range(30):  # small commits, a page or two each
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, blob[i:i + 100]))
        look(f"small {i}")
    # a transaction larger than the layer gathers (1 MB) and than a call
    # of the default VFS writes (128 KB), spilling SQLite's small cache:
    # frames written before the commit (a page spilled and changed again
    # may be rewritten where it was)
    conn.execute("BEGIN")
    for i in range(100, 160):
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, blob * 2))
        conn.execute("UPDATE t SET v = ? WHERE k = ?", (blob[:50], i - 100))
    conn.execute("COMMIT")
    look("large")
    # a spilled transaction rolled back: its frames are in the WAL, no commit
    conn.execute("BEGIN")
    for i in range(200, 240):
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, blob * 2))
    conn.execute("ROLLBACK")
    look("rolled back")
    conn.execute("DELETE FROM t WHERE k % 3 = 0")
    look("delete")
    # a checkpoint, then a commit that starts the WAL over at its header
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    conn.execute("INSERT INTO t VALUES (?, ?)", (1000, blob[:10]))
    look("after a reset")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    look("truncated")
    for i in range(5):
        conn.execute("UPDATE t SET v = ? WHERE k = ?", (blob[i:i + 20], 1000))
        look(f"regrown {i}")
    return seen


@needs_c
@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL", "OFF"])
def test_each_commit_is_in_the_file_as_the_default_vfs_leaves_it(tmp_path, synchronous):
    results = {}
    for vfs in (None, _vfs()):
        path = str(tmp_path / f"{vfs}.db")
        conn = _wal_db(path, vfs, synchronous, 4096)
        conn.execute("PRAGMA cache_size = 20")  # spills a large transaction
        conn.execute("PRAGMA secure_delete = ON")
        reader = sqlite3.connect(path, isolation_level=None)  # the default VFS
        seen = _script(conn, reader, path + "-wal")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        reader.close()
        conn.close()
        with open(path, "rb") as fh:
            # past the header's change counter and the like: the pages
            body = fh.read()[100:]
        results[vfs] = (seen, body)
    (seen_d, body_d), (seen_v, body_v) = results[None], results[_vfs()]
    assert [s[0] for s in seen_v] == [s[0] for s in seen_d]
    kept = None  # the WAL's size when the layer emptied it (then it keeps it)
    for got, want in zip(seen_v, seen_d):
        if got[0] == "truncated":
            kept = seen_v[seen_v.index(got) - 1][2]
            assert want[2] == 0 < kept  # SQLite's own way cuts it to nothing
        # rows seen by another connection, and the WAL's size: after the
        # layer emptied it, the larger of its kept size and SQLite's regrown one
        assert got == (want if kept is None else (*want[:2], max(kept, want[2])))
    assert kept is not None
    assert body_v == body_d  # the database file, page for page


_CHILD = textwrap.dedent("""
    import os, sqlite3, sys
    from fastroute import store
    path, synchronous = sys.argv[1], sys.argv[2]
    target, uri = store._writer_target(path, store._wal_vfs())
    assert uri, "the layer is not in use"
    conn = sqlite3.connect(target, uri=uri, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("CREATE TABLE IF NOT EXISTS t(k INTEGER PRIMARY KEY, v BLOB)")
    for i in range(1000):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, os.urandom(200)))
        conn.execute("INSERT INTO t VALUES (?, ?)", (10000 + i, os.urandom(5000)))
        conn.execute("COMMIT")
        print(i, flush=True)
        sys.stdin.readline()  # held here until told to go on, or killed
""")


@needs_c
@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
@pytest.mark.parametrize("kill_after", [1, 9])
def test_a_process_killed_after_a_commit_returned_keeps_the_commit(tmp_path, synchronous,
                                                                  kill_after):
    path = str(tmp_path / "k.db")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, path, synchronous],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        for i in range(kill_after):
            assert child.stdout.readline().strip() == str(i)
            if i + 1 < kill_after:
                child.stdin.write("\n")
                child.stdin.flush()
        # the commit returned, and nothing has run since: no later write,
        # no close, no checkpoint
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        _reap(child)
    keys = _recovered_keys(path)
    assert keys == list(range(kill_after)) + list(range(10000, 10000 + kill_after))


def _reap(child: subprocess.Popen) -> None:
    """Kill ``child`` if it still runs (a test that failed first), and wait for it."""
    if child.poll() is None:
        child.kill()
    child.wait()


def _recovered_keys(path: str) -> list[int]:
    """The keys of table ``t`` as a new connection (the default VFS) finds
    them, recovering from the WAL a killed process left; integrity checked."""
    conn = sqlite3.connect(path)
    try:
        keys = [k for (k,) in conn.execute("SELECT k FROM t ORDER BY k")]
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
    return keys


_FULL_CHILD = textwrap.dedent("""
    import resource, signal, sqlite3, sys
    from fastroute import store
    path, vfs = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write fails, not kills
    if vfs != "-":
        assert store._wal_vfs() == vfs
    target, uri = store._writer_target(path, None if vfs == "-" else vfs)
    conn = sqlite3.connect(target, uri=uri, isolation_level=None)
    conn.execute("PRAGMA page_size = 4096")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
    out = []
    for n, size in ((10, 1000), (1, 400_000), (3, 2000), (40, 5000), (2, 100)):
        try:
            conn.execute("BEGIN")
            for i in range(n):
                conn.execute("INSERT INTO t(v) VALUES (zeroblob(?))", (size,))
            conn.execute("COMMIT")
            out.append("ok")
        except sqlite3.Error as exc:
            out.append(getattr(exc, "sqlite_errorname", type(exc).__name__))
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        out.append(conn.execute("SELECT count(*), coalesce(sum(length(v)), 0) FROM t").fetchone())
    out.append(conn.execute("PRAGMA integrity_check").fetchone())
    print(out)
""")


@needs_c
def test_a_write_the_file_refuses_fails_its_transaction_as_without_the_layer(tmp_path):
    outs = {}
    for vfs in ("-", _vfs()):
        path = str(tmp_path / f"{vfs}.db")
        # the same fastroute as this test's (installed, or the built tree)
        run = subprocess.run([sys.executable, "-c", _FULL_CHILD, path, vfs],
                             capture_output=True, text=True, timeout=60, env=ENV)
        assert run.returncode == 0, run.stderr
        outs[vfs] = run.stdout
    assert outs[_vfs()] == outs["-"]
    # the limit was met: a transaction failed, and the ones after it went on
    assert "ok" in outs["-"] and "SQLITE_IOERR" in outs["-"] and "('ok',)" in outs["-"]


async def _store_writes(path: str) -> tuple[int, int]:
    """Commits of 20 messages for 10 devices each, one at a time: how many
    the store made, and how many write calls its writer thread made."""
    store = await SqliteStore.open(path)
    try:
        writer = store._thread  # not by name: another test's store may still run one
        keys = [store.register_device("a", f"d{i}") for i in range(10)]
        await store.put_many([("s", bytes(16), b"x" * 100, 1, keys)])
        commits, before = store.commits, _writes_of(writer.native_id)
        for _ in range(40):
            await store.put_many([("s", os.urandom(16), os.urandom(300), 1, keys)
                                  for _ in range(20)])
        return store.commits - commits, _writes_of(writer.native_id) - before
    finally:
        await store.close()


@needs_c
def test_the_store_s_writer_writes_a_commit_in_one_call(tmp_path, monkeypatch):
    commits, writes = asyncio.run(_store_writes(str(tmp_path / "vfs.db")))
    monkeypatch.setattr(store_mod, "_wal_vfs", py_wal_vfs)
    commits_d, writes_d = asyncio.run(_store_writes(str(tmp_path / "default.db")))
    assert commits == commits_d >= 40
    # a commit's frames in one call (a loop woken through an eventfd, as
    # uvloop's is, would add one a commit; asyncio's is a socket's send)
    assert writes <= 2 * commits, (writes, commits)
    # frame by frame, the same commits took ten calls each here
    assert writes_d >= 4 * commits, (writes_d, commits)


def _zeroes(path: str) -> bool:
    """Whether the file at ``path`` holds only zero bytes."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return False
    return True


def _table_db(path: str, synchronous: str) -> sqlite3.Connection:
    """A new database at ``path`` through the layer, with a table ``t``."""
    conn = _wal_db(path, _vfs(), synchronous, 4096)
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    return conn


@needs_c
def test_an_emptied_wal_is_zeroes_in_place_and_reads_as_no_wal(tmp_path):
    path = str(tmp_path / "e.db")
    wal = path + "-wal"
    conn = _table_db(path, "FULL")
    for i in range(40):
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, b"SECRET%03d" % i * 300))
    conn.execute("DELETE FROM t WHERE k >= 10")
    size = os.path.getsize(wal)
    with open(wal, "rb") as f:
        assert b"SECRET039" in f.read()  # a deleted row's older page image
    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)
    # every frame overwritten, the file's blocks kept (SQLite's own way
    # leaves a file of no bytes: see the comparison above)
    assert os.path.getsize(wal) == size and _zeroes(wal)
    reader = sqlite3.connect(path, isolation_level=None)  # the default VFS
    try:
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (10,)
        # the next commit starts the WAL over at its start, inside the kept size
        conn.execute("INSERT INTO t VALUES (100, x'01')")
        assert reader.execute("SELECT count(*), max(k) FROM t").fetchone() == (11, 100)
        assert os.path.getsize(wal) == size and not _zeroes(wal)
    finally:
        reader.close()
    conn.close()
    assert not os.path.exists(wal)  # the last connection's close, as ever
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT count(*), max(k) FROM t").fetchone() == (11, 100)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        with open(path, "rb") as f:
            assert b"SECRET039" not in f.read()
    finally:
        conn.close()


@needs_c
def test_an_emptied_wal_keeps_16_mb_at_most(tmp_path):
    wal = str(tmp_path / "big.db-wal")
    conn = _table_db(str(tmp_path / "big.db"), "NORMAL")
    conn.execute("BEGIN")
    for i in range(2200):  # ~18 MB of frames in one commit
        conn.execute("INSERT INTO t VALUES (?, randomblob(8000))", (i,))
    conn.execute("COMMIT")
    assert os.path.getsize(wal) > 17 << 20
    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)
    assert os.path.getsize(wal) == 16 << 20 and _zeroes(wal)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (2200,)
    conn.close()


_ERASE_CHILD = textwrap.dedent("""
    import sqlite3, sys
    from fastroute import store
    path, after = sys.argv[1], sys.argv[2] == "1"
    target, uri = store._writer_target(path, store._wal_vfs())
    assert uri, "the layer is not in use"
    conn = sqlite3.connect(target, uri=uri, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
    for i in range(20):
        conn.execute("INSERT INTO t VALUES (?, randomblob(3000))", (i,))
    conn.execute("DELETE FROM t WHERE k >= 5")
    assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)
    if after:
        conn.execute("INSERT INTO t VALUES (50, randomblob(10))")
    print("ready", flush=True)
    sys.stdin.readline()  # killed here
""")


@needs_c
@pytest.mark.parametrize("commit_after", [False, True])
def test_a_process_killed_after_emptying_its_wal_keeps_every_commit(tmp_path, commit_after):
    path = str(tmp_path / "k.db")
    child = subprocess.Popen(
        [sys.executable, "-c", _ERASE_CHILD, path, "1" if commit_after else "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        _reap(child)
    # left as the kill found it: zeroes, or a new pass's frames and then zeroes
    assert os.path.getsize(path + "-wal") > 0
    assert _zeroes(path + "-wal") != commit_after
    assert _recovered_keys(path) == list(range(5)) + ([50] if commit_after else [])


async def _store_erase(path: str) -> tuple[int, bool, int]:
    """A put acked, the erasing checkpoint waited for, another put: the
    WAL's size after the erase, whether it then held only zeroes, and its
    size after the next put."""
    store = await SqliteStore.open(path, erase_s=0.1)
    try:
        key = store.register_device("a", "d")
        mids = await store.put_many([("s", os.urandom(16), os.urandom(3000), 1, [key])
                                     for _ in range(30)])
        store.ack(key, mids)
        await store.flush()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if store.checkpoints:
                break
        assert store.checkpoints
        erased = os.path.getsize(path + "-wal")
        zeroes = _zeroes(path + "-wal")
        await store.put_many([("s", os.urandom(16), b"x" * 100, 1, [key])])
        return erased, zeroes, os.path.getsize(path + "-wal")
    finally:
        await store.close()


@needs_c
def test_the_store_s_erasing_checkpoint_empties_its_wal_in_place(tmp_path, monkeypatch):
    erased, zeroes, later = asyncio.run(_store_erase(str(tmp_path / "vfs.db")))
    assert erased > 90_000 and zeroes and later == erased
    monkeypatch.setattr(store_mod, "_wal_vfs", py_wal_vfs)
    erased_d, zeroes_d, later_d = asyncio.run(_store_erase(str(tmp_path / "default.db")))
    assert erased_d == 0 and zeroes_d and 0 < later_d < erased
