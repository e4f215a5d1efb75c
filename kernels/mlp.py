"""A pre-norm transformer's MLP sub-layer in one launch, for decode's few rows:

    r += act(LayerNorm(r) W1^T + b1) W2^T + b2        r (M, C) fp32, in place; W1 (H, C), W2 (C, H)

(act = GELU-tanh | ReLU | identity; the LayerNorm optional; biases optional.) Weights fp32 | bf16 | fp16, or int8
with per-row scales (s1 (H,), s2 (C,)), as linear.py takes them and with its numerics: the LayerNorm'd row is
rounded to W1's dtype, the hidden activations to W2's (int8: both kept fp32 and the scales applied to the sums),
products and sums fp32. So it computes what linear.py's two launches compute (fc with the LayerNorm in its
prologue, then mlp.proj adding into r in its epilogue), up to the order of fp32 sums.

Why: a GPT-2 124M decode step's linears each read 1-5 MB and each sits at a launch's latency floor (~4-5 us on
an H200, bench/results/gpu-notes.md); one launch for both MLP matrices saves one floor per layer. The hidden
vector cannot be finished before W2 is applied without a grid-wide wait, so the work is split over H instead:
program (s, m) owns hidden units s*BLOCK_H .. +BLOCK_H of row m. It computes them from W1's rows (a GEMV over
C), applies them to the matching BLOCK_H columns of W2 (rows of W2 are H apart: BLOCK_H * itemsize >= 32 B
keeps those loads whole sectors) and writes that slice's partial output (C,). The partials are added up
without atomics on floats, so the result is the same bits every run, whatever order programs finish in
(utils.gather_partials):
- slices are grouped GROUP at a time; each program, after writing its partial, counts itself into its group's
  counter (an atomic add with acquire-release order, after a fence by every thread); the group's last
  arrival adds the group's partials in slice order (one (GROUP, RBLOCK) tile per column block, every load in
  flight at once) into the group's sum;
- the last group to finish (a second counter) adds the group sums in group order, applies the scale, b2 and
  the residual add, and writes r. Each last arrival sets its counter back to 0, so the counters (int32, zeros
  before the first launch, utils.new_counters()) are zeros again after every launch. Launches that share
  counters must not run concurrently (one model's decode runs on one stream).
No program waits for another (no spin, no grid barrier): correct however many programs are resident, and in
the interpreter, which runs programs one at a time. Under PDL every counter access follows the wait.
Test: tests/test_triton_fused.py (test_mlp*, test_every_autotune_candidate); benchmark: bench/bench_triton.py
(mlp group); the triton backend times it against the two linears per shape on a GPU and keeps the faster
(TritonBackend.mlp).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import linear
from .linear import (ACTIVATIONS, _check_norm, _epilogue, _no_wider_than_k, _norm_block, _normalise, _quick_bench,
                     _row_stats, finish_partials)
from .utils import (FLOAT_DTYPES, cast_to, check_scale, check_tensor, check_vector, checked_counters,
                    gather_partials, l2_prefetchable, launch_tuned, mlp_settings, pdl_begin, pdl_options,
                    prefetch_l2)


@triton.jit
def _mlp_kernel(x_ptr, w1_ptr, s1_ptr, b1_ptr, w2_ptr, s2_ptr, b2_ptr, g_ptr, beta_ptr, part_ptr, count_ptr,
                C, H, x_stride, part_rows, count_stride, eps,
                SCALED: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr, GELU: tl.constexpr,
                RELU: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr, RBLOCK: tl.constexpr,
                THREADS: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr, STAGES: tl.constexpr = 1):
    s = tl.program_id(0)  # hidden slice
    row = tl.program_id(1).to(tl.int64)
    n_slices = tl.num_programs(0)
    h0 = s * BLOCK_H
    hs = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,) hidden units
    in_h = hs < H
    if PREFETCH:  # the program's rows of W1 and its columns of W2 requested from L2 at once, before any wait
        item = w1_ptr.dtype.element_ty.primitive_bitwidth // 8
        prefetch_l2(w1_ptr + h0.to(tl.int64) * C, tl.minimum(BLOCK_H, H - h0), C * item, C * item)
        for c0 in range(0, C, THREADS):
            prefetch_l2(w2_ptr + (c0 * H + h0).to(tl.int64), tl.minimum(THREADS, C - c0), BLOCK_H * item, H * item)
    pdl_begin(PDL)
    # fc: this slice of act(LayerNorm(x) W1^T + b1), a GEMV over C
    ks = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * x_stride
    if NORM:
        mean, rstd = _row_stats(x_ptr, tl.zeros((1,), dtype=tl.int64) + row, row + 1, C, x_stride, eps, NORM_BLOCK)
    w1_ptrs = w1_ptr + hs[:, None].to(tl.int64) * C + ks[None, :]  # (BLOCK_H, BLOCK_K)
    acc = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, C, BLOCK_K, num_stages=STAGES):
        in_k = ks + k0 < C
        w = tl.load(w1_ptrs, mask=in_h[:, None] & in_k[None, :], other=0.0)
        if SCALED:
            w = w.to(tl.float32)
        x = tl.load(x_row + k0 + ks, mask=in_k, other=0.0)[None, :]  # (1, BLOCK_K)
        if NORM:
            x = _normalise(x, mean, rstd, g_ptr, beta_ptr, ks + k0, in_k[None, :], C)
        acc += w.to(tl.float32) * cast_to(x, w.dtype)
        w1_ptrs += BLOCK_K
    h = _epilogue(tl.sum(acc, axis=1), s1_ptr, b1_ptr, hs, H, SCALED, HAS_BIAS1, GELU, RELU)
    h = tl.where(in_h, h, 0.0)
    if not SCALED:  # the input of mlp.proj, rounded to its weights' dtype (as linear.py rounds x)
        h = cast_to(h, w2_ptr.dtype.element_ty)
    # mlp.proj's partial sums over this slice: part[row, s, c] = sum_j W2[c, h0 + j] h[j]
    cs = tl.arange(0, BLOCK_C)
    part_row = part_ptr + row * part_rows * C
    w2_ptrs = w2_ptr + cs[:, None].to(tl.int64) * H + hs[None, :]  # (BLOCK_C, BLOCK_H)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
        in_c = cs + c0 < C
        w = tl.load(w2_ptrs, mask=in_c[:, None] & in_h[None, :], other=0.0)
        tl.store(part_row + s * C + c0 + cs, tl.sum(w.to(tl.float32) * h[None, :], axis=1), mask=in_c)
        w2_ptrs += BLOCK_C * H
    # the partials added in slice order (utils.gather_partials), by the one program that finds them all written
    rc = tl.arange(0, RBLOCK)
    rr = tl.arange(0, GROUP)
    last, n_groups = gather_partials(part_row, s, n_slices, C, count_ptr + row * count_stride, rc, rr, RBLOCK, GROUP)
    if last:
        finish_partials(part_row + n_slices * C, n_groups, C, 0, C, s2_ptr, b2_ptr, x_row, rc, rr, SCALED, HAS_BIAS2,
                        True, RBLOCK, GROUP)


# (BLOCK_H, BLOCK_K, BLOCK_C, GROUP, num_warps, PREFETCH, STAGES): hidden slices whose W2 columns are 32-128 B of
# each row (16-64 bf16 units); fc and proj tiles of 4-8 K weights per iteration (fewer, longer iterations: fewer
# dependent round trips to memory per program; 1,024 wide: a row of up to 1,024 in one step, x converted to the
# tile's layout once); groups of 8 or 16 partials; RBLOCK keeps the reduction tile at 8,192 values. STAGES > 1:
# both loops software-pipelined (tl.range num_stages: blocks copied asynchronously into shared memory STAGES - 1
# iterations ahead, where a plain loop has one block in flight per program; sm_90: 110-172 registers, no spills)
_CONFIGS = [(16, 256, 256, 8, 4, False, 1), (16, 512, 512, 8, 8, False, 1), (16, 1024, 1024, 8, 8, False, 1),
            (32, 128, 128, 8, 4, False, 1), (32, 256, 256, 8, 8, False, 1), (64, 64, 64, 8, 4, False, 1),
            (64, 128, 128, 8, 8, False, 1), (64, 128, 128, 16, 8, False, 1), (32, 128, 128, 8, 4, True, 1),
            (32, 256, 256, 8, 8, True, 1), (64, 128, 128, 8, 8, True, 1),
            (16, 128, 128, 8, 4, False, 4), (16, 256, 256, 8, 4, False, 3), (16, 512, 512, 8, 8, False, 3),
            (32, 128, 128, 8, 4, False, 3), (32, 256, 256, 8, 8, False, 3)]


def _candidates(configs, named_args, **kwargs):
    """BLOCK_K no wider than the row, and the L2-prefetching candidates only where the bulk prefetch may run
    (utils.l2_prefetchable: Hopper, 16-byte aligned rows of W1 and W2) and every slice is whole (a partial last
    slice's W2 columns would run past the matrix)."""
    w1, w2, C, H = named_args["w1_ptr"], named_args["w2_ptr"], named_args["C"], named_args["H"]
    item = w1.element_size()
    ok = l2_prefetchable(w1, C * item) and l2_prefetchable(w2, H * item)
    configs = [c for c in configs if not c.kwargs["PREFETCH"]
               or ok and H % c.kwargs["BLOCK_H"] == 0 and c.kwargs["BLOCK_H"] * item % 16 == 0]
    return _no_wider_than_k(configs, dict(K=C))


_mlp_tuned = triton.autotune(
    [triton.Config(dict(BLOCK_H=h, BLOCK_K=k, BLOCK_C=c, GROUP=g, RBLOCK=8192 // g, THREADS=32 * w, PREFETCH=p,
                        STAGES=st), num_warps=w) for h, k, c, g, w, p, st in _CONFIGS],
    key=["C", "H"], prune_configs_by=dict(early_config_prune=_candidates), do_bench=_quick_bench,
    cache_results=True,
    restore_value=["x_ptr"],  # timed runs add into the residual stream: put it back
)(_mlp_kernel)


def _layout(C: int, H: int, device: torch.device) -> tuple[int, int]:
    """(partial rows, counters) per row of x for every block shape a launch may take (the autotuner's candidates
    and the fixed settings): slices of the narrowest BLOCK_H and their groups of the smallest GROUP."""
    shapes = [(c[0], c[3]) for c in _CONFIGS]
    s = mlp_settings(C, H, device)
    shapes.append((s["BLOCK_H"], s["GROUP"]))
    slices = max(triton.cdiv(H, bh) for bh, _ in shapes)
    groups = max(triton.cdiv(slices, g) for _, g in shapes)
    return slices + groups, groups + 1


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
        act: str | None = "gelu_tanh", *, scale1: torch.Tensor | None = None, scale2: torch.Tensor | None = None,
        norm: tuple | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """x += act(LayerNorm(x) W1^T + b1) W2^T + b2, in place; returns x. x (..., C) fp32 with contiguous rows (a
    view of (M, C)); W1 (H, C), W2 (C, H) of one dtype (fp32 | bf16 | fp16 | int8, contiguous), b1 (H,), b2 (C,)
    fp32 or None; int8 weights with their per-row scales scale1 (H,), scale2 (C,) (and only they); norm (g, beta,
    eps) with g, beta (C,) fp32, or None; act None | "gelu_tanh" | "relu". counters: a utils.new_counters() buffer
    (required while a CUDA graph is being captured; otherwise one is made for the call)."""
    check_tensor("x", x, None, (torch.float32,), None, last_contiguous=True)
    dev = x.device
    check_tensor("fc weight", w1, 2, (*FLOAT_DTYPES, torch.int8), dev)
    H, C = w1.shape
    check_tensor("proj weight", w2, 2, (w1.dtype,), dev)
    if tuple(w2.shape) != (C, H):
        raise ValueError(f"proj weight has shape {tuple(w2.shape)}; expected ({C}, {H}), the fc weight's {(H, C)} "
                         f"transposed")
    for name, w in (("fc weight", w1), ("proj weight", w2)):
        if not w.is_contiguous() or w.numel() == 0:
            raise ValueError(f"{name} must be a contiguous, non-empty matrix, got {tuple(w.shape)}")
    check_scale("fc weight", w1, scale1, dev)
    check_scale("proj weight", w2, scale2, dev)
    if x.dim() == 0 or x.shape[-1] != C:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be the fc weight's in-features {C}")
    for name, b, n in (("fc bias", b1, H), ("proj bias", b2, C)):
        if b is not None:
            check_vector(name, b, n, (torch.float32,), dev)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if norm is not None:
        _check_norm(norm, C, dev)
    try:
        x2 = x.view(-1, C)  # written in place: a copy would lose the update
    except RuntimeError:
        raise ValueError(f"x (shape {tuple(x.shape)}, strides {x.stride()}) must be viewable as (rows, {C})") from None
    M = x2.shape[0]
    part_rows, count_stride = _layout(C, H, dev)
    counters = checked_counters(counters, M * count_stride, dev, "mlp")
    if M == 0:
        return x
    part = torch.empty(M, part_rows, C, device=dev)  # the partial sums (read back before the launch ends)
    g, beta, eps = norm if norm is not None else (x2, x2, 1.0)  # dummies when NORM is off
    args = (x2, w1, w1 if scale1 is None else scale1, w1 if b1 is None else b1, w2, w2 if scale2 is None else scale2,
            w2 if b2 is None else b2, g, beta, part, counters, C, H, x2.stride(0), part_rows, count_stride, float(eps))
    flags = dict(SCALED=scale1 is not None, HAS_BIAS1=b1 is not None, HAS_BIAS2=b2 is not None,
                 GELU=act == "gelu_tanh", RELU=act == "relu", NORM=norm is not None,
                 NORM_BLOCK=_norm_block(norm, C, 1), **pdl_options(dev))
    if linear.AUTOTUNE:  # AIGC_RT_AUTOTUNE, as the linears'
        launch_tuned(_mlp_tuned, lambda meta: (triton.cdiv(H, meta["BLOCK_H"]), M), *args, **flags)
    else:
        s = mlp_settings(C, H, dev)
        _mlp_kernel[(triton.cdiv(H, s["BLOCK_H"]), M)](*args, **flags, **s)
    return x


def reference(x, w1, b1, w2, b2, act="gelu_tanh", scale1=None, scale2=None, norm=None) -> torch.Tensor:
    """Plain-PyTorch fp32, linear.py's reference twice: x + linear(act(linear(LayerNorm(x), W1)), W2) (x left
    alone)."""
    h = linear.reference(x, w1, b1, act, scale=scale1, norm=norm)
    return linear.reference(h, w2, b2, scale=scale2, residual=x)
