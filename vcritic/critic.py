"""A trained critic: hear a clip, read a persona, answer with a critique in text and speech.

Generation is greedy and recomputes the whole sequence at each step (no KV cache): simple
and exact for the short outputs critics produce; a cached decoder is a later optimisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vcritic.data.audio import load as load_audio
from vcritic.data.schema import AudioRef, critic_prompt
from vcritic.models.sequence import IGNORE, Streams, build_streams, collate


@dataclass
class Critique:
    text: str
    speech: np.ndarray  # mono float32 at ``sample_rate`` (empty if no speech was produced)
    sample_rate: int
    audio_tokens: list[int]


class Critic:
    """Wraps a loaded joint critic with its text and audio tokenizers."""

    def __init__(self, model, tokenizer, audio_tokenizer, meta: dict[str, Any]) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.audio_tokenizer = audio_tokenizer
        self.meta = meta
        self.vocab = model.vocab

    @classmethod
    def from_export(cls, export_dir: str | Path) -> Critic:
        from vcritic.models.build import load_export

        return cls(*load_export(export_dir))

    # -- inputs -------------------------------------------------------------------------
    def music_inputs(self, audio: str | np.ndarray | AudioRef) -> tuple[list[int], np.ndarray]:
        """Audio ids and continuous frames of a clip (a path, an :class:`AudioRef` or samples)."""
        if isinstance(audio, str):
            audio = AudioRef(audio)
        if isinstance(audio, AudioRef):
            audio = load_audio(audio, self.audio_tokenizer.sample_rate)
        samples = np.asarray(audio, dtype=np.float32)
        ids = [int(i) for i in self.audio_tokenizer.encode(samples)]
        return ids, self.audio_tokenizer.features(samples)[: len(ids)]

    def prompt_ids(self, persona: str, context: str = "") -> list[int]:
        limit = int(self.meta["model"]["max_prompt_tokens"])
        return self.tokenizer(critic_prompt(persona, context))["input_ids"][:limit]

    def _logits(self, streams: Streams, with_audio: bool):
        batch = collate([streams], self.vocab)
        with torch.no_grad():
            return self.model.hidden_and_logits(
                batch["text_ids"], batch["audio_ids"], batch["music_mask"], batch["attention_mask"],
                batch["music_features"], with_audio,
            )

    # -- generation ---------------------------------------------------------------------
    def critique(self, audio, persona: str, context: str = "", max_text_tokens: int = 64,
                 max_audio_tokens: int = 40, speak: bool = True) -> Critique:
        """Greedy critique of one clip: text first, then (if ``speak``) speech tokens decoded to audio."""
        prompt, (music, frames) = self.prompt_ids(persona, context), self.music_inputs(audio)
        text: list[int] = []
        for _ in range(max_text_tokens):
            streams = build_streams(self.vocab, prompt, music, text, None, music_features=frames)
            text_logits, _ = self._logits(self._open_ended(streams), with_audio=False)
            nxt = int(text_logits[0, -1].argmax())
            if nxt == self.vocab.eos:
                break
            text.append(nxt)
        speech: list[int] = []
        if speak and self.model.loss_lambda < 1.0:
            for _ in range(max_audio_tokens):
                streams = build_streams(self.vocab, prompt, music, text, speech, music_features=frames)
                _, audio_logits = self._logits(streams, with_audio=True)
                # Only real codes or EOS may be produced.
                logits = audio_logits[0, -1].clone()
                logits[self.vocab.audio_pad] = logits[self.vocab.audio_bos] = float("-inf")
                nxt = int(logits.argmax())
                if nxt == self.vocab.audio_eos:
                    break
                speech.append(nxt)
        wav = self.audio_tokenizer.decode(np.asarray(speech, dtype=np.int64)) if speech else np.zeros(0, np.float32)
        return Critique(self.tokenizer.decode(text, skip_special_tokens=True).strip(), wav,
                        self.audio_tokenizer.sample_rate, speech)

    @staticmethod
    def _open_ended(streams: Streams) -> Streams:
        """``build_streams`` closes the critique with <eos>; generation wants it left open."""
        cut = len(streams.text) - 1
        return replace(streams, text=streams.text[:cut], audio=streams.audio[:cut], music=streams.music[:cut],
                       text_labels=streams.text_labels[:cut], audio_labels=streams.audio_labels[:cut])

    # -- scoring ------------------------------------------------------------------------
    def continuation_logprob(self, prompt: Sequence[int], music: Sequence[int], frames: np.ndarray | None,
                             prefix: str, continuation: str) -> float:
        """Mean log-probability of the tokens of ``continuation`` when the critique starts
        with ``prefix`` (used to answer single-choice questions)."""
        prefix_ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(prefix + continuation, add_special_tokens=False)["input_ids"]
        start = len(prefix_ids) if full_ids[: len(prefix_ids)] == prefix_ids else 0
        streams = build_streams(self.vocab, prompt, music, full_ids, None, music_features=frames)
        text_logits, _ = self._logits(streams, with_audio=False)
        logp = torch.log_softmax(text_logits[0].float(), dim=-1)
        labels = torch.tensor(streams.text_labels)
        positions = (labels != IGNORE).nonzero().flatten()[start : len(full_ids)]
        return float(logp[positions, labels[positions]].mean())
