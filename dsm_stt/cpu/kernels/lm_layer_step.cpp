// One decode position of a DSM LM layer in one call (``ops.lm_layer_step``, for
// ``fused.FusedTransformer``). Follows int8_product.cpp.

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
