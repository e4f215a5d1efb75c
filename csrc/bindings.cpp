// The one pybind11 module, aigc_rt._C: host-side entry points of the C++ CPU kernels.
#include "common.h"
#include "cpu/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aigc_rt C++ CPU kernels";
  m.def("layernorm", &aigc_rt::cpu::layernorm, "LayerNorm over the last dim (fp32)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"));
  m.def("add_layernorm", &aigc_rt::cpu::add_layernorm,
        "residual += x (in place); returns LayerNorm(residual) (fp32)", pybind11::arg("x"),
        pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"));
}
