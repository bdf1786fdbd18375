"""Write a random-weight llama-architecture GGUF of a real model's shape.

Speed and memory do not depend on weight values, so a random model of an 8B model's shape is
a fair stand-in for throughput runs on a machine that cannot download one; its outputs are
meaningless (every report that uses one says so). Weights are Q4_0 (or, with wtype="q8_0",
Q8_0) blocks with small random scales (built directly, no quantiser run), norms are ones, the vocabulary is a SentencePiece-style
one with byte fallback so any text tokenizes.

    python scripts/make_random_gguf.py --shape llama3-8b -o /tmp/llama3-8b-random.gguf
    python -m kvtuner_edge.random_model --shape tiny -o /tmp/tiny.gguf
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

SHAPES = {
    # n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, rope_base, ctx
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, 100000.0, 8192),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, 500000.0, 8192),
    "llama3.2-1b": (2048, 16, 32, 8, 8192, 128256, 500000.0, 8192),  # head size 64, GQA 4
    # Qwen2.5-32B's shape (64 layers, 8 KV heads of 128) written as a llama model (no biases)
    "qwen2.5-32b": (5120, 64, 40, 8, 27648, 152064, 1000000.0, 8192),
    "tiny": (256, 4, 4, 2, 512, 4096, 10000.0, 4096),
    "tiny-head128": (512, 4, 4, 2, 1024, 32768, 10000.0, 4096),  # the 8B model's head size, small
    # head size 48: block-32 cache types cannot divide it (tests of the refusals)
    "tiny-head48": (192, 4, 4, 2, 512, 4096, 10000.0, 4096),
}


def q4_0_random(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw Q4_0 data for a [rows, cols] weight: per 32 values an f16 scale and 16 bytes of nibbles."""
    nb = cols // 32
    blocks = np.empty((rows, nb, 18), dtype=np.uint8)
    scale = (rng.random((rows, nb), dtype=np.float32) * 0.01 + 0.002).astype(np.float16)
    blocks[:, :, :2] = scale.view(np.uint8).reshape(rows, nb, 2)
    blocks[:, :, 2:] = rng.integers(0, 256, size=(rows, nb, 16), dtype=np.uint8)
    return blocks.reshape(rows, nb * 18)


def q8_0_random(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw Q8_0 data for a [rows, cols] weight: per 32 values an f16 scale and 32 signed bytes."""
    nb = cols // 32
    blocks = np.empty((rows, nb, 34), dtype=np.uint8)
    scale = (rng.random((rows, nb), dtype=np.float32) * 0.0006 + 0.0001).astype(np.float16)
    blocks[:, :, :2] = scale.view(np.uint8).reshape(rows, nb, 2)
    blocks[:, :, 2:] = rng.integers(0, 256, size=(rows, nb, 32), dtype=np.uint8)
    return blocks.reshape(rows, nb * 34)


WTYPES = ("q4_0", "q8_0")
# llama: RoPE of consecutive pairs (NORMAL); qwen2: of the two halves of a head (NEOX), Q/K/V biases
ARCHS = ("llama", "qwen2")


def write(shape: str, out: Path, seed: int = 0, wtype: str = "q4_0", arch: str = "llama",
          rope_freqs: bool = False) -> None:
    """rope_freqs: a rope_freqs.weight tensor (per-pair frequency factors, as Llama-3.1 files have; llama only)."""
    import gguf

    if wtype not in WTYPES:
        raise ValueError(f"wtype must be one of {', '.join(WTYPES)}, got {wtype!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if rope_freqs and arch != "llama":
        raise ValueError("rope_freqs needs arch llama")

    n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, rope_base, ctx = SHAPES[shape]
    head = n_embd // n_head
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"random-{shape}")
    w.add_description("random weights (kvtuner_edge.random_model): outputs are meaningless")
    w.add_block_count(n_layer)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if wtype == "q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0)
    # vocabulary: 3 specials, 256 byte tokens, then filler pieces
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(n_vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + \
        [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (n_vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    Q = gguf.GGMLQuantizationType.Q4_0 if wtype == "q4_0" else gguf.GGMLQuantizationType.Q8_0
    make = q4_0_random if wtype == "q4_0" else q8_0_random

    def q(name: str, rows: int, cols: int):
        w.add_tensor(name, make(rows, cols, rng), raw_dtype=Q)

    q("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    q("output.weight", n_vocab, n_embd)
    if rope_freqs:
        # own generator: the weights are those of the file without factors (same seed)
        ff = np.random.default_rng(seed + 1).random(head // 2)
        w.add_tensor("rope_freqs.weight", (1.0 + 7.0 * ff).astype(np.float32))
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        q(p + "attn_q.weight", n_head * head, n_embd)
        q(p + "attn_k.weight", n_head_kv * head, n_embd)
        q(p + "attn_v.weight", n_head_kv * head, n_embd)
        if arch == "qwen2":
            for t, rows in (("q", n_head * head), ("k", n_head_kv * head), ("v", n_head_kv * head)):
                w.add_tensor(p + f"attn_{t}.bias", (0.5 * rng.standard_normal(rows)).astype(np.float32))
        q(p + "attn_output.weight", n_embd, n_head * head)
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        q(p + "ffn_gate.weight", n_ff, n_embd)
        q(p + "ffn_up.weight", n_ff, n_embd)
        q(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    os.replace(tmp, out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wtype", choices=WTYPES, default="q4_0", help="weight type of the matrices")
    ap.add_argument("--arch", choices=ARCHS, default="llama", help="architecture written (its RoPE mode)")
    ap.add_argument("--rope-freqs", action="store_true", help="per-pair RoPE frequency factors (llama)")
    a = ap.parse_args()
    write(a.shape, a.out, a.seed, a.wtype, a.arch, a.rope_freqs)
    print(f"wrote {a.out} ({a.out.stat().st_size / 2**20:.0f} MiB, random {a.wtype} weights, shape {a.shape}, "
          f"arch {a.arch}{', rope_freqs' if a.rope_freqs else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
