/*
 * crc32c.c — CRC-32C (Castagnoli, reflected polynomial 0x82F63B78).
 *
 * Uses the CPU's instruction where it exists (SSE4.2 on x86-64, the CRC
 * extension on ARMv8), chosen once at run time; otherwise a portable
 * slicing-by-8 table.  All three give identical results (tests check them
 * against the `crc32c` package and the published vectors).
 *
 * The crc argument and result are the finalised value (as zlib's crc32):
 * qlog_crc32c(0, "123456789", 9) == 0xE3069283.
 */
#include "qlog.h"

#include <string.h>

#define POLY 0x82F63B78u

static uint32_t table[8][256];
static int table_ready;

static void build_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

uint32_t qlog_crc32c_portable(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE))
        build_table();  /* idempotent: racing builders write the same values */
    crc = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);          /* little-endian hosts only (see qlog.h) */
        w ^= crc;
        crc = table[7][w & 0xff] ^ table[6][(w >> 8) & 0xff] ^
              table[5][(w >> 16) & 0xff] ^ table[4][(w >> 24) & 0xff] ^
              table[3][(w >> 32) & 0xff] ^ table[2][(w >> 40) & 0xff] ^
              table[1][(w >> 48) & 0xff] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

#if defined(__x86_64__)
#include <cpuid.h>
__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    uint64_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
static int detect_hw(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    return (c & bit_SSE4_2) != 0;
}
#elif defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
__attribute__((target("+crc")))
static uint32_t crc_hw(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    uint32_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_aarch64_crc32cb(c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_aarch64_crc32cx(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = __builtin_aarch64_crc32cb(c, *p++);
    return ~c;
}
static int detect_hw(void)
{
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}
#else
static uint32_t crc_hw(uint32_t crc, const void *data, size_t n)
{
    return qlog_crc32c_portable(crc, data, n);
}
static int detect_hw(void) { return 0; }
#endif

/* -1: not yet decided, 0: table, 1: instruction */
static int use_hw = -1;

int qlog_crc32c_hw(void)
{
    int v = __atomic_load_n(&use_hw, __ATOMIC_RELAXED);
    if (v < 0) {
        v = detect_hw();
        __atomic_store_n(&use_hw, v, __ATOMIC_RELAXED);
    }
    return v;
}

uint32_t qlog_crc32c(uint32_t crc, const void *data, size_t n)
{
    if (qlog_crc32c_hw())
        return crc_hw(crc, data, n);
    return qlog_crc32c_portable(crc, data, n);
}

/* A CRC stored next to the data it covers is masked (rotated and offset),
 * so that a CRC computed over bytes that themselves contain CRCs does not
 * degenerate; the scheme is LevelDB's (docs/FORMAT.md, "Masked CRC"). */
uint32_t qlog_crc_mask(uint32_t crc)
{
    return ((crc >> 15) | (crc << 17)) + (uint32_t)QLOG_CRC_MASK_DELTA;
}

uint32_t qlog_crc_unmask(uint32_t masked)
{
    uint32_t rot = masked - (uint32_t)QLOG_CRC_MASK_DELTA;
    return (rot >> 17) | (rot << 15);
}
