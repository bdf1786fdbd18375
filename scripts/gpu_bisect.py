"""Bisect a crash at GPU model load: run one variant (A..H) in this process."""
import sys

model, variant = sys.argv[1], sys.argv[2]
import llama_cpp  # noqa: E402

if variant == "A":
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
print("ok", variant, flush=True)
