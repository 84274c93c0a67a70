"""The Qwen2.5-Omni thinker backbone, on a tiny random thinker (no download)."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from plugins.hf.qwen_omni import LORA_TARGET_REGEX, QwenOmniThinkerBackbone, mrope_sections
from vcritic.protocols import Backbone
from vcritic.testing.backbones import assert_branch_reproduces_trunk

CORPUS = [
    "the chorus lands on a bright sustained high note",
    "pitch drifts flat in the second verse but the vibrato is steady",
    "breath support is weak and the consonants blur together",
    "a warm tone with clean diction and a confident belt",
] * 8
SPECIALS = ["<|critic|>", "<|audio_start|>"]
TINY = {"text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}, "vocab_size": 400}
LAYERS = 3


def plugin(**kwargs) -> QwenOmniThinkerBackbone:
    return QwenOmniThinkerBackbone(**{"tiny": TINY, "dtype": "float32", **kwargs})


@pytest.fixture(scope="module")
def built():
    model, tokenizer = plugin().build(CORPUS, SPECIALS)
    return model.eval(), tokenizer


def batch(model, lengths=(9, 6), seed=1):
    """Random embeddings with right padding: row i is real for its first lengths[i] steps."""
    gen = torch.Generator().manual_seed(seed)
    width = model.get_input_embeddings().embedding_dim
    embeds = torch.randn(len(lengths), max(lengths), width, generator=gen)
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    return embeds, mask


def test_is_a_backbone_and_spec_rebuilds():
    p = plugin(seed=3)
    assert isinstance(p, Backbone)
    again = QwenOmniThinkerBackbone(**p.spec())
    assert again.spec() == p.spec() and p.spec()["path"] is None


def test_unknown_tiny_key_is_refused():
    with pytest.raises(ValueError, match="hidden_size"):
        QwenOmniThinkerBackbone(tiny={"hidden_size": 8})


def test_mrope_sections_cover_half_the_head():
    assert mrope_sections(128) == [16, 24, 24]  # the released model's split
    for head_dim in (16, 32, 48, 64):
        assert sum(mrope_sections(head_dim)) == head_dim // 2


def test_tokenizer_has_specials_and_placeholders(built):
    model, tokenizer = built
    for token in SPECIALS:
        assert len(tokenizer(token, add_special_tokens=False).input_ids) == 1
    assert tokenizer.convert_ids_to_tokens(model.config.audio_token_id) == "<|AUDIO|>"
    assert tokenizer.convert_ids_to_tokens(model.config.vision_start_token_id) == "<|vision_bos|>"
    assert model.config.get_text_config().vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_forward_shapes_and_hidden_states(built):
    model, _ = built
    embeds, mask = batch(model)
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    assert out.logits.shape == (2, 9, model.config.get_text_config().vocab_size)
    assert len(out.hidden_states) == LAYERS + 1
    assert all(h.shape == (2, 9, 64) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[0], embeds)  # entry 0 is the input of layer 0
    assert torch.allclose(model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-6)  # last is normed


@pytest.mark.parametrize("k", [1, 2, LAYERS])
def test_copied_top_layers_reproduce_the_trunk(built, k):
    model, _ = built
    assert_branch_reproduces_trunk(plugin(), model, *batch(model), k)


def test_positions_do_not_depend_on_earlier_calls(built):
    """The stock thinker caches rope deltas from generate/input_ids calls and then fails on a
    batch of another size; the plugin's hook keeps embeddings-only calls stateless."""
    model, tokenizer = built
    embeds, mask = batch(model)
    with torch.no_grad():
        fresh = model(inputs_embeds=embeds[:1], attention_mask=mask[:1]).logits
        model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(mask),
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        ids = tokenizer(["pitch drifts flat", "vibrato"], return_tensors="pt", padding=True)
        model(**ids)
        later = model(inputs_embeds=embeds[:1], attention_mask=mask[:1]).logits
    torch.testing.assert_close(later, fresh, atol=1e-6, rtol=0)


def test_cached_decoding_matches_full_forward(built):
    model, _ = built
    embeds, _ = batch(model, lengths=(8,))
    with torch.no_grad():
        full = model(inputs_embeds=embeds).logits
        first = model(inputs_embeds=embeds[:, :5], use_cache=True)
        rest = model(
            inputs_embeds=embeds[:, 5:], past_key_values=first.past_key_values, use_cache=True
        ).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), full, atol=1e-5, rtol=0)


def test_lora_adapts_only_language_model_projections(built):
    from peft import LoraConfig, get_peft_model

    model, _ = built
    p = plugin()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=p.lora_target_modules()))
    adapted = sorted(
        {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    )
    assert len(adapted) == LAYERS * 7
    assert all(".model.language_model.layers." in n for n in adapted)
    assert not any("audio_tower" in n or "visual" in n for n in adapted)
    # The same suffixes exist in the towers: this is why the targets are a path regex.
    tower_names = [n for n, _ in model.named_modules() if n.startswith(("model.audio_tower", "model.visual"))]
    assert any(n.endswith("self_attn.q_proj") for n in tower_names)
    assert any(n.endswith("mlp.gate_proj") for n in tower_names)
    trainable = [n for n, t in peft_model.named_parameters() if t.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    # Decoder access and the forward still work through the peft wrapper.
    assert p.decoder_layers(peft_model) is p.decoder_layers(peft_model.get_base_model())
    embeds, mask = batch(model)
    with torch.no_grad():
        out = peft_model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    assert len(out.hidden_states) == LAYERS + 1


def test_lora_regex_matches_inside_a_wrapper_but_not_copies():
    assert re.fullmatch(LORA_TARGET_REGEX, "trunk.model.language_model.layers.11.mlp.down_proj")
    assert not re.fullmatch(LORA_TARGET_REGEX, "audio_branch.layers.0.self_attn.q_proj")
    assert not re.fullmatch(LORA_TARGET_REGEX, "model.audio_tower.layers.0.self_attn.q_proj")


def test_save_and_rebuild_from_path(built, tmp_path):
    model, tokenizer = built
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    p = plugin(path=str(tmp_path))
    again, tok2 = p.build()
    again.eval()
    embeds, mask = batch(model)
    with torch.no_grad():
        a = model(inputs_embeds=embeds, attention_mask=mask).logits
        b = again(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(a, b)
    text = "<|critic|> a warm tone"
    assert tok2(text).input_ids == tokenizer(text).input_ids
    assert p.spec()["path"] == str(tmp_path)


def test_loads_thinker_from_a_full_omni_checkpoint(built, tmp_path):
    """A released checkpoint holds thinker + talker + token2wav under ``thinker.``-prefixed keys."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    model, tokenizer = built
    full = Qwen2_5OmniForConditionalGeneration(
        Qwen2_5OmniConfig(thinker_config=model.config.to_dict(), enable_audio_output=False)
    )
    full.thinker.load_state_dict(model.state_dict())
    full.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    thinker, _ = plugin(path=str(tmp_path)).build()
    embeds, mask = batch(model)
    with torch.no_grad():
        torch.testing.assert_close(
            thinker.eval()(inputs_embeds=embeds, attention_mask=mask).logits,
            model(inputs_embeds=embeds, attention_mask=mask).logits,
            atol=0,
            rtol=0,
        )


def test_build_is_deterministic_and_casts_dtype():
    a, _ = plugin(seed=5).build(CORPUS)
    b, _ = plugin(seed=5).build(CORPUS)
    c, _ = plugin(seed=6).build(CORPUS)
    wa, wb, wc = (m.model.language_model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    bf16, _ = QwenOmniThinkerBackbone(tiny=TINY, dtype="bfloat16").build(CORPUS)
    assert {t.dtype for t in bf16.parameters()} == {torch.bfloat16}


def test_needs_a_corpus_without_path():
    with pytest.raises(ValueError, match="corpus"):
        plugin().build(None)
