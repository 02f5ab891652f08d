// Fused softmax attention for small head dims (8, 16) on CPU: forward and backward.
//
// softmax(q k^T * scale) v computed one query row (or a block of R rows) at a time against all keys,
// never materialising the score matrix: the forward keeps each row's log-sum-exp, the backward
// recomputes the row's probabilities from it (the FlashAttention recurrence, Dao et al. 2022, in
// its one-pass-per-row form). Keys and values arrive transposed (D x M) so that every inner loop
// runs over keys in 8-float vectors; with D a compile-time constant the D-term dot products stay in
// registers. PyTorch's CPU flash kernel spends most of its time in GEMM calls whose inner dimension
// is the head dim, which is what makes it slow at 8 or 16. Parallel over batch x heads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

// 8 floats as one GCC/Clang vector; unaligned loads and stores through memcpy.
typedef float v8 __attribute__((vector_size(32)));
static inline v8 ld(const float* p) { v8 r; std::memcpy(&r, p, sizeof(r)); return r; }
static inline void st(float* p, v8 x) { std::memcpy(p, &x, sizeof(x)); }
static inline v8 bc(float x) { return v8{x, x, x, x, x, x, x, x}; }
static inline float hsum(v8 x) { float s = 0.f; for (int t = 0; t < 8; ++t) s += x[t]; return s; }
static inline float hmax(v8 x) { float s = x[0]; for (int t = 1; t < 8; ++t) s = x[t] > s ? x[t] : s; return s; }

// s <- exp(s - shift) in place (vectorised by the compiler), optionally summing the results.
static void exp_inplace(float* __restrict__ s, int64_t n, float shift, float* sum) {
  float l = 0.f;
  for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - shift); l += s[j]; }
  if (sum) *sum = l;
}

template <int D>
static void fwd_rows(const float* Q, const float* K, const float* V, float* O, float* L, int64_t N, int64_t M,
                     float sc, float* S) {
  const int64_t M8 = M - M % 8;
  for (int64_t i = 0; i < N; ++i) {
    const float* qi = Q + i * D;
    v8 qv[D];
    for (int d = 0; d < D; ++d) qv[d] = bc(qi[d] * sc);
    v8 mv = bc(-INFINITY);
    for (int64_t j = 0; j < M8; j += 8) {
      v8 s = qv[0] * ld(K + j);
      for (int d = 1; d < D; ++d) s += qv[d] * ld(K + d * M + j);
      st(S + j, s);
      mv = s > mv ? s : mv;
    }
    float m = hmax(mv);
    for (int64_t j = M8; j < M; ++j) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qi[d] * sc * K[d * M + j];
      S[j] = s; m = s > m ? s : m;
    }
    float l;
    exp_inplace(S, M, m, &l);
    v8 acc[D];
    for (int d = 0; d < D; ++d) acc[d] = bc(0.f);
    for (int64_t j = 0; j < M8; j += 8) {
      v8 p = ld(S + j);
      for (int d = 0; d < D; ++d) acc[d] += p * ld(V + d * M + j);
    }
    const float inv = 1.f / l;
    float* oi = O + i * D;
    for (int d = 0; d < D; ++d) {
      float a = hsum(acc[d]);
      for (int64_t j = M8; j < M; ++j) a += S[j] * V[d * M + j];
      oi[d] = a * inv;
    }
    L[i] = m + std::log(l);
  }
}

template <int D, int R>
static void bwd_block(const float* G, const float* Q, const float* K, const float* V, const float* O, const float* L,
                      float* DQ, float* DK, float* DV, int64_t M, float sc, float* S, float* P) {
  // R query rows at once: scores and dO.V^T share the K/V loads, dK/dV get one load-store per R rows.
  const int64_t M8 = M - M % 8;
  float Di[R];
  for (int r = 0; r < R; ++r) {
    Di[r] = 0.f;
    for (int d = 0; d < D; ++d) Di[r] += G[r * D + d] * O[r * D + d];
  }
  for (int r = 0; r < R; ++r) {
    v8 qv[D], gv[D];
    for (int d = 0; d < D; ++d) { qv[d] = bc(Q[r * D + d] * sc); gv[d] = bc(G[r * D + d]); }
    float* __restrict__ sr = S + r * M; float* __restrict__ pr = P + r * M;
    const v8 lv = bc(L[r]);
    for (int64_t j = 0; j < M8; j += 8) {
      v8 s = qv[0] * ld(K + j) - lv, dp = gv[0] * ld(V + j);
      for (int d = 1; d < D; ++d) { s += qv[d] * ld(K + d * M + j); dp += gv[d] * ld(V + d * M + j); }
      st(sr + j, s); st(pr + j, dp);
    }
    for (int64_t j = M8; j < M; ++j) {
      float s = -L[r], dp = 0.f;
      for (int d = 0; d < D; ++d) { s += Q[r * D + d] * sc * K[d * M + j]; dp += G[r * D + d] * V[d * M + j]; }
      sr[j] = s; pr[j] = dp;
    }
    for (int64_t j = 0; j < M; ++j) { const float p = std::exp(sr[j]); sr[j] = p; pr[j] = p * (pr[j] - Di[r]) * sc; }
  }
  for (int d = 0; d < D; ++d) {
    float* dv = DV + d * M; float* dk = DK + d * M;
    v8 g[R], q[R];
    for (int r = 0; r < R; ++r) { g[r] = bc(G[r * D + d]); q[r] = bc(Q[r * D + d]); }
    for (int64_t j = 0; j < M8; j += 8) {
      v8 av = ld(dv + j), ak = ld(dk + j);
      for (int r = 0; r < R; ++r) { av += ld(S + r * M + j) * g[r]; ak += ld(P + r * M + j) * q[r]; }
      st(dv + j, av); st(dk + j, ak);
    }
    for (int64_t j = M8; j < M; ++j)
      for (int r = 0; r < R; ++r) { dv[j] += S[r * M + j] * G[r * D + d]; dk[j] += P[r * M + j] * Q[r * D + d]; }
  }
  for (int r = 0; r < R; ++r) {
    const float* __restrict__ pr = P + r * M;
    v8 acc[D];
    for (int d = 0; d < D; ++d) acc[d] = bc(0.f);
    for (int64_t j = 0; j < M8; j += 8) {
      v8 ds = ld(pr + j);
      for (int d = 0; d < D; ++d) acc[d] += ds * ld(K + d * M + j);
    }
    for (int d = 0; d < D; ++d) {
      float a = hsum(acc[d]);
      for (int64_t j = M8; j < M; ++j) a += pr[j] * K[d * M + j];
      DQ[r * D + d] = a;
    }
  }
}

template <int D>
static void bwd_rows(const float* G, const float* Q, const float* K, const float* V, const float* O, const float* L,
                     float* DQ, float* DK, float* DV, int64_t N, int64_t M, float sc, float* S, float* P) {
  constexpr int R = 4;
  int64_t i = 0;
  for (; i + R <= N; i += R)
    bwd_block<D, R>(G + i * D, Q + i * D, K, V, O + i * D, L + i, DQ + i * D, DK, DV, M, sc, S, P);
  for (; i < N; ++i)
    bwd_block<D, 1>(G + i * D, Q + i * D, K, V, O + i * D, L + i, DQ + i * D, DK, DV, M, sc, S, P);
}

#define DISPATCH_D(D_, CALL) \
  switch (D_) { case 8: { constexpr int D = 8; CALL; break; } case 16: { constexpr int D = 16; CALL; break; } \
                default: TORCH_CHECK(false, "small-head attention: head dim ", D_, " not in (8, 16)"); }

// q (BH, N, D), kT and vT (BH, D, M), all contiguous float32 -> out (BH, N, D), log-sum-exp (BH, N).
std::vector<torch::Tensor> fwd(torch::Tensor q, torch::Tensor kT, torch::Tensor vT, double scale) {
  for (const auto& t : {q, kT, vT})
    TORCH_CHECK(t.dim() == 3 && t.is_contiguous() && t.scalar_type() == torch::kFloat && t.device().is_cpu(),
                "small-head attention: expects contiguous 3-d float32 CPU tensors");
  const int64_t BH = q.size(0), N = q.size(1), Dh = q.size(2), M = kT.size(2);
  TORCH_CHECK(kT.size(0) == BH && kT.size(1) == Dh && vT.sizes() == kT.sizes(), "small-head attention: shape mismatch");
  auto o = torch::empty({BH, N, Dh}, q.options());
  auto lse = torch::empty({BH, N}, q.options());
  const float *Q = q.data_ptr<float>(), *K = kT.data_ptr<float>(), *V = vT.data_ptr<float>();
  float *O = o.data_ptr<float>(), *L = lse.data_ptr<float>();
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(M);
    for (int64_t b = b0; b < b1; ++b) {
      DISPATCH_D(Dh, (fwd_rows<D>(Q + b * N * D, K + b * D * M, V + b * D * M, O + b * N * D, L + b * N, N, M,
                                  (float)scale, s.data())));
    }
  });
  return {o, lse};
}

// Gradients (dq (BH, N, D), dkT and dvT (BH, D, M)) from dout and the forward's inputs and outputs.
std::vector<torch::Tensor> bwd(torch::Tensor go, torch::Tensor q, torch::Tensor kT, torch::Tensor vT,
                               torch::Tensor o, torch::Tensor lse, double scale) {
  const int64_t BH = q.size(0), N = q.size(1), Dh = q.size(2), M = kT.size(2);
  auto dq = torch::empty_like(q);
  auto dkT = torch::zeros_like(kT);
  auto dvT = torch::zeros_like(vT);
  const float *G = go.data_ptr<float>(), *Q = q.data_ptr<float>(), *K = kT.data_ptr<float>(), *V = vT.data_ptr<float>();
  const float *O = o.data_ptr<float>(), *L = lse.data_ptr<float>();
  float *DQ = dq.data_ptr<float>(), *DK = dkT.data_ptr<float>(), *DV = dvT.data_ptr<float>();
  at::parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(4 * M), p(4 * M);
    for (int64_t b = b0; b < b1; ++b) {
      DISPATCH_D(Dh, (bwd_rows<D>(G + b * N * D, Q + b * N * D, K + b * D * M, V + b * D * M, O + b * N * D, L + b * N,
                                  DQ + b * N * D, DK + b * D * M, DV + b * D * M, N, M, (float)scale, s.data(), p.data())));
    }
  });
  return {dq, dkT, dvT};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "small-head attention forward");
  m.def("bwd", &bwd, "small-head attention backward");
}
