"""The CPU-side pieces of bench/gpu_decode.py (the GPU decode benchmark): roofline arithmetic, the results
table and the target verdicts, and result files. The measurement itself needs a GPU (bench/bench_triton.py)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import gpu_decode as g  # noqa: E402

BW = 3.0e12  # bytes/s, a round H100-like number


def test_weight_bytes_match_the_parameter_counts():
    """GPT-2 124M reads 123.65 M parameters per token (ANCHORS.md: 12 blocks, ln_f, wte once as lm_head);
    1.5B: 48 blocks of 12 C^2 + 13 C, C = 1600, plus 2 C and 50,257 C."""
    assert g.weight_bytes("124M", "fp32") == 4 * 123_653_376
    assert g.weight_bytes("1.5B", "bf16") == 48 * (12 * 1600 ** 2 * 2 + 13 * 1600 * 4) + 2 * 1600 * 4 + 50257 * 1600 * 2
    # bf16 halves the matrices only
    n_layer, C, _ = g.SIZES["355M"]
    small = 4 * (n_layer * 13 * C + 2 * C)
    assert g.weight_bytes("355M", "bf16") - small == (g.weight_bytes("355M", "fp32") - small) // 2
    # int4: 4 bits a matrix entry plus an fp32 scale per 64; its lm_head (wte) int8
    assert g.weight_bytes("124M", "int4") == 12 * (12 * 768 ** 2 * 9 // 16 + 13 * 768 * 4) + 2 * 768 * 4 + 50257 * 768


def test_roofline_rate_and_percentages():
    kv = g.kv_bytes("124M", batch=8, context=96.5, itemsize=4)
    assert kv == 2 * 12 * 8 * 96.5 * 768 * 4
    row = g.make_row("124M", "fp32", 8, "triton", step_seconds=0.5e-3, bandwidth=BW, prompt=32, new_tokens=128)
    roof = 8 * BW / (g.weight_bytes("124M", "fp32") + kv)
    assert row.roofline_tokens_per_s == pytest.approx(roof)
    assert row.tokens_per_s == pytest.approx(16_000) and row.ms_per_token == pytest.approx(0.5)
    assert row.roofline_pct == pytest.approx(100 * 16_000 / roof)
    ours = g.make_row("124M", "bf16", 8, "triton", 1e-3, BW, 32, 128)  # bf16 files keep a bf16 KV cache
    assert ours.roofline_tokens_per_s == pytest.approx(
        8 * BW / (g.weight_bytes("124M", "bf16") + g.kv_bytes("124M", 8, 96.5, 2)))
    hf = g.make_row("124M", "bf16", 8, "hf-eager", 1e-3, BW, 32, 128)  # HF's KV cache is in the model dtype
    assert hf.roofline_tokens_per_s == pytest.approx(
        8 * BW / (g.weight_bytes("124M", "bf16") + g.kv_bytes("124M", 8, 96.5, 2)))


def _rows():
    return [g.make_row("124M", "bf16", 1, "hf-eager", 10e-3, BW, 32, 128),
            g.make_row("124M", "bf16", 1, "hf-compile", 2.5e-3, BW, 32, 128),
            g.make_row("124M", "bf16", 1, "triton", 0.16e-3, BW, 32, 128, first_seconds=4.25e-3),
            g.make_row("1.5B", "bf16", 8, "hf-compile", None, BW, 32, 128, error="RuntimeError: out of memory"),
            g.make_row("1.5B", "bf16", 8, "triton", 1.5e-3, BW, 32, 128)]


def test_table_and_verdicts():
    table = g.format_table(_rows()).splitlines()
    assert table[0].startswith("| size | dtype | batch | system | ms/token | tokens/s | % of HBM roofline")
    assert table[0].endswith("| vs best torch | TTFT ms |")
    assert table[4] == ("| 124M | bf16 | 1 | triton | 0.160 | 6,250 | "
                        f"{_rows()[2].roofline_pct:.1f}% | 15.62x | 4.25 |")  # 6,250 / 400 tokens/s (hf-compile)
    assert "failed: RuntimeError: out of memory" in table[5]
    assert table[6].endswith("| - | - |")  # no torch row to compare with, no TTFT measured
    v = g.verdicts(_rows())
    assert v[0].startswith("124M bf16 batch 1: 6,250 tokens/s, 15.62x best torch -> PASS")
    pct = _rows()[4].roofline_pct
    assert v[1] == f"1.5B bf16 batch 8: {pct:.1f}% of roofline -> {'PASS' if pct >= 75 else 'FAIL'} (target >= 75%)"


def test_save_names_the_device(tmp_path):
    meta = dict(device="NVIDIA H100 80GB HBM3", bandwidth_GBps=3000.0, torch="2.11", prompt=32, new_tokens=128,
                repeats=3, date="2025-01-02 03:04")
    md = g.save(_rows(), meta, str(tmp_path))
    assert os.path.basename(md) == "gpu_decode-nvidia-h100-80gb-hbm3-2025-01-02.md"
    assert "NVIDIA H100 80GB HBM3" in open(md).read()
    data = json.load(open(md[:-3] + ".json"))
    assert data["meta"]["device"] == meta["device"] and len(data["rows"]) == 5
    assert data["rows"][2]["tokens_per_s"] == pytest.approx(6250)


def test_decode_steps_feed_back_the_greedy_tokens(rt_odd):
    """The step loop the benchmark times ("triton-step") makes generate()'s greedy tokens (run here on the cpu
    backend: the loop is the same on every backend; on a GPU each step is one graph replay)."""
    import aigc_rt
    m = aigc_rt.load(rt_odd[0], backend="cpu")
    ids = torch.randint(0, m.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    want = [c.token_ids for c in m.generate(ids.tolist(), max_new_tokens=6, eos_token_id=[])]
    state = g.decode_steps(m, ids, 6)
    assert state.tokens.tolist() == [w[-1] for w in want] and state.positions.tolist() == [10, 10]


def test_hf_rows_of_earlier_runs_are_reused(tmp_path):
    """--reuse-hf: HF rows of earlier result files of the same device and software stand in for a new
    measurement (newest first); our rows, failed rows, rows reused in turn, other devices or versions never."""
    def write(name, date, rows, device="NVIDIA H200", transformers=None):
        meta = dict(device=device, torch="2.11.0+cu130", prompt=32, new_tokens=128, date=date,
                    **({"transformers": transformers} if transformers else {}))
        (tmp_path / name).write_text(json.dumps(dict(meta=meta, rows=rows)))

    def row(system, ms, **extra):
        return {**dict(size="124M", dtype="bf16", batch=1, system=system, ms_per_token=ms), **extra}
    write("gpu_decode-a.json", "2026-11-29 22:34", [row("hf-eager", 5.2), row("hf-compile", 1.4, ttft_ms=9.0),
                                                     row("triton", 0.8), row("hf-eager", None, batch=8)])
    write("gpu_decode-b.json", "2026-12-01 10:00", [row("hf-eager", 5.0), row("hf-compile", 1.1, reused="x")])
    write("gpu_decode-c.json", "2026-12-02 10:00", [row("hf-eager", 1.0)], device="NVIDIA H100 80GB HBM3")
    write("gpu_decode-d.json", "2026-12-03 10:00", [row("hf-eager", 2.0)], transformers="4.0")
    meta = dict(device="NVIDIA H200", torch="2.11.0+cu130", transformers="5.17.0", prompt=32, new_tokens=128)
    found = g.reusable_hf_rows(str(tmp_path), meta)
    assert set(found) == {("124M", "bf16", 1, "hf-eager"), ("124M", "bf16", 1, "hf-compile")}
    assert found[("124M", "bf16", 1, "hf-eager")][0]["ms_per_token"] == 5.0  # the newer run
    r, date = found[("124M", "bf16", 1, "hf-compile")]
    assert (r["ms_per_token"], date) == (1.4, "2026-11-29")
    line = g.format_table([g.make_row("124M", "bf16", 1, "hf-compile", 1.4e-3, BW, 32, 128, None, 9e-3,
                                      reused=date)]).splitlines()[-1]
    assert line.startswith("| 124M | bf16 | 1 | hf-compile (run of 2026-11-29) | 1.400 |") and line.endswith("| 9.00 |")
    assert g.reusable_hf_rows(str(tmp_path / "missing"), meta) == {}


def test_profile_tuning_rows():
    """bench/gpu_profile.py's report of what a run tuned: each shape's fastest candidates first, described in a
    few words, and each pick's choices by time; a row once."""
    import triton
    import gpu_profile as p
    plain = triton.Config(dict(BLOCK_N=8, BLOCK_K=512, PREFETCH=False, PERSISTENT=0), num_warps=4)
    persistent = triton.Config(dict(BLOCK_N=8, BLOCK_K=1024, PREFETCH=False, PERSISTENT=4), num_warps=4)
    piped = triton.Config(dict(BLOCK_N=16, BLOCK_K=256, PREFETCH=True, PERSISTENT=0, STAGES=3), num_warps=8)
    tile = triton.Config(dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=4, PREFETCH=False), num_warps=4,
                         num_stages=4)
    log = {("_gemv_kernel", (50257, 768, "torch.float32", "torch.bfloat16")):
           {plain: [0.0335, 0.033, 0.034], persistent: [0.0201, 0.02, 0.021], piped: 0.0241},
           ("_linear_kernel", (3072, 768, "torch.float32", "torch.bfloat16")): {tile: [0.0208, 0.02, 0.021]}}
    picks = {("attn_block", "TritonBackend", 1, 12, 192, 64, torch.bfloat16): dict(composed=1.2e-2, fused=1.4e-2,
                                                                                    wide=9.5e-3),
             (8, 3072, 768, torch.bfloat16, True): dict(gemm=2.08e-2, gemv=1.1e-2)}
    done = set()
    rows = p.tuning_rows(log, picks, done, top=2)
    assert rows[0] == ("| _gemv_kernel | 50257 x 768 bfloat16 | 8 x 1024, 4 warps, persistent 4/SM: 20.1 us; "
                       "16 x 256, 8 warps, pipelined 3, L2 prefetch: 24.1 us | 3 |")
    assert rows[1] == ("| _linear_kernel | 3072 x 768 bfloat16 | 16 x 32 x 128, 4 warps, 4 stages, split-K 4: "
                       "20.8 us | 1 |")
    assert rows[2] == ("| attn_block (pick) | 1, 12, 192, 64, bfloat16 | wide: 9.5 us; composed: 12.0 us; "
                       "fused: 14.0 us | 3 |")
    assert rows[3] == "| linear (pick) | M=8 3072 x 768 bfloat16 +LN | gemv: 11.0 us; gemm: 20.8 us | 2 |"
    assert p.tuning_rows(log, picks, done) == [], "rows repeated"
