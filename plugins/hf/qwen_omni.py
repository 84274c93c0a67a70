"""Backbone plugin for the *thinker* of Qwen2.5-Omni (its text-generating half).

The thinker is an audio tower + a vision tower + a Qwen2 language model with multimodal
rotary embeddings (mrope: position ids on three axes, time/height/width). vcritic feeds it
``inputs_embeds``: the critic hears through the thinker's own audio tower
(:meth:`QwenOmniThinkerBackbone.native_hearing`, :mod:`plugins.hf.qwen_omni_hearing`) with the
positions the thinker itself computes. The towers are never LoRA-adapted; the vision tower is frozen.

Two ways to build it:

* ``path=...``: a Qwen2.5-Omni checkpoint directory (the full omni model or a saved
  thinker); only the thinker's weights are loaded, the talker and token2wav are skipped.
* no ``path``: a tiny random thinker (sizes overridable through ``tiny``) and a byte-level
  BPE tokenizer trained on the corpus, for tests and offline demos.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from plugins.hf.causal_lm import TINY_DEFAULTS, decoder_of, train_bpe_tokenizer
from plugins.hf.qwen_omni_hearing import QwenOmniHearing

# peft reads a string as a full-match regex. A list of suffixes cannot work here: the audio
# tower also has ``self_attn.q_proj``... and the vision tower ``mlp.gate_proj``..., so the
# language model's layers must be named by their path.
LORA_TARGET_REGEX = (
    r"(.*\.)?language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)

# Placeholder tokens the thinker's config points at; the tiny tokenizer gets them as single
# ids so that a forward with ``input_ids`` (and ``get_rope_index``) sees a coherent config.
PLACEHOLDERS = {
    "audio_token_index": "<|AUDIO|>",
    "image_token_index": "<|IMAGE|>",
    "video_token_index": "<|VIDEO|>",
    "audio_start_token_id": "<|audio_bos|>",
    "audio_end_token_id": "<|audio_eos|>",
    "vision_start_token_id": "<|vision_bos|>",
    "vision_end_token_id": "<|vision_eos|>",
}
# Chat-turn tokens of the release's template; the random thinker's tokenizer has them too.
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

# The same small decoder as the generic backbone's (the thinker config sets its own embedding tying).
TINY_TEXT: dict[str, Any] = {k: v for k, v in TINY_DEFAULTS.items() if k != "tie_word_embeddings"}
# A tiny tower on the release's front end: 128 mel bins, 2 s attention windows (n_window = 100
# frames after the stride-2 conv) and the release's 1500 sinusoidal positions (>= n_window).
# Initialised 10x wider than transformers' 0.02: at 0.02 the sinusoidal positions swamp the conv
# output and a frozen random tower is deaf (what it hears is ~1% of its output; at 0.2, ~90%).
TINY_AUDIO: dict[str, Any] = {
    "initializer_range": 0.2,
    "num_mel_bins": 128,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "d_model": 32,
    "max_source_positions": 1500,
    "n_window": 100,
}
TINY_VISION: dict[str, Any] = {
    "depth": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "patch_size": 4,
    "fullatt_block_indexes": [0],
}


def mrope_sections(head_dim: int) -> list[int]:
    """Split the rotary half-dimension over (time, height, width) in Qwen2.5-Omni's 2:3:3 ratio."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def text_positions_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Give embeddings-only calls explicit text positions (the same id on all three mrope axes).

    Without it the thinker reuses ``rope_deltas`` cached on the module by an earlier
    ``generate`` or ``input_ids`` call: positions then depend on what ran before, and a later
    batch of another size crashes. With it, position = past length + index, which is what a
    fresh thinker computes and what :meth:`QwenOmniThinkerBackbone.run_layers` uses by default.
    """
    if args or kwargs.get("input_ids") is not None or kwargs.get("position_ids") is not None:
        return None
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        return None
    past = kwargs.get("past_key_values")
    start = past.get_seq_length() if past is not None else 0
    batch, length = embeds.shape[:2]
    positions = torch.arange(start, start + length, device=embeds.device)
    kwargs["position_ids"] = positions.view(1, 1, -1).expand(3, batch, -1)
    return args, kwargs


def install_text_positions(thinker: nn.Module) -> nn.Module:
    """Register :func:`text_positions_hook` once on the thinker's inner model.

    The inner model, not the thinker: peft calls the thinker's ``forward`` directly, which
    skips hooks on the thinker itself, while the inner model is always called as a module.
    """
    inner = thinker.model
    if not getattr(inner, "_vcritic_text_positions", False):
        inner.register_forward_pre_hook(text_positions_hook, with_kwargs=True)
        inner._vcritic_text_positions = True
    return thinker


class QwenOmniThinkerBackbone:
    """Qwen2.5-Omni's thinker as vcritic's shared trunk.

    Args:
        path: Qwen2.5-Omni (or saved thinker) checkpoint directory; None builds a tiny random thinker.
        dtype: parameter dtype of the built model (``bfloat16`` or ``float32``), random or loaded.
        tiny: overrides for the random thinker: ``text``, ``audio``, ``vision`` (sub-config
            keys) and ``vocab_size`` (BPE tokenizer size, default 1024).
        seed: initialisation seed for the random thinker.
        max_audio_seconds: cut clips to this many seconds (default: the feature extractor's window).
    """

    def __init__(
        self,
        path: str | None = None,
        dtype: str = "bfloat16",
        tiny: dict[str, Any] | None = None,
        seed: int = 0,
        max_audio_seconds: float | None = None,
    ) -> None:
        self.path = path
        self.dtype = dtype
        self.tiny = dict(tiny or {})
        self.seed = seed
        self.max_audio_seconds = max_audio_seconds
        unknown = set(self.tiny) - {"text", "audio", "vision", "vocab_size"}
        if unknown:
            raise ValueError(f"unknown tiny keys {sorted(unknown)}; use text, audio, vision, vocab_size")

    def build(
        self, corpus: Sequence[str] | None = None, special_tokens: Sequence[str] = ()
    ) -> tuple[Any, Any]:
        from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration

        dtype = getattr(torch, self.dtype)
        if self.path:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
            model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(self.path, dtype=dtype)
            return install_text_positions(model), tokenizer
        qwen = [*CHAT_TOKENS, *PLACEHOLDERS.values()]
        specials = [*special_tokens, *[t for t in qwen if t not in special_tokens]]
        tokenizer = train_bpe_tokenizer(corpus or [], int(self.tiny.get("vocab_size", 1024)), specials)
        config = self._tiny_config(tokenizer)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = Qwen2_5OmniThinkerForConditionalGeneration(config)
        return install_text_positions(model.to(dtype)), tokenizer

    def _tiny_config(self, tokenizer: Any) -> Any:
        from transformers import Qwen2_5OmniThinkerConfig

        text = {**TINY_TEXT, **self.tiny.get("text", {})}
        if "rope_parameters" not in text:
            head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
            text["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": mrope_sections(head_dim),
            }
        text.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        # The towers write into the language model's embedding space, so their outputs match it.
        audio = {**TINY_AUDIO, **self.tiny.get("audio", {}), "output_dim": text["hidden_size"]}
        vision = {**TINY_VISION, **self.tiny.get("vision", {}), "out_hidden_size": text["hidden_size"]}
        ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in PLACEHOLDERS.items()}
        return Qwen2_5OmniThinkerConfig(text_config=text, audio_config=audio, vision_config=vision, **ids)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return decoder_of(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return decoder_of(model).norm

    def run_layers(
        self,
        model: nn.Module,
        layers: Sequence[nn.Module],
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run (copies of) the thinker's decoder layers as its language model does: the causal mask
        from ``attention_mask`` alone and rotary embeddings at ``position_ids`` ([3, B, T] mrope
        positions from :meth:`QwenOmniHearing.position_ids`; [B, T] is put on all three axes; None
        is 0..T-1, what the hooked forward uses for embeddings-only calls)."""
        return self._run(model, layers, hidden, attention_mask, position_ids, None)

    def run_layers_cached(self, model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor,
                          attention_mask: torch.Tensor, position_ids: torch.Tensor | None, past: Any) -> torch.Tensor:
        """:meth:`run_layers` over the new positions only (``position_ids`` theirs, [3, B, T_new] or
        [B, T_new]), appending keys and values to ``past`` at each layer's own slot."""
        return self._run(model, layers, hidden, attention_mask, position_ids, past)

    def _run(self, model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor | None, past: Any) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        decoder = decoder_of(model)
        batch, length = hidden.shape[:2]
        if position_ids is None:
            start = past.get_seq_length(int(layers[0].self_attn.layer_idx)) if past is not None and layers else 0
            position_ids = torch.arange(start, start + length, device=hidden.device).view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        mask_kwargs = {"config": decoder.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
                       "past_key_values": past, "position_ids": None}
        masks: dict[str, Any] = {}
        position_embeddings = decoder.rotary_emb(hidden, position_ids.to(hidden.device))
        extra = {"past_key_values": past, "use_cache": True} if past is not None else {}
        for layer in layers:
            kind = decoder.config.layer_types[layer.self_attn.layer_idx]
            if kind not in masks:
                where = {"layer_idx": int(layer.self_attn.layer_idx)} if past is not None else {}
                make = create_causal_mask if kind == "full_attention" else create_sliding_window_causal_mask
                masks[kind] = make(**mask_kwargs, **where)
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=position_embeddings, **extra)
        return hidden

    def lora_target_modules(self) -> str:
        """A peft regex (not a list): the language model's projections, never the towers'."""
        return LORA_TARGET_REGEX

    def native_hearing(self) -> QwenOmniHearing:
        """The thinker hears through its own audio tower, fed as its processor would feed it."""
        return QwenOmniHearing.for_checkpoint(self.path, self.max_audio_seconds)

    def init_audio_side(self, critic: Any) -> None:
        """No pretrained audio output to load (the talker's codec has no released encoder)."""

    def spec(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "tiny": self.tiny, "seed": self.seed,
                "max_audio_seconds": self.max_audio_seconds}
