"""Hostile inputs (issue 15): a fixed-seed sample of scripts/fuzz_corpus.py's corpus through the
real commands and the patched engine, each run in its own process; and the failures the full
corpus found, one test each, on the real engine and models."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtuner_edge import engine
from kvtuner_edge.errors import ConfigError, ModelFileError
from kvtuner_edge.gguf_io import model_info, read_header

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_corpus as F  # noqa: E402

SAMPLE = 16            # random cases (+4 fixed ones); about a minute on 2 cores
SAMPLE_SEED = 1515


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, smollm2):
    work = tmp_path_factory.mktemp("fuzz")
    bases = F.make_bases(work, ["tiny", "head48", "smol"])
    cases, layouts = F.corpus(bases)
    return work, bases, cases, layouts


def _tools():
    """The patched llama-cli/llama-server when `make tools` has built them for this checkout, else None."""
    native = str(ROOT / "native")
    sys.path.insert(0, native)
    try:
        import build
    finally:
        sys.path.remove(native)
    _, _, key = build.build_key(None, build.cmake_args("cpu", "90") + [
        "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TESTS=OFF", "-DCMAKE_BUILD_TYPE=Release"])
    d = build.cache_root() / "bin" / f"cpu-{key}"
    return d if all((d / t).exists() for t in ("llama-cli", "llama-server")) else None


def test_corpus_is_seeded_and_covers_every_kind(corpus):
    work, bases, cases, layouts = corpus
    again, _ = F.corpus(bases)
    dump = lambda cs: json.dumps([(c.id, c.recipe) for c in cs], default=F._jsonable)   # NaN == NaN here
    assert dump(cases) == dump(again)
    kinds = {c.kind for c in cases}
    assert {"truncate", "header", "flip-meta", "flip-tinfo", "flip-ours", "field", "kvtuner", "config", "env",
            "spec"} <= kinds
    assert len(cases) >= 300


@pytest.fixture(scope="module")
def sample(corpus):
    import random

    work, bases, cases, layouts = corpus
    pool = [c for c in cases if c.base in ("tiny", "head48") or c.kind in ("control", "kvtuner")]
    picked = sorted(random.Random(SAMPLE_SEED).sample(pool, SAMPLE), key=lambda c: c.id)
    return picked + [c for c in cases if c.id in ("control/smol/unmodified", "kvtuner/smol/only-k",
                                                   "env/tiny/count-2p31", "kvtuner/tiny/vtype-i64")]


def _run_sample(corpus, sample, targets, tools=None):
    work, bases, cases, layouts = corpus
    runner = F.Runner(work, tools, None)
    t0 = time.time()
    runs = []
    for c in sample:
        runs += runner.run_case(c, bases, layouts, targets)
    s = F.summarize(runs, sample)
    bad = [(f["case"], f["target"], f["outcome"], f["detail"].get("tail", "")[-400:]) for f in s["failures"]]
    assert not bad, bad
    assert not s["unexpected"], [(u["case"], u["target"], u["outcome"], u["message"]) for u in s["unexpected"]]
    for r in runs:
        if r.outcome == "rejected":
            assert r.message, (r.case, r.target)
    assert s["total"]["rejected"] > 0 and s["total"]["accepted"] > 0
    per = {}
    for r in runs:
        per[r.target] = per.get(r.target, 0) + r.seconds
    print(f"fuzz sample: {len(sample)} cases, {len(runs)} runs in {time.time() - t0:.0f} s "
          f"({', '.join(f'{t} {v:.0f} s' for t, v in per.items())})")
    return s


def test_corpus_sample_no_crash_no_traceback_no_hang(corpus, sample):
    """A seeded sample through inspect, export --config, eval, the C API probe and Python specs:
    every run is a refusal with a message or a success, fast, the input is never modified, the
    known outcomes hold, and our reader and the engine agree on the per-layer types."""
    s = _run_sample(corpus, sample, ["inspect", "export", "eval", "engine", "pyspec"])
    assert not s["disagreements"], s["disagreements"]


def test_corpus_sample_through_llama_cli_and_server(corpus, sample):
    """The same sample through the patched llama-cli and llama-server, which meet a file with nothing
    of ours in front."""
    tools = _tools()
    if tools is None:
        pytest.skip("the patched llama-cli/llama-server of this checkout are not built (`make tools`)")
    _run_sample(corpus, sample, ["cli", "server"], tools)


# the failures the full corpus found, one each ------------------------------------------------------------

def _rewrite(corpus, base: str, recipe: dict, tmp_path) -> Path:
    work, bases, cases, layouts = corpus
    out = tmp_path / "case.gguf"
    F.rebuild_kv(layouts[base], recipe, out)
    return out


def test_corrupt_lengths_are_refused_with_the_key_named(corpus, tmp_path):
    """A string or array length sent the reader past the end of the file: OSError from a seek,
    ValueError from an offset. Every length is now checked against the bytes left first."""
    work, bases, cases, layouts = corpus
    L = layouts["tiny"]
    src = bases["tiny"].read_bytes()
    tok = next(k for k in L.kvs if k.key == "tokenizer.ggml.tokens")
    for off, value, words in ((tok.value_off + 4, 2**60, "claims 1152921504606846976 elements"),
                              (L.kv("general.architecture").value_off, 2**61, "the value of 'general.architecture'"),
                              (L.kv("kvtuner.type_k").start, 2**62, "key")):
        p = tmp_path / "x.gguf"
        p.write_bytes(src[:off] + struct.pack("<Q", value) + src[off + 8:])
        t0 = time.time()
        with pytest.raises(ModelFileError, match="corrupt GGUF header") as e:
            read_header(p)
        assert words in str(e.value) and time.time() - t0 < 1.0


def test_type_k_without_type_v_is_f16_v_for_reader_and_engine(corpus, tmp_path):
    """A file with kvtuner.type_k but no kvtuner.type_v gave a TypeError; the engine gives V f16,
    and now so does our reader (inspect, eval)."""
    from kvtuner_edge.inspect import inspect

    p = _rewrite(corpus, "smol", {"op": "rewrite_kv", "drop": ["kvtuner.type_v"]}, tmp_path)
    r = inspect(p)
    assert r["type_v"] == ["f16"] * 30 and r["missing"] == ["kvtuner.type_v"]
    with engine.open_model(p, n_ctx=64) as m:
        tk, tv = m.layer_types()
    assert tk == r["type_k"] and tv == ["f16"] * 30


def test_engine_refuses_huge_repeat_counts_at_once(smollm2):
    """KVTUNER_KV_TYPES/override counts: 2^31 built a 2^31-entry list for 98 s, a larger one ended in
    'vector::_M_fill_insert'. Counts are bounded by the layers left before anything is allocated."""
    for spec in ("k=q8_0*2147483648;v=q4_0", "k=q8_0*99999999999999999999", "k=q8_0*9223372036854775807",
                 "k=q8_0*4611686018427387904,q4_0*4611686018427387904"):
        t0 = time.time()
        with pytest.raises(ConfigError) as e:
            engine.open_model(smollm2, spec=spec, n_ctx=64)
        msg = str(e.value)
        assert time.time() - t0 < 5, spec
        assert "more than 30 K cache types given" in msg or "bad repeat count" in msg, msg
        assert "vector" not in msg and "std::" not in msg


def test_engine_refuses_ggml_types_a_cache_cannot_hold(smollm2):
    """V i64 passed the backend probes and the first decode segfaulted (llama-cli, llama-server);
    only the KV cache types are taken now, with a message naming the layer."""
    for spec, words in (("v=i64", "layer 0: V cache type i64 is not a KV cache type"),
                        ("k=q6_K", "layer 0: K cache type q6_K is not a KV cache type"),
                        ("k=f16*29,tq1_0", "layer 29: K cache type tq1_0 is not a KV cache type")):
        with pytest.raises(ConfigError, match=words):
            engine.open_model(smollm2, spec=spec, n_ctx=64)


def _probe(path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """The C API alone (how llama-cli/llama-server meet a file), in its own process."""
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_engine_probe.py"), str(path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name,recipe,engine_words", [
    ("scalar", {"set": [["kvtuner.type_k", F.STR, "q8_0"]]}, "kvtuner.type_k is a string, not an array"),
    ("one-entry", {"set": [["kvtuner.type_k", "strarr", ["q8_0"]]]}, "kvtuner.type_k has 1 entries for 30 layers"),
    ("rle-name", {"set": [["kvtuner.type_k", "strarr", ["q8_0*30"] + ["q4_0"] * 29]]},
     "kvtuner.type_k: layer 0: 'q8_0*30' is not a KV cache type"),
    ("comma-name", {"set": [["kvtuner.type_v", "strarr", ["q4_0,q4_0"] + ["q4_0"] * 28]]},
     "kvtuner.type_v: layer 0: 'q4_0,q4_0' is not a KV cache type"),
    ("ints", {"set": [["kvtuner.type_k", "arr", (F.I32, [8] * 30)]]}, "kvtuner.type_k is an array of int32"),
])
def test_engine_reads_the_file_keys_as_strictly_as_our_reader(corpus, tmp_path, name, recipe, engine_words):
    """The engine took a scalar string, a single entry for every layer, and names holding ',' or '*'
    (which inspect refused): the loader now keeps only an array of plain names, one per layer."""
    p = _rewrite(corpus, "smol", {"op": "rewrite_kv", **recipe}, tmp_path)
    with pytest.raises(ConfigError):
        model_info(p).file_types()
    r = _probe(p)
    assert r.returncode == 1 and engine_words in r.stderr, r.stderr[-2000:]
    # an explicit global type still runs such a file, as stock llama.cpp does
    with engine.open_model(p, type_k="q8_0", type_v="q8_0", n_ctx=64) as m:
        assert m.layer_types()[0] == ["q8_0"] * 30


def test_duplicate_vocabulary_token_is_a_load_error_not_an_abort(corpus, tmp_path):
    """One bit flip made two tokens equal and llama.cpp's vocabulary loader aborted (GGML_ASSERT) in
    eval, llama-cli and llama-server; it refuses the file with a message now (patch 0017)."""
    work, bases, cases, layouts = corpus
    L = layouts["tiny"]
    data = bytearray(bases["tiny"].read_bytes())
    tok = L.kv("tokenizer.ggml.tokens")
    i = data.index("\u2581t758".encode(), tok.value_off)
    data[i:i + len("\u2581t758".encode())] = "\u2581t558".encode()
    p = tmp_path / "dup.gguf"
    p.write_bytes(bytes(data))
    r = _probe(p)
    assert r.returncode == 1 and "duplicate" in r.stderr and "GGML_ASSERT" not in r.stderr, r.stderr[-2000:]
    with pytest.raises(ModelFileError, match="duplicate"):
        engine.open_model(p, n_ctx=64)


@pytest.mark.parametrize("where,value", [("kv", 99), ("kv", -1), ("array", 1 << 30), ("tensor", 99), ("tensor", -5)])
def test_out_of_range_type_fields_are_refused_before_they_become_enums(corpus, tmp_path, where, value):
    """The sanitizer build found upstream's GGUF reader converting a key's, an array's or a tensor's
    type from the file to its enum before checking it (UBSan invalid-enum-load; the file was refused
    afterwards). Patch 0020 checks the int32 first: the C loader refuses with the value and the key or
    tensor named, and our reader refuses the same files."""
    work, bases, cases, layouts = corpus
    L = layouts["tiny"]
    data = bytearray(bases["tiny"].read_bytes())
    if where == "kv":
        k = L.kv("general.architecture")
        struct.pack_into("<i", data, k.type_off, value)
        words, name = "invalid GGUF type", "general.architecture"
    elif where == "array":
        k = L.kv("tokenizer.ggml.tokens")
        struct.pack_into("<i", data, k.value_off, value)   # the element type of the array
        words, name = "invalid GGUF type", "tokenizer.ggml.tokens"
    else:
        t = L.tinfos[0]
        struct.pack_into("<i", data, t.type_off, value)
        words, name = "invalid ggml type", t.name
    p = tmp_path / "bad-type.gguf"
    p.write_bytes(bytes(data))
    r = _probe(p)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"{words} {value}," in r.stderr and f"'{name}'" in r.stderr, r.stderr[-2000:]
    with pytest.raises(ModelFileError):
        read_header(p)
