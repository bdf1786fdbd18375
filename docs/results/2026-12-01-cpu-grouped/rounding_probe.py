"""Perturbation probe: does a one-rounding change of every layer's input norm (each attn_norm weight
moved by one ulp, random direction, seed 0) move SmolLM2's logits as far as a kernel that only rounds
differently does (the chunked softmax: KLD 3.3e-3 against the per-position loop with a q8_0 cache)?
256 tokens, ubatches of 32, the engine this runs on.   python rounding_probe.py OUT.json"""
import sys, json, shutil, tempfile, numpy as np
import gguf
from kvtuner_edge.models import fetch
from kvtuner_edge.demo import eval_tokens
from kvtuner_edge import engine
from kvtuner_edge.evaluate import kld_per_token

src = fetch("smollm2-135m", progress=lambda m: None)
toks = list(eval_tokens(src, 512)[0][:256])
dst = tempfile.mkdtemp() + "/perturbed.gguf"
shutil.copy(src, dst)
r = gguf.GGUFReader(dst, "r+")
rng = np.random.default_rng(0)
n = 0
for t in r.tensors:
    if t.name.endswith("attn_norm.weight"):
        a = t.data  # memmap float32
        assert a.dtype == np.float32, a.dtype
        sign = rng.choice([-1.0, 1.0], size=a.shape).astype(np.float32)
        a[:] = np.nextafter(a, a + sign * np.abs(a) )
        n += 1
r.data.flush()
print("perturbed", n, "norms by one ulp")
res = {}
for tk, tv in [("q8_0", "q8_0"), ("q8_0", "q4_0"), ("f16", "f16")]:
    out = {}
    for name, path in (("orig", src), ("pert", dst)):
        with engine.open_model(path, type_k=tk, type_v=tv, n_ctx=512, logits_all=True, use_file_types=False,
                               n_batch=32, n_ubatch=32) as m:
            out[name] = m.logits(toks)
    with engine.open_model(src, n_ctx=512, logits_all=True, use_file_types=False, n_batch=32, n_ubatch=32) as m:
        ref = m.logits(toks)
    res[f"{tk}/{tv}"] = dict(
        kld_orig_vs_pert=float(kld_per_token(out["orig"], out["pert"]).mean()),
        kld_f16_vs_orig=float(kld_per_token(ref, out["orig"]).mean()),
        kld_f16_vs_pert=float(kld_per_token(ref, out["pert"]).mean()),
        max_logit_diff=float(np.abs(out["orig"] - out["pert"]).max()))
    print(tk, tv, res[f"{tk}/{tv}"], flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
