"""kvtuner_edge.calibrate.quant against the real engine (the patched llama.cpp's libggml-cpu), bit for bit.

The engine is driven through ctypes: ggml_get_type_traits_cpu(type)->from_float writes float32 rows
the way the CPU SET_ROWS op writes the KV cache (and the way mul_mat / flash attention convert the
other operand to vec_dot_type); ggml_get_type_traits(type)->to_float (libggml-base) reads them back.
"""
from __future__ import annotations

import ctypes
import pathlib
import platform

import numpy as np
import pytest
import torch

from kvtuner_edge.calibrate import quant as Q

TYPE_ID = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q8_1": 9,
           "q8_K": 15, "iq4_nl": 20, "bf16": 30, "q3_kv": 43, "q2_kv": 44}
ID_NAME = {v: k for k, v in TYPE_ID.items()}


# ------------------------------------------------------------------------------- the engine

class _TraitsCPU(ctypes.Structure):      # struct ggml_type_traits_cpu (ggml/include/ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]


class _Traits(ctypes.Structure):         # struct ggml_type_traits (ggml/include/ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_int)


class Engine:
    def __init__(self):
        import llama_cpp
        lib = pathlib.Path(llama_cpp.__file__).parent / "lib"
        self.base = ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu.ggml_cpu_init.restype = None
        self.cpu.ggml_cpu_init()
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.base.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.base.ggml_get_type_traits.argtypes = [ctypes.c_int]
        for f in ("ggml_cpu_has_avx2", "ggml_cpu_has_f16c", "ggml_cpu_has_fma", "ggml_cpu_has_avx512"):
            getattr(self.cpu, f).restype = ctypes.c_int
        self.avx2 = bool(self.cpu.ggml_cpu_has_avx2() and self.cpu.ggml_cpu_has_f16c()
                         and self.cpu.ggml_cpu_has_fma())
        self.avx512 = bool(self.cpu.ggml_cpu_has_avx512())

    def tcpu(self, t: str) -> _TraitsCPU:
        return self.cpu.ggml_get_type_traits_cpu(TYPE_ID[t]).contents

    def tbase(self, t: str) -> _Traits:
        return self.base.ggml_get_type_traits(TYPE_ID[t]).contents

    def quantize(self, x: np.ndarray, t: str, ref: bool = False) -> np.ndarray:
        """from_float (or from_float_ref) over the flattened float32 array -> raw bytes."""
        x = np.ascontiguousarray(x, dtype=np.float32).ravel()
        tb = self.tbase(t)
        assert x.size % tb.blck_size == 0
        out = np.zeros(x.size // tb.blck_size * tb.type_size, dtype=np.uint8)
        fn = tb.from_float_ref if ref else self.tcpu(t).from_float
        assert fn, f"no from_float for {t}"
        _ROW_FN(fn)(x.ctypes.data, out.ctypes.data, x.size)
        return out

    def dequantize(self, raw: np.ndarray, t: str, n: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        if t == "f32":
            return raw.view(np.float32).copy()
        if t == "q8_1":    # no to_float in ggml: block_q8_1 = {fp16 d, fp16 s, int8 qs[32]}
            b = raw.reshape(-1, 36)
            d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
            return (b[:, 4:].view(np.int8).astype(np.float32) * d).ravel()
        if t == "q8_K":    # no to_float in ggml's traits: {float d, int8 qs[256], int16 bsums[16]}
            b = raw.reshape(-1, 292)
            d = b[:, 0:4].copy().view(np.float32)
            return (d * b[:, 4:260].view(np.int8).astype(np.float32)).ravel()
        out = np.empty(n, dtype=np.float32)
        fn = self.tbase(t).to_float
        assert fn, f"no to_float for {t}"
        _ROW_FN(fn)(raw.ctypes.data, out.ctypes.data, n)
        return out

    def roundtrip(self, x: torch.Tensor, t: str, ref: bool = False) -> torch.Tensor:
        a = x.detach().cpu().numpy()
        y = self.dequantize(self.quantize(a, t, ref), t, a.size)
        return torch.from_numpy(y.reshape(a.shape))

    def q8_1_s(self, raw: np.ndarray) -> np.ndarray:
        return raw.reshape(-1, 36)[:, 2:4].copy().view(np.float16).astype(np.float32).ravel()

    def vec_dot(self, t: str, n: int, xraw: np.ndarray, yraw: np.ndarray) -> float:
        s = ctypes.c_float(0.0)
        _VEC_DOT(self.tcpu(t).vec_dot)(n, ctypes.byref(s), 0, xraw.ctypes.data, 0,
                                       yraw.ctypes.data, 0, 1)
        return s.value


@pytest.fixture(scope="module")
def eng():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the fake quantisers model the x86 AVX2 build")
    try:
        e = Engine()
    except (ImportError, OSError) as err:
        pytest.skip(f"engine libraries not loadable: {err}")
    if not e.avx2:
        pytest.skip("engine CPU lacks AVX2/F16C/FMA: its q8_0/q8_1 path is not the modelled one")
    return e


# ------------------------------------------------------------------------------- data

def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _datasets() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    R, C = 24, 512
    ds = {}
    ds["normal"] = torch.randn(R, C, generator=g)

    x = torch.randn(R, C, generator=g)
    x[:, torch.randint(0, C, (6,), generator=g)] *= 40.0                  # outlier channels
    m = torch.rand(R, C, generator=g) < 0.01
    x[m] *= torch.empty(int(m.sum())).uniform_(20, 300, generator=g)      # scattered outliers
    ds["outliers"] = x

    x = torch.randn(R, C, generator=g).view(R, C // 32, 32)
    x[:, ::3] = 0.0                                                       # all-zero blocks
    x[:, 1::7] = -0.0                                                     # all negative-zero blocks
    x[:, 2::5, 1:] = 0.0                                                  # one non-zero value
    x[:, 4::9] = x[:, 4::9, :1]                                           # constant blocks
    x[:, 5::11, 7] = -x[:, 5::11, 3]                                      # +a/-a magnitude ties
    x[:, 5::11, 3] = x[:, 5::11, 3].abs() * 3
    x[:, 5::11, 7] = -x[:, 5::11, 3]
    ds["zero_blocks"] = x.reshape(R, C)

    scales = torch.tensor([1e-3, 1e-5, 3e-6, 1e-7, 1e-8, 1e-10, 1e-15, 3e-16, 1e-20, 1e-30,
                           1e-36, 3e-37, 1e-38, 1e-39, 1e-41, 1e-44, 6e-5, 2e-7, 1e-12, 5e-24,
                           1e-37, 2e-38, 4e-39, 7e-45])
    ds["tiny"] = torch.randn(R, C, generator=g) * scales[:, None]

    x = torch.randn(R, C, generator=g)
    x[:, torch.randint(0, C, (8,), generator=g)] *= 25.0
    x = (x.view(R, C // 128, 128) @ _hadamard(128)).reshape(R, C)         # Hadamard-rotated
    ds["hadamard"] = x

    # exact rounding ties: max = 127 * 2^-3 so q8 multiplies by 8 exactly, values on half-integers;
    # iq4_nl ties: max = 127*s, values midway between two kvalues
    s = 0.125
    k = torch.arange(-63, 64, dtype=torch.float32) + 0.5
    row = k[torch.randint(0, k.numel(), (C,), generator=g)] * s
    row.view(-1, 32)[:, 0] = 127 * s
    kv = torch.tensor(Q.KVALUES_IQ4NL, dtype=torch.float32)
    mids = (kv[1:] + kv[:-1]) / 2
    row2 = -mids[torch.randint(0, 15, (C,), generator=g)] * s
    row2.view(-1, 32)[:, 0] = 127 * s
    ties = torch.stack([row, -row, row2, -row2] * (R // 4))
    ds["ties"] = ties

    ds["large"] = torch.randn(R, C, generator=g) * torch.logspace(1, 4.3, R)[:, None]
    ds["integers"] = torch.randint(-9, 10, (R, C), generator=g).float()
    return ds


DATA = _datasets()


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str, zero_sign_free: bool = False):
    assert got.shape == want.shape and got.dtype == torch.float32
    gb, wb = got.contiguous().view(torch.int32), want.contiguous().view(torch.int32)
    bad = gb != wb
    if zero_sign_free:  # only the sign of a zero may differ
        bad &= ~((got == 0) & (want == 0))
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        diff = (got - want).abs()[bad].max().item()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} values differ; max |diff| "
                             f"{diff:g}; first at {i}: got {got.flatten()[i].item()!r} want "
                             f"{want.flatten()[i].item()!r}")


# ------------------------------------------------------------------------------- bit-exactness

@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("t", Q.CACHE_TYPES)
def test_cache_types_bit_exact_vs_engine(eng, t, data):
    x = DATA[data]
    want = eng.roundtrip(x, t)
    got = Q.fake_quant(x, t)
    # iq4_nl: a block with max|x| < 1e-15 gets d = 0 and UNINITIALISED 4-bit indices in the engine
    # (quantize_row_iq4_nl_impl `continue`s before setting L): values are 0, only their sign is noise
    _assert_same(got, want, f"{t}/{data}", zero_sign_free=(t == "iq4_nl"))


@pytest.mark.parametrize("t", ["q3_kv", "q2_kv"])
def test_cpu_cache_write_is_the_reference_bytes(eng, t):
    """patches/0013: the CPU backend writes q3_kv / q2_kv with the scale search in SIMD lanes
    (kvquants-cpu.c); its bytes must be the reference code's (from_float_ref) for every data set,
    for blocks holding inf / NaN / fp16-overflowing values, and for random scales over 14 decades."""
    g = torch.Generator().manual_seed(7)
    sp = _specials()
    mixed = torch.randn(64, 32, generator=g)
    mixed[:, 3] = sp[torch.arange(64) % sp.numel()]                 # one special value per block
    wide = torch.randn(4096, 32, generator=g) * torch.logspace(-7, 7, 4096)[:, None]
    for name, x in list(DATA.items()) + [("specials", mixed), ("wide", wide)]:
        a = x.detach().cpu().numpy()
        got, want = eng.quantize(a, t), eng.quantize(a, t, ref=True)
        assert np.array_equal(got, want), (t, name, int((got != want).sum()))


@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("t", ["q8_0", "q8_1", "q8_K", "f16", "bf16"])
def test_act_types_bit_exact_vs_engine(eng, t, data):
    x = DATA[data]
    want = eng.roundtrip(x, t)
    _assert_same(Q.fake_quant_act(x, t), want, f"act {t}/{data}")


def _specials() -> torch.Tensor:
    """NaNs with payloads (quiet, signalling, negative), infinities, fp16 overflow and rounding ties,
    fp16 / bf16 subnormals, float32 subnormals, FLT_MAX (rounds to bf16 inf)."""
    b = [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F812345, 0xFF9FE001, 0x7FFFFFFF, 0xFFFFFFFF,
         0x7F800000, 0xFF800000, 0x477FE000, 0x477FF000, 0x477FEFFF, 0x47800000, 0x3F801000,
         0x3F803000, 0x3F801001, 0x387FC000, 0x33800000, 0x33000000, 0x33000001, 0x00000001,
         0x80000001, 0x007FFFFF, 0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF,
         0x80000000, 0x00000000, 0x3F7FFFFF, 0xC0490FDB]
    u = torch.tensor(b, dtype=torch.int64)
    u = torch.where(u >= 2 ** 31, u - 2 ** 32, u).to(torch.int32)
    return u.view(torch.float32)


@pytest.mark.parametrize("t", ["f16", "bf16", "f32"])
def test_float_formats_special_values(eng, t):
    sp = _specials()
    # lengths 32 (SIMD body only) and 35 / 7 (scalar tail of ggml_cpu_fp32_to_fp16 too)
    for x in (sp, torch.cat([sp, sp[:3]]), sp[5:12]):
        _assert_same(Q.fake_quant(x, t), eng.roundtrip(x, t), f"{t} specials n={x.numel()}")
        if t != "f32":
            _assert_same(Q.fake_quant_act(x, t), eng.roundtrip(x, t), f"act {t} specials")


@pytest.mark.parametrize("t", Q.CACHE_TYPES + ("q8_1", "q8_K"))
def test_one_million_values(eng, t):
    # enough blocks that a different float32 summation order in iq4_nl shows up (~100 values)
    g = torch.Generator().manual_seed(99)
    x = torch.randn(512, 2048, generator=g)
    x[:, ::97] *= 30.0
    fq = Q.fake_quant if t in Q.CACHE_TYPES else Q.fake_quant_act
    _assert_same(fq(x, t), eng.roundtrip(x, t), f"{t} 1M")


def test_iq4_nl_zero_sign_only_in_tiny_blocks(eng):
    # where the sign of zero is allowed to differ, the block really is a max|x| < 1e-15 block
    x = DATA["tiny"]
    got, want = Q.fake_quant(x, "iq4_nl"), eng.roundtrip(x, "iq4_nl")
    differ = (got.view(torch.int32) != want.view(torch.int32)).view(x.shape[0], -1, 32).any(-1)
    small = x.abs().view(x.shape[0], -1, 32).amax(-1) < 1e-15
    assert not (differ & ~small).any()


@pytest.mark.parametrize("t", Q.CACHE_TYPES + ("q8_1", "q8_K"))
def test_shapes_and_layout(eng, t):
    bs = Q.block_size(t)
    x = torch.randn(2, 3, 2 * max(bs, 32)) * 3
    fq = Q.fake_quant if t in Q.CACHE_TYPES else Q.fake_quant_act
    y = fq(x, t)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.device == x.device
    _assert_same(y, eng.roundtrip(x, t), f"{t} 3-D")
    xt = torch.randn(2 * max(bs, 32), 5).t()              # non-contiguous input
    _assert_same(fq(xt, t), eng.roundtrip(xt.contiguous(), t), f"{t} non-contiguous")
    if bs > 1:
        with pytest.raises(ValueError):
            fq(torch.randn(4, bs + 16), t)


def test_f32_is_identity():
    x = torch.randn(4, 64)
    assert Q.fake_quant(x, "f32") is x
    assert torch.equal(Q.fake_quant_act(x, "f32"), x)


def test_q8_0_engine_rounds_half_to_even_not_like_ref(eng):
    # The AVX2 quantize_row_q8_0 uses id = 127/amax and _mm256_round_ps (nearest even); the
    # reference quantize_row_q8_0_ref (= from_float_ref) uses id = 1/d and roundf (half away).
    x = DATA["ties"]
    cpu = eng.roundtrip(x, "q8_0")
    ref = eng.roundtrip(x, "q8_0", ref=True)
    assert not torch.equal(cpu, ref)
    _assert_same(Q.fake_quant(x, "q8_0"), cpu, "q8_0 ties")
    # a row of 0.5, 1.5, ... with amax 127/8: x*8 = k + 0.5 exactly
    r = x[0].view(-1, 32)
    q = (Q.fake_quant(x, "q8_0")[0].view(-1, 32) * 8)
    assert torch.equal(q[:, 1:], torch.round(r[:, 1:] * 8))          # half to even
    assert not torch.equal(q[:, 1:], torch.trunc(r[:, 1:] * 8 + torch.sign(r[:, 1:]) * 0.5))


# ------------------------------------------------------------------------------- gguf-py

# What is true of gguf-py 0.19.0 (gguf.quants), checked below:
#  * Q4_1, Q5_1, BF16, F16: quantize+dequantize equal the engine bit for bit on all data here (they
#    transcribe the *_ref functions, which is what the CPU from_float calls for these).
#  * Q4_0, Q5_0: equal in value everywhere, but not in the sign of zero for an all-zero block that
#    starts with -0.0: gguf-py takes max = x[argmax|x|] = -0.0, so d = -0.0/-8 = +0 and it reads back
#    +0.0; the C loop (`if (amax < fabsf(v))`) never picks a zero, keeps max = +0.0, d = -0.0, and the
#    engine reads back (8-8)*(-0.0) = -0.0.  fake_quant follows the engine.
#  * Q8_0: gguf-py transcribes quantize_row_q8_0_ref (id = 1/d, roundf = half away from zero) and
#    matches the engine's from_float_ref, NOT the CPU from_float the KV cache is written with (AVX2:
#    id = 127/amax, round half to even): it differs on exact ties and, through 1/d vs 127/amax, on a
#    few random values too.
#  * IQ4_NL, Q8_1, Q8_K: gguf-py has no quantiser.
GGUF_SAME = ["q4_0", "q4_1", "q5_0", "q5_1", "bf16", "f16"]


def _gguf_roundtrip(x: torch.Tensor, t: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants
    qt = GGMLQuantizationType[t.upper()]
    a = x.numpy()
    with np.errstate(all="ignore"):
        y = quants.dequantize(quants.quantize(a, qt), qt)
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32).reshape(a.shape))


@pytest.mark.parametrize("t", GGUF_SAME)
def test_gguf_py_matches_engine(eng, t):
    sign_only = t in ("q4_0", "q5_0")
    n_sign = 0
    for name, x in DATA.items():
        g = _gguf_roundtrip(x, t)
        e = eng.roundtrip(x, t)
        _assert_same(g, e, f"gguf-py {t}/{name} vs engine", zero_sign_free=sign_only)
        _assert_same(Q.fake_quant(x, t), g, f"fake_quant {t}/{name} vs gguf-py",
                     zero_sign_free=sign_only)
        differ = (g.view(torch.int32) != e.view(torch.int32)).view(-1, 32).any(-1)
        xb = x.view(-1, 32)
        negzero_block = (xb == 0).all(-1) & (xb[:, 0].view(torch.int32) < 0)
        assert torch.equal(differ, negzero_block if sign_only else torch.zeros_like(differ)), name
        n_sign += int(differ.sum())
    assert (n_sign > 0) == sign_only


def test_gguf_py_q8_0_is_the_reference_not_the_cpu_path(eng):
    n_diff = {}
    for name, x in DATA.items():
        g = _gguf_roundtrip(x, "q8_0")
        _assert_same(g, eng.roundtrip(x, "q8_0", ref=True), f"gguf-py q8_0/{name} vs _ref")
        n_diff[name] = int((g != Q.fake_quant(x, "q8_0")).sum())
    assert n_diff["ties"] > 1000                    # every half-integer tie rounds differently
    assert n_diff["normal"] + n_diff["hadamard"] + n_diff["outliers"] > 0  # 1/d vs 127/amax


# ------------------------------------------------------------------------------- dot products

def _fp16_block_min(x: torch.Tensor) -> torch.Tensor:
    return x.view(-1, 32).amin(-1).half().float()


@pytest.mark.parametrize("t", ["q4_1", "q5_1"])
def test_q8_1_sum_error_reproduces_engine_vec_dot(eng, t):
    g = torch.Generator().manual_seed(7)
    n = 4096
    worst_with, worst_without = 0.0, 0.0
    for trial in range(12):
        x = torch.randn(n, generator=g) * 0.7 - 0.3
        y = torch.randn(n, generator=g) + (4.0 if trial % 2 else -2.5)   # large |sum(q)| per block
        if trial == 11:
            y = y * 1e-3
        xr, yr = eng.quantize(x.numpy(), t), eng.quantize(y.numpy(), "q8_1")
        s = eng.vec_dot(t, n, xr, yr)

        fx, fy = Q.fake_quant(x, t).double(), Q.fake_quant_act(y, "q8_1").double()
        err = Q.q8_1_sum_error(y)
        assert err.shape == (n // 32,)
        # the stored s really is what q8_1_sum_error assumes: s = d16*sum(q) + err
        s_eng = torch.from_numpy(eng.q8_1_s(yr))
        _assert_same((fy.view(-1, 32).sum(-1) + err.double()).float(), s_eng, "q8_1 s")

        m = _fp16_block_min(x).double()
        plain = float(fx @ fy)
        corrected = plain + float((m * err.double()).sum())
        scale = float((fx.abs() @ fy.abs())) + float((m.abs() * s_eng.double().abs()).sum())
        worst_with = max(worst_with, abs(corrected - s) / scale)
        worst_without = max(worst_without, abs(plain - s) / scale)
    assert worst_with < 2e-6, worst_with
    assert worst_without > 50 * worst_with, (worst_without, worst_with)   # the term matters


@pytest.mark.parametrize("t", Q.CACHE_TYPES)
def test_kq_dot_matches_engine(eng, t):
    """Flash attention's K.Q: vec_dot(K in cache type, Q converted to VEC_DOT_TYPE[t])."""
    g = torch.Generator().manual_seed(11)
    n = 256
    vdt = Q.VEC_DOT_TYPE[t]
    assert ID_NAME[eng.tcpu(t).vec_dot_type] == vdt
    for _ in range(8):
        k = torch.randn(n, generator=g) * 2 + 0.5
        q = torch.randn(n, generator=g) * 3 + 1.0
        s = eng.vec_dot(t, n, eng.quantize(k.numpy(), t), eng.quantize(q.numpy(), vdt))
        fk, fq = Q.fake_quant(k, t).double(), Q.fake_quant_act(q, vdt).double()
        want = float(fk @ fq)
        if vdt == "q8_1":
            want += float((Q.stored_min(k, t).double() * Q.q8_1_sum_error(q).double()).sum())
        scale = float(fk.abs() @ fq.abs())
        assert abs(want - s) <= 2e-6 * scale, (t, want, s)


# ------------------------------------------------------------------------------- type tables

def test_vec_dot_type_tables_match_engine(eng):
    for t in Q.CACHE_TYPES:
        assert ID_NAME[eng.tcpu(t).vec_dot_type] == Q.VEC_DOT_TYPE[t], t
    for tid in range(45):
        tr = eng.cpu.ggml_get_type_traits_cpu(tid).contents
        got = Q.weight_vec_dot_type(tid)
        if not tr.vec_dot or tid == 0:
            assert got is None, tid
        else:
            want = eng.base.ggml_get_type_traits(tr.vec_dot_type).contents.type_name.decode()
            assert got == want, (tid, got, want)
    with pytest.raises(ValueError):
        Q.weight_vec_dot_type(45)


# ------------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("t", Q.CACHE_TYPES + ("q8_1", "q8_K"))
def test_cuda_matches_cpu(t):
    fq = Q.fake_quant if t in Q.CACHE_TYPES else Q.fake_quant_act
    for name, x in DATA.items():
        _assert_same(fq(x.cuda(), t).cpu(), fq(x, t), f"cuda {t}/{name}")
    if t == "q8_1":
        for name, x in DATA.items():
            _assert_same(Q.q8_1_sum_error(x.cuda()).cpu(), Q.q8_1_sum_error(x), f"cuda err/{name}")


# ------------------------------------------------------------------------------- our formats

def test_kv_formats_block_layout(eng):
    """The bytes of q3_kv / q2_kv blocks are laid out as ggml-common.h documents (the CUDA kernels
    and the torch model rely on it): values that are exactly representable come back exactly."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 8, (32,), generator=g)
    codes[3], codes[20] = 0, 0                          # each half holds -4*d: the scale search lands on d
    d0, d1 = 0.5, 0.0625
    x = (codes - 4).float() * torch.tensor([d0] * 16 + [d1] * 16)
    raw = eng.quantize(x.numpy(), "q3_kv")
    assert raw.size == 16
    assert raw[0:4].view(np.float16).tolist() == [d0, d1]
    qs, qh = raw[4:12], raw[12:16]
    for i, c in enumerate(codes.tolist()):
        assert ((qs[i % 8] >> (2 * (i // 8))) & 3) | (((qh[i // 8] >> (i % 8)) & 1) << 2) == c, i
    _assert_same(Q.fake_quant(x, "q3_kv"), x, "q3_kv exact values")

    codes = torch.randint(0, 4, (32,), generator=g)
    codes[0], codes[31] = 0, 3
    d, m = 0.25, -1.5
    x = codes.float() * d + m
    raw = eng.quantize(x.numpy(), "q2_kv")
    assert raw.size == 12
    assert raw[0:4].view(np.float16).tolist() == [d, m]
    for i, c in enumerate(codes.tolist()):
        assert (raw[4 + i % 8] >> (2 * (i // 8))) & 3 == c, i
    _assert_same(Q.fake_quant(x, "q2_kv"), x, "q2_kv exact values")
    assert torch.equal(Q.stored_min(x, "q2_kv"), torch.tensor([m]))


def test_kv_formats_beat_plain_rounding():
    """The scale search is worth its cost: on Hadamard-rotated Gaussian rows (what the cache holds)
    q3_kv's error is below plain absmax rounding with the same layout, and the formats order by bits."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(512, 128, generator=g).view(512, 2, 64) @ _hadamard(64)).view(512, 128)

    def rel(y):
        return float(((y - x) ** 2).sum() / (x ** 2).sum())

    xb = x.view(-1, 16)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
    d = (mx / -4).half().float()
    plain3 = (torch.clamp(torch.trunc(xb / d + 4.5), 0, 7) - 4) * d
    e3, e2 = rel(Q.fake_quant(x, "q3_kv")), rel(Q.fake_quant(x, "q2_kv"))
    assert e3 < 0.9 * rel(plain3.view_as(x)), (e3, rel(plain3.view_as(x)))   # measured: 0.86x
    assert rel(Q.fake_quant(x, "q4_0")) < e3 < e2 < 0.15
