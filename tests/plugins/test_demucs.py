"""The ``demucs`` separator on a tiny random HTDemucs saved in demucs' own checkpoint layout.

The weights are random, so these tests check plumbing (loading, stems, rates, lengths, that the
plugin calls ``demucs.apply.apply_model`` the way demucs' tools do), never separation quality.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("demucs", reason="needs the `separation` extra: pip install -e '.[separation]'")

from plugins.separation.demucs import DemucsSeparator, load_demucs  # noqa: E402
from vcritic import registry  # noqa: E402
from vcritic.protocols import Separator  # noqa: E402
from vcritic.testing.tiny_demucs import SOURCES, TINY_HTDEMUCS, write_tiny_demucs  # noqa: E402

SR = 16000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_demucs(tmp_path_factory.mktemp("demucs") / "tiny.th")


def clip(seconds: float = 1.5, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).normal(0, 0.05, t.size)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + noise).astype(np.float32)


def reference_music(model, audio: np.ndarray, keep: list[str]) -> np.ndarray:
    """The music as a user calling demucs directly would compute it (no plugin code)."""
    import soxr
    import torch
    from demucs.apply import apply_model

    wav = torch.from_numpy(soxr.resample(audio, SR, model.samplerate).astype(np.float32))
    wav = wav[None].repeat(model.audio_channels, 1)
    ref = wav.mean(0)
    with torch.no_grad():
        out = apply_model(model, ((wav - ref.mean()) / ref.std())[None], shifts=0, split=True, overlap=0.25)[
            0
        ]
    out = out * ref.std() + ref.mean()
    music = sum(out[model.sources.index(s)] for s in keep).mean(0).numpy()
    back = soxr.resample(music, model.samplerate, SR)
    fixed = np.zeros(audio.size, np.float32)
    fixed[: min(audio.size, back.size)] = back[: audio.size]
    return np.clip(fixed, -1, 1)


def test_registered_and_satisfies_the_protocol(checkpoint) -> None:
    sep = registry.create("separators", "demucs", checkpoint=str(checkpoint))
    assert isinstance(sep, Separator) and isinstance(sep, DemucsSeparator)


def test_output_shape_rate_and_parity_with_apply_model(checkpoint) -> None:
    keep = ["drums", "bass", "other"]
    sep = DemucsSeparator(str(checkpoint), keep=keep, gate=[], device="cpu")
    audio = clip()
    out = sep.separate(audio, SR)
    assert out.dtype == np.float32 and out.shape == audio.shape and np.all(np.isfinite(out))
    assert sep.model.samplerate == TINY_HTDEMUCS["samplerate"] != SR  # resampled both ways
    np.testing.assert_allclose(out, reference_music(load_demucs(checkpoint), audio, keep), atol=1e-5)
    # The stems of one call add up to what separate() returned for the kept ones.
    stems = sep.stems(audio, SR)
    assert sorted(stems) == sorted(SOURCES)
    np.testing.assert_allclose(np.clip(sum(stems[s] for s in keep), -1, 1), out, atol=1e-5)


def test_loads_from_a_repo_folder_by_name_as_demucs_cli_does(checkpoint) -> None:
    folder_model = load_demucs(checkpoint.parent, "tiny")
    file_model = load_demucs(checkpoint)
    for (name, a), (_, b) in zip(
        folder_model.state_dict().items(), file_model.state_dict().items(), strict=True
    ):
        assert np.array_equal(a.numpy(), b.numpy()), name
    audio = clip(1.0, seed=1)
    by_folder = DemucsSeparator(str(checkpoint.parent), name="tiny", gate=[]).separate(audio, SR)
    by_file = DemucsSeparator(str(checkpoint), gate=[]).separate(audio, SR)
    np.testing.assert_array_equal(by_folder, by_file)


def test_the_vocal_stem_goes_through_the_speech_gate(checkpoint, monkeypatch) -> None:
    """With the default stems, ``vocals`` is gated (here by a stand-in gate that halves it)."""
    sep = DemucsSeparator(str(checkpoint))
    assert (sep.keep, sep.gate) == (["drums", "bass", "other"], ["vocals"])

    class HalfGate:
        def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
            return 0.5 * samples

    monkeypatch.setattr(sep, "_gate", HalfGate())
    audio = clip(1.0, seed=2)
    stems = sep.stems(audio, SR)
    expected = np.clip(stems["drums"] + stems["bass"] + stems["other"] + 0.5 * stems["vocals"], -1, 1)
    np.testing.assert_allclose(sep.separate(audio, SR), expected, atol=1e-5)


def test_clear_errors_for_bad_options_and_missing_files(tmp_path, checkpoint) -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        DemucsSeparator("")
    with pytest.raises(ValueError, match="both"):
        DemucsSeparator(str(checkpoint), keep=["vocals"], gate=["vocals"])
    with pytest.raises(ValueError, match="silence"):
        DemucsSeparator(str(checkpoint), keep=[], gate=[])
    with pytest.raises(ValueError, match="overlap"):
        DemucsSeparator(str(checkpoint), overlap=1.0)
    with pytest.raises(FileNotFoundError, match="does not exist.*local checkpoint"):
        DemucsSeparator(str(tmp_path / "nope.th")).separate(clip(0.2), SR)
    with pytest.raises(ValueError, match="`name` is required.*tiny"):
        load_demucs(checkpoint.parent)
    with pytest.raises(FileNotFoundError, match="no model 'htdemucs'.*tiny"):
        load_demucs(checkpoint.parent, "htdemucs")
    with pytest.raises(ValueError, match="not produced by.*drums"):
        DemucsSeparator(str(checkpoint), keep=["piano"], gate=[]).separate(clip(0.2), SR)
    with pytest.raises(ValueError, match="mono"):
        DemucsSeparator(str(checkpoint), gate=[]).separate(np.zeros((2, 100), np.float32), SR)


def test_the_data_stage_separates_with_it_by_name(checkpoint, tmp_path) -> None:
    """``data.separator={name: demucs, options: {...}}`` reaches the plugin through the data stage's curate step."""
    import pandas as pd
    import soundfile as sf

    from vcritic.data import stages

    audio = clip(1.0, seed=3)
    wav = tmp_path / "in.wav"
    sf.write(wav, audio, SR, subtype="FLOAT")
    row = {
        "example_id": "e1",
        "song_id": "s1",
        "source": "human",
        "audio_path": str(wav),
        "persona": "p",
        "target_text": "nice",
        "offset_s": 0.0,
        "duration_s": None,
    }
    spec = {"name": "demucs", "options": {"checkpoint": str(checkpoint), "gate": [], "device": "cpu"}}
    out = stages.curate(pd.DataFrame([row]), SR, checks={"min_s": 0.5, "max_s": 30.0, "max_target_s": 10.0},
                        embedder={"name": "logmel_hash"}, separator=spec, sources=["human"],
                        out_dir=str(tmp_path / "sep"))
    assert out.loc[0, "error"] == "", out.loc[0, "error"]
    written, sr = sf.read(out.loc[0, "audio_path"], dtype="float32")
    assert sr == SR and written.shape == audio.shape
    np.testing.assert_allclose(
        written, DemucsSeparator(str(checkpoint), gate=[]).separate(audio, SR), atol=1e-6
    )
