"""Rule filters of the curation step: cheap checks that quarantine rows no critic should learn from.

Validation (``stages.validate``) runs them on each row it has parsed and decoded, so no clip is
read twice. Each filter has its own ``data.filters.<name>`` settings (``enabled`` plus its
thresholds); a rejected row's quarantine reason starts ``filter <name>:`` and states the measured
value against the threshold, which is also how :func:`count_filtered` tallies rejections per filter
for ``prepared.counts["filtered_<name>"]``.

The filters, in the order they run (the first that rejects a row names it):

* ``text_length``: critique words outside ``data.min/max_critique_words`` (a CJK character counts
  as a word, since those scripts put no spaces between words);
* ``repetition``: share of repeated word n-grams, the mark of an LLM stuck in a loop;
* ``language``: the critique's detected language differs from the row's ``language`` tag, or is
  not in an allowed list (py3langid: a small naive-Bayes model bundled in the wheel, offline);
* ``duration``: music outside ``data.min/max_clip_seconds``, spoken critique over
  ``data.max_target_audio_seconds``;
* ``silence``: music whose RMS level is below a dBFS floor, or mostly silent frames;
* ``clipping``: share of music samples at full scale (a clipped, distorted recording);
* ``speech``: a ``human`` row whose spoken critique has no speech by silero-vad (a reaction
  recording of only music or noise). Needs the ``speech`` extra; without it the filter is skipped
  and the reason is logged once per process.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NAMES = ("text_length", "repetition", "language", "duration", "silence", "clipping", "speech")
"""Every filter, in the order they run; ``counts["filtered_<name>"]`` has one entry per name."""

_PREFIX = re.compile(r"\bfilter (\w+): ")
# One token per CJK ideograph / kana / hangul syllable, else one per whitespace-free run.
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\s\u3040-\u30ff"
                    r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u3000-\u303f\uff00-\uffef]+")


@dataclass(frozen=True)
class Rejection:
    """Why a filter rejected a row."""

    filter: str
    detail: str

    def reason(self) -> str:
        return f"filter {self.filter}: {self.detail}"


def defaults() -> dict[str, Any]:
    """The ``data.filters`` settings of the config schema, as a plain dict."""
    from omegaconf import OmegaConf

    from vcritic.config import FiltersConfig, to_dict

    return to_dict(OmegaConf.structured(FiltersConfig))


def tokens(text: str) -> list[str]:
    """Words of ``text``, lower-cased; each CJK character is a word of its own."""
    return _TOKEN.findall(text.lower())


def repeated_ngram_share(words: list[str], n: int) -> float:
    """Share of the word n-grams that repeat an earlier n-gram of the same text (0: none repeat)."""
    grams = [tuple(words[k : k + n]) for k in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


@functools.lru_cache(maxsize=1)
def _language_identifier():
    """py3langid's bundled model with probabilities normalised, once per process (~1 s to load)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def detect_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of ``text``'s language."""
    lang, prob = _language_identifier().classify(text)
    return str(lang), float(prob)


def _primary(tag: str) -> str:
    """The language subtag of a BCP-47 tag: ``zh-Hans-CN`` -> ``zh``, ``en_US`` -> ``en``."""
    return re.split(r"[-_]", tag.strip().lower(), maxsplit=1)[0]


def check_text(text: str, language: str, settings: dict[str, Any], min_words: int, max_words: int) -> Rejection | None:
    """The text filters (length, repetition, language) on a critique; None when it passes.

    Args:
        settings: ``data.filters`` as a dict (:func:`defaults` fills missing filters).
        min_words, max_words: ``data.min_critique_words`` / ``data.max_critique_words``.
    """
    words = tokens(text)
    if settings["text_length"]["enabled"] and not min_words <= len(words) <= max_words:
        bound = f"under data.min_critique_words={min_words}" if len(words) < min_words else \
            f"over data.max_critique_words={max_words}"
        return Rejection("text_length", f"target_text has {len(words)} words, {bound}")
    rep = settings["repetition"]
    if rep["enabled"] and len(words) - rep["n"] + 1 >= rep["min_ngrams"]:
        share = repeated_ngram_share(words, int(rep["n"]))
        if share > rep["max_fraction"]:
            return Rejection("repetition", f"{share:.2f} of the word {rep['n']}-grams of target_text are repeats, "
                                           f"over data.filters.repetition.max_fraction={rep['max_fraction']}")
    lang = settings["language"]
    if lang["enabled"] and len(text.strip()) >= lang["min_chars"]:
        found, prob = detect_language(text)
        allowed = [_primary(a) for a in lang["allowed"]]
        if prob >= lang["min_confidence"]:
            if lang["match_tag"] and found != _primary(language):
                return Rejection("language", f"target_text reads as {found!r} (p={prob:.2f} >= "
                                             f"data.filters.language.min_confidence={lang['min_confidence']}) but the "
                                             f"row's language is {language!r}")
            if allowed and found not in allowed:
                return Rejection("language", f"target_text reads as {found!r} (p={prob:.2f}), not in "
                                             f"data.filters.language.allowed={list(lang['allowed'])}")
    return None


def dbfs(x: np.ndarray) -> float:
    """RMS level in dB relative to full scale (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def silent_frame_share(x: np.ndarray, sample_rate: int, frame_ms: float, floor_dbfs: float) -> float:
    """Share of ``frame_ms`` frames whose RMS level is below ``floor_dbfs``."""
    size = max(1, int(round(sample_rate * frame_ms / 1000.0)))
    frames = x[: (x.size // size) * size].reshape(-1, size) if x.size >= size else x.reshape(1, -1)
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
    return float(np.mean(rms < 10.0 ** (floor_dbfs / 20.0)))


def check_audio(music: np.ndarray, speech: np.ndarray | None, source: str, sample_rate: int,
                settings: dict[str, Any], min_s: float, max_s: float, max_target_s: float) -> Rejection | None:
    """The audio filters on decoded mono clips; None when the row passes.

    Args:
        music, speech: the decoded music and spoken critique (None: the row has none).
        min_s, max_s, max_target_s: ``data.min/max_clip_seconds``, ``data.max_target_audio_seconds``.
    """
    seconds = music.size / sample_rate
    if settings["duration"]["enabled"]:
        if not min_s <= seconds <= max_s:
            return Rejection("duration", f"music is {seconds:.2f}s, outside [{min_s}, {max_s}]s "
                                         "(data.min_clip_seconds, data.max_clip_seconds)")
        if speech is not None and speech.size / sample_rate > max_target_s:
            return Rejection("duration", f"target audio is {speech.size / sample_rate:.2f}s, over {max_target_s}s "
                                         "(data.max_target_audio_seconds)")
    sil = settings["silence"]
    if sil["enabled"]:
        level = dbfs(music)
        if level < sil["min_dbfs"]:
            return Rejection("silence", f"music is silent: RMS {level:.1f} dBFS, under "
                                        f"data.filters.silence.min_dbfs={sil['min_dbfs']}")
        share = silent_frame_share(music, sample_rate, sil["frame_ms"], sil["min_dbfs"])
        if share > sil["max_silent_fraction"]:
            return Rejection("silence", f"music is mostly silent: {share:.2f} of its {sil['frame_ms']:g} ms frames "
                                        f"are under {sil['min_dbfs']} dBFS, over "
                                        f"data.filters.silence.max_silent_fraction={sil['max_silent_fraction']}")
    clip = settings["clipping"]
    if clip["enabled"]:
        share = float(np.mean(np.abs(music) >= clip["level"]))
        if share > clip["max_fraction"]:
            return Rejection("clipping", f"{share:.4f} of the music samples are at |x| >= {clip['level']}, over "
                                         f"data.filters.clipping.max_fraction={clip['max_fraction']}")
    sp = settings["speech"]
    if sp["enabled"] and source == "human" and speech is not None:
        talked = speech_seconds(speech, sample_rate, float(sp["threshold"]))
        if talked is not None and talked < sp["min_speech_seconds"]:
            return Rejection("speech", f"the human reaction has {talked:.2f}s of speech by silero-vad, under "
                                       f"data.filters.speech.min_speech_seconds={sp['min_speech_seconds']}")
    return None


@functools.lru_cache(maxsize=4)
def _vad(threshold: float):
    """silero-vad (through the ``vad_gate`` separator's loader), or None with a logged reason."""
    try:
        from plugins.speech.vad_gate import VadGateSeparator

        return VadGateSeparator(threshold=threshold, pad_ms=0.0)
    except ImportError as exc:
        log.warning("data.filters.speech is enabled but silero-vad is unavailable (%s); the speech filter is "
                    "skipped: pip install -e '.[speech]'", exc)
        return None


def speech_seconds(speech: np.ndarray, sample_rate: int, threshold: float = 0.5) -> float | None:
    """Seconds of ``speech`` that silero-vad marks as speech; None when silero-vad is not installed."""
    vad = _vad(threshold)
    if vad is None:
        return None
    return float(sum(end - start for start, end in vad.speech_regions(speech, sample_rate)))


def count_filtered(errors: Iterable[str]) -> dict[str, int]:
    """``{"filtered_<name>": rows}`` for every filter (0 included), from quarantine reasons."""
    counts = {f"filtered_{name}": 0 for name in NAMES}
    for error in errors:
        match = _PREFIX.search(str(error))
        if match and match.group(1) in NAMES:
            counts[f"filtered_{match.group(1)}"] += 1
    return counts
