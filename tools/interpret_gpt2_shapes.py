"""Run the fused decode kernels at real GPT-2 shapes, with a GPU's block settings and SM count, in the interpreter.

The tests run the kernels under TRITON_INTERPRET=1 at small odd shapes (and a GPU's block settings at small shapes),
because the interpreter takes seconds to minutes per launch at real sizes. This checks, without a GPU, what only
real sizes reach: the index arithmetic of the tiles, slices, groups and splits a GPU launch takes for GPT-2 124M and
1.5B (12 and 25 heads of 64, 3,072 and 6,400 hidden units, 132 SMs), against the fp32 references of
tests/test_triton_fused.py:

    python tools/interpret_gpt2_shapes.py                    # everything (~10 minutes on 2 cores)
    python tools/interpret_gpt2_shapes.py --parts mlp block  # the fused MLP, the whole attention sub-layer
    python tools/interpret_gpt2_shapes.py --parts wide spread  # that sub-layer's other launch shapes
    python tools/interpret_gpt2_shapes.py --sizes 124M --rows 1

Parts: mlp (kernels/mlp.py), block (decode_attention.attention_block, caches of 160 and 256 positions: one pass),
wide and spread (the same in those launch shapes: the qkv GEMV in steps four times as wide; a head's q, k, v rows
spread over several programs; cache 160), proj (the attention with its output projection over 1,024 positions: split
+ merge). Exits 1 if any result is outside the tests' tolerance. What it cannot check is what the interpreter
cannot: programs running at once (the counters' memory ordering) and speed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

from aigc_rt.kernels import mlp, utils  # noqa: E402

SIZES = {"124M": (768, 12, 3072), "1.5B": (1600, 25, 6400)}  # (C, heads, hidden units)
SMS = 132  # an H100 / H200


def gpu_settings() -> None:
    """The launchers take a GPU's block sizes (tests/conftest.py use_gpu_settings, and the fused MLP's) and see SMS
    multiprocessors (the SM count sizes the attention's splits and output slices)."""
    from conftest import use_gpu_settings
    utils.num_sms = lambda device: SMS
    use_gpu_settings(setattr, (mlp, "mlp_settings"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 8], help="decode rows (batch)")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "int8"], choices=["fp32", "bf16", "fp16", "int8"])
    ap.add_argument("--parts", nargs="+", default=["mlp", "block", "proj"],
                    choices=["mlp", "block", "wide", "spread", "proj"])
    args = ap.parse_args(argv)
    gpu_settings()
    import test_triton_fused as t  # the operands, references and tolerances of the tests
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
    failed = 0

    def report(what: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, t0: float) -> None:
        """As the tests' assert_close: every element within atol + rtol * |reference|."""
        nonlocal failed
        got, want = got.float(), want.float()
        out = int(((got - want).abs() > atol + rtol * want.abs()).sum())
        failed += out > 0
        err = (got - want).abs().max().item()
        print(f"{'FAIL' if out else 'ok  '} {what}: max abs error {err:.3g} (atol {atol:g}, rtol {rtol:g}"
              f"{f'; {out} elements outside' if out else ''}), {time.perf_counter() - t0:.1f} s", flush=True)

    for size in args.sizes:
        C, H, hidden = SIZES[size]
        D = C // H
        for B in args.rows:
            for name in args.dtypes:
                dtype = dtypes[name]
                tag = f"{size} rows={B} {name}"
                if "mlp" in args.parts:
                    t0 = time.perf_counter()
                    got, want = t.run(t.operands(B, C, hidden, dtype, seed=B))
                    report(f"mlp {tag}", got, want, *t.tolerance(dtype), t0)
                blocks = [(S, "fused") for S in (160, 256) if "block" in args.parts]
                for S, shape in blocks + [(160, shape) for shape in ("wide", "spread") if shape in args.parts]:
                    t0 = time.perf_counter()
                    o = t.block_operands(B, H, D, S, dtype, torch.bfloat16, seed=S + B)
                    got, kc, _ = t.run_block(o, shape=shape)
                    want, kc_want, _ = t.block_reference(o)
                    s = utils.decode_settings(B * H, S, D, torch.device("cpu"), interpreter=False, shape=shape)
                    layout = (f"{s['QKV_SLICES']} programs a head of {s['QKV_ROWS']} q, k, v rows" if shape == "spread"
                              else f"{s['PROJ_SLICES']} output slices")
                    what = (f"attention block{'' if shape == 'fused' else f' ({shape})'} {tag} cache {S} ({layout}, "
                            f"qkv steps of {s['BLOCK_K']})")
                    report(what, got, want, *t.tolerance(dtype), t0)
                    report(f"{what}, k cache", kc, kc_want, 1e-2, 1e-2, t0)
                if "proj" in args.parts:
                    t0 = time.perf_counter()
                    o = t.attention_operands(B, H, D, 1024, C, dtype, torch.bfloat16, seed=B + 7)
                    got, _, _ = t.run_attention(o, True)
                    want = t.attention_reference(o, True)
                    report(f"attention + projection {tag} cache 1024 (split + merge)", got, want,
                           *t.ATTN_TOL.get(dtype, t.tolerance(dtype)), t0)
    print(f"{failed} outside tolerance" if failed else "all within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
