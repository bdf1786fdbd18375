"""Calibration under a memory limit (issue 14): weights held quantised, as many layers dequantised
as the limit allows, the rest dequantised per use. The results must not move: on the real models
the sensitivity profile, the measured front and the pick under a tight limit equal those of the
all-float32 gguf-py path (the old calibration); refusals of bad limits and weight types."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kvtuner_edge import engine
from kvtuner_edge.calibrate.dequant import DequantError
from kvtuner_edge.calibrate.model import CalibrationError, TorchModel, parse_memory
from kvtuner_edge.calibrate.profile import sensitivity
from kvtuner_edge.cli import main
from kvtuner_edge.evaluate import shared_text

PAIRS = [("f16", "f16"), ("q8_0", "q4_0"), ("q4_0", "q4_0")]
N_TOK, N_POS, MAX_PAIRS = 64, 32, 1           # small: each layer's final KLD for one pair
WORKLOAD = (N_TOK, MAX_PAIRS, N_POS)


def _text() -> str:
    src = shared_text()
    if src is not None:
        return src.read_text()[:20000]
    words = "the of a city river north king war year began music school first time after people".split()
    rng = np.random.default_rng(0)
    return " ".join(rng.choice(words, 4000))


def _tokens(path, n):
    with engine.open_model(path, n_ctx=64, use_file_types=False) as m:
        return m.tokenize(_text())[:n]


def _tight(path, layers: int = 2) -> TorchModel:
    """The model under a limit that holds about `layers` layers in float32 (and not the output)."""
    probe = TorchModel(path, max_memory="1TiB", workload=WORKLOAD)
    p = probe.plan
    assert p["resident_layers"] == list(range(probe.n_layer)) and p["output_resident"]
    limit = p["minimum"] + (layers + 1) * p["layer_bytes"]
    del probe
    return TorchModel(path, max_memory=limit, workload=WORKLOAD)


def _profile_equal(path):
    toks = _tokens(path, N_TOK)
    ref_m = TorchModel(path, weights="gguf-py")
    ref = sensitivity(ref_m, toks, PAIRS, key="k", max_positions=N_POS, max_pairs=MAX_PAIRS, progress=False)
    with torch.inference_mode():
        ref_logits = ref_m.forward(toks)
    del ref_m
    m = _tight(path)
    n = m.n_layer
    assert 0 < len(m.plan["resident_layers"]) < n and not m.plan["output_resident"]
    assert m.plan["resident_layers"] == list(range(n - len(m.plan["resident_layers"]), n))   # the last layers
    assert f"{len(m.plan['resident_layers'])}/{n} layers resident" in m.memory_summary()
    got = sensitivity(m, toks, PAIRS, key="k", max_positions=N_POS, max_pairs=MAX_PAIRS, progress=False)
    assert m.stats["dequantised"] > n              # matrices really were dequantised again and again
    with torch.inference_mode():
        logits = m.forward(toks)
    a1, k1 = ref.arrays()
    a2, k2 = got.arrays()
    np.testing.assert_allclose(a2, a1, rtol=1e-6, atol=0)
    np.testing.assert_allclose(k2, k1, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=0)
    return m


def test_smollm2_tight_memory_gives_the_fp32_profile(smollm2):
    _profile_equal(smollm2)


def test_gemma3_tight_memory_gives_the_fp32_profile(gemma3):
    """Gemma-3: Q5_0/Q4_K/Q6_K/Q8_0 weights, a 262k-row tied output dequantised in chunks."""
    m = _profile_equal(gemma3)
    assert {m._matrices[n].ggml_type for n in m._matrices} >= {6, 8, 12, 14}


def test_search_pick_and_predicted_kld_unchanged(smollm2, tmp_path):
    """The whole tune: profile, NSGA-II front, baselines and the pick at a budget, under a tight
    limit against the gguf-py all-float32 path (separate caches, so both really compute)."""
    from kvtuner_edge.tune import pick_with_baselines, tune

    text = tmp_path / "calib.txt"
    text.write_text(_text())
    kw = dict(types=["q8_0", "q4_0"], calib_file=text, n_calib=64, groups=3, pop=6, gens=1, progress=False,
              max_positions=48)
    ref = tune(smollm2, cache_dir=tmp_path / "ref", weights="gguf-py", **kw)
    p = TorchModel(smollm2, max_memory="1TiB", workload=(64, 8, 48)).plan
    limit = p["minimum"] + p["output_bytes"] + 4 * p["layer_bytes"]     # the output and a few layers resident
    got = tune(smollm2, cache_dir=tmp_path / "tight", max_memory=limit, **kw)
    assert "layers resident in float32, the rest dequantised per use" in got.memory
    for a, b in zip(ref.profile.arrays(), got.profile.arrays()):
        np.testing.assert_allclose(b, a, rtol=1e-6, equal_nan=True)
    assert [(p.type_k, p.type_v) for p in got.result.points] == [(p.type_k, p.type_v) for p in ref.result.points]
    np.testing.assert_allclose([p.kld for p in got.result.points], [p.kld for p in ref.result.points], rtol=1e-6)
    np.testing.assert_allclose([b["kld"] for b in got.baselines], [b["kld"] for b in ref.baselines], rtol=1e-6)
    for budget in (4.5, 6.0):
        c1 = pick_with_baselines(ref, budget, "nominal", ref.unit_range["nominal"])
        c2 = pick_with_baselines(got, budget, "nominal", got.unit_range["nominal"])
        assert (c2.type_k, c2.type_v) == (c1.type_k, c1.type_v)
        assert c2.kld == pytest.approx(c1.kld, rel=1e-6)


def test_max_memory_refusals(smollm2, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(_text())
    run = lambda *a: CliRunner().invoke(main, ["tune", str(smollm2), "--calib-file", str(text), "--calib-tokens", "64",
                                               "--types", "q8_0,q4_0", "--cache-dir", str(tmp_path / "c"), *a])
    for bad in ("lots", "0", "-2GiB", "nanGiB", "inf"):
        r = run("--max-memory", bad)
        assert r.exit_code == 1 and "--max-memory: cannot read" in r.output and bad in r.output, (bad, r.output)
    r = run("--max-memory", "1MiB")
    assert r.exit_code == 1 and "--max-memory 1 MiB is below what calibration needs here" in r.output, r.output
    assert parse_memory("8GiB") == 8 << 30 and parse_memory("512MiB") == 512 << 20 and parse_memory(4096) == 4096


def _tiny(tmp_path, name="tiny.gguf"):
    from kvtuner_edge.random_model import write

    p = tmp_path / name
    write("tiny", p)
    return p


def test_plan_on_a_tiny_model(tmp_path):
    """The limit decides: everything resident when it fits; else the output first, then the last
    layers, the rest dequantised per use into a cache of one layer; the same logits either way."""
    p = _tiny(tmp_path)
    ref = TorchModel(p, weights="gguf-py")
    full = TorchModel(p, max_memory="1TiB", workload=(32, 2, 16))
    assert full.plan["resident_layers"] == [0, 1, 2, 3] and full.plan["output_resident"]
    lb = full.plan["layer_bytes"]
    # one layer's worth short of everything: a cache of one layer, the output, then the last layer
    part = TorchModel(p, max_memory=full.plan["everything"] - lb - 1, workload=(32, 2, 16))
    assert part.plan["output_resident"] and part.plan["resident_layers"] == [3] and part.plan["recent_cap"] == lb
    toks = list(range(5, 69))
    with torch.inference_mode():
        a, b, c = ref.forward(toks), full.forward(toks), part.forward(toks)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert part.stats["dequantised"] == 3 * 7 and full.stats["dequantised"] == 0
    assert part._recent_bytes <= lb


def test_unsupported_weight_type_is_named(tmp_path):
    """A matrix in a type the torch dequantisers do not decode is refused, naming the type and tensor."""
    p = _tiny(tmp_path)
    data = bytearray(p.read_bytes())
    name = b"blk.3.ffn_down.weight"                # the last tensor: a smaller size keeps the layout valid
    i = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, i)[0]
    at = i + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, at)[0] == 2                 # Q4_0 (18 bytes per 32 values)
    struct.pack_into("<I", data, at, 39)                              # MXFP4 (17 bytes per 32): fits in place
    p.write_bytes(bytes(data))
    with pytest.raises(DequantError, match=r"blk\.3\.ffn_down\.weight: weight type MXFP4 cannot be dequantised"):
        TorchModel(p)
    with pytest.raises(CalibrationError, match="weights must be torch or gguf-py"):
        TorchModel(p, weights="numpy")


def test_plan_honours_the_limit(smollm2):
    """For limits from the smallest accepted to everything: what the plan holds (quantised
    weights, resident float32 matrices, the per-use cache, output rows, small tensors, the
    activation reserve) stays within the limit, and a forward pass keeps the per-use cache
    within its cap. The more memory, the more layers resident, never fewer."""
    probe = TorchModel(smollm2, max_memory="1TiB", workload=WORKLOAD)
    lo, hi = probe.plan["minimum"], probe.plan["everything"]
    del probe
    toks = list(range(100, 100 + N_TOK))
    last = -1
    for limit in np.linspace(lo, hi, 5).astype(int):
        m = TorchModel(smollm2, max_memory=int(limit), workload=WORKLOAD)
        p = m.plan
        out_rows = 0 if p["output_resident"] else min(p["output_bytes"], 64 << 20)
        held = p["raw_bytes"] + m._small_bytes + p["reserve"] + p["resident_bytes"] + p["recent_cap"] + out_rows
        assert held <= limit, (limit, p)
        assert sum(4 * t.numel() for t in m._resident.values()) == p["resident_bytes"]
        assert len(p["resident_layers"]) + p["output_resident"] >= last
        last = len(p["resident_layers"]) + p["output_resident"]
        with torch.inference_mode():
            m.forward(toks)
        assert m._recent_bytes <= p["recent_cap"]
    assert last == m.n_layer + 1                 # at `everything`, all resident
    with pytest.raises(CalibrationError, match="is below what calibration needs here"):
        TorchModel(smollm2, max_memory=int(lo) - 1, workload=WORKLOAD)


def test_kld_in_chunks_is_bit_exact(smollm2):
    """kld() works a few positions at a time to bound its float64 temporaries; on the CPU that
    gives the whole-tensor numbers bit for bit (real logits of SmolLM2, 49k vocabulary)."""
    from kvtuner_edge.calibrate.model import kld, log_probs

    m = TorchModel(smollm2, max_memory="1TiB", workload=WORKLOAD)
    toks = _tokens(smollm2, N_TOK)
    with torch.inference_mode():
        ref = log_probs(m.forward(toks))
        test = m.forward(toks, None) + torch.randn(len(toks), m._matrices[m._out_name].shape[0]) * 0.3
        whole = kld(ref, test, rows=10**9)
        for rows in (1, 2, 7, 32):
            assert torch.equal(kld(ref, test, rows=rows), whole), rows
        for n in (1, 2, 33):                    # a lone last row is merged into the one before
            assert torch.equal(kld(ref[:n], test[:n], rows=32), kld(ref[:n], test[:n], rows=10**9)), n
