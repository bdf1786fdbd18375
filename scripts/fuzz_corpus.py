#!/usr/bin/env python3
"""Hostile inputs for kvtuner-edge and the patched llama.cpp loader: a seeded corpus and its runner.

    python scripts/fuzz_corpus.py --list                      # the cases (id, kind, what)
    python scripts/fuzz_corpus.py --out docs/results/x/       # run them all, write results.json + summary.md
    python scripts/fuzz_corpus.py --sample 40 --targets inspect,export,engine
    python scripts/fuzz_corpus.py --asan --targets engine,cli,server   # the sanitizer build (ASan + UBSan)

The corpus is a pure function of --seed and the base files (below), so a case id names the same
bytes on every machine. Bases, written into the work folder (never committed):
  tiny    random-weight llama GGUF (4 layers, head 64; kvtuner_edge.random_model) with a per-layer mix
  head48  the same with 48-wide heads (block-32 types cannot divide them), K f16 / V bf16 mix
  smol    SmolLM2-135M (the real model, 30 layers) with the README's mix
  gemma   Gemma-3-270M (18 layers, head 256, sliding-window layers) with a mix
Case kinds: truncation at every section boundary; header counts and versions; random bit flips in
the metadata, the tensor infos and our own keys; corrupted fields (string/array lengths, value
types, alignment, tensor dims/types/offsets, duplicate keys/tensors, shape keys); rewritten
kvtuner.* arrays (length, element type, huge claimed lengths, empty, long or non-UTF-8 names, names
with separators, type names the cache cannot hold or the backend cannot run, one key without the
other); config JSON; KVTUNER_KV_TYPES values; Python override specs (engine.open_model(spec=...)).

Every case runs, each in its own process with a timeout, through the targets that read it:
  inspect  `kvtuner-edge inspect FILE --json`
  export   `kvtuner-edge export FILE --config CFG -o OUT` (and the output checked when accepted)
  eval     `kvtuner-edge eval FILE --text T` (the engine with the file's own types, behind our reader)
  engine   scripts/fuzz_engine_probe.py: the patched C++ loader and context creation through the C API,
           nothing of ours in front (the way llama-cli and llama-server meet a file), then a few decodes
  cli      the patched llama-cli (`-p ... -n 2 -st`)
  server   the patched llama-server: start, /health, one completion, stop
  pyspec   engine.open_model(path, spec=VALUE) (Python override specs)
and each run is classified: rejected (exit 1/2 with a message), accepted, crash (signal, abort),
traceback (a Python traceback anywhere in the output), internals (C++ library internals in a
message), sanitizer (an ASan/UBSan report), hang (past the timeout), modified (the input's sha256
changed), leftover (a rejected export left a file behind), bad-output (an accepted export whose
output does not read back with the config), unclear (non-zero exit without a message).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEED = 20261201
# gguf value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
          I64: "<q", F64: "<d"}

EVAL_TEXT = ("The river ran along the old stone wall of the town, and in the mornings the market filled the "
             "square with voices, carts and the smell of bread. Travellers stopped at the inn by the bridge, "
             "where the keeper kept a ledger of every guest who had crossed the water in the last forty years. ") * 4

# ggml type names beyond the cache catalogue (k-quants, i-quants, integer and float types, removed
# slots): the engine must refuse each with a message or run it, never crash
ODD_TYPES = ["q4_K", "q6_K", "q8_K", "q2_K", "q8_1", "iq2_xxs", "iq4_xs", "iq1_s", "tq1_0", "tq2_0", "mxfp4",
             "nvfp4", "q1_0", "i8", "i16", "i32", "i64", "f64", "DEPRECATED",
             "TYPE_Q4_0_4_4 REMOVED, use Q4_0 with runtime repacking"]
CACHE_TYPES = ["f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "q3_kv", "q2_kv"]


# --- reading a valid base file's layout -------------------------------------------------------------

@dataclass
class KV:
    key: str
    start: int        # the key's length field
    type_off: int     # its value type field
    value_off: int    # its value
    end: int
    vtype: int
    etype: int = -1   # arrays: element type
    count: int = -1   # arrays: element count (at value_off + 4)


@dataclass
class TI:
    name: str
    start: int
    ndim_off: int
    dims_off: int
    type_off: int
    offset_off: int
    end: int
    ndim: int


@dataclass
class Layout:
    path: Path
    size: int
    version: int
    n_tensors: int
    n_kv: int
    kvs: list[KV]
    tinfos: list[TI]
    kv_end: int
    tinfo_end: int
    data_offset: int
    alignment: int

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)


def read_layout(path: Path) -> Layout:
    """Offsets of every field of a *valid* GGUF header (the bases; the corpus breaks copies of them)."""
    from kvtuner_edge.gguf_io import read_header

    h = read_header(path)
    with open(path, "rb") as f:
        b = f.read(h.data_offset)
    pos = 24
    version, n_t, n_kv = struct.unpack_from("<IQQ", b, 4)

    def u32():
        nonlocal pos
        pos += 4
        return struct.unpack_from("<I", b, pos - 4)[0]

    def u64():
        nonlocal pos
        pos += 8
        return struct.unpack_from("<Q", b, pos - 8)[0]

    def s():
        nonlocal pos
        n = u64()
        pos += n
        return b[pos - n:pos].decode("utf-8", "replace")

    def skip(t):
        nonlocal pos
        if t == STR:
            s()
        elif t in SCALAR:
            pos += struct.calcsize(SCALAR[t])
        elif t == ARR:
            et, n = u32(), u64()
            for _ in range(n):
                skip(et)
        else:
            raise ValueError(t)

    kvs = []
    for _ in range(n_kv):
        start = pos
        key = s()
        toff = pos
        t = u32()
        voff = pos
        et = cnt = -1
        if t == ARR:
            et, cnt = struct.unpack_from("<IQ", b, pos)
        skip(t)
        kvs.append(KV(key, start, toff, voff, pos, t, et, cnt))
    kv_end = pos
    tis = []
    for _ in range(n_t):
        start = pos
        name = s()
        nd_off = pos
        nd = u32()
        d_off = pos
        pos += 8 * nd
        t_off = pos
        pos += 4
        o_off = pos
        pos += 8
        tis.append(TI(name, start, nd_off, d_off, t_off, o_off, pos, nd))
    return Layout(Path(path), path.stat().st_size, version, n_t, n_kv, kvs, tis, kv_end, pos, h.data_offset,
                  h.alignment)


# --- encoding raw metadata records (valid or not) ---------------------------------------------------

def enc_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def rec(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return enc_str(key) + struct.pack("<I", vtype) + payload


def rec_str_array(key: str, items: list, count: int | None = None) -> bytes:
    body = b"".join(enc_str(x) for x in items)
    return rec(key, ARR, struct.pack("<IQ", STR, len(items) if count is None else count) + body)


def rec_scalar_array(key: str, etype: int, items: list, count: int | None = None) -> bytes:
    fmt = SCALAR[etype]
    body = b"".join(struct.pack(fmt, x) for x in items)
    return rec(key, ARR, struct.pack("<IQ", etype, len(items) if count is None else count) + body)


# --- cases ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    kind: str          # truncate, header, flip-meta, flip-tinfo, flip-ours, field, kvtuner, config, env, spec, control
    base: str          # tiny, head48, smol, gemma
    what: str
    recipe: dict
    targets: list[str]
    expect: str | None = None   # "accept" / "reject" where the outcome is known in advance

    @property
    def input_kind(self) -> str:
        return {"config": "config", "env": "env", "spec": "spec"}.get(self.kind, "gguf")


GGUF_TARGETS = ["inspect", "export", "eval", "engine", "cli", "server"]
CONFIG_TARGETS = ["export", "eval"]
ENV_TARGETS = ["eval", "engine", "cli", "server"]
SPEC_TARGETS = ["pyspec"]

BASE_LAYERS = {"tiny": 4, "head48": 4, "smol": 30, "gemma": 18}


def base_config(base: str) -> dict:
    """The per-layer mix each base carries (and the --config of the export target)."""
    n = BASE_LAYERS[base]
    if base == "head48":
        return {"type_k": ["f16", "bf16"] * (n // 2), "type_v": ["bf16"] * n}
    if base == "smol":
        tk = ["q8_0" if (i < 3 or i >= n - 3) else "q4_0" for i in range(n)]
        return {"type_k": tk, "type_v": ["q4_0"] * n}
    if base == "gemma":
        return {"type_k": ["q8_0" if i % 3 == 0 else "q4_0" for i in range(n)], "type_v": ["q5_0"] * n}
    return {"type_k": ["q8_0", "q4_0", "q3_kv", "q8_0"], "type_v": ["q4_1", "q4_0", "q2_kv", "iq4_nl"]}


class Gen:
    def __init__(self, layouts: dict[str, Layout], seed: int = SEED):
        self.L = layouts
        self.seed = seed
        self.cases: list[Case] = []

    def rng(self, cid: str) -> random.Random:
        return random.Random(f"{self.seed}:{cid}")

    def add(self, kind, base, name, what, recipe, targets=None, expect=None):
        cid = f"{kind}/{base}/{name}"
        if base not in self.L and kind not in ("config", "env", "spec"):
            return
        assert all(c.id != cid for c in self.cases), cid
        if targets is None:
            targets = {"config": CONFIG_TARGETS, "env": ENV_TARGETS, "spec": SPEC_TARGETS}.get(kind, GGUF_TARGETS)
        self.cases.append(Case(cid, kind, base, what, recipe, list(targets), expect))

    # every case family -------------------------------------------------------------------------

    def build(self) -> list[Case]:
        for b in self.L:
            self.add("control", b, "unmodified", "the base file itself", {"op": "copy"}, expect="accept")
        self.truncations()
        self.header_counts()
        self.flips()
        self.fields()
        self.kvtuner_arrays()
        self.configs()
        self.envs()
        self.specs()
        return self.capped()

    # the tiny base takes every case of a family; the larger bases (slower to run: SmolLM2 7 s, Gemma-3
    # 17 s a case through all targets) a seeded sample of each family, preferring the ids that match
    CAPS = {("truncate", "head48"): (10, ""), ("truncate", "smol"): (30, "kvtuner"),
            ("truncate", "gemma"): (16, "kvtuner"), ("field", "smol"): (45, ""), ("field", "gemma"): (24, ""),
            ("kvtuner", "smol"): (45, "name-"), ("kvtuner", "gemma"): (34, "/type-"),
            ("kvtuner", "head48"): (20, "type-"), ("env", "smol"): (16, "count"), ("config", "smol"): (12, "")}

    def capped(self) -> list[Case]:
        out = []
        groups: dict[tuple[str, str], list[Case]] = {}
        for c in self.cases:
            groups.setdefault((c.kind, c.base), []).append(c)
        for key, cs in groups.items():
            if key in self.CAPS and len(cs) > self.CAPS[key][0]:
                n, prefer = self.CAPS[key]
                r = self.rng("cap/" + "/".join(key))
                first = [c for c in cs if prefer and prefer in c.id]
                rest = [c for c in cs if c not in first]
                r.shuffle(first)
                r.shuffle(rest)
                keep = {c.id for c in (first + rest)[:n]}
                cs = [c for c in cs if c.id in keep]
            out += cs
        return out

    def truncations(self):
        for b, L in self.L.items():
            cuts = {"magic": 2, "after-magic": 4, "version": 6, "after-version": 8, "n_tensors": 12,
                    "after-n_tensors": 16, "n_kv": 20, "after-header": 24}
            kvs = L.kvs if b in ("tiny", "head48") else L.kvs[:: max(1, len(L.kvs) // 12)] + \
                [k for k in L.kvs if k.key.startswith("kvtuner.type")]
            for k in kvs:
                cuts[f"kv-{k.key}"] = k.start
            for key in ("kvtuner.type_k", "kvtuner.type_v"):
                k = L.kv(key)
                cuts[f"{key}-in-keylen"] = k.start + 3
                cuts[f"{key}-in-key"] = k.start + 8 + 4
                cuts[f"{key}-in-type"] = k.type_off + 2
                cuts[f"{key}-in-count"] = k.value_off + 4 + 3
                cuts[f"{key}-first-elem"] = k.value_off + 12 + 4
                cuts[f"{key}-mid"] = (k.value_off + k.end) // 2
                cuts[f"{key}-last-byte"] = k.end - 1
            cuts["kv-end"] = L.kv_end
            tis = L.tinfos if b == "tiny" else L.tinfos[:: max(1, len(L.tinfos) // 6)]
            for t in tis:
                cuts[f"tinfo-{t.name}"] = t.start
            t = L.tinfos[len(L.tinfos) // 2]
            cuts["tinfo-in-ndim"] = t.ndim_off + 1
            cuts["tinfo-in-dims"] = t.dims_off + 5
            cuts["tinfo-in-type"] = t.type_off + 1
            cuts["tinfo-in-offset"] = t.offset_off + 4
            cuts["tinfo-end"] = L.tinfo_end
            if L.data_offset > L.tinfo_end:
                cuts["in-padding"] = L.tinfo_end + (L.data_offset - L.tinfo_end) // 2
            cuts["data-offset"] = L.data_offset
            cuts["data-1k"] = L.data_offset + 1024
            cuts["data-half"] = (L.data_offset + L.size) // 2
            cuts["size-minus-1"] = L.size - 1
            for name, at in cuts.items():
                self.add("truncate", b, name, f"file cut at byte {at} ({name})", {"op": "truncate", "at": at},
                         expect="reject")
            self.add("truncate", b, "empty", "an empty file", {"op": "truncate", "at": 0}, expect="reject")

    def header_counts(self):
        for b, L in self.L.items():
            if b not in ("tiny", "smol"):
                continue
            V = lambda v: {"op": "patch", "writes": [[4, struct.pack("<I", v).hex()]]}
            for v in (0, 1, 4, 0x7FFFFFFF, 0xFFFFFFFF, 0x03000000):
                self.add("header", b, f"version-{v:#x}", f"GGUF version {v}", V(v), expect="reject")
            for name, v in (("zero", 0), ("minus1", L.n_tensors - 1), ("plus1", L.n_tensors + 1),
                            ("2p32", 2**32), ("2p63", 2**63), ("max", 2**64 - 1)):
                self.add("header", b, f"n_tensors-{name}", f"tensor count {v} (file has {L.n_tensors})",
                         {"op": "patch", "writes": [[8, struct.pack("<Q", v).hex()]]})
            for name, v in (("zero", 0), ("minus1", L.n_kv - 1), ("plus1", L.n_kv + 1), ("2p40", 2**40),
                            ("max", 2**64 - 1)):
                self.add("header", b, f"n_kv-{name}", f"key count {v} (file has {L.n_kv})",
                         {"op": "patch", "writes": [[16, struct.pack("<Q", v).hex()]]})
            self.add("header", b, "magic-lower", "magic 'gguf'", {"op": "patch", "writes": [[0, b"gguf".hex()]]},
                     expect="reject")
            self.add("header", b, "magic-ggml", "magic of an old GGML file",
                     {"op": "patch", "writes": [[0, b"ggjt".hex()]]}, expect="reject")

    def flips(self):
        plan = {"tiny": (30, 12, 24), "head48": (4, 2, 4), "smol": (12, 6, 10), "gemma": (6, 3, 6)}
        for b, L in self.L.items():
            n_meta, n_ti, n_ours = plan[b]
            ours = [L.kv("kvtuner.type_k"), L.kv("kvtuner.type_v")]
            regions = {
                "meta": [(24, L.kv_end)],
                "tinfo": [(L.kv_end, L.tinfo_end)],
                "ours": [(k.start, k.end) for k in ours],
            }
            for kind, n in (("meta", n_meta), ("tinfo", n_ti), ("ours", n_ours)):
                for i in range(n):
                    cid = f"{kind}-{i:02d}"
                    r = self.rng(f"flip/{b}/{cid}")
                    k = r.choice([1, 1, 2, 3, 8, 32])
                    bits = []
                    for _ in range(k):
                        lo, hi = r.choice(regions[kind])
                        bits.append(r.randrange(lo * 8, hi * 8))
                    self.add(f"flip-{kind}", b, f"{i:02d}", f"{k} random bit flip(s) in the {kind} section",
                             {"op": "flip", "bits": sorted(bits)})

    def fields(self):
        for b, L in self.L.items():
            if b not in ("tiny", "smol", "gemma"):
                continue
            P = lambda off, fmt, v: {"op": "patch", "writes": [[off, struct.pack(fmt, v).hex()]]}
            r = self.rng(f"field/{b}")
            # string lengths of keys: huge, one too many, zero
            for k in r.sample(L.kvs, 3) + [L.kv("kvtuner.type_k"), L.kv("general.architecture")]:
                for name, v in (("huge", 2**62), ("2p32", 2**32 + 3), ("plus1", len(k.key.encode()) + 1),
                                ("zero", 0), ("max", 2**64 - 1)):
                    self.add("field", b, f"keylen-{name}-{k.key}", f"key length of {k.key} set to {v}",
                             P(k.start, "<Q", v), expect="reject" if name in ("huge", "max", "2p32") else None)
            # array lengths: the vocabulary, our arrays
            for k in [k for k in L.kvs if k.vtype == ARR][:3] + [L.kv("kvtuner.type_k"), L.kv("kvtuner.type_v")]:
                for name, v in (("huge", 2**60), ("2p31", 2**31), ("plus1", k.count + 1), ("minus1", k.count - 1),
                                ("zero", 0), ("max", 2**64 - 1)):
                    self.add("field", b, f"arrlen-{name}-{k.key}", f"element count of {k.key} set to {v}",
                             P(k.value_off + 4, "<Q", v))
                self.add("field", b, f"arrtype-99-{k.key}", f"element type of {k.key} set to 99",
                         P(k.value_off, "<I", 99), expect="reject")
                self.add("field", b, f"arrtype-nested-{k.key}", f"element type of {k.key} set to array",
                         P(k.value_off, "<I", ARR))
            # a string value's length
            sk = next(k for k in L.kvs if k.vtype == STR and k.key == "general.architecture")
            for name, v in (("huge", 2**61), ("plus1000", 1000)):
                self.add("field", b, f"strlen-{name}-{sk.key}", f"value length of {sk.key} set to {v}",
                         P(sk.value_off, "<Q", v))
            # value type codes
            for k in r.sample(L.kvs, 2) + [L.kv("kvtuner.type_k")]:
                for v in (13, 255, 2**32 - 1):
                    self.add("field", b, f"vtype-{v}-{k.key}", f"value type of {k.key} set to {v}",
                             P(k.type_off, "<I", v))
            # tensor infos
            tis = [L.tinfos[0], L.tinfos[len(L.tinfos) // 2], L.tinfos[-1]]
            for t in tis:
                self.add("field", b, f"ndim-0-{t.name}", f"{t.name}: 0 dimensions", P(t.ndim_off, "<I", 0))
                self.add("field", b, f"ndim-5-{t.name}", f"{t.name}: 5 dimensions", P(t.ndim_off, "<I", 5),
                         expect="reject")
                self.add("field", b, f"ndim-max-{t.name}", f"{t.name}: 2^32-1 dimensions",
                         P(t.ndim_off, "<I", 2**32 - 1), expect="reject")
                self.add("field", b, f"dim0-huge-{t.name}", f"{t.name}: first dimension 2^62",
                         P(t.dims_off, "<Q", 2**62), expect="reject")
                self.add("field", b, f"dim0-zero-{t.name}", f"{t.name}: first dimension 0", P(t.dims_off, "<Q", 0))
                self.add("field", b, f"dim0-odd-{t.name}", f"{t.name}: first dimension 33 (not a block multiple)",
                         P(t.dims_off, "<Q", 33), expect="reject")
                self.add("field", b, f"type-99-{t.name}", f"{t.name}: ggml type 99", P(t.type_off, "<I", 99),
                         expect="reject")
                self.add("field", b, f"type-removed-{t.name}", f"{t.name}: ggml type 4 (removed)",
                         P(t.type_off, "<I", 4), expect="reject")
                self.add("field", b, f"offset-huge-{t.name}", f"{t.name}: data offset 2^60",
                         P(t.offset_off, "<Q", 2**60), expect="reject")
                self.add("field", b, f"offset-misaligned-{t.name}", f"{t.name}: data offset + 1",
                         {"op": "add64", "at": t.offset_off, "delta": 1}, expect="reject")
            # two tensors at one offset, a duplicate tensor name
            a, c = L.tinfos[1], L.tinfos[2]
            self.add("field", b, "offset-overlap", f"{c.name} at {a.name}'s offset",
                     {"op": "copy_bytes", "src": a.offset_off, "dst": c.offset_off, "n": 8})
            same = [(x, y) for x in L.tinfos for y in L.tinfos if x is not y and len(x.name) == len(y.name)]
            if same:
                x, y = same[0]
                self.add("field", b, "duplicate-tensor-name", f"tensor {y.name} renamed {x.name}",
                         {"op": "patch", "writes": [[y.start + 8, x.name.encode().hex()]]}, expect="reject")
            # keys rewritten through the record list
            arch = next(k for k in L.kvs if k.key == "general.architecture")
            self.add("field", b, "duplicate-key", "general.architecture twice",
                     {"op": "rewrite_kv", "add": [{"raw": "dup", "key": arch.key}]}, expect="reject")
            self.add("field", b, "duplicate-key-ours", "kvtuner.type_k twice",
                     {"op": "rewrite_kv", "add": [{"raw": "dup", "key": "kvtuner.type_k"}]}, expect="reject")
            a_name = next(k.key for k in L.kvs if k.key.endswith(".block_count")).split(".")[0]
            for name, val in (("align-0", ("general.alignment", U32, 0)), ("align-3", ("general.alignment", U32, 3)),
                              ("align-2p31", ("general.alignment", U32, 2**31)),
                              ("align-str", ("general.alignment", STR, "32")),
                              ("align-64", ("general.alignment", U32, 64)),
                              ("blocks-0", (f"{a_name}.block_count", U32, 0)),
                              ("blocks-2p31", (f"{a_name}.block_count", U32, 2**31)),
                              ("blocks-1000", (f"{a_name}.block_count", U32, 1000)),
                              ("blocks-str", (f"{a_name}.block_count", STR, "30")),
                              ("blocks-f32", (f"{a_name}.block_count", F32, 4.0)),
                              ("blocks-minus1", (f"{a_name}.block_count", U32, BASE_LAYERS[b] - 1)),
                              ("heads-0", (f"{a_name}.attention.head_count", U32, 0)),
                              ("heads-str", (f"{a_name}.attention.head_count", STR, "many")),
                              ("headskv-0", (f"{a_name}.attention.head_count_kv", U32, 0)),
                              ("headskv-big", (f"{a_name}.attention.head_count_kv", U32, 1000)),
                              ("headskv-arr", (f"{a_name}.attention.head_count_kv", "arr", [1, 2])),
                              ("embd-str", (f"{a_name}.embedding_length", STR, "wide")),
                              ("embd-huge", (f"{a_name}.embedding_length", U64, 2**40)),
                              ("keylen-0", (f"{a_name}.attention.key_length", U32, 0)),
                              ("keylen-24", (f"{a_name}.attention.key_length", U32, 24)),
                              ("arch-int", ("general.architecture", U32, 7)),
                              ("arch-unknown", ("general.architecture", STR, "nosucharch")),
                              ("arch-long", ("general.architecture", STR, "x" * 5000))):
                key, vt, v = val
                self.add("field", b, name, f"{key} = {v!r:.40}", {"op": "rewrite_kv", "set": [[key, vt, v]]})

    def kvtuner_arrays(self):
        for b, L in self.L.items():
            n = BASE_LAYERS[b]
            cfg = base_config(b)
            tk, tv = cfg["type_k"], cfg["type_v"]
            K, V = "kvtuner.type_k", "kvtuner.type_v"

            def S(name, what, sets, drop=(), expect=None, container_ok=True):
                # container_ok=False: the record itself runs past the file (claimed lengths), so the GGUF
                # does not parse and export cannot repair it either
                r = {"op": "rewrite_kv", "set": sets, "drop": list(drop)}
                if not container_ok:
                    r["broken_container"] = True
                self.add("kvtuner", b, name, what, r, expect=expect)

            S("len-minus1", f"{n - 1} K entries", [[K, "strarr", tk[:-1]]], expect="reject")
            S("len-plus1", f"{n + 1} K entries", [[K, "strarr", tk + ["q8_0"]]], expect="reject")
            S("len-1", "one K entry (no broadcast in files)", [[K, "strarr", ["q8_0"]]], expect="reject")
            S("len-1-v", "one V entry", [[V, "strarr", ["q4_0"]]], expect="reject")
            S("empty", "empty K array", [[K, "strarr", []]], expect="reject")
            S("empty-both", "both arrays empty", [[K, "strarr", []], [V, "strarr", []]], expect="reject")
            S("len-10k", "10000 K entries", [[K, "strarr", ["q8_0"] * 10000]], expect="reject")
            S("len-600", "600 V entries", [[V, "strarr", ["q4_0"] * 600]], expect="reject")
            for et, vals, nm in ((I32, [8] * n, "int32"), (F32, [8.0] * n, "float32"), (U8, [1] * n, "uint8"),
                                 (BOOL, [True] * n, "bool")):
                S(f"etype-{nm}", f"K array of {nm}", [[K, "arr", (et, vals)]], expect="reject")
            S("scalar-str", "K a string 'q8_0' (not an array)", [[K, STR, "q8_0"]], expect="reject")
            S("scalar-str-rle", "K a string 'q8_0*N'", [[K, STR, f"q8_0*{n}"]], expect="reject")
            S("scalar-u32", "K a uint32", [[K, U32, 8]], expect="reject")
            S("nested", "K an array of arrays", [[K, "raw", rec(K, ARR, struct.pack("<IQ", ARR, 1) +
                                                                struct.pack("<IQ", STR, 1) + enc_str("q8_0"))]],
              expect="reject", container_ok=False)
            for cnt, nm in ((2**40, "2p40"), (2**31, "2p31"), (2**64 - 1, "max"), (n + 5, "plus5")):
                S(f"claimed-{nm}", f"K array claims {cnt} entries, holds {n}",
                  [[K, "raw", rec_str_array(K, tk, cnt)]], expect="reject", container_ok=False)
            S("claimed-v-2p40", "V claims 2^40 entries", [[V, "raw", rec_str_array(V, tv, 2**40)]], expect="reject",
              container_ok=False)
            S("elem-len-huge", "one K name claims 2^50 bytes",
              [[K, "raw", rec(K, ARR, struct.pack("<IQ", STR, n) + struct.pack("<Q", 2**50) + b"q8_0" +
                              b"".join(enc_str(x) for x in tk[1:]))]], expect="reject", container_ok=False)
            odd_names = {
                "long-10k": "q" * 10_000, "long-1m": "q8_0" * 250_000, "nonutf8": b"\xff\xfeq8\x00",
                "nul-inside": b"q8_0\x00q4_0", "comma": "q8_0,q4_0", "star": f"q8_0*{n}", "semicolon": "q8_0;v=q4_0",
                "equals": "k=q8_0", "space": " q8_0", "quoted": "\"q8_0\"", "bracket": "[q8_0]", "empty-name": "",
                "ansi": "\x1b[31mq8_0\x1b[0m", "newline": "q8_0\nerror: fake", "upper": "Q8_0",
                "unicode": "q8\u20800", "unknown": "q9_0", "percent": "%s%s%n", "backslash": "q8_0\\",
            }
            for nm, val in odd_names.items():
                li = 1 if n > 1 else 0
                # a NUL ends the name for the engine (its GGUF API returns C strings) and for our reader
                ok = nm == "upper" or (nm == "nul-inside" and tk[li].lower() == "q8_0")
                S(f"name-{nm}", f"K layer {li} named {val!r:.40}", [[K, "strarr", tk[:li] + [val] + tk[li + 1:]]],
                  expect="accept" if ok else None if nm == "nul-inside" else "reject")
            for t in ODD_TYPES + ["q2_0", "bf16", "f32"]:
                S(f"type-{t.split()[0]}", f"every K layer {t!r:.30}", [[K, "strarr", [t] * n]])
                S(f"vtype-{t.split()[0]}", f"every V layer {t!r:.30}", [[V, "strarr", [t] * n]])
            S("all-catalogue", "every catalogue type in turn (K and V)",
              [[K, "strarr", [CACHE_TYPES[i % len(CACHE_TYPES)] for i in range(n)]],
               [V, "strarr", [CACHE_TYPES[(i + 4) % len(CACHE_TYPES)] for i in range(n)]]])
            S("only-k", "kvtuner.type_k without kvtuner.type_v", [], drop=[V], expect="accept")
            S("only-v", "kvtuner.type_v without kvtuner.type_k", [], drop=[K], expect="accept")
            S("neither", "both kvtuner arrays removed (plain file)", [], drop=[K, V])
            S("v-bad-k-good", "valid K, unknown V type", [[V, "strarr", tv[:-1] + ["q9_9"]]], expect="reject")
            S("other-prefix", "kvtuner.type_k renamed kvtuner.type_x", [[K.replace("_k", "_x"), "strarr", tk]],
              drop=[K])
            S("provenance-junk", "other kvtuner.* keys with odd values",
              [["kvtuner.budget", STR, "\xff" * 3], ["kvtuner.bits_nominal", "arr", (F32, [float("nan")] * 3)],
               ["kvtuner.source", "raw", rec("kvtuner.source", STR, enc_str(b"\xc3\x28 not utf-8"))]])

    def configs(self):
        for b in ("tiny", "smol"):
            if b not in self.L:
                continue
            n = BASE_LAYERS[b]
            cfg = base_config(b)
            tk, tv = cfg["type_k"], cfg["type_v"]
            texts = {
                "empty": b"", "not-json": b"type_k: q8_0", "truncated": json.dumps(cfg).encode()[:-7],
                "list": b"[]", "null": b"null", "number": b"42", "string": b"\"q8_0\"",
                "missing-v": json.dumps({"type_k": tk}).encode(),
                "k-string": json.dumps({"type_k": "q8_0", "type_v": tv}).encode(),
                "k-dict": json.dumps({"type_k": {"0": "q8_0"}, "type_v": tv}).encode(),
                "short": json.dumps({"type_k": tk[:-1], "type_v": tv[:-1]}).encode(),
                "long": json.dumps({"type_k": tk * 40, "type_v": tv * 40}).encode(),
                "huge-list": json.dumps({"type_k": ["q8_0"] * 200_000, "type_v": ["q8_0"] * 200_000}).encode(),
                "mismatch": json.dumps({"type_k": tk, "type_v": tv[:-1]}).encode(),
                "ints": json.dumps({"type_k": [8] * n, "type_v": tv}).encode(),
                "nulls": json.dumps({"type_k": [None] * n, "type_v": tv}).encode(),
                "nested": json.dumps({"type_k": [["q8_0"]] * n, "type_v": tv}).encode(),
                "dicts": json.dumps({"type_k": [{"t": "q8_0"}] * n, "type_v": tv}).encode(),
                "bools": json.dumps({"type_k": [True] * n, "type_v": tv}).encode(),
                "unknown": json.dumps({"type_k": tk[:-1] + ["q7_0"], "type_v": tv}).encode(),
                "odd-type": json.dumps({"type_k": ["q6_K"] * n, "type_v": tv}).encode(),
                "long-name": json.dumps({"type_k": ["q" * 100_000] * n, "type_v": tv}).encode(),
                "deep": b"[" * 100_000 + b"]" * 100_000,
                "deep-obj": b"{\"type_k\": " + b"[" * 50_000 + b"]" * 50_000 + b"}",
                "bom": b"\xef\xbb\xbf" + json.dumps(cfg).encode(),
                "utf16": json.dumps(cfg).encode("utf-16"),
                "nonutf8": b"{\"type_k\": [\"\xff\xfe\"], \"type_v\": []}",
                "nan": b"{\"type_k\": NaN, \"type_v\": Infinity}",
                "big-number": b"{\"type_k\": 1" + b"0" * 5000 + b", \"type_v\": []}",
                "dup-keys": ("{\"type_k\": %s, \"type_k\": 1, \"type_v\": %s}" % (json.dumps(tk), json.dumps(tv))).encode(),
                "extra-keys": json.dumps({**cfg, "comment": "x" * 100}).encode(),
                "upper": json.dumps({"type_k": [t.upper() for t in tk], "type_v": tv}).encode(),
                "nul-in-name": json.dumps({"type_k": ["q8_0\u0000"] * n, "type_v": tv}).encode(),
            }
            ok = {"extra-keys", "upper"}
            for nm, data in texts.items():
                self.add("config", b, nm, f"--config file: {nm}", {"op": "config", "hex": data.hex()},
                         expect="accept" if nm in ok else "reject")
            self.add("config", b, "directory", "--config is a directory", {"op": "config", "dir": True},
                     expect="reject")
            self.add("config", b, "missing", "--config does not exist", {"op": "config", "missing": True},
                     expect="reject")

    def spec_values(self, n: int) -> dict[str, tuple[object, str | None]]:
        """name -> (override string, expected outcome) for a model of n layers."""
        half = n // 2
        return {
            "valid": (f"k=q8_0*{half},q4_0*{n - half};v=q4_0", "accept"),
            "off": ("off", "accept"),
            "count-2p31": ("k=q8_0*2147483648;v=q4_0", "reject"),
            "count-2p31-1": ("k=q8_0*2147483647;v=q4_0", "reject"),
            "count-2p63": ("k=q8_0*9223372036854775807;v=q4_0", "reject"),
            "count-2p64": ("k=q8_0*18446744073709551616;v=q4_0", "reject"),
            "count-1e30": ("k=q8_0*1" + "0" * 30 + ";v=q4_0", "reject"),
            "count-over": (f"k=q8_0*{n},q4_0*1;v=q4_0", "reject"),
            "count-sum-overflow": (f"k=q8_0*{2**63 - 1},q4_0*{2**63 - 1};v=q4_0", "reject"),
            "count-neg": ("k=q8_0*-3;v=q4_0", "reject"),
            "count-zero": (f"k=q8_0*0,q4_0*{n}", "reject"),
            "count-hex": ("k=q8_0*0x10;v=q4_0", "reject"),
            "count-float": ("k=q8_0*1.5;v=q4_0", "reject"),
            "count-plus": (f"k=q8_0*+{n};v=q4_0", None),
            "count-space": (f"k=q8_0* {n};v=q4_0", None),
            "count-empty": ("k=q8_0*;v=q4_0", "reject"),
            "star-only": ("k=*;v=q4_0", "reject"),
            "double-star": (f"k=q8_0**{n}", "reject"),
            "star-star": (f"k=q8_0*{n}*2", "reject"),
            "no-name": (f"k=*{n}", "reject"),
            "empty": ("", None),
            "semicolons": (";;;", None),
            "k-empty": ("k=;v=q4_0", "reject"),
            "k-only-equals": ("k=", "reject"),
            "no-equals": ("q8_0", "reject"),
            "unknown-part": ("x=q8_0", "reject"),
            "dup-part": ("k=q8_0;k=q4_0", "reject"),
            "empty-item": (f"k=q8_0*{n - 1},,q4_0", "reject"),
            "unknown-type": ("k=q9_0", "reject"),
            "type-q6_K": ("k=q6_K;v=q6_K", None),
            "type-q4_K": ("k=q4_K", None),
            "type-i32": ("k=i32;v=i32", None),
            "type-f64": ("k=f64", None),
            "type-tq1_0": ("v=tq1_0", None),
            "type-mxfp4": ("k=mxfp4;v=mxfp4", None),
            "type-iq2_xxs": ("k=iq2_xxs", None),
            "type-q8_1": ("k=q8_1", None),
            "type-removed": ("k=DEPRECATED", "reject"),
            "type-removed-long": ("k=TYPE_Q4_0_4_4 REMOVED, use Q4_0 with runtime repacking", "reject"),
            "upper": ("K=Q8_0;V=Q4_0", "accept"),
            "OFF": ("OFF", None),
            "whitespace": (" k = q8_0 ; v = q4_0 ", "accept"),
            # an environment string holds at most 128 KiB on Linux (MAX_ARG_STRLEN): 15000 items for both
            "very-long": ("k=" + ",".join(["q8_0*1"] * 15_000), "reject"),
            "long-name": ("k=" + "q" * 100_000, "reject"),
            "nonutf8": (b"k=q8\xff\xfe_0", "reject"),
            "control": ("k=q8_0\x1b[2J\x07;v=q4_0", "reject"),
            "newline": ("k=q8_0\nv=q4_0", "reject"),
            "format": ("k=%s%s%s%n%n", "reject"),
        }

    def envs(self):
        for b in ("tiny", "smol"):
            if b not in self.L:
                continue
            for nm, (val, exp) in self.spec_values(BASE_LAYERS[b]).items():
                v = val if isinstance(val, bytes) else val.encode()
                self.add("env", b, nm, f"KVTUNER_KV_TYPES={val!r:.50}", {"op": "env", "hex": v.hex()}, expect=exp)

    def specs(self):
        b = "tiny"
        for nm, (val, exp) in self.spec_values(BASE_LAYERS[b]).items():
            v = val.decode("latin-1") if isinstance(val, bytes) else val
            self.add("spec", b, nm, f"engine.open_model(spec={v!r:.50})", {"op": "spec", "value": v}, expect=exp)
        for nm, v in (("nul", "k=q8_0\x00;v=q4_0"), ("int", 42), ("bytes", b"k=q8_0"), ("list", ["k=q8_0"]),
                      ("surrogate", "k=q8_0\udcff")):
            self.add("spec", b, nm, f"engine.open_model(spec={v!r:.50})", {"op": "spec", "pyvalue": repr(v)},
                     expect="reject")


# --- materialising a case's input ---------------------------------------------------------------------

def rebuild_kv(L: Layout, recipe: dict, out: Path) -> None:
    """A copy of L's file with metadata records replaced, dropped or added (tensor infos and data verbatim)."""
    with open(L.path, "rb") as f:
        head = f.read(L.tinfo_end)
    sets = {s[0]: s for s in recipe.get("set", [])}
    drop = set(recipe.get("drop", []))
    records = []
    for k in L.kvs:
        if k.key in drop:
            continue
        if k.key in sets:
            records.append(encode_set(sets.pop(k.key)))
        else:
            records.append(head[k.start:k.end])
    for s in sets.values():
        records.append(encode_set(s))
    for a in recipe.get("add", []):
        k = L.kv(a["key"])
        records.append(head[k.start:k.end])
    body = b"GGUF" + struct.pack("<IQQ", L.version, L.n_tensors, len(records)) + b"".join(records)
    body += head[L.kv_end:L.tinfo_end]
    align = L.alignment
    for s in recipe.get("set", []):
        if s[0] == "general.alignment" and isinstance(s[2], int) and s[2] > 0 and (s[2] & (s[2] - 1)) == 0 \
                and s[2] < 4096:
            align = s[2]   # a valid new alignment: pad to it, so the file is consistent with its claim
    body += b"\0" * ((align - len(body) % align) % align)
    with open(L.path, "rb") as f, open(out, "wb") as o:
        o.write(body)
        f.seek(L.data_offset)
        shutil.copyfileobj(f, o, 1 << 22)


def encode_set(s) -> bytes:
    key, vt, v = s
    if vt == "raw":
        return bytes.fromhex(v) if isinstance(v, str) else v
    if vt == "strarr":
        return rec_str_array(key, v)
    if vt == "arr":
        if isinstance(v, tuple) or (isinstance(v, list) and len(v) == 2 and isinstance(v[1], list)):
            et, vals = v
        else:
            et, vals = I32, v
        return rec_scalar_array(key, et, vals)
    if vt == STR:
        return rec(key, STR, enc_str(v))
    return rec(key, vt, struct.pack(SCALAR[vt], v))


def materialize(case: Case, bases: dict[str, Path], layouts: dict[str, Layout], work: Path) -> dict:
    """Write the case's input under `work`; returns {"file": path, "config": path, "env": bytes, "spec": value}."""
    r = case.recipe
    op = r["op"]
    base = bases.get(case.base)
    out = work / "input.gguf"
    if op == "copy":
        shutil.copyfile(base, out)
    elif op == "truncate":
        with open(base, "rb") as f, open(out, "wb") as o:
            o.write(f.read(r["at"]))
    elif op in ("patch", "flip", "add64", "copy_bytes"):
        shutil.copyfile(base, out)
        with open(out, "r+b") as f:
            if op == "patch":
                for off, hx in r["writes"]:
                    f.seek(off)
                    f.write(bytes.fromhex(hx))
            elif op == "flip":
                for bit in r["bits"]:
                    f.seek(bit // 8)
                    (x,) = f.read(1)
                    f.seek(bit // 8)
                    f.write(bytes([x ^ (1 << (bit % 8))]))
            elif op == "add64":
                f.seek(r["at"])
                (x,) = struct.unpack("<Q", f.read(8))
                f.seek(r["at"])
                f.write(struct.pack("<Q", (x + r["delta"]) % 2**64))
            else:
                f.seek(r["src"])
                b = f.read(r["n"])
                f.seek(r["dst"])
                f.write(b)
    elif op == "rewrite_kv":
        rebuild_kv(layouts[case.base], r, out)
    else:
        out = base
    res = {"file": out}
    if op == "config":
        c = work / "config.json"
        if r.get("dir"):
            c.mkdir()
        elif not r.get("missing"):
            c.write_bytes(bytes.fromhex(r["hex"]))
        res["config"] = c
    elif op == "env":
        res["env"] = bytes.fromhex(r["hex"])
    elif op == "spec":
        res["spec"] = r.get("value")
        res["pyvalue"] = r.get("pyvalue")
    return res


# --- the bases ---------------------------------------------------------------------------------------------

def make_bases(work: Path, names: list[str]) -> dict[str, Path]:
    from kvtuner_edge.config import CacheConfig
    from kvtuner_edge.export import export
    from kvtuner_edge.models import fetch
    from kvtuner_edge.random_model import write

    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for b in names:
        dst = work / f"{b}.kvtuner.gguf"
        if not dst.exists():
            if b in ("tiny", "head48"):
                src = work / f"{b}.gguf"
                write("tiny" if b == "tiny" else "tiny-head48", src)
            else:
                src = fetch("smollm2-135m" if b == "smol" else "gemma3-270m", progress=lambda m: None)
            cfg = base_config(b)
            export(src, CacheConfig(tuple(cfg["type_k"]), tuple(cfg["type_v"])), dst,
                   extra={"kvtuner.source": "fuzz base"})
        out[b] = dst
    return out


def corpus(bases: dict[str, Path], seed: int = SEED) -> tuple[list[Case], dict[str, Layout]]:
    layouts = {b: read_layout(p) for b, p in bases.items()}
    return Gen(layouts, seed).build(), layouts


# --- running -------------------------------------------------------------------------------------------------

TRACEBACK = re.compile(r"Traceback \(most recent call last\)|Exception ignored (in|on calling)")
INTERNALS = re.compile(r"vector::|std::|_M_[a-z_]+|basic_string|terminate called|what\(\):|bad_alloc|"
                       r"length_error|out_of_range|invalid_argument|Segmentation fault|core dumped")
SANITIZER = re.compile(r"ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer|UndefinedBehaviorSanitizer|"
                       r"SUMMARY: (Address|Undefined)")
ABORT = re.compile(r"GGML_ASSERT|GGML_ABORT|Aborted|abort\(\)")


@dataclass
class Run:
    case: str
    kind: str
    base: str
    target: str
    outcome: str
    rc: int | None
    seconds: float
    message: str = ""
    flags: list[str] = field(default_factory=list)
    expect: str | None = None
    detail: dict = field(default_factory=dict)


def sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_proc(cmd: list, timeout: float, env: dict | None = None, cwd: Path | None = None) -> tuple[int | None, str, float, bool]:
    """(returncode, stdout+stderr as text, seconds, timed_out); the process runs in its own group."""
    t0 = time.time()
    with tempfile.TemporaryFile() as out:
        try:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=cwd, start_new_session=True)
        except OSError as e:   # the case cannot be delivered (e.g. an environment string over 128 KiB)
            raise CaseError(f"cannot start {Path(str(cmd[0])).name}: {e}") from None
        try:
            rc = p.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc = p.wait()
            hung = True
        _kill_group(p)   # whatever it left behind
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return rc, text, time.time() - t0, hung


class CaseError(Exception):
    """The runner could not deliver a case to a target (not a finding about the target)."""


def error_line(text: str) -> str:
    """The line that tells the user what is wrong: ours ("error: ..."), click's, or the engine's."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for pat in (r"^error: ", r"^Error: ", r"kvtuner \(", r"gguf_init_from_file|gguf_|llama_model_load|"
                r"failed to load|error loading model|failed to|unable to|invalid|error"):
        hit = [l for l in lines if re.search(pat, l, re.I if pat.startswith("gguf") else 0)]
        if hit:
            return hit[-1][:400] if pat.startswith("^") else hit[0][:400]
    return ""


def classify(rc, text, hung, expect_ok_rcs=(0,), reject_rcs=(1, 2)) -> tuple[str, list[str]]:
    flags = []
    if TRACEBACK.search(text):
        flags.append("traceback")
    if SANITIZER.search(text):
        flags.append("sanitizer")
    if INTERNALS.search(text):
        flags.append("internals")
    if hung:
        return "hang", flags
    if rc is not None and rc < 0:
        return "crash", flags + [f"signal {-rc}"]
    if rc in (134, 136, 139) or (rc not in (0, 1, 2) and ABORT.search(text)):
        return "crash", flags + [f"exit {rc}"]
    if "sanitizer" in flags:
        return "sanitizer", flags
    if "traceback" in flags:
        return "traceback", flags
    if rc in expect_ok_rcs:
        return "accepted", flags
    if rc in reject_rcs or rc not in (0,):
        if "internals" in flags:
            return "internals", flags
        return ("rejected" if error_line(text) else "unclear"), flags
    return "accepted", flags


def expected(case: Case, target: str) -> str | None:
    """The outcome a case must have on a target, where it is known: export --config replaces a file's
    kvtuner keys, so a file whose only fault is in them must export (the output is repaired)."""
    if case.kind == "kvtuner" and target == "export" and not case.recipe.get("broken_container"):
        return "accept"
    return case.expect


class Runner:
    def __init__(self, work: Path, tools: Path | None, asan: dict | None, timeout_scale: float = 1.0,
                 python: str = sys.executable):
        self.work = work
        self.tools = tools
        self.asan = asan         # {"pythonpath": ..., "preload": ...} for the sanitizer engine
        self.scale = timeout_scale
        self.python = python
        self.text = work / "eval.txt"
        self.text.write_text(EVAL_TEXT)
        self.port = 18000 + os.getpid() % 2000

    def env(self, extra: bytes | None = None, engine: bool = False) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "KVTUNER_KV_TYPES"}
        env["PYTHONUNBUFFERED"] = "1"
        env["OMP_NUM_THREADS"] = "1"
        if engine and self.asan:
            env["PYTHONPATH"] = self.asan["pythonpath"] + os.pathsep + str(ROOT)
            env["LD_PRELOAD"] = self.asan["preload"]
            env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=0:allocator_may_return_null=1"
            env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=0"
        if extra is not None:
            env = {k.encode() if isinstance(k, str) else k: v.encode() if isinstance(v, str) else v
                   for k, v in env.items()}
            env[b"KVTUNER_KV_TYPES"] = extra
        return env

    def cli(self, *args) -> list[str]:
        return [self.python, "-m", "kvtuner_edge", *map(str, args)]

    def run_case(self, case: Case, bases: dict[str, Path], layouts: dict[str, Layout], targets: list[str]) -> list[Run]:
        d = Path(tempfile.mkdtemp(prefix="case-", dir=self.work))
        try:
            inp = materialize(case, bases, layouts, d)
            watched = [p for p in (inp["file"], inp.get("config")) if p is not None and Path(p).is_file()]
            before = {str(p): sha256(Path(p)) for p in watched}
            runs = []
            for t in targets:
                if t not in case.targets:
                    continue
                try:
                    r = self.run_target(case, t, inp, d)
                except CaseError as e:
                    r = Run(case.id, case.kind, case.base, t, "not-run", None, 0.0, str(e))
                after = {str(p): sha256(Path(p)) for p in watched}
                if after != before:
                    r.flags.append("modified")
                    r.outcome = "modified"
                    before = after
                r.expect = expected(case, t)
                runs.append(r)
            return runs
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def run_target(self, case: Case, t: str, inp: dict, d: Path) -> Run:
        f = inp["file"]
        env_val = inp.get("env")
        detail = {}
        T = lambda s: s * self.scale
        if t == "inspect":
            rc, text, sec, hung = run_proc(self.cli("inspect", f, "--json"), T(30), self.env())
        elif t == "export":
            cfg = inp.get("config")
            if cfg is None:
                cfg = d / "export-config.json"
                cfg.write_text(json.dumps(base_config(case.base) if case.base in BASE_LAYERS else {}))
            outdir = d / "out"
            outdir.mkdir(exist_ok=True)
            dst = outdir / "o.gguf"
            rc, text, sec, hung = run_proc(self.cli("export", f, "--config", cfg, "-o", dst, "--json"), T(90),
                                           self.env())
            leftovers = sorted(p.name for p in outdir.iterdir())
            if rc == 0:
                detail["output_check"] = check_export_output(dst, cfg)
            elif leftovers:
                detail["leftover"] = leftovers
        elif t == "eval":
            args = ["eval", f, "--text", self.text, "--ctx", 24, "--max-tokens", 24, "--json"]
            if inp.get("config") is not None:
                args[2:2] = ["--config", inp["config"]]
            rc, text, sec, hung = run_proc(self.cli(*args), T(180), self.env(env_val, engine=True))
        elif t == "engine":
            cmd = [self.python, str(ROOT / "scripts" / "fuzz_engine_probe.py"), str(f)]
            rc, text, sec, hung = run_proc(cmd, T(120), self.env(env_val, engine=True))
        elif t == "pyspec":
            spec_file = d / "spec.json"   # a file: a spec of 100000 items is longer than a command line may be
            spec_file.write_text(json.dumps({"repr": inp["pyvalue"]} if inp.get("pyvalue") is not None else
                                            {"hex": inp["spec"].encode("utf-8", "surrogateescape").hex()}))
            cmd = [self.python, str(ROOT / "scripts" / "fuzz_engine_probe.py"), str(f), "--via-python",
                   "--spec-file", str(spec_file)]
            rc, text, sec, hung = run_proc(cmd, T(120), self.env(engine=True))
        elif t == "cli":
            exe = self.tools / "llama-cli"
            cmd = [str(exe), "-m", str(f), "-p", "Hello", "-n", "2", "-st", "-c", "256", "-t", "1", "--no-display-prompt",
                   "--simple-io"]
            rc, text, sec, hung = run_proc(cmd, T(120), self.env(env_val, engine=True), cwd=d)
            # llama-cli exits 1 for "failed to load" / context errors; stdin is closed, so interactive
            # input ends at once
        elif t == "server":
            rc, text, sec, hung, detail = self.run_server(f, env_val, T(120), d)
        else:
            raise ValueError(t)
        outcome, flags = classify(rc, text, hung)
        if outcome == "rejected" and sec > T(SLOW_REFUSAL):
            outcome = "slow"     # a refusal must come at once (a 2^31 repeat count took 98 s)
        if t == "export" and outcome == "accepted" and detail.get("output_check") != "ok":
            outcome = "bad-output"
        if t == "export" and detail.get("leftover"):
            flags.append("leftover")
            outcome = "leftover"
        if t == "server" and outcome == "accepted" and not detail.get("answered"):
            outcome = "unclear"
        msg = error_line(text) if outcome != "accepted" else ""
        if outcome == "accepted" and t in ("engine", "pyspec", "eval", "inspect"):
            detail.update(parse_json_tail(text, t))
        if outcome not in ("accepted", "rejected"):
            detail["tail"] = text[-3000:]
        return Run(case.id, case.kind, case.base, t, outcome, rc, round(sec, 2), msg, flags, None, detail)

    def run_server(self, f: Path, env_val, timeout: float, d: Path):
        exe = self.tools / "llama-server"
        self.port = 18000 + (self.port - 18000 + 1) % 2000
        port = self.port
        cmd = [str(exe), "-m", str(f), "--host", "127.0.0.1", "--port", str(port), "-c", "256", "-t", "1", "-np", "1",
               "--no-webui"]
        t0 = time.time()
        log = d / "server.log"
        detail = {}
        with open(log, "wb") as out:
            try:
                p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env(env_val, engine=True), start_new_session=True)
            except OSError as e:
                raise CaseError(f"cannot start llama-server: {e}") from None
            hung = False
            try:
                while True:
                    if p.poll() is not None:
                        break
                    if time.time() - t0 > timeout:
                        hung = True
                        break
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                            if r.status == 200:
                                body = json.dumps({"prompt": "Hello", "n_predict": 2}).encode()
                                req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                                             headers={"Content-Type": "application/json"})
                                with urllib.request.urlopen(req, timeout=max(5, timeout - (time.time() - t0))) as c:
                                    detail["answered"] = c.status == 200 and "content" in json.loads(c.read())
                                break
                    except Exception:
                        time.sleep(0.3)
                if p.poll() is None:
                    if hung:
                        _kill_group(p)
                    else:
                        p.send_signal(signal.SIGTERM)
                        try:
                            p.wait(timeout=15)
                        except subprocess.TimeoutExpired:
                            _kill_group(p)
                            detail["stop"] = "killed after SIGTERM"
                    rc = p.wait()
                    rc = 0 if (not hung and detail.get("answered") and rc in (0, -signal.SIGTERM)) else rc
                else:
                    rc = p.returncode
            finally:
                _kill_group(p)
        text = log.read_bytes().decode("utf-8", "replace")
        return rc, text, time.time() - t0, hung, detail


def parse_json_tail(text: str, target: str) -> dict:
    """What an accepted run reported: per-layer types (for the agreement check between our reader and
    the engine). The JSON object is the last one printed from the start of a line."""
    d = None
    starts = [m.start() for m in re.finditer(r"(?m)^\{", text)]
    for i in reversed(starts):
        try:
            d = json.loads(text[i:text.rindex("}") + 1])
            break
        except ValueError:
            continue
    if not isinstance(d, dict):
        return {}
    if target == "inspect":
        return {"type_k": d.get("type_k"), "type_v": d.get("type_v")}
    if target == "eval":
        return {"type_k": d.get("type_k"), "type_v": d.get("type_v"), "engine_type_k": d.get("engine_type_k"),
                "engine_type_v": d.get("engine_type_v")}
    return {"engine_type_k": d.get("type_k"), "engine_type_v": d.get("type_v")}


def check_export_output(dst: Path, cfg: Path) -> str:
    from kvtuner_edge.gguf_io import model_info

    try:
        want = json.loads(cfg.read_text())
        info = model_info(dst)
    except Exception as e:  # noqa: BLE001 - this is the check's verdict, reported
        return f"output does not read back: {e}"
    if [str(x).lower() for x in info.type_k or []] != [str(x).lower() for x in want["type_k"]]:
        return "output's kvtuner.type_k differs from the config"
    return "ok"


def agreement(runs: list[Run]) -> list[dict]:
    """Cases where our reader (inspect) and the engine probe disagree about a file's per-layer types."""
    by = {}
    for r in runs:
        by.setdefault(r.case, {})[r.target] = r
    out = []
    for cid, t in by.items():
        ins, eng = t.get("inspect"), t.get("engine")
        if ins is None or eng is None:
            continue
        if ins.outcome == "accepted" and eng.outcome == "accepted":
            tk = ins.detail.get("type_k")
            tv = ins.detail.get("type_v")
            if tk is None and tv is None:
                continue   # an untuned file: the engine's f16 default; the probe reports what it got
            ek, ev = eng.detail.get("engine_type_k"), eng.detail.get("engine_type_v")
            norm = lambda xs: [str(x).lower() for x in xs] if xs else xs
            if ek is not None and (norm(tk) != norm([x for x in ek]) or norm(tv) != norm(ev)):
                out.append({"case": cid, "why": "inspect and engine report different per-layer types",
                            "inspect": [tk, tv], "engine": [ek, ev]})
        elif ins.outcome == "accepted" and eng.outcome == "rejected" and "kvtuner" in eng.message:
            # our reader took per-layer types the engine refuses (a file fault elsewhere, such as a
            # missing tensor, which inspect does not look for, is not a disagreement about the types)
            out.append({"case": cid, "why": "inspect accepted, the engine refused the types",
                        "inspect": ins.detail, "engine": eng.message})
        elif ins.outcome == "rejected" and eng.outcome == "accepted" and "kvtuner.type" in ins.message:
            out.append({"case": cid, "why": "inspect refused the types, the engine took them",
                        "inspect": ins.message, "engine": eng.detail})
    return out


BAD = ("crash", "traceback", "internals", "sanitizer", "hang", "slow", "modified", "leftover", "bad-output", "unclear")
SLOW_REFUSAL = 10.0   # seconds (x4 under the sanitizers): a refusal that takes longer is a finding


def summarize(runs: list[Run], cases: list[Case]) -> dict:
    rows = {}
    for r in runs:
        row = rows.setdefault(r.target, {k: 0 for k in ("runs", "rejected", "accepted", *BAD, "not-run")})
        row["runs"] += 1
        row[r.outcome] = row.get(r.outcome, 0) + 1   # "not-run": the runner could not deliver the case
    total = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()), {})}
    unexpected = [asdict(r) for r in runs if r.expect and r.outcome in ("accepted", "rejected")
                  and ((r.expect == "accept") != (r.outcome == "accepted"))]
    kinds = {}
    for c in cases:
        kinds[c.kind] = kinds.get(c.kind, 0) + 1
    return {"cases": len(cases), "case_kinds": kinds, "runs": len(runs), "by_target": rows, "total": total,
            "failures": [asdict(r) for r in runs if r.outcome in BAD],
            "unexpected": unexpected, "disagreements": agreement(runs)}


def table(s: dict) -> str:
    cols = ("runs", "rejected", "accepted", "crash", "sanitizer", "hang", "slow", "traceback", "internals", "unclear",
            "modified", "leftover", "bad-output", "not-run")
    lines = ["| target | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for t, row in list(s["by_target"].items()) + [("all", s["total"])]:
        lines.append(f"| {t} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    return "\n".join(lines)


# --- the sanitizer engine -------------------------------------------------------------------------------------

def asan_setup(work: Path) -> dict:
    """Build (cached) the cpu-asan wheel and unpack it where PYTHONPATH finds it before the plain engine."""
    r = subprocess.run([sys.executable, str(ROOT / "native" / "build.py"), "--variant", "cpu-asan", "--no-install",
                        "--print-wheel", "--jobs", "1"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"cpu-asan build failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    wheel = Path(r.stdout.strip().splitlines()[-1])
    site = wheel.parent / "site"
    if not (site / "llama_cpp").exists():
        import zipfile

        tmp = wheel.parent / "site.part"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        for so in tmp.rglob("*.so*"):
            so.chmod(0o755)
        os.replace(tmp, site)
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    libubsan = subprocess.run(["gcc", "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    return {"pythonpath": str(site), "preload": f"{os.path.realpath(libasan)} {os.path.realpath(libubsan)}",
            "wheel": str(wheel)}


def tools_dir(variant: str) -> Path | None:
    r = subprocess.run([sys.executable, str(ROOT / "native" / "build.py"), "--variant", variant, "--tools",
                        "--jobs", "1"], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"no {variant} tools: {r.stderr[-2000:]}", file=sys.stderr)
        return None
    return Path(r.stdout.strip().splitlines()[-1])


def _jsonable(o):
    """Recipes hold raw bytes (records, names): written as hex."""
    if isinstance(o, (bytes, bytearray)):
        return {"hex": bytes(o).hex()}
    raise TypeError(type(o).__name__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kvtuner-fuzz")
    ap.add_argument("--bases", default="tiny,head48,smol,gemma")
    ap.add_argument("--targets", default="inspect,export,eval,engine,cli,server,pyspec")
    ap.add_argument("--kinds", help="only these case kinds (comma-separated)")
    ap.add_argument("--match", help="only case ids containing this")
    ap.add_argument("--sample", type=int, help="a seeded sample of this many cases")
    ap.add_argument("--asan", action="store_true", help="the engine and tools of the cpu-asan build (ASan + UBSan)")
    ap.add_argument("--tools", type=Path, help="folder with llama-cli/llama-server (default: built/cached by native/build.py)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", type=Path, help="write results.json and summary.md here (runs.jsonl as they finish)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out's runs-VARIANT.jsonl")
    a = ap.parse_args(argv)

    bases = make_bases(a.work, a.bases.split(","))
    cases, layouts = corpus(bases, a.seed)
    if a.kinds:
        cases = [c for c in cases if c.kind in a.kinds.split(",")]
    if a.match:
        cases = [c for c in cases if a.match in c.id]
    if a.sample:
        cases = sorted(random.Random(a.seed).sample(cases, min(a.sample, len(cases))), key=lambda c: c.id)
    if a.list:
        for c in cases:
            print(f"{c.id:60s} {c.expect or '-':7s} {c.what}")
        kinds = {}
        for c in cases:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        print(f"{len(cases)} cases: {kinds}")
        return 0
    targets = a.targets.split(",")
    variant = "cpu-asan" if a.asan else "cpu"
    tools = a.tools or (tools_dir(variant) if {"cli", "server"} & set(targets) else None)
    if tools is None:
        targets = [t for t in targets if t not in ("cli", "server")]
    asan = asan_setup(a.work) if a.asan else None
    runner = Runner(a.work, tools, asan, timeout_scale=4.0 if a.asan else 1.0)
    runs: list[Run] = []
    done: set[str] = set()
    jsonl = None
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / f"runs-{variant}.jsonl"
        if a.resume and path.exists():
            for line in path.read_text().splitlines():
                try:
                    runs.append(Run(**json.loads(line)))
                except (ValueError, TypeError):
                    continue     # a line cut by an interruption
            done = {r.case for r in runs}
        jsonl = open(path, "a" if a.resume else "w")
    t0 = time.time()
    for i, c in enumerate(cases):
        if c.id in done:
            continue
        rs = runner.run_case(c, bases, layouts, targets)
        runs += rs
        if jsonl:
            for r in rs:
                jsonl.write(json.dumps(asdict(r), default=_jsonable) + "\n")
            jsonl.flush()
        bad = [f"{r.target}:{r.outcome}" for r in rs if r.outcome in BAD]
        print(f"[{i + 1}/{len(cases)} {time.time() - t0:.0f}s] {c.id}: "
              + " ".join(f"{r.target}={r.outcome}" for r in rs) + (f"   <-- {bad}" if bad else ""), flush=True)
    s = summarize(runs, cases)
    s.update({"seed": a.seed, "variant": variant, "targets": targets, "seconds": round(time.time() - t0),
              "bases": {b: str(p) for b, p in bases.items()}})
    if jsonl:
        jsonl.close()
    print(table(s))
    print(f"{s['cases']} cases, {s['runs']} runs in {s['seconds']} s; failures {len(s['failures'])}, "
          f"unexpected outcomes {len(s['unexpected'])}, reader/engine disagreements {len(s['disagreements'])}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"results-{variant}.json").write_text(json.dumps({"summary": s, "runs": [asdict(r) for r in runs],
                                                                   "cases": [asdict(c) for c in cases]}, indent=1,
                                                                  default=_jsonable))
        (a.out / f"summary-{variant}.md").write_text(table(s) + "\n")
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
