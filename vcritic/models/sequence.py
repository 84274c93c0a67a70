"""How one example becomes two aligned token streams with separate loss masks.

Every position carries a text id *and* Q audio ids (one per codebook of the audio
tokenizer). The layout of one example::

    text : before…  slot×M   after…  critique… end  <|speech|>  <|audio|>×(L-1)
    audio: PAD…     m1 … mM  PAD…    PAD…      PAD  BOS         d0 … d(L-2)

``before`` / ``after`` / ``slot`` / ``end`` come from a :class:`~vcritic.protocols.PromptParts`:
vcritic's own layout (``persona + context <|music|>`` … ``<|/music|>``, for backbones that hear
through vcritic's music encoder) or the backbone's chat layout (Qwen2.5-Omni:
``…<|audio_bos|>`` ``<|AUDIO|>×M`` ``<|audio_eos|>…assistant``). The speech rows d0…d(L-1) are
the target's codec frames in the delay pattern of :mod:`vcritic.models.codebooks`
(L = frames + Q; with Q = 1 they are simply a1 … aA, EOS).

Labels sit at the position that predicts them (no shifting later):

* text labels on the last ``after`` token … last critique token → critique tokens then ``end``;
* audio labels on ``<|speech|>`` … → d0 … d(L-1) (PAD cells are not labelled).

Audio ids per codebook: the tokenizer's ids, then PAD, BOS, EOS. Music reaches the model in
one of two ways: vcritic's music encoder reads the tokenizer's continuous frames over the music
span (``music_features``, one row per music position), or a backbone's own audio encoder reads
its feature extractor's frames (``native_features``, one clip per example, any frame count).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vcritic.models.codebooks import as_frames, delay
from vcritic.protocols import PromptParts

IGNORE = -100
MUSIC_START, MUSIC_END, AUDIO_SLOT, SPEECH_START = "<|music|>", "<|/music|>", "<|audio|>", "<|speech|>"
SPECIAL_TOKENS = (MUSIC_START, MUSIC_END, AUDIO_SLOT, SPEECH_START)


@dataclass(frozen=True)
class Vocab:
    """Ids of the special tokens in both streams and the sizes of the audio side."""

    music_start: int
    music_end: int
    audio_slot: int
    speech_start: int
    eos: int
    pad: int
    audio_codes: int
    """Ids per codebook of the audio tokenizer."""
    feature_dim: int
    """Width of the audio tokenizer's continuous frames (vcritic's music encoder)."""
    num_codebooks: int = 1
    music_slot: int | None = None
    """Text id of a music position (None: ``audio_slot``; a native backbone's own placeholder)."""
    critique_end: int | None = None
    """Text id that ends a critique (None: ``eos``; a chat model's end of turn)."""

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
        """Ids per codebook including PAD, BOS and EOS."""
        return self.audio_codes + 3

    @property
    def slot(self) -> int:
        return self.audio_slot if self.music_slot is None else self.music_slot

    @property
    def end(self) -> int:
        return self.eos if self.critique_end is None else self.critique_end

    @classmethod
    def from_tokenizer(cls, tokenizer, audio_codes: int, feature_dim: int, num_codebooks: int = 1,
                       music_slot: int | None = None, critique_end: int | None = None) -> Vocab:
        ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
        unknown = [t for t, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"tokenizer lacks special tokens {unknown}; call vcritic.models.build.add_special_tokens first")
        return cls(*ids, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id, audio_codes=audio_codes,
                   feature_dim=feature_dim, num_codebooks=num_codebooks, music_slot=music_slot,
                   critique_end=critique_end)


def vcritic_prompt(tokenizer, vocab: Vocab, persona: str, context: str, limit: int) -> PromptParts:
    """vcritic's own layout, for backbones without an audio input: the persona and context as
    plain text (at most ``limit`` tokens), then the music between ``<|music|>`` and ``<|/music|>``."""
    from vcritic.data.schema import critic_prompt

    ids = tokenizer(critic_prompt(persona, context))["input_ids"][:limit]
    return PromptParts([*ids, vocab.music_start], [vocab.music_end], vocab.slot, vocab.end)


@dataclass
class Streams:
    """One example, unpadded."""

    text: list[int]
    audio: np.ndarray  # int64 [T, Q]
    music: list[bool]
    text_labels: list[int]
    audio_labels: np.ndarray  # int64 [T, Q]
    music_features: np.ndarray | None = None  # [music positions, feature_dim] for vcritic's music encoder
    music_start: int = 0  # position of the first music slot
    native_features: np.ndarray | None = None  # [frames, D] for the backbone's own audio encoder

    def __len__(self) -> int:
        return len(self.text)

    def cut(self, length: int) -> Streams:
        """The first ``length`` positions (generation drops the closing tokens of a layout)."""
        return Streams(self.text[:length], self.audio[:length], self.music[:length], self.text_labels[:length],
                       self.audio_labels[:length], self.music_features, self.music_start, self.native_features)


def build_streams(
    vocab: Vocab,
    parts: PromptParts,
    n_music: int,
    music_tokens: np.ndarray | Sequence[int] | None = None,
    target_text_ids: Sequence[int] | None = None,
    target_audio_tokens: np.ndarray | Sequence[int] | None = None,
    with_speech: bool = True,
    music_features: np.ndarray | None = None,
    native_features: np.ndarray | None = None,
) -> Streams:
    """Lay out one example. With no targets, the result is a generation prompt ending with ``after_music``.

    Args:
        parts: the prompt around the music (:func:`vcritic_prompt` or a backbone's own).
        n_music: how many positions the music takes.
        music_tokens: audio ids of the music ([n_music, Q], or flat), or None (a backbone that
            hears only through its own encoder).
        target_audio_tokens: the spoken critique's codec frames ([frames, Q], or flat).

    Raises:
        ValueError: ``music_tokens`` / ``music_features`` do not have one row per music position,
            or ``parts.after_music`` is empty (some position must predict the first critique token).
    """
    q = vocab.num_codebooks
    if not parts.after_music:
        raise ValueError("PromptParts.after_music is empty: the token that closes the music must predict the critique")
    if music_features is not None and np.shape(music_features) != (n_music, vocab.feature_dim):
        raise ValueError(f"music_features has shape {np.shape(music_features)}, expected "
                         f"({n_music}, {vocab.feature_dim}): one frame per music token")
    before, after = list(parts.before_music), list(parts.after_music)
    text = before + [parts.slot_id] * n_music + after
    audio = np.full((len(text), q), vocab.audio_pad, dtype=np.int64)
    if music_tokens is not None:
        music = as_frames(music_tokens, q)
        if len(music) != n_music:
            raise ValueError(f"{len(music)} music token frames for {n_music} music positions")
        audio[len(before) : len(before) + n_music] = music
    is_music = [False] * len(before) + [True] * n_music + [False] * len(after)
    text_labels = [IGNORE] * len(text)
    audio_labels = np.full((len(text), q), IGNORE, dtype=np.int64)
    if target_text_ids is not None:
        critique = [*target_text_ids, parts.end_id]
        text_labels[-1] = critique[0]  # the last prompt token predicts the first critique token
        text += critique
        text_labels += critique[1:] + [IGNORE]
        is_music += [False] * len(critique)
        rows = [audio, np.full((len(critique), q), vocab.audio_pad, dtype=np.int64)]
        label_rows = [audio_labels, np.full((len(critique), q), IGNORE, dtype=np.int64)]
        if with_speech and target_audio_tokens is not None:
            grid = delay(as_frames(target_audio_tokens, q), vocab.audio_pad, vocab.audio_eos)
            text += [vocab.speech_start] + [vocab.audio_slot] * (len(grid) - 1)
            text_labels += [IGNORE] * len(grid)
            is_music += [False] * len(grid)
            rows.append(np.concatenate([np.full((1, q), vocab.audio_bos, dtype=np.int64), grid[:-1]]))
            label_rows.append(np.where(grid == vocab.audio_pad, IGNORE, grid))
        audio, audio_labels = np.concatenate(rows), np.concatenate(label_rows)
    return Streams(text, audio, is_music, text_labels, audio_labels, music_features, len(before), native_features)


def collate(examples: Sequence[Streams], vocab: Vocab) -> dict[str, torch.Tensor]:
    """Right-pad a batch into tensors: [B, T] (text), [B, T, Q] (audio), and the music inputs."""
    length = max(len(e.text) for e in examples)
    q = vocab.num_codebooks

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)

    def pad_audio(grids: list[np.ndarray], value: int) -> torch.Tensor:
        out = torch.full((len(grids), length, q), value, dtype=torch.long)
        for row, grid in enumerate(grids):
            out[row, : len(grid)] = torch.as_tensor(grid)
        return out

    batch = {
        "text_ids": pad([e.text for e in examples], vocab.pad),
        "audio_ids": pad_audio([e.audio for e in examples], vocab.audio_pad),
        "music_mask": pad([[int(m) for m in e.music] for e in examples], 0).bool(),
        "attention_mask": pad([[1] * len(e.text) for e in examples], 0),
        "text_labels": pad([e.text_labels for e in examples], IGNORE),
        "audio_labels": pad_audio([e.audio_labels for e in examples], IGNORE),
    }
    if any(e.native_features is not None for e in examples):
        frames = [np.asarray(e.native_features, dtype=np.float32) for e in examples]
        width = max(f.shape[1] for f in frames)
        native = torch.zeros(len(examples), max(len(f) for f in frames), width)
        for row, f in enumerate(frames):
            native[row, : len(f)] = torch.as_tensor(f)
        batch["native_features"] = native
        batch["native_lengths"] = torch.tensor([len(f) for f in frames], dtype=torch.long)
    else:
        features = torch.zeros(len(examples), length, vocab.feature_dim)
        for row, e in enumerate(examples):
            if e.music_features is not None and len(e.music_features):
                f = torch.as_tensor(np.asarray(e.music_features, dtype=np.float32))
                features[row, e.music_start : e.music_start + f.shape[0]] = f
        batch["music_features"] = features
    return batch


def truncate(ids: Sequence[int], limit: int) -> list[int]:
    return list(ids)[:limit]


def _present(row: dict, key: str) -> bool:
    value = row.get(key)
    return value is not None and len(value) > 0


@dataclass
class Heard:
    """One clip and its prompt as the critic takes them in, before any critique is laid out."""

    parts: PromptParts
    n_music: int
    music_tokens: np.ndarray | None = None  # [n_music, Q]
    music_features: np.ndarray | None = None  # [n_music, feature_dim] (vcritic's music encoder)
    native_features: np.ndarray | None = None  # [frames, D] (the backbone's own encoder)


def heard_from_columns(cols: dict, vocab: Vocab, parts: PromptParts | None = None,
                       music_limit: int | None = None) -> Heard:
    """The music columns of ``vcritic.data.schema.TOKEN_COLUMNS`` (a shard row, or what
    ``vcritic.data.stages.music_columns`` gives for one clip) as a :class:`Heard`.

    Args:
        parts: the prompt (None: the row's own ``prompt_ids`` / ``prompt_tail_ids``).
        music_limit: at most this many music frames for vcritic's music encoder (a native
            backbone's music was already cut to its own limit in the data stage).
    """
    q = vocab.num_codebooks
    if parts is None:
        parts = PromptParts(list(cols["prompt_ids"]), list(cols["prompt_tail_ids"]), vocab.slot, vocab.end)
    tokens = as_frames(cols["music_tokens"], q) if _present(cols, "music_tokens") else None
    if _present(cols, "native_features"):
        native = np.asarray(cols["native_features"], dtype=np.float32).reshape(int(cols["native_frames"]), -1)
        return Heard(parts, int(cols["music_positions"]), tokens, None, native)
    tokens = (np.zeros((0, q), dtype=np.int64) if tokens is None else tokens)[:music_limit]
    frames = None
    if _present(cols, "music_features"):
        frames = np.asarray(cols["music_features"], dtype=np.float32).reshape(-1, vocab.feature_dim)[: len(tokens)]
    return Heard(parts, len(tokens), tokens, frames, None)


def heard_streams(vocab: Vocab, heard: Heard, target_text_ids: Sequence[int] | None = None,
                  target_audio_tokens: np.ndarray | None = None, with_speech: bool = True) -> Streams:
    """:func:`build_streams` for a :class:`Heard` clip and (optionally) its critique."""
    return build_streams(vocab, heard.parts, heard.n_music, heard.music_tokens, target_text_ids, target_audio_tokens,
                         with_speech=with_speech, music_features=heard.music_features,
                         native_features=heard.native_features)


def row_streams(row: dict, vocab: Vocab, limits: dict[str, int], with_targets: bool = True,
                with_speech: bool = True) -> Streams:
    """The streams of one training-shard row (columns: ``vcritic.data.schema.TOKEN_COLUMNS``).

    ``limits`` caps the critique (``text``), the spoken critique (``audio``, in frames) and, for
    vcritic's music encoder, the music (``music``, in frames); a native backbone's music was cut
    to its own limit in the data stage.
    """
    heard = heard_from_columns(row, vocab, music_limit=limits["music"])
    target_text = truncate(row["target_text_ids"], limits["text"]) if with_targets else None
    speech = None
    if with_targets and _present(row, "target_audio_tokens"):  # rows without a spoken critique train text only
        speech = as_frames(row["target_audio_tokens"], vocab.num_codebooks)[: limits["audio"]]
    return heard_streams(vocab, heard, target_text, speech, with_speech)


def batch_from_rows(rows: Sequence[dict], vocab: Vocab, limits: dict[str, int], with_speech: bool = True) -> dict[str, torch.Tensor]:
    """Collate training-shard rows (see ``vcritic.data.schema.TOKEN_COLUMNS``)."""
    return collate([row_streams(r, vocab, limits, with_speech=with_speech) for r in rows], vocab)
