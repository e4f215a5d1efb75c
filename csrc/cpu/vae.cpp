// The VAE's elementwise steps around its linears (aigc_rt/models/vae.py), fp32, one pass each instead of a dozen
// torch ops (at batch 1 those cost ~4x the four linears):
//
//   reparameterize: z[s, n] = mu[n] + eps[s, n] * exp(logvar[n] / 2)            head (N, 2L) = (mu, logvar)
//   bernoulli_log_likelihood: ll[s, n] = sum_d x[n, d] l[s, n, d] - softplus(l[s, n, d])
//   bernoulli_elbo: elbo[n] = 1/S sum_s ll[s, n]
//                             - 1/2 sum_j (mu[n, j]^2 + exp(logvar[n, j]) - logvar[n, j] - 1)
//
// the Bernoulli log-likelihood of the images x (N, D) in [0, 1] under the decoder's logits l (S, N, D), averaged over
// the S draws of eps, minus the closed-form KL(N(mu, exp(logvar)) || N(0, I)). SIMD (exp by vec.h's polynomial,
// ~1 ulp; log1p by a series, vae_kernels.h), OpenMP over rows; the KL term in double (L values per row).
// Reference: TorchBackend.reparameterize / bernoulli_log_likelihood / bernoulli_elbo. Tests: tests/test_vae.py.
#include <algorithm>
#include <cmath>

#include "common.h"
#include "cpu/ops.h"
#include "cpu/vec.h"

namespace aigc_rt::cpu {
struct VaeKernels {
  float (*log_likelihood_row)(const float* logits, const float* x, int64_t D);
  void (*reparameterize_row)(const float* mu, const float* logvar, const float* eps, float* z, int64_t L);
};
}  // namespace aigc_rt::cpu

AIGC_BEGIN_AVX512
namespace aigc_rt::cpu::avx512 {
#include "cpu/vae_kernels.h"
}
AIGC_END_TARGET

AIGC_BEGIN_AVX2
namespace aigc_rt::cpu::avx2 {
#include "cpu/vae_kernels.h"
}
AIGC_END_TARGET

namespace aigc_rt::cpu::scalar {
#include "cpu/vae_kernels.h"
}

namespace aigc_rt::cpu {
namespace {

const VaeKernels& kernels() { return for_active_isa(scalar::vae_kernels, avx2::vae_kernels, avx512::vae_kernels); }

// head (N, 2L) and eps (S, N, L) or logits (S, N, D): checked, -> (S, N, L)
void check_head(const torch::Tensor& head, const char* op) {
  AIGC_CHECK_CPU_CONTIGUOUS(head, torch::kFloat32);
  AIGC_CHECK(head.dim() == 2 && head.size(1) % 2 == 0 && head.size(1) > 0, op,
             ": head must be (N, 2L) = (mu, logvar), got shape ", head.sizes());
}

}  // namespace

torch::Tensor vae_reparameterize(const torch::Tensor& head, const torch::Tensor& eps) {
  check_head(head, "vae_reparameterize");
  AIGC_CHECK_CPU_CONTIGUOUS(eps, torch::kFloat32);
  const int64_t N = head.size(0), L = head.size(1) / 2;
  AIGC_CHECK(eps.dim() == 3 && eps.size(1) == N && eps.size(2) == L, "vae_reparameterize: eps has shape ",
             eps.sizes(), ", expected (S, ", N, ", ", L, ")");
  const int64_t S = eps.size(0);
  auto z = torch::empty({S, N, L}, head.options());
  const auto& k = kernels();
  const float *h = head.data_ptr<float>(), *e = eps.data_ptr<float>();
  float* pz = z.data_ptr<float>();
#pragma omp parallel for schedule(static) if (S * N * L >= (1 << 15))
  for (int64_t r = 0; r < S * N; ++r) {
    const float* row = h + (r % N) * 2 * L;
    k.reparameterize_row(row, row + L, e + r * L, pz + r * L, L);
  }
  return z;
}

torch::Tensor vae_bernoulli_log_likelihood(const torch::Tensor& logits, const torch::Tensor& x) {
  AIGC_CHECK_CPU_CONTIGUOUS(logits, torch::kFloat32);
  AIGC_CHECK_CPU_CONTIGUOUS(x, torch::kFloat32);
  AIGC_CHECK(x.dim() == 2 && x.size(1) > 0, "vae_bernoulli_log_likelihood: x must be (N, D), got shape ", x.sizes());
  const int64_t N = x.size(0), D = x.size(1);
  AIGC_CHECK(logits.dim() == 3 && logits.size(0) > 0 && logits.size(1) == N && logits.size(2) == D,
             "vae_bernoulli_log_likelihood: logits have shape ", logits.sizes(), ", expected (S, ", N, ", ", D, ")");
  const int64_t S = logits.size(0);
  auto ll = torch::empty({S, N}, x.options());
  const auto& k = kernels();
  const float *pl = logits.data_ptr<float>(), *px = x.data_ptr<float>();
  float* out = ll.data_ptr<float>();
#pragma omp parallel for schedule(static) if (S * N * D >= (1 << 15))
  for (int64_t r = 0; r < S * N; ++r) out[r] = k.log_likelihood_row(pl + r * D, px + (r % N) * D, D);
  return ll;
}

torch::Tensor vae_bernoulli_elbo(const torch::Tensor& logits, const torch::Tensor& x, const torch::Tensor& head) {
  check_head(head, "vae_bernoulli_elbo");
  const int64_t N = head.size(0), L = head.size(1) / 2;
  AIGC_CHECK(x.dim() == 2 && x.size(0) == N, "vae_bernoulli_elbo: x has shape ", x.sizes(), ", expected (", N,
             ", D)");
  const auto ll = vae_bernoulli_log_likelihood(logits, x);  // (S, N)
  const int64_t S = ll.size(0);
  const float *pll = ll.data_ptr<float>(), *h = head.data_ptr<float>();
  auto elbo = torch::empty({N}, head.options());
  float* out = elbo.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    double kl = 0.0, mean_ll = 0.0;
    for (int64_t j = 0; j < L; ++j) {
      const double mu = h[n * 2 * L + j], logvar = h[n * 2 * L + L + j];
      kl += mu * mu + std::exp(logvar) - logvar - 1.0;
    }
    for (int64_t s = 0; s < S; ++s) mean_ll += pll[s * N + n];
    out[n] = static_cast<float>(mean_ll / S - 0.5 * kl);
  }
  return elbo;
}

}  // namespace aigc_rt::cpu
