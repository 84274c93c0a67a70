"""Tiny random checkpoints in Qwen2.5-Omni's release layout, for tests of the ``qwen2_5_omni_thinker`` backbone.

:func:`write_tiny_qwen_omni_checkpoint` writes what a released Qwen2.5-Omni directory holds, in miniature:

* ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``): the full
  ``Qwen2_5OmniForConditionalGeneration`` with ``enable_audio_output: false`` (thinker weights under
  ``thinker.``), or a thinker alone;
* ``preprocessor_config.json``: the release's ``WhisperFeatureExtractor`` settings (16 kHz, 128 mel bins,
  hop 160, a 300 s window) plus its image-processor keys, with ``processor_class`` Qwen2_5OmniProcessor;
* a ``Qwen2Tokenizer`` (a small byte-level BPE trained on a few critique sentences) with the release's
  special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|AUDIO|>``, ``<|audio_bos|>``, …), its named
  media tokens in ``tokenizer_config.json`` (as the processor reads them), ``eos`` = ``<|im_end|>``;
* the chat template in ``tokenizer_config.json`` and ``chat_template.json`` (the release's two places).

Only the model sizes shrink; the audio front end, token names and file layout are the release's.

:func:`processor_inputs` builds the thinker's inputs with transformers' own ``Qwen2_5OmniProcessor``
(audio + text path), the reference every parity test compares vcritic's inputs against.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5OmniProcessor
from transformers.processing_utils import ProcessorMixin

CORPUS = [
    "the chorus lands on a bright sustained high note",
    "pitch drifts flat in the second verse but the vibrato is steady",
    "breath support is weak and the consonants blur together",
    "a warm tone with clean diction and a confident belt",
    "Listen to the recording and critique the singing: pitch, timing, tone, breath and diction.",
] * 4

# The release's special tokens (a subset: the chat, audio and vision ones the thinker's config points at).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
]
# What Qwen2_5OmniProcessor reads off its tokenizer (``tokenizer.audio_token`` …).
MEDIA_TOKENS = {
    "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
}
# The release's image-processor keys, which share its preprocessor_config.json with the audio ones.
RELEASE_IMAGE_PROCESSOR: dict[str, Any] = {
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
    "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
TINY: dict[str, Any] = {"text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}}


def tiny_qwen_tokenizer(corpus: Sequence[str] = CORPUS, vocab_size: int = 400) -> Any:
    """A ``Qwen2Tokenizer`` (Qwen2's pre-tokenizer, byte-level BPE) trained on ``corpus``, with the
    release's special tokens; ``eos`` is ``<|im_end|>`` and ``pad`` ``<|endoftext|>`` as in the release."""
    from transformers import Qwen2Tokenizer

    base = Qwen2Tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    return base.train_new_from_iterator(list(corpus), vocab_size=vocab_size, new_special_tokens=SPECIAL_TOKENS)


def _patch_json(path: Path, **entries: Any) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(entries)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_tiny_qwen_omni_checkpoint(
    directory: str | Path,
    seed: int = 0,
    full_omni: bool = True,
    *,
    tiny: dict[str, Any] | None = None,
    vocab_size: int = 400,
    corpus: Sequence[str] = CORPUS,
) -> Path:
    """Write a random Qwen2.5-Omni checkpoint (release layout, tiny sizes) to ``directory``.

    Args:
        directory: created if missing.
        seed: initialisation seed of the weights.
        full_omni: the full omni model without audio output (the release's config and ``thinker.`` keys);
            False writes a thinker alone.
        tiny: sub-config overrides as the backbone's ``tiny`` option (``text``, ``audio``, ``vision``).
        vocab_size: BPE vocabulary size (special tokens included).
        corpus: text the tokenizer is trained on.

    Returns:
        The directory.
    """
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    from plugins.hf.qwen_omni import QwenOmniThinkerBackbone
    from plugins.hf.qwen_omni_hearing import CHAT_TEMPLATE, RELEASE_FEATURE_EXTRACTOR

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_qwen_tokenizer(corpus, vocab_size)
    config = QwenOmniThinkerBackbone(tiny=tiny or TINY, dtype="float32", seed=seed)._tiny_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        thinker = Qwen2_5OmniThinkerForConditionalGeneration(config)
    model = thinker
    if full_omni:
        model = Qwen2_5OmniForConditionalGeneration(
            Qwen2_5OmniConfig(thinker_config=config.to_dict(), enable_audio_output=False)
        )
        model.thinker.load_state_dict(thinker.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # the release keeps its template in the two JSONs
    _patch_json(out / "tokenizer_config.json", **MEDIA_TOKENS, chat_template=CHAT_TEMPLATE,
                processor_class="Qwen2_5OmniProcessor", model_max_length=32768)
    _patch_json(out / "chat_template.json", chat_template=CHAT_TEMPLATE)
    fx = dict(RELEASE_FEATURE_EXTRACTOR)
    samples = fx["chunk_length"] * fx["sampling_rate"]
    _patch_json(out / "preprocessor_config.json", **RELEASE_IMAGE_PROCESSOR,
                feature_extractor_type="WhisperFeatureExtractor", **fx, n_samples=samples,
                nb_max_frames=samples // fx["hop_length"], processor_class="Qwen2_5OmniProcessor")
    return out


class AudioOnlyProcessor(Qwen2_5OmniProcessor):
    """``Qwen2_5OmniProcessor`` declaring only its feature extractor and tokenizer: as released it cannot
    be built without torchvision (its video processor needs it). Its audio and text code is the released
    class's, unchanged."""

    def __init__(self, feature_extractor=None, tokenizer=None, chat_template=None):
        ProcessorMixin.__init__(self, feature_extractor, tokenizer, chat_template=chat_template)
        for name, token in MEDIA_TOKENS.items():  # read off the tokenizer, as the released __init__ does
            setattr(self, name, getattr(tokenizer, name, None) or token)
        for kind in ("image", "audio", "video"):
            setattr(self, f"{kind}_token_id", tokenizer.convert_tokens_to_ids(getattr(self, f"{kind}_token")))


def audio_processor(path: str | Path, tokenizer: Any = None) -> Any:
    """Qwen2_5OmniProcessor (audio + text) for the checkpoint at ``path``: its feature extractor, its
    chat template and ``tokenizer`` (default: its own)."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor

    from plugins.hf.qwen_omni_hearing import CHAT_TEMPLATE

    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    template_file = path / "chat_template.json"
    template = (json.loads(template_file.read_text())["chat_template"] if template_file.is_file()
                else getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE)
    return AudioOnlyProcessor(WhisperFeatureExtractor.from_pretrained(path), tokenizer, chat_template=template)


def processor_inputs(path: str | Path, tokenizer: Any, clips: Sequence[Any], persona: str, context: str,
                     padding_side: str = "right") -> dict[str, torch.Tensor]:
    """What ``Qwen2_5OmniProcessor`` gives the thinker for one critic conversation per clip
    (:func:`~plugins.hf.qwen_omni_hearing.critic_conversation`): ``input_ids``, ``attention_mask``,
    ``input_features`` and ``feature_attention_mask``, to call ``thinker(**inputs)`` with."""
    from plugins.hf.qwen_omni_hearing import critic_conversation

    processor = audio_processor(path, tokenizer)
    texts = processor.apply_chat_template([critic_conversation(persona, context) for _ in clips],
                                          add_generation_prompt=True, tokenize=False)
    out = processor(text=texts, audio=list(clips), return_tensors="pt", padding=True, padding_side=padding_side)
    return {key: out[key] for key in ("input_ids", "attention_mask", "input_features", "feature_attention_mask")}
