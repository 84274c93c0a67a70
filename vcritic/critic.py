"""A trained critic: hear a clip, read a persona, answer with a critique in text and speech.

The critic hears a clip the way it was trained to: through its backbone's own audio encoder
(Qwen2.5-Omni, Kimi-Audio) or through vcritic's music encoder. It writes the critique text, then
(if asked, and if it was trained to speak) the speech, in the delay pattern of
:mod:`vcritic.models.codebooks` (one position per step, all Q codebooks at once).

Decoding is KV-cached and batched over clips by default (:mod:`vcritic.models.generation`); the
settings (lengths, temperature, top-p, repetition penalty, batch size, seed) come from the export's
``model.generate`` and can be overridden per call. ``cache=False`` selects the recompute path, which
re-runs the whole sequence for every token of one clip at a time: the slow reference the cached
path is tested against (same greedy tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vcritic.data.schema import AudioRef
from vcritic.models.codebooks import undelay
from vcritic.models.generation import (
    GenerationSettings,
    Sampler,
    generate_speech,
    generate_text,
    place_row,
    speech_prompt,
)
from vcritic.models.sequence import IGNORE, Heard, Streams, collate, heard_from_columns, heard_streams

__all__ = ["Critic", "Critique", "CritiqueRequest", "Heard"]

log = logging.getLogger(__name__)


@dataclass
class Critique:
    text: str
    speech: np.ndarray  # mono float32 at ``sample_rate`` (empty if no speech was produced)
    sample_rate: int
    audio_tokens: np.ndarray  # int64 [frames, Q]
    text_tokens: list[int] = field(default_factory=list)  # the critique's text ids (without the end token)


@dataclass(frozen=True)
class CritiqueRequest:
    """One clip to critique: a path, an :class:`AudioRef` or mono samples, with the persona and song context."""

    audio: Any
    persona: str
    context: str = ""


class Critic:
    """Wraps a loaded joint critic with its text and audio tokenizers."""

    def __init__(self, model, tokenizer, audio_tokenizer, meta: dict[str, Any]) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.audio_tokenizer = audio_tokenizer
        self.meta = meta
        self.vocab = model.vocab
        self.hearing = model.hearing

    @classmethod
    def from_export(cls, export_dir: str | Path, base_models_dir: str | None = None) -> Critic:
        from vcritic.models.build import load_export

        return cls(*load_export(export_dir, base_models_dir))

    # -- inputs -------------------------------------------------------------------------
    def hear(self, audio: str | np.ndarray | AudioRef, persona: str, context: str = "") -> Heard:
        """A clip (a path, an :class:`AudioRef`, or mono samples at the rate the critic reads)
        and a prompt, as the critic takes them in."""
        from vcritic.data.stages import music_columns
        from vcritic.models.build import prompt_parts

        ref = AudioRef(audio) if isinstance(audio, str) else audio
        cols = music_columns(ref, self.hearing, self.audio_tokenizer)
        parts = prompt_parts(self.tokenizer, self.hearing, self.vocab, persona, context,
                             int(self.meta["model"]["max_prompt_tokens"]))
        return heard_from_columns(cols, self.vocab, parts)

    def heard_row(self, row: dict[str, Any]) -> Heard:
        """The same from a tokenized shard row (``vcritic.data.schema.TOKEN_COLUMNS``)."""
        return heard_from_columns(row, self.vocab)

    def _streams(self, heard: Heard, text: Sequence[int] | None) -> Streams:
        return heard_streams(self.vocab, heard, text)

    def _logits(self, streams: Streams, with_audio: bool):
        batch = collate([streams], self.vocab)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            return self.model.hidden_and_logits(
                batch["text_ids"], batch["audio_ids"], batch["music_mask"], batch["attention_mask"],
                batch.get("music_features"), with_audio, batch.get("native_features"), batch.get("native_lengths"),
            )

    # -- generation ---------------------------------------------------------------------
    def settings(self, **overrides: Any) -> GenerationSettings:
        """The export's generation settings (``model.generate``; defaults for older exports) with
        ``overrides`` (None values ignored). Raises ValueError naming a bad setting."""
        base = (self.meta.get("model") or {}).get("generate") or {}
        return GenerationSettings.resolve(base, **overrides)

    def critique(self, audio, persona: str, context: str = "", *, speak: bool = True,
                 max_text_tokens: int | None = None, max_audio_tokens: int | None = None, **overrides: Any) -> Critique:
        """Critique one clip: text first, then (if ``speak``) speech decoded to audio.

        ``max_text_tokens``, ``max_audio_tokens`` and ``overrides`` (any ``model.generate`` setting:
        ``temperature``, ``top_p``, ``repetition_penalty``, ``seed``, ``cache``, …) replace the export's.
        """
        return self.critique_batch([(audio, persona, context)], speak=speak, max_text_tokens=max_text_tokens,
                                   max_audio_tokens=max_audio_tokens, **overrides)[0]

    def critique_batch(self, items: Iterable[CritiqueRequest | Sequence[Any]], *, speak: bool = True,
                       **overrides: Any) -> list[Critique]:
        """Critique many clips, ``batch_size`` at a time: ``items`` are :class:`CritiqueRequest` or
        ``(audio, persona[, context])`` tuples. Greedy results equal one :meth:`critique` per clip."""
        settings = self.settings(**overrides)
        heards = [self.hear(*_request(item)) for item in items]
        return self.generate(heards, speak=speak, settings=settings)

    def generate(self, heards: Sequence[Heard], *, speak: bool = True,
                 settings: GenerationSettings | None = None) -> list[Critique]:
        """Critiques of already-heard clips (:meth:`hear`, :meth:`heard_row`)."""
        settings = settings or self.settings()
        sampler = Sampler(settings, self._device())
        speak = speak and self.model.loss_lambda < 1.0
        out: list[Critique] = []
        for start in range(0, len(heards), settings.batch_size):
            chunk = list(heards[start : start + settings.batch_size])
            texts = self._write(chunk, sampler)
            frames = self._say(chunk, texts, sampler) if speak else [None] * len(chunk)
            out.extend(self._finish(t, f) for t, f in zip(texts, frames, strict=True))
        return out

    def _write(self, heards: list[Heard], sampler: Sampler) -> list[list[int]]:
        if sampler.settings.cache:
            return generate_text(self.model, [self._streams(h, None) for h in heards], sampler)
        return [self._write_recompute(h, sampler) for h in heards]

    def _say(self, heards: list[Heard], texts: list[list[int]], sampler: Sampler) -> list[np.ndarray]:
        critiques = [self._streams(h, t) for h, t in zip(heards, texts, strict=True)]
        if sampler.settings.cache and self.model.can_cache_speech:
            return generate_speech(self.model, critiques, sampler)
        if sampler.settings.cache and not getattr(self, "_warned_recompute", False):
            log.warning("backbone %s has no run_layers_cached (vcritic.protocols.CachedBackbone): speech is "
                        "generated on the recompute path (same tokens, much slower)", type(self.model.backbone).__name__)
            self._warned_recompute = True
        return [self._say_recompute(c, sampler) for c in critiques]

    def _finish(self, text: list[int], grid: np.ndarray | None) -> Critique:
        q = self.vocab.num_codebooks
        frames = undelay(grid, self.vocab.audio_codes) if grid is not None and len(grid) else np.zeros((0, q), np.int64)
        wav = self.audio_tokenizer.decode(frames) if len(frames) else np.zeros(0, np.float32)
        return Critique(self.tokenizer.decode(text, skip_special_tokens=True).strip(), wav,
                        self.audio_tokenizer.sample_rate, frames, list(text))

    # -- the recompute path (the reference for the cached one) ---------------------------------
    def _write_recompute(self, heard: Heard, sampler: Sampler) -> list[int]:
        """Text of one clip, re-running the whole sequence for every token."""
        text: list[int] = []
        device = self._device()
        for step in range(sampler.settings.max_text_tokens):
            streams = self._streams(heard, text)
            text_logits, _ = self._logits(streams.cut(len(streams) - 1), with_audio=False)  # leave the critique open
            history = torch.tensor([text], dtype=torch.long, device=device).view(1, -1)
            nxt = int(sampler.text(text_logits[:, -1], history, step, self.vocab.end)[0])
            if nxt == self.vocab.end:
                break
            text.append(nxt)
        return text

    def _say_recompute(self, streams: Streams, sampler: Sampler) -> np.ndarray:
        """The delayed speech rows of one ``prompt + critique + end``, re-running the whole sequence per row."""
        v, q_count, limit = self.vocab, self.vocab.num_codebooks, sampler.settings.max_audio_tokens
        prompt = speech_prompt(streams, v)
        rows: list[np.ndarray] = []
        ends = np.full(1, -1, dtype=np.int64)
        for p in range(limit + q_count):
            grid = np.concatenate([prompt.audio, *[r[None] for r in rows]]) if rows else prompt.audio
            n = len(prompt) + len(rows)
            step = Streams(prompt.text + [v.audio_slot] * len(rows), grid, prompt.music + [False] * len(rows),
                           [IGNORE] * n, np.full((n, q_count), IGNORE), prompt.music_features, prompt.music_start,
                           prompt.native_features)
            _, audio_logits = self._logits(step, with_audio=True)
            row = sampler.audio(audio_logits[:, -1], p, v)
            done = place_row(row, p, ends, limit, v)
            rows.append(row[0])
            if done[0]:
                break
        return np.stack(rows)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- scoring ------------------------------------------------------------------------
    def continuation_logprob(self, heard: Heard, prefix: str, continuation: str) -> float:
        """Mean log-probability of the tokens of ``continuation`` when the critique starts
        with ``prefix`` (used to answer single-choice questions)."""
        prefix_ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(prefix + continuation, add_special_tokens=False)["input_ids"]
        start = len(prefix_ids) if full_ids[: len(prefix_ids)] == prefix_ids else 0
        streams = self._streams(heard, full_ids)
        text_logits, _ = self._logits(streams, with_audio=False)
        logp = torch.log_softmax(text_logits[0].float(), dim=-1)
        labels = torch.tensor(streams.text_labels, device=logp.device)
        positions = (labels != IGNORE).nonzero().flatten()[start : len(full_ids)]
        return float(logp[positions, labels[positions]].mean())


def _request(item: CritiqueRequest | Sequence[Any]) -> tuple[Any, str, str]:
    """``(audio, persona, context)`` of one item of :meth:`Critic.critique_batch`."""
    if isinstance(item, CritiqueRequest):
        return item.audio, item.persona, item.context
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], (item[2] if len(item) == 3 else "") or ""
    raise TypeError(f"critique_batch items must be CritiqueRequest or (audio, persona[, context]) tuples, "
                    f"got {type(item).__name__}")
