"""The ``audiosep`` separator: its messages when AudioSep is missing, and its calls into AudioSep.

AudioSep cannot be installed here (no package, checkpoints of ~3.6 GB), so the call path is
tested against a stand-in: a folder laid out like the AudioSep checkout, whose ``pipeline.py``
has AudioSep's ``build_audiosep(config_yaml, checkpoint_path, device)`` signature and returns an
object with the same ``query_encoder.get_query_embed`` / ``ss_model(...)`` /
``ss_model.chunk_inference`` members. It is a test double written for this test, not AudioSep
code: it scales the mixture by a gain derived from the query and records how it was called.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from plugins.separation.audiosep import AUDIOSEP_RATE, CLAP_RELATIVE, AudioSepSeparator
from vcritic import registry
from vcritic.protocols import Separator

SR = 16000

STAND_IN = textwrap.dedent(
    '''
    """Test double with AudioSep's pipeline signatures (not AudioSep)."""
    import os
    from pathlib import Path

    import numpy as np
    import torch

    CALLS = []


    class QueryEncoder:
        def get_query_embed(self, modality, audio=None, text=None, use_text_ratio=0.5, device=None):
            CALLS.append(("embed", modality, tuple(text), str(device)))
            return torch.full((1, 512), 0.5 if text == ["music"] else 0.25)


    class SsModel(torch.nn.Module):
        def forward(self, input_dict):
            CALLS.append(("forward", tuple(input_dict["mixture"].shape)))
            return {"waveform": input_dict["mixture"] * input_dict["condition"][0, 0]}

        def chunk_inference(self, input_dict):
            CALLS.append(("chunk", tuple(input_dict["mixture"].shape)))
            out = input_dict["mixture"] * input_dict["condition"][0, 0]
            return out[0].numpy()  # [1, samples], as AudioSep's chunk_inference returns


    class Model:
        query_encoder = QueryEncoder()
        ss_model = SsModel()


    def build_audiosep(config_yaml, checkpoint_path, device):
        # AudioSep's CLAP encoder opens this relative path, so the working directory matters.
        assert Path("checkpoint/music_speech_audioset_epoch_15_esc_89.98.pt").is_file(), os.getcwd()
        CALLS.append(("build", Path(config_yaml).name, Path(checkpoint_path).name, str(device)))
        return Model()
    '''
)


@pytest.fixture()
def audiosep_dir(tmp_path: Path):
    code = tmp_path / "AudioSep"
    (code / "models").mkdir(parents=True)
    (code / "models" / "__init__.py").write_text("")
    (code / "pipeline.py").write_text(STAND_IN)
    (code / "config").mkdir()
    (code / "config" / "audiosep_base.yaml").write_text("model: {}\n")
    (code / "checkpoint").mkdir()
    (code / "checkpoint" / "audiosep_base_4M_steps.ckpt").write_bytes(b"stand-in")
    (code / CLAP_RELATIVE).write_bytes(b"stand-in")
    yield code
    for name in ("pipeline", "models"):  # the stand-in's generic names must not leak into other tests
        sys.modules.pop(name, None)
    sys.path[:] = [p for p in sys.path if p != str(code)]


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def test_registered_and_satisfies_the_protocol(tmp_path) -> None:
    sep = registry.create("separators", "audiosep", code_dir=str(tmp_path), checkpoint="x.ckpt")
    assert isinstance(sep, Separator) and isinstance(sep, AudioSepSeparator)


def test_missing_code_or_checkpoints_name_what_to_get(tmp_path, audiosep_dir) -> None:
    with pytest.raises(ValueError, match="code_dir.*clone the Audio-AGI/AudioSep"):
        AudioSepSeparator(code_dir="", checkpoint="x.ckpt")
    with pytest.raises(ValueError, match="checkpoint.*download"):
        AudioSepSeparator(code_dir=str(audiosep_dir), checkpoint="")
    with pytest.raises(FileNotFoundError, match="no AudioSep code.*pipeline.py.*clone"):
        AudioSepSeparator(code_dir=str(tmp_path / "empty"), checkpoint="x.ckpt").separate(tone(0.1), SR)
    with pytest.raises(FileNotFoundError, match="AudioSep `checkpoint`.*missing.ckpt.*download"):
        AudioSepSeparator(code_dir=str(audiosep_dir), checkpoint="checkpoint/missing.ckpt").separate(
            tone(0.1), SR
        )
    (audiosep_dir / CLAP_RELATIVE).unlink()
    with pytest.raises(FileNotFoundError, match="CLAP checkpoint.*music_speech_audioset"):
        AudioSepSeparator(
            code_dir=str(audiosep_dir), checkpoint="checkpoint/audiosep_base_4M_steps.ckpt"
        ).paths()


def test_calls_audiosep_pipeline_as_its_inference_does(audiosep_dir, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # the plugin, not the caller, must provide AudioSep's working directory
    sep = AudioSepSeparator(
        code_dir=str(audiosep_dir), checkpoint="checkpoint/audiosep_base_4M_steps.ckpt", device="cpu"
    )
    short = tone(1.0)
    out = sep.separate(short, SR)
    assert out.dtype == np.float32 and out.shape == short.shape
    # The stand-in keeps 0.5 x the mixture for "music"; resampling 16 -> 32 -> 16 kHz is near-lossless.
    np.testing.assert_allclose(out[200:-200], 0.5 * short[200:-200], atol=2e-3)
    long = tone(6.0)
    assert sep.separate(long, SR).shape == long.shape
    calls = sys.modules["pipeline"].CALLS
    assert calls[0] == ("build", "audiosep_base.yaml", "audiosep_base_4M_steps.ckpt", "cpu")
    assert calls[1] == ("embed", "text", ("music",), "cpu")  # once: the query embedding is cached
    assert calls[2] == ("forward", (1, 1, AUDIOSEP_RATE))  # a 1 s clip: one forward pass at 32 kHz
    assert calls[3] == ("chunk", (1, 1, 6 * AUDIOSEP_RATE))  # over 5 s: AudioSep's chunked inference
    assert len(calls) == 4
    assert Path.cwd() == tmp_path


def test_a_clashing_module_name_is_an_error(audiosep_dir, monkeypatch, tmp_path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "pipeline.py").write_text("")
    monkeypatch.syspath_prepend(str(other))
    import pipeline  # noqa: F401  (another project's module with the same name)

    sep = AudioSepSeparator(code_dir=str(audiosep_dir), checkpoint="checkpoint/audiosep_base_4M_steps.ckpt")
    with pytest.raises(ImportError, match="different module named 'pipeline'"):
        sep.separate(tone(0.1), SR)
