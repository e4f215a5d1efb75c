"""DCGAN generators and discriminators, images/s and GFLOP/s in one run: torch eager, torch.compile (default, and
with inductor's freezing pass) and aigc_rt's cpu backend on the CPU, and aigc_rt's bf16 files against the module
in bf16; on a GPU (when there is one) Triton vs cuDNN (torch eager) and torch.compile, and bf16 files on Triton's
bf16 tensor-core convolutions vs the module in bf16 (batch 64 and 1024). The 32x32 seed generator
(0.036 GFLOP/image) and discriminator (0.035), the 64x64 tutorial generator (0.209) and discriminator (0.208),
batch 1 and 64, random weights with non-trivial BatchNorm statistics (the runtime folds them; torch runs the
eval-mode module). A generator maps z (N, 100, 1, 1) to images, a discriminator images (N, 3, S, S) in [-1, 1] to
probabilities (N,).

    flock -x /tmp/aigc_rt-quiet.lock .venv/bin/python -m pytest bench/bench_gan.py --benchmark-enable

Every runtime is checked against the eval-mode fp32 module (fp32: atol 1e-4; bf16: atol 0.05) before it is timed;
the systems of an arch and batch are then timed in turns (bench_images.time_in_turns: round-robin, 9 rounds).
At the end the run prints the tables (median images/s, GFLOP/s, ratios to eager and to torch.compile; bf16 to
the module in bf16 and to both fp32 runs) and writes them to bench/results/gan_<device>.md.
"""
from __future__ import annotations

import copy
import datetime
import os
import sys

import pytest
import torch

import aigc_rt
from aigc_rt import bench, bench_images

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
from dcgan_reference import (gflop_per_image, randomize_batchnorm, seed_discriminator, seed_generator,  # noqa: E402
                             tutorial_discriminator, tutorial_generator)

ARCHS = {"seed32": seed_generator, "tutorial64": tutorial_generator,
         "seed32_d": seed_discriminator, "tutorial64_d": tutorial_discriminator}
IMAGE_SIZE = {"seed32_d": 32, "tutorial64_d": 64}  # the discriminators' input
BATCHES = (1, 64)
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
RESULTS: dict[tuple[str, str, str, int], float] = {}  # (device, impl, arch, batch) -> median seconds per call


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (eval-mode torch module, runtime file)."""
    out = {}
    for i, (name, make) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        module = randomize_batchnorm(make(), seed=i)
        folder = tmp_path_factory.mktemp(name)
        torch.save(module.state_dict(), folder / "m.pt")
        out[name] = (module, {dtype: aigc_rt.convert(folder / "m.pt", folder / f"m-{dtype}.safetensors", dtype=dtype)
                              for dtype in ("fp32", "bf16")})
    return out


def _input(arch: str, batch: int) -> torch.Tensor:
    """z (batch, 100, 1, 1) for a generator, images (batch, 3, S, S) in [-1, 1] for a discriminator."""
    g = torch.Generator().manual_seed(batch)
    if arch in IMAGE_SIZE:
        return torch.rand(batch, 3, IMAGE_SIZE[arch], IMAGE_SIZE[arch], generator=g) * 2 - 1
    return torch.randn(batch, 100, 1, 1, generator=g)


def _runner(impl: str, module, paths, device, z):
    """-> the module's forward for the implementation (compiled ones compile for z's shape here): z -> images for a
    generator, images -> probabilities for a discriminator (aigc_rt's Discriminator is called as score)."""
    if impl == "eager":
        return module.to(device)
    if impl == "eager-bf16":  # the module in bf16 (oneDNN's bf16 convolutions), fed and read in fp32
        bf16 = copy.deepcopy(module).to(device, torch.bfloat16)
        return lambda x: bf16(x.bfloat16()).float()
    if impl == "compile":
        return torch.compile(module.to(device), dynamic=False)
    if impl == "compile-freezing":  # inductor's freezing pass: BatchNorm folded, weights prepacked (oneDNN)
        torch._dynamo.reset()  # else dynamo hands back the graph "compile" made for the same forward, unfrozen
        compiled = torch.compile(copy.deepcopy(module).to(device), dynamic=False)
        with torch._inductor.config.patch(freezing=True), torch.inference_mode():
            compiled(z)  # the config is read when the graph compiles, at the first call
        return compiled
    path = paths["bf16" if impl.endswith("bf16") else "fp32"]
    if impl.startswith("aigc_rt-cpu"):
        return aigc_rt.load(path, backend="cpu")
    return aigc_rt.load(path, device=device, backend="triton")


def _bench(request, models, impls: tuple[str, ...], arch: str, batch: int, device: str):
    """Check every implementation against the fp32 module, then (benchmarks enabled) time them in turns."""
    module, paths = models[arch]
    z = _input(arch, batch).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runners = {}
    with torch.inference_mode():
        want = module.to(device)(z)
        for impl in impls:  # compile-freezing after compile: its dynamo reset makes compile recompile once (warm-up)
            run = runners[impl] = _runner(impl, module, paths, device, z)
            got = run(z)  # also the compile / autotune warm-up
            atol, rtol = (0.05, 0) if impl.endswith("bf16") else (1e-4, 1e-5)  # bf16: vs the fp32 module
            assert torch.allclose(got, want, atol=atol, rtol=rtol), \
                f"{impl}: max abs err {(got - want).abs().max():.3g}"
        if bench_images.benchmarks_enabled(request.config):
            for impl, seconds in bench_images.time_in_turns(runners, (z,), sync).items():
                RESULTS[(device, impl, arch, batch)] = seconds


CPU_IMPLS = ("eager", "compile", "compile-freezing", "aigc_rt-cpu", "eager-bf16", "aigc_rt-cpu-bf16")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cpu_dcgan(request, models, arch, batch):
    _bench(request, models, CPU_IMPLS, arch, batch, "cpu")


# impl -> the batches it runs at on a GPU (bf16 files: where a batch is compute-bound)
GPU_IMPLS = {**{impl: BATCHES + (1024,) for impl in ("eager", "compile", "triton")},
             **{impl: (64, 1024) for impl in ("eager-bf16", "triton-bf16")}}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("batch", BATCHES + (1024,))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_gpu_dcgan(request, models, arch, batch):
    _bench(request, models, tuple(i for i, batches in GPU_IMPLS.items() if batch in batches), arch, batch, "cuda")


def _table(device: str) -> str:
    ours = "aigc_rt-cpu" if device == "cpu" else "triton"
    impls = ("eager", "compile", "compile-freezing", ours) if device == "cpu" else ("eager", "compile", ours)
    return _rows(device, impls, [(ours, i) for i in impls[:-1]])


def _bf16_table(device: str) -> str:
    """bf16 files on the cpu (triton) backend against torch's module in bf16, and against both fp32 runs."""
    ours = "aigc_rt-cpu" if device == "cpu" else "triton"
    return _rows(device, ("eager-bf16", f"{ours}-bf16"), [(f"{ours}-bf16", "eager-bf16"), (f"{ours}-bf16", "eager"),
                                                          (f"{ours}-bf16", ours)])


def _rows(device: str, impls: tuple[str, ...], ratios: list[tuple[str, str]]) -> str:
    """images/s (GFLOP/s) per impl, then the speed ratios a / b, per arch and batch."""
    rows = [(arch, batch, gflop_per_image(make())) for arch, make in ARCHS.items()
            for batch in BATCHES + ((1024,) if device == "cuda" else ())]
    seconds = {key[1:]: t for key, t in RESULTS.items() if key[0] == device}
    return bench_images.ratio_table("arch", rows, impls, ratios, seconds)


def teardown_module():
    for device in ("cpu", "cuda"):
        table = _table(device)
        if not table:
            continue
        name = bench.device_name(device)
        text = (f"# DCGAN generators and discriminators (_d) on {name}\n\n{datetime.date.today()}, torch "
                f"{torch.__version__}, {torch.get_num_threads()} threads, fp32, median of 9 round-robin turns "
                f"(bench/bench_gan.py).\n\n{table}\n")
        bf16 = _bf16_table(device)
        if bf16:
            text += (f"\nbf16 files (bf16 weights, each layer's input rounded to bf16, fp32 sums) against torch's "
                     f"module in bf16 and both fp32 runs:\n\n{bf16}\n")
        print("\n" + text)
        bench.save_markdown(text, os.path.join(os.path.dirname(__file__), "results"), "gan", device)
