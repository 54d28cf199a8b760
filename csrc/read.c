/*
 * read.c — reading records, the sparse index, deleting old segments,
 * statistics and verification.
 *
 * Readers never take the writers' lock: they take a consistent snapshot of
 * the active segment's published end (seqlock in ctl) and read records
 * below it.  Sealed segments are read up to their file size.  Every record
 * read is checked against its CRC; a damaged one is skipped (and counted
 * once, when the index first covers it), never returned.
 */
#include "log_internal.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static void seg_unmap(seginfo *s)
{
    if (s->map) {
        qlog_sys.munmap(s->map, s->maplen);
        s->map = NULL;
        s->maplen = 0;
    }
}

/* Unmap s and close its file: a reader holds open only the segments it
 * maps (the one last read and the active one), however long the log. */
static void seg_release(seginfo *s)
{
    seg_unmap(s);
    if (s->fd >= 0)
        qlog_sys.close(s->fd);
    s->fd = -1;
}

static void seg_free(seginfo *s)
{
    seg_release(s);
    free(s->iseq);
    free(s->ioff);
    free(s->dmg);
    s->iseq = s->ioff = s->dmg = NULL;
}

/* Count the damage at offset off of segment s, once per handle however
 * many times it is read past. */
static void count_damage(qlog_log *log, seginfo *s, uint64_t off)
{
    for (size_t i = 0; i < s->ndmg; i++)
        if (s->dmg[i] == off)
            return;
    if (s->ndmg == s->capdmg) {
        size_t nc = s->capdmg ? s->capdmg * 2 : 8;
        uint64_t *v = realloc(s->dmg, nc * sizeof *v);
        if (!v)
            return;
        s->dmg = v;
        s->capdmg = nc;
    }
    s->dmg[s->ndmg++] = off;
    s->corrupt++;
    __atomic_add_fetch(&log->n_corrupt, 1, __ATOMIC_RELAXED);
}

void reader_free(qlog_log *log)
{
    for (size_t i = 0; i < log->nsegs; i++)
        seg_free(&log->segs[i]);
    free(log->segs);
    log->segs = NULL;
    log->nsegs = log->capsegs = 0;
}

/* Re-list the directory, keeping what is known of segments still there. */
static int reader_refresh(qlog_log *log, uint64_t gen)
{
    uint64_t *bases;
    size_t n;
    int r = list_segments(log->dir, &bases, &n);
    if (r)
        return log_fail(log, r == QLOG_ENOMEM ? r : QLOG_EIO);
    seginfo *v = calloc(n ? n : 1, sizeof *v);
    if (!v) {
        free(bases);
        return QLOG_ENOMEM;
    }
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        while (j < log->nsegs && log->segs[j].base < bases[i])
            seg_free(&log->segs[j++]);
        if (j < log->nsegs && log->segs[j].base == bases[i]) {
            v[i] = log->segs[j++];
        } else {
            v[i].base = bases[i];
            v[i].fd = -1;
        }
    }
    while (j < log->nsegs)
        seg_free(&log->segs[j++]);
    free(log->segs);
    free(bases);
    log->segs = v;
    log->nsegs = log->capsegs = n;
    log->segs_gen = gen;
    log->segs_valid = 1;
    return QLOG_OK;
}

/* A header that fails its CRC costs the segment nothing: each record
 * carries the salt's low half and covers it with its own CRC, so the first
 * record that checks out under the salt it names gives the salt.  Only a
 * record numbered at or above the segment's base (its file name) can be
 * one of its own, and only one numbered below the next segment's base
 * (end_seq; UINT64_MAX for the last segment): bytes of another segment
 * copied over this one must not lend it their salt. */
int infer_salt(const uint8_t *map, uint64_t end, uint64_t base, uint64_t end_seq, uint64_t *salt)
{
    for (uint64_t off = QLOG_SEG_HEADER_SIZE; off + QLOG_REC_HEADER_SIZE <= end;
         off += QLOG_REC_ALIGN) {
        uint32_t s32 = ld32(map + off + REC_OFF_SALT);
        rec_view rv;
        if (s32 && fmt_rec_check(map + off, end - off, s32, base > 0, base - (base > 0), &rv) &&
            rv.seq < end_seq) {
            *salt = s32;
            return 1;
        }
    }
    return 0;
}

static int idx_push(seginfo *s, uint64_t seq, uint64_t off)
{
    if (s->icount == s->icap) {
        size_t nc = s->icap ? s->icap * 2 : 64;
        uint64_t *a = realloc(s->iseq, nc * sizeof *a);
        if (!a)
            return QLOG_ENOMEM;
        s->iseq = a;
        uint64_t *b = realloc(s->ioff, nc * sizeof *b);
        if (!b)
            return QLOG_ENOMEM;
        s->ioff = b;
        s->icap = nc;
    }
    s->iseq[s->icount] = seq;
    s->ioff[s->icount] = off;
    s->icount++;
    return QLOG_OK;
}

/* Load NNN.idx if it matches this sealed segment (base, salt, length). */
static void idx_load(qlog_log *log, seginfo *s)
{
    char path[4200];
    log_path(log, s->base, ".idx", path, sizeof path);
    int fd = qlog_sys.open(path, O_RDONLY | O_NOFOLLOW, 0);
    if (fd < 0)
        return;
    struct stat st;
    uint8_t *buf = NULL;
    if (fstat(fd, &st) != 0 || st.st_size < QLOG_IDX_HEADER_SIZE)
        goto out;
    buf = malloc((size_t)st.st_size);
    if (!buf || qlog_sys.pread(fd, buf, (size_t)st.st_size, 0) != st.st_size)
        goto out;
    uint32_t count = ld32(buf + IDX_OFF_COUNT);
    if (memcmp(buf, QLOG_IDX_MAGIC, 8) != 0 || ld32(buf + IDX_OFF_VERSION) != QLOG_FORMAT_VERSION ||
        (uint64_t)st.st_size != QLOG_IDX_HEADER_SIZE + (uint64_t)count * QLOG_IDX_ENTRY_SIZE ||
        ld64(buf + IDX_OFF_BASE) != s->base || ld64(buf + IDX_OFF_SALT) != s->salt ||
        ld64(buf + IDX_OFF_SEGLEN) != s->size || ld32(buf + IDX_OFF_STRIDE) != QLOG_IDX_STRIDE)
        goto out;
    uint32_t crc = qlog_crc32c(0, buf, IDX_OFF_CRC);
    crc = qlog_crc32c(crc, buf + QLOG_IDX_HEADER_SIZE, (size_t)count * QLOG_IDX_ENTRY_SIZE);
    if (qlog_crc_unmask(ld32(buf + IDX_OFF_CRC)) != crc)
        goto out;
    /* The index is a cache: one that passes its CRC but is not what a scan
     * would build (entries out of order or outside the records, the last
     * one not a record with its number, none for a segment that may hold
     * records) is ignored, and the segment scanned instead. */
    if (count == 0 && s->size >= QLOG_SEG_HEADER_SIZE + QLOG_REC_HEADER_SIZE)
        goto out;
    s->icount = 0;
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *e = buf + QLOG_IDX_HEADER_SIZE + (size_t)i * QLOG_IDX_ENTRY_SIZE;
        uint64_t seq = ld64(e), off = ld64(e + 8);
        if (off % QLOG_REC_ALIGN || off < QLOG_SEG_HEADER_SIZE || off > s->size ||
            s->size - off < QLOG_REC_HEADER_SIZE ||
            (i > 0 && (off <= s->ioff[i - 1] || seq <= s->iseq[i - 1])) || idx_push(s, seq, off)) {
            s->icount = 0;
            goto out;
        }
    }
    s->scan_have_last = count > 0;
    s->scan_last = count ? s->iseq[count - 1] : 0;
    /* The last record's number: walk the last stride (at most ~4 KiB). */
    if (count && s->map) {
        uint64_t off = s->ioff[count - 1];
        rec_view rv;
        uint64_t sz = fmt_rec_check(s->map + off, s->size - off, (uint32_t)s->salt, 0, 0, &rv);
        if (!sz || rv.seq != s->scan_last) {
            s->icount = 0;
            s->scan_have_last = 0;
            s->scan_last = 0;
            goto out;
        }
        while (sz) {
            s->scan_last = rv.seq;
            off += sz;
            sz = off + QLOG_REC_HEADER_SIZE <= s->size
                     ? fmt_rec_check(s->map + off, s->size - off, (uint32_t)s->salt, 0, 0, &rv)
                     : 0;
        }
    }
    s->scanned_to = s->size;
    s->idx_saved = 1;
out:
    free(buf);
    qlog_sys.close(fd);
}

/* Write NNN.idx (a cache: no fsync; a torn one fails its CRC and is
 * rebuilt).  Written under a temporary name and renamed into place. */
static void idx_save(qlog_log *log, seginfo *s)
{
    char tmp[4300], path[4200];
    log_path(log, s->base, ".idx", path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
    size_t len = QLOG_IDX_HEADER_SIZE + s->icount * QLOG_IDX_ENTRY_SIZE;
    uint8_t *buf = calloc(1, len);
    if (!buf)
        return;
    memcpy(buf, QLOG_IDX_MAGIC, 8);
    st32(buf + IDX_OFF_VERSION, QLOG_FORMAT_VERSION);
    st32(buf + IDX_OFF_COUNT, (uint32_t)s->icount);
    st64(buf + IDX_OFF_BASE, s->base);
    st64(buf + IDX_OFF_SALT, s->salt);
    st64(buf + IDX_OFF_SEGLEN, s->size);
    st32(buf + IDX_OFF_STRIDE, QLOG_IDX_STRIDE);
    for (size_t i = 0; i < s->icount; i++) {
        st64(buf + QLOG_IDX_HEADER_SIZE + i * QLOG_IDX_ENTRY_SIZE, s->iseq[i]);
        st64(buf + QLOG_IDX_HEADER_SIZE + i * QLOG_IDX_ENTRY_SIZE + 8, s->ioff[i]);
    }
    uint32_t crc = qlog_crc32c(0, buf, IDX_OFF_CRC);
    crc = qlog_crc32c(crc, buf + QLOG_IDX_HEADER_SIZE, s->icount * QLOG_IDX_ENTRY_SIZE);
    st32(buf + IDX_OFF_CRC, qlog_crc_mask(crc));
    int fd = qlog_sys.open(tmp, O_WRONLY | O_CREAT | O_TRUNC, log->file_mode);
    if (fd >= 0) {
        int ok = qlog_sys.pwrite(fd, buf, len, 0) == (int64_t)len;
        qlog_sys.close(fd);
        if (ok && qlog_sys.rename(tmp, path) == 0)
            s->idx_saved = 1;
        else
            qlog_sys.unlink(tmp);
    }
    free(buf);
}

/* Make segment s readable: opened, mapped, its salt known.  Returns
 * QLOG_OK, or 1 when the file is gone (deleted by truncate_before). */
static int seg_ready(qlog_log *log, seginfo *s, const snapshot *snap)
{
    int active = s->base == snap->active_base;
    if (s->fd < 0) {
        char path[4200];
        log_path(log, s->base, ".seg", path, sizeof path);
        s->fd = qlog_sys.open(path, O_RDONLY | O_NOFOLLOW, 0);
        if (s->fd < 0) {
            if (errno == ENOENT) {
                s->gone = 1;
                return 1;
            }
            return log_fail(log, QLOG_EIO);
        }
    }
    if (!active && !s->sealed) {
        /* Sealed since we last looked (or first seen sealed): its length
         * is final.  A roll cuts the file before it publishes the next
         * segment, so this size is the sealed one. */
        struct stat st;
        if (fstat(s->fd, &st) != 0)
            return log_fail(log, QLOG_EIO);
        s->size = (uint64_t)st.st_size;
        s->sealed = 1;
    }
    uint64_t want = active ? snap->active_cap : s->size;
    if (s->map && s->maplen < want && (active || s->maplen < s->size))
        seg_unmap(s);
    if (!s->map && want > 0) {
        void *m = qlog_sys.mmap(NULL, want, PROT_READ, MAP_SHARED, s->fd, 0);
        if (m == MAP_FAILED)
            return log_fail(log, QLOG_EIO);
        s->map = m;
        s->maplen = want;
        if (s->icount == 0 && !s->header_bad && s->salt == 0) {
            seg_header h;
            uint64_t hdr_avail = active ? snap->write_end : s->size;
            if (fmt_seg_header_decode(s->map, hdr_avail, &h) == QLOG_OK && h.base == s->base) {
                s->salt = h.salt;
            } else {
                s->header_bad = 1;
                __atomic_add_fetch(&log->n_corrupt, 1, __ATOMIC_RELAXED);
                uint64_t salt = 0;
                size_t k = (size_t)(s - log->segs);
                uint64_t end_seq = k + 1 < log->nsegs ? log->segs[k + 1].base : UINT64_MAX;
                if (infer_salt(s->map, hdr_avail, s->base, end_seq, &salt))
                    s->salt = salt;
            }
            s->scanned_to = QLOG_SEG_HEADER_SIZE;
            if (s->sealed && !s->header_bad)
                idx_load(log, s);
        }
    }
    return QLOG_OK;
}

/* Extend the index of s over [scanned_to, bound), counting damaged
 * regions as it passes them. */
static int idx_extend(qlog_log *log, seginfo *s, uint64_t bound)
{
    if (!s->map || (s->header_bad && s->salt == 0)) {
        s->scanned_to = bound;
        return QLOG_OK;
    }
    uint32_t salt32 = (uint32_t)s->salt;
    uint64_t off = s->scanned_to;
    uint64_t last_idx = s->icount ? s->ioff[s->icount - 1] : 0;
    uint64_t dropped = off;
    while (off + QLOG_REC_HEADER_SIZE <= bound) {
        if (off - dropped >= QLOG_DROP_EVERY) {
            drop_resident(s->map, dropped, off);
            dropped = off;
        }
        rec_view rv;
        uint64_t sz = fmt_rec_check(s->map + off, bound - off, salt32, s->scan_have_last,
                                    s->scan_last, &rv);
        if (!sz) {
            /* Damage: skip to the next record that checks out. */
            count_damage(log, s, off);
            off = fmt_resync(s->map, off, bound, salt32, s->scan_have_last, s->scan_last);
            continue;
        }
        if (s->icount == 0 || off - last_idx >= QLOG_IDX_STRIDE) {
            if (idx_push(s, rv.seq, off))
                return QLOG_ENOMEM;
            last_idx = off;
        }
        s->scan_last = rv.seq;
        s->scan_have_last = 1;
        off += sz;
    }
    s->scanned_to = off > bound ? bound : off;
    if (s->sealed && s->scanned_to + QLOG_REC_HEADER_SIZE > s->size) {
        s->scanned_to = s->size;
        if (!s->idx_saved && !s->header_bad)
            idx_save(log, s);
    }
    return QLOG_OK;
}

/* Offset to start a walk for from_seq: the last index entry at or below
 * it whose record checks out with the entry's number (an entry on a record
 * damaged since, or one an index file got wrong, is passed over), or the
 * first record. */
static uint64_t idx_lookup(const seginfo *s, uint64_t from, uint64_t bound)
{
    if (s->icount == 0)
        return QLOG_SEG_HEADER_SIZE;
    size_t lo = 0, hi = s->icount;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (s->iseq[mid] <= from)
            lo = mid;
        else
            hi = mid;
    }
    for (size_t k = lo + 1; k-- > 0;) {
        uint64_t off = s->ioff[k];
        rec_view rv;
        if (off < bound && bound - off >= QLOG_REC_HEADER_SIZE &&
            fmt_rec_check(s->map + off, bound - off, (uint32_t)s->salt, 0, 0, &rv) &&
            rv.seq == s->iseq[k])
            return off;
    }
    return QLOG_SEG_HEADER_SIZE;
}

static int64_t read_impl(qlog_log *log, uint64_t from_seq, size_t max_records, size_t max_bytes,
                         char *out, size_t out_cap, uint64_t *seqs, uint64_t *offs,
                         uint64_t *needed);

int64_t qlog_read(qlog_log *log, uint64_t from_seq, size_t max_records, size_t max_bytes,
                  char *out, size_t out_cap, uint64_t *seqs, uint64_t *offs, uint64_t *needed)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int64_t r = read_impl(log, from_seq, max_records, max_bytes, out, out_cap, seqs, offs, needed);
    log_leave(log);
    return r;
}

static int64_t read_impl(qlog_log *log, uint64_t from_seq, size_t max_records, size_t max_bytes,
                         char *out, size_t out_cap, uint64_t *seqs, uint64_t *offs,
                         uint64_t *needed)
{
    if (max_records == 0)
        return 0;
    pthread_mutex_lock(&log->rmu);
    snapshot snap;
    take_snapshot(log, &snap);
    int r = QLOG_OK;
    if (!log->segs_valid || log->segs_gen != snap.seg_gen || log->nsegs == 0 ||
        log->segs[log->nsegs - 1].base < snap.active_base) {
        r = reader_refresh(log, snap.seg_gen);
        if (r)
            goto out;
    }
    size_t n = 0;
    uint64_t bytes = 0;
    offs[0] = 0;
    *needed = 0;
    size_t i = 0;
    while (i + 1 < log->nsegs && log->segs[i + 1].base <= from_seq)
        i++;
    /* Never past the snapshot's active segment: a file above it belongs to
     * a roll this snapshot does not see, and the one below it is not
     * sealed (cut to length) yet as far as this read knows. */
    while (i > 0 && log->segs[i].base > snap.active_base)
        i--;
    /* A file's name says where its records start, not that the segment
     * before it ends there: a segment left empty by a roll that died, or a
     * stray file, must not hide records of the one before.  Step back while
     * the previous segment holds records at or past from_seq. */
    while (i > 0) {
        seginfo *p = &log->segs[i - 1];
        int complete = p->sealed && p->scanned_to >= p->size && p->size > 0;
        if (!complete) {
            int ready = seg_ready(log, p, &snap);
            if (ready == 1)
                break;
            if (ready) {
                r = ready;
                goto out;
            }
            uint64_t b = p->base == snap.active_base ? snap.write_end : p->size;
            if (b > p->maplen)
                b = p->maplen;
            r = idx_extend(log, p, b);
            if (r)
                goto out;
        }
        if (p->scan_have_last && p->scan_last >= from_seq)
            i--;
        else
            break;
    }
    size_t last_used = i;
    int done = 0;
    for (; i < log->nsegs && !done; i++) {
        seginfo *s = &log->segs[i];
        if (s->base > snap.active_base)
            break;                      /* left by a roll that did not finish */
        int ready = seg_ready(log, s, &snap);
        if (ready == 1)
            continue;
        if (ready) {
            r = ready;
            goto out;
        }
        last_used = i;
        int active = s->base == snap.active_base;
        uint64_t bound = active ? snap.write_end : s->size;
        if (bound > s->maplen)
            bound = s->maplen;
        r = idx_extend(log, s, bound);
        if (r)
            goto out;
        if (!s->map || (s->header_bad && s->salt == 0))
            continue;
        uint32_t salt32 = (uint32_t)s->salt;
        uint64_t off = idx_lookup(s, from_seq, bound), start_off = off;
        uint64_t prev = 0;
        int have_prev = 0;
        while (off + QLOG_REC_HEADER_SIZE <= bound) {
            rec_view rv;
            uint64_t sz = fmt_rec_check(s->map + off, bound - off, salt32, have_prev, prev, &rv);
            if (!sz) {
                count_damage(log, s, off);
                off = fmt_resync(s->map, off, bound, salt32, have_prev, prev);
                continue;
            }
            prev = rv.seq;
            have_prev = 1;
            if (rv.seq >= from_seq) {
                if (n > 0 && bytes + rv.len > max_bytes) {
                    done = 1;
                    break;
                }
                if (bytes + rv.len > out_cap) {
                    /* the caller's buffer, not a limit, stopped the read:
                     * say how much would have been needed */
                    *needed = bytes + rv.len;
                    if (n == 0) {
                        r = QLOG_EBUFFER;
                        goto out;
                    }
                    done = 1;
                    break;
                }
                memcpy(out + bytes, rv.payload, rv.len);
                seqs[n] = rv.seq;
                bytes += rv.len;
                offs[n + 1] = bytes;
                n++;
                if (n >= max_records) {
                    done = 1;
                    break;
                }
            }
            off += sz;
        }
        s->touched += off > start_off ? off - start_off : 0;
        if (s->touched >= QLOG_DROP_EVERY) {
            drop_resident(s->map, 0, s->maplen);
            s->touched = 0;
        }
        if (active)
            break;
        /* A sealed segment read to its end is let go before the next one
         * is opened: one call may cross many segments. */
        if (!done)
            seg_release(s);
    }
    /* Keep memory and descriptors flat: only the segment last read and the
     * active one stay mapped and open. */
    for (size_t k = 0; k < log->nsegs; k++)
        if (k != last_used && log->segs[k].base != snap.active_base &&
            (log->segs[k].map || log->segs[k].fd >= 0))
            seg_release(&log->segs[k]);
    pthread_mutex_unlock(&log->rmu);
    return (int64_t)n;
out:
    pthread_mutex_unlock(&log->rmu);
    return r;
}

static int64_t truncate_impl(qlog_log *log, uint64_t seq);

int64_t qlog_truncate_before(qlog_log *log, uint64_t seq)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int64_t r = truncate_impl(log, seq);
    log_leave(log);
    return r;
}

static int64_t truncate_impl(qlog_log *log, uint64_t seq)
{
    int r = lock_writer(log);
    if (r)
        return r;
    uint64_t *bases;
    size_t n;
    r = list_segments(log->dir, &bases, &n);
    if (r) {
        pthread_mutex_unlock(&log->ctl->wlock);
        return log_fail(log, r == QLOG_ENOMEM ? r : QLOG_EIO);
    }
    int64_t deleted = 0;
    uint64_t active = log->ctl->active_base;
    /* Oldest first: a crash part-way leaves a shorter log, never a hole. */
    for (size_t i = 0; i + 1 < n; i++) {
        if (bases[i + 1] > seq || bases[i] >= active)
            break;
        char path[4200];
        log_path(log, bases[i], ".idx", path, sizeof path);
        qlog_sys.unlink(path);
        log_path(log, bases[i], ".seg", path, sizeof path);
        if (qlog_sys.unlink(path) != 0 && errno != ENOENT) {
            r = log_fail(log, QLOG_EIO);
            break;
        }
        deleted++;
    }
    free(bases);
    if (deleted) {
        __atomic_add_fetch(&log->ctl->seg_gen, 1, __ATOMIC_ACQ_REL);
        /* The deletions are durable (space reclaimed for good). */
        int e = fsync_dir(log);
        if (!r)
            r = e;
    }
    pthread_mutex_unlock(&log->ctl->wlock);
    return r ? r : deleted;
}

static int stats_impl(qlog_log *log, qlog_stats *out);

int qlog_get_stats(qlog_log *log, qlog_stats *out)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int r = stats_impl(log, out);
    log_leave(log);
    return r;
}

static int stats_impl(qlog_log *log, qlog_stats *out)
{
    memset(out, 0, sizeof *out);
    uint64_t *bases;
    size_t n;
    if (list_segments(log->dir, &bases, &n) == QLOG_OK) {
        out->segments = n;
        out->first_seq = n ? bases[0] : 0;
        free(bases);
    }
    snapshot s;
    take_snapshot(log, &s);
    out->next_seq = s.written_seq;
    if (out->first_seq > out->next_seq || out->segments == 0)
        out->first_seq = out->next_seq;
    out->synced_seq = LOAD(&log->ctl->synced_seq);
    if (out->synced_seq > out->next_seq)
        out->synced_seq = out->next_seq;
    out->corrupt_records = LOAD(&log->n_corrupt);
    out->recovered_bytes_dropped = LOAD(&log->rec_bytes_dropped);
    out->recovered_records_dropped = LOAD(&log->rec_records_dropped);
    out->fsyncs = LOAD(&log->n_fsyncs);
    out->appends = LOAD(&log->n_appends);
    out->last_errno = LOAD(&log->last_errno);
    out->poisoned = LOAD(&log->ctl->poison_gen) != log->poison_gen;
    return QLOG_OK;
}

static void damage_add(qlog_damage *out, size_t max, int64_t *found, uint64_t base,
                       uint64_t off, uint64_t len, uint64_t after, int kind)
{
    if ((size_t)*found < max) {
        qlog_damage *d = &out[*found];
        d->segment_base = base;
        d->offset = off;
        d->length = len;
        d->after_seq = after;
        d->kind = kind;
    }
    (*found)++;
}

static int64_t verify_impl(qlog_log *log, qlog_damage *out, size_t max, uint64_t *records);

int64_t qlog_verify(qlog_log *log, qlog_damage *out, size_t max, uint64_t *records)
{
    if (log_enter(log))
        return QLOG_ECLOSED;
    int64_t r = verify_impl(log, out, max, records);
    log_leave(log);
    return r;
}

static int64_t verify_impl(qlog_log *log, qlog_damage *out, size_t max, uint64_t *records)
{
    uint64_t *bases;
    size_t n;
    int r = list_segments(log->dir, &bases, &n);
    if (r)
        return log_fail(log, r == QLOG_ENOMEM ? r : QLOG_EIO);
    snapshot snap;
    take_snapshot(log, &snap);
    int64_t found = 0;
    *records = 0;
    for (size_t i = 0; i < n; i++) {
        if (bases[i] > snap.active_base)
            break;
        char path[4200];
        log_path(log, bases[i], ".seg", path, sizeof path);
        int fd = qlog_sys.open(path, O_RDONLY | O_NOFOLLOW, 0);
        if (fd < 0)
            continue;                   /* deleted meanwhile */
        struct stat st;
        if (fstat(fd, &st) != 0) {
            qlog_sys.close(fd);
            continue;
        }
        uint64_t end = bases[i] == snap.active_base ? snap.write_end : (uint64_t)st.st_size;
        if (end > (uint64_t)st.st_size)
            end = (uint64_t)st.st_size;
        if (end < QLOG_SEG_HEADER_SIZE) {
            damage_add(out, max, &found, bases[i], 0, end, 0, QLOG_DAMAGE_NOT_SEGMENT);
            qlog_sys.close(fd);
            continue;
        }
        uint8_t *map = qlog_sys.mmap(NULL, end, PROT_READ, MAP_SHARED, fd, 0);
        qlog_sys.close(fd);
        if (map == MAP_FAILED) {
            free(bases);
            return log_fail(log, QLOG_EIO);
        }
        seg_header h;
        uint64_t salt = 0;
        if (fmt_seg_header_decode(map, end, &h) == QLOG_OK && h.base == bases[i]) {
            salt = h.salt;
        } else {
            damage_add(out, max, &found, bases[i], 0, QLOG_SEG_HEADER_SIZE, 0,
                       QLOG_DAMAGE_SEG_HEADER);
            if (!infer_salt(map, end, bases[i], i + 1 < n ? bases[i + 1] : UINT64_MAX, &salt)) {
                qlog_sys.munmap(map, end);
                continue;
            }
        }
        uint64_t off = QLOG_SEG_HEADER_SIZE, last = 0;
        int have_last = 0;
        while (off + QLOG_REC_HEADER_SIZE <= end) {
            rec_view rv;
            uint64_t sz = fmt_rec_check(map + off, end - off, (uint32_t)salt, have_last, last, &rv);
            if (sz) {
                (*records)++;
                last = rv.seq;
                have_last = 1;
                off += sz;
                continue;
            }
            uint64_t nx = fmt_resync(map, off, end, (uint32_t)salt, have_last, last);
            damage_add(out, max, &found, bases[i], off, nx - off, have_last ? last : 0,
                       nx >= end ? QLOG_DAMAGE_TORN_TAIL : QLOG_DAMAGE_RECORD);
            off = nx;
        }
        qlog_sys.munmap(map, end);
    }
    free(bases);
    return found;
}
