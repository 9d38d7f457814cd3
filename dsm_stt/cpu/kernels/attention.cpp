// The attention of new queries over an int8 KV ring (``ops.int8_attention``, the int8 ring
// of ``kvcache.Int8KVCache`` and the fused layer step): a plain-loop path, AVX-512, AVX2 and
// AVX512-VNNI ones, and the list of the paths this build has. Follows kernels.cpp.

namespace {

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

}  // namespace

torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor ks, torch::Tensor v,
                     torch::Tensor vs, torch::Tensor mask, double scale, int64_t path) {
  // Python waits without the GIL: the server's event loop runs while a model step computes.
  pybind11::gil_scoped_release no_gil;
  return run(q, k, ks, v, vs, mask, scale, path);
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
