"""bench/bench_seed_gpt2.py (seed system 1's generate calls, Hugging Face vs aigc_rt) on the tiny test model:
it runs both calls for every system, reports Hugging Face's greedy tokens as matched, and refuses to time a
runtime file whose greedy tokens are not the reference's. The timing itself is the benchmark's, not tested."""
from __future__ import annotations

import os
import sys

import pytest

import aigc_rt
from conftest import make_hf_gpt2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_seed_gpt2 as b  # noqa: E402


@pytest.fixture
def short_calls(monkeypatch):
    """The seed calls within the test model's 64 positions."""
    monkeypatch.setattr(b, "CALLS", {"story": dict(b.CALLS["story"], max_length=30),
                                     "five": dict(b.CALLS["five"], max_length=20)})


def test_runs_both_calls_for_every_system(hf_odd, rt_odd, tmp_path, short_calls):
    hf = hf_odd[1]
    eos = hf.generation_config.eos_token_id
    files = {"fp32": str(rt_odd[0]), "bf16": aigc_rt.convert(hf_odd[0], tmp_path / "bf16.safetensors", dtype="bf16")}
    rows = b.run(hf, files, repeats=1, log=lambda s: None)
    assert hf.generation_config.eos_token_id == eos, "the benchmark changed the caller's model"
    keys = {(r["call"], r["system"], r["dtype"]) for r in rows}
    assert keys == {(c, s, d) for c in ("story", "five") for s, d in
                    (("hf-eager", "fp32"), ("aigc-rt", "fp32"), ("aigc-rt", "bf16"))}
    for r in rows:
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["vs_hf"] > 0
        assert (r["greedy"] == 1.0) if r["dtype"] == "fp32" and r["system"] == "aigc-rt" else True
    assert "| five | aigc-rt | fp32 |" in b.table(rows)


def test_refuses_to_time_a_model_that_is_not_the_reference(hf_odd, tmp_path, short_calls):
    other = tmp_path / "other"
    make_hf_gpt2(other, "odd", seed=1)  # another random init of the same shapes
    path = aigc_rt.convert(other, tmp_path / "other.safetensors")
    with pytest.raises(AssertionError, match="greedy tokens differ from Hugging Face's"):
        b.run(hf_odd[1], {"fp32": path}, repeats=1, log=lambda s: None)
