// Shared by the framework's CPU kernels: W-float GCC/Clang vectors and a vectorised exp for x <= 0.
#pragma once
#include <cmath>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// W floats as one GCC/Clang vector (the widest the build's target has); unaligned loads and stores through memcpy.
#if defined(__AVX512F__)
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int vi __attribute__((vector_size(W * sizeof(int))));
static inline vf ld(const float* p) { vf r; std::memcpy(&r, p, sizeof(r)); return r; }
static inline void st(float* p, vf x) { std::memcpy(p, &x, sizeof(x)); }
static inline vf bc(float x) { vf r = {}; return r + x; }
static inline float hsum(vf x) { float s = 0.f; for (int t = 0; t < W; ++t) s += x[t]; return s; }
static inline float hmax(vf x) { float s = x[0]; for (int t = 1; t < W; ++t) s = x[t] > s ? x[t] : s; return s; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x) W at a time for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial
// (relative error below 2e-7), times 2^n; exactly 0 below kExpLow (so padded keys' -inf scores give 0).
constexpr float kExpLow = -86.0f;  // above it 2^n stays a normal float; below it the result is 0, never a subnormal

// exp(x - n ln2) for n = nf, the rounded x / ln2 (ln2 split in two for accuracy).
static inline vf exp_reduced(vf x, vf nf) {
  const vf r = x - nf * bc(0.693359375f) + nf * bc(2.12194440e-4f);
  vf p = bc(1.0f / 720);
  p = p * r + bc(1.0f / 120);
  p = p * r + bc(1.0f / 24);
  p = p * r + bc(1.0f / 6);
  p = p * r + bc(0.5f);
  p = p * r + bc(1.0f);
  return p * r + bc(1.0f);
}

#if defined(__AVX512F__)
static inline vf vexp(vf x) {
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, (__m512)bc(kExpLow), _CMP_GE_OQ);
  x = vmax(x, bc(kExpLow));
  const vf nf = (vf)_mm512_roundscale_ps((__m512)(x * bc(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  return (vf)_mm512_maskz_scalef_ps(keep, (__m512)exp_reduced(x, nf), (__m512)nf);  // p 2^n
}
#else
static inline vf vexp(vf x) {
  const auto under = x < bc(kExpLow);
  x = under ? bc(kExpLow) : x;
  const vi n = __builtin_convertvector(x * bc(1.44269504088896341f) - bc(0.5f), vi);  // round to nearest, x <= 0
  const vi bits = (n + 127) << 23;  // 2^n in the exponent bits
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? bc(0.f) : exp_reduced(x, __builtin_convertvector(n, vf)) * scale;
}
#endif
