"""CUDA kernels (csrc/cuda, called through aigc_rt/cuda_kernels.py) vs the plain-PyTorch fp32 references of
their Triton counterparts: odd shapes, every weight dtype, each launch configuration, explicit (atol, rtol).

Without a GPU (CI) the kernels run in the CPU emulation of csrc/cuda/emulate.h: the same sources built with g++
into a library whose kernels take CPU tensors (built once per session, ~30 s). With AIGC_RT_GPU=1 on a CUDA
machine the installed nvcc build runs the same tests on the GPU, adding real GPT-2 shapes.
test_cuda_sources_compile compiles the sources for sm_80 / sm_90 with nvcc, GPU or not, and reads ptxas's
register and spill counts.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess

import pytest
import torch

from aigc_rt import cuda_kernels
from aigc_rt.kernels import linear
from test_triton_kernels import (DEV, LINEAR_TOL, NORM_TOL, ON_GPU, ROOT, assert_close, prenorm_operands, randn,
                                 shapes)
from test_triton_kernels import pytestmark  # noqa: F401  (skip without a GPU / TRITON_INTERPRET=1)

CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
HEADERS = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cuh")) + glob.glob(os.path.join(CUDA_DIR, "*.h")))


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    found = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return found if found and os.path.exists(found) else None


def cuda_include_dir() -> str | None:
    """The toolkit's include folder (cuda_bf16.h ...), as nvcc itself reports it."""
    exe = nvcc()
    if exe is None:
        return None
    dry = subprocess.run([exe, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    for path in re.findall(r'-I"?([^"\s]+)', "".join(re.findall(r"INCLUDES=(.*)", dry))):
        if os.path.exists(os.path.join(path, "cuda_bf16.h")):
            return path
    return None


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> cuda_kernels.CudaKernels:
    """On a GPU the installed nvcc build; elsewhere the CPU emulation, built here with g++ (cached by a hash of
    the sources in the pytest temp folder)."""
    if ON_GPU:
        lib = cuda_kernels.library()
        if lib is None or lib.emulated:
            pytest.fail("no GPU build of the CUDA kernels: setup.py builds aigc_rt/_cuda_kernels*.so where nvcc is "
                        "found (or set AIGC_RT_CUDA_LIB)")
        return lib
    include = cuda_include_dir()
    if include is None:
        pytest.skip("the CPU emulation of the CUDA kernels needs the CUDA toolkit's headers (nvcc not found)")
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in SOURCES + HEADERS)).hexdigest()[:16]
    out = tmp_path_factory.getbasetemp() / f"cuda_emulated_{digest}.so"
    if not out.exists():
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-x", "c++",
               "-include", os.path.join(CUDA_DIR, "emulate.h"), f"-I{include}",
               f"-I{os.path.join(ROOT, 'csrc')}", *SOURCES, "-o", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
    lib = cuda_kernels.CudaKernels(str(out))
    assert lib.emulated
    return lib


def cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one triton ships (beside its ptxas)."""
    places = [os.path.dirname(nvcc() or "")]
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        places.append(os.path.dirname(get_ptxas(90).path))
    except Exception:  # no triton, or one that ships no CUDA tools
        pass
    found = [os.path.join(d, "cuobjdump") for d in places if d and os.path.exists(os.path.join(d, "cuobjdump"))]
    return found[0] if found else None


def test_cuda_library_built():
    """Where nvcc is found, setup.py has built csrc/cuda (nvcc, sm_80 and sm_90, no GPU needed) into the library
    aigc_rt loads; no kernel of it spills registers or uses a stack, and each one's static shared memory plus the
    most dynamic shared memory its launches ask for fits the 48 KiB a launch gets without opting in (a launch past
    it fails on a GPU; the emulation has no such limit). From cuobjdump's resource usage."""
    if nvcc() is None:
        pytest.skip("nvcc not found: setup.py builds no CUDA library here")
    path = cuda_kernels.installed_path()
    assert path is not None, "nvcc is here but setup.py built no aigc_rt/_cuda_kernels*.so (see its build output)"
    assert not cuda_kernels.CudaKernels(path).emulated
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump to read the library's resource usage")
    report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    assert {"sm_80", "sm_90"} <= set(re.findall(r"arch = (sm_\d+)", report)), report[:2000]
    kernels_found = [(name, reg, stack, local, shared) for name, reg, stack, shared, local in re.findall(
        r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)]
    assert len(kernels_found) >= 2 * 96, report[:2000]  # every gemv instantiation, for both architectures
    spilling = [name for name, _, stack, local, _ in kernels_found if int(stack) or int(local)]
    assert not spilling, f"kernels with a stack or local memory (spills): {spilling}"
    lib = ctypes.CDLL(path)
    lib.aigc_gemv_max_dynamic_shared.restype = ctypes.c_int64
    dynamic = lib.aigc_gemv_max_dynamic_shared()
    too_much = [(name, int(static)) for name, _, _, _, static in kernels_found
                if "gemv_kernel" in name and int(static) + dynamic > 48 * 1024]
    assert not too_much, f"static + {dynamic} B of dynamic shared memory past 48 KiB: {too_much}"


# (M, N, K): K a multiple of 16 (rows 16-byte aligned: the 16-byte loads) and not (one element at a time); rows of
# x 1, 2, 3 (of 4), 8; 8 rows of K = 1600 fp32 (int8 and fp32 weights) or 6400 bf16 staged in chunks of K
GEMV_SHAPES = shapes([(1, 17, 96), (1, 45, 111), (2, 33, 208), (1, 130, 37), (3, 9, 512), (8, 21, 1600),
                      (5, 19, 6400)],
                     [(1, 2304, 768), (1, 6400, 1600), (1, 1600, 6400), (1, 50257, 768), (8, 1600, 6400),
                      (8, 4800, 1600)])


@pytest.mark.parametrize("M,N,K", GEMV_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8],
                         ids=["fp32", "bf16", "fp16", "int8"])
def test_gemv(kernels, M, N, K, dtype):
    """y = act(x W^T + b), LayerNorm(x) first, residual += y: each against linear.reference, over the launch
    configurations (rows per warp, warps per block) that split the rows differently, one with the weights
    prefetched into L2 first (on Hopper; elsewhere the flag changes nothing)."""
    x, w, scale, b, norm, r0 = prenorm_operands(M, N, K, dtype)
    for rows_per_warp, warps, prefetch in ((0, 0, False), (1, 1, False), (4, 8, True)):
        launch = dict(rows_per_warp=rows_per_warp, warps=warps, prefetch=prefetch)
        what = f"gemv {M}x{N}x{K} {dtype} {launch}"
        for act in ("gelu_tanh", "relu"):
            assert_close(kernels.gemv(x, w, b, act, scale=scale, **launch),
                         linear.reference(x, w, b, act, scale=scale), *LINEAR_TOL, f"{act} {what}")
        assert_close(kernels.gemv(x, w, None, scale=scale, norm=norm, **launch),
                     linear.reference(x, w, None, scale=scale, norm=norm), *NORM_TOL.get(dtype, LINEAR_TOL),
                     f"LayerNorm {what}")
        r = r0.clone()
        assert kernels.gemv(x, w, b, scale=scale, residual=r, **launch) is r
        assert_close(r, linear.reference(x, w, b, scale=scale, residual=r0), *LINEAR_TOL, f"residual {what}")


@pytest.mark.skipif(ON_GPU, reason="on a GPU the real clock picks (the cuda backend's tests tune every shape)")
def test_gemv_autotune(kernels, monkeypatch):
    """tune=True times every candidate the first time a shape comes (a fake clock here, on which the fourth is
    fastest), keeps that choice for the shape, and leaves the residual it adds into as one launch would."""
    x, w, b, r0 = randn(1, 64, seed=1), randn(24, 64, seed=2), randn(24, seed=3), randn(1, 24, seed=4)
    timed = []

    def fake_timer(fn):
        fn()
        timed.append(fn)
        return 0.5 if len(timed) == 4 else 1.0
    monkeypatch.setattr(kernels, "timer", fake_timer)
    monkeypatch.setattr(kernels, "gemv_configs", {})
    r = r0.clone()
    for _ in range(2):  # the second call reuses the choice
        want = linear.reference(x, w, b, residual=r)
        kernels.gemv(x, w, b, residual=r, tune=True)
        assert_close(r, want, *LINEAR_TOL, "tuned gemv into the residual")
    assert len(timed) == len(cuda_kernels.GEMV_CANDIDATES)
    assert list(kernels.gemv_configs.values()) == [(*cuda_kernels.GEMV_CANDIDATES[3], False)]


def test_gemv_errors(kernels):
    x, w = randn(1, 8, seed=1), randn(5, 8, seed=2)
    cases = [
        (dict(rows_per_warp=3), "rows_per_warp must be"),
        (dict(warps=9), "warps in"),
        (dict(act="gelu"), "act must be one of"),
        (dict(norm=(x[0], x[0], 0.0)), "norm eps must be > 0"),
        (dict(residual=torch.zeros(1, 4, device=DEV)), r"residual must be a contiguous \(1, 5\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            kernels.gemv(x, w, **kwargs)
    with pytest.raises(ValueError, match="scale is required for int8"):
        kernels.gemv(x, w.to(torch.int8))
    assert not kernels.gemv_takes(torch.zeros(9, 8, device=DEV), w)
    with pytest.raises(ValueError, match="at most 8 rows"):
        kernels.gemv(torch.zeros(9, 8, device=DEV), w)
    other = torch.device("cuda" if kernels.emulated else "cpu")
    if other.type == "cpu" or torch.cuda.is_available():
        with pytest.raises(ValueError, match="this build of the CUDA kernels"):
            kernels.gemv(x.to(other), w.to(other))


def test_cuda_backend_greedy_tokens_identical_to_hf(kernels, rt_odd, monkeypatch):
    """The `cuda` backend end to end on the tiny GPT-2 (conftest's "odd" config): at batch 1 every decode linear
    runs the CUDA GEMV (counted; the sub-layers as linears, not the fused Triton kernels it may pick otherwise), and
    the greedy continuation is Hugging Face's token for token. On a GPU the decode step is captured in a CUDA graph
    with the GEMV's launches in it."""
    import aigc_rt
    from aigc_rt.backends import triton_backend
    monkeypatch.setattr(triton_backend, "FUSED_MLP", False)
    monkeypatch.setattr(triton_backend, "FUSED_ATTN_PROJ", False)
    monkeypatch.setattr(triton_backend, "FUSED_QKV", False)
    monkeypatch.setattr(cuda_kernels, "library", lambda: kernels)
    calls = []
    gemv = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a, **k: calls.append(1) or gemv(*a, **k))
    m = aigc_rt.load(rt_odd[0], device=DEV, backend="cuda")
    assert m.backend.name == "cuda"
    hf = rt_odd[1]
    hf.generation_config.eos_token_id = None  # compare full-length continuations
    ids = m.tokenizer.encode("Beautiful is")
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert m.generate(ids, max_new_tokens=6)[0].token_ids == want.tolist()
    n_layer = hf.config.n_layer
    assert len(calls) >= 5 * (4 * n_layer + 1), f"{len(calls)} CUDA GEMV calls for 5 decode steps"


def test_cuda_backend_batch_matches_torch_backend(kernels, rt_odd, monkeypatch):
    """A batch of three prompts of different lengths: the decode linears take the GEMV with 3 rows of x (one
    pass over each weight), then with fewer once a sequence stops at its eos token and the batch is compacted;
    the tokens are the torch backend's (the reference)."""
    import aigc_rt
    monkeypatch.setattr(cuda_kernels, "library", lambda: kernels)
    rows = []
    gemv = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda x, *a, **k: rows.append(x.numel() // x.shape[-1]) or gemv(x, *a, **k))
    m = aigc_rt.load(rt_odd[0], device=DEV, backend="cuda")
    reference = aigc_rt.load(rt_odd[0], backend="torch")
    prompts = ["Beautiful is", "落霞与孤鹜齐飞", "def main():"]
    full = [c.token_ids for c in reference.generate(prompts, max_new_tokens=5, eos_token_id=[])]
    eos = full[1][2]  # the second sequence stops at its third token (or earlier, if it made that token before)
    want = [c.token_ids for c in reference.generate(prompts, max_new_tokens=5, eos_token_id=eos)]
    assert [c.token_ids for c in m.generate(prompts, max_new_tokens=5, eos_token_id=eos)] == want
    assert 3 in rows and min(rows) < 3, sorted(set(rows))


def test_cuda_backend_runs_the_transformer_decoder(kernels, tmp_path, monkeypatch):
    """The seed Transformer decoder on the cuda backend: every decode linear on the GEMV, the feed-forward's with
    its ReLU epilogue; the greedy tokens are the torch backend's."""
    import aigc_rt
    from test_transformer_decoder import make_checkpoint
    monkeypatch.setattr(cuda_kernels, "library", lambda: kernels)
    acts = []
    gemv = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a, **k: acts.append(a[3] if len(a) > 3 else k.get("act"))
                        or gemv(*a, **k))
    make_checkpoint(tmp_path)
    path = aigc_rt.convert(tmp_path / "model.pt", tmp_path / "m.safetensors", config={"n_head": 3})
    m = aigc_rt.load(path, device=DEV, backend="cuda")
    want = aigc_rt.load(path, backend="torch").generate(["abc", "落霞与"], max_new_tokens=4)
    assert [c.token_ids for c in m.generate(["abc", "落霞与"], max_new_tokens=4)] == [c.token_ids for c in want]
    assert acts.count("relu") >= 3 * 2, acts  # 3 decode steps x 2 layers (at least: the prefill adds none)


def test_cuda_backend_runs_the_lstm(kernels, tmp_path, monkeypatch):
    """The seed LSTM on the cuda backend: its decode linears on the GEMV (the hidden-state one adding into the
    gates in its epilogue), the cell on kernels/lstm.py; the greedy tokens are the torch backend's."""
    import aigc_rt
    from test_lstm import make_checkpoint
    monkeypatch.setattr(cuda_kernels, "library", lambda: kernels)
    calls = []
    gemv = kernels.gemv
    monkeypatch.setattr(kernels, "gemv", lambda *a, **k: calls.append(k.get("residual") is not None) or gemv(*a, **k))
    make_checkpoint(tmp_path)
    path = aigc_rt.convert(tmp_path / "model.pt", tmp_path / "m.safetensors")
    m = aigc_rt.load(path, device=DEV, backend="cuda")
    want = aigc_rt.load(path, backend="torch").generate(["abc", "落霞与"], max_new_tokens=4)
    assert [c.token_ids for c in m.generate(["abc", "落霞与"], max_new_tokens=4)] == [c.token_ids for c in want]
    assert calls.count(True) >= 3 * 3, calls  # 3 decode steps x 3 layers: h W_hh^T added into the gates


@pytest.mark.skipif(ON_GPU, reason="on a GPU the real clock decides (test_cuda_backend_greedy_tokens_identical_to_hf)")
def test_cuda_backend_keeps_the_faster_linear(kernels, rt_odd, monkeypatch):
    """On a GPU the backend times the CUDA GEMV against the Triton linear the first time a shape comes and keeps
    the faster. With a clock on which the Triton linear is the faster (as if on a GPU, here in the emulation),
    every decode linear takes it, and the tokens are still HF's: the timed runs left the residual stream as it
    was. (The sub-layers as linears: the fused Triton kernels have no CUDA GEMV to time.)"""
    import aigc_rt
    from aigc_rt.backends import triton_backend
    monkeypatch.setattr(triton_backend, "FUSED_MLP", False)
    monkeypatch.setattr(triton_backend, "FUSED_ATTN_PROJ", False)
    monkeypatch.setattr(triton_backend, "FUSED_QKV", False)
    monkeypatch.setattr(cuda_kernels, "library", lambda: kernels)
    monkeypatch.setattr(kernels, "timer", lambda fn: (fn(), 1.0 if fn.__name__ == "triton" else 2.0)[1])
    m = aigc_rt.load(rt_odd[0], device=DEV, backend="cuda")
    m.backend.tune = True
    hf = rt_odd[1]
    hf.generation_config.eos_token_id = None
    ids = m.tokenizer.encode("def main():")
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert m.generate(ids, max_new_tokens=4)[0].token_ids == want.tolist()
    # qkv, proj, fc, mlp_proj (the 3 blocks alike) and lm_head: (N, K) of each linear timed
    assert {key[1:3] for key in m.backend.choices} == {(288, 96), (96, 96), (384, 96), (96, 384), (1000, 96)}
    assert not any(m.backend.choices.values())


def test_cuda_backend_needs_the_kernels(monkeypatch):
    from aigc_rt.backends import get_backend
    monkeypatch.setattr(cuda_kernels, "library", lambda: None)
    with pytest.raises(ValueError, match="needs aigc_rt's CUDA kernels"):
        get_backend("cuda", DEV)
