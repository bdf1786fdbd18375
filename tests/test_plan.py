"""Memory planning on the real engine and models: plan's figures, export --kv-memory / --memory (the
exported cache as the engine allocates it fits, and nothing the search measured that also fits has a
lower predicted KLD), the smallest memory named when nothing fits, and bad input."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvtuner_edge import CacheConfig, engine
from kvtuner_edge import plan as P
from kvtuner_edge.cli import main
from kvtuner_edge.errors import ConfigError
from kvtuner_edge.gguf_io import model_info, read_header
from kvtuner_edge.tune import find_searches

from conftest import SMALL  # noqa: E402  (tests/ is on sys.path under pytest)

CTX = 32768
MiB = 2**20


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def engine_context(path, ctx):
    """A real context of the file's own cache with n_ctx=ctx: (per-layer KV bytes, the engine's buffer
    report lines parsed: model, KV, compute and output buffer sizes)."""
    with engine._captured_log() as lines:
        with engine.open_model(path, n_ctx=ctx) as m:
            kv = m.cache_bytes()
            assert m.n_ctx == ctx
    return kv, engine.buffer_sizes(lines)


def mixed(n_layer):
    """A per-layer mix of every block size (f16, q8_0, q4_1, q3_kv 16 B and q2_kv 12 B per 32 values)."""
    cycle = ["f16", "q8_0", "q4_1", "q3_kv", "q2_kv"]
    return CacheConfig(tuple(cycle[i % 5] for i in range(n_layer)), tuple(cycle[(i + 2) % 5] for i in range(n_layer)))


# the KV cache as the engine allocates it ------------------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_kv_bytes_are_what_the_engine_allocates(which, request):
    path = request.getfixturevalue(which)
    info = model_info(path)
    cfgs = [CacheConfig.uniform(info.n_layer, t) for t in ("f16", "q8_0", "q3_kv", "q2_kv")] + [mixed(info.n_layer)]
    with engine.MemoryProbe(path) as probe:
        for cfg in cfgs:
            for ctx, n_seq in ((256, 1), (1000, 3), (CTX, 1), (5000, 4), (131072, 2)):
                got = probe.context(ctx, n_seq, config=cfg)
                assert got["kv_bytes"] == P.kv_bytes(info, cfg, ctx, n_seq), (cfg.short(), ctx, n_seq)
                assert got["type_k"] == list(cfg.type_k)
                assert got["compute_bytes"] > 0 and got["output_bytes"] > 0
        assert probe.weight_bytes > 0.9 * info.path.stat().st_size
    # bytes per token from the block sizes: q3_kv 16 and q2_kv 12 bytes per 32 values
    per_value = sum(info.n_embd_k(il) + info.n_embd_v(il) for il in info.kv_layers)
    assert CacheConfig.uniform(info.n_layer, "q3_kv").bytes_per_token(info) == per_value * 16 / 32
    assert CacheConfig.uniform(info.n_layer, "q2_kv").bytes_per_token(info) == per_value * 12 / 32


def test_no_alloc_probe_agrees_with_a_real_context(gemma3):
    """The probe's contexts are llama.cpp's memory-fit mode (nothing allocated); a real context of the
    same shape reports the same KV, compute and output buffers (the SWA and full caches of Gemma-3)."""
    info = model_info(gemma3)
    cfg = mixed(info.n_layer)
    with engine.MemoryProbe(gemma3) as probe:
        fake = probe.context(4096, 2, config=cfg)
        weights = probe.weights
    with engine._captured_log() as lines:
        with engine.BatchRunner(gemma3) as runner:
            with runner.context(2, 4096, spec=cfg.spec(), n_batch=512, swa_full=False) as c:
                real_kv = c.kv_bytes()
    sizes = engine.buffer_sizes(lines)
    assert real_kv == fake["kv_bytes"]
    assert abs(sum(sizes["KV"].values()) - real_kv) <= 0.01 * MiB       # the report has two decimals of MiB
    assert sizes["compute"] == fake["compute"] and sizes["output"] == fake["output"]
    assert sizes["model"] == weights


# plan ----------------------------------------------------------------------------------------------------

def test_size_parsing():
    assert P.parse_size("6GiB") == 6 * 2**30 and P.parse_size("6 gb") == 6 * 10**9
    assert P.parse_size("1.5G") == 3 * 2**29 and P.parse_size("512MiB") == 512 * MiB and P.parse_size("8e9") == 8e9
    for bad, msg in (("lots", "cannot read"), ("0", "not a usable size"), ("-1GiB", "not a usable size"),
                     ("inf", "not a usable size"), ("nan", "not a usable size"), ("1e30", "larger than any")):
        with pytest.raises(ConfigError, match=msg):
            P.parse_size(bad, "--memory")


def test_plan_without_a_search(gemma3):
    r = run("plan", gemma3, "--kv-memory", "64MiB", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    info = model_info(gemma3)
    names = [row["name"] for row in d["rows"]]
    assert names[:9] == ["f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "q3_kv", "q2_kv"]
    for row in d["rows"]:
        cfg = CacheConfig(tuple(row["type_k"]), tuple(row["type_v"]))
        assert row["bytes_per_token"] == cfg.bytes_per_token(info)
        assert row["kv_bytes"] == P.kv_bytes(info, cfg, info.n_ctx_train)
        # the longest context: fits, and 256 more tokens do not
        c = row["max_ctx"]
        assert c % 256 == 0 and P.kv_bytes(info, cfg, c) <= 64 * MiB < P.kv_bytes(info, cfg, c + 256)


def test_plan_with_the_searched_front_and_memory(smol_work):
    r = run("export", smol_work, "--budget", 5.0, "--budget-unit", "storage", "--no-check", "-o",
            smol_work.with_name("plan-b5.gguf"), *SMALL)
    assert r.exit_code == 0, r.output
    info = model_info(smol_work)
    mem = 1536 * MiB
    r = run("plan", smol_work, "--memory", "1536MiB", "--ctx", CTX, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    searched = [row for row in d["rows"] if row["kind"] == "searched"]
    assert searched and d["search"]["calibration"].startswith("self-generated (128 tokens")
    # every searched row is a configuration the search measured, with its KLD; the front falls in KLD as KV grows
    points = {CacheConfig(tuple(p.type_k), tuple(p.type_v)).spec(): p.kld
              for s in find_searches(smol_work) for p in s["result"].points}
    for a, b in zip(searched, searched[1:]):
        assert a["kv_bytes"] <= b["kv_bytes"] and a["predicted_kld"] > b["predicted_kld"]
    for row in searched:
        assert row["predicted_kld"] == pytest.approx(points[CacheConfig(tuple(row["type_k"]), tuple(row["type_v"])).spec()])
    uni = {row["name"]: row for row in d["rows"]}
    assert uni["q8_0"]["predicted_kld"] is not None and uni["q4_0"]["predicted_kld"] > uni["q8_0"]["predicted_kld"]
    # --memory: the whole context as the engine reports it, and the most sequences that fit
    with engine.MemoryProbe(smol_work) as probe:
        for row in (uni["f16"], uni["q4_0"], searched[len(searched) // 2]):
            cfg = CacheConfig(tuple(row["type_k"]), tuple(row["type_v"]))
            n = row["max_seqs"]
            assert n >= 1
            assert probe.context(CTX, n, config=cfg)["total_bytes"] <= mem < probe.context(CTX, n + 1, config=cfg)["total_bytes"]
            assert row["total_bytes"] == probe.context(CTX, 1, config=cfg)["total_bytes"]
    assert d["engine"]["weight_bytes"] == sum(d["engine"]["weights"].values()) > 90 * MiB
    # the text table has the same rows
    t = run("plan", smol_work, "--memory", "1536MiB", "--ctx", CTX)
    assert t.exit_code == 0 and t.output.count("  searched ") == len(searched) and "max seqs" in t.output


def test_plan_longest_context_within_memory(smol_work):
    info = model_info(smol_work)
    r = run("plan", smol_work, "--memory", "400MiB", "--seqs", 2, "--types", "q8_0,q4_0", "--json")
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)["rows"]}
    with engine.MemoryProbe(smol_work) as probe:
        for name in ("q8_0", "q4_0", "K q8_0 / V q4_0"):
            cfg = CacheConfig(tuple(rows[name]["type_k"]), tuple(rows[name]["type_v"]))
            c = rows[name]["max_ctx"]
            assert c > 0 and c % 256 == 0
            assert probe.context(c, 2, config=cfg)["total_bytes"] <= 400 * MiB
            assert probe.context(c + 256, 2, config=cfg)["total_bytes"] > 400 * MiB
    assert rows["q4_0"]["max_ctx"] > rows["K q8_0 / V q4_0"]["max_ctx"] > rows["q8_0"]["max_ctx"]


def test_plan_names_the_smallest_when_nothing_fits(smollm2):
    info = model_info(smollm2)
    need = P.kv_bytes(info, CacheConfig.uniform(info.n_layer, "q2_kv"), 4096)
    r = run("plan", smollm2, "--kv-memory", need - 1, "--ctx", 4096)
    assert r.exit_code == 0, r.output
    assert "nothing listed fits" in r.output and f"the smallest, q2_kv, needs {P.format_size(need, up=True)} ({need} bytes)" in r.output
    r = run("plan", smollm2, "--kv-memory", need, "--ctx", 4096)
    assert "nothing listed fits" not in r.output


@pytest.mark.parametrize("args, message", [
    (["--memory", "lots"], "--memory: cannot read 'lots' as a size"),
    (["--kv-memory", "0"], "not a usable size"),
    (["--memory", "1GiB", "--kv-memory", "1GiB"], "give either --memory"),
    (["--ctx", 0], "--ctx must be at least 1"),
    (["--seqs", 0], "--seqs must be 1 to 256"),
    (["--seqs", 300], "--seqs must be 1 to 256"),
    (["--types", "q9_9"], "unknown cache type 'q9_9'"),
])
def test_plan_bad_input(smollm2, args, message):
    r = run("plan", smollm2, *args)
    assert r.exit_code == 1 and message in r.output, r.output


# export --kv-memory / --memory ------------------------------------------------------------------------------

def _fitting(model, ctx, n_seq, fits):
    """Every configuration the model's storage-bit search measured (uniform baselines included) that fits."""
    info = model_info(model)
    out = []
    for s in find_searches(model):
        if s["meta"]["unit"] != "storage":
            continue
        cands = [(p.type_k, p.type_v, p.kld) for p in s["result"].points]
        cands += [([b["type_k"]] * info.n_layer, [b["type_v"]] * info.n_layer, b["kld"]) for b in s["baselines"]]
        for tk, tv, kld in cands:
            cfg = CacheConfig(tuple(tk), tuple(tv))
            if fits(cfg):
                out.append((kld, cfg))
    return out


@pytest.mark.parametrize("which, kv_mib", [("smol_work", 300), ("gemma_work", 45)])
def test_export_kv_memory_fits_and_is_the_least_loss_that_fits(which, kv_mib, request, tmp_path):
    model = request.getfixturevalue(which)
    info = model_info(model)
    out = tmp_path / "fit.gguf"
    mem = kv_mib * MiB
    r = run("export", model, "--ctx", CTX, "--kv-memory", f"{kv_mib}MiB", "-o", out, "--eval-tokens", 128, "--json",
            *SMALL)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    md = read_header(out).metadata
    assert md["kvtuner.ctx"] == CTX and md["kvtuner.n_seq"] == 1 and md["kvtuner.memory"] == mem
    assert md["kvtuner.memory_scope"] == "kv cache" and md["kvtuner.budget_unit"] == "storage"
    # the file's KV cache at the asked context, as the engine allocates it, fits
    kv, sizes = engine_context(out, CTX)
    assert kv == md["kvtuner.kv_bytes_at_ctx"] == d["memory"]["kv_bytes"] <= mem
    assert sum(sizes["KV"].values()) <= mem
    # and no configuration the search measured that fits has a lower predicted KLD
    fit = _fitting(model, CTX, 1, lambda c: P.kv_bytes(info, c, CTX) <= mem)
    assert min(k for k, _ in fit) == pytest.approx(d["predicted_kld"])
    # (a real choice: the best configuration of all does not fit)
    assert any(P.kv_bytes(info, c, CTX) > mem for _, c in
               _fitting(model, CTX, 1, lambda c: True) if _ < d["predicted_kld"])
    # the engine reads the file with the extra keys, and inspect shows the KV cache at the fitted context
    with engine.open_model(out, n_ctx=256) as m:
        assert m.llm.metadata["kvtuner.ctx"] == str(CTX)        # the engine's own metadata
        assert m.layer_types() == (d["type_k"], d["type_v"])
    r = run("inspect", out)
    assert f"KV cache at {CTX} tokens: {kv / MiB:.2f} MiB (the context the file was fitted for" in r.output
    assert f"kvtuner.ctx = {CTX}" in r.output
    # the engine check was recorded for plan
    p = json.loads(run("plan", model, "--kv-memory", f"{kv_mib}MiB", "--ctx", CTX, "--json").stdout)
    row = next(x for x in p["rows"] if x["type_k"] == d["type_k"] and x["type_v"] == d["type_v"])
    assert row["engine_kld"] == pytest.approx(d["rows"][0]["engine_kld"])


def test_export_memory_counts_weights_and_engine_buffers(gemma_work, tmp_path):
    """--memory: weights + KV + compute + output of a real context of the file at the asked length, as the
    engine reports them, fit; no fitting configuration the search measured has a lower predicted KLD."""
    info = model_info(gemma_work)
    out = tmp_path / "fit-total.gguf"
    mem = 810 * MiB
    r = run("export", gemma_work, "--ctx", CTX, "--memory", "810MiB", "-o", out, "--no-check", "--json", *SMALL)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    kv, sizes = engine_context(out, CTX)
    total = sum(sum(sizes[k].values()) for k in ("model", "compute", "output")) + kv
    assert total <= mem and d["memory"]["total_bytes"] <= mem
    assert abs(total - d["memory"]["total_bytes"]) <= 0.05 * MiB      # the report's two decimals, five buffers
    with engine.MemoryProbe(gemma_work) as probe:
        fit = _fitting(gemma_work, CTX, 1, lambda c: probe.context(CTX, 1, config=c)["total_bytes"] <= mem)
    assert min(k for k, _ in fit) == pytest.approx(d["predicted_kld"])
    assert read_header(out).metadata["kvtuner.memory_scope"] == "weights + kv cache + engine buffers"


def test_too_little_memory_names_the_smallest_that_fits(smol_work, tmp_path):
    info = model_info(smol_work)
    need = P.kv_bytes(info, CacheConfig.uniform(info.n_layer, "q4_0"), CTX)        # 202.50 MiB
    r = run("export", smol_work, "--ctx", CTX, "--kv-memory", need - 1, "-o", tmp_path / "x.gguf", *SMALL)
    assert r.exit_code == 1
    assert f"the smallest, q4_0 in every layer, needs {P.format_size(need, up=True)} ({need} bytes" in r.output
    assert not (tmp_path / "x.gguf").exists()
    # exactly that much: the smallest cache is exported
    r = run("export", smol_work, "--ctx", CTX, "--kv-memory", need, "-o", tmp_path / "x.gguf", "--no-check",
            "--json", *SMALL)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d["type_k"]) == set(d["type_v"]) == {"q4_0"} and d["memory"]["kv_bytes"] == need
    # --memory: the weights and the engine's buffers come on top, and the message says so
    r = run("export", smol_work, "--ctx", CTX, "--memory", "300MiB", "-o", tmp_path / "y.gguf", *SMALL)
    assert r.exit_code == 1 and "needs" in r.output and "weights" in r.output and "as the engine reports them" in r.output
    with engine.MemoryProbe(smol_work) as probe:
        total = probe.context(CTX, 1, config=CacheConfig.uniform(info.n_layer, "q4_0"))["total_bytes"]
    assert f"({total} bytes" in r.output
    # a context no cache of any candidate type fits (the 9 default types: q2_kv the smallest)
    r = run("export", smol_work, "--ctx", 2**24, "--kv-memory", "1GiB", "-o", tmp_path / "z.gguf")
    assert r.exit_code == 1 and "the smallest, q2_kv in every layer, needs" in r.output


@pytest.mark.parametrize("args, message", [
    (["--kv-memory", "1GiB"], "--kv-memory needs --ctx N"),
    (["--ctx", 4096, "--budget", 5], "--ctx goes with --kv-memory or --memory"),
    (["--ctx", 4096, "--budget", 5, "--kv-memory", "1GiB"], "got --budget and --kv-memory"),
    (["--ctx", 4096, "--kv-memory", "lots"], "--kv-memory: cannot read 'lots' as a size"),
    (["--ctx", 0, "--kv-memory", "1GiB"], "--ctx must be a positive number of tokens"),
    (["--ctx", 4096, "--seqs", 999, "--kv-memory", "1GiB"], "--seqs must be 1 to 256"),
    (["--ctx", 4096, "--kv-memory", "1GiB", "--budget-unit", "nominal"], "--budget-unit nominal does not apply"),
    (["--ctx", 4096, "--kv-memory", "1GiB", "-o", "/sys/x.gguf"], "output folder is not writable"),
    (["--ctx", 4096, "--kv-memory", "1GiB", "-o", "/nonexistent/x.gguf"], "output folder does not exist"),
])
def test_export_memory_bad_input_before_any_work(smollm2, args, message):
    r = run("export", smollm2, *args, *SMALL)
    assert r.exit_code == 1 and message in r.output, r.output
