/*
 * format.h — encoding and checking of the on-disk structures.
 *
 * docs/FORMAT.md is the specification; this file is its C spelling.  All
 * integers are little-endian (the engine builds only on little-endian
 * hosts, checked below).
 */
#ifndef QLOG_FORMAT_H
#define QLOG_FORMAT_H

#include <stdint.h>
#include <string.h>

#include "qlog.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "qlog's engine stores integers in host order and needs a little-endian host"
#endif

#define QLOG_SEG_MAGIC  "QLOGSEG\0"
#define QLOG_IDX_MAGIC  "QLOGIDX\0"
#define QLOG_META_MAGIC "QLOGMETA"
#define QLOG_MAGIC_SIZE 8
#define QLOG_BOOT_ID_SIZE 36     /* "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" */

/*
 * Segment header, at offset 0 of every NNNNNNNNNNNNNNNNNNNN.seg file:
 *
 *   +---------+---------+---------+----------+---------+---------+----------+-------+
 *   | magic 8 | version | hdr size| base seq | salt    | created | reserved | crc   |
 *   | QLOGSEG0| u32     | u32 =64 | u64      | u64     | i64 ns  | 20 zeros | u32   |
 *   +---------+---------+---------+----------+---------+---------+----------+-------+
 *   0         8         12        16         24        32        40         60     64
 *
 * crc: masked CRC32C of bytes [0, 60).
 */
#define SEG_OFF_VERSION   8
#define SEG_OFF_HDRSIZE  12
#define SEG_OFF_BASE     16
#define SEG_OFF_SALT     24
#define SEG_OFF_CREATED  32
#define SEG_OFF_CRC      60

/*
 * Record, at an 8-byte-aligned offset >= 64:
 *
 *   +-------+--------+-------+-----------+--------+------+-------+----------+---------+-----+
 *   | crc   | length | seq   | timestamp | salt32 | type | flags | reserved | payload | pad |
 *   | u32   | u32    | u64   | i64 ns    | u32    | u8   | u8    | u16 = 0  | length  | 0-7 |
 *   +-------+--------+-------+-----------+--------+------+-------+----------+---------+-----+
 *   0       4        8       16          24       28     29      30         32
 *
 * crc: masked CRC32C of everything after it: bytes [4, 32 + length + pad),
 * so the length, the salt and the zero padding are all covered.  salt32 is
 * the low 32 bits of the segment's salt: bytes left in a reused or
 * preallocated file by another segment can never pass as a record here.
 */
#define REC_OFF_CRC     0
#define REC_OFF_LEN     4
#define REC_OFF_SEQ     8
#define REC_OFF_TS     16
#define REC_OFF_SALT   24
#define REC_OFF_TYPE   28
#define REC_OFF_FLAGS  29

/*
 * Sparse index, NNNNNNNNNNNNNNNNNNNN.idx beside each sealed segment; a
 * cache, rebuilt from the segment whenever missing or not matching:
 *
 *   magic 8 | version u32 | count u32 | base u64 | salt u64 | seg len u64 |
 *   stride u32 | crc u32 (masked, of bytes [0,44) then all entries) |
 *   count x (seq u64, offset u64)
 */
#define IDX_OFF_VERSION  8
#define IDX_OFF_COUNT   12
#define IDX_OFF_BASE    16
#define IDX_OFF_SALT    24
#define IDX_OFF_SEGLEN  32
#define IDX_OFF_STRIDE  40
#define IDX_OFF_CRC     44

/*
 * Meta file `meta` (64 bytes), the durable sequence high-water mark:
 *
 *   magic "QLOGMETA" | version u32 | size u32 = 64 | reserved_upto u64 |
 *   boot id 36 bytes (ASCII) | crc u32 (masked, of bytes [0,60))
 */
#define META_OFF_VERSION  8
#define META_OFF_SIZE    12
#define META_OFF_RESERVE 16
#define META_OFF_BOOT    24
#define META_OFF_CRC     60

static inline uint32_t ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static inline uint64_t rec_size(uint64_t len)
{
    return (QLOG_REC_HEADER_SIZE + len + (QLOG_REC_ALIGN - 1)) & ~(uint64_t)(QLOG_REC_ALIGN - 1);
}

typedef struct seg_header {
    uint64_t base;
    uint64_t salt;
    int64_t created;
} seg_header;

typedef struct rec_view {
    uint64_t seq;
    int64_t ts;
    uint32_t len;
    uint8_t flags;
    const uint8_t *payload;
} rec_view;

void fmt_seg_header_encode(uint8_t *out, uint64_t base, uint64_t salt, int64_t created);
/* QLOG_OK, or QLOG_EFORMAT when the bytes are not a valid header. */
int  fmt_seg_header_decode(const uint8_t *p, uint64_t avail, seg_header *h);

/* Frame one record at dst (rec_size(len) bytes). */
void fmt_rec_encode(uint8_t *dst, const void *payload, uint32_t len, uint64_t seq,
                    int64_t ts, uint32_t salt32, uint8_t flags);

/* The size of the valid record at p (avail bytes readable), or 0 when the
 * bytes there are not a record of this segment (wrong salt, length past
 * avail, CRC mismatch, sequence number not above min_seq when have_min). */
uint64_t fmt_rec_check(const uint8_t *p, uint64_t avail, uint32_t salt32,
                       int have_min, uint64_t min_seq, rec_view *out);

/* The first offset in (off, end), 8-aligned, where a valid record starts,
 * or end when there is none. */
uint64_t fmt_resync(const uint8_t *map, uint64_t off, uint64_t end, uint32_t salt32,
                    int have_min, uint64_t min_seq);

void fmt_meta_encode(uint8_t *out, uint64_t reserved_upto, const char *boot_id);
int  fmt_meta_decode(const uint8_t *p, uint64_t avail, uint64_t *reserved_upto, char *boot_id);

#endif
