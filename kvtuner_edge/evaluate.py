"""Engine-side quality: KL divergence of a cache configuration against the f16 cache."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from . import engine as _engine  # noqa: F401  (llama.cpp's libraries before numpy: see engine.py)

import numpy as np  # noqa: E402


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


ROWS = 64   # positions per float64 chunk: a 262k-token vocabulary makes whole windows gigabytes


def kld_per_token(base_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """KL(base || test) of the next-token distributions, one value per position."""
    out = []
    for i in range(0, len(base_logits), ROWS):
        lp = log_softmax(base_logits[i:i + ROWS])
        lq = log_softmax(test_logits[i:i + ROWS])
        out.append(np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0))
    return np.concatenate(out) if out else np.zeros(0)


def nll_per_token(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of tokens[i+1] given positions <= i."""
    nxt = np.asarray(tokens[1:], dtype=np.int64)
    out = []
    for i in range(0, len(nxt), ROWS):
        lp = log_softmax(logits[i:min(i + ROWS, len(nxt))])
        out.append(-lp[np.arange(len(lp)), nxt[i:i + len(lp)]])
    return np.concatenate(out) if out else np.zeros(0)


def shared_text(name: str = "wikitext-2/test.txt") -> Path | None:
    """A file of ../shared/data (public data beside the checkout), or None where it is absent."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        for up in (root, *root.parents):
            p = up / "shared" / "data" / name
            if p.exists():
                return p
    return None


def _resolve_config(info, config, type_k, type_v):
    """(CacheConfig describing the test cache, kwargs for engine.open_model)."""
    from .config import CacheConfig
    from .errors import ConfigError

    if config is not None:
        return config, {"config": config}
    if type_k or type_v:
        cfg = CacheConfig.uniform(info.n_layer, type_k or "f16", type_v or "f16")
        return cfg, {"config": cfg}
    own = info.file_types()     # ConfigError naming the key and layer when the file's types are unusable
    if own is None:
        raise ConfigError(f"{info.path.name} has no kvtuner per-layer types: give --config or --type-k/--type-v")
    cfg = CacheConfig(tuple(own[0]), tuple(own[1]))
    cfg.validate(info)
    return cfg, {}


def evaluate_many(path, tokens: Sequence[int], tests: dict, ctx: int = 2048, n_gpu_layers: int = 0,
                  progress: bool = True) -> dict:
    """Several test caches against the f16 cache on the same tokens, in windows of `ctx` tokens.

    tests: name -> (config, type_k, type_v) as for evaluate(). The f16 reference and the engine's
    floor (KLD of f16 flash attention vs f32 without it) are computed once and shared. Returns
    name -> result dict (see evaluate)."""
    from tqdm import tqdm

    from . import engine
    from .config import CacheConfig
    from .gguf_io import model_info

    info = model_info(path)
    resolved = {name: _resolve_config(info, *spec) for name, spec in tests.items()}
    n_win = len(tokens) // ctx if len(tokens) >= ctx else 1
    win = min(ctx, len(tokens))
    windows = [list(tokens[i * win:(i + 1) * win]) for i in range(n_win)]
    common = dict(n_ctx=win, logits_all=True, n_gpu_layers=n_gpu_layers)
    acc = {name: {"kl": [], "top1": [], "nll": []} for name in tests}
    kl_floor, nll_base, allocated = [], [], {}
    # one context at a time (the f16 logits of every window kept): a context holds n_ctx x n_vocab
    # float32 logits, a gigabyte each for Gemma-3's vocabulary at 1024 tokens
    bar = tqdm(total=len(windows) * (len(resolved) + 2), desc="eval", unit="pass", disable=not progress,
               file=sys.stderr)
    base = []
    with engine.open_model(path, CacheConfig.uniform(info.n_layer, "f16"), **common) as m:
        for w in windows:
            base.append(m.logits(w))
            nll_base.append(nll_per_token(base[-1], w))
            bar.update(1)
    with engine.open_model(path, type_k="f32", type_v="f32", flash_attn=False, use_file_types=False, **common) as m:
        for w, b in zip(windows, base):
            kl_floor.append(kld_per_token(b, m.logits(w)))
            bar.update(1)
    for name, (_, kw) in resolved.items():
        with engine.open_model(path, **kw, **common) as m:
            allocated[name] = (m.layer_types(), m.cache_bytes())
            for w, b in zip(windows, base):
                t = m.logits(w)
                acc[name]["kl"].append(kld_per_token(b, t))
                acc[name]["top1"].append(b.argmax(-1) == t.argmax(-1))
                acc[name]["nll"].append(nll_per_token(t, w))
                bar.update(1)
    bar.close()
    floor = float(np.concatenate(kl_floor).mean())
    ppl_base = float(np.exp(np.concatenate(nll_base).mean()))
    out = {}
    for name, (cfg, _) in resolved.items():
        k = np.concatenate(acc[name]["kl"])
        nom, sto = cfg.bits(info)
        (tk, tv), nbytes = allocated[name]
        out[name] = {
            "model": str(path), "config": cfg.short(), "type_k": list(cfg.type_k), "type_v": list(cfg.type_v),
            "engine_type_k": tk, "engine_type_v": tv, "cache_bytes": nbytes,
            "mean_kld": float(k.mean()), "p99_kld": float(np.quantile(k, 0.99)), "max_kld": float(k.max()),
            "top1": float(np.concatenate(acc[name]["top1"]).mean()),
            "ppl": float(np.exp(np.concatenate(acc[name]["nll"]).mean())), "ppl_base": ppl_base,
            "floor_kld": floor, "bits_nominal": nom, "bits_storage": sto,
            "n_tokens": int(len(k)), "ctx": win, "windows": n_win,
        }
    return out


def evaluate(path, tokens: Sequence[int], config=None, type_k: str | None = None, type_v: str | None = None,
             ctx: int = 2048, n_gpu_layers: int = 0, progress: bool = True) -> dict:
    """KL divergence (mean, p99, max), top-1 agreement and perplexity of one cache against the f16
    cache on the same tokens, in windows of `ctx` tokens, beside the engine's own floor (f16 flash
    attention vs f32 without it). The cache: `config`, else one global type_k/type_v, else the
    file's own per-layer types."""
    return evaluate_many(path, tokens, {"test": (config, type_k, type_v)}, ctx, n_gpu_layers, progress)["test"]


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey(path, config=None, type_k: str | None = None, type_v: str | None = None,
            lengths: Sequence[int] = (256, 512, 1024), depths: Sequence[float] = (0.1, 0.5, 0.9),
            trials: int = 2, seed: int = 0, n_gpu_layers: int = 0, progress: bool = True) -> dict:
    """Hide a 5-digit pass key in filler at several depths and lengths; greedy retrieval accuracy
    with the f16 cache and with the test cache."""
    import random

    from tqdm import tqdm

    from . import engine
    from .config import CacheConfig
    from .gguf_io import model_info

    info = model_info(path)
    cfg, test_kw = _resolve_config(info, config, type_k, type_v)
    rng = random.Random(seed)
    n_ctx = max(lengths) + 128
    res = {"lengths": list(lengths), "depths": list(depths), "trials": trials}
    cases = [(L, d, rng.randint(10000, 99999)) for L in lengths for d in depths for _ in range(trials)]
    for name, kw in (("f16", {"config": CacheConfig.uniform(info.n_layer, "f16")}), ("test", test_kw)):
        hits = []
        with engine.open_model(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, **kw) as m:
            filler_tok = m.tokenize(FILLER, add_bos=False)
            for L, d, key in tqdm(cases, desc=f"passkey {name}", disable=not progress, file=sys.stderr):
                head = m.tokenize("There is a pass key hidden in a lot of irrelevant text. Find it and remember it.\n")
                needle = m.tokenize(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_bos=False)
                question = m.tokenize(" What is the pass key? The pass key is", add_bos=False)
                n_fill = max(0, L - len(head) - len(needle) - len(question))
                fill = (filler_tok * (n_fill // len(filler_tok) + 1))[:n_fill]
                at = int(n_fill * d)
                prompt = head + fill[:at] + needle + fill[at:] + question
                m.reset()
                out = m.llm.detokenize(m.generate(prompt, 8)).decode("utf-8", "replace")
                hits.append(str(key) in out.replace(" ", ""))
        res[f"accuracy_{name}"] = float(np.mean(hits))
    res["accuracy_base"] = res.pop("accuracy_f16")
    res["accuracy"] = res.pop("accuracy_test")
    return res
