// Fused softmax attention for 8-wide heads on CPU: forward and backward.
//
// softmax(q k^T * scale) v computed one query row (or a block of R rows) at a time against all keys,
// never materialising the score matrix: the forward keeps each row's log-sum-exp, the backward
// recomputes the row's probabilities from it (the FlashAttention recurrence, Dao et al. 2022, in
// its one-pass-per-row form). Keys and values arrive transposed (D x M) so that every inner loop
// runs over keys in vectors of W floats (16 where the CPU has AVX-512, else 8); with D a compile-time
// constant the D-term dot products stay in registers. PyTorch's CPU flash kernel spends most of its time
// in GEMM calls whose inner dimension is the head dim, which is what makes it slow at 8 on some CPUs.
// Parallel over batch x heads. (Templated on D, but only D = 8 is instantiated: at D = 16 the per-row
// registers spill and SDPA was faster, 0.58x-0.93x.)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

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

// Query rows per backward block: their score rows share one pass over dK and dV (4 measured best of 2/4/8).
constexpr int kRows = 4;

// exp(x) for x <= 0 (all our arguments: scores minus their row's max or log-sum-exp), W at a time:
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial (relative error
// below 2e-7), times 2^n built in the exponent bits. Below -87 the result flushes to 0.
static inline vf vexp(vf x) {
  const vf lo = bc(-87.0f);
  x = x < lo ? lo : x;
  const vi n = __builtin_convertvector(x * bc(1.44269504088896341f) - bc(0.5f), vi);  // round to nearest, x <= 0
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = x - nf * bc(0.693359375f) + nf * bc(2.12194440e-4f);  // ln2 split in two for accuracy
  vf p = bc(1.0f / 720);
  p = p * r + bc(1.0f / 120);
  p = p * r + bc(1.0f / 24);
  p = p * r + bc(1.0f / 6);
  p = p * r + bc(0.5f);
  p = p * r + bc(1.0f);
  p = p * r + bc(1.0f);
  const vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// s <- exp(s - shift) in place, optionally summing the results.
static void exp_inplace(float* __restrict__ s, int64_t n, float shift, float* sum) {
  const int64_t nW = n - n % W;
  vf acc = bc(0.f);
  for (int64_t j = 0; j < nW; j += W) {
    const vf e = vexp(ld(s + j) - bc(shift));
    st(s + j, e);
    acc += e;
  }
  float l = hsum(acc);
  for (int64_t j = nW; j < n; ++j) { s[j] = std::exp(s[j] - shift); l += s[j]; }
  if (sum) *sum = l;
}

template <int D>
static void fwd_rows(const float* Q, const float* K, const float* V, float* O, float* L, int64_t N, int64_t M, int64_t rs,
                     float sc, float* S) {
  const int64_t MW = M - M % W;
  for (int64_t i = 0; i < N; ++i) {
    const float* qi = Q + i * rs;
    vf qv[D];
    for (int d = 0; d < D; ++d) qv[d] = bc(qi[d] * sc);
    vf mv = bc(-INFINITY);
    for (int64_t j = 0; j < MW; j += W) {
      vf s = qv[0] * ld(K + j);
      for (int d = 1; d < D; ++d) s += qv[d] * ld(K + d * M + j);
      st(S + j, s);
      mv = s > mv ? s : mv;
    }
    float m = hmax(mv);
    for (int64_t j = MW; j < M; ++j) {
      float s = 0.f;
      for (int d = 0; d < D; ++d) s += qi[d] * sc * K[d * M + j];
      S[j] = s; m = s > m ? s : m;
    }
    float l;
    exp_inplace(S, M, m, &l);
    vf acc[D];
    for (int d = 0; d < D; ++d) acc[d] = bc(0.f);
    for (int64_t j = 0; j < MW; j += W) {
      vf p = ld(S + j);
      for (int d = 0; d < D; ++d) acc[d] += p * ld(V + d * M + j);
    }
    const float inv = 1.f / l;
    float* oi = O + i * rs;
    for (int d = 0; d < D; ++d) {
      float a = hsum(acc[d]);
      for (int64_t j = MW; j < M; ++j) a += S[j] * V[d * M + j];
      oi[d] = a * inv;
    }
    L[i] = m + std::log(l);
  }
}

template <int D, int R>
static void bwd_block(const float* G, const float* Q, const float* K, const float* V, const float* O, const float* L,
                      float* DQ, float* DK, float* DV, int64_t M, int64_t rs, float sc, float* S, float* P) {
  // R query rows at once: scores and dO.V^T share the K/V loads, dK/dV get one load-store per R rows.
  const int64_t MW = M - M % W;
  float Di[R];
  for (int r = 0; r < R; ++r) {
    Di[r] = 0.f;
    for (int d = 0; d < D; ++d) Di[r] += G[r * rs + d] * O[r * rs + d];
  }
  for (int r = 0; r < R; ++r) {
    vf qv[D], gv[D];
    for (int d = 0; d < D; ++d) { qv[d] = bc(Q[r * rs + d] * sc); gv[d] = bc(G[r * rs + d]); }
    float* __restrict__ sr = S + r * M; float* __restrict__ pr = P + r * M;
    const vf lv = bc(L[r]);
    for (int64_t j = 0; j < MW; j += W) {
      vf s = qv[0] * ld(K + j) - lv, dp = gv[0] * ld(V + j);
      for (int d = 1; d < D; ++d) { s += qv[d] * ld(K + d * M + j); dp += gv[d] * ld(V + d * M + j); }
      st(sr + j, s); st(pr + j, dp);
    }
    for (int64_t j = MW; j < M; ++j) {
      float s = -L[r], dp = 0.f;
      for (int d = 0; d < D; ++d) { s += Q[r * rs + d] * sc * K[d * M + j]; dp += G[r * rs + d] * V[d * M + j]; }
      sr[j] = s; pr[j] = dp;
    }
    exp_inplace(sr, M, 0.f, nullptr);  // p_ij
    for (int64_t j = 0; j < M; ++j) pr[j] = sr[j] * (pr[j] - Di[r]) * sc;  // ds_ij
  }
  for (int d = 0; d < D; ++d) {
    float* dv = DV + d * M; float* dk = DK + d * M;
    vf g[R], q[R];
    for (int r = 0; r < R; ++r) { g[r] = bc(G[r * rs + d]); q[r] = bc(Q[r * rs + d]); }
    for (int64_t j = 0; j < MW; j += W) {
      vf av = ld(dv + j), ak = ld(dk + j);
      for (int r = 0; r < R; ++r) { av += ld(S + r * M + j) * g[r]; ak += ld(P + r * M + j) * q[r]; }
      st(dv + j, av); st(dk + j, ak);
    }
    for (int64_t j = MW; j < M; ++j)
      for (int r = 0; r < R; ++r) { dv[j] += S[r * M + j] * G[r * rs + d]; dk[j] += P[r * M + j] * Q[r * rs + d]; }
  }
  for (int r = 0; r < R; ++r) {
    const float* __restrict__ pr = P + r * M;
    vf acc[D];
    for (int d = 0; d < D; ++d) acc[d] = bc(0.f);
    for (int64_t j = 0; j < MW; j += W) {
      vf ds = ld(pr + j);
      for (int d = 0; d < D; ++d) acc[d] += ds * ld(K + d * M + j);
    }
    for (int d = 0; d < D; ++d) {
      float a = hsum(acc[d]);
      for (int64_t j = MW; j < M; ++j) a += pr[j] * K[d * M + j];
      DQ[r * rs + d] = a;
    }
  }
}

template <int D>
static void bwd_rows(const float* G, const float* Q, const float* K, const float* V, const float* O, const float* L,
                     float* DQ, float* DK, float* DV, int64_t N, int64_t M, int64_t rs, float sc, float* S, float* P) {
  int64_t i = 0;
  for (; i + kRows <= N; i += kRows)
    bwd_block<D, kRows>(G + i * rs, Q + i * rs, K, V, O + i * rs, L + i, DQ + i * rs, DK, DV, M, rs, sc, S, P);
  for (; i < N; ++i)
    bwd_block<D, 1>(G + i * rs, Q + i * rs, K, V, O + i * rs, L + i, DQ + i * rs, DK, DV, M, rs, sc, S, P);
}

#define DISPATCH_D(D_, CALL) \
  switch (D_) { case 8: { constexpr int D = 8; CALL; break; } \
                default: TORCH_CHECK(false, "small-head attention: head dim ", D_, " is not 8"); }

static void check_inputs(const torch::Tensor& q, const torch::Tensor& kT, const torch::Tensor& vT) {
  for (const auto& t : {q, kT, vT})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == torch::kFloat && t.device().is_cpu(),
                "small-head attention: expects contiguous float32 CPU tensors");
  TORCH_CHECK(q.dim() == 4 && kT.dim() == 3 && kT.size(0) == q.size(0) * q.size(2) && kT.size(1) == q.size(3) &&
              vT.sizes() == kT.sizes(), "small-head attention: expects q (B, N, H, D), kT and vT (B*H, D, M)");
}

// q (B, N, H, D) (the layout of a Linear's output split into heads), kT and vT (B*H, D, M), float32,
// contiguous -> out (B, N, H, D), log-sum-exp (B*H, N).
std::vector<torch::Tensor> fwd(torch::Tensor q, torch::Tensor kT, torch::Tensor vT, double scale) {
  check_inputs(q, kT, vT);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), Dh = q.size(3), M = kT.size(2), rs = H * Dh;
  auto o = torch::empty_like(q);
  auto lse = torch::empty({B * H, N}, q.options());
  const float *Q = q.data_ptr<float>(), *K = kT.data_ptr<float>(), *V = vT.data_ptr<float>();
  float *O = o.data_ptr<float>(), *L = lse.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(M);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t row0 = (bh / H) * N * rs + (bh % H) * Dh;
      DISPATCH_D(Dh, (fwd_rows<D>(Q + row0, K + bh * D * M, V + bh * D * M, O + row0, L + bh * N, N, M, rs,
                                  (float)scale, s.data())));
    }
  });
  return {o, lse};
}

// Gradients dq (B, N, H, D), dkT and dvT (B*H, D, M) from dout (B, N, H, D) and the forward's tensors.
std::vector<torch::Tensor> bwd(torch::Tensor go, torch::Tensor q, torch::Tensor kT, torch::Tensor vT,
                               torch::Tensor o, torch::Tensor lse, double scale) {
  check_inputs(q, kT, vT);
  TORCH_CHECK(go.is_contiguous() && go.sizes() == q.sizes() && o.sizes() == q.sizes(),
              "small-head attention: dout must be contiguous (B, N, H, D)");
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), Dh = q.size(3), M = kT.size(2), rs = H * Dh;
  auto dq = torch::empty_like(q);
  auto dkT = torch::zeros_like(kT);
  auto dvT = torch::zeros_like(vT);
  const float *G = go.data_ptr<float>(), *Q = q.data_ptr<float>(), *K = kT.data_ptr<float>(), *V = vT.data_ptr<float>();
  const float *O = o.data_ptr<float>(), *L = lse.data_ptr<float>();
  float *DQ = dq.data_ptr<float>(), *DK = dkT.data_ptr<float>(), *DV = dvT.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(kRows * M), p(kRows * M);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t row0 = (bh / H) * N * rs + (bh % H) * Dh;
      DISPATCH_D(Dh, (bwd_rows<D>(G + row0, Q + row0, K + bh * D * M, V + bh * D * M, O + row0, L + bh * N,
                                  DQ + row0, DK + bh * D * M, DV + bh * D * M, N, M, rs, (float)scale, s.data(),
                                  p.data())));
    }
  });
  return {dq, dkT, dvT};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "small-head attention forward");
  m.def("bwd", &bwd, "small-head attention backward");
}
