"""A GGUF model in torch, computing attention the way the deployed llama.cpp engine does.

The weights are the GGUF's own, dequantised (gguf-py's numpy dequantisers), so calibration runs
the model the user deploys, not the original checkpoint. The forward pass follows llama.cpp's
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import gguf_io
from .. import types as T
from ..errors import KVTunerError
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


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    types: dict            # tensor role -> ggml type id of the file (for the activation quantisation)
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None


def _dequantize(mm: np.memmap, base: int, t: gguf_io.TensorInfo) -> np.ndarray:
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


class TorchModel:
    """model = TorchModel(path, device="cpu"); h = model.embed(tokens); for il: h = model.layer(il, h, "f16", "f16")."""

    def __init__(self, path, device: str | torch.device = "cpu", backend: str = "cpu",
                 act_quant: bool = False, progress=None):
        self.path = Path(path)
        self.info = gguf_io.model_info(self.path)
        hdr = gguf_io.read_header(self.path)
        self.arch = self.info.arch
        if self.arch not in SUPPORTED_ARCHS:
            raise CalibrationError(f"{self.path.name}: calibration supports the {', '.join(SUPPORTED_ARCHS)} "
                                   f"architectures; this model is {self.arch!r}")
        if backend not in ("cpu", "cuda"):
            raise CalibrationError(f"backend must be cpu or cuda (the engine paths modelled), got {backend!r}")
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
        mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        total = len(by_name)
        done = [0]

        def get(name, required=True):
            t = by_name.get(name)
            if t is None:
                if required:
                    raise CalibrationError(f"{self.path.name}: tensor {name} is missing")
                return None
            arr = _dequantize(mm, hdr.data_offset, t)
            done[0] += 1
            if progress:
                progress(done[0], total)
            if not arr.flags.writeable or not arr.flags.c_contiguous or arr.dtype != np.float32:
                arr = np.array(arr, dtype=np.float32, order="C")
            return torch.from_numpy(arr).to(self.device)

        def tid(name):
            t = by_name.get(name)
            return t.ggml_type if t is not None else None

        self.tok_embd = get("token_embd.weight")
        self.out_norm = get("output_norm.weight")
        self.output = get("output.weight", required=False)
        self.output_type = tid("output.weight") if self.output is not None else tid("token_embd.weight")
        if self.output is None:
            self.output = self.tok_embd
        self.layers: list[LayerWeights] = []
        for il in range(self.n_layer):
            p = f"blk.{il}."
            roles = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
            lw = LayerWeights(
                attn_norm=get(p + "attn_norm.weight"), wq=get(p + "attn_q.weight"), wk=get(p + "attn_k.weight"),
                wv=get(p + "attn_v.weight"), wo=get(p + "attn_output.weight"), ffn_norm=get(p + "ffn_norm.weight"),
                w_gate=get(p + "ffn_gate.weight"), w_up=get(p + "ffn_up.weight"), w_down=get(p + "ffn_down.weight"),
                types={r: tid(p + r + ".weight") for r in roles},
                bq=get(p + "attn_q.bias", False), bk=get(p + "attn_k.bias", False), bv=get(p + "attn_v.bias", False),
                q_norm=get(p + "attn_q_norm.weight", False), k_norm=get(p + "attn_k_norm.weight", False),
                post_attn_norm=get(p + "post_attention_norm.weight", False),
                post_ffn_norm=get(p + "post_ffw_norm.weight", False))
            self.layers.append(lw)
        self._had: dict[int, torch.Tensor] = {}
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    # building blocks -------------------------------------------------------------------------

    def _mm(self, x: torch.Tensor, w: torch.Tensor, wtype: int | None, b: torch.Tensor | None = None):
        if self.act_quant and wtype is not None:
            vdt = Q.weight_vec_dot_type(wtype)
            if vdt is not None and x.shape[-1] % (256 if vdt == "q8_K" else 32 if vdt.startswith("q") else 1) == 0:
                x = Q.fake_quant_act(x, vdt)
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
        h = self.tok_embd[ids]
        if self.arch == "gemma3":
            h = h * math.sqrt(self.n_embd)
        return h

    def qkv(self, il: int, h: torch.Tensor):
        """(q [.., H, T, Dk] scaled, k [.., Hkv, T, Dk], v [.., Hkv, T, Dv]) of layer il for hidden states h [.., T, D]."""
        lw = self.layers[il]
        x = self._norm(h, lw.attn_norm)
        n_tok = h.shape[-2]
        q = self._mm(x, lw.wq, lw.types["attn_q"], lw.bq).unflatten(-1, (self.n_head[il], self.head_k[il]))
        k = self._mm(x, lw.wk, lw.types["attn_k"], lw.bk).unflatten(-1, (self.n_head_kv[il], self.head_k[il]))
        v = self._mm(x, lw.wv, lw.types["attn_v"], lw.bv).unflatten(-1, (self.n_head_kv[il], self.head_v[il]))
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
        return self._mm(o, lw.wo, lw.types["attn_output"])

    def finish_layer(self, il: int, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual stream after layer il, given its projected attention output a."""
        lw = self.layers[il]
        if lw.post_attn_norm is not None:
            a = self._norm(a, lw.post_attn_norm)
        h = h + a
        x = self._norm(h, lw.ffn_norm)
        g = self._mm(x, lw.w_gate, lw.types["ffn_gate"])
        u = self._mm(x, lw.w_up, lw.types["ffn_up"])
        act = F.gelu(g, approximate="tanh") if self.arch == "gemma3" else F.silu(g)
        f = self._mm(act * u, lw.w_down, lw.types["ffn_down"])
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
        return self._mm(x, self.output, self.output_type)

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


def kld(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || test) per position; ref given as log-probabilities (float64)."""
    lq = torch.log_softmax(logits.double(), dim=-1)
    return (ref_logp.exp() * (ref_logp - lq)).sum(-1).clamp_min(0.0)
