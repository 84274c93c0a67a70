"""Train/validation split grouped by song, so no song's examples leak across splits.

Songs are ordered by a keyed BLAKE2b hash (not Python's ``hash()``, which is salted per
process), so the split is the same on every worker, machine and run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa
import ray

TRAIN, VAL = "train", "val"


def _unit_hash(song_id: str, seed: int) -> float:
    """Uniform in [0, 1), a pure function of (seed, song_id)."""
    digest = hashlib.blake2b(f"{seed}:{song_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def assign_split(song_id: str, val_fraction: float, seed: int = 0) -> str:
    """Streaming split of one song: "val" when its hash falls below ``val_fraction``.

    Needs no view of the other songs, so the val share is only close to ``val_fraction``
    for many songs; use :func:`split_songs` when the song list is known.

    Args:
        song_id: grouping key; val_fraction: share of songs in val, in [0, 1); seed: reshuffles.
    Returns:
        "train" or "val".
    Raises:
        ValueError: val_fraction outside [0, 1).
    """
    _check_fraction(val_fraction)
    return VAL if _unit_hash(str(song_id), seed) < val_fraction else TRAIN


def split_songs(song_ids: Iterable[str], val_fraction: float, seed: int = 0) -> dict[str, str]:
    """Exact grouped split: the round(val_fraction * n) songs with the smallest hash go to val.

    With val_fraction > 0 and at least 2 songs, val gets at least one song; train always
    keeps at least one. Repeats in ``song_ids`` are ignored.

    Args:
        song_ids: every song id (any order); val_fraction: in [0, 1); seed: reshuffles.
    Returns:
        {song_id: "train" | "val"} for each distinct song.
    Raises:
        ValueError: val_fraction outside [0, 1), or a missing (None/empty) song id.
    """
    _check_fraction(val_fraction)
    songs = set()
    for song in song_ids:
        if song is None or song == "" or song != song:  # None, empty or NaN
            raise ValueError(f"song id {song!r} is missing; every example needs a song_id for the split")
        songs.add(str(song))
    n = len(songs)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))  # at least one song left to train on
    # The id breaks (astronomically unlikely) hash ties, keeping the order total.
    ranked = sorted(songs, key=lambda s: (_unit_hash(s, seed), s))
    return {s: VAL if k < n_val else TRAIN for k, s in enumerate(ranked)}


def _add_split(table: pa.Table, mapping: dict[str, str], song_column: str) -> pa.Table:
    split = pa.array([mapping[str(s)] for s in table[song_column].to_pylist()], pa.string())
    if "split" in table.column_names:  # rerunning replaces the old split, it never stacks
        return table.set_column(table.column_names.index("split"), "split", split)
    return table.append_column("split", split)


def add_split_column(
    ds: ray.data.Dataset, val_fraction: float, seed: int = 0, song_column: str = "song_id"
) -> ray.data.Dataset:
    """Add a ``split`` column ("train"/"val") from :func:`split_songs` over the distinct songs.

    ``ds.unique`` executes ``ds`` once and the result reads it again: materialize costly
    upstream stages first.

    Args:
        ds: rows with ``song_column``; val_fraction, seed: as :func:`split_songs`.
    Returns:
        ``ds`` with a ``split`` column (replaced if present).
    Raises:
        ValueError: as :func:`split_songs`.
    """
    mapping = split_songs(ds.unique(song_column), val_fraction, seed)
    return ds.map_batches(
        _add_split, batch_format="pyarrow", fn_kwargs={"mapping": mapping, "song_column": song_column}
    )
