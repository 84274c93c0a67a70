"""Curation filters: each rejects what it is for, names itself and the measured value, and
leaves ordinary rows alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vcritic.config import ConfigError, load, to_dict
from vcritic.data import filters, stages
from vcritic.testing.dummies import write_wav

SR = 16000
EN = "The melody climbs to the fourth and comes home; the flute tone is warm, the pulse steady."
ZH = "这首歌的旋律很优美，但是高音部分有点跑调，节奏也不太稳定，希望歌手再练习一下。"


def tone(seconds: float = 2.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def settings():
    return filters.defaults()


def _text(settings, text, language="en", lo=1, hi=5000):
    return filters.check_text(text, language, settings, lo, hi)


def test_text_filters_pass_ordinary_critiques_in_english_and_chinese(settings):
    assert _text(settings, EN) is None
    assert _text(settings, ZH, "zh-CN") is None
    assert len(filters.tokens(ZH)) > 30  # CJK characters count as words


def test_repetition_catches_a_loop(settings):
    loop = "the high notes are flat " * 12
    got = _text(settings, loop)
    assert got.filter == "repetition" and "over data.filters.repetition.max_fraction=0.4" in got.detail
    assert filters.repeated_ngram_share(filters.tokens(EN), 3) == 0.0


def test_language_mismatch_and_allowed_list(settings):
    got = _text(settings, ZH, "en")
    assert got.filter == "language" and "'zh'" in got.detail and "'en'" in got.detail
    only_en = {**settings, "language": {**settings["language"], "allowed": ["en"], "match_tag": False}}
    assert _text(only_en, ZH, "zh").filter == "language"
    assert _text(only_en, EN, "zh") is None
    assert _text(settings, "好听", "en") is None  # too short to judge


def test_text_length_uses_the_old_keys(settings):
    got = _text(settings, "one two", lo=3)
    assert got.filter == "text_length" and got.reason().endswith("2 words, under data.min_critique_words=3")
    off = {**settings, "text_length": {"enabled": False}}
    assert _text(off, "one two", lo=3) is None


def _audio(settings, music, speech=None, source="mllm"):
    return filters.check_audio(music, speech, source, SR, settings, 1.0, 30.0, 10.0)


def test_audio_filters(settings):
    assert _audio(settings, tone()) is None
    assert _audio(settings, tone(0.5)).filter == "duration"
    assert _audio(settings, tone(amp=1e-4)).filter == "silence"
    mostly_quiet = tone(4.0)
    mostly_quiet[: int(3.8 * SR)] = 0.0
    got = _audio(settings, mostly_quiet)
    assert got.filter == "silence" and "mostly silent" in got.detail
    clipped = np.clip(tone(amp=3.0), -1.0, 1.0)
    got = _audio(settings, clipped)
    assert got.filter == "clipping" and "data.filters.clipping.max_fraction=0.01" in got.detail
    assert _audio(settings, tone(), speech=tone(12.0)).filter == "duration"


def test_speech_filter_drops_a_wordless_human_reaction(settings):
    pytest.importorskip("silero_vad")
    on = {**settings, "speech": {**settings["speech"], "enabled": True}}
    got = _audio(on, tone(), speech=tone(2.0), source="human")
    assert got.filter == "speech" and "silero-vad" in got.detail
    assert _audio(on, tone(), speech=tone(2.0), source="mllm") is None  # only human reactions


def test_validate_quarantines_with_the_filter_name_and_counts(tmp_path, settings):
    good, loud = tmp_path / "good.wav", tmp_path / "loud.wav"
    write_wav(good, tone(), SR)
    write_wav(loud, np.clip(tone(amp=3.0), -1, 1), SR)
    base = {"song_id": "s", "source": "mllm", "persona": "p", "target_text": EN, "audio_path": str(good)}
    batch = pd.DataFrame([{**base, "example_id": "ok"}, {**base, "example_id": "loud", "audio_path": str(loud)},
                          {**base, "example_id": "loop", "target_text": "so good " * 20},
                          {**base, "example_id": "zh", "target_text": ZH}])
    out = stages.validate(batch, SR, 1.0, 30.0, 10.0, filter_settings=settings)
    errors = dict(zip(out["example_id"], out["error"], strict=True))
    assert errors["ok"] == ""
    assert "filter clipping:" in errors["loud"] and "filter repetition:" in errors["loop"]
    assert "filter language:" in errors["zh"]
    counts = filters.count_filtered(out["error"])
    assert counts["filtered_clipping"] == counts["filtered_repetition"] == counts["filtered_language"] == 1
    assert set(counts) == {f"filtered_{n}" for n in filters.NAMES}


def test_config_keys_and_errors():
    cfg = load("demo", ["data.filters.clipping.max_fraction=0.05", "data.filters.language.allowed=[en,zh]"])
    assert to_dict(cfg.data.filters)["language"]["allowed"] == ["en", "zh"]
    with pytest.raises(ConfigError, match="data.filters.silence.max_silent_fraction"):
        load("demo", ["data.filters.silence.max_silent_fraction=2"])
    with pytest.raises(ConfigError, match="data.dedup.device"):
        load("demo", ["data.dedup.device=tpu"])
