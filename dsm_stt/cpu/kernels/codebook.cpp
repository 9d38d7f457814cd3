// Mimi's residual codebook search in one call: the ATen operations of the module
// (``ops.vq_encode``) and the AVX2 distance search (``ops.vq_search``). Follows
// float_product.cpp.

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
