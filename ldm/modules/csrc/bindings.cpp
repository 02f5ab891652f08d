// Python bindings of the framework's CPU kernels (one extension module).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("width", &width, "vector width in floats (keys are padded to a multiple of it)");
  m.def("fwd", &fwd, "small-head attention forward");
  m.def("bwd", &bwd, "small-head attention backward");
  m.def("geglu_fwd", &geglu_fwd, "GEGLU forward: a * GELU(g) for h = [a, g] along the last dim");
  m.def("geglu_bwd", &geglu_bwd, "GEGLU backward: the gradient with respect to h");
  m.def("group_norm_silu_fwd", &group_norm_silu_fwd, "GroupNorm (then SiLU) forward: y, mean, rstd");
  m.def("group_norm_silu_bwd", &group_norm_silu_bwd, "GroupNorm (then SiLU) backward: dx, dweight, dbias");
}
