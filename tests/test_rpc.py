"""Serving past one device: layers of a tuned file on an rpc-server keep their per-layer K/V types.

An rpc-server (of this checkout's build, `python native/build.py --tools --rpc`) listens on
loopback; the patched llama-server loads a tuned SmolLM2 with layers offloaded to it (-ngl N
with --rpc: the RPC device is the only "GPU"; it gets the output and the last N - 1 layers), and
the same file locally. Both must log the file's per-layer types, the RPC device's KV buffer must
be exactly the size those layers' types make (per-layer types kept on the remote device; the
first layers' types would give another size), and greedy completions must be the same tokens.
Skipped, naming the command, when those tools are not built (a separate build: the RPC backend
changes the tools' cache key; `make test` builds them, cached).
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtuner_edge import gguf_io
from kvtuner_edge import types as T
from kvtuner_edge.cli import main

ROOT = Path(__file__).resolve().parent.parent
N_CTX, N_GPU = 512, 12
K = ["q8_0"] * 10 + ["q4_0"] * 10 + ["q8_0"] * 10
V = ["q4_0"] * 15 + ["q8_0"] * 15


def _rpc_tools() -> Path | None:
    sys.path.insert(0, str(ROOT / "native"))
    try:
        import build
    finally:
        sys.path.remove(str(ROOT / "native"))
    d = build.tools_dir("cpu", rpc=True)
    return d if all((d / t).exists() for t in ("ggml-rpc-server", "llama-server")) else None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc, what: str, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{what} did not listen on {port} within {timeout} s")


def _serve(tools: Path, model: Path, log: Path, rpc_port: int | None) -> tuple[list[int], str]:
    """(greedy completion tokens, the server's log) of llama-server on `model`."""
    port = _port()
    cmd = [str(tools / "llama-server"), "-m", str(model), "-fa", "on", "-c", str(N_CTX), "--port", str(port),
           "--host", "127.0.0.1", "-t", "2", "-np", "1", "-lv", "4"]   # -lv 4: llama's own info lines (its types)
    cmd += ["--rpc", f"127.0.0.1:{rpc_port}", "-ngl", str(N_GPU)] if rpc_port else ["-ngl", "0"]
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, p, "llama-server")
        body = json.dumps({"prompt": "The history of the river begins", "n_predict": 24, "temperature": 0,
                           "top_k": 1, "seed": 1, "cache_prompt": False, "return_tokens": True}).encode()
        for _ in range(240):               # the port opens before the model is loaded (503 until then)
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=300) as r:
                    out = json.loads(r.read())
                break
            except urllib.error.HTTPError as e:
                if e.code != 503:
                    raise
                time.sleep(0.5)
        else:
            raise AssertionError("llama-server never became ready")
    finally:
        p.terminate()
        p.wait(timeout=30)
    return out["tokens"], log.read_text(errors="replace")


def _kv_bytes(info, layers) -> int:
    return sum(N_CTX * (T.get(K[il]).row_bytes(info.n_head_kv[il] * info.head_k[il])
                        + T.get(V[il]).row_bytes(info.n_head_kv[il] * info.head_v[il])) for il in layers)


def test_rpc_server_layers_keep_per_layer_types(smollm2, tmp_path):
    tools = _rpc_tools()
    if tools is None:
        pytest.skip("ggml-rpc-server and the RPC-enabled llama-server of this checkout are not built "
                    "(`.venv/bin/python native/build.py --tools --rpc`)")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"type_k": K, "type_v": V}))
    tuned = tmp_path / "tuned.gguf"
    r = CliRunner().invoke(main, ["export", str(smollm2), "--config", str(cfg), "-o", str(tuned)])
    assert r.exit_code == 0, r.output
    info = gguf_io.model_info(tuned)
    assert info.n_layer == len(K)

    rpc_port = _port()
    with open(tmp_path / "rpc.log", "w") as f:
        srv = subprocess.Popen([str(tools / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(rpc_port), "-t", "2"],
                               stdout=f, stderr=subprocess.STDOUT)
    try:
        _wait_port(rpc_port, srv, "rpc-server")
        local, log_local = _serve(tools, tuned, tmp_path / "local.log", None)
        remote, log_rpc = _serve(tools, tuned, tmp_path / "rpc-client.log", rpc_port)
    finally:
        srv.terminate()
        srv.wait(timeout=30)

    want = "per-layer cache types from gguf: K = q8_0*10,q4_0*10,q8_0*10, V = q4_0*15,q8_0*15"
    assert want in log_local and want in log_rpc, (log_local[-2000:], log_rpc[-2000:])
    # the KV buffers per device: -ngl N offloads the output and the last N - 1 layers (llama-model.cpp,
    # i_gpu_start = n_layer + 1 - N), each layer's cache on its layer's device
    bufs = {m.group(1): float(m.group(2)) for m in
            re.finditer(r"llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB", log_rpc)}
    rpc = [v for k, v in bufs.items() if k.startswith("RPC")]
    assert len(rpc) == 1, bufs
    on_rpc = range(info.n_layer + 1 - N_GPU, info.n_layer)
    assert rpc[0] == pytest.approx(_kv_bytes(info, on_rpc) / 2**20, abs=0.006), bufs
    assert rpc[0] != pytest.approx(_kv_bytes(info, range(len(on_rpc))) / 2**20, abs=0.006)   # not the first layers
    assert local == remote and len(local) == 24
