// slimformer CPU kernels: few-token (decode / speculative-verify) linear layers; the W8A8
// linear and gated MLP (per-token quantization and rescaling around an int8 product: ours for a
// few tokens, PyTorch's int8 GEMM for many); attention (causal prefill squares, and
// bidirectional attention under an additive mask: encoders); EViT's token reduction between
// encoder blocks; RMSNorm and rotary embedding for eager decode steps (see the sections below).
//
// The few-token kernels compute y[m, n] = sum_k W[n, k] x[m, k] for small M (a handful of tokens), where
// a decode step is bound by how fast the weight bytes stream from memory: each weight row is
// read once and applied to up to 8 token rows while it sits in L1.
//
// * int4_linear: W stays in slimformer's canonical 4-bit packing (two codes per byte, even
//   column in the low nibble, rows of ceil(K/2) bytes) with per-group scales s[n, g] and zero
//   points z[n, g] (or one constant zero, 8 for symmetric codes stored as code + 8):
//       y[m, n] = sum_g s[n, g] * (sum_{k in g} u[n, k] x[m, k] - z[n, g] * sum_{k in g} x[m, k])
//   The codes are never expanded to a float matrix: 16 bytes (32 codes) become two vectors of
//   16 floats that are multiplied into the even / odd columns of x (x is de-interleaved once per
//   call). The per-group inner sums are exact float sums of products of small integers and x.
// * int8w_linear: the same with 8-bit codes, one per byte (signed codes stored + 128 are read
//   back exactly as byte - 128, so a symmetric row needs no zero-point term): int8 weight-only
//   models (a W8 speculative draft) and int8 LM heads. Four accumulators per token and a
//   software prefetch 4 KB ahead: the byte-to-float conversions leave too few loads in flight
//   for the hardware prefetcher alone.
// * int8w_dequant / int4_dequant expand rows to fp32 for long inputs (a prefill's GEMM tiles).
// * f32_linear: plain fp32 rows, one sequential row stream per thread.
//
// The AVX-512 paths are used when the compiler targets AVX-512 (-march=native on such a CPU);
// otherwise portable scalar loops compute the same sums.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SF_AVX512 1
#else
#define SF_AVX512 0
#endif

namespace {

constexpr int64_t kTileRows = 16;  // weight rows applied to every token block before moving on
constexpr int kMaxTokenBlock = 8;  // token rows sharing one pass over a weight row (registers)

// Calls fn(t0, t1, m0, mb) for every tile of ``tile`` weight rows (tiles split across threads)
// and, inside a tile, every block of mb <= kMaxTokenBlock token rows: a tile stays in cache while
// all token blocks use it.
template <typename Fn>
void over_tiles(int64_t N, int64_t M, int64_t grain, const Fn& fn, int64_t tile = kTileRows) {
  at::parallel_for(0, N, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t t0 = c0; t0 < c1; t0 += tile) {
      const int64_t t1 = std::min(t0 + tile, c1);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxTokenBlock)
        fn(t0, t1, m0, static_cast<int>(std::min<int64_t>(kMaxTokenBlock, M - m0)));
    }
  });
}

// fn(std::integral_constant<int, mb>{}) for a runtime mb in 1..kMaxTokenBlock: one compiled
// body per block size, so the per-token accumulators live in registers.
template <typename Fn>
void with_block(int mb, const Fn& fn) {
  switch (mb) {
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 1>{}); break;
  }
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct ScaleView {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  inline float operator[](int64_t i) const { return f32 ? f32[i] : bf16_to_float(bf16[i]); }
};

ScaleView scale_view(const torch::Tensor& t) {
  ScaleView v;
  if (t.scalar_type() == torch::kFloat32) {
    v.f32 = t.data_ptr<float>();
  } else {
    v.bf16 = reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
  }
  return v;
}

#if SF_AVX512
// The first min(n, 16) lanes.
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

inline void unpack16(const uint8_t* w, __mmask16 mask, __m512& lo, __m512& hi) {
  const __m128i m0f = _mm_set1_epi8(0x0F);
  __m128i v = _mm_maskz_loadu_epi8(mask, w);
  __m128i l = _mm_and_si128(v, m0f);
  __m128i h = _mm_and_si128(_mm_srli_epi16(v, 4), m0f);
  lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(l));
  hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(h));
}
#endif

// out[g] = sum of x[k] over group g (groups of gs columns, the last one partial).
inline void group_sums(const float* xr, int64_t K, int64_t G, int64_t gs, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k1 = g == G - 1 ? K : std::min(K, (g + 1) * gs);
    float sum = 0.f;
    for (int64_t k = g * gs; k < k1; ++k) sum += xr[k];
    out[g] = sum;
  }
}

// Argument types shared by the weight-only kernels.
void check_weight_only_types(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scale,
                             const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, what, ": x must be 2-D float32");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == torch::kUInt8, what, ": qweight must be 2-D uint8");
  TORCH_CHECK(scale.dim() == 2 && (scale.scalar_type() == torch::kFloat32 || scale.scalar_type() == torch::kBFloat16),
              what, ": scale must be 2-D float32 or bfloat16");
}

// Shape checks shared by the weight-only kernels; returns the float32 zero points (kept alive
// in zc) or nullptr.
const float* check_groups(const torch::Tensor& scale, const c10::optional<torch::Tensor>& zero,
                          int64_t N, int64_t K, int64_t group_size, torch::Tensor& zc, const char* what) {
  const int64_t G = scale.size(1);
  TORCH_CHECK(scale.size(0) == N, what, ": scale rows ", scale.size(0), " != ", N);
  TORCH_CHECK(G == (K + group_size - 1) / group_size || (G == 1 && group_size >= K),
              what, ": ", G, " groups do not match K=", K, " and group size ", group_size);
  if (!(zero.has_value() && zero->defined())) return nullptr;
  zc = zero->to(torch::kFloat32).contiguous();
  TORCH_CHECK(zc.size(0) == N && zc.size(1) == G, what, ": zero must match scale's shape");
  return zc.data_ptr<float>();
}

// One weight row n against MB token rows: returns sum_g s_g * (dot_g - z_g * xsum_g).
template <int MB>
inline void int4_row(const uint8_t* w, int64_t kb, int64_t groups, int64_t gbytes,
                     const float* const* xe, const float* const* xo, const float* const* xs,
                     ScaleView sc, const float* zero, float zconst, int64_t srow, float* out) {
#if SF_AVX512
  __m512 acc[MB];
  float zterm[MB];
  for (int m = 0; m < MB; ++m) { acc[m] = _mm512_setzero_ps(); zterm[m] = 0.f; }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b0 = g * gbytes;
    const int64_t b1 = std::min(b0 + gbytes, kb);
    __m512 ag[MB];
    for (int m = 0; m < MB; ++m) ag[m] = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; b += 16) {
      const __mmask16 mask = tail_mask(b1 - b);
      __m512 lo, hi;
      unpack16(w + b, mask, lo, hi);
      for (int m = 0; m < MB; ++m) {
        ag[m] = _mm512_fmadd_ps(lo, _mm512_maskz_loadu_ps(mask, xe[m] + b), ag[m]);
        ag[m] = _mm512_fmadd_ps(hi, _mm512_maskz_loadu_ps(mask, xo[m] + b), ag[m]);
      }
    }
    const float s = sc[srow + g];
    const float z = zero ? zero[srow + g] : zconst;
    const __m512 vs = _mm512_set1_ps(s);
    for (int m = 0; m < MB; ++m) {
      acc[m] = _mm512_fmadd_ps(vs, ag[m], acc[m]);
      zterm[m] += s * z * xs[m][g];
    }
  }
  for (int m = 0; m < MB; ++m) out[m] = _mm512_reduce_add_ps(acc[m]) - zterm[m];
#else
  for (int m = 0; m < MB; ++m) {
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t b0 = g * gbytes;
      const int64_t b1 = std::min(b0 + gbytes, kb);
      float dot = 0.f;
      for (int64_t b = b0; b < b1; ++b) {
        dot += static_cast<float>(w[b] & 15) * xe[m][b] + static_cast<float>(w[b] >> 4) * xo[m][b];
      }
      const float s = sc[srow + g];
      const float z = zero ? zero[srow + g] : zconst;
      total += s * (dot - z * xs[m][g]);
    }
    out[m] = total;
  }
#endif
}

template <int MB>
void int4_block(const uint8_t* qw, int64_t n0, int64_t n1, int64_t kb, int64_t groups,
                int64_t gbytes, const float* const* xe, const float* const* xo,
                const float* const* xs, ScaleView sc, const float* zero, float zconst,
                float* y, int64_t m0, int64_t N) {
  float out[MB];
  for (int64_t n = n0; n < n1; ++n) {
    int4_row<MB>(qw + n * kb, kb, groups, gbytes, xe, xo, xs, sc, zero, zconst, n * groups, out);
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n] = out[m];
  }
}

}  // namespace

// x [M, K] f32; qweight [N, ceil(K/2)] u8; scale [N, G] f32|bf16; zero [N, G] f32 or empty.
torch::Tensor int4_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                          c10::optional<torch::Tensor> zero, int64_t group_size, double zconst) {
  check_weight_only_types(x, qweight, scale, "int4_linear");
  x = x.contiguous();
  qweight = qweight.contiguous();
  scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), kb = qweight.size(1);
  TORCH_CHECK(kb == (K + 1) / 2, "int4_linear: qweight has ", kb, " bytes per row, expected ", (K + 1) / 2);
  const int64_t G = scale.size(1);
  TORCH_CHECK(G == 1 || group_size % 2 == 0, "int4_linear: group size must be even");
  torch::Tensor zc;
  const float* zp = check_groups(scale, zero, N, K, group_size, zc, "int4_linear");
  const int64_t gs = G == 1 ? 2 * kb : group_size;
  const int64_t gbytes = gs / 2;

  // de-interleave x into even / odd columns (odd padded with 0 when K is odd); group sums
  thread_local std::vector<float> scratch;  // reused across calls: no allocation per step
  scratch.assign(static_cast<size_t>(M * (2 * kb + G)), 0.f);
  const float* xp = x.data_ptr<float>();
  float* xe = scratch.data();
  float* xo = xe + M * kb;
  float* xs = xo + M * kb;
  for (int64_t m = 0; m < M; ++m) {  // no division or branch per element: this runs per call
    const float* xr = xp + m * K;
    float* e = xe + m * kb;
    float* o = xo + m * kb;
    const int64_t pairs = K / 2;
    for (int64_t b = 0; b < pairs; ++b) {
      e[b] = xr[2 * b];
      o[b] = xr[2 * b + 1];
    }
    if (K % 2) e[pairs] = xr[K - 1];  // o[pairs] stays 0: the padding nibble meets a zero
    group_sums(xr, K, G, gs, xs + m * G);
  }
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const ScaleView sc = scale_view(scale);
  const float zf = static_cast<float>(zconst);

  over_tiles(N, M, 16, [&](int64_t t0, int64_t t1, int64_t m0, int mb) {
    const float* xer[kMaxTokenBlock];
    const float* xor_[kMaxTokenBlock];
    const float* xsr[kMaxTokenBlock];
    for (int i = 0; i < mb; ++i) {
      xer[i] = xe + (m0 + i) * kb;
      xor_[i] = xo + (m0 + i) * kb;
      xsr[i] = xs + (m0 + i) * G;
    }
    with_block(mb, [&](auto B) {
      int4_block<decltype(B)::value>(qp, t0, t1, kb, G, gbytes, xer, xor_, xsr, sc, zp, zf, yp, m0, N);
    });
  });
  return y;
}

namespace {

// One row of 8-bit codes u[n, :] (one per byte) against SB <= 4 token rows, groups as in
// int4_row: out[m] = sum_g s_g * (sum_{k in g} u[n, k] x[m, k] - z_g * xsum_g[m]). SIGNED: the
// bytes are signed codes stored + 128, read back exactly as u - 128 (no zero-point term, so no
// cancellation between two large sums). Each token keeps four accumulators (one per 16-code
// quarter of a 64-code chunk): one accumulator made every multiply-add wait for the previous
// one, which held a one-token product to ~7 GB/s (benchmarks/RESULTS.md "W8 self-draft"). The sums
// of a token are formed in the same order whatever the block size, so a verify step's rows
// equal one-token steps' bit for bit.
constexpr int64_t kI8Ahead = 4096;  // bytes of codes prefetched ahead (1/2/8 KB measured slower)
template <int SB, bool SIGNED>
inline void int8w_row(const uint8_t* w, int64_t n, int64_t K, int64_t groups, int64_t gs,
                      const float* const* xr, const float* const* xs, ScaleView sc, const float* zero,
                      float zconst, float* y, int64_t m0, int64_t N) {
  float corr[SB];
  for (int m = 0; m < SB; ++m) corr[m] = 0.f;
#if SF_AVX512
  const __m512i off = _mm512_set1_epi32(SIGNED ? 128 : 0);
  __m512 out[SB];
  for (int m = 0; m < SB; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
    __m512 a[4][SB];
    for (int j = 0; j < 4; ++j)
      for (int m = 0; m < SB; ++m) a[j][m] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + kI8Ahead), _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * j));
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), off));
        for (int m = 0; m < SB; ++m) a[j][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr[m] + k + 16 * j), a[j][m]);
      }
    }
    for (int j = 0; k < k1; k += 16, ++j) {  // < 64 codes left: j < 4
      const __mmask16 mask = tail_mask(k1 - k);
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, w + k)), off));
      for (int m = 0; m < SB; ++m) a[j][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, xr[m] + k), a[j][m]);
    }
    const float s = sc[n * groups + g];
    const __m512 sv = _mm512_set1_ps(s);
    for (int m = 0; m < SB; ++m)
      out[m] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a[0][m], a[1][m]), _mm512_add_ps(a[2][m], a[3][m])),
                               sv, out[m]);
    if (!SIGNED) {
      const float z = zero ? zero[n * groups + g] : zconst;
      for (int m = 0; m < SB; ++m) corr[m] += s * z * xs[m][g];
    }
  }
  for (int m = 0; m < SB; ++m) y[(m0 + m) * N + n] = _mm512_reduce_add_ps(out[m]) - corr[m];
#else
  float out[SB];
  for (int m = 0; m < SB; ++m) out[m] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
    const float s = sc[n * groups + g];
    for (int m = 0; m < SB; ++m) {
      float d = 0.f;
      for (int64_t k = k0; k < k1; ++k) d += static_cast<float>(SIGNED ? w[k] - 128 : w[k]) * xr[m][k];
      out[m] += s * d;
    }
    if (!SIGNED) {
      const float z = zero ? zero[n * groups + g] : zconst;
      for (int m = 0; m < SB; ++m) corr[m] += s * z * xs[m][g];
    }
  }
  for (int m = 0; m < SB; ++m) y[(m0 + m) * N + n] = out[m] - corr[m];
#endif
}

// Rows n0..n1 against MB token rows, in sub-blocks of up to 4 tokens (a row's 64-code chunk is
// read from L1 by the later sub-blocks).
template <int MB, bool SIGNED>
void int8w_block(const uint8_t* qw, int64_t n0, int64_t n1, int64_t K, int64_t groups, int64_t gs,
                 const float* const* xr, const float* const* xs, ScaleView sc, const float* zero,
                 float zconst, float* y, int64_t m0, int64_t N) {
  constexpr int kFull = MB / 4, kRest = MB % 4;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = qw + n * K;
    for (int b = 0; b < kFull; ++b)
      int8w_row<4, SIGNED>(w, n, K, groups, gs, xr + 4 * b, xs + 4 * b, sc, zero, zconst, y, m0 + 4 * b, N);
    if (kRest)
      int8w_row<kRest ? kRest : 1, SIGNED>(w, n, K, groups, gs, xr + 4 * kFull, xs + 4 * kFull, sc, zero, zconst,
                                           y, m0 + 4 * kFull, N);
  }
}

// Codes k .. k + 15 of a row of 4-bit codes (two per byte, even column in the low nibble; k
// even), the first ``n`` of them, as floats in column order.
#if SF_AVX512
inline __m512 codes16(const uint8_t* row, int64_t k, int64_t n, std::integral_constant<int, 8>) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(tail_mask(n), row + k)));
}
inline __m512 codes16(const uint8_t* row, int64_t k, int64_t n, std::integral_constant<int, 4>) {
  const __m128i m0f = _mm_set1_epi8(0x0F);
  const __m128i v = _mm_maskz_loadu_epi8(static_cast<__mmask16>(tail_mask((n + 1) / 2) & 0xFF), row + k / 2);
  const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(v, m0f), _mm_and_si128(_mm_srli_epi16(v, 4), m0f));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
}
#endif

template <int BITS>
inline float code_at(const uint8_t* row, int64_t k) {
  if (BITS == 8) return static_cast<float>(row[k]);
  return static_cast<float>((row[k / 2] >> (4 * (k & 1))) & 0x0F);
}

// Rows n0..n1 of a BITS-bit weight-only weight ([N, K] codes, packed as above) as float32
// [n1 - n0, K]: (u - z) * s with z the zero point of the row's group (or zero_const: 2^(BITS-1)
// for signed codes stored + 2^(BITS-1)), the same two float operations as the Python
// dequantization, so the same values bit for bit, at memory speed. Long inputs (a prefill)
// multiply such tiles with an fp32 GEMM.
template <int BITS>
torch::Tensor wo_dequant(const torch::Tensor& qweight_in, const torch::Tensor& scale_in,
                         const c10::optional<torch::Tensor>& zero, int64_t K, int64_t group_size, double zconst,
                         int64_t n0, int64_t n1, const char* what) {
  TORCH_CHECK(qweight_in.dim() == 2 && qweight_in.scalar_type() == torch::kUInt8, what, ": qweight must be 2-D uint8");
  TORCH_CHECK(scale_in.dim() == 2 && (scale_in.scalar_type() == torch::kFloat32 ||
                                      scale_in.scalar_type() == torch::kBFloat16),
              what, ": scale must be 2-D float32 or bfloat16");
  const torch::Tensor qweight = qweight_in.contiguous(), scale = scale_in.contiguous();
  const int64_t N = qweight.size(0), row_bytes = qweight.size(1);
  TORCH_CHECK(row_bytes == (K * BITS + 7) / 8, what, ": ", row_bytes, " bytes per row do not hold K=", K,
              " codes of ", BITS, " bits");
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, what, ": rows ", n0, "..", n1, " outside 0..", N);
  TORCH_CHECK(BITS == 8 || group_size % 2 == 0 || scale.size(1) == 1, what, ": 4-bit groups must be even");
  torch::Tensor zc;
  const float* zp = check_groups(scale, zero, N, K, group_size, zc, what);
  const int64_t G = scale.size(1);
  const int64_t gs = G == 1 ? K : group_size;
  const float zf = static_cast<float>(zconst);
  auto out = torch::empty({n1 - n0, K}, scale.options().dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const ScaleView sc = scale_view(scale);
  at::parallel_for(n0, n1, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const uint8_t* w = qp + n * row_bytes;
      float* o = op + (n - n0) * K;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
        const float s = sc[n * G + g];
        const float z = zp ? zp[n * G + g] : zf;
        int64_t k = k0;
#if SF_AVX512
        const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
        for (; k < k1; k += 16) {
          const __m512 v = _mm512_sub_ps(codes16(w, k, k1 - k, std::integral_constant<int, BITS>{}), zv);
          _mm512_mask_storeu_ps(o + k, tail_mask(k1 - k), _mm512_mul_ps(v, sv));
        }
#endif
        for (; k < k1; ++k) o[k] = (code_at<BITS>(w, k) - z) * s;
      }
    }
  });
  return out;
}

}  // namespace

// Rows n0..n1 of an 8-bit weight-only weight (one code per byte) as float32: see wo_dequant.
torch::Tensor int8w_dequant(torch::Tensor qweight, torch::Tensor scale, c10::optional<torch::Tensor> zero,
                            int64_t group_size, double zconst, int64_t n0, int64_t n1) {
  return wo_dequant<8>(qweight, scale, zero, qweight.size(1), group_size, zconst, n0, n1, "int8w_dequant");
}

// Rows n0..n1 of a 4-bit weight-only weight of K columns (two codes per byte) as float32.
torch::Tensor int4_dequant(torch::Tensor qweight, torch::Tensor scale, c10::optional<torch::Tensor> zero,
                           int64_t group_size, double zconst, int64_t K, int64_t n0, int64_t n1) {
  return wo_dequant<4>(qweight, scale, zero, K, group_size, zconst, n0, n1, "int4_dequant");
}

namespace {

// One 8-bit weight among those multiplied in one call: its rows are output columns
// off .. off + n of y.
struct Int8Member {
  const uint8_t* q;
  ScaleView sc;
  const float* zero;
  int64_t off, n;
};

// y[:, off_i + r] for every member i and row r, the rows of all members split into tiles across
// the threads (a tile that straddles two members is cut at the boundary).
void int8w_members(const Int8Member* mem, int64_t count, const float* xp, const float* xsp, int64_t M,
                   int64_t K, int64_t G, int64_t gs, float zf, bool is_signed, float* yp, int64_t N) {
  over_tiles(N, M, 16, [&](int64_t t0, int64_t t1, int64_t m0, int mb) {
    const float* xr[kMaxTokenBlock];
    const float* xsr[kMaxTokenBlock];
    for (int i = 0; i < mb; ++i) {
      xr[i] = xp + (m0 + i) * K;
      xsr[i] = xsp ? xsp + (m0 + i) * G : nullptr;
    }
    for (int64_t i = 0; i < count; ++i) {
      const Int8Member& e = mem[i];
      const int64_t r0 = std::max(t0, e.off) - e.off, r1 = std::min(t1, e.off + e.n) - e.off;
      if (r0 >= r1) continue;
      with_block(mb, [&](auto B) {
        if (is_signed)
          int8w_block<decltype(B)::value, true>(e.q, r0, r1, K, G, gs, xr, xsr, e.sc, e.zero, zf, yp + e.off, m0, N);
        else
          int8w_block<decltype(B)::value, false>(e.q, r0, r1, K, G, gs, xr, xsr, e.sc, e.zero, zf, yp + e.off, m0, N);
      });
    }
  });
}

}  // namespace

// x [M, K] f32; qweight [N, K] u8 (one code per byte; signed codes stored + 128, zero_const 128);
// scale [N, G] f32|bf16; zero [N, G] f32 or empty -> [M, N]. The 8-bit twin of int4_linear
// (an int8 LM head at decode: a quarter of the fp32 head's bytes).
torch::Tensor int8w_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                           c10::optional<torch::Tensor> zero, int64_t group_size, double zconst) {
  check_weight_only_types(x, qweight, scale, "int8w_linear");
  x = x.contiguous();
  qweight = qweight.contiguous();
  scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "int8w_linear: qweight has ", qweight.size(1), " bytes per row, expected ", K);
  const int64_t G = scale.size(1);
  torch::Tensor zc;
  const float* zp = check_groups(scale, zero, N, K, group_size, zc, "int8w_linear");
  const int64_t gs = G == 1 ? K : group_size;
  const float zf = static_cast<float>(zconst);
  const bool is_signed = zp == nullptr && zf == 128.f;  // symmetric codes stored + 128
  thread_local std::vector<float> sums;  // per-group sums of x, only for zero points
  sums.assign(static_cast<size_t>(M * G), 0.f);
  const float* xp = x.data_ptr<float>();
  if (!is_signed)
    for (int64_t m = 0; m < M; ++m) group_sums(xp + m * K, K, G, gs, sums.data() + m * G);
  auto y = torch::empty({M, N}, x.options());
  const Int8Member one{qweight.data_ptr<uint8_t>(), scale_view(scale), zp, 0, N};
  int8w_members(&one, 1, xp, sums.data(), M, K, G, gs, zf, is_signed, y.data_ptr<float>(), N);
  return y;
}

// x [M, K] f32 against several symmetric 8-bit weights that read the same input (q/k/v, or
// gate/up): qweights[i] [N_i, K] u8 (codes + 128), scales[i] [N_i, G] -> [M, sum N_i], the
// members' outputs side by side, each column exactly int8w_linear's. One call and one parallel
// region instead of one per member (a decode step's small projections are dominated by the
// per-call costs); the weights are not copied.
torch::Tensor int8w_linear_cat(torch::Tensor x, std::vector<torch::Tensor> qweights,
                               std::vector<torch::Tensor> scales, int64_t group_size) {
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size(),
              "int8w_linear_cat: needs as many scales as weights (at least one)");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<Int8Member> mem;
  int64_t N = 0, G = -1;
  for (size_t i = 0; i < qweights.size(); ++i) {
    check_weight_only_types(x, qweights[i], scales[i], "int8w_linear_cat");
    qweights[i] = qweights[i].contiguous();
    scales[i] = scales[i].contiguous();
    const int64_t n = qweights[i].size(0);
    TORCH_CHECK(qweights[i].size(1) == K, "int8w_linear_cat: qweight has ", qweights[i].size(1),
                " bytes per row, expected ", K);
    torch::Tensor zc;
    check_groups(scales[i], c10::nullopt, n, K, group_size, zc, "int8w_linear_cat");
    TORCH_CHECK(G < 0 || scales[i].size(1) == G, "int8w_linear_cat: members have different groups");
    G = scales[i].size(1);
    mem.push_back(Int8Member{qweights[i].data_ptr<uint8_t>(), scale_view(scales[i]), nullptr, N, n});
    N += n;
  }
  auto y = torch::empty({M, N}, x.options());
  int8w_members(mem.data(), static_cast<int64_t>(mem.size()), x.data_ptr<float>(), nullptr, M, K, G,
                G == 1 ? K : group_size, 128.f, true, y.data_ptr<float>(), N);
  return y;
}

namespace {

// Software prefetch of the weight stream in f32_rows.
enum class F32Prefetch { kNone, kL2, kL1 };

// R weight rows x MB token rows of x [M, K] in registers (R * MB accumulators): each weight
// vector loaded feeds MB multiply-adds and each x vector R. One token (a decode step) runs R = 1:
// the weights are then read as one sequential stream, which the hardware prefetcher follows
// best (measured: 22 GB/s on one thread vs 13-16 GB/s for 4 or 8 interleaved row streams), with
// a software prefetch 4 KB ahead into L1 on top (an Intel Xeon host, 2 threads, SmolLM2's 211
// linears streamed from DRAM: 0.96x -> 1.07x MKL's GEMV; 1, 2 and 8 KB gave 0.98x, 1.06x,
// 1.02x). Several tokens (a verify step) are bound by the multiply-adds as much as by memory, so
// they run 2 or 3 rows at a time with a software prefetch of the weights ~16 KB ahead into L2
// (that keeps memory busy while the core computes). Every (row, token) sum is accumulated in the
// same order whatever R and MB, so a verify step's rows equal one-token steps' bit for bit.
template <int R, int MB>
inline void f32_rows(const float* w, const float* const* xr, int64_t K, int64_t n, float* y, int64_t m0,
                     int64_t N, F32Prefetch prefetch) {
  const float* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = w + (n + r) * K;
#if SF_AVX512
  constexpr int64_t kAheadL2 = 4096, kAheadL1 = 1024;  // floats (16 KB / 4 KB) ahead
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if (prefetch == F32Prefetch::kL2)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + kAheadL2), _MM_HINT_T1);
    else if (prefetch == F32Prefetch::kL1)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + k + kAheadL1), _MM_HINT_T0);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(wr[r] + k);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_loadu_ps(xr[m] + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, wr[r] + k);
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, xr[m] + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) y[(m0 + m) * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
#else
  (void)prefetch;
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float a = 0.f;
      for (int64_t k = 0; k < K; ++k) a += wr[r][k] * xr[m][k];
      y[(m0 + m) * N + n + r] = a;
    }
#endif
}

// Rows n0..n1 in groups of R (the last few one at a time).
template <int R, int MB>
void f32_block(const float* w, const float* const* xr, int64_t K, int64_t n0, int64_t n1, float* y,
               int64_t m0, int64_t N, F32Prefetch prefetch) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) f32_rows<R, MB>(w, xr, K, n, y, m0, N, prefetch);
  for (; n < n1; ++n) f32_rows<1, MB>(w, xr, K, n, y, m0, N, prefetch);
}

}  // namespace

// x [M, K] f32, weight [N, K] f32 -> x @ weight^T [M, N] (no bias).
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "f32_linear: x must be 2-D float32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32, "f32_linear: weight must be 2-D float32");
  TORCH_CHECK(weight.size(1) == x.size(1), "f32_linear: K mismatch");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // one token: single rows, prefetch into L1; 2-4 tokens: pairs of rows; more: triples of rows in
  // token blocks of 8 (24 accumulators), the later blocks from cache. SmolLM2's linears (30
  // blocks) at 8 tokens: ~21 ms in single rows with blocks of 4, ~16 ms so; at 4: ~15 -> ~12 ms.
  const int rows = M == 1 ? 1 : (M <= 4 ? 2 : 3);
  over_tiles(N, M, 64, [&](int64_t t0, int64_t t1, int64_t m0, int mb) {
    const float* xr[kMaxTokenBlock];
    for (int i = 0; i < mb; ++i) xr[i] = xp + (m0 + i) * K;
    const F32Prefetch pf = rows == 1 ? F32Prefetch::kL1 : (m0 == 0 ? F32Prefetch::kL2 : F32Prefetch::kNone);
    with_block(mb, [&](auto B) {
      constexpr int MB = decltype(B)::value;
      if (rows == 3) f32_block<3, MB>(wp, xr, K, t0, t1, yp, m0, N, pf);
      else if (rows == 2) f32_block<2, MB>(wp, xr, K, t0, t1, yp, m0, N, pf);
      else f32_block<1, MB>(wp, xr, K, t0, t1, yp, m0, N, pf);
    });
  }, rows == 3 ? 15 : kTileRows);
  return y;
}

namespace {

// acc[m, n] = sum_k q[m, k] w[n, k] (int32, exact) for a few token rows: the weight rows are
// read straight from their [N, K] int8 layout, one sequential stream per thread. torch._int_mm
// (oneDNN) reorders the whole weight into its blocked layout on every call, which at one token
// reads and writes the weights twice more than the product needs. VNNI multiplies u8 x s8, so
// the codes go in as q + 128 and 128 * sum_k w[n, k] is taken back out.
template <int MB>
void i8_rows(const int8_t* w, const uint8_t* const* xu, int64_t K, int64_t n0, int64_t n1,
             int32_t* acc, int64_t m0, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * K;
#if SF_AVX512 && defined(__AVX512VNNI__)
    __m512i a[MB];
    for (int m = 0; m < MB; ++m) a[m] = _mm512_setzero_si512();
    __m512i sw = _mm512_setzero_si512();
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t k = 0; k < K; k += 64) {
      const int64_t r = K - k;
      const __mmask64 mask = r >= 64 ? ~static_cast<__mmask64>(0) : ((static_cast<__mmask64>(1) << r) - 1);
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, wr + k);
      sw = _mm512_dpbusd_epi32(sw, ones, wv);
      for (int m = 0; m < MB; ++m) a[m] = _mm512_dpbusd_epi32(a[m], _mm512_maskz_loadu_epi8(mask, xu[m] + k), wv);
    }
    const int32_t corr = 128 * _mm512_reduce_add_epi32(sw);
    for (int m = 0; m < MB; ++m) acc[(m0 + m) * N + n] = _mm512_reduce_add_epi32(a[m]) - corr;
#else
    for (int m = 0; m < MB; ++m) {
      int32_t t = 0;
      for (int64_t k = 0; k < K; ++k) t += (static_cast<int32_t>(xu[m][k]) - 128) * static_cast<int32_t>(wr[k]);
      acc[(m0 + m) * N + n] = t;
    }
#endif
  }
}

}  // namespace

// q [M, K] int8 x w [N, K] int8 -> [M, N] int32: our row-streaming product up to
// kMaxTokenBlock tokens, torch._int_mm beyond (both exact).
torch::Tensor int8_mm(const torch::Tensor& q, const torch::Tensor& w) {
  const int64_t M = q.size(0), K = q.size(1), N = w.size(0);
  if (M > kMaxTokenBlock) return at::_int_mm(q, w.t());
  auto wc = w.contiguous();
  std::vector<uint8_t> xu(static_cast<size_t>(M * K));
  const int8_t* qp = q.data_ptr<int8_t>();
  for (int64_t i = 0; i < M * K; ++i) xu[i] = static_cast<uint8_t>(static_cast<int32_t>(qp[i]) + 128);
  auto acc = torch::empty({M, N}, q.options().dtype(torch::kInt32));
  int32_t* ap = acc.data_ptr<int32_t>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  over_tiles(N, M, 64, [&](int64_t t0, int64_t t1, int64_t m0, int mb) {
    const uint8_t* xr[kMaxTokenBlock];
    for (int i = 0; i < mb; ++i) xr[i] = xu.data() + (m0 + i) * K;
    with_block(mb, [&](auto B) { i8_rows<decltype(B)::value>(wp, xr, K, t0, t1, ap, m0, N); });
  });
  return acc;
}

namespace {

// Row m of x [M, K] -> int8 codes q[m, :] = clamp(round(x * (1 / s_m)), -127, 127) with the
// per-token step s_m = min(max_k |x[m, k]|, lim) / 127 (floored at 1e-30 / 127). Same float
// operations as the pure-PyTorch path (absmax, clamp_min, / 127, reciprocal, x * r,
// round-half-even), so the codes match bit for bit.
void quantize_row(const float* xr, int64_t K, float lim, int8_t* qr, float* s_out) {
  float amax = 0.f;
  int64_t k = 0;
#if SF_AVX512
  __m512 vmax = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + k)));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
  amax = std::min(amax, lim);
  amax = std::max(amax, 1e-30f);
  const float s = amax / 127.f;
  *s_out = s;
  k = 0;
#if SF_AVX512
  const float inv = 1.f / s;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (; k + 16 <= K; k += 16) {
    // x * r rounded to nearest-even (the default MXCSR mode), clamped: the same codes as
    // torch.round(x * r).clamp(-127, 127)
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xr + k), vinv));
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), _mm512_cvtsepi32_epi8(v));
  }
#endif
#if !SF_AVX512
  const float inv = 1.f / s;
#endif
  for (; k < K; ++k) {
    float v = std::nearbyint(xr[k] * inv);
    v = std::min(127.f, std::max(-127.f, v));
    qr[k] = static_cast<int8_t>(v);
  }
}

// y[m, n] = (float(acc[m, n]) * ws[n]) * s[m] (+ b[n]): the pure-PyTorch path's order of roundings.
void dequant_row(const int32_t* ar, const float* ws, float s, const float* b, int64_t N, float* yr) {
  int64_t n = 0;
#if SF_AVX512
  const __m512 vs = _mm512_set1_ps(s);
  for (; n + 16 <= N; n += 16) {
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(ar + n)), _mm512_loadu_ps(ws + n));
    v = _mm512_mul_ps(v, vs);
    if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + n));
    _mm512_storeu_ps(yr + n, v);
  }
#endif
  for (; n < N; ++n) {
    float v = static_cast<float>(ar[n]) * ws[n];
    v = v * s;
    if (b) v = v + b[n];
    yr[n] = v;
  }
}

// The static clip 127 * act_scale (as float32, like torch's 127 * s), or +inf without one.
float static_lim(const c10::optional<torch::Tensor>& act_scale, const char* what) {
  if (act_scale.has_value() && act_scale->defined()) {
    TORCH_CHECK(act_scale->numel() == 1, what, ": act_scale must hold one value");
    return 127.f * act_scale->to(torch::kFloat32).item<float>();
  }
  return std::numeric_limits<float>::infinity();
}

// Every row of x [M, K] to int8 codes q [M, K] and its step s [M] (quantize_row, rows in parallel).
std::pair<torch::Tensor, torch::Tensor> quantize_rows(const torch::Tensor& x, float lim) {
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  auto s = torch::empty({M}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * K, K, lim, qp + m * K, sp + m);
  });
  return {q, s};
}

// y [M, N] = acc [M, N] rescaled by ws [N] and s [M], plus the bias [N] if any (dequant_row).
torch::Tensor dequant_rows(const torch::Tensor& acc, const torch::Tensor& ws, const torch::Tensor& s,
                           const c10::optional<torch::Tensor>& bias, const char* what) {
  const int64_t M = acc.size(0), N = acc.size(1);
  const float* bp = nullptr;
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->to(torch::kFloat32).contiguous();
    TORCH_CHECK(bc.numel() == N, what, ": bias must have one entry per output row");
    bp = bc.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, s.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* wsp = ws.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) dequant_row(ap + m * N, wsp, sp[m], bp, N, yp + m * N);
  });
  return y;
}

}  // namespace

// W8A8 linear with per-token int8 activations (survey Eq. 5):
//   x [M, K] f32, w [N, K] int8 (per-output-channel codes), wscale [N] f32, bias [N] f32 or None,
//   act_scale: a calibrated static scale (one float) or None; inputs beyond +-127 * act_scale are
//   clipped, and the grid inside that range is still per token.
// One pass quantizes x (per-token absmax + codes), torch's int8 GEMM (_int_mm, int32
// accumulation) multiplies, one pass rescales: no float temporaries of x or y besides y itself.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor wscale,
                          c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> act_scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "w8a8_linear: x must be 2-D float32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kInt8, "w8a8_linear: w must be 2-D int8");
  TORCH_CHECK(w.size(1) == x.size(1), "w8a8_linear: K mismatch (x ", x.size(1), ", w ", w.size(1), ")");
  TORCH_CHECK(wscale.scalar_type() == torch::kFloat32 && wscale.numel() == w.size(0),
              "w8a8_linear: wscale must be float32 with one entry per output row");
  auto [q, s] = quantize_rows(x.contiguous(), static_lim(act_scale, "w8a8_linear"));
  return dequant_rows(int8_mm(q, w), wscale.contiguous(), s, bias, "w8a8_linear");
}

namespace {

#if SF_AVX512
// e^x, Cephes-style: 2^n * p(r) with |r| <= ln2 / 2, x clamped to where fp32 e^x is finite and
// normal (relative error ~1e-7).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// silu(g) * u = g * u / (1 + e^-g)
inline __m512 silu_mul(__m512 g, __m512 u) {
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(e, _mm512_set1_ps(1.f)));
}
#endif

}  // namespace

// A gated MLP in W8A8, one call: down(silu(gate(x)) * up(x)) with
//   x [M, K] f32; wgu [2I, K] int8 (gate rows, then up rows) with scales sgu [2I]; wd [H, I]
//   int8 with scales sd [H], bias bd [H] or None; agu / ad: static clips (or None) of the two
//   GEMM inputs. x is quantized per token, gate/up is one int8 GEMM, and each row of its int32
//   output is rescaled, passed through silu * up and quantized per token for the down GEMM
//   while it sits in L1 -- the gate/up activations never exist in fp32 in memory.
torch::Tensor w8a8_gated_mlp(torch::Tensor x, torch::Tensor wgu, torch::Tensor sgu,
                             c10::optional<torch::Tensor> agu, torch::Tensor wd, torch::Tensor sd,
                             c10::optional<torch::Tensor> bd, c10::optional<torch::Tensor> ad) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "w8a8_gated_mlp: x must be 2-D float32");
  TORCH_CHECK(wgu.dim() == 2 && wgu.scalar_type() == torch::kInt8 && wd.dim() == 2 && wd.scalar_type() == torch::kInt8,
              "w8a8_gated_mlp: weights must be 2-D int8");
  TORCH_CHECK(wgu.size(1) == x.size(1), "w8a8_gated_mlp: K mismatch");
  TORCH_CHECK(wgu.size(0) % 2 == 0 && wd.size(1) * 2 == wgu.size(0),
              "w8a8_gated_mlp: gate/up must have 2 x ", wd.size(1), " rows, got ", wgu.size(0));
  TORCH_CHECK(sgu.scalar_type() == torch::kFloat32 && sgu.numel() == wgu.size(0) &&
              sd.scalar_type() == torch::kFloat32 && sd.numel() == wd.size(0),
              "w8a8_gated_mlp: scales must be float32, one per output row");
  sgu = sgu.contiguous();
  const int64_t M = x.size(0), I = wd.size(1);
  const float lim_d = static_lim(ad, "w8a8_gated_mlp");
  auto [q, s] = quantize_rows(x.contiguous(), static_lim(agu, "w8a8_gated_mlp"));
  auto acc = int8_mm(q, wgu);  // [M, 2I] int32
  auto hq = torch::empty({M, I}, x.options().dtype(torch::kInt8));
  auto sh = torch::empty({M}, x.options());
  {
    const int32_t* ap = acc.data_ptr<int32_t>();
    const float* wsp = sgu.data_ptr<float>();
    const float* sp = s.data_ptr<float>();
    int8_t* hp = hq.data_ptr<int8_t>();
    float* shp = sh.data_ptr<float>();
    at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(I, 1)), [&](int64_t m0, int64_t m1) {
      std::vector<float> g(static_cast<size_t>(I)), u(static_cast<size_t>(I));
      for (int64_t m = m0; m < m1; ++m) {
        const int32_t* ar = ap + m * 2 * I;
        dequant_row(ar, wsp, sp[m], nullptr, I, g.data());
        dequant_row(ar + I, wsp + I, sp[m], nullptr, I, u.data());
        int64_t j = 0;
#if SF_AVX512
        for (; j + 16 <= I; j += 16)
          _mm512_storeu_ps(g.data() + j, silu_mul(_mm512_loadu_ps(g.data() + j), _mm512_loadu_ps(u.data() + j)));
#endif
        for (; j < I; ++j) g[j] = g[j] * u[j] / (1.f + std::exp(-g[j]));
        quantize_row(g.data(), I, lim_d, hp + m * I, shp + m);
      }
    });
  }
  return dequant_rows(int8_mm(hq, wd), sd.contiguous(), sh, bd, "w8a8_gated_mlp");
}

// ============================================================================================
// Attention: softmax(q k^T * scale + causal mask | additive bias) v, GQA read in place.
//
// Causal prefill (a square prompt):
// PyTorch's CPU flash kernel splits a 512-token prompt into query tiles against ONE 512-key
// tile, so a causal prompt pays for the whole square and masks half of it away. Here each task
// is (batch, head, block of kAttnRows query rows) and computes only the keys up to its last row:
// scores for 8 query rows x 32 keys stay in 16 registers (k is pre-transposed to [D, L] so a
// key tile is two contiguous vector loads per d), the softmax runs in place on that row block,
// and P V runs 4 rows x 64 values at a time. Tasks are handed out largest first, dynamically.
// fp32 throughout: the same sums as SDPA in another order (agrees to float rounding).
//
// Masked (masked_attention): every key visible, a per-key additive bias row added before the
// softmax. For short sequences (an encoder batch of 10-20-token sentences: SDPA's CPU kernel
// costs ~2.5 ms per call there whatever the length).
// ============================================================================================
namespace {

constexpr int64_t kAttnRows = 32;  // query rows per task

// S[r, j0 .. j0+32) = scale * q_r . k_j for MR query rows; kt is [D, L] (row stride L).
template <int MR>
inline void qk_tile(const float* const* qr, const float* kt, int64_t L, int64_t D, int64_t j0,
                    int64_t jn, float scale, float* S, int64_t lds) {
#if SF_AVX512
  const __mmask16 m0 = tail_mask(jn), m1 = tail_mask(jn - 16 > 0 ? jn - 16 : 0);
  __m512 a0[MR], a1[MR];
  for (int r = 0; r < MR; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  for (int64_t d = 0; d < D; ++d) {
    const float* kr = kt + d * L + j0;
    const __m512 k0 = _mm512_maskz_loadu_ps(m0, kr);
    const __m512 k1 = _mm512_maskz_loadu_ps(m1, kr + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 qb = _mm512_set1_ps(qr[r][d]);
      a0[r] = _mm512_fmadd_ps(qb, k0, a0[r]);
      a1[r] = _mm512_fmadd_ps(qb, k1, a1[r]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(S + r * lds + j0, m0, _mm512_mul_ps(a0[r], vs));
    _mm512_mask_storeu_ps(S + r * lds + j0 + 16, m1, _mm512_mul_ps(a1[r], vs));
  }
#else
  for (int r = 0; r < MR; ++r)
    for (int64_t j = j0; j < j0 + jn; ++j) {
      float a = 0.f;
      for (int64_t d = 0; d < D; ++d) a += qr[r][d] * kt[d * L + j];
      S[r * lds + j] = a * scale;
    }
#endif
}

// out_r[d0 .. d0 + 16 DV) = inv_r * sum_{j < jn} P[r, j] v_j[d0 ..] for MR rows.
template <int MR, int DV>
inline void pv_tile(const float* const* pr, const float* v, int64_t ldv, int64_t jn, int64_t d0,
                    float* const* outr, const float* inv) {
#if SF_AVX512
  __m512 acc[MR][DV];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < jn; ++j) {
    const float* vr = v + j * ldv + d0;
    __m512 vv[DV];
    for (int c = 0; c < DV; ++c) vv[c] = _mm512_loadu_ps(vr + 16 * c);
    for (int r = 0; r < MR; ++r) {
      const __m512 pb = _mm512_set1_ps(pr[r][j]);
      for (int c = 0; c < DV; ++c) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 vi = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(outr[r] + d0 + 16 * c, _mm512_mul_ps(acc[r][c], vi));
  }
#else
  for (int r = 0; r < MR; ++r)
    for (int64_t d = d0; d < d0 + 16 * DV; ++d) {
      float a = 0.f;
      for (int64_t j = 0; j < jn; ++j) a += pr[r][j] * v[j * ldv + d];
      outr[r][d] = a * inv[r];
    }
#endif
}

// Softmax in place over keys 0..n-1 of one row (S holds scaled scores; ``bias``, if given,
// is added first: an additive mask row); zeroes keys n..jend-1. Returns 1 / sum, or 0 for a
// row that sees no key at all (every bias -inf): its output is then zero, not NaN.
inline float softmax_row(float* s, const float* bias, int64_t n, int64_t jend) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if SF_AVX512
  __m512 vmx = _mm512_set1_ps(mx);
  for (; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    __m512 x = _mm512_maskz_loadu_ps(m, s + j);
    if (bias) {
      x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + j));
      _mm512_mask_storeu_ps(s + j, m, x);
    }
    vmx = _mm512_mask_max_ps(vmx, m, vmx, x);
  }
  mx = _mm512_reduce_max_ps(vmx);
#else
  for (; j < n; ++j) {
    if (bias) s[j] += bias[j];
    mx = std::max(mx, s[j]);
  }
#endif
  if (mx == -std::numeric_limits<float>::infinity()) {
    for (j = 0; j < jend; ++j) s[j] = 0.f;
    return 0.f;
  }
#if SF_AVX512
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vm));
    const __m512 em = _mm512_maskz_mov_ps(m, e);
    vsum = _mm512_add_ps(vsum, em);
    _mm512_mask_storeu_ps(s + j, m, em);
  }
  const float sum = _mm512_reduce_add_ps(vsum);
#else
  float sum = 0.f;
  for (j = 0; j < n; ++j) { s[j] = std::exp(s[j] - mx); sum += s[j]; }
#endif
  for (j = n; j < jend; ++j) s[j] = 0.f;
  return 1.f / sum;
}

template <typename Fn>
void with_1to4(int v, const Fn& fn) {  // fn(std::integral_constant<int, v>{}) for v in 1..4
  switch (v) {
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 1>{}); break;
  }
}

// out_r = inv_r * sum_{j < jn} P[r, j] v_j for mr <= 4 rows, the whole head dim D in pv_tile
// chunks of up to 64 values.
inline void pv_rows(const float* const* pr, int mr, const float* v, int64_t ldv, int64_t jn, int64_t D,
                    float* const* outr, const float* inv) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int dv = static_cast<int>(std::min<int64_t>(64, D - d0) / 16);
    with_1to4(mr, [&](auto M) {
      with_1to4(dv, [&](auto V) { pv_tile<decltype(M)::value, decltype(V)::value>(pr, v, ldv, jn, d0, outr, inv); });
    });
  }
}

}  // namespace

namespace {

// The checks every attention kernel makes: q [B, H, Lq, D], k / v [B, Hkv, Lk, D] float32, H a
// multiple of Hkv, D a multiple of 16.
void check_qkv(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const char* who) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, who, ": q, k, v must be 4-D [B, H, L, D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
              v.scalar_type() == torch::kFloat32, who, ": float32 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hk = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hk && v.size(2) == Lk &&
              k.size(3) == D && v.size(3) == D, who, ": k / v must be [B, Hkv, Lk, D] matching q");
  TORCH_CHECK(Hk > 0 && H % Hk == 0, who, ": ", H, " heads do not share ", Hk, " kv heads evenly");
  TORCH_CHECK(D % 16 == 0, who, ": head dim ", D, " is not a multiple of 16");
}

// softmax(q k^T * scale + bias [+ causal mask]) v. q [B, H, Lq, D], k / v [B, Hkv, Lk, D]
// float32 (H a multiple of Hkv, D a multiple of 16; causal needs Lq == Lk); bias: undefined
// or float32 broadcastable to [B, 1, Lq, Lk] (an additive mask shared by the heads) -> out
// [B, Lq, H, D] contiguous (the layout attention modules reshape from).
torch::Tensor attention_impl(torch::Tensor q, torch::Tensor k, torch::Tensor v, const torch::Tensor& bias,
                             bool causal, double scale, const char* who) {
  check_qkv(q, k, v, who);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hk = k.size(1), Lk = k.size(2);
  TORCH_CHECK(!causal || Lk == L, who, ": a causal square needs as many keys as queries (", L, " vs ", Lk, ")");
  const float* bp = nullptr;
  int64_t bsb = 0, bsq = 0;
  torch::Tensor bx;
  if (bias.defined()) {
    TORCH_CHECK(bias.scalar_type() == torch::kFloat32, who, ": bias must be float32");
    TORCH_CHECK(bias.dim() == 4 && (bias.size(0) == B || bias.size(0) == 1) && bias.size(1) == 1 &&
                (bias.size(2) == L || bias.size(2) == 1) && bias.size(3) == Lk,
                who, ": bias must be [B|1, 1, Lq|1, Lk] = [", B, ", 1, ", L, ", ", Lk, "], got ", bias.sizes());
    bx = bias.stride(3) == 1 ? bias : bias.contiguous();
    bp = bx.data_ptr<float>();
    bsb = bx.size(0) == 1 ? 0 : bx.stride(0);
    bsq = bx.size(2) == 1 ? 0 : bx.stride(2);
  }
  if (q.stride(3) != 1) q = q.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  auto kt = k.transpose(2, 3).contiguous();  // [B, Hkv, D, Lk]: a key tile is a row segment
  auto out = torch::empty({B, L, H, D}, q.options());
  const int64_t G = H / Hk;
  const int64_t nblk = (L + kAttnRows - 1) / kAttnRows;
  const int64_t ntask = B * H * nblk;
  const float* qp = q.data_ptr<float>();
  const float* ktp = kt.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsl = q.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsl = v.stride(2);
  const float fscale = static_cast<float>(scale);
  const int64_t lds = ((Lk + 31) / 32) * 32;
  const int nthreads = std::max(1, at::get_num_threads());

  // tasks handed out dynamically inside PyTorch's own thread pool (an OpenMP region of our own
  // next to ATen's GEMMs made both slower in a model forward)
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
  for (int64_t t = next_task.fetch_add(1); t < ntask; t = next_task.fetch_add(1)) {
    const int64_t blk = nblk - 1 - t / (B * H);  // largest blocks first
    const int64_t bh = t % (B * H);
    const int64_t b = bh / H, h = bh % H, hk = h / G;
    const int64_t r0 = blk * kAttnRows, r1 = std::min(L, r0 + kAttnRows);
    thread_local std::vector<float> sbuf;
    sbuf.resize(static_cast<size_t>(kAttnRows * lds));
    float* S = sbuf.data();
    const float* qb = qp + b * qsb + h * qsh;
    const float* ktb = ktp + (b * Hk + hk) * D * Lk;
    const float* vb = vp + b * vsb + hk * vsh;
    // scores: row groups of 8, key tiles of 32 (causal: up to the group's last row)
    for (int64_t i0 = r0; i0 < r1; i0 += kMaxTokenBlock) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxTokenBlock, r1 - i0));
      const float* qr[kMaxTokenBlock];
      for (int r = 0; r < mr; ++r) qr[r] = qb + (i0 + r) * qsl;
      const int64_t jend = causal ? i0 + mr : Lk;  // keys visible to some row of the group
      for (int64_t j0 = 0; j0 < jend; j0 += 32) {
        const int64_t jn = std::min<int64_t>(32, jend - j0);
        with_block(mr, [&](auto R) {
          qk_tile<decltype(R)::value>(qr, ktb, Lk, D, j0, jn, fscale, S + (i0 - r0) * lds, lds);
        });
      }
    }
    float inv[kAttnRows];
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t grp_end = std::min(r1, r0 + ((i - r0) / kMaxTokenBlock + 1) * kMaxTokenBlock);
      const float* brow = bp ? bp + b * bsb + i * bsq : nullptr;
      inv[i - r0] = causal ? softmax_row(S + (i - r0) * lds, brow, i + 1, grp_end)
                           : softmax_row(S + (i - r0) * lds, brow, Lk, Lk);
    }
    for (int64_t i0 = r0; i0 < r1; i0 += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, r1 - i0));
      const float* pr[4];
      float* orow[4];
      for (int r = 0; r < mr; ++r) {
        pr[r] = S + (i0 - r0 + r) * lds;
        orow[r] = op + ((b * L + i0 + r) * H + h) * D;
      }
      const int64_t jn = causal ? i0 + mr : Lk;  // causal: P is zero past each row's own position
      pv_rows(pr, mr, vb, vsl, jn, D, orow, inv + (i0 - r0));
    }
  }
  });
  return out;
}

}  // namespace

// Causal prefill: q [B, H, L, D], k / v [B, Hkv, L, D] -> [B, L, H, D].
torch::Tensor causal_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  return attention_impl(q, k, v, torch::Tensor(), true, scale, "causal_attention");
}

// Bidirectional (encoder) attention with an optional additive mask bias [B|1, 1, Lq|1, Lk]
// shared by the heads: q [B, H, Lq, D], k / v [B, Hkv, Lk, D] -> [B, Lq, H, D]. A query row
// whose every key is masked with -inf gets a zero output.
torch::Tensor masked_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               c10::optional<torch::Tensor> bias, double scale) {
  return attention_impl(q, k, v, bias.has_value() ? *bias : torch::Tensor(), false, scale, "masked_attention");
}

namespace {
// sum_d a[d] b[d] for D a multiple of 16.
inline float dot_f32(const float* a, const float* b, int64_t D) {
#if SF_AVX512
  __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
  for (int64_t d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  return _mm512_reduce_add_ps(acc);
#else
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += a[d] * b[d];
  return acc;
#endif
}
}  // namespace

// Decode / verify attention over a KV cache: Q new queries per row (a one-token decode step or
// a speculative verify step) against the cache's keys, no mask tensor. Query i of row b sits at
// slot s = first[b] + i and sees the keys start[b] .. s (a contiguous range: left padding before
// start[b], later draft tokens after s); a pad query (s < start[b]) sees only key s (the
// decoding loop's convention: its output is never used). q [B, H, Q, D]; k / v [B, Hkv, T, D]
// (views of the cache, any strides but unit stride on D; T > every s) -> out [B, Q, H, D].
//
// SDPA's CPU kernel costs ~30 us for one query against 160 keys (SmolLM2: 9 heads, 3 KV heads)
// and ~90 us for 8 queries with a mask, mostly fixed costs; a compiled step with the whole
// masked cache pays ~60 us. Here one task is one (row, KV head): each visible key is read once
// in place and dotted with the G query heads x Q queries that share that KV head, then
// softmax_row and pv_tile as in attention_impl. Row i's result does not depend on
// Q (the same sums in the same order; P is exactly 0 past a query's own slot), so a verify step
// and a one-token step compute the same attention for the same query.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor start,
                               torch::Tensor first, double scale) {
  const char* who = "decode_attention";
  check_qkv(q, k, v, who);
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), D = q.size(3), Hk = k.size(1), T = k.size(2);
  TORCH_CHECK(start.dim() == 1 && first.dim() == 1 && start.size(0) == B && first.size(0) == B &&
              start.scalar_type() == torch::kLong && first.scalar_type() == torch::kLong,
              who, ": start / first must be int64 [B]");
  start = start.contiguous();
  first = first.contiguous();
  const int64_t* sp = start.data_ptr<int64_t>();
  const int64_t* fp = first.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(fp[b] >= 0 && sp[b] >= 0 && fp[b] + Q <= T, who, ": row ", b, " writes slots ", fp[b], "..",
                fp[b] + Q - 1, " outside the ", T, " cache slots");
  if (q.stride(3) != 1) q = q.contiguous();
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  auto out = torch::empty({B, Q, H, D}, q.options());
  const int64_t G = H / Hk, R = G * Q;  // query rows per task: (head g, query i), i fastest
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsl = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksl = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsl = v.stride(2);
  const float fscale = static_cast<float>(scale);
  const int64_t ntask = B * Hk;

  auto task = [&](int64_t t) {
    const int64_t b = t / Hk, hk = t % Hk;
    const int64_t lo = sp[b], last = fp[b] + Q - 1;  // keys lo .. last cover every query of the row
    const int64_t n = std::max<int64_t>(last - lo + 1, 1);
    const int64_t kb = std::min(lo, last);  // all-pad row: one key, its own slot (below)
    const int64_t lds = ((n + 15) / 16) * 16;
    thread_local std::vector<float> sbuf, ibuf;
    sbuf.resize(static_cast<size_t>(R * lds));
    ibuf.resize(static_cast<size_t>(R));
    float* S = sbuf.data();
    const float* kbase = kp + b * ksb + hk * ksh + kb * ksl;
    const float* vbase = vp + b * vsb + hk * vsh + kb * vsl;
    auto qrow = [&](int64_t r) { return qp + b * qsb + (hk * G + r / Q) * qsh + (r % Q) * qsl; };
    auto orow = [&](int64_t r) { return op + ((b * Q + r % Q) * H + hk * G + r / Q) * D; };
    // scores: one key row at a time against every query row (a dot product each; the keys are
    // read in place, in cache order)
    for (int64_t j = 0; j < n; ++j) {
      const float* kr = kbase + j * ksl;
      for (int64_t r = 0; r < R; ++r) S[r * lds + j] = fscale * dot_f32(qrow(r), kr, D);
    }
    float* inv = ibuf.data();
    for (int64_t r = 0; r < R; ++r) {
      const int64_t s = fp[b] + r % Q;
      inv[r] = softmax_row(S + r * lds, nullptr, std::max<int64_t>(s - kb + 1, 1), n);
    }
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, R - r0));
      const float* pr[4];
      float* orr[4];
      for (int r = 0; r < mr; ++r) { pr[r] = S + (r0 + r) * lds; orr[r] = orow(r0 + r); }
      pv_rows(pr, mr, vbase, vsl, n, D, orr, inv + r0);
    }
    for (int64_t r = 0; r < R; ++r) {  // a pad query (slot before start) sees only its own key
      const int64_t s = fp[b] + r % Q;
      if (s < lo) std::memcpy(orow(r), vp + b * vsb + hk * vsh + s * vsl, sizeof(float) * D);
    }
  };
  // small work (a one-token step: ~0.1 M multiply-adds) stays on the calling thread: handing
  // three tasks to the pool costs more than computing them
  int64_t work = 0;  // multiply-adds of the scores
  for (int64_t b = 0; b < B; ++b) work += H * Q * std::max<int64_t>(fp[b] + Q - sp[b], 1) * D;
  if (ntask == 1 || work < (int64_t{1} << 19)) {
    for (int64_t t = 0; t < ntask; ++t) task(t);
  } else {
    std::atomic<int64_t> next{0};
    const int64_t nthreads = std::min<int64_t>(std::max(1, at::get_num_threads()), ntask);
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
      for (int64_t t = next.fetch_add(1); t < ntask; t = next.fetch_add(1)) task(t);
    });
  }
  return out;
}

// ============================================================================================
// EViT token reduction between two encoder blocks, in one call (slimformer/prune/tokens.py is
// the reference: attention_received(mode="cls"), evit_keep, fuse_tokens, compact). Between
// blocks of a 64-sentence batch of 10-20 tokens these are ~40 PyTorch ops on tensors of a few
// thousand elements, ~1 ms per block in op overhead; here ~0.1 ms. Per row b:
//   scores[t] = mean over heads of softmax_t(scale * q[b, 0, head] . k[b, t, head] + bias[t]),
//               bias = log(size) (proportional) or 0 on present tokens (size > 0), absent excluded;
//   keep [CLS] (protect_first) and the ceil(keep_rate * (n - 1)) best other present tokens
//   (float32 arithmetic, ties to the lower index, as the stable argsort there);
//   dropped = present & !keep: mode 0 fuse (append the scores-weighted mean of the dropped, size
//   = their summed sizes; size-weighted when every weight is 0), 1 drop, 2 pool (return their
//   size-weighted sum and summed size);
//   out: the kept tokens in order (then the fused one), rows padded with zeros / size 0 to the
//   longest row.
// h, q, k [B, T, C] float32 (q/k: the block's query/key projections, C = heads x head dim),
// size [B, T] float32 -> (h' [B, T', C], size' [B, T'], scores [B, T], left_sum [B, C],
// left_size [B]).
// ============================================================================================
std::vector<torch::Tensor> evit_reduce(torch::Tensor h, torch::Tensor q, torch::Tensor k, torch::Tensor size,
                                       int64_t num_heads, double scale, bool proportional, double keep_rate,
                                       bool protect_first, int64_t mode) {
  TORCH_CHECK(h.dim() == 3 && q.sizes() == k.sizes() && q.dim() == 3 && q.size(0) == h.size(0) &&
              q.size(1) == h.size(1), "evit_reduce: h, q, k must be [B, T, C] alike");
  TORCH_CHECK(h.scalar_type() == torch::kFloat32 && q.scalar_type() == torch::kFloat32 &&
              k.scalar_type() == torch::kFloat32 && size.scalar_type() == torch::kFloat32,
              "evit_reduce: float32 only");
  TORCH_CHECK(size.dim() == 2 && size.size(0) == h.size(0) && size.size(1) == h.size(1),
              "evit_reduce: size must be [B, T]");
  TORCH_CHECK(num_heads > 0 && q.size(2) % num_heads == 0, "evit_reduce: ", q.size(2),
              " channels do not split into ", num_heads, " heads");
  TORCH_CHECK(mode >= 0 && mode <= 2, "evit_reduce: mode must be 0 (fuse), 1 (drop) or 2 (pool)");
  h = h.contiguous(); q = q.contiguous(); k = k.contiguous(); size = size.contiguous();
  const int64_t B = h.size(0), T = h.size(1), C = h.size(2), QC = q.size(2), D = QC / num_heads;
  const float* hp = h.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* sp = size.data_ptr<float>();
  auto scores = torch::zeros({B, T}, h.options());
  auto left_sum = torch::zeros({B, C}, h.options());
  auto left_size = torch::zeros({B}, h.options());
  float* scp = scores.data_ptr<float>();
  std::vector<uint8_t> keep(static_cast<size_t>(B * T), 0);
  std::vector<int64_t> count(static_cast<size_t>(B), 0);
  std::vector<float> fsize(static_cast<size_t>(B), 0.f);
  std::vector<float> fused(mode == 0 ? static_cast<size_t>(B * C) : 0, 0.f);
  const float kr = static_cast<float>(keep_rate);
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> logit(static_cast<size_t>(T));
    std::vector<int64_t> order;
    for (int64_t b = b0; b < b1; ++b) {
      const float* sz = sp + b * T;
      float* sc = scp + b * T;
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) n += sz[t] > 0.f;
      // attention each token receives from query 0, averaged over heads
      for (int64_t hd = 0; hd < num_heads; ++hd) {
        const float* q0 = qp + b * T * QC + hd * D;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < T; ++t) {
          if (!(sz[t] > 0.f)) continue;
          const float* kt = kp + (b * T + t) * QC + hd * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += q0[d] * kt[d];
          logit[t] = dot * fscale + (proportional ? std::log(std::max(sz[t], 1e-12f)) : 0.f);
          mx = std::max(mx, logit[t]);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < T; ++t)
          if (sz[t] > 0.f) { logit[t] = std::exp(logit[t] - mx); sum += logit[t]; }
        const float w = 1.f / (sum * static_cast<float>(num_heads));
        for (int64_t t = 0; t < T; ++t)
          if (sz[t] > 0.f) sc[t] += logit[t] * w;
      }
      // which tokens stay
      const bool cls = protect_first && sz[0] > 0.f;
      int64_t n_keep = protect_first
          ? static_cast<int64_t>(std::ceil(kr * static_cast<float>(std::max<int64_t>(n - 1, 0)))) + (cls ? 1 : 0)
          : static_cast<int64_t>(std::ceil(kr * static_cast<float>(n)));
      n_keep = std::min(n_keep, n);
      order.clear();
      for (int64_t t = 0; t < T; ++t)
        if (sz[t] > 0.f) order.push_back(t);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) {
        const float sa = (cls && a == 0) ? std::numeric_limits<float>::infinity() : sc[a];
        const float sb = (cls && c == 0) ? std::numeric_limits<float>::infinity() : sc[c];
        return sa > sb;
      });
      uint8_t* kb = keep.data() + b * T;
      for (int64_t i = 0; i < n_keep; ++i) kb[order[static_cast<size_t>(i)]] = 1;
      // what becomes of the others
      float wsum = 0.f, ssum = 0.f;
      for (int64_t t = 0; t < T; ++t)
        if (sz[t] > 0.f && !kb[t]) { wsum += std::max(sc[t], 0.f); ssum += sz[t]; }
      if (mode != 1 && ssum > 0.f) {
        const bool by_size = mode == 2 || !(wsum > 0.f);
        const float den = mode == 2 ? 1.f : std::max(by_size ? ssum : wsum, 1e-12f);
        float* acc = mode == 0 ? fused.data() + b * C : left_sum.data_ptr<float>() + b * C;
        for (int64_t t = 0; t < T; ++t) {
          if (!(sz[t] > 0.f) || kb[t]) continue;
          const float wt = (by_size ? sz[t] : std::max(sc[t], 0.f)) / den;
          const float* xr = hp + (b * T + t) * C;
          for (int64_t c = 0; c < C; ++c) acc[c] += wt * xr[c];
        }
        if (mode == 2) left_size.data_ptr<float>()[b] = ssum;
      }
      fsize[static_cast<size_t>(b)] = mode == 0 ? ssum : 0.f;
      count[static_cast<size_t>(b)] = n_keep + (mode == 0 && ssum > 0.f ? 1 : 0);
    }
  });
  const int64_t Tn = std::max<int64_t>(1, *std::max_element(count.begin(), count.end()));
  auto hout = torch::zeros({B, Tn, C}, h.options());
  auto sout = torch::zeros({B, Tn}, h.options());
  float* hop = hout.data_ptr<float>();
  float* sop = sout.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t j = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (!keep[static_cast<size_t>(b * T + t)]) continue;
        std::memcpy(hop + (b * Tn + j) * C, hp + (b * T + t) * C, sizeof(float) * C);
        sop[b * Tn + j] = sp[b * T + t];
        ++j;
      }
      if (mode == 0 && fsize[static_cast<size_t>(b)] > 0.f) {
        std::memcpy(hop + (b * Tn + j) * C, fused.data() + b * C, sizeof(float) * C);
        sop[b * Tn + j] = fsize[static_cast<size_t>(b)];
      }
    }
  });
  return {hout, sout, scores, left_sum, left_size};
}

// ============================================================================================
// RMSNorm and rotary embedding for the decoding loop's eager steps: the same values as the
// PyTorch ops of transformers' Llama-family RMSNorm and of slimformer's apply_rotary, bit for
// bit, in one call each instead of five to eight small ops (see slimformer/kernels/elementwise.py).
// ============================================================================================

namespace {

// ATen's CeilLog2 (native/cpu/utils.h).
inline int64_t aten_ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int64_t b = 0;
  for (uint64_t v = static_cast<uint64_t>(x - 1); v; v >>= 1) ++b;
  return b;
}

// sum_k v[k] * v[k] in the order of ATen's float sum over a contiguous row (cascade_sum's
// row_sum: the row read as W-float vectors, 4 interleaved accumulators, cascade levels of 16
// groups; then the scalar tail and the W lanes in sequence). x86 runs that kernel's AVX2 build,
// W = 8, also on AVX-512 CPUs; a row shorter than one vector goes through the same row_sum on
// single floats (W = 1). Tested against x.pow(2).mean(-1).
template <int W>
inline float aten_order_sum_squares_w(const float* v, int64_t n) {
  constexpr int ILP = 4, LEVELS = 4;
  const int64_t nvec = n / W, size_ilp = nvec / ILP;
  const int64_t level_power = std::max<int64_t>(4, aten_ceil_log2(size_ilp) / LEVELS);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  float acc[LEVELS][ILP][W] = {};
  auto add_group = [&](int64_t i) {
    for (int k = 0; k < ILP; ++k)
      for (int l = 0; l < W; ++l) {
        const float x = v[(i * ILP + k) * W + l];
        acc[0][k][l] += x * x;
      }
  };
  int64_t i = 0;
  while (i + level_step <= size_ilp) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_group(i);
    for (int j = 1; j < LEVELS; ++j) {
      for (int k = 0; k < ILP; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size_ilp; ++i) add_group(i);
  for (int j = 1; j < LEVELS; ++j)
    for (int k = 0; k < ILP; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t r = size_ilp * ILP; r < nvec; ++r)  // vectors past the last group of 4
    for (int l = 0; l < W; ++l) acc[0][0][l] += v[r * W + l] * v[r * W + l];
  float lanes[W];
  for (int l = 0; l < W; ++l) lanes[l] = acc[0][0][l];
  for (int k = 1; k < ILP; ++k)
    for (int l = 0; l < W; ++l) lanes[l] += acc[0][k][l];
  float total = 0.f;
  for (int64_t t = nvec * W; t < n; ++t) total += v[t] * v[t];
  for (int l = 0; l < W; ++l) total += lanes[l];
  return total;
}

inline float aten_order_sum_squares(const float* v, int64_t n) {
  return n >= 8 ? aten_order_sum_squares_w<8>(v, n) : aten_order_sum_squares_w<1>(v, n);
}

}  // namespace

// x [..., D] f32, weight [D] f32 -> weight * (x * rsqrt(mean(x^2) + eps)) row by row, x's shape:
// the steps of transformers' LlamaRMSNorm in its float32 order.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32, "rms_norm: x must be float32");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.scalar_type() == torch::kFloat32 && weight.size(0) == D,
              "rms_norm: weight must be float32 [", D, "]");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t M = D ? x.numel() / D : 0;
  auto y = torch::empty_like(x, at::MemoryFormat::Contiguous);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, M, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      const float* xr = xp + m * D;
      float* yr = yp + m * D;
      const float var = aten_order_sum_squares(xr, D) / static_cast<float>(D);
      const float r = 1.f / std::sqrt(var + e);
      for (int64_t k = 0; k < D; ++k) yr[k] = wp[k] * (xr[k] * r);
    }
  });
  return y;
}

// x [B, S, H, D] f32 (contiguous), cos / sin [B or 1, S, D] -> x * cos + rotate_half(x) * sin
// with rotate_half([x1, x2]) = [-x2, x1]: apply_rotary's three rounded operations per element.
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32, "rotary: x must be 4-D float32");
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rotary: head dim must be even");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == torch::kFloat32 && (t->size(0) == B || t->size(0) == 1) &&
                    t->size(1) == S && t->size(2) == D,
                "rotary: cos / sin must be float32 [", B, " or 1, ", S, ", ", D, "]");
  x = x.contiguous();
  cos = cos.contiguous();
  sin = sin.contiguous();
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // a batch of 1 is shared by every row (cos and sin each)
  const int64_t h2 = D / 2, cb = cos.size(0) == 1 ? 0 : S * D, sb = sin.size(0) == 1 ? 0 : S * D;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) {
      const float* c = cp + b * cb + s * D;
      const float* n = sp + b * sb + s * D;
      for (int64_t h = 0; h < H; ++h) {
        const float* xr = xp + ((b * S + s) * H + h) * D;
        float* yr = yp + ((b * S + s) * H + h) * D;
        for (int64_t k = 0; k < h2; ++k) yr[k] = xr[k] * c[k] + (-xr[k + h2]) * n[k];
        for (int64_t k = h2; k < D; ++k) yr[k] = xr[k] * c[k] + xr[k - h2] * n[k];
      }
    }
  return y;
}

bool has_avx512() { return SF_AVX512 != 0; }

// As dispatcher ops (torch.ops.slimformer.*): what torch.compile'd graphs call. A Python
// custom op would cost ~10 us of Python per call, more than a small layer's kernel.
TORCH_LIBRARY_FRAGMENT(slimformer, m) {
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, int group_size, float zero_const) -> Tensor");
  m.def("int8w_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero, int group_size, float zero_const) -> Tensor");
  m.def("int8w_linear_cat(Tensor x, Tensor[] qweights, Tensor[] scales, int group_size) -> Tensor");
  m.def("f32_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor start, Tensor first, float scale) -> Tensor");
  m.def("w8a8_gated_mlp(Tensor x, Tensor wgu, Tensor sgu, Tensor? agu, Tensor wd, Tensor sd, Tensor? bd, Tensor? ad) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor w, Tensor wscale, Tensor? bias, Tensor? act_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimformer, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8w_linear", &int8w_linear);
  m.impl("int8w_linear_cat", &int8w_linear_cat);
  m.impl("f32_linear", &f32_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("causal_attention", &causal_attention);
  m.impl("decode_attention", &decode_attention);
  m.impl("w8a8_gated_mlp", &w8a8_gated_mlp);
}

// As plain Python functions: what eager code calls (no dispatcher on the per-step path).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "4-bit weight-only linear for few tokens");
  m.def("int8w_linear", &int8w_linear, "8-bit weight-only linear for few tokens");
  m.def("int8w_linear_cat", &int8w_linear_cat, "several symmetric 8-bit weight-only linears of one input, one call");
  m.def("int8w_dequant", &int8w_dequant, "rows of an 8-bit weight-only weight as float32");
  m.def("int4_dequant", &int4_dequant, "rows of a 4-bit weight-only weight as float32");
  m.def("f32_linear", &f32_linear, "fp32 linear for few tokens (no bias)");
  m.def("w8a8_linear", &w8a8_linear, "W8A8 linear: per-token int8 activations, int8 GEMM, rescale");
  m.def("causal_attention", &causal_attention, "causal prefill attention over a square prompt (GQA)");
  m.def("masked_attention", &masked_attention, "bidirectional attention with an additive mask bias (GQA)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("bias"), py::arg("scale"));
  m.def("decode_attention", &decode_attention, "decode / verify attention of a few queries over a KV cache (GQA)");
  m.def("w8a8_gated_mlp", &w8a8_gated_mlp, "W8A8 gated MLP: down(silu(gate(x)) * up(x)) in one call");
  m.def("evit_reduce", &evit_reduce, "EViT token reduction between encoder blocks (scores, keep, fuse, compact)");
  m.def("rms_norm", &rms_norm, "Llama-family RMSNorm, ATen's float order");
  m.def("rotary", &rotary, "rotary embedding of [B, S, H, D] (apply_rotary's values)");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 paths were compiled");
}
