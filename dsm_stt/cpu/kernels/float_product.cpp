// float32 products streaming packed weights (``ops.float_linear``) and Mimi's encoder-
// transformer layer in one call (``ops.mimi_layer_step``), on AVX2. Follows lm_layer_step.cpp.

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
  FloatProjection(const torch::Tensor& packed, int64_t n, int64_t k) : K(k), N(n) {
    TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kFloat &&
                packed.is_contiguous() && packed.size(2) == 8 && packed.size(0) % 4 == 0,
                "packed weights [NB, K, 8] expected");
    TORCH_CHECK(packed.size(1) == K, "x has ", K, " inputs, the weights ", packed.size(1));
    NB = packed.size(0);
    TORCH_CHECK(N <= 8 * NB && 8 * NB < N + 32, "the packed weights do not have ", N, " outputs");
    w = packed.data_ptr<float>();
  }
  void apply(const float* x, int64_t M, float* y, const float* bias = nullptr) const {
    float_product(x, M, K, w, NB, bias, N, y);
  }
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
  const FloatProjection proj(packed, N, x.size(1));
  const int64_t M = x.size(0);
  const float* bp = nullptr;
  if (bias.defined() && bias.numel() > 0) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N && bias.scalar_type() == torch::kFloat &&
                bias.is_contiguous(), "bias must be float32 [N]");
    bp = bias.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  proj.apply(x.data_ptr<float>(), M, y.data_ptr<float>(), bp);
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
