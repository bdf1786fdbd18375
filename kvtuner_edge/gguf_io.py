"""Read a GGUF model's shape and kvtuner.* metadata, fast, without loading tensors.

gguf-py's GGUFReader builds numpy views of every metadata array (Gemma-3's 262k-token
vocabulary takes over a minute on a small CPU); this reader walks the header once, skips the
tokenizer arrays, and checks that the tensor data the header promises is really in the file,
so a truncated or corrupt file is refused with a message instead of crashing the engine.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFileError

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


class _Reader:
    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelFileError(f"{self.path}: truncated GGUF header (wanted {n} bytes at offset {self.f.tell() - len(b)}, "
                                 f"file has {self.size})")
        return b

    def scalar(self, t: int):
        fmt = _SCALAR[t]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(_UINT64)
        if n > self.size:
            raise ModelFileError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        return self.read(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        f = self.f
        for _ in range(count):
            (n,) = struct.unpack("<Q", self.read(8))
            f.seek(n, os.SEEK_CUR)
        if f.tell() > self.size:
            raise ModelFileError(f"{self.path}: truncated GGUF header")

    def value(self, t: int, key: str, hdr_skipped: set[str]):
        if t == _STRING:
            return self.string()
        if t in _SCALAR:
            return self.scalar(t)
        if t == _ARRAY:
            et = self.scalar(_UINT32)
            n = self.scalar(_UINT64)
            ours = key.startswith("kvtuner.")
            if n > _MAX_ARRAY and not ours:
                hdr_skipped.add(key)
                if et == _STRING:
                    self.skip_strings(n)
                elif et in _SCALAR:
                    self.f.seek(n * struct.calcsize(_SCALAR[et]), os.SEEK_CUR)
                else:
                    raise ModelFileError(f"{self.path}: unsupported nested array in {key}")
                return None
            if et == _STRING:
                return [self.string() for _ in range(n)]
            if et in _SCALAR:
                fmt = _SCALAR[et]
                sz = struct.calcsize(fmt)
                raw = self.read(n * sz)
                return [struct.unpack_from(fmt, raw, i * sz)[0] for i in range(n)]
            raise ModelFileError(f"{self.path}: unsupported nested array in {key}")
        raise ModelFileError(f"{self.path}: corrupt GGUF header (unknown value type {t} for {key})")


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int, path: Path, name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ModelFileError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    if shape and shape[0] % block:
        raise ModelFileError(f"{path}: tensor {name}: row of {shape[0]} is not a multiple of block {block}")
    return n // block * type_size


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF header; ModelFileError for a missing, non-GGUF, corrupt or truncated file."""
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
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version = r.scalar(_UINT32)
        if version not in (2, 3):
            raise ModelFileError(f"{path}: unsupported GGUF version {version}")
        n_tensors = r.scalar(_UINT64)
        n_kv = r.scalar(_UINT64)
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ModelFileError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        meta: dict[str, Any] = {}
        skipped: set[str] = set()
        ranges: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            start = f.tell()
            key = r.string()
            t = r.scalar(_UINT32)
            meta[key] = r.value(t, key, skipped)
            ranges[key] = (start, f.tell())
        kv_end = f.tell()
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            nd = r.scalar(_UINT32)
            if nd > 4:
                raise ModelFileError(f"{path}: corrupt GGUF header (tensor {name} has {nd} dimensions)")
            shape = tuple(r.scalar(_UINT64) for _ in range(nd))
            gt = r.scalar(_UINT32)
            off = r.scalar(_UINT64)
            tensors.append(TensorInfo(name, shape, gt, off, _tensor_nbytes(shape, gt, path, name)))
        alignment = int(meta.get("general.alignment", 32))
        tinfo_end = f.tell()
        data_offset = (tinfo_end + alignment - 1) // alignment * alignment
    end = max((t.offset + t.nbytes for t in tensors), default=0)
    if data_offset + end > size:
        raise ModelFileError(f"{path}: truncated GGUF file: tensor data needs {data_offset + end} bytes, file has {size}")
    return GGUFHeader(path, version, meta, tensors, data_offset, alignment, kv_end, tinfo_end, ranges, skipped)


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
    type_k: list[str] | None    # per-layer types written by kvtuner-edge, if any
    type_v: list[str] | None
    metadata: dict[str, Any]

    @property
    def kv_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.n_head_kv[i] > 0]

    def n_embd_k(self, il: int) -> int:
        return self.n_head_kv[il] * self.head_k[il]

    def n_embd_v(self, il: int) -> int:
        return self.n_head_kv[il] * self.head_v[il]


def _per_layer(value, n: int, what: str, path: Path) -> list[int]:
    if isinstance(value, list):
        if len(value) != n:
            raise ModelFileError(f"{path}: {what} has {len(value)} entries for {n} layers")
        return [int(v) for v in value]
    return [int(value)] * n


def _swa_layers(arch: str, meta: dict, n_layer: int) -> list[bool]:
    """Which layers use sliding-window attention (llama.cpp's per-arch rules for the common ones)."""
    pat = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pat, list):
        return [bool(x) for x in pat[:n_layer]] + [False] * (n_layer - len(pat))
    if not meta.get(f"{arch}.attention.sliding_window"):
        return [False] * n_layer
    period = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5}.get(arch)
    if isinstance(pat, int) and pat > 0:
        period = pat
    if period is None:
        return [False] * n_layer
    # the last layer of every period is dense
    return [(il % period) < period - 1 for il in range(n_layer)]


def model_info(path: str | os.PathLike, header: GGUFHeader | None = None) -> ModelInfo:
    """Architecture and per-layer KV shape; ModelFileError when there is no KV cache to tune."""
    h = header or read_header(path)
    meta = h.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{h.path}: GGUF has no general.architecture")
    n_layer = meta.get(f"{arch}.block_count")
    if not isinstance(n_layer, int) or n_layer <= 0:
        raise ModelFileError(f"{h.path}: architecture {arch} has no {arch}.block_count: not a model with KV layers")
    n_embd = int(meta.get(f"{arch}.embedding_length", 0))
    n_head = _per_layer(meta.get(f"{arch}.attention.head_count", 0), n_layer, "head_count", h.path)
    n_head_kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", n_head), n_layer, "head_count_kv", h.path)
    if not any(n_head_kv):
        raise ModelFileError(f"{h.path}: architecture {arch} has no attention layers with a KV cache")
    hmax = max(n_head)
    default_head = n_embd // hmax if hmax else 0
    head_k = [int(meta.get(f"{arch}.attention.key_length", default_head))] * n_layer
    head_v = [int(meta.get(f"{arch}.attention.value_length", default_head))] * n_layer
    if not head_k[0] or not head_v[0]:
        raise ModelFileError(f"{h.path}: cannot tell the attention head size of {arch}")
    tk, tv = meta.get(KEY_TYPE_K), meta.get(KEY_TYPE_V)
    return ModelInfo(
        path=h.path, arch=arch, name=str(meta.get("general.name", h.path.stem)), n_layer=n_layer,
        n_head=n_head, n_head_kv=n_head_kv, head_k=head_k, head_v=head_v,
        swa_layers=_swa_layers(arch, meta, n_layer),
        sliding_window=int(meta.get(f"{arch}.attention.sliding_window", 0) or 0),
        n_ctx_train=int(meta.get(f"{arch}.context_length", 0)),
        type_k=list(tk) if isinstance(tk, list) else None,
        type_v=list(tv) if isinstance(tv, list) else None,
        metadata=meta,
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
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise ModelFileError(f"{folder}: output folder is not writable ({e.strerror})") from None
    tmp = Path(tmp_name)
    try:
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
