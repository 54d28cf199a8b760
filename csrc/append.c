/*
 * append.c — appending batches, rolling segments, group commit, waiting.
 *
 * An append frames its records straight into the active segment through a
 * shared mapping (no system call per record: the bytes are in the page
 * cache, so a process killed right after the call returns loses nothing),
 * then publishes the new end for readers.  With durability "sync" it then
 * waits for a group commit that covers it.
 */
#include "log_internal.h"

#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

static long futex(uint32_t *uaddr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, uaddr, op, val, ts, NULL, 0);
}

static int poisoned(const qlog_log *log)
{
    return LOAD(&log->ctl->poison_gen) != log->poison_gen;
}

/* A failed fsync or write: the data may be lost while the page cache says
 * otherwise, and a second fsync could falsely report success.  Every
 * handle open on the log refuses further appends until it is reopened, and
 * the next writer starts a fresh segment. */
static void poison(qlog_log *log)
{
    STORE(&log->ctl->rewrite_on_roll, 1);
    STORE(&log->ctl->need_roll, 1);
    __atomic_add_fetch(&log->ctl->poison_gen, 1, __ATOMIC_ACQ_REL);
}

/* Map the active segment for writing if this handle's mapping is stale.
 * Under wlock. */
static int writer_map(qlog_log *log)
{
    qlog_ctl *c = log->ctl;
    if (log->w_map && log->w_base == c->active_base && log->w_maplen == c->active_cap)
        return QLOG_OK;
    if (log->w_map)
        qlog_sys.munmap(log->w_map, log->w_maplen);
    log->w_map = NULL;
    if (log->w_fd >= 0 && log->w_base != c->active_base) {
        qlog_sys.close(log->w_fd);
        log->w_fd = -1;
    }
    if (log->w_fd < 0) {
        char path[4200];
        log_path(log, c->active_base, ".seg", path, sizeof path);
        log->w_fd = qlog_sys.open(path, O_RDWR | O_NOFOLLOW, 0);
        if (log->w_fd < 0)
            return log_fail(log, QLOG_EIO);
    }
    void *m = qlog_sys.mmap(NULL, c->active_cap, PROT_READ | PROT_WRITE, MAP_SHARED,
                            log->w_fd, 0);
    if (m == MAP_FAILED)
        return log_fail(log, QLOG_EIO);
    log->w_map = m;
    log->w_base = c->active_base;
    log->w_maplen = c->active_cap;
    return QLOG_OK;
}

/* Seal the active segment and start a new one at next_seq that can hold
 * at least `need` bytes of records.  Under wlock. */
static int roll(qlog_log *log, uint64_t need)
{
    qlog_ctl *c = log->ctl;
    uint64_t cap = log->segment_bytes;
    if (cap < QLOG_SEG_HEADER_SIZE + need)
        cap = QLOG_SEG_HEADER_SIZE + need;
    cap = (cap + 4095) & ~(uint64_t)4095;

    if (c->write_end == QLOG_SEG_HEADER_SIZE && c->active_base == c->next_seq) {
        /* The active segment is empty: grow it in place instead of leaving
         * an empty sealed file behind (same name, same salt). */
        if (cap <= c->active_cap) {
            STORE(&c->need_roll, 0);
            STORE(&c->rewrite_on_roll, 0);   /* no record to rewrite */
            return QLOG_OK;
        }
        int r = writer_map(log);
        if (r)
            return r;
        c->pending_cap = cap;
        __atomic_thread_fence(__ATOMIC_RELEASE);
        STORE(&c->seqlock, c->seqlock + 1);
        STORE(&c->active_cap, cap);
        STORE(&c->seqlock, c->seqlock + 1);
        STORE(&c->need_roll, 0);
        STORE(&c->rewrite_on_roll, 0);
        return writer_map(log);
    }

    int r = writer_map(log);
    if (r)
        return r;
    if (LOAD(&c->rewrite_on_roll)) {
        /* An fsync of this segment failed: the kernel may have dropped the
         * bytes it could not write and marked the pages clean, so a second
         * fsync would report success for nothing.  Write the bytes again
         * (through a bounce buffer, from what the page cache holds; records
         * that did not survive fail their CRC and are skipped), so that
         * the seal's fdatasync below really makes them durable. */
        uint8_t *bounce = malloc(1u << 20);
        if (!bounce)
            return QLOG_ENOMEM;
        for (uint64_t off = QLOG_SEG_HEADER_SIZE; off < c->write_end;) {
            uint64_t k = c->write_end - off < (1u << 20) ? c->write_end - off : (1u << 20);
            memcpy(bounce, log->w_map + off, k);
            if (qlog_sys.pwrite(log->w_fd, bounce, k, (int64_t)off) != (int64_t)k) {
                free(bounce);
                log_fail(log, QLOG_EIO);
                return QLOG_EIO;
            }
            off += k;
        }
        free(bounce);
    }
    /* The next segment first: if it cannot be made (disk full), the old
     * one is untouched and stays the active segment. */
    int fd;
    uint64_t salt, alloc, base = c->next_seq;
    r = seg_create(log, base, cap, &fd, &salt, &alloc);
    if (r)
        return r;
    /* Seal: every record of the old segment reaches stable storage, then
     * the file is cut to its exact length (the cut is synced too).  A
     * sealed segment is never written again, so recovery never reads it.
     * Killed before this, the new file is empty and the next opener (or
     * the next writer, repairing) removes it. */
    if (qlog_sys.fdatasync(log->w_fd) != 0 ||
        qlog_sys.ftruncate(log->w_fd, (int64_t)c->write_end) != 0 ||
        qlog_sys.fdatasync(log->w_fd) != 0) {
        log_fail(log, QLOG_EIO);
        poison(log);
        qlog_sys.close(fd);
        char path[4200];
        log_path(log, base, ".seg", path, sizeof path);
        qlog_sys.unlink(path);
        return QLOG_EIO;
    }
    __atomic_add_fetch(&log->n_fsyncs, 2, __ATOMIC_RELAXED);
    uint64_t sealed_upto = c->next_seq;
    qlog_sys.munmap(log->w_map, log->w_maplen);
    qlog_sys.close(log->w_fd);
    log->w_map = NULL;
    log->w_fd = fd;
    log->w_base = base;

    /* Everything the publish will store, first: a writer killed in the
     * middle of the publish is completed by the next one (repair_writer). */
    c->alloc_end = alloc;
    c->pending_end = QLOG_SEG_HEADER_SIZE;
    c->pending_next = c->next_seq;
    c->pending_base = base;
    c->pending_salt = salt;
    c->pending_cap = cap;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    STORE(&c->seqlock, c->seqlock + 1);
    STORE(&c->active_base, base);
    STORE(&c->active_salt, salt);
    STORE(&c->active_cap, cap);
    STORE(&c->write_end, (uint64_t)QLOG_SEG_HEADER_SIZE);
    STORE(&c->seqlock, c->seqlock + 1);
    uint64_t s = LOAD(&c->synced_seq);
    while (s < sealed_upto &&
           !__atomic_compare_exchange_n(&c->synced_seq, &s, sealed_upto, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ;
    __atomic_add_fetch(&c->seg_gen, 1, __ATOMIC_ACQ_REL);
    STORE(&c->need_roll, 0);
    STORE(&c->rewrite_on_roll, 0);
    return writer_map(log);
}

/*
 * An append under wlock, in steps (append_locked runs them):
 *   make_room         roll when needed, map the active segment
 *   reserve_blocks    allocate the file's space ahead of the batch
 *   reserve_numbers   raise the durable high-water mark (file `meta`)
 *   frame_dest        where to frame: straight into the mapping, or into
 *                     scratch for a big batch
 *   frame_records     frame the batch there
 *   write_framed      pwrite a batch framed in scratch (undone on failure)
 *   publish_batch     readers see the whole batch or none of it
 */

/* Roll when a roll is due or the batch of `need` bytes does not fit the
 * active segment, then map the active segment.  Under wlock. */
static int make_room(qlog_log *log, uint64_t need)
{
    qlog_ctl *c = log->ctl;
    int r;
    if (LOAD(&c->need_roll)) {
        r = roll(log, need);
        if (r)
            return r;
    }
    if (c->write_end + need > c->active_cap) {
        r = roll(log, need);
        if (r)
            return r;
    }
    return writer_map(log);
}

/* Allocate the active file up to at least `end` (past alloc_end).  Under
 * wlock. */
static int reserve_blocks(qlog_log *log, uint64_t end)
{
    qlog_ctl *c = log->ctl;
    /* Reserve the blocks before storing through the mapping: a full
     * disk is reported here, with nothing written, instead of killing
     * the process with SIGBUS. */
    uint64_t want = (end + QLOG_ALLOC_CHUNK - 1) / QLOG_ALLOC_CHUNK * QLOG_ALLOC_CHUNK;
    if (want > c->active_cap)
        want = c->active_cap;
    uint64_t got = want;
    int e = qlog_sys.fallocate(log->w_fd, 0, (int64_t)want);
    if (e == ENOSPC && want > end) {
        got = end;
        e = qlog_sys.fallocate(log->w_fd, 0, (int64_t)end);
    }
    if (e != 0) {
        errno = e;
        log_fail(log, QLOG_EIO);
        return e == ENOSPC ? QLOG_ENOSPC : QLOG_EIO;
    }
    /* Start writing back the chunk just filled, without waiting: the
     * disk works while appends go on, and the fdatasync that seals the
     * segment (or a group commit) finds little left to write. */
    if (c->alloc_end > QLOG_ALLOC_CHUNK)
        qlog_sys.writeback(log->w_fd, (int64_t)(c->alloc_end - QLOG_ALLOC_CHUNK),
                           QLOG_ALLOC_CHUNK);
    c->alloc_end = got;
    return QLOG_OK;
}

/* Write the mark that reserves the numbers [seq, seq + n) and more (past
 * reserved_upto).  Under wlock. */
static int reserve_numbers(qlog_log *log, uint64_t seq, size_t n)
{
    qlog_ctl *c = log->ctl;
    /* Right after recovery skipped numbers, no record shows the skip
     * yet: this batch's numbers are reserved by a mark that applies in
     * every boot (see rebuild); the next append, with this batch in the
     * segment, writes the usual mark. */
    int skip = c->skip_pending != 0;
    uint64_t upto = skip ? seq + n : seq + n + QLOG_SEQ_RESERVE;
    int r = skip ? meta_write_boot(log, upto, "") : meta_write(log, upto);
    if (r)
        return r;
    c->reserved_upto = upto;
    c->skip_pending = 0;
    return QLOG_OK;
}

/* Where a batch of `need` bytes is framed: scratch (*big = 1, written
 * with one pwrite) or the mapping at write_end (*big = 0).  Under wlock. */
static uint8_t *frame_dest(qlog_log *log, uint64_t need, int *big)
{
    qlog_ctl *c = log->ctl;
    int b = need >= QLOG_PWRITE_MIN;
    if (b && log->scratch_cap < need) {
        uint8_t *nb = realloc(log->scratch, need);
        if (nb) {
            log->scratch = nb;
            log->scratch_cap = need;
        } else {
            b = 0;   /* no memory for the copy: frame through the mapping */
        }
    }
    if (!b) {
        log->w_touched += need;
        if (log->w_touched >= QLOG_DROP_EVERY) {
            drop_resident(log->w_map, 0, c->write_end);
            log->w_touched = 0;
        }
    }
    *big = b;
    return b ? log->scratch : log->w_map + c->write_end;
}

/* Frame the n records of buf (lengths lens) at dst, numbered from seq. */
static void frame_records(uint8_t *dst, const char *buf, const uint32_t *lens, size_t n,
                          uint64_t seq, int64_t ts, uint32_t salt32)
{
    const char *p = buf;
    for (size_t i = 0; i < n; i++) {
        uint8_t flags = (uint8_t)((i + 1 < n ? QLOG_REC_FLAG_BATCH_MORE : 0) |
                                  (i > 0 ? QLOG_REC_FLAG_BATCH_CONT : 0));
        fmt_rec_encode(dst, p, lens[i], seq + i, ts, salt32, flags);
        dst += rec_size(lens[i]);
        p += lens[i];
    }
}

/* pwrite the batch of `need` bytes framed in scratch at write_end; the
 * batch's first number is seq.  Under wlock. */
static int write_framed(qlog_log *log, uint64_t need, uint64_t seq)
{
    qlog_ctl *c = log->ctl;
    int64_t w = qlog_sys.pwrite(log->w_fd, log->scratch, need, (int64_t)c->write_end);
    if (w != (int64_t)need) {
        /* A failed or short write is undone before the error is
         * raised: the range goes back to zeros (its space is allocated,
         * so stores through the mapping cannot fail), and nothing of
         * the batch remains.  Only ENOSPC leaves the log usable. */
        int e = w < 0 ? errno : EIO;
        memset(log->w_map + c->write_end, 0, need);
        c->pending_end = c->write_end;
        c->pending_next = seq;
        errno = e;
        log_fail(log, QLOG_EIO);
        if (e == ENOSPC)
            return QLOG_ENOSPC;
        poison(log);
        return QLOG_EIO;
    }
    if (log->scratch_cap > QLOG_SCRATCH_KEEP) {
        free(log->scratch);   /* one huge batch does not pin its size */
        log->scratch = NULL;
        log->scratch_cap = 0;
    }
    return QLOG_OK;
}

/* Publish the batch ending at `end`, before `next`.  Under wlock. */
static void publish_batch(qlog_ctl *c, uint64_t end, uint64_t next)
{
    /* Publish: readers see the whole batch or none of it. */
    STORE(&c->seqlock, c->seqlock + 1);
    STORE(&c->write_end, end);
    STORE(&c->written_seq, next);
    c->next_seq = next;
    STORE(&c->seqlock, c->seqlock + 1);
}

/* Append under wlock; returns the status, *first_seq and *end_seq set. */
static int append_locked(qlog_log *log, const char *buf, const uint32_t *lens, size_t n,
                         uint64_t need, uint64_t *first_seq)
{
    qlog_ctl *c = log->ctl;
    int r = make_room(log, need);
    if (r)
        return r;
    uint64_t end = c->write_end + need;
    if (end > c->alloc_end) {
        r = reserve_blocks(log, end);
        if (r)
            return r;
    }
    uint64_t seq = c->next_seq;
    if (seq + n > c->reserved_upto) {
        r = reserve_numbers(log, seq, n);
        if (r)
            return r;
    }

    /* Frame.  pending_* first, so that a writer killed in the middle is
     * undone by the next one (see repair_writer). */
    c->pending_end = end;
    c->pending_next = seq + n;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    uint32_t salt32 = (uint32_t)c->active_salt;
    int64_t ts = now_ns();
    int big;
    uint8_t *dst = frame_dest(log, need, &big);
    frame_records(dst, buf, lens, n, seq, ts, salt32);
    if (big) {
        r = write_framed(log, need, seq);
        if (r)
            return r;
    }

    publish_batch(c, end, seq + n);
    *first_seq = seq;
    return QLOG_OK;
}

static int64_t append_impl(qlog_log *log, const char *buf, const uint32_t *lens, size_t n)
{
    uint64_t first = 0, *first_seq = &first;
    if (n == 0)
        return QLOG_EINVAL;
    uint64_t need = 0;
    for (size_t i = 0; i < n; i++) {
        if (lens[i] > QLOG_MAX_RECORD)
            return QLOG_EINVAL;
        need += rec_size(lens[i]);
    }
    if (poisoned(log))
        return QLOG_EPOISONED;
    int r = lock_writer(log);
    if (r)
        return r;
    if (poisoned(log)) {
        pthread_mutex_unlock(&log->ctl->wlock);
        return QLOG_EPOISONED;
    }
    r = append_locked(log, buf, lens, n, need, first_seq);
    pthread_mutex_unlock(&log->ctl->wlock);
    if (r)
        return r;
    __atomic_add_fetch(&log->n_appends, 1, __ATOMIC_RELAXED);
    notify_readers(log->ctl);
    if (log->durability == QLOG_DURABILITY_SYNC) {
        r = group_sync(log, first + n);
        if (r)
            return r;
    }
    return (int64_t)first;
}

int64_t qlog_append(qlog_log *log, const char *buf, const uint32_t *lens, size_t n)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int64_t r = append_impl(log, buf, lens, n);
    log_leave(log);
    return r;
}

int64_t qlog_append1(qlog_log *log, const char *payload, size_t len)
{
    if (len > QLOG_MAX_RECORD)
        return QLOG_EINVAL;
    uint32_t l = (uint32_t)len;
    return qlog_append(log, payload, &l, 1);
}

/* One leader's commit: fdatasync the active segment as written at the
 * snapshot, then advance synced_seq.  Under slock. */
static int commit_as_leader(qlog_log *log)
{
    qlog_ctl *c = log->ctl;
    if (LOAD(&c->rewrite_on_roll)) {
        /* After a failed fsync the active segment is only trusted again
         * once rewritten and sealed (see roll). */
        int r = lock_writer(log);
        if (r)
            return r;
        if (LOAD(&c->rewrite_on_roll))
            r = roll(log, 0);
        pthread_mutex_unlock(&c->wlock);
        if (r)
            return r;
    }
    if (log->last_group > 1) {
        /* The last fdatasync covered several appends: their callers are on
         * their way back with more (a thread woken by that sync frames its
         * next record within microseconds).  Let them in before this
         * fdatasync rather than after it, while records keep arriving, for
         * at most QLOG_GATHER_ROUNDS naps. */
        uint64_t w = LOAD(&c->written_seq);
        for (int i = 0; i < QLOG_GATHER_ROUNDS; i++) {
            sched_yield();
            uint64_t w2 = LOAD(&c->written_seq);
            if (w2 == w)
                break;
            w = w2;
        }
    }
    snapshot s;
    take_snapshot(log, &s);
    if (log->s_fd < 0 || log->s_base != s.active_base) {
        if (log->s_fd >= 0)
            qlog_sys.close(log->s_fd);
        char path[4200];
        log_path(log, s.active_base, ".seg", path, sizeof path);
        log->s_fd = qlog_sys.open(path, O_RDWR | O_NOFOLLOW, 0);
        log->s_base = s.active_base;
        if (log->s_fd < 0)
            /* Rolled and deleted under us: rolls sync what they seal, so
             * the caller looks again. */
            return errno == ENOENT ? QLOG_OK : log_fail(log, QLOG_EIO);
    }
    /* Makes every record framed into the active segment before the
     * snapshot durable, whichever process framed it (the page cache is per
     * file).  Without it a power cut could lose acknowledged records. */
    if (qlog_sys.fdatasync(log->s_fd) != 0) {
        log_fail(log, QLOG_EIO);
        poison(log);
        return QLOG_EIO;
    }
    __atomic_add_fetch(&log->n_fsyncs, 1, __ATOMIC_RELAXED);
    uint64_t cur = LOAD(&c->synced_seq);
    log->last_group = s.written_seq > cur ? s.written_seq - cur : 0;
    while (cur < s.written_seq &&
           !__atomic_compare_exchange_n(&c->synced_seq, &cur, s.written_seq, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ;
    return QLOG_OK;
}

/*
 * Group commit: make every record below `target` durable.
 *
 * Whoever finds slock free becomes the leader: it notes how far the log is
 * written, runs one fdatasync, advances synced_seq, bumps sync_gen and
 * wakes everyone.  The others sleep on sync_gen meanwhile; woken, those
 * the commit covered return without an fsync of their own, and the rest
 * (they appended while it ran) elect the next leader, whose one fdatasync
 * covers all of them.  Threads and processes alike: all of it is in ctl.
 * The sleep is bounded, so a leader killed mid-commit stalls no one.
 */
int group_sync(qlog_log *log, uint64_t target)
{
    qlog_ctl *c = log->ctl;
    static const struct timespec nap = {0, 20 * 1000 * 1000};
    while (LOAD(&c->synced_seq) < target) {
        if (poisoned(log))
            return QLOG_EPOISONED;
        uint32_t gen = LOAD(&c->sync_gen);
        int r = pthread_mutex_trylock(&c->slock);
        if (r == 0 || r == EOWNERDEAD) {
            if (r == EOWNERDEAD)
                pthread_mutex_consistent(&c->slock);
            int e = QLOG_OK;
            if (LOAD(&c->synced_seq) < target)
                e = poisoned(log) ? QLOG_EPOISONED : commit_as_leader(log);
            __atomic_add_fetch(&c->sync_gen, 1, __ATOMIC_ACQ_REL);
            pthread_mutex_unlock(&c->slock);
            if (LOAD(&c->sync_waiters))
                futex(&c->sync_gen, FUTEX_WAKE, INT_MAX, NULL);
            if (e)
                return e;
            continue;
        }
        if (r != EBUSY) {
            errno = r;
            return log_fail(log, QLOG_EIO);
        }
        __atomic_add_fetch(&c->sync_waiters, 1, __ATOMIC_ACQ_REL);
        if (LOAD(&c->sync_gen) == gen && LOAD(&c->synced_seq) < target)
            futex(&c->sync_gen, FUTEX_WAIT, gen, &nap);
        __atomic_sub_fetch(&c->sync_waiters, 1, __ATOMIC_ACQ_REL);
    }
    return QLOG_OK;
}

int sync_impl(qlog_log *log)
{
    if (poisoned(log))
        return QLOG_EPOISONED;
    snapshot s;
    take_snapshot(log, &s);
    return group_sync(log, s.written_seq);
}

int qlog_sync(qlog_log *log)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int r = sync_impl(log);
    log_leave(log);
    return r;
}

int qlog_dirty(qlog_log *log)
{
    if (log_enter(log))
        return 0;
    int r = LOAD(&log->ctl->synced_seq) < LOAD(&log->ctl->written_seq);
    log_leave(log);
    return r;
}

/* by_gen == 0: wait until a record >= seq is published;
 * by_gen == 1: wait until the notify counter differs from gen. */
static int wait_impl(qlog_log *log, uint64_t seq, int by_gen, uint32_t gen, int64_t timeout_ms);

int qlog_wait(qlog_log *log, uint64_t seq, int64_t timeout_ms)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int r = wait_impl(log, seq, 0, 0, timeout_ms);
    log_leave(log);
    return r;
}

uint32_t qlog_notify_gen(qlog_log *log)
{
    if (log_enter(log))
        return 0;
    uint32_t v = LOAD(&log->ctl->notify);
    log_leave(log);
    return v;
}

int64_t qlog_next_seq(qlog_log *log)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int64_t v = (int64_t)LOAD(&log->ctl->written_seq);
    log_leave(log);
    return v;
}

void qlog_poke(qlog_log *log)
{
    if (log_enter(log))
        return;
    notify_readers(log->ctl);
    log_leave(log);
}

int qlog_wait_gen(qlog_log *log, uint32_t gen, int64_t timeout_ms)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int r = wait_impl(log, 0, 1, gen, timeout_ms);
    log_leave(log);
    return r;
}

static int wait_impl(qlog_log *log, uint64_t seq, int by_gen, uint32_t gen, int64_t timeout_ms)
{
    qlog_ctl *c = log->ctl;
    struct timespec deadline, now, rel;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    if (timeout_ms >= 0) {
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (timeout_ms % 1000) * 1000000;
        if (deadline.tv_nsec >= 1000000000) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000;
        }
    }
    for (;;) {
        uint32_t v = LOAD(&c->notify);
        if (by_gen ? v != gen : LOAD(&c->written_seq) > seq)
            return 1;
        if (LOAD(&log->closed))
            return QLOG_ECLOSED;
        const struct timespec *tp = NULL;
        if (timeout_ms >= 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            int64_t ns = (int64_t)(deadline.tv_sec - now.tv_sec) * 1000000000 +
                         (deadline.tv_nsec - now.tv_nsec);
            if (ns <= 0)
                return 0;
            rel.tv_sec = ns / 1000000000;
            rel.tv_nsec = ns % 1000000000;
            tp = &rel;
        }
        __atomic_add_fetch(&c->waiters, 1, __ATOMIC_ACQ_REL);
        if (by_gen || LOAD(&c->written_seq) <= seq)
            futex(&c->notify, FUTEX_WAIT, v, tp);
        __atomic_sub_fetch(&c->waiters, 1, __ATOMIC_ACQ_REL);
    }
}
