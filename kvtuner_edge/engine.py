"""The patched llama.cpp engine through llama-cpp-python: the only module that imports llama_cpp.

    from kvtuner_edge import engine, CacheConfig
    cfg = CacheConfig.uniform(30, "q8_0", "q4_0")
    with engine.open_model("model.gguf", cfg, n_ctx=2048) as m:
        print(m.layer_types())        # what each layer's K and V cache really got
        logits = m.logits(tokens)     # [n_tokens, n_vocab]

Per-layer types reach the engine without rewriting the file: the config is handed to
llama_kvtuner_set_override() just for the context's creation (under a lock, so threads that
open models at the same time do not see each other's configs).  An explicit global
type_k/type_v wins over per-layer types, as in the engine.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

# Load llama.cpp's shared libraries before numpy: on the GPU machine a CUDA build segfaulted
# inside libggml-cuda.so at the first model load whenever numpy had been imported first (fixed in
# the build since, -Wl,--exclude-libs,ALL: docs/DESIGN.md, "Build"; this order stays as a guard).
try:
    import llama_cpp as _llama_cpp  # noqa: F401
except ImportError:   # reported with a build hint by _bind()
    _llama_cpp = None

import numpy as np  # noqa: E402

from . import types as T
from .config import CacheConfig
from .errors import ConfigError, EngineError, ModelFileError
from .gguf_io import ModelInfo, model_info

_LOCK = threading.Lock()
_LIB = None
_LOG_CB = None                                     # our llama.cpp log callback (kept alive here)
_ERRORS: collections.deque = collections.deque(maxlen=16)   # llama.cpp's latest error lines
_CAPTURE: list[str] | None = None                  # while set (under _LOCK), every log line goes here too

BUILD_HINT = "build and install the patched engine with `kvtuner-edge engine build` (see the README)"


def _bind():
    """The llama_cpp shared library with our functions bound; EngineError if missing or stock."""
    global _LIB
    if _LIB is not None:
        return _LIB
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as ll
    except ImportError as e:
        raise EngineError(f"llama_cpp is not installed ({e}); {BUILD_HINT}") from None
    lib = ll._lib
    if not hasattr(lib, "llama_kvtuner_version"):
        raise EngineError(f"the installed llama_cpp ({Path(llama_cpp.__file__).parent}) is a stock build without "
                          f"per-layer KV cache types; {BUILD_HINT}")
    lib.llama_kvtuner_version.restype = ctypes.c_int32
    lib.llama_kvtuner_set_override.argtypes = [ctypes.c_char_p]
    lib.llama_kvtuner_set_override.restype = None
    lib.llama_kvtuner_last_error.restype = ctypes.c_char_p
    lib.llama_kvtuner_layer_type.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool]
    lib.llama_kvtuner_layer_type.restype = ctypes.c_int32
    lib.llama_kvtuner_layer_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_bool]
    lib.llama_kvtuner_layer_bytes.restype = ctypes.c_int64
    _install_log(llama_cpp)
    _LIB = lib
    return lib


def _install_log(llama_cpp) -> None:
    """llama.cpp's log through a callback that never raises: llama-cpp-python's own decodes every
    line as strict UTF-8 inside the ctypes callback, so a file whose key names are not UTF-8 printed
    a Python traceback ("Exception ignored on calling ctypes callback function"). Ours decodes with
    replacement, prints what llama-cpp-python would print (its verbosity) and keeps the error lines,
    which name what the engine refused in a file (llama-cpp-python sends them to /dev/null while a
    model loads)."""
    global _LOG_CB
    import logging

    from llama_cpp import _logger

    last = [logging.CRITICAL]
    # ggml's levels (NONE, DEBUG, INFO, WARN, ERROR; 5 continues the previous line). llama-cpp-python's
    # table (_logger.GGML_LOG_LEVEL_TO_LOGGING_LEVEL) is an older enum's: it sends WARN to ERROR and ERROR
    # to DEBUG, which dropped the GGUF reader's and the loader's error lines from our messages. The lines
    # kept for messages go by ggml's levels (warnings and errors); what is printed stays llama-cpp-python's
    # choice, so that a refused file still gives one line.
    levels = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
    shown = [logging.CRITICAL]

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        try:
            msg = (text or b"").decode("utf-8", "replace")
            if _CAPTURE is not None:
                _CAPTURE.append(msg)
            lvl = levels.get(level, logging.DEBUG) if level != 5 else last[0]
            plvl = _logger.GGML_LOG_LEVEL_TO_LOGGING_LEVEL.get(level, logging.DEBUG) if level != 5 else shown[0]
            if lvl >= logging.WARNING and msg.strip():
                _ERRORS.append(msg.strip())
            last[0], shown[0] = lvl, plvl
            # a memory probe's contexts (plan: dozens, some past the trained length) stay quiet unless verbose
            if _logger.logger.level <= plvl and (_CAPTURE is None or _logger.logger.level <= logging.DEBUG):
                print(msg, end="", flush=True, file=sys.stderr)
        except Exception:   # noqa: BLE001 - a log line must never take the process down
            pass

    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    _LOG_CB = cb


def _engine_errors() -> str:
    """The engine's error lines since the last _ERRORS.clear(), most telling first, for a message."""
    lines = list(dict.fromkeys(_ERRORS))
    lines.sort(key=lambda l: 0 if ("gguf" in l or "error loading model" in l) else 1)
    text = "; ".join(l.rstrip(".") for l in lines[:3])
    return text[:600]


def last_error() -> str:
    """The engine's message for the last per-layer configuration it refused on this thread ("" if none)."""
    return (_bind().llama_kvtuner_last_error() or b"").decode("utf-8", "replace")


def check_spec(spec) -> str:
    """An override spec for llama_kvtuner_set_override: ConfigError unless it is text the C side can take."""
    if not isinstance(spec, str):
        raise ConfigError(f"an override spec is a string such as 'k=q8_0*3,q4_0*27;v=q4_0', got {type(spec).__name__}")
    if "\0" in spec:
        raise ConfigError("the override spec contains a NUL character")
    try:
        spec.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("the override spec is not valid text (it holds an unpaired surrogate)") from None
    return spec


def _printable(s: str, limit: int = 40) -> str:
    """The engine's printable(): UTF-8 bytes outside printable ASCII (and quote, backslash) as \\xNN, cut at 40."""
    b = s.encode("utf-8", "surrogateescape")
    out = "".join(chr(c) if 0x20 <= c < 0x7F and c not in (0x27, 0x5C) else f"\\x{c:02x}" for c in b[:limit])
    return out + (f"... ({len(b)} bytes)" if len(b) > limit else "")


def precheck_override(spec: str, n_layer: int, source: str = "KVTUNER_KV_TYPES") -> None:
    """The engine's override syntax (native/kvtuner/llama-kvtuner.cpp, llama_kvtuner_resolve and
    parse_list) checked before a model is loaded, so that a bad value is refused at once rather than
    after the load: ConfigError with the engine's own wording, else None. It accepts what the engine
    accepts (tests/test_engine.py compares both on the same specs); what needs the model (its
    architecture, the backend's support of a type) is still the engine's to check."""
    check_spec(spec)
    trim = lambda x: x.strip(" \t\n\v\f\r\"")      # noqa: E731  (the engine's trim: isspace and '"')
    if trim(spec) == "off":
        return
    seen: set[str] = set()
    for part in (trim(p) for p in spec.split(";")):
        if not part:
            continue
        key, eq, lst = part.partition("=")
        key = trim(key).lower() if eq else ""
        if key not in ("k", "v"):
            raise ConfigError(f"kvtuner ({source}): cannot parse '{_printable(part)}': expected 'k=TYPES' or 'v=TYPES'")
        if key in seen:
            raise ConfigError(f"kvtuner ({source}): {key.upper()} types given twice")
        seen.add(key)
        items = lst.split(",")
        which, n = key.upper(), 0
        for raw in items:
            name, star, cnt = trim(raw).partition("*")
            name, cnt = trim(name), trim(cnt)
            count = None
            if star:
                if not cnt or not cnt.isascii() or not cnt.isdigit() or int(cnt) <= 0 or int(cnt) >= 2**63:
                    raise ConfigError(f"kvtuner ({source}): bad repeat count '{_printable(cnt)}' in {which} types")
                count = int(cnt)
            if not name.isascii() or name.lower() not in T.TYPES:
                raise ConfigError(f"kvtuner ({source}): layer {n}: {which} cache type '{_printable(name)}' is not a KV cache "
                                  f"type (cache types: {', '.join(T.TYPES)})")
            if len(items) == 1 and count is None:
                break
            if (count or 1) > n_layer - n:
                raise ConfigError(f"kvtuner ({source}): more than {n_layer} {which} cache types given, "
                                  f"but the model has {n_layer} layers")
            n += count or 1
        else:
            if n != n_layer:
                raise ConfigError(f"kvtuner ({source}): {n} {which} cache types given, but the model has {n_layer} layers")


def engine_version() -> int:
    return int(_bind().llama_kvtuner_version())


def has_gpu() -> bool:
    import llama_cpp.llama_cpp as ll

    _bind()
    return bool(ll.llama_supports_gpu_offload())


@dataclass
class LayerCache:
    layer: int
    type_k: str | None   # None: the layer has no cache in this context
    type_v: str | None
    bytes_k: int
    bytes_v: int


def _layer_caches(ctx, n_layer: int) -> list[LayerCache]:
    """What the engine allocated per layer of a context: types and bytes of K and V."""
    lib = _bind()
    out = []
    for il in range(n_layer):
        tk = lib.llama_kvtuner_layer_type(ctx, il, False)
        tv = lib.llama_kvtuner_layer_type(ctx, il, True)
        out.append(LayerCache(il, T.name_of(tk) if tk >= 0 else None, T.name_of(tv) if tv >= 0 else None,
                              int(lib.llama_kvtuner_layer_bytes(ctx, il, False)),
                              int(lib.llama_kvtuner_layer_bytes(ctx, il, True))))
    return out


class Model:
    """An open model + context on the patched engine."""

    def __init__(self, llm, info: ModelInfo, config: CacheConfig | None):
        self.llm = llm
        self.info = info
        self.config = config  # the per-layer config asked for (None: the file's own or global types)

    # context manager

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # introspection

    @property
    def ctx(self):
        return self.llm._ctx.ctx

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def layer_caches(self) -> list[LayerCache]:
        return _layer_caches(self.ctx, self.info.n_layer)

    def layer_types(self) -> tuple[list[str | None], list[str | None]]:
        lc = self.layer_caches()
        return [c.type_k for c in lc], [c.type_v for c in lc]

    def cache_bytes(self) -> int:
        return sum(c.bytes_k + c.bytes_v for c in self.layer_caches())

    # evaluation

    def tokenize(self, text: str | bytes, add_bos: bool = True) -> list[int]:
        b = text.encode("utf-8") if isinstance(text, str) else text
        return self.llm.tokenize(b, add_bos=add_bos, special=False)

    def reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits for every position of `tokens` evaluated from an empty cache: [n_tokens, n_vocab] float32.
        The model must be opened with logits_all=True."""
        if not self.llm._logits_all:
            raise EngineError("open the model with logits_all=True to read logits for every token")
        if len(tokens) > self.n_ctx:
            raise EngineError(f"{len(tokens)} tokens do not fit a context of {self.n_ctx}")
        self.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32, copy=True)

    def generate(self, tokens: Sequence[int], n: int, temperature: float = 0.0) -> list[int]:
        """Continuation of `tokens` (evaluated on top of whatever the context already holds): greedy,
        or sampled at `temperature` (top-k 40, top-p 0.95, the seed given to open_model)."""
        out = []
        kw = dict(temp=0.0, top_k=1) if temperature <= 0 else dict(temp=temperature, top_k=40, top_p=0.95)
        for tok in self.llm.generate(list(tokens), reset=False, **kw):
            out.append(int(tok))
            if len(out) >= n:
                break
        return out


@contextlib.contextmanager
def _override(spec: str | None) -> Iterator[None]:
    lib = _bind()
    if spec is not None:
        check_spec(spec)
    with _LOCK:
        lib.llama_kvtuner_set_override(spec.encode() if spec is not None else None)
        try:
            yield
        finally:
            lib.llama_kvtuner_set_override(None)


def open_model(path: str | os.PathLike, config: CacheConfig | None = None, *, spec: str | None = None,
               type_k: str | None = None, type_v: str | None = None,
               use_file_types: bool = True, n_ctx: int = 2048, n_batch: int = 512, n_ubatch: int = 512,
               flash_attn: bool = True, n_gpu_layers: int = 0, logits_all: bool = False,
               n_threads: int | None = None, seed: int = 0, verbose: bool | None = None, swa_full: bool = False,
               **llama_kwargs) -> Model:
    """Open `path` on the patched engine.

    config: per-layer types for this context (no file rewrite). None: the file's own kvtuner
    types when use_file_types, else f16. spec: the engine's own override string instead of a
    config ("k=q8_0*3,q4_0*27;v=q4_0", see native/kvtuner/llama-kvtuner.h), checked by the
    engine. type_k/type_v: one global type everywhere (wins over per-layer types).
    swa_full=False gives sliding-window layers a window-sized cache, as llama.cpp's own tools
    do. Raises ModelFileError / ConfigError / EngineError with the engine's message.
    """
    _bind()
    import llama_cpp

    info = model_info(path)
    if config is not None and (type_k or type_v):
        raise EngineError("give either a per-layer config or global type_k/type_v, not both")
    if config is not None:
        if spec is not None:
            raise EngineError("give either a config or an override spec, not both")
        config.validate(info)
        spec = config.spec()
    elif spec is None and not use_file_types:
        spec = "off"
    elif spec is None and not (type_k or type_v) and not os.environ.get("KVTUNER_KV_TYPES"):
        info.file_types()    # the file's own types: ConfigError naming the key and layer if unusable
    if spec is None and not (type_k or type_v) and os.environ.get("KVTUNER_KV_TYPES"):
        # the engine reads it at context creation, after the model load: refuse a bad value now
        precheck_override(os.environ["KVTUNER_KV_TYPES"], info.n_layer)

    if verbose is None:  # llama.cpp's own log on stderr: KVTUNER_EDGE_VERBOSE=1
        verbose = os.environ.get("KVTUNER_EDGE_VERBOSE", "0") not in ("", "0")
    # llama-cpp-python reads seed 0 as "random" (`seed or LLAMA_DEFAULT_SEED`): keep 0 reproducible
    kw = dict(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, flash_attn=flash_attn, n_gpu_layers=n_gpu_layers,
              logits_all=logits_all, seed=seed if seed != 0 else 0x5EED, verbose=verbose, swa_full=swa_full,
              n_threads=n_threads or max(1, os.cpu_count() or 1))
    for key, name in (("type_k", type_k), ("type_v", type_v)):
        if name:
            try:
                kw[key] = T.get(name).ggml_id
            except ValueError as e:
                raise ConfigError(str(e)) from None
    kw.update(llama_kwargs)

    with _override(spec):
        _ERRORS.clear()
        try:
            llm = llama_cpp.Llama(str(path), **kw)
        except ValueError as e:
            err = last_error()
            if err:
                raise ConfigError(f"{Path(path).name}: {err}") from None
            why = _engine_errors()
            if "Failed to load model" in str(e):
                raise ModelFileError(f"{path}: the engine could not load this model"
                                     + (f": {why}" if why else "")) from None
            raise EngineError(f"{path}: {e}" + (f" ({why})" if why else "")) from None
    return Model(llm, info, config)


def _load_model(ll, path, mp):
    """llama_model_load_from_file through the C API, or a ModelFileError with the engine's own messages."""
    _ERRORS.clear()
    model = ll.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        why = _engine_errors()
        raise ModelFileError(f"{path}: the engine could not load this model" + (f": {why}" if why else ""))
    return model


# --- memory: what the engine allocates for a model and a context, as it reports it (kvtuner_edge.plan) ---

# llama.cpp's own report lines: "load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
# "llama_context:        CPU  output buffer size =     0.19 MiB", "sched_reserve:        CPU compute buffer
# size =    98.25 MiB" (llama-model.cpp, llama-context.cpp: two decimals of MiB)
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|output|compute|KV) buffer size =\s*([0-9.]+) MiB")


@contextlib.contextmanager
def _captured_log() -> Iterator[list[str]]:
    """The engine's log lines written inside the block (the caller holds _LOCK)."""
    global _CAPTURE
    _bind()
    lines: list[str] = []
    _CAPTURE = lines
    try:
        yield lines
    finally:
        _CAPTURE = None


def buffer_sizes(lines: Sequence[str]) -> dict[str, dict[str, int]]:
    """{"model" | "output" | "compute" | "KV": {buffer name: bytes}} from the engine's log lines."""
    out: dict[str, dict[str, int]] = {}
    for m in _BUFFER_LINE.finditer("".join(lines)):
        name, kind, mib = m.group(1), m.group(2), float(m.group(3))
        out.setdefault(kind, {})
        out[kind][name] = out[kind].get(name, 0) + round(mib * 2**20)
    return out


class MemoryProbe:
    """The memory a model and its contexts take on the engine, as llama.cpp reports it.

    Weights: one memory-mapped load of the file, the model buffers its loader reports (a CPU run
    maps the file and may add a repacked copy of some weights: Gemma-3's Q4_K, CPU_REPACK).
    Contexts: a second load with no_alloc (llama.cpp's own memory-fit mode: shapes only, nothing
    allocated or read), so a context of any length is created in milliseconds; for each, the KV
    cache bytes of every layer through llama_kvtuner_layer_bytes (what the cache tensors take,
    exactly) and the compute and output buffers the context reserved, from its report lines
    (two decimals of MiB). The contexts are those our own tools create: flash attention,
    n_ubatch 512, one KV stream per sequence, window-sized sliding-window caches."""

    def __init__(self, path: str | os.PathLike, n_ubatch: int = 512, verbose: bool | None = None):
        _bind()
        import llama_cpp.llama_cpp as ll
        from llama_cpp import _logger

        if verbose is None:
            verbose = os.environ.get("KVTUNER_EDGE_VERBOSE", "0") not in ("", "0")
        _logger.set_verbose(verbose)
        self._ll = ll
        self.path = Path(path)
        self.info = model_info(path)
        self.n_ubatch = n_ubatch
        self.model = None
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        with _LOCK, _captured_log() as lines:
            ll.llama_model_free(_load_model(ll, path, mp))
        self.weights: dict[str, int] = buffer_sizes(lines).get("model", {})
        mp.no_alloc = True
        mp.load_mode = 0            # LLAMA_LOAD_MODE_NONE: the no_alloc pass maps nothing
        with _LOCK, _captured_log():
            self.model = _load_model(ll, path, mp)
        self.n_vocab = int(ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model)))

    def close(self) -> None:
        if self.model is not None:
            self._ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "MemoryProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    def context(self, n_ctx_seq: int, n_seq: int = 1, *, config: CacheConfig | None = None,
                spec: str | None = None, type_k: str | None = None, type_v: str | None = None) -> dict:
        """What a context of n_seq sequences of n_ctx_seq tokens each takes. config/spec: per-layer
        types (None: the file's own, as the engine reads them); type_k/type_v: one global type."""
        ll = self._ll
        if config is not None:
            if spec is not None:
                raise EngineError("give either a config or an override spec, not both")
            config.validate(self.info)
            spec = config.spec()
        if n_ctx_seq < 1 or n_seq < 1:
            raise ConfigError(f"a context needs at least one token and one sequence (got {n_ctx_seq} x {n_seq})")
        if n_seq > int(ll.llama_max_parallel_sequences()):
            raise ConfigError(f"{n_seq} sequences: the engine runs at most {int(ll.llama_max_parallel_sequences())}")
        if n_ctx_seq * n_seq >= 2**32:
            raise ConfigError(f"{n_ctx_seq} tokens x {n_seq} sequences is more cells than the engine counts (2^32)")
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_ctx_seq * n_seq
        cp.n_seq_max = n_seq
        cp.n_batch = cp.n_ubatch = self.n_ubatch
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cp.kv_unified = False
        cp.swa_full = False
        cp.no_perf = True
        for key, name in (("type_k", type_k), ("type_v", type_v)):
            if name:
                try:
                    setattr(cp, key, T.get(name).ggml_id)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        with _override(spec), _captured_log() as lines:
            _ERRORS.clear()
            ctx = ll.llama_init_from_model(self.model, cp)
            if not ctx:
                err = last_error() or _engine_errors()
                raise (ConfigError if last_error() else EngineError)(
                    f"{self.path.name}: the engine refused a context of {n_seq} x {n_ctx_seq} tokens"
                    + (f": {err}" if err else ""))
        try:
            layers = _layer_caches(ctx, self.info.n_layer)
            got_seq = int(ll.llama_n_ctx_seq(ctx))
        finally:
            ll.llama_free(ctx)
        sizes = buffer_sizes(lines)
        out = {"n_ctx_seq": got_seq, "n_seq": n_seq,
               "kv_bytes": sum(c.bytes_k + c.bytes_v for c in layers),
               "type_k": [c.type_k for c in layers], "type_v": [c.type_v for c in layers],
               "compute": sizes.get("compute", {}), "output": sizes.get("output", {})}
        out["compute_bytes"] = sum(out["compute"].values())
        out["output_bytes"] = sum(out["output"].values())
        out["weight_bytes"] = self.weight_bytes
        out["total_bytes"] = out["weight_bytes"] + out["kv_bytes"] + out["compute_bytes"] + out["output_bytes"]
        return out


# --- throughput runs: many sequences at once (kvtuner_edge.bench) ---------------------------------

class BatchContext:
    """One context with `n_seq` independent sequences (one KV stream each, as llama.cpp's
    llama-batched-bench and llama-server use them) for throughput measurements."""

    def __init__(self, runner: "BatchRunner", ctx, n_seq: int, n_ctx: int, n_batch: int):
        self.runner = runner
        self.ctx = ctx
        self.n_seq = n_seq
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        import llama_cpp.llama_cpp as ll

        self._ll = ll
        self._batch = ll.llama_batch_init(max(n_batch, n_seq), 0, 1)

    def close(self) -> None:
        if self.ctx is not None:
            self._ll.llama_batch_free(self._batch)
            self._ll.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "BatchContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def layer_caches(self) -> list[LayerCache]:
        return _layer_caches(self.ctx, self.runner.info.n_layer)

    def kv_bytes(self) -> int:
        """Bytes of K and V cache this context allocated (all sequences)."""
        return sum(c.bytes_k + c.bytes_v for c in self.layer_caches())

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, pos, seq, logits) entries."""
        b = self._batch
        for i, (tok, pos, seq, want) in enumerate(entries):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(entries)
        rc = self._ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise EngineError(f"llama_decode failed (code {rc}) with {len(entries)} tokens")

    def sync(self) -> None:
        self._ll.llama_synchronize(self.ctx)

    def prefill(self, tokens: Sequence[int], seq: int = 0, pos0: int = 0) -> float:
        """Evaluate `tokens` into sequence `seq` in n_batch chunks; returns the wall seconds."""
        import time

        self.sync()
        t0 = time.perf_counter()
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i:i + self.n_batch]
            last = i + len(chunk) == len(tokens)
            self._decode([(int(t), pos0 + i + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])
        self.sync()
        return time.perf_counter() - t0

    def share_prefix(self, n_pos: int, dummy_token: int = 0) -> None:
        """Copy sequence 0's first n_pos cells to every other sequence (llama.cpp copies the data
        between streams at the next decode, so one dummy token is evaluated and removed)."""
        mem = self._ll.llama_get_memory(self.ctx)
        for s in range(1, self.n_seq):
            self._ll.llama_memory_seq_cp(mem, 0, s, -1, -1)
        if self.n_seq > 1:
            self._decode([(dummy_token, n_pos, 0, True)])
            self._ll.llama_memory_seq_rm(mem, 0, n_pos, -1)
        self.sync()

    def decode_steps(self, tokens: Sequence[int], pos0: int, n_steps: int) -> float:
        """n_steps decode steps, each one token (tokens[s]) for every sequence s at position pos0 + step,
        logits for all of them (as a server would sample each); returns the wall seconds."""
        import time

        self.sync()
        t0 = time.perf_counter()
        for step in range(n_steps):
            self._decode([(int(tokens[(s + step) % len(tokens)]), pos0 + step, s, True) for s in range(self.n_seq)])
        self.sync()
        return time.perf_counter() - t0


class BatchRunner:
    """A model loaded once (layers on the GPU with n_gpu_layers) for contexts of many sequences."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, n_threads: int | None = None,
                 verbose: bool | None = None):
        _bind()
        import llama_cpp.llama_cpp as ll
        from llama_cpp import _logger

        if verbose is None:
            verbose = os.environ.get("KVTUNER_EDGE_VERBOSE", "0") not in ("", "0")
        _logger.set_verbose(verbose)
        self._ll = ll
        self.path = Path(path)
        self.info = model_info(path)
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = _load_model(ll, path, mp)
        self.n_vocab = int(ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model)))

    def close(self) -> None:
        if self.model is not None:
            self._ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "BatchRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def context(self, n_seq: int, n_ctx_seq: int, *, spec: str | None = None, type_k: str | None = None,
                type_v: str | None = None, n_batch: int = 2048, n_ubatch: int = 512,
                flash_attn: bool = True, swa_full: bool = True) -> BatchContext:
        """A context of n_seq sequences of n_ctx_seq cells each. spec: the engine's per-layer override
        (None: the file's own kvtuner types; "off": f16); type_k/type_v: one global type (wins).
        swa_full: full-length caches for sliding-window layers (llama.cpp's context default, which
        the throughput runs keep); False gives them window-sized ones, as plan counts them."""
        ll = self._ll
        _bind()
        cp = ll.llama_context_default_params()
        cp.n_ctx = n_seq * n_ctx_seq
        cp.n_seq_max = n_seq
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_ubatch, n_batch)
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.kv_unified = False
        cp.swa_full = swa_full
        cp.offload_kqv = True
        cp.no_perf = True
        for key, name in (("type_k", type_k), ("type_v", type_v)):
            if name:
                try:
                    setattr(cp, key, T.get(name).ggml_id)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        with _override(spec):
            ctx = ll.llama_init_from_model(self.model, cp)
            if not ctx:
                err = last_error()
                raise (ConfigError if err else EngineError)(
                    f"{self.path.name}: could not create a context of {n_seq} x {n_ctx_seq} cells"
                    + (f": {err}" if err else " (out of memory?)"))
        return BatchContext(self, ctx, n_seq, cp.n_ctx, n_batch)
