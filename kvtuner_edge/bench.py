"""Throughput and memory of KV cache configurations on the patched engine.

    from kvtuner_edge import bench
    res = bench.run("model.kvtuner.gguf", batches=[1, 16, 32, 64], depths=[4096], gpu_layers=99)

For every cache configuration (the file's own per-layer config, plus f16, q8_0 and q4_0 caches
measured in the same run as baselines) and every (sequences, depth): prefill tokens/s of one
sequence's `depth`-token prompt, then that prompt copied to all sequences (one KV stream each, as
llama-server and llama-batched-bench run them) and `gen` decode steps with one token per sequence
per step (logits for every sequence): decode tokens/s summed over the sequences, and the KV cache
bytes the context allocated. Ratios to the f16 cache at the same point go beside each figure.

With a KV memory budget, every configuration is also run at the largest number of sequences whose
cache fits the budget (at the first depth): the throughput a server with that much KV memory gets.

Token ids are random (speed does not depend on them); a random-weight model (kvtuner_edge.random_model)
is flagged in the result. Results are saved after every point to `out` and a run with the same
settings resumes from there.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from . import types as T
from .config import CacheConfig
from .errors import ConfigError
from .gguf_io import ModelInfo, model_info
from .plan import parse_size  # noqa: F401  (bench.parse_size, as before)

BASELINES = ("f16", "q8_0", "q4_0")
CELL_PAD = 256  # llama.cpp pads each sequence's cache to a multiple of 256 cells


def _pad(n: int) -> int:
    return (n + CELL_PAD - 1) // CELL_PAD * CELL_PAD


class BenchConfig:
    """A named cache configuration: a global type pair or a per-layer config."""

    def __init__(self, name: str, config: CacheConfig | None = None, type_k: str | None = None,
                 type_v: str | None = None):
        self.name = name
        self.config = config
        self.type_k = type_k
        self.type_v = type_v

    def per_layer(self, info: ModelInfo) -> CacheConfig:
        return self.config or CacheConfig.uniform(info.n_layer, self.type_k, self.type_v)

    def engine_args(self) -> dict:
        if self.config is not None:
            return {"spec": self.config.spec()}
        return {"spec": "off", "type_k": self.type_k, "type_v": self.type_v}


def resolve_configs(path, specs: Sequence[str] | None, info: ModelInfo, backend: str | None) -> list[BenchConfig]:
    """The configurations to run: the file's own (when it has one), the given specs, then the
    baselines. A spec is "file", a type ("q8_0"), a pair ("q8_0/q4_0"), or a config JSON file."""
    out: list[BenchConfig] = []
    wanted = list(specs) if specs else (["file"] if info.type_k or info.type_v or info.types_error else [])
    own_types = info.file_types() if "file" in [s.strip() for s in wanted] else None
    own = CacheConfig(tuple(own_types[0]), tuple(own_types[1])) if own_types else None
    for spec in wanted:
        spec = spec.strip()
        if not spec:
            continue
        if spec == "file":
            if own is None:
                raise ConfigError(f"{Path(path).name} has no kvtuner per-layer config (export one first, "
                                  f"or name cache types with --configs)")
            out.append(BenchConfig("file", config=own))
        elif spec.endswith(".json") or Path(spec).is_file():
            cfg = CacheConfig.load(spec)
            out.append(BenchConfig(Path(spec).stem, config=cfg))
        else:
            tk, _, tv = spec.partition("/")
            tv = tv or tk
            for n in (tk, tv):
                try:
                    T.get(n)
                except ValueError as e:
                    raise ConfigError(f"--configs {spec!r}: {e}") from None
            out.append(BenchConfig(spec if tk != tv else tk, type_k=tk, type_v=tv))
        names = [c.name for c in out[:-1]]
        if out and out[-1].name in names:   # two config files of one name: keep the points apart
            out[-1].name += f"#{names.count(out[-1].name) + 1}"
    for b in BASELINES:
        if not any(c.config is None and c.type_k == b and c.type_v == b for c in out):
            out.append(BenchConfig(b, type_k=b, type_v=b))
    for c in out:
        cfg = c.per_layer(info)
        cfg.validate(info, backend)
    # f16 first: every other point's ratios refer to it
    out.sort(key=lambda c: 0 if (c.config is None and c.type_k == "f16" and c.type_v == "f16") else 1)
    return out


def _device(gpu_layers: int) -> str:
    if gpu_layers > 0 and shutil.which("nvidia-smi"):
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    if gpu_layers > 0 and platform.system() == "Darwin":
        return f"Apple {platform.machine()} (Metal)"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} threads"


def _is_random(info: ModelInfo) -> bool:
    return "random weights" in str(info.metadata.get("general.description", ""))


def _save(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _ratios(points: list[dict]) -> None:
    base = {(p["batch"], p["depth"]): p for p in points if p["config"] == "f16"}
    for p in points:
        b = base.get((p["batch"], p["depth"]))
        for key in ("decode_tps", "prefill_tps", "kv_bytes"):
            name = {"decode_tps": "decode_vs_f16", "prefill_tps": "prefill_vs_f16", "kv_bytes": "kv_vs_f16"}[key]
            p[name] = (p[key] / b[key]) if b and b.get(key) and p.get(key) is not None else None


def run(path, configs: Sequence[str] | None = None, batches: Sequence[int] = (1, 16, 32, 64),
        depths: Sequence[int] = (4096,), gen: int = 32, warmup: int = 2, gpu_layers: int | None = None,
        kv_budget: int | str | None = None, max_seqs: int = 512, n_batch: int = 2048, n_ubatch: int = 512,
        out: str | os.PathLike | None = None, seed: int = 0,
        progress: Callable[[str], None] | None = None) -> dict:
    """Measure every configuration at every (batch, depth); see the module doc. Returns the result
    dict (also written to `out` after every point when given)."""
    from . import engine

    path = Path(path)
    info = model_info(path)
    if gpu_layers is None:
        gpu_layers = 999 if engine.has_gpu() else 0
    backend = "cpu" if gpu_layers == 0 else "metal" if platform.system() == "Darwin" else "cuda"
    batches = sorted({int(b) for b in batches})
    depths = [int(d) for d in depths]
    if not batches or min(batches) < 1:
        raise ConfigError("--batch needs positive numbers of sequences")
    if not depths or min(depths) < 1:
        raise ConfigError("--depth needs positive prompt lengths")
    if gen < 1:
        raise ConfigError("--gen must be at least 1")
    cfgs = resolve_configs(path, configs, info, backend)
    budget = parse_size(kv_budget, "--kv-budget") if kv_budget is not None else None
    settings = {"batches": batches, "depths": depths, "gen": gen, "warmup": warmup, "gpu_layers": gpu_layers,
                "kv_budget": budget, "n_batch": n_batch, "n_ubatch": n_ubatch, "configs": [c.name for c in cfgs],
                "env": {k: os.environ[k] for k in sorted(os.environ) if k.startswith("KVTUNER_CUDA")}}
    res = {"model": path.name, "arch": info.arch, "n_layer": info.n_layer, "random_weights": _is_random(info),
           "device": _device(gpu_layers), "settings": settings, "points": [], "budget": None,
           "note": "decode_tps: tokens/s over all sequences; prefill_tps: one sequence's prompt; "
                   "kv_bytes: K+V cache the context allocated; *_vs_f16: ratio to the f16 cache at the same point"}
    if res["random_weights"]:
        res["note"] += "; random-weight model: speed and memory do not depend on weight values, outputs are meaningless"
    out = Path(out) if out else None
    done: dict[tuple, dict] = {}
    if out and out.exists():
        try:
            old = json.loads(out.read_text())
            if old.get("settings") == settings and old.get("model") == path.name:
                done = {(p["config"], p["batch"], p["depth"]): p for p in old.get("points", [])}
                done.update({("budget", p["config"], p["batch"], p["depth"]): p
                             for p in (old.get("budget") or {}).get("points", [])})
                if progress and done:
                    progress(f"resuming: {len(done)} points already in {out}")
        except (OSError, ValueError):
            pass
    if out:
        try:
            _save(out, json.loads(out.read_text()) if done else res)   # fail now, not after an hour
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    say = progress or (lambda m: None)
    rng = random.Random(seed)

    plan: list[tuple[BenchConfig, int, int, bool]] = [(c, b, d, False) for c in cfgs for d in depths for b in batches]
    if budget is not None:
        d0 = depths[0]
        cells = _pad(d0 + gen + warmup + 1)
        per_seq = {c.name: c.per_layer(info).bytes_per_token(info) * cells for c in cfgs}
        fits = {name: max(0, int(budget // b)) for name, b in per_seq.items()}
        res["budget"] = {"kv_bytes": budget, "depth": d0, "cells_per_seq": cells,
                         "kv_bytes_per_seq": per_seq, "max_seqs": fits, "capped_at": max_seqs, "points": []}
        for c in cfgs:
            n = min(fits[c.name], max_seqs)
            if n >= 1:
                plan.append((c, n, d0, True))

    with engine.BatchRunner(path, n_gpu_layers=gpu_layers) as runner:
        tokens = [rng.randrange(runner.n_vocab) for _ in range(max(depths) + 8)]
        total = len(plan)
        for i, (c, nseq, depth, is_budget) in enumerate(plan, 1):
            key = ("budget", c.name, nseq, depth) if is_budget else (c.name, nseq, depth)
            if key in done:
                p = done[key]
            else:
                t_start = time.time()
                n_ctx_seq = _pad(depth + gen + warmup + 1)
                with runner.context(nseq, n_ctx_seq, n_batch=n_batch, n_ubatch=n_ubatch, **c.engine_args()) as ctx:
                    kv = ctx.kv_bytes()
                    t_pp = ctx.prefill(tokens[:depth])
                    ctx.share_prefix(depth, dummy_token=tokens[depth])
                    step_tokens = [rng.randrange(runner.n_vocab) for _ in range(max(nseq, 8))]
                    if warmup:
                        ctx.decode_steps(step_tokens, depth, warmup)
                    t_tg = ctx.decode_steps(step_tokens, depth + warmup, gen)
                p = {"config": c.name, "batch": nseq, "depth": depth, "gen": gen,
                     "prefill_tps": depth / t_pp, "decode_tps": nseq * gen / t_tg,
                     "decode_step_ms": 1000 * t_tg / gen, "kv_bytes": kv,
                     "kv_bytes_per_token": kv / (nseq * n_ctx_seq),
                     "bits_nominal": c.per_layer(info).bits(info)[0], "bits_storage": c.per_layer(info).bits(info)[1],
                     "seconds": time.time() - t_start}
                say(f"[{i}/{total}] {'budget ' if is_budget else ''}{c.name:>24} x{nseq:<4} depth {depth:<6} "
                    f"prefill {p['prefill_tps']:9.1f} t/s  decode {p['decode_tps']:9.1f} t/s  "
                    f"KV {kv / 2**20:9.1f} MiB")
            if is_budget:
                res["budget"]["points"].append(p)
            else:
                res["points"].append(p)
            _ratios(res["points"])
            if out:
                _save(out, res)
    if res["budget"]:
        bp = res["budget"]["points"]
        by = {p["config"]: p for p in bp}
        for p in bp:
            for ref in ("f16", "q8_0"):
                r = by.get(ref)
                p[f"decode_vs_{ref}_at_budget"] = p["decode_tps"] / r["decode_tps"] if r else None
    if out:
        _save(out, res)
    return res


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def table(res: dict) -> str:
    """A plain-text table of a result."""
    lines = [f"{res['model']} ({res['n_layer']} layers) on {res['device']}"
             + ("  [random weights: speed only]" if res.get("random_weights") else "")]
    hdr = f"{'cache':>28} {'seqs':>5} {'depth':>6} {'bits':>5} {'prefill t/s':>12} {'x f16':>6} " \
          f"{'decode t/s':>11} {'x f16':>6} {'KV MiB':>9} {'x f16':>6}"
    lines += [hdr, "-" * len(hdr)]

    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    for p in res["points"]:
        lines.append(f"{p['config'][:28]:>28} {p['batch']:>5} {p['depth']:>6} {p['bits_storage']:>5.2f} "
                     f"{p['prefill_tps']:>12.1f} {f(p.get('prefill_vs_f16'), '6.2f'):>6} "
                     f"{p['decode_tps']:>11.1f} {f(p.get('decode_vs_f16'), '6.2f'):>6} "
                     f"{p['kv_bytes'] / 2**20:>9.1f} {f(p.get('kv_vs_f16'), '6.2f'):>6}")
    b = res.get("budget")
    if b:
        lines.append("")
        lines.append(f"at a KV memory budget of {_size(b['kv_bytes'])} (depth {b['depth']}, "
                     f"{b['cells_per_seq']} cells per sequence):")
        hdr = f"{'cache':>28} {'max seqs':>9} {'decode t/s':>11} {'x f16':>6} {'x q8_0':>7}"
        lines += [hdr, "-" * len(hdr)]
        for p in b["points"]:
            lines.append(f"{p['config'][:28]:>28} {p['batch']:>9} {p['decode_tps']:>11.1f} "
                         f"{f(p.get('decode_vs_f16_at_budget'), '6.2f'):>6} "
                         f"{f(p.get('decode_vs_q8_0_at_budget'), '7.2f'):>7}")
        for name, n in b["max_seqs"].items():
            if n < 1:
                lines.append(f"{name:>28}: not even one sequence fits")
    lines.append("")
    lines.append(res["note"])
    return "\n".join(lines)
