/* The integer runtime's passes around its kernels, one loop each (`export.passes`).
 *
 * quantize: codes of a float input, u = clamp(rint(x / delta) + z, qmin, qmax) + offset, written as
 *           uint8 u or as float32 or bfloat16 u - sub (the float path's operand; |u - sub| <= 256 is exact in
 *           bfloat16, and the caller keeps it there), in either memory layout;
 * rescale:  ((acc * dx) * ws[c]) + b[c] ("sequential") or (acc * (dx * ws[c])) + b[c] ("combined") of
 *           an exact accumulator (float32, int32 or bfloat16), written as float32 or bfloat16, in either
 *           layout; for a bfloat16 output the accumulator is first rounded to bfloat16 (as a bf16 product
 *           returns it, `quant.integer.round_accumulator`).
 *
 * The same IEEE operations in the same order as PyTorch's eager ops (`IntLayer.quantize_input`,
 * `quant.integer.rescale`): correctly rounded division and products, round half to even, exact
 * integer additions, bfloat16 rounded to nearest even (NaN to 0x7FC0, as c10::BFloat16). Built
 * without FMA contraction and without unsafe math (-ffp-contract=off, no -ffast-math), so the
 * bits are those of the eager ops on every CPU. A tensor is seen as [n, c, hw]: "channels last"
 * means memory order [n, hw, c] (a linear's [rows, features] is n = rows, hw = 1).
 */
#include <math.h>
#include <omp.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    if (f != f) return 0x7FC0;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float load(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline float code(float v, float delta, float z, float qmin, float qmax) {
    float q = rintf(v / delta) + z;
    return q < qmin ? qmin : (q > qmax ? qmax : q);
}

#define TILE 16 /* a layout change runs over TILE x TILE blocks of (channel, position): both sides stay in cache */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* t = the transpose of the TILE x TILE block s (exact: values are only moved). */
ALWAYS_INLINE void transpose_tile(float s[TILE][TILE], float t[TILE][TILE]) {
#ifdef __AVX__
    for (int bi = 0; bi < TILE; bi += 8)
        for (int bj = 0; bj < TILE; bj += 8) { /* one 8 x 8 block: unpack, shuffle, swap 128-bit lanes */
            __m256 r[8], u[8], v[8];
            for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(&s[bi + k][bj]);
            for (int k = 0; k < 8; k += 2) {
                u[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
                u[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
            }
            for (int k = 0; k < 8; k += 4) {
                v[k] = _mm256_shuffle_ps(u[k], u[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
                v[k + 1] = _mm256_shuffle_ps(u[k], u[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
                v[k + 2] = _mm256_shuffle_ps(u[k + 1], u[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
                v[k + 3] = _mm256_shuffle_ps(u[k + 1], u[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            for (int k = 0; k < 4; k++) {
                _mm256_storeu_ps(&t[bj + k][bi], _mm256_permute2f128_ps(v[k], v[k + 4], 0x20));
                _mm256_storeu_ps(&t[bj + k + 4][bi], _mm256_permute2f128_ps(v[k], v[k + 4], 0x31));
            }
        }
#else
    for (int j = 0; j < TILE; j++)
        for (int k = 0; k < TILE; k++) t[j][k] = s[k][j];
#endif
}

/* A layout change of image-major [n, c, hw] data, by TILE x TILE tiles of (channel, position), over the
 * (image, channel tile) pairs [it0, it1) (one thread's share), each walking all positions (so every source
 * and destination row is read or written as a stream: faster than walking the channel tiles of one position
 * tile on 16x16 and larger activations, slower on 8x8 ones, `benchmarks/passes.py --against d71beb0`):
 * the float VALUE(k, ch, pos) of the source element at index k (channel ch, position pos = image * hw + its
 * position) is computed along the source's
 * contiguous dimension (so the arithmetic vectorises) into a tile kept in that order, transposed
 * (`transpose_tile`), then STORE(k, v) writes each value at its destination index, along the
 * destination's contiguous dimension. */
#define TILED_LAYOUT_CHANGE(src_cl, dst_cl, VALUE, STORE, it0, it1) /* src_cl != dst_cl */                           \
    do {                                                                                                               \
        int64_t c_tiles_ = (c + TILE - 1) / TILE;                                                                      \
        for (int64_t it_ = (it0); it_ < (it1); it_++) {                                                                \
            int64_t i = it_ / c_tiles_, c0 = it_ % c_tiles_ * TILE;                                                    \
            for (int64_t s0 = 0; s0 < hw; s0 += TILE) {                                                                \
                int64_t ns = s0 + TILE < hw ? TILE : hw - s0;                                                          \
                int64_t nc = c0 + TILE < c ? TILE : c - c0;                                                            \
                /* src_: [position][channel] from channels-last, else [channel][position]; dst_ the other way */       \
                float src_[TILE][TILE], dst_[TILE][TILE];                                                              \
                if (ns < TILE || nc < TILE) memset(src_, 0, sizeof src_);                                              \
                if (src_cl)                                                                                            \
                    for (int64_t b = 0; b < ns; b++)                                                                   \
                        for (int64_t a = 0; a < nc; a++)                                                               \
                            src_[b][a] = VALUE((i * hw + s0 + b) * c + c0 + a, c0 + a, i * hw + s0 + b);               \
                else                                                                                                   \
                    for (int64_t a = 0; a < nc; a++)                                                                   \
                        for (int64_t b = 0; b < ns; b++)                                                               \
                            src_[a][b] = VALUE((i * c + c0 + a) * hw + s0 + b, c0 + a, i * hw + s0 + b);               \
                transpose_tile(src_, dst_);                                                                            \
                if (dst_cl)                                                                                            \
                    for (int64_t b = 0; b < ns; b++)                                                                   \
                        for (int64_t a = 0; a < nc; a++)                                                               \
                            STORE((i * hw + s0 + b) * c + c0 + a, dst_[b][a]);                                         \
                else                                                                                                   \
                    for (int64_t a = 0; a < nc; a++)                                                                   \
                        for (int64_t b = 0; b < ns; b++)                                                               \
                            STORE((i * c + c0 + a) * hw + s0 + b, dst_[a][b]);                                         \
            }                                                                                                          \
        }                                                                                                              \
    } while (0)

/* Each pass runs one `omp parallel` region in which every thread takes its share [lo, hi) of `items` and
 * calls the pass's `*_part_of`: a switch over the flags that calls an always-inlined `*_part` with
 * constant flags, so each combination compiles to its own loops with no branch inside and the
 * same-layout loops vectorise. (GCC outlines an `omp parallel` body before it inlines, so flags handed
 * into the body stay variables there: with a bf16 accumulator's 2-byte load and the bf16 rounding behind
 * such variables, no rescale loop vectorised, 4-7x slower.) */
#define PARALLEL_PARTS(items, PART_OF)                                                                                 \
    do {                                                                                                               \
        const int64_t items_ = (items);                                                                                \
        _Pragma("omp parallel")                                                                                        \
        {                                                                                                              \
            const int64_t per_ = (items_ + omp_get_num_threads() - 1) / omp_get_num_threads();                        \
            const int64_t lo = omp_get_thread_num() * per_, hi = lo + per_ < items_ ? lo + per_ : items_;              \
            if (lo < hi) PART_OF;                                                                                      \
        }                                                                                                              \
    } while (0)

/* quantize's outputs */
#define OUT_U8 0
#define OUT_F32 1
#define OUT_BF16 2

ALWAYS_INLINE void put_code(void *out, int64_t k, float u, float sub, const int out_kind) {
    if (out_kind == OUT_F32)
        ((float *)out)[k] = u - sub;
    else if (out_kind == OUT_BF16)
        ((uint16_t *)out)[k] = f32_to_bf16(u - sub);
    else
        ((uint8_t *)out)[k] = (uint8_t)(int32_t)u;
}

/* Same layout (`flat`): elements [lo, hi) in memory order; else (image, channel tile) pairs [lo, hi). */
ALWAYS_INLINE void quantize_part(const void *x, const int x_bf16, const int x_cl, const int flat, int64_t lo,
                                 int64_t hi, int64_t c, int64_t hw, float delta, float z, float qmin, float qmax,
                                 float offset, float sub, void *out, const int out_kind, const int out_cl) {
    if (flat) {
        for (int64_t k = lo; k < hi; k++)
            put_code(out, k, code(load(x, x_bf16, k), delta, z, qmin, qmax) + offset, sub, out_kind);
        return;
    }
#define CODE(k, ch, pos) (code(load(x, x_bf16, k), delta, z, qmin, qmax) + offset)
#define PUT(k, v) put_code(out, k, v, sub, out_kind)
    TILED_LAYOUT_CHANGE(x_cl, out_cl, CODE, PUT, lo, hi);
#undef CODE
#undef PUT
}

static void quantize_part_of(const void *x, int x_bf16, int x_cl, int flat, int64_t lo, int64_t hi, int64_t c,
                             int64_t hw, float delta, float z, float qmin, float qmax, float offset,
                             float sub, void *out, int out_kind, int out_cl) {
    switch (out_kind * 8 | (x_bf16 ? 4 : 0) | (x_cl ? 2 : 0) | (out_cl ? 1 : 0)) {
#define Q(F, B, L, O)                                                                                                  \
    case F * 8 | B * 4 | L * 2 | O:                                                                                    \
        if (flat)                                                                                                      \
            quantize_part(x, B, L, 1, lo, hi, c, hw, delta, z, qmin, qmax, offset, sub, out, F, O);                    \
        else                                                                                                           \
            quantize_part(x, B, L, 0, lo, hi, c, hw, delta, z, qmin, qmax, offset, sub, out, F, O);                    \
        break;
#define Q4(F, B) Q(F, B, 0, 0) Q(F, B, 0, 1) Q(F, B, 1, 0) Q(F, B, 1, 1)
        Q4(OUT_U8, 0) Q4(OUT_U8, 1) Q4(OUT_F32, 0) Q4(OUT_F32, 1) Q4(OUT_BF16, 0) Q4(OUT_BF16, 1)
#undef Q4
#undef Q
    }
}

void lbd_quantize(const void *x, int x_bf16, int x_cl, int64_t n, int64_t c, int64_t hw, float delta, float z,
                  float qmin, float qmax, float offset, float sub, void *out, int out_kind, int out_cl) {
    const int flat = x_cl == out_cl || hw == 1 || c == 1; /* same memory order: one flat loop */
    PARALLEL_PARTS(flat ? n * c * hw : n * ((c + TILE - 1) / TILE),
                   quantize_part_of(x, x_bf16, x_cl, flat, lo, hi, c, hw, delta, z, qmin, qmax, offset, sub, out,
                                    out_kind, out_cl));
}

/* acc kinds */
#define ACC_F32 0
#define ACC_I32 1
#define ACC_BF16 2
#define ACC_SHIFTED 3 /* float32 plus a shifted layer's correction: acc + w_off[c] * sums[pos] (`IntLayer`) */
#define ACC_BORDER 4  /* float32 plus a zero-point-free call's map: acc + map[p * c + ch] (p: position in image) */
#define ACC_BORDER_SHIFTED 5 /* both: (acc + map[p * c + ch]) + w_off[c] * sums[pos] */

/* The corrections (else unused): a shifted layer's per-channel w_off and per-position sums; a zero-point-free
 * kernel call's map, [hw, c] per image (`IntConv2d`). */
typedef struct {
    const float *w_off, *sums, *map;
} corrections_t;

ALWAYS_INLINE float scaled(const void *acc, const int acc_kind, int64_t src, int64_t pos, int64_t p, corrections_t sh,
                           int64_t c, float dx, float ws, const float *bias, int64_t ch, const int has_bias,
                           const int combined, const int out_bf16) {
    float a = acc_kind == ACC_I32 ? (float)((const int32_t *)acc)[src]
            : acc_kind == ACC_BF16 ? bf16_to_f32(((const uint16_t *)acc)[src])
                                   : ((const float *)acc)[src];
    if (acc_kind == ACC_BORDER || acc_kind == ACC_BORDER_SHIFTED) a = a + sh.map[p * c + ch];
    if (acc_kind == ACC_SHIFTED || acc_kind == ACC_BORDER_SHIFTED) a = a + sh.w_off[ch] * sh.sums[pos];
    if (out_bf16 && acc_kind != ACC_BF16) a = bf16_to_f32(f32_to_bf16(a)); /* the bf16 rule: acc to bf16 first */
    float v = combined ? a * (dx * ws) : (a * dx) * ws;
    return has_bias ? v + bias[ch] : v;
}

ALWAYS_INLINE void put_value(void *out, int64_t k, float v, const int out_bf16) {
    if (out_bf16)
        ((uint16_t *)out)[k] = f32_to_bf16(v);
    else
        ((float *)out)[k] = v;
}

/* How a rescale walks memory: channels-last rows of c values (a linear's rows too) or NCHW runs of hw positions
 * of channel r % c where both sides have the same memory order, else tiles (a layout change). */
#define ROWS_CL 0
#define RUNS_NCHW 1
#define TILES 2

/* Rows / runs [lo, hi), or (image, channel tile) pairs [lo, hi). */
ALWAYS_INLINE void rescale_part(const void *acc, const int acc_kind, corrections_t sh, const int acc_cl, const int walk,
                                int64_t lo, int64_t hi, int64_t c, int64_t hw, float dx, const float *ws,
                                const float *bias, const int has_bias, const int combined, void *out,
                                const int out_bf16, const int out_cl) {
    if (walk == ROWS_CL) { /* row r is position r */
        for (int64_t r = lo; r < hi; r++) {
            const int64_t p = r % hw;
            for (int64_t ch = 0; ch < c; ch++)
                put_value(out, r * c + ch,
                          scaled(acc, acc_kind, r * c + ch, r, p, sh, c, dx, ws[ch], bias, ch, has_bias, combined,
                                 out_bf16),
                          out_bf16);
        }
        return;
    }
    if (walk == RUNS_NCHW) { /* run r: image r / c, channel r % c */
        for (int64_t r = lo; r < hi; r++) {
            const int64_t ch = r % c, p0 = r / c * hw;
            const float w = ws[ch];
            for (int64_t s = 0; s < hw; s++)
                put_value(out, r * hw + s,
                          scaled(acc, acc_kind, r * hw + s, p0 + s, s, sh, c, dx, w, bias, ch, has_bias, combined,
                                 out_bf16),
                          out_bf16);
        }
        return;
    }
#define SCALED(k, ch, pos) \
    scaled(acc, acc_kind, k, pos, (pos) % hw, sh, c, dx, ws[ch], bias, ch, has_bias, combined, out_bf16)
#define PUT(k, v) put_value(out, k, v, out_bf16)
    TILED_LAYOUT_CHANGE(acc_cl, out_cl, SCALED, PUT, lo, hi);
#undef SCALED
#undef PUT
}

static void rescale_part_of(const void *acc, int acc_kind, corrections_t sh, int acc_cl, int walk, int64_t lo,
                            int64_t hi, int64_t c, int64_t hw, float dx, const float *ws, const float *bias,
                            int has_bias, int combined, void *out,
                            int out_bf16) { /* a layout change's output: the other layout */
    switch (acc_kind * 16 | (has_bias ? 8 : 0) | (combined ? 4 : 0) | (out_bf16 ? 2 : 0) | (acc_cl ? 1 : 0)) {
#define R(A, B, C, O, L)                                                                                               \
    case A * 16 | B * 8 | C * 4 | O * 2 | L:                                                                           \
        if (walk == ROWS_CL)                                                                                           \
            rescale_part(acc, A, sh, L, ROWS_CL, lo, hi, c, hw, dx, ws, bias, B, C, out, O, 1);                        \
        else if (walk == RUNS_NCHW)                                                                                    \
            rescale_part(acc, A, sh, L, RUNS_NCHW, lo, hi, c, hw, dx, ws, bias, B, C, out, O, 0);                      \
        else                                                                                                           \
            rescale_part(acc, A, sh, L, TILES, lo, hi, c, hw, dx, ws, bias, B, C, out, O, !L);                         \
        break;
#define R8(A) R(A, 0, 0, 0, 0) R(A, 0, 0, 0, 1) R(A, 0, 0, 1, 0) R(A, 0, 0, 1, 1) \
              R(A, 0, 1, 0, 0) R(A, 0, 1, 0, 1) R(A, 0, 1, 1, 0) R(A, 0, 1, 1, 1) \
              R(A, 1, 0, 0, 0) R(A, 1, 0, 0, 1) R(A, 1, 0, 1, 0) R(A, 1, 0, 1, 1) \
              R(A, 1, 1, 0, 0) R(A, 1, 1, 0, 1) R(A, 1, 1, 1, 0) R(A, 1, 1, 1, 1)
        R8(ACC_F32) R8(ACC_I32) R8(ACC_BF16) R8(ACC_SHIFTED) R8(ACC_BORDER) R8(ACC_BORDER_SHIFTED)
#undef R8
#undef R
    }
}

/* `w_off` and `sums`: ACC_SHIFTED's correction, `map`: ACC_BORDER's (else null). */
void lbd_rescale(const void *acc, int acc_kind, int acc_cl, int64_t n, int64_t c, int64_t hw, float dx,
                 const float *ws, const float *bias, int combined, void *out, int out_bf16, int out_cl,
                 const float *w_off, const float *sums, const float *map) {
    /* the same memory order on both sides: rows of c or runs of hw (either way where hw or c is 1) */
    const int walk = !(acc_cl == out_cl || hw == 1 || c == 1) ? TILES
                   : (hw == 1 ? ROWS_CL : (c == 1 ? RUNS_NCHW : (out_cl ? ROWS_CL : RUNS_NCHW)));
    const int64_t items = walk == ROWS_CL ? n * hw : (walk == RUNS_NCHW ? n * c : n * ((c + TILE - 1) / TILE));
    const corrections_t sh = {w_off, sums, map};
    PARALLEL_PARTS(items, rescale_part_of(acc, acc_kind, sh, acc_cl, walk, lo, hi, c, hw, dx, ws, bias, bias != 0,
                                          combined, out, out_bf16));
}

/* channel_sums: out[pos] = sum over the c channels of (u - zx) at each of the n * hw positions of uint8 codes u
 * (a shifted layer's sums, `int_runtime.window_sums`), as float32: exact, the integer sum is below 2^24 (the
 * caller checks c * 255). */
#define SUM_BLOCK 1024
ALWAYS_INLINE void channel_sums_part(const uint8_t *u, const int u_cl, int64_t lo, int64_t hi, int64_t c, int64_t hw,
                                     int32_t zx, float *out) {
    if (u_cl) { /* positions [lo, hi): a row of c codes each */
        for (int64_t p = lo; p < hi; p++) {
            int32_t s = 0;
            for (int64_t ch = 0; ch < c; ch++) s += u[p * c + ch];
            out[p] = (float)(s - (int32_t)c * zx);
        }
        return;
    }
    for (int64_t it = lo; it < hi; it++) { /* (image, block of SUM_BLOCK positions) pairs: add up the planes */
        const int64_t blocks = (hw + SUM_BLOCK - 1) / SUM_BLOCK, i = it / blocks, p0 = it % blocks * SUM_BLOCK;
        const int64_t np = p0 + SUM_BLOCK < hw ? SUM_BLOCK : hw - p0;
        int32_t acc[SUM_BLOCK];
        for (int64_t p = 0; p < np; p++) acc[p] = 0;
        for (int64_t ch = 0; ch < c; ch++)
            for (int64_t p = 0; p < np; p++) acc[p] += u[(i * c + ch) * hw + p0 + p];
        for (int64_t p = 0; p < np; p++) out[i * hw + p0 + p] = (float)(acc[p] - (int32_t)c * zx);
    }
}

void lbd_channel_sums(const uint8_t *u, int u_cl, int64_t n, int64_t c, int64_t hw, int32_t zx, float *out) {
    if (u_cl)
        PARALLEL_PARTS(n * hw, channel_sums_part(u, 1, lo, hi, c, hw, zx, out));
    else
        PARALLEL_PARTS(n * ((hw + SUM_BLOCK - 1) / SUM_BLOCK), channel_sums_part(u, 0, lo, hi, c, hw, zx, out));
}
