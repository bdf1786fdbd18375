#!/usr/bin/env python3
"""Re-runs the cases of a `fuzz_corpus.py --asan --targets engine` run that ended in a sanitizer report, one at a
time, and groups them by the sanitizer's first lines (the runner keeps only an output's tail, which lacks them).

    python docs/results/2026-12-02-fuzz-asan/classify_reports.py WORK RUNS.jsonl   # from the repository root

WORK: the run's --work folder (its base files are reused); RUNS.jsonl: its runs-cpu-asan.jsonl.
"""
import collections
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))
import fuzz_corpus as F  # noqa: E402

work, runs = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
bases = F.make_bases(work, ["tiny", "head48", "smol", "gemma"])
cases, layouts = F.corpus(bases, F.SEED)
runner = F.Runner(work, None, F.asan_setup(work), timeout_scale=4.0)
bad = [r["case"] for r in map(json.loads, runs.read_text().splitlines()) if r["outcome"] == "sanitizer"]
by_id = {c.id: c for c in cases}
groups = collections.Counter()
for cid in bad:
    d = pathlib.Path(tempfile.mkdtemp())
    try:
        inp = F.materialize(by_id[cid], bases, layouts, d)
        p = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_engine_probe.py"), str(inp["file"])],
                           env=runner.env(inp.get("env"), engine=True), capture_output=True, timeout=200)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out = (p.stdout + p.stderr).decode(errors="replace")
    errs = re.findall(r"(\S+\.(?:cpp|c|h):\d+:\d+: runtime error: [^\n]{0,120}|ERROR: AddressSanitizer: [^\n]{0,100})", out)
    # the source path relative to llama.cpp, the loaded value folded: one line per kind of report
    key = sorted({re.sub(r"load of value \d+", "load of value N", re.sub(r"^/.*/vendor/llama.cpp/", "", e)) for e in errs})
    groups[tuple(key)] += 1
for key, n in groups.most_common():
    print(n, key)
