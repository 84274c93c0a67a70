"""Near-duplicate removal: planted pairs, groups and chains among random unit vectors."""

from __future__ import annotations

import logging
import re

import faiss
import numpy as np
import pytest

from vcritic.data import dedup


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _mix(rng, base, cos, avoid=()):
    """A unit vector with exactly ``cos`` similarity to unit ``base``; its offset from ``base``
    is orthogonal to ``base`` and to every vector in ``avoid``."""
    basis, _ = np.linalg.qr(np.stack([base, *avoid], axis=1))
    u = rng.standard_normal(base.shape)
    u -= basis @ (basis.T @ u)
    return cos * base + np.sqrt(1 - cos**2) * u / np.linalg.norm(u)


def planted(n, d, n_pairs, seed=0):
    """Random unit vectors with planted near-duplicates.

    Returns:
        ids (row order), float32 matrix, expected groups (lists of rows), chain (a, b, c) rows,
        and near-miss rows (cosine 0.93, must survive).
    """
    rng = np.random.default_rng(seed)
    x = _unit(rng, n, d)
    rows = iter(rng.permutation(n).tolist())
    groups = []
    for c in rng.uniform(0.955, 0.995, n_pairs):
        a, b = next(rows), next(rows)
        x[b] = _mix(rng, x[a], c)
        groups.append([a, b])
    a, b, c = next(rows), next(rows), next(rows)  # a triple, all three pairs above 0.95
    x[b], x[c] = _mix(rng, x[a], 0.99), _mix(rng, x[a], 0.985, avoid=(x[b],))
    groups.append([a, b, c])
    chain = (next(rows), next(rows), next(rows))  # a~b and b~c at 0.96, a-c only 0.9216
    x[chain[1]] = _mix(rng, x[chain[0]], 0.96)
    x[chain[2]] = _mix(rng, x[chain[1]], 0.96, avoid=(x[chain[0]],))
    groups.append(list(chain))
    misses = []
    for _ in range(5):
        a, b = next(rows), next(rows)
        x[b] = _mix(rng, x[a], 0.93)
        misses += [a, b]
    # Ids are shuffled against rows, so the smallest id is not always the planted original.
    ids = [f"ex-{k:06d}" for k in rng.permutation(n)]
    return ids, x.astype(np.float32), groups, chain, misses


def expected_drops(ids, groups):
    return {ids[r] for g in groups for r in g if ids[r] != min(ids[m] for m in g)}


@pytest.fixture(scope="module")
def small():
    return planted(n=3000, d=64, n_pairs=25, seed=1)


def test_exact_search_finds_every_planted_pair_and_nothing_else(small):
    ids, x, groups, chain, _ = small
    index = dedup.build_index(x)
    assert isinstance(index, faiss.IndexFlatIP)
    pairs = dedup.duplicate_pairs(index, x, list(range(len(x))), 0.95, batch_size=256)
    brute = {(i, j) for i, j in zip(*np.nonzero(np.triu(x @ x.T, 1) > 0.95), strict=True)}
    assert set(pairs) == brute
    assert len(pairs) == 25 + 3 + 2  # pairs, the triple's three, the chain's two links
    assert pairs == sorted(pairs) and all(i < j for i, j in pairs)
    assert (min(chain[0], chain[2]), max(chain[0], chain[2])) not in pairs


def test_threshold_is_strict_and_checked():
    rng = np.random.default_rng(3)
    x = _unit(rng, 50, 32).astype(np.float32)
    x[1] = _mix(rng, x[0], 0.97)
    index = dedup.build_index(x)
    assert dedup.duplicate_pairs(index, x, list(range(50)), 0.95) == [(0, 1)]
    assert dedup.duplicate_pairs(index, x, list(range(50)), 0.98) == []
    with pytest.raises(ValueError, match="threshold"):
        dedup.duplicate_pairs(index, x, list(range(50)), 1.5)
    with pytest.raises(ValueError, match="query ids"):
        dedup.duplicate_pairs(index, x, [0, 1], 0.95)


def test_resolve_keeps_smallest_id_and_explains_each_drop(small):
    ids, x, groups, chain, misses = small
    index = dedup.build_index(x)
    i, j, s = dedup._search(index, x, np.arange(len(x)), 0.95, 512)
    reasons = dedup.resolve_duplicates(ids, i, j, s)
    assert set(reasons) == expected_drops(ids, groups)
    assert not {ids[m] for m in misses} & set(reasons)
    for group in groups:
        keeper = min(ids[r] for r in group)
        for r in group:
            if ids[r] == keeper or "via" in reasons[ids[r]]:
                continue
            cos = float(x[r] @ x[ids.index(keeper)])
            got = re.fullmatch(rf"near-duplicate of {keeper} \(cosine (0\.\d{{3}})\)", reasons[ids[r]])
            assert got and abs(float(got.group(1)) - cos) <= 6e-4
    a, b, c = chain
    keeper = min(ids[a], ids[b], ids[c])
    if keeper == ids[a]:  # c only touches b, so its reason names the link
        assert reasons[ids[c]] == f"near-duplicate of {ids[a]} via {ids[b]} (cosine 0.960)"
    # Order of the pairs must not matter.
    perm = np.random.default_rng(0).permutation(len(i))
    assert dedup.resolve_duplicates(ids, j[perm], i[perm], s[perm]) == reasons


def test_chain_reason_names_the_link():
    ids = ["a", "b", "c"]
    reasons = dedup.resolve_duplicates(ids, np.array([0, 1]), np.array([1, 2]), np.array([0.97, 0.96]))
    assert reasons == {"b": "near-duplicate of a (cosine 0.970)", "c": "near-duplicate of a via b (cosine 0.960)"}


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.ones(8, np.float32), "2-D"),
        (np.zeros((0, 8), np.float32), "2-D"),
        (np.full((4, 8), np.nan, np.float32), "NaN"),
        (np.full((4, 8), 1.0, np.float32), "L2-normalised"),
    ],
)
def test_bad_embeddings_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        dedup.build_index(bad)


def test_ivf_index_finds_the_same_pairs(small):
    ids, x, *_ = small
    flat = dedup.duplicate_pairs(dedup.build_index(x), x, list(range(len(x))), 0.95)
    ivf_index = dedup.build_index(x, exact_max=1000)
    assert isinstance(ivf_index, faiss.IndexIVFFlat) and ivf_index.nprobe == dedup.NPROBE
    assert ivf_index.nlist == len(x) // 39  # below 4 sqrt(N) = 219: k-means needs 39 points a list
    assert dedup.build_index(np.tile(x, (10, 1))).nlist == round(4 * np.sqrt(10 * len(x)))
    assert dedup.duplicate_pairs(ivf_index, x, list(range(len(x))), 0.95) == flat
    # The serialized index the Ray workers receive answers the same.
    copy = faiss.deserialize_index(faiss.serialize_index(ivf_index))
    assert copy.nprobe == dedup.NPROBE
    assert dedup.duplicate_pairs(copy, x, list(range(len(x))), 0.95) == flat


def test_gpu_range_index_falls_back_past_k(monkeypatch, caplog):
    rng = np.random.default_rng(5)
    x = _unit(rng, 200, 32)
    for r in range(1, 5):  # rows 0-4 all mutually near: 5 hits per query, more than k
        x[r] = _mix(rng, x[0], 0.99, avoid=tuple(x[1:r]))
    x = x.astype(np.float32)
    cpu = dedup.build_index(x)
    monkeypatch.setattr(dedup, "_GPU_K", 3)
    # A CPU index stands in for the GPU one: the k-NN + fallback merge is what is tested.
    emulated = dedup.GpuRangeIndex(cpu, cpu)
    want = dedup.duplicate_pairs(cpu, x, list(range(200)), 0.95)
    assert len(want) == 10
    assert dedup.duplicate_pairs(emulated, x, list(range(200)), 0.95) == want
    with caplog.at_level(logging.INFO, logger="vcritic.data.dedup"):
        index = dedup.build_index(x, use_gpu=True)
    if not hasattr(faiss, "StandardGpuResources"):
        assert isinstance(index, faiss.IndexFlatIP) and "no GPU support" in caplog.text


def test_exact_and_ivf_agree_on_30k_rows():  # ~4 s on 2 idle cores
    ids, x, groups, *_ = planted(n=30_000, d=128, n_pairs=300, seed=2)
    rows = list(range(len(x)))
    exact = dedup.duplicate_pairs(dedup.build_index(x, exact_max=len(x)), x, rows, 0.95)
    ivf_index = dedup.build_index(x)
    assert isinstance(ivf_index, faiss.IndexIVFFlat)
    ivf = dedup.duplicate_pairs(ivf_index, x, rows, 0.95)
    assert len(exact) == 300 + 3 + 2
    assert ivf == exact
    want = {tuple(sorted((g[m], g[n]))) for g in groups for m in range(len(g)) for n in range(m + 1, len(g))}
    assert set(exact) == want - {tuple(sorted((groups[-1][0], groups[-1][2])))}


def _dataset(ray_local, ids, x, as_lists=False):
    rows = [{"example_id": i, "song_id": f"song-{k % 7}", "embedding": v.tolist() if as_lists else v}
            for k, (i, v) in enumerate(zip(ids, x, strict=True))]
    return ray_local.data.from_items(rows, override_num_blocks=6)  # not 200 tiny blocks


def test_ray_path_matches_in_process_and_is_idempotent(ray_local, small):
    ids, x, groups, *_ = small
    index = dedup.build_index(x)
    want = dedup.resolve_duplicates(ids, *dedup._search(index, x, np.arange(len(x)), 0.95, 512))
    ds = _dataset(ray_local, ids, x)
    first = dedup.find_duplicates(ds)
    assert first == set(want) == expected_drops(ids, groups)
    assert dedup.find_duplicates(ds, num_workers=1) == first  # rerun, other sharding: same answer

    kept, dropped = dedup.drop_duplicates(ds)
    dropped_rows = dropped.take_all()
    assert {r["example_id"]: r["reason"] for r in dropped_rows} == want
    kept_ids = [r["example_id"] for r in kept.select_columns(["example_id"]).take_all()]
    assert sorted(kept_ids) == sorted(set(ids) - set(want))
    assert set(kept.columns()) == {"example_id", "song_id", "embedding"}
    assert dedup.find_duplicates(kept) == set()  # dedup of the kept rows removes nothing more


def test_ray_path_with_ivf_index_and_list_embeddings(ray_local, monkeypatch):
    ids, x, groups, *_ = planted(n=2000, d=16, n_pairs=8, seed=4)
    monkeypatch.setattr(dedup, "EXACT_MAX", 500)  # above it: the clustered join over Ray tasks
    assert dedup.find_duplicates(_dataset(ray_local, ids, x, as_lists=True)) == expected_drops(ids, groups)


def test_ray_path_rejects_bad_rows(ray_local):
    ids, x, *_ = planted(n=300, d=16, n_pairs=4, seed=4)
    with pytest.raises(ValueError, match="repeats"):
        dedup.find_duplicates(_dataset(ray_local, ["same", "same"], x[:2]))
    x[7] *= 2
    with pytest.raises(ValueError, match=f"{ids[7]}.*L2-normalised"):
        dedup.find_duplicates(_dataset(ray_local, ids, x))
    with pytest.raises(ValueError, match="threshold"):
        dedup.find_duplicates(_dataset(ray_local, ids, x), threshold=0.0)


def test_clustered_join_keeps_near_misses_and_finds_pairs_across_the_band():
    """At threshold 0.95: planted pairs spread over 0.95-0.99 are all found, pairs at 0.93-0.949 all kept."""
    rng = np.random.default_rng(7)
    x = _unit(rng, 5000, 64)
    rows = rng.permutation(len(x))
    dups, misses = rows[:200].reshape(2, -1), rows[200:400].reshape(2, -1)
    for (a, b), (lo, hi) in ((dups, (0.95, 0.99)), (misses, (0.93, 0.949))):
        for p, q, c in zip(a, b, rng.uniform(lo, hi, len(a)), strict=True):
            x[q] = _mix(rng, x[p], c)
    x = x.astype(np.float32)
    x[dups[1, 0]] = _mix(rng, x[dups[0, 0]], 0.9501).astype(np.float32)  # right at the edge
    want = {(int(min(p, q)), int(max(p, q))) for p, q in zip(*dups, strict=True)}
    near = {(int(min(p, q)), int(max(p, q))) for p, q in zip(*misses, strict=True)}
    i, j, s = dedup.join_pairs(x, 0.95, {"nlist": 0, "nprobe": 8})
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    assert found == want and not found & near and (s > 0.95).all()


def test_forced_gpu_without_gpu_faiss_fails_clearly():
    if hasattr(faiss, "StandardGpuResources"):
        pytest.skip("this faiss build has GPU support")
    with pytest.raises(ValueError, match=r"data.dedup.device=gpu.*faiss-cpu"):
        dedup.resolve_device("gpu")
    assert dedup.resolve_device("auto") == "cpu"
