// GroupNorm (Wu & He 2018), optionally followed by SiLU, on CPU, for (N, C, *spatial) float32 tensors stored either
// contiguous (a plane of S values per channel) or channels-last (a row of C values per position).
//
// Forward: one pass of per-channel sums (x, x^2) per sample, the group statistics from them, then one pass writing
// y = silu(x * A_c + B_c) with A_c = gamma_c rstd_g, B_c = beta_c - mean_g A_c. Backward: one pass of per-channel
// sums of dz and dz * x (dz = dy * silu'(z), z recomputed from x), the group terms, then one pass writing
// dx = P_c dz + Q_g (x - mean_g) + R_g (the GroupNorm backward). PyTorch runs GroupNorm and SiLU as separate
// ops, each reading and writing the activations, and keeps the GroupNorm output for SiLU's backward; here only x is
// kept. Per-channel sums go through float vectors over blocks of at most kBlock values, then double, of values
// shifted near their mean (x minus the channel's first value; x minus the group mean in the backward), so a mean far
// from zero costs no precision in the variance or in the weight's gradient.
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#include "kernels.h"
#include "vec.h"

namespace {
constexpr int64_t kBlock = 256;  // values summed in float before the running sum moves to double

// sigma(z) for a vector, from exp(-|z|) <= 1 (no overflow either way)
inline vf vsigmoid(vf z) {
  const vf e = vexp(z < bc(0.f) ? z : -z);
  const vf inv = bc(1.f) / (bc(1.f) + e);
  return z < bc(0.f) ? e * inv : inv;
}
inline float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

// dz = dy * silu'(z), silu'(z) = s (1 + z (1 - s)), s = sigma(z)
inline vf dsilu(vf dy, vf z) {
  const vf s = vsigmoid(z);
  return dy * s * (bc(1.f) + z * (bc(1.f) - s));
}
inline float dsilu(float dy, float z) {
  const float s = sigmoid(z);
  return dy * s * (1.f + z * (1.f - s));
}

struct Shape {
  int64_t N, C, S, G;
  bool cl;  // channels-last: element (n, c, s) at (n * S + s) * C + c; else (n * C + c) * S + s
};

Shape shape_of(const torch::Tensor& x, int64_t groups, bool channels_last) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.device().is_cpu() && x.dim() >= 2,
              "group_norm_silu: x must be a float32 CPU tensor (N, C, *spatial)");
  const int64_t N = x.size(0), C = x.size(1), S = N * C ? x.numel() / (N * C) : 0;
  TORCH_CHECK(groups > 0 && C % groups == 0, "group_norm_silu: ", C, " channels do not split into ", groups, " groups");
  if (channels_last) {
    TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
                "group_norm_silu: channels_last needs a 4-d channels-last tensor");
  } else {
    TORCH_CHECK(x.is_contiguous(), "group_norm_silu: x must be contiguous");
  }
  return {N, C, S, groups, channels_last};
}

// out[n][c] += sum over s of f(x, y) for f = (x, y) -> pair of vectors; two outputs per channel: out1, out2 (N x C).
// term(xv, yv, c0, n, o1, o2): the two per-element terms for the W channels (channels-last) or W positions of
// channel c0 (contiguous).
template <typename VTerm, typename STerm>
void channel_sums(const Shape& sh, const float* x, const float* y, double* out1, double* out2, VTerm vterm,
                  STerm sterm) {
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (!sh.cl) {
    at::parallel_for(0, N * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / C, c = p % C;
        const float* xp = x + p * S;
        const float* yp = y ? y + p * S : nullptr;
        double d1 = 0, d2 = 0;
        for (int64_t b = 0; b < S; b += kBlock) {
          const int64_t e = std::min(S, b + kBlock);
          vf a1 = bc(0.f), a2 = bc(0.f);
          int64_t s = b;
          for (; s + W <= e; s += W) {
            vf t1, t2;
            vterm(ld(xp + s), yp ? ld(yp + s) : bc(0.f), n, c, /*lane_channels=*/false, t1, t2);
            a1 += t1;
            a2 += t2;
          }
          float f1 = hsum(a1), f2 = hsum(a2);
          for (; s < e; ++s) {
            float t1, t2;
            sterm(xp[s], yp ? yp[s] : 0.f, n, c, t1, t2);
            f1 += t1;
            f2 += t2;
          }
          d1 += f1;
          d2 += f2;
        }
        out1[p] = d1;
        out2[p] = d2;
      }
    });
    return;
  }
  // channels-last: blocks of positions per sample, each with its own partial sums, reduced afterwards
  const int64_t nblk = (S + kBlock - 1) / kBlock;
  std::vector<double> part(static_cast<size_t>(N * nblk * 2 * C), 0.0);
  at::parallel_for(0, N * nblk, 1, [&](int64_t q0, int64_t q1) {
    std::vector<float> acc(static_cast<size_t>(2 * C));
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / nblk, b = (q % nblk) * kBlock, e = std::min(S, b + kBlock);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = b; s < e; ++s) {
        const float* xr = x + (n * S + s) * C;
        const float* yr = y ? y + (n * S + s) * C : nullptr;
        int64_t c = 0;
        for (; c + W <= C; c += W) {
          vf t1, t2;
          vterm(ld(xr + c), yr ? ld(yr + c) : bc(0.f), n, c, /*lane_channels=*/true, t1, t2);
          st(acc.data() + c, ld(acc.data() + c) + t1);
          st(acc.data() + C + c, ld(acc.data() + C + c) + t2);
        }
        for (; c < C; ++c) {
          float t1, t2;
          sterm(xr[c], yr ? yr[c] : 0.f, n, c, t1, t2);
          acc[c] += t1;
          acc[C + c] += t2;
        }
      }
      double* dst = part.data() + q * 2 * C;
      for (int64_t c = 0; c < 2 * C; ++c) dst[c] = acc[c];
    }
  });
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      double d1 = 0, d2 = 0;
      for (int64_t k = 0; k < nblk; ++k) {
        d1 += part[(n * nblk + k) * 2 * C + c];
        d2 += part[(n * nblk + k) * 2 * C + C + c];
      }
      out1[n * C + c] = d1;
      out2[n * C + c] = d2;
    }
}

// For every element: out = f(x, y, n, c) with per-(n, c) coefficients, written in x's layout.
template <typename VMap, typename SMap>
void map_elements(const Shape& sh, const float* x, const float* y, float* out, VMap vmap, SMap smap) {
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (!sh.cl) {
    at::parallel_for(0, N * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / C, c = p % C;
        const float* xp = x + p * S;
        const float* yp = y ? y + p * S : nullptr;
        float* op = out + p * S;
        int64_t s = 0;
        for (; s + W <= S; s += W) st(op + s, vmap(ld(xp + s), yp ? ld(yp + s) : bc(0.f), n, c, false));
        for (; s < S; ++s) op[s] = smap(xp[s], yp ? yp[s] : 0.f, n, c);
      }
    });
    return;
  }
  at::parallel_for(0, N * S, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / S;
      const float* xr = x + r * C;
      const float* yr = y ? y + r * C : nullptr;
      float* orow = out + r * C;
      int64_t c = 0;
      for (; c + W <= C; c += W) st(orow + c, vmap(ld(xr + c), yr ? ld(yr + c) : bc(0.f), n, c, true));
      for (; c < C; ++c) orow[c] = smap(xr[c], yr ? yr[c] : 0.f, n, c);
    }
  });
}

// the W per-channel coefficients at (n, c): a vector over channels c..c+W-1 (channels-last) or a broadcast of c's
inline vf coef(const std::vector<float>& v, int64_t C, int64_t n, int64_t c, bool lane_channels) {
  return lane_channels ? ld(v.data() + n * C + c) : bc(v[n * C + c]);
}
}  // namespace

std::vector<torch::Tensor> group_norm_silu_fwd(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                                               int64_t groups, double eps, bool silu, bool channels_last) {
  const Shape sh = shape_of(x, groups, channels_last);
  const int64_t N = sh.N, C = sh.C, G = sh.G, Cg = C / G;
  TORCH_CHECK(weight.numel() == C && bias.numel() == C && weight.is_contiguous() && bias.is_contiguous() &&
              weight.scalar_type() == torch::kFloat && bias.scalar_type() == torch::kFloat,
              "group_norm_silu: weight and bias must be contiguous float32 tensors of ", C, " values");
  // sums of d = x - K_c and d^2 per (n, c), K_c the channel's first value in sample n
  const float* xp = x.data_ptr<float>();
  std::vector<float> K(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) K[n * C + c] = sh.S ? xp[sh.cl ? n * sh.S * C + c : (n * C + c) * sh.S] : 0.f;
  std::vector<double> s1(N * C), s2(N * C);
  channel_sums(
      sh, xp, nullptr, s1.data(), s2.data(),
      [&](vf xv, vf, int64_t n, int64_t c, bool lanes, vf& t1, vf& t2) {
        t1 = xv - coef(K, C, n, c, lanes);
        t2 = t1 * t1;
      },
      [&](float xv, float, int64_t n, int64_t c, float& t1, float& t2) {
        t1 = xv - K[n * C + c];
        t2 = t1 * t1;
      });
  auto mean = torch::empty({N, G}, x.options()), rstd = torch::empty({N, G}, x.options());
  float* mp = mean.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  const float* gp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const double m = static_cast<double>(Cg) * sh.S;
  std::vector<float> A(N * C), B(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double a = 0, b = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {  // back to sums of x and x^2, in double
        const double k = K[n * C + c];
        a += s1[n * C + c] + sh.S * k;
        b += s2[n * C + c] + 2 * k * s1[n * C + c] + sh.S * k * k;
      }
      const double mu = a / m, var = std::max(b / m - mu * mu, 0.0), r = 1.0 / std::sqrt(var + eps);
      mp[n * G + g] = static_cast<float>(mu);
      rp[n * G + g] = static_cast<float>(r);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        A[n * C + c] = static_cast<float>(r * gp[c]);
        B[n * C + c] = static_cast<float>(bp[c] - mu * r * gp[c]);
      }
    }
  auto y = torch::empty_like(x);
  map_elements(
      sh, x.data_ptr<float>(), nullptr, y.data_ptr<float>(),
      [&](vf xv, vf, int64_t n, int64_t c, bool lanes) {
        const vf z = xv * coef(A, C, n, c, lanes) + coef(B, C, n, c, lanes);
        return silu ? z * vsigmoid(z) : z;
      },
      [&](float xv, float, int64_t n, int64_t c) {
        const float z = xv * A[n * C + c] + B[n * C + c];
        return silu ? z * sigmoid(z) : z;
      });
  return {y, mean, rstd};
}

std::vector<torch::Tensor> group_norm_silu_bwd(torch::Tensor dy, torch::Tensor x, torch::Tensor weight,
                                               torch::Tensor bias, torch::Tensor mean, torch::Tensor rstd,
                                               int64_t groups, bool silu, bool channels_last) {
  const Shape sh = shape_of(x, groups, channels_last);
  const Shape dsh = shape_of(dy, groups, channels_last);
  TORCH_CHECK(dy.sizes() == x.sizes(), "group_norm_silu: the gradient's shape differs from x's");
  (void)dsh;
  const int64_t N = sh.N, C = sh.C, G = sh.G, Cg = C / G;
  const float* gp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* mp = mean.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  std::vector<float> A(N * C), B(N * C), Mu(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = c / Cg;
      A[n * C + c] = rp[n * G + g] * gp[c];
      B[n * C + c] = bp[c] - mp[n * G + g] * A[n * C + c];
      Mu[n * C + c] = mp[n * G + g];
    }
  // pass 1: per-channel sums of dz and dz * (x - mean)
  std::vector<double> sdz(N * C), sdzx(N * C);
  channel_sums(
      sh, x.data_ptr<float>(), dy.data_ptr<float>(), sdz.data(), sdzx.data(),
      [&](vf xv, vf gv, int64_t n, int64_t c, bool lanes, vf& t1, vf& t2) {
        const vf dz = silu ? dsilu(gv, xv * coef(A, C, n, c, lanes) + coef(B, C, n, c, lanes)) : gv;
        t1 = dz;
        t2 = dz * (xv - coef(Mu, C, n, c, lanes));
      },
      [&](float xv, float gv, int64_t n, int64_t c, float& t1, float& t2) {
        const float dz = silu ? dsilu(gv, xv * A[n * C + c] + B[n * C + c]) : gv;
        t1 = dz;
        t2 = dz * (xv - Mu[n * C + c]);
      });
  auto dweight = torch::zeros({C}, weight.options()), dbias = torch::zeros({C}, bias.options());
  float* dwp = dweight.data_ptr<float>();
  float* dbp = dbias.data_ptr<float>();
  std::vector<double> dw(C, 0.0), db(C, 0.0);
  std::vector<float> P(N * C), Q(N * C), R(N * C);
  const double m = static_cast<double>(Cg) * sh.S;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const double mu = mp[n * G + g], r = rp[n * G + g];
      double dsc = 0, dbg = 0;  // sums over the group of gamma * sum(dz (x - mean)) and gamma * sum(dz)
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        dsc += gp[c] * sdzx[n * C + c];
        dbg += gp[c] * sdz[n * C + c];
        dw[c] += r * sdzx[n * C + c];
        db[c] += sdz[n * C + c];
      }
      const double q = -dsc * r * r * r / m, rr = -dbg * r / m;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        P[n * C + c] = static_cast<float>(gp[c] * r);
        Q[n * C + c] = static_cast<float>(q);
        R[n * C + c] = static_cast<float>(rr);
      }
    }
  for (int64_t c = 0; c < C; ++c) {
    dwp[c] = static_cast<float>(dw[c]);
    dbp[c] = static_cast<float>(db[c]);
  }
  // pass 2: dx = P dz + Q (x - mean) + R
  auto dx = torch::empty_like(x);
  map_elements(
      sh, x.data_ptr<float>(), dy.data_ptr<float>(), dx.data_ptr<float>(),
      [&](vf xv, vf gv, int64_t n, int64_t c, bool lanes) {
        const vf dz = silu ? dsilu(gv, xv * coef(A, C, n, c, lanes) + coef(B, C, n, c, lanes)) : gv;
        return dz * coef(P, C, n, c, lanes) + (xv - coef(Mu, C, n, c, lanes)) * coef(Q, C, n, c, lanes) +
               coef(R, C, n, c, lanes);
      },
      [&](float xv, float gv, int64_t n, int64_t c) {
        const float dz = silu ? dsilu(gv, xv * A[n * C + c] + B[n * C + c]) : gv;
        return dz * P[n * C + c] + (xv - Mu[n * C + c]) * Q[n * C + c] + R[n * C + c];
      });
  return {dx, dweight, dbias};
}
