"""One model load + decode on the GPU engine with llama.cpp's own log on stderr (diagnostics)."""
import os
import sys

import llama_cpp

model, ngl = sys.argv[1], int(sys.argv[2])
mmap = os.environ.get("DIAG_MMAP", "1") == "1"
llm = llama_cpp.Llama(model, n_gpu_layers=ngl, n_ctx=512, verbose=True, use_mmap=mmap, flash_attn=True)
print("loaded", flush=True)
llm.eval([1, 300, 400, 500])
print("decoded ok, logits[0:3] =", list(llm.scores[3][:3]), flush=True)
