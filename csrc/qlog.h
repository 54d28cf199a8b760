/*
 * qlog.h — the one header Python sees.
 *
 * The C engine: a segmented, append-only log of CRC32C-checked records,
 * shared by every thread and process that opens the same directory.
 * It knows nothing of queues, holds no Python objects, never prints and
 * never aborts on bad input: every call returns a status code.
 *
 * The on-disk bytes are specified in docs/FORMAT.md; the constants below
 * are checked against that document by tests/test_format.py.
 *
 * The part between the cdef markers is read verbatim by qlog/_build.py as
 * the cffi declarations, so it holds only plain declarations and integer
 * #defines.
 */
#ifndef QLOG_H
#define QLOG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* cdef-begin */

/* ---- status codes: 0 is success, negatives are errors ---------------- */
#define QLOG_OK            0
#define QLOG_EIO          -1   /* a system call failed; errno kept in the handle */
#define QLOG_ENOSPC       -2   /* no space left to extend a segment; nothing written */
#define QLOG_EPOISONED    -3   /* an earlier fsync/write failed; reopen the log */
#define QLOG_EINVAL       -4   /* bad argument (empty batch, record too large, ...) */
#define QLOG_EFORMAT      -5   /* a file is not a qlog file or has another version */
#define QLOG_ENOMEM       -6   /* allocation failed */
#define QLOG_ECLOSED      -7   /* handle already closed */
#define QLOG_EBUFFER      -8   /* output buffer too small for the first record */
#define QLOG_ENFS         -9   /* directory is on NFS: refused */
#define QLOG_ECORRUPT    -10   /* control state is damaged beyond repair */

/* ---- durability modes ------------------------------------------------ */
#define QLOG_DURABILITY_NONE      0  /* returns once the record is in the kernel */
#define QLOG_DURABILITY_INTERVAL  1  /* same; a background flush syncs it later */
#define QLOG_DURABILITY_SYNC      2  /* returns after fdatasync (group commit) */

/* ---- on-disk format (docs/FORMAT.md) ---------------------------------- */
#define QLOG_FORMAT_VERSION        1
#define QLOG_SEG_HEADER_SIZE      64   /* magic 8 + version 4 + header size 4 +
                                          base seq 8 + salt 8 + created 8 +
                                          reserved 20 + crc 4 */
#define QLOG_REC_HEADER_SIZE      32   /* crc 4 + length 4 + seq 8 + timestamp 8 +
                                          salt 4 + type 1 + flags 1 + reserved 2 */
#define QLOG_REC_ALIGN             8   /* records start on 8-byte boundaries */
#define QLOG_REC_TYPE_DATA         1
#define QLOG_REC_FLAG_BATCH_MORE   1   /* another record of this batch follows */
#define QLOG_REC_FLAG_BATCH_CONT   2   /* an earlier record of this batch precedes */
#define QLOG_REC_FLAGS_KNOWN       3   /* every other flag bit is reserved: a record with one set is damage */
#define QLOG_CRC_MASK_DELTA 0xa282ead8 /* masked = rotr15(crc) + delta */
#define QLOG_MAX_RECORD   1073741824   /* largest payload: 1 GiB */
#define QLOG_IDX_HEADER_SIZE      48
#define QLOG_IDX_ENTRY_SIZE       16   /* seq 8 + offset 8 */
#define QLOG_IDX_STRIDE         4096   /* one index entry per 4 KiB of log */
#define QLOG_META_SIZE            64
#define QLOG_SEQ_RESERVE     1048576   /* sequence numbers reserved per durable
                                          high-water-mark update */
#define QLOG_DEFAULT_SEGMENT_BYTES 67108864
#define QLOG_MIN_SEGMENT_BYTES 4096
#define QLOG_MAX_SEGMENT_BYTES 1099511627776   /* 1 TiB */

/* ---- the syscall table ----------------------------------------------- *
 * Every file operation the engine makes goes through this table, so tests
 * can drop unsynced bytes, tear a write or fail with EIO/ENOSPC.  Each
 * function returns what the POSIX call returns and sets errno the same way,
 * except fallocate, which returns 0 or an errno value (posix_fallocate). */
typedef struct qlog_vfs {
    int     (*open)(const char *path, int flags, int mode);
    int     (*close)(int fd);
    int64_t (*pread)(int fd, void *buf, size_t n, int64_t off);
    int64_t (*pwrite)(int fd, const void *buf, size_t n, int64_t off);
    int     (*fdatasync)(int fd);
    int     (*fsync)(int fd);           /* used for directories */
    int     (*rename)(const char *from, const char *to);
    int     (*unlink)(const char *path);
    int     (*ftruncate)(int fd, int64_t len);
    int     (*fallocate)(int fd, int64_t off, int64_t len);
    int     (*mkdir)(const char *path, int mode);
    void   *(*mmap)(void *addr, size_t len, int prot, int flags, int fd, int64_t off);
    int     (*munmap)(void *addr, size_t len);
    int     (*boot_id)(char *out, size_t n);  /* this boot's id, NUL-terminated */
    int     (*writeback)(int fd, int64_t off, int64_t len);  /* start writeback
                                           of a range, do not wait (a hint:
                                           makes nothing durable) */
    int     (*fs_type)(const char *path, int64_t *type);  /* statfs(2)'s
                                           f_type of path's filesystem */
    int     (*link)(const char *from, const char *to);  /* not used by the
                                           engine itself: qlog's small files
                                           created first-writer-wins */
} qlog_vfs;

void qlog_vfs_get(qlog_vfs *out);            /* the table in use */
void qlog_vfs_get_default(qlog_vfs *out);    /* the real system calls */
void qlog_vfs_set(const qlog_vfs *table);    /* install a table (tests) */

/* ---- CRC32C ------------------------------------------------------------ */
uint32_t qlog_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t qlog_crc32c_portable(uint32_t crc, const void *data, size_t n);
int      qlog_crc32c_hw(void);               /* 1 when the CPU instruction is used */
uint32_t qlog_crc_mask(uint32_t crc);
uint32_t qlog_crc_unmask(uint32_t masked);

/* ---- the log ----------------------------------------------------------- */
typedef struct qlog_log qlog_log;

typedef struct qlog_stats {
    uint64_t first_seq;         /* lowest sequence number still on disk */
    uint64_t next_seq;          /* the number the next append will get */
    uint64_t synced_seq;        /* every record below this is on stable storage */
    uint64_t segments;          /* segment files present */
    uint64_t corrupt_records;   /* damaged records skipped by this handle */
    uint64_t recovered_bytes_dropped;  /* torn tail dropped when this handle opened */
    uint64_t recovered_records_dropped;
    uint64_t fsyncs;            /* fdatasyncs made by this handle */
    uint64_t appends;           /* append calls made by this handle */
    int      last_errno;        /* errno of the last failed system call */
    int      poisoned;          /* 1 once an fsync or write failed */
} qlog_stats;

/* One problem found by qlog_verify. */
typedef struct qlog_damage {
    uint64_t segment_base;      /* base sequence of the segment file */
    uint64_t offset;            /* byte offset of the damaged region */
    uint64_t length;            /* bytes skipped */
    uint64_t after_seq;         /* last good sequence number before it (0: none) */
    int      kind;              /* QLOG_DAMAGE_* */
} qlog_damage;

#define QLOG_DAMAGE_RECORD      1   /* a record failed its CRC; neighbours intact */
#define QLOG_DAMAGE_SEG_HEADER  2   /* segment header failed its CRC */
#define QLOG_DAMAGE_TORN_TAIL   3   /* unfinished records at the end of the active segment */
#define QLOG_DAMAGE_NOT_SEGMENT 4   /* a .seg file too short or not a segment */

/* Open (creating if missing) the log in `dir`.  `mode` is the permission
 * of every file the engine creates (segments, indexes, meta, ctl, lock):
 * owner read and write, no execute or special bits (0600 to 0666, else
 * QLOG_EINVAL); a directory it creates gets the same bits plus execute
 * wherever read is set (0640 -> 0750).  The process umask still applies.
 * An existing directory or file keeps the mode it has. */
#define QLOG_DEFAULT_FILE_MODE 0600
int  qlog_open(const char *dir, int durability, uint64_t segment_bytes, int mode, qlog_log **out);
/* Close: calls in other threads finish first (a blocked qlog_wait returns
 * QLOG_ECLOSED), later calls return QLOG_ECLOSED.  The handle's memory
 * stays valid until qlog_free, so a racing call never touches freed memory. */
int  qlog_close(qlog_log *log);
void qlog_free(qlog_log *log);     /* closes if needed, then frees */

/* Append n records whose payloads lie back to back in buf with the given
 * lengths, as one atomic batch: after a crash either all of them are there
 * or none.  Returns the first record's sequence number (>= 0; the others
 * follow densely) or an error code (< 0).  With QLOG_DURABILITY_SYNC,
 * returns after the batch is on stable storage. */
int64_t qlog_append(qlog_log *log, const char *buf, const uint32_t *lens, size_t n);
int64_t qlog_append1(qlog_log *log, const char *payload, size_t len);

/* Make every record appended so far (by any process) durable. */
int  qlog_sync(qlog_log *log);

/* 1 when records appended by anyone are not yet synced, else 0. */
int  qlog_dirty(qlog_log *log);

/* Read records with seq >= from_seq: payloads back to back into out
 * (capacity out_cap), seqs[i], and offs[i]..offs[i+1] the i-th payload's
 * bounds (offs holds n+1 entries).  Stops at max_records, at max_bytes of
 * payload (but always returns at least one record when one exists) and at
 * the end of the log.  Returns the number of records (>= 0) or an error.
 * When out_cap, not a limit, stopped the read, *needed is set to the
 * capacity that would have let it go on (else 0); with no record returned
 * that is QLOG_EBUFFER. */
int64_t qlog_read(qlog_log *log, uint64_t from_seq, size_t max_records, size_t max_bytes,
                  char *out, size_t out_cap, uint64_t *seqs, uint64_t *offs,
                  uint64_t *needed);

/* Delete whole sealed segments whose records are all below seq.  Returns
 * the number of segments deleted (>= 0) or an error. */
int64_t qlog_truncate_before(qlog_log *log, uint64_t seq);

int  qlog_get_stats(qlog_log *log, qlog_stats *out);

/* Check every record of every segment.  Writes up to max problems into
 * out, returns how many were found in all (may exceed max) or an error.
 * *records receives the number of intact records. */
int64_t qlog_verify(qlog_log *log, qlog_damage *out, size_t max, uint64_t *records);

/* errno of the last failed system call on this handle. */
int  qlog_errno(qlog_log *log);

/* Block until a record with seq >= seq has been published by any process,
 * or timeout_ms passes (negative: forever).  Returns 1 when one is there,
 * 0 on timeout, QLOG_ECLOSED when the handle is closed meanwhile.  Uses a futex in the shared control file: no polling. */
int  qlog_wait(qlog_log *log, uint64_t seq, int64_t timeout_ms);

/* Change notification, for waiting on more than new records (a queue's
 * retries and acks): qlog_notify_gen reads the generation counter that every
 * publish bumps; qlog_poke bumps it and wakes every waiter in every process;
 * qlog_wait_gen blocks until the counter differs from gen or timeout_ms
 * passes (negative: forever).  Returns 1 on a change, 0 on timeout,
 * QLOG_ECLOSED when the handle is closed meanwhile. */
uint32_t qlog_notify_gen(qlog_log *log);
/* The number the next record will get, read without a lock or a system
 * call (a hint: other processes may append at any time), or QLOG_ECLOSED. */
int64_t qlog_next_seq(qlog_log *log);
void qlog_poke(qlog_log *log);
int  qlog_wait_gen(qlog_log *log, uint32_t gen, int64_t timeout_ms);

/* A short English name for a status code. */
const char *qlog_strerror(int code);

/* cdef-end */

#endif /* QLOG_H */
