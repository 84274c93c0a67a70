"""Backbone plugin for any Hugging Face decoder-only causal LM (Llama, Qwen2/3, Mistral, ...).

Two ways to build it:

* ``path=...``: a pretrained checkpoint directory (or hub id, where a hub is reachable).
* no ``path``: a small randomly initialised model of ``model_type`` with ``config``
  overrides, and a byte-level BPE tokenizer trained on the given corpus. This is how the
  demo and the tests run without downloading weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# A small decoder that trains in minutes on two CPU cores.
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}


def train_bpe_tokenizer(corpus: Sequence[str], vocab_size: int, special_tokens: Sequence[str]) -> Any:
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not corpus:
        raise ValueError("a from-scratch causal_lm backbone needs a text corpus to train its tokenizer")
    eos, pad = "<|endoftext|>", "<|pad|>"
    specials = [pad, eos, *[t for t in special_tokens if t not in (pad, eos)]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=pad, additional_special_tokens=specials[2:]
    )


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) of a causal LM,
    looking through a peft wrapper if there is one."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()


def run_decoder_layers(model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor | None = None, past_key_values: Any = None) -> torch.Tensor:
    """Run decoder ``layers`` (the model's own or copies of them) causally over ``hidden`` [B, T, H],
    with the model's own causal mask and rotary position embeddings (at ``position_ids``, default 0..T-1
    after the cached positions).

    With ``past_key_values`` (a transformers ``Cache``), ``hidden`` holds only the new positions,
    ``attention_mask`` covers the cached and the new ones, and each layer appends its keys and values
    to the cache at its own ``self_attn.layer_idx``.
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    decoder = decoder_of(model)
    config = decoder.config
    positions = position_ids
    if positions is None:
        start = past_key_values.get_seq_length(layer_index(layers[0])) if past_key_values is not None and layers else 0
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask_kwargs = {
        "config": config,
        "inputs_embeds": hidden,
        "attention_mask": attention_mask,
        "past_key_values": past_key_values,
        "position_ids": positions,
    }
    masks: dict[str, Any] = {}
    position_embeddings = decoder.rotary_emb(hidden, positions)
    for layer in layers:
        kind = getattr(layer, "attention_type", "full_attention")
        if kind not in masks:
            # With a cache, the mask is sized by this layer's own cache slot (a branch's slots are not 0..K-1).
            where = {"layer_idx": layer_index(layer)} if past_key_values is not None else {}
            make = create_causal_mask if kind == "full_attention" else create_sliding_window_causal_mask
            masks[kind] = make(**mask_kwargs, **where)
        extra = {"past_key_values": past_key_values, "use_cache": True} if past_key_values is not None else {}
        hidden = layer(
            hidden, attention_mask=masks[kind], position_embeddings=position_embeddings, position_ids=positions, **extra
        )
    return hidden


def layer_index(layer: nn.Module) -> int:
    """The cache slot of a decoder layer (its attention's ``layer_idx``; copies keep the original's)."""
    return int(layer.self_attn.layer_idx)


class CausalLMBackbone:
    """Wraps an ``AutoModelForCausalLM``.

    Args:
        path: pretrained model directory; None builds a small random model.
        model_type: transformers model type for the random model (``qwen2``, ``llama``...).
        config: overrides of :data:`TINY_DEFAULTS` for the random model.
        tokenizer_vocab_size: BPE vocabulary size for the random model's tokenizer.
        dtype: ``float32`` or ``bfloat16`` for loading pretrained weights.
        seed: initialisation seed for the random model.
        lora_targets: linear module names LoRA adapts (default: attention and MLP projections).
        trust_remote_code: passed to transformers for pretrained checkpoints with custom code.
    """

    def __init__(
        self,
        path: str | None = None,
        model_type: str = "qwen2",
        config: dict[str, Any] | None = None,
        tokenizer_vocab_size: int = 1024,
        dtype: str = "float32",
        seed: int = 0,
        lora_targets: list[str] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.path = path
        self.model_type = model_type
        self.config = dict(config or {})
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.dtype = dtype
        self.seed = seed
        self.lora_targets = lora_targets
        self.trust_remote_code = trust_remote_code

    def build(self, corpus: Sequence[str] | None = None, special_tokens: Sequence[str] = ()) -> tuple[Any, Any]:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if self.path:
            tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=getattr(torch, self.dtype), trust_remote_code=self.trust_remote_code
            )
            return model, tokenizer
        tokenizer = train_bpe_tokenizer(corpus or [], self.tokenizer_vocab_size, special_tokens)
        config = AutoConfig.for_model(
            self.model_type,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            **{**TINY_DEFAULTS, **self.config},
        )
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(config)
        return model, tokenizer

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return decoder_of(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return decoder_of(model).norm

    def run_layers(self, model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return run_decoder_layers(model, layers, hidden, attention_mask, position_ids)

    def run_layers_cached(self, model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor,
                          attention_mask: torch.Tensor, position_ids: torch.Tensor | None, past: Any) -> torch.Tensor:
        """:meth:`run_layers` over the new positions only, appending keys and values to ``past``."""
        return run_decoder_layers(model, layers, hidden, attention_mask, position_ids, past)

    def lora_target_modules(self) -> list[str]:
        return list(self.lora_targets or DEFAULT_LORA_TARGETS)

    def native_hearing(self) -> None:
        """A plain causal LM has no audio input: it hears through vcritic's music encoder."""
        return None

    def init_audio_side(self, critic) -> None:
        """No pretrained audio output to load."""

    def spec(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "model_type": self.model_type,
            "config": self.config,
            "tokenizer_vocab_size": self.tokenizer_vocab_size,
            "dtype": self.dtype,
            "seed": self.seed,
            "lora_targets": self.lora_targets,
            "trust_remote_code": self.trust_remote_code,
        }
