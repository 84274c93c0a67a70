"""Audio tokenizer for Kimi-Audio's semantic speech tokens (GLM-4-Voice's tokenizer, 12.5 Hz, one codebook).

Kimi-Audio speaks (and hears, beside its Whisper features) the ids of THUDM's GLM-4-Voice speech
tokenizer: a Whisper encoder with a vector quantiser, 16,384 codes, one id per 80 ms of 16 kHz
audio. This plugin runs that tokenizer through the user's own Kimi-Audio installation
(``kimia_infer.models.tokenizer.glm4_tokenizer.Glm4Tokenizer``) and, for decoding, Kimi's
flow-matching detokenizer and BigVGAN vocoder (``kimia_infer.models.detokenizer``, 24 kHz out,
resampled here to 16 kHz). Nothing of Kimi-Audio is vendored; as written upstream, both run on CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

INSTALL = (
    "the kimi_semantic audio tokenizer runs on Kimi-Audio's own kimia_infer package (with its GLM-4-Voice "
    "submodule): git clone https://github.com/MoonshotAI/Kimi-Audio && cd Kimi-Audio && "
    "git submodule update --init --recursive && pip install -r requirements.txt && pip install -e . "
    "(or put the clone on PYTHONPATH); then set model.audio_tokenizer.options.path to a local copy of "
    "THUDM/glm-4-voice-tokenizer (the folder with config.json, model.safetensors, preprocessor_config.json)"
)
CONFIG_FILE = "kimi_semantic.json"
DETOKENIZER_RATE = 24000  # Kimi's vocoder output
CHUNK_TOKENS = 30  # Kimi's streaming detokenizer chunk
UPSAMPLE = 4  # 12.5 Hz semantic ids → the detokenizer's 50 Hz


def _kimia(module: str) -> Any:
    """Import a ``kimia_infer`` module, or fail with what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{INSTALL} (importing {module} failed: {exc})") from exc


class KimiSemanticTokenizer:
    """GLM-4-Voice semantic ids as vcritic's audio tokens; satisfies ``vcritic.protocols.AudioTokenizer``.

    Args:
        path: local GLM-4-Voice tokenizer checkpoint (``THUDM/glm-4-voice-tokenizer``).
        device: where the tokenizer (and detokenizer input) runs; upstream's code expects ``cuda``.
        detokenizer_path: the Kimi-Audio checkpoint directory (it holds ``audio_detokenizer/`` and
            ``vocoder/``); needed only by :meth:`decode`.

    Raises:
        ImportError: ``kimia_infer`` is not installed (the message says how to install it).
        FileNotFoundError: ``path`` holds no ``config.json``.
    """

    sample_rate = 16000
    frame_rate = 12.5
    num_codebooks = 1

    def __init__(self, path: str | None = None, device: str = "cuda", detokenizer_path: str | None = None) -> None:
        if importlib.util.find_spec("kimia_infer") is None:
            raise ImportError(INSTALL)
        self.device, self.detokenizer_path = device, detokenizer_path
        self._tokenizer: Any = None
        self._detokenizer: Any = None
        self._set_path(path)

    def _set_path(self, path: str | None) -> None:
        if not path or not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"kimi_semantic: path={path!r} is not a GLM-4-Voice tokenizer checkpoint "
                                    "(no config.json); point it at a local copy of THUDM/glm-4-voice-tokenizer")
        self.path = str(Path(path).resolve())
        config = json.loads((Path(path) / "config.json").read_text())
        self.codebook_size = int(config.get("quantize_vocab_size", 16384))
        self.feature_dim = int(config.get("d_model", 1280))  # the codebook's width

    def _glm4(self) -> Any:
        if self._tokenizer is None:
            glm4 = _kimia("kimia_infer.models.tokenizer.glm4_tokenizer")
            self._tokenizer = glm4.Glm4Tokenizer(self.path).to(self.device).eval()
        return self._tokenizer

    def fit(self, clips: Sequence[np.ndarray]) -> None:
        """Pretrained: nothing to learn."""

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """Mono f32 16 kHz → int64 [frames] (12.5 Hz; 30 s chunks, each rounded up, as Kimi's prompt manager)."""
        import torch

        samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if samples.size == 0:
            return np.zeros(0, np.int64)
        ids = self._glm4().tokenize(speech=torch.from_numpy(samples).unsqueeze(0), sr=self.sample_rate)
        return np.asarray(ids.reshape(-1).cpu().numpy(), dtype=np.int64)

    def features(self, samples: np.ndarray) -> np.ndarray:
        """f32 [frames, feature_dim]: the codebook vector of each id (the quantised latent; upstream's API
        does not expose the latent before quantisation)."""
        import torch

        ids = self.encode(samples)
        table = self._glm4().whisper_model.codebook.weight
        with torch.no_grad():
            return table[torch.as_tensor(ids, device=table.device)].float().cpu().numpy().reshape(len(ids), -1)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """int64 [frames] (or [frames, 1]) → mono f32 16 kHz in [-1, 1], through Kimi's streaming detokenizer.

        Raises:
            NotImplementedError: no ``detokenizer_path`` (decoding needs Kimi-Audio's detokenizer weights).
        """
        import soxr
        import torch

        if not self.detokenizer_path:
            raise NotImplementedError(
                "kimi_semantic.decode needs Kimi-Audio's detokenizer (flow matching + BigVGAN vocoder, CUDA): set "
                "model.audio_tokenizer.options.detokenizer_path to the Kimi-Audio checkpoint directory that holds "
                "audio_detokenizer/ (config.yaml, model.pt) and vocoder/ (config.json, model.pt)")
        if self._detokenizer is None:
            self._detokenizer = _kimia("kimia_infer.models.detokenizer").get_audio_detokenizer(self.detokenizer_path)
        tokens = torch.as_tensor(np.asarray(ids).reshape(1, -1), dtype=torch.long, device=self.device)
        if tokens.shape[1] == 0:
            return np.zeros(0, np.float32)
        self._detokenizer.clear_states()
        pieces = []
        for start in range(0, tokens.shape[1], CHUNK_TOKENS):
            final = start + CHUNK_TOKENS >= tokens.shape[1]
            chunk = tokens[:, start : start + CHUNK_TOKENS]
            pieces.append(self._detokenizer.detokenize_streaming(chunk, is_final=final, upsample_factor=UPSAMPLE))
        wav = torch.cat(pieces, dim=-1).float().reshape(-1).cpu().numpy()
        wav = soxr.resample(wav, DETOKENIZER_RATE, self.sample_rate)
        return np.clip(wav, -1.0, 1.0).astype(np.float32)

    def save(self, directory: str) -> None:
        """Options and the checkpoint's path (a reference; the weights are never copied)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        spec = {"path": self.path, "device": self.device, "detokenizer_path": self.detokenizer_path,
                "codebook_size": self.codebook_size}
        (out / CONFIG_FILE).write_text(json.dumps(spec, indent=2))

    def load(self, directory: str) -> None:
        spec = json.loads((Path(directory) / CONFIG_FILE).read_text())
        self.device, self.detokenizer_path = spec["device"], spec["detokenizer_path"]
        self._tokenizer = self._detokenizer = None
        self._set_path(spec["path"])
        if self.codebook_size != spec["codebook_size"]:
            raise ValueError(f"{spec['path']}: codebook_size {self.codebook_size} differs from the saved "
                             f"{spec['codebook_size']}; the checkpoint at that path changed")
