"""GPT-2 decode benchmark as a pytest-benchmark suite: the systems and code of `aigc-rt bench`
(aigc_rt/bench.py), one group per model size and batch. Run it alone on a quiet machine:

    flock -x /tmp/aigc_rt-quiet.lock .venv/bin/python -m pytest bench --benchmark-enable [-k "124M and b1"]

Sizes come from AIGC_RT_BENCH_SIZES (default 124M; e.g. "124M,355M"). Each benchmark is one timed greedy
generation (after a warm-up); extra_info holds tokens/s, ms/step, TTFT, GB/s and % of the read roofline (the
read bandwidth probed before and after the run).
"""
import os
import statistics

import pytest

from aigc_rt import bench

SIZES = os.environ.get("AIGC_RT_BENCH_SIZES", "124M").split(",")
BATCHES = (1, 8)
NEW_TOKENS, PROMPT_LEN = 128, 32


@pytest.fixture(scope="module")
def probe():
    return bench.BandwidthProbe()


@pytest.fixture(scope="module", params=SIZES)
def model(request, tmp_path_factory):
    return (request.param, *bench.prepare(request.param, str(tmp_path_factory.mktemp(request.param))))


@pytest.mark.parametrize("batch", BATCHES, ids=[f"b{b}" for b in BATCHES])
@pytest.mark.parametrize("system", bench.SYSTEMS)
def test_decode(benchmark, probe, model, batch, system):
    size, hf, files, config = model
    benchmark.group = f"decode-{size}-b{batch}"
    runner = bench.make_system(system, hf, files, "cpu", batch)
    ids = bench.prompts(batch, PROMPT_LEN)
    runner.generate(ids, 4)  # warm up
    before = probe(3)  # the read bandwidth beside the run: these machines are shared
    timing = benchmark.pedantic(runner.generate, args=(ids, NEW_TOKENS), rounds=1, iterations=1)
    bandwidth = statistics.median([before, probe(3)])  # as aigc-rt bench: the median of the probes
    name, dtype = system.split(":")
    r = bench.result(size, batch, name, dtype, timing, bench.streamed_bytes(config, dtype), bandwidth, None,
                      NEW_TOKENS)
    benchmark.extra_info.update(tokens_per_s=r.tokens_per_s, ms_per_step=r.ms_per_step, ttft_ms=r.ttft_ms,
                                gb_per_s=r.gb_per_s, roofline_pct=r.roofline_pct)
    assert len(timing.tokens) == batch and all(len(t) == NEW_TOKENS for t in timing.tokens)
