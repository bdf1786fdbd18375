"""Bisect a crash at GPU model load: run one variant (A..N) in this process.

A..H (all passed on an H200): llama_cpp imported first, then our layers one by one. I..K test the
difference left with scripts/gpu_engine_check.py (which crashes): numpy, gguf and our header
reader imported and used *before* llama_cpp loads its libraries. L..N test the other difference:
the check's first context mixes V types per layer (q5_1 / q4_1 alternating, K q8_0 / q4_0).
"""
import sys

model, variant = sys.argv[1], sys.argv[2]
if variant in ("I", "J", "K"):
    import numpy as np

    if variant in ("J", "K"):
        from kvtuner_edge.gguf_io import model_info

        model_info(model)  # imports gguf (numpy, yaml) before llama_cpp
    if variant == "K":
        from kvtuner_edge import engine

        print("gpu", engine.has_gpu())
        np.random.default_rng(0).integers(0, 9, size=8)
        engine.open_model(model, n_gpu_layers=99, n_ctx=1024, logits_all=True)
        print("ok", variant, flush=True)
        sys.exit(0)
import llama_cpp  # noqa: E402

if variant in ("A", "I", "J"):
    llama_cpp.Llama(model, n_gpu_layers=99, n_ctx=512, verbose=False, flash_attn=True)
else:
    from kvtuner_edge import CacheConfig, engine

    lib = engine._bind()
    if variant == "B":
        llama_cpp.Llama(model, n_gpu_layers=99, n_ctx=512, verbose=False, flash_attn=True)
    elif variant == "C":
        print("gpu", engine.has_gpu())
        llama_cpp.Llama(model, n_gpu_layers=99, n_ctx=512, verbose=False, flash_attn=True)
    elif variant == "D":
        lib.llama_kvtuner_set_override(b"k=q8_0;v=q8_0")
        llama_cpp.Llama(model, n_gpu_layers=99, n_ctx=512, verbose=False, flash_attn=True)
    elif variant == "E":
        engine.open_model(model, n_gpu_layers=99, n_ctx=512)
    elif variant == "F":
        engine.open_model(model, CacheConfig.uniform(30, "q8_0", "q4_0"), n_gpu_layers=99, n_ctx=512)
    elif variant == "G":
        engine.open_model(model, n_gpu_layers=99, n_ctx=512, n_threads=4)
    elif variant == "H":
        engine.open_model(model, n_gpu_layers=99, n_ctx=512, logits_all=True, n_threads=4, swa_full=True)
    elif variant in ("L", "M"):   # the engine check's mixed config; M on the CPU
        n = 30
        mixed = CacheConfig(tuple("q8_0" if (il < 3 or il >= n - 3) else "q4_0" for il in range(n)),
                            tuple("q5_1" if il % 2 else "q4_1" for il in range(n)))
        m = engine.open_model(model, mixed, n_gpu_layers=99 if variant == "L" else 0, n_ctx=1024, logits_all=True)
        print("opened", flush=True)
        m.logits([1] + list(range(300, 811)))
    elif variant == "N":          # one V type that is not q4_0/q8_0, uniform
        m = engine.open_model(model, CacheConfig.uniform(30, "q8_0", "q5_1"), n_gpu_layers=99, n_ctx=1024,
                              logits_all=True)
        print("opened", flush=True)
        m.logits([1] + list(range(300, 811)))
print("ok", variant, flush=True)
