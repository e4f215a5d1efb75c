"""The embedded default models (aigc_rt/data, trained by tools/): they load by name and are good enough."""
from __future__ import annotations

import os
import re
import sys

import torch

import aigc_rt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import train_gan  # noqa: E402
import train_text  # noqa: E402
import train_vae  # noqa: E402


def test_default_text_model_perplexity_far_below_unigram():
    """Held-out perplexity (runtime, cpu backend) vs an add-one unigram model fitted on the training
    split: the model must be at least 5x better. Measured at training time: see aigc_rt/data/README.md."""
    m = aigc_rt.load()  # the embedded default text model
    train_docs, val_docs = train_text.split(train_text.documents())
    enc = lambda docs: torch.tensor([t for d in docs for t in m.tokenizer.encode(d) + [m.config.eos_token_id]])
    val = enc(val_docs)[: 8 * m.config.n_positions + 1]
    ppl = m.perplexity(val).perplexity  # windows of the whole context, not overlapping
    unigram = train_text.unigram_perplexity(enc(train_docs), val)
    print(f"held-out perplexity {ppl:.1f}, unigram baseline {unigram:.1f}")
    assert ppl * 5 < unigram, f"perplexity {ppl:.1f} is not far below the unigram baseline {unigram:.1f}"


def test_default_text_model_quantised_keeps_its_perplexity(tmp_path):
    """The embedded model re-encoded in bf16, int8 and int4 (aigc_rt.convert of the runtime file), on the first 4,096
    held-out tokens (cpu backend): perplexity within 0.5% of fp32's (bf16, int8) and 2% (int4). Measured on 32,768
    held-out tokens: fp32 90.304, bf16 90.310, int8 90.313, int4 90.431 (+0.14%)."""
    m = aigc_rt.load()
    _, val_docs = train_text.split(train_text.documents())
    val = torch.tensor([t for d in val_docs for t in m.tokenizer.encode(d) + [m.config.eos_token_id]])[:4097]
    base = m.perplexity(val).perplexity
    for dtype, bound in (("bf16", 5e-3), ("int8", 5e-3), ("int4", 2e-2)):
        q = aigc_rt.load(aigc_rt.convert("gpt2-tiny", tmp_path / f"{dtype}.safetensors", dtype=dtype))
        ppl = q.perplexity(val).perplexity
        print(f"{dtype}: perplexity {ppl:.3f} vs fp32 {base:.3f}")
        assert q.dtype == dtype and abs(ppl / base - 1) <= bound, f"{dtype}: perplexity {ppl:.3f} vs fp32 {base:.3f}"


def test_default_text_model_generates_english():
    m = aigc_rt.load()
    out = m.generate("Return a list of", max_new_tokens=24, eos_token_id=[])[0]
    words = out.text.split()
    assert len(words) >= 8 and sum(w.isalpha() for w in words) >= len(words) // 2, out.text


CLASSIFIER = os.path.join(os.path.dirname(__file__), "data", "digit_classifier.safetensors")


def test_frozen_digit_classifier_is_the_fit_on_the_real_digits():
    """tests/data/digit_classifier.safetensors (`tools/train_gan.py --save-classifier`) is the logistic
    regression train_gan.digit_classifier fits: same probabilities as a refit here (up to the refit's numeric
    drift, atol 0.02) and its decisions on every real digit, and it is a good judge (held-out accuracy >= 0.9)."""
    frozen = train_gan.FrozenClassifier.load(CLASSIFIER)
    fresh, accuracy, _ = train_gan.digit_classifier()
    assert accuracy >= 0.9, f"the classifier itself is poor (held-out accuracy {accuracy:.3f})"
    images, labels = train_gan.digits_32()
    x = train_gan.digit_features(images)
    p_frozen, p_fresh = frozen.predict_proba(x), fresh.predict_proba(x)
    err = abs(p_frozen - p_fresh).max()
    assert err <= 0.02, f"frozen vs refit classifier: max probability difference {err:.3g}"
    assert (p_frozen.argmax(1) == p_fresh.argmax(1)).all()
    assert (p_frozen.argmax(1) == labels.numpy()).mean() >= 0.95  # train + held-out digits


def test_default_generator_makes_recognisable_varied_digits():
    """The frozen logistic-regression classifier fitted on the real digits must give one class probability
    >= 0.8 to at least 80% of 1,024 generated images (seed 0, cpu backend), and those must cover at least 6 of the
    10 digits (no mode collapse). Measured: 82.8% (aigc_rt/data/README.md). 1,024 images rather than 64: with 64
    the 52nd image, the least that passes, scored 0.8002, so a last-bit change in any kernel could flip it;
    here some 29 images would have to drop below the bar."""
    clf = train_gan.FrozenClassifier.load(CLASSIFIER)
    g = aigc_rt.load("dcgan-digits")
    assert g.backend.name == "cpu" and g.config.image_size == 32
    q = train_gan.digit_quality(clf, g.generate(1024, seed=0))
    print(f"generated: {q['confident']:.3f} confident, {q['classes']} classes {q['counts']}")
    assert q["confident"] >= 0.8, q
    assert q["classes"] >= 6, q


def test_default_discriminator_scores_real_digits_above_noise():
    d = aigc_rt.load("dcgan-digits-d")
    real, _ = train_gan.digits_32()
    noise = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_score, noise_score = d.score(real[::28][:64]).mean().item(), d.score(noise).mean().item()
    print(f"mean D(real) {real_score:.3f}, D(noise) {noise_score:.3f}")
    assert real_score > noise_score + 0.2


def test_default_vae_bounds_held_out_digits_above_the_pixel_baseline():
    """The ELBO (a lower bound of log p(x)) of the 180 held-out digits (runtime, cpu backend, bf16 file, 16 samples)
    vs the exact log-likelihood of independent Bernoulli pixels with the training means: at least 40 nats per
    image higher; and the importance-weighted estimate (256 samples) above the ELBO. Measured at training time: see
    aigc_rt/data/README.md."""
    v = aigc_rt.load("vae-digits")
    train, test = train_vae.digits_28()
    elbo, baseline = v.elbo(test, samples=16, seed=0).mean().item(), train_vae.pixel_baseline(train, test).mean().item()
    iwae = v.log_likelihood(test, samples=256, seed=0).mean().item()
    print(f"held-out ELBO {elbo:.1f} nats/image, IWAE (256 samples) {iwae:.1f}, independent-pixel baseline "
          f"{baseline:.1f}")
    assert elbo > baseline + 40
    assert iwae > elbo + 1  # the importance-weighted bound is the tighter (2.3 nats at training time)


def test_imagine_and_demo_use_the_embedded_generator(tmp_path, capsys, monkeypatch):
    from PIL import Image
    from aigc_rt.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["imagine", "-n", "64", "--seed", "0", "-o", "grid.png"]) == 0
    assert Image.open(tmp_path / "grid.png").size == (8 * 34 + 2, 8 * 34 + 2)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and os.path.join("out", "digits.png") in out and "images/s" in out
    assert (tmp_path / "out" / "digits.png").is_file()
    scores = re.search(r"mean D\(G\(z\)\) ([0-9.]+), uniform noise ([0-9.]+); "
                       r"E\[log\(1 - D\(G\(z\)\)\)\] (-?[0-9.]+)", out)
    assert scores, out
    fake, noise, value = map(float, scores.groups())
    assert 0 <= noise < fake <= 1 and value <= 0, out  # the digits look more real to it than noise
    assert (tmp_path / "out" / "vae-digits.png").is_file()
    bounds = re.search(r"its own samples (-?[0-9.]+), uniform noise (-?[0-9.]+)", out)
    assert bounds and float(bounds.group(2)) < float(bounds.group(1)) < 0, out


def test_embedded_files_fit_the_size_budget():
    """All of aigc_rt/data at most 30 MB; the two DCGAN files at most 7.5 MB."""
    data = os.path.join(os.path.dirname(aigc_rt.__file__), "data")
    sizes = {f: os.path.getsize(os.path.join(data, f)) for f in os.listdir(data)}
    assert {"dcgan-digits", "dcgan-digits-d", "gpt2-tiny", "vae-digits"} <= set(aigc_rt.embedded_models())
    assert sum(sizes.values()) <= 30e6, sizes
    assert sizes["dcgan-digits.safetensors"] + sizes["dcgan-digits-d.safetensors"] <= 7.5e6, sizes
