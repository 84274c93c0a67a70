"""Pretrained neural speech codecs from transformers as vcritic audio tokenizers.

Each plugin wraps one codec class that transformers ships (``MimiModel``, ``EncodecModel``,
``DacModel``, ``XcodecModel``) and loads it from a local checkpoint directory (``config.json`` +
``model.safetensors``, and ``preprocessor_config.json`` where the release has one); nothing
is ever fetched from a hub. The model loads on first use, in eval mode, and runs under
``torch.inference_mode``.

Frames and alignment: the input is zero-padded on the right to a whole number of hops
(``hop = sample_rate / frame_rate`` samples, what the checkpoints' feature extractors do), so
``L`` samples always give ``ceil(L / hop)`` frames, and ``decode`` returns exactly
``frames * hop`` samples. ``features`` is the encoder output the quantiser receives, captured
with a forward hook during the model's own ``encode`` call: one row per id frame by
construction, and one pass gives both (the last clip's result is cached, so calling
``features`` then ``encode`` on the same clip runs the codec once).

``save`` writes ``codec.json``: the options and a reference to the checkpoint
(``vcritic.models.checkpoints.checkpoint_ref``: absolute path, directory name, sha256 of its
weights), never the weights. ``load`` finds the checkpoint with ``resolve_checkpoint``: at the
recorded path, or under ``$VCRITIC_BASE_MODELS/<name>``, only where the hash matches.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vcritic.models.checkpoints import checkpoint_ref, resolve_checkpoint

SPEC_FILE = "codec.json"
DTYPES = ("float32", "bfloat16", "float16")
GEOMETRY = ("sample_rate", "hop_length", "frame_rate", "num_codebooks", "codebook_size", "feature_dim")


class HFCodecTokenizer:
    """Shared base: options, checkpoint config, lazy model, validation, encode/decode/features, persistence.

    A subclass names its transformers classes and implements the codec-specific hooks
    (``_read_geometry``, ``_latent_module``, ``_encode_codes``, ``_decode_audio``).

    Args:
        path: checkpoint directory. It is read at construction when it exists; when it does not
            (an export rebuilt on another machine) the error comes at first use, or ``load``
            finds the checkpoint from its saved reference.
        num_codebooks: how many codebooks (the first ``n`` of the residual stack) to use;
            ``None`` takes the codec's default. Checked against the checkpoint.
        device: torch device the codec runs on.
        dtype: ``float32``, ``bfloat16`` or ``float16`` weights; outputs are always float32.
    """

    model_class = ""  # transformers class names, set by subclasses
    config_class = ""
    model_type = ""  # config.json "model_type" the checkpoint must have
    default_num_codebooks: int | None = None  # None: all the checkpoint has

    def __init__(self, path: str | None = None, num_codebooks: int | None = None,
                 device: str = "cpu", dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if num_codebooks is not None and (isinstance(num_codebooks, bool) or int(num_codebooks) != num_codebooks):
            raise ValueError(f"num_codebooks must be a whole number, got {num_codebooks!r}")
        self.path = None if path is None else str(Path(path).expanduser().resolve())
        self.requested_codebooks = None if num_codebooks is None else int(num_codebooks)
        self.device = str(device)
        self.dtype = dtype
        self._config: Any = None
        self._model: Any = None
        self._cache: tuple[bytes, np.ndarray, np.ndarray] | None = None
        if self.path is not None and Path(self.path).is_dir():
            self._load_config()


    def _require_dir(self) -> Path:
        name = type(self).__name__
        if self.path is None:
            raise ValueError(f"{name} needs path=<a local {self.model_type} checkpoint directory> "
                             f"(config.json + model.safetensors); it never downloads one")
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"{name}: checkpoint directory {self.path} does not exist; pass path= an existing "
                                    f"{self.model_type} checkpoint, or load() a saved tokenizer to locate it")
        return Path(self.path)

    def _load_config(self) -> None:
        import transformers

        root = self._require_dir()
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"{root / 'config.json'} not found; is {root} a {self.model_type} checkpoint?")
        found = json.loads((root / "config.json").read_text()).get("model_type")
        if found != self.model_type:
            raise ValueError(f"{root} is a {found!r} checkpoint; {type(self).__name__} needs model_type "
                             f"{self.model_type!r}")
        config = getattr(transformers, self.config_class).from_pretrained(root, local_files_only=True)
        model_rate, hop, codebook_size, feature_dim, choices = self._read_geometry(config)
        extractor = root / "preprocessor_config.json"  # the checkpoint's own feature extractor config
        rate = json.loads(extractor.read_text()).get("sampling_rate") if extractor.is_file() else None
        sample_rate = int(rate) if rate is not None else model_rate
        if sample_rate != model_rate:
            raise ValueError(f"{extractor} says sampling_rate={rate} but {root / 'config.json'} says "
                             f"{model_rate}; the checkpoint is inconsistent")
        q = self.requested_codebooks if self.requested_codebooks is not None else self.default_num_codebooks
        q = max(choices) if q is None else q
        if q not in choices:
            raise ValueError(f"num_codebooks={q} is not available in {root}: {type(self).__name__} can use "
                             f"{sorted(choices)} codebooks of this checkpoint")
        self._config = config
        self.sample_rate = int(sample_rate)
        self.hop_length = int(hop)
        self.frame_rate = self.sample_rate / self.hop_length
        self.num_codebooks = int(q)
        self.codebook_size = int(codebook_size)
        self.feature_dim = int(feature_dim)

    def __getattr__(self, name: str) -> Any:
        # Geometry attributes exist once the config is read; reading one earlier reads it. Without a
        # checkpoint they stay absent (AttributeError saying why), so protocol checks answer False.
        if name in GEOMETRY and self.__dict__.get("_config") is None and "path" in self.__dict__:
            try:
                self._load_config()
            except (FileNotFoundError, ValueError) as exc:
                raise AttributeError(f"{type(self).__name__}.{name} is unknown: {exc}") from exc
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    def _ensure_config(self) -> None:
        if self._config is None:
            self._load_config()

    def _read_geometry(self, config: Any) -> tuple[int, int, int, int, list[int]]:
        """(sample_rate, hop in samples, codebook_size, feature_dim, allowed num_codebooks) from the config."""
        raise NotImplementedError


    @property
    def model(self) -> Any:
        """The transformers codec, loaded on first use (eval mode, on ``device`` in ``dtype``)."""
        if self._model is None:
            import torch
            import transformers

            self._ensure_config()
            model = getattr(transformers, self.model_class).from_pretrained(
                self.path, dtype=getattr(torch, self.dtype), local_files_only=True)
            self._model = model.to(self.device).eval()
        return self._model

    # Codec hooks: _latent_module(model) → (submodule whose forward output is the pre-quantisation
    # latent, output → [T, D] tensor); _encode_codes(model, audio [1, 1, S]) → codes [Q, T];
    # _decode_audio(model, codes [1, Q, T]) → a tensor holding one mono signal.


    def options(self) -> dict[str, Any]:
        """The constructor options that rebuild this tokenizer."""
        return {"path": self.path, "num_codebooks": self.requested_codebooks, "device": self.device, "dtype": self.dtype}

    def fit(self, clips: Sequence[np.ndarray]) -> None:
        """No-op: a pretrained codec learns nothing from the training audio."""

    def _validate(self, samples: np.ndarray) -> np.ndarray:
        y = np.asarray(samples)
        if y.ndim != 1:
            raise ValueError(f"{type(self).__name__} expects mono audio of shape [samples], got shape {y.shape}; "
                             f"mix channels down first (e.g. samples.mean(axis=0))")
        if not np.issubdtype(y.dtype, np.floating):
            raise ValueError(f"{type(self).__name__} expects float audio in [-1, 1], got dtype {y.dtype}; "
                             f"convert PCM first (int16: samples / 32768)")
        if not np.all(np.isfinite(y)):
            raise ValueError("audio has NaN or infinite samples")
        return np.ascontiguousarray(y, dtype=np.float32)

    def encode_and_features(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One codec pass: (int64 ids [frames, num_codebooks], float32 features [frames, feature_dim])."""
        import torch

        y = self._validate(samples)
        self._ensure_config()
        key = hashlib.blake2b(y.tobytes(), digest_size=16).digest() + str(y.size).encode()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1].copy(), self._cache[2].copy()
        hop, q = self.hop_length, self.num_codebooks
        frames = math.ceil(y.size / hop)
        if frames == 0:
            return np.zeros((0, q), np.int64), np.zeros((0, self.feature_dim), np.float32)
        model = self.model
        padded = np.zeros(frames * hop, np.float32)
        padded[: y.size] = y
        module, pick = self._latent_module(model)
        captured: list[Any] = []
        handle = module.register_forward_hook(lambda _m, _i, out: captured.append(pick(out)))
        try:
            with torch.inference_mode():
                audio = torch.from_numpy(padded).to(self.device, getattr(torch, self.dtype)).view(1, 1, -1)
                codes = self._encode_codes(model, audio)
        finally:
            handle.remove()
        ids = codes.detach().to("cpu", torch.int64).numpy().T
        feats = captured[-1].detach().to("cpu", torch.float32).numpy()
        if ids.shape != (frames, q) or feats.shape != (frames, self.feature_dim):
            raise RuntimeError(f"{type(self).__name__}: {y.size} samples gave ids {ids.shape} and features "
                               f"{feats.shape}, expected ({frames}, {q}) and ({frames}, {self.feature_dim})")
        ids, feats = np.ascontiguousarray(ids), np.ascontiguousarray(feats)
        self._cache = (key, ids, feats)
        return ids.copy(), feats.copy()

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """Mono float audio at ``sample_rate`` → int64 ids [ceil(samples / hop), num_codebooks]."""
        return self.encode_and_features(samples)[0]

    def features(self, samples: np.ndarray) -> np.ndarray:
        """Mono float audio → float32 [frames, feature_dim]: the encoder latent the ids quantise."""
        return self.encode_and_features(samples)[1]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """int64 ids [frames, num_codebooks] ([frames] when Q = 1) → mono float32 of ``frames * hop`` samples.

        The waveform is clipped to [-1, 1] (codecs can overshoot slightly; random test weights a lot).
        """
        import torch

        self._ensure_config()
        q = self.num_codebooks
        ids = np.asarray(ids)
        ids = ids[:, None] if ids.ndim == 1 and q == 1 else ids
        if ids.ndim != 2 or ids.shape[1] != q:
            raise ValueError(f"{type(self).__name__} uses {q} codebooks: ids must have shape [frames, {q}], "
                             f"got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        if ids.shape[0] == 0:
            return np.zeros(0, np.float32)
        if ids.min() < 0 or ids.max() >= self.codebook_size:
            raise ValueError(f"ids must lie in [0, {self.codebook_size}), got range [{ids.min()}, {ids.max()}]")
        model = self.model
        with torch.inference_mode():
            codes = torch.from_numpy(ids.T.astype(np.int64)).to(self.device).unsqueeze(0)
            audio = self._decode_audio(model, codes).detach().to("cpu", torch.float32).reshape(-1).numpy()
        n = ids.shape[0] * self.hop_length
        out = np.zeros(n, np.float32)  # trim, or pad a codec whose output falls a few samples short
        out[: min(n, audio.size)] = audio[:n]
        return np.clip(out, -1.0, 1.0)


    def __getstate__(self) -> dict[str, Any]:
        # Pickle (e.g. to Ray workers) the options and config only; each process loads its own model.
        return {**self.__dict__, "_model": None, "_cache": None}

    def save(self, directory: str) -> None:
        """Write ``codec.json`` (class, options, checkpoint reference with sha256) into ``directory``."""
        root = self._require_dir()
        self._ensure_config()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        spec = {
            "class": f"{type(self).__module__}:{type(self).__qualname__}",
            "options": {k: v for k, v in self.options().items() if k != "path"},
            "checkpoint": checkpoint_ref(root),
        }
        (out / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")

    def load(self, directory: str) -> None:
        """Rebuild from a directory written by :meth:`save`; its options replace this instance's.

        Raises FileNotFoundError (no ``codec.json``), ``checkpoints.CheckpointNotFound`` (a
        FileNotFoundError: the checkpoint is neither at its recorded path nor under
        ``$VCRITIC_BASE_MODELS`` with the recorded hash) or ValueError (another codec's file).
        """
        src = Path(directory) / SPEC_FILE
        if not src.is_file():
            raise FileNotFoundError(f"{src} not found; is {directory} a tokenizer saved by {type(self).__name__}.save?")
        spec = json.loads(src.read_text())
        mine = f"{type(self).__module__}:{type(self).__qualname__}"
        if spec.get("class") != mine:
            raise ValueError(f"{src} was written by {spec.get('class')}, not {mine}")
        fresh = type(self)(path=resolve_checkpoint(spec["checkpoint"]), **spec["options"])  # reads its config
        self.__dict__.update(fresh.__dict__)  # only after validation, so a failed load changes nothing

    @classmethod
    def from_directory(cls, directory: str) -> HFCodecTokenizer:
        """Build a tokenizer from a directory written by :meth:`save`."""
        tok = cls()
        tok.load(directory)
        return tok


def _bandwidth_choices(bandwidths: Sequence[float], bits: float, frame_rate: float, max_q: int) -> dict[int, float]:
    """num_codebooks → the target bandwidth (kbps) that selects it (EnCodec / X-Codec: kbps / (bits × Hz))."""
    return {min(max_q, max(1, math.floor(bw * 1000 / (bits * frame_rate) + 1e-9))): bw for bw in bandwidths}


class MimiTokenizer(HFCodecTokenizer):
    """Kyutai's Mimi (24 kHz, 12.5 Hz; kyutai/mimi has 32 codebooks of 2048, codebook 0 semantic).

    ``num_codebooks`` (default 8, as Moshi uses) takes the first n of the split RVQ. Features are
    the encoder's latents (``hidden_size`` wide, 512 for kyutai/mimi) before the quantiser.
    """

    model_class, config_class, model_type = "MimiModel", "MimiConfig", "mimi"
    default_num_codebooks = 8

    def _read_geometry(self, config):
        first = max(1, config.num_semantic_quantizers)
        return (config.sampling_rate, config.frame_size, config.codebook_size, config.hidden_size,
                list(range(first, config.num_quantizers + 1)))

    def _latent_module(self, model):
        return model.encoder, lambda out: out.latents[0].transpose(0, 1)

    def _encode_codes(self, model, audio):
        return model.encode(audio, num_quantizers=self.num_codebooks).audio_codes[0]

    def _decode_audio(self, model, codes):
        return model.decode(codes).audio_values


class EncodecTokenizer(HFCodecTokenizer):
    """Meta's EnCodec, mono unchunked checkpoints (facebook/encodec_24khz: 24 kHz, 75 Hz, up to 32 × 1024).

    ``num_codebooks`` must match one of the checkpoint's target bandwidths (24 kHz: 2, 4, 8, 16,
    32; default: the lowest). The 48 kHz stereo model (chunked, loudness-normalised, so its ids
    alone do not decode) is refused.
    """

    model_class, config_class, model_type = "EncodecModel", "EncodecConfig", "encodec"

    def _read_geometry(self, config):
        if config.audio_channels != 1 or config.normalize or config.chunk_length_s is not None:
            raise ValueError(f"{self.path}: EncodecTokenizer supports mono, unchunked, unnormalised EnCodec "
                             f"checkpoints (e.g. facebook/encodec_24khz), not audio_channels="
                             f"{config.audio_channels}, normalize={config.normalize}, chunk_length_s={config.chunk_length_s}")
        self._bandwidths = _bandwidth_choices(config.target_bandwidths, math.log2(config.codebook_size),
                                              config.frame_rate, config.num_quantizers)
        self.default_num_codebooks = min(self._bandwidths)
        return (config.sampling_rate, config.hop_length, config.codebook_size, config.hidden_size,
                list(self._bandwidths))

    def _latent_module(self, model):
        return model.encoder, lambda out: out[0].transpose(0, 1)

    def _encode_codes(self, model, audio):
        out = model.encode(audio, bandwidth=self._bandwidths[self.num_codebooks])
        return out.audio_codes[0, 0]  # [chunks=1, batch, Q, T]

    def _decode_audio(self, model, codes):
        return model.decode(codes.unsqueeze(0), [None]).audio_values


class DacTokenizer(HFCodecTokenizer):
    """Descript Audio Codec (descript/dac_16khz: 16 kHz, 50 Hz, 12 × 1024; also the 24/44 kHz releases).

    ``num_codebooks`` is any 1..n of the RVQ (default: all). Features are the encoder output
    (``hidden_size`` wide) before the per-codebook projections.
    """

    model_class, config_class, model_type = "DacModel", "DacConfig", "dac"

    def _read_geometry(self, config):
        return (config.sampling_rate, config.hop_length, config.codebook_size, config.hidden_size,
                list(range(1, config.n_codebooks + 1)))

    def _latent_module(self, model):
        return model.encoder, lambda out: out[0].transpose(0, 1)

    def _encode_codes(self, model, audio):
        return model.encode(audio, n_quantizers=self.num_codebooks).audio_codes[0]

    def _decode_audio(self, model, codes):
        return model.decode(audio_codes=codes).audio_values


class XcodecTokenizer(HFCodecTokenizer):
    """X-Codec (hf-audio/xcodec-*: 16 kHz, 50 Hz, up to 8 × 1024): DAC acoustic + HuBERT semantic encoders.

    ``num_codebooks`` must match a target bandwidth (0.5/1/1.5/2/4 kbps → 1/2/3/4/8; default: all).
    Features are the fused acoustic + semantic latent (the ``fc`` output) the RVQ quantises.
    """

    model_class, config_class, model_type = "XcodecModel", "XcodecConfig", "xcodec"

    def _read_geometry(self, config):
        self._bandwidths = _bandwidth_choices(config.target_bandwidths, math.log2(config.codebook_size),
                                              config.frame_rate, config.num_quantizers)
        return (config.sample_rate, config.hop_length, config.codebook_size, config.hidden_size,
                list(self._bandwidths))

    def _latent_module(self, model):
        return model.fc, lambda out: out[0]

    def _encode_codes(self, model, audio):
        return model.encode(audio, bandwidth=self._bandwidths[self.num_codebooks]).audio_codes[0]

    def _decode_audio(self, model, codes):
        return model.decode(codes).audio_values
