/* nearstep's native codecs: one pass over a range for each codec of nearstep.formats.
 *
 * Every function here computes exactly what the torch reference in master.py and
 * moments.py computes, bit for bit (tests/test_native.py compares them on fresh
 * random inputs and on special values); native.py says why this exists and how it
 * is built. The rules that keep the bits equal:
 *   - every float operation is one IEEE operation on float32, in the reference's
 *     order (no FMA contraction: the build passes -ffp-contract=off, and no
 *     -ffast-math);
 *   - the rest is integer arithmetic on the fp32 bit patterns, done on uint32_t
 *     where torch's int32 would wrap, and with an explicit arithmetic shift where
 *     torch shifts a negative int32.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) && defined(__AVX2__)
#include <immintrin.h>
#endif
/* [Note: codecs on 16 lanes] Where the compiler targets AVX-512 (-march=native on a machine
 * that has it), the loops that gained from it run 16 elements at a time, with the selects in
 * mask registers: the 8-bit and fp8 decodes, the signed 8-bit encode (1.6x), the E5M2 and
 * unsigned bf16 encodes (1.1-1.2x). The compiler's own vectorised loops were as fast for the
 * rest (the master's rounding, the E4M3 and unsigned 8-bit encodes), which are left to it.
 * The loops after them finish a block's tail and are the definition; tests/test_native.py
 * compares both with the torch codecs. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define NS_AVX512 1
#endif

static inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
/* Arithmetic right shift of an int32, as torch's bitwise_right_shift on int32. */
static inline int32_t sar(int32_t x, int s) { return x >= 0 ? x >> s : ~(~x >> s); }

/* ---- stochastic rounding noise (rounding.py) -------------------------------------- */

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

#define NOISE_PERIOD 65536

/* ---- master codecs (master.py) ---------------------------------------------------- */

void ns_bf16_decode(const uint16_t *hi, float *out, int64_t n) {
    uint32_t *o = (uint32_t *)out;
    for (int64_t i = 0; i < n; i++) o[i] = (uint32_t)hi[i] << 16;
}

void ns_kahan_decode(const uint16_t *hi, const uint8_t *lo, float *out, int64_t n) {
    uint32_t *o = (uint32_t *)out;
    for (int64_t i = 0; i < n; i++) o[i] = (uint32_t)hi[i] << 16 | (uint32_t)lo[i] << 8;
}

/* Round values[0..n) (elements first.. of the slice) to bf16 (lo NULL, 16 bits dropped)
 * or bf16 + a compensation byte (8 bits dropped), stochastically; values become what
 * was stored. table: the noise table of rounding.py for `dropped` bits (2 periods). */
static inline __attribute__((always_inline)) void master_round(
        uint32_t *restrict v, uint16_t *restrict hi, uint8_t *restrict lo, const uint16_t *restrict noise,
        uint32_t key, int64_t length, const int dropped) {
    const uint32_t limit = dropped == 16 ? 0x7F7F0000u : 0x7F7FFF00u;
    const uint32_t keep = ~((1u << dropped) - 1u);
    for (int64_t k = 0; k < length; k++) {
        uint32_t b = v[k];
        uint32_t magnitude = b & 0x7FFFFFFFu, sign = b & 0x80000000u;
        /* nan: a quiet nan (its payload survives the truncation); finite beyond the largest
         * stored value: that value (never rounded up to inf); inf stays inf. */
        uint32_t clamped = magnitude > 0x7F800000u ? (sign | 0x7FC00000u)
                         : (magnitude > limit && magnitude < 0x7F800000u) ? (sign | limit) : b;
        clamped += (uint32_t)noise[k] ^ key;
        hi[k] = (uint16_t)(clamped >> 16);
        if (dropped == 8) lo[k] = (uint8_t)(clamped >> 8);
        v[k] = clamped & keep;
    }
}

/* table: one period (65536 entries) of the noise table of rounding.py for `dropped` bits, as
 * uint16 (its values are below 2**16): a quarter of the int32 table's two periods, so that it
 * shares the cache with the data; a rotated period is read as two runs. */
void ns_master_encode(float *values, uint16_t *hi, uint8_t *lo, int64_t n, uint64_t seed, int64_t first,
                      const uint16_t *table, int dropped) {
    const uint32_t bits_mask = (1u << dropped) - 1u;
    uint32_t *v = (uint32_t *)values;
    int64_t i = 0;
    while (i < n) {
        int64_t position = first + i;
        int64_t period = position / NOISE_PERIOD, local = position % NOISE_PERIOD;
        int64_t length = NOISE_PERIOD - local;
        if (length > n - i) length = n - i;
        uint64_t z = mix64(seed * 0x9E3779B97F4A7C15ULL + (uint64_t)period * 0xD1B54A32D192ED03ULL + (uint64_t)dropped);
        const uint32_t key = (uint32_t)(z >> 32) & bits_mask;
        int64_t from = (local + (int64_t)(z & (NOISE_PERIOD - 1))) % NOISE_PERIOD;
        while (length > 0) {
            int64_t run = NOISE_PERIOD - from < length ? NOISE_PERIOD - from : length;
            if (dropped == 16) master_round(v + i, hi + i, NULL, table + from, key, run, 16);
            else master_round(v + i, hi + i, lo + i, table + from, key, run, 8);
            i += run;
            length -= run;
            from = 0;
        }
    }
}

/* ---- 8-bit moments (moments.py, maps.py) ------------------------------------------ */

enum { DYN_SIGNED = 0, DYN_UNSIGNED = 1, LIN_SIGNED = 2, LIN_UNSIGNED = 3, FP8_SIGNED = 4, FP8_UNSIGNED = 5 };

/* fp8 codes (moments.py, Fp8Moments) of a scaled |y| <= NORM, rounded to nearest, ties to even,
 * the sign put back by the caller. E4M3 (signed moments): 3 mantissa bits, exponent bias 7,
 * subnormals k * 2**-9 below 2**-6; E5M2 (second moments): 2 mantissa bits, bias 15,
 * subnormals k * 2**-16 below 2**-14. Normal values drop 20 (21) bits of the fp32 pattern
 * with the tie to the even one; subnormals are y * 2**9 (2**16), exact, rounded to an integer
 * by nearbyintf, which is the subnormal code itself (the first normal code follows it). */
/* Both ways are computed and one is kept, so that the loops vectorise. */
static inline uint32_t e4m3_magnitude(uint32_t m) {
    uint32_t sub = (uint32_t)(int32_t)nearbyintf(u2f(m) * 512.0f);
    uint32_t normal = ((m + 0x7FFFFu + ((m >> 20) & 1u)) >> 20) - (120u << 3);
    return m < (121u << 23) ? sub : normal;
}

static inline uint32_t e5m2_magnitude(uint32_t m) {
    uint32_t sub = (uint32_t)(int32_t)nearbyintf(u2f(m) * 65536.0f);
    uint32_t normal = ((m + 0xFFFFFu + ((m >> 21) & 1u)) >> 21) - (112u << 2);
    return m < (113u << 23) ? sub : normal;
}

/* The fp32 pattern of an fp8 code, for the codes that are numbers; `special` is set for the
 * others (E4M3's nan, E5M2's inf and nan), which the caller takes from torch's table. */
static inline uint32_t e4m3_bits(uint32_t c, uint32_t *special) {
    uint32_t e = (c >> 3) & 0xFu, m = c & 7u;
    uint32_t sub = f2u((float)m * 0x1p-9f);
    uint32_t normal = (e + 120u) << 23 | m << 20;
    *special |= (uint32_t)((c & 0x7Fu) == 0x7Fu);
    return (c & 0x80u) << 24 | (e == 0u ? sub : normal);
}

static inline uint32_t e5m2_bits(uint32_t c, uint32_t *special) {
    uint32_t e = (c >> 2) & 0x1Fu, m = c & 3u;
    uint32_t sub = f2u((float)m * 0x1p-16f);
    uint32_t normal = (e + 112u) << 23 | m << 21;
    *special |= (uint32_t)(e == 31u);
    return (c & 0x80u) << 24 | (e == 0u ? sub : normal);
}

static inline float block_multiplier(float scale, int mode) {
    switch (mode) {
    case DYN_SIGNED: return scale;
    case DYN_UNSIGNED: return scale * (1.0f / 32768.0f);
    case LIN_SIGNED: return scale / 127.0f;
    case LIN_UNSIGNED: return scale / 255.0f;
    case FP8_SIGNED: return scale * (1.0f / 256.0f);
    default: return scale * (1.0f / 32768.0f);
    }
}

/* lut: the 256 code values before the block's multiplier (fp16 patterns for the
 * dynamic maps, the code itself for the linear ones). */
static inline __attribute__((always_inline)) void int8_decode_block(
        const uint8_t *codes, float multiplier, float *out, int64_t len, const float *lut, const int mode) {
    int64_t k = 0;
#if defined(__F16C__) && defined(__AVX2__)
    if (mode == DYN_SIGNED || mode == DYN_UNSIGNED) {
        /* The codes are fp16 patterns cut short (maps.py): widen, shift, convert 8 (16) at once. */
#if NS_AVX512
        const __m512 mul16 = _mm512_set1_ps(multiplier);
        for (; k + 16 <= len; k += 16) {
            __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(codes + k)));
            __m256i pattern = mode == DYN_SIGNED
                ? _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8),
                                  _mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x7F)), 7))
                : _mm256_slli_epi16(c, 7);
            _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_cvtph_ps(pattern), mul16));
        }
#endif
        const __m256 mul = _mm256_set1_ps(multiplier);
        for (; k + 8 <= len; k += 8) {
            __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(codes + k)));
            __m128i pattern = mode == DYN_SIGNED
                ? _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8),
                               _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x7F)), 7))
                : _mm_slli_epi16(c, 7);
            _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtph_ps(pattern), mul));
        }
    }
    if (mode == FP8_SIGNED || mode == FP8_UNSIGNED) {
        /* E5M2 is the top byte of an fp16; E4M3's 7 low bits shifted by 7 are an fp16 of its
         * value times 2**-8 (its subnormals too), and 2**8 * multiplier is exactly the scale,
         * so one rounded product either way, as torch's cast-then-multiply. */
        const __m256 mul = _mm256_set1_ps(mode == FP8_SIGNED ? multiplier * 256.0f : multiplier);
        int special = 0;
#if NS_AVX512
        const __m512 mul16 = _mm512_set1_ps(mode == FP8_SIGNED ? multiplier * 256.0f : multiplier);
        for (; k + 16 <= len; k += 16) {
            __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(codes + k)));
            __m256i low = _mm256_and_si256(c, _mm256_set1_epi16(0x7F));
            __m256i pattern = mode == FP8_SIGNED
                ? _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x80)), 8),
                                  _mm256_slli_epi16(low, 7))
                : _mm256_slli_epi16(c, 8);
            if (mode == FP8_SIGNED)
                special |= _mm256_movemask_epi8(_mm256_cmpeq_epi16(low, _mm256_set1_epi16(0x7F)));
            _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_cvtph_ps(pattern), mul16));
        }
#endif
        for (; k + 8 <= len; k += 8) {
            __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(codes + k)));
            __m128i pattern = mode == FP8_SIGNED
                ? _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8),
                               _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x7F)), 7))
                : _mm_slli_epi16(c, 8);
            if (mode == FP8_SIGNED)
                special |= _mm_movemask_epi8(_mm_cmpeq_epi16(_mm_and_si128(c, _mm_set1_epi16(0x7F)), _mm_set1_epi16(0x7F)));
            _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtph_ps(pattern), mul));
        }
        if (special) /* E4M3's nan codes, never written (a file can still hold them) */
            for (int64_t i = 0; i < k; i++)
                if ((codes[i] & 0x7Fu) == 0x7Fu) out[i] = lut[codes[i]] * multiplier;
    }
#endif
    if (mode == FP8_SIGNED || mode == FP8_UNSIGNED) {
        uint32_t special = 0;
        const uint8_t *restrict cc = codes;
        float *restrict o = out;
        for (int64_t i = k; i < len; i++)
            o[i] = u2f(mode == FP8_SIGNED ? e4m3_bits(cc[i], &special) : e5m2_bits(cc[i], &special)) * multiplier;
        if (special) /* codes above NORM are never written; a file can still hold them */
            for (int64_t i = k; i < len; i++) {
                uint32_t c = cc[i];
                if (mode == FP8_SIGNED ? (c & 0x7Fu) == 0x7Fu : ((c >> 2) & 0x1Fu) == 31u) o[i] = lut[c] * multiplier;
            }
        return;
    }
    if (mode == LIN_SIGNED)
        for (; k < len; k++) out[k] = (float)(int8_t)codes[k] * multiplier;
    else if (mode == LIN_UNSIGNED)
        for (; k < len; k++) out[k] = (float)codes[k] * multiplier;
    else
        for (; k < len; k++) out[k] = lut[codes[k]] * multiplier;
}

#define INT8_DECODE_LOOP(MODE)                                                                       \
    for (int64_t start = 0, b = 0; start < n; start += block, b++) {                                 \
        int64_t len = n - start < block ? n - start : block;                                         \
        int8_decode_block(codes + start, block_multiplier(scales[b], MODE), out + start, len, lut, MODE); \
    }

void ns_int8_decode(const uint8_t *codes, const float *scales, float *out, int64_t n, int64_t block, int mode,
                    const float *lut) {
    switch (mode) {
    case DYN_SIGNED: INT8_DECODE_LOOP(DYN_SIGNED) break;
    case DYN_UNSIGNED: INT8_DECODE_LOOP(DYN_UNSIGNED) break;
    case LIN_SIGNED: INT8_DECODE_LOOP(LIN_SIGNED) break;
    case LIN_UNSIGNED: INT8_DECODE_LOOP(LIN_UNSIGNED) break;
    case FP8_SIGNED: INT8_DECODE_LOOP(FP8_SIGNED) break;
    default: INT8_DECODE_LOOP(FP8_UNSIGNED) break;
    }
}

/* One block of the encoding, for a mode known at compile time (each mode's loops are
 * specialised and vectorised on their own). */
static inline __attribute__((always_inline)) void int8_encode_block(
        float *x, uint8_t *c, float *scale_out, int64_t len, const int mode, const uint8_t *signed_lut,
        const float *lut, int write_back) {
    const int is_unsigned = mode == DYN_UNSIGNED || mode == LIN_UNSIGNED || mode == FP8_UNSIGNED;
    const float norm = mode == DYN_SIGNED ? 1.0f : mode == DYN_UNSIGNED ? 32768.0f : mode == LIN_SIGNED ? 127.0f
                     : mode == LIN_UNSIGNED ? 255.0f : mode == FP8_SIGNED ? 256.0f : 32768.0f;
    /* The block maximum on the patterns: with the sign cleared, their order is the
     * order of the values, and every nan lies above inf. */
    uint32_t top = 0;
    const uint32_t *xu = (const uint32_t *)x;
    for (int64_t k = 0; k < len; k++) {
        uint32_t m = xu[k] & 0x7FFFFFFFu;
        /* torch.threshold(x, 0, 0) for the unsigned maps: x <= 0 (a negative or a zero,
         * not a nan) counts as 0 */
        if (is_unsigned) {
            uint32_t negative = (uint32_t)((int32_t)xu[k] >> 31), nan = 0u - (uint32_t)(m > 0x7F800000u);
            m &= ~negative | nan;
        }
        top = m > top ? m : top;
    }
    /* A nan maximum is stored as the quiet nan (the reference canonicalises it too). */
    float s = top > 0x7F800000u ? u2f(0x7FC00000u) : u2f(top);
    s = s < 0x1p-100f ? 0x1p-100f : s; /* clamp(min=SCALE_FLOOR): nan stays */
    if (mode == LIN_SIGNED || mode == LIN_UNSIGNED) s = (s / norm) * norm;
    *scale_out = s;
    float f = (1.0f / s) * norm;
    if (top >= 0x7F800000u) {
        /* A non-finite block: its codes are of nan_to_num(w, 0, 0, 0) * 0 (1/inf = 0 already;
         * 1/nan = nan -> 0); it decodes as non-finite through its scale. */
        f = isnan(f) ? 0.0f : f;
        for (int64_t k = 0; k < len; k++) {
            float w = is_unsigned ? (x[k] <= 0.0f ? 0.0f : x[k]) : x[k];
            w = isfinite(w) ? w : 0.0f;
            float y = w * f;
            c[k] = mode == DYN_SIGNED ? signed_lut[((f2u(y) + (1u << 19)) >> 20) & 0xFFFu]
                 : mode == FP8_SIGNED ? (uint8_t)((f2u(y) >> 24) & 0x80u) : 0u;
        }
        /* Only the signed dynamic and fp8 maps can give a code other than 0 here: -0.0 (0x80). */
    } else if (mode == DYN_SIGNED) {
        int64_t k = 0;
#if defined(__F16C__) && defined(__AVX2__)
        /* [Note: the signed code without the table] The table of maps.py maps the top 12
         * bits of y + half a code step (sign, exponent, 3 mantissa bits) to a code. The
         * same in registers: v4 = that rounded value (low 20 bits cleared), its magnitude
         * converted to fp16 rounding to nearest even (exact from 2**-14 up; below, the
         * table's fp16 conversion rounds the same way), then rounded to 3 mantissa bits
         * half up, capped at the code of 1.0; tests/test_native.py checks all 4096
         * entries against the table. */
#if NS_AVX512
        {
            const __m512 f16 = _mm512_set1_ps(f);
            for (; k + 16 <= len; k += 16) {
                __m512i bits = _mm512_add_epi32(_mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(x + k), f16)),
                                                _mm512_set1_epi32(1 << 19));
                __m512i sign = _mm512_srli_epi32(bits, 31);
                __m512i v4 = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FF00000));
                __m256i half = _mm512_cvtps_ph(_mm512_castsi512_ps(v4), _MM_FROUND_TO_NEAREST_INT);
                __m512i mag = _mm512_srli_epi32(_mm512_add_epi32(_mm512_cvtepu16_epi32(half), _mm512_set1_epi32(64)), 7);
                mag = _mm512_min_epu32(mag, _mm512_set1_epi32(120));
                _mm_storeu_si128((__m128i *)(c + k), _mm512_cvtepi32_epi8(_mm512_or_si512(_mm512_slli_epi32(sign, 7), mag)));
            }
        }
#endif
        const __m256i f_ = _mm256_castps_si256(_mm256_set1_ps(f));
        for (; k + 8 <= len; k += 8) {
            __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + k), _mm256_castsi256_ps(f_));
            __m256i bits = _mm256_add_epi32(_mm256_castps_si256(y), _mm256_set1_epi32(1 << 19));
            __m256i sign = _mm256_srli_epi32(bits, 31);
            __m256i v4 = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FF00000));
            __m128i half = _mm256_cvtps_ph(_mm256_castsi256_ps(v4), _MM_FROUND_TO_NEAREST_INT);
            __m256i mag = _mm256_srli_epi32(_mm256_add_epi32(_mm256_cvtepu16_epi32(half), _mm256_set1_epi32(64)), 7);
            mag = _mm256_min_epu32(mag, _mm256_set1_epi32(120));
            __m256i code = _mm256_or_si256(_mm256_slli_epi32(sign, 7), mag);
            /* 8 int32 codes -> 8 bytes */
            __m128i lo16 = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
            _mm_storel_epi64((__m128i *)(c + k), _mm_packus_epi16(lo16, lo16));
        }
#endif
        for (; k < len; k++) c[k] = signed_lut[((f2u(x[k] * f) + (1u << 19)) >> 20) & 0xFFFu];
    } else if (mode == DYN_UNSIGNED) {
        for (int64_t k = 0; k < len; k++) {
            float w = x[k] <= 0.0f ? 0.0f : x[k];
            int32_t bits = (int32_t)f2u(w * f);
            /* bits >= 0, so the sum cannot wrap; >> on a negative int32 is arithmetic in gcc and clang */
            int32_t index = (bits + ((1 << 19) - (896 << 20))) >> 20;
            index = index < 8 ? 8 : index;
            index = index > 240 ? 240 : index;
            index = index < bits ? index : bits;
            c[k] = (uint8_t)index;
        }
    } else if (mode == FP8_SIGNED) {
        for (int64_t k = 0; k < len; k++) {
            uint32_t y = f2u(x[k] * f);
            c[k] = (uint8_t)((y >> 24 & 0x80u) | e4m3_magnitude(y & 0x7FFFFFFFu));
        }
    } else if (mode == FP8_UNSIGNED) {
        int64_t k = 0;
#if NS_AVX512
        {
            const __m512 f16 = _mm512_set1_ps(f), zero = _mm512_setzero_ps();
            for (; k + 16 <= len; k += 16) {
                __m512 xv = _mm512_loadu_ps(x + k);
                __m512 yv = _mm512_mul_ps(_mm512_mask_mov_ps(xv, _mm512_cmp_ps_mask(xv, zero, _CMP_LE_OQ), zero), f16);
                __m512i m = _mm512_castps_si512(yv);
                __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(yv, _mm512_set1_ps(65536.0f)));
                __m512i normal = _mm512_sub_epi32(
                    _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(m, _mm512_set1_epi32(0xFFFFF)),
                                                       _mm512_and_si512(_mm512_srli_epi32(m, 21), _mm512_set1_epi32(1))), 21),
                    _mm512_set1_epi32(112 << 2));
                __m512i code = _mm512_mask_mov_epi32(normal, _mm512_cmplt_epu32_mask(m, _mm512_set1_epi32(113 << 23)), sub);
                /* a non-zero second moment never decodes to 0 */
                __mmask16 lift = _mm512_cmpeq_epi32_mask(code, _mm512_setzero_si512()) & _mm512_cmp_ps_mask(yv, zero, _CMP_GT_OQ);
                code = _mm512_mask_mov_epi32(code, lift, _mm512_set1_epi32(1));
                _mm_storeu_si128((__m128i *)(c + k), _mm512_cvtepi32_epi8(code));
            }
        }
#endif
        for (; k < len; k++) {
            float w = x[k] <= 0.0f ? 0.0f : x[k];
            float y = w * f;
            uint32_t code = e5m2_magnitude(f2u(y));
            c[k] = (uint8_t)(code == 0u && y > 0.0f ? 1u : code); /* a non-zero second moment never decodes to 0 */
        }
    } else if (mode == LIN_SIGNED) {
        for (int64_t k = 0; k < len; k++) c[k] = (uint8_t)(int8_t)(int32_t)nearbyintf(x[k] * f);
    } else {
        for (int64_t k = 0; k < len; k++) {
            float w = x[k] <= 0.0f ? 0.0f : x[k];
            float y = w * f;
            float r = nearbyintf(y);
            r = r < 1.0f ? 1.0f : r;
            float up = ceilf(y);
            c[k] = (uint8_t)(int32_t)(r < up ? r : up);
        }
    }
    if (write_back) int8_decode_block(c, block_multiplier(s, mode), x, len, lut, mode);
}

#define INT8_ENCODE_LOOP(MODE)                                                                       \
    for (int64_t start = 0, b = 0; start < n; start += block, b++) {                                 \
        int64_t len = n - start < block ? n - start : block;                                         \
        int8_encode_block(values + start, codes + start, scales + b, len, MODE, signed_lut, lut, write_back); \
    }

/* Encode values[0..n) into codes and one scale per block; with write_back, values
 * become what decode gives. signed_lut: the 4096-entry table of maps.py. */
void ns_int8_encode(float *values, uint8_t *codes, float *scales, int64_t n, int64_t block, int mode,
                    const uint8_t *signed_lut, const float *lut, int write_back) {
    switch (mode) {
    case DYN_SIGNED: INT8_ENCODE_LOOP(DYN_SIGNED) break;
    case DYN_UNSIGNED: INT8_ENCODE_LOOP(DYN_UNSIGNED) break;
    case LIN_SIGNED: INT8_ENCODE_LOOP(LIN_SIGNED) break;
    case LIN_UNSIGNED: INT8_ENCODE_LOOP(LIN_UNSIGNED) break;
    case FP8_SIGNED: INT8_ENCODE_LOOP(FP8_SIGNED) break;
    default: INT8_ENCODE_LOOP(FP8_UNSIGNED) break;
    }
}

/* ---- 16-bit moments (moments.py, Bf16Moments) -------------------------------------- */

/* torch's float -> bfloat16 cast: round to nearest even; every nan becomes 0xFFFF (what the
 * CPU kernels of torch 2.13 write). Second moments first become threshold(x, 0, 0) and, where
 * positive, at least 2**-133 (the smallest positive bf16), so they never round to 0. */
static inline uint16_t bf16_round(uint32_t b) {
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFu;
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

#if NS_AVX512
static inline __m256i bf16_round16(__m512i b) {
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)),
                                                   _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))), 16);
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0xFFFF)));
}
#endif

void ns_bf16m_encode(float *values, uint16_t *hi, int64_t n, int is_unsigned, int write_back) {
    uint32_t *v = (uint32_t *)values;
    int64_t k = 0;
#if NS_AVX512
    if (is_unsigned) {
        const __m512 zero = _mm512_setzero_ps();
        const __m512i smallest = _mm512_set1_epi32(1 << 16);
        for (; k + 16 <= n; k += 16) {
            __m512 x = _mm512_loadu_ps(values + k);
            __m512i b = _mm512_castps_si512(_mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, zero, _CMP_LE_OQ), zero));
            __mmask16 tiny = _mm512_test_epi32_mask(b, b) & _mm512_cmplt_epu32_mask(b, smallest);
            _mm256_storeu_si256((__m256i *)(hi + k), bf16_round16(_mm512_mask_mov_epi32(b, tiny, smallest)));
        }
    }
#endif
    if (is_unsigned) {
        for (; k < n; k++) {
            float w = values[k] <= 0.0f ? 0.0f : values[k];
            uint32_t b = f2u(w);
            b = (b != 0u && b < 1u << 16) ? 1u << 16 : b; /* max(w, 2**-133) for 0 < w; nan and inf keep */
            hi[k] = bf16_round(b);
        }
    } else {
        for (; k < n; k++) hi[k] = bf16_round(v[k]);
    }
    if (write_back)
        for (int64_t k = 0; k < n; k++) v[k] = (uint32_t)hi[k] << 16;
}

/* ---- the fused Adam pass (engine.py, [Note: one pass per chunk]) -------------------- */

/* [Note: Adam in the codecs' pass] For Adam and AdamW without per-tensor guards, the device's
 * pass over a compressed slice decodes a tile of each state tensor into L1-sized fp32 buffers,
 * updates it and encodes it back, in one C call per piece of a segment: the fp32 copies never
 * leave the cache and no Python runs between the steps. The update is torch's fused CPU kernel
 * (torch._fused_adam_/_fused_adamw_) element for element: the same IEEE operations in the same
 * order, with a fused multiply-add exactly where torch's vector loop has one (the lerp of the
 * first moment, written as one in torch's source, and the second moment's
 * beta2 * v + (1 - beta2) * g * g, which torch's build contracts). Every element here is one
 * that torch computes in its vector loop: torch's scalar tail (the last n % lanes elements of
 * each tensor it is given) rounds differently, and the engine gives those to torch itself.
 * Lanes are independent, so the width this loop is compiled for does not change a bit.
 * native.py checks the result against torch on first use and does not use this pass where
 * they differ (another torch build); tests/test_native.py compares it on fresh random inputs. */

enum { PART_FP32 = 0, PART_BF16_SR = 1, PART_KAHAN = 2, PART_INT8 = 3, PART_BF16M = 4 };

typedef struct {
    int32_t kind;           /* PART_* */
    int32_t mode;           /* PART_INT8: the codec's mode; PART_BF16M: 1 for an unsigned moment */
    int64_t block;          /* PART_INT8: elements per scale */
    char *data;             /* element 0 of the file's region (values or codes) */
    char *aux;              /* PART_KAHAN: the low bytes; PART_INT8: the scales */
    const void *table;      /* PART_INT8: the decode table; masters: the noise table */
    const void *signed_lut; /* PART_INT8: the signed encode table */
} ns_part;

/* constants, as torch's kernel casts them to float: see native.py, _adam_constants */
enum { C_DECAY, C_L2, C_COEFF, C_BETA2, C_SQ_WEIGHT, C_BIAS2_SQRT, C_EPS, C_NEG_STEP, C_COUNT };
enum { F_DECAY = 1, F_L2 = 2, F_SMALL_LERP = 4 };

static inline __attribute__((always_inline)) void adam_elements(
        float *restrict p, float *restrict m, float *restrict v, const float *restrict g, int64_t n,
        const float *restrict c, const int flags) {
    const float decay = c[C_DECAY], l2 = c[C_L2], coeff = c[C_COEFF], beta2 = c[C_BETA2], sq = c[C_SQ_WEIGHT],
                bias2 = c[C_BIAS2_SQRT], eps = c[C_EPS], neg_step = c[C_NEG_STEP];
    for (int64_t i = 0; i < n; i++) {
        float pi = p[i], gi = g[i], mi = m[i];
        if (flags & F_DECAY) pi = pi * decay;
        if (flags & F_L2) gi = fmaf(pi, l2, gi);
        mi = fmaf(coeff, gi - mi, (flags & F_SMALL_LERP) ? mi : gi);
        float vi = fmaf(sq * gi, gi, v[i] * beta2);
        float denom = sqrtf(vi) / bias2 + eps;
        p[i] = pi + (neg_step * mi) / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

#define ADAM_CASE(F) case F: adam_elements(p, m, v, g, n, c, F); break;
#define ADAM_CASES(F) ADAM_CASE(F) ADAM_CASE(F | F_SMALL_LERP)

/* one loop per combination of flags (each compiled with its branches taken out) */
static void adam_dispatch(float *p, float *m, float *v, const float *g, int64_t n, const float *c, int flags) {
    switch (flags) {
    ADAM_CASES(0) ADAM_CASES(F_DECAY) ADAM_CASES(F_L2)
    default: adam_elements(p, m, v, g, n, c, flags); break;
    }
}

/* The fp32 values of elements [t0, t0 + n) of a part: the file's own memory, or `work` decoded. */
static float *part_decode(const ns_part *part, int64_t t0, int64_t n, float *work) {
    switch (part->kind) {
    case PART_FP32: return (float *)part->data + t0;
    case PART_BF16_SR: case PART_BF16M: ns_bf16_decode((const uint16_t *)part->data + t0, work, n); return work;
    case PART_KAHAN:
        ns_kahan_decode((const uint16_t *)part->data + t0, (const uint8_t *)part->aux + t0, work, n);
        return work;
    default:
        ns_int8_decode((const uint8_t *)part->data + t0, (const float *)part->aux + t0 / part->block, work, n,
                       part->block, part->mode, (const float *)part->table);
        return work;
    }
}

static void part_encode(const ns_part *part, int64_t t0, int64_t n, float *values, uint64_t seed) {
    switch (part->kind) {
    case PART_FP32: return;
    case PART_BF16_SR:
        ns_master_encode(values, (uint16_t *)part->data + t0, NULL, n, seed, t0, (const uint16_t *)part->table, 16);
        return;
    case PART_KAHAN:
        ns_master_encode(values, (uint16_t *)part->data + t0, (uint8_t *)part->aux + t0, n, seed, t0,
                         (const uint16_t *)part->table, 8);
        return;
    case PART_BF16M: ns_bf16m_encode(values, (uint16_t *)part->data + t0, n, part->mode, 0); return;
    default:
        ns_int8_encode(values, (uint8_t *)part->data + t0, (float *)part->aux + t0 / part->block, n, part->block,
                       part->mode, (const uint8_t *)part->signed_lut, (const float *)part->table, 0);
    }
}

/* Ask for the bytes of elements [t0, t0 + tile) ahead of their use: between the decodes, the update
 * and the encodes no stream stays long enough for the hardware prefetcher, and the gradient
 * comes from memory (the pass's checksums brought the state's bytes into cache, not it). */
static void prefetch_tile(const ns_part *parts, const float *grad, int64_t lo, int64_t hi, int64_t t0, int64_t b,
                          int64_t tile) {
    if (t0 >= b) return;
    int64_t n = b - t0 < tile ? b - t0 : tile;
    int64_t u0 = lo > t0 ? lo : t0, u1 = hi < t0 + n ? hi : t0 + n;
    for (int64_t e = u0; e < u1; e += 16) __builtin_prefetch(grad + (e - lo), 0, 3);
    for (int k = 0; k < 3; k++) {
        const ns_part *part = parts + k;
        if (part->kind == PART_FP32) continue; /* read and written in place in one stream: the hardware's */
        int64_t size = part->kind == PART_INT8 ? 1 : 2;
        for (int64_t e = t0; e < t0 + n; e += 64 / size) __builtin_prefetch(part->data + e * size, 1, 3);
        if (part->kind == PART_KAHAN)
            for (int64_t e = t0; e < t0 + n; e += 64) __builtin_prefetch(part->aux + e, 1, 3);
    }
}

/* Decode elements [a, b) of the three parts (master, exp_avg, exp_avg_sq), update elements
 * [lo, hi) with the gradient `grad` (its element 0 is element lo) and encode [a, b) back. A
 * blocked part (8-bit or fp8 codes with a scale per block) is decoded and encoded `tile` elements
 * at a time, whole blocks, since a block's scale comes from all its elements; the others `sub`
 * elements at a time within that, in one small buffer each, and before each such piece the
 * same piece of the next tile is prefetched. Small pieces of fp32 keep more of the working set
 * in L1 beside the gradient and the codes, and spread the prefetches out: on the development VM
 * (48 KiB L1), 512-element pieces made the pass 10-22% faster than whole 2,048-element tiles for
 * the unblocked formats and, with the prefetches spread per piece, 12-16% for the blocked ones
 * (docs/benchmarks.md, 2026-12-04). a and the tile are on the parts' blocks; b is on one or the
 * file's end; `tile` is a multiple of `sub` and of every block. `work` holds 3 * tile floats. */
void ns_adam_pass(const ns_part *parts, int64_t a, int64_t b, int64_t lo, int64_t hi, const float *grad,
                  const float *c, int flags, uint64_t seed, float *work, int64_t tile, int64_t sub) {
    int blocked[3];
    for (int k = 0; k < 3; k++) blocked[k] = parts[k].kind == PART_INT8;
    for (int64_t t0 = a; t0 < b; t0 += tile) {
        int64_t n = b - t0 < tile ? b - t0 : tile;
        float *x[3];
        for (int k = 0; k < 3; k++)
            if (blocked[k]) x[k] = part_decode(parts + k, t0, n, work + k * tile);
        for (int64_t s0 = t0; s0 < t0 + n; s0 += sub) {
            int64_t m = t0 + n - s0 < sub ? t0 + n - s0 : sub;
            prefetch_tile(parts, grad, lo, hi, s0 + tile, b, sub);
            float *y[3];
            for (int k = 0; k < 3; k++)
                y[k] = blocked[k] ? x[k] + (s0 - t0) : part_decode(parts + k, s0, m, work + k * tile);
            int64_t u0 = lo > s0 ? lo : s0, u1 = hi < s0 + m ? hi : s0 + m;
            if (u0 < u1)
                adam_dispatch(y[0] + (u0 - s0), y[1] + (u0 - s0), y[2] + (u0 - s0), grad + (u0 - lo), u1 - u0, c,
                              flags);
            for (int k = 0; k < 3; k++)
                if (!blocked[k]) part_encode(parts + k, s0, m, y[k], seed);
        }
        for (int k = 0; k < 3; k++)
            if (blocked[k]) part_encode(parts + k, t0, n, x[k], seed);
    }
}

/* The fused element loop alone, on fp32 arrays: native.py's check against torch, and the tests. */
void ns_adam_elements(float *p, float *m, float *v, const float *g, int64_t n, const float *c, int flags) {
    adam_dispatch(p, m, v, g, n, c, flags);
}
