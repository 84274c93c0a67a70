"""How a Qwen2.5-Omni critic hears: the thinker's own log-mel, prompt layout, audio tower and positions.

Qwen2.5-Omni's own audio input path (``Qwen2_5OmniProcessor`` + the thinker's ``forward``):

* ``WhisperFeatureExtractor`` (16 kHz, 128 mel bins, hop 160) pads every clip to its 300 s window and
  returns a feature attention mask; the thinker keeps only the masked-in frames (``get_audio_features``).
* The chat template renders an audio item as ``<|audio_bos|><|AUDIO|><|audio_eos|>`` and the processor
  repeats ``<|AUDIO|>`` once per output row of the tower: ``((frames - 1) // 2 + 1 - 2) // 2 + 1``.
* The tower's rows replace the ``<|AUDIO|>`` embeddings (a masked scatter); the positions come from the
  thinker's ``get_rope_index`` (for audio without vision they equal plain text positions).

:class:`QwenOmniHearing` reproduces each step with the thinker's own modules, so vcritic's inputs equal
what the processor and the thinker's forward would build (``tests/plugins/test_qwen_omni_hearing.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# The released checkpoint's audio front end (its preprocessor_config.json, audio keys).
RELEASE_FEATURE_EXTRACTOR: dict[str, Any] = {
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "n_fft": 400,
    "chunk_length": 300,
    "padding_value": 0.0,
    "padding_side": "right",
    "dither": 0.0,
    "return_attention_mask": True,
}

# A Jinja chat template written for vcritic that renders the same text as the release's template:
# a default system turn when the first message is not one, ``<|im_start|>role\n…<|im_end|>\n`` turns,
# media items as their bos/placeholder/eos triple (optionally numbered), then the assistant opening.
CHAT_TEMPLATE = (
    "{% set n = namespace(audio=0, image=0, video=0) %}"
    "{% for turn in messages %}"
    "{% if loop.first and turn['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ turn['role'] }}\n"
    "{% if turn['content'] is string %}{{ turn['content'] }}"
    "{% else %}{% for part in turn['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set n.image = n.image + 1 %}{% if add_vision_id %}Picture {{ n.image }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif part['type'] == 'audio' or 'audio' in part or 'audio_url' in part %}"
    "{% set n.audio = n.audio + 1 %}{% if add_audio_id %}Audio {{ n.audio }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set n.video = n.video + 1 %}{% if add_vision_id %}Video {{ n.video }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_PERSONA = "You are an experienced vocal coach."
LISTENING_BRIEF = (
    "You will hear a recording of someone singing. Listen to the whole take, then give an honest, "
    "specific critique of the vocal performance: pitch and intonation, timing, tone, breath, diction "
    "and expression, with what works and what to fix."
)
REQUEST = "Please critique the singing in this recording."


def audio_tokens_for(frames: int) -> int:
    """Rows the thinker's audio tower makes from ``frames`` log-mel frames (conv stride 2, then pool 2)."""
    if frames <= 0:
        return 0
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def critic_conversation(persona: str, context: str) -> list[dict[str, Any]]:
    """The chat a critique answers: a system turn from ``persona`` and a user turn holding the music
    (one audio item) then the song context and the request, in Qwen2.5-Omni's message format."""
    system = " ".join(((persona or "").strip() or DEFAULT_PERSONA, LISTENING_BRIEF))
    request = "\n\n".join(part for part in ((context or "").strip(), REQUEST) if part)
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "audio", "audio": "music"}, {"type": "text", "text": request}]},
    ]


def thinker_of(model: nn.Module) -> nn.Module:
    """The thinker (``Qwen2_5OmniThinkerForConditionalGeneration``), looking through a peft wrapper."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(inner, "get_rope_index") or not hasattr(getattr(inner, "model", None), "audio_tower"):
        raise TypeError(f"{type(inner).__name__} is not a Qwen2.5-Omni thinker; build it with qwen2_5_omni_thinker")
    return inner


class QwenOmniAudioEncoder(nn.Module):
    """The thinker's audio tower, called as ``get_audio_features`` calls it.

    ``encoder(features [B, F, D] zero-padded, lengths [B])`` → ``[Σ audio_tokens_for(lengths), H]`` in
    batch order. The tower stays registered only in the trunk: this module holds it in a plain list, so it
    owns no parameters and the tower is neither saved nor moved twice.
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self._tower = [tower]

    @property
    def tower(self) -> nn.Module:
        return self._tower[0]

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        lengths = lengths.to(features.device).long()
        heard = lengths > 0  # the processor only passes real clips; the tower's chunking breaks on empty ones
        if not bool(heard.any()):
            return features.new_zeros(0, tower.config.output_dim)
        features, lengths = features[heard], lengths[heard]
        keep = torch.arange(features.shape[1], device=features.device) < lengths.unsqueeze(1)
        flat = features[keep].transpose(0, 1)  # [D, Σ frames]: what get_audio_features hands the tower
        after_cnn, rows = tower._get_feat_extract_output_lengths(lengths)
        out = tower(flat, feature_lens=lengths, aftercnn_lens=after_cnn).last_hidden_state
        if out.shape[0] != int(rows.sum()):
            raise ValueError(f"audio tower gave {out.shape[0]} rows for lengths {lengths.tolist()}, "
                             f"expected {int(rows.sum())}")
        return out


class QwenOmniHearing:
    """Qwen2.5-Omni's :class:`~vcritic.protocols.NativeHearing` (the thinker's own audio path).

    Args:
        extractor: the checkpoint's ``WhisperFeatureExtractor``.
        max_audio_seconds: a lower limit than the extractor's window (None: the window, 300 s for the release).
    """

    uses_audio_tokens = False

    def __init__(self, extractor: Any, max_audio_seconds: float | None = None) -> None:
        self.extractor = extractor
        self.sample_rate = int(extractor.sampling_rate)
        self.feature_dim = int(extractor.feature_size)
        window = extractor.n_samples / self.sample_rate
        if max_audio_seconds is not None and not 0 < max_audio_seconds:
            raise ValueError(f"max_audio_seconds must be positive, got {max_audio_seconds}")
        self.max_seconds = float(min(window, max_audio_seconds or window))
        self.max_samples = min(int(extractor.n_samples), int(self.max_seconds * self.sample_rate))

    @classmethod
    def for_checkpoint(cls, path: str | None, max_audio_seconds: float | None = None) -> QwenOmniHearing:
        """The extractor in ``path``'s ``preprocessor_config.json``; the release's settings when there is
        none (a random thinker, or one vcritic saved: both were built for the release's front end)."""
        from transformers import WhisperFeatureExtractor

        if path and (Path(path) / "preprocessor_config.json").is_file():
            extractor = WhisperFeatureExtractor.from_pretrained(path)
        else:
            extractor = WhisperFeatureExtractor(**RELEASE_FEATURE_EXTRACTOR)
        return cls(extractor, max_audio_seconds)

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Mono f32 at 16 kHz → f32 [frames, 128]: the processor's log-mel rows under its feature mask.

        The processor pads to the whole window; padding only to just past the clip gives the same rows
        (the frames overlapping the clip, and so their maximum, which sets the log floor, are unchanged)
        at a fraction of the cost. Longer clips are cut to ``max_seconds`` first.

        Raises:
            ValueError: the clip is not mono, or too short for one audio token (under 3 frames, ~20 ms).
        """
        audio = np.asarray(samples, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"features wants mono samples [n], got shape {audio.shape}; mix down first")
        audio = audio[: self.max_samples]
        fx = self.extractor
        hops = math.ceil(len(audio) / fx.hop_length) + math.ceil(fx.n_fft / fx.hop_length) + 1
        padded = min(hops * fx.hop_length, int(fx.n_samples))
        out = fx(audio, sampling_rate=self.sample_rate, padding="max_length", max_length=padded, truncation=True,
                 return_attention_mask=True, return_tensors="np")
        frames = int(out["attention_mask"][0].sum())
        if audio_tokens_for(frames) < 1:
            raise ValueError(f"clip of {len(audio)} samples gives {frames} log-mel frames, too short for one "
                             "audio token (needs at least 3 frames, ~20 ms); drop or pad the clip")
        return np.ascontiguousarray(out["input_features"][0][:, :frames].T, dtype=np.float32)

    def num_audio_tokens(self, frames: int) -> int:
        return audio_tokens_for(int(frames))

    def prompt(self, tokenizer: Any, persona: str, context: str) -> Any:
        """The checkpoint's chat template (or :data:`CHAT_TEMPLATE` for a tokenizer without one) on
        :func:`critic_conversation` with the assistant's opening, tokenized as the processor does and
        split around ``<|AUDIO|>``.

        Raises:
            ValueError: the tokenizer lacks Qwen's tokens, or the template does not wrap one ``<|AUDIO|>``
                in ``<|audio_bos|>`` … ``<|audio_eos|>``.
        """
        from vcritic.protocols import PromptParts

        ids = {t: token_id(tokenizer, t) for t in ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>", "<|im_end|>")}
        template = None if getattr(tokenizer, "chat_template", None) else CHAT_TEMPLATE
        text = tokenizer.apply_chat_template(critic_conversation(persona, context), chat_template=template,
                                             add_generation_prompt=True, tokenize=False)
        rendered = list(tokenizer(text)["input_ids"])  # as the processor tokenizes the rendered text
        slot = ids["<|AUDIO|>"]
        if rendered.count(slot) != 1:
            raise ValueError(f"the chat template rendered {rendered.count(slot)} <|AUDIO|> tokens, expected 1")
        at = rendered.index(slot)
        if at == 0 or rendered[at - 1] != ids["<|audio_bos|>"] or rendered[at + 1 : at + 2] != [ids["<|audio_eos|>"]]:
            raise ValueError("the chat template does not wrap <|AUDIO|> in <|audio_bos|> … <|audio_eos|>; "
                             "use the checkpoint's own tokenizer and chat template")
        return PromptParts(before_music=rendered[:at], after_music=rendered[at + 1 :], slot_id=slot,
                           end_id=ids["<|im_end|>"])

    def encoder(self, model: nn.Module) -> QwenOmniAudioEncoder:
        """:class:`QwenOmniAudioEncoder` on ``model``'s audio tower (by reference)."""
        tower = thinker_of(model).model.audio_tower
        if tower.config.num_mel_bins != self.feature_dim:
            raise ValueError(f"the thinker's audio tower reads {tower.config.num_mel_bins} mel bins but the "
                             f"feature extractor makes {self.feature_dim}; use the checkpoint's "
                             "preprocessor_config.json")
        return QwenOmniAudioEncoder(tower)

    def merge(self, text_embeds: torch.Tensor, audio_embeds: torch.Tensor | None, music_mask: torch.Tensor,
              encoded: torch.Tensor) -> torch.Tensor:
        """``text + audio`` embeddings with the music positions replaced by ``encoded``, row by row in
        batch order (the thinker's ``masked_scatter``).

        Raises:
            ValueError: ``encoded`` does not have one row per music position.
        """
        base = text_embeds if audio_embeds is None else text_embeds + audio_embeds
        music = music_mask.bool().to(base.device)
        if int(music.sum()) != encoded.shape[0]:
            raise ValueError(f"{int(music.sum())} music positions but {encoded.shape[0]} encoded rows")
        return base.masked_scatter(music.unsqueeze(-1), encoded.to(base.device, base.dtype))

    def position_ids(self, model: nn.Module, text_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     lengths: torch.Tensor | None) -> torch.Tensor:
        """The thinker's ``get_rope_index`` on what the processor would give it: ``[3, B, T]`` long.

        Raises:
            ValueError: a row's ``<|AUDIO|>`` count is not ``num_audio_tokens`` of its length.
        """
        thinker = thinker_of(model)
        if attention_mask is None:
            attention_mask = torch.ones_like(text_ids)
        seqlens = None
        if lengths is not None:
            lengths = lengths.to(text_ids.device).long()
            want = [audio_tokens_for(int(n)) for n in lengths.tolist()]
            have = ((text_ids == thinker.config.audio_token_id) & attention_mask.bool()).sum(1).tolist()
            if have != want:
                raise ValueError(f"<|AUDIO|> positions per row {have} do not match the clips' audio tokens {want}")
            seqlens = lengths[lengths > 0]  # one entry per clip, as feature_attention_mask.sum(-1)
        positions, _ = thinker.get_rope_index(text_ids, None, None, attention_mask, False, seqlens, None)
        return positions

    def set_trainable(self, model: nn.Module, encoder: QwenOmniAudioEncoder, train_encoder: bool,
                      train_projection: bool) -> None:
        """Tower frozen unless ``train_encoder``; its output projection ``proj`` (d_model → the LM's width)
        trains if ``train_projection``. ``audio_bos_eos_token`` (unused by the thinker's forward) and the
        vision tower (a critic never sees images) stay frozen. Call after LoRA wrapping: peft freezes the base."""
        tower = encoder.tower
        for name, param in tower.named_parameters():
            param.requires_grad_(train_encoder and not name.startswith("audio_bos_eos_token"))
        if train_projection:
            tower.proj.requires_grad_(True)
        thinker_of(model).model.visual.requires_grad_(False)


def token_id(tokenizer: Any, token: str) -> int:
    """``token``'s id in ``tokenizer``.

    Raises:
        ValueError: the tokenizer does not have it as one token.
    """
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer has no {token}; use the Qwen2.5-Omni checkpoint's own tokenizer")
    return int(tid)
