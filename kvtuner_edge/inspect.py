"""What a GGUF's KV cache looks like and costs: shape, per-layer types, bits, bytes."""
from __future__ import annotations

import os

from .config import CacheConfig
from .gguf_io import model_info

SWA_PAD = 256  # llama.cpp pads the sliding-window cache to 256 cells (llama-kv-cache-iswa.cpp)


def cache_cells(info, il: int, ctx: int, n_ubatch: int = 512) -> int:
    """Cells llama.cpp allocates for layer il at context `ctx` (one sequence)."""
    if info.swa_layers[il] and info.sliding_window:
        cells = min(ctx, info.sliding_window + n_ubatch)
        return min(ctx, (cells + SWA_PAD - 1) // SWA_PAD * SWA_PAD)
    return ctx


def inspect(path: str | os.PathLike, ctx: int | None = None) -> dict:
    info = model_info(path)
    own = info.file_types()           # ConfigError when the file's kvtuner types are unusable
    tuned = own is not None
    cfg = CacheConfig(tuple(own[0]), tuple(own[1])) if tuned else CacheConfig.uniform(info.n_layer, "f16")
    if tuned:
        cfg.validate(info)            # block sizes against head sizes, as the engine checks them
    nom, sto = cfg.bits(info)
    out = {
        "path": str(info.path),
        "arch": info.arch,
        "name": info.name,
        "n_layer": info.n_layer,
        "n_head_kv": info.n_head_kv,
        "head_k": info.head_k,
        "head_v": info.head_v,
        "swa_layers": [il for il in range(info.n_layer) if info.swa_layers[il]],
        "sliding_window": info.sliding_window,
        "type_k": list(cfg.type_k) if tuned else None,
        "type_v": list(cfg.type_v) if tuned else None,
        "config": cfg.short() if tuned else "none (f16 cache unless the user asks for a type)",
        "bits_nominal": nom,
        "bits_storage": sto,
        "kv_bytes_per_token": cfg.bytes_per_token(info),
        "kv_bytes_per_token_f16": CacheConfig.uniform(info.n_layer, "f16").bytes_per_token(info),
        "kvtuner": {k: v for k, v in info.metadata.items() if k.startswith("kvtuner.")
                    and k not in ("kvtuner.type_k", "kvtuner.type_v")},
        "missing": [k for k, v in (("kvtuner.type_k", info.type_k), ("kvtuner.type_v", info.type_v))
                    if tuned and v is None],
    }
    if ctx:
        out["ctx"] = ctx
        out["kv_bytes_at_ctx"] = sum(cache_cells(info, il, ctx) * sum(cfg.layer_bytes(info, il, 1))
                                     for il in info.kv_layers)
    return out
