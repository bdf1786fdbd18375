#!/usr/bin/env python3
"""kill -9 at random points of `export --budget` (calibrate, search, refinement, export), truncated
and garbled cache files, and two exports of one model at once: every rerun must finish, give the
uninterrupted run's pick, and leave no partial file behind.

    python scripts/interrupt_trials.py --trials 20 --out docs/results/2026-12-01-fuzz/interrupt.json

Each trial has its own cache folder and output. A kill trial runs the export, waits for the chosen
phase's first log line, sleeps a seeded fraction of that phase's length in the reference run and
sends SIGKILL; with probability 1/2 the rerun is killed again in a later phase; then the last run
goes to the end. Only kills that land count: when the run had finished before its kill, the trial
starts again in a fresh folder with half the delay (up to 4 times); a second kill that comes too late
is recorded as not landed. Trials go on until --trials of them had a kill that landed. Checked: exit 0, the output's kvtuner.type_k/type_v equal the reference pick, its
tensors read back, every JSON file in the cache folder parses, no temporary file is left anywhere
in the trial's folder. A truncation trial damages one cache file of a finished run (cut at a seeded
length, garbage bytes, or JSON of another shape) and reruns. A concurrency trial starts two exports
of the same model with the same cache folder at the same moment (same output, or two outputs).
Settings are small so that a run takes about a minute on 2 CPU cores (SmolLM2-135M, candidate types
f16/q8_0/q4_0, 128 calibration tokens, 4 groups, NSGA-II 8 x 2, no engine check).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("calibrate", "search", "refine", "export")
MARKERS = (("search", "searching:"), ("refine", "refining the configurations"), ("export", "refinement measured"))


def export_cmd(model: Path, cache: Path, out: Path, budget: float) -> list[str]:
    return [sys.executable, "-m", "kvtuner_edge", "export", str(model), "--budget", str(budget),
            "--budget-unit", "nominal", "--types", "f16,q8_0,q4_0", "--calib-tokens", "128", "--groups", "4",
            "--pop", "8", "--gens", "2", "--no-check", "--cache-dir", str(cache), "-o", str(out)]


class Proc:
    """A run of the export with its stderr watched for the phase markers (times since start)."""

    def __init__(self, cmd: list[str], log: Path):
        self.t0 = time.time()
        self.log = open(log, "ab")
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                  start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.seen = {"calibrate": 0.0}
        self.text = ""
        self.th = threading.Thread(target=self._read, daemon=True)
        self.th.start()

    def _read(self):
        for chunk in iter(lambda: self.p.stderr.read1(4096), b""):
            s = chunk.decode("utf-8", "replace")
            self.log.write(chunk)
            self.text += s
            for phase, m in MARKERS:
                if phase not in self.seen and m in self.text:
                    self.seen[phase] = time.time() - self.t0

    def phase(self) -> str:
        return max(self.seen, key=self.seen.get)

    def wait(self, timeout: float = 3600) -> int:
        rc = self.p.wait(timeout=timeout)
        self.th.join(timeout=10)
        self.log.close()
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_to_end(cmd, log) -> tuple[int, float, dict, str]:
    p = Proc(cmd, log)
    rc = p.wait()
    return rc, time.time() - p.t0, p.seen, p.text


def run_and_kill(cmd, log, phase: str, delay: float) -> tuple[str, float, bool]:
    """Start, wait for `phase` to begin, sleep `delay`, SIGKILL. (phase at the kill, seconds, finished first?)"""
    p = Proc(cmd, log)
    while phase not in p.seen and p.p.poll() is None:
        time.sleep(0.05)
    if p.p.poll() is None:
        time.sleep(delay)
    finished = p.p.poll() is not None
    at = p.phase()
    p.kill()
    p.wait()
    return at, time.time() - p.t0, finished


def pick_of(out: Path) -> tuple[list[str], list[str]] | None:
    from kvtuner_edge.gguf_io import model_info

    try:
        info = model_info(out)
    except Exception:  # noqa: BLE001 - reported as the trial's failure
        return None
    return info.type_k, info.type_v


def check_folder(folder: Path) -> list[str]:
    """Problems left in a trial's folder: unreadable JSON, temporary files."""
    bad = []
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        if re.search(r"\.tmp\d*(\.png)?$", p.name):
            bad.append(f"temporary file left: {p.relative_to(folder)}")
        elif p.suffix == ".json":
            try:
                json.loads(p.read_text())
            except ValueError:
                bad.append(f"unreadable JSON: {p.relative_to(folder)}")
    return bad


def verify(rc: int, out: Path, folder: Path, ref) -> list[str]:
    problems = [] if rc == 0 else [f"exit status {rc}"]
    got = pick_of(out)
    if got is None:
        problems.append("output missing or unreadable")
    elif got != ref:
        problems.append(f"pick differs: {got} vs {ref}")
    else:
        from kvtuner_edge.gguf_io import read_header

        read_header(out)
    return problems + check_folder(folder)


def damage(path: Path, how: str, r: random.Random) -> str:
    data = path.read_bytes()
    if how == "truncate":
        n = r.randrange(1, max(2, len(data) - 1))
        path.write_bytes(data[:n])
        return f"cut to {n} of {len(data)} bytes"
    if how == "garbage":
        path.write_bytes(bytes(r.randrange(256) for _ in range(200)))
        return "200 random bytes"
    if how == "shape":
        d = json.loads(data)
        if "attn_err" in d:
            d["attn_err"] = d["attn_err"][:-1]
            d["done_layers"] = d["done_layers"] + [10_000]
        else:
            d["result"]["points"] = [{"x": [0], "type_k": ["q8_0"], "type_v": 3, "bits_nominal": 1, "bits_storage": 1,
                                      "kld": "low", "surrogate": 0}]
        path.write_text(json.dumps(d))
        return "valid JSON of another shape"
    if how == "empty":
        path.write_bytes(b"")
        return "emptied"
    raise ValueError(how)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="kill trials (spread over the four phases)")
    ap.add_argument("--damage-trials", type=int, default=5)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--budget", type=float, default=7.0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kvtuner-interrupt"))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()

    from kvtuner_edge.models import fetch

    model = fetch("smollm2-135m", progress=lambda m: None)
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    r = random.Random(a.seed)
    results = {"model": str(model), "budget": a.budget, "seed": a.seed, "trials": []}

    # the reference: one uninterrupted run, its pick and the times its phases began
    ref_dir = a.work / "reference"
    ref_dir.mkdir()
    rc, sec, seen, text = run_to_end(export_cmd(model, ref_dir / "cache", ref_dir / "o.gguf", a.budget),
                                     ref_dir / "log.txt")
    if rc != 0:
        print(text[-3000:], file=sys.stderr)
        return 1
    ref = pick_of(ref_dir / "o.gguf")
    ends = dict(seen)
    order = sorted(ends, key=ends.get)
    dur = {ph: (ends[order[i + 1]] if i + 1 < len(order) else sec) - ends[ph] for i, ph in enumerate(order)}
    results["reference"] = {"seconds": round(sec, 1), "phase_start": {k: round(v, 1) for k, v in ends.items()},
                            "pick": ref}
    print(f"reference: {sec:.0f} s, phases {results['reference']['phase_start']}, pick K {ref[0]} V {ref[1]}", flush=True)

    def record(t):
        results["trials"].append(t)
        ok = "ok" if not t["problems"] else f"FAIL {t['problems']}"
        print(f"[{len(results['trials'])}] {t['kind']}: {t['what']} -> {ok}", flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(results, indent=1))

    landed_trials = 0
    i = 0
    while landed_trials < a.trials and i < 3 * a.trials:
        d = a.work / f"kill-{i:02d}"
        i += 1
        cmd = export_cmd(model, d / "cache", d / "o.gguf", a.budget)
        phase = PHASES[landed_trials % len(PHASES)]
        scale, missed = 1.0, 0
        while True:  # the first kill, in a fresh folder until it lands
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            frac = r.uniform(0.05, 0.95)
            at, t, finished = run_and_kill(cmd, d / "log.txt", phase, frac * scale * dur.get(phase, 1.0))
            if not finished or missed >= 3:
                break
            missed, scale = missed + 1, scale / 2
        if finished:
            print(f"kill trial {i}: no kill landed in {phase} ({missed + 1} tries); skipped", flush=True)
            continue
        kills = [{"aimed": phase, "fraction": round(frac * scale, 3), "killed_in": at, "after_s": round(t, 1),
                  "landed": True, "missed_before": missed}]
        later = PHASES[PHASES.index(phase) + 1:]
        if later and r.random() < 0.5:  # the resumed run killed again, in a later phase
            phase = r.choice(later)
            frac = r.uniform(0.05, 0.95)
            at, t, finished = run_and_kill(cmd, d / "log.txt", phase, frac * dur.get(phase, 1.0))
            kills.append({"aimed": phase, "fraction": round(frac, 3), "killed_in": at, "after_s": round(t, 1),
                          "landed": not finished})
        rc, sec, _, text = run_to_end(cmd, d / "log.txt")
        resumed = [m for m in ("resuming the sensitivity profile", "resuming the search", "search results from the cache")
                   if m in text]
        landed_trials += 1
        record({"kind": "kill", "what": ", ".join(f"SIGKILL in {k['killed_in']} ({k['fraction']:.2f} of it)"
                                                  + ("" if k["landed"] else ", after the run had finished")
                                                  for k in kills),
                "kills": kills, "rerun_seconds": round(sec, 1), "rerun_log": resumed,
                "problems": verify(rc, d / "o.gguf", d, ref)})

    # damaged cache files of a finished run
    hows = ["truncate", "garbage", "shape", "empty", "truncate"]
    targets = ["profile", "search", "profile", "search", "search"]
    for j in range(a.damage_trials):
        d = a.work / f"damage-{j:02d}"
        shutil.copytree(ref_dir / "cache", d / "cache")
        kind, how = targets[j % len(targets)], hows[j % len(hows)]
        victim = sorted((d / "cache").glob(f"{kind}-*.json"))
        victim = [v for v in victim if ".partial" not in v.name][0]
        what = damage(victim, how, r)
        rc, sec, _, text = run_to_end(export_cmd(model, d / "cache", d / "o.gguf", a.budget), d / "log.txt")
        said = [l.strip() for l in text.splitlines() if "ignoring the unusable" in l]
        problems = verify(rc, d / "o.gguf", d, ref)
        if not said:
            problems.append("the rerun did not say it ignored the damaged file")
        record({"kind": "damage", "what": f"{victim.name} {what}", "rerun_seconds": round(sec, 1), "said": said,
                "problems": problems})

    # two exports at once
    for k, same in enumerate((True, False)):
        d = a.work / f"concurrent-{k}"
        d.mkdir()
        outs = [d / "o.gguf", d / "o.gguf"] if same else [d / "a.gguf", d / "b.gguf"]
        ps = [Proc(export_cmd(model, d / "cache", o, a.budget), d / f"log{n}.txt") for n, o in enumerate(outs)]
        rcs = [p.wait() for p in ps]
        problems = []
        for rc_, o in zip(rcs, outs):
            problems += verify(rc_, o, d, ref)
        record({"kind": "concurrent", "what": "two exports, " + ("one output" if same else "two outputs"),
                "exit": rcs, "problems": sorted(set(problems))})

    n_bad = sum(1 for t in results["trials"] if t["problems"])
    results["summary"] = {"trials": len(results["trials"]), "failed": n_bad,
                          "by_kind": {k: sum(1 for t in results["trials"] if t["kind"] == k)
                                      for k in ("kill", "damage", "concurrent")},
                          "landed_kills_in": {ph: sum(1 for t in results["trials"] if t["kind"] == "kill"
                                                      for kk in t["kills"] if kk["killed_in"] == ph and kk["landed"])
                                                for ph in PHASES},
                          "kills_not_landed": sum(1 for t in results["trials"] if t["kind"] == "kill"
                                                  for kk in t["kills"] if not kk["landed"])}
    print(json.dumps(results["summary"]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
