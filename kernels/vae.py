"""A VAE's elementwise steps around its linears (aigc_rt/models/vae.py), one launch each:

    reparameterize: z[s, n, j] = mu[n, j] + eps[s, n, j] * exp(logvar[n, j] / 2)       head (N, 2L) = (mu, logvar)
    bernoulli_log_likelihood: ll[s, n] = sum_d x[n, d] l[s, n, d] - softplus(l[s, n, d])
    bernoulli_elbo: elbo[n] = 1/S sum_s ll[s, n] - 1/2 sum_j (mu[n, j]^2 + exp(logvar[n, j]) - logvar[n, j] - 1)

the Bernoulli log-likelihood of the images x (N, D) in [0, 1] under the decoder's logits l (S, N, D), averaged over
the S draws of eps, minus the closed-form KL(N(mu, exp(logvar)) || N(0, I)); softplus(l) = max(l, 0) +
log1p(e^-|l|) (no overflow), log1p by the series 2 atanh(u / (2 + u)) (tl has no log1p; log(1 + u) would drop a tiny
u), as csrc/cpu/vae.cpp. fp32 throughout. reparameterize: one program per (row of S * N, block of L);
bernoulli_log_likelihood: one program per row of S * N; bernoulli_elbo: one program per image, its S rows of D logits
in blocks of BLOCK_D, sums in fp32 lanes. On CPU tensors under TRITON_INTERPRET=1 for tests. Reference: TorchBackend's
ops of the same names. Test: tests/test_vae.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import INTERPRETER, check_tensor, device_fn

BLOCK_D = 1024  # logits per iteration of an image's program (MNIST's 784 in one)
BLOCK_L = 64  # latent values per program


@device_fn
def _log1p_unit(u):
    """log1p(u) for u in [0, 1]: 2 (s + s^3/3 + ... + s^19/19), s = u / (2 + u) <= 1/3 (relative error < 1e-9)."""
    s = u / (2.0 + u)
    s2 = s * s
    p = 1.0 / 19.0
    for i in tl.static_range(1, 10):  # the coefficients 1/17, 1/15, ..., 1/1
        p = p * s2 + 1.0 / (19 - 2 * i)
    return 2.0 * s * p


@triton.jit
def _reparameterize_kernel(h_ptr, e_ptr, z_ptr, N, L, BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # s * N + n
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    m = cols < L
    head = h_ptr + (row % N) * 2 * L + cols
    mu = tl.load(head, mask=m, other=0.0)
    logvar = tl.load(head + L, mask=m, other=0.0)
    eps = tl.load(e_ptr + row * L + cols, mask=m, other=0.0)
    tl.store(z_ptr + row * L + cols, mu + eps * tl.exp(0.5 * logvar), mask=m)


@device_fn
def _row_log_likelihood(l_row, x_row, D, BLOCK_D: tl.constexpr):
    """sum_d x_d l_d - softplus(l_d) over one row of D logits and its image."""
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = d < D
        lg = tl.load(l_row + d, mask=m, other=0.0)
        x = tl.load(x_row + d, mask=m, other=0.0)
        softplus = tl.maximum(lg, 0.0) + _log1p_unit(tl.exp(-tl.abs(lg)))
        acc += tl.where(m, x * lg - softplus, 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _bernoulli_log_likelihood_kernel(l_ptr, x_ptr, y_ptr, N, D, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # s * N + n
    tl.store(y_ptr + row, _row_log_likelihood(l_ptr + row * D, x_ptr + (row % N) * D, D, BLOCK_D))


@triton.jit
def _bernoulli_elbo_kernel(l_ptr, x_ptr, h_ptr, y_ptr, S, N, D, L, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ll = 0.0
    for s in range(0, S):
        ll += _row_log_likelihood(l_ptr + (s * N + n) * D, x_ptr + n * D, D, BLOCK_D)
    kl = tl.zeros([BLOCK_L], dtype=tl.float32)
    for j0 in range(0, L, BLOCK_L):
        j = j0 + tl.arange(0, BLOCK_L)
        m = j < L
        mu = tl.load(h_ptr + n * 2 * L + j, mask=m, other=0.0)
        logvar = tl.load(h_ptr + n * 2 * L + L + j, mask=m, other=0.0)
        kl += tl.where(m, mu * mu + tl.exp(logvar) - logvar - 1.0, 0.0)
    tl.store(y_ptr + n, ll / S - 0.5 * tl.sum(kl, axis=0))


def _check(name: str, t, ndim: int, device) -> None:
    check_tensor(name, t, ndim, (torch.float32,), device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def _head(head: torch.Tensor) -> tuple[int, int]:
    _check("head", head, 2, None)
    if head.shape[1] % 2 or head.shape[1] == 0:
        raise ValueError(f"head must be (N, 2L) = (mu, logvar), got shape {tuple(head.shape)}")
    return head.shape[0], head.shape[1] // 2


def reparameterize(head: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """head (N, 2L) fp32, eps (S, N, L) fp32 (contiguous) -> z (S, N, L) fp32."""
    N, L = _head(head)
    _check("eps", eps, 3, head.device)
    if eps.shape[1:] != (N, L):
        raise ValueError(f"eps has shape {tuple(eps.shape)}, expected (S, {N}, {L})")
    z = torch.empty_like(eps)
    if z.numel():
        _reparameterize_kernel[(eps.shape[0] * N, triton.cdiv(L, BLOCK_L))](
            head, eps, z, N, L, BLOCK_L=BLOCK_L, num_warps=1 if INTERPRETER else 2)
    return z


def _logits_and_x(logits: torch.Tensor, x: torch.Tensor, device) -> None:
    _check("x", x, 2, device)
    _check("logits", logits, 3, device)
    if x.shape[1] == 0:
        raise ValueError(f"x must be (N, D) with D >= 1, got shape {tuple(x.shape)}")
    if logits.shape[0] == 0 or logits.shape[1:] != x.shape:
        raise ValueError(f"logits have shape {tuple(logits.shape)}, expected (S, {x.shape[0]}, {x.shape[1]})")


def bernoulli_log_likelihood(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits (S, N, D), x (N, D) in [0, 1], fp32 and contiguous -> log p(x | z) (S, N) fp32, one per sample."""
    _logits_and_x(logits, x, x.device)
    y = torch.empty(logits.shape[:2], device=x.device, dtype=torch.float32)
    if y.numel():
        _bernoulli_log_likelihood_kernel[(y.numel(),)](logits, x, y, x.shape[0], x.shape[1], BLOCK_D=BLOCK_D,
                                                       num_warps=1 if INTERPRETER else 4)
    return y


def bernoulli_elbo(logits: torch.Tensor, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """logits (S, N, D), x (N, D) in [0, 1], head (N, 2L), fp32 and contiguous -> each image's ELBO (N,) fp32."""
    N, L = _head(head)
    if x.dim() != 2 or x.shape[0] != N:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected ({N}, D)")
    _logits_and_x(logits, x, head.device)
    y = torch.empty(N, device=head.device, dtype=torch.float32)
    if N:
        _bernoulli_elbo_kernel[(N,)](logits, x, head, y, logits.shape[0], N, x.shape[1], L, BLOCK_D=BLOCK_D,
                                     BLOCK_L=BLOCK_L, num_warps=1 if INTERPRETER else 4)
    return y
