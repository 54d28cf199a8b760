/* Helpers shared by open.c, append.c and read.c: error recording, paths,
 * the segment listing, the meta file, the writer lock and its repair, the
 * snapshot of the published state, segment creation and the life lock of
 * a handle.  Nothing here calls into open.c, append.c or read.c, so those
 * three depend on this file and never on each other in a circle. */
#include "log_internal.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#include <limits.h>
#include <time.h>
#include <unistd.h>

int log_fail(qlog_log *log, int code)
{
    if (log && code == QLOG_EIO)
        __atomic_store_n(&log->last_errno, errno, __ATOMIC_RELAXED);
    return code;
}

void drop_resident(void *map, uint64_t from, uint64_t to)
{
    static uint64_t page;
    if (!page) {
        long ps = sysconf(_SC_PAGESIZE);
        page = ps > 0 ? (uint64_t)ps : 4096;
    }
    from = (from + page - 1) & ~(page - 1);
    to &= ~(page - 1);
    if (map && to > from)
        madvise((uint8_t *)map + from, to - from, MADV_DONTNEED);
}

int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

uint64_t random_salt(void)
{
    uint64_t s = 0;
    if (getrandom(&s, sizeof s, 0) != (ssize_t)sizeof s) {
        /* No entropy source: time and address still differ per segment. */
        s = (uint64_t)now_ns() ^ ((uint64_t)(uintptr_t)&s << 16) ^ (uint64_t)getpid();
    }
    if ((uint32_t)s == 0)
        s |= 1;   /* a zero salt32 would let zeroed bytes pass the salt check */
    return s;
}

void log_path(const qlog_log *log, uint64_t base, const char *ext, char *out, size_t n)
{
    snprintf(out, n, "%s/%020llu%s", log->dir, (unsigned long long)base, ext);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The base sequence numbers of every NNNNNNNNNNNNNNNNNNNN.seg, sorted. */
int list_segments(const char *dir, uint64_t **bases, size_t *n)
{
    DIR *d = opendir(dir);
    if (!d)
        return QLOG_EIO;
    size_t cap = 16, cnt = 0;
    uint64_t *v = malloc(cap * sizeof *v);
    if (!v) {
        closedir(d);
        return QLOG_ENOMEM;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *s = e->d_name;
        if (strlen(s) != 24 || strcmp(s + 20, ".seg") != 0)
            continue;
        uint64_t b = 0;
        int ok = 1;
        for (int i = 0; i < 20; i++) {
            if (s[i] < '0' || s[i] > '9') {
                ok = 0;
                break;
            }
            b = b * 10 + (uint64_t)(s[i] - '0');
        }
        if (!ok)
            continue;
        if (cnt == cap) {
            uint64_t *nv = realloc(v, cap * 2 * sizeof *v);
            if (!nv) {
                free(v);
                closedir(d);
                return QLOG_ENOMEM;
            }
            v = nv;
            cap *= 2;
        }
        v[cnt++] = b;
    }
    closedir(d);
    qsort(v, cnt, sizeof *v, cmp_u64);
    *bases = v;
    *n = cnt;
    return QLOG_OK;
}

/* Makes the directory's entries durable: a file created, renamed or
 * deleted before this call survives a power cut with its name. */
int fsync_dir(qlog_log *log)
{
    if (qlog_sys.fsync(log->dirfd) != 0)
        return log_fail(log, QLOG_EIO);
    return QLOG_OK;
}

/* Raise the durable high-water mark: no sequence number below
 * reserved_upto is handed out again after any crash.  Written to a
 * temporary file, synced, renamed over `meta`, and the directory synced:
 * a power cut leaves either the old mark or the new one, never a torn one. */
int meta_write(qlog_log *log, uint64_t reserved_upto)
{
    return meta_write_boot(log, reserved_upto, log->boot_id);
}

/* meta_write with the given boot id: "" makes a mark that every open
 * applies, in this boot too (see rebuild). */
int meta_write_boot(qlog_log *log, uint64_t reserved_upto, const char *boot_id)
{
    char tmp[4200], path[4200];
    uint8_t buf[QLOG_META_SIZE];
    snprintf(tmp, sizeof tmp, "%s/meta.tmp", log->dir);
    snprintf(path, sizeof path, "%s/meta", log->dir);
    fmt_meta_encode(buf, reserved_upto, boot_id);
    int fd = qlog_sys.open(tmp, O_RDWR | O_CREAT | O_TRUNC, log->file_mode);
    if (fd < 0)
        return log_fail(log, QLOG_EIO);
    int64_t w = qlog_sys.pwrite(fd, buf, sizeof buf, 0);
    if (w != (int64_t)sizeof buf) {
        int code = (w < 0 && errno == ENOSPC) ? QLOG_ENOSPC : QLOG_EIO;
        log_fail(log, QLOG_EIO);
        qlog_sys.close(fd);
        qlog_sys.unlink(tmp);
        return code;
    }
    /* the new mark's bytes are on disk before its name replaces the old */
    if (qlog_sys.fdatasync(fd) != 0) {
        log_fail(log, QLOG_EIO);
        qlog_sys.close(fd);
        qlog_sys.unlink(tmp);
        return QLOG_EIO;
    }
    qlog_sys.close(fd);
    if (qlog_sys.rename(tmp, path) != 0)
        return log_fail(log, QLOG_EIO);
    return fsync_dir(log);   /* the rename itself survives a power cut */
}

/* A writer died holding wlock.  Finish or undo what it left:
 *  - seqlock odd: it died while publishing a batch or a new segment whose
 *    bytes were all written (publishing starts after that, with every
 *    value to publish stored in pending_* first), so the publish is
 *    completed;
 *  - pending_end past write_end: it died while framing; the partial bytes
 *    are zeroed so no reader or later recovery mistakes them for records;
 *  - the active file shorter than alloc_end: it died in a roll after
 *    sealing (truncating) the file; the space is allocated again. */
static void repair_writer(qlog_log *log)
{
    qlog_ctl *c = log->ctl;
    if (c->seqlock & 1) {
        c->active_base = c->pending_base;
        c->active_salt = c->pending_salt;
        c->active_cap = c->pending_cap;
        c->write_end = c->pending_end;
        c->written_seq = c->pending_next;
        c->next_seq = c->pending_next;
        STORE(&c->seqlock, c->seqlock + 1);
        notify_readers(c);
        return;
    }
    char path[4200];
    /* A roll that died after creating the next segment's file but before
     * publishing it leaves that file behind: it holds no records (none are
     * framed before the publish), so it goes. */
    uint64_t *bases;
    size_t n;
    if (list_segments(log->dir, &bases, &n) == QLOG_OK) {
        int removed = 0;
        for (size_t i = 0; i < n; i++) {
            if (bases[i] <= c->active_base)
                continue;
            log_path(log, bases[i], ".seg", path, sizeof path);
            removed += qlog_sys.unlink(path) == 0;
        }
        free(bases);
        if (removed)
            fsync_dir(log);
    }
    log_path(log, c->active_base, ".seg", path, sizeof path);
    int fd = qlog_sys.open(path, O_RDWR | O_NOFOLLOW, 0);
    if (fd < 0) {
        STORE(&c->need_roll, 1);
        return;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size < c->alloc_end &&
        qlog_sys.fallocate(fd, 0, (int64_t)c->alloc_end) != 0)
        /* No space back: appends must allocate again (and report ENOSPC
         * cleanly) instead of storing past the end of the file. */
        c->alloc_end = (uint64_t)st.st_size > c->write_end ? (uint64_t)st.st_size : c->write_end;
    /* A roll that died before publishing leaves pending_* naming a segment
     * that was never made active (and was removed above). */
    c->pending_base = c->active_base;
    c->pending_salt = c->active_salt;
    c->pending_cap = c->active_cap;
    if (c->pending_end > c->write_end) {
        uint64_t len = c->pending_end - c->write_end;
        uint8_t *z = calloc(1, len < (1u << 20) ? len : (1u << 20));
        if (z) {
            uint64_t done = 0;
            while (done < len) {
                uint64_t chunk = len - done < (1u << 20) ? len - done : (1u << 20);
                qlog_sys.pwrite(fd, z, chunk, (int64_t)(c->write_end + done));
                done += chunk;
            }
            free(z);
            __atomic_add_fetch(&log->rec_bytes_dropped, len, __ATOMIC_RELAXED);
        }
        c->pending_end = c->write_end;
        c->pending_next = c->next_seq;
    }
    qlog_sys.close(fd);
}

/* A consistent copy of the published state.  Readers retry while a writer
 * is publishing (seqlock odd).  If it stays odd, the writer may have died
 * mid-publish: the reader then tries the writers' lock once in a while,
 * which repairs a dead owner's state (and only then). */
void take_snapshot(qlog_log *log, snapshot *s)
{
    qlog_ctl *c = log->ctl;
    for (unsigned spins = 0;; spins++) {
        uint64_t a = LOAD(&c->seqlock);
        if (a & 1) {
            if (spins % 1024 == 1023) {
                int r = pthread_mutex_trylock(&c->wlock);
                if (r == EOWNERDEAD) {
                    repair_writer(log);
                    pthread_mutex_consistent(&c->wlock);
                }
                if (r == 0 || r == EOWNERDEAD)
                    pthread_mutex_unlock(&c->wlock);
            }
            sched_yield();
            continue;
        }
        s->active_base = LOAD(&c->active_base);
        s->active_salt = LOAD(&c->active_salt);
        s->active_cap = LOAD(&c->active_cap);
        s->write_end = LOAD(&c->write_end);
        s->written_seq = LOAD(&c->written_seq);
        s->seg_gen = LOAD(&c->seg_gen);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LOAD(&c->seqlock) == a)
            return;
    }
}

static int lock_robust(qlog_log *log, pthread_mutex_t *m, int writer)
{
    int r = pthread_mutex_lock(m);
    if (r == EOWNERDEAD) {
        if (writer)
            repair_writer(log);
        pthread_mutex_consistent(m);
        return QLOG_OK;
    }
    if (r == ENOTRECOVERABLE)
        return QLOG_ECORRUPT;
    if (r) {
        errno = r;
        return log_fail(log, QLOG_EIO);
    }
    return QLOG_OK;
}

int lock_writer(qlog_log *log) { return lock_robust(log, &log->ctl->wlock, 1); }

/* Create segment `base` with capacity cap: header written and synced,
 * first chunk allocated, directory synced.  On success *fd_out is open
 * read-write and *salt_out holds the new salt. */
int seg_create(qlog_log *log, uint64_t base, uint64_t cap, int *fd_out,
               uint64_t *salt_out, uint64_t *alloc_out)
{
    char path[4200];
    uint8_t hdr[QLOG_SEG_HEADER_SIZE];
    uint64_t salt = random_salt();
    log_path(log, base, ".seg", path, sizeof path);
    int fd = qlog_sys.open(path, O_RDWR | O_CREAT | O_TRUNC, log->file_mode);
    if (fd < 0)
        return log_fail(log, QLOG_EIO);
    uint64_t alloc = cap < QLOG_ALLOC_CHUNK ? cap : QLOG_ALLOC_CHUNK;
    int r = qlog_sys.fallocate(fd, 0, (int64_t)alloc);
    if (r != 0) {
        errno = r;
        int code = r == ENOSPC ? QLOG_ENOSPC : QLOG_EIO;
        log_fail(log, QLOG_EIO);
        qlog_sys.close(fd);
        qlog_sys.unlink(path);
        return code;
    }
    fmt_seg_header_encode(hdr, base, salt, now_ns());
    int64_t w = qlog_sys.pwrite(fd, hdr, sizeof hdr, 0);
    if (w != (int64_t)sizeof hdr) {
        int code = (w < 0 && errno == ENOSPC) ? QLOG_ENOSPC : QLOG_EIO;
        log_fail(log, QLOG_EIO);
        qlog_sys.close(fd);
        qlog_sys.unlink(path);
        return code;
    }
    /* The header and the allocation are durable before the file's name is:
     * a segment that survives a power cut by name always has its header. */
    if (qlog_sys.fdatasync(fd) != 0) {
        log_fail(log, QLOG_EIO);
        qlog_sys.close(fd);
        qlog_sys.unlink(path);
        return QLOG_EIO;
    }
    /* The new name is durable before any record in the file is
     * acknowledged: without this a power cut could drop the whole file. */
    r = fsync_dir(log);
    if (r) {
        qlog_sys.close(fd);
        return r;
    }
    *fd_out = fd;
    *salt_out = salt;
    *alloc_out = alloc;
    return QLOG_OK;
}

void notify_readers(qlog_ctl *c)
{
    __atomic_add_fetch(&c->notify, 1, __ATOMIC_RELEASE);
    if (LOAD(&c->waiters))
        syscall(SYS_futex, &c->notify, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

int log_enter(qlog_log *log)
{
    if (!log)
        return QLOG_ECLOSED;
    pthread_rwlock_rdlock(&log->life);
    if (LOAD(&log->closed)) {
        pthread_rwlock_unlock(&log->life);
        return QLOG_ECLOSED;
    }
    return QLOG_OK;
}

void log_leave(qlog_log *log) { pthread_rwlock_unlock(&log->life); }
