"""`kvtuner-edge bench` on the real engine (CPU): structure, memory accounting, budgets, resume, errors.

Speed goals live in scripts/gpu_bench.sh (figures in docs/results/throughput.md); here only what must hold on any
machine: the f16 reference is 1.0 of itself, KV bytes follow the types' storage bits, the budget run
fits its budget, results resume, bad input is refused clearly."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvtuner_edge import bench
from kvtuner_edge.cli import main
from kvtuner_edge.config import CacheConfig
from kvtuner_edge.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kvtuner_edge.random_model import write

    p = tmp_path_factory.mktemp("bench") / "tiny.gguf"
    write("tiny", p)
    return p


@pytest.fixture(scope="module")
def result(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out") / "r.json"
    cfg = tmp_path_factory.mktemp("cfg") / "mix.json"
    cfg.write_text(json.dumps(CacheConfig(("q8_0", "q4_0", "q3_kv", "q4_0"), ("q4_0", "q2_kv", "q3_kv", "q4_0")).to_dict()))
    res = bench.run(tiny, [str(cfg), "q8_0/q4_0"], batches=[1, 3], depths=[200], gen=4, warmup=1, gpu_layers=0,
                    kv_budget="1MiB", out=out)
    return res, out, cfg


def test_points_and_ratios(result):
    res, _, _ = result
    assert res["random_weights"] is True and "random-weight" in res["note"]
    names = {p["config"] for p in res["points"]}
    assert names == {"f16", "q8_0", "q4_0", "mix", "q8_0/q4_0"}
    assert len(res["points"]) == 5 * 2
    for p in res["points"]:
        assert p["decode_tps"] > 0 and p["prefill_tps"] > 0 and p["kv_bytes"] > 0
        if p["config"] == "f16":
            assert p["decode_vs_f16"] == pytest.approx(1.0) and p["kv_vs_f16"] == pytest.approx(1.0)
    # the engine allocates what the types' storage bits say: q8_0 34/64 of f16, q4_0 18/64, q8_0+q4_0 26/64
    by = {(p["config"], p["batch"]): p for p in res["points"]}
    assert by[("q8_0", 3)]["kv_vs_f16"] == pytest.approx(34 / 64, rel=1e-6)
    assert by[("q4_0", 3)]["kv_vs_f16"] == pytest.approx(18 / 64, rel=1e-6)
    assert by[("q8_0/q4_0", 1)]["kv_vs_f16"] == pytest.approx(26 / 64, rel=1e-6)
    # three sequences hold three times the cells of one
    assert by[("mix", 3)]["kv_bytes"] == 3 * by[("mix", 1)]["kv_bytes"]
    assert by[("mix", 1)]["bits_storage"] == pytest.approx((8.5 + 4.5 + 4 + 4.5 + 4.5 + 3 + 4 + 4.5) / 8)


def test_budget_fits_and_orders(result):
    res, _, _ = result
    b = res["budget"]
    assert b["kv_bytes"] == 2**20
    fits = b["max_seqs"]
    # fewer bits per element: more sequences in the same memory
    assert fits["f16"] < fits["q8_0"] < fits["q4_0"]
    for p in b["points"]:
        assert p["kv_bytes"] <= b["kv_bytes"], p
        assert p["batch"] == min(fits[p["config"]], b["capped_at"])
        assert p["decode_vs_f16_at_budget"] is not None


def test_resume_reuses_points(result, tiny):
    res, out, cfg = result
    saved = json.loads(out.read_text())
    assert saved["points"] == res["points"]
    msgs = []
    again = bench.run(tiny, [str(cfg), "q8_0/q4_0"], batches=[1, 3], depths=[200], gen=4, warmup=1, gpu_layers=0,
                      kv_budget="1MiB", out=out, progress=msgs.append)
    assert any("resuming" in m for m in msgs)
    assert again["points"] == res["points"]          # nothing re-measured


def test_cli_json_and_plot(tiny, tmp_path):
    png = tmp_path / "t.png"
    r = CliRunner().invoke(main, ["bench", str(tiny), "--configs", "q4_0/q8_0", "--batch", "2", "--depth", "64",
                                  "--gen", "2", "--gpu-layers", "0", "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert {p["config"] for p in d["points"]} == {"f16", "q8_0", "q4_0", "q4_0/q8_0"}
    assert all("decode_vs_f16" in p and "prefill_tps" in p and "kv_bytes" in p for p in d["points"])
    assert png.stat().st_size > 10_000


def test_bad_input(tiny, tmp_path):
    with pytest.raises(ConfigError, match="no kvtuner per-layer config"):
        bench.run(tiny, ["file"], batches=[1], depths=[16], gpu_layers=0)
    with pytest.raises(ConfigError, match="q9_9"):
        bench.run(tiny, ["q9_9"], batches=[1], depths=[16], gpu_layers=0)
    with pytest.raises(ConfigError, match="size"):
        bench.parse_size("lots")
    assert bench.parse_size("1.5GiB") == 3 * 2**29
    r = CliRunner().invoke(main, ["bench", str(tiny), "--batch", "0", "--gpu-layers", "0"])
    assert r.exit_code != 0 and "positive" in r.output
    with pytest.raises(ConfigError, match="cannot write"):
        bench.run(tiny, None, batches=[1], depths=[16], gpu_layers=0, out="/proc/kvtuner-bench.json")
    # a config of the wrong depth is refused before anything runs
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(CacheConfig.uniform(3, "q8_0", "q4_0").to_dict()))
    r = CliRunner().invoke(main, ["bench", str(tiny), "--configs", str(bad), "--gpu-layers", "0"])
    assert r.exit_code == 1 and "error:" in r.output and "3" in r.output
