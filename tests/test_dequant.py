"""The torch dequantisers (calibrate/dequant.py) against gguf-py's numpy ones, bit for bit, for
every weight type calibration supports: data quantised by gguf-py where it can quantise the type,
and random raw blocks with valid fp16 scales (every code and scale pattern) for all of them; odd
row counts, 1-D and 3-D tensors, chunked decoding, CPU and (where present) CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G
from gguf import quants

from kvtuner_edge.calibrate import dequant as D

TYPES = [G.F32, G.F16, G.BF16, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0, G.Q2_K, G.Q3_K, G.Q4_K, G.Q5_K,
         G.Q6_K, G.IQ4_NL, G.IQ4_XS]
QUANTIZABLE = [G.BF16, G.Q4_0, G.Q4_1, G.Q5_0, G.Q5_1, G.Q8_0]
# byte offsets of each block's fp16 scales (the rest of a block is codes and packed sub-scales)
F16_FIELDS = {G.Q4_0: (0,), G.Q4_1: (0, 2), G.Q5_0: (0,), G.Q5_1: (0, 2), G.Q8_0: (0,), G.Q2_K: (80, 82),
              G.Q3_K: (108,), G.Q4_K: (0, 2), G.Q5_K: (0, 2), G.Q6_K: (208,), G.IQ4_NL: (0,), G.IQ4_XS: (0,)}
SHAPES = [(7, 512), (1, 256), (3, 5, 256), (13, 768)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_raw(qt: G, shape, rng) -> np.ndarray:
    """Random bytes of a `qt` tensor with finite fp16 scales (normal, subnormal, zero, negative)."""
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    if qt in (G.F32, G.F16, G.BF16):
        x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
        x[0, :4] = [0.0, -0.0, 1e-40, -3.0e38]           # zeros, a subnormal, a huge value
        if qt == G.F32:
            return x.view(np.uint8)
        if qt == G.F16:
            return x.clip(-6e4, 6e4).astype(np.float16).view(np.uint8)
        return quants.quantize(x, qt)
    blk, size = D.LAYOUT[int(qt)]
    nb = rows * cols // blk
    b = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        s = (rng.standard_normal(nb) * 0.02).astype(np.float16)
        s[::17] = np.float16(6e-6)                          # fp16 subnormals
        s[5::23] = 0
        b[:, off:off + 2] = s.view(np.uint8).reshape(nb, 2)
    return b.reshape(rows, cols // blk * size)


def _reference(raw: np.ndarray, qt: G, shape) -> np.ndarray:
    rows = int(np.prod(shape[:-1]))
    return np.asarray(quants.dequantize(raw.reshape(rows, -1), qt), dtype=np.float32).reshape(shape)


def _check(raw: np.ndarray, qt: G, shape, device: str, chunk: int | None = None):
    ref = _reference(raw, qt, shape)
    got = D.dequantize(torch.from_numpy(raw.copy()).to(device).reshape(-1), int(qt), shape, name="w",
                       chunk=chunk).cpu().numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    # bit for bit (NaN never arises: the scales are finite)
    bad = np.flatnonzero(got.reshape(-1).view(np.uint32) != ref.reshape(-1).view(np.uint32))
    assert bad.size == 0, (qt.name, shape, bad[:5], got.reshape(-1)[bad[:5]], ref.reshape(-1)[bad[:5]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qt, device):
    rng = np.random.default_rng(int(qt) + 1)
    for shape in SHAPES:
        _check(_random_raw(qt, shape, rng), qt, shape, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qt", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_data_bit_exact(qt, device):
    rng = np.random.default_rng(7)
    for shape in SHAPES:
        x = (rng.standard_normal(shape) * rng.uniform(0.01, 4)).astype(np.float32)
        raw = quants.quantize(x.reshape(-1, shape[-1]), qt)
        _check(np.ascontiguousarray(raw), qt, shape, device)


def test_chunking_and_1d_tensors():
    """Tiny chunks (a few blocks per step, the last one short) give the same bytes; 1-D tensors work."""
    rng = np.random.default_rng(3)
    for qt in (G.Q4_K, G.Q5_0, G.IQ4_XS, G.F16):
        shape = (9, 512)
        _check(_random_raw(qt, shape, rng), qt, shape, "cpu", chunk=700)
    raw = _random_raw(G.F32, (1, 576), rng)
    _check(raw, G.F32, (576,), "cpu")


def test_host_bytes_to_another_device_and_out():
    """Bytes on one device, output on another (what host-resident weights do), into a given tensor."""
    rng = np.random.default_rng(4)
    raw = _random_raw(G.Q6_K, (5, 512), rng)
    out = torch.empty(5, 512)
    r = D.dequantize(torch.from_numpy(raw).reshape(-1), int(G.Q6_K), (5, 512), device=DEVICES[-1]).cpu()
    D.dequantize(torch.from_numpy(raw).reshape(-1), int(G.Q6_K), (5, 512), out=out)
    assert torch.equal(r, out) and torch.equal(out, torch.from_numpy(_reference(raw, G.Q6_K, (5, 512))))


def test_refusals_name_the_type_and_tensor():
    raw = torch.zeros(100, dtype=torch.uint8)
    with pytest.raises(D.DequantError, match=r"blk\.3\.ffn_up\.weight.*IQ2_XXS"):
        D.dequantize(raw, int(G.IQ2_XXS), (1, 256), name="blk.3.ffn_up.weight")
    with pytest.raises(D.DequantError, match=r"w: rows of 48 values are not whole Q4_0 blocks"):
        D.dequantize(raw, int(G.Q4_0), (2, 48), name="w")
    with pytest.raises(D.DequantError, match=r"w: 100 bytes of Q8_0 data"):
        D.dequantize(raw, int(G.Q8_0), (2, 64), name="w")
    with pytest.raises(D.DequantError, match="uint8"):
        D.dequantize(raw.float(), int(G.Q8_0), (2, 64), name="w")
