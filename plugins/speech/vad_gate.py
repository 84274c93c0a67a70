"""A speech gate: turn down the time spans where someone talks, keep the rest."""

from __future__ import annotations

from typing import Any

import numpy as np
import soxr

from vcritic.registry import require

require("silero_vad")

VAD_RATE = 16000


def _load_silero() -> Any:
    import torch

    # Importing silero_vad calls torch.set_num_threads(1) for the whole process; undo that
    # so loading a separator does not slow down everything else running in this process.
    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad

        return load_silero_vad()  # the TorchScript model bundled in the wheel; no download
    finally:
        torch.set_num_threads(threads)


class VadGateSeparator:
    """The ``Separator`` plugin ``vad_gate``.

    silero-vad finds the spans that contain speech; those spans are attenuated by
    ``attenuation_db`` with linear ``fade_ms`` ramps outside each span, so that what is
    left is mostly music. This is a gate in time, not source separation: while someone
    talks over the music, the music in that span is turned down together with the voice.
    It suits reaction recordings where the music is paused or quiet during talk.

    Sung vocals can also look like speech to the VAD; a lower ``threshold`` gates more.
    """

    def __init__(
        self,
        attenuation_db: float = 30.0,
        fade_ms: float = 20.0,
        threshold: float = 0.5,
        pad_ms: float = 100.0,
        min_speech_ms: float = 250.0,
        min_silence_ms: float = 100.0,
    ) -> None:
        if attenuation_db < 0:
            raise ValueError(f"attenuation_db must be >= 0, got {attenuation_db}")
        if fade_ms < 0 or pad_ms < 0:
            raise ValueError(f"fade_ms and pad_ms must be >= 0, got {fade_ms} and {pad_ms}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.attenuation_db = attenuation_db
        self.fade_ms = fade_ms
        self.threshold = threshold
        self.pad_ms = pad_ms
        self.min_speech_ms = min_speech_ms
        self.min_silence_ms = min_silence_ms
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # workers load their own copy of the small bundled model
        return state

    def speech_regions(self, samples: np.ndarray, sample_rate: int) -> list[tuple[float, float]]:
        """Speech spans as ``(start, end)`` seconds, padded by ``pad_ms`` each side."""
        import torch
        from silero_vad import get_speech_timestamps

        audio = _mono(samples, sample_rate)
        if audio.size == 0:
            return []
        if sample_rate != VAD_RATE:
            audio = soxr.resample(audio, sample_rate, VAD_RATE).astype(np.float32)
        if self._model is None:
            self._model = _load_silero()
        stamps = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(audio)),
            self._model,
            threshold=self.threshold,
            sampling_rate=VAD_RATE,
            min_speech_duration_ms=int(self.min_speech_ms),
            min_silence_duration_ms=int(self.min_silence_ms),
            speech_pad_ms=int(self.pad_ms),
        )
        return [(s["start"] / VAD_RATE, s["end"] / VAD_RATE) for s in stamps]

    def gain(self, regions: list[tuple[float, float]], num_samples: int, sample_rate: int) -> np.ndarray:
        """Per-sample gain: 1 outside speech, the attenuation floor inside, ramps between."""
        floor = np.float32(10.0 ** (-self.attenuation_db / 20.0))
        fade = int(round(self.fade_ms * sample_rate / 1000.0))
        gain = np.ones(num_samples, dtype=np.float32)
        for start, end in regions:
            a = min(max(int(round(start * sample_rate)), 0), num_samples)
            b = min(max(int(round(end * sample_rate)), a), num_samples)
            gain[a:b] = floor
            # The ramps sit outside the span so the speech itself is attenuated in full.
            if fade > 0:
                ramp = np.linspace(floor, 1.0, fade + 1, dtype=np.float32)[1:]
                lo = max(a - fade, 0)
                gain[lo:a] = np.minimum(gain[lo:a], ramp[::-1][fade - (a - lo) :])
                hi = min(b + fade, num_samples)
                gain[b:hi] = np.minimum(gain[b:hi], ramp[: hi - b])
        return gain

    def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        audio = _mono(samples, sample_rate)
        regions = self.speech_regions(audio, sample_rate)
        if not regions:
            return audio.copy()
        return (audio * self.gain(regions, audio.size, sample_rate)).astype(np.float32)


def _mono(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    return audio
