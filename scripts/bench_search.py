"""Benchmark of the search (issue 4's figures): calibrate + search on self-generated text, then
measure the picked configurations and the Pareto front on the engine, on wikitext-2 test.

    python scripts/bench_search.py [--model smollm2-135m] [--eval-tokens 2048] [--out bench-out/]

Prints, beside the engine's floor: engine KLD of the picks at <= 5.0 and <= 4.5 storage bits
against uniform q4_1 and q4_0; the Spearman rank correlation between the KLD torch predicted and
the KLD the engine measured over the front; wall time of calibrate + search. Writes JSON and a
plot of the front (torch-predicted and engine-measured) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvtuner_edge.config import CacheConfig  # noqa: E402
from kvtuner_edge.evaluate import evaluate_many, shared_text  # noqa: E402
from kvtuner_edge.models import fetch  # noqa: E402
from kvtuner_edge.tune import text_tokens, tune  # noqa: E402


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="registry name or a GGUF path")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--front-max", type=int, default=14, help="front configurations measured on the engine")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--cache-dir")
    ap.add_argument("--pop", type=int, default=24, help="NSGA-II population (tune's default)")
    ap.add_argument("--gens", type=int, default=5, help="NSGA-II generations on the measured KLD")
    ap.add_argument("--unit", choices=("storage", "nominal"), default="storage", help="the bits the search budgets in")
    ap.add_argument("--budgets", default=None,
                    help="comma-separated budgets to pick (default: 5.0,4.5 storage; 4.0,3.25 nominal)")
    ap.add_argument("--types", default=None, help="candidate types (default: the catalogue's candidates)")
    ap.add_argument("--calib-file", default=None, help="calibration text (default: text the model generates itself)")
    ap.add_argument("--no-refine", action="store_true", help="pick from the global search alone (no per-budget refinement)")
    args = ap.parse_args()

    src = shared_text()
    if src is None:
        sys.exit("../shared/data/wikitext-2/test.txt is absent: this benchmark scores on wikitext-2 test")
    path = Path(args.model) if args.model.endswith(".gguf") else fetch(args.model, progress=lambda m: None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    budgets = [float(b) for b in (args.budgets or ("5.0,4.5" if args.unit == "storage" else "4.0,3.25")).split(",")]
    types = args.types.split(",") if args.types else None
    run = tune(path, unit=args.unit, device=args.device, backend=args.backend, cache_dir=args.cache_dir,
               pop=args.pop, gens=args.gens, types=types, calib_file=args.calib_file,
               budgets=[] if args.no_refine else budgets)
    wall = time.time() - t0
    res = run.result
    info = run.info
    from kvtuner_edge.tune import pick_with_baselines

    picks = {b: pick_with_baselines(run, b, args.unit, run.unit_range[args.unit]) for b in budgets}

    # the front, thinned to front_max points spread over the bits, plus the picks
    fr = [res.points[i] for i in (res.front_storage if args.unit == "storage" else res.front)]
    idx = np.unique(np.linspace(0, len(fr) - 1, min(args.front_max, len(fr))).round().astype(int))
    measured = {f"front{j:02d}": fr[j] for j in idx}
    for b, p in picks.items():
        measured[f"pick<={b}"] = p
    tests = {name: (CacheConfig(tuple(p.type_k), tuple(p.type_v)), None, None) for name, p in measured.items()}
    uni = {"q8_0": ("q8_0", "q8_0"), "K q8_0 / V q4_0": ("q8_0", "q4_0"), "q5_0": ("q5_0", "q5_0"),
           "q4_1": ("q4_1", "q4_1"), "q4_0": ("q4_0", "q4_0")}
    if types is None or "q3_kv" in types:
        uni.update({"K q8_0 / V q3_kv": ("q8_0", "q3_kv"), "K q5_0 / V q3_kv": ("q5_0", "q3_kv"), "q3_kv": ("q3_kv", "q3_kv")})
    if types is None or "q2_kv" in types:
        uni.update({"q2_kv": ("q2_kv", "q2_kv")})
    for name, (k, v) in uni.items():
        tests[name] = (CacheConfig.uniform(info.n_layer, k, v), None, None)
    toks = text_tokens(path, src, args.eval_tokens)
    t1 = time.time()
    eng = evaluate_many(path, toks, tests, ctx=args.ctx)
    t_eval = time.time() - t1
    floor = next(iter(eng.values()))["floor_kld"]

    base = {b["name"]: b for b in run.baselines}
    pred = {name: p.kld for name, p in measured.items()}
    pred.update({name: base[name]["kld"] for name in uni if name in base})
    names = list(measured)
    rho_front = spearman([pred[n] for n in names], [eng[n]["mean_kld"] for n in names])
    all_names = [n for n in tests if n in pred]
    rho_all = spearman([pred[n] for n in all_names], [eng[n]["mean_kld"] for n in all_names])

    rows = []
    for name in tests:
        r = eng[name]
        rows.append({"cache": name, "bits_nominal": r["bits_nominal"], "bits_storage": r["bits_storage"],
                     "predicted_kld": pred.get(name), "engine_kld": r["mean_kld"], "p99_kld": r["p99_kld"],
                     "top1": r["top1"], "ppl": r["ppl"], "config": r["config"]})
    doc = {"model": str(path), "calibration": run.calibration, "eval": f"wikitext-2 test, {len(toks)} tokens, ctx {args.ctx}",
           "floor_kld": floor, "ppl_f16": next(iter(eng.values()))["ppl_base"],
           "spearman_front": rho_front, "spearman_all": rho_all,
           "seconds": {"calibrate_search": wall, **run.seconds, "engine_eval": t_eval},
           "groups": res.groups, "evaluations": res.evaluations, "rows": rows}
    stem = out / (path.stem + f".bench-search-{args.unit}")
    js, png = Path(f"{stem}.json"), Path(f"{stem}.png")
    js.write_text(json.dumps(doc, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fx = [r for r in rows if r["cache"].startswith("front") and r["engine_kld"] > 0]   # log axis: not f16 itself
    bk = "bits_" + args.unit
    ax.plot([r[bk] for r in fx], [r["predicted_kld"] for r in fx], "o-", label="front: torch (calibration text)")
    ax.plot([r[bk] for r in fx], [r["engine_kld"] for r in fx], "s-", label="front: engine (wikitext-2)")
    for r in rows:
        if r["cache"] in uni:
            ax.scatter([r[bk]], [r["engine_kld"]], marker="x", c="tab:red", zorder=3)
            ax.annotate(r["cache"], (r[bk], r["engine_kld"]), xytext=(4, 4), textcoords="offset points",
                        fontsize=8, color="tab:red")
    ax.axhline(floor, ls="--", c="0.5", lw=1, label=f"engine floor {floor:.4f}")
    ax.set_yscale("log")
    ax.set_xlabel(f"{args.unit} bits per cached element")
    ax.set_ylabel("mean KLD vs f16 cache")
    ax.set_title(f"{path.name}: searched front, torch vs engine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(png, dpi=120, bbox_inches="tight")

    print(f"{path.name}: calibrate + search {wall:.0f} s ({run.seconds}); engine eval {t_eval:.0f} s")
    print(f"engine floor (f16 FA vs f32 no-FA): {floor:.5f}; eval {doc['eval']}; calibration {run.calibration}")
    print(f"{'cache':<18}{'nominal':>8}{'storage':>8}{'torch':>10}{'engine':>10}{'top-1':>7}{'ppl':>8}  config")
    for r in rows:
        pk = f"{r['predicted_kld']:.5f}" if r["predicted_kld"] is not None else "-"
        print(f"{r['cache']:<18}{r['bits_nominal']:>8.2f}{r['bits_storage']:>8.2f}{pk:>10}{r['engine_kld']:>10.5f}"
              f"{r['top1']:>7.3f}{r['ppl']:>8.2f}  {r['config']}")
    e = {r["cache"]: r["engine_kld"] for r in rows}
    for b in budgets:
        print(f"pick <= {b} {args.unit} bits: engine KLD {e[f'pick<={b}']:.5f} = {e[f'pick<={b}'] / e['q4_0']:.2f}x "
              f"uniform q4_0 ({e['q4_0']:.5f}), {e[f'pick<={b}'] / e['q4_1']:.2f}x uniform q4_1 ({e['q4_1']:.5f})")
    print(f"Spearman torch vs engine: front {rho_front:.3f}, front + uniform {rho_all:.3f}")
    print(f"wrote {js} and {png}")


if __name__ == "__main__":
    main()
