"""The search on synthetic profiles: pruning, clustering, NSGA-II and the budget pick (no torch, no engine)."""
from __future__ import annotations

import numpy as np
import pytest

from kvtuner_edge.search import Layout, SearchError, build_space, cluster_layers, pareto_mask, search

TYPES = ["f16", "q8_0", "q5_0", "q4_0"]
PAIRS = [[k, v] for k in TYPES for v in TYPES]
STEP = {"f16": 0.0, "q8_0": 1.0, "q5_0": 12.0, "q4_0": 30.0}   # error of one type, relative


def synthetic(n_layer=12, sens=None, seed=0):
    """A profile where layer l's KLD for pair (k, v) is sens_k[l]*e(k) + sens_v[l]*e(v)."""
    rng = np.random.default_rng(seed)
    if sens is None:
        sk = np.where(np.arange(n_layer) % 4 == 0, 1e-3, 1e-5)      # every 4th layer's K is sensitive
        sv = np.full(n_layer, 2e-5)
    else:
        sk, sv = sens
    kld = np.array([[sk[l] * STEP[k] + sv[l] * STEP[v] for k, v in PAIRS] for l in range(n_layer)])
    attn = kld * rng.uniform(0.8, 1.25, size=kld.shape)
    return attn, kld, sk, sv


def layout(n_layer=12):
    return Layout(n_layer, list(range(n_layer)), [192] * n_layer, [192] * n_layer)


def test_pareto_mask():
    x = np.array([4, 4, 5, 8, 8, 16])
    y = np.array([0.3, 0.2, 0.25, 0.01, np.nan, 0.0])
    assert pareto_mask(x, y).tolist() == [False, True, False, True, False, True]


def test_clustering_separates_sensitive_layers():
    attn, kld, sk, _ = synthetic()
    groups = cluster_layers(kld, range(12), 2)
    sensitive = sorted(np.flatnonzero(sk > 1e-4).tolist())
    assert sorted(map(sorted, groups)) == sorted([sensitive, [l for l in range(12) if l not in sensitive]])


def test_space_prunes_dominated_pairs():
    attn, kld, *_ = synthetic()
    sp = build_space(attn, kld, PAIRS, layout(), n_groups=4)
    for g, ch in zip(sp.groups, sp.choices):
        b = sp.bits_nom[g][:, ch].sum(0)
        e = sp.est[g][:, ch].sum(0)
        assert np.all(np.diff(b) > 0), "choices are sorted cheapest first with distinct costs"
        assert np.all(np.diff(e) < 0), "each dearer choice must lower the group's error (Pareto)"
    # q4_0/f16 costs more than q4_0/q4_0 and is never better on K-insensitive layers: pruned there
    j = PAIRS.index(["q8_0", "q8_0"])
    assert all(j in ch or len(ch) > 1 for ch in sp.choices)


def test_search_beats_uniform_and_picks_within_budget():
    attn, kld, sk, sv = synthetic()
    sp = build_space(attn, kld, PAIRS, layout(), n_groups=4)
    truth = {tuple(p): j for j, p in enumerate(PAIRS)}
    calls = []

    def evaluate(configs):
        calls.append(len(configs))
        return [sum(kld[l, truth[(k, v)]] for l, (k, v) in enumerate(zip(tk, tv))) for tk, tv in configs]

    res = search(sp, evaluate, pop=16, gens=4, surrogate_pop=60, surrogate_gens=60, seed=1)
    assert res.evaluations == sum(calls) and res.evaluations <= 16 * 5
    # uniform q4_0 costs 4 bits; uniform q5_0 5 bits; the search must beat both at equal bits
    u4 = sum(kld[l, truth[("q4_0", "q4_0")]] for l in range(12))
    u5 = sum(kld[l, truth[("q5_0", "q5_0")]] for l in range(12))
    p5 = res.pick(5.0)
    assert p5.bits_nominal <= 5.0 + 1e-9 and p5.kld < 0.5 * u5
    # sensitive K layers get more bits than the others in the pick
    kb = {"f16": 16, "q8_0": 8, "q5_0": 5, "q4_0": 4}
    sens = [kb[p5.type_k[l]] for l in range(12) if sk[l] > 1e-4]
    rest = [kb[p5.type_k[l]] for l in range(12) if sk[l] <= 1e-4]
    assert min(sens) > max(rest)
    p4 = res.pick(4.0)
    assert p4.bits_nominal <= 4.0 + 1e-9 and p4.kld <= u4 + 1e-12
    # the front is sorted by bits and non-dominated
    fr = [res.points[i] for i in res.front]
    assert all(a.bits_nominal < b.bits_nominal and a.kld > b.kld for a, b in zip(fr, fr[1:]))
    with pytest.raises(SearchError, match="outside what the candidate types allow: 4 to 16"):
        res.pick(3.25, feasible=(4.0, 16.0))


def test_storage_search_labels_both_units():
    attn, kld, *_ = synthetic(seed=2)
    sp = build_space(attn, kld, PAIRS, layout(), n_groups=3, unit="storage")
    truth = {tuple(p): j for j, p in enumerate(PAIRS)}
    res = search(sp, lambda cfgs: [sum(kld[l, truth[(k, v)]] for l, (k, v) in enumerate(zip(tk, tv)))
                                   for tk, tv in cfgs], pop=8, gens=1, surrogate_pop=40, surrogate_gens=20)
    nom = {"f16": 16, "q8_0": 8, "q5_0": 5, "q4_0": 4}
    sto = {"f16": 16, "q8_0": 8.5, "q5_0": 5.5, "q4_0": 4.5}
    for p in res.points:
        assert p.bits_nominal == pytest.approx(sum(nom[k] + nom[v] for k, v in zip(p.type_k, p.type_v)) / 24)
        assert p.bits_storage == pytest.approx(sum(sto[k] + sto[v] for k, v in zip(p.type_k, p.type_v)) / 24)
    assert res.pick(5.0, "storage").bits_storage <= 5.0 + 1e-9


def test_search_resumes_from_archive():
    attn, kld, *_ = synthetic(seed=3)
    sp = build_space(attn, kld, PAIRS, layout(), n_groups=3)
    truth = {tuple(p): j for j, p in enumerate(PAIRS)}
    seen = []

    def evaluate(configs):
        seen.extend(configs)
        return [sum(kld[l, truth[(k, v)]] for l, (k, v) in enumerate(zip(tk, tv))) for tk, tv in configs]

    archive = {}
    first = search(sp, evaluate, pop=8, gens=2, surrogate_pop=40, surrogate_gens=30, seed=5, archive=archive)
    n_first = len(seen)
    again = search(sp, evaluate, pop=8, gens=2, surrogate_pop=40, surrogate_gens=30, seed=5, archive=dict(archive))
    assert len(seen) == n_first, "a rerun with the archive measures nothing twice"
    assert [p.x for p in again.points] == [p.x for p in first.points]


def test_refine_fills_a_sparse_front_within_the_budget():
    """A tiny measured search leaves bits unused below a budget; refine() spends them: the best
    configuration within the budget gets better (or stays), never leaves the budget, and every
    configuration it measured is recorded in the archive and appears in the result."""
    from kvtuner_edge.search import refine, result_of

    attn, kld, *_ = synthetic(seed=4)
    sp = build_space(attn, kld, PAIRS, layout(), n_groups=4)
    truth = {tuple(p): j for j, p in enumerate(PAIRS)}

    def evaluate(configs):
        return [sum(kld[l, truth[(k, v)]] for l, (k, v) in enumerate(zip(tk, tv))) for tk, tv in configs]

    archive = {}
    res = search(sp, evaluate, pop=4, gens=0, surrogate_pop=20, surrogate_gens=5, seed=0, archive=archive)
    budget = 6.0
    before = res.pick(budget)
    n0 = len(archive)
    n_new = refine(sp, evaluate, archive, budget, rounds=4, per_round=8)
    assert n_new == len(archive) - n0 > 0
    after = result_of(sp, archive, res.settings, res.seconds).pick(budget)
    assert after.bits_nominal <= budget + 1e-9
    assert after.kld < before.kld
    # a budget no measured configuration fits: nothing to refine from
    assert refine(sp, evaluate, dict(archive), 0.5) == 0
