// Fused softmax attention for 8-wide heads on CPU: forward and backward.
//
// softmax(q k^T * scale) v without materialising the score matrix: blocks of R query rows against all keys; the
// forward keeps each row's log-sum-exp and the backward recomputes the rows' probabilities from it, key tile by key
// tile (the FlashAttention recurrence, Dao et al. 2022). Keys and values arrive transposed (D x Mp, Mp the key count
// padded to a multiple of W) so that every inner loop runs over keys in vectors of W floats (16 where the CPU has
// AVX-512, else 8); a block's K / V vectors are loaded once and used by its R rows, whose head-dim scalars are
// broadcast, so the loops are bound by arithmetic rather than by loads. Padded keys get probability 0. PyTorch's CPU
// flash kernel spends most of its time in GEMM calls whose inner dimension is the head dim, which is what makes it
// slow at 8. Parallel over batch x heads. (Templated on D, but only D = 8 is instantiated: at D = 16 it ran at
// 0.9x SDPA's speed over 256 keys.)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#include "kernels.h"
#include "vec.h"

// Block sizes: query rows per block (forward, backward) and keys per backward tile (its probabilities and dS stay
// in L1), overridable with -D for tuning. Measured on an AVX-512 CPU at 1,024 tokens: forward 4 rows (2 and 8
// slower), backward 16 rows of 128-key tiles (8 rows, or 256-key tiles, about 5% slower).
#ifndef LDM_FWD_ROWS
#define LDM_FWD_ROWS 4
#endif
#ifndef LDM_BWD_ROWS
#define LDM_BWD_ROWS 16
#endif
#ifndef LDM_BWD_TILE
#define LDM_BWD_TILE 128
#endif
constexpr int kFwdRows = LDM_FWD_ROWS;
constexpr int kBwdRows = LDM_BWD_ROWS;
constexpr int kTile = LDM_BWD_TILE;
constexpr int kAcc = 16;  // accumulator registers for the reductions over keys

// -inf in the lanes of the last key vector that are padding (keys M..Mp-1), 0 elsewhere.
static vf tail_mask(int64_t M, int64_t Mp) {
  vf t = bc(0.f);
  for (int l = 0; l < W; ++l)
    if (Mp - W + l >= M) t[l] = -INFINITY;
  return t;
}

// acc[r][d] += A[r][j] B[d][j] lane-wise over j in [0, n) (a multiple of W), for R rows of A (stride lda) and the D
// rows of B (stride ldb); the sums over lanes are left to the caller (hsum), once after all key tiles. Accumulators
// in groups of kAcc / R head dims held in registers, each B vector loaded once per group.
template <int D, int R>
static inline void rows_dot(const float* A, int64_t lda, const float* B, int64_t ldb, int64_t n, vf (*out)[D]) {
  constexpr int DB = (kAcc / R) < 1 ? 1 : ((kAcc / R) > D ? D : (kAcc / R));
  static_assert(D % DB == 0, "head dim must split into accumulator groups");
  for (int d0 = 0; d0 < D; d0 += DB) {
    vf acc[R][DB];
    for (int r = 0; r < R; ++r)
      for (int e = 0; e < DB; ++e) acc[r][e] = out[r][d0 + e];
    for (int64_t j = 0; j < n; j += W) {
      vf b[DB];
      for (int e = 0; e < DB; ++e) b[e] = ld(B + (d0 + e) * ldb + j);
      for (int r = 0; r < R; ++r) {
        const vf a = ld(A + r * lda + j);
        for (int e = 0; e < DB; ++e) acc[r][e] += a * b[e];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int e = 0; e < DB; ++e) out[r][d0 + e] = acc[r][e];
  }
}

// Out[d][j] += sum_r A[r][j] c[r][d] for j in [0, n) (a multiple of W): R rows of A (stride kTile) weighted by
// scalars, into D rows of Out (stride ldo). Register-blocked like a GEMM micro-kernel: JV x D output vectors stay in
// registers while the R rows stream through, so each output vector is loaded and stored once per call.
template <int D, int R, int JV>
static inline void outer_acc_cols(const float* A, const float (*c)[D], float* Out, int64_t ldo, int64_t j) {
  vf acc[JV][D];
  for (int u = 0; u < JV; ++u)
    for (int d = 0; d < D; ++d) acc[u][d] = ld(Out + d * ldo + j + u * W);
  for (int r = 0; r < R; ++r) {
    vf a[JV];
    for (int u = 0; u < JV; ++u) a[u] = ld(A + r * kTile + j + u * W);
    for (int d = 0; d < D; ++d) {
      const vf cb = bc(c[r][d]);
      for (int u = 0; u < JV; ++u) acc[u][d] += a[u] * cb;
    }
  }
  for (int u = 0; u < JV; ++u)
    for (int d = 0; d < D; ++d) st(Out + d * ldo + j + u * W, acc[u][d]);
}

template <int D, int R>
static inline void outer_acc(const float* A, const float (*c)[D], float* Out, int64_t ldo, int64_t n) {
  constexpr int JV = kAcc / D < 1 ? 1 : kAcc / D;
  int64_t j = 0;
  for (; j + JV * W <= n; j += JV * W) outer_acc_cols<D, R, JV>(A, c, Out, ldo, j);
  for (; j < n; j += W) outer_acc_cols<D, R, 1>(A, c, Out, ldo, j);
}

// Forward for R query rows (stride rs) against all Mp keys: O rows, log-sum-exps L; S: R x Mp scratch.
template <int D, int R>
static void fwd_block(const float* Q, const float* K, const float* V, float* O, float* L, int64_t Mp, vf tail,
                      int64_t rs, float sc, float* S) {
  float qs[R][D];
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d) qs[r][d] = Q[r * rs + d] * sc;
  vf mv[R];
  for (int r = 0; r < R; ++r) mv[r] = bc(-INFINITY);
  const int64_t last = Mp - W;
  auto scores = [&](int64_t j, vf mask) {
    vf k[D];
    for (int d = 0; d < D; ++d) k[d] = ld(K + d * Mp + j);
    for (int r = 0; r < R; ++r) {
      vf s = bc(qs[r][0]) * k[0];
      for (int d = 1; d < D; ++d) s += bc(qs[r][d]) * k[d];
      s += mask;
      st(S + r * Mp + j, s);
      mv[r] = vmax(mv[r], s);
    }
  };
  for (int64_t j = 0; j < last; j += W) scores(j, bc(0.f));
  scores(last, tail);
  float m[R], l[R];
  bool masked[R];
  for (int r = 0; r < R; ++r) {
    m[r] = hmax(mv[r]);
    // every score -inf (a fully masked row): no probability anywhere; its output is 0 and its log-sum-exp -inf,
    // as SDPA's (shifting by -inf would make each exponent NaN)
    masked[r] = m[r] == -INFINITY;
    const float shift = masked[r] ? 0.f : m[r];
    float* sr = S + r * Mp;
    vf acc = bc(0.f);
    for (int64_t j = 0; j < Mp; j += W) {
      const vf e = vexp(ld(sr + j) - bc(shift));
      st(sr + j, e);
      acc += e;
    }
    l[r] = hsum(acc);
  }
  vf o[R][D];
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d) o[r][d] = bc(0.f);
  rows_dot<D, R>(S, Mp, V, Mp, Mp, o);
  for (int r = 0; r < R; ++r) {
    const float inv = 1.f / l[r];
    for (int d = 0; d < D; ++d) O[r * rs + d] = masked[r] ? 0.f : hsum(o[r][d]) * inv;
    L[r] = masked[r] ? -INFINITY : m[r] + std::log(l[r]);
  }
}

// Backward for R query rows: dQ rows, and their contributions added to dK^T, dV^T (D x Mp). Per key tile: the rows'
// probabilities p and dS = p (dO.v - D_i) scale, then dV += p^T dO, dK += dS^T q, dQ += dS k. S, P: R x kTile scratch.
template <int D, int R>
static void bwd_block(const float* G, const float* Q, const float* K, const float* V, const float* O, const float* L,
                      float* DQ, float* DK, float* DV, int64_t Mp, vf tail, int64_t rs, float sc, float* S, float* P) {
  float qs[R][D], q[R][D], g[R][D], Di[R], lr[R];
  for (int r = 0; r < R; ++r) {
    Di[r] = 0.f;
    lr[r] = L[r] == -INFINITY ? INFINITY : L[r];  // a fully masked row: every p = exp(s - inf) = 0, no gradient
    for (int d = 0; d < D; ++d) {
      q[r][d] = Q[r * rs + d];
      qs[r][d] = q[r][d] * sc;
      g[r][d] = G[r * rs + d];
      Di[r] += g[r][d] * O[r * rs + d];
    }
  }
  vf dq[R][D];
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d) dq[r][d] = bc(0.f);
  const int64_t last = Mp - W;
  for (int64_t j0 = 0; j0 < Mp; j0 += kTile) {
    const int64_t n = std::min<int64_t>(kTile, Mp - j0);
    for (int64_t j = j0; j < j0 + n; j += W) {
      vf k[D], v[D];
      for (int d = 0; d < D; ++d) { k[d] = ld(K + d * Mp + j); v[d] = ld(V + d * Mp + j); }
      const vf mask = j == last ? tail : bc(0.f);
      for (int r = 0; r < R; ++r) {
        vf s = mask - bc(lr[r]), dp = bc(-Di[r]);
        for (int d = 0; d < D; ++d) { s += bc(qs[r][d]) * k[d]; dp += bc(g[r][d]) * v[d]; }
        const vf p = vexp(s);
        st(S + r * kTile + (j - j0), p);
        st(P + r * kTile + (j - j0), p * dp * bc(sc));
      }
    }
    outer_acc<D, R>(S, g, DV + j0, Mp, n);
    outer_acc<D, R>(P, q, DK + j0, Mp, n);
    rows_dot<D, R>(P, kTile, K + j0, Mp, n, dq);
  }
  for (int r = 0; r < R; ++r)
    for (int d = 0; d < D; ++d) DQ[r * rs + d] = hsum(dq[r][d]);
}

#define DISPATCH_D(D_, CALL) \
  switch (D_) { case 8: { constexpr int D = 8; CALL; break; } \
                default: TORCH_CHECK(false, "small-head attention: head dim ", D_, " is not 8"); }

static void check_inputs(const torch::Tensor& q, const torch::Tensor& kT, const torch::Tensor& vT, int64_t m) {
  for (const auto& t : {q, kT, vT})
    TORCH_CHECK(t.is_contiguous() && t.scalar_type() == torch::kFloat && t.device().is_cpu(),
                "small-head attention: expects contiguous float32 CPU tensors");
  TORCH_CHECK(q.dim() == 4 && kT.dim() == 3 && kT.size(0) == q.size(0) * q.size(2) && kT.size(1) == q.size(3) &&
              vT.sizes() == kT.sizes(), "small-head attention: expects q (B, N, H, D), kT and vT (B*H, D, Mp)");
  TORCH_CHECK(m >= 1 && kT.size(2) % W == 0 && kT.size(2) - m >= 0 && kT.size(2) - m < W,
              "small-head attention: the key count ", m, " padded to a multiple of ", W, " is not ", kT.size(2));
}

// Vector width the kernel was built for: keys are padded to a multiple of it.
int64_t width() { return W; }

// q (B, N, H, D) (the layout of a Linear's output split into heads), kT and vT (B*H, D, Mp) with the m real keys
// first and zeros after, float32, contiguous -> out (B, N, H, D), log-sum-exp (B*H, N).
std::vector<torch::Tensor> fwd(torch::Tensor q, torch::Tensor kT, torch::Tensor vT, double scale, int64_t m) {
  check_inputs(q, kT, vT, m);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), Dh = q.size(3), Mp = kT.size(2), rs = H * Dh;
  auto o = torch::empty_like(q);
  auto lse = torch::empty({B * H, N}, q.options());
  const float *Q = q.data_ptr<float>(), *K = kT.data_ptr<float>(), *V = vT.data_ptr<float>();
  float *O = o.data_ptr<float>(), *L = lse.data_ptr<float>();
  const vf tail = tail_mask(m, Mp);
  const float sc = (float)scale;
  at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(kFwdRows * Mp);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t row0 = (bh / H) * N * rs + (bh % H) * Dh;
      DISPATCH_D(Dh, ({
        const float *Kb = K + bh * D * Mp, *Vb = V + bh * D * Mp;
        int64_t i = 0;
        for (; i + kFwdRows <= N; i += kFwdRows)
          fwd_block<D, kFwdRows>(Q + row0 + i * rs, Kb, Vb, O + row0 + i * rs, L + bh * N + i, Mp, tail, rs, sc,
                                 s.data());
        for (; i < N; ++i)
          fwd_block<D, 1>(Q + row0 + i * rs, Kb, Vb, O + row0 + i * rs, L + bh * N + i, Mp, tail, rs, sc, s.data());
      }));
    }
  });
  return {o, lse};
}

// Gradients dq (B, N, H, D), dkT and dvT (B*H, D, Mp) from dout (B, N, H, D) and the forward's tensors.
std::vector<torch::Tensor> bwd(torch::Tensor go, torch::Tensor q, torch::Tensor kT, torch::Tensor vT,
                               torch::Tensor o, torch::Tensor lse, double scale, int64_t m) {
  check_inputs(q, kT, vT, m);
  TORCH_CHECK(go.is_contiguous() && go.sizes() == q.sizes() && o.sizes() == q.sizes(),
              "small-head attention: dout must be contiguous (B, N, H, D)");
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), Dh = q.size(3), Mp = kT.size(2), rs = H * Dh;
  auto dq = torch::empty_like(q);
  auto dkT = torch::zeros_like(kT);
  auto dvT = torch::zeros_like(vT);
  const float *G = go.data_ptr<float>(), *Q = q.data_ptr<float>(), *K = kT.data_ptr<float>(), *V = vT.data_ptr<float>();
  const float *O = o.data_ptr<float>(), *L = lse.data_ptr<float>();
  float *DQ = dq.data_ptr<float>(), *DK = dkT.data_ptr<float>(), *DV = dvT.data_ptr<float>();
  const vf tail = tail_mask(m, Mp);
  const float sc = (float)scale;
  at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(kBwdRows * kTile), p(kBwdRows * kTile);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t row0 = (bh / H) * N * rs + (bh % H) * Dh;
      DISPATCH_D(Dh, ({
        const float *Kb = K + bh * D * Mp, *Vb = V + bh * D * Mp;
        float *DKb = DK + bh * D * Mp, *DVb = DV + bh * D * Mp;
        int64_t i = 0;
        for (; i + kBwdRows <= N; i += kBwdRows) {
          const int64_t off = row0 + i * rs;
          bwd_block<D, kBwdRows>(G + off, Q + off, Kb, Vb, O + off, L + bh * N + i, DQ + off, DKb, DVb, Mp, tail, rs,
                                 sc, s.data(), p.data());
        }
        for (; i < N; ++i) {
          const int64_t off = row0 + i * rs;
          bwd_block<D, 1>(G + off, Q + off, Kb, Vb, O + off, L + bh * N + i, DQ + off, DKb, DVb, Mp, tail, rs, sc,
                          s.data(), p.data());
        }
      }));
    }
  });
  return {dq, dkT, dvT};
}
