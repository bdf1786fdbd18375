"""`export --budget` end to end on the real model and engine (small settings: a short calibration,
two candidate types, a small NSGA-II), its cache, its plots, and its refusals of bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtuner_edge import engine
from kvtuner_edge.cli import main
from kvtuner_edge.gguf_io import read_header

from conftest import SMALL  # noqa: E402  (tests/ is on sys.path under pytest)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def work(smol_work):
    return smol_work      # shared with test_plan.py: one profile per session


@pytest.fixture(scope="module")
def budget_run(work):
    r = run("export", work, "--budget", 6.0, "--eval-tokens", 256, "--json", *SMALL)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_export_budget_writes_the_pick_with_provenance(work, budget_run):
    out = work.with_name("smol.kvtuner.gguf")
    assert budget_run["output"] == str(out)
    assert budget_run["bits_nominal"] <= 6.0 + 1e-9
    h = read_header(out)
    md = h.metadata
    assert md["kvtuner.type_k"] == budget_run["type_k"] and md["kvtuner.type_v"] == budget_run["type_v"]
    assert set(md["kvtuner.type_k"] + md["kvtuner.type_v"]) <= {"q8_0", "q4_0"}
    assert md["kvtuner.budget"] == pytest.approx(6.0) and md["kvtuner.budget_unit"] == "nominal"
    assert md["kvtuner.source"] == "search" and md["kvtuner.candidate_types"] == ["q8_0", "q4_0"]
    assert md["kvtuner.predicted_kld"] == pytest.approx(budget_run["predicted_kld"], rel=1e-6)
    assert "self-generated" in md["kvtuner.calibration"]
    # the engine allocates exactly the picked types
    with engine.open_model(out, n_ctx=128) as m:
        assert m.layer_types() == (budget_run["type_k"], budget_run["type_v"])
    # the engine check: the pick against uniform caches, on held-out text, with the floor
    rows = {r["cache"]: r for r in budget_run["rows"]}
    assert "chosen" in rows and "q4_0" in rows
    assert rows["chosen"]["engine_kld"] < rows["q4_0"]["engine_kld"]
    assert rows["chosen"]["floor_kld"] > 0


def test_front_json_and_plots(budget_run):
    files = budget_run["files"]
    for key in ("pareto_json", "pareto_png", "layers_png"):
        with open(files[key], "rb") as f:
            head = f.read(8)
        assert head.startswith(b"\x89PNG") if key.endswith("png") else head.startswith(b"{")
    doc = json.loads(open(files["pareto_json"]).read())
    front = doc["front"]
    assert len(front) >= 3
    assert all(a["bits_nominal"] < b["bits_nominal"] and a["kld"] > b["kld"] for a, b in zip(front, front[1:]))
    assert {b["name"] for b in doc["baselines"]} >= {"q8_0", "q4_0", "K q8_0 / V q4_0"}
    # mixing must pay: at K q8_0 / V q4_0's cost the front is no worse than that uniform config
    k8v4 = next(b for b in doc["baselines"] if b["name"] == "K q8_0 / V q4_0")
    best = min(p["kld"] for p in front if p["bits_nominal"] <= k8v4["bits_nominal"] + 1e-9)
    assert best <= k8v4["kld"] * 1.0001


def test_second_budget_reuses_the_cache(work, budget_run):
    r = run("export", work, "--budget", 5.0, "--no-check", "-o", work.with_name("b5.gguf"), "--json", *SMALL)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["bits_nominal"] <= 5.0 + 1e-9 and d["rows"] == []
    assert d["seconds"]["profile"] == pytest.approx(budget_run["seconds"]["profile"])   # read back, not remeasured
    # a new budget is refined once (measured local search at 5.0 bits), then cached with the search
    assert d["evaluations"] >= budget_run["evaluations"]
    search_file = Path(d["files"]["search"])
    stamp = search_file.stat().st_mtime_ns
    again = json.loads(run("export", work, "--budget", 5.0, "--no-check", "-o", work.with_name("b5b.gguf"), "--json",
                           *SMALL).stdout)
    assert again["evaluations"] == d["evaluations"] and again["type_k"] == d["type_k"]
    # nothing searched, refined or rewritten: the search cache is the one the first run left
    assert again["files"]["search"] == str(search_file) and search_file.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("args, message", [
    (["--budget", 3.25], "outside what the candidate types (q8_0, q4_0) allow: 4 to 8 nominal bits"),
    (["--budget", 9.0], "outside what the candidate types (q8_0, q4_0) allow: 4 to 8 nominal bits"),
    (["--budget", 4.4, "--budget-unit", "storage"], "4.5 to 8.5 storage bits"),
])
def test_budget_outside_the_feasible_range(work, args, message):
    r = run("export", work, *args, *SMALL)
    assert r.exit_code == 1 and message in r.output


def test_bad_inputs_are_refused_before_any_work(work, tmp_path):
    cases = [
        (["--budget", 5, "--types", "iq4_nl,q8_0", "--backend", "cuda"], "iq4_nl is not a cuda flash-attention type"),
        (["--budget", 5, "--types", "q9_9"], "unknown cache type 'q9_9'"),
        (["--budget", 5, "-o", tmp_path / "missing" / "x.gguf"], "output folder does not exist"),
        (["--budget", 5, "-o", work], "refusing to overwrite the input model"),
        ([], "give one of --budget B"),
    ]
    for extra, message in cases:
        r = run("export", work, *extra)
        assert r.exit_code == 1 and message in r.output, (extra, r.output)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    r = run("export", bad, "--budget", 5)
    assert r.exit_code == 1 and "bad.gguf" in r.output
    trunc = tmp_path / "trunc.gguf"
    with open(work, "rb") as f:
        trunc.write_bytes(f.read(20_000_000))
    r = run("export", trunc, "--budget", 5)
    assert r.exit_code == 1 and "trunc" in r.output
    assert not any(p.name.endswith(".kvtuner.gguf") for p in tmp_path.iterdir())


def test_unwritable_output_folder(work, tmp_path):
    if os.geteuid() == 0:
        ro = "/sys"  # root writes through permission bits, but not into sysfs
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
    r = run("export", work, "--budget", 5, "-o", f"{ro}/x.gguf", *SMALL)
    assert r.exit_code == 1 and "output folder is not writable" in r.output
