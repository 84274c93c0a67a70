"""Tiny randomly initialised speech-codec checkpoints, written in the released file layout.

Each ``write_tiny_*`` builds a transformers codec from a shrunken config with seeded random
weights and saves ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` into a
directory, as ``save_pretrained`` writes them for the released checkpoints (kyutai/mimi,
facebook/encodec_24khz, descript/dac_16khz, hf-audio/xcodec-*). The codec plugins in
``plugins.hf.codecs`` then load them exactly as they load a real checkpoint, so tests cover the
real loading path without a download. The sizes keep every model at a few hundred thousand
parameters, so 1 s of audio encodes in well under a second on one CPU core, while keeping
several codebooks (RVQ with 4 levels) so the multi-codebook paths run.

The audio they produce is noise: the weights are random. The codebooks are not left at
transformers' init (all-zero centroids, so every frame would get id 0): each residual level's
centroids are drawn from the encoder latents of a seeded calibration clip, the data-driven init
the real codecs start training from, so ids vary with the input as a real codec's do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Shared shrinkage: small codebooks (64 entries = 6 bits) and a few levels of residual quantisation.
CODEBOOK_SIZE = 64

TINY_MIMI: dict[str, Any] = {
    "hidden_size": 32,
    "num_filters": 4,
    "codebook_size": CODEBOOK_SIZE,
    "codebook_dim": 16,
    "vector_quantization_hidden_dimension": 16,
    "num_quantizers": 4,
    "num_semantic_quantizers": 1,
    "upsample_groups": 32,  # must divide hidden_size (the real model: 512 / 512)
    "num_hidden_layers": 1,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "sliding_window": 25,
    "max_position_embeddings": 256,
}

# 6 bits x 75 Hz = 0.45 kbps per codebook: these bandwidths give 1, 2 and 4 codebooks.
TINY_ENCODEC: dict[str, Any] = {
    "hidden_size": 16,
    "num_filters": 4,
    "upsampling_ratios": [8, 5, 4, 2],
    "num_lstm_layers": 1,
    "codebook_size": CODEBOOK_SIZE,
    "codebook_dim": 16,
    "target_bandwidths": [0.5, 1.0, 2.0],
}

TINY_DAC: dict[str, Any] = {
    "encoder_hidden_size": 4,
    "downsampling_ratios": [2, 4, 5, 8],  # hop 320 at 16 kHz = 50 Hz, as descript/dac_16khz
    "decoder_hidden_size": 32,
    "n_codebooks": 4,
    "codebook_size": CODEBOOK_SIZE,
    "codebook_dim": 4,
    "sampling_rate": 16000,
}

# 6 bits x 50 Hz = 0.3 kbps per codebook: 1, 2 and 4 codebooks.
TINY_XCODEC: dict[str, Any] = {
    "acoustic_model_config": {
        "encoder_hidden_size": 4,
        "downsampling_ratios": [8, 5, 4, 2],
        "upsampling_ratios": [8, 5, 4, 2],
        "decoder_hidden_size": 32,
        "hidden_size": 64,
        "codebook_size": CODEBOOK_SIZE,
    },
    "semantic_model_config": {
        "model_type": "hubert",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": [16] * 7,
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4,
    },
    "codebook_size": CODEBOOK_SIZE,
    "target_bandwidths": [0.35, 0.65, 1.25],
}


def _calibration_clip(sample_rate: int, generator: Any) -> Any:
    """3 s of a 100 Hz → 2 kHz chirp with a tremolo, plus noise: audio whose latents vary over time."""
    import torch

    t = torch.arange(3 * sample_rate) / sample_rate
    chirp = torch.sin(2 * torch.pi * (100 * t + (1900 / 6) * t**2)) * (0.2 + 0.15 * torch.sin(2 * torch.pi * 1.5 * t))
    return (chirp + 0.05 * torch.randn(t.shape, generator=generator)).view(1, 1, -1)


def _init_codebooks(layers: Any, residual: Any, generator: Any) -> None:
    """Set each RVQ level's centroids to jittered latent frames of ``residual`` [1, D, T], level by level."""
    import torch

    for layer in layers:
        book = layer.codebook
        frames = residual[0].T
        size = book.codebook_size
        picked = frames[torch.randint(0, frames.shape[0], (size,), generator=generator)]
        jitter = torch.randn(picked.shape, generator=generator) * frames.std(0, keepdim=True) * 0.1
        centroids = picked + jitter
        if hasattr(book, "embed_sum"):  # Mimi: centroid = embed_sum / cluster_usage (ones)
            book.embed_sum.copy_(centroids)
            book._embed = None
        else:  # EnCodec / X-Codec
            book.embed.copy_(centroids)
            book.embed_avg.copy_(centroids)
            book.cluster_size.fill_(1.0)
        residual = residual - layer.decode(layer.encode(residual))


def _calibrate(model: Any, sample_rate: int, generator: Any) -> None:
    import torch

    clip = _calibration_clip(sample_rate, generator)
    with torch.no_grad():
        if hasattr(model.quantizer, "semantic_residual_vector_quantizer"):  # Mimi: split RVQ
            latents = model.encoder(clip).latents
            for rvq in (model.quantizer.semantic_residual_vector_quantizer,
                        model.quantizer.acoustic_residual_vector_quantizer):
                _init_codebooks(rvq.layers, rvq.input_proj(latents) if rvq.input_proj is not None else latents, generator)
        elif hasattr(model.quantizer, "quantizers"):  # X-Codec: the RVQ quantises the fused `fc` output
            captured = []
            handle = model.fc.register_forward_hook(lambda _m, _i, out: captured.append(out.transpose(1, 2)))
            try:
                model.encode(clip)
            finally:
                handle.remove()
            _init_codebooks(model.quantizer.quantizers, captured[0], generator)
        else:  # EnCodec
            _init_codebooks(model.quantizer.layers, model.encoder(clip), generator)


def _write(directory: str | Path, model_class: str, config_class: str, options: dict[str, Any],
           extractor_class: str, extractor_options: dict[str, Any], seed: int, calibrate: bool = True) -> Path:
    import torch
    import transformers

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = getattr(transformers, config_class)(**options)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    if calibrate:
        _calibrate(model, extractor_options["sampling_rate"], torch.Generator().manual_seed(seed))
    model.save_pretrained(out)
    getattr(transformers, extractor_class)(**extractor_options).save_pretrained(out)
    return out


def write_tiny_mimi(directory: str | Path, seed: int = 0) -> Path:
    """A 24 kHz, 12.5 Hz Mimi with 4 codebooks of 64 (1 semantic + 3 acoustic). Returns ``directory``."""
    return _write(directory, "MimiModel", "MimiConfig", TINY_MIMI,
                  "EncodecFeatureExtractor", {"feature_size": 1, "sampling_rate": 24000}, seed)


def write_tiny_encodec(directory: str | Path, seed: int = 0) -> Path:
    """A 24 kHz, 75 Hz mono EnCodec with up to 4 codebooks of 64. Returns ``directory``."""
    return _write(directory, "EncodecModel", "EncodecConfig", TINY_ENCODEC,
                  "EncodecFeatureExtractor", {"feature_size": 1, "sampling_rate": 24000}, seed)


def write_tiny_dac(directory: str | Path, seed: int = 0) -> Path:
    """A 16 kHz, 50 Hz DAC with 4 codebooks of 64. Returns ``directory``."""
    return _write(directory, "DacModel", "DacConfig", TINY_DAC,
                  "DacFeatureExtractor", {"sampling_rate": 16000, "hop_length": 320}, seed,
                  calibrate=False)  # DAC's codebooks are random embeddings already (not zero)


def write_tiny_xcodec(directory: str | Path, seed: int = 0) -> Path:
    """A 16 kHz, 50 Hz X-Codec (DAC acoustic + HuBERT semantic branch), up to 4 codebooks of 64."""
    return _write(directory, "XcodecModel", "XcodecConfig", TINY_XCODEC,
                  "DacFeatureExtractor", {"sampling_rate": 16000, "hop_length": 320}, seed)


TINY_WRITERS = {
    "mimi": write_tiny_mimi,
    "encodec": write_tiny_encodec,
    "dac": write_tiny_dac,
    "xcodec": write_tiny_xcodec,
}
"""Registry-style name → writer, for tests that loop over every codec."""
