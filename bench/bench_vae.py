"""PyTorch's examples/vae (MNIST, 784 -> 400 -> 20 -> 400 -> 784), images/s in one run: torch eager, torch.compile and
aigc_rt's cpu backend (fp32, bf16 and int8 files; the bf16 file also against the module in bf16) on the CPU; on a GPU
(when there is one) Triton vs torch eager and torch.compile. Two jobs, each as the example runs it:

- decode: z (N, 20) -> images, the sigmoid means (the example's `model.decode(torch.randn(64, 20))` sampling step);
- elbo: images (N, 1, 28, 28) in [0, 1] -> each image's ELBO (the example's test loop: forward, then loss_function
  per image, -BCE(sum) - KLD) on given draws eps, so every system computes the same numbers.

    flock -x /tmp/aigc_rt-quiet.lock .venv/bin/python -m pytest bench/bench_vae.py --benchmark-enable

Every runtime is checked against the fp32 module before it is timed (fp32: atol 1e-4 on pixel means, rtol 1e-4 on
the ELBO; bf16 / int8: `aigc-rt validate`'s tolerances); then the systems of a job and batch are timed in turns
(round-robin, 9 rounds; this shared machine's neighbours otherwise skew whichever system runs while they do). At the
end the run prints the table (median images/s, GFLOP/s, ratios to eager and torch.compile) and writes it to
bench/results/vae_<device>.md. Without --benchmark-enable the checks alone run.
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
from vae_reference import ExamplesVAE, loss_function  # noqa: E402
from aigc_rt.cli import VALIDATE_TOL

D, H, L = 784, 400, 20
BATCHES = {"decode": (1, 64), "elbo": (1, 128, 1024)}  # the example samples 64 images and tests in batches of 128
GFLOP = {"decode": 2 * (L * H + H * D) / 1e9, "elbo": 2 * (D * H + H * 2 * L + L * H + H * D) / 1e9}
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
RESULTS: dict[tuple[str, str, str, int], float] = {}  # (device, impl, job, batch) -> median seconds per call


class BenchVAE(ExamplesVAE):
    def elbo(self, x, eps):  # the example's test loop per image: forward, then -loss_function (eps given)
        recon, mu, logvar = self(x, eps[0])
        return -loss_function(recon, x, mu, logvar, reduction="none")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """(eval-mode module, {dtype: runtime file})."""
    torch.manual_seed(0)
    module = BenchVAE(D, H, L).eval()
    folder = tmp_path_factory.mktemp("vae")
    torch.save(module.state_dict(), folder / "vae.pt")
    return module, {dtype: aigc_rt.convert(folder / "vae.pt", folder / f"vae-{dtype}.safetensors", dtype=dtype)
                    for dtype in ("fp32", "bf16", "int8")}


def _inputs(job: str, batch: int, device: str) -> tuple[torch.Tensor, ...]:
    """decode: (z,); elbo: (images, eps (1, batch, L)), eps what aigc_rt's elbo(seed=batch) draws."""
    g = torch.Generator().manual_seed(batch)
    if job == "decode":
        return (torch.randn(batch, L, generator=g).to(device),)
    x = (torch.rand(batch, 1, 28, 28, generator=g) > 0.7).float()  # binarised, as MNIST is for a Bernoulli VAE
    return x.to(device), torch.randn(1, batch, L, generator=torch.Generator().manual_seed(batch)).to(device)


def _runner(impl: str, job: str, module, paths, device: str):
    """-> a function of _inputs(job, ...) -> (N, D) pixel means (decode) or (N,) ELBO."""
    if impl.startswith("aigc_rt") or impl.startswith("triton"):
        dtype = impl.rsplit("-", 1)[1] if impl.count("-") > (1 if impl.startswith("aigc_rt") else 0) else "fp32"
        m = aigc_rt.load(paths[dtype], device=device, backend="cpu" if impl.startswith("aigc_rt") else "triton")
        if job == "decode":
            return lambda z: m.decode(z).reshape(-1, D)
        return lambda x, eps: m.elbo(x, seed=x.shape[0])
    if impl == "eager-bf16":  # the module in bf16 (oneDNN's bf16 GEMMs), fed and read in fp32
        bf16 = copy.deepcopy(module).to(device, torch.bfloat16)
        if job == "decode":
            return lambda z: bf16.decode(z.bfloat16()).float()
        return lambda x, eps: bf16.elbo(x.bfloat16(), eps.bfloat16()).float()
    fn = module.to(device).decode if job == "decode" else module.to(device).elbo
    return torch.compile(fn, dynamic=False) if impl == "compile" else fn


def _bench(request, vae, impls: tuple[str, ...], job: str, batch: int, device: str):
    """Check every implementation against the fp32 module, then (benchmarks enabled) time them in turns."""
    module, paths = vae
    inputs = _inputs(job, batch, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runners = {}
    with torch.inference_mode():
        want = getattr(module.to(device), job)(*inputs)
        for impl in impls:
            run = runners[impl] = _runner(impl, job, module, paths, device)
            got = run(*inputs)  # also the compile warm-up
            dtype = next((d for d in ("bf16", "int8") if impl.endswith(d)), "fp32")
            atol, rtol = (ATOL if job == "decode" else 0, ELBO_RTOL) if dtype == "fp32" else VALIDATE_TOL[dtype]
            err = (got - want).abs().max().item()
            assert err <= atol + rtol * want.abs().max().item(), f"{impl} {job}: max abs err {err:.3g}"
        if bench_images.benchmarks_enabled(request.config):
            for impl, seconds in bench_images.time_in_turns(runners, inputs, sync).items():
                RESULTS[(device, impl, job, batch)] = seconds


ATOL, ELBO_RTOL = 1e-4, 1e-4  # the ELBO: the module's float32 BCE loses digits where sigmoid nears 1 (see the tests)
CPU_IMPLS = ("eager", "compile", "aigc_rt-cpu", "eager-bf16", "aigc_rt-cpu-bf16", "aigc_rt-cpu-int8")
GPU_IMPLS = ("eager", "compile", "triton")


@pytest.mark.parametrize("job,batch", [(j, b) for j, bs in BATCHES.items() for b in bs])
def test_cpu_vae(request, vae, job, batch):
    _bench(request, vae, CPU_IMPLS, job, batch, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("job,batch", [(j, b) for j, bs in BATCHES.items() for b in bs])
def test_gpu_vae(request, vae, job, batch):
    _bench(request, vae, GPU_IMPLS, job, batch, "cuda")


def _table(device: str) -> str:
    impls = CPU_IMPLS if device == "cpu" else GPU_IMPLS
    ours = [i for i in impls if i.startswith(("aigc_rt", "triton"))]
    ratios = [(o, base) for o in ours for base in ("eager", "compile")] + \
        ([("aigc_rt-cpu-bf16", "eager-bf16")] if device == "cpu" else [])
    rows = [(job, batch, GFLOP[job]) for job, batches in BATCHES.items() for batch in batches]
    seconds = {key[1:]: t for key, t in RESULTS.items() if key[0] == device}
    return bench_images.ratio_table("job", rows, impls, ratios, seconds, digits=1)


def teardown_module():
    for device in ("cpu", "cuda"):
        table = _table(device)
        if not table:
            continue
        name = bench.device_name(device)
        text = (f"# PyTorch examples/vae (784-400-20) on {name}\n\n{datetime.date.today()}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads, median of 9 round-robin turns (bench/bench_vae.py). decode: z "
                f"-> pixel means; elbo: images -> ELBO per image (encoder, one draw of z, decoder, the Bernoulli "
                f"log-likelihood and the KL term). bf16 / int8: aigc_rt files of those weight dtypes; eager-bf16: the "
                f"module in bf16.\n\n{table}\n")
        print("\n" + text)
        bench.save_markdown(text, os.path.join(os.path.dirname(__file__), "results"), "vae", device)
