"""Writing and speaking critiques: settings, token choice, and the KV-cached decoding loops.

Two ways to decode, giving the same greedy tokens:

* **cached** (the default): the prompt (with the music, heard once by the music encoder or the
  backbone's own audio encoder) is run once; each new text token or speech row is one position
  through the trunk, and for speech through the audio branch too, with KV caches. Many clips go
  together, left-padded, with attention masks and explicit position ids (after the prompt, each row
  counts on from its own last position, as the backbone's multimodal rotary positions do for text).
* **recompute** (``cache=False``, the reference): every token re-runs the whole sequence, one clip
  at a time (:class:`vcritic.critic.Critic` keeps this loop).

Speech comes out in the delay pattern of :mod:`vcritic.models.codebooks`: at row ``p`` codebook ``q``
holds frame ``p - q``; only the first codebook decides where speech ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from vcritic.config import GenerateConfig, generate_problems
from vcritic.models.sequence import IGNORE, Streams, Vocab, collate

__all__ = ["GenerationSettings", "Sampler", "place_row", "generate_text", "generate_speech", "left_pad"]


@dataclass
class GenerationSettings(GenerateConfig):
    """Validated generation settings: the fields of :class:`vcritic.config.GenerateConfig` (one list
    of names and defaults for the config, the export and the calls), built by :meth:`resolve`."""

    @classmethod
    def resolve(cls, base: Mapping[str, Any] | None = None, where: str = "model.generate",
                **overrides: Any) -> GenerationSettings:
        """``base`` (e.g. an export's ``model.generate``) with ``overrides`` (None values are ignored).

        A ``min_*`` above a lowered ``max_*`` is clipped to it, so a caller asking for a short
        critique (``max_text_tokens=4``) is not refused because of the export's minimum.

        Raises:
            ValueError: an unknown key or an invalid value, naming it (``where.<key>``) and the fix.
        """
        values = {**dict(base or {}), **{k: v for k, v in overrides.items() if v is not None}}
        for low, high in (("min_text_tokens", "max_text_tokens"), ("min_audio_tokens", "max_audio_tokens")):
            if high in overrides and isinstance(values.get(high), int) and isinstance(values.get(low), int) \
                    and low not in overrides:
                values[low] = min(values[low], values[high])
        problems = generate_problems(values, where)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sampler:
    """Picks the next token from logits: greedy at temperature 0, else temperature + top-p sampling
    (transformers' logits processors), with a repetition penalty on the critique's own text tokens.

    One sampler per generation call, seeded with ``settings.seed``: the same inputs and settings
    give the same critiques.
    """

    def __init__(self, settings: GenerationSettings, device: torch.device | str = "cpu") -> None:
        from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

        self.settings = settings
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(settings.seed))
        s = settings
        self.penalty = RepetitionPenaltyLogitsProcessor(s.repetition_penalty) if s.repetition_penalty != 1.0 else None

        def warpers(temperature: float, top_p: float) -> list:
            if temperature == 0:
                return []
            out = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
            return out + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])

        self.text_temperature = float(s.temperature)
        self.audio_temperature = float(s.temperature if s.audio_temperature is None else s.audio_temperature)
        self.text_warpers = warpers(self.text_temperature, float(s.top_p))
        self.audio_warpers = warpers(self.audio_temperature, float(s.top_p if s.audio_top_p is None else s.audio_top_p))

    def text_logits(self, logits: torch.Tensor, history: torch.Tensor, step: int, end_id: int) -> torch.Tensor:
        """The scores a text token is chosen from: ``logits`` [B, V] after the repetition penalty over
        ``history`` [B, step] (the critique so far) and, before ``min_text_tokens``, without ``end_id``."""
        scores = logits.float().clone()
        if self.penalty is not None and history.shape[1]:
            scores = self.penalty(history, scores)
        if step < self.settings.min_text_tokens:
            scores[:, end_id] = float("-inf")
        return scores

    def text(self, logits: torch.Tensor, history: torch.Tensor, step: int, end_id: int) -> torch.Tensor:
        """The next text token of each row [B] (long)."""
        return self._choose(self.text_logits(logits, history, step, end_id), self.text_temperature, self.text_warpers)

    def audio(self, logits: torch.Tensor, row: int, vocab: Vocab) -> np.ndarray:
        """The next speech row [B, Q] from audio logits [B, Q, A]: never PAD or BOS; EOS only on the
        first codebook, and not before ``min_audio_tokens`` frames."""
        scores = logits.float().clone()
        scores[..., vocab.audio_pad] = scores[..., vocab.audio_bos] = float("-inf")
        scores[:, 1:, vocab.audio_eos] = float("-inf")
        if row < self.settings.min_audio_tokens:
            scores[:, 0, vocab.audio_eos] = float("-inf")
        b, q, a = scores.shape
        picked = self._choose(scores.reshape(b * q, a), self.audio_temperature, self.audio_warpers)
        return picked.view(b, q).cpu().numpy().astype(np.int64)

    def _choose(self, scores: torch.Tensor, temperature: float, warpers: list) -> torch.Tensor:
        if temperature == 0:
            return scores.argmax(dim=-1)
        for warp in warpers:
            scores = warp(None, scores)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def place_row(row: np.ndarray, p: int, ends: np.ndarray, max_frames: int, vocab: Vocab) -> np.ndarray:
    """Fit chosen speech row ``p`` ([B, Q]) into the delay pattern, in place, and update ``ends``.

    Codebook ``q`` of row ``p`` is frame ``p - q``: PAD before the utterance starts and after it
    ended, EOS exactly at the end. ``ends`` [B] holds each utterance's frame count once its first
    codebook said EOS (-1 before); at ``max_frames`` it is forced to end.

    Returns:
        which rows have finished (their last delayed codebook has reached the end) [B] bool.
    """
    q_count = row.shape[1]
    frame = np.broadcast_to(p - np.arange(q_count)[None, :], row.shape)
    known = (ends >= 0)[:, None]
    end = ends[:, None]
    row[frame < 0] = vocab.audio_pad
    row[known & (frame > end)] = vocab.audio_pad
    row[known & (frame == end)] = vocab.audio_eos
    ends[(ends < 0) & (row[:, 0] == vocab.audio_eos)] = p
    forced = (ends < 0) & (p >= max_frames)
    ends[forced] = max_frames
    row[forced, 0] = vocab.audio_eos
    return (ends >= 0) & (p >= ends + q_count - 1)


# -- batching ------------------------------------------------------------------------------------
PER_POSITION = ("text_ids", "audio_ids", "music_mask", "attention_mask", "text_labels", "audio_labels", "music_features")


def left_pad(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`vcritic.models.sequence.collate`'s right-padded batch, left-padded: every row's last
    position in the last column, so each decoding step appends one column for all rows."""
    lengths = batch["attention_mask"].sum(dim=1)
    width = batch["attention_mask"].shape[1]
    out = dict(batch)
    for key in PER_POSITION:
        if key in batch:
            out[key] = torch.stack([torch.roll(t, int(width - n), dims=0) for t, n in zip(batch[key], lengths, strict=True)])
    return out


def prompt_positions(critic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Position ids of a left-padded prompt: the backbone's own (e.g. Qwen2.5-Omni's mrope, [3, B, T])
    or, for plain rotary positions, 0.. counted over each row's real positions ([B, T])."""
    positions = critic.positions(batch["text_ids"], batch["attention_mask"], batch.get("native_lengths"))
    if positions is None:
        positions = (batch["attention_mask"].long().cumsum(dim=-1) - 1).clamp_min(0)
    return positions


def step_positions(last: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Ids of one new position per row ``last + 1`` ([B]), shaped as the prompt's positions ``like``
    (every mrope axis gets the same id, as for text after the music)."""
    nxt = (last + 1).view(-1, 1)
    return nxt.unsqueeze(0).expand(like.shape[0], -1, -1) if like.ndim == 3 else nxt


def last_positions(positions: torch.Tensor) -> torch.Tensor:
    """Each row's largest position id [B] (over mrope axes too)."""
    last = positions.amax(dim=-1)
    return last.amax(dim=0) if positions.ndim == 3 else last


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _prefill(critic, streams: Sequence[Streams], with_audio: bool):
    """Run left-padded prompts once; returns (text logits, audio logits, caches, mask, positions of the last column)."""
    device = next(critic.parameters()).device
    b = to_device(left_pad(collate(streams, critic.vocab)), device)
    positions = prompt_positions(critic, b)
    embeds = critic.embed(b["text_ids"], b["audio_ids"], b["music_mask"], b.get("music_features"),
                          b.get("native_features"), b.get("native_lengths"))
    trunk_past = critic.new_cache()
    branch_past = critic.new_cache() if with_audio else None
    text, audio = critic.cached_step(embeds, b["attention_mask"], positions, trunk_past, branch_past)
    return text, audio, (trunk_past, branch_past), b["attention_mask"], positions


# -- the cached loops ----------------------------------------------------------------------------
@torch.no_grad()
def generate_text(critic, prompts: Sequence[Streams], sampler: Sampler) -> list[list[int]]:
    """The critique text of each prompt (ids, without the end token), all prompts decoded together."""
    vocab, settings = critic.vocab, sampler.settings
    logits, _, (past, _), mask, positions = _prefill(critic, prompts, with_audio=False)
    last = last_positions(positions)
    rows = len(prompts)
    texts: list[list[int]] = [[] for _ in range(rows)]
    done = np.zeros(rows, dtype=bool)
    history = torch.zeros(rows, 0, dtype=torch.long, device=mask.device)
    audio_pad = torch.full((rows, 1, vocab.num_codebooks), vocab.audio_pad, dtype=torch.long, device=mask.device)
    for step in range(settings.max_text_tokens):
        token = sampler.text(logits, history, step, vocab.end)
        chosen = token.cpu().numpy()
        for i in np.flatnonzero(~done & (chosen != vocab.end)):
            texts[i].append(int(chosen[i]))
        done |= chosen == vocab.end
        if done.all() or step == settings.max_text_tokens - 1:
            break
        history = torch.cat([history, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        embeds = critic.embed_generated(token[:, None], audio_pad)
        logits, _ = critic.cached_step(embeds, mask, step_positions(last, positions), past)
        last = last + 1
    return texts


def speech_prompt(streams: Streams, vocab: Vocab) -> Streams:
    """``prompt + critique + end`` followed by ``<|speech|>`` (audio BOS): the position that predicts row 0."""
    q = vocab.num_codebooks
    n = len(streams) + 1
    return Streams(streams.text + [vocab.speech_start],
                   np.concatenate([streams.audio, np.full((1, q), vocab.audio_bos, dtype=np.int64)]),
                   streams.music + [False], [IGNORE] * n, np.full((n, q), IGNORE, dtype=np.int64),
                   streams.music_features, streams.music_start, streams.native_features)


@torch.no_grad()
def generate_speech(critic, critiques: Sequence[Streams], sampler: Sampler) -> list[np.ndarray]:
    """The delayed speech rows of each ``prompt + critique + end`` ([rows, Q] int64 each), decoded together."""
    vocab, settings = critic.vocab, sampler.settings
    _, logits, (trunk_past, branch_past), mask, positions = _prefill(
        critic, [speech_prompt(s, vocab) for s in critiques], with_audio=True)
    last = last_positions(positions)
    count = len(critiques)
    ends = np.full(count, -1, dtype=np.int64)
    finished = np.zeros(count, dtype=bool)
    rows: list[list[np.ndarray]] = [[] for _ in range(count)]
    slot = torch.full((count, 1), vocab.audio_slot, dtype=torch.long, device=mask.device)
    for p in range(settings.max_audio_tokens + vocab.num_codebooks):
        row = sampler.audio(logits, p, vocab)
        now_done = place_row(row, p, ends, settings.max_audio_tokens, vocab)
        for i in np.flatnonzero(~finished):
            rows[i].append(row[i].copy())
        finished |= now_done
        if finished.all():
            break
        mask = torch.cat([mask, mask.new_ones(count, 1)], dim=1)
        embeds = critic.embed_generated(slot, torch.as_tensor(row, device=mask.device)[:, None])
        _, logits = critic.cached_step(embeds, mask, step_positions(last, positions), trunk_past, branch_past)
        last = last + 1
    return [np.stack(r) for r in rows]
