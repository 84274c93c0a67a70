"""Audio tokenizer that quantises log-mel frames with k-means (no pretrained codec needed).

Each id is the nearest of ``codebook_size`` learnt log-mel centroids for one frame of
``1 / frame_rate`` seconds. Decoding turns the centroids back into a mel power spectrogram
and runs Griffin-Lim, which is crude but enough to hear pitch and timbre in the demo.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

LOG_FLOOR = 1e-6  # keeps log() finite on silent bands
CODEBOOK_FILE = "codebook.npy"
CONFIG_FILE = "tokenizer.json"


class MelKMeansTokenizer:
    """K-means codebook over log-mel frames; satisfies ``vcritic.protocols.AudioTokenizer``.

    Args:
        sample_rate: audio rate the tokenizer reads and writes.
        frame_rate: ids per second; ``sample_rate / frame_rate`` must be a whole number of samples.
        n_mels: mel bands per frame (the k-means dimension).
        codebook_size: number of centroids, which is also ``vocab_size``.
        n_fft: FFT size of the analysis window.
        seed: k-means seed; the same seed and frames give the same codebook.
        griffin_lim_iters: phase-recovery iterations used by :meth:`decode`.

    Raises:
        ValueError: an option is out of range or the hop is not a whole number of samples.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        frame_rate: float = 12.5,
        n_mels: int = 64,
        codebook_size: int = 128,
        n_fft: int = 1024,
        seed: int = 0,
        griffin_lim_iters: int = 32,
    ) -> None:
        for name, value in (
            ("sample_rate", sample_rate),
            ("frame_rate", frame_rate),
            ("n_mels", n_mels),
            ("codebook_size", codebook_size),
            ("n_fft", n_fft),
            ("griffin_lim_iters", griffin_lim_iters),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        hop = sample_rate / frame_rate
        if abs(hop - round(hop)) > 1e-9:
            raise ValueError(
                f"sample_rate={sample_rate} / frame_rate={frame_rate} = {hop} is not a whole number of "
                f"samples; pick a frame_rate that divides the sample rate exactly"
            )
        self.sample_rate = int(sample_rate)
        self.frame_rate = float(frame_rate)
        self.n_mels = int(n_mels)
        self.codebook_size = int(codebook_size)
        self.num_codebooks = 1
        self.vocab_size = self.codebook_size  # alias (ids of the one codebook)
        self.feature_dim = self.n_mels
        self.n_fft = int(n_fft)
        self.seed = int(seed)
        self.griffin_lim_iters = int(griffin_lim_iters)
        self.hop_length = int(round(hop))
        self.codebook: np.ndarray | None = None
        self._index: Any = None

    # ------------------------------------------------------------------ features

    def options(self) -> dict[str, Any]:
        """The constructor options that rebuild this tokenizer (what ``tokenizer.json`` holds)."""
        return {
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "n_mels": self.n_mels,
            "codebook_size": self.codebook_size,
            "n_fft": self.n_fft,
            "seed": self.seed,
            "griffin_lim_iters": self.griffin_lim_iters,
        }

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Log-mel frames of mono audio as float32 [frames, n_mels]."""
        import librosa

        y = np.asarray(samples, dtype=np.float32)
        if y.ndim != 1:
            raise ValueError(f"expected mono audio of shape [samples], got shape {y.shape}")
        mel = librosa.feature.melspectrogram(
            y=y,
            sr=self.sample_rate,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            n_mels=self.n_mels,
            power=2.0,
        )
        return np.ascontiguousarray(np.log(mel + LOG_FLOOR).T, dtype=np.float32)

    # ------------------------------------------------------------------ codebook

    def fit(self, clips: Sequence[np.ndarray]) -> None:
        """Learn the codebook from the frames of ``clips``.

        Raises:
            ValueError: no clips, or fewer frames in total than ``codebook_size``.
        """
        import faiss

        if len(clips) == 0:
            raise ValueError("fit() needs at least one clip")
        frames = np.concatenate([self.features(c) for c in clips], axis=0)
        if frames.shape[0] < self.codebook_size:
            seconds = self.codebook_size / self.frame_rate
            raise ValueError(
                f"k-means needs at least codebook_size={self.codebook_size} frames but the clips give "
                f"{frames.shape[0]}; provide about {seconds:.1f}s of audio or more, or lower codebook_size"
            )
        # min_points_per_centroid only silences faiss's "too few points" warning; it changes no result.
        kmeans = faiss.Kmeans(
            self.n_mels, self.codebook_size, niter=20, seed=self.seed, min_points_per_centroid=1
        )
        kmeans.train(frames)
        self._set_codebook(np.asarray(kmeans.centroids, dtype=np.float32))

    def _set_codebook(self, codebook: np.ndarray) -> None:
        import faiss

        expected = (self.codebook_size, self.n_mels)
        if codebook.shape != expected:
            raise ValueError(
                f"codebook has shape {codebook.shape}, expected {expected} (codebook_size, n_mels)"
            )
        if not np.all(np.isfinite(codebook)):
            raise ValueError("codebook has NaN or infinite values")
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        index = faiss.IndexFlatL2(self.n_mels)
        index.add(self.codebook)
        self._index = index

    def _require_codebook(self, action: str) -> np.ndarray:
        if self.codebook is None:
            raise RuntimeError(
                f"MelKMeansTokenizer cannot {action} before it has a codebook; call fit(clips) or load(directory)"
            )
        return self.codebook

    # ------------------------------------------------------------------ ids

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """Mono float32 audio at ``sample_rate`` → int64 ids [frames] (nearest centroid per frame).

        Raises:
            RuntimeError: the tokenizer has not been fitted or loaded.
        """
        self._require_codebook("encode")
        frames = self.features(samples)
        _, nearest = self._index.search(frames, 1)
        return nearest[:, 0].astype(np.int64)

    def _synthesis_hop(self) -> int:
        # Griffin-Lim needs overlapping windows, so decode on a finer hop that divides the id hop.
        divisors = (
            self.hop_length // sub for sub in range(1, self.hop_length + 1) if self.hop_length % sub == 0
        )
        return next(hop for hop in divisors if hop <= max(1, self.n_fft // 4))

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """int64 ids [frames] (or [frames, 1]) → mono float32 audio of ``len(ids) * hop_length`` samples at ``sample_rate``.

        Raises:
            RuntimeError: the tokenizer has not been fitted or loaded.
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        import librosa

        codebook = self._require_codebook("decode")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 2 and ids.shape[1] != 1:
            raise ValueError(f"mel_kmeans has one codebook; got ids of shape {ids.shape}")
        ids = ids.reshape(-1)
        if ids.size == 0:
            return np.zeros(0, dtype=np.float32)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
        hop = self._synthesis_hop()
        repeat = self.hop_length // hop
        # Fine frame j sits at j * hop, nearest to id frame j / repeat (ids are centred frames too).
        fine = np.minimum((np.arange(ids.size * repeat + 1) + repeat // 2) // repeat, ids.size - 1)
        mel = np.maximum(np.exp(codebook[ids[fine]].astype(np.float64)) - LOG_FLOOR, 0.0).T
        # mel_to_audio split in two so Griffin-Lim gets a seed: decoding is deterministic.
        magnitude = librosa.feature.inverse.mel_to_stft(mel, sr=self.sample_rate, n_fft=self.n_fft, power=2.0)
        audio = librosa.griffinlim(
            magnitude,
            n_iter=self.griffin_lim_iters,
            hop_length=hop,
            n_fft=self.n_fft,
            length=ids.size * self.hop_length,
            random_state=self.seed,
        )
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        if peak > 1.0:  # Griffin-Lim can overshoot; keep the protocol's [-1, 1] range
            audio = audio / peak
        return audio.astype(np.float32)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str) -> None:
        """Write ``codebook.npy`` and ``tokenizer.json`` into ``directory`` (created if needed).

        Raises:
            RuntimeError: the tokenizer has not been fitted or loaded.
        """
        codebook = self._require_codebook("save")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / CODEBOOK_FILE, codebook)
        (out / CONFIG_FILE).write_text(json.dumps(self.options(), indent=2, sort_keys=True) + "\n")

    def load(self, directory: str) -> None:
        """Read a tokenizer written by :meth:`save`; its saved options replace this instance's.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the options are invalid or the codebook does not match them.
        """
        src = Path(directory)
        for name in (CODEBOOK_FILE, CONFIG_FILE):
            if not (src / name).is_file():
                raise FileNotFoundError(f"{src / name} not found; is {src} a saved mel_kmeans tokenizer?")
        options = json.loads((src / CONFIG_FILE).read_text())
        try:
            fresh = type(self)(**options)
        except TypeError as exc:
            raise ValueError(f"{src / CONFIG_FILE} has unexpected options: {exc}") from exc
        fresh._set_codebook(np.load(src / CODEBOOK_FILE, allow_pickle=False))
        self.__dict__.update(fresh.__dict__)  # only after validation, so a failed load changes nothing

    @classmethod
    def from_directory(cls, directory: str) -> MelKMeansTokenizer:
        """Build a tokenizer from a directory written by :meth:`save`."""
        tok = cls()
        tok.load(directory)
        return tok
