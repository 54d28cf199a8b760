/*
 * open.c — opening and closing a log directory, crash recovery, the
 * control block, the durable sequence high-water mark.
 */
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

#define NFS_SUPER_MAGIC 0x6969


static int meta_read(qlog_log *log, uint64_t *reserved, char *boot)
{
    char path[4200];
    uint8_t buf[QLOG_META_SIZE];
    snprintf(path, sizeof path, "%s/meta", log->dir);
    int fd = qlog_sys.open(path, O_RDONLY, 0);
    if (fd < 0)
        return QLOG_EFORMAT;
    int64_t r = qlog_sys.pread(fd, buf, sizeof buf, 0);
    qlog_sys.close(fd);
    if (r != (int64_t)sizeof buf)
        return QLOG_EFORMAT;
    return fmt_meta_decode(buf, sizeof buf, reserved, boot);
}


static int init_mutex(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    int r = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return r;
}


/* Where the last nonzero byte in [from, to) ends, rounded up to an 8-byte
 * boundary within the range (from if every byte is zero). */
static uint64_t last_nonzero(const uint8_t *map, uint64_t from, uint64_t to)
{
    while (to > from) {
        uint64_t start = to - from >= 8 ? to - 8 : from;
        if (to - start == 8) {
            /* a whole word at once: the preallocated tail is megabytes of zeros */
            uint64_t w;
            memcpy(&w, map + start, 8);
            if (w)
                return to;
        } else {
            for (uint64_t i = start; i < to; i++)
                if (map[i])
                    return to;
        }
        to = start;
    }
    return from;
}

/* Overwrite [off, off+len) of fd with zeros (pwrite). */
static int zero_range(int fd, uint64_t off, uint64_t len)
{
    static const uint8_t zeros[4096];
    for (uint64_t done = 0; done < len;) {
        uint64_t k = len - done < sizeof zeros ? len - done : sizeof zeros;
        if (qlog_sys.pwrite(fd, zeros, k, (int64_t)(off + done)) != (int64_t)k)
            return -1;
        done += k;
    }
    return 0;
}

typedef struct recovered {
    uint64_t base, salt, cap, valid_end, next_seq;
} recovered;

/*
 * Recovery of the active segment, in steps (recover_active runs them):
 *   recover_map      open the file and map it read-only
 *   recover_header   decode its header, or infer the salt when it is damaged
 *   recover_scan     find the end of the last complete batch (a scan_result)
 *   recover_cut      cut the torn tail and allocate the space again
 *   recover_rewrite  after a failed fsync, write the kept bytes again
 *   recover_finish   write a bad header again, fdatasync
 * A step that fails with QLOG_EIO leaves errno set and does not record it:
 * recover_active unmaps and closes the file first, then records it.
 */

/* The active segment while recover_active works on it. */
typedef struct active_seg {
    int fd;                     /* -1 until opened */
    uint8_t *map;               /* read-only map of the whole file; NULL when empty or unmapped */
    uint64_t fsize;             /* the file's size when opened (and the map's length) */
} active_seg;

/* What recover_scan found. */
typedef struct scan_result {
    uint64_t valid_end;         /* end of the last complete batch */
    uint64_t committed_last;    /* the number of its last record, when have_committed */
    int have_committed;
    uint64_t tail_recs;         /* complete records of an unfinished batch past valid_end */
    uint64_t orphan_bytes;      /* parts of batches broken by damage, zeroed after a reboot */
    uint64_t orphan_recs;
} scan_result;

static int recover_map(qlog_log *log, uint64_t base, active_seg *a)
{
    char path[4200];
    log_path(log, base, ".seg", path, sizeof path);
    a->fd = qlog_sys.open(path, O_RDWR | O_NOFOLLOW, 0);
    if (a->fd < 0)
        return QLOG_EIO;
    struct stat st;
    if (fstat(a->fd, &st) != 0)
        return QLOG_EIO;
    a->fsize = (uint64_t)st.st_size;
    if (a->fsize > 0) {
        uint8_t *map = qlog_sys.mmap(NULL, a->fsize, PROT_READ, MAP_SHARED, a->fd, 0);
        if (map == MAP_FAILED)
            return QLOG_EIO;
        a->map = map;
    }
    return QLOG_OK;
}

/* The header of segment `base` (map: the whole file, or NULL when it is
 * empty), or one inferred from its records (*header_bad set).
 * QLOG_EFORMAT when neither the header nor any record names the salt. */
static int recover_header(qlog_log *log, uint64_t base, const uint8_t *map, uint64_t fsize,
                          seg_header *h, int *header_bad)
{
    *header_bad = 0;
    if (!map || fmt_seg_header_decode(map, fsize, h) != QLOG_OK || h->base != base) {
        /* A damaged header costs no record: the records name the salt
         * (covered by their CRCs).  The header is written again by
         * recover_finish. */
        uint64_t salt = 0;
        if (!map || !infer_salt(map, fsize, base, UINT64_MAX, &salt))
            return QLOG_EFORMAT;
        h->base = base;
        h->salt = salt;
        h->created = now_ns();
        *header_bad = 1;
        __atomic_add_fetch(&log->n_corrupt, 1, __ATOMIC_RELAXED);
    }
    return QLOG_OK;
}

/* Scan the records of the active segment (map: fsize bytes, fd open for
 * writing) for the end of the last complete batch.  After a reboot the
 * parts of batches that damage broke are zeroed in the file (pwrite). */
static int recover_scan(qlog_log *log, int fd, uint8_t *map, uint64_t fsize, uint32_t salt32,
                        int rebooted, scan_result *res)
{
    uint64_t off = QLOG_SEG_HEADER_SIZE, valid_end = off, batch_recs = 0;
    uint64_t last = 0, committed_last = 0, batch_start = off;
    int have_last = 0, have_committed = 0, in_batch = 0, orphans_follow = 0;
    uint64_t orphan_bytes = 0, orphan_recs = 0;
    uint64_t paged_out = 0;
    while (off + QLOG_REC_HEADER_SIZE <= fsize) {
        if (off - paged_out >= QLOG_DROP_EVERY) {
            drop_resident(map, paged_out, off);
            paged_out = off;
        }
        rec_view rv;
        uint64_t sz = fmt_rec_check(map + off, fsize - off, salt32, have_last, last, &rv);
        if (sz) {
            last = rv.seq;
            have_last = 1;
            if (!(rv.flags & QLOG_REC_FLAG_BATCH_CONT)) {
                orphans_follow = 0;
                batch_start = off;
                batch_recs = 0;
            } else if (orphans_follow && rebooted) {
                /* The rest of a batch whose start was lost with the
                 * damage before it. */
                if (zero_range(fd, off, sz) != 0)
                    return QLOG_EIO;
                orphan_bytes += sz;
                orphan_recs++;
                off += sz;
                continue;
            }
            off += sz;
            batch_recs++;
            in_batch = (rv.flags & QLOG_REC_FLAG_BATCH_MORE) != 0;
            if (!in_batch) {
                valid_end = off;
                committed_last = rv.seq;
                have_committed = 1;
                batch_recs = 0;
            }
            continue;
        }
        /* Not a record.  If a valid record follows, this is damage in the
         * middle: keep going past it.  If none does, it is the torn tail of
         * an interrupted write: stop. */
        uint64_t nx = fmt_resync(map, off, fsize, salt32, have_last, last);
        if (nx >= fsize)
            break;
        /* After a reboot, damage in the active segment may be a power cut
         * that wrote back some pages of the unsynced tail and not others
         * (bit rot of synced data cannot be told apart from it).  A batch
         * is all or nothing: the parts of a batch the damage broke are
         * dropped.  Without a reboot only bit rot damages data in the
         * middle, and then only the damaged record is skipped. */
        if (in_batch && rebooted) {
            if (zero_range(fd, batch_start, off - batch_start) != 0)
                return QLOG_EIO;
            orphan_bytes += off - batch_start;
            orphan_recs += batch_recs;
        }
        in_batch = 0;
        batch_recs = 0;
        orphans_follow = 1;
        __atomic_add_fetch(&log->n_corrupt, 1, __ATOMIC_RELAXED);
        off = nx;
    }
    res->valid_end = valid_end;
    res->committed_last = committed_last;
    res->have_committed = have_committed;
    res->tail_recs = batch_recs;
    res->orphan_bytes = orphan_bytes;
    res->orphan_recs = orphan_recs;
    return QLOG_OK;
}

/* Cut the file (fsize bytes) at valid_end when `dropped` bytes of a torn
 * tail follow it, then allocate the space again: *cap_out is the segment's
 * capacity, *alloc_out the bytes allocated. */
static int recover_cut(qlog_log *log, int fd, uint64_t fsize, uint64_t valid_end, uint64_t dropped,
                       uint64_t *cap_out, uint64_t *alloc_out)
{
    /* Drop the torn tail: the file is cut at the last complete batch; the
     * space is then allocated again and reads back as zeros. */
    if (dropped) {
        if (qlog_sys.ftruncate(fd, (int64_t)valid_end) != 0)
            return QLOG_EIO;
        fsize = valid_end;
    }
    uint64_t cap = log->segment_bytes > fsize ? log->segment_bytes : fsize;
    uint64_t alloc = valid_end + QLOG_ALLOC_CHUNK < cap ? valid_end + QLOG_ALLOC_CHUNK : cap;
    if (alloc < fsize)
        alloc = fsize;
    int r = qlog_sys.fallocate(fd, 0, (int64_t)alloc);
    if (r == ENOSPC) {
        alloc = fsize;   /* appends will find no room and report ENOSPC */
    } else if (r != 0) {
        errno = r;
        return QLOG_EIO;
    }
    *cap_out = cap;
    *alloc_out = alloc;
    return QLOG_OK;
}

/* Write the records of [QLOG_SEG_HEADER_SIZE, valid_end) again, from what
 * the page cache holds. */
static int recover_rewrite(int fd, uint64_t valid_end)
{
    /* See roll(): after a failed fsync the page cache may hold bytes the
     * disk lost while marked clean; write them again so the fdatasync
     * of recover_finish really makes them durable. */
    uint8_t *m = qlog_sys.mmap(NULL, valid_end, PROT_READ, MAP_SHARED, fd, 0);
    uint8_t *bounce = malloc(1u << 20);
    int ok = m != MAP_FAILED && bounce;
    for (uint64_t off = QLOG_SEG_HEADER_SIZE; ok && off < valid_end;) {
        uint64_t k = valid_end - off < (1u << 20) ? valid_end - off : (1u << 20);
        memcpy(bounce, m + off, k);
        ok = qlog_sys.pwrite(fd, bounce, k, (int64_t)off) == (int64_t)k;
        off += k;
    }
    free(bounce);
    if (m != MAP_FAILED)
        qlog_sys.munmap(m, valid_end);
    return ok ? QLOG_OK : QLOG_EIO;
}

/* Write the header again when it was bad, and make the recovered file
 * durable. */
static int recover_finish(int fd, const seg_header *h, int header_bad)
{
    if (header_bad) {
        uint8_t hdr[QLOG_SEG_HEADER_SIZE];
        fmt_seg_header_encode(hdr, h->base, h->salt, h->created);
        if (qlog_sys.pwrite(fd, hdr, sizeof hdr, 0) != (int64_t)sizeof hdr)
            return QLOG_EIO;
    }
    /* The cut (and a rewritten header) is durable: a power cut cannot bring
     * the torn bytes back in front of records appended after this open. */
    if (qlog_sys.fdatasync(fd) != 0)
        return QLOG_EIO;
    return QLOG_OK;
}

/*
 * Recover the active (last) segment: find the end of the last complete
 * batch, drop what follows (a torn tail), and allocate the space again.
 * Records damaged in the middle, with valid records after them, are kept
 * as they are (readers skip and count them): only the tail is dropped.
 */
static int recover_active(qlog_log *log, uint64_t base, int rebooted, int rewrite,
                          recovered *out)
{
    active_seg a = {-1, NULL, 0};
    seg_header h;
    int header_bad = 0;
    scan_result s;
    uint64_t dropped, cap = 0, alloc = 0;
    int r = recover_map(log, base, &a);
    if (r)
        goto done;
    r = recover_header(log, base, a.map, a.fsize, &h, &header_bad);
    if (r)
        goto done;
    r = recover_scan(log, a.fd, a.map, a.fsize, (uint32_t)h.salt, rebooted, &s);
    if (r)
        goto done;
    dropped = last_nonzero(a.map, s.valid_end, a.fsize) - s.valid_end;
    log->rec_bytes_dropped += dropped + s.orphan_bytes;
    log->rec_records_dropped += s.tail_recs + s.orphan_recs;
    qlog_sys.munmap(a.map, a.fsize);
    a.map = NULL;

    r = recover_cut(log, a.fd, a.fsize, s.valid_end, dropped, &cap, &alloc);
    if (r)
        goto done;
    if (rewrite) {
        r = recover_rewrite(a.fd, s.valid_end);
        if (r)
            goto done;
    }
    r = recover_finish(a.fd, &h, header_bad);
    if (r)
        goto done;
    out->base = base;
    out->salt = h.salt;
    out->cap = cap;
    out->valid_end = s.valid_end;
    out->next_seq = s.have_committed ? s.committed_last + 1 : base;
    log->ctl->alloc_end = alloc;

done:
    if (a.map)
        qlog_sys.munmap(a.map, a.fsize);
    if (a.fd >= 0)
        qlog_sys.close(a.fd);
    return log_fail(log, r);   /* records errno when r is QLOG_EIO */
}

/* 1 when the file at path has no nonzero byte past where the header
 * would end: a segment whose creation was cut short. */
static int seg_holds_no_data(const char *path)
{
    int fd = qlog_sys.open(path, O_RDONLY | O_NOFOLLOW, 0);
    if (fd < 0)
        return 0;
    struct stat st;
    int empty = 0;
    if (fstat(fd, &st) == 0) {
        uint64_t size = (uint64_t)st.st_size;
        if (size <= QLOG_SEG_HEADER_SIZE) {
            empty = 1;
        } else {
            uint8_t *map = qlog_sys.mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
            if (map != MAP_FAILED) {
                empty = last_nonzero(map, QLOG_SEG_HEADER_SIZE, size) == QLOG_SEG_HEADER_SIZE;
                qlog_sys.munmap(map, size);
            }
        }
    }
    qlog_sys.close(fd);
    return empty;
}

/* Remove leftovers of interrupted renames (meta.tmp, *.idx.tmp). */
static void remove_tmp_files(qlog_log *log)
{
    DIR *d = opendir(log->dir);
    if (!d)
        return;
    struct dirent *e;
    char path[4200];
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l > 4 && strcmp(e->d_name + l - 4, ".tmp") == 0) {
            snprintf(path, sizeof path, "%s/%s", log->dir, e->d_name);
            qlog_sys.unlink(path);
        }
    }
    closedir(d);
}

static int ctl_valid(const qlog_log *log);

/*
 * Rebuilding the control block, in steps (rebuild runs them):
 *   rebuild_reset_ctl      zero it, keeping the rewrite flag of this boot
 *   rebuild_floor          the numbers `meta` says may have been handed out
 *   rebuild_choose_active  recover the last segment that has a header
 *   rebuild_fresh_segment  create one when none is left
 *   rebuild_write_meta     the durable high-water mark
 *   rebuild_publish        fill in the control block and mark it initialized
 */

/* Zero the control block.  Returns 1 when an fsync failed in this boot
 * (the flag is then kept in the block); 0 otherwise. */
static int rebuild_reset_ctl(qlog_log *log)
{
    qlog_ctl *c = log->ctl;
    /* An fsync that failed in this boot is not forgotten by reopening: the
     * active segment is written again before recovery syncs it. */
    int rewrite = memcmp(c->magic, QLOG_CTL_MAGIC, 8) == 0 && c->version == QLOG_CTL_VERSION &&
                  c->struct_size == sizeof *c && log->boot_id[0] &&
                  strncmp(c->boot_id, log->boot_id, sizeof c->boot_id) == 0 &&
                  LOAD(&c->rewrite_on_roll);
    memset(c, 0, sizeof *c);
    if (rewrite) {
        /* Kept (with what identifies this boot) until recovery succeeds:
         * an open that fails half-way must not forget it. */
        memcpy(c->magic, QLOG_CTL_MAGIC, 8);
        c->version = QLOG_CTL_VERSION;
        c->struct_size = sizeof *c;
        memcpy(c->boot_id, log->boot_id, sizeof c->boot_id);
        STORE(&c->rewrite_on_roll, 1);
    }
    return rewrite;
}

/* The lowest number the next record may get, from `meta`: its mark when
 * it applies (*applies: a reboot, or one cannot be ruled out), else 0. */
static uint64_t rebuild_floor(qlog_log *log, int *applies)
{
    uint64_t reserved = 0;
    char mboot[QLOG_BOOT_ID_SIZE + 1] = "";
    int have_meta = meta_read(log, &reserved, mboot) == QLOG_OK;
    /* After a reboot, records the kernel had not written may be gone while
     * their numbers were already seen; skip past every number that could
     * have been handed out. */
    /* No boot id (no procfs) cannot prove there was no reboot: skip ahead. */
    int floor_applies = !have_meta || !mboot[0] || !log->boot_id[0] ||
                        strcmp(mboot, log->boot_id) != 0;
    *applies = floor_applies;
    return have_meta && floor_applies ? reserved : 0;
}

/* Remove the empty last segment `base` (and make that durable). */
static int drop_empty_segment(qlog_log *log, uint64_t base)
{
    char path[4200];
    log_path(log, base, ".seg", path, sizeof path);
    if (qlog_sys.unlink(path) != 0)
        return log_fail(log, QLOG_EIO);
    return fsync_dir(log);
}

/* Set the last segment `base`, which has no valid header, aside: renamed
 * to .damaged, or removed when it holds no data. */
static int set_aside_segment(qlog_log *log, uint64_t base)
{
    char path[4200], aside[4300];
    log_path(log, base, ".seg", path, sizeof path);
    snprintf(aside, sizeof aside, "%s.damaged", path);
    if (seg_holds_no_data(path)) {
        /* Created, never written (the header did not make it): there
         * is nothing to keep. */
        if (qlog_sys.unlink(path) != 0)
            return log_fail(log, QLOG_EIO);
    } else if (qlog_sys.rename(path, aside) != 0) {
        return log_fail(log, QLOG_EIO);
    }
    return QLOG_OK;
}

/* Find the active segment: the last one, recovered (*rec, *have = 1).
 * An empty last segment is removed and one without a valid header set
 * aside (*floor then rises to its base), and the one before is tried;
 * *have = 0 when no segment is left. */
static int rebuild_choose_active(qlog_log *log, int floor_applies, int rewrite, uint64_t *floor,
                                 recovered *rec, int *have)
{
    uint64_t *bases = NULL;
    size_t n = 0;
    int r = list_segments(log->dir, &bases, &n);
    if (r)
        return log_fail(log, r == QLOG_ENOMEM ? r : QLOG_EIO);

    *have = 0;
    while (n > 0 && !*have) {
        r = recover_active(log, bases[n - 1], floor_applies, rewrite, rec);
        if (r == QLOG_OK && n >= 2 && rec->valid_end == QLOG_SEG_HEADER_SIZE &&
            rec->next_seq == bases[n - 1]) {
            /* An empty last segment: a roll made it and may have died
             * before sealing the one before.  Remove it; the one before
             * becomes the active segment again (sealed anew at its roll). */
            r = drop_empty_segment(log, bases[n - 1]);
            if (r)
                goto done;
            n--;
            continue;
        }
        if (r == QLOG_OK) {
            *have = 1;
            break;
        }
        if (r != QLOG_EFORMAT)
            goto done;
        /* The last segment has no valid header: it was being created when
         * the machine stopped (its name made it to disk, its header did
         * not), or its header rotted.  Set it aside and use the one before. */
        r = set_aside_segment(log, bases[n - 1]);
        if (r)
            goto done;
        if (*floor < bases[n - 1])
            *floor = bases[n - 1];
        n--;
    }
    r = QLOG_OK;
done:
    free(bases);
    return r;
}

/* No segment left: create the active one at `next`, empty. */
static int rebuild_fresh_segment(qlog_log *log, uint64_t next, recovered *rec)
{
    int fd;
    uint64_t salt, alloc;
    uint64_t cap = log->segment_bytes;
    int r = seg_create(log, next, cap, &fd, &salt, &alloc);
    if (r)
        return r;
    qlog_sys.close(fd);
    rec->base = next;
    rec->salt = salt;
    rec->cap = cap;
    rec->valid_end = QLOG_SEG_HEADER_SIZE;
    log->ctl->alloc_end = alloc;
    return QLOG_OK;
}

/* The durable high-water mark for the next record, `next`. */
static int rebuild_write_meta(qlog_log *log, uint64_t next, int skipped)
{
    /* Skipped past the last record kept (a reboot, see floor): only `meta`
     * knows it, and a mark with this boot's id would stop applying at the
     * next open in this boot, which would then number from the last record
     * and hand out again numbers seen before the power cut.  So the mark
     * names no boot (it applies at every open) and ends at `next`, until
     * the first append puts a record there (see append_locked). */
    return skipped ? meta_write_boot(log, next, "") : meta_write(log, next + QLOG_SEQ_RESERVE);
}

/* Fill in the control block for the active segment *rec and the next
 * number `next`; `initialized` is stored last. */
static int rebuild_publish(qlog_log *log, const recovered *rec, uint64_t next, int skipped)
{
    qlog_ctl *c = log->ctl;
    memcpy(c->magic, QLOG_CTL_MAGIC, 8);
    c->version = QLOG_CTL_VERSION;
    c->struct_size = sizeof *c;
    memcpy(c->boot_id, log->boot_id, sizeof c->boot_id);
    if (init_mutex(&c->wlock) || init_mutex(&c->slock))
        return QLOG_EIO;
    c->next_seq = next;
    c->pending_end = rec->valid_end;
    c->pending_next = next;
    c->pending_base = rec->base;
    c->pending_salt = rec->salt;
    c->pending_cap = rec->cap;
    c->reserved_upto = skipped ? next : next + QLOG_SEQ_RESERVE;
    c->skip_pending = (uint32_t)skipped;
    c->active_base = rec->base;
    c->active_salt = rec->salt;
    c->active_cap = rec->cap;
    c->write_end = rec->valid_end;
    c->written_seq = next;
    c->synced_seq = next;   /* recovery synced what it kept */
    c->seg_gen = 1;
    STORE(&c->rewrite_on_roll, 0);   /* recovery rewrote and synced it */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    STORE(&c->initialized, 1);
    return QLOG_OK;
}

/* Rebuild the control block from the files.  Called with the `lock` file
 * held exclusively and no other process having the log open. */
static int rebuild(qlog_log *log)
{
    int rewrite = rebuild_reset_ctl(log);
    remove_tmp_files(log);

    int floor_applies;
    uint64_t floor = rebuild_floor(log, &floor_applies);

    recovered rec = {0, 0, 0, 0, 0};
    int have = 0;
    int r = rebuild_choose_active(log, floor_applies, rewrite, &floor, &rec, &have);
    if (r)
        return r;

    uint64_t next = have ? rec.next_seq : 0;
    if (next < floor)
        next = floor;
    if (!have) {
        r = rebuild_fresh_segment(log, next, &rec);
        if (r)
            return r;
    }
    int skipped = have && next > rec.next_seq;
    r = rebuild_write_meta(log, next, skipped);
    if (r)
        return r;
    return rebuild_publish(log, &rec, next, skipped);
}

static int ctl_valid(const qlog_log *log)
{
    const qlog_ctl *c = log->ctl;
    return memcmp(c->magic, QLOG_CTL_MAGIC, 8) == 0 && c->version == QLOG_CTL_VERSION &&
           c->struct_size == sizeof *c && LOAD(&c->initialized) == 1 &&
           strncmp(c->boot_id, log->boot_id, sizeof c->boot_id) == 0;
}

int qlog_open(const char *dir, int durability, uint64_t segment_bytes, int mode, qlog_log **out)
{
    *out = NULL;
    if ((mode & ~0666) != 0 || (mode & 0600) != 0600)
        return QLOG_EINVAL;   /* owner rw, no execute, setuid, setgid or sticky bits */
    if (durability < QLOG_DURABILITY_NONE || durability > QLOG_DURABILITY_SYNC)
        return QLOG_EINVAL;
    if (segment_bytes < QLOG_MIN_SEGMENT_BYTES || segment_bytes > QLOG_MAX_SEGMENT_BYTES)
        return QLOG_EINVAL;
    if (strlen(dir) == 0 || strlen(dir) > 4000)
        return QLOG_EINVAL;   /* paths are built in 4200-byte buffers */
    qlog_log *log = calloc(1, sizeof *log);
    if (!log)
        return QLOG_ENOMEM;
    log->dir = strdup(dir);
    log->dirfd = log->ctl_fd = log->w_fd = log->s_fd = -1;
    log->durability = durability;
    log->file_mode = mode;
    log->segment_bytes = segment_bytes;
    pthread_mutex_init(&log->rmu, NULL);
    pthread_rwlock_init(&log->life, NULL);
    qlog_sys.boot_id(log->boot_id, sizeof log->boot_id);
    log->boot_id[QLOG_BOOT_ID_SIZE] = '\0';
    int r = QLOG_EIO, lockfd = -1;

    if (!log->dir) {
        r = QLOG_ENOMEM;
        goto fail;
    }
    /* NFS is refused before anything is created: the directory's
     * filesystem, or its parent's while it does not exist yet (checked
     * again below, once it does). */
    int64_t fstype;
    int known = qlog_sys.fs_type(dir, &fstype) == 0;
    if (!known) {
        char parent[4200];
        snprintf(parent, sizeof parent, "%s", dir);
        char *slash = strrchr(parent, '/');
        if (!slash)
            snprintf(parent, sizeof parent, ".");
        else if (slash == parent)
            slash[1] = '\0';
        else
            *slash = '\0';
        known = qlog_sys.fs_type(parent, &fstype) == 0;
    }
    if (known && fstype == NFS_SUPER_MAGIC) {
        r = QLOG_ENFS;
        goto fail;
    }
    if (qlog_sys.mkdir(dir, mode | ((mode & 0444) >> 2)) == 0) {
        /* a new directory: make its name durable in the parent */
        char parent[4200];
        snprintf(parent, sizeof parent, "%s/..", dir);
        int pfd = qlog_sys.open(parent, O_RDONLY | O_DIRECTORY, 0);
        if (pfd >= 0) {
            qlog_sys.fsync(pfd);
            qlog_sys.close(pfd);
        }
    } else if (errno != EEXIST) {
        r = log_fail(log, QLOG_EIO);
        goto fail;
    }
    if (qlog_sys.fs_type(dir, &fstype) == 0 && fstype == NFS_SUPER_MAGIC) {
        r = QLOG_ENFS;
        goto fail;
    }
    log->dirfd = qlog_sys.open(dir, O_RDONLY | O_DIRECTORY, 0);
    if (log->dirfd < 0) {
        r = log_fail(log, QLOG_EIO);
        goto fail;
    }

    char path[4200];
    snprintf(path, sizeof path, "%s/lock", dir);
    lockfd = qlog_sys.open(path, O_RDWR | O_CREAT, log->file_mode);
    if (lockfd < 0 || flock(lockfd, LOCK_EX) != 0) {
        r = log_fail(log, QLOG_EIO);
        goto fail;
    }
    snprintf(path, sizeof path, "%s/ctl", dir);
    log->ctl_fd = qlog_sys.open(path, O_RDWR | O_CREAT, log->file_mode);
    if (log->ctl_fd < 0) {
        r = log_fail(log, QLOG_EIO);
        goto fail;
    }
    struct stat st;
    if (fstat(log->ctl_fd, &st) != 0 ||
        (st.st_size != QLOG_CTL_SIZE && qlog_sys.ftruncate(log->ctl_fd, QLOG_CTL_SIZE) != 0)) {
        r = log_fail(log, QLOG_EIO);
        goto fail;
    }
    log->ctl = qlog_sys.mmap(NULL, QLOG_CTL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
                             log->ctl_fd, 0);
    if (log->ctl == MAP_FAILED) {
        log->ctl = NULL;
        r = log_fail(log, QLOG_EIO);
        goto fail;
    }
    /* Every open handle holds a shared flock on ctl.  Getting it
     * exclusively means no other process has the log open: recover from
     * the files, whatever the control block says. */
    if (flock(log->ctl_fd, LOCK_EX | LOCK_NB) == 0) {
        r = rebuild(log);
        if (r)
            goto fail;
    } else if (!ctl_valid(log)) {
        r = QLOG_ECORRUPT;
        goto fail;
    }
    if (flock(log->ctl_fd, LOCK_SH) != 0) {
        r = log_fail(log, QLOG_EIO);
        goto fail;
    }
    flock(lockfd, LOCK_UN);
    qlog_sys.close(lockfd);
    log->poison_gen = LOAD(&log->ctl->poison_gen);
    *out = log;
    return QLOG_OK;

fail:;
    int saved = errno;   /* the caller reports the failing call's errno */
    if (lockfd >= 0)
        qlog_sys.close(lockfd);
    if (log->ctl)
        qlog_sys.munmap(log->ctl, QLOG_CTL_SIZE);
    if (log->ctl_fd >= 0)
        qlog_sys.close(log->ctl_fd);
    if (log->dirfd >= 0)
        qlog_sys.close(log->dirfd);
    pthread_mutex_destroy(&log->rmu);
    pthread_rwlock_destroy(&log->life);
    free(log->dir);
    free(log);
    errno = saved;
    return r;
}


int qlog_close(qlog_log *log)
{
    if (!log)
        return QLOG_OK;
    if (__atomic_exchange_n(&log->closed, 1, __ATOMIC_ACQ_REL))
        return QLOG_OK;
    /* Wake this handle's waiters (they see `closed` and return), then wait
     * for every call in flight to leave. */
    __atomic_add_fetch(&log->ctl->notify, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, &log->ctl->notify, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    pthread_rwlock_wrlock(&log->life);
    int r = QLOG_OK;
    if (log->durability == QLOG_DURABILITY_INTERVAL &&
        LOAD(&log->ctl->poison_gen) == log->poison_gen)
        r = sync_impl(log);
    reader_free(log);
    if (log->w_map)
        qlog_sys.munmap(log->w_map, log->w_maplen);
    if (log->w_fd >= 0)
        qlog_sys.close(log->w_fd);
    free(log->scratch);
    if (log->s_fd >= 0)
        qlog_sys.close(log->s_fd);
    qlog_sys.munmap(log->ctl, QLOG_CTL_SIZE);
    qlog_sys.close(log->ctl_fd);   /* drops the shared flock */
    qlog_sys.close(log->dirfd);
    log->w_map = NULL;
    log->scratch = NULL;
    log->ctl = NULL;
    log->w_fd = log->s_fd = log->ctl_fd = log->dirfd = -1;
    pthread_rwlock_unlock(&log->life);
    return r;
}

void qlog_free(qlog_log *log)
{
    if (!log)
        return;
    qlog_close(log);
    pthread_rwlock_destroy(&log->life);
    pthread_mutex_destroy(&log->rmu);
    free(log->dir);
    free(log);
}

int qlog_errno(qlog_log *log) { return __atomic_load_n(&log->last_errno, __ATOMIC_RELAXED); }

const char *qlog_strerror(int code)
{
    switch (code) {
    case QLOG_OK: return "ok";
    case QLOG_EIO: return "I/O error";
    case QLOG_ENOSPC: return "no space left on device";
    case QLOG_EPOISONED: return "an earlier fsync or write failed; reopen the log";
    case QLOG_EINVAL: return "invalid argument";
    case QLOG_EFORMAT: return "not a qlog file, or another format version";
    case QLOG_ENOMEM: return "out of memory";
    case QLOG_ECLOSED: return "log is closed";
    case QLOG_EBUFFER: return "output buffer too small";
    case QLOG_ENFS: return "directory is on NFS, which qlog does not support";
    case QLOG_ECORRUPT: return "control state is damaged";
    default: return "unknown error";
    }
}
