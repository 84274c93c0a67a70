"""Train/validation/test split grouped by song, so no song's examples leak across splits.

Songs are ordered by a keyed BLAKE2b hash (not Python's ``hash()``, which is salted per
process), so the split is the same on every worker, machine and run. The songs with the
smallest hashes go to val, the next ones to test, the rest to train: adding a test split
(``test_fraction``) leaves the val songs as they were and only takes songs from train.

Why three splits: val picks the best checkpoint, so a score measured on val is biased
towards that choice; test is touched only by the final evaluation (SCQ), an honest hold-out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa
import ray

TRAIN, VAL, TEST = "train", "val", "test"


def _unit_hash(song_id: str, seed: int) -> float:
    """Uniform in [0, 1), a pure function of (seed, song_id)."""
    digest = hashlib.blake2b(f"{seed}:{song_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_fractions(val_fraction: float, test_fraction: float = 0.0) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be below 1 so some songs are left to train on, "
                         f"got {val_fraction} + {test_fraction}")


def assign_split(song_id: str, val_fraction: float, seed: int = 0, test_fraction: float = 0.0) -> str:
    """Streaming split of one song: "val" when its hash falls below ``val_fraction``, "test"
    when below ``val_fraction + test_fraction``, else "train".

    Needs no view of the other songs, so the shares are only close to the fractions for many
    songs; use :func:`split_songs` when the song list is known.

    Args:
        song_id: grouping key; val_fraction, test_fraction: shares of songs, each in [0, 1),
            together below 1; seed: reshuffles.
    Returns:
        "train", "val" or "test".
    Raises:
        ValueError: a fraction out of range.
    """
    _check_fractions(val_fraction, test_fraction)
    h = _unit_hash(str(song_id), seed)
    return VAL if h < val_fraction else TEST if h < val_fraction + test_fraction else TRAIN


def _held_out_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val songs, test songs) out of ``n``: rounded shares, at least one song for each nonzero
    fraction while train keeps at least one; when songs run short, test gives way first."""
    n_val, n_test = round(val_fraction * n), round(test_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))  # at least one song left to train on
    if test_fraction > 0 and n - n_val >= 2:
        n_test = max(n_test, 1)
    n_test = min(n_test, max(n - 1 - n_val, 0))
    return n_val, n_test


def split_songs(song_ids: Iterable[str], val_fraction: float, seed: int = 0,
                test_fraction: float = 0.0) -> dict[str, str]:
    """Exact grouped split: the round(val_fraction * n) songs with the smallest hash go to val,
    the next round(test_fraction * n) to test, the rest to train.

    Each nonzero fraction gets at least one song when there are enough songs for it while train
    keeps at least one (val is served before test). Repeats in ``song_ids`` are ignored.

    Args:
        song_ids: every song id (any order); val_fraction, test_fraction: each in [0, 1),
            together below 1; seed: reshuffles.
    Returns:
        {song_id: "train" | "val" | "test"} for each distinct song.
    Raises:
        ValueError: a fraction out of range, or a missing (None/empty) song id.
    """
    _check_fractions(val_fraction, test_fraction)
    songs = set()
    for song in song_ids:
        if song is None or song == "" or song != song:  # None, empty or NaN
            raise ValueError(f"song id {song!r} is missing; every example needs a song_id for the split")
        songs.add(str(song))
    n_val, n_test = _held_out_counts(len(songs), val_fraction, test_fraction)
    # The id breaks (astronomically unlikely) hash ties, keeping the order total.
    ranked = sorted(songs, key=lambda s: (_unit_hash(s, seed), s))
    return {s: VAL if k < n_val else TEST if k < n_val + n_test else TRAIN for k, s in enumerate(ranked)}


def _add_split(table: pa.Table, mapping: dict[str, str], song_column: str) -> pa.Table:
    split = pa.array([mapping[str(s)] for s in table[song_column].to_pylist()], pa.string())
    if "split" in table.column_names:  # rerunning replaces the old split, it never stacks
        return table.set_column(table.column_names.index("split"), "split", split)
    return table.append_column("split", split)


def add_split_column(
    ds: ray.data.Dataset, val_fraction: float, seed: int = 0, song_column: str = "song_id",
    test_fraction: float = 0.0,
) -> ray.data.Dataset:
    """Add a ``split`` column ("train"/"val"/"test") from :func:`split_songs` over the distinct songs.

    ``ds.unique`` executes ``ds`` once and the result reads it again: materialize costly
    upstream stages first.

    Args:
        ds: rows with ``song_column``; val_fraction, seed, test_fraction: as :func:`split_songs`.
    Returns:
        ``ds`` with a ``split`` column (replaced if present).
    Raises:
        ValueError: as :func:`split_songs`.
    """
    mapping = split_songs(ds.unique(song_column), val_fraction, seed, test_fraction)
    return ds.map_batches(
        _add_split, batch_format="pyarrow", fn_kwargs={"mapping": mapping, "song_column": song_column}
    )
