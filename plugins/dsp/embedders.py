"""Cheap, fit-free example embeddings for near-duplicate removal.

An example is its music and its critique text. The audio half summarises the clip's
spectral envelope (per-band mean and spread of the log-mel); the text half hashes
character n-grams. Both halves are unit vectors, mixed with weights whose squares sum to
one, so every embedding has unit norm and a dot product is a cosine similarity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TOP_DB = 60.0  # bands this far below the clip's loudest are clamped: faint noise cannot move them


PROFILE_SEGMENTS = 8  # time segments of the coarse profile
PROFILE_BANDS = 16  # mel band groups of the coarse profile


class LogMelHashEmbedder:
    """Log-mel statistics plus hashed character n-grams; satisfies ``vcritic.protocols.Embedder``.

    Args:
        n_mels: mel bands; the audio half has ``2 * n_mels`` values (mean and std per band).
        text_dim: hashed n-gram features in the text half.
        audio_weight: share of the squared norm given to audio, in [0, 1].

    Raises:
        ValueError: an option is out of range.
    """

    def __init__(self, n_mels: int = 64, text_dim: int = 256, audio_weight: float = 0.5) -> None:
        if n_mels <= 0 or text_dim <= 0:
            raise ValueError(f"n_mels and text_dim must be positive, got {n_mels} and {text_dim}")
        if not 0.0 <= audio_weight <= 1.0:
            raise ValueError(f"audio_weight must lie in [0, 1], got {audio_weight}")
        self.n_mels = int(n_mels)
        self.text_dim = int(text_dim)
        self.audio_weight = float(audio_weight)
        self.dim = 2 * self.n_mels + PROFILE_SEGMENTS * PROFILE_BANDS + self.text_dim
        self._vectorizer = None

    def audio_vector(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """Unit vector [2 * n_mels + PROFILE_SEGMENTS * PROFILE_BANDS]: per-band log-mel mean and std
        (what the clip sounds like) and a coarse time-by-band profile (what happens when), each
        part centred and equally weighted."""
        import librosa

        y = np.asarray(samples, dtype=np.float32).reshape(-1)
        out = np.zeros(2 * self.n_mels + PROFILE_SEGMENTS * PROFILE_BANDS, dtype=np.float64)
        if y.size == 0 or not np.any(y):
            return out  # silence has no spectral shape; its audio half stays zero
        mel = librosa.feature.melspectrogram(
            y=y, sr=sample_rate, n_fft=1024, hop_length=256, n_mels=self.n_mels
        )
        log_mel = librosa.power_to_db(mel, ref=np.max, top_db=TOP_DB)
        # Centring drops overall level (the dB scale is already relative to the clip's peak), and
        # normalising each half alone keeps the smaller std half from being drowned by the means.
        # Without the time profile, two melodies in one key and timbre look like duplicates.
        bands = np.array_split(log_mel, PROFILE_BANDS, axis=0)
        grouped = np.stack([b.mean(axis=0) for b in bands])  # [PROFILE_BANDS, frames]
        profile = np.stack([seg.mean(axis=1) for seg in np.array_split(grouped, PROFILE_SEGMENTS, axis=1)], axis=1)
        for half, stat in (
            (slice(0, self.n_mels), log_mel.mean(axis=1)),
            (slice(self.n_mels, 2 * self.n_mels), log_mel.std(axis=1)),
            (slice(2 * self.n_mels, None), profile.reshape(-1)),
        ):
            centred = stat - stat.mean()
            norm = np.linalg.norm(centred)
            if norm > 0:
                out[half] = centred / norm
        norm = np.linalg.norm(out)
        return out / norm if norm > 0 else out

    def text_vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors [len(texts), text_dim] of hashed character 3- to 5-grams."""
        from sklearn.feature_extraction.text import HashingVectorizer

        if self._vectorizer is None:
            self._vectorizer = HashingVectorizer(
                analyzer="char_wb",
                ngram_range=(3, 5),
                n_features=self.text_dim,
                alternate_sign=False,
                norm=None,
            )
        counts = self._vectorizer.transform([str(t) for t in texts]).toarray().astype(np.float64)
        norms = np.linalg.norm(counts, axis=1, keepdims=True)
        return np.divide(counts, norms, out=np.zeros_like(counts), where=norms > 0)

    def embed(self, audio: Sequence[np.ndarray], texts: Sequence[str], sample_rate: int) -> np.ndarray:
        """Embed examples as float32 [len(audio), dim] with unit rows.

        A row whose audio is silent and whose text is empty has nothing to describe it and
        is returned as zeros.

        Raises:
            ValueError: ``audio`` and ``texts`` differ in length.
        """
        if len(audio) != len(texts):
            raise ValueError(f"got {len(audio)} audio clips but {len(texts)} texts")
        if len(audio) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        audio_part = np.stack([self.audio_vector(a, sample_rate) for a in audio])
        text_part = self.text_vectors(texts)
        joint = np.concatenate(
            [math.sqrt(self.audio_weight) * audio_part, math.sqrt(1.0 - self.audio_weight) * text_part],
            axis=1,
        )
        # Renormalise so a row missing one half (silence, empty text) is still a unit vector.
        norms = np.linalg.norm(joint, axis=1, keepdims=True)
        joint = np.divide(joint, norms, out=np.zeros_like(joint), where=norms > 0)
        return joint.astype(np.float32)
