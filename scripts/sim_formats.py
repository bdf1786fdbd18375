#!/usr/bin/env python3
"""Design low-bit KV cache formats by measurement: storage-only simulation in torch.

For each candidate format (bits, group size, scale/offset encoding, uniform or non-uniform levels)
the V cache of every layer of SmolLM2 is rotated (the engine's 64-wide Hadamard), quantised and
dequantised; the K cache stays f16 (or --k-type).  The mean KLD of the next-token distribution against
the f16 cache is printed beside q8_0 / q4_0 / q4_1 measured the same way, with the storage bits each
format costs.  Non-uniform codebooks are fitted on wikitext-2 *valid* text and scored on *test*.

  python scripts/sim_formats.py [--tokens 1024] [--target v|k]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtuner_edge import engine  # noqa: E402,F401  (engine before numpy/torch heavy use)
from kvtuner_edge.calibrate import model as M  # noqa: E402
from kvtuner_edge.calibrate import quant as Q  # noqa: E402
from kvtuner_edge.tune import text_tokens  # noqa: E402

F16 = torch.float16


def f16(t):
    return t.to(F16).float()


def groups(x, g):
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def keep_best(best, be, y, xb):
    """Per group, keep the candidate y with the lower squared error against xb (the first on ties)."""
    err = ((y - xb) ** 2).sum(-1, keepdim=True)
    if best is None:
        return y, err
    k = err < be
    return torch.where(k, y, best), torch.where(k, err, be)


def sym_uniform(x, bits, g, fit="absmax"):
    """q4_0-like: levels -2^(b-1)..2^(b-1)-1, d = signed max / -2^(b-1); fit='mse' searches d."""
    xb = groups(x, g)
    n = 2 ** (bits - 1)
    idx = xb.abs().argmax(-1, keepdim=True)
    mx = xb.gather(-1, idx)
    best = be = None
    scales = [1.0] if fit == "absmax" else [1.0 + 0.04 * i for i in range(-6, 9)]
    for s in scales:
        d = f16(mx / -n * s)
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        qv = torch.clamp(torch.round(xb * inv), -n, n - 1)
        y = qv * d
        best, be = keep_best(best, be, y, xb)
    return best.reshape(x.shape)


def asym_uniform(x, bits, g, fit="minmax", scale_bits=16):
    xb = groups(x, g)
    n = 2 ** bits - 1
    lo, hi = xb.amin(-1, keepdim=True), xb.amax(-1, keepdim=True)
    best = be = None
    shrinks = [(0.0, 0.0)] if fit == "minmax" else [(a, b) for a in (0, .04, .08, .12) for b in (0, .04, .08, .12)]
    for a, b in shrinks:
        rng = hi - lo
        l2, h2 = lo + a * rng, hi - b * rng
        d = f16((h2 - l2) / n)
        m = f16(l2)
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        qv = torch.clamp(torch.round((xb - m) * inv), 0, n)
        y = qv * d + m
        best, be = keep_best(best, be, y, xb)
    return best.reshape(x.shape)


def nu_sym(x, levels, g, fit="mse", ntry=8):
    """Non-uniform levels (ascending, in [-1, 1]); per group scale d (fp16) = absmax * s, s searched."""
    xb = groups(x, g)
    lv = torch.as_tensor(levels, dtype=torch.float32)
    amax = xb.abs().amax(-1, keepdim=True)
    best = be = None
    scales = [1.0] if fit == "absmax" else [1.0 - 0.03 * i for i in range(-2, ntry)]
    for s in scales:
        d = f16(amax * s)
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        t = (xb * inv).unsqueeze(-1)
        qi = (t - lv).abs().argmin(-1)
        y = lv[qi] * d
        best, be = keep_best(best, be, y, xb)
    return best.reshape(x.shape)


def nu_asym(x, levels, g, ntry=6):
    """Non-uniform levels in [0, 1] between fp16 min and max (sorted), with light range search."""
    xb = groups(x, g)
    lv = torch.as_tensor(levels, dtype=torch.float32)
    lo, hi = xb.amin(-1, keepdim=True), xb.amax(-1, keepdim=True)
    best = be = None
    for a in [0.0, 0.03, 0.06][: max(1, ntry // 2)]:
        for b in [0.0, 0.03, 0.06][: max(1, ntry // 2)]:
            rng = hi - lo
            m = f16(lo + a * rng)
            d = f16(hi - b * rng - m)
            inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            t = ((xb - m) * inv).unsqueeze(-1)
            qi = (t - lv).abs().argmin(-1)
            y = lv[qi] * d + m
            best, be = keep_best(best, be, y, xb)
    return best.reshape(x.shape)


def sym_als(x, bits, g, iters=4):
    """Symmetric uniform levels -n..n-1 with the scale refined by least squares (start: MSE grid)."""
    xb = groups(x, g)
    n = 2 ** (bits - 1)
    y = groups(sym_uniform(x, bits, g, "mse"), g)
    amax = xb.abs().amax(-1, keepdim=True)
    d = f16(torch.where(amax > 0, (y.abs().amax(-1, keepdim=True)) / n, torch.zeros_like(amax)))
    best, be = y, ((y - xb) ** 2).sum(-1, keepdim=True)
    for _ in range(iters):
        # codes for the current scale, then d = <x,q>/<q,q>
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        qv = torch.clamp(torch.round(xb * inv), -n, n - 1)
        den = (qv * qv).sum(-1, keepdim=True)
        d = f16(torch.where(den > 0, (xb * qv).sum(-1, keepdim=True) / den.clamp_min(1e-30), d))
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        qv = torch.clamp(torch.round(xb * inv), -n, n - 1)
        yy = qv * d
        err = ((yy - xb) ** 2).sum(-1, keepdim=True)
        k = err < be
        best = torch.where(k, yy, best)
        be = torch.where(k, err, be)
    return best.reshape(x.shape)


def asym_als(x, bits, g, iters=6):
    """Asymmetric uniform 0..2^b-1 with (d, m) refined by alternating least squares from the grid fit."""
    xb = groups(x, g)
    n = 2 ** bits - 1
    lo, hi = xb.amin(-1, keepdim=True), xb.amax(-1, keepdim=True)
    best = groups(asym_uniform(x, bits, g, "mse"), g)
    be = ((best - xb) ** 2).sum(-1, keepdim=True)
    d, m = f16((hi - lo) / n), f16(lo)
    for _ in range(iters):
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        qv = torch.clamp(torch.round((xb - m) * inv), 0, n)
        # least squares x ~ d*q + m
        sq, sx = qv.sum(-1, keepdim=True), xb.sum(-1, keepdim=True)
        sqq, sqx = (qv * qv).sum(-1, keepdim=True), (qv * xb).sum(-1, keepdim=True)
        det = g * sqq - sq * sq
        ok = det > 0
        d = f16(torch.where(ok, (g * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det)), d))
        m = f16(torch.where(ok, (sx - d * sq) / g, m))
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        qv = torch.clamp(torch.round((xb - m) * inv), 0, n)
        yy = qv * d + m
        err = ((yy - xb) ** 2).sum(-1, keepdim=True)
        k = err < be
        best = torch.where(k, yy, best)
        be = torch.where(k, err, be)
    return best.reshape(x.shape)


def sym_sub(x, bits, g, sub, sbits=4):
    """Block g with an fp16 scale and sub-blocks of `sub` values with sbits-bit scale multipliers
    ((j+1)/2^sbits of the block scale); codes symmetric uniform, multiplier searched per sub-block."""
    xb = groups(x, g)
    n = 2 ** (bits - 1)
    mx = xb.abs().amax(-1, keepdim=True)
    D = f16(mx / n)
    xs = xb.reshape(*xb.shape[:-1], g // sub, sub)
    Ds = D.unsqueeze(-1)
    best, be = None, None
    ns = 2 ** sbits
    for j in range(ns):
        d = Ds * (j + 1) / ns
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        qv = torch.clamp(torch.round(xs * inv), -n, n - 1)
        y = qv * d
        best, be = keep_best(best, be, y, xs)
    return best.reshape(x.shape)


def lloyd(samples, n_levels, iters=40, sym=True, lo=-1.0, hi=1.0):
    """Lloyd-Max levels for samples (1-d tensor); with sym, levels mirrored around 0 and +-hi kept."""
    s = samples.flatten()
    lv = torch.linspace(lo, hi, n_levels)
    for _ in range(iters):
        qi = (s.unsqueeze(-1) - lv).abs().argmin(-1) if s.numel() < 2_000_000 else None
        new = lv.clone()
        for j in range(n_levels):
            sel = s[qi == j]
            if sel.numel():
                new[j] = sel.mean()
        if sym:
            new = (new - new.flip(0)) / 2
        new[0], new[-1] = lo, hi   # the group's extreme maps exactly
        lv = new
    return lv.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path.home() / ".cache/kvtuner-edge/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--target", choices=("v", "k"), default="v")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = ROOT.parent / "shared" / "data" / "wikitext-2"
    model = M.TorchModel(args.model)
    toks = text_tokens(Path(args.model), data / "test.txt", args.tokens)
    fit_toks = text_tokens(Path(args.model), data / "valid.txt", 512)

    h64 = model.hadamard(64)

    def rotated_values(tokens, which):
        """Rotated V (or K) of all layers for fitting codebooks: [N, 64] rows."""
        out = []
        h = model.embed(tokens)
        for il in range(model.n_layer):
            q, k, v, scale = model.qkv(il, h)
            t = v if which == "v" else k
            out.append(M._rotate(t, h64).reshape(-1, 64))
            h = model.layer(il, h)
        return torch.cat(out)

    def run(fq):
        with torch.no_grad():
            h = model.embed(toks)
            for il in range(model.n_layer):
                q, k, v, scale = model.qkv(il, h)
                if args.target == "v":
                    v2 = M._rotate(fq(M._rotate(v, h64)), h64) if fq else v
                    k2 = k
                else:
                    k2 = M._rotate(fq(M._rotate(k, h64)), h64) if fq else k
                    v2 = v
                k2, v2 = k2.half().float(), v2.half().float()
                rep = q.shape[-3] // k2.shape[-3]
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, k2, v2, attn_mask=model.mask(il, q.shape[-2]), scale=scale, enable_gqa=rep > 1)
                o = o.transpose(-3, -2).flatten(-2)
                h = model.finish_layer(il, h, model.attn_out(il, o))
            return model.logits(h)

    ref = M.log_probs(run(None))

    def score(fq):
        return float(M.kld(ref, run(fq)).mean())

    with torch.no_grad():
        rv = rotated_values(fit_toks, args.target)
    def normed(g, sym=True):
        xb = groups(rv, g)
        if sym:
            return (xb / xb.abs().amax(-1, keepdim=True).clamp_min(1e-12)).flatten()
        lo, hi = xb.amin(-1, keepdim=True), xb.amax(-1, keepdim=True)
        return ((xb - lo) / (hi - lo).clamp_min(1e-12)).flatten()

    sub = lambda t: t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))[:400_000]]
    cands = {
        "q8_0 (8.5)": lambda x: Q.fake_quant(x, "q8_0"),
        "q4_0 (4.5)": lambda x: Q.fake_quant(x, "q4_0"),
        "q4_1 (5.0)": lambda x: Q.fake_quant(x, "q4_1"),
        "iq4_nl (4.5)": lambda x: Q.fake_quant(x, "iq4_nl"),
    }
    for g, sb in ((32, 3.5), (16, 4.0)):
        cands[f"3b sym g{g} absmax ({sb})"] = lambda x, g=g: sym_uniform(x, 3, g)
        cands[f"3b sym g{g} mse ({sb})"] = lambda x, g=g: sym_uniform(x, 3, g, "mse")
        lv = lloyd(sub(normed(g)), 8)
        print(f"3-bit sym levels g{g}:", [round(a, 4) for a in lv])
        cands[f"3b NU sym g{g} mse ({sb})"] = lambda x, g=g, lv=lv: nu_sym(x, lv, g)
    cands["3b asym g32 minmax (4.0)"] = lambda x: asym_uniform(x, 3, 32)
    cands["3b asym g32 mse (4.0)"] = lambda x: asym_uniform(x, 3, 32, "mse")
    lva = lloyd(sub(normed(32, sym=False)), 8, sym=False, lo=0.0, hi=1.0)
    print("3-bit asym levels g32:", [round(a, 4) for a in lva])
    cands["3b NU asym g32 (4.0)"] = lambda x: nu_asym(x, lva, 32)
    for g, sb in ((16, 3.0), (32, 2.5)):
        cands[f"2b sym g{g} mse ({sb})"] = lambda x, g=g: sym_uniform(x, 2, g, "mse")
        lv = lloyd(sub(normed(g)), 4)
        print(f"2-bit sym levels g{g}:", [round(a, 4) for a in lv])
        cands[f"2b NU sym g{g} mse ({sb})"] = lambda x, g=g, lv=lv: nu_sym(x, lv, g)
    cands["2b asym g32 minmax (3.0)"] = lambda x: asym_uniform(x, 2, 32)
    cands["2b asym g32 mse (3.0)"] = lambda x: asym_uniform(x, 2, 32, "mse")
    lva2 = lloyd(sub(normed(32, sym=False)), 4, sym=False, lo=0.0, hi=1.0)
    print("2-bit asym levels g32:", [round(a, 4) for a in lva2])
    cands["2b NU asym g32 (3.0)"] = lambda x: nu_asym(x, lva2, 32)
    cands["3b sym g16 ALS (4.0)"] = lambda x: sym_als(x, 3, 16)
    cands["3b sym g32 ALS (3.5)"] = lambda x: sym_als(x, 3, 32)
    cands["3b asym g32 ALS (4.0)"] = lambda x: asym_als(x, 3, 32)
    cands["3b sym g32/sub8x4b (4.0)"] = lambda x: sym_sub(x, 3, 32, 8, 4)
    cands["3b sym g64/sub8x4b (3.75)"] = lambda x: sym_sub(x, 3, 64, 8, 4)
    cands["3b sym g32/sub16x8b (4.0)"] = lambda x: sym_sub(x, 3, 32, 16, 8)
    cands["2b asym g32 ALS (3.0)"] = lambda x: asym_als(x, 2, 32)
    cands["2b sym g16 ALS (3.0)"] = lambda x: sym_als(x, 2, 16)
    cands["2b sym g32/sub8x4b (3.0)"] = lambda x: sym_sub(x, 2, 32, 8, 4)
    for name, fq in cands.items():
        if args.only and args.only not in name:
            continue
        with torch.no_grad():
            mse = float(((fq(rv[:20000]) - rv[:20000]) ** 2).mean() / (rv[:20000] ** 2).mean())
        print(f"{name:32s} KLD {score(fq):.5f}   rel MSE {mse:.5f}", flush=True)


if __name__ == "__main__":
    main()
