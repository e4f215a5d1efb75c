"""Where a GPT-2 decode step's time goes on a GPU, and the linear kernels against cuBLAS (issue 6).

    python bench/gpu_profile.py [--sizes 124M,1.5B] [--dtype bf16] [--batch 1]

For each size (random-init weights of the real shapes, as bench/gpu_decode.py makes them):
1. The step: median ms of a CUDA-graph-replayed decode step (what generate() runs), also with the kernels
   launched as programmatic dependent launches (AIGC_RT_PDL=1), also without the launch-saving fusions
   (triton_backend.NORM_IN_PROLOGUE_MAX_ROWS = utils.SINGLE_PASS_BLOCKS = 0), and the kernels of the same step
   run eagerly under torch.profiler: launches per step, device us per step, share. Replayed step time minus the
   kernels' sum is what launches and gaps between kernels cost inside the graph.
2. The linears of the step at M = batch and M = 8: our kernel autotuned (the default), our kernel with the fixed
   block shapes (AIGC_RT_AUTOTUNE=0), both as the model runs them (qkv, fc and lm_head with the LayerNorm in
   their prologue, proj and mlp_proj adding into the residual), and cuBLAS (the bare F.linear in the weight
   dtype), each as a CUDA graph of one call per copy of the weight over enough copies (>= 256 MiB) that the L2
   cache never holds the next one, as in a decode step; also the CUDA GEMV of csrc/cuda (the cuda backend's, up
   to 8 rows), fused the same way, at its fastest launch configuration. Reported: us per call, GB/s of weight
   read, % of the measured read bandwidth.
3. The MLP sub-layer at M = batch and M = 8: kernels/mlp.py's one launch against the two linears and cuBLAS,
   over weight copies as in 2; and in 1, the step with every fusable sub-layer (the MLP, the attention
   sub-layer, the attention with its output projection) forced to its one kernel, and to its kernels apart.
4. Sampling a token from 50,257 logits (greedy; seed system 1's temperature 0.7 + top-k 50; top-p 0.9 with a
   repetition penalty) at batch 1 and 8: our kernel against sample_reference (torch: topk / a full sort) on the
   same device, 20 calls back to back, timed with events (no graph: the reference may sync the host).
Prints markdown tables; writes them to bench/results/gpu_profile-<device>-<date>.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_decode  # noqa: E402  (the model shapes, the checkpoint maker and the bandwidth probe)

import aigc_rt  # noqa: E402
from aigc_rt import cuda_kernels  # noqa: E402
from aigc_rt.kernels import linear as triton_linear  # noqa: E402
from aigc_rt.kernels import utils  # noqa: E402

TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def graph_time(fns, repeats: int = 20) -> float:
    """Median seconds of one replay of a CUDA graph that runs every fn once (after an eager warm-up)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    return gpu_decode.event_seconds(g.replay, repeats)


def replayed_step_seconds(m, tok, pos, cache, max_len: int) -> float:
    """Median seconds of a CUDA-graph-replayed decode step (captured anew), 10 steps per host sync."""
    m.backend.decode_graph.entries.clear()
    m.decode(tok, pos, cache, max_len)  # captures
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(10):
            m.decode(tok, pos, cache, max_len)  # same position: a fixed context
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / 10)
    return statistics.median(times)


def step_profile(m, batch: int, prompt: int = 32,
                 steps: int = 5) -> tuple[float, float, float, dict, list[tuple[str, float, float]]]:
    """(replayed step seconds, the same with programmatic dependent launch, the same without the launch-saving
    fusions (LayerNorms as their own launches, attention split and merged), {"fused": s, "composed": s, "picked":
    the backend's choices}: the step with every fusable sub-layer (the MLP, the attention sub-layer, the
    attention with its projection) forced to its one kernel / to its kernels apart, "wide" / "spread": the
    attention sub-layers forced to that launch shape, [(kernel, launches per step,
    device us per step)]) at context ~prompt."""
    from torch.profiler import ProfilerActivity, profile

    from aigc_rt.backends import triton_backend
    from aigc_rt.kernels import utils
    ids = torch.randint(0, m.config.vocab_size, (batch, prompt), device="cuda")
    cache = m.new_cache(batch, prompt + 64)
    with torch.inference_mode():
        tok = m.head(m.prefill(ids, cache)[:, -1]).argmax(-1)
        pos = torch.full((batch,), prompt, device="cuda")
        replayed = replayed_step_seconds(m, tok, pos, cache, prompt + 1)
        # the fused sub-layers (MLP; attention + its projection), as chosen by the step's first (eager) run
        fused_keys = [k for k in triton_linear._picked if k[0] in ("mlp", "attn_proj", "attn_block")]
        failed = [f"{k[0]} composed (failed its check)" for k, ok in triton_backend._checked.items() if not ok]
        fusion = {"picked": ", ".join([f"{k[0]} {triton_linear._picked[k]}" for k in fused_keys] + failed) or "-"}
        picks = {k: triton_linear._picked[k] for k in fused_keys}
        try:
            # the attention sub-layer in each of its launch shapes (utils.BLOCK_SHAPES; the other fusions fused)
            for how in (*utils.BLOCK_SHAPES, "composed"):
                triton_linear._picked.update({k: how if k[0] == "attn_block" or how == "composed" else "fused"
                                              for k in fused_keys})
                fusion[how] = replayed_step_seconds(m, tok, pos, cache, prompt + 1)
        finally:
            triton_linear._picked.update(picks)
        utils.PDL_REQUESTED = True
        try:
            with_pdl = replayed_step_seconds(m, tok, pos, cache, prompt + 1)
        finally:
            utils.PDL_REQUESTED = False
        fused = triton_backend.NORM_IN_PROLOGUE_MAX_ROWS, utils.SINGLE_PASS_BLOCKS
        triton_backend.NORM_IN_PROLOGUE_MAX_ROWS = utils.SINGLE_PASS_BLOCKS = 0
        try:
            apart = replayed_step_seconds(m, tok, pos, cache, prompt + 1)
        finally:
            triton_backend.NORM_IN_PROLOGUE_MAX_ROWS, utils.SINGLE_PASS_BLOCKS = fused
        m.backend.decode_graph.capture = False
        m.backend.decode_graph.entries.clear()
        for _ in range(3):
            m.decode(tok, pos, cache, prompt + 1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                m.decode(tok, pos, cache, prompt + 1)
            torch.cuda.synchronize()
        m.backend.decode_graph.capture = True
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0.0)
        if us > 0 and not e.key.startswith(("aten::", "cuda")):
            rows.append((e.key[:60], e.count / steps, us / steps))
    return replayed, with_pdl, apart, fusion, sorted(rows, key=lambda r: -r[2])


def weight_copies(nbytes: int) -> int:
    """Copies of a weight of nbytes that together (>= 256 MiB) never fit in L2, so that each timed call reads its
    weight from memory, as in a decode step (2 to 64)."""
    return max(2, min(64, -(-(256 << 20) // nbytes)))


def read_cells(secs: dict, columns, nbytes: int, bandwidth: float) -> list[str]:
    """Table cells for the columns (keys of secs, seconds per call; "-" where missing): us per call, GB/s of the
    nbytes read, % of the measured bandwidth."""
    cells = []
    for name in columns:
        if name in secs:
            gbps = nbytes / secs[name] / 1e9
            cells.append(f"{1e6 * secs[name]:.1f} us, {gbps:,.0f} GB/s ({100 * gbps * 1e9 / bandwidth:.0f}%)")
        else:
            cells.append("-")
    return cells


def linear_rows(m, M: int, bandwidth: float) -> list[str]:
    """One table row per distinct linear shape of the model: ours tuned / ours fixed / cuBLAS, and the CUDA GEMV
    (csrc/cuda/gemv.cu, up to 8 rows; fused as the Triton one, its launch configuration autotuned as the cuda
    backend does)."""
    blk = m.blocks[0]
    shapes = {"qkv": blk.qkv, "proj": blk.proj, "fc": blk.fc, "mlp_proj": blk.mlp_proj, "lm_head": m.lm_head}
    out = []
    for name, lin in shapes.items():
        w, b, s = lin.weight, lin.bias, lin.scale
        N, K = w.shape
        nbytes = w.numel() * w.element_size()
        copies = weight_copies(nbytes)
        ws = [w.clone() for _ in range(copies)]
        x = torch.randn(M, K, device="cuda")
        ys = [torch.zeros(M, N, device="cuda") for _ in range(2)]
        act = "gelu_tanh" if name == "fc" else None
        # as the model runs them: LayerNorm in the prologue of qkv, fc and lm_head, the residual add in the
        # epilogue of proj and mlp_proj
        norm = (torch.ones(K, device="cuda"), torch.zeros(K, device="cuda"), 1e-5)

        def ours(w_, i, fn=triton_linear.linear, **launch):
            if name in ("proj", "mlp_proj"):
                return fn(x, w_, b, act, scale=s, residual=ys[i % 2], **launch)
            return fn(x, w_, b, act, scale=s, norm=norm, out=ys[i % 2], **launch)
        secs = {}
        for mode in ("tuned", "fixed"):
            triton_linear.AUTOTUNE = mode == "tuned"
            secs[mode] = graph_time([lambda w_=w_, i=i: ours(w_, i) for i, w_ in enumerate(ws)]) / copies
        triton_linear.AUTOTUNE = True
        cuda_config = "-"
        lib = cuda_kernels.library()
        if lib is not None and lib.device_ok(w.device) and lib.gemv_takes(x, w):
            lib.gemv_configs.clear()
            ours(ws[0], 0, lib.gemv, tune=True)  # times the candidates once; graph_time replays the choice
            (rows, warps, prefetch), = lib.gemv_configs.values()
            launch = dict(rows_per_warp=rows, warps=warps, prefetch=prefetch)
            secs["CUDA GEMV"] = graph_time([lambda w_=w_, i=i: ours(w_, i, lib.gemv, **launch)
                                            for i, w_ in enumerate(ws)]) / copies
            cuda_config = f"{rows} rows/warp, {warps} warps{', L2 prefetch' if prefetch else ''}"
        if s is None:
            xw = x.to(w.dtype)
            secs["cuBLAS"] = graph_time([lambda w_=w_: F.linear(xw, w_) for w_ in ws]) / copies
        cells = read_cells(secs, ("tuned", "fixed", "cuBLAS", "CUDA GEMV"), nbytes, bandwidth)
        picked = triton_linear._picked.get((M, N, K, w.dtype, name not in ("proj", "mlp_proj")),
                                           "gemv" if M <= triton_linear.GEMV_MAX_M else "gemm")
        kern = triton_linear._gemv_tuned if picked == "gemv" else triton_linear._small_m_tuned
        best = [f"{picked}: {c}" for k, c in kern.cache.items() if k[:2] == (N, K)]
        out.append(f"| {name} | {M} | {N} x {K} | {' | '.join(cells)} | {best[0] if best else '-'} | {cuda_config} |")
        del ws
        torch.cuda.empty_cache()
    return out


def mlp_rows(m, M: int, bandwidth: float) -> list[str]:
    """The MLP sub-layer (LN + fc + GELU + mlp_proj + residual add) as the model runs it at M rows: kernels/mlp.py's
    one launch (autotuned) against the two fused linears (autotuned), and cuBLAS's two bare F.linear in the weight
    dtype, over weight copies that L2 cannot hold (as linear_rows)."""
    from aigc_rt.kernels import mlp
    from aigc_rt.kernels.utils import new_counters
    blk = m.blocks[0]
    fc, proj = blk.fc, blk.mlp_proj
    if fc.weight.dtype == torch.uint8:
        return [f"| MLP | {M} | int4: two linears only | - | - | - | - |"]
    H, C = fc.weight.shape
    nbytes = 2 * fc.weight.numel() * fc.weight.element_size()
    copies = weight_copies(nbytes)
    ws = [(fc.weight.clone(), proj.weight.clone()) for _ in range(copies)]
    r, h = torch.randn(M, C, device="cuda"), torch.empty(M, H, device="cuda")
    norm = (torch.ones(C, device="cuda"), torch.zeros(C, device="cuda"), 1e-5)
    counters = new_counters("cuda")

    def fused(w1, w2):
        mlp.mlp(r, w1, fc.bias, w2, proj.bias, scale1=fc.scale, scale2=proj.scale, norm=norm, counters=counters)

    def two(w1, w2):
        triton_linear.linear(r, w1, fc.bias, "gelu_tanh", scale=fc.scale, norm=norm, out=h)
        triton_linear.linear(h, w2, proj.bias, scale=proj.scale, residual=r)
    secs = {name: graph_time([lambda w=w, f=f: f(*w) for w in ws]) / copies for name, f in
            (("fused", fused), ("two linears", two))}
    if fc.scale is None:
        r16, h16 = r.to(fc.weight.dtype), h.to(fc.weight.dtype)
        secs["cuBLAS"] = graph_time([lambda w=w: (F.linear(r16, w[0]), F.linear(h16, w[1])) for w in ws]) / copies
    cells = read_cells(secs, ("fused", "two linears", "cuBLAS"), nbytes, bandwidth)
    best = [f"{c}" for k, c in mlp._mlp_tuned.cache.items() if k[:2] == (C, H)]
    del ws
    torch.cuda.empty_cache()
    return [f"| MLP | {M} | {C} x {H} | {' | '.join(cells)} | {best[0] if best else '-'} |"]


def sampling_rows() -> list[str]:
    """One row per sampling setting and batch: us per call, ours and the reference. Logits N(0, 3^2) (flat: top-p
    alone streams the row), and for top-p also N(0, 10^2) (peaked, as a trained model's rows: the 64 candidates
    per chunk hold the answer)."""
    from aigc_rt.kernels import sampling
    from aigc_rt.sampling import SamplingParams, sample_reference
    top_p = SamplingParams(do_sample=True, top_p=0.9, repetition_penalty=1.2)
    settings = {"greedy": (SamplingParams(), 3), "t=0.7, top_k=50": (SamplingParams(do_sample=True, temperature=0.7,
                                                                                     top_k=50), 3),
                "top_p=0.9, penalty 1.2": (top_p, 3), "top_p=0.9, penalty 1.2, peaked logits": (top_p, 10)}
    out = ["| sampling | batch | ours | torch (sample_reference) | ours, replayed from a CUDA graph |",
           "|---|---|---|---|---|"]
    for name, (params, spread) in settings.items():
        for B in (1, 8):
            logits = torch.randn(B, 50257, device="cuda") * spread
            u = torch.rand(B, device="cuda")
            seen = torch.rand(B, 50257, device="cuda") < 0.01
            cells = []
            for fn in (sampling.sample, sample_reference):
                def calls(fn=fn):
                    for _ in range(20):
                        fn(logits, params, u, seen)
                try:
                    calls()  # warm-up (compiles ours)
                    cells.append(f"{1e6 * gpu_decode.event_seconds(calls, 5) / 20:,.1f} us")
                except Exception as e:
                    cells.append(f"failed: {type(e).__name__}")
            try:  # the device time alone, as generate()'s step replays it (the columns before: eager calls, whose
                # Python and launches may cost more than the kernels)
                tokens = torch.empty(B, dtype=torch.int64, device="cuda")
                step = [lambda: sampling.sample(logits, params, u, seen, out=tokens)]
                cells.append(f"{1e6 * graph_time(step):,.1f} us")
            except Exception as e:
                cells.append(f"failed: {type(e).__name__}")
            out.append(f"| {name} | {B} | {' | '.join(cells)} |")
    return out


def config_text(config) -> str:
    """An autotune candidate in a few words: its block shape, warps and what it turns on."""
    kw = config.kwargs
    shape = " x ".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_H", "BLOCK_N", "BLOCK_K", "BLOCK_C") if k in kw)
    parts = [f"{shape}, {config.num_warps} warps"]
    if "BLOCK_M" in kw:  # the dot tile: its loads pipelined by triton over num_stages
        parts.append(f"{config.num_stages} stages")
    if kw.get("PERSISTENT"):
        parts.append(f"persistent {kw['PERSISTENT']}/SM")
    if kw.get("STAGES", 1) > 1:
        parts.append(f"pipelined {kw['STAGES']}")
    if kw.get("SPLIT_K", 1) > 1:
        parts.append(f"split-K {kw['SPLIT_K']}")
    if kw.get("PREFETCH"):
        parts.append("L2 prefetch")
    return ", ".join(parts)


def tuning_rows(log: dict, picks: dict, done: set, top: int = 4) -> list[str]:
    """Markdown rows for what this run tuned and picked that `done` does not hold yet (it is updated): each shape's
    fastest `top` autotune candidates (kernels/utils.py tuning_log) and each pick's times per choice
    (kernels/linear.py picked_times: the GEMV or the 16-row tile; a fused sub-layer or its kernels apart)."""
    rows = []
    for (name, key), timings in log.items():
        if (name, key) in done:
            continue
        done.add((name, key))
        us = {c: 1e3 * (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
        best = sorted(us, key=us.get)[:top]
        dtypes = sorted({str(d).replace("torch.", "") for d in key[2:] if str(d).startswith("torch.")} - {"float32"})
        rows.append(f"| {name} | {key[0]} x {key[1]} {'/'.join(dtypes) or 'float32'} | "
                    + "; ".join(f"{config_text(c)}: {us[c]:.1f} us" for c in best) + f" | {len(us)} |")
    for key, times in picks.items():
        if ("pick", key) in done:
            continue
        done.add(("pick", key))
        if isinstance(key[0], str):  # a fused sub-layer: (name, backend, its shape...)
            what, shape = f"{key[0]} (pick)", ", ".join(str(k).replace("torch.", "") for k in key[2:])
        else:  # a linear of 2-16 rows: (M, N, K, weight dtype, LayerNorm in the prologue)
            M, N, K, dtype, norm = key
            what, shape = "linear (pick)", f"M={M} {N} x {K} {str(dtype).replace('torch.', '')}{' +LN' * norm}"
        rows.append(f"| {what} | {shape} | "
                    + "; ".join(f"{k}: {1e3 * t:.1f} us" for k, t in sorted(times.items(), key=lambda kv: kv[1]))
                    + f" | {len(times)} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="124M,1.5B")
    ap.add_argument("--dtype", default="bf16", choices=list(TORCH_DTYPE))
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    bandwidth = gpu_decode.measure_bandwidth()
    device = torch.cuda.get_device_name()
    lines = [f"# Decode step profile on {device}", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}; {a.dtype}; measured read bandwidth {bandwidth / 1e9:,.0f} GB/s; "
             f"torch {torch.__version__}.", ""]
    slug = "".join(ch if ch.isalnum() else "-" for ch in device).strip("-").lower()
    path = os.path.join(gpu_decode.RESULTS_DIR, f"gpu_profile-{slug}-{time.strftime('%Y-%m-%d')}.md")
    os.makedirs(gpu_decode.RESULTS_DIR, exist_ok=True)

    done: set = set()  # the tuning rows printed so far
    for size in a.sizes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            gpu_decode.hf_checkpoint(size, folder)
            m = aigc_rt.load(aigc_rt.convert(folder, os.path.join(folder, "m.safetensors"), dtype=a.dtype),
                             device="cuda", backend="triton")
        lines += [f"## GPT-2 {size}, batch {a.batch}", ""]
        try:
            replayed, with_pdl, apart, fusion, kernels = step_profile(m, a.batch)
            total = sum(us for _, _, us in kernels)
            forced = ", ".join([f"{1e3 * fusion[k]:.3f} ms with every sub-layer {k}" for k in ("fused", "composed")
                                if k in fusion] + [f"{1e3 * fusion[k]:.3f} ms with the attention sub-layers {k}"
                                                   for k in utils.BLOCK_SHAPES[1:] if k in fusion])
            lines += [f"Replayed step {1e3 * replayed:.3f} ms ({1e3 * with_pdl:.3f} ms with programmatic dependent "
                      f"launch, {1e3 * apart:.3f} ms with LayerNorm and attention-merge launches of their own; fused "
                      f"sub-layers picked: {fusion['picked']}; {forced}); "
                      f"its kernels run eagerly sum to {total / 1e3:.3f} ms "
                      f"({sum(n for _, n, _ in kernels):.0f} launches).", "",
                      "| kernel | launches/step | us/step | share |", "|---|---|---|---|"]
            lines += [f"| {k} | {n:.0f} | {us:.1f} | {100 * us / total:.1f}% |" for k, n, us in kernels[:14]]
        except Exception as e:  # a failing part is a line of the report, not the end of the run
            lines.append(f"step profile failed: {type(e).__name__}: {e}")
        lines += ["", "| linear | M | N x K | ours (autotuned, fused as the model runs it) | ours (fixed shapes) "
                  "| cuBLAS (bare) | CUDA GEMV (fused) | tuned config | CUDA GEMV config |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for M in sorted({a.batch, 8}):
            try:
                lines += linear_rows(m, M, bandwidth)
            except Exception as e:
                lines.append(f"| linears at M={M} failed: {type(e).__name__}: {str(e)[:200]} |")
        lines += ["", "| sub-layer | M | C x H | fused (one launch) | two linears (fused as the model runs them) "
                  "| cuBLAS (two bare F.linear) | fused config |", "|---|---|---|---|---|---|---|"]
        for M in sorted({a.batch, 8}):
            try:
                lines += mlp_rows(m, M, bandwidth)
            except Exception as e:
                lines.append(f"| MLP at M={M} failed: {type(e).__name__}: {str(e)[:200]} |")
        tuned = tuning_rows(utils.tuning_log, triton_linear.picked_times, done)
        if tuned:
            lines += ["", "What this size's first launches tuned: each shape's fastest autotune candidates (median us "
                      "of the autotuner's timing, from L2 where the weights fit) and each pick's choices.", "",
                      "| kernel | shape | fastest first | timed |", "|---|---|---|---|", *tuned]
        lines.append("")
        print("\n".join(lines), flush=True)
        with open(path, "w") as f:  # after each size: a time limit keeps what was measured
            f.write("\n".join(lines) + "\n")
        del m
        torch.cuda.empty_cache()
    try:  # last: nothing above depends on it
        lines += ["## Sampling over 50,257 logits", ""] + sampling_rows() + [""]
    except Exception as e:
        lines.append(f"sampling failed: {type(e).__name__}: {e}")
    print("\n".join(lines[-10:]), flush=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
