# The SQLite store's common transaction, run without the GIL.
# Part of fastroute._core.
#
# Compiled twins of fastroute/store.py (the specification):
#   SqlFast = PySqlFast
#
# tests/test_store_fast.py runs one store's traffic with this, with its
# specification and with neither (SqliteStore._transaction's general path,
# the sqlite3 module's statements), and compares what each leaves in the file.
#
# Why: the sqlite3 module releases the GIL around every step and every reset
# of a statement, about a dozen times a transaction.  Under load the event
# loop's thread holds the GIL, so a release can be a hand-off between the
# two threads (futex wake-ups, context switches on both sides; the
# scheduler was about a tenth of the writer's samples).  Here the common
# transaction (acks that empty whole packs, then new packs, then the mid
# mark) is one call that releases the GIL once; the writer thread's CPU a
# message fell by about a fifth (benches/README.md, session 29).  A group's
# transaction adds its spacks and shares to that call: a group send to 10
# devices had taken ~30 statements a transaction through the sqlite3
# module, each row a step of its own (benches/README.md, session 41).  Its
# members' acks walk their shares with their packs, the call releases the
# shares' messages in the writer's counts (taking the GIL back once, for
# release_walked), deletes the spacks no device holds, inserts the new rows
# and commits: one call a group commit (session 48; from session 42 to 47
# the call handed the transaction back after the walk, and the writer's
# Python released the shares and made a second call).  The
# general path's acks of whole shares have a walk of their own
# (drop_shares).
#
# The sqlite3 C API is the one the sqlite3 module itself is linked with,
# found at run time (dlsym) so that the build needs no SQLite headers; the
# connection's handle is the first field of the module's Connection object:
# checked at run time on CPython 3.11, and so in every connection.h read (a
# 3.10-era one, and one of 3.12 or later, with its autocommit mode).  A
# Python other than CPython 3.11 to 3.14 is refused before the handle is
# read (the store then keeps the general path); otherwise the handle is
# checked against the file's name before use.

cdef extern from *:
    """
    #if defined(_WIN32)
    #define FR_SQ_HAVE_DL 0
    #else
    #include <dlfcn.h>
    #define FR_SQ_HAVE_DL 1
    #endif
    typedef struct fr_sq_db fr_sq_db;
    typedef struct fr_sq_stmt fr_sq_stmt;
    typedef struct {
        int (*prepare_v2)(fr_sq_db*, const char*, int, fr_sq_stmt**, const char**);
        int (*step)(fr_sq_stmt*);
        int (*reset)(fr_sq_stmt*);
        int (*finalize)(fr_sq_stmt*);
        int (*bind_int64)(fr_sq_stmt*, int, long long);
        int (*bind_blob)(fr_sq_stmt*, int, const void*, int, void (*)(void*));
        int (*bind_null)(fr_sq_stmt*, int);
        const void *(*column_blob)(fr_sq_stmt*, int);
        int (*column_bytes)(fr_sq_stmt*, int);
        int (*changes)(fr_sq_db*);
        const char *(*errmsg)(fr_sq_db*);
        const char *(*db_filename)(fr_sq_db*, const char*);
        int (*get_autocommit)(fr_sq_db*);
        const char *(*libversion)(void);
        void *(*wal_hook)(fr_sq_db*, int (*)(void*, fr_sq_db*, const char*, int), void*);
        int (*wal_checkpoint_v2)(fr_sq_db*, const char*, int, int*, int*);
        int (*wal_autocheckpoint)(fr_sq_db*, int);
    } fr_sq_api;
    static fr_sq_api fr_sq;
    /* 0: not looked up yet; 1: every symbol found; -1: unavailable */
    static int fr_sq_state = 0;

    static int fr_sq_load(const char *module_path) {
    #if FR_SQ_HAVE_DL
        void *h;
        if (fr_sq_state) return fr_sq_state;
        fr_sq_state = -1;
        /* the sqlite3 module's own handle: a lookup through it finds the
           library it was linked with, never another copy */
        h = dlopen(module_path, RTLD_NOW | RTLD_NOLOAD);
        if (!h) return fr_sq_state;
    #define FR_SQ_SYM(f, n) if (!(*(void **)(&fr_sq.f) = dlsym(h, n))) return fr_sq_state;
        FR_SQ_SYM(prepare_v2, "sqlite3_prepare_v2")
        FR_SQ_SYM(step, "sqlite3_step")
        FR_SQ_SYM(reset, "sqlite3_reset")
        FR_SQ_SYM(finalize, "sqlite3_finalize")
        FR_SQ_SYM(bind_int64, "sqlite3_bind_int64")
        FR_SQ_SYM(bind_blob, "sqlite3_bind_blob")
        FR_SQ_SYM(bind_null, "sqlite3_bind_null")
        FR_SQ_SYM(column_blob, "sqlite3_column_blob")
        FR_SQ_SYM(column_bytes, "sqlite3_column_bytes")
        FR_SQ_SYM(changes, "sqlite3_changes")
        FR_SQ_SYM(errmsg, "sqlite3_errmsg")
        FR_SQ_SYM(db_filename, "sqlite3_db_filename")
        FR_SQ_SYM(get_autocommit, "sqlite3_get_autocommit")
        FR_SQ_SYM(libversion, "sqlite3_libversion")
        FR_SQ_SYM(wal_hook, "sqlite3_wal_hook")
        FR_SQ_SYM(wal_checkpoint_v2, "sqlite3_wal_checkpoint_v2")
        FR_SQ_SYM(wal_autocheckpoint, "sqlite3_wal_autocheckpoint")
    #undef FR_SQ_SYM
        fr_sq_state = 1;
    #else
        (void)module_path;
        fr_sq_state = -1;
    #endif
        return fr_sq_state;
    }

    /* the handle of a sqlite3.Connection: its first field after the header */
    static fr_sq_db *fr_sq_handle(PyObject *conn) {
        return *(fr_sq_db **)((char *)conn + sizeof(PyObject));
    }

    /* SqlFast.hold_checkpoints' WAL hook: it runs inside every commit of
       the connection, with or without the GIL, so it only notes the WAL's
       frames (SQLite's own hook, which it replaces, checkpoints there) */
    static int fr_sq_wal_note(void *frames, fr_sq_db *db, const char *name, int n) {
        (void)db; (void)name;
        *(int *)frames = n;
        return 0;
    }
    typedef int (*fr_sq_wal_cb)(void*, fr_sq_db*, const char*, int);

    enum { FR_SQ_OK = 0, FR_SQ_BUSY = 5, FR_SQ_DONE = 101, FR_SQ_ROW = 100 };
    /* sqlite3_wal_checkpoint_v2's mode; SQLite's default auto-checkpoint */
    enum { FR_SQ_PASSIVE = 0, FR_SQ_AUTO_FRAMES = 1000 };
    """
    ctypedef struct fr_sq_db:
        pass
    ctypedef struct fr_sq_stmt:
        pass
    ctypedef int (*fr_sq_wal_cb)(void*, fr_sq_db*, const char*, int) noexcept nogil
    ctypedef struct fr_sq_api:
        int (*prepare_v2)(fr_sq_db*, const char*, int, fr_sq_stmt**, const char**) nogil
        int (*step)(fr_sq_stmt*) nogil
        int (*reset)(fr_sq_stmt*) nogil
        int (*finalize)(fr_sq_stmt*) nogil
        int (*bind_int64)(fr_sq_stmt*, int, long long) nogil
        int (*bind_blob)(fr_sq_stmt*, int, const void*, int, void (*)(void*)) nogil
        int (*bind_null)(fr_sq_stmt*, int) nogil
        const void *(*column_blob)(fr_sq_stmt*, int) nogil
        int (*column_bytes)(fr_sq_stmt*, int) nogil
        int (*changes)(fr_sq_db*) nogil
        const char *(*errmsg)(fr_sq_db*) nogil
        const char *(*db_filename)(fr_sq_db*, const char*) nogil
        int (*get_autocommit)(fr_sq_db*) nogil
        const char *(*libversion)() nogil
        void *(*wal_hook)(fr_sq_db*, fr_sq_wal_cb, void*) nogil
        int (*wal_checkpoint_v2)(fr_sq_db*, const char*, int, int*, int*) nogil
        int (*wal_autocheckpoint)(fr_sq_db*, int) nogil
    int fr_sq_wal_note(void* frames, fr_sq_db* db, const char* name, int n) noexcept nogil
    fr_sq_api fr_sq
    int fr_sq_load(const char* module_path)
    fr_sq_db* fr_sq_handle(PyObject* conn)
    enum:
        FR_SQ_OK
        FR_SQ_BUSY
        FR_SQ_DONE
        FR_SQ_ROW
        FR_SQ_PASSIVE
        FR_SQ_AUTO_FRAMES


cdef enum:
    SQ_BEGIN, SQ_COMMIT, SQ_ROLLBACK, SQ_FIND, SQ_DROP, SQ_PACK, SQ_META, SQ_SFIND, SQ_SDROP
    SQ_SPACK, SQ_SHARE, SQ_SHARES, SQ_SPDROP, SQ_COUNT
    # a pack row's columns, as py_sql_rows lays them out: dev, first, last,
    # n, nbytes, exp_ms (ints), mids, data (blobs)
    PACK_INTS = 6
    PACK_COLS = 8
    # a spack row's: first, last, n, nbytes, exp_ms (ints), mids, lens, exps,
    # devs, data (blobs); a share row's: dev, first, last, n, nbytes, exp_ms
    # (ints), mids (a blob or None)
    SPACK_INTS = 5
    SPACK_COLS = 10
    SHARE_INTS = 6
    SHARE_COLS = 7
    # shares a statement while that many are left: a statement a row opens
    # the table (and its index, in format 6) for each row, ~1 us more a row
    # for a large group's hundreds (measured in format 6)
    SHARES_CHUNK = 32

cdef const char* SQ_TEXT[SQ_COUNT]
SQ_TEXT[0] = b"BEGIN"
SQ_TEXT[1] = b"COMMIT"
SQ_TEXT[2] = b"ROLLBACK"
# the texts of PySqlFast's statements (the tests compare them)
SQ_TEXT[3] = b"SELECT mids FROM packs WHERE dev = ?1 AND first = ?2"
SQ_TEXT[4] = b"DELETE FROM packs WHERE dev = ? AND first = ?"
SQ_TEXT[5] = (b"INSERT INTO packs(dev, first, last, n, nbytes, exp_ms, mids, data) "
              b"VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")
SQ_TEXT[6] = b"INSERT OR REPLACE INTO meta(k, v) VALUES ('next_mid', ?1)"
SQ_TEXT[7] = (b"SELECT coalesce(s.mids, (SELECT sp.mids FROM spacks sp WHERE sp.first = s.first), "
              b"x'') FROM shares s WHERE s.dev = ?1 AND s.first = ?2")
SQ_TEXT[8] = b"DELETE FROM shares WHERE dev = ?1 AND first = ?2"
SQ_TEXT[9] = (b"INSERT INTO spacks(first, last, n, nbytes, exp_ms, mids, lens, exps, devs, "
              b"data) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)")
SQ_TEXT[10] = (b"INSERT INTO shares(dev, first, last, n, nbytes, exp_ms, mids) "
               b"VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
#: SHARES_CHUNK rows of shares a statement (PySqlFast.SQL_SHARES)
SQ_SHARES_TEXT = (b"INSERT INTO shares(dev, first, last, n, nbytes, exp_ms, mids) VALUES "
                  + b",".join([b"(?,?,?,?,?,?,?)"] * SHARES_CHUNK))
# held here: SQ_TEXT points into it for as long as the module lives
cdef bytes _SQ_SHARES_TEXT = SQ_SHARES_TEXT
SQ_TEXT[11] = _SQ_SHARES_TEXT
SQ_TEXT[12] = b"DELETE FROM spacks WHERE first = ?1"


ctypedef struct SqDrop:
    int64_t key
    const char* mids    # int64s, native order, as the packs' mids blobs
    int nbytes
    int at              # bytes of mids matched by whole packs

ctypedef struct SqPack:
    int64_t ints[PACK_INTS]
    const char* blobs[2]
    int lens[2]

# a spack's or a share's row (a share's one blob may be NULL: SQL NULL)
ctypedef struct SqRow:
    int64_t ints[SHARE_INTS]
    const char* blobs[5]
    int lens[5]


# the primary result codes' names, as the sqlite3 module gives them in an
# error's sqlite_errorname (the store tells a full disk by it)
_SQ_NAMES = {1: "SQLITE_ERROR", 2: "SQLITE_INTERNAL", 3: "SQLITE_PERM", 4: "SQLITE_ABORT",
             5: "SQLITE_BUSY", 6: "SQLITE_LOCKED", 7: "SQLITE_NOMEM", 8: "SQLITE_READONLY",
             9: "SQLITE_INTERRUPT", 10: "SQLITE_IOERR", 11: "SQLITE_CORRUPT",
             13: "SQLITE_FULL", 14: "SQLITE_CANTOPEN", 15: "SQLITE_PROTOCOL",
             17: "SQLITE_SCHEMA", 18: "SQLITE_TOOBIG", 19: "SQLITE_CONSTRAINT",
             20: "SQLITE_MISMATCH", 21: "SQLITE_MISUSE", 25: "SQLITE_RANGE",
             26: "SQLITE_NOTADB"}


cdef object _sq_error(fr_sq_db* db, int rc):
    """The sqlite3 module's exception for ``rc``, with its code and name."""
    import sqlite3
    msg = fr_sq.errmsg(db).decode(errors="replace")
    exc = (sqlite3.IntegrityError if rc & 0xff == 19 else sqlite3.OperationalError)(msg)
    exc.sqlite_errorcode = rc
    exc.sqlite_errorname = _SQ_NAMES.get(rc & 0xff, "SQLITE_ERROR")
    return exc


cdef bint _sql_fast_available() except -1:
    # whether the sqlite3 C API the sqlite3 module uses can be reached (it
    # cannot where the module links SQLite statically without exporting it)
    import _sqlite3
    return fr_sq_load(_sqlite3.__file__.encode()) == 1


cdef inline int _blob_ptr(object value, const char** ptr, int* n) except -1:
    if not PyBytes_CheckExact(value):
        raise WrongType("a blob column is bytes")
    if PyBytes_GET_SIZE(value) > 0x7fffffff:
        raise OverflowError("a blob is larger than SQLite takes")
    ptr[0] = PyBytes_AS_STRING(value)
    n[0] = <int>PyBytes_GET_SIZE(value)
    return 0


cdef Py_ssize_t _read_drops(list drops, Py_ssize_t n, SqDrop* dr) except -1:
    # the drops' pairs (key, mids blob) read into dr, with the GIL (the
    # blobs stay alive in the caller's list); returns the mids in all
    cdef Py_ssize_t i, mids = 0
    for i in range(n):
        dr[i].key = drops[2 * i]
        _blob_ptr(drops[2 * i + 1], &dr[i].mids, &dr[i].nbytes)
        if dr[i].nbytes % 8:
            raise InvalidArgument("a drop's mids are int64s")
        dr[i].at = 0
        mids += dr[i].nbytes // 8
    return mids


cdef inline int _step_done(fr_sq_stmt* st) noexcept nogil:
    cdef int rc = fr_sq.step(st)
    fr_sq.reset(st)
    return FR_SQ_OK if rc == FR_SQ_DONE else rc


cdef int _read_rows(list flat, Py_ssize_t n, int ncols, int nints, bint nullable,
                    SqRow* out) except -1:
    # n rows of ncols columns from flat: nints ints, then blobs (the last
    # one may be None when nullable: NULL)
    cdef Py_ssize_t i
    cdef int j
    cdef object value
    for i in range(n):
        for j in range(nints):
            out[i].ints[j] = flat[ncols * i + j]
        for j in range(ncols - nints):
            value = flat[ncols * i + nints + j]
            if value is None and nullable and j == ncols - nints - 1:
                out[i].blobs[j] = NULL
                out[i].lens[j] = 0
            else:
                _blob_ptr(value, &out[i].blobs[j], &out[i].lens[j])
    return 0


cdef int _insert_rows(fr_sq_stmt* st, fr_sq_stmt* chunk_st, int chunk, SqRow* rows,
                      Py_ssize_t n, int ncols, int nints) noexcept nogil:
    # n rows: chunk a step through chunk_st while that many are left (when
    # chunk_st is not NULL), then one a step through st
    cdef Py_ssize_t i = 0
    cdef int r, j, k, at, rc = FR_SQ_OK
    cdef fr_sq_stmt* s
    while rc == FR_SQ_OK and i < n:
        if chunk_st != NULL and n - i >= chunk:
            s = chunk_st
            k = chunk
        else:
            s = st
            k = 1
        for r in range(k):
            at = r * ncols  # this row's first parameter, less one
            for j in range(nints):
                fr_sq.bind_int64(s, at + j + 1, rows[i + r].ints[j])
            for j in range(ncols - nints):
                if rows[i + r].blobs[j] == NULL:
                    fr_sq.bind_null(s, at + nints + j + 1)
                else:
                    fr_sq.bind_blob(s, at + nints + j + 1, rows[i + r].blobs[j],
                                    rows[i + r].lens[j], NULL)
        rc = _step_done(s)
        i += k
    return rc


cdef inline int _probe(fr_sq_stmt* find, SqDrop* d, int64_t first, int* held) noexcept nogil:
    # the device's row keyed by ``first`` (by the statement given): held is
    # its mids' bytes when they are whole int64s that all come next in the
    # drop, in order; else 0
    cdef int rc
    cdef const void* blob
    fr_sq.bind_int64(find, 1, d.key)
    fr_sq.bind_int64(find, 2, first)
    rc = fr_sq.step(find)
    held[0] = 0
    if rc == FR_SQ_ROW:
        rc = FR_SQ_OK
        held[0] = fr_sq.column_bytes(find, 0)
        blob = fr_sq.column_blob(find, 0)
        if (held[0] == 0 or held[0] % 8 or held[0] > d.nbytes - d.at
                or memcmp(blob, d.mids + d.at, held[0]) != 0):
            held[0] = 0  # not this ack's next mids: the rest waits
    elif rc == FR_SQ_DONE:
        rc = FR_SQ_OK
    fr_sq.reset(find)
    return rc


cdef int _walk_drop(fr_sq_stmt** find, fr_sq_stmt** drop, int kinds, SqDrop* d,
                    int64_t* done, Py_ssize_t* ndone, int64_t index,
                    int* last) noexcept nogil:
    # one device's acked mids walked row by row, through the ``kinds`` (1 or
    # 2) kinds of row the statements find and drop (packs, then shares):
    # while the device has a row of either keyed by the next acked mid whose
    # mids all come next, in order, that row is deleted and d.at moves past
    # them.  Each row of the last kind deleted goes to done as (index, first,
    # its mids) when done is not NULL.  The kind that matched last (``last``,
    # kept across drops and calls) is tried first: a group member's acks are
    # all shares, a 1:1 chat's all packs, and a miss is a seek (when each
    # drop began with packs, a group commit to 10 members ran 10 such misses
    # among its 44 statements).  A row is of one kind only (a mid is in a
    # pack or in a spack), so the order changes what is probed, not what is
    # found.
    cdef int rc = FR_SQ_OK, held = 0, kind = last[0] if kinds == 2 else 0, k
    cdef int64_t first
    while d.at < d.nbytes:
        memcpy(&first, d.mids + d.at, 8)
        rc = _probe(find[kind], d, first, &held)
        if rc == FR_SQ_OK and held == 0 and kinds == 2:
            k = 1 - kind
            rc = _probe(find[k], d, first, &held)
            if held:
                kind = k
        if rc != FR_SQ_OK or held == 0:
            break
        fr_sq.bind_int64(drop[kind], 1, d.key)
        fr_sq.bind_int64(drop[kind], 2, first)
        rc = _step_done(drop[kind])
        if rc != FR_SQ_OK:
            break
        if done != NULL and kind == kinds - 1:
            done[3 * ndone[0]] = index
            done[3 * ndone[0] + 1] = first
            done[3 * ndone[0] + 2] = held // 8
            ndone[0] += 1
        d.at += held
    if kinds == 2:
        last[0] = kind
    return rc


@cython.final
cdef class SqlFast:
    """The SQLite store writer's common transaction in one call, without the
    GIL: see :meth:`run` (``fastroute.store.PySqlFast`` is the
    specification).  Made on the writer's thread for its connection
    (``conn``, a ``sqlite3.Connection`` on ``path``); used there only.
    """
    cdef fr_sq_db* db
    cdef fr_sq_stmt* st[SQ_COUNT]
    cdef object conn  # kept open while the statements live
    cdef int kind  # the kind of row (0 packs, 1 shares) a walk matched last
    cdef int frames  # the WAL's frames at the last commit, while held (below)
    cdef bint held  # hold_checkpoints() replaced SQLite's checkpointing hook
    #: transactions :meth:`run` committed, and those it left open to the caller
    cdef public long long committed, handed_back

    def __cinit__(self, conn, str path):
        import os
        import sqlite3
        import sys
        cdef int i, rc
        cdef const char* name
        for i in range(SQ_COUNT):
            self.st[i] = NULL
        self.committed = self.handed_back = 0
        self.frames = 0
        self.held = False
        if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 14):
            raise RuntimeError("this Python's sqlite3.Connection layout is not known")
        if not _sql_fast_available():
            raise RuntimeError("the sqlite3 C API is not reachable")
        if type(conn) is not sqlite3.Connection:
            raise WrongType("conn is a sqlite3.Connection")
        if fr_sq.libversion().decode() != sqlite3.sqlite_version:
            raise RuntimeError("the sqlite3 module uses another SQLite")
        self.conn = conn
        self.db = fr_sq_handle(<PyObject*>conn)
        if self.db == NULL:
            raise RuntimeError("the connection is closed")  # the module clears it then
        name = fr_sq.db_filename(self.db, b"main")
        if name == NULL or os.path.realpath(name.decode()) != os.path.realpath(path):
            # not the layout assumed above: never use what was read
            self.db = NULL
            raise RuntimeError("the connection's handle is not where it was expected")
        for i in range(SQ_COUNT):
            rc = fr_sq.prepare_v2(self.db, SQ_TEXT[i], -1, &self.st[i], NULL)
            if rc != FR_SQ_OK:
                exc = _sq_error(self.db, rc)
                self.close()
                raise exc

    def hold_checkpoints(self):
        """Take SQLite's automatic checkpoint out of the connection's commits,
        to be run by the caller (:meth:`checkpoint`) when :attr:`wal_frames`
        says so; returns True (the specification cannot, and returns False).

        SQLite runs it inside the commit that brings the WAL to 1,000 frames
        (its default), so a transaction somebody waits on took a checkpoint's
        copy of the pages and its syncs with it.  A hook of the connection
        (``sqlite3_wal_hook``, which replaces SQLite's) then only notes the
        WAL's frames after each commit.  :meth:`close` gives SQLite its hook
        back.
        """
        if self.db == NULL:
            raise RuntimeError("closed")
        fr_sq.wal_hook(self.db, fr_sq_wal_note, &self.frames)
        self.held = True
        return True

    @property
    def wal_frames(self):
        """Frames in the WAL at the last commit since the last
        :meth:`checkpoint` (0: none since), while checkpoints are held."""
        return self.frames

    def checkpoint(self):
        """Run a PASSIVE checkpoint, without the GIL: copy what the WAL holds
        into the database as far as no reader's snapshot needs it, without
        waiting for one.  Returns ``(frames in the WAL, frames copied)`` and
        sets :attr:`wal_frames` to 0; raises the sqlite3 module's exception on
        an SQLite error."""
        cdef int rc, log = -1, copied = -1
        if self.db == NULL:
            raise RuntimeError("closed")
        self.frames = 0
        with nogil:
            rc = fr_sq.wal_checkpoint_v2(self.db, b"main", FR_SQ_PASSIVE, &log, &copied)
        # busy (another connection's checkpoint runs): as the pragma, not an error
        if rc != FR_SQ_OK and rc & 0xff != FR_SQ_BUSY:
            raise _sq_error(self.db, rc)
        return log, copied

    def close(self):
        """Finalize the statements (before the connection closes); give
        SQLite back its checkpointing hook."""
        cdef int i
        if self.held and self.db != NULL:
            fr_sq.wal_autocheckpoint(self.db, FR_SQ_AUTO_FRAMES)
            self.held = False
        for i in range(SQ_COUNT):
            if self.st[i] != NULL:
                fr_sq.finalize(self.st[i])
                self.st[i] = NULL
        self.db = NULL

    def __dealloc__(self):
        self.close()

    def run(self, list drops, list pack_rows, long long mark, bint begin, bint commit,
            list spack_rows=None, list share_rows=None, list spack_drops=None,
            list shares=None, release=None):
        """BEGIN (when ``begin``); apply ``drops``, flat ``key, mids blob``
        pairs (a device's acked mids, int64s); then, if every drop was
        applied whole and no share deleted (see below), delete the spacks
        keyed by ``spack_drops`` (ints), insert ``spack_rows``,
        ``share_rows`` and ``pack_rows`` (flat, :func:`py_sql_rows`' layout),
        set meta's ``next_mid`` to ``mark`` unless it is negative, and COMMIT
        (when ``commit``).

        A drop's mids are walked pack by pack: while the device has a pack
        whose first mid is the next acked one and whose mids all come next,
        in order, that pack is deleted.  With ``shares`` (a list), the walk
        takes the device's shares as it takes packs, one row at a time of
        either kind, and appends each share it deleted to ``shares`` as
        ``index, first, n`` (the drop's index, the share's key, its mids).
        Returns ``(index, matched)`` for each drop that stopped short,
        ``matched`` the mids it applied.  When one did, or a share was
        deleted, nothing after the drops was done, and the transaction is
        left open for the caller to apply the rest (the shares' counts
        first) and finish (as it is when ``commit`` is false).  With
        ``release``, ``(counts, keys, acks, gone)``, shares deleted by drops
        that were all applied whole do not hand it back: their messages are
        released in ``counts`` (``release_walked(counts, deleted, keys, acks,
        gone, drops)``, ``deleted`` the shares as appended to ``shares``), the
        spacks of ``gone`` none of whose messages a device holds now are
        deleted with ``spack_drops``, and the rest is done (a group's steady
        state in one call).  A value of the wrong type raises before anything
        is written.  On any SQLite error, or an error of the release, the
        transaction is rolled back and the error raised (an SQLite error as
        the sqlite3 module's exception for it, with ``sqlite_errorcode`` and
        ``sqlite_errorname`` set as it sets them: the primary code's name).
        """
        cdef Py_ssize_t ndrop, npack, nspack, nshare, nkill, i, j, nout = 0, ndone = 0
        cdef SqDrop* dr = NULL
        cdef SqPack* pk = NULL
        cdef SqRow* sp = NULL
        cdef SqRow* sh = NULL
        cdef int64_t* kill = NULL   # spack_drops (then the spacks a release found dead)
        cdef int64_t* grown
        cdef int64_t* done = NULL   # index, first, n for each share deleted, in order
        cdef int rc = FR_SQ_OK, nmissed = 0, kinds = 1
        cdef bint released = False
        cdef list walked, dead
        cdef fr_sq_stmt* finds[2]
        cdef fr_sq_stmt* dels[2]
        if self.db == NULL:
            raise RuntimeError("closed")
        if release is not None:
            if type(release) is not tuple:
                raise WrongType("release is a tuple")
            if shares is None:
                raise InvalidArgument("a release needs the shares list")
            if (len(release) != 4 or type(release[1]) is not list
                    or type(release[2]) is not dict or type(release[3]) is not dict):
                raise WrongType("release is (counts, keys list, acks dict, gone dict)")
        if spack_rows is None:
            spack_rows = []
        if share_rows is None:
            share_rows = []
        if spack_drops is None:
            spack_drops = []
        if (len(drops) % 2 or len(pack_rows) % PACK_COLS or len(spack_rows) % SPACK_COLS
                or len(share_rows) % SHARE_COLS):
            raise InvalidArgument("drops are pairs and pack, spack and share rows have "
                                  "8, 10 and 7 columns")
        ndrop = len(drops) // 2
        npack = len(pack_rows) // PACK_COLS
        nspack = len(spack_rows) // SPACK_COLS
        nshare = len(share_rows) // SHARE_COLS
        nkill = len(spack_drops)
        finds[0] = self.st[SQ_FIND]
        dels[0] = self.st[SQ_DROP]
        finds[1] = self.st[SQ_SFIND]
        dels[1] = self.st[SQ_SDROP]
        if shares is not None:
            kinds = 2
        try:
            # every value is read here, with the GIL; the blobs stay alive in
            # the caller's lists while the GIL is released below
            dr = <SqDrop*>PyMem_Malloc(sizeof(SqDrop) * (ndrop + 1))
            pk = <SqPack*>PyMem_Malloc(sizeof(SqPack) * (npack + 1))
            sp = <SqRow*>PyMem_Malloc(sizeof(SqRow) * (nspack + 1))
            sh = <SqRow*>PyMem_Malloc(sizeof(SqRow) * (nshare + 1))
            kill = <int64_t*>PyMem_Malloc(sizeof(int64_t) * (nkill + 1))
            if dr == NULL or pk == NULL or sp == NULL or sh == NULL or kill == NULL:
                raise MemoryError()
            _read_rows(spack_rows, nspack, SPACK_COLS, SPACK_INTS, False, sp)
            _read_rows(share_rows, nshare, SHARE_COLS, SHARE_INTS, True, sh)
            for i in range(nkill):
                kill[i] = spack_drops[i]
            nout = _read_drops(drops, ndrop, dr)
            for i in range(npack):
                for j in range(PACK_INTS):
                    pk[i].ints[j] = pack_rows[PACK_COLS * i + j]
                for j in range(2):
                    _blob_ptr(pack_rows[PACK_COLS * i + PACK_INTS + j], &pk[i].blobs[j],
                              &pk[i].lens[j])
            if kinds == 2:
                # at most one share a mid
                done = <int64_t*>PyMem_Malloc(sizeof(int64_t) * 3 * (nout + 1))
                if done == NULL:
                    raise MemoryError()
            with nogil:
                if begin:
                    rc = _step_done(self.st[SQ_BEGIN])
                # the acks first: the pages their deletes free (zeroed) are
                # the ones the new rows then take, written to the WAL once
                i = 0
                while rc == FR_SQ_OK and i < ndrop:
                    rc = _walk_drop(finds, dels, kinds, &dr[i], done, &ndone, i,
                                    &self.kind)
                    if dr[i].at < dr[i].nbytes:
                        nmissed += 1
                    i += 1
                if rc == FR_SQ_OK and nmissed == 0 and ndone == 0:
                    rc = self._rest(kill, nkill, sp, nspack, sh, nshare, pk, npack, mark,
                                    commit)
            if rc == FR_SQ_OK and nmissed == 0 and ndone and release is not None:
                # a group's steady state: the shares' messages released here,
                # with the GIL taken back once, not handed back to the caller
                try:
                    walked = [done[i] for i in range(3 * ndone)]
                    counts = release[0]
                    release_walked(counts, walked, release[1], release[2], release[3],
                                   drops)
                    dead = [first for first in release[3] if not counts.left(first)]
                    # spack_drops stay first; on a failure kill is freed below
                    grown = <int64_t*>PyMem_Realloc(
                        kill, sizeof(int64_t) * (nkill + len(dead) + 1))
                    if grown == NULL:
                        raise MemoryError()
                    kill = grown
                    for i in range(len(dead)):
                        kill[nkill + i] = dead[i]
                    nkill += len(dead)
                except BaseException:
                    if not fr_sq.get_autocommit(self.db):
                        with nogil:
                            _step_done(self.st[SQ_ROLLBACK])
                    raise
                released = True
                with nogil:
                    rc = self._rest(kill, nkill, sp, nspack, sh, nshare, pk, npack, mark,
                                    commit)
            if rc != FR_SQ_OK:
                exc = _sq_error(self.db, rc)
                if not fr_sq.get_autocommit(self.db):
                    with nogil:
                        _step_done(self.st[SQ_ROLLBACK])
                raise exc
            if released:
                shares.extend(walked)  # the ints the release read
            else:
                for i in range(3 * ndone):
                    shares.append(done[i])
            if commit and nmissed == 0 and (ndone == 0 or released):
                self.committed += 1
                return []
            self.handed_back += 1
            return [(i, dr[i].at // 8) for i in range(ndrop) if dr[i].at < dr[i].nbytes]
        finally:
            PyMem_Free(dr)
            PyMem_Free(pk)
            PyMem_Free(sp)
            PyMem_Free(sh)
            PyMem_Free(kill)
            PyMem_Free(done)

    cdef int _rest(self, int64_t* kill, Py_ssize_t nkill, SqRow* sp, Py_ssize_t nspack,
                   SqRow* sh, Py_ssize_t nshare, SqPack* pk, Py_ssize_t npack,
                   long long mark, bint commit) noexcept nogil:
        # what follows the acks: the spacks no device holds deleted, the new
        # spacks, shares and packs, the mid mark and the COMMIT
        cdef Py_ssize_t i = 0
        cdef int j, rc = FR_SQ_OK
        while rc == FR_SQ_OK and i < nkill:
            fr_sq.bind_int64(self.st[SQ_SPDROP], 1, kill[i])
            rc = _step_done(self.st[SQ_SPDROP])
            i += 1
        if rc == FR_SQ_OK:
            rc = _insert_rows(self.st[SQ_SPACK], NULL, 1, sp, nspack, SPACK_COLS, SPACK_INTS)
        if rc == FR_SQ_OK:
            rc = _insert_rows(self.st[SQ_SHARE], self.st[SQ_SHARES], SHARES_CHUNK, sh,
                              nshare, SHARE_COLS, SHARE_INTS)
        i = 0
        while rc == FR_SQ_OK and i < npack:
            for j in range(PACK_INTS):
                fr_sq.bind_int64(self.st[SQ_PACK], j + 1, pk[i].ints[j])
            for j in range(2):
                fr_sq.bind_blob(self.st[SQ_PACK], PACK_INTS + j + 1, pk[i].blobs[j],
                                pk[i].lens[j], NULL)
            rc = _step_done(self.st[SQ_PACK])
            i += 1
        if rc == FR_SQ_OK and mark >= 0:
            fr_sq.bind_int64(self.st[SQ_META], 1, mark)
            rc = _step_done(self.st[SQ_META])
        if rc == FR_SQ_OK and commit:
            # a failed COMMIT (busy, I/O) may leave the transaction open:
            # the caller rolls it back, as any other failure
            rc = _step_done(self.st[SQ_COMMIT])
        return rc

    def drop_shares(self, list drops):
        """Apply ``drops``, flat ``key, mids blob`` pairs (a device's acked
        mids, int64s), to the devices' shares, inside the caller's open
        transaction, without the GIL; return the shares deleted as flat
        ``index, first, n`` (as :meth:`run` records them; see
        ``fastroute.store.PySqlFast.drop_shares``).  On an SQLite error the
        sqlite3 module's exception for it is raised (as :meth:`run` raises
        it) and the caller rolls back.
        """
        cdef Py_ssize_t ndrop, i, nout = 0
        cdef SqDrop* dr = NULL
        cdef int64_t* done = NULL   # index, first, n for each share deleted, in order
        cdef int rc = FR_SQ_OK
        if self.db == NULL:
            raise RuntimeError("closed")
        if len(drops) % 2:
            raise InvalidArgument("drops are pairs")
        ndrop = len(drops) // 2
        try:
            dr = <SqDrop*>PyMem_Malloc(sizeof(SqDrop) * (ndrop + 1))
            if dr == NULL:
                raise MemoryError()
            nout = _read_drops(drops, ndrop, dr)
            if fr_sq.get_autocommit(self.db):
                raise InvalidArgument("drop_shares runs inside a transaction")
            # at most one share a mid
            done = <int64_t*>PyMem_Malloc(sizeof(int64_t) * 3 * (nout + 1))
            if done == NULL:
                raise MemoryError()
            nout = 0
            with nogil:
                i = 0
                while rc == FR_SQ_OK and i < ndrop:
                    rc = _walk_drop(&self.st[SQ_SFIND], &self.st[SQ_SDROP], 1, &dr[i], done,
                                    &nout, i, &self.kind)  # one kind: not read
                    i += 1
            if rc != FR_SQ_OK:
                raise _sq_error(self.db, rc)
            return [done[i] for i in range(3 * nout)]
        finally:
            PyMem_Free(dr)
            PyMem_Free(done)
