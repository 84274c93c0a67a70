"""The joint text/audio critic: a shared trunk with a text head and a parallel audio branch.

* Trunk: the backbone LLM (LoRA-adapted). Its LM head is the text head.
* Audio input: audio ids are embedded and added to the text embedding at each position;
  over the music span a small convolutional encoder adds local context (rhythm, onsets).
* Audio head: the top K trunk layers are copied into a separate stack that starts from
  the trunk's hidden state before layer N−K, then a copy of the final norm and a linear
  layer over the audio vocabulary. Any backbone gets an audio output this way.

Loss = λ·CE_text + (1−λ)·CE_audio, each CE averaged over its own labelled positions.
With λ = 1 the audio branch is not run at all, so the loss is exactly text-only SFT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vcritic.models.sequence import IGNORE, Vocab


class MusicEncoder(nn.Module):
    """The audio input encoder: adds the projected continuous frames to the music span's
    embeddings, then residual 1-D convolutions over the span (positions outside are untouched)."""

    def __init__(self, hidden: int, feature_dim: int, kernel: int = 5, layers: int = 2) -> None:
        super().__init__()
        # Per-frame normalisation: spectral shape (pitch, timbre) matters, absolute level does not.
        self.frame_norm = nn.LayerNorm(feature_dim)
        self.frame_proj = nn.Linear(feature_dim, hidden)
        nn.init.normal_(self.frame_proj.weight, std=0.02)
        nn.init.zeros_(self.frame_proj.bias)
        self.convs = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2) for _ in range(layers))
        for conv in self.convs:
            # Start as the identity so a pretrained trunk sees plain embeddings at first.
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        h = (x + self.frame_proj(self.frame_norm(frames.to(x.dtype)))) * m
        for conv in self.convs:
            h = h + F.gelu(conv(h.transpose(1, 2)).transpose(1, 2)) * m
        return x * (1 - m) + h


@dataclass
class JointOutput:
    loss: torch.Tensor
    text_loss: torch.Tensor
    audio_loss: torch.Tensor
    text_tokens: torch.Tensor  # how many positions each CE averaged over
    audio_tokens: torch.Tensor
    text_logits: torch.Tensor
    audio_logits: torch.Tensor | None


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over positions whose label is not IGNORE, and their count."""
    count = (labels != IGNORE).sum()
    if count == 0:
        return logits.sum() * 0.0, count
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    return loss, count


class JointCritic(nn.Module):
    """Shared trunk + text head + parallel audio branch.

    Args:
        trunk: a Hugging Face causal LM (already LoRA-wrapped or not).
        backbone: the backbone plugin that built ``trunk`` (runs copied decoder layers).
        vocab: special-token ids of both streams.
        audio_head_layers: K, how many top trunk layers the audio branch copies.
        loss_lambda: weight of the text loss.
    """

    def __init__(self, trunk: nn.Module, backbone, vocab: Vocab, audio_head_layers: int, loss_lambda: float) -> None:
        super().__init__()
        layers = backbone.decoder_layers(trunk)
        if not 1 <= audio_head_layers <= len(layers):
            raise ValueError(f"model.audio_head_layers={audio_head_layers} must be in [1, {len(layers)}] for this backbone")
        hidden = trunk.get_input_embeddings().embedding_dim
        self.trunk = trunk
        self.backbone = backbone
        self.vocab = vocab
        self.loss_lambda = float(loss_lambda)
        self.branch_start = len(layers) - audio_head_layers
        self.audio_embed = nn.Embedding(vocab.audio_vocab_size, hidden, padding_idx=vocab.audio_pad)
        nn.init.normal_(self.audio_embed.weight, std=0.02)
        with torch.no_grad():
            self.audio_embed.weight[vocab.audio_pad].zero_()
        self.music_encoder = MusicEncoder(hidden, vocab.feature_dim)
        # Copies, not views: the branch trains fully while the trunk only gets LoRA.
        self.audio_branch = nn.ModuleList(copy.deepcopy(layer) for layer in layers[self.branch_start :])
        self.audio_norm = copy.deepcopy(backbone.final_norm(trunk))
        self.audio_head = nn.Linear(hidden, vocab.audio_vocab_size, bias=False)
        nn.init.normal_(self.audio_head.weight, std=0.02)
        for module in (self.audio_branch, self.audio_norm):
            for p in module.parameters():
                p.requires_grad_(True)

    def head_modules(self) -> dict[str, nn.Module]:
        """Everything outside the trunk (saved beside the LoRA adapter)."""
        return {
            "audio_embed": self.audio_embed,
            "music_encoder": self.music_encoder,
            "audio_branch": self.audio_branch,
            "audio_norm": self.audio_norm,
            "audio_head": self.audio_head,
        }

    def embed(self, text_ids: torch.Tensor, audio_ids: torch.Tensor, music_mask: torch.Tensor,
              music_features: torch.Tensor) -> torch.Tensor:
        x = self.trunk.get_input_embeddings()(text_ids) + self.audio_embed(audio_ids)
        return self.music_encoder(x, music_mask, music_features)

    def hidden_and_logits(
        self, text_ids, audio_ids, music_mask, attention_mask, music_features, with_audio: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text logits [B, T, V] and, if ``with_audio``, audio logits [B, T, A]."""
        out = self.trunk(
            inputs_embeds=self.embed(text_ids, audio_ids, music_mask, music_features),
            attention_mask=attention_mask,
            output_hidden_states=with_audio,
            use_cache=False,
        )
        if not with_audio:
            return out.logits, None
        h = self.backbone.run_layers(self.trunk, self.audio_branch, out.hidden_states[self.branch_start], attention_mask)
        return out.logits, self.audio_head(self.audio_norm(h))

    def forward(
        self,
        text_ids: torch.Tensor,
        audio_ids: torch.Tensor,
        music_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        text_labels: torch.Tensor,
        audio_labels: torch.Tensor,
        music_features: torch.Tensor,
    ) -> JointOutput:
        with_audio = self.loss_lambda < 1.0
        text_logits, audio_logits = self.hidden_and_logits(
            text_ids, audio_ids, music_mask, attention_mask, music_features, with_audio
        )
        text_loss, n_text = masked_ce(text_logits, text_labels)
        if with_audio:
            audio_loss, n_audio = masked_ce(audio_logits, audio_labels)
            loss = self.loss_lambda * text_loss + (1.0 - self.loss_lambda) * audio_loss
        else:
            audio_loss, n_audio = text_loss.new_zeros(()), (audio_labels != IGNORE).sum()
            loss = text_loss
        return JointOutput(loss, text_loss, audio_loss, n_text, n_audio, text_logits, audio_logits)
