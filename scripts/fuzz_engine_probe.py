#!/usr/bin/env python3
"""Load a GGUF with the patched engine's C API alone (no kvtuner_edge reader in front), create a
context, decode a few tokens and print the per-layer cache types it allocated as JSON.

    python scripts/fuzz_engine_probe.py FILE                    # the file's own types, or KVTUNER_KV_TYPES
    python scripts/fuzz_engine_probe.py FILE --via-python --spec-file S.json   # engine.open_model(spec=...)

This is how llama-cli and llama-server meet a file: model load, then llama_init_from_model (where
the per-layer types are resolved and checked). Exit 0 with JSON when the context works, 1 with a
message on stderr when the engine refuses the file or the types. Used by scripts/fuzz_corpus.py;
it runs under the sanitizer build when PYTHONPATH points at the cpu-asan wheel.
"""
from __future__ import annotations

import argparse
import ast
import ctypes
import json
import sys
from pathlib import Path


def direct(path: str) -> int:
    import llama_cpp._logger
    import llama_cpp.llama_cpp as ll

    llama_cpp._logger.set_verbose(False)    # llama.cpp's errors only, as the tools print them by default
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kvtuner_edge import engine        # its log callback only (safe decoding, the error lines kept)

    engine._bind()
    lib = ll._lib
    lib.llama_kvtuner_last_error.restype = ctypes.c_char_p
    lib.llama_kvtuner_layer_type.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool]
    lib.llama_kvtuner_layer_type.restype = ctypes.c_int32
    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = ll.llama_model_load_from_file(path.encode(), mp)
    if not model:
        why = engine._engine_errors()
        print(f"error: {path}: the engine could not load this model" + (f": {why}" if why else ""), file=sys.stderr)
        return 1
    cp = ll.llama_context_default_params()
    cp.n_ctx = 64
    cp.n_batch = 64
    cp.n_ubatch = 64
    cp.n_threads = cp.n_threads_batch = 1
    cp.no_perf = True
    ctx = ll.llama_init_from_model(model, cp)
    if not ctx:
        err = (lib.llama_kvtuner_last_error() or b"").decode("utf-8", "replace")
        print(f"error: {path}: could not create a context" + (f": {err}" if err else ""), file=sys.stderr)
        ll.llama_model_free(model)
        return 1
    n_layer = ll.llama_model_n_layer(model)
    from kvtuner_edge.types import name_of

    tk = [lib.llama_kvtuner_layer_type(ctx, il, False) for il in range(n_layer)]
    tv = [lib.llama_kvtuner_layer_type(ctx, il, True) for il in range(n_layer)]
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    toks = [t % max(1, n_vocab) for t in (1, 17, 250, 999, 4000, 3, 77, 12)]
    batch = ll.llama_batch_init(len(toks), 0, 1)
    rcs = []
    try:
        for step, chunk in enumerate((toks[:6], toks[6:7], toks[7:8])):
            pos0 = 0 if step == 0 else 6 + step - 1
            for i, t in enumerate(chunk):
                batch.token[i] = t
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i == len(chunk) - 1
            batch.n_tokens = len(chunk)
            rcs.append(int(ll.llama_decode(ctx, batch)))
    finally:
        ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    ll.llama_model_free(model)
    print(json.dumps({"type_k": [name_of(t) if t >= 0 else None for t in tk],
                      "type_v": [name_of(t) if t >= 0 else None for t in tv], "decode": rcs}))
    return 0 if all(rc == 0 for rc in rcs) else 1


def via_python(path: str, spec) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from kvtuner_edge import engine
    from kvtuner_edge.errors import KVTunerError

    try:
        with engine.open_model(path, spec=spec, n_ctx=64, n_threads=1) as m:
            tk, tv = m.layer_types()
            m.llm.eval(m.tokenize("Hello there, river"))
    except KVTunerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"type_k": tk, "type_v": tv}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--via-python", action="store_true", help="engine.open_model(file, spec=...) instead")
    ap.add_argument("--spec-file", type=Path, help='JSON {"hex": UTF-8 (surrogateescape) hex of the spec} or '
                                                     '{"repr": a Python literal of any type}')
    a = ap.parse_args()
    if a.via_python:
        d = json.loads(a.spec_file.read_text())
        spec = bytes.fromhex(d["hex"]).decode("utf-8", "surrogateescape") if "hex" in d else ast.literal_eval(d["repr"])
        return via_python(a.file, spec)
    return direct(a.file)


if __name__ == "__main__":
    sys.exit(main())
