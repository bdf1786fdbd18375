"""The main job as it stands: write a hand-made mixed per-layer cache into the model, inspect
the result, and measure it on the engine against uniform q8_0 and q4_0 caches."""
from __future__ import annotations

from pathlib import Path

from . import engine
from .config import CacheConfig
from .evaluate import evaluate_many, shared_text
from .export import export
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


def run(path: Path, n_tokens: int = 1024, out: Path | None = None, progress=print) -> dict:
    info_in = inspect(path)
    cfg = edge_mixed(info_in["n_layer"])
    tuned = export(path, cfg, out)
    info = inspect(tuned)
    progress(f"exported {tuned}\n  {info['name']} ({info['arch']}, {info['n_layer']} layers): {info['config']}; "
             f"{info['bits_nominal']:.2f} nominal / {info['bits_storage']:.2f} storage bits, "
             f"{info['kv_bytes_per_token']:.0f} B/token (f16 {info['kv_bytes_per_token_f16']:.0f})")
    tokens, text_source = eval_tokens(path, n_tokens)
    progress(f"evaluating on {len(tokens)} tokens of {text_source}")
    res = evaluate_many(tuned, tokens, {"q8_0": (None, "q8_0", "q8_0"), "tuned": (None, None, None),
                                        "q4_0": (None, "q4_0", "q4_0")}, ctx=n_tokens, progress=False)
    return {"model": str(path), "tuned_file": str(tuned), "inspect": info, "text": text_source,
            "n_tokens": len(tokens), "rows": [{"cache": name, **r} for name, r in res.items()]}
