"""The Kimi-Audio backbone, its hearing and the Kimi semantic tokenizer, on tiny checkpoints in
Kimi-Audio's own layout (no download; the real package is replaced by a fake where needed)."""

from __future__ import annotations

import copy
import math
import sys
import textwrap
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plugins.hf.kimi_audio import (
    CheckpointTensors,
    KimiAudioBackbone,
    check_branch,
    convert_kimi_state_dict,
    read_kimi_config,
)
from plugins.hf.kimi_hearing import KimiAdaptor, special_ids, tokens_for
from vcritic.protocols import AudioTokenizer, Backbone, NativeHearing
from vcritic.testing.tiny_kimi import CORPUS, write_tiny_kimi_checkpoint

CODES = 40  # the critic's codebook (at most the checkpoint's 48 audio ids)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    path = write_tiny_kimi_checkpoint(tmp_path_factory.mktemp("kimi"))
    weights = dict(CheckpointTensors(path))
    backbone = KimiAudioBackbone(path=str(path), dtype="float32")
    trunk, tokenizer = backbone.build()
    return SimpleNamespace(path=path, cfg=read_kimi_config(path), weights=weights, backbone=backbone,
                           trunk=trunk.eval(), tokenizer=tokenizer)


def critic_like(backbone, trunk, k: int, codes: int = CODES):
    """Plain modules of the documented joint-model shapes (Q = 1, A = codes + 3)."""
    hidden = trunk.config.hidden_size
    hearing = backbone.native_hearing()
    layers = backbone.decoder_layers(trunk)
    return SimpleNamespace(
        trunk=trunk, hearing=hearing, vocab=SimpleNamespace(num_codebooks=1),
        audio_embed=nn.Embedding(codes + 3, hidden), audio_head=nn.Linear(hidden, codes + 3, bias=False),
        audio_branch=nn.ModuleList(copy.deepcopy(layer) for layer in layers[len(layers) - k :]),
        audio_norm=copy.deepcopy(backbone.final_norm(trunk)), hearing_encoder=hearing.encoder(trunk),
    )


# --- Kimi's own forward, written out from its tensors (the reference the conversion must reproduce) ---

def rms(x, w, eps=1e-6):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, theta):
    d = x.shape[-1]
    angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] / theta ** (torch.arange(0, d, 2) / d)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    return x * cos + torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1) * sin


def kimi_layer(w, p, x, cfg):
    b, t, hidden = x.shape
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    h = rms(x, w[p + "input_layernorm.weight"])

    def proj(name, n):
        y = h @ w[f"{p}self_attn.{name}.weight"].T + w[f"{p}self_attn.{name}.bias"]
        return y.view(b, t, n, hidden // heads).transpose(1, 2)

    q, k, v = proj("q_proj", heads), proj("k_proj", kv), proj("v_proj", kv)
    q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hidden // heads)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, hidden) @ w[p + "self_attn.o_proj.weight"].T
    h = rms(x, w[p + "post_attention_layernorm.weight"])
    mlp = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
    return x + mlp @ w[p + "mlp.down_proj.weight"].T


def kimi_forward(w, cfg, audio_ids, text_ids, whisper=None, continuous=None):
    """Kimi-Audio's forward: E[audio stream] (+ adaptor(whisper) · √2 where continuous) + E[text stream]."""
    emb = w["model.embed_tokens.weight"]
    audio = emb[audio_ids]
    if whisper is not None:
        a = F.silu(whisper @ w["model.vq_adaptor.layers.0.weight"].T + w["model.vq_adaptor.layers.0.bias"])
        a = a @ w["model.vq_adaptor.layers.3.weight"].T + w["model.vq_adaptor.layers.3.bias"]
        a = F.layer_norm(a, a.shape[-1:], w["model.vq_adaptor.layers.4.weight"], w["model.vq_adaptor.layers.4.bias"],
                         cfg["rms_norm_eps"])
        extra = torch.zeros_like(audio)
        extra[continuous] = a
        audio = torch.where(continuous[..., None], (audio + extra) * math.sqrt(2.0), audio)
    x = audio + emb[text_ids]
    for i in range(cfg["num_hidden_layers"]):
        x = kimi_layer(w, f"model.layers.{i}.", x, cfg)
        if i == cfg["kimia_mimo_transformer_from_layer_index"]:
            mimo = x.clone()
    for j in range(cfg["kimia_mimo_layers"]):
        mimo = kimi_layer(w, f"model.mimo_layers.{j}.", mimo, cfg)
    return (rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T,
            rms(mimo, w["model.mimo_norm.weight"]) @ w["mimo_output.weight"].T)


# --- the name mapping ---

def test_every_kimi_tensor_lands_exactly_once_with_equal_values(kimi):
    w, cfg = kimi.weights, kimi.cfg
    trunk_sd, side = convert_kimi_state_dict(w, cfg, CODES)
    offset, begin, end = cfg["kimia_token_offset"], cfg["kimia_media_begin"], cfg["kimia_media_end"]
    used = Counter()
    for name, value in trunk_sd.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(value, w[name][:offset])
        else:
            assert torch.equal(value, w[name])
        used[name] += 1
    for name, value in side.items():
        if name.startswith("audio_branch."):
            source = "model.mimo_layers." + name[len("audio_branch."):]
        elif name.startswith("hearing_encoder."):
            source = "model.vq_adaptor." + name[len("hearing_encoder."):]
        else:
            source = {"audio_norm.weight": "model.mimo_norm.weight", "audio_embed.weight": "model.embed_tokens.weight",
                      "audio_head.weight": "mimo_output.weight"}[name]
        if name in ("audio_embed.weight", "audio_head.weight"):
            assert value.shape == (CODES + 3, cfg["hidden_size"])
            assert torch.equal(value[:CODES], w[source][offset : offset + CODES])
            assert torch.equal(value[CODES], torch.zeros_like(value[CODES]))  # PAD
            assert torch.equal(value[CODES + 1], w[source][begin]) and torch.equal(value[CODES + 2], w[source][end])
        else:
            assert torch.equal(value, w[source])
        used[source] += 1
    assert set(used) == set(w)
    # the embedding's text rows go to the trunk and its audio rows to audio_embed; all else once
    assert used.pop("model.embed_tokens.weight") == 2 and set(used.values()) == {1}
    assert set(trunk_sd) == set(kimi.trunk.state_dict())


def test_unknown_missing_and_finetune_tensors_are_refused(kimi):
    w, cfg = kimi.weights, kimi.cfg
    with pytest.raises(ValueError, match="unknown tensors.*model.extra"):
        convert_kimi_state_dict({**w, "model.extra.weight": torch.zeros(1)}, cfg, CODES)
    with pytest.raises(ValueError, match="missing tensors.*mimo_output"):
        convert_kimi_state_dict({k: v for k, v in w.items() if k != "mimo_output.weight"}, cfg, CODES)
    with pytest.raises(ValueError, match="export_model"):
        convert_kimi_state_dict({**w, "whisper_model.speech_encoder.conv1.weight": torch.zeros(1)}, cfg, CODES)
    with pytest.raises(ValueError, match="codebook_size=49"):
        convert_kimi_state_dict(w, cfg, 49)


def test_trunk_and_branch_reproduce_kimis_forward(kimi):
    """Text + music + Kimi's control tokens: trunk logits equal Kimi's text logits (text rows), the audio
    branch's logits equal Kimi's audio logits (codebook rows and EOS), through vcritic's layout and merge."""
    backbone, trunk, tok, cfg = kimi.backbone, kimi.trunk, kimi.tokenizer, kimi.cfg
    critic = critic_like(backbone, trunk, k=2)
    backbone.init_audio_side(critic)
    ids, offset = special_ids(tok), cfg["kimia_token_offset"]
    text = tok.encode("a warm tone with clean diction", add_special_tokens=False)
    frames = 5
    codes = torch.tensor([3, 17, 0, 39, 8])
    whisper = torch.randn(frames, cfg["kimia_adaptor_input_dim"], generator=torch.Generator().manual_seed(0))
    tail = [ids["media_end"], ids["speech_ctd"], ids["msg_end"], ids["assistant_msg_start"]]
    blank = ids["text_blank"]
    # Kimi's two streams
    k_audio = [ids["user_msg_start"], *[blank] * len(text), ids["media_begin"], *(codes + offset).tolist(), *tail]
    k_text = [blank, *text, blank, *[blank] * frames, *[blank] * 4]
    continuous = torch.tensor([False] * (len(text) + 2) + [True] * frames + [False] * 4)
    ref_text, ref_audio = kimi_forward(kimi.weights, cfg, torch.tensor([k_audio]), torch.tensor([k_text]),
                                       whisper, continuous[None])
    # vcritic's streams: one text id per position, audio ids only on the music
    parts = critic.hearing.prompt(tok, "", "a warm tone with clean diction")
    v_text = torch.tensor([[*parts.before_music, *[parts.slot_id] * frames, *parts.after_music]])
    assert parts.before_music == [ids["user_msg_start"], *text, ids["media_begin"]] and parts.after_music == tail
    v_audio = torch.full(v_text.shape, CODES)  # PAD
    v_audio[0, continuous] = codes
    with torch.no_grad():
        audio_embeds = critic.audio_embed(v_audio) * (v_audio != CODES).unsqueeze(-1)
        encoded = critic.hearing_encoder(whisper[None], torch.tensor([frames]))
        x = critic.hearing.merge(trunk.get_input_embeddings()(v_text), audio_embeds, continuous[None], encoded)
        mask = torch.ones_like(v_text)
        out = trunk(inputs_embeds=x, attention_mask=mask, output_hidden_states=True)
        h = backbone.run_layers(trunk, critic.audio_branch, out.hidden_states[2], mask)
        audio_logits = critic.audio_head(critic.audio_norm(h))
    torch.testing.assert_close(out.logits, ref_text[..., :offset], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(audio_logits[..., :CODES], ref_audio[..., offset : offset + CODES], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(audio_logits[..., CODES + 2], ref_audio[..., cfg["kimia_media_end"]], atol=1e-4, rtol=1e-4)


def test_init_audio_side_fills_the_modules(kimi):
    critic = critic_like(kimi.backbone, kimi.trunk, k=2)
    kimi.backbone.init_audio_side(critic)
    w = kimi.weights
    assert torch.equal(critic.audio_norm.weight, w["model.mimo_norm.weight"])
    assert torch.equal(critic.audio_branch[1].mlp.down_proj.weight, w["model.mimo_layers.1.mlp.down_proj.weight"])
    assert torch.equal(critic.hearing_encoder.layers[3].weight, w["model.vq_adaptor.layers.3.weight"])
    offset = kimi.cfg["kimia_token_offset"]
    assert torch.equal(critic.audio_embed.weight[:CODES], w["model.embed_tokens.weight"][offset : offset + CODES])


# --- where the branch starts ---

def test_branch_must_start_where_kimis_does(kimi):
    real = {"kimia_mimo_transformer_from_layer_index": 21, "kimia_mimo_layers": 6}
    check_branch(real, 28, 6)
    with pytest.raises(ValueError, match=r"audio_head_layers=5.*after decoder layer 21.*set model.audio_head_layers=6"):
        check_branch(real, 28, 5)
    with pytest.raises(ValueError, match="set model.audio_head_layers=2"):
        kimi.backbone.init_audio_side(critic_like(kimi.backbone, kimi.trunk, k=3))


# --- the hearing ---

def test_hearing_layout_and_protocols(kimi):
    hearing = kimi.backbone.native_hearing()
    assert isinstance(kimi.backbone, Backbone) and isinstance(hearing, NativeHearing)
    assert hearing.uses_audio_tokens and hearing.feature_dim == 64 and hearing.num_audio_tokens(7) == 7
    assert hearing.position_ids(kimi.trunk, None, None, None) is None
    ids = special_ids(kimi.tokenizer)
    text_only = KimiAudioBackbone(path=str(kimi.path), output_type="text").native_hearing()
    parts = text_only.prompt(kimi.tokenizer, "persona", "context")
    assert parts.after_music[1] == ids["speech_ct"] and parts.end_id == ids["text_eos"]
    adaptor = hearing.encoder(kimi.trunk)
    with pytest.raises(ValueError, match="train_audio_encoder=false"):
        hearing.set_trainable(kimi.trunk, adaptor, True, True)
    hearing.set_trainable(kimi.trunk, adaptor, False, False)
    assert not any(p.requires_grad for p in adaptor.parameters())
    with pytest.raises(ValueError, match="3 music positions but 2 encoded rows"):
        hearing.merge(torch.zeros(1, 4, 32), torch.zeros(1, 4, 32), torch.tensor([[0, 1, 1, 1]]), torch.zeros(2, 32))


def test_whisper_features_are_stacked_to_12_5_hz(kimi):
    assert [tokens_for(n) for n in (0, 1, 1280, 1281, 480000, 480001)] == [0, 1, 1, 2, 375, 376]
    hearing = kimi.backbone.native_hearing()
    clip = 0.1 * np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32)
    rows = hearing.features(clip)
    assert rows.shape == (38, 64) and rows.dtype == np.float32
    extractor, encoder = hearing._load_whisper()
    with torch.no_grad():
        frames = encoder(extractor(clip, sampling_rate=16000, return_tensors="pt").input_features).last_hidden_state[0]
    np.testing.assert_allclose(rows[5], frames[20:24].reshape(-1).numpy(), atol=1e-5)
    assert hearing.features(np.zeros(16000 * 31, np.float32)).shape == (375 + 13, 64)
    assert KimiAdaptor(64, 32, 1e-6)(torch.from_numpy(rows)[None], torch.tensor([30])).shape == (30, 32)


# --- the tiny model without a checkpoint ---

def test_tiny_build_saves_and_rebuilds(tmp_path):
    backbone = KimiAudioBackbone(dtype="float32", config={"hidden_size": 32, "intermediate_size": 64})
    assert KimiAudioBackbone(**backbone.spec()).spec() == backbone.spec()
    trunk, tok = backbone.build(CORPUS, ["<|critic|>"])
    assert set(special_ids(tok)) and trunk.config.kimia_mimo_layers == 2
    backbone.init_audio_side(critic_like(backbone, trunk, k=2))  # checks, loads nothing
    trunk.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, _ = KimiAudioBackbone(path=str(tmp_path), dtype="float32").build()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trunk.state_dict().items())
    assert KimiAudioBackbone(path=str(tmp_path)).native_hearing().feature_dim == 64


# --- the semantic tokenizer ---

FAKE_TOKENIZER = '''
import torch
from torch import nn

class Glm4Tokenizer(nn.Module):
    def __init__(self, tokenizer_path):
        super().__init__()
        self.whisper_model = nn.Module()
        self.whisper_model.codebook = nn.Embedding(64, 8)

    def tokenize(self, speech=None, audio_path=None, sr=16000):
        audio = speech[0]
        ids = []
        for start in range(0, audio.shape[0], 480000):
            seg = audio[start:start + 480000]
            n = (seg.shape[0] - 1) // 1280 + 1
            ids += [int(seg[i * 1280:(i + 1) * 1280].abs().sum() * 1000) % 64 for i in range(n)]
        return torch.tensor(ids).unsqueeze(0)
'''
FAKE_DETOKENIZER = '''
import torch
CALLS = []

class Detok:
    def clear_states(self):
        CALLS.clear()

    def detokenize_streaming(self, semantic_token, is_final=False, upsample_factor=1, **kw):
        CALLS.append((semantic_token.shape[1], is_final, upsample_factor))
        return torch.zeros(1, semantic_token.shape[1] * upsample_factor * 480)

def get_audio_detokenizer(model_path):
    return Detok()
'''


@pytest.fixture
def fake_kimia(tmp_path, monkeypatch):
    root = tmp_path / "site"
    files = {"kimia_infer/__init__.py": "", "kimia_infer/models/__init__.py": "",
             "kimia_infer/models/tokenizer/__init__.py": "",
             "kimia_infer/models/tokenizer/glm4_tokenizer.py": FAKE_TOKENIZER,
             "kimia_infer/models/detokenizer/__init__.py": FAKE_DETOKENIZER}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    ckpt = tmp_path / "glm-4-voice-tokenizer"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"quantize_vocab_size": 64, "d_model": 8}')
    monkeypatch.syspath_prepend(str(root))
    yield ckpt
    for name in [m for m in sys.modules if m.startswith("kimia_infer")]:
        del sys.modules[name]


def test_semantic_tokenizer_without_the_package_says_what_to_install(tmp_path):
    from plugins.kimi.semantic_tokenizer import KimiSemanticTokenizer

    if "kimia_infer" in sys.modules or __import__("importlib").util.find_spec("kimia_infer"):
        pytest.skip("kimia_infer is installed here")
    with pytest.raises(ImportError, match=r"git clone https://github.com/MoonshotAI/Kimi-Audio.*glm-4-voice-tokenizer"):
        KimiSemanticTokenizer(path=str(tmp_path))


def test_semantic_tokenizer_through_a_fake_package(fake_kimia, tmp_path):
    from plugins.kimi.semantic_tokenizer import KimiSemanticTokenizer

    tok = KimiSemanticTokenizer(path=str(fake_kimia), device="cpu")
    assert isinstance(tok, AudioTokenizer)
    assert (tok.codebook_size, tok.feature_dim, tok.num_codebooks, tok.frame_rate) == (64, 8, 1, 12.5)
    clip = np.random.default_rng(1).uniform(-0.5, 0.5, 16000 * 2).astype(np.float32)
    ids = tok.encode(clip)
    assert ids.dtype == np.int64 and ids.shape == (tokens_for(len(clip)),) and ids.max() < 64
    assert np.array_equal(ids, tok.encode(clip)) and tok.features(clip).shape == (25, 8)
    with pytest.raises(NotImplementedError, match="detokenizer_path"):
        tok.decode(ids)
    tok.save(str(tmp_path / "saved"))
    again = KimiSemanticTokenizer(path=str(fake_kimia), device="cpu")
    again.load(str(tmp_path / "saved"))
    assert again.path == tok.path and again.codebook_size == 64
    speaker = KimiSemanticTokenizer(path=str(fake_kimia), device="cpu", detokenizer_path=str(tmp_path))
    wav = speaker.decode(np.arange(70) % 64)
    assert wav.dtype == np.float32 and wav.shape == (70 * 1280,)
    from kimia_infer.models.detokenizer import CALLS

    assert CALLS == [(30, False, 4), (30, False, 4), (10, True, 4)]


def test_preset_loads():
    from vcritic.config import load

    cfg = load("kimi_audio_joint")
    assert cfg.model.backbone.name == "kimi_audio" and cfg.model.audio_tokenizer.name == "kimi_semantic"
    assert (cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.audio_head_layers) == (16, 32, 6)
    assert cfg.model.loss_lambda == pytest.approx(2 / 3) and cfg.train.lr == pytest.approx(1e-5)
    assert (cfg.train.epochs, cfg.train.num_workers, cfg.train.grad_accum, cfg.train.zero_stage) == (3, 1, 4, 2)
    assert cfg.train.precision == "bf16" and cfg.train.use_gpu
