#!/usr/bin/env python3
"""Peak memory and time of calibrating a ~1B-parameter model on this machine (issue 14).

Makes a random-weight GGUF of Llama-3.2-1B's shape (kvtuner_edge/random_model.py; speed and
memory do not depend on the weight values), then runs `kvtuner-edge tune` on it in a child
process, once per --max-memory setting, and prints the child's peak resident set size (its
getrusage ru_maxrss, read with os.wait4), the wall time and the memory plan it chose, against
the target of issue 14: peak RSS <= 2 x the GGUF's size + 1 GiB.

    .venv/bin/python scripts/bench_calib_memory.py                      # tight limit and the default
    .venv/bin/python scripts/bench_calib_memory.py --limits tight       # only the tight one
    .venv/bin/python scripts/bench_calib_memory.py --limits 3GiB,default --calib-tokens 256

"tight" is the target less ALLOWANCE (what the Python process holds beyond the memory plan:
the interpreter, torch, the engine's libraries, allocator slack); "default" passes no
--max-memory (what the host has free less a margin: every layer resident here). The search is
kept short (--pop/--gens, default 4 and 0: the initial population and the uniform baselines), as
its memory is that of the calibration's batched passes; the profile runs at the CLI's defaults.
Not a test: on two shared cores one run of the default settings takes a quarter of an hour.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GiB = 1 << 30
ALLOWANCE = 3 * GiB // 8


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def run_one(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit status, seconds, peak RSS in bytes) of `cmd`, its stderr (progress) shown and kept."""
    t0 = time.time()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # pass the progress through as it comes (tqdm's bars end in carriage returns), keeping a copy
        for chunk in iter(lambda: p.stderr.read1(4096), b""):
            text = chunk.decode(errors="replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            err.write(text)
        out = p.stdout.read().decode(errors="replace")
        _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    sys.stdout.write(out)
    return p.returncode, time.time() - t0, ru.ru_maxrss * 1024


def main() -> int:
    from kvtuner_edge.calibrate.model import parse_memory
    from kvtuner_edge.evaluate import shared_text
    from kvtuner_edge.random_model import write

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--model", type=Path, help="an existing GGUF instead of a random one")
    ap.add_argument("--limits", default="tight,default", help="comma-separated: tight, default or a size")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--types", help="candidate cache types (default: the CLI's)")
    ap.add_argument("--calib-file", type=Path, help="calibration text (default: ../shared/data's wikitext-2 "
                                                    "where found, else the model's own generated text)")
    ap.add_argument("--pop", type=int, default=4)
    ap.add_argument("--gens", type=int, default=0)
    ap.add_argument("--work", type=Path, help="folder for the model and caches (default: a temporary one)")
    a = ap.parse_args()

    work = a.work or Path(tempfile.mkdtemp(prefix="kvtuner-bench-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    model = a.model
    if model is None:
        model = work / f"{a.shape}-random.gguf"
        if not model.exists():
            print(f"writing a random {a.shape} GGUF to {model}", file=sys.stderr)
            write(a.shape, model)
    size = model.stat().st_size
    target = 2 * size + GiB
    text = a.calib_file or shared_text()
    exe = str(Path(sys.executable).with_name("kvtuner-edge"))
    rows = []
    for lim in [x.strip() for x in a.limits.split(",") if x.strip()]:
        value = {"tight": target - ALLOWANCE, "default": None}.get(lim, lim)
        if value is not None and not isinstance(value, int):
            value = parse_memory(value)
        cache = work / f"cache-{lim}"
        shutil.rmtree(cache, ignore_errors=True)          # calibrate for real, not from a cache
        cmd = [exe, "tune", str(model), "--cache-dir", str(cache), "--calib-tokens", str(a.calib_tokens),
               "--pop", str(a.pop), "--gens", str(a.gens), "-o", str(work / f"front-{lim}.json")]
        if text is not None:
            cmd += ["--calib-file", str(text)]
        if a.types:
            cmd += ["--types", a.types]
        if value is not None:
            cmd += ["--max-memory", str(value)]
        print(f"\n== --max-memory {lim if value is None else fmt(value)}: {' '.join(cmd)}", file=sys.stderr)
        rc, secs, peak = run_one(cmd, work / f"log-{lim}.txt")
        plan = next((line.strip() for line in (work / f"log-{lim}.txt").read_text().splitlines()
                     if line.strip().startswith("weights:") or "weights:" in line), "")
        rows.append((lim if value is None else f"{lim} ({fmt(value)})", rc, secs, peak, plan))
    print(f"\nmodel {model.name}: {fmt(size)} GGUF; target peak RSS 2 x file + 1 GiB = {fmt(target)}; "
          f"{a.calib_tokens} calibration tokens, search pop {a.pop} gens {a.gens}; {os.cpu_count()} CPUs")
    print(f"{'--max-memory':<24} {'exit':>4} {'time':>8} {'peak RSS':>10} {'<= target':>9}  plan")
    for lim, rc, secs, peak, plan in rows:
        print(f"{lim:<24} {rc:>4} {secs:>7.0f}s {fmt(peak):>10} {'yes' if peak <= target else 'NO':>9}  {plan}")
    if a.work is None and all(r[1] == 0 for r in rows):
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[1] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
