"""The ``Separator`` plugin ``demucs``: music source separation with a local Demucs checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from vcritic.registry import require

require("demucs", "torch")

CHECKPOINT_HELP = (
    "Demucs needs a local checkpoint (nothing is downloaded at run time). Give `checkpoint` as one "
    "of: a single-model `.th` file as demucs saves it (e.g. the htdemucs release file "
    "955717e8-8726e21a.th); a `.safetensors` file from demucs' Hugging Face export; or a folder "
    "plus `name` (the model or bag name, e.g. name=htdemucs), the way `demucs --repo DIR -n NAME` "
    'reads it. On a machine with internet, `python -c "from demucs.pretrained import get_model; '
    "get_model('htdemucs')\"` fills the Hugging Face / torch hub cache; copy those files here."
)


class DemucsSeparator:
    """Split the mixture into Demucs stems and put back the ones that are music.

    Which stems to keep, and why the default is not "everything but vocals": in a reaction
    recording the person reacting talks over a song. Demucs has no stem for talk: speech
    lands in ``vocals``, together with the song's own singing. For a singing-voice critic the
    singing is the very thing to judge, so dropping ``vocals`` would throw away the music we
    came for. The default therefore keeps ``drums``, ``bass`` and ``other`` as they are and
    sends ``vocals`` through the ``vad_gate`` speech gate before adding it back. Gating the
    isolated vocal stem costs far less than gating the whole mixture (the ``vad_gate`` plugin
    alone): while the reactor talks, only the vocal line of that span is turned down and the
    accompaniment plays on; the singing elsewhere is untouched. Set ``gate=[]`` to keep only
    the accompaniment (instrumental music, or when singing and talk cannot be told apart),
    or list ``vocals`` in ``keep`` when nobody talks over the song.

    Processing follows demucs' own command line tool: mono input is copied to the model's
    channels, resampled (soxr) to the model's sample rate, normalised by the mixture's mean and
    standard deviation, separated by ``demucs.apply.apply_model`` in overlapping chunks
    (``segment`` seconds, ``overlap`` fraction), scaled back, summed over the chosen stems,
    averaged to mono and resampled back. ``shifts`` defaults to 0, unlike demucs' CLI (1):
    a random time shift makes the output change from run to run, and the data pipeline
    relies on the same input giving the same separated file.

    Args:
        checkpoint: a ``.th`` or ``.safetensors`` file, or a folder of them (then ``name`` is
            required); see :data:`CHECKPOINT_HELP`. Only load checkpoints you trust: ``.th``
            files are pickles.
        name: model or bag name inside a ``checkpoint`` folder (``<name>.th``,
            ``<name>-<checksum>.th`` or ``<name>.yaml`` listing signatures).
        keep: stems added back unchanged.
        gate: stems passed through the speech gate before being added back.
        gate_options: options of ``plugins.speech.vad_gate.VadGateSeparator``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``"auto"`` picks CUDA when available.
        segment: chunk length in seconds (default: the model's own; HTDemucs cannot go above it).
        overlap: fraction of each chunk shared with the next, in [0, 1).
        shifts: random-shift passes averaged (demucs' test-time augmentation); 0 = deterministic.

    Raises:
        ValueError: an option is out of range (the message names it).
        FileNotFoundError: ``checkpoint`` does not exist (at first use).
    """

    def __init__(
        self,
        checkpoint: str,
        name: str | None = None,
        keep: Sequence[str] = ("drums", "bass", "other"),
        gate: Sequence[str] = ("vocals",),
        gate_options: dict[str, Any] | None = None,
        device: str = "auto",
        segment: float | None = None,
        overlap: float = 0.25,
        shifts: int = 0,
    ) -> None:
        if not checkpoint:
            raise ValueError(f"demucs: option `checkpoint` is required. {CHECKPOINT_HELP}")
        keep, gate = [str(s) for s in keep], [str(s) for s in gate]
        if not keep and not gate:
            raise ValueError("demucs: `keep` and `gate` are both empty, so the output would be silence")
        both = sorted(set(keep) & set(gate))
        if both:
            raise ValueError(f"demucs: stems {both} are in both `keep` and `gate`; list each stem once")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"demucs: `overlap` must be in [0, 1), got {overlap}")
        if segment is not None and segment <= 0:
            raise ValueError(f"demucs: `segment` must be positive seconds, got {segment}")
        if shifts < 0:
            raise ValueError(f"demucs: `shifts` must be >= 0, got {shifts}")
        self.checkpoint = str(checkpoint)
        self.name = name
        self.keep = keep
        self.gate = gate
        self.gate_options = dict(gate_options or {})
        self.device = device
        self.segment = segment
        self.overlap = float(overlap)
        self.shifts = int(shifts)
        self._model: Any = None
        self._gate: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # each Ray worker loads its own copy from the local checkpoint
        state["_gate"] = None
        return state

    @property
    def model(self) -> Any:
        """The loaded Demucs model (or bag of models), on first use."""
        if self._model is None:
            model = load_demucs(self.checkpoint, self.name)
            unknown = sorted(set(self.keep + self.gate) - set(model.sources))
            if unknown:
                raise ValueError(
                    f"demucs: stems {unknown} in `keep`/`gate` are not produced by {self.checkpoint} "
                    f"(its stems: {list(model.sources)})"
                )
            self._model = model
        return self._model

    def torch_device(self) -> str:
        """The device ``apply_model`` runs on, ``"auto"`` resolved."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def stems(self, samples: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        """Every stem of the model as mono float32 at ``sample_rate``, the length of ``samples``."""
        audio = _mono(samples, sample_rate)
        model = self.model
        mix = prepare_mix(audio, sample_rate, model.samplerate, model.audio_channels)
        sources = run_demucs(
            model,
            mix,
            device=self.torch_device(),
            segment=self.segment,
            overlap=self.overlap,
            shifts=self.shifts,
        )
        out = {}
        for index, stem in enumerate(model.sources):
            mono = sources[index].mean(axis=0)
            out[stem] = _resample(mono, model.samplerate, sample_rate, audio.size)
        return out

    def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        """The music: ``keep`` stems plus speech-gated ``gate`` stems, float32, same length."""
        audio = _mono(samples, sample_rate)
        if audio.size == 0:
            return audio.copy()
        stems = self.stems(audio, sample_rate)
        music = np.zeros(audio.size, dtype=np.float32)
        for stem in self.keep:
            music += stems[stem]
        for stem in self.gate:
            music += self._speech_gate().separate(stems[stem], sample_rate)
        return np.clip(music, -1.0, 1.0).astype(np.float32, copy=False)

    def _speech_gate(self) -> Any:
        if self._gate is None:
            try:
                from plugins.speech.vad_gate import VadGateSeparator
            except ImportError as exc:
                raise ImportError(
                    f"demucs: gating the {self.gate} stem(s) needs silero-vad ({exc}); install it with "
                    "pip install -e '.[speech]', or set gate=[] to drop those stems instead"
                ) from exc
            self._gate = VadGateSeparator(**self.gate_options)
        return self._gate


def load_demucs(checkpoint: str | Path, name: str | None = None) -> Any:
    """Load a Demucs model or bag from local files with demucs' own loaders, in eval mode.

    A ``.th`` file goes through ``demucs.states.load_model`` (the package dict demucs writes);
    a ``.safetensors`` file through ``demucs.hf.load_safetensors_model``; a folder through
    ``demucs.pretrained.get_model(name, repo=folder)``, except that a folder holding
    ``<name>.yaml`` next to ``<signature>.safetensors`` files (the layout demucs' Hugging Face
    repositories use) is read as that bag.

    Raises:
        FileNotFoundError: the path, or the named model inside the folder, is missing.
        ValueError: a folder without ``name``, or a file of another type.
    """
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"demucs: `checkpoint` {str(path)!r} does not exist. {CHECKPOINT_HELP}")
    if path.is_file():
        if path.suffix == ".th":
            from demucs.states import load_model

            return load_model(path).eval()
        if path.suffix == ".safetensors":
            from demucs.hf import load_safetensors_model

            return load_safetensors_model(path).eval()
        raise ValueError(f"demucs: `checkpoint` {str(path)!r} is neither a .th nor a .safetensors file")
    # Named as demucs' LocalRepo names them: "<signature>-<checksum>.th" is model "<signature>".
    present = sorted(
        {
            p.stem.rsplit("-", 1)[0] if p.suffix == ".th" else p.stem
            for p in path.iterdir()
            if p.suffix in (".th", ".yaml", ".safetensors")
        }
    )
    if not name:
        raise ValueError(
            f"demucs: `checkpoint` {str(path)!r} is a folder, so option `name` is required "
            f"(models there: {present or 'none'})"
        )
    bag = _safetensors_bag(path, name)
    if bag is not None:
        return bag.eval()
    if name not in present:
        raise FileNotFoundError(
            f"demucs: no model {name!r} in {str(path)!r} (models there: {present or 'none'}). {CHECKPOINT_HELP}"
        )
    from demucs.pretrained import get_model

    return get_model(name, repo=path)  # a local repo: demucs does not try any hub


def _safetensors_bag(folder: Path, name: str) -> Any:
    """The bag ``<name>.yaml`` when each of its signatures has a ``.safetensors`` file, else None."""
    import yaml

    spec = folder / f"{name}.yaml"
    if not spec.is_file():
        return None
    bag = yaml.safe_load(spec.read_text())
    files = [folder / f"{sig}.safetensors" for sig in bag.get("models", [])]
    if not files or not all(f.is_file() for f in files):
        return None
    from demucs.apply import BagOfModels
    from demucs.hf import load_safetensors_model

    return BagOfModels([load_safetensors_model(f) for f in files], bag.get("weights"), bag.get("segment"))


def prepare_mix(audio: np.ndarray, sample_rate: int, model_rate: int, channels: int) -> np.ndarray:
    """Mono audio at ``sample_rate`` as ``[channels, samples]`` float32 at ``model_rate``."""
    if sample_rate != model_rate:
        audio = soxr.resample(audio, sample_rate, model_rate)
    return np.repeat(np.asarray(audio, dtype=np.float32)[None, :], channels, axis=0)


def run_demucs(
    model: Any,
    mix: np.ndarray,
    device: str = "cpu",
    segment: float | None = None,
    overlap: float = 0.25,
    shifts: int = 0,
) -> np.ndarray:
    """Separate ``mix`` (``[channels, samples]``) into ``[sources, channels, samples]`` float32.

    As demucs' CLI does, the mixture is normalised by the mean and standard deviation of its
    channel average before ``apply_model`` and the stems are scaled back after, so quiet and
    loud recordings meet the model at the level it was trained on.
    """
    import torch
    from demucs.apply import apply_model

    wav = torch.from_numpy(np.ascontiguousarray(mix, dtype=np.float32))
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std().clamp_min(1e-8)
    with torch.inference_mode():
        sources = apply_model(
            model,
            ((wav - mean) / std)[None],
            shifts=shifts,
            split=True,
            overlap=overlap,
            segment=segment,
            device=device,
            progress=False,
        )[0]
    return (sources.cpu() * std + mean).numpy().astype(np.float32, copy=False)


def _resample(audio: np.ndarray, rate: int, target: int, length: int) -> np.ndarray:
    """``audio`` at ``target`` Hz, cut or zero-padded to exactly ``length`` samples."""
    if rate != target:
        audio = soxr.resample(audio, rate, target)
    out = np.zeros(length, dtype=np.float32)
    n = min(length, audio.size)
    out[:n] = audio[:n]
    return out


def _mono(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"demucs: expected mono audio of shape [samples], got shape {audio.shape}")
    if sample_rate <= 0:
        raise ValueError(f"demucs: sample_rate must be positive, got {sample_rate}")
    return audio
