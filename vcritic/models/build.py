"""Building, exporting and loading critics.

An *export* is a self-contained directory that rebuilds a trained critic anywhere::

    critic.json          backbone + audio tokenizer plugin specs, K, λ, LoRA settings
    tokenizer/           text tokenizer (with vcritic's special tokens)
    adapter/             peft LoRA adapter of the trunk (+ trained token rows / LM head)
    heads.safetensors    audio embedding, music encoder, audio branch, norm and head
    audio_tokenizer/     the audio tokenizer's state (e.g. a k-means codebook)
    base/                the base model itself, only for backbones vcritic built from scratch
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
from vcritic.models.sequence import SPECIAL_TOKENS, Vocab

EXPORT_FORMAT = 1


def add_special_tokens(tokenizer, model) -> list[int]:
    """Make sure the tokenizer has vcritic's special tokens and the model rows for them.

    Returns:
        ids of tokens that were new to a pretrained vocabulary (their embeddings must train).
    """
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer.convert_tokens_to_ids(missing)


def materialize_backbone(spec: dict[str, Any], corpus: Sequence[str], out_dir: str | Path) -> dict[str, Any]:
    """Build the backbone once; a from-scratch one is saved to ``out_dir`` so that every worker
    and every later load uses the same weights and tokenizer.

    Returns:
        the backbone spec to use from now on (``options.path`` set for from-scratch backbones).
    """
    options = dict(spec.get("options") or {})
    if options.get("path"):
        return {"name": spec["name"], "options": options}
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
    adapter_dir: str | Path | None = None,
) -> tuple[JointCritic, Any]:
    """Build a LoRA-wrapped joint critic.

    Args:
        backbone_spec: ``{"name", "options"}`` (from :func:`materialize_backbone`).
        model_cfg: the ``model`` section of the config (LoRA, K, λ...).
        audio_codes: the audio tokenizer's vocabulary size.
        feature_dim: the width of the audio tokenizer's continuous frames.
        adapter_dir: load a trained LoRA adapter instead of a fresh one.
    """
    from peft import PeftModel, get_peft_model

    backbone = registry.create("backbones", backbone_spec["name"], **backbone_spec.get("options", {}))
    trunk, tokenizer = backbone.build()
    new_ids = add_special_tokens(tokenizer, trunk)
    for p in trunk.parameters():
        p.requires_grad_(False)
    vocab = Vocab.from_tokenizer(tokenizer, audio_codes, feature_dim)
    # The audio branch copies plain (pre-LoRA) layers.
    critic = JointCritic(trunk, backbone, vocab, int(model_cfg["audio_head_layers"]), float(model_cfg["loss_lambda"]))
    # The new modules take the trunk's dtype (a bf16 backbone gets bf16 heads).
    dtype = trunk.get_input_embeddings().weight.dtype
    for module in critic.head_modules().values():
        module.to(dtype)
    if adapter_dir is not None:
        critic.trunk = PeftModel.from_pretrained(trunk, str(adapter_dir), is_trainable=True)
    else:
        critic.trunk = get_peft_model(trunk, _lora_config(model_cfg, backbone, new_ids))
    if critic.loss_lambda >= 1.0:
        # Text-only SFT: the audio side neither trains nor receives gradients.
        for module in critic.head_modules().values():
            module.requires_grad_(False)
    return critic, tokenizer


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
    shutil.copytree(audio_tokenizer_dir, out / "audio_tokenizer")
    spec = {"name": backbone_spec["name"], "options": dict(backbone_spec["options"])}
    if backbone_spec.get("from_scratch"):
        shutil.copytree(backbone_spec["options"]["path"], out / "base")
        spec["options"]["path"] = "base"  # relative: resolved against the export dir at load
    meta = {
        "format": EXPORT_FORMAT,
        "backbone": spec,
        "audio_tokenizer": {"name": audio_tokenizer_spec["name"], "options": dict(audio_tokenizer_spec.get("options") or {})},
        "model": {k: model_cfg[k] for k in ("audio_head_layers", "loss_lambda", "lora_r", "lora_alpha", "lora_dropout",
                                             "train_text_head", "max_prompt_tokens", "max_text_tokens", "max_audio_tokens")},
        "lora_target_modules": model_cfg.get("lora_target_modules"),
        "audio_codes": critic.vocab.audio_codes,
        "feature_dim": critic.vocab.feature_dim,
    }
    (out / "critic.json").write_text(json.dumps(meta, indent=2))
    return out


def load_audio_tokenizer(spec: dict[str, Any], directory: str | Path):
    tokenizer = registry.create("audio_tokenizers", spec["name"], **(spec.get("options") or {}))
    tokenizer.load(str(directory))
    return tokenizer


def load_export(export_dir: str | Path) -> tuple[JointCritic, Any, Any, dict[str, Any]]:
    """Rebuild ``(critic, text_tokenizer, audio_tokenizer, meta)`` from an export, in eval mode."""
    root = Path(export_dir)
    meta_path = root / "critic.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{root} is not a vcritic export (no critic.json); export one with vcritic.models.build.save_export")
    meta = json.loads(meta_path.read_text())
    spec = {"name": meta["backbone"]["name"], "options": dict(meta["backbone"]["options"])}
    if spec["options"].get("path") == "base":
        spec["options"]["path"] = str(root / "base")
    model_cfg = {**meta["model"], "lora_target_modules": meta.get("lora_target_modules")}
    critic, _ = build_critic(spec, model_cfg, meta["audio_codes"], meta["feature_dim"], adapter_dir=root / "adapter")
    heads = load_file(str(root / "heads.safetensors"))
    for name, module in critic.head_modules().items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in heads.items() if k.startswith(prefix)})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    audio_tokenizer = load_audio_tokenizer(meta["audio_tokenizer"], root / "audio_tokenizer")
    critic.eval()
    return critic, tokenizer, audio_tokenizer, meta
