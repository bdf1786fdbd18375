"""The whole KVTuner path for one GGUF: calibrate (cached), search (cached), pick by budget, export,
check on the engine.

    from kvtuner_edge.tune import tune, export_budget
    run = tune("model.gguf")                       # profile + Pareto front, cached next to the model
    summary = export_budget("model.gguf", 5.0)     # pick within 5 nominal bits, write model.kvtuner.gguf
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import __version__
from . import types as T
from .config import CacheConfig
from .errors import ConfigError
from .gguf_io import check_output, model_info, read_header, remove_stale_temps

DEFAULT_CALIB_TOKENS = 512
CALIB_PROMPT = "The history of the city begins"
HELDOUT_PROMPT = "Scientists studying the ocean have found"



def _write_search(path: Path, result, baselines: list, meta: dict | None = None,
                  engine_checks: dict | None = None) -> None:
    """The search cache file (front + baselines; meta: which model, calibration and settings it belongs
    to, which `plan` reads; engine_checks: the engine's KLD of configurations an export checked),
    written to a temporary file and renamed."""
    doc = {"result": result.to_json(), "baselines": baselines}
    if meta is not None:
        doc["meta"] = meta
    if engine_checks:
        doc["engine"] = engine_checks
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _read_search(path: Path, n_layer: int, n_groups: int | None, progress: bool, extra: dict | None = None):
    """(Result, baselines) from a search cache file, or None when it is absent or unusable (truncated,
    not JSON, another layout): such a file is never trusted, the search runs again and replaces it.
    extra, when given, receives the file's "meta" and "engine" records (absent in older files).
    n_groups None: any number of layer groups (a reader that does not know the settings)."""
    from .search import Result

    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        result = Result.from_json(saved["result"])
        baselines = saved["baselines"]
        if n_groups is None:
            n_groups = len(result.groups)
        ok = (bool(result.points) and len(result.groups) == n_groups
              and all(len(p.x) == n_groups and len(p.type_k) == n_layer and len(p.type_v) == n_layer
                      and isinstance(p.kld, float) and all(isinstance(t, str) for t in p.type_k + p.type_v)
                      for p in result.points)
              and all(isinstance(b, dict) and isinstance(b.get("kld"), float) for b in baselines))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        _log(f"ignoring the unusable search cache {path.name}: searching again", progress)
        return None
    if extra is not None:
        meta, checks = saved.get("meta"), saved.get("engine")
        extra["meta"] = meta if isinstance(meta, dict) else None
        extra["engine"] = checks if isinstance(checks, dict) else {}
    return result, baselines


def _read_archive(path: Path, n_groups: int, progress: bool) -> dict:
    """The measured configurations of an interrupted search (genotype -> KLD); {} when absent or unusable."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        archive = {}
        for k, v in raw.items():
            x = json.loads(k)
            if not (isinstance(x, list) and len(x) == n_groups and all(isinstance(i, int) and i >= 0 for i in x)
                    and isinstance(v, float) and v == v):
                raise ValueError(k)
            archive[tuple(x)] = v
    except (OSError, ValueError, AttributeError, TypeError):
        _log(f"ignoring the unusable search checkpoint {path.name}: measuring from the start", progress)
        return {}
    _log(f"resuming the search: {len(archive)} configurations already measured", progress)
    return archive


def _log(msg: str, progress: bool = True) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


# candidates and budgets ---------------------------------------------------------------------------

def candidate_types(info, backend: str = "cpu", types: Sequence[str] | None = None) -> list[str]:
    """The cache types a search may use: `types` if given (each checked), else every default
    candidate the backend's flash attention runs; all must fit the model's head sizes."""
    if backend not in ("cpu", "cuda", "metal"):
        raise ConfigError(f"backend must be cpu, cuda or metal, got {backend!r}")
    heads = [h for il in info.kv_layers for h in (info.head_k[il], info.head_v[il])]
    if types:
        out = []
        for name in types:
            try:
                t = T.get(name)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if t.name not in T.CANDIDATES:
                raise ConfigError(f"{t.name} is not a search candidate (catalogued for comparison only); "
                                  f"candidates: {', '.join(T.CANDIDATES)}")
            if backend not in t.fa_backends:
                raise ConfigError(f"{t.name} is not a {backend} flash-attention type "
                                  f"({backend} runs: {', '.join(n for n in T.CANDIDATES if backend in T.get(n).fa_backends)})")
            bad = [h for h in heads if h % t.block]
            if bad:
                raise ConfigError(f"{t.name} has block size {t.block}, which does not divide head size {bad[0]}")
            if t.name not in out:
                out.append(t.name)
        return out
    return [n for n in T.CANDIDATES if backend in T.get(n).fa_backends
            and all(h % T.get(n).block == 0 for h in heads)]


def candidate_pairs(types: Sequence[str], backend: str) -> list[tuple[str, str]]:
    if backend in T.SAME_KV_TYPE_BACKENDS:
        return [(t, t) for t in types]
    return [(k, v) for k in types for v in types]


def feasible_range(info, pairs: Sequence[tuple[str, str]], unit: str = "nominal") -> tuple[float, float]:
    """Lowest and highest average bits any per-layer choice of these pairs gives."""
    lo = hi = n = 0.0
    for il in info.kv_layers:
        ne_k, ne_v = info.n_embd_k(il), info.n_embd_v(il)
        vals = []
        for k, v in pairs:
            tk, tv = T.get(k), T.get(v)
            bk, bv = (tk.nominal_bits, tv.nominal_bits) if unit == "nominal" else (tk.storage_bits, tv.storage_bits)
            vals.append(bk * ne_k + bv * ne_v)
        lo += min(vals)
        hi += max(vals)
        n += ne_k + ne_v
    return lo / n, hi / n


def check_budget(budget: float, lo: float, hi: float, unit: str, types: Sequence[str]) -> None:
    if not (lo - 1e-9 <= budget <= hi + 1e-9):
        raise ConfigError(f"budget {budget:g} is outside what the candidate types ({', '.join(types)}) allow: "
                          f"{lo:.3g} to {hi:.3g} {unit} bits per cached element")


# caching --------------------------------------------------------------------------------------------

def fingerprint(path: Path) -> str:
    """sha256 over the header (metadata + tensor table), the size and 16 spread 64 KiB samples of
    the tensor data: identifies a model file in well under a second at any size."""
    h = read_header(path)
    size = path.stat().st_size
    d = hashlib.sha256()
    with open(path, "rb") as f:
        d.update(f.read(h.data_offset))
        d.update(str(size).encode())
        span = max(1, size - h.data_offset - 65536)
        for i in range(16):
            f.seek(h.data_offset + span * i // 15)
            d.update(f.read(65536))
    return d.hexdigest()[:16]


def cache_dir_for(path: Path, cache_dir: Path | None = None) -> Path:
    """<model folder>/.kvtuner-cache when writable, else ~/.cache/kvtuner-edge/tune."""
    if cache_dir is not None:
        return Path(cache_dir)
    near = path.resolve().parent / ".kvtuner-cache"
    try:
        near.mkdir(exist_ok=True)
        probe = near / f".probe{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return near
    except OSError:
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvtuner-edge" / "tune"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# the searches on disk (plan) -----------------------------------------------------------------------------

def _search_dirs(path: Path, cache_dir: Path | None = None) -> list[Path]:
    """The folders tune() may have written this model's search caches to (none is created)."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    dirs = [path.resolve().parent / ".kvtuner-cache",
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvtuner-edge" / "tune"]
    return [d for d in dirs if d.is_dir()]


def _legacy_meta(file: Path, result, path: Path, n_layer: int, profiles: dict) -> dict | None:
    """A search cache written before the meta record: it belongs to this model when a profile of this
    model's path in the same folder gives exactly its key (the key hashes the profile key, the
    settings and the layer groups with their choices, see tune())."""
    st = result.settings
    for prof in profiles.values():
        try:
            if Path(prof["model"]).resolve() != path.resolve() or prof["n_layer"] != n_layer:
                continue
            pairs = [list(p) for p in prof["pairs"]]
            # the choices were numpy integers, which the key's json.dumps(default=str) wrote as strings
            choices = [[str(pairs.index(list(p))) for p in c] for c in result.choices]
            for groups in range(len(result.groups), max(n_layer, len(result.groups)) + 1):
                key = _key("search", prof["key"], st["unit"], groups, st["pop"], st["gens"], st["seed"], choices,
                           result.groups, 2)
                if file.name == f"search-{key}.json":
                    return {"fingerprint": None, "model": str(path.resolve()), "profile_key": prof["key"],
                            "backend": prof.get("backend", "cpu"),
                            "types": list(dict.fromkeys(t for p in pairs for t in p)), "unit": st["unit"],
                            "calibration": (prof.get("settings") or {}).get("source", "?"), "groups": groups,
                            "pop": st["pop"], "gens": st["gens"], "seed": st["seed"], "legacy": True}
        except (KeyError, TypeError, ValueError, OSError):
            continue
    return None


def find_searches(model: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every finished search of this model in its cache folders (the same file, by fingerprint):
    [{"file", "meta", "result" (search.Result), "baselines", "engine" (spec -> engine check)}],
    newest first. Unusable files are skipped, as tune() skips them."""
    path = Path(model)
    info = model_info(path)
    fp = fingerprint(path)
    found = []
    for d in _search_dirs(path, Path(cache_dir) if cache_dir else None):
        profiles: dict | None = None
        for f in d.glob("search-*.json"):
            if not re.fullmatch(r"search-[0-9a-f]{16}\.json", f.name):
                continue          # checkpoints (.partial.json) and temporary files
            extra: dict = {}
            got = _read_search(f, info.n_layer, None, False, extra)
            if got is None:
                continue
            result, baselines = got
            meta = extra.get("meta")
            if meta is not None:
                if meta.get("fingerprint") != fp:
                    continue
            else:
                if profiles is None:
                    profiles = {}
                    for pf in d.glob("profile-*.json"):
                        try:
                            profiles[pf.name] = json.loads(pf.read_text())
                        except (OSError, ValueError):
                            pass
                meta = _legacy_meta(f, result, path, info.n_layer, profiles)
                if meta is None:
                    continue
            found.append({"file": str(f), "meta": meta, "result": result, "baselines": baselines,
                          "engine": extra.get("engine") or {}, "mtime": f.stat().st_mtime})
    found.sort(key=lambda r: -r["mtime"])
    return found


def record_engine_checks(search_file: str | os.PathLike, checks: dict) -> None:
    """Add engine measurements ({config spec: {"engine_kld", "floor_kld", "heldout", "ctx", ...}}) to
    a search cache file, which `plan` prints beside the predictions (read, merge, rename)."""
    f = Path(search_file)
    try:
        doc = json.loads(f.read_text())
        if not isinstance(doc, dict) or "result" not in doc:
            return
        doc.setdefault("engine", {})
        if not isinstance(doc["engine"], dict):
            doc["engine"] = {}
        doc["engine"].update(checks)
        tmp = f.with_name(f.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, f)
    except (OSError, ValueError):
        pass          # a cache that cannot take the record loses nothing but the record


# text --------------------------------------------------------------------------------------------------

def generated_tokens(path: Path, n: int, prompt: str, seed: int, temperature: float = 0.8) -> list[int]:
    """Data-free text: the model's own sampled continuation of a prompt (f16 cache)."""
    from . import engine

    with engine.open_model(path, n_ctx=n + 64, use_file_types=False, seed=seed) as m:
        toks = m.tokenize(prompt)
        return (toks + m.generate(toks, n, temperature=temperature))[:n]


def text_tokens(path: Path, text_file: Path, n: int) -> list[int]:
    from . import engine

    p = Path(text_file)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the text file: {e}") from None
    with engine.open_model(path, n_ctx=64, use_file_types=False) as m:
        toks = m.tokenize(text[: n * 12])
    if len(toks) < min(n, 128):
        raise ConfigError(f"{p}: only {len(toks)} tokens of text; calibration needs at least {min(n, 128)}")
    return toks[:n]


def calibration_tokens(path: Path, calib_file: Path | None, n: int, seed: int = 0) -> tuple[list[int], str]:
    if calib_file is not None:
        return text_tokens(path, calib_file, n), f"file {Path(calib_file).name} (first {n} tokens)"
    return generated_tokens(path, n, CALIB_PROMPT, seed), f"self-generated ({n} tokens, seed {seed})"


def heldout_tokens(path: Path, n: int) -> tuple[list[int], str]:
    """wikitext-2 test from ../shared/data where present, else self-generated text from another prompt and seed."""
    from .evaluate import shared_text

    src = shared_text()
    if src is not None:
        return text_tokens(path, src, n), f"wikitext-2 test (first {n} tokens)"
    return generated_tokens(path, n, HELDOUT_PROMPT, seed=1234), f"self-generated held-out text ({n} tokens)"


# the pipeline ------------------------------------------------------------------------------------------

@dataclass
class TuneRun:
    model: Path
    info: object
    backend: str
    unit_range: dict                      # unit -> (lo, hi)
    types: list[str]
    pairs: list[tuple[str, str]]
    calibration: str
    profile: object                       # calibrate.profile.Profile
    result: object                        # search.Result
    baselines: list[dict]
    files: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)          # the search cache's meta record (see _write_search)
    memory: str = ""                      # where the calibration's weights were held (TorchModel.memory_summary)


def _torch_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here (install a CUDA build of torch)")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {device!r}")
    return device


def tune(model: str | os.PathLike, *, types: Sequence[str] | None = None, backend: str = "cpu",
         device: str | None = None, calib_file: str | os.PathLike | None = None,
         n_calib: int = DEFAULT_CALIB_TOKENS, max_positions: int = 256, max_pairs: int = 8,
         groups: int = 8, pop: int = 24, gens: int = 5, seed: int = 0, cache_dir: str | os.PathLike | None = None,
         unit: str = "nominal", budgets: Sequence[float] = (), progress: bool = True,
         max_memory: str | int | None = None, weights: str = "torch") -> TuneRun:
    """Calibrate and search `model` (both cached and resumable); returns the measured Pareto front
    of (average `unit` bits, KLD). For each of `budgets` the front is then refined where it matters
    (search.refine: measured local search within that budget, cached per budget).

    max_memory ("8GiB", bytes; default: what the torch device has free less a margin) bounds the
    calibration's weights and activations: the weights stay quantised and as many layers as fit
    stay dequantised (calibrate.model.TorchModel); the results do not depend on it. weights="gguf-py"
    is the reference path (everything float32 up front, no limit), for comparisons."""
    from . import engine

    engine._bind()          # the engine's libraries before torch/numpy (see engine.py)
    import torch

    from .calibrate.model import TorchModel, cuda_expandable_segments, kld_many, log_probs, parse_memory
    from .calibrate.profile import kld_positions, sensitivity
    from .search import Layout, build_space, refine, result_of, search

    path = Path(model)
    info = model_info(path)
    if not info.kv_layers:
        raise ConfigError(f"{path.name}: the {info.arch} model has no KV cache layers to tune")
    tlist = candidate_types(info, backend, types)
    pairs = candidate_pairs(tlist, backend)
    ranges = {u: feasible_range(info, pairs, u) for u in ("nominal", "storage")}
    dev = _torch_device(device)
    if max_memory is not None:
        max_memory = parse_memory(max_memory)      # a bad value fails here, before any work
    if dev == "cuda":
        cuda_expandable_segments()                 # reserved memory close to allocated (the limit counts it)
    t_start = time.time()
    cdir = cache_dir_for(path, Path(cache_dir) if cache_dir else None)
    if cdir.is_dir():
        remove_stale_temps(cdir)
    fp = fingerprint(path)

    tokens, source = calibration_tokens(path, Path(calib_file) if calib_file else None, n_calib, seed)
    tok_hash = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:12]
    pkey = _key("profile", fp, tok_hash, pairs, backend, max_positions, max_pairs, 1)
    _log(f"calibrating on {source}; {len(pairs)} (K, V) pairs of {', '.join(tlist)}; torch on {dev}; "
         f"cache {cdir}", progress)
    if dev == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.time()
    pos_np = kld_positions(len(tokens), max_positions)
    # the most configurations one batched pass carries: a layer's measured pairs, a search batch (8),
    # the uniform baselines
    n_base = sum(k == v for k, v in pairs) + (("q8_0", "q4_0") in pairs)
    tm = TorchModel(path, device=dev, backend="cuda" if backend == "cuda" else "cpu", max_memory=max_memory,
                    workload=(len(tokens), max(max_pairs, 8, n_base), len(pos_np)), weights=weights)
    t_load = time.time() - t0
    _log(f"{tm.memory_summary()}; loaded in {t_load:.1f} s", progress)
    prof = sensitivity(tm, tokens, pairs, key=pkey, cache=cdir / f"profile-{pkey}.json",
                       max_positions=max_positions, max_pairs=max_pairs, progress=progress,
                       settings={"source": source, "n_tokens": len(tokens), "device": dev})
    attn, kld = prof.arrays()

    layout = Layout.of(info)
    space = build_space(attn, kld, pairs, layout, n_groups=groups, unit=unit)
    skey = _key("search", pkey, unit, groups, pop, gens, seed, [list(c) for c in space.choices], space.groups, 2)
    final = cdir / f"search-{skey}.json"
    partial = cdir / f"search-{skey}.partial.json"
    pos = torch.as_tensor(pos_np, device=tm.device)
    ref = None

    def evaluate(configs):
        nonlocal ref
        with torch.inference_mode():
            if ref is None:
                ref = log_probs(tm.forward(tokens, None, pos))
            return kld_many(tm, tokens, configs, ref, pos)

    t1 = time.time()
    saved: dict = {}
    cached = _read_search(final, info.n_layer, len(space.groups), progress, saved)
    # what `plan` needs to tell this model's searches from others' in a shared cache folder
    meta = {"fingerprint": fp, "model": str(path.resolve()), "profile_key": pkey, "backend": backend,
            "types": tlist, "unit": unit, "calibration": source, "groups": groups, "pop": pop, "gens": gens,
            "seed": seed, "tool_version": __version__}
    checks = saved.get("engine") or {}
    if cached is not None:
        result, baselines = cached
        _log(f"search results from the cache ({result.evaluations} configurations measured)", progress)
        if saved.get("meta") is None:       # a file from before the meta record: add it (best effort)
            try:
                _write_search(final, result, baselines, meta, checks)
            except OSError:
                pass
        else:
            meta = saved["meta"]
    else:
        archive = _read_archive(partial, len(space.groups), progress)

        def checkpoint(arch):
            tmp = partial.with_name(partial.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({json.dumps(list(k)): v for k, v in arch.items()}))
            os.replace(tmp, partial)

        from tqdm import tqdm

        _log(f"searching: {len(space.groups)} layer groups, choices per group "
             f"{[len(c) for c in space.choices]}", progress)
        bar = tqdm(total=pop * (gens + 1), desc="NSGA-II (measured KLD)", unit="cfg", disable=not progress,
                   file=sys.stderr)

        def prog(done, total):
            bar.total = max(total, done)
            bar.n = done
            bar.refresh()

        result = search(space, evaluate, pop=pop, gens=gens, seed=seed, progress=prog, archive=archive,
                        on_batch=checkpoint)
        bar.close()
        uni = [(k, v) for k, v in pairs if k == v] + [p for p in (("q8_0", "q4_0"),) if p in pairs]
        cfgs = [([k] * info.n_layer, [v] * info.n_layer) for k, v in uni]
        vals = evaluate(cfgs)
        baselines = []
        for (k, v), val in zip(uni, vals):
            c = CacheConfig.uniform(info.n_layer, k, v)
            nom, sto = c.bits(info)
            baselines.append({"name": k if k == v else f"K {k} / V {v}", "type_k": k, "type_v": v,
                              "bits_nominal": nom, "bits_storage": sto, "kld": float(val)})
        cdir.mkdir(parents=True, exist_ok=True)
        _write_search(final, result, baselines, meta)
        partial.unlink(missing_ok=True)
    done = {round(float(b), 6) for b in result.settings.get("refined", [])}
    todo = [round(float(b), 6) for b in dict.fromkeys(budgets) if round(float(b), 6) not in done]
    if todo:
        archive = {tuple(int(v) for v in p.x): p.kld for p in result.points}
        n_new = 0
        for b in todo:
            _log(f"refining the configurations within {b:g} {unit} bits (measured local search)", progress)
            n_new += refine(space, evaluate, archive, b)
        settings = {**result.settings, "refined": sorted(done | set(todo))}
        result = result_of(space, archive, settings, {**result.seconds, "refine": time.time() - t1})
        _log(f"refinement measured {n_new} more configurations", progress)
        _write_search(final, result, baselines, meta, checks)
    t_search = time.time() - t1
    return TuneRun(path, info, backend, ranges, tlist, pairs, source, prof, result, baselines,
                   files={"profile": str(cdir / f"profile-{pkey}.json"), "search": str(final)},
                   seconds={"load": t_load, "profile": sum(prof.seconds.values()), "search": t_search,
                            "total": time.time() - t_start}, meta=meta,
                   memory=tm.memory_summary())


def report(run: TuneRun, out_json: Path, chosen=None) -> dict:
    """Write the Pareto front as JSON and PNG (and the chosen configuration's layer map) beside out_json."""
    from . import plots

    res = run.result
    unit = res.settings.get("unit", "nominal")
    pts = [p.__dict__ for p in res.points]
    doc = {
        "model": str(run.model), "backend": run.backend, "candidate_types": run.types,
        "calibration": run.calibration, "feasible_bits": {u: list(r) for u, r in run.unit_range.items()},
        "groups": res.groups, "group_choices": res.choices, "evaluations": res.evaluations,
        "seconds": run.seconds, "front": [pts[i] for i in res.front],
        "front_storage": [pts[i] for i in res.front_storage], "baselines": run.baselines,
        "chosen": chosen.__dict__ if chosen is not None else None, "tool_version": __version__,
    }
    out_json = Path(out_json)
    tmp = out_json.with_name(out_json.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out_json)
    stem = out_json.with_suffix("")              # x.pareto.json -> x.pareto
    files = {"pareto_json": str(out_json)}
    files["pareto_png"] = str(plots.pareto(Path(str(stem) + ".png"), pts, res.front if unit == "nominal" else res.front_storage,
                                           run.baselines, chosen.__dict__ if chosen is not None else None, unit,
                                           title=f"{run.model.name}: KV cache configurations (torch KLD, calibration text)"))
    if chosen is not None:
        files["layers_png"] = str(plots.layer_map(stem.with_name(stem.name.replace(".pareto", "") + ".layers.png"),
                                                  chosen.type_k, chosen.type_v,
                                                  title=f"{run.model.name}: chosen per-layer K/V types"))
    return files


def pick_with_baselines(run: TuneRun, budget: float, unit: str, feasible: tuple[float, float]):
    """The search's pick within the budget, or a uniform cache the same torch model measured better
    (a sparse front must never hand out a worse cache than a plain one of the same size)."""
    from .search import Point

    chosen = run.result.pick(budget, unit, feasible=feasible)
    key = "bits_nominal" if unit == "nominal" else "bits_storage"
    for b in run.baselines:
        if b[key] <= budget + 1e-9 and b["kld"] < chosen.kld:
            n = run.info.n_layer
            chosen = Point([], [b["type_k"]] * n, [b["type_v"]] * n, b["bits_nominal"], b["bits_storage"],
                           b["kld"], b["kld"])
    return chosen


def export_budget(model: str | os.PathLike, budget: float, out: str | os.PathLike | None = None, *,
                  unit: str = "nominal", validate: bool = True, n_eval: int = 1024, progress: bool = True,
                  **tune_kw) -> dict:
    """Tune (cached), pick the lowest-KLD configuration within `budget` bits, export it with
    provenance, and measure it on the engine against uniform caches of nearby bits on held-out text."""
    from . import engine  # noqa: F401  (llama.cpp's libraries before numpy: see engine.py)
    from .export import default_output

    path = Path(model)
    if unit not in ("nominal", "storage"):
        raise ConfigError(f"budget unit must be nominal or storage, got {unit!r}")
    info = model_info(path)
    if not info.kv_layers:
        raise ConfigError(f"{path.name}: the {info.arch} model has no KV cache layers to tune")
    backend = tune_kw.get("backend", "cpu")
    tlist = candidate_types(info, backend, tune_kw.get("types"))
    lo, hi = feasible_range(info, candidate_pairs(tlist, backend), unit)
    check_budget(budget, lo, hi, unit, tlist)
    dst = Path(out) if out is not None else default_output(path)
    read_header(path)                      # a corrupt or truncated model fails here, before any work
    check_output(path, dst)

    run = tune(path, progress=progress, unit=unit, budgets=[budget], **tune_kw)
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()      # the calibration's cached GPU memory back before the engine loads the model
    chosen = pick_with_baselines(run, budget, unit, (lo, hi))
    return _export_and_check(run, chosen, dst, budget, unit, {}, validate, n_eval, progress)


def _export_and_check(run: TuneRun, chosen, dst: Path, budget: float, unit: str, extra_kv: dict,
                      validate: bool, n_eval: int, progress: bool) -> dict:
    """Write the pick with provenance, the front and plots; measure it on the engine against the three
    uniform caches nearest in bits (recorded in the search cache for `plan`); the summary."""
    from . import evaluate as E
    from .export import export

    path, info = run.model, run.info
    cfg = CacheConfig(tuple(chosen.type_k), tuple(chosen.type_v))
    extra = {
        "kvtuner.source": "search",
        "kvtuner.budget": float(budget),
        "kvtuner.budget_unit": unit,
        "kvtuner.predicted_kld": float(chosen.kld),
        "kvtuner.candidate_types": list(run.types),
        "kvtuner.backend": run.backend,
        "kvtuner.calibration": run.calibration,
        "kvtuner.search": f"NSGA-II over {len(run.result.groups)} layer groups, "
                          f"{run.result.evaluations} configurations measured (torch KLD)",
        **extra_kv,
    }
    export(path, cfg, dst, extra=extra)
    remove_stale_temps(dst.parent, f"{dst.stem}.*.tmp*")     # a killed run's front and plots
    files = report(run, dst.with_name(dst.stem + ".pareto.json"), chosen)
    summary = {"model": str(path), "output": str(dst), "budget": budget, "unit": unit,
               "config": cfg.short(), "type_k": list(cfg.type_k), "type_v": list(cfg.type_v),
               "bits_nominal": chosen.bits_nominal, "bits_storage": chosen.bits_storage,
               "predicted_kld": chosen.kld, "calibration": run.calibration, "files": {**run.files, **files},
               "evaluations": run.result.evaluations,
               "seconds": run.seconds, "calibration_memory": run.memory, "rows": []}
    if validate:
        toks, src = heldout_tokens(path, n_eval)
        tests = {"chosen": (cfg, None, None)}
        key = "bits_nominal" if unit == "nominal" else "bits_storage"
        near = sorted(run.baselines, key=lambda b: abs(b[key] - chosen.__dict__[key]))[:3]
        for b in near:
            tests[b["name"]] = (CacheConfig.uniform(info.n_layer, b["type_k"], b["type_v"]), None, None)
        _log(f"checking on the engine: {len(tests)} caches on {src}", progress)
        res = E.evaluate_many(dst, toks, tests, ctx=min(n_eval, len(toks)), progress=progress)
        pred = {"chosen": chosen.kld, **{b["name"]: b["kld"] for b in near}}
        summary["heldout"] = src
        summary["rows"] = [{"cache": name, "bits_nominal": r["bits_nominal"], "bits_storage": r["bits_storage"],
                            "predicted_kld": pred[name], "engine_kld": r["mean_kld"], "p99_kld": r["p99_kld"],
                            "top1": r["top1"], "ppl": r["ppl"], "ppl_base": r["ppl_base"], "floor_kld": r["floor_kld"],
                            "cache_bytes": r["cache_bytes"], "ctx": r["ctx"],
                            "engine_type_k": r["engine_type_k"], "engine_type_v": r["engine_type_v"]}
                           for name, r in res.items()]
        record_engine_checks(run.files["search"], {
            tests[row["cache"]][0].spec(): {"engine_kld": row["engine_kld"], "floor_kld": row["floor_kld"],
                                            "top1": row["top1"], "ppl": row["ppl"], "heldout": src,
                                            "ctx": row["ctx"], "time": time.time()}
            for row in summary["rows"]})
    return summary


# memory budgets (export --kv-memory / --memory) ----------------------------------------------------------

def memory_budget(info, memory: int, ctx: int, n_seq: int, scope: str, types: Sequence[str], backend: str,
                  probe=None) -> dict:
    """What a memory means for this model at ctx tokens x n_seq sequences: the bytes left for the KV
    cache (scope "kv": all of it; "total": less the weights and the engine's buffers, measured on the
    engine for the cheapest cache), the storage-bit budget a uniform cache of that size has (the
    search refines there), and the smallest memory any per-layer choice of `types` fits in.
    ConfigError naming that smallest memory when nothing fits."""
    from .plan import elements_at, format_size, kv_bytes

    pairs = candidate_pairs(types, backend)
    cheapest = min(pairs, key=lambda p: T.get(p[0]).storage_bits + T.get(p[1]).storage_bits)
    low = CacheConfig.uniform(info.n_layer, cheapest[0], cheapest[1])
    kv_min = kv_bytes(info, low, ctx, n_seq)
    shape = f"{ctx} tokens" + (f" x {n_seq} sequences" if n_seq > 1 else "")
    if scope == "kv":
        rest = 0
        need = kv_min
        what = "KV memory"
    else:
        t = probe.context(ctx, n_seq, config=low)
        rest = t["total_bytes"] - t["kv_bytes"]
        need = t["total_bytes"]
        what = "memory"
    if memory < need:
        name = cheapest[0] if cheapest[0] == cheapest[1] else f"K {cheapest[0]} / V {cheapest[1]}"
        detail = (f"its KV cache {format_size(kv_min, up=True)}" if scope == "kv" else
                  f"weights {format_size(t['weight_bytes'])} + KV cache {format_size(kv_min, up=True)} + "
                  f"compute and output buffers {format_size(t['compute_bytes'] + t['output_bytes'])}, "
                  f"as the engine reports them")
        raise ConfigError(f"{format_size(memory)} of {what} does not fit {shape} of {info.path.name} with any cache of "
                          f"{', '.join(types)}: the smallest, {name} in every layer, needs {format_size(need, up=True)} "
                          f"({need} bytes: {detail}); give at least that, a shorter --ctx or fewer --seqs")
    kv_budget = memory - rest
    bits = 8.0 * kv_budget / elements_at(info, ctx, n_seq)
    return {"kv_budget": kv_budget, "bits": bits, "min_memory": need, "rest": rest, "cheapest": list(cheapest)}


def pick_within_memory(run: TuneRun, memory: int, ctx: int, n_seq: int, scope: str, probe=None):
    """The lowest-KLD configuration the search measured (uniform baselines included) whose KV cache at
    ctx x n_seq, as the engine allocates it, fits `memory` (scope "kv"), or whose whole context does,
    weights and the engine's buffers included (scope "total", each candidate's measured on the engine).
    Returns (Point, its memory figures)."""
    from .plan import kv_bytes
    from .search import Point, SearchError

    info = run.info
    n = info.n_layer
    cands = list(run.result.points) + [
        Point([], [b["type_k"]] * n, [b["type_v"]] * n, b["bits_nominal"], b["bits_storage"], b["kld"], b["kld"])
        for b in run.baselines]
    seen = set()
    scored = []
    for p in cands:
        cfg = CacheConfig(tuple(p.type_k), tuple(p.type_v))
        spec = cfg.spec()
        if spec in seen:
            continue
        seen.add(spec)
        scored.append((p.kld, kv_bytes(info, cfg, ctx, n_seq), p, cfg))
    scored.sort(key=lambda v: (v[0], v[1]))
    for kld, kv, p, cfg in scored:
        if kv > memory:
            continue
        if scope == "kv":
            return p, {"kv_bytes": kv}
        t = probe.context(ctx, n_seq, config=cfg)
        if t["total_bytes"] <= memory:
            return p, {"kv_bytes": t["kv_bytes"], "total_bytes": t["total_bytes"], "weight_bytes": t["weight_bytes"],
                       "compute_bytes": t["compute_bytes"], "output_bytes": t["output_bytes"]}
    raise SearchError(f"no configuration the search measured fits {memory} bytes at {ctx} tokens x {n_seq}")


def export_memory(model: str | os.PathLike, memory: int | str, ctx: int, out: str | os.PathLike | None = None, *,
                  n_seq: int = 1, scope: str = "kv", validate: bool = True, n_eval: int = 1024,
                  progress: bool = True, **tune_kw) -> dict:
    """export --kv-memory / --memory: the storage-bit budget derived from the memory at ctx tokens x
    n_seq sequences, the search refined there (storage bits, cached), and the lowest-KLD configuration
    whose cache (scope "kv") or whole context (scope "total": weights + KV + the engine's compute and
    output buffers, as the engine reports them) fits; the file records the context it was fitted for
    (kvtuner.ctx, kvtuner.n_seq, kvtuner.memory, kvtuner.memory_scope, kvtuner.kv_bytes_at_ctx)."""
    from . import engine
    from .export import default_output
    from .plan import MAX_CELLS, MAX_SEQ, format_size, parse_size

    path = Path(model)
    if scope not in ("kv", "total"):
        raise ConfigError(f"memory scope must be kv or total, got {scope!r}")
    mem = parse_size(memory, "--kv-memory" if scope == "kv" else "--memory")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 1:
        raise ConfigError(f"--ctx must be a positive number of tokens, got {ctx!r}")
    if not 1 <= n_seq <= MAX_SEQ:
        raise ConfigError(f"--seqs must be 1 to {MAX_SEQ} (the engine's limit), got {n_seq}")
    if ctx * n_seq > MAX_CELLS:
        raise ConfigError(f"{ctx} tokens x {n_seq} sequences is more than the engine's {MAX_CELLS} cells")
    if tune_kw.pop("unit", None) not in (None, "storage"):
        raise ConfigError("a memory budget counts bytes, which storage bits measure: --budget-unit nominal does "
                          "not apply to --kv-memory or --memory")
    info = model_info(path)
    if not info.kv_layers:
        raise ConfigError(f"{path.name}: the {info.arch} model has no KV cache layers to tune")
    backend = tune_kw.get("backend", "cpu")
    tlist = candidate_types(info, backend, tune_kw.get("types"))
    lo, hi = feasible_range(info, candidate_pairs(tlist, backend), "storage")
    dst = Path(out) if out is not None else default_output(path)
    read_header(path)
    check_output(path, dst)
    probe = engine.MemoryProbe(path) if scope == "total" else None
    try:
        mb = memory_budget(info, mem, ctx, n_seq, scope, tlist, backend, probe)
        budget = round(min(max(mb["bits"], lo), hi), 6)
        shape = f"{ctx} tokens" + (f" x {n_seq} sequences" if n_seq > 1 else "")
        _log(f"{format_size(mem)} at {shape}: {format_size(mb['kv_budget'])} for the KV cache, "
             f"{mb['bits']:.3f} storage bits per element as a uniform cache; searching there", progress)
        run = tune(path, progress=progress, unit="storage", budgets=[budget], **tune_kw)
        chosen, fit = pick_within_memory(run, mem, ctx, n_seq, scope, probe)
    finally:
        if probe is not None:
            probe.close()
    extra = {"kvtuner.ctx": int(ctx), "kvtuner.n_seq": int(n_seq), "kvtuner.memory": int(mem),
             "kvtuner.memory_scope": "kv cache" if scope == "kv" else "weights + kv cache + engine buffers",
             "kvtuner.kv_bytes_at_ctx": int(fit["kv_bytes"])}
    summary = _export_and_check(run, chosen, dst, budget, "storage", extra, validate, n_eval, progress)
    summary["memory"] = {"memory": mem, "scope": scope, "ctx": ctx, "n_seq": n_seq, "kv_budget": mb["kv_budget"],
                         "bits_budget": mb["bits"], "min_memory": mb["min_memory"], **fit}
    return summary
