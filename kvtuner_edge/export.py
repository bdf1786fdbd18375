"""Write a per-layer cache configuration into a GGUF's metadata (same tensors, byte for byte)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import __version__
from .config import CacheConfig
from .gguf_io import KEY_TYPE_K, KEY_TYPE_V, model_info, read_header, write_with_metadata


def default_output(model: Path) -> Path:
    return model.with_name(model.stem + ".kvtuner.gguf")


def metadata_for(config: CacheConfig, info, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    nom, sto = config.bits(info)
    kv: dict[str, Any] = {
        KEY_TYPE_K: list(config.type_k),
        KEY_TYPE_V: list(config.type_v),
        "kvtuner.bits_nominal": float(nom),
        "kvtuner.bits_storage": float(sto),
        "kvtuner.kv_bytes_per_token": int(config.bytes_per_token(info)),
        "kvtuner.tool_version": f"kvtuner-edge {__version__}",
    }
    kv.update(extra or {})
    return kv


def export(model: str | os.PathLike, config: CacheConfig, out: str | os.PathLike | None = None,
           extra: dict[str, Any] | None = None, progress=None) -> Path:
    """Copy `model` to `out` with `config` in its kvtuner.* metadata; returns the output path.

    Everything is checked before a byte is written: the model header (a truncated or corrupt
    file is refused), the config against the model (length, known types, block sizes), the
    output path (not the input, folder exists and is writable: write_with_metadata). The copy streams the tensors and
    lands through a temporary file and a rename.
    """
    src = Path(model)
    h = read_header(src)
    info = model_info(src, h)
    config.validate(info)
    dst = Path(out) if out is not None else default_output(src)
    extra = dict(extra or {})
    extra.setdefault("kvtuner.source", "config")
    write_with_metadata(src, dst, metadata_for(config, info, extra), progress=progress, header=h)
    return dst
