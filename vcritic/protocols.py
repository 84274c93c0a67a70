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

    def run_layers(self, model: Any, layers: Any, hidden: Any, attention_mask: Any, position_ids: Any = None) -> Any:
        """Run ``layers`` (copies of the model's own) causally over ``hidden`` [B, T, H].

        ``position_ids`` are what :meth:`NativeHearing.position_ids` gave the trunk (None: 0..T-1).
        """
        ...

    def lora_target_modules(self) -> list[str] | str:
        """Module names LoRA adapts, or one regex (peft matches a list by name suffix, which can
        catch same-named modules in audio/vision towers)."""
        ...

    def spec(self) -> dict[str, Any]:
        """The plugin's options (``path`` among them) that rebuild this backbone."""
        ...

    def native_hearing(self) -> NativeHearing | None:
        """How the critic hears music through this backbone.

        None: the backbone has no audio input, and vcritic's own music encoder (the audio
        tokenizer's ids and continuous frames) feeds it. Otherwise a :class:`NativeHearing`:
        the music goes through the backbone's own (pretrained) audio encoder, laid out in the
        prompt exactly as the model's own processor lays it out.
        """
        ...

    def init_audio_side(self, critic: Any) -> None:
        """Load pretrained audio-output weights into a freshly built critic.

        A checkpoint that already has a speech output (Kimi-Audio's audio layers and head)
        fills ``critic.audio_embed``, ``audio_branch``, ``audio_norm``, ``audio_head`` and
        ``hearing_encoder`` here; most backbones do nothing. Not called when an export loads.
        """
        ...


@runtime_checkable
class CachedBackbone(Backbone, Protocol):
    """A :class:`Backbone` whose copied layers can also run with a KV cache (fast generation).

    Optional: a backbone without ``run_layers_cached`` still works; vcritic's critic then speaks
    through the recompute path (every audio row re-runs the whole sequence), with the same tokens.
    """

    def run_layers_cached(self, model: Any, layers: Any, hidden: Any, attention_mask: Any, position_ids: Any,
                          past: Any) -> Any:
        """:meth:`Backbone.run_layers` for the new positions only.

        ``hidden`` [B, T_new, H] holds the positions after the ``past.get_seq_length(i)`` ones the
        cache already has (for each layer ``i`` = ``layer.self_attn.layer_idx`` of ``layers``);
        ``attention_mask`` [B, past + T_new] covers both; ``position_ids`` are the new positions'
        (the trunk's layout: [B, T_new], or e.g. [3, B, T_new] for multimodal rotary positions);
        ``past`` is a transformers ``Cache`` the layers update in place.
        """
        ...


@dataclass(frozen=True)
class PromptParts:
    """The token layout around the music in a critic's prompt.

    A critique example is ``before_music + [slot_id] * n + after_music + critique + [end_id]``,
    where ``n`` is the number of positions the music takes.
    """

    before_music: list[int]
    """Ids up to and including the token that opens the music."""
    after_music: list[int]
    """Ids from the token that closes the music up to where the critique starts."""
    slot_id: int
    """The id every music position carries in the text stream."""
    end_id: int
    """The id that ends a critique (the end-of-turn token of a chat model)."""


@runtime_checkable
class NativeHearing(Protocol):
    """A backbone's own audio input: feature extractor, prompt layout and audio encoder.

    vcritic calls ``features`` in the data stage (per clip, on CPU workers), lays the prompt
    out with ``prompt`` and ``num_audio_tokens``, and in the model runs ``encoder`` on the
    padded features, ``merge`` to place its output among the token embeddings and
    ``position_ids`` for the trunk, so the trunk sees what its own processor and forward
    would give it.
    """

    sample_rate: int
    feature_dim: int
    max_seconds: float
    """Longest clip the encoder takes; vcritic cuts longer clips and counts them."""
    uses_audio_tokens: bool
    """True: the music positions also carry the audio tokenizer's ids in the audio stream."""

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Mono float32 at ``sample_rate`` (at most ``max_seconds``) → float32 [frames, feature_dim]."""
        ...

    def num_audio_tokens(self, frames: int) -> int:
        """How many prompt positions ``frames`` feature rows become."""
        ...

    def prompt(self, tokenizer: Any, persona: str, context: str) -> PromptParts:
        """The model's own (chat) layout for the persona, the song context and the music."""
        ...

    def encoder(self, model: Any) -> Any:
        """An ``nn.Module``: ``encoder(features [B, F, D], lengths [B])`` → [Σ tokens, H] in batch order."""
        ...

    def merge(self, text_embeds: Any, audio_embeds: Any, music_mask: Any, encoded: Any) -> Any:
        """The trunk's ``inputs_embeds`` from both streams' embeddings and the encoded music."""
        ...

    def position_ids(self, model: Any, text_ids: Any, attention_mask: Any, lengths: Any) -> Any:
        """Position ids for the trunk (e.g. multimodal rotary positions), or None for 0..T-1."""
        ...

    def set_trainable(self, model: Any, encoder: Any, train_encoder: bool, train_projection: bool) -> None:
        """Freeze the audio encoder unless ``train_encoder``; train its output projection if asked."""
        ...


@runtime_checkable
class AudioTokenizer(Protocol):
    """Turns audio into discrete ids and back, and exposes the continuous frames behind the ids.

    A frame holds ``num_codebooks`` ids (Q), each in ``[0, codebook_size)``; a speech codec
    such as Mimi has several codebooks, the first of them semantic. ``features`` gives one
    continuous vector per frame (what the ids quantise); vcritic's music encoder reads both,
    so fine detail lost by quantisation still reaches the model.
    """

    sample_rate: int
    frame_rate: float  # frames per second
    num_codebooks: int
    codebook_size: int
    feature_dim: int

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Mono float32 audio → float32 [frames, feature_dim], aligned with ``encode``'s ids."""
        ...

    def fit(self, clips: Sequence[np.ndarray]) -> None:
        """Learn what the tokenizer needs from training audio (no-op for pretrained codecs)."""
        ...

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """Mono float32 audio at ``sample_rate`` → int64 ids [frames, num_codebooks] ([frames] when Q = 1)."""
        ...

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """int64 ids [frames, num_codebooks] ([frames] when Q = 1) → mono float32 audio at ``sample_rate``."""
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
    """One judge's scores of one critique, each normalised to [0, 1].

    A dimension is None when the judge's reply could not be read as a score (or the request
    failed): such a score is missing, never 0, so it cannot drag a mean down.
    """

    completeness: float | None
    accuracy: float | None
    novelty: float | None
    rationale: str = ""

    @property
    def unparsed(self) -> list[str]:
        """The dimensions without a score."""
        return [d for d in ("completeness", "accuracy", "novelty") if getattr(self, d) is None]

    def weighted(self, weights: tuple[float, float, float] = (0.2, 0.6, 0.2)) -> float:
        """The composite ``Σ w·s / Σ w`` (in [0, 1] for any non-negative weights).

        Raises:
            ValueError: a dimension is unscored (a composite of a partial score would be
                silently biased), or the weights sum to 0.
        """
        if self.unparsed:
            raise ValueError(f"no composite: the judge's {', '.join(self.unparsed)} reply had no readable score")
        total = float(sum(weights))
        if total <= 0:
            raise ValueError(f"composite weights must sum to more than 0, got {tuple(weights)}")
        wc, wa, wn = weights
        return (wc * self.completeness + wa * self.accuracy + wn * self.novelty) / total  # type: ignore[operator]


@runtime_checkable
class Judge(Protocol):
    """A chat model that grades critiques (open-ended-question evaluation).

    The judge only answers chat messages; :mod:`vcritic.evaluate.oeq` writes the three rubric
    prompts, reads the scores out of the replies and caches them, so every judge plugin grades
    the same way. ``model`` names what answers (it is part of the reply-cache key). ``score``
    runs the three rubrics on one critique: inherit :class:`vcritic.evaluate.oeq.RubricScoring`
    to get it from ``complete``.
    """

    model: str

    def complete(self, messages: list[dict[str, str]]) -> str:
        """Reply to OpenAI-style ``[{"role": "system"|"user", "content": str}, ...]`` with text.

        Raises an error naming the endpoint when the request fails after the plugin's retries.
        """
        ...

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


def missing_members(obj: Any, protocol: type) -> list[str]:
    """Names ``protocol`` requires that ``obj`` lacks (methods and attributes), in protocol order."""
    names: list[str] = []
    for base in reversed(protocol.__mro__):
        if base in (object, Protocol) or not getattr(base, "_is_protocol", False):
            continue
        for name in [*getattr(base, "__annotations__", {}), *vars(base)]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return [n for n in names if not hasattr(obj, n)]
