"""Memory planning: what a KV cache costs at a context length, and how many tokens or sequences fit
a memory, for the uniform caches and every configuration a search of the model measured.

    from kvtuner_edge.plan import plan, kv_bytes
    table = plan("model.gguf", memory="6GiB", ctx=32768)     # the rows `kvtuner-edge plan` prints

The KV cache is counted as the engine allocates it (llama-context.cpp, llama-kv-cache*.cpp, patched
engine): the context rounded up to 256 cells, one stream of that many cells per sequence
(kv_unified off, as llama-batched-bench and our bench run sequences), a sliding-window layer with
min(context, window + n_ubatch) cells rounded up to 256, and each layer's K and V rows in its own
type (block sizes included: q3_kv 16 bytes and q2_kv 12 bytes per 32 values). `--memory` adds the
weights and the compute and output buffers the engine reports for that context (engine.MemoryProbe:
measured, not estimated).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import types as T
from .config import CacheConfig
from .errors import ConfigError, EngineError

CELL_PAD = 256            # llama.cpp pads n_ctx, n_ctx_seq and the sliding-window cache to 256 cells
N_UBATCH = 512            # the micro-batch of every context our tools create
MAX_SEQ = 256             # LLAMA_MAX_SEQ
MAX_CELLS = 2**31         # n_ctx is a uint32 in the engine; stay well inside it


def _pad(n: int) -> int:
    return (n + CELL_PAD - 1) // CELL_PAD * CELL_PAD


# sizes ------------------------------------------------------------------------------------------------

_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}


def parse_size(text: str | int | float, what: str = "size") -> int:
    """'6GiB', '512MiB', '1.5G', '8e9', 8589934592 -> bytes (G/GiB = 2^30, GB = 10^9). ConfigError for
    anything else, zero, a negative or a non-finite size."""
    if isinstance(text, bool):
        raise ConfigError(f"{what}: cannot read {text!r} as a size (examples: 6GiB, 512MiB, 8e9)")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = str(text).strip().lower().replace(" ", "").replace("_", "")
        mult = 1
        for u in sorted(_UNITS, key=len, reverse=True):
            if t.endswith(u):
                t, mult = t[: -len(u)], _UNITS[u]
                break
        try:
            value = float(t) * mult
        except ValueError:
            raise ConfigError(f"{what}: cannot read {text!r} as a size (examples: 6GiB, 512MiB, 8e9)") from None
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"{what}: {text!r} is not a usable size (give a positive amount such as 6GiB)")
    if value >= 2**63:
        raise ConfigError(f"{what}: {text!r} is larger than any memory")
    return int(value)


def format_size(n: float, up: bool = False) -> str:
    """1.50 GiB / 180.00 MiB / 12.0 KiB; up=True rounds up at the shown precision (a 'needs at least')."""
    for unit, scale, digits in (("GiB", 2**30, 2), ("MiB", 2**20, 2), ("KiB", 2**10, 1)):
        if n >= scale:
            v = n / scale
            if up:
                v = math.ceil(v * 10**digits - 1e-9) / 10**digits
            return f"{v:.{digits}f} {unit}"
    return f"{int(n)} B"


# the KV cache as the engine allocates it --------------------------------------------------------------

def layer_cells(info, ctx: int, n_seq: int = 1, n_ubatch: int = N_UBATCH) -> list[int]:
    """Cells per layer (all sequences together) of a context of n_seq sequences of `ctx` tokens each;
    0 for layers without a KV cache."""
    if ctx < 1 or n_seq < 1:
        raise ConfigError(f"a context needs at least one token and one sequence (got {ctx} tokens x {n_seq})")
    n_ctx = _pad(ctx * n_seq)                 # llama-context.cpp: GGML_PAD(n_ctx, 256)
    n_ctx_seq = _pad(n_ctx // n_seq)          # then per sequence, padded again
    out = []
    for il in range(info.n_layer):
        if info.n_head_kv[il] <= 0:
            out.append(0)
        elif info.swa_layers[il] and info.sliding_window:
            out.append(_pad(min(n_ctx_seq, info.sliding_window + n_ubatch)) * n_seq)   # llama-kv-cache-iswa.cpp
        else:
            out.append(n_ctx_seq * n_seq)
    return out


def kv_bytes(info, config: CacheConfig, ctx: int, n_seq: int = 1, n_ubatch: int = N_UBATCH) -> int:
    """Bytes of the K and V cache tensors the engine allocates for `config` at this context."""
    cells = layer_cells(info, ctx, n_seq, n_ubatch)
    return sum(cells[il] * sum(config.layer_bytes(info, il, 1)) for il in info.kv_layers)


def elements_at(info, ctx: int, n_seq: int = 1, n_ubatch: int = N_UBATCH) -> int:
    """K and V values the cache holds at this context (bits = 8 * bytes / elements)."""
    cells = layer_cells(info, ctx, n_seq, n_ubatch)
    return sum(cells[il] * (info.n_embd_k(il) + info.n_embd_v(il)) for il in info.kv_layers)


def _largest(fits: Callable[[int], bool], hi: int, lo_ok: int = 0) -> int:
    """Largest k in [1, hi] with fits(k), for a monotone fits (k <= lo_ok is known to fit); 0 if none."""
    lo = lo_ok
    if hi <= lo:
        return lo
    if fits(hi):
        return hi
    while hi - lo > 1:          # fits(lo) or lo == 0; not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_ctx_for(info, config: CacheConfig, kv_budget: int, n_seq: int = 1, n_ubatch: int = N_UBATCH) -> int:
    """The longest context per sequence (a multiple of 256, what the engine allocates) whose KV cache
    fits kv_budget bytes with n_seq sequences; 0 when not even 256 tokens fit."""
    hi = MAX_CELLS // (CELL_PAD * n_seq)
    k = _largest(lambda k: kv_bytes(info, config, k * CELL_PAD, n_seq, n_ubatch) <= kv_budget, hi)
    return k * CELL_PAD


def max_seqs_for(info, config: CacheConfig, kv_budget: int, ctx: int, n_ubatch: int = N_UBATCH) -> int:
    """The most sequences of `ctx` tokens each whose KV cache fits kv_budget bytes (at most 256)."""
    return _largest(lambda s: kv_bytes(info, config, ctx, s, n_ubatch) <= kv_budget, MAX_SEQ)


# with weights and engine buffers (--memory) -------------------------------------------------------------

class Totals:
    """Total memory of a context as the engine reports it (engine.MemoryProbe), memoised per shape."""

    def __init__(self, probe):
        self.probe = probe
        self._seen: dict = {}

    def at(self, config: CacheConfig, ctx: int, n_seq: int = 1) -> dict:
        key = (config.spec(), ctx, n_seq)
        if key not in self._seen:
            self._seen[key] = self.probe.context(ctx, n_seq, config=config)
        return self._seen[key]

    def _max(self, kv_of: Callable[[int], int], at: Callable[[int], dict], memory: int, hi: int) -> int:
        """Largest k in [1, hi] whose context fits `memory`, where its total is kv_of(k) (exact) plus the
        engine's weights and buffers, which do not shrink as k grows: their size at k = 1 bounds the
        answer from above, their size there from below, and the engine decides the few steps between."""
        first = at(1)
        if first["total_bytes"] > memory:
            return 0
        k_hi = _largest(lambda k: kv_of(k) <= memory - (first["total_bytes"] - first["kv_bytes"]), hi, 1)
        top = at(k_hi)
        if top["total_bytes"] <= memory:
            return k_hi
        k_lo = max(1, _largest(lambda k: kv_of(k) <= memory - (top["total_bytes"] - top["kv_bytes"]), k_hi - 1))
        return _largest(lambda k: at(k)["total_bytes"] <= memory, k_hi - 1, k_lo)

    def max_ctx(self, config: CacheConfig, memory: int, n_seq: int = 1) -> int:
        """The longest context per sequence (a multiple of 256) whose weights + KV + compute + output fit."""
        info = self.probe.info
        return CELL_PAD * self._max(lambda k: kv_bytes(info, config, k * CELL_PAD, n_seq),
                                    lambda k: self.at(config, k * CELL_PAD, n_seq), memory,
                                    MAX_CELLS // (CELL_PAD * n_seq))

    def max_seqs(self, config: CacheConfig, memory: int, ctx: int) -> int:
        """The most sequences of `ctx` tokens each (at most 256) whose whole context fits."""
        info = self.probe.info
        return self._max(lambda n: kv_bytes(info, config, ctx, n), lambda n: self.at(config, ctx, n), memory,
                         min(MAX_SEQ, MAX_CELLS // max(ctx, 1)))


# the rows -----------------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str                       # "q8_0", "K q8_0 / V q4_0", "searched"
    kind: str                       # "uniform" or "searched"
    config: CacheConfig
    bits_nominal: float
    bits_storage: float
    bytes_per_token: float          # every KV layer, one cell each (a sliding-window layer stops growing at its window)
    predicted_kld: float | None     # torch on the calibration text (the search's measurement)
    engine_kld: float | None        # the engine on held-out text, where an export checked this configuration
    engine_floor: float | None = None
    kv_bytes: int | None = None     # at the asked (or trained) context and sequences
    total_bytes: int | None = None  # with --memory: weights + KV + compute + output, as the engine reports them
    max_ctx: int | None = None      # with a memory and no --ctx: the longest context per sequence that fits
    max_seqs: int | None = None     # with a memory and --ctx: the most sequences that fit
    fits: bool | None = None        # with a memory: the asked shape fits

    def to_json(self, info=None) -> dict:
        d = dict(self.__dict__)
        d["config"] = self.config.short()
        if info is not None:
            d["mix"] = type_counts(self.config, info)
        d["type_k"], d["type_v"] = list(self.config.type_k), list(self.config.type_v)
        return d


def type_counts(config: CacheConfig, info) -> str:
    """The mix of a per-layer configuration in a few words: "K q5_0 x20, iq4_nl x6 | V q4_0 x30"."""
    def side(names):
        counts: dict[str, int] = {}
        for il in info.kv_layers:
            counts[names[il]] = counts.get(names[il], 0) + 1
        return ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"K {side(config.type_k)} | V {side(config.type_v)}"


def uniform_configs(info, types: Sequence[str]) -> list[tuple[str, CacheConfig]]:
    out = [(t, CacheConfig.uniform(info.n_layer, t)) for t in types]
    if "q8_0" in types and "q4_0" in types:
        out.append(("K q8_0 / V q4_0", CacheConfig.uniform(info.n_layer, "q8_0", "q4_0")))
    return out


def _engine_record(searches: list[dict], spec: str) -> dict | None:
    for s in searches:                  # newest first
        rec = s["engine"].get(spec)
        if isinstance(rec, dict) and isinstance(rec.get("engine_kld"), (int, float)):
            return rec
    return None


def searched_front(info, searches: list[dict], cost: Callable[[CacheConfig], float]) -> tuple[list, dict | None]:
    """The measured configurations of the newest search's calibration (every search of the model on the
    same text and backend measures the same KLD) on the (cost, predicted KLD) Pareto front, cheapest
    first; and that search's meta."""
    if not searches:
        return [], None
    meta = searches[0]["meta"]
    same = [s for s in searches if s["meta"].get("calibration") == meta.get("calibration")
            and s["meta"].get("backend") == meta.get("backend")]
    pts: dict[str, tuple[float, float, CacheConfig]] = {}
    for s in same:
        for p in s["result"].points:
            try:
                cfg = CacheConfig(tuple(p.type_k), tuple(p.type_v))
                cfg.validate(info)
            except ConfigError:
                continue
            spec = cfg.spec()
            if spec not in pts or p.kld < pts[spec][1]:
                pts[spec] = (cost(cfg), float(p.kld), cfg)
    front, best = [], math.inf
    for c, kld, cfg in sorted(pts.values(), key=lambda v: (v[0], v[1])):
        if kld < best:
            front.append((c, kld, cfg))
            best = kld
    return front, meta


def plan(model: str | os.PathLike, *, memory: int | str | None = None, kv_memory: int | str | None = None,
         ctx: int | None = None, n_seq: int = 1, types: Sequence[str] | None = None, backend: str = "cpu",
         cache_dir: str | os.PathLike | None = None) -> dict:
    """The plan `kvtuner-edge plan` prints: one row per uniform cache and per configuration on the
    model's searched front (when a search of it is cached), with bytes per token, the KV cache (and
    with `memory` the whole context) at `ctx` tokens x n_seq sequences (default: the trained context),
    the longest context (or, given ctx, the most sequences) that fits, and the expected quality."""
    from .gguf_io import model_info
    from .tune import candidate_types, find_searches

    path = Path(model)
    if memory is not None and kv_memory is not None:
        raise ConfigError("give either --memory (weights + KV cache + engine buffers) or --kv-memory (KV cache only)")
    mem = parse_size(memory, "--memory") if memory is not None else None
    kvm = parse_size(kv_memory, "--kv-memory") if kv_memory is not None else None
    if ctx is not None and ctx < 1:
        raise ConfigError(f"--ctx must be at least 1 token, got {ctx}")
    if not 1 <= n_seq <= MAX_SEQ:
        raise ConfigError(f"--seqs must be 1 to {MAX_SEQ} (the engine's limit), got {n_seq}")
    info = model_info(path)
    if not info.kv_layers:
        raise ConfigError(f"{path.name}: the {info.arch} model has no KV cache layers")
    if ctx is not None and ctx * n_seq > MAX_CELLS:
        raise ConfigError(f"{ctx} tokens x {n_seq} sequences is more than the engine's {MAX_CELLS} cells")
    tlist = candidate_types(info, backend, types)
    shape_ctx = ctx if ctx is not None else (info.n_ctx_train or 4096)
    searches = find_searches(path, cache_dir)
    base = {}
    for s in searches[::-1]:            # newest last, so newest wins
        for b in s["baselines"]:
            base[CacheConfig.uniform(info.n_layer, b["type_k"], b["type_v"]).spec()] = b["kld"]

    probe = None
    totals = None
    if mem is not None:
        from . import engine

        probe = engine.MemoryProbe(path)
        totals = Totals(probe)
    try:
        rows: list[Row] = []

        def add(name: str, kind: str, cfg: CacheConfig, pred: float | None) -> None:
            nom, sto = cfg.bits(info)
            rec = _engine_record(searches, cfg.spec())
            rows.append(Row(name, kind, cfg, nom, sto, cfg.bytes_per_token(info), pred,
                            rec["engine_kld"] if rec else None, rec.get("floor_kld") if rec else None))

        for name, cfg in uniform_configs(info, tlist):
            add(name, "uniform", cfg, base.get(cfg.spec()))
        uniform = {r.config.spec() for r in rows}
        front, meta = searched_front(info, searches, lambda c: kv_bytes(info, c, shape_ctx, n_seq))
        on_front_uniform = 0
        for _, kld, cfg in front:
            if cfg.spec() not in uniform:          # the search's own uniform points are rows already
                add("searched", "searched", cfg, kld)
            else:
                on_front_uniform += 1

        for r in rows:
            r.kv_bytes = kv_bytes(info, r.config, shape_ctx, n_seq)
            if mem is not None:
                t = totals.at(r.config, shape_ctx, n_seq)
                if t["kv_bytes"] != r.kv_bytes:       # our count of cells and rows against the engine's tensors
                    raise EngineError(f"{path.name}: the engine allocated {t['kv_bytes']} bytes of KV cache for "
                                      f"{r.config.short()} at {shape_ctx} x {n_seq}, where {r.kv_bytes} were "
                                      f"expected (an engine this version of kvtuner-edge does not know?)")
                r.total_bytes = t["total_bytes"]
                r.fits = r.total_bytes <= mem
                if ctx is None:
                    r.max_ctx = totals.max_ctx(r.config, mem, n_seq)
                else:
                    r.max_seqs = totals.max_seqs(r.config, mem, ctx)
            elif kvm is not None:
                r.fits = r.kv_bytes <= kvm
                if ctx is None:
                    r.max_ctx = max_ctx_for(info, r.config, kvm, n_seq)
                else:
                    r.max_seqs = max_seqs_for(info, r.config, kvm, ctx)
        out = {
            "model": str(path), "name": info.name, "arch": info.arch, "n_layer": info.n_layer,
            "n_ctx_train": info.n_ctx_train, "sliding_window": info.sliding_window if any(info.swa_layers) else None,
            "ctx": shape_ctx, "ctx_given": ctx is not None, "n_seq": n_seq, "memory": mem, "kv_memory": kvm,
            "candidate_types": tlist, "search": None, "rows": [r.to_json(info) for r in rows],
        }
        if meta is not None:
            out["search"] = {"files": [s["file"] for s in searches], "calibration": meta.get("calibration"),
                             "backend": meta.get("backend"), "unit": meta.get("unit"),
                             "types": meta.get("types"), "points": len(front), "uniform_points": on_front_uniform}
        if probe is not None:
            t = totals.at(CacheConfig.uniform(info.n_layer, "f16"), shape_ctx, n_seq)
            out["engine"] = {"weights": probe.weights, "weight_bytes": probe.weight_bytes,
                             "compute_bytes_f16": t["compute_bytes"], "output_bytes": t["output_bytes"],
                             "n_ubatch": N_UBATCH}
        return out
    finally:
        if probe is not None:
            probe.close()


def table(res: dict) -> str:
    """The plan as text."""
    lines = []
    n_seq = res["n_seq"]
    shape = f"{res['ctx']} tokens" + (f" x {n_seq} sequences" if n_seq > 1 else "")
    head = f"{Path(res['model']).name}: {res['name']} ({res['arch']}, {res['n_layer']} layers, trained context " \
           f"{res['n_ctx_train']}"
    if res["sliding_window"]:
        head += f", sliding window {res['sliding_window']}"
    lines.append(head + ")")
    if res.get("engine"):
        e = res["engine"]
        lines.append(f"engine: weights {format_size(e['weight_bytes'])} "
                     f"({', '.join(f'{k} {format_size(v)}' for k, v in e['weights'].items())}), compute buffers "
                     f"{format_size(e['compute_bytes_f16'])} and output {format_size(e['output_bytes'])} at {shape}")
    if res["memory"] is not None:
        lines.append(f"memory {format_size(res['memory'])}: weights + KV cache + compute + output buffers, as the "
                     f"engine reports them")
    elif res["kv_memory"] is not None:
        lines.append(f"KV memory {format_size(res['kv_memory'])}")
    s = res["search"]
    if s:
        uni = f", {s['uniform_points']} of them uniform caches" if s.get("uniform_points") else ""
        lines.append(f"searched front: {s['points']} configurations{uni} ({s['unit']} bits, {s['backend']}, "
                     f"calibration {s['calibration']})")
    else:
        lines.append("no search of this model cached yet (`kvtuner-edge tune MODEL` or export --budget adds the "
                     "searched front and the predicted KLD)")
    at = "total" if res["memory"] is not None else "KV"
    cols = f"  {'cache':<16}{'storage':>8}{'B/token':>9}{f'{at} at ' + shape:>{max(22, len(shape) + 10)}}"
    has_mem = res["memory"] is not None or res["kv_memory"] is not None
    if has_mem:
        cols += f"{'fits':>5}{'max seqs' if res['ctx_given'] else ('max ctx' + (f' x{n_seq}' if n_seq > 1 else '')):>12}"
    cols += f"{'pred KLD':>10}{'engine KLD':>11}  layers (--json: per layer)"
    lines.append(cols)
    for r in res["rows"]:
        size = r["total_bytes"] if res["memory"] is not None else r["kv_bytes"]
        cell = format_size(size)
        line = f"  {r['name']:<16}{r['bits_storage']:>8.2f}{r['bytes_per_token']:>9.0f}" \
               f"{cell:>{max(22, len(shape) + 10)}}"
        if has_mem:
            line += f"{'yes' if r['fits'] else 'no':>5}"
            if res["ctx_given"]:
                v = f"{r['max_seqs']}" + ("+" if r["max_seqs"] == MAX_SEQ else "")
            else:
                v = f"{r['max_ctx']}" + ("*" if r["max_ctx"] and r["max_ctx"] > res["n_ctx_train"] else "")
            line += f"{v:>12}"
        pk = "-" if r["predicted_kld"] is None else f"{r['predicted_kld']:.5f}"
        ek = "-" if r["engine_kld"] is None else f"{r['engine_kld']:.5f}"
        line += f"{pk:>10}{ek:>11}  " + ("uniform" if r["kind"] == "uniform" else r["mix"])
        lines.append(line)
    notes = ["pred KLD: torch on the calibration text (clean model, no engine floor); engine KLD: the patched "
             "engine on held-out text where an export checked that cache"]
    if has_mem and not res["ctx_given"]:
        notes.append("max ctx: per sequence, a multiple of 256 (what the engine allocates); * beyond the trained "
                     "context")
    if has_mem and res["ctx_given"]:
        notes.append(f"max seqs: sequences of {res['ctx']} tokens, each with its own cache stream "
                     f"(+: the engine's limit of {MAX_SEQ})")
    if has_mem and res["rows"] and not any(r["fits"] for r in res["rows"]):
        key = "total_bytes" if res["memory"] is not None else "kv_bytes"
        small = min(res["rows"], key=lambda r: r[key])
        notes.append(f"nothing listed fits {format_size(res['memory'] or res['kv_memory'])} at {shape}: the smallest, "
                     f"{small['name']}, needs {format_size(small[key], up=True)} ({small[key]} bytes)")
    if res["memory"] is not None:
        notes.append("not counted: the CPU backend's per-op work buffer (prompts with a quantized cache convert its "
                     "rows to f32 scratch there, up to 512 MiB per op)")
    lines += [f"  {n}" for n in notes]
    return "\n".join(lines)
