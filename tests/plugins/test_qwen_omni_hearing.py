"""Qwen2.5-Omni hearing: vcritic's inputs equal what Qwen2_5OmniProcessor + the thinker's forward build.

The reference is transformers' own ``Qwen2_5OmniProcessor`` (its audio + text path, unchanged) on a tiny
random checkpoint in the release's layout. The processor cannot be constructed as released without
torchvision (its video processor needs it), so ``vcritic.testing.tiny_qwen_omni.AudioOnlyProcessor``
declares only the feature extractor and the tokenizer; what it runs on audio and text is the released code.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from plugins.hf.qwen_omni import QwenOmniThinkerBackbone
from plugins.hf.qwen_omni_hearing import QwenOmniAudioEncoder, QwenOmniHearing, critic_conversation
from vcritic.protocols import NativeHearing
from vcritic.testing.tiny_qwen_omni import (
    MEDIA_TOKENS,
    SPECIAL_TOKENS,
    audio_processor,
    processor_inputs,
    write_tiny_qwen_omni_checkpoint,
)

SR = 16000
PERSONA = "A vocal coach who trained opera singers."
CONTEXTS = ["Song: Moon River, first verse.", "Song: a folk ballad; the singer is a beginner."]


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A sung-like test signal: a vibrato tone with harmonics and a little noise."""
    t = np.arange(int(round(seconds * SR))) / SR
    f0 = 220.0 * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    tone = sum(np.sin(k * phase) / k for k in (1, 2, 3))
    noise = np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * tone + 0.02 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_qwen_omni_checkpoint(tmp_path_factory.mktemp("qwen") / "Qwen2.5-Omni-tiny")


@pytest.fixture(scope="module")
def built(ckpt):
    backbone = QwenOmniThinkerBackbone(path=str(ckpt), dtype="float32")
    model, tokenizer = backbone.build()
    return backbone, model.eval(), tokenizer, backbone.native_hearing()


@pytest.fixture(scope="module")
def processor(ckpt):
    return audio_processor(ckpt)


def vcritic_batch(model, tokenizer, hearing, clips, contexts):
    """The critic's way: prompt parts + placeholders, right-padded; features zero-padded."""
    feats = [torch.from_numpy(hearing.features(c)) for c in clips]
    rows = []
    for f, context in zip(feats, contexts, strict=True):
        parts = hearing.prompt(tokenizer, PERSONA, context)
        rows.append(parts.before_music + [parts.slot_id] * hearing.num_audio_tokens(len(f)) + parts.after_music)
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    features = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    lengths = torch.tensor([len(f) for f in feats])
    return ids, mask, features, lengths, parts.slot_id


def vcritic_forward(model, hearing, ids, mask, features, lengths, slot):
    encoded = hearing.encoder(model)(features, lengths)
    text = model.get_input_embeddings()(ids)
    embeds = hearing.merge(text, torch.zeros_like(text), ids == slot, encoded)
    positions = hearing.position_ids(model, ids, mask, lengths)
    return embeds, positions


def test_is_native_hearing_with_the_release_front_end(built):
    _, _, _, hearing = built
    assert isinstance(hearing, NativeHearing)
    assert (hearing.sample_rate, hearing.feature_dim, hearing.max_seconds) == (16000, 128, 300.0)
    assert hearing.uses_audio_tokens is False
    assert QwenOmniThinkerBackbone(max_audio_seconds=30).native_hearing().max_seconds == 30.0
    with pytest.raises(ValueError, match="max_audio_seconds"):
        QwenOmniThinkerBackbone(max_audio_seconds=-1).native_hearing()


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logits_match_the_processor_and_thinker_forward(ckpt, built, processor, padding_side):
    """PARITY: the thinker's own forward on the processor's batch == vcritic's encoder/merge/positions."""
    _, model, tokenizer, hearing = built
    clips = [clip(3.0, 1), clip(7.3, 2)]
    texts = processor.apply_chat_template([critic_conversation(PERSONA, c) for c in CONTEXTS],
                                          add_generation_prompt=True, tokenize=False)
    ref_in = processor(text=texts, audio=clips, return_tensors="pt", padding=True, padding_side=padding_side)
    if padding_side == "right":  # the helper other tests use builds the same batch
        same = processor_inputs(ckpt, tokenizer, clips[:1], PERSONA, CONTEXTS[0])
        assert torch.equal(same["input_ids"][0], ref_in["input_ids"][0][ref_in["attention_mask"][0].bool()])
    ids, mask, features, lengths, slot = vcritic_batch(model, tokenizer, hearing, clips, CONTEXTS)
    with torch.no_grad():
        ref = model(input_ids=ref_in["input_ids"], input_features=ref_in["input_features"],
                    feature_attention_mask=ref_in["feature_attention_mask"],
                    attention_mask=ref_in["attention_mask"]).logits
        embeds, positions = vcritic_forward(model, hearing, ids, mask, features, lengths, slot)
        mine = model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask).logits
        quieter, _ = vcritic_forward(model, hearing, ids, mask, features * 0.5, lengths, slot)
        moved = (model(inputs_embeds=quieter, position_ids=positions, attention_mask=mask).logits - mine).abs()
    assert moved[mask.bool()].max() > 1e-3  # the music reaches the logits far above the tolerance
    assert positions.shape == (3, *ids.shape)
    worst = 0.0
    for i in range(2):
        real_ref, real_mine = ref_in["attention_mask"][i].bool(), mask[i].bool()
        assert ref_in["input_ids"][i][real_ref].tolist() == ids[i][real_mine].tolist()
        worst = max(worst, (ref[i][real_ref] - mine[i][real_mine]).abs().max().item())
    print(f"max abs logit diff ({padding_side} padding): {worst:.3g}")
    assert worst <= 1e-5


@pytest.mark.parametrize(("seconds", "tokens"), [(1.0, 25), (3.0, 75), (7.3, 182)])
def test_features_and_token_counts_match_the_processor(built, processor, seconds, tokens):
    _, _, _, hearing = built
    audio = clip(seconds)
    ref = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>"], audio=[audio], return_tensors="np")
    frames = int(ref["feature_attention_mask"][0].sum())
    mine = hearing.features(audio)
    assert mine.dtype == np.float32 and mine.shape == (frames, 128)
    np.testing.assert_array_equal(mine, ref["input_features"][0][:, :frames].T)
    assert hearing.num_audio_tokens(frames) == tokens == int((ref["input_ids"] == processor.audio_token_id).sum())
    assert tokens == processor._get_num_audio_tokens(len(audio))


def test_long_clips_are_cut_to_max_seconds(ckpt, processor):
    hearing = QwenOmniHearing.for_checkpoint(str(ckpt), max_audio_seconds=2.5)
    audio = clip(4.0)
    cut = audio[: int(2.5 * SR)]
    np.testing.assert_array_equal(hearing.features(audio), hearing.features(cut))
    ref = processor(text=["<|audio_bos|><|AUDIO|><|audio_eos|>"], audio=[cut], return_tensors="np")
    np.testing.assert_array_equal(hearing.features(audio), ref["input_features"][0][:, :250].T)
    window = QwenOmniHearing.for_checkpoint(str(ckpt))  # the extractor's own 300 s limit
    over = np.tile(clip(1.0), 301)
    assert window.features(over).shape == (30000, 128)
    np.testing.assert_array_equal(window.features(over)[-50:], window.features(over[: 300 * SR])[-50:])


def test_too_short_or_stereo_clips_are_refused(built):
    _, _, _, hearing = built
    with pytest.raises(ValueError, match="too short"):
        hearing.features(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="mono"):
        hearing.features(np.zeros((2, SR), np.float32))


def test_prompt_is_the_release_chat_layout(built):
    _, _, tokenizer, hearing = built
    parts = hearing.prompt(tokenizer, PERSONA, CONTEXTS[0])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>", "<|im_end|>")}
    assert parts.before_music[-1] == ids["<|audio_bos|>"] and parts.after_music[0] == ids["<|audio_eos|>"]
    assert (parts.slot_id, parts.end_id) == (ids["<|AUDIO|>"], ids["<|im_end|>"])
    before, after = tokenizer.decode(parts.before_music), tokenizer.decode(parts.after_music)
    assert before.startswith(f"<|im_start|>system\n{PERSONA} ") and before.endswith(
        "<|im_end|>\n<|im_start|>user\n<|audio_bos|>")
    assert after.startswith(f"<|audio_eos|>{CONTEXTS[0]}\n\n") and after.endswith(
        "<|im_end|>\n<|im_start|>assistant\n")


def test_encoder_references_the_tower_and_merge_scatters_in_batch_order(built):
    _, model, tokenizer, hearing = built
    encoder = hearing.encoder(model)
    assert isinstance(encoder, QwenOmniAudioEncoder) and encoder.tower is model.model.audio_tower
    assert list(encoder.parameters()) == []
    holder = torch.nn.Module()
    holder.trunk, holder.hearing_encoder = model, encoder
    assert not any(k.startswith("hearing_encoder") for k in holder.state_dict())
    clips = [clip(1.0), clip(0.5, 3)]
    ids, mask, features, lengths, slot = vcritic_batch(model, tokenizer, hearing, clips, CONTEXTS)
    with torch.no_grad():
        encoded = encoder(features, lengths)
        feature_mask = (torch.arange(features.shape[1]) < lengths[:, None]).long()
        ref = model.get_audio_features(features.transpose(1, 2), feature_mask)
    torch.testing.assert_close(encoded, ref.last_hidden_state, atol=0, rtol=0)
    assert encoded.shape == (25 + 12, model.config.text_config.hidden_size)
    text = model.get_input_embeddings()(ids)
    merged = hearing.merge(text, torch.zeros_like(text), ids == slot, encoded)
    torch.testing.assert_close(merged[1][ids[1] == slot], encoded[25:], atol=0, rtol=0)
    torch.testing.assert_close(merged[ids != slot], text[ids != slot], atol=0, rtol=0)
    with pytest.raises(ValueError, match="music positions"):
        hearing.merge(text, None, ids == slot, encoded[:-1])


def test_the_frozen_random_tower_hears_pitch(built):
    """The tiny tower's output depends on what it hears, not just on position: low and high tones
    land far apart compared with the spread inside each group (tests that train on it rely on this)."""
    _, model, _, hearing = built
    encoder = hearing.encoder(model)

    def rows(freq: float, seed: int) -> torch.Tensor:
        t = np.arange(SR) / SR
        audio = (0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(seed).standard_normal(SR))
        feats = torch.from_numpy(hearing.features(audio.astype(np.float32)))[None]
        with torch.no_grad():
            return encoder(feats, torch.tensor([feats.shape[1]]))

    low = torch.stack([rows(f, i) for i, f in enumerate((130.0, 160.0, 200.0))])
    high = torch.stack([rows(f, i) for i, f in enumerate((950.0, 1200.0, 1450.0))])
    between = (low.mean(0) - high.mean(0)).norm(dim=-1).mean()
    within = ((low - low.mean(0)).norm(dim=-1).mean() + (high - high.mean(0)).norm(dim=-1).mean()) / 2
    assert between > 2 * within, (float(between), float(within))


def test_positions_are_the_thinkers_mrope_and_checked_against_the_clips(built):
    _, model, tokenizer, hearing = built
    ids, mask, _, lengths, _ = vcritic_batch(model, tokenizer, hearing, [clip(1.0), clip(3.0)], CONTEXTS)
    positions = hearing.position_ids(model, ids, mask, lengths)
    # The audio branch of get_rope_index (taken when a grid is given) lays audio out on one time line:
    no_images = torch.zeros(0, 3, dtype=torch.long)
    full, _ = model.get_rope_index(ids, no_images, None, mask, False, lengths, None)
    torch.testing.assert_close(positions, full, atol=0, rtol=0)
    plain = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    assert torch.equal(positions, plain.unsqueeze(0).expand(3, -1, -1))
    with pytest.raises(ValueError, match="do not match"):
        hearing.position_ids(model, ids, mask, lengths + 40)


@pytest.mark.parametrize("k", [1, 2])
def test_copied_layers_with_mrope_positions_reproduce_the_trunk(built, k):
    backbone, model, tokenizer, hearing = built
    ids, mask, features, lengths, slot = vcritic_batch(model, tokenizer, hearing, [clip(1.0), clip(2.0)], CONTEXTS)
    with torch.no_grad():
        embeds, positions = vcritic_forward(model, hearing, ids, mask, features, lengths, slot)
        skewed = positions + torch.tensor([0, 3, 7]).view(3, 1, 1)  # distinct axes: the mrope split matters
        for pos in (positions, skewed, None):
            hidden = model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask,
                           output_hidden_states=True).hidden_states
            n = len(backbone.decoder_layers(model))
            copies = copy.deepcopy(backbone.decoder_layers(model)[n - k :])
            mine = backbone.final_norm(model)(backbone.run_layers(model, copies, hidden[n - k], mask, position_ids=pos))
            torch.testing.assert_close(mine, hidden[n], atol=1e-5, rtol=0)


def test_set_trainable_freezes_the_tower_but_the_projection(built):
    _, model, _, hearing = built
    model = copy.deepcopy(model)
    encoder = hearing.encoder(model)
    tower = model.model.audio_tower

    def trainable(module):
        return {n for n, p in module.named_parameters() if p.requires_grad}

    hearing.set_trainable(model, encoder, train_encoder=False, train_projection=False)
    assert trainable(tower) == set() and trainable(model.model.visual) == set()
    assert trainable(model.model.language_model) == {n for n, _ in model.model.language_model.named_parameters()}
    hearing.set_trainable(model, encoder, train_encoder=False, train_projection=True)
    assert trainable(tower) == {"proj.weight", "proj.bias"}
    hearing.set_trainable(model, encoder, train_encoder=True, train_projection=False)
    assert trainable(tower) == {n for n, _ in tower.named_parameters() if not n.startswith("audio_bos_eos_token")}


@pytest.mark.parametrize("full_omni", [True, False])
def test_writer_lays_out_a_release_checkpoint_that_the_backbone_loads(tmp_path, full_omni):
    path = write_tiny_qwen_omni_checkpoint(tmp_path / "ckpt", seed=3, full_omni=full_omni)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [
        "Qwen2_5OmniForConditionalGeneration" if full_omni else "Qwen2_5OmniThinkerForConditionalGeneration"]
    pre = json.loads((path / "preprocessor_config.json").read_text())
    assert pre["feature_extractor_type"] == "WhisperFeatureExtractor"
    assert pre["processor_class"] == "Qwen2_5OmniProcessor"
    assert (pre["feature_size"], pre["sampling_rate"], pre["hop_length"], pre["n_fft"], pre["n_samples"],
            pre["nb_max_frames"]) == (128, 16000, 160, 400, 4800000, 30000)
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == json.loads((path / "chat_template.json").read_text())["chat_template"]
    model, tokenizer = QwenOmniThinkerBackbone(path=str(path), dtype="float32").build()
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert model.config.audio_config.num_mel_bins == 128
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for token in SPECIAL_TOKENS:
        assert len(tokenizer(token).input_ids) == 1
    assert all(getattr(tokenizer, name) == token for name, token in MEDIA_TOKENS.items())
    assert model.config.audio_token_id == tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    text = "Pitch drifts flat — 3 notes, très belle ☃"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    again, _ = QwenOmniThinkerBackbone(path=str(write_tiny_qwen_omni_checkpoint(tmp_path / "b", seed=3)),
                                       dtype="float32").build()
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_random_thinker_hears_with_the_release_defaults():
    """Without a checkpoint (and for a vcritic-saved random thinker) the release's front end is used."""
    backbone = QwenOmniThinkerBackbone(tiny={"text": {"hidden_size": 32, "num_hidden_layers": 1}}, dtype="float32")
    model, tokenizer = backbone.build(["a warm tone with clean diction"] * 8, ["<|critic|>"])
    hearing = backbone.native_hearing()
    parts = hearing.prompt(tokenizer, "", "")
    assert tokenizer.decode(parts.before_music).startswith("<|im_start|>system\nYou are an experienced vocal coach.")
    ids, mask, features, lengths, slot = vcritic_batch(model.eval(), tokenizer, hearing, [clip(1.0)], [""])
    with torch.no_grad():
        embeds, positions = vcritic_forward(model, hearing, ids, mask, features, lengths, slot)
        logits = model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask).logits
    assert logits.shape == (*ids.shape, len(tokenizer)) and torch.isfinite(logits).all()
