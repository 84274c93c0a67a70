"""How one example becomes two aligned token streams with separate loss masks.

Every position carries a text id *and* an audio id. The layout of one example::

    text : prompt…  <|music|>  <|audio|>×M  <|/music|>  critique… <eos>  <|speech|>  <|audio|>×A
    audio: PAD…     PAD        m1 … mM      PAD         PAD…      PAD    BOS         a1 … aA

Labels sit at the position that predicts them (no shifting later):

* text labels on ``<|/music|>`` … last critique token → critique tokens then ``<eos>``;
* audio labels on ``<|speech|>`` … ``aA`` → ``a1 … aA`` then audio EOS.

Audio ids live in their own vocabulary: the audio tokenizer's ids, then PAD, BOS, EOS.
Over the music span, the tokenizer's continuous frames ride along (zeros elsewhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100
MUSIC_START, MUSIC_END, AUDIO_SLOT, SPEECH_START = "<|music|>", "<|/music|>", "<|audio|>", "<|speech|>"
SPECIAL_TOKENS = (MUSIC_START, MUSIC_END, AUDIO_SLOT, SPEECH_START)


@dataclass(frozen=True)
class Vocab:
    """Ids of the special tokens in both streams, and the width of the music frames."""

    music_start: int
    music_end: int
    audio_slot: int
    speech_start: int
    eos: int
    pad: int
    audio_codes: int  # size of the audio tokenizer's vocabulary
    feature_dim: int  # width of the audio tokenizer's continuous frames

    @property
    def audio_pad(self) -> int:
        return self.audio_codes

    @property
    def audio_bos(self) -> int:
        return self.audio_codes + 1

    @property
    def audio_eos(self) -> int:
        return self.audio_codes + 2

    @property
    def audio_vocab_size(self) -> int:
        return self.audio_codes + 3

    @classmethod
    def from_tokenizer(cls, tokenizer, audio_codes: int, feature_dim: int) -> Vocab:
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        unknown = [t for t, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"tokenizer lacks special tokens {unknown}; call vcritic.models.build.add_special_tokens first")
        return cls(*ids, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, audio_codes=audio_codes,
                   feature_dim=feature_dim)


@dataclass
class Streams:
    """One example, unpadded."""

    text: list[int]
    audio: list[int]
    music: list[bool]
    text_labels: list[int]
    audio_labels: list[int]
    music_features: np.ndarray | None = None  # [music frames, feature_dim]
    music_start: int = 0  # position of the first music frame


def build_streams(
    vocab: Vocab,
    prompt_ids: Sequence[int],
    music_tokens: Sequence[int],
    target_text_ids: Sequence[int] | None = None,
    target_audio_tokens: Sequence[int] | None = None,
    with_speech: bool = True,
    music_features: np.ndarray | None = None,
) -> Streams:
    """Lay out one example. With no targets, the result is a generation prompt ending at ``<|/music|>``.

    Raises:
        ValueError: ``music_features`` does not have one row of ``feature_dim`` per music token.
    """
    prompt, music = list(prompt_ids), list(music_tokens)
    if music_features is not None and np.shape(music_features) != (len(music), vocab.feature_dim):
        raise ValueError(f"music_features has shape {np.shape(music_features)}, expected "
                         f"({len(music)}, {vocab.feature_dim}): one frame per music token")
    text = prompt + [vocab.music_start] + [vocab.audio_slot] * len(music) + [vocab.music_end]
    audio = [vocab.audio_pad] * (len(prompt) + 1) + music + [vocab.audio_pad]
    is_music = [False] * (len(prompt) + 1) + [True] * len(music) + [False]
    text_labels = [IGNORE] * len(text)
    audio_labels = [IGNORE] * len(text)
    if target_text_ids is not None:
        critique = list(target_text_ids)
        # <|/music|> predicts the first critique token; the last critique token predicts <eos>.
        text_labels[-1] = (critique + [vocab.eos])[0]
        text += critique + [vocab.eos]
        audio += [vocab.audio_pad] * (len(critique) + 1)
        is_music += [False] * (len(critique) + 1)
        text_labels += (critique + [vocab.eos])[1:] + [IGNORE]
        audio_labels += [IGNORE] * (len(critique) + 1)
        if with_speech and target_audio_tokens is not None:
            speech = list(target_audio_tokens)
            text += [vocab.speech_start] + [vocab.audio_slot] * len(speech)
            audio += [vocab.audio_bos] + speech
            is_music += [False] * (len(speech) + 1)
            text_labels += [IGNORE] * (len(speech) + 1)
            audio_labels += speech + [vocab.audio_eos]
    return Streams(text, audio, is_music, text_labels, audio_labels, music_features, len(prompt) + 1)


def collate(examples: Sequence[Streams], vocab: Vocab) -> dict[str, torch.Tensor]:
    """Right-pad a batch into tensors [B, T]."""
    length = max(len(e.text) for e in examples)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)

    features = torch.zeros(len(examples), length, vocab.feature_dim)
    for row, e in enumerate(examples):
        if e.music_features is not None and len(e.music_features):
            frames = torch.as_tensor(np.asarray(e.music_features, dtype=np.float32))
            features[row, e.music_start : e.music_start + frames.shape[0]] = frames
    return {
        "music_features": features,
        "text_ids": pad([e.text for e in examples], vocab.pad),
        "audio_ids": pad([e.audio for e in examples], vocab.audio_pad),
        "music_mask": pad([[int(m) for m in e.music] for e in examples], 0).bool(),
        "attention_mask": pad([[1] * len(e.text) for e in examples], 0),
        "text_labels": pad([e.text_labels for e in examples], IGNORE),
        "audio_labels": pad([e.audio_labels for e in examples], IGNORE),
    }


def truncate(ids: Sequence[int], limit: int) -> list[int]:
    return list(ids)[:limit]


def _frames(row: dict, feature_dim: int, limit: int) -> np.ndarray | None:
    flat = row.get("music_features")
    if flat is None:
        return None
    return np.asarray(flat, dtype=np.float32).reshape(-1, feature_dim)[:limit]


def _has_audio(row: dict) -> bool:
    tokens = row.get("target_audio_tokens")
    return tokens is not None and len(tokens) > 0


def batch_from_rows(rows: Sequence[dict], vocab: Vocab, limits: dict[str, int], with_speech: bool = True) -> dict[str, torch.Tensor]:
    """Collate training-shard rows (see ``vcritic.data.schema.TOKEN_COLUMNS``)."""
    streams = [
        build_streams(
            vocab,
            truncate(r["prompt_ids"], limits["prompt"]),
            truncate(r["music_tokens"], limits["music"]),
            truncate(r["target_text_ids"], limits["text"]),
            # Rows without a spoken critique train the text side only.
            truncate(r["target_audio_tokens"], limits["audio"]) if _has_audio(r) else None,
            with_speech=with_speech,
            music_features=_frames(r, vocab.feature_dim, limits["music"]),
        )
        for r in rows
    ]
    return collate(streams, vocab)
