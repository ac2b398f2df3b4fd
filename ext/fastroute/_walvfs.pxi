# The SQLite store writer's WAL writes, a commit in one system call.
# Part of fastroute._core.
#
# Compiled twins of fastroute/store.py (the specification):
#   wal_vfs = py_wal_vfs
#
# The specification is SQLite's default VFS (py_wal_vfs gives no name):
# this layer changes how many calls carry a commit's WAL frames to the
# file, not which bytes reach it, where, or in which order; and it empties
# a WAL in place (zeroes over its first 16 MB, see fr_wv_truncate) where
# SQLite would cut it to nothing.
# tests/test_walvfs.py runs the same transactions with and without it and
# compares what the files hold, counts the writer thread's write calls,
# kills a process right after a commit returned to find it in the file, and
# reads an emptied WAL back as zeroes, and as no WAL, after a kill too.
#
# Why: SQLite writes a WAL frame as two calls, its 24-byte header and then
# its page, so a commit of n pages is 2n pwrite calls before the sync.  On
# an ext4 file each call costs ~4.5 us of CPU on the benches' host whatever
# its size (24 bytes or 8 KB): the 7 frames of a group commit took ~75 us
# of CPU in writes, one gathered write of the same bytes ~17 us
# (benches/README.md, session 55).
#
# How: a VFS named "fastroute-wal" wraps the default one.  Every file but a
# WAL is the default VFS's own, untouched: it is opened in place, at the
# start of the block SQLite gives, with the default's methods.  A WAL gets
# these methods instead, and its writes at consecutive offsets are gathered
# in memory and written as one call (up to 128 KB: the default VFS writes
# at most that much in a call), at the latest right after the page of
# a commit frame (a frame whose header holds the database's size after the
# commit: SQLite writes that one last in a commit, before it syncs and
# before it publishes the commit to other connections in the WAL index).
# So a commit is in the file before any sync, before any
# other connection can be told of it, and before the commit returns,
# whatever the synchronous mode: a process killed after a commit returned
# loses nothing it would have kept without this layer.  Anything else
# that reads, sizes, truncates, syncs or controls the WAL writes what is
# gathered first.  A write that does not follow the gathered ones (a frame
# rewritten in place) writes them first, too.
#
# The library is the sqlite3 module's own, found as _sqlfast.pxi finds it;
# the structures below are sqlite3.h's (part of SQLite's stable ABI).

cdef extern from *:
    """
    #include <string.h>
    #include <stdlib.h>
    #if !defined(_WIN32)
    #include <dlfcn.h>
    #endif
    typedef long long fr_wv_i64;
    typedef struct fr_wv_file fr_wv_file;
    typedef struct fr_wv_io fr_wv_io;
    struct fr_wv_file { const fr_wv_io *pMethods; };
    struct fr_wv_io {
        int iVersion;
        int (*xClose)(fr_wv_file*);
        int (*xRead)(fr_wv_file*, void*, int, fr_wv_i64);
        int (*xWrite)(fr_wv_file*, const void*, int, fr_wv_i64);
        int (*xTruncate)(fr_wv_file*, fr_wv_i64);
        int (*xSync)(fr_wv_file*, int);
        int (*xFileSize)(fr_wv_file*, fr_wv_i64*);
        int (*xLock)(fr_wv_file*, int);
        int (*xUnlock)(fr_wv_file*, int);
        int (*xCheckReservedLock)(fr_wv_file*, int*);
        int (*xFileControl)(fr_wv_file*, int, void*);
        int (*xSectorSize)(fr_wv_file*);
        int (*xDeviceCharacteristics)(fr_wv_file*);
        /* version 2 and 3 (shared memory, memory maps) are the database
           file's, never a WAL's: a WAL's methods are version 1 */
    };
    typedef struct fr_wv_vfs fr_wv_vfs;
    struct fr_wv_vfs {
        int iVersion;
        int szOsFile;
        int mxPathname;
        fr_wv_vfs *pNext;
        const char *zName;
        void *pAppData;
        int (*xOpen)(fr_wv_vfs*, const char*, fr_wv_file*, int, int*);
        int (*xDelete)(fr_wv_vfs*, const char*, int);
        int (*xAccess)(fr_wv_vfs*, const char*, int, int*);
        int (*xFullPathname)(fr_wv_vfs*, const char*, int, char*);
        void *(*xDlOpen)(fr_wv_vfs*, const char*);
        void (*xDlError)(fr_wv_vfs*, int, char*);
        void (*(*xDlSym)(fr_wv_vfs*, void*, const char*))(void);
        void (*xDlClose)(fr_wv_vfs*, void*);
        int (*xRandomness)(fr_wv_vfs*, int, char*);
        int (*xSleep)(fr_wv_vfs*, int);
        int (*xCurrentTime)(fr_wv_vfs*, double*);
        int (*xGetLastError)(fr_wv_vfs*, int, char*);
        /* version 2 */
        int (*xCurrentTimeInt64)(fr_wv_vfs*, fr_wv_i64*);
        /* version 3 (the system calls' overrides) is left out: ours is 2 */
    };

    #define FR_WV_OPEN_WAL 0x00080000
    #define FR_WV_OK 0
    #define FR_WV_HDR 24              /* a WAL frame's header */
    #define FR_WV_FIRST_CAP 65536     /* what a small commit's frames take */
    #define FR_WV_MAX_CAP (1 << 20)   /* more is written as it comes */
    #define FR_WV_MAX_CALL 0x1ffff    /* see fr_wv_flush */
    #define FR_WV_KEEP (16 << 20)     /* an emptied WAL keeps this much: 1,000
                                         frames (SQLite's auto-checkpoint) of
                                         up to 16 KB pages; see fr_wv_truncate */
    #define FR_WV_ZEROS 65536         /* a zeroing write's size */
    #define FR_WV_SYNC_NORMAL 0x02    /* SQLITE_SYNC_NORMAL */

    typedef struct {
        const fr_wv_io *pMethods;  /* fr_wv_wal_io */
        fr_wv_file *real;          /* the default VFS's file, after this */
        char *buf;                 /* the gathered writes: len bytes at `at` */
        int cap, len;
        fr_wv_i64 at;
        int commit_next;           /* the next write is a commit frame's page */
    } fr_wv_wal;

    static fr_wv_vfs *fr_wv_real = NULL;
    static fr_wv_vfs fr_wv_ours;
    static const char *fr_wv_name = "fastroute-wal";
    /* where the default VFS's file starts in a WAL's block */
    #define FR_WV_REAL_AT ((int)((sizeof(fr_wv_wal) + 15) & ~(size_t)15))

    static int fr_wv_flush(fr_wv_wal *w) {
        int rc = FR_WV_OK, n = w->len, done = 0;
        w->len = 0;  /* written, or failed: then so does the transaction, and a
                        retry writes its frames again */
        while (done < n && rc == FR_WV_OK) {
            /* the default VFS on Unix writes the low 17 bits of a call's
               size (it masks them): more is written in parts */
            int part = n - done < FR_WV_MAX_CALL ? n - done : FR_WV_MAX_CALL;
            rc = w->real->pMethods->xWrite(w->real, w->buf + done, part, w->at + done);
            done += part;
        }
        return rc;
    }

    static int fr_wv_close(fr_wv_file *f) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        /* only frames of no commit can be left: written, as SQLite would */
        int rc = fr_wv_flush(w), rc2 = w->real->pMethods->xClose(w->real);
        free(w->buf);
        w->buf = NULL;
        w->cap = 0;
        return rc != FR_WV_OK ? rc : rc2;
    }

    static int fr_wv_read(fr_wv_file *f, void *out, int n, fr_wv_i64 off) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        int rc = fr_wv_flush(w);
        if (rc != FR_WV_OK) return rc;
        return w->real->pMethods->xRead(w->real, out, n, off);
    }

    static int fr_wv_write(fr_wv_file *f, const void *data, int n, fr_wv_i64 off) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        const unsigned char *h = (const unsigned char *)data;
        int rc, commit = w->commit_next;
        /* a frame's header: bytes 4-7 are the database's size in pages
           after the commit the frame ends, 0 in every other frame; the
           frame's page is the next write */
        w->commit_next = n == FR_WV_HDR && (h[4] | h[5] | h[6] | h[7]) != 0;
        if (w->len && off != w->at + w->len) {
            rc = fr_wv_flush(w);
            if (rc != FR_WV_OK) return rc;
        }
        if (w->len + n > w->cap) {
            int want = w->cap ? w->cap : FR_WV_FIRST_CAP;
            char *grown = NULL;
            if (w->len + n > FR_WV_MAX_CAP) {
                /* a large transaction: what is gathered goes first */
                rc = fr_wv_flush(w);
                if (rc != FR_WV_OK) return rc;
            }
            while (want < w->len + n && want < FR_WV_MAX_CAP) want *= 2;
            if (want >= w->len + n)
                grown = want > w->cap ? (char *)realloc(w->buf, (size_t)want) : w->buf;
            if (grown) {
                w->buf = grown;
                w->cap = want;
            } else {
                /* larger than gathering takes, or no memory: as it comes */
                rc = fr_wv_flush(w);
                if (rc != FR_WV_OK) return rc;
                return w->real->pMethods->xWrite(w->real, data, n, off);
            }
        }
        if (!w->len) w->at = off;
        memcpy(w->buf + w->len, data, (size_t)n);
        w->len += n;
        return commit ? fr_wv_flush(w) : FR_WV_OK;
    }

    /* zeroes, FR_WV_ZEROS of them, for a WAL emptied in place */
    static const char fr_wv_zeros[FR_WV_ZEROS];

    static int fr_wv_truncate(fr_wv_file *f, fr_wv_i64 size) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        fr_wv_i64 have = 0, keep, off;
        int rc = fr_wv_flush(w), part;
        if (rc != FR_WV_OK) return rc;
        if (size != 0) return w->real->pMethods->xTruncate(w->real, size);
        /* Emptied (wal_checkpoint(TRUNCATE): every frame is in the
           database, the WAL index says the WAL holds none): its first
           FR_WV_KEEP bytes are overwritten with zeroes and synced, not
           given back.  A commit that extends a file makes its sync write
           the file's size and new blocks too: on the benches' ext4 that
           took ~107-117 us of CPU and ~260-330 us a commit instead of
           ~73-76 and ~170-190 (benches/README.md, session 62), and a relay under
           light load wrote every commit that way, from each erasing
           checkpoint to the next.  Zeroes read as no WAL (its header's
           magic is wrong), as an empty file does, and the old frames'
           bytes are overwritten on the device, not left in free blocks. */
        rc = w->real->pMethods->xFileSize(w->real, &have);
        if (rc != FR_WV_OK) return rc;
        keep = have < FR_WV_KEEP ? have : FR_WV_KEEP;
        if (have > keep) {
            rc = w->real->pMethods->xTruncate(w->real, keep);
            if (rc != FR_WV_OK) return rc;
        }
        for (off = 0; off < keep && rc == FR_WV_OK; off += part) {
            part = keep - off < FR_WV_ZEROS ? (int)(keep - off) : FR_WV_ZEROS;
            rc = w->real->pMethods->xWrite(w->real, fr_wv_zeros, part, off);
        }
        if (rc == FR_WV_OK && keep)
            rc = w->real->pMethods->xSync(w->real, FR_WV_SYNC_NORMAL);
        return rc;
    }

    static int fr_wv_sync(fr_wv_file *f, int flags) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        int rc = fr_wv_flush(w);
        if (rc != FR_WV_OK) return rc;
        return w->real->pMethods->xSync(w->real, flags);
    }

    static int fr_wv_size(fr_wv_file *f, fr_wv_i64 *size) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        int rc = fr_wv_flush(w);
        if (rc != FR_WV_OK) return rc;
        return w->real->pMethods->xFileSize(w->real, size);
    }

    static int fr_wv_lock(fr_wv_file *f, int level) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        return w->real->pMethods->xLock(w->real, level);
    }

    static int fr_wv_unlock(fr_wv_file *f, int level) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        return w->real->pMethods->xUnlock(w->real, level);
    }

    static int fr_wv_reserved(fr_wv_file *f, int *out) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        return w->real->pMethods->xCheckReservedLock(w->real, out);
    }

    static int fr_wv_control(fr_wv_file *f, int op, void *arg) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        int rc = fr_wv_flush(w);
        if (rc != FR_WV_OK) return rc;
        return w->real->pMethods->xFileControl(w->real, op, arg);
    }

    static int fr_wv_sector(fr_wv_file *f) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        return w->real->pMethods->xSectorSize(w->real);
    }

    static int fr_wv_device(fr_wv_file *f) {
        fr_wv_wal *w = (fr_wv_wal *)f;
        return w->real->pMethods->xDeviceCharacteristics(w->real);
    }

    static const fr_wv_io fr_wv_wal_io = {
        1, fr_wv_close, fr_wv_read, fr_wv_write, fr_wv_truncate, fr_wv_sync,
        fr_wv_size, fr_wv_lock, fr_wv_unlock, fr_wv_reserved, fr_wv_control,
        fr_wv_sector, fr_wv_device
    };

    static int fr_wv_open(fr_wv_vfs *vfs, const char *name, fr_wv_file *f,
                          int flags, int *out) {
        fr_wv_wal *w;
        int rc;
        (void)vfs;
        if (!(flags & FR_WV_OPEN_WAL)) {
            /* the default VFS's file, in place: SQLite calls its methods
               on it directly, as without this layer */
            return fr_wv_real->xOpen(fr_wv_real, name, f, flags, out);
        }
        w = (fr_wv_wal *)f;
        memset(w, 0, sizeof(*w));
        w->real = (fr_wv_file *)((char *)f + FR_WV_REAL_AT);
        rc = fr_wv_real->xOpen(fr_wv_real, name, w->real, flags, out);
        if (rc != FR_WV_OK) {
            w->pMethods = NULL;  /* SQLite closes only a file with methods */
            return rc;
        }
        w->pMethods = &fr_wv_wal_io;
        return FR_WV_OK;
    }

    static int fr_wv_delete(fr_wv_vfs *v, const char *n, int d) {
        (void)v; return fr_wv_real->xDelete(fr_wv_real, n, d);
    }
    static int fr_wv_access(fr_wv_vfs *v, const char *n, int fl, int *o) {
        (void)v; return fr_wv_real->xAccess(fr_wv_real, n, fl, o);
    }
    static int fr_wv_fullpath(fr_wv_vfs *v, const char *n, int k, char *o) {
        (void)v; return fr_wv_real->xFullPathname(fr_wv_real, n, k, o);
    }
    static void *fr_wv_dlopen(fr_wv_vfs *v, const char *n) {
        (void)v; return fr_wv_real->xDlOpen(fr_wv_real, n);
    }
    static void fr_wv_dlerror(fr_wv_vfs *v, int k, char *o) {
        (void)v; fr_wv_real->xDlError(fr_wv_real, k, o);
    }
    static void (*fr_wv_dlsym(fr_wv_vfs *v, void *h, const char *s))(void) {
        (void)v; return fr_wv_real->xDlSym(fr_wv_real, h, s);
    }
    static void fr_wv_dlclose(fr_wv_vfs *v, void *h) {
        (void)v; fr_wv_real->xDlClose(fr_wv_real, h);
    }
    static int fr_wv_random(fr_wv_vfs *v, int k, char *o) {
        (void)v; return fr_wv_real->xRandomness(fr_wv_real, k, o);
    }
    static int fr_wv_sleep(fr_wv_vfs *v, int us) {
        (void)v; return fr_wv_real->xSleep(fr_wv_real, us);
    }
    static int fr_wv_time(fr_wv_vfs *v, double *t) {
        (void)v; return fr_wv_real->xCurrentTime(fr_wv_real, t);
    }
    static int fr_wv_lasterror(fr_wv_vfs *v, int k, char *o) {
        (void)v; return fr_wv_real->xGetLastError(fr_wv_real, k, o);
    }
    static int fr_wv_time64(fr_wv_vfs *v, fr_wv_i64 *t) {
        (void)v; return fr_wv_real->xCurrentTimeInt64(fr_wv_real, t);
    }

    /* 1: registered (now or before); 0: not here (no dlopen, no SQLite API
       in the module, a default VFS older than version 2 or none) */
    static int fr_wv_state = -1;

    static int fr_wv_register(const char *module_path) {
    #if !defined(_WIN32)
        void *h;
        fr_wv_vfs *(*find)(const char*);
        int (*reg)(fr_wv_vfs*, int);
        if (fr_wv_state >= 0) return fr_wv_state;
        fr_wv_state = 0;
        h = dlopen(module_path, RTLD_NOW | RTLD_NOLOAD);
        if (!h) return 0;
        *(void **)(&find) = dlsym(h, "sqlite3_vfs_find");
        *(void **)(&reg) = dlsym(h, "sqlite3_vfs_register");
        if (!find || !reg) return 0;
        if (find(fr_wv_name)) return fr_wv_state = 1;  /* another copy made it */
        fr_wv_real = find(NULL);
        if (!fr_wv_real || fr_wv_real->iVersion < 2) return 0;
        memset(&fr_wv_ours, 0, sizeof(fr_wv_ours));
        fr_wv_ours.iVersion = 2;
        fr_wv_ours.szOsFile = FR_WV_REAL_AT + fr_wv_real->szOsFile;
        fr_wv_ours.mxPathname = fr_wv_real->mxPathname;
        fr_wv_ours.zName = fr_wv_name;
        fr_wv_ours.xOpen = fr_wv_open;
        fr_wv_ours.xDelete = fr_wv_delete;
        fr_wv_ours.xAccess = fr_wv_access;
        fr_wv_ours.xFullPathname = fr_wv_fullpath;
        fr_wv_ours.xDlOpen = fr_wv_dlopen;
        fr_wv_ours.xDlError = fr_wv_dlerror;
        fr_wv_ours.xDlSym = fr_wv_dlsym;
        fr_wv_ours.xDlClose = fr_wv_dlclose;
        fr_wv_ours.xRandomness = fr_wv_random;
        fr_wv_ours.xSleep = fr_wv_sleep;
        fr_wv_ours.xCurrentTime = fr_wv_time;
        fr_wv_ours.xGetLastError = fr_wv_lasterror;
        fr_wv_ours.xCurrentTimeInt64 = fr_wv_time64;
        if (reg(&fr_wv_ours, 0) != FR_WV_OK) return 0;
        return fr_wv_state = 1;
    #else
        (void)module_path;
        return fr_wv_state = 0;
    #endif
    }
    """
    int fr_wv_register(const char* module_path)
    const char* fr_wv_name


def wal_vfs():
    """The name of the SQLite VFS that writes a commit's WAL frames in one
    call (``"fastroute-wal"``), registered with the sqlite3 module's SQLite
    on the first call; None where it cannot be (no SQLite API reachable
    from the module, or no ``dlopen``), as :func:`fastroute.store.py_wal_vfs`
    always gives.  A connection opened with ``file:PATH?vfs=NAME``
    (``uri=True``) uses it: the store's writer does.  Only a WAL's writes
    are gathered; every other file is the default VFS's own."""
    import _sqlite3
    if fr_wv_register(_sqlite3.__file__.encode()) != 1:
        return None
    return fr_wv_name.decode()
