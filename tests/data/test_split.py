"""Song-grouped train/val split: exact fractions, no leakage, stable everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from vcritic.data.split import add_split_column, assign_split, split_songs

SONGS = [f"song-{k:04d}" for k in range(1000)]


def test_exact_fraction_and_partition_for_1000_songs():
    mapping = split_songs(SONGS, 0.1, seed=0)
    assert set(mapping) == set(SONGS)
    assert set(mapping.values()) == {"train", "val"}
    assert sum(v == "val" for v in mapping.values()) == 100


def test_split_ignores_order_and_repeats_but_follows_seed():
    mapping = split_songs(SONGS, 0.1, seed=0)
    assert split_songs(list(reversed(SONGS)) + SONGS[:50], 0.1, seed=0) == mapping
    other = split_songs(SONGS, 0.1, seed=1)
    assert other != mapping and sum(v == "val" for v in other.values()) == 100


def test_split_is_the_same_in_another_process():
    # A fresh interpreter with a different PYTHONHASHSEED would change any hash()-based split.
    code = (
        "import json; from vcritic.data.split import split_songs; "
        f"print(json.dumps(split_songs({SONGS[:200]!r}, 0.1, seed=3)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == split_songs(SONGS[:200], 0.1, seed=3)


@pytest.mark.parametrize(
    ("n_songs", "fraction", "n_val"),
    [(1, 0.1, 0), (1, 0.9, 0), (2, 0.1, 1), (3, 0.1, 1), (3, 0.9, 2), (10, 0.1, 1), (15, 0.1, 2), (4, 0.0, 0)],
)
def test_small_song_counts_keep_both_splits(n_songs, fraction, n_val):
    mapping = split_songs([f"s{k}" for k in range(n_songs)], fraction)
    assert sum(v == "val" for v in mapping.values()) == n_val
    assert sum(v == "train" for v in mapping.values()) == n_songs - n_val >= 1


def test_assign_split_is_stable_and_close_to_the_fraction():
    songs = [f"track-{k}" for k in range(20_000)]
    first = [assign_split(s, 0.1, seed=0) for s in songs]
    assert first == [assign_split(s, 0.1, seed=0) for s in songs]
    share = first.count("val") / len(songs)
    assert 0.09 < share < 0.11
    assert [assign_split(s, 0.1, seed=5) for s in songs[:500]] != first[:500]
    # Both rank songs by the same hash, so they differ only for songs between the two cuts.
    exact = split_songs(songs, 0.1, seed=0)
    assert sum(exact[s] == first[k] for k, s in enumerate(songs)) / len(songs) > 0.99


def test_bad_arguments_raise():
    for fraction in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            split_songs(SONGS, fraction)
        with pytest.raises(ValueError, match="val_fraction"):
            assign_split("x", fraction)
    with pytest.raises(ValueError, match="song_id"):
        split_songs(["a", None, "b"], 0.1)
    with pytest.raises(ValueError, match="song_id"):
        split_songs(["a", ""], 0.1)


def test_ray_add_split_column_matches_split_songs_without_leakage(ray_local):
    songs = SONGS[:300]
    rows = [{"example_id": f"ex-{k}", "song_id": songs[(k * 7) % len(songs)]} for k in range(900)]
    ds = ray_local.data.from_items(rows, override_num_blocks=6)
    out = add_split_column(ds, 0.1, seed=2).take_all()
    assert len(out) == 900
    want = split_songs(songs, 0.1, seed=2)
    by_song = defaultdict(set)
    for row in out:
        by_song[row["song_id"]].add(row["split"])
        assert row["split"] == want[row["song_id"]]
    assert all(len(s) == 1 for s in by_song.values())  # no song in both splits
    assert sum(v == {"val"} for v in by_song.values()) == 30
    # Rerunning on split rows replaces the column rather than adding a second one.
    again = add_split_column(ray_local.data.from_items(out, override_num_blocks=3), 0.1, seed=2)
    assert again.columns().count("split") == 1
    assert sorted(again.take_all(), key=lambda r: r["example_id"]) == sorted(out, key=lambda r: r["example_id"])


def test_test_split_is_disjoint_from_val_and_leaves_val_unchanged():
    before = split_songs(SONGS, 0.1, seed=0)
    three = split_songs(SONGS, 0.1, seed=0, test_fraction=0.15)
    assert sum(v == "val" for v in three.values()) == 100 and sum(v == "test" for v in three.values()) == 150
    assert {s for s, v in three.items() if v == "val"} == {s for s, v in before.items() if v == "val"}
    assert all(before[s] == "train" for s, v in three.items() if v == "test")  # test only takes train songs
    assert split_songs(list(reversed(SONGS)), 0.1, seed=0, test_fraction=0.15) == three


@pytest.mark.parametrize(
    ("n_songs", "val", "test", "n_val", "n_test"),
    [(1, 0.1, 0.1, 0, 0), (2, 0.1, 0.1, 1, 0), (3, 0.1, 0.1, 1, 1), (12, 0.1, 0.1, 1, 1), (40, 0.1, 0.1, 4, 4),
     (8, 0.1, 0.1, 1, 1), (4, 0.5, 0.4, 2, 1), (10, 0.1, 0.0, 1, 0)],
)
def test_small_song_counts_keep_a_train_song_and_serve_val_before_test(n_songs, val, test, n_val, n_test):
    mapping = split_songs([f"s{k}" for k in range(n_songs)], val, test_fraction=test)
    counts = {name: sum(v == name for v in mapping.values()) for name in ("train", "val", "test")}
    assert (counts["val"], counts["test"]) == (n_val, n_test)
    assert counts["train"] == n_songs - n_val - n_test >= 1


def test_streaming_assignment_has_a_test_share_and_bad_test_fractions_raise():
    songs = [f"track-{k}" for k in range(20_000)]
    got = [assign_split(s, 0.1, seed=0, test_fraction=0.2) for s in songs]
    assert 0.09 < got.count("val") / len(songs) < 0.11 and 0.19 < got.count("test") / len(songs) < 0.21
    assert [assign_split(s, 0.1, seed=0) for s in songs[:2000]] == [
        "train" if g == "test" else g for g in got[:2000]]
    for val, test in ((0.1, -0.1), (0.1, 1.0), (0.5, 0.5)):
        with pytest.raises(ValueError, match="test_fraction"):
            split_songs(SONGS, val, test_fraction=test)
        with pytest.raises(ValueError, match="test_fraction"):
            assign_split("x", val, test_fraction=test)


def test_ray_add_split_column_writes_three_splits(ray_local):
    rows = [{"example_id": f"ex-{k}", "song_id": SONGS[k % 100]} for k in range(300)]
    out = add_split_column(ray_local.data.from_items(rows, override_num_blocks=3), 0.1, seed=1,
                           test_fraction=0.2).take_all()
    want = split_songs(SONGS[:100], 0.1, seed=1, test_fraction=0.2)
    assert all(r["split"] == want[r["song_id"]] for r in out)
    assert sum(r["split"] == "test" for r in out) == 60
