// Compiled CPU kernels of dsm-stt, the part every kernel shares: includes, the code-path and
// product enums, the attention's views. build.py (next to this file) joins the sources in the
// order of its SOURCES (this one first) into one build for this machine (-O3 -march=native
// -fopenmp); ops.py documents each function.
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
enum Product : int64_t {
  PRODUCT_VNNI = 0, PRODUCT_AMX = 1, PRODUCT_AVX2 = 2, PRODUCT_AVX2_INT4 = 3, PRODUCT_COUNT = 4
};


struct Views {
  const float* q; float* out;
  const int8_t* k; const int8_t* v; const float* ks; const float* vs; const bool* mask;
  int64_t H, T, S, D;
  int64_t k0, k1, k2, v0, v1, v2, ks0, ks1, ks2, vs0, vs1, vs2, m0, m1, m2;
  float scale;
};


}  // namespace
