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

import contextlib
import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

# Load llama.cpp's shared libraries before numpy: on the GPU machine a CUDA build segfaulted
# inside libggml-cuda.so at the first model load whenever numpy had been imported first
# (scripts/gpu_bisect.py variants I-K; llama_cpp imported first: fine). See the README, "GPU".
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

BUILD_HINT = "build and install the patched engine with `python native/build.py` (see the README)"


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
    _LIB = lib
    return lib


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
        lib = _bind()
        out = []
        for il in range(self.info.n_layer):
            tk = lib.llama_kvtuner_layer_type(self.ctx, il, False)
            tv = lib.llama_kvtuner_layer_type(self.ctx, il, True)
            out.append(LayerCache(il, T.name_of(tk) if tk >= 0 else None, T.name_of(tv) if tv >= 0 else None,
                                  int(lib.llama_kvtuner_layer_bytes(self.ctx, il, False)),
                                  int(lib.llama_kvtuner_layer_bytes(self.ctx, il, True))))
        return out

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
    lib = _bind()
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
        try:
            llm = llama_cpp.Llama(str(path), **kw)
        except ValueError as e:
            err = (lib.llama_kvtuner_last_error() or b"").decode()
            if err:
                raise ConfigError(f"{Path(path).name}: {err}") from None
            if "Failed to load model" in str(e):
                raise ModelFileError(f"{path}: the engine could not load this model ({e})") from None
            raise EngineError(f"{path}: {e}") from None
    return Model(llm, info, config)
