#!/usr/bin/env python3
"""Per-layer cache configs for throughput runs on a model of another depth (the 8B-shaped random model).

KVTuner's picks for SmolLM2-135M (docs/results/2026-11-28-formats, the search at nominal budgets 3.25
and 4.0) are resampled to the target's layer count (layer i takes source layer i*n_src//n_dst); types
the target backend's flash attention cannot run in place are replaced by the nearest it can
(iq4_nl -> q4_0 on CUDA: same nominal and storage bits). Speed depends on which
types a config holds and how many layers hold them, not on which layers: that is what these keep.

    python scripts/make_bench_configs.py --layers 32 --backend cuda --out-dir /tmp/cfg
    # -> /tmp/cfg/mix325.json, /tmp/cfg/mix400.json; prints the K-V pairs they use (for --fa-quants)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvtuner_edge import types as T  # noqa: E402
from kvtuner_edge.config import CacheConfig  # noqa: E402

SOURCE = ROOT / "docs/results/2026-11-28-formats/SmolLM2-135M-Instruct.Q4_1.bench-search-nominal.json"
PICKS = {"mix325": "pick<=3.25", "mix400": "pick<=4.0"}
REPLACE = {"cuda": {"iq4_nl": "q4_0"}, "metal": {"iq4_nl": "q4_0", "q3_kv": "q4_0", "q2_kv": "q4_0"}, "cpu": {}}


def unrle(text: str) -> list[str]:
    out = []
    for part in text.split(","):
        name, _, n = part.strip().partition("*")
        out += [name] * int(n or 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--backend", choices=sorted(REPLACE), default="cuda")
    ap.add_argument("--out-dir", type=Path, required=True)
    a = ap.parse_args()
    rows = {r["cache"]: r for r in json.loads(SOURCE.read_text())["rows"]}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    pairs = set()
    for name, pick in PICKS.items():
        k_txt, v_txt = rows[pick]["config"].split("|")
        tk, tv = unrle(k_txt.strip()[2:]), unrle(v_txt.strip()[2:])
        rep = REPLACE[a.backend]
        n = len(tk)
        tk = [rep.get(tk[i * n // a.layers], tk[i * n // a.layers]) for i in range(a.layers)]
        tv = [rep.get(tv[i * n // a.layers], tv[i * n // a.layers]) for i in range(a.layers)]
        if a.backend == "metal":   # Metal's flash attention needs one type for K and V in a layer: K's
            tv = list(tk)
        cfg = CacheConfig(tuple(tk), tuple(tv))
        for t in set(tk) | set(tv):
            if a.backend not in T.get(t).fa_backends:
                raise SystemExit(f"{name}: {t} does not run on {a.backend}")
        (a.out_dir / f"{name}.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        nom = sum(T.get(t).nominal_bits for t in tk + tv) / (2 * a.layers)
        sto = sum(T.get(t).storage_bits for t in tk + tv) / (2 * a.layers)
        print(f"{name}: {nom:.2f} nominal / {sto:.2f} storage bits  {cfg.short()}", file=sys.stderr)
        pairs |= {f"{k}-{v}" for k, v in zip(tk, tv)}
    print(",".join(sorted(pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
