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
#include <time.h>
#include <unistd.h>

int qlog_seg_create_for_roll(qlog_log *log, uint64_t base, uint64_t cap, int *fd_out,
                             uint64_t *salt_out, uint64_t *alloc_out);

static long futex(uint32_t *uaddr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, uaddr, op, val, ts, NULL, 0);
}

void notify_readers(qlog_ctl *c)
{
    __atomic_add_fetch(&c->notify, 1, __ATOMIC_RELEASE);
    if (LOAD(&c->waiters))
        futex(&c->notify, FUTEX_WAKE, INT_MAX, NULL);
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
    STORE(&log->ctl->need_roll, 1);
    __atomic_add_fetch(&log->ctl->poison_gen, 1, __ATOMIC_ACQ_REL);
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* Fault in the newly allocated range of the mapping, writable, with one
 * call: storing into it page by page would take one page fault per 4 KiB,
 * which costs more than the copy itself.  Best effort (older kernels say
 * EINVAL and the pages fault in as they are written). */
static void prefault(qlog_log *log, uint64_t from, uint64_t to)
{
    if (to > log->w_maplen)
        to = log->w_maplen;
    from &= ~(uint64_t)4095;
    if (to > from)
        madvise(log->w_map + from, to - from, MADV_POPULATE_WRITE);
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
        log->w_fd = qlog_sys.open(path, O_RDWR, 0);
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
    prefault(log, c->write_end, c->alloc_end);
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
            return QLOG_OK;
        }
        int r = writer_map(log);
        if (r)
            return r;
        STORE(&c->seqlock, c->seqlock + 1);
        STORE(&c->active_cap, cap);
        STORE(&c->seqlock, c->seqlock + 1);
        STORE(&c->need_roll, 0);
        return writer_map(log);
    }

    int r = writer_map(log);
    if (r)
        return r;
    /* Seal: every record of the old segment reaches stable storage, then
     * the file is cut to its exact length (the cut is synced too).  A
     * sealed segment is never written again, so recovery never reads it. */
    if (qlog_sys.fdatasync(log->w_fd) != 0 ||
        qlog_sys.ftruncate(log->w_fd, (int64_t)c->write_end) != 0 ||
        qlog_sys.fdatasync(log->w_fd) != 0) {
        log_fail(log, QLOG_EIO);
        poison(log);
        return QLOG_EIO;
    }
    __atomic_add_fetch(&log->n_fsyncs, 2, __ATOMIC_RELAXED);
    uint64_t sealed_upto = c->next_seq;

    int fd;
    uint64_t salt, alloc, base = c->next_seq;
    r = qlog_seg_create_for_roll(log, base, cap, &fd, &salt, &alloc);
    if (r) {
        /* The old segment was cut to its end: give its space back so the
         * log stays appendable once the cause is fixed. */
        qlog_sys.fallocate(log->w_fd, 0, (int64_t)c->alloc_end);
        return r;
    }
    qlog_sys.munmap(log->w_map, log->w_maplen);
    qlog_sys.close(log->w_fd);
    log->w_map = NULL;
    log->w_fd = fd;
    log->w_base = base;

    STORE(&c->seqlock, c->seqlock + 1);
    STORE(&c->active_base, base);
    STORE(&c->active_salt, salt);
    STORE(&c->active_cap, cap);
    STORE(&c->write_end, (uint64_t)QLOG_SEG_HEADER_SIZE);
    STORE(&c->seqlock, c->seqlock + 1);
    c->alloc_end = alloc;
    c->pending_end = QLOG_SEG_HEADER_SIZE;
    c->pending_next = c->next_seq;
    uint64_t s = LOAD(&c->synced_seq);
    while (s < sealed_upto &&
           !__atomic_compare_exchange_n(&c->synced_seq, &s, sealed_upto, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ;
    __atomic_add_fetch(&c->seg_gen, 1, __ATOMIC_ACQ_REL);
    STORE(&c->need_roll, 0);
    return writer_map(log);
}

/* Append under wlock; returns the status, *first_seq and *end_seq set. */
static int append_locked(qlog_log *log, const char *buf, const uint32_t *lens, size_t n,
                         uint64_t need, uint64_t *first_seq)
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
    r = writer_map(log);
    if (r)
        return r;
    uint64_t end = c->write_end + need;
    if (end > c->alloc_end) {
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
        prefault(log, c->alloc_end, got);
        c->alloc_end = got;
    }
    uint64_t seq = c->next_seq;
    if (seq + n > c->reserved_upto) {
        r = meta_write(log, seq + n + QLOG_SEQ_RESERVE);
        if (r)
            return r;
        c->reserved_upto = seq + n + QLOG_SEQ_RESERVE;
    }

    /* Frame.  pending_* first, so that a writer killed in the middle is
     * undone by the next one (see repair_writer). */
    c->pending_end = end;
    c->pending_next = seq + n;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    uint8_t *dst = log->w_map + c->write_end;
    uint32_t salt32 = (uint32_t)c->active_salt;
    int64_t ts = now_ns();
    const char *p = buf;
    for (size_t i = 0; i < n; i++) {
        uint8_t flags = i + 1 < n ? QLOG_REC_FLAG_BATCH_MORE : 0;
        fmt_rec_encode(dst, p, lens[i], seq + i, ts, salt32, flags);
        dst += rec_size(lens[i]);
        p += lens[i];
    }

    /* Publish: readers see the whole batch or none of it. */
    STORE(&c->seqlock, c->seqlock + 1);
    STORE(&c->write_end, end);
    STORE(&c->written_seq, seq + n);
    c->next_seq = seq + n;
    STORE(&c->seqlock, c->seqlock + 1);
    *first_seq = seq;
    return QLOG_OK;
}

int64_t qlog_append(qlog_log *log, const char *buf, const uint32_t *lens, size_t n)
{
    uint64_t first = 0, *first_seq = &first;
    if (!log || log->closed)
        return QLOG_ECLOSED;
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

int64_t qlog_append1(qlog_log *log, const char *payload, size_t len)
{
    if (len > QLOG_MAX_RECORD)
        return QLOG_EINVAL;
    uint32_t l = (uint32_t)len;
    return qlog_append(log, payload, &l, 1);
}

/*
 * Group commit: make every record below `target` durable.  The first
 * waiter to take slock is the leader: it notes how far the log is written,
 * runs one fdatasync, and advances synced_seq; the others were blocked on
 * slock meanwhile, find themselves covered and return without an fsync of
 * their own.  Threads and processes alike, since slock lives in ctl.
 */
int group_sync(qlog_log *log, uint64_t target)
{
    qlog_ctl *c = log->ctl;
    while (LOAD(&c->synced_seq) < target) {
        int r = lock_sync(log);
        if (r)
            return r;
        if (LOAD(&c->synced_seq) >= target) {
            pthread_mutex_unlock(&c->slock);
            break;
        }
        if (poisoned(log)) {
            pthread_mutex_unlock(&c->slock);
            return QLOG_EPOISONED;
        }
        snapshot s;
        take_snapshot(log, &s);
        if (log->s_fd < 0 || log->s_base != s.active_base) {
            if (log->s_fd >= 0)
                qlog_sys.close(log->s_fd);
            char path[4200];
            log_path(log, s.active_base, ".seg", path, sizeof path);
            log->s_fd = qlog_sys.open(path, O_RDWR, 0);
            log->s_base = s.active_base;
            if (log->s_fd < 0) {
                /* Deleted or rolled under us: rolls sync what they seal, so
                 * look again. */
                pthread_mutex_unlock(&c->slock);
                if (errno != ENOENT)
                    return log_fail(log, QLOG_EIO);
                continue;
            }
        }
        /* Makes every record framed into the active segment before the
         * snapshot durable (the page cache is per file, whoever wrote it).
         * Without it a power cut could lose records already acknowledged. */
        if (qlog_sys.fdatasync(log->s_fd) != 0) {
            log_fail(log, QLOG_EIO);
            poison(log);
            pthread_mutex_unlock(&c->slock);
            return QLOG_EIO;
        }
        __atomic_add_fetch(&log->n_fsyncs, 1, __ATOMIC_RELAXED);
        uint64_t cur = LOAD(&c->synced_seq);
        while (cur < s.written_seq &&
               !__atomic_compare_exchange_n(&c->synced_seq, &cur, s.written_seq, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            ;
        pthread_mutex_unlock(&c->slock);
    }
    return QLOG_OK;
}

int qlog_sync(qlog_log *log)
{
    if (!log || log->closed)
        return QLOG_ECLOSED;
    if (poisoned(log))
        return QLOG_EPOISONED;
    snapshot s;
    take_snapshot(log, &s);
    return group_sync(log, s.written_seq);
}

int qlog_dirty(qlog_log *log)
{
    return LOAD(&log->ctl->synced_seq) < LOAD(&log->ctl->written_seq);
}

int qlog_wait(qlog_log *log, uint64_t seq, int64_t timeout_ms)
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
        if (LOAD(&c->written_seq) > seq)
            return 1;
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
        if (LOAD(&c->written_seq) <= seq)
            futex(&c->notify, FUTEX_WAIT, v, tp);
        __atomic_sub_fetch(&c->waiters, 1, __ATOMIC_ACQ_REL);
    }
}
