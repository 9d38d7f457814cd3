// Compiled CPU kernels of dsm-stt: build.py (next to this file) builds it on first use with
// PyTorch's C++ extension loader (-O3 -march=native -fopenmp); ops.py documents each function.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define DSM_AVX2 1
#endif

namespace {

enum Path : int64_t {
  PATH_BEST = 0, PATH_VNNI = 1, PATH_AVX512 = 2, PATH_GENERIC = 3, PATH_AVX2 = 4
};

// The int8 products of the W8A8 projections, by the index ops.PRODUCTS gives them (a new one
// is a new value here, a branch in Projection::apply and a name there).
enum Product : int64_t { PRODUCT_VNNI = 0, PRODUCT_AMX = 1, PRODUCT_AVX2 = 2, PRODUCT_COUNT = 3 };


struct Views {
  const float* q; float* out;
  const int8_t* k; const int8_t* v; const float* ks; const float* vs; const bool* mask;
  int64_t H, T, S, D;
  int64_t k0, k1, k2, v0, v1, v2, ks0, ks1, ks2, vs0, vs1, vs2, m0, m1, m2;
  float scale;
};

// Sets the masked scores of p[0..S) to -inf; returns the largest score.
float mask_and_max(float* p, const bool* mrow, int64_t m2, int64_t S) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (!mrow[s * m2]) p[s] = -INFINITY;
    mx = p[s] > mx ? p[s] : mx;
  }
  return mx;
}

// Softmax over p[0..S) in place, masked entries first set to -inf; returns 1 / sum.
float softmax_in_place(float* p, const bool* mrow, int64_t m2, int64_t S) {
  const float mx = mask_and_max(p, mrow, m2, S);
  float sum = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    const float e = std::exp(p[s] - mx);
    p[s] = e;
    sum += e;
  }
  return 1.f / sum;
}

// The rows and scales of one (slot, head) pair.
struct Pair {
  const int8_t* k; const int8_t* v; const float* ks; const float* vs;
  Pair(const Views& a, int64_t b, int64_t h)
      : k(a.k + b * a.k0 + h * a.k1), v(a.v + b * a.v0 + h * a.v1),
        ks(a.ks + b * a.ks0 + h * a.ks1), vs(a.vs + b * a.vs0 + h * a.vs1) {}
};

// One (slot, head) pair, any head size: plain loops.
void pair_generic(const Views& a, int64_t b, int64_t h, float* p) {
  const Pair r(a, b, h);
  const int8_t* kb = r.k; const int8_t* vb = r.v; const float* ksb = r.ks; const float* vsb = r.vs;
  for (int64_t t = 0; t < a.T; ++t) {
    const float* q = a.q + ((b * a.H + h) * a.T + t) * a.D;
    for (int64_t s = 0; s < a.S; ++s) {
      const int8_t* kr = kb + s * a.k2;
      float acc = 0.f;
      for (int64_t d = 0; d < a.D; ++d) acc += q[d] * static_cast<float>(kr[d]);
      p[s] = acc * ksb[s * a.ks2] * a.scale;
    }
    const float inv = softmax_in_place(p, a.mask + b * a.m0 + t * a.m1, a.m2, a.S);
    float* o = a.out + ((b * a.H + h) * a.T + t) * a.D;
    for (int64_t d = 0; d < a.D; ++d) o[d] = 0.f;
    for (int64_t s = 0; s < a.S; ++s) {
      const float w = p[s] * inv * vsb[s * a.vs2];
      if (w == 0.f) continue;
      const int8_t* vr = vb + s * a.v2;
      for (int64_t d = 0; d < a.D; ++d) o[d] += w * static_cast<float>(vr[d]);
    }
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// One (slot, head) pair, head size 16 * N: the query and the output held in registers,
// four key rows in flight at a time.
template <int N>
void pair_avx512(const Views& a, int64_t b, int64_t h, float* p) {
  const Pair r(a, b, h);
  const int8_t* kb = r.k; const int8_t* vb = r.v; const float* ksb = r.ks; const float* vsb = r.vs;
  for (int64_t t = 0; t < a.T; ++t) {
    const float* q = a.q + ((b * a.H + h) * a.T + t) * a.D;
    __m512 qv[N];
    for (int i = 0; i < N; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
    int64_t s = 0;
    for (; s + 4 <= a.S; s += 4) {
      const int8_t* r0 = kb + s * a.k2;
      const int8_t* r1 = r0 + a.k2;
      const int8_t* r2 = r1 + a.k2;
      const int8_t* r3 = r2 + a.k2;
      for (int j = 0; j < 4; ++j)  // the value rows, read after the softmax (see pair_vnni)
        for (int c = 0; c < N / 4; ++c)
          _mm_prefetch(reinterpret_cast<const char*>(vb + (s + j) * a.v2 + 64 * c), _MM_HINT_T1);
      __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
      __m512 c2 = _mm512_setzero_ps(), c3 = _mm512_setzero_ps();
      for (int i = 0; i < N; ++i) {
        c0 = _mm512_fmadd_ps(load16(r0 + 16 * i), qv[i], c0);
        c1 = _mm512_fmadd_ps(load16(r1 + 16 * i), qv[i], c1);
        c2 = _mm512_fmadd_ps(load16(r2 + 16 * i), qv[i], c2);
        c3 = _mm512_fmadd_ps(load16(r3 + 16 * i), qv[i], c3);
      }
      p[s] = _mm512_reduce_add_ps(c0) * ksb[s * a.ks2] * a.scale;
      p[s + 1] = _mm512_reduce_add_ps(c1) * ksb[(s + 1) * a.ks2] * a.scale;
      p[s + 2] = _mm512_reduce_add_ps(c2) * ksb[(s + 2) * a.ks2] * a.scale;
      p[s + 3] = _mm512_reduce_add_ps(c3) * ksb[(s + 3) * a.ks2] * a.scale;
    }
    for (; s < a.S; ++s) {
      const int8_t* r0 = kb + s * a.k2;
      __m512 c0 = _mm512_setzero_ps();
      for (int i = 0; i < N; ++i) c0 = _mm512_fmadd_ps(load16(r0 + 16 * i), qv[i], c0);
      p[s] = _mm512_reduce_add_ps(c0) * ksb[s * a.ks2] * a.scale;
    }
    const float inv = softmax_in_place(p, a.mask + b * a.m0 + t * a.m1, a.m2, a.S);
    __m512 o[N];
    for (int i = 0; i < N; ++i) o[i] = _mm512_setzero_ps();
    for (s = 0; s < a.S; ++s) {
      const float w = p[s] * inv * vsb[s * a.vs2];
      if (w == 0.f) continue;
      const int8_t* vr = vb + s * a.v2;
      const __m512 wv = _mm512_set1_ps(w);
      for (int i = 0; i < N; ++i) o[i] = _mm512_fmadd_ps(load16(vr + 16 * i), wv, o[i]);
    }
    float* out = a.out + ((b * a.H + h) * a.T + t) * a.D;
    for (int i = 0; i < N; ++i) _mm512_storeu_ps(out + 16 * i, o[i]);
  }
}
#endif

#if defined(DSM_AVX2)
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for x <= 0 on 8 floats (0 below -100, so e^-inf = 0): 2^n * 2^f, |f| <= 1/2, with 2^f by
// its Taylor series to the 7th power (relative error below 1e-7): the AVX-512 exp_nonpositive.
inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.f)), _mm256_set1_ps(1.44269504f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147181f));
  __m256 y = _mm256_set1_ps(1.f / 5040.f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 720.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 120.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 24.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f / 6.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f));
  // 2^n for n in [-150, 0]: the exponent bits, in two steps so that n below -126 stays exact
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half1 = _mm256_srai_epi32(ni, 1), half2 = _mm256_sub_epi32(ni, half1);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half1, _mm256_set1_epi32(127)), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half2, _mm256_set1_epi32(127)), 23));
  const __m256 r = _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
  return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(-100.f), _CMP_GE_OQ));
}

// Softmax over p[0..S) in place (masked entries first set to -inf), 8 entries at a time;
// returns 1 / sum.
float softmax_avx2(float* p, const bool* mrow, int64_t m2, int64_t S) {
  const float mx = mask_and_max(p, mrow, m2, S);
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(p + s), vm));
    _mm256_storeu_ps(p + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8(acc);
  for (; s < S; ++s) {
    const float e = std::exp(p[s] - mx);
    p[s] = e;
    sum += e;
  }
  return 1.f / sum;
}

// One (slot, head) pair, head size 8 * N (N a multiple of 8), on AVX2 (CPUs without AVX-512):
// four key rows in flight at a time, the output accumulated 64 dims (8 registers) at a time.
template <int N>
void pair_avx2(const Views& a, int64_t b, int64_t h, float* p) {
  static_assert(N % 8 == 0, "head size must be a multiple of 64");
  const Pair r(a, b, h);
  const int8_t* kb = r.k; const int8_t* vb = r.v; const float* ksb = r.ks; const float* vsb = r.vs;
  for (int64_t t = 0; t < a.T; ++t) {
    const float* q = a.q + ((b * a.H + h) * a.T + t) * a.D;
    int64_t s = 0;
    for (; s + 4 <= a.S; s += 4) {
      const int8_t* r0 = kb + s * a.k2;
      const int8_t* r1 = r0 + a.k2;
      const int8_t* r2 = r1 + a.k2;
      const int8_t* r3 = r2 + a.k2;
      __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
      __m256 c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
      for (int i = 0; i < N; ++i) {
        const __m256 qv = _mm256_loadu_ps(q + 8 * i);
        c0 = _mm256_fmadd_ps(load8(r0 + 8 * i), qv, c0);
        c1 = _mm256_fmadd_ps(load8(r1 + 8 * i), qv, c1);
        c2 = _mm256_fmadd_ps(load8(r2 + 8 * i), qv, c2);
        c3 = _mm256_fmadd_ps(load8(r3 + 8 * i), qv, c3);
      }
      p[s] = hsum8(c0) * ksb[s * a.ks2] * a.scale;
      p[s + 1] = hsum8(c1) * ksb[(s + 1) * a.ks2] * a.scale;
      p[s + 2] = hsum8(c2) * ksb[(s + 2) * a.ks2] * a.scale;
      p[s + 3] = hsum8(c3) * ksb[(s + 3) * a.ks2] * a.scale;
    }
    for (; s < a.S; ++s) {
      const int8_t* r0 = kb + s * a.k2;
      __m256 c0 = _mm256_setzero_ps();
      for (int i = 0; i < N; ++i) c0 = _mm256_fmadd_ps(load8(r0 + 8 * i), _mm256_loadu_ps(q + 8 * i), c0);
      p[s] = hsum8(c0) * ksb[s * a.ks2] * a.scale;
    }
    const float inv = softmax_avx2(p, a.mask + b * a.m0 + t * a.m1, a.m2, a.S);
    for (s = 0; s < a.S; ++s) p[s] = p[s] * inv * vsb[s * a.vs2];
    float* out = a.out + ((b * a.H + h) * a.T + t) * a.D;
    for (int i0 = 0; i0 < N; i0 += 8) {
      __m256 o[8];
      for (int i = 0; i < 8; ++i) o[i] = _mm256_setzero_ps();
      for (s = 0; s < a.S; ++s) {
        if (p[s] == 0.f) continue;
        const int8_t* vr = vb + s * a.v2 + 8 * i0;
        const __m256 wv = _mm256_set1_ps(p[s]);
        for (int i = 0; i < 8; ++i) o[i] = _mm256_fmadd_ps(load8(vr + 8 * i), wv, o[i]);
      }
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * (i0 + i), o[i]);
    }
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define DSM_VNNI 1

// e^x for x <= 0 (0 below -100, so e^-inf = 0): 2^(x log2 e) split into 2^n * 2^f, |f| <= 1/2, 2^f by its
// Taylor series to the 7th power (relative error below 1e-7).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));
  __m512 y = _mm512_set1_ps(1.f / 5040.f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 720.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 120.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 24.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f / 6.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.5f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-100.f), _CMP_GE_OQ),
                             _mm512_scalef_ps(y, n));
}

// Sums of the 16 lanes of each of four vectors, as the four lanes of one.
inline __m128i sum4(__m512i x0, __m512i x1, __m512i x2, __m512i x3) {
  const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(x0, x1), _mm512_unpackhi_epi32(x0, x1));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(x2, x3), _mm512_unpackhi_epi32(x2, x3));
  const __m512i c = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
  const __m256i d = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
}

// Scratch of one thread for the integer path: scores, then the 16-bit weights split into
// their high and low bytes (four rows per 32-bit word, zero past the span).
struct Scratch {
  std::vector<float> p;
  std::vector<uint8_t> whi, wlo;
  explicit Scratch(int64_t S) : p(S + 4), whi(S + 4), wlo(S + 4) {}
};

// One (slot, head) pair, head size 64 * C, on the integer dot-product units (AVX512-VNNI).
// Keys: the query is rounded to 16 bits (|q| <= 32000 units), split into a signed high and a
// signed low byte, and dotted with the key bytes offset to unsigned (k + 128), 64 bytes per
// instruction; the offset's share, 128 * sum(q), is taken off once per query. Values: the
// softmax weights times the value scales are rounded to 16 bits (of their maximum), split
// into unsigned high and low bytes, and dotted with four value rows at once, interleaved
// byte by byte. Both roundings are at 16 bits, far below the int8 rounding of the entries.
template <int C>
void pair_vnni(const Views& a, int64_t b, int64_t h, Scratch& w) {
  const Pair r(a, b, h);
  const int64_t S = a.S;
  float* p = w.p.data();
  for (int64_t t = 0; t < a.T; ++t) {
    const float* q = a.q + ((b * a.H + h) * a.T + t) * a.D;
    float qmax = 0.f;
    for (int d = 0; d < 64 * C; ++d) qmax = std::fmax(qmax, std::fabs(q[d]));
    const float qstep = qmax > 0.f ? qmax / 32000.f : 1.f;
    alignas(64) int8_t qhi[64 * C], qlo[64 * C];
    int32_t qsum = 0;
    for (int d = 0; d < 64 * C; ++d) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(q[d] / qstep));
      const int32_t lo = ((v + 128) & 255) - 128;
      qhi[d] = static_cast<int8_t>((v - lo) / 256);
      qlo[d] = static_cast<int8_t>(lo);
      qsum += v;
    }
    __m512i QH[C], QL[C];
    for (int c = 0; c < C; ++c) {
      QH[c] = _mm512_load_si512(qhi + 64 * c);
      QL[c] = _mm512_load_si512(qlo + 64 * c);
    }
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const __m128i offset = _mm_set1_epi32(128 * qsum);
    const float kscale = qstep * a.scale;
    for (int64_t s = 0; s < S; s += 4) {
      const int8_t* rows[4];
      for (int j = 0; j < 4; ++j) rows[j] = r.k + std::min(s + j, S - 1) * a.k2;
      // the value rows of these entries, read after the softmax: fetched into the L2 cache
      // now, so that the key and value streams overlap (full rings at 64 slots, stt-1b:
      // 165 -> 139 ms a step)
      for (int j = 0; j < 4; ++j) {
        const char* vrow = reinterpret_cast<const char*>(r.v + std::min(s + j, S - 1) * a.v2);
        for (int c = 0; c < C; ++c) _mm_prefetch(vrow + 64 * c, _MM_HINT_T1);
      }
      __m512i hi[4], lo[4];
      for (int j = 0; j < 4; ++j) hi[j] = lo[j] = _mm512_setzero_si512();
      for (int c = 0; c < C; ++c) {
        for (int j = 0; j < 4; ++j) {
          const __m512i k = _mm512_xor_si512(_mm512_loadu_si512(rows[j] + 64 * c), flip);
          hi[j] = _mm512_dpbusd_epi32(hi[j], k, QH[c]);
          lo[j] = _mm512_dpbusd_epi32(lo[j], k, QL[c]);
        }
      }
      for (int j = 0; j < 4; ++j) hi[j] = _mm512_add_epi32(_mm512_slli_epi32(hi[j], 8), lo[j]);
      const __m128i dots = _mm_sub_epi32(sum4(hi[0], hi[1], hi[2], hi[3]), offset);
      alignas(16) float f[4];
      _mm_store_ps(f, _mm_cvtepi32_ps(dots));
      for (int j = 0; j < 4 && s + j < S; ++j) p[s + j] = f[j] * r.ks[(s + j) * a.ks2] * kscale;
    }
    // softmax numerators times the value scales, and their maximum
    const float mx = mask_and_max(p, a.mask + b * a.m0 + t * a.m1, a.m2, S);
    __m512 total = _mm512_setzero_ps(), wmax = _mm512_setzero_ps();
    const __m512 vmx = _mm512_set1_ps(mx);
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 m = S - s >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << (S - s)) - 1u);
      const __m512 e = _mm512_maskz_mov_ps(
          m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + s), vmx)));
      total = _mm512_add_ps(total, e);
      __m512 vs;
      if (a.vs2 == 1) {
        vs = _mm512_maskz_loadu_ps(m, r.vs + s);
      } else {
        alignas(64) float g[16] = {0.f};
        for (int64_t j = 0; j < 16 && s + j < S; ++j) g[j] = r.vs[(s + j) * a.vs2];
        vs = _mm512_load_ps(g);
      }
      const __m512 x = _mm512_mul_ps(e, vs);
      wmax = _mm512_max_ps(wmax, x);
      _mm512_mask_storeu_ps(p + s, m, x);
    }
    const float sum = _mm512_reduce_add_ps(total);
    const float top = _mm512_reduce_max_ps(wmax);
    const float wstep = top > 0.f ? top / 65535.f : 1.f;
    const float winv = 1.f / wstep;
    for (int64_t s = 0; s < S; ++s) {
      const uint32_t v = static_cast<uint32_t>(std::nearbyint(std::fmin(p[s] * winv, 65535.f)));
      w.whi[s] = static_cast<uint8_t>(v >> 8);
      w.wlo[s] = static_cast<uint8_t>(v & 255);
    }
    for (int64_t s = S; s < S + 4; ++s) w.whi[s] = w.wlo[s] = 0;
    // values, 64 columns at a time for up to two chunks in one pass
    float* out = a.out + ((b * a.H + h) * a.T + t) * a.D;
    const float oscale = wstep / sum;
    constexpr int P = C < 2 ? C : 2;
    for (int c0 = 0; c0 < C; c0 += P) {
      __m512i AH[P][4], AL[P][4];
      for (int c = 0; c < P; ++c)
        for (int k = 0; k < 4; ++k) AH[c][k] = AL[c][k] = _mm512_setzero_si512();
      for (int64_t s = 0; s < S; s += 4) {
        uint32_t wh, wl;
        std::memcpy(&wh, w.whi.data() + s, 4);
        std::memcpy(&wl, w.wlo.data() + s, 4);
        if ((wh | wl) == 0) continue;
        const __m512i WH = _mm512_set1_epi32(static_cast<int>(wh));
        const __m512i WL = _mm512_set1_epi32(static_cast<int>(wl));
        const int8_t* rows[4];
        for (int j = 0; j < 4; ++j) rows[j] = r.v + std::min(s + j, S - 1) * a.v2;
        for (int c = 0; c < P; ++c) {
          const int64_t off = 64 * (c0 + c);
          const __m512i x0 = _mm512_loadu_si512(rows[0] + off);
          const __m512i x1 = _mm512_loadu_si512(rows[1] + off);
          const __m512i x2 = _mm512_loadu_si512(rows[2] + off);
          const __m512i x3 = _mm512_loadu_si512(rows[3] + off);
          const __m512i t0 = _mm512_unpacklo_epi8(x0, x1), t1 = _mm512_unpackhi_epi8(x0, x1);
          const __m512i t2 = _mm512_unpacklo_epi8(x2, x3), t3 = _mm512_unpackhi_epi8(x2, x3);
          const __m512i u[4] = {_mm512_unpacklo_epi16(t0, t2), _mm512_unpackhi_epi16(t0, t2),
                                _mm512_unpacklo_epi16(t1, t3), _mm512_unpackhi_epi16(t1, t3)};
          for (int k = 0; k < 4; ++k) {
            AH[c][k] = _mm512_dpbusd_epi32(AH[c][k], WH, u[k]);
            AL[c][k] = _mm512_dpbusd_epi32(AL[c][k], WL, u[k]);
          }
        }
      }
      // lane 4 * L + j of accumulator k holds column 16 * L + 4 * k + j of its chunk
      for (int c = 0; c < P; ++c) {
        alignas(64) float acc[4][16];
        for (int k = 0; k < 4; ++k) {
          const __m512 x = _mm512_fmadd_ps(_mm512_cvtepi32_ps(AH[c][k]), _mm512_set1_ps(256.f),
                                           _mm512_cvtepi32_ps(AL[c][k]));
          _mm512_store_ps(acc[k], _mm512_mul_ps(x, _mm512_set1_ps(oscale)));
        }
        float* o = out + 64 * (c0 + c);
        for (int L = 0; L < 4; ++L)
          for (int k = 0; k < 4; ++k)
            for (int j = 0; j < 4; ++j) o[16 * L + 4 * k + j] = acc[k][4 * L + j];
      }
    }
  }
}
#endif

torch::Tensor run(torch::Tensor q, torch::Tensor k, torch::Tensor ks, torch::Tensor v,
                  torch::Tensor vs, torch::Tensor mask, double scale, int64_t path) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [B, H, T, D] tensor");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.scalar_type() == torch::kChar &&
              v.scalar_type() == torch::kChar, "keys and values must be int8 [B, H, S, D]");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "keys and values need a contiguous last dim");
  TORCH_CHECK(ks.dim() == 3 && vs.dim() == 3 && ks.scalar_type() == torch::kFloat &&
              vs.scalar_type() == torch::kFloat, "scales must be float32 [B, H, S]");
  TORCH_CHECK(mask.dim() == 3 && mask.scalar_type() == torch::kBool, "mask must be bool [B, T, S]");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), S = k.size(2);
  for (const auto& x : {k, v}) {
    TORCH_CHECK(x.size(0) == B && x.size(1) == H && x.size(2) == S && x.size(3) == D,
                "keys and values must be [B, H, S, D] for q [B, H, T, D]");
  }
  for (const auto& x : {ks, vs}) {
    TORCH_CHECK(x.size(0) == B && x.size(1) == H && x.size(2) == S, "scales must be [B, H, S]");
  }
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == T && mask.size(2) == S, "mask must be [B, T, S]");
  TORCH_CHECK(S > 0, "the ring span must not be empty");
  auto out = torch::empty_like(q);
  Views a{q.data_ptr<float>(), out.data_ptr<float>(), k.data_ptr<int8_t>(), v.data_ptr<int8_t>(),
          ks.data_ptr<float>(), vs.data_ptr<float>(), mask.data_ptr<bool>(), H, T, S, D,
          k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
          ks.stride(0), ks.stride(1), ks.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
          mask.stride(0), mask.stride(1), mask.stride(2), static_cast<float>(scale)};
  TORCH_CHECK(path >= PATH_BEST && path <= PATH_AVX2, "unknown kernel path");
#if !defined(DSM_VNNI)
  TORCH_CHECK(path != PATH_VNNI, "this build has no AVX512-VNNI path");
#endif
#if !defined(__AVX512F__)
  TORCH_CHECK(path != PATH_AVX512, "this build has no AVX-512 path");
#endif
#if !defined(DSM_AVX2)
  TORCH_CHECK(path != PATH_AVX2, "this build has no AVX2 path");
#endif
  const bool wide = D == 64 || D == 128 || D == 256;
#if defined(DSM_VNNI)
  // the values' 32-bit sums hold up to 65535 * 127 * S: exact while S <= 2^16
  const bool vnni = wide && S <= 65536 && (path == PATH_BEST || path == PATH_VNNI);
#else
  const bool vnni = false;
#endif
#if defined(__AVX512F__)
  const bool avx512 = wide && !vnni && (path == PATH_BEST || path == PATH_AVX512);
#else
  const bool avx512 = false;
#endif
  const bool avx2 = wide && !vnni && !avx512 && (path == PATH_BEST || path == PATH_AVX2);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
#if defined(DSM_VNNI)
    if (vnni) {
      Scratch w(S);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / H, h = n % H;
        if (D == 64) pair_vnni<1>(a, b, h, w);
        else if (D == 128) pair_vnni<2>(a, b, h, w);
        else pair_vnni<4>(a, b, h, w);
      }
      return;
    }
#endif
    std::vector<float> p(S);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / H, h = n % H;
#if defined(__AVX512F__)
      if (avx512 && D == 64) { pair_avx512<4>(a, b, h, p.data()); continue; }
      if (avx512 && D == 128) { pair_avx512<8>(a, b, h, p.data()); continue; }
      if (avx512 && D == 256) { pair_avx512<16>(a, b, h, p.data()); continue; }
#endif
#if defined(DSM_AVX2)
      if (avx2 && D == 64) { pair_avx2<8>(a, b, h, p.data()); continue; }
      if (avx2 && D == 128) { pair_avx2<16>(a, b, h, p.data()); continue; }
      if (avx2 && D == 256) { pair_avx2<32>(a, b, h, p.data()); continue; }
#endif
      pair_generic(a, b, h, p.data());
    }
  });
  return out;
}


#if defined(__AVX512F__)
// Row m of x on the symmetric grid of ``levels`` steps per side: round(x / max|x| * levels),
// the same float operations in the same order as W8A8Linear's other kernels.
float quantize_row(const float* x, int64_t K, float levels, int8_t* out) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float mx = _mm512_reduce_max_ps(vmax);
  for (; k < K; ++k) mx = std::fmax(mx, std::fabs(x[k]));
  mx = std::fmax(mx, 1e-30f);
  const __m512 vm = _mm512_set1_ps(mx), vl = _mm512_set1_ps(levels);
  for (k = 0; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_roundscale_ps(
        _mm512_mul_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), vm), vl),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  for (; k < K; ++k) out[k] = static_cast<int8_t>(std::nearbyint(x[k] / mx * levels));
  return mx / levels;
}
#endif

#if defined(DSM_VNNI)
// C [R, 32] (row stride 32) = A [R, 64 * KB] (unsigned bytes, the int8 rows offset by 128,
// row stride lda) times two blocks of 16 weight columns packed as for the AMX tiles: each
// 64-byte row of a tile holds 4 consecutive inputs of 16 columns, which is what one
// ``vpdpbusd`` takes with the 4 matching activation bytes broadcast.
template <int R>
void vnni_rows(const uint8_t* A, int64_t lda, const int8_t* B0, int64_t KB, int32_t* C) {
  const int8_t* B1 = B0 + KB * 1024;
  __m512i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int8_t* b0 = B0 + kb * 1024;
    const int8_t* b1 = B1 + kb * 1024;
    const uint8_t* a = A + kb * 64;
    for (int k4 = 0; k4 < 16; ++k4) {
      const __m512i w0 = _mm512_loadu_si512(b0 + 64 * k4);
      const __m512i w1 = _mm512_loadu_si512(b1 + 64 * k4);
      for (int r = 0; r < R; ++r) {
        int32_t v;
        std::memcpy(&v, a + r * lda + 4 * k4, 4);
        const __m512i x = _mm512_set1_epi32(v);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, w0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, w1);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_si512(C + 32 * r, acc[r][0]);
    _mm512_storeu_si512(C + 32 * r + 16, acc[r][1]);
  }
}

void vnni_rows_any(int64_t R, const uint8_t* A, int64_t lda, const int8_t* B, int64_t KB, int32_t* C) {
  switch (R) {
    case 1: vnni_rows<1>(A, lda, B, KB, C); break;
    case 2: vnni_rows<2>(A, lda, B, KB, C); break;
    case 3: vnni_rows<3>(A, lda, B, KB, C); break;
    case 4: vnni_rows<4>(A, lda, B, KB, C); break;
    case 5: vnni_rows<5>(A, lda, B, KB, C); break;
    case 6: vnni_rows<6>(A, lda, B, KB, C); break;
    case 7: vnni_rows<7>(A, lda, B, KB, C); break;
    default: vnni_rows<8>(A, lda, B, KB, C); break;
  }
}
#endif

#if defined(DSM_AVX2)
// Row x [K] on the symmetric grid of ``levels`` steps per side into out: round(x / max|x| *
// levels), the same float operations in the same order as the AVX-512 quantize_row (so the
// same bytes); returns max|x| / levels.
float quantize_row_avx2(const float* x, int64_t K, float levels, int8_t* out) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + k), magnitude));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = 0.f;
  for (float lane : lanes) mx = std::fmax(mx, lane);
  for (; k < K; ++k) mx = std::fmax(mx, std::fabs(x[k]));
  mx = std::fmax(mx, 1e-30f);
  const __m256 vm = _mm256_set1_ps(mx), vl = _mm256_set1_ps(levels);
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vm), vl),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i w = _mm256_cvtps_epi32(v);
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi16(w16, w16));
  }
  for (; k < K; ++k) out[k] = static_cast<int8_t>(std::nearbyint(x[k] / mx * levels));
  return mx / levels;
}

// C [R, 16] (row stride 16) = A [R, 64 * KB] (int8 rows, row stride lda, with U their
// magnitudes) times one block of 16 weight columns packed as for the AMX tiles (KB tiles of
// 1 KB). AVX2 has no u8 x s8 dot product into 32 bits; ``vpmaddubsw`` adds two u8 x s8
// products into a saturating int16, so it gets |a| and w with a's sign (``vpsignb``): at most
// 2 x 127 x 127 = 32258, never saturated, and ``vpmaddwd`` against ones adds the pairs into
// exact int32 sums (the same integer sums as the VNNI and AMX products).
template <int R>
void avx2_rows(const int8_t* A, const uint8_t* U, int64_t lda, const int8_t* B, int64_t KB,
               int32_t* C) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int8_t* b = B + kb * 1024;
    const int64_t a0 = kb * 64;
    for (int k4 = 0; k4 < 16; ++k4) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * k4));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * k4 + 32));
      for (int r = 0; r < R; ++r) {
        int32_t sv, uv;
        std::memcpy(&sv, A + r * lda + a0 + 4 * k4, 4);
        std::memcpy(&uv, U + r * lda + a0 + 4 * k4, 4);
        const __m256i xs = _mm256_set1_epi32(sv), xu = _mm256_set1_epi32(uv);
        acc[r][0] = _mm256_add_epi32(
            acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xu, _mm256_sign_epi8(w0, xs)), ones));
        acc[r][1] = _mm256_add_epi32(
            acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xu, _mm256_sign_epi8(w1, xs)), ones));
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + 16 * r), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + 16 * r + 8), acc[r][1]);
  }
}

// y [M, N] = (round(x / max|x| * levels) . w^T) * max|x| / levels * ws on AVX2, for float32
// rows x [M, K] and int8 weights packed into NB x KB tiles (see avx2_rows): the weights stream
// once per call, each block of 16 columns against up to 4 rows at a time.
void avx2_product(const float* xp, int64_t M, int64_t K, const int8_t* wp, int64_t NB,
                  int64_t KB, const float* ws, int64_t N, float lv, float* yp) {
  const int64_t Kp = 64 * KB;
  std::vector<int8_t> A(M * Kp, 0);
  std::vector<uint8_t> U(M * Kp, 0);
  std::vector<float> xs(M, 0.f);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      xs[m] = quantize_row_avx2(xp + m * K, K, lv, A.data() + m * Kp);
      for (int64_t k = 0; k < Kp; k += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A.data() + m * Kp + k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(U.data() + m * Kp + k), _mm256_abs_epi8(v));
      }
    }
  });
  at::parallel_for(0, NB, 4, [&](int64_t begin, int64_t end) {
    alignas(32) int32_t C[4 * 16];
    for (int64_t nb = begin; nb < end; ++nb) {
      const int8_t* B = wp + nb * KB * 1024;
      const int64_t n0 = 16 * nb, nn = std::min<int64_t>(16, N - n0);
      if (nn <= 0) continue;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // later rows find the block's weights in cache
        const int64_t rows = std::min<int64_t>(4, M - m0);
        const int8_t* a = A.data() + m0 * Kp;
        const uint8_t* u = U.data() + m0 * Kp;
        switch (rows) {
          case 1: avx2_rows<1>(a, u, Kp, B, KB, C); break;
          case 2: avx2_rows<2>(a, u, Kp, B, KB, C); break;
          case 3: avx2_rows<3>(a, u, Kp, B, KB, C); break;
          default: avx2_rows<4>(a, u, Kp, B, KB, C); break;
        }
        for (int64_t m = 0; m < rows; ++m) {  // float(C) * xs * ws, as store_block
          float* y = yp + (m0 + m) * N + n0;
          const float x = xs[m0 + m];
          for (int64_t n = 0; n < nn; ++n) y[n] = static_cast<float>(C[16 * m + n]) * x * ws[n0 + n];
        }
      }
    }
  });
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(DSM_VNNI) && defined(__linux__)
#define DSM_AMX 1

struct TileConfig {
  uint8_t palette_id; uint8_t start_row; uint8_t reserved[14];
  uint16_t colsb[16]; uint8_t rows[16];
};

// every tile 16 rows of 64 bytes: A (activations), B (packed weights), C (int32 sums)
void configure_tiles() {
  TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }
  _tile_loadconfig(&c);
}

// C [16 * MT, 32] (row stride 32) = A [16 * MT, 64 * KB] (row stride lda) times two blocks of
// 16 weight columns (KB tiles of 1 KB each, one block after the other). Tiles 0-3 hold the
// sums, 4-5 the activation rows, 6-7 the weights.
template <int MT>
void amx_block(const int8_t* A, int64_t lda, const int8_t* B0, int64_t KB, int32_t* C) {
  const int8_t* B1 = B0 + KB * 1024;
  _tile_zero(0);
  _tile_zero(1);
  if (MT > 1) { _tile_zero(2); _tile_zero(3); }
  for (int64_t kb = 0; kb < KB; ++kb) {
    const int8_t* b0 = B0 + kb * 1024;
    const int8_t* b1 = B1 + kb * 1024;
    for (int i = 0; i < 16; ++i) {  // four tiles ahead in each stream
      _mm_prefetch(reinterpret_cast<const char*>(b0 + 4096 + 64 * i), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(b1 + 4096 + 64 * i), _MM_HINT_T0);
    }
    const int8_t* a = A + kb * 64;
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_loadd(4, a, lda);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    if (MT > 1) {
      _tile_loadd(5, a + 16 * lda, lda);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, C, 128);
  _tile_stored(1, C + 16, 128);
  if (MT > 1) { _tile_stored(2, C + 512, 128); _tile_stored(3, C + 528, 128); }
}

#endif

}  // namespace

torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor ks, torch::Tensor v,
                     torch::Tensor vs, torch::Tensor mask, double scale, int64_t path) {
  // Python waits without the GIL: the server's event loop runs while a model step computes.
  pybind11::gil_scoped_release no_gil;
  return run(q, k, ks, v, vs, mask, scale, path);
}

// Whether the AMX product can run here: built with AMX, and the OS lets this process use the
// tiles (Linux asks each process to request them: arch_prctl ARCH_REQ_XCOMP_PERM).
std::string amx_problem() {
#if defined(DSM_AMX)
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0)
    return "the operating system does not let this process use the AMX tiles";
  return "";
#else
  return "this CPU (or compiler) has no AMX-INT8";
#endif
}

// Whether the AVX2 product can run here (built for a CPU with AVX2 and FMA).
std::string avx2_problem() {
#if defined(DSM_AVX2)
  return "";
#else
  return "this CPU (or compiler) has no AVX2";
#endif
}

// Whether the VNNI product can run here (built for a CPU with AVX512-VNNI).
std::string vnni_problem() {
#if defined(DSM_VNNI)
  return "";
#else
  return "this CPU (or compiler) has no AVX512-VNNI";
#endif
}

#if defined(DSM_VNNI)
namespace {

// y[m0 + m, n0 .. n0 + 32) = float(C[m] - 128 * colsum) * xs[m0 + m] * ws, for ``rows`` rows of
// 32 int32 sums (row stride 32); no offset where colsum is null (the AMX sums are signed).
void store_block(const int32_t* C, int64_t rows, const float* xs, const float* ws,
                 const int32_t* colsum, int64_t m0, int64_t n0, int64_t N, float* yp) {
  for (int half = 0; half < 2; ++half) {
    const int64_t nn = std::min<int64_t>(16, N - n0 - 16 * half);
    if (nn <= 0) break;
    const __mmask16 nm = static_cast<__mmask16>((1u << nn) - 1u);
    const __m512 wsv = _mm512_maskz_loadu_ps(nm, ws + n0 + 16 * half);
    const __m512i off = colsum == nullptr
        ? _mm512_setzero_si512()
        : _mm512_slli_epi32(_mm512_maskz_loadu_epi32(nm, colsum + n0 + 16 * half), 7);
    for (int64_t m = 0; m < rows; ++m) {
      const __m512i sums = _mm512_sub_epi32(_mm512_loadu_si512(C + 32 * m + 16 * half), off);
      const __m512 c = _mm512_cvtepi32_ps(sums);
      _mm512_mask_storeu_ps(yp + (m0 + m) * N + n0 + 16 * half, nm,
                            _mm512_mul_ps(_mm512_mul_ps(c, _mm512_set1_ps(xs[m0 + m])), wsv));
    }
  }
}

// y [M, N] = (round(x / max|x| * levels) . w^T) * max|x| / levels * ws for float32 rows x
// [M, K] (row stride K) and int8 weights w [N, K] packed into NB x KB tiles (NB even), on the
// AMX tiles or with AVX512-VNNI (which takes unsigned activations: the rows offset by 128 and
// the offset's share, 128 * colsum[n], taken off the exact int32 sums). Both give the same
// integer sums, hence the same results.
void int8_product(const float* xp, int64_t M, int64_t K, const int8_t* wp, int64_t NB, int64_t KB,
                  const float* ws, const int32_t* colsum, int64_t N, float lv, float* yp,
                  bool amx) {
  const int64_t Kp = 64 * KB;
  const int64_t Mp = (M + 31) / 32 * 32;  // whole tiles of rows; the padding rows stay zero
  std::vector<int8_t> A(Mp * Kp, 0);
  std::vector<float> xs(Mp, 0.f);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      int8_t* row = A.data() + m * Kp;
      xs[m] = quantize_row(xp + m * K, K, lv, row);
      if (!amx) {
        const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
        for (int64_t k = 0; k < Kp; k += 64)
          _mm512_storeu_si512(row + k, _mm512_xor_si512(_mm512_loadu_si512(row + k), flip));
      }
    }
  });
  at::parallel_for(0, NB / 2, 4, [&](int64_t begin, int64_t end) {
#if defined(DSM_AMX)
    if (amx) configure_tiles();
#endif
    alignas(64) int32_t C[32 * 32];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int8_t* B = wp + 2 * pair * KB * 1024;
      const int64_t n0 = 32 * pair;
#if defined(DSM_AMX)
      if (amx) {
        for (int64_t m0 = 0; m0 < M; m0 += 32) {  // later row blocks find the weights in cache
          const int64_t rows = std::min<int64_t>(32, M - m0);
          if (rows > 16) amx_block<2>(A.data() + m0 * Kp, Kp, B, KB, C);
          else amx_block<1>(A.data() + m0 * Kp, Kp, B, KB, C);
          store_block(C, rows, xs.data(), ws, nullptr, m0, n0, N, yp);
        }
        continue;
      }
#endif
      const auto* U = reinterpret_cast<const uint8_t*>(A.data());
      for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const int64_t rows = std::min<int64_t>(8, M - m0);
        vnni_rows_any(rows, U + m0 * Kp, Kp, B, KB, C);
        store_block(C, rows, xs.data(), ws, colsum, m0, n0, N, yp);
      }
    }
#if defined(DSM_AMX)
    if (amx) _tile_release();
#endif
  });
}

}  // namespace
#endif

#if defined(DSM_VNNI) || defined(DSM_AVX2)
#define DSM_INT8 1
namespace {

// One W8A8 projection: packed weights [NB, KB, 1024], float32 scales [N], its output size,
// the int32 column sums [N] of its weights (the VNNI product's offset) and which product runs.
struct Projection {
  const int8_t* w; int64_t NB, KB; const float* ws; const int32_t* colsum; int64_t N;
  int64_t product;
  Projection(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& sums,
             int64_t n, int64_t K, int64_t which)
      : w(packed.data_ptr<int8_t>()), NB(packed.size(0)), KB(packed.size(1)),
        ws(scales.data_ptr<float>()), colsum(nullptr), N(n), product(which) {
    TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kChar &&
                packed.is_contiguous() && packed.size(2) == 1024 && NB % 2 == 0,
                "packed weights expected");
    TORCH_CHECK(K <= 64 * KB && 64 * KB < K + 64 && N <= 16 * NB && 16 * NB < N + 32,
                "x and the packed weights disagree on the sizes");
    TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N && scales.scalar_type() == torch::kFloat &&
                scales.is_contiguous(), "scales must be float32 [N]");
    TORCH_CHECK(product >= 0 && product < PRODUCT_COUNT, "unknown int8 product ", product);
#if !defined(DSM_AMX)
    TORCH_CHECK(product != PRODUCT_AMX, amx_problem());
#endif
#if !defined(DSM_VNNI)
    TORCH_CHECK(product != PRODUCT_VNNI, vnni_problem());
#endif
#if !defined(DSM_AVX2)
    TORCH_CHECK(product != PRODUCT_AVX2, avx2_problem());
#endif
    if (sums.defined() && sums.numel() > 0) {
      TORCH_CHECK(sums.dim() == 1 && sums.size(0) == N && sums.scalar_type() == torch::kInt &&
                  sums.is_contiguous(), "column sums must be int32 [N]");
      colsum = sums.data_ptr<int32_t>();
    }
    TORCH_CHECK(product != PRODUCT_VNNI || colsum != nullptr,
                "the VNNI product needs the weights' column sums");
  }
  // A single row goes to the VNNI product even where the tiles run (with the column sums):
  // the tiles multiply 16 rows whatever the count, and one row streams the weights faster
  // without them (stt-1b, 16 layers' projections: 26 against 30 ms). Same integer sums.
  void apply(const float* x, int64_t M, int64_t K, float levels, float* y) const {
#if defined(DSM_AVX2)
    if (product == PRODUCT_AVX2) {
      avx2_product(x, M, K, w, NB, KB, ws, N, levels, y);
      return;
    }
#endif
#if defined(DSM_VNNI)
    const bool amx = product == PRODUCT_AMX;
    int8_product(x, M, K, w, NB, KB, ws, colsum, N, levels, y, amx && (M > 1 || !colsum));
#endif
  }
};

torch::Tensor linear(torch::Tensor x, const Projection& proj, double levels) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty({M, proj.N}, x.options());
  if (M == 0) return y;
  proj.apply(x.data_ptr<float>(), M, K, static_cast<float>(levels), y.data_ptr<float>());
  return y;
}

}  // namespace
#endif

// y [M, N] float32 = (round(x / max|x| * levels) . w^T) * max|x| / levels * scales, with w
// int8 [N, K] packed by amx_pack into [NB, KB, 1024] (NB even): on the AMX tiles (``amx``;
// a single row goes to the VNNI product where ``column_sums`` are given) or with AVX512-VNNI
// (which needs ``column_sums``, int32 [N], the sums of w's rows; empty: none).
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, int64_t N,
                          double levels, torch::Tensor column_sums, int64_t product) {
  // Python waits without the GIL: the server's event loop runs while a model step computes.
  pybind11::gil_scoped_release no_gil;
#if defined(DSM_INT8)
  TORCH_CHECK(x.dim() == 2, "x must be a contiguous float32 [M, K] tensor");
  return linear(x, Projection(packed, scales, column_sums, N, x.size(1), product), levels);
#else
  TORCH_CHECK(false, product == PRODUCT_AMX ? amx_problem()
                     : product == PRODUCT_AVX2 ? avx2_problem() : vnni_problem());
  return x;
#endif
}

#if defined(DSM_INT8)
namespace {

// float32 -> nearest bfloat16 (ties to even), kept in a float: what ``.to(torch.bfloat16)``
// stores. Identity when the layer runs in float32.
inline float to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;  // inf, nan
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Rounding {
  bool bf16;
  inline float operator()(float f) const { return bf16 ? to_bf16(f) : f; }
};

// RMSNorm of row x [D] into y: x * (alpha * rsqrt(var)) with var = mean(x^2) + eps, rounded.
__attribute__((optimize("fp-contract=off")))
void rms_norm_row(const float* x, const float* alpha, int64_t D, float var, Rounding r, float* y) {
  const float inv = 1.f / std::sqrt(var);
  for (int64_t d = 0; d < D; ++d) y[d] = r(x[d] * (alpha[d] * inv));
}

#if defined(__AVX512F__)
// bfloat16 rounding of 16 floats (ties to even; inf and nan are not expected here).
inline __m512 to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// RoPE on the interleaved pairs (2i, 2i + 1) of one head row, in place, rounded: the
// products and sums of ``apply_rope``, 16 pairs at a time (no fused multiply-adds).
__attribute__((optimize("fp-contract=off")))
void rope_row(float* x, const float* c, const float* s, int64_t half, Rounding r) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const __m512 v0 = _mm512_loadu_ps(x + 2 * i), v1 = _mm512_loadu_ps(x + 2 * i + 16);
    const __m512 xr = _mm512_permutex2var_ps(v0, even, v1);
    const __m512 xi = _mm512_permutex2var_ps(v0, odd, v1);
    const __m512 cv = _mm512_loadu_ps(c + i), sv = _mm512_loadu_ps(s + i);
    __m512 re = _mm512_sub_ps(_mm512_mul_ps(xr, cv), _mm512_mul_ps(xi, sv));
    __m512 im = _mm512_add_ps(_mm512_mul_ps(xr, sv), _mm512_mul_ps(xi, cv));
    if (r.bf16) { re = to_bf16(re); im = to_bf16(im); }
    _mm512_storeu_ps(x + 2 * i, _mm512_permutex2var_ps(re, lo, im));
    _mm512_storeu_ps(x + 2 * i + 16, _mm512_permutex2var_ps(re, hi, im));
  }
  for (; i < half; ++i) {
    const float xr = x[2 * i], xi = x[2 * i + 1];
    const float a = xr * c[i], b = xi * s[i], e = xr * s[i], f = xi * c[i];
    x[2 * i] = r(a - b);
    x[2 * i + 1] = r(e + f);
  }
}
#else
// RoPE on the interleaved pairs (2i, 2i + 1) of one head row, in place, rounded: the products
// and sums of ``apply_rope`` (no fused multiply-adds), one pair at a time.
__attribute__((optimize("fp-contract=off")))
void rope_row(float* x, const float* c, const float* s, int64_t half, Rounding r) {
  for (int64_t i = 0; i < half; ++i) {
    const float xr = x[2 * i], xi = x[2 * i + 1];
    const float a = xr * c[i], b = xi * s[i], e = xr * s[i], f = xi * c[i];
    x[2 * i] = r(a - b);
    x[2 * i + 1] = r(e + f);
  }
}
#endif

// The int8 row and scale of one key or value row: round(x / (max|x| / 127)), as
// ``quantize_rows`` computes it.
void quantize_kv_row(const float* x, int64_t D, int8_t* q, float* scale) {
#if defined(__AVX512F__)
  __m512 vmax = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
  float mx = _mm512_reduce_max_ps(vmax);
  for (; d < D; ++d) mx = std::fmax(mx, std::fabs(x[d]));
  const float sc = std::fmax(mx, 1e-30f) / 127.f;
  const __m512 vs = _mm512_set1_ps(sc), top = _mm512_set1_ps(127.f), bottom = _mm512_set1_ps(-127.f);
  for (d = 0; d + 16 <= D; d += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + d), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(_mm512_max_ps(v, bottom), top);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + d),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
#else
  float mx = 0.f;
  for (int64_t d = 0; d < D; ++d) mx = std::fmax(mx, std::fabs(x[d]));
  const float sc = std::fmax(mx, 1e-30f) / 127.f;
  int64_t d = 0;
#endif
  for (; d < D; ++d) {
    const float v = std::nearbyint(x[d] / sc);
    q[d] = static_cast<int8_t>(std::fmin(std::fmax(v, -127.f), 127.f));
  }
  *scale = sc;
}

torch::Tensor float_rows(const torch::Tensor& t, int64_t B, int64_t D, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == D, what, " must be [", B, ", ", D,
              "]");
  return t.to(torch::kFloat).contiguous();
}

}  // namespace
#endif

// One decode position of a DSM LM layer for B slots, the whole layer in one call (the CPU
// path of an LM quantized w8a8 on the AMX kernel with an int8 KV ring):
//   h = x + out(attention(rope(q), ring + rope(k), ring + v)),  [q k v] = in(norm1(x))
//   y = h + ffn_out(silu(a) * b),                                [a b] = ffn_in(norm2(h))
// with the same roundings as the module path: every intermediate the modules store in the
// model's dtype is rounded to bfloat16 when x is bfloat16. The new keys and values are
// quantized and written to ring entry write_index[b] of slot b (layer ``layer`` of the rings
// [L, B, H, C + 1, hd]); the attention reads the first mask.size(-1) entries, where mask
// [B, S] is true. cos / sin [B, hd / 2] are the RoPE angles of each slot's position.
torch::Tensor lm_layer_step(torch::Tensor x, torch::Tensor alpha1, torch::Tensor alpha2,
                            double eps, std::vector<torch::Tensor> packed,
                            std::vector<torch::Tensor> scales, std::vector<int64_t> sizes,
                            double levels, torch::Tensor keys, torch::Tensor key_scales,
                            torch::Tensor values, torch::Tensor value_scales, int64_t layer,
                            torch::Tensor write_index, torch::Tensor cos, torch::Tensor sin,
                            torch::Tensor mask, int64_t num_heads,
                            std::vector<torch::Tensor> column_sums, int64_t product) {
  // Python waits without the GIL: the server's event loop runs while a model step computes.
  pybind11::gil_scoped_release no_gil;
#if defined(DSM_INT8)
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == torch::kFloat ||
                               x.scalar_type() == torch::kBFloat16),
              "x must be float32 or bfloat16 [B, D]");
  TORCH_CHECK(packed.size() == 4 && scales.size() == 4 && sizes.size() == 4,
              "four projections expected (in, out, ffn in, ffn out)");
  const int64_t B = x.size(0), D = x.size(1), H = num_heads;
  TORCH_CHECK(H > 0 && D % H == 0 && (D / H) % 2 == 0, "bad head count");
  const int64_t hd = D / H, half = hd / 2;
  const int64_t F2 = sizes[2], F = F2 / 2;
  TORCH_CHECK(sizes[0] == 3 * D && sizes[1] == D && F2 % 2 == 0 && sizes[3] == D,
              "projection sizes do not fit a layer of width ", D);
  TORCH_CHECK(column_sums.size() == 4, "four column sums expected");
  const Projection p_in(packed[0], scales[0], column_sums[0], sizes[0], D, product),
      p_out(packed[1], scales[1], column_sums[1], D, D, product),
      p_ffn_in(packed[2], scales[2], column_sums[2], F2, D, product),
      p_ffn_out(packed[3], scales[3], column_sums[3], D, F, product);
  for (const auto& ring : {keys, values}) {
    TORCH_CHECK(ring.dim() == 5 && ring.scalar_type() == torch::kChar && ring.size(1) == B &&
                ring.size(2) == H && ring.size(4) == hd && ring.stride(4) == 1,
                "rings must be int8 [L, B, H, C + 1, hd]");
  }
  for (const auto& ring : {key_scales, value_scales}) {
    TORCH_CHECK(ring.dim() == 4 && ring.scalar_type() == torch::kFloat && ring.size(1) == B &&
                ring.size(2) == H && ring.size(3) == keys.size(3),
                "ring scales must be float32 [L, B, H, C + 1]");
  }
  TORCH_CHECK(layer >= 0 && layer < keys.size(0), "layer out of range");
  const int64_t entries = keys.size(3);
  TORCH_CHECK(write_index.dim() == 1 && write_index.size(0) == B &&
              write_index.scalar_type() == torch::kLong, "write_index must be long [B]");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.scalar_type() == torch::kBool,
              "mask must be bool [B, S]");
  const int64_t S = mask.size(1);
  TORCH_CHECK(S > 0 && S <= entries, "the attended span must be within the ring");
  const Rounding rd{x.scalar_type() == torch::kBFloat16};
  const float lv = static_cast<float>(levels);
  auto xf = x.to(torch::kFloat).contiguous();
  const auto a1 = alpha1.to(torch::kFloat).contiguous(), a2 = alpha2.to(torch::kFloat).contiguous();
  TORCH_CHECK(a1.numel() == D && a2.numel() == D, "norm weights must have ", D, " entries");
  const auto cs = float_rows(cos, B, half, "cos"), sn = float_rows(sin, B, half, "sin");
  const auto wi = write_index.contiguous();
  const int64_t* wip = wi.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(wip[b] >= 0 && wip[b] < entries, "write_index out of the ring");
  const auto fopt = torch::TensorOptions().dtype(torch::kFloat);
  auto n = torch::empty({B, D}, fopt);  // the norms' outputs
  auto gate = torch::empty({B, F}, fopt);
  auto qkv = torch::empty({B, 3 * D}, fopt);
  auto q = torch::empty({B, H, 1, hd}, fopt);
  auto h = torch::empty({B, D}, fopt);
  auto ab = torch::empty({B, F2}, fopt);
  float* xp = xf.data_ptr<float>();
  float* np_ = n.data_ptr<float>();
  float* qkvp = qkv.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  float* abp = ab.data_ptr<float>();
  const float fe = static_cast<float>(eps);

  // f(i) for every element i of B rows of n elements, rows split between the threads
  auto rows = [&](int64_t n, auto&& f) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0 * n; i < b1 * n; ++i) f(i);
    });
  };
  // the mean of the squares through ATen's reduction, as RMSNorm computes it (its order of
  // summation is part of the result)
  auto norm = [&](float* in, const float* alpha) {
    const auto var = at::mean(torch::from_blob(in, {B, D}, fopt).pow(2), -1).add_(fe);
    const float* vp = var.data_ptr<float>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) rms_norm_row(in + b * D, alpha, D, vp[b], rd, np_ + b * D);
    });
  };
  auto project = [&](const Projection& p, const float* in, int64_t K, float* out) {
    p.apply(in, B, K, lv, out);
    if (rd.bf16) rows(p.N, [&](int64_t i) { out[i] = rd(out[i]); });
  };

  // attention
  norm(xp, a1.data_ptr<float>());
  project(p_in, np_, D, qkvp);
  int8_t* kp = keys.data_ptr<int8_t>();
  int8_t* vp = values.data_ptr<int8_t>();
  float* ksp = key_scales.data_ptr<float>();
  float* vsp = value_scales.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t i = n0; i < n1; ++i) {
      const int64_t b = i / H, hh = i % H, e = wip[b];
      float* row = qkvp + b * 3 * D;
      const float* c = cs.data_ptr<float>() + b * half;
      const float* s = sn.data_ptr<float>() + b * half;
      rope_row(row + hh * hd, c, s, half, rd);
      rope_row(row + D + hh * hd, c, s, half, rd);
      std::memcpy(qp + i * hd, row + hh * hd, 4 * hd);
      quantize_kv_row(row + D + hh * hd, hd,
                      kp + layer * keys.stride(0) + b * keys.stride(1) + hh * keys.stride(2) +
                          e * keys.stride(3),
                      ksp + layer * key_scales.stride(0) + b * key_scales.stride(1) +
                          hh * key_scales.stride(2) + e * key_scales.stride(3));
      quantize_kv_row(row + 2 * D + hh * hd, hd,
                      vp + layer * values.stride(0) + b * values.stride(1) +
                          hh * values.stride(2) + e * values.stride(3),
                      vsp + layer * value_scales.stride(0) + b * value_scales.stride(1) +
                          hh * value_scales.stride(2) + e * value_scales.stride(3));
    }
  });
  const auto attended =
      run(q, keys.select(0, layer).narrow(2, 0, S), key_scales.select(0, layer).narrow(2, 0, S),
          values.select(0, layer).narrow(2, 0, S), value_scales.select(0, layer).narrow(2, 0, S),
          mask.unsqueeze(1), 1.0 / std::sqrt(static_cast<double>(hd)), PATH_BEST);
  float* yp = attended.data_ptr<float>();  // [B, H, 1, hd]: the heads of a slot side by side
  if (rd.bf16) rows(D, [&](int64_t i) { yp[i] = rd(yp[i]); });
  project(p_out, yp, D, hp);
  rows(D, [&](int64_t i) { hp[i] = rd(xp[i] + hp[i]); });

  // feed-forward
  norm(hp, a2.data_ptr<float>());
  project(p_ffn_in, np_, D, abp);
  // SiLU through ATen's kernel (its exp is part of the result), then the gate
  const auto silu = at::silu(ab.narrow(1, 0, F));
  const float* sp = silu.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* a = abp + b * F2 + F;
      const float* sa = sp + b * F;
      float* g = gate.data_ptr<float>() + b * F;
      for (int64_t j = 0; j < F; ++j) g[j] = rd(rd(sa[j]) * a[j]);
    }
  });
  auto out = torch::empty({B, D}, fopt);
  float* op = out.data_ptr<float>();
  project(p_ffn_out, gate.data_ptr<float>(), F, op);
  rows(D, [&](int64_t i) { op[i] = rd(hp[i] + op[i]); });
  return out.to(x.scalar_type());
#else
  TORCH_CHECK(false, "the fused layer step needs AVX2 or AVX512-VNNI: ", avx2_problem());
  return x;
#endif
}

// The residual codebook search of Mimi's quantizer, stage after stage: the same ATen
// operations as ``mimi.ResidualVQ.encode`` (so the same codes, bit for bit), without a
// Python round trip between them. residual [B, dim]; per stage the augmented codebook
// [bins, dim + 2] and the codebook [bins, dim]. Returns the codes [B, stages] (long).
torch::Tensor vq_encode(torch::Tensor residual, std::vector<torch::Tensor> augmented,
                        std::vector<torch::Tensor> books) {
  // Python waits without the GIL: the server's event loop runs while a model step computes.
  pybind11::gil_scoped_release no_gil;
  TORCH_CHECK(augmented.size() == books.size() && !books.empty(), "one codebook per stage");
  TORCH_CHECK(residual.dim() == 2, "residual must be [B, dim]");
  const auto ones = residual.new_ones({residual.size(0), 1});
  std::vector<torch::Tensor> codes;
  codes.reserve(books.size());
  for (size_t i = 0; i < books.size(); ++i) {
    const auto lhs = at::cat({residual.mul(-2), residual.pow(2).sum(-1, true), ones}, -1);
    const auto dist = lhs.unsqueeze(0).matmul(augmented[i].unsqueeze(0).mT()).select(0, 0);
    const auto code = dist.clamp_min_(1e-30).sqrt_().argmin(-1);
    residual = residual - at::embedding(books[i], code);
    codes.push_back(code);
  }
  return at::stack(codes, 1);
}

#if defined(DSM_AVX2)
namespace {

// acc[r][j] (8 columns each) = X row r . W block j for R rows and 4 blocks of 8 columns,
// packed [K, 8] each (see float_pack): one fused multiply-add per input, in input order.
template <int R>
void float_block_rows(const float* X, int64_t ldx, const float* const* W, int64_t K, float* out,
                int64_t ldo) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(W[0] + 8 * k), w1 = _mm256_loadu_ps(W[1] + 8 * k);
    const __m256 w2 = _mm256_loadu_ps(W[2] + 8 * k), w3 = _mm256_loadu_ps(W[3] + 8 * k);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(X + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(x, w2, acc[r][2]);
      acc[r][3] = _mm256_fmadd_ps(x, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + r * ldo + 8 * j, acc[r][j]);
}

}  // namespace
#endif

// y [M, N] = x [M, K] . w^T (+ bias) in float32 for weights packed by ops.float_pack into
// [NB, K, 8] (blocks of 8 output columns, NB a multiple of 4): each output is one sequential
// chain of fused multiply-adds over the inputs, whatever M, so a row's result does not depend
// on the other rows. The weights stream once per call (rows two at a time against each group
// of 32 columns); bound by memory bandwidth at a few rows, where PyTorch's GEMM is not.
#if defined(DSM_AVX2)
namespace {

// y [M, N] = x [M, K] . w^T (+ bias) for weights packed [NB, K, 8] (see float_linear).
void float_product(const float* xp, int64_t M, int64_t K, const float* wp, int64_t NB,
                   const float* bp, int64_t N, float* yp) {
  at::parallel_for(0, NB / 4, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float C[2 * 32];
    for (int64_t g = begin; g < end; ++g) {
      const float* W[4];
      for (int j = 0; j < 4; ++j) W[j] = wp + (4 * g + j) * K * 8;
      const int64_t n0 = 32 * g, nn = std::min<int64_t>(32, N - n0);
      if (nn <= 0) continue;
      for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const int64_t rows = std::min<int64_t>(2, M - m0);
        if (rows == 2) float_block_rows<2>(xp + m0 * K, K, W, K, C, 32);
        else float_block_rows<1>(xp + m0 * K, K, W, K, C, 32);
        for (int64_t m = 0; m < rows; ++m) {
          float* out = yp + (m0 + m) * N + n0;
          for (int64_t n = 0; n < nn; ++n) out[n] = bp ? C[32 * m + n] + bp[n0 + n] : C[32 * m + n];
        }
      }
    }
  });
}

// One float32 projection packed for float_product.
struct FloatProjection {
  const float* w; int64_t NB, K, N;
  FloatProjection(const torch::Tensor& packed, int64_t n, int64_t k) : N(n), K(k) {
    TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kFloat &&
                packed.is_contiguous() && packed.size(2) == 8 && packed.size(0) % 4 == 0,
                "packed weights [NB, K, 8] expected");
    TORCH_CHECK(packed.size(1) == K, "the input has ", K, " features, the weights ", packed.size(1));
    NB = packed.size(0);
    TORCH_CHECK(N <= 8 * NB && 8 * NB < N + 32, "the packed weights do not have ", N, " outputs");
    w = packed.data_ptr<float>();
  }
  void apply(const float* x, int64_t M, float* y) const { float_product(x, M, K, w, NB, nullptr, N, y); }
};

// LayerNorm of row x [D] into y (two passes: mean, then variance of the deviations).
void layer_norm_row(const float* x, const float* w, const float* b, int64_t D, float eps, float* y) {
  double mean = 0.0;
  for (int64_t d = 0; d < D; ++d) mean += x[d];
  mean /= D;
  double var = 0.0;
  for (int64_t d = 0; d < D; ++d) var += (x[d] - mean) * (x[d] - mean);
  var /= D;
  const float m = static_cast<float>(mean), inv = static_cast<float>(1.0 / std::sqrt(var + eps));
  for (int64_t d = 0; d < D; ++d) y[d] = (x[d] - m) * inv * w[d] + b[d];
}

}  // namespace
#endif

// y [M, N] = x [M, K] . w^T (+ bias) in float32 for weights packed by ops.float_pack into
// [NB, K, 8] (blocks of 8 output columns, NB a multiple of 4): each output is one sequential
// chain of fused multiply-adds over the inputs, whatever M, so a row's result does not depend
// on the other rows. The weights stream once per call (rows two at a time against each group
// of 32 columns); bound by memory bandwidth at a few rows, where PyTorch's GEMM is not.
torch::Tensor float_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, int64_t N) {
  pybind11::gil_scoped_release no_gil;
#if defined(DSM_AVX2)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kFloat &&
              packed.is_contiguous() && packed.size(2) == 8 && packed.size(0) % 4 == 0,
              "packed weights [NB, K, 8] expected");
  const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "x has ", K, " inputs, the weights ", packed.size(1));
  TORCH_CHECK(N <= 8 * NB && 8 * NB < N + 32, "the packed weights do not have ", N, " outputs");
  const float* bp = nullptr;
  if (bias.defined() && bias.numel() > 0) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N && bias.scalar_type() == torch::kFloat &&
                bias.is_contiguous(), "bias must be float32 [N]");
    bp = bias.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  float_product(x.data_ptr<float>(), M, K, packed.data_ptr<float>(), NB, bp, N, y.data_ptr<float>());
  return y;
#else
  TORCH_CHECK(false, "float_linear: ", avx2_problem());
  return x;
#endif
}

// One step of T positions of a Mimi encoder-transformer layer (``MimiLayer``) for B slots in
// float32, the whole layer in one call:
//   h = x + ls1 * out(attention(rope(q), ring + rope(k), ring + v)),  [q k v] = in(LN1(x))
//   y = h + ls2 * linear2(gelu(linear1(LN2(h))))
// The new keys and values go to ring entry write_index[b, t] of slot b (layer ``layer`` of
// the float rings [L, B, H, C + 1, hd]), then each query attends the first mask.size(-1)
// entries where mask [B, T, S] is true. cos / sin [B, T, hd / 2] are the RoPE angles. The
// same function as the module path, in float32 with other orders of summation.
torch::Tensor mimi_layer_step(torch::Tensor x, std::vector<torch::Tensor> norms, double eps,
                              std::vector<torch::Tensor> packed, std::vector<int64_t> sizes,
                              torch::Tensor scale1, torch::Tensor scale2, torch::Tensor keys,
                              torch::Tensor values, int64_t layer, torch::Tensor write_index,
                              torch::Tensor cos, torch::Tensor sin, torch::Tensor mask,
                              int64_t num_heads) {
  pybind11::gil_scoped_release no_gil;
#if defined(DSM_AVX2)
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat, "x must be float32 [B, T, D]");
  TORCH_CHECK(norms.size() == 4 && packed.size() == 4 && sizes.size() == 4,
              "two norms (weight, bias each) and four projections expected");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), H = num_heads, R = B * T;
  TORCH_CHECK(H > 0 && D % H == 0 && (D / H) % 8 == 0, "bad head count");
  const int64_t hd = D / H, half = hd / 2, F = sizes[2];
  TORCH_CHECK(sizes[0] == 3 * D && sizes[1] == D && sizes[3] == D, "projection sizes do not fit a layer of width ", D);
  const FloatProjection p_in(packed[0], 3 * D, D), p_out(packed[1], D, D),
      p_l1(packed[2], F, D), p_l2(packed[3], D, F);
  for (const auto& ring : {keys, values}) {
    TORCH_CHECK(ring.dim() == 5 && ring.scalar_type() == torch::kFloat && ring.size(1) == B &&
                ring.size(2) == H && ring.size(4) == hd && ring.stride(4) == 1,
                "rings must be float32 [L, B, H, C + 1, hd]");
  }
  TORCH_CHECK(layer >= 0 && layer < keys.size(0), "layer out of range");
  const int64_t entries = keys.size(3);
  TORCH_CHECK(write_index.dim() == 2 && write_index.size(0) == B && write_index.size(1) == T &&
              write_index.scalar_type() == torch::kLong, "write_index must be long [B, T]");
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == B && mask.size(1) == T &&
              mask.scalar_type() == torch::kBool, "mask must be bool [B, T, S]");
  const int64_t S = mask.size(2);
  TORCH_CHECK(S > 0 && S <= entries, "the attended span must be within the ring");
  for (const auto& t : {cos, sin}) {
    TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == T && t.size(2) == half,
                "cos and sin must be [B, T, hd / 2]");
  }
  for (const auto& n : norms) TORCH_CHECK(n.numel() == D, "norm weights must have ", D, " entries");
  TORCH_CHECK(scale1.numel() == D && scale2.numel() == D, "layer scales must have ", D, " entries");
  const auto xf = x.contiguous();
  const auto wi = write_index.contiguous();
  const auto mk = mask.contiguous();
  const auto cs = cos.to(torch::kFloat).contiguous(), sn = sin.to(torch::kFloat).contiguous();
  std::vector<torch::Tensor> nf;
  for (const auto& n : norms) nf.push_back(n.to(torch::kFloat).contiguous());
  const auto s1 = scale1.to(torch::kFloat).contiguous(), s2 = scale2.to(torch::kFloat).contiguous();
  const int64_t* wip = wi.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(wip[i] >= 0 && wip[i] < entries, "write_index out of the ring");
  const float* xp = xf.data_ptr<float>();
  const float fe = static_cast<float>(eps);
  std::vector<float> n(R * D), qkv(R * 3 * D), att(R * D), h(R * D), a(R * F);
  auto out = torch::empty({B, T, D}, x.options());
  float* op = out.data_ptr<float>();

  // attention
  for (int64_t r = 0; r < R; ++r)
    layer_norm_row(xp + r * D, nf[0].data_ptr<float>(), nf[1].data_ptr<float>(), D, fe, n.data() + r * D);
  p_in.apply(n.data(), R, qkv.data());
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = r / T, e = wip[r];
    const float* c = cs.data_ptr<float>() + r * half;
    const float* si = sn.data_ptr<float>() + r * half;
    for (int64_t hh = 0; hh < H; ++hh) {
      for (int which = 0; which < 2; ++which) {  // q, then k
        float* v = qkv.data() + r * 3 * D + which * D + hh * hd;
        for (int64_t i = 0; i < half; ++i) {
          const float xr = v[2 * i], xi = v[2 * i + 1];
          v[2 * i] = xr * c[i] - xi * si[i];
          v[2 * i + 1] = xr * si[i] + xi * c[i];
        }
      }
      const int64_t off = layer * keys.stride(0) + b * keys.stride(1) + hh * keys.stride(2) + e * keys.stride(3);
      const int64_t voff = layer * values.stride(0) + b * values.stride(1) + hh * values.stride(2) + e * values.stride(3);
      std::memcpy(kp + off, qkv.data() + r * 3 * D + D + hh * hd, 4 * hd);
      std::memcpy(vp + voff, qkv.data() + r * 3 * D + 2 * D + hh * hd, 4 * hd);
    }
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, hh = i % H;
      const float* kb = kp + layer * keys.stride(0) + b * keys.stride(1) + hh * keys.stride(2);
      const float* vb = vp + layer * values.stride(0) + b * values.stride(1) + hh * values.stride(2);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = b * T + t;
        const float* q = qkv.data() + r * 3 * D + hh * hd;
        const bool* m = mk.data_ptr<bool>() + r * S;
        float mx = -INFINITY;
        for (int64_t s = 0; s < S; ++s) {
          if (!m[s]) { p[s] = -INFINITY; continue; }
          const float* kr = kb + s * keys.stride(3);
          __m256 acc = _mm256_setzero_ps();
          for (int64_t d = 0; d < hd; d += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(kr + d), _mm256_loadu_ps(q + d), acc);
          p[s] = hsum8(acc) * scale;
          mx = std::fmax(mx, p[s]);
        }
        float sum = 0.f;
        for (int64_t s = 0; s < S; ++s) {
          p[s] = m[s] ? std::exp(p[s] - mx) : 0.f;
          sum += p[s];
        }
        const float inv = 1.f / sum;
        float* o = att.data() + r * D + hh * hd;
        for (int64_t d0 = 0; d0 < hd; d0 += 64) {
          const int64_t nv = std::min<int64_t>(8, (hd - d0) / 8);
          __m256 acc[8];
          for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
          for (int64_t s = 0; s < S; ++s) {
            if (p[s] == 0.f) continue;
            const __m256 w = _mm256_set1_ps(p[s] * inv);
            const float* vr = vb + s * values.stride(3) + d0;
            for (int j = 0; j < nv; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(vr + 8 * j), w, acc[j]);
          }
          for (int j = 0; j < nv; ++j) _mm256_storeu_ps(o + d0 + 8 * j, acc[j]);
        }
      }
    }
  });
  p_out.apply(att.data(), R, h.data());
  const float* l1 = s1.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) h[r * D + d] = xp[r * D + d] + h[r * D + d] * l1[d];

  // feed-forward
  for (int64_t r = 0; r < R; ++r)
    layer_norm_row(h.data() + r * D, nf[2].data_ptr<float>(), nf[3].data_ptr<float>(), D, fe, n.data() + r * D);
  p_l1.apply(n.data(), R, a.data());
  // GELU (erf) through ATen's vectorized kernel, as the module path computes it
  const auto fopt = torch::TensorOptions().dtype(torch::kFloat);
  const auto g = at::gelu(torch::from_blob(a.data(), {R, F}, fopt));
  p_l2.apply(g.data_ptr<float>(), R, op);
  const float* l2 = s2.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) op[r * D + d] = h[r * D + d] + op[r * D + d] * l2[d];
  return out;
#else
  TORCH_CHECK(false, "mimi_layer_step: ", avx2_problem());
  return x;
#endif
}

// Mimi's residual codebook search with float32 distances computed here (AVX2), stage after
// stage: at each stage the entry n of least sqrt(max(|b_n|^2 - 2 x . b_n + |x|^2, 1e-30))
// (the lowest index among equals, as argmin), whose vector is taken off the residual.
// residual [B, dim]; books [stages] of [bins, dim]; norms [stages] of [bins] (|b_n|^2).
// The same function as vq_encode, the dot products in another order of summation (one chain
// per 8 lanes): codes equal except where two distances are within float rounding.
torch::Tensor vq_search(torch::Tensor residual, std::vector<torch::Tensor> books,
                        std::vector<torch::Tensor> norms) {
  pybind11::gil_scoped_release no_gil;
#if defined(DSM_AVX2)
  TORCH_CHECK(residual.dim() == 2 && residual.scalar_type() == torch::kFloat,
              "residual must be float32 [B, dim]");
  TORCH_CHECK(books.size() == norms.size() && !books.empty(), "one codebook per stage");
  const int64_t B = residual.size(0), dim = residual.size(1);
  TORCH_CHECK(dim % 8 == 0, "the codebook width must be a multiple of 8, got ", dim);
  auto x = residual.contiguous().clone();
  float* xp = x.data_ptr<float>();
  auto codes = torch::empty({B, static_cast<int64_t>(books.size())}, torch::kLong);
  int64_t* cp = codes.data_ptr<int64_t>();
  std::vector<float> xx(B);
  for (size_t s = 0; s < books.size(); ++s) {
    const auto& book = books[s];
    TORCH_CHECK(book.dim() == 2 && book.size(1) == dim && book.scalar_type() == torch::kFloat &&
                book.is_contiguous(), "codebooks must be contiguous float32 [bins, dim]");
    const int64_t bins = book.size(0);
    TORCH_CHECK(norms[s].dim() == 1 && norms[s].size(0) == bins &&
                norms[s].scalar_type() == torch::kFloat && norms[s].is_contiguous(),
                "norms must be float32 [bins]");
    const float* bk = book.data_ptr<float>();
    const float* nm = norms[s].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      float acc = 0.f;
      for (int64_t d = 0; d < dim; ++d) acc += xp[b * dim + d] * xp[b * dim + d];
      xx[b] = acc;
    }
    std::vector<float> dist(B * bins);
    at::parallel_for(0, bins / 4 + (bins % 4 ? 1 : 0), 16, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t n0 = 4 * g, nn = std::min<int64_t>(4, bins - n0);
        for (int64_t b = 0; b < B; ++b) {
          const float* xr = xp + b * dim;
          __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                           _mm256_setzero_ps()};
          for (int64_t d = 0; d < dim; d += 8) {
            const __m256 xv = _mm256_loadu_ps(xr + d);
            for (int j = 0; j < 4; ++j)
              if (j < nn) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(bk + (n0 + j) * dim + d), xv, acc[j]);
          }
          for (int j = 0; j < nn; ++j) {
            const float v = nm[n0 + j] - 2.f * hsum8(acc[j]) + xx[b];
            dist[b * bins + n0 + j] = std::sqrt(std::fmax(v, 1e-30f));
          }
        }
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      const float* row = dist.data() + b * bins;
      int64_t best = 0;
      for (int64_t n = 1; n < bins; ++n) if (row[n] < row[best]) best = n;
      cp[b * books.size() + s] = best;
      const float* e = bk + best * dim;
      for (int64_t d = 0; d < dim; ++d) xp[b * dim + d] -= e[d];
    }
  }
  return codes;
#else
  TORCH_CHECK(false, "vq_search: ", avx2_problem());
  return residual;
#endif
}

// The code paths this build has, best first (the first is the one taken by default).
std::vector<std::string> paths() {
  std::vector<std::string> names;
#if defined(DSM_VNNI)
  names.push_back("vnni");
#endif
#if defined(__AVX512F__)
  names.push_back("avx512");
#endif
#if defined(DSM_AVX2)
  names.push_back("avx2");
#endif
  names.push_back("generic");
  return names;
}
