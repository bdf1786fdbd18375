"""Errors kvtuner-edge raises on bad input. Each message names the file, layer or value at fault."""


class KVTunerError(Exception):
    """Base class: a clear, user-facing error (the CLI prints it and exits non-zero)."""


class ModelFileError(KVTunerError):
    """The model file is missing, unreadable, truncated, not a GGUF, or has no KV layers."""


class ConfigError(KVTunerError):
    """A per-layer cache configuration that this model or backend cannot take."""


class EngineError(KVTunerError):
    """The native engine is missing, is a stock build, or refused to open the model."""
