"""Stage 3: inter-layer clustering (Ward) and the search space: one choice per layer group, each
group's choices the Pareto front of its summed estimates over the union of its members' fronts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .prune import Layout, estimate, layer_front, pareto_mask


def cluster_layers(est: np.ndarray, layers: Sequence[int], n_groups: int) -> list[list[int]]:
    """Ward clustering of the layers' log-KLD vectors into at most n_groups groups (sorted by first layer)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    layers = list(layers)
    if n_groups >= len(layers):
        return [[il] for il in layers]
    feats = np.log10(est[layers] + 1e-6)
    feats = feats[:, np.isfinite(feats).all(0)]
    z = linkage(feats, method="ward")
    labels = fcluster(z, t=n_groups, criterion="maxclust")
    groups: dict[int, list[int]] = {}
    for il, lab in zip(layers, labels):
        groups.setdefault(int(lab), []).append(il)
    return sorted(groups.values(), key=lambda g: g[0])


@dataclass
class Space:
    pairs: list[list[str]]
    groups: list[list[int]]
    choices: list[list[int]]          # per group: pair indices, cheapest first
    bits_nom: np.ndarray              # [n_layer, n_pairs], see Layout.pair_bits
    bits_sto: np.ndarray
    est: np.ndarray                   # [n_layer, n_pairs] surrogate per-layer KLD
    unit: str = "nominal"             # the bits the search minimises: nominal or storage

    def decode(self, x: Sequence[int]) -> list[int]:
        """Genotype (one choice per group) -> pair index per layer (-1 for non-KV layers)."""
        per_layer = [-1] * self.bits_nom.shape[0]
        for gi, (g, c) in enumerate(zip(self.groups, x)):
            for il in g:
                per_layer[il] = self.choices[gi][int(c)]
        return per_layer

    def types(self, x: Sequence[int]) -> tuple[list[str], list[str]]:
        pl = self.decode(x)
        tk = [self.pairs[j][0] if j >= 0 else "f16" for j in pl]
        tv = [self.pairs[j][1] if j >= 0 else "f16" for j in pl]
        return tk, tv

    def bits(self, X: np.ndarray, unit: str | None = None) -> np.ndarray:
        b = self.bits_nom if (unit or self.unit) == "nominal" else self.bits_sto
        X = np.atleast_2d(X)
        out = np.zeros(len(X))
        for gi, g in enumerate(self.groups):
            idx = np.asarray(self.choices[gi])[X[:, gi].astype(int)]
            out += b[g][:, idx].sum(0)
        return out

    def surrogate(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        out = np.zeros(len(X))
        for gi, g in enumerate(self.groups):
            idx = np.asarray(self.choices[gi])[X[:, gi].astype(int)]
            out += self.est[g][:, idx].sum(0)
        return out


def build_space(attn: np.ndarray, kld: np.ndarray, pairs: Sequence[Sequence[str]], layout: Layout,
                n_groups: int = 8, allowed: Sequence[int] | None = None, unit: str = "nominal") -> Space:
    """Prune each layer to its (bits, KLD) Pareto front, cluster layers, give each group the
    Pareto front of its summed estimates over the union of its members' fronts. `unit` is the
    cost the search minimises: with storage bits q4_0 (4.5) is cheaper than q4_1 (5.0), with
    nominal bits they cost the same and only the better one survives pruning."""
    pairs = [list(p) for p in pairs]
    bn = layout.pair_bits(pairs, "nominal")
    bs = layout.pair_bits(pairs, "storage")
    est = estimate(attn, kld)
    bc = bn if unit == "nominal" else bs
    ok = np.zeros(len(pairs), dtype=bool)
    ok[list(range(len(pairs)) if allowed is None else allowed)] = True
    est_ok = np.where(ok[None, :], est, np.nan)
    groups = cluster_layers(np.where(np.isnan(est_ok), np.nanmax(est_ok), est_ok), layout.kv_layers, n_groups)
    choices = []
    for g in groups:
        cand = set()
        for il in g:
            cand |= set(layer_front(bc[il], est_ok[il]))
        cand = sorted(cand)
        gb = bc[g][:, cand].sum(0)
        ge = est_ok[g][:, cand].sum(0)
        keep = [cand[i] for i in np.flatnonzero(pareto_mask(gb, ge))]
        keep.sort(key=lambda j: bc[g][:, j].sum())
        choices.append(keep)
    return Space(pairs, groups, choices, bn, bs, est, unit)


