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
