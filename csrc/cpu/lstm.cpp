// The LSTM cell after its two linears (the seed LSTM text generator, aigc_rt/models/lstm.py), fp32:
//
//   gates (N, 4H) = x W_ih^T + h W_hh^T + b, in torch's order (input i, forget f, cell g, output o)
//   c' = sigmoid(f) * c + sigmoid(i) * tanh(g)          h' = sigmoid(o) * tanh(c')
//
// One pass over each row, SIMD (exp by vec.h's polynomial, ~1 ulp; tanh and sigmoid from it, absolute error
// ~1e-7), OpenMP over rows. c_out may be c itself (the decode step updates its state in place); h_out must not
// overlap the inputs. Body: lstm_kernels.h (one copy per ISA, see vec.h).
// Reference: TorchBackend.lstm_cell (torch.sigmoid / torch.tanh). Tests: tests/test_lstm.py.
#include <algorithm>

#include "common.h"
#include "cpu/ops.h"
#include "cpu/vec.h"

namespace aigc_rt::cpu {
struct LstmKernels {
  void (*cell_row)(const float* gates, const float* c, float* h_out, float* c_out, int64_t H);
};
}  // namespace aigc_rt::cpu

AIGC_BEGIN_AVX512
namespace aigc_rt::cpu::avx512 {
#include "cpu/lstm_kernels.h"
}
AIGC_END_TARGET

AIGC_BEGIN_AVX2
namespace aigc_rt::cpu::avx2 {
#include "cpu/lstm_kernels.h"
}
AIGC_END_TARGET

namespace aigc_rt::cpu::scalar {
#include "cpu/lstm_kernels.h"
}

namespace aigc_rt::cpu {

void lstm_cell(const torch::Tensor& gates, const torch::Tensor& c, const torch::Tensor& h_out,
               const torch::Tensor& c_out) {
  AIGC_CHECK_CPU_CONTIGUOUS(gates, torch::kFloat32);
  AIGC_CHECK_CPU_CONTIGUOUS(c, torch::kFloat32);
  AIGC_CHECK_CPU_CONTIGUOUS(h_out, torch::kFloat32);
  AIGC_CHECK_CPU_CONTIGUOUS(c_out, torch::kFloat32);
  AIGC_CHECK(c.dim() == 2, "lstm_cell: c must be (N, H), got shape ", c.sizes());
  const int64_t N = c.size(0), H = c.size(1);
  AIGC_CHECK(gates.dim() == 2 && gates.size(0) == N && gates.size(1) == 4 * H, "lstm_cell: gates has shape ",
             gates.sizes(), ", expected (", N, ", ", 4 * H, ")");
  AIGC_CHECK(h_out.sizes() == c.sizes() && c_out.sizes() == c.sizes(), "lstm_cell: h_out ", h_out.sizes(),
             " and c_out ", c_out.sizes(), " must have c's shape ", c.sizes());
  AIGC_CHECK(!overlap(h_out, gates) && !overlap(h_out, c) && !overlap(h_out, c_out) && !overlap(c_out, gates),
             "lstm_cell: h_out must not overlap gates, c or c_out, nor c_out gates (c_out may be c)");
  AIGC_CHECK(c_out.data_ptr() == c.data_ptr() || !overlap(c_out, c), "lstm_cell: c_out must be c or apart from it");
  const auto& k = for_active_isa(scalar::lstm_kernels, avx2::lstm_kernels, avx512::lstm_kernels);
  const float *pg = gates.data_ptr<float>(), *pc = c.data_ptr<float>();
  float *ph = h_out.data_ptr<float>(), *pco = c_out.data_ptr<float>();
#pragma omp parallel for schedule(static) if (N > 1 && N * H >= 4096)
  for (int64_t r = 0; r < N; ++r) k.cell_row(pg + r * 4 * H, pc + r * H, ph + r * H, pco + r * H, H);
}

}  // namespace aigc_rt::cpu
