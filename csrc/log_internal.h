/*
 * log_internal.h — the handle, the shared control block, and helpers
 * shared by open.c, append.c and read.c.
 */
#ifndef QLOG_LOG_INTERNAL_H
#define QLOG_LOG_INTERNAL_H

#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>

#include "format.h"
#include "qlog.h"
#include "vfs.h"

/* Segments grow (fallocate) in steps of this many bytes, so the space is
 * reserved before any record is stored through the mapping. */
#define QLOG_ALLOC_CHUNK (4u << 20)

/* Batches of at least this many bytes are framed in memory and written
 * with one pwrite (the kernel copies into the page cache faster than
 * stores through a fresh mapping fault pages in); smaller ones are framed
 * straight into the mapping, with no system call at all. */
#define QLOG_PWRITE_MIN (4u << 10)
#define QLOG_SCRATCH_KEEP (8u << 20)
/* Group commit: a leader whose last fdatasync covered more than one record
 * naps up to this many times while records keep arriving before it syncs. */
#define QLOG_GATHER_ROUNDS 4
#define QLOG_GATHER_NAP_NS 20000   /* larger framing buffers are freed after use */

/*
 * The control block: the file `ctl` in the log directory, mapped shared by
 * every process that has the log open.  It is coordination, not data: it
 * is never fsynced, and after a reboot (boot id changed) or when a process
 * opens the log alone it is rebuilt from the segment files.
 *
 *   wlock        the writers' lock: held to assign sequence numbers, frame
 *                records into the active segment, roll and delete segments.
 *                Robust: a writer killed while holding it is detected by the
 *                next one, which undoes its unfinished batch.
 *   slock        the group-commit lock: the holder is the leader that runs
 *                fdatasync for everyone waiting; the others sleep on the
 *                sync_gen futex until a commit covers them.
 *   seqlock      readers (which never take wlock) read active_base,
 *                active_cap, write_end and written_seq as one consistent
 *                snapshot: odd while a writer is changing them.
 */
#define QLOG_CTL_MAGIC "QLOGCTL\0"
#define QLOG_CTL_SIZE 4096
#define QLOG_CTL_VERSION 4

typedef struct qlog_ctl {
    char magic[8];
    uint32_t version;
    uint32_t struct_size;
    char boot_id[40];
    uint32_t initialized;       /* set last by the process that built it */
    uint32_t notify;            /* futex word: bumped at every publish */
    uint32_t waiters;           /* threads blocked on notify */
    uint32_t sync_gen;          /* futex word: bumped after each group commit */
    uint32_t sync_waiters;      /* threads blocked on sync_gen */
    uint32_t skip_pending;      /* under wlock: recovery skipped to next_seq and no
                                   record shows it yet (see rebuild in open.c) */
    pthread_mutex_t wlock;
    pthread_mutex_t slock;

    /* under wlock */
    uint64_t next_seq;          /* the number the next record gets */
    uint64_t alloc_end;         /* bytes of the active file allocated */
    uint64_t pending_end;       /* end of the batch being framed */
    uint64_t pending_next;      /* next_seq once that batch is published */
    uint64_t pending_base;      /* active segment once published: changes in a roll */
    uint64_t pending_salt;
    uint64_t pending_cap;
    uint64_t reserved_upto;     /* durable high-water mark (file `meta`) */

    /* under wlock for writers, seqlock for readers */
    uint64_t seqlock;
    uint64_t active_base;       /* base sequence of the active segment */
    uint64_t active_salt;
    uint64_t active_cap;        /* the active segment never grows past this */
    uint64_t write_end;         /* end of the last complete batch */
    uint64_t written_seq;       /* every record below this is complete */

    /* atomics */
    uint64_t synced_seq;        /* every record below this is on stable storage */
    uint64_t poison_gen;        /* bumped when an fsync or write fails */
    uint64_t need_roll;         /* the next append starts a new segment */
    uint64_t rewrite_on_roll;   /* an fsync failed: rewrite the active segment's
                                   bytes before sealing it */
    uint64_t seg_gen;           /* bumped when segments are added or deleted */
} qlog_ctl;

typedef struct snapshot {
    uint64_t active_base, active_salt, active_cap, write_end, written_seq, seg_gen;
} snapshot;

/* A segment as a reader sees it. */
typedef struct seginfo {
    uint64_t base;
    uint64_t salt;              /* from the header, or inferred (header_bad) */
    int fd;                     /* -1 until opened */
    int header_bad;             /* header failed its CRC; salt taken from records */
    int gone;                   /* deleted under us */
    uint8_t *map;
    uint64_t maplen;
    uint64_t size;              /* sealed: file size; 0 while active */
    int sealed;
    /* sparse index: (seq, offset) every QLOG_IDX_STRIDE bytes */
    uint64_t *iseq, *ioff;
    size_t icount, icap;
    uint64_t scanned_to;        /* the index covers [64, scanned_to) */
    uint64_t scan_last;         /* last sequence number seen by the scan */
    int scan_have_last;
    int idx_saved;              /* the .idx file matches */
    uint64_t corrupt;           /* damaged regions the scan skipped */
    uint64_t *dmg;              /* offsets of damage already counted */
    size_t ndmg, capdmg;
    uint64_t touched;           /* bytes read through map since pages were dropped */
} seginfo;

struct qlog_log {
    pthread_rwlock_t life;      /* every call holds it shared; close exclusively */
    char *dir;
    int dirfd;
    int ctl_fd;
    int durability;
    int file_mode;              /* permission bits of files the engine creates */
    uint64_t segment_bytes;
    qlog_ctl *ctl;
    uint64_t poison_gen;        /* ctl->poison_gen when this handle opened */
    char boot_id[40];

    /* the writer's view of the active segment: only under ctl->wlock */
    int w_fd;
    uint8_t *w_map;
    uint64_t w_base, w_maplen;
    uint64_t w_touched;         /* bytes stored through w_map since pages were dropped */
    uint8_t *scratch;           /* large batches are framed here, then pwritten */
    uint64_t scratch_cap;

    /* the sync leader's file: only under ctl->slock */
    int s_fd;
    uint64_t s_base;
    uint64_t last_group;        /* records the last fdatasync made durable */

    /* the reader: only under rmu */
    pthread_mutex_t rmu;
    seginfo *segs;
    size_t nsegs, capsegs;
    uint64_t segs_gen;
    int segs_valid;

    /* counters (atomic) */
    uint64_t n_fsyncs, n_appends, n_corrupt;
    uint64_t rec_bytes_dropped, rec_records_dropped;
    int last_errno;
    int closed;
};

/* segment.c: helpers shared by open.c, append.c and read.c */
int  log_fail(qlog_log *log, int code);   /* records errno, returns code */
void log_path(const qlog_log *log, uint64_t base, const char *ext, char *out, size_t n);
int  list_segments(const char *dir, uint64_t **bases, size_t *n);
int  fsync_dir(qlog_log *log);
int  meta_write(qlog_log *log, uint64_t reserved_upto);
int  meta_write_boot(qlog_log *log, uint64_t reserved_upto, const char *boot_id);
int  lock_writer(qlog_log *log);
void take_snapshot(qlog_log *log, snapshot *s);
int64_t now_ns(void);
uint64_t random_salt(void);

/* Memory stays flat however much of a segment a handle reads or writes
 * through its mapping: once QLOG_DROP_EVERY bytes went through, the
 * mapped pages of [from, to) are dropped from this process (MADV_DONTNEED
 * on a shared file mapping: the data stays in the page cache and in the
 * file, and a later access maps it again). */
#define QLOG_DROP_EVERY (2u << 20)
void drop_resident(void *map, uint64_t from, uint64_t to);
/* Create segment `base` with capacity cap: header written and synced,
 * first chunk allocated, directory synced. */
int  seg_create(qlog_log *log, uint64_t base, uint64_t cap, int *fd_out,
                uint64_t *salt_out, uint64_t *alloc_out);
void notify_readers(qlog_ctl *c);
/* Enter/leave a public call: 0 when the handle is open (and stays open
 * until log_leave), else QLOG_ECLOSED with nothing held. */
int  log_enter(qlog_log *log);
void log_leave(qlog_log *log);

/* append.c */
int  group_sync(qlog_log *log, uint64_t target);
int  sync_impl(qlog_log *log);

/* read.c */
void reader_free(qlog_log *log);
/* The salt of a segment whose header is damaged, from its first record
 * that checks out under the salt32 it names; 0 when no record does. */
int  infer_salt(const uint8_t *map, uint64_t end, uint64_t base, uint64_t end_seq, uint64_t *salt);

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

#endif
