"""Context shift (K-shift) against recomputation: shared by the tests and their child processes."""

import llama_cpp
import numpy as np

from kvtuner_edge import engine


def shift_vs_recompute(path, tokens, keep=4, drop=128, n_ctx_before=400, n_cont=100, **open_kw):
    """Drop `drop` cached tokens after the first `keep` and shift the rest back (llama.cpp's
    context shift, which runs the K-shift: dequantise, undo the rotation, re-RoPE, rotate,
    requantise, per layer), continue for n_cont tokens. Returns those logits and the logits of
    recomputing the kept text from scratch."""
    t = list(tokens[: n_ctx_before + n_cont])
    with engine.open_model(path, n_ctx=1024, logits_all=True, **open_kw) as m:
        m.reset()
        m.llm.eval(t[:n_ctx_before])
        mem = llama_cpp.llama_get_memory(m.ctx)
        assert llama_cpp.llama_memory_seq_rm(mem, 0, keep, keep + drop)
        llama_cpp.llama_memory_seq_add(mem, 0, keep + drop, n_ctx_before, -drop)
        kept = t[:keep] + t[keep + drop:n_ctx_before]
        m.llm.n_tokens = len(kept)
        m.llm.input_ids[: len(kept)] = kept
        m.llm.eval(t[n_ctx_before:])
        shifted = np.array(m.llm.scores[len(kept): len(kept) + n_cont], dtype=np.float32)
    with engine.open_model(path, n_ctx=1024, logits_all=True, **open_kw) as m:
        ref = m.logits(kept + t[n_ctx_before:])[len(kept):]
    return shifted, ref
