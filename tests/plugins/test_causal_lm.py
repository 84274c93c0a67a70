"""The generic causal-LM backbone, on tiny random qwen2 and llama models (no download)."""

from __future__ import annotations

import copy

import pytest
import torch

from plugins.hf.causal_lm import DEFAULT_LORA_TARGETS, CausalLMBackbone, train_bpe_tokenizer
from vcritic.protocols import Backbone
from vcritic.testing.backbones import assert_branch_reproduces_trunk

CORPUS = [
    "the chorus lands on a bright sustained high note",
    "pitch drifts flat in the second verse but the vibrato is steady",
    "breath support is weak and the consonants blur together",
    "a warm tone with clean diction and a confident belt",
] * 8
SPECIALS = ["<|critic|>", "<|audio_start|>", "<|audio_end|>"]
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}
LAYERS = 3


def plugin(model_type: str, **kwargs) -> CausalLMBackbone:
    return CausalLMBackbone(model_type=model_type, config=SMALL, tokenizer_vocab_size=400, **kwargs)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def built(request):
    p = plugin(request.param)
    model, tokenizer = p.build(CORPUS, SPECIALS)
    return p, model.eval(), tokenizer


def batch(model, lengths=(9, 6), seed=1):
    """Random embeddings with right padding: row i is real for its first lengths[i] steps."""
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(len(lengths), max(lengths), model.config.hidden_size, generator=gen)
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    return embeds, mask


def test_is_a_backbone_and_spec_rebuilds():
    p = plugin("llama", seed=4)
    assert isinstance(p, Backbone)
    assert CausalLMBackbone(**p.spec()).spec() == p.spec()
    assert p.lora_target_modules() == DEFAULT_LORA_TARGETS
    assert CausalLMBackbone(lora_targets=["q_proj"]).lora_target_modules() == ["q_proj"]


def test_tokenizer_specials_roundtrip_and_pad():
    tok = train_bpe_tokenizer(CORPUS, 400, [*SPECIALS, "<|pad|>"])
    for token in SPECIALS:
        ids = tok(token, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == token
    text = "<|critic|> Pitch drifts flat — naïve belt, 3 notes!"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|critic|>", "")
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.convert_tokens_to_ids("<|pad|>") == tok.pad_token_id  # listed once, not twice
    assert len(tok) <= 400


def test_tokenizer_needs_a_corpus():
    with pytest.raises(ValueError, match="corpus"):
        train_bpe_tokenizer([], 400, [])


def test_config_matches_tokenizer(built):
    _, model, tokenizer = built
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_forward_shapes_and_hidden_states(built):
    _, model, tokenizer = built
    embeds, mask = batch(model)
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    assert out.logits.shape == (2, 9, len(tokenizer))
    assert len(out.hidden_states) == LAYERS + 1
    assert all(h.shape == (2, 9, 64) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[0], embeds)
    assert torch.allclose(model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, LAYERS])
def test_copied_top_layers_reproduce_the_trunk(built, k):
    p, model, _ = built
    assert_branch_reproduces_trunk(p, model, *batch(model), k)


def test_lora_adapts_only_the_named_projections(built):
    from peft import LoraConfig, get_peft_model

    p, model, _ = built
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=p.lora_target_modules()))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == LAYERS * len(DEFAULT_LORA_TARGETS)
    assert {n.rsplit(".", 1)[1] for n in adapted} == set(DEFAULT_LORA_TARGETS)
    trainable = [n for n, t in peft_model.named_parameters() if t.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert p.decoder_layers(peft_model) is p.decoder_layers(
        peft_model.get_base_model()
    )  # through the wrapper
    embeds, mask = batch(model)
    with torch.no_grad():
        hidden = peft_model(
            inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True
        ).hidden_states
        mine = p.final_norm(peft_model)(
            p.run_layers(peft_model, p.decoder_layers(peft_model)[-1:], hidden[-2], mask)
        )
    torch.testing.assert_close(mine, hidden[-1], atol=1e-5, rtol=0)


def test_save_and_rebuild_from_path(built, tmp_path):
    p, model, tokenizer = built
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tok2 = CausalLMBackbone(**{**p.spec(), "path": str(tmp_path)}).build()
    embeds, mask = batch(model)
    with torch.no_grad():
        a = model(inputs_embeds=embeds, attention_mask=mask).logits
        b = again.eval()(inputs_embeds=embeds, attention_mask=mask).logits
    assert torch.equal(a, b)
    text = "<|critic|> a warm tone <|audio_start|>"
    assert tok2(text).input_ids == tokenizer(text).input_ids
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_build_is_deterministic_for_a_seed(model_type):
    a, ta = plugin(model_type, seed=7).build(CORPUS, SPECIALS)
    b, tb = plugin(model_type, seed=7).build(CORPUS, SPECIALS)
    c, _ = plugin(model_type, seed=8).build(CORPUS, SPECIALS)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert ta.get_vocab() == tb.get_vocab()
    # The seed is forked, not consumed: the caller's RNG stream is left alone.
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    plugin(model_type, seed=7).build(CORPUS)
    assert torch.equal(torch.rand(3), expected)
