// The framework's CPU kernels, bound to Python in bindings.cpp (built by ldm/modules/cpu_kernels.py).
#pragma once
#include <torch/extension.h>
#include <vector>

// small_head_attention.cpp
int64_t width();
std::vector<torch::Tensor> fwd(torch::Tensor q, torch::Tensor kT, torch::Tensor vT, double scale, int64_t m);
std::vector<torch::Tensor> bwd(torch::Tensor go, torch::Tensor q, torch::Tensor kT, torch::Tensor vT,
                               torch::Tensor o, torch::Tensor lse, double scale, int64_t m);

// geglu.cpp
torch::Tensor geglu_fwd(torch::Tensor h);
torch::Tensor geglu_bwd(torch::Tensor grad, torch::Tensor h);

// group_norm_silu.cpp
std::vector<torch::Tensor> group_norm_silu_fwd(torch::Tensor x, torch::Tensor weight, torch::Tensor bias,
                                               int64_t groups, double eps, bool silu, bool channels_last);
std::vector<torch::Tensor> group_norm_silu_bwd(torch::Tensor dy, torch::Tensor x, torch::Tensor weight,
                                               torch::Tensor bias, torch::Tensor mean, torch::Tensor rstd,
                                               int64_t groups, bool silu, bool channels_last);
