// Exact integer conv / linear for x86 CPUs with AVX2: sum_k (u - zx)(w - zw) in int32 from int16 operands.
//
// Why: an AVX2-only CPU's int8 kernels (oneDNN, torch._int_mm) multiply u8 by s8 with vpmaddubsw, which adds
// each pair of products into a saturating 16-bit lane: 255*127 + 255*127 clips, so an 8-bit layer needs two
// pair-safe calls there. vpmaddwd multiplies int16 by int16 and adds each pair into 32 bits: with codes and
// weights within +-255 a pair is at most 2*255*255, nothing saturates, and one call is exact for any 8-bit
// layer while the whole sum stays within int32 (checked by the caller: lowbitdm_cli/export/s16.py). 16 products
// per instruction against a float32 FMA's 8, but on AMD Zen 3 vpmaddwd issues at half the FMA's rate, so there
// it at best matches float32 (measured: docs/integer-runtime.md).
//
// Layout: the codes are copied once per call into a zero-padded channels-last int16 buffer (u - zx, so zero
// padding is code zx, the value 0, as in the fake-quantized layer); weights are packed once by the caller as
// [O/16][kh*kw][C/2][16][2] int16 (C and O zero-padded to even / a multiple of 16). A micro-tile is up to 6
// output pixels x 16 output channels, 12 ymm accumulators held over every tap and channel pair.
// Integer arithmetic: the result does not depend on the CPU, the thread count or the blocking.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int NR = 16;  // output channels per block: two ymm of int32
constexpr int MR = 6;   // output pixels per micro-tile
constexpr int64_t MB = 96;  // output pixels per parallel task

template <int R>
void tile(const int16_t* const* px, const int64_t* tapoff, int64_t T, int64_t C2, const int16_t* b,
          int32_t* const* out, int64_t ncols) {
  __m256i acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  for (int64_t t = 0; t < T; ++t) {
    const int16_t* p[R];
    for (int i = 0; i < R; ++i) p[i] = px[i] + tapoff[t];
    const int16_t* bt = b + t * C2 * 32;
    for (int64_t c = 0; c < C2; ++c) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + c * 32));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bt + c * 32 + 16));
      for (int i = 0; i < R; ++i) {
        int32_t pair;  // codes of channels 2c and 2c+1
        std::memcpy(&pair, p[i] + 2 * c, sizeof pair);
        const __m256i a = _mm256_set1_epi32(pair);
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(a, b0));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(a, b1));
      }
    }
  }
  alignas(32) int32_t buf[NR];
  for (int i = 0; i < R; ++i) {
    if (ncols == NR) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i]), acc[i][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i] + 8), acc[i][1]);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(buf), acc[i][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(buf + 8), acc[i][1]);
      std::memcpy(out[i], buf, ncols * sizeof(int32_t));
    }
  }
}

using Tile = void (*)(const int16_t* const*, const int64_t*, int64_t, int64_t, const int16_t*, int32_t* const*,
                      int64_t);
constexpr Tile TILES[MR + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

// u - zx as int16, channels-last, zero-padded by (ph, pw) and to an even channel count
at::Tensor centred_codes(const at::Tensor& u, int64_t zx, int64_t ph, int64_t pw) {
  const int64_t N = u.size(0), C = u.size(1), H = u.size(2), W = u.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, Cp = C + C % 2;
  auto x = at::zeros({N, Hp, Wp, Cp}, u.options().dtype(at::kShort));
  const uint8_t* src = u.data_ptr<uint8_t>();
  int16_t* dst = x.data_ptr<int16_t>();
  const int64_t sn = u.stride(0), sc = u.stride(1), sh = u.stride(2), sw = u.stride(3);
  const int16_t z = static_cast<int16_t>(zx);
  at::parallel_for(0, N * H, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, h = r % H;
      const uint8_t* s = src + n * sn + h * sh;
      int16_t* d = dst + ((n * Hp + h + ph) * Wp + pw) * Cp;
      if (sc == 1) {  // channels-last (or a linear's rows): contiguous channels
        for (int64_t w = 0; w < W; ++w)
          for (int64_t c = 0; c < C; ++c) d[w * Cp + c] = static_cast<int16_t>(s[w * sw + c]) - z;
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t w = 0; w < W; ++w) d[w * Cp + c] = static_cast<int16_t>(s[c * sc + w * sw]) - z;
      }
    }
  });
  return x;
}

}  // namespace

// u: uint8 codes [N, C, H, W] (any strides); zx: the codes' zero point (one-element tensor);
// w: int16 [ceil(O/16), kh*kw, ceil(C/2), 16, 2] (`s16.pack_weight`). Returns int32 [N, Ho, Wo, O]:
// sum over the window and channels of (u - zx)(w - zw), with zero padding.
at::Tensor conv_s16(const at::Tensor& u, const at::Tensor& zx, const at::Tensor& w, int64_t kh, int64_t kw,
                    int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t out_ch) {
  TORCH_CHECK(u.scalar_type() == at::kByte && u.dim() == 4, "conv_s16: u must be uint8 [N, C, H, W]");
  TORCH_CHECK(w.scalar_type() == at::kShort && w.dim() == 5 && w.is_contiguous() && w.size(3) == NR && w.size(4) == 2,
              "conv_s16: w must be packed int16 [O/16, taps, C/2, 16, 2]");
  TORCH_CHECK(u.device().is_cpu() && w.device().is_cpu(), "conv_s16: CPU tensors only");
  const int64_t N = u.size(0), C = u.size(1), H = u.size(2), W = u.size(3), Cp = C + C % 2, C2 = Cp / 2;
  const int64_t T = kh * kw, OB = w.size(0), O = out_ch;
  TORCH_CHECK(w.size(1) == T && w.size(2) == C2 && OB * NR >= O && (OB - 1) * NR < O,
              "conv_s16: packed weight does not match the input channels, kernel size or out_ch");
  const at::Tensor x = centred_codes(u, zx.item<int64_t>(), ph, pw);
  const int64_t Hp = x.size(1), Wp = x.size(2);
  const int64_t Ho = (Hp - dh * (kh - 1) - 1) / sh + 1, Wo = (Wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "conv_s16: empty output");
  auto out = at::empty({N, Ho, Wo, O}, u.options().dtype(at::kInt));
  const int64_t M = N * Ho * Wo;
  std::vector<int64_t> tapoff(T);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) tapoff[i * kw + j] = (i * dh * Wp + j * dw) * Cp;
  const int16_t* xd = x.data_ptr<int16_t>();
  const int16_t* wd = w.data_ptr<int16_t>();
  int32_t* od = out.data_ptr<int32_t>();
  // tasks: pixel blocks x output-channel groups (groups only where there are few pixel blocks: linears)
  const int64_t blocks = (M + MB - 1) / MB;
  const int64_t want = 4 * at::get_num_threads();
  const int64_t groups = std::min(OB, std::max<int64_t>(1, (want + blocks - 1) / blocks));
  const int64_t per_group = (OB + groups - 1) / groups;
  at::parallel_for(0, blocks * groups, 1, [&](int64_t t0, int64_t t1) {
    const int16_t* px[MR];
    int32_t* po[MR];
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t blk = task / groups, g = task % groups;
      const int64_t m0 = blk * MB, m1 = std::min(M, m0 + MB);
      for (int64_t ob = g * per_group; ob < std::min(OB, (g + 1) * per_group); ++ob) {
        const int16_t* bp = wd + ob * T * C2 * 32;
        const int64_t ncols = std::min<int64_t>(NR, O - ob * NR);
        for (int64_t m = m0; m < m1; m += MR) {
          const int r = static_cast<int>(std::min<int64_t>(MR, m1 - m));
          for (int i = 0; i < r; ++i) {
            const int64_t q = m + i, n = q / (Ho * Wo), rem = q % (Ho * Wo), oh = rem / Wo, ow = rem % Wo;
            px[i] = xd + ((n * Hp + oh * sh) * Wp + ow * sw) * Cp;
            po[i] = od + q * O + ob * NR;
          }
          TILES[r](px, tapoff.data(), T, C2, bp, po, ncols);
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY(lowbitdm, m) {
  m.def("conv_s16(Tensor u, Tensor zx, Tensor w, int kh, int kw, int sh, int sw, int ph, int pw, int dh, int dw, "
        "int out_ch) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbitdm, CPU, m) { m.impl("conv_s16", &conv_s16); }
