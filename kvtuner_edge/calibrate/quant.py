"""Bit-exact torch fake-quantisers for llama.cpp's CPU KV-cache and activation formats.

``fake_quant(x, t)`` returns, value for value, what ggml's CPU backend reads back after it writes the
float32 rows ``x`` into a tensor of type ``t`` and dequantises them again::

    ggml_get_type_traits(t)->to_float( ggml_get_type_traits_cpu(t)->from_float(x) )

``from_float`` is what the CPU SET_ROWS op uses to write the KV cache.  On the x86 AVX2 build
(GGML_AVX2 + FMA + F16C, no AVX512) it resolves to:

  f32     ggml_cpu_fp32_to_fp32     memcpy
  f16     ggml_cpu_fp32_to_fp16     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT): round to nearest even
  bf16    ggml_cpu_fp32_to_bf16     scalar GGML_FP32_TO_BF16: (u + 0x7fff + ((u >> 16) & 1)) >> 16
                                     (nearest even), NaN -> (u >> 16) | 0x40 (quieted, sign kept)
  q8_0    quantize_row_q8_0         x86 AVX2 SIMD version (NOT the _ref one): d = amax/127,
                                     id = 127/amax (not 1/d), q = _mm256_round_ps(x*id) (nearest EVEN,
                                     the _ref uses roundf = half away from zero), saturating packs
  q4_0    quantize_row_q4_0 -> quantize_row_q4_0_ref     (libggml-base, plain SSE2, no FMA)
  q4_1    quantize_row_q4_1 -> quantize_row_q4_1_ref
  q5_0    quantize_row_q5_0 -> quantize_row_q5_0_ref
  q5_1    quantize_row_q5_1 -> quantize_row_q5_1_ref
  iq4_nl  quantize_row_iq4_nl -> quantize_row_iq4_nl_ref -> quantize_row_iq4_nl_impl(ntry = -1,
                                     no importance weights)
  q3_kv   quantize_row_q3_kv_ref    kvtuner-edge's 3-bit format (native/ggml/ggml-kvquants.c):
                                     per 16 values the best of 15 fp16 scales by squared error
  q2_kv   quantize_row_q2_kv_ref    kvtuner-edge's 2-bit format: per 32 values the best of 16
                                     (min, scale) pairs from shrinking the range at either end

and the activation ("vec_dot_type") formats the other operand of a dot product is converted to:

  q8_0    quantize_row_q8_0 (AVX2, as above)
  q8_1    quantize_row_q8_1 (AVX2): as q8_0, plus s = fp16(d_unrounded * sum(q))
  q8_K    quantize_row_q8_K -> quantize_row_q8_K_ref (x86 has no SIMD version): float32 d = 1/iscale,
          iscale = -127/max (max = signed value of largest magnitude), nearest-even via the
          +12582912.f trick
  f16     ggml_cpu_fp32_to_fp16 (as above); bf16 / f32 as the cache types

Every step is computed in float32 in the same order as the C code (divisions by tensors, never by
Python scalars: CUDA turns ``t / 15.0`` into ``t * (1/15)``), with fp16 rounding of the stored scales
exactly where the C code stores them.  Everything is vectorised over blocks; only iq4_nl loops (32
steps, over the elements of a block) because its sums must be accumulated in the C code's order.

NaN/inf inputs are reproduced for f32/f16/bf16 (NaN payloads included); for the block formats they
are not modelled (max selection, NaN payloads).  Also not bit for bit: in iq4_nl the sign of the zeros
of a block whose max |x| < 1e-15 (the engine leaves those 4-bit indices uninitialised; we return +0).
"""
from __future__ import annotations

import torch

__all__ = [
    "CACHE_TYPES", "ACT_TYPES", "VEC_DOT_TYPE", "KVALUES_IQ4NL", "block_size",
    "fake_quant", "fake_quant_act", "q8_1_sum_error", "stored_min", "weight_vec_dot_type",
]

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl", "q3_kv", "q2_kv")
ACT_TYPES = ("q8_0", "q8_1", "q8_K", "f16", "bf16", "f32")

_BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q8_1": 32, "q5_1": 32, "q5_0": 32,
          "q4_1": 32, "q4_0": 32, "iq4_nl": 32, "q8_K": 256, "q3_kv": 32, "q2_kv": 32}

# type_traits_cpu[k].vec_dot_type (ggml-cpu.c): what Q is converted to before K.Q in flash attention
VEC_DOT_TYPE: dict[str, str] = {
    "f32": "f32", "f16": "f16", "bf16": "bf16",
    "q8_0": "q8_0", "q5_1": "q8_1", "q5_0": "q8_0", "q4_1": "q8_1", "q4_0": "q8_0",
    "iq4_nl": "q8_0", "q3_kv": "q8_0", "q2_kv": "q8_1",
}

# ggml type id -> vec_dot_type name, for every type that has a vec_dot in type_traits_cpu
# (ggml-cpu.c); F32 maps to None (the activation stays float32).
_WEIGHT_VDT: dict[int, str | None] = {
    0: None,                        # F32 (vec_dot_type F32: no conversion)
    1: "f16",                       # F16
    2: "q8_0", 3: "q8_1",           # Q4_0, Q4_1
    6: "q8_0", 7: "q8_1", 8: "q8_0",  # Q5_0, Q5_1, Q8_0
    10: "q8_K", 11: "q8_K", 12: "q8_K", 13: "q8_K", 14: "q8_K",  # Q2_K..Q6_K
    16: "q8_K", 17: "q8_K", 18: "q8_K", 19: "q8_K",  # IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S
    20: "q8_0",                     # IQ4_NL
    21: "q8_K", 22: "q8_K", 23: "q8_K",  # IQ3_S, IQ2_S, IQ4_XS
    29: "q8_K",                     # IQ1_M
    30: "bf16",                     # BF16
    34: "q8_K", 35: "q8_K",         # TQ1_0, TQ2_0
    39: "q8_0", 40: "q8_0",         # MXFP4, NVFP4
    41: "q8_0", 42: "q8_0",         # Q1_0, Q2_0
    43: "q8_0", 44: "q8_1",         # Q3_KV, Q2_KV (kvtuner-edge's cache formats)
}
_GGML_TYPE_COUNT = 45

# kvalues_iq4nl (ggml-common.h)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

_INT32_MIN = -(2 ** 31)
_GROUP_MAX_EPS = torch.tensor(1e-15, dtype=torch.float32).item()  # 1e-15f as a float32 value


def block_size(type_name: str) -> int:
    """Elements per block of a cache or activation type (the last dim must be a multiple)."""
    try:
        return _BLOCK[type_name]
    except KeyError:
        raise ValueError(f"unknown type {type_name!r}") from None


def weight_vec_dot_type(ggml_type_id: int) -> str | None:
    """The format the CPU backend converts the float32 activation to in a mul_mat with weights of
    this ggml type (type_traits_cpu[type].vec_dot_type).  None: no conversion (F32 weights), or a
    type that has no CPU vec_dot and so never is a mul_mat weight (Q8_1, Q8_K, I8..I64, F64)."""
    t = int(ggml_type_id)
    if not 0 <= t < _GGML_TYPE_COUNT:
        raise ValueError(f"not a ggml type id: {ggml_type_id}")
    return _WEIGHT_VDT.get(t)


# ----------------------------------------------------------------------------------- helpers

def _check(x: torch.Tensor, type_name: str) -> torch.Tensor:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError("x must be a floating-point torch tensor")
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    bs = block_size(type_name)
    if x.dim() == 0 or x.shape[-1] % bs:
        raise ValueError(f"last dim ({tuple(x.shape)}) must be a multiple of {bs} for {type_name}")
    return x


def _blocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // bs, bs)


def _const(v: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 0-dim tensor on like's device: dividing by it is a true IEEE division everywhere."""
    return torch.full((), v, dtype=torch.float32, device=like.device)


def _div(a, b):
    """a / b as one correctly rounded float32 division (no reciprocal-multiply shortcuts)."""
    if not torch.is_tensor(a):
        a = _const(a, b)
    if not torch.is_tensor(b):
        b = _const(b, a)
    return torch.div(a, b)


def _f16(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16 (nearest even, as F16C _cvtss_sh/_mm256_cvtps_ph and ggml's software path) -> fp32."""
    return t.to(torch.float16).to(torch.float32)


def _signed_absmax(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) per block as the C loops `if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`:
    the first element of largest magnitude, and +0.0 for an all-zero block."""
    ax = xb.abs()
    idx = ax.argmax(dim=-1, keepdim=True)          # first occurrence on ties
    amax = ax.gather(-1, idx)
    mx = xb.gather(-1, idx)
    mx = torch.where(amax == 0, torch.zeros_like(mx), mx)
    return amax, mx


def _cvt_trunc_i32(v: torch.Tensor) -> torch.Tensor:
    """cvttps2dq: truncate toward zero; NaN / out of int32 range -> INT32_MIN ('integer indefinite')."""
    ok = torch.isfinite(v) & (v.abs() < 2.0 ** 31)
    t = torch.trunc(torch.where(ok, v, torch.zeros_like(v))).to(torch.int64)
    return torch.where(ok, t, torch.full_like(t, _INT32_MIN))


def _cvt_rne_i32(v: torch.Tensor) -> torch.Tensor:
    """_mm256_round_ps(v, nearest) then _mm256_cvtps_epi32: nearest even; NaN / out of range -> INT32_MIN."""
    r = torch.round(v)                               # torch.round: half to even
    ok = torch.isfinite(r) & (r.abs() < 2.0 ** 31)
    t = torch.where(ok, r, torch.zeros_like(r)).to(torch.int64)
    return torch.where(ok, t, torch.full_like(t, _INT32_MIN))


def _low_byte_i8(i: torch.Tensor) -> torch.Tensor:
    """(int8_t) of an int32: the low byte, as a signed value."""
    b = i & 0xFF
    return b - 256 * (b >= 128).to(b.dtype)


def _unblock(y: torch.Tensor, shape) -> torch.Tensor:
    return y.reshape(shape)


# ----------------------------------------------------------------------------------- formats

def _f16_values(x: torch.Tensor) -> torch.Tensor:
    """ggml_cpu_fp32_to_fp16 (F16C, nearest even) then fp16 -> fp32.  NaNs as F16C converts them
    (quieted, sign and top 10 payload bits kept), which torch's own NaN conversion does not promise."""
    y = _f16(x)
    u = x.view(torch.int32)
    nan_bits = (u & -0x7F802000) | 0x7FC00000       # (u & 0x807FE000) | 0x7FC00000
    return torch.where(torch.isnan(x), nan_bits.view(torch.float32), y)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    h = torch.where(nan, (u >> 16) | 64, (u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF
    bits = h << 16
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)
    return bits.view(torch.float32).reshape(x.shape)


def _q8_avx2(x: torch.Tensor):
    """quantize_row_q8_0 / _q8_1 (x86 AVX2): returns (q int64 saturated, i32 pre-saturation, d, d16)."""
    xb = _blocks(x, 32)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    d = _div(amax, 127.0)
    id_ = torch.where(amax != 0, _div(127.0, amax), torch.zeros_like(amax))
    i32 = _cvt_rne_i32(xb * id_)
    q = i32.clamp(-128, 127)                         # packs_epi32 then packs_epi16 (saturating)
    return q, i32, d, _f16(d)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    q, _, _, d16 = _q8_avx2(x)
    return _unblock(q.to(torch.float32) * d16, x.shape)


def _q8_1_parts(x: torch.Tensor):
    q, i32, d, d16 = _q8_avx2(x)
    s = i32.sum(dim=-1, keepdim=True)                # int32 wrap-around, as the AVX2 hadd
    s = ((s + 2 ** 31) % 2 ** 32) - 2 ** 31
    sf = s.to(torch.float32)
    s16 = _f16(d * sf)                               # y.s = fp16(d * sum), d NOT fp16-rounded
    return q, d16, s16, sf


def _q8_1(x: torch.Tensor) -> torch.Tensor:
    q, d16, _, _ = _q8_1_parts(x)
    return _unblock(q.to(torch.float32) * d16, x.shape)


def _q8_K(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x, 256)
    amax, mx = _signed_absmax(xb)
    iscale = _div(-127.0, mx)
    v = iscale * xb
    val = v + 12582912.0                             # nearest_int(): float32 add, then bit trick
    n = (val.view(torch.int32).to(torch.int64) & 0x007FFFFF) - 0x00400000
    q = _low_byte_i8(torch.clamp(n, max=127))        # MIN(127, v) stored to int8_t
    d = _div(1.0, iscale)
    zero = amax == 0
    q = torch.where(zero, torch.zeros_like(q), q)
    d = torch.where(zero, torch.zeros_like(d), d)
    return _unblock(d * q.to(torch.float32), x.shape)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x, 32)
    _, mx = _signed_absmax(xb)
    d = _div(mx, -8.0)
    id_ = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    t = _cvt_trunc_i32(xb * id_ + 8.5)
    xi = torch.clamp(_low_byte_i8(t), max=15) & 0xFF   # uint8_t xi = MIN(15, (int8_t)(x*id + 8.5f))
    lo, hi = xi[..., :16], xi[..., 16:]
    qs = (lo | (hi << 4)) & 0xFF                     # qs[j] = xi0 | xi1 << 4
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1) - 8
    return _unblock(q.to(torch.float32) * _f16(d), x.shape)


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x, 32)
    mn = xb.amin(dim=-1, keepdim=True)
    mx = xb.amax(dim=-1, keepdim=True)
    d = _div(mx - mn, 15.0)
    id_ = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    t = _cvt_trunc_i32((xb - mn) * id_ + 0.5)
    xi = torch.clamp(_low_byte_i8(t), max=15) & 0xFF
    lo, hi = xi[..., :16], xi[..., 16:]
    qs = (lo | (hi << 4)) & 0xFF
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    return _unblock(q.to(torch.float32) * _f16(d) + _f16(mn), x.shape)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x, 32)
    _, mx = _signed_absmax(xb)
    d = _div(mx, -16.0)
    id_ = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    t = _cvt_trunc_i32(xb * id_ + 16.5)
    xi = torch.clamp(_low_byte_i8(t), max=31) & 0xFF   # MIN(31, (int8_t)(...)) -> uint8_t
    q = (xi & 0x1F) - 16                             # low nibble in qs, bit 4 in qh
    return _unblock(q.to(torch.float32) * _f16(d), x.shape)


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x, 32)
    mn = xb.amin(dim=-1, keepdim=True)
    mx = xb.amax(dim=-1, keepdim=True)
    d = _div(mx - mn, 31.0)
    id_ = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    t = _cvt_trunc_i32((xb - mn) * id_ + 0.5)        # (uint8_t)(x0 + 0.5f): low byte of the int
    q = t & 0x1F
    return _unblock(q.to(torch.float32) * _f16(d) + _f16(mn), x.shape)


def _best_index_iq4nl(al: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues_iq4nl, al), vectorised."""
    mu = torch.bucketize(al, vals, right=True)       # number of values <= al (first value > al)
    mu_c = mu.clamp(1, 15)
    lo = vals[mu_c - 1]
    hi = vals[mu_c]
    l = torch.where((al - lo) < (hi - al), mu_c - 1, mu_c)
    l = torch.where(al <= vals[0], torch.zeros_like(l), l)
    l = torch.where(al >= vals[15], torch.full_like(l, 15), l)
    return l


def _iq4_nl(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x, 32)
    vals = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=x.device)
    w = xb * xb                                      # weight[j] = xb[j]*xb[j] (no imatrix)
    amax, mx = _signed_absmax(xb)
    d0 = _div(mx, float(KVALUES_IQ4NL[0]))           # ntry = -1 < 0: d = max/values[0]
    id_ = _div(1.0, d0)
    l = _best_index_iq4nl(id_ * xb, vals)
    q = vals[l]
    wq = w * q
    a = wq * xb                                      # w*q*xb[j] = (w*q)*xb[j]
    b = wq * q                                       # w*q*q
    sumqx = torch.zeros_like(amax[..., 0])
    sumq2 = torch.zeros_like(amax[..., 0])
    for j in range(32):                              # sequential float32 sums, as the C loop
        sumqx = sumqx + a[..., j]
        sumq2 = sumq2 + b[..., j]
    d = torch.where(sumq2 > 0, _div(sumqx, sumq2), torch.zeros_like(sumq2))
    # the search loop `for itry = -ntry .. ntry` runs zero times for ntry = -1; L is the first pass
    small = amax[..., 0] < _GROUP_MAX_EPS
    d = torch.where(small, torch.zeros_like(d), d)
    l = torch.where(small[..., None], torch.full_like(l, 8), l)  # engine: uninitialised; +0 here
    return _unblock(_f16(d)[..., None] * vals[l], x.shape)


# kvtuner-edge's own formats (native/ggml/ggml-kvquants.c): a per-block search over candidate scales,
# each candidate scored by the block's squared error summed in element order; the first candidate is
# always taken, a later one only when strictly better.
KVQ3_SCALES = (0.76, 0.80, 0.84, 0.88, 0.92, 0.96, 1.00, 1.04, 1.08, 1.12, 1.16, 1.20, 1.24, 1.28, 1.32)
KVQ2_SHRINK = (0.00, 0.04, 0.08, 0.12)


def _first_best(err: torch.Tensor) -> torch.Tensor:
    """Index along the last dim chosen by `if (t == 0 || err < best)`: the first strict minimum,
    the first candidate when every error is NaN."""
    best = err[..., 0]
    idx = torch.zeros_like(best, dtype=torch.int64)
    for t in range(1, err.shape[-1]):
        better = err[..., t] < best
        best = torch.where(better, err[..., t], best)
        idx = torch.where(better, torch.full_like(idx, t), idx)
    return idx


def _seq_sum(r2: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 sum in element order (the C loop's `err = err + r2`)."""
    r2 = r2.movedim(dim, 0)
    acc = torch.zeros_like(r2[0])
    for j in range(r2.shape[0]):
        acc = acc + r2[j]
    return acc


def _codes(v: torch.Tensor, hi: int) -> torch.Tensor:
    """min(hi, max(0, (int) v)) as float32, with x86's (int) of NaN/inf/out-of-range (INT_MIN) -> 0.
    In these formats |v| stays far below 2^31 for finite input (d is never much below the block's
    own scale), so only non-finite v need the special case."""
    c = torch.clamp(torch.trunc(v), 0, hi)
    return torch.where(torch.isfinite(v), c, torch.zeros_like(c))


def _q3_kv(x: torch.Tensor) -> torch.Tensor:
    xb = _blocks(x, 16)                               # half-blocks, one fp16 scale each
    amax, mx = _signed_absmax(xb)
    S = torch.tensor(KVQ3_SCALES, dtype=torch.float32, device=x.device)
    sm = -mx * S                                      # [..., 15]
    d = _f16(sm * 0.25)
    id_ = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    p = xb.unsqueeze(-1) * id_.unsqueeze(-2)          # [..., 16 values, 15 tries]
    q = _codes(p + 4.5, 7)
    y = (q - 4) * d.unsqueeze(-2)
    r = y - xb.unsqueeze(-1)
    err = _seq_sum(r * r, -2)                         # [..., 15]
    t = _first_best(err).unsqueeze(-1)
    dsel = d.gather(-1, t)                            # [..., 1]
    qsel = q.gather(-1, t.unsqueeze(-2).expand(*q.shape[:-1], 1)).squeeze(-1)
    zero = amax == 0                                  # all-zero half: d = +0, codes 4
    dsel = torch.where(zero, torch.zeros_like(dsel), dsel)
    qsel = torch.where(zero, torch.full_like(qsel, 4), qsel)
    return _unblock((qsel - 4) * dsel, x.shape)


def _seq_minmax(xb: torch.Tensor):
    lo = xb[..., 0]
    hi = xb[..., 0]
    for j in range(1, xb.shape[-1]):
        v = xb[..., j]
        lo = torch.where(v < lo, v, lo)
        hi = torch.where(v > hi, v, hi)
    return lo.unsqueeze(-1), hi.unsqueeze(-1)


def _q2_kv_parts(x: torch.Tensor):
    """(dequantised values, stored fp16 minimum m per block of 32 as float32)."""
    xb = _blocks(x, 32)
    lo, hi = _seq_minmax(xb)
    rng = hi - lo
    A = torch.tensor(KVQ2_SHRINK, dtype=torch.float32, device=x.device)
    sa = (A.view(4, 1).expand(4, 4) * rng.unsqueeze(-1)).flatten(-2)     # [..., 16]: a outer, b inner
    sb = (A.view(1, 4).expand(4, 4) * rng.unsqueeze(-1)).flatten(-2)
    l2 = lo + sa
    h2 = hi - sb
    d = _f16(_div(h2 - l2, 3.0))
    m = _f16(l2)
    id_ = torch.where(d != 0, _div(1.0, d), torch.zeros_like(d))
    u = xb.unsqueeze(-1) - m.unsqueeze(-2)            # [..., 32 values, 16 tries]
    q = _codes(u * id_.unsqueeze(-2) + 0.5, 3)
    yv = d.unsqueeze(-2) * q + m.unsqueeze(-2)
    r = yv - xb.unsqueeze(-1)
    err = _seq_sum(r * r, -2)
    t = _first_best(err).unsqueeze(-1)
    dsel, msel = d.gather(-1, t), m.gather(-1, t)
    qsel = q.gather(-1, t.unsqueeze(-2).expand(*q.shape[:-1], 1)).squeeze(-1)
    flat = ~(hi > lo)                                 # constant (or NaN) block: d = +0, m = fp16(lo), codes 0
    dsel = torch.where(flat, torch.zeros_like(dsel), dsel)
    msel = torch.where(flat, _f16(lo), msel)
    qsel = torch.where(flat, torch.zeros_like(qsel), qsel)
    return _unblock(dsel * qsel + msel, x.shape), msel[..., 0]


def _q2_kv(x: torch.Tensor) -> torch.Tensor:
    return _q2_kv_parts(x)[0]


_CACHE_FNS = {
    "f16": _f16_values,
    "bf16": _bf16,
    "q8_0": _q8_0,
    "q5_1": _q5_1,
    "q5_0": _q5_0,
    "q4_1": _q4_1,
    "q4_0": _q4_0,
    "iq4_nl": _iq4_nl,
    "q3_kv": _q3_kv,
    "q2_kv": _q2_kv,
}

_ACT_FNS = {
    "q8_0": _q8_0,
    "q8_1": _q8_1,
    "q8_K": _q8_K,
    "f16": _f16_values,
    "bf16": _bf16,
}


# ----------------------------------------------------------------------------------- API

def fake_quant(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """What ggml's CPU backend reads back after storing the float32 rows x in a cache of this type
    (to_float(from_float(x))), bit for bit.  Same shape and device, float32.  f32 returns x."""
    if type_name not in CACHE_TYPES:
        raise ValueError(f"unknown cache type {type_name!r}; expected one of {CACHE_TYPES}")
    x = _check(x, type_name)
    if type_name == "f32":
        return x
    return _CACHE_FNS[type_name](x)


def fake_quant_act(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """The dequantised values (q*d) of x converted to an activation / vec_dot format:
    "q8_0", "q8_1" (block 32, fp16 d), "q8_K" (block 256, float32 d), "f16", and also "bf16"
    and "f32" (identity), so that fake_quant_act(q, VEC_DOT_TYPE[t]) works for every cache type."""
    if type_name not in ACT_TYPES:
        raise ValueError(f"unknown activation type {type_name!r}; expected one of {ACT_TYPES}")
    x = _check(x, type_name)
    if type_name == "f32":
        return x
    return _ACT_FNS[type_name](x)


def stored_min(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """The fp16 block minimum m a "_1"-style cache type stores (x = d*q + m), per block of 32, as float32:
    the term that meets q8_1's block sum in vec_dot (q4_1, q5_1: the block's min; q2_kv: the fitted one)."""
    x = _check(x, type_name)
    if type_name in ("q4_1", "q5_1"):
        return _f16(_blocks(x, 32).amin(dim=-1))
    if type_name == "q2_kv":
        return _q2_kv_parts(x)[1]
    raise ValueError(f"{type_name} stores no block minimum")


def q8_1_sum_error(x: torch.Tensor) -> torch.Tensor:
    """Per q8_1 block of 32: s - d16*sum(q), where s = fp16(d*sum(q)) is the sum the q4_1/q5_1 x q8_1
    dot products use for the min term and d16*q are the dequantised values (fake_quant_act(x,"q8_1")).

    ggml_vec_dot_q4_1_q8_1 computes sum_b d_x*d_y*sum(qx*qy) + m_x*s_y, so
        vec_dot(q4_1(x), q8_1(y)) == dot(fake_quant(x,"q4_1"), fake_quant_act(y,"q8_1"))
                                      + sum_b m_x[b] * q8_1_sum_error(y)[b]
    up to float32 rounding (m_x = fp16(block min of x)).  Shape x.shape[:-1] + (x.shape[-1]//32,)."""
    x = _check(x, "q8_1")
    _, d16, s16, sf = _q8_1_parts(x)
    return (s16 - d16 * sf)[..., 0]
