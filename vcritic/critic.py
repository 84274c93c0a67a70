"""A trained critic: hear a clip, read a persona, answer with a critique in text and speech.

The critic hears a clip the way it was trained to: through its backbone's own audio encoder
(Qwen2.5-Omni, Kimi-Audio) or through vcritic's music encoder. Generation is greedy and
recomputes the whole sequence at each step (no KV cache): simple and exact for short
outputs; a cached decoder is a later optimisation. Speech is generated in the delay pattern
of :mod:`vcritic.models.codebooks` (one position per step, all Q codebooks at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vcritic.data.schema import AudioRef
from vcritic.models.codebooks import undelay
from vcritic.models.sequence import IGNORE, Heard, Streams, collate, heard_from_columns, heard_streams

__all__ = ["Critic", "Critique", "Heard"]


@dataclass
class Critique:
    text: str
    speech: np.ndarray  # mono float32 at ``sample_rate`` (empty if no speech was produced)
    sample_rate: int
    audio_tokens: np.ndarray  # int64 [frames, Q]


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
    def critique(self, audio, persona: str, context: str = "", max_text_tokens: int = 64,
                 max_audio_tokens: int = 40, speak: bool = True) -> Critique:
        """Greedy critique of one clip: text first, then (if ``speak``) speech decoded to audio."""
        heard = self.hear(audio, persona, context)
        text: list[int] = []
        for _ in range(max_text_tokens):
            streams = self._streams(heard, text)
            text_logits, _ = self._logits(streams.cut(len(streams) - 1), with_audio=False)  # leave the critique open
            nxt = int(text_logits[0, -1].argmax())
            if nxt == self.vocab.end:
                break
            text.append(nxt)
        frames = np.zeros((0, self.vocab.num_codebooks), dtype=np.int64)
        if speak and self.model.loss_lambda < 1.0:
            frames = self._speak(self._streams(heard, text), max_audio_tokens)
        wav = self.audio_tokenizer.decode(frames) if len(frames) else np.zeros(0, np.float32)
        return Critique(self.tokenizer.decode(text, skip_special_tokens=True).strip(), wav,
                        self.audio_tokenizer.sample_rate, frames)

    def _speak(self, streams: Streams, max_frames: int) -> np.ndarray:
        """Generate the delayed grid row by row; codebook q of frame t comes out at row t + q."""
        v, q_count = self.vocab, self.vocab.num_codebooks
        rows: list[np.ndarray] = []
        end: int | None = None  # frames in the utterance, once codebook 0 has said EOS
        for p in range(max_frames + q_count):
            text = streams.text + [v.speech_start] + [v.audio_slot] * len(rows)
            grid = np.concatenate([streams.audio, np.full((1, q_count), v.audio_bos), *[r[None] for r in rows]])
            step = Streams(text, grid, streams.music + [False] * (len(rows) + 1), [IGNORE] * len(text),
                           np.full((len(text), q_count), IGNORE), streams.music_features, streams.music_start,
                           streams.native_features)
            _, audio_logits = self._logits(step, with_audio=True)
            logits = audio_logits[0, -1].float().clone()  # [Q, A]
            logits[:, v.audio_pad] = logits[:, v.audio_bos] = float("-inf")
            logits[1:, v.audio_eos] = float("-inf")  # only the first codebook decides where speech ends
            row = logits.argmax(dim=-1).cpu().numpy().astype(np.int64)
            for q in range(q_count):
                frame = p - q
                if frame < 0 or (end is not None and frame > end):
                    row[q] = v.audio_pad
                elif end is not None and frame == end:
                    row[q] = v.audio_eos
            if end is None and row[0] == v.audio_eos:
                end = p
            if end is None and p >= max_frames:
                end = max_frames
                row[0] = v.audio_eos
            rows.append(row)
            if end is not None and p >= end + q_count - 1:
                break
        return undelay(np.stack(rows), v.audio_codes) if rows else np.zeros((0, q_count), dtype=np.int64)

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
