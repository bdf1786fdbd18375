"""A per-layer KV cache configuration: one K type and one V type per layer."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import types as T
from .errors import ConfigError

if TYPE_CHECKING:
    from .gguf_io import ModelInfo


def _get(name, which: str, layer: int) -> T.CacheType:
    if not isinstance(name, str):
        raise ConfigError(f"layer {layer}: the {which} cache type must be a type name, got {_show(name)}")
    try:
        return T.get(name)
    except ValueError:
        raise ConfigError(f"layer {layer}: unknown {which} cache type {_show(name)}; known: {', '.join(T.TYPES)}") from None


def _show(value, limit: int = 40) -> str:
    """A user's value quoted for a message: control characters escaped, cut at `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:limit]) + (f"... ({len(text)} characters)" if len(text) > limit else "")


def rle(names: Sequence[str]) -> str:
    """Run-length form of a per-layer list: ["q8_0", "q8_0", "q4_0"] -> "q8_0*2,q4_0*1"."""
    out = []
    i = 0
    while i < len(names):
        j = i
        while j < len(names) and names[j] == names[i]:
            j += 1
        out.append(f"{names[i]}*{j - i}")
        i = j
    return ",".join(out)


@dataclass(frozen=True)
class CacheConfig:
    type_k: tuple[str, ...]
    type_v: tuple[str, ...]

    def __post_init__(self):
        tk = tuple(_get(n, "K", i).name for i, n in enumerate(self.type_k))
        tv = tuple(_get(n, "V", i).name for i, n in enumerate(self.type_v))
        if len(tk) != len(tv):
            raise ConfigError(f"type_k has {len(tk)} entries but type_v has {len(tv)}")
        if not tk:
            raise ConfigError("empty configuration: give one K and one V type per layer")
        object.__setattr__(self, "type_k", tk)
        object.__setattr__(self, "type_v", tv)

    # construction

    @classmethod
    def uniform(cls, n_layer: int, type_k: str, type_v: str | None = None) -> "CacheConfig":
        return cls((type_k,) * n_layer, (type_v or type_k,) * n_layer)

    @classmethod
    def from_dict(cls, d: dict) -> "CacheConfig":
        if not isinstance(d, dict) or "type_k" not in d or "type_v" not in d:
            raise ConfigError('a configuration is a JSON object {"type_k": [...], "type_v": [...]}')
        tk, tv = d["type_k"], d["type_v"]
        if not isinstance(tk, list) or not isinstance(tv, list):
            raise ConfigError("type_k and type_v must be lists of type names, one per layer")
        return cls(tuple(tk), tuple(tv))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CacheConfig":
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such configuration file") from None
        except IsADirectoryError:
            raise ConfigError(f"{p}: is a folder, not a configuration file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{p}: not a configuration (JSON nested too deeply)") from None
        except ValueError as e:   # e.g. an integer of more digits than Python converts
            raise ConfigError(f"{p}: not a usable JSON document ({str(e)[:200]})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None

    def to_dict(self) -> dict:
        return {"type_k": list(self.type_k), "type_v": list(self.type_v)}

    # properties

    @property
    def n_layer(self) -> int:
        return len(self.type_k)

    def spec(self) -> str:
        """The engine's override string (llama_kvtuner_set_override / KVTUNER_KV_TYPES)."""
        return f"k={rle(self.type_k)};v={rle(self.type_v)}"

    def short(self) -> str:
        return f"K {rle(self.type_k)} | V {rle(self.type_v)}"

    def validate(self, info: "ModelInfo", backend: str | None = None) -> None:
        """ConfigError naming the layer when this model (or backend's flash attention) cannot take it."""
        if self.n_layer != info.n_layer:
            raise ConfigError(f"configuration has {self.n_layer} layers, {info.path.name} has {info.n_layer}")
        for il in info.kv_layers:
            for which, name, head in (("K", self.type_k[il], info.head_k[il]), ("V", self.type_v[il], info.head_v[il])):
                t = T.get(name)
                if head % t.block:
                    raise ConfigError(f"layer {il}: {which} type {name} has block size {t.block}, "
                                      f"which does not divide the {which} head size {head}")
                if backend and backend not in t.fa_backends:
                    raise ConfigError(f"layer {il}: {which} type {name} is not a {backend} flash-attention type")
            if backend in T.SAME_KV_TYPE_BACKENDS and self.type_k[il] != self.type_v[il]:
                raise ConfigError(f"layer {il}: {backend} flash attention needs the same K and V type "
                                  f"(got K {self.type_k[il]}, V {self.type_v[il]})")

    # costs

    def bits(self, info: "ModelInfo") -> tuple[float, float]:
        """(nominal, storage) bits per cached element, averaged over every K and V element of every layer."""
        nom = sto = n = 0.0
        for il in info.kv_layers:
            for name, ne in ((self.type_k[il], info.n_embd_k(il)), (self.type_v[il], info.n_embd_v(il))):
                t = T.get(name)
                nom += t.nominal_bits * ne
                sto += t.storage_bits * ne
                n += ne
        return nom / n, sto / n

    def layer_bytes(self, info: "ModelInfo", il: int, n_cells: int) -> tuple[int, int]:
        """Bytes of layer il's K and V caches for n_cells cells (what llama.cpp allocates)."""
        return (n_cells * T.get(self.type_k[il]).row_bytes(info.n_embd_k(il)),
                n_cells * T.get(self.type_v[il]).row_bytes(info.n_embd_v(il)))

    def bytes_per_token(self, info: "ModelInfo") -> float:
        return float(sum(sum(self.layer_bytes(info, il, 1)) for il in info.kv_layers))
