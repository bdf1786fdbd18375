"""Search for per-layer K/V cache types on a sensitivity profile: prune, cluster, NSGA-II, pick.

Pure numpy + scipy + pymoo; imports neither torch nor the engine. The expensive objective (KLD
of a whole mixed configuration) comes in as a callable, so this module is tested on synthetic
profiles and run on real ones by kvtuner_edge.tune.

Steps (KVTuner, arXiv 2502.04420, with the parts its code left out):
  1. per-layer estimate of the KLD of every pair: measured where the profile measured it, else the
     layer's attention-output error times the layer's own KLD/attn_err gain;
  2. intra-layer pruning: each layer keeps the pairs on its (bits, KLD) Pareto front;
  3. inter-layer clustering: agglomerative clustering (scipy, Ward linkage) of the layers' log-KLD
     vectors over the pairs. Ward merges the two groups whose union grows the within-group variance
     least, which is what "one choice for the whole group" costs; it needs no guess of group shapes
     (k-means would, and depends on its seed), and the dendrogram lets the user pick any number of
     groups without rerunning. Each group gets the Pareto front of its summed estimates as choices;
  4. NSGA-II (pymoo) over one choice per group, objectives (average bits, KLD): first on the additive
     surrogate (sum of the layers' estimated KLDs; thousands of evaluations in a second) whose front
     seeds the second run, on the measured KLD of the whole configuration;
  5. pick: the lowest-KLD configuration of the measured front within the bit budget.
"""
from __future__ import annotations

# one module per stage; this package's names stay importable from kvtuner_edge.search
from .cluster import Space, build_space, cluster_layers
from .nsga2 import _nsga2, search, spread
from .pick import Point, Result, SearchError, result_of
from .prune import Layout, estimate, layer_front, pareto_mask
from .refine import refine

__all__ = ["Layout", "Point", "Result", "SearchError", "Space", "build_space", "cluster_layers", "estimate",
           "layer_front", "pareto_mask", "refine", "result_of", "search", "spread"]
