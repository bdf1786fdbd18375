"""Search for per-layer K/V cache types on a sensitivity profile: prune, cluster, NSGA-II, pick.

Pure numpy + scipy + pymoo; imports neither torch nor the engine. The expensive objective (KLD
of a whole mixed configuration) comes in as a callable, so this module is tested on synthetic
profiles and run on real ones by kvtuner_edge.tune.

Steps (KVTuner, arXiv 2502.04420, with the parts its code left out):
  1. per-layer estimate of the KLD of every pair: measured where the profile measured it, else the
     layer's attention-output error times the layer's own KLD/attn_err gain;
  2. intra-layer pruning: each layer keeps the pairs on its (bits, KLD) Pareto front;
  3. inter-layer clustering: agglomerative clustering (scipy, Ward linkage) of the layers' log-KLD
     vectors over the pairs. Ward merges the two groups whose union grows the within-group variance
     least, which is what "one choice for the whole group" costs; it needs no guess of group shapes
     (k-means would, and depends on its seed), and the dendrogram lets the user pick any number of
     groups without rerunning. Each group gets the Pareto front of its summed estimates as choices;
  4. NSGA-II (pymoo) over one choice per group, objectives (average bits, KLD): first on the additive
     surrogate (sum of the layers' estimated KLDs; thousands of evaluations in a second) whose front
     seeds the second run, on the measured KLD of the whole configuration;
  5. pick: the lowest-KLD configuration of the measured front within the bit budget.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import types as T
from ..errors import KVTunerError


class SearchError(KVTunerError):
    pass


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
            cand |= set(np.flatnonzero(pareto_mask(bc[il], est_ok[il])))
        cand = sorted(cand)
        gb = bc[g][:, cand].sum(0)
        ge = est_ok[g][:, cand].sum(0)
        keep = [cand[i] for i in np.flatnonzero(pareto_mask(gb, ge))]
        keep.sort(key=lambda j: bc[g][:, j].sum())
        choices.append(keep)
    return Space(pairs, groups, choices, bn, bs, est, unit)


@dataclass
class Point:
    x: list[int]
    type_k: list[str]
    type_v: list[str]
    bits_nominal: float
    bits_storage: float
    kld: float                 # objective: measured (torch) KLD of the whole configuration
    surrogate: float


@dataclass
class Result:
    points: list[Point]                    # every configuration measured, front first
    front: list[int]                       # indices into points on the (bits_nominal, kld) front
    front_storage: list[int]               # the same on (bits_storage, kld)
    groups: list[list[int]]
    choices: list[list[list[str]]]
    evaluations: int
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Result":
        d = dict(d)
        d["points"] = [Point(**p) for p in d["points"]]
        return cls(**d)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)

    def bit_range(self, unit: str = "nominal") -> tuple[float, float]:
        b = [p.bits_nominal if unit == "nominal" else p.bits_storage for p in self.points]
        return min(b), max(b)

    def pick(self, budget: float, unit: str = "nominal", feasible: tuple[float, float] | None = None) -> Point:
        """Lowest-KLD measured configuration with average bits <= budget."""
        lo, hi = feasible or self.bit_range(unit)
        if not (lo - 1e-9 <= budget <= hi + 1e-9):
            raise SearchError(f"budget {budget:g} {unit} bits is outside what the candidate types allow: "
                              f"{lo:.3g} to {hi:.3g} {unit} bits per element")
        key = (lambda p: p.bits_nominal) if unit == "nominal" else (lambda p: p.bits_storage)
        ok = [p for p in self.points if key(p) <= budget + 1e-9]
        if not ok:
            raise SearchError(f"no configuration found within {budget:g} {unit} bits (cheapest measured: "
                              f"{min(map(key, self.points)):.3f}); lower budgets need cheaper candidate types")
        return min(ok, key=lambda p: (p.kld, key(p)))


def _nsga2(space: Space, f2: Callable[[np.ndarray], np.ndarray], pop: int, gens: int, seed: int,
           init: np.ndarray | None = None):
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.optimize import minimize

    n = len(space.groups)
    xu = np.array([len(c) - 1 for c in space.choices], dtype=float)

    class P(Problem):
        def __init__(self):
            super().__init__(n_var=n, n_obj=2, xl=np.zeros(n), xu=np.maximum(xu, 1e-9), vtype=int)

        def _evaluate(self, X, out, *args, **kwargs):
            X = np.clip(np.rint(X), 0, xu).astype(int)
            out["F"] = np.column_stack([space.bits(X), f2(X)])

    sampling = IntegerRandomSampling() if init is None else init.astype(float)
    algo = NSGA2(pop_size=pop, sampling=sampling,
                 crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
                 mutation=PM(eta=3.0, vtype=float, repair=RoundingRepair()),
                 eliminate_duplicates=True)
    res = minimize(P(), algo, ("n_gen", gens), seed=seed, verbose=False)
    return np.clip(np.rint(np.atleast_2d(res.X)), 0, xu).astype(int)


def spread(X: np.ndarray, bits: np.ndarray, n: int) -> np.ndarray:
    """n rows of X spread evenly over the bit range (all rows when there are fewer)."""
    if len(X) <= n:
        return X
    order = np.argsort(bits)
    idx = order[np.unique(np.linspace(0, len(X) - 1, n).round().astype(int))]
    return X[idx]


def search(space: Space, evaluate: Callable[[list[tuple[list[str], list[str]]]], Sequence[float]], *,
           pop: int = 24, gens: int = 5, surrogate_pop: int = 100, surrogate_gens: int = 150,
           seed: int = 0, progress: Callable[[int, int], None] | None = None,
           archive: dict | None = None, on_batch: Callable[[dict], None] | None = None) -> Result:
    """NSGA-II on the surrogate, then NSGA-II seeded with its front on the measured KLD.

    evaluate(configs) gets a list of (type_k, type_v) per-layer lists and returns their KLDs.
    archive (genotype tuple -> kld) carries earlier measurements in (resume) and is updated;
    on_batch(archive) is called after every measured batch (checkpointing)."""
    import time

    t0 = time.time()
    archive = {} if archive is None else archive
    n_choice = [len(c) for c in space.choices]
    # the extremes and the surrogate's front
    Xs = _nsga2(space, space.surrogate, surrogate_pop, surrogate_gens, seed)
    extremes = np.array([[0] * len(n_choice), [c - 1 for c in n_choice]])
    Xs = np.unique(np.vstack([Xs, extremes]), axis=0)
    t_sur = time.time() - t0
    total = pop * (gens + 1)
    done = [0]

    def measured(X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X).astype(int)
        keys = [tuple(int(v) for v in x) for x in X]
        new = [k for k in dict.fromkeys(keys) if k not in archive]
        for i in range(0, len(new), 8):
            chunk = new[i:i + 8]
            vals = evaluate([space.types(k) for k in chunk])
            for k, v in zip(chunk, vals):
                archive[k] = float(v)
            done[0] += len(chunk)
            if progress:
                progress(done[0], total)
            if on_batch:
                on_batch(archive)
        return np.array([archive[k] for k in keys])

    init = spread(Xs, space.bits(Xs), pop)
    measured(init)
    if gens > 0:
        _nsga2(space, measured, pop, gens, seed + 1, init=init)
    return result_of(space, archive,
                     settings={"pop": pop, "gens": gens, "surrogate_pop": surrogate_pop,
                               "surrogate_gens": surrogate_gens, "seed": seed, "n_groups": len(space.groups),
                               "unit": space.unit},
                     seconds={"surrogate": t_sur, "total": time.time() - t0})


def result_of(space: Space, archive: dict, settings: dict, seconds: dict) -> Result:
    """The Result (points, fronts) of every measured configuration in the archive."""
    keys = list(archive)
    X = np.array(keys, dtype=int)
    bn, bs, sur = space.bits(X, "nominal"), space.bits(X, "storage"), space.surrogate(X)
    pts = []
    for i, k in enumerate(keys):
        tk, tv = space.types(k)
        pts.append(Point(list(k), tk, tv, float(bn[i]), float(bs[i]), archive[k], float(sur[i])))
    kl = np.array([p.kld for p in pts])
    bu = bn if space.unit == "nominal" else bs
    fr = np.flatnonzero(pareto_mask(bu, kl))
    order = list(fr[np.argsort(bu[fr])]) + [i for i in np.argsort(bu) if i not in set(fr)]
    pts = [pts[i] for i in order]
    kl = np.array([p.kld for p in pts])
    front = [int(i) for i in np.flatnonzero(pareto_mask(np.array([p.bits_nominal for p in pts]), kl))]
    front_s = [int(i) for i in np.flatnonzero(pareto_mask(np.array([p.bits_storage for p in pts]), kl))]
    return Result(pts, front, front_s, space.groups, [[space.pairs[j] for j in c] for c in space.choices],
                  evaluations=len(archive), settings=dict(settings), seconds=dict(seconds))


def refine(space: Space, evaluate: Callable[[list[tuple[list[str], list[str]]]], Sequence[float]],
           archive: dict, budget: float, *, rounds: int = 6, per_round: int = 8,
           on_batch: Callable[[dict], None] | None = None) -> int:
    """Measured local search at one budget (in space.unit bits), after the global search.

    NSGA-II leaves the measured front sparse in places, so the best configuration within a budget
    can sit well below it (its unused bits are quality left behind). From that configuration, try
    every change of one group's choice and every pair of changes (one group up, another down) that
    stays within the budget, rank them by the additive surrogate, measure the best `per_round`, and
    move to the best if it beats the current one; at most `rounds` rounds. The archive (genotype
    -> KLD) is updated in place; returns the number of new measurements."""
    if not archive:
        return 0
    keys = list(archive)
    X = np.array(keys, dtype=int)
    b = space.bits(X)
    ok = np.flatnonzero(b <= budget + 1e-9)
    if not len(ok):
        return 0
    i0 = ok[int(np.argmin([archive[keys[i]] for i in ok]))]
    cur, cur_kld = X[i0].copy(), archive[keys[i0]]
    n_choice = [len(c) for c in space.choices]
    moves = [(g, c) for g in range(len(n_choice)) for c in range(n_choice[g])]
    n_new = 0
    for _ in range(rounds):
        cands = []
        for g, c in moves:
            if c == cur[g]:
                continue
            x = cur.copy()
            x[g] = c
            cands.append(x)
            for g2, c2 in moves:
                if g2 != g and c2 != cur[g2]:
                    y = x.copy()
                    y[g2] = c2
                    cands.append(y)
        if not cands:
            break
        C = np.unique(np.array(cands, dtype=int), axis=0)
        C = C[space.bits(C) <= budget + 1e-9]
        C = np.array([x for x in C if tuple(int(v) for v in x) not in archive], dtype=int).reshape(-1, len(cur))
        if not len(C):
            break
        top = C[np.argsort(space.surrogate(C), kind="stable")[:per_round]]
        vals = evaluate([space.types(tuple(int(v) for v in x)) for x in top])
        for x, v in zip(top, vals):
            archive[tuple(int(t) for t in x)] = float(v)
        n_new += len(top)
        if on_batch:
            on_batch(archive)
        j = int(np.argmin(vals))
        if vals[j] >= cur_kld:
            break
        cur, cur_kld = top[j].copy(), float(vals[j])
    return n_new
