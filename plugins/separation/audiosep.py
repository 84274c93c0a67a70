"""The ``Separator`` plugin ``audiosep``: keep what a text query describes (AudioSep).

AudioSep (the Audio-AGI/AudioSep repository on GitHub) separates the sound that matches a
natural-language query, e.g. ``"music"``. It is not a Python package: its inference code is the
repository's top-level ``pipeline.py``, ``utils.py`` and ``models/``, and it needs two
checkpoints, AudioSep's own and the CLAP text/audio encoder it is conditioned on. So the user
clones the repository, downloads the checkpoints the AudioSep README links, and points this
plugin at them; nothing here is imported until the first clip is separated, and every missing
piece is reported with what to fetch.

Set-up, as the AudioSep README lays it out::

    <code_dir>/pipeline.py, utils.py, models/ ...            (git clone of the repository)
    <code_dir>/config/audiosep_base.yaml                      (in the repository)
    <code_dir>/checkpoint/audiosep_base_4M_steps.ckpt         (AudioSep checkpoint: `checkpoint`)
    <code_dir>/checkpoint/music_speech_audioset_epoch_15_esc_89.98.pt   (CLAP checkpoint)

plus its Python requirements (torchlibrosa, lightning, transformers' ``roberta-base`` tokenizer in
the Hugging Face cache for offline use...). AudioSep's CLAP encoder opens its checkpoint by the
relative path ``checkpoint/music_speech_audioset_epoch_15_esc_89.98.pt``, so the model is built
with ``code_dir`` as the working directory and the CLAP file must sit there.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import soxr

AUDIOSEP_RATE = 32000  # AudioSep's models run at 32 kHz only
CLAP_RELATIVE = Path("checkpoint") / "music_speech_audioset_epoch_15_esc_89.98.pt"
DEFAULT_CONFIG = Path("config") / "audiosep_base.yaml"
CHUNK_WINDOW_S = 5.0  # AudioSep's chunk_inference window (1 s + 3 s + 1 s); shorter clips skip it

GET_CODE = (
    "clone the Audio-AGI/AudioSep repository from GitHub and pass its folder as `code_dir` "
    "(and pip install its requirements)"
)
GET_CHECKPOINTS = (
    "download the AudioSep checkpoint and the CLAP checkpoint "
    f"({CLAP_RELATIVE.name}) that the AudioSep README links, into <code_dir>/checkpoint/"
)


class AudioSepSeparator:
    """Keep the part of the recording that matches ``query``, via AudioSep's own pipeline.

    Args:
        code_dir: a checkout of the AudioSep repository (added to ``sys.path``).
        checkpoint: the AudioSep ``.ckpt`` file (absolute, or relative to ``code_dir``).
        config_yaml: AudioSep's model config (default ``<code_dir>/config/audiosep_base.yaml``).
        query: text describing what to keep. ``"music"`` keeps the song, sung vocals included,
            and leaves out talk; a narrower query (``"piano"``) keeps less.
        device: ``"cpu"``, ``"cuda"``...; ``"auto"`` picks CUDA when available.
        use_chunk: run AudioSep's ``chunk_inference`` (5 s windows) on clips longer than 5 s,
            which bounds memory on long recordings; shorter clips always take one forward pass,
            because ``chunk_inference`` returns silence for them.

    Raises:
        ValueError: an empty ``code_dir``, ``checkpoint`` or ``query``.
        FileNotFoundError: code or checkpoints missing (at first use; the message says what to get).
    """

    def __init__(
        self,
        code_dir: str,
        checkpoint: str,
        config_yaml: str | None = None,
        query: str = "music",
        device: str = "auto",
        use_chunk: bool = True,
    ) -> None:
        if not code_dir:
            raise ValueError(f"audiosep: option `code_dir` is required: {GET_CODE}")
        if not checkpoint:
            raise ValueError(f"audiosep: option `checkpoint` is required: {GET_CHECKPOINTS}")
        if not str(query).strip():
            raise ValueError("audiosep: option `query` must be a non-empty text, e.g. 'music'")
        self.code_dir = str(code_dir)
        self.checkpoint = str(checkpoint)
        self.config_yaml = config_yaml
        self.query = str(query)
        self.device = device
        self.use_chunk = bool(use_chunk)
        self._model: Any = None
        self._condition: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # each worker builds its own from the local files
        state["_condition"] = None
        return state

    def paths(self) -> tuple[Path, Path, Path]:
        """``(code_dir, checkpoint, config_yaml)`` resolved and checked.

        Raises:
            FileNotFoundError: naming the first missing piece and how to get it.
        """
        code = Path(self.code_dir).expanduser().resolve()
        if not (code / "pipeline.py").is_file() or not (code / "models").is_dir():
            raise FileNotFoundError(
                f"audiosep: no AudioSep code at `code_dir` {str(code)!r} (expected pipeline.py and models/): {GET_CODE}"
            )
        ckpt = _under(code, self.checkpoint)
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"audiosep: AudioSep `checkpoint` {str(ckpt)!r} does not exist: {GET_CHECKPOINTS}"
            )
        clap = code / CLAP_RELATIVE
        if not clap.is_file():
            raise FileNotFoundError(
                f"audiosep: the CLAP checkpoint {str(clap)!r} does not exist (AudioSep opens it by that "
                f"relative path): {GET_CHECKPOINTS}"
            )
        config = _under(code, self.config_yaml) if self.config_yaml else code / DEFAULT_CONFIG
        if not config.is_file():
            raise FileNotFoundError(
                f"audiosep: `config_yaml` {str(config)!r} does not exist; the repository ships "
                f"{DEFAULT_CONFIG} (check the `code_dir` checkout)"
            )
        return code, ckpt, config

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def model(self) -> Any:
        """AudioSep's model from ``pipeline.build_audiosep``, built on first use."""
        if self._model is None:
            code, ckpt, config = self.paths()
            pipeline = _import_pipeline(code)
            with contextlib.chdir(code):  # CLAP_Encoder opens its checkpoint by a relative path
                self._model = pipeline.build_audiosep(
                    config_yaml=str(config), checkpoint_path=str(ckpt), device=self.torch_device()
                )
        return self._model

    def condition(self) -> Any:
        """The CLAP text embedding of ``query``, computed once."""
        if self._condition is None:
            import torch

            with torch.no_grad():
                self._condition = self.model.query_encoder.get_query_embed(
                    modality="text", text=[self.query], device=self.torch_device()
                )
        return self._condition

    def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """What matches ``query``, float32 of the input's length and rate."""
        import torch

        audio = np.asarray(samples, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audiosep: expected mono audio of shape [samples], got shape {audio.shape}")
        if sample_rate <= 0:
            raise ValueError(f"audiosep: sample_rate must be positive, got {sample_rate}")
        if audio.size == 0:
            return audio.copy()
        mix = audio if sample_rate == AUDIOSEP_RATE else soxr.resample(audio, sample_rate, AUDIOSEP_RATE)
        model = self.model
        input_dict = {
            "mixture": torch.from_numpy(np.ascontiguousarray(mix, dtype=np.float32))[None, None, :].to(
                self.torch_device()
            ),
            "condition": self.condition(),
        }
        with torch.no_grad():
            if self.use_chunk and mix.size > CHUNK_WINDOW_S * AUDIOSEP_RATE:
                out = model.ss_model.chunk_inference(input_dict)  # numpy [1, samples]
            else:
                out = model.ss_model(input_dict)["waveform"]  # tensor [1, 1, samples]
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        music = np.asarray(out, dtype=np.float32).reshape(-1)
        if sample_rate != AUDIOSEP_RATE:
            music = soxr.resample(music, AUDIOSEP_RATE, sample_rate)
        fixed = np.zeros(audio.size, dtype=np.float32)
        fixed[: min(audio.size, music.size)] = music[: audio.size]
        return np.clip(fixed, -1.0, 1.0)


def _under(code: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else code / p


def _import_pipeline(code: Path) -> ModuleType:
    """Import AudioSep's top-level ``pipeline`` module from ``code``.

    AudioSep's modules have generic top-level names (``pipeline``, ``utils``, ``models``); if one
    of them is already imported from elsewhere, importing AudioSep would silently use the wrong
    module, so that is an error instead.
    """
    for name in ("pipeline", "utils", "models"):
        loaded = sys.modules.get(name)
        origin = getattr(loaded, "__file__", None) if loaded is not None else None
        if origin and not Path(origin).resolve().is_relative_to(code):
            raise ImportError(
                f"audiosep: a different module named {name!r} is already imported (from {origin}); AudioSep's "
                f"top-level modules must come from `code_dir` {str(code)!r}: run it in a separate process"
            )
    if str(code) not in sys.path:
        sys.path.insert(0, str(code))
    try:
        with contextlib.chdir(code):
            return importlib.import_module("pipeline")
    except ImportError as exc:
        raise ImportError(
            f"audiosep: importing AudioSep's pipeline from {str(code)!r} failed ({exc}); install the "
            "AudioSep repository's Python requirements into this environment"
        ) from exc
