"""MelKMeansTokenizer: shapes, determinism, persistence, errors, and a pitch round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from plugins.dsp.mel_kmeans import MelKMeansTokenizer
from vcritic.protocols import AudioTokenizer

SR = 16000


def tone(freq: float, seconds: float = 2.0, amp: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# Sines on a whole-tone grid from A3 to A5: enough frames for a 64-entry codebook.
TRAIN = [tone(220.0 * 2 ** (k / 6)) for k in range(13)]


@pytest.fixture(scope="module")
def fitted() -> MelKMeansTokenizer:
    tok = MelKMeansTokenizer(codebook_size=64, griffin_lim_iters=16)
    tok.fit(TRAIN)
    return tok


def test_satisfies_protocol_and_attributes() -> None:
    tok = MelKMeansTokenizer()
    assert isinstance(tok, AudioTokenizer)
    assert (tok.sample_rate, tok.frame_rate, tok.vocab_size, tok.hop_length) == (16000, 12.5, 128, 1280)


def test_encode_decode_shapes_and_dtypes(fitted: MelKMeansTokenizer) -> None:
    ids = fitted.encode(tone(330.0, seconds=4.0))
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert abs(ids.size - 50) <= 1  # 4 s at 12.5 ids/s
    assert ids.min() >= 0 and ids.max() < fitted.vocab_size
    audio = fitted.decode(ids)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size == ids.size * fitted.hop_length
    assert np.all(np.isfinite(audio)) and np.max(np.abs(audio)) <= 1.0
    assert fitted.decode(np.zeros(0, dtype=np.int64)).size == 0


def test_same_seed_same_codebook_other_seed_differs() -> None:
    first, second, other = (MelKMeansTokenizer(codebook_size=32, seed=s) for s in (3, 3, 4))
    for tok in (first, second, other):
        tok.fit(TRAIN)
    assert np.array_equal(first.codebook, second.codebook)
    assert not np.array_equal(first.codebook, other.codebook)
    clip = tone(400.0)
    assert np.array_equal(first.encode(clip), second.encode(clip))


def test_save_load_roundtrip_gives_identical_ids(fitted: MelKMeansTokenizer, tmp_path) -> None:
    fitted.save(str(tmp_path))
    assert json.loads((tmp_path / "tokenizer.json").read_text())["codebook_size"] == 64
    clip = tone(300.0) + 0.01 * np.random.default_rng(0).standard_normal(2 * SR).astype(np.float32)
    restored = MelKMeansTokenizer()  # default options: load replaces them with the saved ones
    restored.load(str(tmp_path))
    assert restored.vocab_size == 64
    assert np.array_equal(restored.encode(clip), fitted.encode(clip))
    assert np.array_equal(MelKMeansTokenizer.from_directory(str(tmp_path)).encode(clip), fitted.encode(clip))


def test_load_rejects_codebook_that_does_not_match_options(fitted: MelKMeansTokenizer, tmp_path) -> None:
    fitted.save(str(tmp_path))
    np.save(tmp_path / "codebook.npy", np.zeros((64, 10), dtype=np.float32))
    tok = MelKMeansTokenizer()
    with pytest.raises(ValueError, match="shape"):
        tok.load(str(tmp_path))
    assert tok.codebook is None and tok.vocab_size == 128  # a failed load leaves the instance alone
    with pytest.raises(FileNotFoundError):
        tok.load(str(tmp_path / "missing"))


def test_use_before_fit_is_a_clear_error(tmp_path) -> None:
    tok = MelKMeansTokenizer()
    with pytest.raises(RuntimeError, match="fit"):
        tok.encode(tone(440.0))
    with pytest.raises(RuntimeError, match="fit"):
        tok.decode(np.array([1, 2], dtype=np.int64))
    with pytest.raises(RuntimeError, match="fit"):
        tok.save(str(tmp_path))


def test_bad_options_and_inputs(fitted: MelKMeansTokenizer) -> None:
    with pytest.raises(ValueError, match="16000.*12.3"):
        MelKMeansTokenizer(frame_rate=12.3)
    with pytest.raises(ValueError, match="at least codebook_size=128"):
        MelKMeansTokenizer().fit([tone(440.0, seconds=1.0)])
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        fitted.decode(np.array([0, 64]))
    with pytest.raises(ValueError, match="mono"):
        fitted.encode(np.zeros((2, SR), dtype=np.float32))


def test_decoded_sine_keeps_its_pitch(fitted: MelKMeansTokenizer) -> None:
    freq = 500.0  # between grid tones: quantisation picks a neighbour at most a semitone away
    audio = fitted.decode(fitted.encode(tone(freq, seconds=2.0)))
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    peak = np.fft.rfftfreq(audio.size, 1 / SR)[np.argmax(spectrum)]
    assert abs(12 * np.log2(peak / freq)) <= 1.0, f"peak at {peak:.1f} Hz for a {freq} Hz sine"
    assert np.array_equal(audio, fitted.decode(fitted.encode(tone(freq, seconds=2.0))))  # seeded Griffin-Lim
