"""How a Kimi-Audio critic hears: Whisper features at 12.5 Hz, Kimi's adaptor, Kimi's stream sum.

Kimi-Audio's own input path (``kimia_infer``'s prompt manager and its model's embedding step):

* Whisper-large-v3's encoder (last hidden state, 50 Hz, 1280 wide) runs on 30 s chunks of 16 kHz
  audio; each chunk keeps ``4 * ((samples - 1) // 1280 + 1)`` frames, and every 4 consecutive frames
  are concatenated into one 5120-wide row, one row per 12.5 Hz semantic token.
* The adaptor (Linear → SiLU → Dropout → Linear → LayerNorm, ``model.vq_adaptor``) maps a row to the
  trunk's width; at a music position the audio stream's embedding becomes
  ``(E[semantic id] + adaptor(row)) * sqrt(2)``, and the text stream (Kimi's blank token) is added.
* Every other position is ``E[audio-stream id] + E[text-stream id]``, one of which is Kimi's blank.

vcritic has one id per position in its text stream and PAD in its audio stream outside speech, so
the prompt puts Kimi's control tokens in the text stream and :meth:`KimiHearing.merge` adds
``E[blank]`` wherever the audio stream is PAD: the sum is the same as Kimi's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

KIMI_TOKENS: dict[str, str] = {
    "msg_end": "<|im_msg_end|>",
    "media_begin": "<|im_media_begin|>",
    "media_end": "<|im_media_end|>",
    "text_blank": "<|im_kimia_text_blank|>",
    "text_eos": "<|im_kimia_text_eos|>",
    "user_msg_start": "<|im_kimia_user_msg_start|>",
    "assistant_msg_start": "<|im_kimia_assistant_msg_start|>",
    "speech_ct": "<|im_kimia_speech_ct_id|>",
    "speech_ctd": "<|im_kimia_speech_ctd_id|>",
}
SAMPLE_RATE = 16000
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # Whisper's window
STACK = 4  # 50 Hz Whisper frames per 12.5 Hz position
SAMPLES_PER_TOKEN = 1280  # 16 kHz / 12.5 Hz


def special_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of :data:`KIMI_TOKENS` in ``tokenizer`` (Kimi's tiktoken tokenizer or a transformers one).

    Raises:
        ValueError: a control token has no id.
    """
    table = getattr(tokenizer, "special_tokens", None)
    ids = {}
    for key, token in KIMI_TOKENS.items():
        tid = table.get(token) if isinstance(table, Mapping) else tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == getattr(tokenizer, "unk_token_id", None):
            raise ValueError(f"tokenizer has no id for Kimi-Audio's {token}; use the checkpoint's own tokenizer")
        ids[key] = int(tid)
    return ids


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Plain text → ids without BOS/EOS (Kimi's tokenizer takes ``bos=``/``eos=``, transformers' do not)."""
    if "bos" in inspect.signature(tokenizer.encode).parameters:
        return list(tokenizer.encode(text, bos=False, eos=False))
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokens_for(samples: int) -> int:
    """12.5 Hz positions Kimi gives ``samples`` of 16 kHz audio (30 s chunks, each rounded up)."""
    full, rest = divmod(samples, CHUNK_SAMPLES)
    return full * (CHUNK_SAMPLES // SAMPLES_PER_TOKEN) + ((rest - 1) // SAMPLES_PER_TOKEN + 1 if rest else 0)


class KimiAdaptor(nn.Module):
    """Kimi's Whisper-feature adaptor (parameter names as in its ``model.vq_adaptor``).

    Called as ``adaptor(features [B, F, D] zero-padded, lengths [B])`` → ``[Σ lengths, H]`` in batch order.
    """

    def __init__(self, input_dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, hidden), nn.SiLU(), nn.Dropout(0.0),
                                    nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(features.shape[1], device=features.device) < lengths.to(features.device).unsqueeze(1)
        return self.layers(features[keep])


class KimiHearing:
    """Kimi-Audio's :class:`~vcritic.protocols.NativeHearing`: Whisper features + adaptor + Kimi's sum.

    Args:
        feature_dim: width of a feature row (``kimia_adaptor_input_dim``: 4 × Whisper's d_model).
        hidden_size: the trunk's width.
        eps: the adaptor LayerNorm's epsilon (Kimi uses its ``rms_norm_eps``).
        whisper_path: a local Whisper checkpoint (Kimi ships ``whisper-large-v3/``); needed by ``features``.
        device: where ``features`` runs Whisper.
        max_seconds: longest clip vcritic passes.
        output_type: ``both`` (text + speech critique) or ``text``: picks Kimi's ``ctd``/``ct`` marker.
    """

    sample_rate = SAMPLE_RATE
    uses_audio_tokens = True

    def __init__(self, feature_dim: int, hidden_size: int, eps: float, whisper_path: str | None, device: str = "cpu",
                 max_seconds: float = 30.0, output_type: str = "both") -> None:
        self.feature_dim, self.hidden_size, self.eps = feature_dim, hidden_size, eps
        self.whisper_path, self.device, self.max_seconds, self.output_type = whisper_path, device, max_seconds, output_type
        self._whisper: tuple[Any, Any] | None = None
        self._adaptor: list[nn.Module] = []

    def _load_whisper(self) -> tuple[Any, Any]:
        if self._whisper is None:
            from transformers import WhisperFeatureExtractor, WhisperModel

            if not self.whisper_path or not Path(self.whisper_path).is_dir():
                raise FileNotFoundError(
                    f"kimi_audio hearing needs a local Whisper checkpoint (got whisper_path={self.whisper_path!r}); "
                    "Kimi-Audio ships it as <checkpoint>/whisper-large-v3, or set backbone option whisper_path")
            encoder = WhisperModel.from_pretrained(self.whisper_path).encoder.to(self.device).eval()
            if STACK * encoder.config.d_model != self.feature_dim:
                raise ValueError(f"Whisper at {self.whisper_path} is {encoder.config.d_model} wide; Kimi's adaptor "
                                 f"takes {self.feature_dim} = {STACK} stacked frames of a {self.feature_dim // STACK}-wide one")
            if (Path(self.whisper_path) / "preprocessor_config.json").is_file():
                extractor = WhisperFeatureExtractor.from_pretrained(self.whisper_path)
            else:  # Kimi's whisper-large-v3 folder holds the model only; its log-mel has num_mel_bins bins
                extractor = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)
            self._whisper = (extractor, encoder)
        return self._whisper

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Mono f32 16 kHz → f32 [tokens_for(len), feature_dim]: Whisper's last hidden state on 30 s
        chunks, trimmed to the chunk's length and stacked 4 frames per row (as Kimi's prompt manager does)."""
        extractor, encoder = self._load_whisper()
        rows = []
        dtype = next(encoder.parameters()).dtype
        for start in range(0, len(samples), CHUNK_SAMPLES):
            chunk = np.asarray(samples[start : start + CHUNK_SAMPLES], dtype=np.float32)
            n = tokens_for(len(chunk))
            mel = extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
            with torch.no_grad():
                hidden = encoder(mel.to(self.device, dtype)).last_hidden_state[0, : n * STACK]
            rows.append(hidden.float().reshape(n, -1).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.feature_dim), np.float32)

    def num_audio_tokens(self, frames: int) -> int:
        return frames  # one position per 12.5 Hz feature row, aligned with the semantic tokens

    def prompt(self, tokenizer: Any, persona: str, context: str) -> Any:
        """Kimi's chat layout: a user turn holding the text then the audio, then the assistant turn's opening
        (``<|im_kimia_user_msg_start|>`` text ``<|im_media_begin|>`` music ``<|im_media_end|>``
        ``ct``/``ctd`` ``<|im_msg_end|><|im_kimia_assistant_msg_start|>``); a critique ends with Kimi's text EOS."""
        from vcritic.protocols import PromptParts

        ids = special_ids(tokenizer)
        text = "\n\n".join(part for part in (persona, context) if part)
        marker = ids["speech_ctd"] if self.output_type == "both" else ids["speech_ct"]
        return PromptParts(
            before_music=[ids["user_msg_start"], *encode_text(tokenizer, text), ids["media_begin"]],
            after_music=[ids["media_end"], marker, ids["msg_end"], ids["assistant_msg_start"]],
            slot_id=ids["text_blank"],
            end_id=ids["text_eos"],
        )

    def encoder(self, model: Any) -> nn.Module:
        """A fresh adaptor (``init_audio_side`` loads Kimi's weights into it). It also carries a copy of
        ``E[blank]`` (Kimi's blank id from ``model.config.kimia_special_tokens``; the embedding is frozen) as a
        non-persistent buffer, so :meth:`merge` finds it on the right device and dtype, also under ZeRO-3."""
        specials = getattr(model.config, "kimia_special_tokens", None) or {}
        if "text_blank" not in specials:
            raise ValueError("the trunk's config lacks kimia_special_tokens; build it with the kimi_audio backbone")
        adaptor = KimiAdaptor(self.feature_dim, self.hidden_size, self.eps)
        blank = model.get_input_embeddings().weight[int(specials["text_blank"])].detach().clone()
        adaptor.register_buffer("text_blank", blank, persistent=False)
        self._adaptor = [adaptor]  # a plain list: the critic registers the module, not the hearing
        return adaptor

    def merge(self, text_embeds: torch.Tensor, audio_embeds: torch.Tensor, music_mask: torch.Tensor,
              encoded: torch.Tensor) -> torch.Tensor:
        """Kimi's sum: ``text + audio`` with ``E[blank]`` standing in for a PAD audio stream, and at the music
        positions ``text + (audio + encoded) * sqrt(2)``.

        Raises:
            ValueError: ``encoded`` does not have one row per music position.
        """
        if not self._adaptor:
            raise RuntimeError("KimiHearing.merge before encoder(model): the critic must create its encoder first")
        music = music_mask.bool()
        if int(music.sum()) != encoded.shape[0]:
            raise ValueError(f"{int(music.sum())} music positions but {encoded.shape[0]} encoded rows")
        blank = self._adaptor[0].text_blank.to(text_embeds.dtype)
        silent = ~(audio_embeds != 0).any(dim=-1) & ~music  # vcritic's PAD is an all-zero audio embedding
        plain = text_embeds + audio_embeds + silent.unsqueeze(-1).to(text_embeds.dtype) * blank
        continuous = torch.zeros_like(text_embeds)
        continuous[music] = encoded.to(text_embeds.dtype)
        heard = text_embeds + (audio_embeds + continuous) * math.sqrt(2.0)
        return torch.where(music.unsqueeze(-1), heard, plain)

    def position_ids(self, model: Any, text_ids: Any, attention_mask: Any, lengths: Any) -> None:
        return None  # Kimi-Audio uses plain positions 0..T-1

    def set_trainable(self, model: Any, encoder: nn.Module, train_encoder: bool, train_projection: bool) -> None:
        """The adaptor trains if ``train_projection``. Whisper runs in the data stage, outside the model.

        Raises:
            ValueError: ``train_encoder`` is asked for.
        """
        if train_encoder:
            raise ValueError("Kimi-Audio's Whisper encoder runs in the data stage (features) and cannot train; "
                             "set model.train_audio_encoder=false (model.train_audio_projection trains the adaptor)")
        encoder.requires_grad_(bool(train_projection))
