"""Near-duplicate search: exact inner-product index (baseline) vs IVF, in-process.

Plants near-duplicate pairs among random unit vectors, finds pairs above the threshold
with each index, and prints build/search time, recall of the planted pairs and ratios.

    python benchmarks/dedup.py                       # 20k x 384
    python benchmarks/dedup.py --rows 100000         # exact takes minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vcritic.data import dedup  # noqa: E402


def planted(rows: int, dim: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sources = rng.choice(rows // 2, pairs, replace=False)
    targets = rows // 2 + rng.choice(rows // 2, pairs, replace=False)
    noise = rng.standard_normal((pairs, dim)).astype(np.float32) * 0.01
    x[targets] = x[sources] + noise
    x[targets] /= np.linalg.norm(x[targets], axis=1, keepdims=True)
    return x, {(int(min(a, b)), int(max(a, b))) for a, b in zip(sources, targets, strict=True)}


def run(x: np.ndarray, threshold: float, exact_max: int) -> tuple[float, float, set[tuple[int, int]]]:
    start = time.perf_counter()
    index = dedup.build_index(x, exact_max=exact_max)
    built = time.perf_counter()
    found = set(dedup.duplicate_pairs(index, x, list(range(len(x))), threshold))
    return built - start, time.perf_counter() - built, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--threshold", type=float, default=0.95)
    args = parser.parse_args()
    x, truth = planted(args.rows, args.dim, args.pairs)
    results = [("exact IndexFlatIP [baseline]", *run(x, args.threshold, exact_max=args.rows + 1)),
               ("IVFFlat (nprobe=16)", *run(x, args.threshold, exact_max=0))]
    base = results[0][1] + results[0][2]
    print(f"{args.rows} rows x {args.dim} dims, {len(truth)} planted pairs, cosine > {args.threshold}")
    print(f"{'index':<30} {'build s':>8} {'search s':>9} {'total s':>8} {'speedup':>8} {'recall':>7} {'extra':>6}")
    for name, build_s, search_s, found in results:
        total = build_s + search_s
        print(f"{name:<30} {build_s:>8.2f} {search_s:>9.2f} {total:>8.2f} {base / total:>8.2f} "
              f"{len(found & truth) / len(truth):>7.3f} {len(found - truth):>6}")


if __name__ == "__main__":
    main()
