"""`aigc-rt bench --model FILE` for image models (DCGAN generators and discriminators, VAEs): images/s, ms per
batch and GFLOP/s of one runtime file on one backend, median of timed calls after a warm-up. The side-by-side
comparison with torch eager and torch.compile is bench/bench_gan.py (it needs the torch modules)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .config import VAEConfig
from .models.vae import layer_names


@dataclass
class ImageResult:
    model: str
    arch: str
    batch: int
    backend: str
    images_per_s: float
    ms_per_batch: float
    gflop_per_s: float


def gflop_per_image(config) -> float:
    """2 x multiply-adds of every (transposed) convolution of a DCGAN generator or discriminator config, or of
    every linear of a VAE's decoder (what generating an image runs)."""
    if isinstance(config, VAEConfig):
        return sum(2 * n_in * n_out for name, n_in, n_out in layer_names(config)
                   if name.startswith("decoder.") or name == "out") / 1e9
    flops, sizes = 0, config.sizes()
    for layer, size_in, size_out in zip(config.layers, sizes, sizes[1:]):
        pixels = size_in if config.transposed else size_out  # each input pixel / each output pixel x the kernel
        flops += 2 * layer.c_in * layer.c_out * layer.kernel ** 2 * pixels ** 2
    return flops / 1e9


def run_image_file(model, name: str, batches=(1, 64), min_calls: int = 10, min_seconds: float = 1.0,
                   log=print) -> list[ImageResult]:
    """model: a loaded DCGAN generator or VAE (times model(z)) or DCGAN discriminator (times model.score(images))."""
    c, results = model.config, []
    gflop = gflop_per_image(c)
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        if model.arch in ("dcgan", "vae"):
            x = torch.randn(batch, model.nz, generator=g).to(model.device)
            call = lambda: model(x)  # noqa: E731
        else:
            x = (torch.rand(batch, c.channels, c.image_size, c.image_size, generator=g) * 2 - 1).to(model.device)
            call = lambda: model.score(x)  # noqa: E731
        call()
        times, start = [], time.perf_counter()
        while len(times) < min_calls or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            call()
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        results.append(ImageResult(name, model.arch, batch, model.backend.name, batch / s, 1e3 * s, batch * gflop / s))
        log(_row(results[-1]))
    return results


HEADER = "| model | arch | batch | backend | images/s | ms/batch | GFLOP/s |\n|---|---|---|---|---|---|---|"


def _row(r: ImageResult) -> str:
    return (f"| {r.model} | {r.arch} | {r.batch} | {r.backend} | {r.images_per_s:.0f} | {r.ms_per_batch:.2f} | "
            f"{r.gflop_per_s:.0f} |")


def table(results: list[ImageResult]) -> str:
    return "\n".join([HEADER, *map(_row, results)])


def ratio_table(first: str, rows: list[tuple[str, int, float]], impls: tuple[str, ...],
                ratios: list[tuple[str, str]], seconds: dict, digits: int = 0) -> str:
    """The side-by-side benchmarks' markdown table (bench/bench_gan.py, bench_vae.py): images/s (GFLOP/s, `digits`
    decimals) per implementation, then the speed ratios a / b (how many times faster a ran than b), one row per
    (label, batch, GFLOP per image) of `rows` that has every time it needs: seconds[(impl, label, batch)] = median
    seconds per call. "" when no row has."""
    out = [f"| {first} | batch | {' | '.join(f'{i} images/s (GFLOP/s)' for i in impls)} | "
           + " | ".join(f"{a} / {b}" for a, b in ratios) + " |", "|---" * (2 + len(impls) + len(ratios)) + "|"]
    for label, batch, gflop in rows:
        t = {i: seconds.get((i, label, batch)) for i in {*impls, *(i for r in ratios for i in r)}}
        if None in t.values():
            continue
        cells = [f"{batch / t[i]:,.0f} ({batch / t[i] * gflop:,.{digits}f})" for i in impls]
        speedups = [f"{t[b] / t[a]:.2f}x" for a, b in ratios]
        out.append(f"| {label} | {batch} | {' | '.join(cells)} | {' | '.join(speedups)} |")
    return "\n".join(out) if len(out) > 2 else ""


def time_in_turns(runners: dict, args: tuple, sync=lambda: None, rounds: int = 9, turn_seconds: float = 0.04,
                  warmups: int = 2) -> dict[str, float]:
    """Median seconds per call of each runner(*args), timed round-robin: `rounds` turns each of ~turn_seconds, so
    that a noisy neighbour on a shared machine slows every system alike rather than one system's whole run (single
    sequential runs swung bench_vae's ratios by up to 30%). `warmups` passes over all runners first: a compiled
    runner may recompile once after another's torch._dynamo.reset()."""
    for _ in range(warmups):
        for run in runners.values():
            run(*args)
    sync()
    calls = {}
    for name, run in runners.items():
        t0 = time.perf_counter()
        run(*args)
        sync()
        calls[name] = max(1, int(turn_seconds / max(time.perf_counter() - t0, 1e-6)))
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                run(*args)
            sync()
            times[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


def benchmarks_enabled(config) -> bool:
    """pytest-benchmark's switch: pyproject's addopts disable benchmarks (the suites then check their systems
    only), --benchmark-enable turns them on."""
    return config.getoption("benchmark_enable") or not config.getoption("benchmark_disable")
