"""kvtuner-edge: sensitivity-aware, layer-wise mixed-precision KV cache for llama.cpp and GGUF."""

__version__ = "0.1.0"

from .config import CacheConfig  # noqa: E402
from .errors import ConfigError, EngineError, KVTunerError, ModelFileError  # noqa: E402

__all__ = ["CacheConfig", "ConfigError", "EngineError", "KVTunerError", "ModelFileError", "__version__"]
