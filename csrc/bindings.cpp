// The one pybind11 module, aigc_rt._C: host-side entry points of the C++ CPU kernels.
#include "common.h"
#include "cpu/ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aigc_rt C++ CPU kernels";
  // Our argument checks (AIGC_CHECK) throw pybind11::value_error: translated here, by this module, before pybind11
  // tries the translators other modules registered globally in the internals this module shares with torch._C.
  // On the GPU box of 2026-11-30 (this module built with the box's g++ against torch 2.11) every such ValueError
  // killed the process with SIGSEGV; if the crash was in a global translator, this avoids it (unverified there:
  // tools/gpu_session.sh's build step checks).
  pybind11::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pybind11::builtin_exception& e) {
      e.set_error();
    }
  });
  m.def("layernorm", &aigc_rt::cpu::layernorm, "LayerNorm over the last dim (fp32)", pybind11::arg("x"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"), pybind11::arg("out") = pybind11::none());
  m.def("write_kv", &aigc_rt::cpu::write_kv,
        "k_cache[b, :, positions[b]] = k[b] and the same for v: caches (B, H, S, D) fp32 or bf16, k, v (B, H, D) fp32",
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("positions"), pybind11::arg("k"),
        pybind11::arg("v"));
  // linear.cpp, embedding.cpp
  pybind11::class_<aigc_rt::cpu::PackedLinear>(m, "PackedLinear",
                                                "a linear layer's weight (out, in) repacked for the kernels")
      .def(pybind11::init<const torch::Tensor&, const c10::optional<torch::Tensor>&,
                          const c10::optional<torch::Tensor>&>(),
           pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none(), pybind11::arg("scale") = pybind11::none())
      .def_readonly("weight", &aigc_rt::cpu::PackedLinear::weight)
      .def_readonly("bias", &aigc_rt::cpu::PackedLinear::bias)
      .def_readonly("scale", &aigc_rt::cpu::PackedLinear::scale)
      .def_readonly("in_features", &aigc_rt::cpu::PackedLinear::in_features)
      .def_readonly("out_features", &aigc_rt::cpu::PackedLinear::out_features)
      .def_property_readonly("dtype", &aigc_rt::cpu::PackedLinear::dtype);
  m.def("linear", &aigc_rt::cpu::linear,
        "y = act(x @ W^T * scale + bias), act 0 identity, 1 GELU(tanh), 2 ReLU; with a residual, also residual += y; "
        "returns y",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("act") = 0,
        pybind11::arg("out") = pybind11::none(), pybind11::arg("residual") = pybind11::none());
  m.def("linear_isa", &aigc_rt::cpu::linear_isa, "the ISA linear uses for a weight dtype (fp32, fp16, bf16, int8, int4)",
        pybind11::arg("weight_dtype"));
  m.def("set_linear_isa", &aigc_rt::cpu::set_linear_isa,
        "cap the ISA linear may use: auto, amx, avx512, avx512f (AVX-512 without bf16 / VNNI), avx2 or scalar (for tests)", pybind11::arg("cap"));
  m.def("embedding", &aigc_rt::cpu::embedding,
        "rows table[ids] as fp32 (int8 tables times their row scale), plus pos_table[positions] when given",
        pybind11::arg("table"), pybind11::arg("ids"), pybind11::arg("scale") = pybind11::none(),
        pybind11::arg("out") = pybind11::none(), pybind11::arg("pos_table") = pybind11::none(),
        pybind11::arg("positions") = pybind11::none());
  m.def("lstm_cell", &aigc_rt::cpu::lstm_cell,
        "the LSTM cell: gates (N, 4H) in torch's order i, f, g, o and c (N, H) -> h_out, c_out (c_out may be c)",
        pybind11::arg("gates"), pybind11::arg("c"), pybind11::arg("h_out"), pybind11::arg("c_out"));
  m.def("vae_reparameterize", &aigc_rt::cpu::vae_reparameterize,
        "z (S, N, L) = mu + eps * exp(logvar / 2) for head (N, 2L) = (mu, logvar) and eps (S, N, L)",
        pybind11::arg("head"), pybind11::arg("eps"));
  m.def("vae_bernoulli_elbo", &aigc_rt::cpu::vae_bernoulli_elbo,
        "each image's ELBO (N,): the Bernoulli log-likelihood of x (N, D) under logits (S, N, D), averaged over S, "
        "minus KL(q || N(0, I)) from head (N, 2L)",
        pybind11::arg("logits"), pybind11::arg("x"), pybind11::arg("head"));
  m.def("vae_bernoulli_log_likelihood", &aigc_rt::cpu::vae_bernoulli_log_likelihood,
        "log p(x | z) (S, N): the Bernoulli log-likelihood of x (N, D) under each sample's logits (S, N, D)",
        pybind11::arg("logits"), pybind11::arg("x"));

  // step_program.cpp: each method records one op (its arguments as the op's, outputs given); run replays them
  using aigc_rt::cpu::StepProgram;
  pybind11::class_<StepProgram>(m, "StepProgram", "a recorded decode step, replayed by run(max_len)")
      .def(pybind11::init<>())
      .def("embedding", &StepProgram::embedding, pybind11::arg("table"), pybind11::arg("ids"), pybind11::arg("scale"),
           pybind11::arg("out"), pybind11::arg("pos_table"), pybind11::arg("positions"))
      .def("layernorm", &StepProgram::layernorm, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
           pybind11::arg("eps"), pybind11::arg("out"))
      .def("linear", &StepProgram::linear, pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("act"),
           pybind11::arg("out"), pybind11::arg("residual"))
      .def("write_kv", &StepProgram::write_kv, pybind11::arg("k_cache"), pybind11::arg("v_cache"),
           pybind11::arg("positions"), pybind11::arg("k"), pybind11::arg("v"))
      .def("attention_decode", &StepProgram::attention_decode, pybind11::arg("q"), pybind11::arg("k_cache"),
           pybind11::arg("v_cache"), pybind11::arg("lengths"), pybind11::arg("out"))
      .def("lstm_cell", &StepProgram::lstm_cell, pybind11::arg("gates"), pybind11::arg("c"), pybind11::arg("h_out"),
           pybind11::arg("c_out"))
      .def("run", &StepProgram::run, "replay every recorded op (without the GIL)", pybind11::arg("max_len"),
           pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("__len__", &StepProgram::size);

  // cpu-attn: attention, sampling, ISA selection
  using pybind11::arg;
  m.def("attention_decode", &aigc_rt::cpu::attention_decode,
        "One query per sequence over its first lengths[b] cached positions: q (B,H,D), caches (B,H,S,D) -> (B,H,D)",
        arg("q"), arg("k_cache"), arg("v_cache"), arg("lengths"), arg("max_len"), pybind11::kw_only(),
        arg("out") = pybind11::none(), arg("splits") = 0);
  m.def("attention_prefill", &aigc_rt::cpu::attention_prefill,
        "Causal attention: q, k, v (B,H,T,D), any strides with a contiguous last dim -> (B,H,T,D)", arg("q"),
        arg("k"), arg("v"), pybind11::kw_only(), arg("out") = pybind11::none());
  m.def("sample", &aigc_rt::cpu::sample,
        "Token ids (B,) int64 from logits (B, V) fp32 and uniforms u (B,), as aigc_rt.sampling.sample_reference; "
        "-1 for rows with NaN/inf logits",
        arg("logits"), arg("do_sample"), arg("temperature"), arg("top_k"), arg("top_p"), arg("repetition_penalty"),
        arg("u"), arg("seen"), pybind11::kw_only(), arg("out") = pybind11::none());
  m.def("simd_isa", &aigc_rt::cpu::simd_isa, "The instruction set the kernels use: avx512, avx2 or scalar");
  m.def("set_simd_isa", &aigc_rt::cpu::set_simd_isa,
        "Make the kernels use this instruction set (one the CPU supports); returns the previous one", arg("name"));

  // conv.cpp (gan)
  using aigc_rt::cpu::ConvWeights;
  pybind11::class_<ConvWeights>(m, "ConvWeights", "a Conv2d's or ConvTranspose2d's weights, repacked")
      .def_readonly("cin", &ConvWeights::cin)
      .def_readonly("cout", &ConvWeights::cout)
      .def_readonly("kernel", &ConvWeights::kernel)
      .def_readonly("stride", &ConvWeights::stride)
      .def_readonly("padding", &ConvWeights::padding)
      .def_readonly("output_padding", &ConvWeights::output_padding)
      .def_readonly("transposed", &ConvWeights::transposed)
      .def_readonly("col2im", &ConvWeights::col2im)
      .def_readonly("im2col", &ConvWeights::im2col)
      .def_readonly("bf16", &ConvWeights::bf16)
      .def_readonly("isa", &ConvWeights::isa);
  m.def("conv2d_prepare", &aigc_rt::cpu::conv2d_prepare,
        "repack Conv2d weights (C_out, C_in, k, k) fp32 or bf16 + bias (C_out,) fp32 for conv2d", pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("isa") = "auto");
  m.def("conv_transpose_prepare", &aigc_rt::cpu::conv_transpose_prepare,
        "repack ConvTranspose2d weights (C_in, C_out, k, k) fp32 or bf16 + bias (C_out,) fp32 for "
        "conv_transpose",
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("output_padding") = 0, pybind11::arg("isa") = "auto");
  // act: none, relu, tanh, leaky_relu (negative slope `slope`, torch's default 0.01) or sigmoid; out_bf16: the
  // output rounded to bf16 (a bfloat16 tensor) instead of fp32
  m.def("conv2d", &aigc_rt::cpu::conv2d,
        "act(conv2d(x) + bias), fp32 sums; x (N, C_in, H, W) -> (N, C_out, H_out, W_out) channels_last",
        pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("act") = "none", pybind11::arg("slope") = 0.01,
        pybind11::arg("out_bf16") = false);
  m.def("conv_transpose", &aigc_rt::cpu::conv_transpose,
        "act(conv_transpose2d(x) + bias), fp32 sums; x (N, C_in, H, W) -> (N, C_out, H_out, W_out) channels_last "
        "(NCHW when C_out is below one vector: an image)",
        pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("act") = "none", pybind11::arg("slope") = 0.01,
        pybind11::arg("out_bf16") = false);
}
