"""Read a GGUF model's shape and kvtuner.* metadata, fast, without loading tensors.

gguf-py's GGUFReader builds numpy views of every metadata array (Gemma-3's 262k-token
vocabulary takes over a minute on a small CPU); this reader walks the header once, skips the
tokenizer arrays, and checks that the tensor data the header promises is really in the file,
so a truncated or corrupt file is refused with a message instead of crashing the engine.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelFileError

GGUF_MAGIC = b"GGUF"
KEY_TYPE_K = "kvtuner.type_k"
KEY_TYPE_V = "kvtuner.type_v"

# gguf value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
    _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}
# arrays longer than this are skipped unless their key is one of ours (vocabularies, merges, ...)
_MAX_ARRAY = 4096


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int   # relative to the start of the data section
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int     # absolute offset of the tensor data section
    alignment: int
    kv_end: int          # absolute offset where the key/value section ends
    tinfo_end: int       # absolute offset where the tensor infos end
    kv_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (start, end) of its bytes
    skipped: set[str] = field(default_factory=set)  # long arrays not read into `metadata`
    value_types: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # key -> (gguf type, element type)

    def type_name(self, key: str) -> str:
        return _type_name(self.value_types[key])


_TYPE_NAMES = {_UINT8: "uint8", _INT8: "int8", _UINT16: "uint16", _INT16: "int16", _UINT32: "uint32",
               _INT32: "int32", _FLOAT32: "float32", _BOOL: "bool", _STRING: "string", _ARRAY: "array",
               _UINT64: "uint64", _INT64: "int64", _FLOAT64: "float64"}
GGML_MAX_NAME = 64       # llama.cpp refuses tensor names of this length or longer
GGML_MAX_DIMS = 4


def _type_name(t: tuple[int, int | None]) -> str:
    if t[0] == _ARRAY:
        return f"array of {_TYPE_NAMES.get(t[1], f'type {t[1]}')}"
    return _TYPE_NAMES.get(t[0], f"type {t[0]}")


def show(value, limit: int = 40) -> str:
    """A value from a file or a user, quoted for a message: control characters escaped, cut at `limit`."""
    text = value if isinstance(value, str) else repr(value)
    out = repr(text[:limit])
    return out + (f"... ({len(text)} characters)" if len(text) > limit else "")


class _Reader:
    """Bounds-checked reads of a GGUF header: every length and count is checked against the bytes
    left in the file before anything is read, allocated or skipped, so a corrupt field gives a
    ModelFileError naming it (never an OSError from a seek, a MemoryError or a long loop)."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size
        self.pos = 0
        self.types: dict[str, tuple[int, int | None]] = {}

    def type_name(self, key: str) -> str:
        return _type_name(self.types[key])

    def fail(self, what: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: corrupt GGUF header: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise ModelFileError(f"{self.path}: truncated GGUF header: {what} needs {n} bytes at offset {self.pos}, "
                                 f"file has {self.size}")

    def read(self, n: int, what: str = "a field") -> bytes:
        self.need(n, what)
        b = self.f.read(n)
        if len(b) != n:   # the file shrank while we read it
            raise ModelFileError(f"{self.path}: truncated GGUF header at offset {self.pos}")
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def scalar(self, t: int, what: str = "a field"):
        fmt = _SCALAR[t]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar(_UINT64, what)
        if n > self.size - self.pos:
            raise self.fail(f"{what} claims {n} bytes, {self.size - self.pos} are left in the file")
        return self.read(n, what).decode("utf-8", errors="replace")

    def count(self, n: int, elem_min: int, what: str) -> None:
        """n elements of at least elem_min bytes each must fit in what is left of the file."""
        if n * elem_min > self.size - self.pos:
            raise self.fail(f"{what} claims {n} elements, more than the {self.size - self.pos} bytes left in the file hold")

    def skip_strings(self, n: int, what: str) -> None:
        self.count(n, 8, what)
        for _ in range(n):
            (m,) = struct.unpack("<Q", self.read(8, what))
            self.skip(m, what)

    def value(self, t: int, key: str, hdr_skipped: set[str]):
        what = f"the value of {show(key)}"
        self.types[key] = (t, None)
        if t == _STRING:
            return self.string(what)
        if t in _SCALAR:
            return self.scalar(t, what)
        if t == _ARRAY:
            et = self.scalar(_UINT32, what)
            n = self.scalar(_UINT64, what)
            self.types[key] = (t, et)
            if et == _STRING:
                self.count(n, 8, what)
            elif et in _SCALAR:
                self.count(n, struct.calcsize(_SCALAR[et]), what)
            elif et == _ARRAY:
                raise self.fail(f"{what} is an array of arrays, which GGUF does not allow")
            else:
                raise self.fail(f"{what} is an array of unknown value type {et}")
            if n > _MAX_ARRAY:
                # vocabularies, merges, ...: skipped (and ours too: no model has that many layers;
                # the length is kept for the message)
                hdr_skipped.add(key)
                if et == _STRING:
                    self.skip_strings(n, what)
                else:
                    self.skip(n * struct.calcsize(_SCALAR[et]), what)
                return SkippedArray(_TYPE_NAMES[et], n)
            if et == _STRING:
                return [self.string(what) for _ in range(n)]
            fmt = _SCALAR[et]
            sz = struct.calcsize(fmt)
            raw = self.read(n * sz, what)
            return [struct.unpack_from(fmt, raw, i * sz)[0] for i in range(n)]
        raise self.fail(f"{show(key)} has unknown value type {t}")


@dataclass(frozen=True)
class SkippedArray:
    """A metadata array too long to read into memory (a vocabulary): its element type and length."""
    elem_type: str
    n: int

    def __len__(self) -> int:
        return self.n


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int, path: Path, name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ModelFileError(f"{path}: tensor {show(name)} has unknown ggml type {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    if n >= 2**63:
        raise ModelFileError(f"{path}: corrupt GGUF header: tensor {show(name)} has {n} elements (shape {shape})")
    if shape and shape[0] % block:
        raise ModelFileError(f"{path}: tensor {show(name)}: row of {shape[0]} is not a multiple of block {block}")
    return n // block * type_size


def _version_error(version: int) -> str | None:
    """llama.cpp's rules (gguf.cpp): 0 and 1 are refused, a version with zero low 16 bits is a file of the
    other byte order, and this engine reads up to version 3."""
    if version == 0:
        return "bad GGUF version 0"
    if version & 0xFFFF == 0:
        return f"GGUF version {version:#x}: a file of the other byte order (big-endian?)"
    if version == 1:
        return "GGUF version 1 is no longer supported"
    if version > 3:
        return f"unsupported GGUF version {version} (this engine reads versions 2 and 3)"
    return None


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF header; ModelFileError for a missing, non-GGUF, corrupt or truncated file.

    The checks are llama.cpp's own (ggml/src/gguf.cpp), so a file this accepts is a file the engine
    can parse: lengths and counts within the file, no empty or duplicate keys, a power-of-two uint32
    alignment, unique tensor names shorter than 64 bytes, at most 4 dimensions, known ggml types,
    rows that are whole blocks, and tensor data laid out in order at aligned offsets, all inside the file.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file")
    size = path.stat().st_size
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        r = _Reader(f, path, size)
        magic = f.read(4)
        r.pos = len(magic)
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = r.scalar(_UINT32, "the version")
        bad = _version_error(version)
        if bad:
            raise ModelFileError(f"{path}: {bad}")
        n_tensors = r.scalar(_UINT64, "the tensor count")
        n_kv = r.scalar(_UINT64, "the key count")
        # a key/value record takes at least 13 bytes, a tensor info at least 24
        if n_kv * 13 + n_tensors * 24 > size - r.pos:
            raise r.fail(f"{n_tensors} tensors and {n_kv} keys do not fit in a file of {size} bytes")
        meta: dict[str, Any] = {}
        skipped: set[str] = set()
        ranges: dict[str, tuple[int, int]] = {}
        for i in range(n_kv):
            start = r.pos
            key = r.string(f"key {i}")
            if not key:
                raise r.fail(f"key {i} is empty")
            if key in meta:
                raise r.fail(f"duplicate key {show(key)}")
            t = r.scalar(_UINT32, f"the value type of {show(key)}")
            meta[key] = r.value(t, key, skipped)
            ranges[key] = (start, r.pos)
        value_types = r.types
        kv_end = r.pos
        alignment = meta.get("general.alignment", 32)
        if "general.alignment" in meta and r.types["general.alignment"] != (_UINT32, None):
            raise r.fail(f"general.alignment must be a uint32, got {r.type_name('general.alignment')} {show(alignment)}")
        if alignment <= 0 or alignment & (alignment - 1):
            raise r.fail(f"general.alignment {alignment} is not a power of 2")
        tensors = []
        names: set[str] = set()
        for i in range(n_tensors):
            name = r.string(f"the name of tensor {i}")
            if len(name.encode("utf-8", "surrogatepass")) >= GGML_MAX_NAME:
                raise r.fail(f"tensor {i}'s name is {len(name)} characters long (at most {GGML_MAX_NAME - 1})")
            if name in names:
                raise r.fail(f"duplicate tensor name {show(name)}")
            names.add(name)
            nd = r.scalar(_UINT32, f"tensor {show(name)}")
            if nd > GGML_MAX_DIMS:
                raise r.fail(f"tensor {show(name)} has {nd} dimensions (at most {GGML_MAX_DIMS})")
            shape = tuple(r.scalar(_UINT64, f"tensor {show(name)}") for _ in range(nd))
            if any(d >= 2**63 for d in shape):
                raise r.fail(f"tensor {show(name)} has a negative dimension (shape {shape})")
            gt = r.scalar(_UINT32, f"tensor {show(name)}")
            off = r.scalar(_UINT64, f"tensor {show(name)}")
            tensors.append(TensorInfo(name, shape, gt, off, _tensor_nbytes(shape, gt, path, name)))
        tinfo_end = r.pos
        data_offset = (tinfo_end + alignment - 1) // alignment * alignment
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise ModelFileError(f"{path}: corrupt GGUF header: tensor {show(t.name)} has data offset {t.offset}, "
                                 f"expected {expected} (tensors are stored in order at {alignment}-byte boundaries)")
        expected += (t.nbytes + alignment - 1) // alignment * alignment
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if data_offset + end > size:
        raise ModelFileError(f"{path}: truncated GGUF file: tensor data needs {data_offset + end} bytes, file has {size}")
    return GGUFHeader(path, version, meta, tensors, data_offset, alignment, kv_end, tinfo_end, ranges, skipped,
                      value_types)


LLAMA_MAX_LAYERS = 512   # llama.cpp refuses models with more layers (llama-hparams.h)
_TYPE_NAME_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


@dataclass
class ModelInfo:
    """The shape of a model's KV cache, per layer, as llama.cpp will allocate it."""
    path: Path
    arch: str
    name: str
    n_layer: int
    n_head: list[int]
    n_head_kv: list[int]
    head_k: list[int]
    head_v: list[int]
    swa_layers: list[bool]
    sliding_window: int
    n_ctx_train: int
    type_k: list[str] | None    # per-layer types written by kvtuner-edge, if any (checked; None if invalid)
    type_v: list[str] | None
    metadata: dict[str, Any]
    types_error: str | None = None   # why the file's kvtuner.type_k/type_v cannot be used, if they cannot

    @property
    def kv_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.n_head_kv[i] > 0]

    def n_embd_k(self, il: int) -> int:
        return self.n_head_kv[il] * self.head_k[il]

    def n_embd_v(self, il: int) -> int:
        return self.n_head_kv[il] * self.head_v[il]

    def file_types(self) -> tuple[list[str], list[str]] | None:
        """The per-layer (K, V) types the engine takes from this file's metadata: None when it has
        neither kvtuner.type_k nor kvtuner.type_v; a side without its key is f16, as in the engine.
        ConfigError naming the key and layer when the metadata is unusable (the engine refuses it too)."""
        if self.types_error:
            raise ConfigError(f"{self.path}: {self.types_error}")
        if self.type_k is None and self.type_v is None:
            return None
        f16 = ["f16"] * self.n_layer
        return list(self.type_k or f16), list(self.type_v or f16)


def _int(meta: dict, key: str, default, path: Path, lo: int = 0, hi: int = 2**31) -> int:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelFileError(f"{path}: {key} must be an integer, got {show(v)}")
    if not lo <= v <= hi:
        raise ModelFileError(f"{path}: {key} = {v} is out of range ({lo} to {hi})")
    return v


def _per_layer(meta: dict, key: str, default, n: int, path: Path) -> list[int]:
    value = meta.get(key, default)
    if isinstance(value, list):
        if len(value) != n:
            raise ModelFileError(f"{path}: {key} has {len(value)} entries for {n} layers")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**20 for v in value):
            raise ModelFileError(f"{path}: {key} must hold integers from 0 to {2**20}")
        return [int(v) for v in value]
    return [_int(meta, key, value, path, 0, 2**20)] * n


def _swa_layers(arch: str, meta: dict, n_layer: int) -> list[bool]:
    """Which layers use sliding-window attention (llama.cpp's per-arch rules for the common ones)."""
    pat = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pat, list):
        return [bool(x) for x in pat[:n_layer]] + [False] * (n_layer - len(pat))
    if not meta.get(f"{arch}.attention.sliding_window"):
        return [False] * n_layer
    period = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5}.get(arch)
    if isinstance(pat, int) and not isinstance(pat, bool) and pat > 0:
        period = pat
    if period is None:
        return [False] * n_layer
    # the last layer of every period is dense
    return [(il % period) < period - 1 for il in range(n_layer)]


def _file_types(h: GGUFHeader, n_layer: int) -> tuple[list[str] | None, list[str] | None, str | None]:
    """kvtuner.type_k/type_v checked as the engine checks them (native/kvtuner/llama-kvtuner.cpp): an
    array of strings, one per layer, each the name of a KV cache type. (K, V, error)."""
    from . import types as T

    out: dict[str, list[str] | None] = {}
    for key in (KEY_TYPE_K, KEY_TYPE_V):
        if key not in h.metadata:
            out[key] = None
            continue
        v = h.metadata[key]
        if isinstance(v, SkippedArray):
            return None, None, f"{key} has {v.n} entries for {n_layer} layers"
        if h.value_types.get(key) != (_ARRAY, _STRING):
            tn = h.type_name(key)
            return None, None, f"{key} is {'an' if tn[0] in 'aeiou' else 'a'} {tn}, not an array of cache type names"
        if len(v) != n_layer:
            return None, None, f"{key} has {len(v)} entries for {n_layer} layers"
        names = []
        for il, name in enumerate(v):
            name = name.split("\0", 1)[0]    # where the engine's GGUF API (C strings) ends the name
            t = T.TYPES.get(name.lower()) if _TYPE_NAME_RE.fullmatch(name) else None
            if t is None:
                return None, None, (f"{key}: layer {il}: {show(name)} is not a KV cache type "
                                    f"(known: {', '.join(T.TYPES)})")
            names.append(t.name)
        out[key] = names
    return out[KEY_TYPE_K], out[KEY_TYPE_V], None


def model_info(path: str | os.PathLike, header: GGUFHeader | None = None) -> ModelInfo:
    """Architecture and per-layer KV shape; ModelFileError when there is no KV cache to tune or the
    shape keys are missing, of the wrong type or out of range. The file's own kvtuner types are
    checked but not required to be valid (see ModelInfo.file_types): export replaces them."""
    h = header or read_header(path)
    meta = h.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(f"{h.path}: GGUF has no general.architecture")
    if f"{arch}.block_count" not in meta:
        raise ModelFileError(f"{h.path}: architecture {show(arch)} has no {arch}.block_count: not a model with KV layers")
    n_layer = _int(meta, f"{arch}.block_count", 0, h.path, 1, LLAMA_MAX_LAYERS)
    n_embd = _int(meta, f"{arch}.embedding_length", 0, h.path)
    n_head = _per_layer(meta, f"{arch}.attention.head_count", 0, n_layer, h.path)
    n_head_kv = _per_layer(meta, f"{arch}.attention.head_count_kv", n_head, n_layer, h.path)
    if not any(n_head_kv):
        raise ModelFileError(f"{h.path}: architecture {show(arch)} has no attention layers with a KV cache")
    hmax = max(n_head)
    default_head = n_embd // hmax if hmax else 0
    head_k = [_int(meta, f"{arch}.attention.key_length", default_head, h.path, 0, 2**20)] * n_layer
    head_v = [_int(meta, f"{arch}.attention.value_length", default_head, h.path, 0, 2**20)] * n_layer
    if not head_k[0] or not head_v[0]:
        raise ModelFileError(f"{h.path}: cannot tell the attention head size of {show(arch)}")
    tk, tv, bad = _file_types(h, n_layer)
    name = meta.get("general.name")
    return ModelInfo(
        path=h.path, arch=arch, name=name if isinstance(name, str) else h.path.stem, n_layer=n_layer,
        n_head=n_head, n_head_kv=n_head_kv, head_k=head_k, head_v=head_v,
        swa_layers=_swa_layers(arch, meta, n_layer),
        sliding_window=_int(meta, f"{arch}.attention.sliding_window", 0, h.path),
        n_ctx_train=_int(meta, f"{arch}.context_length", 0, h.path, 0, 2**63),
        type_k=tk, type_v=tv, metadata=meta, types_error=bad,
    )


# writing: the same tensors, byte for byte, with our keys replaced

def _enc_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, value) -> bytes:
    """One GGUF key/value: str, bool, int (uint32 if it fits, else int64), float (float32),
    or a list of str / int / float."""
    out = _enc_str(key)
    if isinstance(value, str):
        return out + struct.pack("<I", _STRING) + _enc_str(value)
    if isinstance(value, bool):
        return out + struct.pack("<I?", _BOOL, value)
    if isinstance(value, int):
        if 0 <= value < 2**32:
            return out + struct.pack("<II", _UINT32, value)
        return out + struct.pack("<Iq", _INT64, value)
    if isinstance(value, float):
        return out + struct.pack("<If", _FLOAT32, value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return out + struct.pack("<IIQ", _ARRAY, _STRING, len(value)) + b"".join(_enc_str(v) for v in value)
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return out + struct.pack("<IIQ", _ARRAY, _INT32, len(value)) + struct.pack(f"<{len(value)}i", *value)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return out + struct.pack("<IIQ", _ARRAY, _FLOAT32, len(value)) + struct.pack(f"<{len(value)}f", *value)
    raise TypeError(f"cannot encode {key}={value!r} as GGUF metadata")


def check_output(src: str | os.PathLike, dst: str | os.PathLike, probe: bool = True) -> Path:
    """ModelFileError unless dst can receive a copy of src: not src itself, in an existing folder
    we may write (probe: create and remove a temporary file there, since root passes access())."""
    import tempfile

    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ModelFileError(f"{dst}: refusing to overwrite the input model; choose another output path")
    folder = dst.parent if str(dst.parent) else Path(".")
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise ModelFileError(f"{folder}: output folder is not writable")
    if probe:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".probe", dir=folder)
        except OSError as e:
            raise ModelFileError(f"{folder}: output folder is not writable ({e.strerror})") from None
        os.close(fd)
        os.unlink(name)
    return folder


def remove_stale_temps(folder: Path, pattern: str = "*.tmp*") -> int:
    """Delete the temporary files (name ending in .tmp<pid>[.png]) that a killed run left in `folder`;
    a file whose process is still alive (another export at work) is kept. Returns the number removed."""
    n = 0
    for p in Path(folder).glob(pattern):
        m = re.search(r"\.tmp(\d+)(\.png)?$", p.name)
        if not m or not p.is_file():
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue          # alive (or not ours to signal): keep
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        p.unlink(missing_ok=True)
        n += 1
    return n


def write_with_metadata(src: str | os.PathLike, dst: str | os.PathLike, new_kv: dict[str, Any],
                        drop_prefix: str = "kvtuner.", progress=None, header: GGUFHeader | None = None) -> None:
    """Copy `src` to `dst` with every key under `drop_prefix` replaced by `new_kv`.

    Tensor infos and tensor data are copied byte for byte, streamed (the model is never held in
    memory). The file is written to a temporary name in the target folder and renamed, so `dst`
    is either the old file or the complete new one; `src` is never opened for writing.
    """
    import tempfile

    src, dst = Path(src), Path(dst)
    h = header or read_header(src)
    folder = check_output(src, dst, probe=False)
    kept = [k for k in h.kv_ranges if not k.startswith(drop_prefix)]
    remove_stale_temps(folder, f".{dst.name}.*.tmp*")     # what a killed export of the same name left
    try:
        # the pid in the name tells a killed writer's leftover from a live one's (two exports at once)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=f".tmp{os.getpid()}", dir=folder)
    except OSError as e:
        raise ModelFileError(f"{folder}: output folder is not writable ({e.strerror})") from None
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file 0600; the output gets what a plain open() would give (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            out.write(GGUF_MAGIC + struct.pack("<IQQ", h.version, len(h.tensors), len(kept) + len(new_kv)))
            for k in kept:
                a, b = h.kv_ranges[k]
                f.seek(a)
                out.write(f.read(b - a))
            for k, v in new_kv.items():
                out.write(encode_kv(k, v))
            f.seek(h.kv_end)
            out.write(f.read(h.tinfo_end - h.kv_end))
            pos = out.tell()
            out.write(b"\0" * ((h.alignment - pos % h.alignment) % h.alignment))
            f.seek(h.data_offset)
            total = src.stat().st_size - h.data_offset
            done = 0
            while chunk := f.read(1 << 24):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
