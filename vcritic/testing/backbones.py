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
