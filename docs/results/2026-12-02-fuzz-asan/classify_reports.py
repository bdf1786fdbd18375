import sys, os, subprocess, tempfile, pathlib, json, re, collections, shutil
sys.path.insert(0, 'scripts'); sys.argv=['x']
import fuzz_corpus as F
work = pathlib.Path('/tmp/fuzz-asan-work')
bases = F.make_bases(work, ['tiny','head48','smol','gemma'])
cases, layouts = F.corpus(bases, F.SEED)
asan = F.asan_setup(work)
r = F.Runner(work, None, asan, timeout_scale=4.0)
bad = [json.loads(l)['case'] for l in open('/tmp/fuzz-asan-out/runs-cpu-asan.jsonl') if json.loads(l)['outcome']=='sanitizer']
byid = {c.id: c for c in cases}
cnt = collections.Counter(); ex = {}
for cid in bad:
    c = byid[cid]; d = pathlib.Path(tempfile.mkdtemp(dir='/tmp'))
    inp = F.materialize(c, bases, layouts, d)
    env = r.env(inp.get('env'), engine=True)
    p = subprocess.run([sys.executable, 'scripts/fuzz_engine_probe.py', str(inp['file'])], env=env, capture_output=True, timeout=200)
    out = (p.stdout + p.stderr).decode(errors='replace')
    errs = re.findall(r'(\S+\.(?:cpp|c|h):\d+:\d+: runtime error: [^\n]{0,120}|ERROR: AddressSanitizer: [^\n]{0,100})', out)
    key = tuple(sorted(set(re.sub(r'^/.*/vendor/llama.cpp/', '', e) for e in errs)))
    cnt[key] += 1; ex.setdefault(key, cid)
    shutil.rmtree(d, ignore_errors=True)
agg = collections.Counter()
for k, n in cnt.items():
    agg[tuple(sorted(set(re.sub(r"load of value \d+", "load of value N", e) for e in k)))] += n
for k, n in agg.most_common(): print(n, k)
