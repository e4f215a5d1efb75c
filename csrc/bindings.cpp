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

  using aigc_rt::cpu::ConvTransposeWeights;
  pybind11::class_<ConvTransposeWeights>(m, "ConvTransposeWeights", "a ConvTranspose2d's weights, repacked")
      .def_readonly("cin", &ConvTransposeWeights::cin)
      .def_readonly("cout", &ConvTransposeWeights::cout)
      .def_readonly("kernel", &ConvTransposeWeights::kernel)
      .def_readonly("stride", &ConvTransposeWeights::stride)
      .def_readonly("padding", &ConvTransposeWeights::padding)
      .def_readonly("output_padding", &ConvTransposeWeights::output_padding)
      .def_readonly("col2im", &ConvTransposeWeights::col2im)
      .def_readonly("isa", &ConvTransposeWeights::isa);
  m.def("conv_transpose_prepare", &aigc_rt::cpu::conv_transpose_prepare,
        "repack ConvTranspose2d weights (C_in, C_out, k, k) fp32 + bias (C_out,) for conv_transpose",
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("output_padding") = 0, pybind11::arg("isa") = "auto");
  m.def("conv_transpose", &aigc_rt::cpu::conv_transpose,
        "act(conv_transpose2d(x) + bias), fp32; x (N, C_in, H, W) -> (N, C_out, H_out, W_out) channels_last "
        "(NCHW when C_out is below one vector: an image)",
        pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("act") = "none");
}
