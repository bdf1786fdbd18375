"""The user commands on the real model: export, inspect, eval, chat, models; and their bad input."""
from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
from click.testing import CliRunner

from kvtuner_edge import engine
from kvtuner_edge.cli import main
from kvtuner_edge.demo import edge_mixed
from kvtuner_edge.gguf_io import read_header

N_LAYER = 30


def run(*args, input=None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    return r


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def mixed_json(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "mixed.json"
    p.write_text(json.dumps(edge_mixed(N_LAYER).to_dict()))
    return p


@pytest.fixture(scope="module")
def tuned(smollm2, mixed_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "smol.kvtuner.gguf"
    r = run("export", smollm2, "--config", mixed_json, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["output"] == str(out)
    return out


def test_models_fetch_prints_verified_path(smollm2):
    r = run("models", "fetch", "smollm2-135m")
    assert r.exit_code == 0
    assert r.stdout.strip() == str(smollm2)
    assert sha256(smollm2) == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_export_keeps_every_tensor_byte(smollm2, tuned):
    a, b = read_header(smollm2), read_header(tuned)
    assert [(t.name, t.shape, t.ggml_type, t.nbytes) for t in a.tensors] == \
           [(t.name, t.shape, t.ggml_type, t.nbytes) for t in b.tensors]
    with open(smollm2, "rb") as fa, open(tuned, "rb") as fb:
        for t in a.tensors[:: max(1, len(a.tensors) // 25)]:
            fa.seek(a.data_offset + t.offset)
            fb.seek(b.data_offset + t.offset)
            assert fa.read(t.nbytes) == fb.read(t.nbytes), t.name
    # every metadata key of the input survives
    assert set(a.metadata) <= set(b.metadata)
    assert b.metadata["kvtuner.type_k"] == list(edge_mixed(N_LAYER).type_k)


def test_export_output_has_the_usual_permissions(tuned):
    # a temporary file is renamed into place; the result is readable like any file the user writes
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(tuned.stat().st_mode) == 0o666 & ~umask


def test_exported_file_runs_with_its_per_layer_cache(tuned):
    with engine.open_model(tuned, n_ctx=256) as m:
        assert m.layer_types() == (list(edge_mixed(N_LAYER).type_k), list(edge_mixed(N_LAYER).type_v))


def test_inspect_json(tuned, smollm2):
    r = run("inspect", tuned, "--json", "--ctx", 4096)
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["arch"] == "llama" and d["n_layer"] == N_LAYER
    assert d["type_k"] == list(edge_mixed(N_LAYER).type_k) and d["type_v"] == ["q4_0"] * N_LAYER
    # K: 6 layers q8_0 (8.5 bits) + 24 q4_0 (4.5); V: 30 q4_0 -> storage bits
    assert d["bits_storage"] == pytest.approx((6 * 8.5 + 24 * 4.5 + 30 * 4.5) / 60)
    assert d["bits_nominal"] == pytest.approx((6 * 8 + 24 * 4 + 30 * 4) / 60)
    per_token = 192 * (6 * 34 / 32 + 24 * 18 / 32 + 30 * 18 / 32)
    assert d["kv_bytes_per_token"] == pytest.approx(per_token)
    assert d["kv_bytes_at_ctx"] == pytest.approx(per_token * 4096)
    plain = json.loads(run("inspect", smollm2, "--json").stdout)
    assert plain["type_k"] is None and plain["bits_nominal"] == 16


def test_eval_json_orders_caches(tuned, tmp_path, smol_tokens):
    with engine.open_model(tuned, n_ctx=64) as m:
        text = m.llm.detokenize(smol_tokens).decode("utf-8", "replace")
    txt = tmp_path / "text.txt"
    txt.write_text(text * 2)
    res = {}
    for name, extra in (("file", []), ("q8_0", ["--type-k", "q8_0", "--type-v", "q8_0"]),
                        ("q4_0", ["--type-k", "q4_0", "--type-v", "q4_0"])):
        r = run("eval", tuned, "--text", txt, "--ctx", 256, "--max-tokens", 512, "--json", *extra)
        assert r.exit_code == 0, r.output
        res[name] = json.loads(r.stdout)
    d = res["file"]
    for key in ("mean_kld", "p99_kld", "max_kld", "top1", "ppl", "ppl_base", "bits_nominal", "bits_storage",
                "n_tokens", "floor_kld"):
        assert key in d
    assert d["n_tokens"] == 512 and d["windows"] == 2
    assert d["engine_type_k"] == list(edge_mixed(N_LAYER).type_k)
    assert 0 < d["floor_kld"] < 0.05
    assert res["q8_0"]["mean_kld"] < d["mean_kld"] < res["q4_0"]["mean_kld"]
    assert d["ppl_base"] == pytest.approx(res["q4_0"]["ppl_base"])


def test_chat_streams_a_reply(tuned):
    r = run("chat", tuned, "--ctx", 512, "--max-tokens", 16, input="What is the capital of France?\n\n")
    assert r.exit_code == 0, r.output
    assert "KV cache: K q8_0*3,q4_0*24,q8_0*3 | V q4_0*30" in r.output
    reply = r.output.split("you> ", 2)[1]
    assert len(reply.strip()) > 0


# bad input: clear error, non-zero exit, input untouched, no partial output

def _no_partial(folder):
    return [p for p in os.listdir(folder) if p.endswith(".tmp") or p.startswith(".")] == []


def test_export_refuses_missing_and_non_gguf(tmp_path, mixed_json):
    r = run("export", tmp_path / "nope.gguf", "--config", mixed_json, "-o", tmp_path / "o.gguf")
    assert r.exit_code == 1 and "no such file" in r.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 4096)
    r = run("export", junk, "--config", mixed_json, "-o", tmp_path / "o.gguf")
    assert r.exit_code == 1 and "not a GGUF file" in r.stderr
    assert not (tmp_path / "o.gguf").exists() and _no_partial(tmp_path)


def test_export_refuses_truncated(tmp_path, smollm2, mixed_json):
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        cut.write_bytes(f.read(30_000_000))
    before = sha256(cut)
    r = run("export", cut, "--config", mixed_json, "-o", tmp_path / "o.gguf")
    assert r.exit_code == 1 and "truncated GGUF file" in r.stderr
    assert sha256(cut) == before and not (tmp_path / "o.gguf").exists() and _no_partial(tmp_path)


@pytest.mark.parametrize("cfg,message", [
    ({"type_k": ["q8_0"] * 29, "type_v": ["q4_0"] * 29}, "configuration has 29 layers"),
    ({"type_k": ["q8_0"] * 30, "type_v": ["q4_0"] * 29}, "type_k has 30 entries but type_v has 29"),
    ({"type_k": ["q8_0"] * 5 + ["q3_zz"] * 25, "type_v": ["q4_0"] * 30}, "layer 5: unknown K cache type 'q3_zz'"),
    ({"type_k": ["q8_0"] * 30}, "a configuration is a JSON object"),
])
def test_export_refuses_bad_config(tmp_path, smollm2, cfg, message):
    c = tmp_path / "cfg.json"
    c.write_text(json.dumps(cfg))
    r = run("export", smollm2, "--config", c, "-o", tmp_path / "o.gguf")
    assert r.exit_code == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "o.gguf").exists() and _no_partial(tmp_path)


def test_export_refuses_output_equal_to_input(tmp_path, smollm2, mixed_json):
    import shutil

    copy = tmp_path / "m.gguf"
    shutil.copy(smollm2, copy)
    before = sha256(copy)
    r = run("export", copy, "--config", mixed_json, "-o", copy)
    assert r.exit_code == 1 and "refusing to overwrite the input model" in r.stderr
    assert sha256(copy) == before and _no_partial(tmp_path)


def test_export_refuses_unwritable_folder(tmp_path, smollm2, mixed_json):
    if os.geteuid() == 0:
        ro = "/sys"  # root writes through permission bits, but not into sysfs
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    r = run("export", smollm2, "--config", mixed_json, "-o", f"{ro}/o.gguf")
    assert r.exit_code == 1 and "output folder is not writable" in r.stderr, r.stderr


def test_export_refuses_missing_output_folder_and_file_in_place_of_folder(tmp_path, smollm2, mixed_json):
    r = run("export", smollm2, "--config", mixed_json, "-o", tmp_path / "no" / "such" / "o.gguf")
    assert r.exit_code == 1 and "output folder does not exist" in r.stderr
    f = tmp_path / "afile"
    f.write_text("x")
    r = run("export", smollm2, "--config", mixed_json, "-o", f / "o.gguf")
    assert r.exit_code == 1 and "output folder does not exist" in r.stderr


def test_inspect_and_eval_bad_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    for cmd in (["inspect", junk], ["eval", junk, "--type-k", "q8_0", "--text", junk]):
        r = run(*cmd)
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and str(junk) in r.stderr


def test_eval_unknown_global_type(tuned, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("hello world " * 200)
    r = run("eval", tuned, "--text", txt, "--type-k", "q9_0", "--ctx", 128)
    assert r.exit_code == 1 and "unknown K cache type 'q9_0'" in r.stderr


def test_eval_without_types_says_so(smollm2, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("hello world " * 200)
    r = run("eval", smollm2, "--text", txt, "--ctx", 128)
    assert r.exit_code == 1 and "has no kvtuner per-layer types" in r.stderr


def test_export_refuses_type_the_head_size_cannot_take(tmp_path):
    from kvtuner_edge.random_model import write

    model = tmp_path / "head48.gguf"
    write("tiny-head48", model)
    c = tmp_path / "cfg.json"
    c.write_text(json.dumps({"type_k": ["f16", "q8_0", "f16", "f16"], "type_v": ["f16"] * 4}))
    r = run("export", model, "--config", c, "-o", tmp_path / "o.gguf")
    assert r.exit_code == 1
    assert "layer 1: K type q8_0 has block size 32, which does not divide the K head size 48" in r.stderr
    assert not (tmp_path / "o.gguf").exists() and _no_partial(tmp_path)
