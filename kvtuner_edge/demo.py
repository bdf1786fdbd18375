"""The main job as it stands: a hand-made mixed per-layer cache against uniform caches, on the engine."""
from __future__ import annotations

from pathlib import Path

from . import engine
from .config import CacheConfig
from .evaluate import compare, shared_text
from .gguf_io import model_info


def edge_mixed(n_layer: int, edge: int = 3, k_edge: str = "q8_0", k_mid: str = "q4_0", v: str = "q4_0") -> CacheConfig:
    """q8_0 K in the first and last `edge` layers, q4_0 K elsewhere, one V type: a simple hand-made mix."""
    tk = [k_edge if (il < edge or il >= n_layer - edge) else k_mid for il in range(n_layer)]
    return CacheConfig(tuple(tk), (v,) * n_layer)


def self_generated_text(path: Path, n_tokens: int, prompt: str = "The history of the city begins") -> list[int]:
    """Data-free evaluation text: the model's own greedy continuation of a short prompt (f16 cache)."""
    with engine.open_model(path, n_ctx=n_tokens + 64, use_file_types=False) as m:
        toks = m.tokenize(prompt)
        return (toks + m.generate(toks, n_tokens))[:n_tokens]


def run(path: Path, n_tokens: int = 1024, progress=print) -> dict:
    info = model_info(path)
    src = shared_text()
    if src is not None:
        text_source = f"{src} (first {n_tokens} tokens)"
        with engine.open_model(path, n_ctx=64, use_file_types=False) as m:
            tokens = m.tokenize(src.read_text()[: n_tokens * 8])[:n_tokens]
    else:
        text_source = "text the model generated itself (../shared/data is absent)"
        tokens = self_generated_text(path, n_tokens)
    progress(f"model {info.name} ({info.arch}, {info.n_layer} layers); {len(tokens)} tokens of {text_source}")

    configs = {
        "f16": CacheConfig.uniform(info.n_layer, "f16"),
        "q8_0": CacheConfig.uniform(info.n_layer, "q8_0"),
        "mixed": edge_mixed(info.n_layer),
        "q4_0": CacheConfig.uniform(info.n_layer, "q4_0"),
    }
    rows = []
    base = None
    for name, cfg in configs.items():
        with engine.open_model(path, cfg, n_ctx=len(tokens), logits_all=True) as m:
            logits = m.logits(tokens)
            tk, tv = m.layer_types()
            nbytes = m.cache_bytes()
        if base is None:
            base = logits
        st = compare(base, logits, tokens)
        nom, sto = cfg.bits(info)
        rows.append({"config": name, "layers": cfg.short(), "engine_k": tk, "engine_v": tv,
                     "bits_nominal": nom, "bits_storage": sto, "cache_bytes": nbytes,
                     **st.to_dict()})
        progress(f"  {name:6s} {cfg.short()}: mean KLD {st.mean_kld:.5f}, top-1 {st.top1:.3f}, "
                 f"{sto:.2f} storage bits, cache {nbytes / 2**20:.2f} MiB")
    return {"model": str(path), "text": text_source, "n_tokens": len(tokens), "rows": rows}
