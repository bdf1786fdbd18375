#!/usr/bin/env python3
"""Table of the decode kernel's time per layer against its split over KV positions: one test-backend-ops
perf log per KVTUNER_CUDA_FA_MMAQ_PB value (scripts/gpu_mmaq.sh split; the value is in the file name,
split_pb<N>.log; split_pboff.log: the kernel off, llama.cpp's vector kernel), f16 (llama.cpp's own kernel, the same in every log) as the reference.
    python scripts/mmaq_split_table.py split_pb*.log [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mmaq_perf_table import parse  # noqa: E402

NAMES = {"0": "llama.cpp", "-1": "balanced", "off": "stock"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--json", dest="out")
    a = ap.parse_args()
    runs = {}
    for p in a.logs:
        m = re.search(r"pb(-?\d+|off)", Path(p).name)
        if m:
            runs[m.group(1)] = parse(p)
    order = sorted(runs, key=lambda v: (v == "off", v != "off" and int(v) > 0, 0 if v == "off" else int(v)))
    keys = sorted({k for r in runs.values() for k in r if k[6] != "f16"}, key=lambda k: (k[3], k[5], k[4], k[6], k[7]))
    cols = [NAMES.get(v, f"pb {v}") for v in order]
    print(f"{'seqs':>4} {'tok':>3} {'depth':>6} {'K':>6} {'V':>6} {'f16 us':>7} | " + " | ".join(f"{c:>10}" for c in cols)
          + "   (us per layer; x f16 in brackets for the first two)")
    rows = []
    for k in keys:
        f16 = [r[k[:6] + ("f16", "f16")] for r in runs.values() if k[:6] + ("f16", "f16") in r]
        ref = statistics.median(f16) if f16 else None
        vals = {v: runs[v].get(k) for v in order}
        cells = []
        for i, v in enumerate(order):
            x = vals[v]
            cell = "-" if x is None else f"{x:.2f}"
            if x is not None and ref and i < 2:
                cell += f" ({ref / x:.2f})"
            cells.append(f"{cell:>10}")
        best = min((x, v) for v, x in vals.items() if x is not None)
        print(f"{k[3]:>4} {k[5]:>3} {k[4]:>6} {k[6]:>6} {k[7]:>6} {ref or 0:>7.2f} | " + " | ".join(cells) + f"   best {NAMES.get(best[1], 'pb ' + best[1])}")
        rows.append({"seqs": k[3], "tokens": k[5], "depth": k[4], "type_k": k[6], "type_v": k[7], "f16_us": ref,
                     "us": {NAMES.get(v, v): vals[v] for v in order}})
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
