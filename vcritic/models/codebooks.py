"""Several codebooks per audio frame: the delay pattern the audio head predicts them in.

A codec frame holds Q ids (Mimi: up to 32; the first is semantic, the rest refine the
acoustics). The audio head has Q outputs per position and predicts codebook q of frame t at
position t + q (the *delay pattern*), so each codebook is predicted after the coarser codebooks
of the same frame have been seen one position earlier. Why this layout rather than the others:

* Q outputs with no delay predict every codebook of a frame independently of the others,
  which is known to blur fine codebooks.
* A per-frame depth decoder (Moshi's depformer) models that dependency exactly but adds a
  second transformer to train and to run Q times per frame.
* The delay pattern keeps one transformer pass per position, costs only Q - 1 extra positions
  per utterance, and with Q = 1 it is exactly the single-codebook layout, so nothing changes for
  the demo's k-means tokenizer.

Layout, for A frames: row p of the delayed grid holds, in column q, frame p - q when
0 <= p - q < A, EOS when p - q == A, and PAD otherwise; the grid has A + Q rows.
"""

from __future__ import annotations

import numpy as np


def as_frames(ids: np.ndarray, num_codebooks: int) -> np.ndarray:
    """Ids as int64 [frames, Q]: accepts [frames] for Q = 1, [frames, Q], or a flat [frames * Q] list.

    Raises:
        ValueError: the size is not a whole number of frames of ``num_codebooks`` ids.
    """
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim == 2:
        if arr.shape[1] != num_codebooks:
            raise ValueError(f"ids have {arr.shape[1]} codebooks per frame, expected {num_codebooks}")
        return arr
    flat = arr.reshape(-1)
    if flat.size % num_codebooks:
        raise ValueError(f"{flat.size} ids are not a whole number of frames of {num_codebooks} codebooks")
    return flat.reshape(-1, num_codebooks)


def delay(frames: np.ndarray, pad: int, eos: int) -> np.ndarray:
    """[A, Q] frames → the [A + Q, Q] delayed grid (see module docstring)."""
    frames = np.asarray(frames, dtype=np.int64)
    length, q_count = frames.shape
    grid = np.full((length + q_count, q_count), pad, dtype=np.int64)
    for q in range(q_count):
        grid[q : q + length, q] = frames[:, q]
        grid[q + length, q] = eos
    return grid


def undelay(grid: np.ndarray, codebook_size: int) -> np.ndarray:
    """A (generated) delayed grid [L, Q] → frames [A, Q].

    The utterance ends at the first frame where any codebook holds something other than a
    real code (EOS, PAD, or a row that was never generated), so a malformed tail is dropped
    rather than decoded as noise.
    """
    grid = np.asarray(grid, dtype=np.int64)
    rows, q_count = grid.shape
    length = max(0, rows - q_count + 1)
    frames = np.stack([grid[q : q + length, q] for q in range(q_count)], axis=1) if length else \
        np.zeros((0, q_count), dtype=np.int64)
    bad = np.nonzero(((frames < 0) | (frames >= codebook_size)).any(axis=1))[0]
    return frames[: bad[0]] if bad.size else frames
