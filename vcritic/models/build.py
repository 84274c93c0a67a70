"""Building, exporting and loading critics.

An *export* is a self-contained directory that rebuilds a trained critic anywhere::

    critic.json          backbone + audio tokenizer plugin specs, K, λ, LoRA settings, and for a
                         pretrained backbone a reference to it (path or URI, name, sha256 of its weights)
    tokenizer/           text tokenizer (with vcritic's special tokens)
    adapter/             peft LoRA adapter of the trunk (+ trained token rows / LM head)
    heads.safetensors    audio embedding, music or hearing encoder, audio branch, norm and head
    trunk_extra.safetensors  trunk weights trained outside LoRA (e.g. an audio tower's projection)
    audio_tokenizer/     the audio tokenizer's state (e.g. a k-means codebook, a codec reference)
    base/                the base model itself, only for backbones vcritic built from scratch

A pretrained base model is not copied: loading resolves it by its recorded path, else by
name under ``model.base_models_dir`` / ``$VCRITIC_BASE_MODELS`` (checked by hash; see
:mod:`vcritic.models.checkpoints`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from vcritic import registry
from vcritic.models.joint import JointCritic
from vcritic.models.sequence import SPECIAL_TOKENS, Vocab, vcritic_prompt

EXPORT_FORMAT = 2
# The model settings an export needs to rebuild (and generate with) the critic.
MODEL_KEYS = ("audio_head_layers", "loss_lambda", "lora_r", "lora_alpha", "lora_dropout", "train_text_head",
              "max_prompt_tokens", "max_text_tokens", "max_audio_tokens", "codebook_weights", "train_audio_encoder",
              "train_audio_projection", "generate")


def add_special_tokens(tokenizer, model=None) -> list[int]:
    """Make sure the tokenizer has vcritic's special tokens (and, given ``model``, the model rows for them).

    Tokens are appended in a fixed order, so the data stage (tokenizer only) and the model side
    give them the same ids.

    Returns:
        ids of tokens that were new to a pretrained vocabulary (their embeddings must train).
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(missing)


def text_tokenizer(directory: str | Path):
    """The text tokenizer of a (materialised) backbone, with vcritic's special tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    add_special_tokens(tokenizer)
    return tokenizer


def make_vocab(tokenizer, hearing, audio_codes: int, feature_dim: int, num_codebooks: int) -> Vocab:
    """Both streams' ids; a backbone that hears natively supplies its own music slot and critique end."""
    slot = end = None
    if hearing is not None:
        parts = hearing.prompt(tokenizer, "", "")
        slot, end = int(parts.slot_id), int(parts.end_id)
    return Vocab.from_tokenizer(tokenizer, audio_codes, feature_dim, num_codebooks, music_slot=slot, critique_end=end)


def prompt_parts(tokenizer, hearing, vocab: Vocab, persona: str, context: str, limit: int):
    """The prompt around the music for one example: the backbone's own layout or vcritic's."""
    if hearing is not None:
        return hearing.prompt(tokenizer, persona, context)
    return vcritic_prompt(tokenizer, vocab, persona, context, limit)


def materialize_backbone(spec: dict[str, Any], corpus: Sequence[str], out_dir: str | Path) -> dict[str, Any]:
    """Build the backbone once; a from-scratch one is saved to ``out_dir`` so that every worker
    and every later load uses the same weights and tokenizer.

    Returns:
        the backbone spec to use from now on (``options.path`` set for from-scratch backbones).
    """
    options = dict(spec.get("options") or {})
    if options.get("path"):
        from vcritic.models.checkpoints import checkpoint_ref

        return {"name": spec["name"], "options": options, "base_ref": checkpoint_ref(options["path"])}
    backbone = registry.create("backbones", spec["name"], **options)
    model, tokenizer = backbone.build(corpus=corpus, special_tokens=SPECIAL_TOKENS)
    add_special_tokens(tokenizer, model)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"name": spec["name"], "options": {**backbone.spec(), "path": str(out.resolve())}, "from_scratch": True}


def _lora_config(model_cfg: dict[str, Any], backbone, new_token_ids: list[int]):
    from peft import LoraConfig

    targets = model_cfg.get("lora_target_modules") or backbone.lora_target_modules()
    kwargs: dict[str, Any] = {}
    if model_cfg.get("train_text_head"):
        kwargs["modules_to_save"] = ["lm_head"]
    if new_token_ids:
        kwargs["trainable_token_indices"] = {"embed_tokens": list(new_token_ids)}
    return LoraConfig(
        r=int(model_cfg["lora_r"]),
        lora_alpha=int(model_cfg["lora_alpha"]),
        lora_dropout=float(model_cfg["lora_dropout"]),
        target_modules=targets,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def build_critic(
    backbone_spec: dict[str, Any], model_cfg: dict[str, Any], audio_codes: int, feature_dim: int,
    adapter_dir: str | Path | None = None, num_codebooks: int = 1,
) -> tuple[JointCritic, Any]:
    """Build a LoRA-wrapped joint critic.

    Args:
        backbone_spec: ``{"name", "options"}`` (from :func:`materialize_backbone`).
        model_cfg: the ``model`` section of the config (LoRA, K, λ...).
        audio_codes: ids per codebook of the audio tokenizer.
        feature_dim: the width of the audio tokenizer's continuous frames.
        adapter_dir: load a trained LoRA adapter instead of a fresh one (the backbone's own
            pretrained audio side is then not loaded: the export's heads replace it).
        num_codebooks: codebooks per frame of the audio tokenizer.
    """
    from peft import PeftModel, get_peft_model

    backbone = registry.create("backbones", backbone_spec["name"], **backbone_spec.get("options", {}))
    trunk, tokenizer = backbone.build()
    new_ids = add_special_tokens(tokenizer, trunk)
    for p in trunk.parameters():
        p.requires_grad_(False)
    hearing = backbone.native_hearing()
    vocab = make_vocab(tokenizer, hearing, audio_codes, feature_dim, num_codebooks)
    # The audio branch copies plain (pre-LoRA) layers.
    critic = JointCritic(trunk, backbone, vocab, int(model_cfg["audio_head_layers"]), float(model_cfg["loss_lambda"]),
                         model_cfg.get("codebook_weights"), hearing)
    if adapter_dir is None:
        backbone.init_audio_side(critic)
    # The new modules take the trunk's dtype (a bf16 backbone gets bf16 heads).
    dtype = trunk.get_input_embeddings().weight.dtype
    for module in critic.head_modules().values():
        module.to(dtype)
    if adapter_dir is not None:
        critic.trunk = PeftModel.from_pretrained(trunk, str(adapter_dir), is_trainable=True)
    else:
        critic.trunk = get_peft_model(trunk, _lora_config(model_cfg, backbone, new_ids))
    if hearing is not None:
        hearing.set_trainable(trunk, critic.hearing_encoder, bool(model_cfg.get("train_audio_encoder", False)),
                              bool(model_cfg.get("train_audio_projection", False)))
    if critic.loss_lambda >= 1.0:
        # Text-only SFT: the speech output neither trains nor receives gradients; how the
        # critic hears (the input side) still trains.
        for module in critic.output_modules().values():
            module.requires_grad_(False)
    return critic, tokenizer


_PEFT_MANAGED = ("lora_", "modules_to_save", "original_module", "token_adapter", "trainable_tokens")


def trunk_extra_state(critic: JointCritic) -> dict[str, Any]:
    """Trunk weights that train outside LoRA (an audio tower or its projection), by base-model name."""
    base = critic.trunk.get_base_model() if hasattr(critic.trunk, "get_base_model") else critic.trunk
    return {name: p.detach().cpu().contiguous() for name, p in base.named_parameters()
            if p.requires_grad and not any(tag in name for tag in _PEFT_MANAGED)}


def trainable_summary(critic: JointCritic) -> dict[str, int]:
    total = sum(p.numel() for p in critic.parameters())
    trainable = sum(p.numel() for p in critic.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}


def save_export(
    critic: JointCritic,
    tokenizer,
    backbone_spec: dict[str, Any],
    audio_tokenizer_spec: dict[str, Any],
    audio_tokenizer_dir: str | Path,
    model_cfg: dict[str, Any],
    out_dir: str | Path,
) -> Path:
    """Write a self-contained export (see module docstring). Overwrites ``out_dir``."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    critic.trunk.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "tokenizer")
    heads = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, module in critic.head_modules().items()
        for key, value in module.state_dict().items()
    }
    save_file(heads, str(out / "heads.safetensors"))
    extra = trunk_extra_state(critic)
    if extra:
        save_file(extra, str(out / "trunk_extra.safetensors"))
    shutil.copytree(audio_tokenizer_dir, out / "audio_tokenizer")
    spec: dict[str, Any] = {"name": backbone_spec["name"], "options": dict(backbone_spec["options"])}
    if backbone_spec.get("from_scratch"):
        shutil.copytree(backbone_spec["options"]["path"], out / "base")
        spec["options"]["path"] = "base"  # relative: resolved against the export dir at load
    elif spec["options"].get("path"):
        from vcritic.models.checkpoints import checkpoint_ref

        spec["base_ref"] = backbone_spec.get("base_ref") or checkpoint_ref(spec["options"]["path"])
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": spec,
        "audio_tokenizer": {"name": audio_tokenizer_spec["name"], "options": dict(audio_tokenizer_spec.get("options") or {})},
        "model": {k: model_cfg.get(k) for k in MODEL_KEYS},
        "lora_target_modules": model_cfg.get("lora_target_modules"),
        "audio_codes": critic.vocab.audio_codes,
        "num_codebooks": critic.vocab.num_codebooks,
        "feature_dim": critic.vocab.feature_dim,
    }
    (out / "critic.json").write_text(json.dumps(meta, indent=2))
    return out


def load_audio_tokenizer(spec: dict[str, Any], directory: str | Path):
    tokenizer = registry.create("audio_tokenizers", spec["name"], **(spec.get("options") or {}))
    tokenizer.load(str(directory))
    return tokenizer


def load_export(export_dir: str | Path, base_models_dir: str | None = None) -> tuple[JointCritic, Any, Any, dict[str, Any]]:
    """Rebuild ``(critic, text_tokenizer, audio_tokenizer, meta)`` from an export, in eval mode.

    Args:
        base_models_dir: where to look for a pretrained base model that is no longer at its
            recorded path (also ``$VCRITIC_BASE_MODELS``).

    Raises:
        FileNotFoundError: not an export, or its base model cannot be found (the message names
            the checkpoint and the hash it needs).
    """
    root = Path(export_dir)
    meta_path = root / "critic.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{root} is not a vcritic export (no critic.json); export one with vcritic.models.build.save_export")
    meta = json.loads(meta_path.read_text())
    if int(meta.get("format", 1)) != EXPORT_FORMAT:
        raise ValueError(f"{root} is a vcritic export of format {meta.get('format', 1)}; this vcritic reads format "
                         f"{EXPORT_FORMAT}: retrain, or load it with the vcritic version that wrote it")
    spec = {"name": meta["backbone"]["name"], "options": dict(meta["backbone"]["options"])}
    if spec["options"].get("path") == "base":
        spec["options"]["path"] = str(root / "base")
    elif meta["backbone"].get("base_ref"):
        from vcritic.models.checkpoints import resolve_checkpoint

        spec["options"]["path"] = resolve_checkpoint(meta["backbone"]["base_ref"], base_models_dir)
    model_cfg = {**meta["model"], "lora_target_modules": meta.get("lora_target_modules")}
    critic, _ = build_critic(spec, model_cfg, meta["audio_codes"], meta["feature_dim"], adapter_dir=root / "adapter",
                             num_codebooks=int(meta["num_codebooks"]))
    heads = load_file(str(root / "heads.safetensors"))
    for name, module in critic.head_modules().items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in heads.items() if k.startswith(prefix)})
    if (root / "trunk_extra.safetensors").exists():
        base = critic.trunk.get_base_model()
        extra = load_file(str(root / "trunk_extra.safetensors"))
        missing = set(extra) - {n for n, _ in base.named_parameters()}
        if missing:
            raise ValueError(f"{root}/trunk_extra.safetensors names weights the base model lacks: {sorted(missing)[:5]}")
        base.load_state_dict(extra, strict=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    audio_tokenizer = load_audio_tokenizer(meta["audio_tokenizer"], root / "audio_tokenizer")
    critic.eval()
    meta["backbone_spec"] = spec
    return critic, tokenizer, audio_tokenizer, meta
