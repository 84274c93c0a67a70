"""The joint text/audio critic: a shared trunk with a text head and a parallel audio branch.

* Trunk: the backbone LLM (LoRA-adapted). Its LM head is the text head.
* Hearing: a backbone with its own audio encoder (Qwen2.5-Omni's audio tower, Kimi-Audio's
  Whisper features) hears through it (``hearing_encoder`` + the backbone's ``merge`` and
  position ids); any other backbone hears through vcritic's music encoder: audio-tokenizer
  ids embedded and added to the text embedding, plus the tokenizer's continuous frames and a
  small convolutional encoder over the music span. Either way the music input always trains
  (at λ = 1 too); a pretrained audio encoder stays frozen unless configured otherwise.
* Audio head: the top K trunk layers are copied into a separate stack that starts from
  the trunk's hidden state before layer N−K, then a copy of the final norm and one linear
  output per codebook (Q of them, in the delay pattern of :mod:`vcritic.models.codebooks`).

Loss = λ·CE_text + (1−λ)·CE_audio, each CE averaged over its own labelled positions;
CE_audio is the per-codebook CEs weighted by ``codebook_weights`` (normalised to sum 1),
so it stays one number and λ keeps its meaning. With λ = 1 the audio branch is not run at
all, so the loss is exactly text-only SFT.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vcritic.models.sequence import IGNORE, Vocab


class MusicEncoder(nn.Module):
    """vcritic's audio input encoder: adds the projected continuous frames to the music span's
    embeddings, then residual 1-D convolutions over the span (positions outside are untouched)."""

    def __init__(self, hidden: int, feature_dim: int, kernel: int = 5, layers: int = 2) -> None:
        super().__init__()
        # Per-frame normalisation: spectral shape (pitch, timbre) matters, absolute level does not.
        self.frame_norm = nn.LayerNorm(feature_dim)
        self.frame_proj = nn.Linear(feature_dim, hidden)
        nn.init.normal_(self.frame_proj.weight, std=0.02)
        nn.init.zeros_(self.frame_proj.bias)
        # What the per-frame norm removes, put back relative to the clip: each frame's level and its
        # change from the frame before. The loudness envelope is where rhythm (tempo, note onsets) shows.
        self.level_proj = nn.Linear(2, hidden)
        nn.init.normal_(self.level_proj.weight, std=0.1)  # about as large as frame_proj's output at the start
        nn.init.zeros_(self.level_proj.bias)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2) for _ in range(layers))
        for conv in self.convs:
            # Start as the identity so a pretrained trunk sees plain embeddings at first.
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        f = frames.to(x.dtype)
        h = (x + self.frame_proj(self.frame_norm(f)) + self.level_proj(self.envelope(f, m))) * m
        for conv in self.convs:
            h = h + F.gelu(conv(h.transpose(1, 2)).transpose(1, 2)) * m
        return x * (1 - m) + h

    @staticmethod
    def envelope(frames: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """[B, T, 2]: each music frame's mean feature (its log level), standardised over its row's
        music span (so a clip's overall loudness does not matter), and that level's step from the
        previous frame; zero outside the span."""
        level = frames.mean(dim=-1, keepdim=True)
        count = m.sum(dim=1, keepdim=True).clamp_min(1.0)
        mean = (level * m).sum(dim=1, keepdim=True) / count
        std = ((((level - mean) * m) ** 2).sum(dim=1, keepdim=True) / count).sqrt()
        z = (level - mean) / (std + 1e-3) * m
        step = (z - F.pad(z, (0, 0, 1, 0))[:, :-1]) * m
        return torch.cat([z, step], dim=-1)


@dataclass
class JointOutput:
    loss: torch.Tensor
    text_loss: torch.Tensor
    audio_loss: torch.Tensor
    text_tokens: torch.Tensor  # how many positions each CE averaged over
    audio_tokens: torch.Tensor
    text_logits: torch.Tensor
    audio_logits: torch.Tensor | None  # [B, T, Q, A]


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over positions whose label is not IGNORE, and their count."""
    count = (labels != IGNORE).sum()
    if count == 0:
        return logits.sum() * 0.0, count
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    return loss, count


def codebook_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean over codebooks of each codebook's masked CE ([B, T, Q, A] logits, [B, T, Q] labels).

    Returns the loss and how many frames it covered (labelled positions of the first codebook).
    Codebooks with no labelled position drop out of the weighting.
    """
    if labels.shape[-1] == 1:  # one codebook: exactly its CE
        return masked_ce(logits[:, :, 0], labels[:, :, 0])
    total, weight_sum = logits.new_zeros((), dtype=torch.float32), logits.new_zeros((), dtype=torch.float32)
    for q in range(labels.shape[-1]):
        ce, labelled = masked_ce(logits[:, :, q], labels[:, :, q])
        w = weights[q] * (labelled > 0)
        total, weight_sum = total + w * ce, weight_sum + w
    return total / weight_sum.clamp_min(1e-12), (labels[..., 0] != IGNORE).sum()


class JointCritic(nn.Module):
    """Shared trunk + text head + parallel audio branch.

    Args:
        trunk: a Hugging Face causal LM (already LoRA-wrapped or not).
        backbone: the backbone plugin that built ``trunk`` (runs copied decoder layers).
        vocab: special-token ids of both streams and the audio sizes (codebooks, ids per codebook).
        audio_head_layers: K, how many top trunk layers the audio branch copies.
        loss_lambda: weight of the text loss.
        codebook_weights: weight of each codebook's CE in the audio loss (None: equal).
        hearing: the backbone's :class:`~vcritic.protocols.NativeHearing`, or None for
            vcritic's music encoder.
    """

    def __init__(self, trunk: nn.Module, backbone, vocab: Vocab, audio_head_layers: int, loss_lambda: float,
                 codebook_weights: Sequence[float] | None = None, hearing=None) -> None:
        super().__init__()
        layers = backbone.decoder_layers(trunk)
        if not 1 <= audio_head_layers <= len(layers):
            raise ValueError(f"model.audio_head_layers={audio_head_layers} must be in [1, {len(layers)}] for this backbone")
        q = vocab.num_codebooks
        weights = [1.0] * q if codebook_weights is None else [float(w) for w in codebook_weights]
        if len(weights) != q or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"model.codebook_weights={list(weights)} must give {q} non-negative weights (one per "
                             f"codebook of the audio tokenizer), not all zero")
        hidden = trunk.get_input_embeddings().embedding_dim
        self.trunk = trunk
        self.backbone = backbone
        self.vocab = vocab
        self.hearing = hearing
        self.loss_lambda = float(loss_lambda)
        self.branch_start = len(layers) - audio_head_layers
        self.register_buffer("codebook_weights", torch.tensor(weights) / sum(weights), persistent=False)
        # Codebook q's id i is row q·A + i; PAD rows stay zero (and are masked out anyway).
        self.audio_embed = nn.Embedding(q * vocab.audio_vocab_size, hidden)
        nn.init.normal_(self.audio_embed.weight, std=0.02)
        with torch.no_grad():
            self.audio_embed.weight[vocab.audio_pad :: vocab.audio_vocab_size].zero_()
        self.music_encoder = MusicEncoder(hidden, vocab.feature_dim) if hearing is None else None
        self.hearing_encoder = hearing.encoder(trunk) if hearing is not None else None
        # Copies, not views: the branch trains fully while the trunk only gets LoRA.
        self.audio_branch = nn.ModuleList(copy.deepcopy(layer) for layer in layers[self.branch_start :])
        self.audio_norm = copy.deepcopy(backbone.final_norm(trunk))
        self.audio_head = nn.Linear(hidden, q * vocab.audio_vocab_size, bias=False)
        nn.init.normal_(self.audio_head.weight, std=0.02)
        for module in (self.audio_branch, self.audio_norm):
            for p in module.parameters():
                p.requires_grad_(True)

    def input_modules(self) -> dict[str, nn.Module]:
        """How the critic hears: these train at every λ (a pretrained encoder's own freezing aside)."""
        modules: dict[str, nn.Module] = {"audio_embed": self.audio_embed}
        if self.music_encoder is not None:
            modules["music_encoder"] = self.music_encoder
        if self.hearing_encoder is not None:
            modules["hearing_encoder"] = self.hearing_encoder
        return modules

    def output_modules(self) -> dict[str, nn.Module]:
        """How the critic speaks: unused (and frozen) when λ = 1."""
        return {"audio_branch": self.audio_branch, "audio_norm": self.audio_norm, "audio_head": self.audio_head}

    def head_modules(self) -> dict[str, nn.Module]:
        """Everything outside the trunk (saved beside the LoRA adapter)."""
        return {**self.input_modules(), **self.output_modules()}

    def embed_audio(self, audio_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, Q] audio ids → [B, T, H]: the sum of each codebook's embedding (PAD adds nothing)."""
        a = self.vocab.audio_vocab_size
        offsets = torch.arange(audio_ids.shape[-1], device=audio_ids.device) * a
        keep = (audio_ids != self.vocab.audio_pad).unsqueeze(-1)
        return (self.audio_embed(audio_ids + offsets) * keep).sum(dim=2)

    def embed(self, text_ids, audio_ids, music_mask, music_features=None, native_features=None,
              native_lengths=None) -> torch.Tensor:
        text = self.trunk.get_input_embeddings()(text_ids)
        audio = self.embed_audio(audio_ids).to(text.dtype)
        if self.hearing is None:
            if music_features is None:
                music_features = text.new_zeros(*text_ids.shape, self.vocab.feature_dim)
            return self.music_encoder(text + audio, music_mask, music_features)
        if native_features is None:
            raise ValueError("this critic hears through its backbone's audio encoder: the batch needs native_features")
        encoded = self.hearing_encoder(native_features.to(text.dtype), native_lengths)
        return self.hearing.merge(text, audio, music_mask, encoded.to(text.dtype))

    def positions(self, text_ids, attention_mask, native_lengths=None):
        if self.hearing is None:
            return None
        return self.hearing.position_ids(self.trunk, text_ids, attention_mask, native_lengths)

    def hidden_and_logits(
        self, text_ids, audio_ids, music_mask, attention_mask, music_features=None, with_audio: bool = True,
        native_features=None, native_lengths=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text logits [B, T, V] and, if ``with_audio``, audio logits [B, T, Q, A]."""
        positions = self.positions(text_ids, attention_mask, native_lengths)
        out = self.trunk(
            inputs_embeds=self.embed(text_ids, audio_ids, music_mask, music_features, native_features, native_lengths),
            attention_mask=attention_mask,
            position_ids=positions,
            output_hidden_states=with_audio,
            use_cache=False,
        )
        if not with_audio:
            return out.logits, None
        h = self.backbone.run_layers(self.trunk, self.audio_branch, out.hidden_states[self.branch_start], attention_mask,
                                     positions)
        logits = self.audio_head(self.audio_norm(h))
        return out.logits, logits.view(*logits.shape[:2], self.vocab.num_codebooks, self.vocab.audio_vocab_size)

    # -- generation with a KV cache (vcritic.models.generation drives these) ------------------
    @property
    def can_cache_speech(self) -> bool:
        """Whether the audio branch can run with a KV cache: the backbone has ``run_layers_cached``
        (:class:`~vcritic.protocols.CachedBackbone`). Otherwise speech uses the recompute path."""
        return callable(getattr(self.backbone, "run_layers_cached", None))

    def new_cache(self):
        """An empty KV cache with one slot per trunk layer (the branch's copies use their originals' slots)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.trunk.config)

    def embed_generated(self, text_ids: torch.Tensor, audio_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of generated positions ([B, T] text, [B, T, Q] audio ids; no music among them):
        exactly what :meth:`embed` gives those positions inside a whole sequence."""
        text = self.trunk.get_input_embeddings()(text_ids)
        audio = self.embed_audio(audio_ids).to(text.dtype)
        if self.hearing is None:
            # The music encoder passes positions outside the music span through unchanged (x·1 + 0).
            return text + audio
        no_music = torch.zeros(text_ids.shape, dtype=torch.bool, device=text_ids.device)
        return self.hearing.merge(text, audio, no_music, text.new_zeros(0, text.shape[-1]))

    def cached_step(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    trunk_past, branch_past=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run new positions ``embeds`` [B, T, H] through the trunk (and, given ``branch_past``, the audio
        branch) with KV caches. ``attention_mask`` covers the cached and the new positions.

        Returns the last position's text logits [B, V] and audio logits [B, Q, A] (None without ``branch_past``).
        """
        with_audio = branch_past is not None
        out = self.trunk(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=trunk_past, use_cache=True, output_hidden_states=with_audio,
                         **self._last_logits_only())
        text = out.logits[:, -1]
        if not with_audio:
            return text, None
        h = self.backbone.run_layers_cached(self.trunk, self.audio_branch, out.hidden_states[self.branch_start],
                                            attention_mask, position_ids, branch_past)
        logits = self.audio_head(self.audio_norm(h[:, -1]))
        return text, logits.view(-1, self.vocab.num_codebooks, self.vocab.audio_vocab_size)

    def _last_logits_only(self) -> dict[str, int]:
        """``logits_to_keep=1`` where the trunk's forward takes it (a long prompt × a large vocabulary
        would otherwise materialise every position's logits)."""
        if not hasattr(self, "_keep_kwargs"):
            import inspect

            inner = self.trunk.get_base_model() if hasattr(self.trunk, "get_base_model") else self.trunk
            takes = "logits_to_keep" in inspect.signature(inner.forward).parameters
            self._keep_kwargs = {"logits_to_keep": 1} if takes else {}
        return self._keep_kwargs

    def forward(
        self,
        text_ids: torch.Tensor,
        audio_ids: torch.Tensor,
        music_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        text_labels: torch.Tensor,
        audio_labels: torch.Tensor,
        music_features: torch.Tensor | None = None,
        native_features: torch.Tensor | None = None,
        native_lengths: torch.Tensor | None = None,
    ) -> JointOutput:
        with_audio = self.loss_lambda < 1.0
        text_logits, audio_logits = self.hidden_and_logits(
            text_ids, audio_ids, music_mask, attention_mask, music_features, with_audio, native_features, native_lengths
        )
        text_loss, n_text = masked_ce(text_logits, text_labels)
        if with_audio:
            audio_loss, n_audio = codebook_ce(audio_logits, audio_labels, self.codebook_weights)
            loss = self.loss_lambda * text_loss + (1.0 - self.loss_lambda) * audio_loss
        else:
            audio_loss, n_audio = text_loss.new_zeros(()), (audio_labels[..., 0] != IGNORE).sum()
            loss = text_loss
        return JointOutput(loss, text_loss, audio_loss, n_text, n_audio, text_logits, audio_logits)
