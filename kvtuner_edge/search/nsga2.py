"""Stage 4: NSGA-II (pymoo) over one choice per layer group, objectives (average bits, KLD): first on
the additive surrogate, whose front seeds a second run on the measured KLD of whole configurations."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .cluster import Space
from .pick import Result, result_of


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


