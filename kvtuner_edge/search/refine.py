"""After the global search: a measured local search at one budget (search.refine)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .cluster import Space


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
