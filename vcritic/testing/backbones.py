"""Checks every backbone plugin must pass; plugin authors can call them from their own tests."""

from __future__ import annotations

import copy

import torch


def assert_branch_reproduces_trunk(backbone, model, embeds: torch.Tensor, mask: torch.Tensor, k: int) -> None:
    """Copies of the top ``k`` decoder layers, run by ``backbone.run_layers`` from the trunk's
    hidden state before layer N−k and followed by the final norm, must give the trunk's own last
    hidden state: this is what lets vcritic build a parallel audio branch on the backbone."""
    n = len(backbone.decoder_layers(model))
    with torch.no_grad():
        hidden = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states
        copies = copy.deepcopy(backbone.decoder_layers(model)[n - k :])
        mine = backbone.final_norm(model)(backbone.run_layers(model, copies, hidden[n - k], mask))
    torch.testing.assert_close(mine, hidden[n], atol=1e-5, rtol=0)


def assert_cached_layers_match(backbone, model, hidden: torch.Tensor, mask: torch.Tensor, k: int,
                               position_ids: torch.Tensor | None = None, prefill: int | None = None) -> None:
    """``backbone.run_layers_cached`` (an optional :class:`~vcritic.protocols.CachedBackbone` method),
    fed a prefix and then one position at a time, must give what ``run_layers`` gives over the whole
    sequence: this is what lets a critic on the backbone generate speech with a KV cache.

    ``position_ids`` are the whole sequence's ([B, T], [3, B, T], or None for 0..T-1); ``prefill`` is
    the prefix length (default: all but the last three positions).
    """
    from transformers import DynamicCache

    n = len(backbone.decoder_layers(model))
    copies = copy.deepcopy(backbone.decoder_layers(model)[n - k :])
    length = hidden.shape[1]
    split = length - 3 if prefill is None else prefill
    if position_ids is None:
        position_ids = torch.arange(length, device=hidden.device).unsqueeze(0).expand(hidden.shape[0], -1)

    def cut(p, a, b):
        return p[..., a:b]

    with torch.no_grad():
        whole = backbone.run_layers(model, copies, hidden, mask, position_ids)
        past = DynamicCache(config=model.config)
        parts = [backbone.run_layers_cached(model, copies, hidden[:, :split], mask[:, :split],
                                            cut(position_ids, 0, split), past)]
        for t in range(split, length):
            parts.append(backbone.run_layers_cached(model, copies, hidden[:, t : t + 1], mask[:, : t + 1],
                                                    cut(position_ids, t, t + 1), past))
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, dim=1)[real], whole[real], atol=1e-5, rtol=0)
