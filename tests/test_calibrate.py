"""The torch side against the real engine: the GGUF model in torch, the engine-path model of each
cache type, the sensitivity profile (checkpoint and resume)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtuner_edge import engine
from kvtuner_edge.calibrate.model import TorchModel, kld, log_probs
from kvtuner_edge.calibrate.profile import Profile, sensitivity
from kvtuner_edge.config import CacheConfig
from kvtuner_edge.evaluate import kld_per_token, shared_text

N = 512


@pytest.fixture(scope="module")
def toks(smol_tokens):
    return smol_tokens[:N]


@pytest.fixture(scope="module")
def engine_logits(smollm2, toks):
    """Engine logits of the same tokens with f16 and three quantised caches."""
    out = {}
    for name, tk, tv in (("f16", None, None), ("q8_0", "q8_0", "q8_0"), ("k8v4", "q8_0", "q4_0"),
                         ("q4_0", "q4_0", "q4_0"), ("q4_1", "q4_1", "q4_1"), ("k8v3", "q8_0", "q3_kv"),
                         ("k8v2", "q8_0", "q2_kv"), ("k3v3", "q3_kv", "q3_kv")):
        with engine.open_model(smollm2, n_ctx=N, logits_all=True, type_k=tk, type_v=tv, use_file_types=False) as m:
            out[name] = m.logits(toks)
    return out


@pytest.fixture(scope="module")
def exact(smollm2):
    return TorchModel(smollm2, act_quant=True)


def _mean_kld(a: np.ndarray, b: np.ndarray) -> float:
    return float(kld_per_token(a, b).mean())


def test_torch_model_is_the_deployed_model(smollm2, toks, engine_logits, exact):
    """The dequantised GGUF in torch gives the engine's f16-cache distribution up to the engine's own floor."""
    clean = TorchModel(smollm2)
    with torch.inference_mode():
        for m in (clean, exact):
            t = m.forward(toks).numpy()
            assert _mean_kld(engine_logits["f16"], t) < 0.006
            assert (t.argmax(-1) == engine_logits["f16"].argmax(-1)).mean() > 0.94
        # a wrong rope convention (NEOX pairs on a llama GGUF) is far off: the check above can fail
        clean.arch = "qwen2"
        bad = clean.forward(toks).numpy()
    assert _mean_kld(engine_logits["f16"], bad) > 0.1


def test_engine_path_model_predicts_engine_kld(smollm2, toks, engine_logits, exact):
    """With the engine's attention paths and activation rounding modelled, torch's KLD of a whole
    uniform cache tracks the engine's, floor included; the clean model (storage and attention path
    only) misses the floor by an order of magnitude at q8_0. Per-token KLD is heavy-tailed on 512
    tokens (the q4_0/q4_1 order flips between wikitext and generated text), hence the wide band."""
    clean = TorchModel(smollm2)
    with torch.inference_mode():
        ref, ref_c = log_probs(exact.forward(toks)), log_probs(clean.forward(toks))
        pred, pred_c = {}, {}
        for name, tk, tv in (("q8_0", "q8_0", "q8_0"), ("k8v4", "q8_0", "q4_0"), ("q4_0", "q4_0", "q4_0"),
                             ("q4_1", "q4_1", "q4_1"), ("k8v3", "q8_0", "q3_kv"), ("k8v2", "q8_0", "q2_kv"),
                             ("k3v3", "q3_kv", "q3_kv")):
            cfg = CacheConfig.uniform(exact.n_layer, tk, tv)
            pred[name] = float(kld(ref, exact.forward(toks, cfg)).mean())
            pred_c[name] = float(kld(ref_c, clean.forward(toks, cfg)).mean())
    meas = {name: _mean_kld(engine_logits["f16"], engine_logits[name]) for name in pred}
    for name in pred:
        assert 0.6 < pred[name] / meas[name] < 1.7, (name, pred[name], meas[name])
    assert pred_c["q8_0"] < 0.2 * meas["q8_0"]
    for d in (pred, meas):
        assert d["q8_0"] < d["k8v4"] < min(d["q4_0"], d["q4_1"])
        assert d["k8v4"] < d["k8v3"] < d["k8v2"] and d["k8v3"] < d["k3v3"]


def test_profile_checkpoints_and_resumes(smollm2, toks, tmp_path, monkeypatch):
    """An interrupted profile resumes from its checkpoint and ends with the same numbers as an
    uninterrupted run; the profile sees the known shape of sensitivity (q4_0 costs more than q8_0)."""
    m = TorchModel(smollm2)
    pairs = [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
    short = toks[:96]
    full = sensitivity(m, short, pairs, key="k", cache=tmp_path / "a.json", max_positions=64, progress=False)
    assert full.complete

    calls = {"n": 0}
    real_save = Profile.save

    def interrupted_save(self, path):
        real_save(self, path)
        calls["n"] += 1
        if calls["n"] == 6:          # attention errors + 4 layers of KLD
            raise KeyboardInterrupt

    monkeypatch.setattr(Profile, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        sensitivity(m, short, pairs, key="k", cache=tmp_path / "b.json", max_positions=64, progress=False)
    monkeypatch.setattr(Profile, "save", real_save)
    part = Profile.load(tmp_path / "b.json")
    assert part is not None and 0 < len(part.done_layers) < 30
    resumed = sensitivity(m, short, pairs, key="k", cache=tmp_path / "b.json", max_positions=64, progress=False)
    assert resumed.complete
    a1, k1 = full.arrays()
    a2, k2 = resumed.arrays()
    np.testing.assert_allclose(a1, a2, rtol=1e-6)
    np.testing.assert_allclose(k1, k2, rtol=1e-6, equal_nan=True)
    # a different key (other tokens or settings) does not reuse the checkpoint
    other = sensitivity(m, short[:80], pairs, key="other", cache=tmp_path / "b.json", max_positions=64, progress=False)
    assert other.n_tokens == 80
    # sensitivity makes sense: q4_0 everywhere in a layer costs more than q8_0 everywhere, K and V
    assert np.nanmean(k1[:, 3]) > 5 * np.nanmean(k1[:, 1])
    assert np.all(a1[:, 0] == 0) and np.all(k1[:, 0] == 0)


def test_gemma3_in_torch(gemma3):
    """Gemma-3 (sliding-window layers, a second rope base, q/k norms, GELU) runs in torch as in the engine."""
    src = shared_text()
    text = src.read_text()[:12000] if src is not None else "The quick brown fox jumps over the lazy dog. " * 80
    with engine.open_model(gemma3, n_ctx=640, logits_all=True, use_file_types=False) as e:
        toks = e.tokenize(text)[:600]
        ref = e.logits(toks)
    m = TorchModel(gemma3)
    assert sum(m.swa) == 15 and m.n_swa == 512
    with torch.inference_mode():
        pos = torch.arange(0, 600, 3)
        t = m.forward(toks, positions=pos).numpy()
    r = ref[pos.numpy()]
    assert _mean_kld(r, t) < 0.02
    assert (t.argmax(-1) == r.argmax(-1)).mean() > 0.93
    # without the sliding window the late positions change: the check above sees the window
    m.swa = [False] * m.n_layer
    with torch.inference_mode():
        late = torch.arange(540, 600, 3)
        nowin = m.forward(toks, positions=late).numpy()
    assert _mean_kld(ref[late.numpy()], nowin) > 2 * _mean_kld(ref[late.numpy()], t[-len(late):])
