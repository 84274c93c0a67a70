import numpy as np
import pytest
import soundfile as sf

from vcritic.protocols import ASR, Annotator, Embedder, Judge, JudgeScore, Separator, Transcript
from vcritic.testing import FakeAnnotator, FakeASR, FakeEmbedder, FakeJudge, FakeSeparator, sine, write_wav


@pytest.mark.parametrize(
    ("fake", "protocol"),
    [
        (FakeASR([]), ASR),
        (FakeSeparator(), Separator),
        (FakeJudge(0.3), Judge),
        (FakeAnnotator(), Annotator),
        (FakeEmbedder(8), Embedder),
    ],
)
def test_fake_satisfies_protocol(fake, protocol):
    assert isinstance(fake, protocol)


def test_fake_is_not_every_protocol():
    # runtime_checkable only checks method names, so make sure the check can fail at all
    assert not isinstance(FakeSeparator(), ASR)
    assert not isinstance(FakeASR(), Judge)


def test_sine_and_write_wav_round_trip(tmp_path):
    tone = sine(440.0, 0.5, 8000, amplitude=0.25)
    assert tone.dtype == np.float32 and tone.shape == (4000,)
    assert abs(float(np.abs(tone).max()) - 0.25) < 1e-3
    path = write_wav(str(tmp_path / "sub" / "tone.wav"), tone, 8000)
    back, sr = sf.read(path, dtype="float32")
    assert sr == 8000
    np.testing.assert_allclose(back, tone, atol=1e-4)


def test_fake_behaviour():
    t = Transcript("hi there", 1.0, 2.0)
    asr = FakeASR([t])
    assert asr.transcribe(np.zeros(160, np.float32), 16000) == [t]
    assert asr.calls == [(160, 16000)]
    out = FakeSeparator(0.25).separate(np.ones(4, np.float32), 16000)
    assert out.dtype == np.float32 and np.allclose(out, 0.25)
    assert FakeJudge(0.4).score("a", "b", "c").weighted() == pytest.approx(0.4)
    fixed = JudgeScore(1.0, 0.0, 0.5)
    assert FakeJudge(fixed).score("a", "b", "c") is fixed
    text = FakeAnnotator("{persona}|{context}|{seconds:.1f}").annotate(
        np.zeros(8000, np.float32), 16000, "ctx", "p"
    )
    assert text == "p|ctx|0.5"


def test_fake_embedder_is_deterministic_and_unit_norm():
    emb = FakeEmbedder(32)
    clips = [sine(220, 0.1), sine(330, 0.1), sine(220, 0.1)]
    texts = ["a", "a", "a"]
    first = emb.embed(clips, texts, 16000)
    again = FakeEmbedder(32).embed(clips, texts, 16000)
    assert first.shape == (3, 32) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[0], first[2])  # same audio and text
    assert abs(float(first[0] @ first[1])) < 0.9  # different audio
    other_text = emb.embed([clips[0]], ["b"], 16000)[0]
    assert not np.allclose(other_text, first[0])
    with pytest.raises(ValueError, match="2 clips but 1 texts"):
        emb.embed(clips[:2], ["a"], 16000)
