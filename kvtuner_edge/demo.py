"""The main job on the default model: `export --budget` (calibrate, search, export, check), plus
the helpers the tests share (a hand-made mixed config, evaluation text)."""
from __future__ import annotations

from pathlib import Path

from . import engine
from .config import CacheConfig
from .evaluate import shared_text
from .inspect import inspect


def edge_mixed(n_layer: int, edge: int = 3, k_edge: str = "q8_0", k_mid: str = "q4_0", v: str = "q4_0") -> CacheConfig:
    """q8_0 K in the first and last `edge` layers, q4_0 K elsewhere, one V type: a simple hand-made mix."""
    tk = [k_edge if (il < edge or il >= n_layer - edge) else k_mid for il in range(n_layer)]
    return CacheConfig(tuple(tk), (v,) * n_layer)


def self_generated_text(path: Path, n_tokens: int, prompt: str = "The history of the city begins") -> list[int]:
    """Data-free evaluation text: the model's own greedy continuation of a short prompt (f16 cache)."""
    with engine.open_model(path, n_ctx=n_tokens + 64, use_file_types=False) as m:
        toks = m.tokenize(prompt)
        return (toks + m.generate(toks, n_tokens))[:n_tokens]


def eval_tokens(path: Path, n_tokens: int) -> tuple[list[int], str]:
    """wikitext-2 test from ../shared/data where present, else text the model generates itself."""
    src = shared_text()
    if src is None:
        return self_generated_text(path, n_tokens), "text the model generated itself (../shared/data is absent)"
    with engine.open_model(path, n_ctx=64, use_file_types=False) as m:
        return m.tokenize(src.read_text()[: n_tokens * 8])[:n_tokens], f"{src} (first {n_tokens} tokens)"


def run(path: Path, budget: float = 5.0, unit: str = "storage", n_tokens: int = 1024, out: Path | None = None,
        progress: bool = True) -> dict:
    """The main job: calibrate and search the model (cached beside it), export the lowest-KLD
    per-layer cache within `budget` bits, inspect the file, and measure it on the engine against
    uniform caches of nearby bits on held-out text."""
    from .tune import export_budget

    res = export_budget(path, budget, out, unit=unit, n_eval=n_tokens, progress=progress)
    res["inspect"] = inspect(Path(res["output"]))
    return res
