// The int8 products of the W8A8 projections (``ops.amx_linear`` / ``vnni_linear`` /
// ``avx2_linear``): each row quantized, the exact integer sums on AMX tiles, AVX512-VNNI or
// AVX2, the float epilogue; ``Projection``, which the fused layer step calls. Follows
// attention.cpp.

namespace {

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

// The rows x [M, K] on the grid (quantize_row_avx2) into A [M, Kp] (zero-padded), their
// magnitudes into U, each row's max|x| / levels into xs: the AVX2 products' left operand.
void quantize_rows_avx2(const float* xp, int64_t M, int64_t K, int64_t Kp, float lv, int8_t* A,
                        uint8_t* U, float* xs) {
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      xs[m] = quantize_row_avx2(xp + m * K, K, lv, A + m * Kp);
      for (int64_t k = 0; k < Kp; k += 32) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + m * Kp + k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(U + m * Kp + k), _mm256_abs_epi8(v));
      }
    }
  });
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
  quantize_rows_avx2(xp, M, K, Kp, lv, A.data(), U.data(), xs.data());
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

// The int4 sibling of avx2_rows (``W4A8Linear``): each block of 16 columns x 64 inputs is 512
// bytes, byte i of k4-row k4 (32 bytes) holding in its low nibble what byte i of the int8
// layout holds (columns 0-7) and in its high nibble byte i + 32 (columns 8-15), each weight
// plus 8 (weights in -7..7); S [KB, 16] the block's per-column scales (one per 64 inputs).
// The exact int32 sums of one block, float, times its scales, accumulate in float: Cf [R, 16].
template <int R>
void avx2_int4_rows(const int8_t* A, const uint8_t* U, int64_t lda, const uint8_t* B,
                    const float* S, int64_t KB, float* Cf) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i low = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(8);
  __m256 accf[R][2];
  for (int r = 0; r < R; ++r) accf[r][0] = accf[r][1] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint8_t* b = B + kb * 512;
    const int64_t a0 = kb * 64;
    __m256i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int k4 = 0; k4 < 16; ++k4) {
      const __m256i nib = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * k4));
      const __m256i w0 = _mm256_sub_epi8(_mm256_and_si256(nib, low), eight);
      const __m256i w1 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(nib, 4), low), eight);
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
    const __m256 s0 = _mm256_loadu_ps(S + 16 * kb), s1 = _mm256_loadu_ps(S + 16 * kb + 8);
    for (int r = 0; r < R; ++r) {
      accf[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), s0, accf[r][0]);
      accf[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), s1, accf[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(Cf + 16 * r, accf[r][0]);
    _mm256_storeu_ps(Cf + 16 * r + 8, accf[r][1]);
  }
}

// y [M, N] = sum over blocks of (round(x / max|x| * levels) . w_block^T) * scale_block, times
// max|x| / levels, for float32 rows x [M, K] and int4 weights packed as avx2_int4_rows says
// ([NB, KB, 512] with scales [NB, KB, 16]): the weights, half the int8 bytes, stream once.
void avx2_int4_product(const float* xp, int64_t M, int64_t K, const uint8_t* wp, int64_t NB,
                       int64_t KB, const float* sp, int64_t N, float lv, float* yp) {
  const int64_t Kp = 64 * KB;
  std::vector<int8_t> A(M * Kp, 0);
  std::vector<uint8_t> U(M * Kp, 0);
  std::vector<float> xs(M, 0.f);
  quantize_rows_avx2(xp, M, K, Kp, lv, A.data(), U.data(), xs.data());
  at::parallel_for(0, NB, 4, [&](int64_t begin, int64_t end) {
    alignas(32) float C[4 * 16];
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint8_t* B = wp + nb * KB * 512;
      const float* S = sp + nb * KB * 16;
      const int64_t n0 = 16 * nb, nn = std::min<int64_t>(16, N - n0);
      if (nn <= 0) continue;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t rows = std::min<int64_t>(4, M - m0);
        const int8_t* a = A.data() + m0 * Kp;
        const uint8_t* u = U.data() + m0 * Kp;
        switch (rows) {
          case 1: avx2_int4_rows<1>(a, u, Kp, B, S, KB, C); break;
          case 2: avx2_int4_rows<2>(a, u, Kp, B, S, KB, C); break;
          case 3: avx2_int4_rows<3>(a, u, Kp, B, S, KB, C); break;
          default: avx2_int4_rows<4>(a, u, Kp, B, S, KB, C); break;
        }
        for (int64_t m = 0; m < rows; ++m) {
          float* y = yp + (m0 + m) * N + n0;
          const float x = xs[m0 + m];
          for (int64_t n = 0; n < nn; ++n) y[n] = C[16 * m + n] * x;
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

// One W8A8 (or W4A8) projection: packed weights [NB, KB, 1024] (int4: [NB, KB, 512]), float32
// scales [N] (int4: [NB, KB, 16], one per column and 64 inputs), its output size, the int32
// column sums [N] of its weights (the VNNI product's offset) and which product runs.
struct Projection {
  const int8_t* w; int64_t NB, KB; const float* ws; const int32_t* colsum; int64_t N;
  int64_t product;
  Projection(const torch::Tensor& packed, const torch::Tensor& scales, const torch::Tensor& sums,
             int64_t n, int64_t K, int64_t which)
      : w(packed.data_ptr<int8_t>()), NB(packed.size(0)), KB(packed.size(1)),
        ws(scales.data_ptr<float>()), colsum(nullptr), N(n), product(which) {
    const bool int4 = product == PRODUCT_AVX2_INT4;
    TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kChar &&
                packed.is_contiguous() && packed.size(2) == (int4 ? 512 : 1024) && NB % 2 == 0,
                "packed weights expected");
    TORCH_CHECK(K <= 64 * KB && 64 * KB < K + 64 && N <= 16 * NB && 16 * NB < N + 32,
                "x and the packed weights disagree on the sizes");
    if (int4) {
      TORCH_CHECK(scales.dim() == 3 && scales.size(0) == NB && scales.size(1) == KB &&
                  scales.size(2) == 16 && scales.scalar_type() == torch::kFloat &&
                  scales.is_contiguous(), "int4 scales must be float32 [NB, KB, 16]");
    } else {
      TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N &&
                  scales.scalar_type() == torch::kFloat && scales.is_contiguous(),
                  "scales must be float32 [N]");
    }
    TORCH_CHECK(product >= 0 && product < PRODUCT_COUNT, "unknown int8 product ", product);
#if !defined(DSM_AMX)
    TORCH_CHECK(product != PRODUCT_AMX, amx_problem());
#endif
#if !defined(DSM_VNNI)
    TORCH_CHECK(product != PRODUCT_VNNI, vnni_problem());
#endif
#if !defined(DSM_AVX2)
    TORCH_CHECK(product != PRODUCT_AVX2 && product != PRODUCT_AVX2_INT4, avx2_problem());
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
    if (product == PRODUCT_AVX2_INT4) {
      avx2_int4_product(x, M, K, reinterpret_cast<const uint8_t*>(w), NB, KB, ws, N, levels, y);
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
                     : product == PRODUCT_AVX2 || product == PRODUCT_AVX2_INT4 ? avx2_problem()
                                                                              : vnni_problem());
  return x;
#endif
}
