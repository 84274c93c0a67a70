"""Near-duplicate removal by cosine similarity of L2-normalised embeddings, global over all shards:
every row is compared with every other row (positions: rows sorted by id, so results are
deterministic), and each connected group of near-duplicates keeps its smallest id.

Three ways to find the pairs, chosen by size and ``data.dedup`` (:data:`DEFAULTS`):

* up to ``exact_max`` rows on CPU: an exact ``IndexFlatIP`` built on the driver, its self-join range
  search sharded over Ray Data CPU actors;
* more rows on CPU: a clustered self-join (:func:`join_pairs`). Spherical k-means (faiss) splits the
  rows into ``nlist`` cells; each row lives in its nearest cell and is compared, by one matrix
  product per cell, with the rows living in its ``nprobe`` nearest cells. That is the IVF idea, but
  a cell's comparisons are one BLAS call instead of one list scan per query, which is what makes a
  million rows fit in minutes on two cores (benchmarks/dedup.py). Similarities are exact, so a pair
  below the threshold is never dropped; a pair above it is missed only when its two rows sit in
  cells far apart (recall < 1, measured by the benchmark). Cells are sharded over Ray tasks;
* ``device=gpu`` (or ``auto`` with faiss-gpu and a visible GPU): the faiss index (exact, or IVF above
  ``exact_max``) moved to GPU 0 with ``index_cpu_to_gpu``, searched on the driver.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from vcritic.config import DedupConfig

logger = logging.getLogger(__name__)

EXACT_MAX = DedupConfig.exact_max
NPROBE = 16  # build_index's IVF default (the GPU path passes data.dedup.nprobe)
DEFAULTS = asdict(DedupConfig())
"""``data.dedup`` settings (vcritic.config.DedupConfig) used when a caller passes none."""
_JOIN_BLOCK = 4096  # rows per side of one similarity block of the clustered join (64 MB of float32)
_GPU_K = 1024  # neighbours per GPU k-NN query before GpuRangeIndex falls back to the CPU


def _as_matrix(column: np.ndarray) -> np.ndarray:
    """A Ray batch column (2-D tensor, or object array of vectors) as a float32 matrix."""
    if column.dtype != object and column.ndim == 2:
        return np.ascontiguousarray(column, dtype=np.float32)
    return np.stack([np.asarray(v, dtype=np.float32) for v in column]) if len(column) else np.zeros((0, 0), np.float32)


def _validate(embeddings: np.ndarray, ids: Sequence[str] | None = None) -> np.ndarray:
    x = np.asarray(embeddings)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"embeddings must be a non-empty 2-D (rows, dim) array, got shape {x.shape}; "
                         "stack one vector per row")
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1)  # NaN/inf anywhere in a row makes its norm non-finite
    for bad, problem, fix in (
        (~np.isfinite(norms), "has NaN or inf values", "drop or recompute those rows"),
        (np.abs(norms - 1.0) > 1e-3, "is not L2-normalised", "divide each row by its L2 norm"),
    ):
        if bad.any():
            row = int(np.argmax(bad))
            name = f"row {row}" if ids is None else f"row {ids[row]!r}"
            raise ValueError(f"embedding {name} {problem} (norm {norms[row]:.4f}; "
                             f"{int(bad.sum())} bad rows): {fix} before dedup")
    return x / norms[:, None]  # exactly unit norm, so inner products are cosines


def build_index(
    embeddings: np.ndarray, use_gpu: bool = False, exact_max: int = EXACT_MAX, seed: int = 0,
    nlist: int | None = None, nprobe: int = NPROBE,
) -> faiss.Index:
    """Inner-product index: exact ``IndexFlatIP`` up to ``exact_max`` rows (O(N^2) self-join), else IVFFlat.

    Args:
        embeddings: (N, d) L2-normalised vectors; row k gets index position k.
        use_gpu: move the index to GPU 0 if this faiss build has GPU support.
        seed: seed of the IVF training sample.
        nlist, nprobe: IVF lists and lists searched per query (None/0: ~4 sqrt(N), capped for k-means).
    Returns:
        A faiss index (or a :class:`GpuRangeIndex`) holding every row.
    Raises:
        ValueError: not 2-D, empty, non-finite, or rows not unit-norm within 1e-3.
    """
    x = _validate(embeddings)
    n, d = x.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        # ~4 sqrt(N) lists, but k-means wants >= 39 points per centroid (faiss warns below that).
        nlist = nlist or max(1, min(4096, int(round(4 * math.sqrt(n))), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        # Training on ~40 points per centroid is enough; more only slows k-means.
        sample = np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False)
        index.train(x[np.sort(sample)])
        index.nprobe = min(int(nprobe), nlist)
    index.add(x)
    if use_gpu and not hasattr(faiss, "StandardGpuResources"):
        logger.info("use_gpu=True but this faiss build has no GPU support; using the CPU index")
    elif use_gpu:
        res = faiss.StandardGpuResources()
        return GpuRangeIndex(faiss.index_cpu_to_gpu(res, 0, index), index, res)
    return index


class GpuRangeIndex:
    """``range_search``, which faiss GPU indexes lack: k-NN on the GPU, then a CPU range search
    for the queries whose k-th neighbour is still above the radius."""

    def __init__(self, gpu_index: faiss.Index, cpu_index: faiss.Index, resources=None):
        self.gpu_index, self.cpu_index, self.resources = gpu_index, cpu_index, resources  # keep res alive
        self.ntotal, self.d = cpu_index.ntotal, cpu_index.d

    def range_search(self, queries: np.ndarray, radius: float):
        from faiss.contrib.exhaustive_search import range_search_gpu

        return range_search_gpu(queries, radius, self.gpu_index, self.cpu_index, gpu_k=_GPU_K)


EXACT_TOLERANCE = 1e-5
"""At threshold 1.0 (only exact duplicates), pairs with cosine > 1 - this count: float32 rounding
keeps a vector's cosine with an identical copy a hair below 1."""


def _check_threshold(threshold: float) -> None:
    # The same range (and message) as config._check for data.dedup_threshold.
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def _radius(threshold: float) -> float:
    """The faiss range-search radius (kept: inner product > radius) for a checked threshold."""
    return min(float(threshold), 1.0 - EXACT_TOLERANCE)


def _search(index, queries: np.ndarray, positions: np.ndarray, threshold: float, batch_size: int):
    """(i, j, sim) arrays of pairs i < j with similarity > threshold, in index positions."""
    _check_threshold(threshold)
    if len(positions) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(positions)} query ids")
    out_i, out_j, out_s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    # Batches bound the result buffers (and HNSW aborts on big range_search calls).
    for start in range(0, len(queries), batch_size):
        q = np.ascontiguousarray(queries[start : start + batch_size], dtype=np.float32)
        # Cosines even for rows off unit norm by < 1e-3 (a new array: never the caller's).
        q = np.ascontiguousarray(q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12), dtype=np.float32)
        lims, sims, hits = index.range_search(q, _radius(threshold))  # keeps sim > radius only
        rows = np.repeat(np.asarray(positions[start : start + batch_size], np.int64),
                         np.diff(lims).astype(np.int64))
        keep = hits != rows
        out_i.append(np.minimum(rows, hits)[keep])
        out_j.append(np.maximum(rows, hits)[keep])
        out_s.append(sims[keep].astype(np.float32))
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def duplicate_pairs(
    index: faiss.Index, queries: np.ndarray, query_ids: list[int], threshold: float, batch_size: int = 512
) -> list[tuple[int, int]]:
    """Index positions of every pair with cosine similarity > ``threshold``.

    Args:
        index: from :func:`build_index`; queries: (n, d) unit vectors, usually indexed rows.
        query_ids: index position of each query row (so self-matches can be dropped).
        threshold: cut in (0, 1]; faiss keeps inner products strictly above it. 1.0 finds only exact
            duplicates (cosine > 1 - ``EXACT_TOLERANCE``, for float32 rounding).
    Returns:
        Sorted unique pairs (i, j) with i < j, no self-pairs.
    Raises:
        ValueError: threshold out of range, or queries and query_ids differ in length.
    """
    i, j, _ = _search(index, queries, np.asarray(query_ids, np.int64), threshold, batch_size)
    return sorted(set(zip(i.tolist(), j.tolist(), strict=True)))


def resolve_duplicates(ids: Sequence[str], i: np.ndarray, j: np.ndarray, sims: np.ndarray) -> dict[str, str]:
    """Union-find over similar pairs; each connected group keeps its smallest id.

    Args:
        ids: id of each index position.
        i, j, sims: pair positions and their cosine similarity (any order, repeats allowed).
    Returns:
        {dropped id: reason}: "near-duplicate of A (cosine 0.987)", or, for a row that matched
        only another dropped row B of A's group, "near-duplicate of A via B (cosine 0.961)".
    """
    parent: dict[int, int] = {}

    def find(a: int) -> int:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]  # path halving
            a = parent[a]
        return a

    best: dict[tuple[int, int], float] = {}
    for a, b, s in zip(i.tolist(), j.tolist(), sims.tolist(), strict=True):
        key = (min(a, b), max(a, b))
        best[key] = max(s, best.get(key, -1.0))  # the two directions may differ in the last bit
        ra, rb = sorted((find(a), find(b)), key=lambda r: ids[r])
        parent[rb] = ra  # the root is always its group's smallest id
    partners: dict[int, dict[int, float]] = {}
    for (a, b), s in best.items():
        partners.setdefault(a, {})[b] = partners.setdefault(b, {})[a] = s
    reasons: dict[str, str] = {}
    for row, found in partners.items():
        keeper = find(row)
        if keeper in found:
            reasons[ids[row]] = f"near-duplicate of {ids[keeper]} (cosine {found[keeper]:.3f})"
        elif keeper != row:  # joined the group through a chain: name its strongest direct match
            p = min(found, key=lambda q: (-found[q], ids[q]))
            reasons[ids[row]] = f"near-duplicate of {ids[keeper]} via {ids[p]} (cosine {found[p]:.3f})"
    return reasons


def auto_nlist(n: int) -> int:
    """Cells of the clustered join for ``n`` rows: ~2 sqrt(n), at most 4096, and >= 39 rows a cell
    for k-means. Smaller cells make the join (rows x nprobe x cell size) cheaper than the cell
    assignment grows: at 1M rows, 2000 cells with nprobe 10 took 83 s against 117 s for 1000 cells
    with nprobe 8, recall 0.997 against 0.999 (benchmarks/dedup.py, 2 cores)."""
    return max(1, min(4096, int(round(2 * math.sqrt(n))), n // 39))


def train_cells(x: np.ndarray, nlist: int, nprobe: int, niter: int = 10, seed: int = 0) -> np.ndarray:
    """Spherical k-means of ``x`` into ``nlist`` cells; returns each row's ``nprobe`` nearest cells
    (int64 [N, nprobe], nearest first: column 0 is the row's home cell)."""
    n, d = x.shape
    nlist = max(1, min(int(nlist), n))
    nprobe = max(1, min(int(nprobe), nlist))
    # Training on ~40 rows a cell is enough; more only slows k-means.
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False))
    kmeans = faiss.Kmeans(d, nlist, niter=int(niter), spherical=True, seed=int(seed), max_points_per_centroid=40)
    kmeans.train(np.ascontiguousarray(x[sample]))
    _, cells = kmeans.index.search(x, nprobe)
    return cells.astype(np.int64)


def _members(cells: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by cell and each cell's [start, end) bounds in that order."""
    order = np.argsort(cells, kind="stable")
    return order, np.searchsorted(cells[order], np.arange(nlist + 1))


def join_cells(x: np.ndarray, probes: np.ndarray, cells: Sequence[int], threshold: float):
    """(i, j, sim) of pairs above ``threshold`` between the rows probing each of ``cells`` and the
    rows living there (``probes`` from :func:`train_cells`); i < j, repeats possible."""
    _check_threshold(threshold)
    nlist = int(probes.max()) + 1
    home_order, home_bounds = _members(probes[:, 0], nlist)
    flat = probes.ravel()
    probe_order, probe_bounds = _members(flat, nlist)
    probe_rows = probe_order // probes.shape[1]
    radius = _radius(threshold)
    out_i, out_j, out_s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for cell in cells:
        homes = home_order[home_bounds[cell] : home_bounds[cell + 1]]
        queries = probe_rows[probe_bounds[cell] : probe_bounds[cell + 1]]
        for h0 in range(0, len(homes), _JOIN_BLOCK):
            h = homes[h0 : h0 + _JOIN_BLOCK]
            xh = x[h].T
            for q0 in range(0, len(queries), _JOIN_BLOCK):
                q = queries[q0 : q0 + _JOIN_BLOCK]
                qi, hj = np.nonzero((sims := x[q] @ xh) > radius)
                a, b = q[qi], h[hj]
                keep = a != b
                out_i.append(np.minimum(a, b)[keep])
                out_j.append(np.maximum(a, b)[keep])
                out_s.append(sims[qi[keep], hj[keep]].astype(np.float32))
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def join_pairs(x: np.ndarray, threshold: float, settings: dict | None = None, seed: int = 0):
    """The clustered self-join of ``x`` in this process: (i, j, sim) with i < j, each pair once.

    Args:
        x: (N, d) unit rows; settings: ``data.dedup`` (:data:`DEFAULTS` fills missing keys).
    """
    cfg = {**DEFAULTS, **(settings or {})}
    x = np.ascontiguousarray(x, dtype=np.float32)
    probes = train_cells(x, cfg["nlist"] or auto_nlist(len(x)), cfg["nprobe"], cfg["kmeans_iters"], seed)
    i, j, sim = join_cells(x, probes, range(int(probes.max()) + 1), threshold)
    return _unique_pairs(i, j, sim)


def _unique_pairs(i: np.ndarray, j: np.ndarray, sim: np.ndarray):
    """Drop repeated (i, j) pairs (a pair is found from both rows' sides)."""
    if not len(i):
        return i, j, sim
    key = i.astype(np.int64) * (int(max(i.max(), j.max())) + 1) + j
    _, first = np.unique(key, return_index=True)
    return i[first], j[first], sim[first]


@ray.remote(num_cpus=1)
def _join_task(x: np.ndarray, probes: np.ndarray, cells: list[int], threshold: float):
    """A Ray task of the clustered join: ``x`` and ``probes`` arrive zero-copy from the object store."""
    return _unique_pairs(*join_cells(x, probes, cells, threshold))


def _join_on_ray(x: np.ndarray, threshold: float, cfg: dict, num_workers: int):
    """The clustered join with its cells shared out over ``num_workers`` Ray tasks (k-means on the driver)."""
    probes = train_cells(x, cfg["nlist"] or auto_nlist(len(x)), cfg["nprobe"], cfg["kmeans_iters"])
    nlist = int(probes.max()) + 1
    # Work of a cell ~ rows living there x rows probing it; deal cells out largest first, round robin.
    work = np.bincount(probes[:, 0], minlength=nlist) * np.bincount(probes.ravel(), minlength=nlist)
    order = np.argsort(-work, kind="stable").tolist()
    shares = [order[k::num_workers] for k in range(num_workers)]
    x_ref, probes_ref = ray.put(x), ray.put(probes)
    parts = ray.get([_join_task.remote(x_ref, probes_ref, cells, threshold) for cells in shares if cells])
    return _unique_pairs(*(np.concatenate([p[k] for p in parts]) for k in range(3)))


def resolve_device(device: str) -> str:
    """``cpu`` or ``gpu`` for a ``data.dedup.device`` of auto, cpu or gpu.

    Raises:
        ValueError: gpu asked for but this faiss build has no GPU support or sees no GPU.
    """
    has_gpu_build = hasattr(faiss, "StandardGpuResources")
    gpus = faiss.get_num_gpus() if has_gpu_build and hasattr(faiss, "get_num_gpus") else 0
    if device == "cpu" or (device == "auto" and not gpus):
        return "cpu"
    if device == "auto" or (device == "gpu" and gpus):
        return "gpu"
    if device != "gpu":
        raise ValueError(f"data.dedup.device must be auto, cpu or gpu, got {device!r}")
    if not has_gpu_build:
        raise ValueError("data.dedup.device=gpu but the installed faiss has no GPU support (faiss-cpu): install "
                         "the gpu extra (pip install -e '.[gpu]', faiss-gpu-cu12, instead of faiss-cpu) or set "
                         "data.dedup.device=auto or cpu")
    raise ValueError("data.dedup.device=gpu but faiss sees no GPU on the driver; run the job where one is "
                     "visible or set data.dedup.device=auto or cpu")


class _RangeSearcher:
    """Ray Data actor: deserializes the index once, range-searches batches of rows."""

    def __init__(self, refs: dict, threshold: float, batch_size: int, id_column: str, embedding_column: str):
        faiss.omp_set_num_threads(1)  # one CPU per actor; more threads only oversubscribe
        # Nested in a dict, the refs arrive unresolved; the driver holds them for the whole job.
        self.index = faiss.deserialize_index(ray.get(refs["index"]))
        self.ids = ray.get(refs["ids"])
        self.args = (threshold, batch_size, id_column, embedding_column)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        threshold, batch_size, id_column, embedding_column = self.args
        positions = np.searchsorted(self.ids, batch[id_column].astype(str))
        i, j, s = _search(self.index, _as_matrix(batch[embedding_column]), positions, threshold, batch_size)
        return {"i": i, "j": j, "sim": s}


def _find(ds, threshold, id_column, embedding_column, batch_size, num_workers, settings=None) -> dict[str, str]:
    _check_threshold(threshold)  # on the driver, before any work, not inside an actor
    cfg = {**DEFAULTS, "exact_max": EXACT_MAX, **(settings or {})}
    device = resolve_device(str(cfg["device"]))  # a forced gpu fails here, before any reading
    cols = ds.select_columns([id_column, embedding_column]).materialize()
    ids, vecs = [], []
    for batch in cols.iter_batches(batch_format="numpy", batch_size=8192):
        ids.extend(str(v) for v in batch[id_column])
        vecs.append(_as_matrix(batch[embedding_column]))
    if len(ids) < 2:
        return {}
    order = np.argsort(np.array(ids), kind="stable")
    sorted_ids = np.array(ids)[order]
    repeats = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
    if len(repeats):
        raise ValueError(f"{id_column} must be unique but {repeats[0]!r} repeats; fix the manifest")
    x = _validate(np.concatenate(vecs)[order], sorted_ids)  # names bad ids
    exact_max = int(cfg["exact_max"])
    if num_workers is None:
        num_workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if device == "gpu":
        index = build_index(x, use_gpu=True, exact_max=exact_max, nlist=int(cfg["nlist"]) or None,
                            nprobe=int(cfg["nprobe"]))
        logger.info("dedup of %d rows on the GPU (%s)", len(x), type(index).__name__)
        return resolve_duplicates(sorted_ids.tolist(), *_search(index, x, np.arange(len(x)), threshold, batch_size))
    if len(x) > exact_max:
        logger.info("dedup of %d rows: clustered join over %d Ray tasks", len(x), num_workers)
        return resolve_duplicates(sorted_ids.tolist(), *_join_on_ray(x, threshold, cfg, num_workers))
    index = build_index(x, exact_max=exact_max)
    if cols.num_blocks() < 2 * num_workers:  # too few blocks would leave actors idle
        cols = cols.repartition(2 * num_workers).materialize()
    refs = {"index": ray.put(faiss.serialize_index(index)), "ids": ray.put(sorted_ids)}
    pairs = cols.map_batches(
        _RangeSearcher, fn_constructor_args=(refs, threshold, batch_size, id_column, embedding_column),
        batch_size=batch_size, batch_format="numpy", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_workers),  # starts on 1 free CPU
    )
    found = list(pairs.iter_batches(batch_format="numpy", batch_size=None))
    i, j, s = (np.concatenate([b[k] for b in found] or [np.zeros(0)]) for k in ("i", "j", "sim"))
    return resolve_duplicates(sorted_ids.tolist(), i.astype(np.int64), j.astype(np.int64), s)


def find_duplicates(
    ds: ray.data.Dataset, threshold: float = 0.95, id_column: str = "example_id",
    embedding_column: str = "embedding", batch_size: int = 512, num_workers: int | None = None,
    settings: dict | None = None,
) -> set[str]:
    """Ids to drop so that no two kept rows have cosine similarity > ``threshold`` (in (0, 1];
    1.0 drops only exact duplicates).

    Args:
        ds: rows with a unique id and an L2-normalised embedding.
        num_workers: range-search actors or join tasks (1 CPU each); default: the cluster's CPU count.
        settings: ``data.dedup`` (device, exact_max, nlist, nprobe, kmeans_iters); None: :data:`DEFAULTS`.
    Returns:
        Every id of each near-duplicate group except its smallest (deterministic).
    Raises:
        ValueError: bad threshold, repeated ids, embeddings that are not finite unit vectors, or
            ``device=gpu`` without a GPU faiss.
    """
    return set(_find(ds, threshold, id_column, embedding_column, batch_size, num_workers, settings))


def _select(table: pa.Table, reasons: dict[str, str], id_column: str, dropped: bool) -> pa.Table:
    mask = pc.is_in(table[id_column].cast(pa.string()), value_set=pa.array(list(reasons), pa.string()))
    if not dropped:
        return table.filter(pc.invert(mask))
    table = table.filter(mask)
    why = [reasons[str(v)] for v in table[id_column].to_pylist()]
    return table.append_column("reason", pa.array(why, pa.string()))


def drop_duplicates(
    ds: ray.data.Dataset, threshold: float = 0.95, id_column: str = "example_id",
    embedding_column: str = "embedding", batch_size: int = 512, num_workers: int | None = None,
    settings: dict | None = None,
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Split ``ds`` into (kept, dropped); dropped rows get a ``reason`` column. Args and Raises:
    as :func:`find_duplicates`.

    Returns:
        (kept, dropped), both reading one materialized copy of ``ds``.
    """
    ds = ds.materialize()  # upstream stages (e.g. embedding) must not run once per output
    reasons = _find(ds, threshold, id_column, embedding_column, batch_size, num_workers, settings)
    kwargs = {"reasons": reasons, "id_column": id_column}
    kept = ds.map_batches(_select, batch_format="pyarrow", fn_kwargs={**kwargs, "dropped": False})
    dropped = ds.map_batches(_select, batch_format="pyarrow", fn_kwargs={**kwargs, "dropped": True})
    return kept, dropped
