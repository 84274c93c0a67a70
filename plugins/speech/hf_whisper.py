"""Speech recognition with any local transformers Whisper checkpoint (multilingual, with language detection).

Why a second Whisper plugin beside ``faster_whisper``: reaction recordings come in Chinese as often
as in English, and the checkpoints people fine-tune and share are transformers directories
(``openai/whisper-*`` layouts, ``Belle-whisper``-style Chinese fine-tunes). This plugin loads such
a directory as it is, runs on CPU or GPU, and tells the caller which language it heard.

How a recording is decoded:

1. It is resampled to 16 kHz and cut into windows of at most ``chunk_length_s`` (30 s, Whisper's
   input size). Each cut is moved back to the quietest 50 ms in the window's last few seconds, so
   a cut lands in a pause between words whenever the recording has one.
2. The language is decided once for the whole recording (unless ``language`` fixes it): each
   window's first decoder step gives a distribution over the checkpoint's language tokens (the
   same logits ``model.detect_language`` takes its argmax of), and the windows vote, each weighted
   by how likely it holds speech at all (one minus the ``<|nospeech|>`` probability). A recording
   that opens with a minute of music is therefore not labelled by its music.
3. Windows are decoded ``batch_size`` at a time with timestamps, one ``generate`` call per window
   (``force_unique_generate_call``), fed exactly as ``WhisperProcessor`` + ``model.generate``
   would feed them. The timestamp tokens split each window into segments; the window's start is
   added to every time, and cross-attention alignment (the checkpoint's ``alignment_heads``) gives
   word times.

Each returned :class:`LanguageTranscript` is a :class:`vcritic.protocols.Transcript` that also
carries the recording's language code (``"zh"``, ``"en"``, ...); :meth:`HFWhisperASR.detect_language`
returns the code alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from vcritic.protocols import Transcript, Word

log = logging.getLogger(__name__)

WHISPER_RATE = 16000


def to_whisper_rate(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at the 16 kHz every Whisper model reads (both ASR plugins use this)."""
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio (1-D), got shape {audio.shape}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if sample_rate != WHISPER_RATE and audio.size:
        audio = soxr.resample(audio, sample_rate, WHISPER_RATE).astype(np.float32)
    return audio
TIME_PRECISION = 0.02  # seconds per timestamp token step
SEARCH_S = 5.0  # how far back from a window's end a cut may move to find a pause
QUIET_FRAME_S = 0.05
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("transcribe", "translate")
# transformers groups tokens into words by unicode characters for these, by spaces otherwise
_NO_SPACE_LANGUAGES = {"zh", "ja", "th", "lo", "my", "yue"}

CHECKPOINT_LAYOUT = (
    "config.json and generation_config.json, weights (model.safetensors, its sharded index, or "
    "pytorch_model.bin), preprocessor_config.json (the WhisperFeatureExtractor), and the tokenizer "
    "(tokenizer.json, or vocab.json + merges.txt)"
)


@dataclass(frozen=True)
class LanguageTranscript(Transcript):
    """A :class:`Transcript` with the language code the recording was decoded in (None when unknown)."""

    language: str | None = None


def _missing_files(path: Path) -> list[str]:
    """What a Whisper checkpoint directory lacks, as readable names."""
    missing = [
        name
        for name in ("config.json", "generation_config.json", "preprocessor_config.json")
        if not (path / name).is_file()
    ]
    weights = (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    if not any((path / name).is_file() for name in weights):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not (path / "tokenizer.json").is_file() and not (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    ):
        missing.append("tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    return missing


def check_checkpoint_dir(model_path: str | os.PathLike[str] | None) -> Path:
    """Return ``model_path`` as a directory holding a transformers Whisper checkpoint.

    Raises:
        ValueError: naming the ``model_path`` option, the directory and what it lacks.
    """
    if model_path is None or not str(model_path).strip():
        raise ValueError(
            "hf_whisper needs the option model_path: a local Whisper checkpoint directory holding "
            f"{CHECKPOINT_LAYOUT} (e.g. a snapshot of openai/whisper-small saved with save_pretrained)"
        )
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"hf_whisper option model_path={str(model_path)!r} is not a directory; it must hold {CHECKPOINT_LAYOUT}"
        )
    missing = _missing_files(path)
    if missing:
        raise ValueError(
            f"hf_whisper option model_path={str(model_path)!r} is not a Whisper checkpoint: it lacks "
            f"{', '.join(missing)}; it must hold {CHECKPOINT_LAYOUT}"
        )
    return path


def plan_chunks(audio: np.ndarray, sample_rate: int, chunk_length_s: float) -> list[tuple[int, int]]:
    """Cut ``audio`` into ``[start, end)`` sample ranges of at most ``chunk_length_s`` each.

    Every range but the last ends at the quietest ``QUIET_FRAME_S`` frame among the last
    ``SEARCH_S`` seconds (at most a quarter of the window) before the full length, so that a
    cut falls in a pause rather than through a word when there is one.
    """
    n = len(audio)
    size = int(round(chunk_length_s * sample_rate))
    if size <= 0:
        raise ValueError(f"chunk_length_s must be positive, got {chunk_length_s}")
    frame = max(1, int(QUIET_FRAME_S * sample_rate))
    search = min(int(SEARCH_S * sample_rate), size // 4)
    chunks, start = [], 0
    while n - start > size:
        lo, hi = start + size - search, start + size
        window = np.asarray(audio[lo:hi], dtype=np.float64)
        frames = len(window) // frame
        if frames >= 1:
            energy = (window[: frames * frame].reshape(frames, frame) ** 2).sum(axis=1)
            # the latest of the quietest frames, so windows stay as long as they can
            quiet = frames - 1 - int(np.argmin(energy[::-1]))
            end = lo + (quiet + 1) * frame
        else:
            end = hi
        chunks.append((start, end))
        start = end
    if n > start:
        chunks.append((start, n))
    return chunks


def split_segments(
    token_ids: list[int],
    timestamp_begin: int,
    is_text: Callable[[int], bool],
    duration: float,
) -> list[tuple[float, float, list[int], list[int]]]:
    """Split one decoded window into ``(start, end, text_tokens, their_positions)`` segments.

    Whisper writes ``<|t0|> text <|t1|>`` per segment (a closing and the next opening timestamp
    often repeat the same time). ``is_text(token_id)`` tells text tokens from the prompt's special
    tokens, which are skipped. Text left open at the end (decoding stopped before a closing
    timestamp) ends at ``duration``; all times are clamped into ``[0, duration]``.
    """
    segments = []
    start: float | None = None
    last_end = 0.0
    tokens: list[int] = []
    positions: list[int] = []
    for pos, tok in enumerate(token_ids):
        if tok >= timestamp_begin:
            t = min(max((tok - timestamp_begin) * TIME_PRECISION, 0.0), duration)
            if tokens:
                begin = start if start is not None else last_end
                segments.append((begin, max(t, begin), tokens, positions))
                tokens, positions, start, last_end = [], [], None, t
            else:
                start = t
        elif is_text(tok):
            tokens.append(tok)
            positions.append(pos)
    if tokens:
        begin = start if start is not None else last_end
        segments.append((begin, max(duration, begin), tokens, positions))
    return segments


class HFWhisperASR:
    """The ``ASR`` plugin ``hf_whisper``: one :class:`LanguageTranscript` per Whisper segment.

    Options:
        model_path: a local transformers Whisper checkpoint directory (required; never downloaded).
        language: a code such as ``"zh"`` or ``"en"`` to force it, or None to detect it once per
            recording (English-only checkpoints always decode English).
        task: ``"transcribe"`` (the default) or ``"translate"`` (into English).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        dtype: ``"auto"`` (float16 on CUDA, float32 on CPU), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        batch_size: windows decoded together.
        chunk_length_s: the longest window, at most the checkpoint's input length (30 s).
        word_timestamps: align words to the audio (needs ``alignment_heads`` in the checkpoint's
            generation config; without them words are left empty and a warning says so).
        num_beams: beam width of the decoder.

    The model is loaded on first use and dropped when pickled, so Ray workers each load their own.
    """

    def __init__(
        self,
        model_path: str | None = None,
        language: str | None = None,
        task: str = "transcribe",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        chunk_length_s: float = 30.0,
        word_timestamps: bool = True,
        num_beams: int = 1,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"hf_whisper option task must be one of {TASKS}, got {task!r}")
        if device not in DEVICES and not str(device).startswith("cuda:"):
            raise ValueError(
                f"hf_whisper option device must be one of {DEVICES} (or 'cuda:N'), got {device!r}"
            )
        if dtype not in DTYPES:
            raise ValueError(f"hf_whisper option dtype must be one of {DTYPES}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"hf_whisper option batch_size must be >= 1, got {batch_size}")
        if not 0 < chunk_length_s <= 30:
            raise ValueError(f"hf_whisper option chunk_length_s must be in (0, 30], got {chunk_length_s}")
        if num_beams < 1:
            raise ValueError(f"hf_whisper option num_beams must be >= 1, got {num_beams}")
        check_checkpoint_dir(model_path)  # fail at configuration time, not on the first recording
        self.model_path = str(model_path)
        self.language = language.strip().lower() if isinstance(language, str) and language.strip() else None
        self.task = task
        self.device = device
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.chunk_length_s = float(chunk_length_s)
        self.word_timestamps = bool(word_timestamps)
        self.num_beams = int(num_beams)
        self._model: Any = None
        self._feature_extractor: Any = None
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = state["_feature_extractor"] = state["_tokenizer"] = None
        return state

    # ---- loading -------------------------------------------------------------------------

    def _torch_device_and_dtype(self) -> tuple[Any, Any]:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"hf_whisper option device={self.device!r} but torch sees no CUDA device; use device=cpu or auto"
            )
        dtype = self.dtype
        if dtype == "auto":
            dtype = "float16" if device.startswith("cuda") else "float32"
        return torch.device(device), getattr(torch, dtype)

    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

        path = check_checkpoint_dir(self.model_path)
        device, dtype = self._torch_device_and_dtype()
        # local_files_only everywhere: a bad path must fail here, not turn into a hub download
        model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
        model.to(device).eval()
        self._feature_extractor = WhisperFeatureExtractor.from_pretrained(path, local_files_only=True)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        gen = model.generation_config
        if getattr(gen, "no_timestamps_token_id", None) is None:
            raise ValueError(
                f"hf_whisper option model_path={self.model_path!r}: generation_config.json has no "
                "no_timestamps_token_id, so the checkpoint cannot give timestamps (save it with a "
                "current transformers, or copy generation_config.json from the base Whisper model)"
            )
        window_s = self._feature_extractor.n_samples / self._feature_extractor.sampling_rate
        if self.chunk_length_s > window_s:
            raise ValueError(
                f"hf_whisper option chunk_length_s={self.chunk_length_s} exceeds the checkpoint's {window_s:g} s input"
            )
        if self._multilingual(gen):
            codes = self._language_codes(gen)
            if self.language is not None and self.language not in codes:
                raise ValueError(
                    f"hf_whisper option language={self.language!r} is not one of this checkpoint's "
                    f"languages: {', '.join(sorted(codes))} (or None to detect)"
                )
        elif self.language not in (None, "en"):
            raise ValueError(
                f"hf_whisper option language={self.language!r}: the checkpoint is English-only; use en or None"
            )
        if self.word_timestamps and getattr(gen, "alignment_heads", None) is None:
            log.warning(
                "hf_whisper: %s has no alignment_heads in its generation config; words are left empty", path
            )
        self._model = model
        return model

    @staticmethod
    def _multilingual(gen: Any) -> bool:
        return bool(getattr(gen, "is_multilingual", False)) and bool(getattr(gen, "lang_to_id", None))

    @staticmethod
    def _language_codes(gen: Any) -> dict[str, int]:
        """``{"zh": token id, ...}`` from the checkpoint's ``lang_to_id`` (keys like ``<|zh|>``)."""
        return {token.strip("<|>"): int(i) for token, i in gen.lang_to_id.items()}

    def _words_enabled(self) -> bool:
        return (
            self.word_timestamps
            and getattr(self._model.generation_config, "alignment_heads", None) is not None
        )

    # ---- audio and features --------------------------------------------------------------

    def _features(self, clips: list[np.ndarray]) -> tuple[Any, Any]:
        """Log-mel features and frame mask of ``clips``, exactly as ``WhisperProcessor`` makes them."""
        model = self._load()
        out = self._feature_extractor(
            clips, sampling_rate=WHISPER_RATE, return_tensors="pt", return_attention_mask=True
        )
        return out.input_features.to(model.device, model.dtype), out.attention_mask.to(model.device)

    # ---- language ------------------------------------------------------------------------

    def language_probabilities(self, features: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per window: probabilities of each language code, and the probability the window holds speech.

        The first decoder step after ``<|startoftranscript|>`` is the step ``model.detect_language``
        reads; its softmax restricted to the language tokens is the language distribution, and the
        full softmax's ``<|nospeech|>`` (``<|nocaptions|>`` in older vocabularies) mass is how likely
        the window is not speech.
        """
        import torch

        model = self._load()
        gen = model.generation_config
        codes = self._language_codes(gen)
        start = torch.full(
            (features.shape[0], 1), gen.decoder_start_token_id, dtype=torch.long, device=model.device
        )
        with torch.no_grad():
            logits = (
                model(input_features=features, decoder_input_ids=start, use_cache=False).logits[:, -1].float()
            )
        lang_ids = list(codes.values())
        lang_probs = torch.softmax(logits[:, lang_ids], dim=-1).cpu().numpy()
        speech = np.ones(features.shape[0])
        no_speech_id = self._no_speech_token_id()
        if no_speech_id is not None:
            speech = 1.0 - torch.softmax(logits, dim=-1)[:, no_speech_id].cpu().numpy()
        return {code: lang_probs[:, i] for i, code in enumerate(codes)}, speech

    def _no_speech_token_id(self) -> int | None:
        unk = self._tokenizer.unk_token_id
        for token in ("<|nospeech|>", "<|nocaptions|>"):
            i = self._tokenizer.convert_tokens_to_ids(token)
            if isinstance(i, int) and i != unk:
                return i
        return None

    def _vote_language(self, windows: list[np.ndarray]) -> str:
        """The recording's language: the speech-weighted vote of its windows (see the module doc)."""
        totals: dict[str, float] = {}
        for lo in range(0, len(windows), self.batch_size):
            features, _ = self._features(windows[lo : lo + self.batch_size])
            probs, speech = self.language_probabilities(features)
            weights = speech + 1e-6  # all-music recordings still get the plain average
            for code, p in probs.items():
                totals[code] = totals.get(code, 0.0) + float((p * weights).sum())
        return max(totals, key=lambda c: totals[c])

    def detect_language(self, samples: np.ndarray, sample_rate: int) -> str | None:
        """The language code of the recording (the ``language`` option when set; ``"en"`` for
        English-only checkpoints; None for empty audio)."""
        model = self._load()
        if self.language is not None:
            return self.language
        if not self._multilingual(model.generation_config):
            return "en"
        audio = to_whisper_rate(samples, sample_rate)
        if audio.size == 0:
            return None
        return self._vote_language(
            [audio[a:b] for a, b in plan_chunks(audio, WHISPER_RATE, self.chunk_length_s)]
        )

    # ---- decoding ------------------------------------------------------------------------

    def generate_kwargs(self, language: str | None) -> dict[str, Any]:
        """What the plugin passes to ``model.generate`` beside the features (a test reuses it)."""
        kwargs: dict[str, Any] = {
            "return_timestamps": True,
            "force_unique_generate_call": True,  # one decode per window: the windows are ours
            "num_beams": self.num_beams,
        }
        if self._multilingual(self._load().generation_config):
            kwargs["language"] = language
            kwargs["task"] = self.task
        if self._words_enabled():
            kwargs["return_token_timestamps"] = True
        return kwargs

    def _generate(
        self, features: Any, mask: Any, language: str | None
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Decode a batch of windows → token ids (prompt included) and, with words on, each token's time."""
        import torch

        with torch.no_grad():
            out = self._load().generate(features, attention_mask=mask, **self.generate_kwargs(language))
        if isinstance(out, torch.Tensor):
            return out.tolist(), None
        times = out.get("token_timestamps")
        return out["sequences"].tolist(), (times.float().tolist() if times is not None else None)

    def _words(
        self,
        tokens: list[int],
        positions: list[int],
        times: list[float],
        language: str | None,
        offset: float,
        start: float,
        end: float,
    ) -> tuple[Word, ...]:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES, _combine_tokens_into_words

        name = LANGUAGES.get(language or "en", "english")
        words, _, indices = _combine_tokens_into_words(self._tokenizer, tokens, name)
        out = []
        for text, idx in zip(words, indices, strict=True):
            if not text.strip() or not idx:
                continue
            first, last = positions[idx[0]], positions[idx[-1]]
            w_start = times[first]
            w_end = times[last + 1] if last + 1 < len(times) else end
            w_start = min(max(w_start, start), end)
            w_end = min(max(w_end, w_start), end)
            out.append(Word(text.strip(), offset + w_start, offset + w_end))
        return tuple(out)

    def _window_transcripts(
        self, ids: list[int], times: list[float] | None, duration: float, offset: float, language: str | None
    ) -> list[LanguageTranscript]:
        gen = self._model.generation_config
        timestamp_begin = gen.no_timestamps_token_id + 1
        special = set(self._tokenizer.all_special_ids)
        pad = gen.pad_token_id
        is_text = lambda tok: tok not in special and tok != pad  # noqa: E731
        out = []
        for start, end, tokens, positions in split_segments(ids, timestamp_begin, is_text, duration):
            text = self._tokenizer.decode(tokens, skip_special_tokens=True).strip()
            if not text:
                continue
            words = self._words(tokens, positions, times, language, offset, start, end) if times else ()
            out.append(LanguageTranscript(text, offset + start, offset + end, words, language))
        return out

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> list[LanguageTranscript]:
        audio = to_whisper_rate(samples, sample_rate)
        if audio.size == 0:
            return []
        model = self._load()
        spans = plan_chunks(audio, WHISPER_RATE, self.chunk_length_s)
        windows = [audio[a:b] for a, b in spans]
        multilingual = self._multilingual(model.generation_config)
        language = self.language or (self._vote_language(windows) if multilingual else "en")
        out: list[LanguageTranscript] = []
        for lo in range(0, len(windows), self.batch_size):
            batch = windows[lo : lo + self.batch_size]
            features, mask = self._features(batch)
            sequences, times = self._generate(features, mask, language)
            for k, ids in enumerate(sequences):
                a, b = spans[lo + k]
                out.extend(
                    self._window_transcripts(
                        ids, times[k] if times else None, (b - a) / WHISPER_RATE, a / WHISPER_RATE, language
                    )
                )
        return out
