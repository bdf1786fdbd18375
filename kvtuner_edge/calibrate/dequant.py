"""GGUF weight dequantisation in torch, on the raw block bytes, on any device.

    w = dequantize(raw, ggml_type, (rows, cols))           # raw: torch uint8 tensor, CPU or CUDA

Bit-exact with gguf-py's numpy dequantisers (`gguf.quants.dequantize`, tests/test_dequant.py): the
same block layouts, the same float32 operations in the same order (one rounding per product or sum,
as numpy does them; no fused multiply-adds: every product and sum is its own torch kernel), so a
model calibrated from these weights computes what the gguf-py path computed. Vectorised over
blocks; a matrix is decoded in chunks of rows into one preallocated output, so the transient
memory stays at a few MiB (CPU) or tens of MiB (GPU) over the output whatever the matrix size. When `device`
differs from the raw bytes' device, each chunk is copied there first (host-resident weights
dequantised on the GPU).

Types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS
(what real GGUFs use for the matrices a calibration needs).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import KVTunerError

QK_K = 256
# output values decoded per step: on the CPU small enough that the intermediates come from the heap
# and the caches (fresh pages cost more than the decoding), on a GPU large enough to amortise launches
CHUNK_ELEMS = {"cpu": 1 << 20, "cuda": 1 << 22}

# ggml type ids (ggml.h)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
IQ4_NL, BF16, IQ4_XS = 20, 30, 23

NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
         Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K",
         IQ4_NL: "IQ4_NL", IQ4_XS: "IQ4_XS"}

# (values per block, bytes per block)
LAYOUT = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22),
          Q5_1: (32, 24), Q8_0: (32, 34), Q2_K: (QK_K, 84), Q3_K: (QK_K, 110), Q4_K: (QK_K, 144),
          Q5_K: (QK_K, 176), Q6_K: (QK_K, 210), IQ4_NL: (32, 18), IQ4_XS: (QK_K, 136)}

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class DequantError(KVTunerError):
    pass


def type_name(ggml_type: int) -> str:
    if ggml_type in NAMES:
        return NAMES[ggml_type]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


def supported(ggml_type: int) -> bool:
    return ggml_type in LAYOUT


def row_bytes(ggml_type: int, cols: int, name: str = "tensor") -> int:
    """Bytes of one row of `cols` values; refuses a type we cannot decode or a row that is not whole blocks."""
    if ggml_type not in LAYOUT:
        raise DequantError(f"{name}: weight type {type_name(ggml_type)} cannot be dequantised for calibration "
                           f"(supported: {', '.join(NAMES[t] for t in LAYOUT)})")
    blk, size = LAYOUT[ggml_type]
    if cols % blk:
        raise DequantError(f"{name}: rows of {cols} values are not whole {type_name(ggml_type)} blocks of {blk}")
    return cols // blk * size


# helpers on blocks b: uint8 [n, bytes per block] ---------------------------------------------------
# Codes are unpacked with int32 operations on four bytes at a time (torch's byte kernels are slow on
# the CPU) and each decoder writes its last float32 operation into the output (no extra copy). The
# float operations and their order are gguf-py's (see the module doc).

_CONST: dict = {}


def _const(key, make) -> torch.Tensor:
    t = _CONST.get(key)
    if t is None:
        t = _CONST[key] = make()
    return t


def _shifts(values, device, shape) -> torch.Tensor:
    return _const(("shifts", tuple(values), str(device), shape),
                  lambda: torch.tensor(list(values), dtype=torch.int32, device=device).view(shape))


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The little-endian fp16 at byte `off` of each block, as float32 [n, 1] (exact)."""
    return b[:, off:off + 2].contiguous().view(torch.float16).float()


def _words(x: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 4k] -> int32 [n, k] (a copy when the slice is not dense and aligned)."""
    if not (x.is_contiguous() and x.stride(0) == x.shape[1] and x.storage_offset() % 4 == 0):
        x = x.clone(memory_format=torch.contiguous_format)
    return x.view(torch.int32)


def _bytes(w: torch.Tensor, n: int) -> torch.Tensor:
    """int32 words -> their bytes, uint8 [n, -1] (little-endian: byte i of word j is element 4j + i)."""
    return w.view(torch.uint8).view(n, -1)


def _nibbles(qs: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """uint8 [n, groups * k] -> int32 words of [n, groups, 2, k] nibbles: per group of k bytes the
    k low nibbles, then the k high ones (ggml's order)."""
    n = qs.shape[0]
    w = _words(qs).view(n, groups, 1, -1)
    out = torch.empty((n, groups, 2, w.shape[-1]), dtype=torch.int32, device=qs.device)
    torch.bitwise_and(w, 0x0F0F0F0F, out=out[:, :, 0:1])
    torch.bitwise_right_shift(w, 4, out=out[:, :, 1:2])
    out[:, :, 1:2] &= 0x0F0F0F0F
    return out


def _fields(x: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """uint8 [n, groups * k] -> int32 words of [n, groups, 8 // width, k]: per group, field j (bits
    j*width..) of each of its k bytes, j = 0, 1, ... (ggml's 2-bit and 1-bit planes)."""
    n = x.shape[0]
    per = 8 // width
    w = _words(x).view(n, groups, 1, -1)
    mask = {1: 0x01010101, 2: 0x03030303}[width]
    out = w >> _shifts(range(0, 8, width), x.device, (1, 1, per, 1))
    return out.bitwise_and_(mask)


def _signed(w: torch.Tensor, half: int) -> torch.Tensor:
    """Words whose bytes hold codes 0 .. 2*half-1 -> words whose bytes are the int8 values code - half
    (two's complement in each byte: flip the top bit, then spread it over the higher bits)."""
    x = w ^ (0x01010101 * half)
    ext = (x & (0x01010101 * half)).mul_(256 // half - 2)
    return x.bitwise_or_(ext)


def _iq4_lookup(q: torch.Tensor) -> torch.Tensor:
    table = _const(("iq4", str(q.device)), lambda: torch.tensor(IQ4_VALUES, dtype=torch.float32, device=q.device))
    return table[q.to(torch.int32)]


def _bits_table(device) -> torch.Tensor:
    """byte -> 8 bytes, byte j = 16 * (bit j of the byte), as int64 (Q5_0/Q5_1's fifth bits)."""
    def make():
        v = torch.arange(256, dtype=torch.int64)
        t = torch.zeros(256, dtype=torch.int64)
        for j in range(8):
            t |= ((v >> j) & 1) << (8 * j + 4)
        return t.to(device)
    return _const(("bits", str(device)), make)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 4] (a little-endian 32-bit field) -> int32 words of [n, 32] bytes, byte i = 16 * bit i."""
    t = _bits_table(qh.device)
    return t[qh.to(torch.int32)].view(torch.int32).view(qh.shape[0], 8)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minimums, each [n, 8] uint8."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


# block decoders: (uint8 [n, type size], float32 out [n, block values]) -> out ---------------------

def _q4_0(b, out):
    n = b.shape[0]
    q = _bytes(_signed(_nibbles(b[:, 2:18]), 8), n).view(torch.int8).float()
    return torch.mul(_f16(b, 0), q, out=out)


def _q4_1(b, out):
    n = b.shape[0]
    q = _bytes(_nibbles(b[:, 4:20]), n).float()
    return torch.add(q.mul_(_f16(b, 0)), _f16(b, 2), out=out)


def _q5_0(b, out):
    n = b.shape[0]
    w = _nibbles(b[:, 6:22]).view(n, 8).bitwise_or_(_high_bits(b[:, 2:6]))
    q = _bytes(_signed(w, 16), n).view(torch.int8).float()
    return torch.mul(_f16(b, 0), q, out=out)


def _q5_1(b, out):
    n = b.shape[0]
    w = _nibbles(b[:, 8:24]).view(n, 8).bitwise_or_(_high_bits(b[:, 4:8]))
    q = _bytes(w, n).float()
    return torch.add(q.mul_(_f16(b, 0)), _f16(b, 2), out=out)


def _q8_0(b, out):
    return torch.mul(b[:, 2:34].view(torch.int8).float(), _f16(b, 0), out=out)


def _q2_k(b, out):
    n = b.shape[0]
    sc = b[:, 0:16]
    dl = (_f16(b, 80) * (sc & 0x0F).float()).unsqueeze(-1)              # [n, 16, 1]
    ml = (_f16(b, 82) * (sc >> 4).float()).unsqueeze(-1)
    q = _bytes(_fields(b[:, 16:80], 2, 2), n).view(n, 16, 16).float()
    return torch.sub(q.mul_(dl), ml, out=out.view(n, 16, 16))


def _q3_k(b, out):
    n = b.shape[0]
    s = b[:, 96:108]
    lo = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], dim=1)             # [n, 16]
    hi = torch.cat([(s[:, 8:12] >> k) & 0x03 for k in (0, 2, 4, 6)], dim=1)
    sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 108) * sc).unsqueeze(-1)                                  # [n, 16, 1]
    ql = _fields(b[:, 32:96], 2, 2).view(n, 64)                             # 2-bit codes
    qh = _fields(b[:, 0:32], 1, 1).view(n, 64)                              # the mask bit of each value
    # value = code - 4 where the mask bit is clear: bytes of (code + 4 * bit) - 4
    q = _bytes(_signed(ql.bitwise_or_(qh.mul_(4)), 4), n).view(torch.int8).view(n, 16, 16).float()
    return torch.mul(dl, q, out=out.view(n, 16, 16))


def _q4_k(b, out):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).unsqueeze(-1)                             # [n, 8, 1]
    dm = (_f16(b, 2) * mn.float()).unsqueeze(-1)
    q = _bytes(_nibbles(b[:, 16:144], 4), n).view(n, 8, 32).float()
    return torch.sub(q.mul_(d), dm, out=out.view(n, 8, 32))


def _q5_k(b, out):
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b, 0) * sc.float()).unsqueeze(-1)
    dm = (_f16(b, 2) * mn.float()).unsqueeze(-1)
    w = _nibbles(b[:, 48:176], 4).view(n, 64).bitwise_or_(_fields(b[:, 16:48], 1, 1).view(n, 64).mul_(16))
    q = _bytes(w, n).view(n, 8, 32).float()
    return torch.sub(q.mul_(d), dm, out=out.view(n, 8, 32))


def _q6_k(b, out):
    n = b.shape[0]
    sc = b[:, 192:208].view(torch.int8).float()
    d = (_f16(b, 208) * sc).unsqueeze(-1)                                   # [n, 16, 1]
    ql = _nibbles(b[:, 0:128], 2).view(n, 64)
    qh = _fields(b[:, 128:192], 2, 2).view(n, 64)
    q = _bytes(_signed(ql.bitwise_or_(qh.mul_(16)), 32), n).view(torch.int8).view(n, 16, 16).float()
    return torch.mul(d, q, out=out.view(n, 16, 16))


def _iq4_nl(b, out):
    n = b.shape[0]
    return torch.mul(_f16(b, 0), _iq4_lookup(_bytes(_nibbles(b[:, 2:18]), n)), out=out)


def _iq4_xs(b, out):
    n = b.shape[0]
    sh = b[:, 2].to(torch.int32) | (b[:, 3].to(torch.int32) << 8)            # little-endian uint16
    sl = b[:, 4:8]
    lo = torch.stack([sl & 0x0F, sl >> 4], dim=2).view(n, 8)
    hi = (sh.unsqueeze(1) >> _shifts(range(0, 16, 2), b.device, (1, 8))) & 3
    sc = ((lo | (hi.to(torch.uint8) << 4)).to(torch.int8) - 32).float()
    dl = (_f16(b, 0) * sc).unsqueeze(-1)                                     # [n, 8, 1]
    q = _bytes(_nibbles(b[:, 8:136], 8), n).view(n, 8, 32)
    return torch.mul(dl, _iq4_lookup(q), out=out.view(n, 8, 32))


def _f32(b, out):
    return out.copy_(b.contiguous().view(torch.float32))


def _f16_vals(b, out):
    return out.copy_(b.contiguous().view(torch.float16))


def _bf16(b, out):
    # the two bytes become the high half of a float32 (gguf-py: int16 << 16)
    n = b.shape[0]
    w = torch.zeros((n, 2), dtype=torch.int16, device=b.device)
    w[:, 1] = b.contiguous().view(torch.int16).view(n)
    return out.copy_(w.view(torch.float32))


_DECODERS: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    F32: _f32, F16: _f16_vals, BF16: _bf16, Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q8_0: _q8_0,
    Q2_K: _q2_k, Q3_K: _q3_k, Q4_K: _q4_k, Q5_K: _q5_k, Q6_K: _q6_k, IQ4_NL: _iq4_nl, IQ4_XS: _iq4_xs,
}


def dequantize(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], *, device=None,
               out: torch.Tensor | None = None, name: str = "tensor", chunk: int | None = None) -> torch.Tensor:
    """float32 tensor of `shape` (numpy order: the last dimension is a row) from its raw GGUF bytes
    (uint8, any shape, contiguous), on `device` (default: the raw bytes' device)."""
    if raw.dtype != torch.uint8:
        raise DequantError(f"{name}: raw bytes must be a uint8 tensor, got {raw.dtype}")
    shape = tuple(int(s) for s in shape)
    cols = shape[-1] if shape else 1
    numel = 1
    for s in shape:
        numel *= s
    rb = row_bytes(ggml_type, cols, name)
    rows = numel // cols if cols else 0
    if raw.numel() != rows * rb:
        raise DequantError(f"{name}: {raw.numel()} bytes of {type_name(ggml_type)} data for a {list(shape)} tensor "
                           f"({rows * rb} expected)")
    device = raw.device if device is None else torch.device(device)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    elif out.shape != torch.Size(shape) or out.dtype != torch.float32 or not out.is_contiguous():
        raise DequantError(f"{name}: output must be a contiguous float32 tensor of shape {list(shape)}")
    if numel == 0:
        return out
    blk, size = LAYOUT[ggml_type]
    blocks = raw.reshape(-1, size)
    dst = out.view(-1, blk)
    if chunk is None:
        chunk = CHUNK_ELEMS.get(device.type, CHUNK_ELEMS["cuda"])
    step = max(1, chunk // blk)
    dec = _DECODERS[ggml_type]
    for i in range(0, blocks.shape[0], step):
        b = blocks[i:i + step]
        if b.device != device:
            b = b.to(device, non_blocking=False)
        dec(b, dst[i:i + step])
    return out
