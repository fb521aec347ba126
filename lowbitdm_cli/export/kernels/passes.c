/* The integer runtime's passes around its kernels, one loop each (`export.passes`).
 *
 * quantize: codes of a float input, u = clamp(rint(x / delta) + z, qmin, qmax) + offset, written as
 *           uint8 u or as float32 u - sub (the float path's operand), in either memory layout;
 * rescale:  ((acc * dx) * ws[c]) + b[c] ("sequential") or (acc * (dx * ws[c])) + b[c] ("combined") of
 *           an exact accumulator (float32 or int32), written as float32 or bfloat16, in either layout.
 *
 * The same IEEE operations in the same order as PyTorch's eager ops (`IntLayer.quantize_input`,
 * `quant.integer.rescale`): correctly rounded division and products, round half to even, exact
 * integer additions, bfloat16 rounded to nearest even (NaN to 0x7FC0, as c10::BFloat16). Built
 * without FMA contraction and without unsafe math (-ffp-contract=off, no -ffast-math), so the
 * bits are those of the eager ops on every CPU. A tensor is seen as [n, c, hw]: "channels last"
 * means memory order [n, hw, c] (a linear's [rows, features] is n = rows, hw = 1).
 */
#include <math.h>
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

/* index of element (i, ch, s) in memory order */
static inline int64_t at(int cl, int64_t i, int64_t ch, int64_t s, int64_t c, int64_t hw) {
    return cl ? (i * hw + s) * c + ch : (i * c + ch) * hw + s;
}

void lbd_quantize(const void *x, int x_bf16, int x_cl, int64_t n, int64_t c, int64_t hw, float delta, float z,
                  float qmin, float qmax, float offset, float sub, void *out, int out_f32, int out_cl) {
    if (x_cl == out_cl || hw == 1 || c == 1) { /* same memory order: one flat loop */
        int64_t total = n * c * hw;
        if (out_f32) {
            float *o = (float *)out;
            if (x_bf16) {
#pragma omp parallel for schedule(static)
                for (int64_t k = 0; k < total; k++)
                    o[k] = (code(load(x, 1, k), delta, z, qmin, qmax) + offset) - sub;
            } else {
                const float *xf = (const float *)x;
#pragma omp parallel for schedule(static)
                for (int64_t k = 0; k < total; k++) o[k] = (code(xf[k], delta, z, qmin, qmax) + offset) - sub;
            }
        } else {
            uint8_t *o = (uint8_t *)out;
            if (x_bf16) {
#pragma omp parallel for schedule(static)
                for (int64_t k = 0; k < total; k++)
                    o[k] = (uint8_t)(int32_t)(code(load(x, 1, k), delta, z, qmin, qmax) + offset);
            } else {
                const float *xf = (const float *)x;
#pragma omp parallel for schedule(static)
                for (int64_t k = 0; k < total; k++)
                    o[k] = (uint8_t)(int32_t)(code(xf[k], delta, z, qmin, qmax) + offset);
            }
        }
        return;
    }
    /* a layout change: each (image, position) row of the output is written in one go */
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t i = 0; i < n; i++)
        for (int64_t s = 0; s < hw; s++)
            for (int64_t ch = 0; ch < c; ch++) {
                float u = code(load(x, x_bf16, at(x_cl, i, ch, s, c, hw)), delta, z, qmin, qmax) + offset;
                int64_t k = at(out_cl, i, ch, s, c, hw);
                if (out_f32)
                    ((float *)out)[k] = u - sub;
                else
                    ((uint8_t *)out)[k] = (uint8_t)(int32_t)u;
            }
}

static inline float scaled(float a, float dx, float ws, float cs, const float *bias, int64_t ch, int combined) {
    float v = combined ? a * cs : (a * dx) * ws;
    return bias ? v + bias[ch] : v;
}

static inline void rescale_one(const void *acc, int acc_i32, int64_t src, float dx, float ws, const float *bias,
                               int64_t ch, int combined, void *out, int out_bf16, int64_t dst) {
    float a = acc_i32 ? (float)((const int32_t *)acc)[src] : ((const float *)acc)[src];
    float v = scaled(a, dx, ws, dx * ws, bias, ch, combined);
    if (out_bf16)
        ((uint16_t *)out)[dst] = f32_to_bf16(v);
    else
        ((float *)out)[dst] = v;
}

void lbd_rescale(const void *acc, int acc_i32, int acc_cl, int64_t n, int64_t c, int64_t hw, float dx,
                 const float *ws, const float *bias, int combined, void *out, int out_bf16, int out_cl) {
    if (!out_cl && hw > 1) { /* NCHW output: the inner loop runs over positions */
#pragma omp parallel for collapse(2) schedule(static)
        for (int64_t i = 0; i < n; i++)
            for (int64_t ch = 0; ch < c; ch++)
                for (int64_t s = 0; s < hw; s++)
                    rescale_one(acc, acc_i32, at(acc_cl, i, ch, s, c, hw), dx, ws[ch], bias, ch, combined, out,
                                out_bf16, (i * c + ch) * hw + s);
    } else { /* channels-last output (or a linear's rows): the inner loop runs over channels */
#pragma omp parallel for collapse(2) schedule(static)
        for (int64_t i = 0; i < n; i++)
            for (int64_t s = 0; s < hw; s++)
                for (int64_t ch = 0; ch < c; ch++)
                    rescale_one(acc, acc_i32, at(acc_cl, i, ch, s, c, hw), dx, ws[ch], bias, ch, combined, out,
                                out_bf16, (i * hw + s) * c + ch);
    }
}
