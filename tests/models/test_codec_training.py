"""A critic trains with each real codec as its audio tokenizer: music in through vcritic's music
encoder (the codec's ids and latents), speech out as Q codebooks in the delay pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vcritic import registry
from vcritic.data.stages import music_columns
from vcritic.models import build
from vcritic.models.sequence import build_streams, collate
from vcritic.testing.tiny_codecs import TINY_WRITERS


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("codec", sorted(TINY_WRITERS))
def test_a_train_step_with_a_real_codec_lowers_every_codebook_loss(codec, spec, tmp_path):
    from vcritic.models.joint import masked_ce
    from vcritic.models.sequence import vcritic_prompt

    options = {"num_codebooks": 4} if codec == "mimi" else {}  # the tiny Mimi has 4 of the release's 32
    tok = registry.create("audio_tokenizers", codec, path=str(TINY_WRITERS[codec](tmp_path / codec)), **options)
    q, rate = tok.num_codebooks, tok.sample_rate
    torch.manual_seed(0)
    model_cfg = dict(audio_head_layers=1, loss_lambda=2 / 3, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                     train_text_head=True, max_prompt_tokens=64, codebook_weights=[4.0] + [1.0] * (q - 1))
    critic, text_tok = build.build_critic(spec, model_cfg, tok.codebook_size, tok.feature_dim, num_codebooks=q)
    v = critic.vocab
    examples = []
    for freq in (220.0, 440.0):
        cols = music_columns(tone(freq, 0.6, rate), None, tok)
        frames = np.asarray(cols["music_features"], np.float32).reshape(-1, tok.feature_dim)
        speech = tok.encode(tone(freq * 0.5, 0.3, rate))
        assert speech.shape[1] == q
        examples.append(build_streams(v, vcritic_prompt(text_tok, v, "a coach.", "", 64), cols["music_positions"],
                                      cols["music_tokens"], text_tok(" a bright tone.")["input_ids"], speech,
                                      music_features=frames))
    batch = collate(examples, v)
    opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=1e-2)
    first = critic(**batch)
    for _ in range(10):
        out = critic(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert first.audio_logits.shape[2:] == (q, tok.codebook_size + 3)
    for c in range(q):
        before = masked_ce(first.audio_logits[:, :, c], batch["audio_labels"][:, :, c])[0]
        after = masked_ce(out.audio_logits[:, :, c], batch["audio_labels"][:, :, c])[0]
        assert after < before, (codec, c)
