"""scripts/mmaq_perf_table.py on a test-backend-ops perf log kept from the H200 run (docs/results/)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOG = ROOT / "docs/results/2026-12-01-mmaq/tbo_perf_staged.log"


def _module():
    spec = importlib.util.spec_from_file_location("mmaq_perf_table", ROOT / "scripts/mmaq_perf_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_keys_and_times():
    runs = _module().parse(str(LOG))
    assert len(runs) == 12                      # 6 K/V pairs x 16 and 64 sequences
    f16 = runs[(128, 8, 4, 64, 4096, 1, "f16", "f16")]
    q40 = runs[(128, 8, 4, 64, 4096, 1, "q4_0", "q4_0")]
    assert (f16, q40) == (259.66, 180.77)   # the log's own figures


def test_kv_bytes_follow_block_sizes():
    m = _module()
    key = (128, 8, 4, 64, 4096, 1, "q8_0", "q4_0")
    # 64 sequences x 4096 positions x 8 KV heads, one K row (4 x 34 bytes) and one V row (4 x 18 bytes)
    assert m.kv_bytes(key) == 64 * 4096 * 8 * (4 * 34 + 4 * 18)
    assert m.kv_bytes(key[:6] + ("f16", "f16")) == 64 * 4096 * 8 * 2 * 256


def test_cli_table_and_json(tmp_path):
    out = tmp_path / "perf.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/mmaq_perf_table.py"), str(LOG), "--json", str(out)],
                       capture_output=True, text=True, check=True)
    assert "q3_kv/q2_kv" in r.stdout
    rows = json.loads(out.read_text())
    row = next(x for x in rows if (x["type_k"], x["type_v"], x["seqs"]) == ("q4_0", "q4_0", 64))
    assert abs(row["vs_f16"] - 259.66 / 180.77) < 1e-9
    assert all(x["vs_f16"] == 1.0 for x in rows if x["type_k"] == "f16")


def test_no_perf_lines_is_an_error(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("ggml_cuda_init: found 1 CUDA devices\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/mmaq_perf_table.py"), str(empty)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no FLASH_ATTN_EXT perf lines" in r.stderr
