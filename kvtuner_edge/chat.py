"""Interactive local chat on the patched engine with the file's per-layer cache."""
from __future__ import annotations

from typing import Callable

from . import engine


def describe_cache(m: "engine.Model") -> str:
    from .config import rle

    tk, tv = m.layer_types()
    return (f"KV cache: K {rle([t or '-' for t in tk])} | V {rle([t or '-' for t in tv])}, "
            f"{m.cache_bytes() / 2**20:.1f} MiB at {m.n_ctx} tokens")


def chat(path, config=None, n_ctx: int = 4096, system: str | None = None, max_tokens: int = 512,
         temperature: float = 0.7, seed: int = 0, read: Callable[[], str | None] = None,
         write: Callable[[str], None] = None, n_gpu_layers: int = 0) -> list[dict]:
    """Chat until `read` returns None, an empty line or /exit; returns the transcript."""
    read = read or (lambda: input("> "))
    write = write or (lambda s: print(s, end="", flush=True))
    messages = [{"role": "system", "content": system}] if system else []
    with engine.open_model(path, config, n_ctx=n_ctx, seed=seed, n_gpu_layers=n_gpu_layers) as m:
        write(describe_cache(m) + "\n")
        while True:
            try:
                line = read()
            except EOFError:
                line = None
            if line is None or not line.strip() or line.strip() == "/exit":
                break
            messages.append({"role": "user", "content": line})
            reply = []
            for chunk in m.llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens,
                                                      temperature=temperature, seed=seed):
                piece = chunk["choices"][0]["delta"].get("content") or ""
                reply.append(piece)
                write(piece)
            write("\n")
            messages.append({"role": "assistant", "content": "".join(reply)})
    return messages
