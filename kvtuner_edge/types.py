"""Catalogue of KV cache types: what the engine can store and what each costs.

Nominal bits follow the KVTuner paper (f16 = 16, q8_0 = 8, q5_* = 5, q4_* / iq4_nl = 4, q3_kv = 3,
q2_kv = 2);
storage bits count the block scales too (q4_0: 18 bytes per 32 values = 4.5 bits).
Imports nothing of ours.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheType:
    name: str          # ggml type name, as llama.cpp spells it
    ggml_id: int       # enum ggml_type value
    block: int         # values per block
    block_bytes: int   # bytes per block
    nominal_bits: int  # bits per value as the paper counts them
    fa_backends: frozenset[str]  # backends whose flash attention reads this type as K or V

    @property
    def storage_bits(self) -> float:
        return 8.0 * self.block_bytes / self.block

    @property
    def quantized(self) -> bool:
        return self.name not in ("f32", "f16", "bf16")

    def row_bytes(self, n: int) -> int:
        """Bytes for a row of n values (n must be a multiple of the block size)."""
        if n % self.block:
            raise ValueError(f"{self.name}: {n} values is not a multiple of the block size {self.block}")
        return n // self.block * self.block_bytes


_ALL = frozenset(("cpu", "cuda", "metal"))
_CPU = frozenset(("cpu",))
_CPU_CUDA = frozenset(("cpu", "cuda"))

# ids from ggml.h (ggml 0.25.3, llama.cpp 0c1e5709; 43 and 44 added by our patch 0004)
TYPES: dict[str, CacheType] = {t.name: t for t in (
    CacheType("f32", 0, 1, 4, 32, _ALL),
    CacheType("f16", 1, 1, 2, 16, _ALL),
    CacheType("bf16", 30, 1, 2, 16, _ALL),
    CacheType("q8_0", 8, 32, 34, 8, _ALL),
    CacheType("q5_1", 7, 32, 24, 5, _ALL),
    CacheType("q5_0", 6, 32, 22, 5, _ALL),
    CacheType("q4_1", 3, 32, 20, 4, _ALL),
    CacheType("q4_0", 2, 32, 18, 4, _ALL),
    CacheType("iq4_nl", 20, 32, 18, 4, _CPU),
    # kvtuner-edge's own low-bit formats (patches/0004, 0005; native/ggml/ggml-kvquants.c)
    CacheType("q3_kv", 43, 32, 16, 3, _CPU_CUDA),
    CacheType("q2_kv", 44, 32, 12, 2, _CPU_CUDA),
    # ggml's own 2-bit type: the CPU stores it, but it ruins a cache (V q2_0: KLD 0.74 on SmolLM2);
    # catalogued for comparisons only, never a search candidate (no fake-quantiser either)
    CacheType("q2_0", 42, 64, 18, 2, _CPU),
)}

BY_ID: dict[int, CacheType] = {t.ggml_id: t for t in TYPES.values()}

# the candidates a search considers by default, best first
CANDIDATES = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "q3_kv", "q2_kv")

# Metal's flash attention (ggml-metal, 0c1e5709) needs K and V of one type in a layer
SAME_KV_TYPE_BACKENDS = frozenset(("metal",))


def get(name: str) -> CacheType:
    """The cache type called `name` (case-insensitive); ValueError naming the known ones otherwise."""
    t = TYPES.get(str(name).lower())
    if t is None:
        raise ValueError(f"unknown cache type {name!r}; known: {', '.join(TYPES)}")
    return t


def name_of(ggml_id: int) -> str:
    t = BY_ID.get(ggml_id)
    return t.name if t else f"ggml_type_{ggml_id}"

