"""The patched engine on real models: per-layer types, their costs, state, K-shift and bad input."""
from __future__ import annotations

import ctypes
import os
import re
import shutil

import numpy as np
import pytest

from kvtuner_edge import CacheConfig, engine
from kvtuner_edge import types as T
from kvtuner_edge.demo import edge_mixed
from kvtuner_edge.errors import ConfigError, ModelFileError
from kvtuner_edge.evaluate import kld_per_token
from kvtuner_edge.gguf_io import model_info, write_with_metadata

from kshift import shift_vs_recompute  # tests/ is on sys.path under pytest

N_LAYER = 30


def test_engine_is_patched():
    assert engine.engine_version() == 1


def test_uniform_per_layer_q8_is_bit_identical_to_global_q8(smollm2, smol_tokens):
    with engine.open_model(smollm2, type_k="q8_0", type_v="q8_0", n_ctx=512, logits_all=True) as m:
        glob = m.logits(smol_tokens)
        assert m.layer_types() == (["q8_0"] * N_LAYER, ["q8_0"] * N_LAYER)
    with engine.open_model(smollm2, CacheConfig.uniform(N_LAYER, "q8_0"), n_ctx=512, logits_all=True) as m:
        per_layer = m.logits(smol_tokens)
        assert m.layer_types() == (["q8_0"] * N_LAYER, ["q8_0"] * N_LAYER)
    assert np.array_equal(glob, per_layer)


def test_uniform_per_layer_f16_is_bit_identical_to_default(smollm2, smol_tokens):
    with engine.open_model(smollm2, n_ctx=512, logits_all=True, use_file_types=False) as m:
        default = m.logits(smol_tokens)
    with engine.open_model(smollm2, CacheConfig.uniform(N_LAYER, "f16"), n_ctx=512, logits_all=True) as m:
        per_layer = m.logits(smol_tokens)
    assert np.array_equal(default, per_layer)


def test_mixed_config_types_bytes_and_quality(smollm2, smol_tokens):
    info = model_info(smollm2)
    mixed = edge_mixed(N_LAYER)  # K q8_0 in the first and last 3 layers, q4_0 elsewhere; V q4_0
    res = {}
    for name, cfg in (("f16", CacheConfig.uniform(N_LAYER, "f16")), ("q8_0", CacheConfig.uniform(N_LAYER, "q8_0")),
                      ("q4_0", CacheConfig.uniform(N_LAYER, "q4_0")), ("mixed", mixed)):
        with engine.open_model(smollm2, cfg, n_ctx=512, logits_all=True) as m:
            res[name] = m.logits(smol_tokens)
            if name == "mixed":
                caches = m.layer_caches()
                n_cells = m.n_ctx
    # the engine allocated exactly the configured type per layer ...
    assert [c.type_k for c in caches] == list(mixed.type_k)
    assert [c.type_v for c in caches] == list(mixed.type_v)
    assert caches[0].type_k == "q8_0" and caches[3].type_k == "q4_0" and caches[27].type_k == "q8_0"
    # ... and its cache bytes are the per-layer sum of what those types cost
    for c in caches:
        assert (c.bytes_k, c.bytes_v) == mixed.layer_bytes(info, c.layer, n_cells)
    total = sum(c.bytes_k + c.bytes_v for c in caches)
    assert total == sum(sum(mixed.layer_bytes(info, il, n_cells)) for il in range(N_LAYER))
    q4_total = sum(sum(CacheConfig.uniform(N_LAYER, "q4_0").layer_bytes(info, il, n_cells)) for il in range(N_LAYER))
    assert total > q4_total
    # quality sits between uniform q8_0 and uniform q4_0
    kld = {n: float(kld_per_token(res["f16"], res[n]).mean()) for n in ("q8_0", "mixed", "q4_0")}
    assert kld["q8_0"] < kld["mixed"] < kld["q4_0"], kld


def test_gemma3_mixed_config_on_swa_and_full_caches(gemma3):
    info = model_info(gemma3)
    assert info.arch == "gemma3" and any(info.swa_layers) and not all(info.swa_layers)
    n = info.n_layer
    # alternate K types so that both the sliding-window and the full cache hold several types
    cfg = CacheConfig(tuple("q8_0" if il % 2 else "q4_0" for il in range(n)),
                      tuple("q4_0" if il % 3 else "q8_0" for il in range(n)))
    with engine.open_model(gemma3, n_ctx=256, use_file_types=False) as m:
        toks = m.tokenize("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is")
    with engine.open_model(gemma3, CacheConfig.uniform(n, "f16"), n_ctx=2048, logits_all=True) as m:
        base = m.logits(toks)
    with engine.open_model(gemma3, cfg, n_ctx=2048, logits_all=True) as m:
        caches = m.layer_caches()
        got = m.logits(toks)
    assert [c.type_k for c in caches] == list(cfg.type_k)
    assert [c.type_v for c in caches] == list(cfg.type_v)
    # SWA layers get a window-sized cache, full layers the whole context
    swa_cells = {c.bytes_k // T.get(c.type_k).row_bytes(info.n_embd_k(c.layer)) for c in caches if info.swa_layers[c.layer]}
    full_cells = {c.bytes_k // T.get(c.type_k).row_bytes(info.n_embd_k(c.layer)) for c in caches if not info.swa_layers[c.layer]}
    assert len(swa_cells) == 1 and len(full_cells) == 1 and swa_cells != full_cells
    assert np.isfinite(got).all()
    k = kld_per_token(base, got)
    assert 0 < k.mean() < 0.1
    assert (base.argmax(-1) == got.argmax(-1)).mean() > 0.8


def test_state_save_load_continues_identically(smollm2, smol_tokens):
    cfg = edge_mixed(N_LAYER)
    with engine.open_model(smollm2, cfg, n_ctx=512) as m:
        m.reset()
        m.llm.eval(smol_tokens[:200])
        state = m.llm.save_state()
        first = m.generate([smol_tokens[200]], 24)
        m.llm.load_state(state)
        second = m.generate([smol_tokens[200]], 24)
    assert first == second
    # the same state restored into a fresh context with the same per-layer types
    with engine.open_model(smollm2, cfg, n_ctx=512) as m2:
        m2.llm.load_state(state)
        third = m2.generate([smol_tokens[200]], 24)
    assert third == first
    # ... and refused, without a crash, by a context whose types differ
    with engine.open_model(smollm2, CacheConfig.uniform(N_LAYER, "q8_0"), n_ctx=512) as m3:
        with pytest.raises(RuntimeError):
            m3.llm.load_state(state)


def test_session_file_roundtrip(smollm2, smol_tokens, tmp_path):
    import llama_cpp

    cfg = edge_mixed(N_LAYER)
    path = str(tmp_path / "session.bin").encode()
    toks = smol_tokens[:150]
    with engine.open_model(smollm2, cfg, n_ctx=512) as m:
        m.reset()
        m.llm.eval(toks)
        arr = (llama_cpp.llama_token * len(toks))(*toks)
        assert llama_cpp.llama_state_save_file(m.ctx, path, arr, len(toks))
        expect = m.generate([smol_tokens[150]], 16)
    with engine.open_model(smollm2, cfg, n_ctx=512) as m:
        out = (llama_cpp.llama_token * 512)()
        n_out = ctypes.c_size_t(0)
        assert llama_cpp.llama_state_load_file(m.ctx, path, out, 512, ctypes.byref(n_out))
        assert list(out[: n_out.value]) == toks
        m.llm.n_tokens = len(toks)
        m.llm.input_ids[: len(toks)] = toks
        assert m.generate([smol_tokens[150]], 16) == expect




def test_context_shift_with_per_layer_types(smollm2, smol_tokens):
    # uniform per-layer types shift exactly like the stock global types
    g_shift, g_ref = shift_vs_recompute(smollm2, smol_tokens, type_k="q4_0", type_v="q8_0")
    l_shift, l_ref = shift_vs_recompute(smollm2, smol_tokens, config=CacheConfig.uniform(N_LAYER, "q4_0", "q8_0"))
    assert np.array_equal(g_shift, l_shift) and np.array_equal(g_ref, l_ref)
    # f16 K layers (not rotated) beside q4_0 K layers (rotated): each layer shifts in its own way,
    # and the error stays within the two uniform caches' errors added (a layer shifted with the wrong
    # rotation would scramble its keys). The shift is not exact even with an f16 cache (re-RoPE'd keys
    # round differently from fresh ones); on short texts the mix can land below both, and with an
    # AVX-512 build it landed 1.22x above the larger (0.0037 vs 0.0030).
    f_shift, f_ref = shift_vs_recompute(smollm2, smol_tokens, config=CacheConfig.uniform(N_LAYER, "f16", "q8_0"))
    mixed = CacheConfig(tuple("f16" if il % 2 else "q4_0" for il in range(N_LAYER)), ("q8_0",) * N_LAYER)
    m_shift, m_ref = shift_vs_recompute(smollm2, smol_tokens, config=mixed)
    k_f16 = kld_per_token(f_ref, f_shift).mean()
    k_q4 = kld_per_token(g_ref, g_shift).mean()
    k_mixed = kld_per_token(m_ref, m_shift).mean()
    assert k_mixed < k_f16 + k_q4, (k_f16, k_mixed, k_q4)
    assert (m_ref.argmax(-1) == m_shift.argmax(-1)).mean() >= 0.8


def test_context_shift_with_low_bit_k(smollm2, smol_tokens):
    """q3_kv and q2_kv K caches go through the K-shift (dequantise, un-rotate, re-RoPE, rotate,
    requantise on the engine's CPY ops). Shifting costs about one more quantisation of K: measured
    on this text, shift-vs-recompute KLD 2.2x (q3_kv) and 1.1x (q2_kv) the type's own KLD against
    f16 (q4_0: 3.6x). A broken shift (wrong rotation or layout) scrambles the keys: KLD > 1."""
    _, f_ref = shift_vs_recompute(smollm2, smol_tokens, config=CacheConfig.uniform(N_LAYER, "f16", "q8_0"))
    for t in ("q3_kv", "q2_kv"):
        shift, ref = shift_vs_recompute(smollm2, smol_tokens, config=CacheConfig.uniform(N_LAYER, t, "q8_0"))
        k_shift = kld_per_token(ref, shift).mean()
        k_quant = kld_per_token(f_ref, ref).mean()
        assert k_shift < 4 * k_quant + 0.02, (t, k_shift, k_quant)
        assert (ref.argmax(-1) == shift.argmax(-1)).mean() >= 0.6, t


def test_context_shift_of_quantized_k_without_rotation(smollm2, smol_tokens):
    """Stock llama.cpp segfaults here (patches/0003): quantized K, rotation off, context shift.
    Run in a child process so that a crash fails this test instead of the whole session."""
    import json
    import subprocess
    import sys

    code = f"""
from kshift import shift_vs_recompute
from kvtuner_edge.evaluate import kld_per_token
s, r = shift_vs_recompute({str(smollm2)!r}, {list(smol_tokens)!r}, type_k="q4_0", type_v="q8_0")
print(float(kld_per_token(r, s).mean()), float((r.argmax(-1) == s.argmax(-1)).mean()))
"""
    env = dict(os.environ, LLAMA_ATTN_ROT_DISABLE="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    kld, top1 = map(float, p.stdout.split()[-2:])
    assert kld < 0.3 and top1 >= 0.7, (kld, top1)


V_SIMD_TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q3_kv", "q2_kv"]


def _cpu_lib():
    import pathlib

    import llama_cpp
    lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
    ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    for f in ("ggml_cpu_has_avx2", "ggml_cpu_has_f16c", "ggml_cpu_has_fma", "ggml_cpu_has_avx512"):
        getattr(cpu, f).restype = ctypes.c_int
    cpu.ggml_kvq_get_mad.restype = ctypes.c_void_p
    cpu.ggml_kvq_get_mad.argtypes = [ctypes.c_int, ctypes.c_int64]
    return cpu


def test_cpu_simd_v_accumulation_is_bit_identical(smollm2, smol_tokens, tmp_path):
    """patches/0009: the CPU flash attention's one-row kernel accumulates quantized V rows in SIMD
    registers; the logits must be bit for bit those of the stock dequantize-then-mad path
    (KVTUNER_CPU_KV_SIMD=0), for every V type it covers. Each setting in its own process (the switches
    are read once)."""
    import json
    import subprocess
    import sys

    cpu = _cpu_lib()
    if not (cpu.ggml_cpu_has_avx2() and cpu.ggml_cpu_has_fma() and cpu.ggml_cpu_has_f16c()) or cpu.ggml_cpu_has_avx512():
        pytest.skip("the SIMD V path is built for AVX2+FMA+F16C without AVX-512 only")
    code = f"""
import ctypes, json, sys
import numpy as np
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_engine import _cpu_lib, V_SIMD_TYPES
from kvtuner_edge import engine
from kvtuner_edge import types as T
cpu = _cpu_lib()
used = {{t: bool(cpu.ggml_kvq_get_mad(T.get(t).ggml_id, 64)) for t in V_SIMD_TYPES}}
out = {{}}
for t in V_SIMD_TYPES:
    # ubatches of 32 rows: the one-row kernel (prompts of 64+ rows take the tiled one, patch 0012)
    with engine.open_model({str(smollm2)!r}, type_k="q8_0", type_v=t, n_ctx=512, logits_all=True,
                           n_batch=32, n_ubatch=32) as m:
        out[t] = m.logits({list(smol_tokens[:256])!r})
np.savez(sys.argv[1], **out)
print(json.dumps(used))
"""
    res = {}
    for simd in ("1", "0"):
        f = tmp_path / f"simd{simd}.npz"
        # the one-row kernel on both sides (the grouped decode kernel of patch 0015 rounds its softmax
        # differently; test_cpu_grouped_decode_* compare it)
        env = dict(os.environ, KVTUNER_CPU_KV_SIMD=simd, KVTUNER_CPU_FA_GROUP="0")
        p = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, env=env, timeout=900)
        assert p.returncode == 0, p.stderr[-2000:]
        used = json.loads(p.stdout.strip().splitlines()[-1])
        assert all(used.values()) if simd == "1" else not any(used.values()), (simd, used)
        res[simd] = np.load(f)
    for t in V_SIMD_TYPES:
        a, b = res["1"][t], res["0"][t]
        assert np.isfinite(a).all(), t
        assert np.array_equal(a, b), (t, float(np.abs(a - b).max()))


def _has_grouped_decode() -> bool:
    cpu = _cpu_lib()
    cpu.ggml_kvq_get_mad_rows.restype = ctypes.c_void_p
    cpu.ggml_kvq_get_mad_rows.argtypes = [ctypes.c_int, ctypes.c_int64]
    return bool(cpu.ggml_kvq_get_mad_rows(T.get("q8_0").ggml_id, 64))


def test_cpu_grouped_decode_kernel_agrees_with_one_row_kernel(patched_src, tmp_path):
    """patches/0015: the grouped decode kernel (Q heads by KV head, softmax per 32 positions, V rows
    dequantized once, one sequence's positions split over threads) against the stock one-row kernel
    (the graph plan's use_ref) and attention in double from the dequantized K/V, on the op itself:
    scripts/cpu_fa_check.cpp, 300 cases (10 K/V pairs, every candidate K type and f16, GQA 1-16 heads
    per KV head, head sizes 64/128, 1-32 query rows, 100 and 700 positions, masked rows and chunks,
    masks per head, ALiBi, softcap, sinks), two threads."""
    import json
    import pathlib
    import subprocess

    import llama_cpp
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    if not _has_grouped_decode():
        pytest.skip("the grouped kernel needs our SIMD V chunk sum (AVX2+FMA+F16C without AVX-512, or aarch64 NEON)")
    lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
    exe = tmp_path / "cpu_fa_check"
    root = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run(["c++", "-O2", "-std=c++17", f"-I{patched_src / 'ggml' / 'include'}",
                    str(root / "scripts" / "cpu_fa_check.cpp"), f"-L{lib}", "-lggml", "-lggml-base", "-lggml-cpu",
                    f"-Wl,-rpath,{lib}", "-o", str(exe)], check=True, timeout=300)
    p = subprocess.run([str(exe), "2"], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, KVTUNER_CPU_FA_GROUP="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert len(rows) == 300
    for r in rows:
        # the two kernels round the softmax differently: float noise, far below what a wrong head, row,
        # position or stride gives (an output of another head differs by ~ref)
        assert r["diff"] <= 2e-5 * max(1.0, r["ref"]), r
        # and the new kernel is as close to exact attention as the stock one
        assert r["err_op"] <= 1.1 * r["err_stock"] + 1e-5, r
    assert any(r["diff"] > 0 for r in rows)               # the grouped kernel ran: rounding differs somewhere


def test_cpu_grouped_decode_logits_match_one_row_kernel(smollm2, tmp_path):
    """patches/0015 in the engine: SmolLM2 (9 Q heads on 3 KV heads) decoding one token per step, the
    last steps over 512+ positions (the split over threads), grouped kernel against the one-row kernel
    (KVTUNER_CPU_FA_GROUP=0, its own process). On this model a last-bit change of one layer's output
    already moves the logits by a KLD of ~2e-3 (the activations are requantized to 8 bits for every
    matmul; see docs/results/2026-12-01-cpu-grouped), so the paths cannot agree bit for bit: their
    difference must stay in that band, and against the f16 cache the grouped kernel is no worse."""
    import subprocess
    import sys

    if not _has_grouped_decode():
        pytest.skip("the grouped kernel needs our SIMD V chunk sum (AVX2+FMA+F16C without AVX-512, or aarch64 NEON)")
    code = f"""
import sys
import numpy as np
from kvtuner_edge import engine
from kvtuner_edge.demo import eval_tokens
toks = list(eval_tokens({str(smollm2)!r}, 640)[0][:600])
out = {{}}
for name, tk, tv in (("q8", "q8_0", "q8_0"), ("mix", "q4_0", "q3_kv"), ("f16", "f16", "f16")):
    with engine.open_model({str(smollm2)!r}, type_k=tk, type_v=tv, use_file_types=False, n_ctx=1024,
                           logits_all=True, n_batch=1, n_ubatch=1, n_threads=2) as m:
        out[name] = m.logits(toks)
np.savez(sys.argv[1], **out)
"""
    res = {}
    for grp in ("1", "0"):
        f = tmp_path / f"grp{grp}.npz"
        p = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, KVTUNER_CPU_FA_GROUP=grp))
        assert p.returncode == 0, p.stderr[-2000:]
        res[grp] = np.load(f)
    assert np.array_equal(res["1"]["f16"], res["0"]["f16"])   # f16 V keeps the stock kernels
    for name in ("q8", "mix"):
        g, o, ref = res["1"][name], res["0"][name], res["0"]["f16"]
        assert np.isfinite(g).all()
        assert not np.array_equal(g, o), name                  # the grouped kernel ran
        paths = float(kld_per_token(o, g).mean())
        own_g, own_o = float(kld_per_token(ref, g).mean()), float(kld_per_token(ref, o).mean())
        assert paths < 1.5 * own_o + 0.005, (name, paths, own_o)
        assert own_g < 1.25 * own_o + 1e-3, (name, own_g, own_o)
        top1_paths, top1_own = (g.argmax(-1) == o.argmax(-1)).mean(), (ref.argmax(-1) == o.argmax(-1)).mean()
        assert top1_paths > min(0.95, top1_own) - 0.05, (name, top1_paths, top1_own)


@pytest.mark.parametrize("tk,tv", [("q4_0", "q4_0"), ("q8_0", "q3_kv"), ("q3_kv", "q2_kv"), ("f16", "q4_0")])
def test_cpu_prompt_path_of_quantized_cache_agrees_with_row_path(smollm2, smol_tokens, tk, tv):
    """patches/0012: a prompt (ubatches of 64+ rows) with a quantized or mixed cache runs the tiled
    flash-attention kernel on the rows dequantized to f32, ubatches of 32 rows the one-row kernel
    (Q converted to K's vec_dot type). The two must describe the same attention: their logits differ
    (rounding), by no more than the cache's own error, which a wrong row mapping, stride or type in
    the conversion would exceed by far. (That the tiled kernel runs at all is what
    test_calibrate.py's torch-vs-engine band and test-backend-ops' nb=75 cases on a GPU check.)"""
    toks = list(smol_tokens[:300])
    out = {}
    for ub in (512, 32):
        with engine.open_model(smollm2, n_ctx=512, logits_all=True, type_k=tk, type_v=tv, use_file_types=False,
                               n_batch=ub, n_ubatch=ub) as m:
            out[ub] = m.logits(toks)
    with engine.open_model(smollm2, n_ctx=512, logits_all=True, use_file_types=False) as m:
        ref = m.logits(toks)
    assert np.isfinite(out[512]).all()
    assert not np.array_equal(out[512], out[32])            # two kernels, not one
    paths = float(kld_per_token(out[32], out[512]).mean())
    cache = float(kld_per_token(ref, out[512]).mean())      # the cache's error, tiled path
    assert paths < 1.5 * cache + 0.005, (paths, cache)
    top1_paths = (out[32].argmax(-1) == out[512].argmax(-1)).mean()
    top1_cache = (ref.argmax(-1) == out[512].argmax(-1)).mean()
    assert top1_paths > min(0.95, top1_cache) - 0.05, (top1_paths, top1_cache)


def test_explicit_global_type_wins_over_per_layer(smollm2):
    with engine.open_model(smollm2, spec="k=q4_0;v=q4_0", type_k="q8_0", type_v="q8_0", n_ctx=256) as m:
        assert m.layer_types() == (["q8_0"] * N_LAYER, ["q8_0"] * N_LAYER)


def test_environment_variable_override(smollm2, monkeypatch):
    monkeypatch.setenv("KVTUNER_KV_TYPES", "k=q8_0*2,q4_0*28;v=q5_1")
    with engine.open_model(smollm2, n_ctx=256) as m:
        tk, tv = m.layer_types()
    assert tk == ["q8_0"] * 2 + ["q4_0"] * 28 and tv == ["q5_1"] * N_LAYER


def test_gguf_metadata_types_apply_and_off_disables(smollm2, tmp_path):
    tk = ["q8_0"] * 5 + ["q4_0"] * 20 + ["q8_0"] * 5
    tv = ["q4_1"] * N_LAYER
    out = tmp_path / "tuned.gguf"
    write_with_metadata(smollm2, out, {"kvtuner.type_k": tk, "kvtuner.type_v": tv})
    assert model_info(out).type_k == tk
    with engine.open_model(out, n_ctx=256) as m:
        assert m.layer_types() == (tk, tv)
    with engine.open_model(out, n_ctx=256, use_file_types=False) as m:
        assert m.layer_types() == (["f16"] * N_LAYER, ["f16"] * N_LAYER)
    with engine.open_model(out, CacheConfig.uniform(N_LAYER, "q5_0"), n_ctx=256) as m:
        assert m.layer_types() == (["q5_0"] * N_LAYER, ["q5_0"] * N_LAYER)


@pytest.mark.parametrize("spec,flash,message", [
    ("k=q8_0*3,q4_0*20;v=q4_0", True, "23 K cache types given, but the model has 30 layers"),
    ("k=q8_0;v=q4_0*29", True, "29 V cache types given, but the model has 30 layers"),
    ("k=q8_0*3,q9_0*27;v=q4_0", True, "layer 3: unknown K cache type 'q9_0'"),
    ("k=q4_K;v=q8_0", True, "layer 0: K cache type q4_K is not a KV cache type (f32, f16, q4_0"),
    ("k=f16;v=f16*10,q4_0*20", False, "layer 10: quantized V cache type q4_0 requires flash attention, which is disabled"),
    ("k=q8_0;x=q4_0", True, "cannot parse 'x=q4_0'"),
    ("k=q8_0*0,q4_0*30;v=f16", True, "bad repeat count '0'"),
])
def test_engine_refuses_bad_config_with_message(smollm2, spec, flash, message):
    with pytest.raises(ConfigError) as ei:
        engine.open_model(smollm2, spec=spec, flash_attn=flash, n_ctx=256)
    assert message in str(ei.value)
    # the engine is still usable afterwards
    with engine.open_model(smollm2, n_ctx=256) as m:
        assert m.layer_types()[0] == ["f16"] * N_LAYER


# accepted and refused override specs (SmolLM2: 30 layers), sent through the Python pre-check and the engine
OVERRIDE_SPECS = [
    "k=q8_0*2,q4_0*28;v=q5_1", "off", " off ", "k=Q8_0", "v=q4_0", ' "k=q8_0*30" ; ', "K = q8_0 * 30 ;V=q3_kv",
    "k=q8_0*007,q4_0*23", ";;k=q8_0;", "k=q8_0*3,q4_0*20;v=q4_0", "k=q8_0;v=q4_0*29", "k=q8_0*3,q9_0*27",
    "k=q4_K;v=q8_0", "k=q8_0;x=q4_0", "k=q8_0*0,q4_0*30", "k=q8_0;k=q4_0", "k=q8_0,", "k=", "k", "=q8_0",
    "k=q8_0*", "k=q8_0*-1,q4_0*31", "k=q8_0*+3,q4_0*27", "k=q8_0*3x,q4_0*27", "k=q8_0*31",
    "k=q8_0*99999999999999999999", "k=q8_0*4294967326", "k=q8_0*2147483648,q4_0*28", "k=q8_0*29,q4_0*2",
    "k=q3_\u212av", "k=q8_0*\u0663", "k=f32;v=bf16", "k=q2_0*30;v=iq4_nl*30", "v=q8_0*15,q4_0*15;k=q5_1",
]


@pytest.mark.parametrize("spec", OVERRIDE_SPECS)
def test_override_precheck_agrees_with_engine(smollm2, spec):
    """KVTUNER_KV_TYPES is pre-checked before the model loads (engine.precheck_override); the pre-check
    must refuse exactly what the engine's own parser refuses, with its message."""
    try:
        engine.precheck_override(spec, N_LAYER, source="override")
        pre = None
    except ConfigError as e:
        pre = str(e)
    try:
        with engine.open_model(smollm2, spec=spec, n_ctx=64):
            eng = None
    except ConfigError as e:
        eng = str(e)
    assert (pre is None) == (eng is None), (spec, pre, eng)
    if pre is not None:
        m = re.match(r"(kvtuner \(override\): layer \d+:) (\w) cache type '(.*)' is not", pre)
        if m:   # a name that is no cache type: the engine words ggml's other types differently
            assert m.group(1) in eng and m.group(2) in eng and m.group(3).strip() in eng, (pre, eng)
        else:
            assert pre in eng, (pre, eng)


def test_bad_environment_override_is_refused_before_the_model_loads(smollm2, monkeypatch):
    """A bad KVTUNER_KV_TYPES fails with the engine's wording before the engine is asked to load the model
    (the load is what made such refusals take seconds: docs/results/2026-12-02-fuzz-after-fixes/)."""
    import llama_cpp

    loads = []
    monkeypatch.setattr(llama_cpp, "Llama", lambda *a, **k: loads.append(a) or pytest.fail("the model was loaded"))
    monkeypatch.setenv("KVTUNER_KV_TYPES", "k=q8_0*3,q4_0*20;v=q4_0")
    with pytest.raises(ConfigError, match=r"kvtuner \(KVTUNER_KV_TYPES\): 23 K cache types given, but the model has 30"):
        engine.open_model(smollm2, n_ctx=64)
    assert loads == []
    monkeypatch.undo()
    monkeypatch.setenv("KVTUNER_KV_TYPES", "k=q8_0*3,q4_0*27;v=q4_0")      # a good one still reaches the engine
    with engine.open_model(smollm2, n_ctx=64) as m:
        assert m.layer_types()[0] == ["q8_0"] * 3 + ["q4_0"] * 27


def test_backend_flash_attention_support_is_checked(smollm2):
    """On the CPU every catalogue type runs in flash attention, so the check passes for all of them;
    scripts/gpu_engine_check.sh proves the refusal (iq4_nl on CUDA) on the GPU machine."""
    for name in T.CANDIDATES:
        with engine.open_model(smollm2, CacheConfig.uniform(N_LAYER, name, "q8_0"), n_ctx=256) as m:
            assert m.layer_types()[0] == [name] * N_LAYER


def test_python_side_validation(smollm2):
    info = model_info(smollm2)
    with pytest.raises(ConfigError, match="configuration has 29 layers"):
        CacheConfig.uniform(29, "q8_0").validate(info)
    with pytest.raises(ConfigError, match="layer 4: unknown K cache type 'q3_x'"):
        CacheConfig(("q8_0",) * 4 + ("q3_x",), ("q8_0",) * 5)
    with pytest.raises(ConfigError, match="layer 0: K type iq4_nl is not a cuda flash-attention type"):
        CacheConfig.uniform(N_LAYER, "iq4_nl").validate(info, backend="cuda")
    with pytest.raises(ConfigError, match="metal flash attention needs the same K and V type"):
        CacheConfig.uniform(N_LAYER, "q8_0", "q4_0").validate(info, backend="metal")


def test_bad_model_files(tmp_path, smollm2):
    with pytest.raises(ModelFileError, match="no such file"):
        engine.open_model(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        engine.open_model(junk)
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        cut.write_bytes(f.read(os.path.getsize(smollm2) // 2))
    with pytest.raises(ModelFileError, match="truncated GGUF file"):
        engine.open_model(cut)


def test_block_size_must_divide_head_size(tmp_path):
    """A model with 48-wide heads (random weights, written here) cannot take block-32 cache types."""
    from kvtuner_edge.random_model import write

    p = tmp_path / "head48.gguf"
    write("tiny-head48", p)
    assert model_info(p).head_k == [48] * 4
    with pytest.raises(ConfigError, match="layer 0: K type q4_0 has block size 32, which does not divide the K head size 48"):
        engine.open_model(p, CacheConfig.uniform(4, "q4_0", "f16"))
    # the engine's own check (the spec bypasses the Python validation) names the layer too
    with pytest.raises(ConfigError, match="layer 2: V cache type q8_0 has block size 32, which does not divide "
                                          "the V head size 48"):
        engine.open_model(p, spec="k=f16;v=f16*2,q8_0*2")
    with engine.open_model(p, CacheConfig.uniform(4, "f16", "bf16"), n_ctx=128) as m:
        assert m.layer_types() == (["f16"] * 4, ["bf16"] * 4)


def test_random_writer_rope_kinds(tmp_path):
    """The random-weight writer's RoPE variants (the GPU fusion suite's models) are what they claim: a
    qwen2 file with Q/K/V biases and a llama file with frequency factors that the engine applies (same
    weights as the file without: the first position, where RoPE is the identity, gives the same logits,
    later ones do not), and both run with a rotated quantized cache."""
    from kvtuner_edge.gguf_io import read_header
    from kvtuner_edge.random_model import write

    paths = {}
    for name, kw in (("plain", {}), ("ff", {"rope_freqs": True}), ("qwen2", {"arch": "qwen2"})):
        paths[name] = tmp_path / f"{name}.gguf"
        write("tiny-head128", paths[name], **kw)
    assert model_info(paths["qwen2"]).arch == "qwen2" and model_info(paths["ff"]).arch == "llama"
    assert "blk.0.attn_k.bias" in {ti.name for ti in read_header(paths["qwen2"]).tensors}
    assert "rope_freqs.weight" in {ti.name for ti in read_header(paths["ff"]).tensors}
    toks = [5 + 37 * i for i in range(24)]
    logits = {}
    for name, p in paths.items():
        with engine.open_model(p, CacheConfig.uniform(4, "q4_0", "q4_0"), n_ctx=64, logits_all=True) as m:
            logits[name] = m.logits(toks)
        assert np.isfinite(logits[name]).all()
    assert np.array_equal(logits["plain"][0], logits["ff"][0])
    assert np.abs(logits["plain"][1:] - logits["ff"][1:]).max() > 1e-3


def test_sequence_copy_across_streams_with_per_layer_types(smollm2, smol_tokens):
    """Two sequences in separate streams (kv_unified off): llama_memory_seq_cp copies every layer's
    K and V stream in its own type, so both sequences continue identically."""
    import llama_cpp

    cfg = edge_mixed(N_LAYER)
    with engine.open_model(smollm2, cfg, n_ctx=256) as m:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 1024, 512, 512
        params.n_seq_max, params.kv_unified = 2, False
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = os.cpu_count() or 1
        with engine._override(cfg.spec()):
            ctx = llama_cpp.llama_init_from_model(m.llm.model, params)
        assert ctx
        try:
            lib = engine._bind()
            assert [T.name_of(lib.llama_kvtuner_layer_type(ctx, il, False)) for il in range(N_LAYER)] == list(cfg.type_k)
            batch = llama_cpp.llama_batch_init(512, 0, 2)
            try:
                def decode(items):  # items: (token, pos, seq, want_logits)
                    batch.n_tokens = len(items)
                    for i, (tok, pos, seq, want) in enumerate(items):
                        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                        batch.seq_id[i][0], batch.logits[i] = seq, want
                    assert llama_cpp.llama_decode(ctx, batch) == 0

                prompt = smol_tokens[:120]
                decode([(t, p, 0, p == len(prompt) - 1) for p, t in enumerate(prompt)])
                mem = llama_cpp.llama_get_memory(ctx)
                llama_cpp.llama_memory_seq_cp(mem, 0, 1, -1, -1)
                nxt = smol_tokens[120]
                decode([(nxt, 120, 0, True), (nxt, 120, 1, True)])
                n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(m.llm.model))
                a = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 0), shape=(n_vocab,)).copy()
                b = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, 1), shape=(n_vocab,)).copy()
            finally:
                llama_cpp.llama_batch_free(batch)
        finally:
            llama_cpp.llama_free(ctx)
    assert np.isfinite(a).all() and np.abs(a).max() > 1
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
