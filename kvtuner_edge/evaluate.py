"""Engine-side quality: KL divergence of a cache configuration against the f16 cache."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kld_per_token(base_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(base || test) of the next-token distributions, one value per position."""
    lp = log_softmax(base_logits)
    lq = log_softmax(test_logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


def nll_per_token(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of tokens[i+1] given positions <= i."""
    lp = log_softmax(logits[:-1])
    nxt = np.asarray(tokens[1:], dtype=np.int64)
    return -lp[np.arange(len(nxt)), nxt]


@dataclass
class KLDStats:
    mean_kld: float
    p99_kld: float
    max_kld: float
    top1: float       # share of positions where both caches pick the same next token
    ppl: float
    ppl_base: float
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare(base_logits: np.ndarray, test_logits: np.ndarray, tokens: Sequence[int]) -> KLDStats:
    k = kld_per_token(base_logits, test_logits)
    top1 = float(np.mean(base_logits.argmax(-1) == test_logits.argmax(-1)))
    return KLDStats(
        mean_kld=float(k.mean()), p99_kld=float(np.quantile(k, 0.99)), max_kld=float(k.max()), top1=top1,
        ppl=float(np.exp(nll_per_token(test_logits, tokens).mean())),
        ppl_base=float(np.exp(nll_per_token(base_logits, tokens).mean())),
        n_tokens=len(tokens),
    )


def shared_text(name: str = "wikitext-2/test.txt") -> Path | None:
    """A file of ../shared/data (public data beside the checkout), or None where it is absent."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        for up in (root, *root.parents):
            p = up / "shared" / "data" / name
            if p.exists():
                return p
    return None
