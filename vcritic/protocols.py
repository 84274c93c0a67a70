"""What a plugin of each kind must provide.

These are structural (``typing.Protocol``): a plugin does not inherit from anything in
vcritic, it only has the right methods. ``vcritic.testing`` has small fakes that satisfy
each one, for tests and for plugin authors.

Audio crosses every boundary as ``(samples, sample_rate)`` with ``samples`` a mono
float32 numpy array in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backbone(Protocol):
    """A language model that becomes the shared trunk of a critic.

    ``build`` returns a Hugging Face causal LM (its LM head is the critic's text head) and
    its tokenizer. ``run_layers`` runs a list of that model's decoder layers on a hidden
    state, which lets vcritic copy the top layers into the parallel audio branch.
    """

    def build(self, corpus: Sequence[str] | None = None, special_tokens: Sequence[str] = ()) -> tuple[Any, Any]:
        """Return ``(model, tokenizer)``.

        A backbone built from scratch (no ``path`` in its options) trains its tokenizer on
        ``corpus`` and includes ``special_tokens`` in it; a pretrained one ignores both
        (vcritic adds missing special tokens itself). vcritic saves a from-scratch backbone
        once and rebuilds it everywhere else with ``path`` set to that copy, so a backbone
        plugin must accept a ``path`` option.
        """
        ...

    def decoder_layers(self, model: Any) -> Any:
        """The model's ``nn.ModuleList`` of decoder layers."""
        ...

    def final_norm(self, model: Any) -> Any:
        """The norm applied after the last decoder layer."""
        ...

    def run_layers(self, model: Any, layers: Any, hidden: Any, attention_mask: Any) -> Any:
        """Run ``layers`` (copies of the model's own) causally over ``hidden`` [B, T, H]."""
        ...

    def lora_target_modules(self) -> list[str] | str:
        """Module names LoRA adapts, or one regex (peft matches a list by name suffix, which can
        catch same-named modules in audio/vision towers)."""
        ...

    def spec(self) -> dict[str, Any]:
        """The plugin's options (``path`` among them) that rebuild this backbone."""
        ...


@runtime_checkable
class AudioTokenizer(Protocol):
    """Turns audio into discrete ids and back, and exposes the continuous frames behind the ids.

    ``features`` gives one continuous vector per id frame (what the ids quantise); the critic's
    audio input encoder reads both, so fine detail lost by quantisation still reaches the model.
    """

    sample_rate: int
    frame_rate: float  # ids per second
    vocab_size: int
    feature_dim: int

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Mono float32 audio → float32 [frames, feature_dim], aligned with ``encode``'s ids."""
        ...

    def fit(self, clips: Sequence[np.ndarray]) -> None:
        """Learn what the tokenizer needs from training audio (no-op for pretrained codecs)."""
        ...

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """Mono float32 audio at ``sample_rate`` → int64 ids [frames]."""
        ...

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """int64 ids → mono float32 audio at ``sample_rate``."""
        ...

    def save(self, directory: str) -> None: ...

    def load(self, directory: str) -> None: ...


@runtime_checkable
class Separator(Protocol):
    """Removes speech that talks over music, keeping the music."""

    def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Transcript:
    """A speech turn with times in seconds from the start of the recording."""

    text: str
    start: float
    end: float
    words: tuple[Word, ...] = ()


@runtime_checkable
class ASR(Protocol):
    """Speech recognition with timestamps."""

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> list[Transcript]: ...


@runtime_checkable
class Embedder(Protocol):
    """Fixed-size, L2-normalised embeddings of examples, used for near-duplicate removal."""

    dim: int

    def embed(self, audio: Sequence[np.ndarray], texts: Sequence[str], sample_rate: int) -> np.ndarray:
        """Return float32 [len(audio), dim] with unit rows."""
        ...


@runtime_checkable
class Annotator(Protocol):
    """Writes a critique of a clip in a persona's voice (the MLLM data source)."""

    def annotate(self, samples: np.ndarray, sample_rate: int, context: str, persona: str) -> str: ...


@dataclass(frozen=True)
class JudgeScore:
    """Scores in [0, 1] per dimension, plus the judge's reasoning."""

    completeness: float
    accuracy: float
    novelty: float
    rationale: str = ""

    def weighted(self, weights: tuple[float, float, float] = (0.2, 0.6, 0.2)) -> float:
        wc, wa, wn = weights
        return wc * self.completeness + wa * self.accuracy + wn * self.novelty


@runtime_checkable
class Judge(Protocol):
    """Scores a critique against a reference (open-ended-question evaluation)."""

    def score(self, critique: str, reference: str, context: str) -> JudgeScore: ...


PROTOCOLS: dict[str, type] = {
    "backbones": Backbone,
    "audio_tokenizers": AudioTokenizer,
    "separators": Separator,
    "asr": ASR,
    "embedders": Embedder,
    "annotators": Annotator,
    "judges": Judge,
}
