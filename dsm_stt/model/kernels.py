"""Compiled CPU kernels, built on first use by PyTorch's C++ extension loader.

Owns ``int8_attention``: the attention of a few new queries over a KV ring stored as int8 with
one float32 scale per (slot, head, entry), for the LM's ``--kv-cache int8``. Reading the ring
is what a CPU step at many slots spends most of its time on once sessions are past their first
minute (the keys and values of 750 positions, 16 layers, per slot and step); int8 halves those
bytes, and PyTorch's attention takes float tensors only, so the int8 entries are converted on
the fly inside this kernel, a cache line at a time, never materialized.

The source is compiled once per machine for its own CPU (``-march=native``: AVX-512 where the
CPU has it, plain loops the compiler vectorizes otherwise) and cached by PyTorch under
``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR`` moves it). It needs a C++ compiler and
the ``ninja`` package; ``int8_kv_problem()`` says in words why the kernel cannot be built.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import shutil

import torch
from torch import Tensor

from ..config import cpu_flags

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct Views {
  const float* q; float* out;
  const int8_t* k; const int8_t* v; const float* ks; const float* vs; const bool* mask;
  int64_t H, T, S, D;
  int64_t k0, k1, k2, v0, v1, v2, ks0, ks1, ks2, vs0, vs1, vs2, m0, m1, m2;
  float scale;
};

// Softmax over p[0..S) in place, masked entries first set to -inf; returns 1 / sum.
float softmax_in_place(float* p, const bool* mrow, int64_t m2, int64_t S) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    if (!mrow[s * m2]) p[s] = -INFINITY;
    mx = p[s] > mx ? p[s] : mx;
  }
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

torch::Tensor run(torch::Tensor q, torch::Tensor k, torch::Tensor ks, torch::Tensor v,
                  torch::Tensor vs, torch::Tensor mask, double scale, bool generic) {
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
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / H, h = n % H;
#if defined(__AVX512F__)
      if (!generic && D == 64) { pair_avx512<4>(a, b, h, p.data()); continue; }
      if (!generic && D == 128) { pair_avx512<8>(a, b, h, p.data()); continue; }
      if (!generic && D == 256) { pair_avx512<16>(a, b, h, p.data()); continue; }
#endif
      pair_generic(a, b, h, p.data());
    }
  });
  return out;
}

}  // namespace

torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor ks, torch::Tensor v,
                     torch::Tensor vs, torch::Tensor mask, double scale) {
  return run(q, k, ks, v, vs, mask, scale, false);
}

torch::Tensor attend_generic(torch::Tensor q, torch::Tensor k, torch::Tensor ks, torch::Tensor v,
                             torch::Tensor vs, torch::Tensor mask, double scale) {
  return run(q, k, ks, v, vs, mask, scale, true);
}
"""

_FLAGS = ["-O3", "-march=native", "-fopenmp"]


class KernelUnavailable(RuntimeError):
    """The compiled kernel cannot be built or loaded on this machine."""


def _build_name() -> str:
    # one build per source, flags, PyTorch and CPU: ``-march=native`` code may not run on
    # another CPU sharing the same cache directory
    cpu = platform.machine() + cpu_flags()
    key = "\n".join([_SOURCE, " ".join(_FLAGS), torch.__version__, cpu])
    return "dsm_stt_kv_int8_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _missing_tools() -> str | None:
    from torch.utils import cpp_extension

    try:
        import ninja  # noqa: F401
    except ImportError:
        return "the 'ninja' package is not installed (pip install ninja)"
    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on the PATH"
    return None


@functools.cache
def _build():
    """The loaded extension module, or the ``KernelUnavailable`` that says why there is none
    (kept, so a failed build is not retried at every call)."""
    problem = _missing_tools()
    if problem is not None:
        return KernelUnavailable(f"the int8 KV attention kernel cannot be built: {problem}")
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline(
            _build_name(),
            cpp_sources=_SOURCE,
            functions=["attend", "attend_generic"],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
        )
    except (RuntimeError, OSError, ImportError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        detail = (errors or lines or [type(exc).__name__])[-1][:400]
        return KernelUnavailable(f"the int8 KV attention kernel failed to build: {detail}")


def _module():
    built = _build()
    if isinstance(built, KernelUnavailable):
        raise built
    return built


def int8_kv_problem() -> str | None:
    """None when the int8 KV attention kernel is ready (built now if need be), else why not."""
    try:
        _module()
    except KernelUnavailable as exc:
        return str(exc)
    return None


def int8_attention(
    q: Tensor,
    keys: Tensor,
    key_scales: Tensor,
    values: Tensor,
    value_scales: Tensor,
    mask: Tensor,
    generic: bool = False,
) -> Tensor:
    """``softmax(q · k / sqrt(D) masked) · v`` with ``k = keys * key_scales`` (and ``v`` alike).

    ``q`` [B, H, T, D] float; ``keys``/``values`` int8 [B, H, S, D] (any strides with a
    contiguous last dim: views of a ring); scales float32 [B, H, S]; ``mask`` bool [B, T, S],
    true where a query may see an entry (each query must see at least one). Returns float32
    [B, H, T, D]. ``generic`` forces the plain-loop path (tests compare the two)."""
    module = _module()
    fn = module.attend_generic if generic else module.attend
    scale = q.shape[-1] ** -0.5
    return fn(q.float().contiguous(), keys, key_scales, values, value_scales, mask, scale)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of the last dim: ``x ≈ q * scale[..., None]`` with
    ``scale = max|x| / 127`` (float32)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min_(1e-30) / 127.0
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale
