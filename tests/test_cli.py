"""The aigc-rt command line, run in-process through aigc_rt.cli.main."""
import json
import re

import pytest
import torch

import aigc_rt
from aigc_rt.cli import VALIDATE_PROMPTS, main
from conftest import make_hf_gpt2


def test_convert_info_generate(hf_odd, tmp_path, capsys):
    dst = tmp_path / "m.safetensors"
    assert main(["convert", str(hf_odd[0]), str(dst), "--dtype", "bf16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(dst)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "gpt2" and info["dtype"] == "bf16" and info["config"]["n_layer"] == 3
    assert info["parameters"] == sum(p.numel() for n, p in hf_odd[1].named_parameters() if "lm_head" not in n)
    assert main(["generate", "Hello", "--model", str(dst), "--max-new-tokens", "5", "--do-sample", "--top-k", "50",
                 "--temperature", "0.7", "--seed", "1", "--verbose"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello") and "tokens/s" in err and "time to first token" in err


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_convert_info_validate(hf_odd, tmp_path, capsys, dtype):
    dst = tmp_path / f"m_{dtype}.safetensors"
    assert main(["convert", str(hf_odd[0]), str(dst), "--dtype", dtype]) == 0
    capsys.readouterr()
    assert main(["info", str(dst)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == dtype and info["quantization"]["quantized_matrices"] == 1 + 4 * 3  # wte + 4 per block
    assert info["quantization"]["scheme"].startswith(dtype)
    assert info["parameters"] == sum(p.numel() for n, p in hf_odd[1].named_parameters() if "lm_head" not in n)
    assert main(["validate", str(dst), "--reference", str(hf_odd[0])]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and out.count("vs the torch backend on the same weights") == len(VALIDATE_PROMPTS)


def test_validate_holds_a_quantised_file_to_its_own_weights(hf_odd, tmp_path, capsys, monkeypatch):
    """int4's tolerance against the unquantised checkpoint is loose (its rounding moves these logits by up to ~29%), so
    validate also compares the file on its backend with the torch backend on the same weights, at SAME_WEIGHTS_RTOL:
    a cpu linear 3% off passes the first check and fails the second."""
    from aigc_rt.backends.cpu import CpuBackend
    dst = aigc_rt.convert(hf_odd[0], tmp_path / "m4.safetensors", dtype="int4")
    linear = CpuBackend.linear
    monkeypatch.setattr(CpuBackend, "linear", lambda self, *args, **kwargs: linear(self, *args, **kwargs).mul_(1.03))
    monkeypatch.setenv("AIGC_RT_CPU_REPLAY", "0")  # (a recorded decode step refuses the extra torch op)
    assert main(["validate", str(dst), "--reference", str(hf_odd[0])]) == 1
    lines = capsys.readouterr().out.splitlines()
    hf_lines = [line for line in lines if "greedy" in line]
    same_lines = [line for line in lines if "on the same weights" in line]
    assert len(hf_lines) == len(same_lines) == len(VALIDATE_PROMPTS) and lines[-1].startswith("FAIL")
    errs_tols = [map(float, re.search(r"err\| (\S+) \(tol (\S+)\)", line).groups()) for line in hf_lines + same_lines]
    within = [err <= tol for err, tol in errs_tols]
    assert all(within[:len(hf_lines)]) and not any(within[len(hf_lines):]), lines


def test_convert_a_runtime_file_to_another_dtype(tmp_path, capsys):
    """A runtime file (here the embedded model, by name) written again in int4: the same model, its matrices
    quantised; a quantised file is not quantised again, and a DCGAN has no int4."""
    dst = tmp_path / "tiny-int4.safetensors"
    assert main(["convert", "gpt2-tiny", str(dst), "--dtype", "int4"]) == 0
    capsys.readouterr()
    m, ref = aigc_rt.load(dst), aigc_rt.load("gpt2-tiny")
    assert m.dtype == "int4" and m.config == ref.config
    assert m.tokenizer.encode("héllo") == ref.tokenizer.encode("héllo")
    ids = torch.tensor([ref.tokenizer.encode("Return a list of the values in the given order")])
    want = ref.logits(ids)
    assert (m.logits(ids) - want).abs().max() <= 0.1 * want.abs().max()
    assert main(["convert", str(dst), str(tmp_path / "again.safetensors"), "--dtype", "int8"]) == 2
    assert "already quantised (int4)" in capsys.readouterr().err
    with pytest.raises(aigc_rt.FormatError, match="dcgan-digits.safetensors: DCGAN files hold fp32 or bf16"):
        aigc_rt.convert("dcgan-digits", tmp_path / "d.safetensors", dtype="int4")
    with pytest.raises(ValueError, match="is a gpt2 runtime file, not lstm"):
        aigc_rt.convert("gpt2-tiny", tmp_path / "l.safetensors", arch="lstm")
    with pytest.raises(ValueError, match="is the source itself"):  # (it is read through a memory map)
        aigc_rt.convert(dst, dst, dtype="fp32")


def test_generate_matches_api_and_streams(rt_odd, capsys):
    m = aigc_rt.load(rt_odd[0])
    want = m.generate("落霞与孤鹜齐飞", max_new_tokens=8, num_return_sequences=5, temperature=0.9, do_sample=True,
                      seed=2)
    assert main(["generate", "落霞与孤鹜齐飞", "--model", str(rt_odd[0]), "--max-new-tokens", "8",
                 "--num-return-sequences", "5", "--temperature", "0.9", "--do-sample", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert all(("落霞与孤鹜齐飞" + w.text) in out for w in want)
    assert main(["generate", "Hi", "--model", str(rt_odd[0]), "--max-new-tokens", "8", "--stream", "--seed", "4",
                 "--do-sample"]) == 0
    assert capsys.readouterr().out == "Hi" + m.generate("Hi", max_new_tokens=8, seed=4, do_sample=True)[0].text + "\n"
    # seed system 1's second call: generate(..., max_length=50, num_return_sequences=5, temperature=0.9)
    want = m.generate("Hello", max_length=50, num_return_sequences=5, temperature=0.9, do_sample=True, seed=5)
    assert main(["generate", "Hello", "--model", str(rt_odd[0]), "--max-length", "50", "--num-return-sequences",
                 "5", "--temperature", "0.9", "--do-sample", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert all(("Hello" + w.text) in out for w in want)


def test_generate_logprobs(rt_odd, capsys):
    m = aigc_rt.load(rt_odd[0])
    want = m.generate("Hi", max_new_tokens=6, logprobs=True)[0].logprobs
    for stream in ([], ["--stream"]):
        assert main(["generate", "Hi", "--model", str(rt_odd[0]), "--max-new-tokens", "6", "--logprobs", *stream]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith(f"[log p(new tokens | prompt) = {sum(want):.4f} nats over 6 tokens"), line


def test_perplexity_command(rt_odd, tmp_path, capsys):
    m = aigc_rt.load(rt_odd[0])
    texts = ["Beautiful is better than ugly. " * 9, "落霞与孤鹜齐飞，秋水共长天一色。"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    files = [str(tmp_path / f"{i}.txt") for i in range(2)]
    assert main(["perplexity", *files, "--model", str(rt_odd[0]), "--stride", "16"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = [m.perplexity(t, stride=16) for t in texts]
    for line, w, path in zip(lines, want, files):
        assert line == f"{w.tokens} tokens\t{w.nats_per_token:.4f} nats/token\tperplexity {w.perplexity:.3f}\t{path}"
    assert lines[2].startswith(f"{want[0].tokens + want[1].tokens} tokens") and lines[2].endswith("\tall")
    assert main(["perplexity", files[0], "--model", "dcgan-digits"]) == 2
    assert "perplexity needs a text model" in capsys.readouterr().err


def test_validate_pass_and_fail(hf_odd, rt_odd, tmp_path, capsys):
    assert main(["validate", str(rt_odd[0]), "--reference", str(hf_odd[0])]) == 0
    assert "PASS" in capsys.readouterr().out
    other = tmp_path / "other"
    make_hf_gpt2(other, "odd", seed=7)  # same shapes, different weights
    assert main(["validate", str(rt_odd[0]), "--reference", str(other)]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["info", "missing.safetensors"], "no such file"),
    (["generate", "x", "--model", "missing.safetensors"], "no such file"),
    (["convert", "nowhere", "out.safetensors"], "no such file"),
])
def test_errors_exit_2_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_sampling_flag(rt_odd, capsys):
    assert main(["generate", "x", "--model", str(rt_odd[0]), "--do-sample", "--temperature", "0"]) == 2
    assert "temperature must be" in capsys.readouterr().err


def test_generate_without_model_uses_the_embedded_text_model(capsys):
    """`aigc-rt generate "..."` with no --model runs the embedded default (aigc_rt.load())."""
    assert main(["generate", "The function", "--max-new-tokens", "6"]) == 0
    want = aigc_rt.load().generate("The function", max_new_tokens=6)[0].text
    assert capsys.readouterr().out == "The function" + want + "\n"


def test_bench_cli_times_a_text_model(rt_odd, tmp_path, capsys):
    """`aigc-rt bench --model FILE` times decoding of one file and writes its table: every row has positive
    rates, and % roofline = GB/s / the read bandwidth probed beside that row."""
    assert main(["bench", "--model", str(rt_odd[0]), "--batches", "1,2", "--new-tokens", "6", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    assert "| 2 | aigc-rt/cpu | fp32 |" in capsys.readouterr().out
    (js,) = tmp_path.glob("*-decode.json")
    rows = json.loads(js.read_text())["results"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["read_gb_per_s"] > 0
        assert r["roofline_pct"] == pytest.approx(100 * r["gb_per_s"] / r["read_gb_per_s"])
        assert 0 < r["attn_sample_pct"] < 100  # timed with the step replay off (a replay calls no Python timer)


def test_op_shares_times_eager_steps_and_restores_replay(rt_odd):
    """The attention + sampling share is timed on eager steps: a replayed step never reaches the Python timers."""
    from aigc_rt.bench import AigcRt
    system = AigcRt(str(rt_odd[0]), "cpu")
    seen, inner = [], system.generate

    def generate(ids, new_tokens):
        seen.append(system.model.backend.replay)
        return inner(ids, new_tokens)

    system.generate = generate
    share = system.op_shares(torch.tensor([[1, 2, 3]]), 8)
    assert seen == [False] and system.model.backend.replay and 0 < share < 100


@pytest.mark.parametrize("prompt,flags,message", [
    ("Hi", ["--do-sample", "--temperature", "0"], "temperature must be a finite number > 0"),
    ("Hi", ["--top-p", "1.5"], r"top_p must be in (0, 1]"), ("Hi", ["--max-new-tokens", "100"], "context length 64"),
    ("", [], "prompt 0 is empty"), ("Hi", ["--eos-token-id", "5000"], "eos_token_id 5000"),
    ("Hi", ["--num-return-sequences", "2", "--do-sample"], "--stream prints one sequence"),
])
def test_generate_stream_bad_arguments_print_nothing(rt_odd, capsys, prompt, flags, message):
    """`generate --stream` checks its arguments before it prints the prompt."""
    assert main(["generate", prompt, "--model", str(rt_odd[0]), "--stream", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err, (out, err)


def test_generate_greedy_several_sequences_is_an_error(rt_odd, capsys):
    """As Hugging Face: several sequences need --do-sample."""
    assert main(["generate", "Hi", "--model", str(rt_odd[0]), "--num-return-sequences", "3"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "num_return_sequences=3" in err and "do_sample=True" in err, err


def test_generate_eos_token_id_flag(rt_odd, capsys):
    m = aigc_rt.load(rt_odd[0])
    base = m.generate("Hello", max_new_tokens=10, eos_token_id=[])[0].token_ids
    eos, other = base[3], next(t for t in range(1, 1000) if t not in base)
    cut = base[: base.index(eos) + 1]  # HF semantics: stop at the first eos, returned with it
    for flags, want in [([str(eos)], cut), ([str(other), str(eos)], cut), ([str(other)], base)]:
        argv = ["generate", "Hello", "--model", str(rt_odd[0]), "--max-new-tokens", "10"]
        for t in flags:
            argv += ["--eos-token-id", t]
        for stream in ([], ["--stream"]):
            assert main(argv + stream) == 0
            assert capsys.readouterr().out == "Hello" + m.tokenizer.decode(want) + "\n", (flags, stream)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--eos-token-id ID" in help_text and "repeatable" in help_text and "eos_token_id" in help_text
