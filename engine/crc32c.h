/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78) callable without the GIL.
 *
 * pykv_crc32c(crc, data, len) continues a running CRC the same way as the crc32c package:
 * pykv_crc32c(0, "123456789", 9) == 0xE3069283. On x86-64 CPUs with SSE4.2 it uses the
 * crc32 instruction (checked once at run time); elsewhere a slicing-by-8 table.
 */
#ifndef PYKV_CRC32C_H
#define PYKV_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t pykv_crc32c_table[8][256];
static int pykv_crc32c_ready = 0;
static int pykv_crc32c_hw = 0;        /* use the crc32 instruction */
static int pykv_crc32c_hw_found = 0;  /* the CPU has it */

static void pykv_crc32c_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
        pykv_crc32c_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = pykv_crc32c_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = pykv_crc32c_table[0][crc & 0xFF] ^ (crc >> 8);
            pykv_crc32c_table[k][n] = crc;
        }
    }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    pykv_crc32c_hw_found = __builtin_cpu_supports("sse4.2");
#endif
    pykv_crc32c_hw = pykv_crc32c_hw_found;
    pykv_crc32c_ready = 1;
}

static uint32_t pykv_crc32c_sw(uint32_t crc, const uint8_t *p, size_t len) {
    while (len && ((uintptr_t)p & 7)) {
        crc = pykv_crc32c_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
        len--;
    }
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        word = __builtin_bswap64(word);
#endif
        word ^= crc;
        crc = pykv_crc32c_table[7][word & 0xFF] ^ pykv_crc32c_table[6][(word >> 8) & 0xFF] ^
              pykv_crc32c_table[5][(word >> 16) & 0xFF] ^ pykv_crc32c_table[4][(word >> 24) & 0xFF] ^
              pykv_crc32c_table[3][(word >> 32) & 0xFF] ^ pykv_crc32c_table[2][(word >> 40) & 0xFF] ^
              pykv_crc32c_table[1][(word >> 48) & 0xFF] ^ pykv_crc32c_table[0][word >> 56];
        p += 8;
        len -= 8;
    }
    while (len--)
        crc = pykv_crc32c_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2")))
static uint32_t pykv_crc32c_hw_impl(uint32_t crc, const uint8_t *p, size_t len) {
    uint64_t crc64 = crc;
    while (len && ((uintptr_t)p & 7)) {
        crc64 = __builtin_ia32_crc32qi((uint32_t)crc64, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        crc64 = __builtin_ia32_crc32di(crc64, word);
        p += 8;
        len -= 8;
    }
    while (len--)
        crc64 = __builtin_ia32_crc32qi((uint32_t)crc64, *p++);
    return (uint32_t)crc64;
}
#endif

/* Thread safe once pykv_crc32c_init() has run (the module does it once, at import time). */
static uint32_t pykv_crc32c(uint32_t crc, const uint8_t *data, size_t len) {
    crc = ~crc;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (pykv_crc32c_hw)
        return ~pykv_crc32c_hw_impl(crc, data, len);
#endif
    return ~pykv_crc32c_sw(crc, data, len);
}

/* For tests: force the portable table path (0) or allow the hardware path again (1). */
static void pykv_crc32c_allow_hw(int allow) {
    pykv_crc32c_hw = allow && pykv_crc32c_hw_found;
}

#endif
