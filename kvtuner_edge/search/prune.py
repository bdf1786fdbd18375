"""Stage 1-2: per-layer KLD estimates and intra-layer pruning to each layer's (bits, KLD) front.

Also the model layout the search needs (elements per token of each KV layer) and the Pareto mask
every stage uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .. import types as T


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """True where no other point has x <= and y <= with one strictly lower (NaN y never kept)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    ok = ~np.isnan(y)
    keep = np.zeros(len(x), dtype=bool)
    order = np.lexsort((y, x))
    best = math.inf
    for i in order:
        if ok[i] and y[i] < best:
            keep[i] = True
            best = y[i]
    return keep



@dataclass
class Layout:
    """What the search needs to know about the model: K and V elements per token of each KV layer."""
    n_layer: int
    kv_layers: list[int]
    n_embd_k: list[int]
    n_embd_v: list[int]

    @classmethod
    def of(cls, info) -> "Layout":
        return cls(info.n_layer, list(info.kv_layers), [info.n_embd_k(i) for i in range(info.n_layer)],
                   [info.n_embd_v(i) for i in range(info.n_layer)])

    def pair_bits(self, pairs: Sequence[Sequence[str]], unit: str = "nominal") -> np.ndarray:
        """[n_layer, n_pairs] bits of each layer's elements for each pair, weighted so that the
        average over the model is the plain sum over layers (rows of non-KV layers are zero)."""
        tot = sum(self.n_embd_k[i] + self.n_embd_v[i] for i in self.kv_layers)
        out = np.zeros((self.n_layer, len(pairs)))
        for il in self.kv_layers:
            for j, (k, v) in enumerate(pairs):
                tk, tv = T.get(k), T.get(v)
                bk, bv = ((tk.nominal_bits, tv.nominal_bits) if unit == "nominal"
                          else (tk.storage_bits, tv.storage_bits))
                out[il, j] = (bk * self.n_embd_k[il] + bv * self.n_embd_v[il]) / tot
        return out


def estimate(attn: np.ndarray, kld: np.ndarray) -> np.ndarray:
    """KLD estimate for every (layer, pair): measured where available, else gain_l * attn_err with
    the layer's median measured KLD/attn_err ratio (the model-wide median for a layer without one)."""
    est = kld.copy()
    ratios = np.where((attn > 0) & ~np.isnan(kld), kld / np.where(attn > 0, attn, 1), np.nan)
    with np.errstate(all="ignore"):
        gain = np.nanmedian(np.where(np.isnan(ratios).all(1, keepdims=True), np.nan, ratios), axis=1)
    glob = np.nanmedian(ratios) if np.isfinite(ratios).any() else 1.0
    gain = np.where(np.isfinite(gain), gain, glob)
    miss = np.isnan(est) & ~np.isnan(attn)
    est[miss] = (gain[:, None] * attn)[miss]
    return np.maximum(est, 0.0)



def layer_front(bits: np.ndarray, est: np.ndarray) -> np.ndarray:
    """Indices of the pairs on one layer's (bits, estimated KLD) Pareto front (intra-layer pruning)."""
    return np.flatnonzero(pareto_mask(bits, est))
