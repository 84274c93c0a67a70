"""Near-duplicate search at scale: does dedup at cosine > threshold find every planted duplicate
pair while keeping every near-miss pair, and how long does it take?

Each run plants ``--pairs`` duplicate pairs whose cosine is spread uniformly over [0.95, 0.99] and
as many near-miss pairs spread over [0.93, 0.949], which must be KEPT at threshold 0.95. A partner
is made at an exact cosine c with its original a as b = c a + sqrt(1 - c^2) u, u a unit vector
orthogonal to a. Two kinds of background data:

* ``uniform``: random unit vectors (in high dimension nearly orthogonal: no structure for the
  clusters to follow, the hard case for cell-based search);
* ``clustered``: a mixture of clusters of very different sizes (lognormal), the way real embeddings
  bunch by topic; unbalanced cells are the cost risk here.

Methods: the job's clustered self-join (``vcritic.data.dedup.join_pairs`` with the ``data.dedup``
defaults, or ``--nlist``/``--nprobe``), and the exact ``IndexFlatIP`` range search as the baseline
for up to ``--exact-rows`` rows (it is O(N^2): minutes at 100k).

    python benchmarks/dedup.py --rows 100000 1000000            # the table in the README/issue
    python benchmarks/dedup.py --rows 20000 --data clustered

Columns: build (k-means + cell assignment, or index add), search, total seconds; recall (planted
pairs found); near-miss false drops (near-miss pairs reported as duplicates: must be 0); extra
(other pairs found above the threshold, e.g. chance neighbours inside a tight cluster).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vcritic.data import dedup  # noqa: E402

DUP_RANGE = (0.95, 0.99)
MISS_RANGE = (0.93, 0.949)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def background(rows: int, dim: int, kind: str, rng: np.random.Generator, clusters: int = 0) -> np.ndarray:
    """Unit vectors: ``uniform`` on the sphere, or ``clustered`` around lognormal-sized centres
    (members at cosine ~0.7 with their centre, ~0.5 with each other)."""
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    if kind == "clustered":
        clusters = clusters or max(2, rows // 1000)
        centres = _unit_rows(rng.standard_normal((clusters, dim), dtype=np.float32))
        weights = rng.lognormal(0.0, 1.0, clusters)
        label = rng.choice(clusters, size=rows, p=weights / weights.sum())
        x /= np.sqrt(dim, dtype=np.float32)  # noise of norm ~1, like the centre
        x += centres[label]
    return _unit_rows(x)


def partners(x: np.ndarray, rows: np.ndarray, cos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly cosine ``cos[k]`` with ``x[rows[k]]``."""
    a = x[rows].astype(np.float64)
    u = rng.standard_normal(a.shape)
    u -= np.sum(u * a, axis=1, keepdims=True) * a  # orthogonal to a
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return (cos[:, None] * a + np.sqrt(1.0 - cos[:, None] ** 2) * u).astype(np.float32)


@dataclass
class Planted:
    x: np.ndarray
    dups: set[tuple[int, int]]
    misses: set[tuple[int, int]]


def planted(rows: int, dim: int, pairs: int, kind: str, seed: int = 0) -> Planted:
    """Background data with ``pairs`` duplicate and ``pairs`` near-miss pairs on disjoint rows."""
    rng = np.random.default_rng(seed)
    x = background(rows, dim, kind, rng)
    picked = rng.choice(rows, size=4 * pairs, replace=False)
    sets = {}
    for name, (lo, hi), (a, b) in (("dups", DUP_RANGE, picked[: 2 * pairs].reshape(2, -1)),
                                   ("misses", MISS_RANGE, picked[2 * pairs :].reshape(2, -1))):
        x[b] = partners(x, a, rng.uniform(lo, hi, pairs), rng)
        sets[name] = {(int(min(p, q)), int(max(p, q))) for p, q in zip(a, b, strict=True)}
    return Planted(x, sets["dups"], sets["misses"])


def run_exact(x: np.ndarray, threshold: float) -> tuple[float, float, set[tuple[int, int]]]:
    start = time.perf_counter()
    index = dedup.build_index(x, exact_max=len(x))
    built = time.perf_counter()
    i, j, _ = dedup._search(index, x, np.arange(len(x)), threshold, batch_size=4096)
    return built - start, time.perf_counter() - built, set(zip(i.tolist(), j.tolist(), strict=True))


def run_join(x: np.ndarray, threshold: float, settings: dict) -> tuple[float, float, set[tuple[int, int]]]:
    cfg = {**dedup.DEFAULTS, **settings}
    start = time.perf_counter()
    probes = dedup.train_cells(x, cfg["nlist"] or dedup.auto_nlist(len(x)), cfg["nprobe"], cfg["kmeans_iters"])
    built = time.perf_counter()
    i, j, _ = dedup._unique_pairs(*dedup.join_cells(x, probes, range(int(probes.max()) + 1), threshold))
    return built - start, time.perf_counter() - built, set(zip(i.tolist(), j.tolist(), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[20000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--pairs", type=int, default=1000, help="duplicate pairs, and as many near-miss pairs")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--data", nargs="+", choices=("uniform", "clustered"), default=["uniform", "clustered"])
    parser.add_argument("--exact-rows", type=int, default=100_000, help="largest size that also runs the exact baseline")
    parser.add_argument("--nlist", type=int, default=dedup.DEFAULTS["nlist"], help="0: auto (~2 sqrt(rows))")
    parser.add_argument("--nprobe", type=int, default=dedup.DEFAULTS["nprobe"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    settings = {"nlist": args.nlist, "nprobe": args.nprobe}
    print(f"{args.dim} dims, {args.pairs} duplicate pairs (cosine {DUP_RANGE[0]}-{DUP_RANGE[1]}) + {args.pairs} near-miss "
          f"pairs ({MISS_RANGE[0]}-{MISS_RANGE[1]}), threshold {args.threshold}, {args.threads} threads")
    print(f"{'data':<10} {'rows':>9} {'method':<34} {'build s':>8} {'search s':>9} {'total s':>8} {'recall':>7} "
          f"{'miss drops':>10} {'extra':>6}")
    for kind in args.data:
        for rows in args.rows:
            data = planted(rows, args.dim, args.pairs, kind)
            nlist = args.nlist or dedup.auto_nlist(rows)
            runs = [(f"clustered join nlist={nlist} nprobe={args.nprobe}", run_join(data.x, args.threshold, settings))]
            if rows <= args.exact_rows:
                runs.append(("exact IndexFlatIP [baseline]", run_exact(data.x, args.threshold)))
            for name, (build_s, search_s, found) in runs:
                print(f"{kind:<10} {rows:>9} {name:<34} {build_s:>8.1f} {search_s:>9.1f} {build_s + search_s:>8.1f} "
                      f"{len(found & data.dups) / len(data.dups):>7.4f} {len(found & data.misses):>10} "
                      f"{len(found - data.dups - data.misses):>6}", flush=True)


if __name__ == "__main__":
    main()
