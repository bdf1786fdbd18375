"""Stage 5: the measured configurations as a result (points, fronts) and the pick within a budget."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import KVTunerError
from .prune import pareto_mask


class SearchError(KVTunerError):
    pass


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


