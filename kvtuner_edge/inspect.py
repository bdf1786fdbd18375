"""What a GGUF's KV cache looks like and costs: shape, per-layer types, bits, bytes."""
from __future__ import annotations

import os

from .config import CacheConfig
from .gguf_io import model_info

def cache_cells(info, il: int, ctx: int, n_ubatch: int = 512) -> int:
    """Cells llama.cpp allocates for layer il at context `ctx` (one sequence); see plan.layer_cells."""
    from .plan import layer_cells

    return layer_cells(info, ctx, 1, n_ubatch)[il]


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
    # a file fitted to a memory (export --kv-memory/--memory) records its context: its KV cache there by default
    fit_ctx, fit_seq = info.metadata.get("kvtuner.ctx"), info.metadata.get("kvtuner.n_seq", 1)
    n_seq = 1
    if not ctx and _plain_int(fit_ctx) and 1 <= fit_ctx <= 2**31:
        ctx = fit_ctx
        n_seq = fit_seq if _plain_int(fit_seq) and 1 <= fit_seq <= 256 and fit_ctx * fit_seq <= 2**31 else 1
        out["ctx_from_file"] = True
    if ctx:
        from .plan import kv_bytes

        out["ctx"] = ctx
        out["n_seq"] = n_seq
        out["kv_bytes_at_ctx"] = kv_bytes(info, cfg, ctx, n_seq)
    return out


def _plain_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
