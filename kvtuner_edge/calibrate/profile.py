"""Sensitivity profile: what quantising one layer's cache to a (K type, V type) pair costs.

Two measures per layer and pair, both against the f16 cache on the same calibration tokens:
  attn_err  relative squared error of the layer's projected attention output (cheap: only that
            layer's attention is recomputed, from the stored f16 inputs);
  kld       mean KL divergence of the final next-token distribution with only that layer changed.

How it stays fast: one f16 pass stores every layer's input, so layers before the quantised one are
never recomputed; all pairs of a layer go through the rest of the model as one batch; the KLD
stage only runs the pairs on the layer's (bits, attn_err) Pareto front plus the uniform pairs
(KVTuner's intra-layer pruning, done before the expensive part). The profile is checkpointed after
every layer, so an interrupted run resumes where it stopped.
The torch model runs in its clean mode here (no activation quantisation): the engine's floor is
the same for every change of the cache and would only blur the per-layer signal.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..search import Layout, pareto_mask

PROFILE_VERSION = 1


def pair_name(k: str, v: str) -> str:
    return f"{k}/{v}"


@dataclass
class Profile:
    key: str
    model: str
    n_layer: int
    kv_layers: list[int]
    pairs: list[list[str]]                 # [[type_k, type_v], ...]
    attn_err: list[list[float | None]]     # [layer][pair]
    kld: list[list[float | None]]          # [layer][pair]; None where not measured (pruned)
    n_tokens: int
    n_positions: int
    backend: str
    settings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    done_layers: list[int] = field(default_factory=list)
    version: int = PROFILE_VERSION

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        f = lambda rows: np.array([[np.nan if x is None else x for x in r] for r in rows], dtype=float)
        return f(self.attn_err), f(self.kld)

    @property
    def complete(self) -> bool:
        return sorted(self.done_layers) == sorted(self.kv_layers)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Profile | None":
        """The profile saved at `path`, or None when it is absent or unusable (truncated, not JSON, another
        version or shape): a checkpoint is only trusted when every field has the shape the run needs."""
        try:
            d = json.loads(Path(path).read_text())
            if not isinstance(d, dict) or d.get("version") != PROFILE_VERSION:
                return None
            p = cls(**d)
        except (OSError, ValueError, TypeError):
            return None
        num = lambda x: x is None or (isinstance(x, float) and x == x) or (isinstance(x, int) and not isinstance(x, bool))
        rows_ok = lambda rows: (isinstance(rows, list) and len(rows) == p.n_layer and
                                all(isinstance(r, list) and len(r) == len(p.pairs) and all(map(num, r)) for r in rows))
        ok = (isinstance(p.n_layer, int) and isinstance(p.pairs, list) and all(isinstance(x, list) and len(x) == 2
                                                                               for x in p.pairs)
              and rows_ok(p.attn_err) and rows_ok(p.kld) and isinstance(p.done_layers, list)
              and isinstance(p.kv_layers, list) and set(p.done_layers) <= set(p.kv_layers)
              and all(p.attn_err[il][0] is not None for il in p.done_layers))
        return p if ok else None


def select_pairs(bits: np.ndarray, err: np.ndarray, max_pairs: int, bits_storage: np.ndarray | None = None) -> list[int]:
    """The pairs whose final KLD is measured: the (bits, attn_err) Pareto fronts in nominal and in
    storage bits (q4_0 and q4_1 cost the same nominal bits, not the same storage) without the f16
    reference (error 0), thinned to at most max_pairs spread over the bit range, cheapest kept."""
    on = pareto_mask(bits, err)
    if bits_storage is not None:
        on |= pareto_mask(bits_storage, err)
    front = [j for j in np.flatnonzero(on) if err[j] > 0]
    front.sort(key=lambda j: (bits[j], err[j]))
    if len(front) > max_pairs:
        idx = np.unique(np.linspace(0, len(front) - 1, max_pairs).round().astype(int))
        front = [front[i] for i in idx]
    return front


def kld_positions(n_tok: int, max_positions: int, skip: int = 16) -> np.ndarray:
    """Positions whose next-token distribution is scored: evenly spread over [skip, n_tok)."""
    skip = min(skip, n_tok - 1)
    n = min(max_positions, n_tok - skip)
    return np.unique(np.linspace(skip, n_tok - 1, n).round().astype(int))


def sensitivity(model, tokens: Sequence[int], pairs: Sequence[tuple[str, str]], *, key: str,
                cache: Path | None = None, max_positions: int = 256, max_pairs: int = 8, progress: bool = True,
                settings: dict | None = None) -> Profile:
    """Measure (or resume) the profile of `model` (a calibrate.model.TorchModel in clean mode)."""
    import torch
    from tqdm import tqdm

    from .model import kld as kld_fn
    from .model import log_probs

    info = model.info
    kv_layers = list(info.kv_layers)
    prof = Profile.load(cache) if cache is not None and cache.exists() else None
    if cache is not None and cache.exists() and prof is None and progress:
        print(f"ignoring the unusable profile checkpoint {cache.name}: profiling from the start", file=sys.stderr)
    if prof is not None and (prof.key != key or [list(p) for p in pairs] != prof.pairs
                             or prof.n_layer != info.n_layer or prof.kv_layers != kv_layers):
        prof = None
    pos = kld_positions(len(tokens), max_positions)
    if prof is None:
        nan = [[None] * len(pairs) for _ in range(info.n_layer)]
        prof = Profile(key=key, model=str(model.path), n_layer=info.n_layer, kv_layers=kv_layers,
                       pairs=[list(p) for p in pairs], attn_err=[r[:] for r in nan], kld=[r[:] for r in nan],
                       n_tokens=len(tokens), n_positions=len(pos), backend=model.backend, settings=dict(settings or {}))
    elif progress:
        print(f"resuming the sensitivity profile: {len(prof.done_layers)}/{len(kv_layers)} layers done",
              file=sys.stderr)
    if prof.complete:
        return prof

    pos_t = torch.as_tensor(pos, device=model.device)
    t0 = time.time()
    with torch.inference_mode():
        # the f16 pass: every layer's input, its projected attention output, the reference distribution
        h = model.embed(tokens)
        h_in, a_ref = [], []
        for il in range(info.n_layer):
            h_in.append(h)
            q, k, v, scale = model.qkv(il, h)
            a = model.attn_out(il, model.attend(il, q, k, v, scale, "f16", "f16"))
            a_ref.append(a)
            h = model.finish_layer(il, h, a)
        ref_lp = log_probs(model.logits(h, pos_t))
        t_ref = time.time() - t0

        # stage 1: attention-output error of every pair (only the layer itself is recomputed)
        if any(prof.attn_err[il][0] is None for il in kv_layers):
            t1 = time.time()
            for il in tqdm(kv_layers, desc="attention error", unit="layer", disable=not progress, file=sys.stderr):
                q, k, v, scale = model.qkv(il, h_in[il])
                den = float(a_ref[il].pow(2).sum())
                for j, (tk, tv) in enumerate(pairs):
                    a = model.attn_out(il, model.attend(il, q, k, v, scale, tk, tv))
                    prof.attn_err[il][j] = float((a - a_ref[il]).pow(2).sum()) / den
            prof.seconds["attn_err"] = time.time() - t1
            if cache is not None:
                prof.save(cache)

        # stage 2: final KLD of the pairs that survive intra-layer pruning, one layer at a time
        attn, _ = prof.arrays()
        layout = Layout.of(info)
        bits_n, bits_s = layout.pair_bits(pairs, "nominal"), layout.pair_bits(pairs, "storage")
        todo = [il for il in kv_layers if il not in prof.done_layers]
        t2 = time.time()
        bar = tqdm(total=len(todo), desc="final-KLD sensitivity", unit="layer", disable=not progress, file=sys.stderr)
        for il in todo:
            sel = select_pairs(bits_n[il], attn[il], max_pairs, bits_s[il])
            for j, (tk, tv) in enumerate(pairs):
                if tk == tv == "f16":
                    prof.kld[il][j] = 0.0          # the reference itself
            if not sel:
                prof.done_layers.append(il)
                bar.update(1)
                continue
            q, k, v, scale = model.qkv(il, h_in[il])
            a = torch.stack([model.attn_out(il, model.attend(il, q, k, v, scale, *pairs[j])) for j in sel])
            hb = model.finish_layer(il, h_in[il].expand(len(sel), *h_in[il].shape), a)
            for jl in range(il + 1, info.n_layer):
                hb = model.layer(jl, hb)
            for n, j in enumerate(sel):
                prof.kld[il][j] = float(kld_fn(ref_lp, model.logits(hb[n], pos_t)).mean())
            prof.done_layers.append(il)
            if cache is not None:
                prof.save(cache)
            bar.update(1)
        bar.close()
        prof.seconds["kld"] = prof.seconds.get("kld", 0.0) + time.time() - t2
        prof.seconds["reference"] = t_ref
    if cache is not None:
        prof.save(cache)
    return prof
