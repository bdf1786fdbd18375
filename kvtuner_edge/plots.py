"""Pictures of a search: the Pareto front with uniform baselines, and a per-layer K/V type map."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from . import types as T


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def pareto(path: Path, points: Sequence[dict], front: Sequence[int], baselines: Sequence[dict],
           chosen: dict | None = None, unit: str = "nominal", title: str = "", floor: float | None = None) -> Path:
    """points/baselines: dicts with bits_nominal, bits_storage, kld (and name for baselines)."""
    plt = _plt()
    key = "bits_nominal" if unit == "nominal" else "bits_storage"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pos = [p for p in points if p["kld"] > 0]          # log axis: the f16 reference itself (0) is left out
    ax.scatter([p[key] for p in pos], [p["kld"] for p in pos], s=10, c="0.7", label="measured configurations")
    fr = sorted((points[i] for i in front if points[i]["kld"] > 0), key=lambda p: p[key])
    baselines = [b for b in baselines if b["kld"] > 0]
    ax.plot([p[key] for p in fr], [p["kld"] for p in fr], "o-", c="tab:blue", ms=4, label="Pareto front")
    for b in baselines:
        ax.scatter([b[key]], [b["kld"]], marker="s", s=40, c="tab:red", zorder=3)
        ax.annotate(b["name"], (b[key], b["kld"]), textcoords="offset points", xytext=(4, 4), fontsize=8, color="tab:red")
    if chosen is not None:
        ax.scatter([chosen[key]], [chosen["kld"]], marker="*", s=180, c="tab:green", zorder=4, label="chosen")
    if floor is not None and floor > 0:
        ax.axhline(floor, ls="--", c="0.5", lw=1, label="engine floor")
    ax.set_yscale("log")
    ax.set_xlabel(f"average {unit} bits per cached element")
    ax.set_ylabel("mean KL divergence vs f16 cache")
    ax.set_title(title or "KV cache configurations")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def layer_map(path: Path, type_k: Sequence[str], type_v: Sequence[str], title: str = "") -> Path:
    """Two rows (K, V) by layer, coloured by nominal bits, labelled with the type names."""
    import numpy as np

    plt = _plt()
    n = len(type_k)
    bits = np.array([[T.get(t).nominal_bits for t in type_k], [T.get(t).nominal_bits for t in type_v]], float)
    fig, ax = plt.subplots(figsize=(max(6, 0.42 * n), 2.2))
    im = ax.imshow(bits, cmap="viridis", vmin=2, vmax=16, aspect="auto")
    for r, names in enumerate((type_k, type_v)):
        for c, name in enumerate(names):
            ax.text(c, r, name.replace("_", "\n"), ha="center", va="center", fontsize=6,
                    color="white" if bits[r, c] < 9 else "black")
    ax.set_yticks([0, 1], ["K", "V"])
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(title or "per-layer cache types")
    fig.colorbar(im, ax=ax, label="nominal bits", fraction=0.03)
    out = _save(fig, path)
    plt.close(fig)
    return out


def throughput(path: Path, res: dict) -> Path:
    """Decode tokens/s against the number of sequences per cache (one panel per depth), and, with a KV
    memory budget, the throughput each cache reaches at the most sequences that fit it."""
    plt = _plt()
    depths = res["settings"]["depths"]
    budget = res.get("budget")
    ncol = len(depths) + (1 if budget and budget.get("points") else 0)
    fig, axes = plt.subplots(1, ncol, figsize=(5.5 * ncol, 4.2), squeeze=False)
    names = list(dict.fromkeys(p["config"] for p in res["points"]))
    for ax, depth in zip(axes[0], depths):
        for name in names:
            pts = sorted((p for p in res["points"] if p["config"] == name and p["depth"] == depth),
                         key=lambda p: p["batch"])
            if pts:
                ax.plot([p["batch"] for p in pts], [p["decode_tps"] for p in pts], "o-", ms=4,
                        lw=2.2 if name == "f16" else 1.4, label=f"{name} ({pts[0]['bits_storage']:.2f} b)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("parallel sequences")
        ax.set_ylabel("decode tokens/s (all sequences)")
        ax.set_title(f"decode at depth {depth}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if ncol > len(depths):
        ax = axes[0][-1]
        bp = budget["points"]
        xs = range(len(bp))
        ax.bar(xs, [p["decode_tps"] for p in bp], color="tab:blue")
        for x, p in zip(xs, bp):
            ax.annotate(f"{p['batch']} seqs", (x, p["decode_tps"]), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([p["config"][:14] for p in bp], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("decode tokens/s")
        kvb = budget["kv_bytes"]
        size = f"{kvb / 2**30:.1f} GiB" if kvb >= 2**30 else f"{kvb / 2**20:.0f} MiB"
        ax.set_title(f"KV budget {size}, depth {budget['depth']}")
        ax.grid(True, axis="y", alpha=0.3)
    title = f"{res['model']} on {res['device']}"
    if res.get("random_weights"):
        title += " (random weights)"
    fig.suptitle(title, fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out
