// Fused softmax attention for 8-wide heads on CPU: forward and backward.
//
// softmax(q k^T * scale) v computed one query row (or a block of R rows) at a time against all keys,
// never materialising the score matrix: the forward keeps each row's log-sum-exp, the backward
// recomputes the row's probabilities from it (the FlashAttention recurrence, Dao et al. 2022, in
// its one-pass-per-row form). Keys and values arrive transposed (D x M) so that every inner loop
// runs over keys in 8-float vectors; with D a compile-time constant the D-term dot products stay in
// registers. PyTorch's CPU flash kernel spends most of its time in GEMM calls whose inner dimension
// is the head dim, which is what makes it slow at 8. Parallel over batch x heads. (Templated on D, but
// only D = 8 is instantiated: at D = 16 the per-row registers spill and SDPA was faster, 0.58x-0.93x.)
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

// Query rows per backward block: their score rows share one pass over dK and dV (4 measured best of 2/4/8).
constexpr int kRows = 4;

typedef int v8i __attribute__((vector_size(32)));

// exp(x) for x <= 0 (all our arguments: scores minus their row's max or log-sum-exp), 8 at a time:
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial (relative error
// below 2e-7), times 2^n built in the exponent bits. Below -87 the result flushes to 0.
static inline v8 vexp(v8 x) {
  const v8 lo = bc(-87.0f);
  x = x < lo ? lo : x;
  const v8i n = __builtin_convertvector(x * bc(1.44269504088896341f) - bc(0.5f), v8i);  // round to nearest, x <= 0
  const v8 nf = __builtin_convertvector(n, v8);
  const v8 r = x - nf * bc(0.693359375f) + nf * bc(2.12194440e-4f);  // ln2 split in two for accuracy
  v8 p = bc(1.0f / 720);
  p = p * r + bc(1.0f / 120);
  p = p * r + bc(1.0f / 24);
  p = p * r + bc(1.0f / 6);
  p = p * r + bc(0.5f);
  p = p * r + bc(1.0f);
  p = p * r + bc(1.0f);
  const v8i bits = (n + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// s <- exp(s - shift) in place, optionally summing the results.
static void exp_inplace(float* __restrict__ s, int64_t n, float shift, float* sum) {
  const int64_t n8 = n - n % 8;
  v8 acc = bc(0.f);
  for (int64_t j = 0; j < n8; j += 8) {
    const v8 e = vexp(ld(s + j) - bc(shift));
    st(s + j, e);
    acc += e;
  }
  float l = hsum(acc);
  for (int64_t j = n8; j < n; ++j) { s[j] = std::exp(s[j] - shift); l += s[j]; }
  if (sum) *sum = l;
}

template <int D>
static void fwd_rows(const float* Q, const float* K, const float* V, float* O, float* L, int64_t N, int64_t M, int64_t rs,
                     float sc, float* S) {
  const int64_t M8 = M - M % 8;
  for (int64_t i = 0; i < N; ++i) {
    const float* qi = Q + i * rs;
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
    float* oi = O + i * rs;
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
                      float* DQ, float* DK, float* DV, int64_t M, int64_t rs, float sc, float* S, float* P) {
  // R query rows at once: scores and dO.V^T share the K/V loads, dK/dV get one load-store per R rows.
  const int64_t M8 = M - M % 8;
  float Di[R];
  for (int r = 0; r < R; ++r) {
    Di[r] = 0.f;
    for (int d = 0; d < D; ++d) Di[r] += G[r * rs + d] * O[r * rs + d];
  }
  for (int r = 0; r < R; ++r) {
    v8 qv[D], gv[D];
    for (int d = 0; d < D; ++d) { qv[d] = bc(Q[r * rs + d] * sc); gv[d] = bc(G[r * rs + d]); }
    float* __restrict__ sr = S + r * M; float* __restrict__ pr = P + r * M;
    const v8 lv = bc(L[r]);
    for (int64_t j = 0; j < M8; j += 8) {
      v8 s = qv[0] * ld(K + j) - lv, dp = gv[0] * ld(V + j);
      for (int d = 1; d < D; ++d) { s += qv[d] * ld(K + d * M + j); dp += gv[d] * ld(V + d * M + j); }
      st(sr + j, s); st(pr + j, dp);
    }
    for (int64_t j = M8; j < M; ++j) {
      float s = -L[r], dp = 0.f;
      for (int d = 0; d < D; ++d) { s += Q[r * rs + d] * sc * K[d * M + j]; dp += G[r * rs + d] * V[d * M + j]; }
      sr[j] = s; pr[j] = dp;
    }
    exp_inplace(sr, M, 0.f, nullptr);  // p_ij
    for (int64_t j = 0; j < M; ++j) pr[j] = sr[j] * (pr[j] - Di[r]) * sc;  // ds_ij
  }
  for (int d = 0; d < D; ++d) {
    float* dv = DV + d * M; float* dk = DK + d * M;
    v8 g[R], q[R];
    for (int r = 0; r < R; ++r) { g[r] = bc(G[r * rs + d]); q[r] = bc(Q[r * rs + d]); }
    for (int64_t j = 0; j < M8; j += 8) {
      v8 av = ld(dv + j), ak = ld(dk + j);
      for (int r = 0; r < R; ++r) { av += ld(S + r * M + j) * g[r]; ak += ld(P + r * M + j) * q[r]; }
      st(dv + j, av); st(dk + j, ak);
    }
    for (int64_t j = M8; j < M; ++j)
      for (int r = 0; r < R; ++r) { dv[j] += S[r * M + j] * G[r * rs + d]; dk[j] += P[r * M + j] * Q[r * rs + d]; }
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
