#!/usr/bin/env python3
"""Where the torch prediction and the engine part, per cache: the same tokens of a text through the
engine (CPU, flash attention, each uniform cache against the engine's f16 cache, with the engine's
floor) and through the torch model in both of its modes, clean (the search's: storage and attention
path only) and act_quant (the engine's activation rounding modelled too), each against its own f16.

    python scripts/predict_vs_engine.py MODEL [--text FILE] [--tokens 1024] [--caches q8_0,q4_0,q4_1/q4_0]
        [--skip-act-quant] [--out results.json]

Prints a table: engine KLD, floor, engine minus floor, torch clean, torch act_quant, and their ratios to
the engine; and how far torch's f16 logits are from the engine's (KLD, top-1), the check that the torch
model is the deployed model. A cache is K/V or one name for both. Every figure is on the same tokens
(one window of --tokens). Progress goes to stderr; --out is written through a temporary file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvtuner_edge import engine  # noqa: E402
from kvtuner_edge.calibrate.model import TorchModel, kld, log_probs  # noqa: E402
from kvtuner_edge.config import CacheConfig  # noqa: E402
from kvtuner_edge.evaluate import evaluate_many, kld_per_token, shared_text  # noqa: E402
from kvtuner_edge.gguf_io import model_info  # noqa: E402
from kvtuner_edge.tune import text_tokens  # noqa: E402


def log(msg: str) -> None:
    print(f"[predict_vs_engine {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_caches(text: str) -> dict[str, tuple[str, str]]:
    out = {}
    for c in text.split(","):
        c = c.strip()
        if not c:
            continue
        k, _, v = c.partition("/")
        out[c] = (k, v or k)
    return out


def torch_klds(path: Path, toks: list[int], caches: dict, act_quant: bool, eng_f16: np.ndarray) -> dict:
    t0 = time.time()
    m = TorchModel(path, act_quant=act_quant)
    mode = "act_quant" if act_quant else "clean"
    out = {}
    with torch.inference_mode():
        f16 = m.forward(toks)
        ref = log_probs(f16)
        t = f16.float().numpy()
        out["f16_vs_engine"] = {"kld": float(kld_per_token(eng_f16, t).mean()),
                                "top1": float((eng_f16.argmax(-1) == t.argmax(-1)).mean())}
        log(f"torch {mode} f16: KLD to the engine's f16 {out['f16_vs_engine']['kld']:.4g}, "
            f"top-1 {out['f16_vs_engine']['top1']:.3f} ({time.time() - t0:.0f}s)")
        for name, (k, v) in caches.items():
            cfg = CacheConfig.uniform(m.n_layer, k, v)
            out[name] = float(kld(ref, m.forward(toks, cfg)).mean())
            log(f"torch {mode} {name}: {out[name]:.4g} ({time.time() - t0:.0f}s)")
    del m
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--text", type=Path, help="default: wikitext-2 test from ../shared/data")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--caches", default="q8_0,q5_0,q4_1,q4_0,iq4_nl,q3_kv,q2_kv,q8_0/q4_0,q4_1/q3_kv")
    ap.add_argument("--skip-act-quant", action="store_true", help="only the clean torch model (half the time)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    text = a.text or shared_text()
    if text is None:
        raise SystemExit("no --text and no ../shared/data/wikitext-2/test.txt")
    caches = parse_caches(a.caches)
    info = model_info(a.model)
    toks = text_tokens(a.model, text, a.tokens)
    log(f"{a.model.name} ({info.arch}, {info.n_layer} layers): {len(toks)} tokens of {text}")

    t0 = time.time()
    eng = evaluate_many(a.model, toks, {n: (None, k, v) for n, (k, v) in caches.items()}, ctx=len(toks))
    log(f"engine: {time.time() - t0:.0f}s")
    with engine.open_model(a.model, CacheConfig.uniform(info.n_layer, "f16"), n_ctx=len(toks), logits_all=True) as m:
        eng_f16 = m.logits(toks)
    clean = torch_klds(a.model, toks, caches, False, eng_f16)
    aq = None if a.skip_act_quant else torch_klds(a.model, toks, caches, True, eng_f16)

    floor = next(iter(eng.values()))["floor_kld"]
    rows = []
    for name in caches:
        e = eng[name]["mean_kld"]
        r = {"cache": name, "engine_kld": e, "floor_kld": floor, "engine_minus_floor": e - floor,
             "top1": eng[name]["top1"], "ppl": eng[name]["ppl"], "ppl_f16": eng[name]["ppl_base"],
             "bits_storage": eng[name]["bits_storage"], "torch_clean": clean[name],
             "torch_act_quant": None if aq is None else aq[name]}
        rows.append(r)
    print(f"\n{a.model.name}: {len(toks)} tokens of {text.name}, engine floor (f16 FA vs f32) {floor:.4g}; "
          f"torch f16 vs engine f16: clean KLD {clean['f16_vs_engine']['kld']:.4g} top-1 {clean['f16_vs_engine']['top1']:.3f}"
          + ("" if aq is None else f", act_quant KLD {aq['f16_vs_engine']['kld']:.4g} top-1 {aq['f16_vs_engine']['top1']:.3f}"))
    print("| cache | storage bits | engine KLD | engine - floor | top-1 | PPL | torch clean | clean / (engine - floor) | torch act_quant | act_quant / engine |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        em = r["engine_minus_floor"]
        aqs = "" if r["torch_act_quant"] is None else f"{r['torch_act_quant']:.4g} | {r['torch_act_quant'] / r['engine_kld']:.2f}"
        print(f"| {r['cache']} | {r['bits_storage']:.2f} | {r['engine_kld']:.4g} | {em:.4g} | {r['top1']:.3f} | {r['ppl']:.2f} | "
              f"{r['torch_clean']:.4g} | {r['torch_clean'] / em if em > 0 else float('nan'):.2f} | {aqs or '- | -'} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        res = {"model": str(a.model), "text": str(text), "tokens": len(toks), "floor_kld": floor, "rows": rows,
               "torch_f16_vs_engine": {"clean": clean["f16_vs_engine"], "act_quant": None if aq is None else aq["f16_vs_engine"]}}
        fd, tmp = tempfile.mkstemp(dir=a.out.parent, prefix=a.out.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
