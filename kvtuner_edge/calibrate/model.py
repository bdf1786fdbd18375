"""A GGUF model in torch, computing attention the way the deployed llama.cpp engine does.

The weights are the GGUF's own, held in their quantised form and dequantised just in time by
calibrate.dequant (bit-exact with gguf-py's numpy dequantisers; as many layers as a memory limit
allows stay dequantised), so calibration runs the model the user deploys, not the original
checkpoint. The forward pass follows llama.cpp's
graphs (src/models/llama.cpp, qwen2.cpp, qwen3.cpp, gemma3.cpp at the pinned commit): RMS norms,
rope of the engine's kind (NORM for llama, NEOX for the others), Gemma-3's sliding-window layers
and its second rope base, tied output.

What a cache type does to a layer, per backend (see attend()):
  - the Hadamard rotation llama.cpp applies to Q/K (block = largest power of two >= 64 dividing the
    head size) when the layer's K is quantised, and to V and the attention output (block 64) when V is;
  - storage: K and V go through the type's own quantise/dequantise (calibrate.quant, bit-exact
    with ggml's CPU set_rows);
  - the flash-attention path. CPU: with at least CPU_FA_TILE_Q query rows every layer takes the tiled
    kernel, f32 throughout (a quantized or mixed cache's rows dequantized to f32 first, patch 0012,
    while they fit its scratch: CPU_FA_KV_F32_SCRATCH_MAX); fewer rows (decode) take the one-row
    kernel, which converts Q to K's vec_dot type (q8_0/q8_1, or f16) before the dot product.
    CUDA (prefill, the MMA/tile kernels): K and V are converted to f16 and Q to f16, accumulation
    in f32.
  - optionally (act_quant=True) the 8-bit quantisation of activations that llama.cpp's CPU matmuls
    apply before multiplying with quantised weights. This makes the model reproduce the engine's
    numerical floor (any change of the cache re-rolls the rounding of every later activation),
    which is what the engine measures; without it the torch model gives the clean signal.
Not modelled (measured to matter little, see docs/DESIGN.md): the f16 accumulator of the CPU
one-row kernel when V is f16 and K is quantised, fp16 rounding of q8_1 sums inside weight matmuls.
"""
from __future__ import annotations

import math
import mmap
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import gguf_io
from .. import types as T
from ..errors import KVTunerError
from . import dequant as DQ
from . import quant as Q

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
_NEOX = {"qwen2", "qwen3", "gemma3"}
CPU_FA_TILE_Q = 64   # GGML_FA_TILE_Q: the CPU tiled kernel needs at least this many query rows
CPU_FA_KV_F32_SCRATCH_MAX = 512 << 20   # patch 0012: a quantized cache's f32 rows at most this large


class CalibrationError(KVTunerError):
    pass


def _hadamard(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix, as llama.cpp's ggml_gen_hadamard builds it (symmetric, H @ H = I)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def k_rot_size(head_k: int) -> int:
    n = 64
    while head_k % (n * 2) == 0:
        n *= 2
    return n


def _rotate(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    n = h.shape[0]
    return (x.reshape(*x.shape[:-1], x.shape[-1] // n, n) @ h).reshape(x.shape)


ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
OUTPUT_CHUNK = 64 << 20        # bytes of float32 output rows dequantised per step when the output is not resident
MIN_MARGIN = 1 << 30           # the default limit leaves this much (or 10%) of what is free
CUDA_OUTSIDE_CAP = 2 << 30     # the most an explicit CUDA limit sets aside for memory outside torch's allocator
KLD_ROWS = 32                  # positions per step of kld()


@dataclass
class LayerWeights:
    """A layer's small tensors (dequantised once) and the names and GGUF types of its matrices
    (held quantised, dequantised when used: TorchModel.weight)."""
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    names: dict            # tensor role -> GGUF tensor name of the matrix
    types: dict            # tensor role -> ggml type id of the file (for the activation quantisation)
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None


def _dequantize(mm: np.memmap, base: int, t: gguf_io.TensorInfo) -> np.ndarray:
    """gguf-py's numpy dequantisation (the reference path, weights="gguf-py")."""
    from gguf import GGMLQuantizationType, quants

    raw = np.asarray(mm[base + t.offset: base + t.offset + t.nbytes])
    qt = GGMLQuantizationType(t.ggml_type)
    shape = tuple(reversed(t.shape))           # numpy order: rows first
    if qt == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape)
    if qt == GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    out = quants.dequantize(raw.reshape(rows, -1), qt)
    return np.asarray(out, dtype=np.float32).reshape(shape)


def parse_memory(text) -> int:
    """'8GiB', '512MiB', '8e9', an int -> bytes (positive), or a CalibrationError naming the value."""
    from ..bench import parse_size

    try:
        n = parse_size(text)
    except KVTunerError:
        n = None
    except (OverflowError, ValueError):
        n = None
    if n is None or n <= 0:
        raise CalibrationError(f"--max-memory: cannot read {text!r} as a positive size (examples: 8GiB, 512MiB)")
    return n


def available_memory(device: torch.device) -> int:
    """Bytes free for calibration on `device`: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:       # other Unix systems: free physical pages (an underestimate: the page cache is not counted)
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def cuda_expandable_segments() -> bool:
    """Ask torch's CUDA caching allocator for expandable segments (unless the user configured it through
    PYTORCH_CUDA_ALLOC_CONF): freed blocks of a growing segment are reused instead of new fixed-size
    segments piling up, so what the process reserves stays close to what it allocates. Measured on an
    H200 (8B shape, --max-memory 8GiB): without it 6.59 GiB allocated but 8.83 GiB reserved, with it
    5.56 / 6.32 GiB (docs/results/2026-12-02-gpu-calib-memory/run2/). True where it is in effect."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if "expandable_segments" in conf:
        return "expandable_segments:true" in conf.replace(" ", "").lower()
    import warnings
    fn = getattr(torch._C, "_accelerator_setAllocatorSettings", None)    # newer torch's name for the call below
    if fn is not None:
        try:
            fn("expandable_segments:True")
            return True
        except RuntimeError:
            pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):      # an older torch, or a platform without it
        return False
    return True


def cuda_outside_torch(device: torch.device) -> int:
    """Bytes of the device in use but not in torch's allocator: the CUDA context, cuBLAS and, on a
    shared GPU, other processes (nvidia-smi counts the first two for this process). Capped at
    CUDA_OUTSIDE_CAP, so that another process's memory does not take the whole limit."""
    free, total = torch.cuda.mem_get_info(device)
    used = int(total - free) - int(torch.cuda.memory_reserved(device))
    return min(max(used, 0), CUDA_OUTSIDE_CAP)


def default_max_memory(device: torch.device) -> int:
    """What the device has free, less a safety margin (10%, at least 1 GiB)."""
    free = available_memory(device)
    return max(free - max(MIN_MARGIN, free // 10), 0)


def _fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class _Matrix:
    name: str
    ggml_type: int
    shape: tuple          # numpy order (rows, cols)
    raw: torch.Tensor     # the GGUF bytes, uint8, flat: on the device or in host memory (mapped file)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.numel

    @property
    def raw_bytes(self) -> int:
        return self.raw.numel()


class TorchModel:
    """model = TorchModel(path, device="cpu"); h = model.embed(tokens); for il: h = model.layer(il, h, "f16", "f16").

    Weights stay in their GGUF form (raw blocks in a torch tensor: on the device, or in host memory
    when even they do not fit there) and are dequantised to float32 with calibrate.dequant, which
    is bit-exact with gguf-py's dequantisers. As many layers (and the output matrix) as
    `max_memory` allows stay dequantised for the whole run: the output first, then the layers from
    the last one down (the profile's final-KLD stage runs the later layers most often); the others
    are dequantised when used, into a small cache of the matrices used last (one layer's worth).
    With everything resident this is the old all-fp32 model at no cost in speed.

    max_memory: bytes (or "8GiB") for the weights and the activations of a calibration with
    `workload` = (tokens, configurations per batch, scored positions); default: what the device
    has free less a margin (default_max_memory). weights="gguf-py": the reference path (gguf-py's
    numpy dequantisers, everything float32 up front, no limit), for comparisons."""

    def __init__(self, path, device: str | torch.device = "cpu", backend: str = "cpu",
                 act_quant: bool = False, progress=None, max_memory=None,
                 workload: tuple[int, int, int] = (512, 10, 256), weights: str = "torch"):
        self.path = Path(path)
        self.info = gguf_io.model_info(self.path)
        hdr = gguf_io.read_header(self.path)
        self.arch = self.info.arch
        if self.arch not in SUPPORTED_ARCHS:
            raise CalibrationError(f"{self.path.name}: calibration supports the {', '.join(SUPPORTED_ARCHS)} "
                                   f"architectures; this model is {self.arch!r}")
        if backend not in ("cpu", "cuda"):
            raise CalibrationError(f"backend must be cpu or cuda (the engine paths modelled), got {backend!r}")
        if weights not in ("torch", "gguf-py"):
            raise CalibrationError(f"weights must be torch or gguf-py, got {weights!r}")
        self.device = torch.device(device)
        self.backend = backend
        self.act_quant = act_quant
        m = hdr.metadata
        a = self.arch
        self.n_layer = self.info.n_layer
        self.n_embd = int(m[f"{a}.embedding_length"])
        self.n_head = self.info.n_head
        self.n_head_kv = self.info.n_head_kv
        self.head_k = self.info.head_k
        self.head_v = self.info.head_v
        self.eps = float(m.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6))
        self.rope_base = float(m.get(f"{a}.rope.freq_base", 10000.0))
        self.rope_base_swa = float(m.get(f"{a}.rope.freq_base_swa", 10000.0))
        self.n_rot = int(m.get(f"{a}.rope.dimension_count", self.head_k[0]))
        self.swa = self.info.swa_layers
        self.n_swa = self.info.sliding_window
        scaling = m.get(f"{a}.rope.scaling.type")
        if scaling not in (None, "none", "linear") or float(m.get(f"{a}.rope.scaling.factor", 1.0) or 1.0) != 1.0:
            raise CalibrationError(f"{self.path.name}: rope scaling {scaling!r} is not modelled by the calibration")

        by_name = {t.name: t for t in hdr.tensors}
        # a copy-on-write mapping of the file: writable for torch.from_numpy, never written, nothing copied
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        mm = np.frombuffer(self._mmap, dtype=np.uint8)
        self._data_offset = hdr.data_offset
        self._offsets = {t.name: (hdr.data_offset + t.offset, t.nbytes) for t in hdr.tensors}
        self._weights_mode = weights
        total = len(by_name)
        done = [0]

        def step():
            done[0] += 1
            if progress:
                progress(done[0], total)

        def info_of(name, required=True):
            t = by_name.get(name)
            if t is None and required:
                raise CalibrationError(f"{self.path.name}: tensor {name} is missing")
            return t

        def small(name, required=True):
            """A norm or bias: float32 on the device now (it is small)."""
            t = info_of(name, required)
            if t is None:
                return None
            if weights == "gguf-py":
                arr = _dequantize(mm, hdr.data_offset, t)
                arr = np.array(arr, dtype=np.float32, order="C")
                out = torch.from_numpy(arr).to(self.device)
            else:
                raw = torch.from_numpy(mm[hdr.data_offset + t.offset: hdr.data_offset + t.offset + t.nbytes])
                out = DQ.dequantize(raw, t.ggml_type, tuple(reversed(t.shape)), device=self.device, name=name).clone()
            step()
            return out

        self._matrices: dict[str, _Matrix] = {}

        def matrix(name, required=True):
            t = info_of(name, required)
            if t is None:
                return None
            shape = tuple(reversed(t.shape))
            if len(shape) != 2:
                raise CalibrationError(f"{self.path.name}: tensor {name} has shape {list(t.shape)}, expected a matrix")
            if weights == "torch":
                DQ.row_bytes(t.ggml_type, shape[-1], name)      # a type we cannot decode is named here
            raw = torch.from_numpy(mm[hdr.data_offset + t.offset: hdr.data_offset + t.offset + t.nbytes])
            self._matrices[name] = _Matrix(name, t.ggml_type, shape, raw)
            return name

        def tid(name):
            t = by_name.get(name)
            return t.ggml_type if t is not None else None

        self.out_norm = small("output_norm.weight")
        self._embd_name = matrix("token_embd.weight")
        self._out_name = matrix("output.weight", required=False) or self._embd_name
        self.output_type = tid(self._out_name)
        self.layers: list[LayerWeights] = []
        for il in range(self.n_layer):
            p = f"blk.{il}."
            lw = LayerWeights(
                attn_norm=small(p + "attn_norm.weight"), ffn_norm=small(p + "ffn_norm.weight"),
                names={r: matrix(p + r + ".weight") for r in ROLES},
                types={r: tid(p + r + ".weight") for r in ROLES},
                bq=small(p + "attn_q.bias", False), bk=small(p + "attn_k.bias", False),
                bv=small(p + "attn_v.bias", False),
                q_norm=small(p + "attn_q_norm.weight", False), k_norm=small(p + "attn_k_norm.weight", False),
                post_attn_norm=small(p + "post_attention_norm.weight", False),
                post_ffn_norm=small(p + "post_ffw_norm.weight", False))
            self.layers.append(lw)
        self._small_bytes = sum(4 * x.numel() for lw in self.layers
                                for x in (lw.attn_norm, lw.ffn_norm, lw.bq, lw.bk, lw.bv, lw.q_norm, lw.k_norm,
                                          lw.post_attn_norm, lw.post_ffn_norm) if x is not None)
        self._small_bytes += 4 * self.out_norm.numel()
        self._resident: dict[str, torch.Tensor] = {}          # name -> float32, held for the whole run
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()   # name -> float32, last used first out
        self._recent_bytes = 0
        self._out_buf: torch.Tensor | None = None    # output rows being dequantised (when not resident)
        self.stats = {"dequantised": 0, "dequantised_bytes": 0, "dequant_seconds": 0.0}
        if weights == "gguf-py":
            for name, w in self._matrices.items():
                t = by_name[name]
                arr = _dequantize(mm, hdr.data_offset, t)
                if not arr.flags.writeable or not arr.flags.c_contiguous or arr.dtype != np.float32:
                    arr = np.array(arr, dtype=np.float32, order="C")
                self._resident[name] = torch.from_numpy(arr).to(self.device)
                step()
            self.plan = {"mode": "gguf-py", "resident_layers": list(range(self.n_layer)), "output_resident": True,
                         "raw_on": None, "limit": None, "reserve": 0, "recent_cap": 0}
        else:
            for _ in self._matrices:
                step()
            self._plan(max_memory, workload)
        self._had: dict[int, torch.Tensor] = {}
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    # weights ---------------------------------------------------------------------------------

    def activation_bytes(self, n_tok: int, batch: int, n_pos: int) -> int:
        """An upper estimate of the activations of a calibration of `n_tok` tokens, `batch`
        configurations per batched pass and `n_pos` scored positions: every layer's stored input and
        attention output and the reference log-probabilities (the profile keeps them), plus the
        larger of the widest batched layer and the logits stage (one configuration's logits, kld()'s
        float64 rows, the output rows being dequantised). It counts every tensor a step may hold at
        once; measured by hand (getrusage around an f16 pass, 10 configurations through 3 layers and
        their KLDs) on a Llama-3.2-1B shape at 512 tokens, the resident set grew by 0.75 of it.
        CUDA is counted with T x T scores (not measured here)."""
        T, B, L, D = n_tok, max(batch, 1), self.n_layer, self.n_embd
        H, Hkv = max(self.n_head), max(self.n_head_kv)
        dk, dv = max(self.head_k), max(self.head_v)
        F = max(self._matrices[lw.names["ffn_up"]].shape[0] for lw in self.layers)
        V = self._matrices[self._out_name].shape[0]
        # scores: CUDA's SDPA and the CPU's below the tiled kernel's size keep T x T of them
        scores = 3 * B * H * T * T if (self.device.type != "cpu" or T < CPU_FA_TILE_Q) else B * H * T * CPU_FA_TILE_Q
        layer = 4 * (B * T * (8 * D + 4 * H * max(dk, dv) + 8 * Hkv * max(dk, dv) + 2 * F) + scores)
        logits = 4 * n_pos * V + 8 * 5 * KLD_ROWS * V + min(4 * V * D, OUTPUT_CHUNK)
        stored = 4 * 2 * L * T * D + 8 * n_pos * V
        return int(stored + max(layer, logits))

    def _plan(self, max_memory, workload) -> None:
        """Decide where the raw bytes live and which float32 matrices stay resident (see the class doc)."""
        limit = default_max_memory(self.device) if max_memory is None else parse_memory(max_memory)
        outside = 0
        if max_memory is not None and self.device.type == "cuda":
            # an explicit limit is the process's GPU memory (what nvidia-smi shows): torch's share is what
            # the CUDA context and libraries leave of it (the default is measured after them already)
            torch.cuda.init()
            torch.empty(1, device=self.device)          # the context and the allocator exist from here on
            outside = cuda_outside_torch(self.device)
            limit = max(limit - outside, 0)
        reserve = self.activation_bytes(*workload)
        layer_names = [list(lw.names.values()) for lw in self.layers]
        layer_bytes = [sum(self._matrices[n].fp32_bytes for n in names) for names in layer_names]
        biggest = max(w.fp32_bytes for names in layer_names for w in (self._matrices[n] for n in names))
        out = self._matrices[self._out_name]
        chunk = min(out.fp32_bytes, OUTPUT_CHUNK)
        raw_all = sum(w.raw_bytes for w in self._matrices.values())
        fixed = reserve + self._small_bytes
        minimum = fixed + biggest + chunk
        raw_on = "device"
        if self.device.type != "cpu" and raw_all + minimum > limit:
            raw_on = "host"          # the device cannot hold even the quantised weights: keep them in host memory
        dev_raw = raw_all if raw_on == "device" else 0
        if dev_raw + minimum > limit:
            raise CalibrationError(
                f"{self.path.name}: --max-memory {_fmt(limit + outside)} is below what calibration needs here "
                f"({_fmt(dev_raw + minimum + outside)}: quantised weights {_fmt(dev_raw)}, the largest matrix in "
                f"float32 {_fmt(biggest)}, output rows {_fmt(chunk)}, activations about {_fmt(reserve)}"
                + (f", CUDA context and libraries {_fmt(outside)}" if outside else "") + ")")
        avail = limit - fixed - dev_raw
        resident_layers: list[int] = []
        out_resident = False
        if sum(layer_bytes) + out.fp32_bytes <= avail:
            resident_layers, out_resident, cap = list(range(self.n_layer)), True, 0
        else:
            cap = max(biggest, min(max(layer_bytes), avail - chunk))
            avail -= cap
            if out.fp32_bytes <= avail:
                out_resident = True
                avail -= out.fp32_bytes
            else:
                avail -= chunk
            for il in reversed(range(self.n_layer)):
                if layer_bytes[il] <= avail:
                    resident_layers.append(il)
                    avail -= layer_bytes[il]
            resident_layers.sort()
        if raw_on == "device" and self.device.type != "cpu":
            for w in self._matrices.values():
                w.raw = w.raw.to(self.device)
            self._release(list(self._matrices))          # the host copy is no longer read
        self._recent_cap = cap
        self._out_resident = out_resident
        keep = [n for il in resident_layers for n in layer_names[il]] + ([self._out_name] if out_resident else [])
        for n in keep:
            self._resident[n] = self._dequant(self._matrices[n])
            if self.device.type == "cpu":
                self._release([n])          # its bytes in the mapping are not read again (nor held twice)
        self.stats = {"dequantised": 0, "dequantised_bytes": 0, "dequant_seconds": 0.0}
        self.plan = {"mode": "torch", "limit": limit, "outside_torch": outside, "reserve": reserve, "raw_on": raw_on, "raw_bytes": raw_all,
                     "resident_layers": resident_layers, "output_resident": out_resident, "recent_cap": cap,
                     "resident_bytes": sum(t.numel() * 4 for t in self._resident.values()),
                     "fp32_bytes": sum(layer_bytes) + out.fp32_bytes, "layer_bytes": max(layer_bytes),
                     "output_bytes": out.fp32_bytes,
                     "minimum": dev_raw + minimum + outside,
                     "everything": dev_raw + fixed + sum(layer_bytes) + out.fp32_bytes + outside}

    def _release(self, names) -> None:
        """Drop the mapped file pages of these tensors from this process (they are read again from the
        file, or the page cache, should they ever be used)."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is None:
            return
        page = mmap.PAGESIZE
        for name in names:
            off, n = self._offsets[name]
            start, end = -(-off // page) * page, (off + n) // page * page
            if end > start:
                try:
                    self._mmap.madvise(advice, start, end - start)
                except (OSError, ValueError):
                    return

    def memory_summary(self) -> str:
        p = self.plan
        if p["mode"] == "gguf-py":
            return f"weights: all {self.n_layer} layers float32 (gguf-py dequantisers, no memory limit)"
        n = len(p["resident_layers"])
        where = self.device.type if p["raw_on"] == "device" else "host memory"
        s = (f"weights: {n}/{self.n_layer} layers resident in float32"
             + ("" if p["output_resident"] else ", the output matrix in chunks")
             + (", the rest dequantised per use" if n < self.n_layer else "")
             + f"; quantised weights {_fmt(p['raw_bytes'])} in {where}; limit {_fmt(p['limit'] + p.get('outside_torch', 0))} "
               f"(activations about {_fmt(p['reserve'])}"
             + (f"; {_fmt(p['outside_torch'])} of the device's limit outside torch: CUDA context, libraries"
                if p.get("outside_torch") else "") + ")")
        return s

    def _dequant(self, w: _Matrix, out: torch.Tensor | None = None) -> torch.Tensor:
        t0 = time.perf_counter()
        out = DQ.dequantize(w.raw, w.ggml_type, w.shape, device=self.device, name=w.name, out=out)
        self.stats["dequantised"] += 1
        self.stats["dequantised_bytes"] += w.fp32_bytes
        self.stats["dequant_seconds"] += time.perf_counter() - t0
        return out

    def weight(self, name: str) -> torch.Tensor:
        """The float32 matrix `name`: resident, recently used, or dequantised now."""
        t = self._resident.get(name)
        if t is not None:
            return t
        t = self._recent.get(name)
        if t is not None:
            self._recent.move_to_end(name)
            return t
        w = self._matrices[name]
        # make room first; an evicted matrix of the same shape that nothing else holds becomes the
        # output (fresh pages cost the CPU more than decoding into them)
        reuse = None
        while self._recent and self._recent_bytes + w.fp32_bytes > self._recent_cap:
            _, old = self._recent.popitem(last=False)
            self._recent_bytes -= 4 * old.numel()
            if reuse is None and old.shape == w.shape and sys.getrefcount(old) <= 2:
                reuse = old
            del old
        t = self._dequant(w, out=reuse)
        self._recent[name] = t
        self._recent_bytes += w.fp32_bytes
        return t

    def _lw(self, il: int, role: str) -> torch.Tensor:
        return self.weight(self.layers[il].names[role])

    def _rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of matrix `name` in float32 (the embedding lookup without dequantising the whole table)."""
        t = self._resident.get(name)
        if t is not None:
            return t[ids]
        w = self._matrices[name]
        uniq, inv = torch.unique(ids, return_inverse=True)
        rb = DQ.row_bytes(w.ggml_type, w.shape[1], name)
        raw = w.raw.view(w.shape[0], rb)[uniq.to(w.raw.device)]
        rows = DQ.dequantize(raw.reshape(-1), w.ggml_type, (len(uniq), w.shape[1]), device=self.device, name=name)
        return rows[inv.to(self.device)]

    # building blocks -------------------------------------------------------------------------

    def _act(self, x: torch.Tensor, wtype: int | None) -> torch.Tensor:
        """x as the engine's CPU matmul with a `wtype` weight sees it (act_quant: rounded to its vec_dot type)."""
        if self.act_quant and wtype is not None:
            vdt = Q.weight_vec_dot_type(wtype)
            if vdt is not None and x.shape[-1] % (256 if vdt == "q8_K" else 32 if vdt.startswith("q") else 1) == 0:
                x = Q.fake_quant_act(x, vdt)
        return x

    def _mm(self, x: torch.Tensor, w: torch.Tensor, wtype: int | None, b: torch.Tensor | None = None):
        x = self._act(x, wtype)
        y = x @ w.T
        return y if b is None else y + b

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * w

    def _rope_cs(self, n_tok: int, base: float):
        key = (n_tok, base)
        if key not in self._rope:
            half = self.n_rot // 2
            inv = base ** (-torch.arange(0, half, dtype=torch.float64) * 2 / self.n_rot)
            ang = torch.arange(n_tok, dtype=torch.float64)[:, None] * inv[None, :]
            self._rope[key] = (ang.cos().float().to(self.device), ang.sin().float().to(self.device))
        return self._rope[key]

    def _apply_rope(self, x: torch.Tensor, base: float) -> torch.Tensor:
        """x [..., T, H, D] rotated as ggml_rope_ext (NORM: adjacent pairs; NEOX: halves)."""
        n_tok = x.shape[-3]
        cos, sin = self._rope_cs(n_tok, base)
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        r = x[..., : self.n_rot]
        if self.arch in _NEOX:
            a, b = r[..., : self.n_rot // 2], r[..., self.n_rot // 2:]
            out = torch.cat([a * cos - b * sin, a * sin + b * cos], -1)
        else:
            a, b = r[..., 0::2], r[..., 1::2]
            out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)
        return torch.cat([out, x[..., self.n_rot:]], -1) if self.n_rot < x.shape[-1] else out

    def hadamard(self, n: int) -> torch.Tensor:
        if n not in self._had:
            self._had[n] = _hadamard(n, self.device)
        return self._had[n]

    def mask(self, il: int, n_tok: int) -> torch.Tensor:
        """[T, T] True where query i may attend key j: causal, and within the window on SWA layers."""
        key = (bool(self.swa[il]), n_tok)
        if key not in self._masks:
            i = torch.arange(n_tok, device=self.device)
            allowed = i[None, :] <= i[:, None]
            if self.swa[il]:
                allowed &= (i[:, None] - i[None, :]) < self.n_swa
            self._masks[key] = allowed
        return self._masks[key]

    # the model -------------------------------------------------------------------------------

    def embed(self, tokens: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)
        h = self._rows(self._embd_name, ids)
        if self.arch == "gemma3":
            h = h * math.sqrt(self.n_embd)
        return h

    def qkv(self, il: int, h: torch.Tensor):
        """(q [.., H, T, Dk] scaled, k [.., Hkv, T, Dk], v [.., Hkv, T, Dv]) of layer il for hidden states h [.., T, D]."""
        lw = self.layers[il]
        x = self._norm(h, lw.attn_norm)
        n_tok = h.shape[-2]
        q = self._mm(x, self._lw(il, "attn_q"), lw.types["attn_q"], lw.bq).unflatten(-1, (self.n_head[il], self.head_k[il]))
        k = self._mm(x, self._lw(il, "attn_k"), lw.types["attn_k"], lw.bk).unflatten(-1, (self.n_head_kv[il], self.head_k[il]))
        v = self._mm(x, self._lw(il, "attn_v"), lw.types["attn_v"], lw.bv).unflatten(-1, (self.n_head_kv[il], self.head_v[il]))
        if lw.q_norm is not None:
            q = self._norm(q, lw.q_norm)
            k = self._norm(k, lw.k_norm)
        base = self.rope_base_swa if (self.arch == "gemma3" and self.swa[il]) else self.rope_base
        q = self._apply_rope(q, base)
        k = self._apply_rope(k, base)
        scale = 1.0 / math.sqrt(self.head_k[il])
        if self.arch == "gemma3":
            q = q * scale       # gemma3 scales Q itself and attends with scale 1
            scale = 1.0
        del n_tok
        return (q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), scale)

    def attend(self, il: int, q, k, v, scale: float, type_k: str, type_v: str) -> torch.Tensor:
        """Attention output [.., T, H*Dv] (before the output projection) with layer il's cache in (type_k, type_v)."""
        tk, tv = T.get(type_k), T.get(type_v)
        rot_k = tk.quantized and self.head_k[il] % 64 == 0
        rot_v = tv.quantized and self.head_v[il] % 64 == 0
        if rot_k:
            hk = self.hadamard(k_rot_size(self.head_k[il]))
            q, k = _rotate(q, hk), _rotate(k, hk)
        if rot_v:
            v = _rotate(v, self.hadamard(64))
        kc = Q.fake_quant(k, tk.name) if tk.name != "f32" else k
        vc = Q.fake_quant(v, tv.name) if tv.name != "f32" else v
        n_tok = q.shape[-2]
        extra = None
        if self.backend == "cpu":
            plain = tk.name == tv.name and tk.name in ("f16", "f32")
            scratch = 4 * (math.prod(kc.shape[-3:]) + math.prod(vc.shape[-3:])) + 128   # one sequence's rows
            tiled = n_tok >= CPU_FA_TILE_Q and (plain or scratch <= CPU_FA_KV_F32_SCRATCH_MAX)
            if not tiled:
                vdt = Q.VEC_DOT_TYPE[tk.name]
                if vdt == "q8_1":
                    m_k = Q.stored_min(k, tk.name)                                   # the K blocks' stored minimum
                    err = Q.q8_1_sum_error(q)
                    extra = (err, m_k)
                if vdt != "f32":
                    q = Q.fake_quant_act(q, vdt)
        else:   # cuda prefill: K/V converted to f16, Q to f16
            q = q.half().float()
            kc = kc.half().float()
            vc = vc.half().float()
        rep = q.shape[-3] // kc.shape[-3]
        mask = self.mask(il, n_tok)
        if extra is not None:
            # q4_1/q5_1 x q8_1 dot products use q8_1's fp16-rounded block sum: an additive score term
            err, m_k = extra
            add = (err @ m_k.repeat_interleave(rep, dim=-3).transpose(-1, -2) if rep > 1
                   else err @ m_k.transpose(-1, -2)) * scale
            mask = add.masked_fill(~mask, float("-inf"))
        # f32 attention of the (converted) operands, torch's fused kernel
        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale, enable_gqa=rep > 1)
        if rot_v:
            o = _rotate(o, self.hadamard(64))
        return o.transpose(-3, -2).flatten(-2)

    def attn_out(self, il: int, o: torch.Tensor) -> torch.Tensor:
        lw = self.layers[il]
        return self._mm(o, self._lw(il, "attn_output"), lw.types["attn_output"])

    def finish_layer(self, il: int, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual stream after layer il, given its projected attention output a."""
        lw = self.layers[il]
        if lw.post_attn_norm is not None:
            a = self._norm(a, lw.post_attn_norm)
        h = h + a
        x = self._norm(h, lw.ffn_norm)
        g = self._mm(x, self._lw(il, "ffn_gate"), lw.types["ffn_gate"])
        u = self._mm(x, self._lw(il, "ffn_up"), lw.types["ffn_up"])
        # in place (the same values): two tensors of the FFN's width alive, not four
        act = torch.ops.aten.gelu_(g, approximate="tanh") if self.arch == "gemma3" else F.silu(g, inplace=True)
        act.mul_(u)
        del u
        f = self._mm(act, self._lw(il, "ffn_down"), lw.types["ffn_down"])
        if lw.post_ffn_norm is not None:
            f = self._norm(f, lw.post_ffn_norm)
        return h + f

    def layer(self, il: int, h: torch.Tensor, type_k: str = "f16", type_v: str = "f16") -> torch.Tensor:
        q, k, v, scale = self.qkv(il, h)
        return self.finish_layer(il, h, self.attn_out(il, self.attend(il, q, k, v, scale, type_k, type_v)))

    def logits(self, h: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is not None:
            h = h[..., positions, :]
        x = self._norm(h, self.out_norm)
        if self._out_name in self._resident:
            return self._mm(x, self._resident[self._out_name], self.output_type)
        # the output matrix in chunks of rows (vocabulary entries), each dequantised when used
        x = self._act(x, self.output_type)
        w = self._matrices[self._out_name]
        rb = DQ.row_bytes(w.ggml_type, w.shape[1], w.name)
        step = max(1, OUTPUT_CHUNK // (4 * w.shape[1]))
        y = x.new_empty((*x.shape[:-1], w.shape[0]))
        rows = w.raw.view(w.shape[0], rb)
        if self._out_buf is None:
            self._out_buf = torch.empty((min(step, w.shape[0]), w.shape[1]), device=self.device)
        for r0 in range(0, w.shape[0], step):
            r1 = min(r0 + step, w.shape[0])
            t0 = time.perf_counter()
            wc = DQ.dequantize(rows[r0:r1].reshape(-1), w.ggml_type, (r1 - r0, w.shape[1]), device=self.device,
                               name=w.name, out=self._out_buf[: r1 - r0])
            self.stats["dequant_seconds"] += time.perf_counter() - t0
            self.stats["dequantised_bytes"] += wc.numel() * 4
            y[..., r0:r1] = x @ wc.T
        self.stats["dequantised"] += 1
        return y

    def hidden_many(self, tokens: Sequence[int], configs: Sequence[tuple[Sequence[str], Sequence[str]]]) -> torch.Tensor:
        """Final hidden states [B, T, D] of several per-layer configurations ((type_k list, type_v list)
        each) in one batched pass; logits(h[b], positions) gives each one's logits."""
        h = self.embed(tokens).expand(len(configs), -1, -1)
        for il in range(self.n_layer):
            q, k, v, scale = self.qkv(il, h)
            by_pair: dict[tuple[str, str], list[int]] = {}
            for b, (tk, tv) in enumerate(configs):
                by_pair.setdefault((tk[il], tv[il]), []).append(b)
            o = None
            for (tk, tv), idx in by_pair.items():
                sel = torch.as_tensor(idx, device=self.device)
                ob = self.attend(il, q[sel], k[sel], v[sel], scale, tk, tv)
                if o is None:
                    o = ob.new_empty((len(configs), *ob.shape[1:]))
                o[sel] = ob
            h = self.finish_layer(il, h, self.attn_out(il, o))
        return h

    def forward(self, tokens: Sequence[int], config=None, positions=None) -> torch.Tensor:
        """Logits [T or len(positions), vocab] with a per-layer CacheConfig (None: f16 everywhere)."""
        h = self.embed(tokens)
        for il in range(self.n_layer):
            tk, tv = (config.type_k[il], config.type_v[il]) if config is not None else ("f16", "f16")
            h = self.layer(il, h, tk, tv)
        return self.logits(h, positions)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def kld_many(model: TorchModel, tokens: Sequence[int], configs, ref_logp: torch.Tensor,
             positions: torch.Tensor) -> list[float]:
    """Mean KL(ref || config) over `positions` for each configuration."""
    h = model.hidden_many(tokens, configs)
    return [float(kld(ref_logp, model.logits(h[b], positions)).mean()) for b in range(len(configs))]


def kld(ref_logp: torch.Tensor, logits: torch.Tensor, rows: int = KLD_ROWS) -> torch.Tensor:
    """KL(ref || test) per position; ref given as log-probabilities (float64). Computed `rows`
    positions at a time (at least two: torch's CPU sum of a lone row splits it over threads):
    every position is its own row reduction, so on the CPU the chunks give the numbers of one
    whole-tensor pass bit for bit (tests/test_calib_memory.py; on CUDA to float64 rounding), with
    float64 temporaries of `rows` x vocabulary instead of
    positions x vocabulary (1.2 GB for 256 positions of a 128k vocabulary)."""
    if logits.dim() != 2 or logits.shape[0] <= rows:
        lq = torch.log_softmax(logits.double(), dim=-1)
        return (ref_logp.exp() * (ref_logp - lq)).sum(-1).clamp_min(0.0)
    n = logits.shape[0]
    bounds = list(range(0, n, max(rows, 2))) + [n]
    if bounds[-1] - bounds[-2] == 1:
        del bounds[-2]          # torch reduces a lone row another way (split over threads): never one alone
    out = torch.empty(n, dtype=torch.float64, device=logits.device)
    for i, j in zip(bounds, bounds[1:]):
        r, lq = ref_logp[i:j], torch.log_softmax(logits[i:j].double(), dim=-1)
        out[i:j] = (r.exp() * (r - lq)).sum(-1).clamp_min(0.0)
    return out
