"""The triton backend end to end on a tiny GPT-2 (conftest's "odd" config: 3 layers, 96 wide, 3 heads of 32,
vocab 1000, context 64): logits vs Hugging Face, greedy tokens identical to HF, cached decode through the
static-buffer step that a CUDA graph replays == full recompute, ragged batches whose sequences finish early.
Under TRITON_INTERPRET=1 (CI) it all runs on the CPU; with AIGC_RT_GPU=1 on a CUDA machine it runs on the GPU,
where the CUDA-graph test checks graph replay == eager.
"""
from __future__ import annotations

import pytest
import torch

import aigc_rt
from aigc_rt.backends import get_backend, resolve
from aigc_rt.backends.triton_backend import TritonBackend
from test_gpt2 import logit_tolerance
from test_triton_kernels import DEV, ON_GPU, pytestmark  # noqa: F401  (pytestmark: skip without a GPU/interpreter)

PROMPTS = ["Beautiful is", "落霞与孤鹜齐飞", "def main():"]


@pytest.fixture(scope="module")
def model(rt_odd):
    return aigc_rt.load(rt_odd[0], device=DEV, backend="triton")


@pytest.fixture(scope="module")
def reference(rt_odd):
    """The same file on the torch backend (the reference backend), on the CPU."""
    return aigc_rt.load(rt_odd[0], backend="torch")


def _ids(vocab, B, T, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "int4"])
def test_logits_match_hf(rt_odd, hf_odd, tmp_path_factory, dtype):
    """Tolerance: logit_tolerance (tests/test_gpt2.py): fp32 atol 1e-4; bf16 3e-2, int8 6e-2 (weight-only,
    per-row scales) and int4 0.35 times max |HF logit|. int4 also against the torch backend on the same file, bf16's
    3e-2: on 3 rows (its matrices on the int4 GEMV) and on 34 (a bf16 copy of each made for the call)."""
    hf = rt_odd[1]
    path = rt_odd[0]
    if dtype != "fp32":
        path = aigc_rt.convert(hf_odd[0], tmp_path_factory.mktemp(dtype) / "m.safetensors", dtype=dtype)
    m = aigc_rt.load(path, device=DEV, backend="triton")
    shapes = {"fp32": ((1, 1), (3, 17), (2, hf.config.n_positions)), "int4": ((2, 17), (1, 3))}
    for B, T in shapes.get(dtype, ((2, 17),)):
        ids = _ids(hf.config.vocab_size, B, T)
        with torch.no_grad():
            want = hf(ids).logits
        got = m.logits(ids).cpu()
        err, tol = (got - want).abs().max().item(), logit_tolerance(dtype, want)
        assert err <= tol, f"{dtype} B={B} T={T}: max abs logit error {err:.3g} > {tol:.3g}"
        if dtype == "int4":
            same_file = aigc_rt.load(path, backend="torch").logits(ids)
            err, tol = (got - same_file).abs().max().item(), logit_tolerance("bf16", same_file)
            assert err <= tol, f"int4 B={B} T={T}: max abs logit difference {err:.3g} > {tol:.3g} vs the torch backend"


def test_greedy_tokens_identical_to_hf(model, rt_odd):
    hf = rt_odd[1]
    hf.generation_config.eos_token_id = None  # compare full-length continuations
    for prompt in PROMPTS[:2]:
        ids = model.tokenizer.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(ids):]
        got = model.generate(ids, max_new_tokens=16, eos_token_id=[])[0]
        assert got.token_ids == want.tolist(), f"{prompt!r}: {got.token_ids} != {want.tolist()}"


def test_ragged_batch_finishing_early_matches_torch_backend(model, reference):
    """A ragged batch (batched decode takes the GEMM path) where one sequence stops at an eos token, so the
    cache is compacted mid-generation and the decode step is re-keyed to the new batch."""
    full = [c.token_ids for c in reference.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])]
    row, eos = next((r, t) for r, seq in enumerate(full) for t in seq[1:]  # a token only row r makes, mid-way
                    if t not in seq[:1] and all(t not in other for other in full if other is not seq))
    want = reference.generate(PROMPTS, max_new_tokens=10, eos_token_id=eos)
    got = model.generate(PROMPTS, max_new_tokens=10, eos_token_id=eos)
    assert [c.finish_reason for c in got] == ["eos" if r == row else "length" for r in range(len(PROMPTS))]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_logprobs_match_torch_backend(model, reference):
    """generate(logprobs=True) through the triton backend's decode + sample step (one CUDA-graph replay on a GPU):
    the same tokens and log-probabilities as the torch backend, greedy, a ragged batch. Tolerance: atol 1e-3
    (fp32; the two backends' logits agree to ~1e-5)."""
    got = model.generate(PROMPTS, max_new_tokens=6, eos_token_id=[], logprobs=True)
    want = reference.generate(PROMPTS, max_new_tokens=6, eos_token_id=[], logprobs=True)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    err = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs))
    assert err <= 1e-3, f"max log-probability error {err:.3g}"


def test_perplexity_matches_torch_backend(model, reference):
    """perplexity() through the triton backend's prefill (overlapping windows): the torch backend's NLL within
    1e-5 relative."""
    text = " ".join(PROMPTS) * 4
    got, want = model.perplexity(text, window=48, stride=20), reference.perplexity(text, window=48, stride=20)
    assert got.tokens == want.tokens and got.nll == pytest.approx(want.nll, rel=1e-5)


@pytest.mark.parametrize("sampling", [dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
                                      dict(repetition_penalty=1.5), dict(do_sample=True, repetition_penalty=1.3)],
                         ids=["top_k_top_p", "greedy_penalty", "sampled_penalty"])
def test_seeded_sampling_matches_torch_backend(model, reference, sampling):
    """Same seeds, same u per (sequence, step): the same tokens. The backends' logits agree to ~1e-6, so a
    token could only differ where u falls within ~1e-6 of a CDF boundary (about 1e-5 per draw; the kernel
    test accounts for that case explicitly); this run is deterministic and has no such draw. With a repetition
    penalty the triton step marks each token seen in its sampler's last kernel (sample_step)."""
    kw = dict(max_new_tokens=8, seed=3, eos_token_id=[], **sampling)
    got = model.generate(PROMPTS[:2], **kw)
    assert [c.token_ids for c in got] == [c.token_ids for c in reference.generate(PROMPTS[:2], **kw)]


@pytest.mark.skipif(ON_GPU, reason="a GPU runs its own settings in every test")
def test_with_the_gpu_settings(rt_odd, reference, gpu_settings):
    """The whole model with a GPU's block sizes (utils.*_settings(interpreter=False)) under the interpreter:
    logits vs HF over the full context (prefill tiles of 128 x 64), and a ragged batch sampling as seed system 1
    does, as the torch backend does (the 16-row decode tile, a cache of 64 positions attended in one pass; the
    GEMV and the sampler's chunks of 2,048 have their own tests at real sizes: test_*_with_the_gpu_settings)."""
    hf = rt_odd[1]
    m = aigc_rt.load(rt_odd[0], device=DEV, backend="triton")
    ids = _ids(hf.config.vocab_size, 2, hf.config.n_positions)
    with torch.no_grad():
        want = hf(ids).logits
    err, tol = (m.logits(ids).cpu() - want).abs().max().item(), logit_tolerance("fp32", want)
    assert err <= tol, f"max abs logit error {err:.3g} > {tol:.3g}"
    kw = dict(max_new_tokens=4, eos_token_id=[], do_sample=True, temperature=0.7, top_k=50, seed=1)
    assert [c.token_ids for c in m.generate(PROMPTS, **kw)] == [c.token_ids for c in reference.generate(PROMPTS, **kw)]


def test_cached_decode_equals_full_recompute(model):
    """model.decode goes through the triton backend's DecodeGraph (static input buffers; on a CPU without
    the capture) and matches the logits of a full forward, also after the cache drops a row."""
    c = model.config
    prompt = _ids(c.vocab_size, 3, 5, seed=3).to(DEV)
    cache = model.new_cache(3, c.n_positions)
    kept = torch.tensor([0, 2], device=DEV)  # row 1 leaves the batch at position 8
    with torch.inference_mode():
        hidden = model.prefill(prompt, cache)
        logits, seq, steps = model.head(hidden[:, -1]), prompt, []
        for pos in range(5, 12):
            if pos == 8:  # as generation does when a sequence finishes
                cache.keep(kept)
                seq, logits, steps = seq[kept], logits[kept], [s[kept] for s in steps]
            tok = logits.argmax(-1)
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model.decode(tok, torch.full((seq.shape[0],), pos, device=DEV), cache, pos + 1)
            key, entry = next(reversed(model.backend.decode_graph.entries.items()))  # the static path ran
            assert key[2] == seq.shape[0] and torch.equal(entry.inputs[0], tok)
            # a capture is keyed by every buffer it bakes in: the caches (with their dtype: a cache of another
            # dtype may land where a freed one was) and this batch's Workspace
            assert key[4] == cache.addresses(seq.shape[0]) and cache.workspace(seq.shape[0]).logits.data_ptr() in key[4]
            assert (cache.k.data_ptr(), cache.k.dtype) in key[4]
            steps.append(logits.clone())  # decode returns a workspace buffer the next step overwrites
    full = model.logits(seq)[:, 5:]  # (2, 7, V): logits after positions 5..11, recomputed without a cache
    err = (torch.stack(steps, dim=1) - full).abs().max().item()
    assert err <= 1e-4, f"cached decode vs full recompute: max abs error {err:.3g}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "device 'cuda' is not available here"),
                                            ("gpu", "device 'gpu' is not a torch device"),
                                            (3.5, "device 3.5 is not a torch device")])
def test_unavailable_device_is_a_value_error(rt_odd, device, message):
    with pytest.raises(ValueError, match=message):
        aigc_rt.load(rt_odd[0], device=device)
    with pytest.raises(ValueError, match=message):
        get_backend("torch", device)


def test_backend_registration():
    assert resolve("auto", torch.device("cuda")) == "triton"
    assert resolve("auto", torch.device("cpu")) == "cpu"
    assert get_backend("triton", DEV).name == "triton"
    with pytest.raises(ValueError, match="backend 'triton'"):
        TritonBackend(torch.device("meta"))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (AIGC_RT_GPU=1)")
def test_cuda_graph_replay_equals_eager(rt_odd):
    """Graph replay gives bitwise the logits of the same step run eagerly, step after step, and generation
    (greedy and sampled, decode + sampling in one graph) is the same with and without graphs."""
    m = aigc_rt.load(rt_odd[0], device="cuda", backend="triton")
    assert m.backend.decode_graph.capture
    c = m.config
    prompt = _ids(c.vocab_size, 2, 5, seed=4).cuda()
    caches = [m.new_cache(2, c.n_positions) for _ in range(2)]
    with torch.inference_mode():
        hidden = [m.prefill(prompt, cache) for cache in caches]
        tok = m.head(hidden[0][:, -1]).argmax(-1)
        for pos in range(5, 15):
            positions = torch.full((2,), pos, device="cuda")
            graphed = m.decode(tok, positions, caches[0], pos + 1)
            eager = m._decode_step(tok, positions, positions + 1, caches[1], c.n_positions)
            assert torch.equal(graphed, eager), f"position {pos}: max diff {(graphed - eager).abs().max():.3g}"
            tok = graphed.argmax(-1)
    assert any(e.graph is not None for e in m.backend.decode_graph.entries.values()), "never captured"
    # generate() replays decode + sampling as one graph (greedy, and seed system 1's sampling)
    runs = [dict(max_new_tokens=12, eos_token_id=[]),
            dict(max_new_tokens=12, eos_token_id=[], do_sample=True, temperature=0.7, top_k=50, seed=5)]
    with_graph = [m.generate(PROMPTS, **kw) for kw in runs]
    assert any(e.graph is not None and key[0] == "sample" for key, e in m.backend.decode_graph.entries.items())
    assert any(e.graph is not None for e in m.backend.prefill_graphs.entries.values()), "prefill never captured"
    m.backend.decode_graph.capture = m.backend.prefill_graphs.capture = False
    m.backend.decode_graph.entries.clear()
    m.backend.prefill_graphs.entries.clear()
    for kw, graphed in zip(runs, with_graph):
        assert [c.token_ids for c in m.generate(PROMPTS, **kw)] == [c.token_ids for c in graphed], kw


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a Hopper or later GPU (AIGC_RT_GPU=1)")
def test_programmatic_dependent_launch_changes_nothing(rt_odd, monkeypatch):
    """AIGC_RT_PDL=1 (kernels/utils.py): prefill and graph-replayed decode steps with the kernels launched as
    programmatic dependent launches give bitwise the logits of plain launches (a missing wait would race)."""
    from aigc_rt.kernels import utils

    def run():
        m = aigc_rt.load(rt_odd[0], device="cuda", backend="triton")
        prompt = _ids(m.config.vocab_size, 3, 7, seed=5).cuda()
        cache, out = m.new_cache(3, m.config.n_positions), []
        with torch.inference_mode():
            logits = m.head(m.prefill(prompt, cache)[:, -1])
            for pos in range(7, 19):
                out.append(logits.clone())
                positions = torch.full((3,), pos, device="cuda")
                logits = m.decode(logits.argmax(-1), positions, cache, pos + 1)
        return torch.stack(out)

    plain = run()
    monkeypatch.setattr(utils, "PDL_REQUESTED", True)
    assert utils.pdl_options(torch.device("cuda")) == dict(PDL=True, launch_pdl=True)
    pdl = run()
    assert torch.equal(pdl, plain), f"max diff {(pdl - plain).abs().max():.3g}"


def test_pdl_is_off_unless_asked_for():
    from aigc_rt.kernels import utils
    assert utils.pdl_options(DEV) == dict(PDL=False)


def test_generations_of_one_shape_share_one_captured_step(model):
    """generate() calls of one batch size whose lengths round to one cache capacity run on the model's kept decode
    buffers, so the decode + sampling step is keyed (and on a GPU captured) once and replayed by the next calls:
    each capture costs an eager step and the capture itself, milliseconds a call."""
    graphs = model.backend.decode_graph
    model.decode_buffers.clear()
    graphs.entries.clear()
    first = model.generate(PROMPTS[0], max_new_tokens=4, eos_token_id=[])
    captures = graphs.captures
    for prompt, n in ((PROMPTS[2], 6), (PROMPTS[1], 3), (PROMPTS[0], 4)):
        out = model.generate(prompt, max_new_tokens=n, eos_token_id=[])
    assert [k[0] for k in graphs.entries] == ["sample"], list(graphs.entries)
    assert graphs.captures == captures, f"{graphs.captures - captures} captures after the first generation"
    assert out[0].token_ids == first[0].token_ids  # the same prompt again, on the buffers the others used


def test_prefill_padded_for_its_graph(model, monkeypatch):
    """generate()'s prefill of short prompts runs on prompts right-padded to a multiple of PREFILL_ROWS (replayed
    from one CUDA graph per batch size and padded length on a GPU; here the same static path, uncaptured): the
    tokens are those of the unpadded prefill and the log-probabilities within 1e-4; prompts of another length in
    the same multiple reuse the entry; prompts past PREFILL_GRAPH_MAX_T run unpadded, eagerly."""
    from aigc_rt.backends import triton_backend
    kw = dict(max_new_tokens=2, eos_token_id=[], logprobs=True)
    be = model.backend
    monkeypatch.setattr(be, "graph_prefill", False)
    plain = model.generate(PROMPTS, **kw)
    monkeypatch.setattr(be, "graph_prefill", True)
    be.prefill_graphs.entries.clear()
    padded = model.generate(PROMPTS, **kw)
    for a, b in zip(plain, padded):
        assert a.token_ids == b.token_ids
        err = max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs))
        assert err <= 1e-4, f"padded prefill: max log-probability error {err:.3g}"
    (key,) = be.prefill_graphs.entries
    lengths = [len(model.tokenizer.encode(p)) for p in PROMPTS]
    rows = triton_backend.PREFILL_ROWS
    assert key[0] == "prefill" and key[2:4] == (3, -(-max(lengths) // rows) * rows), key
    model.generate([p[:-1] for p in PROMPTS], **kw)  # shorter prompts, the same padded length (here)
    assert len(be.prefill_graphs.entries) == 1
    monkeypatch.setattr(triton_backend, "PREFILL_GRAPH_MAX_T", max(lengths) - 1)
    assert [c.token_ids for c in model.generate(PROMPTS, **kw)] == [c.token_ids for c in plain]
    assert len(be.prefill_graphs.entries) == 1  # run eagerly


def test_a_step_that_cannot_be_captured_runs_eagerly(monkeypatch):
    """Should a step fail to capture (an op that syncs with the host, say), DecodeGraph warns once and runs it
    eagerly on its static buffers from then on, with the results of the eager step (here with stand-ins for torch's
    graph capture, which raises on the step's second run, the capture)."""
    from aigc_rt.backends import decode_graph

    class Capture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    graphs, runs = decode_graph.DecodeGraph(capture=True), []

    def step(x):
        runs.append(x.clone())
        if len(runs) == 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return x * 2
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match="could not be captured.*runs eagerly"):
        assert torch.equal(graphs.run(("step",), step, x), x * 2)
    assert torch.equal(graphs.run(("step",), step, x + 1), (x + 1) * 2)  # eagerly, on the new inputs
    assert graphs.captures == 0 and len(runs) == 3
