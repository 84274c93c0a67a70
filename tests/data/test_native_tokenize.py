"""The tokenize stage for a backbone that hears natively (Qwen2.5-Omni's thinker)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from plugins.dsp.mel_kmeans import MelKMeansTokenizer
from vcritic.data import stages
from vcritic.testing.dummies import sine, write_wav


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vcritic.testing.tiny_qwen_omni import write_tiny_qwen_omni_checkpoint

    root = tmp_path_factory.mktemp("native")
    ckpt = write_tiny_qwen_omni_checkpoint(root / "qwen")
    tok = MelKMeansTokenizer(codebook_size=8)
    tok.fit([sine(220.0, 2.0), sine(440.0, 2.0)])
    tok.save(str(root / "atok"))
    rows = []
    for i, seconds in enumerate((1.0, 3.0)):
        rows.append({"example_id": f"e{i}", "song_id": f"s{i}", "source": "mllm", "persona": "A coach.",
                     "context": "A ballad.", "target_text": "warm and steady",
                     "audio_path": write_wav(str(root / f"clip{i}.wav"), sine(330.0, seconds)),
                     "offset_s": 0.0, "duration_s": float("nan"), "target_audio_path": "", "target_offset_s": 0.0,
                     "target_duration_s": float("nan"), "facts": "", "language": "en"})
    spec = {"name": "qwen2_5_omni_thinker", "options": {"path": str(ckpt), "dtype": "float32", "max_audio_seconds": 2.0}}
    out = stages.tokenize(pd.DataFrame(rows), str(ckpt), {"name": "mel_kmeans", "options": {"codebook_size": 8}},
                          str(root / "atok"), spec, 128)
    return out, ckpt


def test_music_becomes_the_backbones_own_features_and_placeholders(setup):
    from plugins.hf.qwen_omni_hearing import audio_tokens_for
    from vcritic.models.build import text_tokenizer

    out, ckpt = setup
    assert "error" not in out.columns, out["error"].tolist()  # a failed row would carry its reason
    tok = text_tokenizer(ckpt)
    first = out.iloc[0]
    assert first["native_frames"] > 0 and len(first["native_features"]) == first["native_frames"] * 128
    assert first["music_positions"] == audio_tokens_for(first["native_frames"]) == 25  # 1 s at 25 tokens/s
    assert len(first["music_tokens"]) == 0 and len(first["music_features"]) == 0
    assert tok.convert_ids_to_tokens(int(first["prompt_ids"][-1])) == "<|audio_bos|>"
    assert tok.convert_ids_to_tokens(int(first["prompt_tail_ids"][0])) == "<|audio_eos|>"
    text = tok.decode(list(first["prompt_ids"]) + list(first["prompt_tail_ids"]))
    assert "A coach." in text and "A ballad." in text and "<|im_start|>assistant" in text


def test_a_clip_over_the_models_limit_is_cut_and_the_cut_recorded(setup):
    out, _ = setup
    short, long = out.iloc[0], out.iloc[1]
    assert short["music_cut_s"] == 0.0
    assert long["music_cut_s"] == pytest.approx(1.0)
    assert long["music_positions"] == 50  # the 2 s the model takes
    assert np.isfinite(np.asarray(long["native_features"])).all()
