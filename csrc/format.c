/* format.c — see format.h and docs/FORMAT.md. */
#include "format.h"

void fmt_seg_header_encode(uint8_t *out, uint64_t base, uint64_t salt, int64_t created)
{
    memset(out, 0, QLOG_SEG_HEADER_SIZE);
    memcpy(out, QLOG_SEG_MAGIC, QLOG_MAGIC_SIZE);
    st32(out + SEG_OFF_VERSION, QLOG_FORMAT_VERSION);
    st32(out + SEG_OFF_HDRSIZE, QLOG_SEG_HEADER_SIZE);
    st64(out + SEG_OFF_BASE, base);
    st64(out + SEG_OFF_SALT, salt);
    st64(out + SEG_OFF_CREATED, (uint64_t)created);
    st32(out + SEG_OFF_CRC, qlog_crc_mask(qlog_crc32c(0, out, SEG_OFF_CRC)));
}

int fmt_seg_header_decode(const uint8_t *p, uint64_t avail, seg_header *h)
{
    if (avail < QLOG_SEG_HEADER_SIZE)
        return QLOG_EFORMAT;
    if (memcmp(p, QLOG_SEG_MAGIC, QLOG_MAGIC_SIZE) != 0)
        return QLOG_EFORMAT;
    if (qlog_crc_unmask(ld32(p + SEG_OFF_CRC)) != qlog_crc32c(0, p, SEG_OFF_CRC))
        return QLOG_EFORMAT;
    if (ld32(p + SEG_OFF_VERSION) != QLOG_FORMAT_VERSION ||
        ld32(p + SEG_OFF_HDRSIZE) != QLOG_SEG_HEADER_SIZE)
        return QLOG_EFORMAT;
    h->base = ld64(p + SEG_OFF_BASE);
    h->salt = ld64(p + SEG_OFF_SALT);
    h->created = (int64_t)ld64(p + SEG_OFF_CREATED);
    return QLOG_OK;
}

void fmt_rec_encode(uint8_t *dst, const void *payload, uint32_t len, uint64_t seq,
                    int64_t ts, uint32_t salt32, uint8_t flags)
{
    uint64_t size = rec_size(len);
    st32(dst + REC_OFF_LEN, len);
    st64(dst + REC_OFF_SEQ, seq);
    st64(dst + REC_OFF_TS, (uint64_t)ts);
    st32(dst + REC_OFF_SALT, salt32);
    dst[REC_OFF_TYPE] = QLOG_REC_TYPE_DATA;
    dst[REC_OFF_FLAGS] = flags;
    dst[30] = 0;
    dst[31] = 0;
    if (len)
        memcpy(dst + QLOG_REC_HEADER_SIZE, payload, len);
    memset(dst + QLOG_REC_HEADER_SIZE + len, 0, size - QLOG_REC_HEADER_SIZE - len);
    st32(dst + REC_OFF_CRC, qlog_crc_mask(qlog_crc32c(0, dst + 4, size - 4)));
}

uint64_t fmt_rec_check(const uint8_t *p, uint64_t avail, uint32_t salt32,
                       int have_min, uint64_t min_seq, rec_view *out)
{
    if (avail < QLOG_REC_HEADER_SIZE)
        return 0;                       /* short header: torn or end of data */
    if (ld32(p + REC_OFF_SALT) != salt32)
        return 0;                       /* zeros, or bytes of another segment */
    uint32_t len = ld32(p + REC_OFF_LEN);
    uint64_t size = rec_size(len);
    if (len > QLOG_MAX_RECORD || size > avail)
        return 0;                       /* length runs past the data: torn */
    if (p[REC_OFF_TYPE] != QLOG_REC_TYPE_DATA || p[30] || p[31] ||
        (p[REC_OFF_FLAGS] & ~QLOG_REC_FLAGS_KNOWN))
        return 0;                       /* not a record of this format (FORMAT.md: reserved bits) */
    uint64_t seq = ld64(p + REC_OFF_SEQ);
    if (have_min && seq <= min_seq)
        return 0;                       /* a stale record from before a reuse */
    if (qlog_crc_unmask(ld32(p + REC_OFF_CRC)) != qlog_crc32c(0, p + 4, size - 4))
        return 0;                       /* bit rot, or a write torn mid-record */
    if (out) {
        out->seq = seq;
        out->ts = (int64_t)ld64(p + REC_OFF_TS);
        out->len = len;
        out->flags = p[REC_OFF_FLAGS];
        out->payload = p + QLOG_REC_HEADER_SIZE;
    }
    return size;
}

uint64_t fmt_resync(const uint8_t *map, uint64_t off, uint64_t end, uint32_t salt32,
                    int have_min, uint64_t min_seq)
{
    for (off = (off + QLOG_REC_ALIGN) & ~(uint64_t)(QLOG_REC_ALIGN - 1);
         off + QLOG_REC_HEADER_SIZE <= end; off += QLOG_REC_ALIGN) {
        if (ld32(map + off + REC_OFF_SALT) != salt32)
            continue;
        if (fmt_rec_check(map + off, end - off, salt32, have_min, min_seq, NULL))
            return off;
    }
    return end;
}

void fmt_meta_encode(uint8_t *out, uint64_t reserved_upto, const char *boot_id)
{
    memset(out, 0, QLOG_META_SIZE);
    memcpy(out, QLOG_META_MAGIC, QLOG_MAGIC_SIZE);
    st32(out + META_OFF_VERSION, QLOG_FORMAT_VERSION);
    st32(out + META_OFF_SIZE, QLOG_META_SIZE);
    st64(out + META_OFF_RESERVE, reserved_upto);
    strncpy((char *)out + META_OFF_BOOT, boot_id, QLOG_BOOT_ID_SIZE);
    st32(out + META_OFF_CRC, qlog_crc_mask(qlog_crc32c(0, out, META_OFF_CRC)));
}

int fmt_meta_decode(const uint8_t *p, uint64_t avail, uint64_t *reserved_upto, char *boot_id)
{
    if (avail < QLOG_META_SIZE || memcmp(p, QLOG_META_MAGIC, QLOG_MAGIC_SIZE) != 0)
        return QLOG_EFORMAT;
    if (qlog_crc_unmask(ld32(p + META_OFF_CRC)) != qlog_crc32c(0, p, META_OFF_CRC))
        return QLOG_EFORMAT;
    if (ld32(p + META_OFF_VERSION) != QLOG_FORMAT_VERSION || ld32(p + META_OFF_SIZE) != QLOG_META_SIZE)
        return QLOG_EFORMAT;
    *reserved_upto = ld64(p + META_OFF_RESERVE);
    memcpy(boot_id, p + META_OFF_BOOT, QLOG_BOOT_ID_SIZE);
    boot_id[QLOG_BOOT_ID_SIZE] = '\0';
    return QLOG_OK;
}
