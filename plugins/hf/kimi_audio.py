"""Backbone plugin for Kimi-Audio (MoonshotAI's audio LLM on a Qwen2.5-7B trunk).

A Kimi-Audio checkpoint is one shared embedding table over text ids and, from
``kimia_token_offset`` on, speech-tokenizer ids; 28 Qwen2 decoder layers; a text head; and an
audio side that branches off after layer ``kimia_mimo_transformer_from_layer_index`` (21): its own
``kimia_mimo_layers`` (6) decoder layers, norm and output. Every position sums the embeddings of
two streams (text ids and audio/control ids); at the music positions the audio stream's
embedding is ``(E[semantic id] + adaptor(Whisper features)) * sqrt(2)``.

vcritic maps this onto its joint model: the text rows, layers 0..27, norm and text head become a
plain ``Qwen2ForCausalLM`` (the trunk); the audio layers, norm, the audio rows of the embedding and
of the audio output, and the Whisper-feature adaptor become ``audio_branch``, ``audio_norm``,
``audio_embed``, ``audio_head`` and ``hearing_encoder`` (:func:`convert_kimi_state_dict`).

Two ways to build it:

* ``path=...``: a Kimi-Audio checkpoint directory as released (``config.json`` with the ``kimia_*``
  keys, sharded safetensors + ``model.safetensors.index.json``, its tokenizer, ``whisper-large-v3/``),
  or a vcritic save of the tiny model (a plain Qwen2 checkpoint).
* no ``path``: a tiny random Qwen2 with Kimi's special tokens in a BPE tokenizer, for tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plugins.hf.causal_lm import (
    DEFAULT_LORA_TARGETS,
    TINY_DEFAULTS,
    decoder_of,
    run_decoder_layers,
    train_bpe_tokenizer,
)
from plugins.hf.kimi_hearing import KIMI_TOKENS, KimiHearing, special_ids

KIMI_ARCHITECTURE = "MoonshotKimiaForCausalLM"
# The tiny model: Kimi's shape in miniature (the branch leaves after layer 1 of 4, two audio layers).
TINY_KIMI: dict[str, Any] = {
    **TINY_DEFAULTS,
    "kimia_mimo_layers": 2,
    "kimia_mimo_transformer_from_layer_index": 1,
    "kimia_adaptor_input_dim": 64,  # 4 stacked frames of a d_model=16 tiny Whisper
}
ADAPTOR_PARAMS = ("layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias",
                  "layers.4.weight", "layers.4.bias")


def read_kimi_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"kimi_audio backbone: {file} not found; path= must be a Kimi-Audio checkpoint directory")
    return json.loads(file.read_text())


def is_kimi_checkpoint(config: Mapping[str, Any]) -> bool:
    """A released Kimi-Audio layout (as opposed to vcritic's plain-Qwen2 save of the tiny model)."""
    return "kimia_token_offset" in config and config.get("model_type") != "qwen2"


class CheckpointTensors(Mapping):
    """The tensors of a safetensors checkpoint (sharded with an index, or one file), read lazily by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        elif (self.path / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors.index.json or model.safetensors")

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / self.files[name]), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _cfg(config: Any, key: str) -> Any:
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    if value is None:
        raise KeyError(f"Kimi-Audio config lacks {key!r}")
    return value


def check_branch(config: Any, num_layers: int, k: int) -> None:
    """The audio branch must start where Kimi's does: ``num_layers - k == from_layer_index + 1`` and
    ``k == kimia_mimo_layers``.

    Raises:
        ValueError: naming the ``model.audio_head_layers`` value that fits.
    """
    start = int(_cfg(config, "kimia_mimo_transformer_from_layer_index"))
    mimo = int(_cfg(config, "kimia_mimo_layers"))
    if num_layers - k != start + 1 or k != mimo:
        raise ValueError(
            f"model.audio_head_layers={k} does not fit Kimi-Audio: its audio layers ({mimo}) branch off after "
            f"decoder layer {start} (0-based) of {num_layers}, so the branch must copy the top "
            f"{num_layers - start - 1}; set model.audio_head_layers={num_layers - start - 1}"
        )


def check_names(names: Sequence[str], config: Any) -> None:
    """Every checkpoint tensor must be one the converter maps (rotary caches excepted).

    Raises:
        ValueError: unknown or missing tensors, by name.
    """
    n, m = int(_cfg(config, "num_hidden_layers")), int(_cfg(config, "kimia_mimo_layers"))
    fixed = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.mimo_norm.weight",
             "mimo_output.weight", *(f"model.vq_adaptor.{p}" for p in ADAPTOR_PARAMS)}
    layer_ok = {f"model.layers.{i}." for i in range(n)} | {f"model.mimo_layers.{j}." for j in range(m)}
    unknown = [
        name for name in names
        if name not in fixed and not name.endswith("rotary_emb.inv_freq")
        and ".".join(name.split(".")[:3]) + "." not in layer_ok
    ]
    if any(name.startswith("whisper_model.") for name in unknown):
        raise ValueError("this is a Kimi-Audio fine-tuning checkpoint (Whisper inside); export it first with "
                         "Kimi-Audio's finetune_codes/model.py --action export_model, then point path= at the export")
    missing = sorted(fixed - set(names))
    if unknown or missing:
        raise ValueError(f"Kimi-Audio checkpoint: unknown tensors {unknown[:8]} / missing tensors {missing[:8]}")


def _rows(table: torch.Tensor, offset: int, codes: int, begin: int, end: int) -> torch.Tensor:
    """vcritic's A = codes + 3 rows: the codebook ids, PAD (zero), BOS (Kimi's media begin), EOS (media end)."""
    out = table.new_zeros(codes + 3, table.shape[1])
    out[:codes] = table[offset : offset + codes]
    out[codes + 1], out[codes + 2] = table[begin], table[end]
    return out


def trunk_state_dict(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The Qwen2 trunk's state dict: the text rows (``[0, kimia_token_offset)``) of the embedding and
    text head, decoder layers 0..N-1 and the final norm (Qwen2 names them as Kimi does)."""
    offset = int(_cfg(config, "kimia_token_offset"))
    trunk = {name: state_dict[name] for name in state_dict if name.startswith(("model.layers.", "model.norm."))
             and not name.endswith("rotary_emb.inv_freq")}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        trunk[name] = state_dict[name][:offset].clone()  # a copy: the audio rows' storage is freed
    return trunk


def audio_side_state_dict(state_dict: Mapping[str, torch.Tensor], config: Any, codebook_size: int) -> dict[str, torch.Tensor]:
    """vcritic's audio side (Q = 1): ``audio_branch.*`` ← ``model.mimo_layers.*``, ``audio_norm`` ←
    ``model.mimo_norm``, ``audio_embed``/``audio_head`` ← the audio rows of ``model.embed_tokens`` /
    ``mimo_output`` (+ BOS/EOS rows from Kimi's media begin/end tokens), ``hearing_encoder`` ←
    ``model.vq_adaptor``."""
    offset, vocab = int(_cfg(config, "kimia_token_offset")), int(_cfg(config, "vocab_size"))
    begin, end = int(_cfg(config, "kimia_media_begin")), int(_cfg(config, "kimia_media_end"))
    if not 0 < codebook_size <= vocab - offset:
        raise ValueError(f"audio tokenizer codebook_size={codebook_size} does not fit Kimi-Audio's {vocab - offset} "
                         f"audio ids; use the kimi_semantic audio tokenizer with this backbone")
    if max(begin, end) >= offset:
        raise ValueError(f"kimia_media_begin/end ({begin}, {end}) must be text ids below kimia_token_offset={offset}")
    out = {"audio_norm.weight": state_dict["model.mimo_norm.weight"],
           "audio_embed.weight": _rows(state_dict["model.embed_tokens.weight"], offset, codebook_size, begin, end),
           "audio_head.weight": _rows(state_dict["mimo_output.weight"], offset, codebook_size, begin, end)}
    for name in state_dict:
        if name.startswith("model.mimo_layers.") and not name.endswith("rotary_emb.inv_freq"):
            out["audio_branch." + name[len("model.mimo_layers."):]] = state_dict[name]
    for p in ADAPTOR_PARAMS:
        out[f"hearing_encoder.{p}"] = state_dict[f"model.vq_adaptor.{p}"]
    return out


def convert_kimi_state_dict(state_dict: Mapping[str, torch.Tensor], config: Any,
                            codebook_size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Kimi-Audio's parameters → ``(trunk_sd, audio_side_sd)`` (see the two functions above).

    Raises:
        ValueError: a tensor the converter does not know, a missing one, or sizes that do not fit.
    """
    check_names(list(state_dict), config)
    return trunk_state_dict(state_dict, config), audio_side_state_dict(state_dict, config, codebook_size)


def qwen2_config(config: Mapping[str, Any], specials: Mapping[str, int]) -> Any:
    """The trunk's ``Qwen2Config``: Kimi's sizes with the text vocabulary only, plus its ``kimia_*`` keys
    and the special-token ids (``kimia_special_tokens``) so a saved trunk stays self-describing."""
    from transformers import Qwen2Config

    if config.get("rope_scaling"):
        raise ValueError(f"Kimi-Audio config has rope_scaling={config['rope_scaling']}; only plain RoPE is supported")
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "hidden_act")
    offset = int(config["kimia_token_offset"])
    pad = config.get("pad_token_id")
    return Qwen2Config(
        **{k: config[k] for k in keys if k in config},
        vocab_size=offset,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))},
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=pad if pad is not None and pad < offset else None,
        **{k: v for k, v in config.items() if k.startswith("kimia_")},
        kimia_special_tokens=dict(specials),
    )


def assemble_trunk(config: Any, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A ``Qwen2ForCausalLM`` holding ``state_dict`` exactly (built on the meta device: no random init of 7B)."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers are not in checkpoints
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"Kimi-Audio trunk: {left[:4]} were not loaded")
    return model


class KimiAudioBackbone:
    """Kimi-Audio as vcritic's shared trunk, with its audio layers, head and Whisper adaptor.

    Args:
        path: Kimi-Audio checkpoint directory (or vcritic's save of the tiny model); None: tiny random model.
        dtype: parameter dtype of the trunk (``bfloat16`` or ``float32``).
        whisper_path: Whisper encoder checkpoint for the hearing features (default ``<path>/whisper-large-v3``).
        whisper_device: where the data stage runs Whisper (``cpu`` or ``cuda``).
        output_type: ``both`` (critique in text and speech: Kimi's ``ctd`` marker) or ``text`` (``ct``).
        max_seconds: longest clip the hearing takes (vcritic cuts longer ones).
        config: overrides of :data:`TINY_KIMI` for the random model.
        tokenizer_vocab_size: BPE size of the random model's tokenizer.
        seed: initialisation seed for the random model.
        trust_remote_code: load the checkpoint's own tokenizer code (Kimi ships a tiktoken tokenizer).
    """

    def __init__(self, path: str | None = None, dtype: str = "bfloat16", whisper_path: str | None = None,
                 whisper_device: str = "cpu", output_type: str = "both", max_seconds: float = 30.0,
                 config: dict[str, Any] | None = None, tokenizer_vocab_size: int = 512, seed: int = 0,
                 trust_remote_code: bool = True) -> None:
        if output_type not in ("both", "text"):
            raise ValueError(f"kimi_audio output_type={output_type!r}; use 'both' or 'text'")
        self.path, self.dtype, self.whisper_path = path, dtype, whisper_path
        self.whisper_device, self.output_type, self.max_seconds = whisper_device, output_type, float(max_seconds)
        self.config = dict(config or {})
        self.tokenizer_vocab_size, self.seed, self.trust_remote_code = tokenizer_vocab_size, seed, trust_remote_code

    def kimi_config(self) -> dict[str, Any]:
        """The checkpoint's config.json, or the tiny model's settings."""
        return read_kimi_config(self.path) if self.path else {**TINY_KIMI, **self.config}

    def build(self, corpus: Sequence[str] | None = None, special_tokens: Sequence[str] = ()) -> tuple[Any, Any]:
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        dtype = getattr(torch, self.dtype)
        if self.path:
            config = read_kimi_config(self.path)
            tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
            if not is_kimi_checkpoint(config):  # vcritic's own save of a tiny model
                return Qwen2ForCausalLM.from_pretrained(self.path, dtype=dtype), tokenizer
            tensors = CheckpointTensors(self.path)
            check_names(list(tensors), config)
            model = assemble_trunk(qwen2_config(config, special_ids(tokenizer)), trunk_state_dict(tensors, config), dtype)
            return model, tokenizer
        specials = [*special_tokens, *[t for t in KIMI_TOKENS.values() if t not in special_tokens]]
        tokenizer = train_bpe_tokenizer(corpus or [], self.tokenizer_vocab_size, specials)
        ids = special_ids(tokenizer)
        settings = self.kimi_config()
        config = Qwen2Config(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id, kimia_token_offset=len(tokenizer),
            kimia_media_begin=ids["media_begin"], kimia_media_end=ids["media_end"], kimia_special_tokens=ids,
            **settings,
        )
        check_branch(config, config.num_hidden_layers, config.kimia_mimo_layers)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = Qwen2ForCausalLM(config)
        return model.to(dtype), tokenizer

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return decoder_of(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return decoder_of(model).norm

    def run_layers(self, model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor,
                   attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Kimi uses plain positions 0..T-1 (its hearing returns None), as the generic helper does.
        if position_ids is None:
            return run_decoder_layers(model, layers, hidden, attention_mask)
        return run_decoder_layers(model, layers, hidden, attention_mask, position_ids)

    def run_layers_cached(self, model: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor,
                          attention_mask: torch.Tensor, position_ids: torch.Tensor | None, past: Any) -> torch.Tensor:
        """:meth:`run_layers` over the new positions only, appending keys and values to ``past``."""
        return run_decoder_layers(model, layers, hidden, attention_mask, position_ids, past)

    def lora_target_modules(self) -> list[str]:
        """The trunk's attention and MLP projections (LoRA wraps the trunk only, never the audio side)."""
        return list(DEFAULT_LORA_TARGETS)

    def native_hearing(self) -> KimiHearing:
        config = self.kimi_config()
        whisper = self.whisper_path
        if whisper is None and self.path and (Path(self.path) / "whisper-large-v3").is_dir():
            whisper = str(Path(self.path) / "whisper-large-v3")
        return KimiHearing(
            feature_dim=int(_cfg(config, "kimia_adaptor_input_dim")), hidden_size=int(_cfg(config, "hidden_size")),
            eps=float(config.get("rms_norm_eps", 1e-6)), whisper_path=whisper, device=self.whisper_device,
            max_seconds=self.max_seconds, output_type=self.output_type,
        )

    def init_audio_side(self, critic: Any) -> None:
        """Check the branch point; for a Kimi-Audio checkpoint load its audio layers, norm, audio rows
        of the embedding and output, and the adaptor into the critic (the tiny model keeps its random ones).

        Raises:
            ValueError: the branch does not start where Kimi's does, or the audio tokenizer is not single-codebook.
        """
        config = self.kimi_config()
        check_branch(config, len(self.decoder_layers(critic.trunk)), len(critic.audio_branch))
        if not (self.path and is_kimi_checkpoint(config)):
            return
        q = int(getattr(getattr(critic, "vocab", None), "num_codebooks", 1))
        if q != 1:
            raise ValueError(f"Kimi-Audio speaks one semantic codebook; the audio tokenizer has {q} (use kimi_semantic)")
        codes = critic.audio_head.out_features - 3
        side = audio_side_state_dict(CheckpointTensors(self.path), config, codes)
        for name in ("audio_embed", "audio_branch", "audio_norm", "audio_head", "hearing_encoder"):
            module = getattr(critic, name, None)
            if module is None and name == "hearing_encoder":
                continue  # a critic hearing through vcritic's music encoder has no adaptor to fill
            part = {k[len(name) + 1 :]: v for k, v in side.items() if k.startswith(name + ".")}
            module.load_state_dict(part, strict=True)

    def spec(self) -> dict[str, Any]:
        return {
            "path": self.path, "dtype": self.dtype, "whisper_path": self.whisper_path,
            "whisper_device": self.whisper_device, "output_type": self.output_type, "max_seconds": self.max_seconds,
            "config": self.config, "tokenizer_vocab_size": self.tokenizer_vocab_size, "seed": self.seed,
            "trust_remote_code": self.trust_remote_code,
        }

