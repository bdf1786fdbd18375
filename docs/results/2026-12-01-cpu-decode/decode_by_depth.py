import sys, random, statistics
from kvtuner_edge import engine
M = sys.argv[1]
res = {}
with engine.BatchRunner(M, n_threads=2) as r:
    ctxs = {}
    random.seed(0)
    toks = [random.randrange(1000, 20000) for _ in range(2048)]
    for spec in ("off", "q4_0", "file"):
        for depth in (32, 512, 2048):
            tk = tv = None if spec in ("off", "file") else spec
            c = r.context(1, 2304, spec="off" if spec == "off" else None, type_k=tk, type_v=tv)
            c.prefill(toks[:depth])
            ctxs[(spec, depth)] = c
    for rep in range(5):
        for key, c in ctxs.items():
            t = c.decode_steps([5] * 40, key[1] + rep * 40, 40)
            res.setdefault(key, []).append(t / 40 * 1e3)
for key, v in res.items():
    print(key, f"median {statistics.median(v):.2f} ms/step  all {' '.join(f'{x:.2f}' for x in v)}")
