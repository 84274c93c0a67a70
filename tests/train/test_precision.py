"""bf16 that really trains in bf16, and gradient checkpointing that changes nothing but memory.

The DeepSpeed engine is built in this process as one rank (gloo on CPU), with the config the
training loop uses; no DeepSpeed op is compiled (client torch AdamW, no shm comm op).
"""

import socket

import pytest
import torch

from vcritic.models import build
from vcritic.models.sequence import build_streams, collate
from vcritic.protocols import PromptParts
from vcritic.train.ds_config import deepspeed_config
from vcritic.train.loop import enable_gradient_checkpointing

FEAT = 6
CORPUS = ["Persona: a fan.\nListen and critique:", " the lead sounds like a flute. it sits in G major."] * 10
MODEL_CFG = dict(audio_head_layers=1, loss_lambda=2 / 3, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                 lora_target_modules=None, train_text_head=True, max_prompt_tokens=64, max_text_tokens=64,
                 max_audio_tokens=64)
BACKBONE = {"name": "causal_lm", "options": {"config": {"hidden_size": 32, "intermediate_size": 64,
                                                        "num_hidden_layers": 3, "num_attention_heads": 4,
                                                        "num_key_value_heads": 2}, "tokenizer_vocab_size": 300}}
TRAIN = dict(batch_size=2, grad_accum=1, grad_clip=1.0, zero_stage=2, precision="bf16")


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return build.materialize_backbone(BACKBONE, CORPUS, tmp_path_factory.mktemp("m") / "base")


def make(spec):
    torch.manual_seed(0)
    return build.build_critic(spec, MODEL_CFG, audio_codes=16, feature_dim=FEAT)


def batch(critic, tok):
    v = critic.vocab
    g = torch.Generator().manual_seed(1)

    def one(persona, music, text, speech):
        parts = PromptParts([*tok(persona)["input_ids"], v.music_start], [v.music_end], v.slot, v.end)
        return build_streams(v, parts, len(music), music, tok(text)["input_ids"], speech,
                             music_features=torch.randn(len(music), FEAT, generator=g).numpy())

    return collate([one("Persona: a fan.", [1, 2, 3], " it sits in G major.", [4, 5]),
                    one("Persona: x", [7, 7, 7, 7], " flute.", [9, 9, 9])], v)


@pytest.fixture(scope="module")
def one_rank():
    """A one-process 'cluster', as a launcher would set it up."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # never compile the shm comm op
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = pytest.MonkeyPatch()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        mp.setenv(k, v)
    yield deepspeed
    if dist.is_initialized():
        dist.destroy_process_group()
    mp.undo()


def test_bf16_engine_runs_forward_and_backward_in_bf16_with_fp32_master_weights(spec, one_rank):
    critic, tok = make(spec)
    assert critic.trunk.get_input_embeddings().weight.dtype == torch.float32  # loaded in fp32
    optimizer = torch.optim.AdamW([p for p in critic.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = one_rank.initialize(model=critic, optimizer=optimizer, config=deepspeed_config(TRAIN))
    dtypes = {p.dtype for p in engine.module.parameters()}
    assert dtypes == {torch.bfloat16}, dtypes  # trunk, LoRA and heads alike
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = (output[0] if isinstance(output, tuple) else output).dtype

        return hook

    layer = critic.backbone.decoder_layers(critic.trunk)[0]
    hooks = [layer.register_forward_hook(record("trunk")), critic.audio_head.register_forward_hook(record("audio_head"))]
    b = batch(critic, tok)
    losses = []
    for _ in range(4):
        out = engine(**b)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss.detach()))
    for h in hooks:
        h.remove()
    assert seen == {"trunk": torch.bfloat16, "audio_head": torch.bfloat16}
    assert out.text_logits.dtype == torch.bfloat16
    # The ZeRO optimizer steps fp32 copies of the trainable weights.
    masters = engine.optimizer.single_partition_of_fp32_groups
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_bf16_needs_a_zero_stage():
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config({**TRAIN, "zero_stage": 0})
    assert deepspeed_config({**TRAIN, "precision": "fp32", "zero_stage": 0})["bf16"] == {"enabled": False}


def loss_and_grads(spec, checkpointing: bool):
    critic, tok = make(spec)
    if checkpointing:
        enable_gradient_checkpointing(critic)
    critic.train()
    # A module inside a decoder layer runs again when backward recomputes the layer (counted by
    # wrapping its forward: module hooks do not fire in the recompute).
    inner = critic.backbone.decoder_layers(critic.trunk)[1].mlp
    calls, forward = [], inner.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    inner.forward = counted
    out = critic(**batch(critic, tok))
    out.loss.backward()
    del inner.forward
    grads = {n: p.grad.clone() for n, p in critic.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.detach(), grads, len(calls)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(spec):
    loss, grads, calls = loss_and_grads(spec, False)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(spec, True)
    assert calls == 1 and calls_ckpt == 2  # the trunk layer really is recomputed in backward
    assert torch.allclose(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    assert any("lora_" in n for n in grads)  # LoRA weights get gradients through the checkpoints
    for name, g in grads.items():
        assert torch.allclose(g, grads_ckpt[name], atol=1e-6, rtol=1e-5), name
