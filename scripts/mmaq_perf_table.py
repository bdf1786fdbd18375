#!/usr/bin/env python3
"""Table of test-backend-ops perf runs of FLASH_ATTN_EXT decode and small batches (scripts/gpu_mmaq.sh
kernel / small): time per layer, KV bytes read per second and the ratio to f16 at the same shape (tokens per
sequence: `tok`), for one or two logs (our kernel, then the same build with it off).
    python scripts/mmaq_perf_table.py perf_on.log [perf_off.log] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys

# bytes per block and values per block of the cache types (ggml's and ours)
BLOCK = {"f16": (2, 1), "bf16": (2, 1), "q8_0": (34, 32), "q5_1": (24, 32), "q5_0": (22, 32), "q4_1": (20, 32),
         "q4_0": (18, 32), "q3_kv": (16, 32), "q2_kv": (12, 32)}

LINE = re.compile(r"FLASH_ATTN_EXT\((?P<params>[^)]*)\):\s+(?P<runs>\d+) runs -\s+(?P<us>[\d.]+) us/run")


def parse(path: str) -> dict[tuple, float]:
    out = {}
    for line in open(path, errors="replace"):
        m = LINE.search(line)
        if not m:
            continue
        p = m.group("params")
        get = lambda k: re.search(rf"{k}=([^,\]]+)", p).group(1)  # noqa: E731
        nr = re.search(r"nr23=\[(\d+),(\d+)\]", p)
        key = (int(get("hsk")), int(get("nh")), int(nr.group(1)), int(nr.group(2)), int(get("kv")), int(get("nb")),
               get("type_K"), get("type_V"))
        out[key] = float(m.group("us"))
    return out


def kv_bytes(key: tuple) -> float:
    hs, nh, _, ns, kv, _, tk, tv = key
    per = lambda t: hs / BLOCK[t][1] * BLOCK[t][0]  # noqa: E731
    return kv * nh * ns * (per(tk) + per(tv))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--json")
    a = ap.parse_args()
    runs = [parse(p) for p in a.logs]
    if not runs[0]:
        print("no FLASH_ATTN_EXT perf lines found", file=sys.stderr)
        return 1
    rows = []
    hdr = f"{'K/V':<12} {'seqs':>4} {'tok':>3} {'kv':>5} {'us':>9} {'TB/s':>6} {'x f16':>6}"
    if len(runs) > 1:
        hdr += f" {'us off':>9} {'x off':>6}"
    print(hdr)
    for key in sorted(runs[0], key=lambda k: (k[3], k[5], k[4], k[6] != "f16", k[6], k[7])):
        us = runs[0][key]
        f16 = runs[0].get(key[:6] + ("f16", "f16"))
        row = {"type_k": key[6], "type_v": key[7], "seqs": key[3], "tokens": key[5], "kv": key[4], "gqa": key[2],
               "head_size": key[0],
               "us": us, "tb_s": kv_bytes(key) / us / 1e6, "vs_f16": (f16 / us) if f16 else None}
        ratio = f"{row['vs_f16']:.2f}" if f16 else "-"
        line = f"{key[6] + '/' + key[7]:<12} {key[3]:>4} {key[5]:>3} {key[4]:>5} {us:>9.1f} {row['tb_s']:>6.2f} {ratio:>6}"
        if len(runs) > 1 and key in runs[1]:
            row["us_off"] = runs[1][key]
            row["vs_off"] = runs[1][key] / us
            line += f" {runs[1][key]:>9.1f} {row['vs_off']:>6.2f}"
        rows.append(row)
        print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
