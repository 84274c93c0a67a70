"""Reading audio windows: soundfile for decoding, soxr for resampling."""

from __future__ import annotations

import numpy as np
import soundfile as sf
import soxr

from vcritic.data.schema import AudioRef


class AudioError(ValueError):
    """An audio window that cannot be used; the message is the quarantine reason."""


def load(ref: AudioRef, sample_rate: int) -> np.ndarray:
    """Decode ``ref`` to mono float32 at ``sample_rate``.

    Raises:
        AudioError: unreadable file, window past the end, empty or non-finite audio.
    """
    try:
        info = sf.info(ref.path)
        start = int(round(ref.offset_s * info.samplerate))
        if start >= info.frames:
            raise AudioError(
                f"{ref.path}: offset {ref.offset_s:.2f}s is past the end ({info.frames / info.samplerate:.2f}s)"
            )
        frames = -1 if ref.duration_s is None else int(round(ref.duration_s * info.samplerate))
        data, sr = sf.read(ref.path, start=start, frames=frames, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, OSError...
        raise AudioError(f"{ref.path}: cannot decode audio ({type(exc).__name__}: {exc})") from exc
    mono = data.mean(axis=1)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate).astype(np.float32)
    if mono.size == 0:
        raise AudioError(f"{ref.path}: audio window is empty (0 samples)")
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{ref.path}: audio has NaN or infinite samples")
    return np.clip(mono, -1.0, 1.0).astype(np.float32, copy=False)
