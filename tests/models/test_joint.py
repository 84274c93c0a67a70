"""The joint text/audio critic: stream layout, loss, gradients, export round trip."""

import pytest
import torch
import torch.nn.functional as F

from vcritic.models import build
from vcritic.models.sequence import IGNORE, build_streams, collate
from vcritic.protocols import PromptParts

FEAT = 6  # width of the continuous music frames
MODEL_CFG = dict(audio_head_layers=1, loss_lambda=2 / 3, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                 lora_target_modules=None, train_text_head=False, max_prompt_tokens=64, max_text_tokens=64,
                 max_audio_tokens=64)



def make(spec, num_codebooks=1, **overrides):
    torch.manual_seed(0)
    return build.build_critic(spec, {**MODEL_CFG, **overrides}, audio_codes=16, feature_dim=FEAT,
                              num_codebooks=num_codebooks)


def parts(v, ids):
    return PromptParts([*ids, v.music_start], [v.music_end], v.slot, v.end)


def codes(ids, q):
    """Frames [len(ids), q] whose codebook c holds (id + c) % 16."""
    return [[(i + c) % 16 for c in range(q)] for i in ids]


def batch(critic, tok):
    v, q = critic.vocab, critic.vocab.num_codebooks
    frames = torch.Generator().manual_seed(1)
    return collate([
        build_streams(v, parts(v, tok("Persona: a fan.")["input_ids"]), 3, codes([1, 2, 3], q),
                      tok(" it sits in G major.")["input_ids"], codes([4, 5], q),
                      music_features=torch.randn(3, FEAT, generator=frames).numpy()),
        build_streams(v, parts(v, tok("Persona: x")["input_ids"]), 4, codes([7, 7, 7, 7], q),
                      tok(" flute.")["input_ids"], codes([9, 9, 9], q),
                      music_features=torch.randn(4, FEAT, generator=frames).numpy()),
    ], v)


def test_music_frames_sit_on_the_music_span(spec):
    critic, tok = make(spec)
    b = batch(critic, tok)
    feats, mask = b["music_features"], b["music_mask"]
    assert feats.shape == (*b["text_ids"].shape, FEAT)
    assert torch.all(feats[~mask] == 0) and torch.all(feats[mask].abs().sum(-1) > 0)
    with pytest.raises(ValueError, match="one frame per music token"):
        build_streams(critic.vocab, parts(critic.vocab, [1]), 2, [1, 2], music_features=torch.zeros(3, FEAT).numpy())


def test_the_model_hears_the_frames(spec):
    """Changing only the continuous frames changes the text prediction."""
    critic, tok = make(spec)
    critic.eval()
    b = batch(critic, tok)
    base = critic(**b).text_logits
    b["music_features"] = b["music_features"] * 3 + 1
    assert not torch.allclose(critic(**b).text_logits, base)


def test_stream_layout(spec):
    critic, tok = make(spec)
    v = critic.vocab
    s = build_streams(v, parts(v, [10, 11]), 2, [1, 2], [20, 21], [3])
    assert len(s.text) == len(s.audio) == len(s.music) == len(s.text_labels) == len(s.audio_labels)
    assert s.text == [10, 11, v.music_start, v.audio_slot, v.audio_slot, v.music_end, 20, 21, v.eos,
                      v.speech_start, v.audio_slot]
    assert s.audio.shape == (11, 1)
    assert s.audio[3:5, 0].tolist() == [1, 2] and s.audio[9:, 0].tolist() == [v.audio_bos, 3]
    assert [t for t in s.text_labels if t != IGNORE] == [20, 21, v.eos]
    assert s.text_labels[5] == 20  # <|/music|> predicts the first critique token
    assert [a for a in s.audio_labels[:, 0] if a != IGNORE] == [3, v.audio_eos]
    assert s.music == [False, False, False, True, True, False, False, False, False, False, False]


def test_each_loss_is_averaged_over_its_own_tokens(spec):
    critic, tok = make(spec)
    b = batch(critic, tok)
    out = critic(**b)
    text_logits, audio_logits = critic.hidden_and_logits(b["text_ids"], b["audio_ids"], b["music_mask"],
                                                         b["attention_mask"], b["music_features"])
    text_ce = F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), b["text_labels"].reshape(-1), ignore_index=IGNORE)
    assert audio_logits.shape == (*b["text_ids"].shape, 1, 19)
    audio_ce = F.cross_entropy(audio_logits.reshape(-1, audio_logits.shape[-1]), b["audio_labels"].reshape(-1), ignore_index=IGNORE)
    assert torch.allclose(out.text_loss, text_ce) and torch.allclose(out.audio_loss, audio_ce)
    assert torch.allclose(out.loss, 2 / 3 * text_ce + 1 / 3 * audio_ce)
    assert int(out.audio_tokens) == (2 + 1) + (3 + 1)


def test_lambda_one_is_exactly_text_sft(spec):
    critic, tok = make(spec, loss_lambda=1.0)
    b = batch(critic, tok)
    out = critic(**b)
    # The plain causal LM on the same inputs gives the same loss: the audio side plays no part.
    embeds = critic.embed(b["text_ids"], b["audio_ids"], b["music_mask"], b["music_features"])
    logits = critic.trunk(inputs_embeds=embeds, attention_mask=b["attention_mask"]).logits
    plain = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["text_labels"].reshape(-1), ignore_index=IGNORE)
    assert torch.equal(out.loss, plain)
    out.loss.backward()
    # The speech output plays no part and does not train ...
    for name, module in critic.output_modules().items():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters()), name
    # ... but how the critic hears does: vcritic's music encoder trains at λ = 1 too.
    assert set(critic.input_modules()) == {"audio_embed", "music_encoder"}
    for name, module in critic.input_modules().items():
        assert all(p.requires_grad for p in module.parameters()), name
    assert critic.music_encoder.frame_proj.weight.grad.abs().sum() > 0
    assert critic.audio_embed.weight.grad.abs().sum() > 0


def test_music_encoder_learns_at_lambda_one(spec):
    """Text-only SFT moves the music encoder's weights (it was frozen at its random init before)."""
    critic, tok = make(spec, loss_lambda=1.0)
    b = batch(critic, tok)
    before = critic.music_encoder.frame_proj.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        critic(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(critic.music_encoder.frame_proj.weight, before)


def test_gradients_reach_lora_and_audio_branch_but_not_frozen_base(spec):
    critic, tok = make(spec)
    critic(**batch(critic, tok)).loss.backward()
    named = dict(critic.named_parameters())
    lora = [n for n in named if "lora_" in n]
    assert lora and all(named[n].grad is not None for n in lora if "lora_B" in n)
    assert all(p.grad is not None for p in critic.audio_head.parameters())
    assert all(p.grad is not None for p in critic.audio_branch.parameters())
    base = [n for n, p in named.items() if n.startswith("trunk") and "lora_" not in n]
    assert all(named[n].grad is None and not named[n].requires_grad for n in base)


def test_branch_starts_as_a_copy_of_the_top_layers(spec):
    critic, _ = make(spec)
    trunk_top = critic.backbone.decoder_layers(critic.trunk)[-1]
    # peft renames wrapped weights to "<module>.base_layer.weight"; LoRA factors are not in the copy.
    base = {n.replace(".base_layer", ""): p for n, p in trunk_top.named_parameters() if "lora_" not in n}
    branch = dict(critic.audio_branch[0].named_parameters())
    assert branch.keys() == base.keys()
    assert all(torch.equal(branch[n], base[n]) for n in branch)
    assert all(branch[n].data_ptr() != base[n].data_ptr() for n in branch)


def test_training_lowers_both_losses(spec):
    critic, tok = make(spec, train_text_head=True)
    b = batch(critic, tok)
    opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=1e-2)
    first = critic(**b)
    for _ in range(15):
        out = critic(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert out.text_loss < first.text_loss * 0.5 and out.audio_loss < first.audio_loss * 0.5


def test_export_round_trip(spec, tmp_path):
    critic, tok = make(spec)
    with torch.no_grad():
        critic.audio_head.weight.add_(0.5)  # make the heads distinguishable from a fresh init
    atok_dir = tmp_path / "atok"
    atok_dir.mkdir()
    (atok_dir / "marker.txt").write_text("x")
    out = build.save_export(critic, tok, spec, {"name": "mel_kmeans", "options": {}}, atok_dir, MODEL_CFG, tmp_path / "exp")
    assert (out / "base").is_dir() and (out / "adapter").is_dir() and (out / "heads.safetensors").exists()
    b = batch(critic, tok)
    critic.eval()
    expected = critic(**b).loss
    import json

    from vcritic.models.build import build_critic
    meta = json.loads((out / "critic.json").read_text())
    assert meta["backbone"]["options"]["path"] == "base"
    # load_export also loads the audio tokenizer; this checks the model half directly.
    spec2 = {"name": "causal_lm", "options": {**meta["backbone"]["options"], "path": str(out / "base")}}
    again, _ = build_critic(spec2, {**MODEL_CFG}, 16, FEAT, adapter_dir=out / "adapter")
    assert meta["num_codebooks"] == 1 and meta["format"] == build.EXPORT_FORMAT
    from safetensors.torch import load_file
    heads = load_file(str(out / "heads.safetensors"))
    for name, module in again.head_modules().items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(name + ".")})
    again.eval()
    assert torch.allclose(again(**b).loss, expected, atol=1e-6)


def test_audio_head_layers_out_of_range(spec):
    with pytest.raises(ValueError, match="audio_head_layers=5"):
        make(spec, audio_head_layers=5)


def test_several_codebooks_sum_embeddings_and_predict_in_the_delay_pattern(spec):
    critic, tok = make(spec, num_codebooks=3)
    v = critic.vocab
    s = build_streams(v, parts(v, [10]), 2, codes([1, 2], 3), [20], codes([4, 5], 3))
    # prompt + <|music|>, 2 music, <|/music|>, critique + end, then <|speech|> + (frames + Q - 1) positions.
    assert len(s.text) == 2 + 2 + 1 + 2 + (1 + 2 + 3 - 1)
    speech = s.audio_labels[-5:]
    p, e = IGNORE, v.audio_eos
    assert speech.tolist() == [[4, p, p], [5, 5, p], [e, 6, 6], [p, e, 7], [p, p, e]]
    assert s.audio[-5:].tolist() == [[v.audio_bos] * 3, [4, v.audio_pad, v.audio_pad], [5, 5, v.audio_pad],
                                     [e, 6, 6], [v.audio_pad, e, 7]]
    b = batch(critic, tok)
    assert b["audio_ids"].shape[-1] == 3 and critic.audio_head.out_features == 3 * v.audio_vocab_size
    # Changing one codebook's music id changes the embedding (ids of every codebook are summed).
    e1 = critic.embed_audio(b["audio_ids"])
    ids = b["audio_ids"].clone()
    ids[0, 3, 2] = (ids[0, 3, 2] + 1) % 16
    e2 = critic.embed_audio(ids)
    assert not torch.allclose(e1[0, 3], e2[0, 3]) and torch.equal(e1[0, 4:], e2[0, 4:])
    assert torch.all(critic.embed_audio(torch.full_like(ids, v.audio_pad)) == 0)


def test_codebook_weights_set_the_audio_loss(spec):
    from vcritic.models.joint import masked_ce

    critic, tok = make(spec, num_codebooks=3, codebook_weights=[6.0, 1.0, 1.0])
    b = batch(critic, tok)
    out = critic(**b)
    per = [masked_ce(out.audio_logits[:, :, q], b["audio_labels"][:, :, q])[0] for q in range(3)]
    torch.testing.assert_close(out.audio_loss, (6 * per[0] + per[1] + per[2]) / 8)
    torch.testing.assert_close(out.loss, 2 / 3 * out.text_loss + 1 / 3 * out.audio_loss)
    with pytest.raises(ValueError, match="one per codebook"):
        make(spec, num_codebooks=3, codebook_weights=[1.0, 1.0])


def test_training_with_several_codebooks_lowers_every_codebook_loss(spec):
    from vcritic.models.joint import masked_ce

    critic, tok = make(spec, num_codebooks=2, train_text_head=True)
    b = batch(critic, tok)
    opt = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=1e-2)
    first = critic(**b).audio_logits.detach()
    for _ in range(15):
        out = critic(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    for q in range(2):
        assert masked_ce(out.audio_logits[:, :, q], b["audio_labels"][:, :, q])[0] < \
            0.5 * masked_ce(first[:, :, q], b["audio_labels"][:, :, q])[0]
