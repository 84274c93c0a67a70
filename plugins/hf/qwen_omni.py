"""Backbone plugin for the *thinker* of Qwen2.5-Omni (its text-generating half).

The thinker is an audio tower + a vision tower + a Qwen2 language model with multimodal
rotary embeddings (mrope: position ids on three axes, time/height/width). vcritic only
feeds it ``inputs_embeds`` of its own, so every position is a text position and the three
axes carry the same id. The towers stay in the model (frozen, never LoRA-adapted).

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

from plugins.hf.causal_lm import TINY_DEFAULTS, decoder_of, run_decoder_layers, train_bpe_tokenizer

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

# The same small decoder as the generic backbone's (the thinker config sets its own embedding tying).
TINY_TEXT: dict[str, Any] = {k: v for k, v in TINY_DEFAULTS.items() if k != "tie_word_embeddings"}
TINY_AUDIO: dict[str, Any] = {
    "num_mel_bins": 16,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "d_model": 32,
    "max_source_positions": 200,
    "n_window": 10,
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
    fresh thinker computes and what :func:`run_decoder_layers` uses.
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
    """

    def __init__(
        self,
        path: str | None = None,
        dtype: str = "bfloat16",
        tiny: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.path = path
        self.dtype = dtype
        self.tiny = dict(tiny or {})
        self.seed = seed
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
        specials = [*special_tokens, *[t for t in PLACEHOLDERS.values() if t not in special_tokens]]
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
    ) -> torch.Tensor:
        # The generic helper passes 2-D positions [1, T]; the thinker's rotary embedding
        # broadcasts them to all three mrope axes, which equals the text positions the
        # hooked forward uses, so copied layers reproduce the thinker's own hidden states.
        return run_decoder_layers(model, layers, hidden, attention_mask)

    def lora_target_modules(self) -> str:
        """A peft regex (not a list): the language model's projections, never the towers'."""
        return LORA_TARGET_REGEX

    def spec(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "tiny": self.tiny, "seed": self.seed}
