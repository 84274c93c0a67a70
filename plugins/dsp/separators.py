"""Separators that need no speech model (``vcritic.protocols.Separator``)."""

from __future__ import annotations

import numpy as np


class IdentitySeparator:
    """Returns the music unchanged.

    For sources with no speech over the music, such as clean clips given to an MLLM
    annotator, where any separation would only add artefacts.
    """

    def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Return a float32 copy of ``samples`` (``sample_rate`` is unused)."""
        return np.array(samples, dtype=np.float32, copy=True)


class HarmonicSeparator:
    """Keeps the harmonic part of a median-filter harmonic/percussive split (librosa HPSS).

    Speech consonants, claps and mouth noise over a track are mostly percussive, so
    dropping that part reduces talk-over noise while keeping sustained notes.

    Args:
        margin: how much stronger a bin's harmonic estimate must be than its percussive one
            to count as harmonic; above 1 leaves ambiguous bins out of both parts.

    Raises:
        ValueError: ``margin`` is below 1.
    """

    def __init__(self, margin: float = 2.0) -> None:
        if margin < 1.0:
            raise ValueError(f"margin must be at least 1.0, got {margin}")
        self.margin = float(margin)

    def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Return the harmonic component of ``samples`` as float32 of the same length.

        Raises:
            ValueError: ``samples`` is not one-dimensional.
        """
        import librosa

        y = np.asarray(samples, dtype=np.float32)
        if y.ndim != 1:
            raise ValueError(f"expected mono audio of shape [samples], got shape {y.shape}")
        if y.size == 0:
            return y.copy()
        harmonic = librosa.effects.harmonic(y, margin=self.margin)
        return np.clip(harmonic, -1.0, 1.0).astype(np.float32, copy=False)
