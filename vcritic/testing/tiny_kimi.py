"""Tiny random checkpoints in Kimi-Audio's own layout, for tests of the ``kimi_audio`` backbone.

:func:`write_tiny_kimi_checkpoint` writes what a released Kimi-Audio directory holds, in miniature:
``config.json`` with Kimi's keys, sharded safetensors with Kimi's parameter names and
``model.safetensors.index.json``, a tokenizer with Kimi's control tokens (a small BPE saved with
``save_pretrained``: Kimi's own is a tiktoken file plus remote code, which tests cannot load), and
optionally ``whisper-large-v3/`` (a tiny Whisper, :func:`write_tiny_whisper_checkpoint`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "the chorus lands on a bright sustained high note",
    "pitch drifts flat in the second verse but the vibrato is steady",
    "breath support is weak and the consonants blur together",
    "a warm tone with clean diction and a confident belt",
] * 4


def kimi_layer_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of one Kimi (Qwen2-style) decoder layer, by Kimi's names."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    return {
        "self_attn.q_proj.weight": (hidden, hidden), "self_attn.q_proj.bias": (hidden,),
        "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (intermediate, hidden), "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
    }


def _random(shape: tuple[int, ...], name: str, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("layers.4.weight"):  # norms: near one
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return 0.05 * torch.randn(shape, generator=gen)


def write_tiny_kimi_checkpoint(
    directory: str | Path,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 4,
    mimo_layers: int = 2,
    from_layer: int = 1,
    heads: int = 4,
    kv_heads: int = 2,
    codebook_size: int = 48,
    whisper_d_model: int = 16,
    tokenizer_vocab_size: int = 300,
    shards: int = 2,
    seed: int = 0,
    whisper: bool = True,
    corpus: Sequence[str] = CORPUS,
) -> Path:
    """Write a random Kimi-Audio checkpoint (Kimi's file layout, config keys and tensor names) to ``directory``.

    The text vocabulary is the tokenizer's, padded to a multiple of 8; audio ids start at
    ``kimia_token_offset`` (= that padded size) and there are ``codebook_size`` of them.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    from plugins.hf.causal_lm import train_bpe_tokenizer
    from plugins.hf.kimi_audio import KIMI_ARCHITECTURE
    from plugins.hf.kimi_hearing import KIMI_TOKENS, special_ids

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bpe_tokenizer(list(corpus), tokenizer_vocab_size, list(KIMI_TOKENS.values()))
    tokenizer.save_pretrained(out)
    ids = special_ids(tokenizer)
    offset = -(-len(tokenizer) // 8) * 8
    vocab = offset + codebook_size
    config: dict[str, Any] = {
        "architectures": [KIMI_ARCHITECTURE], "model_type": "moonshot_kimia",
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "hidden_act": "silu",
        "tie_word_embeddings": False, "vocab_size": vocab, "torch_dtype": "float32",
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "kimia_mimo_layers": mimo_layers, "kimia_mimo_transformer_from_layer_index": from_layer,
        "kimia_mimo_audiodelaytokens": 6, "kimia_audio_output_vocab": codebook_size + 16,
        "kimia_text_output_vocab": offset, "num_audio_special_tokens": 16, "num_base_tokens": len(tokenizer) - 11,
        "kimia_token_offset": offset, "use_whisper_feature": True, "kimia_adaptor_input_dim": 4 * whisper_d_model,
        "kimia_media_begin": ids["media_begin"], "kimia_media_end": ids["media_end"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden_size)}
    layer = kimi_layer_shapes(hidden_size, intermediate_size, heads, kv_heads)
    for i in range(num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    shapes["model.norm.weight"] = (hidden_size,)
    for j in range(mimo_layers):
        shapes.update({f"model.mimo_layers.{j}.{k}": s for k, s in layer.items()})
    shapes["model.mimo_norm.weight"] = (hidden_size,)
    adaptor_in = 4 * whisper_d_model
    shapes.update({
        "model.vq_adaptor.layers.0.weight": (hidden_size, adaptor_in), "model.vq_adaptor.layers.0.bias": (hidden_size,),
        "model.vq_adaptor.layers.3.weight": (hidden_size, hidden_size), "model.vq_adaptor.layers.3.bias": (hidden_size,),
        "model.vq_adaptor.layers.4.weight": (hidden_size,), "model.vq_adaptor.layers.4.bias": (hidden_size,),
        "lm_head.weight": (vocab, hidden_size), "mimo_output.weight": (vocab, hidden_size),
    })
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: _random(shape, name, gen) for name, shape in shapes.items()}
    names = list(tensors)
    weight_map, total = {}, 0
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if whisper:
        write_tiny_whisper_checkpoint(out / "whisper-large-v3", d_model=whisper_d_model, seed=seed)
    return out


def write_tiny_whisper_checkpoint(directory: str | Path, *, d_model: int = 16, layers: int = 1, heads: int = 2,
                                  num_mel_bins: int = 128, seed: int = 0) -> Path:
    """A random Whisper (``WhisperModel.save_pretrained``) with large-v3's input: 128 mel bins, 30 s windows
    (1500 encoder positions). Like Kimi's ``whisper-large-v3/`` it holds no preprocessor config."""
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(
        vocab_size=64, num_mel_bins=num_mel_bins, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_source_positions=1500, max_target_positions=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WhisperModel(config)
    out = Path(directory)
    model.save_pretrained(out)
    return out
